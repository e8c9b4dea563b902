//! Moves bytes both ways between two TCP connections without looking at them.
//!
//! Two ways, chosen per proxy: [`Mode::Copy`] reads into a user-space buffer and
//! writes it out; [`Mode::Splice`] moves socket → pipe → socket with `splice(2)`,
//! so the (encrypted, unreadable anyway) payload never enters user space. See
//! [`Mode`] for why copy is the default.
//!
//! Each direction ends on its own: an EOF from one side becomes a `shutdown(SHUT_WR)`
//! towards the other (half-close), and the splice ends when both directions have.
//! An error in either direction, or no byte in either direction for the idle
//! timeout, ends both.

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::time::Instant;

/// How bytes are moved.
///
/// Copy is the default because it measured faster: in the SNI-passthrough
/// benchmark on loopback, splice used less CPU per GiB but moved fewer MiB/s
/// (a 64 KiB pipe makes each direction a serial fill-then-drain; a 1 MiB pipe
/// was slower still), and both cost the same per new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Zero-copy through a kernel pipe with `splice(2)`.
    Splice,
    /// `read(2)` into a user-space buffer and `write(2)` it out.
    #[default]
    Copy,
}

/// Why a splice ended early.
#[derive(Debug, thiserror::Error)]
pub enum SpliceError {
    /// Neither side sent a byte for the idle timeout.
    #[error("idle for {0:?}")]
    Idle(Duration),
    /// The downstream (client) side failed: reset, broken pipe, …
    #[error("downstream: {0}")]
    Downstream(io::Error),
    /// The upstream (server) side failed.
    #[error("upstream: {0}")]
    Upstream(io::Error),
    /// No pipe could be made (usually the file-descriptor limit).
    #[error("pipe: {0}")]
    Pipe(io::Error),
}

impl SpliceError {
    /// The metric reason label for a connection closed by this error.
    pub fn reason(&self) -> &'static str {
        match self {
            SpliceError::Idle(_) => "idle_timeout",
            SpliceError::Downstream(_) => "downstream_error",
            SpliceError::Upstream(_) => "upstream_error",
            SpliceError::Pipe(_) => "resource_exhausted",
        }
    }
}

/// Byte counts of one spliced connection.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Transferred {
    /// Bytes from downstream (the client) to upstream.
    pub to_upstream: u64,
    /// Bytes from upstream to downstream (the client).
    pub to_downstream: u64,
}

/// Called with every chunk moved, so counters stay current for long connections.
pub trait Observer {
    /// `n` bytes went from downstream to upstream.
    fn to_upstream(&self, n: u64);
    /// `n` bytes went from upstream to downstream.
    fn to_downstream(&self, n: u64);
}

impl Observer for () {
    fn to_upstream(&self, _: u64) {}
    fn to_downstream(&self, _: u64) {}
}

/// Splices `downstream` and `upstream` until both directions have ended.
pub async fn bidirectional(
    downstream: &mut TcpStream,
    upstream: &mut TcpStream,
    mode: Mode,
    idle_timeout: Duration,
    observer: &impl Observer,
) -> Result<Transferred, SpliceError> {
    let clock = Activity::new();
    let ended = AtomicBool::new(false);
    let (down_r, down_w) = downstream.split();
    let (up_r, up_w) = upstream.split();
    let up = pump(
        down_r,
        up_w,
        mode,
        &clock,
        &ended,
        |n| observer.to_upstream(n),
        Side::Downstream,
    );
    let down = pump(
        up_r,
        down_w,
        mode,
        &clock,
        &ended,
        |n| observer.to_downstream(n),
        Side::Upstream,
    );
    let both = async { tokio::try_join!(up, down) };
    tokio::select! {
        biased;
        r = both => r.map(|(to_upstream, to_downstream)| Transferred { to_upstream, to_downstream }),
        () = clock.idle(idle_timeout) => Err(SpliceError::Idle(idle_timeout)),
    }
}

/// Which side a pump reads from; an error reading blames it, an error writing blames the other.
#[derive(Clone, Copy)]
enum Side {
    Downstream,
    Upstream,
}

impl Side {
    fn read_error(self, e: io::Error) -> SpliceError {
        match self {
            Side::Downstream => SpliceError::Downstream(e),
            Side::Upstream => SpliceError::Upstream(e),
        }
    }
    fn write_error(self, e: io::Error) -> SpliceError {
        match self {
            Side::Downstream => SpliceError::Upstream(e),
            Side::Upstream => SpliceError::Downstream(e),
        }
    }
}

/// The last time a byte moved either way, shared by both pumps of one connection.
struct Activity {
    start: Instant,
    last_nanos: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            last_nanos: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let nanos = self.start.elapsed().as_nanos() as u64;
        self.last_nanos.store(nanos, Ordering::Relaxed);
    }

    /// Completes once no byte has moved for `timeout`; re-arms on activity
    /// instead of resetting a timer on every chunk, which would cost a timer-wheel
    /// update per read.
    async fn idle(&self, timeout: Duration) {
        loop {
            let last = self.start + Duration::from_nanos(self.last_nanos.load(Ordering::Relaxed));
            let deadline = last + timeout;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// Moves one direction until EOF (then half-closes `dst`) or an error.
///
/// `ended` is set by the first of the two directions to end. The second does not
/// half-close: both are over, so the caller closes both sockets next, and `close`
/// sends the FIN (nothing is left to read, so it is a FIN and not a reset). One
/// `shutdown` less per connection.
async fn pump(
    src: ReadHalf<'_>,
    mut dst: WriteHalf<'_>,
    mode: Mode,
    clock: &Activity,
    ended: &AtomicBool,
    count: impl Fn(u64),
    side: Side,
) -> Result<u64, SpliceError> {
    let total = match mode {
        Mode::Splice => pump_splice(src.as_ref(), dst.as_ref(), clock, &count, side).await?,
        Mode::Copy => pump_copy(src, &mut dst, clock, &count, side).await?,
    };
    if ended.swap(true, Ordering::AcqRel) {
        return Ok(total);
    }
    // Half-close: the peer learns this direction is done, the other goes on.
    // ENOTCONN means the peer already closed both ways; nothing is lost then.
    match shutdown_write(dst.as_ref()) {
        Ok(()) => Ok(total),
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(total),
        Err(e) => Err(side.write_error(e)),
    }
}

/// Tells tokio that `s` has nothing more to read just now, after a read that returned
/// less than it asked for (a TCP read stops short only when the receive queue is
/// empty), so the next wait for readability sleeps until new bytes come instead of
/// costing a `read` that fails with EAGAIN.
///
/// Call it right after that read, with no `.await` in between. It is sound only on a
/// current-thread runtime, and does nothing on others: there the I/O driver runs on
/// this same thread, so no readiness can be recorded between the read and this call,
/// and bytes that arrive after the read raise a new edge-triggered event that sets
/// readiness again. On a multi-thread runtime another thread's driver could record
/// such an event in between, and clearing it would leave the connection asleep with
/// bytes waiting.
pub fn mark_drained(s: &TcpStream) {
    if tokio::runtime::Handle::current().runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread {
        // A closure that reports WouldBlock clears the readiness without a syscall.
        let _ = s.try_io(Interest::READABLE, || Err::<(), _>(io::ErrorKind::WouldBlock.into()));
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

/// The user-space buffer of [`Mode::Copy`], per direction, while bytes flow.
const COPY_BYTES: usize = 64 * 1024;

/// How much one splice call may move: the pipe's capacity, so a fill never blocks
/// on a full pipe (which would be indistinguishable from an idle socket).
const PIPE_BYTES: usize = 64 * 1024;

async fn pump_splice(
    src: &TcpStream,
    dst: &TcpStream,
    clock: &Activity,
    count: &impl Fn(u64),
    side: Side,
) -> Result<u64, SpliceError> {
    let pipe = Pipe::take().map_err(SpliceError::Pipe)?;
    let mut total = 0u64;
    let result = async {
        loop {
            // Fill the (empty) pipe from the source socket.
            let n = loop {
                src.readable().await.map_err(|e| side.read_error(e))?;
                match src.try_io(Interest::READABLE, || {
                    splice(src.as_raw_fd(), pipe.write.as_raw_fd(), PIPE_BYTES)
                }) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(side.read_error(e)),
                }
            };
            if n == 0 {
                return Ok(total);
            }
            clock.touch();
            // Drain it into the destination socket.
            let mut left = n;
            while left > 0 {
                dst.writable().await.map_err(|e| side.write_error(e))?;
                match dst.try_io(Interest::WRITABLE, || {
                    splice(pipe.read.as_raw_fd(), dst.as_raw_fd(), left)
                }) {
                    Ok(m) => left -= m,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(side.write_error(e)),
                }
            }
            clock.touch();
            total += n as u64;
            count(n as u64);
        }
    }
    .await;
    // Only an empty pipe may serve another connection.
    if result.is_ok() {
        pipe.give_back();
    }
    result
}

async fn pump_copy(
    src: ReadHalf<'_>,
    dst: &mut WriteHalf<'_>,
    clock: &Activity,
    count: &impl Fn(u64),
    side: Side,
) -> Result<u64, SpliceError> {
    let (src, dst) = (src.as_ref(), dst.as_ref());
    let mut total = 0u64;
    loop {
        src.readable().await.map_err(|e| side.read_error(e))?;
        // The buffer is held only while bytes keep coming, so an idle connection
        // holds no user-space memory; it is never zeroed, only read into.
        let mut buf = Buffer::take();
        loop {
            buf.clear();
            let n = match src.try_read_buf(&mut *buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(side.read_error(e)),
            };
            if n == 0 {
                return Ok(total);
            }
            let drained = n < buf.capacity();
            if drained {
                mark_drained(src);
            }
            clock.touch();
            let mut off = 0;
            while off < n {
                dst.writable().await.map_err(|e| side.write_error(e))?;
                match dst.try_write(&buf[off..n]) {
                    Ok(m) => off += m,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(side.write_error(e)),
                }
            }
            clock.touch();
            total += n as u64;
            count(n as u64);
            if drained {
                break;
            }
        }
    }
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: both fds are open for the duration of the call; null offsets mean
    // "use and advance the file position", as required for sockets and pipes.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// A kernel pipe used as the splice buffer.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

/// Empty pipes kept per thread for the next connection: making one costs a
/// `pipe2` and two `close`s, which shows up in connections per second.
const POOL_MAX: usize = 128;

/// Empty copy buffers kept per thread: 1 MiB at most.
const BUFFER_POOL_MAX: usize = 16;

thread_local! {
    static POOL: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
    static BUFFERS: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// A copy buffer borrowed from this thread's pool for one burst of bytes.
///
/// Allocating and freeing 64 KiB per burst makes the allocator hand memory back
/// to the kernel and fault it in again; a small pool of empty buffers keeps the
/// memory of busy connections warm, while idle connections hold none.
struct Buffer(Vec<u8>);

impl Buffer {
    fn take() -> Buffer {
        let buf = BUFFERS
            .with(|b| b.borrow_mut().pop())
            .unwrap_or_else(|| Vec::with_capacity(COPY_BYTES));
        Buffer(buf)
    }
}

impl std::ops::Deref for Buffer {
    type Target = Vec<u8>;
    fn deref(&self) -> &Vec<u8> {
        &self.0
    }
}

impl std::ops::DerefMut for Buffer {
    fn deref_mut(&mut self) -> &mut Vec<u8> {
        &mut self.0
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        let mut buf = std::mem::take(&mut self.0);
        buf.clear();
        // try_with: a connection dropped while the thread is exiting just frees it.
        let _ = BUFFERS.try_with(|b| {
            let mut b = b.borrow_mut();
            if b.len() < BUFFER_POOL_MAX {
                b.push(buf);
            }
        });
    }
}

impl Pipe {
    fn take() -> io::Result<Pipe> {
        if let Some(p) = POOL.with(|pool| pool.borrow_mut().pop()) {
            return Ok(p);
        }
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two fds pipe2 writes.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both fds are open and owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        Ok(Pipe { read, write })
    }

    fn give_back(self) {
        let _ = POOL.try_with(|pool| {
            let mut pool = pool.borrow_mut();
            if pool.len() < POOL_MAX {
                pool.push(self);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A connected pair of sockets: (the end a test holds, the end the splice gets).
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    async fn run(mode: Mode) {
        let (mut client, mut down) = pair().await;
        let (mut up, mut server) = pair().await;
        let task = tokio::spawn(async move {
            bidirectional(&mut down, &mut up, mode, Duration::from_secs(30), &())
                .await
                .map_err(|e| e.to_string())
        });
        let payload: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
        client.write_all(&payload).await.unwrap();
        // Half-close from the client: the server must see EOF and still be able to answer.
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, payload);
        server.write_all(b"answer after half-close").await.unwrap();
        server.shutdown().await.unwrap();
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer, b"answer after half-close");
        let t = task.await.unwrap().unwrap();
        assert_eq!(
            t,
            Transferred {
                to_upstream: 300_000,
                to_downstream: 23
            }
        );
    }

    /// Both directions at once, many buffers' worth each way, while the peers read
    /// and write concurrently: the pattern of a bulk transfer with flow control.
    async fn bulk_both_ways(mode: Mode) {
        const N: usize = 24 << 20;
        let (client, mut down) = pair().await;
        let (mut up, server) = pair().await;
        let proxy =
            tokio::spawn(async move { bidirectional(&mut down, &mut up, mode, Duration::from_secs(30), &()).await });
        let pattern = |seed: usize| -> Vec<u8> { (0..N).map(|i| ((i * 31 + seed) % 251) as u8).collect() };
        // Each peer writes its pattern then half-closes, while reading the other's to EOF.
        let peer = |s: TcpStream, seed: usize| async move {
            let (mut r, mut w) = s.into_split();
            let writer = tokio::spawn(async move {
                w.write_all(&pattern(seed)).await.unwrap();
                w.shutdown().await.unwrap();
            });
            let mut got = Vec::with_capacity(N);
            r.read_to_end(&mut got).await.unwrap();
            writer.await.unwrap();
            got
        };
        let both = async { tokio::join!(peer(client, 1), peer(server, 2)) };
        let (at_client, at_server) = tokio::time::timeout(Duration::from_secs(120), both)
            .await
            .expect("bulk stalled");
        assert!(
            at_client == pattern(2),
            "client got {} bytes, not the server's pattern",
            at_client.len()
        );
        assert!(
            at_server == pattern(1),
            "server got {} bytes, not the client's pattern",
            at_server.len()
        );
        let t = proxy.await.unwrap().unwrap();
        assert_eq!(
            t,
            Transferred {
                to_upstream: N as u64,
                to_downstream: N as u64
            }
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn copy_carries_bulk_both_ways_at_once() {
        bulk_both_ways(Mode::Copy).await;
    }

    /// On one thread short reads clear readiness instead of reading to EAGAIN
    /// ([`mark_drained`]); a wake-up lost that way would stall this transfer.
    #[tokio::test]
    async fn copy_carries_bulk_both_ways_at_once_on_one_thread() {
        bulk_both_ways(Mode::Copy).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn splice_carries_bulk_both_ways_at_once() {
        bulk_both_ways(Mode::Splice).await;
    }

    #[tokio::test]
    async fn splice_moves_bytes_and_half_closes() {
        run(Mode::Splice).await;
    }

    #[tokio::test]
    async fn copy_moves_bytes_and_half_closes() {
        run(Mode::Copy).await;
    }

    #[tokio::test]
    async fn idle_connection_is_closed() {
        let (_client, mut down) = pair().await;
        let (mut up, _server) = pair().await;
        let r = bidirectional(&mut down, &mut up, Mode::Copy, Duration::from_millis(100), &()).await;
        assert!(matches!(r, Err(SpliceError::Idle(_))), "{r:?}");
    }
}
