//! The lab's processes: started inside a namespace (`ip netns exec`, which execs the
//! program, so the PID we get is the program's), in a process group of their own so a
//! Ctrl-C at the terminal does not reach them, logging to a file; stopped by PID, TERM
//! first and KILL after a bounded wait.

use std::fs;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::state::ProcessRecord;

/// A process started by this `lab up`; the child handle tells a dead process from a live one
/// (it is never a zombie to us while we hold it).
#[derive(Debug)]
pub struct Started {
    pub record: ProcessRecord,
    child: Child,
}

/// Starts `program args…` in namespace `ns` (the empty name: this process's own, for a
/// loopback lab), its output appended to `log` (a restarted process continues its
/// predecessor's log).
pub fn start(name: &str, ns: &str, program: &Path, args: &[String], log: &Path) -> io::Result<Started> {
    if let Some(dir) = log.parent() {
        fs::create_dir_all(dir)?;
    }
    let out = fs::OpenOptions::new().create(true).append(true).open(log)?;
    let mut command = if ns.is_empty() {
        Command::new(program)
    } else {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]).arg(program);
        c
    };
    let child = command
        .args(args)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .process_group(0)
        .spawn()?;
    let pid = child.id();
    let start_time = start_time(pid).ok_or_else(|| io::Error::other(format!("process {pid} vanished at start")))?;
    let mut argv = vec![program.display().to_string()];
    argv.extend(args.iter().cloned());
    Ok(Started {
        record: ProcessRecord {
            name: name.into(),
            netns: ns.into(),
            pid,
            start_time,
            argv,
            log: log.to_owned(),
        },
        child,
    })
}

impl Started {
    /// `None` while it runs; how it ended otherwise.
    pub fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(None) => None,
            Ok(Some(status)) => Some(status.to_string()),
            Err(e) => Some(format!("cannot tell: {e}")),
        }
    }

    /// The last lines of its log, for a failure message.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.record.log, lines)
    }
}

/// The last `lines` lines of a file, or nothing.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A process's start time (`/proc/PID/stat` field 22), if it exists.
pub fn start_time(pid: u32) -> Option<u64> {
    stat(pid)?.1
}

/// (state, start time) from `/proc/PID/stat`; the command name may hold spaces and
/// parentheses, so fields are counted after its last `)`.
fn stat(pid: u32) -> Option<(char, Option<u64>)> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state); field 22 is at index 19.
    let state = fields.first()?.chars().next()?;
    Some((state, fields.get(19).and_then(|f| f.parse().ok())))
}

/// A process's resident memory in KiB (`VmRSS`), if it exists.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Whether the recorded process still runs: same PID, same start time, not a zombie.
pub fn is_running(record: &ProcessRecord) -> bool {
    matches!(stat(record.pid), Some((state, Some(t))) if state != 'Z' && t == record.start_time)
}

/// Stops every recorded process still running: TERM, then KILL for those alive after
/// `patience`. Returns the ones that would not die.
pub fn stop_all(records: &[ProcessRecord], patience: Duration) -> Vec<ProcessRecord> {
    let signal = |r: &ProcessRecord, sig| {
        if is_running(r) {
            // SAFETY: kill(2) with a PID we checked is our process (same start time).
            unsafe { libc::kill(r.pid as libc::pid_t, sig) };
        }
    };
    let wait = |limit: Duration| {
        let deadline = Instant::now() + limit;
        while records.iter().any(is_running) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    records.iter().for_each(|r| signal(r, libc::SIGTERM));
    wait(patience);
    records.iter().for_each(|r| signal(r, libc::SIGKILL));
    wait(Duration::from_secs(2));
    records.iter().filter(|r| is_running(r)).cloned().collect()
}

/// Where a binary of ours is: `dir/name` if it exists there.
pub fn binary(dir: &Path, name: &str) -> io::Result<PathBuf> {
    let p = dir.join(name);
    if p.is_file() {
        Ok(p)
    } else {
        Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "{} not found (build it: `cargo build -p {name}`, or pass --bin-dir)",
                p.display()
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_our_own_start_time_and_refuses_a_reused_pid() {
        let me = std::process::id();
        let t = start_time(me).unwrap();
        let mut rec = ProcessRecord {
            name: "me".into(),
            netns: String::new(),
            pid: me,
            start_time: t,
            argv: vec![],
            log: PathBuf::new(),
        };
        assert!(is_running(&rec));
        assert!(rss_kib(me).is_some_and(|k| k > 0));
        rec.start_time += 1;
        assert!(!is_running(&rec), "a different start time is another process");
    }
}
