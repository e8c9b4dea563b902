//! Mutual TLS between two ends built from `sidecar::tls`, over an in-memory pipe, with
//! certificates made at test time: every refusal the identity issue names, by reason; then
//! the same refusals end to end, by a running sidecar over real sockets, each counted in
//! its metric under its reason label.

mod support;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use mesh_vocab::spiffe::SpiffeId;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use sidecar::tls::bundle::Bundle;
use sidecar::tls::{Alpn, ExpectedPeer, PeerRefusal, SvidSlot, TrustBundles};
use support::poll;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A root CA of one trust domain.
struct Ca {
    der: CertificateDer<'static>,
    pem: String,
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
            pem: cert.pem(),
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

    /// Files for a sidecar: an SVID for `id` (chain, key) and this CA's root, in `dir`.
    fn files(&self, dir: &std::path::Path, id: &str) -> [std::path::PathBuf; 3] {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names.push(SanType::URI(id.try_into().unwrap()));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        std::fs::create_dir_all(dir).unwrap();
        let files = [
            dir.join("cert-chain.pem"),
            dir.join("key.pem"),
            dir.join("root-cert.pem"),
        ];
        std::fs::write(&files[0], cert.pem()).unwrap();
        std::fs::write(&files[1], key.serialize_pem()).unwrap();
        std::fs::write(&files[2], &self.pem).unwrap();
        files
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

/// The sidecar's server configuration, presenting `svid` even when it is not an SVID.
fn server_config_for(svid: Leaf, bundles: Arc<TrustBundles>) -> Arc<rustls::ServerConfig> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    match svid {
        Leaf::Checked(s) => sidecar::tls::server_config(SvidSlot::new(s), bundles),
        Leaf::Raw(key) => {
            let base = sidecar::tls::server_config(slot(Ca::new("x").leaf(SERVER)), bundles);
            let mut config = rustls::ServerConfig::clone(&base);
            config.cert_resolver = Arc::new(RawResolver(key));
            Arc::new(config)
        }
    }
}

/// The sidecar's client configuration, presenting `svid` (even when it is not an SVID), or
/// no certificate at all.
fn client_config_for(
    svid: Option<Leaf>,
    bundles: Arc<TrustBundles>,
    expected: ExpectedPeer,
) -> Arc<rustls::ClientConfig> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    if let Some(Leaf::Checked(s)) = svid {
        return sidecar::tls::client_config(SvidSlot::new(s), bundles, expected, Alpn::Tcp);
    }
    let base = sidecar::tls::client_config(slot(Ca::new("x").leaf(CLIENT)), bundles, expected, Alpn::Tcp);
    let mut config = rustls::ClientConfig::clone(&base);
    config.client_auth_cert_resolver = match svid {
        Some(Leaf::Raw(key)) => Arc::new(RawResolver(key)),
        _ => Arc::new(NoCertificate),
    };
    Arc::new(config)
}

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
    let server_config = server_config_for(server_svid, server_bundles);
    let client_config = client_config_for(client_svid, client_bundles, expected);
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

// End to end: the sidecar itself (`sidecar run` embedded, real sockets) refuses each bad
// peer in the handshake and counts it under the refusal's reason label.

fn scratch(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("isthmus-sidecar-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The sample of `metric{labels}` on a sidecar's metrics port (0 when not there yet).
fn sample(metrics: std::net::SocketAddr, series: &str) -> f64 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(metrics).unwrap();
    write!(
        s,
        "GET /stats/prometheus HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

/// Waits until `series` reaches `want` (bounded).
async fn counted(metrics: std::net::SocketAddr, series: &str, want: f64) {
    poll(Duration::from_secs(10), || async {
        let got = sample(metrics, series);
        // Past the count is wrong at once, not merely late.
        assert!(got <= want, "{series} is {got}, expected {want}");
        match got == want {
            true => Ok(()),
            false => Err(format!("{series} is {got}, expected {want}")),
        }
    })
    .await
}

/// An application that echoes what it reads.
async fn echo_app() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

fn sidecar(line: &str) -> sidecar::run::Sidecar {
    let args = sidecar::run::RunArgs::from_words(line.split_whitespace()).unwrap();
    sidecar::run::Sidecar::start(args).unwrap()
}

/// One client connection to `inbound` presenting `leaf` (or nothing): Ok(echo) when the
/// session carried a byte both ways.
async fn call_inbound(inbound: std::net::SocketAddr, leaf: Option<Leaf>, server_ca: &Ca) -> std::io::Result<u8> {
    let config = client_config_for(leaf, bundles(&[("cluster.local", server_ca)]), ExpectedPeer::Any);
    let tcp = tokio::net::TcpStream::connect(inbound).await?;
    let name = ServerName::try_from("outbound_.9080_._.reviews.default.svc.cluster.local").unwrap();
    let exchange = async {
        let mut tls = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await?;
        tls.write_all(&[42]).await?;
        let mut byte = [0u8; 1];
        tls.read_exact(&mut byte).await?;
        Ok(byte[0])
    };
    tokio::time::timeout(Duration::from_secs(10), exchange).await?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inbound_sidecar_refuses_each_bad_client_and_counts_it_by_reason() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dir = scratch("inbound-refusals");
    let ca = Ca::new("cluster.local");
    let [cert, key, root] = ca.files(&dir, SERVER);
    let app = echo_app().await;
    let server = sidecar(&format!(
        "--cert {} --key {} --ca {} --inbound 127.0.0.1:0={app} --mtls STRICT --metrics 127.0.0.1:0",
        cert.display(),
        key.display(),
        root.display()
    ));
    let (inbound, metrics) = (server.bound.inbound.unwrap(), server.bound.metrics.unwrap());

    // A good client gets through: refusals below are about the certificate, not the setup.
    assert_eq!(call_inbound(inbound, Some(ca.leaf(CLIENT)), &ca).await.unwrap(), 42);

    let day = Duration::from_secs(86_400);
    let impostor = Ca::new("impostor");
    let stranger = Ca::new("stranger.td");
    let cases: Vec<(&str, Option<Leaf>)> = vec![
        (
            "expired",
            Some(ca.leaf_with(&[CLIENT], |p| {
                p.not_before = (SystemTime::now() - 3 * day).into();
                p.not_after = (SystemTime::now() - day).into();
            })),
        ),
        (
            "not_yet_valid",
            Some(ca.leaf_with(&[CLIENT], |p| {
                p.not_before = (SystemTime::now() + day).into();
                p.not_after = (SystemTime::now() + 3 * day).into();
            })),
        ),
        ("foreign_ca", Some(impostor.leaf(CLIENT))),
        (
            "untrusted_trust_domain",
            Some(stranger.leaf("spiffe://stranger.td/ns/default/sa/productpage")),
        ),
        (
            "ca_leaf",
            Some(ca.leaf_with(&[CLIENT], |p| p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained))),
        ),
        (
            "ca_leaf",
            Some(ca.leaf_with(&[CLIENT], |p| {
                p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyCertSign];
            })),
        ),
        (
            "ca_leaf",
            Some(ca.leaf_with(&[CLIENT], |p| {
                p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::CrlSign];
            })),
        ),
        (
            "uri_san_count",
            Some(ca.leaf_with(&[CLIENT, "spiffe://cluster.local/ns/default/sa/admin"], |_| {})),
        ),
        ("uri_san_count", Some(ca.leaf_with(&[], |_| {}))),
        ("no_client_cert", None),
    ];
    let mut expected = std::collections::BTreeMap::<&str, f64>::new();
    for (reason, leaf) in cases {
        let result = call_inbound(inbound, leaf, &ca).await;
        assert!(
            result.is_err(),
            "{reason}: the client must not get a session: {result:?}"
        );
        let n = expected.entry(reason).or_default();
        *n += 1.0;
        counted(
            metrics,
            &format!(r#"isthmus_sidecar_refused_connections_total{{reason="{reason}",side="inbound"}}"#),
            *n,
        )
        .await;
    }
    // Nothing was counted under a catch-all reason.
    assert_eq!(
        sample(
            metrics,
            r#"isthmus_sidecar_refused_connections_total{reason="tls_handshake",side="inbound"}"#
        ),
        0.0
    );
}

/// A TLS server presenting `leaf` (trusting `client_ca` for the sidecar's certificate)
/// that echoes one byte.
async fn upstream(leaf: Leaf, client_ca: &Ca) -> std::net::SocketAddr {
    let config = server_config_for(leaf, bundles(&[("cluster.local", client_ca)]));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let acceptor = tokio_rustls::TlsAcceptor::from(config.clone());
            tokio::spawn(async move {
                if let Ok(mut tls) = acceptor.accept(s).await {
                    let mut byte = [0u8; 1];
                    if tls.read_exact(&mut byte).await.is_ok() {
                        let _ = tls.write_all(&byte).await;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outbound_sidecar_refuses_each_bad_upstream_and_counts_it_by_reason() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dir = scratch("outbound-refusals");
    let ca = Ca::new("cluster.local");
    let [cert, key, root] = ca.files(&dir, CLIENT);
    let day = Duration::from_secs(86_400);
    let cases: Vec<(&str, Leaf)> = vec![
        ("ok", ca.leaf(SERVER)),
        (
            "expired",
            ca.leaf_with(&[SERVER], |p| {
                p.not_before = (SystemTime::now() - 3 * day).into();
                p.not_after = (SystemTime::now() - day).into();
            }),
        ),
        ("foreign_ca", Ca::new("impostor").leaf(SERVER)),
        (
            "untrusted_trust_domain",
            Ca::new("stranger.td").leaf("spiffe://stranger.td/ns/default/sa/reviews"),
        ),
        (
            "unexpected_identity",
            ca.leaf("spiffe://cluster.local/ns/default/sa/ratings"),
        ),
        (
            "ca_leaf",
            ca.leaf_with(&[SERVER], |p| p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained)),
        ),
    ];
    for (reason, leaf) in cases {
        let target = upstream(leaf, &ca).await;
        let client = sidecar(&format!(
            "--cert {} --key {} --ca {} --outbound 127.0.0.1:0={target} --peer-id {SERVER} --metrics 127.0.0.1:0",
            cert.display(),
            key.display(),
            root.display()
        ));
        let mut app = tokio::net::TcpStream::connect(client.bound.outbound.unwrap())
            .await
            .unwrap();
        app.write_all(&[42]).await.unwrap();
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(10), app.read_exact(&mut byte))
            .await
            .expect("the sidecar answers or closes in time");
        if reason == "ok" {
            assert_eq!(read.map(|_| byte[0]).unwrap(), 42, "a good upstream is reached");
            continue;
        }
        assert!(
            read.is_err(),
            "{reason}: the application must see the connection closed"
        );
        counted(
            client.bound.metrics.unwrap(),
            &format!(r#"isthmus_sidecar_upstream_failures_total{{reason="{reason}",side="outbound"}}"#),
            1.0,
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trust_domain_alias_is_accepted_as_ours_and_nothing_else_is() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dir = scratch("alias");
    let ca = Ca::new("cluster.local");
    let [cert, key, root] = ca.files(&dir, SERVER);
    let app = echo_app().await;
    let files = format!(
        "--cert {} --key {} --ca {} --metrics 127.0.0.1:0",
        cert.display(),
        key.display(),
        root.display()
    );
    let aliased = sidecar(&format!(
        "{files} --inbound 127.0.0.1:0={app} --trust-domain-alias old.td --trust-domain-alias older.td"
    ));
    let plain = sidecar(&format!("{files} --inbound 127.0.0.1:0={app}"));
    let legacy = || Some(ca.leaf("spiffe://old.td/ns/default/sa/legacy"));

    // Inbound: an SVID of an alias domain, signed by our root, is ours…
    assert_eq!(
        call_inbound(aliased.bound.inbound.unwrap(), legacy(), &ca)
            .await
            .unwrap(),
        42
    );
    assert_eq!(
        call_inbound(
            aliased.bound.inbound.unwrap(),
            Some(ca.leaf("spiffe://older.td/ns/default/sa/legacy")),
            &ca
        )
        .await
        .unwrap(),
        42
    );
    // …a domain that is not an alias is not, though our root signed it…
    let refused = r#"isthmus_sidecar_refused_connections_total{reason="untrusted_trust_domain",side="inbound"}"#;
    let other = Some(ca.leaf("spiffe://other.td/ns/default/sa/legacy"));
    assert!(call_inbound(aliased.bound.inbound.unwrap(), other, &ca).await.is_err());
    counted(aliased.bound.metrics.unwrap(), refused, 1.0).await;
    // …an alias domain signed by another root is not either…
    let forged = Some(Ca::new("impostor").leaf("spiffe://old.td/ns/default/sa/legacy"));
    assert!(call_inbound(aliased.bound.inbound.unwrap(), forged, &ca).await.is_err());
    counted(
        aliased.bound.metrics.unwrap(),
        r#"isthmus_sidecar_refused_connections_total{reason="foreign_ca",side="inbound"}"#,
        1.0,
    )
    .await;
    // …and without the flag the alias domain is a stranger.
    assert!(call_inbound(plain.bound.inbound.unwrap(), legacy(), &ca).await.is_err());
    counted(plain.bound.metrics.unwrap(), refused, 1.0).await;

    // Outbound, as Istio expands SAN matchers: `--peer-id` in our domain is also proven by
    // the same workload in an alias domain, and by no other workload there.
    let [ccert, ckey, _] = ca.files(&dir.join("client"), CLIENT);
    for (upstream_id, refusal) in [
        ("spiffe://old.td/ns/default/sa/reviews", None),
        ("spiffe://old.td/ns/default/sa/ratings", Some("unexpected_identity")),
        (
            "spiffe://other.td/ns/default/sa/reviews",
            Some("untrusted_trust_domain"),
        ),
    ] {
        let target = upstream(ca.leaf(upstream_id), &ca).await;
        let client = sidecar(&format!(
            "--cert {} --key {} --ca {} --outbound 127.0.0.1:0={target} --peer-id {SERVER} \
             --trust-domain-alias old.td --metrics 127.0.0.1:0",
            ccert.display(),
            ckey.display(),
            root.display()
        ));
        let mut app = tokio::net::TcpStream::connect(client.bound.outbound.unwrap())
            .await
            .unwrap();
        app.write_all(&[42]).await.unwrap();
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(10), app.read_exact(&mut byte))
            .await
            .expect("the sidecar answers or closes in time");
        assert_eq!(read.is_ok(), refusal.is_none(), "{upstream_id}: {read:?}");
        if let Some(reason) = refusal {
            counted(
                client.bound.metrics.unwrap(),
                &format!(r#"isthmus_sidecar_upstream_failures_total{{reason="{reason}",side="outbound"}}"#),
                1.0,
            )
            .await;
        }
    }
}
