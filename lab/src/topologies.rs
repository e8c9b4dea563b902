//! The four topology files of `topologies/`, built into the binary so `isthmus lab up`
//! works from any directory.

use std::path::{Path, PathBuf};

use mesh_vocab::ManifestError;
use mesh_vocab::topology::Topology;

/// The topology `lab up` builds when given none.
pub const DEFAULT: &str = "multi-primary-gateways";

/// (name, file text) of every built-in topology.
pub const BUILT_IN: [(&str, &str); 4] = [
    ("single-primary", include_str!("../../topologies/single-primary.yaml")),
    ("primary-remote", include_str!("../../topologies/primary-remote.yaml")),
    ("multi-primary", include_str!("../../topologies/multi-primary.yaml")),
    (
        "multi-primary-gateways",
        include_str!("../../topologies/multi-primary-gateways.yaml"),
    ),
];

/// A built-in topology by name, as its file says.
pub fn by_name(name: &str) -> Result<Topology, ManifestError> {
    let file = PathBuf::from(format!("topologies/{name}.yaml"));
    let (_, text) = BUILT_IN
        .iter()
        .find(|(n, _)| *n == name)
        .ok_or_else(|| ManifestError::file(&file, "no such built-in topology"))?;
    Topology::from_yaml(&file, text)
}

/// The default topology.
pub fn default_topology() -> Topology {
    by_name(DEFAULT).expect("the built-in topologies are checked by the tests")
}

/// What the user named: a built-in topology's name, or a file path.
pub fn resolve(arg: Option<&str>) -> Result<Topology, ManifestError> {
    match arg {
        None => by_name(DEFAULT),
        Some(a) if BUILT_IN.iter().any(|(n, _)| *n == a) && !Path::new(a).exists() => by_name(a),
        Some(a) => Topology::load(Path::new(a)),
    }
}

/// What to record of the user's argument so [`resolve`] finds the same topology from any
/// directory: a built-in name as it is, a file by its absolute path.
pub fn source_of(arg: Option<&str>) -> String {
    match arg {
        None => String::new(),
        Some(a) if BUILT_IN.iter().any(|(n, _)| *n == a) && !Path::new(a).exists() => a.into(),
        Some(a) => std::fs::canonicalize(a)
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| a.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_vocab::topology::ControlPlane;

    #[test]
    fn all_four_files_load_and_say_what_their_names_say() {
        for (name, _) in BUILT_IN {
            let t = by_name(name).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(t.name, name);
            let reviews = t.workloads.iter().find(|w| w.name == "reviews").expect("reviews");
            assert_eq!((reviews.namespace.as_str(), reviews.port), ("default", 9080));
            let last = &t.clusters.last().unwrap().name;
            let v1 = &reviews.versions.iter().find(|v| v.version == "v1").unwrap().clusters;
            assert_eq!(v1.len(), t.clusters.len(), "{name}: v1 runs in every cluster");
            let v2 = &reviews.versions.iter().find(|v| v.version == "v2").unwrap().clusters;
            assert_eq!(v2, std::slice::from_ref(last), "{name}: v2 runs in the last cluster");
            assert!(t.workloads.iter().any(|w| w.name == "productpage"), "{name}");
        }
        let primaries = |n: &str| {
            let t = by_name(n).unwrap();
            let p = t
                .clusters
                .iter()
                .filter(|c| c.control_plane == ControlPlane::Primary)
                .count();
            (t.clusters.len(), p, t.networks().len())
        };
        assert_eq!(primaries("single-primary"), (1, 1, 1));
        assert_eq!(primaries("primary-remote"), (2, 1, 1));
        assert_eq!(primaries("multi-primary"), (2, 2, 1));
        assert_eq!(primaries("multi-primary-gateways"), (3, 3, 3));
        assert!(default_topology().clusters.iter().all(|c| c.east_west_gateway));
    }

    #[test]
    fn resolves_names_and_paths() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../topologies");
        for (name, _) in BUILT_IN {
            let path = dir.join(format!("{name}.yaml"));
            assert_eq!(
                resolve(Some(&path.display().to_string())).unwrap(),
                by_name(name).unwrap()
            );
            assert_eq!(resolve(Some(name)).unwrap().name, name);
        }
        assert_eq!(resolve(None).unwrap().name, DEFAULT);
        let e = resolve(Some("no-such-topology")).unwrap_err().to_string();
        assert!(e.starts_with("no-such-topology: cannot read"), "{e}");
    }
}
