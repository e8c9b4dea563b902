//! The inbound side: applies PeerAuthentication to each connection, terminates mutual TLS,
//! and hands the bytes to the application — on HTTP ports with the caller's identity in
//! `x-forwarded-client-cert`, as Envoy does for Istio (SANITIZE_SET: a client cannot forge
//! the header, it is always replaced).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::header::HeaderValue;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use mesh_vocab::spiffe::SpiffeId;
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};

use crate::drain;
use crate::peer_authentication::{MtlsMode, Policy};
use crate::telemetry::{ConnectionLabels, Telemetry};
use crate::tls;

/// How the application's port is spoken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// Opaque bytes.
    Tcp,
    /// HTTP/1.1: requests carry the caller's identity in `x-forwarded-client-cert`.
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

    async fn handle(&self, client: TcpStream) {
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
            return self.forward(client, None, app).await;
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
        let peer = tls::proven_identity(session.peer_certificates());
        let hash = session.peer_certificates().and_then(|c| c.first()).map(|leaf| {
            let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, leaf);
            digest.as_ref().iter().map(|b| format!("{b:02x}")).collect::<String>()
        });
        let caller = peer.map(|id| Caller {
            id,
            cert_hash: hash.unwrap_or_default(),
        });
        self.forward(stream, caller, app).await;
    }

    async fn forward<S>(&self, mut client: S, caller: Option<Caller>, app: SocketAddr)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let app = match tokio::time::timeout(self.connect_timeout, TcpStream::connect(app)).await {
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
        match self.protocol {
            Protocol::Tcp => {
                let mut app = app;
                if let Ok((up, down)) = tokio::io::copy_bidirectional(&mut client, &mut app).await {
                    counters.received.inc_by(up);
                    counters.sent.inc_by(down);
                }
            }
            Protocol::Http => {
                let xfcc = caller.map(|c| c.xfcc(&self.self_id));
                if let Err(e) = http_hop(client, app, xfcc).await {
                    tracing::debug!(error = %e, "inbound HTTP connection ended with an error");
                }
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

type HopBody = Either<Incoming, Full<Bytes>>;

/// Serves HTTP/1.1 from `client` over one connection to the application, replacing any
/// `x-forwarded-client-cert` the client sent with the one we vouch for.
async fn http_hop<S>(client: S, app: TcpStream, xfcc: Option<HeaderValue>) -> Result<(), hyper::Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake::<_, Incoming>(TokioIo::new(app)).await?;
    tokio::spawn(conn);
    let sender = Arc::new(tokio::sync::Mutex::new(sender));
    let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        let sender = sender.clone();
        let xfcc = xfcc.clone();
        async move {
            let headers = req.headers_mut();
            headers.remove("x-forwarded-client-cert");
            if let Some(v) = xfcc {
                headers.insert("x-forwarded-client-cert", v);
            }
            // HTTP/1.1 answers one request at a time per connection, so this lock is never
            // contended; it only lets the `Fn` service reach the `&mut` sender.
            let mut sender = sender.lock().await;
            let reply: Response<HopBody> = match sender.send_request(req).await {
                Ok(resp) => resp.map(Either::Left),
                Err(e) => {
                    tracing::debug!(error = %e, "application did not answer");
                    Response::builder()
                        .status(StatusCode::SERVICE_UNAVAILABLE)
                        .body(Either::Right(Full::new(Bytes::from_static(
                            b"upstream connect error or disconnect/reset before headers\n",
                        ))))
                        .expect("static response")
                }
            };
            Ok::<_, Infallible>(reply)
        }
    });
    hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(client), service)
        .await
}
