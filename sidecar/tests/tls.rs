//! Mutual TLS between two ends built from `sidecar::tls`, over an in-memory pipe, with
//! certificates made at test time: every refusal the identity issue names, by reason.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use mesh_vocab::spiffe::SpiffeId;
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, SanType};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use sidecar::tls::bundle::Bundle;
use sidecar::tls::{Alpn, ExpectedPeer, PeerRefusal, SvidSlot, TrustBundles};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A root CA of one trust domain.
struct Ca {
    der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::OrganizationName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Ca {
            der: cert.der().clone(),
            issuer: Issuer::new(params, key),
        }
    }

    fn bundle(&self, td: &str) -> Bundle {
        Bundle::new(td, vec![self.der.clone()]).unwrap()
    }

    /// A leaf with the given URI SANs, shaped by `edit`.
    fn leaf_with(&self, uris: &[&str], edit: impl FnOnce(&mut CertificateParams)) -> Leaf {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        for uri in uris {
            params.subject_alt_names.push(SanType::URI((*uri).try_into().unwrap()));
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        edit(&mut params);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let key = PrivateKeyDer::try_from(key.serialize_der()).unwrap();
        // Build through DER so a leaf that is not an SVID can still be presented.
        svid_unchecked(vec![cert.der().clone(), self.der.clone()], key)
    }

    fn leaf(&self, id: &str) -> Leaf {
        self.leaf_with(&[id], |_| {})
    }
}

/// Some tests need to present certificates our own `Leaf` refuses to hold (two URI SANs,
/// a CA leaf); they go through a raw certified key instead.
enum Leaf {
    Checked(sidecar::tls::Svid),
    Raw(Arc<rustls::sign::CertifiedKey>),
}

fn svid_unchecked(chain: Vec<CertificateDer<'static>>, key: PrivateKeyDer<'static>) -> Leaf {
    match sidecar::tls::Svid::from_der(chain.clone(), key.clone_key()) {
        Ok(svid) => Leaf::Checked(svid),
        Err(_) => {
            let provider = rustls::crypto::aws_lc_rs::default_provider();
            Leaf::Raw(Arc::new(
                rustls::sign::CertifiedKey::from_der(chain, key, &provider).unwrap(),
            ))
        }
    }
}

#[derive(Debug)]
struct RawResolver(Arc<rustls::sign::CertifiedKey>);

impl rustls::client::ResolvesClientCert for RawResolver {
    fn resolve(&self, _: &[&[u8]], _: &[rustls::SignatureScheme]) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

impl rustls::server::ResolvesServerCert for RawResolver {
    fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
}

#[derive(Debug)]
struct NoCertificate;

impl rustls::client::ResolvesClientCert for NoCertificate {
    fn resolve(&self, _: &[&[u8]], _: &[rustls::SignatureScheme]) -> Option<Arc<rustls::sign::CertifiedKey>> {
        None
    }
    fn has_certs(&self) -> bool {
        false
    }
}

fn slot(svid: Leaf) -> Arc<SvidSlot> {
    match svid {
        Leaf::Checked(s) => SvidSlot::new(s),
        Leaf::Raw(_) => panic!("this certificate is not an SVID"),
    }
}

const CLIENT: &str = "spiffe://cluster.local/ns/default/sa/productpage";
const SERVER: &str = "spiffe://cluster.local/ns/default/sa/reviews";

/// The outcome of one handshake, from both ends.
struct Outcome {
    server: Result<Option<SpiffeId>, Option<PeerRefusal>>,
    client: Result<Option<SpiffeId>, Option<PeerRefusal>>,
}

async fn handshake(
    client_svid: Option<Leaf>,
    client_bundles: Arc<TrustBundles>,
    expected: ExpectedPeer,
    server_svid: Leaf,
    server_bundles: Arc<TrustBundles>,
) -> Outcome {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let server_config = match server_svid {
        Leaf::Checked(s) => sidecar::tls::server_config(SvidSlot::new(s), server_bundles),
        Leaf::Raw(key) => {
            let base = sidecar::tls::server_config(slot(Ca::new("x").leaf(SERVER)), server_bundles);
            let mut config = rustls::ServerConfig::clone(&base);
            config.cert_resolver = Arc::new(RawResolver(key));
            Arc::new(config)
        }
    };
    let client_config = match client_svid {
        Some(Leaf::Checked(s)) => sidecar::tls::client_config(SvidSlot::new(s), client_bundles, expected, Alpn::Tcp),
        Some(Leaf::Raw(key)) => {
            let base =
                sidecar::tls::client_config(slot(Ca::new("x").leaf(CLIENT)), client_bundles, expected, Alpn::Tcp);
            let mut config = rustls::ClientConfig::clone(&base);
            config.client_auth_cert_resolver = Arc::new(RawResolver(key));
            Arc::new(config)
        }
        None => {
            let base =
                sidecar::tls::client_config(slot(Ca::new("x").leaf(CLIENT)), client_bundles, expected, Alpn::Tcp);
            let mut config = rustls::ClientConfig::clone(&base);
            config.client_auth_cert_resolver = Arc::new(NoCertificate);
            Arc::new(config)
        }
    };
    let (a, b) = tokio::io::duplex(64 * 1024);
    let acceptor = tokio_rustls::TlsAcceptor::from(server_config);
    let connector = tokio_rustls::TlsConnector::from(client_config);
    let server = tokio::spawn(async move {
        match acceptor.accept(b).await {
            Ok(mut tls) => {
                let id = sidecar::tls::proven_identity(tls.get_ref().1.peer_certificates());
                let mut byte = [0u8; 1];
                // Prove the session carries data, then close.
                if tls.read_exact(&mut byte).await.is_ok() {
                    let _ = tls.write_all(&byte).await;
                }
                let _ = tls.shutdown().await;
                Ok(id)
            }
            Err(e) => Err(sidecar::tls::refusal_in(&e)),
        }
    });
    let name = ServerName::try_from("outbound_.9080_._.reviews.default.svc.cluster.local").unwrap();
    let client = match connector.connect(name, a).await {
        Ok(mut tls) => {
            let id = sidecar::tls::proven_identity(tls.get_ref().1.peer_certificates());
            let mut byte = [7u8; 1];
            tls.write_all(&byte).await.unwrap();
            match tls.read_exact(&mut byte).await {
                Ok(_) => Ok(id),
                // TLS 1.3: the server refuses the client's certificate after the client
                // thinks the handshake is done; the refusal shows on the first read.
                Err(e) => Err(sidecar::tls::refusal_in(&e)),
            }
        }
        Err(e) => Err(sidecar::tls::refusal_in(&e)),
    };
    let server = tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .unwrap()
        .unwrap();
    Outcome { server, client }
}

fn bundles(entries: &[(&str, &Ca)]) -> Arc<TrustBundles> {
    let b = TrustBundles::new();
    for (td, ca) in entries {
        b.set(td, ca.bundle(td));
    }
    b
}

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

#[tokio::test]
async fn both_ends_learn_the_peers_spiffe_id() {
    let ca = Ca::new("cluster.local");
    let trust = bundles(&[("cluster.local", &ca)]);
    let out = handshake(
        Some(ca.leaf(CLIENT)),
        trust.clone(),
        ExpectedPeer::OneOf(vec![id(SERVER)]),
        ca.leaf(SERVER),
        trust,
    )
    .await;
    assert_eq!(out.server, Ok(Some(id(CLIENT))));
    assert_eq!(out.client, Ok(Some(id(SERVER))));
}

/// Server-side refusal of a client certificate, by reason.
async fn server_refuses(client: Leaf, server_trust: Arc<TrustBundles>, server_ca: &Ca) -> PeerRefusal {
    let client_trust = bundles(&[("cluster.local", server_ca)]);
    let out = handshake(
        Some(client),
        client_trust,
        ExpectedPeer::Any,
        server_ca.leaf(SERVER),
        server_trust,
    )
    .await;
    assert!(out.client.is_err(), "the client must not get a working session");
    out.server
        .expect_err("the server must refuse")
        .expect("the refusal names a reason")
}

#[tokio::test]
async fn expired_and_not_yet_valid_client_certificates_are_refused() {
    let ca = Ca::new("cluster.local");
    let trust = bundles(&[("cluster.local", &ca)]);
    let day = Duration::from_secs(86_400);
    let expired = ca.leaf_with(&[CLIENT], |p| {
        p.not_before = (SystemTime::now() - 3 * day).into();
        p.not_after = (SystemTime::now() - day).into();
    });
    assert_eq!(server_refuses(expired, trust.clone(), &ca).await, PeerRefusal::Expired);
    let early = ca.leaf_with(&[CLIENT], |p| {
        p.not_before = (SystemTime::now() + day).into();
        p.not_after = (SystemTime::now() + 3 * day).into();
    });
    assert_eq!(server_refuses(early, trust, &ca).await, PeerRefusal::NotYetValid);
}

#[tokio::test]
async fn a_foreign_ca_for_a_trusted_domain_is_refused() {
    let ca = Ca::new("cluster.local");
    let impostor = Ca::new("impostor");
    let trust = bundles(&[("cluster.local", &ca)]);
    assert_eq!(
        server_refuses(impostor.leaf(CLIENT), trust, &ca).await,
        PeerRefusal::ForeignCa
    );
}

#[tokio::test]
async fn bundles_are_never_merged_across_trust_domains() {
    // Both domains are trusted, but a cluster.local ID signed by other.td's CA is refused:
    // each peer is checked only against the bundle of its own trust domain.
    let ca = Ca::new("cluster.local");
    let other = Ca::new("other.td");
    let trust = bundles(&[("cluster.local", &ca), ("other.td", &other)]);
    assert_eq!(
        server_refuses(other.leaf(CLIENT), trust.clone(), &ca).await,
        PeerRefusal::ForeignCa
    );
    // …while other.td's own workloads are admitted.
    let out = handshake(
        Some(other.leaf("spiffe://other.td/ns/x/sa/y")),
        bundles(&[("cluster.local", &ca)]),
        ExpectedPeer::Any,
        ca.leaf(SERVER),
        trust,
    )
    .await;
    assert_eq!(out.server, Ok(Some(id("spiffe://other.td/ns/x/sa/y"))));
}

#[tokio::test]
async fn an_untrusted_trust_domain_is_refused() {
    let ca = Ca::new("cluster.local");
    let third = Ca::new("third.td");
    let trust = bundles(&[("cluster.local", &ca)]);
    assert_eq!(
        server_refuses(third.leaf("spiffe://third.td/ns/x/sa/y"), trust, &ca).await,
        PeerRefusal::UntrustedDomain("third.td".into())
    );
}

#[tokio::test]
async fn a_ca_flag_on_the_leaf_and_two_uri_sans_are_refused() {
    let ca = Ca::new("cluster.local");
    let trust = bundles(&[("cluster.local", &ca)]);
    let ca_leaf = ca.leaf_with(&[CLIENT], |p| p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained));
    assert!(
        matches!(ca_leaf, Leaf::Raw(_)),
        "Leaf must refuse to hold a CA certificate"
    );
    assert_eq!(server_refuses(ca_leaf, trust.clone(), &ca).await, PeerRefusal::CaLeaf);
    let two = ca.leaf_with(&[CLIENT, "spiffe://cluster.local/ns/default/sa/admin"], |_| {});
    assert!(matches!(two, Leaf::Raw(_)), "Leaf must refuse two URI SANs");
    assert_eq!(server_refuses(two, trust, &ca).await, PeerRefusal::UriSanCount(2));
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused() {
    let ca = Ca::new("cluster.local");
    let trust = bundles(&[("cluster.local", &ca)]);
    let out = handshake(None, trust.clone(), ExpectedPeer::Any, ca.leaf(SERVER), trust).await;
    assert_eq!(out.server, Err(Some(PeerRefusal::NoClientCert)));
    assert!(out.client.is_err());
}

#[tokio::test]
async fn the_client_refuses_a_server_that_is_not_the_expected_identity() {
    let ca = Ca::new("cluster.local");
    let trust = bundles(&[("cluster.local", &ca)]);
    let out = handshake(
        Some(ca.leaf(CLIENT)),
        trust.clone(),
        ExpectedPeer::OneOf(vec![id("spiffe://cluster.local/ns/default/sa/ratings")]),
        ca.leaf(SERVER),
        trust,
    )
    .await;
    assert_eq!(
        out.client,
        Err(Some(PeerRefusal::Unexpected {
            got: SERVER.into(),
            expected: "spiffe://cluster.local/ns/default/sa/ratings".into()
        }))
    );
}

#[tokio::test]
async fn a_trust_domain_alias_is_checked_against_the_aliased_bundle() {
    let ca = Ca::new("cluster.local");
    let trust = bundles(&[("cluster.local", &ca)]);
    trust.alias("old.td", "cluster.local");
    let out = handshake(
        Some(ca.leaf("spiffe://old.td/ns/default/sa/legacy")),
        bundles(&[("cluster.local", &ca)]),
        ExpectedPeer::Any,
        ca.leaf(SERVER),
        trust,
    )
    .await;
    assert_eq!(out.server, Ok(Some(id("spiffe://old.td/ns/default/sa/legacy"))));
}

#[test]
fn an_svid_refreshes_at_half_life() {
    let ca = Ca::new("cluster.local");
    // Certificates carry whole seconds.
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let start = SystemTime::UNIX_EPOCH + Duration::from_secs(now - 60);
    let Leaf::Checked(svid) = ca.leaf_with(&[CLIENT], |p| {
        p.not_before = start.into();
        p.not_after = (start + Duration::from_secs(24 * 3600)).into();
    }) else {
        panic!("a valid SVID")
    };
    let half = svid.refresh_at().duration_since(start).unwrap();
    assert_eq!(half.as_secs(), 12 * 3600);
    assert_eq!(svid.id(), &id(CLIENT));
}

#[test]
fn svid_errors_name_what_is_wrong() {
    let err = sidecar::tls::Svid::from_pem(b"", b"", "/etc/certs/cert-chain.pem").unwrap_err();
    assert_eq!(err.to_string(), "/etc/certs/cert-chain.pem: no PEM CERTIFICATE found");
    let ca = Ca::new("cluster.local");
    let other_key = KeyPair::generate().unwrap();
    let Leaf::Checked(svid) = ca.leaf(CLIENT) else { panic!() };
    let chain = vec![svid.leaf().clone()];
    let err =
        sidecar::tls::Svid::from_der(chain, PrivateKeyDer::try_from(other_key.serialize_der()).unwrap()).unwrap_err();
    assert!(err.to_string().starts_with("the private key does not fit"), "{err}");
}
