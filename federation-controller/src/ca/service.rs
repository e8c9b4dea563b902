//! Istio's `IstioCertificateService.CreateCertificate` over gRPC, the method istio-agent
//! and our sidecar call on 15012 to turn a CSR into an SVID.
//!
//! Written out by hand rather than generated: one unary method does not justify a `protoc`
//! build dependency, and the message types live in `mesh_vocab::ca_protocol`.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use mesh_vocab::ca_protocol::{CREATE_CERTIFICATE, IstioCertificateRequest, IstioCertificateResponse};
use tonic::codegen::{Body, BoxFuture, StdError, http};
use tonic::{Request, Response, Status};

use super::authenticate::Authenticator;
use super::signer::{CsrRefusal, Signer};
use crate::metrics::Metrics;

/// The gRPC service name.
pub const SERVICE_NAME: &str = "istio.v1.auth.IstioCertificateService";

/// The CA as a gRPC service.
#[derive(Clone)]
pub struct CertificateService {
    inner: Arc<Inner>,
}

struct Inner {
    signer: Signer,
    authenticator: Authenticator,
    metrics: Metrics,
}

impl CertificateService {
    /// Serves `signer`, admitting callers whose identity `authenticator` proves.
    pub fn new(signer: Signer, authenticator: Authenticator, metrics: Metrics) -> Self {
        Self {
            inner: Arc::new(Inner {
                signer,
                authenticator,
                metrics,
            }),
        }
    }

    /// Handles one `CreateCertificate` call.
    pub async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let metrics = &self.inner.metrics;
        metrics.csrs.inc();
        let identity = self
            .inner
            .authenticator
            .authenticate(request.metadata())
            .await
            .map_err(|refusal| {
                metrics.csr_refusal(refusal.reason());
                tracing::warn!(%refusal, "CSR refused: caller not authenticated");
                refusal.status()
            })?;
        let body = request.into_inner();
        let requested = u64::try_from(body.validity_duration).ok().map(Duration::from_secs);
        let chain = self
            .inner
            .signer
            .sign(&body.csr, &identity, requested)
            .map_err(|refusal| {
                metrics.csr_refusal(refusal.reason());
                tracing::warn!(%identity, %refusal, "CSR refused");
                match refusal {
                    // Not the caller's fault: the CA itself needs attention.
                    CsrRefusal::CaExpiring => Status::failed_precondition(refusal.to_string()),
                    _ => Status::invalid_argument(refusal.to_string()),
                }
            })?;
        metrics.issued.inc();
        tracing::info!(%identity, "SVID issued");
        Ok(Response::new(IstioCertificateResponse { cert_chain: chain }))
    }
}

impl tonic::server::NamedService for CertificateService {
    const NAME: &'static str = SERVICE_NAME;
}

struct CreateCertificate(CertificateService);

impl tonic::server::UnaryService<IstioCertificateRequest> for CreateCertificate {
    type Response = IstioCertificateResponse;
    type Future = BoxFuture<Response<Self::Response>, Status>;

    fn call(&mut self, request: Request<IstioCertificateRequest>) -> Self::Future {
        let service = self.0.clone();
        Box::pin(async move { service.create_certificate(request).await })
    }
}

impl<B> tonic::codegen::Service<http::Request<B>> for CertificateService
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if request.uri().path() != CREATE_CERTIFICATE {
            return Box::pin(async { Ok(Status::unimplemented("only CreateCertificate is served").into_http()) });
        }
        let method = CreateCertificate(self.clone());
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default())
                // A CSR is a few hundred bytes; refuse anything far beyond before decoding.
                .max_decoding_message_size(64 * 1024);
            Ok(grpc.unary(method, request).await)
        })
    }
}
