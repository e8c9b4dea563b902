//! A mock control plane the linkerd way: a real tonic ADS server on 127.0.0.1 whose
//! responses the test feeds through a channel, and whose received requests (subscriptions,
//! ACKs, NACKs) the test reads from another. One stream at a time. The last node a client
//! identified as is kept, since a test that skips requests would miss it.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::protobuf::Any;
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_stream::{Stream, StreamExt};

type Responses = Pin<Box<dyn Stream<Item = Result<DiscoveryResponse, tonic::Status>> + Send>>;
type DeltaResponses = Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, tonic::Status>> + Send>>;

/// The test's ends of the control plane.
pub struct ControlPlane {
    /// `http://127.0.0.1:PORT`, for the sidecar's `--xds`.
    pub address: String,
    responses: mpsc::Sender<DiscoveryResponse>,
    /// Every request the sidecar sent, in order.
    pub requests: mpsc::Receiver<DiscoveryRequest>,
    nonce: u64,
    last_node: Arc<Mutex<Option<Node>>>,
}

/// What the next stream takes: the responses to send and where its requests go.
type Channels = (mpsc::Receiver<DiscoveryResponse>, mpsc::Sender<DiscoveryRequest>);

struct Ads {
    channels: Arc<Mutex<Option<Channels>>>,
    last_node: Arc<Mutex<Option<Node>>>,
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for Ads {
    type StreamAggregatedResourcesStream = Responses;
    type DeltaAggregatedResourcesStream = DeltaResponses;

    async fn stream_aggregated_resources(
        &self,
        request: tonic::Request<tonic::Streaming<DiscoveryRequest>>,
    ) -> Result<tonic::Response<Responses>, tonic::Status> {
        let (responses, requests) = self
            .channels
            .lock()
            .unwrap()
            .take()
            .ok_or_else(|| tonic::Status::unavailable("one stream at a time"))?;
        let mut inbound = request.into_inner();
        let last_node = self.last_node.clone();
        tokio::spawn(async move {
            while let Ok(Some(req)) = inbound.message().await {
                if let Some(node) = &req.node {
                    *last_node.lock().unwrap() = Some(node.clone());
                }
                if requests.send(req).await.is_err() {
                    break;
                }
            }
        });
        Ok(tonic::Response::new(Box::pin(ReceiverStream::new(responses).map(Ok))))
    }

    async fn delta_aggregated_resources(
        &self,
        _: tonic::Request<tonic::Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<tonic::Response<DeltaResponses>, tonic::Status> {
        Err(tonic::Status::unimplemented("state of the world only"))
    }
}

impl ControlPlane {
    /// Serves on an ephemeral port of 127.0.0.1 for as long as the runtime lives.
    pub async fn start() -> ControlPlane {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let (responses, responses_rx) = mpsc::channel(64);
        let (requests_tx, requests) = mpsc::channel(256);
        let last_node = Arc::new(Mutex::new(None));
        let ads = Ads {
            channels: Arc::new(Mutex::new(Some((responses_rx, requests_tx)))),
            last_node: last_node.clone(),
        };
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(AggregatedDiscoveryServiceServer::new(ads))
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        ControlPlane {
            address: format!("http://{addr}"),
            responses,
            requests,
            nonce: 0,
            last_node,
        }
    }

    /// Pushes `resources` of `type_url` as version `version`.
    pub async fn push<M: Message>(&mut self, type_url: &str, version: &str, resources: &[M]) {
        self.nonce += 1;
        let resp = DiscoveryResponse {
            version_info: version.into(),
            type_url: type_url.into(),
            nonce: self.nonce.to_string(),
            resources: resources
                .iter()
                .map(|m| Any {
                    type_url: type_url.into(),
                    value: m.encode_to_vec(),
                })
                .collect(),
            ..Default::default()
        };
        self.responses.send(resp).await.unwrap();
    }

    /// The next request of `type_url` for which `f` holds, skipping others.
    pub async fn request_where(&mut self, type_url: &str, f: impl Fn(&DiscoveryRequest) -> bool) -> DiscoveryRequest {
        loop {
            let req = self.requests.recv().await.expect("the sidecar's stream ended");
            if req.type_url == type_url && f(&req) {
                return req;
            }
        }
    }
}

impl ControlPlane {
    /// Pushes `resources` of `type_url` as `version` and waits (10 s at most) until the
    /// sidecar ACKed that version.
    pub async fn push_acked<M: Message>(&mut self, type_url: &str, version: &str, resources: &[M]) {
        self.push(type_url, version, resources).await;
        let acked = self.request_where(type_url, |r| r.version_info == version && r.error_detail.is_none());
        tokio::time::timeout(std::time::Duration::from_secs(10), acked)
            .await
            .unwrap_or_else(|_| panic!("{type_url} version {version} not ACKed within 10 s"));
    }

    /// The last node a client identified as.
    pub fn last_node(&self) -> Option<Node> {
        self.last_node.lock().unwrap().clone()
    }
}
