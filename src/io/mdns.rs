//! The mDNS responder socket for `_miio._udp.local` (PROTOCOL.md §4.8), driven by the daemon's one
//! mio reactor: no thread, no timer of its own. The bytes come from `wire::dns`.
//!
//! Contract:
//! - [`Mdns::open`] binds `0.0.0.0:port`. An `Err` means the bind failed: the caller logs a warning
//!   and runs without mDNS (P§4.8: never fatal). A failed multicast join is not an error: it is
//!   logged here as a warning and the responder still answers unicast queries ([`Mdns::multicast`]
//!   says whether the group is joined). [`Mdns::set_service`] retries the join on the interface of
//!   each new address, since at start-up the board often has no address yet.
//! - With no service set (AP mode, no address) nothing is announced and no query is answered, but
//!   [`Mdns::readable`] still drains the socket, as edge-triggered mio requires.
//! - Which datagrams are answered, how and where is `proto::mdns::Responder`'s decision; this
//!   module only receives, sends and keeps the membership. Nothing here panics.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use log::{debug, warn};

use crate::proto::mdns::{Dest, Responder};
use crate::wire::dns::{self, ServiceInfo, MDNS_GROUP, MDNS_PORT};

/// Datagrams are read into this much stack. A longer one is cut by the kernel; the questions come
/// first in a query, so a cut query still parses or is dropped as truncated.
const RECV_BUF: usize = 2048;
/// Consecutive receive errors (other than WouldBlock) tolerated in one drain before giving up.
const MAX_RECV_ERRORS: u32 = 8;
/// RFC 6762 §11: multicast is sent with IP TTL 255.
const MULTICAST_TTL: u32 = 255;

/// The responder. Register [`Mdns::source`] with `reactor::MDNS` for `Interest::READABLE`.
pub struct Mdns {
    sock: mio::net::UdpSocket,
    /// Whether the group should be joined (false: unicast only, as in tests).
    want_multicast: bool,
    /// The interface address the group is joined on (UNSPECIFIED: the kernel's choice).
    joined: Option<Ipv4Addr>,
    /// Where announcements and multicast answers go: 224.0.0.251:5353 unless a test moves it.
    target: SocketAddr,
    /// The decisions: what is answered, how and where.
    responder: Responder,
}

impl Mdns {
    /// A UDP socket on `0.0.0.0:port` without address reuse (port 0: an ephemeral port, for tests).
    pub fn bind_plain(port: u16) -> io::Result<std::net::UdpSocket> {
        std::net::UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port))
    }

    /// Binds `0.0.0.0:port` and joins 224.0.0.251 on `iface` (None: the kernel's choice).
    /// `Err`: the bind failed; warn and go on without mDNS. A failed join only logs a warning.
    pub fn open(port: u16, iface: Option<Ipv4Addr>) -> io::Result<Mdns> {
        // Once io::sys has it: `sys::udp_bind_reuse(port)?`, so 5353 can be shared with another
        // responder on the board (SO_REUSEADDR).
        let sock = crate::io::sys::udp_bind_reuse(port)?;
        // Other hosts' mDNS traffic that we would not answer is dropped in the kernel, so it never
        // wakes the board (wire::dns::query_filter). Without it we only wake more often.
        if let Err(e) = attach_query_filter(&sock) {
            warn!("mDNS: no socket filter ({e}); every mDNS packet on the LAN wakes the daemon");
        }
        let mut m = Self::from_socket(sock, true)?;
        if let Err(e) = m.join(iface.unwrap_or(Ipv4Addr::UNSPECIFIED)) {
            warn!("mDNS: cannot join {MDNS_GROUP}: {e}; answering unicast queries only");
        }
        Ok(m)
    }

    /// Wraps a bound socket. With `multicast` false the group is never joined (unicast only).
    /// `Err` only when the socket cannot be made non-blocking.
    pub fn from_socket(sock: std::net::UdpSocket, multicast: bool) -> io::Result<Mdns> {
        sock.set_nonblocking(true)?;
        if multicast {
            // Best effort: the kernel default (1) still reaches the link.
            let _ = sock.set_multicast_ttl_v4(MULTICAST_TTL);
        }
        Ok(Mdns {
            sock: mio::net::UdpSocket::from_std(sock),
            want_multicast: multicast,
            joined: None,
            target: SocketAddr::V4(SocketAddrV4::new(MDNS_GROUP, MDNS_PORT)),
            responder: Responder::default(),
        })
    }

    /// Joins the group on the interface holding `iface` (UNSPECIFIED: the kernel's choice), leaving
    /// the previous membership. "Already a member" counts as joined.
    pub fn join(&mut self, iface: Ipv4Addr) -> io::Result<()> {
        if self.joined == Some(iface) {
            return Ok(());
        }
        if let Some(old) = self.joined.take() {
            // The old address may be gone with its interface; then so is the membership.
            let _ = self.sock.leave_multicast_v4(&MDNS_GROUP, &old);
        }
        match self.sock.join_multicast_v4(&MDNS_GROUP, &iface) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => {}
            Err(e) => return Err(e),
        }
        self.joined = Some(iface);
        Ok(())
    }

    /// Whether the group is joined (multicast queries can reach us).
    pub fn multicast(&self) -> bool {
        self.joined.is_some()
    }

    /// Moves announcements and multicast answers away from 224.0.0.251:5353 (tests only).
    pub fn set_target(&mut self, to: SocketAddr) {
        self.target = to;
    }

    /// The bound address (tests on an ephemeral port read the port here).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.sock.local_addr()
    }

    /// What to announce and answer, as the node decided (`Action::MdnsService`); None (AP mode, no
    /// address) silences the responder. Returns true when it changed. A new address also moves
    /// the group membership to its interface (a failed join is a warning).
    pub fn set_service(&mut self, info: Option<ServiceInfo>) -> bool {
        let old_ip = self.responder.service().map(|i| i.ip);
        let new_ip = info.as_ref().map(|i| i.ip);
        if self.responder.service() == info.as_ref() {
            return false;
        }
        // The netmask is read once per address, for the responder's on-link check.
        let mask = if new_ip == old_ip {
            self.responder.mask()
        } else {
            new_ip.and_then(crate::io::sys::netmask_of)
        };
        if new_ip != old_ip {
            if let Some(ip) = new_ip.filter(|ip| self.want_multicast && !ip.is_unspecified()) {
                if let Err(e) = self.join(ip) {
                    warn!("mDNS: cannot join {MDNS_GROUP} on {ip}: {e}; answering unicast queries only");
                }
            }
        }
        self.responder.set_service(info, mask)
    }

    /// Sends the unsolicited announcement (RFC 6762 §8.3) when a service is set.
    pub fn announce(&self) {
        if let Some(bytes) = self.responder.announcement() {
            self.send(&bytes, self.target);
        }
    }

    /// Reads at most 16 datagrams (a flood must not hold the daemon's loop) and answers the queries
    /// for our service. True when the socket may hold more: the caller comes back next turn.
    pub fn readable(&mut self) -> bool {
        let mut buf = [0u8; RECV_BUF];
        let mut errors = 0;
        for _ in 0..16 {
            match self.sock.recv_from(&mut buf) {
                Ok((n, from)) => {
                    if let Some(msg) = buf.get(..n) {
                        self.datagram(msg, from);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // A pending socket error is consumed by the failed read; the next may succeed.
                    debug!("mDNS recv: {e}");
                    errors += 1;
                    if errors >= MAX_RECV_ERRORS {
                        return false;
                    }
                }
            }
        }
        true
    }

    /// The socket, for `registry().register(.., reactor::MDNS, Interest::READABLE)`.
    pub fn source(&mut self) -> &mut mio::net::UdpSocket {
        &mut self.sock
    }

    fn datagram(&mut self, msg: &[u8], from: SocketAddr) {
        if let Some((bytes, dest)) = self.responder.handle_datagram(from, msg) {
            let to = match dest {
                Dest::Source(a) => a,
                Dest::Group => self.target,
            };
            self.send(&bytes, to);
        }
    }

    fn send(&self, bytes: &[u8], to: SocketAddr) {
        if let Err(e) = self.sock.send_to(bytes, to) {
            debug!("mDNS send to {to}: {e}");
        }
    }
}

/// The kernel-side filter of [`dns::query_filter`] on `sock`.
fn attach_query_filter(sock: &std::net::UdpSocket) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    crate::io::sys::attach_filter(sock.as_raw_fd(), &dns::query_filter())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_service_reports_changes() {
        let mut m = Mdns::from_socket(Mdns::bind_plain(0).unwrap(), false).unwrap();
        let info = ServiceInfo {
            model: "acme.dev.v1".into(),
            did: 1,
            ip: Ipv4Addr::LOCALHOST,
            port: 54321,
        };
        assert!(m.set_service(Some(info.clone())));
        assert!(!m.set_service(Some(info.clone())));
        assert!(m.set_service(Some(ServiceInfo { did: 2, ..info })));
        assert!(m.set_service(None));
        assert!(!m.set_service(None));
        assert!(!m.multicast());
    }

    /// A DNS query with one question, for the filter test.
    fn query(name: &str) -> Vec<u8> {
        let mut m = vec![0, 7, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in name.split('.') {
            m.push(label.len() as u8);
            m.extend_from_slice(label.as_bytes());
        }
        m.extend_from_slice(&[0, 0, 12, 0, 1]);
        m
    }

    /// The kernel runs the filter: foreign queries never reach the socket, ours do. Each foreign
    /// query is sent before an answered one, so the first datagram read proves the order
    /// (loopback keeps it) without waiting for an absence.
    #[test]
    fn the_kernel_drops_foreign_queries_before_they_wake_us() {
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        attach_query_filter(&sock).expect("SO_ATTACH_FILTER");
        sock.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let to = sock.local_addr().unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut buf = [0u8; 2048];
        for (foreign, ours) in [
            ("_googlecast._tcp.local", "_miio._udp.local"),
            ("_airplay._tcp.local", "_SERVICES._dns-sd._udp.local"),
            ("printer.local", "acme-dev-v1_MIIO7.local"),
        ] {
            tx.send_to(&query(foreign), to).unwrap();
            tx.send_to(&query(ours), to).unwrap();
            let n = sock.recv(&mut buf).expect("the answered query arrives");
            assert_eq!(&buf[..n], &query(ours)[..], "{foreign} was let through");
        }
    }
}
