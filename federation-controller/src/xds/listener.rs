//! LDS: Istio's virtual outbound listeners, one per service `VIP:port`. They are
//! never bound (`bind_to_port: false`): a sidecar captures a connection, looks up
//! its original destination among them, and hands it to the listener's filter: for
//! a TCP port the TCP proxy, which names the service port's cluster; for an HTTP
//! port an HTTP connection manager, whose routes come over RDS as `HOST:PORT`
//! ([`super::routes`]).
//!
//! A TCP port follows its host's VirtualService `tls` and `tcp` routes as Istio's
//! outbound listeners do: each fitting `tls` match is a chain on its `sniHosts`
//! (`server_names`, `transport_protocol: tls`, a TLS inspector on the listener), each
//! fitting `tcp` match with `destinationSubnets` a chain on those `prefix_ranges`; the
//! first `tcp` route or match without subnets is the chain without a match, and ends
//! the list; without one, the service port's own cluster is. A chain's `tcp_proxy`
//! names its one destination's cluster, or `weighted_clusters` for several.

use std::net::IpAddr;

use envoy_types::pb::envoy::config::core::v3::CidrRange;
use envoy_types::pb::envoy::config::core::v3::{
    self as core, SocketAddress, TrafficDirection, address, socket_address,
};
use envoy_types::pb::envoy::config::listener::v3::{Filter, FilterChain, FilterChainMatch, Listener, filter};
use envoy_types::pb::envoy::extensions::filters::http::fault::v3::HttpFault;
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::listener::tls_inspector::v3::TlsInspector;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, Rds, http_connection_manager, http_filter,
};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{TcpProxy, tcp_proxy};
use envoy_types::pb::google::protobuf::{BoolValue, UInt32Value};
use mesh_vocab::Hostname;

use super::grpc::{HCM_TYPE, ROUTER, ROUTER_TYPE};
use super::inbound::{TLS_INSPECTOR, TLS_INSPECTOR_TYPE, listener_filter_of};
use super::routes::{FAULT_FILTER, FAULT_TYPE, Requester, destination_cluster, route_config_name};
use super::{any, cluster_name};
use crate::model::{Protocol, ServiceKey};
use crate::networking::virtual_service::{HttpRouteDestination, L4Match, subnet};
use crate::routing::Routing;

/// The HTTP connection manager network filter's name.
pub const HCM: &str = "envoy.filters.network.http_connection_manager";

/// The TCP proxy network filter's name.
pub const TCP_PROXY: &str = "envoy.filters.network.tcp_proxy";
/// Its config's type URL.
pub const TCP_PROXY_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy";

/// Istio's listener name: `10.96.0.12_9080`.
pub fn listener_name(vip: IpAddr, port: u16) -> String {
    format!("{vip}_{port}")
}

/// The HTTP filters of every HTTP listener: faults (configured per route), then the router.
pub fn http_filters() -> Vec<HttpFilter> {
    let filter = |name: &str, config| HttpFilter {
        name: name.into(),
        config_type: Some(http_filter::ConfigType::TypedConfig(config)),
        ..Default::default()
    };
    vec![
        filter(FAULT_FILTER, any(FAULT_TYPE, &HttpFault::default())),
        filter(ROUTER, any(ROUTER_TYPE, &Router::default())),
    ]
}

/// An HTTP connection manager taking its routes from `route_config_name` over ADS.
pub fn http_connection_manager(stat_prefix: String, route_config_name: String) -> HttpConnectionManager {
    use envoy_types::pb::envoy::config::core::v3::{AggregatedConfigSource, ApiVersion, ConfigSource, config_source};
    HttpConnectionManager {
        stat_prefix,
        route_specifier: Some(http_connection_manager::RouteSpecifier::Rds(Rds {
            config_source: Some(ConfigSource {
                resource_api_version: ApiVersion::V3 as i32,
                config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(AggregatedConfigSource {})),
                ..Default::default()
            }),
            route_config_name,
        })),
        http_filters: http_filters(),
        ..Default::default()
    }
}

/// The virtual outbound listener of `vip:port`, which belongs to `host` and speaks
/// `protocol`, for the proxy `who` (a TCP route's `sourceLabels`/`sourceNamespace`).
pub fn listener(
    vip: IpAddr,
    port: u16,
    host: &Hostname,
    protocol: Protocol,
    routing: &Routing,
    who: Requester<'_>,
) -> Listener {
    let key = ServiceKey {
        host: host.clone(),
        port,
    };
    let filter_chains = if protocol.is_http() {
        let hcm = http_connection_manager(format!("outbound_{vip}_{port}"), route_config_name(&key));
        vec![FilterChain {
            filters: vec![Filter {
                name: HCM.into(),
                config_type: Some(filter::ConfigType::TypedConfig(any(HCM_TYPE, &hcm))),
            }],
            ..Default::default()
        }]
    } else {
        tcp_chains(&key, routing, who)
    };
    virtual_listener(vip, port, filter_chains)
}

/// A virtual outbound listener of `ip:port` (never bound), with a TLS inspector when a
/// chain matches on SNI.
fn virtual_listener(ip: IpAddr, port: u16, filter_chains: Vec<FilterChain>) -> Listener {
    let tls_inspector = filter_chains.iter().any(|c| {
        c.filter_chain_match
            .as_ref()
            .is_some_and(|m| !m.server_names.is_empty())
    });
    Listener {
        name: listener_name(ip, port),
        address: Some(core::Address {
            address: Some(address::Address::SocketAddress(SocketAddress {
                address: ip.to_string(),
                port_specifier: Some(socket_address::PortSpecifier::PortValue(u32::from(port))),
                ..Default::default()
            })),
        }),
        bind_to_port: Some(BoolValue { value: false }),
        traffic_direction: TrafficDirection::Outbound as i32,
        listener_filters: if tls_inspector {
            vec![listener_filter_of(
                TLS_INSPECTOR,
                any(TLS_INSPECTOR_TYPE, &TlsInspector::default()),
            )]
        } else {
            Vec::new()
        },
        filter_chains,
        ..Default::default()
    }
}

/// Istio's outbound cluster of connections carried to their original destination.
pub const PASSTHROUGH_CLUSTER: &str = "PassthroughCluster";

/// Istio's wildcard outbound listener of `port` (`0.0.0.0_PORT`) for the TLS ports of
/// hosts without an address (`hosts`, all on `port`): a connection to any address on the
/// port is routed by the SNI of the application's own TLS to its host's cluster, and
/// anything else (another SNI, no TLS) passes through to where it was going, as Istio's
/// `PassthroughCluster` chain does.
pub fn sni_listener(port: u16, hosts: &[&ServiceKey]) -> Listener {
    let mut filter_chains: Vec<FilterChain> = hosts
        .iter()
        .map(|key| FilterChain {
            filter_chain_match: Some(FilterChainMatch {
                server_names: vec![key.host.to_string()],
                transport_protocol: "tls".into(),
                ..Default::default()
            }),
            filters: vec![tcp_proxy_filter(&[(cluster_name(key), 1)])],
            ..Default::default()
        })
        .collect();
    filter_chains.push(FilterChain {
        filters: vec![tcp_proxy_filter(&[(PASSTHROUGH_CLUSTER.to_owned(), 1)])],
        ..Default::default()
    });
    virtual_listener(std::net::Ipv4Addr::UNSPECIFIED.into(), port, filter_chains)
}

/// Istio's wildcard outbound listener of an HTTP `port` (`0.0.0.0_PORT`) for hosts without
/// an address: an HTTP connection manager on route configuration `PORT`
/// ([`super::routes::port_route_config`]), which picks the host by `Host`.
pub fn host_listener(port: u16) -> Listener {
    let hcm = http_connection_manager(format!("outbound_0.0.0.0_{port}"), port.to_string());
    let chain = FilterChain {
        filters: vec![Filter {
            name: HCM.into(),
            config_type: Some(filter::ConfigType::TypedConfig(any(HCM_TYPE, &hcm))),
        }],
        ..Default::default()
    };
    virtual_listener(std::net::Ipv4Addr::UNSPECIFIED.into(), port, vec![chain])
}

/// A `tcp_proxy` filter: to one cluster, or weighted among several.
pub fn tcp_proxy_filter(clusters: &[(String, u32)]) -> Filter {
    let cluster_specifier = match clusters {
        [(only, _)] => tcp_proxy::ClusterSpecifier::Cluster(only.clone()),
        many => tcp_proxy::ClusterSpecifier::WeightedClusters(tcp_proxy::WeightedCluster {
            clusters: many
                .iter()
                .map(|(name, weight)| tcp_proxy::weighted_cluster::ClusterWeight {
                    name: name.clone(),
                    weight: *weight,
                    ..Default::default()
                })
                .collect(),
        }),
    };
    let tcp = TcpProxy {
        stat_prefix: clusters.first().map(|(c, _)| c.clone()).unwrap_or_default(),
        cluster_specifier: Some(cluster_specifier),
        ..Default::default()
    };
    Filter {
        name: TCP_PROXY.into(),
        config_type: Some(filter::ConfigType::TypedConfig(any(TCP_PROXY_TYPE, &tcp))),
    }
}

/// The chains of a TCP service port, from its VirtualService's `tls` and `tcp` routes.
fn tcp_chains(key: &ServiceKey, routing: &Routing, who: Requester<'_>) -> Vec<FilterChain> {
    let mut chains: Vec<FilterChain> = Vec::new();
    let push = |chains: &mut Vec<FilterChain>, m: Option<FilterChainMatch>, clusters: Vec<(String, u32)>| {
        // Envoy refuses two chains with one match; the first, as in Istio's order, wins.
        if !clusters.is_empty() && !chains.iter().any(|c| c.filter_chain_match == m) {
            chains.push(FilterChain {
                filter_chain_match: m,
                filters: vec![tcp_proxy_filter(&clusters)],
                ..Default::default()
            });
        }
    };
    let mut catch_all = false;
    if let Some((ns, vs)) = routing.virtual_service(&key.host) {
        let fits = |m: &&L4Match| {
            m.port.is_none_or(|p| p == u32::from(key.port))
                && m.source_labels.iter().all(|(k, v)| who.labels.get(k) == Some(v))
                && m.source_namespace.as_deref().is_none_or(|n| who.namespace == Some(n))
        };
        let clusters = |route: &[HttpRouteDestination]| weighted(key, routing, ns, route);
        for r in &vs.tls {
            for m in r.r#match.iter().filter(fits) {
                let chain_match = FilterChainMatch {
                    server_names: m.sni_hosts.clone(),
                    transport_protocol: "tls".into(),
                    prefix_ranges: prefix_ranges(&m.destination_subnets),
                    ..Default::default()
                };
                push(&mut chains, Some(chain_match), clusters(&r.route));
            }
        }
        for r in &vs.tcp {
            if catch_all {
                break;
            }
            if r.r#match.is_empty() {
                push(&mut chains, None, clusters(&r.route));
                catch_all = true;
            }
            for m in r.r#match.iter().filter(fits) {
                if m.destination_subnets.is_empty() {
                    push(&mut chains, None, clusters(&r.route));
                    catch_all = true;
                    break;
                }
                let chain_match = FilterChainMatch {
                    prefix_ranges: prefix_ranges(&m.destination_subnets),
                    ..Default::default()
                };
                push(&mut chains, Some(chain_match), clusters(&r.route));
            }
        }
    }
    if !catch_all {
        push(&mut chains, None, vec![(cluster_name(key), 1)]);
    }
    chains
}

/// The clusters of a TCP/TLS route's destinations and their weights; a single one
/// weighs whatever it says, several without weight nothing (Istio's rule).
fn weighted(key: &ServiceKey, routing: &Routing, ns: &str, route: &[HttpRouteDestination]) -> Vec<(String, u32)> {
    match route {
        [only] => vec![(destination_cluster(key, routing, ns, &only.destination), 1)],
        many => many
            .iter()
            .filter_map(|d| {
                let w = u32::try_from(d.weight.unwrap_or(0)).ok().filter(|w| *w > 0)?;
                Some((destination_cluster(key, routing, ns, &d.destination), w))
            })
            .collect(),
    }
}

fn prefix_ranges(subnets: &[String]) -> Vec<CidrRange> {
    subnets
        .iter()
        .filter_map(|s| subnet(s))
        .map(|(ip, len)| CidrRange {
            address_prefix: ip.to_string(),
            prefix_len: Some(UInt32Value { value: len }),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::routes::tests::routing;
    use super::*;
    use prost::Message;
    use std::collections::BTreeMap;

    const NOBODY: Requester<'static> = Requester {
        namespace: None,
        labels: &BTreeMap::new(),
    };

    #[test]
    fn a_virtual_outbound_listener_proxies_to_the_service_ports_cluster() {
        let host = Hostname::parse("reviews.default.svc.cluster.local").unwrap();
        let l = listener(
            "10.96.0.12".parse().unwrap(),
            9080,
            &host,
            Protocol::Tcp,
            &Routing::default(),
            NOBODY,
        );
        assert_eq!(l.name, "10.96.0.12_9080");
        let Some(address::Address::SocketAddress(sa)) = l.address.unwrap().address else {
            panic!("a socket address")
        };
        assert_eq!(
            (sa.address.as_str(), sa.port_specifier),
            ("10.96.0.12", Some(socket_address::PortSpecifier::PortValue(9080)))
        );
        assert_eq!(l.bind_to_port, Some(BoolValue { value: false }), "virtual: never bound");
        assert_eq!(l.traffic_direction, TrafficDirection::Outbound as i32);
        let [chain] = &l.filter_chains[..] else {
            panic!("one filter chain")
        };
        let [f] = &chain.filters[..] else { panic!("one filter") };
        assert_eq!(f.name, TCP_PROXY);
        let Some(filter::ConfigType::TypedConfig(cfg)) = &f.config_type else {
            panic!("a typed config")
        };
        assert_eq!(cfg.type_url, TCP_PROXY_TYPE);
        let tcp = TcpProxy::decode(cfg.value.as_slice()).unwrap();
        let cluster = "outbound|9080||reviews.default.svc.cluster.local";
        assert_eq!(tcp.stat_prefix, cluster);
        assert_eq!(
            tcp.cluster_specifier,
            Some(tcp_proxy::ClusterSpecifier::Cluster(cluster.into()))
        );
    }

    #[test]
    fn an_http_ports_listener_routes_over_rds_through_fault_and_router() {
        let host = Hostname::parse("reviews.default.svc.cluster.local").unwrap();
        let l = listener(
            "10.96.0.12".parse().unwrap(),
            9080,
            &host,
            Protocol::Http,
            &Routing::default(),
            NOBODY,
        );
        let [f] = &l.filter_chains[0].filters[..] else {
            panic!("one filter")
        };
        assert_eq!(f.name, HCM);
        let Some(filter::ConfigType::TypedConfig(cfg)) = &f.config_type else {
            panic!("a typed config")
        };
        let hcm = HttpConnectionManager::decode(cfg.value.as_slice()).unwrap();
        assert_eq!(hcm.stat_prefix, "outbound_10.96.0.12_9080");
        let Some(http_connection_manager::RouteSpecifier::Rds(rds)) = hcm.route_specifier else {
            panic!("RDS")
        };
        assert_eq!(rds.route_config_name, "reviews.default.svc.cluster.local:9080");
        let names: Vec<&str> = hcm.http_filters.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, [FAULT_FILTER, ROUTER]);
    }

    fn proxies(chain: &FilterChain) -> TcpProxy {
        let Some(filter::ConfigType::TypedConfig(cfg)) = &chain.filters[0].config_type else {
            panic!("a typed config")
        };
        TcpProxy::decode(cfg.value.as_slice()).unwrap()
    }

    #[test]
    fn tcp_and_tls_routes_become_filter_chains_with_weighted_clusters() {
        let r = routing(
            r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: db, namespace: default}
spec:
  hosts: [db]
  tls:
  - match: [{port: 5432, sniHosts: [db.example.com]}]
    route: [{destination: {host: db, subset: tls}}]
  tcp:
  - match: [{port: 5432, destinationSubnets: [10.96.0.0/16]}, {port: 9999}]
    route: [{destination: {host: db, subset: near}}]
  - match: [{sourceLabels: {app: batch}}]
    route: [{destination: {host: db, subset: batch}}]
  - route:
    - {destination: {host: db, subset: v1}, weight: 80}
    - {destination: {host: db, subset: v2}, weight: 20}
    - {destination: {host: db, subset: v3}, weight: 0}
"#,
        );
        assert!(r.l4_depends_on_source());
        let host = Hostname::parse("db.default.svc.cluster.local").unwrap();
        let l = listener("10.96.0.20".parse().unwrap(), 5432, &host, Protocol::Tcp, &r, NOBODY);
        assert_eq!(l.listener_filters[0].name, TLS_INSPECTOR);
        let [tls, near, rest] = &l.filter_chains[..] else {
            panic!("three chains: {:?}", l.filter_chains)
        };
        let m = tls.filter_chain_match.as_ref().unwrap();
        assert_eq!(
            (&m.server_names[..], m.transport_protocol.as_str()),
            (&["db.example.com".to_owned()][..], "tls")
        );
        assert_eq!(
            proxies(tls).cluster_specifier,
            Some(tcp_proxy::ClusterSpecifier::Cluster(
                "outbound|5432|tls|db.default.svc.cluster.local".into()
            ))
        );
        let m = near.filter_chain_match.as_ref().unwrap();
        assert_eq!(
            (
                m.prefix_ranges[0].address_prefix.as_str(),
                m.prefix_ranges[0].prefix_len
            ),
            ("10.96.0.0", Some(UInt32Value { value: 16 }))
        );
        assert_eq!(rest.filter_chain_match, None, "the batch route is not this proxy's");
        let Some(tcp_proxy::ClusterSpecifier::WeightedClusters(w)) = proxies(rest).cluster_specifier else {
            panic!("weighted")
        };
        let weights: Vec<(&str, u32)> = w.clusters.iter().map(|c| (c.name.as_str(), c.weight)).collect();
        assert_eq!(
            weights,
            [
                ("outbound|5432|v1|db.default.svc.cluster.local", 80),
                ("outbound|5432|v2|db.default.svc.cluster.local", 20)
            ]
        );
        let batch: BTreeMap<String, String> = [("app".to_owned(), "batch".to_owned())].into();
        let who = Requester {
            namespace: None,
            labels: &batch,
        };
        let l = listener("10.96.0.20".parse().unwrap(), 9999, &host, Protocol::Tcp, &r, who);
        let [only] = &l.filter_chains[..] else {
            panic!("port 9999's catch-all ends the list: {:?}", l.filter_chains)
        };
        assert_eq!(
            proxies(only).cluster_specifier,
            Some(tcp_proxy::ClusterSpecifier::Cluster(
                "outbound|9999|near|db.default.svc.cluster.local".into()
            ))
        );
        let l = listener("10.96.0.20".parse().unwrap(), 7000, &host, Protocol::Tcp, &r, who);
        assert_eq!(
            proxies(&l.filter_chains[0]).cluster_specifier,
            Some(tcp_proxy::ClusterSpecifier::Cluster(
                "outbound|7000|batch|db.default.svc.cluster.local".into()
            )),
            "the source's own route"
        );
    }
}
