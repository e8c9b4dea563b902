//! The inbound side: applies PeerAuthentication to each connection, terminates mutual TLS,
//! and hands the bytes to the application — on HTTP ports with the caller's identity in
//! `x-forwarded-client-cert`, as Envoy does for Istio (SANITIZE_SET: a client cannot forge
//! the header, it is always replaced).
//!
//! On HTTP ports a caller that negotiated `istio-h2` (or `h2`) is served HTTP/2 — what our
//! own outbound side pools and multiplexes — and one that negotiated `istio-http/1.1` (or
//! nothing, in plaintext) HTTP/1.1. Either way each request goes to the application over a
//! pooled keep-alive HTTP/1.1 connection.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Either;
use hyper::body::Incoming;
use hyper::header::HeaderValue;
use hyper::{Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use mesh_vocab::spiffe::SpiffeId;
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};

use crate::drain;
use crate::http::{self, CONNECT_FAILURE, CONNECTION_TERMINATION, Leased, ReplyBody};
use crate::metered::Metered;
use crate::peer_authentication::{MtlsMode, Policy};
use crate::pool::{self, MarkedConnector};
use crate::telemetry::{ConnectionLabels, RequestLabels, Telemetry};
use crate::tls;

/// How the application's port is spoken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// Opaque bytes.
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
    pub policy: Policy,
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
    /// Keep-alive connections to the application (HTTP ports).
    pub app_pool: Client<MarkedConnector, Incoming>,
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
        let app = if self.captured {
            match crate::capture::original_dst(&client) {
                Ok(original) => SocketAddr::new(self.app.ip(), original.port()),
                Err(_) => return self.telemetry.refused("inbound", "no_original_dst"),
            }
        } else {
            self.app
        };
        let mode = self.policy.mode_for(app.port());
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
            return self.forward(client, None, app, false).await;
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
        let h2 = matches!(session.alpn_protocol(), Some(b"istio-h2" | b"h2"));
        let peer = tls::proven_identity(session.peer_certificates());
        let hash = session.peer_certificates().and_then(|c| c.first()).map(|leaf| {
            let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, leaf);
            digest.as_ref().iter().map(|b| format!("{b:02x}")).collect::<String>()
        });
        let caller = peer.map(|id| Caller {
            id,
            cert_hash: hash.unwrap_or_default(),
        });
        self.forward(stream, caller, app, h2).await;
    }

    async fn forward<S>(self: Arc<Self>, mut client: S, caller: Option<Caller>, app: SocketAddr, h2: bool)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        if self.protocol == Protocol::Http {
            return self.serve_http(client, caller, app, h2).await;
        }
        let mut app = match tokio::time::timeout(self.connect_timeout, TcpStream::connect(app)).await {
            Ok(Ok(s)) => s,
            Ok(Err(_)) => return self.telemetry.upstream_failure("inbound", "connect_failure"),
            Err(_) => return self.telemetry.upstream_failure("inbound", "connect_timeout"),
        };
        let _ = app.set_nodelay(true);
        let source = caller.as_ref().map_or("unknown", |c| c.id.as_str());
        let counters = self.telemetry.connection(&ConnectionLabels {
            reporter: "destination",
            source_principal: source,
            destination_principal: self.self_id.as_str(),
            destination_service: &self.service,
            // Istio learns it from metadata exchange, which we do not speak.
            peer_cluster: None,
            mutual_tls: caller.is_some(),
        });
        if let Ok((up, down)) = tokio::io::copy_bidirectional(&mut client, &mut app).await {
            counters.received.inc_by(up);
            counters.sent.inc_by(down);
        }
    }

    /// Serves HTTP/2 or HTTP/1.1 from `client` until it closes or, once draining starts,
    /// until its requests in progress are answered (HTTP/2 callers get a GOAWAY, so their
    /// pools move to a new connection).
    async fn serve_http<S>(self: Arc<Self>, client: S, caller: Option<Caller>, app: SocketAddr, h2: bool)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let source: Arc<str> = caller
            .as_ref()
            .map_or_else(|| Arc::from("unknown"), |c| Arc::from(c.id.as_str()));
        let mutual_tls = caller.is_some();
        let counters = self.telemetry.connection(&ConnectionLabels {
            reporter: "destination",
            source_principal: &source,
            destination_principal: self.self_id.as_str(),
            destination_service: &self.service,
            peer_cluster: None,
            mutual_tls,
        });
        let xfcc = caller.map(|c| c.xfcc(&self.self_id));
        let (io, bytes) = Metered::new(client);
        let io = TokioIo::new(io);
        let me = self.clone();
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let (me, xfcc, source) = (me.clone(), xfcc.clone(), source.clone());
            async move { Ok::<_, Infallible>(me.to_app(req, app, xfcc, &source, mutual_tls).await) }
        });
        let drain = self.drain.clone();
        let ended = if h2 {
            let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .serve_connection(io, service);
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                ended = conn.as_mut() => ended,
                () = drain.signaled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            }
        } else {
            let conn = hyper::server::conn::http1::Builder::new().serve_connection(io, service);
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

    /// One request to the application, with the `x-forwarded-client-cert` we vouch for in
    /// place of any the caller sent.
    async fn to_app(
        &self,
        mut req: Request<Incoming>,
        app: SocketAddr,
        xfcc: Option<HeaderValue>,
        source: &str,
        mutual_tls: bool,
    ) -> Response<ReplyBody> {
        let protocol = http::request_protocol(req.headers());
        let headers = req.headers_mut();
        headers.remove("x-forwarded-client-cert");
        if let Some(v) = xfcc {
            headers.insert("x-forwarded-client-cert", v);
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
        match self.app_pool.request(http::to_http1(req, app)).await {
            Ok(resp) => {
                self.telemetry.request(&labels, resp.status().as_u16());
                let (mut parts, body) = resp.into_parts();
                http::strip_hop_by_hop(&mut parts.headers);
                Response::from_parts(parts, Either::Left(Leased::new(body, ())))
            }
            Err(e) => {
                tracing::debug!(error = %e, "application did not answer");
                self.telemetry
                    .upstream_failure("inbound", pool::http1_failure_reason(&e));
                self.telemetry.request(&labels, 503);
                http::unavailable(if e.is_connect() {
                    CONNECT_FAILURE
                } else {
                    CONNECTION_TERMINATION
                })
            }
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
