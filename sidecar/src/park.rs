//! What a data-plane worker does when it runs out of work, just before it sleeps in
//! `epoll_wait`: it may let whatever else is runnable on its CPU go first.
//!
//! When the machine is busy (clients, endpoints and proxies sharing cores, as on any crowded
//! node) the next events for a worker are usually a few microseconds away. Sleeping means the
//! CPU may go idle and be woken again for them, and that round trip is much of the cost of a
//! short exchange: a `perf record` of the gateway under the connection benchmark put 22 % of
//! its time in the switch back in after `epoll_wait` slept. Yielding first keeps the worker
//! runnable while others run; when it comes back its events are there and `epoll_wait`
//! returns without sleeping. With nothing else runnable the yield returns at once and the
//! worker sleeps as before, so an idle proxy costs one syscall more per wake-up.

/// Parses an on/off switch (`--yield-before-sleep`, the sidecar's `--h2-upgrade`).
pub fn switch(s: &str) -> Result<bool, String> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(format!("{s:?} is neither on nor off")),
    }
}

/// Makes `builder`'s runtime yield its CPU once before each sleep when `on`.
pub fn yield_before_sleep(builder: &mut tokio::runtime::Builder, on: bool) -> &mut tokio::runtime::Builder {
    if on {
        builder.on_thread_park(yield_cpu);
    }
    builder
}

fn yield_cpu() {
    // SAFETY: sched_yield takes no arguments and touches no memory.
    unsafe { libc::sched_yield() };
}
