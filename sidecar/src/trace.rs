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
    value(&[&out])
}

/// A header value that is new on every request (an id): HPACK sends it as a literal that is
/// never indexed, as it would never be found in the table again; indexed, every request's
/// ids evicted the entries that do repeat and cost both sides' tables an insert and an
/// eviction per value.
fn unique(mut v: HeaderValue) -> HeaderValue {
    v.set_sensitive(true);
    v
}

/// Lets this request's ids (request id, trace context) be indexed by HPACK after all.
///
/// A never-indexed value's name goes as a literal too, unless the name is already in the
/// table (RFC 7541 §6.2.3 allows an indexed name), and h2 puts a name in the table only
/// with a value. So an HTTP/2 pool sends a connection's first request this way: its ids
/// enter the table, and the requests after it name their ids by index — on a traced hop
/// four names a request that the server no longer Huffman-decodes, validates and allocates.
/// Only the first: h2 chains every value of a name it holds and compares a new value with
/// each, so ids indexed again and again would cost the sender more than the names save.
pub fn index_id_names(headers: &mut HeaderMap) {
    for name in [REQUEST_ID, TRACEPARENT, B3_TRACE_ID, B3_SPAN_ID, B3_PARENT_SPAN_ID, B3] {
        if let Some(v) = headers.get_mut(name) {
            v.set_sensitive(false);
        }
    }
}

/// A trace or span id: `N` lowercase hex digits, never all zero (which both W3C and B3
/// forbid). Read and made on every traced request, so it lives on the stack.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Hex<const N: usize>([u8; N]);

impl<const N: usize> Hex<N> {
    /// `s` if it is an id of this length.
    pub(crate) fn parse(s: &[u8]) -> Option<Self> {
        let digits: [u8; N] = s.try_into().ok()?;
        // Without early exits, so the compiler checks the digits side by side.
        let (hex, nonzero) = digits.iter().fold((true, false), |(hex, nonzero), &b| {
            let digit = b.wrapping_sub(b'0') < 10 || b.wrapping_sub(b'a') < 6;
            (hex & digit, nonzero | (b != b'0'))
        });
        (hex && nonzero).then_some(Self(digits))
    }

    /// A new random id.
    fn random() -> Self {
        let mut bytes: [u8; 32] = rand::random();
        let bytes = &mut bytes[..N / 2];
        if bytes.iter().all(|&b| b == 0) {
            bytes[0] = 1;
        }
        let mut out = [0u8; N];
        hex_into(bytes, &mut out);
        Self(out)
    }

    pub fn as_str(&self) -> &str {
        ascii(&self.0)
    }

    fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl<const N: usize> std::fmt::Display for Hex<N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl<const N: usize> std::fmt::Debug for Hex<N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

impl<const N: usize> PartialEq<&str> for Hex<N> {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// A trace id of either B3 width, as 128 bits: a 64-bit id is padded on the left with
/// zeros, as Zipkin does.
fn trace_id_128(t: &[u8]) -> Option<Hex<32>> {
    match t.len() {
        16 => Hex::<16>::parse(t).map(|short| {
            let mut wide = [b'0'; 32];
            wide[16..].copy_from_slice(short.as_bytes());
            Hex(wide)
        }),
        _ => Hex::parse(t),
    }
}

/// A header value of `parts` end to end (at most 128 bytes: the longest is single-header B3).
fn value(parts: &[&[u8]]) -> HeaderValue {
    let mut buf = [0u8; 128];
    let mut len = 0;
    for part in parts {
        buf[len..len + part.len()].copy_from_slice(part);
        len += part.len();
    }
    unique(HeaderValue::from_bytes(&buf[..len]).expect("hex and dashes are header text"))
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
    match headers.get_mut(REQUEST_ID) {
        // One the caller made is as new on every request as ours: never indexed either, or
        // each would take a place in the HPACK tables of the hop and evict what repeats.
        Some(given) => given.set_sensitive(true),
        None => {
            headers.insert(REQUEST_ID, uuid_v4());
        }
    }
}

/// The trace, parent span and flags of a valid W3C `traceparent` (version 00's layout; a
/// later version's extra fields are dropped, as the spec allows).
fn w3c_parent(traceparent: &[u8]) -> Option<(Hex<32>, Hex<16>, [u8; 2])> {
    let mut parts = traceparent.trim_ascii().split(|&b| b == b'-');
    let (version, trace, parent, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let valid = version.len() == 2
        && version.iter().all(u8::is_ascii_hexdigit)
        && version != b"ff"
        && (version != b"00" || parts.next().is_none())
        && flags.iter().all(u8::is_ascii_hexdigit);
    let flags: [u8; 2] = flags.try_into().ok()?;
    valid.then_some((Hex::parse(trace)?, Hex::parse(parent)?, flags))
}

/// `traceparent` with `span` for its parent id.
fn w3c_child(trace: Hex<32>, span: Hex<16>, flags: [u8; 2]) -> HeaderValue {
    value(&[b"00-", trace.as_bytes(), b"-", span.as_bytes(), b"-", &flags])
}

/// What a single-header `b3` says.
enum B3Single {
    /// Only a sampling decision (`0`, `1`, `d`): passed on as it is.
    Sampling,
    /// A context: its trace (as 128 bits) and span, and the header that makes `span` this
    /// hop's span with the caller's as its parent.
    Context(Hex<32>, Hex<16>, HeaderValue),
}

/// Reads single-header B3 (`{trace}-{span}[-{sampling}[-{parent}]]`) and makes this hop's
/// `span` the child of its span; None for a value that is not B3.
fn b3_child(b3: &[u8], span: Hex<16>) -> Option<B3Single> {
    let mut parts = b3.trim_ascii().split(|&b| b == b'-');
    let trace = parts.next()?;
    let Some(parent) = parts.next() else {
        return matches!(trace, b"0" | b"1" | b"d").then_some(B3Single::Sampling);
    };
    let (wide, parent) = (trace_id_128(trace)?, Hex::<16>::parse(parent)?);
    let header = match parts.next() {
        Some(sampling @ (b"0" | b"1" | b"d")) => {
            value(&[trace, b"-", span.as_bytes(), b"-", sampling, b"-", parent.as_bytes()])
        }
        Some(_) => return None,
        None => value(&[trace, b"-", span.as_bytes(), b"-", parent.as_bytes()]),
    };
    Some(B3Single::Context(wide, parent, header))
}

/// This hop's span: what a tracer is told of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    /// A 64-bit B3 trace id is padded on the left, as Zipkin does.
    pub trace_id: Hex<32>,
    pub span_id: Hex<16>,
    /// The caller's span, None for a trace started here.
    pub parent_id: Option<Hex<16>>,
}

/// Makes this hop's span a child of the caller's in every format the request carries, or
/// starts a trace when it carries none; returns the span. Where formats disagree, W3C's
/// context names the parent, then B3's. Ids are read from and written into the header bytes
/// in place: no header is copied into a string.
fn child_span(headers: &mut HeaderMap) -> Span {
    let span = Hex::<16>::random();
    // (trace, parent) of the first format that carried a context.
    let mut context: Option<(Hex<32>, Option<Hex<16>>)> = None;
    if let Some(tp) = headers.get(TRACEPARENT) {
        match w3c_parent(tp.as_bytes()) {
            Some((trace, parent, flags)) => {
                context = Some((trace, Some(parent)));
                headers.insert(TRACEPARENT, w3c_child(trace, span, flags));
            }
            // An invalid traceparent makes its tracestate meaningless too (W3C §4.3).
            None => {
                headers.remove(TRACEPARENT);
                headers.remove(TRACESTATE);
            }
        }
    }
    if let Some(trace) = headers.get(B3_TRACE_ID).and_then(|t| trace_id_128(t.as_bytes())) {
        let parent = headers.get(B3_SPAN_ID).and_then(|s| Hex::<16>::parse(s.as_bytes()));
        match parent {
            Some(parent) => headers.insert(B3_PARENT_SPAN_ID, value(&[parent.as_bytes()])),
            None => headers.remove(B3_PARENT_SPAN_ID),
        };
        headers.insert(B3_SPAN_ID, value(&[span.as_bytes()]));
        context.get_or_insert((trace, parent));
    }
    if let Some(b3) = headers.get(B3) {
        match b3_child(b3.as_bytes(), span) {
            Some(B3Single::Sampling) => {}
            Some(B3Single::Context(trace, parent, child)) => {
                context.get_or_insert((trace, Some(parent)));
                headers.insert(B3, child);
            }
            None => {
                headers.remove(B3);
            }
        }
    }
    let (trace_id, parent_id) = context.unwrap_or_else(|| {
        let trace = Hex::<32>::random();
        // Sampling was decided upstream if anywhere; a new trace is sampled, as Envoy's
        // default of 100% (Istio lowers it in its mesh config, which we do not read).
        headers.insert(TRACEPARENT, w3c_child(trace, span, *b"01"));
        headers.insert(B3_TRACE_ID, value(&[trace.as_bytes()]));
        headers.insert(B3_SPAN_ID, value(&[span.as_bytes()]));
        headers.remove(B3_PARENT_SPAN_ID);
        if !headers.contains_key(B3_SAMPLED) {
            headers.insert(B3_SAMPLED, HeaderValue::from_static("1"));
        }
        (trace, None)
    });
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
    fn ids_made_here_are_never_indexed_unless_a_pool_asks() {
        let mut h = HeaderMap::new();
        h.insert("x-app", HeaderValue::from_static("v"));
        hop(&mut h, true);
        let ids = ["x-request-id", "traceparent", "x-b3-traceid", "x-b3-spanid"];
        assert!(ids.iter().all(|n| h[*n].is_sensitive()), "{h:?}");
        index_id_names(&mut h);
        assert!(ids.iter().all(|n| !h[*n].is_sensitive()), "{h:?}");
        assert_eq!(h["x-app"], "v");
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
        assert!(h[REQUEST_ID].is_sensitive(), "a given id is not indexed either");
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
        assert_eq!(span.parent_id.as_ref().map(Hex::as_str), Some("00f067aa0ba902b7"));
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
        assert_eq!(span.parent_id.as_ref().map(Hex::as_str), Some("00f067aa0ba902b7"));
        assert_eq!(span.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        let tp: Vec<&str> = get(&h, "traceparent").split('-').collect();
        assert_eq!(tp[2], span.span_id.as_str());
        assert_eq!((tp[0], tp[1], tp[3]), ("00", "4bf92f3577b34da6a3ce929d0e0e4736", "01"));
        assert!(Hex::<16>::parse(tp[2].as_bytes()).is_some() && tp[2] != "00f067aa0ba902b7");
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
        assert_eq!(returned.span_id.as_str(), span);
        assert_eq!(returned.parent_id.as_ref().map(Hex::as_str), Some("e457b5a2e4d86bd1"));
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
        assert_eq!(span.parent_id.as_ref().map(Hex::as_str), Some("00f067aa0ba902b7"));
        assert_eq!(
            get(&h, "b3"),
            format!("a3ce929d0e0e4736-{}-1-00f067aa0ba902b7", span.span_id)
        );
    }

    #[test]
    fn a_b3_header_that_is_not_b3_is_dropped_and_the_hop_starts_a_trace() {
        for bad in [
            "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-yes",
            "80f198ee56343ba864fe8b2a57d3eff7-E457B5A2E4D86BD1-1",
            "80f198ee56343ba8-0000000000000000",
            "80f198ee56343ba864fe8b2a57d3eff-e457b5a2e4d86bd1",
            "2",
        ] {
            let mut h = HeaderMap::new();
            h.insert(B3, HeaderValue::from_static(bad));
            let span = child_span(&mut h);
            assert_eq!(span.parent_id, None, "{bad}");
            assert!(!h.contains_key(B3), "{bad}: {h:?}");
            assert_eq!(get(&h, "x-b3-traceid"), span.trace_id.as_str(), "{bad}");
        }
    }

    proptest::proptest! {
        #[test]
        fn any_valid_traceparent_keeps_its_trace_and_flags(trace in "[0-9a-f]{31}[1-9a-f]", parent in "[0-9a-f]{15}[1-9a-f]", flags in "[0-9a-f]{2}") {
            let (t, p, f) = w3c_parent(format!("00-{trace}-{parent}-{flags}").as_bytes()).unwrap();
            proptest::prop_assert_eq!((t.as_str(), p.as_str()), (trace.as_str(), parent.as_str()));
            let span = Hex::parse(b"0123456789abcdef").unwrap();
            let child = w3c_child(t, span, f);
            proptest::prop_assert_eq!(child.to_str().unwrap(), format!("00-{trace}-0123456789abcdef-{flags}"));
        }
    }
}
