//! A WebSocket application and a caller that upgrades through a sidecar: the frames are the
//! application's business, so both only switch protocols and then move bytes.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// An application that answers an upgrade with `101` (saying whom the sidecar vouched for
/// in `x-seen-xfcc`) and then echoes every byte until the caller closes; anything else
/// gets `400`.
pub async fn app() -> SocketAddr {
    let (addr, _) = super::accept_each(|stream| async move {
        let service = hyper::service::service_fn(|mut req: hyper::Request<hyper::body::Incoming>| async move {
            let empty = http_body_util::Full::new(bytes::Bytes::new());
            if req.headers().get("upgrade").is_none_or(|v| v != "websocket") {
                return Ok::<_, std::convert::Infallible>(hyper::Response::builder().status(400).body(empty).unwrap());
            }
            let xfcc = req.headers().get("x-forwarded-client-cert").cloned();
            let switched = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                let io = hyper_util::rt::TokioIo::new(switched.await.unwrap());
                let (mut from, mut to) = tokio::io::split(io);
                tokio::io::copy(&mut from, &mut to).await.unwrap();
                to.shutdown().await.unwrap();
            });
            let mut answer = hyper::Response::builder()
                .status(101)
                .header("upgrade", "websocket")
                .header("connection", "Upgrade")
                .header("sec-websocket-accept", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
            if let Some(v) = xfcc {
                answer = answer.header("x-seen-xfcc", v);
            }
            Ok(answer.body(empty).unwrap())
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
            .with_upgrades()
            .await;
    })
    .await;
    addr
}

/// Upgrades a connection to `addr` (an outbound sidecar in front of [`app`]) to WebSocket
/// and returns it switched, with the `101`'s head, lowercased.
pub async fn open(addr: SocketAddr) -> (TcpStream, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(
        b"GET /chat HTTP/1.1\r\nhost: reviews:9080\r\nupgrade: websocket\r\nconnection: Upgrade\r\n\
          sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    let read_head = async {
        while !head.ends_with(b"\r\n\r\n") {
            head.push(s.read_u8().await.unwrap());
        }
    };
    tokio::time::timeout(Duration::from_secs(5), read_head)
        .await
        .expect("an answer");
    let head = String::from_utf8(head).unwrap().to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(
        head.contains("upgrade: websocket") && head.contains("connection: upgrade"),
        "{head}"
    );
    (s, head)
}

/// Upgrades a connection to `addr` as [`open`] does, checks that any bytes of any size come
/// back whole and that a half-close is answered by the application's close, and returns
/// the `101`'s head, lowercased.
pub async fn exchange(addr: SocketAddr) -> String {
    let (mut s, head) = open(addr).await;
    let message: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let echo = async {
        for chunk in [&b"\x81\x05hello"[..], &message] {
            s.write_all(chunk).await.unwrap();
            let mut back = vec![0; chunk.len()];
            s.read_exact(&mut back).await.unwrap();
            assert_eq!(back, chunk, "echoed whole");
        }
        s.shutdown().await.unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
    };
    tokio::time::timeout(Duration::from_secs(10), echo)
        .await
        .expect("echoed and closed");
    head
}
