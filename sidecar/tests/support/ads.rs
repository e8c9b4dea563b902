//! A real control plane for tests: a tonic ADS server that serves whatever listeners the
//! test pushes on a channel, and records what each client ACKed, so a test can wait until
//! a sidecar has taken a version in instead of sleeping.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::protobuf::Any;
use prost::Message;
use tokio::sync::watch;
use tokio_stream::Stream;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};

const LISTENER_TYPE: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";

/// The server's handle: push listeners, see ACKs and the nodes that connected.
pub struct Ads {
    pub addr: SocketAddr,
    listeners: watch::Sender<(u64, Vec<Listener>)>,
    seen: Arc<Seen>,
}

#[derive(Default)]
struct Seen {
    /// LDS versions ACKed (accepted, no error detail).
    acked: Mutex<Vec<String>>,
    /// LDS versions NACKed, with the client's reason.
    nacked: Mutex<Vec<(String, String)>>,
    nodes: Mutex<Vec<Node>>,
}

struct Service {
    listeners: watch::Receiver<(u64, Vec<Listener>)>,
    seen: Arc<Seen>,
}

type Responses = Pin<Box<dyn Stream<Item = Result<DiscoveryResponse, tonic::Status>> + Send>>;
type DeltaResponses = Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for Service {
    type StreamAggregatedResourcesStream = Responses;
    type DeltaAggregatedResourcesStream = DeltaResponses;

    async fn stream_aggregated_resources(
        &self,
        request: tonic::Request<tonic::Streaming<DiscoveryRequest>>,
    ) -> Result<tonic::Response<Responses>, tonic::Status> {
        let mut requests = request.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let seen = self.seen.clone();
        tokio::spawn(async move {
            while let Ok(Some(req)) = requests.message().await {
                if let Some(node) = req.node {
                    seen.nodes.lock().unwrap().push(node);
                }
                if req.type_url != LISTENER_TYPE || req.response_nonce.is_empty() {
                    continue;
                }
                match req.error_detail {
                    None => seen.acked.lock().unwrap().push(req.version_info),
                    Some(e) => seen.nacked.lock().unwrap().push((req.response_nonce, e.message)),
                }
            }
        });
        let mut listeners = self.listeners.clone();
        tokio::spawn(async move {
            loop {
                let (version, current) = listeners.borrow_and_update().clone();
                let resp = DiscoveryResponse {
                    version_info: version.to_string(),
                    nonce: format!("n{version}"),
                    type_url: LISTENER_TYPE.into(),
                    resources: current
                        .iter()
                        .map(|l| Any {
                            type_url: LISTENER_TYPE.into(),
                            value: l.encode_to_vec(),
                        })
                        .collect(),
                    ..Default::default()
                };
                if tx.send(Ok(resp)).await.is_err() || listeners.changed().await.is_err() {
                    return;
                }
            }
        });
        Ok(tonic::Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn delta_aggregated_resources(
        &self,
        _: tonic::Request<tonic::Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<tonic::Response<DeltaResponses>, tonic::Status> {
        Err(tonic::Status::unimplemented("state of the world only"))
    }
}

impl Ads {
    /// Serves on 127.0.0.1 (a free port) from the caller's runtime, with no listeners yet.
    pub async fn start() -> Ads {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = watch::channel((0, Vec::new()));
        let seen = Arc::new(Seen::default());
        let service = Service {
            listeners: rx,
            seen: seen.clone(),
        };
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(AggregatedDiscoveryServiceServer::new(service))
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        Ads {
            addr,
            listeners: tx,
            seen,
        }
    }

    /// `http://ADDR`, for `--xds`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Serves `listeners` as the next version and returns that version.
    pub fn push(&self, listeners: Vec<Listener>) -> String {
        let mut version = 0;
        self.listeners.send_modify(|(v, l)| {
            *v += 1;
            version = *v;
            *l = listeners;
        });
        version.to_string()
    }

    /// Whether a client ACKed LDS `version`.
    pub fn acked(&self, version: &str) -> Result<(), String> {
        let acked = self.seen.acked.lock().unwrap();
        match acked.iter().any(|v| v == version) {
            true => Ok(()),
            false => Err(format!(
                "LDS version {version} not ACKed; ACKed {acked:?}, NACKed {:?}",
                self.seen.nacked.lock().unwrap()
            )),
        }
    }

    /// The NACK reasons received so far.
    pub fn nacks(&self) -> Vec<String> {
        self.seen
            .nacked
            .lock()
            .unwrap()
            .iter()
            .map(|(_, m)| m.clone())
            .collect()
    }

    /// The last node a client identified as.
    pub fn last_node(&self) -> Option<Node> {
        self.seen.nodes.lock().unwrap().last().cloned()
    }
}
