//! A tiny DNS message codec for the mDNS service `_miio._udp.local` (PROTOCOL.md §4.8; RFC 1035,
//! RFC 6762, RFC 6763).
//!
//! Contract: [`parse_query`] reads the header and the question section of a query and nothing else
//! (answers, authority and additional records of a query are ignored). Names may use compression
//! pointers; a pointer must point strictly backwards, at most 16 are followed per name, and a name is
//! at most 255 bytes, so no input loops. [`answers_for`] says whether a query asks for one of our
//! names; [`build_response`] builds the answer (or, with no query, the unsolicited announcement).
//! Pure functions: no I/O, no clock, no logging; nothing here panics on any input.
//!
//! Our records (P§4.8), all in the answer section, names written uncompressed:
//! - PTR `_services._dns-sd._udp.local` → `_miio._udp.local` (RFC 6763 §9)
//! - PTR `_miio._udp.local` → `<label>._miio._udp.local`
//! - SRV `<label>._miio._udp.local`: priority 0, weight 0, the LAN port, target `<label>.local`
//! - TXT `<label>._miio._udp.local`: `path=/mydevice`
//! - A `<label>.local`: the IPv4 address given
//!
//! where `<label>` is `<model with . replaced by ->_miio<did>`, the DHCP host name of L§8, so the
//! SRV target is that host name. TTL 120 s; in a legacy unicast reply (source port not 5353, RFC 6762
//! §6.7) 10 s, the query id echoed, the questions repeated and no cache-flush bit (RFC 6762 §10.2).

use core::fmt;
use std::net::Ipv4Addr;

/// The mDNS port and group (RFC 6762 §3).
pub const MDNS_PORT: u16 = 5353;
pub const MDNS_GROUP: Ipv4Addr = Ipv4Addr::new(224, 0, 0, 251);
/// Our service type and the DNS-SD enumeration name (P§4.8, RFC 6763 §9).
pub const SERVICE: &str = "_miio._udp.local";
pub const SERVICES_META: &str = "_services._dns-sd._udp.local";
/// The one TXT string (P§4.8).
pub const TXT_PATH: &str = "path=/mydevice";
/// Record TTL (P§4.8), and the cap for legacy unicast replies (RFC 6762 §6.7).
pub const TTL: u32 = 120;
pub const LEGACY_TTL: u32 = 10;

/// Record types we read or write.
pub const TYPE_A: u16 = 1;
pub const TYPE_PTR: u16 = 12;
pub const TYPE_TXT: u16 = 16;
pub const TYPE_SRV: u16 = 33;
pub const TYPE_ANY: u16 = 255;
pub const CLASS_IN: u16 = 1;
pub const CLASS_ANY: u16 = 255;
/// Top bit of QCLASS: unicast response wanted (RFC 6762 §5.4); of a record class: cache flush (§10.2).
const TOP_BIT: u16 = 0x8000;

const HEADER_LEN: usize = 12;
/// Response flags: QR and AA (RFC 6762 §18).
const RESPONSE_FLAGS: u16 = 0x8400;
const MAX_NAME: usize = 255;
const MAX_LABEL: usize = 63;
const MAX_JUMPS: usize = 16;
/// Questions parsed per query; the rest are ignored, so a query costs bounded memory.
pub const MAX_QUESTIONS: usize = 32;

/// One classic BPF instruction, laid out as the kernel's `struct sock_filter`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct BpfInsn {
    pub code: u16,
    pub jt: u8,
    pub jf: u8,
    pub k: u32,
}

/// The kernel's limit on a classic BPF program (BPF_MAXINSNS).
pub const BPF_MAX_INSNS: usize = 4096;
/// Datagrams up to this many bytes (as the filter sees them) are scanned; longer ones always pass.
pub const FILTER_SCAN: u32 = 800;
const BPF_LD_W_ABS: u16 = 0x20;
const BPF_LD_W_LEN: u16 = 0x80;
const BPF_OR_K: u16 = 0x44;
const BPF_JEQ_K: u16 = 0x15;
const BPF_JGT_K: u16 = 0x25;
const BPF_RET_K: u16 = 0x06;
/// What a filter returns to keep the whole datagram, and to drop it.
pub const BPF_PASS: u32 = u32::MAX;
pub const BPF_DROP: u32 = 0;

/// A socket filter for the responder's socket, so the kernel drops, without waking the daemon,
/// the mDNS traffic it would not answer (the other devices' queries and answers on the LAN).
///
/// Every name [`answers_for`] accepts holds the label `_miio` (the service type, and the instance
/// and host names, whose `<label>` is `<model>_miio<did>` with a model of at most 23 characters)
/// or `_services`, in any letter case, and whatever compression a query uses those bytes stand in
/// the datagram. So the filter passes a datagram in which the four bytes `_mii` or `_ser` appear at
/// any offset (OR 0x20 folds the case: `_` becomes 0x7f, which only DEL shares), and drops the rest.
/// A classic BPF program has no loops, so the scan is unrolled over the first [`FILTER_SCAN`]
/// bytes and a longer datagram passes unscanned. A load past the end of the datagram ends the
/// program with "drop", which is what the scan wants: nothing matched before the end. Offsets count
/// from whatever the kernel shows a UDP filter first (the UDP header), since every offset is tried.
/// It passes some datagrams the responder then ignores (responses of other miio devices); it never
/// drops one it answers.
pub fn query_filter() -> Vec<BpfInsn> {
    let ins = |code, jt, jf, k| BpfInsn { code, jt, jf, k };
    let fold = |w: &[u8; 4]| u32::from_be_bytes(*w) | 0x2020_2020;
    let (miio, services) = (fold(b"_mii"), fold(b"_ser"));
    let mut p = vec![
        ins(BPF_LD_W_LEN, 0, 0, 0),
        ins(BPF_JGT_K, 0, 1, FILTER_SCAN),
        ins(BPF_RET_K, 0, 0, BPF_PASS),
    ];
    for at in 0..=FILTER_SCAN - 4 {
        p.extend([
            ins(BPF_LD_W_ABS, 0, 0, at),
            ins(BPF_OR_K, 0, 0, 0x2020_2020),
            // A match jumps to the `ret pass` two further on; no match skips it.
            ins(BPF_JEQ_K, 1, 0, miio),
            ins(BPF_JEQ_K, 0, 1, services),
            ins(BPF_RET_K, 0, 0, BPF_PASS),
        ]);
    }
    p.push(ins(BPF_RET_K, 0, 0, BPF_DROP));
    p
}

/// Why a message was not taken as a query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DnsError {
    /// The message ends inside the header or a question.
    Truncated,
    /// A response (QR set) or an opcode other than 0: ignored (RFC 6762 §18.3).
    NotQuery,
    /// A label length byte with the reserved top bits `01` or `10`.
    BadLabel,
    /// A name longer than 255 bytes.
    NameTooLong,
    /// A compression pointer that does not point backwards, or too many of them.
    PointerLoop,
}

impl fmt::Display for DnsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DnsError::Truncated => "mDNS message truncated",
            DnsError::NotQuery => "mDNS message is not a standard query",
            DnsError::BadLabel => "mDNS name has a reserved label type",
            DnsError::NameTooLong => "mDNS name longer than 255 bytes",
            DnsError::PointerLoop => "mDNS name compression pointer loops",
        })
    }
}

impl std::error::Error for DnsError {}

/// One question of a query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Question {
    /// The name in dotted form, for log lines (labels joined by `.`, invalid UTF-8 replaced).
    pub name: String,
    pub qtype: u16,
    /// QCLASS without the unicast-response bit.
    pub qclass: u16,
    /// The unicast-response (QU) bit (RFC 6762 §5.4).
    pub unicast: bool,
    /// The name in wire form, uncompressed: compared and echoed byte for byte.
    wire: Vec<u8>,
}

/// The parts of a query we use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    pub id: u16,
    /// At most [`MAX_QUESTIONS`].
    pub questions: Vec<Question>,
}

impl Query {
    /// True when a question asks for a unicast response (QU): the reply may go to the source.
    pub fn wants_unicast(&self) -> bool {
        self.questions.iter().any(|q| q.unicast)
    }
}

/// What we announce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceInfo {
    /// `model` of device.conf, e.g. `xiaomi.dev.v1`.
    pub model: String,
    pub did: u32,
    /// The A record: the local address of the cloud socket (P§4.8).
    pub ip: Ipv4Addr,
    /// The LAN port for the SRV record (54321 unless `--lan-port` moves it).
    pub port: u16,
}

impl ServiceInfo {
    /// `<model with . → ->_miio<did>`, cut to 63 bytes at a character boundary.
    pub fn label(&self) -> String {
        let mut s = format!("{}_miio{}", self.model.replace('.', "-"), self.did);
        while s.len() > MAX_LABEL {
            s.pop();
        }
        s
    }

    /// `<label>._miio._udp.local`: the service instance.
    pub fn instance_name(&self) -> String {
        format!("{}.{SERVICE}", self.label())
    }

    /// `<label>.local`: the SRV target and the A record's name.
    pub fn host_name(&self) -> String {
        format!("{}.local", self.label())
    }
}

/// Reads the header and the questions of a query.
pub fn parse_query(msg: &[u8]) -> Result<Query, DnsError> {
    if msg.len() < HEADER_LEN {
        return Err(DnsError::Truncated);
    }
    let id = be16(msg, 0)?;
    let flags = be16(msg, 2)?;
    let qdcount = be16(msg, 4)?;
    if flags & 0x8000 != 0 || (flags >> 11) & 0xf != 0 {
        return Err(DnsError::NotQuery);
    }
    let mut questions = Vec::new();
    let mut pos = HEADER_LEN;
    for _ in 0..usize::from(qdcount).min(MAX_QUESTIONS) {
        let (wire, end) = read_name(msg, pos)?;
        let qtype = be16(msg, end)?;
        let qclass = be16(msg, end + 2)?;
        pos = end + 4;
        questions.push(Question {
            name: display_name(&wire),
            qtype,
            qclass: qclass & !TOP_BIT,
            unicast: qclass & TOP_BIT != 0,
            wire,
        });
    }
    Ok(Query { id, questions })
}

/// True when some question asks for one of our records (class IN or ANY).
pub fn answers_for(query: &Query, info: &ServiceInfo) -> bool {
    let service = encode_name(SERVICE);
    let meta = encode_name(SERVICES_META);
    let instance = encode_name(&info.instance_name());
    let host = encode_name(&info.host_name());
    query.questions.iter().any(|q| {
        let class_ok = matches!(q.qclass, CLASS_IN | CLASS_ANY);
        let is = |name: &[u8], types: &[u16]| {
            q.wire.eq_ignore_ascii_case(name) && (q.qtype == TYPE_ANY || types.contains(&q.qtype))
        };
        class_ok
            && (is(&service, &[TYPE_PTR])
                || is(&meta, &[TYPE_PTR])
                || is(&instance, &[TYPE_SRV, TYPE_TXT])
                || is(&host, &[TYPE_A]))
    })
}

/// Our records as one response. With `query` and `legacy` (source port not 5353) it is a legacy
/// unicast reply: the query id, the questions repeated, TTL 10, no cache-flush bit. Otherwise id 0,
/// no questions, TTL 120, cache-flush on the unique records (SRV, TXT, A). `query: None` gives the
/// unsolicited announcement (RFC 6762 §8.3).
pub fn build_response(info: &ServiceInfo, query: Option<&Query>, legacy: bool) -> Vec<u8> {
    let legacy = legacy && query.is_some();
    let echoed: &[Question] = match query {
        Some(q) if legacy => &q.questions,
        _ => &[],
    };
    let (ttl, flush) = if legacy {
        (LEGACY_TTL, 0)
    } else {
        (TTL, TOP_BIT)
    };
    let mut out = Vec::with_capacity(320);
    put16(&mut out, if legacy { query.map_or(0, |q| q.id) } else { 0 });
    put16(&mut out, RESPONSE_FLAGS);
    // At most MAX_QUESTIONS are ever echoed, so the count fits.
    put16(&mut out, echoed.len() as u16);
    put16(&mut out, 5);
    put16(&mut out, 0);
    put16(&mut out, 0);
    for q in echoed {
        out.extend_from_slice(&q.wire);
        put16(&mut out, q.qtype);
        put16(&mut out, CLASS_IN);
    }

    let instance = encode_name(&info.instance_name());
    let host = encode_name(&info.host_name());
    let service = encode_name(SERVICE);

    put_record(
        &mut out,
        &encode_name(SERVICES_META),
        TYPE_PTR,
        CLASS_IN,
        ttl,
        &service,
    );
    put_record(&mut out, &service, TYPE_PTR, CLASS_IN, ttl, &instance);

    let mut srv = Vec::with_capacity(6 + host.len());
    put16(&mut srv, 0); // priority
    put16(&mut srv, 0); // weight
    put16(&mut srv, info.port);
    srv.extend_from_slice(&host);
    put_record(&mut out, &instance, TYPE_SRV, CLASS_IN | flush, ttl, &srv);

    let mut txt = Vec::with_capacity(1 + TXT_PATH.len());
    txt.push(TXT_PATH.len() as u8); // 14 bytes
    txt.extend_from_slice(TXT_PATH.as_bytes());
    put_record(&mut out, &instance, TYPE_TXT, CLASS_IN | flush, ttl, &txt);

    put_record(
        &mut out,
        &host,
        TYPE_A,
        CLASS_IN | flush,
        ttl,
        &info.ip.octets(),
    );
    out
}

/// The unsolicited announcement: [`build_response`] without a query.
pub fn build_announcement(info: &ServiceInfo) -> Vec<u8> {
    build_response(info, None, false)
}

fn put16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_be_bytes());
}

fn put_record(out: &mut Vec<u8>, name: &[u8], rtype: u16, class: u16, ttl: u32, rdata: &[u8]) {
    out.extend_from_slice(name);
    put16(out, rtype);
    put16(out, class);
    out.extend_from_slice(&ttl.to_be_bytes());
    // Our rdata is a name (≤ 255 bytes) plus 6 at most, so the length fits.
    put16(out, rdata.len() as u16);
    out.extend_from_slice(rdata);
}

/// A dotted name in wire form: empty labels skipped, each label cut to 63 bytes, the whole name
/// cut so it stays within 255 bytes.
fn encode_name(name: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(name.len() + 2);
    for label in name.split('.').filter(|l| !l.is_empty()) {
        let bytes = label.as_bytes();
        let bytes = bytes.get(..MAX_LABEL).unwrap_or(bytes);
        if out.len() + 1 + bytes.len() + 1 > MAX_NAME {
            break;
        }
        out.push(bytes.len() as u8); // ≤ 63
        out.extend_from_slice(bytes);
    }
    out.push(0);
    out
}

/// The name at `pos`, uncompressed into wire form, and the offset just after it in the message.
fn read_name(msg: &[u8], mut pos: usize) -> Result<(Vec<u8>, usize), DnsError> {
    let mut wire = Vec::new();
    let mut end = None;
    let mut jumps = 0;
    loop {
        let len = *msg.get(pos).ok_or(DnsError::Truncated)?;
        match len & 0xc0 {
            0x00 => {
                let n = usize::from(len);
                if wire.len() + 1 + n > MAX_NAME {
                    return Err(DnsError::NameTooLong);
                }
                let label = msg.get(pos + 1..pos + 1 + n).ok_or(DnsError::Truncated)?;
                wire.push(len);
                wire.extend_from_slice(label);
                pos += 1 + n;
                if n == 0 {
                    return Ok((wire, end.unwrap_or(pos)));
                }
            }
            0xc0 => {
                let low = *msg.get(pos + 1).ok_or(DnsError::Truncated)?;
                let target = usize::from(len & 0x3f) << 8 | usize::from(low);
                end.get_or_insert(pos + 2);
                jumps += 1;
                // RFC 1035 §4.1.4: a pointer refers to a prior occurrence.
                if target >= pos || jumps > MAX_JUMPS {
                    return Err(DnsError::PointerLoop);
                }
                pos = target;
            }
            _ => return Err(DnsError::BadLabel),
        }
    }
}

/// Wire form to `a.b.c`, lowercase, for log lines only.
fn display_name(wire: &[u8]) -> String {
    let mut out = Vec::with_capacity(wire.len());
    let mut i = 0;
    while let Some(&n) = wire.get(i) {
        let n = usize::from(n);
        if n == 0 {
            break;
        }
        if !out.is_empty() {
            out.push(b'.');
        }
        out.extend(wire.iter().skip(i + 1).take(n).map(u8::to_ascii_lowercase));
        i += 1 + n;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn be16(msg: &[u8], at: usize) -> Result<u16, DnsError> {
    msg.get(at..at + 2)
        .and_then(|s| s.try_into().ok())
        .map(u16::from_be_bytes)
        .ok_or(DnsError::Truncated)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn info() -> ServiceInfo {
        ServiceInfo {
            model: "xiaomi.dev.v1".into(),
            did: 11245,
            ip: Ipv4Addr::new(192, 168, 1, 157),
            port: 54321,
        }
    }

    /// A query with one question per (name, type, class) built by hand, names uncompressed.
    fn query(id: u16, qs: &[(&str, u16, u16)]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&id.to_be_bytes());
        m.extend_from_slice(&[0, 0]);
        m.extend_from_slice(&(qs.len() as u16).to_be_bytes());
        m.extend_from_slice(&[0; 6]);
        for (name, t, c) in qs {
            for label in name.split('.') {
                m.push(label.len() as u8);
                m.extend_from_slice(label.as_bytes());
            }
            m.push(0);
            m.extend_from_slice(&t.to_be_bytes());
            m.extend_from_slice(&c.to_be_bytes());
        }
        m
    }

    /// One resource record of a response, decoded for the assertions.
    #[derive(Debug, PartialEq)]
    struct Rr {
        name: String,
        rtype: u16,
        class: u16,
        ttl: u32,
        /// PTR and SRV targets decoded; TXT and A as raw bytes.
        target: String,
        rdata: Vec<u8>,
    }

    /// Reads a whole response with the module's own name reader (id, questions, answers).
    fn read_response(m: &[u8]) -> (u16, u16, Vec<Question>, Vec<Rr>) {
        let id = be16(m, 0).unwrap();
        let flags = be16(m, 2).unwrap();
        let qd = be16(m, 4).unwrap();
        let an = be16(m, 6).unwrap();
        assert_eq!((be16(m, 8).unwrap(), be16(m, 10).unwrap()), (0, 0));
        let mut pos = HEADER_LEN;
        let mut qs = Vec::new();
        for _ in 0..qd {
            let (wire, end) = read_name(m, pos).unwrap();
            let qtype = be16(m, end).unwrap();
            let qclass = be16(m, end + 2).unwrap();
            qs.push(Question {
                name: display_name(&wire),
                qtype,
                qclass,
                unicast: false,
                wire,
            });
            pos = end + 4;
        }
        let mut rrs = Vec::new();
        for _ in 0..an {
            let (wire, end) = read_name(m, pos).unwrap();
            let rtype = be16(m, end).unwrap();
            let class = be16(m, end + 2).unwrap();
            let ttl = u32::from_be_bytes(m[end + 4..end + 8].try_into().unwrap());
            let len = usize::from(be16(m, end + 8).unwrap());
            let start = end + 10;
            let rdata = m[start..start + len].to_vec();
            let target = match rtype {
                TYPE_PTR => display_name(&read_name(m, start).unwrap().0),
                TYPE_SRV => display_name(&read_name(m, start + 6).unwrap().0),
                _ => String::new(),
            };
            rrs.push(Rr {
                name: display_name(&wire),
                rtype,
                class,
                ttl,
                target,
                rdata,
            });
            pos = start + len;
        }
        assert_eq!(pos, m.len(), "no trailing bytes");
        (id, flags, qs, rrs)
    }

    #[test]
    fn names() {
        let i = info();
        assert_eq!(i.label(), "xiaomi-dev-v1_miio11245");
        assert_eq!(
            i.instance_name(),
            "xiaomi-dev-v1_miio11245._miio._udp.local"
        );
        assert_eq!(i.host_name(), "xiaomi-dev-v1_miio11245.local");
        let long = ServiceInfo {
            model: "é".repeat(40),
            ..info()
        };
        assert!(long.label().len() <= 63);
        assert_eq!(encode_name("a..b."), b"\x01a\x01b\x00");
        assert_eq!(encode_name(""), b"\x00");
        assert_eq!(encode_name(&"x.".repeat(200)).len(), 255);
    }

    #[test]
    fn ptr_query_gets_every_record_legacy() {
        let raw = query(0x1234, &[(SERVICE, TYPE_PTR, CLASS_IN)]);
        let q = parse_query(&raw).unwrap();
        assert_eq!(q.id, 0x1234);
        assert_eq!(q.questions.len(), 1);
        assert_eq!(q.questions[0].name, SERVICE);
        assert_eq!(
            (q.questions[0].qtype, q.questions[0].qclass),
            (TYPE_PTR, CLASS_IN)
        );
        assert!(!q.wants_unicast());
        assert!(answers_for(&q, &info()));

        let resp = build_response(&info(), Some(&q), true);
        let (id, flags, qs, rrs) = read_response(&resp);
        assert_eq!((id, flags), (0x1234, 0x8400));
        // The question is repeated (RFC 6762 §6.7).
        assert_eq!(qs.len(), 1);
        assert_eq!(
            (qs[0].name.as_str(), qs[0].qtype, qs[0].qclass),
            (SERVICE, TYPE_PTR, CLASS_IN)
        );
        let inst = "xiaomi-dev-v1_miio11245._miio._udp.local".to_owned();
        let host = "xiaomi-dev-v1_miio11245.local".to_owned();
        let want = vec![
            (SERVICES_META.to_owned(), TYPE_PTR, SERVICE.to_owned()),
            (SERVICE.to_owned(), TYPE_PTR, inst.clone()),
            (inst.clone(), TYPE_SRV, host.clone()),
            (inst.clone(), TYPE_TXT, String::new()),
            (host.clone(), TYPE_A, String::new()),
        ];
        let got: Vec<_> = rrs
            .iter()
            .map(|r| (r.name.clone(), r.rtype, r.target.clone()))
            .collect();
        assert_eq!(got, want);
        // Legacy: TTL 10 and no cache-flush bit.
        assert!(rrs
            .iter()
            .all(|r| r.ttl == LEGACY_TTL && r.class == CLASS_IN));
        assert_eq!(
            &rrs[2].rdata[..6],
            &[0, 0, 0, 0, 0xd4, 0x31],
            "priority 0, weight 0, port 54321"
        );
        assert_eq!(rrs[3].rdata, b"\x0epath=/mydevice");
        assert_eq!(rrs[4].rdata, [192, 168, 1, 157]);
    }

    #[test]
    fn multicast_response_and_announcement() {
        let q = parse_query(&query(7, &[(SERVICE, TYPE_PTR, CLASS_IN | 0x8000)])).unwrap();
        assert!(q.wants_unicast());
        assert_eq!(q.questions[0].qclass, CLASS_IN);
        let resp = build_response(&info(), Some(&q), false);
        assert_eq!(resp, build_announcement(&info()));
        let (id, flags, qs, rrs) = read_response(&resp);
        assert_eq!((id, flags, qs.len(), rrs.len()), (0, 0x8400, 0, 5));
        assert!(rrs.iter().all(|r| r.ttl == TTL));
        // PTRs are shared records; SRV, TXT and A are unique and flush caches (RFC 6762 §10.2).
        let classes: Vec<u16> = rrs.iter().map(|r| r.class).collect();
        assert_eq!(classes, [1, 1, 0x8001, 0x8001, 0x8001]);
        // legacy without a query is an announcement too.
        assert_eq!(build_response(&info(), None, true), resp);
    }

    #[test]
    fn which_questions_we_answer() {
        let i = info();
        let yes = [
            (SERVICE, TYPE_PTR, CLASS_IN),
            (SERVICE, TYPE_ANY, CLASS_IN),
            ("_MIIO._UDP.LOCAL", TYPE_PTR, CLASS_IN),
            (SERVICES_META, TYPE_PTR, CLASS_IN),
            (SERVICE, TYPE_PTR, CLASS_ANY),
            (
                "xiaomi-dev-v1_miio11245._miio._udp.local",
                TYPE_SRV,
                CLASS_IN,
            ),
            (
                "Xiaomi-Dev-V1_miio11245._miio._udp.local",
                TYPE_TXT,
                CLASS_IN,
            ),
            ("xiaomi-dev-v1_miio11245.local", TYPE_A, CLASS_IN),
        ];
        for qq in yes {
            assert!(
                answers_for(&parse_query(&query(1, &[qq])).unwrap(), &i),
                "{qq:?}"
            );
        }
        let no = [
            ("_http._tcp.local", TYPE_PTR, CLASS_IN),
            ("_miio._udp.locall", TYPE_PTR, CLASS_IN),
            ("_miio._udp", TYPE_PTR, CLASS_IN),
            (SERVICE, TYPE_A, CLASS_IN),
            (SERVICE, TYPE_PTR, 3),
            ("xiaomi-dev-v1_miio11246.local", TYPE_A, CLASS_IN),
            ("xiaomi-dev-v1_miio11245.local", TYPE_SRV, CLASS_IN),
        ];
        for qq in no {
            assert!(
                !answers_for(&parse_query(&query(1, &[qq])).unwrap(), &i),
                "{qq:?}"
            );
        }
        // One matching question among others is enough.
        let q = parse_query(&query(1, &[no[0], yes[0]])).unwrap();
        assert!(answers_for(&q, &i));
        assert!(!answers_for(&parse_query(&query(1, &[])).unwrap(), &i));
    }

    #[test]
    fn compression_pointers() {
        // Question 1 is `_miio._udp.local`; question 2 is `x` + a pointer to `_udp.local` at 18.
        let mut m = query(1, &[(SERVICE, TYPE_PTR, CLASS_IN)]);
        m[5] = 2;
        m.extend_from_slice(&[1, b'x', 0xc0, 18, 0, 12, 0, 1]);
        let q = parse_query(&m).unwrap();
        assert_eq!(q.questions[1].name, "x._udp.local");
        assert_eq!(q.questions[1].qtype, TYPE_PTR);
        // A name that is only a pointer, to the whole first name.
        let mut m = query(1, &[(SERVICE, TYPE_A, CLASS_IN)]);
        m[5] = 2;
        m.extend_from_slice(&[0xc0, 12, 0, 12, 0, 1]);
        let q = parse_query(&m).unwrap();
        assert_eq!(q.questions[1].name, SERVICE);
        assert!(answers_for(&q, &info()));
    }

    #[test]
    fn compression_loops_are_errors() {
        let head = |n: u16| {
            let mut m = vec![0, 1, 0, 0];
            m.extend_from_slice(&n.to_be_bytes());
            m.extend_from_slice(&[0; 6]);
            m
        };
        // A pointer to itself.
        let mut m = head(1);
        m.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
        assert_eq!(parse_query(&m), Err(DnsError::PointerLoop));
        // Two pointers to each other (the first points forward).
        let mut m = head(1);
        m.extend_from_slice(&[0xc0, 14, 0xc0, 12, 0, 1, 0, 1]);
        assert_eq!(parse_query(&m), Err(DnsError::PointerLoop));
        // A label whose bytes hide a pointer back to the label: every pointer points backwards.
        let mut m = head(1);
        m.extend_from_slice(&[1, b'a', 0xc0, 12, 0, 1, 0, 1]);
        assert!(matches!(
            parse_query(&m),
            Err(DnsError::PointerLoop | DnsError::NameTooLong)
        ));
        // A long chain of backward pointers stops at the jump limit: offset 12 is the root name,
        // then pointer k (at 13 + 2k) points to pointer k-1 (pointer 0 to the root).
        let mut deep = head(1);
        deep.push(0);
        for k in 0..=MAX_JUMPS {
            let prev = if k == 0 { 12 } else { 13 + 2 * (k - 1) } as u8;
            deep.extend_from_slice(&[0xc0, prev]);
        }
        let last = deep.len() - 2;
        assert_eq!(
            read_name(&deep, last),
            Err(DnsError::PointerLoop),
            "17 jumps"
        );
        assert_eq!(read_name(&deep, last - 2), Ok((vec![0], last)), "16 jumps");
        // Reserved label types.
        let mut m = head(1);
        m.extend_from_slice(&[0x40, 0, 0, 1, 0, 1]);
        assert_eq!(parse_query(&m), Err(DnsError::BadLabel));
        // A name over 255 bytes.
        let mut m = head(1);
        for _ in 0..5 {
            m.push(63);
            m.extend_from_slice(&[b'a'; 63]);
        }
        m.extend_from_slice(&[0, 0, 1, 0, 1]);
        assert_eq!(parse_query(&m), Err(DnsError::NameTooLong));
    }

    #[test]
    fn truncated_and_other_messages() {
        let full = query(
            9,
            &[(SERVICE, TYPE_PTR, CLASS_IN), ("a.local", TYPE_A, CLASS_IN)],
        );
        assert!(parse_query(&full).is_ok());
        for n in 0..full.len() {
            assert_eq!(parse_query(&full[..n]), Err(DnsError::Truncated), "{n}");
        }
        // A response, and a query with opcode 1, are not queries.
        let mut r = full.clone();
        r[2] = 0x84;
        assert_eq!(parse_query(&r), Err(DnsError::NotQuery));
        let mut r = full.clone();
        r[2] = 0x08;
        assert_eq!(parse_query(&r), Err(DnsError::NotQuery));
        // Our own announcement, looped back, is ignored.
        assert_eq!(
            parse_query(&build_announcement(&info())),
            Err(DnsError::NotQuery)
        );
        // Answer records in a query (known answers) are ignored; so are questions beyond 32.
        let mut k = query(1, &[(SERVICE, TYPE_PTR, CLASS_IN)]);
        k[7] = 3;
        assert!(parse_query(&k).is_ok());
        let many: Vec<_> = (0..40).map(|_| (SERVICE, TYPE_PTR, CLASS_IN)).collect();
        assert_eq!(
            parse_query(&query(1, &many)).unwrap().questions.len(),
            MAX_QUESTIONS
        );
        // qdcount larger than what is there.
        let mut t = query(1, &[(SERVICE, TYPE_PTR, CLASS_IN)]);
        t[5] = 2;
        assert_eq!(parse_query(&t), Err(DnsError::Truncated));
        for e in [
            DnsError::Truncated,
            DnsError::NotQuery,
            DnsError::BadLabel,
            DnsError::NameTooLong,
            DnsError::PointerLoop,
        ] {
            assert!(e.to_string().starts_with("mDNS"));
        }
    }

    #[test]
    fn legacy_echo_keeps_the_asked_spelling() {
        let raw = query(0xbeef, &[("_MIIO._udp.local", TYPE_ANY, CLASS_IN | 0x8000)]);
        let q = parse_query(&raw).unwrap();
        let (id, _, qs, rrs) = read_response(&build_response(&info(), Some(&q), true));
        assert_eq!(id, 0xbeef);
        assert_eq!(qs[0].wire, encode_name("_MIIO._udp.local"));
        assert_eq!((qs[0].qtype, qs[0].qclass), (TYPE_ANY, CLASS_IN));
        assert_eq!(rrs.len(), 5);
    }

    /// The classic BPF the kernel would run, for the instructions `query_filter` uses: what it
    /// returns for `pkt` (a load past the end returns 0, as in the kernel).
    fn run_filter(prog: &[BpfInsn], pkt: &[u8]) -> u32 {
        let (mut a, mut pc) = (0u32, 0usize);
        loop {
            let i = prog[pc];
            pc += 1;
            match i.code {
                BPF_LD_W_LEN => a = pkt.len() as u32,
                BPF_LD_W_ABS => {
                    let at = i.k as usize;
                    let Some(w) = pkt.get(at..at + 4) else {
                        return 0;
                    };
                    a = u32::from_be_bytes(w.try_into().unwrap());
                }
                BPF_OR_K => a |= i.k,
                BPF_JEQ_K => pc += usize::from(if a == i.k { i.jt } else { i.jf }),
                BPF_JGT_K => pc += usize::from(if a > i.k { i.jt } else { i.jf }),
                BPF_RET_K => return i.k,
                c => panic!("unexpected code {c:#x}"),
            }
        }
    }

    /// As the filter sees it: the datagram behind an 8-byte UDP header, and without it.
    fn passes(pkt: &[u8]) -> bool {
        let prog = query_filter();
        let mut udp = vec![0x14, 0xe9, 0x14, 0xe9, 0, 0, 0, 0];
        udp.extend_from_slice(pkt);
        let (bare, behind) = (run_filter(&prog, pkt), run_filter(&prog, &udp));
        assert_eq!(bare, behind, "the UDP header changed the verdict");
        bare == BPF_PASS
    }

    #[test]
    fn the_filter_fits_the_kernel_and_jumps_stay_inside() {
        let prog = query_filter();
        assert!(prog.len() <= BPF_MAX_INSNS, "{} instructions", prog.len());
        for (n, i) in prog.iter().enumerate().filter(|(_, i)| i.code != BPF_RET_K) {
            let far = n + 1 + usize::from(i.jt.max(i.jf));
            assert!(far < prog.len(), "jump out of the program at {n}");
        }
        assert_eq!(prog.last().map(|i| i.k), Some(BPF_DROP));
    }

    #[test]
    fn the_filter_passes_every_query_we_answer_and_drops_foreign_ones() {
        let i = info();
        let answered = [
            (SERVICE, TYPE_PTR),
            ("_MIIO._UDP.LOCAL", TYPE_PTR),
            (SERVICES_META, TYPE_PTR),
            ("_Services._DNS-SD._udp.local", TYPE_ANY),
            ("xiaomi-dev-v1_miio11245._miio._udp.local", TYPE_SRV),
            ("XIAOMI-dev-v1_MIIO11245.local", TYPE_A),
        ];
        for (name, t) in answered {
            let q = query(
                7,
                &[
                    ("_googlecast._tcp.local", TYPE_PTR, CLASS_IN),
                    (name, t, CLASS_IN),
                ],
            );
            assert!(answers_for(&parse_query(&q).unwrap(), &i), "{name}");
            assert!(passes(&q), "{name} dropped");
        }
        for name in [
            "_googlecast._tcp.local",
            "_airplay._tcp.local",
            "printer.local",
            "_miot._udp.local",
        ] {
            let q = query(7, &[(name, TYPE_PTR, CLASS_IN)]);
            assert!(!answers_for(&parse_query(&q).unwrap(), &i));
            assert!(!passes(&q), "{name} passed");
        }
        // A response of another responder with other names, and the empty datagram.
        let mut other = query(0, &[("_hap._tcp.local", TYPE_PTR, CLASS_IN)]);
        other[2] = 0x84;
        assert!(!passes(&other));
        assert!(!passes(&[]));
        // Longer than the scan: passes unread, whatever it holds.
        let long = query(7, &[("_googlecast._tcp.local", TYPE_PTR, CLASS_IN); 40]);
        assert!(long.len() > FILTER_SCAN as usize);
        assert!(passes(&long));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        #[test]
        fn any_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..120)) {
            if let Ok(q) = parse_query(&bytes) {
                prop_assert!(q.questions.len() <= MAX_QUESTIONS);
                let _ = answers_for(&q, &info());
                let _ = build_response(&info(), Some(&q), true);
            }
        }

        #[test]
        fn query_shaped_bytes_never_panic(
            qd in 0u16..4,
            body in prop::collection::vec(
                prop_oneof![any::<u8>(), 0u8..20, Just(0xc0u8), Just(12u8), Just(0u8)], 0..80),
        ) {
            let mut m = vec![0, 1, 0, 0];
            m.extend_from_slice(&qd.to_be_bytes());
            m.extend_from_slice(&[0; 6]);
            m.extend_from_slice(&body);
            if let Ok(q) = parse_query(&m) {
                let resp = build_response(&info(), Some(&q), true);
                let (_, _, qs, rrs) = read_response(&resp);
                prop_assert_eq!(qs.len(), q.questions.len());
                prop_assert_eq!(rrs.len(), 5);
            }
        }

        /// Never drops what the responder answers: any query of up to 8 questions (any names,
        /// in any case), at least one of which it answers, passes the filter.
        #[test]
        fn the_filter_never_drops_an_answered_query(
            model in "[!-~]{1,23}", did in any::<u32>(),
            others in prop::collection::vec("[a-z_-]{1,12}(\\.[a-z_-]{1,12}){0,3}", 0..8),
            pick in 0usize..4, at in any::<prop::sample::Index>(), upper in any::<u64>(),
        ) {
            let i = ServiceInfo { model, did, ip: Ipv4Addr::new(192, 168, 1, 9), port: 54321 };
            let mine = [SERVICE.to_string(), SERVICES_META.to_string(), i.instance_name(), i.host_name()];
            let t = [TYPE_PTR, TYPE_PTR, TYPE_SRV, TYPE_A][pick];
            // Random letter case, bit by bit from `upper`.
            let name: String = mine[pick].chars().enumerate().map(|(n, c)| {
                if upper >> (n % 64) & 1 == 1 { c.to_ascii_uppercase() } else { c }
            }).collect();
            let mut qs: Vec<(&str, u16, u16)> = others.iter().map(|o| (o.as_str(), TYPE_PTR, CLASS_IN)).collect();
            qs.insert(at.index(qs.len() + 1), (&name, t, CLASS_IN));
            let q = query(1, &qs);
            if let Ok(parsed) = parse_query(&q) {
                if answers_for(&parsed, &i) {
                    prop_assert!(passes(&q));
                }
            }
        }

        #[test]
        fn any_service_info_builds_a_readable_response(
            model in "\\PC{0,80}", did in any::<u32>(), ip in any::<u32>(), port in any::<u16>()
        ) {
            let i = ServiceInfo { model, did, ip: Ipv4Addr::from(ip), port };
            let (_, _, _, rrs) = read_response(&build_announcement(&i));
            prop_assert_eq!(rrs.len(), 5);
            prop_assert_eq!(&rrs[4].rdata, &Ipv4Addr::from(ip).octets());
            let q = parse_query(&query(1, &[(SERVICE, TYPE_PTR, CLASS_IN)])).unwrap();
            prop_assert!(answers_for(&q, &i));
        }
    }
}
