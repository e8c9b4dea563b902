//! Istio's own examples and validation cases for the networking kinds we read
//! (VirtualService, DestinationRule, ServiceEntry): every document Istio accepts
//! loads, and every one it refuses is refused here with Istio's reason.
//!
//! The `*-invalid.yaml` documents carry `_err:`, the message Istio's API server
//! or webhook answers with; it is stripped before parsing. Cases upstream marks
//! `#_err: "TODO"` (Istio itself does not refuse them yet) are commented out
//! upstream, so the YAML reader skips them, as do we.

use std::path::{Path, PathBuf};

use federation_controller::networking::{self, ConfigError};
use mesh_vocab::manifest;

const EXAMPLES: &str = "/work/shared/conformance/istio-examples";

/// Every document of `file` of a kind we read: (document number, `_err`, result).
fn load(file: &Path) -> Vec<(usize, Option<String>, Result<networking::NetworkingConfig, ConfigError>)> {
    let text = std::fs::read_to_string(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    let mut out = Vec::new();
    for (n, mut doc) in manifest::documents(file, &text).unwrap() {
        let err = doc
            .as_object_mut()
            .and_then(|o| o.remove("_err"))
            .and_then(|e| e.as_str().map(str::to_owned));
        let field = |k: &str| doc.get(k).and_then(|v| v.as_str()).unwrap_or_default().to_owned();
        let (api_version, kind) = (field("apiVersion"), field("kind"));
        if networking::reads(&api_version, &kind) {
            out.push((n, err, networking::parse(file, n, "", &kind, doc)));
        }
    }
    out
}

fn files(dir: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(Path::new(EXAMPLES).join(dir))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    v.sort();
    v
}

#[test]
fn istios_valid_examples_load() {
    let mut valid: Vec<PathBuf> = [
        "destinationrule-valid.yaml",
        "serviceentry-valid.yaml",
        "workloadentry-valid.yaml",
    ]
    .iter()
    .map(|f| Path::new(EXAMPLES).join("validation").join(f))
    .collect();
    valid.push(Path::new(EXAMPLES).join("istio-io/workload-entry-reference-examples.yaml"));
    valid.extend(files("samples"));
    valid.extend(files("testdata"));
    let mut loaded = 0;
    for file in valid {
        for (n, _, result) in load(&file) {
            if let Err(e) = result {
                panic!("{} document {n} must load: {e}", file.display());
            }
            loaded += 1;
        }
    }
    // Every sample and test file of ours is read, not silently skipped.
    assert!(loaded >= 40, "only {loaded} documents of our kinds were found");
}

#[test]
fn istios_invalid_examples_are_refused_with_istios_reason() {
    let mut refused = 0;
    for f in [
        "destinationrule-invalid.yaml",
        "serviceentry-invalid.yaml",
        "workloadentry-invalid.yaml",
    ] {
        let file = Path::new(EXAMPLES).join("validation").join(f);
        for (n, err, result) in load(&file) {
            let err = err.unwrap_or_else(|| panic!("{f} document {n} has no _err"));
            match result {
                Ok(_) => panic!("{f} document {n} must be refused with {err:?}"),
                Err(e) => {
                    let text = e.to_string();
                    assert!(text.contains(&err), "{f} document {n}: {text:?} should say {err:?}");
                    assert!(
                        text.contains(&format!("document {n}")),
                        "the error names the document: {text}"
                    );
                }
            }
            refused += 1;
        }
    }
    assert_eq!(refused, 3 + 12 + 7, "every case that is not TODO upstream");
}
