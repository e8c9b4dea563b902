//! The mesh hop end to end over real sockets: application → outbound sidecar → mTLS →
//! inbound sidecar → application, with certificates made at test time, and the inbound
//! side's PeerAuthentication modes as a caller sees them.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use sidecar::run::{RunArgs, Sidecar};
use support::scrape as metrics;
use support::{Pki, exchange, poll};

fn args(line: &str) -> RunArgs {
    RunArgs::from_words(line.split_whitespace()).unwrap()
}

fn p(path: &Path) -> String {
    path.display().to_string()
}

/// An HTTP/1.1 application that answers each request with the `x-forwarded-client-cert`
/// header it received (or `-`), so a test sees what the inbound side vouched for.
async fn http_app() -> SocketAddr {
    support::http_app(support::xfcc_seen).await.0
}

/// One HTTP/1.1 GET with an optional forged XFCC; returns the body of a 200.
async fn get(addr: SocketAddr, forged_xfcc: Option<&str>) -> std::io::Result<String> {
    let extra = forged_xfcc
        .map(|v| format!("\r\nx-forwarded-client-cert: {v}"))
        .unwrap_or_default();
    let answer = exchange(addr, &format!("GET / HTTP/1.1\r\nhost: reviews{extra}")).await?;
    match answer.status {
        200 => Ok(answer.body),
        _ => Err(std::io::Error::other(answer.head)),
    }
}

/// Polls the metrics until `line` (a metric with labels) shows `value`, or fails at a deadline.
async fn wait_metric(addr: SocketAddr, needle: &str) {
    poll(Duration::from_secs(10), || async {
        let text = metrics(addr).await;
        match text.lines().any(|l| l.contains(needle)) {
            true => Ok(()),
            false => Err(format!("metric {needle:?} never appeared in\n{text}")),
        }
    })
    .await
}

struct Pair {
    client: Sidecar,
    server: Sidecar,
}

impl Pair {
    async fn start(pki: &Pki, app: SocketAddr, server_extra: &str) -> Pair {
        let (cc, ck) = pki.svid("cluster.local", "productpage");
        let (sc, sk) = pki.svid("cluster.local", "reviews");
        let server = Sidecar::start(args(&format!(
            "--inbound 127.0.0.1:0={app} --cert {} --key {} --ca {} --protocol http --metrics 127.0.0.1:0 {server_extra}",
            p(&sc),
            p(&sk),
            p(&pki.ca())
        )))
        .unwrap();
        let client = Sidecar::start(args(&format!(
            "--outbound 127.0.0.1:0={} --peer-id spiffe://cluster.local/ns/default/sa/reviews --cert {} --key {} --ca {} --protocol http --metrics 127.0.0.1:0",
            server.bound.inbound.unwrap(),
            p(&cc),
            p(&ck),
            p(&pki.ca())
        )))
        .unwrap();
        Pair { client, server }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_mtls_carries_the_callers_spiffe_id_and_replaces_a_forged_one() {
    let pki = Pki::new("hop", "strict");
    let app = http_app().await;
    let pair = Pair::start(&pki, app, "--mtls STRICT").await;
    let out = pair.client.bound.outbound.unwrap();
    let body = get(
        out,
        Some("By=spiffe://evil/x;URI=spiffe://cluster.local/ns/default/sa/admin"),
    )
    .await
    .unwrap();
    assert!(
        body.starts_with("By=spiffe://cluster.local/ns/default/sa/reviews;Hash="),
        "{body}"
    );
    assert!(
        body.ends_with(";URI=spiffe://cluster.local/ns/default/sa/productpage"),
        "{body}"
    );
    assert!(
        !body.contains("admin") && !body.contains(" | "),
        "the forged header must be gone: {body}"
    );

    // Plaintext straight to the inbound side is refused and counted.
    let inbound = pair.server.bound.inbound.unwrap();
    assert!(get(inbound, None).await.is_err(), "STRICT must refuse plaintext");
    let server_metrics = pair.server.bound.metrics.unwrap();
    wait_metric(
        server_metrics,
        r#"isthmus_sidecar_refused_connections_total{reason="plaintext",side="inbound"} 1"#,
    )
    .await;
    // Both reporters count the connection honestly.
    wait_metric(server_metrics, r#"connection_security_policy="mutual_tls",destination_cluster="Kubernetes",destination_principal="spiffe://cluster.local/ns/default/sa/reviews""#).await;
    let client_metrics = metrics(pair.client.bound.metrics.unwrap()).await;
    assert!(
        client_metrics
            .lines()
            .any(|l| l.starts_with("istio_tcp_connections_opened_total")
                && l.contains(r#"reporter="source""#)
                && l.contains(r#"connection_security_policy="mutual_tls""#)),
        "{client_metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permissive_accepts_both_and_says_which_was_which() {
    let pki = Pki::new("hop", "permissive");
    let app = http_app().await;
    let pair = Pair::start(&pki, app, "--mtls PERMISSIVE").await;
    let via_mesh = get(pair.client.bound.outbound.unwrap(), None).await.unwrap();
    assert!(
        via_mesh.ends_with("URI=spiffe://cluster.local/ns/default/sa/productpage"),
        "{via_mesh}"
    );
    // A plaintext caller gets through, with no identity (and cannot forge one).
    let plain = get(
        pair.server.bound.inbound.unwrap(),
        Some("URI=spiffe://cluster.local/ns/default/sa/admin"),
    )
    .await;
    assert_eq!(plain.unwrap(), "-");
    wait_metric(
        pair.server.bound.metrics.unwrap(),
        r#"connection_security_policy="none""#,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_level_override_relaxes_one_port_only() {
    let pki = Pki::new("hop", "port");
    let app = http_app().await;
    // STRICT for the workload, PERMISSIVE for the application's port: plaintext passes.
    let pair = Pair::start(
        &pki,
        app,
        &format!("--mtls STRICT --port-mtls {}=PERMISSIVE", app.port()),
    )
    .await;
    assert_eq!(get(pair.server.bound.inbound.unwrap(), None).await.unwrap(), "-");
    // The override is for that port only.
    let other = Pair::start(&pki, app, "--mtls STRICT --port-mtls 1=PERMISSIVE").await;
    assert!(get(other.server.bound.inbound.unwrap(), None).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_from_a_foreign_ca_is_refused_under_strict() {
    let pki = Pki::new("hop", "home");
    let foreign = Pki::new("hop", "foreign");
    let app = http_app().await;
    let (sc, sk) = pki.svid("cluster.local", "reviews");
    let server = Sidecar::start(args(&format!(
        "--inbound 127.0.0.1:0={app} --cert {} --key {} --ca {} --protocol http --metrics 127.0.0.1:0",
        p(&sc),
        p(&sk),
        p(&pki.ca())
    )))
    .unwrap();
    // The impostor trusts the server's CA but presents a cluster.local ID from its own.
    let (fc, fk) = foreign.svid("cluster.local", "productpage");
    // It trusts the server's CA too, so only the server's check can stop it.
    let both = foreign.dir.join("both.pem");
    std::fs::write(
        &both,
        [std::fs::read(foreign.ca()).unwrap(), std::fs::read(pki.ca()).unwrap()].concat(),
    )
    .unwrap();
    let client = Sidecar::start(args(&format!(
        "--outbound 127.0.0.1:0={} --cert {} --key {} --ca {} --protocol http",
        server.bound.inbound.unwrap(),
        p(&fc),
        p(&fk),
        p(&both)
    )))
    .unwrap();
    assert!(get(client.bound.outbound.unwrap(), None).await.is_err());
    wait_metric(
        server.bound.metrics.unwrap(),
        r#"isthmus_sidecar_refused_connections_total{reason="foreign_ca",side="inbound"} 1"#,
    )
    .await;
}

#[test]
fn the_binary_names_what_is_wrong_with_its_inputs() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sidecar"))
        .args([
            "run",
            "--cert",
            "/nonexistent/cert.pem",
            "--key",
            "/nonexistent/key.pem",
            "--ca",
            "/x",
        ])
        .args(["--inbound", "127.0.0.1:0=127.0.0.1:1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/cert.pem"), "{err}");

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sidecar"))
        .args(["run", "--cert", "c", "--key", "k", "--ca", "a", "--inbound", "15006"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("expected LISTEN=TARGET"), "{err}");
}
