//! `federation-controller serve` over a real gRPC ADS stream: an Istio-style
//! node on network1 gets its clusters and endpoints, ACKs them, receives pushes
//! when the manifests change, and a NACK causes no resend; it gets a listener
//! per service VIP:port, and clusters that verify the service's identities.

mod support;

use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::{Node, address, socket_address};
use envoy_types::pb::envoy::config::endpoint::v3::{ClusterLoadAssignment, lb_endpoint};
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use envoy_types::pb::google::rpc::Status;
use prost::Message;
use support::{Controller, cluster, cluster_with_ips, scratch, two_networks};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
const EDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
const LDS: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
const REVIEWS: &str = "outbound|9080||reviews.default.svc.cluster.local";
/// The routes of reviews' `http` port, which its listeners name.
const REVIEWS_ROUTES: &str = "rds:reviews.default.svc.cluster.local:9080";
/// The same for ratings.
const RATINGS_ROUTES: &str = "rds:ratings.default.svc.cluster.local:9080";

/// Istio's sidecar node: ID form and metadata keys.
fn node() -> Node {
    node_in("network1", Some("cluster1"))
}

/// An Istio sidecar node on `network`, in `cluster` (None: a node that names none).
fn node_in(network: &str, cluster: Option<&str>) -> Node {
    let s = |v: &str| Value {
        kind: Some(Kind::StringValue(v.into())),
    };
    let mut fields: std::collections::BTreeMap<String, Value> = [("NETWORK".to_owned(), s(network))].into();
    if let Some(c) = cluster {
        fields.insert("CLUSTER_ID".to_owned(), s(c));
    }
    Node {
        id: "sidecar~10.241.0.20~productpage-1.default~default.svc.cluster.local".into(),
        cluster: "productpage.default".into(),
        metadata: Some(Struct {
            fields: fields.into_iter().collect(),
        }),
        ..Default::default()
    }
}

/// An ADS stream to `controller` as the Istio node, its CDS request already sent.
async fn open_stream(controller: &Controller) -> (mpsc::Sender<DiscoveryRequest>, tonic::Streaming<DiscoveryResponse>) {
    open_stream_as(controller, node(), CDS).await
}

/// An ADS stream to `controller` as `node`, its first request (for `type_url`) already sent.
async fn open_stream_as(
    controller: &Controller,
    node: Node,
    type_url: &str,
) -> (mpsc::Sender<DiscoveryRequest>, tonic::Streaming<DiscoveryResponse>) {
    let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{}", controller.xds))
        .await
        .unwrap();
    let (tx, rx) = mpsc::channel(8);
    let responses = client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tx.send(DiscoveryRequest {
        node: Some(node),
        type_url: type_url.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    (tx, responses)
}

async fn next(rx: &mut tonic::Streaming<DiscoveryResponse>) -> DiscoveryResponse {
    tokio::time::timeout(Duration::from_secs(10), rx.message())
        .await
        .expect("a response in time")
        .unwrap()
        .unwrap()
}

/// The next response of `type_url`, the others on the way ACKed.
async fn next_of(
    tx: &mpsc::Sender<DiscoveryRequest>,
    rx: &mut tonic::Streaming<DiscoveryResponse>,
    type_url: &str,
) -> DiscoveryResponse {
    loop {
        let r = next(rx).await;
        if r.type_url == type_url {
            return r;
        }
        tx.send(ack(&r, &[])).await.unwrap();
    }
}

fn endpoints(resp: &DiscoveryResponse) -> Vec<String> {
    let cla = ClusterLoadAssignment::decode(resp.resources[0].value.as_slice()).unwrap();
    assert_eq!(cla.cluster_name, REVIEWS);
    let mut out = Vec::new();
    for l in &cla.endpoints {
        for e in &l.lb_endpoints {
            let Some(lb_endpoint::HostIdentifier::Endpoint(ep)) = &e.host_identifier else {
                panic!()
            };
            let Some(address::Address::SocketAddress(sa)) = ep.address.as_ref().unwrap().address.as_ref() else {
                panic!()
            };
            let Some(socket_address::PortSpecifier::PortValue(port)) = sa.port_specifier else {
                panic!()
            };
            out.push(format!(
                "{}:{} w{}",
                sa.address,
                port,
                e.load_balancing_weight.unwrap().value
            ));
        }
    }
    out.sort();
    out
}

fn ack(resp: &DiscoveryResponse, names: &[&str]) -> DiscoveryRequest {
    DiscoveryRequest {
        version_info: resp.version_info.clone(),
        response_nonce: resp.nonce.clone(),
        type_url: resp.type_url.clone(),
        resource_names: names.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

#[tokio::test]
async fn an_istio_node_gets_its_network_view_acks_receives_pushes_and_a_nack_causes_no_resend() {
    let dir = scratch("xds");
    two_networks(&dir);
    let controller = Controller::serve(&dir);

    let (tx, mut responses) = open_stream(&controller).await;

    let cds = next(&mut responses).await;
    assert_eq!(cds.type_url, CDS);
    let clusters: Vec<String> = cds
        .resources
        .iter()
        .map(|r| Cluster::decode(r.value.as_slice()).unwrap().name)
        .collect();
    // A sidecar's own inbound passthrough (its pod is unknown here: no port's cluster).
    assert_eq!(clusters, ["InboundPassthroughCluster", REVIEWS]);
    tx.send(ack(&cds, &[])).await.unwrap();

    tx.send(DiscoveryRequest {
        type_url: EDS.into(),
        resource_names: vec![REVIEWS.into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let eds = next(&mut responses).await;
    // Its own network's pod directly; network2's two pods behind its gateway, weight 2.
    assert_eq!(endpoints(&eds), ["10.241.0.10:9080 w1", "100.64.0.2:15443 w2"]);
    tx.send(ack(&eds, &[REVIEWS])).await.unwrap();

    // A third pod in cluster2: the endpoints are pushed at a new version (the clusters
    // only if they changed: here their identities did not).
    cluster(
        &dir,
        "cluster2",
        "network2",
        2,
        &[("a", "v1", true), ("b", "v2", true), ("c", "v2", true)],
    );
    let pushed = next_of(&tx, &mut responses, EDS).await;
    assert!(pushed.version_info.parse::<u64>().unwrap() > eds.version_info.parse::<u64>().unwrap());
    assert_eq!(endpoints(&pushed), ["10.241.0.10:9080 w1", "100.64.0.2:15443 w3"]);

    // NACK it: the server must not resend; the next thing on the stream is the next change.
    let nack = DiscoveryRequest {
        error_detail: Some(Status {
            code: 3,
            message: "rejected for the test".into(),
            details: vec![],
        }),
        ..ack(&eds, &[REVIEWS])
    };
    tx.send(DiscoveryRequest {
        response_nonce: pushed.nonce.clone(),
        version_info: eds.version_info.clone(),
        ..nack
    })
    .await
    .unwrap();
    cluster(&dir, "cluster2", "network2", 2, &[("a", "v1", true)]);
    // The first endpoints after the NACK are the new change's, not the NACKed ones again.
    let eds_after = next_of(&tx, &mut responses, EDS).await;
    assert!(
        eds_after.version_info.parse::<u64>().unwrap() > pushed.version_info.parse::<u64>().unwrap(),
        "no resend of the NACKed version"
    );
    assert_eq!(endpoints(&eds_after), ["10.241.0.10:9080 w1", "100.64.0.2:15443 w1"]);
    tx.send(ack(&eds_after, &[REVIEWS])).await.unwrap();

    // Another service account behind the same endpoint: the clusters change (whom they
    // verify), the endpoints do not, yet they follow the clusters, as Envoy warms a
    // changed cluster until it is sent its endpoints.
    cluster(&dir, "cluster2", "network2", 2, &[("a", "v3", true)]);
    let clusters_again = next(&mut responses).await;
    assert_eq!(clusters_again.type_url, CDS, "the clusters first");
    assert!(sans(&clusters_again).contains(&"spiffe://cluster.local/ns/default/sa/reviews-v3".to_owned()));
    let endpoints_again = next(&mut responses).await;
    assert_eq!(endpoints_again.type_url, EDS, "then their endpoints, unchanged");
    assert_eq!(
        endpoints(&endpoints_again),
        ["10.241.0.10:9080 w1", "100.64.0.2:15443 w1"]
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn sigterm_stops_the_controller_even_with_streams_open() {
    let dir = scratch("sigterm");
    cluster(&dir, "cluster1", "network1", 1, &[("reviews-v1-a", "v1", true)]);
    let mut controller = Controller::serve(&dir);
    let (tx, mut responses) = open_stream(&controller).await;
    next(&mut responses).await;
    // The open stream must not keep the controller from stopping.
    let status = tokio::task::spawn_blocking(move || controller.terminate(Duration::from_secs(10)))
        .await
        .unwrap();
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    drop(tx);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The virtual outbound listeners of an LDS response: "name address:port -> cluster"
/// (a sidecar's virtualInbound is tests/inbound_xds.rs's and envoy.rs's).
fn listeners(resp: &DiscoveryResponse) -> Vec<String> {
    assert_eq!(resp.type_url, LDS);
    let mut out: Vec<String> = resp.resources.iter().filter_map(listener).collect();
    out.sort();
    out
}

/// One virtual outbound listener: "name address:port -> cluster" for TCP, "-> rds:ROUTES"
/// for HTTP; None for the inbound one.
fn listener(r: &envoy_types::pb::google::protobuf::Any) -> Option<String> {
    use envoy_types::pb::envoy::config::listener::v3::{Listener, filter};
    use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
        HttpConnectionManager, http_connection_manager::RouteSpecifier,
    };
    use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{TcpProxy, tcp_proxy};
    let l = Listener::decode(r.value.as_slice()).unwrap();
    if l.name == "virtualInbound" {
        return None;
    }
    let Some(address::Address::SocketAddress(sa)) = l.address.unwrap().address else {
        panic!("a socket address")
    };
    let Some(socket_address::PortSpecifier::PortValue(port)) = sa.port_specifier else {
        panic!("a port")
    };
    assert_eq!(l.bind_to_port.map(|b| b.value), Some(false), "{}: virtual", l.name);
    let Some(filter::ConfigType::TypedConfig(cfg)) = &l.filter_chains[0].filters[0].config_type else {
        panic!("a typed filter config")
    };
    let c = if l.filter_chains[0].filters[0].name == "envoy.filters.network.http_connection_manager" {
        let hcm = HttpConnectionManager::decode(cfg.value.as_slice()).unwrap();
        let Some(RouteSpecifier::Rds(rds)) = hcm.route_specifier else {
            panic!("routes over RDS")
        };
        format!("rds:{}", rds.route_config_name)
    } else {
        let tcp = TcpProxy::decode(cfg.value.as_slice()).unwrap();
        let Some(tcp_proxy::ClusterSpecifier::Cluster(c)) = tcp.cluster_specifier else {
            panic!("a cluster")
        };
        c
    };
    Some(format!("{} {}:{} -> {c}", l.name, sa.address, port))
}

/// The URI SANs the first outbound cluster of a CDS response verifies its servers against.
fn sans(resp: &DiscoveryResponse) -> Vec<String> {
    use envoy_types::pb::envoy::config::core::v3::transport_socket::ConfigType;
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::UpstreamTlsContext;
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::common_tls_context::ValidationContextType;
    use envoy_types::pb::envoy::r#type::matcher::v3::string_matcher::MatchPattern;
    let c = resp
        .resources
        .iter()
        .map(|r| Cluster::decode(r.value.as_slice()).unwrap())
        .find(|c| c.name.starts_with("outbound|"))
        .expect("an outbound cluster");
    let tls = c
        .transport_socket_matches
        .iter()
        .find(|m| m.name == "tlsMode-istio")
        .expect("an mTLS transport socket");
    let Some(ConfigType::TypedConfig(cfg)) = &tls.transport_socket.as_ref().unwrap().config_type else {
        panic!()
    };
    let ctx = UpstreamTlsContext::decode(cfg.value.as_slice()).unwrap();
    let Some(ValidationContextType::CombinedValidationContext(v)) =
        ctx.common_tls_context.unwrap().validation_context_type
    else {
        panic!("a combined validation context")
    };
    v.default_validation_context
        .unwrap()
        .match_typed_subject_alt_names
        .into_iter()
        .map(|m| match m.matcher.unwrap().match_pattern {
            Some(MatchPattern::Exact(e)) => e,
            other => panic!("{other:?}"),
        })
        .collect()
}

#[tokio::test]
async fn an_istio_node_gets_a_listener_per_service_vip_and_follows_a_new_cluster_ip() {
    let dir = scratch("lds");
    two_networks(&dir);
    let controller = Controller::serve(&dir);
    let (tx, mut responses) = open_stream(&controller).await;

    // The clusters verify every service account behind reviews, in both clusters.
    let cds = next(&mut responses).await;
    assert_eq!(
        sans(&cds),
        [
            "spiffe://cluster.local/ns/default/sa/reviews-v1",
            "spiffe://cluster.local/ns/default/sa/reviews-v2",
        ]
    );
    tx.send(ack(&cds, &[])).await.unwrap();

    tx.send(DiscoveryRequest {
        type_url: LDS.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let lds = next(&mut responses).await;
    // reviews at its own cluster's ClusterIP; cluster2's ClusterIP for it means
    // nothing in cluster1.
    assert_eq!(
        listeners(&lds),
        [format!("10.96.1.12_9080 10.96.1.12:9080 -> {REVIEWS_ROUTES}")]
    );
    tx.send(ack(&lds, &[])).await.unwrap();

    // reviews gains a second ClusterIP (dual stack) in cluster1: pushed.
    cluster_with_ips(
        &dir,
        "cluster1",
        "network1",
        1,
        &[("reviews-v1-a", "v1", true)],
        &["10.96.1.12", "fd00:1::12"],
    );
    let pushed = next_of(&tx, &mut responses, LDS).await;
    assert!(pushed.version_info.parse::<u64>().unwrap() > lds.version_info.parse::<u64>().unwrap());
    assert_eq!(
        listeners(&pushed),
        [
            format!("10.96.1.12_9080 10.96.1.12:9080 -> {REVIEWS_ROUTES}"),
            format!("fd00:1::12_9080 fd00:1::12:9080 -> {REVIEWS_ROUTES}"),
        ]
    );
    tx.send(ack(&pushed, &[])).await.unwrap();
    assert_eq!(
        controller.metric("pilot_conflict_outbound_listener_tcp_over_current_tcp", &[]),
        Some(0.0)
    );

    // Another host on reviews' address in cluster1 itself: one host is kept, the
    // same every time, and the conflict is counted.
    support::write(
        dir.join("cluster1/tracing.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: tracing, namespace: default}\n\
         spec: {clusterIP: 10.96.1.12, ports: [{port: 9080}]}\n",
    )
    .unwrap();
    support::until_true("the conflict was never counted", Duration::from_secs(10), || {
        controller.metric("pilot_conflict_outbound_listener_tcp_over_current_tcp", &[]) == Some(1.0)
    })
    .await;
    // The listeners did not change, so the proxy is sent none; one connecting now is
    // sent the same.
    let after = first_listeners(&controller, node()).await;
    assert!(
        after.contains(&format!("10.96.1.12_9080 10.96.1.12:9080 -> {REVIEWS_ROUTES}")),
        "the smaller host name keeps the address: {after:?}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

async fn next_delta(
    rx: &mut tonic::Streaming<envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryResponse>,
) -> envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryResponse {
    tokio::time::timeout(Duration::from_secs(10), rx.message())
        .await
        .expect("a response in time")
        .unwrap()
        .unwrap()
}

#[tokio::test]
async fn delta_lds_is_a_wildcard_and_names_a_withdrawn_cluster_ip() {
    use envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest;
    let dir = scratch("delta-lds");
    two_networks(&dir);
    let controller = Controller::serve(&dir);
    let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{}", controller.xds))
        .await
        .unwrap();
    let (tx, rx) = mpsc::channel(8);
    let mut responses = client
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    // Naming nothing on the first request subscribes to every listener, as for clusters.
    tx.send(DeltaDiscoveryRequest {
        node: Some(node()),
        type_url: LDS.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let first = next_delta(&mut responses).await;
    let mut names: Vec<&str> = first.resources.iter().map(|r| r.name.as_str()).collect();
    names.sort();
    assert_eq!(
        names,
        ["10.96.1.12_9080", "virtualInbound"],
        "its own cluster's VIP for reviews, and its inbound listener"
    );
    tx.send(DeltaDiscoveryRequest {
        type_url: LDS.into(),
        response_nonce: first.nonce.clone(),
        ..Default::default()
    })
    .await
    .unwrap();

    // cluster1's reviews turns headless: its listener is withdrawn, by name, and
    // reviews, no longer with a VIP in cluster1, is reached at cluster2's.
    cluster_with_ips(&dir, "cluster1", "network1", 1, &[("reviews-v1-a", "v1", true)], &[]);
    let removal = next_delta(&mut responses).await;
    assert_eq!(removal.type_url, LDS);
    assert_eq!(removal.removed_resources, ["10.96.1.12_9080"]);
    let added: Vec<String> = removal
        .resources
        .iter()
        .filter_map(|r| listener(r.resource.as_ref().unwrap()))
        .collect();
    assert_eq!(added, [format!("10.96.2.12_9080 10.96.2.12:9080 -> {REVIEWS_ROUTES}")]);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Two clusters allocating from one service range: cluster1's `reviews` and
/// cluster2's `ratings` both have ClusterIP 10.96.0.10 (cluster2's reviews is on
/// 10.96.2.12).
fn shared_service_range(dir: &std::path::Path) {
    cluster_with_ips(
        dir,
        "cluster1",
        "network1",
        1,
        &[("reviews-v1-a", "v1", true)],
        &["10.96.0.10"],
    );
    cluster(dir, "cluster2", "network2", 2, &[("reviews-v1-b", "v1", true)]);
    support::write(
        dir.join("cluster2/ratings.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: ratings, namespace: default}\n\
         spec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 9080}]}\n",
    )
    .unwrap();
}

/// The listeners `node` is sent first over state of the world.
async fn first_listeners(controller: &Controller, node: Node) -> Vec<String> {
    let (_tx, mut responses) = open_stream_as(controller, node, LDS).await;
    listeners(&next(&mut responses).await)
}

#[tokio::test]
async fn clusters_sharing_a_service_range_each_send_a_vip_to_their_own_service() {
    let dir = scratch("shared-cidr");
    shared_service_range(&dir);
    let controller = Controller::serve(&dir);
    assert_eq!(
        first_listeners(&controller, node_in("network1", Some("cluster1"))).await,
        [format!("10.96.0.10_9080 10.96.0.10:9080 -> {REVIEWS_ROUTES}")],
        "cluster1's 10.96.0.10 is its reviews; cluster2's meaning of it is not lent"
    );
    assert_eq!(
        first_listeners(&controller, node_in("network2", Some("cluster2"))).await,
        [
            format!("10.96.0.10_9080 10.96.0.10:9080 -> {RATINGS_ROUTES}"),
            format!("10.96.2.12_9080 10.96.2.12:9080 -> {REVIEWS_ROUTES}"),
        ]
    );
    // A node that names no cluster keeps the merged table: one host per
    // address, the smaller name — for cluster1's pods, the wrong service.
    assert_eq!(
        first_listeners(&controller, node_in("network1", None)).await,
        [
            format!("10.96.0.10_9080 10.96.0.10:9080 -> {RATINGS_ROUTES}"),
            format!("10.96.2.12_9080 10.96.2.12:9080 -> {REVIEWS_ROUTES}"),
        ]
    );
    // Nothing clashes within a cluster's view.
    assert_eq!(
        controller.metric("pilot_conflict_outbound_listener_tcp_over_current_tcp", &[]),
        Some(0.0)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn delta_clients_of_clusters_sharing_a_service_range_follow_their_own_cluster() {
    use envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest;
    let dir = scratch("shared-cidr-delta");
    shared_service_range(&dir);
    let controller = Controller::serve(&dir);
    let mut streams = Vec::new();
    for (network, cluster) in [("network1", "cluster1"), ("network2", "cluster2")] {
        let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{}", controller.xds))
            .await
            .unwrap();
        let (tx, rx) = mpsc::channel(8);
        let responses = client
            .delta_aggregated_resources(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        tx.send(DeltaDiscoveryRequest {
            node: Some(node_in(network, Some(cluster))),
            type_url: LDS.into(),
            ..Default::default()
        })
        .await
        .unwrap();
        streams.push((tx, responses));
    }
    let mut got = Vec::new();
    for (tx, responses) in &mut streams {
        let first = next_delta(responses).await;
        let mut l: Vec<String> = first
            .resources
            .iter()
            .filter_map(|r| listener(r.resource.as_ref().unwrap()))
            .collect();
        l.sort();
        got.push(l);
        tx.send(DeltaDiscoveryRequest {
            type_url: LDS.into(),
            response_nonce: first.nonce.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    assert_eq!(
        got,
        [
            vec![format!("10.96.0.10_9080 10.96.0.10:9080 -> {REVIEWS_ROUTES}")],
            vec![
                format!("10.96.0.10_9080 10.96.0.10:9080 -> {RATINGS_ROUTES}"),
                format!("10.96.2.12_9080 10.96.2.12:9080 -> {REVIEWS_ROUTES}"),
            ],
        ]
    );

    // cluster1's reviews moves to another address: cluster1's proxy gets its new
    // listener, and 10.96.0.10, free in cluster1 now, changes hands in place: it
    // is ratings', which cluster1 lacks.
    cluster_with_ips(
        &dir,
        "cluster1",
        "network1",
        1,
        &[("reviews-v1-a", "v1", true)],
        &["10.96.1.12"],
    );
    let change = next_delta(&mut streams[0].1).await;
    let mut changed: Vec<String> = change
        .resources
        .iter()
        .filter_map(|r| listener(r.resource.as_ref().unwrap()))
        .collect();
    changed.sort();
    assert_eq!(
        (changed, change.removed_resources.clone()),
        (
            vec![
                format!("10.96.0.10_9080 10.96.0.10:9080 -> {RATINGS_ROUTES}"),
                format!("10.96.1.12_9080 10.96.1.12:9080 -> {REVIEWS_ROUTES}"),
            ],
            vec![]
        ),
        "10.96.0.10 is free in cluster1 now: ratings, which cluster1 lacks, is reached there"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
