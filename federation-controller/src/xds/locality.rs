//! EDS locality-aware balancing for the requesting proxy, as istiod does it when a
//! DestinationRule enables it (outlier detection set, `localityLbSetting` not
//! disabled): each locality gets a priority by how close it is to the proxy's
//! (`Node.locality`) — 0 same subzone, 1 same zone, 2 same region, 3 elsewhere, or
//! with `failover` rules 3 the named region and 4 the rest — so Envoy spills to the
//! next level only as the nearer one's healthy share (× 1.4, the overprovisioning
//! factor) runs out; or, with `distribute`, fixed weights per locality; or, with
//! `failoverPriority`, by how long a prefix of its labels the endpoints share with
//! the proxy. Of those labels only the topology ones (network, region, zone,
//! subzone) can be compared here: federated endpoints carry no pod labels, so any
//! other label ends the shared prefix. Pure.

use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, LocalityLbEndpoints, cluster_load_assignment,
};
use envoy_types::pb::google::protobuf::UInt32Value;
use envoy_types::pb::google::protobuf::value::Kind;
use mesh_vocab::NetworkId;

use crate::model::{Locality, NETWORK_LABEL};
use crate::networking::destination_rule::{LocalityLbSetting, TrafficPolicy};

/// Envoy's default overprovisioning factor, stated so the spill-over is explicit.
pub const OVERPROVISIONING_FACTOR: u32 = 140;

/// Whether `policy` makes endpoints depend on the proxy's locality.
pub fn applies(policy: &TrafficPolicy) -> bool {
    let setting = policy
        .load_balancer
        .as_ref()
        .and_then(|lb| lb.locality_lb_setting.as_ref());
    policy.outlier_detection.is_some() && setting.and_then(|s| s.enabled) != Some(false)
}

/// Whether `pattern` (`region/zone/subzone`, `*` for any, missing parts any) covers `l`.
pub fn covers(pattern: &str, l: &Locality) -> bool {
    let mut parts = pattern.split('/');
    [&l.region, &l.zone, &l.subzone]
        .iter()
        .all(|have| parts.next().is_none_or(|want| want == "*" || want == have.as_str()))
}

/// The proxy a load assignment is made for: where it runs.
#[derive(Debug, Clone, Copy)]
pub struct Proxy<'a> {
    pub locality: &'a Locality,
    pub network: &'a NetworkId,
}

/// Sets priorities (or `distribute` weights) on `cla` for `proxy`.
pub fn apply(cla: &mut ClusterLoadAssignment, proxy: Proxy<'_>, setting: Option<&LocalityLbSetting>) {
    let network = proxy.network;
    let proxy = proxy.locality;
    let locality = |e: &envoy_types::pb::envoy::config::endpoint::v3::LocalityLbEndpoints| {
        let l = e.locality.clone().unwrap_or_default();
        Locality {
            region: l.region,
            zone: l.zone,
            subzone: l.sub_zone,
        }
    };
    cla.policy = Some(cluster_load_assignment::Policy {
        overprovisioning_factor: Some(UInt32Value {
            value: OVERPROVISIONING_FACTOR,
        }),
        ..Default::default()
    });
    if let Some(rule) = setting.and_then(|s| s.distribute.iter().find(|d| covers(&d.from, proxy))) {
        // Each `to` entry's share is split over the localities it covers; a locality
        // no entry covers gets no traffic, so it is left out (Envoy wants weights ≥ 1).
        let targets: Vec<Option<&String>> = cla
            .endpoints
            .iter()
            .map(|e| rule.to.keys().find(|k| covers(k, &locality(e))))
            .collect();
        let mut kept = Vec::new();
        for (e, target) in cla.endpoints.drain(..).zip(&targets) {
            let Some(key) = target else { continue };
            let sharing = targets.iter().filter(|t| *t == target).count() as u32;
            let weight = (rule.to[*key] * 1000 / sharing.max(1)).max(1);
            kept.push(envoy_types::pb::envoy::config::endpoint::v3::LocalityLbEndpoints {
                load_balancing_weight: Some(UInt32Value { value: weight }),
                priority: 0,
                ..e
            });
        }
        cla.endpoints = kept;
        return;
    }
    if let Some(labels) = setting.map(|s| &s.failover_priority).filter(|l| !l.is_empty()) {
        failover_priority(cla, labels, proxy, network);
        return;
    }
    let failover_to = setting.and_then(|s| s.failover.iter().find(|f| f.from == proxy.region).map(|f| &f.to));
    let rank = |l: &Locality| -> u32 {
        if l.region != proxy.region {
            return match failover_to {
                Some(to) if *to == l.region => 3,
                Some(_) => 4,
                None => 3,
            };
        }
        if l.zone != proxy.zone {
            return 2;
        }
        if l.subzone != proxy.subzone { 1 } else { 0 }
    };
    let ranks: Vec<u32> = cla.endpoints.iter().map(|e| rank(&locality(e))).collect();
    // Envoy wants priorities without gaps: number the levels present from 0.
    let mut levels = ranks.clone();
    levels.sort_unstable();
    levels.dedup();
    for (e, r) in cla.endpoints.iter_mut().zip(ranks) {
        e.priority = levels.iter().position(|l| *l == r).unwrap_or_default() as u32;
    }
}

/// Istio's `failoverPriority`: an endpoint sharing the proxy's values of all N labels
/// is priority 0, of the first N-1 priority 1, …, of none priority N (levels present
/// renumbered from 0). A locality's endpoints on different networks are split apart,
/// since the network is one of the labels.
fn failover_priority(cla: &mut ClusterLoadAssignment, labels: &[String], proxy: &Locality, network: &NetworkId) {
    let endpoint_network = |e: &envoy_types::pb::envoy::config::endpoint::v3::LbEndpoint| -> String {
        let field = e
            .metadata
            .as_ref()
            .and_then(|m| m.filter_metadata.get(super::ISTIO_METADATA))
            .and_then(|s| s.fields.get("network"))
            .and_then(|v| v.kind.as_ref());
        match field {
            Some(Kind::StringValue(n)) => n.clone(),
            _ => String::new(),
        }
    };
    let mut groups: Vec<(u32, LocalityLbEndpoints)> = Vec::new();
    for group in cla.endpoints.drain(..) {
        let l = group.locality.clone().unwrap_or_default();
        let mut by_network: std::collections::BTreeMap<String, Vec<_>> = std::collections::BTreeMap::new();
        for e in group.lb_endpoints.iter().cloned() {
            by_network.entry(endpoint_network(&e)).or_default().push(e);
        }
        for (net, lb_endpoints) in by_network {
            let same = |label: &str| match label {
                NETWORK_LABEL => net == network.as_str(),
                "topology.kubernetes.io/region" => l.region == proxy.region,
                "topology.kubernetes.io/zone" => l.zone == proxy.zone,
                "topology.istio.io/subzone" => l.sub_zone == proxy.subzone,
                _ => false,
            };
            let shared = labels.iter().take_while(|label| same(label)).count();
            let weight = lb_endpoints
                .iter()
                .filter_map(|e| e.load_balancing_weight.map(|w| w.value))
                .sum();
            groups.push((
                (labels.len() - shared) as u32,
                LocalityLbEndpoints {
                    lb_endpoints,
                    load_balancing_weight: Some(UInt32Value { value: weight }),
                    ..group.clone()
                },
            ));
        }
    }
    let mut levels: Vec<u32> = groups.iter().map(|(p, _)| *p).collect();
    levels.sort_unstable();
    levels.dedup();
    cla.endpoints = groups
        .into_iter()
        .map(|(p, g)| LocalityLbEndpoints {
            priority: levels.iter().position(|l| *l == p).unwrap_or_default() as u32,
            ..g
        })
        .collect();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::networking::destination_rule::{Distribute, Failover};
    use envoy_types::pb::envoy::config::core::v3 as core;
    use envoy_types::pb::envoy::config::endpoint::v3::LocalityLbEndpoints;

    fn l(region: &str, zone: &str, subzone: &str) -> Locality {
        Locality {
            region: region.into(),
            zone: zone.into(),
            subzone: subzone.into(),
        }
    }

    static N1: std::sync::LazyLock<NetworkId> = std::sync::LazyLock::new(|| NetworkId::new("n1"));

    fn at(locality: &Locality) -> Proxy<'_> {
        Proxy { locality, network: &N1 }
    }

    fn cla(localities: &[Locality]) -> ClusterLoadAssignment {
        ClusterLoadAssignment {
            endpoints: localities
                .iter()
                .map(|l| LocalityLbEndpoints {
                    locality: Some(core::Locality {
                        region: l.region.clone(),
                        zone: l.zone.clone(),
                        sub_zone: l.subzone.clone(),
                    }),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn nearer_localities_come_first_without_gaps() {
        let mut c = cla(&[
            l("eu", "eu-1", "a"),
            l("eu", "eu-1", "b"),
            l("eu", "eu-2", ""),
            l("us", "us-1", ""),
        ]);
        apply(&mut c, at(&l("eu", "eu-1", "a")), None);
        let p: Vec<u32> = c.endpoints.iter().map(|e| e.priority).collect();
        assert_eq!(p, [0, 1, 2, 3]);
        assert_eq!(c.policy.unwrap().overprovisioning_factor.unwrap().value, 140);
        let mut c = cla(&[l("eu", "eu-2", ""), l("us", "us-1", "")]);
        apply(&mut c, at(&l("eu", "eu-1", "a")), None);
        let p: Vec<u32> = c.endpoints.iter().map(|e| e.priority).collect();
        assert_eq!(p, [0, 1], "the levels present, numbered from 0");
    }

    #[test]
    fn failover_names_the_region_to_go_to_next() {
        let setting = LocalityLbSetting {
            failover: vec![Failover {
                from: "eu".into(),
                to: "ap".into(),
            }],
            ..Default::default()
        };
        let mut c = cla(&[l("us", "", ""), l("ap", "", ""), l("eu", "eu-1", "")]);
        apply(&mut c, at(&l("eu", "eu-1", "")), Some(&setting));
        let p: Vec<u32> = c.endpoints.iter().map(|e| e.priority).collect();
        assert_eq!(p, [2, 1, 0]);
    }

    #[test]
    fn distribute_sets_weights_from_the_proxys_locality() {
        let setting = LocalityLbSetting {
            distribute: vec![Distribute {
                from: "eu/eu-1/*".into(),
                to: [("eu/eu-1/*".to_owned(), 80), ("eu/eu-2/*".to_owned(), 20)].into(),
            }],
            ..Default::default()
        };
        let mut c = cla(&[
            l("eu", "eu-1", "a"),
            l("eu", "eu-1", "b"),
            l("eu", "eu-2", "a"),
            l("us", "", ""),
        ]);
        apply(&mut c, at(&l("eu", "eu-1", "a")), Some(&setting));
        let w: Vec<u32> = c
            .endpoints
            .iter()
            .map(|e| e.load_balancing_weight.unwrap().value)
            .collect();
        assert_eq!(
            w,
            [40_000, 40_000, 20_000],
            "80 split over eu-1's two subzones; us gets nothing"
        );
    }

    #[test]
    fn failover_priority_ranks_by_the_shared_prefix_of_topology_labels() {
        use envoy_types::pb::envoy::config::core::v3::Metadata;
        use envoy_types::pb::envoy::config::endpoint::v3::LbEndpoint;
        use envoy_types::pb::google::protobuf::{Struct, Value};
        let on = |net: &str| LbEndpoint {
            metadata: Some(Metadata {
                filter_metadata: [(
                    super::super::ISTIO_METADATA.to_owned(),
                    Struct {
                        fields: [(
                            "network".to_owned(),
                            Value {
                                kind: Some(Kind::StringValue(net.into())),
                            },
                        )]
                        .into(),
                    },
                )]
                .into(),
                ..Default::default()
            }),
            load_balancing_weight: Some(UInt32Value { value: 1 }),
            ..Default::default()
        };
        let mut c = cla(&[l("eu", "eu-1", ""), l("eu", "eu-2", "")]);
        c.endpoints[0].lb_endpoints = vec![on("n1"), on("n2")];
        c.endpoints[1].lb_endpoints = vec![on("n1")];
        let setting = LocalityLbSetting {
            failover_priority: vec![
                NETWORK_LABEL.into(),
                "topology.kubernetes.io/region".into(),
                "topology.kubernetes.io/zone".into(),
            ],
            ..Default::default()
        };
        apply(&mut c, at(&l("eu", "eu-1", "")), Some(&setting));
        let got: Vec<(String, usize, u32)> = c
            .endpoints
            .iter()
            .map(|g| {
                (
                    g.locality.as_ref().unwrap().zone.clone(),
                    g.lb_endpoints.len(),
                    g.priority,
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("eu-1".to_owned(), 1, 0),
                ("eu-1".to_owned(), 1, 2),
                ("eu-2".to_owned(), 1, 1)
            ],
            "own network and zone first, then own network, then the other network"
        );
    }
}
