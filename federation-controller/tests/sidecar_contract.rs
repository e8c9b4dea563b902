//! The contract of docs/l7-xds.md from both ends: the `virtualInbound` listener this
//! controller serves for Istio's security config is one our sidecar compiles (it
//! refuses a whole LDS update it cannot enforce), with the mTLS modes the
//! PeerAuthentications say.

mod support;

use std::path::Path;
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use federation_controller::model::{ClusterModel, MeshConfig};
use federation_controller::objects::ClusterObjects;
use federation_controller::xds::{LISTENER_TYPE, ProxyView, Snapshot};
use mesh_vocab::ClusterId;
use prost::Message;
use sidecar::peer_authentication::MtlsMode;
use sidecar::virtual_inbound::InboundPolicy;

/// What the sidecar of httpbin makes of the listener served for `policies`.
async fn sidecar_view(policies: &str) -> InboundPolicy {
    let mut o = ClusterObjects::default();
    let workload = support::httpbin_yaml(
        "default",
        "10.96.0.20",
        "10.241.0.20",
        &[("http", 8000, 80), ("tcp-db", 5432, 5432)],
    );
    o.add_yaml(Path::new("c1/workload.yaml"), &workload).unwrap();
    o.add_yaml(Path::new("c1/policies.yaml"), policies).unwrap();
    assert!(o.refused.is_empty(), "{:?}", o.refused);
    let model = ClusterModel::build(&ClusterId::new("c1"), &o, &MeshConfig::default());
    let snap = Snapshot::new(
        1,
        std::time::Instant::now(),
        vec![(Arc::new(model), false)],
        MeshConfig::default(),
    );
    let s = |v: &str| Value {
        kind: Some(Kind::StringValue(v.into())),
    };
    let node = Node {
        id: "sidecar~10.241.0.20~httpbin-1.default~default.svc.cluster.local".into(),
        metadata: Some(Struct {
            fields: [
                ("NAMESPACE".to_owned(), s("default")),
                ("CLUSTER_ID".to_owned(), s("c1")),
            ]
            .into(),
        }),
        ..Default::default()
    };
    let listeners: Vec<Listener> = snap
        .encoded(&ProxyView::of(&node), LISTENER_TYPE)
        .await
        .iter()
        .map(|e| Listener::decode(e.resource.value.as_slice()).unwrap())
        .collect();
    InboundPolicy::from_listeners(&listeners)
        .unwrap_or_else(|e| panic!("the sidecar refuses our listener: {e}"))
        .expect("a virtualInbound listener")
}

fn examples(file: &str) -> String {
    let dir = std::env::var("ISTIO_EXAMPLES").unwrap_or_else(|_| "/work/shared/conformance/istio-examples".into());
    std::fs::read_to_string(Path::new(&dir).join(file)).unwrap()
}

#[tokio::test]
async fn the_sidecar_compiles_our_listener_for_istios_policies() {
    // Istio's ALLOW and DENY testdata, a namespace's STRICT, a port's PERMISSIVE.
    let port_level = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: db, namespace: default}\n\
spec: {selector: {matchLabels: {app: httpbin}}, portLevelMtls: {'5432': {mode: PERMISSIVE}, '9000': {mode: DISABLE}}}\n";
    let strict = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: default}\nspec: {mtls: {mode: STRICT}}\n";
    let policies = [
        examples("testdata/integration-authz-a.yaml").as_str(),
        strict,
        port_level,
    ]
    .join("\n---\n");
    let p = sidecar_view(&policies).await;
    assert_eq!(p.mode_for(80), Some(MtlsMode::Strict), "the HTTP port");
    assert_eq!(p.mode_for(5432), Some(MtlsMode::Permissive), "portLevelMtls");
    assert_eq!(p.mode_for(9000), Some(MtlsMode::Disable), "portLevelMtls");
    assert_eq!(p.mode_for(9999), Some(MtlsMode::Strict), "any other port");

    // Istio's PERMISSIVE testdata, with principals, namespaces, IPs, hosts, ports and
    // conditions, and a federated trust domain's principal.
    let rich = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: rich, namespace: default}
spec:
  rules:
  - from: [{source: {principals: [other-domain/ns/x/sa/y, "cluster.local/ns/*"], notNamespaces: [evil], ipBlocks: [10.0.0.0/8], notRemoteIpBlocks: [1.2.3.4]}}]
    to: [{operation: {hosts: ["*.example.com"], methods: [GET], paths: ["/api/*"], notPorts: ["5432"]}}]
    when: [{key: "request.headers[x-user]", values: [bob]}, {key: destination.port, values: ["80"]}, {key: request.auth.principal, notValues: ["*"]}]
"#;
    let p = sidecar_view(&[examples("testdata/authn.yaml").as_str(), rich].join("\n---\n")).await;
    assert_eq!(p.mode_for(80), Some(MtlsMode::Permissive));
}
