//! The CA in Kubernetes mode: a caller proves its identity with a service-account token
//! that the controller sends in a `TokenReview` to the API server of the caller's cluster
//! (the test API server, reached through a kubeconfig by the real kube client). Tokens
//! for another identity, no service account, the wrong audience or an unknown cluster are
//! refused and counted by reason; an API server that is down or slow makes the CA
//! unavailable rather than the caller unauthenticated; bootstrap tokens still work.

mod support;

use std::path::Path;

use mesh_vocab::SpiffeId;
use mesh_vocab::ca_protocol::{CREATE_CERTIFICATE, IstioCertificateRequest, IstioCertificateResponse};
use rustls_pki_types::pem::PemObject;
use sidecar::tls::bundle::Bundle;
use sidecar::tls::csr::{CaClient, CsrError};
use sidecar::tls::{TrustBundles, peer_identity};
use support::kube_api::{FakeApi, remote_secret};
use support::{Controller, scratch};

const REVIEWS: &str = "spiffe://cluster.local/ns/default/sa/reviews";
const RATINGS: &str = "spiffe://cluster.local/ns/default/sa/ratings";
const REFUSALS: &str = "isthmus_ca_csr_refusals_total";

/// Writes `api`'s kubeconfig into `dir` and returns its path.
fn kubeconfig(dir: &Path, name: &str, api: &FakeApi) -> String {
    let path = dir.join(format!("{name}.kubeconfig"));
    support::write(&path, api.kubeconfig()).unwrap();
    path.to_str().unwrap().to_owned()
}

/// The controller reading `clusters` (CLUSTER=KUBECONFIG), with its CA in `ca_dir`.
fn serve(ca_dir: &Path, clusters: &[String], extra: &[&str]) -> Controller {
    let mut args: Vec<&str> = Vec::new();
    for c in clusters {
        args.extend(["--kubeconfig", c.as_str()]);
    }
    args.extend(["--ca-dir", ca_dir.to_str().unwrap(), "--secure", "127.0.0.1:0"]);
    args.extend(extra);
    Controller::start(&args)
}

/// Istio's `CreateCertificate`, as istio-agent sends it: `authorization: Bearer TOKEN`,
/// and `clusterid: CLUSTER` when given; the CSR's only SAN is `identity`.
async fn create_certificate(
    controller: &Controller,
    ca_dir: &Path,
    token: &str,
    identity: &str,
    cluster: Option<&str>,
) -> Result<Vec<String>, tonic::Status> {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = vec![rcgen::SanType::URI(identity.try_into().unwrap())];
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();
    let roots = std::fs::read(ca_dir.join("root-cert.pem")).unwrap();
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(roots))
        .domain_name("istiod.istio-system.svc");
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{}", controller.secure.unwrap()))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut request = tonic::Request::new(IstioCertificateRequest {
        csr,
        validity_duration: 0,
    });
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    if let Some(c) = cluster {
        request.metadata_mut().insert("clusterid", c.parse().unwrap());
    }
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let codec = tonic_prost::ProstCodec::<IstioCertificateRequest, IstioCertificateResponse>::default();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(CREATE_CERTIFICATE);
    Ok(grpc.unary(request, path, codec).await?.into_inner().cert_chain)
}

/// The SPIFFE ID of the leaf of `chain`, verified against the CA's root.
fn verified_id(chain: &[String], ca_dir: &Path) -> String {
    let leaf = rustls_pki_types::CertificateDer::from_pem_slice(chain[0].as_bytes()).unwrap();
    let bundles = TrustBundles::new();
    let root = std::fs::read(ca_dir.join("root-cert.pem")).unwrap();
    bundles.set("cluster.local", Bundle::from_pem("cluster.local", &root).unwrap());
    peer_identity(
        &leaf,
        &[],
        &bundles,
        rustls_pki_types::UnixTime::now(),
        webpki::KeyUsage::client_auth(),
    )
    .expect("the SVID verifies against the CA's root")
    .to_string()
}

fn refused(result: Result<Vec<String>, tonic::Status>) -> tonic::Status {
    match result {
        Ok(_) => panic!("expected a refusal, got an SVID"),
        Err(status) => status,
    }
}

#[tokio::test]
async fn a_service_account_token_proves_exactly_its_own_identity() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dir = scratch("token-review");
    let api = FakeApi::start().await;
    api.add_service_account_token("reviews-token", "default", "reviews", &["istio-ca"]);
    api.add_service_account_token("vault-token", "default", "reviews", &["vault"]);
    api.add_audience_unaware_token("careless-token", "default", "reviews", &["vault"]);
    api.add_user_token("alice-token", "alice", &["istio-ca"]);
    let ca_dir = dir.join("ca");
    let controller = serve(&ca_dir, &[format!("c1={}", kubeconfig(&dir, "c1", &api))], &[]);

    // The sidecar's own client, naming no cluster: reviewed by the own cluster (c1).
    let sidecar = CaClient {
        address: format!("https://{}", controller.secure.unwrap()),
        server_name: "istiod.istio-system.svc".into(),
        roots_pem: std::fs::read(ca_dir.join("root-cert.pem")).unwrap(),
        token: "reviews-token".into(),
        identity: SpiffeId::parse(REVIEWS).unwrap(),
        ttl: None,
        cluster: None,
    };
    let svid = sidecar.fetch().await.unwrap();
    assert_eq!(svid.id().as_str(), REVIEWS);
    assert_eq!(api.token_reviews(), 1);
    // Its cluster named, as istio-agent does.
    let chain = create_certificate(&controller, &ca_dir, "reviews-token", REVIEWS, Some("c1"))
        .await
        .unwrap();
    assert_eq!(verified_id(&chain, &ca_dir), REVIEWS);
    assert_eq!(api.token_reviews(), 1, "a recent successful review is remembered");

    // The same token asking for another identity.
    let mut ratings = sidecar.clone();
    ratings.identity = SpiffeId::parse(RATINGS).unwrap();
    let err = ratings.fetch().await.unwrap_err();
    let CsrError::Refused(status) = err else {
        panic!("expected a refusal, got {err}")
    };
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status
            .message()
            .contains("caller proved spiffe://cluster.local/ns/default/sa/reviews"),
        "{status:?}"
    );

    // Tokens that prove nothing we accept, each counted under its own reason.
    let cases = [
        ("no-such-token", "token_review_denied", "invalid bearer token"),
        // A real API server checks the audience itself and denies.
        ("vault-token", "token_review_denied", "invalid for the target audiences"),
        // One that does not, and says which audience it accepted the token for.
        ("careless-token", "wrong_audience", "not for this CA's audiences"),
        ("alice-token", "not_a_service_account", "\"alice\""),
    ];
    for (token, reason, message) in cases {
        let before = controller.metric(REFUSALS, &[("reason", reason)]).unwrap_or(0.0);
        let status = refused(create_certificate(&controller, &ca_dir, token, REVIEWS, None).await);
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{token}: {status:?}");
        assert!(status.message().contains(message), "{token}: {status:?}");
        assert_eq!(
            controller.metric(REFUSALS, &[("reason", reason)]),
            Some(before + 1.0),
            "{token}"
        );
    }
    let status = refused(create_certificate(&controller, &ca_dir, "reviews-token", REVIEWS, Some("c9")).await);
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    assert!(status.message().contains("\"c9\""), "{status:?}");
    assert_eq!(
        api.token_reviews(),
        5,
        "refused tokens are reviewed each time; c9 never"
    );

    for (reason, n) in [
        ("identity_mismatch", 1.0),
        ("token_review_denied", 2.0),
        ("wrong_audience", 1.0),
        ("not_a_service_account", 1.0),
        ("unknown_cluster", 1.0),
    ] {
        assert_eq!(controller.metric(REFUSALS, &[("reason", reason)]), Some(n), "{reason}");
    }

    // Lab bootstrap tokens keep working beside TokenReview, without asking the API server.
    let bootstrap = support::ca_token(&ca_dir, RATINGS);
    let chain = create_certificate(&controller, &ca_dir, &bootstrap, RATINGS, None)
        .await
        .unwrap();
    assert_eq!(verified_id(&chain, &ca_dir), RATINGS);
    assert_eq!(api.token_reviews(), 5);
    assert_eq!(
        controller.metric("citadel_server_success_cert_issuance_count", &[]),
        Some(3.0)
    );
    assert_eq!(controller.metric("citadel_server_csr_count", &[]), Some(9.0));
}

#[tokio::test]
async fn an_api_server_that_is_down_or_slow_makes_the_ca_unavailable_not_the_caller_unauthenticated() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dir = scratch("token-review-down");
    let api = FakeApi::start().await;
    api.add_service_account_token("reviews-token", "default", "reviews", &["istio-ca"]);
    api.add_service_account_token("ratings-token", "default", "ratings", &["istio-ca"]);
    // c2's API server: a port nothing listens on any more.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let dead_config = dir.join("c2.kubeconfig");
    support::write(
        &dead_config,
        api.kubeconfig().replace(&api.addr.to_string(), &dead.to_string()),
    )
    .unwrap();
    let ca_dir = dir.join("ca");
    let controller = serve(
        &ca_dir,
        &[
            format!("c1={}", kubeconfig(&dir, "c1", &api)),
            format!("c2={}", dead_config.display()),
        ],
        &["--token-review-timeout", "300ms"],
    );

    let status = refused(create_certificate(&controller, &ca_dir, "reviews-token", REVIEWS, Some("c2")).await);
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains("cluster c2"), "{status:?}");

    // c1's API server hangs: the review is abandoned at the timeout.
    api.stall_token_reviews(true);
    let status = refused(create_certificate(&controller, &ca_dir, "ratings-token", RATINGS, None).await);
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains("no answer within"), "{status:?}");
    assert_eq!(
        controller.metric(REFUSALS, &[("reason", "token_review_failed")]),
        Some(2.0)
    );

    // Back again: the same token now works, so the failure was not remembered as a denial.
    api.stall_token_reviews(false);
    let chain = create_certificate(&controller, &ca_dir, "ratings-token", RATINGS, None)
        .await
        .unwrap();
    assert_eq!(verified_id(&chain, &ca_dir), RATINGS);
    // The first cluster given is the own one; a caller naming none is reviewed there.
    let chain = create_certificate(&controller, &ca_dir, "reviews-token", REVIEWS, None)
        .await
        .unwrap();
    assert_eq!(verified_id(&chain, &ca_dir), REVIEWS);
}

#[tokio::test]
async fn a_remote_secrets_cluster_reviews_its_own_pods_tokens_from_when_the_secret_comes_until_it_goes() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dir = scratch("token-review-remote");
    let primary = FakeApi::start().await;
    let remote = FakeApi::start().await;
    // The remote cluster's own API server is the only one that knows its pods' tokens.
    remote.add_service_account_token("remote-reviews-token", "default", "reviews", &["istio-ca"]);
    let ca_dir = dir.join("ca");
    let controller = serve(
        &ca_dir,
        &[format!("primary={}", kubeconfig(&dir, "primary", &primary))],
        &["--remote-secrets-from", "primary"],
    );
    let ask = || create_certificate(&controller, &ca_dir, "remote-reviews-token", REVIEWS, Some("remote"));
    let status = refused(ask().await);
    assert!(status.message().contains("\"remote\""), "before its secret: {status:?}");

    // `istioctl create-remote-secret` output applied to the primary: no restart.
    primary.apply(remote_secret("istio-remote-secret-remote", &[("remote", &remote)]));
    let chain = support::until_ok(
        "the remote cluster's token reviewed",
        std::time::Duration::from_secs(20),
        ask,
    )
    .await;
    assert_eq!(verified_id(&chain, &ca_dir), REVIEWS);
    assert_eq!(remote.token_reviews(), 1, "reviewed by the remote cluster's API server");
    assert_eq!(primary.token_reviews(), 0);

    // The secret deleted: the cluster's tokens prove nothing any more, cached or not.
    primary.delete("Secret", "istio-system", "istio-remote-secret-remote");
    let status = support::until_ok(
        "the remote cluster forgotten",
        std::time::Duration::from_secs(20),
        || async {
            match ask().await {
                Ok(_) => Err(()),
                Err(status) => Ok(status),
            }
        },
    )
    .await;
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    assert!(status.message().contains("\"remote\""), "{status:?}");
}
