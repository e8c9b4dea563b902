//! The routing table: for each server name the gateway accepts, the endpoints on
//! its own network that serve it.
//!
//! A table is immutable once built. A reload builds a new one and swaps it in
//! whole; connections already open keep the route they started with, and
//! endpoint health carries over to the new table by address.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mesh_vocab::{ClusterId, IstioSni};
use prometheus::IntGauge;
use serde_json::json;
use sidecar::balance::{Balancer, Policy};
use sidecar::outlier::{OutlierDetector, OutlierPolicy};

use crate::config::RoutesFile;
use crate::metrics::{Metrics, Source, TcpCounters};
use crate::settings::Settings;

/// What routes are built from, besides the command line: the latest good routes
/// file and the latest routes from the controller.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    pub file: Option<RoutesFile>,
    pub xds: Vec<XdsRoute>,
}

/// A route as the controller sends it: cluster `outbound|PORT|SUBSET|HOST`
/// turned into its SNI, with the endpoints on this gateway's network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XdsRoute {
    pub sni: String,
    pub service: String,
    pub subset: Option<String>,
    pub endpoints: Vec<(SocketAddr, ClusterId, u32)>,
}

/// Every route the gateway knows, by lowercased SNI.
pub struct RouteTable {
    routes: HashMap<String, Arc<Route>>,
}

/// Where connections for one SNI go.
pub struct Route {
    /// The SNI, lowercased.
    pub sni: String,
    /// `destination_service`: the service host, or the SNI itself for a static
    /// route whose name is not in Istio's form.
    pub service: String,
    /// The subset named in the SNI.
    pub subset: Option<String>,
    /// Endpoints on this gateway's network (may be empty: a known name, nothing to serve it).
    pub endpoints: Vec<Endpoint>,
    /// Chooses among `endpoints`.
    pub balancer: Balancer,
    /// Health of `endpoints`, by index.
    pub outlier: OutlierDetector,
    /// Timeout of one connection attempt.
    pub connect_timeout: Duration,
    /// Open connections on this route.
    pub active: IntGauge,
}

/// One endpoint of a route.
pub struct Endpoint {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its cluster (`destination_cluster`).
    pub cluster: ClusterId,
    /// Its load-balancing weight.
    pub weight: u32,
    /// Metric handles for connections to it.
    pub counters: TcpCounters,
}

impl RouteTable {
    /// The route for a server name (already lowercased by the ClientHello reader).
    pub fn get(&self, sni: &str) -> Option<&Arc<Route>> {
        self.routes.get(sni)
    }

    /// Number of routes.
    pub fn len(&self) -> usize {
        self.routes.len()
    }

    /// Whether there are no routes.
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// The table as JSON, for the admin endpoint: routes, endpoints and their health.
    pub fn dump(&self) -> serde_json::Value {
        let mut names: Vec<&String> = self.routes.keys().collect();
        names.sort();
        let routes: Vec<_> = names
            .into_iter()
            .map(|sni| {
                let r = &self.routes[sni];
                json!({
                    "sni": r.sni,
                    "destination_service": r.service,
                    "subset": r.subset,
                    "load_balancer": r.balancer.policy().istio_name(),
                    "connect_timeout_ms": r.connect_timeout.as_millis() as u64,
                    "active_connections": r.active.get(),
                    "endpoints": r.endpoints.iter().enumerate().map(|(i, e)| json!({
                        "address": e.addr.to_string(),
                        "cluster": e.cluster.as_str(),
                        "weight": e.weight,
                        "active_connections": r.balancer.active(i),
                        "healthy": r.outlier.is_available(i),
                        "ejected_for_ms": r.outlier.ejected_for(i).map(|d| d.as_millis() as u64),
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        json!({ "routes": routes })
    }

    /// Builds the table from the command line's static routes, the routes file
    /// and the routes from xDS, keeping the health of endpoints that `previous`
    /// already had. Later sources win for the same SNI.
    pub fn build(
        settings: &Settings,
        sources: &Sources,
        metrics: &Metrics,
        previous: Option<&RouteTable>,
    ) -> RouteTable {
        let file = sources.file.as_ref();
        let source = Source {
            cluster: settings.cluster.clone(),
        };
        let mut specs: HashMap<String, Spec> = HashMap::new();

        for r in &settings.static_routes {
            let spec = specs.entry(r.sni.clone()).or_insert_with(|| Spec {
                service: IstioSni::parse(&r.sni).map_or_else(|_| r.sni.clone(), |s| s.host().to_string()),
                subset: None,
                policy: Policy::RoundRobin,
                outlier: OutlierPolicy::default(),
                connect_timeout: settings.connect_timeout,
                endpoints: Vec::new(),
            });
            spec.endpoints.push((r.endpoint, settings.cluster.clone(), 1));
        }

        for svc in file.map(|f| f.services.as_slice()).unwrap_or_default() {
            let own_network = |n: &Option<mesh_vocab::NetworkId>| n.as_ref().is_none_or(|n| *n == settings.network);
            for port in &svc.ports {
                let subsets = std::iter::once(None).chain(svc.subsets.iter().map(Some));
                for subset in subsets {
                    let sni = IstioSni::new(svc.host.clone(), port.port, subset.map(|s| s.name.as_str()))
                        .expect("validated with the routes file")
                        .to_string();
                    let endpoints = svc
                        .endpoints
                        .iter()
                        .filter(|e| own_network(&e.network))
                        .filter(|e| subset.is_none_or(|s| s.selects(&e.labels)))
                        .map(|e| {
                            let addr = SocketAddr::new(e.address, svc.endpoint_port(e, port));
                            (
                                addr,
                                e.cluster.clone().unwrap_or_else(|| settings.cluster.clone()),
                                e.weight,
                            )
                        })
                        .collect();
                    let spec = Spec {
                        service: svc.host.to_string(),
                        subset: subset.map(|s| s.name.clone()),
                        policy: svc.load_balancer,
                        outlier: svc.outlier.clone().unwrap_or_default(),
                        connect_timeout: svc.connect_timeout.unwrap_or(settings.connect_timeout),
                        endpoints,
                    };
                    if specs.insert(sni.clone(), spec).is_some() {
                        tracing::warn!(%sni, "the routes file replaces a --route for the same SNI");
                    }
                }
            }
        }

        for r in &sources.xds {
            let spec = Spec {
                service: r.service.clone(),
                subset: r.subset.clone(),
                policy: Policy::RoundRobin,
                outlier: OutlierPolicy::default(),
                connect_timeout: settings.connect_timeout,
                endpoints: r.endpoints.clone(),
            };
            if specs.insert(r.sni.clone(), spec).is_some() {
                tracing::warn!(
                    sni = r.sni,
                    "xDS replaces a route of the command line or the routes file"
                );
            }
        }

        let routes = specs
            .into_iter()
            .map(|(sni, spec)| {
                let route = spec.into_route(&sni, metrics, &source);
                if let Some(old) = previous.and_then(|p| p.routes.get(&sni)) {
                    for (i, e) in route.endpoints.iter().enumerate() {
                        if let Some(j) = old.endpoints.iter().position(|o| o.addr == e.addr) {
                            route.outlier.inherit(i, &old.outlier, j);
                        }
                    }
                }
                (sni, Arc::new(route))
            })
            .collect();
        RouteTable { routes }
    }
}

/// A route before its runtime parts (balancer, health, metric handles) exist.
struct Spec {
    service: String,
    subset: Option<String>,
    policy: Policy,
    outlier: OutlierPolicy,
    connect_timeout: Duration,
    endpoints: Vec<(SocketAddr, ClusterId, u32)>,
}

impl Spec {
    fn into_route(self, sni: &str, metrics: &Metrics, source: &Source) -> Route {
        let weights: Vec<u32> = self.endpoints.iter().map(|e| e.2).collect();
        Route {
            sni: sni.to_owned(),
            balancer: Balancer::new(self.policy, &weights),
            outlier: OutlierDetector::new(self.outlier, self.endpoints.len()),
            active: metrics.active(sni, &self.service),
            endpoints: self
                .endpoints
                .into_iter()
                .map(|(addr, cluster, weight)| Endpoint {
                    counters: metrics.tcp(source, &self.service, &cluster),
                    addr,
                    cluster,
                    weight,
                })
                .collect(),
            service: self.service,
            subset: self.subset,
            connect_timeout: self.connect_timeout,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;
    use clap::Parser;
    use std::path::Path;

    fn settings() -> Settings {
        let a = crate::settings::Args::try_parse_from([
            "gw",
            "--network",
            "net1",
            "--cluster",
            "c1",
            "--route",
            "outbound_.9080_._.static.default.svc.cluster.local=127.0.0.1:1",
        ])
        .unwrap();
        Settings::from_args(a, None).unwrap()
    }

    fn sources(file: config::RoutesFile) -> Sources {
        Sources {
            file: Some(file),
            xds: vec![],
        }
    }

    const FILE: &str = r#"
host: reviews.default.svc.cluster.local
ports: [{name: http, port: 9080, targetPort: 9081}]
subsets: [{name: v2, labels: {version: v2}}]
endpoints:
  - {address: 10.0.0.1, labels: {version: v1}}
  - {address: 10.0.0.2, labels: {version: v2}, ports: {http: 7000}, cluster: c2}
  - {address: 10.9.0.1, labels: {version: v2}, network: net9}
"#;

    #[test]
    fn routes_only_to_own_network_and_subset_with_target_ports() {
        let file = config::parse(Path::new("f.yaml"), FILE).unwrap();
        let t = RouteTable::build(&settings(), &sources(file), &Metrics::new(), None);
        assert_eq!(t.len(), 3);
        let all = t.get("outbound_.9080_._.reviews.default.svc.cluster.local").unwrap();
        let addrs: Vec<String> = all.endpoints.iter().map(|e| e.addr.to_string()).collect();
        assert_eq!(addrs, ["10.0.0.1:9081", "10.0.0.2:7000"]);
        assert_eq!(all.endpoints[1].cluster.as_str(), "c2");
        let v2 = t.get("outbound_.9080_.v2_.reviews.default.svc.cluster.local").unwrap();
        assert_eq!(v2.endpoints.len(), 1);
        assert_eq!(v2.subset.as_deref(), Some("v2"));
        let st = t.get("outbound_.9080_._.static.default.svc.cluster.local").unwrap();
        assert_eq!(st.service, "static.default.svc.cluster.local");
        assert!(t.get("outbound_.9081_._.reviews.default.svc.cluster.local").is_none());
    }

    #[test]
    fn health_carries_over_by_address() {
        let file = config::parse(Path::new("f.yaml"), FILE).unwrap();
        let m = Metrics::new();
        let old = RouteTable::build(&settings(), &sources(file), &m, None);
        let r = old.get("outbound_.9080_._.reviews.default.svc.cluster.local").unwrap();
        for _ in 0..5 {
            r.outlier.record_failure(1);
        }
        assert!(!r.outlier.is_available(1));
        let swapped = FILE.replace("  - {address: 10.0.0.1, labels: {version: v1}}\n", "");
        let file = config::parse(Path::new("f.yaml"), &swapped).unwrap();
        let new = RouteTable::build(&settings(), &sources(file), &m, Some(&old));
        let r = new.get("outbound_.9080_._.reviews.default.svc.cluster.local").unwrap();
        assert_eq!(r.endpoints[0].addr.to_string(), "10.0.0.2:7000");
        assert!(!r.outlier.is_available(0));
    }
}
