//! Two workloads in two clusters, each in its own network namespace with its sidecar
//! capturing its traffic through iptables, as in a pod: `productpage` in cluster1 calls
//! `reviews`' ClusterIP in cluster2 in plaintext, and its sidecar carries the call in
//! mutual TLS with an SVID from the controller's CA to reviews' sidecar, which hands it to
//! the application with the caller's SPIFFE ID. A pod without a sidecar is refused under
//! STRICT and let in under PERMISSIVE.
//!
//! ```text
//!   ctl 10.241.0.10 (controller: xDS 15010, CA 15012)
//!   pp  10.241.1.2  (cluster1: productpage + sidecar)      ┐
//!   lg  10.241.2.2  (cluster1: a pod with no sidecar)      ├─ rt (routes 10.240.0.0/12)
//!   rv  10.242.0.2  (cluster2: reviews + sidecar; Service  ┘
//!                    reviews has ClusterIP 10.242.255.10)
//! ```

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use isthmus_e2e::{
    Netns, Process, binary, eventually, http_get, http_server, link, metric, prefix, require_root, scratch, sh,
};

const CONTROLLER: &str = "10.241.0.10";
const REVIEWS_VIP: &str = "10.242.255.10:9080";
const REVIEWS_POD: &str = "10.242.0.2:9080";

fn manifests(dir: &Path) {
    let ns =
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: default, labels: {topology.istio.io/network: network1}}\n";
    let c1 = dir.join("cluster1");
    std::fs::create_dir_all(&c1).unwrap();
    std::fs::write(
        c1.join("objects.yaml"),
        format!(
            "{ns}---\napiVersion: v1\nkind: Pod\nmetadata: {{name: productpage-v1, namespace: default, \
             labels: {{app: productpage, security.istio.io/tlsMode: istio}}}}\n\
             spec: {{serviceAccountName: productpage, containers: [{{name: app}}]}}\nstatus: {{podIP: 10.241.1.2}}\n"
        ),
    )
    .unwrap();
    let c2 = dir.join("cluster2");
    std::fs::create_dir_all(&c2).unwrap();
    std::fs::write(
        c2.join("objects.yaml"),
        format!(
            "{ns}---\napiVersion: v1\nkind: Service\nmetadata: {{name: reviews, namespace: default}}\n\
             spec: {{clusterIP: 10.242.255.10, ports: [{{name: http, port: 9080}}]}}\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {{name: reviews-v1, namespace: default, \
             labels: {{app: reviews, version: v1, security.istio.io/tlsMode: istio}}}}\n\
             spec: {{serviceAccountName: reviews, containers: [{{name: app}}]}}\nstatus: {{podIP: 10.242.0.2}}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: reviews-1, namespace: default, \
             labels: {{kubernetes.io/service-name: reviews}}}}\naddressType: IPv4\nports: [{{name: http, port: 9080}}]\n\
             endpoints:\n  - {{addresses: [10.242.0.2], targetRef: {{kind: Pod, name: reviews-v1}}}}\n"
        ),
    )
    .unwrap();
}

/// The sidecar of workload `sa` in `ns`, capturing, with `mode` inbound.
fn sidecar(ns: &Netns, dir: &Path, sa: &str, cluster: &str, pod_ip: &str, mode: &str) -> Process {
    let identity = format!("spiffe://cluster.local/ns/default/sa/{sa}");
    let token = dir.join(format!("{sa}.token"));
    let minted = sh(std::process::Command::new(binary("federation-controller")).args([
        "ca",
        "token",
        "--ca-dir",
        dir.join("ca/cluster1").to_str().unwrap(),
        "--identity",
        &identity,
    ]));
    std::fs::write(&token, minted.trim()).unwrap();
    sh(ns.command(binary("sidecar")).args(["init", "--apply"]));
    let mut cmd = ns.command(binary("sidecar"));
    cmd.args([
        "run",
        "--capture",
        "--xds",
        &format!("http://{CONTROLLER}:15010"),
        "--ca-address",
        &format!("https://{CONTROLLER}:15012"),
        "--token-file",
        token.to_str().unwrap(),
        "--identity",
        &identity,
        "--ca",
        dir.join("ca/cluster1/root-cert.pem").to_str().unwrap(),
        "--network",
        "network1",
        "--cluster",
        cluster,
        "--pod-ip",
        pod_ip,
        "--protocol",
        "http",
        "--service",
        &format!("{sa}.default.svc.cluster.local"),
        "--metrics",
        "0.0.0.0:15090",
        "--mtls",
        mode,
    ]);
    let mut p = Process::start(cmd, dir.join(format!("{sa}-{mode}.log")));
    p.wait_for("ready ", Duration::from_secs(30));
    p
}

fn stats(ns: &Netns) -> String {
    ns.run(|| {
        http_get(
            "127.0.0.1:15090".parse().unwrap(),
            "/stats/prometheus",
            Duration::from_secs(2),
        )
        .map(|(_, body)| body)
        .unwrap_or_default()
    })
}

/// The application answers with the `x-forwarded-client-cert` it was handed, or `-`.
fn xfcc(headers: &[(String, String)]) -> String {
    headers
        .iter()
        .find(|(k, _)| k == "x-forwarded-client-cert")
        .map_or("-".to_owned(), |(_, v)| v.clone())
}

fn get_from(ns: &Netns, addr: &str) -> Result<(u16, String), String> {
    let addr: SocketAddr = addr.parse().unwrap();
    ns.run(move || http_get(addr, "/", Duration::from_secs(3)))
}

#[test]
fn strict_mtls_across_two_clusters_through_captured_sidecars() {
    require_root();
    let p = prefix("mtls");
    let dir = scratch(&p);
    manifests(&dir.join("clusters"));
    sh(std::process::Command::new(binary("federation-controller")).args([
        "ca",
        "init-mesh",
        "--out",
        dir.join("ca").to_str().unwrap(),
        "--clusters",
        "cluster1",
    ]));

    let rt = Netns::new(&p, "rt");
    let ctl = Netns::new(&p, "ctl");
    let pp = Netns::new(&p, "pp");
    let lg = Netns::new(&p, "lg");
    let rv = Netns::new(&p, "rv");
    for (leaf, rt_if, rt_addr, addr) in [
        (&ctl, "to-ctl", "10.241.0.1/24", "10.241.0.10/24"),
        (&pp, "to-pp", "10.241.1.1/24", "10.241.1.2/24"),
        (&lg, "to-lg", "10.241.2.1/24", "10.241.2.2/24"),
        (&rv, "to-rv", "10.242.0.1/24", "10.242.0.2/24"),
    ] {
        link(&rt, rt_if, rt_addr, leaf, "eth0", addr);
        let gw = rt_addr.split('/').next().unwrap();
        // No default route: only the lab's own ranges (pods and service VIPs) are reachable.
        leaf.ip(&["route", "add", "10.240.0.0/12", "via", gw]);
    }
    sh(rt.command("sysctl").args(["-qw", "net.ipv4.ip_forward=1"]));

    let mut controller = Process::start(
        {
            let mut c = ctl.command(binary("federation-controller"));
            c.args([
                "serve",
                "--manifests",
                dir.join("clusters").to_str().unwrap(),
                "--ca-dir",
                dir.join("ca/cluster1").to_str().unwrap(),
                "--xds",
                &format!("{CONTROLLER}:15010"),
                "--secure",
                &format!("{CONTROLLER}:15012"),
                "--monitoring",
                &format!("{CONTROLLER}:15014"),
                "--interval",
                "100ms",
            ]);
            c
        },
        dir.join("controller.log"),
    );
    controller.wait_for("xds=", Duration::from_secs(30));

    rv.run(|| http_server("0.0.0.0:9080".parse().unwrap(), xfcc));
    let mut reviews = sidecar(&rv, &dir, "reviews", "cluster2", "10.242.0.2", "STRICT");
    let _productpage = sidecar(&pp, &dir, "productpage", "cluster1", "10.241.1.2", "STRICT");
    eventually(Duration::from_secs(20), || {
        let page = stats(&pp);
        match metric(&page, "isthmus_sidecar_xds_routes", &[]) {
            Some(n) if n >= 1.0 => Ok(()),
            other => Err(format!("productpage's sidecar has no route yet ({other:?})")),
        }
    });

    // productpage calls the ClusterIP in plaintext; its sidecar carries it in mTLS.
    let (status, body) = get_from(&pp, REVIEWS_VIP).unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("URI=spiffe://cluster.local/ns/default/sa/productpage"),
        "reviews must see productpage's SPIFFE ID, got {body:?}"
    );
    assert!(
        body.contains("By=spiffe://cluster.local/ns/default/sa/reviews"),
        "{body}"
    );
    let page = stats(&rv);
    let mtls = metric(
        &page,
        "istio_tcp_connections_opened_total",
        &[
            ("reporter", "destination"),
            ("source_principal", "spiffe://cluster.local/ns/default/sa/productpage"),
            ("connection_security_policy", "mutual_tls"),
        ],
    );
    assert!(
        mtls >= Some(1.0),
        "reviews' sidecar counted no mTLS connection:\n{page}"
    );

    // A pod without a sidecar speaks plaintext to the pod: refused under STRICT…
    let refused = get_from(&lg, REVIEWS_POD);
    assert!(
        refused.is_err(),
        "plaintext must be refused under STRICT, got {refused:?}"
    );
    let page = stats(&rv);
    assert!(
        metric(
            &page,
            "isthmus_sidecar_refused_connections_total",
            &[("reason", "plaintext")]
        ) >= Some(1.0),
        "{page}"
    );

    // …and accepted under PERMISSIVE, without a caller identity.
    drop(reviews);
    reviews = sidecar(&rv, &dir, "reviews", "cluster2", "10.242.0.2", "PERMISSIVE");
    let (status, body) = eventually(Duration::from_secs(10), || get_from(&lg, REVIEWS_POD));
    assert_eq!(
        (status, body.as_str()),
        (200, "-"),
        "plaintext under PERMISSIVE reaches the app"
    );
    // mTLS still works under PERMISSIVE.
    let (_, body) = get_from(&pp, REVIEWS_VIP).unwrap();
    assert!(
        body.contains("URI=spiffe://cluster.local/ns/default/sa/productpage"),
        "{body}"
    );
    drop(reviews);
}
