//! The daemon's one clock: CLOCK_BOOTTIME in ms, so time asleep counts (PROTOCOL.md §4.3, D10).
//! The reactor reads it once per turn and hands that `now` to every handler of the turn.

use crate::time::Instant;

pub fn now() -> Instant {
    Instant::from_millis(super::sys::boottime_ms())
}
