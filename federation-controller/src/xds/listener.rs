//! LDS: Istio's virtual outbound listeners, one per service `VIP:port`. They are
//! never bound (`bind_to_port: false`): a sidecar captures a connection, looks up
//! its original destination among them, and hands it to the listener's filter: for
//! a TCP port the TCP proxy, which names the service port's cluster; for an HTTP
//! port an HTTP connection manager, whose routes come over RDS as `HOST:PORT`
//! ([`super::routes`]).

use std::net::IpAddr;

use envoy_types::pb::envoy::config::core::v3::{
    self as core, SocketAddress, TrafficDirection, address, socket_address,
};
use envoy_types::pb::envoy::config::listener::v3::{Filter, FilterChain, Listener, filter};
use envoy_types::pb::envoy::extensions::filters::http::fault::v3::HttpFault;
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, Rds, http_connection_manager, http_filter,
};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{TcpProxy, tcp_proxy};
use envoy_types::pb::google::protobuf::BoolValue;
use mesh_vocab::Hostname;

use super::grpc::{HCM_TYPE, ROUTER, ROUTER_TYPE};
use super::routes::{FAULT_FILTER, FAULT_TYPE, route_config_name};
use super::{any, cluster_name};
use crate::model::{Protocol, ServiceKey};

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

/// The virtual outbound listener of `vip:port`, which belongs to `host` and speaks `protocol`.
pub fn listener(vip: IpAddr, port: u16, host: &Hostname, protocol: Protocol) -> Listener {
    let key = ServiceKey {
        host: host.clone(),
        port,
    };
    let filter = if protocol.is_http() {
        let hcm = http_connection_manager(format!("outbound_{vip}_{port}"), route_config_name(&key));
        Filter {
            name: HCM.into(),
            config_type: Some(filter::ConfigType::TypedConfig(any(HCM_TYPE, &hcm))),
        }
    } else {
        let cluster = cluster_name(&key);
        let tcp = TcpProxy {
            stat_prefix: cluster.clone(),
            cluster_specifier: Some(tcp_proxy::ClusterSpecifier::Cluster(cluster)),
            ..Default::default()
        };
        Filter {
            name: TCP_PROXY.into(),
            config_type: Some(filter::ConfigType::TypedConfig(any(TCP_PROXY_TYPE, &tcp))),
        }
    };
    Listener {
        name: listener_name(vip, port),
        address: Some(core::Address {
            address: Some(address::Address::SocketAddress(SocketAddress {
                address: vip.to_string(),
                port_specifier: Some(socket_address::PortSpecifier::PortValue(u32::from(port))),
                ..Default::default()
            })),
        }),
        bind_to_port: Some(BoolValue { value: false }),
        traffic_direction: TrafficDirection::Outbound as i32,
        filter_chains: vec![FilterChain {
            filters: vec![filter],
            ..Default::default()
        }],
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn a_virtual_outbound_listener_proxies_to_the_service_ports_cluster() {
        let host = Hostname::parse("reviews.default.svc.cluster.local").unwrap();
        let l = listener("10.96.0.12".parse().unwrap(), 9080, &host, Protocol::Tcp);
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
        let l = listener("10.96.0.12".parse().unwrap(), 9080, &host, Protocol::Http);
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
}
