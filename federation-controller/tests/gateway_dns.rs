//! A gateway known only by its load balancer's host name, end to end in one
//! process: manifests → snapshot → the resolver stage with hickory asking a
//! small DNS server of the test's own on 127.0.0.1 → the xDS server → a gRPC
//! ADS client on the other network. The endpoints it receives follow the DNS
//! answer within the TTL bound, and a failing DNS server leaves the last
//! addresses in place.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::core::v3::{Node, address, socket_address};
use envoy_types::pb::envoy::config::endpoint::v3::{ClusterLoadAssignment, lb_endpoint};
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use federation_controller::metrics::Metrics;
use federation_controller::model::MeshConfig;
use federation_controller::xds::XdsServer;
use federation_controller::{manifests, resolve};
use prost::Message;
use support::dns::{Dns, Reply};
use support::{cluster, scratch};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const EDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
const REVIEWS: &str = "outbound|9080||reviews.default.svc.cluster.local";
const GATEWAY_NAME: &str = "eastwest.cluster2.example";

/// cluster1 on network1 with one reviews pod; cluster2 on network2 with four,
/// behind an east-west gateway whose load balancer has only a host name.
fn mesh(dir: &std::path::Path) {
    cluster(dir, "cluster1", "network1", 1, &[("reviews-v1-a", "v1", true)]);
    let pods: Vec<(String, &str, bool)> = (0..4).map(|i| (format!("reviews-{i}"), "v1", true)).collect();
    let pods: Vec<(&str, &str, bool)> = pods.iter().map(|(p, v, m)| (p.as_str(), *v, *m)).collect();
    cluster(dir, "cluster2", "network2", 2, &pods);
    let file = dir.join("cluster2/objects.yaml");
    let yaml = std::fs::read_to_string(&file).unwrap();
    let ip_gateway = ", externalIPs: [100.64.0.2]}\n";
    assert!(yaml.contains(ip_gateway));
    let named = format!("}}\nstatus: {{loadBalancer: {{ingress: [{{hostname: {GATEWAY_NAME}}}]}}}}\n");
    support::write(&file, yaml.replace(ip_gateway, &named)).unwrap();
}

fn node() -> Node {
    let s = |v: &str| Value {
        kind: Some(Kind::StringValue(v.into())),
    };
    Node {
        id: "sidecar~10.241.0.20~productpage-1.default~default.svc.cluster.local".into(),
        metadata: Some(Struct {
            fields: [
                ("NETWORK".to_owned(), s("network1")),
                ("CLUSTER_ID".to_owned(), s("cluster1")),
            ]
            .into(),
        }),
        ..Default::default()
    }
}

/// An ADS stream asking for reviews' endpoints.
async fn subscribe(xds: SocketAddr) -> (mpsc::Sender<DiscoveryRequest>, tonic::Streaming<DiscoveryResponse>) {
    let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{xds}"))
        .await
        .unwrap();
    let (tx, rx) = mpsc::channel(8);
    let responses = client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tx.send(DiscoveryRequest {
        node: Some(node()),
        type_url: EDS.into(),
        resource_names: vec![REVIEWS.into()],
        ..Default::default()
    })
    .await
    .unwrap();
    (tx, responses)
}

/// "address:port wN" of every endpoint of an EDS response, sorted.
fn endpoints(resp: &DiscoveryResponse) -> Vec<String> {
    let cla = ClusterLoadAssignment::decode(resp.resources[0].value.as_slice()).unwrap();
    assert_eq!(cla.cluster_name, REVIEWS);
    let mut out = Vec::new();
    for e in cla.endpoints.iter().flat_map(|l| &l.lb_endpoints) {
        let Some(lb_endpoint::HostIdentifier::Endpoint(ep)) = &e.host_identifier else {
            panic!("an endpoint")
        };
        let Some(address::Address::SocketAddress(sa)) = ep.address.as_ref().unwrap().address.as_ref() else {
            panic!("a socket address")
        };
        let Some(socket_address::PortSpecifier::PortValue(port)) = sa.port_specifier else {
            panic!("a port")
        };
        out.push(format!(
            "{}:{} w{}",
            sa.address,
            port,
            e.load_balancing_weight.unwrap().value
        ));
    }
    out.sort();
    out
}

/// Reads EDS responses, ACKing each, until one has `want`; panics after `patience`.
async fn until_endpoints(
    tx: &mpsc::Sender<DiscoveryRequest>,
    rx: &mut tonic::Streaming<DiscoveryResponse>,
    want: &[&str],
    patience: Duration,
) -> Instant {
    let deadline = Instant::now() + patience;
    let mut last = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(resp) = tokio::time::timeout(left, rx.message()).await else {
            panic!("no EDS with {want:?} within {patience:?}; last {last:?}")
        };
        let resp = resp.unwrap().expect("the stream stays open");
        tx.send(DiscoveryRequest {
            version_info: resp.version_info.clone(),
            response_nonce: resp.nonce.clone(),
            type_url: EDS.into(),
            resource_names: vec![REVIEWS.into()],
            ..Default::default()
        })
        .await
        .unwrap();
        last = endpoints(&resp);
        if last == want {
            return Instant::now();
        }
    }
}

fn failures(metrics: &Metrics) -> u64 {
    let series = format!("isthmus_controller_gateway_resolution_failures_total{{hostname=\"{GATEWAY_NAME}\"}} ");
    metrics
        .render()
        .lines()
        .find_map(|l| l.strip_prefix(&series)?.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn a_gateway_known_by_host_name_is_served_at_the_addresses_dns_gives_and_keeps_them_when_dns_fails() {
    let dir = scratch("gateway-dns");
    mesh(&dir);
    let dns = Dns::start(&[(
        GATEWAY_NAME,
        Reply::A(vec![[100, 64, 0, 21].into(), [100, 64, 0, 22].into()], 1),
    )])
    .await;

    // The controller's parts, as `serve` wires them, with hickory asking our server.
    let resolver = resolve::resolver_of(&[dns.addr]).unwrap();
    let first = manifests::snapshot(&dir, &MeshConfig::default(), 1).unwrap();
    let (_source, upstream) = tokio::sync::watch::channel(Arc::new(first));
    let metrics = Metrics::new();
    let served = resolve::spawn(upstream, resolver, metrics.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let xds = listener.local_addr().unwrap();
    let server = XdsServer::with_metrics(served.clone(), metrics.clone());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AggregatedDiscoveryServiceServer::new(server))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    // network1's proxy reaches network2's four pods through both addresses, weight split.
    let (tx, mut rx) = subscribe(xds).await;
    until_endpoints(
        &tx,
        &mut rx,
        &["10.241.0.10:9080 w1", "100.64.0.21:15443 w2", "100.64.0.22:15443 w2"],
        Duration::from_secs(10),
    )
    .await;

    // The load balancer moves: the TTL (1 s, held to 5 s) runs out and the push follows.
    let moved = Instant::now();
    dns.set(GATEWAY_NAME, Reply::A(vec![[100, 64, 0, 23].into()], 1));
    let at = until_endpoints(
        &tx,
        &mut rx,
        &["10.241.0.10:9080 w1", "100.64.0.23:15443 w4"],
        resolve::MIN_TTL + Duration::from_secs(3),
    )
    .await;
    assert!(
        at - moved <= resolve::MIN_TTL + Duration::from_secs(1),
        "followed after {:?}",
        at - moved
    );

    // DNS fails: counted, and the last addresses stay, also for a proxy that connects now.
    dns.set(GATEWAY_NAME, Reply::ServFail);
    support::until_true(
        "the failure was never counted",
        resolve::MIN_TTL + Duration::from_secs(5),
        || failures(&metrics) > 0,
    )
    .await;
    let (tx2, mut rx2) = subscribe(xds).await;
    until_endpoints(
        &tx2,
        &mut rx2,
        &["10.241.0.10:9080 w1", "100.64.0.23:15443 w4"],
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(
        served.borrow().resolved.get(GATEWAY_NAME).map(Vec::len),
        Some(1),
        "still the last answer"
    );

    // DNS answers again: retried after a short backoff, not at the next TTL.
    dns.set(GATEWAY_NAME, Reply::A(vec![[100, 64, 0, 24].into()], 1));
    let asked = dns.asked(GATEWAY_NAME);
    until_endpoints(
        &tx,
        &mut rx,
        &["10.241.0.10:9080 w1", "100.64.0.24:15443 w4"],
        Duration::from_secs(10),
    )
    .await;
    assert!(dns.asked(GATEWAY_NAME) > asked);
    std::fs::remove_dir_all(&dir).unwrap();
}
