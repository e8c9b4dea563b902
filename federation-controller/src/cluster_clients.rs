//! The API clients of every cluster read in Kubernetes mode: those given with
//! `--kubeconfig` and those that remote secrets add, rotate and remove. The parts that call
//! a cluster back (the CA's token reviews) look a client up here at the moment they need
//! it, so a cluster added by a remote secret is served without a restart, and a removed
//! one is no longer trusted.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use mesh_vocab::ClusterId;

/// A shared, current map of cluster → client (cheap to clone: one map behind all clones).
#[derive(Clone, Default)]
pub struct ClusterClients(Arc<RwLock<BTreeMap<ClusterId, kube::Client>>>);

impl std::fmt::Debug for ClusterClients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.ids()).finish()
    }
}

impl ClusterClients {
    /// Adds `cluster`, or replaces its client (a rotated kubeconfig).
    pub fn insert(&self, cluster: ClusterId, client: kube::Client) {
        self.0
            .write()
            .expect("never poisoned: no panics under the lock")
            .insert(cluster, client);
    }

    /// Forgets `cluster`.
    pub fn remove(&self, cluster: &ClusterId) {
        self.0
            .write()
            .expect("never poisoned: no panics under the lock")
            .remove(cluster);
    }

    /// The client of `cluster` now (a clone: the lock is never held across a call).
    pub fn get(&self, cluster: &ClusterId) -> Option<kube::Client> {
        self.0
            .read()
            .expect("never poisoned: no panics under the lock")
            .get(cluster)
            .cloned()
    }

    /// The clusters known now, sorted.
    pub fn ids(&self) -> Vec<ClusterId> {
        self.0
            .read()
            .expect("never poisoned: no panics under the lock")
            .keys()
            .cloned()
            .collect()
    }
}
