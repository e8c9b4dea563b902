//! What a sidecar needs to route the traffic it captures, merged across clusters:
//! which service port each virtual IP and port stands for, as seen from the
//! proxy's own cluster, and which workload identities may answer for a service
//! port.
//!
//! A ClusterIP means something only in the cluster that allocated it, and
//! clusters often share a service CIDR: two clusters' different services may
//! well have the same ClusterIP. So, as in Istio, the table depends on the
//! proxy's cluster (its node's `CLUSTER_ID`), not on its network. Identities do
//! not. Pure functions of the live cluster models (and the trust domain).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use mesh_vocab::{ClusterId, Hostname, SpiffeId};

use crate::model::{ClusterModel, Instance, ServiceKey};

/// The outbound listeners of one proxy's view.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VipTable {
    /// `(VIP, port)` → the host whose port it is; one host per address.
    pub vips: BTreeMap<(IpAddr, u16), Hostname>,
    /// Addresses more than one host claims in this view, sorted.
    pub conflicts: Vec<VipConflict>,
}

/// A `VIP:port` claimed by several hosts in one proxy's view (one cluster's
/// stale or misconfigured object, or other clusters that share a service
/// range). The smallest host name is kept, so every controller and every
/// snapshot choose alike.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VipConflict {
    /// The cluster whose proxies see it; None for proxies that name no served cluster.
    pub view: Option<ClusterId>,
    pub vip: IpAddr,
    pub port: u16,
    pub kept: Hostname,
    pub dropped: Vec<Hostname>,
}

impl std::fmt::Display for VipConflict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let dropped: Vec<&str> = self.dropped.iter().map(Hostname::as_str).collect();
        match &self.view {
            Some(c) => write!(f, "for proxies in {c}, ")?,
            None => f.write_str("for proxies naming no cluster, ")?,
        }
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

/// The `VIP:port` → host table of a proxy in cluster `own` (None: a node that
/// names no cluster, or one not among `clusters`), from `clusters` (stale ones
/// included: their endpoints are still served).
///
/// The rule:
/// 1. Every VIP of every service in `own` is the proxy's: that is what the
///    address means where the proxy runs.
/// 2. A service with no VIP in `own` (not there, or headless there) is reached
///    at its VIPs in the other clusters — each `VIP:port` only if no VIP of
///    `own` has the same address and port. Where one does, the address is a
///    service of the proxy's own cluster, and the other cluster's meaning of it
///    would take the proxy's traffic to the wrong service. A service that does
///    have a VIP in `own` gets no other cluster's VIP: its own cluster's DNS
///    never hands those out.
/// 3. A `VIP:port` still claimed by several hosts — within `own`, or among the
///    other clusters — is a [`VipConflict`]: the smallest host name keeps it.
///
/// Without an own cluster only rule 2 and 3 apply: every VIP of every cluster,
/// one host per address — the merged table of a controller that knows no
/// clusters apart.
pub fn vips<'a>(own: Option<&ClusterId>, clusters: impl IntoIterator<Item = &'a ClusterModel>) -> VipTable {
    let clusters: Vec<&ClusterModel> = clusters.into_iter().collect();
    let own = own.filter(|c| clusters.iter().any(|m| &m.cluster == *c));
    let mut local: BTreeMap<(IpAddr, u16), BTreeSet<&Hostname>> = BTreeMap::new();
    let mut local_hosts: BTreeSet<&Hostname> = BTreeSet::new();
    for m in clusters.iter().filter(|m| Some(&m.cluster) == own) {
        for v in &m.vips {
            local.entry((v.vip, v.port)).or_default().insert(&v.host);
            local_hosts.insert(&v.host);
        }
    }
    let mut foreign: BTreeMap<(IpAddr, u16), BTreeSet<&Hostname>> = BTreeMap::new();
    for m in clusters.iter().filter(|m| Some(&m.cluster) != own) {
        for v in &m.vips {
            if !local_hosts.contains(&v.host) && !local.contains_key(&(v.vip, v.port)) {
                foreign.entry((v.vip, v.port)).or_default().insert(&v.host);
            }
        }
    }
    let mut out = VipTable::default();
    // The two never share a key: rule 2 keeps foreign claims off local addresses.
    for ((vip, port), hosts) in local.into_iter().chain(foreign) {
        let mut hosts = hosts.into_iter().cloned();
        let kept = hosts.next().expect("every claim has a host");
        let dropped: Vec<Hostname> = hosts.collect();
        if !dropped.is_empty() {
            out.conflicts.push(VipConflict {
                view: own.cloned(),
                vip,
                port,
                kept: kept.clone(),
                dropped,
            });
        }
        out.vips.insert((vip, port), kept);
    }
    out.conflicts.sort_by_key(|c| (c.vip, c.port));
    out
}

/// Per service port, the SPIFFE IDs of its instances' service accounts in every
/// cluster, distinct and sorted: who may answer an mTLS connection to it.
pub fn identities<'a>(
    clusters: impl IntoIterator<Item = &'a ClusterModel>,
    trust_domain: &str,
) -> BTreeMap<ServiceKey, Vec<SpiffeId>> {
    let mut by_service: BTreeMap<&ServiceKey, Vec<&Instance>> = BTreeMap::new();
    for m in clusters {
        for i in &m.instances {
            by_service.entry(&i.service).or_default().push(i);
        }
    }
    by_service
        .into_iter()
        .map(|(k, instances)| (k.clone(), identities_of(instances, trust_domain)))
        .collect()
}

/// [`identities`] of one service port, from its `instances`: their service accounts' SPIFFE
/// IDs, distinct and sorted.
pub fn identities_of<'a>(instances: impl IntoIterator<Item = &'a Instance>, trust_domain: &str) -> Vec<SpiffeId> {
    let mut ids = BTreeSet::new();
    for i in instances {
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
    ids.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Instance, Locality, ServiceVip};
    use mesh_vocab::NetworkId;
    use proptest::prelude::*;

    fn host(name: &str) -> Hostname {
        Hostname::parse(&format!("{name}.default.svc.cluster.local")).unwrap()
    }

    fn model(cluster: &str, vips: &[(&str, [u8; 4])], sas: &[(&str, Option<&str>)]) -> ClusterModel {
        ClusterModel {
            exposure: Default::default(),
            traffic: Default::default(),
            cluster: ClusterId::new(cluster),
            named: vec![],
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
                    weight: 1,
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
            security: Default::default(),
        }
    }

    fn table(own: Option<&str>, models: &[&ClusterModel]) -> (Vec<String>, Vec<String>) {
        let own = own.map(ClusterId::new);
        let t = vips(own.as_ref(), models.iter().copied());
        let vips = t.vips.iter().map(|((ip, p), h)| format!("{ip}:{p} {h}")).collect();
        (vips, t.conflicts.iter().map(ToString::to_string).collect())
    }

    #[test]
    fn a_proxy_gets_its_own_clusters_vips_and_other_clusters_only_for_services_it_lacks() {
        // Both clusters allocate from the same range: cluster1's reviews and
        // cluster2's ratings have the same ClusterIP. details is only in cluster2,
        // on an address free in cluster1; reviews also runs in cluster2.
        let c1 = model("c1", &[("reviews", [10, 96, 0, 10])], &[]);
        let c2 = model(
            "c2",
            &[
                ("ratings", [10, 96, 0, 10]),
                ("reviews", [10, 96, 0, 11]),
                ("details", [10, 96, 0, 12]),
            ],
            &[],
        );
        assert_eq!(
            table(Some("c1"), &[&c1, &c2]),
            (
                vec![
                    "10.96.0.10:9080 reviews.default.svc.cluster.local".to_owned(),
                    "10.96.0.12:9080 details.default.svc.cluster.local".to_owned(),
                ],
                vec![]
            ),
            "ratings' VIP is reviews' in c1; reviews is reached at c1's VIP only"
        );
        assert_eq!(
            table(Some("c2"), &[&c1, &c2]),
            (
                vec![
                    "10.96.0.10:9080 ratings.default.svc.cluster.local".to_owned(),
                    "10.96.0.11:9080 reviews.default.svc.cluster.local".to_owned(),
                    "10.96.0.12:9080 details.default.svc.cluster.local".to_owned(),
                ],
                vec![]
            )
        );
        assert_eq!(
            table(Some("c2"), &[&c2, &c1]),
            table(Some("c2"), &[&c1, &c2]),
            "the order of clusters decides nothing"
        );
    }

    #[test]
    fn without_an_own_cluster_every_vip_of_every_cluster_one_host_per_address() {
        let c1 = model("c1", &[("reviews", [10, 96, 0, 12]), ("ratings", [10, 96, 0, 13])], &[]);
        // cluster2 gives reviews another VIP, and reuses ratings' VIP for details.
        let c2 = model("c2", &[("reviews", [10, 96, 1, 12]), ("details", [10, 96, 0, 13])], &[]);
        let merged = (
            vec![
                "10.96.0.12:9080 reviews.default.svc.cluster.local".to_owned(),
                "10.96.0.13:9080 details.default.svc.cluster.local".to_owned(),
                "10.96.1.12:9080 reviews.default.svc.cluster.local".to_owned(),
            ],
            vec![
                "for proxies naming no cluster, 10.96.0.13:9080 is claimed by details.default.svc.cluster.local \
                 and ratings.default.svc.cluster.local; kept details.default.svc.cluster.local"
                    .to_owned(),
            ],
        );
        assert_eq!(table(None, &[&c1, &c2]), merged);
        assert_eq!(
            table(None, &[&c2, &c1]),
            merged,
            "the order of clusters decides nothing"
        );
        assert_eq!(
            table(Some("elsewhere"), &[&c1, &c2]),
            merged,
            "a cluster not served is no own cluster"
        );
    }

    #[test]
    fn conflicts_are_within_one_view() {
        // Two hosts on one address in c1 itself; two clusters lending c3 one address each.
        let c1 = model("c1", &[("reviews", [10, 96, 0, 10]), ("tracing", [10, 96, 0, 10])], &[]);
        let c2 = model("c2", &[("ratings", [10, 96, 0, 20])], &[]);
        let c3 = model("c3", &[("details", [10, 96, 0, 20])], &[]);
        let (vips, conflicts) = table(Some("c1"), &[&c1, &c2, &c3]);
        assert_eq!(vips[0], "10.96.0.10:9080 reviews.default.svc.cluster.local");
        assert_eq!(
            conflicts,
            [
                "for proxies in c1, 10.96.0.10:9080 is claimed by reviews.default.svc.cluster.local and \
                 tracing.default.svc.cluster.local; kept reviews.default.svc.cluster.local",
                "for proxies in c1, 10.96.0.20:9080 is claimed by details.default.svc.cluster.local and \
                 ratings.default.svc.cluster.local; kept details.default.svc.cluster.local",
            ]
        );
        let (_, conflicts) = table(Some("c2"), &[&c1, &c2, &c3]);
        assert_eq!(
            conflicts,
            [
                "for proxies in c2, 10.96.0.10:9080 is claimed by reviews.default.svc.cluster.local and \
                 tracing.default.svc.cluster.local; kept reviews.default.svc.cluster.local"
            ],
            "c2's own ratings holds .20; c1's clash is lent to c2 as it is"
        );
    }

    proptest! {
        /// Whatever the clusters, a proxy's own cluster's VIPs are all in its
        /// table with their own host unless two own hosts clash, and nothing from
        /// another cluster ever takes an own `VIP:port` or serves a service the own
        /// cluster has VIPs for.
        #[test]
        fn own_vips_always_win(
            claims in proptest::collection::vec((0u8..3, 0u8..4, 0u8..4), 0..24),
            own in 0u8..3,
        ) {
            let names = ["reviews", "ratings", "details", "tracing"];
            let models: Vec<ClusterModel> = (0..3u8)
                .map(|c| {
                    let vips: Vec<(&str, [u8; 4])> = claims
                        .iter()
                        .filter(|(cc, _, _)| *cc == c)
                        .map(|(_, h, ip)| (names[*h as usize], [10, 96, 0, *ip]))
                        .collect();
                    let mut m = model(&format!("c{c}"), &vips, &[]);
                    m.vips.sort();
                    m.vips.dedup();
                    m
                })
                .collect();
            let me = ClusterId::new(format!("c{own}"));
            let t = vips(Some(&me), &models);
            let mine = &models[own as usize];
            for v in &mine.vips {
                let kept = &t.vips[&(v.vip, v.port)];
                prop_assert!(mine.vips.iter().any(|w| (w.vip, w.port, &w.host) == (v.vip, v.port, kept)));
            }
            for ((vip, port), h) in &t.vips {
                let own_claim = mine.vips.iter().any(|w| (w.vip, w.port) == (*vip, *port));
                let own_host = mine.vips.iter().any(|w| &w.host == h);
                if !own_claim {
                    prop_assert!(!own_host, "{h} has VIPs in {me} but got a foreign one");
                }
            }
        }
    }

    #[test]
    fn identities_are_every_service_account_of_the_service_distinct_and_sorted() {
        let c1 = model("c1", &[], &[("reviews", Some("reviews-v2")), ("reviews", None)]);
        let c2 = model(
            "c2",
            &[],
            &[("reviews", Some("reviews-v1")), ("reviews", Some("reviews-v2"))],
        );
        let ids = identities([&c1, &c2], "example.org");
        let ids: Vec<&str> = ids[&ServiceKey {
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
