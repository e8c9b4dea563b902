//! Relays a connection's bytes inside the kernel with a BPF sockmap, so they never
//! wake user space (what Cilium does for socket-level acceleration).
//!
//! Once the ClientHello is read and the endpoint connected, both sockets go into one
//! `SOCKHASH`, each under the *other's* socket cookie. An `sk_skb` verdict program,
//! attached to the map, runs on every chunk a member socket receives and redirects it
//! to the egress of the socket stored under its own cookie: its pair. User space only
//! waits for end of stream and errors, passes half-closes on, and reads the byte
//! counts from `TCP_INFO`.
//!
//! The program is fifteen instructions, written out below rather than built with a BPF
//! toolchain. Creating the map needs `CAP_BPF` and `CAP_NET_ADMIN`: without them (or
//! on a kernel without sockmap) [`SockMap::load`] fails and the gateway copies in user
//! space instead, saying so in its log and in `/config_dump`.

use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use sidecar::splice::{Observer, SpliceError, Transferred};
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Why the sockmap could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The map could not be made (usually: not permitted).
    #[error("cannot create the BPF sockhash: {0}")]
    Map(io::Error),
    /// The kernel refused the verdict program; the verifier's log is attached.
    #[error("cannot load the BPF verdict program: {0}: {1}")]
    Program(io::Error, String),
    /// The program could not be attached to the map.
    #[error("cannot attach the BPF verdict program: {0}")]
    Attach(io::Error),
}

/// The map both sockets of every relayed connection go into, with its verdict program.
#[derive(Debug)]
pub struct SockMap {
    map: OwnedFd,
    _program: OwnedFd,
}

// From linux/bpf.h.
const BPF_MAP_CREATE: libc::c_int = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_int = 2;
const BPF_MAP_DELETE_ELEM: libc::c_int = 3;
const BPF_PROG_LOAD: libc::c_int = 5;
const BPF_PROG_ATTACH: libc::c_int = 8;
const BPF_MAP_TYPE_SOCKHASH: u32 = 18;
const BPF_PROG_TYPE_SK_SKB: u32 = 14;
const BPF_SK_SKB_VERDICT: u32 = 38;
const BPF_NOEXIST: u64 = 1;
const FUNC_GET_SOCKET_COOKIE: i32 = 46;
const FUNC_SK_REDIRECT_HASH: i32 = 72;

/// One BPF instruction: opcode, destination and source registers, offset, immediate.
#[repr(C)]
#[derive(Clone, Copy)]
struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: dst | (src << 4),
        off,
        imm,
    }
}

/// The verdict program, for a map whose fd is `map`:
///
/// ```text
/// if skb->len == 0: return SK_DROP ; see below
/// r6 = r1                         ; the skb
/// r0 = bpf_get_socket_cookie(r1)  ; the receiving socket
/// *(u64 *)(r10 - 8) = r0          ; the key, on the stack
/// r1 = r6; r2 = map; r3 = r10 - 8; r4 = 0 (egress)
/// r0 = bpf_sk_redirect_hash(r1, r2, r3, r4)  ; SK_PASS, or SK_DROP if not found
/// exit
/// ```
///
/// A socket is only ever in the map with its pair, so a lookup fails only while a
/// connection is being torn down, when dropping the chunk is right.
///
/// The kernel hands the program a bare FIN as an empty skb; redirected, the other
/// socket's sender fails on it ("sent 0 bytes") and marks that socket broken with
/// EPIPE. The end of stream is user space's business (it half-closes once the bytes
/// before it are out), so empty skbs are dropped here.
fn program(map: RawFd) -> [Insn; 15] {
    const MOV64_REG: u8 = 0xbf;
    const MOV64_IMM: u8 = 0xb7;
    const ADD64_IMM: u8 = 0x07;
    const STX_DW: u8 = 0x7b;
    const LD_IMM64: u8 = 0x18;
    const CALL: u8 = 0x85;
    const EXIT: u8 = 0x95;
    const LDX_W: u8 = 0x61;
    const JNE_IMM: u8 = 0x55;
    const PSEUDO_MAP_FD: u8 = 1;
    [
        insn(LDX_W, 2, 1, 0, 0), // r2 = skb->len (the first field of __sk_buff)
        insn(JNE_IMM, 2, 0, 2, 0),
        insn(MOV64_IMM, 0, 0, 0, 0),
        insn(EXIT, 0, 0, 0, 0),
        insn(MOV64_REG, 6, 1, 0, 0),
        insn(CALL, 0, 0, 0, FUNC_GET_SOCKET_COOKIE),
        insn(STX_DW, 10, 0, -8, 0),
        insn(MOV64_REG, 1, 6, 0, 0),
        insn(LD_IMM64, 2, PSEUDO_MAP_FD, 0, map),
        insn(0, 0, 0, 0, 0),
        insn(MOV64_REG, 3, 10, 0, 0),
        insn(ADD64_IMM, 3, 0, 0, -8),
        insn(MOV64_IMM, 4, 0, 0, 0),
        insn(CALL, 0, 0, 0, FUNC_SK_REDIRECT_HASH),
        insn(EXIT, 0, 0, 0, 0),
    ]
}

#[repr(C)]
#[derive(Default)]
struct MapCreate {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
}

#[repr(C)]
#[derive(Default)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

#[repr(C)]
#[derive(Default)]
struct ProgAttach {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
}

#[repr(C)]
#[derive(Default)]
struct MapElem {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

fn bpf<T>(cmd: libc::c_int, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, initialised bpf_attr prefix of the size passed; the
    // kernel reads (and for some commands writes) only that many bytes.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, size_of::<T>() as libc::c_uint) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Takes ownership of an fd the kernel just returned.
fn owned(fd: libc::c_long) -> OwnedFd {
    // SAFETY: the bpf syscall returned a new fd that nothing else owns.
    unsafe { OwnedFd::from_raw_fd(fd as RawFd) }
}

impl SockMap {
    /// Creates the map (room for `connections` relayed connections) and attaches the
    /// verdict program to it.
    pub fn load(connections: usize) -> Result<SockMap, LoadError> {
        let mut create = MapCreate {
            map_type: BPF_MAP_TYPE_SOCKHASH,
            key_size: 8,
            value_size: 8,
            max_entries: (connections.saturating_mul(2)).clamp(2, 1 << 20) as u32,
            ..MapCreate::default()
        };
        let map = owned(bpf(BPF_MAP_CREATE, &mut create).map_err(LoadError::Map)?);
        let insns = program(map.as_raw_fd());
        let license = c"GPL";
        let mut log = vec![0u8; 4096];
        let mut load = ProgLoad {
            prog_type: BPF_PROG_TYPE_SK_SKB,
            insn_cnt: insns.len() as u32,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            log_level: 1,
            log_size: log.len() as u32,
            log_buf: log.as_mut_ptr() as u64,
            ..ProgLoad::default()
        };
        load.prog_name[..6].copy_from_slice(b"gw_sni");
        let program = match bpf(BPF_PROG_LOAD, &mut load) {
            Ok(fd) => owned(fd),
            Err(e) => {
                let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
                return Err(LoadError::Program(e, String::from_utf8_lossy(&log[..end]).into_owned()));
            }
        };
        let mut attach = ProgAttach {
            target_fd: map.as_raw_fd() as u32,
            attach_bpf_fd: program.as_raw_fd() as u32,
            attach_type: BPF_SK_SKB_VERDICT,
            ..ProgAttach::default()
        };
        bpf(BPF_PROG_ATTACH, &mut attach).map_err(LoadError::Attach)?;
        Ok(SockMap { map, _program: program })
    }

    fn update(&self, key: u64, value: RawFd) -> io::Result<()> {
        let value = value as u64;
        let mut elem = MapElem {
            map_fd: self.map.as_raw_fd() as u32,
            key: &key as *const u64 as u64,
            value: &value as *const u64 as u64,
            flags: BPF_NOEXIST,
            ..MapElem::default()
        };
        bpf(BPF_MAP_UPDATE_ELEM, &mut elem).map(|_| ())
    }

    fn delete(&self, key: u64) {
        let mut elem = MapElem {
            map_fd: self.map.as_raw_fd() as u32,
            key: &key as *const u64 as u64,
            ..MapElem::default()
        };
        let _ = bpf(BPF_MAP_DELETE_ELEM, &mut elem);
    }

    /// Puts `down` and `up` into the map as a pair, before any byte has been written to
    /// `up` (so nothing it receives can predate its verdict program). On error neither
    /// is in the map and the caller relays in user space.
    pub fn pair(&self, down: &TcpStream, up: &TcpStream) -> io::Result<()> {
        let (d, u) = (down.as_raw_fd(), up.as_raw_fd());
        let (down_key, up_key) = (cookie(d)?, cookie(u)?);
        // `up` goes in first: it has received nothing yet, while the client may send
        // more at any time, and `down`'s chunks need `up` to be there when they come.
        self.update(down_key, u)?;
        if let Err(e) = self.update(up_key, d) {
            self.delete(down_key);
            return Err(e);
        }
        // Bytes `down` received between the last read of the hello and now sit in its
        // queue until the kernel next calls its data-ready hook: setting SO_RCVLOWAT
        // calls it, so they are redirected now, in order, before anything newer.
        setsockopt_int(d, libc::SOL_SOCKET, libc::SO_RCVLOWAT, 1)?;
        Ok(())
    }
}

fn cookie(fd: RawFd) -> io::Result<u64> {
    let mut v = 0u64;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: `v` has room for the u64 SO_COOKIE writes, and `len` says so.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&mut v as *mut u64).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(v)
    } else {
        Err(io::Error::last_os_error())
    }
}

fn setsockopt_int(fd: RawFd, level: libc::c_int, name: libc::c_int, v: libc::c_int) -> io::Result<()> {
    // SAFETY: a c_int option value of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&v as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The part of `struct tcp_info` (linux/tcp.h) read here, laid out as the kernel's.
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct TcpInfo {
    state: u8,
    _u8s: [u8; 7],
    _u32s_a: [u32; 9],
    _last_data_sent: u32,
    _last_ack_sent: u32,
    last_data_recv: u32,
    _u32s_b: [u32; 12],
    _pacing: [u64; 2],
    bytes_acked: u64,
    bytes_received: u64,
}

impl TcpInfo {
    /// Data bytes received: the kernel's count takes the peer's FIN as one more.
    fn data_received(&self, fin: bool) -> u64 {
        // States in which the peer's FIN has arrived (linux/tcp_states.h); a closed
        // socket may or may not have seen one, so the caller says.
        const TIME_WAIT: u8 = 6;
        const CLOSE_WAIT: u8 = 8;
        const LAST_ACK: u8 = 9;
        const CLOSING: u8 = 11;
        let fin = fin || matches!(self.state, TIME_WAIT | CLOSE_WAIT | LAST_ACK | CLOSING);
        self.bytes_received.saturating_sub(u64::from(fin))
    }
}

fn tcp_info(fd: RawFd) -> io::Result<TcpInfo> {
    let mut info = TcpInfo::default();
    let mut len = size_of::<TcpInfo>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes of tcp_info into `info`.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut TcpInfo).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(info)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Bytes queued on a socket and not yet acknowledged by its peer.
fn unacked(fd: RawFd) -> io::Result<u64> {
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one c_int.
    let rc = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut n) };
    if rc == 0 {
        Ok(n as u64)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// How long a stream's end may wait for the bytes before it to leave through the other
/// socket. The kernel sends them within microseconds; they never leave only when that
/// socket failed, which its own error reports.
const FLUSH_PATIENCE: Duration = Duration::from_secs(5);
/// How often a pending end of stream looks again.
const FLUSH_POLL: Duration = Duration::from_millis(1);
/// How often the byte counters of a long connection are brought up to date.
const COUNT_EVERY: Duration = Duration::from_secs(5);

/// One direction: what `from` receives the kernel sends out of `to`.
struct Way<'a> {
    from: &'a TcpStream,
    to: &'a TcpStream,
    /// `from` has reached end of stream.
    eof: Option<Instant>,
    /// `to` has been half-closed.
    shut: bool,
    /// Bytes `from` had received when last counted.
    counted: u64,
    /// Blames errors on the right side.
    from_down: bool,
}

impl Way<'_> {
    fn read_error(&self, e: io::Error) -> SpliceError {
        if self.from_down {
            SpliceError::Downstream(e)
        } else {
            SpliceError::Upstream(e)
        }
    }
    fn write_error(&self, e: io::Error) -> SpliceError {
        if self.from_down {
            SpliceError::Upstream(e)
        } else {
            SpliceError::Downstream(e)
        }
    }

    /// Bytes received so far, and whether all of them have been written into `to`.
    fn progress(&self) -> Result<(u64, bool), SpliceError> {
        let got = tcp_info(self.from.as_raw_fd())
            .map_err(|e| self.read_error(e))?
            .data_received(self.eof.is_some());
        let out = tcp_info(self.to.as_raw_fd())
            .map_err(|e| self.write_error(e))?
            .bytes_acked;
        let queued = unacked(self.to.as_raw_fd()).map_err(|e| self.write_error(e))?;
        Ok((got, out + queued >= got))
    }
}

/// Carries a paired connection until both directions have ended, an error, or
/// `idle_timeout` without a byte. `written_up` is what user space already wrote to
/// `up` (the hello), counted by the caller.
pub async fn relay(
    down: &TcpStream,
    up: &TcpStream,
    written_up: u64,
    idle_timeout: Duration,
    observer: &impl Observer,
) -> Result<Transferred, SpliceError> {
    let mut ways = [
        Way {
            from: down,
            to: up,
            eof: None,
            shut: false,
            counted: written_up,
            from_down: true,
        },
        Way {
            from: up,
            to: down,
            eof: None,
            shut: false,
            counted: 0,
            from_down: false,
        },
    ];
    let count = |ways: &mut [Way<'_>; 2], i: usize, got: u64| {
        let w = &mut ways[i];
        if got > w.counted {
            if w.from_down {
                observer.to_upstream(got - w.counted);
            } else {
                observer.to_downstream(got - w.counted);
            }
            w.counted = got;
        }
    };
    let interest = Interest::READABLE | Interest::ERROR;
    let mut wake = Instant::now() + COUNT_EVERY.min(idle_timeout);
    loop {
        let (d_open, u_open) = (ways[0].eof.is_none(), ways[1].eof.is_none());
        let ready = tokio::select! {
            r = down.ready(interest), if d_open => Some((0, r)),
            r = up.ready(interest), if u_open => Some((1, r)),
            () = tokio::time::sleep_until(wake) => None,
        };
        match ready {
            Some((i, r)) => {
                let w = &ways[i];
                let r = r.map_err(|e| w.read_error(e))?;
                if r.is_error() {
                    let e = w
                        .from
                        .take_error()
                        .ok()
                        .flatten()
                        .unwrap_or_else(|| io::ErrorKind::ConnectionReset.into());
                    return Err(w.read_error(e));
                }
                if r.is_read_closed() {
                    ways[i].eof = Some(Instant::now());
                } else {
                    // Woken by a chunk the kernel already moved: nothing to read. The
                    // readiness is cleared so the next wake is a new event.
                    let _ = w
                        .from
                        .try_io(Interest::READABLE, || Err::<(), _>(io::ErrorKind::WouldBlock.into()));
                    continue;
                }
            }
            None => {
                // Count what moved, and close the connection if nothing did for the idle timeout.
                let d = tcp_info(down.as_raw_fd()).map_err(SpliceError::Downstream)?;
                let u = tcp_info(up.as_raw_fd()).map_err(SpliceError::Upstream)?;
                let (d_fin, u_fin) = (ways[0].eof.is_some(), ways[1].eof.is_some());
                count(&mut ways, 0, d.data_received(d_fin));
                count(&mut ways, 1, u.data_received(u_fin));
                let quiet = Duration::from_millis(d.last_data_recv.min(u.last_data_recv).into());
                if quiet >= idle_timeout {
                    return Err(SpliceError::Idle(idle_timeout));
                }
                wake = Instant::now() + COUNT_EVERY.min(idle_timeout - quiet);
                if !ways.iter().any(|w| w.eof.is_some() && !w.shut) {
                    continue;
                }
            }
        }
        // Pass each end of stream on once the bytes before it have left.
        let mut pending = false;
        for i in 0..2 {
            let Some(since) = ways[i].eof else { continue };
            if ways[i].shut {
                continue;
            }
            let (got, flushed) = ways[i].progress()?;
            count(&mut ways, i, got);
            if flushed {
                let w = &ways[i];
                match shutdown_write(w.to) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotConnected => {}
                    Err(e) => return Err(w.write_error(e)),
                }
                ways[i].shut = true;
            } else if since.elapsed() > FLUSH_PATIENCE {
                return Err(ways[i].write_error(io::ErrorKind::TimedOut.into()));
            } else {
                pending = true;
            }
        }
        if ways.iter().all(|w| w.shut) {
            return Ok(Transferred {
                to_upstream: ways[0].counted,
                to_downstream: ways[1].counted,
            });
        }
        if pending {
            wake = Instant::now() + FLUSH_POLL;
        }
    }
}

fn shutdown_write(s: &TcpStream) -> io::Result<()> {
    // SAFETY: the fd is a live socket owned by `s` for the duration of the call.
    let rc = unsafe { libc::shutdown(s.as_raw_fd(), libc::SHUT_WR) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_info_fields_sit_where_the_kernel_puts_them() {
        // Offsets in linux/tcp.h's struct tcp_info.
        assert_eq!(std::mem::offset_of!(TcpInfo, last_data_recv), 56);
        assert_eq!(std::mem::offset_of!(TcpInfo, bytes_acked), 120);
        assert_eq!(std::mem::offset_of!(TcpInfo, bytes_received), 128);
    }
}
