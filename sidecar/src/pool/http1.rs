//! HTTP/1.1 inside mutual TLS between sidecars (ALPN `istio-http/1.1`): Istio's default
//! hop for an application that speaks HTTP/1.1, ours where a DestinationRule says
//! `h2UpgradePolicy: DO_NOT_UPGRADE` (or `--h2-upgrade off`). One exchange at a time per connection, so concurrent requests to one endpoint ride
//! as many connections, kept alive and reused last-in first-out.
//!
//! HTTP/1.1 is the cheaper codec in user space — no HPACK, no stream state or flow
//! control, nothing translated (a third fewer instructions per request under callgrind) —
//! but it writes each request on its own and needs a handshake per request in flight
//! beyond the connections open; multiplexed HTTP/2 writes many at once, which is what a
//! busy hop's CPU goes on (the kernel's share), so it is the default.
//!
//! A connection goes back to the pool when its response body has been read to the end
//! (the [`Lease`] drops); one whose body was abandoned is closed by hyper and never comes
//! back. An idle connection closes after the idle timeout.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use hyper::Request;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;

use super::{Busy, ConnectError, Key, Lease, SendError, Sent, Settings, connect_tcp, dial, run_pooled};
use crate::body::Outgoing;
use crate::cluster::{Breaker, PooledSlot};
use crate::tls::{Svid, SvidSlot};

/// Keep-alive HTTP/1.1-in-mTLS connections to upstream sidecars (or gateways), per [`Key`].
pub struct H1Pool {
    settings: Settings,
    /// Our SVID, to retire connections made with an older one.
    svid: Option<Arc<SvidSlot>>,
    /// Connections open now, for the operator (and tests) to see.
    open: prometheus::IntGauge,
    stacks: Mutex<HashMap<Key, Arc<Stack>, foldhash::fast::RandomState>>,
    ids: AtomicU64,
    me: Weak<H1Pool>,
}

/// One key's connections.
#[derive(Default)]
struct Stack {
    /// Those waiting for a request, the most recently used last.
    idle: Mutex<Vec<Conn>>,
    /// Those open, idle or not: the stack leaves the pool with the last.
    open: AtomicUsize,
}

struct Conn {
    id: u64,
    /// Its place under the cluster's `max_connections`, while it is open.
    slot: Option<PooledSlot>,
    sender: http1::SendRequest<Outgoing>,
    peer: Arc<str>,
    busy: Arc<Busy>,
    /// The SVID current when it was made (see [`super::H2Pool`]).
    svid: Option<Arc<Svid>>,
    /// Requests it has been given.
    sent: u64,
    /// Given its last request (`max_requests`): closed once that is over, not kept.
    spent: bool,
}

/// The cluster's bound on connections (`max_connections`), and whom to tell when a
/// request finds it reached.
pub struct ConnectionLimit<'a> {
    pub breaker: &'a Arc<Breaker>,
    pub overflowed: &'a (dyn Fn() + Sync),
}

/// What a request that found no idle connection may go on.
enum Room {
    /// A connection that came back idle while it waited.
    Idle(Conn),
    /// A new connection, with its place under the cluster's limit (if it has one).
    New(Option<PooledSlot>),
}

/// A connection on its way back to its stack, once its exchange is over.
pub(super) struct Back {
    stack: Arc<Stack>,
    conn: Conn,
}

impl Back {
    pub(super) fn give(self) {
        // A connection the server closed, or whose response hyper gave up on, is not kept.
        if self.conn.sender.is_closed() || self.conn.spent {
            return;
        }
        let mut idle = self.stack.idle.lock().expect("pool poisoned");
        idle.push(self.conn);
        // Under the lock, so a request waiting for room finds it when it looks.
        if let Some(slot) = idle.last().and_then(|c| c.slot.as_ref()) {
            slot.wake_waiters();
        }
    }
}

impl H1Pool {
    /// An empty pool.
    pub fn new(settings: Settings, svid: Option<Arc<SvidSlot>>, open: prometheus::IntGauge) -> Arc<H1Pool> {
        Arc::new_cyclic(|me| H1Pool {
            settings,
            svid,
            open,
            stacks: Mutex::new(HashMap::default()),
            ids: AtomicU64::new(0),
            me: me.clone(),
        })
    }

    /// Sends `req` (in the pooled form: its authority in the URI) as HTTP/1.1 on an idle
    /// connection for `key`, or on a new one made with `tls`.
    ///
    /// The retry rule is the HTTP/2 pool's ([`super::H2Pool::send`]): a request that hyper
    /// hands back was never written — its connection was found closed — so it goes on
    /// another one; one that was written is never resent. `max_requests` retires a
    /// connection after that many; `pending` is given back once the request has a
    /// connection.
    ///
    /// A new connection takes a place under `breaker`'s `max_connections` (Envoy's
    /// circuit breaker, which bounds HTTP/1.1 connections): at the limit the request waits,
    /// as Envoy's pending request does, up to the connect timeout for a connection of its
    /// endpoint to come back idle or one of the cluster's to close; `overflowed` is told
    /// once (`upstream_cx_overflow`), and a wait that runs out is [`SendError::Overflow`].
    pub async fn send<P>(
        &self,
        key: &Key,
        tls: &Arc<ClientConfig>,
        req: Request<Outgoing>,
        max_requests: Option<u64>,
        pending: P,
        limit: Option<ConnectionLimit<'_>>,
    ) -> Result<Sent, SendError> {
        self.send_on(key, Some(tls), req, max_requests, pending, limit).await
    }

    /// Sends `req` (in the pooled form) to `addr` as cleartext HTTP/1.1 on a kept-alive
    /// connection: the application behind the inbound side, servers outside the mesh
    /// (see [`super::Plaintext`]).
    pub async fn send_cleartext(&self, addr: std::net::SocketAddr, req: Request<Outgoing>) -> Result<Sent, SendError> {
        self.send_on(&Key::cleartext(addr), None, req, None, (), None).await
    }

    /// [`Self::send`], in mutual TLS with `tls`, or in cleartext without.
    async fn send_on<P>(
        &self,
        key: &Key,
        tls: Option<&Arc<ClientConfig>>,
        req: Request<Outgoing>,
        max_requests: Option<u64>,
        pending: P,
        limit: Option<ConnectionLimit<'_>>,
    ) -> Result<Sent, SendError> {
        let stack = self.stack(key);
        let mut req = req;
        let mut pending = Some(pending);
        // Each pass either takes an idle connection off the stack (a finite number) or
        // makes a new one, after which a handed-back request is a failure.
        let mut made = false;
        // Whether the cluster's limit was reported reached (`upstream_cx_overflow`).
        let mut told = false;
        // Handed back as it came, for another endpoint (which may speak HTTP/2).
        let unsent = |req| Box::new(crate::http::to_absolute_form(req));
        loop {
            let mut conn = match self.take(&stack, max_requests).await {
                Some(conn) => conn,
                None if made => {
                    let e = ConnectError::Connect(key.addr, "a new connection closed before its first request".into());
                    return Err(SendError::Connect(e, unsent(req)));
                }
                None => match self.room(&stack, max_requests, limit.as_ref(), &mut told).await {
                    Some(Room::Idle(conn)) => conn,
                    Some(Room::New(slot)) => match self.connect(key, tls, &stack, slot).await {
                        Ok(conn) => {
                            made = true;
                            conn
                        }
                        Err(e) => return Err(SendError::Connect(e, unsent(req))),
                    },
                    None => return Err(SendError::Overflow(unsent(req))),
                },
            };
            drop(pending.take());
            conn.sent += 1;
            conn.spent = max_requests.is_some_and(|max| conn.sent >= max);
            let lease = Lease::on(&conn.busy);
            match conn.sender.try_send_request(crate::http::to_origin_form(req)).await {
                Ok(response) => {
                    let peer = conn.peer.clone();
                    let mut lease = lease;
                    lease.back = Some(Box::new(Back { stack, conn }));
                    return Ok(Sent { response, peer, lease });
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) => {
                        tracing::debug!(upstream = %key.addr, error = %e.error(), "pooled connection closed under an unsent request; trying another");
                        req = unsent;
                    }
                    None => return Err(SendError::Reset(e.into_error())),
                },
            }
        }
    }

    /// Whether a request for `key` would find an idle connection: one that would not is
    /// Envoy's pending request, which `max_pending_requests` bounds.
    pub fn ready(&self, key: &Key) -> bool {
        let stacks = self.stacks.lock().expect("pool poisoned");
        stacks
            .get(key)
            .is_some_and(|s| !s.idle.lock().expect("pool poisoned").is_empty())
    }

    fn stack(&self, key: &Key) -> Arc<Stack> {
        let mut stacks = self.stacks.lock().expect("pool poisoned");
        match stacks.get(key) {
            Some(stack) => stack.clone(),
            None => stacks.entry(key.clone()).or_default().clone(),
        }
    }

    /// The most recently used idle connection that can take a request now; those closed,
    /// spent or made with a rotated SVID are dropped on the way (which closes them).
    async fn take(&self, stack: &Stack, max_requests: Option<u64>) -> Option<Conn> {
        loop {
            let mut conn = stack.idle.lock().expect("pool poisoned").pop()?;
            let rotated = super::rotated(self.svid.as_deref(), conn.svid.as_ref());
            let spent = max_requests.is_some_and(|max| conn.sent >= max);
            if conn.sender.is_closed() || rotated || spent {
                continue;
            }
            // Back from its last exchange, it may not have told the pool it wants the next
            // one yet; it will at once, or it is closing.
            if conn.sender.is_ready() || conn.sender.ready().await.is_ok() {
                return Some(conn);
            }
        }
    }

    /// Room for a request that found no idle connection: a place for a new one under the
    /// cluster's `max_connections` or, waiting at the limit, a connection come back idle;
    /// `None` when the connect timeout passed first.
    async fn room(
        &self,
        stack: &Stack,
        max_requests: Option<u64>,
        limit: Option<&ConnectionLimit<'_>>,
        told: &mut bool,
    ) -> Option<Room> {
        let Some(&ConnectionLimit { breaker, overflowed }) = limit else {
            return Some(Room::New(None));
        };
        if let Some(slot) = breaker.pooled() {
            return Some(Room::New(Some(slot)));
        }
        // Once a request, however often it comes back here.
        if !std::mem::replace(told, true) {
            overflowed();
        }
        let wait = async {
            loop {
                let freed = breaker.freed().notified();
                let mut freed = std::pin::pin!(freed);
                // Registered before looking, so room made in between still wakes us.
                freed.as_mut().enable();
                if let Some(conn) = self.take(stack, max_requests).await {
                    return Room::Idle(conn);
                }
                if let Some(slot) = breaker.pooled() {
                    return Room::New(Some(slot));
                }
                freed.await;
            }
        };
        tokio::time::timeout(self.settings.connect_timeout, wait).await.ok()
    }

    async fn connect(
        &self,
        key: &Key,
        tls: Option<&Arc<ClientConfig>>,
        stack: &Arc<Stack>,
        slot: Option<PooledSlot>,
    ) -> Result<Conn, ConnectError> {
        // Counted from the attempt on, so that the stack stays in the pool meanwhile: the
        // connection it replaces (spent, say) may close before this one is made, and a
        // stack left out of the pool would keep this one from every later request.
        stack.open.fetch_add(1, Ordering::AcqRel);
        self.stacks
            .lock()
            .expect("pool poisoned")
            .entry(key.clone())
            .or_insert_with(|| stack.clone());
        // Taken before the handshake, which presents this SVID or a newer one.
        let svid = self.svid.as_ref().map(|slot| slot.current());
        let busy = Busy::new();
        let id = self.ids.fetch_add(1, Ordering::Relaxed);
        let (pool, key_owned, stack_owned) = (self.me.clone(), key.clone(), stack.clone());
        let gone = move || {
            if let Some(pool) = pool.upgrade() {
                pool.forget(&key_owned, &stack_owned, id);
            }
        };
        let made = match tls {
            Some(tls) => match dial(&self.settings, key, tls).await {
                Ok((stream, peer)) => self.establish(key, stream, &busy, gone).await.map(|s| (s, peer)),
                Err(e) => Err(e),
            },
            None => match connect_tcp(&self.settings, key.addr).await {
                Ok(tcp) => self
                    .establish(key, tcp, &busy, gone)
                    .await
                    .map(|s| (s, Arc::from("unknown"))),
                Err(e) => Err(e),
            },
        };
        let (sender, peer) = match made {
            Ok(made) => made,
            Err(e) => {
                self.release(key, stack);
                return Err(e);
            }
        };
        Ok(Conn {
            id,
            slot,
            spent: false,
            sender,
            peer,
            busy,
            svid,
            sent: 0,
        })
    }

    /// Speaks HTTP/1.1 on `stream`, made to `key`, and drives the connection until it
    /// closes or idles out; `gone` is told when it has.
    async fn establish<S>(
        &self,
        key: &Key,
        stream: S,
        busy: &Arc<Busy>,
        gone: impl FnOnce() + Send + 'static,
    ) -> Result<http1::SendRequest<Outgoing>, ConnectError>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        // The server speaks only when asked, so a server that refuses our SVID after the
        // handshake (TLS 1.3) is heard of on the first request, as a reset.
        let (sender, connection) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ConnectError::Connect(key.addr, e.to_string()))?;
        run_pooled(
            // A WebSocket's `101` hands the connection over to the request (never pooled again).
            connection.with_upgrades(),
            key.addr,
            busy,
            self.settings.idle_timeout,
            &self.open,
            gone,
        );
        Ok(sender)
    }

    /// Drops connection `id` from its stack and, with the stack's last connection gone,
    /// the stack, so that a pool that saw many endpoints come and go keeps none of theirs.
    fn forget(&self, key: &Key, stack: &Arc<Stack>, id: u64) {
        stack.idle.lock().expect("pool poisoned").retain(|c| c.id != id);
        self.release(key, stack);
    }

    /// One connection (or attempt) fewer on `stack`; the stack leaves the pool with its last.
    fn release(&self, key: &Key, stack: &Arc<Stack>) {
        if stack.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            let mut stacks = self.stacks.lock().expect("pool poisoned");
            if stacks.get(key).is_some_and(|s| Arc::ptr_eq(s, stack)) && stack.open.load(Ordering::Acquire) == 0 {
                stacks.remove(key);
            }
        }
    }
}
