//! The contract of docs/l7-xds.md from both ends: the `virtualInbound` listener this
//! controller serves for Istio's security config is one our sidecar compiles (it
//! refuses a whole LDS update it cannot enforce), with the mTLS modes the
//! PeerAuthentications say.

mod support;

use std::path::Path;
use std::sync::Arc;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use federation_controller::model::{ClusterModel, MeshConfig};
use federation_controller::objects::ClusterObjects;
use federation_controller::xds::{CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ProxyView, Snapshot};
use mesh_vocab::ClusterId;
use prost::Message;
use sidecar::app_http::AppHttp;
use sidecar::cluster::UpstreamHttp;
use sidecar::destinations::Destinations;
use sidecar::peer_authentication::MtlsMode;
use sidecar::virtual_inbound::InboundPolicy;

/// The resources of `type_url` served to the sidecar of httpbin (its service's ports
/// named, numbered and targeted as `ports`) under `policies`.
async fn served<M: Message + Default>(ports: &[(&str, u16, u16)], policies: &str, type_url: &str) -> Vec<M> {
    let mut o = ClusterObjects::default();
    let workload = support::httpbin_yaml("default", "10.96.0.20", "10.241.0.20", ports);
    o.add_yaml(Path::new("c1/workload.yaml"), &workload).unwrap();
    if !policies.is_empty() {
        o.add_yaml(Path::new("c1/policies.yaml"), policies).unwrap();
    }
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
    snap.encoded(&ProxyView::of(&node), type_url)
        .await
        .iter()
        .map(|e| M::decode(e.resource.value.as_slice()).unwrap())
        .collect()
}

/// What the sidecar of httpbin makes of the listener served for `policies`.
async fn sidecar_view(policies: &str) -> InboundPolicy {
    let ports = [("http", 8000, 80), ("tcp-db", 5432, 5432)];
    let listeners: Vec<Listener> = served(&ports, policies, LISTENER_TYPE).await;
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

/// The clusters served to httpbin's sidecar, whose service has a gRPC, an HTTP and a TCP
/// port: our sidecar takes the whole update (it refuses one it cannot use), and reads from
/// the inbound clusters that the gRPC port's application takes HTTP/2 only, the others not.
#[tokio::test]
async fn the_sidecar_reads_which_http_its_application_takes_from_our_inbound_clusters() {
    let ports = [("grpc", 7070, 7000), ("http-web", 8000, 80), ("tcp-db", 5432, 5432)];
    let clusters: Vec<Cluster> = served(&ports, "", CLUSTER_TYPE).await;
    let names: Vec<&str> = clusters.iter().map(|c| c.name.as_str()).collect();
    for port in [7000, 80, 5432] {
        assert!(names.contains(&format!("inbound|{port}||").as_str()), "{names:?}");
    }
    assert!(names.contains(&"InboundPassthroughCluster"), "{names:?}");
    let table = Destinations::build(&[], &clusters, &Default::default())
        .unwrap_or_else(|e| panic!("the sidecar refuses our clusters: {e:?}"));
    assert!(
        table
            .upstreams
            .contains_key("outbound|7070||httpbin.default.svc.cluster.local")
    );
    assert!(
        !table.upstreams.keys().any(|k| k.starts_with("inbound|")),
        "not upstreams"
    );
    let app = AppHttp::from_clusters(&clusters).unwrap().expect("inbound clusters");
    assert!(app.http2(7000), "gRPC");
    assert!(!app.http2(80), "HTTP");
    assert!(!app.http2(5432), "TCP");
    // The gRPC port's outbound cluster speaks HTTP/2 too, also to endpoints outside the mesh.
    assert_eq!(
        table.upstreams["outbound|7070||httpbin.default.svc.cluster.local"].http,
        UpstreamHttp::Http2
    );
    assert_eq!(
        table.upstreams["outbound|8000||httpbin.default.svc.cluster.local"].http,
        UpstreamHttp::Downstream
    );
}

/// A DestinationRule's `tls.mode` as our sidecar carries it out for httpbin's endpoint (a
/// pod labelled `tlsMode: istio`): auto mTLS without one, plaintext under DISABLE, mTLS
/// under ISTIO_MUTUAL (to every endpoint, labelled or not).
#[tokio::test]
async fn the_sidecar_speaks_the_tls_a_destination_rule_says() {
    let ports = [("http", 8000, 80)];
    let cluster = "outbound|8000||httpbin.default.svc.cluster.local";
    let rule = |mode: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: httpbin, namespace: default}}\n\
             spec: {{host: httpbin, trafficPolicy: {{tls: {{mode: {mode}}}}}}}\n"
        )
    };
    for (policies, mtls) in [
        (String::new(), true),
        (rule("DISABLE"), false),
        (rule("ISTIO_MUTUAL"), true),
    ] {
        let clusters: Vec<Cluster> = served(&ports, &policies, CLUSTER_TYPE).await;
        let assignments: Vec<ClusterLoadAssignment> = served(&ports, &policies, ENDPOINT_TYPE).await;
        let assignments = assignments.into_iter().map(|a| (a.cluster_name.clone(), a)).collect();
        let table = Destinations::build(&[], &clusters, &assignments)
            .unwrap_or_else(|e| panic!("the sidecar refuses our clusters: {e:?}"));
        let endpoints = &table.upstreams[cluster].endpoints;
        assert_eq!(endpoints.len(), 1);
        assert_eq!(endpoints[0].mtls, mtls, "{policies}");
    }
}
