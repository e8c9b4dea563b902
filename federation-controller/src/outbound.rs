//! What a sidecar needs to route the traffic it captures, merged across clusters:
//! which service port each virtual IP and port stands for, and which workload
//! identities may answer for a service port.
//!
//! Unlike endpoints this does not depend on the proxy's network: a ClusterIP
//! names the same service wherever the connection starts. A pure function of
//! the live cluster models and the trust domain.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use mesh_vocab::{Hostname, SpiffeId};

use crate::model::{ClusterModel, ServiceKey};

/// The outbound routing table of one snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outbound {
    /// `(VIP, port)` → the host whose port it is; one host per address.
    pub vips: BTreeMap<(IpAddr, u16), Hostname>,
    /// Addresses more than one host claims, sorted.
    pub conflicts: Vec<VipConflict>,
    /// Per service port, the SPIFFE IDs of its instances' service accounts in
    /// every cluster, distinct and sorted: who may answer an mTLS connection to it.
    pub identities: BTreeMap<ServiceKey, Vec<SpiffeId>>,
}

/// A `VIP:port` claimed by several hosts (clusters with overlapping service
/// ranges, or a stale object). The smallest host name is kept, so every
/// controller and every snapshot choose alike.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VipConflict {
    pub vip: IpAddr,
    pub port: u16,
    pub kept: Hostname,
    pub dropped: Vec<Hostname>,
}

impl std::fmt::Display for VipConflict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let dropped: Vec<&str> = self.dropped.iter().map(Hostname::as_str).collect();
        write!(
            f,
            "{}:{} is claimed by {} and {}; kept {}",
            self.vip,
            self.port,
            self.kept,
            dropped.join(", "),
            self.kept
        )
    }
}

/// Builds the table from `clusters` (stale ones included: their endpoints are still served).
pub fn outbound<'a>(clusters: impl IntoIterator<Item = &'a ClusterModel>, trust_domain: &str) -> Outbound {
    let mut claims: BTreeMap<(IpAddr, u16), BTreeSet<&Hostname>> = BTreeMap::new();
    let mut identities: BTreeMap<ServiceKey, BTreeSet<SpiffeId>> = BTreeMap::new();
    for m in clusters {
        for v in &m.vips {
            claims.entry((v.vip, v.port)).or_default().insert(&v.host);
        }
        for i in &m.instances {
            let ids = identities.entry(i.service.clone()).or_default();
            let (Some(sa), Some((_, ns))) = (&i.service_account, i.service.host.service_and_namespace()) else {
                continue;
            };
            match SpiffeId::workload(trust_domain, ns, sa) {
                Ok(id) => {
                    ids.insert(id);
                }
                Err(e) => tracing::debug!(service = %i.service, sa, error = %e, "no SPIFFE ID"),
            }
        }
    }
    let mut out = Outbound::default();
    for ((vip, port), hosts) in claims {
        let mut hosts = hosts.into_iter().cloned();
        let kept = hosts.next().expect("every claim has a host");
        let dropped: Vec<Hostname> = hosts.collect();
        if !dropped.is_empty() {
            out.conflicts.push(VipConflict {
                vip,
                port,
                kept: kept.clone(),
                dropped,
            });
        }
        out.vips.insert((vip, port), kept);
    }
    out.identities = identities
        .into_iter()
        .map(|(k, ids)| (k, ids.into_iter().collect()))
        .collect();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Instance, Locality, ServiceVip};
    use mesh_vocab::{ClusterId, NetworkId};

    fn host(name: &str) -> Hostname {
        Hostname::parse(&format!("{name}.default.svc.cluster.local")).unwrap()
    }

    fn model(cluster: &str, vips: &[(&str, [u8; 4])], sas: &[(&str, Option<&str>)]) -> ClusterModel {
        ClusterModel {
            cluster: ClusterId::new(cluster),
            instances: sas
                .iter()
                .enumerate()
                .map(|(n, (svc, sa))| Instance {
                    service: ServiceKey {
                        host: host(svc),
                        port: 9080,
                    },
                    address: IpAddr::from([10, 241, 0, n as u8]),
                    target_port: 9080,
                    network: NetworkId::new("n1"),
                    locality: Locality::default(),
                    mtls: true,
                    labels: Default::default(),
                    service_account: sa.map(str::to_owned),
                })
                .collect(),
            vips: vips
                .iter()
                .map(|(h, ip)| ServiceVip {
                    vip: IpAddr::from(*ip),
                    port: 9080,
                    host: host(h),
                })
                .collect(),
            gateways: vec![],
        }
    }

    #[test]
    fn one_host_per_address_across_clusters_and_conflicts_are_reported() {
        let c1 = model("c1", &[("reviews", [10, 96, 0, 12]), ("ratings", [10, 96, 0, 13])], &[]);
        // cluster2 gives reviews another VIP, and reuses ratings' VIP for details.
        let c2 = model("c2", &[("reviews", [10, 96, 1, 12]), ("details", [10, 96, 0, 13])], &[]);
        let table = |models: &[&ClusterModel]| {
            let o = outbound(models.iter().copied(), "cluster.local");
            let vips: Vec<String> = o.vips.iter().map(|((ip, p), h)| format!("{ip}:{p} {h}")).collect();
            (vips, o.conflicts.iter().map(ToString::to_string).collect::<Vec<_>>())
        };
        let (vips, conflicts) = table(&[&c1, &c2]);
        assert_eq!(
            vips,
            [
                "10.96.0.12:9080 reviews.default.svc.cluster.local",
                "10.96.0.13:9080 details.default.svc.cluster.local",
                "10.96.1.12:9080 reviews.default.svc.cluster.local",
            ]
        );
        assert_eq!(
            conflicts,
            [
                "10.96.0.13:9080 is claimed by details.default.svc.cluster.local and ratings.default.svc.cluster.local; kept details.default.svc.cluster.local"
            ]
        );
        assert_eq!(
            table(&[&c2, &c1]),
            table(&[&c1, &c2]),
            "the order of clusters decides nothing"
        );
    }

    #[test]
    fn identities_are_every_service_account_of_the_service_distinct_and_sorted() {
        let c1 = model("c1", &[], &[("reviews", Some("reviews-v2")), ("reviews", None)]);
        let c2 = model(
            "c2",
            &[],
            &[("reviews", Some("reviews-v1")), ("reviews", Some("reviews-v2"))],
        );
        let o = outbound([&c1, &c2], "example.org");
        let ids: Vec<&str> = o.identities[&ServiceKey {
            host: host("reviews"),
            port: 9080,
        }]
            .iter()
            .map(SpiffeId::as_str)
            .collect();
        assert_eq!(
            ids,
            [
                "spiffe://example.org/ns/default/sa/reviews-v1",
                "spiffe://example.org/ns/default/sa/reviews-v2",
            ]
        );
    }
}
