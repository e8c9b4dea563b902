//! The last known state of every cluster, and how long ago each was heard from.
//!
//! A cluster that goes silent keeps its endpoints, marked stale, for a bounded
//! time, then has them withdrawn: it neither vanishes at the first hiccup nor
//! lives forever (the failure Istio and Cilium users meet when a remote API
//! server dies). Time is passed in, so the policy is tested without waiting.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mesh_vocab::ClusterId;

use crate::model::ClusterModel;

/// How long silence is tolerated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Freshness {
    /// Silent longer than this: endpoints kept but marked stale.
    pub stale_after: Duration,
    /// Silent longer than this: endpoints withdrawn.
    pub withdraw_after: Duration,
}

impl Default for Freshness {
    fn default() -> Self {
        Self {
            stale_after: Duration::from_secs(30),
            withdraw_after: Duration::from_secs(300),
        }
    }
}

/// What a cluster's silence means now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Fresh,
    Stale { silent_for: Duration },
    Withdrawn { silent_for: Duration },
}

#[derive(Debug, Clone)]
struct Entry {
    model: Arc<ClusterModel>,
    heard: Instant,
}

/// Every cluster's last model.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    clusters: BTreeMap<ClusterId, Entry>,
}

impl Registry {
    /// Stores a cluster's new state, heard at `now`.
    pub fn update(&mut self, model: ClusterModel, now: Instant) {
        self.clusters.insert(
            model.cluster.clone(),
            Entry {
                model: Arc::new(model),
                heard: now,
            },
        );
    }

    /// The cluster is alive (a watch bookmark, a successful relist) without changes.
    pub fn heard(&mut self, cluster: &ClusterId, now: Instant) {
        if let Some(e) = self.clusters.get_mut(cluster) {
            e.heard = now;
        }
    }

    /// Forgets a cluster (its remote secret was deleted); nobody else's state changes.
    pub fn remove(&mut self, cluster: &ClusterId) -> bool {
        self.clusters.remove(cluster).is_some()
    }

    /// Every cluster with what its silence means at `now`.
    pub fn health(&self, now: Instant, policy: Freshness) -> Vec<(ClusterId, Health)> {
        self.clusters
            .iter()
            .map(|(id, e)| {
                let silent_for = now.saturating_duration_since(e.heard);
                let h = if silent_for > policy.withdraw_after {
                    Health::Withdrawn { silent_for }
                } else if silent_for > policy.stale_after {
                    Health::Stale { silent_for }
                } else {
                    Health::Fresh
                };
                (id.clone(), h)
            })
            .collect()
    }

    /// The models federation should use at `now`, with whether each is stale;
    /// withdrawn clusters are left out.
    pub fn live(&self, now: Instant, policy: Freshness) -> Vec<(Arc<ClusterModel>, bool)> {
        self.health(now, policy)
            .into_iter()
            .filter_map(|(id, h)| match h {
                Health::Fresh => Some((self.clusters[&id].model.clone(), false)),
                Health::Stale { .. } => Some((self.clusters[&id].model.clone(), true)),
                Health::Withdrawn { .. } => None,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(name: &str) -> ClusterModel {
        ClusterModel {
            named: Vec::new(),
            exposure: Default::default(),
            traffic: Default::default(),
            cluster: ClusterId::new(name),
            instances: vec![],
            vips: vec![],
            gateways: vec![],
            security: Default::default(),
        }
    }

    #[test]
    fn silence_goes_stale_then_withdrawn_and_hearing_revives() {
        let t0 = Instant::now();
        let policy = Freshness {
            stale_after: Duration::from_secs(10),
            withdraw_after: Duration::from_secs(60),
        };
        let mut r = Registry::default();
        r.update(model("a"), t0);
        r.update(model("b"), t0);
        let live = |r: &Registry, t| -> Vec<(String, bool)> {
            r.live(t, policy)
                .into_iter()
                .map(|(m, s)| (m.cluster.to_string(), s))
                .collect()
        };
        assert_eq!(
            live(&r, t0 + Duration::from_secs(5)),
            [("a".into(), false), ("b".into(), false)]
        );
        r.heard(&ClusterId::new("b"), t0 + Duration::from_secs(50));
        assert_eq!(
            live(&r, t0 + Duration::from_secs(30)),
            [("a".into(), true), ("b".into(), false)]
        );
        assert_eq!(live(&r, t0 + Duration::from_secs(61)), [("b".into(), true)]);
        assert!(matches!(
            r.health(t0 + Duration::from_secs(61), policy)[0].1,
            Health::Withdrawn { .. }
        ));
        r.update(model("a"), t0 + Duration::from_secs(62));
        assert_eq!(
            live(&r, t0 + Duration::from_secs(62)),
            [("a".into(), false), ("b".into(), true)]
        );
        assert!(r.remove(&ClusterId::new("a")));
        assert_eq!(live(&r, t0 + Duration::from_secs(62)), [("b".into(), true)]);
    }
}
