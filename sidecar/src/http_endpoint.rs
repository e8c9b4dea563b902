//! The small HTTP/1.1 servers a proxy exposes: health, Prometheus metrics, admin.
//!
//! Each answers GETs from a handler that returns the whole body at once; none of
//! them is on the data path, so simplicity wins over streaming.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// One answer of an endpoint.
#[derive(Debug, Clone)]
pub struct Reply {
    /// HTTP status.
    pub status: StatusCode,
    /// `Content-Type` header.
    pub content_type: &'static str,
    /// The whole body.
    pub body: Bytes,
}

impl Reply {
    /// A 200 with a text body.
    pub fn text(body: impl Into<Bytes>) -> Self {
        Self {
            status: StatusCode::OK,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
        }
    }

    /// A 200 with a JSON body.
    pub fn json(body: impl Into<Bytes>) -> Self {
        Self {
            status: StatusCode::OK,
            content_type: "application/json",
            body: body.into(),
        }
    }

    /// A status with a short text body.
    pub fn status(status: StatusCode, body: &'static str) -> Self {
        Self {
            status,
            content_type: "text/plain; charset=utf-8",
            body: Bytes::from_static(body.as_bytes()),
        }
    }
}

/// Maps a request's method and path to a reply.
pub type Handler = Arc<dyn Fn(&Method, &str) -> Reply + Send + Sync>;

/// Serves `handler` on `listener` until `shutdown` completes.
pub async fn serve(listener: TcpListener, handler: Handler, shutdown: impl Future<Output = ()>) {
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = &mut shutdown => return,
        };
        let Ok((stream, _)) = accepted else { continue };
        let handler = handler.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let reply = handler(req.method(), req.uri().path());
                async move {
                    Ok::<_, Infallible>(
                        Response::builder()
                            .status(reply.status)
                            .header("content-type", reply.content_type)
                            .body(Full::new(reply.body))
                            .expect("static headers are valid"),
                    )
                }
            });
            // A client that goes away mid-request is its own problem, not ours.
            let _ = http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
