//! Rate limits for the log lines a peer can cause (a local client, a LAN host, the cloud, a helper).
//!
//! Each kind of line is logged at most once per 10 s window for the whole process, not per source (a
//! LAN source is easy to spoof). The first line of a window is logged; the ones after it in the
//! window are only counted, and the count is appended to the next line of that kind that is logged
//! (`… (N more since the last one logged)`). No timer is set for that summary: it is printed at the
//! next occurrence after the window, or never. A board must not wake up to print a log line.
//!
//! Pure: no clock is read here; the caller passes `now`, as every `handle_*` in `proto/` has one.
//! The state is one static per call site (the macros declare it), so no machine carries log state.

use core::fmt;
use core::sync::atomic::{AtomicU32, Ordering::Relaxed};

use crate::time::Instant;

/// The length of one window, in ms.
pub const WINDOW_MS: u64 = 10_000;
const WINDOW_S: u32 = (WINDOW_MS / 1000) as u32;

/// The state of one kind of line. Atomics only so that it can be a `static`; the daemon logs
/// from one thread, and a race between threads would cost a line, never memory safety. 32-bit
/// atomics only: 32-bit MIPS has no 64-bit ones, so the window is kept in whole seconds.
pub struct RateLimit {
    /// Start of the open window in whole seconds, plus 1; 0: no line logged yet.
    open: AtomicU32,
    /// Lines not logged since the last one that was.
    more: AtomicU32,
}

impl RateLimit {
    #[allow(clippy::new_without_default)]
    pub const fn new() -> RateLimit {
        RateLimit {
            open: AtomicU32::new(0),
            more: AtomicU32::new(0),
        }
    }

    /// One occurrence at `now`. `Some(n)`: log it, `n` were not logged before it. `None`: quiet.
    #[inline(never)]
    pub fn hit(&self, now: Instant) -> Option<u32> {
        // Seconds since boot fit 32 bits for 136 years; the far future saturates.
        let secs = (now.millis() / 1000).min(u64::from(u32::MAX - 1)) as u32;
        let open = self.open.load(Relaxed);
        if open != 0 && secs < (open - 1).saturating_add(WINDOW_S) {
            let _ = self
                .more
                .fetch_update(Relaxed, Relaxed, |n| n.checked_add(1));
            return None;
        }
        self.open.store(secs + 1, Relaxed);
        Some(self.more.swap(0, Relaxed))
    }
}

/// The summary suffix: nothing for 0.
pub struct More(pub u32);

impl fmt::Display for More {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 > 0 {
            write!(f, " ({} more since the last one logged)", self.0)?;
        }
        Ok(())
    }
}

/// Writes one limited line with its count. One function for every call site: the line's format
/// and the log metadata are built here once instead of at each site (flash size).
#[inline(never)]
pub fn emit(level: log::Level, args: fmt::Arguments<'_>, more: u32) {
    log::log!(target: "miio", level, "{}{}", args, More(more));
}

/// `log_limited!(level, now, "format", args…)`: a log line that a peer can cause, rate limited
/// (module doc). The call site is the kind.
#[macro_export]
macro_rules! log_limited {
    ($lvl:expr, $now:expr, $($arg:tt)+) => {{
        static KIND: $crate::ratelimit::RateLimit = $crate::ratelimit::RateLimit::new();
        if let Some(n) = KIND.hit($now) {
            $crate::ratelimit::emit($lvl, format_args!($($arg)+), n);
        }
    }};
}

/// `warn!` for a line a peer can cause: see [`log_limited!`].
#[macro_export]
macro_rules! warn_limited {
    ($now:expr, $($arg:tt)+) => { $crate::log_limited!(::log::Level::Warn, $now, $($arg)+) };
}

/// `info!` for a line a peer can cause: see [`log_limited!`].
#[macro_export]
macro_rules! info_limited {
    ($now:expr, $($arg:tt)+) => { $crate::log_limited!(::log::Level::Info, $now, $($arg)+) };
}

/// `error!` for a line a peer can cause: see [`log_limited!`].
#[macro_export]
macro_rules! error_limited {
    ($now:expr, $($arg:tt)+) => { $crate::log_limited!(::log::Level::Error, $now, $($arg)+) };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64) -> Instant {
        Instant::from_millis(ms)
    }

    #[test]
    fn first_logged_then_counted_then_summarised() {
        let r = RateLimit::new();
        assert_eq!(r.hit(at(0)), Some(0));
        for t in 1..1000 {
            assert_eq!(r.hit(at(t)), None);
        }
        assert_eq!(r.hit(at(WINDOW_MS - 1)), None);
        // The next occurrence after the window carries the count, and opens a new window.
        assert_eq!(r.hit(at(WINDOW_MS)), Some(1000));
        assert_eq!(r.hit(at(WINDOW_MS + 5)), None);
        // Much later: the summary of the one in between, then quiet counting again.
        assert_eq!(r.hit(at(3_600_000)), Some(1));
        assert_eq!(r.hit(at(3_600_000)), None);
    }

    #[test]
    fn a_flood_logs_one_line_per_window() {
        let r = RateLimit::new();
        // 100,000 occurrences, one per ms, over 100 s: 10 lines.
        let logged = (0..100_000).filter(|&t| r.hit(at(t)).is_some()).count();
        assert_eq!(logged, 10);
    }

    #[test]
    fn kinds_are_independent_and_a_quiet_kind_logs_every_time() {
        let a = RateLimit::new();
        let b = RateLimit::new();
        assert_eq!(a.hit(at(0)), Some(0));
        assert_eq!(a.hit(at(1)), None);
        assert_eq!(b.hit(at(2)), Some(0));
        assert_eq!(b.hit(at(2 + WINDOW_MS)), Some(0));
        assert_eq!(b.hit(at(2 + 2 * WINDOW_MS)), Some(0));
    }

    #[test]
    fn boot_time_zero_and_the_far_future_do_not_overflow() {
        let r = RateLimit::new();
        assert_eq!(r.hit(at(u64::MAX - 1)), Some(0));
        assert_eq!(r.hit(at(u64::MAX - 1)), None);
        let r = RateLimit::new();
        assert_eq!(r.hit(Instant::ZERO), Some(0));
        assert_eq!(r.hit(Instant::ZERO), None);
    }

    #[test]
    fn suffix_only_when_something_was_dropped() {
        assert_eq!(More(0).to_string(), "");
        assert_eq!(More(3).to_string(), " (3 more since the last one logged)");
    }

    #[test]
    fn the_macros_take_a_format_with_and_without_arguments() {
        for i in 0..3 {
            crate::warn_limited!(at(7), "site one {i}");
            crate::error_limited!(at(7), "site two {}", i);
        }
        crate::info_limited!(at(7), "site three");
    }
}
