//! RDS: the route configuration of an HTTP service port, `HOST:PORT`, from the
//! VirtualService that routes its host, as docs/l7-xds.md lays out: one virtual
//! host for every domain (the VIP already chose the service), the rules in order
//! (first match wins, no match is a 404), each Istio match one Envoy route.
//! Without a VirtualService, everything goes to the service port's cluster with
//! Istio's default retry policy. Rules are kept only where their `port`,
//! `sourceLabels` and `sourceNamespace` fit, so a configuration may be the
//! requesting proxy's own. Pure.

use std::collections::{BTreeMap, HashMap};

use envoy_types::pb::envoy::config::core::v3::{
    HeaderValue, HeaderValueOption, RuntimeFractionalPercent, header_value_option,
};
use envoy_types::pb::envoy::config::route::v3::{
    DirectResponseAction, HeaderMatcher, QueryParameterMatcher, RedirectAction, RetryPolicy, Route, RouteAction,
    RouteConfiguration, RouteMatch, VirtualHost, WeightedCluster, header_matcher, query_parameter_matcher,
    redirect_action, retry_policy, route, route_action, route_match, weighted_cluster,
};
use envoy_types::pb::envoy::extensions::filters::common::fault::v3::{FaultDelay, fault_delay};
use envoy_types::pb::envoy::extensions::filters::http::fault::v3::{FaultAbort, HttpFault, fault_abort};
use envoy_types::pb::envoy::extensions::retry::host::previous_hosts::v3::PreviousHostsPredicate;
use envoy_types::pb::envoy::r#type::matcher::v3::{
    RegexMatchAndSubstitute, RegexMatcher, StringMatcher, string_matcher,
};
use envoy_types::pb::envoy::r#type::v3::{FractionalPercent, fractional_percent};
use envoy_types::pb::google::protobuf::{Any, BoolValue, UInt32Value};
use mesh_vocab::Hostname;

use super::{any, cluster_name, subset_cluster_name};
use crate::model::ServiceKey;
use crate::networking;
use crate::networking::destination_rule::ConsistentHash;
use crate::networking::virtual_service::{
    Destination, HeaderOperations, Headers, HttpMatchRequest, HttpRoute, Matcher, StringMatch,
};
use crate::routing::Routing;

/// The fault filter's name, under which routes carry their faults.
pub const FAULT_FILTER: &str = "envoy.filters.http.fault";
/// Its config type.
pub const FAULT_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault";
/// Istio's default `retry_on`.
pub const DEFAULT_RETRY_ON: &str = "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes";
const PREVIOUS_HOSTS: &str = "envoy.retry_host_predicates.previous_hosts";
const PREVIOUS_HOSTS_TYPE: &str =
    "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate";

/// The proxy asking for routes, as `sourceLabels` and `sourceNamespace` see it.
#[derive(Debug, Clone, Copy)]
pub struct Requester<'a> {
    pub namespace: Option<&'a str>,
    pub labels: &'a BTreeMap<String, String>,
}

/// Which client the routes are for: proxyless gRPC only forwards (no redirect,
/// direct response or mirror), so rules that need more are left out for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Client {
    Envoy,
    Grpc,
}

/// The route configuration (and virtual host) name of a service port: `HOST:PORT`.
pub fn route_config_name(key: &ServiceKey) -> String {
    format!("{}:{}", key.host, key.port)
}

/// The routes of `key` for `who`.
pub fn route_config(key: &ServiceKey, routing: &Routing, who: Requester<'_>, client: Client) -> RouteConfiguration {
    let name = route_config_name(key);
    let routes = match routing.http_rules(&key.host, who.namespace) {
        None => vec![default_route(key, routing)],
        Some((ns, http)) => http
            .iter()
            .enumerate()
            .flat_map(|(i, r)| rule_routes(key, routing, ns, i, r, who, client))
            .collect(),
    };
    RouteConfiguration {
        name: name.clone(),
        virtual_hosts: vec![VirtualHost {
            name,
            domains: vec!["*".into()],
            routes,
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// The route configuration of `port`'s wildcard HTTP listener (Istio's `PORT`): a virtual
/// host per host in `keys` (all on `port`), by `Host`, with the routes of its own
/// configuration, and `allow_any` passing every other request through to where it was
/// going (Istio's `PassthroughCluster`).
pub fn port_route_config(
    port: u16,
    keys: &[&ServiceKey],
    routing: &Routing,
    who: Requester<'_>,
    client: Client,
) -> RouteConfiguration {
    let mut virtual_hosts: Vec<VirtualHost> = keys
        .iter()
        .flat_map(|key| {
            let own = route_config(key, routing, who, client);
            own.virtual_hosts.into_iter().map(move |mut v| {
                v.domains = vec![key.host.to_string(), format!("{}:{port}", key.host)];
                v
            })
        })
        .collect();
    virtual_hosts.push(VirtualHost {
        name: "allow_any".into(),
        domains: vec!["*".into()],
        routes: vec![Route {
            name: "allow_any".into(),
            r#match: Some(prefix_all()),
            action: Some(route::Action::Route(RouteAction {
                cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(
                    super::listener::PASSTHROUGH_CLUSTER.into(),
                )),
                timeout: Some(proto_duration(std::time::Duration::ZERO)),
                ..Default::default()
            })),
            ..Default::default()
        }],
        ..Default::default()
    });
    RouteConfiguration {
        name: port.to_string(),
        virtual_hosts,
        ..Default::default()
    }
}

/// Everything to the service port's cluster, with Istio's default retries.
fn default_route(key: &ServiceKey, routing: &Routing) -> Route {
    Route {
        name: "default".into(),
        r#match: Some(prefix_all()),
        action: Some(route::Action::Route(RouteAction {
            cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(cluster_name(key))),
            timeout: Some(proto_duration(std::time::Duration::ZERO)),
            retry_policy: Some(default_retry_policy()),
            hash_policy: hash_policy(routing, &key.host),
            ..Default::default()
        })),
        ..Default::default()
    }
}

fn prefix_all() -> RouteMatch {
    RouteMatch {
        path_specifier: Some(route_match::PathSpecifier::Prefix("/".into())),
        ..Default::default()
    }
}

/// Istio's retry policy where a VirtualService says nothing: two retries of
/// connection failures, refused streams, and 503s, each on another host.
pub fn default_retry_policy() -> RetryPolicy {
    RetryPolicy {
        retry_on: DEFAULT_RETRY_ON.into(),
        num_retries: Some(UInt32Value { value: 2 }),
        retriable_status_codes: vec![503],
        retry_host_predicate: vec![retry_policy::RetryHostPredicate {
            name: PREVIOUS_HOSTS.into(),
            config_type: Some(retry_policy::retry_host_predicate::ConfigType::TypedConfig(any(
                PREVIOUS_HOSTS_TYPE,
                &PreviousHostsPredicate {},
            ))),
        }],
        host_selection_retry_max_attempts: 5,
        ..Default::default()
    }
}

/// The Envoy routes of rule `i` of a VirtualService in `ns`: one per match that
/// fits the port and the requester (one catch-all when it has no match).
fn rule_routes(
    key: &ServiceKey,
    routing: &Routing,
    ns: &str,
    i: usize,
    rule: &HttpRoute,
    who: Requester<'_>,
    client: Client,
) -> Vec<Route> {
    if client == Client::Grpc && rule.route.is_empty() {
        return Vec::new();
    }
    let fits = |m: &HttpMatchRequest| {
        m.port.is_none_or(|p| p == u32::from(key.port))
            && m.source_labels.iter().all(|(k, v)| who.labels.get(k) == Some(v))
            && m.source_namespace.as_deref().is_none_or(|n| who.namespace == Some(n))
    };
    let matches: Vec<RouteMatch> = if rule.r#match.is_empty() {
        vec![prefix_all()]
    } else {
        rule.r#match.iter().filter(|m| fits(m)).map(route_match).collect()
    };
    let name = rule.name.clone().unwrap_or_else(|| format!("rule-{i}"));
    let action = action(key, routing, ns, rule, client);
    let (mut req_add, mut req_remove, mut resp_add, mut resp_remove) = header_ops(rule.headers.as_ref());
    // A single destination is a plain cluster, not a weighted one: its own header
    // operations go on the route, after the rule's (as istiod merges them).
    if let [only] = &rule.route[..] {
        let (a, b, c, d) = header_ops(only.headers.as_ref());
        req_add.extend(a);
        req_remove.extend(b);
        resp_add.extend(c);
        resp_remove.extend(d);
    }
    let mut typed_per_filter_config = HashMap::new();
    if let Some(f) = rule.fault.as_ref().and_then(fault) {
        typed_per_filter_config.insert(FAULT_FILTER.to_owned(), f);
    }
    matches
        .into_iter()
        .map(|m| Route {
            name: name.clone(),
            r#match: Some(m),
            action: Some(action.clone()),
            request_headers_to_add: req_add.clone(),
            request_headers_to_remove: req_remove.clone(),
            response_headers_to_add: resp_add.clone(),
            response_headers_to_remove: resp_remove.clone(),
            typed_per_filter_config: typed_per_filter_config.clone(),
            ..Default::default()
        })
        .collect()
}

/// Istio's match as Envoy's: the URI as the path, the rest as header and query matchers.
fn route_match(m: &HttpMatchRequest) -> RouteMatch {
    let path_specifier = Some(match m.uri.as_ref().map(StringMatch::matcher) {
        Some(Matcher::Exact(p)) => route_match::PathSpecifier::Path(p.into()),
        Some(Matcher::Prefix(p)) => route_match::PathSpecifier::Prefix(p.into()),
        Some(Matcher::Regex(r)) => route_match::PathSpecifier::SafeRegex(regex(r)),
        Some(Matcher::Present) | None => route_match::PathSpecifier::Prefix("/".into()),
    });
    let mut headers: Vec<HeaderMatcher> = Vec::new();
    for (name, sm) in [
        (":method", &m.method),
        (":authority", &m.authority),
        (":scheme", &m.scheme),
    ] {
        if let Some(sm) = sm {
            headers.push(header_matcher(name, sm, false));
        }
    }
    headers.extend(m.headers.iter().map(|(k, sm)| header_matcher(k, sm, false)));
    headers.extend(m.without_headers.iter().map(|(k, sm)| header_matcher(k, sm, true)));
    let query_parameters = m
        .query_params
        .iter()
        .map(|(k, sm)| QueryParameterMatcher {
            name: k.clone(),
            query_parameter_match_specifier: Some(match string_matcher(sm) {
                Some(s) => query_parameter_matcher::QueryParameterMatchSpecifier::StringMatch(s),
                None => query_parameter_matcher::QueryParameterMatchSpecifier::PresentMatch(true),
            }),
        })
        .collect();
    RouteMatch {
        path_specifier,
        case_sensitive: m.ignore_uri_case.then_some(BoolValue { value: false }),
        headers,
        query_parameters,
        ..Default::default()
    }
}

fn regex(r: &str) -> RegexMatcher {
    RegexMatcher {
        regex: r.into(),
        ..Default::default()
    }
}

/// The Envoy string matcher of `sm`; None for "present".
fn string_matcher(sm: &StringMatch) -> Option<StringMatcher> {
    let pattern = match sm.matcher() {
        Matcher::Exact(e) => string_matcher::MatchPattern::Exact(e.into()),
        Matcher::Prefix(p) => string_matcher::MatchPattern::Prefix(p.into()),
        Matcher::Regex(r) => string_matcher::MatchPattern::SafeRegex(regex(r)),
        Matcher::Present => return None,
    };
    Some(StringMatcher {
        match_pattern: Some(pattern),
        ..Default::default()
    })
}

fn header_matcher(name: &str, sm: &StringMatch, invert: bool) -> HeaderMatcher {
    HeaderMatcher {
        name: name.into(),
        invert_match: invert,
        header_match_specifier: Some(match string_matcher(sm) {
            Some(s) => header_matcher::HeaderMatchSpecifier::StringMatch(s),
            None => header_matcher::HeaderMatchSpecifier::PresentMatch(true),
        }),
        ..Default::default()
    }
}

/// The cluster a destination names: its port, else the port being routed.
pub(crate) fn destination_cluster(key: &ServiceKey, routing: &Routing, ns: &str, d: &Destination) -> String {
    let host = routing.fqdn(&d.host, ns);
    let port = d.port.and_then(|p| u16::try_from(p.number).ok()).unwrap_or(key.port);
    let Ok(host) = Hostname::parse(&host) else {
        // Validation let through a name Envoy will not find: an unknown cluster is a 503, as in Istio.
        return format!("outbound|{port}||{host}");
    };
    let k = ServiceKey { host, port };
    match d.subset.as_deref() {
        Some(s) if !s.is_empty() => subset_cluster_name(&k, s),
        _ => cluster_name(&k),
    }
}

fn action(key: &ServiceKey, routing: &Routing, ns: &str, rule: &HttpRoute, client: Client) -> route::Action {
    if let Some(r) = &rule.redirect {
        return route::Action::Redirect(RedirectAction {
            host_redirect: r.authority.clone().unwrap_or_default(),
            port_redirect: r.port.unwrap_or_default(),
            path_rewrite_specifier: match (&r.uri, &r.uri_regex_rewrite) {
                (Some(uri), _) => Some(redirect_action::PathRewriteSpecifier::PathRedirect(uri.clone())),
                (None, Some(rr)) => Some(redirect_action::PathRewriteSpecifier::RegexRewrite(
                    RegexMatchAndSubstitute {
                        pattern: Some(regex(&rr.r#match)),
                        substitution: rr.rewrite.clone(),
                    },
                )),
                (None, None) => None,
            },
            scheme_rewrite_specifier: r
                .scheme
                .clone()
                .map(redirect_action::SchemeRewriteSpecifier::SchemeRedirect),
            response_code: redirect_code(r.redirect_code.unwrap_or(301)) as i32,
            ..Default::default()
        });
    }
    if let Some(d) = &rule.direct_response {
        use envoy_types::pb::envoy::config::core::v3::{DataSource, data_source};
        let body = d.body.as_ref().and_then(|b| {
            let specifier = match (&b.string, &b.bytes) {
                (Some(s), _) => data_source::Specifier::InlineString(s.clone()),
                (None, Some(bytes)) => data_source::Specifier::InlineBytes(
                    base64::Engine::decode(&base64::engine::general_purpose::STANDARD, bytes).unwrap_or_default(),
                ),
                (None, None) => return None,
            };
            Some(DataSource {
                specifier: Some(specifier),
                ..Default::default()
            })
        });
        return route::Action::DirectResponse(DirectResponseAction {
            status: d.status,
            body,
            ..Default::default()
        });
    }
    let cluster_specifier = match &rule.route[..] {
        [only] => route_action::ClusterSpecifier::Cluster(destination_cluster(key, routing, ns, &only.destination)),
        many => route_action::ClusterSpecifier::WeightedClusters(WeightedCluster {
            clusters: many
                .iter()
                .filter(|d| d.weight.unwrap_or(0) > 0)
                .map(|d| {
                    let (req_add, req_remove, resp_add, resp_remove) = header_ops(d.headers.as_ref());
                    weighted_cluster::ClusterWeight {
                        name: destination_cluster(key, routing, ns, &d.destination),
                        weight: Some(UInt32Value {
                            value: u32::try_from(d.weight.unwrap_or(0)).unwrap_or(u32::MAX),
                        }),
                        request_headers_to_add: req_add,
                        request_headers_to_remove: req_remove,
                        response_headers_to_add: resp_add,
                        response_headers_to_remove: resp_remove,
                        ..Default::default()
                    }
                })
                .collect(),
            ..Default::default()
        }),
    };
    let retry_policy = match &rule.retries {
        None => Some(default_retry_policy()),
        Some(r) if r.attempts == 0 => None,
        Some(r) => {
            let mut p = default_retry_policy();
            p.num_retries = Some(UInt32Value {
                value: u32::try_from(r.attempts).unwrap_or(u32::MAX),
            });
            if let Some(on) = r.retry_on.as_deref().filter(|s| !s.is_empty()) {
                // Numbers are status codes, which Envoy takes apart from the conditions.
                let (codes, conditions): (Vec<&str>, Vec<&str>) =
                    on.split(',').map(str::trim).partition(|c| c.parse::<u32>().is_ok());
                let mut conditions: Vec<String> = conditions.into_iter().map(str::to_owned).collect();
                if !codes.is_empty() && !conditions.iter().any(|c| c == "retriable-status-codes") {
                    conditions.push("retriable-status-codes".into());
                }
                p.retry_on = conditions.join(",");
                p.retriable_status_codes = codes.iter().filter_map(|c| c.parse().ok()).collect();
            }
            p.per_try_timeout = r.per_try_timeout.map(|d| proto_duration(d.0));
            Some(p)
        }
    };
    let rewrite = rule.rewrite.as_ref();
    let mirrors: Vec<(&Destination, Option<f64>)> = match (&rule.mirror, &rule.mirrors[..]) {
        _ if client == Client::Grpc => Vec::new(),
        (Some(m), _) => vec![(m, rule.mirror_percentage.map(|p| p.value))],
        (None, many) => many
            .iter()
            .map(|m| (&m.destination, m.percentage.map(|p| p.value)))
            .collect(),
    };
    route::Action::Route(RouteAction {
        cluster_specifier: Some(cluster_specifier),
        cluster_not_found_response_code: if rule.unknown_backend_is_500 {
            route_action::ClusterNotFoundResponseCode::InternalServerError as i32
        } else {
            0
        },
        timeout: Some(proto_duration(rule.timeout.map(|d| d.0).unwrap_or_default())),
        retry_policy,
        prefix_rewrite: rewrite.and_then(|r| r.uri.clone()).unwrap_or_default(),
        regex_rewrite: rewrite
            .and_then(|r| r.uri_regex_rewrite.as_ref())
            .map(|rr| RegexMatchAndSubstitute {
                pattern: Some(regex(&rr.r#match)),
                substitution: rr.rewrite.clone(),
            }),
        host_rewrite_specifier: rewrite
            .and_then(|r| r.authority.clone())
            .map(route_action::HostRewriteSpecifier::HostRewriteLiteral),
        request_mirror_policies: mirrors
            .into_iter()
            .map(|(d, pct)| route_action::RequestMirrorPolicy {
                cluster: destination_cluster(key, routing, ns, d),
                runtime_fraction: Some(RuntimeFractionalPercent {
                    default_value: Some(fraction(pct.unwrap_or(100.0))),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .collect(),
        hash_policy: rule
            .route
            .first()
            .map(|d| {
                hash_policy(
                    routing,
                    &Hostname::parse(&routing.fqdn(&d.destination.host, ns)).unwrap_or_else(|_| key.host.clone()),
                )
            })
            .unwrap_or_default(),
        ..Default::default()
    })
}

fn redirect_code(code: u32) -> redirect_action::RedirectResponseCode {
    use redirect_action::RedirectResponseCode as C;
    match code {
        302 => C::Found,
        303 => C::SeeOther,
        307 => C::TemporaryRedirect,
        308 => C::PermanentRedirect,
        _ => C::MovedPermanently,
    }
}

/// Session affinity from the destination's DestinationRule (consistent hash).
fn hash_policy(routing: &Routing, host: &Hostname) -> Vec<route_action::HashPolicy> {
    use route_action::hash_policy::{ConnectionProperties, Cookie, Header, PolicySpecifier, QueryParameter};
    let Some(ConsistentHash {
        http_header_name,
        http_cookie,
        use_source_ip,
        http_query_parameter_name,
        ..
    }) = routing.destination_rule(host).and_then(|(_, dr)| {
        dr.traffic_policy
            .as_ref()?
            .load_balancer
            .as_ref()?
            .consistent_hash
            .as_ref()
    })
    else {
        return Vec::new();
    };
    let specifier = if let Some(h) = http_header_name {
        PolicySpecifier::Header(Header {
            header_name: h.clone(),
            ..Default::default()
        })
    } else if let Some(c) = http_cookie {
        PolicySpecifier::Cookie(Cookie {
            name: c.name.clone(),
            path: c.path.clone().unwrap_or_default(),
            ttl: c.ttl.map(|d| proto_duration(d.0)),
            ..Default::default()
        })
    } else if *use_source_ip == Some(true) {
        PolicySpecifier::ConnectionProperties(ConnectionProperties { source_ip: true })
    } else if let Some(q) = http_query_parameter_name {
        PolicySpecifier::QueryParameter(QueryParameter { name: q.clone() })
    } else {
        return Vec::new();
    };
    vec![route_action::HashPolicy {
        policy_specifier: Some(specifier),
        ..Default::default()
    }]
}

type HeaderOps = (Vec<HeaderValueOption>, Vec<String>, Vec<HeaderValueOption>, Vec<String>);

/// Istio's header operations: `set` overwrites, `add` appends.
fn header_ops(h: Option<&Headers>) -> HeaderOps {
    let adds = |ops: Option<&HeaderOperations>| -> Vec<HeaderValueOption> {
        let Some(ops) = ops else { return Vec::new() };
        let option = |k: &String, v: &String, action: header_value_option::HeaderAppendAction| HeaderValueOption {
            header: Some(HeaderValue {
                key: k.clone(),
                value: v.clone(),
                ..Default::default()
            }),
            append_action: action as i32,
            ..Default::default()
        };
        use header_value_option::HeaderAppendAction::{AppendIfExistsOrAdd, OverwriteIfExistsOrAdd};
        ops.set
            .iter()
            .map(|(k, v)| option(k, v, OverwriteIfExistsOrAdd))
            .chain(ops.add.iter().map(|(k, v)| option(k, v, AppendIfExistsOrAdd)))
            .collect()
    };
    let removes = |ops: Option<&HeaderOperations>| ops.map(|o| o.remove.clone()).unwrap_or_default();
    let (req, resp) = (h.and_then(|h| h.request.as_ref()), h.and_then(|h| h.response.as_ref()));
    (adds(req), removes(req), adds(resp), removes(resp))
}

/// The route's fault, for the fault filter; None when it injects nothing.
fn fault(f: &networking::virtual_service::HttpFault) -> Option<Any> {
    let delay = f.delay.as_ref().and_then(|d| {
        let pct = d
            .percentage
            .map(|p| p.value)
            .or(d.percent.map(|p| p as f64))
            .unwrap_or(100.0);
        Some(FaultDelay {
            fault_delay_secifier: Some(fault_delay::FaultDelaySecifier::FixedDelay(proto_duration(
                d.fixed_delay?.0,
            ))),
            percentage: Some(fraction(pct)),
        })
    });
    let abort = f.abort.as_ref().and_then(|a| {
        let status = u32::try_from(a.http_status?).ok()?;
        Some(FaultAbort {
            error_type: Some(fault_abort::ErrorType::HttpStatus(status)),
            percentage: Some(fraction(a.percentage.map(|p| p.value).unwrap_or(100.0))),
            ..Default::default()
        })
    });
    if delay.is_none() && abort.is_none() {
        return None;
    }
    Some(any(
        FAULT_TYPE,
        &HttpFault {
            delay,
            abort,
            ..Default::default()
        },
    ))
}

/// A percentage as Envoy's fraction, per million (Istio keeps four decimals).
fn fraction(percent: f64) -> FractionalPercent {
    FractionalPercent {
        numerator: (percent.clamp(0.0, 100.0) * 10_000.0).round() as u32,
        denominator: fractional_percent::DenominatorType::Million as i32,
    }
}

/// A duration as protobuf's.
pub(crate) fn proto_duration(d: std::time::Duration) -> envoy_types::pb::google::protobuf::Duration {
    envoy_types::pb::google::protobuf::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::{ClusterModel, Protocol, Traffic};
    use crate::objects::ClusterObjects;
    use mesh_vocab::ClusterId;
    use prost::Message;
    use std::path::Path;
    use std::sync::Arc;

    fn key(host: &str) -> ServiceKey {
        ServiceKey {
            host: Hostname::parse(&format!("{host}.default.svc.cluster.local")).unwrap(),
            port: 9080,
        }
    }

    /// The routing of one cluster holding `yaml`, where reviews and ratings speak HTTP.
    pub(crate) fn routing(yaml: &str) -> Routing {
        let mut o = ClusterObjects::default();
        o.add_yaml(Path::new("istio.yaml"), yaml).unwrap();
        assert!(o.refused.is_empty(), "{:?}", o.refused);
        let m = ClusterModel {
            exposure: Default::default(),
            cluster: ClusterId::new("c1"),
            instances: vec![],
            named: vec![],
            vips: vec![],
            gateways: vec![],
            security: Default::default(),
            traffic: Arc::new(Traffic {
                sni_only: Default::default(),
                host_only: Default::default(),
                protocols: [(key("reviews"), Protocol::Http), (key("ratings"), Protocol::Http)].into(),
                virtual_services: o.virtual_services,
                destination_rules: o.destination_rules,
                http_routes: o.http_routes,
                reference_grants: o.reference_grants,
            }),
        };
        Routing::merge([&m], "cluster.local")
    }

    const NOBODY: Requester<'static> = Requester {
        namespace: None,
        labels: &BTreeMap::new(),
    };

    fn routes(rc: &RouteConfiguration) -> &[Route] {
        let [vh] = &rc.virtual_hosts[..] else {
            panic!("one virtual host")
        };
        assert_eq!(vh.domains, ["*"]);
        &vh.routes
    }

    fn route_action(r: &Route) -> &RouteAction {
        let Some(route::Action::Route(a)) = &r.action else {
            panic!("a route action")
        };
        a
    }

    #[test]
    fn without_a_virtual_service_everything_goes_to_the_service_with_istios_retries() {
        let rc = route_config(&key("reviews"), &routing(""), NOBODY, Client::Envoy);
        assert_eq!(rc.name, "reviews.default.svc.cluster.local:9080");
        let [r] = routes(&rc) else { panic!("one route") };
        let a = route_action(r);
        assert_eq!(
            a.cluster_specifier,
            Some(route_action::ClusterSpecifier::Cluster(
                "outbound|9080||reviews.default.svc.cluster.local".into()
            ))
        );
        let p = a.retry_policy.as_ref().unwrap();
        assert_eq!(
            (p.retry_on.as_str(), p.num_retries),
            (DEFAULT_RETRY_ON, Some(UInt32Value { value: 2 }))
        );
        assert_eq!(p.retriable_status_codes, [503]);
        assert_eq!(p.retry_host_predicate[0].name, PREVIOUS_HOSTS);
    }

    /// An Istio sample (tests read Istio's own files, as the conformance test does).
    fn sample(name: &str) -> String {
        std::fs::read_to_string(format!("/work/shared/conformance/istio-examples/samples/{name}")).unwrap()
    }

    #[test]
    fn a_weighted_split_across_subsets_becomes_weighted_clusters() {
        let yaml = sample("bookinfo-virtual-service-reviews-80-20.yaml");
        let rc = route_config(&key("reviews"), &routing(&yaml), NOBODY, Client::Envoy);
        let [r] = routes(&rc) else { panic!("one route") };
        let Some(route_action::ClusterSpecifier::WeightedClusters(w)) = &route_action(r).cluster_specifier else {
            panic!("weighted clusters")
        };
        let split: Vec<(&str, u32)> = w
            .clusters
            .iter()
            .map(|c| (c.name.as_str(), c.weight.unwrap().value))
            .collect();
        assert_eq!(
            split,
            [
                ("outbound|9080|v1|reviews.default.svc.cluster.local", 80),
                ("outbound|9080|v2|reviews.default.svc.cluster.local", 20)
            ]
        );
    }

    #[test]
    fn header_matches_and_faults_carry_over_and_unmatched_requests_fall_to_the_next_rule() {
        let yaml = sample("bookinfo-virtual-service-ratings-test-abort.yaml");
        let rc = route_config(&key("ratings"), &routing(&yaml), NOBODY, Client::Envoy);
        let [jason, rest] = routes(&rc) else {
            panic!("two routes")
        };
        let m = jason.r#match.as_ref().unwrap();
        assert_eq!(m.headers[0].name, "end-user");
        assert_eq!(
            m.headers[0].header_match_specifier,
            Some(header_matcher::HeaderMatchSpecifier::StringMatch(StringMatcher {
                match_pattern: Some(string_matcher::MatchPattern::Exact("jason".into())),
                ..Default::default()
            }))
        );
        let fault = HttpFault::decode(jason.typed_per_filter_config[FAULT_FILTER].value.as_slice()).unwrap();
        let abort = fault.abort.unwrap();
        assert_eq!(abort.error_type, Some(fault_abort::ErrorType::HttpStatus(500)));
        assert_eq!(abort.percentage.unwrap().numerator, 1_000_000, "100% per million");
        assert!(rest.typed_per_filter_config.is_empty());
        assert_eq!(
            rest.r#match.as_ref().unwrap().path_specifier,
            Some(route_match::PathSpecifier::Prefix("/".into()))
        );
    }

    #[test]
    fn rules_for_other_sources_and_ports_are_left_out_per_proxy() {
        let r = routing(
            r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews]
  http:
  - match: [{sourceLabels: {app: productpage}}]
    route: [{destination: {host: reviews, subset: v2}}]
  - match: [{sourceNamespace: test}]
    route: [{destination: {host: reviews, subset: v3}}]
  - match: [{port: 8080}]
    redirect: {uri: /elsewhere}
  - route: [{destination: {host: reviews, subset: v1}}]
    retries: {attempts: 0}
    timeout: 3s
"#,
        );
        assert!(r.depends_on_source());
        let clusters = |who: Requester<'_>| -> Vec<String> {
            routes(&route_config(&key("reviews"), &r, who, Client::Envoy))
                .iter()
                .map(|r| match &route_action(r).cluster_specifier {
                    Some(route_action::ClusterSpecifier::Cluster(c)) => c.clone(),
                    other => panic!("{other:?}"),
                })
                .collect()
        };
        let productpage: BTreeMap<String, String> = [("app".to_owned(), "productpage".to_owned())].into();
        assert_eq!(
            clusters(Requester {
                namespace: Some("default"),
                labels: &productpage
            }),
            [
                "outbound|9080|v2|reviews.default.svc.cluster.local",
                "outbound|9080|v1|reviews.default.svc.cluster.local"
            ]
        );
        assert_eq!(
            clusters(Requester {
                namespace: Some("test"),
                labels: &BTreeMap::new()
            }),
            [
                "outbound|9080|v3|reviews.default.svc.cluster.local",
                "outbound|9080|v1|reviews.default.svc.cluster.local"
            ],
            "the 8080 redirect is not on this port"
        );
        let rc = route_config(&key("reviews"), &r, NOBODY, Client::Envoy);
        let last = route_action(routes(&rc).last().unwrap());
        assert_eq!(last.retry_policy, None, "attempts: 0 is no retry");
        assert_eq!(last.timeout.unwrap().seconds, 3);
    }

    #[test]
    fn rewrites_redirects_mirrors_and_headers() {
        let r = routing(
            r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - match: [{uri: {prefix: /old}, ignoreUriCase: true, method: {exact: GET}, withoutHeaders: {x-debug: {}}}]
    redirect: {uri: /new, authority: example.com, redirectCode: 308}
  - match: [{uri: {regex: "/v[0-9]+/.*"}, queryParams: {q: {exact: "1"}}}]
    rewrite: {uriRegexRewrite: {match: "^/v[0-9]+/", rewrite: "/"}, authority: reviews.internal}
    headers: {request: {set: {x-a: "1"}, add: {x-b: "2"}, remove: [x-c]}}
    mirror: {host: ratings}
    mirrorPercentage: {value: 12.5}
    retries: {attempts: 4, perTryTimeout: 2s, retryOn: "5xx,429"}
    route: [{destination: {host: reviews}}]
"#,
        );
        let rc = route_config(&key("reviews"), &r, NOBODY, Client::Envoy);
        let [redirect, rewrite] = routes(&rc) else {
            panic!("two routes")
        };
        let m = redirect.r#match.as_ref().unwrap();
        assert_eq!(m.case_sensitive, Some(BoolValue { value: false }));
        let names: Vec<(&str, bool)> = m.headers.iter().map(|h| (h.name.as_str(), h.invert_match)).collect();
        assert_eq!(names, [(":method", false), ("x-debug", true)]);
        let Some(route::Action::Redirect(ra)) = &redirect.action else {
            panic!("a redirect")
        };
        assert_eq!(ra.host_redirect, "example.com");
        assert_eq!(
            ra.response_code,
            redirect_action::RedirectResponseCode::PermanentRedirect as i32
        );
        let m = rewrite.r#match.as_ref().unwrap();
        assert!(matches!(
            m.path_specifier,
            Some(route_match::PathSpecifier::SafeRegex(_))
        ));
        assert_eq!(m.query_parameters[0].name, "q");
        let a = route_action(rewrite);
        assert_eq!(a.regex_rewrite.as_ref().unwrap().substitution, "/");
        assert_eq!(
            a.host_rewrite_specifier,
            Some(route_action::HostRewriteSpecifier::HostRewriteLiteral(
                "reviews.internal".into()
            ))
        );
        let mirror = &a.request_mirror_policies[0];
        assert_eq!(mirror.cluster, "outbound|9080||ratings.default.svc.cluster.local");
        assert_eq!(
            mirror
                .runtime_fraction
                .as_ref()
                .unwrap()
                .default_value
                .unwrap()
                .numerator,
            125_000
        );
        let p = a.retry_policy.as_ref().unwrap();
        assert_eq!(p.retry_on, "5xx,retriable-status-codes");
        assert_eq!(p.retriable_status_codes, [429]);
        assert_eq!(p.num_retries, Some(UInt32Value { value: 4 }));
        assert_eq!(p.per_try_timeout.unwrap().seconds, 2);
        let actions: Vec<(String, i32)> = rewrite
            .request_headers_to_add
            .iter()
            .map(|h| (h.header.as_ref().unwrap().key.clone(), h.append_action))
            .collect();
        use header_value_option::HeaderAppendAction::{AppendIfExistsOrAdd, OverwriteIfExistsOrAdd};
        assert_eq!(
            actions,
            [
                ("x-a".to_owned(), OverwriteIfExistsOrAdd as i32),
                ("x-b".to_owned(), AppendIfExistsOrAdd as i32)
            ]
        );
        assert_eq!(rewrite.request_headers_to_remove, ["x-c"]);
        let grpc = route_config(&key("reviews"), &r, NOBODY, Client::Grpc);
        let [only] = routes(&grpc) else {
            panic!("gRPC only forwards")
        };
        assert!(route_action(only).request_mirror_policies.is_empty());
    }

    #[test]
    fn a_single_destinations_headers_go_on_the_route() {
        let r = routing(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r}\nspec: {hosts: [reviews], http: [{route: [{destination: {host: reviews}, headers: {response: {remove: [x-internal]}}}]}]}\n",
        );
        let rc = route_config(&key("reviews"), &r, NOBODY, Client::Envoy);
        assert_eq!(routes(&rc)[0].response_headers_to_remove, ["x-internal"]);
    }

    #[test]
    fn a_consistent_hash_rule_adds_the_routes_hash_policy() {
        let r = routing(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: r}\nspec: {host: reviews, trafficPolicy: {loadBalancer: {consistentHash: {httpCookie: {name: user, ttl: 10s}}}}}\n",
        );
        let rc = route_config(&key("reviews"), &r, NOBODY, Client::Envoy);
        let a = route_action(&routes(&rc)[0]);
        let Some(route_action::hash_policy::PolicySpecifier::Cookie(c)) = &a.hash_policy[0].policy_specifier else {
            panic!("a cookie hash")
        };
        assert_eq!((c.name.as_str(), c.ttl.unwrap().seconds), ("user", 10));
    }

    #[test]
    fn an_httproute_on_the_service_routes_it_instead_of_its_virtual_service() {
        let r = routing(
            r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec: {hosts: [reviews], http: [{route: [{destination: {host: reviews, subset: v9}}]}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews, port: 9080}]
  rules:
  - matches: [{headers: [{name: end-user, value: jason}]}]
    backendRefs: [{name: ratings, port: 9080}]
  - backendRefs: [{name: reviews, port: 9080, weight: 90}, {name: gone, port: 9080, weight: 10}]
  - matches: [{path: {value: /old}}]
    filters: [{type: RequestRedirect, requestRedirect: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}, statusCode: 301}}]
"#,
        );
        let rc = route_config(&key("reviews"), &r, NOBODY, Client::Envoy);
        let names: Vec<&str> = routes(&rc).iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "default.reviews.2.0",
                "default.reviews.2.0",
                "default.reviews.0.0",
                "default.reviews.1.0"
            ],
            "the longer prefix (as an exact and a prefix match), then the header match; the VirtualService is not used"
        );
        let Some(route::Action::Redirect(ra)) = &routes(&rc)[1].action else {
            panic!("a redirect")
        };
        let Some(redirect_action::PathRewriteSpecifier::RegexRewrite(rr)) = &ra.path_rewrite_specifier else {
            panic!("a regex rewrite")
        };
        assert_eq!(rr.substitution, "/new\\1");
        assert_eq!(routes(&rc)[2].r#match.as_ref().unwrap().headers[0].name, "end-user");
        let split = route_action(&routes(&rc)[3]);
        assert_eq!(
            split.cluster_not_found_response_code,
            route_action::ClusterNotFoundResponseCode::InternalServerError as i32,
            "a missing backend's share is a 500"
        );
        let Some(route_action::ClusterSpecifier::WeightedClusters(w)) = &split.cluster_specifier else {
            panic!("weighted")
        };
        let weights: Vec<(&str, u32)> = w
            .clusters
            .iter()
            .map(|c| (c.name.as_str(), c.weight.unwrap().value))
            .collect();
        assert_eq!(
            weights,
            [
                ("outbound|9080||reviews.default.svc.cluster.local", 90),
                ("outbound|9080||gone.default.backend-not-found.invalid", 10)
            ]
        );
    }
}
