//! AuthorizationPolicy → Envoy RBAC (`envoy.config.rbac.v3.RBAC`), as istiod's
//! authz builder makes it, so a real Envoy and our sidecar enforce what Istio
//! would.
//!
//! Per rule one RBAC policy named `ns[NS]-policy[NAME]-rule[i]`: its permissions
//! are one per `to` (all of that operation's fields, each any of its values), its
//! principals one per `from`; `when` conditions join every permission (destination
//! attributes) or every principal (source and request attributes). HTTP-only
//! fields on a TCP filter chain drop the whole rule from an ALLOW policy (so it
//! allows less) and only themselves from a DENY or AUDIT policy (so it matches
//! more). A policy without rules matches nothing, so an ALLOW policy with no
//! rules denies everything.

use envoy_types::pb::envoy::config::core::v3::{CidrRange, TypedExtensionConfig};
use envoy_types::pb::envoy::config::rbac::v3::Permission;
use envoy_types::pb::envoy::config::rbac::v3::{
    MetadataSource, Policy, Principal, Rbac, SourcedMetadata, permission, principal, rbac::Action as RbacAction,
};
use envoy_types::pb::envoy::config::route::v3::{HeaderMatcher, header_matcher};
use envoy_types::pb::envoy::extensions::path::r#match::uri_template::v3::UriTemplateMatchConfig;
use envoy_types::pb::envoy::r#type::matcher::v3::{
    ListMatcher, MetadataMatcher, PathMatcher, RegexMatcher, StringMatcher, ValueMatcher, list_matcher,
    metadata_matcher, path_matcher, string_matcher, value_matcher,
};
use envoy_types::pb::google::protobuf::UInt32Value;

use super::any;
use crate::security::Named;
use crate::security::authorization_policy::{Action, AuthorizationPolicySpec, Condition, Rule, parse_cidr, parse_port};

/// The HTTP RBAC filter's name and config type.
pub const HTTP_RBAC: &str = "envoy.filters.http.rbac";
pub const HTTP_RBAC_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC";
/// The network RBAC filter's name and config type.
pub const NETWORK_RBAC: &str = "envoy.filters.network.rbac";
pub const NETWORK_RBAC_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC";
const SPIFFE: &str = "spiffe://";
/// Istio's stand-in for "the local trust domain" in principals.
const CLUSTER_LOCAL: &str = "cluster.local";

/// The RBAC configs of one filter chain, in Istio's order: DENY (with CUSTOM,
/// which this controller cannot delegate, denying everything it selects),
/// ALLOW, then AUDIT (as LOG). None where no policy of that action applies.
pub fn configs(policies: &[&Named<AuthorizationPolicySpec>], for_tcp: bool, trust_domain: &str) -> Vec<Rbac> {
    [
        (RbacAction::Deny, &[Action::Deny, Action::Custom][..]),
        (RbacAction::Allow, &[Action::Allow]),
        (RbacAction::Log, &[Action::Audit]),
    ]
    .into_iter()
    .filter_map(|(action, of)| {
        let selected: Vec<_> = policies
            .iter()
            .filter(|p| of.contains(&p.spec.action))
            .copied()
            .collect();
        (!selected.is_empty()).then(|| build(&selected, action, for_tcp, trust_domain))
    })
    .collect()
}

/// The HTTP filter config of `rules`.
pub fn http_filter(rules: &Rbac) -> envoy_types::pb::google::protobuf::Any {
    use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac as HttpRbac;
    any(
        HTTP_RBAC_TYPE,
        &HttpRbac {
            rules: Some(rules.clone()),
            ..Default::default()
        },
    )
}

/// The network filter config of `rules`.
pub fn network_filter(rules: &Rbac) -> envoy_types::pb::google::protobuf::Any {
    use envoy_types::pb::envoy::extensions::filters::network::rbac::v3::Rbac as NetworkRbac;
    any(
        NETWORK_RBAC_TYPE,
        &NetworkRbac {
            rules: Some(rules.clone()),
            // Required by Envoy; Istio's.
            stat_prefix: "tcp.".into(),
            ..Default::default()
        },
    )
}

fn build(policies: &[&Named<AuthorizationPolicySpec>], action: RbacAction, for_tcp: bool, td: &str) -> Rbac {
    let mut rbac = Rbac {
        action: action as i32,
        ..Default::default()
    };
    for p in policies {
        let name = |i: usize| format!("ns[{}]-policy[{}]-rule[{i}]", p.namespace, p.name);
        if p.spec.action == Action::Custom {
            // Said once per model where it is read (crate::security::ClusterSecurity::build).
            rbac.policies.insert(name(0), match_everything());
            continue;
        }
        for (i, rule) in p.spec.rules.iter().enumerate() {
            match policy(rule, &p.namespace, for_tcp, action, td) {
                Ok(generated) => {
                    rbac.policies.insert(name(i), generated);
                }
                Err(HttpOnly(field)) => {
                    tracing::debug!(
                        rule = name(i),
                        field,
                        "ALLOW rule dropped on a TCP filter chain: it needs HTTP"
                    );
                }
            }
        }
        if p.spec.rules.is_empty() {
            rbac.policies.insert(name(0), match_nothing());
        }
    }
    rbac
}

/// An ALLOW rule needs an HTTP attribute on a TCP chain.
struct HttpOnly(&'static str);

/// The attributes a rule matches on: what each value becomes in Envoy.
#[derive(Clone, Copy)]
enum Attr<'a> {
    // Principals.
    SourcePrincipal,
    SourceNamespace,
    SourceIp,
    RemoteIp,
    ServiceAccount {
        policy_namespace: &'a str,
    },
    TrustDomain,
    /// A request's JWT principal, audiences, presenter or claims.
    RequestAuth,
    RequestHeader(&'a str),
    // Permissions.
    Host,
    Method,
    Path,
    DestinationPort,
    DestinationIp,
    Sni,
    FilterMetadata(&'a str, &'a str),
}

/// One attribute with the values it must and must not take.
#[derive(Clone, Copy)]
struct Field<'a> {
    attr: Attr<'a>,
    values: &'a [String],
    not_values: &'a [String],
}

/// A rule's principals (one list of fields per `from`) and permissions (one per `to`).
fn fields<'a>(rule: &'a Rule, policy_namespace: &'a str) -> (Vec<Vec<Field<'a>>>, Vec<Vec<Field<'a>>>) {
    let mut base_principal = Vec::new();
    let mut base_permission = Vec::new();
    for Condition {
        key,
        values,
        not_values,
    } in &rule.when
    {
        let (attr, principal) = when_attr(key);
        let f = Field {
            attr,
            values,
            not_values,
        };
        if principal {
            base_principal.push(f);
        } else {
            base_permission.push(f);
        }
    }
    let field = |attr, values: &'a [String], not_values: &'a [String]| {
        (!values.is_empty() || !not_values.is_empty()).then_some(Field {
            attr,
            values,
            not_values,
        })
    };
    let principals = match &rule.from {
        None => vec![base_principal],
        Some(from) => from
            .iter()
            .map(|f| {
                let mut out: Vec<Field<'a>> = Vec::new();
                if let Some(s) = &f.source {
                    // Istio's order: each inserted at the front, so the last listed comes first.
                    out.extend(
                        [
                            field(
                                Attr::ServiceAccount { policy_namespace },
                                &s.service_accounts,
                                &s.not_service_accounts,
                            ),
                            field(Attr::SourcePrincipal, &s.principals, &s.not_principals),
                            field(Attr::RequestAuth, &s.request_principals, &s.not_request_principals),
                            field(Attr::SourceNamespace, &s.namespaces, &s.not_namespaces),
                            field(Attr::RemoteIp, &s.remote_ip_blocks, &s.not_remote_ip_blocks),
                            field(Attr::SourceIp, &s.ip_blocks, &s.not_ip_blocks),
                            field(Attr::TrustDomain, &s.trust_domains, &s.not_trust_domains),
                        ]
                        .into_iter()
                        .flatten(),
                    );
                }
                out.extend(base_principal.iter().copied());
                out
            })
            .collect(),
    };
    let permissions = match &rule.to {
        None => vec![base_permission],
        Some(to) => to
            .iter()
            .map(|t| {
                let mut out: Vec<Field<'a>> = Vec::new();
                if let Some(o) = &t.operation {
                    out.extend(
                        [
                            field(Attr::Host, &o.hosts, &o.not_hosts),
                            field(Attr::Method, &o.methods, &o.not_methods),
                            field(Attr::Path, &o.paths, &o.not_paths),
                            field(Attr::DestinationPort, &o.ports, &o.not_ports),
                        ]
                        .into_iter()
                        .flatten(),
                    );
                }
                out.extend(base_permission.iter().copied());
                out
            })
            .collect(),
    };
    (principals, permissions)
}

/// The attribute a `when` key names, and whether it is about the source (a principal).
fn when_attr(key: &str) -> (Attr<'_>, bool) {
    let bracket = |prefix: &str| {
        key.strip_prefix(prefix)
            .map(|r| r.trim_start_matches('[').trim_end_matches(']'))
    };
    match key {
        "source.ip" => (Attr::SourceIp, true),
        "remote.ip" => (Attr::RemoteIp, true),
        "source.namespace" => (Attr::SourceNamespace, true),
        "source.principal" => (Attr::SourcePrincipal, true),
        "source.trustDomain" => (Attr::TrustDomain, true),
        "request.auth.principal" | "request.auth.audiences" | "request.auth.presenter" => (Attr::RequestAuth, true),
        "destination.ip" => (Attr::DestinationIp, false),
        "destination.port" => (Attr::DestinationPort, false),
        "connection.sni" => (Attr::Sni, false),
        _ => {
            if let Some(h) = bracket("request.headers") {
                (Attr::RequestHeader(h), true)
            } else if bracket("request.auth.claims").is_some() {
                (Attr::RequestAuth, true)
            } else {
                // `experimental.envoy.filters.NAME[KEY]` (validation admits no other key).
                let rest = key.strip_prefix("experimental.").unwrap_or(key);
                let (filter, k) = rest.split_once('[').unwrap_or((rest, ""));
                (Attr::FilterMetadata(filter, k.trim_end_matches(']')), false)
            }
        }
    }
}

fn policy(rule: &Rule, ns: &str, for_tcp: bool, action: RbacAction, td: &str) -> Result<Policy, HttpOnly> {
    let (principals, permissions) = fields(rule, ns);
    let permissions = permissions
        .iter()
        .map(|fs| {
            let and = conjunction(fs, action, |f, v| permission_of(f.attr, v, for_tcp))?;
            Ok(and_permissions(and))
        })
        .collect::<Result<Vec<_>, HttpOnly>>()?;
    let principals = principals
        .iter()
        .map(|fs| {
            let and = conjunction(fs, action, |f, v| principal_of(f.attr, v, for_tcp, td))?;
            Ok(and_principals(and))
        })
        .collect::<Result<Vec<_>, HttpOnly>>()?;
    Ok(Policy {
        permissions,
        principals,
        ..Default::default()
    })
}

/// Something RBAC combines with and / or / not.
trait Combinable: Sized {
    fn or(items: Vec<Self>) -> Self;
    fn not(self) -> Self;
}

impl Combinable for Permission {
    fn or(rules: Vec<Self>) -> Self {
        permission_rule(permission::Rule::OrRules(permission::Set { rules }))
    }
    fn not(self) -> Self {
        permission_rule(permission::Rule::NotRule(Box::new(self)))
    }
}

impl Combinable for Principal {
    fn or(ids: Vec<Self>) -> Self {
        principal_id(principal::Identifier::OrIds(principal::Set { ids }))
    }
    fn not(self) -> Self {
        principal_id(principal::Identifier::NotId(Box::new(self)))
    }
}

/// Per field, any of its values and none of its not-values. An HTTP-only value on
/// a TCP chain fails an ALLOW rule and is left out of the others.
fn conjunction<T: Combinable>(
    fields: &[Field<'_>],
    action: RbacAction,
    convert: impl Fn(&Field<'_>, &str) -> Result<Vec<T>, HttpOnly>,
) -> Result<Vec<T>, HttpOnly> {
    let mut and = Vec::new();
    for f in fields {
        for (values, negate) in [(f.values, false), (f.not_values, true)] {
            let mut or = Vec::new();
            for v in values {
                match convert(f, v) {
                    Ok(items) => or.extend(items),
                    Err(e) if action == RbacAction::Allow => return Err(e),
                    Err(_) => {}
                }
            }
            if !or.is_empty() {
                let any_of = T::or(or);
                and.push(if negate { any_of.not() } else { any_of });
            }
        }
    }
    Ok(and)
}

fn permission_rule(rule: permission::Rule) -> Permission {
    Permission { rule: Some(rule) }
}

fn principal_id(id: principal::Identifier) -> Principal {
    Principal { identifier: Some(id) }
}

fn and_permissions(rules: Vec<Permission>) -> Permission {
    let rules = if rules.is_empty() {
        vec![permission_rule(permission::Rule::Any(true))]
    } else {
        rules
    };
    permission_rule(permission::Rule::AndRules(permission::Set { rules }))
}

fn and_principals(ids: Vec<Principal>) -> Principal {
    let ids = if ids.is_empty() {
        vec![principal_id(principal::Identifier::Any(true))]
    } else {
        ids
    };
    principal_id(principal::Identifier::AndIds(principal::Set { ids }))
}

/// Istio's policy for a policy without rules: matches no request.
fn match_nothing() -> Policy {
    Policy {
        permissions: vec![permission_rule(permission::Rule::NotRule(Box::new(permission_rule(
            permission::Rule::Any(true),
        ))))],
        principals: vec![principal_id(principal::Identifier::NotId(Box::new(principal_id(
            principal::Identifier::Any(true),
        ))))],
        ..Default::default()
    }
}

/// Matches every request.
fn match_everything() -> Policy {
    Policy {
        permissions: vec![permission_rule(permission::Rule::Any(true))],
        principals: vec![principal_id(principal::Identifier::Any(true))],
        ..Default::default()
    }
}

fn permission_of(attr: Attr<'_>, v: &str, for_tcp: bool) -> Result<Vec<Permission>, HttpOnly> {
    let http_only = |name| if for_tcp { Err(HttpOnly(name)) } else { Ok(()) };
    let rule = match attr {
        Attr::Host => {
            http_only("hosts")?;
            permission::Rule::Header(host_matcher(v))
        }
        Attr::Method => {
            http_only("methods")?;
            permission::Rule::Header(header_matcher(":method", v))
        }
        Attr::Path => {
            http_only("paths")?;
            if v.contains('{') {
                permission::Rule::UriTemplate(TypedExtensionConfig {
                    name: "uri-template".into(),
                    typed_config: Some(any(
                        "type.googleapis.com/envoy.extensions.path.match.uri_template.v3.UriTemplateMatchConfig",
                        // Istio's `{*}` / `{**}` are Envoy's `*` / `**` segments.
                        &UriTemplateMatchConfig {
                            path_template: v.replace("{**}", "**").replace("{*}", "*"),
                        },
                    )),
                })
            } else {
                permission::Rule::UrlPath(PathMatcher {
                    rule: Some(path_matcher::Rule::Path(string(v, ""))),
                })
            }
        }
        Attr::DestinationPort => permission::Rule::DestinationPort(u32::from(parse_port(v).unwrap_or_default())),
        Attr::DestinationIp => permission::Rule::DestinationIp(cidr(v)),
        Attr::Sni => permission::Rule::RequestedServerName(string(v, "")),
        Attr::FilterMetadata(filter, key) => {
            permission::Rule::SourcedMetadata(dynamic(list_metadata(filter, &[key], string(v, ""))))
        }
        _ => unreachable!("a source attribute is a principal"),
    };
    Ok(vec![permission_rule(rule)])
}

fn principal_of(attr: Attr<'_>, v: &str, for_tcp: bool, td: &str) -> Result<Vec<Principal>, HttpOnly> {
    let http_only = |name| if for_tcp { Err(HttpOnly(name)) } else { Ok(()) };
    let authenticated = |m: StringMatcher| {
        principal_id(principal::Identifier::Authenticated(principal::Authenticated {
            principal_name: Some(m),
        }))
    };
    let ids = match attr {
        Attr::SourcePrincipal => with_trust_domain_aliases(v, td)
            .iter()
            .map(|p| authenticated(string(p, SPIFFE)))
            .collect(),
        Attr::SourceNamespace => vec![authenticated(regex(&format!(".*/ns/{}/.*", v.replace('*', ".*"))))],
        Attr::ServiceAccount { policy_namespace } => {
            let (ns, sa) = v.split_once('/').unwrap_or((policy_namespace, v));
            vec![authenticated(exact(&format!("{SPIFFE}{td}/ns/{ns}/sa/{sa}")))]
        }
        Attr::TrustDomain => vec![authenticated(trust_domain_matcher(v))],
        Attr::SourceIp => vec![principal_id(principal::Identifier::DirectRemoteIp(cidr(v)))],
        Attr::RemoteIp => vec![principal_id(principal::Identifier::RemoteIp(cidr(v)))],
        Attr::RequestAuth => {
            http_only("request.auth")?;
            // Istio matches these on the metadata its JWT filter leaves under
            // `istio_authn`. This controller serves no RequestAuthentication, so no
            // request carries any and such a matcher could never match: said directly,
            // so our sidecar (which reads no metadata) enforces it instead of refusing
            // the listener.
            vec![principal_id(principal::Identifier::NotId(Box::new(principal_id(
                principal::Identifier::Any(true),
            ))))]
        }
        Attr::RequestHeader(name) => {
            http_only("request.headers")?;
            vec![principal_id(principal::Identifier::Header(header_matcher(name, v)))]
        }
        _ => unreachable!("a destination attribute is a permission"),
    };
    Ok(ids)
}

/// Istio's trust-domain migration: a principal of `cluster.local` (Istio's
/// stand-in for the local trust domain) or of the local one stands for the local
/// one; a principal of another trust domain (a federated one) is kept as it is.
fn with_trust_domain_aliases(principal: &str, td: &str) -> Vec<String> {
    if principal.starts_with('*') {
        return vec![principal.to_owned()];
    }
    match principal.split_once("/ns/") {
        Some((from, rest)) if from == CLUSTER_LOCAL || from == td => vec![format!("{td}/ns/{rest}")],
        _ => vec![principal.to_owned()],
    }
}

fn trust_domain_matcher(v: &str) -> StringMatcher {
    if v == "*" {
        regex(&format!("{}.+", regex::escape(SPIFFE)))
    } else if let Some(suffix) = v.strip_prefix('*') {
        regex(&format!("{}.*{}/.*", regex::escape(SPIFFE), regex::escape(suffix)))
    } else if let Some(prefix) = v.strip_suffix('*') {
        prefix_matcher(&format!("{SPIFFE}{prefix}"))
    } else {
        prefix_matcher(&format!("{SPIFFE}{v}/"))
    }
}

/// Istio's `StringMatcherWithPrefix`: `*` is any non-empty value, `*x` ends
/// with x, `x*` starts with x, else exact; `prefix` (`spiffe://`) comes first.
fn string(v: &str, prefix: &str) -> StringMatcher {
    if v == "*" {
        regex(".+")
    } else if let Some(suffix) = v.strip_prefix('*') {
        if prefix.is_empty() {
            matcher(string_matcher::MatchPattern::Suffix(suffix.into()), false)
        } else {
            regex(&format!("{}.*{}", regex::escape(prefix), regex::escape(suffix)))
        }
    } else if let Some(p) = v.strip_suffix('*') {
        prefix_matcher(&format!("{prefix}{p}"))
    } else {
        exact(&format!("{prefix}{v}"))
    }
}

fn matcher(pattern: string_matcher::MatchPattern, ignore_case: bool) -> StringMatcher {
    StringMatcher {
        match_pattern: Some(pattern),
        ignore_case,
    }
}

fn exact(v: &str) -> StringMatcher {
    matcher(string_matcher::MatchPattern::Exact(v.into()), false)
}

fn prefix_matcher(v: &str) -> StringMatcher {
    matcher(string_matcher::MatchPattern::Prefix(v.into()), false)
}

fn regex(r: &str) -> StringMatcher {
    matcher(
        string_matcher::MatchPattern::SafeRegex(RegexMatcher {
            regex: r.into(),
            ..Default::default()
        }),
        false,
    )
}

/// Istio's `HeaderMatcher`: `*` is presence, `*x` / `x*` suffix / prefix, else exact.
fn header_matcher(name: &str, v: &str) -> HeaderMatcher {
    header(name, v, false)
}

/// Istio's `HostMatcher`: [`header_matcher`] on `:authority`, ignoring case.
fn host_matcher(v: &str) -> HeaderMatcher {
    header(":authority", v, true)
}

fn header(name: &str, v: &str, ignore_case: bool) -> HeaderMatcher {
    use string_matcher::MatchPattern;
    let specifier = if v == "*" {
        header_matcher::HeaderMatchSpecifier::PresentMatch(true)
    } else {
        let pattern = if let Some(s) = v.strip_prefix('*') {
            MatchPattern::Suffix(s.into())
        } else if let Some(p) = v.strip_suffix('*') {
            MatchPattern::Prefix(p.into())
        } else {
            MatchPattern::Exact(v.into())
        };
        header_matcher::HeaderMatchSpecifier::StringMatch(matcher(pattern, ignore_case))
    };
    HeaderMatcher {
        name: name.to_ascii_lowercase(),
        header_match_specifier: Some(specifier),
        ..Default::default()
    }
}

fn cidr(v: &str) -> CidrRange {
    let (ip, len) = parse_cidr(v).unwrap_or((std::net::Ipv4Addr::UNSPECIFIED.into(), 32));
    CidrRange {
        address_prefix: ip.to_string(),
        prefix_len: Some(UInt32Value { value: len }),
    }
}

fn value_string(m: StringMatcher) -> ValueMatcher {
    ValueMatcher {
        match_pattern: Some(value_matcher::MatchPattern::StringMatch(m)),
    }
}

fn metadata(filter: &str, path: &[&str], value: ValueMatcher) -> MetadataMatcher {
    MetadataMatcher {
        filter: filter.into(),
        path: path
            .iter()
            .map(|k| metadata_matcher::PathSegment {
                segment: Some(metadata_matcher::path_segment::Segment::Key((*k).into())),
            })
            .collect(),
        value: Some(value),
        invert: false,
    }
}

/// `m` on the dynamic metadata (the filters' own), where Istio's authn filter writes.
fn dynamic(m: MetadataMatcher) -> SourcedMetadata {
    SourcedMetadata {
        metadata_matcher: Some(m),
        metadata_source: MetadataSource::Dynamic as i32,
    }
}

/// A metadata value that is a list holding one string matching `m` (claims,
/// audiences: Istio's `MetadataListMatcher`).
fn list_metadata(filter: &str, path: &[&str], m: StringMatcher) -> MetadataMatcher {
    let list = ValueMatcher {
        match_pattern: Some(value_matcher::MatchPattern::ListMatch(Box::new(ListMatcher {
            match_pattern: Some(list_matcher::MatchPattern::OneOf(Box::new(value_string(m)))),
        }))),
    };
    metadata(filter, path, list)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(ns: &str, name: &str, yaml: &str) -> Named<AuthorizationPolicySpec> {
        Named {
            namespace: ns.into(),
            name: name.into(),
            created: None,
            spec: serde_saphyr::from_str(yaml).unwrap(),
        }
    }

    /// The policies of the one config of `action` (there must be one).
    fn only(configs: &[Rbac], action: RbacAction) -> &Rbac {
        let found: Vec<&Rbac> = configs.iter().filter(|c| c.action == action as i32).collect();
        assert_eq!(found.len(), 1, "{configs:?}");
        found[0]
    }

    fn single_or<T: std::fmt::Debug>(set: &[T]) -> &T {
        let [one] = set else { panic!("one: {set:?}") };
        one
    }

    fn and_ids(p: &Principal) -> &[Principal] {
        let Some(principal::Identifier::AndIds(s)) = &p.identifier else {
            panic!("{p:?}")
        };
        &s.ids
    }

    fn or_ids(p: &Principal) -> &[Principal] {
        let Some(principal::Identifier::OrIds(s)) = &p.identifier else {
            panic!("{p:?}")
        };
        &s.ids
    }

    fn principal_name(p: &Principal) -> &string_matcher::MatchPattern {
        let Some(principal::Identifier::Authenticated(a)) = &p.identifier else {
            panic!("{p:?}")
        };
        a.principal_name.as_ref().unwrap().match_pattern.as_ref().unwrap()
    }

    #[test]
    fn principals_get_spiffe_and_istios_wildcards_and_namespaces_a_regex() {
        use string_matcher::MatchPattern::*;
        let p = named(
            "foo",
            "p",
            "rules: [{from: [{source: {principals: [cluster.local/ns/a/sa/b, other-domain/ns/x/sa/y, 'pre*', '*suf', '*'], namespaces: ['ns-*']}}]}]",
        );
        let c = configs(&[&p], false, "example.org");
        let rbac = only(&c, RbacAction::Allow);
        let policy = &rbac.policies["ns[foo]-policy[p]-rule[0]"];
        let from = single_or(&policy.principals);
        let [principals, namespaces] = and_ids(from) else {
            panic!()
        };
        let names: Vec<&string_matcher::MatchPattern> = or_ids(principals).iter().map(principal_name).collect();
        let re = |r: &str| {
            SafeRegex(RegexMatcher {
                regex: r.into(),
                ..Default::default()
            })
        };
        assert_eq!(
            names,
            [
                &Exact("spiffe://example.org/ns/a/sa/b".into()),
                &Exact("spiffe://other-domain/ns/x/sa/y".into()),
                &Prefix("spiffe://pre".into()),
                &re(r"spiffe://.*suf"),
                &re(".+"),
            ],
            "cluster.local stands for the local trust domain; a federated one is kept"
        );
        assert_eq!(principal_name(single_or(or_ids(namespaces))), &re(".*/ns/ns-.*/.*"));
    }

    #[test]
    fn an_allow_rule_needing_http_is_dropped_on_tcp_and_a_deny_rule_keeps_the_rest() {
        let allow = named(
            "foo",
            "a",
            "rules: [{to: [{operation: {methods: [GET]}}]}, {to: [{operation: {ports: ['80']}}]}]",
        );
        let deny = named(
            "foo",
            "d",
            "action: DENY\nrules: [{to: [{operation: {methods: [GET], ports: ['81']}}]}]",
        );
        let c = configs(&[&allow, &deny], true, "cluster.local");
        assert_eq!(
            c.iter().map(|c| c.action).collect::<Vec<_>>(),
            [RbacAction::Deny as i32, RbacAction::Allow as i32],
            "DENY first"
        );
        let allowed = only(&c, RbacAction::Allow);
        assert_eq!(
            allowed.policies.keys().collect::<Vec<_>>(),
            ["ns[foo]-policy[a]-rule[1]"]
        );
        let denied = &only(&c, RbacAction::Deny).policies["ns[foo]-policy[d]-rule[0]"];
        let Some(permission::Rule::AndRules(and)) = &single_or(&denied.permissions).rule else {
            panic!()
        };
        let Some(permission::Rule::OrRules(or)) = &single_or(&and.rules).rule else {
            panic!()
        };
        assert_eq!(
            single_or(&or.rules).rule,
            Some(permission::Rule::DestinationPort(81)),
            "the method is left out, the port kept"
        );
        // On HTTP both rules of the ALLOW policy stand.
        let http = configs(&[&allow], false, "cluster.local");
        assert_eq!(only(&http, RbacAction::Allow).policies.len(), 2);
    }

    #[test]
    fn an_allow_policy_without_rules_matches_nothing_so_denies_all() {
        let p = named("foo", "none", "action: ALLOW");
        let c = configs(&[&p], false, "cluster.local");
        let policy = &only(&c, RbacAction::Allow).policies["ns[foo]-policy[none]-rule[0]"];
        assert_eq!(policy, &match_nothing());
    }

    #[test]
    fn audit_logs_and_custom_denies_everything_it_selects() {
        let audit = named("foo", "a", "action: AUDIT\nrules: [{}]");
        let custom = named("foo", "c", "action: CUSTOM\nprovider: {name: opa}\nrules: [{}]");
        let c = configs(&[&audit, &custom], false, "cluster.local");
        assert_eq!(only(&c, RbacAction::Log).policies.len(), 1);
        assert_eq!(
            only(&c, RbacAction::Deny).policies["ns[foo]-policy[c]-rule[0]"],
            match_everything()
        );
    }

    #[test]
    fn operations_and_conditions_become_header_path_port_and_ip_matchers() {
        let p = named(
            "foo",
            "p",
            "rules: [{to: [{operation: {hosts: ['*.example.com'], notPaths: ['/admin/*'], methods: ['*']}}], when: [{key: 'request.headers[X-User]', values: [bob]}, {key: destination.ip, values: [10.0.0.0/8]}]}]",
        );
        let c = configs(&[&p], false, "cluster.local");
        let policy = &only(&c, RbacAction::Allow).policies["ns[foo]-policy[p]-rule[0]"];
        let Some(permission::Rule::AndRules(and)) = &single_or(&policy.permissions).rule else {
            panic!()
        };
        let rules: Vec<&permission::Rule> = and.rules.iter().map(|r| r.rule.as_ref().unwrap()).collect();
        let inner = |r: &permission::Rule| -> permission::Rule {
            match r {
                permission::Rule::OrRules(s) => single_or(&s.rules).rule.clone().unwrap(),
                permission::Rule::NotRule(n) => match n.rule.as_ref().unwrap() {
                    permission::Rule::OrRules(s) => single_or(&s.rules).rule.clone().unwrap(),
                    other => panic!("{other:?}"),
                },
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(rules.len(), 4, "hosts, methods, notPaths, destination.ip: {rules:?}");
        assert_eq!(inner(rules[0]), permission::Rule::Header(host_matcher("*.example.com")));
        let permission::Rule::Header(h) = inner(rules[0]) else {
            panic!()
        };
        assert_eq!(
            h.header_match_specifier,
            Some(header_matcher::HeaderMatchSpecifier::StringMatch(matcher(
                string_matcher::MatchPattern::Suffix(".example.com".into()),
                true
            ))),
            "hosts ignore case"
        );
        assert_eq!(
            inner(rules[1]),
            permission::Rule::Header(HeaderMatcher {
                name: ":method".into(),
                header_match_specifier: Some(header_matcher::HeaderMatchSpecifier::PresentMatch(true)),
                ..Default::default()
            })
        );
        assert!(matches!(rules[2], permission::Rule::NotRule(_)), "notPaths negated");
        assert_eq!(
            inner(rules[2]),
            permission::Rule::UrlPath(PathMatcher {
                rule: Some(path_matcher::Rule::Path(prefix_matcher("/admin/")))
            })
        );
        assert_eq!(inner(rules[3]), permission::Rule::DestinationIp(cidr("10.0.0.0/8")));
        let from = single_or(&policy.principals);
        let header = single_or(or_ids(single_or(and_ids(from))));
        assert_eq!(
            header.identifier,
            Some(principal::Identifier::Header(header_matcher("x-user", "bob")))
        );
    }

    #[test]
    fn without_request_authentication_a_request_principal_never_matches() {
        // "Deny requests without a JWT": with no JWT accepted here, every request.
        let p = named(
            "foo",
            "jwt",
            "action: DENY\nrules: [{from: [{source: {notRequestPrincipals: ['*']}}]}]",
        );
        let c = configs(&[&p], false, "cluster.local");
        let policy = &only(&c, RbacAction::Deny).policies["ns[foo]-policy[jwt]-rule[0]"];
        let never = principal_id(principal::Identifier::NotId(Box::new(principal_id(
            principal::Identifier::Any(true),
        ))));
        let not = single_or(and_ids(single_or(&policy.principals)));
        assert_eq!(
            not.identifier,
            Some(principal::Identifier::NotId(Box::new(principal_id(
                principal::Identifier::OrIds(principal::Set { ids: vec![never] })
            ))))
        );
    }
}
