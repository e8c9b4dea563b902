//! Turns updates from event-driven sources (the Kubernetes API) into xDS
//! snapshots: each burst of updates goes into the registry, and a new snapshot version is
//! published only when what proxies would be told has changed — including when a
//! silent cluster turns stale or is withdrawn, which a periodic check notices.
//!
//! The debounce is short because a snapshot costs what changed: it follows the one
//! before ([`Snapshot::after`]), so only the service ports whose instances changed are
//! federated and encoded again, and only proxies watching them are sent anything. A
//! cluster's model is built once per burst, from its last objects, not once per update.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mesh_vocab::ClusterId;
use tokio::sync::{mpsc, watch};

use crate::kube_source::Update;
use crate::model::{ClusterModel, MeshConfig};
use crate::registry::{Freshness, Health, Registry};
use crate::xds::Snapshot;

/// Quiet time that ends a burst of changes (Istio waits 100 ms, as each of its pushes
/// recomputes much more than what changed).
const QUIET: Duration = Duration::from_millis(10);
/// The longest a change waits for a burst to end.
const MAX_DELAY: Duration = Duration::from_millis(100);

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
    // (The first tick after a period, not at once: at once it would cut a burst short.)
    let period = Duration::from_secs(1);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Debounce: a change is published once updates have been quiet for QUIET,
    // and never later than MAX_DELAY after the first of them.
    let mut first_change: Option<tokio::time::Instant> = None;
    let mut last_change = tokio::time::Instant::now();
    // Each updated cluster's last objects in this burst, built into its model at the flush.
    let mut pending: BTreeMap<ClusterId, Box<crate::objects::ClusterObjects>> = BTreeMap::new();
    loop {
        let flush_at = first_change.map(|first| (last_change + QUIET).min(first + MAX_DELAY));
        tokio::select! {
            u = updates.recv() => {
                match u {
                    Some(Update::Objects(id, objects)) => {
                        // Heard now, whenever the model is built.
                        registry.heard(&id, Instant::now());
                        pending.insert(id, objects);
                    }
                    Some(Update::Removed(id)) => {
                        pending.remove(&id);
                        registry.remove(&id);
                        health.remove(&id);
                    }
                    Some(Update::Alive(id)) => {
                        registry.heard(&id, Instant::now());
                        continue;
                    }
                    Some(Update::Error(..)) => continue, // silence, not removal: the TTL decides
                    None => return,
                }
                let now = tokio::time::Instant::now();
                first_change.get_or_insert(now);
                last_change = now;
                continue;
            }
            _ = tick.tick() => {}
            () = tokio::time::sleep_until(flush_at.unwrap_or_else(tokio::time::Instant::now)), if flush_at.is_some() => {}
        }
        first_change = None;
        let now = Instant::now();
        for (id, objects) in std::mem::take(&mut pending) {
            registry.update(ClusterModel::build(&id, &objects, &mesh), now);
        }
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
        let next = Snapshot::new(current.version + 1, now, registry.live(now, freshness), mesh.clone()).after(&current);
        if !next.same_state(&current) && tx.send(Arc::new(next)).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objects::ClusterObjects;

    fn objects(endpoints: usize) -> ClusterObjects {
        let eps: String = (0..endpoints)
            .map(|i| format!("  - {{addresses: [10.241.0.{}]}}\n", i + 1))
            .collect();
        let yaml = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: r, namespace: default}}\nspec: {{ports: [{{name: http, port: 80}}]}}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: r-1, namespace: default, labels: {{kubernetes.io/service-name: r}}}}\n\
             addressType: IPv4\nports: [{{name: http, port: 80}}]\nendpoints:\n{eps}"
        );
        let mut o = ClusterObjects::default();
        o.add_yaml(std::path::Path::new("t.yaml"), &yaml).unwrap();
        o
    }

    fn start() -> (mpsc::Sender<Update>, watch::Receiver<Arc<Snapshot>>) {
        let (utx, urx) = mpsc::channel(64);
        let (tx, rx) = watch::channel(Arc::new(Snapshot::new(
            1,
            Instant::now(),
            vec![],
            MeshConfig::default(),
        )));
        tokio::spawn(run(urx, MeshConfig::default(), Freshness::default(), tx));
        (utx, rx)
    }

    fn endpoints(rx: &watch::Receiver<Arc<Snapshot>>) -> usize {
        rx.borrow().clusters.iter().map(|(m, _)| m.instances.len()).sum()
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_is_published_once_when_it_quiets() {
        let (utx, rx) = start();
        for n in 1..=5 {
            utx.send(Update::Objects(ClusterId::new("c1"), Box::new(objects(n))))
                .await
                .unwrap();
            tokio::time::sleep(QUIET / 2).await;
        }
        assert_eq!(rx.borrow().version, 1, "still inside the burst");
        tokio::time::sleep(QUIET).await;
        assert_eq!(
            (rx.borrow().version, endpoints(&rx)),
            (2, 5),
            "one publish, with the last state"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_endless_burst_is_still_published_within_the_bound() {
        let (utx, rx) = start();
        let mut published_at = None;
        let start = tokio::time::Instant::now();
        for n in 1..=40 {
            utx.send(Update::Objects(ClusterId::new("c1"), Box::new(objects(n % 7 + 1))))
                .await
                .unwrap();
            tokio::time::sleep(QUIET / 2).await;
            if published_at.is_none() && rx.borrow().version > 1 {
                published_at = Some(start.elapsed());
            }
        }
        let at = published_at.expect("published during the burst");
        assert!(
            at <= MAX_DELAY + QUIET,
            "first publish after {at:?}, bound is {MAX_DELAY:?}"
        );
        assert!(
            rx.borrow().version <= 4,
            "a burst of 2 × MAX_DELAY yields a handful of publishes, not 40"
        );
    }
}
