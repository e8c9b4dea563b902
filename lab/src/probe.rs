//! Probes run from inside a lab namespace: a TCP connect, and a plain HTTP/1.1 GET. There
//! is no `ping` here, and no route from the host into the lab, so every probe starts in a
//! namespace of the lab.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::netns;

/// An HTTP response, as much as the lab needs of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: String,
}

/// Opens a TCP connection to `addr` from namespace `ns`.
pub fn connect(ns: &str, addr: SocketAddr, timeout: Duration) -> io::Result<()> {
    netns::within(ns, move || TcpStream::connect_timeout(&addr, timeout).map(drop))?
}

/// `GET path` on `addr` from namespace `ns`, the whole exchange within `timeout`.
pub fn get(ns: &str, addr: SocketAddr, path: &str, timeout: Duration) -> io::Result<Response> {
    let path = path.to_owned();
    netns::within(ns, move || get_here(addr, &path, timeout))?
}

/// `GET path` on `addr` from the calling thread's namespace.
pub fn get_here(addr: SocketAddr, path: &str, timeout: Duration) -> io::Result<Response> {
    let deadline = Instant::now() + timeout;
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    let left = || {
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    };
    s.set_write_timeout(Some(left()))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        s.set_read_timeout(Some(left()))?;
        match s.read(&mut buf)? {
            0 => break,
            n if raw.len() + n > 1 << 20 => return Err(io::Error::other("response larger than 1 MiB")),
            n => raw.extend_from_slice(&buf[..n]),
        }
        if Instant::now() >= deadline {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "response not complete in time"));
        }
    }
    parse(&raw).ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "not an HTTP/1.1 response"))
}

/// Status and body of a complete `Connection: close` response (body by Content-Length, or
/// to the end).
pub(crate) fn parse(raw: &[u8]) -> Option<Response> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.lines().next()?.split_whitespace().nth(1)?.parse().ok()?;
    let len = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse::<usize>().ok())?
    });
    let body = match len {
        Some(n) => body.get(..n)?.to_owned(),
        None => body.to_owned(),
    };
    Some(Response { status, body })
}

/// Polls `check` until it returns `Ok`, at most until `timeout`, every `every`; the error is
/// the last one seen.
pub fn until<T, E>(timeout: Duration, every: Duration, mut check: impl FnMut() -> Result<T, E>) -> Result<T, E> {
    let deadline = Instant::now() + timeout;
    loop {
        match check() {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(every),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_responses_by_length_or_to_the_end() {
        let r = parse(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}trailing").unwrap();
        assert_eq!(
            r,
            Response {
                status: 200,
                body: "{}".into()
            }
        );
        let r = parse(b"HTTP/1.1 503 Service Unavailable\r\n\r\nnot ready").unwrap();
        assert_eq!((r.status, r.body.as_str()), (503, "not ready"));
        assert!(parse(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nshort").is_none());
        assert!(parse(b"garbage").is_none());
    }

    #[test]
    fn polls_until_ok_or_the_deadline() {
        let mut n = 0;
        assert_eq!(
            until(Duration::from_secs(5), Duration::ZERO, || {
                n += 1;
                if n < 3 { Err(n) } else { Ok(n) }
            }),
            Ok(3)
        );
        let start = Instant::now();
        assert_eq!(
            until(Duration::from_millis(30), Duration::from_millis(5), || Err::<(), _>(
                "no"
            )),
            Err("no")
        );
        assert!(start.elapsed() >= Duration::from_millis(30));
    }
}
