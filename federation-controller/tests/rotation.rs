//! SVID rotation under steady load: two sidecars get short-lived SVIDs from the controller's
//! CA and renew them at half-life while requests flow; not one request fails, new
//! connections present the new certificates, and a connection opened before the rotations
//! keeps working after them.

mod support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use sidecar::run::{RunArgs, Sidecar};
use support::{Controller, scratch, two_networks};
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
        .find_map(|l| l.strip_prefix("isthmus_sidecar_svid_renewals_total "))
        .map(|v| v.parse().unwrap())
        .unwrap_or(0.0)
}

fn token(ca_dir: &std::path::Path, identity: &str, out: &std::path::Path) {
    std::fs::write(out, support::ca_token(ca_dir, identity)).unwrap();
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
    while (renewals(cm) < 3.0 || renewals(sm) < 3.0) && Instant::now() < deadline && sent < 20_000 {
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
        tokio::time::sleep(Duration::from_millis(5)).await;
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
    // The connection from before the rotations still carries requests.
    let last = get_on(&mut early).await.unwrap();
    assert_eq!(last, first, "an established connection keeps its session");
}
