//! Remote clusters from remote secrets (`istioctl create-remote-secret`'s format),
//! against test API servers: add, rotate (make before break), refuse a duplicate
//! and our own ID, delete (prune only that cluster) — all without a restart.

mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::Controller;
use support::kube_api::{FakeApi, remote_secret};

/// An API server with `reviews` at the given addresses.
async fn cluster(addresses: &[&str]) -> FakeApi {
    let api = FakeApi::start().await;
    api.apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}}));
    api.apply(
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "reviews", "namespace": "default"},
                     "spec": {"ports": [{"name": "http", "port": 9080}]}}),
    );
    let eps: Vec<Value> = addresses.iter().map(|a| json!({"addresses": [a]})).collect();
    api.apply(json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "reviews-1", "namespace": "default", "labels": {"kubernetes.io/service-name": "reviews"}},
        "addressType": "IPv4", "ports": [{"name": "http", "port": 9080}], "endpoints": eps}));
    api
}

/// cluster → instances, as /debug/clusterz shows them.
fn clusters(c: &Controller) -> Vec<(String, u64)> {
    let v = c.json("/debug/clusterz").unwrap_or_default();
    let mut out: Vec<(String, u64)> = v["clusters"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            (
                c["cluster"].as_str().unwrap().to_owned(),
                c["instances"].as_u64().unwrap(),
            )
        })
        .collect();
    out.sort();
    out
}

/// Polls until `ok` holds, checking `always` on every observation.
async fn until(
    c: &Controller,
    what: &str,
    ok: impl Fn(&[(String, u64)]) -> bool,
    always: impl Fn(&[(String, u64)]) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    loop {
        tick.tick().await;
        let seen = clusters(c);
        assert!(always(&seen), "invariant broken while waiting for {what}: {seen:?}");
        if ok(&seen) {
            return;
        }
        assert!(Instant::now() < deadline, "not within 15 s: {what}; last {seen:?}");
    }
}

fn has(seen: &[(String, u64)], cluster: &str, n: u64) -> bool {
    seen.iter().any(|(c, i)| c == cluster && *i == n)
}

#[tokio::test]
async fn remote_secrets_add_rotate_refuse_and_delete_without_a_restart() {
    let primary = cluster(&["10.241.0.1"]).await;
    let (remote_a, remote_b) = (
        cluster(&["10.242.0.1"]).await,
        cluster(&["10.242.0.2", "10.242.0.3"]).await,
    );
    // Present before the first list, and to be ignored: no label, or another namespace.
    let mut unlabelled = remote_secret("not-a-remote-secret", &[("cluster3", &remote_a)]);
    unlabelled["metadata"]["labels"] = json!({});
    primary.apply(unlabelled);
    let mut elsewhere = remote_secret("in-default", &[("cluster4", &remote_a)]);
    elsewhere["metadata"]["namespace"] = json!("default");
    primary.apply(elsewhere);
    let dir = support::scratch("remote-secrets");
    let kubeconfig = dir.join("primary.kubeconfig");
    support::write(&kubeconfig, primary.kubeconfig()).unwrap();
    let c = Controller::start(&[
        "--kubeconfig",
        &format!("cluster1={}", kubeconfig.display()),
        "--remote-secrets-from",
        "cluster1",
    ]);
    let any = |_: &[(String, u64)]| true;
    until(&c, "cluster1 synced", |s| has(s, "cluster1", 1), any).await;

    // Add: the secret's cluster is watched and served.
    primary.apply(remote_secret(
        "istio-remote-secret-cluster2",
        &[("cluster2", &remote_a)],
    ));
    until(&c, "cluster2 added", |s| has(s, "cluster2", 1), any).await;

    // Rotate to other credentials (here: another server): the cluster never leaves meanwhile.
    primary.apply(remote_secret(
        "istio-remote-secret-cluster2",
        &[("cluster2", &remote_b)],
    ));
    until(
        &c,
        "cluster2 rotated",
        |s| has(s, "cluster2", 2),
        |s| s.iter().any(|(c, _)| c == "cluster2"),
    )
    .await;

    // A second secret claiming cluster2, and one claiming our own ID: refused, nothing changes.
    primary.apply(remote_secret("someone-else", &[("cluster2", &remote_a)]));
    primary.apply(remote_secret("loop", &[("cluster1", &remote_a)]));
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    while c.metric("isthmus_controller_remote_cluster_refusals_total", &[]) != Some(2.0) {
        assert!(Instant::now() < deadline, "refusals not counted");
        tick.tick().await;
    }
    assert_eq!(
        c.metric(
            "isthmus_controller_remote_cluster_refusals_total",
            &[("reason", "duplicate")]
        ),
        Some(1.0)
    );
    assert_eq!(
        c.metric(
            "isthmus_controller_remote_cluster_refusals_total",
            &[("reason", "own_cluster")]
        ),
        Some(1.0)
    );
    assert_eq!(clusters(&c), [("cluster1".to_owned(), 1), ("cluster2".to_owned(), 2)]);

    // Delete: cluster2 is pruned, cluster1 untouched.
    primary.delete("Secret", "istio-system", "someone-else");
    primary.delete("Secret", "istio-system", "istio-remote-secret-cluster2");
    until(
        &c,
        "cluster2 pruned",
        |s| s == [("cluster1".to_owned(), 1)],
        |s| has(s, "cluster1", 1),
    )
    .await;
    std::fs::remove_dir_all(&dir).unwrap();
}
