//! Write-back of the ServiceEntries and ServiceImports of exported services, through the
//! real controller process: into a directory per cluster (manifest mode), and into each
//! cluster's API server (the test API server, over HTTP with the kube client) with a Lease
//! deciding which of two replicas writes.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::kube_api::{FakeApi, remote_secret};
use support::{Controller, eventually, until};

fn service_yaml(name: &str, port: u16) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec: {{ports: [{{name: http, port: {port}}}]}}\n"
    )
}

fn export_yaml(name: &str) -> String {
    format!(
        "apiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {{name: {name}, namespace: default}}\n"
    )
}

fn read_yaml(path: &Path) -> Option<Value> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut docs = mesh_vocab::manifest::documents(path, &text).ok()?;
    (docs.len() == 1).then(|| docs.remove(0).1)
}

fn files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn manifest_mode_writes_a_directory_per_cluster_and_collects_garbage() {
    let dir = support::scratch("wb-manifests");
    let (src, out) = (dir.join("src"), dir.join("out"));
    for c in ["cluster1", "cluster2", "cluster3"] {
        std::fs::create_dir_all(src.join(c)).unwrap();
    }
    // cluster1 exports reviews; cluster2 has no reviews; cluster3 has its own.
    let c1 = src.join("cluster1/objects.yaml");
    support::write(
        &c1,
        format!("{}---\n{}", service_yaml("reviews", 9080), export_yaml("reviews")),
    )
    .unwrap();
    support::write(src.join("cluster2/objects.yaml"), service_yaml("productpage", 9080)).unwrap();
    support::write(src.join("cluster3/objects.yaml"), service_yaml("reviews", 9080)).unwrap();
    let controller = Controller::start(&[
        "--manifests",
        src.to_str().unwrap(),
        "--writeback-dir",
        out.to_str().unwrap(),
    ]);

    let entry = out.join("cluster2/default_serviceentry_isthmus-reviews-default.yaml");
    let import = out.join("cluster2/default_serviceimport_reviews.yaml");
    let se = eventually("the ServiceEntry in cluster2", Duration::from_secs(10), || {
        read_yaml(&entry)
    });
    assert_eq!(se["spec"]["hosts"], json!(["reviews.default.svc.cluster.local"]));
    assert_eq!(
        se["spec"]["ports"],
        json!([{"number": 9080, "name": "http", "protocol": "HTTP"}])
    );
    assert_eq!(se["metadata"]["labels"]["app.kubernetes.io/managed-by"], "isthmus");
    assert_eq!(se["metadata"]["labels"]["source.isthmus.io/cluster1"], "true");
    let si = read_yaml(&import).expect("the ServiceImport beside it");
    assert_eq!(si["spec"]["type"], "ClusterSetIP");
    assert_eq!(
        files(&out.join("cluster3")),
        ["default_serviceimport_reviews.yaml"],
        "cluster3 has its own reviews: an import, no ServiceEntry"
    );
    assert!(files(&out.join("cluster1")).is_empty(), "the exporter gets nothing");
    assert_eq!(controller.metric("isthmus_controller_leader", &[]), Some(1.0));

    // Another export arrives: its files appear, and the unchanged ones are not rewritten.
    let mtimes = |paths: &[&Path]| -> Vec<_> {
        paths
            .iter()
            .map(|p| std::fs::metadata(p).unwrap().modified().unwrap())
            .collect()
    };
    let before = mtimes(&[&entry, &import]);
    support::write(
        &c1,
        format!(
            "{}---\n{}---\n{}---\n{}",
            service_yaml("reviews", 9080),
            export_yaml("reviews"),
            service_yaml("ratings", 9080),
            export_yaml("ratings")
        ),
    )
    .unwrap();
    let ratings = out.join("cluster2/default_serviceimport_ratings.yaml");
    eventually("ratings imported into cluster2", Duration::from_secs(10), || {
        read_yaml(&ratings)
    });
    assert_eq!(
        mtimes(&[&entry, &import]),
        before,
        "unchanged objects are not rewritten"
    );

    // The reviews Service goes (its export stays, exporting nothing): its files go.
    support::write(
        &c1,
        format!(
            "{}---\n{}---\n{}",
            export_yaml("reviews"),
            service_yaml("ratings", 9080),
            export_yaml("ratings")
        ),
    )
    .unwrap();
    eventually("reviews collected from cluster2", Duration::from_secs(10), || {
        (!entry.exists() && !import.exists()).then_some(())
    });
    // Each cluster's directory is written on its own: cluster3's ratings may land after
    // cluster2's were seen.
    let want = [
        "default_serviceentry_isthmus-ratings-default.yaml",
        "default_serviceimport_ratings.yaml",
    ];
    eventually(
        "ratings imported into cluster3, and no more",
        Duration::from_secs(10),
        || (files(&out.join("cluster3")) == want).then_some(()),
    );
    assert!(ratings.exists());
    drop(controller);
    std::fs::remove_dir_all(&dir).unwrap();
}

fn namespace() -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}})
}

fn service(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "default"},
           "spec": {"ports": [{"name": "http", "port": 9080}]}})
}

fn export(name: &str) -> Value {
    json!({"apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceExport",
           "metadata": {"name": name, "namespace": "default"}})
}

/// A cluster with the MCS and Istio CRDs and the default and istio-system namespaces.
async fn cluster() -> FakeApi {
    let api = FakeApi::start().await;
    api.install_crds();
    api.apply(namespace());
    api.apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "istio-system"}}));
    api
}

fn kubeconfig(dir: &Path, name: &str, api: &FakeApi, token: &str) -> String {
    let path = dir.join(format!("{name}-{token}.kubeconfig"));
    support::write(&path, api.kubeconfig_with_token(token)).unwrap();
    format!("{name}={}", path.display())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_mode_writes_ours_leaves_theirs_and_collects_garbage() {
    let (c1, c2) = (cluster().await, cluster().await);
    for name in ["reviews", "details"] {
        c1.apply(service(name));
        c1.apply(export(name));
    }
    // A namespace only cluster1 has: cluster2 gets nothing for it (namespaces are not ours
    // to make), and the rest is written all the same.
    c1.apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}}));
    let mut cart = service("cart");
    cart["metadata"]["namespace"] = json!("shop");
    c1.apply(cart);
    let mut cart = export("cart");
    cart["metadata"]["namespace"] = json!("shop");
    c1.apply(cart);
    // Someone else's ServiceImport already holds the name details would get.
    let theirs = json!({"apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceImport",
        "metadata": {"name": "details", "namespace": "default", "labels": {"team": "other"}},
        "spec": {"type": "Headless"}});
    c2.apply(theirs);
    let before = c2.object("ServiceImport", "default", "details").unwrap();
    let dir = support::scratch("wb-kube");
    let controller = Controller::start(&[
        "--kubeconfig",
        &kubeconfig(&dir, "cluster1", &c1, "a"),
        "--kubeconfig",
        &kubeconfig(&dir, "cluster2", &c2, "a"),
        "--writeback",
        "--leader-identity",
        "replica-a",
        "--lease-renew",
        "200ms",
    ]);

    let patience = Duration::from_secs(15);
    let se = until("reviews' ServiceEntry in cluster2", patience, || {
        c2.object("ServiceEntry", "default", "isthmus-reviews-default")
    })
    .await;
    assert_eq!(se["spec"]["hosts"], json!(["reviews.default.svc.cluster.local"]));
    assert_eq!(se["spec"]["resolution"], "STATIC");
    assert_eq!(se["spec"]["location"], "MESH_INTERNAL");
    assert_eq!(se["metadata"]["labels"]["app.kubernetes.io/managed-by"], "isthmus");
    assert_eq!(se["metadata"]["labels"]["source.isthmus.io/cluster1"], "true");
    let si = until("reviews' ServiceImport in cluster2", patience, || {
        c2.object("ServiceImport", "default", "reviews")
    })
    .await;
    assert_eq!(si["spec"]["type"], "ClusterSetIP");
    until("details' ServiceEntry in cluster2", patience, || {
        c2.object("ServiceEntry", "default", "isthmus-details-default")
    })
    .await;
    let labels = [("cluster", "cluster2"), ("kind", "ServiceImport")];
    until("the conflict counted", patience, || {
        controller
            .metric("isthmus_controller_writeback_conflicts_total", &labels)
            .filter(|n| *n >= 1.0)
    })
    .await;
    assert_eq!(
        c2.object("ServiceImport", "default", "details").unwrap(),
        before,
        "an object that is not ours is never touched"
    );
    // The conflict is met in the ServiceImport pass, after every ServiceEntry was written.
    let entries: Vec<Value> = c2
        .objects("ServiceEntry")
        .iter()
        .map(|o| o["metadata"]["name"].clone())
        .collect();
    assert_eq!(
        entries,
        [json!("isthmus-details-default"), json!("isthmus-reviews-default")]
    );
    assert!(c1.objects("ServiceEntry").is_empty(), "the exporter gets nothing");
    assert!(c1.objects("ServiceImport").is_empty());
    assert_eq!(controller.metric("isthmus_controller_leader", &[]), Some(1.0));
    let lease = c1
        .object("Lease", "istio-system", "isthmus-controller")
        .expect("the lease");
    assert_eq!(lease["spec"]["holderIdentity"], "replica-a");
    assert_eq!(lease["spec"]["leaseDurationSeconds"], 15);

    // The exporter's Service changes: ours is replaced in place (same object, new port).
    let mut changed = service("reviews");
    changed["spec"]["ports"] = json!([{"name": "http", "port": 9081}]);
    c1.apply(changed);
    let updated = until("reviews' ServiceEntry updated", patience, || {
        c2.object("ServiceEntry", "default", "isthmus-reviews-default")
            .filter(|o| o["spec"]["ports"][0]["number"] == 9081)
    })
    .await;
    assert_eq!(
        updated["metadata"]["uid"], se["metadata"]["uid"],
        "replaced, not re-created"
    );

    // Unexported: ours go, theirs stays.
    c1.delete("ServiceExport", "default", "reviews");
    until("reviews collected from cluster2", patience, || {
        (c2.object("ServiceEntry", "default", "isthmus-reviews-default")
            .is_none()
            && c2.object("ServiceImport", "default", "reviews").is_none())
        .then_some(())
    })
    .await;
    assert!(
        c2.object("ServiceEntry", "default", "isthmus-details-default")
            .is_some()
    );
    assert_eq!(c2.object("ServiceImport", "default", "details").unwrap(), before);
    drop(controller);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_secrets_cluster_gets_the_service_entries_it_needs_without_a_restart() {
    let (primary, remote) = (cluster().await, cluster().await);
    primary.apply(service("reviews"));
    primary.apply(export("reviews"));
    let dir = support::scratch("wb-remote");
    let controller = Controller::start(&[
        "--kubeconfig",
        &kubeconfig(&dir, "cluster1", &primary, "a"),
        "--remote-secrets-from",
        "cluster1",
        "--writeback",
        "--leader-identity",
        "replica-a",
        "--lease-renew",
        "200ms",
    ]);
    let patience = Duration::from_secs(15);
    until("the lease taken", patience, || {
        controller
            .metric("isthmus_controller_leader", &[])
            .filter(|l| *l == 1.0)
    })
    .await;
    assert!(remote.objects("ServiceEntry").is_empty());

    // The remote cluster joins through its secret: it is read, and written to.
    primary.apply(remote_secret("istio-remote-secret-cluster2", &[("cluster2", &remote)]));
    let se = until("reviews' ServiceEntry in the remote cluster", patience, || {
        remote.object("ServiceEntry", "default", "isthmus-reviews-default")
    })
    .await;
    assert_eq!(se["metadata"]["labels"]["source.isthmus.io/cluster1"], "true");
    until("reviews' ServiceImport in the remote cluster", patience, || {
        remote.object("ServiceImport", "default", "reviews")
    })
    .await;
    assert!(primary.objects("ServiceEntry").is_empty(), "the exporter gets nothing");
    drop(controller);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_leader_writes_and_another_replica_takes_over_when_it_dies() {
    let (c1, c2) = (cluster().await, cluster().await);
    c1.apply(service("reviews"));
    c1.apply(export("reviews"));
    let dir = support::scratch("wb-lease");
    let lease = ["--lease-duration", "3s", "--lease-renew", "500ms"];
    let replica = |token: &str| {
        let mut args = vec![
            "--kubeconfig".to_owned(),
            kubeconfig(&dir, "cluster1", &c1, token),
            "--kubeconfig".to_owned(),
            kubeconfig(&dir, "cluster2", &c2, token),
            "--writeback".to_owned(),
            "--leader-identity".to_owned(),
            format!("replica-{token}"),
        ];
        args.extend(lease.iter().map(|s| s.to_string()));
        args
    };
    let start = |args: &[String]| Controller::start(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let patience = Duration::from_secs(15);
    let a = start(&replica("a"));
    until("replica a leads", patience, || {
        (a.metric("isthmus_controller_leader", &[]) == Some(1.0)).then_some(())
    })
    .await;
    let b = start(&replica("b"));
    until("replica a has written", patience, || {
        c2.object("ServiceImport", "default", "reviews")
    })
    .await;
    // While b watches the lease, a change is written by a alone.
    until("b has read the lease", patience, || {
        (b.status("/ready") == Some(200)).then_some(())
    })
    .await;
    c1.apply(service("ratings"));
    c1.apply(export("ratings"));
    until("ratings imported", patience, || {
        c2.object("ServiceImport", "default", "ratings")
    })
    .await;
    assert_eq!(b.metric("isthmus_controller_leader", &[]), Some(0.0));
    let object_writes = |token: &str| -> Vec<String> {
        let mut w = c1.writes_by(token);
        w.extend(c2.writes_by(token));
        w.retain(|w| !w.ends_with(" Lease"));
        w
    };
    assert!(object_writes("a").len() >= 4, "a wrote: {:?}", object_writes("a"));
    assert_eq!(
        object_writes("b"),
        Vec::<String>::new(),
        "a replica that does not lead writes nothing"
    );
    assert!(
        !c1.writes_by("b").iter().any(|w| w.ends_with(" Lease")),
        "b never wrote the lease while a renewed it"
    );

    // a dies without releasing the lease: b takes over once it has seen it unrenewed for
    // the lease duration, and writes from then on.
    drop(a);
    let died = Instant::now();
    until("b leads", Duration::from_secs(10), || {
        (b.metric("isthmus_controller_leader", &[]) == Some(1.0)).then_some(())
    })
    .await;
    let took = died.elapsed();
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(5),
        "took over after {took:?}, lease duration 3 s"
    );
    let lease = c1.object("Lease", "istio-system", "isthmus-controller").unwrap();
    assert_eq!(lease["spec"]["holderIdentity"], "replica-b");
    assert_eq!(lease["spec"]["leaseTransitions"], 1);
    c1.delete("ServiceExport", "default", "ratings");
    until("b collected ratings", patience, || {
        c2.object("ServiceImport", "default", "ratings").is_none().then_some(())
    })
    .await;
    assert!(object_writes("b").contains(&"DELETE ServiceImport".to_owned()));
    drop(b);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_stops_hands_the_lease_over_at_once() {
    let c1 = cluster().await;
    let dir = support::scratch("wb-release");
    let replica = |token: &str| {
        let kubeconfig = kubeconfig(&dir, "cluster1", &c1, token);
        let identity = format!("replica-{token}");
        Controller::start(&[
            "--kubeconfig",
            &kubeconfig,
            "--writeback",
            "--leader-identity",
            &identity,
            "--lease-duration",
            "30s",
            "--lease-renew",
            "300ms",
        ])
    };
    let patience = Duration::from_secs(15);
    let mut a = replica("a");
    until("replica a leads", patience, || {
        (a.metric("isthmus_controller_leader", &[]) == Some(1.0)).then_some(())
    })
    .await;
    let b = replica("b");
    until("replica b is up", patience, || {
        (b.status("/ready") == Some(200)).then_some(())
    })
    .await;
    assert_eq!(b.metric("isthmus_controller_leader", &[]), Some(0.0));
    // SIGTERM, as a rolling update sends: a gives the lease up on its way out.
    assert!(a.terminate(Duration::from_secs(10)).is_some_and(|s| s.success()));
    let stopped = Instant::now();
    until("b leads", Duration::from_secs(10), || {
        (b.metric("isthmus_controller_leader", &[]) == Some(1.0)).then_some(())
    })
    .await;
    assert!(
        stopped.elapsed() < Duration::from_secs(5),
        "took over after {:?}, not the 30 s lease duration",
        stopped.elapsed()
    );
    let lease = c1.object("Lease", "istio-system", "isthmus-controller").unwrap();
    assert_eq!(lease["spec"]["holderIdentity"], "replica-b");
    drop(b);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_cannot_renew_stops_leading_before_the_lease_can_expire() {
    let c1 = cluster().await;
    let dir = support::scratch("wb-outage");
    let controller = Controller::start(&[
        "--kubeconfig",
        &kubeconfig(&dir, "cluster1", &c1, "a"),
        "--writeback",
        "--leader-identity",
        "replica-a",
        "--lease-duration",
        "3s",
        "--lease-renew",
        "200ms",
    ]);
    let leader = |want: f64| (controller.metric("isthmus_controller_leader", &[]) == Some(want)).then_some(());
    until("a leads", Duration::from_secs(15), || leader(1.0)).await;
    c1.set_unavailable(true);
    let down = Instant::now();
    until("a steps down", Duration::from_secs(10), || leader(0.0)).await;
    let after = down.elapsed();
    // Two thirds of the lease: after a short outage, and before another replica could
    // take the lease over (3 s after its last renewal).
    assert!(
        after >= Duration::from_millis(1500) && after < Duration::from_secs(3),
        "stepped down after {after:?}"
    );
    c1.set_unavailable(false);
    until("a leads again", Duration::from_secs(10), || leader(1.0)).await;
    drop(controller);
    std::fs::remove_dir_all(&dir).unwrap();
}
