//! Reads the SNI and ALPN of a TLS ClientHello without terminating TLS.
//!
//! The gateway (and the sidecar, for routes by the application's own SNI) reads a
//! new connection's first bytes into a buffer of at most `max_len` bytes with
//! [`read`], which calls [`parse`] after each read; `Ok(None)` means read more. The reader copes with records cut across reads at any byte, a
//! ClientHello spread over several handshake records (RFC 8446 §5.1 allows it,
//! and post-quantum key shares make hellos big enough that some stacks do it),
//! and extensions in any order.
//!
//! Every check runs as soon as the bytes it needs have arrived, in wire order,
//! so the answer for a prefix of the bytes is either `Ok(None)` or the answer
//! for the whole: plaintext is refused on its first byte and an oversized hello
//! on its length fields, and no later read can change a verdict. It never
//! panics, and allocates only the returned names plus, for a hello spread over
//! several records, one copy of the message, which `max_len` bounds.

/// Everything the gateway needs from a ClientHello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHello {
    /// The `server_name` extension's host_name entry, lowercased ASCII; None when absent.
    pub server_name: Option<String>,
    /// ALPN protocol names in the client's order; empty when the extension is absent.
    pub alpn: Vec<Vec<u8>>,
    /// Bytes of whole TLS records the ClientHello occupied on the wire; never
    /// more than `max_len`. Bytes after it belong to what the client sent next.
    pub wire_len: usize,
}

/// Why bytes cannot be a ClientHello we route. [`HelloError::reason`] gives the
/// metric label of the connection it closes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HelloError {
    /// The first record is not a TLS handshake record (plaintext HTTP, SSLv2, …).
    #[error("not TLS")]
    NotTls,
    /// A length or field that does not add up; the text says which.
    #[error("malformed ClientHello: {0}")]
    Malformed(&'static str),
    /// The ClientHello needs more wire bytes than the limit.
    #[error("ClientHello larger than the limit")]
    TooLarge,
}

impl HelloError {
    /// The metric reason label for a connection closed because of this error.
    pub fn reason(&self) -> &'static str {
        match self {
            HelloError::NotTls => "not_tls",
            HelloError::Malformed(_) => "malformed_hello",
            HelloError::TooLarge => "oversize_hello",
        }
    }
}

/// Why [`read`] got no ClientHello off a connection.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The connection closed before the bytes made a verdict.
    #[error("closed before a whole ClientHello")]
    Closed,
    /// Reading failed.
    #[error("read: {0}")]
    Io(std::io::Error),
    /// The bytes are not a ClientHello we route.
    #[error(transparent)]
    Hello(HelloError),
}

/// Reads a connection's first bytes into `buf` until they hold a whole ClientHello (of at
/// most `max_len` wire bytes), or plainly cannot. Nothing is consumed from the caller's
/// point of view: every byte read stays in `buf`, to go upstream first. The buffer grows
/// only while a valid hello may still fit. Callers bound the wait themselves.
pub async fn read(s: &tokio::net::TcpStream, buf: &mut Vec<u8>, max_len: usize) -> Result<ClientHello, ReadError> {
    loop {
        s.readable().await.map_err(ReadError::Io)?;
        if buf.len() == buf.capacity() {
            // The parser refuses a hello longer than `max_len` before it is all here, so
            // growing by the capacity (up to the limit) keeps reads few and memory bounded.
            let more = buf.capacity().min(max_len.saturating_sub(buf.capacity())).max(1);
            buf.reserve_exact(more);
        }
        match s.try_read_buf(buf) {
            Ok(0) => return Err(ReadError::Closed),
            // A short read emptied the socket: the next wait for bytes sleeps instead of
            // failing with EAGAIN (on current-thread runtimes, see `splice::mark_drained`).
            Ok(_) if buf.len() < buf.capacity() => crate::splice::mark_drained(s),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(ReadError::Io(e)),
        }
        match parse(buf, max_len) {
            Ok(Some(hello)) => return Ok(hello),
            Ok(None) if buf.len() >= max_len => return Err(ReadError::Hello(HelloError::TooLarge)),
            Ok(None) => {}
            Err(e) => return Err(ReadError::Hello(e)),
        }
    }
}

const CONTENT_HANDSHAKE: u8 = 22;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const RECORD_HEADER: usize = 5;
const HANDSHAKE_HEADER: usize = 4;
/// RFC 8446 §5.1: a plaintext record carries at most 2^14 bytes.
const MAX_RECORD: usize = 1 << 14;
const EXT_SERVER_NAME: u16 = 0;
const EXT_ALPN: u16 = 16;

/// Parses what has been read so far.
///
/// `Ok(None)`: incomplete, read more. `max_len` bounds the wire bytes (whole
/// records) the ClientHello may take; as soon as `buf` proves the message
/// cannot fit, `TooLarge` is returned, before the rest arrives. A non-empty
/// `buf` of `max_len` bytes or more always gets a verdict, so a read buffer of
/// `max_len` bytes suffices. Bytes after the ClientHello are ignored.
pub fn parse(buf: &[u8], max_len: usize) -> Result<Option<ClientHello>, HelloError> {
    // Refuse what is not TLS on its first byte, so plaintext is closed at once
    // rather than after a read timeout.
    match buf.first() {
        None => return Ok(None),
        Some(&t) if t != CONTENT_HANDSHAKE => return Err(HelloError::NotTls),
        Some(_) => {}
    }

    let mut off: usize = 0; // where the current record starts
    let mut header = [0u8; HANDSHAKE_HEADER];
    let mut have: usize = 0; // handshake message bytes in the records before `off`, header included
    let mut total = None; // the message's length, header included, once its header is in
    // Only a message spread over records is copied; one record is borrowed.
    let mut joined: Vec<u8> = Vec::new();
    loop {
        // Still needed: this record's header and the rest of the message.
        let need = total.unwrap_or(HANDSHAKE_HEADER).saturating_sub(have);
        if off.saturating_add(RECORD_HEADER).saturating_add(need) > max_len {
            return Err(HelloError::TooLarge);
        }
        // Judge the record header byte by byte as it arrives. Only the first
        // record can be "not TLS"; a bad later one makes a broken hello.
        let rec = buf.get(off..).unwrap_or_default();
        let rec = &rec[..rec.len().min(RECORD_HEADER)];
        let refuse = |what| {
            if off == 0 {
                HelloError::NotTls
            } else {
                HelloError::Malformed(what)
            }
        };
        if rec.first().is_some_and(|&t| t != CONTENT_HANDSHAKE) {
            return Err(refuse("a non-handshake record inside the ClientHello"));
        }
        // Legacy record versions 0x0300 (SSL 3.0) to 0x0304.
        if rec.get(1).is_some_and(|&major| major != 3) || rec.get(2).is_some_and(|&minor| minor > 4) {
            return Err(refuse("record version is not TLS"));
        }
        let &[_, _, _, len_hi, len_lo] = rec else {
            return Ok(None);
        };
        let len = usize::from(u16::from_be_bytes([len_hi, len_lo]));
        if len == 0 {
            return Err(HelloError::Malformed("empty handshake record"));
        }
        if len > MAX_RECORD {
            return Err(HelloError::Malformed("record longer than 2^14 bytes"));
        }
        let end = off + RECORD_HEADER + len;
        if end > max_len {
            return Err(HelloError::TooLarge);
        }
        let start = off + RECORD_HEADER;
        // What has arrived of this record; its checks need not wait for the rest.
        let arrived = buf.get(start..end.min(buf.len())).unwrap_or_default();

        // The handshake header may itself be cut across records.
        let from_header = (HANDSHAKE_HEADER.saturating_sub(have)).min(arrived.len());
        for (i, &b) in arrived[..from_header].iter().enumerate() {
            header[have + i] = b;
        }
        let seen = have + from_header;
        if seen >= 1 && header[0] != HANDSHAKE_CLIENT_HELLO {
            return Err(HelloError::Malformed("first handshake message is not a ClientHello"));
        }
        if seen >= HANDSHAKE_HEADER {
            let body_len = usize::from(header[1]) << 16 | usize::from(header[2]) << 8 | usize::from(header[3]);
            let t = HANDSHAKE_HEADER + body_len;
            total = Some(t);
            // The message runs past this record: at least one more record header.
            let beyond = t.saturating_sub(have + len);
            if beyond > 0 && end + RECORD_HEADER + beyond > max_len {
                return Err(HelloError::TooLarge);
            }
        }
        if arrived.len() < len {
            // A hello is only complete with its whole last record, so wire_len
            // never points past what has been read.
            return Ok(None);
        }

        let in_record = HANDSHAKE_HEADER.saturating_sub(have).min(len);
        let rest = &arrived[in_record..];
        let prev = have;
        have += len;
        let Some(t) = total else {
            off = end;
            continue;
        };
        // Body bytes still missing when this record began.
        let want = t.saturating_sub(prev.max(HANDSHAKE_HEADER));
        if want <= rest.len() {
            // Bytes after the message in its last record (a coalesced next
            // message) are the TLS stack's business, not ours.
            let tail = &rest[..want];
            let body = if joined.is_empty() {
                tail
            } else {
                joined.extend_from_slice(tail);
                &joined
            };
            let mut hello = parse_body(body)?;
            hello.wire_len = end;
            return Ok(Some(hello));
        }
        if joined.is_empty() {
            // Bounded: the checks above keep the whole message under max_len.
            joined.reserve_exact(t - HANDSHAKE_HEADER);
        }
        joined.extend_from_slice(rest);
        off = end;
    }
}

/// A cursor over bytes whose every read is bounds-checked; `what` names the
/// field in the error, so a metric's sample log says what was wrong.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], HelloError> {
        let Some((head, tail)) = self.0.split_at_checked(n) else {
            return Err(HelloError::Malformed(what));
        };
        self.0 = tail;
        Ok(head)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, HelloError> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, HelloError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    /// A vector with a one-byte length prefix.
    fn vec8(&mut self, what: &'static str) -> Result<&'a [u8], HelloError> {
        let n = self.u8(what)?;
        self.take(usize::from(n), what)
    }

    /// A vector with a two-byte length prefix.
    fn vec16(&mut self, what: &'static str) -> Result<&'a [u8], HelloError> {
        let n = self.u16(what)?;
        self.take(usize::from(n), what)
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Parses a ClientHello body (RFC 8446 §4.1.2; RFC 5246 §7.4.1.2 for TLS 1.2).
fn parse_body(body: &[u8]) -> Result<ClientHello, HelloError> {
    let mut r = Reader(body);
    r.take(2, "legacy_version")?;
    r.take(32, "random")?;
    if r.vec8("legacy_session_id")?.len() > 32 {
        return Err(HelloError::Malformed("legacy_session_id longer than 32 bytes"));
    }
    let suites = r.vec16("cipher_suites")?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return Err(HelloError::Malformed("cipher_suites empty or odd"));
    }
    if r.vec8("legacy_compression_methods")?.is_empty() {
        return Err(HelloError::Malformed("legacy_compression_methods empty"));
    }
    let mut hello = ClientHello {
        server_name: None,
        alpn: Vec::new(),
        wire_len: 0,
    };
    if r.is_empty() {
        return Ok(hello); // a TLS 1.2 hello may have no extensions block at all
    }
    let mut exts = Reader(r.vec16("extensions")?);
    if !r.is_empty() {
        return Err(HelloError::Malformed("bytes after the extensions"));
    }
    // RFC 8446 §4.2: no extension type twice. A bit per type, on the stack:
    // 8 KiB zeroed once per connection, linear however many extensions come.
    let mut seen = [0u64; 1024];
    while !exts.is_empty() {
        let ty = exts.u16("extension type")?;
        let data = exts.vec16("extension data")?;
        let (word, bit) = (usize::from(ty / 64), ty % 64);
        if seen[word] & (1 << bit) != 0 {
            return Err(HelloError::Malformed("an extension appears twice"));
        }
        seen[word] |= 1 << bit;
        match ty {
            EXT_SERVER_NAME => hello.server_name = parse_server_name(data)?,
            EXT_ALPN => hello.alpn = parse_alpn(data)?,
            _ => {}
        }
    }
    Ok(hello)
}

/// RFC 6066 §3: a non-empty list of (type, name); the host_name entry (type 0)
/// is ours, and there may be only one.
fn parse_server_name(data: &[u8]) -> Result<Option<String>, HelloError> {
    let mut r = Reader(data);
    let mut list = Reader(r.vec16("server_name_list")?);
    if !r.is_empty() {
        return Err(HelloError::Malformed("bytes after server_name_list"));
    }
    if list.is_empty() {
        return Err(HelloError::Malformed("server_name_list empty"));
    }
    let mut host = None;
    while !list.is_empty() {
        let name_type = list.u8("server name type")?;
        let name = list.vec16("server name")?;
        if name_type != 0 {
            continue; // no other type is defined; a future one is not ours to judge
        }
        if host.is_some() {
            return Err(HelloError::Malformed("two host_name entries"));
        }
        // Printable ASCII without space: a DNS name never has one, and a space
        // or control byte would otherwise reach logs and route lookups.
        if name.is_empty() || !name.iter().all(u8::is_ascii_graphic) {
            return Err(HelloError::Malformed("host_name empty or not printable ASCII"));
        }
        host = Some(name.iter().map(|&b| char::from(b.to_ascii_lowercase())).collect());
    }
    Ok(host)
}

/// RFC 7301 §3.1: a non-empty list of protocol names of 1..=255 bytes.
fn parse_alpn(data: &[u8]) -> Result<Vec<Vec<u8>>, HelloError> {
    let mut r = Reader(data);
    let mut list = Reader(r.vec16("protocol_name_list")?);
    if !r.is_empty() {
        return Err(HelloError::Malformed("bytes after protocol_name_list"));
    }
    if list.is_empty() {
        return Err(HelloError::Malformed("protocol_name_list empty"));
    }
    let mut out = Vec::new();
    while !list.is_empty() {
        let p = list.vec8("protocol name")?;
        if p.is_empty() {
            return Err(HelloError::Malformed("empty protocol name"));
        }
        out.push(p.to_vec());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ISTIO: &str = "outbound_.9080_._.reviews.default.svc.cluster.local";

    /// The fields of a ClientHello body, each as raw bytes so a test can break one.
    struct Body {
        session_id: Vec<u8>,
        suites: Vec<u8>,
        compression: Vec<u8>,
        /// The extensions block's content; None leaves the block out (TLS 1.2).
        exts: Option<Vec<u8>>,
    }

    impl Body {
        fn with(exts: &[(u16, Vec<u8>)]) -> Self {
            Body {
                session_id: vec![9; 32],
                suites: vec![0x13, 0x01, 0x13, 0x02],
                compression: vec![0],
                exts: Some(ext_block(exts)),
            }
        }

        fn bytes(&self) -> Vec<u8> {
            let mut b = vec![3, 3];
            b.extend([7u8; 32]);
            b.push(self.session_id.len() as u8);
            b.extend(&self.session_id);
            b.extend((self.suites.len() as u16).to_be_bytes());
            b.extend(&self.suites);
            b.push(self.compression.len() as u8);
            b.extend(&self.compression);
            if let Some(e) = &self.exts {
                b.extend((e.len() as u16).to_be_bytes());
                b.extend(e);
            }
            b
        }

        /// The hello in one record.
        fn wire(&self) -> Vec<u8> {
            records(&message(&self.bytes()), MAX_RECORD)
        }
    }

    fn ext_block(exts: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut e = Vec::new();
        for (t, d) in exts {
            e.extend(t.to_be_bytes());
            e.extend((d.len() as u16).to_be_bytes());
            e.extend(d);
        }
        e
    }

    fn prefixed16(inner: &[u8]) -> Vec<u8> {
        let mut d = (inner.len() as u16).to_be_bytes().to_vec();
        d.extend(inner);
        d
    }

    /// A server_name extension with the given (name type, name) entries.
    fn sni_entries(entries: &[(u8, &[u8])]) -> (u16, Vec<u8>) {
        let mut list = Vec::new();
        for (ty, name) in entries {
            list.push(*ty);
            list.extend(prefixed16(name));
        }
        (EXT_SERVER_NAME, prefixed16(&list))
    }

    fn sni(name: &str) -> (u16, Vec<u8>) {
        sni_entries(&[(0, name.as_bytes())])
    }

    fn alpn(protos: &[&[u8]]) -> (u16, Vec<u8>) {
        let mut l = Vec::new();
        for p in protos {
            l.push(p.len() as u8);
            l.extend(*p);
        }
        (EXT_ALPN, prefixed16(&l))
    }

    /// A handshake message of type client_hello around `body`.
    fn message(body: &[u8]) -> Vec<u8> {
        let mut msg = vec![HANDSHAKE_CLIENT_HELLO];
        msg.extend(&(body.len() as u32).to_be_bytes()[1..]);
        msg.extend(body);
        msg
    }

    /// `bytes` in handshake records of at most `chunk` bytes each.
    fn records(bytes: &[u8], chunk: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for c in bytes.chunks(chunk) {
            out.extend(record(CONTENT_HANDSHAKE, [3, 1], c));
        }
        out
    }

    fn record(content_type: u8, version: [u8; 2], payload: &[u8]) -> Vec<u8> {
        let mut out = vec![content_type, version[0], version[1]];
        out.extend((payload.len() as u16).to_be_bytes());
        out.extend(payload);
        out
    }

    const BIG: usize = 1 << 20;

    #[test]
    fn reads_istio_sni_and_alpn_in_any_order() {
        let peer: &[&[u8]] = &[b"istio-peer-exchange", b"istio"];
        for exts in [
            vec![sni(ISTIO), alpn(peer)],
            vec![
                (43, vec![2, 3, 4]),
                alpn(peer),
                (0x0a0a, vec![]), // GREASE
                sni("OUTBOUND_.9080_._.Reviews.default.svc.cluster.local"),
            ],
        ] {
            let wire = Body::with(&exts).wire();
            let h = parse(&wire, 4096).unwrap().unwrap();
            assert_eq!(h.server_name.as_deref(), Some(ISTIO));
            assert_eq!(h.alpn, [b"istio-peer-exchange".to_vec(), b"istio".to_vec()]);
            assert_eq!(h.wire_len, wire.len());
        }
    }

    #[test]
    fn what_it_tolerates() {
        let read = |wire: &[u8]| parse(wire, BIG).unwrap().unwrap();
        // No server_name; and TLS 1.2 without an extensions block at all.
        let h = read(&Body::with(&[alpn(&[b"h2"])]).wire());
        assert_eq!((h.server_name, h.alpn), (None, vec![b"h2".to_vec()]));
        let h = read(
            &Body {
                exts: None,
                ..Body::with(&[])
            }
            .wire(),
        );
        assert_eq!((h.server_name, h.alpn.len()), (None, 0));
        // Name types other than host_name are skipped, before or after it.
        let h = read(&Body::with(&[sni_entries(&[(7, b""), (0, b"a.b"), (255, b"\0")])]).wire());
        assert_eq!(h.server_name.as_deref(), Some("a.b"));
        let h = read(&Body::with(&[sni_entries(&[(1, b"x")])]).wire());
        assert_eq!(h.server_name, None);
        // Every legacy record version from SSL 3.0 to TLS 1.3.
        let msg = message(&Body::with(&[sni("a.b")]).bytes());
        for minor in 0..=4 {
            assert!(
                parse(&record(CONTENT_HANDSHAKE, [3, minor], &msg), BIG)
                    .unwrap()
                    .is_some()
            );
        }
        // A handshake message coalesced after the hello in its last record,
        // and an application data record after that: both someone else's.
        let mut coalesced = msg.clone();
        coalesced.extend([20, 0, 0, 1, 0]);
        let mut wire = records(&coalesced, 100);
        let wire_len = wire.len();
        wire.extend(record(23, [3, 3], b"early"));
        let h = read(&wire);
        assert_eq!((h.server_name.as_deref(), h.wire_len), (Some("a.b"), wire_len));
    }

    #[test]
    fn every_prefix_asks_for_more() {
        let msg = message(&Body::with(&[sni(ISTIO), alpn(&[b"istio"])]).bytes());
        // A message coalesced after the hello: when they share a record, the
        // hello is whole before its record is, and the reader waits for the record.
        let coalesced = [&msg[..], &[20, 0, 0, 1, 0]].concat();
        for chunk in [1, 2, 3, 4, 5, 40, MAX_RECORD] {
            for bytes in [&msg, &coalesced] {
                let wire = records(bytes, chunk);
                let hello_records = msg.len().div_ceil(chunk);
                let wire_len = hello_records * RECORD_HEADER + bytes.len().min(hello_records * chunk);
                for cut in 0..wire_len {
                    assert_eq!(parse(&wire[..cut], BIG), Ok(None), "chunk {chunk} cut {cut}");
                }
                let h = parse(&wire, BIG).unwrap().unwrap();
                assert_eq!((h.server_name.as_deref(), h.wire_len), (Some(ISTIO), wire_len));
                for cut in wire_len..=wire.len() {
                    assert_eq!(parse(&wire[..cut], BIG), Ok(Some(h.clone())), "chunk {chunk} cut {cut}");
                }
                // Just big enough is big enough.
                assert_eq!(parse(&wire, wire_len), Ok(Some(h)));
            }
        }
    }

    #[test]
    fn refuses_what_is_not_tls_at_the_first_byte() {
        for wire in not_tls_cases() {
            assert_eq!(parse(wire, 4096), Err(HelloError::NotTls), "{wire:?}");
        }
        // Whatever the limit, plaintext is told by its first byte.
        assert_eq!(parse(b"G", 0), Err(HelloError::NotTls));
        // A limit too small for any hello is known before the second byte.
        assert_eq!(parse(&[22, 2], 8), Err(HelloError::TooLarge));
        assert_eq!(parse(&[], 4096), Ok(None));
        assert_eq!(parse(&[22], 4096), Ok(None));
        assert_eq!(parse(&[22, 3, 3], 4096), Ok(None));
        assert_eq!(HelloError::NotTls.reason(), "not_tls");
    }

    fn not_tls_cases() -> [&'static [u8]; 11] {
        [
            b"G",
            b"GET / HTTP/1.1\r\nHost: reviews\r\n\r\n",
            b"PRI * HTTP/2.0\r\n",
            b"SSH-2.0-OpenSSH_9.6\r\n",
            &[0x80, 0x2e, 0x01, 0x03, 0x01], // SSLv2-compatible ClientHello
            &[0x80],
            &[21, 3, 3, 0, 2, 2, 40], // an alert
            &[23, 3, 3, 0, 1, 0],     // application data
            &[22, 2],                 // not major version 3
            &[22, 3, 5],
            &[22, 0x7f, 0x12], // a draft version, not a legacy record version
        ]
    }

    /// Hellos that must be refused as malformed, with the field they get wrong.
    fn malformed_cases() -> Vec<(Vec<u8>, &'static str)> {
        let good = Body::with(&[sni(ISTIO)]);
        let msg = message(&good.bytes());
        let mut cases = vec![
            (vec![22, 3, 1, 0, 0], "empty handshake record"),
            (vec![22, 3, 1, 0x40, 0x01], "record longer than 2^14 bytes"),
            (
                record(22, [3, 3], &[2, 0, 0, 0]),
                "first handshake message is not a ClientHello",
            ),
            (
                record(22, [3, 3], &[20]),
                "first handshake message is not a ClientHello",
            ),
            (record(22, [3, 3], &message(&[])), "legacy_version"),
            (record(22, [3, 3], &message(&[3, 3, 1])), "random"),
            (
                Body {
                    session_id: vec![0; 33],
                    ..Body::with(&[])
                }
                .wire(),
                "legacy_session_id longer than 32 bytes",
            ),
            (
                Body {
                    suites: vec![],
                    ..Body::with(&[])
                }
                .wire(),
                "cipher_suites empty or odd",
            ),
            (
                Body {
                    suites: vec![0x13, 0x01, 0x13],
                    ..Body::with(&[])
                }
                .wire(),
                "cipher_suites empty or odd",
            ),
            (
                Body {
                    compression: vec![],
                    ..Body::with(&[])
                }
                .wire(),
                "legacy_compression_methods empty",
            ),
            (
                Body::with(&[sni(ISTIO), sni(ISTIO)]).wire(),
                "an extension appears twice",
            ),
            (
                Body::with(&[(0xfe0d, vec![]), sni("a"), (0xfe0d, vec![1])]).wire(),
                "an extension appears twice",
            ),
            (Body::with(&[(EXT_SERVER_NAME, vec![])]).wire(), "server_name_list"),
            (Body::with(&[sni_entries(&[])]).wire(), "server_name_list empty"),
            (Body::with(&[sni("")]).wire(), "host_name empty or not printable ASCII"),
            (
                Body::with(&[sni("a\0b")]).wire(),
                "host_name empty or not printable ASCII",
            ),
            (
                Body::with(&[sni("a b")]).wire(),
                "host_name empty or not printable ASCII",
            ),
            (
                Body::with(&[sni("a\x7fb")]).wire(),
                "host_name empty or not printable ASCII",
            ),
            (
                Body::with(&[sni("r\u{e9}views")]).wire(),
                "host_name empty or not printable ASCII",
            ),
            (
                Body::with(&[sni_entries(&[(0, b"a"), (0, b"b")])]).wire(),
                "two host_name entries",
            ),
            (
                Body::with(&[(EXT_SERVER_NAME, vec![0, 3, 0, 0, 1])]).wire(),
                "server name",
            ),
            (
                Body::with(&[(EXT_SERVER_NAME, [prefixed16(&[0, 0, 1, b'a']), vec![0]].concat())]).wire(),
                "bytes after server_name_list",
            ),
            (Body::with(&[alpn(&[])]).wire(), "protocol_name_list empty"),
            (Body::with(&[alpn(&[b"h2", b""])]).wire(), "empty protocol name"),
            (
                Body::with(&[(EXT_ALPN, vec![0, 3, 5, b'h', b'2'])]).wire(),
                "protocol name",
            ),
            (
                Body::with(&[(EXT_ALPN, [prefixed16(&[2, b'h', b'2']), vec![0]].concat())]).wire(),
                "bytes after protocol_name_list",
            ),
        ];

        // The extensions block longer, then shorter, than what follows it.
        let mut b = good.bytes();
        let at = b.len() - good.exts.as_ref().unwrap().len() - 2;
        b[at + 1] += 1;
        cases.push((record(22, [3, 3], &message(&b)), "extensions"));
        b[at + 1] -= 2;
        cases.push((record(22, [3, 3], &message(&b)), "bytes after the extensions"));
        // The message claims fewer bytes than its own fields take.
        let mut short = msg.clone();
        short[3] -= 1;
        cases.push((record(22, [3, 3], &short), "extensions"));
        // A later record that is not a handshake record, or not TLS.
        let mut mixed = records(&msg, 30);
        mixed[35] = 23;
        cases.push((mixed, "a non-handshake record inside the ClientHello"));
        let mut old = records(&msg, 30);
        old[36] = 2;
        cases.push((old, "record version is not TLS"));
        let mut empty_later = records(&msg[..30], 30);
        empty_later.extend([22, 3, 3, 0, 0]);
        cases.push((empty_later, "empty handshake record"));
        cases
    }

    #[test]
    fn refuses_malformed_hellos_and_says_which_field() {
        for (wire, what) in malformed_cases() {
            assert_eq!(parse(&wire, BIG), Err(HelloError::Malformed(what)), "{what}: {wire:?}");
        }
        assert_eq!(HelloError::Malformed("x").reason(), "malformed_hello");
    }

    #[test]
    fn too_large_is_known_before_the_bytes_arrive() {
        let wire = Body::with(&[sni(ISTIO), (0xfafa, vec![0; 3000])]).wire();
        // The record header alone proves it.
        assert_eq!(parse(&wire[..5], 1024), Err(HelloError::TooLarge));
        assert_eq!(parse(&wire[..4], 1024), Ok(None));
        assert!(parse(&wire, 4096).unwrap().is_some());
        assert_eq!(parse(&wire, wire.len() - 1), Err(HelloError::TooLarge));

        // In small records, the handshake header proves it: the message needs
        // more records than the limit leaves room for.
        let msg = message(&Body::with(&[sni(ISTIO), (0xfafa, vec![0; 3000])]).bytes());
        let split = records(&msg, 1000);
        assert_eq!(parse(&split[..9], 2000), Err(HelloError::TooLarge));
        assert_eq!(parse(&split[..8], 2000), Ok(None));
        // Even when the handshake header is itself cut across records.
        let tiny = records(&msg, 2);
        assert_eq!(parse(&tiny[..14], 3100), Err(HelloError::TooLarge));
        assert_eq!(parse(&tiny[..13], 3100), Ok(None));
        // Many tiny records: their headers alone run past the limit.
        let small = records(&message(&Body::with(&[sni(ISTIO)]).bytes()), 1);
        assert_eq!(parse(&small, 200), Err(HelloError::TooLarge));
        // Too small a limit for any record at all.
        assert_eq!(parse(&[22, 3, 1], 8), Err(HelloError::TooLarge));
        assert_eq!(HelloError::TooLarge.reason(), "oversize_hello");
    }

    /// Every hello these tests build: good, malformed and oversized.
    fn all_wires() -> Vec<Vec<u8>> {
        let msg = message(&Body::with(&[sni(ISTIO), alpn(&[b"h2"]), (0xfafa, vec![0; 1500])]).bytes());
        let mut wires: Vec<Vec<u8>> = malformed_cases().into_iter().map(|(w, _)| w).collect();
        wires.extend([1, 2, 3, 7, 700, MAX_RECORD].map(|chunk| records(&msg, chunk)));
        wires.push(records(&[&msg[..], &[20, 0, 0, 1, 0]].concat(), 1000));
        wires.extend(not_tls_cases().map(<[u8]>::to_vec));
        wires
    }

    #[test]
    fn a_prefix_reads_as_need_more_or_as_the_whole() {
        for wire in all_wires() {
            for max in [0, 8, 9, 64, 700, 1600, 1700, 4000, BIG] {
                let whole = parse(&wire, max);
                for cut in 0..wire.len() {
                    let part = parse(&wire[..cut], max);
                    assert!(
                        part == Ok(None) || part == whole,
                        "max {max} cut {cut}: {part:?} vs {whole:?}"
                    );
                    if let Ok(Some(h)) = &part {
                        assert!(h.wire_len <= cut, "max {max} cut {cut}: {h:?}");
                    }
                    // A buffer of max_len bytes always gets a verdict.
                    if cut >= max && cut > 0 {
                        assert_ne!(part, Ok(None), "max {max} cut {cut}");
                    }
                }
            }
        }
    }
}
