//! `sidecar run`: one workload's proxy with explicit addresses and files — what a lab
//! process, a benchmark or a VM without iptables capture uses.
//!
//! Data-plane work runs on `workers` single-threaded runtimes sharing each listening
//! socket; metrics are served from a separate control thread.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;
use arc_swap::ArcSwap;
use mesh_vocab::spiffe::SpiffeId;
use rustls_pki_types::ServerName;

use crate::access_log::{AccessLog, Filter as AccessLogFilter, Format as AccessLogFormat};
use crate::destinations::Destinations;
use crate::drain;
use crate::http_endpoint::{self, Reply};
use crate::inbound::{self, Inbound, Protocol};
use crate::outbound::{self, Captured, HttpHop, Outbound};
use crate::peer_authentication::{MtlsMode, Policy, parse_port_override};
use crate::pool::{self, Key};
use crate::socket::{listen, raise_fd_limit};
use crate::telemetry::Telemetry;
use crate::tls::bundle::Bundle;
use crate::tls::csr::{CaClient, CsrError};
use crate::tls::{Alpn, ExpectedPeer, Svid, SvidSlot, TrustBundles};
use crate::virtual_inbound::InboundPolicy;
use envoy_types::pb::envoy::config::core::v3::Locality;

/// `LISTEN=TARGET`: an address pair.
#[derive(Debug, Clone, Copy)]
pub struct Hop {
    pub listen: SocketAddr,
    pub target: SocketAddr,
}

fn parse_hop(s: &str) -> Result<Hop, String> {
    let (l, t) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected LISTEN=TARGET, e.g. 127.0.0.1:15001=10.0.0.7:15006"))?;
    let listen = l.parse().map_err(|_| format!("{l:?} is not an address:port"))?;
    let target = t.parse().map_err(|_| format!("{t:?} is not an address:port"))?;
    Ok(Hop { listen, target })
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("{s:?}: expected KEY=VALUE"))?;
    if k.is_empty() {
        return Err(format!("{s:?}: the label has no key"));
    }
    Ok((k.to_owned(), v.to_owned()))
}

fn parse_locality(s: &str) -> Result<Locality, String> {
    let mut parts = s.split('/');
    let mut next = || parts.next().unwrap_or_default().to_owned();
    let locality = Locality {
        region: next(),
        zone: next(),
        sub_zone: next(),
    };
    if locality.region.is_empty() || s.split('/').count() > 3 {
        return Err(format!("{s:?}: expected REGION[/ZONE[/SUBZONE]]"));
    }
    Ok(locality)
}

fn parse_bundle(s: &str) -> Result<(String, PathBuf), String> {
    let (td, path) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected TRUST_DOMAIN=FILE"))?;
    Ok((td.to_owned(), PathBuf::from(path)))
}

/// Command-line arguments of `sidecar run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The workload's certificate chain (PEM, leaf first): its X.509 SVID.
    #[arg(
        long,
        value_name = "FILE",
        required_unless_present = "ca_address",
        conflicts_with = "ca_address",
        requires = "key"
    )]
    pub cert: Option<PathBuf>,
    /// The SVID's private key (PEM).
    #[arg(long, value_name = "FILE", requires = "cert")]
    pub key: Option<PathBuf>,
    /// Get the SVID from the mesh CA instead (e.g. https://127.0.0.1:15012), renewed at half-life.
    #[arg(long, value_name = "URL", requires_all = ["token_file", "identity"])]
    pub ca_address: Option<String>,
    /// The name on the CA's serving certificate.
    #[arg(long, default_value = "istiod.istio-system.svc")]
    pub ca_server_name: String,
    /// File holding the credential that proves our identity to the CA.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// The SPIFFE ID to ask the CA for.
    #[arg(long, value_name = "SPIFFE_ID")]
    pub identity: Option<String>,
    /// Keep trust bundles (our own and federated trust domains') from the controller's SDS,
    /// e.g. https://127.0.0.1:15012 (its certificate is checked against --ca).
    #[arg(long, value_name = "URL")]
    pub bundles_from: Option<String>,
    /// SVID lifetime to ask the CA for (default: the CA's).
    #[arg(long, value_parser = positive_duration)]
    pub svid_ttl: Option<Duration>,
    /// The bundle of our own trust domain (PEM roots).
    #[arg(long, value_name = "FILE")]
    pub ca: PathBuf,
    /// A federated trust domain's bundle; peers of that domain are checked against it only.
    #[arg(long = "bundle", value_name = "TD=FILE", value_parser = parse_bundle)]
    pub bundles: Vec<(String, PathBuf)>,
    /// Istio's `trustDomainAliases` (repeatable): peers whose SPIFFE IDs are in this trust
    /// domain are taken as ours, checked against our own bundle.
    #[arg(long = "trust-domain-alias", value_name = "TD")]
    pub trust_domain_aliases: Vec<String>,
    /// Outbound: accept the application's plaintext on LISTEN, carry it in mTLS to TARGET.
    #[arg(long, value_name = "LISTEN=TARGET", value_parser = parse_hop)]
    pub outbound: Option<Hop>,
    /// SNI for the outbound hop: Istio's `outbound_.PORT_.SUBSET_.HOST`.
    #[arg(long, requires = "outbound")]
    pub sni: Option<String>,
    /// SPIFFE ID the outbound upstream must prove (repeatable; default: any trusted ID).
    #[arg(long = "peer-id", value_name = "SPIFFE_ID", requires = "outbound")]
    pub peer_ids: Vec<String>,
    /// Inbound: accept callers on LISTEN, hand their bytes to the application at TARGET.
    #[arg(long, value_name = "LISTEN=TARGET", value_parser = parse_hop)]
    pub inbound: Option<Hop>,
    /// PeerAuthentication mode of the inbound side. Without a controller's policy it is the
    /// mode (STRICT when not given); with one, STRICT here keeps the port STRICT whatever the
    /// mesh's PeerAuthentication says (a workload may demand more than the mesh, never less),
    /// and the other modes defer to it.
    #[arg(long, value_name = "STRICT|PERMISSIVE|DISABLE")]
    pub mtls: Option<MtlsMode>,
    /// A port-level override of the mode (the application's port, as `portLevelMtls`).
    #[arg(long = "port-mtls", value_name = "PORT=MODE", value_parser = parse_port_override)]
    pub port_mtls: Vec<(u16, MtlsMode)>,
    /// The application protocol. `tcp`: bytes, one mTLS connection per client connection.
    /// `http`: the application's requests, carried between sidecars on pooled connections
    /// in mTLS (multiplexed HTTP/2, or keep-alive HTTP/1.1: see `--h2-upgrade`), with the
    /// caller's identity in `x-forwarded-client-cert`. `http2` (or `grpc`): as `http`, and
    /// the application behind `--inbound` takes only HTTP/2 (in cleartext, prior
    /// knowledge), as Istio has it for a port of that name; with a controller, its inbound
    /// clusters say this per port.
    #[arg(long, default_value = "tcp", value_parser = ["tcp", "http", "http2", "grpc"])]
    pub protocol: String,
    /// The mesh-wide `h2UpgradePolicy`: `on` (UPGRADE) carries HTTP/1.1 requests, too, on
    /// multiplexed HTTP/2 between sidecars; `off` keeps them HTTP/1.1 (Istio's default),
    /// a kept-alive connection per request in flight. A cluster's own HttpProtocolOptions
    /// (a DestinationRule's `h2UpgradePolicy`) win, and through an east-west gateway it is
    /// HTTP/2 whatever this says. On by default: side by side in the mesh-hop benchmark
    /// HTTP/1.1 took a fifth more CPU per request at full load (68 vs 53 µs over both
    /// sides) for no more requests/s, though a third fewer user-space instructions
    /// (callgrind); the kernel's cost per write decides, and HTTP/2 writes many requests
    /// at once (bench-results/sidecar/sidecar-pair-20261201-230703).
    #[arg(long, default_value = "on", value_parser = crate::park::switch, action = clap::ArgAction::Set)]
    pub h2_upgrade: bool,
    /// The service name used in metrics and in the default SNI.
    #[arg(long, default_value = "reviews.default.svc.cluster.local")]
    pub service: String,
    /// Serve Prometheus metrics (`/stats/prometheus`) here, e.g. 127.0.0.1:15090.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<SocketAddr>,
    /// Write an access log line per HTTP request here (`-`: stdout); off by default.
    #[arg(long, value_name = "PATH|-")]
    pub access_log: Option<PathBuf>,
    /// The access log's format: Envoy's default text, or JSON with Istio's keys.
    #[arg(long, value_enum, default_value = "text", requires = "access_log")]
    pub access_log_format: AccessLogFormat,
    /// Which requests are logged: all, or errors (status ≥ 400, a response flag, or marked
    /// by an AUDIT policy).
    #[arg(long, value_enum, default_value = "all", requires = "access_log")]
    pub access_log_filter: AccessLogFilter,
    /// Export a span per HTTP request and hop over OTLP/HTTP (JSON) to this collector, e.g.
    /// http://127.0.0.1:4318 (spans are POSTed to /v1/traces). Like the controller's, this
    /// connection carries no mark: under capture, leave the collector out of it
    /// (`sidecar init --exclude-outbound-ports 4318`, or its CIDR).
    #[arg(long, value_name = "URL")]
    pub otlp: Option<String>,
    /// Benchmarks only: carry `--outbound`'s HTTP through a synthetic mesh of ROUTES
    /// services with ENDPOINTS endpoints in all (routes, clusters and endpoints compiled as
    /// the controller's are, the benchmarked `--service` last), and check every `--inbound`
    /// request against an ALLOW policy of ROUTES rules, all but the last of which miss.
    #[arg(long, value_name = "ROUTES:ENDPOINTS", value_parser = crate::synthetic::parse_size)]
    pub synthetic_mesh: Option<crate::synthetic::Size>,
    /// Data-plane threads.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub workers: u16,
    /// Whether a data-plane thread out of work yields its CPU once (`sched_yield`) before
    /// it sleeps: `on` or `off` (see `sidecar::park`). Off by default: in the mesh-hop
    /// benchmark it bought 8 % more requests/s at full load and 5 % less CPU per request,
    /// but cost a quarter more CPU at 1,000 req/s and a higher p99 there (A/B run in
    /// bench-results/sidecar/sidecar-pair-yield-ab-*), and a sidecar spends its life at
    /// moderate load, where latency is what its callers see.
    #[arg(long, default_value = "off", value_parser = crate::park::switch, action = clap::ArgAction::Set)]
    pub yield_before_sleep: bool,
    /// Bound on connecting to the upstream or the application.
    #[arg(long, default_value = "5s", value_parser = positive_duration)]
    pub connect_timeout: Duration,
    /// Bound on a TLS handshake (and on a STRICT caller's first byte).
    #[arg(long, default_value = "10s", value_parser = positive_duration)]
    pub handshake_timeout: Duration,
    /// PERMISSIVE: how long to wait for a caller's first byte before treating it as plaintext.
    #[arg(long, default_value = "5s", value_parser = positive_duration)]
    pub sniff_timeout: Duration,
    /// HTTP: a pooled upstream or application connection idle this long is closed.
    #[arg(long, default_value = "60s", value_parser = positive_duration)]
    pub idle_timeout: Duration,
    /// How long open connections may go on after SIGTERM.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
    /// Transparent capture: take the connections `sidecar init` redirects (outbound on
    /// --outbound-port, inbound on --inbound-port) and route them by original destination.
    #[arg(long, conflicts_with_all = ["outbound", "inbound"], requires = "xds")]
    pub capture: bool,
    /// The controller's plaintext xDS (e.g. http://10.241.0.10:15010): listeners, clusters and
    /// endpoints for captured traffic, kept when the controller goes away.
    #[arg(long, value_name = "URL")]
    pub xds: Option<String>,
    /// Our network, as the controller's per-network view needs it.
    #[arg(long, env = "ISTIO_META_NETWORK", default_value = "")]
    pub network: String,
    /// Our cluster.
    #[arg(long, env = "ISTIO_META_CLUSTER_ID", default_value = "Kubernetes")]
    pub cluster: String,
    /// One of the workload's labels (repeatable), sent as Istio's `LABELS` node metadata:
    /// the controller selects the AuthorizationPolicies and PeerAuthentications that apply.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// Our locality, `REGION/ZONE/SUBZONE` (zone and subzone optional), as `Node.locality`.
    #[arg(long, value_name = "REGION/ZONE/SUBZONE", value_parser = parse_locality)]
    pub locality: Option<Locality>,
    /// Our pod's IP, for the xDS node ID.
    #[arg(long, env = "INSTANCE_IP", default_value = "127.0.0.1")]
    pub pod_ip: std::net::IpAddr,
    /// Where captured outbound connections arrive.
    #[arg(long, default_value_t = 15001)]
    pub outbound_port: u16,
    /// Where captured inbound connections arrive.
    #[arg(long, default_value_t = 15006)]
    pub inbound_port: u16,
    /// The mark our own sockets carry so the capture rules let them through.
    #[arg(long, default_value_t = 1337)]
    pub mark: u32,
}

impl RunArgs {
    /// Parses `run`'s arguments from words (as a test or an embedding program has them).
    pub fn from_words<'a>(words: impl IntoIterator<Item = &'a str>) -> Result<Self, clap::Error> {
        #[derive(clap::Parser)]
        struct Run {
            #[command(flatten)]
            args: RunArgs,
        }
        <Run as clap::Parser>::try_parse_from(std::iter::once("sidecar").chain(words)).map(|r| r.args)
    }
}

/// Where a running sidecar listens.
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    pub outbound: Option<SocketAddr>,
    pub inbound: Option<SocketAddr>,
    pub metrics: Option<SocketAddr>,
}

/// A running sidecar.
pub struct Sidecar {
    pub bound: Bound,
    pub svid: Arc<SvidSlot>,
    pub bundles: Arc<TrustBundles>,
    trigger: drain::Trigger,
    drain_timeout: Duration,
    threads: Vec<JoinHandle<()>>,
    /// Flushed once the drain is over (its lines are buffered).
    access_log: Option<Arc<AccessLog>>,
}

impl Sidecar {
    /// Loads the SVID and bundles, binds every listener and starts serving.
    pub fn start(args: RunArgs) -> anyhow::Result<Sidecar> {
        if args.outbound.is_none() && args.inbound.is_none() && !args.capture {
            anyhow::bail!(
                "nothing to do: give --capture, or --outbound LISTEN=TARGET, --inbound LISTEN=TARGET, or both"
            );
        }
        raise_fd_limit();
        let (svid, ca_client) = match (&args.cert, &args.key, &args.ca_address) {
            (Some(cert), Some(key), _) => (Svid::from_files(cert, key)?, None),
            (_, _, Some(address)) => {
                let client = ca_client(&args, address)?;
                (first_svid(&client)?, Some((client, std::time::SystemTime::now())))
            }
            _ => anyhow::bail!("give --cert and --key, or --ca-address with --token-file and --identity"),
        };
        let self_id = svid.id().clone();
        let bundles = TrustBundles::new();
        let own = std::fs::read(&args.ca).with_context(|| format!("cannot read {}", args.ca.display()))?;
        bundles.set(self_id.trust_domain(), Bundle::from_pem(self_id.trust_domain(), &own)?);
        for alias in &args.trust_domain_aliases {
            SpiffeId::parse(&format!("spiffe://{alias}")).with_context(|| format!("--trust-domain-alias {alias}"))?;
            bundles.alias(alias, self_id.trust_domain());
        }
        for (td, path) in &args.bundles {
            let pem = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
            bundles.set(td, Bundle::from_pem(td, &pem)?);
        }
        let telemetry = Telemetry::for_cluster(&args.cluster);
        telemetry.svid_expiry.set(svid.expiry_unix() as i64);
        let svid = SvidSlot::new(svid);
        let (trigger, watch) = drain::channel();
        let protocol = if args.protocol == "tcp" {
            Protocol::Tcp
        } else {
            Protocol::Http
        };
        let app_http = crate::app_http::AppHttp::uniform(matches!(args.protocol.as_str(), "http2" | "grpc"));
        let app_http = Arc::new(ArcSwap::from_pointee(app_http));

        let workers = Workers {
            count: args.workers,
            yield_before_sleep: args.yield_before_sleep,
        };
        let mut threads = Vec::new();
        let mut bound = Bound {
            outbound: None,
            inbound: None,
            metrics: None,
        };
        // Fixed `--outbound` HTTP's HTTP/2 (the HTTP/1.1 hop's is `Alpn::Http11`); TCP
        // keeps its own ALPN.
        let alpn = if protocol == Protocol::Http {
            Alpn::H2
        } else {
            Alpn::Tcp
        };
        let access_log = match &args.access_log {
            Some(path) => Some(Arc::new(
                AccessLog::open(path, args.access_log_format, args.access_log_filter)
                    .with_context(|| format!("--access-log {}", path.display()))?,
            )),
            None => None,
        };
        let (otlp, otlp_sending) = match &args.otlp {
            Some(url) => {
                let (exporter, sending) =
                    crate::otlp::Exporter::new(url, &args.service).with_context(|| format!("--otlp {url}"))?;
                (Some(exporter), Some(sending))
            }
            None => (None, None),
        };
        let make_hop = |mark| {
            let settings = pool::Settings {
                connect_timeout: args.connect_timeout,
                handshake_timeout: args.handshake_timeout,
                idle_timeout: args.idle_timeout,
                mark,
            };
            let mut hop = HttpHop::new(
                settings,
                svid.clone(),
                self_id.clone(),
                telemetry.clone(),
                watch.clone(),
            );
            hop.access_log = access_log.clone();
            hop.otlp = otlp.clone();
            hop.h2_upgrade = args.h2_upgrade;
            hop.network = Some(args.network.clone());
            Arc::new(hop)
        };
        let http_hop = |mark| (protocol == Protocol::Http).then(|| make_hop(mark));
        if let Some(hop) = args.outbound {
            let identities: Vec<SpiffeId> = args
                .peer_ids
                .iter()
                .map(|s| SpiffeId::parse(s).with_context(|| format!("--peer-id {s}")))
                .collect::<Result<_, _>>()?;
            let expected = if identities.is_empty() {
                ExpectedPeer::Any
            } else {
                ExpectedPeer::OneOf(identities.clone())
            };
            let sni = args
                .sni
                .clone()
                .unwrap_or_else(|| format!("outbound_.{}_._.{}", hop.target.port(), args.service));
            let sni = ServerName::try_from(sni.clone()).with_context(|| format!("--sni {sni:?} is not a DNS name"))?;
            let outbound = Arc::new(Outbound {
                upstream: Key {
                    addr: hop.target,
                    sni,
                    identities,
                    trust: 0,
                    lane: 0,
                },
                service: args.service.clone(),
                tls: crate::tls::client_config(svid.clone(), bundles.clone(), expected.clone(), alpn),
                http1_tls: crate::tls::client_config(svid.clone(), bundles.clone(), expected, Alpn::Http11),
                self_id: self_id.clone(),
                connect_timeout: args.connect_timeout,
                handshake_timeout: args.handshake_timeout,
                telemetry: telemetry.clone(),
                drain: watch.clone(),
                http: http_hop(None),
            });
            let listener = listen(hop.listen)?;
            bound.outbound = Some(listener.local_addr()?);
            match args.synthetic_mesh {
                Some(size) => {
                    let table = crate::synthetic::outbound(
                        size,
                        &args.service,
                        hop.target,
                        outbound.upstream.sni.to_str().as_ref(),
                        &args.peer_ids,
                    )?;
                    let captured = Arc::new(Captured::new(
                        Arc::new(ArcSwap::from_pointee(table)),
                        svid.clone(),
                        bundles.clone(),
                        alpn,
                        None,
                        hop.listen,
                        self_id.clone(),
                        args.connect_timeout,
                        args.handshake_timeout,
                        telemetry.clone(),
                        watch.clone(),
                        make_hop(None),
                        true,
                    ));
                    spawn_workers("outbound", workers, listener, &mut threads, move |l| {
                        outbound::serve_as_captured_to(l, captured.clone(), crate::synthetic::VIP)
                    })?;
                }
                None => spawn_workers("outbound", workers, listener, &mut threads, move |l| {
                    outbound::serve(l, outbound.clone())
                })?,
            }
        }
        let table = Arc::new(ArcSwap::from_pointee(Destinations::default()));
        if args.capture {
            let addr = SocketAddr::from(([0, 0, 0, 0], args.outbound_port));
            let captured = Arc::new(Captured::new(
                table.clone(),
                svid.clone(),
                bundles.clone(),
                alpn,
                Some(args.mark),
                addr,
                self_id.clone(),
                args.connect_timeout,
                args.handshake_timeout,
                telemetry.clone(),
                watch.clone(),
                // HTTP listeners need it whatever the protocol flag says.
                make_hop(Some(args.mark)),
                protocol == Protocol::Http,
            ));
            let listener = listen(addr)?;
            bound.outbound = Some(listener.local_addr()?);
            spawn_workers("outbound", workers, listener, &mut threads, move |l| {
                outbound::serve_captured(l, captured.clone())
            })?;
        }
        // The flags' PeerAuthentication until (unless) the controller serves `virtualInbound`.
        let mut flags_policy = Policy::uniform(args.mtls.unwrap_or(MtlsMode::Strict));
        flags_policy.ports.extend(args.port_mtls.iter().copied());
        let strict_floor = (args.mtls.is_some() || !args.port_mtls.is_empty()).then(|| flags_policy.clone());
        let inbound_policy = match args.synthetic_mesh {
            Some(size) => crate::synthetic::inbound(size, self_id.trust_domain())?,
            None => InboundPolicy::from_peer_authentication(&flags_policy),
        };
        let inbound_policy = Arc::new(ArcSwap::from_pointee(inbound_policy));
        let inbound_hop = match (args.inbound, args.capture) {
            (Some(hop), _) => Some((hop, false)),
            (None, true) => Some((
                Hop {
                    listen: SocketAddr::from(([0, 0, 0, 0], args.inbound_port)),
                    // The port is each connection's original destination port.
                    target: SocketAddr::from(([127, 0, 0, 1], 0)),
                },
                true,
            )),
            (None, false) => None,
        };
        if let Some((hop, captured)) = inbound_hop {
            let inbound = Arc::new(Inbound {
                app: hop.target,
                captured,
                protocol,
                policy: inbound_policy.clone(),
                app_http: app_http.clone(),
                strict_floor,
                tls: crate::tls::server_config(svid.clone(), bundles.clone()),
                self_id: self_id.clone(),
                service: args.service.clone(),
                sniff_timeout: args.sniff_timeout,
                handshake_timeout: args.handshake_timeout,
                connect_timeout: args.connect_timeout,
                telemetry: telemetry.clone(),
                drain: watch.clone(),
                access_log: access_log.clone(),
                otlp: otlp.clone(),
                app_pool: pool::Plaintext::new(pool::Settings {
                    connect_timeout: args.connect_timeout,
                    handshake_timeout: args.connect_timeout,
                    idle_timeout: args.idle_timeout,
                    // To the application: never captured, so never marked.
                    mark: None,
                }),
            });
            let listener = listen(hop.listen)?;
            bound.inbound = Some(listener.local_addr()?);
            spawn_workers("inbound", workers, listener, &mut threads, move |l| {
                inbound::serve(l, inbound.clone())
            })?;
        }
        let xds = args.xds.clone().map(|address| {
            let identity = crate::xds::Identity {
                id: self_id.clone(),
                ip: args.pod_ip,
                network: args.network.clone(),
                cluster: args.cluster.clone(),
                labels: args.labels.clone(),
                locality: args.locality.clone(),
            };
            let inbound = crate::xds::InboundSlots {
                policy: inbound_policy.clone(),
                app: app_http.clone(),
            };
            (address, identity, table.clone(), inbound)
        });
        let metrics_listener = match args.metrics {
            Some(addr) => {
                let listener = listen(addr)?;
                bound.metrics = Some(listener.local_addr()?);
                Some(listener)
            }
            None => None,
        };
        let bundle_source = match &args.bundles_from {
            Some(address) => Some(crate::tls::sds::BundleSource {
                address: address.clone(),
                server_name: args.ca_server_name.clone(),
                roots_pem: std::fs::read(&args.ca).with_context(|| format!("cannot read {}", args.ca.display()))?,
                node: node(&self_id),
                keep: vec![self_id.trust_domain().to_owned()],
            }),
            None => None,
        };
        // The exporters' queue ends when the data plane's exporters are gone.
        drop(otlp);
        if metrics_listener.is_some()
            || ca_client.is_some()
            || bundle_source.is_some()
            || xds.is_some()
            || otlp_sending.is_some()
        {
            let trusted = bundles.clone();
            let telemetry = telemetry.clone();
            let watch = watch.clone();
            let slot = svid.clone();
            threads.push(
                std::thread::Builder::new()
                    .name("sidecar-control".into())
                    .spawn(move || {
                        let rt = tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()
                            .expect("runtime");
                        rt.block_on(async move {
                            if let Some((address, identity, table, inbound)) = xds {
                                let t = telemetry.clone();
                                let inbound = Some(inbound);
                                tokio::spawn(crate::xds::follow(
                                    address,
                                    identity,
                                    table,
                                    inbound,
                                    move |routes, ok| {
                                        t.xds_routes.set(routes as i64);
                                        if !ok {
                                            t.xds_rejects.inc();
                                        }
                                    },
                                ));
                            }
                            if let Some(sending) = otlp_sending {
                                tokio::spawn(sending.run());
                            }
                            if let Some(source) = bundle_source {
                                let t = telemetry.clone();
                                tokio::spawn(crate::tls::sds::follow(source, trusted, move |_| {
                                    t.bundle_updates.inc();
                                }));
                            }
                            if let Some((client, fetched_at)) = ca_client {
                                let t = telemetry.clone();
                                tokio::spawn(client.keep_fresh(slot, Some(fetched_at), move |svid| {
                                    t.svid_expiry.set(svid.expiry_unix() as i64);
                                    t.svid_renewals.inc();
                                }));
                            }
                            match metrics_listener {
                                Some(listener) => {
                                    let listener =
                                        tokio::net::TcpListener::from_std(listener).expect("register listener");
                                    let handler: http_endpoint::Handler = Arc::new(move |_, path| match path {
                                        "/stats/prometheus" | "/metrics" => Reply::text(telemetry.render()),
                                        _ => Reply::status(hyper::StatusCode::NOT_FOUND, "not found\n"),
                                    });
                                    http_endpoint::serve(listener, handler, async move { watch.signaled().await })
                                        .await;
                                }
                                None => watch.signaled().await,
                            }
                        });
                    })?,
            );
        }
        // Everything is built and serving: what building it used goes back to the system.
        crate::heap::release_free_memory();
        Ok(Sidecar {
            bound,
            svid,
            bundles,
            trigger,
            drain_timeout: args.drain_timeout,
            threads,
            access_log,
        })
    }

    /// Stops accepting, lets open connections finish up to the drain timeout, and returns
    /// how many were cut.
    pub async fn drain(self) -> usize {
        let left = self.trigger.drain(self.drain_timeout).await;
        if let Some(log) = &self.access_log {
            log.flush();
        }
        // Worker threads end once their accept loops return and their connections end or
        // the process exits; a stuck connection must not hold the exit.
        drop(self.threads);
        left
    }
}

/// Our xDS node, in Istio's form for a sidecar.
fn node(id: &SpiffeId) -> envoy_types::pb::envoy::config::core::v3::Node {
    let (ns, sa) = id.namespace_and_service_account().unwrap_or(("default", "default"));
    envoy_types::pb::envoy::config::core::v3::Node {
        id: format!("sidecar~127.0.0.1~{sa}.{ns}~{ns}.svc.cluster.local"),
        cluster: format!("{sa}.{ns}"),
        ..Default::default()
    }
}

fn ca_client(args: &RunArgs, address: &str) -> anyhow::Result<CaClient> {
    let token_file = args.token_file.as_ref().context("--ca-address needs --token-file")?;
    let identity = args.identity.as_ref().context("--ca-address needs --identity")?;
    Ok(CaClient {
        address: address.to_owned(),
        server_name: args.ca_server_name.clone(),
        roots_pem: std::fs::read(&args.ca).with_context(|| format!("cannot read {}", args.ca.display()))?,
        token: std::fs::read_to_string(token_file).with_context(|| format!("cannot read {}", token_file.display()))?,
        identity: SpiffeId::parse(identity).with_context(|| format!("--identity {identity}"))?,
        ttl: args.svid_ttl,
        cluster: Some(args.cluster.clone()),
    })
}

/// The first SVID, before any listener opens: a sidecar without one could only refuse.
/// The CA may still be starting, so unreachable is retried for a while; a refusal is final.
fn first_svid(client: &CaClient) -> anyhow::Result<Svid> {
    // On a thread of its own: `start` may be called from inside a runtime (tests, the lab).
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                rt.block_on(async {
                    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
                    loop {
                        match client.fetch().await {
                            Ok(svid) => return Ok(svid),
                            Err(e @ CsrError::Connect { .. }) if tokio::time::Instant::now() < deadline => {
                                tracing::info!(error = %e, "waiting for the CA");
                                tokio::time::sleep(Duration::from_millis(250)).await;
                            }
                            Err(e) => return Err(anyhow::Error::new(e).context("cannot get an SVID")),
                        }
                    }
                })
            })
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the SVID fetch panicked")))
    })
}

/// A duration flag that must be more than zero (a timeout, a period, a lifetime): zero
/// would fail every connection, or spin. Shared by every binary's command line.
pub fn positive_duration(s: &str) -> Result<Duration, String> {
    match humantime::parse_duration(s).map_err(|e| e.to_string())? {
        d if d.is_zero() => Err("must be more than zero".into()),
        d => Ok(d),
    }
}

/// How the data plane's threads run.
#[derive(Debug, Clone, Copy)]
struct Workers {
    count: u16,
    yield_before_sleep: bool,
}

fn spawn_workers<F, Fut>(
    side: &str,
    workers: Workers,
    listener: std::net::TcpListener,
    threads: &mut Vec<JoinHandle<()>>,
    serve: F,
) -> anyhow::Result<()>
where
    F: Fn(tokio::net::TcpListener) -> Fut + Send + Clone + 'static,
    Fut: Future<Output = ()>,
{
    for n in 0..workers.count {
        let listener = listener.try_clone()?;
        let serve = serve.clone();
        threads.push(std::thread::Builder::new().name(format!("{side}-{n}")).spawn(move || {
            let mut rt = tokio::runtime::Builder::new_current_thread();
            crate::park::yield_before_sleep(rt.enable_all(), workers.yield_before_sleep);
            let rt = rt.build().expect("runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("register listener");
                serve(listener).await;
                // Connections spawned on this runtime keep going until the process ends.
                std::future::pending::<()>().await;
            });
        })?);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_zero_timeout_or_lifetime_is_refused_with_the_flag_named() {
        for flag in [
            "--connect-timeout",
            "--handshake-timeout",
            "--sniff-timeout",
            "--idle-timeout",
            "--svid-ttl",
        ] {
            let line = format!("--inbound 127.0.0.1:0=127.0.0.1:1 --cert c --key k --ca a {flag} 0s");
            let err = RunArgs::from_words(line.split_whitespace()).err().unwrap().to_string();
            assert!(
                err.contains(&format!("'0s' for '{flag}")) && err.contains("more than zero"),
                "{err}"
            );
            let line = format!("--inbound 127.0.0.1:0=127.0.0.1:1 --cert c --key k --ca a {flag} 250ms");
            let parsed = RunArgs::from_words(line.split_whitespace());
            assert!(parsed.is_ok(), "{flag}: {:?}", parsed.err());
        }
        // Stopping at once on SIGTERM is a choice, not a mistake.
        assert!(
            RunArgs::from_words(
                "--inbound 127.0.0.1:0=127.0.0.1:1 --cert c --key k --ca a --drain-timeout 0s".split_whitespace()
            )
            .is_ok()
        );
    }
}
