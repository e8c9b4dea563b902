//! Trust bundles from the control plane over SDS: the sidecar asks its controller's ADS
//! stream for every `spiffe://<trust domain>` validation context and keeps [`TrustBundles`]
//! equal to what it was sent — a federated trust domain added, rotated or dropped there
//! takes effect here on the next handshake, without a restart. A response that cannot be
//! used is NACKed and the last good bundles stay; when the controller is away they stay too.

use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::{Node, data_source};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{Secret, secret};
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::google::rpc::Status;
use prost::Message;

use super::bundle::{Bundle, TrustBundles};

/// Type URL of secrets.
pub const SECRET_TYPE: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// Where the bundles come from.
#[derive(Clone)]
pub struct BundleSource {
    /// The controller's ADS endpoint, `https://host:15012` (or `http://host:15010`).
    pub address: String,
    /// The name on the controller's certificate, for `https`.
    pub server_name: String,
    /// Roots for the controller's certificate (PEM), for `https`.
    pub roots_pem: Vec<u8>,
    /// Our node, as Istio's agents describe themselves.
    pub node: Node,
    /// Trust domains configured locally (our own): never dropped for being absent from SDS.
    pub keep: Vec<String>,
}

/// The trust domains named in one SDS response, with their bundles.
fn decode(resp: &DiscoveryResponse) -> Result<Vec<(String, Bundle)>, String> {
    let mut out = Vec::new();
    for any in &resp.resources {
        let s = Secret::decode(any.value.as_slice()).map_err(|e| format!("undecodable Secret: {e}"))?;
        // ROOTCA repeats our own domain's spiffe:// entry; everything else is per domain.
        let Some(td) = s.name.strip_prefix("spiffe://") else {
            continue;
        };
        let Some(secret::Type::ValidationContext(vc)) = s.r#type else {
            return Err(format!("{}: not a validation context", s.name));
        };
        let Some(data_source::Specifier::InlineBytes(pem)) = vc.trusted_ca.and_then(|d| d.specifier) else {
            return Err(format!("{}: trusted_ca is not inline bytes", s.name));
        };
        let bundle = Bundle::from_pem(td, &pem).map_err(|e| e.to_string())?;
        out.push((td.to_owned(), bundle));
    }
    Ok(out)
}

/// Follows `source` forever, reconnecting with backoff; `updated` is called after each
/// accepted update with the trust domains now trusted.
pub async fn follow(source: BundleSource, bundles: Arc<TrustBundles>, updated: impl Fn(&[String])) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match session(&source, &bundles, &updated).await {
            Ok(()) => tracing::warn!(
                controller = source.address,
                "SDS stream ended; keeping the last bundles"
            ),
            Err(e) => {
                tracing::warn!(controller = source.address, error = %e, "SDS unavailable; keeping the last bundles")
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

async fn session(
    source: &BundleSource,
    bundles: &TrustBundles,
    updated: &impl Fn(&[String]),
) -> Result<(), crate::ads::Error> {
    let tls = source
        .address
        .starts_with("https://")
        .then(|| crate::ads::ControllerTls {
            roots_pem: &source.roots_pem,
            server_name: &source.server_name,
        });
    // No names: every bundle the controller serves.
    let first = vec![DiscoveryRequest {
        node: Some(source.node.clone()),
        type_url: SECRET_TYPE.into(),
        ..Default::default()
    }];
    let crate::ads::Stream {
        requests: tx,
        mut responses,
    } = crate::ads::open(&source.address, tls, first).await?;
    let mut accepted_version = String::new();
    while let Some(resp) = responses.message().await? {
        if resp.type_url != SECRET_TYPE {
            continue;
        }
        let error = match decode(&resp) {
            Ok(received) => {
                let names: Vec<String> = received.iter().map(|(td, _)| td.clone()).collect();
                let dropped = bundles
                    .trust_domains()
                    .into_iter()
                    .filter(|td| !names.contains(td) && !source.keep.contains(td));
                for stale in dropped {
                    bundles.remove(&stale);
                }
                for (td, bundle) in received {
                    bundles.set(&td, bundle);
                }
                accepted_version = resp.version_info.clone();
                tracing::info!(version = accepted_version, trust_domains = ?names, "trust bundles from SDS");
                updated(&names);
                None
            }
            Err(message) => {
                tracing::warn!(error = message, "NACK trust bundles; keeping the last ones");
                Some(Status {
                    code: 3,
                    message,
                    details: vec![],
                })
            }
        };
        tx.send(DiscoveryRequest {
            version_info: accepted_version.clone(),
            response_nonce: resp.nonce.clone(),
            type_url: SECRET_TYPE.into(),
            error_detail: error,
            ..Default::default()
        })
        .await?;
    }
    Ok(())
}
