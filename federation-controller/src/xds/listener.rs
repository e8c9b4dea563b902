//! LDS: Istio's virtual outbound listeners, one per service `VIP:port`. They are
//! never bound (`bind_to_port: false`): a sidecar captures a connection, looks up
//! its original destination among them, and hands it to the TCP proxy, which
//! names the service port's cluster.

use std::net::IpAddr;

use envoy_types::pb::envoy::config::core::v3::{
    self as core, SocketAddress, TrafficDirection, address, socket_address,
};
use envoy_types::pb::envoy::config::listener::v3::{Filter, FilterChain, Listener, filter};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{TcpProxy, tcp_proxy};
use envoy_types::pb::google::protobuf::BoolValue;
use mesh_vocab::Hostname;

use super::{any, cluster_name};
use crate::model::ServiceKey;

/// The TCP proxy network filter's name.
pub const TCP_PROXY: &str = "envoy.filters.network.tcp_proxy";
/// Its config's type URL.
pub const TCP_PROXY_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy";

/// Istio's listener name: `10.96.0.12_9080`.
pub fn listener_name(vip: IpAddr, port: u16) -> String {
    format!("{vip}_{port}")
}

/// The virtual outbound listener of `vip:port`, which belongs to `host`.
pub fn listener(vip: IpAddr, port: u16, host: &Hostname) -> Listener {
    let cluster = cluster_name(&ServiceKey {
        host: host.clone(),
        port,
    });
    let tcp = TcpProxy {
        stat_prefix: cluster.clone(),
        cluster_specifier: Some(tcp_proxy::ClusterSpecifier::Cluster(cluster)),
        ..Default::default()
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
            filters: vec![Filter {
                name: TCP_PROXY.into(),
                config_type: Some(filter::ConfigType::TypedConfig(any(TCP_PROXY_TYPE, &tcp))),
            }],
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
        let l = listener("10.96.0.12".parse().unwrap(), 9080, &host);
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
}
