//! Trust bundles, one per trust domain, never merged: a peer is checked only against the
//! bundle of the trust domain its SPIFFE ID names (or the domain that name is an alias of,
//! as Istio's `trustDomainAliases`). Updates swap an immutable set, so handshakes never
//! lock and a bundle change needs no restart.

use std::collections::BTreeMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, TrustAnchor};

/// Why a bundle was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("bundle for {trust_domain}: {message}")]
    Pem { trust_domain: String, message: String },
    #[error("bundle for {trust_domain} has no certificate")]
    Empty { trust_domain: String },
    #[error("bundle for {trust_domain}: certificate {index} is not a usable trust anchor: {message}")]
    Anchor {
        trust_domain: String,
        index: usize,
        message: String,
    },
}

/// The roots of one trust domain.
#[derive(Debug)]
pub struct Bundle {
    roots: Vec<CertificateDer<'static>>,
    anchors: Vec<TrustAnchor<'static>>,
}

impl Bundle {
    /// A bundle of the given root certificates.
    pub fn new(trust_domain: &str, roots: Vec<CertificateDer<'static>>) -> Result<Self, BundleError> {
        if roots.is_empty() {
            return Err(BundleError::Empty {
                trust_domain: trust_domain.to_owned(),
            });
        }
        let anchors = roots
            .iter()
            .enumerate()
            .map(|(index, der)| {
                webpki::anchor_from_trusted_cert(der)
                    .map(|a| a.to_owned())
                    .map_err(|e| BundleError::Anchor {
                        trust_domain: trust_domain.to_owned(),
                        index,
                        message: e.to_string(),
                    })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { roots, anchors })
    }

    /// A bundle from PEM text holding one or more certificates.
    pub fn from_pem(trust_domain: &str, pem: &[u8]) -> Result<Self, BundleError> {
        let roots = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| BundleError::Pem {
                trust_domain: trust_domain.to_owned(),
                message: e.to_string(),
            })?;
        Self::new(trust_domain, roots)
    }

    /// The root certificates, as received.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    pub(crate) fn anchors(&self) -> &[TrustAnchor<'static>] {
        &self.anchors
    }
}

#[derive(Debug, Default, Clone)]
struct BundleSet {
    by_domain: BTreeMap<String, Arc<Bundle>>,
    /// alias trust domain → the trust domain whose bundle vouches for it.
    aliases: BTreeMap<String, String>,
}

/// The trust domain `trust_domain` stands for: the one it is an alias of, or itself.
fn canonical<'a>(set: &'a BundleSet, trust_domain: &'a str) -> &'a str {
    set.aliases.get(trust_domain).map_or(trust_domain, String::as_str)
}

/// Every trust domain this proxy trusts, each with its own bundle.
#[derive(Debug, Default)]
pub struct TrustBundles {
    set: ArcSwap<BundleSet>,
}

impl TrustBundles {
    /// An empty set: every peer is refused until a bundle arrives.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Trusts `bundle` for `trust_domain`, replacing what was there.
    pub fn set(&self, trust_domain: &str, bundle: Bundle) {
        let bundle = Arc::new(bundle);
        self.set.rcu(|old| {
            let mut next = BundleSet::clone(old);
            next.by_domain.insert(trust_domain.to_owned(), bundle.clone());
            next
        });
    }

    /// Stops trusting `trust_domain`.
    pub fn remove(&self, trust_domain: &str) {
        self.set.rcu(|old| {
            let mut next = BundleSet::clone(old);
            next.by_domain.remove(trust_domain);
            next
        });
    }

    /// Peers of `alias` are checked against the bundle of `trust_domain` (Istio's
    /// `trustDomainAliases`, used while a mesh migrates from one trust domain to another).
    pub fn alias(&self, alias: &str, trust_domain: &str) {
        self.set.rcu(|old| {
            let mut next = BundleSet::clone(old);
            next.aliases.insert(alias.to_owned(), trust_domain.to_owned());
            next
        });
    }

    /// The bundle that vouches for peers of `trust_domain`, if any.
    pub fn for_domain(&self, trust_domain: &str) -> Option<Arc<Bundle>> {
        let set = self.set.load();
        set.by_domain.get(canonical(&set, trust_domain)).cloned()
    }

    /// Whether `a` and `b` name the same trust domain, once aliases are resolved.
    pub fn same_domain(&self, a: &str, b: &str) -> bool {
        let set = self.set.load();
        canonical(&set, a) == canonical(&set, b)
    }

    /// The trust domains with a bundle.
    pub fn trust_domains(&self) -> Vec<String> {
        self.set.load().by_domain.keys().cloned().collect()
    }
}
