//! Manifest fixtures shared by the controller's end-to-end tests.

#![allow(dead_code)] // each test file uses its own part

pub mod dns;
pub mod kube_api;

use std::path::Path;

/// Writes a file as config management does, by rename: a controller watching the
/// directory reads the old file or the new one, never one caught truncated (a process
/// preempted between the truncate and the write left it empty for over 50 ms in CI).
pub fn write(path: impl AsRef<Path>, contents: impl AsRef<[u8]>) -> std::io::Result<()> {
    let path = path.as_ref();
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, contents)?;
    std::fs::rename(&tmp, path)
}

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
    write(d.join("objects.yaml"), y).unwrap();
}

/// An `httpbin` workload in `ns`: its Service on ClusterIP `vip` with `ports` (name,
/// service port, target port), its sidecar'd pod `httpbin-1` (`app: httpbin`, service
/// account `httpbin`) at `pod_ip`, and the EndpointSlice joining them.
pub fn httpbin_yaml(ns: &str, vip: &str, pod_ip: &str, ports: &[(&str, u16, u16)]) -> String {
    let service_ports: Vec<String> = ports
        .iter()
        .map(|(n, p, _)| format!("{{name: {n}, port: {p}}}"))
        .collect();
    let slice_ports: Vec<String> = ports
        .iter()
        .map(|(n, _, t)| format!("{{name: {n}, port: {t}}}"))
        .collect();
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: httpbin, namespace: {ns}}}\n\
         spec: {{clusterIP: {vip}, ports: [{}]}}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {{name: httpbin-1, namespace: {ns}, labels: {{app: httpbin, security.istio.io/tlsMode: istio}}}}\n\
         spec: {{serviceAccountName: httpbin, containers: [{{name: app}}]}}\nstatus: {{podIP: {pod_ip}}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: httpbin-1, namespace: {ns}, labels: {{kubernetes.io/service-name: httpbin}}}}\n\
         addressType: IPv4\nports: [{}]\nendpoints: [{{addresses: [{pod_ip}], targetRef: {{kind: Pod, name: httpbin-1}}}}]\n",
        service_ports.join(", "),
        slice_ports.join(", "),
    )
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

/// A port nothing listens on now (the OS's next ephemeral one).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
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

fn gamma_service(name: &str, vip: &str, port_name: &str, port: u16) -> String {
    service_in("default", name, vip, port_name, port)
}

fn service_in(ns: &str, name: &str, vip: &str, port_name: &str, port: u16) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\n\
         spec: {{clusterIP: {vip}, ports: [{{name: {port_name}, port: {port}}}]}}\n---\n"
    )
}

fn gamma_pod(name: &str, app: &str, version: &str) -> String {
    pod_in("default", name, app, version)
}

fn pod_in(ns: &str, name: &str, app: &str, version: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{app: {app}, version: {version}}}}}\n\
         spec: {{containers: [{{name: app}}]}}\n---\n"
    )
}

fn gamma_slice(service: &str, port_name: &str, endpoints: &[(&str, std::net::SocketAddr)]) -> String {
    slice_in("default", service, port_name, endpoints)
}

fn slice_in(ns: &str, service: &str, port_name: &str, endpoints: &[(&str, std::net::SocketAddr)]) -> String {
    let port = endpoints[0].1.port();
    let eps: String = endpoints
        .iter()
        .map(|(pod, a)| format!("- {{addresses: [{}], targetRef: {{kind: Pod, name: {pod}}}}}\n", a.ip()))
        .collect();
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {service}-1, namespace: {ns}, labels: {{kubernetes.io/service-name: {service}}}}}\n\
         addressType: IPv4\nports: [{{name: {port_name}, port: {port}}}]\nendpoints:\n{eps}---\n"
    )
}

/// reviews (HTTP) split by an HTTPRoute between the Services reviews-v1 and
/// reviews-v2, jason always to v2; db (TCP) split 80/20 between two subsets by a
/// VirtualService `tcp` route.
pub const GAMMA_ROUTES: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews, namespace: default}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews, port: 9080}]
  rules:
  - matches: [{headers: [{name: end-user, value: jason}]}]
    backendRefs: [{name: reviews-v2, port: 9080}]
  - backendRefs:
    - {name: reviews-v1, port: 9080, weight: 90}
    - {name: reviews-v2, port: 9080, weight: 10}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: db, namespace: default}
spec: {host: db, subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: db, namespace: default}
spec:
  hosts: [db]
  tls:
  - match: [{port: 5432, sniHosts: [db.example.com]}]
    route: [{destination: {host: db, subset: v2}}]
  tcp:
  - match: [{port: 5432}]
    route:
    - {destination: {host: db, subset: v1}, weight: 80}
    - {destination: {host: db, subset: v2}, weight: 20}
"#;

/// Writes cluster1 with `reviews` (HTTP, 10.96.1.12:9080) routed by an HTTPRoute 90/10
/// between the Services reviews-v1 (`v1`) and reviews-v2 (`v2`), jason always to v2, and
/// `db` (TCP, 10.96.1.20:5432, pods `db1` and `db2` on one port) split 80/20 between its
/// subsets v1 and v2 by a VirtualService `tcp` route (TLS for `db.example.com` to v2).
pub fn gamma_cluster(
    dir: &Path,
    v1: std::net::SocketAddr,
    v2: std::net::SocketAddr,
    db1: std::net::SocketAddr,
    db2: std::net::SocketAddr,
) {
    let c1 = dir.join("cluster1");
    std::fs::create_dir_all(&c1).unwrap();
    let objects = [
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: default, labels: {topology.istio.io/network: network1}}\n---\n".to_owned(),
        gamma_service("reviews", "10.96.1.12", "http", 9080),
        gamma_service("reviews-v1", "10.96.1.13", "http", 9080),
        gamma_service("reviews-v2", "10.96.1.14", "http", 9080),
        gamma_service("db", "10.96.1.20", "tcp-postgres", 5432),
        gamma_pod("reviews-v1", "reviews", "v1"),
        gamma_pod("reviews-v2", "reviews", "v2"),
        gamma_pod("db-v1", "db", "v1"),
        gamma_pod("db-v2", "db", "v2"),
        gamma_slice("reviews-v1", "http", &[("reviews-v1", v1)]),
        gamma_slice("reviews-v2", "http", &[("reviews-v2", v2)]),
        gamma_slice("db", "tcp-postgres", &[("db-v1", db1), ("db-v2", db2)]),
    ]
    .concat();
    write(c1.join("objects.yaml"), objects).unwrap();
    write(c1.join("routes.yaml"), GAMMA_ROUTES).unwrap();
}

/// The HTTPRoute of [`grant_cluster`]: `/ratings` to the Service ratings of namespace
/// ratings, `/half` split between reviews-v1 and a Service that does not exist, the rest
/// to reviews-v1.
const GRANT_ROUTES: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews, namespace: default}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews, port: 9080}]
  rules: [
    {matches: [{path: {type: PathPrefix, value: /ratings}}], backendRefs: [{name: ratings, namespace: ratings, port: 9080}]},
    {matches: [{path: {type: PathPrefix, value: /half}}],
     backendRefs: [{name: reviews-v1, port: 9080}, {name: nowhere, port: 9080}]},
    {backendRefs: [{name: reviews-v1, port: 9080}]}]
"#;

/// A ReferenceGrant `name` in `ns` from `from_kind`s of `from_ns` to `to` (`kind` or `kind, name: N`).
fn reference_grant(name: &str, ns: &str, from_kind: &str, from_ns: &str, to: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1beta1\nkind: ReferenceGrant\nmetadata: {{name: {name}, namespace: {ns}}}\n\
         spec:\n  from: [{{group: gateway.networking.k8s.io, kind: {from_kind}, namespace: {from_ns}}}]\n\
         \x20 to: [{{group: \"\", kind: {to}}}]\n---\n"
    )
}

/// ReferenceGrants that do not let default's HTTPRoutes reach ratings' Services: for
/// another namespace's routes, for GRPCRoutes, to Secrets, and one in the wrong namespace.
fn grants_that_do_not_count() -> String {
    [
        reference_grant("other-namespace", "ratings", "HTTPRoute", "other", "Service"),
        reference_grant("grpc-routes", "ratings", "GRPCRoute", "default", "Service"),
        reference_grant("secrets", "ratings", "HTTPRoute", "default", "Secret"),
        reference_grant(
            "wrong-place",
            "default",
            "HTTPRoute",
            "default",
            "Service, name: ratings",
        ),
    ]
    .concat()
}

/// The grant that lets default's HTTPRoutes reach the Service ratings of namespace ratings.
pub fn ratings_grant() -> String {
    reference_grant(
        "reviews-to-ratings",
        "ratings",
        "HTTPRoute",
        "default",
        "Service, name: ratings",
    )
}

/// Writes cluster1 with `reviews` (HTTP, 10.96.1.12:9080) routed by [`GRANT_ROUTES`], the
/// Service reviews-v1 (`v1`) in default and ratings (`ratings`) in namespace ratings,
/// and [`grants_that_do_not_count`]; [`ratings_grant`] goes to `grant.yaml` when the
/// test writes it.
pub fn grant_cluster(dir: &Path, v1: std::net::SocketAddr, ratings: std::net::SocketAddr) {
    let c1 = dir.join("cluster1");
    std::fs::create_dir_all(&c1).unwrap();
    let objects = [
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: default, labels: {topology.istio.io/network: network1}}\n---\n".to_owned(),
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: ratings, labels: {topology.istio.io/network: network1}}\n---\n".to_owned(),
        gamma_service("reviews", "10.96.1.12", "http", 9080),
        gamma_service("reviews-v1", "10.96.1.13", "http", 9080),
        service_in("ratings", "ratings", "10.96.1.15", "http", 9080),
        gamma_pod("reviews-v1", "reviews", "v1"),
        pod_in("ratings", "ratings-v1", "ratings", "v1"),
        gamma_slice("reviews-v1", "http", &[("reviews-v1", v1)]),
        slice_in("ratings", "ratings", "http", &[("ratings-v1", ratings)]),
    ]
    .concat();
    write(c1.join("objects.yaml"), objects).unwrap();
    write(c1.join("routes.yaml"), GRANT_ROUTES).unwrap();
    write(c1.join("grants.yaml"), grants_that_do_not_count()).unwrap();
}
