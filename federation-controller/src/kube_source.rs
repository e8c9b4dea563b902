//! The Kubernetes source: one cluster's API server, watched with kube-runtime's
//! watchers (list, then watch from the list's resourceVersion, with bookmarks;
//! a `410 Gone` or a dropped watch makes the watcher relist or resume on its own).
//!
//! It publishes the cluster's objects only once every kind has finished its
//! initial list, and then after every burst of changes (events that are already
//! waiting are taken together), so federation never sees a half-listed cluster.

use std::collections::BTreeMap;
use std::time::Duration;

use futures_util::stream::{self, BoxStream, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, Resource, ResourceExt};
use mesh_vocab::ClusterId;
use tokio::sync::mpsc;

use crate::networking::{
    DestinationRule, Gateway, HttpRoute, ReferenceGrant, ServiceEntry, VirtualService, WorkloadEntry,
};
use crate::objects::{ClusterObjects, ServiceExport};
use crate::security::{AuthorizationPolicy, PeerAuthentication};

/// What a cluster source reports.
#[derive(Debug, Clone)]
pub enum Update {
    /// Every object of the cluster, after the initial sync and after each change.
    /// (Boxed: a cluster's objects dwarf the other variants.)
    Objects(ClusterId, Box<ClusterObjects>),
    /// The watches are healthy though nothing changed: the cluster is not silent.
    Alive(ClusterId),
    /// The cluster left the mesh (its remote secret was deleted): prune it.
    Removed(ClusterId),
    /// The API server answered with an error; the watcher retries with backoff.
    Error(ClusterId, String),
}

/// How often a quiet but healthy cluster says it is alive.
const HEARTBEAT: Duration = Duration::from_secs(5);

/// One event of any watched kind (boxed: a Pod is kilobytes, a Namespace is not).
enum Any {
    Namespace(Box<Event<Namespace>>),
    Service(Box<Event<Service>>),
    EndpointSlice(Box<Event<EndpointSlice>>),
    Pod(Box<Event<Pod>>),
    Node(Box<Event<Node>>),
    ServiceExport(Box<Event<ServiceExport>>),
    AuthorizationPolicy(Box<Event<AuthorizationPolicy>>),
    PeerAuthentication(Box<Event<PeerAuthentication>>),
    VirtualService(Box<Event<VirtualService>>),
    DestinationRule(Box<Event<DestinationRule>>),
    ServiceEntry(Box<Event<ServiceEntry>>),
    WorkloadEntry(Box<Event<WorkloadEntry>>),
    Gateway(Box<Event<Gateway>>),
    HttpRoute(Box<Event<HttpRoute>>),
    ReferenceGrant(Box<Event<ReferenceGrant>>),
    /// The cluster does not serve this optional kind (its CRD is not installed): it has none.
    Missing(Optional),
}

/// The kinds a cluster may not serve at all, because they come with a CRD.
#[derive(Debug, Clone, Copy)]
enum Optional {
    ServiceExport,
    AuthorizationPolicy,
    PeerAuthentication,
    VirtualService,
    DestinationRule,
    ServiceEntry,
    WorkloadEntry,
    Gateway,
    HttpRoute,
    ReferenceGrant,
}

/// The objects of one kind, by namespace/name, and its initial-list state.
struct Kind<K> {
    objects: BTreeMap<(String, String), K>,
    /// Objects of a relist in progress; they replace `objects` at `InitDone`.
    relisting: Option<BTreeMap<(String, String), K>>,
    synced: bool,
}

impl<K: Resource + Clone> Kind<K> {
    fn new() -> Self {
        Self {
            objects: BTreeMap::new(),
            relisting: None,
            synced: false,
        }
    }

    fn key(k: &K) -> (String, String) {
        (k.namespace().unwrap_or_default(), k.name_any())
    }

    /// Applies one event; returns whether what is published may have changed.
    fn apply(&mut self, e: Event<K>) -> bool {
        match e {
            Event::Init => {
                self.relisting = Some(BTreeMap::new());
                false
            }
            Event::InitApply(k) => {
                if let Some(r) = self.relisting.as_mut() {
                    r.insert(Self::key(&k), k);
                }
                false
            }
            Event::InitDone => {
                if let Some(r) = self.relisting.take() {
                    self.objects = r;
                }
                self.synced = true;
                true
            }
            Event::Apply(k) => {
                self.objects.insert(Self::key(&k), k);
                true
            }
            Event::Delete(k) => {
                self.objects.remove(&Self::key(&k));
                true
            }
        }
    }

    /// The kind is not served: there are none. Returns whether that changed anything.
    fn none(&mut self) -> bool {
        let changed = !self.synced || !self.objects.is_empty();
        self.objects.clear();
        self.synced = true;
        changed
    }

    fn all(&self) -> Vec<K> {
        self.objects.values().cloned().collect()
    }
}

fn watch<K>(client: &Client, wrap: fn(Box<Event<K>>) -> Any) -> BoxStream<'static, Result<Any, watcher::Error>>
where
    K: Resource<DynamicType = ()> + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
{
    let cfg = watcher::Config::default();
    watcher::watcher(Api::<K>::all(client.clone()), cfg)
        .default_backoff()
        .map(move |r| r.map(|e| wrap(Box::new(e))))
        .boxed()
}

/// Watches a kind that comes with a CRD (MCS `ServiceExport`, Istio's networking
/// kinds, Gateway API's `HTTPRoute` — watched as `v1`, which every Gateway API release
/// since 1.0 serves — and `ReferenceGrant`, watched as `v1beta1`). Many clusters lack it: the list's `404` means "none of these", so the
/// cluster still syncs; the watcher keeps retrying with backoff, and picks the
/// objects up once the CRD is installed. A `403` (RBAC written before the controller
/// read this kind) is taken the same way, with a warning, so a cluster whose role does
/// not grant it still serves its endpoints.
fn optional<K>(
    client: &Client,
    wrap: fn(Box<Event<K>>) -> Any,
    kind: Optional,
) -> BoxStream<'static, Result<Any, watcher::Error>>
where
    K: Resource<DynamicType = ()> + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
{
    watch::<K>(client, wrap)
        .map(move |r| match r {
            Err(watcher::Error::InitialListFailed(kube::Error::Api(s))) if s.code == 404 => Ok(Any::Missing(kind)),
            Err(watcher::Error::InitialListFailed(kube::Error::Api(s))) if s.code == 403 => {
                tracing::warn!(?kind, reason = %s.message, "not allowed to list this kind: reading none of it");
                Ok(Any::Missing(kind))
            }
            other => other,
        })
        .boxed()
}

/// Watches one cluster until `tx` is closed.
pub async fn run(id: ClusterId, client: Client, tx: mpsc::Sender<Update>) {
    let mut events = stream::select_all([
        watch::<Namespace>(&client, Any::Namespace),
        watch::<Service>(&client, Any::Service),
        watch::<EndpointSlice>(&client, Any::EndpointSlice),
        watch::<Pod>(&client, Any::Pod),
        watch::<Node>(&client, Any::Node),
        optional::<ServiceExport>(&client, Any::ServiceExport, Optional::ServiceExport),
        optional::<AuthorizationPolicy>(&client, Any::AuthorizationPolicy, Optional::AuthorizationPolicy),
        optional::<PeerAuthentication>(&client, Any::PeerAuthentication, Optional::PeerAuthentication),
        optional::<VirtualService>(&client, Any::VirtualService, Optional::VirtualService),
        optional::<DestinationRule>(&client, Any::DestinationRule, Optional::DestinationRule),
        optional::<ServiceEntry>(&client, Any::ServiceEntry, Optional::ServiceEntry),
        optional::<WorkloadEntry>(&client, Any::WorkloadEntry, Optional::WorkloadEntry),
        optional::<Gateway>(&client, Any::Gateway, Optional::Gateway),
        optional::<HttpRoute>(&client, Any::HttpRoute, Optional::HttpRoute),
        optional::<ReferenceGrant>(&client, Any::ReferenceGrant, Optional::ReferenceGrant),
    ]);
    let (mut authz, mut peer_authn) = (Kind::new(), Kind::new());
    let (mut vs, mut dr, mut se, mut routes) = (Kind::new(), Kind::new(), Kind::new(), Kind::new());
    let (mut we, mut gw, mut grants) = (Kind::new(), Kind::new(), Kind::new());
    let (mut ns, mut svc, mut eps, mut pods, mut nodes, mut exports) = (
        Kind::new(),
        Kind::new(),
        Kind::new(),
        Kind::new(),
        Kind::new(),
        Kind::new(),
    );
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    let mut failing = false;
    loop {
        let first = tokio::select! {
            e = events.next() => match e {
                Some(e) => e,
                None => return,
            },
            _ = heartbeat.tick() => {
                // Only a source whose watches work may vouch for its cluster.
                if !failing && tx.send(Update::Alive(id.clone())).await.is_err() {
                    return;
                }
                continue;
            }
        };
        let mut changed = false;
        let mut next = Some(first);
        // Take every event that is already waiting before publishing once.
        while let Some(ev) = next.take() {
            if ev.is_ok() {
                failing = false;
            }
            match ev {
                Ok(Any::Namespace(e)) => changed |= ns.apply(*e),
                Ok(Any::Service(e)) => changed |= svc.apply(*e),
                Ok(Any::EndpointSlice(e)) => changed |= eps.apply(*e),
                Ok(Any::Pod(e)) => changed |= pods.apply(*e),
                Ok(Any::Node(e)) => changed |= nodes.apply(*e),
                Ok(Any::ServiceExport(e)) => changed |= exports.apply(*e),
                Ok(Any::AuthorizationPolicy(e)) => changed |= authz.apply(*e),
                Ok(Any::PeerAuthentication(e)) => changed |= peer_authn.apply(*e),
                Ok(Any::VirtualService(e)) => changed |= vs.apply(*e),
                Ok(Any::DestinationRule(e)) => changed |= dr.apply(*e),
                Ok(Any::ServiceEntry(e)) => changed |= se.apply(*e),
                Ok(Any::WorkloadEntry(e)) => changed |= we.apply(*e),
                Ok(Any::Gateway(e)) => changed |= gw.apply(*e),
                Ok(Any::HttpRoute(e)) => changed |= routes.apply(*e),
                Ok(Any::ReferenceGrant(e)) => changed |= grants.apply(*e),
                Ok(Any::Missing(kind)) => {
                    changed |= match kind {
                        Optional::ServiceExport => exports.none(),
                        Optional::AuthorizationPolicy => authz.none(),
                        Optional::PeerAuthentication => peer_authn.none(),
                        Optional::VirtualService => vs.none(),
                        Optional::DestinationRule => dr.none(),
                        Optional::ServiceEntry => se.none(),
                        Optional::WorkloadEntry => we.none(),
                        Optional::Gateway => gw.none(),
                        Optional::HttpRoute => routes.none(),
                        Optional::ReferenceGrant => grants.none(),
                    }
                }
                Err(e) => {
                    failing = true;
                    tracing::warn!(cluster = %id, error = %e, "watch failed; retrying");
                    if tx.send(Update::Error(id.clone(), e.to_string())).await.is_err() {
                        return;
                    }
                }
            }
            next = futures_util::FutureExt::now_or_never(events.next()).flatten();
        }
        let synced = ns.synced
            && svc.synced
            && eps.synced
            && pods.synced
            && nodes.synced
            && exports.synced
            && authz.synced
            && peer_authn.synced
            && vs.synced
            && dr.synced
            && se.synced
            && we.synced
            && gw.synced
            && routes.synced
            && grants.synced;
        if changed && synced {
            let objects = ClusterObjects {
                namespaces: ns.all(),
                services: svc.all(),
                endpoint_slices: eps.all(),
                pods: pods.all(),
                nodes: nodes.all(),
                service_exports: exports.all(),
                authorization_policies: authz.all(),
                peer_authentications: peer_authn.all(),
                ..Default::default()
            };
            // The API server ran Istio's webhook only if istiod is installed: check
            // here too, and leave out (and report) what Istio would refuse.
            let objects = objects
                .with_networking(vs.all(), dr.all(), se.all(), we.all(), gw.all())
                .with_gateway_api(routes.all(), grants.all());
            for e in &objects.refused {
                tracing::warn!(cluster = %id, error = %e, "Istio config refused");
            }
            if tx.send(Update::Objects(id.clone(), Box::new(objects))).await.is_err() {
                return;
            }
        }
    }
}
