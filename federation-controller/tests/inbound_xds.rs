//! Each sidecar is served the inbound listener of its own workload, picked by
//! its node's NAMESPACE and LABELS (or, without LABELS, by the pod at its
//! address), while proxies with the same workload share one encoding and the
//! outbound listeners stay the same for all.

mod support;

use std::path::Path;
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::listener::v3::{Listener, filter};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, http_filter,
};
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use federation_controller::model::{ClusterModel, MeshConfig};
use federation_controller::objects::ClusterObjects;
use federation_controller::xds::{LISTENER_TYPE, ProxyView, Snapshot};
use mesh_vocab::ClusterId;
use prost::Message;

const POLICIES: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: httpbin-get-only, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  rules: [{to: [{operation: {methods: [GET]}}]}]
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
"#;

fn snapshot() -> Snapshot {
    let mut o = ClusterObjects::default();
    let workload = support::httpbin_yaml("foo", "10.96.0.20", "10.241.0.20", &[("http", 8000, 80)]);
    o.add_yaml(Path::new("c1/workload.yaml"), &workload).unwrap();
    o.add_yaml(Path::new("c1/policies.yaml"), POLICIES).unwrap();
    let id = ClusterId::new("c1");
    let model = ClusterModel::build(&id, &o, &MeshConfig::default());
    Snapshot::new(
        1,
        std::time::Instant::now(),
        vec![(Arc::new(model), false)],
        MeshConfig::default(),
    )
}

fn node(id: &str, labels: Option<&[(&str, &str)]>) -> Node {
    let s = |v: &str| Value {
        kind: Some(Kind::StringValue(v.into())),
    };
    let mut fields =
        std::collections::HashMap::from([("NAMESPACE".to_owned(), s("foo")), ("CLUSTER_ID".to_owned(), s("c1"))]);
    if let Some(labels) = labels {
        let labels = labels.iter().map(|(k, v)| ((*k).to_owned(), s(v))).collect();
        fields.insert(
            "LABELS".into(),
            Value {
                kind: Some(Kind::StructValue(Struct { fields: labels })),
            },
        );
    }
    Node {
        id: id.into(),
        metadata: Some(Struct { fields }),
        ..Default::default()
    }
}

/// The listeners `node` is served: the names, and its virtualInbound.
async fn listeners(snap: &Snapshot, node: &Node) -> (Vec<String>, Option<Listener>) {
    let set = snap.encoded(&ProxyView::of(node), LISTENER_TYPE).await;
    let names = set.iter().map(|e| e.name.clone()).collect();
    let inbound = set
        .iter()
        .find(|e| e.name == "virtualInbound")
        .map(|e| Listener::decode(e.resource.value.as_slice()).unwrap());
    (names, inbound)
}

/// The HTTP filters on the chain of `port` and transport.
fn http_filters(l: &Listener, port: u32, transport: &str) -> Option<Vec<String>> {
    let chain = l.filter_chains.iter().find(|c| {
        let m = c.filter_chain_match.as_ref().unwrap();
        m.destination_port.map(|p| p.value) == Some(port) && m.transport_protocol == transport
    })?;
    let Some(filter::ConfigType::TypedConfig(cfg)) = &chain.filters[0].config_type else {
        panic!()
    };
    let hcm = HttpConnectionManager::decode(cfg.value.as_slice()).unwrap();
    Some(
        hcm.http_filters
            .into_iter()
            .map(|f| {
                assert!(matches!(f.config_type, Some(http_filter::ConfigType::TypedConfig(_))));
                f.name
            })
            .collect(),
    )
}

#[tokio::test]
async fn sidecars_get_their_own_workloads_inbound_listener() {
    let snap = snapshot();
    let httpbin = node(
        "sidecar~10.241.0.99~httpbin-2.foo~foo.svc.cluster.local",
        Some(&[("app", "httpbin")]),
    );
    let other = node(
        "sidecar~10.241.0.98~sleep-1.foo~foo.svc.cluster.local",
        Some(&[("app", "sleep")]),
    );
    let by_address = node("sidecar~10.241.0.20~httpbin-1.foo~foo.svc.cluster.local", None);
    let gateway = node(
        "router~10.241.0.97~gw.istio-system~istio-system.svc.cluster.local",
        None,
    );

    let (names, inbound) = listeners(&snap, &httpbin).await;
    assert_eq!(names, ["10.96.0.20_8000", "virtualInbound"], "outbound and inbound");
    let inbound = inbound.unwrap();
    // LABELS select the policy; the pod's ports are unknown at that address, so only the catch-all chains.
    assert_eq!(inbound.filter_chains.len(), 1, "STRICT: mTLS only");

    let (_, pod) = listeners(&snap, &by_address).await;
    let pod = pod.unwrap();
    assert_eq!(
        http_filters(&pod, 80, "tls"),
        Some(vec![
            "envoy.filters.http.rbac".to_owned(),
            "envoy.filters.http.router".to_owned()
        ]),
        "found by its address: the pod's labels and its HTTP port"
    );
    assert_eq!(http_filters(&pod, 80, "raw_buffer"), None, "STRICT mesh-wide");

    let (_, sleep) = listeners(&snap, &other).await;
    let sleep = sleep.unwrap();
    assert_ne!(
        sleep, inbound,
        "another workload, another listener, though on the same network and cluster"
    );
    let rbac_filters = sleep
        .filter_chains
        .iter()
        .flat_map(|c| &c.filters)
        .filter(|f| f.name.contains("rbac"))
        .count();
    assert_eq!(rbac_filters, 0, "the policy selects only httpbin");

    let (names, none) = listeners(&snap, &gateway).await;
    assert_eq!((names.len(), none), (1, None), "a gateway has no inbound listener");

    // A replica of httpbin (same namespace and labels) shares the encoding.
    let replica = node(
        "sidecar~10.241.0.96~httpbin-3.foo~foo.svc.cluster.local",
        Some(&[("app", "httpbin")]),
    );
    let a = snap.encoded(&ProxyView::of(&httpbin), LISTENER_TYPE).await;
    let b = snap.encoded(&ProxyView::of(&replica), LISTENER_TYPE).await;
    assert!(Arc::ptr_eq(&a, &b), "replicas share what was encoded");
}
