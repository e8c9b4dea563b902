//! Proxyless gRPC against `federation-controller serve`: a real grpcio client
//! with `GRPC_XDS_BOOTSTRAP` (Istio's gRPC bootstrap: `GENERATOR: grpc`) dials
//! `xds:///reviews.default.svc.cluster.local:9080`, must ACK the listener,
//! routes, cluster and endpoints it is served, balance over both `reviews`
//! backends (real grpcio servers), and follow a push when one goes away.
//! Needs grpcio and grpcio-csds (tests/grpc_proxyless.requirements.txt;
//! scripts/test.sh installs them) and fails loudly without them.

mod support;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use support::{Controller, cluster, scratch};

const TARGET: &str = "xds:///reviews.default.svc.cluster.local:9080";
const LISTENER: &str = "reviews.default.svc.cluster.local:9080";
const CLUSTER: &str = "outbound|9080||reviews.default.svc.cluster.local";

/// `tests/grpc_proxyless.py` in a mode, talked to line by line; killed on drop.
struct Python {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl Python {
    fn start(args: &[&str], env: &[(&str, &Path)]) -> Self {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/grpc_proxyless.py");
        let mut cmd = Command::new("python3");
        cmd.arg(script).args(args).stdin(Stdio::piped()).stdout(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("python3 must be installed");
        Python {
            stdin: child.stdin.take(),
            stdout: BufReader::new(child.stdout.take().unwrap()),
            child,
        }
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        assert!(
            !line.is_empty(),
            "grpc_proxyless.py exited ({:?}); its stderr says why. Missing modules? \
             python3 -m pip install -r federation-controller/tests/grpc_proxyless.requirements.txt",
            self.child.wait()
        );
        line
    }

    fn ask(&mut self, command: &str) -> serde_json::Value {
        writeln!(self.stdin.as_mut().unwrap(), "{command}").unwrap();
        serde_json::from_str(&self.line()).unwrap()
    }
}

impl Drop for Python {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// cluster1 on network1: `reviews` (ClusterIP, port 9080 named grpc) with a
/// plaintext pod per (name, IP), labelled `pod: NAME`, all listening on `port`.
fn manifests(dir: &Path, port: u16, pods: &[(&str, &str)]) {
    let d = dir.join("cluster1");
    std::fs::create_dir_all(&d).unwrap();
    let mut y = "apiVersion: v1\nkind: Namespace\nmetadata: {name: default, labels: {topology.istio.io/network: network1}}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {name: reviews, namespace: default}\n\
         spec: {clusterIP: 10.96.1.12, ports: [{name: grpc, port: 9080}]}\n"
        .to_owned();
    let mut eps = String::new();
    for (pod, ip) in pods {
        y += &format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {pod}, namespace: default, labels: {{app: reviews, pod: {pod}}}}}\n\
             spec: {{serviceAccountName: reviews, containers: [{{name: app}}]}}\n"
        );
        eps += &format!("  - {{addresses: [{ip}], targetRef: {{kind: Pod, name: {pod}}}}}\n");
    }
    y += &format!(
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: reviews-1, namespace: default, labels: {{kubernetes.io/service-name: reviews}}}}\n\
         addressType: IPv4\nports: [{{name: grpc, port: {port}}}]\nendpoints:\n{eps}"
    );
    // Write then rename, so the controller never reads half a file.
    let tmp = d.join(".objects.yaml.tmp");
    support::write(&tmp, y).unwrap();
    std::fs::rename(tmp, d.join("objects.yaml")).unwrap();
}

/// Istio's gRPC bootstrap, pointed at `xds`.
fn bootstrap(path: &Path, xds: std::net::SocketAddr) {
    let b = serde_json::json!({
        "xds_servers": [{
            "server_uri": xds.to_string(),
            "channel_creds": [{"type": "insecure"}],
            "server_features": ["xds_v3"],
        }],
        "node": {
            "id": "sidecar~127.0.0.1~client.default~default.svc.cluster.local",
            "metadata": {
                "GENERATOR": "grpc",
                "NETWORK": "network1",
                "CLUSTER_ID": "cluster1",
                "NAMESPACE": "default",
            },
            "locality": {},
        },
    });
    support::write(path, b.to_string()).unwrap();
}

/// Calls `n` times; the servers that answered, in order, and any errors.
fn call(client: &mut Python, n: usize) -> (Vec<String>, Vec<String>) {
    let out = client.ask(&format!("call {n}"));
    let strings = |k: &str| -> Vec<String> {
        out[k]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_owned())
            .collect()
    };
    (strings("answers"), strings("errors"))
}

/// Calls in rounds of `n` until `done` holds for a round; returns that round.
fn call_until(client: &mut Python, n: usize, what: &str, done: impl Fn(&[String], &[String]) -> bool) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (answers, errors) = call(client, n);
        if done(&answers, &errors) {
            return answers;
        }
        if Instant::now() > deadline {
            let held = client.ask("csds");
            panic!("never {what}; last round answered by {answers:?}, errors {errors:?}; the client holds {held}");
        }
    }
}

/// What the client holds by CSDS: (type, name, status) of each resource, and
/// the endpoints of its one ClusterLoadAssignment.
#[allow(clippy::type_complexity)]
fn csds(client: &mut Python) -> (BTreeSet<(String, String, String)>, Vec<String>) {
    let dump = client.ask("csds");
    let resources = dump.as_array().unwrap();
    let held = resources
        .iter()
        .map(|r| {
            let s = |k: &str| r[k].as_str().unwrap().to_owned();
            (s("type"), s("name"), s("status"))
        })
        .collect();
    let endpoints = resources
        .iter()
        .find_map(|r| r["endpoints"].as_array())
        .expect("an EDS resource")
        .iter()
        .map(|e| e.as_str().unwrap().to_owned())
        .collect();
    (held, endpoints)
}

/// Two gRPC servers, reviews-a on 127.0.0.2 and reviews-b on 127.0.0.3 (one port),
/// and cluster1's manifests for them under `dir/manifests`.
fn two_backends(dir: &Path) -> (Python, u16, std::path::PathBuf) {
    let mut servers = Python::start(&["serve", "reviews-a=127.0.0.2", "reviews-b=127.0.0.3"], &[]);
    let port: u16 = servers
        .line()
        .trim()
        .strip_prefix("port ")
        .expect("port P")
        .parse()
        .unwrap();
    let manifest_dir = dir.join("manifests");
    manifests(
        &manifest_dir,
        port,
        &[("reviews-a", "127.0.0.2"), ("reviews-b", "127.0.0.3")],
    );
    (servers, port, manifest_dir)
}

#[test]
fn a_proxyless_grpc_client_acks_what_it_is_served_balances_over_it_and_follows_a_push() {
    let dir = scratch("grpc-proxyless");
    let (mut servers, port, manifest_dir) = two_backends(&dir);
    // reviews also runs on network2, reachable from network1 only through its
    // gateway, which only passes mTLS through: nothing gRPC can use yet.
    cluster(&manifest_dir, "cluster2", "network2", 2, &[("reviews-c", "v1", true)]);
    let controller = Controller::serve(&manifest_dir);
    let bootstrap_file = dir.join("bootstrap.json");
    bootstrap(&bootstrap_file, controller.xds);
    let mut client = Python::start(&["client", TARGET], &[("GRPC_XDS_BOOTSTRAP", &bootstrap_file)]);

    // Round robin over both backends, every call answered: once both are
    // connected (the first calls go to whichever is ready first), calls alternate.
    call_until(&mut client, 10, "reached both backends", |a, e| {
        e.is_empty() && a.iter().collect::<BTreeSet<_>>().len() == 2
    });
    let (both, errors) = call(&mut client, 10);
    assert!(
        errors.is_empty() && both.windows(2).all(|w| w[0] != w[1]),
        "round robin alternates: {both:?}, errors {errors:?}"
    );

    // What the client holds, by its own account (CSDS): everything ACKed, and
    // only the endpoints on its network, none behind cluster2's gateway.
    let (held, endpoints) = csds(&mut client);
    let acked = |t: &str, name: &str| {
        (
            format!("type.googleapis.com/envoy.config.{t}"),
            name.to_owned(),
            "ACKED".to_owned(),
        )
    };
    assert_eq!(
        held,
        BTreeSet::from([
            acked("listener.v3.Listener", LISTENER),
            acked("route.v3.RouteConfiguration", LISTENER),
            acked("cluster.v3.Cluster", CLUSTER),
            acked("endpoint.v3.ClusterLoadAssignment", CLUSTER),
        ]),
        "the client's CSDS view"
    );
    assert_eq!(endpoints, [format!("127.0.0.2:{port}"), format!("127.0.0.3:{port}")]);

    // A target we know nothing of is not made up: the call fails, once gRPC's
    // does-not-exist timer (15 s) runs out for the listener we never sent.
    let unknown = client.ask("once xds:///nope.default.svc.cluster.local:9080 20");
    assert!(
        unknown["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("UNAVAILABLE") && e.contains("does not exist")),
        "{unknown}"
    );

    // reviews-b leaves the EndpointSlice but keeps running: only a followed push stops calls to it.
    manifests(&manifest_dir, port, &[("reviews-a", "127.0.0.2")]);
    call_until(&mut client, 10, "left reviews-b", |a, e| {
        e.is_empty() && a.iter().all(|s| s == "reviews-a")
    });
    let (after, errors) = call(&mut client, 20);
    assert!(
        errors.is_empty() && after.iter().all(|s| s == "reviews-a"),
        "after the push only reviews-a answers: {after:?}, errors {errors:?}"
    );
    let (held_after, endpoints) = csds(&mut client);
    assert_eq!(held_after, held, "still all ACKed");
    assert_eq!(endpoints, [format!("127.0.0.2:{port}")]);

    assert_eq!(
        controller.metric("pilot_total_xds_rejects", &[]).unwrap_or(0.0),
        0.0,
        "the gRPC client NACKed nothing"
    );
    for t in ["lds", "rds", "cds", "eds"] {
        assert!(
            controller.metric("pilot_xds_pushes", &[("type", t)]).unwrap_or(0.0) >= 1.0,
            "{t} was served"
        );
    }
    drop(servers.stdin.take());
}

/// Istio config reaches a real gRPC client: a VirtualService sending everything
/// to one DestinationRule subset is obeyed, and a fault abort it adds fails the calls.
#[test]
fn a_proxyless_grpc_client_follows_virtual_service_subsets_and_faults() {
    let dir = scratch("grpc-proxyless-l7");
    let (mut servers, _, manifest_dir) = two_backends(&dir);
    let istio = |fault: &str| {
        let y = format!(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: reviews, namespace: default}}\n\
             spec: {{host: reviews, subsets: [{{name: a, labels: {{pod: reviews-a}}}}, {{name: b, labels: {{pod: reviews-b}}}}]}}\n---\n\
             apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: reviews, namespace: default}}\n\
             spec: {{hosts: [reviews], http: [{{{fault}route: [{{destination: {{host: reviews, subset: b}}, weight: 100}}]}}]}}\n"
        );
        let tmp = manifest_dir.join("cluster1/.istio.yaml.tmp");
        support::write(&tmp, y).unwrap();
        std::fs::rename(tmp, manifest_dir.join("cluster1/istio.yaml")).unwrap();
    };
    istio("");
    let controller = Controller::serve(&manifest_dir);
    let bootstrap_file = dir.join("bootstrap.json");
    bootstrap(&bootstrap_file, controller.xds);
    let mut client = Python::start(&["client", TARGET], &[("GRPC_XDS_BOOTSTRAP", &bootstrap_file)]);

    call_until(&mut client, 10, "answered by subset b only", |a, e| {
        e.is_empty() && !a.is_empty() && a.iter().all(|s| s == "reviews-b")
    });
    let (answers, errors) = call(&mut client, 20);
    assert!(
        errors.is_empty() && answers.iter().all(|s| s == "reviews-b"),
        "the VirtualService sends everything to subset b: {answers:?}, errors {errors:?}"
    );
    let (held, _) = csds(&mut client);
    assert!(
        held.iter().any(|(t, n, s)| t.ends_with("Cluster")
            && n == "outbound|9080|b|reviews.default.svc.cluster.local"
            && s == "ACKED"),
        "{held:?}"
    );

    istio("fault: {abort: {httpStatus: 503, percentage: {value: 100}}}, ");
    // A round stops at its first failure: an abort of every call fails each round's first.
    call_until(&mut client, 5, "aborted by the fault", |a, e| {
        a.is_empty() && !e.is_empty()
    });
    for _ in 0..5 {
        let (answers, errors) = call(&mut client, 5);
        assert!(
            answers.is_empty() && errors == ["UNAVAILABLE: Fault injected"],
            "HTTP 503 is gRPC's UNAVAILABLE, for every call: {answers:?} {errors:?}"
        );
    }
    assert_eq!(
        controller.metric("pilot_total_xds_rejects", &[]).unwrap_or(0.0),
        0.0,
        "the gRPC client NACKed nothing"
    );
    drop(servers.stdin.take());
}

/// The same shapes over incremental (delta) ADS, which grpcio does not speak
/// but other gRPC xDS clients may: named listeners and routes, and no wildcard
/// for a gRPC node that names nothing.
#[tokio::test]
async fn a_grpc_node_gets_the_same_shapes_over_delta_ads_and_no_wildcard() {
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;
    use envoy_types::pb::envoy::config::core::v3::Node;
    use envoy_types::pb::envoy::config::listener::v3::Listener;
    use envoy_types::pb::envoy::config::route::v3::{RouteConfiguration, route, route_action};
    use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
    use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
    use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
    use prost::Message;

    const LDS: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
    const RDS: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
    const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";

    let dir = scratch("grpc-delta");
    manifests(&dir, 9090, &[("reviews-a", "127.0.0.2")]);
    let controller = Controller::serve(&dir);
    let mut ads = AggregatedDiscoveryServiceClient::connect(format!("http://{}", controller.xds))
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let mut responses = ads
        .delta_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let node = Node {
        id: "sidecar~127.0.0.1~client.default~default.svc.cluster.local".into(),
        metadata: Some(Struct {
            fields: [("GENERATOR", "grpc"), ("NETWORK", "network1")]
                .map(|(k, v)| {
                    (
                        k.to_owned(),
                        Value {
                            kind: Some(Kind::StringValue(v.into())),
                        },
                    )
                })
                .into(),
        }),
        ..Default::default()
    };
    let mut node = Some(node);
    let mut send = async |type_url: &str, names: &[&str]| {
        tx.send(DeltaDiscoveryRequest {
            node: node.take(),
            type_url: type_url.into(),
            resource_names_subscribe: names.iter().map(|n| n.to_string()).collect(),
            ..Default::default()
        })
        .await
        .unwrap();
    };
    // The next response of `type_url` that carries `name` (or any, for ""),
    // skipping pushes of the controller's first, empty state.
    let mut next = async |type_url: &str, name: &str| -> DeltaDiscoveryResponse {
        loop {
            let r = tokio::time::timeout(Duration::from_secs(10), responses.message())
                .await
                .unwrap_or_else(|_| panic!("no {type_url} {name}"))
                .unwrap()
                .unwrap();
            if r.type_url == type_url && (name.is_empty() || r.resources.iter().any(|res| res.name == name)) {
                return r;
            }
        }
    };
    let only = |r: &DeltaDiscoveryResponse, name: &str| -> Vec<u8> {
        let [res] = &r.resources[..] else {
            panic!("one resource: {r:?}")
        };
        assert_eq!(res.name, name);
        res.resource.as_ref().unwrap().value.clone()
    };

    send(LDS, &[LISTENER]).await;
    let l = Listener::decode(&only(&next(LDS, LISTENER).await, LISTENER)[..]).unwrap();
    assert!(l.api_listener.is_some(), "an API listener");
    send(CDS, &[]).await;
    let r = next(CDS, "").await;
    assert!(
        r.resources.is_empty(),
        "naming nothing is not a wildcard for gRPC: {r:?}"
    );
    send(RDS, &[LISTENER]).await;
    let rc = RouteConfiguration::decode(&only(&next(RDS, LISTENER).await, LISTENER)[..]).unwrap();
    let action = rc.virtual_hosts[0].routes[0].action.clone();
    let Some(route::Action::Route(a)) = action else {
        panic!("a route")
    };
    assert_eq!(
        a.cluster_specifier,
        Some(route_action::ClusterSpecifier::Cluster(CLUSTER.into()))
    );
    send(CDS, &[CLUSTER]).await;
    let c = Cluster::decode(&only(&next(CDS, CLUSTER).await, CLUSTER)[..]).unwrap();
    assert!(c.transport_socket_matches.is_empty(), "plaintext");
}
