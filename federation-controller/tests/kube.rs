//! The Kubernetes source against a test API server that speaks the real
//! list/watch protocol: initial sync, changes, `410 Gone` → relist, a dropped
//! watch → resume without relisting.

mod support;

use std::time::Duration;

use federation_controller::kube_source::{self, Update};
use federation_controller::model::{ClusterModel, MeshConfig};
use kube::config::{KubeConfigOptions, Kubeconfig};
use mesh_vocab::ClusterId;
use serde_json::json;
use support::kube_api::FakeApi;
use tokio::sync::mpsc;

fn slice(addresses: &[&str]) -> serde_json::Value {
    let endpoints: Vec<_> = addresses
        .iter()
        .map(|a| json!({"addresses": [a], "targetRef": {"kind": "Pod", "name": "reviews-1"}}))
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": "reviews-abc", "namespace": "default", "labels": {"kubernetes.io/service-name": "reviews"}},
           "addressType": "IPv4", "ports": [{"name": "http", "port": 9080}], "endpoints": endpoints})
}

/// Waits until the published state of the cluster has exactly these instance
/// addresses (a relist may publish the unchanged state first).
async fn until_addresses(rx: &mut mpsc::Receiver<Update>, want: &[&str]) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let mut last: Vec<String> = Vec::new();
    while last != want {
        let update = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("never published {want:?}; last {last:?}"))
            .unwrap();
        if let Update::Objects(id, objects) = update {
            let m = ClusterModel::build(&id, &objects, &MeshConfig::default());
            last = m.instances.iter().map(|i| i.address.to_string()).collect();
        }
    }
}

#[tokio::test]
async fn lists_watches_relists_after_410_and_resumes_after_a_dropped_watch() {
    let api = FakeApi::start().await;
    api.apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}}));
    api.apply(
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "reviews", "namespace": "default"},
                     "spec": {"ports": [{"name": "http", "port": 9080}]}}),
    );
    api.apply(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "reviews-1", "namespace": "default"}}));
    api.apply(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"}}));
    api.apply(slice(&["10.241.0.1", "10.241.0.2"]));

    let kubeconfig = Kubeconfig::from_yaml(&api.kubeconfig()).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap();
    let client = kube::Client::try_from(config).unwrap();
    let (tx, mut rx) = mpsc::channel(16);
    let source = tokio::spawn(kube_source::run(ClusterId::new("cluster1"), client, tx));

    // Initial sync: published once every kind is listed.
    until_addresses(&mut rx, &["10.241.0.1", "10.241.0.2"]).await;
    assert_eq!(api.counters().0, 5, "one list per kind");

    // A change arrives over the watch.
    api.apply(slice(&["10.241.0.1", "10.241.0.2", "10.241.0.3"]));
    until_addresses(&mut rx, &["10.241.0.1", "10.241.0.2", "10.241.0.3"]).await;
    let (lists, _, bookmarks) = api.counters();
    assert_eq!(lists, 5, "no relist for a change");
    assert!(bookmarks >= 1, "the watches asked for bookmarks and got them");

    // The server loses its history and cuts the watches: resuming is refused with
    // 410, so the watchers relist — and see the change made meanwhile.
    api.forget_history();
    api.drop_watches();
    api.apply(slice(&["10.241.0.9"]));
    until_addresses(&mut rx, &["10.241.0.9"]).await;
    let (lists, gone, _) = api.counters();
    assert!(gone >= 1, "a resume from a compacted version got 410");
    assert!(lists > 5, "410 made the watchers relist");

    // A watch dropped without compaction resumes from where it was: no relist.
    let lists_before = api.counters().0;
    api.drop_watches();
    api.delete("EndpointSlice", "default", "reviews-abc");
    until_addresses(&mut rx, &[]).await;
    assert_eq!(api.counters().0, lists_before, "a plain resume does not relist");
    source.abort();
}
