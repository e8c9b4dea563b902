//! HTTP routing as Envoy's route configurations say (Istio's VirtualService, see
//! docs/l7-xds.md): a [`RouteTable`] compiled once from a `RouteConfiguration`, in which
//! each request finds its virtual host by authority and then the first route that matches.
//!
//! Pure: a configuration in, a table or an error naming the resource out, so the xDS client
//! can NACK a bad one and keep the last good table.
//!
//! - [`matcher`]: which requests a route takes.
//! - [`action`]: what it does with them (clusters by weight, rewrites, redirect, direct answer).
//! - [`headers`]: header mutations at each level.
//! - [`fault`]: injected delays and aborts. [`retry`]: retry policies. [`mirror`]: shadowing.
//! - [`hash`]: what keys a request to an endpoint of a ring-hash cluster.

pub mod action;
pub mod fault;
pub mod fraction;
pub mod hash;
pub mod headers;
pub mod matcher;
pub mod mirror;
pub mod retry;

use envoy_types::pb::envoy::config::route::v3::{
    Route as EnvoyRoute, RouteConfiguration, VirtualHost as EnvoyVirtualHost,
};
use hyper::HeaderMap;
use hyper::http::request::Parts;

use crate::destinations::BadResource;
use action::{Action, Target};
use fault::Fault;
use headers::{HeaderPolicy, Mutations};
use matcher::Matcher;
use retry::RetryPolicy;

/// Why part of a route configuration cannot be used; the caller adds where it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

/// A protobuf `Duration` as a std one; negative or out-of-range is refused.
pub fn duration(d: &envoy_types::pb::google::protobuf::Duration, what: &str) -> Result<std::time::Duration, Invalid> {
    let (Ok(seconds), Ok(nanos)) = (u64::try_from(d.seconds), u32::try_from(d.nanos)) else {
        return Err(Invalid(format!("{what}: negative duration")));
    };
    if nanos >= 1_000_000_000 {
        return Err(Invalid(format!("{what}: nanos out of range")));
    }
    Ok(std::time::Duration::new(seconds, nanos))
}

/// A compiled `RouteConfiguration`.
#[derive(Debug)]
pub struct RouteTable {
    pub name: String,
    hosts: Vec<VirtualHost>,
    /// The virtual host of each exact (non-wildcard) domain, the last one naming it: an
    /// exact fit beats every wildcard, so a request whose authority is here needs no scan
    /// (Istio's route configurations are one virtual host per service, each with exact
    /// domains: a table of a thousand services would otherwise be a thousand per request).
    exact: std::collections::HashMap<String, usize>,
    /// The virtual hosts with a wildcard domain (`*` included), for the others.
    wildcard: Vec<usize>,
    headers: HeaderPolicy,
}

#[derive(Debug)]
struct VirtualHost {
    domains: Vec<String>,
    routes: Vec<Route>,
    headers: HeaderPolicy,
}

/// One compiled route.
#[derive(Debug)]
pub struct Route {
    pub name: String,
    matcher: Matcher,
    pub action: Action,
    pub fault: Option<Fault>,
    headers: HeaderPolicy,
}

/// The route a request found, with the levels above it whose headers also apply.
#[derive(Debug, Clone, Copy)]
pub struct Selected<'a> {
    pub route: &'a Route,
    host: &'a VirtualHost,
    table: &'a RouteTable,
}

fn policy(
    request_add: &[envoy_types::pb::envoy::config::core::v3::HeaderValueOption],
    request_remove: &[String],
    response_add: &[envoy_types::pb::envoy::config::core::v3::HeaderValueOption],
    response_remove: &[String],
) -> Result<HeaderPolicy, Invalid> {
    Ok(HeaderPolicy {
        request: Mutations::compile(request_add, request_remove)?,
        response: Mutations::compile(response_add, response_remove)?,
    })
}

impl Route {
    fn compile(r: &EnvoyRoute, vhost_retry: Option<&RetryPolicy>) -> Result<Self, Invalid> {
        let matcher = Matcher::compile(r.r#match.as_ref().ok_or_else(|| Invalid("no match".into()))?)?;
        let mut action = Action::compile(r.action.as_ref(), &matcher)?;
        if let Action::Forward(f) = &mut action {
            f.inherit_retry(vhost_retry);
        }
        Ok(Self {
            name: r.name.clone(),
            fault: Fault::compile(r.typed_per_filter_config.get(fault::FILTER))?,
            headers: policy(
                &r.request_headers_to_add,
                &r.request_headers_to_remove,
                &r.response_headers_to_add,
                &r.response_headers_to_remove,
            )?,
            matcher,
            action,
        })
    }
}

impl VirtualHost {
    fn compile(v: &EnvoyVirtualHost) -> Result<Self, Invalid> {
        let retry = v.retry_policy.as_ref().map(RetryPolicy::compile).transpose()?;
        let routes = v
            .routes
            .iter()
            .enumerate()
            .map(|(i, r)| {
                Route::compile(r, retry.as_ref()).map_err(|e| {
                    let name = if r.name.is_empty() {
                        format!("#{i}")
                    } else {
                        r.name.clone()
                    };
                    Invalid(format!("virtual host {:?}, route {name}: {e}", v.name))
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            domains: v.domains.iter().map(|d| d.to_ascii_lowercase()).collect(),
            routes,
            headers: policy(
                &v.request_headers_to_add,
                &v.request_headers_to_remove,
                &v.response_headers_to_add,
                &v.response_headers_to_remove,
            )
            .map_err(|e| Invalid(format!("virtual host {:?}: {e}", v.name)))?,
        })
    }

    /// How well `domain` takes `host` (Envoy's order: exact, then the longest suffix
    /// wildcard, then the longest prefix wildcard, then `*`), or `None`.
    fn fit(domain: &str, host: &str) -> Option<(u8, usize)> {
        if domain == "*" {
            Some((0, 0))
        } else if let Some(suffix) = domain.strip_prefix('*') {
            host.ends_with(suffix).then_some((2, suffix.len()))
        } else if let Some(prefix) = domain.strip_suffix('*') {
            host.starts_with(prefix).then_some((1, prefix.len()))
        } else {
            (domain == host).then_some((3, 0))
        }
    }
}

impl RouteTable {
    /// Compiles `rc`; an error names it and where in it the problem is.
    pub fn compile(rc: &RouteConfiguration) -> Result<Self, BadResource> {
        let wrap = |e: Invalid| BadResource {
            resource: rc.name.clone(),
            problem: e.0,
        };
        let hosts: Vec<VirtualHost> = rc
            .virtual_hosts
            .iter()
            .map(VirtualHost::compile)
            .collect::<Result<_, _>>()
            .map_err(wrap)?;
        let mut exact = std::collections::HashMap::new();
        let mut wildcard = Vec::new();
        for (i, h) in hosts.iter().enumerate() {
            for d in &h.domains {
                if d.starts_with('*') || d.ends_with('*') {
                    if wildcard.last() != Some(&i) {
                        wildcard.push(i);
                    }
                } else {
                    exact.insert(d.clone(), i);
                }
            }
        }
        Ok(Self {
            name: rc.name.clone(),
            hosts,
            exact,
            wildcard,
            headers: policy(
                &rc.request_headers_to_add,
                &rc.request_headers_to_remove,
                &rc.response_headers_to_add,
                &rc.response_headers_to_remove,
            )
            .map_err(wrap)?,
        })
    }

    /// The route for `req`: its virtual host by `:authority` (with or without the port),
    /// then the first matching route; `None` is Envoy's `NR`, a 404.
    pub fn select(&self, req: &Parts) -> Option<Selected<'_>> {
        let authority = matcher::header_value(req, ":authority")
            .unwrap_or_default()
            .to_ascii_lowercase();
        let bare = authority.rsplit_once(':').map_or(authority.as_str(), |(h, _)| h);
        // Of equal fits the last host wins, as `max_by_key` has it below.
        let exact = [self.exact.get(&authority), self.exact.get(bare)]
            .into_iter()
            .flatten()
            .max();
        let host = match exact {
            Some(&i) => &self.hosts[i],
            None => self
                .wildcard
                .iter()
                .map(|&i| &self.hosts[i])
                .filter_map(|h| {
                    h.domains
                        .iter()
                        .filter_map(|d| VirtualHost::fit(d, &authority).or_else(|| VirtualHost::fit(d, bare)))
                        .max()
                        .map(|fit| (fit, h))
                })
                .max_by_key(|(fit, _)| *fit)
                .map(|(_, h)| h)?,
        };
        let route = host.routes.iter().find(|r| r.matcher.matches(req))?;
        Some(Selected {
            route,
            host,
            table: self,
        })
    }
}

impl Selected<'_> {
    /// Envoy's default order: the most specific level first, so that a less specific
    /// level's overwrite wins (`most_specific_header_mutations_wins: false`).
    fn levels<'a>(&'a self, target: Option<&'a Target>) -> impl Iterator<Item = &'a HeaderPolicy> {
        target
            .map(|t| &t.headers)
            .into_iter()
            .chain([&self.route.headers, &self.host.headers, &self.table.headers])
    }

    /// Applies every level's request mutations.
    pub fn request_headers(&self, target: Option<&Target>, headers: &mut HeaderMap) {
        self.levels(target).for_each(|l| l.request.apply(headers));
    }

    /// Applies every level's response mutations.
    pub fn response_headers(&self, target: Option<&Target>, headers: &mut HeaderMap) {
        self.levels(target).for_each(|l| l.response.apply(headers));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::header_value_option::HeaderAppendAction;
    use envoy_types::pb::envoy::config::route::v3::route_action::ClusterSpecifier;
    use envoy_types::pb::envoy::config::route::v3::route_match::PathSpecifier;
    use envoy_types::pb::envoy::config::route::v3::{RouteAction, RouteMatch, route};
    use envoy_types::pb::envoy::r#type::matcher::v3::RegexMatcher;

    fn to(prefix: &str, cluster: &str) -> EnvoyRoute {
        EnvoyRoute {
            name: cluster.into(),
            r#match: Some(RouteMatch {
                path_specifier: Some(PathSpecifier::Prefix(prefix.into())),
                ..Default::default()
            }),
            action: Some(route::Action::Route(RouteAction {
                cluster_specifier: Some(ClusterSpecifier::Cluster(cluster.into())),
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    fn vhost(name: &str, domains: &[&str], routes: Vec<EnvoyRoute>) -> EnvoyVirtualHost {
        EnvoyVirtualHost {
            name: name.into(),
            domains: domains.iter().map(|d| (*d).to_owned()).collect(),
            routes,
            ..Default::default()
        }
    }

    /// A GET of `uri` with this `host`.
    pub(super) fn req(uri: &str, host: &str) -> Parts {
        hyper::Request::builder()
            .uri(uri)
            .header("host", host)
            .body(())
            .unwrap()
            .into_parts()
            .0
    }

    fn cluster_of(s: Option<Selected<'_>>) -> Option<String> {
        match &s?.route.action {
            Action::Forward(f) => Some(f.pick().cluster.clone()),
            _ => None,
        }
    }

    #[test]
    fn first_match_wins_and_no_match_is_none() {
        let table = RouteTable::compile(&RouteConfiguration {
            name: "reviews:9080".into(),
            virtual_hosts: vec![vhost("reviews:9080", &["*"], vec![to("/api", "api"), to("/", "rest")])],
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            cluster_of(table.select(&req("/api/x", "reviews"))).as_deref(),
            Some("api")
        );
        assert_eq!(
            cluster_of(table.select(&req("/other", "reviews"))).as_deref(),
            Some("rest")
        );
        let narrow = RouteTable::compile(&RouteConfiguration {
            virtual_hosts: vec![vhost("v", &["*"], vec![to("/api", "api")])],
            ..Default::default()
        })
        .unwrap();
        assert!(narrow.select(&req("/other", "reviews")).is_none());
    }

    #[test]
    fn virtual_hosts_by_authority_most_specific_first() {
        let table = RouteTable::compile(&RouteConfiguration {
            virtual_hosts: vec![
                vhost("any", &["*"], vec![to("/", "any")]),
                vhost("suffix", &["*.example.com"], vec![to("/", "suffix")]),
                vhost("prefix", &["reviews.*"], vec![to("/", "prefix")]),
                vhost("exact", &["reviews.example.com"], vec![to("/", "exact")]),
            ],
            ..Default::default()
        })
        .unwrap();
        let host = |h| cluster_of(table.select(&req("/", h)));
        assert_eq!(host("reviews.example.com:9080").as_deref(), Some("exact"));
        assert_eq!(host("ratings.example.com").as_deref(), Some("suffix"));
        assert_eq!(host("reviews.default").as_deref(), Some("prefix"));
        assert_eq!(host("10.0.0.1:80").as_deref(), Some("any"));
    }

    #[test]
    fn an_exact_domain_is_found_among_many_and_the_last_host_naming_it_wins() {
        let mut hosts: Vec<EnvoyVirtualHost> = (0..1000)
            .map(|i| {
                let d = format!("svc-{i}.default.svc.cluster.local");
                vhost(&d, &[&d, &format!("{d}:9080")], vec![to("/", &format!("c{i}"))])
            })
            .collect();
        hosts.push(vhost(
            "again",
            &["svc-7.default.svc.cluster.local"],
            vec![to("/", "again")],
        ));
        hosts.push(vhost("wild", &["*.cluster.local"], vec![to("/", "wild")]));
        let table = RouteTable::compile(&RouteConfiguration {
            virtual_hosts: hosts,
            ..Default::default()
        })
        .unwrap();
        let host = |h| cluster_of(table.select(&req("/", h)));
        assert_eq!(host("svc-999.default.svc.cluster.local:9080").as_deref(), Some("c999"));
        assert_eq!(host("SVC-3.default.svc.cluster.local").as_deref(), Some("c3"));
        assert_eq!(host("svc-7.default.svc.cluster.local:9080").as_deref(), Some("again"));
        assert_eq!(host("other.cluster.local").as_deref(), Some("wild"));
    }

    #[test]
    fn header_levels_and_errors_name_the_resource_and_route() {
        let set = |k, v| headers::tests::option(k, v, HeaderAppendAction::OverwriteIfExistsOrAdd);
        let mut route = to("/", "c");
        route.request_headers_to_add = vec![set("x-level", "route"), set("x-route", "1")];
        let mut host = vhost("v", &["*"], vec![route]);
        host.request_headers_to_add = vec![set("x-level", "vhost")];
        let table = RouteTable::compile(&RouteConfiguration {
            virtual_hosts: vec![host],
            ..Default::default()
        })
        .unwrap();
        let mut headers = HeaderMap::new();
        table
            .select(&req("/", "h"))
            .unwrap()
            .request_headers(None, &mut headers);
        assert_eq!(headers["x-level"], "vhost", "the less specific level's overwrite wins");
        assert_eq!(headers["x-route"], "1");

        let mut bad = to("/", "c");
        bad.r#match = Some(RouteMatch {
            path_specifier: Some(PathSpecifier::SafeRegex(RegexMatcher {
                regex: "(".into(),
                ..Default::default()
            })),
            ..Default::default()
        });
        bad.name = "broken".into();
        let e = RouteTable::compile(&RouteConfiguration {
            name: "reviews:9080".into(),
            virtual_hosts: vec![vhost("reviews:9080", &["*"], vec![bad])],
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(e.resource, "reviews:9080");
        assert!(e.problem.contains("route broken"), "{}", e.problem);
    }
}
