//! Our SPIFFE bundle endpoint: the trust domain's roots as a SPIFFE bundle document, over
//! HTTPS with the controller's own SVID — the `https_spiffe` profile, so a peer trust
//! domain authenticates us with the bundle it already has of ours.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::{BundleSet, jwks};

/// Serves the bundle of `bundles.own` until the listener fails.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    bundles: watch::Receiver<Arc<BundleSet>>,
    refresh_hint_secs: u64,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let acceptor = acceptor.clone();
        let bundles = bundles.clone();
        tokio::spawn(async move {
            let Ok(Ok(tls)) = tokio::time::timeout(std::time::Duration::from_secs(10), acceptor.accept(stream)).await
            else {
                return;
            };
            let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let set = bundles.borrow().clone();
                async move {
                    let reply = if req.method() != Method::GET {
                        Response::builder()
                            .status(StatusCode::METHOD_NOT_ALLOWED)
                            .body(Full::new(Bytes::new()))
                    } else {
                        match set
                            .bundles
                            .get(&set.own)
                            .map(|pem| jwks::encode(pem, set.sequence, refresh_hint_secs))
                        {
                            Some(Ok(doc)) => Response::builder()
                                .header("content-type", "application/json")
                                .body(Full::new(Bytes::from(doc))),
                            _ => Response::builder()
                                .status(StatusCode::SERVICE_UNAVAILABLE)
                                .body(Full::new(Bytes::from_static(b"no bundle yet\n"))),
                        }
                    };
                    Ok::<_, Infallible>(reply.expect("static response parts"))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), service)
                .await;
        });
    }
}
