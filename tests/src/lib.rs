//! End-to-end tests across clusters built from Linux network namespaces.
//!
//! The helpers here build what a test needs and take it all down on drop: network
//! namespaces named after the test and the process (so tests run side by side), veth
//! links, processes of the workspace's own binaries started inside a namespace, and code
//! run on a thread that has entered one (a network namespace is a per-thread property).
//! They need root; [`require_root`] fails a test loudly instead of letting it pass.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Fails the test, loudly, when not root: these tests cannot be skipped silently.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    assert_eq!(
        uid, 0,
        "this end-to-end test builds network namespaces and needs root (CI runs it as root)"
    );
}

/// A workspace binary, built beside this test (`cargo nextest run --workspace` builds them).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built: run `cargo build --workspace` (scripts/test.sh does)",
        path.display()
    );
    path
}

/// Runs `cmd`, panicking with its output if it fails.
pub fn sh(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ip(args: &[&str]) -> String {
    sh(Command::new("ip").args(args))
}

/// One network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// `ip netns add <prefix>-<short>`.
    pub fn new(prefix: &str, short: &str) -> Netns {
        let name = format!("{prefix}-{short}");
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        Netns { name }
    }

    /// A command run inside this namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// `ip -n <ns> ...`.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// Runs `f` on a thread inside this namespace and returns its result; sockets it opens
    /// live in the namespace.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.spawn_thread(f).join().expect("netns thread panicked")
    }

    /// Starts `f` on a thread inside this namespace.
    pub fn spawn_thread<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            use std::os::fd::AsRawFd;
            // SAFETY: setns on a namespace file we hold open; it affects only this thread.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
            f()
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

/// Joins `a` and `b` with a veth pair, `a_addr` (CIDR) on a's end and `b_addr` on b's.
pub fn link(a: &Netns, a_if: &str, a_addr: &str, b: &Netns, b_if: &str, b_addr: &str) {
    // Created in a, its peer moved into b: no interface ever appears in the host namespace.
    a.ip(&[
        "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", &b.name,
    ]);
    a.ip(&["addr", "add", a_addr, "dev", a_if]);
    b.ip(&["addr", "add", b_addr, "dev", b_if]);
    a.ip(&["link", "set", a_if, "up"]);
    b.ip(&["link", "set", b_if, "up"]);
}

/// A prefix unique to this test in this process, short enough for interface names.
pub fn prefix(test: &str) -> String {
    format!("it{}{}", std::process::id() % 100_000, test)
}

/// A child process, killed (and reaped) on drop; its output goes to a log file.
pub struct Process {
    pub child: Child,
    pub log: PathBuf,
}

impl Process {
    /// Starts `cmd` with stdout and stderr in `log`.
    pub fn start(mut cmd: Command, log: PathBuf) -> Process {
        let file = std::fs::File::create(&log).unwrap();
        let child = cmd
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        Process { child, log }
    }

    /// The log so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle`, failing with the log after `patience`.
    pub fn wait_for(&mut self, needle: &str, patience: Duration) {
        eventually(patience, || {
            if self.output().contains(needle) {
                return Ok(());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("exited ({status}) before {needle:?}:\n{}", self.output());
            }
            Err(format!("no {needle:?} yet:\n{}", self.output()))
        })
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `f` until it returns `Ok`, for at most `patience`; the last error explains a
/// failure.
pub fn eventually<T>(patience: Duration, mut f: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + patience;
    loop {
        match f() {
            Ok(v) => return v,
            Err(e) if Instant::now() >= deadline => panic!("not within {patience:?}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// One HTTP/1.1 GET of `path` over a fresh connection, bounded in time; returns (status, body).
pub fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<(u16, String), String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    write!(s, "GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n").map_err(|e| e.to_string())?;
    let mut text = String::new();
    s.read_to_string(&mut text)
        .map_err(|e| format!("read from {addr}: {e}"))?;
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no HTTP answer from {addr}: {text:?}"))?;
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_owned();
    Ok((status, body))
}

/// The value of the first sample of `family` whose labels include all of `labels`, from a
/// Prometheus text page.
pub fn metric(page: &str, family: &str, labels: &[(&str, &str)]) -> Option<f64> {
    page.lines()
        .filter(|l| l.starts_with(family) && !l.starts_with('#'))
        .filter(|l| l[family.len()..].starts_with(['{', ' ']))
        .find(|l| labels.iter().all(|(k, v)| l.contains(&format!("{k}=\"{v}\""))))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// A scratch directory for one test, emptied first.
pub fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("isthmus-e2e-{name}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A blocking HTTP/1.1 server on `addr` (bind it inside a namespace with [`Netns::run`])
/// answering every request with `answer(headers)` as the body; one thread per connection.
pub fn http_server(addr: SocketAddr, answer: fn(&[(String, String)]) -> String) {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut stream = stream;
                loop {
                    let mut headers = Vec::new();
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    loop {
                        line.clear();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                        if let Some((k, v)) = line.split_once(':') {
                            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
                        }
                    }
                    let body = answer(&headers);
                    let close = headers.iter().any(|(k, v)| k == "connection" && v == "close");
                    let reply = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}", body.len());
                    if stream.write_all(reply.as_bytes()).is_err() || close {
                        return;
                    }
                }
            });
        }
    });
}

/// The mesh's own processes, started inside lab namespaces.
pub mod mesh {
    use std::path::{Path, PathBuf};
    use std::process::Command;
    use std::time::Duration;

    use super::{Netns, Process, binary, sh};

    /// `federation-controller ca init-mesh`: a shared root and one intermediate per cluster
    /// under `dir`; returns `dir`.
    pub fn init_mesh(dir: &Path, clusters: &[&str]) -> PathBuf {
        sh(Command::new(binary("federation-controller")).args([
            "ca",
            "init-mesh",
            "--out",
            dir.to_str().unwrap(),
            "--clusters",
            &clusters.join(","),
        ]));
        dir.to_owned()
    }

    /// A controller in `ns` serving xDS on IP:15010 and the CA on IP:15012, from the
    /// manifests in `clusters` and the CA in `ca_dir`.
    pub fn controller(ns: &Netns, ip: &str, clusters: &Path, ca_dir: &Path, log: PathBuf) -> Process {
        let mut c = ns.command(binary("federation-controller"));
        c.args([
            "serve",
            "--manifests",
            clusters.to_str().unwrap(),
            "--ca-dir",
            ca_dir.to_str().unwrap(),
            "--xds",
            &format!("{ip}:15010"),
            "--secure",
            &format!("{ip}:15012"),
            "--monitoring",
            &format!("{ip}:15014"),
            "--interval",
            "100ms",
        ]);
        let mut p = Process::start(c, log);
        p.wait_for("xds=", Duration::from_secs(30));
        p
    }

    /// One workload's capturing sidecar.
    pub struct Sidecar<'a> {
        pub ns: &'a Netns,
        /// Service account in namespace `default`.
        pub sa: &'a str,
        pub cluster: &'a str,
        pub network: &'a str,
        pub pod_ip: &'a str,
        /// Its controller's IP.
        pub controller: &'a str,
        /// Its cluster's CA directory (bootstrap key, root).
        pub ca_dir: &'a Path,
        /// Inbound PeerAuthentication mode.
        pub mtls: &'a str,
    }

    impl Sidecar<'_> {
        /// Installs the capture rules and starts the sidecar; returns once it listens.
        pub fn start(&self, scratch: &Path) -> Process {
            let identity = format!("spiffe://cluster.local/ns/default/sa/{}", self.sa);
            let token = scratch.join(format!("{}.token", self.sa));
            let minted = sh(Command::new(binary("federation-controller")).args([
                "ca",
                "token",
                "--ca-dir",
                self.ca_dir.to_str().unwrap(),
                "--identity",
                &identity,
            ]));
            std::fs::write(&token, minted.trim()).unwrap();
            sh(self.ns.command(binary("sidecar")).args(["init", "--apply"]));
            let mut cmd = self.ns.command(binary("sidecar"));
            cmd.args([
                "run",
                "--capture",
                "--xds",
                &format!("http://{}:15010", self.controller),
                "--ca-address",
                &format!("https://{}:15012", self.controller),
                "--token-file",
                token.to_str().unwrap(),
                "--identity",
                &identity,
                "--ca",
                self.ca_dir.join("root-cert.pem").to_str().unwrap(),
                "--network",
                self.network,
                "--cluster",
                self.cluster,
                "--pod-ip",
                self.pod_ip,
                "--protocol",
                "http",
                "--service",
                &format!("{}.default.svc.cluster.local", self.sa),
                "--metrics",
                "0.0.0.0:15090",
                "--mtls",
                self.mtls,
            ]);
            let mut p = Process::start(cmd, scratch.join(format!("{}-{}.log", self.sa, self.mtls)));
            p.wait_for("ready ", Duration::from_secs(30));
            p
        }
    }

    /// The Prometheus page on 127.0.0.1:15090 inside `ns` (a sidecar's or a gateway's).
    pub fn stats(ns: &Netns) -> String {
        ns.run(|| {
            super::http_get(
                "127.0.0.1:15090".parse().unwrap(),
                "/stats/prometheus",
                Duration::from_secs(2),
            )
            .map(|(_, body)| body)
            .unwrap_or_default()
        })
    }

    /// The application answer of the tests: the `x-forwarded-client-cert` it was handed, or `-`.
    pub fn xfcc(headers: &[(String, String)]) -> String {
        headers
            .iter()
            .find(|(k, _)| k == "x-forwarded-client-cert")
            .map_or("-".to_owned(), |(_, v)| v.clone())
    }

    /// One GET of `/` from inside `ns`.
    pub fn get_from(ns: &Netns, addr: &str) -> Result<(u16, String), String> {
        let addr: std::net::SocketAddr = addr.parse().unwrap();
        ns.run(move || super::http_get(addr, "/", Duration::from_secs(3)))
    }

    /// GETs `addr` from `ns` until its sidecar has a route for it, and returns the answer.
    /// An empty 404 is the sidecar's own "no route" (Envoy's `NR`): the routes it has may
    /// be of services the controller merged before the one asked for.
    pub fn get_routed(ns: &Netns, addr: &str) -> (u16, String) {
        super::eventually(Duration::from_secs(20), || match get_from(ns, addr)? {
            (404, body) if body.is_empty() => Err(format!("{}'s sidecar has no route to {addr} yet", ns.name)),
            answer => Ok(answer),
        })
    }

    /// Waits until the sidecar in `ns` has at least one route from xDS.
    pub fn wait_for_routes(ns: &Netns) {
        super::eventually(Duration::from_secs(20), || {
            match super::metric(&stats(ns), "isthmus_sidecar_xds_routes", &[]) {
                Some(n) if n >= 1.0 => Ok(()),
                other => Err(format!("{}'s sidecar has no route yet ({other:?})", ns.name)),
            }
        });
    }
}
