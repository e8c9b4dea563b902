//! How a client reaches a service on a loopback lab. There is no capture without root
//! (iptables needs it), so the client's sidecar cannot route by original destination: it
//! runs in explicit mode, one sidecar per *route* — a server pod on the client's own
//! network, or another network's east-west gateway (which spreads the route over its
//! network's pods, by SNI, as the controller told it) — and the client, not the mesh,
//! picks the route for each request. Every route is mTLS with the caller's SVID.

use std::net::{IpAddr, SocketAddr};

use mesh_vocab::ClusterId;
use mesh_vocab::topology::WorkloadRole;

use crate::plan::{ClusterPlan, GATEWAY_PORT, METRICS_PORT, Plan, PodPlan};
use crate::sidecar::OUTBOUND_PORT;

/// One explicit outbound route of a client pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The service it reaches.
    pub service: String,
    pub namespace: String,
    pub port: u16,
    /// Where the client's sidecar for it listens: the client pod's address,
    /// [`OUTBOUND_PORT`] + its index.
    pub listen: SocketAddr,
    /// Its sidecar's metrics.
    pub metrics: SocketAddr,
    /// A server pod's inbound, or a gateway's passthrough port.
    pub target: SocketAddr,
    /// The cluster that answers.
    pub cluster: ClusterId,
    pub via_gateway: bool,
    /// The server's service account, the identity its SVID must carry.
    pub service_account: String,
    pub trust_domain: String,
}

impl Route {
    /// Istio's SNI for the route, which the gateway routes by.
    pub fn sni(&self) -> String {
        format!(
            "outbound_.{}_._.{}.{}.svc.cluster.local",
            self.port, self.service, self.namespace
        )
    }

    /// The SPIFFE ID the server must prove.
    pub fn peer_id(&self) -> String {
        format!(
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

/// Every route of `client` in `from`, to every server service: each server pod on its
/// network, each other network's cluster with a gateway once.
pub fn routes(plan: &Plan, from: &ClusterPlan, client: &PodPlan) -> Vec<Route> {
    let mut out = Vec::new();
    let at = |port: u16| SocketAddr::new(IpAddr::V4(client.host.ip), port);
    for svc in &from.services {
        for d in &plan.clusters {
            let servers: Vec<&PodPlan> = d
                .pods
                .iter()
                .filter(|p| p.app == svc.name && p.role == WorkloadRole::Server)
                .collect();
            let Some(first) = servers.first() else { continue };
            let targets: Vec<SocketAddr> = if d.network == from.network {
                servers
                    .iter()
                    .map(|p| SocketAddr::new(IpAddr::V4(p.host.ip), p.port))
                    .collect()
            } else if let Some(gw) = &d.gateway {
                vec![SocketAddr::new(IpAddr::V4(gw.host.ip), GATEWAY_PORT)]
            } else {
                continue;
            };
            for target in targets {
                let i = out.len() as u16;
                out.push(Route {
                    service: svc.name.clone(),
                    namespace: svc.namespace.clone(),
                    port: svc.port,
                    listen: at(OUTBOUND_PORT + i),
                    metrics: at(METRICS_PORT + i),
                    target,
                    cluster: d.name.clone(),
                    via_gateway: d.network != from.network,
                    service_account: first.service_account.clone(),
                    trust_domain: d.trust_domain.clone(),
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topologies;

    #[test]
    fn a_client_has_a_route_per_pod_on_its_network_and_per_gateway_elsewhere() {
        let plan = Plan::loopback(&topologies::default_topology(), "isl").unwrap();
        let c1 = plan.cluster(1);
        let client = c1.pods.iter().find(|p| p.role == WorkloadRole::Client).unwrap();
        let r = routes(&plan, c1, client);
        let seen: Vec<(String, String, bool)> = r
            .iter()
            .map(|r| (r.cluster.to_string(), r.target.to_string(), r.via_gateway))
            .collect();
        assert_eq!(
            seen,
            [
                ("cluster1".into(), "127.1.1.1:9080".into(), false),
                ("cluster2".into(), "127.2.0.3:15443".into(), true),
                ("cluster3".into(), "127.3.0.3:15443".into(), true),
            ]
        );
        assert_eq!(r[2].listen.to_string(), "127.1.1.2:15003");
        assert_eq!(r[0].sni(), "outbound_.9080_._.reviews.default.svc.cluster.local");
        assert_eq!(r[0].peer_id(), "spiffe://cluster.local/ns/default/sa/bookinfo-reviews");
        // On one flat network every pod is a route of its own.
        let flat = Plan::loopback(&topologies::by_name("multi-primary").unwrap(), "isl").unwrap();
        let c = flat.cluster(1);
        let client = c.pods.iter().find(|p| p.role == WorkloadRole::Client).unwrap();
        assert!(routes(&flat, c, client).iter().all(|r| !r.via_gateway));
    }
}
