//! rustls configurations for the two sides of a mesh hop, built from the SVID slot and the
//! trust bundles so that rotation and bundle updates apply to the next handshake.

use std::sync::Arc;

use mesh_vocab::spiffe::SpiffeId;
use rustls::{ClientConfig, ServerConfig};
use rustls_pki_types::CertificateDer;

use super::bundle::TrustBundles;
use super::svid::SvidSlot;
use super::verify::{ExpectedPeer, SpiffeClientVerifier, SpiffeServerVerifier, leaf_facts};

/// Istio's ALPN values for mTLS between sidecars. `istio-peer-exchange` is never offered:
/// it promises Istio's metadata-exchange protocol, which we do not speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Alpn {
    /// Opaque TCP.
    Tcp,
    /// HTTP/1.1 inside the tunnel.
    Http11,
    /// HTTP/2 inside the tunnel.
    H2,
}

impl Alpn {
    /// The protocol names offered, in order: Istio's value, and for HTTP/2 also `h2`, as
    /// Istio's sidecars offer it, so that a server that knows only the standard name
    /// (Istio's own inbound listener negotiates `h2`/`http/1.1`) still agrees on one.
    pub fn offered(self) -> &'static [&'static [u8]] {
        match self {
            Self::Tcp => &[b"istio"],
            Self::Http11 => &[b"istio-http/1.1"],
            Self::H2 => &[b"istio-h2", b"h2"],
        }
    }
}

/// The ALPN values a server side accepts: Istio's set, plus plain `h2`/`http/1.1` so that a
/// peer configured by hand (or Envoy with a stock config) still negotiates.
const SERVER_ALPN: [&[u8]; 7] = [
    b"istio",
    b"istio-peer-exchange",
    b"istio-http/1.0",
    b"istio-http/1.1",
    b"istio-h2",
    b"h2",
    b"http/1.1",
];

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Client side of a hop: presents our SVID, accepts only `expected` from a trusted domain.
pub fn client_config(
    svid: Arc<SvidSlot>,
    bundles: Arc<TrustBundles>,
    expected: ExpectedPeer,
    alpn: Alpn,
) -> Arc<ClientConfig> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("aws-lc-rs supports the default protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier { bundles, expected }))
        .with_client_cert_resolver(svid);
    config.alpn_protocols = alpn.offered().iter().map(|p| p.to_vec()).collect();
    // No resumption: a resumed session skips the certificate exchange, and rustls renews
    // tickets from resumed sessions, so a chain of resumptions could carry an SVID past its
    // rotation (seen in the rotation test) or its expiry. Every connection proves the
    // current identity; the cost is a full handshake per new connection.
    config.resumption = rustls::client::Resumption::disabled();
    Arc::new(config)
}

/// A client that presents no certificate and accepts only `expected` from a trusted domain:
/// for fetching from a SPIFFE-authenticated endpoint (a bundle endpoint's `https_spiffe`).
pub fn verifying_client_config(bundles: Arc<TrustBundles>, expected: ExpectedPeer) -> Arc<ClientConfig> {
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("aws-lc-rs supports the default protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier { bundles, expected }))
        .with_no_client_auth();
    Arc::new(config)
}

/// Server side of a hop: presents our SVID, requires a client SVID of a trusted domain.
pub fn server_config(svid: Arc<SvidSlot>, bundles: Arc<TrustBundles>) -> Arc<ServerConfig> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("aws-lc-rs supports the default protocol versions")
        .with_client_cert_verifier(Arc::new(SpiffeClientVerifier { bundles }))
        .with_cert_resolver(svid);
    config.alpn_protocols = SERVER_ALPN.iter().map(|p| p.to_vec()).collect();
    // See `client_config` on resumption.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Arc::new(config)
}

/// The SPIFFE ID a completed handshake proved (the chain was verified during it).
pub fn proven_identity(peer_certificates: Option<&[CertificateDer<'_>]>) -> Option<SpiffeId> {
    peer_certificates
        .and_then(|c| c.first())
        .and_then(|leaf| leaf_facts(leaf).ok())
        .map(|f| f.id)
}
