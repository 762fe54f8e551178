//! The timer wheel: one absolute deadline per key, keyed by a small enum the owner defines.
//!
//! The daemon has a handful of timers at most (keepalive, ack, backoff, helper ...), so a flat vector
//! beats any tree. `earliest()` is what the reactor arms its timerfd with and what `local.prep_suspend`
//! reports (LOCAL_API.md §12); deadlines marked *lazy* (cache expiry) are left out of both, since firing
//! them late costs nothing and they must not keep a battery board awake. Pure: no clock is read here.

use crate::time::Instant;

#[derive(Clone, Debug)]
struct Entry<K> {
    key: K,
    at: Instant,
    lazy: bool,
}

/// Deadlines keyed by `K`; setting a key again replaces its deadline.
#[derive(Clone, Debug)]
pub struct TimerWheel<K> {
    entries: Vec<Entry<K>>,
}

impl<K> Default for TimerWheel<K> {
    fn default() -> Self {
        TimerWheel {
            entries: Vec::new(),
        }
    }
}

impl<K: Copy + Eq> TimerWheel<K> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Arms `key` at `at`, replacing any earlier deadline for it.
    pub fn set(&mut self, key: K, at: Instant) {
        self.insert(key, at, false);
    }

    /// Arms a deadline that only expires a cache: it does not wake the daemon nor shorten a suspend.
    pub fn set_lazy(&mut self, key: K, at: Instant) {
        self.insert(key, at, true);
    }

    fn insert(&mut self, key: K, at: Instant, lazy: bool) {
        match self.entries.iter_mut().find(|e| e.key == key) {
            Some(e) => {
                e.at = at;
                e.lazy = lazy;
            }
            None => self.entries.push(Entry { key, at, lazy }),
        }
    }

    /// Disarms `key`; returns whether it was armed.
    pub fn cancel(&mut self, key: K) -> bool {
        let before = self.entries.len();
        self.entries.retain(|e| e.key != key);
        before != self.entries.len()
    }

    pub fn get(&self, key: K) -> Option<Instant> {
        self.entries.iter().find(|e| e.key == key).map(|e| e.at)
    }

    pub fn is_armed(&self, key: K) -> bool {
        self.get(key).is_some()
    }

    /// The earliest deadline that must wake the daemon (lazy ones excluded).
    pub fn earliest(&self) -> Option<Instant> {
        self.entries.iter().filter(|e| !e.lazy).map(|e| e.at).min()
    }

    /// The earliest deadline of any kind, lazy ones included.
    pub fn earliest_any(&self) -> Option<Instant> {
        self.entries.iter().map(|e| e.at).min()
    }

    /// Removes and returns the earliest key due at `now` (deadline <= now), one at a time so that a
    /// handler may re-arm or cancel other keys between firings. Each due key fires once, however late:
    /// after a long suspend a periodic timer fires once and its owner re-arms it from `now`.
    pub fn pop_due(&mut self, now: Instant) -> Option<K> {
        let (idx, _) = self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.at <= now)
            .min_by_key(|(_, e)| e.at)?;
        Some(self.entries.swap_remove(idx).key)
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Armed keys, lazy ones included (the month simulation samples it).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum T {
        A,
        B,
        Cache,
    }

    #[test]
    fn earliest_and_replace() {
        let mut w = TimerWheel::new();
        assert_eq!(w.earliest(), None);
        w.set(T::A, Instant(500));
        w.set(T::B, Instant(300));
        assert_eq!(w.earliest(), Some(Instant(300)));
        w.set(T::B, Instant(900));
        assert_eq!(w.earliest(), Some(Instant(500)));
        assert!(w.cancel(T::A));
        assert!(!w.cancel(T::A));
        assert_eq!(w.earliest(), Some(Instant(900)));
    }

    #[test]
    fn lazy_deadlines_do_not_wake() {
        let mut w = TimerWheel::new();
        w.set_lazy(T::Cache, Instant(10));
        assert_eq!(w.earliest(), None);
        assert_eq!(w.earliest_any(), Some(Instant(10)));
        w.set(T::A, Instant(50));
        assert_eq!(w.earliest(), Some(Instant(50)));
        assert_eq!(w.pop_due(Instant(20)), Some(T::Cache));
    }

    #[test]
    fn pop_due_in_order_each_once() {
        let mut w = TimerWheel::new();
        w.set(T::B, Instant(200));
        w.set(T::A, Instant(100));
        // A one-day jump: both overdue, each fires exactly once, earliest first.
        let now = Instant(86_400_000);
        assert_eq!(w.pop_due(now), Some(T::A));
        assert_eq!(w.pop_due(now), Some(T::B));
        assert_eq!(w.pop_due(now), None);
        assert!(w.is_empty());
    }

    #[test]
    fn nothing_due_before_deadline() {
        let mut w = TimerWheel::new();
        w.set(T::A, Instant(100));
        assert_eq!(w.pop_due(Instant(99)), None);
        assert_eq!(w.pop_due(Instant(100)), Some(T::A));
    }
}
