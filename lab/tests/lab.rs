//! `isthmus lab up` and `lab down` for real: network namespaces, veths, bridges, iptables and
//! the real controller, gateway and demo-app processes. Run as root (they fail, loudly,
//! otherwise). Every lab gets a prefix of its own (`isl-<pid>-<tag>`) and a state directory
//! of its own, so these tests run in parallel, and is taken down on drop, also when a test
//! fails.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use lab::netns;
use lab::plan::{GATEWAY_PORT, HEALTH_PORT, Plan};
use lab::probe;
use lab::state::{LabState, STATE_FILE};
use lab::topologies;

const ISTHMUS: &str = env!("CARGO_BIN_EXE_isthmus");

fn require_root() {
    // SAFETY: geteuid(2) has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test builds network namespaces and must run as root"
    );
    // Processes the lab starts outlive `lab up`; becoming their subreaper lets the test
    // reap them and so see that they really exited (this machine's PID 1 reaps nothing).
    // SAFETY: prctl(2) with PR_SET_CHILD_SUBREAPER takes one integer argument.
    assert_eq!(unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) }, 0);
}

/// The directory with `federation-controller`, `eastwest-gateway` and `sidecar`, built when missing or
/// older than their sources (`cargo nextest run -p lab` builds only this crate's binaries;
/// a workspace run has just built them, perhaps with other features, and is not redone).
fn bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = Path::new(ISTHMUS).parent().unwrap().to_owned();
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let sources = ["federation-controller", "eastwest-gateway", "sidecar", "mesh-vocab"]
            .iter()
            .map(|c| newest(&root.join(c), 0))
            .chain([newest(&root.join("Cargo.lock"), 0)])
            .max()
            .flatten();
        let fresh = ["federation-controller", "eastwest-gateway", "sidecar"]
            .iter()
            .all(|b| {
                let built = std::fs::metadata(dir.join(b)).and_then(|m| m.modified()).ok();
                matches!((built, sources), (Some(b), Some(s)) if b >= s)
            });
        if fresh {
            return dir;
        }
        let mut cargo = Command::new(env!("CARGO"));
        cargo.args([
            "build",
            "--locked",
            "-p",
            "federation-controller",
            "-p",
            "eastwest-gateway",
            "-p",
            "sidecar",
            "--bin",
            "federation-controller",
            "--bin",
            "eastwest-gateway",
            "--bin",
            "sidecar",
        ]);
        if dir.ends_with("release") {
            cargo.arg("--release");
        }
        let out = cargo.output().expect("cargo runs");
        assert!(
            out.status.success(),
            "building the lab's binaries: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        dir
    })
}

/// The newest modification time of a file, or of the files under a directory (`src/`,
/// `Cargo.toml`; a few levels deep).
fn newest(path: &Path, depth: usize) -> Option<std::time::SystemTime> {
    let meta = std::fs::metadata(path).ok()?;
    if meta.is_file() {
        return meta.modified().ok();
    }
    if depth > 4 {
        return None;
    }
    std::fs::read_dir(path)
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| {
            depth > 0
                || matches!(
                    e.file_name().to_str(),
                    Some("src" | "Cargo.toml" | "build.rs" | "proto")
                )
        })
        .filter_map(|e| newest(&e.path(), depth + 1))
        .max()
}

fn text(o: &Output) -> String {
    format!(
        "status {}\n--- stdout\n{}--- stderr\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A lab of one test; taken down on drop.
struct Lab {
    plan: Plan,
    dir: PathBuf,
}

impl Lab {
    fn paths(tag: &str) -> (String, PathBuf) {
        let prefix = format!("isl-{}-{tag}", std::process::id());
        let dir = std::env::temp_dir().join(format!("{prefix}-state"));
        let _ = std::fs::remove_dir_all(&dir);
        (prefix, dir)
    }

    fn command(prefix: &str, dir: &Path, topology: &str, bins: &Path) -> Command {
        let mut c = Command::new(ISTHMUS);
        c.args(["lab", "up", topology, "--prefix", prefix, "--state-dir"])
            .arg(dir)
            .arg("--bin-dir")
            .arg(bins)
            .stdin(Stdio::null());
        c
    }

    /// `isthmus lab up TOPOLOGY`, with sidecars, which must succeed; and what it printed.
    fn up(topology: &str, tag: &str) -> (Lab, String) {
        Self::start(topology, tag, &[])
    }

    /// `isthmus lab up --no-sidecars TOPOLOGY`: the network plumbing alone, plaintext pod
    /// to pod, so probes from a pod see the network itself.
    fn plain(topology: &str, tag: &str) -> Lab {
        Self::start(topology, tag, &["--no-sidecars"]).0
    }

    fn start(topology: &str, tag: &str, extra: &[&str]) -> (Lab, String) {
        let (prefix, dir) = Self::paths(tag);
        let lab = Lab {
            plan: Plan::new(&topologies::by_name(topology).unwrap(), &prefix).unwrap(),
            dir,
        };
        let out = Self::command(&prefix, &lab.dir, topology, bin_dir())
            .args(extra)
            .output()
            .unwrap();
        assert!(out.status.success(), "lab up {topology}: {}", text(&out));
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(stdout.contains(&format!("lab `{topology}` is up in")), "{stdout}");
        (lab, stdout)
    }

    fn state(&self) -> LabState {
        serde_json::from_str(&std::fs::read_to_string(self.dir.join(STATE_FILE)).unwrap()).unwrap()
    }

    fn down(&self) -> Output {
        Command::new(ISTHMUS)
            .args(["lab", "down", "--state-dir"])
            .arg(&self.dir)
            .output()
            .unwrap()
    }

    fn pod(&self, cluster: usize, name: &str) -> (String, SocketAddr) {
        let p = self.plan.cluster(cluster).pod(name).unwrap();
        (p.host.netns.clone(), SocketAddr::new(IpAddr::V4(p.host.ip), p.port))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.dir.join(STATE_FILE).exists() {
            let out = self.down();
            if !out.status.success() {
                eprintln!("lab down on drop: {}", text(&out));
            }
        }
        // Whatever `lab down` missed must not outlive the test.
        let ours = format!("{}-", self.plan.prefix);
        for ns in netns::list()
            .unwrap_or_default()
            .into_iter()
            .filter(|n| n.starts_with(&ours))
        {
            let _ = netns::delete(&ns);
        }
        reap();
        // What the test itself wrote there (a report, a manifest to apply): the directory is
        // this test's own.
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Reaps every exited child (the lab's processes, reparented to us).
fn reap() {
    loop {
        // SAFETY: waitpid(2) on any child, not blocking, status discarded.
        let pid = unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) };
        if pid <= 0 {
            break;
        }
    }
}

/// Asserts nothing of `state` is left: no namespace with its prefix, none of its
/// processes, no new host link of its names, no state file.
#[track_caller]
fn assert_nothing_left(state: &LabState, dir: &Path, host_links_before: &BTreeSet<String>) {
    let ours = format!("{}-", state.prefix);
    let left: Vec<String> = netns::list()
        .unwrap()
        .into_iter()
        .filter(|n| n.starts_with(&ours))
        .collect();
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
    reap();
    for p in &state.processes {
        let alive = std::fs::read_to_string(format!("/proc/{}/stat", p.pid))
            .ok()
            .and_then(|s| s[s.rfind(')')? + 1..].split_whitespace().nth(19)?.parse::<u64>().ok())
            .is_some_and(|t| t == p.start_time);
        assert!(!alive, "process {} ({}) is still there", p.pid, p.name);
    }
    let names: BTreeSet<&str> = state.links.iter().map(|l| l.name.as_str()).collect();
    let new: Vec<String> = host_links()
        .difference(host_links_before)
        .filter(|l| names.contains(l.as_str()))
        .cloned()
        .collect();
    assert!(new.is_empty(), "links left in the host namespace: {new:?}");
    assert!(!dir.join(STATE_FILE).exists(), "state file left behind");
}

fn host_links() -> BTreeSet<String> {
    let out = netns::run("ip", &["-o", "link", "show"]).unwrap();
    out.lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_owned())
        .collect()
}

const QUICK: Duration = Duration::from_secs(1);

/// Asserts `lab up`'s mesh check reports that `cluster`'s productpage reached each of
/// `pods` ("cluster version") of reviews.
#[track_caller]
fn reached(stdout: &str, cluster: &str, pods: &[&str]) {
    let head = format!("{cluster} productpage-v1 → reviews: ");
    let line = stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix(&head))
        .unwrap_or_else(|| panic!("no {head:?} in {stdout}"));
    for p in pods {
        assert!(line.contains(&format!("{p} ×")), "{cluster} did not reach {p}: {line}");
    }
    assert_eq!(line.matches(" ×").count(), pods.len(), "{line}");
}

#[test]
fn sidecars_carry_mtls_across_networks_only_through_the_gateways() {
    require_root();
    let (lab, stdout) = Lab::up("multi-primary-gateways", "mesh");
    for k in 1..=3 {
        reached(
            &stdout,
            &format!("cluster{k}"),
            &["cluster1 v1", "cluster2 v1", "cluster3 v1", "cluster3 v2"],
        );
    }
    let (client, _) = lab.pod(1, "productpage-v1");
    let c1 = lab.plan.cluster(1);
    let reviews = c1.services.iter().find(|s| s.name == "reviews").unwrap();
    let vip = SocketAddr::new(IpAddr::V4(reviews.vip), reviews.port);
    let gw2 = lab.plan.cluster(2).gateway.clone().unwrap();
    let through_gw2 = || {
        let page = probe::get(
            &gw2.host.netns,
            SocketAddr::from(([127, 0, 0, 1], 15090)),
            "/stats/prometheus",
            QUICK,
        )
        .unwrap()
        .body;
        metric(
            &page,
            "istio_tcp_connections_opened_total",
            &[
                "destination_service=\"reviews.default.svc.cluster.local\"",
                "destination_cluster=\"cluster2\"",
            ],
        )
    };
    let before = through_gw2();

    // productpage calls reviews' ClusterIP in its own cluster; its sidecar spreads the calls
    // over every cluster, and every answer, from whichever network, names productpage's
    // SPIFFE ID: the mTLS went end to end, through the gateways untouched.
    let me = "spiffe://cluster.local/ns/default/sa/bookinfo-productpage";
    let mut clusters = BTreeSet::new();
    for _ in 0..40 {
        let r = probe::get(&client, vip, "/", Duration::from_secs(3)).unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(v["caller"], me, "{}", r.body);
        clusters.insert(v["cluster"].as_str().unwrap().to_owned());
        if clusters.len() == 3 {
            break;
        }
    }
    assert_eq!(
        clusters,
        BTreeSet::from(["cluster1".into(), "cluster2".into(), "cluster3".into()])
    );
    // The sidecar pools HTTP/2 connections (a few per gateway, renewed every 32 requests),
    // so these calls may ride a connection the mesh check opened: the gateway has counted
    // at least one, and cluster2 answering is proof enough that this one crossed it — its
    // pod network is unreachable from cluster1 otherwise (asserted above).
    let counted = probe::until(Duration::from_secs(5), Duration::from_millis(20), || {
        let n = through_gw2();
        if n >= 1.0 && n >= before { Ok(n) } else { Err(n) }
    });
    assert!(
        counted.is_ok(),
        "cluster2's gateway counted no connection to reviews: {counted:?}"
    );

    // And the remote pod network itself stays out of reach (from the node: not captured).
    let (_, remote) = lab.pod(2, "reviews-v1");
    let e = probe::connect(&c1.node.netns, remote, QUICK).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::NetworkUnreachable, "{e}");
}

#[test]
fn sidecars_on_a_flat_network_reach_the_other_cluster_directly() {
    require_root();
    let (lab, stdout) = Lab::up("multi-primary", "flatmesh");
    assert!(lab.plan.transit.is_none(), "no gateway on one network");
    for from in ["cluster1", "cluster2"] {
        reached(&stdout, from, &["cluster1 v1", "cluster2 v1", "cluster2 v2"]);
    }
}

#[test]
fn gateways_topology_separates_networks_and_joins_them_only_over_the_transit_link() {
    require_root();
    let lab = Lab::plain("multi-primary-gateways", "gw");
    let (client, own) = lab.pod(1, "productpage-v1");
    let (_, local_reviews) = lab.pod(1, "reviews-v1");
    let (_, remote_reviews) = lab.pod(2, "reviews-v1");
    let gw = |k: usize| lab.plan.cluster(k).gateway.clone().unwrap();

    // Within a cluster, pods talk.
    let r = probe::get(&client, local_reviews, "/", QUICK).unwrap();
    assert_eq!(r.body, r#"{"caller":null,"cluster":"cluster1","version":"v1"}"#);
    assert_eq!(own.ip(), IpAddr::from([10, 241, 1, 2]));

    // Another network's pods are unreachable from a pod, the node and the gateway alike.
    for from in [&client, &lab.plan.cluster(1).node.netns, &gw(1).host.netns] {
        let e = probe::connect(from, remote_reviews, QUICK).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::NetworkUnreachable, "from {from}: {e}");
    }

    // The gateways reach each other over the transit link, and pods reach the other
    // networks' gateways (the path a sidecar takes), whose readiness says they have routes.
    let gw2 = SocketAddr::new(IpAddr::V4(gw(2).transit_ip), GATEWAY_PORT);
    probe::connect(&gw(1).host.netns, gw2, QUICK).unwrap();
    probe::connect(&client, gw2, QUICK).unwrap();
    let health = SocketAddr::new(IpAddr::V4(gw(3).transit_ip), HEALTH_PORT);
    assert_eq!(
        probe::get(&client, health, "/healthz/ready", QUICK).unwrap().status,
        200
    );

    // Even routed at it on purpose, a gateway forwards nothing into its network.
    let pod_cidr2 = lab.plan.cluster(2).pod_cidr.to_string();
    let c1 = lab.plan.cluster(1);
    netns::ip(&client, &["route", "add", &pod_cidr2, "via", &c1.node.ip.to_string()]).unwrap();
    netns::ip(
        &c1.node.netns,
        &["route", "add", &pod_cidr2, "via", &gw(1).host.ip.to_string()],
    )
    .unwrap();
    netns::ip(
        &gw(1).host.netns,
        &["route", "add", &pod_cidr2, "via", &gw(2).transit_ip.to_string()],
    )
    .unwrap();
    let e = probe::connect(&client, remote_reviews, QUICK).unwrap_err();
    assert_eq!(
        e.kind(),
        std::io::ErrorKind::TimedOut,
        "dropped at the remote gateway: {e}"
    );

    // Cluster 3 runs v2 beside v1.
    let (c3client, _) = lab.pod(3, "productpage-v1");
    let (_, v2) = lab.pod(3, "reviews-v2");
    assert_eq!(
        probe::get(&c3client, v2, "/", QUICK).unwrap().body,
        r#"{"caller":null,"cluster":"cluster3","version":"v2"}"#
    );
}

#[test]
fn flat_multi_primary_routes_pods_across_clusters() {
    require_root();
    let lab = Lab::plain("multi-primary", "flat");
    assert!(lab.plan.transit.is_none());
    let (client, _) = lab.pod(1, "productpage-v1");
    let (_, remote_v2) = lab.pod(2, "reviews-v2");
    let r = probe::get(&client, remote_v2, "/", QUICK).unwrap();
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, r#"{"caller":null,"cluster":"cluster2","version":"v2"}"#)
    );
    // Both controllers run and are ready, each on its own cluster's bridge.
    for k in [1, 2] {
        let ctl = lab.plan.cluster(k).controller.clone().unwrap();
        let ready = probe::get(&client, SocketAddr::new(IpAddr::V4(ctl.ip), 15014), "/ready", QUICK).unwrap();
        assert_eq!(ready.status, 200, "controller of cluster{k}: {}", ready.body);
    }
    // No default route anywhere: an address outside the plan is unreachable.
    let e = probe::connect(&client, SocketAddr::from(([192, 0, 2, 1], 80)), QUICK).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::NetworkUnreachable, "{e}");
}

#[test]
fn down_leaves_nothing_behind_and_is_idempotent() {
    require_root();
    let before = host_links();
    let (lab, _) = Lab::up("multi-primary-gateways", "down");
    let state = lab.state();
    assert!(state.complete);
    assert_eq!(
        state.processes.len(),
        3 + 3 + 4 + 7,
        "controllers, gateways, reviews pods, sidecars"
    );
    assert_eq!(state.namespaces.len(), lab.plan.namespaces().len());
    for ns in &state.namespaces {
        assert!(netns::exists(ns), "{ns} recorded but missing");
    }
    // A process the record does not know, in one of the lab's namespaces, goes too.
    let (pod_ns, _) = lab.pod(2, "productpage-v1");
    let mut stray = Command::new("ip")
        .args(["netns", "exec", &pod_ns, "sleep", "60"])
        .spawn()
        .unwrap();
    let stray_pid = stray.id().to_string();
    probe::until(Duration::from_secs(5), Duration::from_millis(5), || {
        let pids = netns::run("ip", &["netns", "pids", &pod_ns]).unwrap();
        if pids.split_whitespace().any(|p| p == stray_pid) {
            Ok(())
        } else {
            Err(pids)
        }
    })
    .unwrap();
    let out = lab.down();
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("stopped 17 of 17 processes"), "{}", text(&out));
    assert!(stdout.contains("stopped 1 unrecorded processes"), "{}", text(&out));
    assert!(
        stray.wait().unwrap().code().is_none(),
        "the stray was killed by a signal"
    );
    assert_nothing_left(&state, &lab.dir, &before);
    let again = lab.down();
    assert!(again.status.success(), "{}", text(&again));
    assert!(
        String::from_utf8_lossy(&again.stdout).contains("nothing to take down"),
        "{}",
        text(&again)
    );
}

#[test]
fn down_after_a_crashed_up_removes_what_it_had_made() {
    require_root();
    let before = host_links();
    let (prefix, dir) = Lab::paths("crash");
    let lab = Lab {
        plan: Plan::new(&topologies::default_topology(), &prefix).unwrap(),
        dir: dir.clone(),
    };
    // Crash `lab up` once it has started processes, mid-way through.
    let mut up = up_until_a_process_runs(&prefix, &dir, Stdio::null());
    up.kill().unwrap();
    up.wait().unwrap();
    let state = lab.state();
    assert!(!state.complete);
    assert!(
        state.namespaces.iter().any(|n| netns::exists(n)),
        "the crash left nothing to clean up"
    );
    let out = lab.down();
    assert!(out.status.success(), "{}", text(&out));
    assert_nothing_left(&state, &dir, &before);
}

/// Spawns `lab up` of the default topology and waits until it has started a process.
fn up_until_a_process_runs(prefix: &str, dir: &Path, stdout: Stdio) -> std::process::Child {
    let mut up = Lab::command(prefix, dir, "multi-primary-gateways", bin_dir())
        .stdout(stdout)
        .spawn()
        .unwrap();
    let started = probe::until(Duration::from_secs(30), Duration::from_millis(2), || {
        let started = std::fs::read_to_string(dir.join(STATE_FILE))
            .ok()
            .and_then(|t| serde_json::from_str::<LabState>(&t).ok())
            .is_some_and(|s| !s.processes.is_empty());
        if started {
            return Ok(());
        }
        assert!(
            up.try_wait().unwrap().is_none(),
            "lab up ended before it started a process"
        );
        Err("lab up started no process in 30 s")
    });
    started.unwrap();
    up
}

#[test]
fn ctrl_c_during_up_takes_down_what_was_made() {
    require_root();
    let before = host_links();
    let (prefix, dir) = Lab::paths("intr");
    let lab = Lab {
        plan: Plan::new(&topologies::default_topology(), &prefix).unwrap(),
        dir: dir.clone(),
    };
    let up = up_until_a_process_runs(&prefix, &dir, Stdio::piped());
    let state = lab.state();
    // SAFETY: kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(up.id() as libc::pid_t, libc::SIGINT) }, 0);
    let out = up.wait_with_output().unwrap();
    let all = text(&out);
    assert!(!out.status.success(), "{all}");
    assert!(all.contains("interrupted"), "{all}");
    assert!(all.contains("cleaning up ...") && all.contains("is down"), "{all}");
    assert_nothing_left(&state, &dir, &before);
}

#[test]
fn a_failed_step_is_named_and_everything_made_is_removed() {
    require_root();
    let before = host_links();
    let (prefix, dir) = Lab::paths("fail");
    // A bin dir whose controller refuses to serve (but still makes CAs).
    let bins = std::env::temp_dir().join(format!("{prefix}-bin"));
    let _ = std::fs::remove_dir_all(&bins);
    std::fs::create_dir_all(&bins).unwrap();
    for b in ["eastwest-gateway", "isthmus", "sidecar"] {
        std::os::unix::fs::symlink(bin_dir().join(b), bins.join(b)).unwrap();
    }
    let real = bin_dir().join("federation-controller");
    let fake = format!(
        "#!/bin/sh\n[ \"$1\" = ca ] && exec {} \"$@\"\necho 'refusing to serve: broken on purpose' >&2\nexit 3\n",
        real.display()
    );
    let path = bins.join("federation-controller");
    std::fs::write(&path, fake).unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let lab = Lab {
        plan: Plan::new(&topologies::default_topology(), &prefix).unwrap(),
        dir: dir.clone(),
    };
    let out = Lab::command(&prefix, &dir, "multi-primary-gateways", &bins)
        .output()
        .unwrap();
    let all = text(&out);
    assert!(!out.status.success(), "{all}");
    assert!(all.contains("cluster1: controller at 10.241.0.2 ... FAILED"), "{all}");
    assert!(
        all.contains("refusing to serve: broken on purpose"),
        "the log tail is shown: {all}"
    );
    assert!(
        all.contains("step 10 of 19 failed: cluster1: controller at 10.241.0.2"),
        "{all}"
    );
    assert!(all.contains("cleaning up ...") && all.contains("is down"), "{all}");
    let recorded = LabState {
        prefix: prefix.clone(),
        ..LabState::default()
    };
    assert_nothing_left(&recorded, &dir, &before);
    drop(lab);
    std::fs::remove_dir_all(&bins).unwrap();
}

/// `isthmus ARGS…` as the unprivileged user `nobody`.
fn as_nobody(args: &[&str], dir: &Path) -> Output {
    Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", ISTHMUS])
        .args(args)
        .arg("--state-dir")
        .arg(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn without_root_the_lab_runs_on_loopback_and_says_networks_are_not_enforced() {
    require_root();
    let bins = bin_dir().to_str().unwrap().to_owned();
    let dir = std::env::temp_dir().join(format!("isl-{}-loopback", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let up = as_nobody(&["lab", "up", "--bin-dir", &bins], &dir);
    let all = text(&up);
    // Taken down whatever happens next.
    struct Down<'a>(&'a Path);
    impl Drop for Down<'_> {
        fn drop(&mut self) {
            if self.0.join(STATE_FILE).exists() {
                let _ = as_nobody(&["lab", "down"], self.0);
            }
            reap();
        }
    }
    let _down = Down(&dir);
    assert!(up.status.success(), "{all}");
    assert!(all.contains("Networks are NOT enforced"), "{all}");
    assert!(
        all.contains("is up in") && all.contains("on loopback (networks not enforced)"),
        "{all}"
    );
    // Each productpage reached every cluster over its routes, as itself.
    for c in ["cluster1", "cluster2", "cluster3"] {
        let line = all
            .lines()
            .find(|l| l.trim().starts_with(&format!("{c} productpage-v1 → routes: ")))
            .unwrap_or_else(|| panic!("{all}"));
        for d in ["cluster1", "cluster2", "cluster3"] {
            assert!(line.contains(&format!("{d} v")), "{c} did not reach {d}: {line}");
        }
    }
    // (Other tests' labs come and go meanwhile, each under its own prefix.)
    let ours: Vec<String> = netns::list()
        .unwrap()
        .into_iter()
        .filter(|n| n.starts_with("isl-cluster"))
        .collect();
    assert!(ours.is_empty(), "a loopback lab makes no namespace: {ours:?}");
    let state: LabState = serde_json::from_str(&std::fs::read_to_string(dir.join(STATE_FILE)).unwrap()).unwrap();
    assert!(state.loopback && state.namespaces.is_empty() && state.links.is_empty());

    let traffic = as_nobody(&["lab", "traffic", "-n", "60", "--json"], &dir);
    assert!(traffic.status.success(), "{}", text(&traffic));
    let r: serde_json::Value = serde_json::from_slice(&traffic.stdout).unwrap();
    assert_eq!((r["sent"].as_u64(), r["failed"].as_u64()), (Some(60), Some(0)), "{r:#}");
    assert_eq!(r["loopback_routes"].as_array().unwrap().len(), 3, "{r:#}");
    let by_cluster = r["by_cluster"].as_object().unwrap();
    assert_eq!(by_cluster.len(), 3, "{r:#}");
    // Through the gateways: the other clusters' gateways counted cluster1's connections.
    let status = as_nobody(&["lab", "status", "--json"], &dir);
    assert!(status.status.success(), "{}", text(&status));
    let s: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    let clusters = s["clusters"].as_array().unwrap();
    assert_eq!(clusters.len(), 3);
    for c in clusters {
        assert_eq!(c["controller"]["ready"], true, "{c:#}");
        assert_eq!(c["gateway"]["healthy"], true, "{c:#}");
        assert!(c["gateway"]["connections_opened"].as_f64().unwrap() > 0.0, "{c:#}");
        for p in c["pods"].as_array().unwrap() {
            assert_eq!(p["sidecar_running"], true, "{p}");
            assert!(p["svid_expiry_unix"].as_i64().is_some(), "{p}");
        }
    }
    // Drills and impairments need networks to break.
    for args in [
        &["drill", "failover", "--scenario", "gateway-loss"][..],
        &["lab", "impair", "--cluster", "cluster2", "--delay", "10ms"],
    ] {
        let refused = as_nobody(args, &dir);
        assert!(!refused.status.success());
        assert!(
            String::from_utf8_lossy(&refused.stderr).contains("runs on loopback"),
            "{}",
            text(&refused)
        );
    }

    let down = as_nobody(&["lab", "down"], &dir);
    assert!(down.status.success(), "{}", text(&down));
    assert_nothing_left(&state, &dir, &host_links());
}

#[test]
fn demo_app_answers_with_its_cluster_version_and_caller() {
    let mut app = Command::new(ISTHMUS)
        .args([
            "demo-app",
            "--cluster",
            "cluster7",
            "--version",
            "v3",
            "--listen",
            "127.0.0.1:0",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut line = String::new();
    BufReader::new(app.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let app = Kill(app);
    let addr: SocketAddr = line
        .trim()
        .strip_prefix("listening on ")
        .expect("the bound address")
        .parse()
        .unwrap();
    let ask = |xfcc: Option<&str>| {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let header = xfcc
            .map(|v| format!("x-forwarded-client-cert: {v}\r\n"))
            .unwrap_or_default();
        write!(s, "GET / HTTP/1.1\r\nHost: x\r\n{header}Connection: close\r\n\r\n").unwrap();
        let mut body = String::new();
        std::io::Read::read_to_string(&mut s, &mut body).unwrap();
        body.split_once("\r\n\r\n").unwrap().1.to_owned()
    };
    assert_eq!(ask(None), r#"{"caller":null,"cluster":"cluster7","version":"v3"}"#);
    assert_eq!(
        ask(Some(
            "By=spiffe://cluster.local/ns/default/sa/bookinfo-reviews;Hash=ab;URI=spiffe://cluster.local/ns/default/sa/bookinfo-productpage"
        )),
        r#"{"caller":"spiffe://cluster.local/ns/default/sa/bookinfo-productpage","cluster":"cluster7","version":"v3"}"#
    );
    drop(app);
}

/// A real TLS ClientHello for `sni`, as a sidecar would send it to a remote gateway.
fn client_hello(sni: &str) -> Vec<u8> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let name = rustls_pki_types::ServerName::try_from(sni.to_owned()).unwrap();
    let mut conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name).unwrap();
    let mut hello = Vec::new();
    conn.write_tls(&mut hello).unwrap();
    hello
}

/// Sends `bytes` to `addr` from `ns` and reads what comes back until the peer closes.
fn exchange(ns: &str, addr: SocketAddr, bytes: Vec<u8>) -> std::io::Result<Vec<u8>> {
    netns::within(ns, move || {
        let mut s = TcpStream::connect_timeout(&addr, QUICK)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(&bytes)?;
        let mut back = Vec::new();
        std::io::Read::read_to_end(&mut s, &mut back)?;
        Ok(back)
    })?
}

/// The sum of `metric` samples whose labels include every one of `labels`.
fn metric(text: &str, metric: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(metric) && labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn a_connection_crosses_networks_through_the_remote_gateway_by_sni() {
    require_root();
    let lab = Lab::plain("multi-primary-gateways", "sni");
    let (client, _) = lab.pod(1, "productpage-v1");
    let gw2 = lab.plan.cluster(2).gateway.clone().unwrap();
    let metrics_of = |gw: &lab::plan::GatewayPlan| {
        let addr = SocketAddr::new(IpAddr::V4(gw.transit_ip), lab::plan::METRICS_PORT);
        probe::get(&client, addr, "/stats/prometheus", QUICK).unwrap().body
    };
    let opened = |text: &str| {
        metric(
            text,
            "istio_tcp_connections_opened_total",
            &["destination_cluster=\"cluster2\""],
        )
    };
    let before = opened(&metrics_of(&gw2));

    // cluster1's pod has no route to cluster2's pods, yet bytes with reviews' SNI sent to
    // cluster2's gateway reach reviews there: the plaintext demo app cannot read a TLS
    // ClientHello and answers 400, through the gateway, which is all this test needs.
    let sni = "outbound_.9080_._.reviews.default.svc.cluster.local";
    let back = exchange(
        &client,
        SocketAddr::new(IpAddr::V4(gw2.transit_ip), GATEWAY_PORT),
        client_hello(sni),
    )
    .unwrap();
    let back = String::from_utf8_lossy(&back);
    assert!(
        back.starts_with("HTTP/1.1 400"),
        "reviews in cluster2 answered through the gateway: {back:?}"
    );
    let after = probe::until(Duration::from_secs(5), Duration::from_millis(20), || {
        let n = opened(&metrics_of(&gw2));
        if n > before { Ok(n) } else { Err(n) }
    });
    assert!(
        after.is_ok(),
        "cluster2's gateway counted no connection to cluster2: {after:?}"
    );

    // An SNI the gateway does not know is closed at once, unanswered.
    let unknown = exchange(
        &client,
        SocketAddr::new(IpAddr::V4(gw2.transit_ip), GATEWAY_PORT),
        client_hello("outbound_.9080_._.ratings.default.svc.cluster.local"),
    )
    .unwrap_or_default();
    assert!(unknown.is_empty(), "{unknown:?}");
    let text = metrics_of(&gw2);
    assert!(
        metric(&text, "isthmus_gateway_rejected_connections_total", &["unknown_sni"]) >= 1.0,
        "{text}"
    );

    // The gateway routes only to its own network: its config holds cluster2's pods alone,
    // as the controller of cluster2 served them.
    let dump = probe::get(
        &gw2.host.netns,
        SocketAddr::from(([127, 0, 0, 1], 15000)),
        "/config_dump",
        QUICK,
    )
    .unwrap();
    let dump: serde_json::Value = serde_json::from_str(&dump.body).unwrap();
    let mut endpoints: Vec<String> = dump["routes"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| {
            r["endpoints"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["address"].as_str().unwrap().to_owned())
        })
        .collect();
    endpoints.sort();
    assert_eq!(endpoints, ["10.242.1.1:9080", "10.242.1.2:9080"], "{dump}");
}

#[test]
fn primary_remote_serves_the_remote_cluster_from_the_primary() {
    require_root();
    let (lab, stdout) = Lab::up("primary-remote", "remote");
    let c2 = lab.plan.cluster(2);
    assert!(c2.controller.is_none(), "a remote runs no controller");
    assert!(!lab.state().namespaces.iter().any(|n| n.ends_with("cluster2-ctl")));
    let (client, _) = lab.pod(2, "productpage-v1");
    // The remote's proxies reach the primary's controller, xDS and CA, across the flat network.
    for port in [lab::plan::XDS_PORT, lab::plan::SECURE_PORT] {
        probe::connect(&client, SocketAddr::new(IpAddr::V4(c2.xds), port), QUICK).unwrap();
    }
    // Both clusters' sidecars got their config and SVIDs from cluster1's controller: every
    // client reached every reviews pod in either cluster through them.
    for from in ["cluster1", "cluster2"] {
        reached(&stdout, from, &["cluster1 v1", "cluster2 v1", "cluster2 v2"]);
    }
}

#[test]
fn single_primary_runs_both_versions_in_one_cluster() {
    require_root();
    let lab = Lab::plain("single-primary", "single");
    assert_eq!(lab.state().processes.len(), 1 + 2, "a controller and two reviews pods");
    let (client, _) = lab.pod(1, "productpage-v1");
    for v in ["v1", "v2"] {
        let (_, reviews) = lab.pod(1, &format!("reviews-{v}"));
        let body = probe::get(&client, reviews, "/", QUICK).unwrap().body;
        assert_eq!(
            body,
            format!(r#"{{"caller":null,"cluster":"cluster1","version":"{v}"}}"#)
        );
    }
    // A second lab on the same state directory, or with the same prefix, is refused and
    // leaves the first alone.
    let other_dir = lab.dir.with_extension("other");
    for (dir, says) in [
        (&lab.dir, "a lab is already up there"),
        (&other_dir, "namespaces exist already"),
    ] {
        let out = Lab::command(&lab.plan.prefix, dir, "single-primary", bin_dir())
            .arg("--no-sidecars")
            .output()
            .unwrap();
        assert!(!out.status.success(), "{}", text(&out));
        assert!(text(&out).contains(says), "{}", text(&out));
    }
    assert!(!other_dir.exists(), "a refused lab writes no state");
    let (_, reviews) = lab.pod(1, "reviews-v1");
    assert_eq!(probe::get(&client, reviews, "/", QUICK).unwrap().status, 200);
    assert_eq!(
        lab.state()
            .processes
            .iter()
            .filter(|p| lab::process::is_running(p))
            .count(),
        3
    );
}

#[test]
fn the_controller_federates_the_manifests_the_lab_writes() {
    let plan = Plan::new(&topologies::default_topology(), "isl").unwrap();
    let dir = std::env::temp_dir().join(format!("isl-{}-manifests", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(lab::manifests::write(&plan, &dir).unwrap(), 31);
    let out = Command::new(bin_dir().join("federation-controller"))
        .args(["view", "--json", "--network", "network1", "--manifests"])
        .arg(&dir)
        .output()
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let view: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let reviews: Vec<String> = view["reviews.default.svc.cluster.local:9080"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            format!(
                "{}:{} w{} {} pinned={}",
                e["address"].as_str().unwrap(),
                e["port"],
                e["weight"],
                e["locality"].as_str().unwrap(),
                e["pinned"].as_str().unwrap_or("-")
            )
        })
        .collect();
    // network1's own pod directly; each other network's pods one by one behind its gateway
    // (ours: it routes the pinned name to that pod), in its cluster's locality.
    assert_eq!(
        reviews,
        [
            "10.241.1.1:9080 w1 us-east/us-east-1a/ pinned=-",
            "100.64.0.2:15443 w1 us-west/us-west-1a/ pinned=10.242.1.1:9080",
            "100.64.0.3:15443 w1 eu-west/eu-west-1a/ pinned=10.243.1.1:9080",
            "100.64.0.3:15443 w1 eu-west/eu-west-1a/ pinned=10.243.1.2:9080",
        ]
    );
}

/// `isthmus ARGS… --state-dir` of `lab`.
fn isthmus(lab: &Lab, args: &[&str]) -> Output {
    Command::new(ISTHMUS)
        .args(args)
        .arg("--state-dir")
        .arg(&lab.dir)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn traffic_from_cluster1_lands_in_all_three_clusters_without_failures() {
    require_root();
    let (lab, _) = Lab::up("multi-primary-gateways", "traffic");
    let out = isthmus(&lab, &["lab", "traffic", "--from", "cluster1", "-n", "80", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((r["sent"].as_u64(), r["failed"].as_u64()), (Some(80), Some(0)), "{r:#}");
    assert_eq!(r["address"], "10.241.255.1:9080");
    let by_cluster = r["by_cluster"].as_object().unwrap();
    let clusters: Vec<&str> = by_cluster.keys().map(String::as_str).collect();
    assert_eq!(clusters, ["cluster1", "cluster2", "cluster3"], "{r:#}");
    assert!(by_cluster.values().all(|n| n.as_u64().unwrap() > 0));
    let versions: BTreeSet<String> = r["landed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| format!("{} {}", l["cluster"].as_str().unwrap(), l["version"].as_str().unwrap()))
        .collect();
    assert!(versions.contains("cluster3 v2"), "{versions:?}");
    let p = &r["latency_ms"];
    assert!(p["p50_ms"].as_f64().unwrap() <= p["p99_ms"].as_f64().unwrap(), "{p}");

    // The table, and a service that does not exist named as such.
    let out = isthmus(&lab, &["lab", "traffic", "-n", "5"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("5 sent") && stdout.contains("p99"),
        "{}",
        text(&out)
    );
    let out = isthmus(&lab, &["lab", "traffic", "--to", "ratings"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no service `ratings`"),
        "{}",
        text(&out)
    );
}

#[test]
fn status_lists_three_clusters_with_ready_controllers_and_healthy_gateways() {
    require_root();
    let (lab, _) = Lab::up("multi-primary-gateways", "status");
    let out = isthmus(&lab, &["lab", "status", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let clusters = s["clusters"].as_array().unwrap();
    let names: Vec<&str> = clusters.iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["cluster1", "cluster2", "cluster3"]);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    for c in clusters {
        let name = c["name"].as_str().unwrap();
        assert_eq!(c["controller"]["ready"], true, "{name}: {c:#}");
        // Each controller reads all three clusters.
        assert_eq!(c["controller"]["synced"].as_array().unwrap().len(), 3, "{name}: {c:#}");
        assert_eq!(c["gateway"]["healthy"], true, "{name}: {c:#}");
        assert_eq!(c["gateway"]["xds_connected"], true, "{name}: {c:#}");
        for p in c["pods"].as_array().unwrap() {
            assert_eq!(p["sidecar_running"], true, "{name}: {p}");
            let expiry = p["svid_expiry_unix"].as_i64().unwrap_or_else(|| panic!("{name}: {p}"));
            assert!(expiry > now, "{name}: an expired SVID: {p}");
        }
    }
    let reviews3 = &clusters[2]["endpoints"][0];
    assert_eq!(
        (
            reviews3["service"].as_str(),
            reviews3["pods"].as_u64(),
            reviews3["answering"].as_u64()
        ),
        (Some("reviews"), Some(2), Some(2))
    );
    // cluster1's traffic to cluster2 crosses cluster2's gateway, which counts it.
    let out = isthmus(&lab, &["lab", "traffic", "-n", "20"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = isthmus(&lab, &["lab", "status"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", text(&out));
    for header in ["CLUSTER", "GATEWAY", "SVID EXPIRES", "cluster3   reviews"] {
        assert!(table.contains(header), "no {header:?} in\n{table}");
    }
    let s: serde_json::Value = serde_json::from_slice(&isthmus(&lab, &["lab", "status", "--json"]).stdout).unwrap();
    assert!(
        s["clusters"][1]["gateway"]["connections_opened"].as_f64().unwrap() > 0.0,
        "{s:#}"
    );
}

/// The drill's JSON result (`--json`: the only line on stdout).
fn drill_result(out: &Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| panic!("{e}: {}", text(out)))
}

/// The issue's target is "with retries on": a VirtualService retrying what a lost gateway
/// does to requests (`reset` for the one already sent through it when it dies, which
/// Istio's default retries leave failed), applied as a user would.
#[test]
fn drill_gateway_loss_reroutes_within_a_second_without_failed_requests() {
    require_root();
    let (lab, _) = Lab::up("multi-primary-gateways", "drill-gw");
    let retries = lab.dir.join("reviews-retries.yaml");
    std::fs::write(
        &retries,
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews-retries, namespace: default}\n\
spec: {hosts: [reviews], http: [{route: [{destination: {host: reviews}}], \
retries: {attempts: 2, perTryTimeout: 1s, retryOn: \"connect-failure,refused-stream,reset,gateway-error\"}}]}\n",
    )
    .unwrap();
    let applied = isthmus(&lab, &["lab", "apply", "-f", retries.to_str().unwrap()]);
    assert!(applied.status.success(), "{}", text(&applied));
    let report = lab.dir.join("report.html");
    let out = isthmus(
        &lab,
        &[
            "drill",
            "failover",
            "--scenario",
            "gateway-loss",
            "--cluster",
            "cluster2",
            "--duration",
            "7s",
            "--rate",
            "50",
            "--slo-max-failures",
            "0",
            "--slo-reroute-ms",
            "1000",
            "--json",
            "--report",
            report.to_str().unwrap(),
        ],
    );
    let r = drill_result(&out);
    assert!(out.status.success(), "the SLO: {}", text(&out));
    assert_eq!(r["failed"], 0, "{}", text(&out));
    assert!(r["reroute_ms"].as_f64().unwrap() <= 1000.0, "{}", text(&out));
    assert_eq!(r["sent"], 350, "{}", text(&out));
    // cluster2 answered before the loss and again after the heal.
    let phases = r["phases"].as_array().unwrap();
    assert!(phases[0]["to_failing_cluster"].as_u64().unwrap() > 0, "{}", text(&out));
    assert_eq!(phases[1]["to_failing_cluster"], 0, "{}", text(&out));
    assert!(phases[2]["to_failing_cluster"].as_u64().unwrap() > 0, "{}", text(&out));
    assert!(r["recover_ms"].as_f64().is_some(), "{}", text(&out));
    let html = std::fs::read_to_string(&report).unwrap();
    assert!(
        html.starts_with("<!doctype html>") && html.matches("<svg").count() == 3,
        "{html}"
    );
    // Self-contained: nothing to run, nothing fetched.
    for fetches in ["<script", "<link", "src=", "href=", "url("] {
        assert!(!html.contains(fetches), "{fetches} in {html}");
    }
    // The restarted gateway is recorded (and runs), so `lab down` stops it.
    let gateways: Vec<_> = lab
        .state()
        .processes
        .into_iter()
        .filter(|p| p.name == "cluster2 gateway")
        .collect();
    assert_eq!(gateways.len(), 2);
    assert!(!lab::process::is_running(&gateways[0]) && lab::process::is_running(&gateways[1]));
    let before = lab.state();
    let down = lab.down();
    assert!(down.status.success(), "{}", text(&down));
    assert_nothing_left(&before, &lab.dir, &host_links());
}

#[test]
fn drill_endpoint_loss_is_retried_away_and_a_missed_slo_fails_the_command() {
    require_root();
    let (lab, _) = Lab::up("multi-primary-gateways", "drill-ep");
    let drill = |lab: &Lab| {
        isthmus(
            lab,
            &[
                "drill",
                "failover",
                "--scenario",
                "endpoint-loss",
                "--duration",
                "5s",
                "--retries",
                "0",
                "--slo-max-failures",
                "0",
                "--json",
            ],
        )
    };
    // The load client retries nothing; the mesh does: reviews' routes carry Istio's default
    // retries (connect-failure, refused-stream, 503), so the lost pod costs no request.
    let out = drill(&lab);
    let r = drill_result(&out);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(r["failed"].as_u64(), Some(0), "{}", text(&out));
    assert_eq!(r["slo"][0]["met"], true);

    // Istio's fault injection makes half of all requests fail: the SLO is missed and the
    // command says so with its exit status, for users' CI.
    let fault = lab.dir.join("reviews-abort.yaml");
    std::fs::write(
        &fault,
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews, namespace: default}\n\
spec: {hosts: [reviews], http: [{fault: {abort: {httpStatus: 500, percentage: {value: 50}}}, route: [{destination: {host: reviews}}]}]}\n",
    )
    .unwrap();
    let fault = fault.to_str().unwrap();
    let applied = isthmus(&lab, &["lab", "apply", "-f", fault]);
    assert!(applied.status.success(), "{}", text(&applied));
    traffic_until(&lab, "the abort reaches cluster1's sidecar", |r| {
        r["failed"].as_u64().is_some_and(|f| f > 0)
    });
    let out = drill(&lab);
    let r = drill_result(&out);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(r["failed"].as_u64().unwrap() > 0, "{}", text(&out));
    assert_eq!(r["slo"][0]["met"], false);
    // With --json the table goes to stderr, the object alone to stdout.
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("SLO failed requests ≤ 0: MISSED"),
        "{}",
        text(&out)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).lines().count(),
        1,
        "{}",
        text(&out)
    );
    // The fault removed: every cluster answers again.
    let deleted = isthmus(&lab, &["lab", "delete", "-f", fault]);
    assert!(deleted.status.success(), "{}", text(&deleted));
    traffic_until(&lab, "no more aborts, every cluster answering", |r| {
        r["failed"] == 0 && r["by_cluster"].as_object().is_some_and(|c| c.len() == 3)
    });
}

/// Asserts nothing is left on cluster `n`'s transit leg: no netem qdisc, no WAN emulator
/// running, no relay veth, the leg back on the transit bridge.
#[track_caller]
fn transit_leg_clear(lab: &Lab, n: usize) {
    let gw = lab.plan.cluster(n).gateway.clone().unwrap();
    let transit = lab.plan.transit.as_ref().unwrap();
    let qdisc = netns::exec(transit, "tc", &["qdisc", "show", "dev", &gw.transit_link]).unwrap();
    assert!(!qdisc.contains("netem"), "{qdisc}");
    let links = netns::exec(transit, "ip", &["-o", "link", "show"]).unwrap();
    assert!(!links.contains(&format!("{}-br", gw.transit_link)), "{links}");
    let leg = links
        .lines()
        .find(|l| l.contains(&format!(" {}@", gw.transit_link)))
        .unwrap();
    assert!(leg.contains("master br0"), "{leg}");
    let relays: Vec<_> = lab
        .state()
        .processes
        .into_iter()
        .filter(|p| p.name.ends_with("transit impairment") && lab::process::is_running(p))
        .collect();
    assert!(relays.is_empty(), "{relays:?}");
}

#[test]
fn drill_transit_cut_reroutes_to_the_other_network_and_recovers_after_the_heal() {
    require_root();
    let (lab, _) = Lab::up("multi-primary-gateways", "drill-cut");
    let out = isthmus(
        &lab,
        &[
            "drill",
            "failover",
            "--scenario",
            "transit-cut",
            "--warmup",
            "2s",
            "--fail-for",
            "2s",
            // The sidecar's pooled connection through the cut leg stalls and carries again
            // only at TCP's next retransmission after the heal: seconds later.
            "--duration",
            "16s",
            "--json",
        ],
    );
    let r = drill_result(&out);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    // Under the drill's policy cluster1's requests all cross networks: to cluster2 before the
    // cut and after the heal, to cluster3 during it.
    let landed = r["landed"].as_object().unwrap();
    assert!(landed.keys().all(|k| !k.starts_with("cluster1")), "{}", text(&out));
    let phases = r["phases"].as_array().unwrap();
    assert!(phases[0]["to_failing_cluster"].as_u64().unwrap() > 0, "{}", text(&out));
    // At most what was already on its way when the leg was cut.
    assert!(phases[1]["to_failing_cluster"].as_u64().unwrap() <= 2, "{}", text(&out));
    assert!(phases[2]["to_failing_cluster"].as_u64().unwrap() > 0, "{}", text(&out));
    assert!(r["recover_ms"].as_f64().is_some(), "{}", text(&out));
    // Rerouted by the mesh's retries: without them a third of the requests during the cut
    // (cluster2's share) would fail. Not yet zero, and the reroute figure not reliably within
    // a second: a per-try timeout neither ejects cluster2's endpoint nor keeps the retry off
    // it, so a request may pick it again and again (README, the lab).
    let failed = r["failed"].as_u64().unwrap();
    assert!(failed <= 5, "{failed} failed: {}", text(&out));
    let failure = &phases[1];
    assert!(
        failure["latency_ms"]["p50_ms"].as_f64().unwrap() < 100.0,
        "{}",
        text(&out)
    );
    let injected = r["injected"].as_str().unwrap();
    assert!(injected.contains("loss 100%"), "{injected}");
    // Which impaired the leg: netem where the kernel has it, else the lab's WAN emulator.
    let method = if lab::impair::netem_available(lab.plan.transit.as_ref().unwrap(), "br0") {
        ("netem", "tc netem")
    } else {
        ("relay", "WAN emulator")
    };
    assert_eq!(r["link_impairment"], method.0, "{}", text(&out));
    assert!(injected.contains(method.1), "{injected}");
    // Healed, and the drill's policy deleted: cluster1's requests are local again too.
    transit_leg_clear(&lab, 2);
    traffic_until(&lab, "every cluster answering cluster1 again", |r| {
        r["failed"] == 0 && r["by_cluster"].as_object().is_some_and(|c| c.len() == 3)
    });
    let before = lab.state();
    let down = lab.down();
    assert!(down.status.success(), "{}", text(&down));
    assert_nothing_left(&before, &lab.dir, &host_links());
}

#[test]
fn drill_latency_slows_the_requests_through_the_slowed_network_only() {
    require_root();
    let (lab, _) = Lab::up("multi-primary-gateways", "drill-lat");
    let out = isthmus(
        &lab,
        &[
            "drill",
            "failover",
            "--scenario",
            "latency",
            "--delay",
            "100ms",
            "--duration",
            "6s",
            "--slo-max-failures",
            "0",
            "--json",
        ],
    );
    let r = drill_result(&out);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let at = |phase: usize, p: &str| r["phases"][phase]["latency_ms"][p].as_f64().unwrap();
    assert!(at(0, "p50_ms") < 50.0 && at(2, "p50_ms") < 50.0, "{}", text(&out));
    // Only cluster2's share, a third of the requests, is slowed, each by the delay.
    assert!(at(1, "p90_ms") >= 100.0 && at(1, "p50_ms") < 100.0, "{}", text(&out));
    // Slow, not lost: nothing was bad enough to count against the reroute.
    assert_eq!(r["reroute_ms"], 0.0, "{}", text(&out));
    assert!(
        r["injected"].as_str().unwrap().contains("delay 100 ms"),
        "{}",
        text(&out)
    );
    transit_leg_clear(&lab, 2);
}

/// The time a TCP handshake takes from `ns` to `addr`: the best of three.
fn handshake(ns: &str, addr: SocketAddr) -> std::io::Result<Duration> {
    netns::within(ns, move || {
        (0..3)
            .map(|_| {
                let t = std::time::Instant::now();
                TcpStream::connect_timeout(&addr, Duration::from_millis(600)).map(|_| t.elapsed())
            })
            .collect::<std::io::Result<Vec<_>>>()
            .map(|v| v.into_iter().min().unwrap())
    })?
}

#[test]
fn an_impaired_transit_leg_adds_its_delay_to_round_trips_and_clearing_removes_it() {
    require_root();
    let lab = Lab::plain("multi-primary-gateways", "impair");
    let (ns, _) = lab.pod(1, "productpage-v1");
    let gw = lab.plan.cluster(2).gateway.clone().unwrap();
    let (to_gateway, to_metrics) = (
        SocketAddr::new(IpAddr::V4(gw.transit_ip), GATEWAY_PORT),
        SocketAddr::new(IpAddr::V4(gw.transit_ip), lab::plan::METRICS_PORT),
    );
    let base = handshake(&ns, to_gateway).unwrap();
    assert!(base < Duration::from_millis(50), "{base:?}");
    let impair = |args: &[&str]| {
        let mut all = vec!["lab", "impair", "--cluster", "cluster2"];
        all.extend_from_slice(args);
        let out = isthmus(&lab, &all);
        assert!(out.status.success(), "{}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let said = impair(&["--delay", "100ms"]);
    assert!(said.contains("delay 100 ms"), "{said}");
    let slowed = probe::until(Duration::from_secs(5), Duration::from_millis(50), || {
        match handshake(&ns, to_gateway) {
            Ok(rtt) if rtt >= Duration::from_millis(100) => Ok(rtt),
            other => Err(format!("{other:?}")),
        }
    })
    .unwrap();
    assert!(slowed < base + Duration::from_millis(180), "{slowed:?} (base {base:?})");
    // A whole HTTP exchange crosses the relay too (larger segments than a handshake).
    let page = probe::get(&ns, to_metrics, "/stats/prometheus", Duration::from_secs(5)).unwrap();
    assert_eq!(page.status, 200, "{page:?}");
    impair(&["--clear"]);
    transit_leg_clear(&lab, 2);
    probe::until(Duration::from_secs(5), Duration::from_millis(50), || {
        match handshake(&ns, to_gateway) {
            Ok(rtt) if rtt < Duration::from_millis(50) => Ok(rtt),
            other => Err(format!("{other:?}")),
        }
    })
    .unwrap();
    // Cut: nothing reaches cluster2's gateway; cleared: everything does again.
    let said = impair(&["--loss", "100%"]);
    assert!(said.contains("loss 100%"), "{said}");
    probe::until(Duration::from_secs(5), Duration::from_millis(50), || {
        match handshake(&ns, to_gateway) {
            Err(e) => Ok(e),
            Ok(rtt) => Err(rtt),
        }
    })
    .unwrap();
    impair(&["--clear"]);
    probe::until(Duration::from_secs(5), Duration::from_millis(50), || {
        handshake(&ns, to_gateway)
    })
    .unwrap();
    // An impairment left on is taken down with the lab.
    impair(&["--delay", "20ms"]);
    let before = lab.state();
    assert!(before.processes.iter().any(|p| p.name == "cluster2 transit impairment"));
    let down = lab.down();
    assert!(down.status.success(), "{}", text(&down));
    assert_nothing_left(&before, &lab.dir, &host_links());
}

/// Bookinfo's `reviews` pinned to v2 by Istio's own kinds, as a user writes them.
const REVIEWS_V2: &str = "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: default}
spec:
  host: reviews.default.svc.cluster.local
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {host: reviews, subset: v2}
";

/// `lab traffic --from cluster1 -n 30 --json` until `done` holds for its report.
fn traffic_until(lab: &Lab, what: &str, done: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let report = probe::until(Duration::from_secs(30), Duration::from_millis(200), || {
        let out = isthmus(lab, &["lab", "traffic", "--from", "cluster1", "-n", "30", "--json"]);
        let r: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| format!("{e}: {}", text(&out)))?;
        if done(&r) { Ok(r) } else { Err(format!("{r:#}")) }
    });
    report.unwrap_or_else(|last| panic!("{what}; last report: {last}"))
}

#[test]
fn istio_config_applied_to_the_lab_routes_across_networks_and_delete_undoes_it() {
    require_root();
    let (lab, _) = Lab::up("multi-primary-gateways", "apply");
    let file = lab.dir.join("reviews-v2.yaml");
    std::fs::write(&file, REVIEWS_V2).unwrap();
    let file = file.to_str().unwrap();
    let out = isthmus(&lab, &["lab", "apply", "-f", file]);
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    for c in ["cluster1", "cluster2", "cluster3"] {
        for o in [
            "destinationrule.networking.istio.io/reviews",
            "virtualservice.networking.istio.io/reviews",
        ] {
            assert!(stdout.contains(&format!("{o} created in {c}")), "{stdout}");
        }
    }

    // Every request from cluster1 now lands on the only v2 pod, in cluster3, on another
    // network: through cluster3's gateway by the subset's SNI, with nothing failed.
    let only_v2 = |r: &serde_json::Value| {
        r["failed"] == 0
            && r["landed"]
                .as_array()
                .is_some_and(|l| l.len() == 1 && l[0]["cluster"] == "cluster3" && l[0]["version"] == "v2")
    };
    traffic_until(&lab, "cluster1's requests all on cluster3 v2", only_v2);

    // Applied again, nothing changes; deleted, requests spread over every cluster again.
    let out = isthmus(&lab, &["lab", "apply", "-f", file]);
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("unchanged in cluster1"),
        "{}",
        text(&out)
    );
    let out = isthmus(&lab, &["lab", "delete", "-f", file]);
    assert!(
        out.status.success()
            && String::from_utf8_lossy(&out.stdout)
                .contains("virtualservice.networking.istio.io/reviews deleted in cluster1"),
        "{}",
        text(&out)
    );
    traffic_until(&lab, "cluster1's requests spread over the three clusters again", |r| {
        r["failed"] == 0 && r["by_cluster"].as_object().is_some_and(|c| c.len() == 3)
    });

    // A file Istio would refuse changes nothing, and says why.
    std::fs::write(
        lab.dir.join("bad.yaml"),
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: bad, namespace: default}\nspec: {hosts: ['*'], http: [{route: [{destination: {host: reviews}, weight: -1}]}]}\n",
    )
    .unwrap();
    let out = isthmus(
        &lab,
        &["lab", "apply", "-f", lab.dir.join("bad.yaml").to_str().unwrap()],
    );
    assert!(!out.status.success(), "{}", text(&out));
}
