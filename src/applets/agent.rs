//! The `miio_agent` applet (LOCAL_API.md §10): the subscription proxy on 127.0.0.1:54320. Its
//! decisions are `proto::agent`'s; this file is the command line and a small loop on the shared
//! reactor (no tick: an idle agent sleeps until a socket or its one deadline wakes it), with the
//! daemon's connection type (`io::conn::Conn`: bounded reads, a bounded write queue, SO_SNDBUF
//! small) for the applications and for the upstream connection alike.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use log::{error, info, warn};
use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Token};

use crate::io::conn::{Conn, ReadStep};
use crate::io::log as ilog;
use crate::io::reactor::{self, Reactor, Ready, Signal};
use crate::io::sys;
use crate::proto::agent::{Agent, AgentAction};
use crate::proto::local::LocalAction;
use crate::time::Instant;
use crate::wire::json_stream::SplitError;

const USAGE: &str = "Usage: miio_agent [-h] [-D] [-l level] [-L logfile] [--port 54320] \
[--daemon-port 54322] [--max-clients 20]\n";

/// L§10 / D8: one JSON value from an application is at most 16384 bytes.
const APP_MAX_MSG: usize = 16384;
/// The daemon's own messages (commands carry cloud payloads): a larger bound, still a bound.
const UP_MAX_MSG: usize = 65536;
/// L§2: an application that does not read is closed beyond 64 KiB of waiting output.
const APP_OUT_LIMIT: usize = 64 * 1024;
/// What may wait for the daemon; beyond it the upstream connection is closed and retried.
const UP_OUT_LIMIT: usize = 256 * 1024;
/// Accepts per readiness event of the listener.
const BURST: usize = 16;

const LISTEN: Token = reactor::LOCAL_LISTEN;
const UPSTREAM: Token = Token(10);

#[derive(Debug, PartialEq, Eq)]
struct Args {
    port: u16,
    daemon_port: u16,
    max_clients: usize,
    loglevel: u8,
    logfile: Option<String>,
    daemonize: bool,
}

fn parse(args: &[String]) -> Result<Args, Option<String>> {
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
        let (name, inline) = match opt.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n, Some(v.to_string())),
            _ => (opt.as_str(), None),
        };
        let mut val = |n: &str| {
            inline
                .clone()
                .or_else(|| it.next().cloned())
                .ok_or_else(|| Some(format!("{n} needs a value")))
        };
        match name {
            "-h" | "--help" => return Err(None),
            "-D" | "--daemonize" => a.daemonize = true,
            "-l" | "--loglevel" => {
                a.loglevel = match val(name)?.parse() {
                    Ok(l @ 0..=4) => l,
                    _ => return Err(Some("-l takes 0 to 4".into())),
                }
            }
            "-L" | "--logfile" => a.logfile = Some(val(name)?),
            "--port" => {
                a.port = val(name)?
                    .parse()
                    .map_err(|_| Some("--port takes 0 to 65535".into()))?
            }
            "--daemon-port" | "--server-port" => {
                a.daemon_port = match val(name)?.parse() {
                    Ok(p @ 1..) => p,
                    _ => return Err(Some(format!("{name} takes 1 to 65535"))),
                }
            }
            "--max-clients" => {
                a.max_clients = match val(name)?.parse() {
                    Ok(n @ 1..=1000) => n,
                    _ => return Err(Some("--max-clients takes 1 to 1000".into())),
                }
            }
            _ => return Err(Some(format!("unknown option {opt}"))),
        }
    }
    Ok(a)
}

/// Entry point of the applet.
pub fn main(args: &[String]) -> i32 {
    let a = match parse(args) {
        Ok(a) => a,
        Err(why) => {
            if let Some(w) = why {
                eprintln!("miio_agent: {w}");
            }
            eprint!("{USAGE}");
            return 1;
        }
    };
    let log = match ilog::init(a.loglevel, a.logfile.as_deref()) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("miio_agent: cannot open log file: {e}");
            return 1;
        }
    };
    // Bind before detaching, so a port in use is an exit status the init script sees.
    let listener = match std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, a.port))
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
    {
        Ok(l) => TcpListener::from_std(l),
        Err(e) => {
            error!("bind 127.0.0.1:{}: {e}", a.port);
            error!("Quit, maybe another miio_agent is already running.");
            return 1;
        }
    };
    if a.daemonize {
        if let Err(e) = sys::daemonize(true) {
            error!("cannot daemonize: {e}");
            return 1;
        }
    }
    let reactor = match Reactor::new() {
        Ok(r) => r,
        Err(e) => {
            error!("cannot set up the reactor: {e}");
            return 1;
        }
    };
    match listener.local_addr() {
        Ok(l) => info!("bound: agent tcp {l}, daemon 127.0.0.1:{}", a.daemon_port),
        Err(e) => info!(
            "bound: agent tcp ? ({e}), daemon 127.0.0.1:{}",
            a.daemon_port
        ),
    }
    let mut l = Loop {
        core: Agent::new(a.max_clients),
        reactor,
        listener,
        apps: Vec::new(),
        up: None,
        daemon: SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, a.daemon_port)),
        rx: vec![0; crate::io::conn::READ_CHUNK],
        again: Vec::new(),
    };
    match l.run(&log) {
        Ok(()) => 0,
        Err(e) => {
            error!("fatal: {e}");
            1
        }
    }
}

struct App {
    conn: Conn,
    /// Input left in the kernel (backpressure, or a read that may hold more).
    unread: bool,
}

struct Up {
    conn: Conn,
    connected: bool,
}

struct Loop {
    core: Agent,
    reactor: Reactor,
    listener: TcpListener,
    apps: Vec<Option<App>>,
    up: Option<Up>,
    daemon: SocketAddr,
    rx: Vec<u8>,
    /// Sources to serve again next turn without a new edge.
    again: Vec<Token>,
}

impl Loop {
    fn run(&mut self, log: &ilog::LogHandle) -> io::Result<()> {
        self.reactor
            .registry()
            .register(&mut self.listener, LISTEN, Interest::READABLE)?;
        let now = crate::io::clock::now();
        self.run_actions(now);
        loop {
            let turn = self
                .reactor
                .wait(self.core.poll_timeout(), !self.again.is_empty())?;
            let now = turn.now;
            for s in &turn.signals {
                match s {
                    Signal::Stop => {
                        info!("stopping on signal");
                        return Ok(());
                    }
                    Signal::Reload => {
                        if let Err(e) = log.reopen() {
                            warn!("cannot reopen the log: {e}");
                        }
                    }
                    Signal::Child => {
                        sys::reap_children();
                    }
                }
            }
            self.core.tick(now);
            self.run_actions(now);
            let mut ready = turn.ready;
            for token in std::mem::take(&mut self.again) {
                match ready.iter_mut().find(|r| r.token == token) {
                    Some(r) => r.readable = true,
                    None => ready.push(Ready {
                        token,
                        readable: true,
                        writable: false,
                        closed: false,
                    }),
                }
            }
            for r in &ready {
                let more = match r.token {
                    LISTEN => self.accept(now),
                    UPSTREAM => self.upstream_ready(now, r),
                    Token(t) if t >= reactor::CLIENT_BASE => {
                        self.app_ready(now, t - reactor::CLIENT_BASE, r)
                    }
                    _ => false,
                };
                if more && !self.again.contains(&r.token) {
                    self.again.push(r.token);
                }
            }
            self.reactor.recycle(ready);
        }
    }

    /// Executes what the core decided, in order, until it decides nothing more.
    fn run_actions(&mut self, now: Instant) {
        loop {
            let acts = self.core.take_actions();
            if acts.is_empty() {
                return;
            }
            for a in acts {
                match a {
                    AgentAction::App(LocalAction::Send(slot, text)) => {
                        let Some(app) = self.apps.get_mut(slot).and_then(Option::as_mut) else {
                            continue;
                        };
                        if app.conn.send(text).is_err() {
                            crate::warn_limited!(
                                now,
                                "agent: client {slot} does not read; closing"
                            );
                            app.conn.reset_on_close();
                            self.drop_app(slot);
                        }
                    }
                    AgentAction::App(LocalAction::Close(slot)) => {
                        if let Some(app) = self.apps.get_mut(slot).and_then(Option::as_mut) {
                            // The core has forgotten it already: output the kernel cannot take now
                            // (a client that does not read) is not waited for, so the slot is free.
                            if app.conn.pending_out() > 0 {
                                app.conn.reset_on_close();
                            }
                            self.drop_app(slot);
                        }
                    }
                    AgentAction::Up(text) => {
                        let overflow = match self.up.as_mut() {
                            Some(u) if u.connected => u.conn.send(text).is_err(),
                            _ => false,
                        };
                        if overflow {
                            crate::warn_limited!(
                                now,
                                "agent: the daemon does not read; reconnecting"
                            );
                            self.up_down(now);
                        }
                    }
                    AgentAction::Connect => self.connect(now),
                }
            }
        }
    }

    /// Forgets an application's socket (the core is told too, if it still knows it).
    fn drop_app(&mut self, slot: usize) {
        if let Some(s) = self.apps.get_mut(slot) {
            *s = None;
        }
        self.core.closed(slot);
    }

    fn connect(&mut self, now: Instant) {
        self.up = None;
        let res = TcpStream::connect(self.daemon).and_then(|s| {
            let mut conn = Conn::new(s, UP_MAX_MSG, UP_OUT_LIMIT);
            self.reactor.registry().register(
                &mut conn.stream,
                UPSTREAM,
                Interest::READABLE | Interest::WRITABLE,
            )?;
            Ok(conn)
        });
        match res {
            Ok(conn) => {
                self.up = Some(Up {
                    conn,
                    connected: false,
                })
            }
            Err(e) => {
                log::debug!("agent: connect {}: {e}", self.daemon);
                self.core.upstream_failed(now);
            }
        }
    }

    /// The upstream socket is gone: the core retries in 3 s.
    fn up_down(&mut self, now: Instant) {
        let was = self.up.take().is_some_and(|u| u.connected);
        if was {
            self.core.upstream_closed(now);
        } else {
            self.core.upstream_failed(now);
        }
        self.again.retain(|t| *t != UPSTREAM);
        // Applications held back by the daemon's queue are read again (the core drops what they
        // send while the daemon is away).
        self.wake_unread();
    }

    /// Serves next turn the applications whose input was left in the kernel for backpressure.
    fn wake_unread(&mut self) {
        for (i, a) in self.apps.iter().enumerate() {
            if a.as_ref().is_some_and(|a| a.unread) {
                let t = Token(reactor::CLIENT_BASE + i);
                if !self.again.contains(&t) {
                    self.again.push(t);
                }
            }
        }
    }

    fn accept(&mut self, now: Instant) -> bool {
        for _ in 0..BURST {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    crate::warn_limited!(now, "agent: accept: {e}");
                    return false;
                }
            };
            let slot = match self.apps.iter().position(Option::is_none) {
                Some(i) => i,
                None => {
                    self.apps.push(None);
                    self.apps.len() - 1
                }
            };
            if !self.core.accept(now, slot) {
                continue; // dropped: closed
            }
            let mut conn = Conn::new(stream, APP_MAX_MSG, APP_OUT_LIMIT);
            if let Err(e) = self.reactor.registry().register(
                &mut conn.stream,
                Token(reactor::CLIENT_BASE + slot),
                Interest::READABLE | Interest::WRITABLE,
            ) {
                crate::warn_limited!(now, "agent: register client: {e}");
                self.core.closed(slot);
                continue;
            }
            self.apps[slot] = Some(App {
                conn,
                unread: false,
            });
        }
        true
    }

    /// Whether the daemon's queue has room for more of the applications' input (else their
    /// input waits in the kernel, and TCP slows them down).
    fn up_has_room(&self) -> bool {
        self.up.as_ref().is_none_or(|u| u.conn.wants_input())
    }

    fn app_ready(&mut self, now: Instant, slot: usize, r: &Ready) -> bool {
        let room = self.up_has_room();
        let Some(app) = self.apps.get_mut(slot).and_then(Option::as_mut) else {
            return false;
        };
        if r.writable && app.conn.flush().is_err() {
            self.drop_app(slot);
            return false;
        }
        if !(r.readable || app.unread) {
            return false;
        }
        app.unread = !app.conn.wants_input() || !room;
        if app.unread {
            return false;
        }
        let step = app.conn.read_once(r.closed, &mut self.rx);
        while let Some(v) = self.apps[slot].as_mut().and_then(|a| a.conn.next_piece()) {
            match v {
                Ok(piece) => self.core.app_message(now, slot, piece),
                Err(e) => {
                    self.core.app_framing_error(now, slot, e);
                    self.run_actions(now);
                    return false;
                }
            }
            self.run_actions(now);
        }
        if self.apps[slot].is_none() {
            return false;
        }
        match step {
            ReadStep::Eof => {
                self.drop_app(slot);
                false
            }
            ReadStep::More => true,
            ReadStep::Drained => false,
        }
    }

    /// Finishes a non-blocking connect. False: not yet, or it failed (the core was told).
    fn finish_connect(&mut self, now: Instant) -> bool {
        let Some(u) = self.up.as_mut() else {
            return false;
        };
        let s = &u.conn.stream;
        let failed = match s.take_error() {
            Ok(Some(_)) | Err(_) => true,
            Ok(None) => match s.peer_addr() {
                Ok(_) => false,
                Err(e) if e.kind() == io::ErrorKind::NotConnected => return false,
                Err(_) => true,
            },
        };
        if failed {
            self.up_down(now);
            return false;
        }
        u.connected = true;
        self.core.upstream_connected(now);
        self.run_actions(now);
        true
    }

    fn upstream_ready(&mut self, now: Instant, r: &Ready) -> bool {
        if self.up.as_ref().is_some_and(|u| !u.connected) && !self.finish_connect(now) {
            return false;
        }
        let Some(u) = self.up.as_mut() else {
            return false;
        };
        if r.writable {
            if u.conn.flush().is_err() {
                self.up_down(now);
                return false;
            }
            // Room again: the applications held back by backpressure are read next turn.
            if u.conn.wants_input() {
                self.wake_unread();
            }
        }
        if !r.readable {
            return false;
        }
        let Some(u) = self.up.as_mut() else {
            return false;
        };
        let step = u.conn.read_once(r.closed, &mut self.rx);
        while let Some(v) = self.up.as_mut().and_then(|u| u.conn.next_piece()) {
            match v {
                Ok(piece) => self.core.upstream_message(now, piece),
                Err(e) => {
                    let e: SplitError = e;
                    warn!("agent: from the daemon: {e}; reconnecting");
                    self.up_down(now);
                    self.run_actions(now);
                    return false;
                }
            }
            self.run_actions(now);
        }
        match step {
            ReadStep::Eof => {
                self.up_down(now);
                self.run_actions(now);
                false
            }
            ReadStep::More => self.up.is_some(),
            ReadStep::Drained => false,
        }
    }
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
        assert_eq!(parse(&argv("--server-port=7")).unwrap().daemon_port, 7);
        assert_eq!(parse(&[]).unwrap().port, 54320);
        assert_eq!(parse(&argv("-h")), Err(None));
        for bad in [
            "--port",
            "--port x",
            "--max-clients 0",
            "-l 9",
            "--daemon-port 0",
            "-x",
        ] {
            assert!(matches!(parse(&argv(bad)), Err(Some(_))), "{bad}");
        }
    }
}
