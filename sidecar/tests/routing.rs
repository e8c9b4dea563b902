//! Istio's VirtualService behaviour through a real sidecar routing table: a mock control
//! plane (a real tonic ADS server fed from the test) serves listeners, routes, clusters and
//! endpoints to the sidecar's own xDS client, and captured connections to a service VIP —
//! handed to the captured path with their original destination, as capture would — reach
//! real HTTP servers on 127.0.0.1 as the routes say.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::endpoint::v3::{ClusterLoadAssignment, LocalityLbEndpoints};
use envoy_types::pb::envoy::config::listener::v3::{Filter, FilterChain, Listener, filter};
use envoy_types::pb::envoy::config::route::v3::route_action::{ClusterSpecifier, RequestMirrorPolicy};
use envoy_types::pb::envoy::config::route::v3::weighted_cluster::ClusterWeight;
use envoy_types::pb::envoy::config::route::v3::{
    HeaderMatcher, RetryPolicy, Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost, WeightedCluster,
    header_matcher, retry_policy, route, route_match,
};
use envoy_types::pb::envoy::extensions::filters::common::fault::v3::{FaultDelay, fault_delay};
use envoy_types::pb::envoy::extensions::filters::http::fault::v3::{FaultAbort, HttpFault, fault_abort};
use envoy_types::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher};
use envoy_types::pb::envoy::r#type::v3::FractionalPercent;
use envoy_types::pb::google::protobuf::{Any, UInt32Value};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use prost::Message;
use sidecar::destinations::Destinations;
use sidecar::outbound::{Captured, HttpHop};
use sidecar::tls::{Alpn, Svid, SvidSlot, TrustBundles};
use sidecar::xds::{CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE};
use support::control_plane::ControlPlane;
use support::{Pki, poll};
use tokio::net::TcpListener;

const HOST: &str = "reviews.default.svc.cluster.local";
const ROUTE_NAME: &str = "reviews.default.svc.cluster.local:9080";
const FAULT_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault";

/// The service's VIP: never bound, only ever an original destination.
fn vip() -> SocketAddr {
    "10.242.255.10:9080".parse().unwrap()
}

fn subset(name: &str) -> String {
    format!("outbound|9080|{name}|{HOST}")
}

/// Istio's outbound HTTP listener for the VIP.
fn http_listener() -> Listener {
    sidecar::synthetic::http_listener(vip(), ROUTE_NAME)
}

fn cluster(name: &str) -> Cluster {
    Cluster {
        name: name.into(),
        ..Default::default()
    }
}

fn assignment(name: &str, endpoints: &[SocketAddr]) -> ClusterLoadAssignment {
    sidecar::synthetic::assignment(name, endpoints.iter().copied())
}

fn prefix(p: &str) -> RouteMatch {
    RouteMatch {
        path_specifier: Some(route_match::PathSpecifier::Prefix(p.into())),
        ..Default::default()
    }
}

fn forward(r#match: RouteMatch, action: RouteAction) -> Route {
    Route {
        r#match: Some(r#match),
        action: Some(route::Action::Route(action)),
        ..Default::default()
    }
}

fn to(cluster: &str) -> RouteAction {
    RouteAction {
        cluster_specifier: Some(ClusterSpecifier::Cluster(cluster.into())),
        ..Default::default()
    }
}

fn routes(routes: Vec<Route>) -> RouteConfiguration {
    RouteConfiguration {
        name: ROUTE_NAME.into(),
        virtual_hosts: vec![VirtualHost {
            name: ROUTE_NAME.into(),
            domains: vec!["*".into()],
            routes,
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn percent(numerator: u32) -> Option<FractionalPercent> {
    Some(FractionalPercent {
        numerator,
        denominator: 0,
    })
}

/// What a backend does with each request.
#[derive(Clone, Copy)]
enum Behaviour {
    /// `200` with its name.
    Answer,
    /// `503`, as an overloaded or broken pod does.
    Fail,
    /// Never answers.
    Hang,
}

/// What a backend saw of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    host: String,
    path: String,
    /// `x-route`, which routes add.
    tag: Option<String>,
    /// Bytes of body.
    body: usize,
    /// `x-forwarded-client-cert`: who called, as a receiving sidecar says.
    xfcc: Option<String>,
}

/// An HTTP/1.1 server named `name`, counting its requests and keeping what they carried.
struct Backend {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

async fn backend(name: &'static str, behaviour: Behaviour) -> Backend {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (h, a) = (hits.clone(), seen.clone());
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let (h, a) = (h.clone(), a.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let (h, a) = (h.clone(), a.clone());
                    async move {
                        h.fetch_add(1, Ordering::Relaxed);
                        let header = |n: &str| req.headers().get(n).map(|v| v.to_str().unwrap().to_owned());
                        let (host, path, tag) = (
                            // HTTP/2 has `:authority` where HTTP/1.1 has `host`.
                            header("host")
                                .or_else(|| req.uri().authority().map(|a| a.to_string()))
                                .unwrap_or_default(),
                            req.uri().to_string(),
                            header("x-route"),
                        );
                        let xfcc = header("x-forwarded-client-cert");
                        let body = req.into_body().collect().await.map_or(0, |b| b.to_bytes().len());
                        a.lock().unwrap().push(Seen {
                            host,
                            path,
                            tag,
                            body,
                            xfcc,
                        });
                        let status = match behaviour {
                            Behaviour::Answer => 200,
                            Behaviour::Fail => 503,
                            Behaviour::Hang => std::future::pending().await,
                        };
                        let resp = hyper::Response::builder()
                            .status(status)
                            .body(Full::new(Bytes::from(name)))
                            .unwrap();
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
                // HTTP/1.1, or HTTP/2 in cleartext as a gRPC server takes it.
                let _ = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Backend { addr, hits, seen }
}

/// A sidecar's captured outbound path following the control plane, and an address whose
/// connections it takes as captured ones to the VIP.
struct Sidecar {
    table: Arc<ArcSwap<Destinations>>,
    telemetry: sidecar::telemetry::Telemetry,
    entry: SocketAddr,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Sidecar {
    async fn start(pki: &Pki, control: &ControlPlane) -> Sidecar {
        let (cert, key) = pki.svid("cluster.local", "productpage");
        let svid = Svid::from_files(&cert, &key).unwrap();
        let self_id = svid.id().clone();
        let svid = SvidSlot::new(svid);
        let telemetry = sidecar::telemetry::Telemetry::for_cluster("cluster1");
        let (trigger, watch) = sidecar::drain::channel();
        // The drain trigger lives as long as the test.
        std::mem::forget(trigger);
        // Generous: on a loaded CI machine a debug build's handshake can take a while, and a
        // timed-out one would count as a local-origin failure and eject a healthy endpoint.
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
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let entry = listener.local_addr().unwrap();
        let bundles = TrustBundles::new();
        let roots = std::fs::read(pki.ca()).unwrap();
        bundles.set(
            "cluster.local",
            sidecar::tls::bundle::Bundle::from_pem("cluster.local", &roots).unwrap(),
        );
        let captured = Arc::new(Captured::new(
            table.clone(),
            svid,
            bundles,
            Alpn::Tcp,
            None,
            entry,
            self_id.clone(),
            Duration::from_secs(2),
            Duration::from_secs(2),
            telemetry.clone(),
            watch,
            hop,
            false,
        ));
        let identity = sidecar::xds::Identity {
            id: self_id,
            ip: "127.0.0.1".parse().unwrap(),
            network: "network1".into(),
            cluster: "cluster1".into(),
            labels: vec![],
            locality: None,
        };
        tokio::spawn(sidecar::xds::follow(
            control.address.clone(),
            identity,
            table.clone(),
            None,
            |_, _| {},
        ));
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                tokio::spawn(captured.clone().carry_to(stream, vip()));
            }
        });
        Sidecar {
            table,
            telemetry,
            entry,
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// One GET through the sidecar: status, body and response headers.
    async fn get(&self, path: &str, headers: &[(&str, &str)]) -> (u16, String, hyper::HeaderMap) {
        self.request("GET", path, headers).await
    }

    /// One request through the sidecar: status, body and response headers.
    async fn request(&self, method: &str, path: &str, headers: &[(&str, &str)]) -> (u16, String, hyper::HeaderMap) {
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.entry))
            .header("host", "reviews:9080");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = self
            .client
            .request(req.body(Full::new(Bytes::new())).unwrap())
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned(), headers)
    }

    /// The control plane serves `config` for `clusters` (name → backends), in xDS order;
    /// returns once this sidecar's table has the routes and every cluster's endpoints.
    async fn serve(
        &self,
        control: &mut ControlPlane,
        config: RouteConfiguration,
        clusters: &[(Cluster, Vec<SocketAddr>)],
    ) {
        control.push(LISTENER_TYPE, "1", &[http_listener()]).await;
        control.push(ROUTE_TYPE, "1", &[config]).await;
        let cds: Vec<Cluster> = clusters.iter().map(|(c, _)| c.clone()).collect();
        control.push(CLUSTER_TYPE, "1", &cds).await;
        let eds: Vec<ClusterLoadAssignment> = clusters.iter().map(|(c, eps)| assignment(&c.name, eps)).collect();
        control.push(ENDPOINT_TYPE, "1", &eds).await;
        poll(Duration::from_secs(10), || async {
            let t = self.table.load();
            let ready = t.routes.contains_key(ROUTE_NAME)
                && clusters
                    .iter()
                    .all(|(c, _)| t.upstreams.get(&c.name).is_some_and(|u| !u.endpoints.is_empty()));
            if ready {
                Ok(())
            } else {
                Err(format!("table not ready: {:?}", t.routes.keys()))
            }
        })
        .await
    }
}

async fn setup(name: &str) -> (Pki, ControlPlane, Sidecar) {
    let pki = Pki::new("routing", name);
    let control = ControlPlane::start().await;
    let sidecar = Sidecar::start(&pki, &control).await;
    (pki, control, sidecar)
}

/// Counts of each answer's body over `n` requests.
async fn spread(sidecar: &Sidecar, n: usize, headers: &[(&str, &str)]) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for _ in 0..n {
        let (status, body, _) = sidecar.get("/reviews/1", headers).await;
        *counts.entry(format!("{status} {body}")).or_default() += 1;
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sidecar_subscribes_to_the_routes_its_listeners_name_and_nacks_a_bad_one() {
    let (_pki, mut control, sidecar) = setup("rds").await;
    let v1 = backend("v1", Behaviour::Answer).await;
    control.push(LISTENER_TYPE, "1", &[http_listener()]).await;
    let rds = control
        .request_where(ROUTE_TYPE, |r| !r.resource_names.is_empty())
        .await;
    assert_eq!(rds.resource_names, [ROUTE_NAME]);
    let bad = routes(vec![Route {
        r#match: Some(RouteMatch {
            path_specifier: Some(route_match::PathSpecifier::SafeRegex(
                envoy_types::pb::envoy::r#type::matcher::v3::RegexMatcher {
                    regex: "(".into(),
                    ..Default::default()
                },
            )),
            ..Default::default()
        }),
        action: Some(route::Action::Route(to(&subset("v1")))),
        ..Default::default()
    }]);
    control.push(ROUTE_TYPE, "2", &[bad]).await;
    let nack = control.request_where(ROUTE_TYPE, |r| r.error_detail.is_some()).await;
    assert!(nack.error_detail.unwrap().message.contains(ROUTE_NAME));
    assert_eq!(nack.resource_names, [ROUTE_NAME]);
    // No route configuration yet: Envoy's 404 for a request no route takes.
    assert_eq!(sidecar.get("/", &[]).await.0, 404);

    sidecar
        .serve(
            &mut control,
            routes(vec![forward(prefix("/"), to(&subset("v1")))]),
            &[(cluster(&subset("v1")), vec![v1.addr])],
        )
        .await;
    let ack = control
        .request_where(ROUTE_TYPE, |r| r.version_info == "1" && r.error_detail.is_none())
        .await;
    assert_eq!(ack.resource_names, [ROUTE_NAME]);
    assert_eq!(sidecar.get("/", &[]).await.1, "v1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_subsets_split_90_10_and_a_header_match_picks_the_b_side() {
    let (_pki, mut control, sidecar) = setup("weights").await;
    let (v1, v2) = (
        backend("v1", Behaviour::Answer).await,
        backend("v2", Behaviour::Answer).await,
    );
    let jason = HeaderMatcher {
        name: "end-user".into(),
        header_match_specifier: Some(header_matcher::HeaderMatchSpecifier::StringMatch(StringMatcher {
            match_pattern: Some(string_matcher::MatchPattern::Exact("jason".into())),
            ignore_case: false,
        })),
        ..Default::default()
    };
    let split = RouteAction {
        cluster_specifier: Some(ClusterSpecifier::WeightedClusters(WeightedCluster {
            clusters: [("v1", 90), ("v2", 10)]
                .iter()
                .map(|(n, w)| ClusterWeight {
                    name: subset(n),
                    weight: Some(UInt32Value { value: *w }),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })),
        ..Default::default()
    };
    let config = routes(vec![
        forward(
            RouteMatch {
                headers: vec![jason],
                ..prefix("/")
            },
            to(&subset("v2")),
        ),
        forward(prefix("/"), split),
    ]);
    sidecar
        .serve(
            &mut control,
            config,
            &[
                (cluster(&subset("v1")), vec![v1.addr]),
                (cluster(&subset("v2")), vec![v2.addr]),
            ],
        )
        .await;

    let n = 1_000;
    let counts = spread(&sidecar, n, &[]).await;
    let to_v1 = counts.get("200 v1").copied().unwrap_or(0);
    assert_eq!(to_v1 + counts.get("200 v2").copied().unwrap_or(0), n, "{counts:?}");
    // 90% of 1 000 is 900, σ ≈ 9.5: six σ either side.
    assert!((843..=957).contains(&to_v1), "{counts:?}");

    let ab = spread(&sidecar, 50, &[("end-user", "jason")]).await;
    assert_eq!(ab, HashMap::from([("200 v2".to_owned(), 50)]), "jason always sees v2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_abort_their_share_and_delay_by_their_fixed_time() {
    let (_pki, mut control, sidecar) = setup("faults").await;
    let v1 = backend("v1", Behaviour::Answer).await;
    let fault = |f: HttpFault| {
        HashMap::from([(
            "envoy.filters.http.fault".to_owned(),
            Any {
                type_url: FAULT_TYPE.into(),
                value: f.encode_to_vec(),
            },
        )])
    };
    let abort = HttpFault {
        abort: Some(FaultAbort {
            percentage: percent(30),
            error_type: Some(fault_abort::ErrorType::HttpStatus(503)),
            ..Default::default()
        }),
        ..Default::default()
    };
    let delay = HttpFault {
        delay: Some(FaultDelay {
            percentage: percent(100),
            fault_delay_secifier: Some(fault_delay::FaultDelaySecifier::FixedDelay(
                envoy_types::pb::google::protobuf::Duration {
                    seconds: 0,
                    nanos: 300_000_000,
                },
            )),
        }),
        ..Default::default()
    };
    let config = routes(vec![
        Route {
            typed_per_filter_config: fault(delay),
            ..forward(prefix("/slow"), to(&subset("v1")))
        },
        Route {
            typed_per_filter_config: fault(abort),
            ..forward(prefix("/"), to(&subset("v1")))
        },
    ]);
    sidecar
        .serve(&mut control, config, &[(cluster(&subset("v1")), vec![v1.addr])])
        .await;

    let n = 600;
    let counts = spread(&sidecar, n, &[]).await;
    let aborted = counts.get("503 fault filter abort").copied().unwrap_or(0);
    assert_eq!(aborted + counts.get("200 v1").copied().unwrap_or(0), n, "{counts:?}");
    // 30% of 600 is 180, σ ≈ 11.2: six σ either side.
    assert!((113..=247).contains(&aborted), "{counts:?}");
    assert_eq!(
        v1.hits.load(Ordering::Relaxed),
        n - aborted,
        "an aborted request never leaves"
    );
    // Aborts are counted as the upstream's answers are, by their code.
    let metrics = sidecar.telemetry.render();
    let aborts = metrics
        .lines()
        .find(|l| {
            l.starts_with("istio_requests_total")
                && l.contains(r#"response_code="503""#)
                && l.contains(&format!(r#"destination_service="{HOST}""#))
        })
        .unwrap_or_else(|| panic!("{metrics}"));
    assert!(aborts.ends_with(&format!(" {aborted}")), "{aborts}");

    let started = tokio::time::Instant::now();
    let (status, body, _) = sidecar.get("/slow", &[]).await;
    assert_eq!((status, body.as_str()), (200, "v1"));
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_turn_a_failing_endpoint_into_no_client_errors_and_a_timeout_is_a_504() {
    let (_pki, mut control, sidecar) = setup("retries").await;
    let (broken, healthy) = (
        backend("broken", Behaviour::Fail).await,
        backend("v1", Behaviour::Answer).await,
    );
    let stuck = backend("stuck", Behaviour::Hang).await;
    // Istio's default retry policy.
    let istio_default = RetryPolicy {
        retry_on: "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes".into(),
        num_retries: Some(UInt32Value { value: 2 }),
        retriable_status_codes: vec![503],
        retry_host_predicate: previous_hosts(),
        ..Default::default()
    };
    let config = routes(vec![
        forward(
            prefix("/stuck"),
            RouteAction {
                timeout: Some(envoy_types::pb::google::protobuf::Duration {
                    seconds: 0,
                    nanos: 200_000_000,
                }),
                ..to(&subset("stuck"))
            },
        ),
        forward(
            prefix("/"),
            RouteAction {
                retry_policy: Some(istio_default),
                ..to(&subset("v1"))
            },
        ),
    ]);
    sidecar
        .serve(
            &mut control,
            config,
            &[
                (cluster(&subset("v1")), vec![broken.addr, healthy.addr]),
                (cluster(&subset("stuck")), vec![stuck.addr]),
            ],
        )
        .await;

    let n = 100;
    let counts = spread(&sidecar, n, &[]).await;
    assert_eq!(counts, HashMap::from([("200 v1".to_owned(), n)]));
    assert!(broken.hits.load(Ordering::Relaxed) > 0, "the broken endpoint was tried");
    assert_eq!(healthy.hits.load(Ordering::Relaxed), n);

    let (status, body, _) = sidecar.get("/stuck", &[]).await;
    assert_eq!((status, body.as_str()), (504, "upstream request timeout"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_receives_copies_with_a_shadow_authority() {
    let (_pki, mut control, sidecar) = setup("mirror").await;
    let (v1, shadow) = (
        backend("v1", Behaviour::Answer).await,
        backend("shadow", Behaviour::Fail).await,
    );
    let config = routes(vec![forward(
        prefix("/"),
        RouteAction {
            request_mirror_policies: vec![RequestMirrorPolicy {
                cluster: subset("v2"),
                runtime_fraction: Some(envoy_types::pb::envoy::config::core::v3::RuntimeFractionalPercent {
                    default_value: percent(100),
                    runtime_key: String::new(),
                }),
                ..Default::default()
            }],
            ..to(&subset("v1"))
        },
    )]);
    sidecar
        .serve(
            &mut control,
            config,
            &[
                (cluster(&subset("v1")), vec![v1.addr]),
                (cluster(&subset("v2")), vec![shadow.addr]),
            ],
        )
        .await;

    let n = 20;
    // The shadow answers 503; the caller never sees it.
    assert_eq!(
        spread(&sidecar, n, &[]).await,
        HashMap::from([("200 v1".to_owned(), n)])
    );
    poll(Duration::from_secs(5), || async {
        match shadow.hits.load(Ordering::Relaxed) {
            h if h == n => Ok(()),
            h => Err(format!("{h} copies of {n}")),
        }
    })
    .await;
    let copies = shadow.seen.lock().unwrap().clone();
    assert!(copies.iter().all(|s| s.host == "reviews-shadow:9080"), "{copies:?}");
    assert!(v1.seen.lock().unwrap().iter().all(|s| s.host == "reviews:9080"));
}

/// A sidecar whose one endpoint always answers 503, behind a route retrying 5xx twice.
async fn failing_behind_retries(name: &str) -> (Pki, ControlPlane, Sidecar, Backend) {
    let (pki, mut control, sidecar) = setup(name).await;
    let broken = backend("broken", Behaviour::Fail).await;
    let retry = RetryPolicy {
        retry_on: "5xx".into(),
        num_retries: Some(UInt32Value { value: 2 }),
        ..Default::default()
    };
    let config = routes(vec![forward(
        prefix("/"),
        RouteAction {
            retry_policy: Some(retry),
            ..to(&subset("v1"))
        },
    )]);
    sidecar
        .serve(&mut control, config, &[(cluster(&subset("v1")), vec![broken.addr])])
        .await;
    (pki, control, sidecar, broken)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_that_reached_the_upstream_is_never_sent_twice() {
    let (_pki, _control, sidecar, broken) = failing_behind_retries("idempotent").await;
    assert_eq!(sidecar.get("/", &[]).await.0, 503);
    assert_eq!(
        broken.hits.load(Ordering::Relaxed),
        3,
        "a GET: the first attempt and two retries"
    );
    assert_eq!(sidecar.request("POST", "/", &[]).await.0, 503);
    assert_eq!(broken.hits.load(Ordering::Relaxed), 4, "a POST went out once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewrites_redirects_direct_answers_and_headers_are_as_the_routes_say() {
    use envoy_types::pb::envoy::config::core::v3::{DataSource, HeaderValue, HeaderValueOption, data_source};
    use envoy_types::pb::envoy::config::route::v3::redirect_action::PathRewriteSpecifier;
    use envoy_types::pb::envoy::config::route::v3::route_action::HostRewriteSpecifier;
    use envoy_types::pb::envoy::config::route::v3::{DirectResponseAction, RedirectAction};
    let (_pki, mut control, sidecar) = setup("actions").await;
    let v1 = backend("v1", Behaviour::Answer).await;
    let set = |k: &str, v: &str| HeaderValueOption {
        header: Some(HeaderValue {
            key: k.into(),
            value: v.into(),
            ..Default::default()
        }),
        append_action: 2,
        ..Default::default()
    };
    let config = routes(vec![
        Route {
            r#match: Some(prefix("/old")),
            action: Some(route::Action::Redirect(RedirectAction {
                path_rewrite_specifier: Some(PathRewriteSpecifier::PathRedirect("/new".into())),
                ..Default::default()
            })),
            ..Default::default()
        },
        Route {
            r#match: Some(prefix("/teapot")),
            action: Some(route::Action::DirectResponse(DirectResponseAction {
                status: 418,
                body: Some(DataSource {
                    specifier: Some(data_source::Specifier::InlineString("short and stout".into())),
                    ..Default::default()
                }),
                body_format: None,
            })),
            ..Default::default()
        },
        Route {
            request_headers_to_add: vec![set("x-route", "api")],
            response_headers_to_add: vec![set("x-served", "routed")],
            ..forward(
                prefix("/api/v1"),
                RouteAction {
                    prefix_rewrite: "/v2".into(),
                    host_rewrite_specifier: Some(HostRewriteSpecifier::HostRewriteLiteral("ratings:9080".into())),
                    ..to(&subset("v1"))
                },
            )
        },
    ]);
    sidecar
        .serve(&mut control, config, &[(cluster(&subset("v1")), vec![v1.addr])])
        .await;

    let (status, _, headers) = sidecar.get("/old/page?x=1", &[]).await;
    assert_eq!(status, 301);
    assert_eq!(headers["location"], "http://reviews:9080/new?x=1");
    let (status, body, _) = sidecar.get("/teapot", &[]).await;
    assert_eq!((status, body.as_str()), (418, "short and stout"));
    let (status, body, headers) = sidecar.get("/api/v1/users?id=7", &[]).await;
    assert_eq!((status, body.as_str()), (200, "v1"));
    assert_eq!(headers["x-served"], "routed");
    let seen = v1.seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        [Seen {
            host: "ratings:9080".into(),
            path: "/v2/users?id=7".into(),
            tag: Some("api".into()),
            body: 0,
            xfcc: None,
        }]
    );
    assert_eq!(sidecar.get("/elsewhere", &[]).await.0, 404, "no route: Envoy's 404");
    assert_eq!(
        v1.hits.load(Ordering::Relaxed),
        1,
        "only the forwarded request left the sidecar"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_that_is_not_there_answers_the_routes_cluster_not_found_response_code() {
    use envoy_types::pb::envoy::config::route::v3::route_action::ClusterNotFoundResponseCode as Code;
    let (_pki, mut control, sidecar) = setup("cluster-not-found").await;
    let v1 = backend("v1", Behaviour::Answer).await;
    let missing = "outbound|9080||gone.default.backend-not-found.invalid";
    let with_code = |path: &str, code: Code, action: RouteAction| {
        forward(
            prefix(path),
            RouteAction {
                cluster_not_found_response_code: code as i32,
                ..action
            },
        )
    };
    let half = RouteAction {
        cluster_specifier: Some(ClusterSpecifier::WeightedClusters(WeightedCluster {
            clusters: [(subset("v1"), 50), (missing.to_owned(), 50)]
                .into_iter()
                .map(|(name, weight)| ClusterWeight {
                    name,
                    weight: Some(UInt32Value { value: weight }),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })),
        ..Default::default()
    };
    let config = routes(vec![
        with_code("/500", Code::InternalServerError, to(missing)),
        with_code("/404", Code::NotFound, to(missing)),
        with_code("/503", Code::ServiceUnavailable, to(missing)),
        with_code("/half", Code::InternalServerError, half),
    ]);
    sidecar
        .serve(&mut control, config, &[(cluster(&subset("v1")), vec![v1.addr])])
        .await;

    for (path, want) in [("/500", 500), ("/404", 404), ("/503", 503)] {
        let (status, body, _) = sidecar.get(path, &[]).await;
        assert_eq!((status, body.as_str()), (want, ""), "{path}");
    }
    let mut counts: HashMap<u16, usize> = HashMap::new();
    let n = 400;
    for _ in 0..n {
        *counts.entry(sidecar.get("/half", &[]).await.0).or_default() += 1;
    }
    let (ok, failed) = (counts.get(&200).copied(), counts.get(&500).copied().unwrap_or(0));
    assert_eq!(ok.unwrap_or(0) + failed, n, "{counts:?}");
    // Half of 400 is 200, σ = 10: six σ either side.
    assert!((140..=260).contains(&failed), "{counts:?}");
    assert_eq!(v1.hits.load(Ordering::Relaxed), n - failed, "the found half reached v1");
    let metrics = sidecar.telemetry.render();
    let counted = support::sum_of(&metrics, "istio_requests_total", &[("response_code", "500")]);
    assert_eq!(counted as usize, failed + 1, "{metrics}");
}

/// Istio's `consecutiveGatewayErrors: N` with `maxEjectionPercent: 50`.
fn gateway_errors(n: u32) -> envoy_types::pb::envoy::config::cluster::v3::OutlierDetection {
    envoy_types::pb::envoy::config::cluster::v3::OutlierDetection {
        consecutive_5xx: Some(UInt32Value { value: 0 }),
        enforcing_consecutive_5xx: Some(UInt32Value { value: 0 }),
        consecutive_gateway_failure: Some(UInt32Value { value: n }),
        enforcing_consecutive_gateway_failure: Some(UInt32Value { value: 100 }),
        max_ejection_percent: Some(UInt32Value { value: 50 }),
        ..Default::default()
    }
}

/// Envoy's `previous_hosts` retry predicate: a retry goes to another endpoint.
fn previous_hosts() -> Vec<retry_policy::RetryHostPredicate> {
    vec![retry_policy::RetryHostPredicate {
        name: "envoy.retry_host_predicates.previous_hosts".into(),
        config_type: None,
    }]
}

/// A `bad` endpoint and a healthy `v1` one behind cluster v1, which ejects an endpoint
/// after two consecutive gateway errors, routed by `config`.
async fn beside_a_healthy_endpoint(
    sidecar: &Sidecar,
    control: &mut ControlPlane,
    bad: Backend,
    config: RouteConfiguration,
) -> (Backend, Backend) {
    let healthy = backend("v1", Behaviour::Answer).await;
    let c = Cluster {
        outlier_detection: Some(gateway_errors(2)),
        ..cluster(&subset("v1"))
    };
    sidecar
        .serve(control, config, &[(c, vec![bad.addr, healthy.addr])])
        .await;
    (bad, healthy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consecutive_gateway_errors_eject_an_endpoint() {
    let (_pki, mut control, sidecar) = setup("outlier").await;
    // No retries: only ejection keeps errors away.
    let config = routes(vec![forward(prefix("/"), to(&subset("v1")))]);
    let broken = backend("broken", Behaviour::Fail).await;
    beside_a_healthy_endpoint(&sidecar, &mut control, broken, config).await;
    let counts = spread(&sidecar, 40, &[]).await;
    assert_eq!(counts.get("503 broken"), Some(&2), "{counts:?}");
    assert_eq!(counts.get("200 v1"), Some(&38), "{counts:?}");
}

/// An endpoint that takes requests and never answers (a black-holed link) costs one
/// per-try timeout per request only until outlier detection hears of those timeouts and
/// ejects it; the retry after each goes to the other endpoint (`previous_hosts`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_try_timeouts_count_against_the_endpoint_and_the_retry_goes_elsewhere() {
    let (_pki, mut control, sidecar) = setup("per-try").await;
    let retry = RetryPolicy {
        retry_on: "gateway-error".into(),
        num_retries: Some(UInt32Value { value: 2 }),
        per_try_timeout: Some(envoy_types::pb::google::protobuf::Duration {
            seconds: 0,
            nanos: 100_000_000,
        }),
        retry_host_predicate: previous_hosts(),
        ..Default::default()
    };
    let config = routes(vec![forward(
        prefix("/"),
        RouteAction {
            retry_policy: Some(retry),
            ..to(&subset("v1"))
        },
    )]);
    let stuck = backend("stuck", Behaviour::Hang).await;
    let (stuck, _healthy) = beside_a_healthy_endpoint(&sidecar, &mut control, stuck, config).await;
    let n = 20;
    assert_eq!(
        spread(&sidecar, n, &[]).await,
        HashMap::from([("200 v1".to_owned(), n)]),
        "every request answered, by the endpoint that answers"
    );
    assert_eq!(
        stuck.hits.load(Ordering::Relaxed),
        2,
        "two timed-out attempts eject the hanging endpoint (round robin alone would send it every other request)"
    );
}

/// A circuit breaker whose first thresholds are `thresholds`.
fn breaker(
    thresholds: envoy_types::pb::envoy::config::cluster::v3::circuit_breakers::Thresholds,
) -> Option<envoy_types::pb::envoy::config::cluster::v3::CircuitBreakers> {
    Some(envoy_types::pb::envoy::config::cluster::v3::CircuitBreakers {
        thresholds: vec![thresholds],
        ..Default::default()
    })
}

/// The overflow answer Envoy gives, and that it was counted under `reason`.
fn assert_overflowed(sidecar: &Sidecar, (status, body, headers): (u16, String, hyper::HeaderMap), reason: &str) {
    assert_eq!(status, 503);
    assert_eq!(
        body,
        "upstream connect error or disconnect/reset before headers. reset reason: overflow"
    );
    assert_eq!(headers["x-envoy-overloaded"], "true");
    let metrics = sidecar.telemetry.render();
    assert!(
        metrics
            .lines()
            .any(|l| l.contains(&format!(r#"reason="{reason}""#)) && l.ends_with(" 1")),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_beyond_max_requests_are_turned_away_and_counted() {
    use envoy_types::pb::envoy::config::cluster::v3::circuit_breakers::Thresholds;
    let (_pki, mut control, sidecar) = setup("breaker").await;
    let stuck = backend("stuck", Behaviour::Hang).await;
    let c = Cluster {
        circuit_breakers: breaker(Thresholds {
            max_requests: Some(UInt32Value { value: 1 }),
            ..Default::default()
        }),
        ..cluster(&subset("v1"))
    };
    let config = routes(vec![forward(prefix("/"), to(&subset("v1")))]);
    sidecar.serve(&mut control, config, &[(c, vec![stuck.addr])]).await;
    let sidecar = Arc::new(sidecar);
    let first = {
        let sidecar = sidecar.clone();
        tokio::spawn(async move { sidecar.get("/", &[]).await })
    };
    poll(Duration::from_secs(5), || async {
        match stuck.hits.load(Ordering::Relaxed) {
            1 => Ok(()),
            h => Err(format!("{h} requests in flight")),
        }
    })
    .await;
    assert_overflowed(&sidecar, sidecar.get("/", &[]).await, "upstream_rq_pending_overflow");
    assert_eq!(stuck.hits.load(Ordering::Relaxed), 1, "the overflow never left");
    first.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_waiting_for_a_connection_beyond_max_pending_requests_are_turned_away() {
    use envoy_types::pb::envoy::config::cluster::v3::circuit_breakers::Thresholds;
    let (_pki, mut control, sidecar) = setup("pending").await;
    // A mesh endpoint that takes the connection and never says a word of TLS: requests to
    // it wait for their connection.
    let (silent, accepted) = support::accept_each(|s| async move {
        let _held = s;
        std::future::pending::<()>().await
    })
    .await;
    let c = Cluster {
        circuit_breakers: breaker(Thresholds {
            max_pending_requests: Some(UInt32Value { value: 1 }),
            ..Default::default()
        }),
        ..mtls_cluster(&subset("v1"), &format!("outbound_.9080_.v1_.{HOST}"))
    };
    let config = routes(vec![forward(prefix("/"), to(&subset("v1")))]);
    sidecar.serve(&mut control, config, &[(c, vec![silent])]).await;
    let sidecar = Arc::new(sidecar);
    let first = {
        let sidecar = sidecar.clone();
        tokio::spawn(async move { sidecar.get("/", &[]).await })
    };
    poll(Duration::from_secs(5), || async {
        match accepted.load(Ordering::SeqCst) {
            1 => Ok(()),
            n => Err(format!("{n} connections")),
        }
    })
    .await;
    assert_overflowed(&sidecar, sidecar.get("/", &[]).await, "upstream_rq_pending_overflow");
    assert_eq!(accepted.load(Ordering::SeqCst), 1, "the overflow never left");
    first.abort();
}

/// Istio's outbound TCP listener for the VIP: a `tcp_proxy` to `cluster`.
fn tcp_listener(cluster: &str) -> Listener {
    use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{TcpProxy, tcp_proxy};
    let proxy = TcpProxy {
        stat_prefix: cluster.into(),
        cluster_specifier: Some(tcp_proxy::ClusterSpecifier::Cluster(cluster.into())),
        ..Default::default()
    };
    Listener {
        filter_chains: vec![FilterChain {
            filters: vec![Filter {
                name: "envoy.filters.network.tcp_proxy".into(),
                config_type: Some(filter::ConfigType::TypedConfig(Any {
                    type_url: "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy".into(),
                    value: proxy.encode_to_vec(),
                })),
            }],
            ..Default::default()
        }],
        ..http_listener()
    }
}

/// Writes `ping` on `s` and reads what comes back until four bytes or the end.
async fn ping(s: &mut tokio::net::TcpStream) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = s.write_all(b"ping").await;
    let mut got = Vec::new();
    let mut four = (&mut *s).take(4);
    tokio::time::timeout(Duration::from_secs(10), four.read_to_end(&mut got))
        .await
        .expect("neither answered nor closed")
        .ok();
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_connections_beyond_max_connections_wait_for_one_to_close_and_pending_ones_are_bounded() {
    use envoy_types::pb::envoy::config::cluster::v3::circuit_breakers::Thresholds;
    let (_pki, mut control, sidecar) = setup("max-connections").await;
    let (echo, accepted) = support::accept_each(|mut s| async move {
        let (mut r, mut w) = s.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
    })
    .await;
    let name = subset("v1");
    let c = Cluster {
        circuit_breakers: breaker(Thresholds {
            max_connections: Some(UInt32Value { value: 1 }),
            max_pending_requests: Some(UInt32Value { value: 1 }),
            ..Default::default()
        }),
        ..cluster(&name)
    };
    control.push(LISTENER_TYPE, "1", &[tcp_listener(&name)]).await;
    control.push(CLUSTER_TYPE, "1", &[c]).await;
    control.push(ENDPOINT_TYPE, "1", &[assignment(&name, &[echo])]).await;
    let table = sidecar.table.clone();
    poll(Duration::from_secs(10), || async {
        match table.load().route(vip()) {
            Some(up) if !up.endpoints.is_empty() => Ok(()),
            _ => Err("no route to the VIP yet".to_owned()),
        }
    })
    .await;

    let mut first = tokio::net::TcpStream::connect(sidecar.entry).await.unwrap();
    assert_eq!(ping(&mut first).await, b"ping");
    // The second waits for a connection slot (Envoy's pending request)…
    let second = tokio::spawn({
        let entry = sidecar.entry;
        async move {
            let mut s = tokio::net::TcpStream::connect(entry).await.unwrap();
            ping(&mut s).await
        }
    });
    let overflows = |reason: &str| {
        let metrics = sidecar.telemetry.render();
        let counted = metrics
            .lines()
            .any(|l| l.contains(&format!(r#"reason="{reason}""#)) && l.ends_with(" 1"));
        match counted {
            true => Ok(()),
            false => Err(format!("{reason} not counted once:\n{metrics}")),
        }
    };
    poll(Duration::from_secs(5), || async { overflows("upstream_cx_overflow") }).await;
    // …so a third finds the one pending place taken and is closed at once.
    let mut third = tokio::net::TcpStream::connect(sidecar.entry).await.unwrap();
    assert_eq!(ping(&mut third).await, b"", "closed without reaching the upstream");
    overflows("upstream_rq_pending_overflow").unwrap();
    assert_eq!(accepted.load(Ordering::SeqCst), 1, "one connection upstream at a time");
    drop(first);
    assert_eq!(
        second.await.unwrap(),
        b"ping",
        "the waiting one goes through once the first closed"
    );
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consistent_hash_keeps_each_user_on_one_endpoint() {
    use envoy_types::pb::envoy::config::cluster::v3::cluster::LbPolicy;
    use envoy_types::pb::envoy::config::route::v3::route_action::HashPolicy;
    use envoy_types::pb::envoy::config::route::v3::route_action::hash_policy::{Header, PolicySpecifier};
    let (_pki, mut control, sidecar) = setup("hash").await;
    let backends = [
        backend("a", Behaviour::Answer).await,
        backend("b", Behaviour::Answer).await,
        backend("c", Behaviour::Answer).await,
    ];
    let c = Cluster {
        lb_policy: LbPolicy::RingHash as i32,
        ..cluster(&subset("v1"))
    };
    let by_user = HashPolicy {
        terminal: false,
        policy_specifier: Some(PolicySpecifier::Header(Header {
            header_name: "x-user".into(),
            regex_rewrite: None,
        })),
    };
    let config = routes(vec![forward(
        prefix("/"),
        RouteAction {
            hash_policy: vec![by_user],
            ..to(&subset("v1"))
        },
    )]);
    let addrs = backends.iter().map(|b| b.addr).collect();
    sidecar.serve(&mut control, config, &[(c, addrs)]).await;
    let mut served_by = HashMap::new();
    for user in 0..30 {
        let name = format!("user-{user}");
        let seen = spread(&sidecar, 5, &[("x-user", &name)]).await;
        assert_eq!(seen.len(), 1, "{name} moved between endpoints: {seen:?}");
        *served_by.entry(seen.into_keys().next().unwrap()).or_insert(0) += 1;
    }
    assert!(served_by.len() > 1, "30 users all on one endpoint: {served_by:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priority_zero_takes_everything_until_it_is_ejected_then_the_next_takes_over() {
    use envoy_types::pb::envoy::config::cluster::v3::OutlierDetection;
    let (_pki, mut control, sidecar) = setup("priority").await;
    let local = backend("local", Behaviour::Answer).await;
    let broken = backend("broken", Behaviour::Fail).await;
    let remote = backend("remote", Behaviour::Answer).await;
    let c = Cluster {
        outlier_detection: Some(OutlierDetection {
            consecutive_5xx: Some(UInt32Value { value: 1 }),
            max_ejection_percent: Some(UInt32Value { value: 100 }),
            ..Default::default()
        }),
        ..cluster(&subset("v1"))
    };
    let config = routes(vec![forward(prefix("/"), to(&subset("v1")))]);
    sidecar
        .serve(&mut control, config, &[(c, vec![local.addr, remote.addr])])
        .await;
    // The controller's locality failover: the local endpoint first, the remote one next.
    let failover = |first: SocketAddr| {
        let mut cla = assignment(&subset("v1"), &[first]);
        cla.endpoints.push(LocalityLbEndpoints {
            priority: 1,
            ..assignment(&subset("v1"), &[remote.addr]).endpoints.remove(0)
        });
        cla
    };
    let table = sidecar.table.clone();
    let until_first_is = |first: SocketAddr| {
        let table = table.clone();
        poll(Duration::from_secs(5), move || {
            let t = table.load_full();
            async move {
                let eps = &t.upstreams[&subset("v1")].endpoints;
                match eps.iter().find(|e| e.priority == 0) {
                    Some(e) if e.address == first && eps.len() == 2 => Ok(()),
                    other => Err(format!("priority 0 is {other:?}")),
                }
            }
        })
    };
    control.push(ENDPOINT_TYPE, "2", &[failover(local.addr)]).await;
    until_first_is(local.addr).await;
    let counts = spread(&sidecar, 20, &[]).await;
    // Priority 1 waits. Under a loaded machine one attempt in a while fails on its pooled
    // connection (seen once in ~10 full-suite runs, cause not yet found) and Istio's default
    // retry, skipping the host it tried (previous_hosts), lands it on priority 1, as
    // Envoy's would: no request may fail, and at most that one may leave priority 0.
    assert_eq!(counts.values().sum::<usize>(), 20, "{counts:?}");
    assert!(
        counts.get("200 local").is_some_and(|n| *n >= 19),
        "priority 1 waits: {counts:?}"
    );
    assert!(
        counts.keys().all(|k| k == "200 local" || k == "200 remote"),
        "{counts:?}"
    );

    control.push(ENDPOINT_TYPE, "3", &[failover(broken.addr)]).await;
    until_first_is(broken.addr).await;
    let counts = spread(&sidecar, 20, &[]).await;
    assert_eq!(counts.get("503 broken"), Some(&1), "{counts:?}");
    assert_eq!(counts.get("200 remote"), Some(&19), "{counts:?}");
}

/// A chunked PUT of `len` bytes on a connection of its own; the status it got.
async fn chunked_put(sidecar: &Sidecar, len: usize) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(sidecar.entry).await.unwrap();
    let head = "PUT /upload HTTP/1.1\r\nhost: reviews:9080\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n";
    s.write_all(head.as_bytes()).await.unwrap();
    for chunk in vec![b'x'; len].chunks(4096) {
        s.write_all(format!("{:x}\r\n", chunk.len()).as_bytes()).await.unwrap();
        s.write_all(chunk).await.unwrap();
        s.write_all(b"\r\n").await.unwrap();
    }
    s.write_all(b"0\r\n\r\n").await.unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).await.unwrap();
    reply[9..12].parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_body_is_held_for_retries_up_to_64_kib_and_streamed_once_beyond() {
    let (_pki, _control, sidecar, broken) = failing_behind_retries("held").await;
    assert_eq!(chunked_put(&sidecar, 10 * 1024).await, 503);
    let bodies: Vec<usize> = broken.seen.lock().unwrap().iter().map(|s| s.body).collect();
    assert_eq!(bodies, [10 * 1024; 3], "held, and sent whole three times");
    assert_eq!(chunked_put(&sidecar, 100 * 1024).await, 503);
    let bodies: Vec<usize> = broken.seen.lock().unwrap().iter().map(|s| s.body).collect();
    assert_eq!(bodies[3..], [100 * 1024], "too large to hold: sent whole, once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_is_routed_by_its_path_and_switches_protocols() {
    // The upgrade request is looked up in the routes like any other (here its path picks
    // the WebSocket cluster), then the connection carries the application's frames.
    let (_pki, mut control, sidecar) = setup("websocket").await;
    let other = backend("v1", Behaviour::Answer).await;
    let config = routes(vec![
        forward(prefix("/chat"), to(&subset("v2"))),
        forward(prefix("/"), to(&subset("v1"))),
    ]);
    let clusters = [
        (cluster(&subset("v1")), vec![other.addr]),
        (cluster(&subset("v2")), vec![support::websocket::app().await]),
    ];
    sidecar.serve(&mut control, config, &clusters).await;
    support::websocket::exchange(sidecar.entry).await;
    let (status, body, _) = sidecar.get("/reviews/1", &[]).await;
    assert_eq!(
        (status, body.as_str()),
        (200, "v1"),
        "other paths still go to their cluster"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2c_client_such_as_grpc_is_served_and_routed_too() {
    let (_pki, mut control, sidecar) = setup("h2c").await;
    let (v1, v2) = (
        backend("v1", Behaviour::Answer).await,
        backend("v2", Behaviour::Answer).await,
    );
    let grpc = HeaderMatcher {
        name: "content-type".into(),
        header_match_specifier: Some(header_matcher::HeaderMatchSpecifier::StringMatch(StringMatcher {
            match_pattern: Some(string_matcher::MatchPattern::Prefix("application/grpc".into())),
            ignore_case: false,
        })),
        ..Default::default()
    };
    let config = routes(vec![
        forward(
            RouteMatch {
                headers: vec![grpc],
                ..prefix("/")
            },
            to(&subset("v2")),
        ),
        forward(prefix("/"), to(&subset("v1"))),
    ]);
    let clusters = [
        (cluster(&subset("v1")), vec![v1.addr]),
        (cluster(&subset("v2")), vec![v2.addr]),
    ];
    sidecar.serve(&mut control, config, &clusters).await;

    let tcp = tokio::net::TcpStream::connect(sidecar.entry).await.unwrap();
    let (mut h2, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), hyper_util::rt::TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    for (content_type, want) in [("application/grpc", "v2"), ("text/plain", "v1")] {
        let req = hyper::Request::builder()
            .method("POST")
            .uri("http://reviews:9080/reviews.Reviews/Get")
            .header("content-type", content_type)
            .body(Full::new(Bytes::from_static(b"hello")))
            .unwrap();
        let resp = h2.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, want, "{content_type}");
    }
    // The gRPC call reached its endpoint over HTTP/2, whole, with the caller's `:authority`.
    let seen = v2.seen.lock().unwrap().clone();
    assert_eq!((seen[0].host.as_str(), seen[0].body), ("reviews:9080", 5));
    let seen = v1.seen.lock().unwrap().clone();
    assert_eq!((seen[0].host.as_str(), seen[0].body), ("reviews:9080", 5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_routed_subset_is_reached_in_mutual_tls_through_its_sidecar() {
    routed_through_its_sidecar("mtls", "http").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_whose_protocol_flag_says_tcp_serves_http_by_the_callers_alpn() {
    // The caller's HTTP listener sends pooled HTTP/2 with ALPN `istio-h2`; copying those
    // bytes to an HTTP/1.1 application would fail every request.
    routed_through_its_sidecar("mtls-tcp", "tcp").await;
}

const SERVER_ID: &str = "spiffe://cluster.local/ns/default/sa/reviews";

/// A DestinationRule's `maxRequestsPerConnection: N` as the controller writes it, on the
/// HTTP/1.1 (`h2UpgradePolicy: DO_NOT_UPGRADE`) or HTTP/2 (`UPGRADE`) hop.
fn requests_per_connection(mut cluster: Cluster, h2: bool, n: u32) -> Cluster {
    use envoy_types::pb::envoy::config::core::v3::{
        Http1ProtocolOptions, Http2ProtocolOptions, HttpProtocolOptions as Common,
    };
    use envoy_types::pb::envoy::extensions::upstreams::http::v3::HttpProtocolOptions;
    use envoy_types::pb::envoy::extensions::upstreams::http::v3::http_protocol_options::{
        ExplicitHttpConfig, UpstreamProtocolOptions, explicit_http_config::ProtocolConfig,
    };
    let protocol_config = match h2 {
        true => ProtocolConfig::Http2ProtocolOptions(Http2ProtocolOptions::default()),
        false => ProtocolConfig::HttpProtocolOptions(Http1ProtocolOptions::default()),
    };
    let options = HttpProtocolOptions {
        common_http_protocol_options: Some(Common {
            max_requests_per_connection: Some(UInt32Value { value: n }),
            ..Default::default()
        }),
        upstream_protocol_options: Some(UpstreamProtocolOptions::ExplicitHttpConfig(ExplicitHttpConfig {
            protocol_config: Some(protocol_config),
        })),
        ..Default::default()
    };
    cluster.typed_extension_protocol_options.insert(
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions".into(),
        Any {
            type_url: "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions".into(),
            value: options.encode_to_vec(),
        },
    );
    cluster
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_requests_per_connection_renews_the_pooled_connection_on_either_hop() {
    for h2 in [false, true] {
        let (pki, mut control, sidecar) = setup(&format!("per-connection-{h2}")).await;
        let v2 = backend("v2", Behaviour::Answer).await;
        let server = receiver(&pki, v2.addr, "http --metrics 127.0.0.1:0");
        let mesh = mtls_cluster(&subset("v2"), &format!("outbound_.9080_.v2_.{HOST}"));
        let clusters = [(
            requests_per_connection(mesh, h2, 2),
            vec![server.bound.inbound.unwrap()],
        )];
        sidecar
            .serve(
                &mut control,
                routes(vec![forward(prefix("/"), to(&subset("v2")))]),
                &clusters,
            )
            .await;
        for _ in 0..6 {
            let (status, body, _) = sidecar.get("/reviews", &[]).await;
            assert_eq!((status, body.as_str()), (200, "v2"), "h2 {h2}");
        }
        // Six requests one after another, two a connection: three connections, each proving
        // the caller (a new mTLS handshake each).
        let opened = "istio_tcp_connections_opened_total";
        support::metric_reaches(
            server.bound.metrics.unwrap(),
            opened,
            &[("reporter", "destination")],
            3.0,
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_the_http11_hop_max_connections_holds_requests_until_a_connection_frees() {
    // Istio's circuit-breaking task: `maxConnections: 1`, `http1MaxPendingRequests: 1`,
    // `maxRequestsPerConnection: 1`, on the HTTP/1.1 hop between sidecars.
    use envoy_types::pb::envoy::config::cluster::v3::circuit_breakers::Thresholds;
    let (pki, mut control, sidecar) = setup("h1-max-connections").await;
    let stuck = backend("stuck", Behaviour::Hang).await;
    let server = receiver(&pki, stuck.addr, "http --metrics 127.0.0.1:0");
    let mesh = Cluster {
        circuit_breakers: breaker(Thresholds {
            max_connections: Some(UInt32Value { value: 1 }),
            max_pending_requests: Some(UInt32Value { value: 1 }),
            ..Default::default()
        }),
        ..mtls_cluster(&subset("v2"), &format!("outbound_.9080_.v2_.{HOST}"))
    };
    let clusters = [(
        requests_per_connection(mesh, false, 1),
        vec![server.bound.inbound.unwrap()],
    )];
    let config = routes(vec![forward(prefix("/"), to(&subset("v2")))]);
    sidecar.serve(&mut control, config, &clusters).await;
    let sidecar = Arc::new(sidecar);
    let spawn_get = || {
        let sidecar = sidecar.clone();
        tokio::spawn(async move { sidecar.get("/", &[]).await })
    };
    let hits = |want: usize| {
        let hits = stuck.hits.clone();
        async move {
            match hits.load(Ordering::Relaxed) {
                n if n == want => Ok(()),
                n => Err(format!("{n} requests reached the application")),
            }
        }
    };
    let first = spawn_get();
    poll(Duration::from_secs(10), || hits(1)).await;
    // The second finds the one connection busy and waits for it as a pending request…
    let second = spawn_get();
    poll(Duration::from_secs(10), || async {
        let metrics = sidecar.telemetry.render();
        match metrics.lines().any(|l| l.contains(r#"reason="upstream_cx_overflow""#)) {
            true => Ok(()),
            false => Err(format!("no upstream_cx_overflow yet:\n{metrics}")),
        }
    })
    .await;
    // …so a third finds the pending place taken and is turned away.
    assert_overflowed(&sidecar, sidecar.get("/", &[]).await, "upstream_rq_pending_overflow");
    hits(1).await.unwrap();
    let opened = "istio_tcp_connections_opened_total";
    let server_metrics = server.bound.metrics.unwrap();
    support::metric_reaches(server_metrics, opened, &[("reporter", "destination")], 1.0).await;
    // The first given up closes its connection: the waiting one gets a connection of its own.
    first.abort();
    poll(Duration::from_secs(10), || hits(2)).await;
    support::metric_reaches(server_metrics, opened, &[("reporter", "destination")], 2.0).await;
    second.abort();
}

/// A cluster whose endpoints are spoken to in mutual TLS with `sni`, proving [`SERVER_ID`].
fn mtls_cluster(name: &str, sni: &str) -> Cluster {
    sidecar::synthetic::mtls_cluster(name, sni, &[SERVER_ID.to_owned()])
}

/// A pod's sidecar in front of `app` (STRICT mTLS, `--protocol PROTOCOL`), proving
/// [`SERVER_ID`].
fn receiver(pki: &Pki, app: SocketAddr, protocol: &str) -> sidecar::run::Sidecar {
    let (cert, key) = pki.svid("cluster.local", "reviews");
    let line = format!(
        "--inbound 127.0.0.1:0={app} --cert {} --key {} --ca {} --protocol {protocol} --mtls STRICT",
        cert.display(),
        key.display(),
        pki.ca().display()
    );
    sidecar::run::Sidecar::start(sidecar::run::RunArgs::from_words(line.split_whitespace()).unwrap()).unwrap()
}

/// Routes `/v2` to a subset behind its own sidecar (`--protocol PROTOCOL`, STRICT mTLS) and
/// `/` to a plaintext endpoint outside the mesh; both answer, and only the sidecar's
/// application learns its caller from `x-forwarded-client-cert`.
async fn routed_through_its_sidecar(name: &str, protocol: &str) {
    let (pki, mut control, sidecar) = setup(name).await;
    let (v1, v2) = (
        backend("v1", Behaviour::Answer).await,
        backend("v2", Behaviour::Answer).await,
    );
    let server = receiver(&pki, v2.addr, protocol);
    let mesh = mtls_cluster(&subset("v2"), &format!("outbound_.9080_.v2_.{HOST}"));
    let config = routes(vec![
        forward(prefix("/v2"), to(&subset("v2"))),
        forward(prefix("/"), to(&subset("v1"))),
    ]);
    let clusters = [
        (cluster(&subset("v1")), vec![v1.addr]),
        (mesh, vec![server.bound.inbound.unwrap()]),
    ];
    sidecar.serve(&mut control, config, &clusters).await;

    for _ in 0..5 {
        let (status, body, _) = sidecar.get("/v2/reviews", &[]).await;
        assert_eq!((status, body.as_str()), (200, "v2"));
        let (status, body, _) = sidecar.get("/v1/reviews", &[]).await;
        assert_eq!((status, body.as_str()), (200, "v1"));
    }
    // v2 learnt its caller from its sidecar; v1, outside the mesh, was called in plaintext.
    let seen = v2.seen.lock().unwrap().clone();
    let caller = "URI=spiffe://cluster.local/ns/default/sa/productpage";
    assert!(
        seen.iter()
            .all(|s| s.xfcc.as_deref().is_some_and(|x| x.ends_with(caller))),
        "{seen:?}"
    );
    assert!(v1.seen.lock().unwrap().iter().all(|s| s.xfcc.is_none()));
}

/// A stand-in for our east-west gateway: reads each connection's ClientHello without
/// terminating TLS, and splices the connection to exactly the endpoint its pinned SNI
/// names, or closes it (as the real gateway does, the caller decides). Returns its address
/// and the SNIs it was sent.
async fn pinning_gateway() -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let names = Arc::new(Mutex::new(Vec::new()));
    let seen = names.clone();
    let (addr, _) = support::accept_each(move |mut caller| {
        let seen = seen.clone();
        async move {
            let mut hello = Vec::new();
            let sni = loop {
                let mut chunk = [0; 4096];
                match caller.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => hello.extend_from_slice(&chunk[..n]),
                }
                match sidecar::client_hello::parse(&hello, 16 * 1024) {
                    Ok(None) => continue,
                    Ok(Some(h)) => break h.server_name.unwrap_or_default(),
                    Err(_) => return,
                }
            };
            seen.lock().unwrap().push(sni.clone());
            let (Some(pod), _) = mesh_vocab::sni::unpin(&sni) else {
                return;
            };
            let Ok(mut upstream) = tokio::net::TcpStream::connect(pod).await else {
                return;
            };
            if upstream.write_all(&hello).await.is_ok() {
                let _ = tokio::io::copy_bidirectional(&mut caller, &mut upstream).await;
            }
        }
    })
    .await;
    (addr, names)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_behind_one_gateway_are_balanced_over_and_ejected_one_by_one() {
    use envoy_types::pb::envoy::config::core::v3::Metadata;
    use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
    let (pki, mut control, sidecar) = setup("pinned").await;
    let (good, broken) = (
        backend("good", Behaviour::Answer).await,
        backend("broken", Behaviour::Fail).await,
    );
    // Two pods of another network, each behind its own sidecar, both behind one gateway.
    let receivers = [receiver(&pki, good.addr, "http"), receiver(&pki, broken.addr, "http")];
    let pods = receivers.each_ref().map(|p| p.bound.inbound.unwrap());
    let (gateway, snis) = pinning_gateway().await;
    let sni = format!("outbound_.9080_._.{HOST}");
    let c = Cluster {
        outlier_detection: Some(gateway_errors(2)),
        ..mtls_cluster(&subset(""), &sni)
    };
    let config = routes(vec![forward(prefix("/"), to(&subset("")))]);
    sidecar
        .serve(&mut control, config, &[(c, vec![gateway, gateway])])
        .await;
    // The controller's EDS for pods behind our gateway: the gateway's address, each with
    // the pod it is.
    let mut cla = assignment(&subset(""), &[gateway, gateway]);
    for (e, pod) in cla.endpoints[0].lb_endpoints.iter_mut().zip(pods) {
        let value = Value {
            kind: Some(Kind::StringValue(pod.to_string())),
        };
        let istio = Struct {
            fields: [("endpoint".to_owned(), value)].into(),
        };
        e.metadata = Some(Metadata {
            filter_metadata: [("istio".to_owned(), istio)].into(),
            ..Default::default()
        });
    }
    control.push(ENDPOINT_TYPE, "2", &[cla]).await;
    let table = sidecar.table.clone();
    poll(Duration::from_secs(10), || async {
        let t = table.load();
        let pinned: Vec<_> = t.upstreams[&subset("")].endpoints.iter().map(|e| e.pinned).collect();
        match pinned == pods.map(Some) {
            true => Ok(()),
            false => Err(format!("endpoints pinned to {pinned:?}")),
        }
    })
    .await;

    let counts = spread(&sidecar, 40, &[]).await;
    assert_eq!(counts.get("503 broken"), Some(&2), "{counts:?}");
    assert_eq!(counts.get("200 good"), Some(&38), "{counts:?}");
    assert_eq!(
        broken.hits.load(Ordering::Relaxed),
        2,
        "ejected after two gateway errors"
    );
    // One pooled connection per pod, each asking the gateway for exactly that pod.
    let mut asked = snis.lock().unwrap().clone();
    asked.sort();
    let mut want: Vec<String> = pods.iter().map(|p| mesh_vocab::sni::pin(*p, &sni)).collect();
    want.sort();
    assert_eq!(asked, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_applications_envoy_headers_set_its_own_retries_and_timeout() {
    let (_pki, _control, sidecar, broken) = failing_behind_retries("envoy-headers").await;
    assert_eq!(sidecar.get("/", &[("x-envoy-max-retries", "0")]).await.0, 503);
    assert_eq!(broken.hits.load(Ordering::Relaxed), 1, "no retry asked for");
    assert_eq!(sidecar.get("/", &[("x-envoy-max-retries", "1")]).await.0, 503);
    assert_eq!(broken.hits.load(Ordering::Relaxed), 3, "one retry");

    let (_pki, mut control, sidecar) = setup("envoy-timeout").await;
    let stuck = backend("stuck", Behaviour::Hang).await;
    // No timeout on the route: Envoy's 15 s would apply.
    let config = routes(vec![forward(prefix("/"), to(&subset("v1")))]);
    sidecar
        .serve(&mut control, config, &[(cluster(&subset("v1")), vec![stuck.addr])])
        .await;
    let (status, body, _) = sidecar.get("/", &[("x-envoy-upstream-rq-timeout-ms", "100")]).await;
    assert_eq!((status, body.as_str()), (504, "upstream request timeout"));
}

/// The application's own certificate authority, for names outside the mesh: its TLS is
/// the application's business, and the sidecar must pass it through untouched.
struct AppCa {
    root: rustls_pki_types::CertificateDer<'static>,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl AppCa {
    fn new() -> AppCa {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let key = rcgen::KeyPair::generate().unwrap();
        let root = params.self_signed(&key).unwrap().der().clone();
        AppCa {
            root,
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// A TLS server for DNS name `name` that writes `answer` to each client and closes.
    async fn server(&self, name: &str, answer: &'static str) -> SocketAddr {
        use tokio::io::AsyncWriteExt;
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![name.to_owned()])
            .unwrap()
            .signed_by(&key, &self.issuer)
            .unwrap();
        let key = rustls_pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap();
        let config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone()], key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let (addr, _) = support::accept_each(move |stream| {
            let acceptor = acceptor.clone();
            async move {
                if let Ok(mut tls) = acceptor.accept(stream).await {
                    let _ = tls.write_all(answer.as_bytes()).await;
                    let _ = tls.shutdown().await;
                }
            }
        })
        .await;
        addr
    }

    /// Opens TLS for `name` to `addr`, verifying the server's certificate for that name
    /// against this CA alone, and reads what the server says.
    async fn call(&self, addr: SocketAddr, name: &str) -> Result<String, String> {
        use tokio::io::AsyncReadExt;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.root.clone()).unwrap();
        let config = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let stream = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let server_name = rustls_pki_types::ServerName::try_from(name.to_owned()).unwrap();
        let talk = async {
            let mut tls = connector.connect(server_name, stream).await?;
            let mut got = String::new();
            tls.read_to_string(&mut got).await?;
            Ok::<_, std::io::Error>(got)
        };
        match tokio::time::timeout(Duration::from_secs(10), talk).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err("no answer within 10 s".into()),
        }
    }
}

/// A `tcp_proxy` chain to `cluster` for the SNIs `names` (none: the chain without a match).
fn sni_chain(names: &[&str], cluster: &str) -> FilterChain {
    use envoy_types::pb::envoy::config::listener::v3::FilterChainMatch;
    let mut chain = tcp_listener(cluster).filter_chains.remove(0);
    if !names.is_empty() {
        chain.filter_chain_match = Some(FilterChainMatch {
            server_names: names.iter().map(|n| (*n).to_owned()).collect(),
            transport_protocol: "tls".into(),
            ..Default::default()
        });
    }
    chain
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_chains_route_the_applications_own_tls_by_its_sni_and_wrap_it_in_mtls_for_the_mesh() {
    let (pki, mut control, sidecar) = setup("tls-routes").await;
    let app_ca = AppCa::new();
    // a.example.com: outside the mesh, reached in plaintext TCP with the app's TLS inside.
    let a = app_ca.server("a.example.com", "a").await;
    // b.example.com: a pod behind its own sidecar (STRICT, TCP), reached inside mTLS.
    let b = app_ca.server("b.example.com", "b").await;
    let b_sidecar = receiver(&pki, b, "tcp");
    let (echo, _) = support::accept_each(|mut s| async move {
        let (mut r, mut w) = s.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
    })
    .await;
    // What reaches it: `S` and every byte the client sent, once the client is done.
    let (verbatim, _) = support::accept_each(|mut s| async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut got = b"S".to_vec();
        let _ = s.read_to_end(&mut got).await;
        let _ = s.write_all(&got).await;
    })
    .await;
    let (to_a, to_b, to_rest, to_split) = (subset("a"), subset("b"), subset("rest"), subset("split"));
    // The wildcard first: the exact name still wins for a.example.com, as in Envoy.
    let listener = Listener {
        filter_chains: vec![
            sni_chain(&["*.example.com"], &to_b),
            sni_chain(&["a.example.com"], &to_a),
            sni_chain(&["split.test"], &to_split),
            sni_chain(&[], &to_rest),
        ],
        ..tcp_listener(&to_rest)
    };
    let mesh = mtls_cluster(&to_b, &format!("outbound_.9080_.b_.{HOST}"));
    control.push(LISTENER_TYPE, "1", &[listener]).await;
    control
        .push(
            CLUSTER_TYPE,
            "1",
            &[cluster(&to_a), mesh, cluster(&to_rest), cluster(&to_split)],
        )
        .await;
    let eds = [
        assignment(&to_a, &[a]),
        assignment(&to_b, &[b_sidecar.bound.inbound.unwrap()]),
        assignment(&to_rest, &[echo]),
        assignment(&to_split, &[verbatim]),
    ];
    control.push(ENDPOINT_TYPE, "1", &eds).await;
    let table = sidecar.table.clone();
    poll(Duration::from_secs(10), || async {
        let t = table.load();
        let ready = t.reads_hello(vip())
            && [&to_a, &to_b, &to_rest, &to_split]
                .iter()
                .all(|c| t.upstreams.get(*c).is_some_and(|u| !u.endpoints.is_empty()));
        if ready { Ok(()) } else { Err("table not ready".into()) }
    })
    .await;

    for _ in 0..5 {
        assert_eq!(app_ca.call(sidecar.entry, "a.example.com").await.as_deref(), Ok("a"));
        assert_eq!(app_ca.call(sidecar.entry, "b.example.com").await.as_deref(), Ok("b"));
    }
    // c.example.com goes to b's server too (the wildcard), whose certificate is not for it:
    // the application's own verification refuses it, which only its untouched TLS can do.
    let refused = app_ca.call(sidecar.entry, "c.example.com").await.unwrap_err();
    assert!(refused.contains("certificate"), "{refused}");
    // A ClientHello dribbled out in 16-byte writes is still read whole, routed by its SNI,
    // and arrives byte for byte.
    let hello = {
        // A post-quantum key share, as browsers send: a hello of over a kilobyte.
        let mut provider = rustls::crypto::aws_lc_rs::default_provider();
        provider.kx_groups = vec![rustls::crypto::aws_lc_rs::kx_group::X25519MLKEM768];
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let name = rustls_pki_types::ServerName::try_from("split.test").unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let mut hello = Vec::new();
        conn.write_tls(&mut hello).unwrap();
        hello
    };
    assert!(
        hello.len() > 1000,
        "a post-quantum key share makes it big: {}",
        hello.len()
    );
    let mut dribble = tokio::net::TcpStream::connect(sidecar.entry).await.unwrap();
    dribble.set_nodelay(true).unwrap();
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        for piece in hello.chunks(16) {
            dribble.write_all(piece).await.unwrap();
            tokio::task::yield_now().await;
        }
        dribble.shutdown().await.unwrap();
        let mut back = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), dribble.read_to_end(&mut back))
            .await
            .expect("an answer in time")
            .unwrap();
        assert_eq!(
            back,
            [&b"S"[..], &hello].concat(),
            "the hello went to split.test's backend unmodified"
        );
    }
    // Plaintext fits no TLS chain: the chain without a match echoes it.
    let mut plain = tokio::net::TcpStream::connect(sidecar.entry).await.unwrap();
    assert_eq!(ping(&mut plain).await, b"ping");
    // b's leg was mutual TLS from this sidecar.
    let metrics = sidecar.telemetry.render();
    let mtls = support::sum_of(
        &metrics,
        "istio_tcp_connections_opened_total",
        &[("connection_security_policy", "mutual_tls")],
    );
    assert!(mtls >= 6.0, "{metrics}");
}
