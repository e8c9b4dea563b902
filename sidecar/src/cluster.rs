//! What a CDS cluster says about using its endpoints (Istio's DestinationRule
//! `trafficPolicy`): the load-balancing policy, passive outlier detection on consecutive
//! 5xx or gateway errors (and, when split, on consecutive local-origin failures — no
//! answer at all — of their own), and the circuit breaker's connection, pending-request,
//! request and retry limits.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::cluster::v3::cluster::LbPolicy;
use envoy_types::pb::envoy::extensions::upstreams::http::v3::HttpProtocolOptions;
use envoy_types::pb::envoy::extensions::upstreams::http::v3::http_protocol_options::UpstreamProtocolOptions;
use envoy_types::pb::envoy::extensions::upstreams::http::v3::http_protocol_options::explicit_http_config::ProtocolConfig;
use envoy_types::pb::google::protobuf::{Duration as ProtoDuration, UInt32Value};
use hyper::StatusCode;
use prost::Message;

use crate::balance::Policy;
use crate::destinations::BadResource;
use crate::outlier::{OutlierDetector, OutlierPolicy, Verdict};

/// Envoy's circuit-breaker defaults.
const DEFAULT_MAX_CONNECTIONS: u32 = 1024;
const DEFAULT_MAX_PENDING_REQUESTS: u32 = 1024;
const DEFAULT_MAX_REQUESTS: u32 = 1024;
const DEFAULT_MAX_RETRIES: u32 = 3;
/// Envoy's `healthy_panic_threshold` default: below this share of usable endpoints, every
/// endpoint is used again, ejected or not, rather than overload the few left.
const PANIC_THRESHOLD_PERCENT: usize = 50;

/// Which failures of an endpoint count towards its ejection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counted {
    /// `consecutive_5xx`: any 5xx, and failures to get an answer at all.
    ServerErrors,
    /// `consecutive_gateway_failure`: 502, 503, 504 and failures to get an answer.
    GatewayErrors,
}

/// How one request to an endpoint ended, as outlier detection sees it.
#[derive(Debug, Clone, Copy)]
pub enum Reply {
    Status(StatusCode),
    /// No answer: connect failure, reset, timeout.
    NoAnswer,
}

/// A cluster's policies, before its endpoints are known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterPolicy {
    pub lb: Policy,
    pub http: UpstreamHttp,
    /// Requests one pooled upstream connection carries before a fresh one takes over.
    pub max_requests_per_connection: Option<u64>,
    pub outlier: Option<Outlier>,
    pub max_connections: u32,
    pub max_pending_requests: u32,
    pub max_requests: u32,
    pub max_retries: u32,
}

/// Which HTTP a cluster's mesh endpoints are spoken to in: its `HttpProtocolOptions`
/// (`envoy.extensions.upstreams.http.v3.HttpProtocolOptions`), as Istio writes them for a
/// port's protocol and a DestinationRule's `h2UpgradePolicy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UpstreamHttp {
    /// The request's own version (`use_downstream_protocol_config`, or no options).
    #[default]
    Downstream,
    /// `explicit_http_config.http_protocol_options`.
    Http1,
    /// `explicit_http_config.http2_protocol_options`.
    Http2,
}

impl UpstreamHttp {
    /// Whether `req` goes as HTTP/2; `upgrade` is the mesh-wide `h2UpgradePolicy:
    /// UPGRADE`, for clusters that leave it to the request. A WebSocket switches an
    /// HTTP/1.1 connection, so it never does.
    pub fn h2_for<B>(self, req: &hyper::Request<B>, upgrade: bool) -> bool {
        if crate::http::is_websocket(req.headers()) {
            return false;
        }
        match self {
            Self::Http1 => false,
            Self::Http2 => true,
            Self::Downstream => upgrade || req.version() == hyper::Version::HTTP_2,
        }
    }

    pub(crate) fn of(c: &Cluster) -> Result<Self, String> {
        let Some(options) = http_options(c)? else {
            return Ok(Self::Downstream);
        };
        Ok(match options.upstream_protocol_options {
            Some(UpstreamProtocolOptions::ExplicitHttpConfig(explicit)) => match explicit.protocol_config {
                Some(ProtocolConfig::HttpProtocolOptions(_)) => Self::Http1,
                Some(ProtocolConfig::Http2ProtocolOptions(_)) => Self::Http2,
                Some(ProtocolConfig::Http3ProtocolOptions(_)) => {
                    return Err("HTTP/3 upstreams are not supported".into());
                }
                None => Self::Downstream,
            },
            Some(UpstreamProtocolOptions::UseDownstreamProtocolConfig(_))
            | Some(UpstreamProtocolOptions::AutoConfig(_))
            | None => Self::Downstream,
        })
    }
}

/// The cluster's `HttpProtocolOptions`, if it has them.
fn http_options(c: &Cluster) -> Result<Option<HttpProtocolOptions>, String> {
    let Some(any) = c.typed_extension_protocol_options.get(HTTP_OPTIONS) else {
        return Ok(None);
    };
    if any.type_url != HTTP_OPTIONS_TYPE {
        return Err(format!(
            "{HTTP_OPTIONS} is a {}, not a {HTTP_OPTIONS_TYPE}",
            any.type_url
        ));
    }
    HttpProtocolOptions::decode(any.value.as_slice())
        .map(Some)
        .map_err(|e| format!("undecodable {HTTP_OPTIONS}: {e}"))
}

/// `common_http_protocol_options.max_requests_per_connection` (a DestinationRule's
/// `maxRequestsPerConnection`), or the cluster's deprecated field of that name; 0 is none.
fn max_requests_per_connection(c: &Cluster) -> Result<Option<u64>, String> {
    let common = http_options(c)?
        .and_then(|o| o.common_http_protocol_options)
        .and_then(|o| o.max_requests_per_connection);
    #[allow(deprecated)] // still what older control planes send
    let old = c.max_requests_per_connection;
    Ok(common.or(old).map(|v| u64::from(v.value)).filter(|&n| n > 0))
}

const HTTP_OPTIONS: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";
const HTTP_OPTIONS_TYPE: &str = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions";

/// A cluster's outlier detection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outlier {
    /// Ejection on answers (and, unless split, on no answer too).
    pub external: Option<(OutlierPolicy, Counted)>,
    /// `split_external_local_origin_errors`: ejection on no answer, on a streak of its own.
    pub local_origin: Option<OutlierPolicy>,
}

fn seconds(d: Option<&ProtoDuration>, default: Duration) -> Duration {
    d.and_then(|d| {
        Some(Duration::new(
            u64::try_from(d.seconds).ok()?,
            u32::try_from(d.nanos).ok()?,
        ))
    })
    .unwrap_or(default)
}

fn value(v: Option<&UInt32Value>, default: u32) -> u32 {
    v.map_or(default, |v| v.value)
}

impl ClusterPolicy {
    /// Reads `c`'s policies; a load-balancing policy we do not implement is refused.
    pub fn of(c: &Cluster) -> Result<Self, BadResource> {
        let bad = |problem: String| BadResource {
            resource: c.name.clone(),
            problem,
        };
        let lb = match LbPolicy::try_from(c.lb_policy) {
            Ok(LbPolicy::RoundRobin) => Policy::RoundRobin,
            Ok(LbPolicy::LeastRequest) => Policy::LeastConn,
            Ok(LbPolicy::Random) => Policy::Random,
            Ok(LbPolicy::RingHash) => Policy::RingHash,
            Ok(other) => return Err(bad(format!("lb_policy {} is not supported", other.as_str_name()))),
            Err(_) => return Err(bad(format!("lb_policy {} is unknown", c.lb_policy))),
        };
        let outlier = c.outlier_detection.as_ref().and_then(|o| {
            let defaults = OutlierPolicy::default();
            let policy = |threshold: u32| OutlierPolicy {
                consecutive_failures: threshold.max(1),
                base_ejection_time: seconds(o.base_ejection_time.as_ref(), defaults.base_ejection_time),
                max_ejection_time: seconds(o.max_ejection_time.as_ref(), defaults.max_ejection_time),
                interval: seconds(o.interval.as_ref(), defaults.interval),
                max_ejection_percent: u8::try_from(value(o.max_ejection_percent.as_ref(), 10).min(100))
                    .expect("at most 100"),
            };
            // Envoy enforces 5xx ejection by default and gateway-failure ejection only when
            // asked; Istio sets one of the two enforcing percentages to 100.
            let five_xx = value(o.enforcing_consecutive_5xx.as_ref(), 100) > 0;
            let gateway = value(o.enforcing_consecutive_gateway_failure.as_ref(), 0) > 0;
            let external = if five_xx {
                Some((policy(value(o.consecutive_5xx.as_ref(), 5)), Counted::ServerErrors))
            } else if gateway {
                Some((
                    policy(value(o.consecutive_gateway_failure.as_ref(), 5)),
                    Counted::GatewayErrors,
                ))
            } else {
                None
            };
            let local_origin = (o.split_external_local_origin_errors
                && value(o.enforcing_consecutive_local_origin_failure.as_ref(), 100) > 0)
                .then(|| policy(value(o.consecutive_local_origin_failure.as_ref(), 5)));
            (external.is_some() || local_origin.is_some()).then_some(Outlier { external, local_origin })
        });
        let thresholds = c.circuit_breakers.as_ref().and_then(|b| b.thresholds.first());
        Ok(Self {
            lb,
            http: UpstreamHttp::of(c).map_err(bad)?,
            max_requests_per_connection: max_requests_per_connection(c).map_err(bad)?,
            outlier,
            max_connections: value(
                thresholds.and_then(|t| t.max_connections.as_ref()),
                DEFAULT_MAX_CONNECTIONS,
            ),
            max_pending_requests: value(
                thresholds.and_then(|t| t.max_pending_requests.as_ref()),
                DEFAULT_MAX_PENDING_REQUESTS,
            ),
            max_requests: value(thresholds.and_then(|t| t.max_requests.as_ref()), DEFAULT_MAX_REQUESTS),
            max_retries: value(thresholds.and_then(|t| t.max_retries.as_ref()), DEFAULT_MAX_RETRIES),
        })
    }
}

/// Passive health of one cluster's endpoints.
#[derive(Debug)]
pub struct Health {
    external: Option<(OutlierDetector, Counted)>,
    local_origin: Option<OutlierDetector>,
    /// Local-origin failures are on a streak of their own, not counted as 5xx.
    split: bool,
}

fn note(verdict: Verdict, i: usize) {
    if let Verdict::Ejected(time) = verdict {
        tracing::info!(endpoint = i, ejected_for = ?time, "outlier ejected");
    }
}

impl Health {
    /// All `n` endpoints healthy.
    pub fn new(outlier: Outlier, n: usize) -> Self {
        Self {
            split: outlier.local_origin.is_some(),
            external: outlier
                .external
                .map(|(p, counted)| (OutlierDetector::new(p, n), counted)),
            local_origin: outlier.local_origin.map(|p| OutlierDetector::new(p, n)),
        }
    }

    fn detectors(&self) -> impl Iterator<Item = &OutlierDetector> {
        self.external.iter().map(|(d, _)| d).chain(self.local_origin.iter())
    }

    /// Whether endpoint `i` may be chosen: not ejected, or too few are left to be choosy.
    pub fn usable(&self, i: usize, n: usize) -> bool {
        let ejected = (0..n).filter(|&j| self.ejected(j)).count();
        (n - ejected) * 100 < n * PANIC_THRESHOLD_PERCENT || !self.ejected(i)
    }

    /// Whether endpoint `i` is ejected now, panic or not.
    pub fn ejected(&self, i: usize) -> bool {
        self.detectors().any(|d| !d.is_available(i))
    }

    /// Records how a request to endpoint `i` ended.
    pub fn record(&self, i: usize, result: Reply) {
        if let (Reply::NoAnswer, true) = (result, self.split) {
            if let Some(local) = &self.local_origin {
                note(local.record_failure(i), i);
            }
            return;
        }
        if let Some(local) = &self.local_origin {
            // An answer: the endpoint could be reached.
            local.record_success(i);
        }
        let Some((detector, counted)) = &self.external else {
            return;
        };
        let failed = match (result, counted) {
            (Reply::NoAnswer, _) => true,
            (Reply::Status(s), Counted::ServerErrors) => s.is_server_error(),
            (Reply::Status(s), Counted::GatewayErrors) => matches!(s.as_u16(), 502..=504),
        };
        if failed {
            note(detector.record_failure(i), i);
        } else {
            detector.record_success(i);
        }
    }

    /// Carries endpoint `from`'s health in `old` over to our endpoint `to`.
    pub fn inherit(&self, to: usize, old: &Health, from: usize) {
        if let (Some((new, _)), Some((before, _))) = (&self.external, &old.external) {
            new.inherit(to, before, from);
        }
        if let (Some(new), Some(before)) = (&self.local_origin, &old.local_origin) {
            new.inherit(to, before, from);
        }
    }
}

/// The circuit breaker's counts of one cluster.
#[derive(Debug)]
pub struct Breaker {
    max_connections: u32,
    max_pending_requests: u32,
    max_requests: u32,
    max_retries: u32,
    connections: AtomicU32,
    pending: AtomicU32,
    requests: AtomicU32,
    retries: AtomicU32,
    /// Woken when a connection slot is given back, for connections waiting for one.
    freed: tokio::sync::Notify,
}

/// A connection, request or retry counted against its limit until dropped.
#[derive(Debug)]
pub struct Slot<'a> {
    count: &'a AtomicU32,
    /// Whom to wake when it is given back (connection slots).
    freed: Option<&'a tokio::sync::Notify>,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::AcqRel);
        if let Some(freed) = self.freed {
            freed.notify_waiters();
        }
    }
}

/// A connection slot held by a pooled HTTP/1.1 connection, which outlives the request
/// that made it: given back when the connection closes.
#[derive(Debug)]
pub struct PooledSlot {
    breaker: Arc<Breaker>,
}

impl PooledSlot {
    /// Wakes those waiting for room (a connection of theirs may have come back idle).
    pub fn wake_waiters(&self) {
        self.breaker.freed.notify_waiters();
    }
}

impl Drop for PooledSlot {
    fn drop(&mut self) {
        self.breaker.connections.fetch_sub(1, Ordering::AcqRel);
        self.breaker.freed.notify_waiters();
    }
}

/// One more of `count`, if that stays within `max`.
fn claim(count: &AtomicU32, max: u32) -> bool {
    count
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1))
        .is_ok()
}

fn take<'a>(count: &'a AtomicU32, max: u32, freed: Option<&'a tokio::sync::Notify>) -> Option<Slot<'a>> {
    // Lazily: a Slot made and dropped would give back a place it never had.
    claim(count, max).then(|| Slot { count, freed })
}

/// Why no connection slot could be had.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ConnectionOverflow {
    /// `max_connections` were open and `max_pending_requests` already waited for one
    /// (Envoy's `upstream_rq_pending_overflow`).
    #[error("too many connections waiting for one of the cluster's connection slots")]
    Pending,
    /// No slot was given back within the wait (Envoy's connect timeout).
    #[error("no connection slot came free in time")]
    Timeout,
}

impl ConnectionOverflow {
    /// The metric reason label.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Pending => "upstream_rq_pending_overflow",
            Self::Timeout => "connect_timeout",
        }
    }
}

impl Breaker {
    /// Limits from the cluster's policy, nothing in flight.
    pub fn new(policy: &ClusterPolicy) -> Self {
        Self {
            max_connections: policy.max_connections,
            max_pending_requests: policy.max_pending_requests,
            max_requests: policy.max_requests,
            max_retries: policy.max_retries,
            connections: AtomicU32::new(0),
            pending: AtomicU32::new(0),
            requests: AtomicU32::new(0),
            retries: AtomicU32::new(0),
            freed: tokio::sync::Notify::new(),
        }
    }

    /// An upstream connection, counted while it is open. At `max_connections` (Envoy's
    /// `upstream_cx_overflow`, which `overflowed` is told of) the caller waits, as a pending
    /// request of Envoy's TCP pool does, for one to close — within `wait`, and only while
    /// fewer than `max_pending_requests` already wait.
    pub async fn connection(&self, wait: Duration, overflowed: impl FnOnce()) -> Result<Slot<'_>, ConnectionOverflow> {
        let slot = || take(&self.connections, self.max_connections, Some(&self.freed));
        if let Some(s) = slot() {
            return Ok(s);
        }
        overflowed();
        let _pending = self.pending().ok_or(ConnectionOverflow::Pending)?;
        let waited = tokio::time::timeout(wait, async {
            loop {
                let freed = self.freed.notified();
                let mut freed = std::pin::pin!(freed);
                // Registered before looking, so a slot given back in between still wakes us.
                freed.as_mut().enable();
                if let Some(s) = slot() {
                    return s;
                }
                freed.await;
            }
        });
        waited.await.map_err(|_| ConnectionOverflow::Timeout)
    }

    /// Whether `other` has the same four limits (its counts aside).
    pub fn same_limits(&self, other: &Breaker) -> bool {
        let limits = |b: &Breaker| (b.max_connections, b.max_pending_requests, b.max_requests, b.max_retries);
        limits(self) == limits(other)
    }

    /// A connection slot for a pooled connection to keep, or `None` at `max_connections`.
    pub fn pooled(self: &Arc<Self>) -> Option<PooledSlot> {
        claim(&self.connections, self.max_connections).then(|| PooledSlot { breaker: self.clone() })
    }

    /// Notified when a connection slot is given back or a pooled connection comes back
    /// idle; register (`enable`) before looking for room.
    pub fn freed(&self) -> &tokio::sync::Notify {
        &self.freed
    }

    /// A request waiting for a connection to become ready, or `None` at
    /// `max_pending_requests` (Envoy's `upstream_rq_pending_overflow`).
    pub fn pending(&self) -> Option<Slot<'_>> {
        take(&self.pending, self.max_pending_requests, None)
    }

    /// A request in flight, or `None` at `max_requests` (Envoy's `upstream_rq_pending_overflow`).
    pub fn request(&self) -> Option<Slot<'_>> {
        take(&self.requests, self.max_requests, None)
    }

    /// A retry in flight, or `None` at `max_retries` (Envoy's `upstream_rq_retry_overflow`).
    pub fn retry(&self) -> Option<Slot<'_>> {
        take(&self.retries, self.max_retries, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::cluster::v3::circuit_breakers::Thresholds;
    use envoy_types::pb::envoy::config::cluster::v3::{CircuitBreakers, OutlierDetection};

    #[test]
    fn the_clusters_http_protocol_options_choose_the_hop_between_sidecars() {
        use envoy_types::pb::envoy::config::core::v3::{Http1ProtocolOptions, Http2ProtocolOptions};
        use envoy_types::pb::envoy::extensions::upstreams::http::v3::http_protocol_options::{
            ExplicitHttpConfig, UseDownstreamHttpConfig,
        };
        use envoy_types::pb::google::protobuf::Any;
        let with = |options: Option<UpstreamProtocolOptions>| {
            let mut c = Cluster {
                name: "outbound|9080||reviews".into(),
                ..Default::default()
            };
            let options = HttpProtocolOptions {
                upstream_protocol_options: options,
                ..Default::default()
            };
            let any = Any {
                type_url: HTTP_OPTIONS_TYPE.into(),
                value: options.encode_to_vec(),
            };
            c.typed_extension_protocol_options.insert(HTTP_OPTIONS.into(), any);
            c
        };
        let explicit = |config| {
            Some(UpstreamProtocolOptions::ExplicitHttpConfig(ExplicitHttpConfig {
                protocol_config: Some(config),
            }))
        };
        let h2 = explicit(ProtocolConfig::Http2ProtocolOptions(Http2ProtocolOptions::default()));
        let h1 = explicit(ProtocolConfig::HttpProtocolOptions(Http1ProtocolOptions::default()));
        let downstream = Some(UpstreamProtocolOptions::UseDownstreamProtocolConfig(
            UseDownstreamHttpConfig::default(),
        ));
        assert_eq!(UpstreamHttp::of(&with(h2)), Ok(UpstreamHttp::Http2));
        assert_eq!(UpstreamHttp::of(&with(h1)), Ok(UpstreamHttp::Http1));
        assert_eq!(UpstreamHttp::of(&with(downstream)), Ok(UpstreamHttp::Downstream));
        assert_eq!(UpstreamHttp::of(&Cluster::default()), Ok(UpstreamHttp::Downstream));
        // What each means for a request as it came.
        use hyper::Version;
        let req = |version| hyper::Request::builder().version(version).body(()).unwrap();
        assert!(!UpstreamHttp::Downstream.h2_for(&req(Version::HTTP_11), false));
        assert!(UpstreamHttp::Downstream.h2_for(&req(Version::HTTP_11), true));
        assert!(UpstreamHttp::Downstream.h2_for(&req(Version::HTTP_2), false));
        assert!(!UpstreamHttp::Http1.h2_for(&req(Version::HTTP_2), true));
        assert!(UpstreamHttp::Http2.h2_for(&req(Version::HTTP_10), false));
        // Options of another type under the name are refused, naming what they were.
        let mut wrong = with(None);
        wrong
            .typed_extension_protocol_options
            .get_mut(HTTP_OPTIONS)
            .unwrap()
            .type_url = "type.googleapis.com/x.Y".into();
        let e = ClusterPolicy::of(&wrong).unwrap_err();
        assert!(e.to_string().contains("x.Y"), "{e}");
    }

    fn u(value: u32) -> Option<UInt32Value> {
        Some(UInt32Value { value })
    }

    #[test]
    fn policies_from_istios_cluster() {
        let mut c = Cluster {
            name: "outbound|9080|v1|reviews".into(),
            lb_policy: LbPolicy::LeastRequest as i32,
            outlier_detection: Some(OutlierDetection {
                consecutive_5xx: u(0),
                enforcing_consecutive_5xx: u(0),
                consecutive_gateway_failure: u(3),
                enforcing_consecutive_gateway_failure: u(100),
                base_ejection_time: Some(ProtoDuration { seconds: 60, nanos: 0 }),
                max_ejection_percent: u(50),
                ..Default::default()
            }),
            circuit_breakers: Some(CircuitBreakers {
                thresholds: vec![Thresholds {
                    max_requests: u(10),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        };
        let p = ClusterPolicy::of(&c).unwrap();
        assert_eq!(p.lb, Policy::LeastConn);
        let (outlier, counted) = p.outlier.clone().unwrap().external.unwrap();
        assert_eq!(counted, Counted::GatewayErrors);
        assert_eq!(outlier.consecutive_failures, 3);
        assert_eq!(outlier.base_ejection_time, Duration::from_secs(60));
        assert_eq!(outlier.max_ejection_percent, 50);
        assert_eq!((p.max_requests, p.max_retries), (10, DEFAULT_MAX_RETRIES));
        c.lb_policy = LbPolicy::RingHash as i32;
        assert_eq!(ClusterPolicy::of(&c).unwrap().lb, Policy::RingHash);
        c.lb_policy = LbPolicy::Maglev as i32;
        assert_eq!(ClusterPolicy::of(&c).unwrap_err().resource, "outbound|9080|v1|reviews");
        let plain = ClusterPolicy::of(&Cluster::default()).unwrap();
        assert!(plain.outlier.is_none() && plain.max_requests == DEFAULT_MAX_REQUESTS);
    }

    #[tokio::test(start_paused = true)]
    async fn consecutive_server_errors_eject_until_the_base_time_passes() {
        let policy = OutlierPolicy {
            consecutive_failures: 2,
            base_ejection_time: Duration::from_secs(30),
            max_ejection_percent: 100,
            ..OutlierPolicy::default()
        };
        let h = Health::new(
            Outlier {
                external: Some((policy, Counted::GatewayErrors)),
                local_origin: None,
            },
            4,
        );
        h.record(0, Reply::Status(StatusCode::INTERNAL_SERVER_ERROR));
        h.record(0, Reply::Status(StatusCode::INTERNAL_SERVER_ERROR));
        assert!(h.usable(0, 4), "a 500 is not a gateway error");
        h.record(0, Reply::Status(StatusCode::SERVICE_UNAVAILABLE));
        h.record(0, Reply::NoAnswer);
        assert!(!h.usable(0, 4));
        tokio::time::advance(Duration::from_secs(30)).await;
        assert!(h.usable(0, 4));
        for i in [1, 2] {
            h.record(i, Reply::NoAnswer);
            h.record(i, Reply::NoAnswer);
        }
        assert!(!h.usable(1, 4) && h.usable(0, 4), "half are left: not yet panic");
        h.record(3, Reply::NoAnswer);
        h.record(3, Reply::NoAnswer);
        assert!(
            h.usable(1, 4) && h.usable(3, 4),
            "one of four left: panic, all are used"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn split_local_origin_failures_are_a_streak_of_their_own() {
        let c = Cluster {
            outlier_detection: Some(OutlierDetection {
                consecutive_5xx: u(3),
                split_external_local_origin_errors: true,
                consecutive_local_origin_failure: u(2),
                max_ejection_percent: u(100),
                ..Default::default()
            }),
            ..Default::default()
        };
        let h = Health::new(ClusterPolicy::of(&c).unwrap().outlier.unwrap(), 4);
        // Two 500s and a connection failure: neither streak is long enough.
        h.record(0, Reply::Status(StatusCode::INTERNAL_SERVER_ERROR));
        h.record(0, Reply::Status(StatusCode::INTERNAL_SERVER_ERROR));
        h.record(0, Reply::NoAnswer);
        assert!(!h.ejected(0));
        h.record(0, Reply::NoAnswer);
        assert!(h.ejected(0), "two local-origin failures in a row");
        h.record(1, Reply::NoAnswer);
        h.record(1, Reply::Status(StatusCode::OK));
        h.record(1, Reply::NoAnswer);
        assert!(!h.ejected(1), "an answer ends the local-origin streak");
    }

    #[test]
    fn the_breaker_counts_requests_in_flight() {
        let b = Breaker::new(&ClusterPolicy {
            max_requests: 2,
            max_retries: 0,
            ..ClusterPolicy::of(&Cluster::default()).unwrap()
        });
        let (one, two) = (b.request().unwrap(), b.request().unwrap());
        assert!(b.request().is_none(), "the third overflows");
        drop(one);
        assert!(b.request().is_some());
        drop(two);
        assert!(b.retry().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn connections_beyond_the_limit_wait_for_one_to_close_and_pending_ones_are_bounded() {
        let b = std::sync::Arc::new(Breaker::new(&ClusterPolicy {
            max_connections: 1,
            max_pending_requests: 1,
            ..ClusterPolicy::of(&Cluster::default()).unwrap()
        }));
        let wait = Duration::from_secs(5);
        let overflows = AtomicU32::new(0);
        let overflowed = || {
            overflows.fetch_add(1, Ordering::Relaxed);
        };
        let open = b.connection(wait, overflowed).await.unwrap();
        // The second waits for the first to close…
        let waiting = {
            let b = b.clone();
            tokio::spawn(async move { b.connection(wait, || {}).await.map(drop) })
        };
        while b.pending.load(Ordering::Acquire) == 0 {
            tokio::task::yield_now().await;
        }
        // …and a third finds the one pending place taken.
        assert_eq!(
            b.connection(wait, overflowed).await.unwrap_err(),
            ConnectionOverflow::Pending
        );
        assert_eq!(overflows.load(Ordering::Relaxed), 1, "upstream_cx_overflow");
        drop(open);
        assert_eq!(waiting.await.unwrap(), Ok(()));
        // Nobody closes: the wait ends at its bound.
        let _open = b.connection(wait, || {}).await.unwrap();
        assert_eq!(
            b.connection(wait, || {}).await.unwrap_err(),
            ConnectionOverflow::Timeout
        );
    }
}
