//! Manifest mode: what each cluster needs, as files `OUT/<cluster>/<namespace>_<kind>_<name>.yaml`
//! (`_` appears in no namespace, kind or name, so the file names cannot collide). A file is
//! rewritten only when its content changes, so its mtime says when the object last changed;
//! a file of ours (`app.kubernetes.io/managed-by: isthmus`) that is no longer needed is
//! deleted; a file of the same name that is not ours is left alone and counted.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use mesh_vocab::ClusterId;

use super::{Object, WritebackMetrics, desired, is_ours};
use crate::manifests;

/// The file an object is written to, inside its cluster's directory.
pub fn file_name(o: &Object) -> String {
    format!("{}_{}_{}.yaml", o.namespace, o.kind.kind().to_ascii_lowercase(), o.name)
}

/// What one reconcile did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    pub written: Vec<PathBuf>,
    pub deleted: Vec<PathBuf>,
    /// Files of our names that are not ours.
    pub conflicts: Vec<(ClusterId, super::Kind)>,
}

/// Whether the file at `path` holds an object of ours (one document with our label).
fn ours(path: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(path) else {
        return false;
    };
    matches!(mesh_vocab::manifest::documents(path, &text).as_deref(), Ok([(_, doc)]) if is_ours(doc))
}

/// Makes `out` hold exactly `desired`: writes what is new or changed, deletes our files
/// that are no longer needed (also in directories of clusters that left).
pub fn reconcile(out: &Path, desired: &BTreeMap<ClusterId, Vec<Object>>) -> std::io::Result<Outcome> {
    let mut outcome = Outcome::default();
    let mut wanted: BTreeMap<PathBuf, BTreeSet<String>> = BTreeMap::new();
    for (cluster, objects) in desired {
        let dir = out.join(cluster.as_str());
        std::fs::create_dir_all(&dir)?;
        for o in objects {
            let name = file_name(o);
            let path = dir.join(&name);
            wanted.entry(dir.clone()).or_default().insert(name.clone());
            let text = serde_saphyr::to_string(&o.body).map_err(std::io::Error::other)?;
            match std::fs::read_to_string(&path) {
                Ok(existing) if existing == text => continue,
                Ok(_) if !ours(&path) => {
                    outcome.conflicts.push((cluster.clone(), o.kind));
                    continue;
                }
                _ => {}
            }
            // Whole or not at all: a reader never sees half a file.
            let tmp = dir.join(format!(".{name}.tmp"));
            std::fs::write(&tmp, text)?;
            std::fs::rename(&tmp, &path)?;
            outcome.written.push(path);
        }
    }
    let Ok(entries) = std::fs::read_dir(out) else {
        return Ok(outcome);
    };
    for dir in entries.filter_map(Result::ok).map(|e| e.path()).filter(|p| p.is_dir()) {
        let keep = wanted.get(&dir);
        for path in std::fs::read_dir(&dir)?.filter_map(Result::ok).map(|e| e.path()) {
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            let needed = keep.is_some_and(|k| k.contains(name));
            if !needed && name.ends_with(".yaml") && ours(&path) {
                std::fs::remove_file(&path)?;
                outcome.deleted.push(path);
            }
        }
    }
    Ok(outcome)
}

/// Follows the manifest directory `source` (checked every `interval`) and keeps `out`
/// reconciled with it. A directory that cannot be read, or a bad manifest, changes nothing:
/// half-read input must never garbage-collect what the last good input wrote.
pub async fn run(source: PathBuf, out: PathBuf, domain: String, interval: Duration, metrics: Arc<WritebackMetrics>) {
    // The single process of manifest mode is the leader.
    metrics.leader.set(1);
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seen = None;
    loop {
        tick.tick().await;
        let now = manifests::fingerprint(&source);
        if seen.as_ref() == Some(&now) {
            continue;
        }
        let clusters = match manifests::read_dir(&source) {
            Ok(c) => c,
            Err(e) => {
                // Logged once per state of the directory: `seen` holds it until it changes.
                tracing::error!("write-back: manifests refused, output kept: {e}");
                seen = Some(now);
                continue;
            }
        };
        seen = Some(now);
        let objects = clusters.into_iter().map(|(id, c)| (id, c.objects)).collect();
        match reconcile(&out, &desired(&objects, &domain)) {
            Ok(o) => {
                for (cluster, kind) in &o.conflicts {
                    tracing::warn!(%cluster, kind = kind.kind(), "write-back: a file of our name is not ours; left alone");
                    metrics.conflict(cluster, *kind);
                }
                for p in &o.written {
                    tracing::info!(file = %p.display(), "write-back: written");
                }
                for p in &o.deleted {
                    tracing::info!(file = %p.display(), "write-back: deleted");
                }
            }
            Err(e) => {
                tracing::error!(out = %out.display(), "write-back failed: {e}");
                seen = None; // try again next tick
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn object(name: &str, ours: bool) -> Object {
        let labels = if ours {
            json!({"app.kubernetes.io/managed-by": "isthmus"})
        } else {
            json!({})
        };
        Object {
            kind: super::super::Kind::ServiceImport,
            namespace: "default".into(),
            name: name.into(),
            body: json!({"apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceImport",
                         "metadata": {"name": name, "namespace": "default", "labels": labels},
                         "spec": {"type": "ClusterSetIP"}}),
        }
    }

    #[test]
    fn writes_changes_only_deletes_ours_and_never_touches_others() {
        let out = std::env::temp_dir().join(format!("isthmus-wb-dir-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&out);
        let c2 = ClusterId::new("c2");
        let want = BTreeMap::from([(c2.clone(), vec![object("a", true), object("b", true)])]);
        let first = reconcile(&out, &want).unwrap();
        assert_eq!(first.written.len(), 2);
        assert!(
            reconcile(&out, &want).unwrap().written.is_empty(),
            "unchanged: not rewritten"
        );

        // Someone else's file with one of our names, and one with another name.
        let theirs = out.join("c2/default_serviceimport_c.yaml");
        std::fs::write(&theirs, "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n").unwrap();
        std::fs::write(out.join("c2/notes.yaml"), "kind: Note\n").unwrap();
        let want = BTreeMap::from([(c2.clone(), vec![object("a", true), object("c", true)])]);
        let o = reconcile(&out, &want).unwrap();
        assert_eq!(o.conflicts, [(c2.clone(), super::super::Kind::ServiceImport)]);
        assert_eq!(o.deleted, [out.join("c2/default_serviceimport_b.yaml")]);
        assert!(std::fs::read_to_string(&theirs).unwrap().contains("ConfigMap"));
        assert!(out.join("c2/notes.yaml").exists());

        // A cluster that needs nothing any more loses our files only.
        let o = reconcile(&out, &BTreeMap::new()).unwrap();
        assert_eq!(o.deleted, [out.join("c2/default_serviceimport_a.yaml")]);
        assert!(theirs.exists());
        std::fs::remove_dir_all(&out).unwrap();
    }
}
