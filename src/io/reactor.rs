//! The one mio `Poll` of a process (ARCHITECTURE.md §4).
//!
//! - Fixed tokens for the daemon's sources; clients get `CLIENT_BASE + slot`.
//! - No fixed tick and no poll timeout: the wait ends at the earliest deadline through one timerfd on
//!   CLOCK_BOOTTIME armed absolute at that deadline, so a deadline that passed while the board slept
//!   fires at once on resume (an `epoll_wait` timeout runs on CLOCK_MONOTONIC and would fire late).
//!   The timerfd is re-armed only when the deadline changes: an idle daemon makes no syscalls.
//! - Signals only write a byte to a self-pipe; the turn reports them.
//! - One clock read per turn, right after `poll()` returns.
//! - Fairness: a handler reads a bounded amount per turn and asks for another turn when the source
//!   may hold more; the daemon then passes `busy` and the wait does not block.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, OwnedFd};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Registry, Token};

use super::{clock, sys};
use crate::time::Instant;

pub const SIGNAL: Token = Token(0);
pub const TIMER: Token = Token(1);
pub const CLOUD: Token = Token(2);
pub const LAN: Token = Token(3);
pub const LOCAL_LISTEN: Token = Token(4);
pub const BLE_LISTEN: Token = Token(5);
pub const RESOLVER: Token = Token(6);
pub const MDNS: Token = Token(7);
pub const MQTT: Token = Token(8);
pub const CTL: Token = Token(9);
/// Connection tokens start here: `Token(CLIENT_BASE + slot)`.
pub const CLIENT_BASE: usize = 64;

/// What a signal asks the process to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    /// SIGTERM or SIGINT: close cleanly, exit 0.
    Stop,
    /// SIGHUP: reopen the log, re-read the data files.
    Reload,
    /// SIGCHLD: reap children.
    Child,
}

/// One readiness event, copied out of mio's buffer so handlers may borrow the reactor again.
#[derive(Clone, Copy, Debug)]
pub struct Ready {
    pub token: Token,
    pub readable: bool,
    pub writable: bool,
    /// Error or hang-up; treat as a hint and read to find out.
    pub closed: bool,
}

impl Ready {
    /// What one mio event says. `closed` is the peer's FIN or RST or a socket error, reported
    /// once: an end that arrived with data is still unread after a short read (`Conn::read_once`).
    pub fn of(ev: &mio::event::Event) -> Ready {
        Ready {
            token: ev.token(),
            readable: ev.is_readable() || ev.is_read_closed(),
            writable: ev.is_writable(),
            closed: ev.is_error() || ev.is_read_closed() || ev.is_write_closed(),
        }
    }
}

/// The result of one wait.
#[derive(Debug, Default)]
pub struct Turn {
    pub now: Instant,
    pub signals: Vec<Signal>,
    pub ready: Vec<Ready>,
}

pub struct Reactor {
    poll: Poll,
    events: Events,
    timer: File,
    armed: Option<Instant>,
    sig_read: File,
    _sig_write: OwnedFd,
    /// The last turn's ready list, handed back by [`Reactor::recycle`]: its buffer is reused, so
    /// a turn allocates nothing.
    spare: Vec<Ready>,
}

impl Reactor {
    /// Creates the poll, the CLOCK_BOOTTIME timerfd and the signal self-pipe, and installs the
    /// handlers (TERM, INT, HUP, CHLD; PIPE ignored).
    pub fn new() -> io::Result<Reactor> {
        let poll = Poll::new()?;
        let timer = File::from(sys::timerfd_boottime()?);
        let (r, w) = sys::pipe()?;
        poll.registry()
            .register(&mut SourceFd(&timer.as_raw_fd()), TIMER, Interest::READABLE)?;
        poll.registry()
            .register(&mut SourceFd(&r.as_raw_fd()), SIGNAL, Interest::READABLE)?;
        sys::install_signal_pipe(
            w.as_raw_fd(),
            &[libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGCHLD],
        )?;
        Ok(Reactor {
            poll,
            events: Events::with_capacity(64),
            timer,
            armed: None,
            sig_read: File::from(r),
            _sig_write: w,
            spare: Vec::new(),
        })
    }

    /// Gives a turn's ready list back, for the next turn to reuse its buffer.
    pub fn recycle(&mut self, ready: Vec<Ready>) {
        self.spare = ready;
    }

    pub fn registry(&self) -> &Registry {
        self.poll.registry()
    }

    /// Blocks until a source is ready, a signal arrives or `deadline` passes (never on a tick).
    /// With `busy` (a socket still holds input the last turn left unread: mio is edge-triggered, so
    /// no new event will say so) it only collects what is ready and returns at once.
    pub fn wait(&mut self, deadline: Option<Instant>, busy: bool) -> io::Result<Turn> {
        if needs_rearm(deadline, self.armed) {
            sys::timerfd_arm(self.timer.as_raw_fd(), deadline.map(|d| d.millis()))?;
            self.armed = deadline;
        }
        loop {
            let timeout = busy.then_some(std::time::Duration::ZERO);
            match self.poll.poll(&mut self.events, timeout) {
                Ok(()) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        let mut ready = std::mem::take(&mut self.spare);
        ready.clear();
        let mut turn = Turn {
            now: clock::now(),
            ready,
            ..Turn::default()
        };
        let mut signalled = false;
        let mut expired = false;
        for ev in self.events.iter() {
            match ev.token() {
                TIMER => expired = true,
                SIGNAL => signalled = true,
                _ => turn.ready.push(Ready::of(ev)),
            }
        }
        // The pipe is read only when it reported readable, and then drained: a signal written
        // after that raises a new edge, so nothing waits unseen and a wake that had no signal
        // costs no read(2).
        let mut buf = [0u8; 64];
        if signalled {
            while let Ok(n @ 1..) = self.sig_read.read(&mut buf) {
                for &b in &buf[..n] {
                    let s = match i32::from(b) {
                        libc::SIGTERM | libc::SIGINT => Signal::Stop,
                        libc::SIGHUP => Signal::Reload,
                        libc::SIGCHLD => Signal::Child,
                        _ => continue,
                    };
                    if !turn.signals.contains(&s) {
                        turn.signals.push(s);
                    }
                }
            }
        }
        let mut exp = [0u8; 8];
        if expired && self.timer.read(&mut exp).is_ok() {
            // The expiry is consumed; the armed deadline is spent.
            self.armed = None;
        }
        Ok(turn)
    }
}

/// Whether the timerfd must be set again for `deadline` when `armed` is what it holds: whenever
/// they differ, a later deadline too. Leaving an earlier expiry armed (the ack deadline of a
/// report, cancelled when the ack came) would save the two `timerfd_settime` of a report but wake
/// the board once for nothing an ack timeout later; for a device that reports less often than
/// dozens of times per ack timeout, that wake costs more than the calls it saves.
fn needs_rearm(deadline: Option<Instant>, armed: Option<Instant>) -> bool {
    deadline != armed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_timer_follows_the_earliest_deadline_both_ways() {
        let (t1, t2) = (Instant(1000), Instant(2000));
        assert!(needs_rearm(Some(t1), None));
        assert!(needs_rearm(Some(t1), Some(t2)));
        // A later deadline, or none: set again, so no expiry wakes an idle board for nothing.
        assert!(needs_rearm(Some(t2), Some(t1)));
        assert!(needs_rearm(None, Some(t1)));
        assert!(!needs_rearm(Some(t1), Some(t1)));
        assert!(!needs_rearm(None, None));
    }
}
