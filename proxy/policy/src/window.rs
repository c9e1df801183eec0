//! A sliding window of two counters, shared by the retry budget (requests and retries) and the
//! failure-rate breaker (requests and failures).
//!
//! The window is cut into [`SLOTS`] slots; adding counts goes to the slot of `now` and a sum
//! covers the current slot and the `SLOTS - 1` before it, so what is summed always spans
//! between 90 % and 100 % of the window. Slots instead of one timestamp per event keep memory
//! constant at any request rate. Time is `tokio::time::Instant`, so tests drive it with a
//! paused clock.

use std::time::Duration;

use tokio::time::Instant;

/// Slots per window: the sum lags a true sliding window by at most one slot.
const SLOTS: usize = 10;
/// Slots shorter than this make no sense for request counting (and avoid dividing by zero).
const MIN_SLOT: Duration = Duration::from_millis(1);

/// Counts over a window. `marked` is the subset of `requests` that failed (breaker) or the
/// retries made for them (budget).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Counts {
    pub(crate) requests: u64,
    pub(crate) marked: u64,
}

#[derive(Debug, Clone)]
pub(crate) struct Window {
    slot: Duration,
    slots: [Counts; SLOTS],
    start: Instant,
    /// Number of the slot `now` fell in at the last update, counted from `start`.
    head: u64,
}

impl Window {
    pub(crate) fn new(window: Duration, now: Instant) -> Self {
        Self {
            slot: (window / SLOTS as u32).max(MIN_SLOT),
            slots: [Counts::default(); SLOTS],
            start: now,
            head: 0,
        }
    }

    /// Moves the window to `now`, clearing the slots that fell out of it.
    fn advance(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.start);
        let index = (elapsed.as_nanos() / self.slot.as_nanos()) as u64;
        if index <= self.head {
            return;
        }
        let stale = (index - self.head).min(SLOTS as u64);
        for i in 0..stale {
            self.slots[((index - i) % SLOTS as u64) as usize] = Counts::default();
        }
        self.head = index;
    }

    pub(crate) fn add(&mut self, now: Instant, requests: u64, marked: u64) {
        self.advance(now);
        let slot = &mut self.slots[(self.head % SLOTS as u64) as usize];
        slot.requests += requests;
        slot.marked += marked;
    }

    pub(crate) fn sum(&mut self, now: Instant) -> Counts {
        self.advance(now);
        self.slots.iter().fold(Counts::default(), |acc, c| Counts {
            requests: acc.requests + c.requests,
            marked: acc.marked + c.marked,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_expire_slot_by_slot() {
        let t0 = Instant::now();
        let mut w = Window::new(Duration::from_secs(10), t0);
        w.add(t0, 5, 1);
        w.add(t0 + Duration::from_secs(3), 2, 2);
        assert_eq!(
            w.sum(t0 + Duration::from_secs(9)),
            Counts {
                requests: 7,
                marked: 3
            }
        );
        // The first slot [0s, 1s) leaves the window at 10s; the one at 3s stays until 13s.
        assert_eq!(w.sum(t0 + Duration::from_secs(10)).requests, 2);
        assert_eq!(w.sum(t0 + Duration::from_millis(12_999)).requests, 2);
        assert_eq!(w.sum(t0 + Duration::from_secs(13)), Counts::default());
        // A long idle gap clears everything, and counting resumes in the right slot.
        w.add(t0 + Duration::from_secs(100), 1, 0);
        assert_eq!(w.sum(t0 + Duration::from_secs(105)).requests, 1);
        assert_eq!(w.sum(t0 + Duration::from_secs(110)).requests, 0);
    }

    #[test]
    fn time_going_backwards_counts_in_the_current_slot() {
        let t0 = Instant::now();
        let mut w = Window::new(Duration::from_secs(1), t0 + Duration::from_secs(1));
        w.add(t0, 1, 1);
        assert_eq!(w.sum(t0).marked, 1);
    }
}
