//! Pooled upstream connections: what makes a new client connection cost nothing upstream.
//!
//! - [`H1Pool`]: between sidecars, keep-alive HTTP/1.1 inside mutual TLS, one exchange
//!   per connection at a time — Istio's default hop for an HTTP/1.1 application, ours
//!   under `h2UpgradePolicy: DO_NOT_UPGRADE`.
//! - [`H2Pool`]: between sidecars, one HTTP/2 connection inside mutual TLS per
//!   [`Key`] — endpoint address, SNI and the identities the server may prove — shared by
//!   every client connection and multiplexing their requests (Linkerd's design; Istio's
//!   under `h2UpgradePolicy: UPGRADE`, our default). The SNI is
//!   part of the key because an east-west gateway routes by it and splices the whole
//!   connection to one pod: two SNIs to the same gateway address are two destinations.
//! - [`Plaintext`]: keep-alive HTTP/1.1 pools per address, for the application behind
//!   the inbound side and for endpoints outside the mesh, and HTTP/2 ones for the requests
//!   only HTTP/2 carries (gRPC).
//!
//! A connection that fails, is closed by its peer, or answers GOAWAY leaves the pool as its
//! task ends; the next request makes a new one. Idle connections close after a timeout.
//! Concurrency on one connection is bounded by the server's `SETTINGS_MAX_CONCURRENT_STREAMS`,
//! which h2 honours by queueing streams beyond it.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use mesh_vocab::spiffe::SpiffeId;
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::body::Outgoing;
use crate::capture;
use crate::coalesce::Coalesced;
use crate::first_read::FirstRead;
use crate::tls::{self, Svid, SvidSlot};

pub mod http1;
pub use http1::{ConnectionLimit, H1Pool};

/// What one pooled connection is for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    pub addr: SocketAddr,
    pub sni: ServerName<'static>,
    /// The identities the server may prove; empty means any trusted identity.
    pub identities: Vec<SpiffeId>,
    /// What else vouches for the server: 0 for the mesh's bundles, else the fingerprint of
    /// the TLS a cluster originates ([`crate::tls::origination::Origination::fingerprint`]),
    /// so that a connection made under one rule's CA never serves another's.
    pub trust: u64,
    /// Which of the endpoint's connections: an endpoint standing for several pods (an
    /// east-west gateway, weighted by the pods behind it) gets one per pod (see
    /// [`lanes_for`]), because the gateway balances per connection, not per request.
    pub lane: u32,
}

impl Key {
    /// The key of a cleartext connection to `addr`: its SNI, never sent, is the address.
    pub fn cleartext(addr: SocketAddr) -> Key {
        Key {
            addr,
            sni: ServerName::IpAddress(addr.ip().into()),
            identities: Vec::new(),
            trust: 0,
            lane: 0,
        }
    }
}

/// The most connections kept to one endpoint that stands for several pods.
pub const MAX_LANES: u32 = 16;

/// How many connections to keep to an endpoint of `weight` (the pods it stands for).
pub fn lanes_for(weight: u32) -> u32 {
    weight.clamp(1, MAX_LANES)
}

/// Requests one connection through a gateway carries before a fresh one takes its place:
/// the gateway balances per connection, so without this a pooled connection would pin a
/// caller to whichever pod its connection landed on, for as long as it lives.
pub const REQUESTS_PER_GATEWAY_CONNECTION: u64 = 32;

/// Why no connection to an upstream could be had. Each is a reason label of
/// `isthmus_sidecar_upstream_failures_total`, and none of them wrote a byte of the request,
/// so the request may go to another endpoint.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ConnectError {
    #[error("connect to {0} failed: {1}")]
    Connect(SocketAddr, String),
    #[error("connect to {0} timed out")]
    ConnectTimeout(SocketAddr),
    #[error("TLS with {addr} refused: {message}")]
    Tls {
        addr: SocketAddr,
        reason: &'static str,
        message: String,
    },
    #[error("TLS handshake with {0} timed out")]
    HandshakeTimeout(SocketAddr),
    #[error("HTTP/2 handshake with {0} failed: {1}")]
    Http2(SocketAddr, String),
}

impl ConnectError {
    /// The metric reason label.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Connect(..) => "connect_failure",
            Self::ConnectTimeout(_) => "connect_timeout",
            Self::Tls { reason, .. } => reason,
            Self::HandshakeTimeout(_) => "handshake_timeout",
            Self::Http2(..) => "http2_handshake",
        }
    }
}

/// A request that got no response headers.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection: nothing was sent, and the request is handed back.
    #[error("{0}")]
    Connect(ConnectError, Box<Request<Outgoing>>),
    /// The cluster's `max_connections` were open and none came free within the connect
    /// timeout (HTTP/1.1): nothing was sent, and the request is handed back.
    #[error("no connection of the cluster came free in time")]
    Overflow(Box<Request<Outgoing>>),
    /// The request went out, then the stream or the connection failed before headers.
    #[error("upstream reset before headers: {0}")]
    Reset(hyper::Error),
}

impl SendError {
    /// The upstream refused the stream (HTTP/2 `REFUSED_STREAM`): it promises that it did
    /// not act on the request, so even a non-idempotent one may be sent again.
    pub fn refused_stream(&self) -> bool {
        let Self::Reset(e) = self else { return false };
        // h2's error is only reachable as text: h2 is hyper's dependency, not ours.
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
        while let Some(s) = source {
            if s.to_string().contains("refused stream before processing") {
                return true;
            }
            source = s.source();
        }
        false
    }
}

/// An answer from upstream, with what the caller needs to report it.
pub struct Sent {
    pub response: Response<Incoming>,
    /// The SPIFFE ID the upstream proved on this connection.
    pub peer: Arc<str>,
    /// Keeps the connection counted as busy; hold it until the body is done.
    pub lease: Lease,
}

/// Bounds of the pool.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub connect_timeout: Duration,
    pub handshake_timeout: Duration,
    /// A connection without a request for this long is closed.
    pub idle_timeout: Duration,
    /// The mark on our own sockets (see [`capture::Rules`]).
    pub mark: Option<u32>,
}

/// HTTP/2-in-mTLS connections to upstream sidecars (or gateways), one per [`Key`].
pub struct H2Pool {
    settings: Settings,
    /// Our SVID, to retire connections made with an older one.
    svid: Option<Arc<SvidSlot>>,
    /// Connections open now, for the operator (and tests) to see.
    open: prometheus::IntGauge,
    /// Looked up twice a request: foldhash rather than SipHash over the key's strings.
    slots: Mutex<HashMap<Key, Arc<Slot>, foldhash::fast::RandomState>>,
    ids: AtomicU64,
    me: Weak<H2Pool>,
}

#[derive(Default)]
struct Slot {
    /// Connection attempts made so far; lets requests that queued behind a failed attempt
    /// share its failure instead of each waiting out its own timeout.
    attempts: AtomicU64,
    /// Holds a connection now (a hint readable without waiting on `state`).
    ready: AtomicBool,
    state: tokio::sync::Mutex<SlotState>,
}

#[derive(Default)]
struct SlotState {
    conn: Option<Conn>,
    failed: Option<ConnectError>,
}

#[derive(Clone)]
struct Conn {
    id: u64,
    sender: http2::SendRequest<Outgoing>,
    peer: Arc<str>,
    busy: Arc<Busy>,
    /// The SVID current when it was made: once ours rotates, new requests go on a new
    /// connection that presents the new one.
    svid: Option<Arc<Svid>>,
    /// Requests it has been given.
    sent: Arc<AtomicU64>,
}

/// How busy one connection is, for the idle timeout.
struct Busy {
    in_flight: AtomicUsize,
    idle_since: Mutex<Instant>,
}

impl Busy {
    fn new() -> Arc<Busy> {
        Arc::new(Busy {
            in_flight: AtomicUsize::new(0),
            idle_since: Mutex::new(Instant::now()),
        })
    }

    fn idle_for(&self) -> Option<Duration> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        Some(self.idle_since.lock().expect("idle clock poisoned").elapsed())
    }
}

/// One request's claim on a connection; the connection counts as busy until it drops.
pub struct Lease {
    busy: Arc<Busy>,
    /// An HTTP/1.1 connection, which carries one exchange at a time: it goes back to its
    /// pool when this one is over.
    back: Option<Box<http1::Back>>,
}

impl Lease {
    fn on(busy: &Arc<Busy>) -> Lease {
        busy.in_flight.fetch_add(1, Ordering::AcqRel);
        Lease {
            busy: busy.clone(),
            back: None,
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        *self.busy.idle_since.lock().expect("idle clock poisoned") = Instant::now();
        self.busy.in_flight.fetch_sub(1, Ordering::AcqRel);
        if let Some(back) = self.back.take() {
            back.give();
        }
    }
}

/// A connection's first request (its `nth`, counted from 0) carries its ids indexed, so the
/// requests after it name them from the HPACK table: see [`crate::trace::index_id_names`].
fn first_indexes_ids(req: &mut Request<Outgoing>, nth: u64) {
    if nth == 0 {
        crate::trace::index_id_names(req.headers_mut());
    }
}

/// Pings on an HTTP/2 connection with requests in flight, so a peer that vanished without
/// a FIN (a partition, a dead host) is noticed.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

impl H2Pool {
    /// An empty pool.
    pub fn new(settings: Settings, svid: Option<Arc<SvidSlot>>, open: prometheus::IntGauge) -> Arc<H2Pool> {
        Arc::new_cyclic(|me| H2Pool {
            settings,
            svid,
            open,
            slots: Mutex::new(HashMap::default()),
            ids: AtomicU64::new(0),
            me: me.clone(),
        })
    }

    /// Sends `req` on the pooled connection for `key`, making it with `tls` if needed.
    ///
    /// Retry rule: hyper hands a request back only when it never reached the connection —
    /// the connection was found closed, or failed or GOAWAY'd while the request still
    /// waited in its queue. Not one byte of it was written, so it is sent again, whatever
    /// its method, once, on a fresh connection. A request that was taken for writing is
    /// never resent (its body is gone, and the upstream may have acted on it): its failure
    /// is [`SendError::Reset`].
    ///
    /// `max_requests` retires a connection after that many requests (new requests then go
    /// on a fresh one; those in flight finish where they are). `pending` (the request's
    /// place among those waiting for a connection, see [`H2Pool::ready`]) is given back
    /// once the request has its connection.
    pub async fn send<P>(
        &self,
        key: &Key,
        tls: &Arc<ClientConfig>,
        req: Request<Outgoing>,
        max_requests: Option<u64>,
        pending: P,
    ) -> Result<Sent, SendError> {
        self.send_on(key, Some(tls), req, max_requests, pending).await
    }

    /// Sends `req` to `addr` in cleartext HTTP/2 (prior knowledge), on the pooled
    /// connection for that address; its URI's authority is its `:authority`. For servers
    /// outside the mesh that take only HTTP/2 (see [`Plaintext`]).
    pub async fn send_cleartext(&self, addr: SocketAddr, req: Request<Outgoing>) -> Result<Sent, SendError> {
        self.send_on(&Key::cleartext(addr), None, req, None, ()).await
    }

    /// [`Self::send`], in mutual TLS with `tls`, or in cleartext without.
    async fn send_on<P>(
        &self,
        key: &Key,
        tls: Option<&Arc<ClientConfig>>,
        req: Request<Outgoing>,
        max_requests: Option<u64>,
        pending: P,
    ) -> Result<Sent, SendError> {
        let mut req = req;
        *req.version_mut() = hyper::Version::HTTP_2;
        let checked_out = self.checkout(key, tls, None, max_requests).await;
        drop(pending);
        let (conn, nth) = match checked_out {
            Ok(conn) => conn,
            Err(e) => return Err(SendError::Connect(e, Box::new(req))),
        };
        first_indexes_ids(&mut req, nth);
        let lease = Lease::on(&conn.busy);
        match conn.sender.clone().try_send_request(req).await {
            Ok(response) => Ok(Sent {
                response,
                peer: conn.peer,
                lease,
            }),
            Err(mut e) => {
                let Some(mut req) = e.take_message() else {
                    return Err(SendError::Reset(e.into_error()));
                };
                drop(lease);
                tracing::debug!(upstream = %key.addr, error = %e.error(), "pooled connection closed under an unsent request; resending once");
                let (conn, nth) = match self.checkout(key, tls, Some(conn.id), max_requests).await {
                    Ok(conn) => conn,
                    Err(e) => return Err(SendError::Connect(e, Box::new(req))),
                };
                first_indexes_ids(&mut req, nth);
                let lease = Lease::on(&conn.busy);
                let response = conn.sender.clone().send_request(req).await.map_err(SendError::Reset)?;
                Ok(Sent {
                    response,
                    peer: conn.peer,
                    lease,
                })
            }
        }
    }

    /// Whether a request for `key` would find a connection made: one that would not is
    /// Envoy's pending request, which `max_pending_requests` bounds.
    pub fn ready(&self, key: &Key) -> bool {
        let slots = self.slots.lock().expect("pool poisoned");
        slots.get(key).is_some_and(|s| s.ready.load(Ordering::Acquire))
    }

    /// The live connection for `key` (not the one numbered `stale`), made if there is none,
    /// and how many requests it was given before this one. Requests for one key wait for a
    /// single connection attempt rather than racing their own.
    async fn checkout(
        &self,
        key: &Key,
        tls: Option<&Arc<ClientConfig>>,
        stale: Option<u64>,
        max_requests: Option<u64>,
    ) -> Result<(Conn, u64), ConnectError> {
        let slot = {
            let mut slots = self.slots.lock().expect("pool poisoned");
            match slots.get(key) {
                Some(slot) => slot.clone(),
                None => slots.entry(key.clone()).or_default().clone(),
            }
        };
        let seen = slot.attempts.load(Ordering::Acquire);
        let mut state = slot.state.lock().await;
        if let Some(conn) = &state.conn {
            let rotated = rotated(self.svid.as_deref(), conn.svid.as_ref());
            let spent = max_requests.is_some_and(|max| conn.sent.load(Ordering::Acquire) >= max);
            if !conn.sender.is_closed() && Some(conn.id) != stale && !rotated && !spent {
                let nth = conn.sent.fetch_add(1, Ordering::AcqRel);
                return Ok((conn.clone(), nth));
            }
            // Retired, not closed: requests in flight on it finish; it ends once they have.
            state.conn = None;
            slot.ready.store(false, Ordering::Release);
        }
        if slot.attempts.load(Ordering::Acquire) != seen
            && let Some(failed) = &state.failed
        {
            return Err(failed.clone());
        }
        slot.attempts.fetch_add(1, Ordering::AcqRel);
        match self.connect(key, tls, &slot).await {
            Ok(conn) => {
                state.failed = None;
                let nth = conn.sent.fetch_add(1, Ordering::AcqRel);
                state.conn = Some(conn.clone());
                slot.ready.store(true, Ordering::Release);
                Ok((conn, nth))
            }
            Err(e) => {
                state.failed = Some(e.clone());
                Err(e)
            }
        }
    }

    async fn connect(
        &self,
        key: &Key,
        tls: Option<&Arc<ClientConfig>>,
        slot: &Arc<Slot>,
    ) -> Result<Conn, ConnectError> {
        // Taken before the handshake, which presents this SVID or a newer one.
        let svid = self.svid.as_ref().map(|slot| slot.current());
        match tls {
            Some(tls) => {
                let (stream, peer) = dial(&self.settings, key, tls).await?;
                self.establish(key, slot, stream, peer, svid).await
            }
            None => {
                let tcp = connect_tcp(&self.settings, key.addr).await?;
                self.establish(key, slot, tcp, Arc::from("unknown"), svid).await
            }
        }
    }

    /// Speaks HTTP/2 on `stream`, made to `key` (the server proved `peer`).
    async fn establish<S>(
        &self,
        key: &Key,
        slot: &Arc<Slot>,
        stream: S,
        peer: Arc<str>,
        svid: Option<Arc<Svid>>,
    ) -> Result<Conn, ConnectError>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let s = &self.settings;
        // In TLS 1.3 the client's handshake is over before the server has checked the
        // client's certificate: a server that refuses our SVID says so only in its first
        // record. So the connection is offered to requests only once the server has spoken
        // (its SETTINGS, after our preface): a refusal is then a failed connect — counted
        // by reason, and moved past to another endpoint — rather than a request lost on a
        // connection that was never usable. We speak first: Envoy, Istio's inbound
        // sidecar, says nothing until it has sniffed our preface (see `first_read`).
        let (stream, first_read) = FirstRead::new(stream);
        // Requests of several clients ready at once leave in one write (see `coalesce`).
        let stream = Coalesced::new(stream);
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .max_header_list_size(crate::http::MAX_HEADER_LIST_SIZE)
            .initial_stream_window_size(crate::http::STREAM_WINDOW)
            .initial_connection_window_size(crate::http::CONNECTION_WINDOW)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ConnectError::Http2(key.addr, e.to_string()))?;
        let busy = Busy::new();
        let id = self.ids.fetch_add(1, Ordering::Relaxed);
        let (pool, key_owned, slot_owned) = (self.me.clone(), key.clone(), slot.clone());
        run_pooled(connection, key.addr, &busy, s.idle_timeout, &self.open, move || {
            if let Some(pool) = pool.upgrade() {
                pool.forget(&key_owned, &slot_owned, id);
            }
        });
        // Dropping `sender` on a failure below ends the connection's task.
        match tokio::time::timeout(s.handshake_timeout, first_read).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Err(ConnectError::Tls {
                    addr: key.addr,
                    reason: "closed_after_handshake",
                    message: "the server closed the connection before speaking HTTP/2".into(),
                });
            }
            Ok(Ok(Err(e))) => return Err(refused(key.addr, e)),
            // The connection ended without reading (it failed to write our preface).
            Ok(Err(_)) => {
                return Err(ConnectError::Http2(
                    key.addr,
                    "the connection ended before the server spoke".into(),
                ));
            }
            Err(_) => return Err(ConnectError::HandshakeTimeout(key.addr)),
        }
        Ok(Conn {
            id,
            sender,
            peer,
            busy,
            svid,
            sent: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Drops connection `id` and, when the slot is left empty, the slot itself, so that a
    /// pool that saw many endpoints come and go does not keep a slot for each.
    fn forget(&self, key: &Key, slot: &Arc<Slot>, id: u64) {
        // A slot locked now is being used to connect; it will hold a live connection.
        let Ok(mut state) = slot.state.try_lock() else { return };
        if state.conn.as_ref().is_some_and(|c| c.id == id) {
            state.conn = None;
            slot.ready.store(false, Ordering::Release);
        }
        if state.conn.is_none() {
            let mut slots = self.slots.lock().expect("pool poisoned");
            if slots.get(key).is_some_and(|s| Arc::ptr_eq(s, slot)) {
                slots.remove(key);
            }
        }
    }
}

/// A connection to `key` in mutual TLS (TCP connect and handshake, each bounded), with the
/// SPIFFE ID the server proved.
async fn dial(
    s: &Settings,
    key: &Key,
    tls: &Arc<ClientConfig>,
) -> Result<(tokio_rustls::client::TlsStream<TcpStream>, Arc<str>), ConnectError> {
    let tcp = connect_tcp(s, key.addr).await?;
    let handshake = tokio_rustls::TlsConnector::from(tls.clone()).connect(key.sni.clone(), tcp);
    let stream = match tokio::time::timeout(s.handshake_timeout, handshake).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return Err(refused(key.addr, e)),
        Err(_) => return Err(ConnectError::HandshakeTimeout(key.addr)),
    };
    let peer: Arc<str> = tls::proven_identity(stream.get_ref().1.peer_certificates())
        .map_or_else(|| Arc::from("unknown"), |id| Arc::from(id.as_str()));
    Ok((stream, peer))
}

/// A TCP connection to `addr`, with our mark, bounded by the connect timeout.
async fn connect_tcp(s: &Settings, addr: SocketAddr) -> Result<TcpStream, ConnectError> {
    let tcp = match tokio::time::timeout(s.connect_timeout, capture::connect_marked(addr, s.mark)).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => return Err(ConnectError::Connect(addr, e.to_string())),
        Err(_) => return Err(ConnectError::ConnectTimeout(addr)),
    };
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

/// A refusal during the handshake or in the server's first record, named by its reason.
fn refused(addr: SocketAddr, e: io::Error) -> ConnectError {
    ConnectError::Tls {
        addr,
        reason: tls::refusal_in(&e).map_or("tls_handshake", |r| r.reason()),
        message: e.to_string(),
    }
}

/// Drives a pooled connection on a task of its own until it ends or has had no request
/// in flight for `idle_timeout`, counted in `open` meanwhile; then `gone` takes it out
/// of its pool.
fn run_pooled(
    connection: impl Future<Output = hyper::Result<()>> + Send + 'static,
    upstream: SocketAddr,
    busy: &Arc<Busy>,
    idle_timeout: Duration,
    open: &prometheus::IntGauge,
    gone: impl FnOnce() + Send + 'static,
) {
    let (busy, open) = (busy.clone(), open.clone());
    open.inc();
    tokio::spawn(async move {
        tokio::select! {
            ended = connection => if let Err(e) = ended {
                tracing::debug!(%upstream, error = %e, "pooled upstream connection failed");
            },
            () = until_idle(&busy, idle_timeout) => {
                tracing::debug!(%upstream, "closing an idle upstream connection");
            }
        }
        open.dec();
        gone();
    });
}

/// Whether our SVID rotated since a connection was made with `used`: new requests then go
/// on a new connection, which presents the new one.
fn rotated(slot: Option<&SvidSlot>, used: Option<&Arc<Svid>>) -> bool {
    match (slot, used) {
        (Some(slot), Some(used)) => !Arc::ptr_eq(&slot.current(), used),
        _ => false,
    }
}

/// Completes once the connection has had no request in flight for `timeout`.
async fn until_idle(busy: &Busy, timeout: Duration) {
    loop {
        match busy.idle_for() {
            Some(idle) if idle >= timeout => return,
            Some(idle) => tokio::time::sleep(timeout - idle).await,
            None => tokio::time::sleep(timeout).await,
        }
    }
}

/// The body types the application pools carry (the caller's request bodies).
pub trait AppBody:
    hyper::body::Body<Data: Send, Error: Into<Box<dyn std::error::Error + Send + Sync>>> + Send + Unpin + 'static
{
}

impl<B> AppBody for B where
    B: hyper::body::Body<Data: Send, Error: Into<Box<dyn std::error::Error + Send + Sync>>> + Send + Unpin + 'static
{
}

/// Keep-alive connections to plaintext HTTP servers — the application behind the inbound
/// side, endpoints outside the mesh — per `IP:port`: HTTP/1.1, but HTTP/2 to servers that
/// take only that (a port named `http2` or `grpc`, see [`crate::app_http`]) and for the
/// requests only it carries (gRPC, see [`crate::http::needs_http2`]). Both are the mesh
/// pools' own ([`H1Pool`], [`H2Pool`]) in cleartext: they connect by address and keep the
/// caller's `host`/`:authority`, and cost a lookup and a pop per request where hyper-util's
/// pool hashed its key with SipHash twice and built a connect future it did not need
/// (under callgrind, the inbound side's 65k instructions per request became 58k).
pub struct Plaintext<B> {
    http1: Arc<H1Pool>,
    h2c: Arc<H2Pool>,
    body: std::marker::PhantomData<fn(B)>,
}

/// What a [`Plaintext`] server answered.
pub struct PlainAnswer {
    pub response: Response<Incoming>,
    /// Holds the HTTP/2 connection as busy (its idle timeout waits); keep it until the
    /// body is done.
    pub lease: Option<Lease>,
}

/// Why a [`Plaintext`] request got no answer.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct PlainError(SendError);

impl PlainError {
    /// No connection could be had (nothing was sent); otherwise the server went away after
    /// the request was sent.
    pub fn is_connect(&self) -> bool {
        !matches!(self.0, SendError::Reset(_))
    }

    /// The reason label of `isthmus_sidecar_upstream_failures_total`.
    pub fn reason(&self) -> &'static str {
        match &self.0 {
            SendError::Connect(e, _) => e.reason(),
            SendError::Overflow(_) => "upstream_cx_overflow",
            SendError::Reset(_) => "reset",
        }
    }
}

impl<B: AppBody + crate::body::IntoOutgoing> Plaintext<B> {
    /// Pools bounded by `settings`. Every connection that comes back idle is kept, as
    /// Envoy keeps them, until the idle timeout: a cap made each burst beyond it open (and
    /// leave in TIME_WAIT) new connections to the application — at 128 requests in flight
    /// with a cap of 64, 13,000 connections in six seconds and the pair's rate down by a
    /// third.
    pub fn new(settings: Settings) -> Self {
        // Cleartext: the "handshake" is the server's SETTINGS after our preface.
        let settings = Settings {
            handshake_timeout: settings.connect_timeout,
            ..settings
        };
        let gauge = |name, help| prometheus::IntGauge::new(name, help).expect("a valid gauge");
        Self {
            http1: H1Pool::new(
                settings,
                None,
                gauge("plaintext_http1_connections", "cleartext HTTP/1.1 connections open"),
            ),
            h2c: H2Pool::new(
                settings,
                None,
                gauge("plaintext_h2_connections", "cleartext HTTP/2 connections open"),
            ),
            body: std::marker::PhantomData,
        }
    }

    /// Sends `req` to `addr` in the HTTP it needs: HTTP/2 when the server takes only that
    /// (`http2`) or the request means nothing in HTTP/1.1; a WebSocket's upgrade is
    /// HTTP/1.1's in any case.
    pub async fn request(&self, req: Request<B>, addr: SocketAddr, http2: bool) -> Result<PlainAnswer, PlainError> {
        let headers = req.headers();
        if !crate::http::is_websocket(headers) && (http2 || crate::http::needs_http2(headers)) {
            let req = crate::http::to_http2(req, addr).map(crate::body::IntoOutgoing::into_outgoing);
            let sent = self.h2c.send_cleartext(addr, req).await.map_err(PlainError)?;
            Ok(PlainAnswer {
                response: sent.response,
                lease: Some(sent.lease),
            })
        } else {
            let req = crate::http::to_http1(req).map(crate::body::IntoOutgoing::into_outgoing);
            let sent = self.http1.send_cleartext(addr, req).await.map_err(PlainError)?;
            Ok(PlainAnswer {
                response: sent.response,
                lease: Some(sent.lease),
            })
        }
    }
}
