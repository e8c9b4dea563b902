//! `isthmus lab traffic`: N requests from a cluster's client pod, through its capturing
//! sidecar, to a service's ClusterIP, C at a time on threads inside the pod's namespace;
//! where they landed (cluster, version), latency percentiles, failures by reason.

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;

use crate::load::{self, Percentiles, Sample};
use crate::loopback;
use crate::netns;
use crate::running::{self, Running};

/// What to drive.
#[derive(Debug, Clone)]
pub struct TrafficOptions {
    /// The client's cluster [default: the first].
    pub from: Option<String>,
    pub to: String,
    pub requests: usize,
    pub concurrency: usize,
    /// Per request.
    pub timeout: Duration,
    /// For the whole run: requests not started by then are not sent.
    pub deadline: Duration,
}

/// What came of it (`--json` prints this).
#[derive(Debug, Clone, serde::Serialize)]
pub struct TrafficReport {
    pub from_cluster: String,
    pub client: String,
    pub service: String,
    pub address: SocketAddr,
    /// A loopback lab: the client's sidecar routes the requests went round over (the client
    /// picks; networks are not enforced).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loopback_routes: Option<Vec<SocketAddr>>,
    pub requested: usize,
    pub sent: usize,
    pub ok: usize,
    pub failed: usize,
    pub elapsed_ms: f64,
    pub landed: Vec<Landed>,
    pub by_cluster: std::collections::BTreeMap<String, usize>,
    pub latency_ms: Option<Percentiles>,
    pub failures: Vec<Failure>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Landed {
    pub cluster: String,
    pub version: String,
    pub count: usize,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Failure {
    pub reason: String,
    pub count: usize,
}

/// Runs the requests against the lab in `dir`.
pub fn run(dir: &Path, opts: &TrafficOptions) -> anyhow::Result<TrafficReport> {
    if !(1..=1_000_000).contains(&opts.requests) || !(1..=256).contains(&opts.concurrency) {
        bail!("-n must be 1 to 1000000 and --concurrency 1 to 256");
    }
    let lab = Running::open(dir)?;
    let cluster = match &opts.from {
        Some(c) => lab.cluster(c)?,
        None => &lab.plan.clusters[0],
    };
    let (client, _, addr) = running::client_and_service(cluster, &opts.to)?;
    // Captured, the sidecar balances what goes to the ClusterIP; on loopback the client
    // spreads its requests over its routes itself.
    let routes: Vec<SocketAddr> = if lab.plan.loopback {
        loopback::routes(&lab.plan, cluster, client)
            .into_iter()
            .filter(|r| r.service == opts.to)
            .map(|r| r.listen)
            .collect()
    } else {
        vec![addr]
    };
    if routes.is_empty() {
        bail!("{} {} has no route to {}", cluster.name, client.name, opts.to);
    }
    let routes = Arc::new(routes);
    let ns = client.host.netns.clone();
    let next = Arc::new(AtomicUsize::new(0));
    let samples = Arc::new(Mutex::new(Vec::with_capacity(opts.requests)));
    let t0 = Instant::now();
    let end = t0 + opts.deadline;
    let workers: Vec<_> = (0..opts.concurrency.min(opts.requests))
        .map(|i| {
            let (ns, next, samples, n, timeout, routes) = (
                ns.clone(),
                next.clone(),
                samples.clone(),
                opts.requests,
                opts.timeout,
                routes.clone(),
            );
            std::thread::Builder::new()
                .name(format!("traffic {i}"))
                .spawn(move || -> std::io::Result<()> {
                    netns::enter(&ns)?;
                    while Instant::now() < end {
                        let i = next.fetch_add(1, Ordering::SeqCst);
                        if i >= n {
                            break;
                        }
                        let s = load::request(routes[i % routes.len()], timeout, 0);
                        samples.lock().expect("not poisoned").push(s);
                    }
                    Ok(())
                })
        })
        .collect::<Result<_, _>>()?;
    for w in workers {
        w.join()
            .map_err(|_| anyhow::anyhow!("a traffic thread panicked"))?
            .map_err(|e| anyhow::anyhow!("cannot enter {ns}: {e}"))?;
    }
    let elapsed = t0.elapsed();
    let samples: Vec<Sample> = std::mem::take(&mut *samples.lock().expect("not poisoned"));
    let (landed, failed) = load::tally(&samples);
    let mut by_cluster = std::collections::BTreeMap::new();
    for (l, n) in &landed {
        *by_cluster.entry(l.cluster.clone()).or_default() += n;
    }
    let ok = samples.iter().filter(|s| s.ok()).count();
    Ok(TrafficReport {
        from_cluster: cluster.name.to_string(),
        client: client.name.clone(),
        service: opts.to.clone(),
        address: addr,
        loopback_routes: lab.plan.loopback.then(|| routes.to_vec()),
        requested: opts.requests,
        sent: samples.len(),
        ok,
        failed: samples.len() - ok,
        elapsed_ms: elapsed.as_secs_f64() * 1000.0,
        landed: landed
            .into_iter()
            .map(|(l, count)| Landed {
                cluster: l.cluster,
                version: l.version,
                count,
            })
            .collect(),
        by_cluster,
        latency_ms: load::percentiles(&samples),
        failures: failed
            .into_iter()
            .map(|(reason, count)| Failure { reason, count })
            .collect(),
    })
}

/// The report as a person reads it.
pub fn print(r: &TrafficReport, out: &mut impl Write) -> std::io::Result<()> {
    writeln!(
        out,
        "{} {} → {} ({}): {} sent in {:.0} ms, {} ok, {} failed{}",
        r.from_cluster,
        r.client,
        r.service,
        r.address,
        r.sent,
        r.elapsed_ms,
        r.ok,
        r.failed,
        if r.sent < r.requested {
            format!(" ({} not sent: out of time)", r.requested - r.sent)
        } else {
            String::new()
        }
    )?;
    if let Some(routes) = &r.loopback_routes {
        writeln!(
            out,
            "  loopback lab: round robin over {} sidecar routes ({}), chosen by this client, not the mesh; networks not enforced",
            routes.len(),
            routes.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
        )?;
    }
    writeln!(
        out,
        "  {:<12} {:<8} {:>8} {:>7}",
        "CLUSTER", "VERSION", "REQUESTS", "SHARE"
    )?;
    for l in &r.landed {
        writeln!(
            out,
            "  {:<12} {:<8} {:>8} {:>6.1}%",
            l.cluster,
            l.version,
            l.count,
            100.0 * l.count as f64 / r.sent.max(1) as f64
        )?;
    }
    match &r.latency_ms {
        Some(p) => writeln!(
            out,
            "  latency (ok requests): p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            p.p50_ms, p.p90_ms, p.p99_ms, p.max_ms
        )?,
        None => writeln!(out, "  latency: no request succeeded")?,
    }
    for f in &r.failures {
        writeln!(out, "  failed: {} × {}", f.count, f.reason)?;
    }
    Ok(())
}
