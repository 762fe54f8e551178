//! Name resolution off the reactor loop (PROTOCOL.md §5.1: it must never block the reactor).
//!
//! `getaddrinfo` has no non-blocking form, so each lookup runs on a short-lived thread that pushes
//! its answer onto a shared list and wakes the reactor with a `mio::Waker`. Only IPv4 is kept.
//! (A list under a mutex, not `std::sync::mpsc`: the channel's code cost ~4 KB of flash.)
//!
//! The thread is a bare detached `pthread`, not a `std::thread`: nothing joins it, names it from
//! outside or needs its `Thread` handle, and std's spawn machinery (the handle, spawn hooks, the
//! stack-overflow guard registry) cost ~5 KB of flash on every board (README "Static builds").

use std::io;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};

use mio::{Registry, Token, Waker};

/// One finished lookup: the tag the caller gave, and the addresses or the error text.
pub struct Answer<T> {
    pub tag: T,
    pub result: Result<Vec<Ipv4Addr>, String>,
}

pub struct Resolver<T> {
    waker: Arc<Waker>,
    /// Answers in the order the lookups finished.
    done: Arc<Mutex<Vec<Answer<T>>>>,
}

impl<T: Send + 'static> Resolver<T> {
    pub fn new(registry: &Registry, token: Token) -> std::io::Result<Self> {
        Ok(Resolver {
            waker: Arc::new(Waker::new(registry, token)?),
            done: Arc::new(Mutex::new(Vec::new())),
        })
    }

    /// Starts a lookup of `host`; an IP literal is answered on the same path without DNS. The
    /// answer is addresses only: the caller adds its `_port`.
    pub fn lookup(&self, tag: T, host: &str, _port: u16) {
        let job = Box::new(Job {
            tag,
            host: host.to_owned(),
            done: self.done.clone(),
            waker: self.waker.clone(),
        });
        if let Err(e) = detached(job) {
            log::warn!("cannot start a resolver thread: {e}");
        }
    }

    /// Answers that have arrived; call when the resolver token is ready.
    pub fn drain(&self) -> Vec<Answer<T>> {
        std::mem::take(&mut *self.done.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// One lookup, owned by its thread.
struct Job<T> {
    tag: T,
    host: String,
    done: Arc<Mutex<Vec<Answer<T>>>>,
    waker: Arc<Waker>,
}

impl<T> Job<T> {
    fn run(self) {
        let Job {
            tag,
            host,
            done,
            waker,
        } = self;
        let result = match super::sys::lookup_ipv4(&host) {
            Ok(v) if v.is_empty() => Err(format!("{host}: no IPv4 address")),
            Ok(v) => Ok(v),
            Err(e) => Err(format!("{host}: {e}")),
        };
        // A poisoned lock still holds a usable list (no holder leaves it half-changed).
        let mut list = done.lock().unwrap_or_else(|p| p.into_inner());
        list.push(Answer { tag, result });
        drop(list);
        let _ = waker.wake();
    }
}

/// The thread's stack: `getaddrinfo` and the formatting above fit in a fraction of it.
const STACK: usize = 64 * 1024;

/// Runs `job` on a new detached thread named `resolve`.
fn detached<T: Send + 'static>(job: Box<Job<T>>) -> io::Result<()> {
    super::sys::spawn_detached(STACK, c"resolve", Box::new(move || job.run()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use mio::{Events, Poll};
    use std::time::{Duration, Instant};

    /// Waits (with a deadline) until `n` answers arrived through the waker.
    fn answers(poll: &mut Poll, r: &Resolver<u32>, n: usize) -> Vec<Answer<u32>> {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut got = Vec::new();
        let mut events = Events::with_capacity(4);
        while got.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "only {} of {n} lookups answered",
                got.len()
            );
            poll.poll(&mut events, Some(left)).unwrap();
            got.extend(r.drain());
        }
        got
    }

    #[test]
    fn lookups_run_on_their_own_threads_and_wake_the_loop() {
        let mut poll = Poll::new().unwrap();
        let r = Resolver::new(poll.registry(), Token(9)).unwrap();
        r.lookup(1, "127.0.0.1", 80);
        r.lookup(2, "localhost", 80);
        r.lookup(3, "::1", 80);
        let mut got = answers(&mut poll, &r, 3);
        got.sort_by_key(|a| a.tag);
        assert_eq!(got[0].result, Ok(vec![Ipv4Addr::LOCALHOST]));
        assert!(
            got[1]
                .result
                .as_ref()
                .is_ok_and(|v| v.contains(&Ipv4Addr::LOCALHOST)),
            "localhost: {:?}",
            got[1].result
        );
        assert_eq!(got[2].result, Err("::1: no IPv4 address".to_string()));
    }
}
