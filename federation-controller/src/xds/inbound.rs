//! LDS: a sidecar's inbound listener, `virtualInbound` (0.0.0.0:15006), where its
//! capture sends every connection to the workload, with the workload's
//! PeerAuthentication and AuthorizationPolicy in force.
//!
//! Per inbound port (the target ports its services send to, and the ports of its
//! `portLevelMtls`) a TLS chain (`destination_port`, `transport_protocol: tls`),
//! which terminates mesh mTLS (none under DISABLE), and, where the port's mode
//! allows plaintext (PERMISSIVE, DISABLE), a `raw_buffer` chain; then the same pair without a port
//! for every other port. An HTTP port's chains hold an HTTP connection manager
//! whose RBAC filters see requests; the rest hold network RBAC filters before a
//! TCP proxy. Envoy picks the chain by port first, so a plaintext connection to a
//! STRICT port finds no chain and is closed, even when other ports are PERMISSIVE.
//!
//! Traffic goes on to `inbound|PORT||` (Istio's inbound cluster of a port) or, for
//! other ports, `InboundPassthroughCluster`, both served in CDS ([`clusters`]).

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::cluster::v3::cluster::{ClusterDiscoveryType, DiscoveryType, LbPolicy};
use envoy_types::pb::envoy::config::core::v3::{self as core, SocketAddress, TrafficDirection, TransportSocket};
use envoy_types::pb::envoy::config::core::v3::{address, socket_address, transport_socket};
use envoy_types::pb::envoy::config::listener::v3::{
    Filter, FilterChain, FilterChainMatch, Listener, ListenerFilter, filter, listener_filter,
};
use envoy_types::pb::envoy::config::rbac::v3::Rbac;
use envoy_types::pb::envoy::config::route::v3::{
    Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost, route, route_action, route_match,
};
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::listener::original_dst::v3::OriginalDst;
use envoy_types::pb::envoy::extensions::filters::listener::tls_inspector::v3::TlsInspector;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, http_connection_manager, http_filter,
};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{TcpProxy, tcp_proxy};
use envoy_types::pb::google::protobuf::{BoolValue, Duration, UInt32Value};

use super::grpc::{HCM_TYPE, ROUTER, ROUTER_TYPE};
use super::listener::{TCP_PROXY, TCP_PROXY_TYPE};
use super::{any, mtls, policy, rbac};
use crate::security::Named;
use crate::security::authorization_policy::{self, AuthorizationPolicySpec};
use crate::security::peer_authentication::{self, MtlsMode, PeerAuthenticationSpec};
use crate::security::workload::{Protocol, Workload};

/// The listener's name, Istio's.
pub const LISTENER_NAME: &str = "virtualInbound";
/// Where the capture sends inbound connections, Istio's default.
pub const DEFAULT_PORT: u16 = 15006;
/// Where traffic to a port no service names goes.
pub const PASSTHROUGH_CLUSTER: &str = "InboundPassthroughCluster";
/// Transport protocols as Envoy's TLS inspector names them.
pub const TLS: &str = "tls";
pub const RAW_BUFFER: &str = "raw_buffer";
const HCM: &str = "envoy.filters.network.http_connection_manager";
pub(crate) const TLS_INSPECTOR: &str = "envoy.filters.listener.tls_inspector";
pub(crate) const TLS_INSPECTOR_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector";
const ORIGINAL_DST: &str = "envoy.filters.listener.original_dst";
const ORIGINAL_DST_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst";
const DOWNSTREAM_TLS_TYPE: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext";

/// Istio's inbound cluster of a workload port.
pub fn cluster_name(port: u16) -> String {
    format!("inbound|{port}||")
}

/// Where an inbound cluster's connections come from: the address Istio's capture lets
/// through to the workload (`InboundPassthroughBindIpv4`), so they are not captured again.
const INBOUND_BIND: &str = "127.0.0.6";
/// Istio's connect timeout of an inbound cluster (the mesh's `connectTimeout` default).
const INBOUND_CONNECT_TIMEOUT: Duration = Duration { seconds: 10, nanos: 0 };
/// How long an original-destination host is kept after its last connection.
const ORIGINAL_DST_CLEANUP: Duration = Duration { seconds: 60, nanos: 0 };

/// CDS: Istio's inbound clusters of a sidecar, as istiod writes them — each the workload
/// itself at the connection's original destination (ORIGINAL_DST): one per workload port,
/// `inbound|PORT||`, in HTTP/2 for an HTTP/2 or gRPC port (policy::set_upstream_protocol:
/// the application of such a port takes nothing else, whatever the caller spoke), and
/// `InboundPassthroughCluster` for the ports no service names. Our sidecars reach their
/// workload by its address already and read only the ports' protocols.
pub fn clusters(ports: &[(u16, Protocol)]) -> Vec<Cluster> {
    let passthrough = original_destination(PASSTHROUGH_CLUSTER.to_owned());
    let per_port = ports.iter().map(|&(port, protocol)| {
        let mut c = original_destination(cluster_name(port));
        policy::set_upstream_protocol(&mut c, protocol);
        c
    });
    per_port.chain(std::iter::once(passthrough)).collect()
}

/// Istio's outbound `PassthroughCluster`: a connection no service claims, carried to its
/// original destination (what the wildcard listeners' last chain names).
pub fn outbound_passthrough() -> Cluster {
    Cluster {
        upstream_bind_config: None,
        ..original_destination(super::listener::PASSTHROUGH_CLUSTER.to_owned())
    }
}

/// An inbound cluster named `name` to the connection's original destination.
fn original_destination(name: String) -> Cluster {
    Cluster {
        name,
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::OriginalDst as i32)),
        lb_policy: LbPolicy::ClusterProvided as i32,
        connect_timeout: Some(INBOUND_CONNECT_TIMEOUT),
        cleanup_interval: Some(ORIGINAL_DST_CLEANUP),
        upstream_bind_config: Some(core::BindConfig {
            source_address: Some(SocketAddress {
                address: INBOUND_BIND.into(),
                port_specifier: Some(socket_address::PortSpecifier::PortValue(0)),
                ..Default::default()
            }),
            ..Default::default()
        }),
        circuit_breakers: Some(policy::default_circuit_breakers()),
        ..Default::default()
    }
}

/// Everything the inbound listener of one workload is made of: the policies that
/// apply to it, with Istio's precedence already settled.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Inbound {
    pub workload: Workload,
    /// The AuthorizationPolicies that apply, by namespace and name.
    pub authorization: Vec<Named<AuthorizationPolicySpec>>,
    pub mtls: peer_authentication::Effective,
    pub trust_domain: String,
    /// The port it listens on (ProxyConfig's `proxyInboundListenPort`).
    pub listen_port: u16,
}

impl Inbound {
    /// What applies to `workload` among a mesh's policies.
    pub fn select(
        workload: Workload,
        authorization: &[&Named<AuthorizationPolicySpec>],
        peer_authentication: &[Named<PeerAuthenticationSpec>],
        trust_domain: &str,
        listen_port: u16,
    ) -> Inbound {
        Inbound {
            authorization: authorization
                .iter()
                .filter(|p| authorization_policy::applies_to(p, &workload))
                .map(|p| (*p).clone())
                .collect(),
            mtls: peer_authentication::effective(peer_authentication, &workload),
            workload,
            trust_domain: trust_domain.to_owned(),
            listen_port,
        }
    }

    /// The `virtualInbound` listener.
    pub fn listener(&self) -> Listener {
        let policies: Vec<&Named<AuthorizationPolicySpec>> = self.authorization.iter().collect();
        let http = rbac::configs(&policies, false, &self.trust_domain);
        let tcp = rbac::configs(&policies, true, &self.trust_domain);
        let mut ports: Vec<(u16, Protocol)> = self.workload.ports.clone();
        for p in self.mtls.ports.keys() {
            if !ports.iter().any(|(q, _)| q == p) {
                ports.push((*p, Protocol::Tcp));
            }
        }
        ports.sort();
        let mut chains = Vec::new();
        for (port, protocol) in ports {
            let mode = self.mtls.ports.get(&port).copied().unwrap_or(self.mtls.mode);
            let filters = if protocol.is_http() {
                vec![http_connection_manager(port, &http)]
            } else {
                tcp_filters(&tcp, &cluster_name(port))
            };
            chains.extend(pair(&format!("inbound|{port}"), Some(port), mode, filters));
        }
        chains.extend(pair(
            LISTENER_NAME,
            None,
            self.mtls.mode,
            tcp_filters(&tcp, PASSTHROUGH_CLUSTER),
        ));
        Listener {
            name: LISTENER_NAME.into(),
            address: Some(core::Address {
                address: Some(address::Address::SocketAddress(SocketAddress {
                    address: "0.0.0.0".into(),
                    port_specifier: Some(socket_address::PortSpecifier::PortValue(u32::from(self.listen_port))),
                    ..Default::default()
                })),
            }),
            traffic_direction: TrafficDirection::Inbound as i32,
            listener_filters: vec![
                // Where a captured connection was headed, so chains match on its port.
                listener_filter_of(ORIGINAL_DST, any(ORIGINAL_DST_TYPE, &OriginalDst::default())),
                listener_filter_of(TLS_INSPECTOR, any(TLS_INSPECTOR_TYPE, &TlsInspector::default())),
            ],
            // A client that waits for the server to speak first is plaintext, not stuck.
            continue_on_listener_filters_timeout: true,
            filter_chains: chains,
            ..Default::default()
        }
    }
}

/// What a sidecar's node says of its workload, in Istio's node metadata:
/// `NAMESPACE`, `LABELS` (a Struct of strings) and ProxyConfig's
/// `proxyInboundListenPort` (in `PROXY_CONFIG`); its address is the second field
/// of its id (`sidecar~10.1.2.3~pod.ns~ns.svc.cluster.local`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SidecarNode {
    pub namespace: String,
    /// None when the node does not say: the pod at its address tells.
    pub labels: Option<std::collections::BTreeMap<String, String>>,
    pub address: Option<std::net::IpAddr>,
    pub listen_port: u16,
}

impl SidecarNode {
    /// The sidecar `node` is; None for gateways (`router~…`) and nodes that are no Istio proxy.
    pub fn of(node: &core::Node) -> Option<SidecarNode> {
        use envoy_types::pb::google::protobuf::value::Kind;
        let mut id = node.id.split('~');
        if id.next() != Some("sidecar") {
            return None;
        }
        let address = id.next().and_then(|ip| ip.parse().ok());
        let pod_namespace = id.next().and_then(|p| p.split_once('.')).map(|(_, ns)| ns.to_owned());
        let fields = node.metadata.as_ref().map(|m| &m.fields);
        let field = |k: &str| fields.and_then(|f| f.get(k)).and_then(|v| v.kind.as_ref());
        let namespace = super::node_metadata(node, "NAMESPACE")
            .or(pod_namespace)
            .unwrap_or_else(|| "default".into());
        let labels = match field("LABELS") {
            Some(Kind::StructValue(s)) => Some(
                s.fields
                    .iter()
                    .filter_map(|(k, v)| match &v.kind {
                        Some(Kind::StringValue(v)) => Some((k.clone(), v.clone())),
                        _ => None,
                    })
                    .collect(),
            ),
            _ => None,
        };
        let listen_port = match field("PROXY_CONFIG") {
            Some(Kind::StructValue(s)) => match s.fields.get("proxyInboundListenPort").and_then(|v| v.kind.as_ref()) {
                Some(Kind::NumberValue(n)) => u16::try_from(*n as i64).ok(),
                Some(Kind::StringValue(n)) => n.parse().ok(),
                _ => None,
            },
            _ => None,
        };
        Some(SidecarNode {
            namespace,
            labels,
            address,
            listen_port: listen_port.filter(|p| *p != 0).unwrap_or(DEFAULT_PORT),
        })
    }

    /// The inbound side of this sidecar among `models` (the proxy's own cluster,
    /// or every cluster when it names none served): its pod found by address,
    /// the policies of those clusters (one per namespace and name).
    /// The pod at this sidecar's address, in the first of `models` that has one.
    fn pod<'m>(&self, models: &[&'m crate::model::ClusterModel]) -> Option<&'m Workload> {
        let ip = self.address?;
        models.iter().find_map(|m| {
            let w = &m.security.workloads;
            w.binary_search_by(|w| w.address.cmp(&Some(ip))).ok().map(|i| &w[i])
        })
    }

    /// The ports its workload's services send to, with their protocols (which its
    /// inbound clusters are made of, [`clusters`]).
    pub fn ports(&self, models: &[&crate::model::ClusterModel]) -> Vec<(u16, Protocol)> {
        self.pod(models).map(|p| p.ports.clone()).unwrap_or_default()
    }

    pub fn inbound(&self, models: &[&crate::model::ClusterModel], trust_domain: &str) -> Inbound {
        let pod = self.pod(models);
        let workload = Workload {
            namespace: self.namespace.clone(),
            labels: self
                .labels
                .clone()
                .or_else(|| pod.map(|p| p.labels.clone()))
                .unwrap_or_default(),
            // What the listener is made of, so that replicas share it.
            address: None,
            ports: pod.map(|p| p.ports.clone()).unwrap_or_default(),
        };
        let mut authorization: Vec<&Named<AuthorizationPolicySpec>> = Vec::new();
        let mut peer: Vec<Named<PeerAuthenticationSpec>> = Vec::new();
        for m in models {
            for p in &m.security.authorization_policies {
                if !authorization
                    .iter()
                    .any(|q| (&q.namespace, &q.name) == (&p.namespace, &p.name))
                {
                    authorization.push(p);
                }
            }
            for p in &m.security.peer_authentications {
                if !peer.iter().any(|q| (&q.namespace, &q.name) == (&p.namespace, &p.name)) {
                    peer.push(p.clone());
                }
            }
        }
        Inbound::select(workload, &authorization, &peer, trust_domain, self.listen_port)
    }
}

pub(crate) fn listener_filter_of(name: &str, config: envoy_types::pb::google::protobuf::Any) -> ListenerFilter {
    ListenerFilter {
        name: name.into(),
        config_type: Some(listener_filter::ConfigType::TypedConfig(config)),
        ..Default::default()
    }
}

/// A port's chains: mTLS unless `mode` is DISABLE, plaintext where it allows it.
/// (Under DISABLE Istio terminates no mTLS; a `raw_buffer` chain alone is how the
/// sidecar reads DISABLE.)
fn pair(name: &str, port: Option<u16>, mode: MtlsMode, filters: Vec<Filter>) -> Vec<FilterChain> {
    let chain = |transport: &str| FilterChain {
        name: format!("{name}|{transport}"),
        filter_chain_match: Some(FilterChainMatch {
            destination_port: port.map(|p| UInt32Value { value: u32::from(p) }),
            transport_protocol: transport.into(),
            ..Default::default()
        }),
        filters: filters.clone(),
        ..Default::default()
    };
    let mut tls = chain(TLS);
    tls.transport_socket = Some(TransportSocket {
        name: "envoy.transport_sockets.tls".into(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(any(
            DOWNSTREAM_TLS_TYPE,
            &mtls::downstream_tls(),
        ))),
    });
    let mut out = if mode == MtlsMode::Disable { vec![] } else { vec![tls] };
    if mode.allows_plaintext() {
        out.push(chain(RAW_BUFFER));
    }
    out
}

fn network_filter(name: &str, config: envoy_types::pb::google::protobuf::Any) -> Filter {
    Filter {
        name: name.into(),
        config_type: Some(filter::ConfigType::TypedConfig(config)),
    }
}

/// Network RBAC in Istio's order, then the TCP proxy to `cluster`.
fn tcp_filters(rbac: &[Rbac], cluster: &str) -> Vec<Filter> {
    let mut filters: Vec<Filter> = rbac
        .iter()
        .map(|r| network_filter(rbac::NETWORK_RBAC, rbac::network_filter(r)))
        .collect();
    let proxy = TcpProxy {
        stat_prefix: cluster.into(),
        cluster_specifier: Some(tcp_proxy::ClusterSpecifier::Cluster(cluster.into())),
        ..Default::default()
    };
    filters.push(network_filter(TCP_PROXY, any(TCP_PROXY_TYPE, &proxy)));
    filters
}

/// An HTTP port: HTTP RBAC in Istio's order, then the router to the port's cluster.
fn http_connection_manager(port: u16, rbac: &[Rbac]) -> Filter {
    let cluster = cluster_name(port);
    let mut http_filters: Vec<HttpFilter> = rbac
        .iter()
        .map(|r| HttpFilter {
            name: rbac::HTTP_RBAC.into(),
            config_type: Some(http_filter::ConfigType::TypedConfig(rbac::http_filter(r))),
            ..Default::default()
        })
        .collect();
    http_filters.push(HttpFilter {
        name: ROUTER.into(),
        config_type: Some(http_filter::ConfigType::TypedConfig(any(
            ROUTER_TYPE,
            &Router::default(),
        ))),
        ..Default::default()
    });
    let routes = RouteConfiguration {
        name: cluster.clone(),
        virtual_hosts: vec![VirtualHost {
            name: format!("inbound|http|{port}"),
            domains: vec!["*".into()],
            routes: vec![Route {
                r#match: Some(RouteMatch {
                    path_specifier: Some(route_match::PathSpecifier::Prefix("/".into())),
                    ..Default::default()
                }),
                action: Some(route::Action::Route(RouteAction {
                    cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(cluster.clone())),
                    ..Default::default()
                })),
                ..Default::default()
            }],
            ..Default::default()
        }],
        // The inbound cluster is the proxy's own business: do not refuse routes to it.
        validate_clusters: Some(BoolValue { value: false }),
        ..Default::default()
    };
    let hcm = HttpConnectionManager {
        stat_prefix: format!("inbound_0.0.0.0_{port}"),
        route_specifier: Some(http_connection_manager::RouteSpecifier::RouteConfig(routes)),
        http_filters,
        ..Default::default()
    };
    network_filter(HCM, any(HCM_TYPE, &hcm))
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::rbac::v3::rbac::Action as RbacAction;
    use prost::Message;

    fn named<S: serde::de::DeserializeOwned>(ns: &str, name: &str, yaml: &str) -> Named<S> {
        Named {
            namespace: ns.into(),
            name: name.into(),
            created: None,
            spec: serde_saphyr::from_str(yaml).unwrap(),
        }
    }

    fn workload() -> Workload {
        Workload {
            namespace: "foo".into(),
            labels: [("app".to_owned(), "httpbin".to_owned())].into(),
            address: None,
            ports: vec![(8000, Protocol::Http), (5432, Protocol::Tcp)],
        }
    }

    /// A chain seen from outside: (name, port, transport, filter names, RBAC actions of its filters).
    type Chain = (String, Option<u32>, String, Vec<String>, Vec<i32>);

    fn chains(l: &Listener) -> Vec<Chain> {
        l.filter_chains
            .iter()
            .map(|c| {
                let m = c.filter_chain_match.clone().unwrap();
                let mut actions = Vec::new();
                let mut names: Vec<String> = Vec::new();
                for f in &c.filters {
                    names.push(f.name.clone());
                    let Some(filter::ConfigType::TypedConfig(cfg)) = &f.config_type else {
                        panic!()
                    };
                    if f.name == HCM {
                        let hcm = HttpConnectionManager::decode(cfg.value.as_slice()).unwrap();
                        for h in hcm.http_filters {
                            names.push(h.name.clone());
                            if h.name == rbac::HTTP_RBAC {
                                let Some(http_filter::ConfigType::TypedConfig(c)) = h.config_type else {
                                    panic!()
                                };
                                let r = envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac::decode(
                                    c.value.as_slice(),
                                )
                                .unwrap();
                                actions.push(r.rules.unwrap().action);
                            }
                        }
                    } else if f.name == rbac::NETWORK_RBAC {
                        let r = envoy_types::pb::envoy::extensions::filters::network::rbac::v3::Rbac::decode(
                            cfg.value.as_slice(),
                        )
                        .unwrap();
                        actions.push(r.rules.unwrap().action);
                    }
                }
                (
                    c.name.clone(),
                    m.destination_port.map(|p| p.value),
                    m.transport_protocol,
                    names,
                    actions,
                )
            })
            .collect()
    }

    #[test]
    fn strict_ports_get_only_tls_and_http_ports_an_hcm_with_rbac_in_istios_order() {
        let authz = [
            named(
                "foo",
                "allow",
                "selector: {matchLabels: {app: httpbin}}\nrules: [{to: [{operation: {methods: [GET]}}]}]",
            ),
            named(
                "istio-system",
                "deny",
                "action: DENY\nrules: [{from: [{source: {namespaces: [evil]}}]}]",
            ),
            named(
                "foo",
                "other",
                "selector: {matchLabels: {app: other}}\naction: DENY\nrules: [{}]",
            ),
            named(
                "foo",
                "attached",
                "targetRef: {kind: Service, name: httpbin}\naction: DENY\nrules: [{}]",
            ),
        ];
        let peer = [
            named("istio-system", "default", "mtls: {mode: STRICT}"),
            named(
                "foo",
                "db",
                "selector: {matchLabels: {app: httpbin}}\nportLevelMtls: {'5432': {mode: PERMISSIVE}, '9000': {mode: DISABLE}}",
            ),
        ];
        let refs: Vec<_> = authz.iter().collect();
        let inbound = Inbound::select(workload(), &refs, &peer, "cluster.local", DEFAULT_PORT);
        assert_eq!(
            inbound
                .authorization
                .iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>(),
            ["allow", "deny"],
            "the workload's own and the mesh-wide; not another app's, nor one attached by targetRef"
        );
        let l = inbound.listener();
        assert_eq!(l.name, "virtualInbound");
        let Some(address::Address::SocketAddress(sa)) = l.address.clone().unwrap().address else {
            panic!()
        };
        assert_eq!(
            (sa.address.as_str(), sa.port_specifier),
            ("0.0.0.0", Some(socket_address::PortSpecifier::PortValue(15006)))
        );
        let (deny, allow) = (RbacAction::Deny as i32, RbacAction::Allow as i32);
        let tcp = || {
            vec![
                rbac::NETWORK_RBAC.to_owned(),
                rbac::NETWORK_RBAC.to_owned(),
                TCP_PROXY.to_owned(),
            ]
        };
        let http = vec![
            HCM.to_owned(),
            rbac::HTTP_RBAC.to_owned(),
            rbac::HTTP_RBAC.to_owned(),
            ROUTER.to_owned(),
        ];
        assert_eq!(
            chains(&l),
            [
                (
                    "inbound|5432|tls".into(),
                    Some(5432),
                    "tls".into(),
                    tcp(),
                    vec![deny, allow]
                ),
                (
                    "inbound|5432|raw_buffer".into(),
                    Some(5432),
                    "raw_buffer".into(),
                    tcp(),
                    vec![deny, allow]
                ),
                (
                    "inbound|8000|tls".into(),
                    Some(8000),
                    "tls".into(),
                    http,
                    vec![deny, allow]
                ),
                (
                    "inbound|9000|raw_buffer".into(),
                    Some(9000),
                    "raw_buffer".into(),
                    tcp(),
                    vec![deny, allow]
                ),
                (
                    "virtualInbound|tls".into(),
                    None,
                    "tls".into(),
                    tcp(),
                    vec![deny, allow]
                ),
            ],
            "STRICT mesh-wide: plaintext only on the ports that allow it; DISABLE terminates no mTLS"
        );
        assert!(
            l.filter_chains[0].transport_socket.is_some(),
            "the TLS chain terminates mTLS"
        );
        assert!(l.filter_chains[1].transport_socket.is_none());
    }

    #[test]
    fn without_policies_every_port_takes_plaintext_too_and_no_rbac_is_in_the_way() {
        let inbound = Inbound::select(workload(), &[], &[], "cluster.local", 15006);
        let all = chains(&inbound.listener());
        assert_eq!(
            all.len(),
            6,
            "PERMISSIVE by default: tls and raw_buffer for 5432, 8000 and the rest"
        );
        assert!(all.iter().all(|c| c.4.is_empty()), "{all:?}");
    }
}
