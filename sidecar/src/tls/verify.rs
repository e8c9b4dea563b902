//! Verifying a peer's X.509 SVID: the chain against the bundle of the peer's own trust
//! domain, then the SPIFFE ID against the identities the peer may have.
//!
//! Every refusal has a reason label, so a closed connection is always counted under why.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mesh_vocab::spiffe::SpiffeId;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use x509_parser::extensions::GeneralName;

use super::bundle::TrustBundles;

/// Why a peer's certificate was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerRefusal {
    #[error("certificate is not valid DER X.509: {0}")]
    Malformed(String),
    #[error("an SVID has exactly one URI SAN; this certificate has {0}")]
    UriSanCount(usize),
    #[error("URI SAN {0:?} is not a SPIFFE ID")]
    NotSpiffe(String),
    /// The CA flag, or a key usage only a CA may have (keyCertSign, cRLSign).
    #[error("leaf certificate is a CA certificate (CA flag or certificate-signing key usage)")]
    CaLeaf,
    #[error("no trust bundle for trust domain {0:?}")]
    UntrustedDomain(String),
    #[error("certificate does not chain to the bundle of its trust domain")]
    ForeignCa,
    #[error("certificate has expired")]
    Expired,
    #[error("certificate is not valid yet")]
    NotYetValid,
    #[error("peer is {got}, expected {expected}")]
    Unexpected { got: String, expected: String },
    #[error("no client certificate presented")]
    NoClientCert,
    #[error("certificate chain is invalid: {0}")]
    Invalid(String),
}

impl PeerRefusal {
    /// The metric label for this refusal.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "malformed",
            Self::UriSanCount(_) => "uri_san_count",
            Self::NotSpiffe(_) => "not_spiffe",
            Self::CaLeaf => "ca_leaf",
            Self::UntrustedDomain(_) => "untrusted_trust_domain",
            Self::ForeignCa => "foreign_ca",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::Unexpected { .. } => "unexpected_identity",
            Self::NoClientCert => "no_client_cert",
            Self::Invalid(_) => "invalid_chain",
        }
    }

    fn into_rustls(self) -> rustls::Error {
        rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(self))))
    }
}

/// The refusal behind a failed handshake, when it was about the peer's certificate.
pub fn refusal_of(error: &rustls::Error) -> Option<PeerRefusal> {
    match error {
        rustls::Error::NoCertificatesPresented => Some(PeerRefusal::NoClientCert),
        rustls::Error::InvalidCertificate(CertificateError::Other(other)) => {
            other.0.downcast_ref::<PeerRefusal>().cloned()
        }
        _ => None,
    }
}

/// The refusal behind a failed tokio-rustls handshake, which reports rustls errors as
/// `io::Error`s.
pub fn refusal_in(error: &std::io::Error) -> Option<PeerRefusal> {
    error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .and_then(refusal_of)
}

/// Which identities a peer may prove.
#[derive(Debug, Clone)]
pub enum ExpectedPeer {
    /// Any identity of a trusted trust domain (authorization happens later, by policy).
    Any,
    /// One of these identities (what xDS said the upstream runs as).
    OneOf(Vec<SpiffeId>),
}

impl ExpectedPeer {
    /// As Istio expands its SAN matchers with `trustDomainAliases`: an expected
    /// `spiffe://cluster.local/ns/x/sa/y` is also proven by `spiffe://<alias>/ns/x/sa/y`.
    fn admit(&self, id: &SpiffeId, bundles: &TrustBundles) -> Result<(), PeerRefusal> {
        let same = |e: &SpiffeId| e.path() == id.path() && bundles.same_domain(e.trust_domain(), id.trust_domain());
        match self {
            Self::Any => Ok(()),
            Self::OneOf(ids) if ids.iter().any(same) => Ok(()),
            Self::OneOf(ids) => Err(PeerRefusal::Unexpected {
                got: id.to_string(),
                expected: ids.iter().map(SpiffeId::as_str).collect::<Vec<_>>().join(" or "),
            }),
        }
    }
}

/// What the leaf certificate says about itself (nothing here is verified yet).
#[derive(Debug, Clone)]
pub(crate) struct LeafFacts {
    pub id: SpiffeId,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// Reads the SPIFFE ID and validity of a leaf, refusing what cannot be an X.509 SVID.
pub(crate) fn leaf_facts(der: &CertificateDer<'_>) -> Result<LeafFacts, PeerRefusal> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| PeerRefusal::Malformed(e.to_string()))?;
    let uris: Vec<&str> = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::URI(u) => Some(*u),
                _ => None,
            })
            .collect(),
        Ok(None) => Vec::new(),
        Err(e) => return Err(PeerRefusal::Malformed(e.to_string())),
    };
    if uris.len() != 1 {
        return Err(PeerRefusal::UriSanCount(uris.len()));
    }
    let id = SpiffeId::parse(uris[0]).map_err(|_| PeerRefusal::NotSpiffe(uris[0].to_owned()))?;
    match cert.basic_constraints() {
        Ok(Some(bc)) if bc.value.ca => return Err(PeerRefusal::CaLeaf),
        Ok(_) => {}
        Err(e) => return Err(PeerRefusal::Malformed(e.to_string())),
    }
    // X.509-SVID §4.3: a leaf must not be able to sign certificates or CRLs, even without
    // the CA flag (webpki does not look at a leaf's key usage).
    match cert.key_usage() {
        Ok(Some(ku)) if ku.value.key_cert_sign() || ku.value.crl_sign() => return Err(PeerRefusal::CaLeaf),
        Ok(_) => {}
        Err(e) => return Err(PeerRefusal::Malformed(e.to_string())),
    }
    let at = |t: i64| UNIX_EPOCH + Duration::from_secs(t.max(0) as u64);
    Ok(LeafFacts {
        id,
        not_before: at(cert.validity().not_before.timestamp()),
        not_after: at(cert.validity().not_after.timestamp()),
    })
}

/// Verifies a peer's chain and returns the SPIFFE ID it proves.
pub fn peer_identity(
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    bundles: &TrustBundles,
    now: UnixTime,
    usage: webpki::KeyUsage,
) -> Result<SpiffeId, PeerRefusal> {
    let facts = leaf_facts(end_entity)?;
    let bundle = bundles
        .for_domain(facts.id.trust_domain())
        .ok_or_else(|| PeerRefusal::UntrustedDomain(facts.id.trust_domain().to_owned()))?;
    let cert = webpki::EndEntityCert::try_from(end_entity).map_err(|e| PeerRefusal::Malformed(e.to_string()))?;
    cert.verify_for_usage(
        algorithms().all,
        bundle.anchors(),
        intermediates,
        now,
        usage,
        None,
        None,
    )
    .map_err(|e| match e {
        webpki::Error::CertExpired { .. } => PeerRefusal::Expired,
        webpki::Error::CertNotValidYet { .. } => PeerRefusal::NotYetValid,
        webpki::Error::UnknownIssuer => PeerRefusal::ForeignCa,
        webpki::Error::CaUsedAsEndEntity => PeerRefusal::CaLeaf,
        other => PeerRefusal::Invalid(other.to_string()),
    })?;
    Ok(facts.id)
}

pub(super) fn algorithms() -> &'static WebPkiSupportedAlgorithms {
    static ALGS: std::sync::OnceLock<WebPkiSupportedAlgorithms> = std::sync::OnceLock::new();
    ALGS.get_or_init(|| rustls::crypto::aws_lc_rs::default_provider().signature_verification_algorithms)
}

/// Client side: the upstream must prove one of the expected identities; the DNS name in
/// the handshake (Istio's SNI form) is not a name the certificate carries and is ignored.
#[derive(Debug)]
pub(crate) struct SpiffeServerVerifier {
    pub bundles: Arc<TrustBundles>,
    pub expected: ExpectedPeer,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let id = peer_identity(
            end_entity,
            intermediates,
            &self.bundles,
            now,
            webpki::KeyUsage::server_auth(),
        )
        .map_err(PeerRefusal::into_rustls)?;
        self.expected
            .admit(&id, &self.bundles)
            .map_err(PeerRefusal::into_rustls)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        algorithms().supported_schemes()
    }
}

/// Server side: a client certificate is mandatory (STRICT; PERMISSIVE is decided before TLS,
/// by sniffing) and must be an SVID of a trusted trust domain. Which identities may do what
/// is authorization's business, after the handshake.
#[derive(Debug)]
pub(crate) struct SpiffeClientVerifier {
    pub bundles: Arc<TrustBundles>,
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        peer_identity(
            end_entity,
            intermediates,
            &self.bundles,
            now,
            webpki::KeyUsage::client_auth(),
        )
        .map_err(PeerRefusal::into_rustls)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        algorithms().supported_schemes()
    }
}
