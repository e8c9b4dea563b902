//! Link impairment on a gateway's transit leg: delay, jitter and loss for the drills, as
//! `tc netem` on the transit bridge's port toward the gateway would add them. Where the
//! kernel has `sch_netem` it is used; where it has not (this project's machine: only
//! tbf/htb/fifo/ingress), a userspace WAN emulator takes the leg's place instead:
//!
//! ```text
//!  gateway ns                     transit ns
//!  transit ═══ veth ═══ gwK   ⇄ [isthmus lab wan-relay] ⇄  gwK-rl ═══ veth ═══ gwK-br ─ br0
//! ```
//!
//! `gwK` leaves the bridge; a relay process in the transit namespace reads every frame from
//! it and from `gwK-rl` with `AF_PACKET` sockets and writes each to the other side, frames
//! toward the gateway held for the delay (± jitter, order kept) in a bounded queue, or
//! dropped at the loss rate. It is recorded like every process of the lab (so `lab down`
//! stops it) and the new veth like every link; clearing stops it, puts `gwK` back on the
//! bridge and deletes the veth.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::netns;
use crate::process::{self, Started};
use crate::state::ProcessRecord;

/// What a link suffers, toward the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize)]
pub struct Impairment {
    pub delay: Duration,
    /// Each frame's delay is `delay ± jitter`, uniformly, never reordering frames.
    pub jitter: Duration,
    /// The share of frames dropped, 0 to 1.
    pub loss: f64,
}

impl Impairment {
    /// A cut link: every frame toward the gateway lost (`netem loss 100%`).
    pub const CUT: Impairment = Impairment {
        delay: Duration::ZERO,
        jitter: Duration::ZERO,
        loss: 1.0,
    };

    /// netem's arguments for it.
    fn netem_args(&self) -> Vec<String> {
        let mut a = Vec::new();
        if !self.delay.is_zero() || !self.jitter.is_zero() {
            a.extend(["delay".into(), format!("{}us", self.delay.as_micros())]);
            if !self.jitter.is_zero() {
                a.push(format!("{}us", self.jitter.as_micros()));
            }
        }
        if self.loss > 0.0 {
            a.extend(["loss".into(), format!("{}%", self.loss * 100.0)]);
        }
        a
    }

    /// In words, e.g. `delay 100 ms ± 10 ms, loss 1%`.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if !self.delay.is_zero() || !self.jitter.is_zero() {
            let mut d = format!("delay {} ms", self.delay.as_millis());
            if !self.jitter.is_zero() {
                d += &format!(" ± {} ms", self.jitter.as_millis());
            }
            parts.push(d);
        }
        if self.loss > 0.0 {
            parts.push(format!("loss {}%", self.loss * 100.0));
        }
        if parts.is_empty() {
            "nothing".into()
        } else {
            parts.join(", ")
        }
    }
}

/// `1%`, `0.5%`, `100%`, or a bare fraction `0.01`.
pub fn parse_loss(s: &str) -> Result<f64, String> {
    let (n, scale) = match s.trim().strip_suffix('%') {
        Some(p) => (p, 100.0),
        None => (s.trim(), 1.0),
    };
    let v: f64 = n
        .parse()
        .map_err(|_| format!("`{s}` is not a loss rate (e.g. 1%, 100%)"))?;
    let v = v / scale;
    if !(0.0..=1.0).contains(&v) {
        return Err(format!("`{s}`: a loss rate is 0% to 100%"));
    }
    Ok(v)
}

/// How an impairment was put on a leg, to clear it with.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// `tc qdisc … netem` on the leg.
    Netem,
    /// The userspace relay (this kernel has no `sch_netem`).
    Relay,
}

/// Where an impairment goes: the transit namespace and the gateway's port on its bridge.
#[derive(Debug, Clone)]
pub struct Leg {
    pub transit_ns: String,
    /// `gwK`, the transit bridge's port toward cluster K's gateway.
    pub dev: String,
    /// What the relay process is called in the state file.
    pub process_name: String,
}

impl Leg {
    /// Cluster `c`'s transit leg in `plan`.
    pub fn of(plan: &crate::plan::Plan, c: &crate::plan::ClusterPlan) -> anyhow::Result<Leg> {
        let (Some(transit), Some(gw)) = (&plan.transit, &c.gateway) else {
            bail!("{} has no east-west gateway on a transit network", c.name)
        };
        Ok(Leg {
            transit_ns: transit.clone(),
            dev: gw.transit_link.clone(),
            process_name: format!("{} transit impairment", c.name),
        })
    }

    /// How `method` sits on this leg, in words.
    pub fn describe(&self, method: &Method) -> String {
        match method {
            Method::Netem => format!("tc netem on {} in {}", self.dev, self.transit_ns),
            Method::Relay => format!(
                "this kernel has no sch_netem: the lab's WAN emulator between {} and {} in {}",
                self.dev,
                self.relay_side(),
                self.transit_ns
            ),
        }
    }

    fn bridge_side(&self) -> String {
        format!("{}-br", self.dev)
    }

    fn relay_side(&self) -> String {
        format!("{}-rl", self.dev)
    }
}

/// Whether `dev` in `ns` can take a netem qdisc (the kernel has `sch_netem`).
pub fn netem_available(ns: &str, dev: &str) -> bool {
    let ok = netns::exec(ns, "tc", &["qdisc", "add", "dev", dev, "root", "netem", "delay", "0ms"]).is_ok();
    if ok {
        let _ = netns::exec(ns, "tc", &["qdisc", "del", "dev", dev, "root"]);
    }
    ok
}

/// Where `lab` keeps what it makes: the state file (the relay's process and veth are
/// recorded before they exist) and its directory (the relay's log).
pub trait Recorder {
    fn record_link(&mut self, netns: &str, name: &str) -> io::Result<()>;
    fn record_process(&mut self, p: ProcessRecord) -> io::Result<()>;
    fn log_dir(&self) -> std::path::PathBuf;
}

impl Recorder for crate::state::StateFile {
    fn record_link(&mut self, netns: &str, name: &str) -> io::Result<()> {
        self.link(netns, name)
    }
    fn record_process(&mut self, p: ProcessRecord) -> io::Result<()> {
        self.process(p)
    }
    fn log_dir(&self) -> std::path::PathBuf {
        self.dir().join("logs")
    }
}

/// Puts `imp` on `leg`, by netem when the kernel has it, else by the relay (`isthmus` is
/// the binary that runs it). Whatever was on the leg before is cleared first.
pub fn apply(
    leg: &Leg,
    imp: Impairment,
    isthmus: &std::path::Path,
    rec: &mut dyn Recorder,
    running: &[ProcessRecord],
) -> anyhow::Result<Method> {
    clear(leg, running)?;
    if netem_available(&leg.transit_ns, &leg.dev) {
        let mut args = vec!["qdisc", "add", "dev", &leg.dev, "root", "netem"];
        let extra = imp.netem_args();
        args.extend(extra.iter().map(String::as_str));
        netns::exec(&leg.transit_ns, "tc", &args)?;
        return Ok(Method::Netem);
    }
    let (br, rl) = (leg.bridge_side(), leg.relay_side());
    rec.record_link(&leg.transit_ns, &br)?;
    netns::veth(&leg.transit_ns, &br, &leg.transit_ns, &rl)?;
    netns::attach(&leg.transit_ns, &br, "br0")?;
    netns::ip(&leg.transit_ns, &["link", "set", &rl, "up"])?;
    let args: Vec<String> = [
        "lab",
        "wan-relay",
        "--gateway-side",
        &leg.dev,
        "--bridge-side",
        &rl,
        "--detach",
        "--delay",
        &format!("{}us", imp.delay.as_micros()),
        "--jitter",
        &format!("{}us", imp.jitter.as_micros()),
        "--loss",
        &imp.loss.to_string(),
    ]
    .map(String::from)
    .into();
    let log = rec
        .log_dir()
        .join(format!("{}.log", leg.process_name.replace(' ', "-")));
    // A new relay appends to an earlier one's log: only what it writes itself counts.
    let skip = std::fs::metadata(&log).map_or(0, |m| m.len()) as usize;
    let mut started = process::start(&leg.process_name, &leg.transit_ns, isthmus, &args, &log)
        .with_context(|| format!("starting {}", leg.process_name))?;
    rec.record_process(started.record.clone())?;
    wait_ready(&mut started, skip)?;
    Ok(Method::Relay)
}

/// The line the relay prints once it carries the leg's frames.
const READY: &str = "relaying ";

fn wait_ready(s: &mut Started, skip: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(how) = s.exited() {
            bail!("{} exited ({how}); its log ends:\n{}", s.record.name, s.log_tail(10));
        }
        let text = std::fs::read(&s.record.log).unwrap_or_default();
        if String::from_utf8_lossy(&text[skip.min(text.len())..]).contains(READY) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "{} not relaying after 5 s; its log ends:\n{}",
                s.record.name,
                s.log_tail(10)
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Takes any impairment off `leg`: a netem qdisc, or the relay (of `running`, the lab's
/// recorded processes) with its veth, `gwK` back on the bridge. Nothing on it is fine.
pub fn clear(leg: &Leg, running: &[ProcessRecord]) -> anyhow::Result<Option<Method>> {
    let mut cleared = None;
    let qdisc = netns::exec(&leg.transit_ns, "tc", &["qdisc", "show", "dev", &leg.dev]).unwrap_or_default();
    if qdisc.contains("netem") {
        netns::exec(&leg.transit_ns, "tc", &["qdisc", "del", "dev", &leg.dev, "root"])?;
        cleared = Some(Method::Netem);
    }
    let relays: Vec<ProcessRecord> = running
        .iter()
        .filter(|p| p.name == leg.process_name && process::is_running(p))
        .cloned()
        .collect();
    let stubborn = process::stop_all(&relays, Duration::from_secs(2));
    if let Some(p) = stubborn.first() {
        bail!("{} (pid {}) would not stop", p.name, p.pid);
    }
    let br = leg.bridge_side();
    let relayed = netns::ip(&leg.transit_ns, &["link", "show", "dev", &br]).is_ok();
    if !relays.is_empty() || relayed {
        netns::attach(&leg.transit_ns, &leg.dev, "br0")?;
        if relayed {
            netns::ip(&leg.transit_ns, &["link", "delete", "dev", &br])?;
        }
        cleared = Some(Method::Relay);
    }
    Ok(cleared)
}

/// `isthmus lab impair`: puts `imp` on cluster `cluster`'s transit leg of the lab in `dir`,
/// or with `None` takes whatever is there off.
pub fn on_lab(
    dir: &std::path::Path,
    cluster: &str,
    imp: Option<Impairment>,
    out: &mut impl std::io::Write,
) -> anyhow::Result<()> {
    let mut lab = crate::running::Running::open(dir)?;
    if lab.plan.loopback {
        bail!("this lab runs on loopback (`lab up` without root): there is no transit link to impair");
    }
    let c = lab.cluster(cluster)?.clone();
    let leg = Leg::of(&lab.plan, &c)?;
    let running = lab.state.state.processes.clone();
    match imp {
        None => match clear(&leg, &running)? {
            Some(m) => writeln!(out, "{cluster}'s transit leg: cleared ({})", leg.describe(&m))?,
            None => writeln!(out, "{cluster}'s transit leg: nothing on it")?,
        },
        Some(imp) => {
            let isthmus = std::env::current_exe().context("this executable, which runs the WAN emulator")?;
            let m = apply(&leg, imp, &isthmus, &mut lab.state, &running)?;
            writeln!(
                out,
                "{cluster}'s transit leg: {} toward its gateway ({}); `isthmus lab impair --cluster {cluster} --clear` takes it off",
                imp.describe(),
                leg.describe(&m)
            )?;
        }
    }
    Ok(())
}

/// `isthmus lab wan-relay`'s options.
#[derive(Debug, Clone, clap::Args)]
pub struct RelayArgs {
    /// The link toward the gateway (frames sent out here are impaired)
    #[arg(long)]
    pub gateway_side: String,
    /// The link toward the bridge
    #[arg(long)]
    pub bridge_side: String,
    /// Take the gateway side off its bridge once the relay carries its frames
    #[arg(long)]
    pub detach: bool,
    #[arg(long, default_value = "0ms", value_parser = crate::drill::parse_duration)]
    pub delay: Duration,
    #[arg(long, default_value = "0ms", value_parser = crate::drill::parse_duration)]
    pub jitter: Duration,
    /// The share of frames toward the gateway dropped (0 to 1, or a percentage)
    #[arg(long, default_value = "0", value_parser = parse_loss)]
    pub loss: f64,
    /// Frames held at most; beyond, a frame toward the gateway is dropped (netem's `limit`)
    #[arg(long, default_value_t = 10_000)]
    pub limit: usize,
}

/// The largest frame the relay carries: a GSO super-frame (64 KiB) and its virtio-net header.
const FRAME: usize = 65_536 + 4096;
/// `struct virtio_net_hdr` without `num_buffers`, which `PACKET_VNET_HDR` puts before every frame.
const VNET_HDR: usize = 10;
/// `PACKET_VNET_HDR` (linux/if_packet.h), which libc does not name.
const PACKET_VNET_HDR: libc::c_int = 15;

/// An `AF_PACKET` socket bound to one link, seeing every frame that arrives on it (not those
/// it sends), each with its virtio-net header so that GSO frames and partial checksums
/// (veths hand both on) go out on the other side exactly as they came.
struct PacketSocket {
    fd: OwnedFd,
}

impl PacketSocket {
    fn bind(dev: &str) -> io::Result<PacketSocket> {
        let name = std::ffi::CString::new(dev).map_err(io::Error::other)?;
        // SAFETY: if_nametoindex reads a NUL-terminated string.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if index == 0 {
            return Err(io::Error::other(format!(
                "no link {dev}: {}",
                io::Error::last_os_error()
            )));
        }
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: socket(2) with constant arguments; the fd is owned below.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, proto as i32) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh, valid fd nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let on: libc::c_int = 1;
        for opt in [PACKET_VNET_HDR, libc::PACKET_IGNORE_OUTGOING] {
            setsockopt(&fd, libc::SOL_PACKET, opt, &on)?;
        }
        setsockopt(&fd, libc::SOL_SOCKET, libc::SO_RCVBUF, &(8 << 20))?;
        setsockopt(&fd, libc::SOL_SOCKET, libc::SO_SNDBUF, &(8 << 20))?;
        // SAFETY: sockaddr_ll is plain data; zeroed is a valid start.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = proto;
        addr.sll_ifindex = index as i32;
        // SAFETY: bind(2) with a sockaddr_ll of the size given.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // Frames for other MACs too: the gateway's, now that the bridge no longer takes them.
        // SAFETY: packet_mreq is plain data.
        let mut mreq: libc::packet_mreq = unsafe { std::mem::zeroed() };
        mreq.mr_ifindex = index as i32;
        mreq.mr_type = libc::PACKET_MR_PROMISC as u16;
        setsockopt(&fd, libc::SOL_PACKET, libc::PACKET_ADD_MEMBERSHIP, &mreq)?;
        Ok(PacketSocket { fd })
    }

    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: recv(2) into a buffer of the length given.
        let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    fn send(&self, frame: &[u8]) -> io::Result<()> {
        // SAFETY: send(2) of a buffer of the length given.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn try_clone(&self) -> io::Result<PacketSocket> {
        Ok(PacketSocket {
            fd: self.fd.try_clone()?,
        })
    }
}

fn setsockopt<T>(fd: &OwnedFd, level: libc::c_int, opt: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: setsockopt(2) with a pointer to a `T` and its size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            opt,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as u32,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// xorshift64*: the loss and jitter draws need speed and spread, not secrecy.
struct Rng(u64);

impl Rng {
    fn seeded() -> Rng {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Rng(t ^ (u64::from(std::process::id()) << 32) | 1)
    }

    /// Uniform in [0, 1).
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// When each frame toward the gateway is due: `delay ± jitter` after it arrived, never
/// before the frame ahead of it (a link does not reorder), or `None` when it is lost.
struct Schedule {
    imp: Impairment,
    rng: Rng,
    last: Option<Instant>,
}

impl Schedule {
    fn due(&mut self, arrived: Instant) -> Option<Instant> {
        if self.imp.loss > 0.0 && self.rng.next() < self.imp.loss {
            return None;
        }
        let j = self.imp.jitter.as_secs_f64();
        let d = (self.imp.delay.as_secs_f64() + j * (2.0 * self.rng.next() - 1.0)).max(0.0);
        let due = (arrived + Duration::from_secs_f64(d)).max(self.last.unwrap_or(arrived));
        self.last = Some(due);
        Some(due)
    }
}

/// Runs the relay until killed: `bridge_side` → `gateway_side` impaired, the other way as is.
pub fn relay(args: &RelayArgs) -> anyhow::Result<()> {
    let imp = Impairment {
        delay: args.delay,
        jitter: args.jitter,
        loss: args.loss,
    };
    let to_gateway =
        PacketSocket::bind(&args.gateway_side).with_context(|| format!("binding {}", args.gateway_side))?;
    let to_bridge = PacketSocket::bind(&args.bridge_side).with_context(|| format!("binding {}", args.bridge_side))?;
    // Frames from the gateway, to the bridge at once.
    let (from_gateway, out_bridge) = (to_gateway.try_clone()?, to_bridge.try_clone()?);
    std::thread::Builder::new().name("from gateway".into()).spawn(move || {
        let mut buf = vec![0u8; FRAME];
        loop {
            match from_gateway.recv(&mut buf) {
                Ok(n) if n > VNET_HDR => {
                    let _ = out_bridge.send(&buf[..n]);
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    eprintln!("wan-relay: reading the gateway side: {e}");
                    std::process::exit(1);
                }
            }
        }
    })?;
    // Frames toward the gateway: queued with the time each is due; the sender holds each
    // until then. The queue is bounded: a full one drops the frame, as a full netem does.
    let (tx, rx) = mpsc::sync_channel::<(Instant, Vec<u8>)>(args.limit.max(1));
    let out_gateway = to_gateway.try_clone()?;
    std::thread::Builder::new().name("to gateway".into()).spawn(move || {
        let mut pending: VecDeque<(Instant, Vec<u8>)> = VecDeque::new();
        while let Ok(item) = rx.recv() {
            pending.push_back(item);
            while let Some((due, frame)) = pending.pop_front() {
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
                let _ = out_gateway.send(&frame);
                // Whatever arrived meanwhile, without blocking.
                while let Ok(more) = rx.try_recv() {
                    pending.push_back(more);
                }
            }
        }
    })?;
    if args.detach {
        netns::ip_here(&["link", "set", &args.gateway_side, "nomaster"])
            .with_context(|| format!("taking {} off its bridge", args.gateway_side))?;
    }
    println!(
        "{READY}{} ⇄ {}: toward the gateway {} (queue of {} frames)",
        args.bridge_side,
        args.gateway_side,
        imp.describe(),
        args.limit
    );
    let mut schedule = Schedule {
        imp,
        rng: Rng::seeded(),
        last: None,
    };
    let mut buf = vec![0u8; FRAME];
    let mut full = 0u64;
    loop {
        let n = match to_bridge.recv(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("reading the bridge side"),
        };
        if n <= VNET_HDR {
            continue;
        }
        let Some(due) = schedule.due(Instant::now()) else {
            continue;
        };
        if let Err(mpsc::TrySendError::Full(_)) = tx.try_send((due, buf[..n].to_vec())) {
            full += 1;
            if full.is_power_of_two() {
                eprintln!("wan-relay: queue full, {full} frames dropped so far");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_rates_read_as_netem_writes_them() {
        assert_eq!(parse_loss("100%"), Ok(1.0));
        assert_eq!(parse_loss("0.5%"), Ok(0.005));
        assert_eq!(parse_loss("0.25"), Ok(0.25));
        assert!(parse_loss("120%").is_err() && parse_loss("lots").is_err());
        let imp = Impairment {
            delay: Duration::from_millis(100),
            jitter: Duration::from_millis(10),
            loss: 0.01,
        };
        assert_eq!(imp.netem_args(), ["delay", "100000us", "10000us", "loss", "1%"]);
        assert_eq!(imp.describe(), "delay 100 ms ± 10 ms, loss 1%");
        assert_eq!(Impairment::CUT.netem_args(), ["loss", "100%"]);
    }

    #[test]
    fn frames_are_delayed_within_the_jitter_kept_in_order_and_lost_at_the_rate() {
        let mut s = Schedule {
            imp: Impairment {
                delay: Duration::from_millis(100),
                jitter: Duration::from_millis(20),
                loss: 0.25,
            },
            rng: Rng(0x9E37_79B9_7F4A_7C15),
            last: None,
        };
        let t0 = Instant::now();
        let (mut lost, mut previous) = (0, t0);
        for i in 0..10_000u64 {
            let arrived = t0 + Duration::from_micros(i * 50);
            match s.due(arrived) {
                None => lost += 1,
                Some(due) => {
                    assert!(due >= previous, "frame {i} overtook the one ahead");
                    let d = due - arrived;
                    assert!(d <= Duration::from_millis(120), "frame {i} held {d:?}");
                    // Held behind a slower one ahead of it, at least delay - jitter.
                    assert!(d >= Duration::from_millis(80), "frame {i} held only {d:?}");
                    previous = due;
                }
            }
        }
        assert!((2300..2700).contains(&lost), "{lost} of 10000 lost at 25%");
    }
}
