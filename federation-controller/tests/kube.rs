//! The Kubernetes source against a test API server that speaks the real
//! list/watch protocol: initial sync, changes, `410 Gone` → relist, a dropped
//! watch → resume without relisting.

mod support;

use std::time::Duration;

use federation_controller::kube_source::{self, Update};
use federation_controller::model::{ClusterModel, MeshConfig};
use kube::config::{KubeConfigOptions, Kubeconfig};
use mesh_vocab::ClusterId;
use serde_json::json;
use support::kube_api::FakeApi;
use tokio::sync::mpsc;

fn slice(addresses: &[&str]) -> serde_json::Value {
    let endpoints: Vec<_> = addresses
        .iter()
        .map(|a| json!({"addresses": [a], "targetRef": {"kind": "Pod", "name": "reviews-1"}}))
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": "reviews-abc", "namespace": "default", "labels": {"kubernetes.io/service-name": "reviews"}},
           "addressType": "IPv4", "ports": [{"name": "http", "port": 9080}], "endpoints": endpoints})
}

/// Waits until the published state of the cluster has exactly these instance
/// addresses (a relist may publish the unchanged state first); returns its model.
async fn until_addresses(rx: &mut mpsc::Receiver<Update>, want: &[&str]) -> Option<ClusterModel> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let mut last: Vec<String> = Vec::new();
    let mut model = None;
    while last != want {
        let update = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("never published {want:?}; last {last:?}"))
            .unwrap();
        if let Update::Objects(id, objects) = update {
            let m = ClusterModel::build(&id, &objects, &MeshConfig::default());
            last = m.instances.iter().map(|i| i.address.to_string()).collect();
            model = Some(m);
        }
    }
    model
}

/// The kube source of cluster1, reading `api` through a kubeconfig, and its updates.
async fn watch_cluster1(api: &FakeApi) -> (tokio::task::JoinHandle<()>, mpsc::Receiver<Update>) {
    let kubeconfig = Kubeconfig::from_yaml(&api.kubeconfig()).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap();
    let client = kube::Client::try_from(config).unwrap();
    let (tx, rx) = mpsc::channel(16);
    let source = tokio::spawn(kube_source::run(ClusterId::new("cluster1"), client, tx));
    (source, rx)
}

#[tokio::test]
async fn lists_watches_relists_after_410_and_resumes_after_a_dropped_watch() {
    let api = FakeApi::start().await;
    api.apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}}));
    api.apply(
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "reviews", "namespace": "default"},
                     "spec": {"clusterIP": "10.96.0.12", "clusterIPs": ["10.96.0.12"], "ports": [{"name": "http", "port": 9080}]}}),
    );
    api.apply(
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "reviews-1", "namespace": "default"},
                     "spec": {"serviceAccountName": "bookinfo-reviews", "containers": [{"name": "app"}]}}),
    );
    api.apply(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"}}));
    api.apply(slice(&["10.241.0.1", "10.241.0.2"]));

    let (source, mut rx) = watch_cluster1(&api).await;

    // Initial sync: published once every kind is listed, ClusterIP and service account included.
    let m = until_addresses(&mut rx, &["10.241.0.1", "10.241.0.2"]).await.unwrap();
    let vips: Vec<String> = m
        .vips
        .iter()
        .map(|v| format!("{}:{} {}", v.vip, v.port, v.host))
        .collect();
    assert_eq!(vips, ["10.96.0.12:9080 reviews.default.svc.cluster.local"]);
    assert_eq!(m.instances[0].service_account.as_deref(), Some("bookinfo-reviews"));
    assert_eq!(api.counters().0, 5, "one list per kind");

    // A change arrives over the watch.
    api.apply(slice(&["10.241.0.1", "10.241.0.2", "10.241.0.3"]));
    until_addresses(&mut rx, &["10.241.0.1", "10.241.0.2", "10.241.0.3"]).await;
    let (lists, _, bookmarks) = api.counters();
    assert_eq!(lists, 5, "no relist for a change");
    assert!(bookmarks >= 1, "the watches asked for bookmarks and got them");

    // The server loses its history and cuts the watches: resuming is refused with
    // 410, so the watchers relist — and see the change made meanwhile.
    api.forget_history();
    api.drop_watches();
    api.apply(slice(&["10.241.0.9"]));
    until_addresses(&mut rx, &["10.241.0.9"]).await;
    let (lists, gone, _) = api.counters();
    assert!(gone >= 1, "a resume from a compacted version got 410");
    assert!(lists > 5, "410 made the watchers relist");

    // A watch dropped without compaction resumes from where it was: no relist.
    let lists_before = api.counters().0;
    api.drop_watches();
    api.delete("EndpointSlice", "default", "reviews-abc");
    until_addresses(&mut rx, &[]).await;
    assert_eq!(api.counters().0, lists_before, "a plain resume does not relist");
    source.abort();
}

#[tokio::test]
async fn serve_with_a_kubeconfig_serves_that_cluster_over_xds_and_follows_it() {
    use envoy_types::pb::envoy::config::core::v3::Node;
    use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
    use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
    use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
    use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
    use prost::Message;

    let api = FakeApi::start().await;
    api.apply(
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default",
                     "labels": {"topology.istio.io/network": "network1"}}}),
    );
    api.apply(
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "reviews", "namespace": "default"},
                     "spec": {"ports": [{"name": "http", "port": 9080}]}}),
    );
    api.apply(slice(&["10.241.0.1"]));
    let dir = support::scratch("kubeconfig");
    let kubeconfig = dir.join("cluster1.kubeconfig");
    support::write(&kubeconfig, api.kubeconfig()).unwrap();
    let controller = support::Controller::start(&["--kubeconfig", &format!("cluster1={}", kubeconfig.display())]);

    // Ready once the cluster has synced.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    while controller.status("/ready") != Some(200) {
        assert!(std::time::Instant::now() < deadline, "never ready");
        tick.tick().await;
    }

    let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{}", controller.xds))
        .await
        .unwrap();
    let (tx, rx) = mpsc::channel(8);
    let mut responses = client
        .stream_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let node = Node {
        id: "sidecar~10.241.0.20~productpage-1.default~default.svc.cluster.local".into(),
        metadata: Some(Struct {
            fields: [(
                "NETWORK".to_owned(),
                Value {
                    kind: Some(Kind::StringValue("network1".into())),
                },
            )]
            .into(),
        }),
        ..Default::default()
    };
    let reviews = "outbound|9080||reviews.default.svc.cluster.local";
    let eds = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
    tx.send(DiscoveryRequest {
        node: Some(node),
        type_url: eds.into(),
        resource_names: vec![reviews.into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let addresses = |r: &envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse| -> Vec<String> {
        use envoy_types::pb::envoy::config::core::v3::address;
        use envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier;
        let cla = ClusterLoadAssignment::decode(r.resources[0].value.as_slice()).unwrap();
        let mut out: Vec<String> = cla
            .endpoints
            .iter()
            .flat_map(|l| l.lb_endpoints.iter())
            .filter_map(|e| match &e.host_identifier {
                Some(HostIdentifier::Endpoint(ep)) => match ep.address.as_ref()?.address.as_ref()? {
                    address::Address::SocketAddress(sa) => Some(sa.address.clone()),
                    _ => None,
                },
                _ => None,
            })
            .collect();
        out.sort();
        out
    };
    let first = tokio::time::timeout(Duration::from_secs(10), responses.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(addresses(&first), ["10.241.0.1"]);

    // A change in the cluster reaches the proxy.
    tx.send(DiscoveryRequest {
        type_url: eds.into(),
        version_info: first.version_info.clone(),
        response_nonce: first.nonce.clone(),
        resource_names: vec![reviews.into()],
        ..Default::default()
    })
    .await
    .unwrap();
    api.apply(slice(&["10.241.0.1", "10.241.0.7"]));
    let pushed = tokio::time::timeout(Duration::from_secs(10), responses.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(addresses(&pushed), ["10.241.0.1", "10.241.0.7"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Istio's security kinds are watched like the rest: a cluster without Istio's
/// CRDs still syncs (it has no policies), and once they are installed the
/// watchers pick its policies up.
#[tokio::test]
async fn security_policies_are_watched_once_istios_crds_are_installed() {
    let api = FakeApi::start().await;
    api.apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}}));
    let (source, mut rx) = watch_cluster1(&api).await;
    let mut next_model = async || loop {
        let update = tokio::time::timeout(Duration::from_secs(15), rx.recv())
            .await
            .expect("an update")
            .unwrap();
        if let Update::Objects(id, objects) = update {
            return ClusterModel::build(&id, &objects, &MeshConfig::default());
        }
    };
    let first = next_model().await;
    assert_eq!(
        first.security,
        Default::default(),
        "no Istio CRDs: no policies, and synced"
    );

    api.install_crds();
    api.apply(
        json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "deny-post", "namespace": "default"},
        "spec": {"action": "DENY", "rules": [{"to": [{"operation": {"methods": ["POST"]}}]}]}}),
    );
    api.apply(
        json!({"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
        "metadata": {"name": "default", "namespace": "istio-system"}, "spec": {"mtls": {"mode": "STRICT"}}}),
    );
    let model = loop {
        let m = next_model().await;
        if m.security.authorization_policies.len() == 1 && m.security.peer_authentications.len() == 1 {
            break m;
        }
    };
    assert_eq!(model.security.authorization_policies[0].name, "deny-post");
    assert_eq!(model.security.peer_authentications[0].namespace, "istio-system");
    source.abort();
}

/// Istio's networking kinds come with CRDs: a cluster without them syncs (none of
/// these), as does one whose RBAC forbids one of them; once they are installed their
/// objects are watched, an invalid one refused with Istio's reason and the rest kept.
#[tokio::test]
async fn watches_istio_networking_config_once_its_crds_exist() {
    let api = FakeApi::start().await;
    // A role written before the controller read ServiceEntries.
    api.forbid("ServiceEntry");
    api.apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}}));
    api.apply(slice(&["10.241.0.1"]));
    let (source, mut rx) = watch_cluster1(&api).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let objects = loop {
        let update = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .expect("synced without the CRDs")
            .unwrap();
        if let Update::Objects(_, objects) = update {
            break objects;
        }
    };
    assert!(objects.virtual_services.is_empty() && objects.destination_rules.is_empty());

    api.install_crds();
    api.apply(json!({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
        "metadata": {"name": "reviews", "namespace": "default"},
        "spec": {"hosts": ["reviews"], "http": [{"route": [
            {"destination": {"host": "reviews", "subset": "v1"}, "weight": 80},
            {"destination": {"host": "reviews", "subset": "v2"}, "weight": 20}]}]}}));
    api.apply(
        json!({"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
        "metadata": {"name": "bad", "namespace": "default"},
        "spec": {"host": "reviews", "trafficPolicy": {"loadBalancer": {"warmup": {"minimumPercent": 5.0}}}}}),
    );
    api.apply(
        json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": "reviews", "namespace": "default"},
        "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "reviews"}],
            "rules": [{"backendRefs": [{"name": "reviews-v1", "port": 9080, "weight": 90},
                {"name": "reviews-v2", "port": 9080, "weight": 10}]}]}}),
    );
    api.apply(
        json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": "portless", "namespace": "default"},
        "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "reviews"}],
            "rules": [{"backendRefs": [{"name": "reviews-v1"}]}]}}),
    );
    api.apply(
        json!({"apiVersion": "gateway.networking.k8s.io/v1beta1", "kind": "ReferenceGrant",
        "metadata": {"name": "from-default", "namespace": "ratings"},
        "spec": {"from": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "namespace": "default"}],
            "to": [{"group": "", "kind": "Service"}]}}),
    );
    api.apply(
        json!({"apiVersion": "gateway.networking.k8s.io/v1beta1", "kind": "ReferenceGrant",
        "metadata": {"name": "kindless", "namespace": "ratings"},
        "spec": {"from": [{"group": "gateway.networking.k8s.io", "namespace": "default"}],
            "to": [{"group": "", "kind": "Service"}]}}),
    );
    api.apply(json!({"apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry",
        "metadata": {"name": "vm-1", "namespace": "default"},
        "spec": {"address": "10.2.0.1", "labels": {"app": "vm"}}}));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let update = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .expect("the VirtualService and the refused rule were published")
            .unwrap();
        let Update::Objects(_, objects) = update else { continue };
        if objects.virtual_services.is_empty()
            || objects.refused.len() < 3
            || objects.http_routes.is_empty()
            || objects.reference_grants.is_empty()
            || objects.workload_entries.is_empty()
        {
            continue;
        }
        assert_eq!(objects.http_routes[0].spec.rules[0].backend_refs[1].weight, Some(10));
        let grants: Vec<_> = objects
            .reference_grants
            .iter()
            .map(|g| g.metadata.name.as_deref())
            .collect();
        assert_eq!(grants, [Some("from-default")], "the invalid grant is left out");
        assert!(objects.reference_grants[0].lets_routes_reach("default", "ratings"));
        assert_eq!(objects.workload_entries[0].spec.address.as_deref(), Some("10.2.0.1"));
        let refused: Vec<String> = objects.refused.iter().map(ToString::to_string).collect();
        assert!(
            refused.contains(
                &"HTTPRoute default/portless refused: spec.rules[0].backendRefs[0]: Must have port for Service reference"
                    .to_owned()
            ),
            "{refused:?}"
        );
        assert_eq!(objects.virtual_services[0].spec.http[0].route[1].weight, Some(20));
        assert!(objects.destination_rules.is_empty(), "the invalid rule is left out");
        let refused = objects
            .refused
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n");
        assert!(
            refused.contains(
                "DestinationRule default/bad refused: spec.trafficPolicy.loadBalancer.warmup.duration: Required value"
            ),
            "{refused}"
        );
        assert!(
            refused.contains("ReferenceGrant ratings/kindless refused: spec.from[0].kind: Required value"),
            "{refused}"
        );
        break;
    }

    // A VM joins: a WorkloadEntry the reviews Service selects becomes one of its endpoints.
    api.apply(json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "reviews", "namespace": "default"},
        "spec": {"selector": {"app": "reviews"}, "ports": [{"name": "http", "port": 9080}]}}));
    api.apply(json!({"apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry",
        "metadata": {"name": "reviews-vm", "namespace": "default"},
        "spec": {"address": "10.9.0.1", "labels": {"app": "reviews"}, "serviceAccount": "reviews"}}));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let update = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .expect("the WorkloadEntry was published")
            .unwrap();
        let Update::Objects(id, objects) = update else { continue };
        let model = ClusterModel::build(&id, &objects, &MeshConfig::default());
        let vm: Vec<String> = model
            .instances
            .iter()
            .filter(|i| i.address.to_string() == "10.9.0.1")
            .map(|i| format!("{} {} mtls={}", i.service, i.target_port, i.mtls))
            .collect();
        if vm.is_empty() {
            continue;
        }
        assert_eq!(vm, ["reviews.default.svc.cluster.local:9080 9080 mtls=true"]);
        break;
    }
    source.abort();
}
