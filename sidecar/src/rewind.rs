//! A stream whose first bytes were read to find out what it speaks (a TLS peer's first
//! record, an HTTP/2 preface), with those bytes put back in front.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncRead, ReadBuf};

/// A stream whose first bytes were already read: they are read again first.
pub struct Rewind<S> {
    first: Option<Bytes>,
    inner: S,
}

impl<S> Rewind<S> {
    /// `inner`, whose `first` bytes were read from it already.
    pub fn new(first: Bytes, inner: S) -> Self {
        Self {
            first: Some(first),
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if let Some(mut first) = self.first.take() {
            let n = first.len().min(buf.remaining());
            buf.put_slice(&first.split_to(n));
            if !first.is_empty() {
                self.first = Some(first);
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

crate::pass_writes::pass_writes!(Rewind);
