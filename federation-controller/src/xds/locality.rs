//! EDS locality-aware balancing for the requesting proxy, as istiod does it when a
//! DestinationRule enables it (outlier detection set, `localityLbSetting` not
//! disabled): each locality gets a priority by how close it is to the proxy's
//! (`Node.locality`) — 0 same subzone, 1 same zone, 2 same region, 3 elsewhere, or
//! with `failover` rules 3 the named region and 4 the rest — so Envoy spills to the
//! next level only as the nearer one's healthy share (× 1.4, the overprovisioning
//! factor) runs out; or, with `distribute`, fixed weights per locality. Pure.

use envoy_types::pb::envoy::config::endpoint::v3::{ClusterLoadAssignment, cluster_load_assignment};
use envoy_types::pb::google::protobuf::UInt32Value;

use crate::model::Locality;
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

/// Sets priorities (or `distribute` weights) on `cla` for a proxy in `proxy`.
pub fn apply(cla: &mut ClusterLoadAssignment, proxy: &Locality, setting: Option<&LocalityLbSetting>) {
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
        apply(&mut c, &l("eu", "eu-1", "a"), None);
        let p: Vec<u32> = c.endpoints.iter().map(|e| e.priority).collect();
        assert_eq!(p, [0, 1, 2, 3]);
        assert_eq!(c.policy.unwrap().overprovisioning_factor.unwrap().value, 140);
        let mut c = cla(&[l("eu", "eu-2", ""), l("us", "us-1", "")]);
        apply(&mut c, &l("eu", "eu-1", "a"), None);
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
        apply(&mut c, &l("eu", "eu-1", ""), Some(&setting));
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
        apply(&mut c, &l("eu", "eu-1", "a"), Some(&setting));
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
}
