//! The gateway's Prometheus metrics, in Istio's names and labels so existing
//! dashboards and alerts work, plus the gateway's own (`isthmus_gateway_*`).
//!
//! Counters on the per-connection path are resolved to handles when a routes
//! table is built, so a connection touches only atomics.

use mesh_vocab::ClusterId;
use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

/// Istio's TCP labels the gateway can fill honestly; the rest are left out
/// rather than filled with guesses.
const ISTIO_TCP_LABELS: &[&str] = &[
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_cluster",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "destination_cluster",
    "request_protocol",
    "response_flags",
    "connection_security_policy",
];

/// All metric families of one gateway.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    opened: IntCounterVec,
    closed: IntCounterVec,
    sent: IntCounterVec,
    received: IntCounterVec,
    rejected: IntCounterVec,
    active: IntGaugeVec,
    connect_failures: IntCounterVec,
    ejections: IntCounterVec,
    reloads: IntCounterVec,
    /// Connections open now, all routes together.
    pub open_connections: IntGauge,
    /// 1 when the last reload of the routes file worked, 0 when the file is bad.
    pub config_ok: IntGauge,
    /// 1 while an xDS stream to the controller is up.
    pub xds_connected: IntGauge,
    xds_nacks: IntCounter,
}

/// Who the gateway is, for the `source_*` labels.
#[derive(Debug, Clone)]
pub struct Source {
    /// The gateway's cluster.
    pub cluster: ClusterId,
}

/// The handles one (route, endpoint cluster) pair updates per connection.
#[derive(Clone)]
pub struct TcpCounters {
    pub opened: IntCounter,
    pub closed: IntCounter,
    /// Bytes to the client (Istio: sent during response).
    pub sent: IntCounter,
    /// Bytes from the client (Istio: received during request).
    pub received: IntCounter,
    labels: Vec<String>,
}

impl TcpCounters {
    /// A close with Envoy response flags other than `-` (rare, so not pre-resolved).
    pub fn closed_with_flags(&self, metrics: &Metrics, flags: &str) -> IntCounter {
        let mut l: Vec<&str> = self.labels.iter().map(String::as_str).collect();
        l[9] = flags;
        metrics.closed.with_label_values(&l)
    }
}

impl Metrics {
    /// A fresh registry with every family registered.
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry.register(Box::new(c.clone())).expect("unique metric");
            c
        };
        let m = Metrics {
            opened: counter(
                "istio_tcp_connections_opened_total",
                "TCP connections opened",
                ISTIO_TCP_LABELS,
            ),
            closed: counter(
                "istio_tcp_connections_closed_total",
                "TCP connections closed",
                ISTIO_TCP_LABELS,
            ),
            sent: counter(
                "istio_tcp_sent_bytes_total",
                "Bytes sent to the client (response direction)",
                ISTIO_TCP_LABELS,
            ),
            received: counter(
                "istio_tcp_received_bytes_total",
                "Bytes received from the client (request direction)",
                ISTIO_TCP_LABELS,
            ),
            rejected: counter(
                "isthmus_gateway_rejected_connections_total",
                "Connections closed before reaching an endpoint, by reason",
                &["reason"],
            ),
            connect_failures: counter(
                "isthmus_gateway_upstream_connect_failures_total",
                "Failed connection attempts to endpoints",
                &["destination_service", "endpoint", "reason"],
            ),
            ejections: counter(
                "isthmus_gateway_outlier_ejections_total",
                "Endpoints ejected by outlier detection",
                &["destination_service", "endpoint"],
            ),
            reloads: counter(
                "isthmus_gateway_config_reloads_total",
                "Routes file reloads, by result",
                &["result"],
            ),
            active: {
                let g = IntGaugeVec::new(
                    Opts::new("isthmus_gateway_active_connections", "Connections open now, per SNI"),
                    &["sni", "destination_service"],
                )
                .expect("valid metric");
                registry.register(Box::new(g.clone())).expect("unique metric");
                g
            },
            open_connections: IntGauge::new("isthmus_gateway_open_connections", "Connections open now").expect("valid"),
            config_ok: IntGauge::new("isthmus_gateway_config_ok", "1 when the last routes file load worked")
                .expect("valid"),
            xds_connected: IntGauge::new("isthmus_gateway_xds_connected", "1 while the xDS stream is up")
                .expect("valid"),
            xds_nacks: IntCounter::new("isthmus_gateway_xds_nacks_total", "xDS responses refused").expect("valid"),
            registry,
        };
        let plain: [Box<dyn prometheus::core::Collector>; 4] = [
            Box::new(m.open_connections.clone()),
            Box::new(m.config_ok.clone()),
            Box::new(m.xds_connected.clone()),
            Box::new(m.xds_nacks.clone()),
        ];
        for c in plain {
            m.registry.register(c).expect("unique metric");
        }
        m
    }

    /// Handles for connections of `service` to endpoints in `destination_cluster`.
    pub fn tcp(&self, source: &Source, service: &str, destination_cluster: &ClusterId) -> TcpCounters {
        let (name, namespace) = mesh_vocab::Hostname::parse(service)
            .ok()
            .and_then(|h| h.service_and_namespace().map(|(n, ns)| (n.to_owned(), ns.to_owned())))
            .unwrap_or_else(|| (service.to_owned(), "unknown".to_owned()));
        let labels: Vec<String> = [
            "source",
            "istio-eastwestgateway",
            "istio-system",
            source.cluster.as_str(),
            service,
            &name,
            &namespace,
            destination_cluster.as_str(),
            "tcp",
            "-",
            // The gateway passes mTLS through and cannot tell; Istio says "unknown" too.
            "unknown",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let l: Vec<&str> = labels.iter().map(String::as_str).collect();
        TcpCounters {
            opened: self.opened.with_label_values(&l),
            closed: self.closed.with_label_values(&l),
            sent: self.sent.with_label_values(&l),
            received: self.received.with_label_values(&l),
            labels,
        }
    }

    /// The per-SNI open-connections gauge.
    pub fn active(&self, sni: &str, service: &str) -> IntGauge {
        self.active.with_label_values(&[sni, service])
    }

    /// Counts a connection closed before it reached an endpoint.
    pub fn reject(&self, reason: &str) {
        self.rejected.with_label_values(&[reason]).inc();
    }

    /// Counts a failed attempt to reach an endpoint.
    pub fn connect_failure(&self, service: &str, endpoint: &str, reason: &str) {
        self.connect_failures
            .with_label_values(&[service, endpoint, reason])
            .inc();
    }

    /// Counts an outlier ejection.
    pub fn ejection(&self, service: &str, endpoint: &str) {
        self.ejections.with_label_values(&[service, endpoint]).inc();
    }

    /// Counts an xDS response the gateway refused.
    pub fn xds_nack(&self) {
        self.xds_nacks.inc();
    }

    /// Counts a reload of the routes file.
    pub fn reload(&self, ok: bool) {
        self.reloads
            .with_label_values(&[if ok { "success" } else { "error" }])
            .inc();
        self.config_ok.set(i64::from(ok));
    }

    /// The Prometheus text exposition of every family.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus::TextEncoder::new()
            .encode_utf8(&self.registry.gather(), &mut out)
            .expect("text encoding into a String cannot fail");
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
