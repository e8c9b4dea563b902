//! A Gateway API HTTPRoute on a Service, a VirtualService `tcp` route, and ServiceEntry
//! and WorkloadEntry endpoints, end to end: the real controller reads them from its
//! manifests and serves xDS; a real sidecar
//! routing table (the sidecar's own xDS client and captured outbound path, as
//! `sidecar run --capture` wires them) follows it, and connections handed to it as
//! captured ones to the services' VIPs reach real servers on loopback as the routes say.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use sidecar::destinations::Destinations;
use sidecar::outbound::{Captured, HttpHop};
use sidecar::tls::{Alpn, Svid, SvidSlot, TrustBundles};
use support::{Controller, scratch, until_true};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const REVIEWS_VIP: &str = "10.96.1.12:9080";
const DB_VIP: &str = "10.96.1.20:5432";

/// An HTTP/1.1 server answering every request with its `name`.
async fn http_backend(addr: &str, name: &'static str) -> SocketAddr {
    let listener = TcpListener::bind(addr).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |_req: hyper::Request<hyper::body::Incoming>| async move {
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(http_body_util::Full::new(
                            bytes::Bytes::from(name),
                        )))
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

/// A TCP server that writes its `name` on every connection and closes it.
async fn tcp_backend(addr: SocketAddr, name: &'static str) -> SocketAddr {
    let listener = TcpListener::bind(addr).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let _ = stream.write_all(name.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    addr
}

/// A sidecar's captured outbound path following `xds`; returns its table and one
/// address per VIP whose connections it takes as captured ones to that VIP.
async fn sidecar(xds: SocketAddr, vips: &[SocketAddr]) -> (Arc<ArcSwap<Destinations>>, Vec<SocketAddr>) {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::default();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let mut leaf = rcgen::CertificateParams::default();
    leaf.subject_alt_names = vec![rcgen::SanType::URI(
        "spiffe://cluster.local/ns/default/sa/productpage".try_into().unwrap(),
    )];
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    let svid = Svid::from_pem(cert.pem().as_bytes(), key.serialize_pem().as_bytes(), "test SVID").unwrap();
    let self_id = svid.id().clone();
    let svid = SvidSlot::new(svid);
    let telemetry = sidecar::telemetry::Telemetry::for_cluster("cluster1");
    let (trigger, watch) = sidecar::drain::channel();
    std::mem::forget(trigger);
    let settings = sidecar::pool::Settings {
        connect_timeout: Duration::from_secs(10),
        handshake_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(30),
        mark: None,
    };
    let hop = Arc::new(HttpHop::new(
        settings,
        svid.clone(),
        self_id.clone(),
        telemetry.clone(),
        watch.clone(),
    ));
    let table = Arc::new(ArcSwap::from_pointee(Destinations::default()));
    let bundles = TrustBundles::new();
    bundles.set(
        "cluster.local",
        sidecar::tls::bundle::Bundle::from_pem("cluster.local", ca_cert.pem().as_bytes()).unwrap(),
    );
    let mut entries = Vec::new();
    for vip in vips {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let entry = listener.local_addr().unwrap();
        entries.push(entry);
        let captured = Arc::new(Captured::new(
            table.clone(),
            svid.clone(),
            bundles.clone(),
            Alpn::Tcp,
            None,
            entry,
            self_id.clone(),
            Duration::from_secs(2),
            Duration::from_secs(2),
            telemetry.clone(),
            watch.clone(),
            hop.clone(),
            false,
        ));
        let vip = *vip;
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(captured.clone().carry_to(stream, vip));
            }
        });
    }
    let identity = sidecar::xds::Identity {
        id: self_id,
        ip: "10.241.0.20".parse().unwrap(),
        network: "network1".into(),
        cluster: "cluster1".into(),
        labels: vec![("app".into(), "productpage".into())],
        locality: None,
    };
    tokio::spawn(sidecar::xds::follow(
        format!("http://{xds}"),
        identity,
        table.clone(),
        None,
        |_, _| {},
    ));
    (table, entries)
}

/// One GET to `entry` (captured to reviews' VIP): the answer's body.
async fn get(entry: SocketAddr, headers: &[(&str, &str)]) -> String {
    let mut s = TcpStream::connect(entry).await.unwrap();
    let extra: String = headers.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
    let req = format!("GET /reviews/1 HTTP/1.1\r\nHost: reviews:9080\r\n{extra}Connection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut text = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut text))
        .await
        .expect("an answer in time")
        .unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    format!("{} {body}", head.get(9..12).unwrap_or("---"))
}

/// One connection to `entry` (captured to db's VIP): what the server said.
async fn connect(entry: SocketAddr) -> String {
    let mut s = TcpStream::connect(entry).await.unwrap();
    let mut text = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut text))
        .await
        .expect("an answer in time")
        .unwrap();
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_httproute_splits_90_10_with_a_header_match_and_a_tcp_route_splits_connections_80_20() {
    let dir = scratch("sidecar-routes");
    let (v1, v2) = (
        http_backend("127.0.0.2:0", "v1").await,
        http_backend("127.0.0.3:0", "v2").await,
    );
    let db1 = tcp_backend("127.0.0.4:0".parse().unwrap(), "db-v1").await;
    let db2 = tcp_backend(SocketAddr::new([127, 0, 0, 5].into(), db1.port()), "db-v2").await;
    support::gamma_cluster(&dir, v1, v2, db1, db2);
    let controller = Controller::serve(&dir);

    let vips: Vec<SocketAddr> = [REVIEWS_VIP, DB_VIP].iter().map(|v| v.parse().unwrap()).collect();
    let (table, entries) = sidecar(controller.xds, &vips).await;
    let subset = |s: &str| format!("outbound|5432|{s}|db.default.svc.cluster.local");
    until_true(
        "the sidecar has the routes and every endpoint",
        Duration::from_secs(30),
        || {
            let t = table.load();
            let has = |c: &str| t.upstreams.get(c).is_some_and(|u| !u.endpoints.is_empty());
            t.routes.contains_key("reviews.default.svc.cluster.local:9080")
                && has("outbound|9080||reviews-v1.default.svc.cluster.local")
                && has("outbound|9080||reviews-v2.default.svc.cluster.local")
                && has(&subset("v1"))
                && has(&subset("v2"))
        },
    )
    .await;
    let split = table.load().listeners[&vips[1]].clone();
    assert_eq!(split.weights(), [(subset("v1"), 80), (subset("v2"), 20)]);

    let n = 1_000;
    let mut counts: HashMap<String, usize> = HashMap::new();
    for _ in 0..n {
        *counts.entry(get(entries[0], &[]).await).or_default() += 1;
    }
    let to_v1 = counts.get("200 v1").copied().unwrap_or(0);
    assert_eq!(to_v1 + counts.get("200 v2").copied().unwrap_or(0), n, "{counts:?}");
    // 90 % of 1,000 is 900, σ ≈ 9.5: six σ either side.
    assert!((843..=957).contains(&to_v1), "{counts:?}");
    for _ in 0..50 {
        assert_eq!(
            get(entries[0], &[("End-User", "jason")]).await,
            "200 v2",
            "jason always sees v2"
        );
    }

    let mut counts: HashMap<String, usize> = HashMap::new();
    for _ in 0..n {
        *counts.entry(connect(entries[1]).await).or_default() += 1;
    }
    let to_v1 = counts.get("db-v1").copied().unwrap_or(0);
    assert_eq!(to_v1 + counts.get("db-v2").copied().unwrap_or(0), n, "{counts:?}");
    // 80 % of 1,000 is 800, σ ≈ 12.6: six σ either side.
    assert!((724..=876).contains(&to_v1), "{counts:?}");
    drop(controller);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_entry_endpoints_and_selected_workload_entries_are_reached_at_the_entries_vips() {
    let dir = scratch("sidecar-service-entries");
    let api = http_backend("127.0.0.6:0", "api").await;
    let vm = tcp_backend("127.0.0.7:0".parse().unwrap(), "vm").await;
    let c1 = dir.join("cluster1");
    std::fs::create_dir_all(&c1).unwrap();
    std::fs::write(
        c1.join("entries.yaml"),
        format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: default, labels: {{topology.istio.io/network: network1}}}}\n---\n\
             apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: api, namespace: default}}\n\
             spec: {{hosts: [api.example.com], addresses: [240.0.0.1], ports: [{{number: 80, name: http, protocol: HTTP}}],\n\
             \x20 resolution: STATIC, endpoints: [{{address: {api_ip}, ports: {{http: {api_port}}}}}]}}\n---\n\
             apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: vm, namespace: default}}\n\
             spec: {{hosts: [vm], addresses: [240.0.0.2], ports: [{{number: 9000, name: tcp, protocol: TCP}}],\n\
             \x20 resolution: STATIC, workloadSelector: {{labels: {{app: vm}}}}}}\n---\n\
             apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: vm-1, namespace: default}}\n\
             spec: {{address: {vm_ip}, ports: {{tcp: {vm_port}}}, labels: {{app: vm}}}}\n",
            api_ip = api.ip(),
            api_port = api.port(),
            vm_ip = vm.ip(),
            vm_port = vm.port(),
        ),
    )
    .unwrap();
    let controller = Controller::serve(&dir);
    let vips: Vec<SocketAddr> = ["240.0.0.1:80", "240.0.0.2:9000"]
        .iter()
        .map(|v| v.parse().unwrap())
        .collect();
    let (table, entries) = sidecar(controller.xds, &vips).await;
    until_true(
        "the sidecar has both entries' endpoints",
        Duration::from_secs(30),
        || {
            let t = table.load();
            let has = |c: &str| t.upstreams.get(c).is_some_and(|u| !u.endpoints.is_empty());
            t.routes.contains_key("api.example.com:80")
                && has("outbound|80||api.example.com")
                && has("outbound|9000||vm.default.svc.cluster.local")
        },
    )
    .await;
    for _ in 0..5 {
        let (mut s, mut text) = (TcpStream::connect(entries[0]).await.unwrap(), String::new());
        s.write_all(b"GET / HTTP/1.1\r\nHost: api.example.com\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut text))
            .await
            .expect("an answer in time")
            .unwrap();
        assert!(text.starts_with("HTTP/1.1 200") && text.ends_with("api"), "{text}");
        assert_eq!(connect(entries[1]).await, "vm");
    }
    drop(controller);
    std::fs::remove_dir_all(&dir).unwrap();
}
