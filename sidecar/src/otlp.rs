//! Span export over OTLP/HTTP with JSON bodies (`POST {endpoint}/v1/traces`), what an
//! OpenTelemetry collector, Jaeger or Tempo takes. Each sidecar hop reports one span: a
//! client span on the outbound side, a server span on the inbound side, each the child of
//! the caller's (see [`crate::trace`]).
//!
//! Spans are queued to the control thread, which sends what is queued every
//! [`FLUSH_INTERVAL`] or as soon as a batch's worth is waiting, as OpenTelemetry's batch
//! span processor does. The sender sleeps on its timer, not on the queue: a span queued
//! wakes no one, where waking the control thread for each span (and posting the one or two
//! it found) cost the mesh-hop benchmark's pair about 70 µs of CPU per request. A full queue
//! drops spans rather than slow requests down, and a collector that is away loses the batch
//! (counted in the logs), never the traffic.

use std::fmt::Write;
use std::time::SystemTime;

use bytes::Bytes;
use http_body_util::Full;
use hyper::Uri;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::sync::{Notify, mpsc};

use crate::trace::Span;

/// Spans waiting to be sent; beyond this they are dropped.
const QUEUE: usize = 4096;
/// Spans per request to the collector; this many waiting sends them at once.
const BATCH: usize = 512;
/// The longest a span waits to be sent.
pub const FLUSH_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// OTLP's `SpanKind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Server = 2,
    Client = 3,
}

/// A finished span, ready to send.
#[derive(Debug, Clone)]
struct Finished {
    span: Span,
    kind: Kind,
    start: SystemTime,
    end: SystemTime,
    method: hyper::Method,
    path: String,
    code: u16,
}

/// Where a sidecar's spans go: cheap to clone, one per hop.
#[derive(Clone)]
pub struct Exporter {
    tx: mpsc::Sender<Finished>,
    /// Tells the sender a batch is waiting.
    full: std::sync::Arc<Notify>,
}

/// The sender side's task: runs until every [`Exporter`] is gone.
pub struct Sending {
    rx: mpsc::Receiver<Finished>,
    full: std::sync::Arc<Notify>,
    url: Uri,
    service: String,
}

/// A span begun for one request, ended when its response ends.
#[derive(Clone)]
pub struct Started {
    exporter: Exporter,
    span: Span,
    kind: Kind,
    start: SystemTime,
    method: hyper::Method,
    path: String,
    code: u16,
}

impl Exporter {
    /// An exporter to `endpoint` (e.g. `http://127.0.0.1:4318`) for spans of `service`, and
    /// the task that sends them.
    pub fn new(endpoint: &str, service: &str) -> Result<(Self, Sending), hyper::http::uri::InvalidUri> {
        let url: Uri = format!("{}/v1/traces", endpoint.trim_end_matches('/')).parse()?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let full = std::sync::Arc::new(Notify::new());
        Ok((
            Self { tx, full: full.clone() },
            Sending {
                rx,
                full,
                url,
                service: service.to_owned(),
            },
        ))
    }

    /// Begins the span of a request now.
    pub fn start<B>(&self, span: Span, kind: Kind, req: &hyper::Request<B>) -> Started {
        Started {
            exporter: self.clone(),
            span,
            kind,
            start: SystemTime::now(),
            method: req.method().clone(),
            path: req.uri().path().to_owned(),
            code: 0,
        }
    }
}

impl Started {
    /// Records the response status.
    pub fn answered(mut self, code: u16) -> Self {
        self.code = code;
        self
    }

    /// Ends the span now and queues it; what is left to format waits for the sender.
    pub fn end(self) {
        let finished = Finished {
            span: self.span,
            kind: self.kind,
            start: self.start,
            end: SystemTime::now(),
            method: self.method,
            path: self.path,
            code: self.code,
        };
        let tx = &self.exporter.tx;
        if tx.try_send(finished).is_err() {
            tracing::debug!("span queue full or exporter gone; span dropped");
        } else if tx.max_capacity() - tx.capacity() >= BATCH {
            self.exporter.full.notify_one();
        }
    }
}

/// Nanoseconds since the epoch; 64 bits last until 2554.
fn nanos(t: SystemTime) -> u64 {
    let since = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    u64::try_from(since.as_nanos()).unwrap_or(u64::MAX)
}

/// OTLP/JSON `ExportTraceServiceRequest` for `spans` of `service`.
fn body(service: &str, spans: &[Finished]) -> String {
    let mut out =
        String::from(r#"{"resourceSpans":[{"resource":{"attributes":[{"key":"service.name","value":{"stringValue":"#);
    crate::json::string(&mut out, Some(service));
    out.push_str(r#"}}]},"scopeSpans":[{"scope":{"name":"isthmus-sidecar"},"spans":["#);
    let mut name = String::new();
    for (i, f) in spans.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(
            out,
            r#"{{"traceId":"{}","spanId":"{}","parentSpanId":"{}","name":"#,
            f.span.trace_id,
            f.span.span_id,
            f.span.parent_id.as_ref().map_or("", crate::trace::Hex::as_str)
        );
        // `service:path`, as Envoy names a span after the service and operation.
        name.clear();
        name.push_str(service);
        name.push(':');
        name.push_str(&f.path);
        crate::json::string(&mut out, Some(&name));
        let _ = write!(
            out,
            r#","kind":{},"startTimeUnixNano":"{}","endTimeUnixNano":"{}","attributes":[{{"key":"http.method","value":{{"stringValue":"#,
            f.kind as u8,
            nanos(f.start),
            nanos(f.end)
        );
        crate::json::string(&mut out, Some(f.method.as_str()));
        out.push_str(r#"}},{"key":"http.url","value":{"stringValue":"#);
        crate::json::string(&mut out, Some(&f.path));
        // OTLP's status: 2 (error) for a 5xx, as OpenTelemetry's HTTP conventions say.
        let _ = write!(
            out,
            r#"}}}},{{"key":"http.status_code","value":{{"intValue":"{}"}}}}],"status":{{"code":{}}}}}"#,
            f.code,
            if f.code >= 500 { 2 } else { 0 }
        );
    }
    out.push_str("]}]}]}");
    out
}

impl Sending {
    /// Sends queued spans until every exporter is dropped.
    pub async fn run(mut self) {
        let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
        let mut batch = Vec::with_capacity(BATCH);
        let mut open = true;
        while open {
            tokio::select! {
                () = tokio::time::sleep(FLUSH_INTERVAL) => {}
                () = self.full.notified() => {}
            }
            loop {
                match self.rx.try_recv() {
                    Ok(span) => {
                        batch.push(span);
                        if batch.len() < BATCH {
                            continue;
                        }
                    }
                    Err(mpsc::error::TryRecvError::Empty) => {}
                    Err(mpsc::error::TryRecvError::Disconnected) => open = false,
                }
                if batch.is_empty() {
                    break;
                }
                self.post(&client, &batch).await;
                batch.clear();
            }
        }
    }

    /// Sends `batch` in one request; a refusal or an unreachable collector loses it.
    async fn post(&self, client: &Client<HttpConnector, Full<Bytes>>, batch: &[Finished]) {
        let req = hyper::Request::post(self.url.clone())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body(&self.service, batch))))
            .expect("a POST with a valid URI");
        match client.request(req).await {
            Ok(resp) if resp.status().is_success() => {}
            Ok(resp) => tracing::warn!(status = %resp.status(), spans = batch.len(), "OTLP collector refused spans"),
            Err(e) => tracing::warn!(error = %e, spans = batch.len(), "OTLP collector unreachable; spans lost"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::Hex;

    #[test]
    fn the_body_is_otlp_json() {
        let f = Finished {
            span: Span {
                trace_id: Hex::parse(b"4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
                span_id: Hex::parse(b"00f067aa0ba902b7").unwrap(),
                parent_id: None,
            },
            kind: Kind::Server,
            start: SystemTime::UNIX_EPOCH,
            end: SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(3),
            method: hyper::Method::GET,
            path: "/r".into(),
            code: 503,
        };
        let b = body("reviews", &[f.clone(), f]);
        assert!(b.starts_with(r#"{"resourceSpans":[{"resource":{"attributes":[{"key":"service.name","value":{"stringValue":"reviews"}}]}"#), "{b}");
        assert!(
            b.contains(r#""traceId":"4bf92f3577b34da6a3ce929d0e0e4736","spanId":"00f067aa0ba902b7","parentSpanId":"""#),
            "{b}"
        );
        assert!(
            b.contains(r#""kind":2,"startTimeUnixNano":"0","endTimeUnixNano":"3000000""#),
            "{b}"
        );
        assert!(
            b.contains(r#"{"key":"http.status_code","value":{"intValue":"503"}}],"status":{"code":2}}"#),
            "{b}"
        );
        assert!(b.contains(r#""name":"reviews:/r","kind":2"#), "{b}");
        assert!(b.ends_with("}]}]}]}"), "{b}");
        assert_eq!(b.matches("\"traceId\"").count(), 2);
    }
}
