//! Graceful shutdown: stop taking new work, let open connections finish, up to a bound.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, watch};

/// Starts a drain and waits for it; held by whoever owns shutdown.
#[derive(Debug)]
pub struct Trigger {
    inner: Arc<Inner>,
    tx: watch::Sender<bool>,
}

/// Handed to every part that accepts work: tells it when to stop, and counts what
/// is still open.
#[derive(Debug, Clone)]
pub struct Watch {
    inner: Arc<Inner>,
    rx: watch::Receiver<bool>,
}

#[derive(Debug, Default)]
struct Inner {
    open: AtomicUsize,
    all_closed: Notify,
}

/// A new drain pair.
pub fn channel() -> (Trigger, Watch) {
    let (tx, rx) = watch::channel(false);
    let inner = Arc::new(Inner::default());
    (
        Trigger {
            inner: inner.clone(),
            tx,
        },
        Watch { inner, rx },
    )
}

impl Trigger {
    /// Signals every watcher to stop accepting, then waits until every tracked
    /// piece of work has ended or `timeout` passes. Returns how many were still open.
    pub async fn drain(self, timeout: Duration) -> usize {
        let _ = self.tx.send(true);
        let inner = self.inner.clone();
        let all_closed = async move {
            loop {
                let notified = inner.all_closed.notified();
                if inner.open.load(Ordering::Acquire) == 0 {
                    return;
                }
                notified.await;
            }
        };
        let _ = tokio::time::timeout(timeout, all_closed).await;
        self.inner.open.load(Ordering::Acquire)
    }
}

impl Watch {
    /// Completes once draining has started.
    pub async fn signaled(&self) {
        let mut rx = self.rx.clone();
        let _ = rx.wait_for(|draining| *draining).await;
    }

    /// Whether draining has started.
    pub fn is_draining(&self) -> bool {
        *self.rx.borrow()
    }

    /// Counts one piece of open work until the returned guard drops.
    pub fn track(&self) -> Tracked {
        self.inner.open.fetch_add(1, Ordering::AcqRel);
        Tracked {
            inner: self.inner.clone(),
        }
    }

    /// Open work right now.
    pub fn open(&self) -> usize {
        self.inner.open.load(Ordering::Acquire)
    }
}

/// Accepts on `listener` until draining starts, running `handle` for each connection on
/// this runtime; the drain waits for every connection `handle` is still serving.
pub async fn accept_until_drained<F, Fut>(listener: tokio::net::TcpListener, drain: Watch, handle: F)
where
    F: Fn(tokio::net::TcpStream) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = drain.signaled() => return,
        };
        let Ok((stream, _)) = accepted else { continue };
        let tracked = drain.track();
        let work = handle(stream);
        tokio::spawn(async move {
            work.await;
            drop(tracked);
        });
    }
}

/// One piece of open work; the drain waits for it.
#[derive(Debug)]
pub struct Tracked {
    inner: Arc<Inner>,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if self.inner.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.inner.all_closed.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn waits_for_open_work_up_to_the_timeout() {
        let (trigger, watch) = channel();
        let work = watch.track();
        assert!(!watch.is_draining());
        let w2 = watch.clone();
        let finisher = tokio::spawn(async move {
            w2.signaled().await;
            tokio::time::sleep(Duration::from_secs(1)).await;
            drop(work);
        });
        assert_eq!(trigger.drain(Duration::from_secs(5)).await, 0);
        finisher.await.unwrap();
        assert!(watch.is_draining());

        let (trigger, watch) = channel();
        let _stuck = watch.track();
        assert_eq!(trigger.drain(Duration::from_secs(2)).await, 1);
    }
}
