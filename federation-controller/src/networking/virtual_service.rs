//! Istio's `VirtualService`: the routing rules for requests to a set of hosts.
//! HTTP routes are read in full (they become Envoy routes, [`crate::xds::routes`]);
//! TCP and TLS routes only as far as their matches and destinations.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};

use super::{Duration, ValidationError, percent_in_range, port_in_range};

/// A `VirtualService` object.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VirtualService {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: VirtualServiceSpec,
}

/// What a VirtualService says.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct VirtualServiceSpec {
    /// The hosts the rules apply to (short names are Services of the object's namespace).
    pub hosts: Vec<String>,
    /// Gateways the rules apply to; empty (or `mesh`) means the sidecars.
    pub gateways: Vec<String>,
    pub http: Vec<HttpRoute>,
    pub tcp: Vec<L4Route>,
    pub tls: Vec<L4Route>,
    pub export_to: Vec<String>,
}

/// One HTTP rule: the requests it matches and what to do with them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct HttpRoute {
    pub name: Option<String>,
    /// Any of these matches (OR); none means every request.
    pub r#match: Vec<HttpMatchRequest>,
    pub route: Vec<HttpRouteDestination>,
    pub redirect: Option<HttpRedirect>,
    pub direct_response: Option<HttpDirectResponse>,
    pub rewrite: Option<HttpRewrite>,
    pub timeout: Option<Duration>,
    pub retries: Option<HttpRetry>,
    pub fault: Option<HttpFault>,
    pub mirror: Option<Destination>,
    pub mirror_percentage: Option<Percent>,
    pub mirrors: Vec<HttpMirrorPolicy>,
    pub headers: Option<Headers>,
    /// Set only by the Gateway API translation ([`crate::routing::gamma`]), on every
    /// rule as istiod does: a destination that names no usable backend is answered
    /// `500`, as the Gateway API says, not Envoy's default `503`. No VirtualService
    /// field sets it.
    #[serde(skip)]
    pub unknown_backend_is_500: bool,
}

/// The conditions of one match (AND).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct HttpMatchRequest {
    pub name: Option<String>,
    pub uri: Option<StringMatch>,
    pub scheme: Option<StringMatch>,
    pub method: Option<StringMatch>,
    pub authority: Option<StringMatch>,
    /// Header name → match; an empty match means "present".
    pub headers: BTreeMap<String, StringMatch>,
    pub without_headers: BTreeMap<String, StringMatch>,
    pub query_params: BTreeMap<String, StringMatch>,
    /// The service port the rule applies to.
    pub port: Option<u32>,
    /// Labels the requesting workload must carry.
    pub source_labels: BTreeMap<String, String>,
    /// The namespace the requesting workload must be in.
    pub source_namespace: Option<String>,
    pub ignore_uri_case: bool,
    pub gateways: Vec<String>,
}

/// Istio's `StringMatch`: exactly one of exact, prefix or regex (RE2, whole string);
/// none set means "present" where presence is what is matched (headers, query).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(default)]
pub struct StringMatch {
    pub exact: Option<String>,
    pub prefix: Option<String>,
    pub regex: Option<String>,
}

/// What a [`StringMatch`] asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Matcher<'a> {
    Exact(&'a str),
    Prefix(&'a str),
    Regex(&'a str),
    Present,
}

impl StringMatch {
    /// The one matcher it holds (valid objects hold at most one).
    pub fn matcher(&self) -> Matcher<'_> {
        match (&self.exact, &self.prefix, &self.regex) {
            (Some(e), _, _) => Matcher::Exact(e),
            (_, Some(p), _) => Matcher::Prefix(p),
            (_, _, Some(r)) => Matcher::Regex(r),
            _ => Matcher::Present,
        }
    }

    fn validate(&self, field: &str) -> Result<(), ValidationError> {
        let set = [&self.exact, &self.prefix, &self.regex]
            .iter()
            .filter(|v| v.is_some())
            .count();
        if set > 1 {
            return Err(ValidationError::new(
                field,
                "only one of exact, prefix or regex may be set",
            ));
        }
        if let Some(r) = &self.regex {
            regex::Regex::new(r)
                .map_err(|e| ValidationError::new(format!("{field}.regex"), format!("invalid regex: {e}")))?;
        }
        Ok(())
    }
}

/// A weighted destination of a route.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct HttpRouteDestination {
    pub destination: Destination,
    pub weight: Option<i64>,
    pub headers: Option<Headers>,
}

/// A service (and subset and port) traffic goes to.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Destination {
    pub host: String,
    pub subset: Option<String>,
    pub port: Option<PortSelector>,
}

/// `port: {number: 9080}`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(default)]
pub struct PortSelector {
    pub number: u32,
}

/// Header manipulation of requests and responses.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(default)]
pub struct Headers {
    pub request: Option<HeaderOperations>,
    pub response: Option<HeaderOperations>,
}

/// `set` overwrites, `add` appends, `remove` removes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(default)]
pub struct HeaderOperations {
    pub set: BTreeMap<String, String>,
    pub add: BTreeMap<String, String>,
    pub remove: Vec<String>,
}

/// A redirect answered by the proxy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct HttpRedirect {
    pub uri: Option<String>,
    pub authority: Option<String>,
    pub port: Option<u32>,
    pub scheme: Option<String>,
    pub redirect_code: Option<u32>,
    /// Set only by the Gateway API translation (`ReplacePrefixMatch`): the path
    /// redirected to is the request's, rewritten so. No VirtualService field sets it.
    #[serde(skip)]
    pub uri_regex_rewrite: Option<RegexRewrite>,
}

/// A response answered by the proxy itself.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(default)]
pub struct HttpDirectResponse {
    pub status: u32,
    pub body: Option<HttpBody>,
}

/// The body of a direct response.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(default)]
pub struct HttpBody {
    pub string: Option<String>,
    /// Base64, as protobuf's JSON writes bytes.
    pub bytes: Option<String>,
}

/// Rewrites of the forwarded request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct HttpRewrite {
    /// Replaces the matched prefix (or the whole path for an exact match).
    pub uri: Option<String>,
    pub uri_regex_rewrite: Option<RegexRewrite>,
    pub authority: Option<String>,
}

/// `match` is replaced by `rewrite` (RE2, `\1` groups).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(default)]
pub struct RegexRewrite {
    pub r#match: String,
    pub rewrite: String,
}

/// The retry policy of a route.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct HttpRetry {
    pub attempts: i64,
    pub per_try_timeout: Option<Duration>,
    /// Envoy's `retry_on` conditions, comma separated; numbers are status codes.
    pub retry_on: Option<String>,
    pub retry_remote_localities: Option<bool>,
}

/// Faults injected into matching requests.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct HttpFault {
    pub delay: Option<FaultDelay>,
    pub abort: Option<FaultAbort>,
}

/// A fixed delay before forwarding.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct FaultDelay {
    pub fixed_delay: Option<Duration>,
    pub percentage: Option<Percent>,
    /// Deprecated integer percentage.
    pub percent: Option<i64>,
}

/// An error answered instead of forwarding.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct FaultAbort {
    pub http_status: Option<i64>,
    pub grpc_status: Option<String>,
    pub percentage: Option<Percent>,
}

/// `percentage: {value: 12.5}`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Percent {
    pub value: f64,
}

/// One mirror of a route.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct HttpMirrorPolicy {
    pub destination: Destination,
    pub percentage: Option<Percent>,
}

/// A TCP or TLS route, read as far as its matches' ports and its destinations.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct L4Route {
    pub r#match: Vec<L4Match>,
    pub route: Vec<HttpRouteDestination>,
}

/// The part of a TCP/TLS match this controller reads.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct L4Match {
    pub port: Option<u32>,
    /// TLS only: the ClientHello's server names (`*.example.com` wildcards allowed).
    pub sni_hosts: Vec<String>,
    /// Destination addresses, `a.b.c.d` or `a.b.c.d/len`.
    pub destination_subnets: Vec<String>,
    pub source_labels: BTreeMap<String, String>,
    pub source_namespace: Option<String>,
}

impl VirtualService {
    /// Istio's rules for a VirtualService (webhook and CEL), those this controller relies on.
    pub fn validate(&self) -> Result<(), ValidationError> {
        let spec = &self.spec;
        if spec.hosts.is_empty() {
            return Err(ValidationError::new(
                "spec.hosts",
                "virtual service must have at least one host",
            ));
        }
        for (i, h) in spec.hosts.iter().enumerate() {
            if h.is_empty() {
                return Err(ValidationError::new(
                    format!("spec.hosts[{i}]"),
                    "domain name \"\" invalid (empty)",
                ));
            }
        }
        if spec.http.is_empty() && spec.tcp.is_empty() && spec.tls.is_empty() {
            return Err(ValidationError::new(
                "spec",
                "http, tcp or tls must be provided in virtual service",
            ));
        }
        for (i, r) in spec.http.iter().enumerate() {
            r.validate(&format!("spec.http[{i}]"))?;
        }
        for (kind, routes) in [("tcp", &spec.tcp), ("tls", &spec.tls)] {
            for (i, r) in routes.iter().enumerate() {
                let f = format!("spec.{kind}[{i}]");
                if r.route.is_empty() {
                    return Err(ValidationError::new(format!("{f}.route"), "route is required"));
                }
                if kind == "tls" && r.r#match.is_empty() {
                    return Err(ValidationError::new(
                        format!("{f}.match"),
                        "TLS route must have at least one match condition",
                    ));
                }
                for (j, m) in r.r#match.iter().enumerate() {
                    let mf = format!("{f}.match[{j}]");
                    if let Some(p) = m.port {
                        port_in_range(&format!("{mf}.port"), i64::from(p))?;
                    }
                    if kind == "tls" && m.sni_hosts.is_empty() {
                        return Err(ValidationError::new(
                            format!("{mf}.sniHosts"),
                            "TLS match must have at least one SNI host",
                        ));
                    }
                    for (k, subnet) in m.destination_subnets.iter().enumerate() {
                        if crate::networking::virtual_service::subnet(subnet).is_none() {
                            return Err(ValidationError::new(
                                format!("{mf}.destinationSubnets[{k}]"),
                                format!("{subnet:?} is not a valid IP address or CIDR"),
                            ));
                        }
                    }
                }
                validate_destinations(&f, &r.route)?;
            }
        }
        Ok(())
    }
}

impl HttpRoute {
    fn validate(&self, f: &str) -> Result<(), ValidationError> {
        let actions = [
            !self.route.is_empty(),
            self.redirect.is_some(),
            self.direct_response.is_some(),
        ];
        match actions.iter().filter(|a| **a).count() {
            0 => {
                return Err(ValidationError::new(
                    f,
                    "HTTP route, redirect or direct response is required",
                ));
            }
            1 => {}
            _ => {
                return Err(ValidationError::new(
                    f,
                    "only one of route, redirect or direct response may be set",
                ));
            }
        }
        for (j, m) in self.r#match.iter().enumerate() {
            let mf = format!("{f}.match[{j}]");
            for (name, sm) in [
                ("uri", &m.uri),
                ("scheme", &m.scheme),
                ("method", &m.method),
                ("authority", &m.authority),
            ] {
                if let Some(sm) = sm {
                    sm.validate(&format!("{mf}.{name}"))?;
                }
            }
            for (name, map) in [
                ("headers", &m.headers),
                ("withoutHeaders", &m.without_headers),
                ("queryParams", &m.query_params),
            ] {
                for (k, sm) in map {
                    if k.is_empty() {
                        return Err(ValidationError::new(
                            format!("{mf}.{name}"),
                            "header name cannot be empty",
                        ));
                    }
                    sm.validate(&format!("{mf}.{name}.{k}"))?;
                }
            }
            if let Some(p) = m.port {
                port_in_range(&format!("{mf}.port"), i64::from(p))?;
            }
        }
        validate_destinations(f, &self.route)?;
        if let Some(code) = self.redirect.as_ref().and_then(|r| r.redirect_code)
            && ![301, 302, 303, 307, 308].contains(&code)
        {
            return Err(ValidationError::new(
                format!("{f}.redirect.redirectCode"),
                format!("{code} is not a valid redirect code, must be 301, 302, 303, 307, or 308"),
            ));
        }
        if let Some(d) = &self.direct_response
            && !(200..=599).contains(&d.status)
        {
            return Err(ValidationError::new(
                format!("{f}.directResponse.status"),
                format!("status {} must be in the range 200-599", d.status),
            ));
        }
        if let Some(rw) = &self.rewrite {
            if rw.uri.is_some() && rw.uri_regex_rewrite.is_some() {
                return Err(ValidationError::new(
                    format!("{f}.rewrite"),
                    "rewrite may only contain one of uri or uriRegexRewrite",
                ));
            }
            if let Some(rr) = &rw.uri_regex_rewrite {
                regex::Regex::new(&rr.r#match).map_err(|e| {
                    ValidationError::new(
                        format!("{f}.rewrite.uriRegexRewrite.match"),
                        format!("invalid regex: {e}"),
                    )
                })?;
            }
        }
        if let Some(r) = &self.retries {
            if r.attempts < 0 {
                return Err(ValidationError::new(
                    format!("{f}.retries.attempts"),
                    "attempts cannot be negative",
                ));
            }
            if let Some(t) = r.per_try_timeout {
                at_least_1ms(&format!("{f}.retries.perTryTimeout"), t)?;
            }
        }
        if let Some(fault) = &self.fault {
            if fault.delay.is_none() && fault.abort.is_none() {
                return Err(ValidationError::new(
                    format!("{f}.fault"),
                    "fault must have at least delay or abort",
                ));
            }
            if let Some(d) = &fault.delay {
                if d.fixed_delay.is_none() {
                    return Err(ValidationError::new(
                        format!("{f}.fault.delay.fixedDelay"),
                        "Required value",
                    ));
                }
                if let Some(p) = d.percentage {
                    percent_in_range(&format!("{f}.fault.delay.percentage.value"), p.value)?;
                }
            }
            if let Some(a) = &fault.abort {
                match a.http_status {
                    Some(s) if !(200..=599).contains(&s) => {
                        return Err(ValidationError::new(
                            format!("{f}.fault.abort.httpStatus"),
                            "abort http status must be in range 200-599",
                        ));
                    }
                    None if a.grpc_status.is_none() => {
                        return Err(ValidationError::new(
                            format!("{f}.fault.abort"),
                            "abort must have httpStatus or grpcStatus",
                        ));
                    }
                    _ => {}
                }
                if let Some(p) = a.percentage {
                    percent_in_range(&format!("{f}.fault.abort.percentage.value"), p.value)?;
                }
            }
        }
        if let Some(p) = self.mirror_percentage {
            percent_in_range(&format!("{f}.mirrorPercentage.value"), p.value)?;
        }
        if self.mirror.is_some() && !self.mirrors.is_empty() {
            return Err(ValidationError::new(
                format!("{f}.mirrors"),
                "specify either mirror or mirrors",
            ));
        }
        for (j, m) in self.mirrors.iter().enumerate() {
            if m.destination.host.is_empty() {
                return Err(ValidationError::new(
                    format!("{f}.mirrors[{j}].destination.host"),
                    "Required value",
                ));
            }
            if let Some(p) = m.percentage {
                percent_in_range(&format!("{f}.mirrors[{j}].percentage.value"), p.value)?;
            }
        }
        Ok(())
    }
}

/// Destinations need a host; weights are not negative, and several destinations
/// cannot all weigh nothing.
fn validate_destinations(f: &str, route: &[HttpRouteDestination]) -> Result<(), ValidationError> {
    let mut total = 0;
    for (j, d) in route.iter().enumerate() {
        if d.destination.host.is_empty() {
            return Err(ValidationError::new(
                format!("{f}.route[{j}].destination.host"),
                "Required value",
            ));
        }
        if let Some(p) = d.destination.port {
            port_in_range(&format!("{f}.route[{j}].destination.port.number"), i64::from(p.number))?;
        }
        let w = d.weight.unwrap_or(0);
        if w < 0 {
            return Err(ValidationError::new(
                format!("{f}.route[{j}].weight"),
                format!("weight {w} < 0"),
            ));
        }
        total += w;
    }
    if route.len() > 1 && total == 0 {
        return Err(ValidationError::new(
            format!("{f}.route"),
            "total destination weight = 0",
        ));
    }
    Ok(())
}

/// Istio's CEL rule on durations: "must be a valid duration greater than 1ms".
pub(crate) fn at_least_1ms(field: &str, d: Duration) -> Result<(), ValidationError> {
    if d.0 >= std::time::Duration::from_millis(1) {
        Ok(())
    } else {
        Err(ValidationError::new(field, "must be a valid duration greater than 1ms"))
    }
}

/// An address or CIDR (`10.0.0.1`, `10.0.0.0/8`) as (address, prefix length).
pub fn subnet(s: &str) -> Option<(std::net::IpAddr, u32)> {
    let (ip, len) = match s.split_once('/') {
        Some((ip, len)) => (ip.parse::<std::net::IpAddr>().ok()?, Some(len.parse::<u32>().ok()?)),
        None => (s.parse().ok()?, None),
    };
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let len = len.unwrap_or(max);
    (len <= max).then_some((ip, len))
}
