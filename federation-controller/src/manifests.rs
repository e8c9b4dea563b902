//! The manifest source: a directory with one subdirectory per cluster, each
//! holding multi-document YAML in Kubernetes shapes. Labs and tests use it where
//! there is no API server.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use mesh_vocab::ClusterId;

use mesh_vocab::ManifestError;

use crate::objects::{ClusterObjects, Skipped};

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
