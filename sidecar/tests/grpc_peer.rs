//! Real gRPC at both ends of our pair: a grpcio client calls a grpcio server through the
//! client side and the server side (`--protocol grpc`: the application takes HTTP/2 only)
//! in mutual TLS — unary, server-streaming and client-streaming calls, 1 MiB across both
//! sidecars' flow control, and a failed call whose status, details and trailing metadata
//! come back as the server set them. The server sees the identity the server side vouches
//! for. Needs grpcio
//! (federation-controller/tests/grpc_proxyless.requirements.txt; scripts/test.sh installs
//! it) and fails loudly without it.

mod support;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use sidecar::run::{RunArgs, Sidecar};
use support::Pki;

const AUTHORITY: &str = "reviews.default.svc.cluster.local:9080";

fn script() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/grpc_peer.py")
}

const MISSING: &str = "grpc_peer.py failed; its stderr says why. Missing modules? \
     python3 -m pip install -r federation-controller/tests/grpc_proxyless.requirements.txt";

/// The grpcio server, killed on drop.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the grpcio server; its port.
fn grpc_server() -> (Server, u16) {
    let mut child = Command::new("python3")
        .arg(script())
        .arg("serve")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 must be installed");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port = line
        .strip_prefix("port ")
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("{MISSING} (it printed {line:?})"));
    (Server(child), port)
}

fn p(path: &Path) -> String {
    path.display().to_string()
}

fn args(line: &str) -> RunArgs {
    RunArgs::from_words(line.split_whitespace()).unwrap()
}

#[test]
fn a_real_grpc_client_and_server_talk_through_the_pair() {
    let pki = Pki::new("grpc-peer", "grpcio");
    let (_server, port) = grpc_server();
    let (sc, sk) = pki.svid("cluster.local", "reviews");
    let server = Sidecar::start(args(&format!(
        "--inbound 127.0.0.1:0=127.0.0.1:{port} --cert {} --key {} --ca {} --protocol grpc --mtls STRICT",
        p(&sc),
        p(&sk),
        p(&pki.ca())
    )))
    .unwrap();
    let (cc, ck) = pki.svid("cluster.local", "productpage");
    let client = Sidecar::start(args(&format!(
        "--outbound 127.0.0.1:0={} --peer-id spiffe://cluster.local/ns/default/sa/reviews --cert {} --key {} --ca {} --protocol grpc",
        server.bound.inbound.unwrap(),
        p(&cc),
        p(&ck),
        p(&pki.ca())
    )))
    .unwrap();

    let out = Command::new("python3")
        .arg(script())
        .args(["call", &client.bound.outbound.unwrap().to_string(), AUTHORITY])
        .stderr(Stdio::inherit())
        .output()
        .expect("python3 must be installed");
    assert!(out.status.success(), "{MISSING}");
    let seen: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();

    let who = seen["who"].as_str().unwrap();
    assert!(
        who.starts_with("By=spiffe://cluster.local/ns/default/sa/reviews;"),
        "{who}"
    );
    assert!(
        who.ends_with(";URI=spiffe://cluster.local/ns/default/sa/productpage"),
        "{who}"
    );
    assert_eq!(
        seen["count"],
        serde_json::json!(["0", "1", "2", "3", "4"]),
        "server streaming"
    );
    assert_eq!(seen["sum"], "1048576", "client streaming, 1 MiB");
    let fail = &seen["fail"];
    assert_eq!(
        (&fail["code"], &fail["details"], &fail["trailing"]["x-review"]),
        (&"NOT_FOUND".into(), &"no such review".into(), &"none".into()),
        "the server's status, details and trailing metadata: {fail}"
    );
}
