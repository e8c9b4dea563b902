//! A synthetic mesh for benchmarks: the xDS a controller would send for `routes` services
//! with `endpoints` endpoints in all, and an AuthorizationPolicy per service, compiled by
//! the very code that compiles the controller's (`Destinations::build`, the route
//! compiler, `InboundPolicy::from_listeners`). `sidecar run --synthetic-mesh 1000:10000`
//! then measures the hop with routing, RBAC and telemetry on at that size, reproducible
//! with one command and no control plane.
//!
//! Outbound, the listener's connections are routed as connections captured to [`VIP`]:
//! every request is matched against `routes` virtual hosts (the one it asks for, `--service`,
//! is the last), goes to that service's cluster and is balanced over its endpoints —
//! `--outbound`'s target alone, in mutual TLS with `--sni` and `--peer-id`. The other
//! services' clusters share the other endpoints (addresses in 10.0.0.0/8 that are never
//! dialled). Inbound, every request passes an ALLOW policy of `routes` rules, each a
//! principal and a path prefix, where only the last (any authenticated principal of the
//! trust domain) admits the benchmark's requests: the worst case, every rule checked.
//!
//! The builders of those resources are public: tests build their xDS with them too.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::transport_socket;
use envoy_types::pb::envoy::config::core::v3::{Address, SocketAddress, TransportSocket, address, socket_address};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
};
use envoy_types::pb::envoy::config::listener::v3::{Filter, FilterChain, FilterChainMatch, Listener, filter};
use envoy_types::pb::envoy::config::rbac::v3::rbac::Action;
use envoy_types::pb::envoy::config::rbac::v3::{Permission, Policy, Principal, Rbac, permission, principal};
use envoy_types::pb::envoy::config::route::v3::route_action::ClusterSpecifier;
use envoy_types::pb::envoy::config::route::v3::{
    Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost, route, route_match,
};
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac as HttpRbac;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, Rds, http_connection_manager, http_filter,
};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, CommonTlsContext, SubjectAltNameMatcher, UpstreamTlsContext, common_tls_context,
    subject_alt_name_matcher,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{PathMatcher, StringMatcher, path_matcher, string_matcher};
use envoy_types::pb::google::protobuf::Any;
use prost::Message;

use crate::destinations::{BadResource, Destinations};
use crate::virtual_inbound::{BadInbound, InboundPolicy, VIRTUAL_INBOUND};

/// The VIP the outbound listener's connections are taken as captured to.
pub const VIP: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::new(10, 255, 0, 1)), 9080);

const ROUTE_NAME: &str = "9080";
const HCM_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
const HTTP_RBAC_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC";
const UPSTREAM_TLS_TYPE: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext";

/// How big the synthetic mesh is: `ROUTES:ENDPOINTS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size {
    /// Services, each a virtual host with its own cluster (and an RBAC rule inbound).
    pub routes: usize,
    /// Endpoints over all clusters.
    pub endpoints: usize,
}

/// Parses `ROUTES:ENDPOINTS`, e.g. `1000:10000`.
pub fn parse_size(s: &str) -> Result<Size, String> {
    let (r, e) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?}: expected ROUTES:ENDPOINTS, e.g. 1000:10000"))?;
    let routes: usize = r.parse().map_err(|_| format!("{r:?} is not a count"))?;
    let endpoints: usize = e.parse().map_err(|_| format!("{e:?} is not a count"))?;
    if routes == 0 || endpoints < routes {
        return Err(format!("{s:?}: at least one route, and an endpoint per route"));
    }
    Ok(Size { routes, endpoints })
}

/// A socket address as xDS writes it.
pub fn sock(addr: SocketAddr) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: addr.ip().to_string(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(u32::from(addr.port()))),
            ..Default::default()
        })),
    }
}

fn host(i: usize) -> String {
    format!("svc-{i}.default.svc.cluster.local")
}

fn cluster_name(host: &str) -> String {
    format!("outbound|9080||{host}")
}

fn prefix_matcher(p: &str) -> StringMatcher {
    StringMatcher {
        match_pattern: Some(string_matcher::MatchPattern::Prefix(p.into())),
        ignore_case: false,
    }
}

/// The network filter that is an HTTP connection manager configured as `hcm`.
fn hcm_filter(hcm: &HttpConnectionManager) -> Filter {
    Filter {
        name: "envoy.filters.network.http_connection_manager".into(),
        config_type: Some(filter::ConfigType::TypedConfig(Any {
            type_url: HCM_TYPE.into(),
            value: hcm.encode_to_vec(),
        })),
    }
}

/// Istio's outbound HTTP listener for `vip`, its routes from RDS as `route_name`.
pub fn http_listener(vip: SocketAddr, route_name: &str) -> Listener {
    let hcm = HttpConnectionManager {
        stat_prefix: format!("outbound_{}_{}", vip.ip(), vip.port()),
        route_specifier: Some(http_connection_manager::RouteSpecifier::Rds(Rds {
            config_source: None,
            route_config_name: route_name.into(),
        })),
        ..Default::default()
    };
    Listener {
        name: format!("{}_{}", vip.ip(), vip.port()),
        address: Some(sock(vip)),
        filter_chains: vec![FilterChain {
            filters: vec![hcm_filter(&hcm)],
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// The HTTP connection manager of an inbound chain whose one HTTP filter is RBAC with `rules`.
pub fn http_rbac(rules: Rbac) -> Filter {
    let rbac = HttpRbac {
        rules: Some(rules),
        ..Default::default()
    };
    hcm_filter(&HttpConnectionManager {
        http_filters: vec![HttpFilter {
            name: "envoy.filters.http.rbac".into(),
            config_type: Some(http_filter::ConfigType::TypedConfig(Any {
                type_url: HTTP_RBAC_TYPE.into(),
                value: rbac.encode_to_vec(),
            })),
            ..Default::default()
        }],
        ..Default::default()
    })
}

/// A cluster spoken to in mutual TLS with `sni`, whose endpoints must prove one of `ids`.
pub fn mtls_cluster(name: &str, sni: &str, ids: &[String]) -> Cluster {
    let tls = UpstreamTlsContext {
        sni: sni.into(),
        common_tls_context: Some(CommonTlsContext {
            validation_context_type: Some(common_tls_context::ValidationContextType::ValidationContext(
                CertificateValidationContext {
                    match_typed_subject_alt_names: ids
                        .iter()
                        .map(|id| SubjectAltNameMatcher {
                            san_type: subject_alt_name_matcher::SanType::Uri as i32,
                            matcher: Some(StringMatcher {
                                match_pattern: Some(string_matcher::MatchPattern::Exact(id.clone())),
                                ignore_case: false,
                            }),
                            ..Default::default()
                        })
                        .collect(),
                    ..Default::default()
                },
            )),
            ..Default::default()
        }),
        ..Default::default()
    };
    Cluster {
        name: name.into(),
        transport_socket: Some(TransportSocket {
            name: "envoy.transport_sockets.tls".into(),
            config_type: Some(transport_socket::ConfigType::TypedConfig(Any {
                type_url: UPSTREAM_TLS_TYPE.into(),
                value: tls.encode_to_vec(),
            })),
        }),
        ..Default::default()
    }
}

/// The load assignment of cluster `name`: `endpoints`, in one locality.
pub fn assignment(name: &str, endpoints: impl IntoIterator<Item = SocketAddr>) -> ClusterLoadAssignment {
    ClusterLoadAssignment {
        cluster_name: name.into(),
        endpoints: vec![LocalityLbEndpoints {
            lb_endpoints: endpoints
                .into_iter()
                .map(|a| LbEndpoint {
                    host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                        address: Some(sock(a)),
                        ..Default::default()
                    })),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn virtual_host(host: &str, cluster: &str) -> VirtualHost {
    VirtualHost {
        name: format!("{host}:9080"),
        domains: vec![host.to_owned(), format!("{host}:9080")],
        routes: vec![Route {
            r#match: Some(RouteMatch {
                path_specifier: Some(route_match::PathSpecifier::Prefix("/".into())),
                ..Default::default()
            }),
            action: Some(route::Action::Route(RouteAction {
                cluster_specifier: Some(ClusterSpecifier::Cluster(cluster.to_owned())),
                ..Default::default()
            })),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// A decoy endpoint: an address in 10.0.0.0/8 that is never dialled.
fn decoy(n: usize) -> SocketAddr {
    let n = n as u32 + 1;
    SocketAddr::new(
        std::net::IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | (n & 0x00ff_ffff))),
        15006,
    )
}

/// The outbound table: `size.routes` services, the last `service` with `target` as its one
/// endpoint (`sni`, proving one of `peer_ids`), the others sharing the other endpoints.
pub fn outbound(
    size: Size,
    service: &str,
    target: SocketAddr,
    sni: &str,
    peer_ids: &[String],
) -> Result<Destinations, BadResource> {
    let decoys = size.routes - 1;
    let decoy_endpoints = size.endpoints - 1;
    let mut hosts = Vec::with_capacity(size.routes);
    let mut clusters = Vec::with_capacity(size.routes);
    let mut assignments = HashMap::with_capacity(size.routes);
    let mut next = 0;
    for i in 0..decoys {
        let h = host(i);
        let name = cluster_name(&h);
        // Spread evenly: the first `rest` clusters get one more.
        let n = decoy_endpoints / decoys + usize::from(i < decoy_endpoints % decoys);
        assignments.insert(name.clone(), assignment(&name, (next..next + n).map(decoy)));
        next += n;
        let sni = format!("outbound_.9080_._.{h}");
        clusters.push(mtls_cluster(&name, &sni, peer_ids));
        hosts.push(virtual_host(&h, &name));
    }
    let name = cluster_name(service);
    assignments.insert(name.clone(), assignment(&name, std::iter::once(target)));
    clusters.push(mtls_cluster(&name, sni, peer_ids));
    hosts.push(virtual_host(service, &name));
    let routes = RouteConfiguration {
        name: ROUTE_NAME.into(),
        virtual_hosts: hosts,
        ..Default::default()
    };
    Destinations::build(&[http_listener(VIP, ROUTE_NAME)], &clusters, &assignments)?
        .with_routes(&HashMap::from([(ROUTE_NAME.to_owned(), routes)]))
}

/// The inbound policy: STRICT mutual TLS, and per request an ALLOW filter of
/// `size.routes` policies, only the last of which (any principal of `trust_domain`)
/// admits the benchmark's caller.
pub fn inbound(size: Size, trust_domain: &str) -> Result<InboundPolicy, BadInbound> {
    let mut policies: HashMap<String, Policy> = HashMap::with_capacity(size.routes);
    let rule = |principal: String, path: String| Policy {
        permissions: vec![Permission {
            rule: Some(permission::Rule::UrlPath(PathMatcher {
                rule: Some(path_matcher::Rule::Path(prefix_matcher(&path))),
            })),
        }],
        principals: vec![Principal {
            identifier: Some(principal::Identifier::Authenticated(principal::Authenticated {
                principal_name: Some(StringMatcher {
                    match_pattern: Some(string_matcher::MatchPattern::Exact(principal)),
                    ignore_case: false,
                }),
            })),
        }],
        ..Default::default()
    };
    for i in 0..size.routes - 1 {
        policies.insert(
            format!("ns[default]-policy[svc-{i}]-rule[0]"),
            rule(
                format!("spiffe://{trust_domain}/ns/default/sa/svc-{i}"),
                format!("/svc-{i}/"),
            ),
        );
    }
    let mut last = rule(String::new(), "/".into());
    last.principals = vec![Principal {
        identifier: Some(principal::Identifier::Authenticated(principal::Authenticated {
            principal_name: Some(prefix_matcher(&format!("spiffe://{trust_domain}/"))),
        })),
    }];
    // Named to sort last, where the compiler keeps Envoy's order (by name).
    policies.insert("zz-ns[default]-policy[mesh]-rule[0]".into(), last);
    let rules = Rbac {
        action: Action::Allow as i32,
        policies,
        ..Default::default()
    };
    let listener = Listener {
        name: VIRTUAL_INBOUND.into(),
        filter_chains: vec![FilterChain {
            name: "virtualInbound-tls".into(),
            filter_chain_match: Some(FilterChainMatch {
                transport_protocol: "tls".into(),
                ..Default::default()
            }),
            filters: vec![http_rbac(rules)],
            ..Default::default()
        }],
        ..Default::default()
    };
    Ok(InboundPolicy::from_listeners(&[listener])?.expect("the listener is virtualInbound"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authz::{Attributes, HttpAttributes};
    use crate::virtual_inbound::Transport;

    #[test]
    fn the_benchmarked_service_routes_to_its_one_endpoint_among_all_the_others() {
        let size = parse_size("50:500").unwrap();
        let target: SocketAddr = "127.0.0.1:15006".parse().unwrap();
        let ids = vec!["spiffe://cluster.local/ns/default/sa/reviews".to_owned()];
        let table = outbound(
            size,
            "reviews.default.svc.cluster.local",
            target,
            "outbound_.9080_._.reviews",
            &ids,
        )
        .unwrap();
        assert!(table.http_listener(VIP).is_some());
        assert!(parse_size("0:1").is_err() && parse_size("10:9").is_err() && parse_size("1000").is_err());
    }

    #[test]
    fn only_the_last_rule_admits_the_caller() {
        let policy = inbound(parse_size("20:20").unwrap(), "cluster.local").unwrap();
        let auth = policy.authorization(9080, Transport::MutualTls).unwrap();
        let uri: hyper::Uri = "/".parse().unwrap();
        let headers = hyper::HeaderMap::new();
        let attributes = |principal| Attributes {
            principal,
            remote: "127.0.0.1".parse().unwrap(),
            destination: "127.0.0.1:9080".parse().unwrap(),
            server_name: None,
            http: Some(HttpAttributes {
                method: &hyper::Method::GET,
                uri: &uri,
                headers: &headers,
            }),
        };
        let ours = attributes(Some("spiffe://cluster.local/ns/default/sa/productpage"));
        assert!(auth.request.check(&ours).allowed());
        assert!(
            !auth
                .request
                .check(&attributes(Some("spiffe://other.domain/ns/a/sa/b")))
                .allowed()
        );
        assert!(!auth.request.check(&attributes(None)).allowed());
    }
}
