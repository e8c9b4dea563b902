//! `federation-controller`: see `--help`.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer;
use federation_controller::cluster_clients::ClusterClients;
use federation_controller::metrics::Metrics;
use federation_controller::model::MeshConfig;
use federation_controller::registry::Freshness;
use federation_controller::writeback::{self, WritebackMetrics};
use federation_controller::xds::{Snapshot, XdsServer};
use federation_controller::{ca, kube_source, manifests, publisher, remote_secrets, resolve, trust};
use hyper::{Method, StatusCode};
use mesh_vocab::{ClusterId, NetworkId};
use sidecar::http_endpoint::{self, Handler, Reply};
use std::sync::Arc;

#[derive(Parser)]
#[command(name = "federation-controller", version, about = "Isthmus federation controller")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where the clusters come from, and the mesh settings read with them.
#[derive(Args)]
struct Source {
    /// Directory with one subdirectory of Kubernetes YAML per cluster.
    #[arg(
        long,
        value_name = "DIR",
        required_unless_present = "kubeconfigs",
        conflicts_with = "kubeconfigs"
    )]
    manifests: Option<PathBuf>,
    /// A cluster's API server: CLUSTER=KUBECONFIG-FILE (repeatable), instead of --manifests.
    #[arg(long = "kubeconfig", value_name = "CLUSTER=FILE", value_parser = parse_kubeconfig)]
    kubeconfigs: Vec<(String, String)>,
    /// The network of a cluster whose pods and namespaces name none: CLUSTER=NETWORK (repeatable).
    #[arg(long = "cluster-network", value_name = "CLUSTER=NETWORK", value_parser = parse_pair)]
    cluster_networks: Vec<(String, String)>,
    /// Cluster DNS domain.
    #[arg(long, default_value = "cluster.local")]
    domain: String,
    /// A name server for the host names to resolve (gateways' load balancers, DNS
    /// ServiceEntries): IP or IP:PORT, repeatable, asked in order; /etc/resolv.conf's by default.
    #[arg(long = "nameserver", value_name = "ADDR", value_parser = parse_nameserver)]
    nameservers: Vec<std::net::SocketAddr>,
}

impl Source {
    fn mesh(&self) -> MeshConfig {
        MeshConfig {
            domain: self.domain.clone(),
            cluster_networks: self
                .cluster_networks
                .iter()
                .map(|(c, n)| (ClusterId::new(c), NetworkId::new(n)))
                .collect(),
            ..MeshConfig::default()
        }
    }

    /// The resolver of `--nameserver`, else the system's.
    fn resolver(&self) -> Result<hickory_resolver::TokioResolver, hickory_resolver::net::NetError> {
        if self.nameservers.is_empty() {
            resolve::system_resolver()
        } else {
            resolve::resolver_of(&self.nameservers)
        }
    }

    /// The first snapshot; at start an unreadable or empty directory is an error.
    fn snapshot(&self, mesh: &MeshConfig) -> anyhow::Result<Snapshot> {
        let dir = self.manifests.as_ref().context("this command reads --manifests DIR")?;
        let snap = manifests::snapshot(dir, mesh, 1).with_context(|| format!("reading {}", dir.display()))?;
        anyhow::ensure!(
            !snap.clusters.is_empty(),
            "{}: no cluster subdirectories",
            dir.display()
        );
        Ok(snap)
    }
}

#[derive(Subcommand)]
// Parsed once at start; boxing the big variant would only add noise.
#[allow(clippy::large_enum_variant)]
enum Command {
    /// Serves xDS (ADS, state of the world and delta: listeners, clusters, endpoints,
    /// trust bundles) from a manifest directory, re-read whenever a file changes, or
    /// from API servers.
    Serve {
        #[command(flatten)]
        source: Source,
        /// Where to serve plaintext xDS (Istio's 15010).
        #[arg(long, default_value = "0.0.0.0:15010", value_name = "ADDR")]
        xds: std::net::SocketAddr,
        /// Where to serve Prometheus metrics (`/metrics`) and readiness (`/ready`), Istio's 15014.
        #[arg(long, default_value = "0.0.0.0:15014", value_name = "ADDR")]
        monitoring: std::net::SocketAddr,
        /// Also serve the remote clusters of the remote secrets (`istio/multiCluster: "true"`)
        /// in CLUSTER's `istio-system`; CLUSTER is this controller's own cluster.
        #[arg(long, value_name = "CLUSTER", requires = "kubeconfigs")]
        remote_secrets_from: Option<String>,
        /// How long readiness waits for every cluster's initial sync.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        sync_timeout: std::time::Duration,
        /// How often the manifest directory is checked for changes; a change is read once
        /// it has held still for one interval (a file caught half-written is never read).
        #[arg(long, default_value = "1s", value_parser = sidecar::run::positive_duration)]
        interval: std::time::Duration,
        /// MiB of xDS responses on their way to proxies (sent, not yet ACKed) at once: what
        /// bounds memory when many proxies connect together. Responses under 64 KiB never wait.
        #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
        push_budget_mib: u32,
        #[command(flatten)]
        ca: CaArgs,
        #[command(flatten)]
        writeback: WritebackArgs,
    },
    /// The certificate authority's offline tasks.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Reads a manifest directory (one subdirectory per cluster) and prints, per
    /// service port, the endpoints a proxy on NETWORK would be given.
    View {
        #[command(flatten)]
        source: Source,
        /// The network of the proxy asking.
        #[arg(long)]
        network: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// Writing into clusters the ServiceEntries and ServiceImports of services other clusters
/// export (MCS `ServiceExport`).
#[derive(Args)]
struct WritebackArgs {
    /// With --manifests: write the ServiceEntries and ServiceImports each cluster needs for
    /// the services other clusters export (MCS ServiceExport) as files
    /// DIR/<cluster>/<namespace>_<kind>_<name>.yaml.
    #[arg(long, value_name = "DIR", requires = "manifests")]
    writeback_dir: Option<PathBuf>,
    /// With --kubeconfig: write those objects into each cluster's API server, while this
    /// replica holds the `isthmus-controller` Lease in the own cluster's istio-system.
    #[arg(long, requires = "kubeconfigs")]
    writeback: bool,
    /// This replica's holder identity in the Lease (default: the host name, a pod's name).
    #[arg(long, value_name = "NAME")]
    leader_identity: Option<String>,
    /// How long a Lease holds without renewal.
    #[arg(long, default_value = "15s", value_parser = sidecar::run::positive_duration)]
    lease_duration: std::time::Duration,
    /// How often the holder renews it (and others check it).
    #[arg(long, default_value = "5s", value_parser = sidecar::run::positive_duration)]
    lease_renew: std::time::Duration,
}

/// The CA and the TLS port (Istio's 15012) that serves it, with xDS, to workloads.
#[derive(Args)]
struct CaArgs {
    /// The CA's directory: Istio's `cacerts` files (ca-cert.pem, ca-key.pem, cert-chain.pem,
    /// root-cert.pem) to use a plugged-in CA, or empty to make a self-signed root there.
    /// Without it, no CA and no TLS port are served.
    #[arg(long, value_name = "DIR")]
    ca_dir: Option<PathBuf>,
    /// The mesh's trust domain.
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// Where to serve xDS and the CA over TLS (Istio's 15012).
    #[arg(long, default_value = "0.0.0.0:15012", value_name = "ADDR")]
    secure: std::net::SocketAddr,
    /// Names the TLS port's certificate carries (repeatable), beside 127.0.0.1.
    #[arg(long = "serving-name", default_values = ["istiod.istio-system.svc", "isthmus-controller", "localhost"])]
    serving_names: Vec<String>,
    /// Lifetime of an SVID when the workload asks for none.
    #[arg(long, default_value = "24h", value_parser = sidecar::run::positive_duration)]
    svid_ttl: std::time::Duration,
    /// The longest SVID lifetime granted.
    #[arg(long, default_value = "7d", value_parser = sidecar::run::positive_duration)]
    max_svid_ttl: std::time::Duration,
    /// Serve this trust domain's SPIFFE bundle endpoint here (https_spiffe profile).
    #[arg(long, value_name = "ADDR", requires = "ca_dir")]
    bundle_endpoint: Option<std::net::SocketAddr>,
    /// The refresh hint our bundle endpoint publishes.
    #[arg(long, default_value = "5m", value_parser = sidecar::run::positive_duration)]
    bundle_refresh_hint: std::time::Duration,
    /// A file of FederatedTrustDomain (or SPIRE ClusterFederatedTrustDomain) manifests:
    /// trust domains whose bundles are fetched and served to proxies (repeatable).
    #[arg(long = "federation", value_name = "FILE")]
    federation: Vec<PathBuf>,
    /// Roots for `https_web` bundle endpoints.
    #[arg(long, default_value = "/etc/ssl/certs/ca-certificates.crt", value_name = "FILE")]
    web_roots: PathBuf,
    /// With --kubeconfig: the audiences a service-account token must be for (repeatable;
    /// Istio's default). Tokens are reviewed with the API server of the cluster the caller
    /// names in `clusterid` metadata, or of the own cluster.
    #[arg(long = "token-audience", value_name = "AUDIENCE", default_values = [ca::token_review::ISTIO_CA_AUDIENCE])]
    token_audiences: Vec<String>,
    /// How long a token review may take before the caller is told to retry.
    #[arg(long, default_value = "5s", value_parser = sidecar::run::positive_duration)]
    token_review_timeout: std::time::Duration,
}

#[derive(Subcommand)]
enum CaCommand {
    /// Makes one shared root and an intermediate CA per cluster, each cluster's directory in
    /// Istio's `cacerts` layout (give it to that cluster's controller as --ca-dir). An
    /// existing root and existing clusters are kept.
    InitMesh {
        /// Where to write the root and one subdirectory per cluster.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
        /// Cluster names, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        clusters: Vec<String>,
    },
    /// Mints a lab bootstrap token proving IDENTITY to this CA (printed on stdout).
    Token {
        /// The CA's directory (its bootstrap key lives there).
        #[arg(long, value_name = "DIR")]
        ca_dir: PathBuf,
        /// The SPIFFE ID the token proves.
        #[arg(long)]
        identity: String,
        /// How long the token may be used.
        #[arg(long, default_value = "30d", value_parser = sidecar::run::positive_duration)]
        ttl: std::time::Duration,
    },
}

/// What `--ca-dir` brings up.
struct CaParts {
    service: ca::service::CertificateService,
    /// The secure port's certificate chain and key, PEM.
    serving: (String, String),
    root_pem: String,
}

/// The clusters read in Kubernetes mode.
struct KubeClients {
    /// Those given with `--kubeconfig`, the own cluster first.
    given: Vec<(ClusterId, kube::Client)>,
    /// Those and the remote secrets' clusters, as they come and go.
    current: ClusterClients,
}

/// The clusters whose API servers review service-account tokens, and the home cluster.
type ReviewClusters = Option<(ClusterId, ClusterClients)>;

/// The CA service and the TLS identity of the secure port, when `--ca-dir` is given.
fn certificate_authority(
    args: &CaArgs,
    metrics: &Metrics,
    clusters: ReviewClusters,
) -> anyhow::Result<Option<CaParts>> {
    let Some(dir) = &args.ca_dir else { return Ok(None) };
    let (authority, origin) = ca::Authority::load_or_create(dir, &args.trust_domain)?;
    tracing::info!(dir = %dir.display(), ?origin, "certificate authority loaded");
    metrics.root_expiry.set(
        authority
            .not_after()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64),
    );
    let root_pem = authority.trust_roots_pem();
    let signer = ca::Signer {
        authority,
        default_ttl: args.svid_ttl,
        max_ttl: args.max_svid_ttl,
    };
    let own = mesh_vocab::SpiffeId::workload(&args.trust_domain, "istio-system", "istiod")
        .context("--trust-domain is not a valid trust domain")?;
    let ips = [std::net::IpAddr::from([127, 0, 0, 1])];
    let (chain, key) = signer.serving_certificate(&own, &args.serving_names, &ips)?;
    let mut authenticator = ca::Authenticator::new(ca::bootstrap::BootstrapKey::load_or_create(dir)?);
    if let Some((home, clusters)) = clusters {
        tracing::info!(%home, audiences = ?args.token_audiences, "service-account tokens reviewed");
        authenticator = authenticator.with_token_review(ca::token_review::TokenReviewer::new(
            clusters,
            home,
            args.token_audiences.clone(),
            &args.trust_domain,
            args.token_review_timeout,
        ));
    }
    let service = ca::service::CertificateService::new(signer, authenticator, metrics.clone());
    Ok(Some(CaParts {
        service,
        serving: (chain, key),
        root_pem,
    }))
}

/// The bundles served to proxies: our root, and every federated trust domain's, kept
/// current by one poller each.
fn trust_bundles(
    args: &CaArgs,
    own_root: Option<String>,
    metrics: &Metrics,
) -> anyhow::Result<(BundleSender, tokio::sync::watch::Receiver<Arc<trust::BundleSet>>)> {
    let mut set = trust::BundleSet {
        own: args.trust_domain.clone(),
        ..Default::default()
    };
    if let Some(pem) = own_root {
        set.bundles.insert(args.trust_domain.clone(), pem);
    }
    let (tx, rx) = tokio::sync::watch::channel(Arc::new(set));
    let mut web_roots = rustls::RootCertStore::empty();
    if let Ok(pem) = std::fs::read(&args.web_roots) {
        use rustls_pki_types::pem::PemObject;
        web_roots.add_parsable_certificates(rustls_pki_types::CertificateDer::pem_slice_iter(&pem).flatten());
    }
    let web_roots = Arc::new(web_roots);
    let tx = Arc::new(tx);
    for file in &args.federation {
        for federated in trust::federation::load(file)? {
            anyhow::ensure!(
                federated.trust_domain != args.trust_domain,
                "{}: {} is our own trust domain; it is not federated with",
                file.display(),
                federated.trust_domain
            );
            tracing::info!(trust_domain = federated.trust_domain, url = %federated.url, "federating");
            tokio::spawn(trust::federation::follow(
                federated,
                tx.clone(),
                web_roots.clone(),
                metrics.clone(),
            ));
        }
    }
    // The caller keeps the sender for the process's life, also without federation: a
    // closed channel would read as "no more bundle updates" to every stream.
    Ok((tx, rx))
}

type BundleSender = Arc<tokio::sync::watch::Sender<Arc<trust::BundleSet>>>;

/// TLS for a server presenting the controller's serving certificate.
fn serving_tls((chain, key): &(String, String)) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    use rustls_pki_types::pem::PemObject;
    let certs = rustls_pki_types::CertificateDer::pem_slice_iter(chain.as_bytes()).collect::<Result<Vec<_>, _>>()?;
    let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes())?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    Ok(Arc::new(config))
}

fn parse_kubeconfig(s: &str) -> Result<(String, String), String> {
    let (a, b) = s.split_once('=').ok_or("expected CLUSTER=KUBECONFIG-FILE")?;
    if a.is_empty() || b.is_empty() {
        return Err("expected CLUSTER=KUBECONFIG-FILE".into());
    }
    Ok((a.to_owned(), b.to_owned()))
}

/// Starts a Kubernetes source per `--kubeconfig` (and per remote secret of
/// `remote_secrets_from`), all feeding one publisher. Returns the clusters' clients, the
/// own cluster (`remote_secrets_from`, else the first) first, and the current set with the
/// remote secrets' clusters.
async fn kube_sources(
    kubeconfigs: &[(String, String)],
    remote_secrets_from: Option<String>,
    metrics: &Metrics,
    mesh: MeshConfig,
    tx: tokio::sync::watch::Sender<Arc<Snapshot>>,
    inventory: Option<tokio::sync::watch::Sender<Arc<writeback::kube::Inventory>>>,
) -> anyhow::Result<KubeClients> {
    use kube::config::{KubeConfigOptions, Kubeconfig};
    let mut seen = std::collections::BTreeSet::new();
    let mut clients = Vec::new();
    let current = ClusterClients::default();
    let (updates_tx, updates) = tokio::sync::mpsc::channel(64);
    for (cluster, file) in kubeconfigs {
        anyhow::ensure!(
            seen.insert(cluster.clone()),
            "--kubeconfig {cluster}=…: cluster {cluster} given twice"
        );
        let kubeconfig = Kubeconfig::read_from(file).with_context(|| format!("--kubeconfig {cluster}={file}"))?;
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .with_context(|| format!("--kubeconfig {cluster}={file}"))?;
        let client = kube::Client::try_from(config).with_context(|| format!("--kubeconfig {cluster}={file}"))?;
        if remote_secrets_from.as_deref() == Some(cluster.as_str()) {
            let m = metrics.clone();
            let refused = move |r: &remote_secrets::Refusal| {
                tracing::warn!("remote secret refused: {r}");
                m.refusal(r.reason());
            };
            let own = ClusterId::new(cluster);
            tokio::spawn(remote_secrets::run(
                own,
                client.clone(),
                "istio-system".into(),
                updates_tx.clone(),
                current.clone(),
                refused,
            ));
        }
        clients.push((ClusterId::new(cluster), client.clone()));
        current.insert(ClusterId::new(cluster), client.clone());
        tokio::spawn(kube_source::run(ClusterId::new(cluster), client, updates_tx.clone()));
    }
    if let Some(c) = &remote_secrets_from {
        anyhow::ensure!(
            seen.contains(c),
            "--remote-secrets-from {c}: no --kubeconfig {c}=… given"
        );
    }
    let updates = match inventory {
        Some(inventory) => {
            let (forward, forwarded) = tokio::sync::mpsc::channel(64);
            tokio::spawn(writeback::kube::tee(updates, forward, inventory));
            forwarded
        }
        None => updates,
    };
    tokio::spawn(publisher::run(updates, mesh, Freshness::default(), tx));
    if let Some(own) = &remote_secrets_from {
        clients.sort_by_key(|(c, _)| c.as_str() != own);
    }
    Ok(KubeClients {
        given: clients,
        current,
    })
}

/// `IP` (port 53) or `IP:PORT` (`[IPv6]:PORT`).
fn parse_nameserver(s: &str) -> Result<std::net::SocketAddr, String> {
    match s.parse::<std::net::IpAddr>() {
        Ok(ip) => Ok(std::net::SocketAddr::new(ip, 53)),
        Err(_) => s
            .parse()
            .map_err(|_| format!("{s:?} is no IP or IP:PORT of a name server")),
    }
}

fn parse_pair(s: &str) -> Result<(String, String), String> {
    let (a, b) = s.split_once('=').ok_or("expected CLUSTER=NETWORK")?;
    if a.is_empty() || b.is_empty() {
        return Err("expected CLUSTER=NETWORK".into());
    }
    Ok((a.to_owned(), b.to_owned()))
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Serve {
            source,
            xds,
            monitoring,
            remote_secrets_from,
            sync_timeout,
            interval,
            push_budget_mib,
            ca,
            writeback: wb,
        } => {
            let push_budget = push_budget_mib as usize * (1 << 20);
            let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
            let mesh = MeshConfig {
                // The identities clusters verify their servers against.
                trust_domain: ca.trust_domain.clone(),
                ..source.mesh()
            };
            let expected = source.kubeconfigs.len();
            let first = match &source.manifests {
                Some(_) => source.snapshot(&mesh)?,
                // Clusters arrive as their sources sync; until then there is nothing to serve.
                None => Snapshot::new(1, std::time::Instant::now(), vec![], mesh.clone()),
            };
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            rt.block_on(async move {
                let (tx, upstream) = tokio::sync::watch::channel(Arc::new(first));
                let metrics = Metrics::new();
                // Gateways and endpoints known only by host name get their addresses on the way to xDS.
                let rx = match source.resolver() {
                    Ok(r) => resolve::spawn(upstream, r, metrics.clone()),
                    Err(e) => {
                        tracing::warn!(error = %e, "no DNS resolver: gateways and endpoints known only by host name are left out");
                        upstream
                    }
                };
                let wb_metrics = Arc::new(WritebackMetrics::new(&metrics));
                let domain = mesh.domain.clone();
                // Stopped, and the lease given up, when the process stops.
                let mut lease_holder = None;
                let clusters = match source.manifests.clone() {
                    Some(dir) => {
                        if let Some(out) = wb.writeback_dir.clone() {
                            let m = wb_metrics.clone();
                            tokio::spawn(writeback::dir::run(dir.clone(), out, domain, interval, m));
                        }
                        tokio::spawn(manifests::watch(dir, mesh, interval, tx));
                        None
                    }
                    None if wb.writeback => {
                        let (inv_tx, inv_rx) = tokio::sync::watch::channel(Arc::default());
                        let clients = kube_sources(
                            &source.kubeconfigs,
                            remote_secrets_from,
                            &metrics,
                            mesh,
                            tx,
                            Some(inv_tx),
                        )
                        .await?;
                        let identity = match wb.leader_identity.clone() {
                            Some(i) => i,
                            None => std::fs::read_to_string("/proc/sys/kernel/hostname")
                                .context("no --leader-identity and no host name")?
                                .trim()
                                .to_owned(),
                        };
                        anyhow::ensure!(
                            wb.lease_renew < wb.lease_duration,
                            "--lease-renew ({:?}) must be shorter than --lease-duration ({:?})",
                            wb.lease_renew,
                            wb.lease_duration
                        );
                        let lease = writeback::lease::Config {
                            duration: wb.lease_duration,
                            renew: wb.lease_renew,
                            ..writeback::lease::Config::new(identity)
                        };
                        let (leader_tx, leader_rx) = tokio::sync::watch::channel(false);
                        let own = clients.given[0].1.clone();
                        let elector = tokio::spawn(writeback::lease::run(own.clone(), lease.clone(), leader_tx));
                        let ready = writeback::kube::Readiness {
                            expected,
                            deadline: tokio::time::Instant::now() + sync_timeout,
                        };
                        let resync = std::time::Duration::from_secs(30);
                        let writer = tokio::spawn(writeback::kube::run(
                            clients.current.clone(),
                            inv_rx,
                            leader_rx,
                            domain,
                            ready,
                            resync,
                            wb_metrics,
                        ));
                        lease_holder = Some((elector, writer, own, lease));
                        Some(clients)
                    }
                    None => {
                        Some(kube_sources(&source.kubeconfigs, remote_secrets_from, &metrics, mesh, tx, None).await?)
                    }
                };
                let clusters: ReviewClusters = clusters.and_then(|c| Some((c.given.first()?.0.clone(), c.current)));
                let started = std::time::Instant::now();
                let synced = rx.clone();
                let debug = rx.clone();
                let listener = tokio::net::TcpListener::bind(xds)
                    .await
                    .with_context(|| format!("cannot listen on {xds}"))?;
                let monitor = tokio::net::TcpListener::bind(monitoring)
                    .await
                    .with_context(|| format!("cannot listen on {monitoring}"))?;
                let mut secure = String::new();
                let parts = certificate_authority(&ca, &metrics, clusters)?;
                let (_bundle_sender, bundles) =
                    trust_bundles(&ca, parts.as_ref().map(|p| p.root_pem.clone()), &metrics)?;
                if let (Some(addr), Some(p)) = (ca.bundle_endpoint, &parts) {
                    let listener = tokio::net::TcpListener::bind(addr)
                        .await
                        .with_context(|| format!("cannot listen on {addr}"))?;
                    secure.push_str(&format!(" bundle={}", listener.local_addr()?));
                    let tls = serving_tls(&p.serving)?;
                    let hint = ca.bundle_refresh_hint.as_secs().max(1);
                    tokio::spawn(trust::endpoint::serve(listener, tls, bundles.clone(), hint));
                }
                if let Some(CaParts {
                    service,
                    serving: (chain, key),
                    ..
                }) = parts
                {
                    let identity = tonic::transport::Identity::from_pem(chain, key);
                    let listener = tokio::net::TcpListener::bind(ca.secure)
                        .await
                        .with_context(|| format!("cannot listen on {}", ca.secure))?;
                    secure.push_str(&format!(" secure={}", listener.local_addr()?));
                    let ads = XdsServer::with_metrics(rx.clone(), metrics.clone())
                        .with_bundles(bundles.clone())
                        .with_push_budget(push_budget);
                    let server = tonic::transport::Server::builder()
                        .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))?
                        .add_service(AggregatedDiscoveryServiceServer::new(ads))
                        .add_service(service)
                        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
                    tokio::spawn(async move {
                        if let Err(e) = server.await {
                            tracing::error!(error = %e, "the secure port stopped");
                        }
                    });
                }
                // SIGTERM is how Kubernetes stops a pod; SIGINT how a person does. Taken
                // before saying ready: one that comes right after must stop us gracefully,
                // not meet the default action, which kills at once.
                use tokio::signal::unix::{SignalKind, signal};
                let signals = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()));
                println!(
                    "ready xds={} monitoring={}{secure}",
                    listener.local_addr()?,
                    monitor.local_addr()?
                );
                let m = metrics.clone();
                let handler: Handler = Arc::new(move |method: &Method, path: &str| match (method, path) {
                    (&Method::GET, "/metrics") => Reply {
                        status: StatusCode::OK,
                        content_type: "text/plain; version=0.0.4; charset=utf-8",
                        body: m.render().into(),
                    },
                    // Ready once every cluster has synced, or the bound has passed: one
                    // unreachable cluster must not keep the others from being served.
                    (&Method::GET, "/debug/clusterz") => {
                        let snap = debug.borrow().clone();
                        let clusters: Vec<serde_json::Value> = snap
                            .clusters
                            .iter()
                            .map(|(m, stale)| {
                                serde_json::json!({"cluster": m.cluster.as_str(), "stale": stale,
                                    "instances": m.instances.len(), "vips": m.vips.len(), "gateways": m.gateways.len()})
                            })
                            .collect();
                        let body = serde_json::json!({"version": snap.version, "clusters": clusters});
                        Reply::json(body.to_string())
                    }
                    (&Method::GET, "/ready")
                        if synced.borrow().clusters.len() >= expected || started.elapsed() > sync_timeout =>
                    {
                        Reply::text("ready\n")
                    }
                    (&Method::GET, "/ready") => {
                        Reply::status(StatusCode::SERVICE_UNAVAILABLE, "waiting for clusters to sync\n")
                    }
                    _ => Reply::status(StatusCode::NOT_FOUND, "not found\n"),
                });
                tokio::spawn(http_endpoint::serve(monitor, handler, std::future::pending()));
                let m = metrics.clone();
                let mut served = rx.clone();
                tokio::spawn(async move {
                    // Conflicts already logged: a conflict stays until someone fixes it,
                    // and every snapshot until then would repeat it.
                    let mut conflicts = Vec::new();
                    loop {
                        {
                            let snap = served.borrow_and_update().clone();
                            m.version.set(snap.version as i64);
                            let now = snap.vip_conflicts();
                            m.vip_conflicts.set(now.len() as i64);
                            for c in now.iter().filter(|c| !conflicts.contains(*c)) {
                                tracing::warn!("service address conflict: {c}");
                            }
                            conflicts = now;
                            let clusters: Vec<(String, bool)> = snap
                                .clusters
                                .iter()
                                .map(|(c, stale)| (c.cluster.to_string(), *stale))
                                .collect();
                            m.clusters(&clusters);
                        }
                        if served.changed().await.is_err() {
                            return;
                        }
                    }
                });
                let server = XdsServer::with_metrics(rx, metrics)
                    .with_bundles(bundles)
                    .with_push_budget(push_budget);
                let (stopping_tx, stopping) = tokio::sync::oneshot::channel::<()>();
                let serve = tonic::transport::Server::builder()
                    .add_service(AggregatedDiscoveryServiceServer::new(server))
                    .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), async {
                        match signals {
                            (Ok(mut term), Ok(mut int)) => {
                                tokio::select! {
                                    _ = term.recv() => {}
                                    _ = int.recv() => {}
                                }
                            }
                            _ => std::future::pending::<()>().await,
                        }
                        tracing::info!("stopping: no new xDS streams");
                        let _ = stopping_tx.send(());
                    });
                // ADS streams never end by themselves: after the signal, give them a
                // bounded moment (proxies keep their config and reconnect elsewhere).
                tokio::select! {
                    r = serve => r?,
                    _ = async {
                        let _ = stopping.await;
                        tokio::time::sleep(std::time::Duration::from_secs(5)).await;
                    } => tracing::info!("stopped with xDS streams still open"),
                }
                if let Some((elector, writer, client, lease)) = lease_holder {
                    elector.abort();
                    writer.abort();
                    match writeback::lease::release(client, &lease).await {
                        Ok(true) => tracing::info!(lease = lease.name, "lease released"),
                        Ok(false) => {}
                        Err(e) => tracing::warn!(error = %e, "cannot release the lease; it expires by itself"),
                    }
                }
                anyhow::Ok(())
            })?;
        }
        Command::Ca {
            command:
                CaCommand::InitMesh {
                    out,
                    trust_domain,
                    clusters,
                },
        } => {
            let made = ca::store::init_mesh(&out, &trust_domain, &clusters)?;
            println!("root: {}", out.join("root-cert.pem").display());
            for dir in made {
                println!("cluster CA: {}", dir.display());
            }
        }
        Command::Ca {
            command: CaCommand::Token { ca_dir, identity, ttl },
        } => {
            let id = mesh_vocab::SpiffeId::parse(&identity).with_context(|| format!("--identity {identity}"))?;
            anyhow::ensure!(
                ca_dir.join("ca-key.pem").exists(),
                "{}: no CA here (start `serve --ca-dir` on it first, or plug Istio's cacerts in)",
                ca_dir.display()
            );
            println!(
                "{}",
                ca::bootstrap::BootstrapKey::load_or_create(&ca_dir)?.mint(&id, ttl)
            );
        }
        Command::View { source, network, json } => {
            let snap = source.snapshot(&source.mesh())?;
            // Gateways and endpoints known only by host name, looked up once.
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let snap = rt.block_on(async {
                match source.resolver() {
                    Ok(r) => resolve::once(snap, &r).await,
                    Err(e) => {
                        tracing::warn!(error = %e, "no DNS resolver: gateways and endpoints known only by host name are left out");
                        snap
                    }
                }
            });
            let view = snap.view(&NetworkId::new(network));
            if json {
                let out: serde_json::Value = view
                    .iter()
                    .map(|(k, eps)| {
                        let eps: Vec<serde_json::Value> = eps
                            .iter()
                            .map(|e| {
                                serde_json::json!({
                                    "address": e.address.to_string(),
                                    "port": e.port,
                                    "weight": e.weight,
                                    "network": e.network.as_str(),
                                    "cluster": e.cluster.as_ref().map(|c| c.as_str()),
                                    "via_gateway": e.via_gateway,
                                    "pinned": e.pinned.map(|p| p.to_string()),
                                    "locality": format!("{}/{}/{}", e.locality.region, e.locality.zone, e.locality.subzone),
                                    "stale": e.stale,
                                })
                            })
                            .collect();
                        (k.to_string(), serde_json::Value::Array(eps))
                    })
                    .collect::<serde_json::Map<_, _>>()
                    .into();
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                println!(
                    "{:<48} {:<22} {:>6}  {:<10} {:<10} via",
                    "SERVICE", "ENDPOINT", "WEIGHT", "NETWORK", "CLUSTER"
                );
                for (k, eps) in &view {
                    for e in eps {
                        println!(
                            "{:<48} {:<22} {:>6}  {:<10} {:<10} {}",
                            k.to_string(),
                            format!("{}:{}", e.address, e.port),
                            e.weight,
                            e.network.as_str(),
                            e.cluster.as_ref().map_or("-", |c| c.as_str()),
                            match (e.via_gateway, e.pinned) {
                                (true, Some(pod)) => format!("gateway, pinned to {pod}"),
                                (true, None) => "gateway".to_owned(),
                                (false, _) => "direct".to_owned(),
                            }
                        );
                    }
                }
            }
        }
    }
    Ok(())
}
