//! The daemon's loop (ARCHITECTURE.md §4): the sockets of `miio_client`, the node, and the turns of
//! the reactor. Each turn reads every ready source a bounded amount (§4.2), hands what it read to the
//! node and has the node's actions executed (`io::effects`) before the next input is taken, then
//! fires what fell due. Every deadline is the node's (§4.4), asked once per turn.
//!
//! It decides nothing: what a datagram, a message or a timeout means is the node's business; this
//! module knows sockets, tokens and bounds.

use std::io::{self, Read};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use log::{debug, error, info, warn};
use mio::net::{TcpListener, TcpStream, UdpSocket};
use mio::{Interest, Token};

use crate::cli::ClientArgs;
use crate::io::conn::{Conn, ReadStep};
use crate::io::datafiles;
use crate::io::log::LogHandle;
use crate::io::mdns::Mdns;
use crate::io::reactor::{self, Reactor, Signal};
use crate::io::resolver::Resolver;
use crate::io::sys;
use crate::io::writeq::WriteQueue;
use crate::proto::ioerr::OsError;
use crate::proto::local::Port;
use crate::proto::node::{Node, NodeConfig};
use crate::time::Instant;
use crate::wire::json_stream::SplitError;

/// The listening sockets, bound before the process detaches (a port in use is an exit status).
pub struct Sockets {
    pub(super) lan: Option<UdpSocket>,
    local: Option<TcpListener>,
    ble: Option<TcpListener>,
}

fn bind_tcp(port: u16) -> io::Result<TcpListener> {
    // D8: the local listeners are on loopback only.
    TcpListener::bind(SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)))
}

/// Binds every listener the command line asks for (0: off).
pub fn bind_all(a: &ClientArgs) -> io::Result<Sockets> {
    let lan = match a.lan_port {
        0 => None,
        p => Some(UdpSocket::bind(SocketAddr::V4(SocketAddrV4::new(
            Ipv4Addr::UNSPECIFIED,
            p,
        )))?),
    };
    let local = match a.local_port {
        0 => None,
        p => Some(bind_tcp(p)?),
    };
    let ble = match a.ble_port {
        0 => None,
        p => Some(bind_tcp(p)?),
    };
    Ok(Sockets { lan, local, ble })
}

/// A local connection and the port it came in on.
pub(super) struct Client {
    pub(super) conn: Conn,
    pub(super) port: Port,
    /// Input left unread while the client's replies wait (backpressure); read once they drain.
    unread: bool,
}

/// The cloud socket of the current attempt.
pub(super) enum CloudSock {
    Udp(UdpSocket),
    Tcp {
        stream: TcpStream,
        connected: bool,
        out: WriteQueue,
    },
}

/// Pending output of a local client before it is closed as one that never reads (L§2).
const CLIENT_OUT_LIMIT: usize = 64 * 1024;

/// Pending output of the cloud TCP link before a packet is dropped (P§5.2).
pub(super) const CLOUD_OUT_LIMIT: usize = 256 * 1024;

/// Pending output to the MQTT broker before the connection is given up as one that does not read.
#[cfg(feature = "mqtt")]
pub(super) const BROKER_OUT_LIMIT: usize = 256 * 1024;

/// The MQTT broker's address and its connection of the current attempt (L§11).
#[cfg(feature = "mqtt")]
pub(super) struct Broker {
    pub(super) addr: SocketAddr,
    pub(super) stream: Option<TcpStream>,
    pub(super) connected: bool,
    pub(super) out: WriteQueue,
}

/// Datagrams (or accepts) taken from one socket per turn: a flood on one cannot hold the loop, and
/// what it left is taken next turn.
const BURST: usize = 16;

/// The running daemon: the node and everything it acts on. `io::effects` executes its actions.
pub(super) struct Daemon {
    pub(super) args: ClientArgs,
    pub(super) log: LogHandle,
    pub(super) reactor: Reactor,
    pub(super) sockets: Sockets,
    pub(super) node: Node,
    pub(super) clients: Vec<Option<Client>>,
    pub(super) cloud: Option<CloudSock>,
    pub(super) resolver: Resolver<u32>,
    /// The mDNS responder (P§4.8), when enabled and its port could be bound.
    pub(super) mdns: Option<Mdns>,
    /// `--mqtt`: the broker connection (L§11).
    #[cfg(feature = "mqtt")]
    pub(super) broker: Option<Broker>,
    /// Receive buffer for the LAN and cloud sockets, reused (see `with_rx`).
    rx: Vec<u8>,
    /// Sources that may hold more input than their last turn took; served again next turn
    /// without waiting for an event (mio is edge-triggered).
    again: Vec<Token>,
}

/// Sets up the reactor, the mDNS responder and the resolver around the bound `sockets`, builds the
/// node and runs the loop until SIGTERM/SIGINT. Returns the exit status: 0 after a signal, 1 when
/// a set-up step or the loop failed (logged).
pub fn run(args: ClientArgs, log: LogHandle, sockets: Sockets, mut config: NodeConfig) -> i32 {
    let a = args;
    let reactor = match Reactor::new() {
        Ok(r) => r,
        Err(e) => {
            error!("cannot set up the reactor: {e}");
            return 1;
        }
    };
    info!(
        "miio_client {} starting, data dir {}",
        crate::VERSION,
        a.datadir
    );
    let mdns = if config.mdns.is_some() {
        match Mdns::open(a.mdns_port, None) {
            Ok(m) => Some(m),
            Err(e) => {
                warn!("mDNS: cannot bind port {}: {e}; disabled", a.mdns_port);
                None
            }
        }
    } else {
        None
    };
    if mdns.is_none() {
        // No responder: the node decides no service (P§4.8).
        config.mdns = None;
    }
    log_bound(&sockets, mdns.as_ref());
    let resolver = match Resolver::new(reactor.registry(), reactor::RESOLVER) {
        Ok(r) => r,
        Err(e) => {
            error!("cannot set up the resolver: {e}");
            return 1;
        }
    };
    #[cfg(feature = "mqtt")]
    let broker = a.mqtt.map(|addr| Broker {
        addr: SocketAddr::V4(addr),
        stream: None,
        connected: false,
        out: WriteQueue::new(BROKER_OUT_LIMIT),
    });
    let mut d = Daemon {
        node: Node::new(crate::io::clock::now(), config, datafiles::fresh_token()),
        args: a,
        log,
        reactor,
        sockets,
        clients: Vec::new(),
        cloud: None,
        resolver,
        mdns,
        #[cfg(feature = "mqtt")]
        broker,
        rx: vec![0; 65536],
        again: Vec::new(),
    };
    match d.run() {
        Ok(code) => code,
        Err(e) => {
            error!("fatal: {e}");
            1
        }
    }
}

impl Daemon {
    /// Registers the sources, starts the node and runs turns until SIGTERM/SIGINT (Ok(0)).
    fn run(&mut self) -> io::Result<i32> {
        let reg = self.reactor.registry();
        if let Some(s) = self.sockets.lan.as_mut() {
            reg.register(s, reactor::LAN, Interest::READABLE)?;
        }
        if let Some(s) = self.sockets.local.as_mut() {
            reg.register(s, reactor::LOCAL_LISTEN, Interest::READABLE)?;
        }
        if let Some(s) = self.sockets.ble.as_mut() {
            reg.register(s, reactor::BLE_LISTEN, Interest::READABLE)?;
        }
        if let Some(m) = self.mdns.as_mut() {
            reg.register(m.source(), reactor::MDNS, Interest::READABLE)?;
        }
        let now = crate::io::clock::now();
        self.node
            .set_os_release(datafiles::os_release(&self.args.os_release));
        self.node.start(now);
        #[cfg(feature = "mqtt")]
        if self.broker.is_some() {
            self.node.mqtt_start(
                now,
                crate::proto::mqtt::Config {
                    client_id: self.args.mqtt_id.clone(),
                    keep_alive: self.args.mqtt_keepalive,
                    ..Default::default()
                },
            );
        }
        self.run_actions(now);
        // Every deadline of the process is the node's (ARCHITECTURE.md rule 4), so the
        // `wakeup_time` it reports for a suspend is the one this wait uses. It is asked once per
        // turn, after the turn's input (and again only when something fell due and fired).
        let mut deadline = self.node.poll_timeout();
        loop {
            let turn = self.reactor.wait(deadline, !self.again.is_empty())?;
            let now = turn.now;
            for s in &turn.signals {
                match s {
                    Signal::Stop => {
                        info!("stopping on signal");
                        self.node.shutdown(now);
                        self.run_actions(now);
                        return Ok(0);
                    }
                    Signal::Reload => self.reload(),
                    Signal::Child => {
                        sys::reap_children();
                    }
                }
            }
            self.run_actions(now);
            // This turn's events plus the sources the last turn left with input.
            let mut ready = turn.ready;
            for token in std::mem::take(&mut self.again) {
                match ready.iter_mut().find(|r| r.token == token) {
                    Some(r) => r.readable = true,
                    None => ready.push(reactor::Ready {
                        token,
                        readable: true,
                        writable: false,
                        closed: false,
                    }),
                }
            }
            for r in &ready {
                let more = match r.token {
                    reactor::LAN => self.drain_lan(now),
                    reactor::LOCAL_LISTEN => self.accept(now, Port::Local),
                    reactor::BLE_LISTEN => self.accept(now, Port::Ble),
                    reactor::CLOUD => self.cloud_ready(now, r),
                    #[cfg(feature = "mqtt")]
                    reactor::MQTT => self.with_rx(|d, buf| d.broker_ready(now, r, buf)),
                    reactor::MDNS => self.mdns.as_mut().is_some_and(Mdns::readable),
                    reactor::RESOLVER => {
                        for ans in self.resolver.drain() {
                            self.node.cloud_resolved(now, ans.tag, ans.result);
                        }
                        false
                    }
                    Token(t) if t >= reactor::CLIENT_BASE => {
                        self.client_ready(now, t - reactor::CLIENT_BASE, r)
                    }
                    _ => false,
                };
                if more {
                    self.again.push(r.token);
                }
                self.run_actions(now);
            }
            self.reactor.recycle(ready);
            deadline = self.node.poll_timeout();
            if deadline.is_some_and(|t| t <= now) {
                self.node.handle_timeout(now);
                self.run_actions(now);
                deadline = self.node.poll_timeout();
            }
        }
    }

    /// SIGHUP (ARCHITECTURE.md §4.6).
    fn reload(&mut self) {
        if let Err(e) = self.log.reopen() {
            warn!("cannot reopen the log file: {e}");
        }
        info!("SIGHUP: log reopened, data files re-read");
        self.node
            .set_os_release(datafiles::os_release(&self.args.os_release));
        self.node.retry_files();
    }

    /// The one receive buffer of the reactor: a datagram can be 64 KiB, and allocating that per
    /// readiness event would be work on the hot path.
    fn with_rx(&mut self, f: impl FnOnce(&mut Self, &mut [u8]) -> bool) -> bool {
        let mut buf = std::mem::take(&mut self.rx);
        buf.resize(65536, 0);
        let more = f(self, &mut buf);
        self.rx = buf;
        more
    }

    /// At most BURST datagrams; true when the socket may hold more.
    fn drain_lan(&mut self, now: Instant) -> bool {
        self.with_rx(|d, buf| d.drain_lan_with(now, buf))
    }

    fn udp_ready(&mut self, now: Instant) -> bool {
        self.with_rx(|d, buf| d.udp_ready_with(now, buf))
    }

    fn tcp_ready(&mut self, now: Instant, r: &reactor::Ready) -> bool {
        self.with_rx(|d, buf| d.tcp_ready_with(now, r, buf))
    }

    fn drain_lan_with(&mut self, now: Instant, buf: &mut [u8]) -> bool {
        for _ in 0..BURST {
            let Some(lan) = self.sockets.lan.as_ref() else {
                return false;
            };
            match lan.recv_from(buf) {
                Ok((n, from)) => {
                    self.node.lan_datagram(now, from, &buf[..n]);
                    self.run_actions(now);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    warn!("LAN socket: {e}");
                    return false;
                }
            }
        }
        true
    }

    /// At most BURST accepts; true when more may wait.
    fn accept(&mut self, now: Instant, port: Port) -> bool {
        for _ in 0..BURST {
            let l = match port {
                Port::Local => self.sockets.local.as_ref(),
                Port::Ble => self.sockets.ble.as_ref(),
                Port::Mqtt => None,
            };
            let Some(l) = l else { return false };
            let stream = match l.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    crate::warn_limited!(now, "accept: {e}");
                    return false;
                }
            };
            let slot = match self.clients.iter().position(Option::is_none) {
                Some(i) => i,
                None => {
                    self.clients.push(None);
                    self.clients.len() - 1
                }
            };
            if !self.node.local_accept(now, slot, port) {
                continue; // dropped: closed
            }
            let mut conn = Conn::new(stream, self.args.max_msg, CLIENT_OUT_LIMIT);
            if let Err(e) = self.reactor.registry().register(
                &mut conn.stream,
                Token(reactor::CLIENT_BASE + slot),
                Interest::READABLE | Interest::WRITABLE,
            ) {
                crate::warn_limited!(now, "register client: {e}");
                self.node.local_closed(slot);
                continue;
            }
            self.clients[slot] = Some(Client {
                conn,
                port,
                unread: false,
            });
        }
        true
    }

    /// One bounded read of a client and the values it completed, each handled before the next.
    /// True when the socket may hold more (served again next turn).
    fn client_ready(&mut self, now: Instant, slot: usize, r: &reactor::Ready) -> bool {
        self.with_rx(|d, buf| d.client_ready_with(now, slot, r, buf))
    }

    fn client_ready_with(
        &mut self,
        now: Instant,
        slot: usize,
        r: &reactor::Ready,
        buf: &mut [u8],
    ) -> bool {
        let Some(c) = self.clients.get_mut(slot).and_then(Option::as_mut) else {
            return false;
        };
        if r.writable {
            match c.conn.flush() {
                Ok(true) if c.conn.close_after_flush => {
                    self.close_client(slot);
                    return false;
                }
                Ok(_) => {}
                Err(_) => {
                    self.close_client(slot);
                    return false;
                }
            }
        }
        if !(r.readable || c.unread) {
            return false;
        }
        // Backpressure: while its replies wait, the client's input stays in the kernel and TCP
        // slows it down; a writable event that drains them brings us back here.
        c.unread = !c.conn.wants_input();
        if c.unread {
            return false;
        }
        let step = c.conn.read_once(r.closed, buf);
        while let Some(v) = self.clients[slot]
            .as_mut()
            .and_then(|c| c.conn.next_piece())
        {
            match v {
                Ok(piece) => self.node.local_piece(now, slot, piece),
                Err(SplitError::TooLarge { .. }) => {
                    crate::warn_limited!(
                        now,
                        "local client {slot}: message over {} bytes, closing",
                        self.args.max_msg
                    );
                    self.close_client(slot);
                    return false;
                }
                Err(SplitError::Syntax { .. }) => {
                    // L§3: a syntax error gets -32700, then the connection is closed.
                    self.node.local_syntax_error(now, slot);
                    self.run_actions(now);
                    return false;
                }
            }
            self.run_actions(now);
        }
        if self.clients[slot].is_none() {
            return false;
        }
        match step {
            ReadStep::Eof => {
                self.close_client(slot);
                false
            }
            ReadStep::More => true,
            ReadStep::Drained => false,
        }
    }

    /// The broker's connection (L§11): the connect finished on its first event, then queued
    /// output written and one read of at most 4 KiB per turn, like a local client (§4.2). True
    /// when it may hold more.
    #[cfg(feature = "mqtt")]
    fn broker_ready(&mut self, now: Instant, r: &reactor::Ready, buf: &mut [u8]) -> bool {
        let Some(Broker {
            stream: Some(s),
            connected,
            ..
        }) = self.broker.as_mut()
        else {
            return false;
        };
        if !*connected {
            let failed = match connect_state(s) {
                Ok(false) => return false,
                Ok(true) => false,
                Err(_) => true,
            };
            if failed {
                self.broker_close();
                self.node.broker_connect_failed(now);
                return false;
            }
            *connected = true;
            self.node.broker_connected(now);
            self.run_actions(now);
        }
        if r.writable && !self.broker_flush() {
            self.broker_lost(now);
            return false;
        }
        let buf = &mut buf[..crate::io::conn::READ_CHUNK];
        loop {
            let res = match self.broker.as_mut().and_then(|b| b.stream.as_mut()) {
                Some(s) => s.read(buf),
                None => return false,
            };
            match res {
                Ok(0) => {
                    self.broker_lost(now);
                    return false;
                }
                Ok(n) => {
                    self.node.broker_bytes(now, &buf[..n]);
                    self.run_actions(now);
                    return n == buf.len() || r.closed;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.broker_lost(now);
                    return false;
                }
            }
        }
    }

    fn cloud_ready(&mut self, now: Instant, r: &reactor::Ready) -> bool {
        match self.cloud {
            Some(CloudSock::Udp(_)) => self.udp_ready(now),
            Some(CloudSock::Tcp { .. }) => self.tcp_ready(now, r),
            None => false,
        }
    }

    fn udp_ready_with(&mut self, now: Instant, buf: &mut [u8]) -> bool {
        for _ in 0..BURST {
            let res = match self.cloud.as_mut() {
                Some(CloudSock::Udp(s)) => s.recv(buf),
                _ => return false,
            };
            match res {
                Ok(n) => {
                    self.node.cloud_datagram(now, &buf[..n]);
                    self.run_actions(now);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // ECONNREFUSED (an ICMP error): nothing received (P§5.6); keep reading.
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
                Err(e) => {
                    debug!("cloud recv: {e}");
                    return false;
                }
            }
        }
        true
    }

    /// Finishes a non-blocking connect (the 6 steps of a mio connect). False: not yet.
    fn tcp_finish_connect(&mut self, now: Instant) -> bool {
        let Some(CloudSock::Tcp {
            stream, connected, ..
        }) = self.cloud.as_mut()
        else {
            return false;
        };
        let failed = match connect_state(stream) {
            Ok(false) => return false,
            Ok(true) => None,
            Err(e) => Some(OsError::from(e)),
        };
        if let Some(reason) = failed {
            self.cloud_close();
            self.node.cloud_connect_failed(now, reason);
            return false;
        }
        *connected = true;
        match stream.local_addr() {
            Ok(l) => {
                self.cloud_up(now, l);
                self.run_actions(now);
                true
            }
            Err(e) => {
                self.cloud_close();
                self.node.cloud_connect_failed(now, e.into());
                false
            }
        }
    }

    /// One read of at most the receive buffer per turn; true when the link may hold more.
    fn tcp_ready_with(&mut self, now: Instant, r: &reactor::Ready, buf: &mut [u8]) -> bool {
        if let Some(CloudSock::Tcp {
            connected: false, ..
        }) = self.cloud
        {
            if !self.tcp_finish_connect(now) {
                return false;
            }
        }
        if r.writable && !self.cloud_flush() {
            self.cloud_close();
            self.node.cloud_link_down(now);
            return false;
        }
        loop {
            let res = match self.cloud.as_mut() {
                Some(CloudSock::Tcp { stream, .. }) => stream.read(buf),
                _ => return false,
            };
            match res {
                Ok(0) => {
                    info!("cloud TCP closed by the peer");
                    self.cloud_close();
                    self.node.cloud_link_down(now);
                    return false;
                }
                Ok(n) => {
                    self.node.cloud_stream(now, &buf[..n]);
                    self.run_actions(now);
                    // A short read took all the data the kernel had; later data raises a new
                    // edge. An end reported with this data does not: read again for it (an
                    // ack cut by a reset would otherwise wait for its deadline, not fail now).
                    return n == buf.len() || r.closed;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    info!("cloud TCP: {e}");
                    self.cloud_close();
                    self.node.cloud_link_down(now);
                    return false;
                }
            }
        }
    }
}

/// One line naming every listening socket as bound (the kernel's address, "off" when disabled):
/// what a port in use or a wrong option did is visible at a glance, and tests read their ports
/// from it. It follows every bind, so once it is in the log all listeners accept.
fn log_bound(s: &Sockets, mdns: Option<&Mdns>) {
    fn show(kind: &str, a: Option<io::Result<SocketAddr>>) -> String {
        match a {
            None => "off".into(),
            Some(Ok(a)) => format!("{kind} {a}"),
            Some(Err(e)) => format!("{kind} ? ({e})"),
        }
    }
    info!(
        "bound: LAN {}, local API {}, BLE {}, mDNS {}",
        show("udp", s.lan.as_ref().map(|x| x.local_addr())),
        show("tcp", s.local.as_ref().map(|x| x.local_addr())),
        show("tcp", s.ble.as_ref().map(|x| x.local_addr())),
        show("udp", mdns.map(|m| m.local_addr())),
    );
}

/// Where a non-blocking connect stands (the cloud's TCP link and the broker's share it): Ok(false)
/// not yet, Ok(true) connected, Err why it failed.
fn connect_state(s: &TcpStream) -> io::Result<bool> {
    if let Some(e) = s.take_error()? {
        return Err(e);
    }
    match s.peer_addr() {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(false),
        Err(e) => Err(e),
    }
}
