//! Where captured outbound traffic goes: the table the sidecar builds from the controller's
//! listeners, clusters and endpoints (Istio's shapes), and nothing else.
//!
//! - A listener `VIP_PORT` (address VIP:port, a `tcp_proxy` to cluster C) says that a
//!   connection whose original destination is VIP:port belongs to C; a `tcp_proxy` with
//!   `weighted_clusters` sends each connection to one of them, chosen by weight. Of
//!   several filter chains, the one Envoy would choose ([`crate::filter_chain`]); when
//!   that depends on the ClientHello (`server_names`, as VirtualService `tls` routes
//!   make), per connection, once the application's own ClientHello has been read.
//! - A listener whose filter is an `http_connection_manager` says that such a connection
//!   carries HTTP, each request routed by the route configuration it names (RDS), compiled
//!   into a [`RouteTable`].
//! - Cluster C says how to speak to its endpoints: Istio's auto-mTLS is a transport-socket
//!   match on `tlsMode: istio` whose TLS context names the SNI to send and the SPIFFE IDs
//!   the server may prove; endpoints without that metadata are spoken to in plaintext.
//! - Its load assignment lists the endpoints, already as this proxy's network should see
//!   them: pods on our network as they are, other networks' as their east-west gateways.
//!
//! Pure: decoded resources in, table out. Anything malformed is an error that names the
//! resource, so the xDS client can NACK it and keep the last table.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::cluster::v3::cluster::{ClusterDiscoveryType, DiscoveryType};
use envoy_types::pb::envoy::config::core::v3::{
    TrafficDirection, TransportSocket, address, socket_address, transport_socket,
};
use envoy_types::pb::envoy::config::endpoint::v3::{ClusterLoadAssignment, lb_endpoint};
use envoy_types::pb::envoy::config::listener::v3::{FilterChain, Listener, filter};
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, http_connection_manager,
};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{TcpProxy, tcp_proxy};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, UpstreamTlsContext, common_tls_context, subject_alt_name_matcher,
};
use envoy_types::pb::envoy::r#type::matcher::v3::string_matcher;
use envoy_types::pb::google::protobuf::{Any, Struct, value::Kind};
use mesh_vocab::spiffe::SpiffeId;
use prost::Message;

use crate::balance::{Balancer, Policy};
use crate::cluster::{Breaker, ClusterPolicy, Health, Reply, UpstreamHttp};
use crate::filter_chain::{self, ChainMatch, Seen};
use crate::priority::{self, Level};
use crate::route::RouteTable;
use crate::tls::origination::{self, Origination};
use crate::virtual_inbound::VIRTUAL_INBOUND;

const TCP_PROXY_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy";
const HCM_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
const UPSTREAM_TLS_TYPE: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext";
/// The endpoint-metadata key Envoy matches transport sockets on.
pub const TRANSPORT_SOCKET_MATCH: &str = "envoy.transport_socket_match";

/// A resource that cannot be used, named.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{resource}: {problem}")]
pub struct BadResource {
    pub resource: String,
    pub problem: String,
}

fn bad(resource: &str, problem: impl Into<String>) -> BadResource {
    BadResource {
        resource: resource.to_owned(),
        problem: problem.into(),
    }
}

/// How a cluster's mesh endpoints are spoken to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshTls {
    /// The SNI to send (Istio's `outbound_.PORT_.SUBSET_.HOST`), which gateways route by.
    pub sni: String,
    /// The identities the server may prove; empty means any identity we trust.
    pub identities: Vec<SpiffeId>,
    /// Endpoint metadata that selects mTLS; `None` means every endpoint speaks it.
    pub when: Option<BTreeMap<String, String>>,
}

/// One endpoint of a cluster, as this proxy is to reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Where connections go: the pod, or the east-west gateway in front of it.
    pub address: SocketAddr,
    pub weight: u32,
    /// Spoken to inside mutual TLS.
    pub mtls: bool,
    /// The cluster that runs it (Istio's endpoint metadata), for metrics.
    pub cluster: Option<String>,
    /// The network it is on (Istio's endpoint metadata): another network's endpoint is
    /// an east-west gateway.
    pub network: Option<String>,
    /// Its EDS priority level (0 first), for locality failover.
    pub priority: u32,
    /// The one pod behind our gateway at `address` that this endpoint is (its
    /// `istio.endpoint` metadata, `POD_IP:TARGET_PORT`): the gateway is asked for exactly
    /// that pod by a pinned SNI ([`mesh_vocab::sni::pin`]), so the pod is balanced over
    /// and ejected on its own. `None`: the address is all there is (a pod, or a gateway
    /// standing for its whole network).
    pub pinned: Option<SocketAddr>,
}

impl Endpoint {
    /// Whether it is reached through an east-west gateway (to a proxy on `our_network`):
    /// a pod pinned behind one, or an address standing for several pods (weighted by
    /// them) — unless the controller says it is on our own network, where a weight is
    /// just a weight (a WorkloadEntry's).
    pub fn through_gateway(&self, our_network: Option<&str>) -> bool {
        let ours = self.network.is_some() && self.network.as_deref() == our_network;
        self.pinned.is_some() || (self.weight > 1 && !ours)
    }

    /// The SNI to send it in mTLS: the cluster's, pinned to the pod when there is one.
    pub fn sni(&self, tls: &MeshTls) -> String {
        match self.pinned {
            Some(pod) => mesh_vocab::sni::pin(pod, &tls.sni),
            None => tls.sni.clone(),
        }
    }

    /// What tells endpoints apart, in a table and across tables: endpoints pinned behind
    /// one gateway share its address.
    pub fn identity(&self) -> (SocketAddr, Option<SocketAddr>) {
        (self.address, self.pinned)
    }
}

/// One upstream cluster, ready to route to.
#[derive(Debug)]
pub struct Upstream {
    pub name: String,
    /// The service host, for metrics: `reviews.default.svc.cluster.local`.
    pub service: String,
    pub tls: Option<MeshTls>,
    /// TLS of its own to every endpoint (a DestinationRule's SIMPLE or MUTUAL), instead
    /// of the mesh's.
    pub origination: Option<Arc<Origination>>,
    pub endpoints: Vec<Endpoint>,
    pub balancer: Balancer,
    /// Outlier detection, when the cluster asks for it.
    pub health: Option<Health>,
    pub breaker: Arc<Breaker>,
    /// Which HTTP its mesh endpoints are spoken to in.
    pub http: UpstreamHttp,
    /// Requests one pooled connection to an endpoint carries before a fresh one takes over.
    pub max_requests_per_connection: Option<u64>,
    /// EDS `overprovisioning_factor`, in percent.
    pub overprovisioning: u32,
}

impl Upstream {
    /// Istio's `PassthroughCluster` for one request: the connection's original destination
    /// its one endpoint, outside the mesh, with no limits of its own.
    pub fn passthrough(original: SocketAddr) -> Upstream {
        let policy = ClusterPolicy::of(&Cluster {
            name: PASSTHROUGH_CLUSTER.into(),
            ..Default::default()
        })
        .expect("an empty cluster has the default policy");
        Upstream {
            name: PASSTHROUGH_CLUSTER.into(),
            service: original.ip().to_string(),
            tls: None,
            origination: None,
            endpoints: vec![Endpoint {
                address: original,
                weight: 1,
                mtls: false,
                cluster: None,
                network: None,
                priority: 0,
                pinned: None,
            }],
            balancer: Balancer::new(policy.lb, &[1]),
            health: None,
            breaker: Arc::new(Breaker::new(&policy)),
            http: policy.http,
            max_requests_per_connection: None,
            overprovisioning: priority::DEFAULT_OVERPROVISIONING,
        }
    }

    /// Whether endpoint `i` may be chosen now (not ejected as an outlier).
    pub fn usable(&self, i: usize) -> bool {
        self.health.as_ref().is_none_or(|h| h.usable(i, self.endpoints.len()))
    }

    /// The priority level a request goes to now, when the endpoints have several.
    pub fn level(&self) -> Option<u32> {
        let mut levels: Vec<Level> = Vec::new();
        for (i, e) in self.endpoints.iter().enumerate() {
            let healthy = usize::from(!self.health.as_ref().is_some_and(|h| h.ejected(i)));
            match levels.iter_mut().find(|l| l.priority == e.priority) {
                Some(l) => {
                    l.healthy += healthy;
                    l.total += 1;
                }
                None => levels.push(Level {
                    priority: e.priority,
                    healthy,
                    total: 1,
                }),
            }
        }
        if levels.len() < 2 {
            return None;
        }
        levels.sort_by_key(|l| l.priority);
        priority::choose(&levels, self.overprovisioning)
    }

    /// Tells outlier detection how a request to endpoint `i` ended.
    pub fn record(&self, i: usize, reply: Reply) {
        if let Some(h) = &self.health {
            h.record(i, reply);
        }
    }
}

/// Istio's cluster of connections carried to their original destination untouched.
pub const PASSTHROUGH_CLUSTER: &str = "PassthroughCluster";

/// Where [`Destinations::routed`] sends a connection.
#[derive(Debug)]
pub enum Routed<'a> {
    Upstream(&'a Arc<Upstream>),
    /// To its original destination, untouched.
    Passthrough,
    /// No chain takes it, or its cluster is unknown.
    Unrouted,
}

/// The whole table.
#[derive(Debug, Default)]
pub struct Destinations {
    /// Original destination → cluster(s), for `tcp_proxy` listeners.
    pub listeners: HashMap<SocketAddr, TcpClusters>,
    /// Original destination → chains, for `tcp_proxy` listeners that choose by the
    /// application's ClientHello (VirtualService `tls` routes).
    pub hello_listeners: HashMap<SocketAddr, HelloChains>,
    /// Original destination → route configuration name, for HTTP listeners.
    pub http_listeners: HashMap<SocketAddr, String>,
    pub upstreams: HashMap<String, Arc<Upstream>>,
    /// The route configurations HTTP listeners name, compiled; one not received yet is
    /// missing, and its listener's requests find no route (404), as Envoy's once its
    /// listener stops warming.
    pub routes: HashMap<String, Arc<RouteTable>>,
}

impl Destinations {
    /// The upstream a TCP connection to `original` goes to, if any: among weighted
    /// clusters, one chosen by weight on each call, so once per connection.
    pub fn route(&self, original: SocketAddr) -> Option<&Arc<Upstream>> {
        self.route_seen(Seen {
            destination: original,
            hello: None,
        })
    }

    /// [`Destinations::route`] for a connection whose ClientHello (if it sent one) was read.
    pub fn route_seen(&self, seen: Seen<'_>) -> Option<&Arc<Upstream>> {
        match self.routed(seen) {
            Routed::Upstream(upstream) => Some(upstream),
            Routed::Passthrough | Routed::Unrouted => None,
        }
    }

    /// Where a connection whose ClientHello (if it sent one) was read goes: to an upstream,
    /// through to its original destination (a chain to Istio's `PassthroughCluster`), or
    /// nowhere.
    pub fn routed(&self, seen: Seen<'_>) -> Routed<'_> {
        let clusters = match self.hello_chains(seen.destination) {
            Some(chains) => chains.clusters(seen),
            None => self.listeners.get(&seen.destination),
        };
        let Some(clusters) = clusters else {
            return Routed::Unrouted;
        };
        match clusters.pick() {
            PASSTHROUGH_CLUSTER => Routed::Passthrough,
            name => self.upstreams.get(name).map_or(Routed::Unrouted, Routed::Upstream),
        }
    }

    /// The address whose listener takes a connection to `original`: its own, else, when no
    /// listener is its own, the port's wildcard one (`0.0.0.0_PORT`, which Istio makes for
    /// hosts without an address: by SNI on TLS ports, by `Host` on HTTP ones).
    fn listening_at(&self, original: SocketAddr) -> SocketAddr {
        let own = self.listeners.contains_key(&original)
            || self.hello_listeners.contains_key(&original)
            || self.http_listeners.contains_key(&original);
        match own {
            true => original,
            false => SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), original.port()),
        }
    }

    /// The chains that choose by ClientHello for `original`, if its listener has them.
    fn hello_chains(&self, original: SocketAddr) -> Option<&HelloChains> {
        self.hello_listeners.get(&self.listening_at(original))
    }

    /// Whether the listener at `original` chooses its chain by the ClientHello, which the
    /// application's connection must then be read for.
    pub fn reads_hello(&self, original: SocketAddr) -> bool {
        self.hello_chains(original).is_some()
    }

    /// The route configuration name of the HTTP listener at `original`, if it is one.
    pub fn http_listener(&self, original: SocketAddr) -> Option<&str> {
        self.http_listeners
            .get(&self.listening_at(original))
            .map(String::as_str)
    }

    /// How many listeners route anything.
    pub fn routable(&self) -> usize {
        self.listeners.len() + self.hello_listeners.len() + self.http_listeners.len()
    }

    /// The route configurations the HTTP listeners name (what to ask RDS for), sorted.
    pub fn route_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.http_listeners.values().cloned().collect();
        names.sort();
        names.dedup();
        names
    }

    /// Carries state over from `old`, the table this one replaces: each endpoint's outlier
    /// health (matched by cluster and [`Endpoint::identity`]), so that a new table does not
    /// give a failing endpoint a fresh start, and, where a cluster's limits did not change,
    /// its circuit breaker's counts, so that what the old table admitted still counts
    /// (an endpoint update is frequent while a cluster fails over, as Envoy keeps a
    /// cluster's counts across EDS updates).
    pub fn inherit(&mut self, old: &Destinations) {
        for (name, up) in self.upstreams.iter_mut() {
            let Some(before) = old.upstreams.get(name) else {
                continue;
            };
            if !before.breaker.same_limits(&up.breaker) {
                continue;
            }
            // Only this table holds its upstreams yet.
            if let Some(up) = Arc::get_mut(up) {
                up.breaker = before.breaker.clone();
            }
        }
        for (name, up) in &self.upstreams {
            let (Some(health), Some(before)) = (&up.health, old.upstreams.get(name)) else {
                continue;
            };
            let Some(old_health) = &before.health else { continue };
            for (to, e) in up.endpoints.iter().enumerate() {
                if let Some(from) = before.endpoints.iter().position(|o| o.identity() == e.identity()) {
                    health.inherit(to, old_health, from);
                }
            }
        }
    }

    /// Compiles the route configurations among `configs` that HTTP listeners name.
    pub fn with_routes(mut self, configs: &HashMap<String, RouteConfiguration>) -> Result<Self, BadResource> {
        for name in self.route_names() {
            if let Some(rc) = configs.get(&name) {
                self.routes.insert(name, Arc::new(RouteTable::compile(rc)?));
            }
        }
        Ok(self)
    }

    /// Builds the table; clusters without a load assignment yet have no endpoints.
    pub fn build(
        listeners: &[Listener],
        clusters: &[Cluster],
        assignments: &HashMap<String, ClusterLoadAssignment>,
    ) -> Result<Destinations, BadResource> {
        let mut table = Destinations::default();
        for l in listeners {
            match listener_route(l)? {
                Some((addr, Listening::Tcp(cluster))) => {
                    table.listeners.insert(addr, cluster);
                }
                Some((addr, Listening::Http(route))) => {
                    table.http_listeners.insert(addr, route);
                }
                Some((addr, Listening::Hello(chains))) => {
                    table.hello_listeners.insert(addr, chains);
                }
                None => {}
            }
        }
        for c in clusters.iter().filter(|c| balanced(c)) {
            let tls = mesh_tls(c)?;
            let origination = originated(c)?;
            let endpoints = match assignments.get(&c.name) {
                Some(cla) => endpoints(cla, tls.as_ref())?,
                None => Vec::new(),
            };
            let overprovisioning = assignments
                .get(&c.name)
                .and_then(|cla| cla.policy.as_ref()?.overprovisioning_factor)
                .map_or(priority::DEFAULT_OVERPROVISIONING, |f| f.value.max(1));
            let weights: Vec<u32> = endpoints.iter().map(|e| e.weight).collect();
            let policy = ClusterPolicy::of(c)?;
            let upstream = Upstream {
                name: c.name.clone(),
                service: service_of(&c.name),
                tls,
                origination,
                balancer: match policy.lb {
                    Policy::RingHash => {
                        // A pinned endpoint is placed by its pod: its gateway's address is shared.
                        let keys: Vec<String> = endpoints
                            .iter()
                            .map(|e| e.pinned.unwrap_or(e.address).to_string())
                            .collect();
                        Balancer::ring(&weights, &keys)
                    }
                    lb => Balancer::new(lb, &weights),
                },
                health: policy.outlier.clone().map(|o| Health::new(o, endpoints.len())),
                breaker: Arc::new(Breaker::new(&policy)),
                http: policy.http,
                max_requests_per_connection: policy.max_requests_per_connection,
                overprovisioning,
                endpoints,
            };
            table.upstreams.insert(c.name.clone(), Arc::new(upstream));
        }
        Ok(table)
    }
}

/// Whether `c` is an upstream whose endpoints we balance over, not one to a connection's
/// original destination (Istio's `PassthroughCluster`, `InboundPassthroughCluster` and
/// inbound clusters `inbound|PORT||`): the sidecar passes such connections through by
/// itself, and an inbound cluster only says which HTTP the application speaks
/// (`app_http`).
pub fn balanced(c: &Cluster) -> bool {
    c.cluster_discovery_type != Some(ClusterDiscoveryType::Type(DiscoveryType::OriginalDst as i32))
}

/// The host of Istio's `outbound|PORT|SUBSET|HOST`, or the name itself.
fn service_of(cluster: &str) -> String {
    cluster.rsplit('|').next().unwrap_or(cluster).to_owned()
}

fn decode_any<M: Message + Default>(resource: &str, any: &Any, type_url: &str) -> Result<M, BadResource> {
    if any.type_url != type_url {
        return Err(bad(resource, format!("expected {type_url}, got {}", any.type_url)));
    }
    M::decode(any.value.as_slice()).map_err(|e| bad(resource, format!("undecodable {type_url}: {e}")))
}

/// The cluster(s) of a `tcp_proxy`, with their weights (each at least 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpClusters(Vec<(String, u32)>);

impl TcpClusters {
    /// One cluster, taking every connection.
    pub fn one(cluster: impl Into<String>) -> Self {
        TcpClusters(vec![(cluster.into(), 1)])
    }

    /// A cluster chosen at random by weight.
    pub fn pick(&self) -> &str {
        let total: u64 = self.0.iter().map(|(_, w)| u64::from(*w)).sum();
        let mut at = if self.0.len() > 1 {
            rand::Rng::random_range(&mut rand::rng(), 0..total)
        } else {
            0
        };
        for (name, w) in &self.0 {
            if at < u64::from(*w) {
                return name;
            }
            at -= u64::from(*w);
        }
        &self.0[0].0
    }

    /// The clusters and their weights.
    pub fn weights(&self) -> &[(String, u32)] {
        &self.0
    }
}

/// What a listener does with its connections.
enum Listening {
    /// A `tcp_proxy` to these clusters.
    Tcp(TcpClusters),
    /// An HTTP connection manager routing by this RDS route configuration.
    Http(String),
    /// `tcp_proxy` chains chosen by the connection's ClientHello.
    Hello(HelloChains),
}

/// The chains of a TCP listener that chooses among them by what the application's
/// ClientHello says (a VirtualService `tls` route's `sniHosts`): each chain's match and
/// its `tcp_proxy`'s clusters (`None`: a chain without one, whose connections are closed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloChains {
    matches: Vec<ChainMatch>,
    clusters: Vec<Option<TcpClusters>>,
}

impl HelloChains {
    /// The clusters of the chain a connection is handed to, if any.
    pub fn clusters(&self, seen: Seen<'_>) -> Option<&TcpClusters> {
        self.clusters[filter_chain::select(&self.matches, seen)?].as_ref()
    }
}

/// The action of one filter chain: its first `tcp_proxy` or HTTP connection manager.
fn chain_action(l: &Listener, chain: &FilterChain) -> Result<Option<Listening>, BadResource> {
    for f in &chain.filters {
        let Some(filter::ConfigType::TypedConfig(any)) = &f.config_type else {
            continue;
        };
        match any.type_url.as_str() {
            TCP_PROXY_TYPE => {
                let proxy: TcpProxy = decode_any(&l.name, any, TCP_PROXY_TYPE)?;
                match proxy.cluster_specifier {
                    Some(tcp_proxy::ClusterSpecifier::Cluster(cluster)) => {
                        return Ok(Some(Listening::Tcp(TcpClusters::one(cluster))));
                    }
                    Some(tcp_proxy::ClusterSpecifier::WeightedClusters(w)) => {
                        let weighted: Vec<(String, u32)> = w
                            .clusters
                            .into_iter()
                            .filter(|c| c.weight > 0)
                            .map(|c| (c.name, c.weight))
                            .collect();
                        if weighted.is_empty() {
                            return Err(bad(&l.name, "tcp_proxy weighted_clusters with no weight"));
                        }
                        return Ok(Some(Listening::Tcp(TcpClusters(weighted))));
                    }
                    None => {}
                }
            }
            HCM_TYPE => {
                let hcm: HttpConnectionManager = decode_any(&l.name, any, HCM_TYPE)?;
                return match hcm.route_specifier {
                    Some(http_connection_manager::RouteSpecifier::Rds(rds)) if !rds.route_config_name.is_empty() => {
                        Ok(Some(Listening::Http(rds.route_config_name)))
                    }
                    // Istio's outbound listeners always use RDS; an inline or scoped table
                    // is refused rather than routed some other way.
                    _ => Err(bad(
                        &l.name,
                        "an HTTP connection manager must name an RDS route configuration",
                    )),
                };
            }
            _ => {}
        }
    }
    Ok(None)
}

/// VIP:port → what to do, for a listener that is a TCP proxy or an HTTP connection manager
/// on RDS; other listeners are not ours to route by here. The chain is the one Envoy would
/// hand a connection to VIP:port ([`filter_chain::select`]); when that depends on the
/// ClientHello, every chain is kept and the choice made per connection. Inbound ones
/// (`virtualInbound`, see [`crate::virtual_inbound`]) are skipped before their chains are
/// read: their `tcp_proxy` to `inbound|PORT||` would read as an outbound route for
/// 0.0.0.0:15006, and their HCMs carry inline route tables that an outbound one refuses.
fn listener_route(l: &Listener) -> Result<Option<(SocketAddr, Listening)>, BadResource> {
    if l.traffic_direction == TrafficDirection::Inbound as i32 || l.name == VIRTUAL_INBOUND {
        return Ok(None);
    }
    let Some(address::Address::SocketAddress(sa)) = l.address.as_ref().and_then(|a| a.address.as_ref()) else {
        return Ok(None);
    };
    let ip: IpAddr = sa
        .address
        .parse()
        .map_err(|_| bad(&l.name, format!("address {:?} is not an IP", sa.address)))?;
    let Some(socket_address::PortSpecifier::PortValue(port)) = sa.port_specifier else {
        return Err(bad(&l.name, "no port"));
    };
    let port = u16::try_from(port).map_err(|_| bad(&l.name, format!("port {port} out of range")))?;
    let addr = SocketAddr::new(ip, port);
    let matches = l
        .filter_chains
        .iter()
        .map(|c| ChainMatch::of(&l.name, c.filter_chain_match.as_ref()))
        .collect::<Result<Vec<_>, _>>()?;
    if matches.iter().any(ChainMatch::needs_hello) {
        let mut clusters = Vec::with_capacity(matches.len());
        for chain in &l.filter_chains {
            clusters.push(match chain_action(l, chain)? {
                Some(Listening::Tcp(c)) => Some(c),
                None => None,
                // Istio puts an HCM beside TLS chains only on gateways, never on a sidecar's
                // outbound listener; refused rather than served half.
                Some(_) => {
                    return Err(bad(
                        &l.name,
                        "an HTTP connection manager beside chains chosen by the ClientHello is not supported",
                    ));
                }
            });
        }
        return Ok(Some((addr, Listening::Hello(HelloChains { matches, clusters }))));
    }
    let seen = Seen {
        destination: addr,
        hello: None,
    };
    // Only the chain taken is read: the others may hold what an outbound listener refuses.
    let Some(i) = filter_chain::select(&matches, seen) else {
        return Ok(None);
    };
    Ok(chain_action(l, &l.filter_chains[i])?.map(|a| (addr, a)))
}

fn struct_strings(s: &Struct) -> BTreeMap<String, String> {
    s.fields
        .iter()
        .filter_map(|(k, v)| match &v.kind {
            Some(Kind::StringValue(s)) => Some((k.clone(), s.clone())),
            _ => None,
        })
        .collect()
}

fn tls_of(cluster: &str, socket: &TransportSocket) -> Result<Option<UpstreamTlsContext>, BadResource> {
    match &socket.config_type {
        Some(transport_socket::ConfigType::TypedConfig(any)) if any.type_url == UPSTREAM_TLS_TYPE => {
            Ok(Some(decode_any(cluster, any, UPSTREAM_TLS_TYPE)?))
        }
        _ => Ok(None),
    }
}

/// TLS originated to every endpoint: a cluster's transport socket that is not the mesh's.
fn originated(c: &Cluster) -> Result<Option<Arc<Origination>>, BadResource> {
    let Some(ctx) = c
        .transport_socket
        .as_ref()
        .map(|t| tls_of(&c.name, t))
        .transpose()?
        .flatten()
    else {
        return Ok(None);
    };
    if origination::is_mesh(&ctx) {
        return Ok(None);
    }
    let o = Origination::of(&ctx, &service_of(&c.name)).map_err(|e| bad(&c.name, format!("TLS origination: {e}")))?;
    Ok(Some(Arc::new(o)))
}

/// Istio's auto-mTLS: the TLS transport socket, on every endpoint or on those matching.
fn mesh_tls(c: &Cluster) -> Result<Option<MeshTls>, BadResource> {
    let mut found = None;
    for m in &c.transport_socket_matches {
        if let Some(ctx) = m
            .transport_socket
            .as_ref()
            .map(|t| tls_of(&c.name, t))
            .transpose()?
            .flatten()
        {
            found = Some((ctx, Some(m.r#match.as_ref().map(struct_strings).unwrap_or_default())));
            break;
        }
    }
    if found.is_none()
        && let Some(ctx) = c
            .transport_socket
            .as_ref()
            .map(|t| tls_of(&c.name, t))
            .transpose()?
            .flatten()
    {
        found = Some((ctx, None));
    }
    let Some((ctx, when)) = found else { return Ok(None) };
    if !origination::is_mesh(&ctx) {
        return Ok(None);
    }
    let validation = ctx
        .common_tls_context
        .as_ref()
        .and_then(|c| c.validation_context_type.as_ref());
    let vc: Option<&CertificateValidationContext> = match validation {
        Some(common_tls_context::ValidationContextType::CombinedValidationContext(c)) => {
            c.default_validation_context.as_ref()
        }
        Some(common_tls_context::ValidationContextType::ValidationContext(v)) => Some(v),
        _ => None,
    };
    let mut identities = Vec::new();
    for m in vc
        .map(|v| v.match_typed_subject_alt_names.as_slice())
        .unwrap_or_default()
    {
        if m.san_type != subject_alt_name_matcher::SanType::Uri as i32 {
            continue;
        }
        let Some(string_matcher::MatchPattern::Exact(uri)) = m.matcher.as_ref().and_then(|s| s.match_pattern.as_ref())
        else {
            // Prefix and regex matches on SPIFFE IDs are not something we honour loosely.
            return Err(bad(&c.name, "only exact URI SAN matches are supported"));
        };
        identities.push(SpiffeId::parse(uri).map_err(|e| bad(&c.name, format!("SAN {uri:?}: {e}")))?);
    }
    identities.sort();
    identities.dedup();
    let sni = if ctx.sni.is_empty() {
        // Istio always sets it; without one, the cluster name's own form is the best guess.
        mesh_vocab::IstioSni::of_cluster(&c.name)
            .map(|sni| sni.to_string())
            .ok_or_else(|| bad(&c.name, "TLS without SNI"))?
    } else {
        ctx.sni
    };
    Ok(Some(MeshTls { sni, identities, when }))
}

fn endpoints(cla: &ClusterLoadAssignment, tls: Option<&MeshTls>) -> Result<Vec<Endpoint>, BadResource> {
    let name = &cla.cluster_name;
    let mut out = Vec::new();
    for locality in &cla.endpoints {
        for e in &locality.lb_endpoints {
            let Some(lb_endpoint::HostIdentifier::Endpoint(ep)) = &e.host_identifier else {
                continue;
            };
            let Some(address::Address::SocketAddress(sa)) = ep.address.as_ref().and_then(|a| a.address.as_ref()) else {
                continue;
            };
            let ip: IpAddr = sa
                .address
                .parse()
                .map_err(|_| bad(name, format!("endpoint {:?} is not an IP", sa.address)))?;
            let Some(socket_address::PortSpecifier::PortValue(port)) = sa.port_specifier else {
                return Err(bad(name, format!("endpoint {ip} has no port")));
            };
            let port = u16::try_from(port).map_err(|_| bad(name, format!("port {port} out of range")))?;
            let meta = |key: &str| {
                e.metadata
                    .as_ref()
                    .and_then(|m| m.filter_metadata.get(key))
                    .map(struct_strings)
                    .unwrap_or_default()
            };
            let socket_match = meta(TRANSPORT_SOCKET_MATCH);
            let mut istio = meta("istio");
            let pinned = istio
                .remove("endpoint")
                .map(|pod| {
                    pod.parse::<SocketAddr>()
                        .map_err(|_| bad(name, format!("endpoint metadata {pod:?} is not POD_IP:TARGET_PORT")))
                })
                .transpose()?;
            let mtls = match tls {
                None => false,
                Some(MeshTls { when: None, .. }) => true,
                Some(MeshTls { when: Some(when), .. }) => when.iter().all(|(k, v)| socket_match.get(k) == Some(v)),
            };
            out.push(Endpoint {
                address: SocketAddr::new(ip, port),
                weight: e.load_balancing_weight.map_or(1, |w| w.value.max(1)),
                mtls,
                cluster: istio.remove("cluster"),
                network: istio.remove("network"),
                priority: locality.priority,
                pinned,
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::cluster::v3::cluster::TransportSocketMatch;
    use envoy_types::pb::envoy::config::core::v3::{Address, Metadata, SocketAddress};
    use envoy_types::pb::envoy::config::endpoint::v3::{Endpoint as EnvoyEndpoint, LbEndpoint, LocalityLbEndpoints};
    use envoy_types::pb::envoy::config::listener::v3::{Filter, FilterChain};
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
        CommonTlsContext, SubjectAltNameMatcher, common_tls_context::CombinedCertificateValidationContext,
    };
    use envoy_types::pb::envoy::r#type::matcher::v3::StringMatcher;
    use envoy_types::pb::google::protobuf::{UInt32Value, Value};

    const CLUSTER: &str = "outbound|9080||reviews.default.svc.cluster.local";

    fn any<M: Message>(type_url: &str, m: &M) -> Any {
        Any {
            type_url: type_url.into(),
            value: m.encode_to_vec(),
        }
    }

    fn sock(ip: &str, port: u32) -> Address {
        Address {
            address: Some(address::Address::SocketAddress(SocketAddress {
                address: ip.into(),
                port_specifier: Some(socket_address::PortSpecifier::PortValue(port)),
                ..Default::default()
            })),
        }
    }

    fn strings(kv: &[(&str, &str)]) -> Struct {
        Struct {
            fields: kv
                .iter()
                .map(|(k, v)| {
                    let v = Value {
                        kind: Some(Kind::StringValue((*v).into())),
                    };
                    ((*k).to_owned(), v)
                })
                .collect(),
        }
    }

    /// A listener at `vip:port` with one filter.
    fn one_filter(vip: &str, port: u32, filter: &str, config: Any) -> Listener {
        Listener {
            name: format!("{vip}_{port}"),
            address: Some(sock(vip, port)),
            filter_chains: vec![FilterChain {
                filters: vec![Filter {
                    name: filter.into(),
                    config_type: Some(filter::ConfigType::TypedConfig(config)),
                }],
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn listener(vip: &str, port: u32, cluster: &str) -> Listener {
        let proxy = TcpProxy {
            stat_prefix: cluster.into(),
            cluster_specifier: Some(tcp_proxy::ClusterSpecifier::Cluster(cluster.into())),
            ..Default::default()
        };
        one_filter(
            vip,
            port,
            "envoy.filters.network.tcp_proxy",
            any(TCP_PROXY_TYPE, &proxy),
        )
    }

    #[test]
    fn a_tcp_listener_takes_its_narrowest_chain_and_weighs_its_clusters() {
        use envoy_types::pb::envoy::config::core::v3::CidrRange;
        use envoy_types::pb::envoy::config::listener::v3::FilterChainMatch;
        let chain = |m: Option<FilterChainMatch>, spec: tcp_proxy::ClusterSpecifier| FilterChain {
            filter_chain_match: m,
            filters: vec![Filter {
                name: "envoy.filters.network.tcp_proxy".into(),
                config_type: Some(filter::ConfigType::TypedConfig(any(
                    TCP_PROXY_TYPE,
                    &TcpProxy {
                        cluster_specifier: Some(spec),
                        ..Default::default()
                    },
                ))),
            }],
            ..Default::default()
        };
        let cluster = |c: &str| tcp_proxy::ClusterSpecifier::Cluster(c.into());
        let range = |ip: &str, len: u32| CidrRange {
            address_prefix: ip.into(),
            prefix_len: Some(UInt32Value { value: len }),
        };
        let weighted = tcp_proxy::ClusterSpecifier::WeightedClusters(tcp_proxy::WeightedCluster {
            clusters: [("a", 80), ("b", 20), ("none", 0)]
                .iter()
                .map(|(n, w)| tcp_proxy::weighted_cluster::ClusterWeight {
                    name: (*n).into(),
                    weight: *w,
                    ..Default::default()
                })
                .collect(),
        });
        let listener_at = |vip: &str| Listener {
            name: format!("{vip}_5432"),
            address: Some(sock(vip, 5432)),
            filter_chains: vec![
                chain(
                    Some(FilterChainMatch {
                        server_names: vec!["db.example.com".into()],
                        transport_protocol: "tls".into(),
                        ..Default::default()
                    }),
                    cluster("tls"),
                ),
                chain(None, weighted.clone()),
                chain(
                    Some(FilterChainMatch {
                        prefix_ranges: vec![range("10.0.0.0", 8)],
                        ..Default::default()
                    }),
                    cluster("wide"),
                ),
                chain(
                    Some(FilterChainMatch {
                        prefix_ranges: vec![range("10.96.0.0", 16)],
                        ..Default::default()
                    }),
                    cluster("near"),
                ),
            ],
            ..Default::default()
        };
        let table = Destinations::build(
            &[
                listener_at("10.96.0.20"),
                listener_at("10.1.0.1"),
                listener_at("192.168.0.1"),
            ],
            &[],
            &HashMap::new(),
        )
        .unwrap();
        let hello = crate::client_hello::ClientHello {
            server_name: Some("db.example.com".into()),
            alpn: Vec::new(),
            wire_len: 0,
        };
        let at = |vip: &str, hello: Option<&crate::client_hello::ClientHello>| {
            let destination = format!("{vip}:5432").parse().unwrap();
            assert!(table.reads_hello(destination), "a chain asks for the SNI");
            table.hello_listeners[&destination]
                .clusters(Seen { destination, hello })
                .unwrap()
        };
        assert_eq!(at("10.96.0.20", None), &TcpClusters::one("near"), "the narrowest range");
        assert_eq!(at("10.1.0.1", None), &TcpClusters::one("wide"));
        assert_eq!(
            at("10.1.0.1", Some(&hello)),
            &TcpClusters::one("wide"),
            "the range comes before the SNI"
        );
        assert_eq!(at("192.168.0.1", Some(&hello)), &TcpClusters::one("tls"));
        let split = at("192.168.0.1", None);
        assert_eq!(split.weights(), [("a".to_owned(), 80), ("b".to_owned(), 20)]);
        let n = 10_000;
        let a = (0..n).filter(|_| split.pick() == "a").count();
        // 80 % of 10,000: the standard deviation is 40, so ±200 fails once in ~10^6 runs.
        assert!((7_800..=8_200).contains(&a), "{a} of {n} to a");
    }

    /// Istio's outbound HTTP listener: an HCM on RDS route `HOST:PORT`.
    pub(crate) fn http_listener(vip: &str, port: u32, route: &str) -> Listener {
        use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::Rds;
        let hcm = HttpConnectionManager {
            stat_prefix: format!("outbound_{vip}_{port}"),
            route_specifier: Some(http_connection_manager::RouteSpecifier::Rds(Rds {
                config_source: None,
                route_config_name: route.into(),
            })),
            ..Default::default()
        };
        one_filter(
            vip,
            port,
            "envoy.filters.network.http_connection_manager",
            any(HCM_TYPE, &hcm),
        )
    }

    #[test]
    fn an_http_listener_routes_by_its_route_configuration() {
        use envoy_types::pb::envoy::config::route::v3::VirtualHost;
        let route = "reviews.default.svc.cluster.local:9080";
        let table = Destinations::build(
            &[
                listener("10.242.255.10", 9080, CLUSTER),
                http_listener("10.242.255.11", 9080, route),
            ],
            &[],
            &HashMap::new(),
        )
        .unwrap();
        assert_eq!(table.routable(), 2);
        assert!(
            table.route("10.242.255.11:9080".parse().unwrap()).is_none(),
            "not a TCP listener"
        );
        assert_eq!(table.http_listener("10.242.255.11:9080".parse().unwrap()), Some(route));
        assert_eq!(table.route_names(), [route]);
        let configs = HashMap::from([(
            route.to_owned(),
            RouteConfiguration {
                name: route.into(),
                virtual_hosts: vec![VirtualHost {
                    name: route.into(),
                    domains: vec!["*".into()],
                    ..Default::default()
                }],
                ..Default::default()
            },
        )]);
        let table = table.with_routes(&configs).unwrap();
        assert_eq!(table.routes[route].name, route);

        let mut inline = http_listener("10.242.255.12", 80, route);
        if let Some(filter::ConfigType::TypedConfig(a)) = &mut inline.filter_chains[0].filters[0].config_type {
            a.value = HttpConnectionManager::default().encode_to_vec();
        }
        let e = Destinations::build(&[inline], &[], &HashMap::new()).unwrap_err();
        assert_eq!(e.resource, "10.242.255.12_80");
    }

    /// The controller's `virtualInbound`: 0.0.0.0:15006, a `tcp_proxy` chain to the
    /// workload's own port, a portless one to `InboundPassthroughCluster`, and an HTTP
    /// chain whose HCM carries its route table inline.
    fn virtual_inbound() -> Listener {
        use envoy_types::pb::envoy::config::route::v3::VirtualHost;
        let mut l = listener("0.0.0.0", 15006, "inbound|9080||");
        l.name = VIRTUAL_INBOUND.into();
        l.traffic_direction = TrafficDirection::Inbound as i32;
        let passthrough = listener("0.0.0.0", 15006, "InboundPassthroughCluster");
        let hcm = HttpConnectionManager {
            stat_prefix: "inbound_0.0.0.0_9080".into(),
            route_specifier: Some(http_connection_manager::RouteSpecifier::RouteConfig(
                RouteConfiguration {
                    name: "inbound|9080||".into(),
                    virtual_hosts: vec![VirtualHost {
                        name: "inbound|http|9080".into(),
                        domains: vec!["*".into()],
                        ..Default::default()
                    }],
                    ..Default::default()
                },
            )),
            ..Default::default()
        };
        let http = one_filter(
            "0.0.0.0",
            15006,
            "envoy.filters.network.http_connection_manager",
            any(HCM_TYPE, &hcm),
        );
        l.filter_chains.extend(passthrough.filter_chains);
        l.filter_chains.extend(http.filter_chains);
        l
    }

    #[test]
    fn inbound_listeners_are_never_taken_for_outbound_routes() {
        let table = Destinations::build(
            &[virtual_inbound(), listener("10.242.255.10", 9080, CLUSTER)],
            &[],
            &HashMap::new(),
        )
        .unwrap();
        assert_eq!(table.routable(), 1, "only the service's listener routes");
        let inbound: SocketAddr = "0.0.0.0:15006".parse().unwrap();
        assert!(table.route(inbound).is_none() && table.http_listener(inbound).is_none());
        assert!(table.route_names().is_empty(), "nothing to ask RDS for");

        // Either mark is enough: the direction, or the name alone.
        let mut by_direction = virtual_inbound();
        by_direction.name = "inbound_0.0.0.0_15006".into();
        let mut by_name = virtual_inbound();
        by_name.traffic_direction = TrafficDirection::Unspecified as i32;
        for l in [by_direction, by_name] {
            assert_eq!(Destinations::build(&[l], &[], &HashMap::new()).unwrap().routable(), 0);
        }
        let mut outbound = virtual_inbound();
        outbound.name = "0.0.0.0_15006".into();
        outbound.traffic_direction = TrafficDirection::Outbound as i32;
        let table = Destinations::build(&[outbound], &[], &HashMap::new()).unwrap();
        assert_eq!(table.listeners.get(&inbound), Some(&TcpClusters::one("inbound|9080||")));
    }

    #[tokio::test(start_paused = true)]
    async fn an_ejected_endpoint_stays_out_across_a_new_table() {
        use crate::cluster::Reply;
        use envoy_types::pb::envoy::config::cluster::v3::OutlierDetection;
        let c = Cluster {
            name: CLUSTER.into(),
            outlier_detection: Some(OutlierDetection {
                consecutive_5xx: Some(UInt32Value { value: 1 }),
                max_ejection_percent: Some(UInt32Value { value: 50 }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let eps = || {
            assignment(
                CLUSTER,
                vec![endpoint("10.0.0.1", 80, 1, false), endpoint("10.0.0.2", 80, 1, false)],
            )
        };
        let old = Destinations::build(&[], std::slice::from_ref(&c), &eps()).unwrap();
        old.upstreams[CLUSTER].record(1, Reply::Status(hyper::StatusCode::BAD_GATEWAY));
        assert!(!old.upstreams[CLUSTER].usable(1));
        // The next table lists the endpoints the other way round.
        let mut reordered = eps();
        reordered.get_mut(CLUSTER).unwrap().endpoints[0].lb_endpoints.reverse();
        let mut new = Destinations::build(&[], &[c], &reordered).unwrap();
        new.inherit(&old);
        let up = &new.upstreams[CLUSTER];
        assert!(!up.usable(0) && up.usable(1), "10.0.0.2 is still out");
    }

    #[test]
    fn the_circuit_breakers_counts_carry_over_to_a_new_table_with_the_same_limits() {
        use envoy_types::pb::envoy::config::cluster::v3::CircuitBreakers;
        use envoy_types::pb::envoy::config::cluster::v3::circuit_breakers::Thresholds;
        let limited = |max: u32| Cluster {
            name: CLUSTER.into(),
            circuit_breakers: Some(CircuitBreakers {
                thresholds: vec![Thresholds {
                    max_requests: Some(UInt32Value { value: max }),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        };
        let eps = assignment(CLUSTER, vec![endpoint("10.0.0.1", 80, 1, false)]);
        let old = Destinations::build(&[], &[limited(1)], &eps).unwrap();
        let _in_flight = old.upstreams[CLUSTER].breaker.request().unwrap();
        // An endpoint update: the request the old table admitted still holds the one place.
        let mut new = Destinations::build(&[], &[limited(1)], &assignment(CLUSTER, vec![])).unwrap();
        new.inherit(&old);
        assert!(new.upstreams[CLUSTER].breaker.request().is_none());
        // New limits start their own counts.
        let mut raised = Destinations::build(&[], &[limited(2)], &eps).unwrap();
        raised.inherit(&old);
        let breaker = &raised.upstreams[CLUSTER].breaker;
        let (a, b) = (breaker.request(), breaker.request());
        assert!(a.is_some() && b.is_some());
    }

    fn auto_mtls_cluster(name: &str, sans: &[&str]) -> Cluster {
        let vc = CertificateValidationContext {
            match_typed_subject_alt_names: sans
                .iter()
                .map(|s| SubjectAltNameMatcher {
                    san_type: subject_alt_name_matcher::SanType::Uri as i32,
                    matcher: Some(StringMatcher {
                        match_pattern: Some(string_matcher::MatchPattern::Exact((*s).into())),
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        let ctx = UpstreamTlsContext {
            sni: "outbound_.9080_._.reviews.default.svc.cluster.local".into(),
            common_tls_context: Some(CommonTlsContext {
                alpn_protocols: vec!["istio".into()],
                validation_context_type: Some(common_tls_context::ValidationContextType::CombinedValidationContext(
                    CombinedCertificateValidationContext {
                        default_validation_context: Some(vc),
                        ..Default::default()
                    },
                )),
                ..Default::default()
            }),
            ..Default::default()
        };
        Cluster {
            name: name.into(),
            transport_socket_matches: vec![
                TransportSocketMatch {
                    name: "tlsMode-istio".into(),
                    r#match: Some(strings(&[("tlsMode", "istio")])),
                    transport_socket: Some(TransportSocket {
                        name: "envoy.transport_sockets.tls".into(),
                        config_type: Some(transport_socket::ConfigType::TypedConfig(any(UPSTREAM_TLS_TYPE, &ctx))),
                    }),
                },
                TransportSocketMatch {
                    name: "tlsMode-disabled".into(),
                    r#match: Some(Struct::default()),
                    transport_socket: Some(TransportSocket {
                        name: "envoy.transport_sockets.raw_buffer".into(),
                        config_type: None,
                    }),
                },
            ],
            ..Default::default()
        }
    }

    fn endpoint(ip: &str, port: u32, weight: u32, mtls: bool) -> LbEndpoint {
        let mut filter_metadata = std::collections::HashMap::from([(
            "istio".to_owned(),
            strings(&[("network", "network2"), ("cluster", "cluster2")]),
        )]);
        if mtls {
            filter_metadata.insert(TRANSPORT_SOCKET_MATCH.into(), strings(&[("tlsMode", "istio")]));
        }
        LbEndpoint {
            host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(EnvoyEndpoint {
                address: Some(sock(ip, port)),
                ..Default::default()
            })),
            load_balancing_weight: Some(UInt32Value { value: weight }),
            metadata: Some(Metadata {
                filter_metadata,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn assignment(name: &str, eps: Vec<LbEndpoint>) -> HashMap<String, ClusterLoadAssignment> {
        HashMap::from([(
            name.to_owned(),
            ClusterLoadAssignment {
                cluster_name: name.into(),
                endpoints: vec![LocalityLbEndpoints {
                    lb_endpoints: eps,
                    ..Default::default()
                }],
                ..Default::default()
            },
        )])
    }

    #[test]
    fn a_vip_routes_to_its_cluster_with_mtls_only_where_the_endpoint_speaks_it() {
        let table = Destinations::build(
            &[listener("10.242.255.10", 9080, CLUSTER)],
            &[auto_mtls_cluster(
                CLUSTER,
                &["spiffe://cluster.local/ns/default/sa/reviews"],
            )],
            &assignment(
                CLUSTER,
                vec![
                    endpoint("100.64.0.2", 15443, 3, true),
                    endpoint("10.241.0.9", 9080, 1, false),
                ],
            ),
        )
        .unwrap();
        let up = table.route("10.242.255.10:9080".parse().unwrap()).expect("routed");
        assert_eq!(up.service, "reviews.default.svc.cluster.local");
        let tls = up.tls.as_ref().unwrap();
        assert_eq!(tls.sni, "outbound_.9080_._.reviews.default.svc.cluster.local");
        assert_eq!(
            tls.identities[0].as_str(),
            "spiffe://cluster.local/ns/default/sa/reviews"
        );
        assert_eq!(up.endpoints.len(), 2);
        assert!(up.endpoints[0].mtls && up.endpoints[0].weight == 3);
        assert_eq!(up.endpoints[0].cluster.as_deref(), Some("cluster2"));
        assert!(!up.endpoints[1].mtls, "no tlsMode metadata: plaintext");
        assert!(table.route("10.242.255.10:9081".parse().unwrap()).is_none());
        assert!(table.route("10.242.255.11:9080".parse().unwrap()).is_none());
    }

    /// An endpoint at our gateway `100.64.0.2:15443` that is the pod `pod` alone.
    fn pinned(pod: &str) -> LbEndpoint {
        let mut e = endpoint("100.64.0.2", 15443, 1, true);
        let metadata = e.metadata.as_mut().unwrap();
        metadata.filter_metadata.insert(
            "istio".into(),
            strings(&[("network", "network2"), ("cluster", "cluster2"), ("endpoint", pod)]),
        );
        e
    }

    #[tokio::test(start_paused = true)]
    async fn pods_behind_a_gateway_are_endpoints_of_their_own() {
        use crate::cluster::Reply;
        use envoy_types::pb::envoy::config::cluster::v3::OutlierDetection;
        let mut c = auto_mtls_cluster(CLUSTER, &[]);
        c.outlier_detection = Some(OutlierDetection {
            consecutive_5xx: Some(UInt32Value { value: 1 }),
            max_ejection_percent: Some(UInt32Value { value: 50 }),
            ..Default::default()
        });
        let eps = |order: &[&str]| assignment(CLUSTER, order.iter().map(|pod| pinned(pod)).collect());
        let old =
            Destinations::build(&[], std::slice::from_ref(&c), &eps(&["10.2.0.7:9080", "10.2.0.8:9080"])).unwrap();
        let up = &old.upstreams[CLUSTER];
        let tls = up.tls.as_ref().unwrap();
        assert_eq!(up.endpoints.len(), 2);
        assert!(
            up.endpoints
                .iter()
                .all(|e| e.address == "100.64.0.2:15443".parse().unwrap())
        );
        assert_eq!(
            up.endpoints[1].sni(tls),
            "ep-10-2-0-8-9080.outbound_.9080_._.reviews.default.svc.cluster.local"
        );
        assert_eq!(up.endpoints[1].cluster.as_deref(), Some("cluster2"));
        up.record(1, Reply::Status(hyper::StatusCode::SERVICE_UNAVAILABLE));
        assert!(
            up.usable(0) && !up.usable(1),
            "one pod out, the other behind the same gateway in"
        );

        // The next table lists them the other way round: health follows the pod.
        let mut new =
            Destinations::build(&[], std::slice::from_ref(&c), &eps(&["10.2.0.8:9080", "10.2.0.7:9080"])).unwrap();
        new.inherit(&old);
        let up = &new.upstreams[CLUSTER];
        assert!(!up.usable(0) && up.usable(1), "10.2.0.8 is still out");

        // Without the metadata the gateway is one endpoint standing for its network.
        let plain = &Destinations::build(
            &[],
            std::slice::from_ref(&c),
            &assignment(CLUSTER, vec![endpoint("100.64.0.2", 15443, 2, true)]),
        )
        .unwrap()
        .upstreams[CLUSTER];
        assert_eq!(plain.endpoints[0].pinned, None);
        assert_eq!(plain.endpoints[0].sni(plain.tls.as_ref().unwrap()), tls.sni);

        let e = Destinations::build(&[], &[c], &eps(&["10.2.0.7"])).unwrap_err();
        assert_eq!(e.resource, CLUSTER);
    }

    #[test]
    fn a_weighted_endpoint_is_a_gateway_unless_it_is_on_our_network() {
        let at = |weight: u32, network: Option<&str>, pinned: bool| Endpoint {
            address: "10.0.0.1:15443".parse().unwrap(),
            weight,
            mtls: true,
            cluster: None,
            network: network.map(str::to_owned),
            priority: 0,
            pinned: pinned.then(|| "10.2.0.7:9080".parse().unwrap()),
        };
        let ours = Some("network1");
        assert!(
            at(3, Some("network2"), false).through_gateway(ours),
            "another network's, for 3 pods"
        );
        assert!(
            !at(3, Some("network1"), false).through_gateway(ours),
            "our own, weighted"
        );
        assert!(at(3, None, false).through_gateway(ours), "no network said: as before");
        assert!(
            at(1, Some("network2"), true).through_gateway(ours),
            "pinned behind a gateway"
        );
        assert!(
            !at(1, Some("network2"), false).through_gateway(ours),
            "one pod: one connection"
        );
        assert!(
            at(3, Some("network1"), false).through_gateway(None),
            "our network unknown"
        );
    }

    #[test]
    fn istios_original_destination_clusters_are_taken_but_not_upstreams() {
        use envoy_types::pb::envoy::config::cluster::v3::cluster::LbPolicy;
        let passthrough = |name: &str| Cluster {
            name: name.into(),
            cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::OriginalDst as i32)),
            lb_policy: LbPolicy::ClusterProvided as i32,
            ..Default::default()
        };
        let clusters = [
            passthrough("PassthroughCluster"),
            passthrough("InboundPassthroughCluster"),
            passthrough("inbound|9080||"),
            auto_mtls_cluster(CLUSTER, &[]),
        ];
        let table = Destinations::build(&[], &clusters, &HashMap::new()).unwrap();
        assert_eq!(table.upstreams.keys().collect::<Vec<_>>(), [CLUSTER]);
        // As an upstream, CLUSTER_PROVIDED would be refused.
        let mut balanced = passthrough("PassthroughCluster");
        balanced.cluster_discovery_type = None;
        assert!(Destinations::build(&[], &[balanced], &HashMap::new()).is_err());
    }

    #[test]
    fn unusable_resources_are_named() {
        let mut l = listener("not-an-ip", 9080, CLUSTER);
        let e = Destinations::build(&[l.clone()], &[], &HashMap::new()).unwrap_err();
        assert_eq!(e.resource, "not-an-ip_9080");
        l = listener("10.0.0.1", 70000, CLUSTER);
        assert!(Destinations::build(&[l], &[], &HashMap::new()).is_err());
        let bad_san = auto_mtls_cluster(CLUSTER, &["https://not-spiffe"]);
        let e = Destinations::build(&[], &[bad_san], &HashMap::new()).unwrap_err();
        assert_eq!(e.resource, CLUSTER);
        let mut bad_bytes = auto_mtls_cluster(CLUSTER, &[]);
        if let Some(transport_socket::ConfigType::TypedConfig(a)) = &mut bad_bytes.transport_socket_matches[0]
            .transport_socket
            .as_mut()
            .unwrap()
            .config_type
        {
            a.value = vec![0xff, 0xff, 0xff];
        }
        assert!(Destinations::build(&[], &[bad_bytes], &HashMap::new()).is_err());
    }

    #[test]
    fn a_cluster_without_tls_is_plaintext_and_sni_comes_from_its_name() {
        let plain = Cluster {
            name: CLUSTER.into(),
            ..Default::default()
        };
        let table = Destinations::build(
            &[],
            &[plain],
            &assignment(CLUSTER, vec![endpoint("10.0.0.1", 80, 1, true)]),
        )
        .unwrap();
        let up = &table.upstreams[CLUSTER];
        assert!(up.tls.is_none() && !up.endpoints[0].mtls);
        assert_eq!(
            mesh_vocab::IstioSni::of_cluster("outbound|9080|v2|reviews.default.svc.cluster.local")
                .map(|s| s.to_string())
                .as_deref(),
            Some("outbound_.9080_.v2_.reviews.default.svc.cluster.local")
        );
    }
}
