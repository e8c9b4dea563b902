//! The CA as a workload meets it: a CSR over Istio's gRPC method on the TLS port, proven
//! with a bootstrap token; SVIDs that verify against the trust domain's root; refusals
//! counted by reason; the root kept across restarts; Istio-style plugged-in intermediates.

mod support;

use std::path::Path;
use std::time::Duration;

use mesh_vocab::SpiffeId;
use rustls_pki_types::pem::PemObject;
use sidecar::tls::bundle::Bundle;
use sidecar::tls::csr::{CaClient, CsrError};
use sidecar::tls::{Svid, TrustBundles, peer_identity};
use support::{Controller, scratch, two_networks};

const REVIEWS: &str = "spiffe://cluster.local/ns/default/sa/reviews";

fn token(ca_dir: &Path, identity: &str) -> String {
    support::ca_token(ca_dir, identity)
}

fn client(controller: &Controller, roots: &Path, token: String, identity: &str) -> CaClient {
    CaClient {
        address: format!("https://{}", controller.secure.expect("serving the CA")),
        server_name: "istiod.istio-system.svc".into(),
        roots_pem: std::fs::read(roots).unwrap(),
        token,
        identity: SpiffeId::parse(identity).unwrap(),
        ttl: None,
        cluster: None,
    }
}

/// Verifies `svid` the way a peer would: its chain against the root in `root_file`.
fn verify_against(svid: &Svid, chain: &[rustls_pki_types::CertificateDer<'static>], root_file: &Path) -> SpiffeId {
    let bundles = TrustBundles::new();
    bundles.set(
        "cluster.local",
        Bundle::from_pem("cluster.local", &std::fs::read(root_file).unwrap()).unwrap(),
    );
    peer_identity(
        svid.leaf(),
        chain,
        &bundles,
        rustls_pki_types::UnixTime::now(),
        webpki::KeyUsage::client_auth(),
    )
    .expect("the SVID verifies against the trust domain's root")
}

fn serve_with_ca(manifests: &Path, ca_dir: &Path) -> Controller {
    Controller::start(&[
        "--manifests",
        manifests.to_str().unwrap(),
        "--ca-dir",
        ca_dir.to_str().unwrap(),
        "--secure",
        "127.0.0.1:0",
    ])
}

#[tokio::test]
async fn a_workload_with_a_token_gets_an_svid_and_the_root_survives_a_restart() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dir = scratch("ca-self");
    two_networks(&dir.join("clusters"));
    let ca_dir = dir.join("ca");
    let controller = serve_with_ca(&dir.join("clusters"), &ca_dir);
    // The key is the owner's alone.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(ca_dir.join("ca-key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "ca-key.pem must not be readable by others: {mode:o}");
    let root = ca_dir.join("root-cert.pem");
    let root_before = std::fs::read(&root).unwrap();

    let reviews = client(&controller, &root, token(&ca_dir, REVIEWS), REVIEWS);
    let svid = reviews.fetch().await.unwrap();
    assert_eq!(svid.id().as_str(), REVIEWS);
    let life = svid.not_after().duration_since(svid.not_before()).unwrap();
    assert!(
        life > Duration::from_secs(23 * 3600) && life <= Duration::from_secs(24 * 3600 + 120),
        "{life:?}"
    );
    assert_eq!(verify_against(&svid, &[], &root).as_str(), REVIEWS);
    assert_eq!(
        controller.metric("citadel_server_success_cert_issuance_count", &[]),
        Some(1.0)
    );

    // Restart: same root, and the old token still works.
    drop(controller);
    let controller = serve_with_ca(&dir.join("clusters"), &ca_dir);
    assert_eq!(
        std::fs::read(&root).unwrap(),
        root_before,
        "a restart must keep the root"
    );
    let again = client(&controller, &root, reviews.token.clone(), REVIEWS)
        .fetch()
        .await
        .unwrap();
    assert_eq!(verify_against(&again, &[], &root).as_str(), REVIEWS);
}

#[tokio::test]
async fn asking_for_someone_elses_identity_or_without_a_credential_is_refused_and_counted() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dir = scratch("ca-refuse");
    two_networks(&dir.join("clusters"));
    let ca_dir = dir.join("ca");
    let controller = serve_with_ca(&dir.join("clusters"), &ca_dir);
    let root = ca_dir.join("root-cert.pem");

    // A token for ratings, used to ask for reviews.
    let ratings_token = token(&ca_dir, "spiffe://cluster.local/ns/default/sa/ratings");
    let err = client(&controller, &root, ratings_token, REVIEWS)
        .fetch()
        .await
        .unwrap_err();
    let CsrError::Refused(status) = err else {
        panic!("expected a refusal, got {err}")
    };
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status
            .message()
            .contains("caller proved spiffe://cluster.local/ns/default/sa/ratings"),
        "{status:?}"
    );

    // A forged token.
    let forged = token(&ca_dir, REVIEWS).replace("/sa/reviews", "/sa/admin");
    let err = client(&controller, &root, forged, "spiffe://cluster.local/ns/default/sa/admin")
        .fetch()
        .await
        .unwrap_err();
    assert!(
        matches!(&err, CsrError::Refused(s) if s.code() == tonic::Code::Unauthenticated),
        "{err}"
    );

    assert_eq!(
        controller.metric("isthmus_ca_csr_refusals_total", &[("reason", "identity_mismatch")]),
        Some(1.0)
    );
    assert_eq!(
        controller.metric("isthmus_ca_csr_refusals_total", &[("reason", "bad_credential")]),
        Some(1.0)
    );
    assert_eq!(controller.metric("citadel_server_csr_count", &[]), Some(2.0));
    assert_eq!(
        controller.metric("citadel_server_success_cert_issuance_count", &[]),
        Some(0.0)
    );

    // A CA the client does not trust: the TLS port is refused before any CSR is sent.
    let stranger = scratch("ca-refuse-stranger");
    let other = serve_with_ca(&dir.join("clusters"), &stranger);
    let err = client(&other, &root, token(&stranger, REVIEWS), REVIEWS)
        .fetch()
        .await
        .unwrap_err();
    assert!(matches!(err, CsrError::Connect { .. } | CsrError::Refused(_)), "{err}");
}

#[tokio::test]
async fn clusters_with_intermediates_from_one_root_trust_each_other() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dir = scratch("ca-mesh");
    two_networks(&dir.join("clusters"));
    let mesh = dir.join("mesh-ca");
    init_mesh(&mesh, "east,west");
    let root = mesh.join("root-cert.pem");
    let root_before = std::fs::read(&root).unwrap();

    let mut svids = Vec::new();
    for cluster in ["east", "west"] {
        let ca_dir = mesh.join(cluster);
        let controller = serve_with_ca(&dir.join("clusters"), &ca_dir);
        let svid = client(&controller, &root, token(&ca_dir, REVIEWS), REVIEWS)
            .fetch()
            .await
            .unwrap();
        svids.push(svid);
    }
    // Each SVID carries its cluster's intermediate; both verify against the shared root.
    for (svid, cluster) in svids.iter().zip(["east", "west"]) {
        let intermediate =
            rustls_pki_types::CertificateDer::from_pem_file(mesh.join(cluster).join("ca-cert.pem")).unwrap();
        assert_eq!(verify_against(svid, &[intermediate], &root).as_str(), REVIEWS);
    }
    // Running it again to add a cluster keeps the root and the existing clusters.
    let east_key = std::fs::read(mesh.join("east/ca-key.pem")).unwrap();
    init_mesh(&mesh, "east,west,north");
    assert_eq!(std::fs::read(&root).unwrap(), root_before);
    assert_eq!(std::fs::read(mesh.join("east/ca-key.pem")).unwrap(), east_key);
    assert!(mesh.join("north/cert-chain.pem").exists());
}

#[test]
fn a_half_plugged_ca_directory_is_refused_with_what_is_missing() {
    let dir = scratch("ca-partial");
    let ca_dir = dir.join("ca");
    std::fs::create_dir_all(&ca_dir).unwrap();
    support::write(ca_dir.join("ca-cert.pem"), "not really").unwrap();
    two_networks(&dir.join("clusters"));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_federation-controller"))
        .args([
            "serve",
            "--xds",
            "127.0.0.1:0",
            "--monitoring",
            "127.0.0.1:0",
            "--secure",
            "127.0.0.1:0",
        ])
        .args([
            "--manifests",
            dir.join("clusters").to_str().unwrap(),
            "--ca-dir",
            ca_dir.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("has ca-cert.pem but not ca-key.pem"), "{err}");
}

/// `ca init-mesh --out OUT --clusters CLUSTERS`, which must succeed.
fn init_mesh(out: &Path, clusters: &str) {
    let made = std::process::Command::new(env!("CARGO_BIN_EXE_federation-controller"))
        .args([
            "ca",
            "init-mesh",
            "--out",
            out.to_str().unwrap(),
            "--clusters",
            clusters,
        ])
        .output()
        .unwrap();
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
}

#[tokio::test]
async fn during_a_root_rotation_both_roots_are_trusted_and_each_cluster_signs_under_its_own() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dir = scratch("ca-rotate");
    two_networks(&dir.join("clusters"));
    let (old, new) = (dir.join("old-root"), dir.join("new-root"));
    init_mesh(&old, "east,west");
    init_mesh(&new, "west");
    // The middle of a rotation: every cluster's root-cert.pem holds both roots; east still
    // signs with its intermediate from the old root, west already with one from the new.
    let both = [old.join("root-cert.pem"), new.join("root-cert.pem")]
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect::<String>();
    let both_file = dir.join("both-roots.pem");
    support::write(&both_file, &both).unwrap();
    let (east, west) = (old.join("east"), new.join("west"));
    for ca_dir in [&east, &west] {
        support::write(ca_dir.join("root-cert.pem"), &both).unwrap();
    }

    for (ca_dir, own_root) in [(&east, old.join("root-cert.pem")), (&west, new.join("root-cert.pem"))] {
        let controller = serve_with_ca(&dir.join("clusters"), ca_dir);
        let svid = client(&controller, &both_file, token(ca_dir, REVIEWS), REVIEWS)
            .fetch()
            .await
            .unwrap();
        // Its chain ends at the root that issued its cluster's intermediate, and verifies
        // against that root alone.
        let intermediate = rustls_pki_types::CertificateDer::from_pem_file(ca_dir.join("ca-cert.pem")).unwrap();
        assert_eq!(verify_against(&svid, &[intermediate], &own_root).as_str(), REVIEWS);

        // What the controller's sidecars are told to trust, over SDS: both roots, so east's
        // and west's workloads accept each other throughout the rotation.
        let bundles = TrustBundles::new();
        let source = sidecar::tls::sds::BundleSource {
            address: format!("https://{}", controller.secure.unwrap()),
            server_name: "istiod.istio-system.svc".into(),
            roots_pem: both.clone().into_bytes(),
            node: envoy_types::pb::envoy::config::core::v3::Node {
                id: "sidecar~10.0.0.9~reviews.default~default.svc.cluster.local".into(),
                ..Default::default()
            },
            keep: vec![],
        };
        let follow = tokio::spawn(sidecar::tls::sds::follow(source, bundles.clone(), |_| {}));
        let roots = support::until("no trust bundle over SDS", Duration::from_secs(20), || {
            bundles.for_domain("cluster.local").map(|b| b.roots().len())
        })
        .await;
        follow.abort();
        assert_eq!(roots, 2, "{} serves one root of the two", ca_dir.display());
    }
}
