//! What a matched route does: forward (to a cluster or one of weighted clusters, with path
//! and authority rewrites, a timeout, retries and mirrors), redirect, or answer directly.

use std::time::Duration;

use bytes::Bytes;
use envoy_types::pb::envoy::config::core::v3::data_source::Specifier;
use envoy_types::pb::envoy::config::route::v3::redirect_action::{
    PathRewriteSpecifier, RedirectResponseCode, SchemeRewriteSpecifier,
};
use envoy_types::pb::envoy::config::route::v3::route_action::{ClusterSpecifier, HostRewriteSpecifier};
use envoy_types::pb::envoy::config::route::v3::weighted_cluster::cluster_weight;
use envoy_types::pb::envoy::config::route::v3::{DirectResponseAction, RedirectAction, RouteAction, route};
use envoy_types::pb::envoy::r#type::matcher::v3::RegexMatchAndSubstitute;
use hyper::StatusCode;
use hyper::http::request::Parts;
use hyper::http::uri::Authority;
use rand::Rng;
use regex::Regex;

use super::Invalid;
use super::hash::HashPolicy;
use super::headers::{HeaderPolicy, Mutations};
use super::matcher::{self, Matcher};
use super::mirror::Mirror;
use super::retry::RetryPolicy;

/// Envoy's route timeout when a route gives none.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(15);

/// A route's action.
#[derive(Debug, Clone)]
pub enum Action {
    Forward(Forward),
    Redirect(Redirect),
    /// Answered here with this status and body.
    Direct {
        status: StatusCode,
        body: Bytes,
    },
}

/// Where a forwarded request goes, and how.
#[derive(Debug, Clone)]
pub struct Forward {
    targets: Vec<Target>,
    total_weight: u64,
    rewrite: Option<PathRewrite>,
    /// `host_rewrite_literal`.
    pub host_rewrite: Option<Authority>,
    /// The whole request's bound: Envoy's 15 s when unset, none when 0 (Istio's default).
    pub timeout: Option<Duration>,
    pub retry: Option<RetryPolicy>,
    pub mirrors: Vec<Mirror>,
    /// What keys the request on a ring-hash cluster.
    pub hash: HashPolicy,
    /// The answer when the chosen cluster is not in CDS (`cluster_not_found_response_code`:
    /// Envoy's `503` by default; `500` where Gateway API wants it for an unresolved backend).
    pub cluster_not_found: StatusCode,
}

/// One cluster a request may go to.
#[derive(Debug, Clone)]
pub struct Target {
    /// The CDS cluster, e.g. `outbound|9080|v2|reviews.default.svc.cluster.local`.
    pub cluster: String,
    weight: u64,
    /// The weighted cluster's own header mutations, applied before the route's.
    pub headers: HeaderPolicy,
    pub host_rewrite: Option<Authority>,
}

#[derive(Debug, Clone)]
enum PathRewrite {
    /// Replaces what the route matched (its prefix, or its exact path).
    Prefix(String, String),
    /// Every match of the pattern in the path (not the query) replaced.
    Regex(Regex, String),
}

/// A redirect's rules.
#[derive(Debug, Clone)]
pub struct Redirect {
    status: StatusCode,
    scheme: Option<String>,
    host: Option<String>,
    port: Option<u16>,
    path: Option<String>,
    rewrite: Option<PathRewrite>,
    strip_query: bool,
}

fn authority(s: &str) -> Result<Authority, Invalid> {
    Authority::try_from(s).map_err(|_| Invalid(format!("{s:?} is not an authority")))
}

/// `RegexMatchAndSubstitute` with RE2's `\N` references in Rust's `${N}` form.
fn regex_rewrite(r: &RegexMatchAndSubstitute) -> Result<PathRewrite, Invalid> {
    let pattern = r
        .pattern
        .as_ref()
        .ok_or_else(|| Invalid("regex_rewrite without a pattern".into()))?;
    let regex = Regex::new(&pattern.regex).map_err(|e| Invalid(format!("regex {:?}: {e}", pattern.regex)))?;
    let mut substitution = String::new();
    let mut chars = r.substitution.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '$' => substitution.push_str("$$"),
            '\\' if chars.peek().is_some_and(char::is_ascii_digit) => {
                let digit = chars.next().expect("peeked");
                substitution.push_str(&format!("${{{digit}}}"));
            }
            '\\' if chars.peek() == Some(&'\\') => {
                chars.next();
                substitution.push('\\');
            }
            c => substitution.push(c),
        }
    }
    Ok(PathRewrite::Regex(regex, substitution))
}

impl PathRewrite {
    /// The new path (and query) for `path_and_query`.
    fn apply(&self, path_and_query: &str) -> String {
        match self {
            PathRewrite::Prefix(matched, replacement) => {
                let rest = path_and_query.get(matched.len()..).unwrap_or("");
                format!("{replacement}{rest}")
            }
            PathRewrite::Regex(regex, substitution) => {
                let (path, query) = match path_and_query.split_once('?') {
                    Some((p, q)) => (p, Some(q)),
                    None => (path_and_query, None),
                };
                let path = regex.replace_all(path, substitution.as_str());
                match query {
                    Some(q) => format!("{path}?{q}"),
                    None => path.into_owned(),
                }
            }
        }
    }
}

fn prefix_rewrite(matcher: &Matcher, replacement: &str) -> Result<Option<PathRewrite>, Invalid> {
    if replacement.is_empty() {
        return Ok(None);
    }
    let matched = matcher
        .literal()
        .ok_or_else(|| Invalid("prefix_rewrite needs a prefix or path match".into()))?;
    Ok(Some(PathRewrite::Prefix(matched.to_owned(), replacement.to_owned())))
}

impl Action {
    /// Compiles a route's action; `matcher` is the route's, which rewrites refer to.
    pub fn compile(action: Option<&route::Action>, matcher: &Matcher) -> Result<Self, Invalid> {
        match action {
            Some(route::Action::Route(r)) => Ok(Action::Forward(Forward::compile(r, matcher)?)),
            Some(route::Action::Redirect(r)) => Ok(Action::Redirect(Redirect::compile(r, matcher)?)),
            Some(route::Action::DirectResponse(d)) => direct(d),
            _ => Err(Invalid("a route needs route, redirect or direct_response".into())),
        }
    }
}

fn direct(d: &DirectResponseAction) -> Result<Action, Invalid> {
    let status = u16::try_from(d.status)
        .ok()
        .and_then(|s| StatusCode::from_u16(s).ok())
        .filter(|s| s.as_u16() >= 200)
        .ok_or_else(|| Invalid(format!("direct_response status {}", d.status)))?;
    let body = match d.body.as_ref().and_then(|b| b.specifier.as_ref()) {
        None => Bytes::new(),
        Some(Specifier::InlineString(s)) => Bytes::from(s.clone()),
        Some(Specifier::InlineBytes(b)) => Bytes::from(b.clone()),
        Some(_) => return Err(Invalid("direct_response body must be inline".into())),
    };
    Ok(Action::Direct { status, body })
}

/// `RouteAction.cluster_not_found_response_code` as a status.
fn cluster_not_found(code: i32) -> Result<StatusCode, Invalid> {
    use envoy_types::pb::envoy::config::route::v3::route_action::ClusterNotFoundResponseCode as Code;
    match Code::try_from(code) {
        Ok(Code::ServiceUnavailable) => Ok(StatusCode::SERVICE_UNAVAILABLE),
        Ok(Code::NotFound) => Ok(StatusCode::NOT_FOUND),
        Ok(Code::InternalServerError) => Ok(StatusCode::INTERNAL_SERVER_ERROR),
        Err(_) => Err(Invalid(format!("cluster_not_found_response_code {code}"))),
    }
}

impl Forward {
    fn compile(r: &RouteAction, matcher: &Matcher) -> Result<Self, Invalid> {
        let targets = match &r.cluster_specifier {
            Some(ClusterSpecifier::Cluster(c)) => vec![Target {
                cluster: c.clone(),
                weight: 1,
                headers: HeaderPolicy::default(),
                host_rewrite: None,
            }],
            Some(ClusterSpecifier::WeightedClusters(w)) => w
                .clusters
                .iter()
                .map(|c| {
                    let host_rewrite = match &c.host_rewrite_specifier {
                        Some(cluster_weight::HostRewriteSpecifier::HostRewriteLiteral(h)) => Some(authority(h)?),
                        None => None,
                    };
                    Ok(Target {
                        cluster: c.name.clone(),
                        weight: c.weight.map_or(0, |w| u64::from(w.value)),
                        headers: HeaderPolicy {
                            request: Mutations::compile(&c.request_headers_to_add, &c.request_headers_to_remove)?,
                            response: Mutations::compile(&c.response_headers_to_add, &c.response_headers_to_remove)?,
                        },
                        host_rewrite,
                    })
                })
                .collect::<Result<Vec<_>, Invalid>>()?,
            _ => return Err(Invalid("a route action needs cluster or weighted_clusters".into())),
        };
        let total_weight = targets.iter().map(|t| t.weight).sum();
        if total_weight == 0 || targets.iter().any(|t| t.cluster.is_empty()) {
            return Err(Invalid(
                "weighted clusters need names and a positive total weight".into(),
            ));
        }
        let rewrite = match &r.regex_rewrite {
            Some(rr) => Some(regex_rewrite(rr)?),
            None => prefix_rewrite(matcher, &r.prefix_rewrite)?,
        };
        let host_rewrite = match &r.host_rewrite_specifier {
            Some(HostRewriteSpecifier::HostRewriteLiteral(h)) => Some(authority(h)?),
            _ => None,
        };
        let timeout = match &r.timeout {
            Some(t) => Some(super::duration(t, "timeout")?).filter(|t| !t.is_zero()),
            None => Some(DEFAULT_TIMEOUT),
        };
        Ok(Self {
            targets,
            total_weight,
            rewrite,
            host_rewrite,
            timeout,
            retry: r.retry_policy.as_ref().map(RetryPolicy::compile).transpose()?,
            mirrors: r
                .request_mirror_policies
                .iter()
                .map(Mirror::compile)
                .collect::<Result<_, _>>()?,
            hash: HashPolicy::compile(&r.hash_policy)?,
            cluster_not_found: cluster_not_found(r.cluster_not_found_response_code)?,
        })
    }

    /// Draws the cluster for one request by weight.
    pub fn pick(&self) -> &Target {
        let mut point = rand::rng().random_range(0..self.total_weight);
        for t in &self.targets {
            if point < t.weight {
                return t;
            }
            point -= t.weight;
        }
        self.targets.last().expect("compiled with at least one target")
    }

    /// The path and query to send upstream.
    pub fn path(&self, path_and_query: &str) -> String {
        match &self.rewrite {
            Some(r) => r.apply(path_and_query),
            None => path_and_query.to_owned(),
        }
    }

    /// Keeps route-level retries when the action has none (the virtual host's policy).
    pub fn inherit_retry(&mut self, vhost: Option<&RetryPolicy>) {
        if self.retry.is_none() {
            self.retry = vhost.cloned();
        }
    }
}

impl Redirect {
    fn compile(r: &RedirectAction, matcher: &Matcher) -> Result<Self, Invalid> {
        let status = match RedirectResponseCode::try_from(r.response_code) {
            Ok(RedirectResponseCode::MovedPermanently) => StatusCode::MOVED_PERMANENTLY,
            Ok(RedirectResponseCode::Found) => StatusCode::FOUND,
            Ok(RedirectResponseCode::SeeOther) => StatusCode::SEE_OTHER,
            Ok(RedirectResponseCode::TemporaryRedirect) => StatusCode::TEMPORARY_REDIRECT,
            Ok(RedirectResponseCode::PermanentRedirect) => StatusCode::PERMANENT_REDIRECT,
            Err(_) => return Err(Invalid(format!("redirect response_code {}", r.response_code))),
        };
        let scheme = match &r.scheme_rewrite_specifier {
            Some(SchemeRewriteSpecifier::HttpsRedirect(true)) => Some("https".to_owned()),
            Some(SchemeRewriteSpecifier::SchemeRedirect(s)) if !s.is_empty() => Some(s.to_ascii_lowercase()),
            _ => None,
        };
        let (path, rewrite) = match &r.path_rewrite_specifier {
            Some(PathRewriteSpecifier::PathRedirect(p)) => (Some(p.clone()), None),
            Some(PathRewriteSpecifier::PrefixRewrite(p)) => (None, prefix_rewrite(matcher, p)?),
            Some(PathRewriteSpecifier::RegexRewrite(rr)) => (None, Some(regex_rewrite(rr)?)),
            Some(PathRewriteSpecifier::PathRewrite(_)) => {
                return Err(Invalid("redirect path_rewrite (URI templates) is not supported".into()));
            }
            None => (None, None),
        };
        Ok(Self {
            status,
            scheme,
            host: (!r.host_redirect.is_empty()).then(|| r.host_redirect.clone()),
            port: match r.port_redirect {
                0 => None,
                p => Some(u16::try_from(p).map_err(|_| Invalid(format!("port_redirect {p}")))?),
            },
            path,
            rewrite,
            strip_query: r.strip_query,
        })
    }

    /// The status to answer with.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// Envoy's `Location` for `req`: the scheme, host, port and path each replaced when the
    /// redirect says so; a port is dropped when it is the default of the final scheme or
    /// the host is replaced without one.
    pub fn location(&self, req: &Parts) -> String {
        let original_scheme = req.uri.scheme_str().unwrap_or("http").to_ascii_lowercase();
        let scheme = self.scheme.clone().unwrap_or_else(|| original_scheme.clone());
        let host_header = matcher::header_value(req, ":authority").unwrap_or_default();
        let (host, port) = match &self.host {
            Some(h) => (h.clone(), None),
            None => match host_header.rsplit_once(':') {
                Some((h, p)) if !h.ends_with(']') || host_header.starts_with('[') => {
                    (h.to_owned(), p.parse::<u16>().ok())
                }
                _ => (host_header.clone(), None),
            },
        };
        let port = self.port.or(port.filter(|_| scheme == original_scheme));
        let port = port.filter(|p| !matches!((scheme.as_str(), p), ("http", 80) | ("https", 443)));
        let original = req.uri.path_and_query().map_or("/", |p| p.as_str());
        let (original_path, query) = match original.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (original, None),
        };
        let query = query.filter(|_| !self.strip_query);
        let path_and_query = match (&self.path, &self.rewrite) {
            (Some(p), _) if p.contains('?') => p.clone(),
            (Some(p), _) => with_query(p, query),
            (None, Some(r)) => with_query(&r.apply(original_path), query),
            (None, None) => with_query(original_path, query),
        };
        match port {
            Some(p) => format!("{scheme}://{host}:{p}{path_and_query}"),
            None => format!("{scheme}://{host}{path_and_query}"),
        }
    }
}

fn with_query(path: &str, query: Option<&str>) -> String {
    match query {
        Some(q) => format!("{path}?{q}"),
        None => path.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::req as get;
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::DataSource;
    use envoy_types::pb::envoy::config::route::v3::route_match::PathSpecifier;
    use envoy_types::pb::envoy::config::route::v3::weighted_cluster::ClusterWeight;
    use envoy_types::pb::envoy::config::route::v3::{RouteMatch, WeightedCluster};
    use envoy_types::pb::envoy::r#type::matcher::v3::RegexMatcher;
    use envoy_types::pb::google::protobuf::UInt32Value;
    use proptest::prelude::*;

    fn prefix(p: &str) -> Matcher {
        Matcher::compile(&RouteMatch {
            path_specifier: Some(PathSpecifier::Prefix(p.into())),
            ..Default::default()
        })
        .unwrap()
    }

    fn forward(r: RouteAction, m: &Matcher) -> Forward {
        match Action::compile(Some(&route::Action::Route(r)), m).unwrap() {
            Action::Forward(f) => f,
            other => panic!("{other:?}"),
        }
    }

    fn weighted(weights: &[u32]) -> RouteAction {
        RouteAction {
            cluster_specifier: Some(ClusterSpecifier::WeightedClusters(WeightedCluster {
                clusters: weights
                    .iter()
                    .enumerate()
                    .map(|(i, w)| ClusterWeight {
                        name: format!("c{i}"),
                        weight: Some(UInt32Value { value: *w }),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(16))]
        /// Each cluster's share of 4 000 draws is within six standard deviations of its weight.
        #[test]
        fn weights_are_honoured(weights in proptest::collection::vec(1u32..100, 1..5)) {
            let f = forward(weighted(&weights), &prefix("/"));
            let n = 4_000usize;
            let mut counts = vec![0usize; weights.len()];
            for _ in 0..n {
                let name = &f.pick().cluster;
                counts[name[1..].parse::<usize>().unwrap()] += 1;
            }
            let total: u32 = weights.iter().sum();
            for (w, c) in weights.iter().zip(counts) {
                let p = f64::from(*w) / f64::from(total);
                let sigma = (n as f64 * p * (1.0 - p)).sqrt();
                prop_assert!((c as f64 - n as f64 * p).abs() <= 6.0 * sigma + 1.0, "weight {w}/{total}: {c} of {n}");
            }
        }
    }

    #[test]
    fn a_zero_total_weight_is_refused() {
        let m = prefix("/");
        assert!(Action::compile(Some(&route::Action::Route(weighted(&[0, 0]))), &m).is_err());
        assert!(Action::compile(None, &m).is_err());
    }

    #[test]
    fn prefix_and_regex_rewrites() {
        let m = prefix("/api/v1");
        let f = forward(
            RouteAction {
                prefix_rewrite: "/v2".into(),
                ..weighted(&[1])
            },
            &m,
        );
        assert_eq!(f.path("/api/v1/users?x=1"), "/v2/users?x=1");
        assert_eq!(f.timeout, Some(Duration::from_secs(15)), "Envoy's default");
        let f = forward(
            RouteAction {
                regex_rewrite: Some(RegexMatchAndSubstitute {
                    pattern: Some(RegexMatcher {
                        regex: "^/service/([^/]+)(/.*)$".into(),
                        ..Default::default()
                    }),
                    substitution: "\\2/instance/\\1".into(),
                }),
                ..weighted(&[1])
            },
            &m,
        );
        assert_eq!(f.path("/service/foo/v1/api?q=1"), "/v1/api/instance/foo?q=1");
        let f = forward(
            RouteAction {
                timeout: Some(envoy_types::pb::google::protobuf::Duration { seconds: 0, nanos: 0 }),
                ..weighted(&[1])
            },
            &m,
        );
        assert_eq!(f.timeout, None, "0 is no timeout");
    }

    #[test]
    fn redirects_follow_envoys_location_rules() {
        let redirect = |r: RedirectAction, m: &Matcher| match Action::compile(Some(&route::Action::Redirect(r)), m) {
            Ok(Action::Redirect(r)) => r,
            other => panic!("{other:?}"),
        };
        let m = prefix("/old");
        let r = redirect(
            RedirectAction {
                path_rewrite_specifier: Some(PathRewriteSpecifier::PathRedirect("/new".into())),
                ..Default::default()
            },
            &m,
        );
        assert_eq!(r.status(), StatusCode::MOVED_PERMANENTLY, "301 by default");
        assert_eq!(
            r.location(&get("/old/x?a=1", "reviews:9080")),
            "http://reviews:9080/new?a=1"
        );
        let r = redirect(
            RedirectAction {
                host_redirect: "ratings.example".into(),
                response_code: RedirectResponseCode::Found as i32,
                strip_query: true,
                scheme_rewrite_specifier: Some(SchemeRewriteSpecifier::HttpsRedirect(true)),
                path_rewrite_specifier: Some(PathRewriteSpecifier::PrefixRewrite("/fresh".into())),
                ..Default::default()
            },
            &m,
        );
        assert_eq!(r.status(), StatusCode::FOUND);
        assert_eq!(
            r.location(&get("/old/x?a=1", "reviews:9080")),
            "https://ratings.example/fresh/x"
        );
        let r = redirect(
            RedirectAction {
                port_redirect: 8443,
                ..Default::default()
            },
            &m,
        );
        assert_eq!(r.location(&get("/old", "reviews:9080")), "http://reviews:8443/old");
        let r = redirect(
            RedirectAction {
                scheme_rewrite_specifier: Some(SchemeRewriteSpecifier::SchemeRedirect("https".into())),
                ..Default::default()
            },
            &m,
        );
        assert_eq!(
            r.location(&get("/old", "reviews:80")),
            "https://reviews/old",
            "the old port goes with the old scheme"
        );
    }

    #[test]
    fn direct_responses_are_inline() {
        let d = |body| DirectResponseAction {
            status: 418,
            body: Some(DataSource {
                specifier: Some(body),
                ..Default::default()
            }),
            body_format: None,
        };
        let m = prefix("/");
        match Action::compile(
            Some(&route::Action::DirectResponse(d(Specifier::InlineString("tea".into())))),
            &m,
        ) {
            Ok(Action::Direct { status, body }) => assert_eq!((status.as_u16(), &body[..]), (418, &b"tea"[..])),
            other => panic!("{other:?}"),
        }
        assert!(
            Action::compile(
                Some(&route::Action::DirectResponse(d(Specifier::Filename("/etc".into())))),
                &m
            )
            .is_err()
        );
    }
}
