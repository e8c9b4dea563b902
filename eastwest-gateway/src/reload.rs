//! Reloads the routes file when it changes or when asked (SIGHUP).
//!
//! The file is polled by its metadata rather than watched with inotify: polling
//! also sees the symlink swap a Kubernetes ConfigMap volume does, and costs one
//! `stat` per interval. A change is loaded once the file has held still for one
//! interval, so an editor or `echo >` that truncates and then writes is not caught
//! half-way. A bad file (an empty one too) is refused whole and the last good table
//! keeps serving; connections already open are never touched.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use sidecar::settle::Settle;
use tokio::sync::Notify;

use crate::config::{self, ConfigError};
use crate::proxy::Shared;

/// The outcome of the latest reload attempt, for the admin endpoint.
#[derive(Debug, Default)]
pub struct Status {
    /// The error of the last attempt, if it failed.
    pub last_error: Mutex<Option<String>>,
}

/// Loads `path` and swaps in a new routes table; on error the old one stays.
pub fn reload(shared: &Shared, path: &Path, status: &Status) -> Result<usize, ConfigError> {
    let result = config::load(path).map(|file| shared.update_sources(|s| s.file = Some(file)));
    shared.metrics.reload(result.is_ok());
    let mut last = status.last_error.lock().unwrap_or_else(|p| p.into_inner());
    match &result {
        Ok(n) => {
            tracing::info!(file = %path.display(), routes = n, "routes reloaded");
            *last = None;
        }
        Err(e) => {
            tracing::error!("routes file refused, still serving the last good one: {e}");
            *last = Some(e.to_string());
        }
    }
    result
}

/// Identifies a version of the file without reading it.
fn fingerprint(path: &Path) -> Option<(SystemTime, u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

/// Reloads on change (once settled, see [`sidecar::settle`]) or kick until the drain starts.
pub async fn watch(shared: Arc<Shared>, status: Arc<Status>, kick: Arc<Notify>) {
    let Some(path) = shared.settings.routes_file.clone() else {
        return;
    };
    let mut settle = Settle::new(fingerprint(&path));
    loop {
        tokio::select! {
            () = shared.drain.signaled() => return,
            () = kick.notified() => settle.read(fingerprint(&path)),
            () = tokio::time::sleep(shared.settings.reload_interval) => {
                if !settle.poll(fingerprint(&path)) {
                    continue;
                }
            }
        }
        let _ = reload(&shared, &path, &status);
    }
}
