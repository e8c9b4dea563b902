//! Access logs: one line per HTTP request once its response has ended, in Envoy's default
//! format (or as JSON with Istio's field names), to stdout or a file.
//!
//! ```text
//! [%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" %RESPONSE_CODE%
//! %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%
//! "%REQ(X-FORWARDED-FOR)%" "%REQ(USER-AGENT)%" "%REQ(X-REQUEST-ID)%" "%REQ(:AUTHORITY)%" "%UPSTREAM_HOST%"
//! ```
//!
//! `--access-log-filter errors` keeps what an operator looks for: status 400 and above,
//! anything with a response flag, and requests an AUDIT (RBAC LOG) policy marked.
//!
//! A file is written as Envoy writes its access logs: a request only appends its line to a
//! buffer in memory, and a thread of the log's own writes the buffer out every second
//! ([`FLUSH_INTERVAL`], Envoy's `file_flush_interval_msec` default), as soon as it holds
//! [`BUFFER`] bytes, and on [`AccessLog::flush`] at shutdown. No request thread waits on the
//! disk: the writer takes the buffer and writes without holding it. A disk too slow for
//! [`MAX_PENDING`] bytes of lines loses the lines beyond, and the log says how many.
//! Stdout is written line by line.

use std::fmt::Write as _;
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, SystemTime};

use hyper::{Request, Version};

/// How lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Envoy's default text format.
    Text,
    /// One JSON object a line, with Istio's keys.
    Json,
}

/// Which requests are logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Filter {
    All,
    /// Status ≥ 400, a response flag, or marked by an AUDIT policy.
    Errors,
}

/// How long a written line may wait in a file log's buffer.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(1);

/// What a file log's buffer holds before the writer is woken whatever the time.
const BUFFER: usize = 64 * 1024;

/// The most bytes of lines held for a writer that cannot keep up.
const MAX_PENDING: usize = 8 * 1024 * 1024;

/// Where lines go.
enum Out {
    /// Each line written and flushed under stdout's own lock.
    Stdout,
    File(Arc<Buffered>),
}

/// A file log: lines waiting in memory, and the file the writer thread puts them in.
struct Buffered {
    pending: Mutex<Vec<u8>>,
    /// Wakes the writer early: the buffer is full, or the log is gone.
    full: Condvar,
    /// Held while writing, so a shutdown flush and the writer never interleave.
    file: Mutex<std::fs::File>,
    /// Lines lost since the writer last said so.
    dropped: AtomicU64,
}

impl Buffered {
    fn push(&self, line: &[u8]) {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if pending.len() + line.len() > MAX_PENDING {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        pending.extend_from_slice(line);
        if pending.len() >= BUFFER {
            self.full.notify_one();
        }
    }

    /// Writes what is pending (taking it first, so requests go on appending meanwhile).
    fn write_out(&self) {
        let batch = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()));
        let dropped = self.dropped.swap(0, Ordering::Relaxed);
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        // A full disk must not take requests down with it; those lines are lost.
        let _ = file.write_all(&batch);
        if dropped > 0 {
            let _ = writeln!(
                file,
                "[isthmus] {dropped} access log lines dropped: the log could not keep up"
            );
        }
    }

    /// The writer thread's life: out every [`FLUSH_INTERVAL`] or when woken, until the log
    /// is dropped (which writes the last lines itself).
    fn run(log: std::sync::Weak<Buffered>) {
        loop {
            let Some(log) = log.upgrade() else { return };
            {
                let pending = log.pending.lock().unwrap_or_else(|e| e.into_inner());
                if pending.len() < BUFFER {
                    let _unused = log.full.wait_timeout(pending, FLUSH_INTERVAL);
                }
            }
            log.write_out();
        }
    }
}

/// Where and how a sidecar writes its access log.
pub struct AccessLog {
    out: Out,
    format: Format,
    filter: Filter,
}

impl AccessLog {
    /// Logs to `target`: `-` for stdout, else a file appended to (created if need be),
    /// written by a thread of its own while the log lives.
    pub fn open(target: &Path, format: Format, filter: Filter) -> std::io::Result<Self> {
        let out = if target == Path::new("-") {
            Out::Stdout
        } else {
            let file = std::fs::OpenOptions::new().create(true).append(true).open(target)?;
            let log = Arc::new(Buffered {
                pending: Mutex::new(Vec::with_capacity(BUFFER)),
                full: Condvar::new(),
                file: Mutex::new(file),
                dropped: AtomicU64::new(0),
            });
            let weak = Arc::downgrade(&log);
            std::thread::Builder::new()
                .name("access-log".into())
                .stack_size(64 * 1024)
                .spawn(move || Buffered::run(weak))?;
            Out::File(log)
        };
        Ok(Self { out, format, filter })
    }

    /// Writes out what the buffer holds (at shutdown).
    pub fn flush(&self) {
        if let Out::File(log) = &self.out {
            log.write_out();
        }
    }

    fn write_line(&self, line: &str) {
        match &self.out {
            Out::File(log) => log.push(line.as_bytes()),
            Out::Stdout => {
                let mut out = std::io::stdout().lock();
                let _ = out.write_all(line.as_bytes()).and_then(|()| out.flush());
            }
        }
    }

    /// What of `req` the line will say, taken as it is sent on (after our own headers).
    pub fn start<B>(self: &Arc<Self>, req: &Request<B>) -> Pending {
        let h = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let authority = h("host").or_else(|| req.uri().authority().map(|a| a.to_string()));
        Pending {
            log: self.clone(),
            start: SystemTime::now(),
            method: req.method().to_string(),
            path: h("x-envoy-original-path")
                .or_else(|| req.uri().path_and_query().map(|p| p.to_string()))
                .unwrap_or_else(|| "/".to_owned()),
            protocol: match req.version() {
                Version::HTTP_2 => "HTTP/2",
                Version::HTTP_10 => "HTTP/1.0",
                _ => "HTTP/1.1",
            },
            bytes_received: h("content-length").and_then(|v| v.parse().ok()).unwrap_or(0),
            forwarded_for: h("x-forwarded-for"),
            user_agent: h("user-agent"),
            request_id: h("x-request-id"),
            authority,
            audited: false,
        }
    }
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        if let Out::File(log) = &self.out {
            log.write_out();
            log.full.notify_one();
        }
    }
}

/// A request's line, waiting for its response.
#[derive(Clone)]
pub struct Pending {
    log: Arc<AccessLog>,
    start: SystemTime,
    method: String,
    path: String,
    protocol: &'static str,
    bytes_received: u64,
    forwarded_for: Option<String>,
    user_agent: Option<String>,
    request_id: Option<String>,
    authority: Option<String>,
    audited: bool,
}

impl Pending {
    /// Marks the request as matched by an AUDIT policy: logged even under `errors`.
    pub fn audited(mut self) -> Self {
        self.audited = true;
        self
    }

    /// The response's status, Envoy response flags (`-` for none) and the upstream it came
    /// from; written once the body has ended.
    pub fn answered(self, code: u16, flags: &'static str, upstream: Option<SocketAddr>) -> Answered {
        Answered {
            pending: self,
            code,
            flags,
            upstream,
        }
    }
}

/// A request's line with its response known, written by [`Answered::write`].
pub struct Answered {
    pending: Pending,
    code: u16,
    flags: &'static str,
    upstream: Option<SocketAddr>,
}

/// `%START_TIME%`'s form: `2026-12-01T12:00:00.000Z`.
fn start_time(t: SystemTime) -> String {
    let since = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let (secs, millis) = (since.as_secs() as i64, since.subsec_millis());
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Days to a civil date (Howard Hinnant's algorithm), proleptic Gregorian, UTC.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

impl Answered {
    /// Writes the line (if the filter keeps it) now that `bytes_sent` bytes of body went out
    /// over `duration`.
    pub fn write(self, bytes_sent: u64, duration: Duration) {
        let p = &self.pending;
        let log = &p.log;
        if log.filter == Filter::Errors && self.code < 400 && self.flags == "-" && !p.audited {
            return;
        }
        let upstream = self.upstream.map(|u| u.to_string());
        let millis = duration.as_millis();
        let line = match log.format {
            Format::Text => {
                let q = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".to_owned());
                format!(
                    "[{}] \"{} {} {}\" {} {} {} {bytes_sent} {millis} - \"{}\" \"{}\" \"{}\" \"{}\" \"{}\"\n",
                    start_time(p.start),
                    p.method,
                    p.path,
                    p.protocol,
                    self.code,
                    self.flags,
                    p.bytes_received,
                    q(&p.forwarded_for),
                    q(&p.user_agent),
                    q(&p.request_id),
                    q(&p.authority),
                    q(&upstream),
                )
            }
            Format::Json => {
                let mut s = String::with_capacity(256);
                let fields: [(&str, Option<&str>); 9] = [
                    ("start_time", Some(&start_time(p.start))),
                    ("method", Some(&p.method)),
                    ("path", Some(&p.path)),
                    ("protocol", Some(p.protocol)),
                    ("response_flags", Some(self.flags)),
                    ("x_forwarded_for", p.forwarded_for.as_deref()),
                    ("user_agent", p.user_agent.as_deref()),
                    ("request_id", p.request_id.as_deref()),
                    ("authority", p.authority.as_deref()),
                ];
                s.push('{');
                for (k, v) in fields {
                    let _ = write!(s, "\"{k}\":");
                    crate::json::string(&mut s, v);
                    s.push(',');
                }
                let _ = writeln!(
                    s,
                    "\"upstream_host\":{},\"response_code\":{},\"bytes_received\":{},\"bytes_sent\":{bytes_sent},\"duration\":{millis}}}",
                    upstream.map_or_else(|| "null".to_owned(), |u| format!("\"{u}\"")),
                    self.code,
                    p.bytes_received,
                );
                s
            }
        };
        log.write_line(&line);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines_of(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn lines_from_many_threads_reach_the_file_whole_without_a_flush() {
        let path = std::env::temp_dir().join(format!("isthmus-access-log-unit-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let log = Arc::new(AccessLog::open(&path, Format::Text, Filter::All).unwrap());
        // 4 × 5,000 lines of ~100 bytes: several buffers' worth, so the writer is woken early.
        std::thread::scope(|s| {
            for t in 0..4 {
                let log = log.clone();
                s.spawn(move || {
                    for i in 0..5_000 {
                        log.write_line(&format!("thread {t} line {i:05} {}\n", "x".repeat(80)));
                    }
                });
            }
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while lines_of(&path).len() < 20_000 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20)); // polling the file, bounded
        }
        let lines = lines_of(&path);
        assert_eq!(lines.len(), 20_000, "all lines written by the log's own thread");
        for t in 0..4 {
            let mine: Vec<&String> = lines
                .iter()
                .filter(|l| l.starts_with(&format!("thread {t} ")))
                .collect();
            assert_eq!(mine.len(), 5_000);
            // One thread's lines stay in its order, each whole.
            for (i, l) in mine.iter().enumerate() {
                assert!(
                    l.starts_with(&format!("thread {t} line {i:05} ")) && l.ends_with('x'),
                    "{l:?}"
                );
            }
        }
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn dropping_the_log_writes_what_it_holds() {
        let path = std::env::temp_dir().join(format!("isthmus-access-log-drop-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let log = AccessLog::open(&path, Format::Text, Filter::All).unwrap();
        log.write_line("the last line\n");
        drop(log);
        assert_eq!(lines_of(&path), ["the last line"]);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn start_time_is_envoys_utc_form() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_780_315_200_123);
        assert_eq!(start_time(t), "2026-06-01T12:00:00.123Z");
        assert_eq!(start_time(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        // A leap day.
        let leap = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(start_time(leap), "2000-02-29T00:00:00.000Z");
    }
}
