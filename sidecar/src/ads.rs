//! Opening an aggregated discovery (ADS) stream to the controller, the one way every xDS
//! client of ours does it — the sidecar's routes and trust bundles, the gateway's routes:
//! connect within a bound, send the first requests, and hand back both directions.

use std::time::Duration;

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// Any failure to open or keep the stream; callers log it and reconnect.
pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// How long connecting to the controller may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// TLS towards the controller's secure port: its roots and the name its certificate carries.
pub struct ControllerTls<'a> {
    pub roots_pem: &'a [u8],
    pub server_name: &'a str,
}

/// One open ADS stream.
pub struct Stream {
    /// Requests (ACKs, NACKs, new subscriptions) to the controller.
    pub requests: mpsc::Sender<DiscoveryRequest>,
    pub responses: tonic::Streaming<DiscoveryResponse>,
}

/// Opens a stream to `address` (`http://host:15010`, or `https://host:15012` with `tls`)
/// and sends `first` on it.
pub async fn open(
    address: &str,
    tls: Option<ControllerTls<'_>>,
    first: Vec<DiscoveryRequest>,
) -> Result<Stream, Error> {
    let mut endpoint = tonic::transport::Endpoint::from_shared(address.to_owned())?.connect_timeout(CONNECT_TIMEOUT);
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(tls.roots_pem))
                .domain_name(tls.server_name.to_owned()),
        )?;
    }
    let mut client = AggregatedDiscoveryServiceClient::new(endpoint.connect().await?);
    let (requests, rx) = mpsc::channel(8);
    for request in first {
        requests.send(request).await?;
    }
    let responses = client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await?
        .into_inner();
    Ok(Stream { requests, responses })
}
