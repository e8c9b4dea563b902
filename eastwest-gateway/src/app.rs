//! Wires the gateway together and owns its threads.
//!
//! Data-plane work runs on `workers` threads, each a single-threaded runtime
//! accepting on its own handle of the one listening socket: no work stealing, no
//! cross-thread wake-ups on the data path. Admin, metrics, readiness and reloads
//! run on a separate control thread, so they never add latency to traffic.

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;

use sidecar::drain;
use sidecar::http_endpoint;
use sidecar::socket::{bind, listen, raise_fd_limit, start_listening};
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
        let data = if settings.xds.is_some() {
            bind(settings.listen)?
        } else {
            listen(settings.listen)?
        };
        // Accepted sockets inherit TCP_NODELAY from the listener: one setsockopt per
        // connection less than setting it on each.
        socket2::SockRef::from(&data).set_tcp_nodelay(true)?;
        let health = listen(settings.health)?;
        let metrics_l = listen(settings.metrics)?;
        let admin_l = listen(settings.admin)?;
        let bound = Bound {
            listen: data.local_addr()?,
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

        for n in 0..shared.settings.workers {
            let listener = data.try_clone()?;
            let shared = shared.clone();
            let stopped = stopped();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("gw-worker-{n}"))
                    .spawn(move || {
                        let rt = tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()
                            .expect("runtime");
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
        drop(data);

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
