//! The manifest source: a directory with one subdirectory per cluster, each
//! holding multi-document YAML in Kubernetes shapes. Labs and tests use it where
//! there is no API server.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use mesh_vocab::ClusterId;

use mesh_vocab::ManifestError;

use crate::model::{ClusterModel, MeshConfig};
use crate::objects::{ClusterObjects, Skipped};
use crate::registry::{Freshness, Registry};
use crate::xds::Snapshot;

/// One cluster read from its directory.
#[derive(Debug, Clone, Default)]
pub struct ClusterManifests {
    pub objects: ClusterObjects,
    /// Documents of kinds federation does not read, by file.
    pub skipped: Vec<(PathBuf, Skipped)>,
}

/// Reads every cluster under `dir`: each subdirectory is a cluster named by it,
/// and every `*.yaml`/`*.yml` file in it (sorted, not recursive) is read.
pub fn read_dir(dir: &Path) -> Result<BTreeMap<ClusterId, ClusterManifests>, ManifestError> {
    let io = |path: &Path, e: std::io::Error| ManifestError::file(path, format!("cannot read: {e}"));
    let mut clusters = BTreeMap::new();
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| io(dir, e))?
        .filter_map(Result::ok)
        .collect();
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        if !path.is_dir() {
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue; // editors' and ConfigMap volumes' bookkeeping
        }
        let mut files: Vec<PathBuf> = std::fs::read_dir(&path)
            .map_err(|e| io(&path, e))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.is_file() && matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
            .collect();
        files.sort();
        let mut cluster = ClusterManifests::default();
        for file in files {
            let text = std::fs::read_to_string(&file).map_err(|e| io(&file, e))?;
            for s in cluster.objects.add_yaml(&file, &text)? {
                cluster.skipped.push((file.clone(), s));
            }
        }
        clusters.insert(ClusterId::new(name), cluster);
    }
    Ok(clusters)
}

/// Identifies the state of a manifest directory without reading the files:
/// every cluster directory and YAML file with its modification time, length and
/// inode (an atomic rename or a ConfigMap's symlink swap changes the inode).
pub(crate) fn fingerprint(dir: &Path) -> Vec<(PathBuf, Option<std::time::SystemTime>, u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let mut out = Vec::new();
    let mut walk = vec![dir.to_owned()];
    while let Some(d) = walk.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.filter_map(Result::ok) {
            let path = e.path();
            let Ok(m) = std::fs::metadata(&path) else { continue };
            if m.is_dir() && d == dir {
                walk.push(path.clone());
            }
            out.push((path, m.modified().ok(), m.len(), m.ino()));
        }
    }
    out.sort();
    out
}

/// Reads `dir` into an xDS snapshot at `version`.
pub fn snapshot(dir: &Path, mesh: &MeshConfig, version: u64) -> Result<Snapshot, ManifestError> {
    let clusters = read_dir(dir)?;
    let now = Instant::now();
    let mut registry = Registry::default();
    for (id, c) in &clusters {
        for (file, s) in &c.skipped {
            tracing::debug!(cluster = %id, file = %file.display(), document = s.document, kind = %s.kind, "not read (yet)");
        }
        for e in &c.objects.refused {
            tracing::error!(cluster = %id, "{e}; the rest keeps serving");
        }
        registry.update(ClusterModel::build(id, &c.objects, mesh), now);
    }
    Ok(Snapshot::new(
        version,
        now,
        registry.live(now, Freshness::default()),
        mesh.clone(),
    ))
}

/// Re-reads `dir` every `interval` and publishes a new snapshot when what it
/// means changed; a change is read once it has held still for one interval
/// ([`sidecar::settle`]). A directory that cannot be read, or a bad manifest, is
/// reported and the last good snapshot keeps serving.
pub async fn watch(dir: PathBuf, mesh: MeshConfig, interval: Duration, tx: watch::Sender<Arc<Snapshot>>) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_error = None;
    // What was read last: reading and parsing every file each tick is work for
    // nothing while the directory is unchanged, which is nearly always.
    let mut settle = sidecar::settle::Settle::new(fingerprint(&dir));
    loop {
        tick.tick().await;
        if !settle.poll(fingerprint(&dir)) {
            if tx.is_closed() {
                return;
            }
            continue;
        }
        let current = tx.borrow().clone();
        match snapshot(&dir, &mesh, current.version + 1).map(|s| s.after(&current)) {
            Ok(next) => {
                last_error = None;
                let same = next.same_state(&current);
                if !same {
                    tracing::info!(
                        version = next.version,
                        clusters = next.clusters.len(),
                        "manifests changed: pushing"
                    );
                    if tx.send(Arc::new(next)).is_err() {
                        return;
                    }
                }
            }
            Err(e) => {
                let msg = e.to_string();
                if last_error.as_ref() != Some(&msg) {
                    tracing::error!("manifests refused, still serving version {}: {msg}", current.version);
                    last_error = Some(msg);
                }
            }
        }
        if tx.is_closed() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_invalid_istio_document_is_refused_and_the_rest_still_serves() {
        let dir = std::env::temp_dir().join(format!("isthmus-manifests-refused-{}", std::process::id()));
        let c1 = dir.join("c1");
        std::fs::create_dir_all(&c1).unwrap();
        std::fs::write(
            c1.join("istio.yaml"),
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: broken}\nspec: {hosts: [reviews], http: [{route: [{destination: {host: reviews}, weight: -1}]}]}\n---\n\
             apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: reviews}\nspec: {host: reviews, subsets: [{name: v1, labels: {version: v1}}]}\n",
        )
        .unwrap();
        let clusters = read_dir(&dir).unwrap();
        let c = &clusters[&ClusterId::new("c1")];
        assert_eq!(c.objects.destination_rules.len(), 1, "the valid rule is kept");
        assert!(c.objects.virtual_services.is_empty());
        assert_eq!(
            c.objects.refused[0].to_string(),
            format!(
                "{}: document 1: VirtualService default/broken refused: spec.http[0].route[0].weight: weight -1 < 0",
                c1.join("istio.yaml").display()
            )
        );
        let snap = snapshot(&dir, &MeshConfig::default(), 1).expect("the directory still serves");
        let host = mesh_vocab::Hostname::parse("reviews.default.svc.cluster.local").unwrap();
        assert!(snap.routing().destination_rule(&host).is_some());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
