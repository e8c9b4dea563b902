//! The sidecar's metrics, with Istio's names and labels so existing dashboards work.
//!
//! `reporter` is `source` on the outbound side and `destination` on the inbound side;
//! `connection_security_policy` says what really protected the connection (`mutual_tls` or
//! `none`), never what was configured.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

const TCP_LABELS: &[&str] = &[
    "reporter",
    "source_principal",
    "source_cluster",
    "destination_principal",
    "destination_service",
    "destination_cluster",
    "connection_security_policy",
];

const REQUEST_LABELS: &[&str] = &[
    "reporter",
    "source_principal",
    "source_cluster",
    "destination_principal",
    "destination_service",
    "destination_cluster",
    "connection_security_policy",
    "request_protocol",
    "response_code",
];

/// Istio's buckets for `istio_request_duration_milliseconds`.
const DURATION_BUCKETS_MS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0, 60000.0, 300000.0,
    600000.0, 1800000.0, 3600000.0,
];

/// Istio's buckets for `istio_request_bytes` and `istio_response_bytes`: powers of ten
/// from 1 to 10^8.
const SIZE_BUCKETS: [f64; 9] = [1.0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8];

/// Every metric the sidecar exports.
#[derive(Clone)]
pub struct Telemetry {
    registry: Registry,
    /// Our own cluster: `source_cluster` outbound, `destination_cluster` inbound.
    cluster: std::sync::Arc<str>,
    opened: IntCounterVec,
    closed: IntCounterVec,
    sent: IntCounterVec,
    received: IntCounterVec,
    requests: IntCounterVec,
    durations: HistogramVec,
    request_sizes: HistogramVec,
    response_sizes: HistogramVec,
    refused: IntCounterVec,
    upstream_failures: IntCounterVec,
    open: IntGauge,
    /// The request series resolved so far, by the hash of their label values: each request
    /// costs one hash and one read lock here instead of one per family (four) in the
    /// registry. Keyed by hash alone, as the registry's own children are; foldhash, not
    /// SipHash: the nine values are ~250 bytes, and SipHash over them was 1.7 % of a side's CPU.
    series: Arc<RwLock<HashMap<u64, Arc<RequestSeries>, foldhash::fast::FixedState>>>,
    /// RBAC outcomes, `[http, tcp]` × [`RBAC_OUTCOMES`].
    rbac: [[IntCounter; 5]; 2],
    /// Pooled connections (HTTP/1.1 or HTTP/2) to upstream sidecars open now.
    pub pooled_upstreams: IntGauge,
    /// Unix time at which the current SVID expires.
    pub svid_expiry: IntGauge,
    /// SVIDs renewed from the CA.
    pub svid_renewals: IntCounter,
    /// Trust-bundle updates accepted from SDS.
    pub bundle_updates: IntCounter,
    /// Routable outbound listeners (service VIP:port) in the table from xDS.
    pub xds_routes: IntGauge,
    /// xDS updates refused (NACKed); the last good table kept serving.
    pub xds_rejects: IntCounter,
}

/// RBAC outcomes, as Envoy's `rbac.allowed`, `rbac.denied`, `rbac.shadow_allowed` and
/// `rbac.shadow_denied` stats (plus `logged` for LOG/AUDIT matches, which Envoy only marks
/// in its access log), exported as `envoy_http_rbac_*` and `envoy_tcp_rbac_*`.
const RBAC_OUTCOMES: [&str; 5] = ["allowed", "denied", "shadow_allowed", "shadow_denied", "logged"];

/// Where an RBAC check ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RbacScope {
    /// A request, by the HTTP connection manager's filters.
    Http = 0,
    /// A connection, by network filters.
    Tcp = 1,
}

/// What labels one connection's counters.
#[derive(Debug, Clone)]
pub struct ConnectionLabels<'a> {
    pub reporter: &'static str,
    pub source_principal: &'a str,
    pub destination_principal: &'a str,
    pub destination_service: &'a str,
    /// The other side's cluster, where known (an endpoint's cluster from xDS outbound).
    pub peer_cluster: Option<&'a str>,
    pub mutual_tls: bool,
}

/// What labels one request, besides its response code.
#[derive(Debug, Clone)]
pub struct RequestLabels<'a> {
    pub connection: ConnectionLabels<'a>,
    /// `http` or `grpc`.
    pub protocol: &'static str,
}

/// A status code as label text without allocating on every request (`http` keeps codes
/// within 100..=999).
fn code_str(code: u16, buf: &mut [u8; 3]) -> &str {
    let code = code.clamp(100, 999);
    buf[0] = b'0' + (code / 100) as u8;
    buf[1] = b'0' + (code / 10 % 10) as u8;
    buf[2] = b'0' + (code % 10) as u8;
    std::str::from_utf8(buf).expect("ASCII digits")
}

/// The four request families' children for one label set.
struct RequestSeries {
    requests: IntCounter,
    request_sizes: Histogram,
    durations: Histogram,
    response_sizes: Histogram,
}

/// When a request arrived and how big it is, taken before it is sent on.
#[derive(Debug, Clone, Copy)]
pub struct RequestSize {
    pub started: Instant,
    /// Headers (name, value and the four bytes of `: ` and CRLF each) and body as declared
    /// by `content-length` (a streamed body of unknown length counts as what its size hint
    /// promises), Envoy's `request.total_size` as near as it can be known up front.
    pub bytes: u64,
}

impl RequestSize {
    /// Measures `req` as it arrives, now.
    pub fn of<B: hyper::body::Body>(req: &hyper::Request<B>) -> Self {
        let headers: usize = req.headers().iter().map(|(n, v)| n.as_str().len() + v.len() + 4).sum();
        let body = req
            .headers()
            .get(hyper::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse().ok())
            .unwrap_or_else(|| req.body().size_hint().lower());
        Self {
            started: Instant::now(),
            bytes: headers as u64 + body,
        }
    }
}

/// The measure of one response in flight; dropped when it ends.
pub struct Exchange {
    started: Instant,
    series: Arc<RequestSeries>,
    bytes: u64,
    /// The access log line written when the response ends.
    log: Option<crate::access_log::Answered>,
    /// The span that ends with the response.
    span: Option<crate::otlp::Started>,
}

impl Exchange {
    /// Counts `n` more bytes of the response.
    pub fn add(&mut self, n: usize) {
        self.bytes += n as u64;
    }

    /// Ends `span` when the response ends.
    pub fn traced(mut self, span: Option<crate::otlp::Started>) -> Self {
        self.span = span;
        self
    }

    /// Writes `line` to the access log when the response ends.
    pub fn logged(mut self, line: Option<crate::access_log::Answered>) -> Self {
        self.log = line;
        self
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        let elapsed = self.started.elapsed();
        self.series.durations.observe(elapsed.as_secs_f64() * 1000.0);
        self.series.response_sizes.observe(self.bytes as f64);
        if let Some(line) = self.log.take() {
            line.write(self.bytes, elapsed);
        }
        if let Some(span) = self.span.take() {
            span.end();
        }
    }
}

/// The counters of one connection, resolved once at its start.
pub struct TcpCounters {
    closed: IntCounter,
    /// Bytes towards the connection's client.
    pub sent: IntCounter,
    /// Bytes from the connection's client.
    pub received: IntCounter,
    open: IntGauge,
}

impl Drop for TcpCounters {
    fn drop(&mut self) {
        self.closed.inc();
        self.open.dec();
    }
}

impl Default for Telemetry {
    fn default() -> Self {
        Self::new()
    }
}

impl Telemetry {
    /// A fresh registry with every family registered, for a proxy in no named cluster.
    pub fn new() -> Self {
        Self::for_cluster("unknown")
    }

    /// A fresh registry with every family registered, for a proxy in `cluster`.
    pub fn for_cluster(cluster: &str) -> Self {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry.register(Box::new(c.clone())).expect("unique metric");
            c
        };
        let histogram = |name: &str, help: &str, buckets: &[f64]| {
            let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets.to_vec()), REQUEST_LABELS)
                .expect("valid metric");
            registry.register(Box::new(h.clone())).expect("unique metric");
            h
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            registry.register(Box::new(g.clone())).expect("unique metric");
            g
        };
        let total = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid metric");
            registry.register(Box::new(c.clone())).expect("unique metric");
            c
        };
        Self {
            cluster: cluster.into(),
            opened: counter(
                "istio_tcp_connections_opened_total",
                "TCP connections opened",
                TCP_LABELS,
            ),
            closed: counter(
                "istio_tcp_connections_closed_total",
                "TCP connections closed",
                TCP_LABELS,
            ),
            sent: counter(
                "istio_tcp_sent_bytes_total",
                "Bytes sent towards the client",
                TCP_LABELS,
            ),
            received: counter(
                "istio_tcp_received_bytes_total",
                "Bytes received from the client",
                TCP_LABELS,
            ),
            requests: counter("istio_requests_total", "HTTP requests answered", REQUEST_LABELS),
            durations: histogram(
                "istio_request_duration_milliseconds",
                "From the request's arrival to the last byte of its response",
                &DURATION_BUCKETS_MS,
            ),
            request_sizes: histogram("istio_request_bytes", "Request size: headers and body", &SIZE_BUCKETS),
            response_sizes: histogram("istio_response_bytes", "Response size: headers and body", &SIZE_BUCKETS),
            refused: counter(
                "isthmus_sidecar_refused_connections_total",
                "Connections refused before reaching the application or upstream, by side and reason",
                &["side", "reason"],
            ),
            upstream_failures: counter(
                "isthmus_sidecar_upstream_failures_total",
                "Failed connections to the upstream or the application, by side and reason",
                &["side", "reason"],
            ),
            open: gauge("isthmus_sidecar_open_connections", "Connections open now"),
            series: Arc::default(),
            rbac: ["http", "tcp"].map(|scope| {
                RBAC_OUTCOMES.map(|outcome| {
                    total(
                        &format!("envoy_{scope}_rbac_{outcome}"),
                        &format!("{scope} RBAC checks: {outcome}"),
                    )
                })
            }),
            pooled_upstreams: gauge(
                "isthmus_sidecar_pooled_upstream_connections",
                "Pooled connections (HTTP/1.1 or HTTP/2) in mTLS to upstream sidecars open now",
            ),
            svid_expiry: gauge(
                "isthmus_sidecar_svid_expiry_seconds",
                "Unix time at which the current SVID expires",
            ),
            xds_routes: gauge(
                "isthmus_sidecar_xds_routes",
                "Routable outbound listeners (service VIP:port) from xDS",
            ),
            xds_rejects: total(
                "isthmus_sidecar_xds_rejects_total",
                "xDS updates refused (NACKed); the last good routes kept serving",
            ),
            bundle_updates: total(
                "isthmus_sidecar_trust_bundle_updates_total",
                "Trust-bundle updates from SDS",
            ),
            svid_renewals: total("isthmus_sidecar_svid_renewals_total", "SVIDs renewed from the CA"),
            registry,
        }
    }

    /// `source_cluster` and `destination_cluster` as `reporter` sees them.
    fn clusters<'a>(&'a self, l: &ConnectionLabels<'a>) -> (&'a str, &'a str) {
        let peer = l.peer_cluster.unwrap_or("unknown");
        if l.reporter == "source" {
            (&*self.cluster, peer)
        } else {
            (peer, &*self.cluster)
        }
    }

    /// The values of [`TCP_LABELS`], which start [`REQUEST_LABELS`] too.
    fn connection_values<'a>(&'a self, l: &ConnectionLabels<'a>) -> [&'a str; 7] {
        let (source_cluster, destination_cluster) = self.clusters(l);
        [
            l.reporter,
            l.source_principal,
            source_cluster,
            l.destination_principal,
            l.destination_service,
            destination_cluster,
            if l.mutual_tls { "mutual_tls" } else { "none" },
        ]
    }

    /// Counts one answered request (ours or the upstream's) under `istio_requests_total`,
    /// records its size, and returns the measure of its response: dropping it (when the
    /// response body ends) records the duration and the response size.
    pub fn request(&self, r: &RequestLabels<'_>, code: u16, request: RequestSize) -> Exchange {
        let mut buf = [0; 3];
        let [a, b, c, d, e, f, g] = self.connection_values(&r.connection);
        let values = [a, b, c, d, e, f, g, r.protocol, code_str(code, &mut buf)];
        let series = self.series(&values);
        series.requests.inc();
        series.request_sizes.observe(request.bytes as f64);
        Exchange {
            started: request.started,
            series,
            bytes: 0,
            log: None,
            span: None,
        }
    }

    /// The children of the request families for `values` ([`REQUEST_LABELS`]' values).
    fn series(&self, values: &[&str; 9]) -> Arc<RequestSeries> {
        let key = foldhash::fast::FixedState::default().hash_one(values);
        if let Some(series) = self.series.read().expect("series poisoned").get(&key) {
            return series.clone();
        }
        let series = Arc::new(RequestSeries {
            requests: self.requests.with_label_values(values),
            request_sizes: self.request_sizes.with_label_values(values),
            durations: self.durations.with_label_values(values),
            response_sizes: self.response_sizes.with_label_values(values),
        });
        self.series
            .write()
            .expect("series poisoned")
            .entry(key)
            .or_insert(series)
            .clone()
    }

    /// Counts a connection as opened and returns its counters; dropping them counts the close.
    pub fn connection(&self, l: &ConnectionLabels<'_>) -> TcpCounters {
        let values = self.connection_values(l);
        self.opened.with_label_values(&values).inc();
        self.open.inc();
        TcpCounters {
            closed: self.closed.with_label_values(&values),
            sent: self.sent.with_label_values(&values),
            received: self.received.with_label_values(&values),
            open: self.open.clone(),
        }
    }

    /// Counts one RBAC check's outcome.
    pub fn rbac(&self, scope: RbacScope, verdict: &crate::authz::Verdict) {
        let c = &self.rbac[scope as usize];
        c[usize::from(!verdict.allowed())].inc();
        c[2].inc_by(verdict.shadow_allowed as u64);
        c[3].inc_by(verdict.shadow_denied as u64);
        if !verdict.logged.is_empty() {
            c[4].inc();
        }
    }

    /// Counts a connection refused on `side` (`inbound`/`outbound`) for `reason`.
    pub fn refused(&self, side: &str, reason: &str) {
        self.refused.with_label_values(&[side, reason]).inc();
    }

    /// Counts a failed connection to the upstream or application.
    pub fn upstream_failure(&self, side: &str, reason: &str) {
        self.upstream_failures.with_label_values(&[side, reason]).inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding cannot fail");
        String::from_utf8(out).expect("Prometheus text is UTF-8")
    }
}
