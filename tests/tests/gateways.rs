//! Two clusters on two networks that share no route, joined only by their east-west
//! gateways' transit link (multi-primary with gateways): `productpage` in cluster1 calls
//! `reviews`' ClusterIP; its sidecar, told by its controller that reviews lives behind
//! network2's gateway, sends mTLS with SNI `outbound_.9080_._.reviews…` to that gateway,
//! which splices the still-encrypted bytes to reviews' pod, whose sidecar terminates it.
//! The gateway's counters prove the call crossed it, and a direct connection from
//! cluster1 to the remote pod network fails.
//!
//! ```text
//!  network1                                             network2
//!  ctl1 10.241.0.10 ┐                                ┌ ctl2 10.242.0.10
//!  pp   10.241.1.2  ├ rt1 ── gw1 ══ 100.64.0.0/24 ══ gw2 ── rt2 ┤ rv 10.242.1.2 (reviews)
//!                   ┘  10.241.3.2   .1        .2   10.242.3.2  ┘
//! ```
//! Pods reach the transit network through their gateway namespace, which masquerades
//! onto it as a cloud load balancer's network would; nothing routes a pod network to the
//! other.

use std::path::Path;

use isthmus_e2e::mesh::{self, Sidecar, get_from, get_routed, stats, wait_for_routes, xfcc};
use isthmus_e2e::{Netns, Process, binary, http_server, link, metric, prefix, require_root, scratch, sh};

const REVIEWS_VIP: &str = "10.242.255.10:9080";
const REVIEWS_POD: &str = "10.242.1.2:9080";

fn manifests(dir: &Path) {
    let cluster = |name: &str, net: &str, k: u8, rest: String| {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        let y = format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: default, labels: {{topology.istio.io/network: {net}}}}}\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {{name: istio-eastwestgateway, namespace: istio-system, \
             labels: {{topology.istio.io/network: {net}}}}}\n\
             spec: {{ports: [{{name: tls, port: 15443}}], externalIPs: [100.64.0.{k}]}}\n{rest}"
        );
        std::fs::write(d.join("objects.yaml"), y).unwrap();
    };
    cluster("cluster1", "network1", 1, String::new());
    cluster(
        "cluster2",
        "network2",
        2,
        "---\napiVersion: v1\nkind: Service\nmetadata: {name: reviews, namespace: default}\n\
         spec: {clusterIP: 10.242.255.10, ports: [{name: http, port: 9080}]}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {name: reviews-v1, namespace: default, \
         labels: {app: reviews, version: v1, security.istio.io/tlsMode: istio}}\n\
         spec: {serviceAccountName: reviews, containers: [{name: app}]}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: reviews-1, namespace: default, \
         labels: {kubernetes.io/service-name: reviews}}\naddressType: IPv4\nports: [{name: http, port: 9080}]\n\
         endpoints:\n  - {addresses: [10.242.1.2], targetRef: {kind: Pod, name: reviews-v1}}\n"
            .into(),
    );
}

/// One network: its router, controller and gateway namespaces, linked and routed.
struct Network {
    rt: Netns,
    ctl: Netns,
    gw: Netns,
}

impl Network {
    fn new(p: &str, k: u8) -> Network {
        let n = Network {
            rt: Netns::new(p, &format!("rt{k}")),
            ctl: Netns::new(p, &format!("ctl{k}")),
            gw: Netns::new(p, &format!("gw{k}")),
        };
        link(
            &n.rt,
            "to-ctl",
            &format!("10.24{k}.0.1/24"),
            &n.ctl,
            "eth0",
            &format!("10.24{k}.0.10/24"),
        );
        link(
            &n.rt,
            "to-gw",
            &format!("10.24{k}.3.1/24"),
            &n.gw,
            "eth0",
            &format!("10.24{k}.3.2/24"),
        );
        n.ctl.ip(&[
            "route",
            "add",
            &format!("10.24{k}.0.0/16"),
            "via",
            &format!("10.24{k}.0.1"),
        ]);
        n.gw.ip(&[
            "route",
            "add",
            &format!("10.24{k}.0.0/16"),
            "via",
            &format!("10.24{k}.3.1"),
        ]);
        // The router sends transit-bound traffic to its gateway, and nothing else leaves.
        n.rt.ip(&["route", "add", "100.64.0.0/24", "via", &format!("10.24{k}.3.2")]);
        sh(n.rt.command("sysctl").args(["-qw", "net.ipv4.ip_forward=1"]));
        n
    }

    /// A pod namespace on this network's router.
    fn pod(&self, p: &str, short: &str, ip: &str, rt_if: &str) -> Netns {
        let pod = Netns::new(p, short);
        let subnet = ip.rsplit_once('.').unwrap().0;
        link(
            &self.rt,
            rt_if,
            &format!("{subnet}.1/24"),
            &pod,
            "eth0",
            &format!("{ip}/24"),
        );
        // Service VIPs (10.240.0.0/12, which also covers every pod network) and the transit
        // network go to the router; it forwards only what it has a route for.
        for dst in ["10.240.0.0/12", "100.64.0.0/24"] {
            pod.ip(&["route", "add", dst, "via", &format!("{subnet}.1")]);
        }
        pod
    }
}

#[test]
fn cross_network_calls_go_through_the_east_west_gateways_and_nowhere_else() {
    require_root();
    let p = prefix("gw");
    let dir = scratch(&p);
    manifests(&dir.join("clusters"));
    let ca = mesh::init_mesh(&dir.join("ca"), &["cluster1", "cluster2"]);

    let n1 = Network::new(&p, 1);
    let n2 = Network::new(&p, 2);
    link(&n1.gw, "transit", "100.64.0.1/24", &n2.gw, "transit", "100.64.0.2/24");
    for gw in [&n1.gw, &n2.gw] {
        sh(gw.command("sysctl").args(["-qw", "net.ipv4.ip_forward=1"]));
        sh(gw
            .command("iptables")
            .args(["-t", "nat", "-A", "POSTROUTING", "-o", "transit", "-j", "MASQUERADE"]));
    }
    let pp = n1.pod(&p, "pp", "10.241.1.2", "to-pp");
    let rv = n2.pod(&p, "rv", "10.242.1.2", "to-rv");

    let clusters = dir.join("clusters");
    let _ctl1 = mesh::controller(
        &n1.ctl,
        "10.241.0.10",
        &clusters,
        &ca.join("cluster1"),
        dir.join("ctl1.log"),
    );
    let _ctl2 = mesh::controller(
        &n2.ctl,
        "10.242.0.10",
        &clusters,
        &ca.join("cluster2"),
        dir.join("ctl2.log"),
    );
    let mut gateways = Vec::new();
    for (gw, k) in [(&n1.gw, 1), (&n2.gw, 2)] {
        let mut cmd = gw.command(binary("eastwest-gateway"));
        cmd.args([
            "--listen",
            "0.0.0.0:15443",
            "--xds",
            &format!("10.24{k}.0.10:15010"),
            "--network",
            &format!("network{k}"),
            "--cluster",
            &format!("cluster{k}"),
            "--health",
            "0.0.0.0:15021",
            "--metrics",
            "0.0.0.0:15090",
            "--workers",
            "1",
        ]);
        gateways.push(Process::start(cmd, dir.join(format!("gw{k}.log"))));
    }

    rv.run(|| http_server("0.0.0.0:9080".parse().unwrap(), xfcc));
    let _reviews = Sidecar {
        ns: &rv,
        sa: "reviews",
        cluster: "cluster2",
        network: "network2",
        pod_ip: "10.242.1.2",
        controller: "10.242.0.10",
        ca_dir: &ca.join("cluster2"),
        mtls: "STRICT",
    }
    .start(&dir);
    let _productpage = Sidecar {
        ns: &pp,
        sa: "productpage",
        cluster: "cluster1",
        network: "network1",
        pod_ip: "10.241.1.2",
        controller: "10.241.0.10",
        ca_dir: &ca.join("cluster1"),
        mtls: "STRICT",
    }
    .start(&dir);
    wait_for_routes(&pp);

    // The remote pod network is unreachable from cluster1: separation is real.
    let direct = get_from(&pp, REVIEWS_POD);
    assert!(
        direct.is_err(),
        "cluster1 must not reach cluster2's pods directly: {direct:?}"
    );

    // Through the gateways, with reviews seeing productpage's identity (the gateway never
    // terminated the TLS: the identity is the one productpage's sidecar proved).
    let (status, body) = get_routed(&pp, REVIEWS_VIP);
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("URI=spiffe://cluster.local/ns/default/sa/productpage"),
        "reviews must see productpage's SPIFFE ID through the gateway, got {body:?}"
    );
    for _ in 0..4 {
        let (status, _) = get_from(&pp, REVIEWS_VIP).unwrap();
        assert_eq!(status, 200);
    }
    let page = stats(&n2.gw);
    let crossed = metric(
        &page,
        "istio_tcp_connections_opened_total",
        &[("destination_service", "reviews.default.svc.cluster.local")],
    );
    // productpage's sidecar pools one HTTP/2 connection per endpoint and SNI, so the
    // gateway carries all the calls on one connection (or a few).
    assert!(
        crossed >= Some(1.0),
        "network2's gateway carried no connection:\n{page}"
    );
    let page = stats(&rv);
    let served = metric(
        &page,
        "istio_requests_total",
        &[
            ("reporter", "destination"),
            ("source_principal", "spiffe://cluster.local/ns/default/sa/productpage"),
            ("response_code", "200"),
        ],
    );
    assert!(
        served >= Some(5.0),
        "reviews must have answered all 5 calls, and the gateway is the only way there:\n{page}"
    );
    let page = stats(&n1.gw);
    assert_eq!(
        metric(&page, "istio_tcp_connections_opened_total", &[]),
        None,
        "network1's gateway carries nothing inbound here:\n{page}"
    );
    drop(gateways);
}
