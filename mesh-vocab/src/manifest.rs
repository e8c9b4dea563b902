//! Reading multi-document YAML that users write, with errors that say where:
//! the file, the document and the field (`routes.yaml: document 2: field
//! `endpoints[0].weight`: …`). Every part that reads user YAML speaks this.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

/// A YAML input that cannot be used, and where.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ManifestError {
    /// The file.
    pub file: PathBuf,
    /// 1-based YAML document number, when the error is inside one.
    pub document: Option<usize>,
    /// Path of the offending field within the document, e.g. `spec.ports[0].port`.
    pub field: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl ManifestError {
    /// An error about `file` as a whole (unreadable, not YAML).
    pub fn file(file: &Path, message: impl Into<String>) -> Self {
        Self {
            file: file.to_owned(),
            document: None,
            field: None,
            message: message.into(),
        }
    }

    /// An error about `field` of document `document` of `file`.
    pub fn field(file: &Path, document: usize, field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            file: file.to_owned(),
            document: Some(document),
            field: Some(field.into()),
            message: message.into(),
        }
    }
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(d) = self.document {
            write!(f, ": document {d}")?;
        }
        if let Some(field) = &self.field {
            write!(f, ": field `{field}`")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// The non-empty documents of a YAML text, numbered from 1 as a user counts them:
/// by the `---` lines, empty documents included (a YAML parser drops those, which
/// would shift every number after a stray `---`).
pub fn documents(file: &Path, text: &str) -> Result<Vec<(usize, serde_json::Value)>, ManifestError> {
    let mut out = Vec::new();
    for (i, chunk) in split_documents(text).into_iter().enumerate() {
        let n = i + 1;
        let has_content = chunk.lines().any(|l| {
            let t = l.trim();
            !t.is_empty() && !t.starts_with('#')
        });
        if !has_content {
            continue;
        }
        let value: serde_json::Value = serde_saphyr::from_str(&chunk).map_err(|e| ManifestError {
            document: Some(n),
            ..ManifestError::file(file, format!("not valid YAML: {e}"))
        })?;
        if !value.is_null() {
            out.push((n, value));
        }
    }
    Ok(out)
}

/// Splits at document markers: a line that is `---` (optionally followed by a
/// space and content) at column 0 starts a document; YAML forbids such a line
/// inside a scalar, so this never cuts a value. Text before the first marker is
/// a document only if it has content.
fn split_documents(text: &str) -> Vec<String> {
    let mut docs: Vec<String> = vec![String::new()];
    let mut seen_marker = false;
    for line in text.split_inclusive('\n') {
        let bare = line.trim_end_matches(['\n', '\r']);
        let rest = match bare.strip_prefix("---") {
            Some(r) if r.is_empty() || r.starts_with([' ', '\t']) => r,
            _ => {
                docs.last_mut().expect("never empty").push_str(line);
                continue;
            }
        };
        let first_is_blank = !seen_marker
            && docs.len() == 1
            && docs[0]
                .lines()
                .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'));
        if first_is_blank {
            docs.clear();
        }
        seen_marker = true;
        docs.push(format!("{}\n", rest.trim_start()));
    }
    docs
}

/// Deserialises one document into `T`, naming the field that does not fit.
/// `prefix` is prepended to field paths (for objects nested in a list).
pub fn typed<T: DeserializeOwned>(
    file: &Path,
    document: usize,
    prefix: &str,
    value: serde_json::Value,
) -> Result<T, ManifestError> {
    serde_path_to_error::deserialize(value)
        .map_err(|e| ManifestError::field(file, document, format!("{prefix}{}", e.path()), e.inner().to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Doc {
        a: Vec<u16>,
    }

    #[test]
    fn numbers_documents_as_written_and_names_fields() {
        let f = Path::new("x.yaml");
        let docs = documents(f, "a: [1]\n---\n---\na: [2, nine]\n").unwrap();
        assert_eq!(docs.iter().map(|(n, _)| *n).collect::<Vec<_>>(), [1, 3]);
        // A leading marker (and comments before it) start document 1, not 2.
        let lead = documents(f, "# routes\n---\na: [1]\n--- {a: [2]}\n").unwrap();
        assert_eq!(lead.iter().map(|(n, _)| *n).collect::<Vec<_>>(), [1, 2]);
        // A marker-like line inside a block scalar is indented, so not a marker.
        let block = documents(f, "a: |\n  ---\n  x\n").unwrap();
        assert_eq!(block.len(), 1);
        let e = typed::<Doc>(f, 3, "", docs[1].1.clone()).unwrap_err();
        assert!(e.to_string().starts_with("x.yaml: document 3: field `a[1]`: "), "{e}");
        let bad = documents(f, "a: [1]\n---\na: [").unwrap_err().to_string();
        assert!(bad.starts_with("x.yaml: document 2: not valid YAML"), "{bad}");
    }
}
