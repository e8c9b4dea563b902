//! A stream that tells someone else how its first read went: the peer's first bytes, its
//! close, or an error (a TLS alert in the peer's first record). The pooled HTTP/2 hop
//! uses it to learn whether the server accepted our SVID before it offers the connection
//! to requests, without reading ahead of the protocol: it sends its preface and lets the
//! HTTP/2 connection do the reading. Reading first and rewinding would wait for the
//! server to speak first, which an HTTP/2 server need not do: Envoy (Istio's inbound
//! sidecar) sniffs the client's preface to choose its codec and says nothing until then.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, ReadBuf};
use tokio::sync::oneshot;

/// `S`, reporting the outcome of its first read to the [`oneshot::Receiver`] made with it.
pub struct FirstRead<S> {
    inner: S,
    tell: Option<oneshot::Sender<io::Result<()>>>,
}

impl<S> FirstRead<S> {
    /// `inner`, and where the outcome of its first read arrives: `Ok` when the peer sent
    /// bytes, an `UnexpectedEof` error when it closed first, its error otherwise. The
    /// receiver fails if the stream is dropped before it was read.
    pub fn new(inner: S) -> (Self, oneshot::Receiver<io::Result<()>>) {
        let (tell, told) = oneshot::channel();
        (
            Self {
                inner,
                tell: Some(tell),
            },
            told,
        )
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for FirstRead<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let read = ready!(Pin::new(&mut self.inner).poll_read(cx, buf));
        let Some(tell) = self.tell.take() else {
            return Poll::Ready(read);
        };
        match read {
            Ok(()) if buf.filled().len() > before => {
                let _ = tell.send(Ok(()));
                Poll::Ready(Ok(()))
            }
            Ok(()) if buf.remaining() == 0 => {
                // Nothing could be read into a full buffer: not an outcome yet.
                self.tell = Some(tell);
                Poll::Ready(Ok(()))
            }
            Ok(()) => {
                let _ = tell.send(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "closed before it spoke",
                )));
                Poll::Ready(Ok(()))
            }
            Err(e) => {
                // The original (with the TLS alert inside) goes to the one waiting to
                // name the refusal; the reader gets the same kind and text.
                let copy = io::Error::new(e.kind(), e.to_string());
                let _ = tell.send(Err(e));
                Poll::Ready(Err(copy))
            }
        }
    }
}

crate::pass_writes::pass_writes!(FirstRead);

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn the_first_bytes_are_told_and_still_read() {
        let (a, mut b) = tokio::io::duplex(64);
        let (mut s, told) = FirstRead::new(a);
        b.write_all(b"hello").await.unwrap();
        let mut buf = [0; 5];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hello");
        assert!(told.await.unwrap().is_ok());
    }

    #[tokio::test]
    async fn a_close_before_any_byte_is_told_as_eof() {
        let (a, b) = tokio::io::duplex(64);
        let (mut s, told) = FirstRead::new(a);
        drop(b);
        assert_eq!(s.read(&mut [0; 8]).await.unwrap(), 0);
        assert_eq!(told.await.unwrap().unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    }
}
