//! The outbound side: takes the application's plaintext connection and carries it to the
//! upstream inside mutual TLS, presenting our SVID and accepting only the identity the
//! upstream is supposed to have.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mesh_vocab::spiffe::SpiffeId;
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};

use crate::drain;
use crate::telemetry::{ConnectionLabels, Telemetry};
use crate::tls;

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
    async fn carry(&self, mut client: TcpStream) {
        let _ = client.set_nodelay(true);
        let upstream = match tokio::time::timeout(self.connect_timeout, TcpStream::connect(self.upstream)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::debug!(upstream = %self.upstream, error = %e, "upstream connect failed");
                return self.telemetry.upstream_failure("outbound", "connect_failure");
            }
            Err(_) => return self.telemetry.upstream_failure("outbound", "connect_timeout"),
        };
        let _ = upstream.set_nodelay(true);
        let connector = tokio_rustls::TlsConnector::from(self.tls.clone());
        let handshake = connector.connect(self.sni.clone(), upstream);
        let mut tls = match tokio::time::timeout(self.handshake_timeout, handshake).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                let reason = tls::refusal_in(&e).map_or("tls_handshake", |r| r.reason());
                tracing::info!(upstream = %self.upstream, error = %e, "upstream TLS refused");
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
            destination_service: &self.service,
            mutual_tls: true,
        });
        if let Ok((up, down)) = tokio::io::copy_bidirectional(&mut client, &mut tls).await {
            counters.received.inc_by(up);
            counters.sent.inc_by(down);
        }
    }
}
