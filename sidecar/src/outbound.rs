//! The outbound side: takes the application's plaintext connection and carries it to the
//! upstream inside mutual TLS, presenting our SVID and accepting only the identity the
//! upstream is supposed to have.
//!
//! Two ways in: [`Outbound`], one explicit route (a listener, a target), and [`Captured`],
//! connections redirected by iptables and routed by their original destination through the
//! table the controller sent ([`Destinations`]). A destination the table does not know is
//! passed through untouched, as Istio's `PassthroughCluster` does.
//!
//! With `--protocol tcp` each client connection is carried in its own mTLS connection, byte
//! for byte. With `--protocol http` ([`HttpHop`]) the application's HTTP/1.1 (or h2c) is
//! served here and each request goes over a pooled connection inside mTLS, so a new client
//! connection costs no handshake upstream: one multiplexed HTTP/2 connection
//! ([`crate::pool::H2Pool`]), or keep-alive HTTP/1.1 for an HTTP/1.1 request
//! ([`crate::pool::H1Pool`]) where the cluster (a DestinationRule's `h2UpgradePolicy:
//! DO_NOT_UPGRADE`) or `--h2-upgrade off` says so.
//! Captured HTTP traffic chooses its endpoint per request, as Envoy's router does: a
//! keep-alive client spreads its requests over the endpoints instead of pinning one, and
//! each request sees the latest table. A captured connection to an HTTP listener (an
//! `http_connection_manager`) goes through the HTTP hop whatever `--protocol` says, and
//! each of its requests is routed by its route configuration ([`router`]).

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use http_body_util::Either;
use hyper::body::Incoming;
use hyper::header::HOST;
use hyper::http::uri::Authority;
use hyper::{Request, Response, Version};
use hyper_util::rt::TokioIo;
use mesh_vocab::spiffe::SpiffeId;
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};

mod router;

use crate::access_log::{AccessLog, Pending};
use crate::body::{Outgoing, Resumed};
use crate::capture;
use crate::client_hello;
use crate::cluster::{ConnectionOverflow, Reply, UpstreamHttp};
use crate::destinations::{self, Destinations};
use crate::drain;
use crate::filter_chain::Seen;
use crate::http::{self, CONNECT_FAILURE, CONNECTION_TERMINATION, Leased, ReplyBody};
use crate::metered::Metered;
use crate::otlp::{Exporter, Kind, Started};
use crate::pool::{self, ConnectionLimit, H1Pool, H2Pool, Key, SendError, Sent};
use crate::rewind::Rewind;
use crate::telemetry::{ConnectionLabels, Exchange, RequestLabels, RequestSize, TcpCounters, Telemetry};
use crate::tls::{self, Alpn, ExpectedPeer, SvidSlot, TrustBundles};

/// One explicit outbound route: everything accepted goes to `upstream.addr`.
pub struct Outbound {
    /// The server side's address (its sidecar inbound, or an east-west gateway), the SNI
    /// sent there (Istio's `outbound_.PORT_.SUBSET_.HOST`, which a gateway routes by) and
    /// the identities it may prove.
    pub upstream: Key,
    /// The service this route reaches, for metrics.
    pub service: String,
    /// TLS with our SVID and the upstream's expected identities.
    pub tls: Arc<ClientConfig>,
    /// Our own identity, for metrics.
    pub self_id: SpiffeId,
    /// Bound on TCP connect.
    pub connect_timeout: Duration,
    /// Bound on the TLS handshake.
    pub handshake_timeout: Duration,
    pub telemetry: Telemetry,
    pub drain: drain::Watch,
    /// `--protocol http`: requests over pooled HTTP/1.1 or HTTP/2; `None` carries bytes.
    pub http: Option<Arc<HttpHop>>,
    /// TLS as `tls`, offering `istio-http/1.1`: for requests that go as HTTP/1.1.
    pub http1_tls: Arc<ClientConfig>,
}

/// Accepts until draining starts; each connection runs to its end on this thread's runtime.
pub async fn serve(listener: TcpListener, outbound: Arc<Outbound>) {
    let drain = outbound.drain.clone();
    drain::accept_until_drained(listener, drain, move |stream| {
        let outbound = outbound.clone();
        async move { outbound.carry(stream).await }
    })
    .await;
}

impl Outbound {
    async fn carry(self: Arc<Self>, client: TcpStream) {
        let _ = client.set_nodelay(true);
        if let Some(hop) = &self.http {
            return hop.clone().serve(client, Route::Fixed(self.clone())).await;
        }
        let Some(upstream) = connect(self.upstream.addr, None, self.connect_timeout, &self.telemetry).await else {
            return;
        };
        let hop = Hop {
            self_id: &self.self_id,
            service: &self.service,
            cluster: None,
            handshake_timeout: self.handshake_timeout,
            telemetry: &self.telemetry,
        };
        hop.mtls(client, upstream, self.upstream.sni.clone(), self.tls.clone())
            .await;
    }
}

/// Connects within `timeout`, counting a failure; the mark keeps our own connection out of
/// the capture rules.
async fn connect(addr: SocketAddr, mark: Option<u32>, timeout: Duration, telemetry: &Telemetry) -> Option<TcpStream> {
    match tokio::time::timeout(timeout, capture::connect_marked(addr, mark)).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Some(s)
        }
        Ok(Err(e)) => {
            tracing::debug!(upstream = %addr, error = %e, "upstream connect failed");
            telemetry.upstream_failure("outbound", "connect_failure");
            None
        }
        Err(_) => {
            telemetry.upstream_failure("outbound", "connect_timeout");
            None
        }
    }
}

/// What one outbound connection needs to be carried and counted.
struct Hop<'a> {
    self_id: &'a SpiffeId,
    service: &'a str,
    /// The endpoint's cluster, when xDS said.
    cluster: Option<&'a str>,
    handshake_timeout: Duration,
    telemetry: &'a Telemetry,
}

impl Hop<'_> {
    /// Wraps `upstream` in mutual TLS and moves bytes both ways until both sides close.
    async fn mtls<C: AsyncRead + AsyncWrite + Unpin>(
        &self,
        client: C,
        upstream: TcpStream,
        sni: ServerName<'static>,
        tls: Arc<ClientConfig>,
    ) {
        self.tls(client, upstream, sni, tls, true).await
    }

    /// Wraps `upstream` in TLS with `tls` — the mesh's mTLS when `mesh`, else TLS this
    /// sidecar originates to a server outside the mesh — and moves bytes both ways until
    /// both sides close.
    async fn tls<C: AsyncRead + AsyncWrite + Unpin>(
        &self,
        mut client: C,
        upstream: TcpStream,
        sni: ServerName<'static>,
        tls: Arc<ClientConfig>,
        mesh: bool,
    ) {
        let connector = tokio_rustls::TlsConnector::from(tls);
        let handshake = connector.connect(sni, upstream);
        let mut tls = match tokio::time::timeout(self.handshake_timeout, handshake).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                let reason = tls::refusal_in(&e).map_or("tls_handshake", |r| r.reason());
                tracing::info!(service = self.service, error = %e, "upstream TLS refused");
                return self.telemetry.upstream_failure("outbound", reason);
            }
            Err(_) => return self.telemetry.upstream_failure("outbound", "handshake_timeout"),
        };
        let peer = tls::proven_identity(tls.get_ref().1.peer_certificates()).filter(|_| mesh);
        let peer = peer.as_ref().map_or("unknown", SpiffeId::as_str);
        let counters = self.telemetry.connection(&ConnectionLabels {
            reporter: "source",
            source_principal: self.self_id.as_str(),
            destination_principal: peer,
            destination_service: self.service,
            peer_cluster: self.cluster,
            mutual_tls: mesh,
        });
        if let Ok((up, down)) = tokio::io::copy_bidirectional(&mut client, &mut tls).await {
            counters.received.inc_by(up);
            counters.sent.inc_by(down);
        }
    }

    /// Moves bytes both ways in plaintext (an endpoint outside the mesh, or passthrough).
    async fn plain<C: AsyncRead + AsyncWrite + Unpin>(&self, mut client: C, mut upstream: TcpStream) {
        let counters = self.telemetry.connection(&ConnectionLabels {
            reporter: "source",
            source_principal: self.self_id.as_str(),
            destination_principal: "unknown",
            destination_service: self.service,
            peer_cluster: self.cluster,
            mutual_tls: false,
        });
        if let Ok((up, down)) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
            counters.received.inc_by(up);
            counters.sent.inc_by(down);
        }
    }
}

/// Endpoints tried per captured connection before giving up.
const CONNECT_ATTEMPTS: usize = 3;

/// The identities a server may prove, and whether HTTP/2 is spoken to it.
type ConfigKey = (Vec<SpiffeId>, Alpn);

/// Captured outbound traffic, routed by original destination.
pub struct Captured {
    /// The routing table, swapped whole by the xDS client.
    pub table: Arc<ArcSwap<Destinations>>,
    pub svid: Arc<SvidSlot>,
    pub bundles: Arc<TrustBundles>,
    pub alpn: Alpn,
    /// The mark on our own sockets (see [`capture::Rules`]).
    pub mark: Option<u32>,
    /// Our own listening address: a connection whose original destination it is would loop.
    pub listen: SocketAddr,
    pub self_id: SpiffeId,
    pub connect_timeout: Duration,
    pub handshake_timeout: Duration,
    pub telemetry: Telemetry,
    pub drain: drain::Watch,
    /// One client configuration per set of expected server identities and whether it
    /// carries HTTP/2, built once.
    configs: Mutex<HashMap<ConfigKey, Arc<ClientConfig>>>,
    /// The HTTP hop: every connection to an HTTP listener, and with `--protocol http` those
    /// to TCP listeners too.
    pub http: Arc<HttpHop>,
    /// `--protocol http`: a TCP listener's connections are carried as HTTP requests too.
    pub http_everywhere: bool,
}

impl Captured {
    /// A captured listener's state; `configs` start empty.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        table: Arc<ArcSwap<Destinations>>,
        svid: Arc<SvidSlot>,
        bundles: Arc<TrustBundles>,
        alpn: Alpn,
        mark: Option<u32>,
        listen: SocketAddr,
        self_id: SpiffeId,
        connect_timeout: Duration,
        handshake_timeout: Duration,
        telemetry: Telemetry,
        drain: drain::Watch,
        http: Arc<HttpHop>,
        http_everywhere: bool,
    ) -> Self {
        Self {
            table,
            svid,
            bundles,
            alpn,
            mark,
            listen,
            self_id,
            connect_timeout,
            handshake_timeout,
            telemetry,
            drain,
            configs: Mutex::new(HashMap::new()),
            http,
            http_everywhere,
        }
    }

    /// The client configuration for `identities`, offering `alpn`.
    fn config_for(&self, identities: &[SpiffeId], alpn: Alpn) -> Arc<ClientConfig> {
        let mut configs = self.configs.lock().expect("config cache poisoned");
        configs
            .entry((identities.to_vec(), alpn))
            .or_insert_with(|| {
                let expected = if identities.is_empty() {
                    ExpectedPeer::Any
                } else {
                    ExpectedPeer::OneOf(identities.to_vec())
                };
                tls::client_config(self.svid.clone(), self.bundles.clone(), expected, alpn)
            })
            .clone()
    }

    async fn carry(self: Arc<Self>, client: TcpStream) {
        let _ = client.set_nodelay(true);
        let original = match capture::original_dst(&client) {
            Ok(a) => a,
            Err(e) => {
                tracing::debug!(error = %e, "captured connection without an original destination");
                return self.telemetry.refused("outbound", "no_original_dst");
            }
        };
        if original == self.listen || original.port() == self.listen.port() && original.ip().is_loopback() {
            return self.telemetry.refused("outbound", "loop");
        }
        self.carry_to(client, original).await;
    }

    /// Carries a captured connection whose original destination is `original`, as its
    /// listener says: HTTP listeners through the HTTP hop, TCP ones as bytes (or as HTTP
    /// with `--protocol http`), unknown destinations passed through. A listener whose chain
    /// depends on the ClientHello (VirtualService `tls` routes) has it read first and put
    /// back in front: the application's own TLS goes through untouched, inside mTLS when
    /// the chosen endpoint is in the mesh, as Istio's auto-mTLS does.
    pub async fn carry_to(self: Arc<Self>, client: TcpStream, original: SocketAddr) {
        let table = self.table.load_full();
        if table.reads_hello(original) {
            let (first, hello) = match read_hello(&client, self.handshake_timeout).await {
                Ok(read) => read,
                Err(reason) => return self.telemetry.refused("outbound", reason),
            };
            let seen = Seen {
                destination: original,
                hello: hello.as_ref(),
            };
            let upstream = match table.routed(seen) {
                destinations::Routed::Upstream(upstream) => Some(upstream),
                destinations::Routed::Passthrough => None,
                // Envoy closes a connection no filter chain takes.
                destinations::Routed::Unrouted => return self.telemetry.refused("outbound", "no_filter_chain_match"),
            };
            return match (upstream, first.is_empty()) {
                (Some(upstream), true) => self.carry_upstream(client, upstream).await,
                (Some(upstream), false) => self.carry_upstream(Rewind::new(first, client), upstream).await,
                (None, true) => self.pass_through(client, original).await,
                (None, false) => self.pass_through(Rewind::new(first, client), original).await,
            };
        }
        if table.http_listener(original).is_some() || self.http_everywhere && table.route(original).is_some() {
            return self
                .http
                .clone()
                .serve(client, Route::Captured(self.clone(), original))
                .await;
        }
        let Some(upstream) = table.route(original) else {
            return self.pass_through(client, original).await;
        };
        self.carry_upstream(client, upstream).await
    }

    /// Carries `client`'s bytes to `original` untouched (Istio's `PassthroughCluster`).
    async fn pass_through<C: AsyncRead + AsyncWrite + Unpin>(&self, client: C, original: SocketAddr) {
        let service = original.ip().to_string();
        let hop = Hop {
            self_id: &self.self_id,
            service: &service,
            cluster: None,
            handshake_timeout: self.handshake_timeout,
            telemetry: &self.telemetry,
        };
        if let Some(up) = connect(original, self.mark, self.connect_timeout, &self.telemetry).await {
            hop.plain(client, up).await;
        }
    }

    /// Carries `client`'s bytes to one endpoint of `upstream`, in mTLS where it speaks it.
    async fn carry_upstream<C: AsyncRead + AsyncWrite + Unpin>(&self, client: C, upstream: &destinations::Upstream) {
        let telemetry = &self.telemetry;
        let overflowed = || telemetry.upstream_failure("outbound", "upstream_cx_overflow");
        // Held for as long as the connection is carried.
        let _connection = match upstream.breaker.connection(self.connect_timeout, overflowed).await {
            Ok(slot) => slot,
            Err(e) => return self.telemetry.upstream_failure("outbound", e.reason()),
        };
        let mut tried: Vec<usize> = Vec::new();
        while tried.len() < CONNECT_ATTEMPTS.min(upstream.endpoints.len()) {
            let Some(i) = upstream.balancer.pick(|i| !tried.contains(&i)) else {
                break;
            };
            tried.push(i);
            let endpoint = &upstream.endpoints[i];
            let Some(stream) = connect(endpoint.address, self.mark, self.connect_timeout, &self.telemetry).await else {
                continue;
            };
            let _active = upstream.balancer.open(i);
            let hop = Hop {
                self_id: &self.self_id,
                service: &upstream.service,
                cluster: endpoint.cluster.as_deref(),
                handshake_timeout: self.handshake_timeout,
                telemetry: &self.telemetry,
            };
            match (&upstream.origination, &upstream.tls, endpoint.mtls) {
                (Some(own), _, _) => hop.tls(client, stream, own.sni.clone(), own.tcp.clone(), false).await,
                (None, Some(mesh), true) => {
                    let Ok(sni) = ServerName::try_from(endpoint.sni(mesh)) else {
                        return self.telemetry.upstream_failure("outbound", "bad_sni");
                    };
                    hop.mtls(client, stream, sni, self.config_for(&mesh.identities, self.alpn))
                        .await;
                }
                _ => hop.plain(client, stream).await,
            }
            return;
        }
        if upstream.endpoints.is_empty() {
            self.telemetry.upstream_failure("outbound", "no_healthy_upstream");
        }
    }
}

/// The most of a ClientHello read to choose a chain: Envoy's TLS inspector's default
/// `max_client_hello_size`.
const MAX_HELLO: usize = 64 * 1024;

/// Reads the application's first bytes until they are a whole ClientHello or plainly are
/// not one, within `patience`: the bytes read, and the hello if it is one. A connection
/// that sends nothing in time, or is not TLS, is taken as `raw_buffer` with what it sent
/// (Istio's `continue_on_listener_filters_timeout`); a hello beyond [`MAX_HELLO`] or a
/// connection closed before a verdict is refused, with its metric reason.
async fn read_hello(
    client: &TcpStream,
    patience: Duration,
) -> Result<(bytes::Bytes, Option<client_hello::ClientHello>), &'static str> {
    let mut buf = Vec::with_capacity(2048);
    let read = tokio::time::timeout(patience, client_hello::read(client, &mut buf, MAX_HELLO)).await;
    let hello = match read {
        Ok(Ok(hello)) => Some(hello),
        Ok(Err(client_hello::ReadError::Hello(client_hello::HelloError::TooLarge))) => return Err("oversize_hello"),
        // Not TLS after all: its chain is a plaintext one.
        Ok(Err(client_hello::ReadError::Hello(_))) => None,
        Ok(Err(client_hello::ReadError::Closed | client_hello::ReadError::Io(_))) => {
            return Err("closed_before_hello");
        }
        // Silent for too long: a server-first protocol, taken as plaintext.
        Err(_) => None,
    };
    Ok((bytes::Bytes::from(buf), hello))
}

/// Accepts captured connections until draining starts.
pub async fn serve_captured(listener: TcpListener, captured: Arc<Captured>) {
    let drain = captured.drain.clone();
    drain::accept_until_drained(listener, drain, move |stream| {
        let captured = captured.clone();
        async move { captured.carry(stream).await }
    })
    .await;
}

/// Accepts until draining starts, carrying every connection as one captured to
/// `original`: a benchmark's synthetic mesh (see [`crate::synthetic`]).
pub async fn serve_as_captured_to(listener: TcpListener, captured: Arc<Captured>, original: SocketAddr) {
    let drain = captured.drain.clone();
    drain::accept_until_drained(listener, drain, move |stream| {
        let captured = captured.clone();
        async move {
            let _ = stream.set_nodelay(true);
            captured.carry_to(stream, original).await
        }
    })
    .await;
}

/// Where an HTTP client connection's requests go.
enum Route {
    /// `--outbound LISTEN=TARGET`: always the one upstream.
    Fixed(Arc<Outbound>),
    /// Captured: the cluster of this original destination, looked up per request.
    Captured(Arc<Captured>, SocketAddr),
}

/// The HTTP-aware outbound hop: the application's HTTP in; to mesh endpoints, pooled
/// HTTP/1.1 or HTTP/2 in mTLS, as the request came or its cluster says (Istio's
/// `h2UpgradePolicy`); pooled HTTP/1.1 to the others.
pub struct HttpHop {
    pub h1: Arc<H1Pool>,
    pub h2: Arc<H2Pool>,
    /// The mesh-wide `h2UpgradePolicy: UPGRADE` (the default): HTTP/1.1 requests, too,
    /// ride HTTP/2 to mesh endpoints whose cluster does not say otherwise.
    pub h2_upgrade: bool,
    /// Spreads requests over the lanes of endpoints that stand for several pods.
    next_lane: AtomicU32,
    /// Endpoints outside the mesh.
    pub plain: pool::Plaintext<Outgoing>,
    pub self_id: SpiffeId,
    pub telemetry: Telemetry,
    pub drain: drain::Watch,
    /// Where requests are logged, if anywhere (set before the hop is shared).
    pub access_log: Option<Arc<AccessLog>>,
    /// Where spans go, if anywhere (set before the hop is shared).
    pub otlp: Option<Exporter>,
    /// Our network, which tells a weighted endpoint of our own (a WorkloadEntry's
    /// `weight`) from a gateway standing for several pods (set before the hop is shared).
    pub network: Option<String>,
}

impl HttpHop {
    /// A hop with empty pools.
    pub fn new(
        settings: pool::Settings,
        svid: Arc<SvidSlot>,
        self_id: SpiffeId,
        telemetry: Telemetry,
        drain: drain::Watch,
    ) -> Self {
        Self {
            h1: H1Pool::new(settings, Some(svid.clone()), telemetry.pooled_upstreams.clone()),
            h2: H2Pool::new(settings, Some(svid), telemetry.pooled_upstreams.clone()),
            h2_upgrade: true,
            next_lane: AtomicU32::new(0),
            plain: pool::Plaintext::new(settings),
            self_id,
            telemetry,
            drain,
            access_log: None,
            otlp: None,
            network: None,
        }
    }

    /// Serves one client connection — HTTP/1.1 (keep-alive), or HTTP/2 when it opens with
    /// HTTP/2's preface (h2c with prior knowledge, as gRPC clients speak), as Envoy's codec
    /// `AUTO` does — until it closes or, once draining starts, until its requests in
    /// progress are answered.
    async fn serve(self: Arc<Self>, client: TcpStream, route: Route) {
        let client_ip = client.peer_addr().ok().map(|a| ClientIp(a.ip()));
        let (io, bytes) = Metered::new(client);
        let drain = self.drain.clone();
        let Some((io, h2)) = http::sniff_http2(io, &drain).await else {
            return;
        };
        let io = TokioIo::new(io);
        let route = Arc::new(route);
        // The L4 counters, labelled by the first request's upstream (a connection's requests
        // may reach several endpoints; Istio's sidecars do the same).
        let l4: Arc<OnceLock<TcpCounters>> = Arc::default();
        let hop = self.clone();
        let l4_in = l4.clone();
        let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
            if let Some(ip) = client_ip {
                req.extensions_mut().insert(ip);
            }
            let (hop, route, l4) = (hop.clone(), route.clone(), l4_in.clone());
            // Boxed: `forward`'s state machine is kilobytes, and hyper moves the service's
            // future a few times per request; moving a box is moving a pointer (the copies
            // were two thirds of this side's memcpy under callgrind).
            async move {
                let websocket = http::take_websocket(&mut req);
                let mut resp = Box::pin(hop.forward(&route, req, &l4)).await;
                if let Some(downstream) = websocket {
                    http::join_websocket(downstream, &mut resp, &hop.drain);
                }
                Ok::<_, Infallible>(resp)
            }
        });
        let ended = if h2 {
            let conn = http::h2_server().serve_connection(io, service);
            until_drained(conn, &drain, |c| c.graceful_shutdown()).await
        } else {
            let conn = http::h1_server().serve_connection(io, service).with_upgrades();
            until_drained(conn, &drain, |c| c.graceful_shutdown()).await
        };
        if let Err(e) = ended {
            tracing::debug!(error = %e, "outbound HTTP client connection ended with an error");
        }
        if let Some(counters) = l4.get() {
            let (read, written) = bytes.totals();
            counters.received.inc_by(read);
            counters.sent.inc_by(written);
        }
    }

    async fn forward(
        self: &Arc<Self>,
        route: &Route,
        mut req: Request<Incoming>,
        l4: &OnceLock<TcpCounters>,
    ) -> Response<ReplyBody> {
        let span = crate::trace::hop(req.headers_mut(), self.otlp.is_some());
        let span = self
            .otlp
            .as_ref()
            .zip(span)
            .map(|(o, span)| o.start(span, Kind::Client, &req));
        let protocol = http::request_protocol(req.headers());
        let size = RequestSize::of(&req);
        let log = self.access_log.as_ref().map(|l| l.start(&req));
        match route {
            Route::Fixed(outbound) => {
                let req = match to_h2(req, outbound.upstream.addr) {
                    Some(req) => req.map(Resumed::streamed),
                    None => return http::bad_request("invalid host header\n"),
                };
                let what = Upstream {
                    service: &outbound.service,
                    cluster: None,
                    protocol,
                    size,
                    host: outbound.upstream.addr,
                    log,
                    span,
                };
                // No cluster here to say otherwise: the request's own version, or the upgrade.
                let sent = match UpstreamHttp::Downstream.h2_for(&req, self.h2_upgrade) {
                    true => self.h2.send(&outbound.upstream, &outbound.tls, req, None, ()).await,
                    false => {
                        let tls = &outbound.http1_tls;
                        self.h1.send(&outbound.upstream, tls, req, None, (), None).await
                    }
                };
                match sent {
                    Ok(sent) => self.answer(sent, &what, l4, true),
                    Err(e) => self.failed(e, &what),
                }
            }
            Route::Captured(captured, original) => {
                let observed = Observed {
                    protocol,
                    size,
                    log,
                    span,
                };
                let table = captured.table.load_full();
                if table.http_listener(*original).is_some() {
                    let resp = self
                        .forward_routed(captured, &table, *original, req, &observed, l4)
                        .await;
                    return self.count_local(resp, &table, *original, &observed);
                }
                self.forward_captured(captured, *original, req, observed, l4).await
            }
        }
    }

    /// Captured on a TCP listener with `--protocol http`: the listener's one cluster.
    async fn forward_captured(
        &self,
        captured: &Captured,
        original: SocketAddr,
        req: Request<Incoming>,
        observed: Observed,
        l4: &OnceLock<TcpCounters>,
    ) -> Response<ReplyBody> {
        let table = captured.table.load_full();
        let Some(upstream) = table.route(original) else {
            // The route went away since this connection began.
            self.telemetry.upstream_failure("outbound", "no_route");
            return http::unavailable(CONNECT_FAILURE);
        };
        let req = match to_h2(req, original) {
            Some(req) => req.map(Resumed::streamed),
            None => return http::bad_request("invalid host header\n"),
        };
        let attempt = self.send_to(captured, upstream, req, &[], None, None).await;
        self.deliver(attempt, upstream, &observed, l4)
    }

    /// Sends `req` to one endpoint of `upstream`, avoiding those in `avoid` while another
    /// is left. A request moves on to another endpoint only while no connection could be
    /// made (nothing of it was sent); once it went out, its answer or failure is this
    /// attempt's. `picked` learns each endpoint as it is chosen, so a caller that gives
    /// up on the attempt (its per-try timeout) knows whom to blame.
    async fn send_to(
        &self,
        captured: &Captured,
        upstream: &destinations::Upstream,
        mut req: Request<Outgoing>,
        avoid: &[usize],
        hash: Option<u64>,
        picked: Option<&AtomicUsize>,
    ) -> Attempt {
        let mut tried: Vec<usize> = Vec::new();
        let level = upstream.level();
        while tried.len() < CONNECT_ATTEMPTS.min(upstream.endpoints.len()) {
            // Outliers are left out, and endpoints an earlier attempt used while others
            // remain; the request's priority level while it has endpoints left.
            let fresh = |i: usize| !tried.contains(&i) && upstream.usable(i);
            let in_level = |i: usize| level.is_none_or(|p| upstream.endpoints[i].priority == p);
            let Some(i) = upstream
                .balancer
                .pick_for(hash, |i| fresh(i) && in_level(i) && !avoid.contains(&i))
                .or_else(|| upstream.balancer.pick_for(hash, |i| fresh(i) && in_level(i)))
                .or_else(|| upstream.balancer.pick_for(hash, fresh))
            else {
                break;
            };
            tried.push(i);
            if let Some(p) = picked {
                p.store(i, Ordering::Relaxed);
            }
            let endpoint = &upstream.endpoints[i];
            let _active = upstream.balancer.open(i);
            let secured = match (&upstream.origination, upstream.tls.as_ref().filter(|_| endpoint.mtls)) {
                (Some(own), _) => Some(Secured::Own(own)),
                (None, Some(mesh)) => Some(Secured::Mesh(mesh)),
                (None, None) => None,
            };
            let Some(secured) = secured else {
                // Outside the mesh the cluster's own protocol holds (an `http2` or `grpc`
                // port's is HTTP/2); the mesh-wide upgrade is for the hop between sidecars.
                let http2 = upstream.http == UpstreamHttp::Http2;
                let result = self.plain.request(req, endpoint.address, http2).await;
                upstream.record(
                    i,
                    result
                        .as_ref()
                        .map_or(Reply::NoAnswer, |r| Reply::Status(r.response.status())),
                );
                return Attempt {
                    endpoint: Some(i),
                    result: result.map(Answered::Plain).map_err(Unanswered::Plain),
                };
            };
            let sni = match secured {
                Secured::Own(own) => Ok(own.sni.clone()),
                Secured::Mesh(mesh) => ServerName::try_from(endpoint.sni(mesh)),
            };
            let Ok(sni) = sni else {
                self.telemetry.upstream_failure("outbound", "bad_sni");
                return Attempt {
                    endpoint: Some(i),
                    result: Err(Unanswered::Unreachable),
                };
            };
            // Through an east-west gateway (a pod pinned behind it, or several pods it
            // stands for) the link is another network's, often a WAN: HTTP/1.1 would need
            // a TCP and a TLS handshake over it for every request in flight beyond the
            // connections open, where multiplexed HTTP/2 carries a burst on the one open
            // already (the lab's latency drill: over HTTP/1.1 a slowed network's requests
            // waited on handshakes past their per-try timeout, and it was ejected).
            let gateway = endpoint.through_gateway(self.network.as_deref());
            let h2 = match secured {
                // Outside the mesh the cluster's own protocol holds, as in plaintext.
                Secured::Own(_) => upstream.http == UpstreamHttp::Http2,
                Secured::Mesh(_) => upstream.http.h2_for(&req, self.h2_upgrade || gateway),
            };
            // A pinned endpoint is one pod, whatever its weight: its pinned SNI is its own
            // pool key, and one connection reaches all of it. HTTP/1.1 has a connection
            // per request in flight already: one stack of them.
            let lanes = match endpoint.pinned {
                Some(_) => 1,
                None if !h2 => 1,
                None => pool::lanes_for(endpoint.weight),
            };
            let key = Key {
                addr: endpoint.address,
                sni,
                identities: match secured {
                    Secured::Own(_) => Vec::new(),
                    Secured::Mesh(mesh) => mesh.identities.clone(),
                },
                trust: match secured {
                    Secured::Own(own) => own.fingerprint,
                    Secured::Mesh(_) => 0,
                },
                lane: self.next_lane.fetch_add(1, Ordering::Relaxed) % lanes,
            };
            // Several pods behind one endpoint: a gateway. Fresh connections now and then
            // let it spread this caller over them.
            let max_requests = [
                (lanes > 1).then_some(pool::REQUESTS_PER_GATEWAY_CONNECTION),
                upstream.max_requests_per_connection,
            ]
            .into_iter()
            .flatten()
            .min();
            let ready = match h2 {
                true => self.h2.ready(&key),
                false => self.h1.ready(&key),
            };
            // A limit of the cluster's: another endpoint would not do better.
            let overflow = |reason| {
                self.telemetry.upstream_failure("outbound", reason);
                Attempt {
                    endpoint: Some(i),
                    result: Err(Unanswered::Overflow),
                }
            };
            let pending = match ready {
                true => None,
                false => match upstream.breaker.pending() {
                    Some(place) => Some(place),
                    None => return overflow("upstream_rq_pending_overflow"),
                },
            };
            let config = |alpn| match secured {
                Secured::Own(own) if alpn == Alpn::H2 => own.h2.clone(),
                Secured::Own(own) => own.http11.clone(),
                Secured::Mesh(mesh) => captured.config_for(&mesh.identities, alpn),
            };
            let sent = match h2 {
                true => {
                    let config = config(Alpn::H2);
                    self.h2.send(&key, &config, req, max_requests, pending).await
                }
                false => {
                    let config = config(Alpn::Http11);
                    let limit = ConnectionLimit {
                        breaker: &upstream.breaker,
                        overflowed: &|| self.telemetry.upstream_failure("outbound", "upstream_cx_overflow"),
                    };
                    self.h1
                        .send(&key, &config, req, max_requests, pending, Some(limit))
                        .await
                }
            };
            match sent {
                Ok(sent) => {
                    upstream.record(i, Reply::Status(sent.response.status()));
                    let mesh = matches!(secured, Secured::Mesh(_));
                    let answered = Answered::Pooled { sent, mesh };
                    return Attempt {
                        endpoint: Some(i),
                        result: Ok(answered),
                    };
                }
                Err(SendError::Overflow(_)) => return overflow(ConnectionOverflow::Timeout.reason()),
                Err(SendError::Connect(e, unsent)) => {
                    tracing::debug!(error = %e, "endpoint unreachable; trying another");
                    self.telemetry.upstream_failure("outbound", e.reason());
                    upstream.record(i, Reply::NoAnswer);
                    req = *unsent;
                }
                Err(e) => {
                    upstream.record(i, Reply::NoAnswer);
                    return Attempt {
                        endpoint: Some(i),
                        result: Err(Unanswered::Mesh(e)),
                    };
                }
            }
        }
        if upstream.endpoints.is_empty() {
            self.telemetry.upstream_failure("outbound", "no_healthy_upstream");
        }
        Attempt {
            endpoint: tried.last().copied(),
            result: Err(Unanswered::Unreachable),
        }
    }

    /// The client's answer for an attempt, counted.
    fn deliver(
        &self,
        attempt: Attempt,
        upstream: &destinations::Upstream,
        observed: &Observed,
        l4: &OnceLock<TcpCounters>,
    ) -> Response<ReplyBody> {
        let endpoint = attempt.endpoint.map(|i| &upstream.endpoints[i]);
        let what = Upstream {
            service: &upstream.service,
            cluster: endpoint.and_then(|e| e.cluster.as_deref()),
            protocol: observed.protocol,
            size: observed.size,
            host: endpoint.map_or(SocketAddr::from(([0, 0, 0, 0], 0)), |e| e.address),
            log: observed.log.clone(),
            span: observed.span.clone(),
        };
        let plain_labels = ConnectionLabels {
            reporter: "source",
            source_principal: self.self_id.as_str(),
            destination_principal: "unknown",
            destination_service: what.service,
            peer_cluster: what.cluster,
            mutual_tls: false,
        };
        match attempt.result {
            Ok(Answered::Pooled { sent, mesh }) => self.answer(sent, &what, l4, mesh),
            Err(Unanswered::Mesh(e)) => self.failed(e, &what),
            Ok(Answered::Plain(answer)) => {
                l4.get_or_init(|| self.telemetry.connection(&plain_labels));
                let exchange = self.count(plain_labels, &what, answer.response.status().as_u16(), "-");
                let (mut parts, body) = answer.response.into_parts();
                http::strip_hop_by_hop(&mut parts.headers);
                Response::from_parts(parts, Either::Left(Leased::new(body, answer.lease).measured(exchange)))
            }
            Err(Unanswered::Plain(e)) => {
                let reason = e.reason();
                tracing::debug!(service = what.service, error = %e, "plaintext upstream failed");
                self.telemetry.upstream_failure("outbound", reason);
                let exchange = self.count(plain_labels, &what, 503, http::failure_flags(&e));
                http::recorded(exchange, http::unavailable_after(&e))
            }
            Err(Unanswered::Unreachable) => http::unavailable(CONNECT_FAILURE),
            Err(Unanswered::Overflow) => router::overflow(),
        }
    }

    /// The answer of a pooled connection: in the mesh's mTLS when `mesh`, else in TLS of
    /// our own to a server outside it.
    fn answer(&self, sent: Sent, what: &Upstream<'_>, l4: &OnceLock<TcpCounters>, mesh: bool) -> Response<ReplyBody> {
        let Sent { response, peer, lease } = sent;
        let labels = ConnectionLabels {
            reporter: "source",
            source_principal: self.self_id.as_str(),
            destination_principal: if mesh { &peer } else { "unknown" },
            destination_service: what.service,
            peer_cluster: what.cluster,
            mutual_tls: mesh,
        };
        l4.get_or_init(|| self.telemetry.connection(&labels));
        let exchange = self.count(labels, what, response.status().as_u16(), "-");
        let (mut parts, body) = response.into_parts();
        // An HTTP/1.1 upstream's own framing and connection headers stay with its hop.
        http::strip_hop_by_hop(&mut parts.headers);
        parts.version = Version::HTTP_11;
        Response::from_parts(parts, Either::Left(Leased::new(body, lease).measured(exchange)))
    }

    fn failed(&self, e: SendError, what: &Upstream<'_>) -> Response<ReplyBody> {
        let (reason, text, flags) = match &e {
            SendError::Connect(e, _) => (e.reason(), CONNECT_FAILURE, "UF"),
            SendError::Overflow(_) => (ConnectionOverflow::Timeout.reason(), router::OVERFLOW, "UO"),
            SendError::Reset(_) => ("reset", CONNECTION_TERMINATION, "UC"),
        };
        tracing::debug!(service = what.service, error = %e, "upstream failed before headers");
        self.telemetry.upstream_failure("outbound", reason);
        let labels = ConnectionLabels {
            reporter: "source",
            source_principal: self.self_id.as_str(),
            destination_principal: "unknown",
            destination_service: what.service,
            peer_cluster: what.cluster,
            mutual_tls: false,
        };
        http::recorded(self.count(labels, what, 503, flags), http::unavailable(text))
    }

    /// Counts the request and sets up its access log line (`flags`: Envoy's response flags).
    fn count(&self, connection: ConnectionLabels<'_>, what: &Upstream<'_>, code: u16, flags: &'static str) -> Exchange {
        let labels = RequestLabels {
            connection,
            protocol: what.protocol,
        };
        let log = what.log.clone().map(|l| l.answered(code, flags, Some(what.host)));
        let span = what.span.clone().map(|s| s.answered(code));
        self.telemetry
            .request(&labels, code, what.size)
            .logged(log)
            .traced(span)
    }
}

/// Runs a served connection; once draining starts, lets its requests in progress finish.
async fn until_drained<C>(conn: C, drain: &drain::Watch, shutdown: impl FnOnce(Pin<&mut C>)) -> hyper::Result<()>
where
    C: Future<Output = hyper::Result<()>>,
{
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        ended = conn.as_mut() => ended,
        () = drain.signaled() => {
            shutdown(conn.as_mut());
            conn.await
        }
    }
}

/// The client's address, carried with each of its requests for hash policies on it.
#[derive(Debug, Clone, Copy)]
struct ClientIp(std::net::IpAddr);

/// One attempt at one endpoint, not yet counted.
struct Attempt {
    /// The endpoint it went to (the last one tried, when none could be reached).
    endpoint: Option<usize>,
    result: Result<Answered, Unanswered>,
}

/// Response headers from upstream.
enum Answered {
    /// Over a pooled connection: in mutual TLS when `mesh`, else in TLS this sidecar
    /// originated (DestinationRule SIMPLE or MUTUAL).
    Pooled { sent: Sent, mesh: bool },
    /// From an endpoint outside the mesh.
    Plain(pool::PlainAnswer),
}

/// How a request to an endpoint is secured, when it is.
#[derive(Clone, Copy)]
enum Secured<'a> {
    /// The mesh's mTLS, to the identities the cluster names.
    Mesh(&'a destinations::MeshTls),
    /// TLS of the cluster's own.
    Own(&'a tls::origination::Origination),
}

/// Why an attempt got no response headers.
enum Unanswered {
    /// No endpoint could be connected to, or there is none: nothing was sent.
    Unreachable,
    /// The circuit breaker turned it away (`max_pending_requests`, or no connection under
    /// `max_connections` in time): nothing was sent.
    Overflow,
    Mesh(SendError),
    Plain(pool::PlainError),
}

/// What is recorded of a request whatever its upstream: metric labels and size, its access
/// log line and its span.
struct Observed {
    protocol: &'static str,
    size: RequestSize,
    log: Option<Pending>,
    span: Option<Started>,
}

/// What a request is going to, for its labels.
struct Upstream<'a> {
    service: &'a str,
    cluster: Option<&'a str>,
    protocol: &'static str,
    size: RequestSize,
    /// The endpoint's address (`%UPSTREAM_HOST%`).
    host: SocketAddr,
    log: Option<Pending>,
    span: Option<Started>,
}

/// A client's request in the form the mesh pools send by: `host` becomes the URI's
/// authority (HTTP/2's `:authority`, and `host` again if it goes as HTTP/1.1), and the
/// hop-by-hop headers (which HTTP/2 forbids) stay behind; its version stays the client's,
/// which chooses the protocol between sidecars when its cluster does not. A request with
/// neither `host` nor an absolute URI (HTTP/1.0) is sent to `fallback`'s address as
/// authority; one whose `host` is not an authority cannot be carried (None).
fn to_h2<B>(req: Request<B>, fallback: SocketAddr) -> Option<Request<B>> {
    let (mut parts, body) = req.into_parts();
    let authority = match parts.headers.get(HOST) {
        Some(host) => Authority::try_from(host.as_bytes()).ok(),
        None => parts.uri.authority().cloned(),
    };
    let authority = match authority {
        Some(a) => a,
        None if !parts.headers.contains_key(HOST) => {
            Authority::try_from(fallback.to_string()).expect("an address is an authority")
        }
        None => return None,
    };
    http::strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(HOST);
    parts.uri = http::absolute(&parts.uri, authority);
    Some(Request::from_parts(parts, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_becomes_the_authority_and_hop_by_hop_headers_stay_behind() {
        let req = Request::builder()
            .uri("/reviews/1?x=y")
            .header(HOST, "reviews:9080")
            .header("connection", "keep-alive, x-hop")
            .header("x-hop", "1")
            .header("keep-alive", "timeout=5")
            .header("te", "trailers")
            .header("x-end-to-end", "kept")
            .body(())
            .unwrap();
        let fallback: SocketAddr = "10.0.0.7:15006".parse().unwrap();
        let h2 = to_h2(req, fallback).unwrap();
        assert_eq!(h2.uri().to_string(), "http://reviews:9080/reviews/1?x=y");
        assert_eq!(h2.version(), Version::HTTP_11, "the client's version is kept");
        let names: Vec<&str> = h2.headers().keys().map(|n| n.as_str()).collect();
        assert_eq!(names, ["te", "x-end-to-end"]);

        // HTTP/1.0 without a host: the upstream's address stands in.
        let bare = Request::builder().uri("/").body(()).unwrap();
        assert_eq!(
            to_h2(bare, fallback).unwrap().uri().to_string(),
            "http://10.0.0.7:15006/"
        );
        // A host that is not an authority cannot be carried.
        let bad = Request::builder().uri("/").header(HOST, "a b").body(()).unwrap();
        assert!(to_h2(bad, fallback).is_none());
    }
}
