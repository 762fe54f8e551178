//! Name resolution off the reactor loop (PROTOCOL.md §5.1: it must never block the reactor).
//!
//! `getaddrinfo` has no non-blocking form, so each lookup runs on a short-lived thread that pushes
//! its answer onto a shared list and wakes the reactor with a `mio::Waker`. Only IPv4 is kept.
//! (A list under a mutex, not `std::sync::mpsc`: the channel's code cost ~4 KB of flash.)

use std::net::{Ipv4Addr, SocketAddr, ToSocketAddrs};
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

    /// Starts a lookup of `host`; an IP literal is answered on the same path without DNS.
    pub fn lookup(&self, tag: T, host: &str, port: u16) {
        let done = self.done.clone();
        let waker = self.waker.clone();
        let host = host.to_owned();
        let spawned = std::thread::Builder::new()
            .name("resolve".into())
            .stack_size(64 * 1024)
            .spawn(move || {
                let result = match (host.as_str(), port).to_socket_addrs() {
                    Ok(it) => {
                        let v: Vec<Ipv4Addr> = it
                            .filter_map(|a| match a {
                                SocketAddr::V4(a) => Some(*a.ip()),
                                SocketAddr::V6(_) => None,
                            })
                            .collect();
                        if v.is_empty() {
                            Err(format!("{host}: no IPv4 address"))
                        } else {
                            Ok(v)
                        }
                    }
                    Err(e) => Err(format!("{host}: {e}")),
                };
                // A poisoned lock still holds a usable list (no holder leaves it half-changed).
                let mut list = done.lock().unwrap_or_else(|p| p.into_inner());
                list.push(Answer { tag, result });
                drop(list);
                let _ = waker.wake();
            });
        if let Err(e) = spawned {
            log::warn!("cannot start a resolver thread: {e}");
        }
    }

    /// Answers that have arrived; call when the resolver token is ready.
    pub fn drain(&self) -> Vec<Answer<T>> {
        std::mem::take(&mut *self.done.lock().unwrap_or_else(|p| p.into_inner()))
    }
}
