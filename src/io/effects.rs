//! The executor of the node's actions (`proto::outbox::Action`, ARCHITECTURE.md §3): sockets,
//! files, the resolver, the logger. Actions run in the order the node queued them, and a result the
//! node waits for (`WriteWifi`, `TrustFlag`, the file steps, a connect) is reported back before the
//! next action runs (L§8). The bounded write queues apply their caps here: a local client that does
//! not read is closed with a reset (L§2), a cloud packet beyond the TCP backlog is dropped.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::rc::Rc;

use log::{debug, error, info};
use mio::net::{TcpStream, UdpSocket};
use mio::Interest;

#[cfg(feature = "mqtt")]
use super::daemon::{Broker, BROKER_OUT_LIMIT};
use super::daemon::{CloudSock, Daemon, CLOUD_OUT_LIMIT};
use crate::io::datafiles;
use crate::io::log as ilog;
use crate::io::netinfo;
use crate::io::reactor;
use crate::io::writeq::WriteQueue;
use crate::proto::cloud::Transport as CloudTransport;
use crate::proto::helper::Step;
use crate::proto::ioerr::OsError;
use crate::proto::local::LocalAction;
use crate::proto::node::Action;
use crate::proto::outbox::WifiText;
use crate::time::Instant;

impl Daemon {
    /// Executes the node's actions until it has none left (handlers may queue more).
    pub(super) fn run_actions(&mut self, now: Instant) {
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
                Action::MdnsService(info) => {
                    if let Some(m) = self.mdns.as_mut() {
                        // The node pushes only changes; the join follows a new address.
                        m.set_service(info);
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
                    // The node keeps the file this replaces: a failed router change restores it.
                    let old = datafiles::read_raw(&self.args.datadir, "wifi.conf").map(WifiText);
                    let ok = self.write_data("wifi.conf", text.as_bytes(), 0o600);
                    // Before any other action: the provisioning's reply depends on it (L§8).
                    self.node.wifi_written(now, ok, old);
                }
                Action::RestoreWifi(old) => match old {
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
                Action::TokenFile(t) => {
                    let r = datafiles::write_token(&self.args.datadir, t.as_ref());
                    self.node.token_written(now, r.map_err(OsError::from));
                }
                Action::StoreDidkey { did, key } => {
                    let r = datafiles::store_didkey(&self.args.datadir, did, &key);
                    self.node.didkey_written(now, r);
                }
                Action::WriteCountry(cc) => {
                    self.write_data("device.country", format!("{cc}\n").as_bytes(), 0o644);
                }
                #[cfg(feature = "mqtt")]
                Action::BrokerConnect => self.broker_connect(now),
                #[cfg(feature = "mqtt")]
                Action::BrokerSend(b) => self.broker_send(now, b),
                #[cfg(feature = "mqtt")]
                Action::BrokerClose => self.broker_close(),
                Action::SetLogLevel(l) => {
                    crate::info_limited!(now, "log level set to {l}");
                    ilog::set_level(l);
                }
            }
        }
    }

    /// A start-up step from the data files (no helper, or it did not answer: L§9.5).
    fn load_files(&mut self, now: Instant, step: Step) {
        let dir = self.args.datadir.clone();
        match step {
            Step::Dinfo => {
                let res = datafiles::load_device(&dir);
                let country = datafiles::load_country(&dir);
                self.node.file_dinfo(now, res, country);
            }
            Step::Token => self.node.file_token(now, datafiles::token_files(&dir)),
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

    pub(super) fn close_client(&mut self, slot: usize) {
        if let Some(mut c) = self.clients.get_mut(slot).and_then(Option::take) {
            let _ = self.reactor.registry().deregister(&mut c.conn.stream);
            debug!("local client {slot} ({:?}) closed", c.port);
        }
        self.node.local_closed(slot);
    }

    fn send_local(&mut self, now: Instant, slot: usize, text: Rc<str>) {
        let Some(c) = self.clients.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        // After a close was ordered nothing more is queued: the close follows the last message
        // the node meant for the connection (a -32700, L§3), not a late ack of the cloud's.
        if c.conn.close_after_flush {
            return;
        }
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

    pub(super) fn cloud_close(&mut self) {
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
                    out: WriteQueue::new(CLOUD_OUT_LIMIT),
                });
                Ok(None)
            }),
        };
        match res {
            Ok(Some(local)) => self.cloud_up(now, local),
            Ok(None) => {}
            Err(e) => {
                self.cloud_close();
                self.node.cloud_connect_failed(now, e.into());
            }
        }
    }

    pub(super) fn cloud_up(&mut self, now: Instant, local: SocketAddr) {
        let ip = match local {
            SocketAddr::V4(a) => *a.ip(),
            SocketAddr::V6(_) => Ipv4Addr::UNSPECIFIED,
        };
        self.node.cloud_connected(now, netinfo::netif_for(ip), ip);
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
                if out.push(bytes).is_err() {
                    crate::warn_limited!(
                        now,
                        "cloud TCP output backlog over 256 KiB; packet dropped"
                    );
                    return;
                }
                self.cloud_flush();
            }
            None => debug!("cloud send without a socket; dropped"),
        }
    }

    /// Writes queued TCP output. Returns false when the link failed.
    pub(super) fn cloud_flush(&mut self) -> bool {
        let Some(CloudSock::Tcp {
            stream,
            connected: true,
            out,
        }) = self.cloud.as_mut()
        else {
            return true;
        };
        let ok = out.write_to(stream).is_ok();
        self.node.set_cloud_backlog(!out.is_empty());
        ok
    }
}

/// The MQTT broker's connection (L§11): a non-blocking connect, finished on its first event
/// (`Daemon::broker_ready`), and one bounded write queue. Whatever cannot be written is the
/// session's business: a failed write or a full queue is reported as a closed connection, and the
/// session reconnects after its backoff.
#[cfg(feature = "mqtt")]
impl Daemon {
    fn broker_connect(&mut self, now: Instant) {
        self.broker_close();
        let Some(b) = self.broker.as_mut() else {
            return;
        };
        let reg = self.reactor.registry();
        match TcpStream::connect(b.addr).and_then(|mut s| {
            // Small packets that answer one another (a PUBACK, then the ack's PUBLISH): Nagle
            // would hold the second for the broker's delayed ACK, 40 ms on Linux.
            s.set_nodelay(true)?;
            reg.register(
                &mut s,
                reactor::MQTT,
                Interest::READABLE | Interest::WRITABLE,
            )?;
            Ok(s)
        }) {
            Ok(s) => b.stream = Some(s),
            Err(e) => {
                debug!("mqtt connect: {e}");
                self.node.broker_connect_failed(now);
            }
        }
    }

    pub(super) fn broker_close(&mut self) {
        if let Some(b) = self.broker.as_mut() {
            if let Some(mut s) = b.stream.take() {
                let _ = self.reactor.registry().deregister(&mut s);
            }
            b.connected = false;
            b.out = WriteQueue::new(BROKER_OUT_LIMIT);
        }
    }

    /// The connection failed or the broker does not read: closed, and the session told.
    pub(super) fn broker_lost(&mut self, now: Instant) {
        self.broker_close();
        self.node.broker_closed(now);
    }

    fn broker_send(&mut self, now: Instant, bytes: Vec<u8>) {
        let Some(b) = self.broker.as_mut().filter(|b| b.stream.is_some()) else {
            return;
        };
        if b.out.push(bytes).is_err() {
            crate::warn_limited!(now, "mqtt: the broker does not read, reconnecting");
            self.broker_lost(now);
        } else if !self.broker_flush() {
            self.broker_lost(now);
        }
    }

    /// Writes what is queued once connected; false when the connection failed.
    pub(super) fn broker_flush(&mut self) -> bool {
        match self.broker.as_mut() {
            Some(Broker {
                stream: Some(s),
                connected: true,
                out,
                ..
            }) => out.write_to(s).is_ok(),
            _ => true,
        }
    }
}

fn open_udp(addr: SocketAddrV4) -> io::Result<UdpSocket> {
    // P§5.2: a fresh connected socket with a new ephemeral port for every attempt.
    let s = std::net::UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))?;
    s.connect(addr)?;
    s.set_nonblocking(true)?;
    Ok(UdpSocket::from_std(s))
}
