//! Name resolution off the reactor loop (PROTOCOL.md §5.1: it must never block the reactor).
//!
//! `getaddrinfo` has no non-blocking form, so each lookup runs on a short-lived thread that sends
//! its answer through a channel and wakes the reactor with a `mio::Waker`. Only IPv4 is kept.

use std::net::{Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;

use mio::{Registry, Token, Waker};

/// One finished lookup: the tag the caller gave, and the addresses or the error text.
pub struct Answer<T> {
    pub tag: T,
    pub result: Result<Vec<Ipv4Addr>, String>,
}

pub struct Resolver<T> {
    waker: Arc<Waker>,
    tx: Sender<Answer<T>>,
    rx: Receiver<Answer<T>>,
}

impl<T: Send + 'static> Resolver<T> {
    pub fn new(registry: &Registry, token: Token) -> std::io::Result<Self> {
        let (tx, rx) = channel();
        Ok(Resolver {
            waker: Arc::new(Waker::new(registry, token)?),
            tx,
            rx,
        })
    }

    /// Starts a lookup of `host`; an IP literal is answered on the same path without DNS.
    pub fn lookup(&self, tag: T, host: &str, port: u16) {
        let tx = self.tx.clone();
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
                let _ = tx.send(Answer { tag, result });
                let _ = waker.wake();
            });
        if let Err(e) = spawned {
            log::warn!("cannot start a resolver thread: {e}");
        }
    }

    /// Answers that have arrived; call when the resolver token is ready.
    pub fn drain(&self) -> Vec<Answer<T>> {
        self.rx.try_iter().collect()
    }
}
