//! The gateway's process settings, from the command line, checked once.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use mesh_vocab::{ClusterId, NetworkId};
use sidecar::splice;

/// Command line of `eastwest-gateway`.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "eastwest-gateway",
    version,
    about = "Isthmus east-west gateway: routes mTLS by Istio's cross-network SNI without terminating it",
    after_help = "Example:\n  eastwest-gateway --listen 127.0.0.1:15443 \\\n    --route outbound_.9080_._.reviews.default.svc.cluster.local=127.0.0.1:9443"
)]
pub struct Args {
    /// Where to accept mTLS connections.
    #[arg(long, default_value = "0.0.0.0:15443", value_name = "ADDR")]
    pub listen: SocketAddr,
    /// A static route, SNI=HOST:PORT; repeat it to add routes, or endpoints to one SNI.
    #[arg(long = "route", value_name = "SNI=HOST:PORT", value_parser = parse_route)]
    pub routes: Vec<StaticRoute>,
    /// A YAML routes file (services and endpoints), reloaded on change and on SIGHUP.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The federation controller's xDS address (HOST:PORT, plaintext ADS as on 15010):
    /// routes for every service, kept when the controller goes away.
    #[arg(long, value_name = "HOST:PORT")]
    pub xds: Option<String>,
    /// This gateway's network: it routes only to endpoints on it.
    #[arg(long, default_value = "network1", env = "ISTIO_META_NETWORK")]
    pub network: String,
    /// This gateway's cluster, the default `destination_cluster` of its endpoints.
    #[arg(long, default_value = "cluster1", env = "ISTIO_META_CLUSTER_ID")]
    pub cluster: String,
    /// Readiness endpoint (`/healthz/ready`).
    #[arg(long, default_value = "0.0.0.0:15021", value_name = "ADDR")]
    pub health: SocketAddr,
    /// Prometheus endpoint (`/stats/prometheus`).
    #[arg(long, default_value = "0.0.0.0:15090", value_name = "ADDR")]
    pub metrics: SocketAddr,
    /// Admin endpoint (`/config_dump`, `/clusters`); keep it on localhost.
    #[arg(long, default_value = "127.0.0.1:15000", value_name = "ADDR")]
    pub admin: SocketAddr,
    /// Data-plane threads [default: TOKIO_WORKER_THREADS, else the number of CPUs].
    #[arg(long)]
    pub workers: Option<usize>,
    /// Connections open at once; more are closed at accept and counted.
    #[arg(long, default_value_t = 50_000)]
    pub max_connections: usize,
    /// How long a client may take to send its whole ClientHello.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub handshake_timeout: Duration,
    /// The largest ClientHello accepted, in bytes (all its TLS records).
    #[arg(long, default_value_t = 32 * 1024)]
    pub max_hello_bytes: usize,
    /// Timeout of one connection attempt to an endpoint (a service may set its own).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub connect_timeout: Duration,
    /// Endpoints tried per connection before giving up.
    #[arg(long, default_value_t = 3)]
    pub connect_attempts: u32,
    /// Close a connection after this long without a byte either way.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,
    /// On SIGTERM, how long open connections may take to finish.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
    /// Comma-separated ALPN protocols to admit; `*` admits any (a hello without ALPN always passes).
    #[arg(long, default_value = "*", value_delimiter = ',')]
    pub alpn: Vec<String>,
    /// How bytes are moved: `copy` (through a user-space buffer; measured faster) or
    /// `splice` (zero-copy through a kernel pipe; less CPU per byte).
    #[arg(long, default_value = "copy", value_parser = parse_mode)]
    pub copy_mode: splice::Mode,
    /// Whether a worker out of work yields its CPU once (`sched_yield`) before it
    /// sleeps: `on` or `off`. See `sidecar::park` for why this saves CPU on a busy machine.
    #[arg(long, default_value = "on", value_parser = sidecar::park::switch, action = clap::ArgAction::Set)]
    pub yield_before_sleep: bool,
    /// How often the routes file is checked for changes; a change is loaded once it has
    /// held still for one interval, so a file caught half-written is never applied.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub reload_interval: Duration,
}

/// A `--route SNI=ADDR` pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticRoute {
    /// The server name, lowercased.
    pub sni: String,
    /// Where to send it.
    pub endpoint: SocketAddr,
}

fn parse_route(s: &str) -> Result<StaticRoute, String> {
    let (sni, addr) = s.split_once('=').ok_or("expected SNI=HOST:PORT")?;
    if sni.is_empty() || !sni.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!("{sni:?} is not a server name"));
    }
    // Resolved once, at start: static routes are for demos and benchmarks.
    let endpoint = addr
        .to_socket_addrs()
        .map_err(|e| format!("{addr:?} is not HOST:PORT: {e}"))?
        .next()
        .ok_or_else(|| format!("{addr:?} resolves to no address"))?;
    Ok(StaticRoute {
        sni: sni.to_ascii_lowercase(),
        endpoint,
    })
}

fn parse_mode(s: &str) -> Result<splice::Mode, String> {
    match s {
        "splice" => Ok(splice::Mode::Splice),
        "copy" => Ok(splice::Mode::Copy),
        _ => Err(format!("{s:?} is neither splice nor copy")),
    }
}

/// Which ALPN protocols a ClientHello may offer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AlpnPolicy {
    /// Any, or none.
    Any,
    /// At least one of these when the client sends ALPN at all.
    OneOf(Vec<Vec<u8>>),
}

impl AlpnPolicy {
    /// Istio's ALPN values, the ones its sidecars send through an east-west gateway.
    pub const ISTIO: [&'static str; 5] = [
        "istio",
        "istio-peer-exchange",
        "istio-http/1.0",
        "istio-http/1.1",
        "istio-h2",
    ];

    /// Whether a ClientHello offering `offered` is admitted.
    pub fn admits(&self, offered: &[Vec<u8>]) -> bool {
        match self {
            AlpnPolicy::Any => true,
            AlpnPolicy::OneOf(allowed) => offered.is_empty() || offered.iter().any(|p| allowed.contains(p)),
        }
    }
}

/// The checked settings the gateway runs with.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    pub health: SocketAddr,
    pub metrics: SocketAddr,
    pub admin: SocketAddr,
    pub routes_file: Option<PathBuf>,
    pub xds: Option<String>,
    pub static_routes: Vec<StaticRoute>,
    pub network: NetworkId,
    pub cluster: ClusterId,
    pub workers: usize,
    pub max_connections: usize,
    pub handshake_timeout: Duration,
    pub max_hello_bytes: usize,
    pub connect_timeout: Duration,
    pub connect_attempts: u32,
    pub idle_timeout: Duration,
    pub drain_timeout: Duration,
    pub alpn: AlpnPolicy,
    pub copy_mode: splice::Mode,
    /// `--yield-before-sleep on`.
    pub yield_before_sleep: bool,
    pub reload_interval: Duration,
}

impl Settings {
    /// Checks the command line; `env_workers` is `TOKIO_WORKER_THREADS` if set.
    pub fn from_args(a: Args, env_workers: Option<&str>) -> Result<Self, String> {
        let workers = match (a.workers, env_workers) {
            (Some(n), _) => n,
            (None, Some(s)) => s
                .parse()
                .map_err(|_| format!("TOKIO_WORKER_THREADS={s:?} is not a number"))?,
            (None, None) => std::thread::available_parallelism().map_or(1, |n| n.get()),
        };
        if workers == 0 || workers > 256 {
            return Err(format!("--workers {workers}: must be 1 to 256"));
        }
        if a.max_connections == 0 {
            return Err("--max-connections must be 1 or more".into());
        }
        if a.connect_attempts == 0 {
            return Err("--connect-attempts must be 1 or more".into());
        }
        if !(64..=1 << 20).contains(&a.max_hello_bytes) {
            return Err("--max-hello-bytes must be 64 to 1048576".into());
        }
        for (name, d) in [
            ("--handshake-timeout", a.handshake_timeout),
            ("--connect-timeout", a.connect_timeout),
            ("--idle-timeout", a.idle_timeout),
            ("--reload-interval", a.reload_interval),
        ] {
            if d.is_zero() {
                return Err(format!("{name} must be more than zero"));
            }
        }
        if a.routes.is_empty() && a.config.is_none() && a.xds.is_none() {
            return Err("nothing to route: give --route SNI=HOST:PORT, --config FILE or --xds HOST:PORT".into());
        }
        if let Some(x) = &a.xds
            && x.rsplit_once(':')
                .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
        {
            return Err(format!("--xds {x:?}: expected HOST:PORT"));
        }
        let alpn = if a.alpn.iter().any(|p| p == "*") {
            AlpnPolicy::Any
        } else {
            AlpnPolicy::OneOf(
                a.alpn
                    .iter()
                    .filter(|p| !p.is_empty())
                    .map(|p| p.as_bytes().to_vec())
                    .collect(),
            )
        };
        Ok(Settings {
            listen: a.listen,
            health: a.health,
            metrics: a.metrics,
            admin: a.admin,
            routes_file: a.config,
            xds: a.xds,
            static_routes: a.routes,
            network: NetworkId::new(a.network),
            cluster: ClusterId::new(a.cluster),
            workers,
            max_connections: a.max_connections,
            handshake_timeout: a.handshake_timeout,
            max_hello_bytes: a.max_hello_bytes,
            connect_timeout: a.connect_timeout,
            connect_attempts: a.connect_attempts,
            idle_timeout: a.idle_timeout,
            drain_timeout: a.drain_timeout,
            alpn,
            copy_mode: a.copy_mode,
            yield_before_sleep: a.yield_before_sleep,
            reload_interval: a.reload_interval,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(args: &[&str]) -> Result<Settings, String> {
        let a = Args::try_parse_from(std::iter::once("eastwest-gateway").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        Settings::from_args(a, None)
    }

    #[test]
    fn static_routes_and_defaults() {
        let s = settings(&[
            "--route",
            "Outbound_.80_._.a.b=127.0.0.1:9",
            "--route",
            "x=127.0.0.1:10",
        ])
        .unwrap();
        assert_eq!(s.listen.port(), 15443);
        assert_eq!(s.static_routes[0].sni, "outbound_.80_._.a.b");
        assert_eq!(s.static_routes[1].endpoint, "127.0.0.1:10".parse().unwrap());
        assert_eq!(s.alpn, AlpnPolicy::Any);
        assert!(s.yield_before_sleep);
        let off = settings(&["--route", "a=127.0.0.1:1", "--yield-before-sleep", "off"]).unwrap();
        assert!(!off.yield_before_sleep);
        assert!(settings(&["--route", "a=127.0.0.1:1", "--yield-before-sleep", "maybe"]).is_err());
    }

    #[test]
    fn bad_flags_say_what_is_wrong() {
        assert!(settings(&[]).unwrap_err().contains("nothing to route"));
        assert!(
            settings(&["--route", "novalue"])
                .unwrap_err()
                .contains("expected SNI=HOST:PORT")
        );
        assert!(
            settings(&["--route", "a=nohost"])
                .unwrap_err()
                .contains("is not HOST:PORT")
        );
        assert!(
            settings(&["--route", "a=127.0.0.1:1", "--workers", "0"])
                .unwrap_err()
                .contains("1 to 256")
        );
        assert!(
            settings(&["--route", "a=127.0.0.1:1", "--idle-timeout", "0s"])
                .unwrap_err()
                .contains("more than zero")
        );
        assert!(
            settings(&["--route", "a=127.0.0.1:1", "--copy-mode", "fast"])
                .unwrap_err()
                .contains("neither")
        );
    }

    #[test]
    fn alpn_allow_list() {
        let s = settings(&["--route", "a=127.0.0.1:1", "--alpn", "istio,istio-h2"]).unwrap();
        assert!(s.alpn.admits(&[b"istio-h2".to_vec()]));
        assert!(s.alpn.admits(&[]));
        assert!(!s.alpn.admits(&[b"http/1.1".to_vec()]));
    }
}
