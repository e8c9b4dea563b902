//! Merges every cluster into the endpoints a proxy on one network should see.
//!
//! Namespace sameness: `reviews.default.svc.cluster.local:9080` is one service
//! whichever clusters run it. Endpoints on the proxy's own network are used as
//! they are. Endpoints on another network can only be reached through that
//! network's east-west gateways: they are replaced by the gateways, weighted by
//! how many endpoints stand behind them (split evenly when a network has several
//! gateways), per locality so locality failover still works. Only endpoints
//! whose proxy speaks mesh mTLS cross networks, since the gateway routes on the
//! mTLS SNI. A network without a reachable gateway contributes nothing: its
//! endpoints never leak as unreachable addresses.
//!
//! A gateway known only by a host name (a cloud load balancer) stands for the
//! addresses it resolves to, each a gateway of its own, so the weight behind
//! its network is split across them; until it has been resolved it is no
//! gateway at all. Resolving is not done here ([`crate::resolve`] does it):
//! this is a pure function of the live cluster models, the mesh config and
//! the addresses resolved so far.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use mesh_vocab::{ClusterId, NetworkId};

use crate::model::{ClusterModel, Gateway, GatewayAddress, Instance, Locality, MeshConfig, ServiceKey};

/// The addresses each gateway host name resolved to, sorted.
pub type Resolved = BTreeMap<String, Vec<IpAddr>>;

/// One load-balancing endpoint as a proxy sees it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LbEndpoint {
    pub address: IpAddr,
    pub port: u16,
    /// For a gateway: the number of endpoints behind it in this locality.
    pub weight: u32,
    pub locality: Locality,
    /// The network the endpoint (or the endpoints behind the gateway) is on.
    pub network: NetworkId,
    /// For a direct endpoint: its cluster. For a gateway: None (it fronts a network).
    pub cluster: Option<ClusterId>,
    /// Reached through an east-west gateway.
    pub via_gateway: bool,
    /// Speaks mesh mTLS: a sidecar'd pod, or a gateway (which only passes mTLS through).
    pub mtls: bool,
    /// Comes from a cluster that has gone silent (kept for a bounded time).
    pub stale: bool,
    /// Behind one of our gateways, one remote endpoint of its own: the pod's address and
    /// target port, which the proxy pins its SNI to (`mesh_vocab::sni::pin`).
    pub pinned: Option<SocketAddr>,
}

/// Per service port, the endpoints for a proxy on one network, sorted.
pub type View = BTreeMap<ServiceKey, Vec<LbEndpoint>>;

/// Every gateway named by a host name, in live clusters or configured: what
/// there is to resolve.
pub fn gateway_hostnames<'a>(clusters: impl IntoIterator<Item = &'a ClusterModel>, mesh: &MeshConfig) -> Vec<String> {
    let mut names: Vec<String> = clusters
        .into_iter()
        .flat_map(|m| m.gateways.iter().map(|g| &g.address))
        .chain(mesh.gateways.values().flatten())
        .filter_map(|a| match a {
            GatewayAddress::Hostname(h) => Some(h.clone()),
            GatewayAddress::Ip(_) => None,
        })
        .collect();
    names.sort();
    names.dedup();
    names
}

/// The gateways of every network, by address: from gateway Services in live
/// clusters, and configured ones, host names replaced by what they resolved to.
pub fn gateways(
    clusters: &[(&ClusterModel, bool)],
    mesh: &MeshConfig,
    resolved: &Resolved,
) -> BTreeMap<NetworkId, Vec<SocketAddr>> {
    let mut out: BTreeMap<NetworkId, Vec<SocketAddr>> = BTreeMap::new();
    let configured = mesh.gateways.iter().flat_map(|(net, addrs)| {
        addrs.iter().map(|a| Gateway {
            network: net.clone(),
            address: a.clone(),
            port: crate::model::GATEWAY_PORT,
            // Configured by address: nothing says what it is, so Istio's behaviour.
            pins_endpoints: false,
        })
    });
    let found = clusters.iter().flat_map(|(m, _)| m.gateways.iter().cloned());
    for g in found.chain(configured) {
        let ips = match &g.address {
            GatewayAddress::Ip(ip) => std::slice::from_ref(ip),
            GatewayAddress::Hostname(h) => resolved.get(h).map(Vec::as_slice).unwrap_or_default(),
        };
        for ip in ips {
            out.entry(g.network.clone())
                .or_default()
                .push(SocketAddr::new(*ip, g.port));
        }
    }
    for gws in out.values_mut() {
        gws.sort();
        gws.dedup();
    }
    out
}

/// The networks whose every gateway is one of ours (pins endpoints): their endpoints are
/// listed one by one behind the gateways instead of collapsed into them. One gateway of
/// another kind (an Istio gateway, or one configured by address) keeps the network
/// collapsed, since it would refuse a pinned name.
fn pinning_networks(clusters: &[(&ClusterModel, bool)], mesh: &MeshConfig) -> BTreeSet<NetworkId> {
    let mut all: BTreeMap<&NetworkId, bool> = BTreeMap::new();
    for g in clusters.iter().flat_map(|(m, _)| m.gateways.iter()) {
        *all.entry(&g.network).or_insert(true) &= g.pins_endpoints;
    }
    all.into_iter()
        .filter(|(net, pins)| *pins && !mesh.gateways.contains_key(*net))
        .map(|(net, _)| net.clone())
        .collect()
}

/// The endpoints a proxy on `network` should see. `clusters` are the live
/// models with whether each is stale; `resolved` the gateway host names'
/// addresses.
pub fn view_for(
    network: &NetworkId,
    clusters: &[(&ClusterModel, bool)],
    mesh: &MeshConfig,
    resolved: &Resolved,
) -> View {
    federate(network, clusters, mesh, resolved, |i| vec![i.service.clone()])
}

/// A subset of a service port's instances: those carrying every label.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SubsetKey {
    pub service: ServiceKey,
    pub subset: String,
}

/// Per subset, the endpoints for a proxy on one network, sorted.
pub type SubsetView = BTreeMap<SubsetKey, Vec<LbEndpoint>>;

/// A subset and the labels its endpoints carry.
pub type SubsetLabels = (SubsetKey, BTreeMap<String, String>);

/// [`view_for`] per subset: `subsets` names each with the labels its instances
/// carry. Another network's gateway stands for as many endpoints as match there,
/// since the gateway sends the subset's SNI to the same subset on its side. Every
/// subset has an entry, empty when nothing matches: a proxy holding the subset's
/// cluster must be told it has no endpoints rather than left waiting for them.
pub fn subset_view_for(
    network: &NetworkId,
    clusters: &[(&ClusterModel, bool)],
    mesh: &MeshConfig,
    resolved: &Resolved,
    subsets: &[SubsetLabels],
) -> SubsetView {
    let mut by_service: BTreeMap<&ServiceKey, Vec<&SubsetLabels>> = BTreeMap::new();
    for s in subsets {
        by_service.entry(&s.0.service).or_default().push(s);
    }
    let mut view = federate(network, clusters, mesh, resolved, |i| {
        by_service
            .get(&i.service)
            .into_iter()
            .flatten()
            .filter(|(_, labels)| labels.iter().all(|(k, v)| i.labels.get(k) == Some(v)))
            .map(|(key, _)| key.clone())
            .collect()
    });
    for (key, _) in subsets {
        view.entry(key.clone()).or_default();
    }
    view
}

/// The federation of every instance under each key `keys_of` files it under.
fn federate<K: Ord + Clone + Hash>(
    network: &NetworkId,
    clusters: &[(&ClusterModel, bool)],
    mesh: &MeshConfig,
    resolved: &Resolved,
    keys_of: impl Fn(&Instance) -> Vec<K>,
) -> BTreeMap<K, Vec<LbEndpoint>> {
    let context = Context::new(clusters, mesh, resolved);
    let inputs = clusters
        .iter()
        .map(|(m, stale)| (&m.cluster, *stale, m.instances.as_slice()));
    federate_in(network, &context, inputs, keys_of)
}

/// What the federation of every service port reads besides its own instances: the
/// gateways of every network, and which networks' gateways pin endpoints. When it is
/// unchanged, a service port whose instances are unchanged federates to what it did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Context {
    gateways: BTreeMap<NetworkId, Vec<SocketAddr>>,
    pinning: BTreeSet<NetworkId>,
    /// What Istio Gateways say each network's gateways expose (a network not listed
    /// exposes every mTLS service), over every live cluster.
    exposure: BTreeMap<NetworkId, Vec<String>>,
}

impl Context {
    /// The context of the live `clusters`, `mesh` and the gateway names `resolved`.
    pub fn new(clusters: &[(&ClusterModel, bool)], mesh: &MeshConfig, resolved: &Resolved) -> Self {
        let mut exposure: BTreeMap<NetworkId, Vec<String>> = BTreeMap::new();
        for (m, _) in clusters {
            for (net, hosts) in &m.exposure {
                exposure.entry(net.clone()).or_default().extend(hosts.iter().cloned());
            }
        }
        for hosts in exposure.values_mut() {
            hosts.sort();
            hosts.dedup();
        }
        Self {
            gateways: gateways(clusters, mesh, resolved),
            pinning: pinning_networks(clusters, mesh),
            exposure,
        }
    }

    /// Whether `network`'s gateways let other networks reach `host`.
    fn exposes(&self, network: &NetworkId, host: &mesh_vocab::Hostname) -> bool {
        // Most networks have no Gateway saying: nothing to work out per instance then.
        let Some(patterns) = self.exposure.get(network) else {
            return true;
        };
        // A Service's host is NAME.NAMESPACE.svc.DOMAIN: a `ns/host` pattern needs its namespace.
        let host = host.as_str();
        let namespace = host
            .split('.')
            .nth(1)
            .filter(|_| host.contains(".svc."))
            .unwrap_or_default();
        crate::networking::gateway::exposes(Some(patterns), host, namespace)
    }
}

/// [`federate`] of the instances `clusters` hold (each cluster's, with whether it is stale)
/// in `context`. What a key gets depends on that key's instances and the context alone,
/// which is what lets [`NetworkView`] federate one service port at a time.
fn federate_in<'a, K: Ord + Clone + Hash>(
    network: &NetworkId,
    context: &Context,
    clusters: impl Iterator<Item = (&'a ClusterId, bool, &'a [Instance])>,
    keys_of: impl Fn(&Instance) -> Vec<K>,
) -> BTreeMap<K, Vec<LbEndpoint>> {
    let Context { gateways, pinning, .. } = context;
    let mut view: BTreeMap<K, Vec<LbEndpoint>> = BTreeMap::new();
    let mut behind: Behind<K> = BTreeMap::new();
    for (cluster, stale, instances) in clusters {
        for i in instances {
            for key in keys_of(i) {
                if i.network == *network {
                    view.entry(key).or_default().push(LbEndpoint {
                        address: i.address,
                        port: i.target_port,
                        weight: i.weight.max(1),
                        locality: i.locality.clone(),
                        network: i.network.clone(),
                        cluster: Some(cluster.clone()),
                        via_gateway: false,
                        mtls: i.mtls,
                        stale,
                        pinned: None,
                    });
                    continue;
                }
                // Only mTLS crosses networks (the gateways route on its SNI), and only to
                // a service the network's gateways expose.
                let crosses = i.mtls && context.exposes(&i.network, &i.service.host);
                if crosses && pinning.contains(&i.network) {
                    // One entry per (endpoint, gateway): the proxy balances and ejects the
                    // remote pods themselves, and may reach each through any gateway. Our
                    // gateways known only by names not resolved yet are none: nothing.
                    for g in gateways.get(&i.network).into_iter().flatten() {
                        view.entry(key.clone()).or_default().push(LbEndpoint {
                            address: g.ip(),
                            port: g.port(),
                            weight: i.weight.max(1),
                            locality: i.locality.clone(),
                            network: i.network.clone(),
                            cluster: Some(cluster.clone()),
                            via_gateway: true,
                            mtls: true,
                            stale,
                            pinned: Some(SocketAddr::new(i.address, i.target_port)),
                        });
                    }
                } else if crosses && gateways.contains_key(&i.network) {
                    *behind
                        .entry((key, i.network.clone(), i.locality.clone(), stale))
                        .or_default() += i.weight.max(1);
                }
            }
        }
    }
    spread_over_gateways(gateways, behind, &mut view);
    for eps in view.values_mut() {
        eps.sort();
    }
    view
}

/// Endpoints behind other networks' gateways, their weights summed per (key, network,
/// locality, stale).
type Behind<K> = BTreeMap<(K, NetworkId, Locality, bool), u32>;

/// Replaces the endpoints counted behind each network by its gateways, weighted.
fn spread_over_gateways<K: Ord + Clone + Hash>(
    gateways: &BTreeMap<NetworkId, Vec<SocketAddr>>,
    behind: Behind<K>,
    view: &mut BTreeMap<K, Vec<LbEndpoint>>,
) {
    // Where the next remainder goes, per key and network: it rotates over a key's
    // localities, and starts at a gateway picked by the key, so that small groups (one
    // endpoint in a locality) of different keys do not all land on the first gateway.
    // Per key, not across keys: a key's endpoints must not depend on other keys'.
    let mut rotate: BTreeMap<(&K, &NetworkId), u32> = BTreeMap::new();
    for ((service, net, locality, stale), n) in &behind {
        let gws = &gateways[net];
        let k = gws.len() as u32;
        let start = rotate.entry((service, net)).or_insert_with(|| {
            let mut h = std::hash::DefaultHasher::new();
            (service, net).hash(&mut h);
            (h.finish() % u64::from(k)) as u32
        });
        let first = *start;
        *start = (first + n % k) % k;
        for (j, g) in gws.iter().enumerate() {
            // n endpoints split over k gateways; n % k of them, from `first` on, take one more.
            let extra = (j as u32 + k - first) % k < n % k;
            let weight = n / k + u32::from(extra);
            if weight == 0 {
                continue;
            }
            view.entry(service.clone()).or_default().push(LbEndpoint {
                address: g.ip(),
                port: g.port(),
                weight,
                locality: locality.clone(),
                network: net.clone(),
                cluster: None,
                via_gateway: true,
                mtls: true,
                stale: *stale,
                pinned: None,
            });
        }
    }
}

/// One service port's instances in one cluster, in the cluster's order.
pub type Instances = Arc<[Instance]>;

/// One cluster's instances by service port.
pub type Grouped = BTreeMap<ServiceKey, Instances>;

/// `model`'s instances by service port. A group equal to its namesake in `prior` (the
/// same cluster's grouping before) is that one, shared: unchanged services stay the same
/// `Arc`, which is how a change is found per service without comparing instances again.
pub fn group(model: &ClusterModel, prior: Option<&Grouped>) -> Grouped {
    let mut by: BTreeMap<&ServiceKey, Vec<&Instance>> = BTreeMap::new();
    for i in &model.instances {
        by.entry(&i.service).or_default().push(i);
    }
    by.into_iter()
        .map(|(key, now)| {
            let same = prior
                .and_then(|p| p.get(key))
                .filter(|before| before.len() == now.len() && before.iter().zip(&now).all(|(a, b)| a == *b));
            let group = match same {
                Some(before) => before.clone(),
                None => now.into_iter().cloned().collect(),
            };
            (key.clone(), group)
        })
        .collect()
}

/// Everything one service port's federation reads of the clusters: each live cluster's
/// instances of it (in cluster order), with whether the cluster is stale.
#[derive(Debug, Clone, Default)]
pub struct ServiceInputs(Vec<(ClusterId, bool, Instances)>);

impl ServiceInputs {
    /// The same inputs: the same clusters, staleness and instance groups (by pointer).
    fn same(&self, other: &ServiceInputs) -> bool {
        self.0.len() == other.0.len()
            && self
                .0
                .iter()
                .zip(&other.0)
                .all(|(a, b)| a.0 == b.0 && a.1 == b.1 && Arc::ptr_eq(&a.2, &b.2))
    }

    /// Every instance, with its cluster and whether that is stale.
    pub fn instances(&self) -> impl Iterator<Item = (&ClusterId, bool, &Instance)> {
        self.0
            .iter()
            .flat_map(|(c, stale, is)| is.iter().map(move |i| (c, *stale, i)))
    }

    fn clusters(&self) -> impl Iterator<Item = (&ClusterId, bool, &[Instance])> {
        self.0.iter().map(|(c, stale, is)| (c, *stale, &is[..]))
    }
}

/// Federation's input indexed by service port, made from the previous index so that
/// unchanged clusters are not grouped again and unchanged services keep their groups.
#[derive(Debug, Clone)]
pub struct Index {
    /// Per live cluster: the model grouped, and its grouping.
    clusters: BTreeMap<ClusterId, (Arc<ClusterModel>, Arc<Grouped>)>,
    services: BTreeMap<ServiceKey, ServiceInputs>,
    context: Context,
}

impl Index {
    /// The index of the live `clusters` (with whether each is stale), `mesh` and the
    /// gateway names `resolved`; `prior` is the index of the state before, if any.
    pub fn new(
        clusters: &[(Arc<ClusterModel>, bool)],
        mesh: &MeshConfig,
        resolved: &Resolved,
        prior: Option<&Index>,
    ) -> Self {
        let mut grouped = BTreeMap::new();
        let mut services: BTreeMap<ServiceKey, ServiceInputs> = BTreeMap::new();
        for (m, stale) in clusters {
            let before = prior.and_then(|p| p.clusters.get(&m.cluster));
            let groups = match before {
                Some((model, groups)) if Arc::ptr_eq(model, m) => groups.clone(),
                _ => Arc::new(group(m, before.map(|(_, g)| g.as_ref()))),
            };
            for (key, instances) in groups.iter() {
                services
                    .entry(key.clone())
                    .or_default()
                    .0
                    .push((m.cluster.clone(), *stale, instances.clone()));
            }
            grouped.insert(m.cluster.clone(), (m.clone(), groups));
        }
        let refs: Vec<(&ClusterModel, bool)> = clusters.iter().map(|(m, s)| (m.as_ref(), *s)).collect();
        Self {
            clusters: grouped,
            services,
            context: Context::new(&refs, mesh, resolved),
        }
    }

    /// Whether `network`'s gateways let other networks reach `host` (its Gateways' hosts).
    pub fn exposes(&self, network: &NetworkId, host: &mesh_vocab::Hostname) -> bool {
        self.context.exposes(network, host)
    }

    /// Per service port, its inputs.
    pub fn services(&self) -> &BTreeMap<ServiceKey, ServiceInputs> {
        &self.services
    }

    /// The inputs of `key` if they are the same as in `prior` (by pointer).
    pub fn unchanged<'a>(&'a self, key: &ServiceKey, prior: &Index) -> Option<&'a ServiceInputs> {
        let now = self.services.get(key)?;
        prior.services.get(key).filter(|before| before.same(now)).map(|_| now)
    }
}

/// One network's federation, [`view_for`] and [`subset_view_for`] in one, kept from one
/// state to the next so that the next federates only the service ports whose inputs (or
/// subsets) changed, and shares the endpoints of the others. [`NetworkView::next`] of
/// any sequence of states equals the full federation of the last (tested below).
#[derive(Debug, Clone, Default)]
pub struct NetworkView {
    context: Option<Context>,
    services: BTreeMap<ServiceKey, Federated>,
}

/// One service port's federation for one network.
#[derive(Debug, Clone)]
struct Federated {
    inputs: ServiceInputs,
    subsets: Vec<SubsetLabels>,
    endpoints: Arc<Vec<LbEndpoint>>,
    subset_endpoints: Vec<(SubsetKey, Arc<Vec<LbEndpoint>>)>,
}

impl NetworkView {
    /// The view of `network` for the state `index` describes, with the subsets
    /// `subsets_of` each service port has, reusing what `self` (the state before) had
    /// federated from the same inputs.
    pub fn next(
        &self,
        network: &NetworkId,
        index: &Index,
        subsets_of: impl Fn(&ServiceKey) -> Vec<SubsetLabels>,
    ) -> NetworkView {
        let same_context = self.context.as_ref() == Some(&index.context);
        // Endpoints federated again but equal to those before are those before: a change
        // another network does not see (a pod moved behind a gateway) leaves its view the
        // same, by pointer, all the way to the encoded resources.
        let kept = |before: Option<&Arc<Vec<LbEndpoint>>>, now: Vec<LbEndpoint>| match before {
            Some(b) if **b == now => b.clone(),
            _ => Arc::new(now),
        };
        let mut services = BTreeMap::new();
        for (key, inputs) in &index.services {
            let before = self.services.get(key);
            let unchanged = before.filter(|f| same_context && f.inputs.same(inputs));
            let endpoints = match unchanged {
                Some(f) => f.endpoints.clone(),
                // Filed under the key itself, as in `view_for`: where a remainder goes is
                // picked by the key.
                None => match federate_in(network, &index.context, inputs.clusters(), |_| vec![key]).remove(&key) {
                    Some(eps) => kept(before.map(|f| &f.endpoints), eps),
                    None => continue, // nothing this network can reach
                },
            };
            let subsets = subsets_of(key);
            let subset_endpoints = match unchanged {
                Some(f) if f.subsets == subsets => f.subset_endpoints.clone(),
                _ => federate_subsets(network, &index.context, inputs, &subsets)
                    .into_iter()
                    .map(|(k, eps)| {
                        let old = before.and_then(|f| f.subset_endpoints.iter().find(|(o, _)| *o == k));
                        let eps = kept(old.map(|(_, e)| e), eps);
                        (k, eps)
                    })
                    .collect(),
            };
            services.insert(
                key.clone(),
                Federated {
                    inputs: inputs.clone(),
                    subsets,
                    endpoints,
                    subset_endpoints,
                },
            );
        }
        NetworkView {
            context: Some(index.context.clone()),
            services,
        }
    }

    /// Per service port this network reaches, its endpoints (shared with the view
    /// before when they did not change).
    pub fn endpoints(&self) -> impl Iterator<Item = (&ServiceKey, &Arc<Vec<LbEndpoint>>)> {
        self.services.iter().map(|(k, f)| (k, &f.endpoints))
    }

    /// The service ports this network reaches.
    pub fn keys(&self) -> impl Iterator<Item = &ServiceKey> {
        self.services.keys()
    }

    /// Whether this network reaches `key`.
    pub fn reaches(&self, key: &ServiceKey) -> bool {
        self.services.contains_key(key)
    }

    /// Per subset of the service ports this network reaches, its endpoints (empty when
    /// none match).
    pub fn subset_endpoints(&self) -> impl Iterator<Item = (&SubsetKey, &Arc<Vec<LbEndpoint>>)> {
        self.services
            .values()
            .flat_map(|f| f.subset_endpoints.iter().map(|(k, e)| (k, e)))
    }

    /// The subsets of the service ports this network reaches.
    pub fn subsets(&self) -> impl Iterator<Item = &SubsetLabels> {
        self.services.values().flat_map(|f| &f.subsets)
    }

    /// As a [`View`].
    pub fn view(&self) -> View {
        self.endpoints().map(|(k, e)| (k.clone(), e.to_vec())).collect()
    }

    /// As a [`SubsetView`].
    pub fn subset_view(&self) -> SubsetView {
        self.subset_endpoints().map(|(k, e)| (k.clone(), e.to_vec())).collect()
    }
}

/// The endpoints of each of `subsets` (one service port's) for `network`, every one
/// listed, empty when nothing matches.
fn federate_subsets(
    network: &NetworkId,
    context: &Context,
    inputs: &ServiceInputs,
    subsets: &[SubsetLabels],
) -> Vec<(SubsetKey, Vec<LbEndpoint>)> {
    if subsets.is_empty() {
        return Vec::new();
    }
    let mut by_key = federate_in(network, context, inputs.clusters(), |i| {
        subsets
            .iter()
            .filter(|(_, labels)| labels.iter().all(|(k, v)| i.labels.get(k) == Some(v)))
            .map(|(key, _)| key.clone())
            .collect()
    });
    let mut out: Vec<(SubsetKey, Vec<LbEndpoint>)> = subsets
        .iter()
        .map(|(key, _)| (key.clone(), by_key.remove(key).unwrap_or_default()))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out.dedup_by(|a, b| a.0 == b.0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_vocab::Hostname;
    use proptest::prelude::*;

    /// An Istio Gateway on network2's east-west gateway that exposes only `ratings`:
    /// network1 gets ratings behind that gateway and no reviews from network2 at all,
    /// while network2 itself still reaches both.
    #[test]
    fn only_what_a_networks_gateway_exposes_crosses_to_it() {
        let cluster2 = r#"
apiVersion: v1
kind: Namespace
metadata: {name: default, labels: {topology.istio.io/network: network2}}
---
apiVersion: v1
kind: Service
metadata: {name: istio-eastwestgateway, namespace: istio-system, labels: {topology.istio.io/network: network2}}
spec: {selector: {istio: eastwestgateway}, ports: [{name: tls, port: 15443}], externalIPs: [100.64.0.2]}
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: cross-network-gateway, namespace: istio-system}
spec:
  selector: {istio: eastwestgateway}
  servers: [{port: {number: 15443, name: tls, protocol: TLS}, tls: {mode: AUTO_PASSTHROUGH}, hosts: ["default/ratings.default.svc.cluster.local"]}]
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: default}
spec: {selector: {app: reviews}, ports: [{name: http, port: 9080}]}
---
apiVersion: v1
kind: Service
metadata: {name: ratings, namespace: default}
spec: {selector: {app: ratings}, ports: [{name: http, port: 9080}]}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: vm, namespace: default}
spec: {address: 10.242.0.9, labels: {app: reviews}, serviceAccount: vm}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: vm2, namespace: default}
spec: {address: 10.242.0.10, labels: {app: ratings}, serviceAccount: vm}
"#;
        let mut o = crate::objects::ClusterObjects::default();
        o.add_yaml(std::path::Path::new("cluster2/objects.yaml"), cluster2)
            .unwrap();
        assert!(o.refused.is_empty(), "{:?}", o.refused);
        let mesh = MeshConfig::default();
        let m = ClusterModel::build(&ClusterId::new("cluster2"), &o, &mesh);
        let show = |net: &str| -> Vec<String> {
            view_for(&NetworkId::new(net), &[(&m, false)], &mesh, &Resolved::new())
                .iter()
                .flat_map(|(k, eps)| eps.iter().map(move |e| format!("{k} {}:{}", e.address, e.port)))
                .collect()
        };
        assert_eq!(
            show("network1"),
            ["ratings.default.svc.cluster.local:9080 100.64.0.2:15443"]
        );
        assert_eq!(
            show("network2"),
            [
                "ratings.default.svc.cluster.local:9080 10.242.0.10:9080",
                "reviews.default.svc.cluster.local:9080 10.242.0.9:9080"
            ]
        );
    }

    fn svc(i: u8) -> ServiceKey {
        ServiceKey {
            host: Hostname::parse(&format!("s{i}.default.svc.cluster.local")).unwrap(),
            port: 9080,
        }
    }

    /// A gateway on one of three networks, some known by host name only, half of those
    /// resolved (see `resolved`); pinning endpoints as `pins` says.
    fn gateway_strategy(pins: impl Strategy<Value = bool>) -> impl Strategy<Value = Gateway> {
        (0u8..3, 1u8..4, any::<bool>(), pins).prop_map(|(net, host, named, pins)| Gateway {
            network: NetworkId::new(format!("net{net}")),
            address: if named {
                GatewayAddress::Hostname(format!("gw{host}.net{net}.example"))
            } else {
                GatewayAddress::Ip(IpAddr::from([100, 64, net, host]))
            },
            port: 15443,
            pins_endpoints: pins,
        })
    }

    /// A random mesh: clusters on a few networks, instances of a few services,
    /// some without mTLS, some networks with gateways and some without.
    fn mesh_strategy() -> impl Strategy<Value = Vec<ClusterModel>> {
        let instance = (0u8..3, 0u8..3, any::<bool>(), 0u8..2, any::<u8>(), 1u32..4).prop_map(
            |(s, net, mtls, zone, host, weight)| Instance {
                service: svc(s),
                address: IpAddr::from([10, 240 + net, zone, host]),
                target_port: 8080,
                network: NetworkId::new(format!("net{net}")),
                locality: Locality {
                    region: "r".into(),
                    zone: format!("z{zone}"),
                    subzone: String::new(),
                },
                mtls,
                labels: BTreeMap::new(),
                service_account: None,
                weight,
            },
        );
        let gateway = gateway_strategy(Just(false));
        proptest::collection::vec(
            (
                proptest::collection::vec(instance, 0..12),
                proptest::collection::vec(gateway, 0..2),
            ),
            1..5,
        )
        .prop_map(|clusters| {
            clusters
                .into_iter()
                .enumerate()
                .map(|(c, (mut instances, gateways))| {
                    // Addresses are unique per cluster in real life (one pod network each).
                    instances.sort_by_key(|i| (i.service.clone(), i.address));
                    instances.dedup_by_key(|i| (i.service.clone(), i.address));
                    for i in &mut instances {
                        if let IpAddr::V4(v4) = i.address {
                            let o = v4.octets();
                            i.address = IpAddr::from([o[0], o[1], o[2] + 10 * c as u8, o[3]]);
                        }
                    }
                    ClusterModel {
                        named: Vec::new(),
                        exposure: Default::default(),
                        traffic: Default::default(),
                        cluster: ClusterId::new(format!("c{c}")),
                        instances,
                        vips: vec![],
                        gateways,
                        security: Default::default(),
                    }
                })
                .collect()
        })
    }

    fn live(models: &[ClusterModel]) -> Vec<(&ClusterModel, bool)> {
        models.iter().map(|m| (m, false)).collect()
    }

    /// What the strategy's gateway names resolved to: `gw1` and `gw3` to two
    /// addresses each, `gw2` not (yet).
    fn resolved(models: &[ClusterModel]) -> Resolved {
        gateway_hostnames(models, &MeshConfig::default())
            .into_iter()
            .filter(|h| !h.starts_with("gw2."))
            .map(|h| {
                let n = h.as_bytes()[2] - b'0';
                let ips = vec![IpAddr::from([100, 65, 0, n]), IpAddr::from([100, 65, 1, n])];
                (h, ips)
            })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        /// Gateway weights add up to the weights of the mTLS endpoints behind them, per
        /// service, network and locality; networks without a gateway contribute nothing.
        #[test]
        fn gateway_weights_equal_endpoint_counts(models in mesh_strategy(), me in 0u8..3) {
            let mesh = MeshConfig::default();
            let me = NetworkId::new(format!("net{me}"));
            let view = view_for(&me, &live(&models), &mesh, &resolved(&models));
            let gws = gateways(&live(&models), &mesh, &resolved(&models));
            let mut expected: BTreeMap<(ServiceKey, NetworkId, Locality), u32> = BTreeMap::new();
            for m in &models {
                for i in m.instances.iter().filter(|i| i.network != me && i.mtls && gws.contains_key(&i.network)) {
                    *expected.entry((i.service.clone(), i.network.clone(), i.locality.clone())).or_default() += i.weight;
                }
            }
            let mut got: BTreeMap<(ServiceKey, NetworkId, Locality), u32> = BTreeMap::new();
            for (s, eps) in &view {
                for e in eps.iter().filter(|e| e.via_gateway) {
                    *got.entry((s.clone(), e.network.clone(), e.locality.clone())).or_default() += e.weight;
                    prop_assert!(e.weight > 0);
                }
            }
            prop_assert_eq!(got, expected);
        }

        /// Nothing on another network is ever handed out as a direct address:
        /// only gateway addresses of that network, and only for mTLS endpoints.
        #[test]
        fn nothing_on_another_network_leaks(models in mesh_strategy(), me in 0u8..3) {
            let mesh = MeshConfig::default();
            let me = NetworkId::new(format!("net{me}"));
            let view = view_for(&me, &live(&models), &mesh, &resolved(&models));
            let gws = gateways(&live(&models), &mesh, &resolved(&models));
            for eps in view.values() {
                for e in eps {
                    if e.via_gateway {
                        prop_assert_ne!(&e.network, &me);
                        let known = gws[&e.network].contains(&SocketAddr::new(e.address, e.port));
                        prop_assert!(known, "{:?} is not a gateway of {}", e.address, e.network);
                    } else {
                        prop_assert_eq!(&e.network, &me);
                    }
                }
            }
        }

        /// Removing cluster X changes only X's direct endpoints and the weight X
        /// added behind gateways (and X's own gateways): every other direct
        /// endpoint is untouched.
        #[test]
        fn removing_a_cluster_touches_only_its_endpoints(models in mesh_strategy(), me in 0u8..3, x in any::<prop::sample::Index>()) {
            let mesh = MeshConfig::default();
            let me = NetworkId::new(format!("net{me}"));
            let x = x.index(models.len());
            let names = resolved(&models);
            let all = view_for(&me, &live(&models), &mesh, &names);
            let rest: Vec<ClusterModel> = models.iter().enumerate().filter(|(i, _)| *i != x).map(|(_, m)| m.clone()).collect();
            let without = view_for(&me, &live(&rest), &mesh, &names);
            let x_id = models[x].cluster.clone();
            let direct = |v: &View, keep_x: bool| -> Vec<(ServiceKey, LbEndpoint)> {
                v.iter()
                    .flat_map(|(s, eps)| eps.iter().map(move |e| (s.clone(), e.clone())))
                    .filter(|(_, e)| !e.via_gateway && (keep_x || e.cluster.as_ref() != Some(&x_id)))
                    .collect()
            };
            prop_assert_eq!(direct(&all, false), direct(&without, true));
            // And the stale flag of a silent cluster never changes which endpoints there are.
            let stale: Vec<(&ClusterModel, bool)> = models.iter().enumerate().map(|(i, m)| (m, i == x)).collect();
            let marked = view_for(&me, &stale, &mesh, &names);
            // Stale and fresh endpoints behind one network are grouped apart, so
            // compare what each network and each direct endpoint carries in all.
            let totals = |v: &View| -> BTreeMap<(ServiceKey, NetworkId, Option<IpAddr>), u32> {
                let mut t = BTreeMap::new();
                for (s, eps) in v {
                    for e in eps {
                        let direct = (!e.via_gateway).then_some(e.address);
                        *t.entry((s.clone(), e.network.clone(), direct)).or_default() += e.weight;
                    }
                }
                t
            };
            prop_assert_eq!(totals(&marked), totals(&all));
        }
    }

    /// One change to a mesh, as sources make them: one cluster's state replaced (the
    /// others keep their models), a cluster turning stale or fresh, a cluster gone or back,
    /// gateways or subsets changed.
    #[derive(Debug, Clone)]
    enum Step {
        /// An instance of a cluster moves to another address, service, label or mTLS mode.
        Edit(prop::sample::Index, prop::sample::Index, u8, u8),
        /// A cluster loses one instance.
        Drop(prop::sample::Index, prop::sample::Index),
        /// A cluster gains a copy of another's instance, on its own pod network.
        Copy(prop::sample::Index, prop::sample::Index, prop::sample::Index),
        Stale(prop::sample::Index),
        /// A cluster's gateways are replaced (by none, sometimes).
        Gateways(prop::sample::Index, Vec<Gateway>),
        /// A cluster is removed, or, if removed before, comes back as it was.
        Toggle(prop::sample::Index),
        /// Which services have subsets (a bit each).
        Subsets(u8),
    }

    fn step_strategy() -> impl Strategy<Value = Step> {
        let ix = any::<prop::sample::Index>;
        let gateway = gateway_strategy(any::<bool>());
        prop_oneof![
            4 => (ix(), ix(), any::<u8>(), any::<u8>()).prop_map(|(c, i, what, v)| Step::Edit(c, i, what, v)),
            2 => (ix(), ix()).prop_map(|(c, i)| Step::Drop(c, i)),
            2 => (ix(), ix(), ix()).prop_map(|(c, i, to)| Step::Copy(c, i, to)),
            1 => ix().prop_map(Step::Stale),
            1 => (ix(), proptest::collection::vec(gateway, 0..3)).prop_map(|(c, g)| Step::Gateways(c, g)),
            1 => ix().prop_map(Step::Toggle),
            1 => any::<u8>().prop_map(Step::Subsets),
        ]
    }

    /// The live clusters, one removed cluster's model kept aside, and the subsets' bits.
    struct Mesh {
        live: Vec<(Arc<ClusterModel>, bool)>,
        removed: Vec<(Arc<ClusterModel>, bool)>,
        subsets: u8,
    }

    impl Mesh {
        fn apply(&mut self, step: &Step) {
            let live = &mut self.live;
            // Replaces cluster `c`'s model by an edited copy, as a source's update does.
            let edit = |live: &mut Vec<(Arc<ClusterModel>, bool)>, c: usize, f: &mut dyn FnMut(&mut ClusterModel)| {
                let mut m = (*live[c].0).clone();
                f(&mut m);
                live[c].0 = Arc::new(m);
            };
            match step {
                Step::Toggle(c) if !self.removed.is_empty() && (live.is_empty() || c.index(2) == 0) => {
                    let back = self.removed.remove(0);
                    let at = c.index(live.len() + 1);
                    live.insert(at, back);
                }
                _ if live.is_empty() => {}
                Step::Edit(c, i, what, v) => {
                    let c = c.index(live.len());
                    if live[c].0.instances.is_empty() {
                        return;
                    }
                    let i = i.index(live[c].0.instances.len());
                    edit(live, c, &mut |m| {
                        let inst = &mut m.instances[i];
                        match what % 4 {
                            0 => {
                                if let IpAddr::V4(a) = inst.address {
                                    let o = a.octets();
                                    inst.address = IpAddr::from([o[0], o[1], o[2], o[3].wrapping_add(*v | 1)]);
                                }
                            }
                            1 => inst.service = svc(v % 3),
                            2 => inst.mtls = !inst.mtls,
                            _ => {
                                inst.labels.insert("version".into(), format!("v{}", v % 2));
                            }
                        }
                    });
                }
                Step::Drop(c, i) => {
                    let c = c.index(live.len());
                    if !live[c].0.instances.is_empty() {
                        let i = i.index(live[c].0.instances.len());
                        edit(live, c, &mut |m| {
                            m.instances.remove(i);
                        });
                    }
                }
                Step::Copy(from, i, to) => {
                    let (from, to) = (from.index(live.len()), to.index(live.len()));
                    if live[from].0.instances.is_empty() {
                        return;
                    }
                    let mut inst = live[from].0.instances[i.index(live[from].0.instances.len())].clone();
                    if let IpAddr::V4(a) = inst.address {
                        let o = a.octets();
                        inst.address = IpAddr::from([o[0], o[1], 200u8.wrapping_add(to as u8), o[3]]);
                    }
                    edit(live, to, &mut |m| m.instances.push(inst.clone()));
                }
                Step::Stale(c) => {
                    let c = c.index(live.len());
                    live[c].1 = !live[c].1;
                }
                Step::Gateways(c, gws) => {
                    let c = c.index(live.len());
                    edit(live, c, &mut |m| m.gateways = gws.clone());
                }
                Step::Toggle(c) => {
                    let c = c.index(live.len());
                    self.removed.push(live.remove(c));
                }
                Step::Subsets(bits) => self.subsets = *bits,
            }
        }

        /// Per service with its bit set: a subset per version, and one matching everything.
        fn subsets_of(&self, key: &ServiceKey) -> Vec<SubsetLabels> {
            let bit = (0u8..3).find(|i| &svc(*i) == key).map_or(0, |i| 1 << i);
            if self.subsets & bit == 0 {
                return Vec::new();
            }
            let subset = |name: &str, labels: &[(&str, &str)]| {
                let key = SubsetKey {
                    service: key.clone(),
                    subset: name.to_owned(),
                };
                let labels = labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
                (key, labels)
            };
            vec![
                subset("v0", &[("version", "v0")]),
                subset("v1", &[("version", "v1")]),
                subset("all", &[]),
            ]
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

        /// Federating only what changed, step after step, always equals federating the
        /// whole mesh again: for every network, the service ports' endpoints and the
        /// subsets'. And what did not change is shared, not rebuilt.
        #[test]
        fn incremental_federation_equals_a_full_recomputation(
            models in mesh_strategy(),
            steps in proptest::collection::vec(step_strategy(), 1..24),
        ) {
            let mesh_config = MeshConfig::default();
            let mut mesh = Mesh {
                live: models.into_iter().map(|m| (Arc::new(m), false)).collect(),
                removed: Vec::new(),
                subsets: 0b101,
            };
            let networks: Vec<NetworkId> = (0..3).map(|n| NetworkId::new(format!("net{n}"))).collect();
            let mut index: Option<Index> = None;
            let mut views: Vec<NetworkView> = vec![NetworkView::default(); networks.len()];
            for step in &steps {
                mesh.apply(step);
                let models: Vec<ClusterModel> = mesh.live.iter().map(|(m, _)| (**m).clone()).collect();
                let names = resolved(&models);
                let next = Index::new(&mesh.live, &mesh_config, &names, index.as_ref());
                let refs: Vec<(&ClusterModel, bool)> = mesh.live.iter().map(|(m, s)| (m.as_ref(), *s)).collect();
                for (net, view) in networks.iter().zip(views.iter_mut()) {
                    let incremental = view.next(net, &next, |k| mesh.subsets_of(k));
                    let full = view_for(net, &refs, &mesh_config, &names);
                    prop_assert_eq!(incremental.view(), full.clone(), "view of {} after {:?}", net, step);
                    let subsets: Vec<SubsetLabels> = full.keys().flat_map(|k| mesh.subsets_of(k)).collect();
                    let full_subsets = subset_view_for(net, &refs, &mesh_config, &names, &subsets);
                    prop_assert_eq!(incremental.subset_view(), full_subsets, "subsets of {} after {:?}", net, step);
                    // Endpoints equal to those before are those before, shared.
                    for (k, eps) in incremental.endpoints() {
                        if let Some(f) = view.services.get(k).filter(|f| f.endpoints == *eps) {
                            prop_assert!(Arc::ptr_eq(eps, &f.endpoints), "{} rebuilt", k);
                        }
                    }
                    *view = incremental;
                }
                index = Some(next);
            }
        }
    }

    #[test]
    fn an_unchanged_cluster_keeps_its_groups_and_a_changed_one_only_the_changed_service_is_new() {
        let inst = |s: u8, host: u8| Instance {
            service: svc(s),
            address: IpAddr::from([10, 241, 0, host]),
            target_port: 8080,
            network: NetworkId::new("n1"),
            locality: Locality::default(),
            mtls: true,
            labels: BTreeMap::new(),
            service_account: None,
            weight: 1,
        };
        let model = |moved: u8| ClusterModel {
            named: Vec::new(),
            exposure: Default::default(),
            traffic: Default::default(),
            cluster: ClusterId::new("c1"),
            instances: vec![inst(0, moved), inst(1, 2), inst(1, 3)],
            vips: vec![],
            gateways: vec![],
            security: Default::default(),
        };
        let mesh = MeshConfig::default();
        let first = vec![(Arc::new(model(1)), false)];
        let a = Index::new(&first, &mesh, &Resolved::new(), None);
        let b = Index::new(&first, &mesh, &Resolved::new(), Some(&a));
        assert!(Arc::ptr_eq(
            &a.clusters[&ClusterId::new("c1")].1,
            &b.clusters[&ClusterId::new("c1")].1
        ));
        let moved = vec![(Arc::new(model(9)), false)];
        let c = Index::new(&moved, &mesh, &Resolved::new(), Some(&b));
        assert!(c.unchanged(&svc(0), &b).is_none(), "s0's endpoint moved");
        assert!(c.unchanged(&svc(1), &b).is_some(), "s1 is the same group, shared");
        let n1 = NetworkId::new("n1");
        let before = NetworkView::default().next(&n1, &b, |_| Vec::new());
        let after = before.next(&n1, &c, |_| Vec::new());
        assert!(Arc::ptr_eq(
            &before.services[&svc(1)].endpoints,
            &after.services[&svc(1)].endpoints
        ));
        assert_eq!(
            after.services[&svc(0)].endpoints[0].address,
            IpAddr::from([10, 241, 0, 9])
        );
    }

    #[test]
    fn a_two_network_example() {
        let inst = |net: &str, ip: [u8; 4], mtls: bool| Instance {
            service: svc(0),
            address: IpAddr::from(ip),
            target_port: 8080,
            network: NetworkId::new(net),
            locality: Locality::default(),
            mtls,
            labels: BTreeMap::new(),
            service_account: None,
            weight: 1,
        };
        let c1 = ClusterModel {
            named: Vec::new(),
            exposure: Default::default(),
            traffic: Default::default(),
            cluster: ClusterId::new("c1"),
            instances: vec![inst("n1", [10, 241, 0, 5], true)],
            vips: vec![],
            gateways: vec![Gateway {
                network: NetworkId::new("n1"),
                address: GatewayAddress::Ip([100, 64, 0, 1].into()),
                port: 15443,
                pins_endpoints: false,
            }],
            security: Default::default(),
        };
        let c2 = ClusterModel {
            named: Vec::new(),
            exposure: Default::default(),
            traffic: Default::default(),
            cluster: ClusterId::new("c2"),
            instances: vec![
                inst("n2", [10, 242, 0, 5], true),
                inst("n2", [10, 242, 0, 6], true),
                inst("n2", [10, 242, 0, 7], false),
            ],
            vips: vec![],
            gateways: vec![
                Gateway {
                    network: NetworkId::new("n2"),
                    address: GatewayAddress::Ip([100, 64, 0, 2].into()),
                    port: 15443,
                    pins_endpoints: false,
                },
                Gateway {
                    network: NetworkId::new("n2"),
                    address: GatewayAddress::Hostname("gw2.example.com".into()),
                    port: 15443,
                    pins_endpoints: false,
                },
            ],
            security: Default::default(),
        };
        let endpoints = |resolved: &Resolved| -> Vec<String> {
            let v = view_for(
                &NetworkId::new("n1"),
                &[(&c1, false), (&c2, true)],
                &MeshConfig::default(),
                resolved,
            );
            v[&svc(0)]
                .iter()
                .map(|e| {
                    format!(
                        "{}:{} w{} gw={} stale={}",
                        e.address, e.port, e.weight, e.via_gateway, e.stale
                    )
                })
                .collect()
        };
        assert_eq!(
            endpoints(&Resolved::new()),
            [
                "10.241.0.5:8080 w1 gw=false stale=false",
                "100.64.0.2:15443 w2 gw=true stale=true",
            ],
            "a gateway name not resolved yet takes no share"
        );
        let resolved = Resolved::from([(
            "gw2.example.com".to_owned(),
            vec![IpAddr::from([100, 64, 0, 3]), IpAddr::from([100, 64, 0, 2])],
        )]);
        assert_eq!(
            gateways(&[(&c2, false)], &MeshConfig::default(), &resolved)[&NetworkId::new("n2")],
            [
                SocketAddr::from(([100, 64, 0, 2], 15443)),
                SocketAddr::from(([100, 64, 0, 3], 15443))
            ],
            "a resolved name is its addresses, each once"
        );
    }

    #[test]
    fn behind_our_gateways_each_remote_pod_is_an_endpoint_of_its_own_pinned_to_its_address() {
        let inst = |n: u8, mtls: bool| Instance {
            service: svc(0),
            address: IpAddr::from([10, 242, 0, n]),
            target_port: 8080,
            network: NetworkId::new("n2"),
            locality: Locality::default(),
            mtls,
            labels: BTreeMap::new(),
            service_account: None,
            weight: 1,
        };
        let gateway = |last: u8, pins_endpoints: bool| Gateway {
            network: NetworkId::new("n2"),
            address: GatewayAddress::Ip([100, 64, 0, last].into()),
            port: 15443,
            pins_endpoints,
        };
        let c2 = |gateways: Vec<Gateway>| ClusterModel {
            named: Vec::new(),
            exposure: Default::default(),
            traffic: Default::default(),
            cluster: ClusterId::new("c2"),
            instances: vec![inst(5, true), inst(6, true), inst(7, false)],
            vips: vec![],
            gateways,
            security: Default::default(),
        };
        let endpoints = |c: &ClusterModel| -> Vec<String> {
            view_for(
                &NetworkId::new("n1"),
                &[(c, false)],
                &MeshConfig::default(),
                &Resolved::new(),
            )[&svc(0)]
                .iter()
                .map(|e| {
                    let pin = e.pinned.map_or("-".to_owned(), |p| p.to_string());
                    format!("{}:{} w{} {pin} {:?}", e.address, e.port, e.weight, e.cluster)
                })
                .collect()
        };
        // Two of our gateways: every mTLS pod through each, pinned; the plaintext pod stays out.
        let ours = c2(vec![gateway(2, true), gateway(3, true)]);
        assert_eq!(
            endpoints(&ours),
            [
                "100.64.0.2:15443 w1 10.242.0.5:8080 Some(ClusterId(\"c2\"))",
                "100.64.0.2:15443 w1 10.242.0.6:8080 Some(ClusterId(\"c2\"))",
                "100.64.0.3:15443 w1 10.242.0.5:8080 Some(ClusterId(\"c2\"))",
                "100.64.0.3:15443 w1 10.242.0.6:8080 Some(ClusterId(\"c2\"))",
            ]
        );
        // One gateway that is not ours (it would refuse a pinned name): the network is
        // collapsed into its gateways, weighted, as Istio does.
        let mixed = c2(vec![gateway(2, true), gateway(3, false)]);
        assert_eq!(
            endpoints(&mixed),
            ["100.64.0.2:15443 w1 - None", "100.64.0.3:15443 w1 - None"]
        );
    }

    #[test]
    fn a_gateway_name_is_every_address_it_resolved_to_sharing_the_weight() {
        let inst = |n: u8| Instance {
            service: svc(0),
            address: IpAddr::from([10, 242, 0, n]),
            target_port: 8080,
            network: NetworkId::new("n2"),
            locality: Locality::default(),
            mtls: true,
            labels: BTreeMap::new(),
            service_account: None,
            weight: 1,
        };
        let c2 = ClusterModel {
            named: Vec::new(),
            exposure: Default::default(),
            traffic: Default::default(),
            cluster: ClusterId::new("c2"),
            instances: (1..=4).map(inst).collect(),
            vips: vec![],
            gateways: vec![Gateway {
                network: NetworkId::new("n2"),
                address: GatewayAddress::Hostname("lb.example.com".into()),
                port: 15443,
                pins_endpoints: false,
            }],
            security: Default::default(),
        };
        let endpoints = |resolved: &Resolved| -> Vec<String> {
            view_for(&NetworkId::new("n1"), &[(&c2, false)], &MeshConfig::default(), resolved)
                .get(&svc(0))
                .into_iter()
                .flatten()
                .map(|e| format!("{}:{} w{}", e.address, e.port, e.weight))
                .collect()
        };
        assert!(
            endpoints(&Resolved::new()).is_empty(),
            "unresolved, the network has no gateway and contributes nothing"
        );
        let ips = |last: &[u8]| -> Resolved {
            let ips = last.iter().map(|n| IpAddr::from([198, 51, 100, *n])).collect();
            Resolved::from([("lb.example.com".to_owned(), ips)])
        };
        assert_eq!(endpoints(&ips(&[7])), ["198.51.100.7:15443 w4"]);
        assert_eq!(
            endpoints(&ips(&[7, 8])),
            ["198.51.100.7:15443 w2", "198.51.100.8:15443 w2"]
        );
    }
}
