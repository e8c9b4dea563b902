//! What an operator sees of traffic through a real sidecar pair: Istio's request metrics
//! with their labels, trace context carried to the application as a child span, and
//! Envoy-format access logs.

mod support;

use std::net::SocketAddr;
use std::path::Path;

use sidecar::run::{RunArgs, Sidecar};
use support::{Pki, metric_reaches, scrape, send, sum_of};

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
    /// `productpage` → `reviews` over HTTP, each with metrics; `extra` goes to both.
    async fn start(name: &str, app: SocketAddr, extra: &str) -> Pair {
        let pki = Pki::new("observability", name);
        let (cc, ck) = pki.svid("cluster.local", "productpage");
        let (sc, sk) = pki.svid("cluster.local", "reviews");
        let server = Sidecar::start(args(&format!(
            "--inbound 127.0.0.1:0={app} --cert {} --key {} --ca {} --protocol http --metrics 127.0.0.1:0 \
             --cluster east {extra}",
            p(&sc),
            p(&sk),
            p(&pki.ca())
        )))
        .unwrap();
        let client = Sidecar::start(args(&format!(
            "--outbound 127.0.0.1:0={} --cert {} --key {} --ca {} --protocol http --metrics 127.0.0.1:0 \
             --cluster west {extra}",
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
    let pair = Pair::start("histograms", app, "").await;
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
