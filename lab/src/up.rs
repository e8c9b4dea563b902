//! `isthmus lab up`: builds a topology's plan step by step, recording everything before it
//! is made, showing each step as it goes; on a failed step it names it, takes down what was
//! made and fails.

use std::collections::BTreeSet;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use mesh_vocab::topology::{TRANSIT_CIDR, WorkloadRole};

use crate::down;
use crate::loopback;
use crate::manifests;
use crate::netns;
use crate::plan::{
    ClusterPlan, GATEWAY_PORT, HEALTH_PORT, Host, METRICS_PORT, MONITORING_PORT, Plan, SECURE_PORT, TransitRoute,
    XDS_PORT,
};
use crate::probe;
use crate::process::{self, Started};
use crate::sidecar;
use crate::state::StateFile;

/// Set by SIGINT or SIGTERM during `lab up`: the build stops and takes down what it made.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// From now on Ctrl-C (or a TERM) stops the build cleanly instead of killing it midway.
fn catch_interrupts() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(sig, on_interrupt as *const () as libc::sighandler_t) };
    }
}

fn interrupted() -> anyhow::Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// How long a started process may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(15);

/// What `lab up` was asked to do.
#[derive(Debug, Clone)]
pub struct UpOptions {
    pub plan: Plan,
    pub state_dir: PathBuf,
    /// Where `federation-controller`, `eastwest-gateway`, `sidecar` and `isthmus` are.
    pub bin_dir: PathBuf,
    /// Start a sidecar with iptables capture in every pod (else pods talk plaintext, pod to pod).
    pub sidecars: bool,
    /// What the topology was named as (recorded so later commands rebuild the plan).
    pub source: String,
}

/// Whether this process may build networks (root, or at least CAP_NET_ADMIN as root has).
pub fn is_root() -> bool {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// One step of `lab up`.
#[derive(Debug, Clone)]
enum Step {
    Node(usize),
    Hosts(usize),
    Flat(String, Vec<usize>),
    Transit,
    Manifests,
    Certificates,
    Controller(usize),
    Gateway(usize),
    Workloads(usize),
    /// Plaintext, pod to pod, without sidecars.
    Check,
    /// Through the sidecars, by service address.
    Mesh,
}

fn steps(plan: &Plan, sidecars: bool) -> Vec<Step> {
    let mut s = Vec::new();
    let each = |f: fn(usize) -> Step| plan.clusters.iter().map(move |c| f(c.number));
    if !plan.loopback {
        s.extend(each(Step::Node));
        s.extend(each(Step::Hosts));
    }
    for (net, cs) in plan.topology.networks() {
        if cs.len() > 1 && !plan.loopback {
            let numbers = cs
                .iter()
                .filter_map(|c| plan.cluster_named(c.name.as_str()).map(|p| p.number))
                .collect();
            s.push(Step::Flat(net.to_string(), numbers));
        }
    }
    if plan.transit.is_some() {
        s.push(Step::Transit);
    }
    s.push(Step::Manifests);
    s.push(Step::Certificates);
    s.extend(
        plan.clusters
            .iter()
            .filter(|c| c.controller.is_some())
            .map(|c| Step::Controller(c.number)),
    );
    s.extend(
        plan.clusters
            .iter()
            .filter(|c| c.gateway.is_some())
            .map(|c| Step::Gateway(c.number)),
    );
    s.extend(each(Step::Workloads));
    s.push(if sidecars { Step::Mesh } else { Step::Check });
    s
}

/// The lab being built.
struct Build<'a> {
    opts: &'a UpOptions,
    plan: &'a Plan,
    state: StateFile,
    started: Vec<Started>,
}

/// Builds the lab; on failure everything made is taken down again.
pub fn up(opts: &UpOptions, out: &mut impl Write) -> anyhow::Result<()> {
    let plan = &opts.plan;
    if !plan.loopback && !is_root() {
        bail!("cannot build the lab's networks without root: network namespaces, veths and bridges need it");
    }
    if plan.loopback {
        writeln!(
            out,
            "NOT ROOT: the lab runs on loopback, cluster k on 127.k.0.0/16 in this machine's own network namespace. \
             Networks are NOT enforced: any process here can reach any pod, gateway or controller directly. \
             There is no iptables capture either: each client pod gets one sidecar per route (a pod on its network, \
             another network's gateway), and the client picks the route. Run as root for separate networks."
        )?;
    } else {
        for tool in ["ip", "sysctl", "iptables"] {
            netns::run("sh", &["-c", &format!("command -v {tool}")])
                .with_context(|| format!("`{tool}` is missing (apt-get install -y iproute2 iptables procps)"))?;
        }
    }
    let mut needed = vec!["federation-controller", "eastwest-gateway", "isthmus"];
    if opts.sidecars {
        needed.push("sidecar");
    }
    for b in needed {
        process::binary(&opts.bin_dir, b)?;
    }
    let recorded = opts.state_dir.join(crate::state::STATE_FILE);
    if recorded.exists() {
        bail!(
            "{} exists: a lab is already up there (`isthmus lab down --state-dir {}` first)",
            recorded.display(),
            opts.state_dir.display()
        );
    }
    let taken: Vec<String> = plan.namespaces().into_iter().filter(|n| netns::exists(n)).collect();
    if let Some(first) = taken.first() {
        bail!(
            "{} of this lab's namespaces exist already ({first}, …): another lab with prefix `{}` is up (take it down, or pass another --prefix)",
            taken.len(),
            plan.prefix
        );
    }
    catch_interrupts();
    let mut state = StateFile::create(&opts.state_dir, &plan.topology.name, &plan.prefix)?;
    state.state.source = opts.source.clone();
    state.state.loopback = plan.loopback;
    state.save()?;
    let t0 = Instant::now();
    writeln!(
        out,
        "lab `{}`: {} ({} clusters), state in {}",
        plan.topology.name,
        plan.topology.description,
        plan.clusters.len(),
        opts.state_dir.display()
    )?;
    let mut build = Build {
        opts,
        plan,
        state,
        started: Vec::new(),
    };
    let all = steps(plan, opts.sidecars);
    for (i, step) in all.iter().enumerate() {
        write!(out, "[{}/{}] {} ... ", i + 1, all.len(), build.label(step))?;
        out.flush()?;
        let t = Instant::now();
        match interrupted().and_then(|()| build.run(step)) {
            Ok(note) => writeln!(out, "ok {} ms{note}", t.elapsed().as_millis())?,
            Err(e) => {
                // A command killed by the terminal's Ctrl-C fails with its own message.
                let e = if INTERRUPTED.load(Ordering::SeqCst) && e.to_string() != "interrupted" {
                    e.context("interrupted")
                } else {
                    e
                };
                writeln!(out, "FAILED after {} ms", t.elapsed().as_millis())?;
                writeln!(out, "  {e:#}")?;
                writeln!(out, "cleaning up ...")?;
                let dir = build.state.dir().to_owned();
                drop(build);
                if let Err(d) = down::down(&dir, out) {
                    writeln!(out, "  cleanup failed too: {d:#}")?;
                }
                return Err(e.context(format!(
                    "step {} of {} failed: {}",
                    i + 1,
                    all.len(),
                    label_of(plan, step)
                )));
            }
        }
    }
    build.state.state.complete = true;
    build.state.save()?;
    let rss_kib: u64 = build
        .started
        .iter()
        .filter_map(|s| process::rss_kib(s.record.pid))
        .sum();
    writeln!(
        out,
        "lab `{}` is up in {:.1} s{}: {} namespaces, {} processes using {:.0} MiB. `isthmus lab down{}` removes it all.",
        plan.topology.name,
        t0.elapsed().as_secs_f64(),
        if plan.loopback {
            " on loopback (networks not enforced)"
        } else {
            ""
        },
        build.state.state.namespaces.len(),
        build.state.state.processes.len(),
        rss_kib as f64 / 1024.0,
        if opts.state_dir == crate::default_state_dir() {
            String::new()
        } else {
            format!(" --state-dir {}", opts.state_dir.display())
        }
    )?;
    Ok(())
}

fn label_of(plan: &Plan, step: &Step) -> String {
    let c = |n: &usize| plan.cluster(*n);
    match step {
        Step::Node(n) => format!("{}: node namespace and bridge ({})", c(n).name, c(n).pod_cidr),
        Step::Hosts(n) => {
            let c = c(n);
            let mut what = vec![format!("{} pods", c.pods.len())];
            what.extend(c.controller.as_ref().map(|_| "the controller".to_string()));
            what.extend(c.gateway.as_ref().map(|_| "the gateway".to_string()));
            let last = what.pop().expect("pods are always named");
            if what.is_empty() {
                format!("{}: namespaces of {last}", c.name)
            } else {
                format!("{}: namespaces of {} and {last}", c.name, what.join(", "))
            }
        }
        Step::Flat(net, ns) => format!(
            "{net}: routes between {}",
            ns.iter().map(|n| c(n).name.to_string()).collect::<Vec<_>>().join(", ")
        ),
        Step::Transit => format!("transit network {TRANSIT_CIDR} between the east-west gateways"),
        Step::Manifests => "manifests of every cluster".into(),
        Step::Certificates => "certificate authorities".into(),
        Step::Controller(n) => format!("{}: controller at {}", c(n).name, c(n).xds),
        Step::Gateway(n) => format!(
            "{}: east-west gateway at {}",
            c(n).name,
            c(n).gateway
                .as_ref()
                .map(|g| g.transit_ip.to_string())
                .unwrap_or_default()
        ),
        Step::Workloads(n) => format!(
            "{}: workloads {}",
            c(n).name,
            c(n).pods.iter().map(|p| p.name.as_str()).collect::<Vec<_>>().join(", ")
        ),
        Step::Check => "check: clients reach every server on their network and the other networks' gateways".into(),
        Step::Mesh => "check: every client reaches every pod of every service through its sidecar (mTLS; across networks through the gateways)".into(),
    }
}

impl Build<'_> {
    fn label(&self, step: &Step) -> String {
        label_of(self.plan, step)
    }

    /// Runs a step; the string is a note printed after `ok`.
    fn run(&mut self, step: &Step) -> anyhow::Result<String> {
        let plan = self.plan;
        match step {
            Step::Node(n) => self.node(plan.cluster(*n)).map(|_| String::new()),
            Step::Hosts(n) => self.hosts(plan.cluster(*n)).map(|_| String::new()),
            Step::Flat(_, ns) => self.flat(ns).map(|_| String::new()),
            Step::Transit => self.transit().map(|_| String::new()),
            Step::Manifests => {
                let dir = self.opts.state_dir.join("manifests");
                let n = manifests::write(plan, &dir)?;
                Ok(format!(" ({n} objects in {})", dir.display()))
            }
            Step::Certificates => self.certificates().map(|_| String::new()),
            Step::Controller(n) => self.controller(plan.cluster(*n)).map(|_| String::new()),
            Step::Gateway(n) => self.gateway(plan.cluster(*n)).map(|_| String::new()),
            Step::Workloads(n) => self.workloads(plan.cluster(*n)).map(|_| String::new()),
            Step::Check => self.check(),
            Step::Mesh if plan.loopback => self.check_loopback(),
            Step::Mesh => self.check_mesh(),
        }
    }

    fn namespace(&mut self, ns: &str) -> anyhow::Result<()> {
        self.state.namespace(ns)?;
        netns::add(ns)?;
        Ok(())
    }

    fn node(&mut self, c: &ClusterPlan) -> anyhow::Result<()> {
        let ns = &c.node.netns;
        self.namespace(ns)?;
        self.state.link(ns, "br0")?;
        netns::bridge(ns, "br0", Some(&format!("{}/{}", c.node.ip, c.pod_cidr.prefix_len())))?;
        netns::forwarding(ns)?;
        Ok(())
    }

    /// Every namespace on the cluster's bridge, with its routes: the network's other pod
    /// CIDRs and the transit network, through the node.
    fn hosts(&mut self, c: &ClusterPlan) -> anyhow::Result<()> {
        let via = c.node.ip.to_string();
        let peers: Vec<String> = c
            .flat_peers
            .iter()
            .map(|p| self.plan.cluster(*p).pod_cidr.to_string())
            .collect();
        let to_transit = self.plan.transit_route(c).is_some();
        for h in c.hosts() {
            self.namespace(&h.netns)?;
            self.state.link(&c.node.netns, &h.node_link)?;
            netns::veth(&h.netns, "eth0", &c.node.netns, &h.node_link)?;
            netns::attach(&c.node.netns, &h.node_link, "br0")?;
            netns::address(&h.netns, "eth0", &format!("{}/{}", h.ip, c.pod_cidr.prefix_len()))?;
            // The gateway is on the transit network itself.
            let is_gateway = c.gateway.as_ref().is_some_and(|g| &g.host == h);
            let transit = (to_transit && !is_gateway).then(|| TRANSIT_CIDR.to_string());
            for r in peers.iter().chain(transit.iter()) {
                netns::ip(&h.netns, &["route", "add", r, "via", &via])?;
            }
        }
        Ok(())
    }

    /// A veth between every two nodes of a flat network, each routing the other's pods.
    fn flat(&mut self, numbers: &[usize]) -> anyhow::Result<()> {
        for (i, a) in numbers.iter().enumerate() {
            for b in &numbers[i + 1..] {
                let (ca, cb) = (self.plan.cluster(*a), self.plan.cluster(*b));
                let (la, lb) = (ClusterPlan::peer_link(*b), ClusterPlan::peer_link(*a));
                self.state.link(&ca.node.netns, &la)?;
                netns::veth(&ca.node.netns, &la, &cb.node.netns, &lb)?;
                for (from, link, to) in [(ca, &la, cb), (cb, &lb, ca)] {
                    netns::ip(&from.node.netns, &["link", "set", link, "up"])?;
                    netns::ip(
                        &from.node.netns,
                        &[
                            "route",
                            "add",
                            &to.pod_cidr.to_string(),
                            "via",
                            &to.node.ip.to_string(),
                            "dev",
                            link,
                            "onlink",
                        ],
                    )?;
                }
            }
        }
        Ok(())
    }

    /// The transit bridge, each gateway's leg on it, and every node's route to it. A gateway
    /// forwards its cluster's connections out to the transit network, masqueraded behind
    /// its transit address, and nothing the other way.
    fn transit(&mut self) -> anyhow::Result<()> {
        let transit = self.plan.transit.clone().expect("a transit step only when planned");
        self.namespace(&transit)?;
        self.state.link(&transit, "br0")?;
        netns::bridge(&transit, "br0", None)?;
        for c in &self.plan.clusters {
            let Some(gw) = &c.gateway else { continue };
            let ns = &gw.host.netns;
            self.state.link(ns, "transit")?;
            netns::veth(ns, "transit", &transit, &gw.transit_link)?;
            netns::attach(&transit, &gw.transit_link, "br0")?;
            netns::address(
                ns,
                "transit",
                &format!("{}/{}", gw.transit_ip, TRANSIT_CIDR.prefix_len()),
            )?;
            netns::forwarding(ns)?;
            for rule in [
                &["-P", "FORWARD", "DROP"][..],
                &["-A", "FORWARD", "-i", "eth0", "-o", "transit", "-j", "ACCEPT"],
                &[
                    "-A",
                    "FORWARD",
                    "-m",
                    "conntrack",
                    "--ctstate",
                    "ESTABLISHED,RELATED",
                    "-j",
                    "ACCEPT",
                ],
                &["-t", "nat", "-A", "POSTROUTING", "-o", "transit", "-j", "MASQUERADE"],
            ] {
                netns::exec(ns, "iptables", rule)?;
            }
        }
        for c in &self.plan.clusters {
            let transit = TRANSIT_CIDR.to_string();
            match self.plan.transit_route(c) {
                Some(TransitRoute::Gateway(ip)) => {
                    netns::ip(&c.node.netns, &["route", "add", &transit, "via", &ip.to_string()])?
                }
                Some(TransitRoute::PeerNode(p)) => {
                    let peer = self.plan.cluster(p);
                    let link = ClusterPlan::peer_link(p);
                    netns::ip(
                        &c.node.netns,
                        &[
                            "route",
                            "add",
                            &transit,
                            "via",
                            &peer.node.ip.to_string(),
                            "dev",
                            &link,
                            "onlink",
                        ],
                    )?
                }
                None => {}
            }
        }
        Ok(())
    }

    fn ca_dir(&self, c: &ClusterPlan) -> PathBuf {
        self.opts
            .state_dir
            .join("ca")
            .join(&c.trust_domain)
            .join(c.served_by.as_str())
    }

    /// One shared root per trust domain, an intermediate per primary (`ca init-mesh`).
    fn certificates(&mut self) -> anyhow::Result<()> {
        let bin = process::binary(&self.opts.bin_dir, "federation-controller")?;
        let domains: BTreeSet<&str> = self.plan.clusters.iter().map(|c| c.trust_domain.as_str()).collect();
        for td in domains {
            let primaries: Vec<&str> = self
                .plan
                .clusters
                .iter()
                .filter(|c| c.trust_domain == td && c.controller.is_some())
                .map(|c| c.name.as_str())
                .collect();
            let out = self.opts.state_dir.join("ca").join(td);
            netns::run(
                &bin.display().to_string(),
                &[
                    "ca",
                    "init-mesh",
                    "--out",
                    &out.display().to_string(),
                    "--trust-domain",
                    td,
                    "--clusters",
                    &primaries.join(","),
                ],
            )?;
        }
        Ok(())
    }

    /// Starts `program` in `ns` and records it.
    fn start(&mut self, name: &str, ns: &str, program: &str, args: Vec<String>) -> anyhow::Result<usize> {
        let bin = process::binary(&self.opts.bin_dir, program)?;
        let log = self
            .opts
            .state_dir
            .join("logs")
            .join(format!("{}.log", name.replace(' ', "-")));
        let started = process::start(name, ns, &bin, &args, &log).with_context(|| format!("starting {name}"))?;
        self.state.process(started.record.clone())?;
        self.started.push(started);
        Ok(self.started.len() - 1)
    }

    /// Waits until `GET path` on `addr`, from `ns`, answers 200, while process `idx` lives.
    fn ready(&mut self, idx: usize, ns: &str, addr: SocketAddr, path: &str) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut last;
        loop {
            interrupted()?;
            if let Some(how) = self.started[idx].exited() {
                bail!(
                    "{} exited ({how}) before it was ready; its log ({}) ends:\n{}",
                    self.started[idx].record.name,
                    self.started[idx].record.log.display(),
                    self.started[idx].log_tail(10)
                );
            }
            match probe::get(ns, addr, path, Duration::from_secs(1)) {
                Ok(r) if r.status == 200 => return Ok(()),
                Ok(r) => last = format!("{} {}", r.status, r.body.trim()),
                Err(e) => last = e.to_string(),
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} not ready after {:?} (GET http://{addr}{path}: {last}); its log ({}) ends:\n{}",
                    self.started[idx].record.name,
                    READY_TIMEOUT,
                    self.started[idx].record.log.display(),
                    self.started[idx].log_tail(10)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until `addr` accepts TCP connections from `ns`, while process `idx` lives.
    fn listening(&mut self, idx: usize, ns: &str, addr: SocketAddr) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            interrupted()?;
            if let Some(how) = self.started[idx].exited() {
                bail!(
                    "{} exited ({how}) before it listened on {addr}; its log ({}) ends:\n{}",
                    self.started[idx].record.name,
                    self.started[idx].record.log.display(),
                    self.started[idx].log_tail(10)
                );
            }
            match probe::connect(ns, addr, Duration::from_secs(1)) {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() >= deadline => {
                    bail!(
                        "{} not listening on {addr} after {READY_TIMEOUT:?}: {e}",
                        self.started[idx].record.name
                    )
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// The address a process on `ip` listens on: all of its namespace's, or on a loopback
    /// lab its own only (every cluster's processes share the machine's).
    fn bind(&self, ip: std::net::Ipv4Addr) -> std::net::Ipv4Addr {
        if self.plan.loopback {
            ip
        } else {
            std::net::Ipv4Addr::UNSPECIFIED
        }
    }

    fn controller(&mut self, c: &ClusterPlan) -> anyhow::Result<()> {
        let ctl = c.controller.as_ref().expect("a controller step only for primaries");
        let at = self.bind(ctl.ip);
        let mut args: Vec<String> = [
            "serve",
            "--manifests",
            &self.opts.state_dir.join("manifests").display().to_string(),
            "--xds",
            &format!("{at}:{XDS_PORT}"),
            "--monitoring",
            &format!("{at}:{MONITORING_PORT}"),
            "--secure",
            &format!("{at}:{SECURE_PORT}"),
            "--ca-dir",
            &self.ca_dir(c).display().to_string(),
            "--trust-domain",
            &c.trust_domain,
        ]
        .map(String::from)
        .into();
        for other in &self.plan.clusters {
            args.push("--cluster-network".into());
            args.push(format!("{}={}", other.name, other.network));
        }
        let idx = self.start(
            &format!("{} controller", c.name),
            &ctl.netns,
            "federation-controller",
            args,
        )?;
        self.ready(
            idx,
            &ctl.netns,
            SocketAddr::new(IpAddr::V4(ctl.ip), MONITORING_PORT),
            "/ready",
        )
    }

    fn gateway(&mut self, c: &ClusterPlan) -> anyhow::Result<()> {
        let gw = c.gateway.as_ref().expect("a gateway step only where planned");
        let at = self.bind(gw.host.ip);
        let args = [
            "--listen",
            &format!("{at}:{GATEWAY_PORT}"),
            "--xds",
            &format!("{}:{XDS_PORT}", c.xds),
            "--network",
            c.network.as_str(),
            "--cluster",
            c.name.as_str(),
            "--health",
            &format!("{at}:{HEALTH_PORT}"),
            "--metrics",
            &format!("{at}:{METRICS_PORT}"),
            "--workers",
            "1",
            // Its own loopback in its namespace; a loopback lab's gateways share the machine's.
            "--admin",
            &format!(
                "{}:15000",
                if self.plan.loopback {
                    gw.host.ip
                } else {
                    std::net::Ipv4Addr::LOCALHOST
                }
            ),
        ]
        .map(String::from)
        .into();
        let ns = gw.host.netns.clone();
        let idx = self.start(&format!("{} gateway", c.name), &ns, "eastwest-gateway", args)?;
        self.ready(
            idx,
            &ns,
            SocketAddr::new(IpAddr::V4(gw.host.ip), HEALTH_PORT),
            "/healthz/ready",
        )
    }

    fn workloads(&mut self, c: &ClusterPlan) -> anyhow::Result<()> {
        for p in &c.pods {
            let (app_ns, app) = self.plan.app_addr(p);
            if self.opts.sidecars {
                let ctx = sidecar::Context {
                    bin_dir: &self.opts.bin_dir,
                    state_dir: &self.opts.state_dir,
                    ca_dir: &self.ca_dir(c),
                    cluster: c,
                    pod: p,
                };
                let mut sidecars = Vec::new();
                if !self.plan.loopback {
                    let listen = SocketAddr::from(([127, 0, 0, 1], sidecar::OUTBOUND_PORT));
                    sidecars.push((sidecar::prepare(&ctx, sidecar::Mode::Capture)?, listen));
                } else if p.role == WorkloadRole::Server {
                    let listen = SocketAddr::new(IpAddr::V4(p.host.ip), p.port);
                    let mode = sidecar::Mode::Inbound { app: app.into() };
                    sidecars.push((sidecar::prepare(&ctx, mode)?, listen));
                } else {
                    for (i, r) in loopback::routes(self.plan, c, p).iter().enumerate() {
                        let (name, args) = sidecar::prepare(&ctx, sidecar::Mode::Outbound(r))?;
                        // The first keeps the pod's sidecar name (`lab status` asks by it).
                        let name = if i == 0 { name } else { format!("{name} {}", i + 1) };
                        sidecars.push(((name, args), r.listen));
                    }
                }
                for ((name, args), listen) in sidecars {
                    let idx = self.start(&name, &p.host.netns, "sidecar", args)?;
                    self.listening(idx, &p.host.netns, listen)?;
                }
            }
            if p.role == WorkloadRole::Client {
                continue;
            }
            let listen = SocketAddr::new(IpAddr::V4(self.bind(*app.ip())), app.port());
            let args = [
                "demo-app",
                "--cluster",
                c.name.as_str(),
                "--version",
                &p.version,
                "--listen",
                &listen.to_string(),
            ]
            .map(String::from)
            .into();
            let idx = self.start(&format!("{} {}", c.name, p.name), &p.host.netns, "isthmus", args)?;
            self.ready(idx, &app_ns, app.into(), "/")?;
        }
        Ok(())
    }

    /// From every client pod, one request to every server pod on its network, straight to
    /// the pod: each must answer as the pod it is.
    fn check(&mut self) -> anyhow::Result<String> {
        let mut n = 0;
        for c in &self.plan.clusters {
            for client in c.pods.iter().filter(|p| p.role == WorkloadRole::Client) {
                for d in self.plan.clusters.iter().filter(|d| d.network == c.network) {
                    for server in d.pods.iter().filter(|p| p.role == WorkloadRole::Server) {
                        check_one(&client.host, d, server)?;
                        n += 1;
                    }
                }
            }
        }
        // Across networks: every other network's gateways are reachable from every client.
        let mut gateways = 0;
        for c in &self.plan.clusters {
            for client in c.pods.iter().filter(|p| p.role == WorkloadRole::Client) {
                for d in self.plan.clusters.iter().filter(|d| d.network != c.network) {
                    let Some(gw) = &d.gateway else { continue };
                    let addr = SocketAddr::new(IpAddr::V4(gw.transit_ip), GATEWAY_PORT);
                    probe::connect(&client.host.netns, addr, Duration::from_secs(2)).with_context(|| {
                        format!("{} cannot reach {}'s gateway at {addr}", client.host.netns, d.name)
                    })?;
                    gateways += 1;
                }
            }
        }
        let note = match gateways {
            0 => String::new(),
            g => format!(
                ", {g} connections to other networks' gateways; requests across networks need the sidecars (without --no-sidecars)"
            ),
        };
        Ok(format!(" ({n} requests answered{note})"))
    }

    /// Through the sidecars: from every client, requests to each server service's ClusterIP
    /// in the client's cluster, until every cluster that runs the service has answered, each
    /// answer naming the client's SPIFFE ID as its caller.
    fn check_mesh(&mut self) -> anyhow::Result<String> {
        const PATIENCE: Duration = Duration::from_secs(20);
        const MOST: usize = 200;
        let mut lines = Vec::new();
        for c in &self.plan.clusters {
            for client in c.pods.iter().filter(|p| p.role == WorkloadRole::Client) {
                let me = client.spiffe_id(&c.trust_domain);
                for svc in &c.services {
                    // Every pod of the service, as its answer names it: "cluster version".
                    let pods: BTreeSet<String> = self
                        .plan
                        .clusters
                        .iter()
                        .flat_map(|d| {
                            d.pods
                                .iter()
                                .filter(|p| p.app == svc.name && p.role == WorkloadRole::Server)
                                .map(move |p| format!("{} {}", d.name, p.version))
                        })
                        .collect();
                    if pods.is_empty() {
                        continue;
                    }
                    let addr = SocketAddr::new(IpAddr::V4(svc.vip), svc.port);
                    let deadline = Instant::now() + PATIENCE;
                    let mut seen: std::collections::BTreeMap<String, usize> = Default::default();
                    let mut failures = 0;
                    let mut last_error = String::new();
                    for _ in 0..MOST {
                        interrupted()?;
                        if pods.iter().all(|p| seen.contains_key(p)) || Instant::now() >= deadline {
                            break;
                        }
                        match mesh_answer(&client.host.netns, addr, &me)? {
                            Ok((_, at)) => *seen.entry(at).or_default() += 1,
                            Err(e) => {
                                failures += 1;
                                last_error = e;
                            }
                        }
                    }
                    let summary = seen
                        .iter()
                        .map(|(k, n)| format!("{k} ×{n}"))
                        .collect::<Vec<_>>()
                        .join(", ");
                    let missing: Vec<&str> = pods
                        .iter()
                        .filter(|p| !seen.contains_key(*p))
                        .map(String::as_str)
                        .collect();
                    if !missing.is_empty() {
                        bail!(
                            "from {} to {} at {addr}: no answer from {} (answers: {}); {failures} failed, the last: {last_error}",
                            client.host.netns,
                            svc.name,
                            missing.join(", "),
                            if summary.is_empty() { "none" } else { &summary }
                        );
                    }
                    lines.push(format!("{} {} → {}: {summary}", c.name, client.name, svc.name));
                }
            }
        }
        Ok(format!("\n      {}", lines.join("\n      ")))
    }
}

impl Build<'_> {
    /// Loopback: from every client, over each of its routes, requests until the route's
    /// cluster has answered, each answer naming the client's SPIFFE ID as its caller. (A
    /// route through a gateway is one pooled connection, and the gateway balances per
    /// connection: one of the pods behind it answers them all.)
    fn check_loopback(&mut self) -> anyhow::Result<String> {
        const PATIENCE: Duration = Duration::from_secs(20);
        let mut lines = Vec::new();
        for c in &self.plan.clusters {
            for client in c.pods.iter().filter(|p| p.role == WorkloadRole::Client) {
                let me = client.spiffe_id(&c.trust_domain);
                let mut seen: std::collections::BTreeMap<String, usize> = Default::default();
                for r in loopback::routes(self.plan, c, client) {
                    let mut answered = false;
                    let deadline = Instant::now() + PATIENCE;
                    let mut last = String::new();
                    while !answered {
                        interrupted()?;
                        if Instant::now() >= deadline {
                            bail!(
                                "from {} {} over {} to {} ({}): no answer from {}; the last failure: {last}",
                                c.name,
                                client.name,
                                r.listen,
                                r.target,
                                r.service,
                                r.cluster
                            );
                        }
                        match mesh_answer("", r.listen, &me)? {
                            Ok((cluster, at)) => {
                                answered = cluster == r.cluster.as_str();
                                *seen.entry(at).or_default() += 1;
                            }
                            Err(e) => {
                                last = e;
                                std::thread::sleep(Duration::from_millis(50));
                            }
                        }
                    }
                }
                let summary: Vec<String> = seen.iter().map(|(k, n)| format!("{k} ×{n}")).collect();
                lines.push(format!("{} {} → routes: {}", c.name, client.name, summary.join(", ")));
            }
        }
        Ok(format!("\n      {}", lines.join("\n      ")))
    }
}

/// `GET /` on `addr` from `ns` through a sidecar: the answering (cluster, "cluster
/// version"), or why there was none; an answer naming another caller than `me` fails.
fn mesh_answer(ns: &str, addr: SocketAddr, me: &str) -> anyhow::Result<Result<(String, String), String>> {
    match probe::get(ns, addr, "/", Duration::from_secs(2)) {
        Ok(r) if r.status == 200 => {
            let v: serde_json::Value = serde_json::from_str(&r.body).unwrap_or_default();
            if v["caller"] != me {
                bail!("{addr} answered {} with caller {}, not {me}", r.body, v["caller"]);
            }
            let cluster = v["cluster"].as_str().unwrap_or("?").to_owned();
            let at = format!("{cluster} {}", v["version"].as_str().unwrap_or("?"));
            Ok(Ok((cluster, at)))
        }
        Ok(r) => Ok(Err(format!("{} {}", r.status, r.body.trim()))),
        Err(e) => Ok(Err(e.to_string())),
    }
}

fn check_one(from: &Host, cluster: &ClusterPlan, server: &crate::plan::PodPlan) -> anyhow::Result<()> {
    let addr = SocketAddr::new(IpAddr::V4(server.host.ip), server.port);
    let r = probe::get(&from.netns, addr, "/", Duration::from_secs(2))
        .with_context(|| format!("GET http://{addr}/ from {}", from.netns))?;
    let v: serde_json::Value = serde_json::from_str(&r.body)
        .with_context(|| format!("GET http://{addr}/ from {}: not JSON: {}", from.netns, r.body))?;
    if r.status != 200 || v["cluster"] != cluster.name.as_str() || v["version"] != server.version.as_str() {
        bail!(
            "GET http://{addr}/ from {} answered {} {}, not {}/{}",
            from.netns,
            r.status,
            r.body,
            cluster.name,
            server.version
        );
    }
    Ok(())
}
