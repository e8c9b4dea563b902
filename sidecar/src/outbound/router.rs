//! Envoy's router for a captured connection to an HTTP listener: each request is looked
//! up in the listener's route configuration ([`crate::route`]) and carried as its route
//! says — injected faults first, then a direct answer, a redirect, or a forward to one of
//! the route's clusters with its rewrites and header mutations, within the route's timeout,
//! retried by its retry policy, and copied to its mirrors.
//!
//! A request body is held in memory (up to [`BUFFER_LIMIT`], Envoy's default
//! `per_request_buffer_limit_bytes`) only when a retry or a mirror may need it again; a
//! larger one streams on from where holding stopped, and is then never sent twice.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HOST, HeaderValue, LOCATION};
use hyper::http::request::Parts;
use hyper::{Request, Response, StatusCode, Uri};

use super::{Answered, Attempt, Captured, ClientIp, HttpHop, Observed, Unanswered, to_h2};
use crate::body::{self, Held, Outgoing, Resumed};
use crate::cluster::Reply;
use crate::destinations::{Destinations, PASSTHROUGH_CLUSTER, Upstream};
use crate::http::{self, ReplyBody};
use crate::route::action::{Action, Forward, Target};
use crate::route::fault::{ABORT_BODY, Abort};
use crate::route::mirror::{Mirror, shadow_authority};
use crate::route::retry::{MAX_RETRIES_HEADER, Outcome, PER_TRY_TIMEOUT_HEADER, RETRY_ON_HEADER, RetryPolicy};
use crate::route::{RouteTable, Selected};
use crate::telemetry::{ConnectionLabels, TcpCounters};

/// The most of a request body held for retries and mirrors.
pub const BUFFER_LIMIT: u64 = 64 * 1024;

/// Envoy's body when the route's timeout or the last attempt's per-try timeout expires.
pub const UPSTREAM_TIMEOUT: &str = "upstream request timeout";

/// How long a mirrored copy may wait for its answer when the route has no timeout: copies
/// run in the background, and a shadow that never answers must not pile them up.
const MIRROR_TIMEOUT: Duration = Duration::from_secs(15);

/// Envoy's request header by which a (trusted) application bounds its own request, in
/// milliseconds (0 is none), instead of the route's timeout.
const TIMEOUT_HEADER: &str = "x-envoy-upstream-rq-timeout-ms";

/// Envoy's text for a request the circuit breaker turned away.
pub const OVERFLOW: &str = "upstream connect error or disconnect/reset before headers. reset reason: overflow";

/// Marks an answer of our own, so that it is counted as Envoy counts local replies, with
/// Envoy's response flags for its access log (`NR` no route, `FI` fault abort, …).
#[derive(Debug, Clone, Copy)]
struct LocalReply(&'static str);

/// An answer of our own.
fn local(status: StatusCode, body: Bytes) -> Response<ReplyBody> {
    let text = !body.is_empty();
    let mut resp = Response::new(Either::Right(Full::new(body)));
    *resp.status_mut() = status;
    resp.extensions_mut().insert(LocalReply("-"));
    if text {
        resp.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    }
    resp
}

/// `resp`, flagged as Envoy flags such an answer.
fn flagged(mut resp: Response<ReplyBody>, flags: &'static str) -> Response<ReplyBody> {
    resp.extensions_mut().insert(LocalReply(flags));
    resp
}

/// Envoy's answer to a request the circuit breaker turned away (`UO`).
pub(super) fn overflow() -> Response<ReplyBody> {
    let mut resp = local(StatusCode::SERVICE_UNAVAILABLE, Bytes::from_static(OVERFLOW.as_bytes()));
    resp.headers_mut()
        .insert("x-envoy-overloaded", HeaderValue::from_static("true"));
    flagged(resp, "UO")
}

/// A copy of a request's head with `body`.
fn copy(parts: &Parts, body: Outgoing) -> Request<Outgoing> {
    let mut req = Request::new(body);
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = parts.uri.clone();
    *req.version_mut() = parts.version;
    *req.headers_mut() = parts.headers.clone();
    req
}

/// The body, held when a retry or a mirror may want it again and it fits the buffer;
/// `Err` when the client's body failed while being read.
async fn buffered(body: Incoming, wanted: bool) -> Result<Either<Outgoing, Bytes>, hyper::Error> {
    if !wanted {
        return Ok(Either::Left(Resumed::streamed(body)));
    }
    Ok(match body::hold(body, BUFFER_LIMIT).await? {
        Held::Whole(bytes) => Either::Right(bytes),
        Held::TooLarge(streamed) => Either::Left(streamed),
    })
}

/// How an attempt ended, as a retry policy judges it.
fn outcome(attempt: &Attempt) -> Outcome<'_> {
    match &attempt.result {
        Ok(Answered::Pooled { sent, .. }) => Outcome::Response(sent.response.status(), sent.response.headers()),
        Ok(Answered::Plain(a)) => Outcome::Response(a.response.status(), a.response.headers()),
        Err(Unanswered::Unreachable | Unanswered::Overflow) => Outcome::ConnectFailure,
        Err(Unanswered::Mesh(e)) if e.refused_stream() => Outcome::RefusedStream,
        Err(Unanswered::Mesh(crate::pool::SendError::Connect(..))) => Outcome::ConnectFailure,
        Err(Unanswered::Plain(e)) if e.is_connect() => Outcome::ConnectFailure,
        Err(Unanswered::Mesh(_) | Unanswered::Plain(_)) => Outcome::Reset,
    }
}

/// How an attempt ended: with a result, or cut off by its timeout.
// A value of one request's stack, moved once: boxing the attempt would cost an
// allocation per request to save bytes nobody keeps.
#[allow(clippy::large_enum_variant)]
enum Tried {
    Done(Attempt),
    TimedOut,
}

impl HttpHop {
    /// Counts an answer of our own (no route, a fault, a direct answer, an overflow…) in
    /// the request metrics and the access log, as the upstream's answers are counted when
    /// they arrive; others pass as they are.
    pub(super) fn count_local(
        &self,
        resp: Response<ReplyBody>,
        table: &Destinations,
        original: SocketAddr,
        observed: &Observed,
    ) -> Response<ReplyBody> {
        let Some(&LocalReply(flags)) = resp.extensions().get::<LocalReply>() else {
            return resp;
        };
        // Istio's route configuration names are `HOST:PORT`.
        let service = table
            .http_listener(original)
            .map(|name| name.rsplit_once(':').map_or(name, |(host, _)| host));
        let what = super::Upstream {
            service: service.unwrap_or("unknown"),
            cluster: None,
            protocol: observed.protocol,
            size: observed.size,
            host: SocketAddr::from(([0, 0, 0, 0], 0)),
            log: observed.log.clone(),
            span: observed.span.clone(),
        };
        let labels = ConnectionLabels {
            reporter: "source",
            source_principal: self.self_id.as_str(),
            destination_principal: "unknown",
            destination_service: what.service,
            peer_cluster: None,
            mutual_tls: false,
        };
        let exchange = self.count(labels, &what, resp.status().as_u16(), flags);
        crate::http::recorded(exchange, resp)
    }

    /// Routes one request that arrived on the HTTP listener at `original`.
    pub(super) async fn forward_routed(
        self: &Arc<Self>,
        captured: &Arc<Captured>,
        table: &Arc<Destinations>,
        original: SocketAddr,
        req: Request<Incoming>,
        observed: &Observed,
        l4: &OnceLock<TcpCounters>,
    ) -> Response<ReplyBody> {
        let routes: Option<&RouteTable> = table
            .http_listener(original)
            .and_then(|name| table.routes.get(name))
            .map(|t| &**t);
        let (parts, body) = req.into_parts();
        let Some(selected) = routes.and_then(|t| t.select(&parts)) else {
            // Envoy's `NR`: no route, an empty 404.
            return flagged(local(StatusCode::NOT_FOUND, Bytes::new()), "NR");
        };
        if let Some(fault) = &selected.route.fault {
            let drawn = fault.draw();
            if let Some(delay) = drawn.delay {
                tokio::time::sleep(delay).await;
            }
            match drawn.abort {
                Some(Abort::Http(status)) => {
                    return flagged(local(status, Bytes::from_static(ABORT_BODY.as_bytes())), "FI");
                }
                Some(Abort::Grpc(code)) => {
                    let mut resp = local(StatusCode::OK, Bytes::new());
                    let headers = resp.headers_mut();
                    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
                    headers.insert("grpc-status", HeaderValue::from(code));
                    headers.insert("grpc-message", HeaderValue::from_static(ABORT_BODY));
                    return flagged(resp, "FI");
                }
                None => {}
            }
        }
        let (target, mut resp) = match &selected.route.action {
            Action::Direct { status, body } => (None, local(*status, body.clone())),
            Action::Redirect(r) => {
                let mut resp = local(r.status(), Bytes::new());
                if let Ok(location) = HeaderValue::try_from(r.location(&parts)) {
                    resp.headers_mut().insert(LOCATION, location);
                }
                (None, resp)
            }
            Action::Forward(f) => {
                let target = f.pick();
                let resp = self
                    .forward_to(
                        captured, table, selected, f, target, parts, body, original, observed, l4,
                    )
                    .await;
                (Some(target), resp)
            }
        };
        selected.response_headers(target, resp.headers_mut());
        resp
    }

    /// Carries a request to `target`, one of `forward`'s clusters.
    #[allow(clippy::too_many_arguments)]
    async fn forward_to(
        self: &Arc<Self>,
        captured: &Arc<Captured>,
        table: &Arc<Destinations>,
        selected: Selected<'_>,
        forward: &Forward,
        target: &Target,
        mut parts: Parts,
        body: Incoming,
        original: SocketAddr,
        observed: &Observed,
        l4: &OnceLock<TcpCounters>,
    ) -> Response<ReplyBody> {
        let passthrough;
        let upstream = match table.upstreams.get(&target.cluster) {
            Some(upstream) => upstream,
            // A wildcard listener's `allow_any`: where the application was going.
            None if target.cluster == PASSTHROUGH_CLUSTER => {
                passthrough = Arc::new(Upstream::passthrough(original));
                &passthrough
            }
            None => {
                // An empty answer with the route's `cluster_not_found_response_code`, as Envoy's.
                self.telemetry.upstream_failure("outbound", "cluster_not_found");
                return flagged(local(forward.cluster_not_found, Bytes::new()), "NC");
            }
        };
        // Counted until its response headers arrive.
        let Some(_in_flight) = upstream.breaker.request() else {
            self.telemetry
                .upstream_failure("outbound", "upstream_rq_pending_overflow");
            return overflow();
        };
        // The application's own say on timeouts and retries, for this hop only.
        let retry = RetryPolicy::for_request(forward.retry.as_ref(), &parts.headers);
        let timeout = match parts
            .headers
            .get(TIMEOUT_HEADER)
            .and_then(|v| v.to_str().ok()?.trim().parse().ok())
        {
            Some(0) => None,
            Some(ms) => Some(Duration::from_millis(ms)),
            None => forward.timeout,
        };
        for name in [
            TIMEOUT_HEADER,
            RETRY_ON_HEADER,
            MAX_RETRIES_HEADER,
            PER_TRY_TIMEOUT_HEADER,
        ] {
            parts.headers.remove(name);
        }
        let client = parts.extensions.get::<ClientIp>().map(|c| c.0);
        let hash = forward.hash.hash(&parts, client);
        let path = forward.path(parts.uri.path_and_query().map_or("/", |p| p.as_str()));
        let Ok(uri) = Uri::try_from(path) else {
            return local(
                StatusCode::BAD_REQUEST,
                Bytes::from_static(b"the rewritten path is not a path\n"),
            );
        };
        // An HTTP/2 client's authority is in its URI, which the rewritten path replaces.
        http::host_from_uri(&mut parts);
        parts.uri = uri;
        if let Some(host) = target.host_rewrite.as_ref().or(forward.host_rewrite.as_ref())
            && let Ok(value) = HeaderValue::try_from(host.as_str())
        {
            parts.headers.insert(HOST, value);
        }
        selected.request_headers(Some(target), &mut parts.headers);
        let Some(req) = to_h2(Request::from_parts(parts, ()), original) else {
            return local(StatusCode::BAD_REQUEST, Bytes::from_static(b"invalid host header\n"));
        };
        let (parts, ()) = req.into_parts();
        let wanted = retry.is_some() || !forward.mirrors.is_empty();
        let body = match buffered(body, wanted).await {
            Ok(body) => body,
            Err(e) => {
                tracing::debug!(error = %e, "client body failed while buffered");
                return local(
                    StatusCode::BAD_REQUEST,
                    Bytes::from_static(b"incomplete request body\n"),
                );
            }
        };
        if let Either::Right(bytes) = &body {
            for mirror in forward.mirrors.iter().filter(|m| m.fraction.sample()) {
                let bound = timeout.unwrap_or(MIRROR_TIMEOUT);
                self.mirror(captured, table, mirror, &parts, bytes.clone(), bound);
            }
        }
        let attempts = self.attempts(captured, upstream, retry.as_ref(), &parts, body, hash);
        let tried = match timeout {
            Some(timeout) => tokio::time::timeout(timeout, attempts).await.unwrap_or(Tried::TimedOut),
            None => attempts.await,
        };
        match tried {
            Tried::Done(attempt) => self.deliver(attempt, upstream, observed, l4),
            Tried::TimedOut => {
                self.telemetry.upstream_failure("outbound", "timeout");
                let resp = local(
                    StatusCode::GATEWAY_TIMEOUT,
                    Bytes::from_static(UPSTREAM_TIMEOUT.as_bytes()),
                );
                flagged(resp, "UT")
            }
        }
    }

    /// The first attempt and the retries the policy allows, each within its per-try
    /// timeout, with Envoy's backoff between them; what the last one got.
    async fn attempts(
        &self,
        captured: &Captured,
        upstream: &Upstream,
        retry: Option<&RetryPolicy>,
        parts: &Parts,
        body: Either<Outgoing, Bytes>,
        hash: Option<u64>,
    ) -> Tried {
        let (mut streaming, replay) = match body {
            Either::Left(stream) => (Some(stream), None),
            Either::Right(bytes) => (None, Some(bytes)),
        };
        let mut avoid = Vec::new();
        let mut retries = 0;
        // The retry in flight, counted against the cluster's `max_retries`.
        let mut _retrying = None;
        loop {
            let body = match (&replay, streaming.take()) {
                (Some(bytes), _) => Either::Right(Full::new(bytes.clone())),
                (None, Some(stream)) => stream,
                (None, None) => unreachable!("a streamed body is sent once: the loop ends after its attempt"),
            };
            let picked = AtomicUsize::new(usize::MAX);
            let send = self.send_to(captured, upstream, copy(parts, body), &avoid, hash, Some(&picked));
            let tried = match retry.and_then(|r| r.per_try_timeout) {
                Some(per_try) => tokio::time::timeout(per_try, send)
                    .await
                    .map_or(Tried::TimedOut, Tried::Done),
                None => Tried::Done(send.await),
            };
            // An attempt cut off by its per-try timeout is the endpoint's failure, as in
            // Envoy (a local-origin timeout, counted with gateway errors when origins are
            // not split, Istio's default): outlier detection hears of it, and a retry
            // with `previous_hosts` goes elsewhere. Else a black-holed endpoint (a cut
            // link) would be picked again and again until TCP gives up.
            let timed_out_on = match (&tried, picked.load(Ordering::Relaxed)) {
                (Tried::TimedOut, i) if i != usize::MAX => {
                    upstream.record(i, Reply::NoAnswer);
                    Some(i)
                }
                _ => None,
            };
            let overflowed = matches!(
                &tried,
                Tried::Done(Attempt {
                    result: Err(Unanswered::Overflow),
                    ..
                })
            );
            // Envoy never retries a request its own circuit breaker turned away.
            let Some(policy) = retry.filter(|r| replay.is_some() && retries < r.num_retries && !overflowed) else {
                return tried;
            };
            let (retriable, endpoint) = match &tried {
                Tried::Done(attempt) => (policy.retriable(parts, outcome(attempt)), attempt.endpoint),
                Tried::TimedOut => (policy.retriable(parts, Outcome::PerTryTimeout), timed_out_on),
            };
            if !retriable {
                return tried;
            }
            let Some(slot) = upstream.breaker.retry() else {
                self.telemetry
                    .upstream_failure("outbound", "upstream_rq_retry_overflow");
                return tried;
            };
            _retrying = Some(slot);
            if policy.previous_hosts
                && let Some(i) = endpoint
            {
                avoid.push(i);
            }
            retries += 1;
            tracing::debug!(service = upstream.service, retries, "retrying");
            tokio::time::sleep(policy.backoff(retries)).await;
        }
    }

    /// Sends a copy to `mirror`'s cluster in the background, waiting at most `bound` for
    /// its answer, which is dropped.
    fn mirror(
        self: &Arc<Self>,
        captured: &Arc<Captured>,
        table: &Arc<Destinations>,
        mirror: &Mirror,
        parts: &Parts,
        body: Bytes,
        bound: Duration,
    ) {
        let mut req = copy(parts, Either::Right(Full::new(body)));
        if let Some(authority) = req.uri().authority().map(shadow_authority) {
            let mut uri = req.uri().clone().into_parts();
            uri.authority = Some(authority);
            if let Ok(uri) = Uri::from_parts(uri) {
                *req.uri_mut() = uri;
            }
        }
        let (hop, captured, table, cluster) = (self.clone(), captured.clone(), table.clone(), mirror.cluster.clone());
        tokio::spawn(async move {
            let Some(upstream) = table.upstreams.get(&cluster) else {
                return hop.telemetry.upstream_failure("outbound", "mirror_cluster_not_found");
            };
            match tokio::time::timeout(bound, hop.send_to(&captured, upstream, req, &[], None, None)).await {
                Ok(Attempt { result: Ok(_), .. }) => {}
                Ok(Attempt { result: Err(_), .. }) | Err(_) => tracing::debug!(cluster, "mirrored request failed"),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_own_answers_carry_text_only_when_they_have_a_body() {
        let empty = local(StatusCode::NOT_FOUND, Bytes::new());
        assert!(empty.headers().get(CONTENT_TYPE).is_none());
        let text = local(
            StatusCode::GATEWAY_TIMEOUT,
            Bytes::from_static(UPSTREAM_TIMEOUT.as_bytes()),
        );
        assert_eq!(text.headers()[CONTENT_TYPE], "text/plain");
    }
}
