//! Time values of our own, in whole milliseconds on the daemon's one clock (CLOCK_BOOTTIME, read only by
//! `io::clock`). Pure: nothing here reads a clock, so state machines and tests can run on virtual time.

use core::fmt;
use core::ops::{Add, AddAssign, Sub};

/// A point on the boot-time clock, in milliseconds since boot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Instant(pub u64);

/// A span of time in milliseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Duration(pub u64);

impl Instant {
    pub const ZERO: Instant = Instant(0);

    pub const fn from_millis(ms: u64) -> Self {
        Instant(ms)
    }
    pub const fn millis(self) -> u64 {
        self.0
    }
    /// Whole seconds since boot (floor), as the device stamp wants them (PROTOCOL.md §4.3).
    pub const fn secs(self) -> u64 {
        self.0 / 1000
    }
    /// `self - earlier`, or zero when `earlier` is later.
    pub fn saturating_since(self, earlier: Instant) -> Duration {
        Duration(self.0.saturating_sub(earlier.0))
    }
}

impl Duration {
    pub const ZERO: Duration = Duration(0);

    pub const fn from_millis(ms: u64) -> Self {
        Duration(ms)
    }
    pub const fn from_secs(s: u64) -> Self {
        Duration(s.saturating_mul(1000))
    }
    pub const fn millis(self) -> u64 {
        self.0
    }
    /// Whole seconds, rounded up: what a sleeper may safely wait (LOCAL_API.md §12).
    pub const fn secs_ceil(self) -> u64 {
        self.0.div_ceil(1000)
    }
    /// Parses seconds with an optional fraction ("20", "0.5", "1.25"), as the timer options take them
    /// (PROTOCOL.md §5.6). Millisecond precision; anything finer is truncated.
    pub fn parse_secs(s: &str) -> Option<Duration> {
        let s = s.trim();
        let (int, frac) = match s.split_once('.') {
            Some((i, f)) => (i, f),
            None => (s, ""),
        };
        if int.is_empty() && frac.is_empty() {
            return None;
        }
        if !int.bytes().all(|b| b.is_ascii_digit()) || !frac.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let whole: u64 = if int.is_empty() {
            0
        } else {
            crate::cli::uint(int)?
        };
        let mut ms = 0u64;
        for (i, b) in frac.bytes().take(3).enumerate() {
            ms += u64::from(b - b'0') * [100, 10, 1][i];
        }
        whole.checked_mul(1000)?.checked_add(ms).map(Duration)
    }
}

impl Add<Duration> for Instant {
    type Output = Instant;
    fn add(self, d: Duration) -> Instant {
        Instant(self.0.saturating_add(d.0))
    }
}

impl AddAssign<Duration> for Instant {
    fn add_assign(&mut self, d: Duration) {
        *self = *self + d;
    }
}

impl Sub<Instant> for Instant {
    type Output = Duration;
    fn sub(self, earlier: Instant) -> Duration {
        self.saturating_since(earlier)
    }
}

impl Add for Duration {
    type Output = Duration;
    fn add(self, d: Duration) -> Duration {
        Duration(self.0.saturating_add(d.0))
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:03}s", self.0 / 1000, self.0 % 1000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_secs_accepts_fractions() {
        assert_eq!(Duration::parse_secs("20"), Some(Duration(20_000)));
        assert_eq!(Duration::parse_secs("0.5"), Some(Duration(500)));
        assert_eq!(Duration::parse_secs("1.25"), Some(Duration(1250)));
        assert_eq!(Duration::parse_secs(".1"), Some(Duration(100)));
        assert_eq!(Duration::parse_secs("2.0009"), Some(Duration(2000)));
    }

    #[test]
    fn parse_secs_refuses_junk() {
        for bad in [
            "",
            ".",
            "-1",
            "1e3",
            "abc",
            "1.2.3",
            " 1 2",
            "99999999999999999999",
        ] {
            assert_eq!(Duration::parse_secs(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn arithmetic_saturates() {
        assert_eq!(Instant(5) - Instant(9), Duration::ZERO);
        assert_eq!(Instant(u64::MAX) + Duration(1), Instant(u64::MAX));
        assert_eq!(Duration(7200).secs_ceil(), 8);
        assert_eq!(Duration(13000).secs_ceil(), 13);
        assert_eq!(Instant(12_999).secs(), 12);
    }
}
