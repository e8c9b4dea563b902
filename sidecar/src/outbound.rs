//! The outbound side: takes the application's plaintext connection and carries it to the
//! upstream inside mutual TLS, presenting our SVID and accepting only the identity the
//! upstream is supposed to have.
//!
//! Two ways in: [`Outbound`], one explicit route (a listener, a target), and [`Captured`],
//! connections redirected by iptables and routed by their original destination through the
//! table the controller sent ([`Destinations`]). A destination the table does not know is
//! passed through untouched, as Istio's `PassthroughCluster` does.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use mesh_vocab::spiffe::SpiffeId;
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};

use crate::capture;
use crate::destinations::Destinations;
use crate::drain;
use crate::telemetry::{ConnectionLabels, Telemetry};
use crate::tls::{self, Alpn, ExpectedPeer, SvidSlot, TrustBundles};

/// One explicit outbound route: everything accepted goes to `upstream`.
pub struct Outbound {
    /// The server side's address (its sidecar inbound, or an east-west gateway).
    pub upstream: SocketAddr,
    /// SNI sent upstream: Istio's `outbound_.PORT_.SUBSET_.HOST`, which a gateway routes by.
    pub sni: ServerName<'static>,
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
    async fn carry(&self, client: TcpStream) {
        let _ = client.set_nodelay(true);
        let Some(upstream) = connect(self.upstream, None, self.connect_timeout, &self.telemetry).await else {
            return;
        };
        let hop = Hop {
            self_id: &self.self_id,
            service: &self.service,
            cluster: None,
            handshake_timeout: self.handshake_timeout,
            telemetry: &self.telemetry,
        };
        hop.mtls(client, upstream, self.sni.clone(), self.tls.clone()).await;
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
    async fn mtls(&self, mut client: TcpStream, upstream: TcpStream, sni: ServerName<'static>, tls: Arc<ClientConfig>) {
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
        let peer = tls::proven_identity(tls.get_ref().1.peer_certificates());
        let peer = peer.as_ref().map_or("unknown", SpiffeId::as_str);
        let counters = self.telemetry.connection(&ConnectionLabels {
            reporter: "source",
            source_principal: self.self_id.as_str(),
            destination_principal: peer,
            destination_service: self.service,
            peer_cluster: self.cluster,
            mutual_tls: true,
        });
        if let Ok((up, down)) = tokio::io::copy_bidirectional(&mut client, &mut tls).await {
            counters.received.inc_by(up);
            counters.sent.inc_by(down);
        }
    }

    /// Moves bytes both ways in plaintext (an endpoint outside the mesh, or passthrough).
    async fn plain(&self, mut client: TcpStream, mut upstream: TcpStream) {
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
    /// One client configuration per set of expected server identities, built once.
    configs: Mutex<HashMap<Vec<SpiffeId>, Arc<ClientConfig>>>,
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
        }
    }

    fn config_for(&self, identities: &[SpiffeId]) -> Arc<ClientConfig> {
        let mut configs = self.configs.lock().expect("config cache poisoned");
        configs
            .entry(identities.to_vec())
            .or_insert_with(|| {
                let expected = if identities.is_empty() {
                    ExpectedPeer::Any
                } else {
                    ExpectedPeer::OneOf(identities.to_vec())
                };
                tls::client_config(self.svid.clone(), self.bundles.clone(), expected, self.alpn)
            })
            .clone()
    }

    async fn carry(&self, client: TcpStream) {
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
        let table = self.table.load_full();
        let Some(upstream) = table.route(original) else {
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
            return;
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
            match (&upstream.tls, endpoint.mtls) {
                (Some(mesh), true) => {
                    let Ok(sni) = ServerName::try_from(mesh.sni.clone()) else {
                        return self.telemetry.upstream_failure("outbound", "bad_sni");
                    };
                    hop.mtls(client, stream, sni, self.config_for(&mesh.identities)).await;
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

/// Accepts captured connections until draining starts.
pub async fn serve_captured(listener: TcpListener, captured: Arc<Captured>) {
    let drain = captured.drain.clone();
    drain::accept_until_drained(listener, drain, move |stream| {
        let captured = captured.clone();
        async move { captured.carry(stream).await }
    })
    .await;
}
