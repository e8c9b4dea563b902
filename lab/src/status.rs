//! `isthmus lab status`: what each cluster of a running lab says about itself, asked over
//! the lab's own network from the cluster's node namespace: the controller's readiness
//! (`/ready`), the clusters it has synced (`/debug/clusterz`) and the version it serves
//! (`/metrics`); the gateway's readiness (`/healthz/ready`) and connection counters
//! (`/stats/prometheus`); each pod's demo app and sidecar, with the sidecar's SVID expiry
//! (`isthmus_sidecar_svid_expiry_seconds`) and xDS routes; endpoints per service.

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mesh_vocab::topology::WorkloadRole;

use crate::plan::{GATEWAY_PORT, HEALTH_PORT, METRICS_PORT, MONITORING_PORT};
use crate::probe;
use crate::process;
use crate::running::Running;

const PROBE: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, serde::Serialize)]
pub struct Status {
    pub topology: String,
    pub prefix: String,
    pub clusters: Vec<ClusterStatus>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ClusterStatus {
    pub name: String,
    pub network: String,
    pub region: String,
    pub zone: String,
    pub served_by: String,
    /// Its own controller (primaries only).
    pub controller: Option<ControllerStatus>,
    pub gateway: Option<GatewayStatus>,
    /// Pods of each service in this cluster: how many, how many answer.
    pub endpoints: Vec<EndpointCount>,
    pub pods: Vec<PodStatus>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ControllerStatus {
    pub address: IpAddr,
    pub running: bool,
    pub ready: bool,
    /// The state version it serves (`isthmus_controller_version`).
    pub version: Option<i64>,
    /// The clusters it has synced, as `/debug/clusterz` says.
    pub synced: Vec<SyncedCluster>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SyncedCluster {
    pub cluster: String,
    pub stale: bool,
    pub instances: u64,
    #[serde(default)]
    pub gateways: u64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct GatewayStatus {
    pub address: IpAddr,
    pub transit_address: IpAddr,
    pub port: u16,
    pub running: bool,
    pub healthy: bool,
    pub open_connections: Option<f64>,
    pub connections_opened: Option<f64>,
    pub rejected_connections: Option<f64>,
    pub xds_connected: Option<bool>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct EndpointCount {
    pub service: String,
    pub pods: usize,
    pub answering: usize,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct PodStatus {
    pub name: String,
    pub address: IpAddr,
    /// The demo app answers (server pods).
    pub app_answering: Option<bool>,
    pub sidecar_running: bool,
    /// Unix time the sidecar's SVID expires.
    pub svid_expiry_unix: Option<i64>,
    /// Seconds from now until then.
    pub svid_expires_in_s: Option<i64>,
    pub xds_routes: Option<f64>,
}

/// Every series of `name` in a Prometheus text page, summed; `None` when it has none.
pub fn metric_sum(page: &str, name: &str) -> Option<f64> {
    metric_sum_with(page, name, "")
}

/// Like [`metric_sum`], of the series whose labels contain `label` (e.g. `reason="x"`).
pub fn metric_sum_with(page: &str, name: &str, label: &str) -> Option<f64> {
    let mut found = None;
    for line in page.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = line.strip_prefix(name) else { continue };
        if !(rest.starts_with('{') || rest.starts_with(' ')) || !rest.contains(label) {
            continue;
        }
        if let Some(v) = rest.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

fn counter(page: &str, name: &str) -> Option<f64> {
    metric_sum(page, name).or((!page.is_empty()).then_some(0.0))
}

fn get(ns: &str, addr: SocketAddr, path: &str) -> Result<probe::Response, String> {
    probe::get(ns, addr, path, PROBE).map_err(|e| format!("GET http://{addr}{path}: {e}"))
}

/// Asks every part of the lab in `dir`.
pub fn status(dir: &Path) -> anyhow::Result<Status> {
    let lab = Running::open(dir)?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() as i64;
    let running = |name: &str| lab.process(name).is_some_and(process::is_running);
    let mut clusters = Vec::new();
    for c in &lab.plan.clusters {
        let node = &c.node.netns;
        let controller = c.controller.as_ref().map(|ctl| {
            let at = SocketAddr::new(IpAddr::V4(ctl.ip), MONITORING_PORT);
            let ready = get(node, at, "/ready");
            let synced = get(node, at, "/debug/clusterz")
                .ok()
                .and_then(|r| serde_json::from_str::<serde_json::Value>(&r.body).ok())
                .and_then(|v| serde_json::from_value::<Vec<SyncedCluster>>(v["clusters"].clone()).ok())
                .unwrap_or_default();
            let version = get(node, at, "/metrics")
                .ok()
                .and_then(|r| metric_sum(&r.body, "isthmus_controller_version"))
                .map(|v| v as i64);
            ControllerStatus {
                address: IpAddr::V4(ctl.ip),
                running: running(&format!("{} controller", c.name)),
                ready: ready.as_ref().is_ok_and(|r| r.status == 200),
                version,
                synced,
                error: match ready {
                    Ok(r) if r.status == 200 => None,
                    Ok(r) => Some(format!("{} {}", r.status, r.body.trim())),
                    Err(e) => Some(e),
                },
            }
        });
        let gateway = c.gateway.as_ref().map(|gw| {
            let health = get(
                node,
                SocketAddr::new(IpAddr::V4(gw.host.ip), HEALTH_PORT),
                "/healthz/ready",
            );
            let page = get(
                node,
                SocketAddr::new(IpAddr::V4(gw.host.ip), METRICS_PORT),
                "/stats/prometheus",
            )
            .ok()
            .map(|r| r.body)
            .unwrap_or_default();
            GatewayStatus {
                address: IpAddr::V4(gw.host.ip),
                transit_address: IpAddr::V4(gw.transit_ip),
                port: GATEWAY_PORT,
                running: running(&format!("{} gateway", c.name)),
                healthy: health.as_ref().is_ok_and(|r| r.status == 200),
                open_connections: metric_sum(&page, "isthmus_gateway_open_connections"),
                // A counter with labels has no series until its first count.
                connections_opened: counter(&page, "istio_tcp_connections_opened_total"),
                rejected_connections: counter(&page, "isthmus_gateway_rejected_connections_total"),
                xds_connected: metric_sum(&page, "isthmus_gateway_xds_connected").map(|v| v == 1.0),
                error: match health {
                    Ok(r) if r.status == 200 => None,
                    Ok(r) => Some(format!("{} {}", r.status, r.body.trim())),
                    Err(e) => Some(e),
                },
            }
        });
        let mut pods = Vec::new();
        for p in &c.pods {
            let app_answering = (p.role == WorkloadRole::Server).then(|| {
                // Straight to the app (from the pod itself: its loopback is not captured).
                let (ns, app) = lab.plan.app_addr(p);
                get(&ns, app.into(), "/").is_ok_and(|r| r.status == 200)
            });
            let page = get(
                node,
                SocketAddr::new(IpAddr::V4(p.host.ip), METRICS_PORT),
                "/stats/prometheus",
            )
            .ok()
            .map(|r| r.body)
            .unwrap_or_default();
            let expiry = metric_sum(&page, "isthmus_sidecar_svid_expiry_seconds").map(|v| v as i64);
            pods.push(PodStatus {
                name: p.name.clone(),
                address: IpAddr::V4(p.host.ip),
                app_answering,
                sidecar_running: running(&format!("{} {} sidecar", c.name, p.name)),
                svid_expiry_unix: expiry,
                svid_expires_in_s: expiry.map(|e| e - now),
                xds_routes: metric_sum(&page, "isthmus_sidecar_xds_routes"),
            });
        }
        let endpoints = c
            .services
            .iter()
            .filter_map(|s| {
                let of: Vec<&PodStatus> = c
                    .pods
                    .iter()
                    .zip(&pods)
                    .filter(|(p, _)| p.app == s.name && p.role == WorkloadRole::Server)
                    .map(|(_, st)| st)
                    .collect();
                (!of.is_empty()).then(|| EndpointCount {
                    service: s.name.clone(),
                    pods: of.len(),
                    answering: of.iter().filter(|p| p.app_answering == Some(true)).count(),
                })
            })
            .collect();
        clusters.push(ClusterStatus {
            name: c.name.to_string(),
            network: c.network.to_string(),
            region: c.region.clone(),
            zone: c.zone.clone(),
            served_by: c.served_by.to_string(),
            controller,
            gateway,
            endpoints,
            pods,
        });
    }
    Ok(Status {
        topology: lab.plan.topology.name.clone(),
        prefix: lab.plan.prefix.clone(),
        clusters,
    })
}

fn yes(b: bool) -> &'static str {
    if b { "yes" } else { "NO" }
}

fn opt(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.0}"))
}

/// The status as tables.
pub fn print(s: &Status, out: &mut impl Write) -> std::io::Result<()> {
    writeln!(out, "lab `{}` (prefix {})", s.topology, s.prefix)?;
    writeln!(
        out,
        "\n{:<10} {:<10} {:<22} {:<10} {:<6} {:>7}  SYNCED (cluster: instances)",
        "CLUSTER", "NETWORK", "LOCALITY", "CONTROL", "READY", "VERSION"
    )?;
    for c in &s.clusters {
        let locality = format!("{}/{}", c.region, c.zone);
        match &c.controller {
            Some(ctl) => {
                let synced = ctl
                    .synced
                    .iter()
                    .map(|x| format!("{}: {}{}", x.cluster, x.instances, if x.stale { " STALE" } else { "" }))
                    .collect::<Vec<_>>()
                    .join(", ");
                writeln!(
                    out,
                    "{:<10} {:<10} {:<22} {:<10} {:<6} {:>7}  {}{}",
                    c.name,
                    c.network,
                    locality,
                    "primary",
                    yes(ctl.ready),
                    ctl.version.map_or("-".into(), |v| v.to_string()),
                    synced,
                    ctl.error.as_ref().map(|e| format!(" ({e})")).unwrap_or_default()
                )?;
            }
            None => writeln!(
                out,
                "{:<10} {:<10} {:<22} {:<10} {:<6} {:>7}  (served by {})",
                c.name, c.network, locality, "remote", "-", "-", c.served_by
            )?,
        }
    }
    if s.clusters.iter().any(|c| c.gateway.is_some()) {
        writeln!(
            out,
            "\n{:<10} {:<16} {:<8} {:<5} {:>6} {:>8} {:>8}",
            "GATEWAY", "TRANSIT", "HEALTHY", "XDS", "OPEN", "OPENED", "REJECTED"
        )?;
    }
    for c in &s.clusters {
        let Some(g) = &c.gateway else { continue };
        writeln!(
            out,
            "{:<10} {:<16} {:<8} {:<5} {:>6} {:>8} {:>8}{}",
            c.name,
            format!("{}:{}", g.transit_address, g.port),
            yes(g.healthy),
            g.xds_connected.map_or("-", yes),
            opt(g.open_connections),
            opt(g.connections_opened),
            opt(g.rejected_connections),
            g.error.as_ref().map(|e| format!("  ({e})")).unwrap_or_default()
        )?;
    }
    writeln!(
        out,
        "\n{:<10} {:<10} {:>5} {:>10}",
        "CLUSTER", "SERVICE", "PODS", "ANSWERING"
    )?;
    for c in &s.clusters {
        for e in &c.endpoints {
            writeln!(
                out,
                "{:<10} {:<10} {:>5} {:>10}",
                c.name, e.service, e.pods, e.answering
            )?;
        }
    }
    writeln!(
        out,
        "\n{:<10} {:<16} {:<14} {:<4} {:<8} {:>10}  SVID EXPIRES",
        "CLUSTER", "POD", "ADDRESS", "APP", "SIDECAR", "XDS ROUTES"
    )?;
    for c in &s.clusters {
        for p in &c.pods {
            writeln!(
                out,
                "{:<10} {:<16} {:<14} {:<4} {:<8} {:>10}  {}",
                c.name,
                p.name,
                p.address,
                p.app_answering.map_or("-", yes),
                yes(p.sidecar_running),
                opt(p.xds_routes),
                match p.svid_expires_in_s {
                    Some(s) if s >= 0 => format!("in {}h{:02}m", s / 3600, (s % 3600) / 60),
                    Some(s) => format!("EXPIRED {}s ago", -s),
                    None => "-".into(),
                }
            )?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_a_metrics_series_and_not_its_longer_namesakes() {
        let page = "# HELP x\nistio_tcp_connections_opened_total{a=\"1\"} 3\nistio_tcp_connections_opened_total{a=\"2\"} 4\nistio_tcp_connections_opened_total_more 100\nup 1\n";
        assert_eq!(metric_sum(page, "istio_tcp_connections_opened_total"), Some(7.0));
        assert_eq!(metric_sum(page, "up"), Some(1.0));
        assert_eq!(metric_sum(page, "down"), None);
        assert_eq!(
            metric_sum_with(page, "istio_tcp_connections_opened_total", "a=\"2\""),
            Some(4.0)
        );
    }
}
