//! The inbound side: applies PeerAuthentication to each connection, terminates mutual TLS,
//! and hands the bytes to the application — on HTTP ports with the caller's identity in
//! `x-forwarded-client-cert`, as Envoy does for Istio (SANITIZE_SET: a client cannot forge
//! the header, it is always replaced).
//!
//! Every connection lands on a chain of the [`InboundPolicy`] (swapped whole when the
//! controller sends a new `virtualInbound`): the chain decides whether plaintext is taken,
//! and its RBAC filters are checked once per connection and, on HTTP ports, per request. A
//! denied request gets Envoy's `403 RBAC: access denied`; a denied connection is closed
//! at once. Both are counted.
//!
//! A caller that negotiated `istio-h2` (or `h2`) is served HTTP/2 — what our own outbound
//! side multiplexes — and one that negotiated `istio-http/1.1` (or `http/1.1`) HTTP/1.1,
//! whatever `--protocol` says: the caller's outbound side chose that ALPN for what it
//! carries (a caller's HTTP listener sends pooled HTTP even to a `--protocol tcp`
//! receiver). Under ALPN `istio` or none, `--protocol` decides: bytes, or HTTP — HTTP/1.1, or
//! HTTP/2 when the caller opens with its preface (a plaintext gRPC client). Each
//! request goes to the application over a pooled keep-alive HTTP/1.1 connection, but a
//! gRPC call over HTTP/2 in cleartext: gRPC servers take nothing else.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Either;
use hyper::body::Incoming;
use hyper::header::HeaderValue;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use mesh_vocab::spiffe::SpiffeId;
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::Full;

use crate::access_log::{AccessLog, Pending};
use crate::authz::{self, Attributes, HttpAttributes};
use crate::coalesce::Coalesced;
use crate::drain;
use crate::http::{self, Leased, ReplyBody};
use crate::metered::Metered;
use crate::otlp::{Exporter, Kind};
use crate::peer_authentication::{MtlsMode, Policy};
use crate::pool;
use crate::telemetry::{ConnectionLabels, RbacScope, RequestLabels, RequestSize, Telemetry};
use crate::tls;
use crate::virtual_inbound::{InboundPolicy, Transport};

/// How the application's port is spoken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// Opaque bytes, unless the caller's ALPN says it speaks HTTP.
    Tcp,
    /// HTTP (HTTP/1.1 to the application; HTTP/2 or HTTP/1.1 from callers): requests carry
    /// the caller's identity in `x-forwarded-client-cert`.
    Http,
}

/// The inbound listener of one workload.
pub struct Inbound {
    /// The application's address; with capture, its port is each connection's original
    /// destination port.
    pub app: SocketAddr,
    /// Connections arrive redirected by iptables (see [`crate::capture`]).
    pub captured: bool,
    pub protocol: Protocol,
    /// PeerAuthentication and authorization, swapped whole on every xDS update.
    pub policy: Arc<ArcSwap<InboundPolicy>>,
    /// The modes given on the command line: a port STRICT there stays STRICT whatever
    /// `policy` says (the workload's own demand; the mesh may tighten it, never loosen it).
    pub strict_floor: Option<Policy>,
    /// TLS with our SVID, requiring a client SVID.
    pub tls: Arc<ServerConfig>,
    /// Our identity: `By=` in XFCC, and the destination principal in metrics.
    pub self_id: SpiffeId,
    /// The service this workload backs, for metrics.
    pub service: String,
    /// PERMISSIVE waits this long for the client's first byte; a client that says nothing
    /// (a server-first protocol) is treated as plaintext.
    pub sniff_timeout: Duration,
    pub handshake_timeout: Duration,
    pub connect_timeout: Duration,
    pub telemetry: Telemetry,
    pub drain: drain::Watch,
    /// Where requests are logged, if anywhere.
    pub access_log: Option<Arc<AccessLog>>,
    /// Where spans go, if anywhere.
    pub otlp: Option<Exporter>,
    /// Keep-alive connections to the application (HTTP ports).
    pub app_pool: pool::Plaintext<Incoming>,
    /// Which HTTP the application speaks on each port (the controller's inbound clusters,
    /// or `--protocol`).
    pub app_http: Arc<ArcSwap<crate::app_http::AppHttp>>,
}

/// How one connection is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Served {
    /// Bytes copied to the application as they come.
    Bytes,
    Http1,
    Http2,
    /// HTTP/1.1, or HTTP/2 if the caller opens with its preface (h2c with prior knowledge,
    /// as gRPC clients speak): no ALPN named one, and Envoy's codec `AUTO` sniffs too.
    Sniffed,
}

impl Served {
    /// The caller's ALPN first, then the port's protocol: see the module's documentation.
    fn of(alpn: Option<&[u8]>, protocol: Protocol) -> Served {
        match (alpn, protocol) {
            (Some(b"istio-h2" | b"h2"), _) => Served::Http2,
            (Some(b"istio-http/1.1" | b"istio-http/1.0" | b"http/1.1"), _) => Served::Http1,
            (_, Protocol::Http) => Served::Sniffed,
            (_, Protocol::Tcp) => Served::Bytes,
        }
    }
}

/// The first byte of every TLS connection: a handshake record. No text protocol starts
/// with it (it is ASCII SYN).
const TLS_HANDSHAKE: u8 = 0x16;

/// Accepts until draining starts.
pub async fn serve(listener: TcpListener, inbound: Arc<Inbound>) {
    let drain = inbound.drain.clone();
    drain::accept_until_drained(listener, drain, move |stream| {
        let inbound = inbound.clone();
        async move { inbound.handle(stream).await }
    })
    .await;
}

impl Inbound {
    async fn first_byte(&self, client: &TcpStream, wait: Duration) -> Option<u8> {
        let mut b = [0u8; 1];
        match tokio::time::timeout(wait, client.peek(&mut b)).await {
            Ok(Ok(1)) => Some(b[0]),
            _ => None,
        }
    }

    async fn handle(self: Arc<Self>, client: TcpStream) {
        let _ = client.set_nodelay(true);
        let (app, destination) = if self.captured {
            match crate::capture::original_dst(&client) {
                Ok(original) => (SocketAddr::new(self.app.ip(), original.port()), original),
                Err(_) => return self.telemetry.refused("inbound", "no_original_dst"),
            }
        } else {
            (self.app, self.app)
        };
        let Ok(remote) = client.peer_addr() else {
            return;
        };
        let Some(mode) = self.policy.load().mode_for(app.port()) else {
            return self.telemetry.refused("inbound", "no_filter_chain");
        };
        let mode = match &self.strict_floor {
            Some(floor) if floor.mode_for(app.port()) == MtlsMode::Strict => MtlsMode::Strict,
            _ => mode,
        };
        let tls = match mode {
            MtlsMode::Disable => false,
            MtlsMode::Permissive => self.first_byte(&client, self.sniff_timeout).await == Some(TLS_HANDSHAKE),
            MtlsMode::Strict => match self.first_byte(&client, self.handshake_timeout).await {
                Some(TLS_HANDSHAKE) => true,
                Some(_) => return self.telemetry.refused("inbound", "plaintext"),
                None => return self.telemetry.refused("inbound", "handshake_timeout"),
            },
        };
        if !tls {
            let peer = Peer {
                caller: None,
                transport: Transport::Plaintext,
                remote,
                destination,
                server_name: None,
            };
            let served = Served::of(None, self.protocol);
            return self.forward(client, peer, app, served).await;
        }
        let acceptor = tokio_rustls::TlsAcceptor::from(self.tls.clone());
        let stream = match tokio::time::timeout(self.handshake_timeout, acceptor.accept(client)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                let reason = tls::refusal_in(&e).map_or("tls_handshake", |r| r.reason());
                tracing::info!(reason, error = %e, "inbound TLS refused");
                return self.telemetry.refused("inbound", reason);
            }
            Err(_) => return self.telemetry.refused("inbound", "handshake_timeout"),
        };
        let (_, session) = stream.get_ref();
        let served = Served::of(session.alpn_protocol(), self.protocol);
        let id = tls::proven_identity(session.peer_certificates());
        let hash = session.peer_certificates().and_then(|c| c.first()).map(|leaf| {
            let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, leaf);
            digest.as_ref().iter().map(|b| format!("{b:02x}")).collect::<String>()
        });
        let peer = Peer {
            caller: id.map(|id| Caller {
                id,
                cert_hash: hash.unwrap_or_default(),
            }),
            transport: Transport::MutualTls,
            remote,
            destination,
            server_name: session.server_name().map(str::to_owned),
        };
        self.forward(stream, peer, app, served).await;
    }

    /// The connection-level RBAC: the chain's network filters, and on a connection carried
    /// as bytes its HTTP filters too (it has no requests to check them against later).
    fn connection_allowed(&self, peer: &Peer, served: Served) -> bool {
        let policy = self.policy.load();
        let Some(authorization) = policy.authorization(peer.destination.port(), peer.transport) else {
            self.telemetry.refused("inbound", "no_filter_chain");
            return false;
        };
        let attributes = peer.attributes(None);
        let checks = [
            Some(&authorization.connection),
            (served == Served::Bytes).then_some(&authorization.request),
        ];
        for chain in checks.into_iter().flatten().filter(|c| !c.filters.is_empty()) {
            let verdict = chain.check(&attributes);
            self.telemetry.rbac(RbacScope::Tcp, &verdict);
            if !verdict.logged.is_empty() {
                tracing::info!(policies = ?verdict.logged, source = ?peer.principal(), remote = %peer.remote, "RBAC audit: connection");
            }
            if let Some(policy) = verdict.denied_by {
                tracing::info!(policy, source = ?peer.principal(), remote = %peer.remote, "RBAC: connection denied");
                self.telemetry.refused("inbound", "rbac_access_denied");
                return false;
            }
        }
        true
    }

    async fn forward<S>(self: Arc<Self>, mut client: S, peer: Peer, app: SocketAddr, served: Served)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        if !self.connection_allowed(&peer, served) {
            // Dropping the stream closes it at once, before any byte reaches the application.
            return;
        }
        match served {
            Served::Http1 | Served::Http2 => return self.serve_http(client, peer, app, served == Served::Http2).await,
            Served::Sniffed => {
                let Some((client, h2)) = http::sniff_http2(client, &self.drain).await else {
                    return;
                };
                return self.serve_http(client, peer, app, h2).await;
            }
            Served::Bytes => {}
        }
        let mut app = match tokio::time::timeout(self.connect_timeout, TcpStream::connect(app)).await {
            Ok(Ok(s)) => s,
            Ok(Err(_)) => return self.telemetry.upstream_failure("inbound", "connect_failure"),
            Err(_) => return self.telemetry.upstream_failure("inbound", "connect_timeout"),
        };
        let _ = app.set_nodelay(true);
        let counters = self.telemetry.connection(&ConnectionLabels {
            reporter: "destination",
            source_principal: peer.principal().unwrap_or("unknown"),
            destination_principal: self.self_id.as_str(),
            destination_service: &self.service,
            // Istio learns it from metadata exchange, which we do not speak.
            peer_cluster: None,
            mutual_tls: peer.caller.is_some(),
        });
        if let Ok((up, down)) = tokio::io::copy_bidirectional(&mut client, &mut app).await {
            counters.received.inc_by(up);
            counters.sent.inc_by(down);
        }
    }

    /// Serves HTTP/2 or HTTP/1.1 from `client` until it closes or, once draining starts,
    /// until its requests in progress are answered (HTTP/2 callers get a GOAWAY, so their
    /// pools move to a new connection).
    async fn serve_http<S>(self: Arc<Self>, client: S, peer: Peer, app: SocketAddr, h2: bool)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let mutual_tls = peer.caller.is_some();
        let counters = self.telemetry.connection(&ConnectionLabels {
            reporter: "destination",
            source_principal: peer.principal().unwrap_or("unknown"),
            destination_principal: self.self_id.as_str(),
            destination_service: &self.service,
            peer_cluster: None,
            mutual_tls,
        });
        let xfcc = peer.caller.as_ref().map(|c| c.xfcc(&self.self_id));
        let peer = Arc::new(peer);
        let (io, bytes) = Metered::new(client);
        let me = self.clone();
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let (me, xfcc, peer) = (me.clone(), xfcc.clone(), peer.clone());
            // Boxed for the reason the outbound side's is: hyper moves the service's future.
            async move { Ok::<_, Infallible>(Box::pin(me.to_app(req, app, xfcc, &peer)).await) }
        });
        let drain = self.drain.clone();
        let ended = if h2 {
            // Responses ready at once leave in one write (see `coalesce`).
            let conn = http::h2_server().serve_connection(TokioIo::new(Coalesced::new(io)), service);
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                ended = conn.as_mut() => ended,
                () = drain.signaled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            }
        } else {
            let conn = http::h1_server()
                .serve_connection(TokioIo::new(io), service)
                .with_upgrades();
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                ended = conn.as_mut() => ended,
                () = drain.signaled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            }
        };
        if let Err(e) = ended {
            tracing::debug!(error = %e, "inbound HTTP connection ended with an error");
        }
        let (read, written) = bytes.totals();
        counters.received.inc_by(read);
        counters.sent.inc_by(written);
    }

    /// The request-level RBAC, against the policy of now: an update applies to the next
    /// request even on a long-lived pooled connection.
    fn request_verdict(&self, req: &Request<Incoming>, peer: &Peer) -> authz::Verdict {
        let policy = self.policy.load();
        let Some(authorization) = policy.authorization(peer.destination.port(), peer.transport) else {
            return authz::Verdict {
                denied_by: Some(String::new()),
                ..Default::default()
            };
        };
        let http = HttpAttributes {
            method: req.method(),
            uri: req.uri(),
            headers: req.headers(),
        };
        let verdict = authorization.request.check(&peer.attributes(Some(http)));
        if !authorization.request.filters.is_empty() {
            self.telemetry.rbac(RbacScope::Http, &verdict);
        }
        verdict
    }

    /// One request to the application, with the `x-forwarded-client-cert` we vouch for in
    /// place of any the caller sent.
    async fn to_app(
        &self,
        mut req: Request<Incoming>,
        app: SocketAddr,
        xfcc: Option<HeaderValue>,
        peer: &Peer,
    ) -> Response<ReplyBody> {
        let protocol = http::request_protocol(req.headers());
        let size = RequestSize::of(&req);
        let source = peer.principal().unwrap_or("unknown");
        let mutual_tls = peer.caller.is_some();
        let headers = req.headers_mut();
        headers.remove("x-forwarded-client-cert");
        if let Some(v) = xfcc {
            headers.insert("x-forwarded-client-cert", v);
        }
        let span = crate::trace::hop(headers, self.otlp.is_some());
        let span = self
            .otlp
            .as_ref()
            .zip(span)
            .map(|(o, span)| o.start(span, Kind::Server, &req));
        let verdict = self.request_verdict(&req, peer);
        let mut log = self.access_log.as_ref().map(|l| l.start(&req));
        if !verdict.logged.is_empty() {
            tracing::info!(policies = ?verdict.logged, source, method = %req.method(), path = req.uri().path(), "RBAC audit: request");
            log = log.map(Pending::audited);
        }
        let labels = RequestLabels {
            connection: ConnectionLabels {
                reporter: "destination",
                source_principal: source,
                destination_principal: self.self_id.as_str(),
                destination_service: &self.service,
                peer_cluster: None,
                mutual_tls,
            },
            protocol,
        };
        if let Some(policy) = verdict.denied_by {
            tracing::info!(policy, source, method = %req.method(), path = req.uri().path(), "RBAC: request denied");
            let log = log.map(|l| l.answered(403, "-", None));
            let exchange = self.telemetry.request(&labels, 403, size).logged(log);
            return http::recorded(exchange.traced(span.map(|s| s.answered(403))), denied());
        }
        let websocket = http::take_websocket(&mut req);
        let http2 = self.app_http.load().http2(app.port());
        match self.app_pool.request(req, app, http2).await {
            Ok(pool::PlainAnswer { mut response, lease }) => {
                if let Some(downstream) = websocket {
                    http::join_websocket(downstream, &mut response, &self.drain);
                }
                let code = response.status().as_u16();
                let log = log.map(|l| l.answered(code, "-", Some(app)));
                let exchange = self.telemetry.request(&labels, code, size).logged(log);
                let exchange = exchange.traced(span.map(|s| s.answered(code)));
                let (mut parts, body) = response.into_parts();
                http::strip_hop_by_hop(&mut parts.headers);
                Response::from_parts(parts, Either::Left(Leased::new(body, lease).measured(exchange)))
            }
            Err(e) => {
                tracing::debug!(error = %e, "application did not answer");
                self.telemetry.upstream_failure("inbound", e.reason());
                let log = log.map(|l| l.answered(503, http::failure_flags(&e), Some(app)));
                let exchange = self.telemetry.request(&labels, 503, size).logged(log);
                let exchange = exchange.traced(span.map(|s| s.answered(503)));
                http::recorded(exchange, http::unavailable_after(&e))
            }
        }
    }
}

/// Envoy's answer to a request RBAC denied.
fn denied() -> Response<ReplyBody> {
    let mut resp = Response::new(Either::Right(Full::new(Bytes::from_static(
        authz::DENIED_BODY.as_bytes(),
    ))));
    *resp.status_mut() = hyper::StatusCode::FORBIDDEN;
    resp.headers_mut()
        .insert(hyper::header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    resp
}

/// Who is on the other end of a connection, and where it was going: what RBAC sees.
struct Peer {
    caller: Option<Caller>,
    transport: Transport,
    remote: SocketAddr,
    /// The original destination (the application's address and port).
    destination: SocketAddr,
    server_name: Option<String>,
}

impl Peer {
    fn principal(&self) -> Option<&str> {
        self.caller.as_ref().map(|c| c.id.as_str())
    }

    fn attributes<'a>(&'a self, http: Option<HttpAttributes<'a>>) -> Attributes<'a> {
        Attributes {
            principal: self.principal(),
            remote: self.remote.ip(),
            destination: self.destination,
            server_name: self.server_name.as_deref(),
            http,
        }
    }
}

/// The verified client of a connection.
struct Caller {
    id: SpiffeId,
    cert_hash: String,
}

impl Caller {
    /// Envoy's `x-forwarded-client-cert` element, as Istio configures it (By, Hash, URI).
    fn xfcc(&self, by: &SpiffeId) -> HeaderValue {
        HeaderValue::try_from(format!("By={by};Hash={};URI={}", self.cert_hash, self.id))
            .expect("SPIFFE IDs and hex are valid header text")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_callers_alpn_decides_over_the_ports_protocol() {
        for protocol in [Protocol::Tcp, Protocol::Http] {
            assert_eq!(Served::of(Some(b"istio-h2"), protocol), Served::Http2);
            assert_eq!(Served::of(Some(b"h2"), protocol), Served::Http2);
            assert_eq!(Served::of(Some(b"istio-http/1.1"), protocol), Served::Http1);
            assert_eq!(Served::of(Some(b"http/1.1"), protocol), Served::Http1);
        }
        assert_eq!(Served::of(Some(b"istio"), Protocol::Tcp), Served::Bytes);
        assert_eq!(Served::of(None, Protocol::Tcp), Served::Bytes);
        assert_eq!(Served::of(Some(b"istio"), Protocol::Http), Served::Sniffed);
        assert_eq!(Served::of(None, Protocol::Http), Served::Sniffed);
    }
}
