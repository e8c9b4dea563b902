//! Turns updates from event-driven sources (the Kubernetes API) into xDS
//! snapshots: each update goes into the registry, and a new snapshot version is
//! published only when what proxies would be told has changed — including when a
//! silent cluster turns stale or is withdrawn, which a periodic check notices.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mesh_vocab::ClusterId;
use tokio::sync::{mpsc, watch};

use crate::kube_source::Update;
use crate::model::{ClusterModel, MeshConfig};
use crate::registry::{Freshness, Health, Registry};
use crate::xds::Snapshot;

/// Feeds `updates` into a registry and publishes snapshots on `tx` until either side closes.
pub async fn run(
    mut updates: mpsc::Receiver<Update>,
    mesh: MeshConfig,
    freshness: Freshness,
    tx: watch::Sender<Arc<Snapshot>>,
) {
    let mut registry = Registry::default();
    let mut health: BTreeMap<ClusterId, Health> = BTreeMap::new();
    // Often enough that staleness shows within a second of its deadline.
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            u = updates.recv() => match u {
                Some(Update::Objects(id, objects)) => registry.update(ClusterModel::build(&id, &objects, &mesh), Instant::now()),
                Some(Update::Alive(id)) => registry.heard(&id, Instant::now()),
                Some(Update::Removed(id)) => {
                    registry.remove(&id);
                    health.remove(&id);
                }
                Some(Update::Error(..)) => continue, // silence, not removal: the TTL decides
                None => return,
            },
            _ = tick.tick() => {}
        }
        let now = Instant::now();
        for (id, h) in registry.health(now, freshness) {
            let was = health.insert(id.clone(), h);
            let kind = |h: Option<Health>| h.map(|h| std::mem::discriminant(&h));
            if kind(was) != kind(Some(h)) {
                match h {
                    Health::Fresh => tracing::info!(cluster = %id, "cluster fresh"),
                    Health::Stale { silent_for } => {
                        tracing::warn!(cluster = %id, ?silent_for, "cluster silent: endpoints kept, marked stale")
                    }
                    Health::Withdrawn { silent_for } => {
                        tracing::warn!(cluster = %id, ?silent_for, "cluster silent too long: endpoints withdrawn")
                    }
                }
            }
        }
        let current = tx.borrow().clone();
        let next = Snapshot::new(current.version + 1, now, registry.live(now, freshness), mesh.clone());
        if !next.same_state(&current) && tx.send(Arc::new(next)).is_err() {
            return;
        }
    }
}
