//! Gateway API's `ReferenceGrant` (`gateway.networking.k8s.io` `v1beta1`, or the older
//! `v1alpha2` of the same schema): the owner of a namespace lets objects of other
//! namespaces refer to its objects. A mesh reads the one grant that matters to it: an
//! HTTPRoute's `backendRef` to a Service of another namespace is valid only when a grant
//! in the Service's namespace has a `from` for HTTPRoutes of the route's namespace and a
//! `to` for Services (all of them, or that one by `name`). Validated with the CRD's
//! schema rules, in the API server's words.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};

use super::ValidationError;
pub use super::http_route::GROUP;

/// The versions of `ReferenceGrant` accepted (one schema); the kube source watches `v1beta1`.
pub const VERSIONS: [&str; 2] = ["v1beta1", "v1alpha2"];

/// A `ReferenceGrant` object.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReferenceGrant {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: ReferenceGrantSpec,
}

/// Who may refer (`from`) to what (`to`) in the grant's namespace.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ReferenceGrantSpec {
    pub from: Vec<GrantFrom>,
    pub to: Vec<GrantTo>,
}

/// The referring objects: those of `group`/`kind` in `namespace` (all three required).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GrantFrom {
    pub group: Option<String>,
    pub kind: Option<String>,
    pub namespace: Option<String>,
}

/// The objects referred to: those of `group`/`kind` in the grant's namespace, or the one
/// called `name`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GrantTo {
    pub group: Option<String>,
    pub kind: Option<String>,
    pub name: Option<String>,
}

/// The CRD's pattern for a group (`""` is the core group).
fn is_group(g: &str) -> bool {
    g.is_empty() || g.len() <= 253 && g.split('.').all(is_dns_label)
}

/// `^[a-z0-9]([-a-z0-9]*[a-z0-9])?$`.
fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// `^[a-zA-Z]([-a-zA-Z0-9]*[a-zA-Z0-9])?$`, 1 to 63 characters.
fn is_kind(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.starts_with(|c: char| c.is_ascii_alphabetic())
        && !s.ends_with('-')
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// The API server's refusal of a value that misses its field's pattern.
fn pattern(field: String, value: &str, pattern: &str) -> ValidationError {
    ValidationError::new(
        field.clone(),
        format!("Invalid value: \"{value}\": {field} in body should match '{pattern}'"),
    )
}

const GROUP_PATTERN: &str = r"^$|^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";
const KIND_PATTERN: &str = "^[a-zA-Z]([-a-zA-Z0-9]*[a-zA-Z0-9])?$";
const NAMESPACE_PATTERN: &str = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";

/// Checks a required `group` and `kind` of an entry at `f`.
fn group_kind(f: &str, group: Option<&str>, kind: Option<&str>) -> Result<(), ValidationError> {
    let group = group.ok_or_else(|| ValidationError::new(format!("{f}.group"), "Required value"))?;
    if !is_group(group) {
        return Err(pattern(format!("{f}.group"), group, GROUP_PATTERN));
    }
    let kind = kind.ok_or_else(|| ValidationError::new(format!("{f}.kind"), "Required value"))?;
    if !is_kind(kind) {
        return Err(pattern(format!("{f}.kind"), kind, KIND_PATTERN));
    }
    Ok(())
}

/// Checks a required list of 1 to 16 items.
fn one_to_sixteen(field: &str, len: usize) -> Result<(), ValidationError> {
    match len {
        0 => Err(ValidationError::new(field, "Required value")),
        1..=16 => Ok(()),
        n => Err(ValidationError::new(
            field,
            format!("Too many: {n}: must have at most 16 items"),
        )),
    }
}

impl ReferenceGrant {
    /// The CRD's schema rules: `from` and `to` each 1 to 16 entries; every entry's group,
    /// kind (and `from`'s namespace) present and well formed; a `to.name` not empty.
    pub fn validate(&self) -> Result<(), ValidationError> {
        one_to_sixteen("spec.from", self.spec.from.len())?;
        for (i, from) in self.spec.from.iter().enumerate() {
            let f = format!("spec.from[{i}]");
            group_kind(&f, from.group.as_deref(), from.kind.as_deref())?;
            let ns = from
                .namespace
                .as_deref()
                .ok_or_else(|| ValidationError::new(format!("{f}.namespace"), "Required value"))?;
            if ns.len() > 63 || !is_dns_label(ns) {
                return Err(pattern(format!("{f}.namespace"), ns, NAMESPACE_PATTERN));
            }
        }
        one_to_sixteen("spec.to", self.spec.to.len())?;
        for (i, to) in self.spec.to.iter().enumerate() {
            let f = format!("spec.to[{i}]");
            group_kind(&f, to.group.as_deref(), to.kind.as_deref())?;
            if let Some(name) = &to.name
                && !(1..=253).contains(&name.len())
            {
                return Err(ValidationError::new(
                    format!("{f}.name"),
                    "Invalid value: must be 1 to 253 characters",
                ));
            }
        }
        Ok(())
    }

    /// Whether this grant lets HTTPRoutes of `route_namespace` send to the Service `name`
    /// of the grant's own namespace (the caller checks the namespace is the Service's).
    pub fn lets_routes_reach(&self, route_namespace: &str, name: &str) -> bool {
        let from = self.spec.from.iter().any(|f| {
            f.group.as_deref() == Some(GROUP)
                && f.kind.as_deref() == Some("HTTPRoute")
                && f.namespace.as_deref() == Some(route_namespace)
        });
        let to = self.spec.to.iter().any(|t| {
            matches!(t.group.as_deref(), Some("" | "core"))
                && t.kind.as_deref() == Some("Service")
                && t.name.as_deref().is_none_or(|n| n == name)
        });
        from && to
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::networking::from_yaml;

    fn grant(spec: &str) -> ReferenceGrant {
        from_yaml(&format!(
            "apiVersion: gateway.networking.k8s.io/v1beta1\nkind: ReferenceGrant\nmetadata: {{name: g, namespace: ratings}}\nspec: {spec}\n"
        ))
    }

    #[test]
    fn a_grant_lets_routes_of_its_from_namespace_reach_its_services() {
        let g = grant(
            "{from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: bookinfo}], to: [{group: '', kind: Service}]}",
        );
        g.validate().unwrap();
        assert!(g.lets_routes_reach("bookinfo", "ratings"));
        assert!(!g.lets_routes_reach("other", "ratings"), "another namespace's routes");
        let named = grant(
            "{from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: bookinfo}], to: [{group: '', kind: Service, name: ratings}]}",
        );
        assert!(named.lets_routes_reach("bookinfo", "ratings"));
        assert!(
            !named.lets_routes_reach("bookinfo", "details"),
            "only the named Service"
        );
        let grpc = grant(
            "{from: [{group: gateway.networking.k8s.io, kind: GRPCRoute, namespace: bookinfo}], to: [{group: '', kind: Service}]}",
        );
        assert!(!grpc.lets_routes_reach("bookinfo", "ratings"), "another kind of route");
        let secrets = grant(
            "{from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: bookinfo}], to: [{group: '', kind: Secret}]}",
        );
        assert!(
            !secrets.lets_routes_reach("bookinfo", "ratings"),
            "another kind of target"
        );
    }

    #[test]
    fn the_crds_rules_refuse_with_the_api_servers_words() {
        let refused = |spec: &str| grant(spec).validate().unwrap_err().to_string();
        let from = "[{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: bookinfo}]";
        assert_eq!(
            refused("{to: [{group: '', kind: Service}]}"),
            "spec.from: Required value"
        );
        assert_eq!(refused(&format!("{{from: {from}}}")), "spec.to: Required value");
        assert_eq!(
            refused("{from: [{kind: HTTPRoute, namespace: x}], to: [{group: '', kind: Service}]}"),
            "spec.from[0].group: Required value"
        );
        assert_eq!(
            refused("{from: [{group: gateway.networking.k8s.io, kind: HTTPRoute}], to: [{group: '', kind: Service}]}"),
            "spec.from[0].namespace: Required value"
        );
        assert_eq!(
            refused(
                "{from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: Bookinfo}], to: [{group: '', kind: Service}]}"
            ),
            "spec.from[0].namespace: Invalid value: \"Bookinfo\": spec.from[0].namespace in body should match '^[a-z0-9]([-a-z0-9]*[a-z0-9])?$'"
        );
        assert!(
            refused(&format!("{{from: {from}, to: [{{group: '', kind: '9lives'}}]}}"))
                .starts_with("spec.to[0].kind: Invalid value")
        );
        assert_eq!(
            refused(&format!(
                "{{from: {from}, to: [{{group: '', kind: Service, name: ''}}]}}"
            )),
            "spec.to[0].name: Invalid value: must be 1 to 253 characters"
        );
        let many = vec![from.trim_matches(['[', ']']); 17].join(", ");
        assert_eq!(
            refused(&format!("{{from: [{many}], to: [{{group: '', kind: Service}}]}}")),
            "spec.from: Too many: 17: must have at most 16 items"
        );
    }
}
