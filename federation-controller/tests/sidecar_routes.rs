//! A Gateway API HTTPRoute on a Service, a VirtualService `tcp` route, and ServiceEntry
//! (STATIC and DNS) and WorkloadEntry endpoints, end to end: the real controller reads them from its
//! manifests and serves xDS; a real sidecar
//! routing table (the sidecar's own xDS client and captured outbound path, as
//! `sidecar run --capture` wires them) follows it, and connections handed to it as
//! captured ones to the services' VIPs reach real servers on loopback as the routes say.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use sidecar::destinations::Destinations;
use sidecar::outbound::{Captured, HttpHop};
use sidecar::tls::{Alpn, Svid, SvidSlot, TrustBundles};
use support::{Controller, scratch, until_true};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const REVIEWS_VIP: &str = "10.96.1.12:9080";
const DB_VIP: &str = "10.96.1.20:5432";

/// An HTTP/1.1 server answering every request with its `name`.
async fn http_backend(addr: &str, name: &'static str) -> SocketAddr {
    let listener = TcpListener::bind(addr).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                serve_name(stream, name).await;
            });
        }
    });
    addr
}

/// Serves HTTP/1.1 on `stream`, answering every request with `name`.
async fn serve_name<S>(stream: S, name: &'static str)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |_req: hyper::Request<hyper::body::Incoming>| async move {
        Ok::<_, std::convert::Infallible>(hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from(
            name,
        ))))
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
        .await;
}

/// A TCP server that, once the client has spoken, writes its `name` and closes. Client
/// first: db's port also has a TLS route, so its chain is chosen by what the client sends
/// first (a server-first protocol would wait for the hello until the timeout, in Envoy too).
async fn tcp_backend(addr: SocketAddr, name: &'static str) -> SocketAddr {
    let listener = TcpListener::bind(addr).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut hello = [0u8; 1];
                if stream.read(&mut hello).await.unwrap_or(0) == 0 {
                    return;
                }
                let _ = stream.write_all(name.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    addr
}

/// A sidecar's captured outbound path following `xds`; returns its table and one
/// address per VIP whose connections it takes as captured ones to that VIP.
async fn sidecar(xds: SocketAddr, vips: &[SocketAddr]) -> (Arc<ArcSwap<Destinations>>, Vec<SocketAddr>) {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::default();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let mut leaf = rcgen::CertificateParams::default();
    leaf.subject_alt_names = vec![rcgen::SanType::URI(
        "spiffe://cluster.local/ns/default/sa/productpage".try_into().unwrap(),
    )];
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    let svid = Svid::from_pem(cert.pem().as_bytes(), key.serialize_pem().as_bytes(), "test SVID").unwrap();
    let self_id = svid.id().clone();
    let svid = SvidSlot::new(svid);
    let telemetry = sidecar::telemetry::Telemetry::for_cluster("cluster1");
    let (trigger, watch) = sidecar::drain::channel();
    std::mem::forget(trigger);
    let settings = sidecar::pool::Settings {
        connect_timeout: Duration::from_secs(10),
        handshake_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(30),
        mark: None,
    };
    let hop = Arc::new(HttpHop::new(
        settings,
        svid.clone(),
        self_id.clone(),
        telemetry.clone(),
        watch.clone(),
    ));
    let table = Arc::new(ArcSwap::from_pointee(Destinations::default()));
    let bundles = TrustBundles::new();
    bundles.set(
        "cluster.local",
        sidecar::tls::bundle::Bundle::from_pem("cluster.local", ca_cert.pem().as_bytes()).unwrap(),
    );
    let mut entries = Vec::new();
    for vip in vips {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let entry = listener.local_addr().unwrap();
        entries.push(entry);
        let captured = Arc::new(Captured::new(
            table.clone(),
            svid.clone(),
            bundles.clone(),
            Alpn::Tcp,
            None,
            entry,
            self_id.clone(),
            Duration::from_secs(2),
            Duration::from_secs(2),
            telemetry.clone(),
            watch.clone(),
            hop.clone(),
            false,
        ));
        let vip = *vip;
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(captured.clone().carry_to(stream, vip));
            }
        });
    }
    let identity = sidecar::xds::Identity {
        id: self_id,
        ip: "10.241.0.20".parse().unwrap(),
        network: "network1".into(),
        cluster: "cluster1".into(),
        labels: vec![("app".into(), "productpage".into())],
        locality: None,
    };
    tokio::spawn(sidecar::xds::follow(
        format!("http://{xds}"),
        identity,
        table.clone(),
        None,
        |_, _| {},
    ));
    (table, entries)
}

/// Writes cluster1's `entries.yaml`: the `default` namespace on network1, then `objects`.
fn entries_in_cluster1(dir: &std::path::Path, objects: &str) {
    let c1 = dir.join("cluster1");
    std::fs::create_dir_all(&c1).unwrap();
    let namespace = "apiVersion: v1\nkind: Namespace\n\
                     metadata: {name: default, labels: {topology.istio.io/network: network1}}\n---\n";
    support::write(c1.join("entries.yaml"), format!("{namespace}{objects}")).unwrap();
}

fn addrs(text: &[&str]) -> Vec<SocketAddr> {
    text.iter().map(|a| a.parse().unwrap()).collect()
}

/// Waits until the sidecar's table has the route configurations `routes` and endpoints in
/// each of `clusters`.
async fn until_served(table: &ArcSwap<Destinations>, routes: &[&str], clusters: &[&str]) {
    until_true(
        "the sidecar has the routes and every endpoint",
        Duration::from_secs(30),
        || {
            let t = table.load();
            routes.iter().all(|r| t.routes.contains_key(*r))
                && clusters
                    .iter()
                    .all(|c| t.upstreams.get(*c).is_some_and(|u| !u.endpoints.is_empty()))
        },
    )
    .await;
}

/// One GET of /reviews/1 to `entry` (captured to reviews' VIP): status and body.
async fn get(entry: SocketAddr, headers: &[(&str, &str)]) -> String {
    get_path(entry, "/reviews/1", headers).await
}

/// One GET of `path` to `entry` (captured to reviews' VIP): status and body.
async fn get_path(entry: SocketAddr, path: &str, headers: &[(&str, &str)]) -> String {
    get_from(entry, "reviews:9080", path, headers).await
}

/// One GET of `path` with `Host: host` to `entry`: status and body.
async fn get_from(entry: SocketAddr, host: &str, path: &str, headers: &[(&str, &str)]) -> String {
    let mut s = TcpStream::connect(entry).await.unwrap();
    let extra: String = headers.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut text = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut text))
        .await
        .expect("an answer in time")
        .unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    format!("{} {body}", head.get(9..12).unwrap_or("---"))
}

/// One connection to `entry` (captured to db's VIP): what the server said to a greeting.
async fn connect(entry: SocketAddr) -> String {
    let mut s = TcpStream::connect(entry).await.unwrap();
    s.write_all(b"hi\n").await.unwrap();
    let mut text = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut text))
        .await
        .expect("an answer in time")
        .unwrap();
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_httproute_splits_90_10_with_a_header_match_and_a_tcp_route_splits_connections_80_20() {
    let dir = scratch("sidecar-routes");
    let (v1, v2) = (
        http_backend("127.0.0.2:0", "v1").await,
        http_backend("127.0.0.3:0", "v2").await,
    );
    let db1 = tcp_backend("127.0.0.4:0".parse().unwrap(), "db-v1").await;
    let db2 = tcp_backend(SocketAddr::new([127, 0, 0, 5].into(), db1.port()), "db-v2").await;
    support::gamma_cluster(&dir, v1, v2, db1, db2);
    let controller = Controller::serve(&dir);

    let vips: Vec<SocketAddr> = [REVIEWS_VIP, DB_VIP].iter().map(|v| v.parse().unwrap()).collect();
    let (table, entries) = sidecar(controller.xds, &vips).await;
    let subset = |s: &str| format!("outbound|5432|{s}|db.default.svc.cluster.local");
    until_served(
        &table,
        &["reviews.default.svc.cluster.local:9080"],
        &[
            "outbound|9080||reviews-v1.default.svc.cluster.local",
            "outbound|9080||reviews-v2.default.svc.cluster.local",
            &subset("v1"),
            &subset("v2"),
        ],
    )
    .await;
    let plaintext = sidecar::filter_chain::Seen {
        destination: vips[1],
        hello: None,
    };
    let split = table.load().hello_listeners[&vips[1]]
        .clusters(plaintext)
        .unwrap()
        .clone();
    assert_eq!(split.weights(), [(subset("v1"), 80), (subset("v2"), 20)]);

    let n = 1_000;
    let mut counts: HashMap<String, usize> = HashMap::new();
    for _ in 0..n {
        *counts.entry(get(entries[0], &[]).await).or_default() += 1;
    }
    let to_v1 = counts.get("200 v1").copied().unwrap_or(0);
    assert_eq!(to_v1 + counts.get("200 v2").copied().unwrap_or(0), n, "{counts:?}");
    // 90 % of 1,000 is 900, σ ≈ 9.5: six σ either side.
    assert!((843..=957).contains(&to_v1), "{counts:?}");
    for _ in 0..50 {
        assert_eq!(
            get(entries[0], &[("End-User", "jason")]).await,
            "200 v2",
            "jason always sees v2"
        );
    }

    let mut counts: HashMap<String, usize> = HashMap::new();
    for _ in 0..n {
        *counts.entry(connect(entries[1]).await).or_default() += 1;
    }
    let to_v1 = counts.get("db-v1").copied().unwrap_or(0);
    assert_eq!(to_v1 + counts.get("db-v2").copied().unwrap_or(0), n, "{counts:?}");
    // 80 % of 1,000 is 800, σ ≈ 12.6: six σ either side.
    assert!((724..=876).contains(&to_v1), "{counts:?}");
    drop(controller);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_entry_endpoints_and_selected_workload_entries_are_reached_at_the_entries_vips() {
    let dir = scratch("sidecar-service-entries");
    let api = http_backend("127.0.0.6:0", "api").await;
    let vm = tcp_backend("127.0.0.7:0".parse().unwrap(), "vm").await;
    entries_in_cluster1(
        &dir,
        &format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: api, namespace: default}}\n\
             spec: {{hosts: [api.example.com], addresses: [240.0.0.1], ports: [{{number: 80, name: http, protocol: HTTP}}],\n\
             \x20 resolution: STATIC, endpoints: [{{address: {api_ip}, ports: {{http: {api_port}}}}}]}}\n---\n\
             apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: vm, namespace: default}}\n\
             spec: {{hosts: [vm], addresses: [240.0.0.2], ports: [{{number: 9000, name: tcp, protocol: TCP}}],\n\
             \x20 resolution: STATIC, workloadSelector: {{labels: {{app: vm}}}}}}\n---\n\
             apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: vm-1, namespace: default}}\n\
             spec: {{address: {vm_ip}, ports: {{tcp: {vm_port}}}, labels: {{app: vm}}}}\n",
            api_ip = api.ip(),
            api_port = api.port(),
            vm_ip = vm.ip(),
            vm_port = vm.port(),
        ),
    );
    let controller = Controller::serve(&dir);
    let vips = addrs(&["240.0.0.1:80", "240.0.0.2:9000"]);
    let (table, entries) = sidecar(controller.xds, &vips).await;
    until_served(
        &table,
        &["api.example.com:80"],
        &[
            "outbound|80||api.example.com",
            "outbound|9000||vm.default.svc.cluster.local",
        ],
    )
    .await;
    for _ in 0..5 {
        let (mut s, mut text) = (TcpStream::connect(entries[0]).await.unwrap(), String::new());
        s.write_all(b"GET / HTTP/1.1\r\nHost: api.example.com\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut text))
            .await
            .expect("an answer in time")
            .unwrap();
        assert!(text.starts_with("HTTP/1.1 200") && text.ends_with("api"), "{text}");
        assert_eq!(connect(entries[1]).await, "vm");
    }
    drop(controller);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unresolved_backend_answers_500_and_a_reference_grant_lets_a_route_reach_another_namespace() {
    let dir = scratch("sidecar-reference-grant");
    let v1 = http_backend("127.0.0.2:0", "v1").await;
    let ratings = http_backend("127.0.0.3:0", "ratings").await;
    support::grant_cluster(&dir, v1, ratings);
    let controller = Controller::serve(&dir);
    let vip: SocketAddr = REVIEWS_VIP.parse().unwrap();
    let (table, entries) = sidecar(controller.xds, &[vip]).await;
    until_served(
        &table,
        &["reviews.default.svc.cluster.local:9080"],
        &[
            "outbound|9080||reviews-v1.default.svc.cluster.local",
            "outbound|9080||ratings.ratings.svc.cluster.local",
        ],
    )
    .await;
    assert_eq!(get(entries[0], &[]).await, "200 v1");
    // The grants there are do not let default's routes reach ratings: 500, as the spec says.
    for _ in 0..10 {
        assert_eq!(get_path(entries[0], "/ratings/1", &[]).await, "500 ");
    }
    // Half the weight names a Service that does not exist: its share is the route's 500.
    let n = 400;
    let mut counts: HashMap<String, usize> = HashMap::new();
    for _ in 0..n {
        *counts.entry(get_path(entries[0], "/half", &[]).await).or_default() += 1;
    }
    let failed = counts.get("500 ").copied().unwrap_or(0);
    assert_eq!(failed + counts.get("200 v1").copied().unwrap_or(0), n, "{counts:?}");
    // 50 % of 400 is 200, σ = 10: six σ either side.
    assert!((140..=260).contains(&failed), "{counts:?}");

    // ratings' owner grants it: the same route now reaches the other namespace's Service.
    support::write(dir.join("cluster1").join("grant.yaml"), support::ratings_grant()).unwrap();
    until_true("the granted backend answers", Duration::from_secs(30), || {
        let t = table.load();
        let Some(routes) = t.routes.get("reviews.default.svc.cluster.local:9080") else {
            return false;
        };
        format!("{routes:?}").contains("outbound|9080||ratings.ratings.svc.cluster.local")
    })
    .await;
    for _ in 0..10 {
        assert_eq!(get_path(entries[0], "/ratings/1", &[]).await, "200 ratings");
    }
    drop(controller);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The application's own CA: its TLS is its business, which the sidecar passes through.
struct AppTls {
    root: rustls_pki_types::CertificateDer<'static>,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl AppTls {
    fn new() -> Self {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let mut ca = rcgen::CertificateParams::default();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let key = rcgen::KeyPair::generate().unwrap();
        let root = ca.self_signed(&key).unwrap().der().clone();
        Self {
            root,
            issuer: rcgen::Issuer::new(ca, key),
        }
    }

    /// A TLS server on `addr` with a certificate for `name` only, saying `answer` to each client.
    async fn serve(&self, addr: &str, name: &str, answer: &'static str) -> SocketAddr {
        let key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec![name.to_owned()]).unwrap();
        let cert = leaf.signed_by(&key, &self.issuer).unwrap().der().clone();
        let key = rustls_pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap();
        let config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(stream).await else {
                        return;
                    };
                    let _ = tls.write_all(answer.as_bytes()).await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        addr
    }

    /// TLS to `entry` for `name`, the server's certificate checked for that name against
    /// this CA: what the server said, or why the client gave up.
    async fn open(&self, entry: SocketAddr, name: &str) -> Result<String, String> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.root.clone()).unwrap();
        let config = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let server_name = rustls_pki_types::ServerName::try_from(name.to_owned()).unwrap();
        let exchange = async {
            let stream = TcpStream::connect(entry).await?;
            let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect(server_name, stream)
                .await?;
            let mut text = String::new();
            tls.read_to_string(&mut text).await?;
            Ok::<_, std::io::Error>(text)
        };
        match tokio::time::timeout(Duration::from_secs(10), exchange).await {
            Ok(answer) => answer.map_err(|e| e.to_string()),
            Err(_) => Err("no answer in time".into()),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_route_sends_the_applications_own_tls_to_a_backend_per_sni() {
    let dir = scratch("sidecar-tls-routes");
    let app = AppTls::new();
    let a = app.serve("127.0.0.8:0", "a.example.com", "a").await;
    let b = app.serve("127.0.0.9:0", "b.example.com", "b").await;
    let front = tcp_backend("127.0.0.10:0".parse().unwrap(), "front").await;
    let entry = |name: &str, addr: SocketAddr, vip: &str| {
        let addresses = if vip.is_empty() {
            String::new()
        } else {
            format!("addresses: [{vip}], ")
        };
        format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {name}, namespace: default}}\n\
             spec: {{hosts: [{name}.example.com], {addresses}ports: [{{number: 443, name: tls, protocol: TLS}}],\n\
             \x20 resolution: STATIC, endpoints: [{{address: {ip}, ports: {{tls: {port}}}}}]}}\n---\n",
            ip = addr.ip(),
            port = addr.port(),
        )
    };
    let c1 = dir.join("cluster1");
    std::fs::create_dir_all(&c1).unwrap();
    // The wildcard route first: the exact SNI still wins for a.example.com, as in Envoy.
    let objects = [
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: default, labels: {topology.istio.io/network: network1}}\n---\n".to_owned(),
        entry("front", front, "240.0.0.3"),
        entry("a", a, ""),
        entry("b", b, ""),
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: front, namespace: default}\n\
         spec:\n  hosts: [front.example.com, \"*.example.com\"]\n  tls:\n\
         \x20 - match: [{port: 443, sniHosts: [\"*.example.com\"]}]\n    route: [{destination: {host: b.example.com, port: {number: 443}}}]\n\
         \x20 - match: [{port: 443, sniHosts: [a.example.com]}]\n    route: [{destination: {host: a.example.com, port: {number: 443}}}]\n"
            .to_owned(),
    ]
    .concat();
    support::write(c1.join("objects.yaml"), objects).unwrap();
    let controller = Controller::serve(&dir);
    let vip: SocketAddr = "240.0.0.3:443".parse().unwrap();
    let (table, entries) = sidecar(controller.xds, &[vip]).await;
    until_served(
        &table,
        &[],
        &[
            "outbound|443||a.example.com",
            "outbound|443||b.example.com",
            "outbound|443||front.example.com",
        ],
    )
    .await;
    assert!(table.load().reads_hello(vip), "the listener chooses by SNI");
    for _ in 0..10 {
        assert_eq!(app.open(entries[0], "a.example.com").await.as_deref(), Ok("a"));
        assert_eq!(app.open(entries[0], "b.example.com").await.as_deref(), Ok("b"));
    }
    // The wildcard takes c.example.com to b, whose certificate is b's only: the client's
    // own check refuses it, as only its untouched TLS could make it.
    let refused = app.open(entries[0], "c.example.com").await.unwrap_err();
    assert!(refused.contains("certificate"), "{refused}");
    // Plaintext fits no TLS chain: the port's own cluster takes it.
    assert_eq!(connect(entries[0]).await, "front");
    drop(controller);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// One GET of / with `Host: host` to `entry`: status and body.
async fn get_host(entry: SocketAddr, host: &str) -> String {
    get_from(entry, host, "/", &[]).await
}

/// `resolution: DNS` as Istio's egress samples use it: an endpoint given by name, and an
/// entry with no endpoints whose host is the name. The controller resolves both with the
/// name server it is given; the sidecar reaches what they resolve to, follows the name
/// when its address moves, and keeps the last address while DNS fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_service_entries_are_reached_at_what_their_names_resolve_to_and_follow_them() {
    use support::dns::{Dns, Reply};
    let dir = scratch("sidecar-dns-entries");
    let api1 = http_backend("127.0.0.8:0", "api-1").await;
    let api2 = http_backend(&format!("127.0.0.9:{}", api1.port()), "api-2").await;
    let db = tcp_backend("127.0.0.10:0".parse().unwrap(), "db").await;
    let (api_name, db_name) = ("api.internal.example", "db.internal.example");
    let dns = Dns::start(&[
        (api_name, Reply::A(vec![[127, 0, 0, 8].into()], 1)),
        (db_name, Reply::A(vec![[127, 0, 0, 10].into()], 1)),
    ])
    .await;
    entries_in_cluster1(
        &dir,
        &format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: api, namespace: default}}\n\
             spec: {{hosts: [api.example.com], addresses: [240.0.0.3], location: MESH_EXTERNAL,\n\
             \x20 ports: [{{number: 80, name: http, protocol: HTTP}}],\n\
             \x20 resolution: DNS, endpoints: [{{address: {api_name}, ports: {{http: {api_port}}}}}]}}\n---\n\
             apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: db, namespace: default}}\n\
             spec: {{hosts: [{db_name}], addresses: [240.0.0.4], location: MESH_EXTERNAL,\n\
             \x20 ports: [{{number: 5432, name: tcp, protocol: TCP, targetPort: {db_port}}}], resolution: DNS}}\n",
            api_port = api1.port(),
            db_port = db.port(),
        ),
    );
    assert_eq!(api2.port(), api1.port());
    let nameserver = dns.addr.to_string();
    let controller = Controller::start(&["--manifests", dir.to_str().unwrap(), "--nameserver", &nameserver]);
    let vips = addrs(&["240.0.0.3:80", "240.0.0.4:5432"]);
    let (table, entries) = sidecar(controller.xds, &vips).await;
    until_served(
        &table,
        &["api.example.com:80"],
        &["outbound|80||api.example.com", "outbound|5432||db.internal.example"],
    )
    .await;
    for _ in 0..5 {
        assert_eq!(get_host(entries[0], "api.example.com").await, "200 api-1");
        assert_eq!(connect(entries[1]).await, "db");
    }

    // The name moves: once its TTL (1 s, held to 5 s) runs out, requests follow it.
    dns.set(api_name, Reply::A(vec![[127, 0, 0, 9].into()], 1));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        if get_host(entries[0], "api.example.com").await == "200 api-2" {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the new address is never used");
        tick.tick().await;
    }

    // DNS fails: the failure is counted and the last address keeps serving.
    dns.set(api_name, Reply::ServFail);
    let failures = || {
        controller
            .metric(
                "isthmus_controller_endpoint_resolution_failures_total",
                &[("hostname", api_name)],
            )
            .filter(|n| *n >= 1.0)
    };
    support::until("a failed lookup counted", Duration::from_secs(30), failures).await;
    for _ in 0..5 {
        assert_eq!(get_host(entries[0], "api.example.com").await, "200 api-2");
    }
    assert!(dns.asked(db_name) >= 1);
    drop(controller);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A TLS server of a certificate for `api.secure.example` under `ca`, requiring a client
/// certificate under `client_ca` when given: HTTP/1.1 answering `name`, or (no HTTP) a
/// server that writes `name` once the client has spoken.
async fn tls_backend(
    addr: &str,
    ca: &(rcgen::Certificate, rcgen::Issuer<'static, rcgen::KeyPair>),
    client_ca: Option<&rcgen::Certificate>,
    http: bool,
    name: &'static str,
) -> SocketAddr {
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["api.secure.example".to_owned()]).unwrap();
    let cert = params.signed_by(&key, &ca.1).unwrap();
    let chain = vec![cert.der().clone()];
    let key = rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let builder = rustls::ServerConfig::builder();
    let mut config = match client_ca {
        Some(client_ca) => {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(client_ca.der().clone()).unwrap();
            let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
                .build()
                .unwrap();
            builder
                .with_client_cert_verifier(verifier)
                .with_single_cert(chain, key)
                .unwrap()
        }
        None => builder.with_no_client_auth().with_single_cert(chain, key).unwrap(),
    };
    if http {
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
    }
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind(addr).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut stream) = acceptor.accept(stream).await else {
                    return;
                };
                if !http {
                    let mut hello = [0u8; 1];
                    if stream.read(&mut hello).await.unwrap_or(0) > 0 {
                        let _ = stream.write_all(name.as_bytes()).await;
                    }
                    let _ = stream.shutdown().await;
                    return;
                }
                serve_name(stream, name).await;
            });
        }
    });
    addr
}

/// A self-signed CA: its certificate and what signs with it.
fn test_ca() -> (rcgen::Certificate, rcgen::Issuer<'static, rcgen::KeyPair>) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let cert = params.self_signed(&key).unwrap();
    (cert, rcgen::Issuer::new(params, key))
}

/// Istio's egress TLS origination: the application speaks plaintext to a ServiceEntry's
/// VIP, and a DestinationRule's `tls` has the sidecar originate TLS to the server —
/// SIMPLE with the rule's CA and SNI, MUTUAL presenting the rule's client certificate
/// files, for HTTP and for TCP — while a server the rule's CA did not sign is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destination_rule_tls_originates_simple_and_mutual_tls_to_servers_outside_the_mesh() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dir = scratch("sidecar-tls-origination");
    let (server_ca, client_ca, other_ca) = (test_ca(), test_ca(), test_ca());
    let simple = tls_backend("127.0.0.12:0", &server_ca, None, true, "simple").await;
    let mutual = tls_backend("127.0.0.13:0", &server_ca, Some(&client_ca.0), true, "mutual").await;
    let db = tls_backend("127.0.0.14:0", &server_ca, None, false, "tls-db").await;
    // The client certificate and the CA files, where the rules say they are.
    let certs = dir.join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    let client_key = rcgen::KeyPair::generate().unwrap();
    let client = rcgen::CertificateParams::new(vec!["client.example".to_owned()])
        .unwrap()
        .signed_by(&client_key, &client_ca.1)
        .unwrap();
    let file = |name: &str, pem: String| {
        let path = certs.join(name);
        std::fs::write(&path, pem).unwrap();
        path.display().to_string()
    };
    let ca_file = file("ca.pem", server_ca.0.pem());
    let other_file = file("other-ca.pem", other_ca.0.pem());
    let cert_file = file("client.pem", client.pem());
    let key_file = file("client-key.pem", client_key.serialize_pem());
    let entry = |name: &str, vip: &str, port: &str, backend: SocketAddr| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {name}, namespace: default}}\n\
             spec: {{hosts: [{name}.secure.example], addresses: [{vip}], location: MESH_EXTERNAL, resolution: STATIC,\n\
             \x20 ports: [{port}], endpoints: [{{address: {ip}, ports: {{p: {backend_port}}}}}]}}\n---\n",
            ip = backend.ip(),
            backend_port = backend.port(),
        )
    };
    let rule = |name: &str, tls: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: {name}, namespace: default}}\n\
             spec: {{host: {name}.secure.example, trafficPolicy: {{tls: {tls}}}}}\n---\n"
        )
    };
    let http = "{number: 80, name: p, protocol: HTTP}";
    let tcp = "{number: 5432, name: p, protocol: TCP}";
    let simple_under = |ca: &str| format!("{{mode: SIMPLE, caCertificates: {ca}, sni: api.secure.example}}");
    let mutual_tls = format!(
        "{{mode: MUTUAL, caCertificates: {ca_file}, clientCertificate: {cert_file}, privateKey: {key_file}, \
         subjectAltNames: [api.secure.example]}}"
    );
    let objects = [
        entry("simple", "240.0.0.5", http, simple),
        rule("simple", &simple_under(&ca_file)),
        entry("mutual", "240.0.0.6", http, mutual),
        rule("mutual", &mutual_tls),
        entry("db", "240.0.0.7", tcp, db),
        rule("db", &simple_under(&ca_file)),
        entry("untrusted", "240.0.0.8", http, simple),
        rule("untrusted", &simple_under(&other_file)),
        entry("unmutual", "240.0.0.9", http, mutual),
        rule("unmutual", &simple_under(&ca_file)),
    ]
    .concat();
    entries_in_cluster1(&dir, &objects);
    let controller = Controller::serve(&dir);
    let vips = addrs(&[
        "240.0.0.5:80",
        "240.0.0.6:80",
        "240.0.0.7:5432",
        "240.0.0.8:80",
        "240.0.0.9:80",
    ]);
    let (table, entries) = sidecar(controller.xds, &vips).await;
    let clusters = ["simple", "mutual", "untrusted", "unmutual"].map(|n| format!("outbound|80||{n}.secure.example"));
    let mut wanted: Vec<&str> = clusters.iter().map(String::as_str).collect();
    wanted.push("outbound|5432||db.secure.example");
    until_served(&table, &[], &wanted).await;
    for _ in 0..3 {
        assert_eq!(get_host(entries[0], "simple.secure.example").await, "200 simple");
        assert_eq!(get_host(entries[1], "mutual.secure.example").await, "200 mutual");
        assert_eq!(connect(entries[2]).await, "tls-db");
    }
    let refused = get_host(entries[3], "untrusted.secure.example").await;
    assert!(refused.starts_with("503"), "a server our CA did not sign: {refused}");
    let refused = get_host(entries[4], "unmutual.secure.example").await;
    assert!(
        refused.starts_with("503"),
        "no client certificate for a server that wants one: {refused}"
    );
    drop(controller);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A ServiceEntry's TLS port without `addresses` (Istio's usual egress entry): the
/// application's own TLS to any address on that port is routed by its SNI to the
/// entry's endpoints, on the port's wildcard listener; a connection that is not for
/// the entry (plaintext here) passes through to where it was going.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_entry_without_addresses_is_reached_by_sni_and_the_rest_passes_through() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dir = scratch("sidecar-sni-entries");
    let ca = test_ca();
    let entry_backend = tls_backend("127.0.0.15:0", &ca, None, false, "sni-routed").await;
    let port = entry_backend.port();
    let elsewhere = tcp_backend(SocketAddr::new([127, 0, 0, 16].into(), port), "passed-through").await;
    entries_in_cluster1(
        &dir,
        &format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: api, namespace: default}}\n\
             spec: {{hosts: [api.secure.example], location: MESH_EXTERNAL, resolution: STATIC,\n\
             \x20 ports: [{{number: {port}, name: tls, protocol: TLS}}], endpoints: [{{address: 127.0.0.15}}]}}\n"
        ),
    );
    let controller = Controller::serve(&dir);
    // Where the application thought api.secure.example was (its own DNS), and another server.
    let unroutable = SocketAddr::new([203, 0, 113, 10].into(), port);
    let (table, entries) = sidecar(controller.xds, &[unroutable, elsewhere]).await;
    until_served(&table, &[], &[&format!("outbound|{port}||api.secure.example")]).await;
    until_true("the wildcard listener", Duration::from_secs(30), || {
        table.load().reads_hello(unroutable)
    })
    .await;

    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.0.der().clone()).unwrap();
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    for _ in 0..3 {
        let tcp = TcpStream::connect(entries[0]).await.unwrap();
        let name = rustls_pki_types::ServerName::try_from("api.secure.example").unwrap();
        let mut tls = connector.connect(name, tcp).await.expect("the entry's server, by SNI");
        tls.write_all(b"hi").await.unwrap();
        let mut text = String::new();
        tokio::time::timeout(Duration::from_secs(10), tls.read_to_string(&mut text))
            .await
            .expect("an answer in time")
            .ok();
        assert_eq!(text, "sni-routed");
        assert_eq!(connect(entries[1]).await, "passed-through");
    }
    drop(controller);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Istio's egress TLS origination task, with an entry that has no `addresses`: the
/// application sends plain HTTP to wherever its own DNS said the host was; the port's
/// wildcard HTTP listener picks the entry by `Host`, and the DestinationRule's SIMPLE
/// TLS carries it to the HTTPS server. A request for another host on the port passes
/// through to where it was going.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_entry_without_addresses_is_reached_by_host_and_the_rest_passes_through() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dir = scratch("sidecar-host-entries");
    let ca = test_ca();
    let https = tls_backend("127.0.0.17:0", &ca, None, true, "originated").await;
    let elsewhere = http_backend("127.0.0.18:0", "passed-through").await;
    let port = elsewhere.port();
    let ca_file = dir.join("ca.pem");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(&ca_file, ca.0.pem()).unwrap();
    entries_in_cluster1(
        &dir,
        &format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: api, namespace: default}}\n\
             spec: {{hosts: [api.secure.example], location: MESH_EXTERNAL, resolution: STATIC,\n\
             \x20 ports: [{{number: {port}, name: http, protocol: HTTP}}],\n\
             \x20 endpoints: [{{address: {ip}, ports: {{http: {https_port}}}}}]}}\n---\n\
             apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: api, namespace: default}}\n\
             spec: {{host: api.secure.example, trafficPolicy: {{tls: {{mode: SIMPLE, caCertificates: {ca}}}}}}}\n",
            ip = https.ip(),
            https_port = https.port(),
            ca = ca_file.display(),
        ),
    );
    let controller = Controller::serve(&dir);
    let unroutable = SocketAddr::new([203, 0, 113, 11].into(), port);
    let (table, entries) = sidecar(controller.xds, &[unroutable, elsewhere]).await;
    let route = port.to_string();
    until_served(&table, &[&route], &[&format!("outbound|{port}||api.secure.example")]).await;
    for _ in 0..3 {
        assert_eq!(get_host(entries[0], "api.secure.example").await, "200 originated");
        assert_eq!(get_host(entries[1], "other.example").await, "200 passed-through");
    }
    drop(controller);
    std::fs::remove_dir_all(&dir).unwrap();
}
