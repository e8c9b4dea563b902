//! Istio's own examples of security config (copied from istio/istio, see
//! /work/shared/conformance/istio-examples/SOURCES.md): every document Istio
//! accepts is read and kept, every one it refuses is refused with Istio's reason
//! (the `_err` it carries), and a refused one never takes the rest of its file
//! down.

use std::path::{Path, PathBuf};

use federation_controller::objects::ClusterObjects;

/// Where the examples are; `ISTIO_EXAMPLES` overrides.
fn examples() -> PathBuf {
    std::env::var_os("ISTIO_EXAMPLES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/work/shared/conformance/istio-examples"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e} (set ISTIO_EXAMPLES)", path.display()))
}

/// The documents of `file`, each with the `_err` it carries (taken out).
fn documents(file: &Path) -> Vec<(usize, serde_json::Value, Option<String>)> {
    mesh_vocab::manifest::documents(file, &read(file))
        .unwrap()
        .into_iter()
        .map(|(n, mut doc)| {
            let err = doc
                .as_object_mut()
                .and_then(|o| o.remove("_err"))
                .map(|e| e.as_str().unwrap().to_owned());
            (n, doc, err)
        })
        .collect()
}

/// Reads one document (as JSON, which is YAML) on its own.
fn load(doc: &serde_json::Value) -> ClusterObjects {
    let mut o = ClusterObjects::default();
    let skipped = o
        .add_yaml(Path::new("doc.yaml"), &doc.to_string())
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(skipped.is_empty(), "a security kind was not read: {skipped:?}");
    o
}

fn kept(o: &ClusterObjects) -> usize {
    o.authorization_policies.len() + o.peer_authentications.len()
}

#[test]
fn every_document_istio_accepts_is_read() {
    let dir = examples();
    let mut seen = 0;
    for file in ["validation/authz-valid.yaml", "validation/peerauth-valid.yaml"] {
        for (n, doc, err) in documents(&dir.join(file)) {
            assert_eq!(err, None, "{file} document {n}: a valid example with an _err");
            let o = load(&doc);
            assert!(o.refused.is_empty(), "{file} document {n} refused: {:?}", o.refused);
            assert_eq!(kept(&o), 1, "{file} document {n}");
            seen += 1;
        }
    }
    assert_eq!(seen, 4, "the four valid examples");
    for (file, want) in [
        ("testdata/integration-authz-a.yaml", 2),
        ("testdata/peer-authn-strict.yaml", 1),
        ("testdata/authn.yaml", 1),
    ] {
        let path = dir.join(file);
        let mut o = ClusterObjects::default();
        assert!(o.add_yaml(&path, &read(&path)).unwrap().is_empty());
        assert!(o.refused.is_empty(), "{file}: {:?}", o.refused);
        assert_eq!(kept(&o), want, "{file}");
    }
}

#[test]
fn every_document_istio_refuses_is_refused_with_istios_reason() {
    let dir = examples();
    let mut seen = 0;
    for file in ["validation/authz-invalid.yaml", "validation/peerauth-invalid.yaml"] {
        for (n, doc, err) in documents(&dir.join(file)) {
            let want = err.unwrap_or_else(|| panic!("{file} document {n} has no _err"));
            let o = load(&doc);
            assert_eq!(kept(&o), 0, "{file} document {n} was kept; Istio says: {want}");
            let [refused] = &o.refused[..] else {
                panic!("{file} document {n}: {:?}", o.refused)
            };
            let got = refused.to_string();
            assert!(
                got.contains(&want),
                "{file} document {n}: {got:?} does not say {want:?}"
            );
            seen += 1;
        }
    }
    assert_eq!(seen, 8, "the eight invalid examples");
}

#[test]
fn refused_documents_leave_the_rest_of_the_file_served() {
    let dir = examples();
    // Istio's invalid and valid examples in one file, as a user might have them.
    let text = [
        "validation/peerauth-invalid.yaml",
        "validation/authz-valid.yaml",
        "validation/authz-invalid.yaml",
        "validation/peerauth-valid.yaml",
    ]
    .iter()
    .flat_map(|f| documents(&dir.join(f)))
    .map(|(_, doc, _)| doc.to_string())
    .collect::<Vec<_>>()
    .join("\n---\n");
    let mut o = ClusterObjects::default();
    o.add_yaml(Path::new("c1/mixed.yaml"), &text).unwrap();
    assert_eq!((o.authorization_policies.len(), o.peer_authentications.len()), (2, 2));
    assert_eq!(o.refused.len(), 8);
    assert!(
        o.refused[0]
            .to_string()
            .starts_with("c1/mixed.yaml: document 1: field `spec.mtls.mode`: "),
        "each names its file, document and field: {}",
        o.refused[0]
    );
}
