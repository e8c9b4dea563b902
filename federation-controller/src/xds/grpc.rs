//! The shapes proxyless gRPC accepts (gRFC A27, as Istio's `grpcgen` serves them).
//!
//! A gRPC channel to `xds:///reviews.default.svc.cluster.local:9080` asks for the
//! listener named by its target, `reviews.default.svc.cluster.local:9080`. That
//! listener is an API listener: an `HttpConnectionManager` whose routes come over
//! RDS on the same ADS stream, with the fault filter and the router as its HTTP
//! filters. The route configuration, named like the listener, is the one Envoy
//! gets ([`super::routes`]), less what gRPC cannot do. Clusters are EDS clusters balanced round robin,
//! without Envoy's transport socket matches: gRPC only takes TLS from its own
//! certificate-provider plugins, so these are plaintext. Endpoints are Envoy's,
//! minus the ones behind another network's gateway, which only passes mTLS through.

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::cluster::v3::cluster::LbPolicy;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::listener::v3::{ApiListener, Listener};

use super::any;
use crate::model::ServiceKey;

/// The node metadata key Istio's gRPC bootstrap sets, and its value for gRPC.
pub const GENERATOR: (&str, &str) = ("GENERATOR", "grpc");
/// The HTTP connection manager's config type, inside an API listener.
pub const HCM_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
/// The router HTTP filter's name and config type.
pub const ROUTER: &str = "envoy.filters.http.router";
pub const ROUTER_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router";

/// Whether `node` is a proxyless gRPC client: Istio's bootstrap says so in its
/// metadata (`GENERATOR: grpc`); without it, the user agent every gRPC xDS
/// client sends (`gRPC C-core`, `gRPC Go`, `gRPC Java`) says so too. Envoy's is
/// `envoy`.
pub fn is_proxyless(node: &Node) -> bool {
    super::node_metadata(node, GENERATOR.0).is_some_and(|g| g == GENERATOR.1)
        || node.user_agent_name.starts_with("gRPC ")
}

/// The listener (and route configuration) name gRPC asks for: its target's `host:port`.
pub fn listener_name(key: &ServiceKey) -> String {
    format!("{}:{}", key.host, key.port)
}

/// The API listener of a service port: HTTP, routes over RDS (ADS), faults then the router.
pub fn listener(key: &ServiceKey) -> Listener {
    let name = listener_name(key);
    let hcm = super::listener::http_connection_manager(name.clone(), name.clone());
    Listener {
        name,
        api_listener: Some(ApiListener {
            api_listener: Some(any(HCM_TYPE, &hcm)),
        }),
        ..Default::default()
    }
}

/// The plaintext EDS cluster of a service port (or of one of its subsets), balanced round robin.
pub fn cluster(key: &ServiceKey, subset: Option<&str>) -> Cluster {
    Cluster {
        lb_policy: LbPolicy::RoundRobin as i32,
        ..super::eds_cluster(key, subset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::cluster::v3::cluster::{ClusterDiscoveryType, DiscoveryType};
    use envoy_types::pb::envoy::config::core::v3::config_source;
    use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
        HttpConnectionManager, http_connection_manager, http_filter,
    };
    use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
    use mesh_vocab::Hostname;
    use prost::Message;

    fn reviews() -> ServiceKey {
        ServiceKey {
            host: Hostname::parse("reviews.default.svc.cluster.local").unwrap(),
            port: 9080,
        }
    }

    #[test]
    fn grpc_nodes_are_known_by_istios_generator_metadata_or_their_user_agent() {
        let meta = |k: &str, v: &str| {
            Some(Struct {
                fields: [(
                    k.to_owned(),
                    Value {
                        kind: Some(Kind::StringValue(v.into())),
                    },
                )]
                .into(),
            })
        };
        let node = |metadata, agent: &str| Node {
            metadata,
            user_agent_name: agent.into(),
            ..Default::default()
        };
        assert!(is_proxyless(&node(meta("GENERATOR", "grpc"), "")));
        assert!(is_proxyless(&node(None, "gRPC C-core")));
        assert!(is_proxyless(&node(None, "gRPC Go")));
        assert!(!is_proxyless(&node(None, "envoy")));
        assert!(!is_proxyless(&node(meta("NETWORK", "grpc"), "")));
        assert!(!is_proxyless(&node(meta("GENERATOR", "envoy"), "")));
    }

    #[test]
    fn the_listener_is_an_api_listener_routing_over_ads_rds_with_the_router_last() {
        let l = listener(&reviews());
        assert_eq!(l.name, "reviews.default.svc.cluster.local:9080");
        assert!(
            l.address.is_none() && l.filter_chains.is_empty(),
            "not a socket listener"
        );
        let cfg = l.api_listener.unwrap().api_listener.unwrap();
        assert_eq!(cfg.type_url, HCM_TYPE);
        let hcm = HttpConnectionManager::decode(cfg.value.as_slice()).unwrap();
        let Some(http_connection_manager::RouteSpecifier::Rds(rds)) = hcm.route_specifier else {
            panic!("routes over RDS")
        };
        assert_eq!(rds.route_config_name, "reviews.default.svc.cluster.local:9080");
        assert!(matches!(
            rds.config_source.unwrap().config_source_specifier,
            Some(config_source::ConfigSourceSpecifier::Ads(_))
        ));
        let last = hcm.http_filters.last().expect("a filter");
        assert_eq!(last.name, ROUTER);
        let Some(http_filter::ConfigType::TypedConfig(router)) = &last.config_type else {
            panic!("typed")
        };
        assert_eq!(router.type_url, ROUTER_TYPE);
    }

    #[test]
    fn the_cluster_is_plaintext_eds_over_ads_round_robin() {
        let c = cluster(&reviews(), None);
        assert_eq!(c.name, "outbound|9080||reviews.default.svc.cluster.local");
        assert!(c.transport_socket_matches.is_empty() && c.transport_socket.is_none());
        assert_eq!(c.lb_policy, LbPolicy::RoundRobin as i32);
        assert_eq!(
            c.cluster_discovery_type,
            Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32))
        );
        assert!(matches!(
            c.eds_cluster_config
                .unwrap()
                .eds_config
                .unwrap()
                .config_source_specifier,
            Some(config_source::ConfigSourceSpecifier::Ads(_))
        ));
    }
}
