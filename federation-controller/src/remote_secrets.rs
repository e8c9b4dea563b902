//! Remote clusters from Secrets, in the format `istioctl create-remote-secret`
//! makes: Secrets in the primary's `istio-system` labelled
//! `istio/multiCluster: "true"`, each data key a cluster ID and its value a
//! kubeconfig for that cluster.
//!
//! Adding a Secret starts watching its clusters; changing a kubeconfig
//! (rotation) starts the new watch before stopping the old one, and the
//! cluster's last state keeps serving until the new watch has synced; deleting
//! the Secret stops the watch and prunes that cluster's endpoints, and no one
//! else's. A cluster ID that is our own, or that another Secret already
//! provides, is refused and reported — never silently merged.

use std::collections::{BTreeMap, HashMap};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, ResourceExt};
use mesh_vocab::ClusterId;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::cluster_clients::ClusterClients;
use crate::kube_source::{self, Update};

/// The label that marks a remote secret.
pub const MULTICLUSTER_LABEL: &str = "istio/multiCluster";

/// Why a cluster in a remote secret was not used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("cluster {0} is this controller's own cluster")]
    OwnCluster(ClusterId),
    #[error("cluster {cluster} is already provided by secret {by}")]
    Duplicate { cluster: ClusterId, by: String },
    #[error("cluster {cluster}: kubeconfig unusable: {reason}")]
    BadKubeconfig { cluster: ClusterId, reason: String },
}

impl Refusal {
    /// The metric reason label.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::OwnCluster(_) => "own_cluster",
            Refusal::Duplicate { .. } => "duplicate",
            Refusal::BadKubeconfig { .. } => "bad_kubeconfig",
        }
    }
}

/// A remote cluster being watched.
struct Remote {
    /// The secret (namespace/name) that provides it.
    secret: String,
    /// The kubeconfig it was started with, to tell a rotation from a resync.
    kubeconfig: Vec<u8>,
    task: JoinHandle<()>,
}

/// Watches remote secrets in `namespace` of the primary cluster and runs a
/// Kubernetes source per remote cluster, all feeding `updates`, keeping each remote
/// cluster's client in `clients` while its secret lasts. `refused` is called for every
/// refusal.
pub async fn run(
    own: ClusterId,
    primary: Client,
    namespace: String,
    updates: mpsc::Sender<Update>,
    clients: ClusterClients,
    refused: impl Fn(&Refusal) + Send + 'static,
) {
    let api = Api::<Secret>::namespaced(primary, &namespace);
    let cfg = watcher::Config::default().labels(&format!("{MULTICLUSTER_LABEL}=true"));
    let mut events = watcher::watcher(api, cfg).default_backoff().boxed();
    let mut remotes: HashMap<ClusterId, Remote> = HashMap::new();
    // During a relist, the secrets seen so far; at its end, the rest are gone.
    let mut relisting: Option<BTreeMap<String, Secret>> = None;
    let mut secrets: BTreeMap<String, Secret> = BTreeMap::new();
    while let Some(ev) = events.next().await {
        let changed: Vec<Secret> = match ev {
            Ok(Event::Init) => {
                relisting = Some(BTreeMap::new());
                continue;
            }
            Ok(Event::InitApply(s)) => {
                if let Some(r) = relisting.as_mut() {
                    r.insert(key(&s), s);
                }
                continue;
            }
            Ok(Event::InitDone) => {
                secrets = relisting.take().unwrap_or_default();
                secrets.values().cloned().collect()
            }
            Ok(Event::Apply(s)) => {
                secrets.insert(key(&s), s.clone());
                vec![s]
            }
            Ok(Event::Delete(s)) => {
                secrets.remove(&key(&s));
                vec![]
            }
            Err(e) => {
                tracing::warn!(error = %e, "watching remote secrets failed; retrying");
                continue;
            }
        };
        // Clusters whose secret is gone, or no longer names them: stop and prune.
        // (cluster, secret) pairs: a second secret claiming a cluster must not
        // unseat the one already providing it.
        let wanted: std::collections::HashSet<(ClusterId, String)> = secrets
            .iter()
            .flat_map(|(k, s)| clusters_of(s).into_iter().map(move |(c, _)| (c, k.clone())))
            .collect();
        let gone: Vec<ClusterId> = remotes
            .iter()
            .filter(|(c, r)| !wanted.contains(&((*c).clone(), r.secret.clone())))
            .map(|(c, _)| c.clone())
            .collect();
        for c in gone {
            if let Some(r) = remotes.remove(&c) {
                r.task.abort();
                clients.remove(&c);
                tracing::info!(cluster = %c, secret = r.secret, "remote cluster removed");
                if updates.send(Update::Removed(c)).await.is_err() {
                    return;
                }
            }
        }
        for s in changed {
            let secret = key(&s);
            for (cluster, kubeconfig) in clusters_of(&s) {
                if cluster == own {
                    refused(&Refusal::OwnCluster(cluster));
                    continue;
                }
                if let Some(r) = remotes.get(&cluster) {
                    if r.secret != secret {
                        refused(&Refusal::Duplicate {
                            cluster,
                            by: r.secret.clone(),
                        });
                        continue;
                    }
                    if r.kubeconfig == kubeconfig {
                        continue; // unchanged
                    }
                }
                match client_for(&kubeconfig).await {
                    Ok(client) => {
                        // Make before break: the new watch starts first; the cluster's
                        // last state serves until the new one has synced.
                        clients.insert(cluster.clone(), client.clone());
                        let task = tokio::spawn(kube_source::run(cluster.clone(), client, updates.clone()));
                        let old = remotes.insert(
                            cluster.clone(),
                            Remote {
                                secret: secret.clone(),
                                kubeconfig,
                                task,
                            },
                        );
                        match old {
                            Some(old) => {
                                old.task.abort();
                                tracing::info!(cluster = %cluster, secret, "remote cluster credentials rotated");
                            }
                            None => tracing::info!(cluster = %cluster, secret, "remote cluster added"),
                        }
                    }
                    Err(reason) => refused(&Refusal::BadKubeconfig { cluster, reason }),
                }
            }
        }
    }
}

fn key(s: &Secret) -> String {
    format!("{}/{}", s.namespace().unwrap_or_default(), s.name_any())
}

/// The (cluster ID, kubeconfig) pairs of a remote secret.
fn clusters_of(s: &Secret) -> Vec<(ClusterId, Vec<u8>)> {
    s.data
        .iter()
        .flatten()
        .map(|(k, v)| (ClusterId::new(k), v.0.clone()))
        .chain(
            s.string_data
                .iter()
                .flatten()
                .map(|(k, v)| (ClusterId::new(k), v.as_bytes().to_vec())),
        )
        .collect()
}

async fn client_for(kubeconfig: &[u8]) -> Result<Client, String> {
    let text = std::str::from_utf8(kubeconfig).map_err(|_| "not UTF-8".to_owned())?;
    let kc = Kubeconfig::from_yaml(text).map_err(|e| e.to_string())?;
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    Client::try_from(config).map_err(|e| e.to_string())
}
