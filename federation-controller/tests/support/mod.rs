//! Manifest fixtures shared by the controller's end-to-end tests.

#![allow(dead_code)] // each test file uses its own part

pub mod kube_api;

use std::path::Path;

/// Writes cluster `name` on network `net`: a `reviews` Service on ClusterIP
/// 10.96.<octet>.12 with the given pods (name, version, has a sidecar) at
/// 10.24<octet>.0.10+, service account `reviews-<version>`, and an east-west
/// gateway Service on 100.64.0.<octet>:15443.
pub fn cluster(dir: &Path, name: &str, net: &str, octet: u8, pods: &[(&str, &str, bool)]) {
    cluster_with_ips(dir, name, net, octet, pods, &[&format!("10.96.{octet}.12")]);
}

/// [`cluster`] with the `reviews` Service on these `clusterIPs` (none: headless).
pub fn cluster_with_ips(dir: &Path, name: &str, net: &str, octet: u8, pods: &[(&str, &str, bool)], ips: &[&str]) {
    let d = dir.join(name);
    std::fs::create_dir_all(&d).unwrap();
    let ips = if ips.is_empty() {
        "clusterIP: None".to_owned()
    } else {
        format!("clusterIP: {}, clusterIPs: [{}]", ips[0], ips.join(", "))
    };
    let mut y = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: default, labels: {{topology.istio.io/network: {net}}}}}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {{name: reviews, namespace: default}}\nspec: {{{ips}, ports: [{{name: http, port: 9080}}]}}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {{name: istio-eastwestgateway, namespace: istio-system, labels: {{topology.istio.io/network: {net}}}}}\n\
         spec: {{ports: [{{name: tls, port: 15443}}], externalIPs: [100.64.0.{octet}]}}\n"
    );
    let mut eps = String::new();
    for (i, (pod, version, mtls)) in pods.iter().enumerate() {
        let tls = if *mtls {
            ", security.istio.io/tlsMode: istio"
        } else {
            ""
        };
        y += &format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {pod}, namespace: default, labels: {{version: {version}{tls}}}}}\nspec: {{serviceAccountName: reviews-{version}, containers: [{{name: app}}]}}\n"
        );
        eps += &format!(
            "  - {{addresses: [10.24{octet}.0.{}], targetRef: {{kind: Pod, name: {pod}}}}}\n",
            i + 10
        );
    }
    y += &format!(
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: reviews-1, namespace: default, labels: {{kubernetes.io/service-name: reviews}}}}\n\
         addressType: IPv4\nports: [{{name: http, port: 9080}}]\nendpoints:\n{eps}"
    );
    std::fs::write(d.join("objects.yaml"), y).unwrap();
}

/// The layout most tests use: cluster1 on network1 with one sidecar'd `reviews`
/// pod (10.241.0.10), cluster2 on network2 with two (10.242.0.10-11), each network
/// with its east-west gateway (100.64.0.1, 100.64.0.2).
pub fn two_networks(dir: &Path) {
    cluster(dir, "cluster1", "network1", 1, &[("reviews-v1-a", "v1", true)]);
    cluster(
        dir,
        "cluster2",
        "network2",
        2,
        &[("reviews-v1-b", "v1", true), ("reviews-v2", "v2", true)],
    );
}

/// Polls `f` until it returns `Some`, failing with `what` after `patience`. For async tests:
/// it waits on the runtime's timer, so servers on the same runtime keep running.
pub async fn until<T>(what: &str, patience: std::time::Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + patience;
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(20));
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tick.tick().await;
    }
}

/// [`until`] for a plain condition.
pub async fn until_true(what: &str, patience: std::time::Duration, mut f: impl FnMut() -> bool) {
    until(what, patience, || f().then_some(())).await
}

/// [`until`] for checks that are themselves asynchronous (a request): polls `f` until it
/// is `Ok`, and fails with the last error at the deadline.
pub async fn until_ok<T, E: std::fmt::Debug, Fut: std::future::Future<Output = Result<T, E>>>(
    what: &str,
    patience: std::time::Duration,
    mut f: impl FnMut() -> Fut,
) -> T {
    let deadline = tokio::time::Instant::now() + patience;
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(50));
    loop {
        match f().await {
            Ok(v) => return v,
            Err(e) => assert!(tokio::time::Instant::now() < deadline, "timed out: {what}: {e:?}"),
        }
        tick.tick().await;
    }
}

/// [`until`] for synchronous tests.
pub fn eventually<T>(what: &str, patience: std::time::Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + patience;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(std::time::Instant::now() < deadline, "timed out: {what}");
        std::thread::park_timeout(std::time::Duration::from_millis(20));
    }
}

/// A fresh scratch directory for one test.
pub fn scratch(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("isthmus-fc-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `federation-controller serve` on an ephemeral port over `dir`; killed on drop.
pub struct Controller {
    child: std::process::Child,
    /// Where it serves xDS.
    pub xds: std::net::SocketAddr,
    /// Where it serves `/metrics`.
    pub monitoring: std::net::SocketAddr,
    /// Where it serves the CA and xDS over TLS, when started with `--ca-dir`.
    pub secure: Option<std::net::SocketAddr>,
    /// Where it serves the SPIFFE bundle endpoint, when started with `--bundle-endpoint`.
    pub bundle: Option<std::net::SocketAddr>,
}

impl Controller {
    /// The JSON body of `path` on the monitoring port.
    pub fn json(&self, path: &str) -> Option<serde_json::Value> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(self.monitoring).ok()?;
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        serde_json::from_str(text.split_once("\r\n\r\n")?.1).ok()
    }

    /// Sends SIGTERM and waits up to `patience` for the process to exit.
    pub fn terminate(&mut self, patience: std::time::Duration) -> Option<std::process::ExitStatus> {
        std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .ok()?;
        let deadline = std::time::Instant::now() + patience;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::park_timeout(std::time::Duration::from_millis(20));
        }
        None
    }

    /// The HTTP status of `path` on the monitoring port.
    pub fn status(&self, path: &str) -> Option<u16> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(self.monitoring).ok()?;
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        text.get(9..12)?.parse().ok()
    }

    /// The sum of the samples of `metric` whose labels contain every `k="v"`.
    pub fn metric(&self, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(self.monitoring).ok()?;
        write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        let values: Vec<f64> = text
            .lines()
            .filter(|l| l.starts_with(metric) && l[metric.len()..].starts_with(['{', ' ']))
            .filter(|l| labels.iter().all(|(k, v)| l.contains(&format!("{k}=\"{v}\""))))
            .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
            .collect();
        (!values.is_empty()).then(|| values.iter().sum())
    }
}

impl Controller {
    pub fn serve(dir: &Path) -> Controller {
        Self::start(&["--manifests", dir.to_str().unwrap()])
    }

    /// `serve` with ephemeral ports, a fast poll and `args`.
    pub fn start(args: &[&str]) -> Controller {
        use std::io::BufRead;
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_federation-controller"))
            .args([
                "serve",
                "--xds",
                "127.0.0.1:0",
                "--monitoring",
                "127.0.0.1:0",
                "--interval",
                "50ms",
            ])
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let field = |k: &str| -> std::net::SocketAddr {
            line.split_whitespace()
                .find_map(|kv| kv.strip_prefix(&format!("{k}=")))
                .unwrap_or_else(|| panic!("no {k} in {line:?}"))
                .parse()
                .unwrap()
        };
        let optional = |k: &str| {
            line.split_whitespace()
                .find_map(|kv| kv.strip_prefix(&format!("{k}=")))
                .map(|a| a.parse().unwrap())
        };
        Controller {
            xds: field("xds"),
            monitoring: field("monitoring"),
            secure: optional("secure"),
            bundle: optional("bundle"),
            child,
        }
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `federation-controller ca token`: a bootstrap token for `identity` from the CA in `ca_dir`.
pub fn ca_token(ca_dir: &Path, identity: &str) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_federation-controller"))
        .args([
            "ca",
            "token",
            "--ca-dir",
            ca_dir.to_str().unwrap(),
            "--identity",
            identity,
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}
