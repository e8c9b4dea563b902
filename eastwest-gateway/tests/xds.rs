//! The gateway following the federation controller over xDS: routes for its own
//! network only, changes applied without a restart, and the last good routes
//! kept when the controller goes away.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer;
use federation_controller::manifests;
use federation_controller::model::MeshConfig;
use federation_controller::xds::XdsServer;
use support::*;

/// One cluster directory: `reviews` (port 9080, named tls) with one sidecar'd
/// pod at `pod`, on `network`, plus that network's east-west gateway Service.
fn cluster(dir: &Path, name: &str, network: &str, pod: SocketAddr) {
    let d = dir.join(name);
    std::fs::create_dir_all(&d).unwrap();
    let y = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: default, labels: {{topology.istio.io/network: {network}}}}}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {{name: reviews, namespace: default}}\nspec: {{ports: [{{name: tls, port: 9080}}]}}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {{name: reviews-1, namespace: default, labels: {{security.istio.io/tlsMode: istio}}}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: reviews-1, namespace: default, labels: {{kubernetes.io/service-name: reviews}}}}\n\
         addressType: IPv4\nports: [{{name: tls, port: {port}}}]\nendpoints: [{{addresses: ['{ip}'], targetRef: {{kind: Pod, name: reviews-1}}}}]\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {{name: istio-eastwestgateway, namespace: istio-system, labels: {{topology.istio.io/network: {network}}}}}\n\
         spec: {{ports: [{{name: tls, port: 15443}}], externalIPs: [127.0.0.9]}}\n",
        ip = pod.ip(),
        port = pod.port()
    );
    // Write-then-rename: the controller never reads half a file.
    std::fs::write(d.join("objects.yaml.tmp"), y).unwrap();
    std::fs::rename(d.join("objects.yaml.tmp"), d.join("objects.yaml")).unwrap();
}

/// The controller, in-process but on its own thread and runtime: manifests →
/// snapshots → ADS on `listener`. Sending on the returned channel drops the
/// runtime, which cuts every stream at once, as a crash would.
fn controller(dir: &Path, listener: std::net::TcpListener) -> std::sync::mpsc::Sender<()> {
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    let dir = dir.to_owned();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        rt.spawn(async move {
            let mesh = MeshConfig::default();
            let first = manifests::snapshot(&dir, &mesh, 1).unwrap();
            let (tx, rx) = tokio::sync::watch::channel(Arc::new(first));
            tokio::spawn(manifests::watch(dir, mesh, Duration::from_millis(50), tx));
            listener.set_nonblocking(true).unwrap();
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            tonic::transport::Server::builder()
                .add_service(AggregatedDiscoveryServiceServer::new(XdsServer::new(rx)))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
        });
        let _ = stopped.recv();
        rt.shutdown_background();
    });
    stop
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_routes_what_the_controller_says_for_its_network_and_keeps_it() {
    let pki = Pki::new();
    let (a, b, remote) = (
        Backend::start(&pki, "a").await,
        Backend::start(&pki, "b").await,
        Backend::start(&pki, "remote").await,
    );
    let dir = pki.dir.path().join("clusters");
    cluster(&dir, "cluster1", "network1", a.addr);
    // Live, but on network2: only network2's gateway may reach it, never this one.
    cluster(&dir, "cluster2", "network2", remote.addr);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let xds = listener.local_addr().unwrap().to_string();
    let stop = controller(&dir, listener);

    let gw = GatewayProcess::start(
        pki.dir.path(),
        &["--xds", &xds, "--network", "network1", "--cluster", "cluster1"],
    );
    let client = pki.client(&pki.svid("client", CLIENT_ID, &[]), &["istio"]);
    let lands = |prefix: &'static str| {
        let client = client.clone();
        let listen = gw.listen;
        async move {
            Call::open(listen, &client, SNI)
                .await
                .is_ok_and(|c| c.greeting.starts_with(prefix))
        }
    };
    eventually(Duration::from_secs(10), "routes from xDS", || lands("hello a ")).await;
    assert_eq!(
        http_get(gw.health, "/healthz/ready").await.unwrap().0,
        200,
        "ready once routes arrived"
    );
    for _ in 0..10 {
        assert!(lands("hello a ").await, "only network1's endpoint may be used");
    }
    gw.wait_metric("isthmus_gateway_xds_connected", &[], 1.0).await;

    // The pod moves: the controller pushes, the gateway follows without a restart.
    cluster(&dir, "cluster1", "network1", b.addr);
    eventually(Duration::from_secs(10), "the push reaches the gateway", || {
        lands("hello b ")
    })
    .await;

    // The controller goes away: the last good routes keep serving.
    stop.send(()).unwrap();
    gw.wait_metric("isthmus_gateway_xds_connected", &[], 0.0).await;
    for _ in 0..5 {
        assert!(lands("hello b ").await, "routes must outlive the controller");
    }

    // A controller comes back on the same address: the gateway reconnects by itself.
    let listener = std::net::TcpListener::bind(&xds).unwrap();
    cluster(&dir, "cluster1", "network1", a.addr);
    let _stop = controller(&dir, listener);
    eventually(Duration::from_secs(15), "reconnected and rerouted", || {
        lands("hello a ")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn until_the_first_routes_arrive_the_data_port_refuses_connections() {
    let pki = Pki::new();
    let a = Backend::start(&pki, "a").await;
    let dir = pki.dir.path().join("clusters");
    cluster(&dir, "cluster1", "network1", a.addr);
    // The controller's address is taken but nobody serves on it yet.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let xds = listener.local_addr().unwrap().to_string();
    let gw = GatewayProcess::start(
        pki.dir.path(),
        &["--xds", &xds, "--network", "network1", "--cluster", "cluster1"],
    );
    // Refused, not accepted and then closed: a client's sidecar moves on to another
    // gateway at once.
    let refused = tokio::net::TcpStream::connect(gw.listen).await;
    assert_eq!(
        refused.map(|_| ()).unwrap_err().kind(),
        std::io::ErrorKind::ConnectionRefused,
        "no routes yet: the data port must not listen"
    );
    assert_eq!(http_get(gw.health, "/healthz/ready").await.unwrap().0, 503);

    let _stop = controller(&dir, listener);
    let client = pki.client(&pki.svid("client", CLIENT_ID, &[]), &["istio"]);
    eventually(Duration::from_secs(10), "routes from xDS", || {
        let client = client.clone();
        async move {
            Call::open(gw.listen, &client, SNI)
                .await
                .is_ok_and(|c| c.greeting.starts_with("hello a "))
        }
    })
    .await;
}

/// cluster1 on network1 with `reviews` (pod at `reviews`) and `ratings` (pod at `ratings`),
/// both sidecar'd on port 9080, and the network's east-west gateway; with `exposed`, an
/// Istio Gateway whose `AUTO_PASSTHROUGH` server on 15443 names those hosts.
fn two_services(dir: &Path, reviews: SocketAddr, ratings: SocketAddr, exposed: Option<&str>) {
    let d = dir.join("cluster1");
    std::fs::create_dir_all(&d).unwrap();
    let service = |name: &str, pod: SocketAddr| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec: {{ports: [{{name: tls, port: 9080}}]}}\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}-1, namespace: default, labels: {{security.istio.io/tlsMode: istio}}}}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-1, namespace: default, labels: {{kubernetes.io/service-name: {name}}}}}\n\
             addressType: IPv4\nports: [{{name: tls, port: {port}}}]\nendpoints: [{{addresses: ['{ip}'], targetRef: {{kind: Pod, name: {name}-1}}}}]\n---\n",
            ip = pod.ip(),
            port = pod.port()
        )
    };
    let mut y = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: default, labels: {{topology.istio.io/network: network1}}}}\n---\n{}{}\
         apiVersion: v1\nkind: Service\nmetadata: {{name: istio-eastwestgateway, namespace: istio-system, labels: {{topology.istio.io/network: network1}}}}\n\
         spec: {{selector: {{istio: eastwestgateway}}, ports: [{{name: tls, port: 15443}}], externalIPs: [127.0.0.9]}}\n",
        service("reviews", reviews),
        service("ratings", ratings)
    );
    if let Some(hosts) = exposed {
        y.push_str(&format!(
            "---\napiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: cross-network-gateway, namespace: istio-system}}\n\
             spec: {{selector: {{istio: eastwestgateway}}, servers: [{{port: {{number: 15443, name: tls, protocol: TLS}}, tls: {{mode: AUTO_PASSTHROUGH}}, hosts: [{hosts}]}}]}}\n"
        ));
    }
    std::fs::write(d.join("objects.yaml.tmp"), y).unwrap();
    std::fs::rename(d.join("objects.yaml.tmp"), d.join("objects.yaml")).unwrap();
}

/// The network's Gateway says what other networks may reach through this gateway: an SNI
/// for a service it leaves out is refused like an unknown one, as Istio's east-west gateway
/// has no chain for it, and the Gateway's change is followed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_passes_only_what_its_networks_gateway_exposes() {
    const RATINGS: &str = "outbound_.9080_._.ratings.default.svc.cluster.local";
    let pki = Pki::new();
    let (reviews, ratings) = (
        Backend::start(&pki, "reviews").await,
        Backend::start(&pki, "ratings").await,
    );
    let dir = pki.dir.path().join("clusters");
    two_services(
        &dir,
        reviews.addr,
        ratings.addr,
        Some("default/reviews.default.svc.cluster.local"),
    );
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let xds = listener.local_addr().unwrap().to_string();
    let _stop = controller(&dir, listener);
    let gw = GatewayProcess::start(
        pki.dir.path(),
        &["--xds", &xds, "--network", "network1", "--cluster", "cluster1"],
    );
    let client = pki.client(&pki.svid("client", CLIENT_ID, &[]), &["istio"]);
    let lands = |sni: &'static str, prefix: &'static str| {
        let client = client.clone();
        let listen = gw.listen;
        async move {
            Call::open(listen, &client, sni)
                .await
                .is_ok_and(|c| c.greeting.starts_with(prefix))
        }
    };
    eventually(Duration::from_secs(10), "routes from xDS", || {
        lands(SNI, "hello reviews ")
    })
    .await;
    assert!(
        Call::open(gw.listen, &client, RATINGS).await.is_err(),
        "ratings is not exposed"
    );
    gw.wait_rejected("unknown_sni", 1.0).await;

    // The Gateway exposes every local host now: ratings passes too.
    two_services(&dir, reviews.addr, ratings.addr, Some("'*.local'"));
    eventually(
        Duration::from_secs(10),
        "the Gateway's change reaches the gateway",
        || lands(RATINGS, "hello ratings "),
    )
    .await;
    assert!(lands(SNI, "hello reviews ").await);
}
