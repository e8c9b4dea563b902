//! Istio's certificate-signing protocol (`istio.v1.auth.IstioCertificateService`), which
//! istio-agent speaks to istiod on 15012 and our controller serves, so Istio's own agents
//! and ours can get SVIDs from the same CA.
//!
//! The caller proves who it is in the `authorization: Bearer <token>` metadata; the CSR's
//! only URI SAN must be that identity.

/// The gRPC path of the one method.
pub const CREATE_CERTIFICATE: &str = "/istio.v1.auth.IstioCertificateService/CreateCertificate";

/// A certificate signing request (`IstioCertificateRequest`). Field 4 (`metadata`, used by
/// Istio for impersonation between istiod instances) is not read.
#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateRequest {
    /// PEM-encoded PKCS#10 certificate signing request.
    #[prost(string, tag = "1")]
    pub csr: String,
    /// Requested lifetime in seconds; 0 or less means the CA's default.
    #[prost(int64, tag = "3")]
    pub validity_duration: i64,
}

/// The signed chain (`IstioCertificateResponse`): the leaf first, then the intermediates,
/// the root of the trust domain last (istio-agent takes the last element as the root).
#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateResponse {
    #[prost(string, repeated, tag = "1")]
    pub cert_chain: Vec<String>,
}
