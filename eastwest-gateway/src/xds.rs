//! Routes from the federation controller over xDS (ADS, state of the world).
//!
//! The gateway asks for every cluster, then for the endpoints of each, as an
//! Istio gateway node of its network. Cluster `outbound|PORT|SUBSET|HOST` becomes
//! the route for SNI `outbound_.PORT_.SUBSET_.HOST`, with only the endpoints the
//! controller marks as on this gateway's network: the others sit behind other
//! gateways and are none of this gateway's business. Anything it cannot use is
//! NACKed and the last good routes keep serving; when the controller goes away
//! the routes stay as they were while the client reconnects with backoff.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::{Node, address, socket_address};
use envoy_types::pb::envoy::config::endpoint::v3::{ClusterLoadAssignment, lb_endpoint};
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use envoy_types::pb::google::rpc::Status;
use mesh_vocab::{ClusterId, IstioSni, NetworkId};
use prost::Message;

use crate::proxy::Shared;
use crate::routes::XdsRoute;

const CLUSTER_TYPE: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
const ENDPOINT_TYPE: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

/// Istio's node for a gateway of `network` in `cluster`.
fn node(shared: &Shared) -> Node {
    let s = |v: &str| Value {
        kind: Some(Kind::StringValue(v.to_owned())),
    };
    let settings = &shared.settings;
    Node {
        id: format!(
            "router~{}~istio-eastwestgateway.istio-system~istio-system.svc.cluster.local",
            settings.listen.ip()
        ),
        cluster: "istio-eastwestgateway.istio-system".into(),
        metadata: Some(Struct {
            fields: [
                ("NETWORK".to_owned(), s(settings.network.as_str())),
                ("CLUSTER_ID".to_owned(), s(settings.cluster.as_str())),
                ("NAMESPACE".to_owned(), s("istio-system")),
            ]
            .into(),
        }),
        ..Default::default()
    }
}

/// Follows the controller at `addr` until the drain starts, reconnecting with backoff.
pub async fn follow(shared: Arc<Shared>, addr: String) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let session = session(&shared, &addr);
        tokio::select! {
            () = shared.drain.signaled() => return,
            r = session => match r {
                Ok(()) => tracing::warn!(controller = addr, "xDS stream ended; keeping the last routes"),
                Err(e) => tracing::warn!(controller = addr, error = %e, "xDS unavailable; keeping the last routes"),
            },
        }
        shared.metrics.xds_connected.set(0);
        tokio::select! {
            () = shared.drain.signaled() => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// What the current stream has been sent, per type.
#[derive(Default)]
struct Seen {
    version: String,
    nonce: String,
}

async fn session(shared: &Shared, addr: &str) -> anyhow::Result<()> {
    let first = vec![DiscoveryRequest {
        node: Some(node(shared)),
        type_url: CLUSTER_TYPE.into(),
        ..Default::default()
    }];
    let sidecar::ads::Stream {
        requests: tx,
        mut responses,
    } = sidecar::ads::open(&format!("http://{addr}"), None, first)
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    shared.metrics.xds_connected.set(1);
    tracing::info!(controller = addr, "xDS connected");

    let mut clusters: Vec<String> = Vec::new();
    let mut assignments: HashMap<String, ClusterLoadAssignment> = HashMap::new();
    let (mut cds, mut eds) = (Seen::default(), Seen::default());
    let mut eds_names: Option<Vec<String>> = None;

    while let Some(resp) = responses.message().await? {
        let reply = |seen: &Seen, names: Vec<String>, error: Option<String>| DiscoveryRequest {
            version_info: seen.version.clone(),
            response_nonce: resp.nonce.clone(),
            type_url: resp.type_url.clone(),
            resource_names: names,
            error_detail: error.map(|message| Status {
                code: 3,
                message,
                details: vec![],
            }),
            ..Default::default()
        };
        match resp.type_url.as_str() {
            CLUSTER_TYPE => match decode_clusters(&resp) {
                Ok(names) => {
                    cds = Seen {
                        version: resp.version_info.clone(),
                        nonce: resp.nonce.clone(),
                    };
                    tx.send(reply(&cds, vec![], None)).await?;
                    assignments.retain(|k, _| names.contains(k));
                    clusters = names;
                    if eds_names.as_ref() != Some(&clusters) {
                        // Asking for the new set of names; with the last EDS nonce it doubles as the ACK.
                        let req = DiscoveryRequest {
                            version_info: eds.version.clone(),
                            response_nonce: eds.nonce.clone(),
                            type_url: ENDPOINT_TYPE.into(),
                            resource_names: clusters.clone(),
                            ..Default::default()
                        };
                        tx.send(req).await?;
                        eds_names = Some(clusters.clone());
                    }
                }
                Err(e) => {
                    tracing::warn!(error = e, "NACK clusters; keeping the last routes");
                    shared.metrics.xds_nack();
                    tx.send(reply(&cds, vec![], Some(e))).await?;
                }
            },
            ENDPOINT_TYPE => match decode_assignments(&resp) {
                Ok(cla) => {
                    eds = Seen {
                        version: resp.version_info.clone(),
                        nonce: resp.nonce.clone(),
                    };
                    tx.send(reply(&eds, clusters.clone(), None)).await?;
                    assignments.extend(cla);
                    let routes = routes_from(&clusters, &assignments, &shared.settings.network);
                    let n = shared.update_sources(|s| s.xds = routes);
                    shared.mark_xds_synced();
                    tracing::info!(version = resp.version_info, routes = n, "routes from xDS");
                }
                Err(e) => {
                    tracing::warn!(error = e, "NACK endpoints; keeping the last routes");
                    shared.metrics.xds_nack();
                    tx.send(reply(&eds, clusters.clone(), Some(e))).await?;
                }
            },
            _ => {}
        }
    }
    Ok(())
}

fn decode_clusters(resp: &DiscoveryResponse) -> Result<Vec<String>, String> {
    let mut names = Vec::new();
    for r in &resp.resources {
        let c = Cluster::decode(r.value.as_slice()).map_err(|e| format!("undecodable Cluster: {e}"))?;
        names.push(c.name);
    }
    names.sort();
    Ok(names)
}

fn decode_assignments(resp: &DiscoveryResponse) -> Result<HashMap<String, ClusterLoadAssignment>, String> {
    let mut out = HashMap::new();
    for r in &resp.resources {
        let c = ClusterLoadAssignment::decode(r.value.as_slice())
            .map_err(|e| format!("undecodable ClusterLoadAssignment: {e}"))?;
        out.insert(c.cluster_name.clone(), c);
    }
    Ok(out)
}

/// Routes for every outbound cluster, with the endpoints on `network` only.
pub fn routes_from(
    clusters: &[String],
    assignments: &HashMap<String, ClusterLoadAssignment>,
    network: &NetworkId,
) -> Vec<XdsRoute> {
    let mut routes = Vec::new();
    for name in clusters {
        let Some(sni) = IstioSni::of_cluster(name) else {
            continue;
        };
        let mut endpoints = Vec::new();
        for locality in assignments
            .get(name)
            .map(|c| c.endpoints.as_slice())
            .unwrap_or_default()
        {
            for e in &locality.lb_endpoints {
                let meta = e.metadata.as_ref().and_then(|m| m.filter_metadata.get("istio"));
                let field = |k: &str| match meta.and_then(|m| m.fields.get(k)).and_then(|v| v.kind.as_ref()) {
                    Some(Kind::StringValue(s)) => Some(s.clone()),
                    _ => None,
                };
                // An endpoint without a network label is taken as on ours, as Istio does.
                if field("network").is_some_and(|n| n != network.as_str()) {
                    continue;
                }
                let Some(lb_endpoint::HostIdentifier::Endpoint(ep)) = &e.host_identifier else {
                    continue;
                };
                let Some(address::Address::SocketAddress(sa)) = ep.address.as_ref().and_then(|a| a.address.as_ref())
                else {
                    continue;
                };
                let Some(socket_address::PortSpecifier::PortValue(port)) = sa.port_specifier else {
                    continue;
                };
                let (Ok(ip), Ok(port)) = (sa.address.parse::<IpAddr>(), u16::try_from(port)) else {
                    continue;
                };
                let weight = e.load_balancing_weight.map_or(1, |w| w.value.max(1));
                let cluster = ClusterId::new(field("cluster").unwrap_or_default());
                endpoints.push((SocketAddr::new(ip, port), cluster, weight));
            }
        }
        endpoints.sort();
        routes.push(XdsRoute {
            sni: sni.to_string(),
            service: sni.host().to_string(),
            subset: sni.subset().map(str::to_owned),
            endpoints,
        });
    }
    // Deterministic order: the table is a map, but logs and dumps read better sorted.
    let by_sni: BTreeMap<String, XdsRoute> = routes.into_iter().map(|r| (r.sni.clone(), r)).collect();
    by_sni.into_values().collect()
}
