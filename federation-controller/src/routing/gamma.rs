//! Gateway API HTTPRoutes attached to Services (GAMMA), translated as istiod does:
//! into the VirtualService rules of each parent Service's host, which the RDS builder
//! then serves like any other ([`crate::xds::routes`]).
//!
//! - Every match becomes a rule of its own, and the rules of all routes attached to
//!   a host are sorted by the Gateway API's precedence, as Istio sorts them: exact
//!   path, then prefix, then regex; a longer path first; a method match first; more
//!   header matches first; more query matches first; ties kept in route order
//!   (oldest first, then namespace/name), rule order and match order.
//! - A route in the Service's namespace is a producer route (every client); one in
//!   another namespace is a consumer route, for clients of its own namespace only,
//!   and replaces the producer routes for them (GEP-1294).
//! - `PathPrefix` matches path elements (`/foo` takes `/foo` and `/foo/x`, never
//!   `/foobar`): it becomes an exact and a `/foo/` prefix match, which every Envoy reads.
//! - A backend is a Service of the route's namespace, or of another namespace whose
//!   `ReferenceGrant` lets HTTPRoutes of the route's namespace reach it. One that is
//!   neither, or names no known service port, is a destination no cluster serves,
//!   answered `500`; a rule whose backends all weigh nothing or are unusable answers
//!   `500` itself. Pure.

use std::collections::BTreeMap;

use crate::networking::http_route::{self, BackendRef, Filter, PathKind, PathModifier, RouteMatch, Rule};
use crate::networking::virtual_service::{
    Destination, HeaderOperations, Headers, HttpDirectResponse, HttpMatchRequest, HttpMirrorPolicy, HttpRedirect,
    HttpRetry, HttpRewrite, HttpRouteDestination, Percent, PortSelector, RegexRewrite, StringMatch,
};
use crate::networking::{self, HttpRoute, ReferenceGrant, virtual_service};

/// The routes of one Service host: its producers' rules, and each consumer namespace's.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HostRoutes {
    pub producer: Vec<virtual_service::HttpRoute>,
    /// By the consumer routes' namespace.
    pub consumers: BTreeMap<String, Vec<virtual_service::HttpRoute>>,
}

/// A rule and what it is sorted by.
struct Ranked {
    rank: (u8, usize, bool, usize, usize),
    rule: virtual_service::HttpRoute,
}

/// The rules HTTPRoutes give each Service host (FQDN). `known(host, port)` says
/// whether a service port exists, so backends naming none answer 500; `grants` are
/// the mesh's ReferenceGrants, which a backend in another namespace needs.
pub fn translate<'a>(
    routes: impl IntoIterator<Item = &'a HttpRoute>,
    domain: &str,
    known: impl Fn(&str, u16) -> bool,
    grants: &[&ReferenceGrant],
) -> BTreeMap<String, HostRoutes> {
    let mut routes: Vec<&HttpRoute> = routes.into_iter().collect();
    routes.sort_by(|a, b| {
        let key = |r: &'a HttpRoute| {
            (
                r.metadata.creation_timestamp.as_ref().map(|t| t.0),
                networking::namespace_of(&r.metadata).to_owned(),
                r.metadata.name.clone().unwrap_or_default(),
            )
        };
        key(a).cmp(&key(b))
    });
    // (host, consumer namespace or None for producers) → rules in route order.
    let mut ranked: BTreeMap<(String, Option<String>), Vec<Ranked>> = BTreeMap::new();
    for route in routes {
        let ns = networking::namespace_of(&route.metadata);
        let name = route.metadata.name.as_deref().unwrap_or_default();
        let resolve = |b: &BackendRef| backend(b, ns, domain, &known, grants);
        for parent in route.spec.parent_refs.iter().filter(|p| p.is_service()) {
            let parent_ns = parent.namespace.as_deref().unwrap_or(ns);
            let host = networking::fqdn(&parent.name, parent_ns, domain);
            let port = parent.port.and_then(|p| u32::try_from(p).ok());
            let consumer = (parent_ns != ns).then(|| ns.to_owned());
            let list = ranked.entry((host, consumer)).or_default();
            for (i, rule) in route.spec.rules.iter().enumerate() {
                let default = [RouteMatch::default()];
                let matches = if rule.matches.is_empty() {
                    &default[..]
                } else {
                    &rule.matches[..]
                };
                for (j, m) in matches.iter().enumerate() {
                    list.push(Ranked {
                        rank: rank(m),
                        rule: vs_rule(format!("{ns}.{name}.{i}.{j}"), rule, m, port, ns, &resolve),
                    });
                }
            }
        }
    }
    let mut out: BTreeMap<String, HostRoutes> = BTreeMap::new();
    for ((host, consumer), mut list) in ranked {
        // Stable: ties keep route, rule and match order.
        list.sort_by_key(|r| std::cmp::Reverse(r.rank));
        let rules = list.into_iter().map(|r| r.rule).collect();
        let entry = out.entry(host).or_default();
        match consumer {
            None => entry.producer = rules,
            Some(ns) => {
                entry.consumers.insert(ns, rules);
            }
        }
    }
    out
}

/// The precedence of a match, greatest first: path kind (exact, prefix, regex) and
/// length, method, header count, query count.
fn rank(m: &RouteMatch) -> (u8, usize, bool, usize, usize) {
    let (kind, value) = path_of(m);
    let kind = match kind {
        PathKind::Exact => 3,
        PathKind::Prefix => 2,
        PathKind::Regex => 1,
    };
    (
        kind,
        value.len(),
        m.method.is_some(),
        m.headers.len(),
        m.query_params.len(),
    )
}

/// A match's path kind and value, with the schema's defaults (`PathPrefix /`).
fn path_of(m: &RouteMatch) -> (PathKind, String) {
    let path = m.path.clone().unwrap_or_default();
    let (kind, value) = path.kind_value();
    (kind, value.to_owned())
}

fn exact(v: &str) -> StringMatch {
    StringMatch {
        exact: Some(v.to_owned()),
        ..Default::default()
    }
}

fn value_match(v: &http_route::ValueMatch) -> StringMatch {
    if v.is_regex() {
        StringMatch {
            regex: Some(v.value.clone()),
            ..Default::default()
        }
    } else {
        exact(&v.value)
    }
}

/// The VirtualService matches of one Gateway API match (two for an element-wise prefix).
fn vs_matches(m: &RouteMatch, port: Option<u32>) -> Vec<HttpMatchRequest> {
    let mut base = HttpMatchRequest {
        method: m.method.as_deref().map(exact),
        port,
        ..Default::default()
    };
    // Header names are case-insensitive; the first match of a name counts, as the spec says.
    for h in &m.headers {
        base.headers
            .entry(h.name.to_ascii_lowercase())
            .or_insert_with(|| value_match(h));
    }
    for q in &m.query_params {
        base.query_params
            .entry(q.name.clone())
            .or_insert_with(|| value_match(q));
    }
    let with_uri = |uri: StringMatch| HttpMatchRequest {
        uri: Some(uri),
        ..base.clone()
    };
    let (kind, value) = path_of(m);
    match kind {
        PathKind::Exact => vec![with_uri(exact(&value))],
        PathKind::Regex => vec![with_uri(StringMatch {
            regex: Some(value),
            ..Default::default()
        })],
        PathKind::Prefix => {
            let trimmed = value.trim_end_matches('/');
            if trimmed.is_empty() {
                vec![with_uri(StringMatch {
                    prefix: Some("/".into()),
                    ..Default::default()
                })]
            } else {
                vec![
                    with_uri(exact(trimmed)),
                    with_uri(StringMatch {
                        prefix: Some(format!("{trimmed}/")),
                        ..Default::default()
                    }),
                ]
            }
        }
    }
}

/// A path rewrite as a regex rewrite that works on both matches of an element-wise
/// prefix: `ReplacePrefixMatch` replaces the matched path elements (so `/` as the
/// replacement leaves no double slash), `ReplaceFullPath` the whole path.
fn path_rewrite(p: &PathModifier, m: &RouteMatch) -> Option<RegexRewrite> {
    if let Some(full) = &p.replace_full_path {
        return Some(RegexRewrite {
            r#match: "^/.*$".into(),
            rewrite: full.clone(),
        });
    }
    let replacement = p.replace_prefix_match.as_deref()?;
    let (_, prefix) = path_of(m);
    let prefix = regex::escape(prefix.trim_end_matches('/'));
    let replacement = replacement.trim_end_matches('/');
    Some(if replacement.is_empty() {
        RegexRewrite {
            r#match: format!("^{prefix}/*"),
            rewrite: "/".into(),
        }
    } else {
        RegexRewrite {
            r#match: format!("^{prefix}(/.*)?$"),
            rewrite: format!("{replacement}\\1"),
        }
    })
}

fn header_ops(filters: &[Filter], response: bool) -> Option<HeaderOperations> {
    let mut ops = HeaderOperations::default();
    let mut any = false;
    for f in filters {
        let modifier = if response {
            f.response_header_modifier.as_ref()
        } else {
            f.request_header_modifier.as_ref()
        };
        let Some(m) = modifier else { continue };
        any = true;
        for nv in &m.set {
            ops.set.insert(nv.name.to_ascii_lowercase(), nv.value.clone());
        }
        for nv in &m.add {
            ops.add.insert(nv.name.to_ascii_lowercase(), nv.value.clone());
        }
        ops.remove.extend(m.remove.iter().map(|h| h.to_ascii_lowercase()));
    }
    any.then_some(ops)
}

fn headers(filters: &[Filter]) -> Option<Headers> {
    let (request, response) = (header_ops(filters, false), header_ops(filters, true));
    (request.is_some() || response.is_some()).then_some(Headers { request, response })
}

/// The destination of a backend of a route in `ns`, or None when it is no usable
/// service port: not a Service, not one the route may reach, or no such port.
fn backend(
    b: &BackendRef,
    ns: &str,
    domain: &str,
    known: &impl Fn(&str, u16) -> bool,
    grants: &[&ReferenceGrant],
) -> Option<Destination> {
    let port = b.port.and_then(|p| u16::try_from(p).ok())?;
    let target_ns = b.namespace.as_deref().unwrap_or(ns);
    // Another namespace's Service needs its owner's ReferenceGrant (Gateway API GEP-709).
    let granted = || {
        grants
            .iter()
            .any(|g| networking::namespace_of(&g.metadata) == target_ns && g.lets_routes_reach(ns, &b.name))
    };
    let reachable = target_ns == ns || granted();
    // The name is a Service's, never a host: it is qualified even if it held dots.
    let host = format!("{}.{target_ns}.svc.{domain}", b.name);
    (b.is_service() && reachable && known(&host, port)).then(|| Destination {
        host,
        subset: None,
        port: Some(PortSelector {
            number: u32::from(port),
        }),
    })
}

/// A destination no cluster is served for: its requests get the route's 500.
fn unusable(b: &BackendRef, ns: &str) -> Destination {
    let ns = b.namespace.as_deref().unwrap_or(ns);
    Destination {
        host: format!("{}.{ns}.backend-not-found.invalid", b.name),
        subset: None,
        port: b
            .port
            .and_then(|p| u32::try_from(p).ok())
            .map(|number| PortSelector { number }),
    }
}

fn vs_rule(
    name: String,
    rule: &Rule,
    m: &RouteMatch,
    port: Option<u32>,
    ns: &str,
    resolve: &impl Fn(&BackendRef) -> Option<Destination>,
) -> virtual_service::HttpRoute {
    let filter = |t: &str| rule.filters.iter().find(|f| f.r#type == t);
    let mut out = virtual_service::HttpRoute {
        name: Some(name),
        r#match: vs_matches(m, port),
        headers: headers(&rule.filters),
        timeout: rule.timeouts.as_ref().and_then(|t| t.request),
        retries: rule
            .timeouts
            .as_ref()
            .and_then(|t| t.backend_request)
            .map(|d| HttpRetry {
                // Istio's default attempts, each bounded by the backend request timeout.
                attempts: 2,
                per_try_timeout: Some(d),
                ..Default::default()
            }),
        ..Default::default()
    };
    if let Some(r) = filter("RequestRedirect").and_then(|f| f.request_redirect.as_ref()) {
        out.redirect = Some(HttpRedirect {
            uri: r.path.as_ref().and_then(|p| p.replace_full_path.clone()),
            uri_regex_rewrite: r
                .path
                .as_ref()
                .filter(|p| p.replace_prefix_match.is_some())
                .and_then(|p| path_rewrite(p, m)),
            authority: r.hostname.clone(),
            port: r.port.and_then(|p| u32::try_from(p).ok()),
            scheme: r.scheme.clone(),
            redirect_code: Some(r.status_code.unwrap_or(302)),
        });
        return out;
    }
    if let Some(r) = filter("URLRewrite").and_then(|f| f.url_rewrite.as_ref()) {
        out.rewrite = Some(HttpRewrite {
            uri: None,
            uri_regex_rewrite: r.path.as_ref().and_then(|p| path_rewrite(p, m)),
            authority: r.hostname.clone(),
        });
    }
    out.mirrors = rule
        .filters
        .iter()
        .filter_map(|f| f.request_mirror.as_ref())
        .filter_map(|mirror| {
            let destination = resolve(&mirror.backend_ref)?;
            let percent = match (&mirror.percent, &mirror.fraction) {
                (Some(p), _) => *p as f64,
                (None, Some(f)) => f.numerator as f64 * 100.0 / f.denominator.unwrap_or(100) as f64,
                (None, None) => 100.0,
            };
            Some(HttpMirrorPolicy {
                destination,
                percentage: Some(Percent { value: percent }),
            })
        })
        .collect();
    let weighted: Vec<(&BackendRef, i64)> = rule
        .backend_refs
        .iter()
        .map(|b| (b, b.weight.unwrap_or(1)))
        .filter(|(_, w)| *w > 0)
        .collect();
    let usable: Vec<Option<Destination>> = weighted.iter().map(|(b, _)| resolve(b)).collect();
    if usable.iter().all(Option::is_none) {
        out.direct_response = Some(HttpDirectResponse {
            status: 500,
            body: None,
        });
        out.mirrors.clear();
        return out;
    }
    // Istio sets it on every route of Gateway API semantics, whether a backend is missing now or not.
    out.unknown_backend_is_500 = true;
    out.route = weighted
        .iter()
        .zip(usable)
        .map(|((b, w), d)| HttpRouteDestination {
            destination: d.unwrap_or_else(|| unusable(b, ns)),
            weight: Some(*w),
            headers: headers(&b.filters),
        })
        .collect();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::networking::virtual_service::Matcher;

    fn parse(yaml: &str) -> Vec<HttpRoute> {
        let mut o = crate::objects::ClusterObjects::default();
        o.add_yaml(std::path::Path::new("c1/routes.yaml"), yaml).unwrap();
        assert!(o.refused.is_empty(), "{:?}", o.refused);
        o.http_routes
    }

    fn uris(rules: &[virtual_service::HttpRoute]) -> Vec<Vec<(String, String)>> {
        rules
            .iter()
            .map(|r| {
                r.r#match
                    .iter()
                    .map(|m| match m.uri.as_ref().map(StringMatch::matcher) {
                        Some(Matcher::Exact(p)) => ("exact".into(), p.into()),
                        Some(Matcher::Prefix(p)) => ("prefix".into(), p.into()),
                        Some(Matcher::Regex(p)) => ("regex".into(), p.into()),
                        _ => ("none".into(), String::new()),
                    })
                    .collect()
            })
            .collect()
    }

    const HOST: &str = "reviews.default.svc.cluster.local";

    #[test]
    fn rules_are_sorted_by_the_gateway_apis_precedence_across_routes() {
        let routes = parse(
            r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: a, namespace: default}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews, port: 9080}]
  rules:
  - backendRefs: [{name: reviews, port: 9080}]
  - matches: [{path: {type: RegularExpression, value: "/r.*"}}]
    backendRefs: [{name: reviews, port: 9080}]
  - matches: [{path: {type: PathPrefix, value: /api}}, {path: {value: /api}, method: GET}]
    backendRefs: [{name: reviews, port: 9080}]
---
apiVersion: gateway.networking.k8s.io/v1beta1
kind: HTTPRoute
metadata: {name: b, namespace: default}
spec:
  parentRefs: [{group: core, kind: Service, name: reviews}]
  rules:
  - matches: [{path: {type: Exact, value: /a}}]
    backendRefs: [{name: reviews, port: 9080}]
  - matches: [{path: {value: /api}, headers: [{name: X-User, value: jason}]}]
    backendRefs: [{name: reviews, port: 9080}]
"#,
        );
        let out = translate(&routes, "cluster.local", |_, _| true, &[]);
        let rules = &out[HOST].producer;
        let names: Vec<&str> = rules.iter().map(|r| r.name.as_deref().unwrap()).collect();
        assert_eq!(
            names,
            [
                "default.b.0.0",
                "default.a.2.1",
                "default.b.1.0",
                "default.a.2.0",
                "default.a.0.0",
                "default.a.1.0"
            ],
            "exact; then /api with a method, with a header, with nothing; then /; then the regex"
        );
        assert_eq!(
            uris(&rules[3..5]),
            [
                vec![("exact".into(), "/api".into()), ("prefix".into(), "/api/".into())],
                vec![("prefix".into(), "/".into())]
            ],
            "a prefix matches path elements"
        );
        assert_eq!(rules[2].r#match[0].headers["x-user"], exact("jason"));
        assert_eq!(rules[1].r#match[0].port, Some(9080));
        assert_eq!(rules[0].r#match[0].port, None, "route b attaches to every port");
    }

    #[test]
    fn filters_weights_and_missing_backends() {
        let routes = parse(
            r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r, namespace: default}
spec:
  parentRefs: [{kind: Service, group: "", name: reviews}]
  rules:
  - matches: [{path: {value: /v1}}]
    filters:
    - {type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: X-A, value: "1"}], remove: [x-b]}}
    - {type: URLRewrite, urlRewrite: {hostname: internal, path: {type: ReplacePrefixMatch, replacePrefixMatch: /}}}
    - {type: RequestMirror, requestMirror: {backendRef: {name: ratings, port: 9080}, percent: 25}}
    backendRefs:
    - {name: reviews-v1, port: 9080, weight: 90}
    - {name: reviews-v2, port: 9080, weight: 10, filters: [{type: ResponseHeaderModifier, responseHeaderModifier: {add: [{name: x-v, value: "2"}]}}]}
    - {name: reviews-v3, port: 9080, weight: 0}
    timeouts: {request: 3s, backendRequest: 1s}
  - matches: [{path: {value: /gone}}]
    backendRefs: [{name: nowhere, port: 9080}]
  - matches: [{path: {value: /half}}]
    backendRefs: [{name: reviews-v1, port: 9080}, {name: nowhere, port: 9080}]
  - matches: [{path: {value: /old}}]
    filters: [{type: RequestRedirect, requestRedirect: {hostname: example.com, path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}}}]
"#,
        );
        let known = |h: &str, _| h.starts_with("reviews-v") || h.starts_with("ratings");
        let out = translate(&routes, "cluster.local", known, &[]);
        let by_name = |n: &str| {
            out[HOST]
                .producer
                .iter()
                .find(|r| r.name.as_deref() == Some(n))
                .unwrap()
                .clone()
        };
        let r = by_name("default.r.0.0");
        let dests: Vec<(&str, Option<i64>)> = r
            .route
            .iter()
            .map(|d| (d.destination.host.as_str(), d.weight))
            .collect();
        assert_eq!(
            dests,
            [
                ("reviews-v1.default.svc.cluster.local", Some(90)),
                ("reviews-v2.default.svc.cluster.local", Some(10))
            ],
            "weight 0 gets nothing"
        );
        assert!(r.route[1].headers.as_ref().unwrap().response.is_some());
        let req = r.headers.as_ref().unwrap().request.as_ref().unwrap();
        assert_eq!(
            (req.set["x-a"].as_str(), &req.remove[..]),
            ("1", &["x-b".to_owned()][..])
        );
        let rw = r.rewrite.as_ref().unwrap();
        assert_eq!(rw.authority.as_deref(), Some("internal"));
        let rr = rw.uri_regex_rewrite.as_ref().unwrap();
        assert_eq!((rr.r#match.as_str(), rr.rewrite.as_str()), ("^/v1/*", "/"));
        assert_eq!(r.mirrors[0].percentage.unwrap().value, 25.0);
        assert_eq!(r.timeout.unwrap().0.as_secs(), 3);
        assert_eq!(r.retries.as_ref().unwrap().per_try_timeout.unwrap().0.as_secs(), 1);
        assert!(
            r.unknown_backend_is_500,
            "every HTTPRoute rule answers a missing cluster 500"
        );
        let gone = by_name("default.r.1.0");
        assert_eq!(gone.direct_response.as_ref().unwrap().status, 500);
        let half = by_name("default.r.2.0");
        assert!(half.unknown_backend_is_500);
        assert_eq!(
            half.route[1].destination.host,
            "nowhere.default.backend-not-found.invalid"
        );
        let old = by_name("default.r.3.0");
        let redirect = old.redirect.as_ref().unwrap();
        assert_eq!(redirect.redirect_code, Some(302));
        let rr = redirect.uri_regex_rewrite.as_ref().unwrap();
        assert_eq!((rr.r#match.as_str(), rr.rewrite.as_str()), ("^/old(/.*)?$", "/new\\1"));
        let re = regex::Regex::new(&rr.r#match).unwrap();
        assert_eq!(re.replace("/old/x", "/new${1}"), "/new/x");
        assert_eq!(re.replace("/old", "/new${1}"), "/new");
    }

    #[test]
    fn a_route_from_another_namespace_is_its_consumers_own() {
        let routes = parse(
            r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: mine, namespace: frontend}
spec:
  parentRefs: [{kind: Service, group: "", name: reviews, namespace: default}]
  rules: [{backendRefs: [{name: reviews, namespace: default, port: 9080}]}]
"#,
        );
        let out = translate(&routes, "cluster.local", |_, _| true, &[]);
        assert!(out[HOST].producer.is_empty());
        let rules = &out[HOST].consumers["frontend"];
        assert_eq!(
            rules[0].direct_response.as_ref().map(|d| d.status),
            Some(500),
            "a backend in another namespace needs a ReferenceGrant"
        );
    }

    #[test]
    fn a_reference_grant_of_the_backends_namespace_lets_the_route_reach_it() {
        let backends = "[{name: ratings, namespace: ratings, port: 9080}, {name: reviews, port: 9080}]";
        let routes = parse(&format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: r, namespace: default}}\n\
             spec: {{parentRefs: [{{kind: Service, group: '', name: reviews}}], rules: [{{backendRefs: {backends}}}]}}\n"
        ));
        let grant = |ns: &str, from_ns: &str, from_kind: &str, to_kind: &str| -> ReferenceGrant {
            networking::from_yaml(&format!(
                "metadata: {{name: g, namespace: {ns}}}\nspec: {{from: [{{group: gateway.networking.k8s.io, kind: {from_kind}, namespace: {from_ns}}}], to: [{{group: '', kind: {to_kind}}}]}}\n"
            ))
        };
        let first_host = |grants: &[ReferenceGrant]| {
            let grants: Vec<&ReferenceGrant> = grants.iter().collect();
            let out = translate(&routes, "cluster.local", |_, _| true, &grants);
            let rule = &out[HOST].producer[0];
            assert!(rule.unknown_backend_is_500);
            rule.route[0].destination.host.clone()
        };
        let unresolved = "ratings.ratings.backend-not-found.invalid";
        assert_eq!(first_host(&[]), unresolved);
        assert_eq!(
            first_host(&[grant("ratings", "default", "HTTPRoute", "Service")]),
            "ratings.ratings.svc.cluster.local"
        );
        for (not_it, why) in [
            (
                grant("default", "default", "HTTPRoute", "Service"),
                "in the route's namespace",
            ),
            (
                grant("ratings", "other", "HTTPRoute", "Service"),
                "for another namespace",
            ),
            (grant("ratings", "default", "GRPCRoute", "Service"), "for another kind"),
            (grant("ratings", "default", "HTTPRoute", "Secret"), "to another kind"),
        ] {
            assert_eq!(first_host(&[not_it]), unresolved, "a grant {why} does not count");
        }
    }
}
