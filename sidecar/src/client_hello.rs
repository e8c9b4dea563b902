//! Reads the SNI and ALPN of a TLS ClientHello without terminating TLS.
//!
//! The caller reads a new connection's first bytes into a bounded buffer and
//! calls [`parse`] after each read: `Ok(None)` means read more. The reader copes
//! with records split across reads at any byte, a ClientHello spread over several
//! handshake records (RFC 8446 §5.1 allows it, and post-quantum key shares make
//! hellos big enough that some stacks do it), and extensions in any order. It
//! never panics and allocates at most the message itself, bounded by `max_len`.

/// Everything a router needs from a ClientHello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHello {
    /// The `server_name` extension's host name, lowercased; None when absent.
    pub server_name: Option<String>,
    /// ALPN protocol names in the client's order; empty when the extension is absent.
    pub alpn: Vec<Vec<u8>>,
    /// Bytes of whole TLS records the ClientHello took on the wire.
    pub wire_len: usize,
}

/// Why bytes are not a ClientHello that can be routed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HelloError {
    /// The first record is not a TLS handshake record (plaintext, SSLv2, …).
    #[error("not TLS")]
    NotTls,
    /// A length or field that does not add up; the text says which.
    #[error("malformed ClientHello: {0}")]
    Malformed(&'static str),
    /// The ClientHello needs more bytes than the limit.
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

const CONTENT_HANDSHAKE: u8 = 22;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const RECORD_HEADER: usize = 5;
const MAX_RECORD: usize = 1 << 14;
const EXT_SERVER_NAME: u16 = 0;
const EXT_ALPN: u16 = 16;

/// Parses what has been read so far: `Ok(None)` until a whole ClientHello is in
/// `buf`. `max_len` bounds the wire bytes the ClientHello may take; as soon as
/// `buf` proves it cannot fit, `TooLarge` is returned.
pub fn parse(buf: &[u8], max_len: usize) -> Result<Option<ClientHello>, HelloError> {
    // Refuse non-TLS on the very first bytes, so plaintext is closed at once.
    match buf {
        [] => return Ok(None),
        [t, ..] if *t != CONTENT_HANDSHAKE => return Err(HelloError::NotTls),
        [_, major, ..] if *major != 3 => return Err(HelloError::NotTls),
        [_, _, minor, ..] if *minor > 4 => return Err(HelloError::NotTls),
        _ => {}
    }

    // Walk the records, gathering handshake bytes until the message is whole.
    // The common case, one record holding it all, borrows instead of copying.
    let mut off = 0;
    let mut joined: Vec<u8> = Vec::new();
    let mut first: &[u8] = &[];
    loop {
        let Some(header) = buf.get(off..off + RECORD_HEADER) else {
            return incomplete(off + RECORD_HEADER, max_len);
        };
        if header[0] != CONTENT_HANDSHAKE {
            return Err(HelloError::Malformed("a non-handshake record inside the ClientHello"));
        }
        if header[1] != 3 || header[2] > 4 {
            return Err(HelloError::Malformed("record version is not TLS"));
        }
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
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
        let Some(fragment) = buf.get(off + RECORD_HEADER..end) else {
            return Ok(None);
        };
        if off == 0 {
            first = fragment;
        } else {
            if joined.is_empty() {
                joined.extend_from_slice(first);
            }
            joined.extend_from_slice(fragment);
        }
        off = end;
        let msg: &[u8] = if joined.is_empty() { first } else { &joined };

        if msg[0] != HANDSHAKE_CLIENT_HELLO {
            return Err(HelloError::Malformed("first handshake message is not a ClientHello"));
        }
        let Some(h) = msg.get(1..4) else { continue };
        let body_len = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
        // At least one record header plus the message: a lower bound of the wire size.
        if RECORD_HEADER + 4 + body_len > max_len {
            return Err(HelloError::TooLarge);
        }
        if let Some(body) = msg.get(4..4 + body_len) {
            // Bytes after the message in its last record (a coalesced next
            // message) are the TLS stack's business, not ours.
            let mut hello = parse_body(body)?;
            hello.wire_len = off;
            return Ok(Some(hello));
        }
    }
}

fn incomplete(need: usize, max_len: usize) -> Result<Option<ClientHello>, HelloError> {
    if need > max_len {
        Err(HelloError::TooLarge)
    } else {
        Ok(None)
    }
}

/// A cursor over bytes whose every read is bounds-checked.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], HelloError> {
        if n > self.0.len() {
            return Err(HelloError::Malformed(what));
        }
        let (head, tail) = self.0.split_at(n);
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
    let session_id = r.vec8("legacy_session_id")?;
    if session_id.len() > 32 {
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
        return Ok(hello); // a TLS 1.2 hello may have no extensions at all
    }
    let mut exts = Reader(r.vec16("extensions")?);
    if !r.is_empty() {
        return Err(HelloError::Malformed("bytes after the extensions"));
    }
    // RFC 8446 §4.2: no extension type twice. A bit per type, on the stack.
    let mut seen = [0u64; 1024];
    while !exts.is_empty() {
        let ty = exts.u16("extension type")?;
        let data = exts.vec16("extension data")?;
        let (word, bit) = (usize::from(ty) / 64, ty % 64);
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

/// RFC 6066 §3: a list of (type, name); the host_name entry (type 0) is ours.
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
            continue; // no other type is defined; skip rather than guess
        }
        if host.is_some() {
            return Err(HelloError::Malformed("two host_name entries"));
        }
        if name.is_empty() || !name.iter().all(|b| b.is_ascii_graphic()) {
            return Err(HelloError::Malformed("host_name empty or not printable ASCII"));
        }
        // Checked just above: every byte is ASCII.
        let s: String = name.iter().map(|b| char::from(b.to_ascii_lowercase())).collect();
        host = Some(s);
    }
    Ok(host)
}

/// RFC 7301 §3.1: a non-empty list of non-empty protocol names.
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

    /// A ClientHello body with the given extensions (type, data).
    fn body(exts: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut b = vec![3, 3];
        b.extend([7u8; 32]);
        b.push(0); // session id
        b.extend([0, 2, 0x13, 0x01]); // one suite
        b.extend([1, 0]); // null compression
        let mut e = Vec::new();
        for (t, d) in exts {
            e.extend(t.to_be_bytes());
            e.extend((d.len() as u16).to_be_bytes());
            e.extend(d);
        }
        b.extend((e.len() as u16).to_be_bytes());
        b.extend(e);
        b
    }

    fn sni(name: &str) -> (u16, Vec<u8>) {
        let mut entry = vec![0];
        entry.extend((name.len() as u16).to_be_bytes());
        entry.extend(name.as_bytes());
        let mut d = (entry.len() as u16).to_be_bytes().to_vec();
        d.extend(entry);
        (EXT_SERVER_NAME, d)
    }

    fn alpn(protos: &[&str]) -> (u16, Vec<u8>) {
        let mut l = Vec::new();
        for p in protos {
            l.push(p.len() as u8);
            l.extend(p.as_bytes());
        }
        let mut d = (l.len() as u16).to_be_bytes().to_vec();
        d.extend(l);
        (EXT_ALPN, d)
    }

    /// Wraps a body in a handshake header and records of at most `chunk` bytes.
    fn records(body: &[u8], chunk: usize) -> Vec<u8> {
        let mut msg = vec![HANDSHAKE_CLIENT_HELLO];
        msg.extend(&(body.len() as u32).to_be_bytes()[1..]);
        msg.extend(body);
        let mut out = Vec::new();
        for c in msg.chunks(chunk) {
            out.extend([CONTENT_HANDSHAKE, 3, 1]);
            out.extend((c.len() as u16).to_be_bytes());
            out.extend(c);
        }
        out
    }

    const ISTIO: &str = "outbound_.9080_._.reviews.default.svc.cluster.local";

    #[test]
    fn reads_istio_sni_and_alpn_in_any_order() {
        for exts in [
            vec![sni(ISTIO), alpn(&["istio-peer-exchange", "istio"])],
            vec![
                (43, vec![2, 3, 4]),
                alpn(&["istio-peer-exchange", "istio"]),
                sni("OUTBOUND_.9080_._.Reviews.default.svc.cluster.local"),
            ],
        ] {
            let wire = records(&body(&exts), 16384);
            let h = parse(&wire, 4096).unwrap().unwrap();
            assert_eq!(h.server_name.as_deref(), Some(ISTIO));
            assert_eq!(h.alpn, [b"istio-peer-exchange".to_vec(), b"istio".to_vec()]);
            assert_eq!(h.wire_len, wire.len());
        }
    }

    #[test]
    fn incomplete_at_every_split_and_across_records() {
        let b = body(&[sni(ISTIO), alpn(&["istio"])]);
        for chunk in [1, 3, 40, 16384] {
            let wire = records(&b, chunk);
            for cut in 0..wire.len() {
                assert_eq!(parse(&wire[..cut], 1 << 20), Ok(None), "chunk {chunk} cut {cut}");
            }
            let mut with_more = wire.clone();
            with_more.extend([23, 3, 3, 0, 1, 0]); // application data after it
            let h = parse(&with_more, 1 << 20).unwrap().unwrap();
            assert_eq!(h.server_name.as_deref(), Some(ISTIO));
            assert_eq!(h.wire_len, wire.len());
        }
    }

    #[test]
    fn no_sni_and_no_extensions() {
        let h = parse(&records(&body(&[alpn(&["h2"])]), 16384), 4096).unwrap().unwrap();
        assert_eq!(h.server_name, None);
        let mut bare = body(&[]);
        bare.truncate(bare.len() - 2); // drop even the empty extensions length
        let h = parse(&records(&bare, 16384), 4096).unwrap().unwrap();
        assert_eq!((h.server_name, h.alpn.len()), (None, 0));
    }

    #[test]
    fn refuses_what_is_not_tls_at_the_first_byte() {
        assert_eq!(parse(b"G", 4096), Err(HelloError::NotTls));
        assert_eq!(parse(b"GET / HTTP/1.1\r\n", 4096), Err(HelloError::NotTls));
        assert_eq!(parse(&[0x80, 0x2e, 0x01, 0x03, 0x01], 4096), Err(HelloError::NotTls)); // SSLv2
        assert_eq!(parse(&[22, 2], 4096), Err(HelloError::NotTls));
        assert_eq!(parse(&[22, 3, 9], 4096), Err(HelloError::NotTls));
        assert_eq!(parse(&[22], 4096), Ok(None));
    }

    #[test]
    fn refuses_malformed_hellos() {
        let malformed = |wire: &[u8]| matches!(parse(wire, 1 << 20), Err(HelloError::Malformed(_)));
        let good = records(&body(&[sni(ISTIO)]), 16384);
        assert!(malformed(&[22, 3, 1, 0, 0]), "empty record");
        assert!(malformed(&[22, 3, 1, 0x40, 0x01]), "record over 2^14");
        let mut not_hello = good.clone();
        not_hello[5] = 2;
        assert!(malformed(&not_hello), "server hello");
        let mut short = good.clone();
        short[8] -= 1; // message shorter than its extensions claim
        assert!(malformed(&short));
        assert!(
            malformed(&records(&body(&[sni(ISTIO), sni(ISTIO)]), 16384)),
            "duplicate extension"
        );
        assert!(malformed(&records(&body(&[sni("")]), 16384)), "empty host_name");
        assert!(malformed(&records(&body(&[sni("a\0b")]), 16384)), "NUL in host_name");
        assert!(
            malformed(&records(&body(&[(EXT_ALPN, vec![0, 1, 0])]), 16384)),
            "empty protocol"
        );
        assert!(
            malformed(&records(&body(&[(EXT_ALPN, vec![0, 0])]), 16384)),
            "empty ALPN list"
        );
        let mut mixed = records(&body(&[sni(ISTIO)]), 30);
        mixed[30 + 5] = 23; // second record is application data
        assert!(malformed(&mixed), "non-handshake record in the middle");
        let mut b = body(&[]);
        b[34] = 33; // session id of 33 bytes
        assert!(malformed(&records(&b, 16384)));
    }

    #[test]
    fn too_large_is_known_before_the_bytes_arrive() {
        let wire = records(&body(&[sni(ISTIO), (0xfafa, vec![0; 3000])]), 16384);
        assert_eq!(parse(&wire[..12], 1024), Err(HelloError::TooLarge));
        assert!(parse(&wire, 4096).unwrap().is_some());
        // Many tiny records: the record headers alone run past the limit.
        let tiny = records(&body(&[sni(ISTIO)]), 1);
        assert_eq!(parse(&tiny, 200), Err(HelloError::TooLarge));
    }
}
