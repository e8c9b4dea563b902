//! The workloads of a cluster as their inbound side sees them: a pod's address,
//! namespace and labels (which policies select it) and the ports its services
//! send to, with their protocol (which decides between an HTTP and a TCP filter
//! chain).

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use crate::model::Instance;
pub use crate::model::Protocol;
use crate::objects::ClusterObjects;

/// One pod, for its inbound listener.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Workload {
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    /// The pod's address; None for a workload known only by its proxy's metadata.
    pub address: Option<IpAddr>,
    /// The (target) ports services send to, sorted.
    pub ports: Vec<(u16, Protocol)>,
}

/// Every pod with an address, sorted by it, with the ports `instances` reach it on.
pub fn workloads(objects: &ClusterObjects, instances: &[Instance]) -> Vec<Workload> {
    let mut protocols: HashMap<(&str, &str, u16), Protocol> = HashMap::new();
    for svc in &objects.services {
        let (ns, name) = (
            svc.metadata.namespace.as_deref().unwrap_or("default"),
            svc.metadata.name.as_deref().unwrap_or_default(),
        );
        for p in svc.spec.iter().flat_map(|s| s.ports.iter().flatten()) {
            if let Ok(port) = u16::try_from(p.port) {
                protocols.insert(
                    (ns, name, port),
                    Protocol::of_port(p.name.as_deref(), p.app_protocol.as_deref()),
                );
            }
        }
    }
    let mut by_address: BTreeMap<IpAddr, Workload> = BTreeMap::new();
    for pod in &objects.pods {
        let ips = pod.status.iter().flat_map(|s| {
            let all = s.pod_ips.iter().flatten().map(|i| i.ip.clone());
            s.pod_ip.clone().into_iter().chain(all)
        });
        for ip in ips.filter_map(|ip| ip.parse().ok()) {
            by_address.insert(
                ip,
                Workload {
                    namespace: pod.metadata.namespace.clone().unwrap_or_else(|| "default".into()),
                    labels: pod.metadata.labels.clone().unwrap_or_default(),
                    address: Some(ip),
                    ports: Vec::new(),
                },
            );
        }
    }
    for i in instances {
        // Endpoints name the pod's address even when its status is not in the source.
        let mut labels = i.service.host.as_str().split('.');
        let (name, ns) = (labels.next().unwrap_or_default(), labels.next().unwrap_or_default());
        let w = by_address.entry(i.address).or_insert_with(|| Workload {
            namespace: ns.to_owned(),
            labels: i.labels.clone(),
            address: Some(i.address),
            ports: Vec::new(),
        });
        let protocol = protocols
            .get(&(ns, name, i.service.port))
            .copied()
            .unwrap_or(Protocol::Tcp);
        w.ports.push((i.target_port, protocol));
    }
    let mut out: Vec<Workload> = by_address.into_values().collect();
    for w in &mut out {
        w.ports.sort();
        // Two services on one target port: HTTP only if both say so (TCP is safe for
        // both), and HTTP/2 to the application if either says so (what speaks gRPC
        // takes HTTP/2 for its HTTP/1.1 callers' requests too).
        w.ports.dedup_by(|b, a| {
            if a.0 == b.0 {
                a.1 = a.1.max(b.1);
                true
            } else {
                false
            }
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_services_on_one_target_port_are_tcp_unless_both_are_http() {
        let ordered = [
            Protocol::Http,
            Protocol::Http2,
            Protocol::Grpc,
            Protocol::GrpcWeb,
            Protocol::Tcp,
        ];
        assert!(
            ordered.windows(2).all(|w| w[0] < w[1]),
            "dedup keeps the greater of two"
        );
    }
}
