//! Host names resolved to the addresses EDS carries: gateways known only by a
//! host name — cloud load balancers publish `status.loadBalancer.ingress[].hostname`,
//! not an IP — and ServiceEntry endpoints of `resolution: DNS`
//! ([`crate::model::NamedInstance`]).
//!
//! Federation stays pure: this is a stage between the snapshot sources and the
//! xDS server. It watches the snapshots the sources publish, resolves every
//! host name they name, and passes each snapshot on with the addresses
//! resolved so far ([`Snapshot::with_resolved`]) and each named endpoint made
//! one instance per address ([`ClusterModel::with_names_resolved`]), and a new
//! snapshot whenever an answer changes. A name is looked up again when its
//! record's TTL runs out, held within [`MIN_TTL`]..=[`MAX_TTL`] so that a zero
//! TTL cannot make it spin and a day-long one cannot pin a load balancer's old
//! addresses. A failed lookup keeps the last addresses (a DNS outage must not
//! take a network's gateways or an external service's endpoints away), is
//! counted (`isthmus_controller_gateway_resolution_failures_total{hostname}`,
//! `isthmus_controller_endpoint_resolution_failures_total{hostname}`) and is
//! retried after a backoff doubling from [`FIRST_RETRY`] up to [`MAX_TTL`].
//!
//! Istio has each Envoy resolve a DNS ServiceEntry itself (a `STRICT_DNS`
//! cluster). Here the controller resolves, once for every proxy, so that our
//! sidecars, Envoy and proxyless gRPC all get the same EDS; the price is that
//! the controller's resolver must see the names the workloads would.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::ResolverConfig;
use hickory_resolver::net::NetError;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

use mesh_vocab::ClusterId;

use crate::federation::{self, Resolved};
use crate::metrics::Metrics;
use crate::model::ClusterModel;
use crate::xds::Snapshot;

/// The shortest time an answer is kept before it is looked up again.
pub const MIN_TTL: Duration = Duration::from_secs(5);
/// The longest.
pub const MAX_TTL: Duration = Duration::from_secs(300);
/// The first retry after a failure; each further failure doubles it, up to [`MAX_TTL`].
pub const FIRST_RETRY: Duration = Duration::from_secs(1);
/// The longest one lookup may take (the resolver has its own, shorter, timeouts).
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(30);

/// A successful lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// Sorted, distinct, never empty.
    pub addresses: Vec<IpAddr>,
    /// How long the records may be kept.
    pub ttl: Duration,
}

/// A lookup in progress.
pub type Pending = Pin<Box<dyn Future<Output = Result<Answer, String>> + Send>>;

/// Looks host names up: hickory's resolver, or a script in tests.
pub trait Lookup: Send + Sync + 'static {
    /// The addresses of `host`, or why there are none.
    fn lookup(&self, host: &str) -> Pending;
}

impl Lookup for TokioResolver {
    fn lookup(&self, host: &str) -> Pending {
        let resolver = self.clone();
        // A load balancer's name is absolute: never try it under a pod's search
        // domains first (Kubernetes' ndots:5 would make that five queries).
        let name = if host.ends_with('.') {
            host.to_owned()
        } else {
            format!("{host}.")
        };
        Box::pin(async move {
            let found = resolver.lookup_ip(name.as_str()).await.map_err(|e| e.to_string())?;
            let ttl = found.valid_until().saturating_duration_since(std::time::Instant::now());
            let mut addresses: Vec<IpAddr> = found.iter().collect();
            addresses.sort();
            addresses.dedup();
            if addresses.is_empty() {
                return Err("no addresses".into());
            }
            Ok(Answer { addresses, ttl })
        })
    }
}

/// A resolver asking the name servers of `config`. Its cache keeps nothing
/// past [`MAX_TTL`], so a lookup at that bound asks the servers again.
pub fn resolver(config: ResolverConfig) -> Result<TokioResolver, NetError> {
    let mut builder = TokioResolver::builder_with_config(config, TokioRuntimeProvider::default());
    builder.options_mut().positive_max_ttl = Some(MAX_TTL);
    builder.build()
}

/// A resolver asking the name servers at `servers` (UDP, and TCP for long answers),
/// in order.
pub fn resolver_of(servers: &[std::net::SocketAddr]) -> Result<TokioResolver, NetError> {
    use hickory_resolver::config::{ConnectionConfig, NameServerConfig};
    let servers = servers
        .iter()
        .map(|addr| {
            let (mut udp, mut tcp) = (ConnectionConfig::udp(), ConnectionConfig::tcp());
            udp.port = addr.port();
            tcp.port = addr.port();
            NameServerConfig::new(addr.ip(), true, vec![udp, tcp])
        })
        .collect();
    resolver(ResolverConfig::from_name_servers(servers))
}

/// The system's resolver (`/etc/resolv.conf`), with the same cache bound as [`resolver`].
pub fn system_resolver() -> Result<TokioResolver, NetError> {
    let mut builder = TokioResolver::builder_tokio()?;
    builder.options_mut().positive_max_ttl = Some(MAX_TTL);
    builder.build()
}

/// Passes `upstream`'s snapshots on, their gateway host names resolved with
/// `lookup`, until either side closes. The receiver starts with `upstream`'s
/// current snapshot.
pub fn spawn(
    upstream: watch::Receiver<Arc<Snapshot>>,
    lookup: impl Lookup,
    metrics: Metrics,
) -> watch::Receiver<Arc<Snapshot>> {
    let (tx, rx) = watch::channel(upstream.borrow().clone());
    tokio::spawn(run(upstream, tx, Arc::new(lookup), metrics));
    rx
}

/// `snapshot` with every host name looked up once, for a one-shot look at a
/// state (the `view` command); a name that does not resolve is left out, and
/// logged.
pub async fn once(snapshot: Snapshot, lookup: &impl Lookup) -> Snapshot {
    let mut resolved = Resolved::new();
    for host in wanted(&snapshot).into_keys() {
        match tokio::time::timeout(LOOKUP_TIMEOUT, lookup.lookup(&host)).await {
            Ok(Ok(answer)) => {
                resolved.insert(host, answer.addresses);
            }
            Ok(Err(error)) => tracing::warn!(hostname = host, error, "host name not resolved: left out"),
            Err(_) => tracing::warn!(hostname = host, "host name not resolved in time: left out"),
        }
    }
    let clusters = Expanded::default().models(&snapshot.clusters, &resolved);
    Snapshot::new(snapshot.version, snapshot.created, clusters, snapshot.mesh).with_resolved(Arc::new(resolved))
}

/// What a host name is looked up for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Uses {
    gateway: bool,
    endpoint: bool,
}

/// Every host name `snapshot`'s live clusters and mesh config name, with what for.
fn wanted(snapshot: &Snapshot) -> BTreeMap<String, Uses> {
    let models = || snapshot.clusters.iter().map(|(m, _)| m.as_ref());
    let mut out: BTreeMap<String, Uses> = BTreeMap::new();
    for host in federation::gateway_hostnames(models(), &snapshot.mesh) {
        out.entry(host).or_default().gateway = true;
    }
    for host in models().flat_map(ClusterModel::endpoint_hostnames) {
        out.entry(host.to_owned()).or_default().endpoint = true;
    }
    out
}

/// The source models with their named endpoints resolved, kept from one snapshot to
/// the next: a model whose source and answers are unchanged stays the same `Arc`, so
/// federation does not index it again ([`federation::Index`]).
#[derive(Default)]
struct Expanded(BTreeMap<ClusterId, Expansion>);

/// One model's expansion: its source, the answers it was made with, the result.
type Expansion = (Arc<ClusterModel>, Vec<Option<Vec<IpAddr>>>, Arc<ClusterModel>);

impl Expanded {
    /// `clusters` with every model's named endpoints resolved with `resolved`.
    fn models(
        &mut self,
        clusters: &[(Arc<ClusterModel>, bool)],
        resolved: &Resolved,
    ) -> Vec<(Arc<ClusterModel>, bool)> {
        let mut next = BTreeMap::new();
        let out = clusters
            .iter()
            .map(|(source, stale)| {
                if source.named.is_empty() {
                    return (source.clone(), *stale);
                }
                let answers: Vec<Option<Vec<IpAddr>>> =
                    source.endpoint_hostnames().map(|h| resolved.get(h).cloned()).collect();
                let model = match self.0.remove(&source.cluster) {
                    Some((before, used, model)) if Arc::ptr_eq(&before, source) && used == answers => model,
                    _ => Arc::new(source.with_names_resolved(resolved)),
                };
                next.insert(source.cluster.clone(), (source.clone(), answers, model.clone()));
                (model, *stale)
            })
            .collect();
        self.0 = next;
        out
    }
}

/// What is known of one host name.
#[derive(Debug)]
struct Name {
    /// The last answer's addresses; None until one has come.
    addresses: Option<Vec<IpAddr>>,
    /// When to look it up next.
    due: Instant,
    /// Failures since the last answer.
    failures: u32,
    in_flight: bool,
    uses: Uses,
}

async fn run(
    mut upstream: watch::Receiver<Arc<Snapshot>>,
    tx: watch::Sender<Arc<Snapshot>>,
    lookup: Arc<dyn Lookup>,
    metrics: Metrics,
) {
    let mut names: BTreeMap<String, Name> = BTreeMap::new();
    let mut lookups: JoinSet<(String, Result<Answer, String>)> = JoinSet::new();
    let mut hosts: HashMap<tokio::task::Id, String> = HashMap::new();
    let mut source = upstream.borrow_and_update().clone();
    let mut expanded = Expanded::default();
    follow(&mut names, &source);
    loop {
        let due = names.values().filter(|n| !n.in_flight).map(|n| n.due).min();
        let created = tokio::select! {
            changed = upstream.changed() => {
                if changed.is_err() {
                    return;
                }
                source = upstream.borrow_and_update().clone();
                follow(&mut names, &source);
                source.created
            }
            Some(done) = lookups.join_next_with_id(), if !lookups.is_empty() => {
                let (host, result) = match done {
                    Ok((id, done)) => {
                        hosts.remove(&id);
                        done
                    }
                    // Only a panic inside the resolver gets here: try again later.
                    Err(e) => {
                        let host = hosts.remove(&e.id()).unwrap_or_default();
                        (host, Err(format!("lookup failed: {e}")))
                    }
                };
                let Some(name) = names.get_mut(&host) else {
                    continue; // nothing has that name any more
                };
                if !answered(&host, name, result, &metrics) {
                    continue;
                }
                std::time::Instant::now()
            }
            () = tokio::time::sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => {
                let now = Instant::now();
                for (host, name) in names.iter_mut().filter(|(_, n)| !n.in_flight && n.due <= now) {
                    name.in_flight = true;
                    let pending = lookup.lookup(host);
                    let task = lookups.spawn({
                        let host = host.clone();
                        async move {
                            let result = tokio::time::timeout(LOOKUP_TIMEOUT, pending)
                                .await
                                .unwrap_or_else(|_| Err(format!("no answer in {LOOKUP_TIMEOUT:?}")));
                            (host, result)
                        }
                    });
                    hosts.insert(task.id(), host.clone());
                }
                continue;
            }
            () = tx.closed() => return,
        };
        let resolved: Resolved = names
            .iter()
            .filter_map(|(h, n)| Some((h.clone(), n.addresses.clone()?)))
            .collect();
        let current = tx.borrow().clone();
        let next = Snapshot::new(
            current.version + 1,
            created,
            expanded.models(&source.clusters, &resolved),
            source.mesh.clone(),
        )
        .with_resolved(Arc::new(resolved))
        .after(&current);
        if !next.same_state(&current) && tx.send(Arc::new(next)).is_err() {
            return;
        }
    }
}

/// Keeps `names` to the host names `snapshot` has: new ones are due at once,
/// gone ones forgotten.
fn follow(names: &mut BTreeMap<String, Name>, snapshot: &Snapshot) {
    let wanted = wanted(snapshot);
    names.retain(|h, _| wanted.contains_key(h));
    for (host, uses) in wanted {
        names
            .entry(host)
            .or_insert_with(|| Name {
                addresses: None,
                due: Instant::now(),
                failures: 0,
                in_flight: false,
                uses,
            })
            .uses = uses;
    }
}

/// Takes a lookup's result into `name`: whether its addresses changed.
fn answered(host: &str, name: &mut Name, result: Result<Answer, String>, metrics: &Metrics) -> bool {
    name.in_flight = false;
    match result {
        Ok(answer) => {
            name.failures = 0;
            name.due = Instant::now() + answer.ttl.clamp(MIN_TTL, MAX_TTL);
            if name.addresses.as_ref() == Some(&answer.addresses) {
                return false;
            }
            tracing::info!(hostname = host, addresses = ?answer.addresses, ttl = ?answer.ttl, "host name resolved");
            name.addresses = Some(answer.addresses);
            true
        }
        Err(error) => {
            name.failures += 1;
            let backoff = FIRST_RETRY
                .saturating_mul(1 << (name.failures - 1).min(16))
                .min(MAX_TTL);
            name.due = Instant::now() + backoff;
            if name.uses.gateway {
                metrics.gateway_resolution_failed(host);
            }
            if name.uses.endpoint {
                metrics.endpoint_resolution_failed(host);
            }
            tracing::warn!(
                hostname = host,
                error,
                failures = name.failures,
                retry_in = ?backoff,
                kept = ?name.addresses,
                "host name not resolved: its last addresses are kept"
            );
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ClusterModel, Gateway, GatewayAddress, Instance, MeshConfig, NamedInstance, ServiceKey};
    use mesh_vocab::{ClusterId, NetworkId};
    use std::sync::Mutex;

    /// Answers from a script, and when each lookup came.
    #[derive(Clone, Default)]
    struct Script {
        /// None: not scripted yet.
        answer: Arc<Mutex<Option<Result<Answer, String>>>>,
        asked: Arc<Mutex<Vec<Duration>>>,
        start: Arc<Mutex<Option<Instant>>>,
    }

    impl Script {
        fn answer(&self, ips: &[[u8; 4]], ttl: u64) {
            *self.answer.lock().unwrap() = Some(Ok(Answer {
                addresses: ips.iter().map(|ip| IpAddr::from(*ip)).collect(),
                ttl: Duration::from_secs(ttl),
            }));
        }

        fn fail(&self) {
            *self.answer.lock().unwrap() = Some(Err("SERVFAIL".into()));
        }

        /// When each lookup came, from the first.
        fn asked(&self) -> Vec<u64> {
            self.asked.lock().unwrap().iter().map(|d| d.as_secs()).collect()
        }
    }

    impl Lookup for Script {
        fn lookup(&self, host: &str) -> Pending {
            assert_eq!(host, "lb.example.com");
            let start = *self.start.lock().unwrap().get_or_insert_with(Instant::now);
            self.asked.lock().unwrap().push(start.elapsed());
            let answer = self.answer.lock().unwrap().clone().expect("an answer scripted");
            Box::pin(async move { answer })
        }
    }

    #[tokio::test]
    async fn once_resolves_what_it_can_and_leaves_the_rest_out() {
        let script = Script::default();
        script.answer(&[[198, 51, 100, 7]], 60);
        let named = || snapshot_with(GatewayAddress::Hostname("lb.example.com".into()));
        let snap = once(named(), &script).await;
        assert_eq!(
            snap.resolved.get("lb.example.com"),
            Some(&vec![IpAddr::from([198, 51, 100, 7])])
        );
        script.fail();
        assert!(once(named(), &script).await.resolved.is_empty());
    }

    fn with_gateway(address: GatewayAddress) -> Arc<Snapshot> {
        Arc::new(snapshot_with(address))
    }

    fn snapshot_with(address: GatewayAddress) -> Snapshot {
        let model = ClusterModel {
            exposure: Default::default(),
            traffic: Default::default(),
            cluster: ClusterId::new("c2"),
            instances: vec![],
            named: vec![],
            vips: vec![],
            gateways: vec![Gateway {
                network: NetworkId::new("n2"),
                address,
                port: 15443,
                pins_endpoints: false,
            }],
            security: Default::default(),
        };
        Snapshot::new(
            1,
            std::time::Instant::now(),
            vec![(Arc::new(model), false)],
            MeshConfig::default(),
        )
    }

    /// A snapshot whose one cluster has one ServiceEntry endpoint named `lb.example.com`.
    fn with_named_endpoint() -> Snapshot {
        let mut snapshot = snapshot_with(GatewayAddress::Ip([100, 64, 0, 2].into()));
        let mut model = (*snapshot.clusters[0].0).clone();
        model.named.push(NamedInstance {
            hostname: "lb.example.com".into(),
            instance: Instance {
                service: ServiceKey {
                    host: mesh_vocab::Hostname::parse("db.example.com").unwrap(),
                    port: 5432,
                },
                address: IpAddr::from([0, 0, 0, 0]),
                target_port: 5433,
                network: NetworkId::new("n2"),
                locality: Default::default(),
                mtls: false,
                labels: Default::default(),
                service_account: None,
                weight: 2,
            },
        });
        snapshot.clusters[0].0 = Arc::new(model);
        snapshot
    }

    /// "address:port wN" of every instance the snapshot's one cluster has.
    fn instances(rx: &watch::Receiver<Arc<Snapshot>>) -> Vec<String> {
        let snap = rx.borrow();
        let model = &snap.clusters[0].0;
        assert!(model.named.is_empty(), "passed on resolved");
        model
            .instances
            .iter()
            .map(|i| format!("{}:{} w{}", i.address, i.target_port, i.weight))
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_named_endpoint_is_passed_on_as_its_addresses_and_kept_while_dns_fails() {
        let script = Script::default();
        script.answer(&[[198, 51, 100, 9], [198, 51, 100, 7]], 10);
        let (_up, upstream) = watch::channel(Arc::new(with_named_endpoint()));
        let metrics = Metrics::new();
        let rx = spawn(upstream, script.clone(), metrics.clone());
        settle().await;
        assert_eq!(instances(&rx), ["198.51.100.7:5433 w2", "198.51.100.9:5433 w2"]);
        let model = rx.borrow().clusters[0].0.clone();
        // The same answer at the TTL: nothing new is published.
        tokio::time::sleep(Duration::from_secs(11)).await;
        settle().await;
        assert_eq!(script.asked(), [0, 10]);
        assert_eq!(rx.borrow().version, 2);
        // DNS fails: the addresses stay, the failure is the endpoint's, not a gateway's.
        script.fail();
        tokio::time::sleep(Duration::from_millis(9_500)).await;
        settle().await;
        assert_eq!(script.asked(), [0, 10, 20]);
        assert!(Arc::ptr_eq(&rx.borrow().clusters[0].0, &model), "the same model");
        let text = metrics.render();
        assert!(
            text.contains(r#"isthmus_controller_endpoint_resolution_failures_total{hostname="lb.example.com"} 1"#),
            "{text}"
        );
        assert!(
            !text.contains("isthmus_controller_gateway_resolution_failures_total{"),
            "{text}"
        );
        // It answers with one address less: passed on.
        script.answer(&[[198, 51, 100, 9]], 10);
        tokio::time::sleep(Duration::from_secs(1)).await;
        settle().await;
        assert_eq!(instances(&rx), ["198.51.100.9:5433 w2"]);
        // `once` resolves it the same way.
        let snap = once(with_named_endpoint(), &script).await;
        assert_eq!(snap.clusters[0].0.instances.len(), 1);
    }

    fn resolved(rx: &watch::Receiver<Arc<Snapshot>>) -> Option<Vec<String>> {
        let snap = rx.borrow();
        let ips = snap.resolved.get("lb.example.com")?;
        Some(ips.iter().map(ToString::to_string).collect())
    }

    /// Lets the stage run until nothing more is ready.
    async fn settle() {
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_name_is_resolved_at_once_and_again_at_its_ttl_within_the_bounds() {
        let script = Script::default();
        script.answer(&[[198, 51, 100, 7]], 1);
        let (_up, upstream) = watch::channel(with_gateway(GatewayAddress::Hostname("lb.example.com".into())));
        let rx = spawn(upstream, script.clone(), Metrics::new());
        settle().await;
        assert_eq!(resolved(&rx), Some(vec!["198.51.100.7".to_owned()]));
        assert_eq!(rx.borrow().version, 2, "passed on at a new version");
        // TTL 1 s is held to 5 s; then 30 s is kept; then a day is held to 5 min.
        tokio::time::sleep(Duration::from_secs(4)).await;
        script.answer(&[[198, 51, 100, 7]], 30);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(script.asked(), [0, 5]);
        script.answer(&[[198, 51, 100, 8]], 86_400);
        tokio::time::sleep(Duration::from_secs(30)).await;
        settle().await;
        assert_eq!(script.asked(), [0, 5, 35]);
        assert_eq!(resolved(&rx), Some(vec!["198.51.100.8".to_owned()]));
        tokio::time::sleep(Duration::from_secs(298)).await;
        assert_eq!(script.asked(), [0, 5, 35], "not before 5 min");
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(script.asked(), [0, 5, 35, 335]);
        let version = rx.borrow().version;
        assert_eq!(version, 3, "an unchanged answer publishes nothing");
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_keeps_the_last_addresses_counts_and_retries_with_backoff() {
        let script = Script::default();
        script.answer(&[[198, 51, 100, 7], [198, 51, 100, 9]], 10);
        let (_up, upstream) = watch::channel(with_gateway(GatewayAddress::Hostname("lb.example.com".into())));
        let metrics = Metrics::new();
        let rx = spawn(upstream, script.clone(), metrics.clone());
        settle().await;
        script.fail();
        // Fails at 10 s, then retries 1, 2, 4, 8 s later.
        tokio::time::sleep(Duration::from_secs(26)).await;
        assert_eq!(script.asked(), [0, 10, 11, 13, 17, 25]);
        assert_eq!(
            resolved(&rx),
            Some(vec!["198.51.100.7".to_owned(), "198.51.100.9".to_owned()]),
            "the last addresses are kept"
        );
        let text = metrics.render();
        assert!(
            text.contains(r#"isthmus_controller_gateway_resolution_failures_total{hostname="lb.example.com"} 5"#),
            "{text}"
        );
        // It answers again: the next retry (16 s after the last) takes the new addresses.
        script.answer(&[[198, 51, 100, 10]], 10);
        tokio::time::sleep(Duration::from_secs(16)).await;
        settle().await;
        assert_eq!(resolved(&rx), Some(vec!["198.51.100.10".to_owned()]));
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(script.asked().last(), Some(&51), "back to the TTL once answered");
    }

    #[tokio::test(start_paused = true)]
    async fn every_source_snapshot_is_passed_on_and_a_name_no_gateway_has_is_forgotten() {
        let script = Script::default();
        script.answer(&[[198, 51, 100, 7]], 60);
        let (up, upstream) = watch::channel(with_gateway(GatewayAddress::Hostname("lb.example.com".into())));
        let rx = spawn(upstream, script.clone(), Metrics::new());
        settle().await;
        assert!(resolved(&rx).is_some());
        // The gateway gets an IP instead: passed on, the name dropped, never asked again.
        up.send(with_gateway(GatewayAddress::Ip([100, 64, 0, 2].into())))
            .unwrap();
        settle().await;
        let snap = rx.borrow().clone();
        assert_eq!(snap.version, 3);
        assert!(snap.resolved.is_empty());
        assert_eq!(
            snap.clusters[0].0.gateways[0].address,
            GatewayAddress::Ip([100, 64, 0, 2].into())
        );
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert_eq!(script.asked(), [0]);
        // The source closing ends the stage, and with it the stream of snapshots.
        drop(up);
        let mut rx = rx;
        rx.mark_unchanged();
        assert!(rx.changed().await.is_err());
    }
}
