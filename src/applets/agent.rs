//! The `miio_agent` applet (LOCAL_API.md §10): the subscription proxy on 127.0.0.1:54320. Its
//! decisions are `proto::agent`'s; this file is the command line and a small loop on the shared
//! reactor (no tick: an idle agent sleeps until a socket or its one deadline wakes it), with the
//! daemon's connection type (`io::conn::Conn`: bounded reads, a bounded write queue, SO_SNDBUF
//! small) for the applications and for the upstream connection alike. The core drives the sockets
//! through [`proto::agent::Io`](crate::proto::agent::Io), implemented by [`Sockets`].

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::rc::Rc;

use log::{error, info};
use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Token};

use crate::io::conn::{Conn, ReadStep, READ_CHUNK};
use crate::io::log::{self as ilog, LogHandle};
use crate::io::reactor::{self, Reactor, Signal};
use crate::io::{clock, sys};
use crate::proto::agent::{self, Agent, Io};
use crate::time::Instant;

const USAGE: &str = "Usage: miio_agent [-h] [-D] [-l 0-4] [-L logfile] [--port 54320] \
[--daemon-port 54322] [--max-clients 20]\n";

/// L§10 / D8: one JSON value from an application is at most 16384 bytes.
const APP_MAX_MSG: usize = 16384;
/// The daemon's own messages (commands carry cloud payloads): a larger bound, still a bound.
const UP_MAX_MSG: usize = 65536;
/// L§2: an application that does not read is closed beyond 64 KiB of waiting output.
const APP_OUT_LIMIT: usize = 64 * 1024;
/// What may wait for the daemon; beyond it the upstream connection is closed and retried.
const UP_OUT_LIMIT: usize = 256 * 1024;
/// Accepts per turn.
const BURST: usize = 16;

const LISTEN: Token = reactor::LOCAL_LISTEN;

#[derive(Debug, PartialEq, Eq)]
struct Args {
    port: u16,
    daemon_port: u16,
    max_clients: u16,
    loglevel: u16,
    logfile: Option<String>,
    daemonize: bool,
}

/// None: `-h`, or a usage error. Every value is a number but `-L`'s, read by the crate's one
/// decimal parser (`cli::uint`, what `str::parse` accepts).
fn parse(args: &[String]) -> Option<Args> {
    let mut a = Args {
        port: 54320,
        daemon_port: 54322,
        max_clients: 20,
        loglevel: 2,
        logfile: None,
        daemonize: false,
    };
    let mut it = args.iter();
    while let Some(opt) = it.next() {
        if opt == "-D" {
            a.daemonize = true;
            continue;
        }
        let v = it.next()?;
        if opt == "-L" {
            a.logfile = Some(v.clone());
            continue;
        }
        let (slot, min, max) = match opt.as_str() {
            "-l" => (&mut a.loglevel, 0, 4),
            "--port" => (&mut a.port, 0, u16::MAX),
            "--daemon-port" => (&mut a.daemon_port, 1, u16::MAX),
            "--max-clients" => (&mut a.max_clients, 1, 1000),
            _ => return None,
        };
        *slot = crate::cli::uint(v).filter(|n| (min..=max).contains(n))?;
    }
    Some(a)
}

/// Entry point of the applet.
pub fn main(args: &[String]) -> i32 {
    let Some(a) = parse(args) else {
        eprint!("{USAGE}");
        return 1;
    };
    let Ok(log) = ilog::init(a.loglevel as u8, a.logfile.as_deref()) else {
        eprintln!("miio_agent: cannot open the log file");
        return 1;
    };
    match run(&a, &log) {
        Ok(()) => 0,
        Err(e) => {
            error!("miio_agent: {e}");
            1
        }
    }
}

/// One connection: an application or the daemon.
struct Peer {
    conn: Conn,
    /// Input to read: an edge was seen, or the last read may have left more (mio is
    /// edge-triggered), or backpressure left it in the kernel.
    rd: bool,
    /// The peer's close or an error was reported (`Conn::read_once`).
    hup: bool,
}

impl Peer {
    fn new(stream: TcpStream, max_msg: usize, out_limit: usize) -> Peer {
        Peer {
            conn: Conn::new(stream, max_msg, out_limit),
            rd: false,
            hup: false,
        }
    }
}

/// The agent's sockets: what the core drives ([`Io`]) and the loop reads.
struct Sockets {
    reactor: Reactor,
    /// By slot, token `CLIENT_BASE + slot`: slot [`UP`] is the daemon's connection, the others
    /// the applications (the core's `ConnId`). One list, so one loop serves them all.
    peers: Vec<Option<Peer>>,
    daemon: SocketAddr,
}

/// The daemon's slot.
const UP: usize = 0;

impl Io for Sockets {
    fn send(&mut self, app: usize, text: Rc<str>) -> bool {
        match self.peers.get_mut(app).and_then(Option::as_mut) {
            Some(p) => p.conn.send(text).is_ok(),
            None => true,
        }
    }

    fn close(&mut self, app: usize) {
        if let Some(p) = self.peers.get_mut(app).and_then(Option::take) {
            // Output the kernel cannot take now (a client that does not read) is not waited
            // for: a reset, and the slot is free (L§2).
            if p.conn.pending_out() > 0 {
                p.conn.reset_on_close();
            }
        }
    }

    fn up(&mut self, text: Rc<str>) -> bool {
        let ok = self.send(UP, text);
        if !ok {
            self.peers[UP] = None;
        }
        ok
    }

    fn connect(&mut self) -> bool {
        self.peers[UP] = None;
        match TcpStream::connect(self.daemon) {
            Ok(s) => self.add(s, UP, UP_MAX_MSG, UP_OUT_LIMIT),
            Err(_) => false,
        }
    }
}

impl Sockets {
    /// Registers `stream` under `slot`'s token and puts it in the slot (`slot` is at most the
    /// list's length). False: not registered, the stream dropped. One copy for the daemon's
    /// connection and the applications'.
    #[inline(never)]
    fn add(&mut self, stream: TcpStream, slot: usize, max_msg: usize, out_limit: usize) -> bool {
        let mut p = Peer::new(stream, max_msg, out_limit);
        if self
            .reactor
            .registry()
            .register(
                &mut p.conn.stream,
                Token(reactor::CLIENT_BASE + slot),
                Interest::READABLE | Interest::WRITABLE,
            )
            .is_err()
        {
            return false;
        }
        if slot == self.peers.len() {
            self.peers.push(Some(p));
        } else {
            self.peers[slot] = Some(p);
        }
        true
    }
}

/// The loop: one wait, the events noted (writes flushed at once), then one bounded read of each
/// connection with input, the daemon's first, each value handed to the core before the next.
fn run(a: &Args, log: &LogHandle) -> io::Result<()> {
    // Bound before `-D` detaches, so a port in use is an exit status the init script sees.
    let mut listener = TcpListener::bind(SocketAddr::V4(SocketAddrV4::new(
        Ipv4Addr::LOCALHOST,
        a.port,
    )))?;
    if a.daemonize {
        sys::daemonize(true)?;
    }
    let reactor = Reactor::new()?;
    reactor
        .registry()
        .register(&mut listener, LISTEN, Interest::READABLE)?;
    let port = listener.local_addr().map_or(0, |l| l.port());
    info!(
        "bound: agent tcp 127.0.0.1:{port}, daemon 127.0.0.1:{}",
        a.daemon_port
    );
    let io = Sockets {
        reactor,
        peers: vec![None],
        daemon: SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, a.daemon_port)),
    };
    let mut core = Agent::new(usize::from(a.max_clients), io, clock::now());
    let mut rx = vec![0; READ_CHUNK];
    let mut busy = false;
    let mut accepting = false;
    loop {
        let turn = core.io.reactor.wait(core.poll_timeout(), busy)?;
        let now = turn.now;
        for s in &turn.signals {
            match s {
                Signal::Stop => {
                    info!("stopping on signal");
                    return Ok(());
                }
                Signal::Reload => {
                    let _ = log.reopen();
                }
                Signal::Child => {}
            }
        }
        core.tick(now);
        for r in &turn.ready {
            if r.token == LISTEN {
                accepting = true;
                continue;
            }
            let slot = r.token.0.wrapping_sub(reactor::CLIENT_BASE);
            if core.io.peers.get(slot).is_none_or(Option::is_none) {
                continue;
            }
            if slot == UP && !core.is_connected() {
                // A connect that failed reports an error; one that succeeded, writable.
                if r.closed || !r.writable {
                    if r.closed {
                        gone(&mut core, now, UP);
                    }
                    continue;
                }
                core.upstream_connected(now);
            }
            let Some(p) = core.io.peers[slot].as_mut() else {
                continue;
            };
            if r.writable && p.conn.flush().is_err() {
                gone(&mut core, now, slot);
                continue;
            }
            p.rd |= r.readable;
            p.hup |= r.closed;
        }
        core.io.reactor.recycle(turn.ready);
        if accepting {
            accepting = accept(&mut core, &mut listener, now);
        }
        busy = accepting;
        for slot in 0..core.io.peers.len() {
            // Backpressure: an application's input waits in the kernel while the daemon's queue
            // or its own is over half full; their writable edge brings it back here.
            let room = slot == UP
                || core.io.peers[UP]
                    .as_ref()
                    .is_none_or(|u| u.conn.wants_input());
            let Some(p) = core.io.peers[slot].as_mut() else {
                continue;
            };
            if !(p.rd && room && p.conn.wants_input()) {
                continue;
            }
            let step = p.conn.read_once(p.hup, &mut rx);
            p.rd = step == ReadStep::More;
            busy |= p.rd;
            while let Some(v) = core.io.peers[slot]
                .as_mut()
                .and_then(|p| p.conn.next_piece())
            {
                match v {
                    Ok(piece) if slot == UP => core.upstream_message(now, piece),
                    Ok(piece) => core.app_message(now, slot, piece),
                    Err(e) => {
                        // The core answers an application and closes it; the splitter's error
                        // is sticky.
                        if slot != UP {
                            core.app_framing_error(now, slot, e);
                        }
                        gone(&mut core, now, slot);
                    }
                }
            }
            if step == ReadStep::Eof {
                gone(&mut core, now, slot);
            }
        }
    }
}

/// A connection is gone (its socket dropped if it is still there): an application leaves the
/// core; the daemon's is retried in 3 s.
fn gone(core: &mut Agent<Sockets>, now: Instant, slot: usize) {
    let was = core.io.peers.get_mut(slot).and_then(Option::take).is_some();
    if slot != UP {
        core.closed(slot);
    } else if was {
        core.upstream_closed(now);
    }
}

/// Accepts up to [`BURST`] applications. True: there may be more.
fn accept(core: &mut Agent<Sockets>, listener: &mut TcpListener, now: Instant) -> bool {
    for _ in 0..BURST {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return true,
            Err(_) => {
                // Out of descriptors, say: the next connection's edge tries again.
                agent::note(now, "accept failed");
                return false;
            }
        };
        let peers = &mut core.io.peers;
        // Slot UP (0) is the daemon's, always present.
        let slot = peers
            .iter()
            .skip(1)
            .position(Option::is_none)
            .map_or(peers.len(), |i| i + 1);
        if !core.accept(now, slot) {
            continue; // dropped: closed
        }
        if !core.io.add(stream, slot, APP_MAX_MSG, APP_OUT_LIMIT) {
            core.closed(slot);
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn options() {
        let a = parse(&argv(
            "--port 0 --daemon-port 5 --max-clients 3 -l 3 -L /tmp/x -D",
        ))
        .unwrap();
        assert_eq!(
            a,
            Args {
                port: 0,
                daemon_port: 5,
                max_clients: 3,
                loglevel: 3,
                logfile: Some("/tmp/x".into()),
                daemonize: true,
            }
        );
        assert_eq!(parse(&[]).unwrap().port, 54320);
        assert_eq!(parse(&argv("-h")), None);
        for bad in [
            "--port",
            "--port x",
            "--max-clients 0",
            "-l 9",
            "--daemon-port 0",
            "-x",
        ] {
            assert_eq!(parse(&argv(bad)), None, "{bad}");
        }
    }
}
