//! Kubernetes mode: the objects each cluster needs, written to its API server with
//! create/replace (resourceVersion preconditions), and ours deleted when no longer needed.
//! Only objects labelled `app.kubernetes.io/managed-by: isthmus` are ever replaced or
//! deleted; a name taken by an object without the label is left alone and counted.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use kube::api::{Api, DeleteParams, DynamicObject, ListParams, PostParams, Preconditions};
use kube::core::{ApiResource, GroupVersionKind};
use kube::{Client, ResourceExt};
use mesh_vocab::ClusterId;
use tokio::sync::{mpsc, watch};

use super::{ISTHMUS, Kind, MANAGED_BY, Object, WritebackMetrics, desired, is_ours};
use crate::cluster_clients::ClusterClients;
use crate::kube_source::Update;
use crate::objects::ClusterObjects;

/// Every synced cluster's Services and ServiceExports: what [`desired`] reads.
pub type Inventory = BTreeMap<ClusterId, ClusterObjects>;

/// Passes every update on to `forward` (the publisher) and keeps `inventory` current from
/// them. Only Services and exports are kept: the rest of a cluster is not needed here.
pub async fn tee(
    mut updates: mpsc::Receiver<Update>,
    forward: mpsc::Sender<Update>,
    inventory: watch::Sender<Arc<Inventory>>,
) {
    while let Some(u) = updates.recv().await {
        match &u {
            Update::Objects(id, objects) => {
                let kept = ClusterObjects {
                    services: objects.services.clone(),
                    service_exports: objects.service_exports.clone(),
                    ..ClusterObjects::default()
                };
                inventory.send_modify(|i| {
                    Arc::make_mut(i).insert(id.clone(), kept);
                });
            }
            Update::Removed(id) => inventory.send_modify(|i| {
                Arc::make_mut(i).remove(id);
            }),
            // A silent cluster keeps its exports: removing ServiceEntries because an API
            // server is unreachable would break clients' DNS exactly when failover matters
            // (federation withdraws the endpoints themselves after the TTL).
            Update::Alive(_) | Update::Error(..) => {}
        }
        if forward.send(u).await.is_err() {
            return;
        }
    }
}

fn resource(kind: Kind) -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(kind.group(), kind.version(), kind.kind()),
        kind.plural(),
    )
}

fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

/// Whether `existing` (ours) already says what `want` says.
fn same(existing: &DynamicObject, want: &Object) -> bool {
    let meta = &want.body["metadata"];
    let labels = serde_json::to_value(existing.labels()).unwrap_or_default();
    let annotations = existing.annotations();
    labels == meta["labels"]
        && meta["annotations"]
            .as_object()
            .into_iter()
            .flatten()
            .all(|(k, v)| annotations.get(k).map(String::as_str) == v.as_str())
        && existing.data["spec"] == want.body["spec"]
}

/// Makes one cluster hold exactly `objects` of ours. Errors are per object and logged; the
/// next round retries them.
pub async fn reconcile(client: &Client, cluster: &ClusterId, objects: &[Object], metrics: &WritebackMetrics) {
    for kind in Kind::ALL {
        let ar = resource(kind);
        let all: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
        let ours = match all
            .list(&ListParams::default().labels(&format!("{MANAGED_BY}={ISTHMUS}")))
            .await
        {
            Ok(list) => list.items,
            Err(e) if is_status(&e, 404) => {
                tracing::warn!(%cluster, kind = kind.kind(), "write-back: the cluster does not serve this kind (CRD missing)");
                continue;
            }
            Err(e) => {
                tracing::warn!(%cluster, kind = kind.kind(), error = %e, "write-back: cannot list ours");
                continue;
            }
        };
        let mut ours: BTreeMap<(String, String), DynamicObject> = ours
            .into_iter()
            .map(|o| ((o.namespace().unwrap_or_default(), o.name_any()), o))
            .collect();
        for want in objects.iter().filter(|o| o.kind == kind) {
            let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &want.namespace, &ar);
            let Ok(mut body) = serde_json::from_value::<DynamicObject>(want.body.clone()) else {
                continue;
            };
            let op = match ours.remove(&(want.namespace.clone(), want.name.clone())) {
                Some(existing) if same(&existing, want) => continue,
                Some(existing) => {
                    body.metadata.resource_version = existing.resource_version();
                    api.replace(&want.name, &PostParams::default(), &body)
                        .await
                        .map(|_| "replace")
                }
                None => match api.create(&PostParams::default(), &body).await {
                    Err(e) if is_status(&e, 409) => {
                        // Not in our labelled list, so not ours unless it was made meanwhile.
                        match api.get_opt(&want.name).await {
                            Ok(Some(o)) if is_ours(&serde_json::to_value(&o).unwrap_or_default()) => continue,
                            _ => {
                                tracing::warn!(%cluster, kind = kind.kind(), namespace = want.namespace, name = want.name,
                                    "write-back: an object of our name is not ours; left alone");
                                metrics.conflict(cluster, kind);
                                continue;
                            }
                        }
                    }
                    r => r.map(|_| "create"),
                },
            };
            match op {
                Ok(op) => {
                    tracing::info!(%cluster, kind = kind.kind(), namespace = want.namespace, name = want.name, op, "write-back");
                    metrics.wrote(cluster, kind, op);
                }
                // We do not make namespaces: a service's namespace that exists only where
                // the service runs gets nothing in this cluster until someone makes it.
                Err(e) if is_status(&e, 404) => {
                    tracing::debug!(%cluster, namespace = want.namespace, "write-back: no such namespace here")
                }
                Err(e) => {
                    tracing::warn!(%cluster, kind = kind.kind(), namespace = want.namespace, name = want.name, error = %e, "write-back failed")
                }
            }
        }
        // What is left of ours is no longer needed. The preconditions make sure what is
        // deleted is what was listed: not an object someone re-labelled or re-made since.
        for ((ns, name), o) in ours {
            let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &ar);
            let dp = DeleteParams {
                preconditions: Some(Preconditions {
                    resource_version: o.resource_version(),
                    uid: o.uid(),
                }),
                ..DeleteParams::default()
            };
            match api.delete(&name, &dp).await {
                Ok(_) => {
                    tracing::info!(%cluster, kind = kind.kind(), namespace = ns, name, op = "delete", "write-back");
                    metrics.wrote(cluster, kind, "delete");
                }
                Err(e) if is_status(&e, 404) || is_status(&e, 409) => {}
                Err(e) => {
                    tracing::warn!(%cluster, kind = kind.kind(), namespace = ns, name, error = %e, "write-back: delete failed")
                }
            }
        }
    }
}

/// When the inventory may be trusted: every expected cluster has synced, or the sync bound
/// has passed. Before that, a cluster that has not listed yet would look like one that
/// exports nothing, and its objects in other clusters would be garbage-collected.
pub struct Readiness {
    pub expected: usize,
    pub deadline: tokio::time::Instant,
}

/// Writes into `targets` while `leader` is true: at every inventory change, on becoming
/// leader, and every `resync` (which also repairs objects someone changed or deleted).
/// Only clusters that have synced are written to: whether one has a Service of its own
/// decides what it gets. `targets` is current: a remote secret's cluster is written to
/// from its first sync until its secret goes.
pub async fn run(
    targets: ClusterClients,
    mut inventory: watch::Receiver<Arc<Inventory>>,
    mut leader: watch::Receiver<bool>,
    domain: String,
    ready: Readiness,
    resync: Duration,
    metrics: Arc<WritebackMetrics>,
) {
    loop {
        let is_leader = *leader.borrow_and_update();
        metrics.leader.set(i64::from(is_leader));
        let inv = inventory.borrow_and_update().clone();
        let trusted = inv.len() >= ready.expected || tokio::time::Instant::now() >= ready.deadline;
        if is_leader && trusted {
            let want = desired(&inv, &domain);
            let round = async {
                for cluster in targets.ids().iter().filter(|c| inv.contains_key(*c)) {
                    // Gone since the round began (its secret deleted): nothing to write with.
                    let Some(client) = targets.get(cluster) else { continue };
                    let objects = want.get(cluster).map(Vec::as_slice).unwrap_or_default();
                    reconcile(&client, cluster, objects, &metrics).await;
                }
            };
            // A round can take long (the client retries an unavailable API server with
            // backoff); it must not go on writing once another replica may lead.
            let mut lost = leader.clone();
            tokio::select! {
                () = round => {}
                _ = lost.wait_for(|l| !*l) => tracing::warn!("leadership lost: write-back round abandoned"),
            }
        }
        let wait = if is_leader && !trusted {
            tokio::time::sleep_until(ready.deadline)
        } else {
            tokio::time::sleep(resync)
        };
        tokio::select! {
            r = inventory.changed() => if r.is_err() { return },
            r = leader.changed() => if r.is_err() { return },
            () = wait => {}
        }
    }
}
