//! Authorization: Envoy's RBAC filters (what istiod makes of AuthorizationPolicy), compiled
//! once into an evaluator the inbound side checks every connection and request against.
//!
//! A chain is the listener's RBAC filters in order (Istio emits DENY, then ALLOW, then
//! AUDIT as LOG). Per filter, as Envoy: ALLOW lets through only what one of its policies
//! matches (so an ALLOW filter with no policies denies everything); DENY stops what one of
//! its policies matches; LOG never stops anything, it only marks the request as logged.
//! `shadow_rules` are evaluated and counted but never enforced. A policy matches when any
//! of its permissions and any of its principals match.

pub mod matcher;

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};

use envoy_types::pb::envoy::config::rbac::v3::permission::Rule as PermissionRule;
use envoy_types::pb::envoy::config::rbac::v3::principal::Identifier;
use envoy_types::pb::envoy::config::rbac::v3::rbac::Action as RbacAction;
use envoy_types::pb::envoy::config::rbac::v3::{Permission, Policy as RbacPolicy, Principal, Rbac};
use envoy_types::pb::envoy::r#type::matcher::v3::PathMatcher;
use envoy_types::pb::envoy::r#type::matcher::v3::path_matcher::Rule as PathRule;
use hyper::HeaderMap;
use hyper::http::{Method, Uri};

use matcher::{Cidr, HeaderMatch, StringMatch};

/// Envoy's body for a request RBAC denied, word for word: users and tests grep for it.
pub const DENIED_BODY: &str = "RBAC: access denied";

/// Why an RBAC configuration cannot be enforced; the whole update is refused (NACKed) so
/// a policy is never enforced loosely.
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error("regex {regex:?} does not compile: {problem}")]
    Regex { regex: String, problem: String },
    #[error("bad CIDR range {0}")]
    Cidr(String),
    #[error("{0} is not supported")]
    Unsupported(&'static str),
    #[error("policy {policy:?}: {source}")]
    InPolicy {
        policy: String,
        #[source]
        source: Box<CompileError>,
    },
}

/// One compiled permission or principal: both share the same combinators, and an
/// attribute means the same on either side.
#[derive(Debug, Clone)]
enum Rule {
    Any,
    And(Vec<Rule>),
    Or(Vec<Rule>),
    Not(Box<Rule>),
    Header(HeaderMatch),
    /// The path without its query, as Envoy's `url_path`.
    Path(StringMatch),
    DestinationIp(Cidr),
    DestinationPort(u16),
    /// `[start, end)`.
    DestinationPorts(i64, i64),
    ServerName(StringMatch),
    /// A verified peer certificate; with a matcher, on its SPIFFE ID.
    Authenticated(Option<StringMatch>),
    /// `direct_remote_ip`, `remote_ip` and `source_ip` alike: without a trusted proxy in
    /// front (we trust no `x-forwarded-for`) all three are the peer's address.
    RemoteIp(Cidr),
}

fn path(p: &PathMatcher) -> Result<Rule, CompileError> {
    match &p.rule {
        Some(PathRule::Path(s)) => Ok(Rule::Path(StringMatch::compile(s)?)),
        None => Err(CompileError::Unsupported("path matcher without a rule")),
    }
}

fn permission(p: &Permission) -> Result<Rule, CompileError> {
    let all = |set: &[Permission]| set.iter().map(permission).collect::<Result<Vec<_>, _>>();
    #[allow(deprecated)]
    Ok(
        match p
            .rule
            .as_ref()
            .ok_or(CompileError::Unsupported("permission without a rule"))?
        {
            PermissionRule::Any(_) => Rule::Any,
            PermissionRule::AndRules(s) => Rule::And(all(&s.rules)?),
            PermissionRule::OrRules(s) => Rule::Or(all(&s.rules)?),
            PermissionRule::NotRule(r) => Rule::Not(Box::new(permission(r)?)),
            PermissionRule::Header(h) => Rule::Header(HeaderMatch::compile(h)?),
            PermissionRule::UrlPath(p) => path(p)?,
            PermissionRule::DestinationIp(c) => Rule::DestinationIp(Cidr::compile(c)?),
            PermissionRule::DestinationPort(port) => {
                Rule::DestinationPort(u16::try_from(*port).map_err(|_| CompileError::Unsupported("port above 65535"))?)
            }
            PermissionRule::DestinationPortRange(r) => Rule::DestinationPorts(r.start.into(), r.end.into()),
            PermissionRule::RequestedServerName(s) => Rule::ServerName(StringMatch::compile(s)?),
            PermissionRule::Metadata(_) | PermissionRule::SourcedMetadata(_) => {
                return Err(CompileError::Unsupported("metadata permission"));
            }
            PermissionRule::Matcher(_) | PermissionRule::UriTemplate(_) => {
                return Err(CompileError::Unsupported("extension permission"));
            }
        },
    )
}

fn principal(p: &Principal) -> Result<Rule, CompileError> {
    let all = |set: &[Principal]| set.iter().map(principal).collect::<Result<Vec<_>, _>>();
    #[allow(deprecated)]
    Ok(
        match p
            .identifier
            .as_ref()
            .ok_or(CompileError::Unsupported("principal without an identifier"))?
        {
            Identifier::Any(_) => Rule::Any,
            Identifier::AndIds(s) => Rule::And(all(&s.ids)?),
            Identifier::OrIds(s) => Rule::Or(all(&s.ids)?),
            Identifier::NotId(r) => Rule::Not(Box::new(principal(r)?)),
            Identifier::Authenticated(a) => {
                Rule::Authenticated(a.principal_name.as_ref().map(StringMatch::compile).transpose()?)
            }
            Identifier::SourceIp(c) | Identifier::DirectRemoteIp(c) | Identifier::RemoteIp(c) => {
                Rule::RemoteIp(Cidr::compile(c)?)
            }
            Identifier::Header(h) => Rule::Header(HeaderMatch::compile(h)?),
            Identifier::UrlPath(p) => path(p)?,
            Identifier::Metadata(_) | Identifier::SourcedMetadata(_) | Identifier::FilterState(_) => {
                return Err(CompileError::Unsupported("metadata principal"));
            }
            Identifier::Custom(_) => return Err(CompileError::Unsupported("custom principal")),
        },
    )
}

/// What one RBAC filter does when a policy matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
    Log,
}

/// A compiled policy: any permission and any principal.
#[derive(Debug, Clone)]
struct Policy {
    name: String,
    permissions: Vec<Rule>,
    principals: Vec<Rule>,
}

/// A compiled `envoy.config.rbac.v3.RBAC`: an action and its policies, in name order so
/// the policy named in logs is the same on every proxy.
#[derive(Debug, Clone)]
pub struct Rules {
    action: Action,
    policies: Vec<Policy>,
}

impl Rules {
    /// Compiles `rbac`; a policy with a CEL condition cannot be honoured and is refused.
    pub fn compile(rbac: &Rbac) -> Result<Self, CompileError> {
        let action = match RbacAction::try_from(rbac.action) {
            Ok(RbacAction::Allow) => Action::Allow,
            Ok(RbacAction::Deny) => Action::Deny,
            Ok(RbacAction::Log) => Action::Log,
            Err(_) => return Err(CompileError::Unsupported("unknown RBAC action")),
        };
        let mut names: Vec<&String> = rbac.policies.keys().collect();
        names.sort();
        let policies = names
            .into_iter()
            .map(|name| {
                compile_policy(name, &rbac.policies[name]).map_err(|e| CompileError::InPolicy {
                    policy: name.clone(),
                    source: Box::new(e),
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { action, policies })
    }

    /// The first policy (by name) that matches `a`.
    fn matching(&self, a: &Attributes<'_>) -> Option<&str> {
        self.policies
            .iter()
            .find(|p| p.permissions.iter().any(|r| a.satisfies(r)) && p.principals.iter().any(|r| a.satisfies(r)))
            .map(|p| p.name.as_str())
    }

    /// `Ok(matched policy)` if this filter lets `a` through, else `Err(policy that denied,
    /// None for an ALLOW filter none of whose policies matched)`.
    fn check<'r>(&'r self, a: &Attributes<'_>) -> Result<Option<&'r str>, Option<&'r str>> {
        let matched = self.matching(a);
        match (self.action, matched) {
            (Action::Allow, None) => Err(None),
            (Action::Deny, Some(p)) => Err(Some(p)),
            (_, m) => Ok(m),
        }
    }
}

fn compile_policy(name: &str, p: &RbacPolicy) -> Result<Policy, CompileError> {
    if p.condition.is_some() || p.checked_condition.is_some() {
        return Err(CompileError::Unsupported("CEL condition"));
    }
    Ok(Policy {
        name: name.to_owned(),
        permissions: p.permissions.iter().map(permission).collect::<Result<_, _>>()?,
        principals: p.principals.iter().map(principal).collect::<Result<_, _>>()?,
    })
}

/// One RBAC filter: enforced rules and/or shadow rules.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub rules: Option<Rules>,
    pub shadow: Option<Rules>,
}

impl Filter {
    /// From the `rules`/`shadow_rules` of an HTTP or network RBAC filter's config.
    pub fn compile(rules: Option<&Rbac>, shadow: Option<&Rbac>) -> Result<Self, CompileError> {
        Ok(Self {
            rules: rules.map(Rules::compile).transpose()?,
            shadow: shadow.map(Rules::compile).transpose()?,
        })
    }
}

/// A listener's RBAC filters in order; empty lets everything through.
#[derive(Debug, Clone, Default)]
pub struct Chain {
    pub filters: Vec<Filter>,
}

/// The outcome of checking one connection or request against a [`Chain`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verdict {
    /// `Some(policy)` if denied: the DENY policy that matched, or empty when no policy of
    /// an ALLOW filter did.
    pub denied_by: Option<String>,
    /// LOG policies that matched (Istio's AUDIT): the request is to be logged.
    pub logged: Vec<String>,
    /// Shadow rules that would have allowed / denied.
    pub shadow_allowed: usize,
    pub shadow_denied: usize,
}

impl Verdict {
    /// Whether the request or connection may go on.
    pub fn allowed(&self) -> bool {
        self.denied_by.is_none()
    }
}

impl Chain {
    /// Checks `a` filter by filter; the first filter that denies decides.
    pub fn check(&self, a: &Attributes<'_>) -> Verdict {
        let mut v = Verdict::default();
        for f in &self.filters {
            if let Some(shadow) = &f.shadow {
                match shadow.check(a) {
                    Ok(_) => v.shadow_allowed += 1,
                    Err(_) => v.shadow_denied += 1,
                }
            }
            let Some(rules) = &f.rules else { continue };
            match rules.check(a) {
                Ok(Some(p)) if rules.action == Action::Log => v.logged.push(p.to_owned()),
                Ok(_) => {}
                Err(p) => {
                    v.denied_by = Some(p.unwrap_or_default().to_owned());
                    return v;
                }
            }
        }
        v
    }
}

/// The parts of an HTTP request RBAC can see.
#[derive(Debug, Clone, Copy)]
pub struct HttpAttributes<'a> {
    pub method: &'a Method,
    pub uri: &'a Uri,
    pub headers: &'a HeaderMap,
}

/// What a check sees of a connection (and, on HTTP, of one request).
#[derive(Debug, Clone, Copy)]
pub struct Attributes<'a> {
    /// The caller's SPIFFE ID from its verified certificate; None in plaintext.
    pub principal: Option<&'a str>,
    pub remote: IpAddr,
    /// The connection's original destination (the application's address and port).
    pub destination: SocketAddr,
    /// The SNI the caller sent.
    pub server_name: Option<&'a str>,
    pub http: Option<HttpAttributes<'a>>,
}

impl Attributes<'_> {
    /// A header's value as Envoy's matchers see it: pseudo-headers from the request line,
    /// others as every value joined by `,`.
    fn header(&self, name: &str) -> Option<Cow<'_, str>> {
        let http = self.http?;
        match name {
            ":method" => Some(Cow::Borrowed(http.method.as_str())),
            ":path" => Some(Cow::Borrowed(http.uri.path_and_query().map_or("/", |p| p.as_str()))),
            ":authority" | "host" => http
                .headers
                .get(hyper::header::HOST)
                .and_then(|h| h.to_str().ok())
                .or_else(|| http.uri.authority().map(|a| a.as_str()))
                .map(Cow::Borrowed),
            ":scheme" => Some(Cow::Borrowed(http.uri.scheme_str().unwrap_or("http"))),
            _ => {
                let mut values = http.headers.get_all(name).iter().filter_map(|v| v.to_str().ok());
                let first = values.next()?;
                Some(values.fold(Cow::Borrowed(first), |acc, v| Cow::Owned(format!("{acc},{v}"))))
            }
        }
    }

    fn satisfies(&self, r: &Rule) -> bool {
        match r {
            Rule::Any => true,
            Rule::And(rs) => rs.iter().all(|r| self.satisfies(r)),
            Rule::Or(rs) => rs.iter().any(|r| self.satisfies(r)),
            Rule::Not(r) => !self.satisfies(r),
            Rule::Header(h) => h.matches(self.header(&h.name).as_deref()),
            Rule::Path(m) => self.http.is_some_and(|h| m.matches(h.uri.path())),
            Rule::DestinationIp(c) => c.contains(self.destination.ip()),
            Rule::DestinationPort(p) => self.destination.port() == *p,
            Rule::DestinationPorts(start, end) => (*start..*end).contains(&i64::from(self.destination.port())),
            Rule::ServerName(m) => self.server_name.is_some_and(|s| m.matches(s)),
            Rule::Authenticated(None) => self.principal.is_some(),
            Rule::Authenticated(Some(m)) => self.principal.is_some_and(|p| m.matches(p)),
            Rule::RemoteIp(c) => c.contains(self.remote),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::CidrRange;
    use envoy_types::pb::envoy::config::rbac::v3::{permission, principal};
    use envoy_types::pb::envoy::config::route::v3::HeaderMatcher;
    use envoy_types::pb::envoy::config::route::v3::header_matcher::HeaderMatchSpecifier;
    use envoy_types::pb::envoy::r#type::matcher::v3::StringMatcher;
    use envoy_types::pb::envoy::r#type::matcher::v3::string_matcher::MatchPattern;
    use envoy_types::pb::google::protobuf::UInt32Value;

    fn exact(s: &str) -> StringMatcher {
        StringMatcher {
            ignore_case: false,
            match_pattern: Some(MatchPattern::Exact(s.into())),
        }
    }

    fn perm(rule: PermissionRule) -> Permission {
        Permission { rule: Some(rule) }
    }

    fn id(identifier: Identifier) -> Principal {
        Principal {
            identifier: Some(identifier),
        }
    }

    fn any_perm() -> Permission {
        perm(PermissionRule::Any(true))
    }

    fn spiffe(s: &str) -> Principal {
        id(Identifier::Authenticated(principal::Authenticated {
            principal_name: Some(exact(s)),
        }))
    }

    fn method(m: &str) -> Permission {
        perm(PermissionRule::Header(HeaderMatcher {
            name: ":method".into(),
            header_match_specifier: Some(HeaderMatchSpecifier::StringMatch(exact(m))),
            ..Default::default()
        }))
    }

    fn url_prefix(p: &str) -> Permission {
        perm(PermissionRule::UrlPath(PathMatcher {
            rule: Some(PathRule::Path(StringMatcher {
                ignore_case: false,
                match_pattern: Some(MatchPattern::Prefix(p.into())),
            })),
        }))
    }

    fn rbac(action: RbacAction, policies: Vec<(&str, Vec<Permission>, Vec<Principal>)>) -> Rbac {
        Rbac {
            action: action as i32,
            policies: policies
                .into_iter()
                .map(|(n, permissions, principals)| {
                    (
                        n.to_owned(),
                        RbacPolicy {
                            permissions,
                            principals,
                            ..Default::default()
                        },
                    )
                })
                .collect(),
            ..Default::default()
        }
    }

    fn chain(filters: Vec<Rbac>) -> Chain {
        Chain {
            filters: filters
                .iter()
                .map(|r| Filter::compile(Some(r), None).unwrap())
                .collect(),
        }
    }

    struct Req {
        principal: Option<&'static str>,
        remote: &'static str,
        method: Method,
        uri: Uri,
        headers: HeaderMap,
    }

    fn req(principal: Option<&'static str>, method: &str, uri: &str) -> Req {
        Req {
            principal,
            remote: "10.241.0.7",
            method: method.parse().unwrap(),
            uri: uri.parse().unwrap(),
            headers: HeaderMap::new(),
        }
    }

    impl Req {
        fn attributes(&self) -> Attributes<'_> {
            Attributes {
                principal: self.principal,
                remote: self.remote.parse().unwrap(),
                destination: "10.241.0.9:9080".parse().unwrap(),
                server_name: Some("outbound_.9080_._.reviews.default.svc.cluster.local"),
                http: Some(HttpAttributes {
                    method: &self.method,
                    uri: &self.uri,
                    headers: &self.headers,
                }),
            }
        }
    }

    const FOREIGN: &str = "spiffe://cluster2.local/ns/default/sa/productpage";
    const LOCAL: &str = "spiffe://cluster.local/ns/default/sa/ratings";

    #[test]
    fn the_chain_decides_as_envoy_does() {
        let deny_admin = rbac(
            RbacAction::Deny,
            vec![(
                "ns[default]-policy[no-admin]-rule[0]",
                vec![url_prefix("/admin")],
                vec![id(Identifier::Any(true))],
            )],
        );
        let allow_foreign_get = rbac(
            RbacAction::Allow,
            vec![(
                "ns[default]-policy[foreign]-rule[0]",
                vec![perm(PermissionRule::AndRules(permission::Set {
                    rules: vec![method("GET")],
                }))],
                vec![spiffe(FOREIGN)],
            )],
        );
        let audit_all = rbac(
            RbacAction::Log,
            vec![(
                "ns[default]-policy[audit]-rule[0]",
                vec![any_perm()],
                vec![id(Identifier::Any(true))],
            )],
        );
        let table: Vec<(&str, Chain, Req, Option<&str>, usize)> = vec![
            ("no filter allows", chain(vec![]), req(None, "GET", "/"), None, 0),
            (
                "an ALLOW with no policies denies all",
                chain(vec![rbac(RbacAction::Allow, vec![])]),
                req(Some(FOREIGN), "GET", "/"),
                Some(""),
                0,
            ),
            (
                "a DENY with no policies allows all",
                chain(vec![rbac(RbacAction::Deny, vec![])]),
                req(None, "GET", "/"),
                None,
                0,
            ),
            (
                "ALLOW admits the foreign principal",
                chain(vec![deny_admin.clone(), allow_foreign_get.clone()]),
                req(Some(FOREIGN), "GET", "/reviews/1"),
                None,
                0,
            ),
            (
                "ALLOW refuses another principal",
                chain(vec![deny_admin.clone(), allow_foreign_get.clone()]),
                req(Some(LOCAL), "GET", "/reviews/1"),
                Some(""),
                0,
            ),
            (
                "ALLOW refuses a plaintext caller",
                chain(vec![allow_foreign_get.clone()]),
                req(None, "GET", "/reviews/1"),
                Some(""),
                0,
            ),
            (
                "ALLOW refuses another method",
                chain(vec![allow_foreign_get.clone()]),
                req(Some(FOREIGN), "POST", "/reviews/1"),
                Some(""),
                0,
            ),
            (
                "DENY comes first, even for an allowed principal",
                chain(vec![deny_admin.clone(), allow_foreign_get.clone()]),
                req(Some(FOREIGN), "GET", "/admin/users?x=1"),
                Some("ns[default]-policy[no-admin]-rule[0]"),
                0,
            ),
            (
                "LOG allows and marks",
                chain(vec![audit_all.clone()]),
                req(None, "DELETE", "/x"),
                None,
                1,
            ),
            (
                "a request denied earlier is not logged",
                chain(vec![deny_admin, audit_all]),
                req(None, "GET", "/admin"),
                Some("ns[default]-policy[no-admin]-rule[0]"),
                0,
            ),
        ];
        for (what, chain, req, denied_by, logged) in table {
            let v = chain.check(&req.attributes());
            assert_eq!(v.denied_by.as_deref(), denied_by, "{what}");
            assert_eq!(v.logged.len(), logged, "{what}");
        }
    }

    #[test]
    #[allow(deprecated)] // source_ip: Istio still emits it for older proxies
    fn principals_and_permissions_cover_the_connection() {
        let r = req(Some(FOREIGN), "GET", "/api/v1?q=/admin");
        let a = r.attributes();
        let cidr = |p: &str, len: u32| CidrRange {
            address_prefix: p.into(),
            prefix_len: Some(UInt32Value { value: len }),
        };
        let sat = |p: Permission| a.satisfies(&permission(&p).unwrap());
        let sat_id = |p: Principal| a.satisfies(&principal(&p).unwrap());
        assert!(sat(perm(PermissionRule::DestinationPort(9080))));
        assert!(!sat(perm(PermissionRule::DestinationPort(9081))));
        assert!(sat(perm(PermissionRule::DestinationIp(cidr("10.241.0.0", 16)))));
        assert!(sat(perm(PermissionRule::RequestedServerName(StringMatcher {
            ignore_case: false,
            match_pattern: Some(MatchPattern::Suffix(".reviews.default.svc.cluster.local".into())),
        }))));
        // url_path ignores the query; :path does not.
        assert!(sat(url_prefix("/api")));
        assert!(!sat(url_prefix("/admin")));
        assert!(sat(perm(PermissionRule::NotRule(Box::new(url_prefix("/admin"))))));
        assert!(sat(perm(PermissionRule::OrRules(permission::Set {
            rules: vec![method("POST"), method("GET")],
        }))));
        assert!(sat_id(id(Identifier::DirectRemoteIp(cidr("10.241.0.7", 32)))));
        assert!(sat_id(id(Identifier::RemoteIp(cidr("10.241.0.0", 24)))));
        assert!(!sat_id(id(Identifier::SourceIp(cidr("10.242.0.0", 16)))));
        assert!(sat_id(id(Identifier::NotId(Box::new(spiffe(LOCAL))))));
        assert!(sat_id(id(Identifier::AndIds(principal::Set {
            ids: vec![spiffe(FOREIGN), id(Identifier::RemoteIp(cidr("10.0.0.0", 8)))],
        }))));
        // istiod's namespaces → principal regex.
        assert!(sat_id(id(Identifier::Authenticated(principal::Authenticated {
            principal_name: Some(StringMatcher {
                ignore_case: false,
                match_pattern: Some(MatchPattern::SafeRegex(
                    envoy_types::pb::envoy::r#type::matcher::v3::RegexMatcher {
                        regex: ".*/ns/default/.*".into(),
                        engine_type: None,
                    }
                )),
            }),
        }))));
        // Any verified peer, whatever its name; a plaintext caller has none.
        let any_peer = || {
            id(Identifier::Authenticated(principal::Authenticated {
                principal_name: None,
            }))
        };
        assert!(sat_id(any_peer()));
        let plain = req(None, "GET", "/");
        assert!(!plain.attributes().satisfies(&principal(&any_peer()).unwrap()));
    }

    #[test]
    fn a_tcp_connection_has_no_http_attributes() {
        let a = Attributes {
            principal: Some(FOREIGN),
            remote: "10.241.0.7".parse().unwrap(),
            destination: "10.241.0.9:9080".parse().unwrap(),
            server_name: None,
            http: None,
        };
        assert!(!a.satisfies(&permission(&method("GET")).unwrap()));
        assert!(!a.satisfies(&permission(&url_prefix("/")).unwrap()));
        assert!(a.satisfies(&permission(&perm(PermissionRule::NotRule(Box::new(method("GET"))))).unwrap()));
    }

    #[test]
    fn shadow_rules_are_counted_never_enforced() {
        let f = Filter::compile(None, Some(&rbac(RbacAction::Allow, vec![]))).unwrap();
        let v = Chain { filters: vec![f] }.check(&req(None, "GET", "/").attributes());
        assert!(v.allowed());
        assert_eq!((v.shadow_allowed, v.shadow_denied), (0, 1));
    }

    #[test]
    #[allow(deprecated)] // metadata principals: what istiod makes of requestPrincipals
    fn what_cannot_be_honoured_is_refused_naming_the_policy() {
        let mut r = rbac(
            RbacAction::Allow,
            vec![("ns[x]-policy[jwt]-rule[0]", vec![any_perm()], vec![])],
        );
        r.policies.get_mut("ns[x]-policy[jwt]-rule[0]").unwrap().principals =
            vec![id(Identifier::Metadata(Default::default()))];
        let e = Rules::compile(&r).unwrap_err();
        assert!(matches!(e, CompileError::InPolicy { .. }), "{e}");
        assert!(
            e.to_string().contains("policy[jwt]") && e.to_string().contains("metadata"),
            "{e}"
        );
    }

    proptest::proptest! {
        /// Not(not(r)) is r, and an Or/And of one rule is that rule, for any request path.
        #[test]
        fn combinators_obey_boolean_laws(path in "/[a-z]{0,4}(/[a-z]{0,3})?", prefix in "/[a-z]{0,2}") {
            let r = req(Some(LOCAL), "GET", &path);
            let a = r.attributes();
            let base = permission(&url_prefix(&prefix)).unwrap();
            let want = a.satisfies(&base);
            proptest::prop_assert_eq!(want, path.starts_with(&prefix));
            proptest::prop_assert_eq!(a.satisfies(&Rule::Not(Box::new(Rule::Not(Box::new(base.clone()))))), want);
            proptest::prop_assert_eq!(a.satisfies(&Rule::Or(vec![base.clone()])), want);
            proptest::prop_assert_eq!(a.satisfies(&Rule::And(vec![base.clone(), Rule::Any])), want);
            proptest::prop_assert!(!a.satisfies(&Rule::Or(vec![])));
            proptest::prop_assert!(a.satisfies(&Rule::And(vec![])));
        }
    }
}
