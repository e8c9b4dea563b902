//! Linux network namespaces, veths, bridges and routes, through `ip`, `sysctl` and
//! `iptables`; and running a closure inside a namespace (a netns is a per-thread property,
//! so it runs on a thread of its own).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Stdio};

/// A command of ours that failed, with what it said.
#[derive(Debug, thiserror::Error)]
#[error("`{command}` failed: {detail}")]
pub struct CommandError {
    pub command: String,
    pub detail: String,
}

/// Runs `program args…`, failing with its stderr.
pub fn run(program: &str, args: &[&str]) -> Result<String, CommandError> {
    let command = format!("{program} {}", args.join(" "));
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| CommandError {
            command: command.clone(),
            detail: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(CommandError {
            command,
            detail: format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim()),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip ARGS` inside namespace `ns`.
pub fn ip(ns: &str, args: &[&str]) -> Result<(), CommandError> {
    let mut all = vec!["-n", ns];
    all.extend_from_slice(args);
    run("ip", &all).map(drop)
}

/// `ip ARGS` in the calling process's own namespace.
pub fn ip_here(args: &[&str]) -> Result<(), CommandError> {
    run("ip", args).map(drop)
}

/// `PROGRAM ARGS` inside namespace `ns` (`ip netns exec`).
pub fn exec(ns: &str, program: &str, args: &[&str]) -> Result<String, CommandError> {
    let mut all = vec!["netns", "exec", ns, program];
    all.extend_from_slice(args);
    run("ip", &all)
}

/// Creates namespace `ns` with its loopback up.
pub fn add(ns: &str) -> Result<(), CommandError> {
    run("ip", &["netns", "add", ns])?;
    ip(ns, &["link", "set", "lo", "up"])
}

/// Deletes namespace `ns` (and every link in it). Ok if it is already gone.
pub fn delete(ns: &str) -> Result<(), CommandError> {
    if !exists(ns) {
        return Ok(());
    }
    run("ip", &["netns", "delete", ns]).map(drop)
}

/// Whether namespace `ns` exists.
pub fn exists(ns: &str) -> bool {
    Path::new("/run/netns").join(ns).exists()
}

/// The names of every namespace (`ip netns list`).
pub fn list() -> Result<Vec<String>, CommandError> {
    Ok(run("ip", &["netns", "list"])?
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(String::from)
        .collect())
}

/// A veth pair: `a_name` in `a_ns`, `b_name` in `b_ns`, both down.
pub fn veth(a_ns: &str, a_name: &str, b_ns: &str, b_name: &str) -> Result<(), CommandError> {
    ip(
        a_ns,
        &[
            "link", "add", a_name, "type", "veth", "peer", "name", b_name, "netns", b_ns,
        ],
    )
}

/// A bridge `name` in `ns`, up, with `addr` (CIDR notation) if given.
pub fn bridge(ns: &str, name: &str, addr: Option<&str>) -> Result<(), CommandError> {
    ip(ns, &["link", "add", name, "type", "bridge"])?;
    if let Some(a) = addr {
        ip(ns, &["addr", "add", a, "dev", name])?;
    }
    ip(ns, &["link", "set", name, "up"])
}

/// Attaches `link` in `ns` to bridge `bridge` and brings it up.
pub fn attach(ns: &str, link: &str, bridge: &str) -> Result<(), CommandError> {
    ip(ns, &["link", "set", link, "master", bridge, "up"])
}

/// Gives `link` in `ns` an address (CIDR notation) and brings it up.
pub fn address(ns: &str, link: &str, addr: &str) -> Result<(), CommandError> {
    ip(ns, &["addr", "add", addr, "dev", link])?;
    ip(ns, &["link", "set", link, "up"])
}

/// Lets `ns` forward IPv4 between its links.
pub fn forwarding(ns: &str) -> Result<(), CommandError> {
    exec(ns, "sysctl", &["-qw", "net.ipv4.ip_forward=1"]).map(drop)
}

/// Moves the calling thread into namespace `ns` for the rest of its life (the netns is a
/// per-thread property: spawn a thread for it, as [`within`] does). The empty name is the
/// namespace the thread is in already (a loopback lab's).
pub fn enter(ns: &str) -> io::Result<()> {
    if ns.is_empty() {
        return Ok(());
    }
    let file = File::open(Path::new("/run/netns").join(ns))?;
    // SAFETY: setns(2) on a valid, open namespace file; it changes only this thread's
    // network namespace.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `f` on a thread inside namespace `ns` (the empty name: this one) and returns what it
/// returns.
pub fn within<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> io::Result<T> {
    if ns.is_empty() {
        return Ok(f());
    }
    let file = File::open(Path::new("/run/netns").join(ns))?;
    std::thread::Builder::new()
        .name(format!("netns {ns}"))
        .spawn(move || {
            // SAFETY: setns(2) on a valid, open namespace file; it changes only this
            // thread's network namespace, and the thread ends when `f` returns.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(f())
        })?
        .join()
        .map_err(|_| io::Error::other("the thread inside the namespace panicked"))?
}
