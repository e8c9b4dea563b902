//! `isthmus lab apply -f FILE` / `lab delete -f FILE`: `kubectl apply` for the lab. The
//! lab's clusters are directories the controllers read (`STATE/manifests/<cluster>/`), so
//! applying is writing each object to its own file there, after the controller's own parser
//! has accepted the whole input: a file with one bad document changes nothing.
//!
//! Like `kubectl`, an object is known by its kind, namespace and name, so applying a changed
//! file replaces what an earlier apply wrote, and `delete` removes exactly those objects.
//! Istio config takes effect in the clusters that carry it: by default every primary
//! cluster (each has a controller that reads its own cluster's config, as istiod does).
//! Once written, apply waits until every controller serves a new version.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use federation_controller::objects::ClusterObjects;
use mesh_vocab::manifest;
use serde_json::Value;

use crate::plan::{ClusterPlan, MONITORING_PORT};
use crate::running::Running;
use crate::{probe, status};

/// How long the controllers may take to serve what was applied.
const PICKUP: Duration = Duration::from_secs(15);

/// Every applied object's file name starts with this, so the lab's own objects are never
/// touched.
const PREFIX: &str = "applied.";

/// What happened to one object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Created,
    Configured,
    Unchanged,
    Deleted,
    NotFound,
}

impl Outcome {
    fn word(self) -> &'static str {
        match self {
            Outcome::Created => "created",
            Outcome::Configured => "configured",
            Outcome::Unchanged => "unchanged",
            Outcome::Deleted => "deleted",
            Outcome::NotFound => "not found",
        }
    }
}

/// One object of the input: what `kubectl` would call it, and where it is kept.
#[derive(Debug, Clone)]
struct Object {
    /// `virtualservice.networking.istio.io/reviews`, kubectl's name.
    display: String,
    file_name: String,
    value: Value,
}

/// Reads and checks every input file (`-` is standard input) with the controller's parser.
fn objects(files: &[PathBuf]) -> anyhow::Result<Vec<Object>> {
    let mut out = Vec::new();
    for file in files {
        let text = if file.as_os_str() == "-" {
            std::io::read_to_string(std::io::stdin()).context("reading standard input")?
        } else {
            fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?
        };
        let mut read = ClusterObjects::default();
        let skipped = read.add_yaml(file, &text)?;
        // The controller would leave a refused document out and serve the rest; an apply
        // refuses the whole input instead, as `kubectl apply` stops at an invalid object.
        if let Some(e) = read.refused.first() {
            bail!("{e}");
        }
        if let Some(s) = skipped.first() {
            bail!(
                "{}: document {}: kind `{}` of `{}` is not read by the controller",
                file.display(),
                s.document,
                s.kind,
                s.api_version
            );
        }
        for (n, value) in manifest::documents(file, &text)? {
            out.push(object(file, n, value)?);
        }
    }
    Ok(out)
}

fn object(file: &Path, n: usize, value: Value) -> anyhow::Result<Object> {
    let text = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).unwrap_or_default().to_owned();
    let kind = text(&value, "kind");
    if kind == "List" {
        bail!(
            "{}: document {n}: a List: apply its items as documents of their own",
            file.display()
        );
    }
    let meta = value.get("metadata").cloned().unwrap_or_default();
    let name = text(&meta, "name");
    if name.is_empty() {
        bail!("{}: document {n}: field `metadata.name`: required", file.display());
    }
    let namespace = text(&meta, "namespace");
    let group = text(&value, "apiVersion")
        .rsplit_once('/')
        .map(|(g, _)| g.to_owned())
        .unwrap_or_default();
    let kind_lower = kind.to_ascii_lowercase();
    let qualified = if group.is_empty() {
        kind_lower.clone()
    } else {
        format!("{kind_lower}.{group}")
    };
    // Names are DNS labels or subdomains, so these file names need no escaping.
    let ns = if namespace.is_empty() { "-" } else { &namespace };
    Ok(Object {
        display: format!("{qualified}/{name}"),
        file_name: format!("{PREFIX}{qualified}.{ns}.{name}.yaml"),
        value,
    })
}

/// The clusters to write to: those named, else every primary.
fn targets<'a>(lab: &'a Running, clusters: &[String]) -> anyhow::Result<Vec<&'a ClusterPlan>> {
    if clusters.is_empty() {
        return Ok(lab.plan.clusters.iter().filter(|c| c.controller.is_some()).collect());
    }
    clusters.iter().map(|c| lab.cluster(c)).collect()
}

/// The version each controller serves, by cluster; None where it cannot be asked.
fn versions(lab: &Running) -> Vec<(String, Option<i64>)> {
    lab.plan
        .clusters
        .iter()
        .filter_map(|c| {
            let ctl = c.controller.as_ref()?;
            let at = std::net::SocketAddr::new(std::net::IpAddr::V4(ctl.ip), MONITORING_PORT);
            let version = probe::get(&c.node.netns, at, "/metrics", Duration::from_secs(2))
                .ok()
                .and_then(|r| status::metric_sum(&r.body, "isthmus_controller_version"))
                .map(|v| v as i64);
            Some((c.name.to_string(), version))
        })
        .collect()
}

/// Waits until every controller that answered before serves a newer version.
fn await_pickup(lab: &Running, before: &[(String, Option<i64>)]) -> anyhow::Result<()> {
    probe::until(PICKUP, Duration::from_millis(100), || {
        let now = versions(lab);
        let behind: Vec<&str> = before
            .iter()
            .zip(&now)
            .filter(|((_, old), (_, new))| old.is_some() && new <= old)
            .map(|((name, _), _)| name.as_str())
            .collect();
        if behind.is_empty() {
            Ok(())
        } else {
            Err(anyhow::anyhow!(
                "the controllers of {} did not serve the change within {PICKUP:?}; their logs say why",
                behind.join(", ")
            ))
        }
    })
}

fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    // The controller may read at any moment: it must see the old file or the new one.
    let tmp = path.with_extension("yaml.tmp");
    fs::write(&tmp, text)?;
    fs::rename(&tmp, path)
}

/// Applies (or, with `delete`, removes) the objects of `files` in `clusters` of the lab in
/// `dir`, printing a line per object and cluster as kubectl does.
pub fn run(
    dir: &Path,
    files: &[PathBuf],
    clusters: &[String],
    delete: bool,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let lab = Running::open(dir)?;
    let objects = objects(files)?;
    if objects.is_empty() {
        bail!(
            "no objects in {}",
            files
                .iter()
                .map(|f| f.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let targets = targets(&lab, clusters)?;
    let before = versions(&lab);
    let mut changed = false;
    for c in &targets {
        let cdir = lab.state.dir().join("manifests").join(c.name.as_str());
        for o in &objects {
            let path = cdir.join(&o.file_name);
            let old = fs::read_to_string(&path).ok();
            let outcome = if delete {
                match old {
                    Some(_) => {
                        fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
                        Outcome::Deleted
                    }
                    None => Outcome::NotFound,
                }
            } else {
                let text = format!("---\n{}", serde_saphyr::to_string(&o.value)?);
                match old {
                    Some(old) if old == text => Outcome::Unchanged,
                    old => {
                        write_atomically(&path, &text).with_context(|| format!("writing {}", path.display()))?;
                        if old.is_some() {
                            Outcome::Configured
                        } else {
                            Outcome::Created
                        }
                    }
                }
            };
            changed |= matches!(outcome, Outcome::Created | Outcome::Configured | Outcome::Deleted);
            writeln!(out, "{} {} in {}", o.display, outcome.word(), c.name)?;
        }
    }
    if changed {
        await_pickup(&lab, &before)?;
        let served: Vec<String> = versions(&lab)
            .into_iter()
            .map(|(c, v)| format!("{c} v{}", v.map_or("?".into(), |v| v.to_string())))
            .collect();
        writeln!(out, "served by the controllers: {}", served.join(", "))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file with `text` in a fresh directory of its own, removed with the guard.
    struct Input(PathBuf);

    impl Input {
        fn new(test: &str, text: &str) -> Input {
            let dir = std::env::temp_dir().join(format!("isthmus-apply-{test}-{}", std::process::id()));
            fs::create_dir_all(&dir).unwrap();
            fs::write(dir.join("in.yaml"), text).unwrap();
            Input(dir)
        }

        fn objects(&self) -> anyhow::Result<Vec<Object>> {
            objects(&[self.0.join("in.yaml")])
        }
    }

    impl Drop for Input {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn objects_are_named_as_kubectl_names_them_and_kept_one_per_file() {
        let input = Input::new(
            "names",
            "apiVersion: v1\nkind: Service\nmetadata: {name: reviews, namespace: default}\nspec: {ports: [{name: http, port: 9080}]}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: extra}\n",
        );
        let objects = input.objects().unwrap();
        let names: Vec<(&str, &str)> = objects
            .iter()
            .map(|o| (o.display.as_str(), o.file_name.as_str()))
            .collect();
        assert_eq!(
            names,
            [
                ("service/reviews", "applied.service.default.reviews.yaml"),
                ("namespace/extra", "applied.namespace.-.extra.yaml"),
            ]
        );
    }

    #[test]
    fn a_bad_document_or_an_unread_kind_refuses_the_whole_input() {
        let bad = Input::new(
            "bad",
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: r}\nspec: {ports: [{port: http}]}\n",
        );
        let e = bad.objects().unwrap_err().to_string();
        assert!(e.contains("document 2: field `spec.ports[0].port`"), "{e}");
        let invalid = Input::new(
            "invalid",
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: v, namespace: default}\nspec: {hosts: ['*.a*']}\n",
        );
        let e = invalid.objects().unwrap_err().to_string();
        assert!(e.contains("VirtualService default/v refused"), "{e}");
        let unread = Input::new("unread", "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n");
        let e = unread.objects().unwrap_err().to_string();
        assert!(
            e.ends_with("document 1: kind `Deployment` of `apps/v1` is not read by the controller"),
            "{e}"
        );
    }
}
