//! Write-back: the objects each cluster needs for the services other clusters export
//! (MCS `ServiceExport`), computed purely from every cluster's Services and exports, then
//! written by [`dir`] (manifest mode: a directory per cluster) or [`kube`] (each cluster's
//! API server, only while [`lease`] says this replica leads).
//!
//! For a Service `S` in namespace `N` exported from clusters `E` (a `ServiceExport` and a
//! Service both named `S` in `N`; an export without its Service exports nothing), every
//! cluster `C` with an exporter other than itself gets:
//! - an MCS `ServiceImport` `N/S` (`type: ClusterSetIP`, the exported ports), and
//! - an Istio `ServiceEntry` `N/isthmus-S-N` for `S.N.svc.<domain>` (`MESH_INTERNAL`,
//!   `STATIC`, the exported ports), **only if `C` has no Service `N/S` of its own**.
//!   With a local Service, namespace sameness already makes the host one service across
//!   clusters (federation merges the remote endpoints into it), and a ServiceEntry for a
//!   host a Kubernetes Service also defines gives Istio two definitions of one host, whose
//!   merge is undefined. Without a local Service, the ServiceEntry is what makes the host
//!   exist in `C` at all (Istio's registry, DNS capture); federation serves its endpoints,
//!   so it carries none.
//!
//! Where exporters disagree on ports, the union by (port, protocol) is taken, the first
//! cluster by name naming each port. A silent cluster keeps its exports (see
//! [`kube::tee`]); a cluster removed from the mesh, or one whose export or Service is
//! deleted, has its objects garbage-collected everywhere.
//!
//! The source clusters (`E` without `C`) are recorded as one label per cluster,
//! `source.isthmus.io/<cluster>: "true"`, so `kubectl get -l source.isthmus.io/cluster2`
//! selects what cluster2 feeds; a comma-joined list cannot be a label value (Kubernetes
//! refuses `,`), so the sorted, comma-joined list is the annotation
//! `isthmus.io/source-clusters`. Every object carries `app.kubernetes.io/managed-by:
//! isthmus`, which is what ownership means: an object of the same name without it is never
//! replaced nor deleted (it is counted as a conflict).

pub mod dir;
pub mod kube;
pub mod lease;

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{Service, ServicePort};
use mesh_vocab::ClusterId;
use serde_json::{Value, json};

use crate::objects::ClusterObjects;

/// The label that marks an object as ours.
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// Its value.
pub const ISTHMUS: &str = "isthmus";
/// Prefix of the per-source-cluster labels (`source.isthmus.io/<cluster>: "true"`).
pub const SOURCE_LABEL_PREFIX: &str = "source.isthmus.io/";
/// The sorted, comma-joined source clusters.
pub const SOURCE_ANNOTATION: &str = "isthmus.io/source-clusters";

/// The kinds written back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    ServiceEntry,
    ServiceImport,
}

impl Kind {
    pub const ALL: [Kind; 2] = [Kind::ServiceEntry, Kind::ServiceImport];

    pub fn kind(self) -> &'static str {
        match self {
            Kind::ServiceEntry => "ServiceEntry",
            Kind::ServiceImport => "ServiceImport",
        }
    }

    pub fn group(self) -> &'static str {
        match self {
            Kind::ServiceEntry => "networking.istio.io",
            Kind::ServiceImport => "multicluster.x-k8s.io",
        }
    }

    pub fn version(self) -> &'static str {
        match self {
            Kind::ServiceEntry => "v1",
            Kind::ServiceImport => "v1alpha1",
        }
    }

    pub fn plural(self) -> &'static str {
        match self {
            Kind::ServiceEntry => "serviceentries",
            Kind::ServiceImport => "serviceimports",
        }
    }

    pub fn api_version(self) -> String {
        format!("{}/{}", self.group(), self.version())
    }
}

/// One object a cluster needs.
#[derive(Debug, Clone, PartialEq)]
pub struct Object {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
    /// The whole object as it is written (apiVersion, kind, metadata, spec).
    pub body: Value,
}

/// The write-back's metrics.
#[derive(Clone)]
pub struct WritebackMetrics {
    /// 1 while this replica writes into clusters.
    pub leader: prometheus::IntGauge,
    conflicts: prometheus::IntCounterVec,
    writes: prometheus::IntCounterVec,
}

impl WritebackMetrics {
    /// The families, registered with `metrics`.
    pub fn new(metrics: &crate::metrics::Metrics) -> Self {
        let leader = prometheus::IntGauge::new(
            "isthmus_controller_leader",
            "1 while this replica holds the lease and writes into clusters",
        )
        .expect("valid metric");
        let conflicts = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "isthmus_controller_writeback_conflicts_total",
                "Objects not written back because one of the same name exists without our label",
            ),
            &["cluster", "kind"],
        )
        .expect("valid metric");
        let writes = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "isthmus_controller_writeback_writes_total",
                "Objects written back, by operation (create, replace, delete)",
            ),
            &["cluster", "kind", "op"],
        )
        .expect("valid metric");
        for c in [
            Box::new(leader.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(conflicts.clone()),
            Box::new(writes.clone()),
        ] {
            metrics.register(c).expect("unique metric");
        }
        Self {
            leader,
            conflicts,
            writes,
        }
    }

    /// Counts an object left alone because someone else owns its name.
    pub fn conflict(&self, cluster: &ClusterId, kind: Kind) {
        self.conflicts.with_label_values(&[cluster.as_str(), kind.kind()]).inc();
    }

    /// Counts a write (`op`: create, replace, delete).
    pub fn wrote(&self, cluster: &ClusterId, kind: Kind, op: &str) {
        self.writes
            .with_label_values(&[cluster.as_str(), kind.kind(), op])
            .inc();
    }
}

/// Whether an object's labels (`metadata.labels`) mark it as ours.
pub fn is_ours(object: &Value) -> bool {
    object["metadata"]["labels"][MANAGED_BY].as_str() == Some(ISTHMUS)
}

/// What every cluster needs, from what every cluster has: target cluster → its objects,
/// sorted by (kind, namespace, name). A cluster that needs nothing is absent.
pub fn desired(clusters: &BTreeMap<ClusterId, ClusterObjects>, domain: &str) -> BTreeMap<ClusterId, Vec<Object>> {
    // (namespace, name) → exporting cluster → its Service.
    let mut exported: BTreeMap<(String, String), BTreeMap<&ClusterId, &Service>> = BTreeMap::new();
    let mut local: BTreeMap<&ClusterId, BTreeSet<(String, String)>> = BTreeMap::new();
    for (id, objects) in clusters {
        let services: BTreeMap<(String, String), &Service> = objects
            .services
            .iter()
            .filter_map(|s| Some(((s.metadata.namespace.clone()?, s.metadata.name.clone()?), s)))
            .collect();
        for e in &objects.service_exports {
            let key = (
                e.metadata.namespace.clone().unwrap_or_default(),
                e.metadata.name.clone().unwrap_or_default(),
            );
            // MCS: an export without its Service exports nothing.
            if let Some(svc) = services.get(&key) {
                exported.entry(key).or_default().insert(id, svc);
            }
        }
        local.insert(id, services.into_keys().collect());
    }
    let mut out: BTreeMap<ClusterId, Vec<Object>> = BTreeMap::new();
    for ((ns, name), sources) in &exported {
        for target in clusters.keys() {
            let from: Vec<(&ClusterId, &Service)> = sources
                .iter()
                .filter(|(c, _)| **c != target)
                .map(|(c, s)| (*c, *s))
                .collect();
            if from.is_empty() {
                continue;
            }
            let ports = merged_ports(&from);
            let meta = |object_name: &str| metadata(ns, object_name, from.iter().map(|(c, _)| *c));
            let objects = out.entry(target.clone()).or_default();
            let has_local = local
                .get(target)
                .is_some_and(|l| l.contains(&(ns.clone(), name.clone())));
            if !has_local {
                let se_name = format!("isthmus-{name}-{ns}");
                let se_ports: Vec<Value> = ports
                    .iter()
                    .map(|p| json!({"number": p.port, "name": port_name(p), "protocol": istio_protocol(p)}))
                    .collect();
                objects.push(Object {
                    kind: Kind::ServiceEntry,
                    namespace: ns.clone(),
                    body: json!({
                        "apiVersion": Kind::ServiceEntry.api_version(), "kind": "ServiceEntry",
                        "metadata": meta(&se_name),
                        "spec": {"hosts": [format!("{name}.{ns}.svc.{domain}")], "location": "MESH_INTERNAL",
                                 "resolution": "STATIC", "ports": se_ports},
                    }),
                    name: se_name,
                });
            }
            let si_ports: Vec<Value> = ports
                .iter()
                .map(|p| {
                    let mut v = json!({"port": p.port, "protocol": p.protocol.as_deref().unwrap_or("TCP")});
                    if let Some(n) = &p.name {
                        v["name"] = json!(n);
                    }
                    if let Some(a) = &p.app_protocol {
                        v["appProtocol"] = json!(a);
                    }
                    v
                })
                .collect();
            objects.push(Object {
                kind: Kind::ServiceImport,
                namespace: ns.clone(),
                name: name.clone(),
                body: json!({
                    "apiVersion": Kind::ServiceImport.api_version(), "kind": "ServiceImport",
                    "metadata": meta(name),
                    "spec": {"type": "ClusterSetIP", "ports": si_ports},
                }),
            });
        }
    }
    for objects in out.values_mut() {
        objects.sort_by(|a, b| (a.kind, &a.namespace, &a.name).cmp(&(b.kind, &b.namespace, &b.name)));
    }
    out
}

/// The union of the exporters' ports by (port, protocol); where clusters disagree on a
/// port's name, the first cluster by name wins (MCS leaves conflict resolution to the
/// implementation and asks for a deterministic one).
fn merged_ports(from: &[(&ClusterId, &Service)]) -> Vec<ServicePort> {
    let mut ports: BTreeMap<(i32, String), ServicePort> = BTreeMap::new();
    for (_, svc) in from {
        for p in svc.spec.iter().flat_map(|s| s.ports.iter().flatten()) {
            let key = (p.port, p.protocol.clone().unwrap_or_else(|| "TCP".into()));
            ports.entry(key).or_insert_with(|| p.clone());
        }
    }
    ports.into_values().collect()
}

fn metadata<'a>(namespace: &str, name: &str, sources: impl Iterator<Item = &'a ClusterId>) -> Value {
    let sources: Vec<&str> = sources.map(ClusterId::as_str).collect();
    let mut labels = serde_json::Map::new();
    labels.insert(MANAGED_BY.into(), json!(ISTHMUS));
    for s in &sources {
        // A cluster name that cannot be a label name is still in the annotation.
        if is_label_name(s) {
            labels.insert(format!("{SOURCE_LABEL_PREFIX}{s}"), json!("true"));
        }
    }
    json!({"name": name, "namespace": namespace, "labels": labels,
           "annotations": {SOURCE_ANNOTATION: sources.join(",")}})
}

/// Kubernetes' rule for the name part of a label key.
fn is_label_name(s: &str) -> bool {
    let ok = |c: char| c.is_ascii_alphanumeric();
    !s.is_empty()
        && s.len() <= 63
        && s.starts_with(ok)
        && s.ends_with(ok)
        && s.chars().all(|c| ok(c) || matches!(c, '-' | '_' | '.'))
}

/// A ServiceEntry port needs a name; an unnamed Service port (allowed when it is the only
/// one) gets one from its protocol and number.
fn port_name(p: &ServicePort) -> String {
    p.name
        .clone()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| format!("{}-{}", istio_protocol(p).to_ascii_lowercase(), p.port))
}

/// Istio's protocol selection: `appProtocol`, then the port name's prefix
/// (`http-web` → HTTP), then the Kubernetes protocol (TCP, UDP).
fn istio_protocol(p: &ServicePort) -> String {
    let named = |s: &str| {
        let s = s.to_ascii_lowercase();
        let is = |k: &str| s == k || s.starts_with(&format!("{k}-"));
        // `grpc-web` before `grpc`, whose prefix it is.
        if is("grpc-web") {
            return Some("GRPC-Web".to_owned());
        }
        [
            "http", "http2", "https", "grpc", "mongo", "mysql", "redis", "tcp", "tls", "udp",
        ]
        .into_iter()
        .find(|k| is(k))
        .map(str::to_ascii_uppercase)
    };
    p.app_protocol
        .as_deref()
        .and_then(named)
        .or_else(|| p.name.as_deref().and_then(named))
        .unwrap_or_else(|| p.protocol.clone().unwrap_or_else(|| "TCP".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(yaml: &str) -> ClusterObjects {
        let mut o = ClusterObjects::default();
        o.add_yaml(std::path::Path::new("t.yaml"), yaml).unwrap();
        o
    }

    const REVIEWS: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: reviews, namespace: default}\n\
        spec: {ports: [{name: http, port: 9080}, {name: grpc-api, port: 9090, appProtocol: grpc}]}\n";
    const EXPORT: &str = "---\napiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {name: reviews, namespace: default}\n";

    fn three(c1: &str, c2: &str, c3: &str) -> BTreeMap<ClusterId, Vec<Object>> {
        let clusters = [("c1", c1), ("c2", c2), ("c3", c3)]
            .into_iter()
            .map(|(n, y)| (ClusterId::new(n), cluster(y)))
            .collect();
        desired(&clusters, "cluster.local")
    }

    fn names(objects: &[Object]) -> Vec<String> {
        objects
            .iter()
            .map(|o| format!("{}/{}/{}", o.kind.kind(), o.namespace, o.name))
            .collect()
    }

    #[test]
    fn an_export_reaches_every_other_cluster_with_entry_only_where_no_local_service() {
        // c1 exports reviews; c2 has its own reviews Service; c3 has none.
        let out = three(&format!("{REVIEWS}{EXPORT}"), REVIEWS, "");
        assert!(!out.contains_key(&ClusterId::new("c1")), "the exporter needs nothing");
        assert_eq!(names(&out[&ClusterId::new("c2")]), ["ServiceImport/default/reviews"]);
        assert_eq!(
            names(&out[&ClusterId::new("c3")]),
            [
                "ServiceEntry/default/isthmus-reviews-default",
                "ServiceImport/default/reviews"
            ]
        );
        let se = &out[&ClusterId::new("c3")][0].body;
        assert_eq!(
            se["spec"],
            json!({"hosts": ["reviews.default.svc.cluster.local"], "location": "MESH_INTERNAL", "resolution": "STATIC",
                   "ports": [{"number": 9080, "name": "http", "protocol": "HTTP"},
                             {"number": 9090, "name": "grpc-api", "protocol": "GRPC"}]})
        );
        assert_eq!(
            se["metadata"]["labels"],
            json!({"app.kubernetes.io/managed-by": "isthmus", "source.isthmus.io/c1": "true"})
        );
        assert_eq!(
            se["metadata"]["annotations"],
            json!({"isthmus.io/source-clusters": "c1"})
        );
        let si = &out[&ClusterId::new("c3")][1].body;
        assert_eq!(
            si["spec"],
            json!({"type": "ClusterSetIP", "ports": [{"name": "http", "port": 9080, "protocol": "TCP"},
                {"name": "grpc-api", "port": 9090, "protocol": "TCP", "appProtocol": "grpc"}]})
        );
        assert!(is_ours(si));
    }

    #[test]
    fn several_exporters_are_all_named_and_a_cluster_is_never_its_own_source() {
        let exported = format!("{REVIEWS}{EXPORT}");
        let out = three(&exported, &exported, "");
        let c3 = &out[&ClusterId::new("c3")][0].body["metadata"];
        assert_eq!(c3["annotations"][SOURCE_ANNOTATION], "c1,c2");
        assert_eq!(c3["labels"]["source.isthmus.io/c1"], "true");
        assert_eq!(c3["labels"]["source.isthmus.io/c2"], "true");
        // c1 imports from c2 only, and has its own Service: no ServiceEntry.
        let c1 = &out[&ClusterId::new("c1")];
        assert_eq!(names(c1), ["ServiceImport/default/reviews"]);
        assert_eq!(c1[0].body["metadata"]["annotations"][SOURCE_ANNOTATION], "c2");
        assert!(c1[0].body["metadata"]["labels"].get("source.isthmus.io/c1").is_none());
    }

    #[test]
    fn nothing_without_both_export_and_service() {
        let export_only = EXPORT.trim_start_matches("---\n");
        assert!(three(export_only, "", "").is_empty(), "an export without its Service");
        assert!(three(REVIEWS, REVIEWS, "").is_empty(), "Services without an export");
        let other_ns = export_only.replace("namespace: default", "namespace: other");
        assert!(three(&format!("{REVIEWS}---\n{other_ns}"), "", "").is_empty());
    }

    #[test]
    fn protocols_follow_istio_selection_and_unnamed_ports_get_a_name() {
        let port = |name: Option<&str>, app: Option<&str>, proto: Option<&str>| ServicePort {
            name: name.map(Into::into),
            app_protocol: app.map(Into::into),
            protocol: proto.map(Into::into),
            port: 80,
            ..Default::default()
        };
        assert_eq!(istio_protocol(&port(Some("http-web"), None, None)), "HTTP");
        assert_eq!(istio_protocol(&port(Some("web"), Some("http2"), None)), "HTTP2");
        assert_eq!(istio_protocol(&port(Some("grpc-web-ui"), None, None)), "GRPC-Web");
        assert_eq!(istio_protocol(&port(Some("grpc"), None, None)), "GRPC");
        assert_eq!(istio_protocol(&port(Some("httpx"), None, None)), "TCP");
        assert_eq!(istio_protocol(&port(Some("dns"), None, Some("UDP"))), "UDP");
        assert_eq!(port_name(&port(None, None, None)), "tcp-80");
    }

    #[test]
    fn label_names_follow_kubernetes_rules() {
        assert!(is_label_name("cluster-1.eu"));
        assert!(!is_label_name("-x"));
        assert!(!is_label_name("a,b"));
        assert!(!is_label_name(&"x".repeat(64)));
    }
}
