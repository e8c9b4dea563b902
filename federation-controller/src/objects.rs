//! The Kubernetes objects of one cluster that federation reads, in the API's own
//! types, and their parsing from multi-document YAML (what `kubectl get -o yaml`
//! prints, or what a user applies).

use std::borrow::Cow;
use std::path::Path;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use mesh_vocab::manifest::{self, ManifestError};
use serde::{Deserialize, Serialize};

use crate::networking::{
    self, ConfigError, DestinationRule, Gateway, HttpRoute, NetworkingConfig, ReferenceGrant, ServiceEntry,
    VirtualService, WorkloadEntry,
};
use crate::security::{AuthorizationPolicy, PeerAuthentication};

/// An MCS `ServiceExport` (`multicluster.x-k8s.io/v1alpha1`): the Service of the same
/// namespace and name is exported to the cluster set. k8s-openapi has no MCS types, and
/// federation reads only the name, so the spec (empty in v1alpha1) and status are not kept.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ServiceExport {
    pub metadata: ObjectMeta,
}

impl kube::Resource for ServiceExport {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        "ServiceExport".into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        "multicluster.x-k8s.io".into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        "v1alpha1".into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        "serviceexports".into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// Everything one cluster has told us, as typed objects.
#[derive(Debug, Clone, Default)]
pub struct ClusterObjects {
    pub namespaces: Vec<Namespace>,
    pub services: Vec<Service>,
    pub endpoint_slices: Vec<EndpointSlice>,
    pub pods: Vec<Pod>,
    pub nodes: Vec<Node>,
    pub service_exports: Vec<ServiceExport>,
    pub authorization_policies: Vec<AuthorizationPolicy>,
    pub peer_authentications: Vec<PeerAuthentication>,
    pub virtual_services: Vec<VirtualService>,
    pub destination_rules: Vec<DestinationRule>,
    pub service_entries: Vec<ServiceEntry>,
    pub workload_entries: Vec<WorkloadEntry>,
    pub gateways: Vec<Gateway>,
    /// Gateway API HTTPRoutes (those with Service parents route the mesh's traffic).
    pub http_routes: Vec<HttpRoute>,
    /// Gateway API ReferenceGrants: which other namespaces' HTTPRoutes may send to a
    /// namespace's Services.
    pub reference_grants: Vec<ReferenceGrant>,
    /// Istio documents refused (invalid), each on its own: the rest of the file and
    /// every other document still count, as one bad object applied to a cluster
    /// does not undo the others.
    pub refused: Vec<ConfigError>,
}

/// A document of a kind federation does not read (yet); kept so callers can say so.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub document: usize,
    pub api_version: String,
    pub kind: String,
}

impl ClusterObjects {
    /// Adds the objects of one YAML file; returns the documents of kinds it does not read.
    /// An invalid Istio document is kept out and recorded in [`Self::refused`]; any
    /// other document that does not fit its kind fails the file.
    pub fn add_yaml(&mut self, file: &Path, text: &str) -> Result<Vec<Skipped>, ManifestError> {
        let mut skipped = Vec::new();
        for (n, doc) in manifest::documents(file, text)? {
            // `kind: List` (kubectl's output) holds the objects in `items`.
            let items: Vec<(String, serde_json::Value)> =
                match (doc.get("kind").and_then(|k| k.as_str()), doc.get("items")) {
                    (Some("List"), Some(serde_json::Value::Array(items))) => items
                        .iter()
                        .enumerate()
                        .map(|(j, v)| (format!("items[{j}]."), v.clone()))
                        .collect(),
                    _ => vec![(String::new(), doc)],
                };
            for (prefix, item) in items {
                let text_of = |k: &str| item.get(k).and_then(|v| v.as_str()).unwrap_or_default().to_owned();
                let (api_version, kind) = (text_of("apiVersion"), text_of("kind"));
                if api_version.is_empty() || kind.is_empty() {
                    let msg = "every object needs apiVersion and kind";
                    return Err(ManifestError::field(file, n, format!("{prefix}kind"), msg));
                }
                match (api_version.as_str(), kind.as_str()) {
                    ("v1", "Namespace") => self.namespaces.push(manifest::typed(file, n, &prefix, item)?),
                    ("v1", "Service") => self.services.push(manifest::typed(file, n, &prefix, item)?),
                    ("v1", "Pod") => self.pods.push(manifest::typed(file, n, &prefix, item)?),
                    ("v1", "Node") => self.nodes.push(manifest::typed(file, n, &prefix, item)?),
                    ("discovery.k8s.io/v1", "EndpointSlice") => {
                        self.endpoint_slices.push(manifest::typed(file, n, &prefix, item)?)
                    }
                    ("multicluster.x-k8s.io/v1alpha1", "ServiceExport") => {
                        self.service_exports.push(manifest::typed(file, n, &prefix, item)?)
                    }
                    ("security.istio.io/v1" | "security.istio.io/v1beta1", "AuthorizationPolicy") => {
                        match security_policy(file, n, &prefix, item, |p: &AuthorizationPolicy| p.spec.validate()) {
                            Ok(p) => self.authorization_policies.push(p),
                            Err(e) => self.refused.push(ConfigError::Shape(e)),
                        }
                    }
                    ("security.istio.io/v1" | "security.istio.io/v1beta1", "PeerAuthentication") => {
                        match security_policy(file, n, &prefix, item, |p: &PeerAuthentication| p.spec.validate()) {
                            Ok(p) => self.peer_authentications.push(p),
                            Err(e) => self.refused.push(ConfigError::Shape(e)),
                        }
                    }
                    (v, k) if networking::reads(v, k) => match networking::parse(file, n, &prefix, k, item) {
                        Ok(NetworkingConfig::VirtualService(vs)) => self.virtual_services.push(*vs),
                        Ok(NetworkingConfig::DestinationRule(dr)) => self.destination_rules.push(*dr),
                        Ok(NetworkingConfig::ServiceEntry(se)) => self.service_entries.push(*se),
                        Ok(NetworkingConfig::WorkloadEntry(we)) => self.workload_entries.push(*we),
                        Ok(NetworkingConfig::Gateway(g)) => self.gateways.push(*g),
                        Ok(NetworkingConfig::HttpRoute(r)) => self.http_routes.push(*r),
                        Ok(NetworkingConfig::ReferenceGrant(g)) => self.reference_grants.push(*g),
                        Err(e) => self.refused.push(e),
                    },
                    _ => skipped.push(Skipped {
                        document: n,
                        api_version,
                        kind,
                    }),
                }
            }
        }
        Ok(skipped)
    }
}

/// Reads one security document and checks it as Istio would.
fn security_policy<T: serde::de::DeserializeOwned>(
    file: &Path,
    n: usize,
    prefix: &str,
    item: serde_json::Value,
    validate: impl Fn(&T) -> Result<(), crate::security::Invalid>,
) -> Result<T, ManifestError> {
    let p: T = manifest::typed(file, n, prefix, item)?;
    validate(&p).map_err(|e| ManifestError::field(file, n, format!("{prefix}{}", e.field), e.message))?;
    Ok(p)
}

impl ClusterObjects {
    /// These objects plus Istio networking objects read from an API server, each
    /// validated: an invalid one goes to [`Self::refused`] instead.
    pub fn with_networking(
        mut self,
        virtual_services: Vec<VirtualService>,
        destination_rules: Vec<DestinationRule>,
        service_entries: Vec<ServiceEntry>,
        workload_entries: Vec<WorkloadEntry>,
        gateways: Vec<Gateway>,
    ) -> Self {
        for vs in virtual_services {
            match vs.validate() {
                Ok(()) => self.virtual_services.push(vs),
                Err(e) => self.refused.push(refuse("VirtualService", &vs.metadata, e)),
            }
        }
        for dr in destination_rules {
            match dr.validate() {
                Ok(()) => self.destination_rules.push(dr),
                Err(e) => self.refused.push(refuse("DestinationRule", &dr.metadata, e)),
            }
        }
        for se in service_entries {
            match se.validate() {
                Ok(()) => self.service_entries.push(se),
                Err(e) => self.refused.push(refuse("ServiceEntry", &se.metadata, e)),
            }
        }
        for we in workload_entries {
            match we.validate() {
                Ok(()) => self.workload_entries.push(we),
                Err(e) => self.refused.push(refuse("WorkloadEntry", &we.metadata, e)),
            }
        }
        for g in gateways {
            match g.validate() {
                Ok(()) => self.gateways.push(g),
                Err(e) => self.refused.push(refuse("Gateway", &g.metadata, e)),
            }
        }
        self
    }

    /// These objects plus Gateway API HTTPRoutes and ReferenceGrants read from an API
    /// server, each validated: an invalid one goes to [`Self::refused`] instead.
    pub fn with_gateway_api(mut self, routes: Vec<HttpRoute>, grants: Vec<ReferenceGrant>) -> Self {
        for r in routes {
            match r.validate() {
                Ok(()) => self.http_routes.push(r),
                Err(e) => self.refused.push(refuse("HTTPRoute", &r.metadata, e)),
            }
        }
        for g in grants {
            match g.validate() {
                Ok(()) => self.reference_grants.push(g),
                Err(e) => self.refused.push(refuse("ReferenceGrant", &g.metadata, e)),
            }
        }
        self
    }
}

/// An object from an API server refused as invalid, named `namespace/name`.
fn refuse(kind: &'static str, meta: &ObjectMeta, error: networking::ValidationError) -> ConfigError {
    ConfigError::InvalidObject {
        kind,
        name: format!(
            "{}/{}",
            networking::namespace_of(meta),
            meta.name.as_deref().unwrap_or_default()
        ),
        error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_kinds_it_knows_and_reports_the_rest() {
        let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: default}
spec: {ports: [{name: http, port: 9080}]}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: x}
spec: {hosts: [reviews], http: [{route: [{destination: {host: reviews}}]}]}
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: default}
---
apiVersion: multicluster.x-k8s.io/v1alpha1
kind: ServiceExport
metadata: {name: reviews, namespace: default}
---
apiVersion: v1
kind: List
items:
  - {apiVersion: v1, kind: Namespace, metadata: {name: default}}
  - {apiVersion: v1, kind: Pod, metadata: {name: p, namespace: default}}
"#;
        let mut o = ClusterObjects::default();
        let skipped = o.add_yaml(Path::new("c1/a.yaml"), yaml).unwrap();
        assert_eq!((o.services.len(), o.namespaces.len(), o.pods.len()), (1, 1, 1));
        assert_eq!(o.service_exports[0].metadata.name.as_deref(), Some("reviews"));
        assert_eq!(o.virtual_services[0].spec.hosts, ["reviews"]);
        assert_eq!(
            skipped,
            [Skipped {
                document: 3,
                api_version: "networking.istio.io/v1".into(),
                kind: "Sidecar".into()
            }]
        );
    }

    #[test]
    fn an_invalid_istio_document_is_refused_alone_naming_document_and_field() {
        let yaml = r#"
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {name: bad, namespace: web}
spec: {hosts: ["*"]}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec: {host: reviews, subsets: [{name: v1, labels: {version: v1}}]}
"#;
        let mut o = ClusterObjects::default();
        o.add_yaml(Path::new("c1/istio.yaml"), yaml).unwrap();
        assert_eq!(o.destination_rules.len(), 1, "the valid rule still counts");
        assert!(o.service_entries.is_empty());
        let [e] = &o.refused[..] else {
            panic!("one refused: {:?}", o.refused)
        };
        assert_eq!(
            e.to_string(),
            "c1/istio.yaml: document 1: ServiceEntry web/bad refused: spec.hosts[0]: hostname cannot be wildcard"
        );
    }

    #[test]
    fn errors_name_file_document_and_field() {
        let yaml = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: r}\nspec: {ports: [{port: http}]}\n";
        let e = ClusterObjects::default()
            .add_yaml(Path::new("c1/svc.yaml"), yaml)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("c1/svc.yaml: document 2: field `spec.ports[0].port`: "),
            "{e}"
        );
        let e = ClusterObjects::default()
            .add_yaml(Path::new("x.yaml"), "metadata: {name: a}")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "x.yaml: document 1: field `kind`: every object needs apiVersion and kind"
        );
    }
}

#[cfg(test)]
mod security_tests {
    use super::*;
    use crate::security::authorization_policy::Action;

    #[test]
    fn reads_istio_security_kinds_of_both_versions_and_refuses_bad_ones_one_by_one() {
        let yaml = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-post, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  action: DENY
  rules: [{to: [{operation: {methods: [POST]}}]}]
---
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: bad, namespace: foo}
spec: {mtls: {mode: BLAH}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: bad, namespace: foo}
spec: {rules: [{from: [{source: {serviceAccounts: [a], namespaces: [b]}}]}]}
---
apiVersion: v1
kind: Namespace
metadata: {name: foo}
"#;
        let mut o = ClusterObjects::default();
        let skipped = o.add_yaml(Path::new("c1/policies.yaml"), yaml).unwrap();
        assert!(skipped.is_empty(), "{skipped:?}");
        assert_eq!(o.namespaces.len(), 1, "the rest of the file is read");
        assert_eq!(o.authorization_policies.len(), 1);
        assert_eq!(o.authorization_policies[0].spec.action, Action::Deny);
        assert_eq!(o.peer_authentications.len(), 1);
        let refused: Vec<String> = o.refused.iter().map(ToString::to_string).collect();
        assert_eq!(refused.len(), 2, "{refused:?}");
        assert!(
            refused[0]
                .starts_with(r#"c1/policies.yaml: document 3: field `spec.mtls.mode`: Unsupported value: "BLAH""#),
            "{}",
            refused[0]
        );
        assert_eq!(
            refused[1],
            "c1/policies.yaml: document 4: field `spec.rules[0].from[0].source`: Cannot set serviceAccounts with namespaces or principals"
        );
    }
}
