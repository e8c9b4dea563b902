//! What an operator sees of traffic through a real sidecar pair: Istio's request metrics
//! with their labels, trace context carried to the application as a child span, and
//! Envoy-format access logs.

mod support;

use std::net::SocketAddr;
use std::path::Path;

use sidecar::run::{RunArgs, Sidecar};
use support::{Pki, exchange, metric_reaches, scrape, send, sum_of};

fn args(line: &str) -> RunArgs {
    RunArgs::from_words(line.split_whitespace()).unwrap()
}

fn p(path: &Path) -> String {
    path.display().to_string()
}

struct Pair {
    _pki: Pki,
    client: Sidecar,
    server: Sidecar,
}

impl Pair {
    /// `productpage` → `reviews` over HTTP, each with metrics and its own extra flags.
    async fn start(name: &str, app: SocketAddr, server_extra: &str, client_extra: &str) -> Pair {
        let pki = Pki::new("observability", name);
        let (cc, ck) = pki.svid("cluster.local", "productpage");
        let (sc, sk) = pki.svid("cluster.local", "reviews");
        let server = Sidecar::start(args(&format!(
            "--inbound 127.0.0.1:0={app} --cert {} --key {} --ca {} --protocol http --metrics 127.0.0.1:0 \
             --cluster east {server_extra}",
            p(&sc),
            p(&sk),
            p(&pki.ca())
        )))
        .unwrap();
        let client = Sidecar::start(args(&format!(
            "--outbound 127.0.0.1:0={} --cert {} --key {} --ca {} --protocol http --metrics 127.0.0.1:0 \
             --cluster west {client_extra}",
            server.bound.inbound.unwrap(),
            p(&cc),
            p(&ck),
            p(&pki.ca())
        )))
        .unwrap();
        Pair {
            _pki: pki,
            client,
            server,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_duration_and_sizes_are_histograms_with_istios_labels_and_buckets() {
    let (app, _) = support::http_app(|_| "r".repeat(1500)).await;
    let pair = Pair::start("histograms", app, "", "").await;
    let body = "q".repeat(200);
    let answer = send(
        pair.client.bound.outbound.unwrap(),
        "POST /reviews HTTP/1.1\r\nhost: reviews:9080\r\ncontent-length: 200",
        &body,
    )
    .await;
    assert_eq!(answer.unwrap().body.len(), 1500);
    let server = pair.server.bound.metrics.unwrap();
    let client = pair.client.bound.metrics.unwrap();
    let destination = [
        ("reporter", "destination"),
        ("source_principal", "spiffe://cluster.local/ns/default/sa/productpage"),
        ("destination_principal", "spiffe://cluster.local/ns/default/sa/reviews"),
        ("destination_cluster", "east"),
        ("connection_security_policy", "mutual_tls"),
        ("request_protocol", "http"),
        ("response_code", "200"),
    ];
    metric_reaches(server, "istio_request_duration_milliseconds_count", &destination, 1.0).await;
    metric_reaches(
        client,
        "istio_request_duration_milliseconds_count",
        &[
            ("reporter", "source"),
            ("source_cluster", "west"),
            ("response_code", "200"),
        ],
        1.0,
    )
    .await;
    let text = scrape(server).await;
    let bucket = |name: &str, le: &str| {
        let mut labels = destination.to_vec();
        labels.push(("le", le));
        sum_of(&text, name, &labels)
    };
    // Istio's buckets, and a 1500-byte body lands between 1000 and 10000.
    assert_eq!(bucket("istio_response_bytes_bucket", "1000"), 0.0, "{text}");
    assert_eq!(bucket("istio_response_bytes_bucket", "10000"), 1.0, "{text}");
    assert_eq!(bucket("istio_request_bytes_bucket", "100"), 0.0, "{text}");
    assert_eq!(bucket("istio_request_bytes_bucket", "1000"), 1.0, "{text}");
    assert_eq!(
        bucket("istio_request_duration_milliseconds_bucket", "3600000"),
        1.0,
        "{text}"
    );
    assert_eq!(
        bucket("istio_request_duration_milliseconds_bucket", "+Inf"),
        1.0,
        "{text}"
    );
}

/// An application that answers with the trace headers it received, one `name=value` a line.
async fn trace_echo() -> SocketAddr {
    let (addr, _) = support::http_app(|req| {
        [
            "x-request-id",
            "traceparent",
            "tracestate",
            "x-b3-traceid",
            "x-b3-spanid",
            "x-b3-parentspanid",
            "x-b3-sampled",
            "b3",
        ]
        .iter()
        .filter_map(|n| Some(format!("{n}={}\n", req.headers().get(*n)?.to_str().ok()?)))
        .collect()
    })
    .await;
    addr
}

fn seen(body: &str) -> std::collections::HashMap<String, String> {
    body.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// The trace headers the application received for `head`, sent to `addr`.
async fn seen_through(addr: SocketAddr, head: &str) -> std::collections::HashMap<String, String> {
    seen(&exchange(addr, head).await.unwrap().body)
}

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_tracer_the_trace_reaches_the_application_as_the_caller_sent_it() {
    let pair = Pair::start("untraced", trace_echo().await, "", "").await;
    let b3 = format!("x-b3-traceid: {TRACE}\r\nx-b3-spanid: {CALLER_SPAN}\r\nx-b3-sampled: 1");
    let got = seen_through(
        pair.client.bound.outbound.unwrap(),
        &format!("GET / HTTP/1.1\r\nhost: reviews\r\ntraceparent: 00-{TRACE}-{CALLER_SPAN}-01\r\n{b3}"),
    )
    .await;
    // Neither sidecar reports a span, so neither may stand between the caller's span and
    // the application's.
    assert_eq!(got["traceparent"], format!("00-{TRACE}-{CALLER_SPAN}-01"), "{got:?}");
    assert_eq!(got["x-b3-spanid"], CALLER_SPAN, "{got:?}");
    assert!(!got.contains_key("x-b3-parentspanid"), "{got:?}");
    let id: Vec<usize> = got["x-request-id"].split('-').map(str::len).collect();
    assert_eq!(id, [8, 4, 4, 4, 12], "a UUID v4 request id all the same: {got:?}");
    // Nor does a request without context get one made up.
    let got = seen_through(pair.client.bound.outbound.unwrap(), "GET / HTTP/1.1\r\nhost: reviews").await;
    assert_eq!(got.keys().collect::<Vec<_>>(), ["x-request-id"], "{got:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_context_reaches_the_application_as_a_child_span_with_a_request_id() {
    let (otlp, _) = collector().await;
    let traced = format!("--otlp http://{otlp}");
    let pair = Pair::start(
        "trace",
        trace_echo().await,
        &format!("--mtls PERMISSIVE {traced}"),
        &traced,
    )
    .await;
    let outbound = pair.client.bound.outbound.unwrap();

    // W3C: same trace and flags, a new parent id per hop, tracestate untouched.
    let got = seen_through(outbound,
            &format!(
                "GET / HTTP/1.1\r\nhost: reviews\r\ntraceparent: 00-{TRACE}-{CALLER_SPAN}-01\r\ntracestate: congo=t61rcWkgMzE"
            )).await;
    let tp: Vec<&str> = got["traceparent"].split('-').collect();
    assert_eq!((tp[0], tp[1], tp[3]), ("00", TRACE, "01"), "{got:?}");
    assert_ne!(tp[2], CALLER_SPAN, "each sidecar is a span of its own");
    assert_eq!(got["tracestate"], "congo=t61rcWkgMzE");
    let id: Vec<usize> = got["x-request-id"].split('-').map(str::len).collect();
    assert_eq!(id, [8, 4, 4, 4, 12], "a UUID v4 request id: {got:?}");

    // B3 through both sidecars: the application's parent is the outbound sidecar's span,
    // whose parent was the caller's.
    let b3 =
        format!("x-b3-traceid: {TRACE}\r\nx-b3-spanid: {CALLER_SPAN}\r\nx-b3-sampled: 1\r\nx-request-id: given-id");
    let got = seen_through(outbound, &format!("GET / HTTP/1.1\r\nhost: reviews\r\n{b3}")).await;
    assert_eq!(
        (got["x-b3-traceid"].as_str(), got["x-b3-sampled"].as_str()),
        (TRACE, "1")
    );
    assert_eq!(got["x-request-id"], "given-id", "a caller's request id is kept");
    let (parent, span) = (&got["x-b3-parentspanid"], &got["x-b3-spanid"]);
    assert!(
        parent != CALLER_SPAN && span != parent && span != CALLER_SPAN,
        "{got:?}"
    );
    // One hop only (a plaintext caller straight to the inbound side): the parent is the
    // caller's own span.
    let got = seen_through(
        pair.server.bound.inbound.unwrap(),
        &format!("GET / HTTP/1.1\r\nhost: reviews\r\n{b3}"),
    )
    .await;
    assert_eq!(got["x-b3-parentspanid"], CALLER_SPAN, "{got:?}");
    assert!(!got.contains_key("traceparent"), "a B3 trace is not given W3C headers");
}

/// Polls `path` until it holds `n` lines, and returns them.
async fn log_lines(path: &Path, n: usize) -> Vec<String> {
    support::poll(std::time::Duration::from_secs(10), || async {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<String> = text.lines().map(str::to_owned).collect();
        match lines.len() >= n {
            true => Ok(lines),
            false => Err(format!(
                "{} has {} lines, want {n}: {text:?}",
                path.display(),
                lines.len()
            )),
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_side_writes_an_access_log_line_in_envoys_format() {
    let (app, _) = support::http_app(|_| "hello".to_owned()).await;
    let dir = std::env::temp_dir().join(format!("isthmus-access-log-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (server_log, client_log) = (dir.join("server.log"), dir.join("client.log"));
    let pair = Pair::start(
        "access-log",
        app,
        &format!("--access-log {}", p(&server_log)),
        &format!("--access-log {} --access-log-format json", p(&client_log)),
    )
    .await;
    let answer = exchange(
        pair.client.bound.outbound.unwrap(),
        "GET /reviews/1?x=y HTTP/1.1\r\nhost: reviews:9080\r\nuser-agent: curl/8.5\r\nx-request-id: req-1",
    )
    .await
    .unwrap();
    assert_eq!(answer.body, "hello");

    let server = log_lines(&server_log, 1).await;
    let envoy = regex::Regex::new(&format!(
        r#"^\[\d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{{3}}Z\] "GET /reviews/1\?x=y HTTP/2" 200 - 0 5 \d+ - "-" "curl/8\.5" "req-1" "reviews:9080" "{}"$"#,
        regex::escape(&app.to_string())
    ))
    .unwrap();
    assert!(envoy.is_match(&server[0]), "{:?}", server[0]);

    let client = log_lines(&client_log, 1).await;
    let inbound = pair.server.bound.inbound.unwrap();
    for field in [
        r#""method":"GET""#.to_owned(),
        r#""path":"/reviews/1?x=y""#.to_owned(),
        r#""protocol":"HTTP/1.1""#.to_owned(),
        r#""response_code":200"#.to_owned(),
        r#""response_flags":"-""#.to_owned(),
        r#""bytes_sent":5"#.to_owned(),
        r#""request_id":"req-1""#.to_owned(),
        r#""x_forwarded_for":null"#.to_owned(),
        format!(r#""upstream_host":"{inbound}""#),
    ] {
        assert!(client[0].contains(&field), "{field} not in {:?}", client[0]);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// An OTLP/HTTP collector: keeps the body of every POST to /v1/traces.
async fn collector() -> (SocketAddr, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use http_body_util::BodyExt;
    let bodies = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let kept = bodies.clone();
    let (addr, _) = support::accept_each(move |stream| {
        let kept = kept.clone();
        async move {
            let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let kept = kept.clone();
                async move {
                    let path = req.uri().path().to_owned();
                    let body = req.into_body().collect().await?.to_bytes();
                    if path == "/v1/traces" {
                        kept.lock().unwrap().push(String::from_utf8_lossy(&body).into_owned());
                    }
                    Ok::<_, hyper::Error>(hyper::Response::new(http_body_util::Full::new(bytes::Bytes::new())))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        }
    })
    .await;
    (addr, bodies)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_hop_exports_a_span_whose_parent_is_the_hop_before() {
    let (otlp, bodies) = collector().await;
    let flag = format!("--otlp http://{otlp}");
    let pair = Pair::start("otlp", trace_echo().await, &flag, &flag).await;
    let got = seen_through(
        pair.client.bound.outbound.unwrap(),
        &format!("GET /r HTTP/1.1\r\nhost: reviews\r\ntraceparent: 00-{TRACE}-{CALLER_SPAN}-01"),
    )
    .await;
    let app_parent = got["traceparent"].split('-').nth(2).unwrap().to_owned();
    let span = regex::Regex::new(&format!(
        r#""traceId":"{TRACE}","spanId":"([0-9a-f]{{16}})","parentSpanId":"([0-9a-f]*)","name":"[^"]*","kind":(\d)"#
    ))
    .unwrap();
    // (kind, span, parent) of every span of the trace.
    let spans = support::poll(std::time::Duration::from_secs(10), || async {
        let bodies = bodies.lock().unwrap().concat();
        let spans: Vec<(String, String, String)> = span
            .captures_iter(&bodies)
            .map(|c| (c[3].to_owned(), c[1].to_owned(), c[2].to_owned()))
            .collect();
        match spans.len() {
            2 => Ok(spans),
            _ => Err(format!("want 2 spans, got {bodies}")),
        }
    })
    .await;
    let client = spans
        .iter()
        .find(|s| s.0 == "3")
        .expect("a client span from the outbound side");
    let server = spans
        .iter()
        .find(|s| s.0 == "2")
        .expect("a server span from the inbound side");
    assert_eq!(client.2, CALLER_SPAN, "the outbound span's parent is the caller's");
    assert_eq!(server.2, client.1, "the inbound span's parent is the outbound span");
    assert_eq!(server.1, app_parent, "the application's parent is the inbound span");
}
