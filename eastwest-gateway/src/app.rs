//! Wires the gateway together and owns its threads.
//!
//! Data-plane work runs on `workers` threads, each a single-threaded runtime
//! accepting on its own `SO_REUSEPORT` socket of the data port: no work stealing, no
//! cross-thread wake-ups on the data path. Admin, metrics, readiness and reloads
//! run on a separate control thread, so they never add latency to traffic.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;

use sidecar::drain;
use sidecar::http_endpoint;
use sidecar::socket::{listen, raise_fd_limit, start_listening};
use tokio::sync::{Notify, watch};

use crate::admin;
use crate::config;
use crate::metrics::Metrics;
use crate::proxy::{self, Shared};
use crate::reload::{self, Status};
use crate::routes::Sources;
use crate::settings::Settings;
use crate::xds;

/// The addresses the gateway actually bound (they differ from the settings when a port was 0).
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    pub listen: SocketAddr,
    pub health: SocketAddr,
    pub metrics: SocketAddr,
    pub admin: SocketAddr,
}

/// The data port's sockets, one per worker, each bound to `addr` with `SO_REUSEPORT`
/// (and listening unless `listening` is false; see [`start_listening`]).
///
/// The kernel spreads new connections over the sockets, so each one wakes only the
/// worker that owns it; one socket shared by every worker wakes them all, and all but
/// one find nothing to accept. HAProxy's per-thread listeners and nginx's `reuseport`
/// do the same. TCP_NODELAY is set here because accepted sockets inherit it: one
/// setsockopt per connection less than setting it on each.
fn data_sockets(addr: SocketAddr, workers: usize, listening: bool) -> io::Result<Vec<std::net::TcpListener>> {
    use socket2::{Domain, Socket, Type};
    let mut sockets: Vec<std::net::TcpListener> = Vec::with_capacity(workers);
    for _ in 0..workers {
        // After the first, the port is the one it got (it differs from `addr`'s when that is 0).
        let at = sockets.first().map_or(Ok(addr), |s| s.local_addr())?;
        let socket = Socket::new(Domain::for_address(at), Type::STREAM, None)?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.set_nonblocking(true)?;
        socket.set_tcp_nodelay(true)?;
        socket
            .bind(&at.into())
            .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {at}: {e}")))?;
        let socket: std::net::TcpListener = socket.into();
        if listening {
            start_listening(&socket)?;
        }
        sockets.push(socket);
    }
    Ok(sockets)
}

/// A running gateway.
pub struct Gateway {
    /// Where it listens.
    pub bound: Bound,
    shared: Arc<Shared>,
    trigger: drain::Trigger,
    /// Set once the drain is over: threads stop, cutting what is still open.
    stop: watch::Sender<bool>,
    kick: Arc<Notify>,
    threads: Vec<JoinHandle<()>>,
}

impl Gateway {
    /// Loads the routes, binds every port and starts serving.
    pub fn start(settings: Settings) -> anyhow::Result<Gateway> {
        raise_fd_limit();
        let metrics = Metrics::new();
        let status = Arc::new(Status::default());
        let file = match &settings.routes_file {
            Some(path) => Some(config::load(path)?),
            None => None,
        };
        metrics.reload(true);

        // With routes from the controller, the data port is bound now but listens only once
        // the first routes arrive: until then a connection would be closed unrouted, and a
        // refused connect sends the client to another gateway straight away.
        let data = data_sockets(settings.listen, settings.workers, settings.xds.is_none())?;
        let health = listen(settings.health)?;
        let metrics_l = listen(settings.metrics)?;
        let admin_l = listen(settings.admin)?;
        let bound = Bound {
            listen: data[0].local_addr()?,
            health: health.local_addr()?,
            metrics: metrics_l.local_addr()?,
            admin: admin_l.local_addr()?,
        };

        let (trigger, watch) = drain::channel();
        let shared = Arc::new(Shared::new(settings, Sources { file, xds: Vec::new() }, metrics, watch));
        tracing::info!(routes = shared.routes.load().len(), "routes loaded");
        let kick = Arc::new(Notify::new());
        let (stop, stop_rx) = watch::channel(false);
        let stopped = move || {
            let mut rx = stop_rx.clone();
            async move {
                let _ = rx.wait_for(|s| *s).await;
            }
        };
        let mut threads = Vec::new();

        for (n, listener) in data.into_iter().enumerate() {
            let shared = shared.clone();
            let stopped = stopped();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("gw-worker-{n}"))
                    .spawn(move || {
                        let mut rt = tokio::runtime::Builder::new_current_thread();
                        rt.enable_all();
                        // See `sidecar::park` for why yielding saves CPU on a busy machine.
                        sidecar::park::yield_before_sleep(&mut rt, shared.settings.yield_before_sleep);
                        let rt = rt.build().expect("runtime");
                        rt.block_on(async move {
                            if shared.settings.xds.is_some() {
                                tokio::select! {
                                    () = shared.xds_synced_wait() => {}
                                    () = shared.drain.signaled() => return,
                                }
                                start_listening(&listener).expect("listen on a bound socket");
                            }
                            let listener = tokio::net::TcpListener::from_std(listener).expect("register listener");
                            proxy::accept_loop(listener, shared).await;
                            // Open connections on this thread go on until the drain is over.
                            stopped.await;
                        });
                    })?,
            );
        }

        let control = {
            let shared = shared.clone();
            let kick = kick.clone();
            let stopped = stopped.clone();
            std::thread::Builder::new().name("gw-control".into()).spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(async move {
                    // These keep answering during the drain: readiness says 503 then.
                    let serve = |l: std::net::TcpListener, h| {
                        let l = tokio::net::TcpListener::from_std(l).expect("register listener");
                        tokio::spawn(http_endpoint::serve(l, h, stopped()))
                    };
                    let servers = [
                        serve(health, admin::health(shared.clone())),
                        serve(metrics_l, admin::metrics(shared.clone())),
                        serve(admin_l, admin::admin(shared.clone(), status.clone())),
                    ];
                    if let Some(addr) = shared.settings.xds.clone() {
                        tokio::spawn(xds::follow(shared.clone(), addr));
                    }
                    reload::watch(shared.clone(), status, kick).await;
                    for s in servers {
                        let _ = s.await;
                    }
                });
            })?
        };
        threads.push(control);
        Ok(Gateway {
            bound,
            shared,
            trigger,
            stop,
            kick,
            threads,
        })
    }

    /// Re-reads the routes file now (what SIGHUP does).
    pub fn reload(&self) {
        self.kick.notify_one();
    }

    /// Connections open now.
    pub fn open_connections(&self) -> usize {
        self.shared.drain.open()
    }

    /// Stops accepting, waits up to the drain timeout for open connections, then
    /// stops every thread. Returns how many connections were still open.
    pub async fn drain(self) -> usize {
        let timeout = self.shared.settings.drain_timeout;
        let left = self.trigger.drain(timeout).await;
        let _ = self.stop.send(true);
        let threads = self.threads;
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await;
        left
    }
}
