//! When a polled file (or directory) is worth reading again: once it has changed and then
//! held still for one poll. A file written in place is truncated before it is filled, and
//! a process preempted in between leaves it empty (or half an endpoint list, still valid
//! YAML) for a while; reading it then would drop routes that were never meant to go. The
//! gateway's routes file and the controller's manifest directory are both read this way.

/// What was last read of a polled thing, by its fingerprint (metadata, not contents), and
/// a change seen at the last poll.
#[derive(Debug)]
pub struct Settle<T> {
    read: T,
    changed: Option<T>,
}

impl<T: PartialEq> Settle<T> {
    /// `read`: the fingerprint of what was read at start.
    pub fn new(read: T) -> Self {
        Self { read, changed: None }
    }

    /// This poll's fingerprint: whether to read now, i.e. it differs from what was read
    /// and was the same at the last poll. When it says so, `now` counts as read.
    pub fn poll(&mut self, now: T) -> bool {
        if now == self.read {
            self.changed = None;
            return false;
        }
        if self.changed.as_ref() != Some(&now) {
            self.changed = Some(now);
            return false;
        }
        self.read(now);
        true
    }

    /// Read out of turn (asked to, say by SIGHUP): `now` is what was read.
    pub fn read(&mut self, now: T) {
        self.read = now;
        self.changed = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_is_read_once_it_held_still_for_a_poll() {
        let mut s = Settle::new(1);
        assert!(!s.poll(1), "unchanged");
        assert!(!s.poll(0), "changed: truncated, say");
        assert!(!s.poll(2), "changed again: filled");
        assert!(s.poll(2), "held still");
        assert!(!s.poll(2), "read already");
        // A change that goes back before it settles is nothing to read.
        assert!(!s.poll(3));
        assert!(!s.poll(2));
        assert!(!s.poll(3), "seen once since it came back");
        s.read(4);
        assert!(!s.poll(4), "read out of turn");
    }
}
