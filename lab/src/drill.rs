//! `isthmus drill failover`: a bounded load from a client pod to a service (a new connection
//! per request, so every request goes through the sidecar's endpoint choice), a failure
//! injected after a warm-up, healed after a while, and the load kept running; then what
//! the failure cost.
//!
//! Scenarios, on cluster C:
//! - `gateway-loss`: SIGKILL of C's east-west gateway; healed by starting it again with the
//!   command line `lab up` recorded (the new process is recorded in the state file, so
//!   `lab down` stops it).
//! - `transit-cut`: every frame toward C's gateway on its transit leg (the transit bridge's
//!   port toward it) lost: `tc qdisc add dev gwK root netem loss 100%`, or where the kernel
//!   has no `sch_netem` the lab's userspace WAN emulator ([`crate::impair`]). Healed by
//!   removing it.
//! - `endpoint-loss`: SIGKILL of the service's demo app(s) in C; healed by starting them
//!   again.
//! - `latency`: `--delay` (100 ms, ± `--jitter`) on C's transit leg, by netem or the WAN
//!   emulator; healed by removing it.
//!
//! Both transit scenarios need traffic that crosses networks: the client's own cluster
//! serves the service too, and its sidecar would keep the load there. So for them the
//! drill applies, for its duration, a DestinationRule that spreads the client's requests
//! over the clusters of the *other* networks (`localityLbSetting.distribute`, with outlier
//! detection) and a VirtualService retrying a request whose attempt failed or outlived
//! `--per-try-timeout` on another endpoint, as a user who wants failover between remote
//! networks would write them (`--own-policy`: use what was applied with `lab apply`
//! instead); both are deleted afterwards.
//! - `controller-loss`: SIGKILL of C's controller; the proxies keep their last good config,
//!   so C's answers are not counted against it. Healed by starting it again.
//!
//! The figures (times from the injection, `t_inject`, or the heal, `t_heal`):
//! - *detect*: the end of the first attempt that failed (retried or not), or of the first
//!   request slower than `--slow`, after `t_inject`, of requests started before `t_heal`;
//!   none if the client saw neither.
//! - *reroute*: among requests started in `[t_inject, t_heal)`, the *bad* ones failed, were
//!   answered by C (except for `controller-loss` and `latency`), or took longer than `--slow`. Reroute is the end of the last bad one
//!   minus `t_inject` (0 when none was bad); *not rerouted* when a bad one started in the
//!   last quarter of the failure window (traffic still fails, is slow or goes to C there).
//! - *recover*: the end of the first request started after `t_heal` that C answered, minus
//!   `t_heal`.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use mesh_vocab::topology::WorkloadRole;

use crate::impair;
use crate::load::{self, Percentiles, Sample};
use crate::netns;
use crate::plan::{ClusterPlan, HEALTH_PORT};
use crate::probe;
use crate::process;
use crate::report;
use crate::running::{self, Running};
use crate::state::ProcessRecord;

/// The failures a drill injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    GatewayLoss,
    TransitCut,
    EndpointLoss,
    Latency,
    ControllerLoss,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::GatewayLoss => "gateway-loss",
            Scenario::TransitCut => "transit-cut",
            Scenario::EndpointLoss => "endpoint-loss",
            Scenario::Latency => "latency",
            Scenario::ControllerLoss => "controller-loss",
        }
    }
}

/// `isthmus drill failover` options.
#[derive(Debug, Clone, clap::Args)]
pub struct DrillArgs {
    #[arg(long, value_enum)]
    pub scenario: Scenario,
    /// The cluster that fails
    #[arg(long, default_value = "cluster2")]
    pub cluster: String,
    /// The client's cluster
    #[arg(long, default_value = "cluster1")]
    pub from: String,
    /// The service the load calls
    #[arg(long, default_value = "reviews")]
    pub service: String,
    /// The whole drill: warm-up, failure, after the heal
    #[arg(long, default_value = "12s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Requests per second (each a new connection)
    #[arg(long, default_value_t = 50)]
    pub rate: u32,
    /// Before the failure [default: a quarter of --duration]
    #[arg(long, value_parser = parse_duration)]
    pub warmup: Option<Duration>,
    /// How long the failure lasts [default: three eighths of --duration]
    #[arg(long, value_parser = parse_duration)]
    pub fail_for: Option<Duration>,
    /// Per attempt
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Retries of a request that got no response at all (idempotent GETs, as Envoy's
    /// `retry_on: reset,connect-failure`); 0 turns them off
    #[arg(long, default_value_t = 1)]
    pub retries: u32,
    /// The latency scenario's delay toward the failing cluster's gateway
    #[arg(long, default_value = "100ms", value_parser = parse_duration)]
    pub delay: Duration,
    /// ± this much on each frame's delay (order kept)
    #[arg(long, default_value = "0ms", value_parser = parse_duration)]
    pub jitter: Duration,
    /// Transit scenarios: the drill's VirtualService gives every attempt this long before
    /// it is retried on another endpoint
    #[arg(long, default_value = "150ms", value_parser = parse_duration)]
    pub per_try_timeout: Duration,
    /// Transit scenarios: keep the DestinationRule and VirtualService applied with
    /// `lab apply` instead of the drill's own (which spread the load over the other networks)
    #[arg(long)]
    pub own_policy: bool,
    /// A request slower than this counts as hurt by the failure (detect, reroute)
    #[arg(long, default_value = "500ms", value_parser = parse_duration)]
    pub slow: Duration,
    /// SLO: at most this many failed requests (after retries)
    #[arg(long)]
    pub slo_max_failures: Option<usize>,
    /// SLO: rerouted within this many milliseconds
    #[arg(long)]
    pub slo_reroute_ms: Option<u64>,
    /// Write a self-contained HTML report here
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// The result as one JSON object on stdout (the table goes to stderr)
    #[arg(long)]
    pub json: bool,
    /// [default: /run/isthmus/lab as root, else $TMPDIR/isthmus-lab-UID]
    #[arg(long, default_value_os_t = crate::default_state_dir(), hide_default_value = true)]
    pub state_dir: PathBuf,
}

/// `250ms`, `8s`, `1.5s`, `2m`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (e.g. 250ms, 8s)"))?;
    let secs = match unit {
        "us" | "µs" => n / 1_000_000.0,
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return Err(format!("`{s}`: the unit must be us, ms, s or m")),
    };
    if !secs.is_finite() || !(0.0..=86_400.0).contains(&secs) {
        return Err(format!("`{s}` is out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// The figures of one phase of the drill.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Phase {
    pub name: &'static str,
    pub sent: usize,
    pub ok: usize,
    pub failed: usize,
    /// Succeeded on a retry.
    pub retried: usize,
    /// Answered by the failing cluster.
    pub to_failing_cluster: usize,
    pub slow: usize,
    pub latency_ms: Option<Percentiles>,
}

/// One bucket of the timeline, by request start.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Bucket {
    pub start_ms: u64,
    pub sent: usize,
    pub ok: usize,
    pub to_failing_cluster: usize,
    pub p99_ms: Option<f64>,
}

/// What a drill measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DrillResult {
    pub scenario: Scenario,
    pub cluster: String,
    pub from: String,
    pub client: String,
    pub service: String,
    pub address: SocketAddr,
    pub rate: u32,
    pub retries: u32,
    pub timeout_ms: u64,
    pub slow_ms: u64,
    pub sidecar_connect_timeout: &'static str,
    /// How the failure was made and healed, in words.
    pub injected: String,
    /// For the transit scenarios, what impaired the leg: `netem`, or `relay` (the lab's WAN
    /// emulator, where the kernel has no `sch_netem`).
    pub link_impairment: Option<impair::Method>,
    pub healed: String,
    pub inject_at_ms: f64,
    pub heal_at_ms: f64,
    /// After the heal, when the restarted process was ready (gateway-loss, endpoint-loss).
    pub healed_ready_ms: Option<f64>,
    pub end_ms: f64,
    pub sent: usize,
    pub failed: usize,
    pub retried: usize,
    /// Of the failed, those in flight at the injection.
    pub failed_in_flight: usize,
    /// The client's sidecar during the drill: upstream connects refused and timed out
    /// (`isthmus_sidecar_upstream_failures_total`), each retried on the next endpoint.
    pub sidecar_connects_refused: Option<u64>,
    /// Requests started after the heal whose first attempt failed (the healing itself hurts:
    /// e.g. a restarted gateway that listens before its routes arrive).
    pub heal_failed_attempts: usize,
    pub sidecar_connect_timeouts: Option<u64>,
    pub failures: BTreeMap<String, usize>,
    pub landed: BTreeMap<String, usize>,
    pub detect_ms: Option<f64>,
    pub reroute_ms: Option<f64>,
    pub recover_ms: Option<f64>,
    pub phases: Vec<Phase>,
    pub bucket_ms: u64,
    pub timeline: Vec<Bucket>,
    pub slo: Vec<SloCheck>,
    pub slo_met: bool,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct SloCheck {
    pub what: String,
    pub met: bool,
    pub measured: String,
}

/// Timeline bucket width.
pub const BUCKET: Duration = Duration::from_millis(250);

/// A failure as injected, to heal (also when the drill is cut short).
enum Injected {
    None,
    Killed(Vec<ProcessRecord>),
    Impaired(impair::Leg),
}

/// Set by SIGINT/SIGTERM: the drill heals and stops early.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Sleeps until `at`, waking early when interrupted.
fn sleep_until(at: Instant) {
    while !INTERRUPTED.load(Ordering::SeqCst) {
        let now = Instant::now();
        if now >= at {
            return;
        }
        std::thread::sleep((at - now).min(Duration::from_millis(20)));
    }
}

/// Runs the drill; `Ok(false)` when an SLO was missed.
/// The table goes to `out`, or with `--json` to `log` and the JSON object alone to `out`.
pub fn failover(args: &DrillArgs, out: &mut impl Write, log: &mut impl Write) -> anyhow::Result<bool> {
    let table: &mut dyn Write = if args.json { log } else { out };
    let result = run(args, table)?;
    print(&result, table)?;
    if let Some(path) = &args.report {
        let lab = Running::open(&args.state_dir)?;
        std::fs::write(path, report::html(&result, &lab.plan))
            .with_context(|| format!("writing {}", path.display()))?;
        writeln!(table, "report: {}", path.display())?;
    }
    if args.json {
        writeln!(out, "{}", serde_json::to_string(&result)?)?;
    }
    Ok(result.slo_met)
}

/// Injects, heals and measures; the result without printing it.
pub fn run(args: &DrillArgs, out: &mut dyn Write) -> anyhow::Result<DrillResult> {
    if args.rate == 0 || args.rate > 1000 {
        bail!("--rate must be 1 to 1000 requests per second");
    }
    if args.duration < Duration::from_secs(2) || args.duration > Duration::from_secs(600) {
        bail!("--duration must be 2 s to 10 min");
    }
    // Every load loop is bounded in time: a request takes at most its timeout per attempt.
    if args.timeout.is_zero() || args.timeout > Duration::from_secs(60) {
        bail!("--timeout must be more than zero and at most 1 min");
    }
    if args.retries > 10 {
        bail!("--retries must be 0 to 10");
    }
    if args.per_try_timeout.is_zero() || args.per_try_timeout > Duration::from_secs(60) {
        bail!("--per-try-timeout must be more than zero and at most 1 min");
    }
    if args.delay > Duration::from_secs(10) || args.jitter > args.delay {
        bail!("--delay must be at most 10 s, and --jitter at most --delay");
    }
    if args.slow.is_zero() {
        bail!("--slow must be more than zero");
    }
    let warmup = args.warmup.unwrap_or(args.duration / 4);
    let fail_for = args.fail_for.unwrap_or(args.duration * 3 / 8);
    if warmup + fail_for >= args.duration {
        bail!("warm-up ({warmup:?}) and failure ({fail_for:?}) leave no time after the heal within --duration");
    }
    let mut lab = Running::open(&args.state_dir)?;
    if lab.plan.loopback {
        bail!("drills need the lab's networks to break: this lab runs on loopback (`lab up` without root)");
    }
    let target = lab.cluster(&args.cluster)?.clone();
    let from = lab.cluster(&args.from)?.clone();
    let (client, _, addr) = running::client_and_service(&from, &args.service)?;
    let client = client.clone();
    // What to break, checked before any load runs.
    let gateway_of = |c: &ClusterPlan| -> anyhow::Result<(String, String)> {
        let Some(gw) = &c.gateway else {
            bail!("{} has no east-west gateway", c.name)
        };
        if c.network == from.network {
            bail!(
                "{} is on {}'s network: {}'s requests do not cross its gateway",
                c.name,
                from.name,
                from.name
            );
        }
        Ok((gw.host.netns.clone(), gw.transit_link.clone()))
    };
    let victims: Vec<ProcessRecord> = match args.scenario {
        Scenario::GatewayLoss => {
            gateway_of(&target)?;
            let name = format!("{} gateway", target.name);
            let p = lab.process(&name).context("no gateway process recorded")?;
            if !process::is_running(p) {
                bail!("{name} (pid {}) is not running: heal the lab first", p.pid);
            }
            vec![p.clone()]
        }
        Scenario::EndpointLoss => {
            let pods: Vec<_> = target
                .pods
                .iter()
                .filter(|p| p.app == args.service && p.role == WorkloadRole::Server)
                .collect();
            if pods.is_empty() {
                bail!("{} runs no pod of {}", target.name, args.service);
            }
            let mut v = Vec::new();
            for p in pods {
                let name = format!("{} {}", target.name, p.name);
                let rec = lab
                    .process(&name)
                    .with_context(|| format!("no process {name} recorded"))?;
                if !process::is_running(rec) {
                    bail!("{name} (pid {}) is not running: heal the lab first", rec.pid);
                }
                v.push(rec.clone());
            }
            v
        }
        Scenario::ControllerLoss => {
            let name = format!("{} controller", target.name);
            let p = lab
                .process(&name)
                .with_context(|| format!("{} has no controller of its own (a remote?)", target.name))?;
            if !process::is_running(p) {
                bail!("{name} (pid {}) is not running: heal the lab first", p.pid);
            }
            vec![p.clone()]
        }
        Scenario::TransitCut | Scenario::Latency => {
            gateway_of(&target)?;
            Vec::new()
        }
    };
    let leg = match args.scenario {
        Scenario::TransitCut | Scenario::Latency => Some(impair::Leg::of(&lab.plan, &target)?),
        _ => None,
    };
    let impairment = match args.scenario {
        Scenario::TransitCut => impair::Impairment::CUT,
        _ => impair::Impairment {
            delay: args.delay,
            jitter: args.jitter,
            loss: 0.0,
        },
    };
    if let Some(leg) = &leg {
        // Whatever an earlier drill that was killed left on the leg.
        impair::clear(leg, &lab.state.state.processes)?;
    }
    let policy = match (&leg, args.own_policy) {
        (Some(_), false) => Some(crate::drill_policy::DrillPolicy::apply(
            &lab,
            &from,
            &args.service,
            args.per_try_timeout,
            out,
        )?),
        _ => None,
    };
    if policy.is_some() {
        crate::drill_policy::await_remote(&from, &client.host.netns, addr, out)?;
    }

    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(sig, on_interrupt as *const () as libc::sighandler_t) };
    }
    writeln!(
        out,
        "drill failover: {} of {}, load {} req/s from {} {} to {} ({addr}) for {:.1} s; failure at {:.1} s for {:.1} s",
        args.scenario.name(),
        target.name,
        args.rate,
        from.name,
        client.name,
        args.service,
        args.duration.as_secs_f64(),
        warmup.as_secs_f64(),
        fail_for.as_secs_f64()
    )?;
    out.flush()?;

    let sidecar_before = sidecar_counters(&client.host.netns);
    // The load: request i is due at t0 + i/rate, taken by the next free worker.
    let total = (args.rate as f64 * args.duration.as_secs_f64()).round() as usize;
    let workers = total.min((args.rate as usize * 3).clamp(8, 128));
    let next = Arc::new(AtomicUsize::new(0));
    let samples: Arc<Mutex<Vec<Sample>>> = Arc::new(Mutex::new(Vec::with_capacity(total)));
    let t0 = Instant::now() + Duration::from_millis(100);
    let rate = args.rate as f64;
    let (timeout, retries) = (args.timeout, args.retries);
    let mut handles = Vec::new();
    for i in 0..workers {
        let (ns, next, samples) = (client.host.netns.clone(), next.clone(), samples.clone());
        handles.push(std::thread::Builder::new().name(format!("drill {i}")).spawn(
            move || -> std::io::Result<()> {
                netns::enter(&ns)?;
                loop {
                    let n = next.fetch_add(1, Ordering::SeqCst);
                    if n >= total || INTERRUPTED.load(Ordering::SeqCst) {
                        return Ok(());
                    }
                    sleep_until(t0 + Duration::from_secs_f64(n as f64 / rate));
                    if INTERRUPTED.load(Ordering::SeqCst) {
                        return Ok(());
                    }
                    let s = load::request(addr, timeout, retries);
                    samples.lock().expect("not poisoned").push(s);
                }
            },
        )?);
    }

    sleep_until(t0 + warmup);
    let t_inject = Instant::now();
    let mut injected = Injected::None;
    let injection = inject(
        args.scenario,
        &victims,
        leg.as_ref(),
        impairment,
        &mut lab,
        &mut injected,
    );
    let (injected_text, link_impairment) = match &injection {
        Ok((t, m)) => (t.clone(), m.clone()),
        Err(e) => (format!("FAILED: {e:#}"), None),
    };
    if injection.is_ok() {
        sleep_until(t0 + warmup + fail_for);
    }
    let t_heal = Instant::now();
    let healing = heal(&mut lab, injected, out);
    let healed_ready = healing.as_ref().ok().and_then(|(_, r)| *r);
    // Wait for the load, bounded: every request has its timeout and retries.
    let bound = t0 + args.duration + timeout * (retries + 1) + Duration::from_secs(2);
    for h in handles {
        while !h.is_finished() && Instant::now() < bound {
            std::thread::sleep(Duration::from_millis(20));
        }
        if h.is_finished() {
            h.join()
                .map_err(|_| anyhow::anyhow!("a load thread panicked"))?
                .with_context(|| format!("entering {}", client.host.netns))?;
        }
    }
    let sidecar_after = sidecar_counters(&client.host.netns);
    if let Some(p) = policy {
        p.remove(out)
            .context("deleting the drill's DestinationRule and VirtualService")?;
    }
    injection.context("injecting the failure")?;
    let healed_text = healing.context("healing")?.0;
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted (the failure was healed)");
    }
    let samples = std::mem::take(&mut *samples.lock().expect("not poisoned"));
    Ok(analyse(
        args,
        Times {
            t0,
            t_inject,
            t_heal,
            healed_ready,
        },
        samples,
        AnalysisContext {
            target: target.name.to_string(),
            from: from.name.to_string(),
            client: client.name.clone(),
            address: addr,
            injected: injected_text,
            link_impairment,
            healed: healed_text,
            sidecar: sidecar_before
                .zip(sidecar_after)
                .map(|((r0, t0), (r1, t1))| (r1.saturating_sub(r0), t1.saturating_sub(t0))),
        },
    ))
}

/// The client sidecar's (connects refused, connects timed out) so far.
fn sidecar_counters(ns: &str) -> Option<(u64, u64)> {
    let page = probe::get(
        ns,
        SocketAddr::from(([127, 0, 0, 1], crate::plan::METRICS_PORT)),
        "/stats/prometheus",
        Duration::from_secs(1),
    )
    .ok()?
    .body;
    let n = |reason: &str| {
        crate::status::metric_sum_with(
            &page,
            "isthmus_sidecar_upstream_failures_total",
            &format!("reason=\"{reason}\",side=\"outbound\""),
        )
        .unwrap_or(0.0) as u64
    };
    Some((n("connect_failure"), n("connect_timeout")))
}

fn inject(
    scenario: Scenario,
    victims: &[ProcessRecord],
    leg: Option<&impair::Leg>,
    impairment: impair::Impairment,
    lab: &mut Running,
    injected: &mut Injected,
) -> anyhow::Result<(String, Option<impair::Method>)> {
    match (scenario, leg) {
        (Scenario::TransitCut | Scenario::Latency, Some(leg)) => {
            let isthmus = std::env::current_exe().context("this executable, which runs the WAN emulator")?;
            let running = lab.state.state.processes.clone();
            let method = impair::apply(leg, impairment, &isthmus, &mut lab.state, &running);
            // Recorded before it is known to have worked: a half-made impairment is cleared too.
            *injected = Injected::Impaired(leg.clone());
            let method = method?;
            let text = format!("{} ({})", impairment.describe(), leg.describe(&method));
            Ok((text, Some(method)))
        }
        _ => {
            for v in victims {
                if process::is_running(v) {
                    // SAFETY: kill(2) on a PID checked to be our process (same start time).
                    unsafe { libc::kill(v.pid as libc::pid_t, libc::SIGKILL) };
                }
            }
            *injected = Injected::Killed(victims.to_vec());
            let text = format!(
                "SIGKILL of {}",
                victims
                    .iter()
                    .map(|v| format!("{} (pid {})", v.name, v.pid))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            Ok((text, None))
        }
    }
}

/// Undoes `injected`; returns what was done and, for restarted processes, how long after
/// the heal began they were ready.
fn heal(lab: &mut Running, injected: Injected, out: &mut dyn Write) -> anyhow::Result<(String, Option<Duration>)> {
    let t = Instant::now();
    match injected {
        Injected::None => Ok(("nothing to heal".into(), None)),
        Injected::Impaired(leg) => {
            let running = lab.state.state.processes.clone();
            let how = match impair::clear(&leg, &running)? {
                Some(impair::Method::Netem) => "netem qdisc deleted",
                Some(impair::Method::Relay) => "WAN emulator stopped, the leg back on the bridge",
                None => "nothing was on the leg",
            };
            Ok((format!("{how} ({} in {})", leg.dev, leg.transit_ns), None))
        }
        Injected::Killed(victims) => {
            // SIGKILL is not instant: the old one must be gone before its port is bound again.
            let gone = Instant::now() + Duration::from_secs(5);
            while victims.iter().any(process::is_running) && Instant::now() < gone {
                std::thread::sleep(Duration::from_millis(5));
            }
            let mut started = Vec::new();
            for v in &victims {
                let program = Path::new(v.argv.first().context("a recorded process has its argv")?);
                let s = process::start(&v.name, &v.netns, program, &v.argv[1..], &v.log)
                    .with_context(|| format!("restarting {}", v.name))?;
                lab.state.process(s.record.clone())?;
                started.push(s);
            }
            // Ready: the gateway's health, or the app answering on its port.
            let deadline = Instant::now() + Duration::from_secs(15);
            for (v, s) in victims.iter().zip(started.iter_mut()) {
                let check: Box<dyn Fn() -> bool> = if v.name.ends_with(" controller") {
                    let ip = lab
                        .plan
                        .clusters
                        .iter()
                        .find_map(|c| c.controller.as_ref().filter(|h| h.netns == v.netns))
                        .map(|h| h.ip)
                        .context("the controller's address")?;
                    let ns = v.netns.clone();
                    Box::new(move || {
                        probe::get(
                            &ns,
                            SocketAddr::new(IpAddr::V4(ip), crate::plan::MONITORING_PORT),
                            "/ready",
                            Duration::from_millis(500),
                        )
                        .is_ok_and(|r| r.status == 200)
                    })
                } else if v.name.ends_with(" gateway") {
                    let ip = lab
                        .plan
                        .clusters
                        .iter()
                        .find_map(|c| c.gateway.as_ref().filter(|g| g.host.netns == v.netns))
                        .map(|g| g.host.ip)
                        .context("the gateway's address")?;
                    let ns = v.netns.clone();
                    Box::new(move || {
                        probe::get(
                            &ns,
                            SocketAddr::new(IpAddr::V4(ip), HEALTH_PORT),
                            "/healthz/ready",
                            Duration::from_millis(500),
                        )
                        .is_ok_and(|r| r.status == 200)
                    })
                } else {
                    let port: u16 = v
                        .argv
                        .iter()
                        .skip_while(|a| *a != "--listen")
                        .nth(1)
                        .and_then(|l| l.parse::<SocketAddr>().ok())
                        .map(|a| a.port())
                        .context("the app's --listen")?;
                    let ns = v.netns.clone();
                    Box::new(move || {
                        probe::get(
                            &ns,
                            SocketAddr::from(([127, 0, 0, 1], port)),
                            "/",
                            Duration::from_millis(500),
                        )
                        .is_ok_and(|r| r.status == 200)
                    })
                };
                loop {
                    if let Some(how) = s.exited() {
                        bail!("restarted {} exited ({how}); its log ends:\n{}", v.name, s.log_tail(10));
                    }
                    if check() {
                        break;
                    }
                    if Instant::now() >= deadline {
                        bail!("restarted {} not ready after 15 s", v.name);
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            let _ = out.flush();
            Ok((
                format!(
                    "restarted {} as `lab up` started {}",
                    started
                        .iter()
                        .map(|s| format!("{} (pid {})", s.record.name, s.record.pid))
                        .collect::<Vec<_>>()
                        .join(", "),
                    if started.len() == 1 { "it" } else { "them" }
                ),
                Some(t.elapsed()),
            ))
        }
    }
}

struct Times {
    t0: Instant,
    t_inject: Instant,
    t_heal: Instant,
    healed_ready: Option<Duration>,
}

struct AnalysisContext {
    target: String,
    from: String,
    client: String,
    address: SocketAddr,
    injected: String,
    link_impairment: Option<impair::Method>,
    healed: String,
    sidecar: Option<(u64, u64)>,
}

fn ms_since(a: Instant, b: Instant) -> f64 {
    b.saturating_duration_since(a).as_secs_f64() * 1000.0
}

fn analyse(args: &DrillArgs, t: Times, mut samples: Vec<Sample>, cx: AnalysisContext) -> DrillResult {
    samples.sort_by_key(|s| s.start);
    let at_c = |s: &Sample| s.landing().is_some_and(|l| l.cluster == cx.target);
    let slow = |s: &Sample| s.latency() > args.slow;
    // A lost controller leaves C's proxies serving, and a slowed network still answers: C's
    // answers count against those only when slow.
    let c_counts = !matches!(args.scenario, Scenario::ControllerLoss | Scenario::Latency);
    let bad = |s: &Sample| !s.ok() || (c_counts && at_c(s)) || slow(s);
    let phase = |name: &'static str, f: &dyn Fn(&Sample) -> bool| {
        let of: Vec<&Sample> = samples.iter().filter(|s| f(s)).collect();
        let ok = of.iter().filter(|s| s.ok()).count();
        Phase {
            name,
            sent: of.len(),
            ok,
            failed: of.len() - ok,
            retried: of.iter().filter(|s| s.ok() && s.attempts > 1).count(),
            to_failing_cluster: of.iter().filter(|s| at_c(s)).count(),
            slow: of.iter().filter(|s| s.ok() && slow(s)).count(),
            latency_ms: load::percentiles(of.iter().copied()),
        }
    };
    let phases = vec![
        phase("warm-up", &|s| s.start < t.t_inject),
        phase("failure", &|s| s.start >= t.t_inject && s.start < t.t_heal),
        phase("after heal", &|s| s.start >= t.t_heal),
        phase("total", &|_| true),
    ];
    let detect = samples
        .iter()
        .filter(|s| s.start < t.t_heal)
        .filter_map(|s| {
            s.first_failure
                .or_else(|| slow(s).then_some(s.end))
                .filter(|f| *f >= t.t_inject)
        })
        .min();
    let window: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.start >= t.t_inject && s.start < t.t_heal)
        .collect();
    let last_quarter = t.t_inject + (t.t_heal - t.t_inject) * 3 / 4;
    let reroute = if window.iter().any(|s| bad(s) && s.start >= last_quarter) {
        None
    } else {
        Some(
            window
                .iter()
                .filter(|s| bad(s))
                .map(|s| ms_since(t.t_inject, s.end))
                .fold(0.0, f64::max),
        )
    };
    let recover = samples
        .iter()
        .filter(|s| s.start >= t.t_heal && at_c(s))
        .map(|s| s.end)
        .min()
        .map(|e| ms_since(t.t_heal, e));
    let failed = samples.iter().filter(|s| !s.ok()).count();
    let (landed, failures) = load::tally(&samples);
    let mut by_cluster = BTreeMap::new();
    for (l, n) in landed {
        *by_cluster.entry(format!("{} {}", l.cluster, l.version)).or_default() += n;
    }
    // The timeline, by request start.
    let end = samples.iter().map(|s| s.start).max().unwrap_or(t.t0);
    let n_buckets = (end.saturating_duration_since(t.t0).as_millis() / BUCKET.as_millis()) as usize + 1;
    let mut timeline: Vec<Bucket> = (0..n_buckets)
        .map(|i| Bucket {
            start_ms: (i as u128 * BUCKET.as_millis()) as u64,
            sent: 0,
            ok: 0,
            to_failing_cluster: 0,
            p99_ms: None,
        })
        .collect();
    let mut latencies: Vec<Vec<Duration>> = vec![Vec::new(); n_buckets];
    for s in &samples {
        let i = (s.start.saturating_duration_since(t.t0).as_millis() / BUCKET.as_millis()) as usize;
        let b = &mut timeline[i.min(n_buckets - 1)];
        b.sent += 1;
        if s.ok() {
            b.ok += 1;
            latencies[i.min(n_buckets - 1)].push(s.latency());
        }
        if at_c(s) {
            b.to_failing_cluster += 1;
        }
    }
    for (b, mut l) in timeline.iter_mut().zip(latencies) {
        l.sort();
        b.p99_ms = load::quantile(&l, 0.99).map(|d| d.as_secs_f64() * 1000.0);
    }
    let mut slo = Vec::new();
    if let Some(max) = args.slo_max_failures {
        slo.push(SloCheck {
            what: format!("failed requests ≤ {max}"),
            met: failed <= max,
            measured: failed.to_string(),
        });
    }
    if let Some(max) = args.slo_reroute_ms {
        slo.push(SloCheck {
            what: format!("reroute ≤ {max} ms"),
            met: reroute.is_some_and(|r| r <= max as f64),
            measured: reroute.map_or("not rerouted".into(), |r| format!("{r:.0} ms")),
        });
    }
    DrillResult {
        scenario: args.scenario,
        cluster: cx.target,
        from: cx.from,
        client: cx.client,
        service: args.service.clone(),
        address: cx.address,
        rate: args.rate,
        retries: args.retries,
        timeout_ms: args.timeout.as_millis() as u64,
        slow_ms: args.slow.as_millis() as u64,
        sidecar_connect_timeout: crate::sidecar::CONNECT_TIMEOUT,
        injected: cx.injected,
        link_impairment: cx.link_impairment,
        healed: cx.healed,
        inject_at_ms: ms_since(t.t0, t.t_inject),
        heal_at_ms: ms_since(t.t0, t.t_heal),
        healed_ready_ms: t.healed_ready.map(|d| d.as_secs_f64() * 1000.0),
        end_ms: samples.iter().map(|s| ms_since(t.t0, s.end)).fold(0.0, f64::max),
        sent: samples.len(),
        failed,
        retried: samples.iter().filter(|s| s.ok() && s.attempts > 1).count(),
        failed_in_flight: samples
            .iter()
            .filter(|s| !s.ok() && s.start < t.t_inject && s.end >= t.t_inject)
            .count(),
        sidecar_connects_refused: cx.sidecar.map(|s| s.0),
        heal_failed_attempts: samples
            .iter()
            .filter(|s| s.start >= t.t_heal && s.first_failure.is_some())
            .count(),
        sidecar_connect_timeouts: cx.sidecar.map(|s| s.1),
        failures,
        landed: by_cluster,
        detect_ms: detect.map(|d| ms_since(t.t_inject, d)),
        reroute_ms: reroute,
        recover_ms: recover,
        phases,
        bucket_ms: BUCKET.as_millis() as u64,
        timeline,
        slo_met: slo.iter().all(|s| s.met),
        slo,
    }
}

/// The result as a person reads it.
pub fn print(r: &DrillResult, out: &mut dyn Write) -> std::io::Result<()> {
    writeln!(out, "  injected at {:.0} ms: {}", r.inject_at_ms, r.injected)?;
    writeln!(
        out,
        "  healed at {:.0} ms: {}{}",
        r.heal_at_ms,
        r.healed,
        r.healed_ready_ms
            .map(|d| format!(" (ready {d:.0} ms later)"))
            .unwrap_or_default()
    )?;
    writeln!(
        out,
        "  load: one connection per request, {} ms per attempt, {} retr{} of a request without any response; sidecars' --connect-timeout {}",
        r.timeout_ms,
        r.retries,
        if r.retries == 1 { "y" } else { "ies" },
        r.sidecar_connect_timeout
    )?;
    writeln!(
        out,
        "\n  {:<11} {:>6} {:>6} {:>7} {:>8} {:>11} {:>6} {:>8} {:>8}",
        "PHASE",
        "SENT",
        "OK",
        "FAILED",
        "RETRIED",
        format!("→{}", r.cluster),
        format!(">{}ms", r.slow_ms),
        "p50 ms",
        "p99 ms"
    )?;
    for p in &r.phases {
        let (p50, p99) = p.latency_ms.map_or(("-".into(), "-".into()), |l| {
            (format!("{:.1}", l.p50_ms), format!("{:.1}", l.p99_ms))
        });
        writeln!(
            out,
            "  {:<11} {:>6} {:>6} {:>7} {:>8} {:>11} {:>6} {:>8} {:>8}",
            p.name, p.sent, p.ok, p.failed, p.retried, p.to_failing_cluster, p.slow, p50, p99
        )?;
    }
    let ms = |v: Option<f64>, none: &str| v.map_or(none.to_string(), |v| format!("{v:.0} ms"));
    writeln!(out)?;
    writeln!(
        out,
        "  detect   {:>14}   first failed attempt or request slower than {} ms, after the injection",
        ms(r.detect_ms, "none seen"),
        r.slow_ms
    )?;
    writeln!(
        out,
        "  reroute  {:>14}   until the last request started during the failure that failed, went to {} or was slow",
        ms(r.reroute_ms, "not rerouted"),
        r.cluster
    )?;
    writeln!(
        out,
        "  recover  {:>14}   from the heal until {} answered again",
        ms(r.recover_ms, "not recovered"),
        r.cluster
    )?;
    writeln!(
        out,
        "  requests {} sent, {} failed ({} in flight at the injection), {} succeeded on a retry",
        r.sent, r.failed, r.failed_in_flight, r.retried
    )?;
    for (reason, n) in &r.failures {
        writeln!(out, "    failed: {n} × {reason}")?;
    }
    if r.heal_failed_attempts > 0 {
        writeln!(
            out,
            "  heal     {} requests started after the heal had a failed attempt ({} failed in the end)",
            r.heal_failed_attempts, r.phases[2].failed
        )?;
    }
    if let (Some(refused), Some(timeouts)) = (r.sidecar_connects_refused, r.sidecar_connect_timeouts) {
        writeln!(
            out,
            "  sidecar  {refused} upstream connects refused, {timeouts} timed out ({}), each retried on the next endpoint",
            r.sidecar_connect_timeout
        )?;
    }
    writeln!(
        out,
        "  landed   {}",
        r.landed
            .iter()
            .map(|(k, n)| format!("{k} ×{n}"))
            .collect::<Vec<_>>()
            .join(", ")
    )?;
    for s in &r.slo {
        writeln!(
            out,
            "  SLO {}: {} (measured {})",
            s.what,
            if s.met { "met" } else { "MISSED" },
            s.measured
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("8s"), Ok(Duration::from_secs(8)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("2h").is_err());
        assert!(parse_duration("fast").is_err());
    }

    #[test]
    fn unbounded_or_zero_load_settings_are_refused_before_the_lab_is_touched() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: DrillArgs,
        }
        let refusal = |extra: &str| {
            let words = format!("drill --scenario transit-cut --state-dir /nonexistent/lab {extra}");
            let cli = <Cli as clap::Parser>::try_parse_from(words.split_whitespace()).unwrap();
            run(&cli.args, &mut Vec::new()).err().unwrap().to_string()
        };
        for (extra, said) in [
            ("--timeout 0s", "--timeout must be"),
            ("--retries 11", "--retries must be 0 to 10"),
            ("--per-try-timeout 0s", "--per-try-timeout must be"),
            ("--delay 20ms --jitter 30ms", "--jitter at most --delay"),
            ("--slow 0s", "--slow must be"),
            ("--rate 0", "--rate must be"),
        ] {
            assert!(refusal(extra).contains(said), "{extra}: {}", refusal(extra));
        }
        // Good settings get as far as looking for the lab.
        assert!(refusal("--retries 10 --delay 20ms --jitter 20ms").contains("no lab recorded"));
    }
}
