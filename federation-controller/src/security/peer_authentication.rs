//! `PeerAuthentication`: whether a workload's peers must speak mesh mTLS
//! (STRICT), may (PERMISSIVE) or must not (DISABLE), for the workload or per port;
//! and Istio's precedence among the policies that apply to one workload
//! ([`effective`]).

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};

use super::{Enumerated, Invalid, Named, ROOT_NAMESPACE, Workload, WorkloadSelector};

/// The object: Kubernetes metadata and Istio's spec.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PeerAuthentication {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: PeerAuthenticationSpec,
}

super::istio_resource!(PeerAuthentication, "PeerAuthentication", "peerauthentications");

/// `spec`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerAuthenticationSpec {
    pub selector: Option<WorkloadSelector>,
    pub mtls: Option<Mtls>,
    /// Per (container) port, as a string key as in Istio's YAML.
    pub port_level_mtls: Option<BTreeMap<String, Mtls>>,
}

/// `mtls`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Mtls {
    #[serde(default)]
    pub mode: MtlsMode,
}

/// `mtls.mode`; UNSET inherits from the level above.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MtlsMode {
    #[default]
    Unset,
    Disable,
    Permissive,
    Strict,
}

impl Enumerated for MtlsMode {
    const VALUES: &'static [(&'static str, Self)] = &[
        ("UNSET", MtlsMode::Unset),
        ("DISABLE", MtlsMode::Disable),
        ("PERMISSIVE", MtlsMode::Permissive),
        ("STRICT", MtlsMode::Strict),
    ];
}

impl<'de> Deserialize<'de> for MtlsMode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Self::deserialize_enum(d)
    }
}

impl MtlsMode {
    /// Whether a peer may connect in plaintext.
    pub fn allows_plaintext(self) -> bool {
        matches!(self, MtlsMode::Permissive | MtlsMode::Disable | MtlsMode::Unset)
    }
}

impl PeerAuthenticationSpec {
    /// Istio's validation (its CRD schema and CEL rules): the first reason it
    /// would refuse the spec, naming the field.
    pub fn validate(&self) -> Result<(), Invalid> {
        if let Some(s) = &self.selector {
            s.validate("spec.selector")?;
        }
        let Some(ports) = &self.port_level_mtls else {
            return Ok(());
        };
        if ports.is_empty() {
            return Err(Invalid::new(
                "spec.portLevelMtls",
                "spec.portLevelMtls in body should have at least 1 properties",
            ));
        }
        for key in ports.keys() {
            // CEL's int(key): a key that is no number cannot be compared at all.
            let Ok(port) = key.parse::<i64>() else {
                let msg = format!("type conversion error from 'string' to 'int' (key {key:?})");
                return Err(Invalid::new("spec.portLevelMtls", msg));
            };
            if !(1..=65535).contains(&port) {
                return Err(Invalid::new(
                    format!("spec.portLevelMtls.{key}"),
                    "port must be between 1-65535",
                ));
            }
        }
        if self.selector.as_ref().is_none_or(|s| s.match_labels.is_empty()) {
            return Err(Invalid::new("spec", "portLevelMtls requires selector"));
        }
        Ok(())
    }

    fn mode(&self) -> MtlsMode {
        self.mtls.as_ref().map(|m| m.mode).unwrap_or_default()
    }

    fn workload_wide(&self) -> bool {
        self.selector.as_ref().is_none_or(|s| s.match_labels.is_empty())
    }
}

/// The mTLS a workload's inbound side enforces.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Effective {
    /// For every port without its own.
    pub mode: MtlsMode,
    /// Ports with a mode of their own (`portLevelMtls`).
    pub ports: BTreeMap<u16, MtlsMode>,
}

/// Istio's precedence for `workload`: the mesh-wide policy (root namespace, no
/// selector), overridden by its namespace's (no selector), overridden by one
/// selecting it (outside the root namespace), each only where its mode is set;
/// PERMISSIVE when none says anything. Among several at one level the oldest
/// wins (then the first by name).
pub fn effective(policies: &[Named<PeerAuthenticationSpec>], workload: &Workload) -> Effective {
    let oldest = |level: &dyn Fn(&Named<PeerAuthenticationSpec>) -> bool| {
        policies
            .iter()
            .filter(|p| level(p))
            .min_by(|a, b| (&a.created, &a.name).cmp(&(&b.created, &b.name)))
    };
    let mesh = oldest(&|p| p.namespace == ROOT_NAMESPACE && p.spec.workload_wide());
    let namespace =
        oldest(&|p| p.namespace == workload.namespace && p.namespace != ROOT_NAMESPACE && p.spec.workload_wide());
    let selecting = oldest(&|p| {
        p.namespace == workload.namespace
            && p.namespace != ROOT_NAMESPACE
            && !p.spec.workload_wide()
            && p.spec.selector.as_ref().is_some_and(|s| s.matches(&workload.labels))
    });
    let mut mode = MtlsMode::Permissive;
    for p in [mesh, namespace, selecting].into_iter().flatten() {
        if p.spec.mode() != MtlsMode::Unset {
            mode = p.spec.mode();
        }
    }
    let ports = selecting
        .and_then(|p| p.spec.port_level_mtls.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|(k, m)| {
            let port = k.parse().ok()?;
            Some((port, if m.mode == MtlsMode::Unset { mode } else { m.mode }))
        })
        .collect();
    Effective { mode, ports }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pa(ns: &str, name: &str, yaml: &str) -> Named<PeerAuthenticationSpec> {
        Named {
            namespace: ns.into(),
            name: name.into(),
            created: None,
            spec: serde_saphyr::from_str(yaml).unwrap(),
        }
    }

    fn workload(ns: &str, app: &str) -> Workload {
        Workload {
            namespace: ns.into(),
            labels: [("app".to_owned(), app.to_owned())].into(),
            ..Default::default()
        }
    }

    #[test]
    fn workload_overrides_namespace_overrides_mesh_and_unset_inherits() {
        let policies = [
            pa(ROOT_NAMESPACE, "default", "mtls: {mode: STRICT}"),
            pa("foo", "default", "mtls: {mode: PERMISSIVE}"),
            pa(
                "foo",
                "db",
                "selector: {matchLabels: {app: db}}\nmtls: {mode: UNSET}\nportLevelMtls: {'5432': {mode: DISABLE}, '9090': {}}",
            ),
            pa(
                "foo",
                "web",
                "selector: {matchLabels: {app: web}}\nmtls: {mode: STRICT}",
            ),
            // A selector in the root namespace is no workload policy (Istio ignores it).
            pa(
                ROOT_NAMESPACE,
                "odd",
                "selector: {matchLabels: {app: db}}\nmtls: {mode: DISABLE}",
            ),
        ];
        assert_eq!(
            effective(&policies, &workload("bar", "db")).mode,
            MtlsMode::Strict,
            "mesh-wide"
        );
        let db = effective(&policies, &workload("foo", "db"));
        assert_eq!(db.mode, MtlsMode::Permissive, "UNSET keeps the namespace's");
        assert_eq!(
            db.ports,
            [(5432, MtlsMode::Disable), (9090, MtlsMode::Permissive)].into(),
            "an unset port takes the workload's mode"
        );
        assert_eq!(effective(&policies, &workload("foo", "web")).mode, MtlsMode::Strict);
        assert_eq!(
            effective(&[], &workload("foo", "web")).mode,
            MtlsMode::Permissive,
            "Istio's default"
        );
    }

    #[test]
    fn the_oldest_of_two_at_one_level_wins() {
        let mut old = pa("foo", "b", "mtls: {mode: DISABLE}");
        old.created = Some("2024-01-01T00:00:00Z".into());
        let mut new = pa("foo", "a", "mtls: {mode: STRICT}");
        new.created = Some("2025-01-01T00:00:00Z".into());
        assert_eq!(effective(&[new, old], &workload("foo", "x")).mode, MtlsMode::Disable);
    }
}
