//! Which HTTP the application behind the server side is spoken to in, as Istio decides it
//! by the port's protocol: an application on a port named `http2` or `grpc` takes HTTP/2
//! only (cleartext, prior knowledge), so every request reaches it in HTTP/2 whatever the
//! caller spoke — from `--protocol http2`, or per port from the controller's inbound
//! cluster `inbound|PORT||`; other HTTP ports get HTTP/1.1.

mod support;

use std::net::SocketAddr;
use std::path::Path;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::cluster::v3::cluster::{ClusterDiscoveryType, DiscoveryType, LbPolicy};
use envoy_types::pb::envoy::config::core::v3::{BindConfig, Http2ProtocolOptions, SocketAddress, socket_address};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::HttpProtocolOptions;
use envoy_types::pb::envoy::extensions::upstreams::http::v3::http_protocol_options::{
    ExplicitHttpConfig, UpstreamProtocolOptions, explicit_http_config::ProtocolConfig,
};
use envoy_types::pb::google::protobuf::Any;
use prost::Message;
use sidecar::run::{RunArgs, Sidecar};
use support::control_plane::ControlPlane;
use support::{Pki, exchange};

const SERVER_ID: &str = "spiffe://cluster.local/ns/default/sa/reviews";
const CLUSTER_TYPE: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";

fn p(path: &Path) -> String {
    path.display().to_string()
}

fn args(line: &str) -> RunArgs {
    RunArgs::from_words(line.split_whitespace()).unwrap()
}

/// An application that takes HTTP/2 only (as a plain h2c server, or a gRPC one, does) and
/// answers each request with the version it came in, its authority and the caller's
/// identity as the server side vouched for it.
async fn http2_only_app() -> SocketAddr {
    support::accept_each(|stream| async move {
        let service = hyper::service::service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
            let authority = req.uri().authority().map(|a| a.to_string()).unwrap_or_default();
            let body = format!("{:?} {authority} {}", req.version(), support::xfcc_seen(&req));
            Ok::<_, std::convert::Infallible>(hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from(
                body,
            ))))
        });
        let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
            .await;
    })
    .await
    .0
}

/// The server side of `app` for `--protocol protocol`, with `extra` flags.
fn server(pki: &Pki, app: SocketAddr, protocol: &str, extra: &str) -> Sidecar {
    let (c, k) = pki.svid("cluster.local", "reviews");
    Sidecar::start(args(&format!(
        "--inbound 127.0.0.1:0={app} --cert {} --key {} --ca {} --protocol {protocol} --mtls STRICT {extra}",
        p(&c),
        p(&k),
        p(&pki.ca())
    )))
    .unwrap()
}

/// A caller's side of `server`, carrying HTTP (`h2_upgrade`: on the multiplexed HTTP/2 hop,
/// or kept-alive HTTP/1.1).
fn client(pki: &Pki, server: &Sidecar, h2_upgrade: &str) -> Sidecar {
    let (c, k) = pki.svid("cluster.local", "productpage");
    Sidecar::start(args(&format!(
        "--outbound 127.0.0.1:0={} --peer-id {SERVER_ID} --cert {} --key {} --ca {} --protocol http --h2-upgrade {h2_upgrade}",
        server.bound.inbound.unwrap(),
        p(&c),
        p(&k),
        p(&pki.ca())
    )))
    .unwrap()
}

/// An HTTP/1.1 GET through `client`: (status, body).
async fn get(client: &Sidecar) -> (u16, String) {
    let a = exchange(
        client.bound.outbound.unwrap(),
        "GET /ratings HTTP/1.1\r\nhost: reviews.default.svc.cluster.local:9080",
    )
    .await
    .unwrap();
    (a.status, a.body)
}

fn assert_http2_with_identity(body: &str) {
    assert!(body.starts_with("HTTP/2.0 "), "to the application in HTTP/2: {body}");
    assert!(
        body.ends_with(";URI=spiffe://cluster.local/ns/default/sa/productpage"),
        "with the caller's identity: {body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_port_gets_every_request_in_http2_whatever_the_hop_between_sidecars() {
    let pki = Pki::new("app-protocol", "flag");
    let app = http2_only_app().await;
    let server = server(&pki, app, "http2", "");
    for h2_upgrade in ["on", "off"] {
        let client = client(&pki, &server, h2_upgrade);
        for _ in 0..2 {
            let (status, body) = get(&client).await;
            assert_eq!(status, 200, "hop in HTTP/2: {h2_upgrade}; {body}");
            assert_http2_with_identity(&body);
        }
    }
}

/// Istio's inbound cluster of `port` as istiod writes it: the workload at the original
/// destination, in HTTP/2 when `http2`.
fn inbound_cluster(port: u16, http2: bool) -> Cluster {
    let mut c = Cluster {
        name: format!("inbound|{port}||"),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::OriginalDst as i32)),
        lb_policy: LbPolicy::ClusterProvided as i32,
        upstream_bind_config: Some(BindConfig {
            source_address: Some(SocketAddress {
                address: "127.0.0.6".into(),
                port_specifier: Some(socket_address::PortSpecifier::PortValue(0)),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    if http2 {
        let options = HttpProtocolOptions {
            upstream_protocol_options: Some(UpstreamProtocolOptions::ExplicitHttpConfig(ExplicitHttpConfig {
                protocol_config: Some(ProtocolConfig::Http2ProtocolOptions(Http2ProtocolOptions::default())),
            })),
            ..Default::default()
        };
        c.typed_extension_protocol_options.insert(
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions".into(),
            Any {
                type_url: "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions".into(),
                value: options.encode_to_vec(),
            },
        );
    }
    c
}

/// With a controller, the port's inbound cluster decides, and a change of it applies to the
/// next request: an HTTP/1.1 request to an HTTP/2-only application fails (`503`, as with
/// Envoy) until the cluster says HTTP/2, and fails again once it no longer does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controllers_inbound_cluster_says_which_http_the_application_takes() {
    let pki = Pki::new("app-protocol", "xds");
    let app = http2_only_app().await;
    let mut control = ControlPlane::start().await;
    let server = server(&pki, app, "http", &format!("--xds {}", control.address));
    let client = client(&pki, &server, "on");
    let (status, _) = get(&client).await;
    assert_eq!(status, 503, "HTTP/1.1 to an HTTP/2-only application");

    // Another port's cluster says HTTP/2: not this one's.
    let other = inbound_cluster(app.port().wrapping_add(1), true);
    control
        .push_acked(CLUSTER_TYPE, "1", std::slice::from_ref(&other))
        .await;
    assert_eq!(get(&client).await.0, 503);

    control
        .push_acked(CLUSTER_TYPE, "2", &[other.clone(), inbound_cluster(app.port(), true)])
        .await;
    let (status, body) = get(&client).await;
    assert_eq!(status, 200, "{body}");
    assert_http2_with_identity(&body);
    assert!(
        body.contains(" reviews.default.svc.cluster.local:9080 "),
        "the caller's authority, not the application's address: {body}"
    );

    control
        .push_acked(CLUSTER_TYPE, "3", &[other, inbound_cluster(app.port(), false)])
        .await;
    assert_eq!(get(&client).await.0, 503, "HTTP/1.1 again");
}
