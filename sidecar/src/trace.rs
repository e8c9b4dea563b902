//! Request identity and trace context across a hop, as Envoy's HTTP connection manager
//! does for Istio: an `x-request-id` (UUID v4) for every request that has none and, when a
//! tracer is configured (`--otlp`), a new span per hop, a child of the caller's, in every
//! trace format the request carries — W3C `traceparent` (with `tracestate` untouched) and
//! Zipkin's B3, multi-header (`x-b3-traceid`, `x-b3-spanid`, `x-b3-parentspanid`,
//! `x-b3-sampled`) or single (`b3`). A traced request with no trace context starts a trace
//! in both W3C and B3 form, so the application finds whichever its library reads.
//!
//! Without a tracer the trace headers pass untouched, as through an Envoy with no tracer
//! set: a hop that reports no span must not become anyone's parent, or an application that
//! traces itself finds its server spans hanging from a span no collector ever received.

use hyper::HeaderMap;
use hyper::header::{HeaderName, HeaderValue};

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
const B3_TRACE_ID: HeaderName = HeaderName::from_static("x-b3-traceid");
const B3_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-spanid");
const B3_PARENT_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-parentspanid");
const B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
const B3: HeaderName = HeaderName::from_static("b3");

const HEX_DIGITS: &[u8; 16] = b"0123456789abcdef";

/// Writes `bytes` as lowercase hex into `out` (twice as long): per request on every hop, so
/// a table, not `fmt`.
fn hex_into(bytes: &[u8], out: &mut [u8]) {
    for (b, pair) in bytes.iter().zip(out.chunks_exact_mut(2)) {
        pair[0] = HEX_DIGITS[usize::from(b >> 4)];
        pair[1] = HEX_DIGITS[usize::from(b & 0x0f)];
    }
}

fn ascii(buf: &[u8]) -> &str {
    std::str::from_utf8(buf).expect("hex digits and dashes are ASCII")
}

fn hex(bytes: &[u8]) -> String {
    let mut buf = [0u8; 64];
    let out = &mut buf[..bytes.len() * 2];
    hex_into(bytes, out);
    ascii(out).to_owned()
}

/// A random UUID in version 4 form (RFC 9562 §5.4), as Envoy makes request ids.
fn uuid_v4() -> HeaderValue {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let mut h = [0u8; 32];
    hex_into(&b, &mut h);
    let mut out = [b'-'; 36];
    for (from, to, len) in [(0, 0, 8), (8, 9, 4), (12, 14, 4), (16, 19, 4), (20, 24, 12)] {
        out[to..to + len].copy_from_slice(&h[from..from + len]);
    }
    unique(HeaderValue::from_bytes(&out).expect("hex and dashes are header text"))
}

/// A new span id: 8 random bytes, never all zero (which both formats forbid).
fn span_id() -> String {
    hex(&rand::random::<u64>().max(1).to_be_bytes())
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        && s.bytes().any(|b| b != b'0')
}

/// A header value that is new on every request (an id): HPACK sends it as a literal that is
/// never indexed, as it would never be found in the table again; indexed, every request's
/// ids evicted the entries that do repeat and cost both sides' tables an insert and an
/// eviction per value.
fn unique(mut v: HeaderValue) -> HeaderValue {
    v.set_sensitive(true);
    v
}

fn header_value(s: String) -> HeaderValue {
    unique(HeaderValue::try_from(s).expect("hex and dashes are header text"))
}

/// What a sidecar does to a request's headers as it passes: an id if it has none and, when
/// it is `traced`, this hop's span, which it returns; untraced, the trace headers are left
/// as they came.
pub fn hop(headers: &mut HeaderMap, traced: bool) -> Option<Span> {
    ensure_request_id(headers);
    traced.then(|| child_span(headers))
}

/// Gives the request an `x-request-id` if it has none.
fn ensure_request_id(headers: &mut HeaderMap) {
    if !headers.contains_key(REQUEST_ID) {
        headers.insert(REQUEST_ID, uuid_v4());
    }
}

/// `traceparent` with a new parent id, or None when the header is not valid W3C (version
/// 00's layout; a later version's extra fields are dropped, as the spec allows).
fn w3c_child(traceparent: &str, span: &str) -> Option<String> {
    let mut parts = traceparent.trim().split('-');
    let (version, trace, parent, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let valid = version.len() == 2
        && version.bytes().all(|b| b.is_ascii_hexdigit())
        && version != "ff"
        && (version != "00" || parts.next().is_none())
        && is_hex(trace, 32)
        && is_hex(parent, 16)
        && flags.len() == 2
        && flags.bytes().all(|b| b.is_ascii_hexdigit());
    valid.then(|| ["00-", trace, "-", span, "-", flags].concat())
}

/// Single-header B3 with a new span id (the old one becomes the parent); a sampling-only
/// value (`0`, `1`, `d`) is kept as it is.
fn b3_child(b3: &str, span: &str) -> Option<String> {
    let mut parts = b3.trim().split('-');
    let trace = parts.next()?;
    let Some(parent) = parts.next() else {
        return matches!(trace, "0" | "1" | "d").then(|| trace.to_owned());
    };
    if !(is_hex(trace, 32) || is_hex(trace, 16)) || !is_hex(parent, 16) {
        return None;
    }
    Some(match parts.next() {
        Some(sampled) => [trace, "-", span, "-", sampled, "-", parent].concat(),
        None => [trace, "-", span, "-", parent].concat(),
    })
}

/// This hop's span: what a tracer is told of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Span {
    /// 32 hex digits (a 64-bit B3 trace id is padded on the left, as Zipkin does).
    pub trace_id: String,
    /// 16 hex digits.
    pub span_id: String,
    /// The caller's span, None for a trace started here.
    pub parent_id: Option<String>,
}

fn trace_id_128(t: &str) -> String {
    if t.len() >= 32 {
        return t.to_owned();
    }
    ["0".repeat(32 - t.len()).as_str(), t].concat()
}

/// Makes this hop's span a child of the caller's in every format the request carries, or
/// starts a trace when it carries none; returns the span. Where formats disagree, W3C's
/// context names the parent, then B3's.
fn child_span(headers: &mut HeaderMap) -> Span {
    let span = span_id();
    let text = |h: &HeaderMap, n: &HeaderName| h.get(n).and_then(|v| v.to_str().ok()).map(str::to_owned);
    // (trace, parent) of the first format that carried a context.
    let mut context: Option<(String, Option<String>)> = None;
    if let Some(tp) = text(headers, &TRACEPARENT) {
        match w3c_child(&tp, &span) {
            Some(child) => {
                let mut parts = tp.trim().split('-').skip(1);
                let (trace, parent) = (parts.next().unwrap_or_default(), parts.next().map(str::to_owned));
                context = Some((trace.to_owned(), parent));
                headers.insert(TRACEPARENT, header_value(child));
            }
            // An invalid traceparent makes its tracestate meaningless too (W3C §4.3).
            None => {
                headers.remove(TRACEPARENT);
                headers.remove(TRACESTATE);
            }
        }
    }
    if let Some(trace) = text(headers, &B3_TRACE_ID).filter(|t| is_hex(t, 32) || is_hex(t, 16)) {
        let parent = text(headers, &B3_SPAN_ID).filter(|s| is_hex(s, 16));
        match &parent {
            Some(parent) => headers.insert(B3_PARENT_SPAN_ID, header_value(parent.clone())),
            None => headers.remove(B3_PARENT_SPAN_ID),
        };
        headers.insert(B3_SPAN_ID, header_value(span.clone()));
        if context.is_none() {
            context = Some((trace_id_128(&trace), parent));
        }
    }
    if let Some(b3) = text(headers, &B3) {
        match b3_child(&b3, &span) {
            Some(child) => {
                if child.contains('-') && context.is_none() {
                    let mut parts = b3.trim().split('-');
                    let trace = trace_id_128(parts.next().unwrap_or_default());
                    context = Some((trace, parts.next().map(str::to_owned)));
                }
                headers.insert(B3, header_value(child));
            }
            None => {
                headers.remove(B3);
            }
        }
    }
    let (trace_id, parent_id) = match context {
        Some(c) => c,
        None => {
            let trace = hex(&rand::random::<u128>().max(1).to_be_bytes());
            // Sampling was decided upstream if anywhere; a new trace is sampled, as Envoy's
            // default of 100% (Istio lowers it in its mesh config, which we do not read).
            headers.insert(TRACEPARENT, header_value(["00-", &trace, "-", &span, "-01"].concat()));
            headers.insert(B3_TRACE_ID, header_value(trace.clone()));
            headers.insert(B3_SPAN_ID, header_value(span.clone()));
            headers.remove(B3_PARENT_SPAN_ID);
            if !headers.contains_key(B3_SAMPLED) {
                headers.insert(B3_SAMPLED, HeaderValue::from_static("1"));
            }
            (trace, None)
        }
    };
    Span {
        trace_id,
        span_id: span,
        parent_id,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get<'a>(h: &'a HeaderMap, n: &str) -> &'a str {
        h.get(n).map_or("", |v| v.to_str().unwrap())
    }

    #[test]
    fn request_ids_are_uuid_v4_and_kept_when_given() {
        let id = uuid_v4().to_str().unwrap().to_owned();
        let groups: Vec<&str> = id.split('-').collect();
        assert_eq!(
            groups.iter().map(|g| g.len()).collect::<Vec<_>>(),
            [8, 4, 4, 4, 12],
            "{id}"
        );
        assert!(groups[2].starts_with('4'), "{id}");
        assert!(matches!(&groups[3][..1], "8" | "9" | "a" | "b"), "{id}");
        assert_ne!(uuid_v4().to_str().unwrap(), id);
        let mut h = HeaderMap::new();
        h.insert(REQUEST_ID, HeaderValue::from_static("given"));
        ensure_request_id(&mut h);
        assert_eq!(get(&h, "x-request-id"), "given");
    }

    #[test]
    fn an_untraced_hop_adds_a_request_id_and_leaves_the_trace_as_it_came() {
        let mut h = HeaderMap::new();
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        h.insert(TRACEPARENT, HeaderValue::from_static(tp));
        h.insert(B3_SPAN_ID, HeaderValue::from_static("e457b5a2e4d86bd1"));
        assert_eq!(hop(&mut h, false), None);
        assert_eq!(
            (get(&h, "traceparent"), get(&h, "x-b3-spanid")),
            (tp, "e457b5a2e4d86bd1")
        );
        assert!(!h.contains_key(B3_PARENT_SPAN_ID) && h.contains_key(REQUEST_ID));
        let mut none = HeaderMap::new();
        assert_eq!(hop(&mut none, false), None);
        assert_eq!(none.len(), 1, "no trace is started: {none:?}");
        // Traced, the same request becomes a child of the caller's span.
        let span = hop(&mut h, true).expect("a span when traced");
        assert_eq!(span.parent_id.as_deref(), Some("00f067aa0ba902b7"));
    }

    #[test]
    fn a_w3c_parent_is_replaced_by_our_span_and_tracestate_kept() {
        let mut h = HeaderMap::new();
        h.insert(
            TRACEPARENT,
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        h.insert(TRACESTATE, HeaderValue::from_static("congo=t61rcWkgMzE"));
        let span = child_span(&mut h);
        assert_eq!(span.parent_id.as_deref(), Some("00f067aa0ba902b7"));
        assert_eq!(span.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        let tp: Vec<&str> = get(&h, "traceparent").split('-').collect();
        assert_eq!(tp[2], span.span_id);
        assert_eq!((tp[0], tp[1], tp[3]), ("00", "4bf92f3577b34da6a3ce929d0e0e4736", "01"));
        assert!(is_hex(tp[2], 16) && tp[2] != "00f067aa0ba902b7");
        assert_eq!(get(&h, "tracestate"), "congo=t61rcWkgMzE");
        assert!(!h.contains_key(B3_TRACE_ID), "a W3C trace is not given B3 headers");
    }

    #[test]
    fn b3_spans_move_down_one_level() {
        let mut h = HeaderMap::new();
        h.insert(
            B3_TRACE_ID,
            HeaderValue::from_static("80f198ee56343ba864fe8b2a57d3eff7"),
        );
        h.insert(B3_SPAN_ID, HeaderValue::from_static("e457b5a2e4d86bd1"));
        h.insert(B3_PARENT_SPAN_ID, HeaderValue::from_static("05e3ac9a4f6e3b90"));
        h.insert(B3_SAMPLED, HeaderValue::from_static("1"));
        h.insert(
            B3,
            HeaderValue::from_static("80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90"),
        );
        let returned = child_span(&mut h);
        let span = get(&h, "x-b3-spanid").to_owned();
        assert_eq!(returned.span_id, span);
        assert_eq!(returned.parent_id.as_deref(), Some("e457b5a2e4d86bd1"));
        assert_eq!(get(&h, "x-b3-parentspanid"), "e457b5a2e4d86bd1");
        assert_eq!(get(&h, "x-b3-traceid"), "80f198ee56343ba864fe8b2a57d3eff7");
        assert_eq!(get(&h, "x-b3-sampled"), "1");
        assert_eq!(
            get(&h, "b3"),
            format!("80f198ee56343ba864fe8b2a57d3eff7-{span}-1-e457b5a2e4d86bd1")
        );
        assert!(!h.contains_key(TRACEPARENT));
    }

    #[test]
    fn no_or_broken_context_starts_a_trace_in_both_forms() {
        let mut h = HeaderMap::new();
        h.insert(
            TRACEPARENT,
            HeaderValue::from_static("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
        );
        h.insert(TRACESTATE, HeaderValue::from_static("x=y"));
        assert_eq!(child_span(&mut h).parent_id, None);
        let tp: Vec<&str> = get(&h, "traceparent").split('-').collect();
        assert_eq!(tp[1], get(&h, "x-b3-traceid"));
        assert_eq!(tp[2], get(&h, "x-b3-spanid"));
        assert!(!h.contains_key(TRACESTATE) && !h.contains_key(B3_PARENT_SPAN_ID));
        let mut sampling_only = HeaderMap::new();
        sampling_only.insert(B3, HeaderValue::from_static("0"));
        child_span(&mut sampling_only);
        assert_eq!(get(&sampling_only, "b3"), "0");
        assert!(sampling_only.contains_key(TRACEPARENT));
    }

    #[test]
    fn a_64_bit_b3_trace_id_is_widened_for_the_span_only() {
        let mut h = HeaderMap::new();
        h.insert(B3, HeaderValue::from_static("a3ce929d0e0e4736-00f067aa0ba902b7-1"));
        let span = child_span(&mut h);
        assert_eq!(span.trace_id, "0000000000000000a3ce929d0e0e4736");
        assert_eq!(span.parent_id.as_deref(), Some("00f067aa0ba902b7"));
        assert_eq!(
            get(&h, "b3"),
            format!("a3ce929d0e0e4736-{}-1-00f067aa0ba902b7", span.span_id)
        );
    }

    proptest::proptest! {
        #[test]
        fn any_valid_traceparent_keeps_its_trace_and_flags(trace in "[0-9a-f]{31}[1-9a-f]", parent in "[0-9a-f]{15}[1-9a-f]", flags in "[0-9a-f]{2}") {
            let child = w3c_child(&format!("00-{trace}-{parent}-{flags}"), "0123456789abcdef").unwrap();
            proptest::prop_assert_eq!(child, format!("00-{trace}-0123456789abcdef-{flags}"));
        }
    }
}
