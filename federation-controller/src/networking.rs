//! Istio's traffic configuration (`networking.istio.io`, as `v1`, `v1beta1` or
//! `v1alpha3`): [`VirtualService`] (how requests to a host are routed),
//! [`DestinationRule`] (its subsets and traffic policy) and [`ServiceEntry`]
//! (hosts of the mesh's registry that are no Kubernetes Service), [`WorkloadEntry`]
//! (a workload that is no pod) and [`Gateway`] (what a gateway exposes); and Gateway
//! API's [`HttpRoute`] attached to Services (GAMMA), which routes as a VirtualService
//! does, and its [`ReferenceGrant`], which lets a route reach another namespace's
//! Service. Typed with Istio's
//! field names, so users' YAML reads as it does for istiod; validated with Istio's
//! reasons, so a document Istio's API server or webhook refuses is refused here too.
//!
//! Unknown fields are ignored rather than refused: Istio's API keeps growing, and a
//! field this controller does not act on must not make a whole document unusable.

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use mesh_vocab::manifest::{self, ManifestError};

pub mod destination_rule;
pub mod duration;
pub mod gateway;
pub mod http_route;
pub mod reference_grant;
pub mod service_entry;
pub mod virtual_service;
pub mod workload_entry;

pub use destination_rule::DestinationRule;
pub use duration::Duration;
pub use gateway::Gateway;
pub use http_route::HttpRoute;
pub use reference_grant::ReferenceGrant;
pub use service_entry::ServiceEntry;
pub use virtual_service::VirtualService;
pub use workload_entry::WorkloadEntry;

/// The API group of Istio's traffic configuration.
pub const GROUP: &str = "networking.istio.io";
/// The versions of [`GROUP`] accepted; they share one schema.
pub const VERSIONS: [&str; 3] = ["v1", "v1beta1", "v1alpha3"];

/// Why a document of a kind this module reads cannot be used, naming the field as
/// Istio does (`spec.hosts: Required value`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ValidationError {
    /// The path of the offending field, e.g. `spec.http[0].route[1].weight`.
    pub field: String,
    /// What is wrong, in Istio's words where Istio has them.
    pub reason: String,
}

impl ValidationError {
    /// An error about `field`.
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// A refused document: where it is and why.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ConfigError {
    /// It does not fit the schema (a field of the wrong type, a bad duration).
    #[error(transparent)]
    Shape(ManifestError),
    /// It fits the schema but breaks one of Istio's rules.
    #[error("{}: document {document}: {kind} {name} refused: {error}", file.display())]
    Invalid {
        file: PathBuf,
        document: usize,
        kind: &'static str,
        /// `namespace/name`.
        name: String,
        error: ValidationError,
    },
    /// An object read from an API server breaks one of Istio's rules (istiod's
    /// webhook, which would have refused it, is not installed everywhere).
    #[error("{kind} {name} refused: {error}")]
    InvalidObject {
        kind: &'static str,
        /// `namespace/name`.
        name: String,
        error: ValidationError,
    },
}

/// One document of Istio's traffic configuration (boxed: the kinds differ much in size).
#[derive(Debug, Clone, PartialEq)]
pub enum NetworkingConfig {
    VirtualService(Box<VirtualService>),
    DestinationRule(Box<DestinationRule>),
    ServiceEntry(Box<ServiceEntry>),
    WorkloadEntry(Box<WorkloadEntry>),
    Gateway(Box<Gateway>),
    HttpRoute(Box<HttpRoute>),
    ReferenceGrant(Box<ReferenceGrant>),
}

/// Whether `api_version`/`kind` is one this module reads.
pub fn reads(api_version: &str, kind: &str) -> bool {
    if let Some(v) = api_version
        .strip_prefix(http_route::GROUP)
        .and_then(|v| v.strip_prefix('/'))
    {
        return match kind {
            "HTTPRoute" => http_route::VERSIONS.contains(&v),
            "ReferenceGrant" => reference_grant::VERSIONS.contains(&v),
            _ => false,
        };
    }
    let version_ok = api_version
        .strip_prefix(GROUP)
        .and_then(|v| v.strip_prefix('/'))
        .is_some_and(|v| VERSIONS.contains(&v));
    version_ok
        && matches!(
            kind,
            "VirtualService" | "DestinationRule" | "ServiceEntry" | "WorkloadEntry" | "Gateway"
        )
}

/// Reads and validates document `document` of `file` (`prefix` names its place
/// inside a `List`), of a kind [`reads`] accepts.
pub fn parse(
    file: &Path,
    document: usize,
    prefix: &str,
    kind: &str,
    item: serde_json::Value,
) -> Result<NetworkingConfig, ConfigError> {
    let name = format!(
        "{}/{}",
        item.pointer("/metadata/namespace")
            .and_then(|v| v.as_str())
            .unwrap_or("default"),
        item.pointer("/metadata/name")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
    );
    let has_spec = item.get("spec").is_some_and(|s| !s.is_null());
    // Reads one kind, then checks it: the schema first (a shape error), then Istio's rules.
    fn read<T: serde::de::DeserializeOwned>(
        (file, document, prefix, item): (&Path, usize, &str, serde_json::Value),
        has_spec: bool,
        validate: fn(&T) -> Result<(), ValidationError>,
        wrap: fn(Box<T>) -> NetworkingConfig,
    ) -> Result<Result<NetworkingConfig, ValidationError>, ConfigError> {
        let t: T = manifest::typed(file, document, prefix, item).map_err(ConfigError::Shape)?;
        Ok(require_spec(has_spec)
            .and_then(|()| validate(&t))
            .map(|()| wrap(Box::new(t))))
    }
    let at = (file, document, prefix, item);
    let (kind, checked) = match kind {
        "VirtualService" => (
            "VirtualService",
            read(at, has_spec, VirtualService::validate, NetworkingConfig::VirtualService)?,
        ),
        "DestinationRule" => (
            "DestinationRule",
            read(
                at,
                has_spec,
                DestinationRule::validate,
                NetworkingConfig::DestinationRule,
            )?,
        ),
        "Gateway" => (
            "Gateway",
            read(at, has_spec, Gateway::validate, NetworkingConfig::Gateway)?,
        ),
        "WorkloadEntry" => (
            "WorkloadEntry",
            read(at, has_spec, WorkloadEntry::validate, NetworkingConfig::WorkloadEntry)?,
        ),
        "HTTPRoute" => (
            "HTTPRoute",
            read(at, has_spec, HttpRoute::validate, NetworkingConfig::HttpRoute)?,
        ),
        "ReferenceGrant" => (
            "ReferenceGrant",
            read(at, has_spec, ReferenceGrant::validate, NetworkingConfig::ReferenceGrant)?,
        ),
        _ => (
            "ServiceEntry",
            read(at, has_spec, ServiceEntry::validate, NetworkingConfig::ServiceEntry)?,
        ),
    };
    checked.map_err(|error| ConfigError::Invalid {
        file: file.to_owned(),
        document,
        kind,
        name,
        error: ValidationError {
            field: format!("{prefix}{}", error.field),
            ..error
        },
    })
}

/// Every kind of this module needs a `spec` (the API server's "Required value").
fn require_spec(has_spec: bool) -> Result<(), ValidationError> {
    if has_spec {
        Ok(())
    } else {
        Err(ValidationError::new("spec", "Required value"))
    }
}

/// The fully qualified name of `host` as written in config of `namespace`: a short
/// name (no dot) is a Service of that namespace, as istiod resolves it; anything
/// else is taken as written.
pub fn fqdn(host: &str, namespace: &str, domain: &str) -> String {
    if host.contains('.') || host.contains('*') {
        host.to_owned()
    } else {
        format!("{host}.{namespace}.svc.{domain}")
    }
}

/// The namespace of an object's metadata (`default` when it names none, as `kubectl apply` does).
pub fn namespace_of(meta: &ObjectMeta) -> &str {
    meta.namespace.as_deref().unwrap_or("default")
}

/// Implements `kube::Resource` for one of this module's kinds (of Istio's group and
/// watched as `v1` unless others are given), so the kube source can watch it.
macro_rules! istio_resource {
    ($ty:ty, $kind:literal, $plural:literal) => {
        istio_resource!($ty, GROUP, $kind, $plural);
    };
    ($ty:ty, $group:expr, $kind:literal, $plural:literal) => {
        istio_resource!($ty, $group, "v1", $kind, $plural);
    };
    ($ty:ty, $group:expr, $version:literal, $kind:literal, $plural:literal) => {
        impl kube::Resource for $ty {
            type DynamicType = ();
            type Scope = NamespaceResourceScope;

            fn kind(_: &()) -> Cow<'_, str> {
                $kind.into()
            }
            fn group(_: &()) -> Cow<'_, str> {
                $group.into()
            }
            fn version(_: &()) -> Cow<'_, str> {
                $version.into()
            }
            fn plural(_: &()) -> Cow<'_, str> {
                $plural.into()
            }
            fn meta(&self) -> &ObjectMeta {
                &self.metadata
            }
            fn meta_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    };
}

istio_resource!(VirtualService, "VirtualService", "virtualservices");
istio_resource!(DestinationRule, "DestinationRule", "destinationrules");
istio_resource!(ServiceEntry, "ServiceEntry", "serviceentries");
istio_resource!(WorkloadEntry, "WorkloadEntry", "workloadentries");
istio_resource!(Gateway, "Gateway", "gateways");
istio_resource!(HttpRoute, http_route::GROUP, "HTTPRoute", "httproutes");
// Gateway API serves ReferenceGrant as v1beta1 (v1alpha2 before it).
istio_resource!(
    ReferenceGrant,
    http_route::GROUP,
    "v1beta1",
    "ReferenceGrant",
    "referencegrants"
);

/// Checks that `value` (a percentage) lies in 0..=100.
pub(crate) fn percent_in_range(field: &str, value: f64) -> Result<(), ValidationError> {
    if (0.0..=100.0).contains(&value) {
        Ok(())
    } else {
        Err(ValidationError::new(
            field,
            "Invalid value: percentage must be in [0, 100]",
        ))
    }
}

/// Checks a port number (Istio's CEL rule and message).
pub(crate) fn port_in_range(field: &str, port: i64) -> Result<(), ValidationError> {
    if (1..=65535).contains(&port) {
        Ok(())
    } else {
        Err(ValidationError::new(field, "port must be between 1-65535"))
    }
}

/// One YAML document as `T`, for this module's unit tests.
#[cfg(test)]
pub(crate) fn from_yaml<T: serde::de::DeserializeOwned>(yaml: &str) -> T {
    let (_, doc) = manifest::documents(Path::new("test.yaml"), yaml).unwrap().remove(0);
    serde_json::from_value(doc).unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_hosts_are_services_of_the_configs_namespace() {
        assert_eq!(
            fqdn("reviews", "bookinfo", "cluster.local"),
            "reviews.bookinfo.svc.cluster.local"
        );
        assert_eq!(
            fqdn("reviews.default.svc.cluster.local", "x", "cluster.local"),
            "reviews.default.svc.cluster.local"
        );
        assert_eq!(fqdn("*.local", "x", "cluster.local"), "*.local");
    }

    #[test]
    fn reads_every_served_version_of_the_group() {
        assert!(reads("networking.istio.io/v1", "VirtualService"));
        assert!(reads("networking.istio.io/v1alpha3", "ServiceEntry"));
        assert!(reads("networking.istio.io/v1beta1", "DestinationRule"));
        assert!(reads("networking.istio.io/v1", "Gateway"));
        assert!(!reads("networking.istio.io/v1", "Sidecar"));
        assert!(!reads("networking.istio.io/v2", "VirtualService"));
        assert!(reads("gateway.networking.k8s.io/v1", "HTTPRoute"));
        assert!(reads("gateway.networking.k8s.io/v1beta1", "HTTPRoute"));
        assert!(!reads("gateway.networking.k8s.io/v1", "Gateway"));
        assert!(!reads("networking.istio.io/v1", "HTTPRoute"));
        assert!(reads("gateway.networking.k8s.io/v1beta1", "ReferenceGrant"));
        assert!(reads("gateway.networking.k8s.io/v1alpha2", "ReferenceGrant"));
        assert!(!reads("gateway.networking.k8s.io/v1beta1", "GRPCRoute"));
    }
}
