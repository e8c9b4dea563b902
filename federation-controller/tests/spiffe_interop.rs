//! Our SVIDs and SPIFFE bundle, checked by an implementation that is not ours: the
//! controller issues an SVID over the real CSR path (Istio's CreateCertificate on the TLS
//! port, proven with a bootstrap token) and serves its bundle endpoint; `spiffe_check.py`
//! fetches the bundle with the https_spiffe profile (Python's ssl), reads the JWK Set and
//! the SVIDs with py-spiffe and validates the chains with `cryptography`'s X.509 verifier.
//!
//! The script needs PyPI `spiffe` and `cryptography` (scripts/test.sh installs them); when
//! they are missing this test fails, it never skips.

mod support;

use std::path::Path;
use std::time::{Duration, SystemTime};

use base64::Engine;
use mesh_vocab::ca_protocol::{CREATE_CERTIFICATE, IstioCertificateRequest, IstioCertificateResponse};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde_json::Value;
use support::{Controller, scratch, two_networks};

const TD: &str = "example.org";
const REVIEWS: &str = "spiffe://example.org/ns/default/sa/reviews";

/// A key and a CSR for `identity`, sent to the CA at `secure` with a token from `ca_dir`;
/// returns (chain PEM as the CA answered it, leaf first and root last; key PEM, PKCS#8).
async fn issue(secure: std::net::SocketAddr, ca_dir: &Path, roots: &Path, identity: &str) -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.subject_alt_names = vec![rcgen::SanType::URI(identity.try_into().unwrap())];
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(std::fs::read(roots).unwrap()))
        .domain_name("istiod.istio-system.svc");
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{secure}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut request = tonic::Request::new(IstioCertificateRequest {
        csr,
        validity_duration: 3600,
    });
    let token = support::ca_token(ca_dir, identity);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let response = grpc
        .unary(
            request,
            tonic::codegen::http::uri::PathAndQuery::from_static(CREATE_CERTIFICATE),
            tonic_prost::ProstCodec::<IstioCertificateRequest, IstioCertificateResponse>::default(),
        )
        .await
        .expect("the CA issues the SVID")
        .into_inner();
    (response.cert_chain.concat(), key.serialize_pem())
}

/// A leaf for `identity` signed by the CA in `ca_dir` (its own key, bypassing the CSR
/// checks), shaped by `edit`: certificates our CA would never issue.
fn forge(ca_dir: &Path, identity: &str, edit: impl FnOnce(&mut rcgen::CertificateParams)) -> (String, String) {
    let ca_pem = std::fs::read_to_string(ca_dir.join("ca-cert.pem")).unwrap();
    let ca_key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(ca_dir.join("ca-key.pem")).unwrap()).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, ca_key).unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.subject_alt_names = vec![rcgen::SanType::URI(identity.try_into().unwrap())];
    params.is_ca = rcgen::IsCa::ExplicitNoCa;
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    edit(&mut params);
    let key = rcgen::KeyPair::generate().unwrap();
    let leaf = params.signed_by(&key, &issuer).unwrap();
    let chain = std::fs::read_to_string(ca_dir.join("cert-chain.pem")).unwrap();
    (format!("{}{chain}", leaf.pem()), key.serialize_pem())
}

fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".into())
}

/// Runs spiffe_check.py over `svids` (name → chain and key PEM); its JSON report.
fn check(dir: &Path, bundle: std::net::SocketAddr, bootstrap: &Path, svids: &[(&str, (String, String))]) -> Value {
    let mut cmd = std::process::Command::new(python());
    cmd.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/spiffe_check.py"))
        .args(["--bundle-url", &format!("https://{bundle}/")])
        .arg("--bootstrap")
        .arg(bootstrap)
        .args(["--trust-domain", TD])
        .args(["--endpoint-id", &format!("spiffe://{TD}/ns/istio-system/sa/istiod")]);
    for (name, (chain, key)) in svids {
        let (c, k) = (
            dir.join(format!("{name}.chain.pem")),
            dir.join(format!("{name}.key.pem")),
        );
        support::write(&c, chain).unwrap();
        support::write(&k, key).unwrap();
        cmd.arg("--svid").arg(format!("{name}={},{}", c.display(), k.display()));
    }
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {}: {e}", python()));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "spiffe_check.py failed ({}): {stderr}\n(missing modules? run scripts/test.sh, or \
         pip install -r federation-controller/tests/spiffe_check.requirements.txt)",
        out.status
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

fn ca_init(out: &Path) {
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_federation-controller"))
        .args(["ca", "init-mesh", "--out", out.to_str().unwrap()])
        .args(["--trust-domain", TD, "--clusters", "east"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

fn serve(clusters: &Path, ca_dir: &Path, bundle_endpoint: bool) -> Controller {
    let mut args = vec![
        "--manifests",
        clusters.to_str().unwrap(),
        "--ca-dir",
        ca_dir.to_str().unwrap(),
        "--trust-domain",
        TD,
        "--secure",
        "127.0.0.1:0",
    ];
    if bundle_endpoint {
        args.extend(["--bundle-endpoint", "127.0.0.1:0"]);
    }
    Controller::start(&args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn py_spiffe_and_cryptography_accept_our_svids_and_bundle_and_refuse_a_foreign_ca() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dir = scratch("spiffe-interop");
    let clusters = dir.join("clusters");
    two_networks(&clusters);
    // Ours: a shared root and this cluster's intermediate, so chains have three links.
    let mesh = dir.join("mesh");
    ca_init(&mesh);
    let ca_dir = mesh.join("east");
    let root = mesh.join("root-cert.pem");
    let ours = serve(&clusters, &ca_dir, true);
    // A stranger: another mesh that picked the same trust domain name, with its own
    // self-signed root (the CA's other mode: the root signs SVIDs itself).
    let stranger_dir = dir.join("stranger");
    let stranger = serve(&clusters, &stranger_dir, true);

    let reviews = issue(ours.secure.unwrap(), &ca_dir, &root, REVIEWS).await;
    let foreign = issue(
        stranger.secure.unwrap(),
        &stranger_dir,
        &stranger_dir.join("root-cert.pem"),
        REVIEWS,
    )
    .await;
    let other_domain = forge(&ca_dir, "spiffe://other.org/ns/default/sa/reviews", |_| {});
    let hour = Duration::from_secs(3600);
    let expired = forge(&ca_dir, REVIEWS, |p| {
        p.not_before = (SystemTime::now() - 3 * hour).into();
        p.not_after = (SystemTime::now() - hour).into();
    });
    let ca_leaf = forge(&ca_dir, REVIEWS, |p| {
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.key_usages = vec![
            rcgen::KeyUsagePurpose::DigitalSignature,
            rcgen::KeyUsagePurpose::KeyCertSign,
        ];
    });

    let bundle = bundle_addr(&ours);
    let report = check(
        &dir,
        bundle,
        &root,
        &[
            ("reviews", reviews.clone()),
            ("foreign", foreign.clone()),
            ("other_domain", other_domain),
            ("expired", expired),
            ("ca_leaf", ca_leaf),
        ],
    );
    eprintln!("{report:#}");

    // The bundle document holds exactly our root, and its endpoint proved istiod's SVID.
    let b = &report["bundle"];
    assert_eq!(b["trust_domain"], TD);
    assert_eq!(b["endpoint_id"], format!("spiffe://{TD}/ns/istio-system/sa/istiod"));
    let root_der = CertificateDer::from_pem_file(&root).unwrap();
    assert_eq!(
        b["roots_der_base64"],
        serde_json::json!([base64::engine::general_purpose::STANDARD.encode(root_der.as_ref())])
    );
    assert!(b["sequence"].is_u64() && b["refresh_hint"].is_u64(), "{b}");

    let svid = |name: &str| report["svids"][name].clone();
    let ok = svid("reviews");
    assert_eq!(ok["ok"], true, "our SVID must verify: {ok}");
    assert_eq!(ok["spiffe_id"], REVIEWS);
    assert_eq!(ok["trust_domain"], TD);
    assert_eq!(ok["path"], "/ns/default/sa/reviews");
    assert_eq!(ok["chain_len"], 3, "leaf, intermediate, root: {ok}");

    for (name, stage) in [
        ("foreign", "verify"),
        ("other_domain", "trust_domain"),
        ("expired", "verify"),
        ("ca_leaf", "parse"),
    ] {
        let r = svid(name);
        assert_eq!(r["ok"], false, "{name} must be refused: {r}");
        assert_eq!(r["stage"], stage, "{name} refused at the wrong stage: {r}");
    }

    // The other way round, against the stranger's bundle endpoint: its SVID (root-signed,
    // two links) verifies, ours does not.
    let report = check(
        &dir,
        bundle_addr(&stranger),
        &stranger_dir.join("root-cert.pem"),
        &[("stranger", foreign), ("ours", reviews)],
    );
    let ok = &report["svids"]["stranger"];
    assert_eq!(ok["ok"], true, "the self-signed CA's SVID must verify: {ok}");
    assert_eq!(ok["chain_len"], 2, "leaf, root: {ok}");
    let refused = &report["svids"]["ours"];
    assert_eq!(refused["ok"], false, "{refused}");
    assert_eq!(refused["stage"], "verify", "{refused}");
}

/// Where `controller` serves its bundle endpoint (its `ready` line says `bundle=ADDR`).
fn bundle_addr(controller: &Controller) -> std::net::SocketAddr {
    controller.bundle.expect("started with --bundle-endpoint")
}
