//! The xDS server: Envoy's v3 Aggregated Discovery Service, state of the world
//! and incremental (delta), for listeners (LDS), routes (RDS), clusters (CDS),
//! endpoints (EDS) and trust bundles (SDS), so our proxies, Envoy and proxyless
//! gRPC can all consume it (docs/l7-xds.md is the contract). Listeners map a
//! service's `VIP:port` to its cluster, or for an HTTP port to its routes
//! ([`listener`]); routes come from VirtualServices ([`routes`]); clusters carry
//! DestinationRules' subsets and policy ([`subsets`], [`policy`]); clusters and
//! endpoints carry Istio's auto-mTLS ([`mtls`]).
//! Proxyless gRPC clients get the shapes they accept instead, and routes
//! (RDS) ([`grpc`]): each proxy has a [`Generator`], as in Istio.
//! A sidecar also gets its workload's inbound listener ([`inbound`]), with
//! Istio's AuthorizationPolicy as RBAC filters ([`rbac`]).
//!
//! Each proxy gets its own view: its network and cluster come from Istio's node
//! metadata (`NETWORK`, `CLUSTER_ID`), so an Istio-style Envoy bootstrap works
//! unchanged — endpoints depend on the network, listeners on the cluster
//! ([`outbound::vips`]) — and names
//! follow Istio (`outbound|9080||reviews.default.svc.cluster.local`). Per type,
//! a stream remembers what it sent (version, nonce): an ACK is recorded, a NACK
//! is logged and counted and the proxy keeps its last good config — nothing is
//! resent until the state changes, so a proxy that rejects a config cannot cause
//! a resend storm.

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::Arc;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::cluster::v3::cluster::{ClusterDiscoveryType, DiscoveryType, EdsClusterConfig};
use envoy_types::pb::envoy::config::core::v3::{
    self as core, AggregatedConfigSource, ApiVersion, ConfigSource, SocketAddress, address, config_source,
    socket_address,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
};
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryService;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};
use envoy_types::pb::google::protobuf::{Any, UInt32Value};
use mesh_vocab::{ClusterId, NetworkId, SpiffeId};
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;

use crate::federation::{self, NetworkView, Resolved, View};
use crate::metrics::Metrics;
use crate::model::{ClusterModel, Locality, MeshConfig, ServiceKey};
use crate::networking::destination_rule::effective_policy;
use crate::outbound::{self, VipConflict, VipTable};
use crate::routing::Routing;
use crate::trust::BundleSet;
use budget::{PushBudget, Reservation};

pub mod budget;
pub mod grpc;
pub mod inbound;
pub mod listener;
pub mod locality;
pub mod mtls;
pub mod origination;
pub mod policy;
pub mod rbac;
pub mod routes;
pub mod subsets;

/// Type URL of listeners.
pub const LISTENER_TYPE: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
/// Type URL of route configurations.
pub const ROUTE_TYPE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
/// Type URL of clusters.
pub const CLUSTER_TYPE: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
/// Type URL of endpoints.
pub const ENDPOINT_TYPE: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
/// Type URL of secrets (SDS): trust bundles.
pub const SECRET_TYPE: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// The state served: every live cluster at one version.
#[derive(Debug)]
pub struct Snapshot {
    /// Grows with every change; sent as `version_info`.
    pub version: u64,
    /// When this state was made, for convergence time.
    pub created: std::time::Instant,
    /// Live cluster models, with whether each is stale.
    pub clusters: Vec<(Arc<ClusterModel>, bool)>,
    pub mesh: MeshConfig,
    /// The addresses of the gateways known by host name, as resolved so far
    /// ([`crate::resolve`]).
    pub resolved: Arc<Resolved>,
    /// Encoded resources per (network, cluster, generator, type), made once and
    /// shared by every proxy with the same: a push to a thousand proxies must not
    /// federate and encode a thousand times. The cluster is part of the key only
    /// where it matters (Envoy's listeners), so the rest is shared per network.
    cache: OnceMap<CacheKey, Arc<tokio::sync::OnceCell<Arc<Built>>>>,
    /// Federation's input indexed per service port.
    index: std::sync::OnceLock<Arc<federation::Index>>,
    /// The federated view per network, shared by every resource type.
    views: OnceMap<NetworkId, Arc<std::sync::OnceLock<Arc<NetworkView>>>>,
    /// The `VIP:port` table per proxy cluster (None: naming no served cluster).
    vip_tables: OnceMap<Option<ClusterId>, Arc<std::sync::OnceLock<Arc<VipTable>>>>,
    /// Who may serve each service port, the same for every proxy.
    identities: std::sync::OnceLock<Arc<Identities>>,
    /// The Istio traffic config of every live cluster, merged.
    routing: std::sync::OnceLock<Arc<Routing>>,
    /// What the snapshot before had computed ([`Snapshot::after`]).
    prior: Option<Arc<Prior>>,
}

/// What earlier snapshots computed, for a snapshot to reuse what did not change: a
/// service port whose instances are unchanged keeps its federated endpoints, and a
/// resource built from the same ones keeps its encoding, so one endpoint change costs
/// one service. It holds no prior of its own: at most one earlier state is kept.
#[derive(Debug, Default)]
struct Prior {
    index: Option<Arc<federation::Index>>,
    identities: Option<(String, Arc<Identities>)>,
    views: HashMap<NetworkId, Aged<Arc<NetworkView>>>,
    sets: HashMap<CacheKey, Aged<Arc<Built>>>,
}

/// A carried value, and how many snapshots in a row have not asked for it.
#[derive(Debug, Clone)]
struct Aged<V> {
    age: u8,
    value: V,
}

/// How many snapshots a value nobody asks for is carried: enough to outlast a burst of
/// snapshots replaced before any stream read them, few enough that the views of proxies
/// gone for good are let go.
const MAX_AGE: u8 = 3;

impl Prior {
    /// What `prev` computed, and what it was carrying and did not compute again.
    fn of(prev: &Snapshot) -> Self {
        let older = prev.prior.as_deref();
        Prior {
            index: prev
                .index
                .get()
                .cloned()
                .or_else(|| older.and_then(|o| o.index.clone())),
            identities: prev
                .identities
                .get()
                .map(|ids| (prev.mesh.trust_domain.clone(), ids.clone()))
                .or_else(|| older.and_then(|o| o.identities.clone())),
            views: carried(&prev.views, |c| c.get(), older.map(|o| &o.views)),
            sets: carried(&prev.cache, |c| c.get(), older.map(|o| &o.sets)),
        }
    }
}

/// The values computed in `now`, and those of `older` one snapshot older, while not too old.
fn carried<K: Clone + Eq + std::hash::Hash, C, V: Clone>(
    now: &OnceMap<K, Arc<C>>,
    get: impl Fn(&C) -> Option<&V>,
    older: Option<&HashMap<K, Aged<V>>>,
) -> HashMap<K, Aged<V>> {
    let mut out: HashMap<K, Aged<V>> = older
        .into_iter()
        .flatten()
        .filter(|(_, a)| a.age < MAX_AGE)
        .map(|(k, a)| {
            let aged = Aged {
                age: a.age + 1,
                value: a.value.clone(),
            };
            (k.clone(), aged)
        })
        .collect();
    for (k, cell) in now.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        if let Some(v) = get(cell) {
            out.insert(
                k.clone(),
                Aged {
                    age: 0,
                    value: v.clone(),
                },
            );
        }
    }
    out
}

/// A proxy's wildcard listeners' ports and the hosts each finds ([`Snapshot::wildcard_ports`]).
struct WildcardPorts {
    by_sni: BTreeMap<u16, Vec<ServiceKey>>,
    by_host: BTreeMap<u16, Vec<ServiceKey>>,
}

/// One cache entry: the resources, and what each load assignment in it was built from.
#[derive(Debug, Default)]
struct Built {
    set: EncodedSet,
    sources: HashMap<String, Source>,
}

/// What a load assignment was built from: federated endpoints (compared by pointer,
/// which [`NetworkView`] keeps for unchanged services) and the locality setting applied.
#[derive(Debug, Clone)]
struct Source {
    endpoints: Arc<Vec<federation::LbEndpoint>>,
    local: Option<String>,
}

/// A resource as built, with what it was built from if that is federated endpoints.
type Item = (Arc<Encoded>, Option<Source>);

/// Builds one cache entry from the entry the snapshot before had under the same key:
/// a resource whose inputs are the same is that one, not encoded again.
struct Reuse<'a> {
    prior: Option<&'a Built>,
    by_name: HashMap<&'a str, &'a Arc<Encoded>>,
}

impl<'a> Reuse<'a> {
    fn new(prior: Option<&'a Built>) -> Self {
        let by_name = prior
            .into_iter()
            .flat_map(|p| p.set.iter())
            .map(|e| (e.name.as_str(), e))
            .collect();
        Self { prior, by_name }
    }

    /// The prior resource `name` if it has `version`, else one `encode` makes.
    fn versioned(&self, name: String, version: String, encode: impl FnOnce() -> Any) -> Item {
        let e = match self.by_name.get(name.as_str()) {
            Some(e) if e.version == version => Arc::clone(e),
            _ => Arc::new(Encoded {
                resource: encode(),
                name,
                version,
            }),
        };
        (e, None)
    }

    /// The prior resource `name` if it was built from `source`, else one `build` makes
    /// (the resource and its version): versions of load assignments hash every endpoint,
    /// which is what reuse spares.
    fn sourced(&self, name: String, source: Source, build: impl FnOnce() -> (Any, String)) -> Item {
        let same = self
            .prior
            .and_then(|p| p.sources.get(&name))
            .is_some_and(|s| Arc::ptr_eq(&s.endpoints, &source.endpoints) && s.local == source.local);
        let e = match self.by_name.get(name.as_str()) {
            Some(e) if same => Arc::clone(e),
            _ => {
                let (resource, version) = build();
                Arc::new(Encoded {
                    name,
                    resource,
                    version,
                })
            }
        };
        (e, Some(source))
    }

    /// The entry of `items`, sorted by name; its set is the prior one itself when every
    /// resource is, so a stream can tell by pointer that it has nothing to send, and
    /// otherwise says what changed since the prior one, so a stream that had that one
    /// looks at nothing else.
    fn finish(self, mut items: Vec<Item>) -> Built {
        items.sort_by(|a, b| a.0.name.cmp(&b.0.name));
        let sources = items
            .iter()
            .filter_map(|(e, s)| Some((e.name.clone(), s.clone()?)))
            .collect();
        let list: Vec<Arc<Encoded>> = items.into_iter().map(|(e, _)| e).collect();
        let Some(prior) = self.prior else {
            return Built {
                set: Arc::new(Resources { list, since: None }),
                sources,
            };
        };
        let changed: Vec<usize> = (0..list.len())
            .filter(|&i| {
                let e = &list[i];
                self.by_name.get(e.name.as_str()).is_none_or(|p| !Arc::ptr_eq(p, e))
            })
            .collect();
        let names: std::collections::HashSet<&str> = list.iter().map(|e| e.name.as_str()).collect();
        let removed: Vec<String> = prior
            .set
            .iter()
            .filter(|e| !names.contains(e.name.as_str()))
            .map(|e| e.name.clone())
            .collect();
        let set = if changed.is_empty() && removed.is_empty() {
            prior.set.clone()
        } else {
            let since = Since {
                base: Arc::downgrade(&prior.set),
                changed,
                removed,
            };
            Arc::new(Resources {
                list,
                since: Some(since),
            })
        };
        Built { set, sources }
    }
}

/// What encoded resources are shared by: (network, cluster, generator, type URL,
/// what of the proxy itself they depend on). The last is set only where needed,
/// so proxies share one encoding whenever they can.
type CacheKey = (NetworkId, Option<ClusterId>, Generator, String, Option<PerProxy>);

/// What of the proxy itself resources may depend on.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum PerProxy {
    /// Routes, while some VirtualService matches on `sourceLabels`/`sourceNamespace`:
    /// the proxy's namespace and labels.
    Source(Option<String>, BTreeMap<String, String>),
    /// Endpoints, while some DestinationRule makes balancing locality-aware: the
    /// proxy's locality.
    Locality(Locality),
    /// A sidecar's listeners: its inbound listener is made of its workload's policies.
    Inbound(inbound::Inbound),
    /// A sidecar's clusters: its inbound clusters are made of its workload's ports.
    InboundPorts(Vec<(u16, crate::model::Protocol)>),
    /// A gateway's clusters and endpoints: those of what its network exposes (the
    /// endpoints for its locality, while that matters).
    Gateway(Option<Locality>),
    /// Listeners, while some VirtualService's TCP/TLS route matches on
    /// `sourceLabels`/`sourceNamespace`: the inbound listener, namespace and labels.
    Listeners(Option<inbound::Inbound>, Option<String>, BTreeMap<String, String>),
}

/// Per service port, the SPIFFE IDs that may answer for it.
type Identities = BTreeMap<ServiceKey, Vec<SpiffeId>>;

/// What the resources a proxy is served depend on, from its node.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ProxyView {
    /// Its network (`NETWORK`): which endpoints it reaches directly.
    pub network: NetworkId,
    /// Its cluster (`CLUSTER_ID`): what a ClusterIP means to it.
    pub cluster: Option<ClusterId>,
    pub generator: Generator,
    /// A sidecar (not a gateway): it gets an inbound listener for its workload.
    pub sidecar: Option<inbound::SidecarNode>,
    /// A gateway (`router~…`): on a network whose `AUTO_PASSTHROUGH` Gateway names what
    /// it exposes, it is served those services only, so an SNI for another is refused
    /// there (Istio's east-west gateway has a chain per exposed host, and no other).
    pub gateway: bool,
    /// Its workload's namespace (`NAMESPACE`), for `sourceNamespace` matches.
    pub namespace: Option<String>,
    /// Its workload's labels (`LABELS`, a Struct of strings), for `sourceLabels` matches.
    pub labels: BTreeMap<String, String>,
    /// Where it runs (`Node.locality`), for locality-aware endpoints.
    pub locality: Locality,
}

impl ProxyView {
    /// The view of `node`, from Istio's metadata keys.
    pub fn of(node: &core::Node) -> Self {
        ProxyView {
            network: NetworkId::new(node_metadata(node, "NETWORK").unwrap_or_default()),
            cluster: node_metadata(node, "CLUSTER_ID")
                .filter(|c| !c.is_empty())
                .map(ClusterId::new),
            generator: Generator::of(node),
            sidecar: inbound::SidecarNode::of(node).filter(|_| Generator::of(node) == Generator::Envoy),
            gateway: node.id.starts_with("router~"),
            namespace: node_metadata(node, "NAMESPACE").filter(|n| !n.is_empty()),
            labels: node_labels(node),
            locality: node
                .locality
                .as_ref()
                .map(|l| Locality {
                    region: l.region.clone(),
                    zone: l.zone.clone(),
                    subzone: l.sub_zone.clone(),
                })
                .unwrap_or_default(),
        }
    }

    /// An Envoy proxy on `network` of no particular cluster.
    pub fn envoy(network: &NetworkId) -> Self {
        ProxyView {
            network: network.clone(),
            cluster: None,
            generator: Generator::Envoy,
            sidecar: None,
            gateway: false,
            namespace: None,
            labels: BTreeMap::new(),
            locality: Locality::default(),
        }
    }

    fn requester(&self) -> routes::Requester<'_> {
        routes::Requester {
            namespace: self.namespace.as_deref(),
            labels: &self.labels,
        }
    }
}

/// Which shapes of resources a proxy is served, from its node (Istio's
/// `GENERATOR` metadata): a gRPC client refuses some of Envoy's and needs routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Generator {
    Envoy,
    /// Proxyless gRPC ([`grpc`]).
    Grpc,
}

impl Generator {
    /// The generator for `node`.
    pub fn of(node: &core::Node) -> Self {
        if grpc::is_proxyless(node) {
            Generator::Grpc
        } else {
            Generator::Envoy
        }
    }

    /// Whether a request naming nothing asks for everything. gRPC always names
    /// what it wants, and names nothing once it wants none.
    fn wildcard_on_empty(self) -> bool {
        self == Generator::Envoy
    }
}

/// Values computed at most once per key and shared.
type OnceMap<K, V> = std::sync::Mutex<HashMap<K, V>>;

/// Every resource of one type for one network; resources that did not change are
/// shared with the snapshot before.
pub type EncodedSet = Arc<Resources>;

/// Every resource of one type for one network, sorted by name, and what changed since
/// the set the snapshot before had under the same key.
#[derive(Debug, Default)]
pub struct Resources {
    list: Vec<Arc<Encoded>>,
    since: Option<Since>,
}

impl std::ops::Deref for Resources {
    type Target = [Arc<Encoded>];
    fn deref(&self) -> &Self::Target {
        &self.list
    }
}

/// How a set differs from the one before it: the resources (positions) new or changed,
/// and the names gone. It does not keep the one before alive: a stream holding that one
/// knows it by pointer, and no one else needs it.
#[derive(Debug)]
struct Since {
    base: std::sync::Weak<Resources>,
    changed: Vec<usize>,
    removed: Vec<String>,
}

impl Resources {
    /// What changed since `base`, if this set says so (`base` is the set before it).
    fn since(&self, base: &EncodedSet) -> Option<&Since> {
        self.since
            .as_ref()
            .filter(|s| std::ptr::eq(s.base.as_ptr(), Arc::as_ptr(base)))
    }
}

/// One resource, encoded, with its content version.
#[derive(Debug)]
pub struct Encoded {
    pub name: String,
    pub resource: Any,
    pub version: String,
}

impl Snapshot {
    /// A snapshot at `version`.
    pub fn new(
        version: u64,
        created: std::time::Instant,
        clusters: Vec<(Arc<ClusterModel>, bool)>,
        mesh: MeshConfig,
    ) -> Self {
        Self {
            version,
            created,
            clusters,
            mesh,
            resolved: Default::default(),
            cache: Default::default(),
            views: Default::default(),
            vip_tables: Default::default(),
            identities: Default::default(),
            routing: Default::default(),
            index: Default::default(),
            prior: None,
        }
    }

    /// This snapshot, reusing what `prev` (the state it follows) computed: services whose
    /// inputs did not change keep their federated endpoints and encoded resources, so a
    /// change costs what changed. Without it a snapshot computes everything anew; either
    /// way it serves the same.
    pub fn after(mut self, prev: &Snapshot) -> Self {
        self.prior = Some(Arc::new(Prior::of(prev)));
        self
    }

    /// Every resource of `type_url` for proxies of `proxy`'s view, sorted by
    /// name. The first stream to ask builds it; the others wait for that one
    /// rather than all federating the same state at once after a change.
    pub async fn encoded(&self, proxy: &ProxyView, type_url: &str) -> EncodedSet {
        let (network, generator) = (&proxy.network, proxy.generator);
        let cluster = match (generator, type_url) {
            (Generator::Envoy, LISTENER_TYPE) => self.served_cluster(proxy.cluster.as_ref()),
            _ => None,
        };
        let inbound = match (&proxy.sidecar, type_url) {
            (Some(node), LISTENER_TYPE) => Some(self.inbound(node, cluster.as_ref())),
            _ => None,
        };
        // A sidecar's clusters include its inbound ones, made of its workload's ports.
        let inbound_ports = match (&proxy.sidecar, type_url) {
            (Some(node), CLUSTER_TYPE) => {
                let models: Vec<&ClusterModel> = self.clusters.iter().map(|(m, _)| m.as_ref()).collect();
                Some(node.ports(&models))
            }
            _ => None,
        };
        let per_proxy = match type_url {
            LISTENER_TYPE if self.routing().l4_depends_on_source() => Some(PerProxy::Listeners(
                inbound.clone(),
                proxy.namespace.clone(),
                proxy.labels.clone(),
            )),
            LISTENER_TYPE => inbound.clone().map(PerProxy::Inbound),
            CLUSTER_TYPE if proxy.gateway => Some(PerProxy::Gateway(None)),
            CLUSTER_TYPE => inbound_ports.clone().map(PerProxy::InboundPorts),
            ROUTE_TYPE if self.routing().depends_on_source() => {
                Some(PerProxy::Source(proxy.namespace.clone(), proxy.labels.clone()))
            }
            ENDPOINT_TYPE if generator == Generator::Envoy && self.routing().locality_aware() => {
                let locality = proxy.locality.clone();
                Some(match proxy.gateway {
                    true => PerProxy::Gateway(Some(locality)),
                    false => PerProxy::Locality(locality),
                })
            }
            ENDPOINT_TYPE if proxy.gateway => Some(PerProxy::Gateway(None)),
            _ => None,
        };
        let key = (
            network.clone(),
            cluster.clone(),
            generator,
            type_url.to_owned(),
            per_proxy,
        );
        let prior = self
            .prior
            .as_ref()
            .and_then(|p| p.sets.get(&key))
            .map(|a| a.value.clone());
        let cell = self
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key)
            .or_default()
            .clone();
        cell.get_or_init(|| async {
            let reuse = Reuse::new(prior.as_deref());
            let mut items = self.resources(type_url, network, cluster.as_ref(), proxy, &reuse);
            if let Some(i) = &inbound {
                let l = i.listener();
                items.push(reuse.versioned(l.name.clone(), stable_hash(i), || any(LISTENER_TYPE, &l)));
            }
            if let Some(ports) = &inbound_ports {
                for c in inbound::clusters(ports) {
                    let version = stable_hash(&(&c.name, ports));
                    items.push(reuse.versioned(c.name.clone(), version, || any(CLUSTER_TYPE, &c)));
                }
            }
            Arc::new(reuse.finish(items))
        })
        .await
        .set
        .clone()
    }

    /// What the inbound listener of the sidecar `node` in `cluster` (a served one,
    /// or None: then every cluster's policies) is made of.
    fn inbound(&self, node: &inbound::SidecarNode, cluster: Option<&ClusterId>) -> inbound::Inbound {
        let models: Vec<&ClusterModel> = self
            .clusters
            .iter()
            .map(|(m, _)| m.as_ref())
            .filter(|m| cluster.is_none_or(|c| &m.cluster == c))
            .collect();
        node.inbound(&models, &self.mesh.trust_domain)
    }

    /// This snapshot with the gateway addresses `resolved`.
    /// Nothing computed from the old addresses is kept (what came before, [`Self::after`], is).
    pub fn with_resolved(self, resolved: Arc<Resolved>) -> Self {
        Self {
            resolved,
            prior: self.prior,
            ..Snapshot::new(self.version, self.created, self.clusters, self.mesh)
        }
    }

    /// Whether `other` tells proxies the same thing (versions aside).
    pub fn same_state(&self, other: &Snapshot) -> bool {
        self.resolved == other.resolved
            && self.clusters.len() == other.clusters.len()
            && self
                .clusters
                .iter()
                .zip(&other.clusters)
                .all(|((a, s), (b, t))| a == b && s == t)
    }

    /// Federation's input indexed per service port, computed once per snapshot from the
    /// prior one: clusters whose model is the same are not indexed again.
    fn index(&self) -> Arc<federation::Index> {
        self.index
            .get_or_init(|| {
                let prior = self.prior.as_ref().and_then(|p| p.index.as_deref());
                Arc::new(federation::Index::new(
                    &self.clusters,
                    &self.mesh,
                    &self.resolved,
                    prior,
                ))
            })
            .clone()
    }

    /// The view of `network`, computed once per snapshot, federating again only the
    /// service ports whose inputs changed since the prior snapshot's.
    fn shared_view(&self, network: &NetworkId) -> Arc<NetworkView> {
        let cell = self
            .views
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(network.clone())
            .or_default()
            .clone();
        cell.get_or_init(|| {
            let index = self.index();
            let routing = self.routing();
            let prior = self.prior.as_ref().and_then(|p| p.views.get(network));
            let before = prior.map(|a| a.value.clone()).unwrap_or_default();
            Arc::new(before.next(network, &index, |k| routing.subsets(std::iter::once(k))))
        })
        .clone()
    }

    /// `cluster` if it is one this snapshot serves: a node naming another (or
    /// Istio's default, `Kubernetes`) has no own cluster here, and shares the
    /// table of nodes that name none.
    fn served_cluster(&self, cluster: Option<&ClusterId>) -> Option<ClusterId> {
        cluster
            .filter(|c| self.clusters.iter().any(|(m, _)| &m.cluster == *c))
            .cloned()
    }

    /// Which service each `VIP:port` stands for to a proxy in `cluster`
    /// ([`outbound::vips`]), computed once per snapshot and cluster.
    pub fn vip_table(&self, cluster: Option<&ClusterId>) -> Arc<VipTable> {
        let cluster = self.served_cluster(cluster);
        let cell = self
            .vip_tables
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(cluster.clone())
            .or_default()
            .clone();
        cell.get_or_init(|| {
            let models = self.clusters.iter().map(|(m, _)| m.as_ref());
            Arc::new(outbound::vips(cluster.as_ref(), models))
        })
        .clone()
    }

    /// The `VIP:port` conflicts proxies of the served clusters see, each
    /// cluster's own. Nodes that name no served cluster get every cluster's VIPs
    /// merged, whose clashes are expected wherever clusters share a service range,
    /// so they are not counted: such nodes should name their cluster.
    pub fn vip_conflicts(&self) -> Vec<VipConflict> {
        self.clusters
            .iter()
            .flat_map(|(m, _)| self.vip_table(Some(&m.cluster)).conflicts.clone())
            .collect()
    }

    /// The merged Istio traffic config, computed once per snapshot.
    pub fn routing(&self) -> Arc<Routing> {
        self.routing
            .get_or_init(|| {
                let models = self.clusters.iter().map(|(m, _)| m.as_ref());
                Arc::new(Routing::merge(models, &self.mesh.domain))
            })
            .clone()
    }

    /// The route configurations of every HTTP service port, for `proxy`.
    fn route_configs(&self, proxy: &ProxyView, client: routes::Client, reuse: &Reuse) -> Vec<Item> {
        let routing = self.routing();
        // Route configurations hold no map with more than one entry, so their bytes are
        // canonical and may stand for the version.
        let item = |r: envoy_types::pb::envoy::config::route::v3::RouteConfiguration| {
            let resource = any(ROUTE_TYPE, &r);
            let version = stable_hash(&resource.value);
            reuse.versioned(r.name, version, || resource)
        };
        let wildcard = match client {
            routes::Client::Envoy => self.wildcard_ports(&proxy.network, proxy).by_host,
            routes::Client::Grpc => BTreeMap::new(),
        };
        let per_port = wildcard.iter().map(|(port, keys)| {
            let keys: Vec<&ServiceKey> = keys.iter().collect();
            routes::port_route_config(*port, &keys, &routing, proxy.requester(), client)
        });
        routing
            .http_ports()
            .map(|k| routes::route_config(k, &routing, proxy.requester(), client))
            .chain(per_port)
            .map(item)
            .collect()
    }

    /// Which service ports `proxy` is served: a gateway on a network whose `AUTO_PASSTHROUGH`
    /// Gateway names hosts, those hosts' only (what federation lets other networks reach
    /// there); everyone else, all.
    fn exposed_to(&self, proxy: &ProxyView, network: &NetworkId) -> impl Fn(&ServiceKey) -> bool + use<> {
        let index = proxy.gateway.then(|| self.index());
        let network = network.clone();
        move |k: &ServiceKey| index.as_ref().is_none_or(|i| i.exposes(&network, &k.host))
    }

    /// Who may serve each service port, computed once per snapshot; a service port whose
    /// instances did not change keeps the prior snapshot's.
    fn identities(&self) -> Arc<Identities> {
        self.identities
            .get_or_init(|| {
                let index = self.index();
                let td = &self.mesh.trust_domain;
                let prior = self.prior.as_ref().and_then(|p| {
                    let (_, ids) = p.identities.as_ref().filter(|(ptd, _)| ptd == td)?;
                    Some((p.index.as_deref()?, ids))
                });
                let ids = index.services().iter().map(|(k, inputs)| {
                    let kept = prior.and_then(|(pi, ids)| ids.get(k).filter(|_| index.unchanged(k, pi).is_some()));
                    let ids = match kept {
                        Some(ids) => ids.clone(),
                        None => outbound::identities_of(inputs.instances().map(|(_, _, i)| i), td),
                    };
                    (k.clone(), ids)
                });
                Arc::new(ids.collect())
            })
            .clone()
    }

    /// Every resource of `type_url` for a proxy on `network` (in `proxy_cluster`, for
    /// listeners), each the prior snapshot's where `reuse` finds it unchanged. A version is
    /// taken from what the resource is built from, which is sorted and canonical, not from
    /// its encoded bytes: protobuf map fields (endpoint metadata) encode in hash-map order,
    /// so equal resources could encode differently and be resent to every proxy on every
    /// change.
    fn resources(
        &self,
        type_url: &str,
        network: &NetworkId,
        proxy_cluster: Option<&ClusterId>,
        proxy: &ProxyView,
        reuse: &Reuse,
    ) -> Vec<Item> {
        if proxy.generator == Generator::Grpc {
            return self.grpc_resources(type_url, network, proxy, reuse);
        }
        match type_url {
            LISTENER_TYPE => {
                let routing = self.routing();
                self.vip_table(proxy_cluster)
                    .vips
                    .iter()
                    .map(|((vip, port), host)| {
                        let protocol = routing.protocol(&ServiceKey {
                            host: host.clone(),
                            port: *port,
                        });
                        let l = listener::listener(*vip, *port, host, protocol, &routing, proxy.requester());
                        let resource = any(LISTENER_TYPE, &l);
                        // Outbound listeners hold no map, so their bytes are canonical
                        // (and follow the host's TCP/TLS routes).
                        let version = stable_hash(&resource.value);
                        reuse.versioned(l.name.clone(), version, || resource)
                    })
                    .chain(self.wildcard_listeners(network, proxy).into_iter().map(|l| {
                        let resource = any(LISTENER_TYPE, &l);
                        let version = stable_hash(&resource.value);
                        reuse.versioned(l.name.clone(), version, || resource)
                    }))
                    .collect()
            }
            ROUTE_TYPE => self.route_configs(proxy, routes::Client::Envoy, reuse),
            CLUSTER_TYPE => {
                let identities = self.identities();
                let routing = self.routing();
                let td = &self.mesh.trust_domain;
                let exposed = self.exposed_to(proxy, network);
                self.shared_view(network)
                    .keys()
                    .filter(|k| exposed(k))
                    .flat_map(|k| {
                        let ids = identities.get(k).map(Vec::as_slice).unwrap_or_default();
                        // The rule is part of what a cluster is built from (serde_json of
                        // BTreeMaps is canonical); a host without one hashes as before.
                        let rule = routing
                            .destination_rule(&k.host)
                            .map(|(ns, dr)| (ns.to_owned(), serde_json::to_string(dr).unwrap_or_default()));
                        let protocol = routing.protocol(k);
                        subsets::clusters(k, &routing, ids).into_iter().map(move |c| {
                            let version = match &rule {
                                // The protocol decides the upstream HTTP of HTTP/2 ports.
                                None if protocol.is_http2() => stable_hash(&(k, ids, td, protocol)),
                                None => stable_hash(&(k, ids, td)),
                                Some(r) => stable_hash(&(k, ids, td, r, &c.name, protocol)),
                            };
                            reuse.versioned(c.name.clone(), version, || any(CLUSTER_TYPE, &c))
                        })
                    })
                    // What the wildcard listeners pass through to, when there are any.
                    .chain(
                        (!routing.sni_only().is_empty() || !routing.host_only().is_empty()).then(|| {
                            let c = inbound::outbound_passthrough();
                            reuse.versioned(c.name.clone(), stable_hash(&c.name), || any(CLUSTER_TYPE, &c))
                        }),
                    )
                    .collect()
            }
            ENDPOINT_TYPE => {
                let routing = self.routing();
                // The locality setting of a cluster's policy, where it asks for locality
                // priorities; None where it does not.
                let setting = |k: &ServiceKey, subset: Option<&str>| {
                    let (_, dr) = routing.destination_rule(&k.host)?;
                    let p = effective_policy(dr, subset, k.port);
                    if !locality::applies(&p) {
                        return None;
                    }
                    Some(p.load_balancer.as_ref().and_then(|lb| lb.locality_lb_setting.clone()))
                };
                let at = locality::Proxy {
                    locality: &proxy.locality,
                    network: &proxy.network,
                };
                let view = self.shared_view(network);
                let exposed = self.exposed_to(proxy, network);
                let services = view.endpoints().map(|(k, eps)| (k, None, cluster_name(k), eps));
                let subsets = view
                    .subset_endpoints()
                    .map(|(s, eps)| (&s.service, Some(s), subset_cluster_name(&s.service, &s.subset), eps));
                services
                    .chain(subsets)
                    .filter(|(k, ..)| exposed(k))
                    .map(|(k, subset, name, eps)| {
                        let setting = setting(k, subset.map(|s| s.subset.as_str()));
                        let local = setting.as_ref().map(|s| serde_json::to_string(s).unwrap_or_default());
                        let source = Source {
                            endpoints: eps.clone(),
                            local: local.clone(),
                        };
                        reuse.sourced(name.clone(), source, || {
                            let mut c = load_assignment(name, eps);
                            if let Some(s) = &setting {
                                locality::apply(&mut c, at, s.as_ref());
                            }
                            let local = local.map(|l| (&proxy.locality, l));
                            let version = match subset {
                                None => stable_hash(&(k, &**eps, local)),
                                Some(s) => stable_hash(&(s, &**eps, local)),
                            };
                            (any(ENDPOINT_TYPE, &c), version)
                        })
                    })
                    .collect()
            }
            _ => Vec::new(),
        }
    }

    /// The wildcard listeners of `proxy`, one per port ([`Self::wildcard_ports`]).
    fn wildcard_listeners(
        &self,
        network: &NetworkId,
        proxy: &ProxyView,
    ) -> Vec<envoy_types::pb::envoy::config::listener::v3::Listener> {
        let WildcardPorts { by_sni, by_host } = self.wildcard_ports(network, proxy);
        let by_sni = by_sni.into_iter().map(|(port, keys)| {
            let keys: Vec<&ServiceKey> = keys.iter().collect();
            listener::sni_listener(port, &keys)
        });
        by_sni.chain(by_host.into_keys().map(listener::host_listener)).collect()
    }

    /// The ports of hosts without an address that `proxy` has clusters for, with those
    /// hosts: each port a wildcard listener, by SNI for TLS ports
    /// ([`listener::sni_listener`]) or by `Host` for HTTP ones, on route configuration
    /// `PORT` ([`listener::host_listener`]). A port with a host found by SNI is found by
    /// SNI only.
    fn wildcard_ports(&self, network: &NetworkId, proxy: &ProxyView) -> WildcardPorts {
        let routing = self.routing();
        let view = self.shared_view(network);
        let exposed = self.exposed_to(proxy, network);
        let by_port = |keys: &std::collections::BTreeSet<ServiceKey>| {
            let mut by_port: BTreeMap<u16, Vec<ServiceKey>> = BTreeMap::new();
            for key in keys.iter().filter(|k| view.reaches(k) && exposed(k)) {
                by_port.entry(key.port).or_default().push(key.clone());
            }
            by_port
        };
        let by_sni = by_port(routing.sni_only());
        let mut by_host = by_port(routing.host_only());
        by_host.retain(|port, _| !by_sni.contains_key(port));
        WildcardPorts { by_sni, by_host }
    }

    /// [`Self::resources`] for proxyless gRPC: per service port the proxy's
    /// network sees, its API listener, routes and plaintext cluster, and the
    /// endpoints it can reach without mTLS (none behind a gateway).
    fn grpc_resources(&self, type_url: &str, network: &NetworkId, proxy: &ProxyView, reuse: &Reuse) -> Vec<Item> {
        let view = self.shared_view(network);
        match type_url {
            LISTENER_TYPE => view
                .keys()
                .map(|k| {
                    let l = grpc::listener(k);
                    reuse.versioned(l.name.clone(), stable_hash(&(GRPC_SHAPES, k)), || {
                        any(LISTENER_TYPE, &l)
                    })
                })
                .collect(),
            // Every service port a gRPC client can dial has routes, whatever its port's name.
            ROUTE_TYPE => view
                .keys()
                .map(|k| {
                    let r = routes::route_config(k, &self.routing(), proxy.requester(), routes::Client::Grpc);
                    let resource = any(ROUTE_TYPE, &r);
                    let version = stable_hash(&(GRPC_SHAPES, &resource.value));
                    reuse.versioned(r.name, version, || resource)
                })
                .collect(),
            CLUSTER_TYPE => view
                .keys()
                .map(|k| (k, None))
                .chain(view.subsets().map(|(s, _)| (&s.service, Some(s.subset.as_str()))))
                .map(|(k, subset)| {
                    let c = grpc::cluster(k, subset);
                    let version = stable_hash(&(GRPC_SHAPES, k, subset));
                    reuse.versioned(c.name.clone(), version, || any(CLUSTER_TYPE, &c))
                })
                .collect(),
            ENDPOINT_TYPE => {
                let services = view.endpoints().map(|(k, eps)| (cluster_name(k), eps));
                let subsets = view
                    .subset_endpoints()
                    .map(|(k, eps)| (subset_cluster_name(&k.service, &k.subset), eps));
                services
                    .chain(subsets)
                    .map(|(name, eps)| {
                        let source = Source {
                            endpoints: eps.clone(),
                            local: None,
                        };
                        reuse.sourced(name.clone(), source, || {
                            let direct: Vec<federation::LbEndpoint> =
                                eps.iter().filter(|e| !e.via_gateway).cloned().collect();
                            let version = stable_hash(&(&name, &direct));
                            (any(ENDPOINT_TYPE, &load_assignment(name, &direct)), version)
                        })
                    })
                    .collect()
            }
            _ => Vec::new(),
        }
    }

    /// The endpoints a proxy on `network` sees.
    pub fn view(&self, network: &NetworkId) -> View {
        self.shared_view(network).view()
    }
}

/// Mixed into the versions of gRPC's resources, which are built from the key alone:
/// bump it when their shape changes, so clients holding the old one are sent the new.
const GRPC_SHAPES: u32 = 1;

/// Istio's cluster name for a service port (no subset).
pub fn cluster_name(key: &ServiceKey) -> String {
    format!("outbound|{}||{}", key.port, key.host)
}

/// Istio's cluster name for a subset of a service port.
pub fn subset_cluster_name(key: &ServiceKey, subset: &str) -> String {
    format!("outbound|{}|{subset}|{}", key.port, key.host)
}

/// The ADS service.
#[derive(Clone)]
pub struct XdsServer {
    snapshots: watch::Receiver<Arc<Snapshot>>,
    bundles: watch::Receiver<Arc<BundleSet>>,
    metrics: Metrics,
    budget: PushBudget,
}

/// The bytes of responses in flight to proxies at once ([`budget`]) when not told otherwise.
pub const DEFAULT_PUSH_BUDGET: usize = 64 << 20;

impl XdsServer {
    /// Serves whatever `snapshots` holds, pushing on every change.
    pub fn new(snapshots: watch::Receiver<Arc<Snapshot>>) -> Self {
        Self::with_metrics(snapshots, Metrics::new())
    }

    /// The same, counting into `metrics`.
    pub fn with_metrics(snapshots: watch::Receiver<Arc<Snapshot>>, metrics: Metrics) -> Self {
        // No bundles until `with_bundles`: SDS requests are answered with nothing.
        let (_, bundles) = watch::channel(Arc::new(BundleSet::default()));
        Self {
            snapshots,
            bundles,
            metrics,
            budget: PushBudget::new(DEFAULT_PUSH_BUDGET),
        }
    }

    /// Bounds the bytes of responses sent and not yet answered to `bytes` ([`budget`]).
    pub fn with_push_budget(mut self, bytes: usize) -> Self {
        self.budget = PushBudget::new(bytes);
        self
    }

    /// Also serves trust bundles over SDS, pushing on every change.
    pub fn with_bundles(mut self, bundles: watch::Receiver<Arc<BundleSet>>) -> Self {
        self.bundles = bundles;
        self
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<DiscoveryResponse, tonic::Status>> + Send>>;
type DeltaStream = Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for XdsServer {
    type StreamAggregatedResourcesStream = ResponseStream;
    type DeltaAggregatedResourcesStream = DeltaStream;

    async fn stream_aggregated_resources(
        &self,
        request: tonic::Request<tonic::Streaming<DiscoveryRequest>>,
    ) -> Result<tonic::Response<ResponseStream>, tonic::Status> {
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let stream = AdsStream {
            snapshots: self.snapshots.clone(),
            bundles: self.bundles.clone(),
            metrics: self.metrics.clone(),
            budget: self.budget.clone(),
            in_flight: None,
            tx,
            proxy: None,
            types: HashMap::new(),
            nonce: 0,
        };
        tokio::spawn(drive(stream, inbound));
        Ok(tonic::Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn delta_aggregated_resources(
        &self,
        request: tonic::Request<tonic::Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<tonic::Response<DeltaStream>, tonic::Status> {
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let stream = DeltaAds {
            snapshots: self.snapshots.clone(),
            bundles: self.bundles.clone(),
            metrics: self.metrics.clone(),
            budget: self.budget.clone(),
            in_flight: None,
            tx,
            proxy: None,
            types: HashMap::new(),
            nonce: 0,
        };
        tokio::spawn(drive(stream, inbound));
        Ok(tonic::Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// What differs between the two kinds of stream (state of the world, delta);
/// [`drive`] does the rest.
trait XdsStream: Send + 'static {
    type Request: prost::Message + Default + Send + 'static;
    type Response: Send + 'static;
    fn snapshots(&mut self) -> &mut watch::Receiver<Arc<Snapshot>>;
    fn bundles(&mut self) -> &mut watch::Receiver<Arc<BundleSet>>;
    fn metrics(&self) -> &Metrics;
    fn tx(&self) -> &mpsc::Sender<Result<Self::Response, tonic::Status>>;
    /// Handles one request from the proxy.
    fn on_request(&mut self, req: Self::Request) -> impl Future<Output = Result<(), tonic::Status>> + Send;
    /// The types this stream has subscribed to.
    fn subscribed(&self) -> Vec<String>;
    /// Sends one type's current state (or what changed in it).
    fn send(&mut self, type_url: &str) -> impl Future<Output = Result<(), ()>> + Send;
    /// Sends every subscribed type after a state change.
    fn push_all(&mut self) -> impl Future<Output = Result<(), ()>> + Send {
        async move {
            for t in self.subscribed() {
                self.send(&t).await?;
            }
            Ok(())
        }
    }
}

/// Serves one ADS stream until the proxy goes away: its requests, and a push of
/// every subscribed type whenever the state changes.
async fn drive<S: XdsStream>(mut s: S, mut inbound: tonic::Streaming<S::Request>) {
    s.metrics().connected.inc();
    // Change notifications on receivers of our own, so `s` stays free to answer.
    let mut snapshots = s.snapshots().clone();
    let mut bundles = s.bundles().clone();
    // A server without a bundle source has a closed channel: stop watching it.
    let mut bundles_live = true;
    loop {
        tokio::select! {
            msg = inbound.message() => match msg {
                Ok(Some(req)) => {
                    if let Err(status) = s.on_request(req).await {
                        let _ = s.tx().send(Err(status)).await;
                        break;
                    }
                }
                Ok(None) | Err(_) => break,
            },
            changed = snapshots.changed() => {
                if changed.is_err() || s.push_all().await.is_err() {
                    break;
                }
            }
            changed = bundles.changed(), if bundles_live => match changed {
                Err(_) => bundles_live = false,
                Ok(()) if s.subscribed().iter().any(|t| t == SECRET_TYPE) => {
                    if s.send(SECRET_TYPE).await.is_err() {
                        break;
                    }
                }
                Ok(()) => {}
            },
        }
    }
    s.metrics().connected.dec();
}

/// A stream's one response that holds push budget until the proxy answers it.
#[derive(Debug)]
struct InFlight {
    type_url: String,
    nonce: String,
    _reservation: Reservation,
}

impl InFlight {
    /// Whether `type_url`/`nonce` (a request's) answers this response.
    fn answered_by(&self, type_url: &str, nonce: &str) -> bool {
        self.type_url == type_url && self.nonce == nonce
    }
}

/// Gives the stream's reservation back, then waits for room for `len` bytes: a stream holds
/// one reservation at most, so one that waits holds none ([`budget`]).
async fn reserve(in_flight: &mut Option<InFlight>, budget: &PushBudget, type_url: &str, nonce: &str, len: usize) {
    *in_flight = None;
    *in_flight = budget.reserve(len).await.map(|r| InFlight {
        type_url: type_url.to_owned(),
        nonce: nonce.to_owned(),
        _reservation: r,
    });
}

/// Who is on the other end, from the first request's node.
#[derive(Debug, Clone)]
struct Proxy {
    id: String,
    view: ProxyView,
}

/// Per resource type, what this stream asked for and was sent.
#[derive(Debug, Default)]
struct TypeState {
    /// Names asked for; empty = all (wildcard).
    names: Vec<String>,
    last_nonce: String,
    sent_version: Option<u64>,
    acked_version: Option<String>,
    /// The set last sent for these names: the same set again has nothing new.
    sent_set: Option<EncodedSet>,
}

struct AdsStream {
    snapshots: watch::Receiver<Arc<Snapshot>>,
    bundles: watch::Receiver<Arc<BundleSet>>,
    metrics: Metrics,
    budget: PushBudget,
    in_flight: Option<InFlight>,
    tx: mpsc::Sender<Result<DiscoveryResponse, tonic::Status>>,
    proxy: Option<Proxy>,
    types: HashMap<String, TypeState>,
    nonce: u64,
}

impl AdsStream {
    async fn on_request(&mut self, req: DiscoveryRequest) -> Result<(), tonic::Status> {
        if self.proxy.is_none() {
            let node = req
                .node
                .as_ref()
                .ok_or_else(|| tonic::Status::invalid_argument("the first request must carry node"))?;
            let view = ProxyView::of(node);
            tracing::info!(proxy = node.id, ?view, "xDS stream opened");
            self.proxy = Some(Proxy {
                id: node.id.clone(),
                view,
            });
        }
        if ![LISTENER_TYPE, ROUTE_TYPE, CLUSTER_TYPE, ENDPOINT_TYPE, SECRET_TYPE].contains(&req.type_url.as_str()) {
            // Answer with nothing rather than leave a client waiting for its
            // initial fetch.
            if req.response_nonce.is_empty() {
                self.nonce += 1;
                let resp = DiscoveryResponse {
                    version_info: self.snapshots.borrow().version.to_string(),
                    type_url: req.type_url.clone(),
                    nonce: self.nonce.to_string(),
                    ..Default::default()
                };
                let _ = self.tx.send(Ok(resp)).await;
            }
            return Ok(());
        }
        if self
            .in_flight
            .as_ref()
            .is_some_and(|f| f.answered_by(&req.type_url, &req.response_nonce))
        {
            self.in_flight = None;
        }
        let state = self.types.entry(req.type_url.clone()).or_default();
        if !req.response_nonce.is_empty() {
            if req.response_nonce != state.last_nonce {
                return Ok(()); // answers an older response; a newer one is on its way
            }
            if let Some(err) = &req.error_detail {
                self.metrics.reject(&req.type_url);
                let proxy = self.proxy.as_ref().map(|p| p.id.as_str()).unwrap_or_default();
                tracing::warn!(
                    proxy,
                    type_url = req.type_url,
                    nonce = req.response_nonce,
                    error = err.message,
                    "NACK: the proxy keeps its last good config"
                );
                return Ok(());
            }
            // The first ACK of the version being served: the proxy has converged.
            let snapshot = self.snapshots.borrow().clone();
            let current = snapshot.version.to_string();
            if req.type_url != SECRET_TYPE
                && req.version_info == current
                && state.acked_version.as_deref() != Some(current.as_str())
            {
                self.metrics
                    .convergence
                    .observe(snapshot.created.elapsed().as_secs_f64());
            }
            state.acked_version = Some(req.version_info.clone());
            if state.names == req.resource_names {
                return Ok(()); // a plain ACK
            }
        }
        state.names = req.resource_names.clone();
        state.sent_set = None;
        self.send(&req.type_url)
            .await
            .map_err(|_| tonic::Status::cancelled("client gone"))
    }

    /// Sends the current state of one type to this proxy.
    async fn send(&mut self, type_url: &str) -> Result<(), ()> {
        let snapshot = self.snapshots.borrow().clone();
        let view = self
            .proxy
            .as_ref()
            .map(|p| p.view.clone())
            .unwrap_or_else(|| ProxyView::envoy(&NetworkId::new("")));
        let generator = view.generator;
        let (all, version) = current(&snapshot, &self.bundles, &view, type_url).await;
        let Some(state) = self.types.get_mut(type_url) else {
            return Ok(());
        };
        if state.sent_set.as_ref().is_some_and(|s| Arc::ptr_eq(s, &all)) {
            return Ok(()); // nothing of this type changed: the proxy has it all
        }
        state.sent_set = Some(all.clone());
        let wildcard = state.names.is_empty() && generator.wildcard_on_empty();
        let wanted = |name: &str| wildcard || state.names.iter().any(|n| n == name);
        let chosen: Vec<&Encoded> = all.iter().filter(|e| wanted(&e.name)).map(|e| &**e).collect();
        self.nonce += 1;
        state.last_nonce = self.nonce.to_string();
        state.sent_version = Some(snapshot.version);
        // Room first, copies after: a stream waiting for budget must not hold its copy.
        let size = chosen.iter().map(|e| e.resource.value.len()).sum();
        reserve(&mut self.in_flight, &self.budget, type_url, &state.last_nonce, size).await;
        let resp = DiscoveryResponse {
            version_info: version.to_string(),
            resources: chosen.into_iter().map(|e| e.resource.clone()).collect(),
            type_url: type_url.to_owned(),
            nonce: state.last_nonce.clone(),
            ..Default::default()
        };
        self.metrics.push(type_url);
        self.tx.send(Ok(resp)).await.map_err(|_| ())
    }
}

/// Per resource type, what an incremental stream subscribed to and what the
/// client holds, so each response carries only what changed.
#[derive(Debug, Default)]
struct DeltaType {
    /// Everything of the type (the client subscribed to `*` or, for clusters, to nothing named).
    wildcard: bool,
    names: std::collections::BTreeSet<String>,
    /// Name → version (a hash of the encoded resource) the client has been sent.
    sent: HashMap<String, String>,
    last_nonce: String,
    /// The first nonce of the last push, which went out in parts of [`DELTA_PART`]: the
    /// proxy answers each part, and a NACK of any of them counts.
    first_nonce: u64,
    /// Sent its first response: later empty diffs need no answer.
    answered: bool,
    /// The set `sent` was last brought up to date with: while the snapshot serves the same
    /// set (nothing of the type changed for this proxy), there is nothing to compare.
    synced: Option<EncodedSet>,
}

/// The most resource bytes one delta response carries; a larger push goes out in several.
/// gRPC keeps each stream's encode buffer as large as its largest message, so a
/// thousand proxies each sent every endpoint in one message would hold GiBs between
/// pushes (measured); in parts they hold this much each. A resource larger than this is a
/// part of its own.
pub const DELTA_PART: usize = 128 << 10;

/// Splits `resources` (in order) into runs of at most [`DELTA_PART`] bytes, each at least one.
fn parts<'a>(resources: &[&'a Encoded]) -> Vec<Vec<&'a Encoded>> {
    let mut out: Vec<Vec<&Encoded>> = Vec::new();
    let mut size = 0;
    for &e in resources {
        let len = e.resource.value.len();
        match out.last_mut() {
            Some(part) if size + len <= DELTA_PART => {
                part.push(e);
                size += len;
            }
            _ => {
                out.push(vec![e]);
                size = len;
            }
        }
    }
    out
}

struct DeltaAds {
    snapshots: watch::Receiver<Arc<Snapshot>>,
    bundles: watch::Receiver<Arc<BundleSet>>,
    metrics: Metrics,
    budget: PushBudget,
    in_flight: Option<InFlight>,
    tx: mpsc::Sender<Result<DeltaDiscoveryResponse, tonic::Status>>,
    /// The proxy's view, from the first request's node.
    proxy: Option<ProxyView>,
    types: HashMap<String, DeltaType>,
    nonce: u64,
}

impl DeltaAds {
    async fn on_request(&mut self, req: DeltaDiscoveryRequest) -> Result<(), tonic::Status> {
        if self.proxy.is_none() {
            let node = req
                .node
                .as_ref()
                .ok_or_else(|| tonic::Status::invalid_argument("the first request must carry node"))?;
            let view = ProxyView::of(node);
            tracing::info!(proxy = node.id, ?view, "delta xDS stream opened");
            self.proxy = Some(view);
        }
        if self
            .in_flight
            .as_ref()
            .is_some_and(|f| f.answered_by(&req.type_url, &req.response_nonce))
        {
            self.in_flight = None;
        }
        let generator = self.proxy.as_ref().map_or(Generator::Envoy, |p| p.generator);
        let first = !self.types.contains_key(&req.type_url);
        let state = self.types.entry(req.type_url.clone()).or_default();
        // Nonces are this stream's counter: the last push's parts are first..=last.
        let answers_last_push = match (req.response_nonce.parse::<u64>(), state.last_nonce.parse::<u64>()) {
            (Ok(n), Ok(last)) => (state.first_nonce..=last).contains(&n),
            _ => false,
        };
        if !req.response_nonce.is_empty() && answers_last_push {
            if let Some(err) = &req.error_detail {
                // Keep what was sent as sent: resending the same thing would only be
                // refused again. The next change sends what changed.
                self.metrics.reject(&req.type_url);
                tracing::warn!(
                    type_url = req.type_url,
                    error = err.message,
                    "delta NACK: the proxy keeps its last good config"
                );
            } else if req.response_nonce == state.last_nonce {
                let snapshot = self.snapshots.borrow().clone();
                self.metrics
                    .convergence
                    .observe(snapshot.created.elapsed().as_secs_f64());
            }
        }
        if first {
            // Resources the client already has from an earlier stream: don't resend unchanged ones.
            state.sent = req.initial_resource_versions.clone().into_iter().collect();
            // An initial request naming nothing is a wildcard for clusters (and listeners).
            state.wildcard = req.resource_names_subscribe.is_empty()
                && [CLUSTER_TYPE, LISTENER_TYPE].contains(&req.type_url.as_str())
                && generator.wildcard_on_empty();
        }
        for name in &req.resource_names_subscribe {
            if name == "*" {
                state.wildcard = true;
            } else {
                state.names.insert(name.clone());
            }
        }
        for name in &req.resource_names_unsubscribe {
            if name == "*" {
                state.wildcard = false;
            }
            state.names.remove(name);
            state.sent.remove(name);
        }
        let changed_subscription =
            first || !req.resource_names_subscribe.is_empty() || !req.resource_names_unsubscribe.is_empty();
        if changed_subscription {
            state.synced = None;
            self.send(&req.type_url)
                .await
                .map_err(|_| tonic::Status::cancelled("client gone"))?;
        }
        Ok(())
    }

    /// Sends what changed for one type since the client was last sent it.
    async fn send(&mut self, type_url: &str) -> Result<(), ()> {
        let snapshot = self.snapshots.borrow().clone();
        let view = self
            .proxy
            .clone()
            .unwrap_or_else(|| ProxyView::envoy(&NetworkId::new("")));
        let (all, version) = current(&snapshot, &self.bundles, &view, type_url).await;
        let Some(state) = self.types.get_mut(type_url) else {
            return Ok(());
        };
        if state.answered && state.synced.as_ref().is_some_and(|s| Arc::ptr_eq(s, &all)) {
            return Ok(());
        }
        let wanted = |e: &Encoded| state.wildcard || state.names.contains(&e.name);
        // `sent` holds exactly the synced set's wanted resources: when this set says what
        // changed since that one, only those need a look.
        let since = state
            .synced
            .as_ref()
            .and_then(|s| all.since(s))
            .filter(|_| state.answered);
        let (mut changed, mut removed): (Vec<&Encoded>, Vec<String>) = match since {
            Some(since) => {
                let changed = since
                    .changed
                    .iter()
                    .map(|&i| &*all[i])
                    .filter(|e| wanted(e) && state.sent.get(&e.name) != Some(&e.version))
                    .collect();
                let removed = since
                    .removed
                    .iter()
                    .filter(|n| state.sent.contains_key(*n))
                    .cloned()
                    .collect();
                (changed, removed)
            }
            None => {
                let current: HashMap<&str, &Encoded> = all
                    .iter()
                    .filter(|e| wanted(e))
                    .map(|e| (e.name.as_str(), &**e))
                    .collect();
                let changed = current
                    .values()
                    .filter(|e| state.sent.get(&e.name) != Some(&e.version))
                    .copied()
                    .collect();
                let removed = state
                    .sent
                    .keys()
                    .filter(|n| !current.contains_key(n.as_str()))
                    .cloned()
                    .collect();
                (changed, removed)
            }
        };
        state.synced = Some(all.clone());
        for e in &changed {
            state.sent.insert(e.name.clone(), e.version.clone());
        }
        removed.sort();
        for n in &removed {
            state.sent.remove(n);
        }
        if changed.is_empty() && removed.is_empty() && state.answered {
            return Ok(());
        }
        changed.sort_by(|a, b| a.name.cmp(&b.name));
        state.answered = true;
        let parts = parts(&changed);
        let count = parts.len().max(1) as u64; // removals alone still make one response
        state.first_nonce = self.nonce + 1;
        self.nonce += count;
        state.last_nonce = self.nonce.to_string();
        // Room first, copies after: a stream waiting for budget must not hold its copy. The
        // push holds it until the proxy answers its last part.
        let size = changed.iter().map(|e| e.resource.value.len()).sum();
        reserve(&mut self.in_flight, &self.budget, type_url, &state.last_nonce, size).await;
        let mut removed = Some(removed);
        let mut parts = parts.into_iter();
        for nonce in state.first_nonce..=self.nonce {
            let resp = DeltaDiscoveryResponse {
                system_version_info: version.to_string(),
                resources: parts
                    .next()
                    .unwrap_or_default()
                    .into_iter()
                    .map(|e| Resource {
                        name: e.name.clone(),
                        version: e.version.clone(),
                        resource: Some(e.resource.clone()),
                        ..Default::default()
                    })
                    .collect(),
                type_url: type_url.to_owned(),
                removed_resources: removed.take().unwrap_or_default(),
                nonce: nonce.to_string(),
                ..Default::default()
            };
            self.metrics.push(type_url);
            self.tx.send(Ok(resp)).await.map_err(|_| ())?;
        }
        Ok(())
    }
}

impl XdsStream for AdsStream {
    type Request = DiscoveryRequest;
    type Response = DiscoveryResponse;
    fn snapshots(&mut self) -> &mut watch::Receiver<Arc<Snapshot>> {
        &mut self.snapshots
    }

    fn bundles(&mut self) -> &mut watch::Receiver<Arc<BundleSet>> {
        &mut self.bundles
    }
    fn metrics(&self) -> &Metrics {
        &self.metrics
    }
    fn tx(&self) -> &mpsc::Sender<Result<DiscoveryResponse, tonic::Status>> {
        &self.tx
    }
    async fn on_request(&mut self, req: DiscoveryRequest) -> Result<(), tonic::Status> {
        AdsStream::on_request(self, req).await
    }
    fn subscribed(&self) -> Vec<String> {
        self.types.keys().cloned().collect()
    }
    async fn send(&mut self, type_url: &str) -> Result<(), ()> {
        AdsStream::send(self, type_url).await
    }
    /// Clusters first, and endpoints whenever clusters went out, changed or not: Envoy
    /// warms a changed cluster until it is sent its endpoints, as Istio's pushes do.
    async fn push_all(&mut self) -> Result<(), ()> {
        let mut types = self.subscribed();
        types.sort_by_key(|t| t != CLUSTER_TYPE);
        for t in types {
            let before = self.types.get(&t).and_then(|s| s.sent_set.clone());
            self.send(&t).await?;
            let after = self.types.get(&t).and_then(|s| s.sent_set.clone());
            let sent = match (&before, &after) {
                (Some(b), Some(a)) => !Arc::ptr_eq(b, a),
                _ => true,
            };
            if t == CLUSTER_TYPE
                && sent
                && let Some(eds) = self.types.get_mut(ENDPOINT_TYPE)
            {
                eds.sent_set = None;
            }
        }
        Ok(())
    }
}

impl XdsStream for DeltaAds {
    type Request = DeltaDiscoveryRequest;
    type Response = DeltaDiscoveryResponse;
    fn snapshots(&mut self) -> &mut watch::Receiver<Arc<Snapshot>> {
        &mut self.snapshots
    }

    fn bundles(&mut self) -> &mut watch::Receiver<Arc<BundleSet>> {
        &mut self.bundles
    }
    fn metrics(&self) -> &Metrics {
        &self.metrics
    }
    fn tx(&self) -> &mpsc::Sender<Result<DeltaDiscoveryResponse, tonic::Status>> {
        &self.tx
    }
    async fn on_request(&mut self, req: DeltaDiscoveryRequest) -> Result<(), tonic::Status> {
        DeltaAds::on_request(self, req).await
    }
    fn subscribed(&self) -> Vec<String> {
        self.types.keys().cloned().collect()
    }
    async fn send(&mut self, type_url: &str) -> Result<(), ()> {
        DeltaAds::send(self, type_url).await
    }
}

/// The current resources of `type_url` for a proxy of `view`, and their
/// version: bundles for SDS, the snapshot for the rest.
async fn current(
    snapshot: &Snapshot,
    bundles: &watch::Receiver<Arc<BundleSet>>,
    view: &ProxyView,
    type_url: &str,
) -> (EncodedSet, u64) {
    if type_url == SECRET_TYPE {
        let set = bundles.borrow().clone();
        let list = set.encoded().into_iter().map(Arc::new).collect();
        (Arc::new(Resources { list, since: None }), set.sequence)
    } else {
        (snapshot.encoded(view, type_url).await, snapshot.version)
    }
}

/// A resource's version: a hash of what it was built from that is the same in
/// every process and release (FNV-1a; std's hasher is randomly keyed), so equal
/// content has equal versions across pushes, restarts and replicas.
pub(crate) fn stable_hash<T: std::hash::Hash + ?Sized>(t: &T) -> String {
    struct Fnv(u64);
    impl std::hash::Hasher for Fnv {
        fn finish(&self) -> u64 {
            self.0
        }
        fn write(&mut self, bytes: &[u8]) {
            for b in bytes {
                self.0 ^= u64::from(*b);
                self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
            }
        }
    }
    let mut h = Fnv(0xcbf2_9ce4_8422_2325);
    t.hash(&mut h);
    format!("{:016x}", std::hash::Hasher::finish(&h))
}

pub(crate) fn any<M: Message>(type_url: &str, m: &M) -> Any {
    Any {
        type_url: type_url.to_owned(),
        value: m.encode_to_vec(),
    }
}

/// The node's `LABELS` metadata (Istio's: a Struct of strings); other values are left out.
fn node_labels(node: &core::Node) -> BTreeMap<String, String> {
    use envoy_types::pb::google::protobuf::value::Kind;
    let Some(Kind::StructValue(labels)) = node
        .metadata
        .as_ref()
        .and_then(|m| m.fields.get("LABELS"))
        .and_then(|v| v.kind.as_ref())
    else {
        return BTreeMap::new();
    };
    labels
        .fields
        .iter()
        .filter_map(|(k, v)| match &v.kind {
            Some(Kind::StringValue(s)) => Some((k.clone(), s.clone())),
            _ => None,
        })
        .collect()
}

/// A string field of the node's metadata (Istio puts NETWORK, CLUSTER_ID, … there).
fn node_metadata(node: &core::Node, key: &str) -> Option<String> {
    use envoy_types::pb::google::protobuf::value::Kind;
    match node.metadata.as_ref()?.fields.get(key)?.kind.as_ref()? {
        Kind::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}

/// The filter metadata key under which an endpoint's network and cluster travel.
pub const ISTIO_METADATA: &str = "istio";

/// Istio's per-endpoint metadata: the network (and cluster) an endpoint is on,
/// so an east-west gateway can keep only its own network's endpoints; and, for
/// an endpoint that speaks mesh mTLS, the `tlsMode` its cluster's transport
/// socket is chosen by.
fn endpoint_metadata(e: &federation::LbEndpoint) -> core::Metadata {
    use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
    let s = |v: &str| Value {
        kind: Some(Kind::StringValue(v.to_owned())),
    };
    let mut fields = std::collections::HashMap::from([("network".to_owned(), s(e.network.as_str()))]);
    if let Some(c) = &e.cluster {
        fields.insert("cluster".to_owned(), s(c.as_str()));
    }
    // The pod behind our gateway this entry stands for: the sidecar pins its SNI to it.
    if let Some(pod) = e.pinned {
        fields.insert("endpoint".to_owned(), s(&pod.to_string()));
    }
    let mut filter_metadata = HashMap::from([(ISTIO_METADATA.to_owned(), Struct { fields })]);
    if e.mtls {
        filter_metadata.insert(mtls::TRANSPORT_SOCKET_MATCH.to_owned(), mtls::tls_mode_istio());
    }
    core::Metadata {
        filter_metadata,
        ..Default::default()
    }
}

/// The EDS cluster of a service port (or of one of its subsets), its endpoints over ADS:
/// what every generator's cluster is built on.
pub(crate) fn eds_cluster(key: &ServiceKey, subset: Option<&str>) -> Cluster {
    let name = match subset {
        Some(s) => subset_cluster_name(key, s),
        None => cluster_name(key),
    };
    Cluster {
        // A subset's endpoints are its own (EDS `service_name`); the service's go by its name.
        eds_cluster_config: Some(EdsClusterConfig {
            eds_config: Some(ConfigSource {
                resource_api_version: ApiVersion::V3 as i32,
                config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(AggregatedConfigSource {})),
                ..Default::default()
            }),
            service_name: if subset.is_some() { name.clone() } else { String::new() },
        }),
        name,
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
        ..Default::default()
    }
}

/// [`eds_cluster`] with auto-mTLS to `identities`.
fn cluster(key: &ServiceKey, subset: Option<&str>, identities: &[mesh_vocab::SpiffeId]) -> Cluster {
    Cluster {
        transport_socket_matches: mtls::transport_socket_matches(key, subset, identities),
        circuit_breakers: Some(policy::default_circuit_breakers()),
        ..eds_cluster(key, subset)
    }
}

/// The endpoints of cluster `cluster_name`, grouped by locality.
fn load_assignment(cluster_name: String, eps: &[federation::LbEndpoint]) -> ClusterLoadAssignment {
    let mut by_locality: BTreeMap<&crate::model::Locality, Vec<LbEndpoint>> = BTreeMap::new();
    for e in eps {
        by_locality.entry(&e.locality).or_default().push(LbEndpoint {
            host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                address: Some(core::Address {
                    address: Some(address::Address::SocketAddress(SocketAddress {
                        address: e.address.to_string(),
                        port_specifier: Some(socket_address::PortSpecifier::PortValue(u32::from(e.port))),
                        ..Default::default()
                    })),
                }),
                ..Default::default()
            })),
            load_balancing_weight: Some(UInt32Value { value: e.weight }),
            metadata: Some(endpoint_metadata(e)),
            ..Default::default()
        });
    }
    ClusterLoadAssignment {
        cluster_name,
        endpoints: by_locality
            .into_iter()
            .map(|(l, lb_endpoints)| LocalityLbEndpoints {
                locality: Some(core::Locality {
                    region: l.region.clone(),
                    zone: l.zone.clone(),
                    sub_zone: l.subzone.clone(),
                }),
                load_balancing_weight: Some(UInt32Value {
                    value: lb_endpoints
                        .iter()
                        .filter_map(|e| e.load_balancing_weight.map(|w| w.value))
                        .sum(),
                }),
                lb_endpoints,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Gateway, GatewayAddress, Instance, Locality};
    use mesh_vocab::{ClusterId, Hostname};

    fn clusters(moved: u8) -> Vec<(Arc<ClusterModel>, bool)> {
        let instances = (0..40u8)
            .map(|i| Instance {
                service: ServiceKey {
                    host: Hostname::parse(&format!("s{}.default.svc.cluster.local", i % 4)).unwrap(),
                    port: 80,
                },
                address: std::net::IpAddr::from([10, 241, 0, if i == 0 { moved } else { i + 100 }]),
                target_port: 8080,
                network: NetworkId::new("n1"),
                locality: Locality::default(),
                mtls: true,
                labels: Default::default(),
                service_account: None,
                weight: 1,
            })
            .collect();
        let gateways = vec![Gateway {
            network: NetworkId::new("n1"),
            address: GatewayAddress::Ip([100, 64, 0, 1].into()),
            port: 15443,
            pins_endpoints: false,
        }];
        vec![(
            Arc::new(ClusterModel {
                exposure: Default::default(),
                traffic: Default::default(),
                cluster: ClusterId::new("c1"),
                instances,
                named: vec![],
                vips: vec![],
                gateways,
                security: Default::default(),
            }),
            false,
        )]
    }

    #[tokio::test]
    async fn a_gateway_is_served_what_its_networks_gateway_exposes_and_a_sidecar_everything() {
        let mut models = clusters(1);
        let m = Arc::get_mut(&mut models[0].0).unwrap();
        m.exposure.insert(
            NetworkId::new("n1"),
            vec!["default/s1.default.svc.cluster.local".into()],
        );
        let snap = Snapshot::new(1, std::time::Instant::now(), models, MeshConfig::default());
        let n1 = NetworkId::new("n1");
        let gateway = ProxyView {
            gateway: true,
            ..ProxyView::envoy(&n1)
        };
        let names = |set: EncodedSet| set.iter().map(|e| e.name.clone()).collect::<Vec<_>>();
        for t in [CLUSTER_TYPE, ENDPOINT_TYPE] {
            assert_eq!(
                names(snap.encoded(&gateway, t).await),
                ["outbound|80||s1.default.svc.cluster.local"],
                "{t}"
            );
            assert_eq!(names(snap.encoded(&ProxyView::envoy(&n1), t).await).len(), 4, "{t}");
            // Another network's proxies reach n1's services only through n1's gateway,
            // so federation leaves them what it exposes.
            let n2 = ProxyView::envoy(&NetworkId::new("n2"));
            assert_eq!(names(snap.encoded(&n2, t).await).len(), 1, "{t}");
        }
    }

    async fn versions(moved: u8, network: &str) -> Vec<(String, String)> {
        let snap = Snapshot::new(1, std::time::Instant::now(), clusters(moved), MeshConfig::default());
        let mut out = Vec::new();
        for t in [CLUSTER_TYPE, ENDPOINT_TYPE] {
            out.extend(
                snap.encoded(&ProxyView::envoy(&NetworkId::new(network)), t)
                    .await
                    .iter()
                    .map(|e| (e.name.clone(), e.version.clone())),
            );
        }
        out
    }

    #[test]
    fn a_large_delta_push_goes_out_in_parts_of_bounded_size_and_none_empty() {
        let encoded = |name: &str, len: usize| Encoded {
            name: name.into(),
            resource: Any {
                type_url: ENDPOINT_TYPE.into(),
                value: vec![0; len],
            },
            version: "v".into(),
        };
        let list = [
            encoded("a", 100 << 10),
            encoded("b", 20 << 10),
            encoded("c", 20 << 10),
            encoded("d", 300 << 10),
            encoded("e", 1),
        ];
        let refs: Vec<&Encoded> = list.iter().collect();
        let names: Vec<Vec<&str>> = parts(&refs)
            .iter()
            .map(|p| p.iter().map(|e| e.name.as_str()).collect())
            .collect();
        // a+b fit in 128 KiB, c would not; d is larger than a part and goes alone.
        assert_eq!(names, [vec!["a", "b"], vec!["c"], vec!["d"], vec!["e"]]);
        assert!(parts(&[]).is_empty());
    }

    #[tokio::test]
    async fn equal_state_has_equal_versions_and_a_change_moves_only_its_resource() {
        // Endpoint metadata is a protobuf map, encoded in hash-map order: versions
        // taken from the bytes would differ between these two equal snapshots.
        assert_eq!(versions(1, "n1").await, versions(1, "n1").await);
        assert_eq!(versions(1, "n2").await, versions(1, "n2").await);
        let (before, after) = (versions(1, "n1").await, versions(2, "n1").await);
        let moved: Vec<&String> = before
            .iter()
            .zip(&after)
            .filter(|(a, b)| a.1 != b.1)
            .map(|(a, _)| &a.0)
            .collect();
        assert_eq!(
            moved,
            ["outbound|80||s0.default.svc.cluster.local"],
            "only s0's endpoints changed"
        );
        // Seen through the gateway from another network, the move changes nothing.
        assert_eq!(versions(1, "n2").await, versions(2, "n2").await);
    }

    fn reviews() -> ServiceKey {
        ServiceKey {
            host: Hostname::parse("reviews.default.svc.cluster.local").unwrap(),
            port: 9080,
        }
    }

    #[test]
    fn a_cluster_originates_istio_mtls_to_tls_mode_istio_endpoints_and_plaintext_to_the_rest() {
        use envoy_types::pb::envoy::config::core::v3::transport_socket::ConfigType;
        use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
            UpstreamTlsContext, common_tls_context::ValidationContextType,
        };
        let ids: Vec<mesh_vocab::SpiffeId> = ["reviews-v1", "reviews-v2"]
            .iter()
            .map(|sa| mesh_vocab::SpiffeId::workload("example.org", "default", sa).unwrap())
            .collect();
        let c = cluster(&reviews(), None, &ids);
        let [tls, raw] = &c.transport_socket_matches[..] else {
            panic!("two transport sockets")
        };
        assert_eq!(tls.name, "tlsMode-istio");
        assert_eq!(tls.r#match, Some(mtls::tls_mode_istio()));
        let socket = tls.transport_socket.as_ref().unwrap();
        assert_eq!(socket.name, "envoy.transport_sockets.tls");
        let Some(ConfigType::TypedConfig(cfg)) = &socket.config_type else {
            panic!()
        };
        assert_eq!(
            cfg.type_url,
            "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
        );
        let ctx = UpstreamTlsContext::decode(cfg.value.as_slice()).unwrap();
        assert_eq!(ctx.sni, "outbound_.9080_._.reviews.default.svc.cluster.local");
        let common = ctx.common_tls_context.unwrap();
        assert_eq!(common.alpn_protocols, ["istio"]);
        let [cert] = &common.tls_certificate_sds_secret_configs[..] else {
            panic!("one certificate")
        };
        assert_eq!(cert.name, "default");
        assert_eq!(cert.sds_config, Some(mtls::sds_config()));
        let Some(config_source::ConfigSourceSpecifier::ApiConfigSource(api)) =
            &cert.sds_config.as_ref().unwrap().config_source_specifier
        else {
            panic!("an API config source")
        };
        let envoy_grpc: Vec<&str> = api
            .grpc_services
            .iter()
            .filter_map(|g| match &g.target_specifier {
                Some(core::grpc_service::TargetSpecifier::EnvoyGrpc(e)) => Some(e.cluster_name.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(envoy_grpc, ["sds-grpc"]);
        assert_eq!(
            (api.api_type, api.transport_api_version),
            (core::api_config_source::ApiType::Grpc as i32, ApiVersion::V3 as i32)
        );
        let Some(ValidationContextType::CombinedValidationContext(combined)) = common.validation_context_type else {
            panic!("a combined validation context")
        };
        assert_eq!(combined.validation_context_sds_secret_config.unwrap().name, "ROOTCA");
        let sans: Vec<(i32, String)> = combined
            .default_validation_context
            .unwrap()
            .match_typed_subject_alt_names
            .into_iter()
            .map(|m| {
                let Some(envoy_types::pb::envoy::r#type::matcher::v3::string_matcher::MatchPattern::Exact(e)) =
                    m.matcher.unwrap().match_pattern
                else {
                    panic!("an exact match")
                };
                (m.san_type, e)
            })
            .collect();
        let uri = envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::subject_alt_name_matcher::SanType::Uri
            as i32;
        assert_eq!(
            sans,
            [
                (uri, "spiffe://example.org/ns/default/sa/reviews-v1".to_owned()),
                (uri, "spiffe://example.org/ns/default/sa/reviews-v2".to_owned()),
            ]
        );
        assert_eq!(raw.name, "tlsMode-disabled");
        assert_eq!(raw.r#match, Some(Default::default()), "matches every endpoint left");
        assert_eq!(
            raw.transport_socket.as_ref().unwrap().name,
            "envoy.transport_sockets.raw_buffer"
        );
    }

    #[tokio::test]
    async fn grpc_nodes_get_a_listener_routes_and_cluster_per_service_and_no_endpoint_behind_a_gateway() {
        let mut c1 = (*clusters(1)[0].0).clone();
        c1.instances.truncate(1);
        c1.instances[0].mtls = false;
        let mut c2 = c1.clone();
        c2.cluster = ClusterId::new("c2");
        c2.instances[0].network = NetworkId::new("n2");
        c2.instances[0].mtls = true;
        c2.gateways[0].network = NetworkId::new("n2");
        let models = vec![(Arc::new(c1), false), (Arc::new(c2), false)];
        let snap = Snapshot::new(1, std::time::Instant::now(), models, MeshConfig::default());
        let n1 = NetworkId::new("n1");
        let envoy1 = ProxyView::envoy(&n1);
        let grpc1 = ProxyView {
            generator: Generator::Grpc,
            ..ProxyView::envoy(&n1)
        };
        let names = |set: &EncodedSet| set.iter().map(|e| e.name.clone()).collect::<Vec<_>>();
        let cluster = "outbound|80||s0.default.svc.cluster.local";
        let listener = "s0.default.svc.cluster.local:80";
        assert_eq!(names(&snap.encoded(&grpc1, LISTENER_TYPE).await), [listener]);
        assert_eq!(names(&snap.encoded(&grpc1, ROUTE_TYPE).await), [listener]);
        assert_eq!(names(&snap.encoded(&grpc1, CLUSTER_TYPE).await), [cluster]);
        assert!(
            snap.encoded(&envoy1, ROUTE_TYPE).await.is_empty(),
            "no HTTP port, no routes"
        );
        let addresses = |set: EncodedSet| {
            let cla = ClusterLoadAssignment::decode(set[0].resource.value.as_slice()).unwrap();
            cla.endpoints
                .iter()
                .flat_map(|l| &l.lb_endpoints)
                .map(|e| {
                    let Some(lb_endpoint::HostIdentifier::Endpoint(ep)) = &e.host_identifier else {
                        panic!()
                    };
                    let Some(address::Address::SocketAddress(sa)) = ep.address.as_ref().unwrap().address.as_ref()
                    else {
                        panic!()
                    };
                    sa.address.clone()
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(
            addresses(snap.encoded(&envoy1, ENDPOINT_TYPE).await),
            ["10.241.0.1", "100.64.0.1"],
            "Envoy reaches n2 through its gateway"
        );
        assert_eq!(
            addresses(snap.encoded(&grpc1, ENDPOINT_TYPE).await),
            ["10.241.0.1"],
            "plaintext gRPC cannot pass a gateway that only passes mTLS through"
        );
    }

    #[tokio::test]
    async fn mtls_endpoints_and_gateways_are_marked_tls_mode_istio_and_plaintext_ones_not() {
        let mut models = clusters(1);
        let mut c1 = (*models[0].0).clone();
        c1.instances.truncate(2);
        c1.instances[1].mtls = false;
        c1.instances[1].service = c1.instances[0].service.clone();
        let mut c2 = c1.clone();
        c2.cluster = ClusterId::new("c2");
        c2.instances.truncate(1);
        c2.instances[0].network = NetworkId::new("n2");
        c2.gateways[0].network = NetworkId::new("n2");
        models = vec![(Arc::new(c1), false), (Arc::new(c2), false)];
        let snap = Snapshot::new(1, std::time::Instant::now(), models, MeshConfig::default());
        let eds = snap
            .encoded(&ProxyView::envoy(&NetworkId::new("n1")), ENDPOINT_TYPE)
            .await;
        let cla = ClusterLoadAssignment::decode(eds[0].resource.value.as_slice()).unwrap();
        let marks: Vec<(String, Option<String>)> = cla
            .endpoints
            .iter()
            .flat_map(|l| &l.lb_endpoints)
            .map(|e| {
                let Some(lb_endpoint::HostIdentifier::Endpoint(ep)) = &e.host_identifier else {
                    panic!()
                };
                let Some(address::Address::SocketAddress(sa)) = ep.address.as_ref().unwrap().address.as_ref() else {
                    panic!()
                };
                let meta = &e.metadata.as_ref().unwrap().filter_metadata;
                assert!(meta.contains_key(ISTIO_METADATA), "the istio metadata stays");
                let mode = meta.get(mtls::TRANSPORT_SOCKET_MATCH).map(|s| {
                    assert_eq!(s, &mtls::tls_mode_istio());
                    "istio".to_owned()
                });
                (sa.address.clone(), mode)
            })
            .collect();
        assert_eq!(
            marks,
            [
                ("10.241.0.1".to_owned(), Some("istio".to_owned())),
                ("10.241.0.101".to_owned(), None),
                ("100.64.0.1".to_owned(), Some("istio".to_owned())),
            ],
            "the sidecar'd pod and n2's gateway are mTLS; the plain pod is not"
        );
    }

    fn snapshot_with(yaml: &str) -> Snapshot {
        let mut objects = crate::objects::ClusterObjects::default();
        objects.add_yaml(std::path::Path::new("c1/istio.yaml"), yaml).unwrap();
        assert!(objects.refused.is_empty(), "{:?}", objects.refused);
        let mut m = (*clusters(1)[0].0).clone();
        let mut traffic = crate::model::Traffic {
            virtual_services: objects.virtual_services,
            destination_rules: objects.destination_rules,
            ..Default::default()
        };
        traffic.protocols.insert(reviews(), crate::model::Protocol::Http);
        m.traffic = Arc::new(traffic);
        Snapshot::new(
            1,
            std::time::Instant::now(),
            vec![(Arc::new(m), false)],
            MeshConfig::default(),
        )
    }

    fn proxy(namespace: &str, app: &str) -> ProxyView {
        ProxyView {
            namespace: Some(namespace.into()),
            labels: [("app".to_owned(), app.to_owned())].into(),
            ..ProxyView::envoy(&NetworkId::new("n1"))
        }
    }

    /// The clusters the first route of each `proxy`'s reviews routes sends to.
    async fn first_route_cluster(snap: &Snapshot, proxy: &ProxyView) -> String {
        use envoy_types::pb::envoy::config::route::v3::{RouteConfiguration, route, route_action};
        let set = snap.encoded(proxy, ROUTE_TYPE).await;
        let rc = set
            .iter()
            .find(|e| e.name == "reviews.default.svc.cluster.local:9080")
            .unwrap();
        let rc = RouteConfiguration::decode(rc.resource.value.as_slice()).unwrap();
        let Some(route::Action::Route(a)) = &rc.virtual_hosts[0].routes[0].action else {
            panic!("a route")
        };
        match &a.cluster_specifier {
            Some(route_action::ClusterSpecifier::Cluster(c)) => c.clone(),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn routes_that_match_on_the_source_are_made_per_proxy_and_others_are_shared() {
        let snap = snapshot_with(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews}\nspec:\n  hosts: [reviews]\n  http:\n  - match: [{sourceLabels: {app: productpage}}]\n    route: [{destination: {host: reviews, subset: v2}}]\n  - route: [{destination: {host: reviews, subset: v1}}]\n",
        );
        assert_eq!(
            first_route_cluster(&snap, &proxy("default", "productpage")).await,
            "outbound|9080|v2|reviews.default.svc.cluster.local"
        );
        assert_eq!(
            first_route_cluster(&snap, &proxy("default", "ratings")).await,
            "outbound|9080|v1|reviews.default.svc.cluster.local",
            "not served the productpage's routes from the cache"
        );
        let shared = snapshot_with(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews}\nspec: {hosts: [reviews], http: [{route: [{destination: {host: reviews, subset: v1}}]}]}\n",
        );
        let a = shared.encoded(&proxy("default", "productpage"), ROUTE_TYPE).await;
        let b = shared.encoded(&proxy("test", "ratings"), ROUTE_TYPE).await;
        assert!(
            Arc::ptr_eq(&a, &b),
            "without source matches every proxy shares one encoding"
        );
    }

    #[tokio::test]
    async fn with_outlier_detection_endpoints_are_prioritised_for_each_proxys_locality() {
        let mut snap = snapshot_with(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: s0}\nspec: {host: s0, trafficPolicy: {outlierDetection: {consecutive5xxErrors: 3}}}\n",
        );
        // s0's instances (every fourth) alternate between two zones.
        let mut m = (*snap.clusters[0].0).clone();
        for (i, inst) in m.instances.iter_mut().enumerate() {
            inst.locality = Locality {
                region: "eu".into(),
                zone: format!("eu-{}", i / 4 % 2),
                subzone: String::new(),
            };
        }
        snap.clusters[0].0 = Arc::new(m);
        let in_zone = |zone: &str| ProxyView {
            locality: Locality {
                region: "eu".into(),
                zone: zone.into(),
                subzone: String::new(),
            },
            ..ProxyView::envoy(&NetworkId::new("n1"))
        };
        let priorities = |set: EncodedSet| {
            let e = set
                .iter()
                .find(|e| e.name == "outbound|80||s0.default.svc.cluster.local")
                .unwrap();
            let cla = ClusterLoadAssignment::decode(e.resource.value.as_slice()).unwrap();
            cla.endpoints
                .iter()
                .map(|l| (l.locality.as_ref().unwrap().zone.clone(), l.priority))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            priorities(snap.encoded(&in_zone("eu-0"), ENDPOINT_TYPE).await),
            [("eu-0".to_owned(), 0), ("eu-1".to_owned(), 1)]
        );
        assert_eq!(
            priorities(snap.encoded(&in_zone("eu-1"), ENDPOINT_TYPE).await),
            [("eu-0".to_owned(), 1), ("eu-1".to_owned(), 0)],
            "each locality is served its own priorities, not a cached neighbour's"
        );
    }

    /// Every resource a few kinds of proxy are served, decoded so that equal resources
    /// compare equal whatever order their maps encoded in: (type, name, version, resource).
    async fn served(snap: &Snapshot) -> Vec<(String, String, String, String)> {
        use envoy_types::pb::envoy::config::listener::v3::Listener;
        use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
        let zone = |z: &str| Locality {
            region: "eu".into(),
            zone: z.into(),
            subzone: String::new(),
        };
        let proxies = [
            ProxyView::envoy(&NetworkId::new("n1")),
            ProxyView::envoy(&NetworkId::new("n2")),
            ProxyView {
                locality: zone("eu-1"),
                ..proxy("default", "productpage")
            },
            ProxyView {
                generator: Generator::Grpc,
                ..ProxyView::envoy(&NetworkId::new("n1"))
            },
        ];
        let mut out = Vec::new();
        for p in &proxies {
            for t in [LISTENER_TYPE, ROUTE_TYPE, CLUSTER_TYPE, ENDPOINT_TYPE] {
                for e in snap.encoded(p, t).await.iter() {
                    let bytes = e.resource.value.as_slice();
                    let decoded = match t {
                        LISTENER_TYPE => format!("{:?}", Listener::decode(bytes).unwrap()),
                        ROUTE_TYPE => format!("{:?}", RouteConfiguration::decode(bytes).unwrap()),
                        CLUSTER_TYPE => format!("{:?}", Cluster::decode(bytes).unwrap()),
                        _ => {
                            // Sorted metadata, so that Debug of equal assignments is equal.
                            let mut c = ClusterLoadAssignment::decode(bytes).unwrap();
                            let metadata: Vec<Vec<(String, String)>> = c
                                .endpoints
                                .iter_mut()
                                .flat_map(|l| &mut l.lb_endpoints)
                                .map(|e| {
                                    let m = e.metadata.take().unwrap_or_default();
                                    let mut m: Vec<(String, String)> = m
                                        .filter_metadata
                                        .into_iter()
                                        .map(|(k, v)| {
                                            (
                                                k,
                                                format!("{:?}", {
                                                    let mut f: Vec<_> = v.fields.into_iter().collect();
                                                    f.sort_by(|a, b| a.0.cmp(&b.0));
                                                    f
                                                }),
                                            )
                                        })
                                        .collect();
                                    m.sort();
                                    m
                                })
                                .collect();
                            format!("{c:?} {metadata:?}")
                        }
                    };
                    out.push((
                        format!("{t} {:?}", p.generator),
                        e.name.clone(),
                        e.version.clone(),
                        decoded,
                    ));
                }
            }
        }
        out
    }

    /// A state of two clusters on two networks, with a DestinationRule (subsets, and
    /// locality-aware balancing when `outlier`) and a source-matching VirtualService.
    fn state(moves: &[(usize, u8)], labels: u8, stale: bool, outlier: bool) -> Vec<(Arc<ClusterModel>, bool)> {
        let rules = format!(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: s0}}\nspec: {{host: s0, trafficPolicy: {{{}}}, subsets: [{{name: v1, labels: {{version: v1}}}}]}}\n---\n\
             apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: reviews}}\nspec:\n  hosts: [reviews]\n  http:\n  - match: [{{sourceLabels: {{app: productpage}}}}]\n    route: [{{destination: {{host: reviews}}}}]\n",
            if outlier {
                "outlierDetection: {consecutive5xxErrors: 3}"
            } else {
                ""
            }
        );
        let base = snapshot_with(&rules);
        let mut c1 = (*base.clusters[0].0).clone();
        for (i, inst) in c1.instances.iter_mut().enumerate() {
            inst.locality.zone = format!("eu-{}", i % 2);
            if (labels >> (i % 8)) & 1 == 1 {
                inst.labels.insert("version".into(), "v1".into());
            }
        }
        let mut c2 = c1.clone();
        c2.cluster = ClusterId::new("c2");
        for inst in &mut c2.instances {
            inst.network = NetworkId::new("n2");
            if let std::net::IpAddr::V4(a) = inst.address {
                inst.address = std::net::IpAddr::from([10, 242, a.octets()[2], a.octets()[3]]);
            }
        }
        c2.gateways[0].network = NetworkId::new("n2");
        c2.gateways[0].address = GatewayAddress::Ip([100, 64, 0, 2].into());
        let mut models = [c1, c2];
        for (c, i) in moves {
            let inst = &mut models[c % 2].instances[usize::from(*i) % 40];
            if let std::net::IpAddr::V4(a) = inst.address {
                let o = a.octets();
                inst.address = std::net::IpAddr::from([o[0], o[1], o[2].wrapping_add(1), o[3]]);
            }
        }
        let [c1, c2] = models;
        vec![(Arc::new(c1), false), (Arc::new(c2), stale)]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 24, ..Default::default() })]

        /// A snapshot that follows another serves exactly what a snapshot made from scratch
        /// serves, through any sequence of changes: reuse never serves a stale resource.
        #[test]
        fn a_snapshot_after_another_serves_what_a_fresh_one_does(
            steps in proptest::collection::vec((0usize..2, 0u8..40, proptest::prelude::any::<u8>(), proptest::prelude::any::<bool>(), proptest::prelude::any::<bool>()), 1..8),
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            rt.block_on(async {
                let mut moves = Vec::new();
                let mut prev: Option<Snapshot> = None;
                for (version, (c, i, labels, stale, outlier)) in steps.into_iter().enumerate() {
                    moves.push((c, i));
                    let fresh = || Snapshot::new(version as u64 + 1, std::time::Instant::now(), state(&moves, labels, stale, outlier), MeshConfig::default());
                    // Unchanged clusters keep their models, as the registry keeps them.
                    let mut clusters = fresh().clusters;
                    if let Some(p) = &prev {
                        for (now, before) in clusters.iter_mut().zip(&p.clusters) {
                            if now.0 == before.0 {
                                now.0 = before.0.clone();
                            }
                        }
                    }
                    let next = Snapshot::new(version as u64 + 1, std::time::Instant::now(), clusters, MeshConfig::default());
                    let next = match &prev {
                        Some(p) => next.after(p),
                        None => next,
                    };
                    let (a, b) = (served(&next).await, served(&fresh()).await);
                    proptest::prop_assert_eq!(a, b);
                    prev = Some(next);
                }
                Ok(())
            })?;
        }
    }

    #[tokio::test]
    async fn after_one_endpoint_moves_only_its_resource_is_new_and_unaffected_sets_are_the_same() {
        let (n1, n2) = (
            ProxyView::envoy(&NetworkId::new("n1")),
            ProxyView::envoy(&NetworkId::new("n2")),
        );
        let first = Snapshot::new(1, std::time::Instant::now(), clusters(1), MeshConfig::default());
        let mut sets = Vec::new();
        for p in [&n1, &n2] {
            for t in [CLUSTER_TYPE, ENDPOINT_TYPE] {
                sets.push(first.encoded(p, t).await);
            }
        }
        let second = Snapshot::new(2, std::time::Instant::now(), clusters(2), MeshConfig::default()).after(&first);
        let [cds1, eds1, cds2, eds2] = &sets[..] else { panic!() };
        assert!(
            Arc::ptr_eq(cds1, &second.encoded(&n1, CLUSTER_TYPE).await),
            "no cluster changed"
        );
        assert!(Arc::ptr_eq(cds2, &second.encoded(&n2, CLUSTER_TYPE).await));
        assert!(
            Arc::ptr_eq(eds2, &second.encoded(&n2, ENDPOINT_TYPE).await),
            "through the gateway nothing changed for n2: the same set, so no stream compares anything"
        );
        let eds = second.encoded(&n1, ENDPOINT_TYPE).await;
        let rebuilt: Vec<&str> = eds
            .iter()
            .zip(eds1.iter())
            .filter(|(a, b)| !Arc::ptr_eq(a, b))
            .map(|(a, _)| a.name.as_str())
            .collect();
        assert_eq!(
            rebuilt,
            ["outbound|80||s0.default.svc.cluster.local"],
            "only s0 is encoded again"
        );
        // A snapshot with the same state is served the same sets, by pointer.
        let third = Snapshot::new(
            3,
            std::time::Instant::now(),
            second.clusters.clone(),
            MeshConfig::default(),
        )
        .after(&second);
        assert!(Arc::ptr_eq(&eds, &third.encoded(&n1, ENDPOINT_TYPE).await));
    }
}
