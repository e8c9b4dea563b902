//! The sidecar's xDS client: one ADS stream (state of the world) to the controller for
//! listeners, clusters and their endpoints, turned into [`Destinations`] and swapped in
//! whole. A response that cannot be used is NACKed and the last good table keeps serving;
//! when the controller is away the table stays as it was while the client reconnects.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::{Locality, Node};
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use envoy_types::pb::google::rpc::Status;
use mesh_vocab::spiffe::SpiffeId;
use prost::Message;

use crate::destinations::{BadResource, Destinations};
use crate::virtual_inbound::{InboundPolicy, VIRTUAL_INBOUND};

pub const LISTENER_TYPE: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const CLUSTER_TYPE: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const ENDPOINT_TYPE: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

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
/// `virtualInbound` listener's policy is swapped in there too (when the controller serves
/// one; otherwise what is there, the flags' policy, stays).
pub async fn follow(
    address: String,
    identity: Identity,
    table: Arc<ArcSwap<Destinations>>,
    inbound: Option<Arc<ArcSwap<InboundPolicy>>>,
    updated: impl Fn(usize, bool),
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match session(&address, &identity, &table, inbound.as_deref(), &updated).await {
            Ok(()) => tracing::warn!(controller = address, "xDS stream ended; keeping the last routes"),
            Err(e) => tracing::warn!(controller = address, error = %e, "xDS unavailable; keeping the last routes"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// The resources of the current stream, per type, with what was last ACKed.
#[derive(Default)]
struct Received {
    listeners: Vec<Listener>,
    clusters: Vec<Cluster>,
    assignments: HashMap<String, ClusterLoadAssignment>,
    versions: HashMap<&'static str, String>,
    /// The policy of the last accepted `virtualInbound`.
    inbound: Option<Arc<InboundPolicy>>,
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
            versions: HashMap::new(),
            inbound: self.inbound.clone(),
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
            _ => return Ok(None),
        };
        let table = Destinations::build(&next.listeners, &next.clusters, &next.assignments)?;
        self.listeners = next.listeners;
        self.clusters = next.clusters;
        self.assignments = next.assignments;
        self.inbound = next.inbound;
        self.versions.insert(kind, resp.version_info.clone());
        Ok(Some(table))
    }

    fn version(&self, type_url: &str) -> String {
        self.versions.get(type_url).cloned().unwrap_or_default()
    }

    fn cluster_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.clusters.iter().map(|c| c.name.clone()).collect();
        names.sort();
        names
    }
}

async fn session(
    address: &str,
    identity: &Identity,
    table: &ArcSwap<Destinations>,
    inbound: Option<&ArcSwap<InboundPolicy>>,
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
    let mut eds_names: Option<Vec<String>> = None;
    let mut eds_nonce = String::new();
    while let Some(resp) = responses.message().await? {
        let error = match received.accept(&resp) {
            Ok(Some(next)) => {
                let routes = next.listeners.len();
                table.store(Arc::new(next));
                if let (Some(slot), Some(policy), LISTENER_TYPE) = (inbound, &received.inbound, resp.type_url.as_str())
                {
                    slot.store(policy.clone());
                }
                updated(routes, true);
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
                updated(table.load().listeners.len(), false);
                Some(Status {
                    code: 3,
                    message: e.to_string(),
                    details: vec![],
                })
            }
        };
        if resp.type_url == ENDPOINT_TYPE {
            eds_nonce = resp.nonce.clone();
        }
        tx.send(DiscoveryRequest {
            version_info: received.version(&resp.type_url),
            response_nonce: resp.nonce.clone(),
            type_url: resp.type_url.clone(),
            resource_names: if resp.type_url == ENDPOINT_TYPE {
                received.cluster_names()
            } else {
                vec![]
            },
            error_detail: error,
            ..Default::default()
        })
        .await?;
        let names = received.cluster_names();
        if resp.type_url == CLUSTER_TYPE && eds_names.as_ref() != Some(&names) {
            // A new set of names; with the last EDS nonce it doubles as that ACK.
            tx.send(DiscoveryRequest {
                version_info: received.version(ENDPOINT_TYPE),
                response_nonce: eds_nonce.clone(),
                type_url: ENDPOINT_TYPE.into(),
                resource_names: names.clone(),
                ..Default::default()
            })
            .await?;
            eds_names = Some(names);
        }
    }
    Ok(())
}
