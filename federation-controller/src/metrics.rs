//! The controller's Prometheus metrics, in istiod's names so existing dashboards
//! and alerts (`pilot_xds_pushes`, `pilot_total_xds_rejects`,
//! `pilot_proxy_convergence_time`) work unchanged.

use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGauge, Opts, Registry};

/// Every metric of one controller.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pushes: IntCounterVec,
    rejects: IntCounterVec,
    /// Proxies connected over ADS now (istiod's `pilot_xds`).
    pub connected: IntGauge,
    /// From a state change to a proxy's ACK of it, in seconds.
    pub convergence: Histogram,
    /// The version being served.
    pub version: IntGauge,
    refusals: IntCounterVec,
    /// Per served cluster: 1 while it is silent but kept (stale), 0 while fresh.
    cluster_stale: prometheus::IntGaugeVec,
    /// CSRs received (istiod's `citadel_server_csr_count`).
    pub csrs: prometheus::IntCounter,
    /// SVIDs issued (istiod's `citadel_server_success_cert_issuance_count`).
    pub issued: prometheus::IntCounter,
    csr_refusals: IntCounterVec,
    /// Unix time at which the CA root expires (istiod's `citadel_server_root_cert_expiry_timestamp`).
    pub root_expiry: IntGauge,
    bundle_failures: IntCounterVec,
    bundle_updated: prometheus::IntGaugeVec,
    /// Service `VIP:port`s claimed by more than one host in one cluster's
    /// proxies' view, summed over the served clusters
    /// (istiod's `pilot_conflict_outbound_listener_tcp_over_current_tcp`).
    pub vip_conflicts: IntGauge,
    gateway_resolution_failures: IntCounterVec,
    endpoint_resolution_failures: IntCounterVec,
}

/// istiod's short type names, for the `type` label.
pub fn short_type(type_url: &str) -> &'static str {
    match type_url.rsplit('.').next() {
        Some("Cluster") => "cds",
        Some("ClusterLoadAssignment") => "eds",
        Some("Listener") => "lds",
        Some("RouteConfiguration") => "rds",
        _ => "other",
    }
}

impl Metrics {
    /// A fresh registry with every family registered.
    pub fn new() -> Self {
        let registry = Registry::new();
        let pushes = IntCounterVec::new(Opts::new("pilot_xds_pushes", "xDS responses sent, by type"), &["type"])
            .expect("valid metric");
        let rejects = IntCounterVec::new(
            Opts::new("pilot_total_xds_rejects", "xDS responses NACKed by proxies, by type"),
            &["type"],
        )
        .expect("valid metric");
        let connected = IntGauge::new("pilot_xds", "Proxies connected over ADS").expect("valid metric");
        // Finer than istiod's buckets at the low end: the target is well under 100 ms.
        let buckets = vec![0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 3.0, 10.0, 30.0];
        let convergence = Histogram::with_opts(
            HistogramOpts::new(
                "pilot_proxy_convergence_time",
                "From a state change to a proxy's ACK, seconds",
            )
            .buckets(buckets),
        )
        .expect("valid metric");
        let version = IntGauge::new("isthmus_controller_version", "The state version being served").expect("valid");
        let refusals = IntCounterVec::new(
            Opts::new(
                "isthmus_controller_remote_cluster_refusals_total",
                "Remote clusters refused, by reason",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let cluster_stale = prometheus::IntGaugeVec::new(
            Opts::new(
                "isthmus_controller_cluster_stale",
                "Per served cluster: 1 while silent but kept, 0 while fresh",
            ),
            &["cluster"],
        )
        .expect("valid metric");
        let csrs = prometheus::IntCounter::new("citadel_server_csr_count", "Certificate signing requests received")
            .expect("valid metric");
        let issued = prometheus::IntCounter::new("citadel_server_success_cert_issuance_count", "Certificates issued")
            .expect("valid metric");
        let csr_refusals = IntCounterVec::new(
            Opts::new(
                "isthmus_ca_csr_refusals_total",
                "Certificate signing requests refused, by reason",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let root_expiry = IntGauge::new(
            "citadel_server_root_cert_expiry_timestamp",
            "Unix time at which the CA root expires",
        )
        .expect("valid metric");
        let bundle_failures = IntCounterVec::new(
            Opts::new(
                "isthmus_trust_bundle_fetch_failures_total",
                "Failed fetches of a federated trust domain's bundle (the last bundle is kept)",
            ),
            &["trust_domain", "reason"],
        )
        .expect("valid metric");
        let bundle_updated = prometheus::IntGaugeVec::new(
            Opts::new(
                "isthmus_trust_bundle_last_fetch_timestamp_seconds",
                "Unix time of the last successful fetch of a federated trust domain's bundle",
            ),
            &["trust_domain"],
        )
        .expect("valid metric");
        let vip_conflicts = IntGauge::new(
            "pilot_conflict_outbound_listener_tcp_over_current_tcp",
            "Service VIP:ports claimed by more than one host in one cluster's proxies' view (one is kept), summed over clusters",
        )
        .expect("valid metric");
        let gateway_resolution_failures = IntCounterVec::new(
            Opts::new(
                "isthmus_controller_gateway_resolution_failures_total",
                "Failed lookups of a gateway's host name (its last addresses are kept)",
            ),
            &["hostname"],
        )
        .expect("valid metric");
        let endpoint_resolution_failures = IntCounterVec::new(
            Opts::new(
                "isthmus_controller_endpoint_resolution_failures_total",
                "Failed lookups of a ServiceEntry endpoint's DNS name (its last addresses are kept)",
            ),
            &["hostname"],
        )
        .expect("valid metric");
        let all: [Box<dyn prometheus::core::Collector>; 16] = [
            Box::new(gateway_resolution_failures.clone()),
            Box::new(endpoint_resolution_failures.clone()),
            Box::new(vip_conflicts.clone()),
            Box::new(bundle_failures.clone()),
            Box::new(bundle_updated.clone()),
            Box::new(csrs.clone()),
            Box::new(issued.clone()),
            Box::new(csr_refusals.clone()),
            Box::new(root_expiry.clone()),
            Box::new(cluster_stale.clone()),
            Box::new(refusals.clone()),
            Box::new(pushes.clone()),
            Box::new(rejects.clone()),
            Box::new(connected.clone()),
            Box::new(convergence.clone()),
            Box::new(version.clone()),
        ];
        for c in all {
            registry.register(c).expect("unique metric");
        }
        Metrics {
            registry,
            pushes,
            rejects,
            connected,
            convergence,
            version,
            refusals,
            cluster_stale,
            csrs,
            issued,
            csr_refusals,
            root_expiry,
            bundle_failures,
            bundle_updated,
            vip_conflicts,
            gateway_resolution_failures,
            endpoint_resolution_failures,
        }
    }

    /// Counts a failed lookup of a gateway's host name.
    pub fn gateway_resolution_failed(&self, hostname: &str) {
        self.gateway_resolution_failures.with_label_values(&[hostname]).inc();
    }

    /// Counts a failed lookup of a ServiceEntry endpoint's DNS name.
    pub fn endpoint_resolution_failed(&self, hostname: &str) {
        self.endpoint_resolution_failures.with_label_values(&[hostname]).inc();
    }

    /// Registers a family that another part owns (write-back, leader election).
    pub fn register(&self, c: Box<dyn prometheus::core::Collector>) -> prometheus::Result<()> {
        self.registry.register(c)
    }

    /// Records a successful bundle fetch from `trust_domain`.
    pub fn bundle_fetched(&self, trust_domain: &str) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.bundle_updated.with_label_values(&[trust_domain]).set(now as i64);
    }

    /// Counts a failed bundle fetch from `trust_domain`.
    pub fn bundle_fetch_failed(&self, trust_domain: &str, reason: &str) {
        self.bundle_failures.with_label_values(&[trust_domain, reason]).inc();
    }

    /// Counts a refused CSR (bad credential, malformed, wrong identity, extra names…).
    pub fn csr_refusal(&self, reason: &str) {
        self.csr_refusals.with_label_values(&[reason]).inc();
    }

    /// Shows which clusters a snapshot serves and whether each is stale; clusters
    /// no longer served (withdrawn, removed) leave the series.
    pub fn clusters(&self, served: &[(String, bool)]) {
        self.cluster_stale.reset();
        for (cluster, stale) in served {
            self.cluster_stale.with_label_values(&[cluster]).set(i64::from(*stale));
        }
    }

    /// Counts a response sent.
    pub fn push(&self, type_url: &str) {
        self.pushes.with_label_values(&[short_type(type_url)]).inc();
    }

    /// Counts a remote cluster refused.
    pub fn refusal(&self, reason: &str) {
        self.refusals.with_label_values(&[reason]).inc();
    }

    /// Counts a NACK.
    pub fn reject(&self, type_url: &str) {
        self.rejects.with_label_values(&[short_type(type_url)]).inc();
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus::TextEncoder::new()
            .encode_utf8(&self.registry.gather(), &mut out)
            .expect("encode into a String");
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
