//! `isthmus lab down`: from the state file, stops every recorded process (by PID, checked
//! by its start time), deletes every recorded link and namespace, then the state. Works
//! after a crash or a half-finished `up`, and does nothing, successfully, when there is no
//! lab.

use std::fs;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::bail;

use crate::netns;
use crate::process;
use crate::state::{ProcessRecord, STATE_FILE, StateFile};

/// How long processes get to exit on SIGTERM before SIGKILL.
const PATIENCE: Duration = Duration::from_secs(5);

/// What the lab writes into its state directory besides `state.json`.
const OUR_ENTRIES: [&str; 5] = ["manifests", "ca", "logs", "tokens", "state.json.tmp"];

/// Takes down the lab recorded in `dir`.
pub fn down(dir: &Path, out: &mut impl Write) -> anyhow::Result<()> {
    let Some(file) = StateFile::open(dir)? else {
        writeln!(out, "no lab recorded in {}: nothing to take down", dir.display())?;
        return Ok(());
    };
    let s = &file.state;
    let t0 = Instant::now();
    let mut problems = Vec::new();

    let running = s.processes.iter().filter(|p| process::is_running(p)).count();
    let stubborn = process::stop_all(&s.processes, PATIENCE);
    for p in &stubborn {
        problems.push(format!("process {} ({}) would not die", p.pid, p.name));
    }
    writeln!(
        out,
        "stopped {} of {} processes",
        running - stubborn.len().min(running),
        s.processes.len()
    )?;
    // Whatever else runs in our namespaces is ours too (a child of ours, or a process
    // started just before a crash could record it), and would keep its namespace alive.
    let strays: Vec<ProcessRecord> = s
        .namespaces
        .iter()
        .filter(|ns| netns::exists(ns))
        .flat_map(|ns| {
            let pids = netns::run("ip", &["netns", "pids", ns]).unwrap_or_default();
            pids.split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok())
                .filter_map(|pid| {
                    Some(ProcessRecord {
                        name: format!("a process in {ns}"),
                        netns: ns.clone(),
                        pid,
                        start_time: process::start_time(pid)?,
                        argv: Vec::new(),
                        log: Default::default(),
                    })
                })
                .collect::<Vec<_>>()
        })
        .collect();
    if !strays.is_empty() {
        for p in process::stop_all(&strays, PATIENCE) {
            problems.push(format!("process {} ({}) would not die", p.pid, p.name));
        }
        writeln!(
            out,
            "stopped {} unrecorded processes in the lab's namespaces",
            strays.len()
        )?;
    }

    let mut links = 0;
    for l in s.links.iter().rev() {
        let present = netns::exists(&l.netns) && netns::ip(&l.netns, &["link", "show", "dev", &l.name]).is_ok();
        if !present {
            continue;
        }
        match netns::ip(&l.netns, &["link", "delete", "dev", &l.name]) {
            Ok(()) => links += 1,
            // Deleting one end of a veth deletes the other: it may be gone by now.
            Err(_) if netns::ip(&l.netns, &["link", "show", "dev", &l.name]).is_err() => links += 1,
            Err(e) => problems.push(e.to_string()),
        }
    }
    let mut namespaces = 0;
    for ns in s.namespaces.iter().rev() {
        if !netns::exists(ns) {
            continue;
        }
        match netns::delete(ns) {
            Ok(()) => namespaces += 1,
            Err(e) => problems.push(e.to_string()),
        }
    }
    writeln!(out, "deleted {links} links and {namespaces} namespaces")?;
    if !problems.is_empty() {
        bail!(
            "could not remove everything (state kept in {}):\n  {}",
            dir.join(STATE_FILE).display(),
            problems.join("\n  ")
        );
    }
    for entry in OUR_ENTRIES {
        let p = dir.join(entry);
        if p.is_dir() {
            fs::remove_dir_all(&p)?;
        } else if p.exists() {
            fs::remove_file(&p)?;
        }
    }
    fs::remove_file(dir.join(STATE_FILE))?;
    // Only if nothing of anyone else's is in it.
    let _ = fs::remove_dir(dir);
    writeln!(out, "lab `{}` is down ({} ms)", s.topology, t0.elapsed().as_millis())?;
    Ok(())
}
