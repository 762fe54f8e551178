//! The mDNS responder's decisions for `_miio._udp.local` (PROTOCOL.md §4.8), sans-IO: which
//! datagrams are answered, in which form, and where the answer goes (RFC 6762). The socket, the
//! group membership and the kernel filter are `io::mdns`; the bytes are `wire::dns`; which service
//! is set and when to announce it are the node's (`Action::MdnsService`, `Action::MdnsAnnounce`).
//!
//! - With no service set (AP mode, no address) nothing is announced and nothing is answered.
//! - Legacy unicast queries (source port not 5353, RFC 6762 §6.7) are answered to the source in
//!   the legacy form; queries with the QU bit (§5.4) are answered unicast; the rest to the group.
//! - Queries from off-link sources are not answered (§11), so the port is no reflector.
//! - Malformed packets are dropped with a debug line at the 1st, 2nd, 4th, 8th ... of them;
//!   responses (other responders', our own announcements looped back) are dropped silently.

use std::net::{Ipv4Addr, SocketAddr};

use log::debug;

use crate::wire::dns::{self, ServiceInfo, MDNS_PORT};

/// Where the answer to one query goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dest {
    /// Back to the querier's address and port.
    Source(SocketAddr),
    /// To the multicast group (224.0.0.251:5353, or where a test moved it).
    Group,
}

/// The form of the answer, by the query's source port and QU bit (RFC 6762 §6.7, §5.4, §6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    Legacy,
    Unicast,
    Multicast,
}

fn route(src_port: u16, wants_unicast: bool) -> Route {
    if src_port != MDNS_PORT {
        Route::Legacy
    } else if wants_unicast {
        Route::Unicast
    } else {
        Route::Multicast
    }
}

/// True when `src` may be answered: loopback, or inside the subnet of our address. With the mask
/// unknown we answer, rather than go silent on a board whose interface table could not be read.
fn on_link(src: Ipv4Addr, ours: Ipv4Addr, mask: Option<Ipv4Addr>) -> bool {
    if src.is_loopback() {
        return true;
    }
    match mask {
        Some(m) => u32::from(src) & u32::from(m) == u32::from(ours) & u32::from(m),
        None => true,
    }
}

/// The responder's state: the service it speaks for and what it needs to judge a query.
#[derive(Debug, Default)]
pub struct Responder {
    service: Option<ServiceInfo>,
    /// Netmask of the service address (the on-link check); io reads it once per address.
    mask: Option<Ipv4Addr>,
    /// Malformed packets seen.
    bad: u32,
}

impl Responder {
    pub fn service(&self) -> Option<&ServiceInfo> {
        self.service.as_ref()
    }

    /// The netmask given with the current service.
    pub fn mask(&self) -> Option<Ipv4Addr> {
        self.mask
    }

    /// What to announce and answer (None silences the responder), with the netmask of its
    /// address. True when the service changed: the caller then announces it.
    pub fn set_service(&mut self, info: Option<ServiceInfo>, mask: Option<Ipv4Addr>) -> bool {
        if self.service == info {
            return false;
        }
        self.service = info;
        self.mask = mask;
        true
    }

    /// The unsolicited announcement (RFC 6762 §8.3), when a service is set. It goes to the group.
    pub fn announcement(&self) -> Option<Vec<u8>> {
        self.service.as_ref().map(dns::build_announcement)
    }

    /// One datagram received from `from`: the answer and where it goes, if it gets one.
    pub fn handle_datagram(&mut self, from: SocketAddr, msg: &[u8]) -> Option<(Vec<u8>, Dest)> {
        let info = self.service.as_ref()?;
        let SocketAddr::V4(src) = from else {
            return None;
        };
        let query = match dns::parse_query(msg) {
            Ok(q) => q,
            // Other responders' answers, and our own announcements looped back.
            Err(dns::DnsError::NotQuery) => return None,
            Err(e) => {
                self.bad = self.bad.saturating_add(1);
                if self.bad.is_power_of_two() {
                    debug!(
                        "mDNS: dropped a packet from {from}: {e} ({} so far)",
                        self.bad
                    );
                }
                return None;
            }
        };
        if !dns::answers_for(&query, info) || !on_link(*src.ip(), info.ip, self.mask) {
            return None;
        }
        Some(match route(src.port(), query.wants_unicast()) {
            Route::Legacy => (
                dns::build_response(info, Some(&query), true),
                Dest::Source(from),
            ),
            Route::Unicast => (
                dns::build_response(info, Some(&query), false),
                Dest::Source(from),
            ),
            Route::Multicast => (dns::build_response(info, Some(&query), false), Dest::Group),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddrV4;

    const OURS: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 157);
    const MASK: Ipv4Addr = Ipv4Addr::new(255, 255, 255, 0);

    fn info() -> ServiceInfo {
        ServiceInfo {
            model: "acme.dev.v1".into(),
            did: 1,
            ip: OURS,
            port: 54321,
        }
    }

    /// A DNS query with one PTR question; `qu` sets the unicast-response bit.
    fn query(name: &str, qu: bool) -> Vec<u8> {
        let mut m = vec![0, 7, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in name.split('.') {
            m.push(label.len() as u8);
            m.extend_from_slice(label.as_bytes());
        }
        m.extend_from_slice(&[0, 0, 12, if qu { 0x80 } else { 0 }, 1]);
        m
    }

    fn from(ip: [u8; 4], port: u16) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(ip), port))
    }

    fn responder() -> Responder {
        let mut r = Responder::default();
        assert!(r.set_service(Some(info()), Some(MASK)));
        r
    }

    #[test]
    fn routes_follow_rfc6762() {
        assert_eq!(route(54000, false), Route::Legacy);
        assert_eq!(route(54000, true), Route::Legacy);
        assert_eq!(route(MDNS_PORT, true), Route::Unicast);
        assert_eq!(route(MDNS_PORT, false), Route::Multicast);
    }

    #[test]
    fn on_link_checks_the_subnet() {
        let mask = Some(MASK);
        assert!(on_link(Ipv4Addr::new(192, 168, 1, 20), OURS, mask));
        assert!(on_link(Ipv4Addr::LOCALHOST, OURS, mask));
        assert!(!on_link(Ipv4Addr::new(8, 8, 8, 8), OURS, mask));
        assert!(!on_link(Ipv4Addr::new(192, 168, 2, 20), OURS, mask));
        assert!(on_link(Ipv4Addr::new(8, 8, 8, 8), OURS, None));
    }

    #[test]
    fn set_service_reports_changes() {
        let mut r = Responder::default();
        assert_eq!(r.announcement(), None);
        assert!(r.set_service(Some(info()), None));
        assert!(!r.set_service(Some(info()), None));
        assert!(r.set_service(Some(ServiceInfo { did: 2, ..info() }), None));
        assert_eq!(
            r.announcement(),
            Some(dns::build_announcement(&ServiceInfo { did: 2, ..info() }))
        );
        assert!(r.set_service(None, None));
        assert!(!r.set_service(None, None));
        assert_eq!(r.announcement(), None);
    }

    #[test]
    fn each_query_gets_its_form_and_destination() {
        let mut r = responder();
        let q = query("_miio._udp.local", false);
        let parsed = dns::parse_query(&q).unwrap();
        let legacy = from([192, 168, 1, 20], 40000);
        assert_eq!(
            r.handle_datagram(legacy, &q),
            Some((
                dns::build_response(&info(), Some(&parsed), true),
                Dest::Source(legacy)
            ))
        );
        let peer = from([192, 168, 1, 20], MDNS_PORT);
        assert_eq!(
            r.handle_datagram(peer, &q),
            Some((
                dns::build_response(&info(), Some(&parsed), false),
                Dest::Group
            ))
        );
        let qu = query("_miio._udp.local", true);
        let parsed_qu = dns::parse_query(&qu).unwrap();
        assert_eq!(
            r.handle_datagram(peer, &qu),
            Some((
                dns::build_response(&info(), Some(&parsed_qu), false),
                Dest::Source(peer)
            ))
        );
    }

    #[test]
    fn silent_without_service_off_link_for_others_and_on_garbage() {
        let q = query("_miio._udp.local", false);
        let peer = from([192, 168, 1, 20], MDNS_PORT);
        assert_eq!(Responder::default().handle_datagram(peer, &q), None);
        let mut r = responder();
        assert_eq!(r.handle_datagram(from([10, 0, 0, 1], MDNS_PORT), &q), None);
        assert_eq!(
            r.handle_datagram(peer, &query("_googlecast._tcp.local", false)),
            None
        );
        assert_eq!(r.handle_datagram(peer, &[1, 2, 3]), None);
        assert_eq!(r.bad, 1);
        // A response (QR bit set) is not counted as malformed.
        let mut resp = q.clone();
        resp[2] |= 0x80;
        assert_eq!(r.handle_datagram(peer, &resp), None);
        assert_eq!(r.bad, 1);
    }
}
