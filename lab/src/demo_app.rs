//! The lab's demo workload (bookinfo's `reviews`): an HTTP/1.1 server answering every
//! request with `{"cluster": …, "version": …, "caller": …}`, the caller being the SPIFFE ID
//! its sidecar put in `x-forwarded-client-cert` (`null` without one), so a client sees
//! where a request landed and as whom it arrived.

use std::convert::Infallible;
use std::net::SocketAddr;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::xfcc;

/// Who this instance is.
#[derive(Debug, Clone)]
pub struct Identity {
    pub cluster: String,
    pub version: String,
}

/// The answer to one request.
pub fn answer(me: &Identity, xfcc_header: Option<&str>) -> serde_json::Value {
    serde_json::json!({
        "cluster": me.cluster,
        "version": me.version,
        "caller": xfcc_header.and_then(xfcc::caller_uri),
    })
}

/// Serves on `listener` until the process ends.
pub async fn serve(listener: TcpListener, me: Identity) -> std::io::Result<()> {
    loop {
        let (stream, _) = listener.accept().await?;
        let me = me.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let header = req
                    .headers()
                    .get("x-forwarded-client-cert")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                let body = answer(&me, header.as_deref()).to_string();
                async move {
                    Ok::<_, Infallible>(
                        Response::builder()
                            .header("content-type", "application/json")
                            .body(Full::new(Bytes::from(body)))
                            .expect("a static response is valid"),
                    )
                }
            });
            // A client that goes away mid-request is its own business.
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Binds `addr` and serves; prints the bound address first (so `--listen …:0` is usable).
pub fn run(addr: SocketAddr, me: Identity) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let listener = TcpListener::bind(addr).await?;
        println!("listening on {}", listener.local_addr()?);
        serve(listener, me).await?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_with_cluster_version_and_caller() {
        let me = Identity {
            cluster: "cluster2".into(),
            version: "v2".into(),
        };
        let a = answer(
            &me,
            Some("By=x;URI=spiffe://cluster.local/ns/default/sa/bookinfo-productpage"),
        );
        assert_eq!(
            a.to_string(),
            r#"{"caller":"spiffe://cluster.local/ns/default/sa/bookinfo-productpage","cluster":"cluster2","version":"v2"}"#
        );
        assert_eq!(answer(&me, None)["caller"], serde_json::Value::Null);
    }
}
