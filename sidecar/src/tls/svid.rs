//! The workload's X.509 SVID: certificate chain, private key and the SPIFFE ID the leaf
//! carries; and the slot rustls reads it from, so a rotated SVID is used by the next
//! handshake without rebuilding any TLS config or touching established connections.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use mesh_vocab::spiffe::SpiffeId;
use rustls::client::ResolvesClientCert;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::verify;

/// Why an SVID cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SvidError {
    #[error("{path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{what}: no PEM {kind} found")]
    NoPem { what: String, kind: &'static str },
    #[error("{what}: {message}")]
    Pem { what: String, message: String },
    #[error("the private key does not fit the certificate: {0}")]
    KeyMismatch(String),
    #[error("the leaf certificate is not an SVID: {0}")]
    NotSvid(verify::PeerRefusal),
}

/// One X.509 SVID, checked to be a leaf with exactly one SPIFFE URI SAN and a matching key.
#[derive(Clone)]
pub struct Svid {
    id: SpiffeId,
    not_before: SystemTime,
    not_after: SystemTime,
    key: Arc<CertifiedKey>,
}

impl std::fmt::Debug for Svid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Svid")
            .field("id", &self.id)
            .field("not_after", &self.not_after)
            .finish()
    }
}

impl Svid {
    /// Builds an SVID from a PEM chain (leaf first) and a PEM private key.
    pub fn from_pem(chain_pem: &[u8], key_pem: &[u8], what: &str) -> Result<Self, SvidError> {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem)
            .collect::<Result<_, _>>()
            .map_err(|e| SvidError::Pem {
            what: what.to_owned(),
            message: e.to_string(),
        })?;
        if chain.is_empty() {
            return Err(SvidError::NoPem {
                what: what.to_owned(),
                kind: "CERTIFICATE",
            });
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| match e {
            rustls_pki_types::pem::Error::NoItemsFound => SvidError::NoPem {
                what: what.to_owned(),
                kind: "PRIVATE KEY",
            },
            other => SvidError::Pem {
                what: what.to_owned(),
                message: other.to_string(),
            },
        })?;
        Self::from_der(chain, key)
    }

    /// Reads an SVID from a certificate-chain file and a key file.
    pub fn from_files(chain: &Path, key: &Path) -> Result<Self, SvidError> {
        let read = |p: &Path| {
            std::fs::read(p).map_err(|source| SvidError::Read {
                path: p.display().to_string(),
                source,
            })
        };
        Self::from_pem(&read(chain)?, &read(key)?, &chain.display().to_string())
    }

    /// Builds an SVID from DER parts.
    pub fn from_der(chain: Vec<CertificateDer<'static>>, key: PrivateKeyDer<'static>) -> Result<Self, SvidError> {
        let leaf = verify::leaf_facts(&chain[0]).map_err(SvidError::NotSvid)?;
        let provider = rustls::crypto::aws_lc_rs::default_provider();
        let certified =
            CertifiedKey::from_der(chain, key, &provider).map_err(|e| SvidError::KeyMismatch(e.to_string()))?;
        Ok(Self {
            id: leaf.id,
            not_before: leaf.not_before,
            not_after: leaf.not_after,
            key: Arc::new(certified),
        })
    }

    /// The SPIFFE ID this SVID proves.
    pub fn id(&self) -> &SpiffeId {
        &self.id
    }

    /// When the leaf stops being valid.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// When the leaf became valid.
    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    /// When to fetch the next SVID: half-way through the leaf's life, as Istio and SPIRE do,
    /// so a control plane that is away for a while still leaves time to retry.
    pub fn refresh_at(&self) -> SystemTime {
        let life = self.not_after.duration_since(self.not_before).unwrap_or(Duration::ZERO);
        self.not_before + life / 2
    }

    /// Seconds since the epoch at which the leaf expires (for metrics and status).
    pub fn expiry_unix(&self) -> u64 {
        self.not_after
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    }

    /// The leaf certificate.
    pub fn leaf(&self) -> &CertificateDer<'static> {
        &self.key.cert[0]
    }
}

/// Where the current SVID lives; rustls asks it at every handshake, rotation swaps it.
#[derive(Debug)]
pub struct SvidSlot {
    current: ArcSwap<Svid>,
}

impl SvidSlot {
    /// A slot holding `svid`.
    pub fn new(svid: Svid) -> Arc<Self> {
        Arc::new(Self {
            current: ArcSwap::from_pointee(svid),
        })
    }

    /// The SVID the next handshake uses.
    pub fn current(&self) -> Arc<Svid> {
        self.current.load_full()
    }

    /// Installs a new SVID; handshakes already under way and established connections keep
    /// the old one.
    pub fn rotate(&self, svid: Svid) {
        self.current.store(Arc::new(svid));
    }
}

impl ResolvesServerCert for SvidSlot {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load().key.clone())
    }
}

impl ResolvesClientCert for SvidSlot {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[rustls::SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load().key.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}
