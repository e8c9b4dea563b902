//! `AuthorizationPolicy`: which requests a workload accepts (ALLOW), refuses
//! (DENY) or logs (AUDIT), by who sends them (`from`), what they ask for (`to`)
//! and conditions on request attributes (`when`). Field names are Istio's.

use std::net::IpAddr;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};

use super::{Enumerated, Invalid, PolicyTargetReference, WorkloadSelector, non_empty};

/// The object: Kubernetes metadata and Istio's spec.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AuthorizationPolicy {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: AuthorizationPolicySpec,
}

super::istio_resource!(AuthorizationPolicy, "AuthorizationPolicy", "authorizationpolicies");

/// `spec`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicySpec {
    pub selector: Option<WorkloadSelector>,
    pub target_ref: Option<PolicyTargetReference>,
    #[serde(default)]
    pub target_refs: Vec<PolicyTargetReference>,
    #[serde(default)]
    pub action: Action,
    /// The external authorizer of a CUSTOM policy.
    pub provider: Option<Provider>,
    #[serde(default)]
    pub rules: Vec<Rule>,
}

/// `action`; ALLOW when unset.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Action {
    #[default]
    Allow,
    Deny,
    Audit,
    /// Delegated to an external authorizer (`provider`); not supported here.
    Custom,
}

impl Enumerated for Action {
    const VALUES: &'static [(&'static str, Self)] = &[
        ("ALLOW", Action::Allow),
        ("DENY", Action::Deny),
        ("AUDIT", Action::Audit),
        ("CUSTOM", Action::Custom),
    ];
}

impl<'de> Deserialize<'de> for Action {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Self::deserialize_enum(d)
    }
}

/// `provider` of a CUSTOM policy: a mesh config extension provider's name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Provider {
    #[serde(default)]
    pub name: String,
}

/// One rule: a request matches when it matches a `from`, a `to` and every `when`
/// (a missing `from` or `to` matches everything).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Rule {
    pub from: Option<Vec<From>>,
    pub to: Option<Vec<To>>,
    #[serde(default)]
    pub when: Vec<Condition>,
}

/// `from[]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct From {
    pub source: Option<Source>,
}

/// `from[].source`: every field set must match; within one, any value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Source {
    pub principals: Vec<String>,
    pub not_principals: Vec<String>,
    pub request_principals: Vec<String>,
    pub not_request_principals: Vec<String>,
    pub namespaces: Vec<String>,
    pub not_namespaces: Vec<String>,
    pub ip_blocks: Vec<String>,
    pub not_ip_blocks: Vec<String>,
    pub remote_ip_blocks: Vec<String>,
    pub not_remote_ip_blocks: Vec<String>,
    pub service_accounts: Vec<String>,
    pub not_service_accounts: Vec<String>,
    pub trust_domains: Vec<String>,
    pub not_trust_domains: Vec<String>,
}

/// `to[]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct To {
    pub operation: Option<Operation>,
}

/// `to[].operation`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Operation {
    pub hosts: Vec<String>,
    pub not_hosts: Vec<String>,
    pub ports: Vec<String>,
    pub not_ports: Vec<String>,
    pub methods: Vec<String>,
    pub not_methods: Vec<String>,
    pub paths: Vec<String>,
    pub not_paths: Vec<String>,
}

/// `when[]`: an Istio attribute (`source.ip`, `request.headers[x-user]`, …) and the
/// values it must (not) take.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    pub key: String,
    #[serde(default)]
    pub values: Vec<String>,
    #[serde(default)]
    pub not_values: Vec<String>,
}

/// The attributes `when` may name, exactly (the rest are prefixes: see [`attribute_known`]).
const ATTRIBUTES: &[&str] = &[
    "source.ip",
    "remote.ip",
    "source.namespace",
    "source.principal",
    "source.trustDomain",
    "request.auth.principal",
    "request.auth.audiences",
    "request.auth.presenter",
    "destination.ip",
    "destination.port",
    "connection.sni",
];

/// Whether Istio knows the attribute `key`.
fn attribute_known(key: &str) -> bool {
    let bracketed = |prefix: &str| {
        key.strip_prefix(prefix)
            .is_some_and(|r| r.len() > 2 && r.starts_with('[') && r.ends_with(']'))
    };
    ATTRIBUTES.contains(&key)
        || bracketed("request.headers")
        || bracketed("request.auth.claims")
        || key
            .strip_prefix("experimental.envoy.filters.")
            .is_some_and(|r| r.ends_with(']') && r.contains('['))
}

/// An IP address or CIDR range, as `ipBlocks` and the IP attributes take them.
pub fn parse_cidr(s: &str) -> Option<(IpAddr, u32)> {
    let (ip, len) = match s.split_once('/') {
        Some((ip, len)) => (ip.parse::<IpAddr>().ok()?, Some(len.parse::<u32>().ok()?)),
        None => (s.parse().ok()?, None),
    };
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let len = len.unwrap_or(max);
    (len <= max).then_some((ip, len))
}

/// A port as `ports` and `destination.port` take it.
pub fn parse_port(s: &str) -> Option<u16> {
    s.parse().ok()
}

fn ips(field: &str, values: &[String]) -> Result<(), Invalid> {
    match values.iter().find(|v| parse_cidr(v).is_none()) {
        Some(bad) => Err(Invalid::new(
            field,
            format!("invalid IP address or CIDR range: {bad:?}"),
        )),
        None => Ok(()),
    }
}

fn ports(field: &str, values: &[String]) -> Result<(), Invalid> {
    match values.iter().find(|v| parse_port(v).is_none()) {
        Some(bad) => Err(Invalid::new(
            field,
            format!("bad port ({bad}): must be a number in 0-65535"),
        )),
        None => Ok(()),
    }
}

/// Istio's supported paths: `*` only as a whole prefix or suffix, or a template
/// whose `{*}` / `{**}` stand for whole segments.
fn paths(field: &str, values: &[String]) -> Result<(), Invalid> {
    for p in values {
        let ok = if p.contains('{') || p.contains('}') {
            p.starts_with('/')
                && p[1..].split('/').all(|seg| {
                    !(seg.contains('{') || seg.contains('}') || seg.contains('*')) || seg == "{*}" || seg == "{**}"
                })
        } else {
            let inner = p.trim_start_matches('*').trim_end_matches('*');
            p == "*" || !inner.contains('*')
        };
        if !ok {
            return Err(Invalid::new(field, format!("invalid or unsupported path {p}")));
        }
    }
    Ok(())
}

/// Whether `policy` applies to `workload`'s sidecar: by its selector (none or an
/// empty one: every workload) in the workload's namespace, or in the root
/// namespace for every namespace. A policy attached by `targetRef(s)` is for
/// gateways and waypoints, never for a sidecar.
pub fn applies_to(policy: &super::Named<AuthorizationPolicySpec>, workload: &super::Workload) -> bool {
    let spec = &policy.spec;
    if spec.target_ref.is_some() || !spec.target_refs.is_empty() {
        return false;
    }
    (policy.namespace == workload.namespace || policy.namespace == super::ROOT_NAMESPACE)
        && spec.selector.as_ref().is_none_or(|s| s.matches(&workload.labels))
}

impl Source {
    fn is_empty(&self) -> bool {
        self == &Source::default()
    }
}

impl Operation {
    fn is_empty(&self) -> bool {
        self == &Operation::default()
    }
}

impl AuthorizationPolicySpec {
    /// Istio's validation (its CRD schema, CEL rules and webhook): the first
    /// reason it would refuse the spec, naming the field.
    pub fn validate(&self) -> Result<(), Invalid> {
        let set = usize::from(self.selector.is_some())
            + usize::from(self.target_ref.is_some())
            + usize::from(!self.target_refs.is_empty());
        if set > 1 {
            return Err(Invalid::new("spec", "only one of targetRefs or selector can be set"));
        }
        if let Some(s) = &self.selector {
            s.validate("spec.selector")?;
        }
        if let Some(t) = &self.target_ref {
            t.validate("spec.targetRef")?;
        }
        if self.target_refs.len() > 16 {
            return Err(Invalid::new("spec.targetRefs", "Too many: must have at most 16 items"));
        }
        for (i, t) in self.target_refs.iter().enumerate() {
            t.validate(&format!("spec.targetRefs[{i}]"))?;
        }
        match (self.action, &self.provider) {
            (Action::Custom, None) => {
                return Err(Invalid::new("spec.provider", "a CUSTOM action needs a provider"));
            }
            (Action::Custom, Some(p)) if p.name.is_empty() => {
                return Err(Invalid::new(
                    "spec.provider.name",
                    "a CUSTOM action needs a provider name",
                ));
            }
            (Action::Custom, Some(_)) | (_, None) => {}
            (_, Some(_)) => {
                return Err(Invalid::new(
                    "spec.provider",
                    "provider is only allowed for the CUSTOM action",
                ));
            }
        }
        if self.rules.len() > 512 {
            return Err(Invalid::new("spec.rules", "Too many: must have at most 512 items"));
        }
        for (i, rule) in self.rules.iter().enumerate() {
            rule.validate(&format!("spec.rules[{i}]"), i)?;
        }
        Ok(())
    }
}

impl Rule {
    fn validate(&self, at: &str, i: usize) -> Result<(), Invalid> {
        if let Some(from) = &self.from {
            if from.is_empty() {
                return Err(Invalid::new(
                    format!("{at}.from"),
                    format!("`from` must not be empty, found at rule {i}"),
                ));
            }
            if from.len() > 512 {
                return Err(Invalid::new(
                    format!("{at}.from"),
                    "Too many: must have at most 512 items",
                ));
            }
            for (j, f) in from.iter().enumerate() {
                let field = format!("{at}.from[{j}].source");
                let Some(s) = &f.source else {
                    return Err(Invalid::new(
                        field,
                        format!("`from.source` must not be nil, found at rule {i}"),
                    ));
                };
                s.validate(&field, i)?;
            }
        }
        if let Some(to) = &self.to {
            if to.is_empty() {
                return Err(Invalid::new(
                    format!("{at}.to"),
                    format!("`to` must not be empty, found at rule {i}"),
                ));
            }
            for (j, t) in to.iter().enumerate() {
                let field = format!("{at}.to[{j}].operation");
                let Some(o) = &t.operation else {
                    return Err(Invalid::new(
                        field,
                        format!("`to.operation` must not be nil, found at rule {i}"),
                    ));
                };
                o.validate(&field, i)?;
            }
        }
        for (j, c) in self.when.iter().enumerate() {
            c.validate(&format!("{at}.when[{j}]"))?;
        }
        Ok(())
    }
}

impl Source {
    fn validate(&self, at: &str, i: usize) -> Result<(), Invalid> {
        if self.is_empty() {
            return Err(Invalid::new(
                at,
                format!("`from.source` must not be empty, found at rule {i}"),
            ));
        }
        let accounts = !self.service_accounts.is_empty() || !self.not_service_accounts.is_empty();
        let identities = !self.principals.is_empty()
            || !self.not_principals.is_empty()
            || !self.namespaces.is_empty()
            || !self.not_namespaces.is_empty();
        if accounts && identities {
            return Err(Invalid::new(
                at,
                "Cannot set serviceAccounts with namespaces or principals",
            ));
        }
        for (name, values) in [
            ("serviceAccounts", &self.service_accounts),
            ("notServiceAccounts", &self.not_service_accounts),
        ] {
            if values.len() > 16 {
                return Err(Invalid::new(
                    format!("{at}.{name}"),
                    "Too many: must have at most 16 items",
                ));
            }
            if values.iter().any(|v| v.len() > 320) {
                return Err(Invalid::new(
                    format!("{at}.{name}"),
                    "Too long: may not be longer than 320",
                ));
            }
        }
        for (name, values) in [
            ("ipBlocks", &self.ip_blocks),
            ("notIpBlocks", &self.not_ip_blocks),
            ("remoteIpBlocks", &self.remote_ip_blocks),
            ("notRemoteIpBlocks", &self.not_remote_ip_blocks),
        ] {
            ips(&format!("{at}.{name}"), values)?;
        }
        for (name, values) in [
            ("principals", &self.principals),
            ("notPrincipals", &self.not_principals),
            ("requestPrincipals", &self.request_principals),
            ("notRequestPrincipals", &self.not_request_principals),
            ("namespaces", &self.namespaces),
            ("notNamespaces", &self.not_namespaces),
            ("serviceAccounts", &self.service_accounts),
            ("notServiceAccounts", &self.not_service_accounts),
            ("trustDomains", &self.trust_domains),
            ("notTrustDomains", &self.not_trust_domains),
        ] {
            non_empty(&format!("{at}.{name}"), name, values)?;
        }
        Ok(())
    }
}

impl Operation {
    fn validate(&self, at: &str, i: usize) -> Result<(), Invalid> {
        if self.is_empty() {
            return Err(Invalid::new(
                at,
                format!("`to.operation` must not be empty, found at rule {i}"),
            ));
        }
        ports(&format!("{at}.ports"), &self.ports)?;
        ports(&format!("{at}.notPorts"), &self.not_ports)?;
        paths(&format!("{at}.paths"), &self.paths)?;
        paths(&format!("{at}.notPaths"), &self.not_paths)?;
        for (name, values) in [
            ("hosts", &self.hosts),
            ("notHosts", &self.not_hosts),
            ("methods", &self.methods),
            ("notMethods", &self.not_methods),
            ("paths", &self.paths),
            ("notPaths", &self.not_paths),
        ] {
            non_empty(&format!("{at}.{name}"), name, values)?;
        }
        Ok(())
    }
}

impl Condition {
    fn validate(&self, at: &str) -> Result<(), Invalid> {
        let key = self.key.as_str();
        if key.is_empty() {
            return Err(Invalid::new(format!("{at}.key"), "`key` must not be empty"));
        }
        if !attribute_known(key) {
            return Err(Invalid::new(format!("{at}.key"), format!("unknown attribute ({key})")));
        }
        if self.values.is_empty() && self.not_values.is_empty() {
            let msg = format!("at least one of `values` or `notValues` must be set for key {key}");
            return Err(Invalid::new(at, msg));
        }
        for (name, values) in [("values", &self.values), ("notValues", &self.not_values)] {
            let field = format!("{at}.{name}");
            match key {
                "source.ip" | "remote.ip" | "destination.ip" => ips(&field, values)?,
                "destination.port" => ports(&field, values)?,
                _ => non_empty(&field, name, values)?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> AuthorizationPolicySpec {
        serde_saphyr::from_str(yaml).unwrap()
    }

    #[test]
    fn reads_istios_names_and_defaults_to_allow() {
        let s = spec(
            "selector: {matchLabels: {app: httpbin}}\nrules:\n- from: [{source: {principals: [a], notIpBlocks: [10.0.0.0/8]}}]\n  to: [{operation: {methods: [GET], notPaths: [/admin]}}]\n  when: [{key: 'request.headers[x-user]', values: [bob]}]\n",
        );
        assert_eq!(s.action, Action::Allow);
        let r = &s.rules[0];
        let src = r.from.as_ref().unwrap()[0].source.as_ref().unwrap();
        assert_eq!(
            (src.principals.as_slice(), src.not_ip_blocks.as_slice()),
            (&["a".to_owned()][..], &["10.0.0.0/8".to_owned()][..])
        );
        assert_eq!(
            r.to.as_ref().unwrap()[0].operation.as_ref().unwrap().not_paths,
            ["/admin"]
        );
        assert_eq!(r.when[0].key, "request.headers[x-user]");
        assert!(s.validate().is_ok());
    }

    #[test]
    fn an_unknown_action_is_refused_as_the_api_server_does() {
        let e = serde_saphyr::from_str::<AuthorizationPolicySpec>("action: PERMIT\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains(r#"Unsupported value: "PERMIT""#), "{e}");
    }

    #[test]
    fn validation_names_the_field_and_gives_istios_reason() {
        let cases = [
            (
                "rules: [{from: []}]",
                "spec.rules[0].from",
                "`from` must not be empty, found at rule 0",
            ),
            (
                "rules: [{to: [{}]}]",
                "spec.rules[0].to[0].operation",
                "`to.operation` must not be nil, found at rule 0",
            ),
            (
                "rules: [{to: [{operation: {ports: [http]}}]}]",
                "spec.rules[0].to[0].operation.ports",
                "bad port (http)",
            ),
            (
                "rules: [{from: [{source: {ipBlocks: [1.2.3.4/40]}}]}]",
                "spec.rules[0].from[0].source.ipBlocks",
                "invalid IP",
            ),
            (
                "rules: [{when: [{key: source.ip}]}]",
                "spec.rules[0].when[0]",
                "at least one of `values` or `notValues`",
            ),
            (
                "rules: [{when: [{key: source.color, values: [red]}]}]",
                "spec.rules[0].when[0].key",
                "unknown attribute (source.color)",
            ),
            ("action: CUSTOM", "spec.provider", "needs a provider"),
            (
                "provider: {name: x}",
                "spec.provider",
                "only allowed for the CUSTOM action",
            ),
            (
                "selector: {}\ntargetRef: {kind: Gateway, name: g}",
                "spec",
                "only one of targetRefs or selector",
            ),
            (
                "selector: {matchLabels: {app: '*'}}",
                "spec.selector.matchLabels.app",
                "wildcard not allowed",
            ),
            (
                "rules: [{to: [{operation: {paths: ['/a*b']}}]}]",
                "spec.rules[0].to[0].operation.paths",
                "invalid or unsupported path",
            ),
        ];
        for (yaml, field, reason) in cases {
            let e = spec(yaml).validate().unwrap_err();
            assert_eq!(e.field, field, "{yaml}");
            assert!(e.message.contains(reason), "{yaml}: {e}");
        }
    }
}
