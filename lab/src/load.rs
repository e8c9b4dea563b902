//! Requests the way an application makes them: from a thread inside a client pod's network
//! namespace, one new TCP connection per request (so each goes through the sidecar's
//! endpoint choice), `GET /` to a service's ClusterIP; and what they say about where they
//! landed. Shared by `lab traffic` and `drill failover`.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// Where a request landed: the answering pod's cluster and version.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct Landing {
    pub cluster: String,
    pub version: String,
}

/// One attempt's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Ok(Landing),
    /// Failed; `no_response` when not one byte of a response came back (safe to retry an
    /// idempotent request, as Envoy's `retry_on: reset,connect-failure` does).
    Failed {
        reason: String,
        no_response: bool,
    },
}

/// A request: when it started and ended, what came of it, how many attempts it took.
#[derive(Debug, Clone)]
pub struct Sample {
    pub start: Instant,
    pub end: Instant,
    pub outcome: Outcome,
    pub attempts: u32,
    /// When the first attempt failed, if one did (a retried request counts as detected).
    pub first_failure: Option<Instant>,
}

impl Sample {
    pub fn ok(&self) -> bool {
        matches!(self.outcome, Outcome::Ok(_))
    }

    pub fn landing(&self) -> Option<&Landing> {
        match &self.outcome {
            Outcome::Ok(l) => Some(l),
            Outcome::Failed { .. } => None,
        }
    }

    pub fn latency(&self) -> Duration {
        self.end - self.start
    }
}

/// `GET /` on `addr` from this thread's namespace, retrying an attempt that got no response
/// at all up to `retries` times, the whole within `timeout` per attempt.
pub fn request(addr: SocketAddr, timeout: Duration, retries: u32) -> Sample {
    let start = Instant::now();
    let mut attempts = 0;
    let mut first_failure = None;
    loop {
        attempts += 1;
        let outcome = attempt(addr, timeout);
        let retry = matches!(outcome, Outcome::Failed { no_response: true, .. }) && attempts <= retries;
        if !matches!(outcome, Outcome::Ok(_)) && first_failure.is_none() {
            first_failure = Some(Instant::now());
        }
        if !retry {
            return Sample {
                start,
                end: Instant::now(),
                outcome,
                attempts,
                first_failure,
            };
        }
    }
}

fn attempt(addr: SocketAddr, timeout: Duration) -> Outcome {
    let mut got_bytes = false;
    match exchange(addr, timeout, &mut got_bytes) {
        Ok(o) => o,
        Err(e) => Outcome::Failed {
            reason: reason(&e),
            no_response: !got_bytes,
        },
    }
}

fn exchange(addr: SocketAddr, timeout: Duration, got_bytes: &mut bool) -> io::Result<Outcome> {
    let deadline = Instant::now() + timeout;
    let left = || {
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    };
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_nodelay(true)?;
    s.set_write_timeout(Some(left()))?;
    write!(s, "GET / HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if Instant::now() >= deadline {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "timed out"));
        }
        s.set_read_timeout(Some(left()))?;
        match s.read(&mut buf)? {
            0 => break,
            n if raw.len() + n > 1 << 20 => return Err(io::Error::other("response larger than 1 MiB")),
            n => {
                *got_bytes = true;
                raw.extend_from_slice(&buf[..n]);
            }
        }
    }
    if raw.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "closed without a response",
        ));
    }
    let Some(r) = crate::probe::parse(&raw) else {
        return Ok(Outcome::Failed {
            reason: "incomplete response".into(),
            no_response: false,
        });
    };
    if r.status != 200 {
        return Ok(Outcome::Failed {
            reason: format!("HTTP {}", r.status),
            no_response: false,
        });
    }
    let v: serde_json::Value = match serde_json::from_str(&r.body) {
        Ok(v) => v,
        Err(_) => {
            return Ok(Outcome::Failed {
                reason: "answer not JSON".into(),
                no_response: false,
            });
        }
    };
    Ok(Outcome::Ok(Landing {
        cluster: v["cluster"].as_str().unwrap_or("?").into(),
        version: v["version"].as_str().unwrap_or("?").into(),
    }))
}

/// A short, stable name for an I/O failure, to count failures by.
fn reason(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => "connection refused".into(),
        io::ErrorKind::ConnectionReset => "connection reset".into(),
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => "timed out".into(),
        io::ErrorKind::UnexpectedEof => "closed without a response".into(),
        io::ErrorKind::BrokenPipe => "broken pipe".into(),
        _ => e.to_string(),
    }
}

/// The `q`-quantile (0..=1) of sorted durations, by nearest rank.
pub fn quantile(sorted: &[Duration], q: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Percentiles {
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// Percentiles of successful requests' latencies (none without one).
pub fn percentiles<'a>(samples: impl IntoIterator<Item = &'a Sample>) -> Option<Percentiles> {
    let mut l: Vec<Duration> = samples.into_iter().filter(|s| s.ok()).map(Sample::latency).collect();
    l.sort();
    let ms = |d: Option<Duration>| d.map_or(0.0, |d| d.as_secs_f64() * 1000.0);
    (!l.is_empty()).then(|| Percentiles {
        p50_ms: ms(quantile(&l, 0.50)),
        p90_ms: ms(quantile(&l, 0.90)),
        p99_ms: ms(quantile(&l, 0.99)),
        max_ms: ms(l.last().copied()),
    })
}

/// Counts by landing, and failures by reason.
pub fn tally<'a>(samples: impl IntoIterator<Item = &'a Sample>) -> (BTreeMap<Landing, usize>, BTreeMap<String, usize>) {
    let mut landed = BTreeMap::new();
    let mut failed = BTreeMap::new();
    for s in samples {
        match &s.outcome {
            Outcome::Ok(l) => *landed.entry(l.clone()).or_default() += 1,
            Outcome::Failed { reason, .. } => *failed.entry(reason.clone()).or_default() += 1,
        }
    }
    (landed, failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_by_nearest_rank() {
        let d: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(quantile(&d, 0.5), Some(Duration::from_millis(50)));
        assert_eq!(quantile(&d, 0.99), Some(Duration::from_millis(99)));
        assert_eq!(quantile(&d, 1.0), Some(Duration::from_millis(100)));
        assert_eq!(quantile(&d[..1], 0.99), Some(Duration::from_millis(1)));
        assert_eq!(quantile(&[], 0.5), None);
    }

    #[test]
    fn a_refused_request_is_retried_and_still_fails_with_its_reason() {
        // Nothing listens on port 1 of loopback: refused at once, every attempt.
        let s = request(SocketAddr::from(([127, 0, 0, 1], 1)), Duration::from_secs(1), 2);
        assert_eq!(s.attempts, 3);
        assert!(s.first_failure.is_some());
        assert_eq!(
            s.outcome,
            Outcome::Failed {
                reason: "connection refused".into(),
                no_response: true
            }
        );
    }
}
