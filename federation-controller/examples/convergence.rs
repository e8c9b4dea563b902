//! Convergence benchmark of the xDS server over real gRPC streams.
//!
//!     cargo run --release -p federation-controller --example convergence -- \
//!         --clusters 10 --endpoints 10000 --proxies 1000 [--services 100] [--changes 20]
//!
//! C synthetic clusters (alternating between two networks, each with a gateway)
//! of E endpoints spread over S services; P proxies (half on each network) on
//! delta ADS streams, each subscribing to every cluster and its endpoints and
//! ACKing what it gets. It times the full initial push, then K changes of one
//! endpoint each: from publishing the new state until each proxy has received
//! it. Each state follows the one before (`Snapshot::after`, as the publisher's do),
//! and holds the unchanged clusters' models as they were, as the registry does; the
//! controller CPU per change is counted from publishing to convergence, leaving out
//! the harness's building of the changed model. The proxies run in a child process (this example re-run with
//! `--clients ADDR`), so CPU, RSS and peak RSS are the controller's alone: the
//! proxies' decoded copies of every endpoint would otherwise dwarf it. Both
//! processes stamp events with CLOCK_MONOTONIC, which they share. Every wait is
//! bounded.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer;
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use federation_controller::model::{ClusterModel, Gateway, GatewayAddress, Instance, Locality, MeshConfig, ServiceKey};
use federation_controller::xds::{Snapshot, XdsServer};
use mesh_vocab::{ClusterId, Hostname, NetworkId};
use tokio::sync::{mpsc, watch};

const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
const EDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

struct Args {
    /// Set in the child: the server to connect the proxies to.
    clients_of: Option<String>,
    clusters: usize,
    endpoints: usize,
    proxies: usize,
    services: usize,
    changes: usize,
}

fn args() -> Args {
    let mut a = Args {
        clients_of: None,
        clusters: 10,
        endpoints: 1000,
        proxies: 100,
        services: 100,
        changes: 20,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--clients" {
            a.clients_of = Some(it.next().expect("--clients needs an address"));
            continue;
        }
        let v: usize = it
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{flag} needs a number"));
        match flag.as_str() {
            "--clusters" => a.clusters = v,
            "--endpoints" => a.endpoints = v,
            "--proxies" => a.proxies = v,
            "--services" => a.services = v,
            "--changes" => a.changes = v,
            _ => panic!("unknown flag {flag}"),
        }
    }
    a
}

/// Every cluster's model, as the registry holds them.
fn models(a: &Args) -> Vec<(Arc<ClusterModel>, bool)> {
    (0..a.clusters).map(|c| cluster(a, c, 0)).collect()
}

/// Cluster `c`'s model; for cluster 0, with its first endpoint moved by `change`.
fn cluster(a: &Args, c: usize, change: u32) -> (Arc<ClusterModel>, bool) {
    let network = NetworkId::new(format!("net{}", c % 2));
    let instances = (0..a.endpoints)
        .map(|e| {
            let s = e % a.services;
            // The change: cluster 0's first endpoint moves.
            let bump = if c == 0 && e == 0 { change } else { 0 };
            Instance {
                service: ServiceKey {
                    host: Hostname::parse(&format!("svc{s}.default.svc.cluster.local")).unwrap(),
                    port: 9080,
                },
                address: IpAddr::from(std::net::Ipv4Addr::from(
                    (10u32 << 24) | ((c as u32) << 17) | (e as u32 + bump),
                )),
                target_port: 8080,
                network: network.clone(),
                locality: Locality {
                    region: "r".into(),
                    zone: format!("z{}", e % 3),
                    subzone: String::new(),
                },
                mtls: true,
                labels: BTreeMap::new(),
                service_account: None,
                weight: 1,
            }
        })
        .collect();
    let gateways = vec![Gateway {
        network: network.clone(),
        address: GatewayAddress::Ip(IpAddr::from([100, 64, (c / 250) as u8, (c % 250) as u8 + 1])),
        port: 15443,
        pins_endpoints: false,
    }];
    (
        Arc::new(ClusterModel {
            named: Vec::new(),
            cluster: ClusterId::new(format!("c{c}")),
            instances,
            vips: vec![],
            gateways,
            exposure: Default::default(),
            security: Default::default(),
            traffic: Default::default(),
        }),
        false,
    )
}

fn node(i: usize) -> Node {
    Node {
        id: format!("sidecar~10.0.0.{i}~p{i}.default~default.svc.cluster.local"),
        metadata: Some(Struct {
            fields: [(
                "NETWORK".to_owned(),
                Value {
                    kind: Some(Kind::StringValue(format!("net{}", i % 2))),
                },
            )]
            .into(),
        }),
        ..Default::default()
    }
}

/// Nanoseconds on CLOCK_MONOTONIC, the same clock in both processes.
fn now_ns() -> u64 {
    // SAFETY: clock_gettime only fills the struct it is given.
    let t = unsafe {
        let mut t: libc::timespec = std::mem::zeroed();
        libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t);
        t
    };
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// One proxy: subscribes to all clusters and their endpoints, ACKs, and reports
/// the system version of every endpoint update it receives, and when.
async fn proxy(i: usize, addr: String, seen: mpsc::UnboundedSender<(usize, u64, u64)>) {
    // A thousand connects at once can meet a full accept queue: retry, bounded.
    let mut attempt = 0;
    let (tx, mut resp) = loop {
        attempt += 1;
        let (tx, rx) = mpsc::channel(16);
        let first = DeltaDiscoveryRequest {
            node: Some(node(i)),
            type_url: CDS.into(),
            ..Default::default()
        };
        tx.send(first).await.unwrap();
        let opened = async {
            // A full push of every endpoint is one message of several MiB.
            let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{addr}"))
                .await
                .ok()?
                .max_decoding_message_size(256 << 20);
            client
                .delta_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
                .ok()
        };
        match opened.await {
            Some(r) => break (tx, r.into_inner()),
            None if attempt < 20 => tokio::time::sleep(Duration::from_millis(50 * attempt)).await,
            None => panic!("proxy {i} could not connect"),
        }
    };
    loop {
        let r = match resp.message().await {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(e) => panic!("proxy {i}: the stream failed: {e}"),
        };
        let ack = DeltaDiscoveryRequest {
            type_url: r.type_url.clone(),
            response_nonce: r.nonce.clone(),
            ..Default::default()
        };
        if r.type_url == CDS {
            let names: Vec<String> = r.resources.iter().map(|x| x.name.clone()).collect();
            let _ = tx.send(ack).await;
            let sub = DeltaDiscoveryRequest {
                type_url: EDS.into(),
                resource_names_subscribe: names,
                ..Default::default()
            };
            let _ = tx.send(sub).await;
        } else {
            let _ = tx.send(ack).await;
            let _ = seen.send((i, r.system_version_info.parse().unwrap_or(0), now_ns()));
        }
    }
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

/// A `/proc/self/status` figure in MiB: `VmRSS` now, `VmHWM` the peak so far.
fn status_mib(field: &str) -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

fn memory() -> String {
    format!(
        "controller RSS {:.0} MiB (peak {:.0} MiB)",
        status_mib("VmRSS"),
        status_mib("VmHWM")
    )
}

/// The child: P proxies against the server at `addr`, one line per endpoint update on
/// stdout (`proxy version ns`), until the parent goes away.
async fn clients(addr: String, proxies: usize) {
    use std::io::Write;
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    for i in 0..proxies {
        tokio::spawn(proxy(i, addr.clone(), seen_tx.clone()));
    }
    let mut out = std::io::stdout().lock();
    while let Some((i, v, at)) = seen.recv().await {
        if writeln!(out, "{i} {v} {at}").and_then(|()| out.flush()).is_err() {
            return; // the parent is gone
        }
    }
}

/// Starts the child with the proxies; their updates arrive on the returned channel.
fn spawn_clients(addr: &str, proxies: usize) -> (std::process::Child, mpsc::UnboundedReceiver<(usize, u64, u64)>) {
    use std::io::BufRead;
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--clients", addr, "--proxies", &proxies.to_string()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("the clients' process starts");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            let f: Vec<u64> = line.split(' ').filter_map(|x| x.parse().ok()).collect();
            if let [i, v, at] = f[..]
                && tx.send((i as usize, v, at)).is_err()
            {
                return;
            }
        }
    });
    (child, rx)
}

fn cpu_secs() -> f64 {
    // SAFETY: getrusage only fills the struct it is given.
    let u = unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut u);
        u
    };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(u.ru_utime) + tv(u.ru_stime)
}

/// A thousand proxies and the server's end of each stream need more descriptors than the usual soft limit.
fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

#[tokio::main]
async fn main() {
    raise_fd_limit();
    let a = args();
    if let Some(addr) = a.clients_of.clone() {
        return clients(addr, a.proxies).await;
    }
    let total = a.clusters * a.endpoints;
    println!(
        "clusters={} endpoints/cluster={} (total {total}) services={} proxies={} changes={}",
        a.clusters, a.endpoints, a.services, a.proxies, a.changes
    );
    let mut version = 1u64;
    let (tx, rx) = watch::channel(Arc::new(Snapshot::new(
        version,
        Instant::now(),
        models(&a),
        MeshConfig::default(),
    )));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(
                AggregatedDiscoveryServiceServer::new(XdsServer::new(rx))
                    .max_decoding_message_size(64 << 20)
                    .max_encoding_message_size(256 << 20),
            )
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    let (cpu0, t0) = (cpu_secs(), Instant::now());
    let (mut child, mut seen) = spawn_clients(&addr, a.proxies);
    // Full push: every proxy has received endpoints at version 1.
    let mut synced = vec![false; a.proxies];
    let mut left = a.proxies;
    let deadline = Instant::now() + Duration::from_secs(300);
    while left > 0 {
        let (i, v, _) = tokio::time::timeout_at(deadline.into(), seen.recv())
            .await
            .expect("initial push within 300 s")
            .unwrap();
        if v >= 1 && !synced[i] {
            synced[i] = true;
            left -= 1;
        }
    }
    let full = t0.elapsed();
    let cpu_full = cpu_secs() - cpu0;
    println!(
        "full push to all proxies: {:.0} ms, controller CPU {:.2} s, {}",
        full.as_secs_f64() * 1e3,
        cpu_full,
        memory()
    );

    let mut lat = Vec::new();
    let mut needless = 0usize;
    // The controller's CPU from publishing each change until it has converged: the
    // harness's building of the changed cluster's model (the sources' work) is left out.
    let mut cpu_changes = 0.0;
    for k in 1..=a.changes as u32 {
        while seen.try_recv().is_ok() {}
        version += 1;
        // The sources' work, not the server's, so not timed: cluster 0's model is built
        // anew, the others are the registry's, unchanged.
        let prev = tx.borrow().clone();
        let mut clusters = prev.clusters.clone();
        clusters[0] = cluster(&a, 0, k * 100_000);
        let cpu1 = cpu_secs();
        let started = now_ns();
        let next = Snapshot::new(version, Instant::now(), clusters, MeshConfig::default()).after(&prev);
        tx.send(Arc::new(next)).unwrap();
        // Affected: proxies on net0, where the moved endpoint is. Proxies on net1
        // reach it through net0's gateway, whose weight did not change.
        let mut got = vec![false; a.proxies];
        let mut left = a.proxies.div_ceil(2);
        let deadline = Instant::now() + Duration::from_secs(60);
        while left > 0 {
            let (i, v, at) = tokio::time::timeout_at(deadline.into(), seen.recv())
                .await
                .expect("converged within 60 s")
                .unwrap();
            if v >= version && i % 2 == 1 {
                needless += 1;
            } else if v >= version && !got[i] {
                got[i] = true;
                left -= 1;
                lat.push(Duration::from_nanos(at.saturating_sub(started)));
            }
        }
        cpu_changes += cpu_secs() - cpu1;
    }
    lat.sort();
    println!(
        "one-endpoint change -> every affected proxy ({}): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms over {} changes; pushes to unaffected proxies: {needless}; controller CPU {:.1} ms per change; {}",
        a.proxies.div_ceil(2),
        pct(&lat, 0.5).as_secs_f64() * 1e3,
        pct(&lat, 0.99).as_secs_f64() * 1e3,
        lat.last().unwrap().as_secs_f64() * 1e3,
        a.changes,
        cpu_changes * 1e3 / a.changes as f64,
        memory()
    );
    let _ = child.kill();
    let _ = child.wait();
}
