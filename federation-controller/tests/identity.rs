//! Identity end to end, sidecars and controllers over real sockets:
//! - SVID rotation under steady load: two sidecars get short-lived SVIDs from the
//!   controller's CA and renew them at half-life while requests flow; not one request
//!   fails, new connections present the new certificates, and a connection opened before
//!   the rotations keeps working after them.
//! - Federated trust: two trust domains that fetch each other's bundles from their bundle
//!   endpoints call each other; a third, not federated, is refused.
//! - A federated bundle endpoint that goes away: the last fetched bundle is kept (not the
//!   bootstrap one), the failed fetches are counted, calls across still verify, and
//!   fetching resumes when the endpoint returns.

mod support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use sidecar::run::{RunArgs, Sidecar};
use support::{Controller, free_port, scratch, two_networks};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

fn args(line: &str) -> RunArgs {
    RunArgs::from_words(line.split_whitespace()).unwrap()
}

/// A keep-alive HTTP/1.1 application answering each GET with the XFCC header it got.
async fn app() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (r, mut w) = stream.into_split();
                let mut r = BufReader::new(r);
                loop {
                    let mut xfcc = String::from("-");
                    let mut line = String::new();
                    loop {
                        line.clear();
                        if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                        if let Some((name, value)) = line.split_once(':')
                            && name.eq_ignore_ascii_case("x-forwarded-client-cert")
                        {
                            xfcc = value.trim().to_owned();
                        }
                    }
                    let reply = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{xfcc}", xfcc.len());
                    if w.write_all(reply.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// One GET on an open keep-alive connection; returns the body.
async fn get_on(s: &mut BufReader<TcpStream>) -> std::io::Result<String> {
    s.get_mut()
        .write_all(b"GET / HTTP/1.1\r\nhost: reviews\r\n\r\n")
        .await?;
    let mut status = String::new();
    s.read_line(&mut status).await?;
    if !status.starts_with("HTTP/1.1 200") {
        return Err(std::io::Error::other(format!("status {status:?}")));
    }
    let mut len = 0;
    loop {
        let mut line = String::new();
        if s.read_line(&mut line).await? == 0 {
            return Err(std::io::Error::other("closed mid-answer"));
        }
        if line == "\r\n" {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap();
        }
    }
    let mut body = vec![0; len];
    s.read_exact(&mut body).await?;
    Ok(String::from_utf8(body).unwrap())
}

async fn get(addr: SocketAddr) -> std::io::Result<String> {
    let mut s = BufReader::new(TcpStream::connect(addr).await?);
    tokio::time::timeout(Duration::from_secs(5), get_on(&mut s)).await?
}

fn renewals(metrics: SocketAddr) -> f64 {
    metric_value(metrics, "isthmus_sidecar_svid_renewals_total ").unwrap_or(0.0)
}

fn token(ca_dir: &std::path::Path, identity: &str, out: &std::path::Path) {
    support::write(out, support::ca_token(ca_dir, identity)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_under_load_fails_no_request() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dir = scratch("rotation");
    two_networks(&dir.join("clusters"));
    let ca_dir = dir.join("ca");
    let controller = Controller::start(&[
        "--manifests",
        dir.join("clusters").to_str().unwrap(),
        "--ca-dir",
        ca_dir.to_str().unwrap(),
        "--secure",
        "127.0.0.1:0",
    ]);
    let secure = controller.secure.unwrap();
    let root = ca_dir.join("root-cert.pem");
    token(
        &ca_dir,
        "spiffe://cluster.local/ns/default/sa/reviews",
        &dir.join("reviews.token"),
    );
    token(
        &ca_dir,
        "spiffe://cluster.local/ns/default/sa/productpage",
        &dir.join("productpage.token"),
    );
    let common = |sa: &str| {
        format!(
            "--ca-address https://{secure} --token-file {} --identity spiffe://cluster.local/ns/default/sa/{sa} \
             --ca {} --svid-ttl 4s --protocol http --metrics 127.0.0.1:0",
            dir.join(format!("{sa}.token")).display(),
            root.display()
        )
    };
    let app = app().await;
    let server = Sidecar::start(args(&format!("--inbound 127.0.0.1:0={app} {}", common("reviews")))).unwrap();
    let client = Sidecar::start(args(&format!(
        "--outbound 127.0.0.1:0={} --peer-id spiffe://cluster.local/ns/default/sa/reviews {}",
        server.bound.inbound.unwrap(),
        common("productpage")
    )))
    .unwrap();
    let out = client.bound.outbound.unwrap();

    // A connection opened before any rotation.
    let mut early = BufReader::new(TcpStream::connect(out).await.unwrap());
    let first = get_on(&mut early).await.unwrap();
    assert!(
        first.ends_with("URI=spiffe://cluster.local/ns/default/sa/productpage"),
        "{first}"
    );

    // Steady load until both sides have renewed at least three times (bounded).
    let (cm, sm) = (client.bound.metrics.unwrap(), server.bound.metrics.unwrap());
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut sent, mut failed) = (0u32, Vec::new());
    let mut client_certs = BTreeSet::new();
    // Steady: one request every 5 ms, however long each takes.
    let mut pace = tokio::time::interval(Duration::from_millis(5));
    while (renewals(cm) < 3.0 || renewals(sm) < 3.0) && Instant::now() < deadline && sent < 20_000 {
        pace.tick().await;
        sent += 1;
        match get(out).await {
            Ok(xfcc) => {
                let hash = xfcc
                    .split(';')
                    .find_map(|p| p.strip_prefix("Hash="))
                    .unwrap_or("")
                    .to_owned();
                client_certs.insert(hash);
            }
            Err(e) => failed.push(e.to_string()),
        }
    }
    eprintln!(
        "{sent} requests across {} client SVIDs, {} failed",
        client_certs.len(),
        failed.len()
    );
    assert!(
        renewals(cm) >= 3.0 && renewals(sm) >= 3.0,
        "SVIDs were not renewed in time"
    );
    assert!(
        failed.is_empty(),
        "{} of {sent} requests failed during rotation: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(
        client_certs.len() >= 3,
        "new connections must present the renewed SVIDs: {client_certs:?}"
    );
    // The application's connection from before the rotations still carries requests; the
    // sidecar sends them over the pooled connection of today's SVID, so the server sees the
    // renewed certificate, not the first one.
    let last = get_on(&mut early).await.unwrap();
    assert!(
        last.ends_with("URI=spiffe://cluster.local/ns/default/sa/productpage"),
        "{last}"
    );
    assert_ne!(last, first, "requests after a rotation present the renewed SVID");
}

/// A trust domain: its CA (made up front, so its root is known before any controller
/// starts) and, once started, its controller.
struct Domain {
    name: &'static str,
    ca_dir: std::path::PathBuf,
    bundle_port: u16,
}

impl Domain {
    fn new(dir: &std::path::Path, name: &'static str) -> Domain {
        let out = dir.join(name);
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_federation-controller"))
            .args([
                "ca",
                "init-mesh",
                "--out",
                out.to_str().unwrap(),
                "--trust-domain",
                name,
                "--clusters",
                "main",
            ])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        Domain {
            name,
            ca_dir: out.join("main"),
            bundle_port: free_port(),
        }
    }

    fn root(&self) -> std::path::PathBuf {
        self.ca_dir.join("root-cert.pem")
    }

    /// A FederatedTrustDomain manifest pointing at this domain's bundle endpoint.
    fn federation_manifest(&self) -> String {
        let pem = std::fs::read_to_string(self.root()).unwrap();
        let indented: String = pem.lines().map(|l| format!("    {l}\n")).collect();
        format!(
            "apiVersion: isthmus.io/v1alpha1\nkind: FederatedTrustDomain\nmetadata:\n  name: {n}\nspec:\n  \
             trustDomain: {n}\n  bundleEndpointURL: https://127.0.0.1:{p}/\n  bundleEndpointProfile:\n    \
             type: https_spiffe\n    endpointSPIFFEID: spiffe://{n}/ns/istio-system/sa/istiod\n  \
             trustDomainBundle: |\n{indented}",
            n = self.name,
            p = self.bundle_port
        )
    }

    fn start(&self, clusters: &std::path::Path, federate_with: &[&Domain], scratch: &std::path::Path) -> Controller {
        let docs: Vec<String> = federate_with.iter().map(|d| d.federation_manifest()).collect();
        self.start_with(clusters, &docs.join("---\n"), scratch)
    }

    /// Starts this domain's controller with `federation` as its FederatedTrustDomain file
    /// (none when empty).
    fn start_with(&self, clusters: &std::path::Path, federation: &str, scratch: &std::path::Path) -> Controller {
        let file = scratch.join(format!("{}-federation.yaml", self.name));
        support::write(&file, federation).unwrap();
        let bundle = format!("127.0.0.1:{}", self.bundle_port);
        let mut args = vec![
            "--manifests",
            clusters.to_str().unwrap(),
            "--ca-dir",
            self.ca_dir.to_str().unwrap(),
            "--trust-domain",
            self.name,
            "--secure",
            "127.0.0.1:0",
            "--bundle-endpoint",
            &bundle,
            "--bundle-refresh-hint",
            "1s",
        ];
        if !federation.is_empty() {
            args.extend(["--federation", file.to_str().unwrap()]);
        }
        Controller::start(&args)
    }

    /// Sidecar arguments for workload `sa` of this domain, SVID from `controller`.
    fn sidecar_args(&self, controller: &Controller, sa: &str, scratch: &std::path::Path) -> String {
        let token_file = scratch.join(format!("{}-{sa}.token", self.name));
        token(
            &self.ca_dir,
            &format!("spiffe://{}/ns/default/sa/{sa}", self.name),
            &token_file,
        );
        let secure = controller.secure.unwrap();
        format!(
            "--ca-address https://{secure} --bundles-from https://{secure} --token-file {} \
             --identity spiffe://{}/ns/default/sa/{sa} --ca {} --protocol http --metrics 127.0.0.1:0",
            token_file.display(),
            self.name,
            self.root().display()
        )
    }
}

fn metric_value(metrics: SocketAddr, prefix: &str) -> Option<f64> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(metrics).ok()?;
    write!(
        s,
        "GET /stats/prometheus HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .and_then(|v| v.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federated_trust_domains_call_each_other_and_a_stranger_is_refused() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dir = scratch("federated");
    two_networks(&dir.join("clusters"));
    let clusters = dir.join("clusters");
    let (alpha, beta, gamma) = (
        Domain::new(&dir, "alpha.td"),
        Domain::new(&dir, "beta.td"),
        Domain::new(&dir, "gamma.td"),
    );
    let alpha_c = alpha.start(&clusters, &[&beta], &dir);
    let beta_c = beta.start(&clusters, &[&alpha], &dir);
    let gamma_c = gamma.start(&clusters, &[], &dir);

    // Each federated controller has fetched the other's bundle from its endpoint.
    for (c, td) in [(&alpha_c, "beta.td"), (&beta_c, "alpha.td")] {
        let fetched = || {
            c.metric(
                "isthmus_trust_bundle_last_fetch_timestamp_seconds",
                &[("trust_domain", td)],
            )
            .is_some()
        };
        support::until_true(
            &format!("no bundle fetched from {td}"),
            Duration::from_secs(20),
            fetched,
        )
        .await;
    }

    let app = app().await;
    let server = Sidecar::start(args(&format!(
        "--inbound 127.0.0.1:0={app} {}",
        beta.sidecar_args(&beta_c, "reviews", &dir)
    )))
    .unwrap();
    let inbound = server.bound.inbound.unwrap();
    let alpha_client = Sidecar::start(args(&format!(
        "--outbound 127.0.0.1:0={inbound} --peer-id spiffe://beta.td/ns/default/sa/reviews {}",
        alpha.sidecar_args(&alpha_c, "productpage", &dir)
    )))
    .unwrap();
    // Bundles reach both sidecars over SDS (their own and the federated domain's).
    for m in [server.bound.metrics.unwrap(), alpha_client.bound.metrics.unwrap()] {
        support::until_true("no bundles over SDS", Duration::from_secs(20), || {
            metric_value(m, "isthmus_sidecar_trust_bundle_updates_total ").unwrap_or(0.0) >= 1.0
        })
        .await;
    }
    assert_eq!(alpha_client.bundles.trust_domains(), ["alpha.td", "beta.td"]);
    let xfcc = get(alpha_client.bound.outbound.unwrap()).await.unwrap();
    assert!(
        xfcc.ends_with("URI=spiffe://alpha.td/ns/default/sa/productpage"),
        "{xfcc}"
    );
    assert!(xfcc.starts_with("By=spiffe://beta.td/ns/default/sa/reviews"), "{xfcc}");

    // gamma.td is not federated with beta.td: even a gamma client that trusts beta's root
    // (given by hand) is refused by the server, because beta has no bundle for gamma.
    let gamma_args = gamma.sidecar_args(&gamma_c, "productpage", &dir);
    let gamma_client = Sidecar::start(args(&format!(
        "--outbound 127.0.0.1:0={inbound} --bundle beta.td={} {}",
        beta.root().display(),
        gamma_args.replace(&format!("--bundles-from https://{}", gamma_c.secure.unwrap()), "")
    )))
    .unwrap();
    assert!(
        get(gamma_client.bound.outbound.unwrap()).await.is_err(),
        "gamma.td must be refused"
    );
    let refused = r#"isthmus_sidecar_refused_connections_total{reason="untrusted_trust_domain",side="inbound"} "#;
    support::until_true(
        "the refusal was not counted under untrusted_trust_domain",
        Duration::from_secs(10),
        || metric_value(server.bound.metrics.unwrap(), refused).is_some(),
    )
    .await;
}

/// The sum of `metric{labels}` on `controller`, 0 when absent.
fn count(controller: &Controller, metric: &str, labels: &[(&str, &str)]) -> f64 {
    controller.metric(metric, labels).unwrap_or(0.0)
}

/// The certificates `sidecar` trusts for `td`, DER.
fn roots_of(sidecar: &Sidecar, td: &str) -> Vec<Vec<u8>> {
    sidecar
        .bundles
        .for_domain(td)
        .map(|b| b.roots().iter().map(|c| c.to_vec()).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_federated_bundle_endpoint_that_goes_away_keeps_the_last_bundle_and_is_reported() {
    use rustls_pki_types::pem::PemObject;
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dir = scratch("federation-outage");
    two_networks(&dir.join("clusters"));
    let clusters = dir.join("clusters");
    let (alpha, beta) = (Domain::new(&dir, "alpha.td"), Domain::new(&dir, "beta.td"));
    // beta's bootstrap bundle for alpha holds alpha's root and a decoy: once alpha's
    // endpoint has answered, beta trusts alpha's root alone, so a fallback to the
    // bootstrap bundle during the outage would show.
    let decoy = {
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.self_signed(&rcgen::KeyPair::generate().unwrap()).unwrap().pem()
    };
    let indented: String = decoy.lines().map(|l| format!("    {l}\n")).collect();
    let beta_federation = format!("{}{indented}", alpha.federation_manifest());
    let mut alpha_c = alpha.start(&clusters, &[&beta], &dir);
    let beta_c = beta.start_with(&clusters, &beta_federation, &dir);
    let fetched = "isthmus_trust_bundle_last_fetch_timestamp_seconds";
    let failures = "isthmus_trust_bundle_fetch_failures_total";
    let alpha_td = [("trust_domain", "alpha.td")];
    support::until_true("the bundles were not fetched", Duration::from_secs(20), || {
        beta_c.metric(fetched, &alpha_td).is_some() && alpha_c.metric(fetched, &[("trust_domain", "beta.td")]).is_some()
    })
    .await;

    // Before the outage: a beta server, and two alpha clients with SVIDs and bundles from
    // alpha's controller. The second calls a beta server that starts only during the outage.
    let app = app().await;
    let late_port = free_port();
    let server = Sidecar::start(args(&format!(
        "--inbound 127.0.0.1:0={app} {}",
        beta.sidecar_args(&beta_c, "reviews", &dir)
    )))
    .unwrap();
    let client = |target: String, sa: &str| {
        Sidecar::start(args(&format!(
            "--outbound 127.0.0.1:0={target} --peer-id spiffe://beta.td/ns/default/sa/{sa} {}",
            alpha.sidecar_args(&alpha_c, "productpage", &dir)
        )))
        .unwrap()
    };
    let early_client = client(server.bound.inbound.unwrap().to_string(), "reviews");
    let late_client = client(format!("127.0.0.1:{late_port}"), "ratings");
    let alpha_root = rustls_pki_types::CertificateDer::from_pem_file(alpha.root())
        .unwrap()
        .to_vec();
    support::until_true(
        "bundles did not reach the sidecars over SDS",
        Duration::from_secs(20),
        || {
            roots_of(&server, "alpha.td") == [alpha_root.clone()]
                && !roots_of(&early_client, "beta.td").is_empty()
                && !roots_of(&late_client, "beta.td").is_empty()
        },
    )
    .await;
    let xfcc = get(early_client.bound.outbound.unwrap()).await.unwrap();
    assert!(
        xfcc.ends_with("URI=spiffe://alpha.td/ns/default/sa/productpage"),
        "{xfcc}"
    );

    // alpha's controller — CA, SDS and bundle endpoint — goes away.
    let last_fetch = beta_c.metric(fetched, &alpha_td).unwrap();
    let before = count(&beta_c, failures, &alpha_td);
    alpha_c
        .terminate(Duration::from_secs(5))
        .expect("alpha's controller exits");
    support::until_true(
        "failed fetches of alpha.td's bundle are not counted",
        Duration::from_secs(20),
        || count(&beta_c, failures, &alpha_td) >= before + 2.0,
    )
    .await;
    assert!(
        count(
            &beta_c,
            failures,
            &[("trust_domain", "alpha.td"), ("reason", "connect")]
        ) >= 2.0,
        "an endpoint that is gone fails at connect"
    );
    assert_eq!(
        beta_c.metric(fetched, &alpha_td),
        Some(last_fetch),
        "no fetch succeeded while alpha was away"
    );

    // Calls across still verify with the last bundle: on an open path…
    let xfcc = get(early_client.bound.outbound.unwrap()).await.unwrap();
    assert!(
        xfcc.ends_with("URI=spiffe://alpha.td/ns/default/sa/productpage"),
        "{xfcc}"
    );
    // …and from a beta sidecar that never saw alpha's endpoint: beta's controller serves it
    // the last fetched bundle of alpha.td (alpha's root alone, not the bootstrap's two).
    let late = Sidecar::start(args(&format!(
        "--inbound 127.0.0.1:{late_port}={app} {}",
        beta.sidecar_args(&beta_c, "ratings", &dir)
    )))
    .unwrap();
    support::until_true(
        "beta's controller no longer serves alpha.td's bundle",
        Duration::from_secs(20),
        || !roots_of(&late, "alpha.td").is_empty(),
    )
    .await;
    let served = roots_of(&late, "alpha.td");
    assert!(
        served == [alpha_root.clone()],
        "beta serves {} root(s) for alpha.td, not alpha's fetched root alone",
        served.len()
    );
    let xfcc = get(late_client.bound.outbound.unwrap()).await.unwrap();
    assert!(xfcc.starts_with("By=spiffe://beta.td/ns/default/sa/ratings"), "{xfcc}");
    assert!(
        xfcc.ends_with("URI=spiffe://alpha.td/ns/default/sa/productpage"),
        "{xfcc}"
    );

    // alpha's endpoint returns on its address: beta fetches from it again.
    let _alpha_again = alpha.start(&clusters, &[&beta], &dir);
    support::until_true(
        "beta did not fetch alpha.td's bundle again",
        Duration::from_secs(40),
        || beta_c.metric(fetched, &alpha_td).unwrap_or(0.0) > last_fetch,
    )
    .await;
}
