//! Federation with other trust domains: each is described by a manifest (our
//! `FederatedTrustDomain`, or SPIRE's `ClusterFederatedTrustDomain` with the same spec),
//! and its bundle endpoint is polled at the refresh hint it publishes. A bundle that cannot
//! be fetched keeps the last one (reported in metrics), never an empty trust.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use mesh_vocab::SpiffeId;
use mesh_vocab::manifest::{self, ManifestError};
use serde::Deserialize;
use sidecar::tls::bundle::Bundle;
use sidecar::tls::{ExpectedPeer, TrustBundles};
use tokio::sync::watch;

use super::{BundleSet, jwks};
use crate::metrics::Metrics;

/// How the endpoint authenticates itself (SPIFFE Trust Domain and Bundle, §5.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Profile {
    /// An SVID of the foreign trust domain, checked against our last bundle of it.
    HttpsSpiffe { endpoint_id: SpiffeId },
    /// A Web PKI certificate for the URL's host.
    HttpsWeb,
}

/// One federated trust domain.
#[derive(Debug, Clone)]
pub struct FederatedTrustDomain {
    pub trust_domain: String,
    pub url: hyper::Uri,
    pub profile: Profile,
    /// The first bundle (PEM), needed to authenticate an `https_spiffe` endpoint.
    pub bootstrap: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Spec {
    trust_domain: String,
    #[serde(rename = "bundleEndpointURL")]
    bundle_endpoint_url: String,
    bundle_endpoint_profile: ProfileSpec,
    /// PEM roots or a SPIFFE bundle document.
    #[serde(default)]
    trust_domain_bundle: Option<String>,
    /// SPIRE's controller-manager class; accepted so SPIRE's manifests load unchanged.
    #[serde(default)]
    #[allow(dead_code)]
    class_name: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProfileSpec {
    #[serde(rename = "type")]
    kind: String,
    #[serde(rename = "endpointSPIFFEID", default)]
    endpoint_spiffe_id: Option<String>,
}

/// Reads every `FederatedTrustDomain` / `ClusterFederatedTrustDomain` in a YAML file; other
/// kinds are ignored, so the file may be a cluster's manifest. Errors name the file,
/// document and field.
pub fn load(path: &Path) -> Result<Vec<FederatedTrustDomain>, ManifestError> {
    let text = std::fs::read_to_string(path).map_err(|e| ManifestError::file(path, e.to_string()))?;
    let mut out = Vec::new();
    for (n, value) in manifest::documents(path, &text)? {
        let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or_default();
        if kind != "FederatedTrustDomain" && kind != "ClusterFederatedTrustDomain" {
            continue;
        }
        let spec_value = value.get("spec").cloned().unwrap_or_default();
        let spec: Spec = manifest::typed(path, n, "spec.", spec_value)?;
        let fail = |field: &str, message: String| ManifestError::field(path, n, format!("spec.{field}"), message);
        SpiffeId::parse(&format!("spiffe://{}", spec.trust_domain)).map_err(|e| fail("trustDomain", e.to_string()))?;
        let url: hyper::Uri = spec
            .bundle_endpoint_url
            .parse()
            .map_err(|e| fail("bundleEndpointURL", format!("{e}")))?;
        if url.scheme_str() != Some("https") {
            return Err(fail("bundleEndpointURL", "a bundle endpoint is https".into()));
        }
        let profile = match spec.bundle_endpoint_profile.kind.as_str() {
            "https_spiffe" => {
                let field = "bundleEndpointProfile.endpointSPIFFEID";
                let id = spec
                    .bundle_endpoint_profile
                    .endpoint_spiffe_id
                    .ok_or_else(|| fail(field, "https_spiffe needs the endpoint's SPIFFE ID".into()))?;
                Profile::HttpsSpiffe {
                    endpoint_id: SpiffeId::parse(&id).map_err(|e| fail(field, e.to_string()))?,
                }
            }
            "https_web" => Profile::HttpsWeb,
            other => {
                return Err(fail(
                    "bundleEndpointProfile.type",
                    format!("expected https_spiffe or https_web, not {other:?}"),
                ));
            }
        };
        let bootstrap = match spec.trust_domain_bundle {
            Some(b) if b.trim_start().starts_with('{') => Some(
                jwks::decode(b.as_bytes())
                    .map_err(|e| fail("trustDomainBundle", e.to_string()))?
                    .roots_pem,
            ),
            Some(pem) => {
                Bundle::from_pem(&spec.trust_domain, pem.as_bytes())
                    .map_err(|e| fail("trustDomainBundle", e.to_string()))?;
                Some(pem)
            }
            None => None,
        };
        if matches!(profile, Profile::HttpsSpiffe { .. }) && bootstrap.is_none() {
            return Err(fail(
                "trustDomainBundle",
                "https_spiffe needs a bootstrap bundle to authenticate the endpoint".into(),
            ));
        }
        out.push(FederatedTrustDomain {
            trust_domain: spec.trust_domain,
            url,
            profile,
            bootstrap,
        });
    }
    Ok(out)
}

/// Why one fetch failed (the metric's reason label).
#[derive(Debug, thiserror::Error)]
enum FetchError {
    #[error("connect: {0}")]
    Connect(String),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("HTTP: {0}")]
    Http(String),
    #[error("bundle: {0}")]
    Bundle(#[from] jwks::JwksError),
}

impl FetchError {
    fn reason(&self) -> &'static str {
        match self {
            Self::Connect(_) => "connect",
            Self::Tls(_) => "tls",
            Self::Http(_) => "http",
            Self::Bundle(_) => "bad_bundle",
        }
    }
}

/// Bounds on the refresh hint a peer publishes, so a peer can neither make us spin nor
/// make us miss its rotations for days.
const MIN_REFRESH: Duration = Duration::from_secs(1);
const MAX_REFRESH: Duration = Duration::from_secs(3600);
const DEFAULT_REFRESH: Duration = Duration::from_secs(300);

/// Keeps `federated.trust_domain`'s bundle in `set`, polling at the refresh hint.
pub async fn follow(
    federated: FederatedTrustDomain,
    set: Arc<watch::Sender<Arc<BundleSet>>>,
    web_roots: Arc<rustls::RootCertStore>,
    metrics: Metrics,
) {
    let td = federated.trust_domain.clone();
    if let Some(pem) = &federated.bootstrap {
        install(&set, &td, pem);
    }
    let mut failures = 0u32;
    loop {
        let current = set.borrow().bundles.get(&td).cloned();
        let wait = match fetch(&federated, current.as_deref(), &web_roots).await {
            Ok(received) => {
                failures = 0;
                install(&set, &td, &received.roots_pem);
                metrics.bundle_fetched(&td);
                received
                    .refresh_hint
                    .map_or(DEFAULT_REFRESH, Duration::from_secs)
                    .clamp(MIN_REFRESH, MAX_REFRESH)
            }
            Err(e) => {
                failures += 1;
                tracing::warn!(trust_domain = td, error = %e, "bundle fetch failed; keeping the last bundle");
                metrics.bundle_fetch_failed(&td, e.reason());
                Duration::from_millis(500 * 2u64.saturating_pow(failures.min(6))).min(Duration::from_secs(30))
            }
        };
        tokio::time::sleep(wait).await;
    }
}

fn install(set: &watch::Sender<Arc<BundleSet>>, td: &str, pem: &str) {
    set.send_if_modified(|s| {
        if s.bundles.get(td).map(String::as_str) == Some(pem) {
            return false;
        }
        let mut next = BundleSet::clone(s);
        next.bundles.insert(td.to_owned(), pem.to_owned());
        next.sequence += 1;
        *s = Arc::new(next);
        true
    });
}

async fn fetch(
    federated: &FederatedTrustDomain,
    current: Option<&str>,
    web_roots: &Arc<rustls::RootCertStore>,
) -> Result<jwks::Received, FetchError> {
    let url = &federated.url;
    let host = url
        .host()
        .unwrap_or_default()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = url.port_u16().unwrap_or(443);
    let tls = match &federated.profile {
        Profile::HttpsSpiffe { endpoint_id } => {
            let bundles = TrustBundles::new();
            let pem = current.ok_or_else(|| FetchError::Tls("no bundle to authenticate the endpoint".into()))?;
            let bundle = Bundle::from_pem(&federated.trust_domain, pem.as_bytes())
                .map_err(|e| FetchError::Tls(e.to_string()))?;
            bundles.set(&federated.trust_domain, bundle);
            sidecar::tls::verifying_client_config(bundles, ExpectedPeer::OneOf(vec![endpoint_id.clone()]))
        }
        Profile::HttpsWeb => Arc::new(
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
                .with_safe_default_protocol_versions()
                .expect("default versions")
                .with_root_certificates(web_roots.clone())
                .with_no_client_auth(),
        ),
    };
    let tcp = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::TcpStream::connect((host.as_str(), port)),
    )
    .await
    .map_err(|_| FetchError::Connect("timed out".into()))?
    .map_err(|e| FetchError::Connect(e.to_string()))?;
    let name = rustls_pki_types::ServerName::try_from(host.clone()).map_err(|e| FetchError::Tls(e.to_string()))?;
    let stream = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_rustls::TlsConnector::from(tls).connect(name, tcp),
    )
    .await
    .map_err(|_| FetchError::Tls("handshake timed out".into()))?
    .map_err(|e| FetchError::Tls(e.to_string()))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
        .await
        .map_err(|e| FetchError::Http(e.to_string()))?;
    tokio::spawn(conn);
    let request = hyper::Request::get(url.path_and_query().map_or("/", |p| p.as_str()))
        .header("host", url.authority().map_or(host.as_str(), |a| a.as_str()))
        .body(Empty::new())
        .map_err(|e| FetchError::Http(e.to_string()))?;
    let response = tokio::time::timeout(Duration::from_secs(10), sender.send_request(request))
        .await
        .map_err(|_| FetchError::Http("no answer in time".into()))?
        .map_err(|e| FetchError::Http(e.to_string()))?;
    if !response.status().is_success() {
        return Err(FetchError::Http(format!("status {}", response.status())));
    }
    let body = Limited::new(response.into_body(), jwks::MAX_BUNDLE)
        .collect()
        .await
        .map_err(|e| FetchError::Http(e.to_string()))?
        .to_bytes();
    Ok(jwks::decode(&body)?)
}
