//! The lab's record of what it made: every namespace, link and process, written to
//! `state.json` *before* each is made, so whatever happens to `lab up` (a failed step, a
//! crash, `kill -9`), `lab down` finds everything that may exist.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// The file's name inside the state directory.
pub const STATE_FILE: &str = "state.json";

/// What a lab is made of.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LabState {
    /// The topology's name.
    pub topology: String,
    /// The namespace name prefix.
    pub prefix: String,
    /// What `lab up` was given: a built-in topology's name or a file's absolute path
    /// (empty: the default), so later commands can work out the same plan.
    #[serde(default)]
    pub source: String,
    /// Set once `lab up` finished every step.
    pub complete: bool,
    /// Built on loopback, without namespaces (`lab up` without root).
    #[serde(default)]
    pub loopback: bool,
    pub namespaces: Vec<String>,
    pub links: Vec<LinkRecord>,
    pub processes: Vec<ProcessRecord>,
}

/// A link, by the namespace it was made in.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LinkRecord {
    pub netns: String,
    pub name: String,
}

/// A process the lab started.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProcessRecord {
    /// What it is, e.g. `cluster1 controller`.
    pub name: String,
    pub netns: String,
    pub pid: u32,
    /// Its start time in clock ticks since boot (`/proc/PID/stat` field 22), so a reused
    /// PID is never mistaken for ours.
    pub start_time: u64,
    pub argv: Vec<String>,
    pub log: PathBuf,
}

/// The state directory and the state in it, saved on every change.
#[derive(Debug)]
pub struct StateFile {
    dir: PathBuf,
    pub state: LabState,
}

impl StateFile {
    /// Starts a new record in `dir`, refusing if one is there already (a lab is up).
    pub fn create(dir: &Path, topology: &str, prefix: &str) -> io::Result<StateFile> {
        fs::create_dir_all(dir)?;
        if dir.join(STATE_FILE).exists() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "{} exists: a lab is already up there (`isthmus lab down --state-dir {}` first)",
                    dir.join(STATE_FILE).display(),
                    dir.display()
                ),
            ));
        }
        let file = StateFile {
            dir: dir.to_owned(),
            state: LabState {
                topology: topology.into(),
                prefix: prefix.into(),
                ..LabState::default()
            },
        };
        file.save()?;
        Ok(file)
    }

    /// The record in `dir`, if there is one.
    pub fn open(dir: &Path) -> io::Result<Option<StateFile>> {
        let path = dir.join(STATE_FILE);
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let state = serde_json::from_str(&text)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{}: {e}", path.display())))?;
        Ok(Some(StateFile {
            dir: dir.to_owned(),
            state,
        }))
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes the record: a new file renamed over the old, so a reader never sees half.
    pub fn save(&self) -> io::Result<()> {
        let tmp = self.dir.join(format!("{STATE_FILE}.tmp"));
        let mut f = fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(&self.state).map_err(io::Error::other)?)?;
        f.sync_all()?;
        fs::rename(&tmp, self.dir.join(STATE_FILE))
    }

    /// Records namespace `ns` (before it is made).
    pub fn namespace(&mut self, ns: &str) -> io::Result<()> {
        self.state.namespaces.push(ns.into());
        self.save()
    }

    /// Records link `name` in `netns` (before it is made).
    pub fn link(&mut self, netns: &str, name: &str) -> io::Result<()> {
        self.state.links.push(LinkRecord {
            netns: netns.into(),
            name: name.into(),
        });
        self.save()
    }

    /// Records a started process.
    pub fn process(&mut self, record: ProcessRecord) -> io::Result<()> {
        self.state.processes.push(record);
        self.save()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_record_is_on_disk_at_once_and_a_second_lab_is_refused() {
        let dir = std::env::temp_dir().join(format!("isl-state-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let mut f = StateFile::create(&dir, "t", "isl").unwrap();
        f.namespace("isl-a").unwrap();
        f.link("isl-a", "eth0").unwrap();
        let read = StateFile::open(&dir).unwrap().unwrap();
        assert_eq!(read.state.namespaces, ["isl-a"]);
        assert_eq!(read.state.links[0].name, "eth0");
        let e = StateFile::create(&dir, "t", "isl").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        fs::remove_dir_all(&dir).unwrap();
        assert!(StateFile::open(&dir).unwrap().is_none());
    }
}
