//! One connection's life: read the ClientHello, find the route, connect to an
//! endpoint (trying others on failure), replay the hello and splice.
//!
//! Anything that is not a ClientHello for a name this gateway serves is closed at
//! once and counted under a reason label; the gateway never answers in TLS
//! because it holds no certificate of the workloads.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use sidecar::client_hello;
use sidecar::drain;
use sidecar::outlier::Verdict;
use sidecar::splice::{self, Observer};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use crate::metrics::{Metrics, TcpCounters};
use crate::routes::{Route, RouteTable, Sources};
use crate::settings::Settings;

/// State every connection reads; the routes table is swapped whole on reload.
pub struct Shared {
    /// The checked settings.
    pub settings: Settings,
    /// The current routes.
    pub routes: ArcSwap<RouteTable>,
    /// All metrics.
    pub metrics: Metrics,
    /// Tells accept loops to stop, and counts open connections for the drain.
    pub drain: drain::Watch,
    /// Connections open now, for `--max-connections`.
    open: AtomicUsize,
    /// The latest good routes of each source; the table is rebuilt from all of them.
    sources: Mutex<Sources>,
    /// Routes from the controller have arrived at least once.
    xds_synced: AtomicBool,
    /// The same, awaitable: the data port listens only from then on.
    xds_synced_tx: tokio::sync::watch::Sender<bool>,
}

impl Shared {
    /// Shared state with routes built from `sources`.
    pub fn new(settings: Settings, sources: Sources, metrics: Metrics, drain: drain::Watch) -> Self {
        let table = RouteTable::build(&settings, &sources, &metrics, None);
        Self {
            settings,
            routes: ArcSwap::from_pointee(table),
            metrics,
            drain,
            open: AtomicUsize::new(0),
            sources: Mutex::new(sources),
            xds_synced: AtomicBool::new(false),
            xds_synced_tx: tokio::sync::watch::Sender::new(false),
        }
    }

    /// Whether routes from the controller have arrived at least once (they are
    /// kept when the controller goes away, so this never turns back).
    pub fn xds_synced(&self) -> bool {
        self.xds_synced.load(Ordering::Acquire)
    }

    /// Records that routes from the controller have arrived.
    pub fn mark_xds_synced(&self) {
        self.xds_synced.store(true, Ordering::Release);
        self.xds_synced_tx.send_replace(true);
    }

    /// Returns once routes from the controller have arrived.
    pub async fn xds_synced_wait(&self) {
        let mut rx = self.xds_synced_tx.subscribe();
        let _ = rx.wait_for(|synced| *synced).await;
    }

    /// Changes one source and swaps in the table rebuilt from all of them;
    /// returns how many routes it has. Open connections keep their old route.
    pub fn update_sources(&self, change: impl FnOnce(&mut Sources)) -> usize {
        let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        change(&mut sources);
        let old = self.routes.load();
        let table = RouteTable::build(&self.settings, &sources, &self.metrics, Some(&old));
        let n = table.len();
        self.routes.store(Arc::new(table));
        n
    }
}

/// Accepts connections until the drain starts.
pub async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let accepted = tokio::select! {
            biased;
            () = shared.drain.signaled() => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, _)) => {
                let Some(slot) = Slot::take(&shared) else {
                    shared.metrics.reject("max_connections");
                    continue; // dropping the stream closes it
                };
                tokio::spawn(handle(stream, shared.clone(), slot));
            }
            Err(e) => {
                // Out of file descriptors or memory: back off a little rather than
                // spin on an accept that keeps failing.
                tracing::warn!(error = %e, "accept failed");
                shared.metrics.reject("accept_error");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// One of `--max-connections` places, and the drain's count of this connection.
struct Slot {
    shared: Arc<Shared>,
    _tracked: drain::Tracked,
}

impl Slot {
    fn take(shared: &Arc<Shared>) -> Option<Slot> {
        let before = shared.open.fetch_add(1, Ordering::AcqRel);
        if before >= shared.settings.max_connections {
            shared.open.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        shared.metrics.open_connections.inc();
        Some(Slot {
            shared: shared.clone(),
            _tracked: shared.drain.track(),
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.shared.open.fetch_sub(1, Ordering::AcqRel);
        self.shared.metrics.open_connections.dec();
    }
}

async fn handle(mut down: TcpStream, shared: Arc<Shared>, _slot: Slot) {
    if let Err(reason) = proxy(&mut down, &shared).await {
        // Counted before the connection closes: whoever sees it closed and then reads the
        // metrics finds it there.
        shared.metrics.reject(reason);
    }
    drop(down);
}

/// Carries one connection; `Err` is the reason it was closed before reaching an endpoint.
async fn proxy(down: &mut TcpStream, shared: &Shared) -> Result<(), &'static str> {
    // TCP_NODELAY is already on: accepted sockets inherit it from the listener.
    let settings = &shared.settings;
    let mut buf = Vec::with_capacity(4096.min(settings.max_hello_bytes));
    let hello = tokio::time::timeout(
        settings.handshake_timeout,
        client_hello::read(down, &mut buf, settings.max_hello_bytes),
    )
    .await
    .map_err(|_| "handshake_timeout")?
    .map_err(|e| match e {
        client_hello::ReadError::Closed => "client_closed",
        client_hello::ReadError::Io(_) => "downstream_error",
        client_hello::ReadError::Hello(e) => e.reason(),
    })?;
    let sni = hello.server_name.as_deref().ok_or("no_sni")?;
    let (pinned, sni) = mesh_vocab::sni::unpin(sni);
    let route = shared.routes.load().get(sni).cloned().ok_or_else(|| {
        tracing::debug!(sni, "unknown SNI");
        "unknown_sni"
    })?;
    if !settings.alpn.admits(&hello.alpn) {
        return Err("alpn_not_allowed");
    }

    route.active.inc();
    let _active = scopeguard(|| route.active.dec());
    let (mut up, i) = connect(&route, pinned, shared).await?;
    let endpoint = &route.endpoints[i];
    let _counted = route.balancer.open(i);
    let counters = &endpoint.counters;
    counters.opened.inc();

    // The hello and anything the client sent after it go first, as they came.
    let result = match up.write_all(&buf).await {
        Ok(()) => {
            counters.received.inc_by(buf.len() as u64);
            drop(buf);
            splice::bidirectional(
                down,
                &mut up,
                settings.copy_mode,
                settings.idle_timeout,
                &Counting(counters),
            )
            .await
            .map(|_| ())
        }
        Err(e) => Err(splice::SpliceError::Upstream(e)),
    };
    match result {
        Ok(()) => counters.closed.inc(),
        Err(e) => {
            tracing::debug!(sni, endpoint = %endpoint.addr, error = %e, "connection ended");
            let flags = match &e {
                splice::SpliceError::Idle(_) => "SI",
                splice::SpliceError::Downstream(_) => "DC",
                splice::SpliceError::Upstream(_) => "UC",
                splice::SpliceError::Pipe(_) => "UO",
            };
            counters.closed_with_flags(&shared.metrics, flags).inc();
        }
    }
    Ok(())
}

/// Connects to an endpoint of `route`, trying up to `--connect-attempts` different
/// healthy ones, and feeds each outcome to outlier detection. A caller that pinned one
/// endpoint gets that one or nothing: it balances and ejects by endpoint itself, so trying
/// another for it would hide the failure from the one who decides.
async fn connect(
    route: &Route,
    pinned: Option<SocketAddr>,
    shared: &Shared,
) -> Result<(TcpStream, usize), &'static str> {
    let attempts = match pinned {
        Some(_) => 1,
        None => shared.settings.connect_attempts as usize,
    };
    let mut tried: Vec<usize> = Vec::new();
    while tried.len() < attempts {
        let next = match pinned {
            Some(addr) => Some(
                route
                    .endpoints
                    .iter()
                    .position(|e| e.addr == addr)
                    .ok_or("unknown_endpoint")?,
            ),
            None => route
                .balancer
                .pick(|i| route.outlier.is_available(i) && !tried.contains(&i)),
        };
        let Some(i) = next else {
            break;
        };
        tried.push(i);
        let endpoint = &route.endpoints[i];
        let reason = match tokio::time::timeout(route.connect_timeout, dial(endpoint.addr)).await {
            Ok(Ok(up)) => {
                route.outlier.record_success(i);
                return Ok((up, i));
            }
            Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => "refused",
            Ok(Err(_)) => "error",
            Err(_) => "timeout",
        };
        let addr = endpoint.addr.to_string();
        tracing::debug!(sni = route.sni, endpoint = addr, reason, "connect failed");
        shared.metrics.connect_failure(&route.service, &addr, reason);
        if let Verdict::Ejected(time) = route.outlier.record_failure(i) {
            tracing::warn!(service = route.service, endpoint = addr, ?time, "endpoint ejected");
            shared.metrics.ejection(&route.service, &addr);
        }
    }
    Err(if tried.is_empty() {
        "no_healthy_upstream"
    } else {
        "upstream_connect_failed"
    })
}

/// Opens a connection to an endpoint the way HAProxy's `tcp-smart-connect` does.
///
/// In pingpong (delayed-ACK) mode from before the SYN, the kernel holds back the bare
/// ACK that completes the handshake and sends it with the ClientHello written next:
/// a segment less per connection, and the endpoint accepts a socket whose first bytes
/// are already there instead of waking once for the ACK and again for the hello. The
/// kernel leaves that mode when the handshake completes, so the rest of the connection
/// acknowledges as usual.
async fn dial(addr: SocketAddr) -> io::Result<TcpStream> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_nodelay(true)?;
    socket2::SockRef::from(&socket).set_tcp_quickack(false)?;
    socket.connect(addr).await
}

/// Keeps the Istio byte counters current while bytes flow.
struct Counting<'a>(&'a TcpCounters);

impl Observer for Counting<'_> {
    fn to_upstream(&self, n: u64) {
        self.0.received.inc_by(n);
    }
    fn to_downstream(&self, n: u64) {
        self.0.sent.inc_by(n);
    }
}

/// Runs `f` when dropped, whichever way the scope is left.
fn scopeguard(f: impl FnOnce()) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}
