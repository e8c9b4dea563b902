//! The gateway binary end to end over real sockets: rustls clients with SVIDs,
//! rustls backends that require them, and the gateway between, never holding a key.

mod support;

use std::time::{Duration, Instant};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn routes_file(dir: &std::path::Path, endpoints: &[std::net::SocketAddr], extra: &str) -> std::path::PathBuf {
    let mut y = format!("host: {SERVICE}\nports: [{{name: tls, port: 9080}}]\n{extra}endpoints:\n");
    for e in endpoints {
        y += &format!("  - {{address: {}, ports: {{tls: {}}}}}\n", e.ip(), e.port());
    }
    replace(&dir.join("routes.yaml"), &y)
}

/// Write-then-rename, as config management does, so a reload never sees half a file.
fn replace(path: &std::path::Path, text: &str) -> std::path::PathBuf {
    let tmp = path.with_extension("yaml.tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
    path.to_owned()
}

/// The address of a backend that was started and stopped: it refuses from now on.
async fn dead_backend(pki: &Pki) -> std::net::SocketAddr {
    let dead = Backend::start(pki, "dead").await;
    let addr = dead.addr;
    dead.stop();
    eventually(Duration::from_secs(5), "dead port refuses", || async {
        TcpStream::connect(addr).await.is_err()
    })
    .await;
    addr
}

#[tokio::test]
async fn tls_passes_through_and_the_backend_sees_the_client_identity() {
    let Setup { pki, gw, .. } = Setup::new(&[]).await;
    let client = pki.client(&pki.svid("client", CLIENT_ID, &[]), &["istio-peer-exchange", "istio"]);

    let mut call = Call::open(gw.listen, &client, SNI).await.unwrap();
    // Only a backend that terminated the client's own handshake can know this.
    assert_eq!(call.greeting, format!("hello b1 you-are {CLIENT_ID} alpn istio"));
    assert_eq!(call.echo("ping").await.unwrap(), "ping");
    assert_eq!(call.tls.get_ref().1.alpn_protocol(), Some(&b"istio"[..]));
    drop(call);

    gw.wait_metric(
        "istio_tcp_connections_closed_total",
        &[("destination_service", SERVICE)],
        1.0,
    )
    .await;
    let labels = [
        ("destination_service", SERVICE),
        ("destination_cluster", "cluster1"),
        ("reporter", "source"),
    ];
    assert_eq!(
        gw.metric("istio_tcp_connections_opened_total", &labels).await,
        Some(1.0)
    );
    assert!(gw.metric("istio_tcp_sent_bytes_total", &labels).await.unwrap() > 1000.0);
    assert!(gw.metric("istio_tcp_received_bytes_total", &labels).await.unwrap() > 500.0);
    assert_eq!(http_get(gw.health, "/healthz/ready").await.unwrap().0, 200);
}

#[tokio::test]
async fn unknown_sni_no_sni_and_not_tls_are_closed_at_once_and_counted() {
    let Setup { gw, client, .. } = Setup::new(&[]).await;
    let unknown = "outbound_.9080_._.ratings.default.svc.cluster.local";
    assert!(Call::open(gw.listen, &client, unknown).await.is_err());
    // An IP address as server name makes rustls send no SNI at all.
    assert!(Call::open(gw.listen, &client, "127.0.0.1").await.is_err());
    let mut plain = TcpStream::connect(gw.listen).await.unwrap();
    plain.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 64];
    let n = plain.read(&mut buf).await.unwrap_or(0);
    assert_eq!(n, 0, "plaintext must get no answer, only a close");
    assert!(started.elapsed() < Duration::from_secs(2));

    for reason in ["unknown_sni", "no_sni", "not_tls"] {
        eventually(Duration::from_secs(5), reason, || async {
            gw.metric("isthmus_gateway_rejected_connections_total", &[("reason", reason)])
                .await
                == Some(1.0)
        })
        .await;
    }
    let opened = gw
        .metric("istio_tcp_connections_opened_total", &[])
        .await
        .unwrap_or(0.0);
    assert_eq!(opened, 0.0, "nothing reached a backend");
}

#[tokio::test]
async fn half_close_reaches_the_backend_and_its_answer_comes_back() {
    let setup = Setup::new(&[]).await;
    let mut call = setup.call().await.unwrap();
    assert_eq!(call.echo("one").await.unwrap(), "one");
    // close_notify plus FIN on our write side; the read side stays open.
    call.tls.shutdown().await.unwrap();
    assert_eq!(read_line(&mut call.tls).await.unwrap(), "bye 4");
}

/// The workers' yield before sleeping is on by default; the data path is the same
/// without it, and `/config_dump` says which.
#[tokio::test]
async fn without_the_yield_before_sleep_bytes_and_half_close_still_pass() {
    let on = Setup::new(&[]).await;
    let dump: serde_json::Value =
        serde_json::from_str(&http_get(on.gw.admin, "/config_dump").await.unwrap().1).unwrap();
    assert_eq!(dump["settings"]["yield_before_sleep"], true);

    let off = Setup::new(&["--yield-before-sleep", "off"]).await;
    let dump: serde_json::Value =
        serde_json::from_str(&http_get(off.gw.admin, "/config_dump").await.unwrap().1).unwrap();
    assert_eq!(dump["settings"]["yield_before_sleep"], false);
    let mut call = off.call().await.unwrap();
    assert_eq!(call.echo("one").await.unwrap(), "one");
    call.tls.shutdown().await.unwrap();
    assert_eq!(read_line(&mut call.tls).await.unwrap(), "bye 4");
}

#[tokio::test]
async fn a_dead_endpoint_is_skipped_and_ejected() {
    let pki = Pki::new();
    let live = Backend::start(&pki, "live").await;
    let dead_addr = dead_backend(&pki).await;
    let outlier =
        "outlierDetection: {consecutiveLocalOriginFailures: 1, baseEjectionTime: 60s, maxEjectionPercent: 50}\n";
    let file = routes_file(pki.dir.path(), &[dead_addr, live.addr], outlier);
    let gw = GatewayProcess::start(pki.dir.path(), &["--config", file.to_str().unwrap()]);
    let client = pki.client(&pki.svid("client", CLIENT_ID, &[]), &["istio"]);

    for _ in 0..20 {
        let call = Call::open(gw.listen, &client, SNI)
            .await
            .expect("every call must land on the live endpoint");
        assert!(call.greeting.starts_with("hello live "), "{}", call.greeting);
    }
    let dead_label = dead_addr.to_string();
    let ejected = gw
        .metric("isthmus_gateway_outlier_ejections_total", &[("endpoint", &dead_label)])
        .await;
    assert_eq!(
        ejected,
        Some(1.0),
        "one failure ejects it, and an ejected endpoint is not tried again"
    );
    assert_eq!(
        gw.metric(
            "isthmus_gateway_upstream_connect_failures_total",
            &[("endpoint", &dead_label)]
        )
        .await,
        Some(1.0)
    );
    let dump = http_get(gw.admin, "/config_dump").await.unwrap().1;
    let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
    let eps = &dump["routes"][0]["endpoints"];
    assert_eq!(eps[0]["healthy"], false, "{dump}");
    assert_eq!(eps[1]["healthy"], true);
}

#[tokio::test]
async fn a_pinned_name_reaches_that_endpoint_only_and_never_another() {
    let pki = Pki::new();
    let b1 = Backend::start(&pki, "b1").await;
    let b2 = Backend::start(&pki, "b2").await;
    let dead_addr = dead_backend(&pki).await;
    let file = routes_file(pki.dir.path(), &[b1.addr, b2.addr, dead_addr], "");
    let gw = GatewayProcess::start(pki.dir.path(), &["--config", file.to_str().unwrap()]);
    let client = pki.client(&pki.svid("client", CLIENT_ID, &[]), &["istio"]);

    // Unpinned, the gateway balances (and skips the dead one); pinned, every call lands on b2.
    let pinned = mesh_vocab::sni::pin(b2.addr, SNI);
    for _ in 0..10 {
        let call = Call::open(gw.listen, &client, &pinned).await.unwrap();
        assert!(call.greeting.starts_with("hello b2 "), "{}", call.greeting);
    }
    // A pinned endpoint that is down is not replaced by a live one: the caller, who pinned
    // it, sees the failure and ejects it.
    let to_dead = mesh_vocab::sni::pin(dead_addr, SNI);
    assert!(Call::open(gw.listen, &client, &to_dead).await.is_err());
    gw.wait_rejected("upstream_connect_failed", 1.0).await;
    // An endpoint the gateway does not know for that name is refused.
    let elsewhere = mesh_vocab::sni::pin("10.9.9.9:9080".parse().unwrap(), SNI);
    assert!(Call::open(gw.listen, &client, &elsewhere).await.is_err());
    gw.wait_rejected("unknown_endpoint", 1.0).await;
    assert_eq!(
        gw.metric("istio_tcp_connections_opened_total", &[]).await,
        Some(10.0),
        "only the ten pinned calls to b2 reached a backend"
    );
}

#[tokio::test]
async fn a_known_name_with_no_healthy_endpoint_closes_cleanly() {
    let pki = Pki::new();
    let file = routes_file(pki.dir.path(), &[], "");
    let gw = GatewayProcess::start(pki.dir.path(), &["--config", file.to_str().unwrap()]);
    let client = pki.client(&pki.svid("client", CLIENT_ID, &[]), &["istio"]);
    assert!(Call::open(gw.listen, &client, SNI).await.is_err());
    eventually(Duration::from_secs(5), "no_healthy_upstream counted", || async {
        gw.metric(
            "isthmus_gateway_rejected_connections_total",
            &[("reason", "no_healthy_upstream")],
        )
        .await
            == Some(1.0)
    })
    .await;
}

#[tokio::test]
async fn reload_moves_new_connections_and_keeps_established_ones() {
    let pki = Pki::new();
    let a = Backend::start(&pki, "a").await;
    let b = Backend::start(&pki, "b").await;
    let file = routes_file(pki.dir.path(), &[a.addr], "");
    let gw = GatewayProcess::start(
        pki.dir.path(),
        &["--config", file.to_str().unwrap(), "--reload-interval", "50ms"],
    );
    let client = pki.client(&pki.svid("client", CLIENT_ID, &[]), &["istio"]);

    let mut old = Call::open(gw.listen, &client, SNI).await.unwrap();
    assert!(old.greeting.starts_with("hello a "));
    routes_file(pki.dir.path(), &[b.addr], "");
    eventually(Duration::from_secs(10), "new connections land on b", || async {
        Call::open(gw.listen, &client, SNI)
            .await
            .is_ok_and(|c| c.greeting.starts_with("hello b "))
    })
    .await;
    assert_eq!(old.echo("still here").await.unwrap(), "still here");

    // A bad file is refused; the last good routes keep serving and the error names the field.
    replace(
        &file,
        &format!("host: {SERVICE}\nports: [{{port: 9080}}]\nendpoints: [{{address: nowhere}}]\n"),
    );
    eventually(Duration::from_secs(10), "bad config reported", || async {
        gw.metric("isthmus_gateway_config_ok", &[]).await == Some(0.0)
    })
    .await;
    let dump: serde_json::Value = serde_json::from_str(&http_get(gw.admin, "/config_dump").await.unwrap().1).unwrap();
    let err = dump["last_reload_error"].as_str().unwrap();
    assert!(
        err.contains("routes.yaml: document 1: field `endpoints[0].address`"),
        "{err}"
    );
    assert!(
        Call::open(gw.listen, &client, SNI)
            .await
            .unwrap()
            .greeting
            .starts_with("hello b ")
    );
    assert_eq!(old.echo("and still").await.unwrap(), "and still");
}

#[tokio::test]
async fn sighup_reloads_at_once() {
    let pki = Pki::new();
    let a = Backend::start(&pki, "a").await;
    let b = Backend::start(&pki, "b").await;
    let file = routes_file(pki.dir.path(), &[a.addr], "");
    // Polling effectively off: only the signal can make the change visible.
    let gw = GatewayProcess::start(
        pki.dir.path(),
        &["--config", file.to_str().unwrap(), "--reload-interval", "1h"],
    );
    let client = pki.client(&pki.svid("client", CLIENT_ID, &[]), &["istio"]);
    routes_file(pki.dir.path(), &[b.addr], "");
    assert!(
        Call::open(gw.listen, &client, SNI)
            .await
            .unwrap()
            .greeting
            .starts_with("hello a ")
    );
    gw.signal("HUP");
    eventually(Duration::from_secs(10), "SIGHUP reload", || async {
        Call::open(gw.listen, &client, SNI)
            .await
            .is_ok_and(|c| c.greeting.starts_with("hello b "))
    })
    .await;
}

#[tokio::test]
async fn a_client_that_never_finishes_its_hello_is_closed_at_the_deadline() {
    let Setup { gw, .. } = Setup::new(&["--handshake-timeout", "300ms"]).await;
    let mut slow = TcpStream::connect(gw.listen).await.unwrap();
    // A TLS record header announcing a ClientHello that never comes.
    slow.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]).await.unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), slow.read(&mut buf))
        .await
        .expect("closed")
        .unwrap_or(0);
    let waited = started.elapsed();
    assert_eq!(n, 0);
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    gw.wait_rejected("handshake_timeout", 1.0).await;
}

#[tokio::test]
async fn max_connections_bounds_what_is_open() {
    let setup = Setup::new(&["--max-connections", "1"]).await;
    let mut first = setup.call().await.unwrap();
    assert!(setup.call().await.is_err());
    setup.gw.wait_rejected("max_connections", 1.0).await;
    assert_eq!(first.echo("fine").await.unwrap(), "fine");
    drop(first);
    eventually(Duration::from_secs(5), "slot freed", || async {
        setup.call().await.is_ok()
    })
    .await;
}

#[tokio::test]
async fn sigterm_drains_open_connections_and_refuses_new_ones() {
    let mut setup = Setup::new(&["--drain-timeout", "30s"]).await;
    let mut open = setup.call().await.unwrap();
    setup.gw.signal("TERM");
    eventually(Duration::from_secs(5), "readiness reports the drain", || async {
        http_get(setup.gw.health, "/healthz/ready")
            .await
            .is_ok_and(|(s, _)| s == 503)
    })
    .await;
    eventually(Duration::from_secs(5), "new connections refused", || async {
        setup.call().await.is_err()
    })
    .await;
    assert_eq!(open.echo("during drain").await.unwrap(), "during drain");
    open.tls.shutdown().await.unwrap();
    assert_eq!(read_line(&mut open.tls).await.unwrap(), "bye 13");
    drop(open);
    let gw = &mut setup.gw;
    let status = tokio::time::timeout(Duration::from_secs(10), async {
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        loop {
            tick.tick().await;
            if let Some(s) = gw.child.try_wait().unwrap() {
                return s;
            }
        }
    })
    .await
    .expect("gateway exits once its last connection has closed");
    assert!(status.success(), "{status}\n{}", gw.log());
}

#[tokio::test]
async fn a_bad_routes_file_at_start_is_refused_with_its_location() {
    let pki = Pki::new();
    let path = pki.dir.path().join("bad.yaml");
    std::fs::write(
        &path,
        "host: a.b\nports: [{port: 80}]\n---\nhost: c.d\nports: [{port: 80, targetPort: 0}]\n",
    )
    .unwrap();
    let err = GatewayProcess::try_start(pki.dir.path(), &["--config", path.to_str().unwrap()])
        .err()
        .unwrap();
    assert!(
        err.contains("bad.yaml: document 2: field `ports[0].targetPort`: port 0 is not a port"),
        "{err}"
    );
}

#[tokio::test]
async fn openssl_s_client_goes_through_with_istio_alpn() {
    let openssl = std::process::Command::new("openssl").arg("version").output();
    assert!(
        openssl.as_ref().is_ok_and(|o| o.status.success()),
        "this test needs the openssl command (scripts/test.sh installs it)"
    );
    let Setup { pki, gw, .. } = Setup::new(&["--alpn", "istio"]).await;
    let svid = pki.svid("openssl-client", CLIENT_ID, &[]);
    let gw_addr = gw.listen.to_string();
    let (ca, cert, key) = (pki.ca_pem(), svid.cert_pem.clone(), svid.key_pem.clone());
    let seen = tokio::task::spawn_blocking(move || {
        use std::io::{BufRead, Write};
        let mut child = std::process::Command::new("timeout")
            .args([
                "20",
                "openssl",
                "s_client",
                "-brief",
                "-connect",
                &gw_addr,
                "-servername",
                SNI,
            ])
            .args(["-alpn", "istio", "-verify_hostname", SERVICE, "-verify_return_error"])
            .arg("-CAfile")
            .arg(&ca)
            .arg("-cert")
            .arg(&cert)
            .arg("-key")
            .arg(&key)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"from openssl\n").unwrap();
        // Read until the echo is back, then close stdin, which ends s_client.
        let mut seen = Vec::new();
        for line in std::io::BufReader::new(child.stdout.take().unwrap()).lines() {
            let line = line.unwrap_or_default();
            let done = line == "from openssl";
            seen.push(line);
            if done {
                break;
            }
        }
        drop(stdin);
        let out = child.wait_with_output().unwrap();
        (seen, String::from_utf8_lossy(&out.stderr).into_owned())
    })
    .await
    .unwrap();
    let (lines, stderr) = seen;
    let greeting = format!("hello b1 you-are {CLIENT_ID} alpn istio");
    assert_eq!(lines, [greeting, "from openssl".into()], "stderr: {stderr}");
}

#[tokio::test]
async fn weights_subsets_least_conn_and_network_over_real_connections() {
    let pki = Pki::new();
    let (a, b, remote) = (
        Backend::start(&pki, "a").await,
        Backend::start(&pki, "b").await,
        Backend::start(&pki, "remote").await,
    );
    let ep = |be: &Backend, extra: &str| {
        format!(
            "  - {{address: {}, ports: {{tls: {}}}{extra}}}\n",
            be.addr.ip(),
            be.addr.port()
        )
    };
    let yaml = format!(
        "host: {SERVICE}\nports: [{{name: tls, port: 9080}}]\nsubsets: [{{name: v2, labels: {{version: v2}}}}]\nendpoints:\n{}{}{}---\n\
         host: ratings.default.svc.cluster.local\nports: [{{name: tls, port: 9080}}]\nloadBalancer: LEAST_CONN\nendpoints:\n{}{}",
        ep(&a, ", labels: {version: v1}, weight: 3"),
        ep(&b, ", labels: {version: v2}"),
        // Live, but on another network: this gateway must never send to it.
        ep(&remote, ", labels: {version: v2}, network: network9"),
        ep(&a, ""),
        ep(&b, ""),
    );
    let file = pki.dir.path().join("routes.yaml");
    std::fs::write(&file, yaml).unwrap();
    let gw = GatewayProcess::start(
        pki.dir.path(),
        &["--config", file.to_str().unwrap(), "--network", "network1"],
    );
    let client = pki.client(&pki.svid("client", CLIENT_ID, &[]), &["istio"]);
    let landed = |call: &Call| call.greeting.split_whitespace().nth(1).unwrap().to_owned();

    // Weighted round robin, 3:1, is exact over whole cycles.
    let mut counts = std::collections::BTreeMap::new();
    for _ in 0..40 {
        *counts
            .entry(landed(&Call::open(gw.listen, &client, SNI).await.unwrap()))
            .or_insert(0) += 1;
    }
    assert_eq!(
        counts,
        [("a".to_owned(), 30), ("b".to_owned(), 10)].into(),
        "weights 3:1"
    );

    // The subset in the SNI selects by labels, and only on this network (never "remote").
    for _ in 0..10 {
        let v2 = "outbound_.9080_.v2_.reviews.default.svc.cluster.local";
        assert_eq!(landed(&Call::open(gw.listen, &client, v2).await.unwrap()), "b");
    }

    // Least connections: while one call stays open on one endpoint, every new call
    // goes to the other (round robin would alternate, random would stray).
    let ratings = "outbound_.9080_._.ratings.default.svc.cluster.local";
    let held = Call::open(gw.listen, &client, ratings).await.unwrap();
    for _ in 0..6 {
        let call = Call::open(gw.listen, &client, ratings).await.unwrap();
        assert_ne!(landed(&call), landed(&held));
        drop(call);
        // Counts must be back to the one held call before the next pick.
        gw.wait_metric("isthmus_gateway_active_connections", &[("sni", ratings)], 1.0)
            .await;
    }
}
