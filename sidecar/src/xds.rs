//! The sidecar's xDS client: one ADS stream (state of the world) to the controller for
//! listeners, the route configurations their HTTP connection managers name (RDS), clusters
//! and their endpoints, turned into [`Destinations`] and swapped in whole. A response that cannot be used is NACKed and the last good table keeps serving;
//! when the controller is away the table stays as it was while the client reconnects.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::{Locality, Node};
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use envoy_types::pb::google::rpc::Status;
use mesh_vocab::spiffe::SpiffeId;
use prost::Message;

use crate::app_http::AppHttp;
use crate::destinations::{BadResource, Destinations};
use crate::virtual_inbound::{InboundPolicy, VIRTUAL_INBOUND};

pub const LISTENER_TYPE: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const CLUSTER_TYPE: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const ENDPOINT_TYPE: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
/// RDS: the route configurations HTTP listeners name.
pub const ROUTE_TYPE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";

/// Who we are to the controller: Istio's sidecar node, so its per-network view applies.
#[derive(Debug, Clone)]
pub struct Identity {
    pub id: SpiffeId,
    pub ip: std::net::IpAddr,
    pub network: String,
    pub cluster: String,
    /// The workload's labels: Istio's `LABELS` node metadata, which selects the policies
    /// that apply to it.
    pub labels: Vec<(String, String)>,
    /// `Node.locality` (region, zone, subzone), for locality-aware endpoints.
    pub locality: Option<Locality>,
}

impl Identity {
    /// `sidecar~IP~POD.NS~NS.svc.cluster.local` with NETWORK / CLUSTER_ID / NAMESPACE metadata.
    pub fn node(&self) -> Node {
        let (ns, sa) = self
            .id
            .namespace_and_service_account()
            .unwrap_or(("default", "default"));
        let s = |v: &str| Value {
            kind: Some(Kind::StringValue(v.to_owned())),
        };
        Node {
            id: format!("sidecar~{}~{sa}.{ns}~{ns}.svc.cluster.local", self.ip),
            cluster: format!("{sa}.{ns}"),
            metadata: Some(Struct {
                fields: [
                    ("NETWORK".to_owned(), s(&self.network)),
                    ("CLUSTER_ID".to_owned(), s(&self.cluster)),
                    ("NAMESPACE".to_owned(), s(ns)),
                    ("SERVICE_ACCOUNT".to_owned(), s(sa)),
                    (
                        "LABELS".to_owned(),
                        Value {
                            kind: Some(Kind::StructValue(Struct {
                                fields: self.labels.iter().map(|(k, v)| (k.clone(), s(v))).collect(),
                            })),
                        },
                    ),
                ]
                .into(),
            }),
            locality: self.locality.clone(),
            ..Default::default()
        }
    }
}

/// Follows the controller at `address` (`http://host:15010`) forever; `updated` is called
/// with the number of routable listeners after every table swapped in. With `inbound`, the
/// `virtualInbound` listener's policy and the inbound clusters' protocols are swapped in
/// there too (when the controller serves them; otherwise what is there, the flags', stays).
pub async fn follow(
    address: String,
    identity: Identity,
    table: Arc<ArcSwap<Destinations>>,
    inbound: Option<InboundSlots>,
    updated: impl Fn(usize, bool),
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match session(&address, &identity, &table, inbound.as_ref(), &updated).await {
            Ok(()) => tracing::warn!(controller = address, "xDS stream ended; keeping the last routes"),
            Err(e) => tracing::warn!(controller = address, error = %e, "xDS unavailable; keeping the last routes"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// What the inbound side reads of the controller's word, each swapped whole.
#[derive(Clone)]
pub struct InboundSlots {
    pub policy: Arc<ArcSwap<InboundPolicy>>,
    pub app: Arc<ArcSwap<AppHttp>>,
}

/// The resources of the current stream, per type, with what was last ACKed.
#[derive(Default)]
struct Received {
    listeners: Vec<Listener>,
    clusters: Vec<Cluster>,
    assignments: HashMap<String, ClusterLoadAssignment>,
    routes: HashMap<String, RouteConfiguration>,
    /// The route configurations the current listeners name.
    route_names: Vec<String>,
    versions: HashMap<&'static str, String>,
    /// The policy of the last accepted `virtualInbound`.
    inbound: Option<Arc<InboundPolicy>>,
    /// The protocols of the last accepted inbound clusters.
    app: Option<Arc<AppHttp>>,
}

fn decode_all<M: Message + Default>(resp: &DiscoveryResponse) -> Result<Vec<M>, BadResource> {
    resp.resources
        .iter()
        .map(|any| {
            M::decode(any.value.as_slice()).map_err(|e| BadResource {
                resource: resp.type_url.clone(),
                problem: format!("undecodable resource: {e}"),
            })
        })
        .collect()
}

impl Received {
    /// Takes `resp` in if the table still builds with it; returns the new table.
    fn accept(&mut self, resp: &DiscoveryResponse) -> Result<Option<Destinations>, BadResource> {
        let mut next = Received {
            listeners: self.listeners.clone(),
            clusters: self.clusters.clone(),
            assignments: self.assignments.clone(),
            routes: self.routes.clone(),
            route_names: Vec::new(),
            versions: HashMap::new(),
            inbound: self.inbound.clone(),
            app: self.app.clone(),
        };
        let kind = match resp.type_url.as_str() {
            LISTENER_TYPE => {
                next.listeners = decode_all(resp)?;
                next.inbound = InboundPolicy::from_listeners(&next.listeners)
                    .map_err(|e| BadResource {
                        resource: VIRTUAL_INBOUND.to_owned(),
                        problem: e.to_string(),
                    })?
                    .map(Arc::new);
                LISTENER_TYPE
            }
            CLUSTER_TYPE => {
                next.clusters = decode_all(resp)?;
                next.app = AppHttp::from_clusters(&next.clusters)?.map(Arc::new);
                let names: Vec<&str> = next.clusters.iter().map(|c| c.name.as_str()).collect();
                next.assignments.retain(|k, _| names.contains(&k.as_str()));
                CLUSTER_TYPE
            }
            ENDPOINT_TYPE => {
                for cla in decode_all::<ClusterLoadAssignment>(resp)? {
                    next.assignments.insert(cla.cluster_name.clone(), cla);
                }
                ENDPOINT_TYPE
            }
            ROUTE_TYPE => {
                for rc in decode_all::<RouteConfiguration>(resp)? {
                    next.routes.insert(rc.name.clone(), rc);
                }
                ROUTE_TYPE
            }
            _ => return Ok(None),
        };
        let table = Destinations::build(&next.listeners, &next.clusters, &next.assignments)?;
        next.route_names = table.route_names();
        next.routes.retain(|name, _| next.route_names.contains(name));
        let table = table.with_routes(&next.routes)?;
        self.listeners = next.listeners;
        self.clusters = next.clusters;
        self.assignments = next.assignments;
        self.routes = next.routes;
        self.route_names = next.route_names;
        self.inbound = next.inbound;
        self.app = next.app;
        self.versions.insert(kind, resp.version_info.clone());
        Ok(Some(table))
    }

    fn version(&self, type_url: &str) -> String {
        self.versions.get(type_url).cloned().unwrap_or_default()
    }

    /// The clusters whose endpoints come by EDS: all but the original-destination ones.
    fn cluster_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .clusters
            .iter()
            .filter(|c| crate::destinations::balanced(c))
            .map(|c| c.name.clone())
            .collect();
        names.sort();
        names
    }

    /// The names a resource-named type (EDS, RDS) is subscribed to; `None` for the others.
    fn names(&self, type_url: &str) -> Option<Vec<String>> {
        match type_url {
            ENDPOINT_TYPE => Some(self.cluster_names()),
            ROUTE_TYPE => Some(self.route_names.clone()),
            _ => None,
        }
    }
}

/// A type whose resources we ask for by name: what we asked for last and the last nonce it
/// answered with, so that a request for new names doubles as the ACK of that response.
#[derive(Default)]
struct Named {
    names: Option<Vec<String>>,
    nonce: String,
}

async fn session(
    address: &str,
    identity: &Identity,
    table: &ArcSwap<Destinations>,
    inbound: Option<&InboundSlots>,
    updated: &impl Fn(usize, bool),
) -> Result<(), crate::ads::Error> {
    let first = [CLUSTER_TYPE, LISTENER_TYPE]
        .into_iter()
        .map(|type_url| DiscoveryRequest {
            node: Some(identity.node()),
            type_url: type_url.into(),
            ..Default::default()
        })
        .collect();
    let crate::ads::Stream {
        requests: tx,
        mut responses,
    } = crate::ads::open(address, None, first).await?;
    tracing::info!(controller = address, "xDS connected");
    let mut received = Received::default();
    let mut named: HashMap<&'static str, Named> =
        HashMap::from([(ENDPOINT_TYPE, Named::default()), (ROUTE_TYPE, Named::default())]);
    while let Some(resp) = responses.message().await? {
        let error = match received.accept(&resp) {
            Ok(Some(mut next)) => {
                let routes = next.routable();
                next.inherit(&table.load());
                table.store(Arc::new(next));
                match (inbound, resp.type_url.as_str()) {
                    (Some(slots), LISTENER_TYPE) => {
                        if let Some(policy) = &received.inbound {
                            slots.policy.store(policy.clone());
                        }
                    }
                    (Some(slots), CLUSTER_TYPE) => {
                        if let Some(app) = &received.app {
                            slots.app.store(app.clone());
                        }
                    }
                    _ => {}
                }
                updated(routes, true);
                // The decoded resources are freed; their pages go back (rate-limited).
                crate::heap::release_free_memory();
                tracing::debug!(
                    type_url = resp.type_url,
                    version = resp.version_info,
                    routes,
                    "xDS update"
                );
                None
            }
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "NACK; keeping the last routes");
                updated(table.load().routable(), false);
                Some(Status {
                    code: 3,
                    message: e.to_string(),
                    details: vec![],
                })
            }
        };
        if let Some(sub) = named.get_mut(resp.type_url.as_str()) {
            sub.nonce = resp.nonce.clone();
        }
        tx.send(DiscoveryRequest {
            version_info: received.version(&resp.type_url),
            response_nonce: resp.nonce.clone(),
            type_url: resp.type_url.clone(),
            resource_names: received.names(&resp.type_url).unwrap_or_default(),
            error_detail: error,
            ..Default::default()
        })
        .await?;
        for (type_url, sub) in &mut named {
            let names = received.names(type_url).unwrap_or_default();
            // Routes are asked for once a listener names one: an empty first request
            // would read as a wildcard. Clusters' endpoints are asked for after the first CDS.
            let first_ready = match *type_url {
                ROUTE_TYPE => !names.is_empty(),
                _ => resp.type_url == CLUSTER_TYPE,
            };
            let changed = match &sub.names {
                Some(old) => *old != names,
                None => first_ready,
            };
            if changed {
                tx.send(DiscoveryRequest {
                    version_info: received.version(type_url),
                    response_nonce: sub.nonce.clone(),
                    type_url: (*type_url).into(),
                    resource_names: names.clone(),
                    ..Default::default()
                })
                .await?;
                sub.names = Some(names);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::route::v3::route_match::PathSpecifier;
    use envoy_types::pb::envoy::config::route::v3::{RouteMatch, VirtualHost};
    use envoy_types::pb::envoy::r#type::matcher::v3::RegexMatcher;
    use envoy_types::pb::google::protobuf::Any;

    const ROUTE: &str = "reviews.default.svc.cluster.local:9080";

    fn response<M: Message>(type_url: &str, version: &str, resources: &[M]) -> DiscoveryResponse {
        DiscoveryResponse {
            version_info: version.into(),
            type_url: type_url.into(),
            resources: resources
                .iter()
                .map(|m| Any {
                    type_url: type_url.into(),
                    value: m.encode_to_vec(),
                })
                .collect(),
            ..Default::default()
        }
    }

    fn routes(regex: &str) -> RouteConfiguration {
        RouteConfiguration {
            name: ROUTE.into(),
            virtual_hosts: vec![VirtualHost {
                name: ROUTE.into(),
                domains: vec!["*".into()],
                routes: vec![envoy_types::pb::envoy::config::route::v3::Route {
                    r#match: Some(RouteMatch {
                        path_specifier: Some(PathSpecifier::SafeRegex(RegexMatcher {
                            regex: regex.into(),
                            ..Default::default()
                        })),
                        ..Default::default()
                    }),
                    action: Some(
                        envoy_types::pb::envoy::config::route::v3::route::Action::DirectResponse(
                            envoy_types::pb::envoy::config::route::v3::DirectResponseAction {
                                status: 204,
                                ..Default::default()
                            },
                        ),
                    ),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn route_configurations_follow_the_listeners_and_a_bad_one_is_refused() {
        let mut received = Received::default();
        let lds = response(
            LISTENER_TYPE,
            "1",
            &[crate::destinations::tests::http_listener("10.242.255.11", 9080, ROUTE)],
        );
        let table = received.accept(&lds).unwrap().unwrap();
        assert!(table.routes.is_empty(), "not received yet");
        assert_eq!(received.names(ROUTE_TYPE), Some(vec![ROUTE.to_owned()]));

        let bad = response(ROUTE_TYPE, "2", &[routes("(")]);
        let e = received.accept(&bad).unwrap_err();
        assert_eq!(e.resource, ROUTE);
        assert_eq!(received.version(ROUTE_TYPE), "", "the NACKed version is not taken");

        let good = response(ROUTE_TYPE, "3", &[routes("/.*")]);
        let table = received.accept(&good).unwrap().unwrap();
        assert!(table.routes.contains_key(ROUTE));
        assert_eq!(received.version(ROUTE_TYPE), "3");

        // The listener goes: so does its route configuration.
        let table = received
            .accept(&response::<Listener>(LISTENER_TYPE, "4", &[]))
            .unwrap()
            .unwrap();
        assert!(table.routes.is_empty() && received.names(ROUTE_TYPE) == Some(vec![]));
    }
}
