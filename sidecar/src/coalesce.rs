//! Write coalescing for an HTTP/2 connection: what turns the frames of several responses
//! (or requests) ready in one turn of the runtime into one TLS write and one syscall.
//!
//! h2 writes a DATA frame of 256 bytes or more on its own and flushes before it buffers
//! the next one, so each 1 KiB response cost its own `writev` (and its own TLS record, and
//! its own wake-up of the peer). [`Coalesced`] takes every write into a buffer and holds
//! back the flushes of one poll of the connection's task: each is reported done and the
//! task woken, and its next poll — after the other tasks ready now have run and queued
//! their frames — writes everything at once. A poll is told from the next by the reads h2
//! makes at the start of every poll of an open connection; a flush with nothing new since
//! the last one (a poll that read nothing and wrote nothing), a buffer past [`LIMIT`], or
//! shutting down, writes at once, so held bytes wait one poll at most. The first flush is
//! never held: it is the client's preface or the server's SETTINGS, and each side may wait
//! for the other's before it writes anything more.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes held before a write goes out whatever the flushes say.
const LIMIT: usize = 64 * 1024;

/// `S` with its writes gathered (see the module's documentation).
pub struct Coalesced<S> {
    inner: S,
    buf: Vec<u8>,
    /// How much of `buf` is written already (a write that went out in part).
    written: usize,
    /// `buf`'s length at the last flush: one that finds no new bytes since then writes.
    flushed_len: usize,
    /// Reads so far: a new one means a new poll of the task.
    reads: u64,
    /// Holding back a flush since the poll that had made `reads` reads.
    held: Option<u64>,
    /// Something was written already (the handshake is over).
    armed: bool,
}

impl<S> Coalesced<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            buf: Vec::new(),
            written: 0,
            flushed_len: 0,
            reads: 0,
            held: None,
            armed: false,
        }
    }
}

impl<S: AsyncWrite + Unpin> Coalesced<S> {
    /// Writes out everything held.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.buf.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.buf[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.buf.clear();
        self.written = 0;
        self.flushed_len = 0;
        self.held = None;
        self.armed = true;
        Poll::Ready(Ok(()))
    }

    /// Makes room for more when the buffer is full.
    fn poll_room(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.buf.len() >= LIMIT {
            ready!(self.poll_drain(cx))?;
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Coalesced<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        self.reads = self.reads.wrapping_add(1);
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Coalesced<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        ready!(self.poll_room(cx))?;
        let n = data.len().min(LIMIT.saturating_sub(self.buf.len()).max(1));
        self.buf.extend_from_slice(&data[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        ready!(self.poll_room(cx))?;
        let mut n = 0;
        for b in bufs {
            if self.buf.len() >= LIMIT && n > 0 {
                break;
            }
            let take = b.len().min(LIMIT.saturating_sub(self.buf.len()).max(1));
            self.buf.extend_from_slice(&b[..take]);
            n += take;
            if take < b.len() {
                break;
            }
        }
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = &mut *self;
        let len = me.buf.len();
        let fresh = len > me.flushed_len;
        me.flushed_len = len;
        let same_poll = me.held.is_none_or(|reads| reads == me.reads);
        if fresh && len < LIMIT && same_poll && me.armed {
            // Let the tasks ready now add their frames; write on the next poll.
            me.held.get_or_insert(me.reads);
            cx.waker().wake_by_ref();
            return Poll::Ready(Ok(()));
        }
        ready!(me.poll_drain(cx))?;
        Pin::new(&mut me.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn held_bytes_go_out_on_the_next_flush_with_nothing_new() {
        let (client, mut server) = tokio::io::duplex(1 << 20);
        let mut c = Coalesced::new(client);
        // The first flush (a handshake's) writes at once.
        c.write_all(b"hi ").await.unwrap();
        c.flush().await.unwrap();
        assert!(c.buf.is_empty());
        c.write_all(b"one ").await.unwrap();
        // A flush after new bytes holds them back, and so does the next one in the same
        // poll (no read between them) when it brings more...
        c.flush().await.unwrap();
        c.write_all(b"two").await.unwrap();
        c.flush().await.unwrap();
        assert_eq!(c.buf.len(), 7, "held, not written");
        // ...one with nothing new writes them all at once.
        c.flush().await.unwrap();
        assert!(c.buf.is_empty());
        let mut got = [0u8; 10];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hi one two");

        // A read (a new poll of the connection's task) ends the hold: the next flush writes.
        c.write_all(b"three").await.unwrap();
        c.flush().await.unwrap();
        assert_eq!(c.buf.len(), 5);
        server.write_all(b"x").await.unwrap();
        let mut one = [0u8; 1];
        c.read_exact(&mut one).await.unwrap();
        c.write_all(b"four").await.unwrap();
        c.flush().await.unwrap();
        assert!(c.buf.is_empty());
        let mut got = [0u8; 9];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"threefour");
    }

    #[tokio::test]
    async fn a_full_buffer_is_written_without_a_flush_and_shutdown_writes_the_rest() {
        let (client, mut server) = tokio::io::duplex(1 << 20);
        let reader = tokio::spawn(async move {
            let mut all = Vec::new();
            server.read_to_end(&mut all).await.unwrap();
            all
        });
        let mut c = Coalesced::new(client);
        let chunk = vec![7u8; 10_000];
        for _ in 0..10 {
            c.write_all(&chunk).await.unwrap();
        }
        assert!(c.buf.len() < LIMIT, "writes beyond the limit went out");
        c.shutdown().await.unwrap();
        drop(c);
        assert_eq!(reader.await.unwrap(), vec![7u8; 100_000]);
    }
}
