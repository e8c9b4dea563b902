//! The HTTP-aware hop (`--protocol http`) through a real pair of sidecars with real SVIDs:
//! the application's HTTP/1.1 connections ride one pooled, multiplexed HTTP/2 connection in
//! mutual TLS between the sidecars (or, with `--h2-upgrade off`, kept-alive HTTP/1.1
//! connections), the application still learns the caller's identity on every request, and
//! failures upstream are answered at once with Envoy's 503.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use sidecar::run::{RunArgs, Sidecar};
use support::metric_reaches as counted;
use support::{Pki, exchange, poll, websocket};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/productpage";
const SERVER_ID: &str = "spiffe://cluster.local/ns/default/sa/reviews";

impl Pki {
    fn server(&self, listen: &str, app: SocketAddr) -> Result<Sidecar, anyhow::Error> {
        let (c, k) = self.svid("cluster.local", "reviews");
        let line = format!(
            "--inbound {listen}={app} --cert {} --key {} --ca {} --protocol http --mtls STRICT --metrics 127.0.0.1:0",
            p(&c),
            p(&k),
            p(&self.ca())
        );
        Sidecar::start(RunArgs::from_words(line.split_whitespace()).unwrap())
    }

    fn client(&self, upstream: SocketAddr) -> Sidecar {
        self.client_with(upstream, "")
    }

    fn client_with(&self, upstream: SocketAddr, extra: &str) -> Sidecar {
        let (c, k) = self.svid("cluster.local", "productpage");
        let line = format!(
            "--outbound 127.0.0.1:0={upstream} --peer-id {SERVER_ID} --cert {} --key {} --ca {} --protocol http --metrics 127.0.0.1:0 --connect-timeout 2s {extra}",
            p(&c),
            p(&k),
            p(&self.ca())
        );
        Sidecar::start(RunArgs::from_words(line.split_whitespace()).unwrap()).unwrap()
    }
}

fn p(path: &Path) -> String {
    path.display().to_string()
}

/// An HTTP/1.1 application answering each request with the `x-forwarded-client-cert` it
/// received (or `-`). With `gate`, every request is held until that many are in flight at
/// once, which only concurrent requests can reach.
async fn http_app(gate: Option<usize>) -> SocketAddr {
    counting_http_app(gate).await.0
}

/// [`http_app`], and how many connections it has accepted.
async fn counting_http_app(gate: Option<usize>) -> (SocketAddr, Arc<AtomicUsize>) {
    let barrier = gate.map(|n| Arc::new(tokio::sync::Barrier::new(n)));
    support::accept_each(move |stream| {
        let barrier = barrier.clone();
        async move {
            let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let barrier = barrier.clone();
                async move {
                    if let Some(b) = barrier {
                        b.wait().await;
                    }
                    let body = bytes::Bytes::from(support::xfcc_seen(&req));
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(http_body_util::Full::new(body)))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        }
    })
    .await
}

/// An HTTP/1.1 application answering each request with its own body.
async fn echo_app() -> SocketAddr {
    use http_body_util::BodyExt;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                    let body = req.into_body().collect().await?.to_bytes();
                    Ok::<_, hyper::Error>(hyper::Response::new(http_body_util::Full::new(body)))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

/// One GET on a new connection (optionally with a forged XFCC); returns status and body.
async fn get(addr: SocketAddr, forged_xfcc: Option<&str>) -> std::io::Result<(u16, String)> {
    let extra = forged_xfcc
        .map(|v| format!("\r\nx-forwarded-client-cert: {v}"))
        .unwrap_or_default();
    let answer = exchange(addr, &format!("GET / HTTP/1.1\r\nhost: reviews:9080{extra}")).await?;
    Ok((answer.status, answer.body))
}

fn assert_vouched(body: &str) {
    assert!(body.starts_with(&format!("By={SERVER_ID};Hash=")), "{body}");
    assert!(body.ends_with(&format!(";URI={CLIENT_ID}")), "{body}");
    assert!(
        !body.contains("admin") && !body.contains(" | "),
        "a forged header must be replaced: {body}"
    );
}

const OPENED: &str = "istio_tcp_connections_opened_total";
const REQUESTS: &str = "istio_requests_total";
const POOLED: &str = "isthmus_sidecar_pooled_upstream_connections";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_new_client_connections_cost_one_mtls_handshake() {
    let pki = Pki::new("pooled", "fifty");
    let app = http_app(None).await;
    let server = pki.server("127.0.0.1:0", app).unwrap();
    let client = pki.client(server.bound.inbound.unwrap());
    let out = client.bound.outbound.unwrap();
    for n in 0..50 {
        let forged = (n % 2 == 0).then_some("By=spiffe://evil/x;URI=spiffe://cluster.local/ns/default/sa/admin");
        let (status, body) = get(out, forged).await.unwrap();
        assert_eq!(status, 200, "request {n}: {body}");
        assert_vouched(&body);
    }
    let (server_metrics, client_metrics) = (server.bound.metrics.unwrap(), client.bound.metrics.unwrap());
    // One connection, one handshake, reached the server side for all fifty.
    counted(server_metrics, OPENED, &[("reporter", "destination")], 1.0).await;
    // The client side still counts each application connection.
    counted(
        client_metrics,
        OPENED,
        &[("reporter", "source"), ("connection_security_policy", "mutual_tls")],
        50.0,
    )
    .await;
    let request = [
        ("source_principal", CLIENT_ID),
        ("destination_principal", SERVER_ID),
        ("destination_service", "reviews.default.svc.cluster.local"),
        ("connection_security_policy", "mutual_tls"),
        ("request_protocol", "http"),
        ("response_code", "200"),
    ];
    let source: Vec<_> = request
        .iter()
        .copied()
        .chain([
            ("reporter", "source"),
            ("source_cluster", "Kubernetes"),
            ("destination_cluster", "unknown"),
        ])
        .collect();
    counted(client_metrics, REQUESTS, &source, 50.0).await;
    let destination: Vec<_> = request
        .iter()
        .copied()
        .chain([
            ("reporter", "destination"),
            ("source_cluster", "unknown"),
            ("destination_cluster", "Kubernetes"),
        ])
        .collect();
    counted(server_metrics, REQUESTS, &destination, 50.0).await;
}

/// Twenty requests at once through the client side at `out`, each answered and vouched for.
async fn twenty_at_once_are_answered(out: SocketAddr) {
    let calls: Vec<_> = (0..20).map(|_| tokio::spawn(get(out, None))).collect();
    for call in calls {
        let (status, body) = call.await.unwrap().unwrap();
        assert_eq!(status, 200, "{body}");
        assert_vouched(&body);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_concurrent_requests_multiplex_on_one_connection() {
    let pki = Pki::new("pooled", "twenty");
    // The application answers nobody until all twenty are waiting at once.
    let app = http_app(Some(20)).await;
    let server = pki.server("127.0.0.1:0", app).unwrap();
    let client = pki.client(server.bound.inbound.unwrap());
    let out = client.bound.outbound.unwrap();
    twenty_at_once_are_answered(out).await;
    counted(
        server.bound.metrics.unwrap(),
        OPENED,
        &[("reporter", "destination")],
        1.0,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_h2_upgrade_concurrent_requests_ride_a_kept_alive_connection_each() {
    // Istio's default hop for an HTTP/1.1 application: HTTP/1.1 between the sidecars, one
    // exchange per connection at a time, connections kept and reused.
    let pki = Pki::new("pooled", "http11");
    let app = http_app(Some(20)).await;
    let server = pki.server("127.0.0.1:0", app).unwrap();
    let client = pki.client_with(server.bound.inbound.unwrap(), "--h2-upgrade off");
    let out = client.bound.outbound.unwrap();
    let (server_metrics, client_metrics) = (server.bound.metrics.unwrap(), client.bound.metrics.unwrap());
    twenty_at_once_are_answered(out).await;
    counted(server_metrics, OPENED, &[("reporter", "destination")], 20.0).await;
    counted(client_metrics, POOLED, &[], 20.0).await;
    // Twenty more at once find the twenty kept alive: no new connection, no handshake.
    twenty_at_once_are_answered(out).await;
    counted(
        client_metrics,
        REQUESTS,
        &[("reporter", "source"), ("response_code", "200")],
        40.0,
    )
    .await;
    counted(server_metrics, OPENED, &[("reporter", "destination")], 20.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_side_keeps_every_application_connection_a_burst_needed() {
    // A hundred requests at once need a hundred connections to the application (it answers
    // none until all are waiting); the bursts after it find them all kept alive. A pool that
    // kept fewer idle would open new ones for every burst, as a cap of 64 did.
    const BURST: usize = 100;
    let pki = Pki::new("pooled", "burst");
    let (app, accepted) = counting_http_app(Some(BURST)).await;
    let server = pki.server("127.0.0.1:0", app).unwrap();
    let client = pki.client(server.bound.inbound.unwrap());
    let out = client.bound.outbound.unwrap();
    for round in 1..=3 {
        let calls: Vec<_> = (0..BURST).map(|_| tokio::spawn(get(out, None))).collect();
        for call in calls {
            let (status, body) = call.await.unwrap().unwrap();
            assert_eq!(status, 200, "round {round}: {body}");
        }
        // A connection goes back to the pool once its response is read to the end, which
        // may be just after the client has it: wait for all to be idle before the next burst.
        counted(
            server.bound.metrics.unwrap(),
            REQUESTS,
            &[("reporter", "destination"), ("response_code", "200")],
            (round * BURST) as f64,
        )
        .await;
        // A connection returns to the pool a moment after its response has gone (hyper
        // puts it back from a task of its own), so one caught on its way may be replaced;
        // a pool that dropped idle ones would open dozens per burst.
        let opened = accepted.load(Ordering::SeqCst);
        assert!(
            (BURST..BURST + 10).contains(&opened),
            "round {round}: {opened} connections to the application for bursts of {BURST}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_requests_at_once_on_one_http2_connection_all_reach_the_application() {
    // 300 requests held by the application until all are in flight, on the one HTTP/2
    // connection between the sidecars: the server side must not cap the streams at hyper's
    // default of 200 (Envoy's limit is 2^31 - 1), or the last hundred would wait for
    // streams that never end — a long-lived gRPC stream is such a request.
    const AT_ONCE: usize = 300;
    let pki = Pki::new("pooled", "streams");
    let app = http_app(Some(AT_ONCE)).await;
    let server = pki.server("127.0.0.1:0", app).unwrap();
    let client = pki.client(server.bound.inbound.unwrap());
    let out = client.bound.outbound.unwrap();
    let calls: Vec<_> = (0..AT_ONCE).map(|_| tokio::spawn(get(out, None))).collect();
    let all = async {
        for call in calls {
            let (status, body) = call.await.unwrap().unwrap();
            assert_eq!(status, 200, "{body}");
        }
    };
    tokio::time::timeout(Duration::from_secs(10), all)
        .await
        .expect("all 300 answered: none held back by a stream limit");

    // The same from an HTTP/2 application (a gRPC client): 300 streams at once on its one
    // connection to the client side.
    let tcp = TcpStream::connect(out).await.unwrap();
    let (h2, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let calls: Vec<_> = (0..AT_ONCE)
        .map(|_| {
            let mut h2 = h2.clone();
            tokio::spawn(async move {
                let req = hyper::Request::get("http://reviews:9080/")
                    .body(http_body_util::Empty::<bytes::Bytes>::new())
                    .unwrap();
                h2.send_request(req).await.map(|r| r.status())
            })
        })
        .collect();
    let all = async {
        for call in calls {
            assert_eq!(call.await.unwrap().unwrap(), 200);
        }
    };
    tokio::time::timeout(Duration::from_secs(10), all)
        .await
        .expect("all 300 streams of one HTTP/2 application connection answered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_of_tens_of_kilobytes_cross_the_hop_both_ways() {
    // A 40 KiB cookie (a fat session, a JWT or two) and a 40 KiB response header: Envoy
    // takes up to 60 KiB of headers either way; hyper's HTTP/2 stops at 16 KiB.
    const BIG: usize = 40 * 1024;
    let (app, _) = support::accept_each(|stream| async move {
        let service = hyper::service::service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
            let cookie = req.headers().get("cookie").map_or(0, |v| v.len());
            let answer = hyper::Response::builder()
                .header("x-big", "b".repeat(BIG))
                .body(http_body_util::Full::new(bytes::Bytes::from(cookie.to_string())))
                .unwrap();
            Ok::<_, std::convert::Infallible>(answer)
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
            .await;
    })
    .await;
    let pki = Pki::new("pooled", "big-headers");
    let server = pki.server("127.0.0.1:0", app).unwrap();
    for extra in ["", "--h2-upgrade off"] {
        let client = pki.client_with(server.bound.inbound.unwrap(), extra);
        let out = client.bound.outbound.unwrap();
        let head = format!("GET / HTTP/1.1\r\nhost: reviews:9080\r\ncookie: {}", "c".repeat(BIG));
        let answer = exchange(out, &head).await.unwrap();
        assert_eq!(answer.status, 200, "{extra}: {}", answer.body);
        assert_eq!(
            answer.body,
            BIG.to_string(),
            "{extra}: the cookie reached the application whole"
        );
        assert!(
            answer.head.contains(&"b".repeat(BIG)),
            "{extra}: the big response header came back"
        );
    }
    // Past the limit the caller is told so, as Envoy tells it, whichever the hop.
    for extra in ["", "--h2-upgrade off"] {
        let client = pki.client_with(server.bound.inbound.unwrap(), extra);
        let head = format!(
            "GET / HTTP/1.1\r\nhost: reviews:9080\r\ncookie: {}",
            "c".repeat(70 * 1024)
        );
        let answer = exchange(client.bound.outbound.unwrap(), &head).await.unwrap();
        assert_eq!(answer.status, 431, "{extra}: {}", answer.body);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_switches_protocols_across_the_hop_and_carries_bytes_both_ways() {
    // Istio sets `upgrade_configs: websocket` on every HTTP listener, so a WebSocket on an
    // HTTP port works through Envoy; it must through us too, on either hop.
    let pki = Pki::new("pooled", "websocket");
    let server = pki.server("127.0.0.1:0", websocket::app().await).unwrap();
    for extra in ["", "--h2-upgrade off"] {
        let client = pki.client_with(server.bound.inbound.unwrap(), extra);
        let head = websocket::exchange(client.bound.outbound.unwrap()).await;
        assert!(
            head.contains(&format!("uri={}", CLIENT_ID.to_ascii_lowercase())),
            "{extra}: vouched for: {head}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_open_when_the_sidecar_drains_goes_on_until_it_closes() {
    // Its HTTP connection is over once switched; the drain must still wait for the tunnel
    // (up to --drain-timeout), as it does for any open connection, not cut it.
    let pki = Pki::new("pooled", "websocket-drain");
    let server = pki.server("127.0.0.1:0", websocket::app().await).unwrap();
    let client = pki.client(server.bound.inbound.unwrap());
    let out = client.bound.outbound.unwrap();
    let (mut s, _) = websocket::open(out).await;
    let drained = tokio::spawn(client.drain());
    // Draining has begun once the listener takes no one new.
    poll(Duration::from_secs(5), || async {
        match TcpStream::connect(out).await {
            Err(_) => Ok(()),
            Ok(_) => Err("still accepting".to_string()),
        }
    })
    .await;
    let echo = async {
        s.write_all(b"\x81\x05hello").await.unwrap();
        let mut back = [0; 7];
        s.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"\x81\x05hello", "the tunnel still carries bytes while draining");
    };
    tokio::time::timeout(Duration::from_secs(5), echo)
        .await
        .expect("echoed");
    assert!(!drained.is_finished(), "the drain waits for the open WebSocket");
    s.shutdown().await.unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).await.unwrap();
    let left = tokio::time::timeout(Duration::from_secs(4), drained)
        .await
        .expect("the drain ends with the tunnel, before its timeout")
        .unwrap();
    assert_eq!(left, 0, "nothing left open");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_yield_before_sleep_on_concurrent_requests_are_carried() {
    // The client side's worker yields its CPU before every sleep: twenty requests that the
    // application holds until all are in flight still all arrive and are answered.
    let pki = Pki::new("pooled", "yield");
    let app = http_app(Some(20)).await;
    let server = pki.server("127.0.0.1:0", app).unwrap();
    let client = pki.client_with(server.bound.inbound.unwrap(), "--yield-before-sleep on");
    let out = client.bound.outbound.unwrap();
    twenty_at_once_are_answered(out).await;
    assert!(RunArgs::from_words("--yield-before-sleep maybe".split_whitespace()).is_err());
}

/// A TCP relay whose connections can be cut at once, as a crash or a partition would.
struct Relay {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    links: Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Relay {
    async fn to(target: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let links: Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let (a, l) = (accepted.clone(), links.clone());
        tokio::spawn(async move {
            loop {
                let (mut down, _) = listener.accept().await.unwrap();
                a.fetch_add(1, Ordering::SeqCst);
                l.lock().unwrap().push(tokio::spawn(async move {
                    if let Ok(mut up) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                    }
                }));
            }
        });
        Relay { addr, accepted, links }
    }

    /// Drops every relayed connection: both sockets close under the peers' feet.
    fn cut(&self) {
        for link in self.links.lock().unwrap().drain(..) {
            link.abort();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_upstream_connection_is_replaced_without_client_errors() {
    let pki = Pki::new("pooled", "cut");
    let app = http_app(None).await;
    let server = pki.server("127.0.0.1:0", app).unwrap();
    let relay = Relay::to(server.bound.inbound.unwrap()).await;
    let client = pki.client(relay.addr);
    let out = client.bound.outbound.unwrap();
    for _ in 0..5 {
        assert_eq!(get(out, None).await.unwrap().0, 200);
    }
    assert_eq!(relay.accepted.load(Ordering::SeqCst), 1);
    let m = client.bound.metrics.unwrap();
    counted(m, POOLED, &[], 1.0).await;
    relay.cut();
    // The pool drops the broken connection as soon as it reads the close. (A request sent
    // in the instant before that goes out on the dead connection and gets a 503: it was
    // written, so it is not resent — see `H2Pool::send`.)
    counted(m, POOLED, &[], 0.0).await;
    // No request was in flight when the connection broke: none may fail.
    for n in 0..5 {
        let (status, body) = get(out, None).await.unwrap();
        assert_eq!(status, 200, "request {n} after the cut: {body}");
        assert_vouched(&body);
    }
    assert_eq!(
        relay.accepted.load(Ordering::SeqCst),
        2,
        "one new connection after the cut"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_upstream_sidecar_is_reached_on_a_new_connection() {
    let pki = Pki::new("pooled", "restart");
    let app = http_app(None).await;
    let first = pki.server("127.0.0.1:0", app).unwrap();
    let inbound = first.bound.inbound.unwrap();
    let client = pki.client(inbound);
    let out = client.bound.outbound.unwrap();
    for _ in 0..5 {
        assert_eq!(get(out, None).await.unwrap().0, 200);
    }
    // A graceful restart: the old server says GOAWAY to the pooled connection and goes.
    assert_eq!(first.drain().await, 0, "the pooled connection must close on GOAWAY");
    let second = poll(Duration::from_secs(5), || async {
        pki.server(&inbound.to_string(), app)
            .map_err(|e| format!("cannot listen on {inbound} again: {e:#}"))
    })
    .await;
    for n in 0..5 {
        let (status, body) = get(out, None).await.unwrap();
        assert_eq!(status, 200, "request {n} after the restart: {body}");
        assert_vouched(&body);
    }
    counted(
        second.bound.metrics.unwrap(),
        OPENED,
        &[("reporter", "destination")],
        1.0,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_pooled_connection_is_closed_and_made_again_when_needed() {
    let pki = Pki::new("pooled", "idle");
    let app = http_app(None).await;
    let server = pki.server("127.0.0.1:0", app).unwrap();
    let client = pki.client_with(server.bound.inbound.unwrap(), "--idle-timeout 300ms");
    let out = client.bound.outbound.unwrap();
    assert_eq!(get(out, None).await.unwrap().0, 200);
    let m = server.bound.metrics.unwrap();
    counted(
        m,
        "istio_tcp_connections_closed_total",
        &[("reporter", "destination")],
        1.0,
    )
    .await;
    assert_eq!(get(out, None).await.unwrap().0, 200);
    counted(m, OPENED, &[("reporter", "destination")], 2.0).await;
}

/// In TLS 1.3 the client's handshake is over before the server has checked our SVID: a
/// server side that does not trust it says so only in its first record, after our
/// HTTP/2 preface. That is a failed connect, answered 503 and counted by reason, not a
/// request lost on a connection that was never usable (nor a wait for the handshake
/// deadline).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_side_that_refuses_our_svid_after_the_handshake_is_a_counted_connect_failure() {
    let pki = Pki::new("pooled", "refuses");
    let stranger = Pki::new("pooled", "refuses-other-root");
    let app = http_app(None).await;
    let (c, k) = pki.svid("cluster.local", "reviews");
    // Its certificate is of our root, but it trusts only another one.
    let line = format!(
        "--inbound 127.0.0.1:0={app} --cert {} --key {} --ca {} --protocol http --mtls STRICT",
        p(&c),
        p(&k),
        p(&stranger.ca())
    );
    let server = Sidecar::start(RunArgs::from_words(line.split_whitespace()).unwrap()).unwrap();
    let client = pki.client(server.bound.inbound.unwrap());
    let out = client.bound.outbound.unwrap();
    for _ in 0..3 {
        let (status, body) = get(out, None).await.unwrap();
        assert_eq!(status, 503, "{body}");
    }
    let m = client.bound.metrics.unwrap();
    counted(
        m,
        "isthmus_sidecar_upstream_failures_total",
        &[("side", "outbound"), ("reason", "tls_handshake")],
        3.0,
    )
    .await;
    let text = support::scrape(m).await;
    assert!(!text.contains("handshake_timeout"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_upstream_is_answered_503_at_once_and_counted() {
    let pki = Pki::new("pooled", "dead");
    // A port that was just free: nothing listens there.
    let dead = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let client = pki.client(dead);
    let out = client.bound.outbound.unwrap();
    for _ in 0..3 {
        let started = Instant::now();
        let (status, body) = get(out, None).await.unwrap();
        assert_eq!(status, 503);
        assert_eq!(
            body,
            "upstream connect error or disconnect/reset before headers. reset reason: connection failure"
        );
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "took {:?}",
            started.elapsed()
        );
    }
    let m = client.bound.metrics.unwrap();
    counted(
        m,
        "isthmus_sidecar_upstream_failures_total",
        &[("side", "outbound"), ("reason", "connect_failure")],
        3.0,
    )
    .await;
    counted(m, REQUESTS, &[("reporter", "source"), ("response_code", "503")], 3.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_and_response_bodies_cross_both_ways_whole() {
    let pki = Pki::new("pooled", "bodies");
    let app = echo_app().await;
    let server = pki.server("127.0.0.1:0", app).unwrap();
    let client = pki.client(server.bound.inbound.unwrap());
    let out = client.bound.outbound.unwrap();
    // Bigger than HTTP/2's initial 64 KiB window, so flow control has to work.
    let body: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    for chunked in [false, true] {
        let mut s = TcpStream::connect(out).await.unwrap();
        let framing = if chunked {
            "transfer-encoding: chunked".to_owned()
        } else {
            format!("content-length: {}", body.len())
        };
        s.write_all(
            format!("POST /echo HTTP/1.1\r\nhost: reviews\r\n{framing}\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        if chunked {
            for part in body.chunks(70_000) {
                s.write_all(format!("{:x}\r\n", part.len()).as_bytes()).await.unwrap();
                s.write_all(part).await.unwrap();
                s.write_all(b"\r\n").await.unwrap();
            }
            s.write_all(b"0\r\n\r\n").await.unwrap();
        } else {
            s.write_all(&body).await.unwrap();
        }
        let mut out_bytes = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out_bytes))
            .await
            .unwrap()
            .unwrap();
        let split = out_bytes.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        let head = String::from_utf8_lossy(&out_bytes[..split]).to_lowercase();
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert!(head.contains(&format!("content-length: {}", body.len())), "{head}");
        assert!(
            out_bytes[split + 4..] == body[..],
            "chunked={chunked}: the body came back changed"
        );
    }
}

/// A peer that speaks HTTP/1.1 inside mTLS (`istio-http/1.1`, as Envoy may be configured)
/// is still served, with the same identity header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http11_peer_is_still_served_with_its_identity() {
    let pki = Pki::new("pooled", "h11");
    let app = http_app(None).await;
    let server = pki.server("127.0.0.1:0", app).unwrap();
    let (c, k) = pki.svid("cluster.local", "productpage");
    let svid = sidecar::tls::Svid::from_files(&c, &k).unwrap();
    let bundles = sidecar::tls::TrustBundles::new();
    let roots = std::fs::read(pki.ca()).unwrap();
    bundles.set(
        "cluster.local",
        sidecar::tls::bundle::Bundle::from_pem("cluster.local", &roots).unwrap(),
    );
    let config = sidecar::tls::client_config(
        sidecar::tls::SvidSlot::new(svid),
        bundles,
        sidecar::tls::ExpectedPeer::Any,
        sidecar::tls::Alpn::Http11,
    );
    let tcp = TcpStream::connect(server.bound.inbound.unwrap()).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("outbound_.9080_._.reviews.default.svc.cluster.local").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"istio-http/1.1"[..]));
    tls.write_all(
        b"GET / HTTP/1.1\r\nhost: reviews\r\nx-forwarded-client-cert: URI=spiffe://x/admin\r\nconnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(10), tls.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_vouched(body);
}

/// A gRPC server takes only HTTP/2 (cleartext, prior knowledge) and answers its status in
/// trailers. Answers each call with the `:authority` it saw and the length of the
/// request's body, and `grpc-status: 0` in the trailers.
async fn grpc_app() -> SocketAddr {
    use http_body_util::BodyExt;
    support::accept_each(|stream| async move {
        let service = hyper::service::service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
            let authority = req.uri().authority().map(|a| a.to_string()).unwrap_or_default();
            let len = req.into_body().collect().await?.to_bytes().len();
            let mut trailers = hyper::HeaderMap::new();
            trailers.insert("grpc-status", hyper::header::HeaderValue::from_static("0"));
            let frames = vec![
                Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(bytes::Bytes::from(format!(
                    "{authority} {len}"
                )))),
                Ok(hyper::body::Frame::trailers(trailers)),
            ];
            let body = http_body_util::StreamBody::new(tokio_stream::iter(frames));
            let resp = hyper::Response::builder()
                .header("content-type", "application/grpc")
                .body(body)
                .unwrap();
            Ok::<_, hyper::Error>(resp)
        });
        let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
            .await;
    })
    .await
    .0
}

/// A gRPC client's connection (h2c, prior knowledge) to `addr`.
async fn grpc_client(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<http_body_util::Full<bytes::Bytes>> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (h2, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    h2
}

/// One unary call with `message` (one gRPC frame); asserts a 200 with `grpc-status: 0` in
/// the trailers and returns the answer's body.
async fn grpc_call(
    h2: &mut hyper::client::conn::http2::SendRequest<http_body_util::Full<bytes::Bytes>>,
    message: &[u8],
) -> String {
    use http_body_util::BodyExt;
    let mut frame = vec![0, 0, 0, 0, u8::try_from(message.len()).unwrap()];
    frame.extend_from_slice(message);
    let req = hyper::Request::builder()
        .method("POST")
        .uri("http://reviews:9080/reviews.Reviews/Get")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(http_body_util::Full::new(bytes::Bytes::from(frame)))
        .unwrap();
    let resp = h2.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let collected = resp.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().expect("the call's trailers");
    assert_eq!(trailers.get("grpc-status").map(|v| v.as_bytes()), Some(&b"0"[..]));
    String::from_utf8(collected.to_bytes().to_vec()).unwrap()
}

/// A gRPC client calls a gRPC server through the pair: the server side sends the call to
/// the application over HTTP/2 (an HTTP/1.1 connection, what every other request rides,
/// is refused by a gRPC server), and the status in the trailers comes back to the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_call_reaches_an_http2_only_application_and_its_trailers_come_back() {
    let pki = Pki::new("pooled", "grpc");
    let app = grpc_app().await;
    let server = pki.server("127.0.0.1:0", app).unwrap();
    let client = pki.client(server.bound.inbound.unwrap());
    let mut h2 = grpc_client(client.bound.outbound.unwrap()).await;
    for _ in 0..3 {
        let body = grpc_call(&mut h2, b"hello").await;
        assert_eq!(
            body, "reviews:9080 10",
            "to the application over HTTP/2, whole, with the caller's authority"
        );
    }
}

/// A gRPC client outside the mesh calls a PERMISSIVE server side in plaintext: with no
/// ALPN to say which HTTP it speaks, the server side knows HTTP/2 by its preface (as
/// Envoy's codec `AUTO` does) and the call reaches the application.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plaintext_grpc_client_is_known_by_its_preface_under_permissive() {
    let pki = Pki::new("pooled", "grpc-plain");
    let app = grpc_app().await;
    let (c, k) = pki.svid("cluster.local", "reviews");
    let line = format!(
        "--inbound 127.0.0.1:0={app} --cert {} --key {} --ca {} --protocol http --mtls PERMISSIVE",
        p(&c),
        p(&k),
        p(&pki.ca())
    );
    let server = Sidecar::start(RunArgs::from_words(line.split_whitespace()).unwrap()).unwrap();
    let mut h2 = grpc_client(server.bound.inbound.unwrap()).await;
    assert_eq!(grpc_call(&mut h2, b"hi").await, "reviews:9080 7");
}
