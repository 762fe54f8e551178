//! The `miio_client` applet: the daemon. It parses the command line, binds its sockets, loads the
//! data dir and runs the reactor loop until SIGTERM/SIGINT (exit 0). A usage error, a failed bind or
//! a fatal set-up error exits 1 (LOCAL_API.md §18).

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::rc::Rc;

use log::{debug, error, info, warn};
use mio::net::{TcpListener, TcpStream, UdpSocket};
use mio::{Interest, Token};

use crate::cli::{self, CliError, ClientArgs};
use crate::config::Secret16;
use crate::io::conn::{Conn, ReadStep};
use crate::io::datafiles;
use crate::io::log::{self as ilog, LogHandle};
use crate::io::mdns::Mdns;
use crate::io::netinfo;
use crate::io::reactor::{self, Reactor, Signal};
use crate::io::resolver::Resolver;
use crate::io::sys;
use crate::proto::cloud::{CloudConfig, Transport as CloudTransport};
use crate::proto::helper::Step;
use crate::proto::local::{LocalAction, Port};
use crate::proto::node::{Action, Node, NodeConfig};
use crate::proto::state::State;
use crate::time::{Duration, Instant};
use crate::wire::dns::ServiceInfo;
use crate::wire::json_stream::SplitError;

/// The vendor's line for a port already in use (LOCAL_API.md §2).
pub const QUIT_BOUND: &str = "Quit, maybe another miio_client is already running.";

struct Sockets {
    lan: Option<UdpSocket>,
    local: Option<TcpListener>,
    ble: Option<TcpListener>,
}

fn bind_tcp(port: u16) -> io::Result<TcpListener> {
    // D8: the local listeners are on loopback only.
    TcpListener::bind(SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)))
}

fn bind_all(a: &ClientArgs) -> io::Result<Sockets> {
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
struct Client {
    conn: Conn,
    port: Port,
    /// Input left unread while the client's replies wait (backpressure); read once they drain.
    unread: bool,
}

/// The cloud socket of the current attempt.
enum CloudSock {
    Udp(UdpSocket),
    Tcp {
        stream: TcpStream,
        connected: bool,
        out: Vec<u8>,
    },
}

/// Pending output of a local client before it is closed as one that never reads (L§2).
const CLIENT_OUT_LIMIT: usize = 64 * 1024;

/// Datagrams (or accepts) taken from one socket per turn: a flood on one cannot hold the loop, and
/// what it left is taken next turn.
const BURST: usize = 16;

struct Daemon {
    args: ClientArgs,
    log: LogHandle,
    reactor: Reactor,
    sockets: Sockets,
    node: Node,
    clients: Vec<Option<Client>>,
    cloud: Option<CloudSock>,
    resolver: Resolver<u32>,
    /// The `wifi.conf` before a provisioning wrote a new one (None inside: there was none).
    wifi_backup: Option<Option<String>>,
    /// The mDNS responder (P§4.8), when enabled and its port could be bound.
    mdns: Option<Mdns>,
    /// Receive buffer for the LAN and cloud sockets, reused (see `with_rx`).
    rx: Vec<u8>,
    /// Sources that may hold more input than their last turn took; served again next turn
    /// without waiting for an event (mio is edge-triggered).
    again: Vec<Token>,
}

fn fresh_token() -> Secret16 {
    let mut raw = [0u8; 96];
    // A failing getrandom is near impossible; the token still must not be predictable, so fall
    // back to mixing in the clock only to keep the daemon alive, and say so.
    if let Err(e) = sys::random_bytes(&mut raw) {
        warn!("getrandom failed ({e}); token entropy is weak");
        let t = sys::boottime_ms().to_le_bytes();
        for (i, b) in raw.iter_mut().enumerate() {
            *b ^= t[i % 8].wrapping_mul(i as u8 | 1);
        }
    }
    crate::config::token::generate(&raw).unwrap_or_else(|| Secret16::new(*b"0123456789abcdef"))
}

fn random_seed() -> u64 {
    let mut b = [0u8; 8];
    let _ = sys::random_bytes(&mut b);
    u64::from_le_bytes(b) ^ sys::boottime_ms()
}

/// The node's settings from the command line (P§5.1 host and port rules, timers).
fn node_config(a: &ClientArgs) -> NodeConfig {
    let mut c = CloudConfig::new(0, [0; 16], "", "", "", a.country.as_deref().unwrap_or(""));
    c.transports = a
        .transports
        .iter()
        .map(|t| match t {
            cli::Transport::Udp => CloudTransport::Udp,
            cli::Transport::Tcp => CloudTransport::Tcp,
        })
        .collect();
    // D1: -H and -p move both transports; the per-transport options win over them.
    let udp_host = a.udp_host.clone().or_else(|| a.host.clone());
    let tcp_host = a.tcp_host.clone().or_else(|| a.host.clone());
    if let Some(h) = &udp_host {
        c.udp.host = h.clone();
        c.udp.explicit = true;
    }
    if let Some(h) = &tcp_host {
        c.tcp.host = h.clone();
        c.tcp.explicit = true;
    }
    if let Some(p) = a.udp_port.or(a.port) {
        c.udp.port = p;
    }
    if let Some(p) = a.tcp_port.or(a.port) {
        c.tcp.port = p;
    }
    c.keepalive = a.keepalive;
    c.ack_timeout = a.ack_timeout;
    c.user_ack_timeout = a.user_ack_timeout;
    c.backoff_min = a.backoff_min;
    c.backoff_max = a.backoff_max;
    c.refresh = a.interval_ms.map(Duration::from_millis);
    c.max_cloud_payload = a.max_cloud_payload;
    c.seed = random_seed();
    NodeConfig {
        max_clients: a.max_clients,
        max_sleep: a.max_sleep,
        cloud: c,
        country_override: a.country.clone(),
        hosts_explicit: (udp_host.is_some(), tcp_host.is_some()),
        helper: crate::proto::helper::Config {
            datadir: a.datadir.clone(),
            grace: a.helper_grace,
            timeout: a.helper_timeout,
        },
    }
}

impl Daemon {
    /// A start-up step from the data files (no helper, or it did not answer: L§9.5).
    fn load_files(&mut self, now: Instant, step: Step) {
        let dir = self.args.datadir.clone();
        match step {
            Step::Dinfo => {
                let res = datafiles::load_device(&dir);
                let country = datafiles::load_country(&dir);
                self.node
                    .file_dinfo(now, res.map_err(|e| e.to_string()), country);
            }
            Step::Token => {
                let res = datafiles::token_step(&dir, &fresh_token());
                self.node.file_token(now, res.map_err(|e| e.to_string()));
            }
            Step::WifiStatus => {
                let (provisioned, ssid, uid) = datafiles::wifi_status(&dir);
                self.node.file_wifi(now, provisioned, ssid, uid);
            }
            Step::Info | Step::Didkeymac | Step::Didkeymac2 => {}
        }
    }

    /// Writes a data file atomically; false (logged with the errno) when it could not be written.
    fn write_data(&self, name: &str, data: &[u8], mode: u32) -> bool {
        let p = std::path::Path::new(&self.args.datadir).join(name);
        match crate::config::store::write_atomic(&p, data, mode) {
            Ok(()) => {
                info!("wrote {}", p.display());
                true
            }
            Err(e) => {
                error!("cannot write {}: {e}", p.display());
                false
            }
        }
    }

    fn reload(&mut self) {
        if let Err(e) = self.log.reopen() {
            warn!("cannot reopen the log file: {e}");
        }
        info!("SIGHUP: log reopened, data files re-read");
        self.node
            .set_os_release(datafiles::os_release(&self.args.os_release));
        self.node.retry_files();
    }

    /// P§4.8: announce once in STA mode with an address (and on every new one); nothing to
    /// announce or answer in AP mode or without an identity.
    fn mdns_service(&mut self, now: Instant, ip: Option<Ipv4Addr>) {
        let Some(m) = self.mdns.as_mut() else { return };
        let info = match (self.node.identity(), ip) {
            (Some(id), Some(ip)) if id.provisioned && !ip.is_unspecified() => Some(ServiceInfo {
                model: id.model.clone(),
                did: id.did,
                ip,
                port: self.args.lan_port,
            }),
            _ => None,
        };
        // A loopback address (a cloud on this host) reaches nobody on the LAN: answer queries, but
        // send no multicast announcement for it.
        let routable = info.as_ref().is_some_and(|i| !i.ip.is_loopback());
        if m.set_service(info) && routable {
            // The node sends the announcement now and again in a second (P§4.8).
            self.node.mdns_service_changed(now);
            self.run_actions(now);
        }
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

    fn close_client(&mut self, slot: usize) {
        if let Some(mut c) = self.clients.get_mut(slot).and_then(Option::take) {
            let _ = self.reactor.registry().deregister(&mut c.conn.stream);
            debug!("local client {slot} ({:?}) closed", c.port);
        }
        self.node.local_closed(slot);
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

    fn send_local(&mut self, now: Instant, slot: usize, text: Rc<str>) {
        let Some(c) = self.clients.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        if c.conn.send(text).is_err() {
            crate::warn_limited!(
                now,
                "local client {slot}: more than 64 KiB unsent (it does not read), closing"
            );
            c.conn.reset_on_close();
            self.close_client(slot);
        }
    }

    fn close_local(&mut self, slot: usize) {
        let Some(c) = self.clients.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        if c.conn.pending_out() == 0 {
            self.close_client(slot);
        } else {
            c.conn.close_after_flush = true;
        }
    }

    fn cloud_close(&mut self) {
        if let Some(sock) = self.cloud.take() {
            let reg = self.reactor.registry();
            let _ = match sock {
                CloudSock::Udp(mut s) => reg.deregister(&mut s),
                CloudSock::Tcp { mut stream, .. } => reg.deregister(&mut stream),
            };
        }
        self.node.set_cloud_backlog(false);
    }

    fn cloud_connect(&mut self, now: Instant, transport: CloudTransport, addr: SocketAddrV4) {
        self.cloud_close();
        let res = match transport {
            CloudTransport::Udp => open_udp(addr).and_then(|mut s| {
                self.reactor
                    .registry()
                    .register(&mut s, reactor::CLOUD, Interest::READABLE)?;
                let local = s.local_addr()?;
                self.cloud = Some(CloudSock::Udp(s));
                Ok(Some(local))
            }),
            CloudTransport::Tcp => TcpStream::connect(SocketAddr::V4(addr)).and_then(|mut s| {
                self.reactor.registry().register(
                    &mut s,
                    reactor::CLOUD,
                    Interest::READABLE | Interest::WRITABLE,
                )?;
                self.cloud = Some(CloudSock::Tcp {
                    stream: s,
                    connected: false,
                    out: Vec::new(),
                });
                Ok(None)
            }),
        };
        match res {
            Ok(Some(local)) => self.cloud_up(now, local),
            Ok(None) => {}
            Err(e) => {
                self.cloud_close();
                self.node.cloud_connect_failed(now, &e.to_string());
            }
        }
    }

    fn cloud_up(&mut self, now: Instant, local: SocketAddr) {
        let ip = match local {
            SocketAddr::V4(a) => *a.ip(),
            SocketAddr::V6(_) => Ipv4Addr::UNSPECIFIED,
        };
        self.node.cloud_connected(now, netinfo::netif_for(ip), ip);
        self.mdns_service(now, Some(ip));
    }

    fn cloud_send(&mut self, now: Instant, bytes: Vec<u8>) {
        match self.cloud.as_mut() {
            Some(CloudSock::Udp(s)) => {
                if let Err(e) = s.send(&bytes) {
                    // ECONNREFUSED counts as nothing received (P§5.6); the keepalive decides.
                    debug!("cloud send: {e}");
                }
            }
            Some(CloudSock::Tcp { out, .. }) => {
                if out.len() + bytes.len() > 256 * 1024 {
                    crate::warn_limited!(
                        now,
                        "cloud TCP output backlog over 256 KiB; packet dropped"
                    );
                    return;
                }
                out.extend_from_slice(&bytes);
                self.cloud_flush();
            }
            None => debug!("cloud send without a socket; dropped"),
        }
    }

    /// Writes queued TCP output. Returns false when the link failed.
    fn cloud_flush(&mut self) -> bool {
        let Some(CloudSock::Tcp {
            stream,
            connected: true,
            out,
        }) = self.cloud.as_mut()
        else {
            return true;
        };
        let mut done = 0;
        let mut ok = true;
        while done < out.len() {
            match stream.write(&out[done..]) {
                Ok(0) => {
                    ok = false;
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    ok = false;
                    break;
                }
            }
        }
        out.drain(..done);
        let backlog = !out.is_empty();
        self.node.set_cloud_backlog(backlog);
        ok
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
        let failed = match stream.take_error() {
            Ok(Some(e)) | Err(e) => Some(e.to_string()),
            Ok(None) => match stream.peer_addr() {
                Ok(_) => None,
                Err(e) if e.kind() == io::ErrorKind::NotConnected => return false,
                Err(e) => Some(e.to_string()),
            },
        };
        if let Some(reason) = failed {
            self.cloud_close();
            self.node.cloud_connect_failed(now, &reason);
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
                self.node.cloud_connect_failed(now, &e.to_string());
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

    /// Executes the node's actions until it has none left (handlers may queue more).
    fn run_actions(&mut self, now: Instant) {
        while let Some(a) = self.node.poll_action() {
            match a {
                Action::Local(LocalAction::Send(slot, text)) => self.send_local(now, slot, text),
                Action::Local(LocalAction::Close(slot)) => self.close_local(slot),
                Action::Resolve {
                    host,
                    port,
                    attempt,
                    ..
                } => self.resolver.lookup(attempt, &host, port),
                Action::Connect { transport, addr } => self.cloud_connect(now, transport, addr),
                Action::CloudSend(b) => self.cloud_send(now, b),
                Action::CloudClose => self.cloud_close(),
                Action::LanSend { to, bytes } => {
                    if let Some(lan) = self.sockets.lan.as_ref() {
                        if let Err(e) = lan.send_to(&bytes, to) {
                            debug!("LAN send to {to}: {e}");
                        }
                    }
                }
                Action::MdnsAnnounce => {
                    if let Some(m) = self.mdns.as_ref() {
                        m.announce();
                    }
                }
                Action::TrustFlag(on) => {
                    let p = std::path::Path::new(&self.args.datadir).join("otd_donot_trust_peer");
                    let r = if on {
                        crate::config::store::write_atomic(&p, b"", 0o644)
                    } else {
                        crate::config::store::remove_durable(&p)
                    };
                    if let Err(e) = &r {
                        crate::warn_limited!(now, "{}: {e}", p.display());
                    }
                    self.node.trust_written(now, r.is_ok());
                }
                Action::ShutdownWrite(slot) => {
                    if let Some(c) = self.clients.get_mut(slot).and_then(Option::as_mut) {
                        c.conn.shutdown_after_flush();
                    }
                }
                Action::LoadFiles(step) => self.load_files(now, step),
                Action::WriteWifi(text) => {
                    // Keep the previous file in memory: a failed router change restores it (L§8).
                    let old = datafiles::read_raw(&self.args.datadir, "wifi.conf");
                    let ok = self.write_data("wifi.conf", text.as_bytes(), 0o600);
                    if ok {
                        self.wifi_backup = Some(old);
                    }
                    // Before any other action: the provisioning's reply depends on it (L§8).
                    self.node.wifi_written(now, ok);
                }
                Action::RestoreWifi => match self.wifi_backup.take().flatten() {
                    Some(old) => {
                        self.write_data("wifi.conf", old.as_bytes(), 0o600);
                    }
                    None => {
                        let p = std::path::Path::new(&self.args.datadir).join("wifi.conf");
                        if let Err(e) = crate::config::store::remove_durable(&p) {
                            crate::warn_limited!(now, "{}: {e}", p.display());
                        }
                    }
                },
                Action::ReadSsid => {
                    let (_, ssid, _) = datafiles::wifi_status(&self.args.datadir);
                    self.node.file_ssid(ssid);
                }
                Action::WriteCountry(cc) => {
                    self.write_data("device.country", format!("{cc}\n").as_bytes(), 0o644);
                }
                Action::SetLogLevel(l) => {
                    crate::info_limited!(now, "log level set to {l}");
                    ilog::set_level(l);
                }
            }
        }
    }

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
        self.run_actions(now);
        loop {
            // Every deadline of the process is the node's (ARCHITECTURE.md rule 4), so the
            // `wakeup_time` it reports for a suspend is the one this wait uses.
            let deadline = self.node.poll_timeout();
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
            if self.node.poll_timeout().is_some_and(|t| t <= now) {
                self.node.handle_timeout(now);
            }
            self.run_actions(now);
            if !matches!(
                self.node.state(),
                State::WifiStaMode | State::CloudTrying | State::CloudConnected | State::CloudRetry
            ) {
                self.mdns_service(now, None);
            }
        }
    }
}

fn d_args_mdns(a: &ClientArgs) -> bool {
    a.mdns && a.mdns_port != 0 && a.lan_port != 0
}

fn open_udp(addr: SocketAddrV4) -> io::Result<UdpSocket> {
    // P§5.2: a fresh connected socket with a new ephemeral port for every attempt.
    let s = std::net::UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))?;
    s.connect(addr)?;
    s.set_nonblocking(true)?;
    Ok(UdpSocket::from_std(s))
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

/// Entry point of the applet.
pub fn main(args: &[String]) -> i32 {
    let a = match cli::parse_client(args) {
        Ok(a) => a,
        Err(CliError::Help) => {
            eprint!("{}", cli::USAGE);
            return 1;
        }
        Err(CliError::Version) => {
            eprintln!("miio-client {}", crate::VERSION);
            return 1;
        }
        Err(CliError::Usage(m)) => {
            eprintln!("miio_client: {m}");
            eprint!("{}", cli::USAGE);
            return 1;
        }
    };
    for o in &a.not_built {
        eprintln!("miio_client: {o} is not built yet; ignored");
    }
    let log = match ilog::init(a.loglevel, a.logfile.as_deref()) {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "miio_client: cannot open log file {}: {e}",
                a.logfile.as_deref().unwrap_or("")
            );
            return 1;
        }
    };
    if a.enckey || a.encdata {
        warn!("-e/-E (encrypted storage) are accepted for compatibility and have no effect");
    }
    // Bind before detaching, so a port in use is an exit status the init script sees.
    let sockets = match bind_all(&a) {
        Ok(s) => s,
        Err(e) => {
            error!("bind: {e}");
            error!("{QUIT_BOUND}");
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
    info!(
        "miio_client {} starting, data dir {}",
        crate::VERSION,
        a.datadir
    );
    let mdns = if d_args_mdns(&a) {
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
    log_bound(&sockets, mdns.as_ref());
    let resolver = match Resolver::new(reactor.registry(), reactor::RESOLVER) {
        Ok(r) => r,
        Err(e) => {
            error!("cannot set up the resolver: {e}");
            return 1;
        }
    };
    let mut d = Daemon {
        node: Node::new(crate::io::clock::now(), node_config(&a), fresh_token()),
        args: a,
        log,
        reactor,
        sockets,
        clients: Vec::new(),
        cloud: None,
        resolver,
        wifi_backup: None,
        mdns,
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
