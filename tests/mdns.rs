//! The mDNS responder on loopback (PROTOCOL.md §4.8): legacy unicast queries from a plain UDP socket,
//! the replies decoded by a real DNS library (python `dnslib`), and the cases that must stay silent.

mod common;

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};

use miio_client::io::mdns::Mdns;
use miio_client::io::reactor;
use miio_client::wire::dns::ServiceInfo;
use mio::{Events, Interest, Poll};

const LIMIT: Duration = Duration::from_secs(5);
const INSTANCE: &str = "acme-dev-v1_miio123456789._miio._udp.local.";
const HOST: &str = "acme-dev-v1_miio123456789.local.";

fn info(ip: Ipv4Addr) -> ServiceInfo {
    ServiceInfo {
        model: "acme.dev.v1".into(),
        did: 123456789,
        ip,
        port: 54321,
    }
}

/// A responder registered with its own poll, as the daemon registers it with reactor::MDNS.
struct Rig {
    mdns: Mdns,
    poll: Poll,
    events: Events,
    addr: SocketAddr,
}

impl Rig {
    fn new(mut mdns: Mdns) -> Rig {
        let poll = Poll::new().unwrap();
        poll.registry()
            .register(mdns.source(), reactor::MDNS, Interest::READABLE)
            .unwrap();
        let port = mdns.local_addr().unwrap().port();
        Rig {
            mdns,
            poll,
            events: Events::with_capacity(8),
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        }
    }

    fn plain() -> Rig {
        Rig::new(Mdns::from_socket(Mdns::bind_plain(0).unwrap(), false).unwrap())
    }

    /// Waits (with a deadline) for the socket to be readable, then lets the responder drain it.
    /// Loopback sends are queued before `send_to` returns, so one event covers all sent so far.
    fn serve(&mut self) {
        let end = Instant::now() + LIMIT;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "responder socket never became readable");
            self.poll.poll(&mut self.events, Some(left)).unwrap();
            if self.events.iter().any(|e| e.token() == reactor::MDNS) {
                self.mdns.readable();
                return;
            }
        }
    }
}

/// A plain UDP socket on loopback playing the querier.
fn querier() -> UdpSocket {
    let s = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    s.set_read_timeout(Some(LIMIT)).unwrap();
    s
}

/// A DNS query with one question, names uncompressed, built by hand.
fn query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut m = id.to_be_bytes().to_vec();
    m.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        m.push(label.len() as u8);
        m.extend_from_slice(label.as_bytes());
    }
    m.extend_from_slice(&[0, 0, qtype as u8, 0, 1]);
    m
}

fn recv(s: &UdpSocket) -> Vec<u8> {
    let mut buf = [0u8; 2048];
    let (n, _) = s.recv_from(&mut buf).expect("no reply within the deadline");
    buf[..n].to_vec()
}

fn reply_id(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

/// Decodes a DNS message with python dnslib; one line per item. None when dnslib is missing.
fn decode(bytes: &[u8]) -> Option<Vec<String>> {
    if !common::python_has("dnslib") {
        common::skip("python dnslib");
        return None;
    }
    const SCRIPT: &str = r#"
import sys, dnslib
r = dnslib.DNSRecord.parse(bytes.fromhex(sys.argv[1]))
h = r.header
print("HDR", h.id, h.qr, h.aa, len(r.questions), len(r.rr), len(r.auth), len(r.ar))
for q in r.questions:
    print("Q", q.qname, dnslib.QTYPE[q.qtype], q.qclass)
for rr in r.rr:
    t = dnslib.QTYPE[rr.rtype]
    if t == "PTR":
        v = str(rr.rdata.label)
    elif t == "SRV":
        v = "%d %d %d %s" % (rr.rdata.priority, rr.rdata.weight, rr.rdata.port, rr.rdata.target)
    elif t == "TXT":
        v = "|".join(d.decode() for d in rr.rdata.data)
    else:
        v = str(rr.rdata)
    print(t, rr.rname, rr.rclass, rr.ttl, v)
"#;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let out = Command::new(common::python())
        .args(["-c", SCRIPT, &hex])
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "dnslib rejected the reply: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect(),
    )
}

/// The five records every answer carries, for a given class field and TTL.
fn records(class_unique: u16, ttl: u32, ip: &str) -> Vec<String> {
    vec![
        format!("PTR _services._dns-sd._udp.local. 1 {ttl} _miio._udp.local."),
        format!("PTR _miio._udp.local. 1 {ttl} {INSTANCE}"),
        format!("SRV {INSTANCE} {class_unique} {ttl} 0 0 54321 {HOST}"),
        format!("TXT {INSTANCE} {class_unique} {ttl} path=/mydevice"),
        format!("A {HOST} {class_unique} {ttl} {ip}"),
    ]
}

#[test]
fn legacy_ptr_query_is_answered_and_dnslib_reads_it() {
    let mut rig = Rig::plain();
    rig.mdns.set_service(Some(info(Ipv4Addr::LOCALHOST)));
    let q = querier();
    q.send_to(&query(0x4d2, "_miio._udp.local", 12), rig.addr)
        .unwrap();
    rig.serve();
    let reply = recv(&q);
    let Some(lines) = decode(&reply) else { return };
    // RFC 6762 §6.7: id echoed, question repeated, TTL 10, no cache-flush bit.
    let mut want = vec![
        "HDR 1234 1 1 1 5 0 0".to_owned(),
        "Q _miio._udp.local. PTR 1".to_owned(),
    ];
    want.extend(records(1, 10, "127.0.0.1"));
    assert_eq!(lines, want);
}

#[test]
fn announcement_goes_to_the_target_in_mdns_form() {
    let mut rig = Rig::plain();
    let sink = querier();
    rig.mdns.set_target(sink.local_addr().unwrap());
    // Nothing is sent without a service; the first datagram is the announcement below.
    rig.mdns.announce();
    assert!(rig
        .mdns
        .set_service(Some(info(Ipv4Addr::new(192, 168, 1, 157)))));
    rig.mdns.announce();
    let bytes = recv(&sink);
    let Some(lines) = decode(&bytes) else { return };
    // RFC 6762 §8.3 / §10.2: id 0, no question, TTL 120, cache flush on SRV, TXT and A.
    let mut want = vec!["HDR 0 1 1 0 5 0 0".to_owned()];
    want.extend(records(0x8001, 120, "192.168.1.157"));
    assert_eq!(lines, want);
}

#[test]
fn other_names_get_no_reply() {
    let mut rig = Rig::plain();
    rig.mdns.set_service(Some(info(Ipv4Addr::LOCALHOST)));
    let q = querier();
    q.send_to(&query(1, "_http._tcp.local", 12), rig.addr)
        .unwrap();
    q.send_to(&query(2, "other-host.local", 1), rig.addr)
        .unwrap();
    // Our instance name, but a type we do not hold.
    q.send_to(
        &query(3, "acme-dev-v1_miio123456789._miio._udp.local", 1),
        rig.addr,
    )
    .unwrap();
    q.send_to(&query(4, "acme-dev-v1_miio123456789.local", 1), rig.addr)
        .unwrap();
    rig.serve();
    // Loopback keeps the order: had any earlier query been answered, its reply would come first.
    assert_eq!(reply_id(&recv(&q)), 4);
}

#[test]
fn garbage_is_dropped_and_the_responder_keeps_working() {
    let mut rig = Rig::plain();
    rig.mdns.set_service(Some(info(Ipv4Addr::LOCALHOST)));
    let q = querier();
    let mut loop_ptr = query(5, "_miio._udp.local", 12);
    loop_ptr.truncate(12);
    loop_ptr.extend_from_slice(&[0xc0, 12, 0, 12, 0, 1]); // a name pointing at itself
    let mut response = query(6, "_miio._udp.local", 12);
    response[2] = 0x84; // QR set: another responder's answer
    let mut cut = query(7, "_miio._udp.local", 12);
    cut.truncate(20);
    for junk in [
        &b""[..],
        &b"\x00"[..],
        &[0xff; 300][..],
        &loop_ptr,
        &response,
        &cut,
        &[0, 8, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0x40, 1, 2][..], // reserved label type
    ] {
        q.send_to(junk, rig.addr).unwrap();
    }
    q.send_to(&query(9, "_miio._udp.local", 12), rig.addr)
        .unwrap();
    rig.serve();
    assert_eq!(reply_id(&recv(&q)), 9);
    // And again, after the drain.
    q.send_to(&query(10, "_services._dns-sd._udp.local", 12), rig.addr)
        .unwrap();
    rig.serve();
    assert_eq!(reply_id(&recv(&q)), 10);
}

#[test]
fn no_service_means_no_answer() {
    let mut rig = Rig::plain();
    let q = querier();
    q.send_to(&query(1, "_miio._udp.local", 12), rig.addr)
        .unwrap();
    rig.serve();
    rig.mdns.set_service(Some(info(Ipv4Addr::LOCALHOST)));
    q.send_to(&query(2, "_miio._udp.local", 12), rig.addr)
        .unwrap();
    rig.serve();
    assert_eq!(reply_id(&recv(&q)), 2);
    // Back to AP mode: silent again.
    rig.mdns.set_service(None);
    q.send_to(&query(3, "_miio._udp.local", 12), rig.addr)
        .unwrap();
    rig.serve();
    rig.mdns.set_service(Some(info(Ipv4Addr::LOCALHOST)));
    q.send_to(&query(4, "_miio._udp.local", 12), rig.addr)
        .unwrap();
    rig.serve();
    assert_eq!(reply_id(&recv(&q)), 4);
}

#[test]
fn failed_multicast_join_still_answers_unicast() {
    // 192.0.2.1 (TEST-NET-1) is on no interface here, so joining the group on it fails.
    let absent = Ipv4Addr::new(192, 0, 2, 1);
    let mdns = Mdns::open(0, Some(absent)).expect("a failed join is not an error");
    assert!(!mdns.multicast());
    let mut rig = Rig::new(mdns);
    assert!(rig.mdns.set_service(Some(info(absent))));
    assert!(!rig.mdns.multicast());
    let q = querier();
    q.send_to(&query(77, "_miio._udp.local", 12), rig.addr)
        .unwrap();
    rig.serve();
    let reply = recv(&q);
    assert_eq!(reply_id(&reply), 77);
    let Some(lines) = decode(&reply) else { return };
    assert_eq!(lines.last().unwrap(), &format!("A {HOST} 1 10 192.0.2.1"));
}

#[test]
fn the_daemon_answers_a_legacy_query_once_connected() {
    use common::*;
    const T: Duration = Duration::from_secs(15);
    let cloud = fakecloud();
    let dir = provisioned_dir("mdns-daemon");
    let mut a = cloud_args(&dir, cloud.port)
        .opt("--mdns-port", AUTO)
        .opt("--helper-grace", 0)
        .build();
    a.retain(|x| x != "--no-mdns");
    let d = Daemon::start(&dir, &a);
    let (lan, mdns_port) = (d.lan(), d.mdns());
    assert!(d.wait_log("STATE_CLOUD_CONNECTED", T), "{}", d.log_text());
    // The daemon sets its service in the same turn it logs the state; a query is still asked
    // again each second until the deadline, as a resolver would.
    let q = querier();
    q.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let end = Instant::now() + T;
    let reply = loop {
        q.send_to(
            &query(0x77, "_miio._udp.local", 12),
            (Ipv4Addr::LOCALHOST, mdns_port),
        )
        .unwrap();
        let mut buf = [0u8; 2048];
        if let Ok((n, _)) = q.recv_from(&mut buf) {
            break buf[..n].to_vec();
        }
        assert!(Instant::now() < end, "no mDNS reply: {}", d.log_text());
    };
    let Some(lines) = decode(&reply) else { return };
    assert_eq!(lines[0], "HDR 119 1 1 1 5 0 0", "{lines:?}");
    assert!(
        lines.contains(&format!("PTR _miio._udp.local. 1 10 {INSTANCE}")),
        "{lines:?}"
    );
    assert!(
        lines.contains(&format!("SRV {INSTANCE} 1 10 0 0 {lan} {HOST}")),
        "SRV carries the LAN port: {lines:?}"
    );
    assert!(
        lines.contains(&format!("A {HOST} 1 10 127.0.0.1")),
        "{lines:?}"
    );
    assert!(lines
        .iter()
        .any(|l| l.starts_with("TXT ") && l.ends_with("path=/mydevice")));
}
