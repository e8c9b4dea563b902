//! Getting and renewing the workload's SVID from the mesh CA: a fresh key, a CSR whose only
//! URI SAN is our SPIFFE ID, Istio's `CreateCertificate` over TLS on 15012, and a renewal
//! at half-life that swaps the SVID slot, leaving established connections alone.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use mesh_vocab::ca_protocol::{CREATE_CERTIFICATE, IstioCertificateRequest, IstioCertificateResponse};
use mesh_vocab::spiffe::SpiffeId;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::svid::{Svid, SvidError, SvidSlot};

/// Why an SVID could not be obtained.
#[derive(Debug, thiserror::Error)]
pub enum CsrError {
    #[error("cannot reach the CA at {address}: {message}")]
    Connect { address: String, message: String },
    #[error("the CA refused: {0}")]
    Refused(tonic::Status),
    #[error("the CA answered with no certificate")]
    Empty,
    #[error("the CA's answer is not a usable SVID: {0}")]
    Unusable(#[from] SvidError),
    #[error("the CA issued {got}, not the {asked} we asked for")]
    WrongIdentity { asked: String, got: String },
    #[error("making a key or CSR: {0}")]
    Generate(String),
}

/// Where and how to ask for SVIDs.
#[derive(Clone)]
pub struct CaClient {
    /// `https://host:15012`.
    pub address: String,
    /// The name the CA's certificate carries (Istio: `istiod.istio-system.svc`).
    pub server_name: String,
    /// Roots the CA's serving certificate chains to (PEM).
    pub roots_pem: Vec<u8>,
    /// The bearer credential proving our identity.
    pub token: String,
    /// Whom we are.
    pub identity: SpiffeId,
    /// Lifetime to ask for (`None`: the CA's default).
    pub ttl: Option<Duration>,
    /// Our cluster, sent as istio-agent does (`clusterid`), so a Kubernetes token is reviewed
    /// by the API server that issued it.
    pub cluster: Option<String>,
}

impl CaClient {
    async fn channel(&self) -> Result<tonic::transport::Channel, CsrError> {
        let connect = |e: &dyn std::fmt::Display| CsrError::Connect {
            address: self.address.clone(),
            message: e.to_string(),
        };
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(&self.roots_pem))
            .domain_name(self.server_name.clone());
        tonic::transport::Endpoint::from_shared(self.address.clone())
            .map_err(|e| connect(&e))?
            .tls_config(tls)
            .map_err(|e| connect(&e))?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(10))
            .connect()
            .await
            .map_err(|e| connect(&e))
    }

    /// Makes a new key and gets it certified as our SVID.
    pub async fn fetch(&self) -> Result<Svid, CsrError> {
        let generate = |e: rcgen::Error| CsrError::Generate(e.to_string());
        let key = rcgen::KeyPair::generate().map_err(generate)?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(generate)?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.subject_alt_names = vec![rcgen::SanType::URI(
            self.identity.as_str().try_into().map_err(generate)?,
        )];
        let csr = params
            .serialize_request(&key)
            .map_err(generate)?
            .pem()
            .map_err(generate)?;

        let mut request = tonic::Request::new(IstioCertificateRequest {
            csr,
            validity_duration: self.ttl.map_or(0, |d| d.as_secs() as i64),
        });
        let bearer = format!("Bearer {}", self.token.trim());
        request.metadata_mut().insert(
            "authorization",
            bearer
                .parse()
                .map_err(|_| CsrError::Generate("the token is not valid header text".into()))?,
        );
        if let Some(cluster) = self.cluster.as_deref().and_then(|c| c.parse().ok()) {
            request.metadata_mut().insert("clusterid", cluster);
        }
        let mut grpc = tonic::client::Grpc::new(self.channel().await?);
        grpc.ready().await.map_err(|e| CsrError::Connect {
            address: self.address.clone(),
            message: e.to_string(),
        })?;
        let path = tonic::codegen::http::uri::PathAndQuery::from_static(CREATE_CERTIFICATE);
        let codec = tonic_prost::ProstCodec::<IstioCertificateRequest, IstioCertificateResponse>::default();
        let response = grpc
            .unary(request, path, codec)
            .await
            .map_err(CsrError::Refused)?
            .into_inner();

        let mut chain = Vec::new();
        for pem in &response.cert_chain {
            for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                chain.push(cert.map_err(|e| SvidError::Pem {
                    what: "CA answer".into(),
                    message: e.to_string(),
                })?);
            }
        }
        if chain.is_empty() {
            return Err(CsrError::Empty);
        }
        // The last element is the root: a peer must hold it already, so it is not sent.
        if chain.len() > 1 {
            chain.pop();
        }
        let key = PrivateKeyDer::try_from(key.serialize_der()).map_err(|e| CsrError::Generate(e.to_string()))?;
        let svid = Svid::from_der(chain, key)?;
        if svid.id() != &self.identity {
            return Err(CsrError::WrongIdentity {
                asked: self.identity.to_string(),
                got: svid.id().to_string(),
            });
        }
        Ok(svid)
    }

    /// Keeps `slot` holding a fresh SVID: renews at half-life, retries with backoff when the
    /// CA is away (the current SVID keeps serving meanwhile), calls `renewed` after each swap.
    /// `fetched_at` is when the SVID in `slot` came from the CA, if it did.
    pub async fn keep_fresh(self, slot: Arc<SvidSlot>, fetched_at: Option<SystemTime>, renewed: impl Fn(&Svid)) {
        let mut backoff = Duration::from_millis(500);
        // Half of the life left when we got it: the CA backdates `not_before` for clock
        // skew, which would otherwise pull renewal of a short-lived SVID forward.
        let mut fetched_at = fetched_at;
        loop {
            let current = slot.current();
            let due = match fetched_at {
                Some(at) => at + current.not_after().duration_since(at).unwrap_or_default() / 2,
                None => current.refresh_at(),
            };
            if let Ok(wait) = due.duration_since(SystemTime::now()) {
                tokio::time::sleep(wait).await;
            }
            match self.fetch().await {
                Ok(svid) => {
                    tracing::info!(id = %svid.id(), expires = svid.expiry_unix(), "SVID renewed");
                    renewed(&svid);
                    slot.rotate(svid);
                    fetched_at = Some(SystemTime::now());
                    backoff = Duration::from_millis(500);
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "SVID renewal failed; the current one keeps serving");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
    }
}
