//! The gateway's routes file: services and their endpoints, in YAML.
//!
//! One YAML document per service, in Istio's field names so that a ServiceEntry
//! reader feels at home:
//!
//! ```yaml
//! host: reviews.default.svc.cluster.local
//! ports:
//!   - {name: http, port: 9080, targetPort: 9080}
//! subsets:
//!   - {name: v1, labels: {version: v1}}
//! loadBalancer: ROUND_ROBIN          # LEAST_CONN, RANDOM
//! connectTimeout: 2s
//! outlierDetection: {consecutiveLocalOriginFailures: 5, baseEjectionTime: 30s, maxEjectionPercent: 10}
//! endpoints:
//!   - address: 10.241.0.5
//!     ports: {http: 19080}           # per endpoint, by port name: overrides targetPort
//!     labels: {version: v1}
//!     weight: 1
//!     network: network1              # default: the gateway's own network
//!     cluster: cluster1              # default: the gateway's own cluster
//! ```
//!
//! Everything is checked once here; an error names the file, the document and the
//! field, and the caller keeps serving its last good config.

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use mesh_vocab::manifest::{self, ManifestError};
use mesh_vocab::{ClusterId, Hostname, NetworkId};
use serde::Deserialize;
use sidecar::balance::Policy;
use sidecar::outlier::OutlierPolicy;

/// A validated routes file.
#[derive(Debug, Clone, Default)]
pub struct RoutesFile {
    /// The services, in file order.
    pub services: Vec<Service>,
}

/// One service the gateway routes to.
#[derive(Debug, Clone)]
pub struct Service {
    pub host: Hostname,
    pub ports: Vec<ServicePort>,
    pub subsets: Vec<Subset>,
    pub load_balancer: Policy,
    pub connect_timeout: Option<Duration>,
    pub outlier: Option<OutlierPolicy>,
    pub endpoints: Vec<Endpoint>,
}

/// A port of a service.
#[derive(Debug, Clone)]
pub struct ServicePort {
    pub name: Option<String>,
    pub port: u16,
    pub target_port: u16,
}

/// A named subset of a service's endpoints, selected by labels.
#[derive(Debug, Clone)]
pub struct Subset {
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

/// One endpoint of a service.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub address: IpAddr,
    /// Per port name, the port this endpoint listens on.
    pub ports: BTreeMap<String, u16>,
    pub labels: BTreeMap<String, String>,
    pub weight: u32,
    pub network: Option<NetworkId>,
    pub cluster: Option<ClusterId>,
}

impl Service {
    /// The port endpoint `ep` listens on for service port `sp`.
    pub fn endpoint_port(&self, ep: &Endpoint, sp: &ServicePort) -> u16 {
        sp.name
            .as_ref()
            .and_then(|n| ep.ports.get(n))
            .copied()
            .unwrap_or(sp.target_port)
    }
}

impl Subset {
    /// Whether an endpoint with these labels belongs to the subset.
    pub fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        self.labels.iter().all(|(k, v)| labels.get(k) == Some(v))
    }
}

/// A routes file that cannot be used, and where (file, document, field).
pub type ConfigError = ManifestError;

/// Reads and validates a routes file.
pub fn load(path: &Path) -> Result<RoutesFile, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ManifestError::file(path, format!("cannot read: {e}")))?;
    parse(path, &text)
}

/// Parses and validates the text of a routes file named `path`.
pub fn parse(path: &Path, text: &str) -> Result<RoutesFile, ConfigError> {
    let mut services = Vec::new();
    let mut seen = HashSet::new();
    for (n, doc) in manifest::documents(path, text)? {
        let raw: RawService = manifest::typed(path, n, "", doc)?;
        let svc = raw
            .validate()
            .map_err(|(field, msg)| ManifestError::field(path, n, field, msg))?;
        for p in &svc.ports {
            if !seen.insert((svc.host.clone(), p.port)) {
                let msg = format!("{}:{} is already defined by an earlier document", svc.host, p.port);
                return Err(ManifestError::field(path, n, "ports", msg));
            }
        }
        services.push(svc);
    }
    // Nearly always a file caught half-written (truncated, not yet filled), which would
    // drop every route; a service with no endpoints says "none" on purpose.
    if services.is_empty() {
        let msg = "no service in the file (an empty routes file is refused: list a service with `endpoints: []` to route nothing)";
        return Err(ManifestError::file(path, msg));
    }
    Ok(RoutesFile { services })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawService {
    host: String,
    ports: Vec<RawPort>,
    #[serde(default)]
    subsets: Option<Vec<RawSubset>>,
    #[serde(default)]
    load_balancer: Option<String>,
    #[serde(default)]
    connect_timeout: Option<String>,
    #[serde(default)]
    outlier_detection: Option<RawOutlier>,
    /// `endpoints:` with nothing under it is YAML null: no endpoints, not an error.
    #[serde(default)]
    endpoints: Option<Vec<RawEndpoint>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawPort {
    #[serde(default)]
    name: Option<String>,
    port: u16,
    #[serde(default)]
    target_port: Option<u16>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSubset {
    name: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawOutlier {
    #[serde(default, alias = "consecutiveErrors")]
    consecutive_local_origin_failures: Option<u32>,
    #[serde(default)]
    interval: Option<String>,
    #[serde(default)]
    base_ejection_time: Option<String>,
    #[serde(default)]
    max_ejection_time: Option<String>,
    #[serde(default)]
    max_ejection_percent: Option<u8>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEndpoint {
    address: String,
    #[serde(default)]
    ports: BTreeMap<String, u16>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    weight: Option<u32>,
    #[serde(default)]
    network: Option<String>,
    #[serde(default)]
    cluster: Option<String>,
}

type FieldError = (String, String);

fn duration(field: &str, s: &str) -> Result<Duration, FieldError> {
    humantime::parse_duration(s).map_err(|e| {
        (
            field.to_owned(),
            format!("{s:?} is not a duration (like 500ms, 5s, 1m): {e}"),
        )
    })
}

impl RawService {
    fn validate(self) -> Result<Service, FieldError> {
        let host = Hostname::parse(&self.host).map_err(|e| ("host".to_owned(), e.to_string()))?;
        if self.ports.is_empty() {
            return Err(("ports".into(), "a service needs at least one port".into()));
        }
        let mut ports = Vec::new();
        let mut names = HashSet::new();
        let mut numbers = HashSet::new();
        for (i, p) in self.ports.into_iter().enumerate() {
            if p.port == 0 {
                return Err((format!("ports[{i}].port"), "port 0 is not a port".into()));
            }
            if p.target_port == Some(0) {
                return Err((format!("ports[{i}].targetPort"), "port 0 is not a port".into()));
            }
            if !numbers.insert(p.port) {
                return Err((format!("ports[{i}].port"), format!("port {} appears twice", p.port)));
            }
            if let Some(n) = &p.name
                && !names.insert(n.clone())
            {
                return Err((format!("ports[{i}].name"), format!("port name {n:?} appears twice")));
            }
            ports.push(ServicePort {
                target_port: p.target_port.unwrap_or(p.port),
                name: p.name,
                port: p.port,
            });
        }
        let mut subsets = Vec::new();
        for (i, s) in self.subsets.unwrap_or_default().into_iter().enumerate() {
            // The subset travels in the SNI, so it must be what the SNI grammar allows.
            mesh_vocab::IstioSni::new(host.clone(), ports[0].port, Some(&s.name))
                .map_err(|e| (format!("subsets[{i}].name"), e.to_string()))?;
            if subsets.iter().any(|o: &Subset| o.name == s.name) {
                return Err((
                    format!("subsets[{i}].name"),
                    format!("subset {:?} appears twice", s.name),
                ));
            }
            subsets.push(Subset {
                name: s.name.to_ascii_lowercase(),
                labels: s.labels,
            });
        }
        let load_balancer = match self.load_balancer.as_deref() {
            None => Policy::default(),
            Some(s) => Policy::from_istio_name(s).ok_or_else(|| {
                (
                    "loadBalancer".to_owned(),
                    format!("{s:?} is not one of ROUND_ROBIN, LEAST_CONN, LEAST_REQUEST, RANDOM"),
                )
            })?,
        };
        let connect_timeout = self
            .connect_timeout
            .as_deref()
            .map(|s| duration("connectTimeout", s))
            .transpose()?;
        if connect_timeout == Some(Duration::ZERO) {
            return Err(("connectTimeout".into(), "must be more than zero".into()));
        }
        let outlier = self.outlier_detection.map(RawOutlier::validate).transpose()?;
        let mut endpoints = Vec::new();
        for (i, e) in self.endpoints.unwrap_or_default().into_iter().enumerate() {
            let address = e.address.parse::<IpAddr>().map_err(|_| {
                (
                    format!("endpoints[{i}].address"),
                    format!("{:?} is not an IP address", e.address),
                )
            })?;
            for (name, port) in &e.ports {
                if !ports.iter().any(|p| p.name.as_deref() == Some(name)) {
                    return Err((
                        format!("endpoints[{i}].ports.{name}"),
                        format!("the service has no port named {name:?}"),
                    ));
                }
                if *port == 0 {
                    return Err((format!("endpoints[{i}].ports.{name}"), "port 0 is not a port".into()));
                }
            }
            if e.weight == Some(0) {
                return Err((format!("endpoints[{i}].weight"), "weight must be 1 or more".into()));
            }
            endpoints.push(Endpoint {
                address,
                ports: e.ports,
                labels: e.labels,
                weight: e.weight.unwrap_or(1),
                network: e.network.map(NetworkId::new),
                cluster: e.cluster.map(ClusterId::new),
            });
        }
        Ok(Service {
            host,
            ports,
            subsets,
            load_balancer,
            connect_timeout,
            outlier,
            endpoints,
        })
    }
}

impl RawOutlier {
    fn validate(self) -> Result<OutlierPolicy, FieldError> {
        let d = OutlierPolicy::default();
        let f = |name: &str| format!("outlierDetection.{name}");
        let dur = |name: &str, v: Option<String>, default: Duration| match v {
            None => Ok(default),
            Some(s) => duration(&f(name), &s),
        };
        let policy = OutlierPolicy {
            consecutive_failures: self.consecutive_local_origin_failures.unwrap_or(d.consecutive_failures),
            interval: dur("interval", self.interval, d.interval)?,
            base_ejection_time: dur("baseEjectionTime", self.base_ejection_time, d.base_ejection_time)?,
            max_ejection_time: dur("maxEjectionTime", self.max_ejection_time, d.max_ejection_time)?,
            max_ejection_percent: self.max_ejection_percent.unwrap_or(d.max_ejection_percent),
        };
        if policy.consecutive_failures == 0 {
            return Err((f("consecutiveLocalOriginFailures"), "must be 1 or more".into()));
        }
        if policy.max_ejection_percent > 100 {
            return Err((f("maxEjectionPercent"), "must be 0 to 100".into()));
        }
        if policy.interval.is_zero() {
            return Err((f("interval"), "must be more than zero".into()));
        }
        Ok(policy)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
host: reviews.default.svc.cluster.local
ports:
  - {name: http, port: 9080, targetPort: 9081}
subsets:
  - {name: v1, labels: {version: v1}}
loadBalancer: LEAST_CONN
connectTimeout: 250ms
outlierDetection: {consecutiveLocalOriginFailures: 2, baseEjectionTime: 1m}
endpoints:
  - {address: 127.0.0.1, labels: {version: v1}}
  - {address: "::1", ports: {http: 7000}, weight: 3, network: net2, cluster: c2}
---
host: ratings.default.svc.cluster.local
ports: [{port: 9080}]
---
"#;

    #[test]
    fn reads_services_and_their_defaults() {
        let f = parse(Path::new("routes.yaml"), GOOD).unwrap();
        assert_eq!(f.services.len(), 2);
        let s = &f.services[0];
        assert_eq!(s.load_balancer, Policy::LeastConn);
        assert_eq!(s.connect_timeout, Some(Duration::from_millis(250)));
        let o = s.outlier.as_ref().unwrap();
        assert_eq!(
            (o.consecutive_failures, o.base_ejection_time),
            (2, Duration::from_secs(60))
        );
        assert_eq!(s.endpoint_port(&s.endpoints[0], &s.ports[0]), 9081);
        assert_eq!(s.endpoint_port(&s.endpoints[1], &s.ports[0]), 7000);
        assert_eq!(s.endpoints[1].weight, 3);
        assert!(s.subsets[0].selects(&s.endpoints[0].labels));
        assert!(!s.subsets[0].selects(&s.endpoints[1].labels));
        assert_eq!(f.services[1].ports[0].target_port, 9080);
    }

    fn error_of(text: &str) -> String {
        parse(Path::new("/etc/gw/routes.yaml"), text).unwrap_err().to_string()
    }

    #[test]
    fn errors_name_file_document_and_field() {
        for empty in ["", "\n", "# nothing yet\n", "---\n"] {
            assert!(
                error_of(empty).starts_with("/etc/gw/routes.yaml: no service in the file"),
                "{empty:?}"
            );
        }
        let two = "host: a.b\nports: [{port: 1}]\n---\n";
        assert_eq!(
            error_of(&format!(
                "{two}host: x.y\nports: [{{port: 80}}]\nendpoints: [{{address: 1.2.3.4, weight: 0}}]"
            )),
            "/etc/gw/routes.yaml: document 2: field `endpoints[0].weight`: weight must be 1 or more"
        );
        let e = error_of("host: x.y\nports: [{port: 80}]\nendpoints: [{address: 1.2.3.4, wieght: 2}]");
        assert!(
            e.starts_with("/etc/gw/routes.yaml: document 1: field `endpoints[0]"),
            "{e}"
        );
        assert!(e.contains("wieght"), "{e}");
        let e = error_of("host: x.y\nports: [{port: seventy}]");
        assert!(
            e.starts_with("/etc/gw/routes.yaml: document 1: field `ports[0].port`"),
            "{e}"
        );
        assert_eq!(
            error_of("host: x_y\nports: [{port: 80}]"),
            "/etc/gw/routes.yaml: document 1: field `host`: host name label \"x_y\" may only hold letters, digits and '-', and may not start or end with '-'"
        );
        assert!(
            error_of("host: x.y\nports: [{port: 80}]\nendpoints: [{address: 1.2.3.4, ports: {grpc: 1}}]")
                .contains("field `endpoints[0].ports.grpc`: the service has no port named \"grpc\"")
        );
        assert!(error_of("host: x.y\nports: [{port: 80}]\nloadBalancer: FASTEST").contains("field `loadBalancer`"));
        assert!(error_of("host: x.y\nports: [{port: 80}]\nsubsets: [{name: v_1}]").contains("field `subsets[0].name`"));
        assert!(
            error_of(&format!("{two}host: a.b\nports: [{{port: 1}}]"))
                .contains("document 2: field `ports`: a.b:1 is already defined")
        );
        assert!(error_of("host: [unclosed").contains("not valid YAML"));
        assert!(error_of("host: x.y\nports: [{port: 80}]\nconnectTimeout: soon").contains("field `connectTimeout`"));
    }
}
