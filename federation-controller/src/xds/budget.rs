//! A bound on the bytes of responses that are on their way to proxies: sent, but not yet
//! answered by the proxy's ACK or NACK. A thousand proxies connecting at once would
//! otherwise each be handed a full copy of every endpoint, all queued in the gRPC
//! streams' buffers together (measured: GiBs at 10 clusters × 10,000 endpoints × 1,000
//! proxies), while a proxy can only take one at a time anyway. With the budget, the
//! large first pushes go out as the proxies take them in; small pushes (a changed
//! endpoint) never wait.
//!
//! Each stream holds at most one reservation, and gives it up before asking for the
//! next: a stream waiting for budget holds none, so the holders are streams free to read
//! the ACK that releases theirs. A proxy that never answers holds its reservation for
//! [`HOLD`] at most.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Semaphore, oneshot};

/// Responses smaller than this are sent without a reservation: they cost little, and a
/// change must not wait behind someone else's full push.
pub const SMALL: usize = 64 << 10;

/// The longest a reservation outlives its response when the proxy says nothing.
pub const HOLD: Duration = Duration::from_secs(10);

/// The budget every stream of one server draws from.
#[derive(Debug, Clone)]
pub struct PushBudget {
    units: Arc<Semaphore>,
    total_units: u32,
}

/// The budget counts KiB, so a semaphore's u32 permits cover terabytes.
const UNIT: usize = 1 << 10;

/// One response's share of the budget, given back when dropped (on the proxy's answer,
/// the stream's next send or its end) or after [`HOLD`].
#[derive(Debug)]
pub struct Reservation {
    _release: oneshot::Sender<()>,
}

impl PushBudget {
    /// A budget of `bytes` in flight at once.
    pub fn new(bytes: usize) -> Self {
        let total_units = u32::try_from(bytes.div_ceil(UNIT)).unwrap_or(u32::MAX).max(1);
        Self {
            units: Arc::new(Semaphore::new(total_units as usize)),
            total_units,
        }
    }

    /// Waits until `bytes` fit in the budget (a response larger than the whole budget
    /// waits for all of it) and reserves them; None for a small response.
    pub async fn reserve(&self, bytes: usize) -> Option<Reservation> {
        if bytes < SMALL {
            return None;
        }
        let units = u32::try_from(bytes.div_ceil(UNIT))
            .unwrap_or(u32::MAX)
            .min(self.total_units);
        let permit = self
            .units
            .clone()
            .acquire_many_owned(units)
            .await
            .expect("the budget's semaphore is never closed");
        let (release, released) = oneshot::channel::<()>();
        // From now, not from whenever the task first runs.
        let deadline = tokio::time::Instant::now() + HOLD;
        tokio::spawn(async move {
            // Err (the sender dropped) is the normal release; the timeout, the silent proxy.
            let _ = tokio::time::timeout_at(deadline, released).await;
            drop(permit);
        });
        Some(Reservation { _release: release })
    }

    /// Bytes (rounded to KiB) reserved now.
    pub fn in_flight(&self) -> usize {
        (self.total_units as usize - self.units.available_permits()) * UNIT
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Polls until `budget` has `bytes` in flight (the release runs on another task).
    async fn settles(budget: &PushBudget, bytes: usize) {
        for _ in 0..1000 {
            if budget.in_flight() == bytes {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("in flight {} never became {bytes}", budget.in_flight());
    }

    #[tokio::test(start_paused = true)]
    async fn large_responses_wait_for_room_small_ones_never_and_silence_ends_a_hold() {
        let budget = PushBudget::new(1 << 20);
        let a = budget.reserve(700 << 10).await.expect("large");
        assert!(budget.reserve(1000).await.is_none(), "small responses take nothing");
        // A second large one does not fit beside the first...
        let waiting = tokio::spawn({
            let budget = budget.clone();
            async move { budget.reserve(700 << 10).await }
        });
        settles(&budget, 700 << 10).await;
        assert!(!waiting.is_finished());
        // ...until the first is answered.
        drop(a);
        let b = waiting.await.unwrap().expect("large");
        settles(&budget, 700 << 10).await;
        // One larger than the whole budget takes all of it, once it is free; a proxy that
        // never answers gives it back after HOLD.
        drop(b);
        let huge = budget.reserve(5 << 20).await.expect("large");
        settles(&budget, 1 << 20).await;
        tokio::time::advance(HOLD + Duration::from_millis(1)).await;
        settles(&budget, 0).await;
        drop(huge);
    }
}
