//! Request bodies on their way upstream: streamed as the client sends them, or held in
//! memory (up to a bound) so that a retry or a mirror can send them again. A body found
//! larger than the bound while being held is sent on from where holding stopped.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Either, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};

/// A request body upstream: the client's, streamed (perhaps after a held start), or one
/// held whole.
pub type Outgoing = Either<Resumed, Full<Bytes>>;

/// A request body as the pools send it (see [`crate::pool::Plaintext`]): what the inbound
/// side forwards is streamed on as it comes; the outbound side's is one already.
pub trait IntoOutgoing {
    fn into_outgoing(self) -> Outgoing;
}

impl IntoOutgoing for Incoming {
    fn into_outgoing(self) -> Outgoing {
        Resumed::streamed(self)
    }
}

impl IntoOutgoing for Outgoing {
    fn into_outgoing(self) -> Outgoing {
        self
    }
}

/// The client's body, with whatever of it was already read in front.
#[derive(Debug)]
pub struct Resumed {
    held: Option<Bytes>,
    rest: Incoming,
}

impl Resumed {
    /// The client's body as it comes.
    pub fn streamed(body: Incoming) -> Outgoing {
        Either::Left(Resumed { held: None, rest: body })
    }
}

/// What holding a body gave.
#[derive(Debug)]
pub enum Held {
    /// All of it, within the bound: it may be sent again.
    Whole(Bytes),
    /// More than the bound: it goes on streaming, once.
    TooLarge(Outgoing),
}

/// Reads `body` into memory while it fits `limit` bytes. Trailers end the holding: a
/// held body is sent without them (HTTP/1.1 clients hardly ever send any).
pub async fn hold(mut body: Incoming, limit: u64) -> Result<Held, hyper::Error> {
    let mut held = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else { break };
        held.extend_from_slice(&data);
        if held.len() as u64 > limit {
            return Ok(Held::TooLarge(Either::Left(Resumed {
                held: Some(held.freeze()),
                rest: body,
            })));
        }
    }
    Ok(Held::Whole(held.freeze()))
}

impl Body for Resumed {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        if let Some(held) = self.held.take() {
            return Poll::Ready(Some(Ok(Frame::data(held))));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.held.is_none() && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let rest = self.rest.size_hint();
        let held = self.held.as_ref().map_or(0, |h| h.len() as u64);
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower() + held);
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper + held);
        }
        hint
    }
}
