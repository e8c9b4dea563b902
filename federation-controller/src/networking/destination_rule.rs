//! Istio's `DestinationRule`: the subsets of a host (endpoints by label) and the
//! traffic policy of connections to it (balancing, connection pool, outlier
//! detection, TLS), service-wide, per port and per subset.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};

use super::virtual_service::{PortSelector, at_least_1ms};
use super::{Duration, ValidationError, percent_in_range, port_in_range};

/// A `DestinationRule` object.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DestinationRule {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: DestinationRuleSpec,
}

/// What a DestinationRule says.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct DestinationRuleSpec {
    /// The host it applies to (a short name is a Service of the object's namespace).
    pub host: String,
    pub traffic_policy: Option<TrafficPolicy>,
    pub subsets: Vec<Subset>,
    pub export_to: Vec<String>,
}

/// A named set of the host's endpoints: those carrying all of `labels`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Subset {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// Overrides the rule's policy for this subset.
    pub traffic_policy: Option<TrafficPolicy>,
}

/// The policy of traffic to a host (or one of its ports or subsets).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct TrafficPolicy {
    pub load_balancer: Option<LoadBalancerSettings>,
    pub connection_pool: Option<ConnectionPoolSettings>,
    pub outlier_detection: Option<OutlierDetection>,
    pub tls: Option<ClientTlsSettings>,
    pub port_level_settings: Vec<PortTrafficPolicy>,
}

/// A policy for one port, overriding the host's.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct PortTrafficPolicy {
    pub port: Option<PortSelector>,
    pub load_balancer: Option<LoadBalancerSettings>,
    pub connection_pool: Option<ConnectionPoolSettings>,
    pub outlier_detection: Option<OutlierDetection>,
    pub tls: Option<ClientTlsSettings>,
}

/// How requests are spread over endpoints.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct LoadBalancerSettings {
    pub simple: Option<SimpleLb>,
    pub consistent_hash: Option<ConsistentHash>,
    pub locality_lb_setting: Option<LocalityLbSetting>,
    pub warmup: Option<Warmup>,
    pub warmup_duration_secs: Option<Duration>,
}

/// Istio's simple balancing algorithms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SimpleLb {
    Unspecified,
    /// Istio's alias of `LEAST_REQUEST`.
    LeastConn,
    Random,
    Passthrough,
    RoundRobin,
    LeastRequest,
}

/// Session affinity by a hash of the request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ConsistentHash {
    pub http_header_name: Option<String>,
    pub http_cookie: Option<HttpCookie>,
    pub use_source_ip: Option<bool>,
    pub http_query_parameter_name: Option<String>,
    pub minimum_ring_size: Option<u64>,
}

/// The cookie hashed on (and, with a TTL, generated).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(default)]
pub struct HttpCookie {
    pub name: String,
    pub path: Option<String>,
    pub ttl: Option<Duration>,
}

/// Locality-aware balancing: weights by locality, or failover order.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct LocalityLbSetting {
    pub distribute: Vec<Distribute>,
    pub failover: Vec<Failover>,
    pub failover_priority: Vec<String>,
    pub enabled: Option<bool>,
}

/// Traffic from `from` is spread over localities with these percentages.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Distribute {
    pub from: String,
    pub to: BTreeMap<String, u32>,
}

/// Where traffic from region `from` fails over to.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Failover {
    pub from: String,
    pub to: String,
}

/// Slow start of new endpoints.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Warmup {
    pub duration: Option<Duration>,
    pub minimum_percent: Option<f64>,
    pub aggression: Option<f64>,
}

/// Connection limits (Envoy's circuit breakers).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ConnectionPoolSettings {
    pub tcp: Option<TcpSettings>,
    pub http: Option<HttpSettings>,
}

/// TCP connection limits.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct TcpSettings {
    pub max_connections: Option<u32>,
    pub connect_timeout: Option<Duration>,
}

/// HTTP request limits.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct HttpSettings {
    pub http1_max_pending_requests: Option<u32>,
    pub http2_max_requests: Option<u32>,
    pub max_requests_per_connection: Option<u32>,
    pub max_retries: Option<u32>,
    pub idle_timeout: Option<Duration>,
    /// Whether HTTP/1.1 requests ride HTTP/2 to the destination.
    pub h2_upgrade_policy: Option<H2UpgradePolicy>,
}

/// Istio's `ConnectionPoolSettings.HTTPSettings.H2UpgradePolicy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum H2UpgradePolicy {
    /// The mesh's default: our sidecars' `--h2-upgrade` (on unless set off),
    /// Istio's `DO_NOT_UPGRADE` for Envoy.
    Default,
    DoNotUpgrade,
    Upgrade,
}

/// Passive health checking: endpoints that keep failing are ejected for a while.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct OutlierDetection {
    pub consecutive_5xx_errors: Option<u32>,
    pub consecutive_gateway_errors: Option<u32>,
    pub consecutive_local_origin_failures: Option<u32>,
    pub split_external_local_origin_errors: bool,
    pub interval: Option<Duration>,
    pub base_ejection_time: Option<Duration>,
    pub max_ejection_percent: Option<u32>,
    pub min_health_percent: Option<u32>,
    /// Deprecated alias of `consecutiveGatewayErrors`.
    pub consecutive_errors: Option<u32>,
}

/// TLS to the upstream; `ISTIO_MUTUAL` is the mesh's own mTLS.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ClientTlsSettings {
    pub mode: Option<TlsMode>,
    pub sni: Option<String>,
    pub subject_alt_names: Vec<String>,
    pub credential_name: Option<String>,
    /// Files on the proxy's machine (SIMPLE and MUTUAL).
    pub ca_certificates: Option<String>,
    pub client_certificate: Option<String>,
    pub private_key: Option<String>,
    pub insecure_skip_verify: Option<bool>,
}

/// Istio's client TLS modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TlsMode {
    Disable,
    Simple,
    Mutual,
    IstioMutual,
}

impl DestinationRule {
    /// Istio's rules for a DestinationRule (webhook and CEL), those this controller relies on.
    pub fn validate(&self) -> Result<(), ValidationError> {
        let spec = &self.spec;
        if spec.host.is_empty() {
            return Err(ValidationError::new("spec.host", "Required value"));
        }
        if let Some(p) = &spec.traffic_policy {
            p.validate("spec.trafficPolicy")?;
        }
        let mut names = BTreeSet::new();
        for (i, s) in spec.subsets.iter().enumerate() {
            let f = format!("spec.subsets[{i}]");
            if s.name.is_empty() {
                return Err(ValidationError::new(format!("{f}.name"), "Required value"));
            }
            if !names.insert(&s.name) {
                return Err(ValidationError::new(
                    format!("{f}.name"),
                    format!("Duplicate value: \"{}\"", s.name),
                ));
            }
            if let Some(p) = &s.traffic_policy {
                p.validate(&format!("{f}.trafficPolicy"))?;
            }
        }
        Ok(())
    }
}

impl TrafficPolicy {
    fn validate(&self, f: &str) -> Result<(), ValidationError> {
        validate_parts(f, &self.load_balancer, &self.outlier_detection)?;
        validate_tls(f, &self.tls)?;
        for (i, p) in self.port_level_settings.iter().enumerate() {
            let pf = format!("{f}.portLevelSettings[{i}]");
            match p.port {
                Some(port) => port_in_range(&format!("{pf}.port.number"), i64::from(port.number))?,
                None => return Err(ValidationError::new(format!("{pf}.port"), "Required value")),
            }
            validate_parts(&pf, &p.load_balancer, &p.outlier_detection)?;
            validate_tls(&pf, &p.tls)?;
        }
        Ok(())
    }
}

/// Istio's webhook: MUTUAL needs a client certificate and its key, unless a
/// `credentialName` holds them.
fn validate_tls(f: &str, tls: &Option<ClientTlsSettings>) -> Result<(), ValidationError> {
    let Some(tls) = tls.as_ref().filter(|t| t.mode == Some(TlsMode::Mutual)) else {
        return Ok(());
    };
    if tls.credential_name.as_deref().is_some_and(|c| !c.is_empty()) {
        return Ok(());
    }
    let given = |v: &Option<String>| v.as_deref().is_some_and(|v| !v.is_empty());
    if !given(&tls.client_certificate) {
        return Err(ValidationError::new(
            format!("{f}.tls.clientCertificate"),
            "client certificate required for mutual tls",
        ));
    }
    if !given(&tls.private_key) {
        return Err(ValidationError::new(
            format!("{f}.tls.privateKey"),
            "private key required for mutual tls",
        ));
    }
    Ok(())
}

fn validate_parts(
    f: &str,
    lb: &Option<LoadBalancerSettings>,
    outlier: &Option<OutlierDetection>,
) -> Result<(), ValidationError> {
    if let Some(lb) = lb {
        let f = format!("{f}.loadBalancer");
        if lb.simple.is_some() && lb.consistent_hash.is_some() {
            return Err(ValidationError::new(
                &f,
                "only one of simple or consistentHash may be set",
            ));
        }
        if let Some(w) = &lb.warmup {
            let f = format!("{f}.warmup");
            match w.duration {
                None => return Err(ValidationError::new(format!("{f}.duration"), "Required value")),
                Some(d) => at_least_1ms(&format!("{f}.duration"), d)?,
            }
            if let Some(p) = w.minimum_percent
                && !(0.0..=100.0).contains(&p)
            {
                return Err(ValidationError::new(
                    format!("{f}.minimumPercent"),
                    format!("Invalid value: {p}: must be between 0 and 100"),
                ));
            }
            if let Some(a) = w.aggression
                && a < 1.0
            {
                return Err(ValidationError::new(
                    format!("{f}.aggression"),
                    format!("Invalid value: {a}: must be at least 1"),
                ));
            }
        }
        if let Some(l) = &lb.locality_lb_setting {
            let f = format!("{f}.localityLbSetting");
            if !l.distribute.is_empty() && !l.failover.is_empty() {
                return Err(ValidationError::new(
                    &f,
                    "can not simultaneously specify 'distribute' and 'failover'",
                ));
            }
            for (i, d) in l.distribute.iter().enumerate() {
                let sum: u32 = d.to.values().sum();
                if sum != 100 {
                    return Err(ValidationError::new(
                        format!("{f}.distribute[{i}].to"),
                        "total locality weight must be 100",
                    ));
                }
            }
        }
    }
    if let Some(o) = outlier {
        let f = format!("{f}.outlierDetection");
        for (name, d) in [("interval", o.interval), ("baseEjectionTime", o.base_ejection_time)] {
            if let Some(d) = d {
                at_least_1ms(&format!("{f}.{name}"), d)?;
            }
        }
        for (name, p) in [
            ("maxEjectionPercent", o.max_ejection_percent),
            ("minHealthPercent", o.min_health_percent),
        ] {
            if let Some(p) = p {
                percent_in_range(&format!("{f}.{name}"), f64::from(p))?;
            }
        }
    }
    Ok(())
}

impl DestinationRuleSpec {
    /// The subset named `name`.
    pub fn subset(&self, name: &str) -> Option<&Subset> {
        self.subsets.iter().find(|s| s.name == name)
    }
}

/// The policy that applies to `port` of `subset` (None: the service as a whole):
/// the rule's, overridden field by field by its `portLevelSettings` for the port,
/// overridden by the subset's own (and its port-level settings), as Istio merges them.
pub fn effective_policy(spec: &DestinationRuleSpec, subset: Option<&str>, port: u16) -> TrafficPolicy {
    let mut out = TrafficPolicy::default();
    let layers = [
        spec.traffic_policy.as_ref(),
        subset
            .and_then(|s| spec.subset(s))
            .and_then(|s| s.traffic_policy.as_ref()),
    ];
    for p in layers.into_iter().flatten() {
        overlay(
            &mut out,
            p.load_balancer.clone(),
            p.connection_pool.clone(),
            p.outlier_detection.clone(),
            p.tls.clone(),
        );
        if let Some(pl) = p
            .port_level_settings
            .iter()
            .find(|pl| pl.port.map(|n| n.number) == Some(u32::from(port)))
        {
            overlay(
                &mut out,
                pl.load_balancer.clone(),
                pl.connection_pool.clone(),
                pl.outlier_detection.clone(),
                pl.tls.clone(),
            );
        }
    }
    out
}

fn overlay(
    out: &mut TrafficPolicy,
    lb: Option<LoadBalancerSettings>,
    pool: Option<ConnectionPoolSettings>,
    outlier: Option<OutlierDetection>,
    tls: Option<ClientTlsSettings>,
) {
    out.load_balancer = lb.or(out.load_balancer.take());
    out.connection_pool = pool.or(out.connection_pool.take());
    out.outlier_detection = outlier.or(out.outlier_detection.take());
    out.tls = tls.or(out.tls.take());
}
