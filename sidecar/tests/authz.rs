//! AuthorizationPolicy end to end: a real control plane (a tonic ADS server in the test)
//! serves the `virtualInbound` listener with Istio's RBAC filters, and real callers reach a
//! real sidecar through their own sidecars in mutual TLS — one of them from a federated
//! trust domain. What each caller gets back is what a user would see.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use envoy_types::pb::envoy::config::listener::v3::{Filter, FilterChain, FilterChainMatch, Listener, filter};
use envoy_types::pb::envoy::config::rbac::v3::rbac::Action;
use envoy_types::pb::envoy::config::rbac::v3::{Permission, Policy, Principal, Rbac, permission, principal};
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac as HttpRbac;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, http_filter,
};
use envoy_types::pb::envoy::extensions::filters::network::rbac::v3::Rbac as NetworkRbac;
use envoy_types::pb::envoy::r#type::matcher::v3::{PathMatcher, StringMatcher, path_matcher, string_matcher};
use envoy_types::pb::google::protobuf::{Any, value::Kind};
use prost::Message;
use sidecar::run::{RunArgs, Sidecar};
use sidecar::xds::LISTENER_TYPE;
use support::control_plane::ControlPlane;
use support::{Pki, exchange, metric_reaches, poll};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const FOREIGN: &str = "spiffe://cluster2.local/ns/default/sa/productpage";

fn args(line: &str) -> RunArgs {
    RunArgs::from_words(line.split_whitespace()).unwrap()
}

fn p(path: &Path) -> String {
    path.display().to_string()
}

/// An HTTP/1.1 application answering `ok PATH`, counting the requests that reach it.
async fn app() -> (SocketAddr, Arc<AtomicUsize>) {
    support::http_app(|req| format!("ok {}", req.uri().path())).await
}

// --- Istio's RBAC shapes, as istiod (and our controller) emit them ---

fn any_permission() -> Permission {
    Permission {
        rule: Some(permission::Rule::Any(true)),
    }
}

fn any_principal() -> Principal {
    Principal {
        identifier: Some(principal::Identifier::Any(true)),
    }
}

fn path_prefix(prefix: &str) -> Permission {
    Permission {
        rule: Some(permission::Rule::UrlPath(PathMatcher {
            rule: Some(path_matcher::Rule::Path(StringMatcher {
                ignore_case: false,
                match_pattern: Some(string_matcher::MatchPattern::Prefix(prefix.into())),
            })),
        })),
    }
}

fn spiffe_id(id: &str) -> Principal {
    Principal {
        identifier: Some(principal::Identifier::Authenticated(principal::Authenticated {
            principal_name: Some(StringMatcher {
                ignore_case: false,
                match_pattern: Some(string_matcher::MatchPattern::Exact(id.into())),
            }),
        })),
    }
}

fn rules(action: Action, policies: Vec<(&str, Permission, Principal)>) -> Rbac {
    Rbac {
        action: action as i32,
        policies: policies
            .into_iter()
            .map(|(name, permission, principal)| {
                let policy = Policy {
                    permissions: vec![permission],
                    principals: vec![principal],
                    ..Default::default()
                };
                (name.to_owned(), policy)
            })
            .collect(),
        ..Default::default()
    }
}

/// Istio's ALLOW for `principals: [cluster2.local/ns/default/sa/productpage]`.
fn allow_foreign() -> Rbac {
    rules(
        Action::Allow,
        vec![(
            "ns[default]-policy[from-cluster2]-rule[0]",
            any_permission(),
            spiffe_id(FOREIGN),
        )],
    )
}

fn typed(name: &str, type_url: &str, value: Vec<u8>) -> Filter {
    Filter {
        name: name.into(),
        config_type: Some(filter::ConfigType::TypedConfig(Any {
            type_url: type_url.into(),
            value,
        })),
    }
}

/// An HCM whose `http_filters` are these RBAC filters (then the router).
fn hcm(filters: &[Rbac]) -> Filter {
    let mut http_filters: Vec<HttpFilter> = filters
        .iter()
        .map(|r| HttpFilter {
            name: "envoy.filters.http.rbac".into(),
            config_type: Some(http_filter::ConfigType::TypedConfig(Any {
                type_url: "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC".into(),
                value: HttpRbac {
                    rules: Some(r.clone()),
                    ..Default::default()
                }
                .encode_to_vec(),
            })),
            ..Default::default()
        })
        .collect();
    http_filters.push(HttpFilter {
        name: "envoy.filters.http.router".into(),
        ..Default::default()
    });
    let hcm = HttpConnectionManager {
        stat_prefix: "inbound_0.0.0.0_9080".into(),
        http_filters,
        ..Default::default()
    };
    typed(
        "envoy.filters.network.http_connection_manager",
        "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        hcm.encode_to_vec(),
    )
}

fn network_rbac(r: Rbac) -> Filter {
    let rbac = NetworkRbac {
        rules: Some(r),
        stat_prefix: "tcp.".into(),
        ..Default::default()
    };
    typed(
        "envoy.filters.network.rbac",
        "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC",
        rbac.encode_to_vec(),
    )
}

/// `virtualInbound` with a `tls` chain and, when plaintext is allowed, a `raw_buffer` one,
/// both with `filters`.
fn virtual_inbound(plaintext: bool, filters: Vec<Filter>) -> Listener {
    let chain = |transport: &str| FilterChain {
        name: format!("virtualInbound-{transport}"),
        filter_chain_match: Some(FilterChainMatch {
            transport_protocol: transport.into(),
            ..Default::default()
        }),
        filters: filters.clone(),
        ..Default::default()
    };
    let mut chains = vec![chain("tls")];
    if plaintext {
        chains.push(chain("raw_buffer"));
    }
    Listener {
        name: "virtualInbound".into(),
        filter_chains: chains,
        ..Default::default()
    }
}

/// The mesh of the test: `reviews` behind its sidecar, following `control`; callers from our
/// trust domain and from a federated one (`cluster2.local`, its own CA).
struct Mesh {
    home: Pki,
    foreign: Pki,
    /// The control plane, and the last LDS version it served.
    control: tokio::sync::Mutex<(ControlPlane, u64)>,
    server: Sidecar,
}

impl Mesh {
    async fn start(name: &str, app: SocketAddr, protocol: &str) -> Mesh {
        let home = Pki::new("authz", &format!("{name}-home"));
        let foreign = Pki::new("authz", &format!("{name}-foreign"));
        let control = ControlPlane::start().await;
        let (sc, sk) = home.svid("cluster.local", "reviews");
        let server = Sidecar::start(args(&format!(
            "--inbound 127.0.0.1:0={app} --cert {} --key {} --ca {} --bundle cluster2.local={} \
             --protocol {protocol} --metrics 127.0.0.1:0 --xds {} --label app=reviews --label version=v1 \
             --locality us-east1/us-east1-b/rack7 --access-log {} --access-log-filter errors",
            p(&sc),
            p(&sk),
            p(&home.ca()),
            p(&foreign.ca()),
            control.address,
            p(&home.dir.join("access.log")),
        )))
        .unwrap();
        Mesh {
            home,
            foreign,
            control: tokio::sync::Mutex::new((control, 0)),
            server,
        }
    }

    /// The mesh with two callers: `productpage` of cluster2.local and `ratings` of ours.
    async fn with_callers(name: &str, app: SocketAddr, protocol: &str) -> (Mesh, Sidecar, Sidecar) {
        let mesh = Mesh::start(name, app, protocol).await;
        let foreign = mesh.caller(true, "productpage", protocol);
        let local = mesh.caller(false, "ratings", protocol);
        (mesh, foreign, local)
    }

    /// A caller's sidecar: `foreign` from cluster2.local, else from cluster.local.
    fn caller(&self, foreign: bool, sa: &str, protocol: &str) -> Sidecar {
        let (pki, td, other) = if foreign {
            (&self.foreign, "cluster2.local", &self.home)
        } else {
            (&self.home, "cluster.local", &self.foreign)
        };
        let (c, k) = pki.svid(td, sa);
        let other_td = if foreign { "cluster.local" } else { "cluster2.local" };
        Sidecar::start(args(&format!(
            "--outbound 127.0.0.1:0={} --peer-id spiffe://cluster.local/ns/default/sa/reviews --cert {} --key {} \
             --ca {} --bundle {other_td}={} --protocol {protocol}",
            self.server.bound.inbound.unwrap(),
            p(&c),
            p(&k),
            p(&pki.ca()),
            p(&other.ca()),
        )))
        .unwrap()
    }

    /// Serves `listener` as the next LDS version and waits until the sidecar ACKed it.
    async fn apply(&self, listener: Listener) {
        let mut control = self.control.lock().await;
        let (control, version) = &mut *control;
        *version += 1;
        control
            .push_acked(LISTENER_TYPE, &version.to_string(), &[listener])
            .await;
    }

    /// Serves `listener` as the next LDS version and returns the sidecar's NACK of it.
    async fn refused(&self, listener: Listener) -> String {
        let mut control = self.control.lock().await;
        let (control, version) = &mut *control;
        *version += 1;
        control.push(LISTENER_TYPE, &version.to_string(), &[listener]).await;
        let nack = control.request_where(LISTENER_TYPE, |r| r.error_detail.is_some());
        let nack = tokio::time::timeout(Duration::from_secs(10), nack)
            .await
            .expect("no NACK within 10 s");
        nack.error_detail.unwrap().message
    }

    fn metrics(&self) -> SocketAddr {
        self.server.bound.metrics.unwrap()
    }
}

async fn get(via: &Sidecar, path: &str) -> (u16, String) {
    let a = exchange(
        via.bound.outbound.unwrap(),
        &format!("GET {path} HTTP/1.1\r\nhost: reviews:9080"),
    )
    .await
    .unwrap();
    (a.status, a.body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_policies_decide_what_each_caller_gets() {
    let (app, hits) = app().await;
    let (mesh, foreign, local) = Mesh::with_callers("http", app, "http").await;

    // Without policy (flags: STRICT, no RBAC) everyone in the mesh gets through.
    assert_eq!(get(&local, "/").await.0, 200);

    // Istio's order: DENY /admin for anyone, then ALLOW the foreign principal only.
    let deny = rules(
        Action::Deny,
        vec![(
            "ns[default]-policy[no-admin]-rule[0]",
            path_prefix("/admin"),
            any_principal(),
        )],
    );
    let allow = allow_foreign();
    mesh.apply(virtual_inbound(false, vec![hcm(&[deny.clone(), allow.clone()])]))
        .await;

    assert_eq!(get(&foreign, "/reviews/1").await, (200, "ok /reviews/1".to_owned()));
    let before = hits.load(Ordering::SeqCst);
    assert_eq!(get(&local, "/reviews/1").await, (403, "RBAC: access denied".to_owned()));
    assert_eq!(
        get(&foreign, "/admin/users").await,
        (403, "RBAC: access denied".to_owned())
    );
    assert_eq!(
        hits.load(Ordering::SeqCst),
        before,
        "a denied request must not reach the application"
    );
    // No raw_buffer chain: plaintext is refused outright, whatever the RBAC.
    assert!(
        exchange(mesh.server.bound.inbound.unwrap(), "GET / HTTP/1.1\r\nhost: reviews")
            .await
            .is_err()
    );
    metric_reaches(mesh.metrics(), "envoy_http_rbac_denied", &[], 2.0).await;
    metric_reaches(mesh.metrics(), "envoy_http_rbac_allowed", &[], 1.0).await;
    metric_reaches(
        mesh.metrics(),
        "istio_requests_total",
        &[
            ("reporter", "destination"),
            ("response_code", "403"),
            ("source_principal", "spiffe://cluster.local/ns/default/sa/ratings"),
        ],
        1.0,
    )
    .await;

    // AUDIT (LOG): allowed, and counted as logged.
    let audit = rules(
        Action::Log,
        vec![(
            "ns[default]-policy[audit]-rule[0]",
            path_prefix("/audited"),
            any_principal(),
        )],
    );
    mesh.apply(virtual_inbound(true, vec![hcm(&[audit])])).await;
    assert_eq!(get(&local, "/audited").await.0, 200);
    metric_reaches(mesh.metrics(), "envoy_http_rbac_logged", &[], 1.0).await;
    // With a raw_buffer chain, a plaintext caller is taken (and has no principal).
    let plain = exchange(
        mesh.server.bound.inbound.unwrap(),
        "GET /plain HTTP/1.1\r\nhost: reviews",
    )
    .await
    .unwrap();
    assert_eq!((plain.status, plain.body.as_str()), (200, "ok /plain"));

    // Under `errors`, the access log has the denials and the audited request, and no other
    // success.
    // (A line is written when its response ends, which may be just after the caller read it.)
    poll(Duration::from_secs(10), || async {
        let log = std::fs::read_to_string(mesh.home.dir.join("access.log")).unwrap_or_default();
        let with = |s: &str| log.lines().filter(|l| l.contains(s)).count();
        let counts = [
            with(r#""GET /admin/users HTTP/2" 403 "#),
            with(r#""GET /reviews/1 HTTP/2" 403 "#),
            with(" 200 "),
            with(r#""GET /audited HTTP/2" 200 "#),
        ];
        match counts == [1, 1, 1, 1] {
            true => Ok(()),
            false => Err(format!("{counts:?} in {log}")),
        }
    })
    .await;

    // An ALLOW policy with no rules denies everything.
    mesh.apply(virtual_inbound(false, vec![hcm(&[rules(Action::Allow, vec![])])]))
        .await;
    assert_eq!(get(&foreign, "/").await.0, 403);
    assert_eq!(get(&local, "/").await.0, 403);

    // A policy the sidecar cannot enforce is refused; the last one keeps deciding.
    let mut bad = rules(Action::Allow, vec![]);
    bad.policies.insert(
        "ns[default]-policy[cel]-rule[0]".into(),
        Policy {
            permissions: vec![any_permission()],
            principals: vec![any_principal()],
            condition: Some(Default::default()),
            ..Default::default()
        },
    );
    let nack = mesh.refused(virtual_inbound(false, vec![hcm(&[bad])])).await;
    assert!(nack.contains("CEL"), "the NACK names CEL: {nack}");
    assert_eq!(get(&foreign, "/").await.0, 403);

    // The node told the controller what selects policies for it.
    let node = mesh.control.lock().await.0.last_node().unwrap();
    let labels = match &node.metadata.unwrap().fields["LABELS"].kind {
        Some(Kind::StructValue(s)) => s.fields.clone(),
        other => panic!("LABELS is {other:?}"),
    };
    assert!(matches!(&labels["app"].kind, Some(Kind::StringValue(v)) if v == "reviews"));
    assert!(matches!(&labels["version"].kind, Some(Kind::StringValue(v)) if v == "v1"));
    let locality = node.locality.unwrap();
    assert_eq!(
        (
            locality.region.as_str(),
            locality.zone.as_str(),
            locality.sub_zone.as_str()
        ),
        ("us-east1", "us-east1-b", "rack7")
    );
}

/// A TCP application that counts connections and echoes.
async fn tcp_app() -> (SocketAddr, Arc<AtomicUsize>) {
    support::accept_each(|mut s| async move {
        let (mut r, mut w) = s.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
    })
    .await
}

/// Writes `ping` through `via` and returns what came back before the connection closed.
async fn ping(via: &Sidecar) -> Vec<u8> {
    let mut s = TcpStream::connect(via.bound.outbound.unwrap()).await.unwrap();
    let _ = s.write_all(b"ping").await;
    let mut got = vec![0; 4];
    match tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut got)).await {
        Ok(Ok(_)) => got,
        Ok(Err(_)) => Vec::new(),
        Err(_) => panic!("the connection neither answered nor closed"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_tcp_connection_is_closed_at_once_and_counted() {
    let (app, accepted) = tcp_app().await;
    let (mesh, foreign, local) = Mesh::with_callers("tcp", app, "tcp").await;
    let allow = allow_foreign();
    mesh.apply(virtual_inbound(false, vec![network_rbac(allow)])).await;
    assert_eq!(ping(&foreign).await, b"ping");
    assert_eq!(
        ping(&local).await,
        b"",
        "a denied caller's connection must close without an answer"
    );
    metric_reaches(mesh.metrics(), "envoy_tcp_rbac_denied", &[], 1.0).await;
    metric_reaches(
        mesh.metrics(),
        "isthmus_sidecar_refused_connections_total",
        &[("reason", "rbac_access_denied")],
        1.0,
    )
    .await;
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "only the allowed caller reached the application"
    );

    // A port carried as TCP whose chain has only HTTP RBAC filters is checked once per
    // connection: an empty ALLOW shuts everyone out.
    mesh.apply(virtual_inbound(false, vec![hcm(&[rules(Action::Allow, vec![])])]))
        .await;
    assert_eq!(ping(&foreign).await, b"");
    metric_reaches(mesh.metrics(), "envoy_tcp_rbac_denied", &[], 2.0).await;
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
}
