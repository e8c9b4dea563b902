//! `federation-controller view` over a manifest directory of two clusters on two
//! networks, as a user would run it.

mod support;

use std::path::Path;
use std::process::Command;

use support::{cluster, scratch};

fn view(dir: &Path, network: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_federation-controller"))
        .args(["view", "--manifests"])
        .arg(dir)
        .args(["--network", network, "--json"])
        .output()
        .unwrap()
}

/// A service's endpoints in a view, one line each: `address:port wWEIGHT via_gateway`.
fn brief(v: &serde_json::Value, key: &str) -> Vec<String> {
    v[key]
        .as_array()
        .unwrap_or_else(|| panic!("{key} is served: {v}"))
        .iter()
        .map(|e| {
            format!(
                "{}:{} w{} {}",
                e["address"].as_str().unwrap(),
                e["port"],
                e["weight"],
                e["via_gateway"]
            )
        })
        .collect()
}

#[test]
fn a_proxy_on_each_network_sees_local_pods_and_the_other_network_behind_its_gateway() {
    let dir = scratch("two");
    cluster(&dir, "cluster1", "network1", 1, &[("reviews-v1-a", "v1", true)]);
    cluster(
        &dir,
        "cluster2",
        "network2",
        2,
        &[
            ("reviews-v1-b", "v1", true),
            ("reviews-v2", "v2", true),
            ("legacy", "v0", false),
        ],
    );

    let out = view(&dir, "network1");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // Its own pod directly; cluster2's two mTLS pods as one gateway entry of weight 2;
    // the pod without a sidecar is not offered across networks at all.
    assert_eq!(
        brief(&v, "reviews.default.svc.cluster.local:9080"),
        ["10.241.0.10:9080 w1 false", "100.64.0.2:15443 w2 true"]
    );

    let out = view(&dir, "network2");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let eps = v["reviews.default.svc.cluster.local:9080"].as_array().unwrap();
    let direct = eps.iter().filter(|e| e["via_gateway"] == false).count();
    assert_eq!(
        direct, 3,
        "all of cluster2's pods, sidecar or not, are local to network2"
    );
    assert!(eps.iter().any(|e| e["address"] == "100.64.0.1" && e["weight"] == 1));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_bad_manifest_is_refused_with_file_document_and_field() {
    let dir = scratch("bad");
    std::fs::create_dir_all(dir.join("c1")).unwrap();
    support::write(
        dir.join("c1/svc.yaml"),
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: default}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: r}\nspec: {ports: [{port: nine}]}\n",
    )
    .unwrap();
    let out = view(&dir, "network1");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("c1/svc.yaml: document 2: field `spec.ports[0].port`"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_gateway_known_by_host_name_is_looked_up_once_and_shown_at_its_addresses() {
    let dir = scratch("named-gateway");
    cluster(&dir, "cluster1", "network1", 1, &[("reviews-v1-a", "v1", true)]);
    cluster(
        &dir,
        "cluster2",
        "network2",
        2,
        &[("reviews-v1-b", "v1", true), ("reviews-v2", "v2", true)],
    );
    // cluster2's gateway has a load balancer with only a name: `localhost`, which
    // the system's resolver answers from /etc/hosts without any network.
    let file = dir.join("cluster2/objects.yaml");
    let yaml = std::fs::read_to_string(&file).unwrap();
    let ip_gateway = ", externalIPs: [100.64.0.2]}\n";
    assert!(yaml.contains(ip_gateway));
    let named = "}\nstatus: {loadBalancer: {ingress: [{hostname: localhost}]}}\n";
    support::write(&file, yaml.replace(ip_gateway, named)).unwrap();

    let out = view(&dir, "network1");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let through: Vec<String> = v["reviews.default.svc.cluster.local:9080"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["via_gateway"] == true)
        .map(|e| format!("{}:{}", e["address"].as_str().unwrap(), e["port"]))
        .collect();
    assert!(through.contains(&"127.0.0.1:15443".to_owned()), "{through:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A VM's WorkloadEntry is an endpoint of the Service that selects it, crossing
/// networks through its network's gateway like a pod; a ServiceEntry's STATIC
/// endpoints are endpoints of its host.
#[test]
fn workload_entries_and_service_entry_endpoints_are_served_like_pods() {
    let dir = scratch("entries");
    cluster(&dir, "cluster1", "network1", 1, &[("reviews-v1-a", "v1", true)]);
    cluster(&dir, "cluster2", "network2", 2, &[("reviews-v1-b", "v1", true)]);
    support::write(
        dir.join("cluster2/vm.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: ratings, namespace: default}\n\
         spec: {selector: {app: ratings}, ports: [{name: http, port: 9080, targetPort: 8080}]}\n---\n\
         apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: ratings-vm, namespace: default}\n\
         spec: {address: 10.9.0.1, labels: {app: ratings}, serviceAccount: ratings}\n",
    )
    .unwrap();
    support::write(
        dir.join("cluster1/external.yaml"),
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: payments, namespace: default}\n\
         spec: {hosts: [payments.example.com], location: MESH_EXTERNAL, resolution: STATIC,\n\
         ports: [{name: https, number: 443, protocol: TLS}], endpoints: [{address: 192.0.2.7, ports: {https: 8443}}]}\n",
    )
    .unwrap();

    let out = view(&dir, "network1");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        brief(&v, "ratings.default.svc.cluster.local:9080"),
        ["100.64.0.2:15443 w1 true"]
    );
    assert_eq!(brief(&v, "payments.example.com:443"), ["192.0.2.7:8443 w1 false"]);

    let out = view(&dir, "network2");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        brief(&v, "ratings.default.svc.cluster.local:9080"),
        ["10.9.0.1:8080 w1 false"]
    );
}

#[test]
fn a_zero_period_or_lifetime_is_refused_at_the_command_line() {
    let dir = scratch("zero-flags");
    std::fs::create_dir_all(dir.join("c1")).unwrap();
    for flag in ["--interval", "--svid-ttl", "--bundle-refresh-hint"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_federation-controller"))
            .args(["serve", "--manifests", dir.to_str().unwrap(), flag, "0s"])
            .output()
            .unwrap();
        // Refused by the flag parser (exit 2) with the flag named, not a panic later.
        assert_eq!(out.status.code(), Some(2), "{flag}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&format!("'0s' for '{flag}")) && err.contains("more than zero"),
            "{err}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
