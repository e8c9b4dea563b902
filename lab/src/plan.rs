//! What the lab builds for a topology, worked out before anything is built: every network
//! namespace, its addresses, links and routes, and the processes that run in them. Pure, so
//! the tests can compute the same addresses the lab used.
//!
//! Per cluster k (its pod CIDR `P`, e.g. `10.24k.0.0/16`):
//! - a *node* namespace with the cluster's bridge `br0` at `P+1`; it forwards between the
//!   bridge and its links to the other nodes on the same network;
//! - a *controller* namespace at `P+2` (primaries only), an *east-west gateway* namespace
//!   at `P+3` with a second leg on the transit network at `100.64.0.k` (clusters with a
//!   gateway), and one namespace per pod from `P+256+1` on;
//! - service VIPs from the cluster's service CIDR, one per workload, never routed.
//!
//! Every namespace on a cluster bridge routes the pod CIDRs of its network's other clusters,
//! and the transit network, through its node; nothing else (no default route). A node
//! reaches the transit network through its own gateway, or through the node of a cluster on
//! the same network that has one. Gateways forward only from their cluster to the transit
//! network, masqueraded, never back: between networks nothing but the gateways' own
//! listeners can be reached.

use std::net::{Ipv4Addr, SocketAddrV4};

use mesh_vocab::topology::{ControlPlane, Ipv4Cidr, Protocol, TRANSIT_CIDR, Topology, WorkloadRole};
use mesh_vocab::{ClusterId, NetworkId};

/// The controller's plaintext xDS port (Istio's 15010).
pub const XDS_PORT: u16 = 15010;
/// The controller's xDS + CA TLS port (Istio's 15012).
pub const SECURE_PORT: u16 = 15012;
/// The controller's monitoring port (`/metrics`, `/ready`).
pub const MONITORING_PORT: u16 = 15014;
/// The gateway's and sidecar's health port (`/healthz/ready`).
pub const HEALTH_PORT: u16 = 15021;
/// The gateway's and sidecar's metrics port.
pub const METRICS_PORT: u16 = 15090;
/// The east-west gateway's passthrough port.
pub const GATEWAY_PORT: u16 = 15443;
/// On a loopback lab a pod's application listens this far above its port, which the pod's
/// sidecar takes.
pub const LOOPBACK_APP_OFFSET: u16 = 10_000;

/// The lab for one topology.
#[derive(Debug, Clone)]
pub struct Plan {
    pub topology: Topology,
    /// Prefix of every namespace name, e.g. `isl`.
    pub prefix: String,
    pub clusters: Vec<ClusterPlan>,
    /// The namespace holding the transit bridge, when any cluster has a gateway.
    pub transit: Option<String>,
    /// A loopback lab ([`Plan::loopback`]): no namespaces, every address on 127.0.0.0/8.
    pub loopback: bool,
}

/// One cluster's namespaces and addresses.
#[derive(Debug, Clone)]
pub struct ClusterPlan {
    pub name: ClusterId,
    /// 1-based position in the topology: the `k` of the address plan.
    pub number: usize,
    pub network: NetworkId,
    pub trust_domain: String,
    pub pod_cidr: Ipv4Cidr,
    /// The node namespace; `ip` is its bridge address.
    pub node: Host,
    /// Its own controller, if a primary.
    pub controller: Option<Host>,
    /// The primary cluster whose controller serves this cluster's proxies.
    pub served_by: ClusterId,
    /// The controller address this cluster's proxies use.
    pub xds: Ipv4Addr,
    pub gateway: Option<GatewayPlan>,
    pub pods: Vec<PodPlan>,
    pub services: Vec<ServicePlan>,
    /// Numbers of the other clusters on the same network.
    pub flat_peers: Vec<usize>,
    /// Region and zone of its node.
    pub region: String,
    pub zone: String,
}

/// A namespace on a cluster bridge (or the node itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    pub netns: String,
    pub ip: Ipv4Addr,
    /// Its veth's name on the node side (empty for the node itself).
    pub node_link: String,
}

/// An east-west gateway: its cluster leg and its transit leg.
#[derive(Debug, Clone)]
pub struct GatewayPlan {
    pub host: Host,
    pub transit_ip: Ipv4Addr,
    /// Its veth's name on the transit bridge side.
    pub transit_link: String,
}

/// One pod: a version of a workload in a cluster.
#[derive(Debug, Clone)]
pub struct PodPlan {
    /// The pod's name, `<app>-<version>`.
    pub name: String,
    pub app: String,
    pub version: String,
    pub namespace: String,
    pub service_account: String,
    pub port: u16,
    pub protocol: Protocol,
    pub role: WorkloadRole,
    pub host: Host,
}

/// A workload's Service in one cluster.
#[derive(Debug, Clone)]
pub struct ServicePlan {
    pub name: String,
    pub namespace: String,
    pub vip: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
}

/// Why a topology cannot be built in this lab.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("prefix `{0}` must be 1 to 20 lowercase letters, digits and '-'")]
    Prefix(String),
    #[error(
        "cluster `{cluster}` is a remote of `{primary}` on another network: reaching a controller through an east-west gateway is not built into the lab yet"
    )]
    RemoteAcrossNetworks { cluster: ClusterId, primary: ClusterId },
    #[error("cluster `{cluster}` has more pods than its pod CIDR {cidr} holds")]
    TooManyPods { cluster: ClusterId, cidr: Ipv4Cidr },
    #[error("cluster `{cluster}` has more workloads than its service CIDR {cidr} holds")]
    TooManyServices { cluster: ClusterId, cidr: Ipv4Cidr },
}

impl Plan {
    /// Works out the lab for `topology`, naming namespaces `<prefix>-…`.
    pub fn new(topology: &Topology, prefix: &str) -> Result<Plan, PlanError> {
        let prefix_ok = !prefix.is_empty()
            && prefix.len() <= 20
            && prefix
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !prefix_ok {
            return Err(PlanError::Prefix(prefix.into()));
        }
        let ns = |cluster: &ClusterId, what: &str| format!("{prefix}-{cluster}-{what}");
        let mut clusters = Vec::new();
        for (i, c) in topology.clusters.iter().enumerate() {
            let number = i + 1;
            let at = |offset: u64| c.pod_cidr.nth(offset).expect("a /22 or larger holds the first /24");
            let primary = topology.controller_of(c);
            if primary.network != c.network {
                return Err(PlanError::RemoteAcrossNetworks {
                    cluster: c.name.clone(),
                    primary: primary.name.clone(),
                });
            }
            let mut pods = Vec::new();
            for w in &topology.workloads {
                for v in w.versions.iter().filter(|v| v.clusters.contains(&c.name)) {
                    let ip = c
                        .pod_cidr
                        .nth(256 + 1 + pods.len() as u64)
                        .ok_or_else(|| PlanError::TooManyPods {
                            cluster: c.name.clone(),
                            cidr: c.pod_cidr,
                        })?;
                    let name = format!("{}-{}", w.name, v.version);
                    pods.push(PodPlan {
                        host: Host {
                            netns: ns(&c.name, &name),
                            ip,
                            node_link: format!("p{}", pods.len() + 1),
                        },
                        name,
                        app: w.name.clone(),
                        version: v.version.clone(),
                        namespace: w.namespace.clone(),
                        service_account: w.service_account.clone(),
                        port: w.port,
                        protocol: w.protocol,
                        role: w.role,
                    });
                }
            }
            let mut services = Vec::new();
            for (j, w) in topology.workloads.iter().enumerate() {
                // Neither the block's first nor its last address, as on a subnet.
                let vip = c
                    .service_cidr
                    .nth(j as u64 + 1)
                    .filter(|_| (j as u64 + 2) < c.service_cidr.size())
                    .ok_or_else(|| PlanError::TooManyServices {
                        cluster: c.name.clone(),
                        cidr: c.service_cidr,
                    })?;
                services.push(ServicePlan {
                    name: w.name.clone(),
                    namespace: w.namespace.clone(),
                    vip,
                    port: w.port,
                    protocol: w.protocol,
                });
            }
            let controller = (c.control_plane == ControlPlane::Primary).then(|| Host {
                netns: ns(&c.name, "ctl"),
                ip: at(2),
                node_link: "ctl".into(),
            });
            let gateway = c.east_west_gateway.then(|| GatewayPlan {
                host: Host {
                    netns: ns(&c.name, "gw"),
                    ip: at(3),
                    node_link: "gw".into(),
                },
                transit_ip: TRANSIT_CIDR.nth(number as u64).expect("at most 9 clusters"),
                transit_link: format!("gw{number}"),
            });
            clusters.push(ClusterPlan {
                name: c.name.clone(),
                number,
                network: c.network.clone(),
                trust_domain: c.trust_domain.clone(),
                pod_cidr: c.pod_cidr,
                node: Host {
                    netns: ns(&c.name, "node"),
                    ip: at(1),
                    node_link: String::new(),
                },
                controller,
                served_by: primary.name.clone(),
                xds: primary.pod_cidr.nth(2).expect("a /22 or larger holds the first /24"),
                gateway,
                pods,
                services,
                flat_peers: topology
                    .clusters
                    .iter()
                    .enumerate()
                    .filter(|(j, o)| *j != i && o.network == c.network)
                    .map(|(j, _)| j + 1)
                    .collect(),
                region: c.locality.region.clone(),
                zone: c.locality.zone.clone(),
            });
        }
        let transit = clusters
            .iter()
            .any(|c| c.gateway.is_some())
            .then(|| format!("{prefix}-transit"));
        Ok(Plan {
            topology: topology.clone(),
            prefix: prefix.into(),
            clusters,
            transit,
            loopback: false,
        })
    }

    /// The same lab on loopback, for a user without root: cluster k's addresses in
    /// `127.k.0.0/16` (its services' in `127.k.255.0/24`) in this machine's own namespace,
    /// a gateway's one address its transit address too. Nothing separates the networks.
    pub fn loopback(topology: &Topology, prefix: &str) -> Result<Plan, PlanError> {
        let mut t = topology.clone();
        for (i, c) in t.clusters.iter_mut().enumerate() {
            let k = i as u8 + 1;
            c.pod_cidr = Ipv4Cidr::new(Ipv4Addr::new(127, k, 0, 0), 16).expect("a /16 at 127.k.0.0");
            c.service_cidr = Ipv4Cidr::new(Ipv4Addr::new(127, k, 255, 0), 24).expect("a /24 at 127.k.255.0");
        }
        let mut plan = Plan::new(&t, prefix)?;
        for c in &mut plan.clusters {
            c.node.netns.clear();
            if let Some(ctl) = &mut c.controller {
                ctl.netns.clear();
            }
            if let Some(gw) = &mut c.gateway {
                gw.host.netns.clear();
                gw.transit_ip = gw.host.ip;
                gw.transit_link.clear();
            }
            for p in &mut c.pods {
                p.host.netns.clear();
            }
        }
        plan.transit = None;
        plan.loopback = true;
        Ok(plan)
    }

    /// Where pod `p`'s application listens, and the namespace to reach it from: its own
    /// port on the pod's loopback; on a loopback lab, where the sidecar's inbound is not in
    /// its way (the pod's address, the port + [`LOOPBACK_APP_OFFSET`]).
    pub fn app_addr(&self, p: &PodPlan) -> (String, SocketAddrV4) {
        if self.loopback {
            (
                String::new(),
                SocketAddrV4::new(p.host.ip, p.port + LOOPBACK_APP_OFFSET),
            )
        } else {
            (p.host.netns.clone(), SocketAddrV4::new(Ipv4Addr::LOCALHOST, p.port))
        }
    }

    /// The cluster numbered `number` (1-based).
    pub fn cluster(&self, number: usize) -> &ClusterPlan {
        &self.clusters[number - 1]
    }

    /// The cluster named `name`.
    pub fn cluster_named(&self, name: &str) -> Option<&ClusterPlan> {
        self.clusters.iter().find(|c| c.name.as_str() == name)
    }

    /// How a node reaches the transit network: through its own gateway, else through the
    /// node of the first cluster on its network that has one, else not at all.
    pub fn transit_route(&self, cluster: &ClusterPlan) -> Option<TransitRoute> {
        if let Some(gw) = &cluster.gateway {
            return Some(TransitRoute::Gateway(gw.host.ip));
        }
        cluster
            .flat_peers
            .iter()
            .map(|n| self.cluster(*n))
            .find(|p| p.gateway.is_some())
            .map(|p| TransitRoute::PeerNode(p.number))
    }

    /// Every namespace name, in creation order (none on loopback).
    pub fn namespaces(&self) -> Vec<String> {
        let mut out = Vec::new();
        for c in &self.clusters {
            out.push(c.node.netns.clone());
            out.extend(c.hosts().map(|h| h.netns.clone()));
        }
        out.extend(self.transit.clone());
        out.retain(|n| !n.is_empty());
        out
    }
}

/// The next hop from a node to the transit network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransitRoute {
    /// Its own gateway's cluster leg.
    Gateway(Ipv4Addr),
    /// The node of cluster `n` on the same network.
    PeerNode(usize),
}

impl PodPlan {
    /// Its SPIFFE ID in `trust_domain`.
    pub fn spiffe_id(&self, trust_domain: &str) -> String {
        format!(
            "spiffe://{trust_domain}/ns/{}/sa/{}",
            self.namespace, self.service_account
        )
    }
}

impl ClusterPlan {
    /// The namespaces on this cluster's bridge: controller, gateway, pods.
    pub fn hosts(&self) -> impl Iterator<Item = &Host> {
        self.controller
            .iter()
            .chain(self.gateway.iter().map(|g| &g.host))
            .chain(self.pods.iter().map(|p| &p.host))
    }

    /// The pod named `<app>-<version>`.
    pub fn pod(&self, name: &str) -> Option<&PodPlan> {
        self.pods.iter().find(|p| p.name == name)
    }

    /// The node's veth toward the node of cluster `peer`.
    pub fn peer_link(peer: usize) -> String {
        format!("to-c{peer}")
    }

    /// The Kubernetes node's name.
    pub fn node_name(&self) -> String {
        format!("{}-node", self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topologies;

    #[test]
    fn plans_the_default_topology_by_the_address_plan() {
        let plan = Plan::new(&topologies::default_topology(), "isl").unwrap();
        assert_eq!(plan.clusters.len(), 3);
        let c2 = plan.cluster(2);
        assert_eq!(c2.node.netns, "isl-cluster2-node");
        assert_eq!(c2.node.ip, Ipv4Addr::new(10, 242, 0, 1));
        assert_eq!(c2.controller.as_ref().unwrap().ip, Ipv4Addr::new(10, 242, 0, 2));
        assert_eq!(c2.xds, Ipv4Addr::new(10, 242, 0, 2));
        let gw = c2.gateway.as_ref().unwrap();
        assert_eq!(
            (gw.host.ip, gw.transit_ip),
            (Ipv4Addr::new(10, 242, 0, 3), Ipv4Addr::new(100, 64, 0, 2))
        );
        let names: Vec<_> = plan
            .cluster(3)
            .pods
            .iter()
            .map(|p| (p.name.as_str(), p.host.ip))
            .collect();
        assert_eq!(
            names,
            [
                ("reviews-v1", Ipv4Addr::new(10, 243, 1, 1)),
                ("reviews-v2", Ipv4Addr::new(10, 243, 1, 2)),
                ("productpage-v1", Ipv4Addr::new(10, 243, 1, 3)),
            ]
        );
        assert_eq!(plan.cluster(1).services[0].vip, Ipv4Addr::new(10, 241, 255, 1));
        assert!(plan.clusters.iter().all(|c| c.flat_peers.is_empty()));
        assert_eq!(plan.transit.as_deref(), Some("isl-transit"));
        assert_eq!(
            plan.transit_route(c2),
            Some(TransitRoute::Gateway(Ipv4Addr::new(10, 242, 0, 3)))
        );
        let all = plan.namespaces();
        let unique: std::collections::BTreeSet<_> = all.iter().collect();
        assert_eq!(unique.len(), all.len(), "{all:?}");
    }

    #[test]
    fn flat_networks_peer_and_remotes_use_their_primary() {
        let t = topologies::by_name("primary-remote").unwrap();
        let plan = Plan::new(&t, "x").unwrap();
        let c2 = plan.cluster(2);
        assert!(c2.controller.is_none());
        assert_eq!(c2.served_by.as_str(), "cluster1");
        assert_eq!(c2.xds, Ipv4Addr::new(10, 241, 0, 2));
        assert_eq!(c2.flat_peers, [1]);
        assert_eq!(plan.cluster(1).flat_peers, [2]);
        assert!(plan.transit.is_none());
        assert_eq!(plan.transit_route(c2), None);
    }

    #[test]
    fn refuses_a_remote_across_networks_which_the_lab_cannot_build_yet() {
        let text = topologies::BUILT_IN[3].1.replacen(
            "controlPlane: {role: primary}\n    eastWestGateway: true\n    locality: {region: us-west",
            "controlPlane: {role: remote, primary: cluster1}\n    eastWestGateway: true\n    locality: {region: us-west",
            1,
        );
        let t = Topology::from_yaml(std::path::Path::new("t.yaml"), &text).unwrap();
        assert_eq!(
            Plan::new(&t, "isl").unwrap_err(),
            PlanError::RemoteAcrossNetworks {
                cluster: ClusterId::new("cluster2"),
                primary: ClusterId::new("cluster1")
            }
        );
    }

    #[test]
    fn refuses_more_workloads_than_service_addresses() {
        let text =
            topologies::BUILT_IN[0]
                .1
                .replacen("serviceCidr: 10.241.255.0/24", "serviceCidr: 10.241.255.0/30", 1);
        let mut t = Topology::from_yaml(std::path::Path::new("t.yaml"), &text).unwrap();
        assert_eq!(
            Plan::new(&t, "isl").unwrap().cluster(1).services.len(),
            2,
            "a /30 holds two VIPs"
        );
        let mut third = t.workloads[0].clone();
        third.name = "ratings".into();
        t.workloads.push(third);
        assert!(matches!(Plan::new(&t, "isl"), Err(PlanError::TooManyServices { .. })));
    }

    #[test]
    fn a_loopback_lab_puts_cluster_k_on_127_k_without_namespaces() {
        let plan = Plan::loopback(&topologies::default_topology(), "isl").unwrap();
        assert!(plan.loopback && plan.transit.is_none() && plan.namespaces().is_empty());
        let c2 = plan.cluster(2);
        assert_eq!(c2.xds, Ipv4Addr::new(127, 2, 0, 2));
        let gw = c2.gateway.as_ref().unwrap();
        assert_eq!(
            (gw.host.ip, gw.transit_ip),
            (Ipv4Addr::new(127, 2, 0, 3), Ipv4Addr::new(127, 2, 0, 3))
        );
        let p = &plan.cluster(3).pods[1];
        assert_eq!(p.host.ip, Ipv4Addr::new(127, 3, 1, 2));
        assert_eq!(plan.app_addr(p), (String::new(), "127.3.1.2:19080".parse().unwrap()));
        assert_eq!(plan.cluster(1).services[0].vip, Ipv4Addr::new(127, 1, 255, 1));
    }

    #[test]
    fn refuses_prefixes_that_cannot_name_namespaces() {
        let t = topologies::default_topology();
        for bad in ["", "Isl", "a/b", "abcdefghijklmnopqrstu"] {
            assert_eq!(Plan::new(&t, bad).unwrap_err(), PlanError::Prefix(bad.into()));
        }
    }
}
