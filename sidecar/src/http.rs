//! What both sides of an HTTP-aware hop share: the headers that never cross a hop, the
//! answer a caller gets when the upstream cannot be reached (Envoy's, word for word), the
//! request protocol label, and a response body that tells its pool when it is done.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::http::uri::{Authority, PathAndQuery, Scheme};
use hyper::{Request, Response, StatusCode, Uri, Version};
use std::net::SocketAddr;

use bytes::Buf;

use crate::telemetry::Exchange;

/// Streams an HTTP/2 client may have open at once on a connection we serve: Envoy's
/// default (`max_concurrent_streams`, 2^31 - 1), not hyper's 200. Past a limit a client
/// queues its requests, and behind long-lived ones (a gRPC stream, a long poll) they
/// would wait for good. What bounds a caller is its side's circuit breaker
/// (`max_requests`), as in Envoy.
pub const MAX_CONCURRENT_STREAMS: u32 = (1 << 31) - 1;

/// HTTP/2 flow-control windows of our connections, as the receiving side: how much a peer
/// may send on one stream, and on the connection, before we have passed it on. hyper's
/// (1 MiB a stream and a connection as a server, 2 and 5 MiB as a client) cap a connection
/// at window / RTT, which between clusters is a WAN's: at 50 ms, uploads through the pair
/// ran at 13.6 MB/s against 37 MB/s direct, downloads at 23–26 against 40
/// (`scripts/bench-wan.sh`); with these, 44–58 and 39–58. Envoy's are 256 MiB; these bound
/// what a stalled application leaves buffered at 16 MiB a connection.
pub const STREAM_WINDOW: u32 = 8 << 20;
/// See [`STREAM_WINDOW`].
pub const CONNECTION_WINDOW: u32 = 16 << 20;

/// The largest header block an HTTP/2 connection of ours takes, either way: Envoy's
/// default (`max_request_headers_kb`, 60 KiB), not hyper's 16 KiB, which turned a fat
/// cookie or a couple of JWTs into `431` at the hop between sidecars.
pub const MAX_HEADER_LIST_SIZE: u32 = 60 * 1024;

/// How every HTTP/1.1 connection a sidecar serves is set up (an application's, outbound;
/// a peer sidecar's under `--h2-upgrade off`, inbound): the request line and headers are
/// bounded by [`MAX_HEADER_LIST_SIZE`] as on HTTP/2, where hyper's default buffer (~400
/// KiB) took a header block Envoy answers with `431`, and then failed it at the HTTP/2 hop.
pub fn h1_server() -> hyper::server::conn::http1::Builder {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.max_buf_size(MAX_HEADER_LIST_SIZE as usize);
    builder
}

/// How every HTTP/2 connection a sidecar serves is set up (a peer sidecar's, inbound; an
/// h2c application's, outbound): with hyper's timer, and Envoy's limits above, not hyper's.
pub fn h2_server() -> hyper::server::conn::http2::Builder<hyper_util::rt::TokioExecutor> {
    let mut builder = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_header_list_size(MAX_HEADER_LIST_SIZE)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW);
    builder
}

/// The body of every answer a sidecar gives its client: the upstream's, or our own.
pub type ReplyBody = Either<Leased<Incoming>, Full<Bytes>>;

/// Envoy's text for a request that never got response headers because the connection to
/// the upstream could not be made; users grep their logs for it.
pub const CONNECT_FAILURE: &str =
    "upstream connect error or disconnect/reset before headers. reset reason: connection failure";

/// Envoy's text for an upstream that went away after the request was sent.
pub const CONNECTION_TERMINATION: &str =
    "upstream connect error or disconnect/reset before headers. reset reason: connection termination";

/// `503 Service Unavailable` with Envoy's body.
pub fn unavailable(text: &'static str) -> Response<ReplyBody> {
    let mut resp = Response::new(Either::Right(Full::new(Bytes::from_static(text.as_bytes()))));
    *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    resp
}

/// The 503 for a request a plaintext server failed: Envoy's text for a connect failure or
/// for a connection that went away after the request was sent.
pub fn unavailable_after(e: &crate::pool::PlainError) -> Response<ReplyBody> {
    unavailable(if e.is_connect() {
        CONNECT_FAILURE
    } else {
        CONNECTION_TERMINATION
    })
}

/// Envoy's response flag for a failed plaintext request: `UF` (connection failure) or `UC`
/// (connection termination).
pub fn failure_flags(e: &crate::pool::PlainError) -> &'static str {
    if e.is_connect() { "UF" } else { "UC" }
}

/// One of our own answers (`body` is what it carries), recorded in the request metrics at
/// once: it is complete as it leaves.
pub fn recorded(mut exchange: Exchange, resp: Response<ReplyBody>) -> Response<ReplyBody> {
    exchange.add(resp.body().size_hint().exact().unwrap_or_default() as usize);
    resp
}

/// `400 Bad Request` for a request we cannot carry.
pub fn bad_request(text: &'static str) -> Response<ReplyBody> {
    let mut resp = Response::new(Either::Right(Full::new(Bytes::from_static(text.as_bytes()))));
    *resp.status_mut() = StatusCode::BAD_REQUEST;
    resp
}

/// Headers about one connection (RFC 9110 §7.6.1), which HTTP/2 forbids outright.
const HOP_BY_HOP: [HeaderName; 5] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes the hop-by-hop headers: those named in `Connection`, the fixed set, and `te`
/// unless it is exactly `trailers` (the one value HTTP/2 allows, which gRPC needs).
///
/// A WebSocket upgrade (see [`is_websocket`]) keeps `Upgrade` and `Connection: upgrade`:
/// they are its next hop's to answer, as Envoy's `upgrade_configs` (which Istio sets on
/// every HTTP listener) carry them.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most requests carry none of them (HTTP/2 forbids them): one pass over the few names
    // present is cheaper than a hash lookup per hop-by-hop name.
    if !headers.keys().any(|k| HOP_BY_HOP.contains(k) || k == header::TE) {
        return;
    }
    // `is_websocket` has seen the `Upgrade` header.
    let websocket = is_websocket(headers).then(|| headers[header::UPGRADE].clone());
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::try_from(name.trim()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    let te_trailers = headers
        .get_all(header::TE)
        .iter()
        .all(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    if !te_trailers {
        headers.remove(header::TE);
    }
    if let Some(upgrade) = websocket {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, upgrade);
    }
}

/// Whether a message asks for (or, in a `101`, agrees to) a switch to WebSocket:
/// `Upgrade: websocket` with `upgrade` among the `Connection` options (RFC 6455 §4.1).
pub fn is_websocket(headers: &HeaderMap) -> bool {
    let upgrade = headers
        .get(header::UPGRADE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
    upgrade
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|o| o.trim().eq_ignore_ascii_case("upgrade"))
}

/// The downstream half of a WebSocket upgrade: taken from the request before it is sent
/// on, it completes once our `101` has gone out (the server connection must be served
/// `with_upgrades`).
pub fn take_websocket<B>(req: &mut Request<B>) -> Option<hyper::upgrade::OnUpgrade> {
    (req.version() == Version::HTTP_11 && is_websocket(req.headers())).then(|| hyper::upgrade::on(req))
}

/// Joins the two halves of an upgrade the upstream agreed to (`resp` is its `101`, whose
/// connection was run `with_upgrades`): once both are switched, bytes flow both ways as on
/// a TCP hop until either side closes. Any other answer ends the downstream half unused.
/// The tunnel counts as open work for `drain`: the HTTP connection it came from is over
/// once switched, and without this a SIGTERM cut every WebSocket at once instead of
/// letting it run until it ends or the drain times out.
pub fn join_websocket<B>(downstream: hyper::upgrade::OnUpgrade, resp: &mut Response<B>, drain: &crate::drain::Watch) {
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        return;
    }
    let upstream = hyper::upgrade::on(resp);
    let tracked = drain.track();
    tokio::spawn(async move {
        let _tracked = tracked;
        let (down, up) = match tokio::join!(downstream, upstream) {
            (Ok(down), Ok(up)) => (down, up),
            (down, up) => {
                tracing::debug!(downstream = ?down.err(), upstream = ?up.err(), "websocket upgrade not completed");
                return;
            }
        };
        let (mut down, mut up) = (hyper_util::rt::TokioIo::new(down), hyper_util::rt::TokioIo::new(up));
        if let Err(e) = tokio::io::copy_bidirectional(&mut down, &mut up).await {
            tracing::debug!(error = %e, "websocket ended");
        }
    });
}

/// Istio's `request_protocol`: `grpc` for gRPC's content types, else `http`.
pub fn request_protocol(headers: &HeaderMap) -> &'static str {
    match headers.get(header::CONTENT_TYPE) {
        Some(v) if v.as_bytes().starts_with(b"application/grpc") => "grpc",
        _ => "http",
    }
}

/// A body that holds `guard` until it ends or is dropped: what keeps a pooled connection
/// counted as busy while its response is still streaming.
pub struct Leased<B> {
    inner: B,
    guard: Option<Box<dyn Send + Sync>>,
    /// The response's measure for the request metrics, recorded when the body ends.
    exchange: Option<Exchange>,
}

impl<B> Leased<B> {
    /// `inner`, releasing `guard` once the last frame is read or the body is dropped.
    pub fn new(inner: B, guard: impl Send + Sync + 'static) -> Self {
        Self {
            inner,
            guard: Some(Box::new(guard)),
            exchange: None,
        }
    }

    /// Counts the body's bytes into `exchange`, which is recorded once the body ends.
    pub fn measured(mut self, exchange: Exchange) -> Self {
        self.exchange = Some(exchange);
        self
    }
}

impl<B: Body + Unpin> Body for Leased<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(e), Some(data)) = (self.exchange.as_mut(), frame.data_ref()) {
                    e.add(data.remaining());
                }
                // The last frame: the connection is free now, before this frame is written
                // on, so the caller's next request finds it back in its pool (a sized body
                // is not always polled for its end).
                if self.inner.is_end_stream() {
                    self.guard = None;
                }
            }
            Poll::Ready(None | Some(Err(_))) => {
                self.guard = None;
                self.exchange = None;
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Gives a request without `host` its URI's authority as one (an HTTP/2 client's
/// `:authority`, or a request in the pooled form), for whatever puts the URI in origin form.
pub fn host_from_uri(parts: &mut hyper::http::request::Parts) {
    if !parts.headers.contains_key(header::HOST)
        && let Some(authority) = parts.uri.authority()
        && let Ok(host) = HeaderValue::from_str(authority.as_str())
    {
        parts.headers.insert(header::HOST, host);
    }
}

/// A request as HTTP/1.1 in origin form, keeping its `host` (the caller's `:authority`),
/// without the hop-by-hop headers of the hop it came on.
pub fn to_http1<B>(req: Request<B>) -> Request<B> {
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    to_origin_form(Request::from_parts(parts, body))
}

/// The first bytes of every HTTP/2 connection (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Reads a connection's first bytes until they are, or cannot be, HTTP/2's preface, and
/// gives the connection back with them put in front, and whether it speaks HTTP/2 (h2c
/// with prior knowledge, as gRPC clients do) — Envoy's codec `AUTO`. `None` when it
/// failed, or when draining started before it said enough.
pub async fn sniff_http2<S: tokio::io::AsyncRead + Unpin>(
    mut io: S,
    drain: &crate::drain::Watch,
) -> Option<(crate::rewind::Rewind<S>, bool)> {
    let first = tokio::select! {
        first = read_preface(&mut io) => first.ok()?,
        () = drain.signaled() => return None,
    };
    let h2 = first.as_ref() == H2_PREFACE;
    Some((crate::rewind::Rewind::new(first, io), h2))
}

async fn read_preface(io: &mut (impl tokio::io::AsyncRead + Unpin)) -> std::io::Result<bytes::Bytes> {
    let mut first = Vec::with_capacity(H2_PREFACE.len());
    let mut chunk = [0u8; H2_PREFACE.len()];
    while first.len() < H2_PREFACE.len() && H2_PREFACE.starts_with(&first) {
        let n = tokio::io::AsyncReadExt::read(io, &mut chunk[..H2_PREFACE.len() - first.len()]).await?;
        if n == 0 {
            break;
        }
        first.extend_from_slice(&chunk[..n]);
    }
    Ok(bytes::Bytes::from(first))
}

/// Whether a request can only be served over HTTP/2: gRPC is defined over HTTP/2 alone
/// (its status comes in trailers), so a gRPC server takes no HTTP/1.1; gRPC-Web is made
/// for HTTP/1.1 and is not this.
pub fn needs_http2(headers: &HeaderMap) -> bool {
    headers.get(header::CONTENT_TYPE).is_some_and(|v| {
        let v = v.as_bytes();
        v.starts_with(b"application/grpc") && !v.starts_with(b"application/grpc-web")
    })
}

/// A request as HTTP/2 to `addr`, its `:authority` the caller's: its URI's, else its
/// `host` (RFC 9113 §8.3.1 forbids a `host` to differ from `:authority`, so it goes), else
/// the address; `te: trailers` is kept, as gRPC needs it.
pub fn to_http2<B>(req: Request<B>, addr: SocketAddr) -> Request<B> {
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let host = parts.headers.remove(header::HOST);
    let authority = parts
        .uri
        .authority()
        .cloned()
        .or_else(|| host.and_then(|h| Authority::try_from(h.as_bytes()).ok()))
        .unwrap_or_else(|| Authority::try_from(addr.to_string()).expect("an address is an authority"));
    parts.uri = absolute(&parts.uri, authority);
    parts.version = Version::HTTP_2;
    Request::from_parts(parts, body)
}

/// A request in the pooled form (its authority in the URI, see [`absolute`]) as HTTP/1.1
/// puts it on the wire between sidecars: the authority as `host`, the URI in origin form.
pub fn to_origin_form<B>(req: Request<B>) -> Request<B> {
    let (mut parts, body) = req.into_parts();
    host_from_uri(&mut parts);
    parts.uri = Uri::from(
        parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/")),
    );
    parts.version = Version::HTTP_11;
    Request::from_parts(parts, body)
}

/// The pooled form again of a request [`to_origin_form`] made (or one already in it): the
/// `host` as the URI's authority, and no `host` header.
pub fn to_absolute_form<B>(req: Request<B>) -> Request<B> {
    if req.uri().authority().is_some() {
        return req;
    }
    let (mut parts, body) = req.into_parts();
    if let Some(authority) = parts
        .headers
        .get(header::HOST)
        .and_then(|h| Authority::try_from(h.as_bytes()).ok())
    {
        parts.uri = absolute(&parts.uri, authority);
        parts.headers.remove(header::HOST);
    }
    Request::from_parts(parts, body)
}

/// `uri`'s path and query (`/` when it has none) under `http://authority`: the form a
/// pooled client sends by.
pub fn absolute(uri: &Uri, authority: Authority) -> Uri {
    let path = uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    Uri::builder()
        .scheme(Scheme::HTTP)
        .authority(authority)
        .path_and_query(path)
        .build()
        .expect("scheme, authority and path make a URI")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_origin_form_and_back_give_the_pooled_request_again() {
        let pooled = Request::builder().uri("http://reviews:9080/r/1?x=y").body(()).unwrap();
        let wire = to_origin_form(pooled);
        assert_eq!(wire.uri().to_string(), "/r/1?x=y");
        assert_eq!(wire.headers()[header::HOST], "reviews:9080");
        assert_eq!(wire.version(), Version::HTTP_11);
        let back = to_absolute_form(wire);
        assert_eq!(back.uri().to_string(), "http://reviews:9080/r/1?x=y");
        assert!(back.headers().get(header::HOST).is_none());
        // Already pooled: as it is.
        assert_eq!(to_absolute_form(back).uri().to_string(), "http://reviews:9080/r/1?x=y");
    }

    #[test]
    fn hop_by_hop_headers_go_and_te_trailers_stays() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-private"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert("x-kept", HeaderValue::from_static("yes"));
        strip_hop_by_hop(&mut h);
        let left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        assert_eq!(left, ["te", "x-kept"]);

        let mut h = HeaderMap::new();
        h.insert(header::TE, HeaderValue::from_static("gzip"));
        strip_hop_by_hop(&mut h);
        assert!(h.is_empty());
    }

    #[test]
    fn an_http2_request_reaches_the_application_as_http11_with_its_host() {
        let req = Request::builder()
            .version(Version::HTTP_2)
            .uri("http://reviews:9080/a?b=c")
            .body(())
            .unwrap();
        let h1 = to_http1(req);
        assert_eq!(h1.version(), Version::HTTP_11);
        assert_eq!(h1.uri().to_string(), "/a?b=c");
        assert_eq!(h1.headers()[header::HOST], "reviews:9080");
    }

    #[test]
    fn grpc_is_told_apart_by_content_type() {
        let mut h = HeaderMap::new();
        assert_eq!(request_protocol(&h), "http");
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc+proto"));
        assert_eq!(request_protocol(&h), "grpc");
    }

    #[test]
    fn grpc_needs_http2_and_grpc_web_does_not() {
        let with = |ct: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
            needs_http2(&h)
        };
        assert!(with("application/grpc"));
        assert!(with("application/grpc+proto"));
        assert!(!with("application/grpc-web+proto"));
        assert!(!with("application/json"));
        assert!(!needs_http2(&HeaderMap::new()));
    }
}
