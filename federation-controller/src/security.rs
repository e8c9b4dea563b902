//! Istio's security config (`security.istio.io`, v1 and v1beta1): who may call a
//! workload ([`authorization_policy`]) and whether its peers must speak mTLS
//! ([`peer_authentication`]), in Istio's YAML shapes, validated with Istio's
//! reasons; and what of a cluster the inbound side needs ([`ClusterSecurity`]):
//! the policies and every workload's namespace, labels and inbound ports
//! ([`workload`]). Translation into Envoy's RBAC and the inbound listener is
//! [`crate::xds::rbac`] and [`crate::xds::inbound`]'s.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub mod authorization_policy;
pub mod peer_authentication;
pub mod workload;

pub use authorization_policy::AuthorizationPolicy;
pub use peer_authentication::PeerAuthentication;
pub use workload::Workload;

/// Istio's root namespace: policies here without a selector apply mesh-wide.
pub const ROOT_NAMESPACE: &str = "istio-system";
/// The API group of both kinds.
pub const GROUP: &str = "security.istio.io";

/// A document of a security kind that Istio would refuse, and why: the field
/// (path within the document) and Istio's reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("field `{field}`: {message}")]
pub struct Invalid {
    pub field: String,
    pub message: String,
}

impl Invalid {
    pub(crate) fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// `selector`: the workloads (pods) a policy applies to, by their labels.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSelector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

impl WorkloadSelector {
    /// Whether a workload with `labels` is selected: every label matches.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels.iter().all(|(k, v)| labels.get(k) == Some(v))
    }

    /// The CRD's rules on label keys and values (CEL in Istio's schema).
    fn validate(&self, field: &str) -> Result<(), Invalid> {
        for (k, v) in &self.match_labels {
            let at = format!("{field}.matchLabels");
            if k.is_empty() {
                return Err(Invalid::new(at, "key must not be empty"));
            }
            if k.contains('*') {
                return Err(Invalid::new(at, "wildcard not allowed in label key match"));
            }
            if v.contains('*') {
                return Err(Invalid::new(
                    format!("{at}.{k}"),
                    "wildcard not allowed in label value match",
                ));
            }
        }
        Ok(())
    }
}

/// `targetRef`: a Kubernetes object (a Gateway, a Service) the policy attaches to
/// instead of selecting pods; such policies are for gateways and waypoints, not sidecars.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyTargetReference {
    #[serde(default)]
    pub group: String,
    pub kind: String,
    pub name: String,
    #[serde(default)]
    pub namespace: String,
}

impl PolicyTargetReference {
    fn validate(&self, field: &str) -> Result<(), Invalid> {
        if self.kind.is_empty() {
            return Err(Invalid::new(format!("{field}.kind"), "Required value"));
        }
        if self.name.is_empty() {
            return Err(Invalid::new(format!("{field}.name"), "Required value"));
        }
        if !self.namespace.is_empty() {
            let msg = "cross namespace referencing is not currently supported";
            return Err(Invalid::new(format!("{field}.namespace"), msg));
        }
        Ok(())
    }
}

/// A policy as the model keeps it: where it lives, when it was made (the oldest
/// wins a tie, as in Istio) and its spec.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Named<S> {
    pub namespace: String,
    pub name: String,
    /// `metadata.creationTimestamp` (RFC 3339, so it sorts as text); None sorts first.
    pub created: Option<String>,
    pub spec: S,
}

impl<S> Named<S> {
    fn of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta, spec: S) -> Self {
        Named {
            namespace: meta.namespace.clone().unwrap_or_else(|| "default".into()),
            name: meta.name.clone().unwrap_or_default(),
            created: meta.creation_timestamp.as_ref().map(|t| t.0.to_string()),
            spec,
        }
    }
}

/// What the inbound side needs of one cluster: its valid security policies and
/// its workloads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterSecurity {
    pub authorization_policies: Vec<Named<authorization_policy::AuthorizationPolicySpec>>,
    pub peer_authentications: Vec<Named<peer_authentication::PeerAuthenticationSpec>>,
    /// Every pod with an address, sorted by address.
    pub workloads: Vec<Workload>,
}

impl ClusterSecurity {
    /// Distils a cluster's objects; `instances` are the model's, which say which
    /// ports of which pods serve a service. Policies Istio would refuse are left
    /// out (a manifest source has already reported them with their file).
    pub fn build(objects: &crate::objects::ClusterObjects, instances: &[crate::model::Instance]) -> ClusterSecurity {
        let authorization_policies = valid(
            &objects.authorization_policies,
            |p| (&p.metadata, &p.spec),
            |s| s.validate(),
        );
        let peer_authentications = valid(
            &objects.peer_authentications,
            |p| (&p.metadata, &p.spec),
            |s| s.validate(),
        );
        let custom = authorization_policies
            .iter()
            .filter(|p| p.spec.action == authorization_policy::Action::Custom);
        for p in custom {
            tracing::warn!(
                namespace = p.namespace,
                policy = p.name,
                "CUSTOM authorization (an external authorizer) is not supported: every request it selects is denied"
            );
        }
        ClusterSecurity {
            authorization_policies,
            peer_authentications,
            workloads: workload::workloads(objects, instances),
        }
    }
}

/// The policies among `items` that Istio would accept, sorted by namespace and
/// name: sources list in no particular order, and the model must not change when
/// they reorder.
fn valid<T, S: Clone>(
    items: &[T],
    parts: impl Fn(&T) -> (&k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta, &S),
    validate: impl Fn(&S) -> Result<(), Invalid>,
) -> Vec<Named<S>> {
    let mut out: Vec<Named<S>> = items
        .iter()
        .filter_map(|item| {
            let (meta, spec) = parts(item);
            match validate(spec) {
                Ok(()) => Some(Named::of(meta, spec.clone())),
                Err(e) => {
                    tracing::debug!(policy = meta.name.as_deref().unwrap_or_default(), %e, "not served");
                    None
                }
            }
        })
        .collect();
    out.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    out
}

/// Istio's enums, as the API server reads them: a value outside the schema's
/// `enum` is refused with `Unsupported value: "X": supported values: …`.
trait Enumerated: Sized + Copy + 'static {
    const VALUES: &'static [(&'static str, Self)];

    fn deserialize_enum<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::VALUES
            .iter()
            .find(|(name, _)| *name == s)
            .map(|(_, v)| *v)
            .ok_or_else(|| {
                let supported: Vec<String> = Self::VALUES.iter().map(|(n, _)| format!("{n:?}")).collect();
                serde::de::Error::custom(format!(
                    "Unsupported value: {s:?}: supported values: {}",
                    supported.join(", ")
                ))
            })
    }
}

/// Istio refuses an empty string among a field's values.
fn non_empty(field: &str, what: &str, values: &[String]) -> Result<(), Invalid> {
    if values.iter().any(String::is_empty) {
        return Err(Invalid::new(field, format!("empty value not allowed, found in {what}")));
    }
    Ok(())
}

/// `kube::Resource` for an Istio security kind (v1, namespaced), so the
/// Kubernetes source can watch it like a built-in kind.
macro_rules! istio_resource {
    ($ty:ty, $kind:literal, $plural:literal) => {
        impl kube::Resource for $ty {
            type DynamicType = ();
            type Scope = k8s_openapi::NamespaceResourceScope;

            fn kind(_: &()) -> std::borrow::Cow<'_, str> {
                $kind.into()
            }
            fn group(_: &()) -> std::borrow::Cow<'_, str> {
                $crate::security::GROUP.into()
            }
            fn version(_: &()) -> std::borrow::Cow<'_, str> {
                "v1".into()
            }
            fn plural(_: &()) -> std::borrow::Cow<'_, str> {
                $plural.into()
            }
            fn meta(&self) -> &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                &self.metadata
            }
            fn meta_mut(&mut self) -> &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                &mut self.metadata
            }
        }
    };
}
pub(crate) use istio_resource;
