//! What the sidecar's end-to-end tests share: a test CA that writes SVIDs to files, a
//! poller that waits for a condition with a deadline, and a mock control plane
//! ([`control_plane`]).

#![allow(dead_code)] // each test file uses its own part

pub mod control_plane;
pub mod websocket;

use std::path::PathBuf;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, SanType};

/// A root CA in a scratch directory, removed on drop.
pub struct Pki {
    pub dir: PathBuf,
    issuer: Issuer<'static, KeyPair>,
}

impl Pki {
    /// A new root named `name`, in a directory named after `suite` and `name`.
    pub fn new(suite: &str, name: &str) -> Pki {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let dir = std::env::temp_dir().join(format!("isthmus-{suite}-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::OrganizationName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate().unwrap();
        std::fs::write(dir.join("root-cert.pem"), params.self_signed(&key).unwrap().pem()).unwrap();
        Pki {
            dir,
            issuer: Issuer::new(params, key),
        }
    }

    /// The root, PEM.
    pub fn ca(&self) -> PathBuf {
        self.dir.join("root-cert.pem")
    }

    /// Writes an SVID for `spiffe://td/ns/default/sa/sa` and returns (cert, key) paths.
    pub fn svid(&self, td: &str, sa: &str) -> (PathBuf, PathBuf) {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        let id = format!("spiffe://{td}/ns/default/sa/{sa}");
        params
            .subject_alt_names
            .push(SanType::URI(id.as_str().try_into().unwrap()));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let (c, k) = (self.dir.join(format!("{sa}.pem")), self.dir.join(format!("{sa}.key")));
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Polls `f` until it returns `Ok`, for at most `patience`; a failure shows the last `Err`.
pub async fn poll<T, F, Fut>(patience: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = tokio::time::Instant::now() + patience;
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    loop {
        match f().await {
            Ok(v) => return v,
            Err(e) => assert!(tokio::time::Instant::now() < deadline, "not within {patience:?}: {e}"),
        }
        tick.tick().await;
    }
}

/// An HTTP/1.1 answer as a test reads it.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    /// The header block, as received.
    pub head: String,
    pub body: String,
}

/// Sends one request without a body (`head` without the final blank line, `connection:
/// close` added) on a new connection and reads the whole answer.
pub async fn exchange(addr: std::net::SocketAddr, head: &str) -> std::io::Result<Answer> {
    send(addr, head, "").await
}

/// [`exchange`] with a body after the head.
pub async fn send(addr: std::net::SocketAddr, head: &str, body: &str) -> std::io::Result<Answer> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("{head}\r\nconnection: close\r\n\r\n{body}").as_bytes())
        .await?;
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out)).await??;
    let (head, body) = out
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other(format!("no answer: {out:?}")))?;
    let status = head.split(' ').nth(1).and_then(|c| c.parse().ok());
    Ok(Answer {
        status: status.ok_or_else(|| std::io::Error::other(head.to_owned()))?,
        head: head.to_owned(),
        body: body.to_owned(),
    })
}

/// The Prometheus text a sidecar serves at `addr`.
pub async fn scrape(addr: std::net::SocketAddr) -> String {
    exchange(addr, "GET /stats/prometheus HTTP/1.1\r\nhost: admin")
        .await
        .unwrap()
        .body
}

/// The sum of the samples of `name` (a series name as exposed, e.g. with `_bucket`) whose
/// labels include all of `labels`.
pub fn sum_of(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| l.split(['{', ' ']).next() == Some(name))
        .filter(|l| labels.iter().all(|(k, v)| l.contains(&format!("{k}=\"{v}\""))))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Polls the metrics at `addr` until `name{labels}` sums to `want`.
pub async fn metric_reaches(addr: std::net::SocketAddr, name: &str, labels: &[(&str, &str)], want: f64) {
    poll(Duration::from_secs(10), || async {
        let text = scrape(addr).await;
        let got = sum_of(&text, name, labels);
        match got == want {
            true => Ok(()),
            false => Err(format!("{name}{labels:?} is {got}, want {want}:\n{text}")),
        }
    })
    .await
}

/// Accepts on a fresh port of 127.0.0.1 forever, handing each connection to `serve` on a
/// task of its own; returns the address and the count of connections accepted.
pub async fn accept_each<F, Fut>(serve: F) -> (std::net::SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>)
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = accepted.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(serve(stream));
        }
    });
    (addr, accepted)
}

/// An answer for [`http_app`]: the `x-forwarded-client-cert` values the request carried
/// (joined by ` | `), or `-`, so a test sees what the inbound side vouched for.
pub fn xfcc_seen(req: &hyper::Request<hyper::body::Incoming>) -> String {
    let xfcc = req
        .headers()
        .get_all("x-forwarded-client-cert")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect::<Vec<_>>()
        .join(" | ");
    if xfcc.is_empty() { "-".to_owned() } else { xfcc }
}

/// An HTTP/1.1 application whose body for each request is `answer(request)`; returns its
/// address and the count of requests that reached it.
pub async fn http_app(
    answer: fn(&hyper::Request<hyper::body::Incoming>) -> String,
) -> (std::net::SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let requests = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = requests.clone();
    let (addr, _) = accept_each(move |stream| {
        let counted = counted.clone();
        async move {
            let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let body = bytes::Bytes::from(answer(&req));
                async move { Ok::<_, std::convert::Infallible>(hyper::Response::new(http_body_util::Full::new(body))) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        }
    })
    .await;
    (addr, requests)
}
