//! Envoy's `RetryPolicy`: which failed attempts are tried again, how often, how long each
//! attempt may take and how long to wait between them.
//!
//! One rule of ours on top (docs/l7-xds.md): a request that is not idempotent (RFC 9110
//! §9.2.2) is never sent twice once any of it went out, unless the policy's
//! `retriable_request_headers` name its method; a failure before anything was sent
//! (connect failure, refused stream) may always be retried.

use std::time::Duration;

use envoy_types::pb::envoy::config::route::v3::RetryPolicy as EnvoyRetryPolicy;
use hyper::http::request::Parts;
use hyper::{HeaderMap, Method, StatusCode};
use rand::Rng;

use super::Invalid;
use super::matcher::HeaderMatch;

/// Envoy's default backoff base.
const BASE_INTERVAL: Duration = Duration::from_millis(25);

/// The `retry_on` conditions we honour.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct RetryOn {
    five_xx: bool,
    gateway_error: bool,
    connect_failure: bool,
    refused_stream: bool,
    retriable_4xx: bool,
    reset: bool,
    retriable_status_codes: bool,
    grpc_cancelled: bool,
    grpc_deadline_exceeded: bool,
    grpc_internal: bool,
    grpc_resource_exhausted: bool,
    grpc_unavailable: bool,
}

impl RetryOn {
    /// Adds the conditions of a `retry_on` list; an unknown one is an error unless
    /// `lenient` (a request's own header, which Envoy reads leniently).
    fn add(&mut self, list: &str, lenient: bool) -> Result<(), Invalid> {
        for cond in list.split(',').map(str::trim).filter(|c| !c.is_empty()) {
            let flag = match cond {
                "5xx" => &mut self.five_xx,
                "gateway-error" => &mut self.gateway_error,
                "connect-failure" => &mut self.connect_failure,
                "refused-stream" => &mut self.refused_stream,
                "retriable-4xx" => &mut self.retriable_4xx,
                "reset" => &mut self.reset,
                "retriable-status-codes" => &mut self.retriable_status_codes,
                "cancelled" => &mut self.grpc_cancelled,
                "deadline-exceeded" => &mut self.grpc_deadline_exceeded,
                "internal" => &mut self.grpc_internal,
                "resource-exhausted" => &mut self.grpc_resource_exhausted,
                "unavailable" => &mut self.grpc_unavailable,
                _ if lenient => continue,
                other => return Err(Invalid(format!("retry policy: unknown retry_on condition {other:?}"))),
            };
            *flag = true;
        }
        Ok(())
    }
}

// Envoy's request headers by which a (trusted) application adjusts the retries of its own
// request; they are for this hop and are not sent on.
/// Retry conditions added to the route's.
pub const RETRY_ON_HEADER: &str = "x-envoy-retry-on";
/// The number of retries.
pub const MAX_RETRIES_HEADER: &str = "x-envoy-max-retries";
/// Each attempt's timeout, in milliseconds.
pub const PER_TRY_TIMEOUT_HEADER: &str = "x-envoy-upstream-rq-per-try-timeout-ms";

/// How one attempt ended.
#[derive(Debug, Clone, Copy)]
pub enum Outcome<'a> {
    /// No connection could be made: nothing was sent.
    ConnectFailure,
    /// The upstream refused the stream before processing it: nothing was acted on.
    RefusedStream,
    /// The request went out and the stream or connection ended before response headers.
    Reset,
    /// The attempt outlived `per_try_timeout`.
    PerTryTimeout,
    /// Response headers arrived.
    Response(StatusCode, &'a HeaderMap),
}

impl Outcome<'_> {
    /// Whether the upstream may have acted on the request.
    fn was_sent(&self) -> bool {
        !matches!(self, Outcome::ConnectFailure | Outcome::RefusedStream)
    }
}

/// A compiled retry policy.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    on: RetryOn,
    /// Retries after the first attempt.
    pub num_retries: u32,
    /// Bound on each attempt, within the route's timeout.
    pub per_try_timeout: Option<Duration>,
    retriable_status_codes: Vec<u16>,
    /// `envoy.retry_host_predicates.previous_hosts`: a retry goes to another endpoint
    /// while there is one.
    pub previous_hosts: bool,
    retriable_request_headers: Vec<HeaderMatch>,
    base_interval: Duration,
    max_interval: Duration,
}

fn duration(d: Option<&envoy_types::pb::google::protobuf::Duration>, what: &str) -> Result<Option<Duration>, Invalid> {
    d.map(|d| super::duration(d, &format!("retry policy {what}")))
        .transpose()
}

impl RetryPolicy {
    /// Compiles a route's (or virtual host's) retry policy; unknown conditions are refused
    /// rather than silently never retried.
    pub fn compile(p: &EnvoyRetryPolicy) -> Result<Self, Invalid> {
        let mut on = RetryOn::default();
        on.add(&p.retry_on, false)?;
        let retriable_status_codes = p
            .retriable_status_codes
            .iter()
            .map(|&c| u16::try_from(c).map_err(|_| Invalid(format!("retry policy: status {c}"))))
            .collect::<Result<_, _>>()?;
        let (base_interval, max_interval) = match &p.retry_back_off {
            Some(b) => {
                let base = duration(b.base_interval.as_ref(), "base_interval")?.unwrap_or(BASE_INTERVAL);
                let base = base.max(Duration::from_millis(1));
                (
                    base,
                    duration(b.max_interval.as_ref(), "max_interval")?.unwrap_or(base * 10),
                )
            }
            None => (BASE_INTERVAL, BASE_INTERVAL * 10),
        };
        Ok(Self {
            on,
            num_retries: p.num_retries.map_or(1, |n| n.value),
            per_try_timeout: duration(p.per_try_timeout.as_ref(), "per_try_timeout")?.filter(|d| !d.is_zero()),
            retriable_status_codes,
            previous_hosts: p
                .retry_host_predicate
                .iter()
                .any(|h| h.name == "envoy.retry_host_predicates.previous_hosts"),
            retriable_request_headers: p
                .retriable_request_headers
                .iter()
                .map(HeaderMatch::compile)
                .collect::<Result<_, _>>()?,
            base_interval,
            max_interval,
        })
    }

    /// The route's policy as the request's own headers adjust it, as Envoy does:
    /// `x-envoy-retry-on` adds conditions (and makes a policy of one retry where the route
    /// had none), `x-envoy-max-retries` sets the number of retries of a policy, and
    /// `x-envoy-upstream-rq-per-try-timeout-ms` its per-try timeout.
    pub fn for_request(route: Option<&RetryPolicy>, headers: &HeaderMap) -> Option<RetryPolicy> {
        let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let number = |name: &str| text(name).and_then(|v| v.trim().parse::<u64>().ok());
        let mut policy = match (route, text(RETRY_ON_HEADER)) {
            (Some(p), _) => p.clone(),
            (None, Some(_)) => RetryPolicy::compile(&EnvoyRetryPolicy::default()).expect("the empty policy compiles"),
            (None, None) => return None,
        };
        if let Some(list) = text(RETRY_ON_HEADER) {
            policy.on.add(list, true).expect("lenient");
        }
        if let Some(n) = number(MAX_RETRIES_HEADER) {
            policy.num_retries = u32::try_from(n).unwrap_or(u32::MAX);
        }
        if let Some(ms) = number(PER_TRY_TIMEOUT_HEADER) {
            policy.per_try_timeout = Some(Duration::from_millis(ms)).filter(|d| !d.is_zero());
        }
        Some(policy)
    }

    /// Whether a request ended this way is attempted again (budget aside).
    pub fn retriable(&self, req: &Parts, outcome: Outcome<'_>) -> bool {
        if outcome.was_sent() && !self.may_resend(req) {
            return false;
        }
        let on = &self.on;
        match outcome {
            // Envoy counts every failure to get headers as a 5xx and a gateway error.
            Outcome::ConnectFailure => on.connect_failure || on.five_xx || on.gateway_error || on.reset,
            Outcome::RefusedStream => on.refused_stream || on.five_xx || on.reset,
            Outcome::Reset => on.reset || on.five_xx || on.gateway_error,
            Outcome::PerTryTimeout => on.five_xx || on.gateway_error,
            Outcome::Response(status, headers) => {
                let code = status.as_u16();
                (on.five_xx && status.is_server_error())
                    || (on.gateway_error && matches!(code, 502..=504))
                    || (on.retriable_4xx && code == 409)
                    || (on.retriable_status_codes && self.retriable_status_codes.contains(&code))
                    || self.grpc_retriable(headers)
            }
        }
    }

    /// gRPC's status in the response headers (a trailers-only answer).
    fn grpc_retriable(&self, headers: &HeaderMap) -> bool {
        let Some(status) = headers
            .get("grpc-status")
            .and_then(|v| v.to_str().ok()?.parse::<u32>().ok())
        else {
            return false;
        };
        let on = &self.on;
        match status {
            1 => on.grpc_cancelled,
            4 => on.grpc_deadline_exceeded,
            8 => on.grpc_resource_exhausted,
            13 => on.grpc_internal,
            14 => on.grpc_unavailable,
            _ => false,
        }
    }

    /// Idempotent methods may be sent again; others only if the policy names them.
    fn may_resend(&self, req: &Parts) -> bool {
        let idempotent = matches!(
            req.method,
            Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
        );
        idempotent
            || self
                .retriable_request_headers
                .iter()
                .any(|m| m.names_method() && m.matches(req))
    }

    /// Envoy's fully jittered exponential backoff before retry number `retry` (1-based):
    /// uniform in `[0, (2^retry - 1) × base)`, at most `max_interval`.
    pub fn backoff(&self, retry: u32) -> Duration {
        let multiplier = (1u64 << retry.clamp(1, 32)) - 1;
        let ceiling = self
            .base_interval
            .saturating_mul(u32::try_from(multiplier).unwrap_or(u32::MAX));
        let ceiling_ms = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX).max(1);
        let drawn = Duration::from_millis(rand::rng().random_range(0..ceiling_ms));
        drawn.min(self.max_interval)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::route::v3::HeaderMatcher;
    use envoy_types::pb::envoy::config::route::v3::header_matcher::HeaderMatchSpecifier;
    use envoy_types::pb::envoy::config::route::v3::retry_policy::RetryHostPredicate;
    use envoy_types::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher};
    use envoy_types::pb::google::protobuf::UInt32Value;
    use hyper::header::HeaderValue;

    fn policy(on: &str) -> EnvoyRetryPolicy {
        EnvoyRetryPolicy {
            retry_on: on.into(),
            num_retries: Some(UInt32Value { value: 2 }),
            retriable_status_codes: vec![503],
            retry_host_predicate: vec![RetryHostPredicate {
                name: "envoy.retry_host_predicates.previous_hosts".into(),
                config_type: None,
            }],
            ..Default::default()
        }
    }

    fn req(method: &str) -> Parts {
        hyper::Request::builder()
            .method(method)
            .uri("/")
            .body(())
            .unwrap()
            .into_parts()
            .0
    }

    #[test]
    fn istio_default_policy() {
        let p = RetryPolicy::compile(&policy(
            "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes",
        ))
        .unwrap();
        assert_eq!(p.num_retries, 2);
        assert!(p.previous_hosts);
        let none = HeaderMap::new();
        let (get, post) = (req("GET"), req("POST"));
        assert!(p.retriable(&get, Outcome::Response(StatusCode::SERVICE_UNAVAILABLE, &none)));
        assert!(!p.retriable(&get, Outcome::Response(StatusCode::BAD_GATEWAY, &none)));
        assert!(!p.retriable(&get, Outcome::Reset), "reset is not in the default set");
        assert!(p.retriable(&post, Outcome::ConnectFailure), "nothing was sent");
        assert!(p.retriable(&post, Outcome::RefusedStream));
        assert!(
            !p.retriable(&post, Outcome::Response(StatusCode::SERVICE_UNAVAILABLE, &none)),
            "a POST that went out is never sent twice"
        );
        let mut grpc = HeaderMap::new();
        grpc.insert("grpc-status", HeaderValue::from_static("14"));
        assert!(p.retriable(&get, Outcome::Response(StatusCode::OK, &grpc)));
        grpc.insert("grpc-status", HeaderValue::from_static("5"));
        assert!(!p.retriable(&get, Outcome::Response(StatusCode::OK, &grpc)));
    }

    #[test]
    fn conditions() {
        let none = HeaderMap::new();
        let get = req("GET");
        let p = |on| RetryPolicy::compile(&policy(on)).unwrap();
        let response = |c| Outcome::Response(StatusCode::from_u16(c).unwrap(), &none);
        assert!(p("5xx").retriable(&get, response(500)));
        assert!(p("5xx").retriable(&get, Outcome::Reset));
        assert!(p("5xx").retriable(&get, Outcome::PerTryTimeout));
        assert!(!p("gateway-error").retriable(&get, response(500)));
        assert!(p("gateway-error").retriable(&get, response(504)));
        assert!(p("retriable-4xx").retriable(&get, response(409)));
        assert!(!p("retriable-4xx").retriable(&get, response(404)));
        assert!(p("reset").retriable(&get, Outcome::Reset));
        assert!(!p("connect-failure").retriable(&get, Outcome::Reset));
        assert!(RetryPolicy::compile(&policy("5xx,bogus")).is_err());
    }

    #[test]
    fn a_requests_own_headers_adjust_the_policy() {
        let get = req("GET");
        let mut h = HeaderMap::new();
        assert!(RetryPolicy::for_request(None, &h).is_none());
        h.insert(RETRY_ON_HEADER, HeaderValue::from_static("5xx,not-a-condition"));
        let p = RetryPolicy::for_request(None, &h).unwrap();
        assert_eq!(p.num_retries, 1, "Envoy's default");
        assert!(p.retriable(&get, Outcome::Reset));
        h.insert(MAX_RETRIES_HEADER, HeaderValue::from_static("4"));
        h.insert(PER_TRY_TIMEOUT_HEADER, HeaderValue::from_static("250"));
        let route = RetryPolicy::compile(&policy("connect-failure")).unwrap();
        let p = RetryPolicy::for_request(Some(&route), &h).unwrap();
        assert_eq!(
            (p.num_retries, p.per_try_timeout),
            (4, Some(Duration::from_millis(250)))
        );
        assert!(p.retriable(&get, Outcome::Reset) && p.retriable(&get, Outcome::ConnectFailure));
    }

    #[test]
    fn a_method_the_policy_names_may_be_resent() {
        let mut pol = policy("5xx");
        pol.retriable_request_headers = vec![HeaderMatcher {
            name: ":method".into(),
            header_match_specifier: Some(HeaderMatchSpecifier::StringMatch(StringMatcher {
                match_pattern: Some(string_matcher::MatchPattern::Exact("POST".into())),
                ignore_case: false,
            })),
            ..Default::default()
        }];
        let p = RetryPolicy::compile(&pol).unwrap();
        assert!(p.retriable(&req("POST"), Outcome::Reset));
        assert!(!p.retriable(&req("PATCH"), Outcome::Reset));
    }

    #[test]
    fn backoff_is_jittered_exponential_from_25ms_capped_at_ten_times() {
        let p = RetryPolicy::compile(&policy("5xx")).unwrap();
        for _ in 0..200 {
            assert!(p.backoff(1) < Duration::from_millis(25));
            assert!(p.backoff(2) < Duration::from_millis(75));
            assert!(p.backoff(3) < Duration::from_millis(175));
            assert!(p.backoff(30) <= Duration::from_millis(250));
        }
    }
}
