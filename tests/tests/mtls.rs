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

use std::path::Path;
use std::time::Duration;

use isthmus_e2e::mesh::{self, Sidecar, get_from, get_routed, stats, wait_for_routes, xfcc};
use isthmus_e2e::{Netns, eventually, http_server, link, metric, prefix, require_root, scratch, sh};

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

#[test]
fn strict_mtls_across_two_clusters_through_captured_sidecars() {
    require_root();
    let p = prefix("mtls");
    let dir = scratch(&p);
    manifests(&dir.join("clusters"));
    let ca = mesh::init_mesh(&dir.join("ca"), &["cluster1"]).join("cluster1");

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

    let _controller = mesh::controller(&ctl, CONTROLLER, &dir.join("clusters"), &ca, dir.join("controller.log"));
    rv.run(|| http_server("0.0.0.0:9080".parse().unwrap(), xfcc));
    let reviews = |mtls| Sidecar {
        ns: &rv,
        sa: "reviews",
        cluster: "cluster2",
        network: "network1",
        pod_ip: "10.242.0.2",
        controller: CONTROLLER,
        ca_dir: &ca,
        mtls,
    };
    let mut reviews_sidecar = reviews("STRICT").start(&dir);
    let productpage = Sidecar {
        ns: &pp,
        sa: "productpage",
        cluster: "cluster1",
        network: "network1",
        pod_ip: "10.241.1.2",
        controller: CONTROLLER,
        ca_dir: &ca,
        mtls: "STRICT",
    };
    let _productpage_sidecar = productpage.start(&dir);
    wait_for_routes(&pp);

    // productpage calls the ClusterIP in plaintext; its sidecar carries it in mTLS.
    let (status, body) = get_routed(&pp, REVIEWS_VIP);
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
    drop(reviews_sidecar);
    reviews_sidecar = reviews("PERMISSIVE").start(&dir);
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
    drop(reviews_sidecar);
}
