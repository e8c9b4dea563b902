//! Trust bundles the controller hands to proxies over SDS: its own trust domain's root and
//! the bundle of every trust domain it federates with, each kept apart.
//!
//! - [`BundleSet`]: what proxies are served, one PEM bundle per trust domain.
//! - `jwks`: the SPIFFE bundle format (a JWK Set) spoken between trust domains.
//! - `endpoint`: serves our bundle to other trust domains.
//! - `federation`: polls other trust domains' bundle endpoints.

pub mod endpoint;
pub mod federation;
pub mod jwks;

use std::collections::BTreeMap;

use envoy_types::pb::envoy::config::core::v3::{DataSource, data_source};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{CertificateValidationContext, Secret, secret};

use crate::xds::{Encoded, SECRET_TYPE, any};

/// Istio's SDS name for the proxy's own trust domain's roots.
pub const ROOTCA: &str = "ROOTCA";

/// One PEM bundle per trust domain, with a sequence that grows on every change.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BundleSet {
    /// Our own trust domain.
    pub own: String,
    /// Trust domain → PEM roots.
    pub bundles: BTreeMap<String, String>,
    /// Grows with every change; the SDS version.
    pub sequence: u64,
}

impl BundleSet {
    /// The SDS resources: `ROOTCA` (our own roots, as Istio names them) and
    /// `spiffe://<trust domain>` for every trust domain, ours included.
    pub fn encoded(&self) -> Vec<Encoded> {
        let secret = |name: &str, pem: &str| {
            let s = Secret {
                name: name.to_owned(),
                r#type: Some(secret::Type::ValidationContext(CertificateValidationContext {
                    trusted_ca: Some(DataSource {
                        specifier: Some(data_source::Specifier::InlineBytes(pem.as_bytes().to_vec())),
                        ..Default::default()
                    }),
                    ..Default::default()
                })),
            };
            Encoded {
                name: name.to_owned(),
                resource: any(SECRET_TYPE, &s),
                version: crate::xds::stable_hash(pem),
            }
        };
        let mut out = Vec::new();
        if let Some(pem) = self.bundles.get(&self.own) {
            out.push(secret(ROOTCA, pem));
        }
        for (td, pem) in &self.bundles {
            out.push(secret(&format!("spiffe://{td}"), pem));
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }
}
