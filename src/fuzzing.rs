//! The bodies of the fuzz targets. `fuzz/fuzz_targets/<name>.rs` runs each under libFuzzer
//! (`make fuzz`, fuzz/README.md) and `tests/fuzz_replay.rs` replays every committed corpus and
//! regression file through the same function on the stable toolchain.
//!
//! Contract: each target takes any bytes, returns when every invariant held and panics (with the
//! invariant in the message) when one did not; the crate must never panic on its own. The codec
//! targets drive `wire` and the `config` parsers; the machine targets decode the input into a
//! sequence of events on a virtual clock (advance by N ms, deliver a datagram or bytes, connect or
//! close a client, a resolver, helper or file answer), drain every action after each event, and play
//! the peer from what the machine sent (a fake cloud that acks the requests it saw, a phone, local
//! clients). Nothing in the daemon calls this module: the release build's LTO drops it.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::{Ipv4Addr, SocketAddr};

use serde_json::{json, Map, Value};

use crate::config::{self, Secret16};
use crate::proto::cloud::{self, Cloud, CloudConfig, CloudEvent, CloudState, Transport};
use crate::proto::helper;
use crate::proto::ioerr::OsError;
use crate::proto::lan::{Lan, LanEvent};
use crate::proto::local::{ConnId, Inbound, Local, LocalAction, Port, CLASSIFY_WINDOW};
use crate::proto::node::{Action as NodeAction, Netif, Node, NodeConfig, TokenFiles};
use crate::proto::outbox::Outbox;
use crate::proto::outbox::WifiText;
use crate::proto::state::State;
use crate::time::{Duration, Instant};
use crate::wire::crypto::Keys;
use crate::wire::json_stream::{Piece, SplitError, Splitter};
use crate::wire::{dns, miio, rpc};

/// What a driver of the cloud machine sees of it, in one stream: the effects it put in the outbox,
/// then the events it left to the node (the machine keeps the two apart; within one call no test
/// or invariant here depends on how they interleave). Also read by the machine's unit tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum CloudOut {
    Resolve {
        transport: Transport,
        host: String,
        port: u16,
        attempt: u32,
    },
    Connect {
        transport: Transport,
        addr: std::net::SocketAddrV4,
    },
    Send(Vec<u8>),
    Close,
    NeedInfo,
    ToClient {
        client: ConnId,
        text: String,
    },
    Command {
        text: String,
        id: Option<u32>,
    },
    SelfMethod {
        id: Option<u32>,
        method: String,
        params: Value,
    },
    Event(CloudEvent),
    Didkey(cloud::Didkey),
}

/// The next of what `c` did into `out` and its events, as one [`CloudOut`].
pub(crate) fn cloud_out(out: &mut Outbox, c: &mut Cloud) -> Option<CloudOut> {
    if let Some(a) = out.pop() {
        return Some(match a {
            NodeAction::Resolve {
                transport,
                host,
                port,
                attempt,
            } => CloudOut::Resolve {
                transport,
                host,
                port,
                attempt,
            },
            NodeAction::Connect { transport, addr } => CloudOut::Connect { transport, addr },
            NodeAction::CloudSend(b) => CloudOut::Send(b),
            NodeAction::CloudClose => CloudOut::Close,
            NodeAction::Local(LocalAction::Send(client, text)) => CloudOut::ToClient {
                client,
                text: text.to_string(),
            },
            other => panic!("the cloud machine queued {other:?}"),
        });
    }
    Some(match c.poll_event()? {
        cloud::Event::NeedInfo => CloudOut::NeedInfo,
        cloud::Event::Command { text, id } => CloudOut::Command { text, id },
        cloud::Event::SelfMethod { id, method, params } => {
            CloudOut::SelfMethod { id, method, params }
        }
        cloud::Event::State(e) => CloudOut::Event(e),
        cloud::Event::Didkey(d) => CloudOut::Didkey(d),
    })
}

/// A target: any bytes in, a panic when an invariant broke.
pub type Target = fn(&[u8]);

/// Every target by the name of its fuzz/fuzz_targets file and corpus directory.
pub const TARGETS: &[(&str, Target)] = &[
    ("miio_packet", miio_packet),
    ("miio_sealed", miio_sealed),
    ("json_stream", json_stream),
    ("rpc", rpc),
    ("config", config_files),
    ("dns", dns),
    ("cloud", cloud),
    ("lan", lan),
    ("local", local),
    ("node", node),
    #[cfg(feature = "mqtt")]
    ("mqtt", mqtt),
];

/// The target called `name`, if there is one.
pub fn target(name: &str) -> Option<Target> {
    TARGETS.iter().find(|(n, _)| *n == name).map(|&(_, f)| f)
}

// ---- reading the input ------------------------------------------------------------------------

/// A cursor over the fuzz input. Past the end every read gives zeros, so any input is a program.
struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    fn new(data: &'a [u8]) -> Input<'a> {
        Input { data }
    }

    fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    fn u32(&mut self) -> u32 {
        u32::from(self.u16()) | u32::from(self.u16()) << 16
    }

    fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | u64::from(self.u32()) << 32
    }

    fn bool(&mut self) -> bool {
        self.u8() & 1 == 1
    }

    /// Uniform enough in 0..n (0 when n is 0 or 1).
    fn below(&mut self, n: usize) -> usize {
        match n {
            0 | 1 => 0,
            2..=256 => usize::from(self.u8()) % n,
            _ => self.u32() as usize % n,
        }
    }

    fn pick<T: Clone>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len())].clone()
    }

    /// Up to `n` bytes (fewer at the end of the input).
    fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (a, b) = self.data.split_at(n.min(self.data.len()));
        self.data = b;
        a
    }

    /// A blob whose length (0..=255) comes first.
    fn blob(&mut self) -> &'a [u8] {
        let n = usize::from(self.u8());
        self.bytes(n)
    }

    fn text(&mut self) -> String {
        String::from_utf8_lossy(self.blob()).into_owned()
    }

    fn rest(&mut self) -> &'a [u8] {
        self.bytes(self.data.len())
    }
}

/// splitmix64, for chunk plans derived from one input byte.
fn mix(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn obj(text: &str) -> Option<Map<String, Value>> {
    rpc::parse_object(text.as_bytes()).ok()
}

// ---- shared identities ------------------------------------------------------------------------

/// The secrets the targets use: the cloud keys and tokens of the vectors (tests/vectors/miio.txt).
const CLOUD_KEY: [u8; 16] = *b"YWJjZGVmZ2hpamts";
const TOKEN: [u8; 16] = *b"ABCDEFGHIJKLMNOP";
const KEYS: [[u8; 16]; 4] = [
    CLOUD_KEY,
    TOKEN,
    [0; 16],
    [
        0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee,
        0xff,
    ],
];
/// Printable cloud keys of device.conf and `response_dinfo`.
const CLOUD_KEYS: [&str; 3] = ["YWJjZGVmZ2hpamts", "0123456789abcdef", "Key with space!~"];
/// Tokens of device.token and `response_dtoken`, and the fresh one the node is built with.
const TOKENS: [&str; 3] = ["ABCDEFGHIJKLMNOP", "abcDEF0123456789", "FreshToken012345"];
const FRESH_TOKEN: &[u8; 16] = b"FreshToken012345";
const DIDS: [u32; 5] = [1_234_567, 123_456_789, 0, 1, u32::MAX];

/// The [`Keys`] of [`KEYS`], derived once.
fn all_keys() -> &'static [Keys; 4] {
    static K: std::sync::OnceLock<[Keys; 4]> = std::sync::OnceLock::new();
    K.get_or_init(|| KEYS.map(|k| Keys::new(&k)))
}

fn b16(s: &str) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (d, s) in out.iter_mut().zip(s.bytes()) {
        *d = s;
    }
    out
}

// ---- (1) wire::miio ---------------------------------------------------------------------------

/// Raw bytes as a datagram and as a TCP stream: steps 1–5 of P§2.7, every accessor, and for a
/// packet that opens (the vectors) a seal/open round trip of its text.
pub fn miio_packet(data: &[u8]) {
    check_packet(data);
    // The same bytes as a TCP stream of frames (P§5.2).
    let mut rest = data;
    while let Ok(Some(n)) = miio::stream_frame_len(rest) {
        assert!(n >= miio::HEADER_LEN, "frame length {n} below the header");
        assert_eq!(n, usize::from(u16::from_be_bytes([rest[2], rest[3]])));
        if n > rest.len() {
            break;
        }
        let (frame, tail) = rest.split_at(n);
        // A datagram that is one whole frame was checked above.
        if frame.len() != data.len() {
            check_packet(frame);
        }
        rest = tail;
    }
    match miio::stream_frame_len(rest) {
        Ok(None) => assert!(rest.len() < 4),
        Ok(Some(n)) => assert!(n > rest.len()),
        Err(miio::Error::BadMagic | miio::Error::StreamLength(_)) => {}
        Err(e) => panic!("stream_frame_len: unexpected {e:?}"),
    }
}

fn check_packet(data: &[u8]) {
    let pkt = match miio::Packet::new_checked(data) {
        Ok(p) => p,
        Err(e) => {
            match e {
                miio::Error::TooShort(n) => assert!(n < miio::HEADER_LEN && n == data.len()),
                miio::Error::BadMagic => assert_ne!(data[..2], [0x21, 0x31]),
                miio::Error::BadLength { actual, .. } => assert_eq!(actual, data.len()),
                e => panic!("new_checked: unexpected {e:?}"),
            }
            assert!(!e.to_string().is_empty());
            for keys in all_keys() {
                assert_eq!(miio::decode(keys, 0, data), Err(e));
            }
            return;
        }
    };
    assert_eq!(usize::from(pkt.length()), data.len());
    assert_eq!(pkt.payload().len(), data.len() - miio::HEADER_LEN);
    assert_eq!(pkt.is_control(), data.len() == miio::HEADER_LEN);
    assert!(!pkt.is_lan_hello() || pkt.ids_all_ff());
    assert_eq!(&pkt.checksum()[..], &data[16..32]);
    let _ = (pkt.unknown(), pkt.stamp());
    let did = pkt.did();
    // Each key costs an MD5 over the payload: a long packet is opened under one of them (picked by
    // its length; V1's is the cloud key), a short one under all four.
    let keys = all_keys();
    let keys = match pkt.payload().len() {
        0..=255 => &keys[..],
        _ => std::slice::from_ref(&keys[data.len() % keys.len()]),
    };
    for keys in keys {
        let r = miio::open(keys, did, &pkt);
        // The MD5 is checked (and costly) once: past it, control_md5_ok must agree.
        let md5_ok = r != Err(miio::Error::Md5Mismatch);
        if md5_ok {
            assert!(
                miio::control_md5_ok(keys, &pkt),
                "opened without a good MD5"
            );
        }
        if did != u32::MAX {
            let other = miio::open(keys, did.wrapping_add(1), &pkt);
            assert_eq!(
                other,
                Err(miio::Error::DidMismatch { got: did }),
                "did is checked first"
            );
        }
        match r {
            Ok(o) => {
                assert!(!o.text.contains('\0'), "text cut at the first NUL");
                assert_eq!(rpc::parse_object(o.text.as_bytes()).as_ref(), Ok(&o.value));
                // Sealed again, it opens to the same text and value.
                let again = miio::seal(keys, did, pkt.stamp(), o.text.as_bytes());
                let back = miio::decode(keys, did, &again).expect("a re-sealed packet opens");
                assert_eq!(back, o);
            }
            Err(e) => assert!(!e.to_string().is_empty()),
        }
    }
}

/// A plaintext sealed with a known key, then opened: what `open` must say for every text, and
/// that any one changed byte of the packet is refused. The header of the input picks the key, did,
/// stamp and mode; the rest is the plaintext.
pub fn miio_sealed(data: &[u8]) {
    let mut u = Input::new(data);
    let secret = u.pick(&KEYS);
    let keys = Keys::new(&secret);
    let did = u.u32();
    let stamp = u.u32();
    let mode = u.u8();
    let tamper_at = u.u16();
    let tamper_xor = u.u8().max(1);
    let cut = u.u16();
    let mut plain = u.rest().to_vec();
    if mode != 255 {
        // 32 AES blocks (the longest vector's text fits) say what more would: longer texts only
        // cost the campaign speed.
        plain.truncate(512);
    } else {
        // The largest texts `seal` takes (MAX_SEAL_JSON): one byte below, at and above it. Rare,
        // since each costs 64 KiB of AES and MD5.
        let len = miio::MAX_SEAL_JSON - 1 + usize::from(tamper_xor % 3);
        plain.resize(len.max(plain.len()), b' ');
        let p = miio::seal_checked(&keys, did, stamp, &plain);
        assert_eq!(p.is_some(), plain.len() <= miio::MAX_SEAL_JSON);
        if let Some(p) = p {
            assert!(p.len() <= miio::MAX_PACKET);
            assert_eq!(miio::decode(&keys, did, &p), opened(&plain));
        }
        return;
    }
    let raw = mode % 2 == 1;
    let pkt = if raw {
        let p = miio::seal_raw(&keys, did, stamp, &plain);
        let ct_len = (plain.len() / 16 + 1) * 16;
        assert_eq!(p.is_some(), miio::HEADER_LEN + ct_len <= miio::MAX_PACKET);
        match p {
            Some(p) => p,
            None => return,
        }
    } else {
        let p = miio::seal_checked(&keys, did, stamp, &plain);
        assert_eq!(p.is_some(), plain.len() <= miio::MAX_SEAL_JSON);
        assert_eq!(
            miio::seal(&keys, did, stamp, &plain),
            p.clone().unwrap_or_default()
        );
        match p {
            Some(p) => p,
            None => return,
        }
    };
    assert!(pkt.len() <= miio::MAX_PACKET && (pkt.len() - miio::HEADER_LEN).is_multiple_of(16));
    let view = miio::Packet::new_checked(&pkt[..]).expect("a sealed packet passes steps 1-3");
    assert_eq!((view.did(), view.stamp(), view.unknown()), (did, stamp, 0));
    assert!(miio::control_md5_ok(&keys, &view));
    assert_eq!(miio::stream_frame_len(&pkt), Ok(Some(pkt.len())));

    assert_eq!(miio::decode(&keys, did, &pkt), opened(&plain));
    assert_eq!(
        miio::decode(&keys, did ^ 1, &pkt),
        Err(miio::Error::DidMismatch { got: did })
    );
    let other = if secret == TOKEN { CLOUD_KEY } else { TOKEN };
    assert_eq!(
        miio::decode(&Keys::new(&other), did, &pkt),
        Err(miio::Error::Md5Mismatch)
    );
    // One changed byte anywhere, or a cut, and the packet is refused.
    let mut bad = pkt.clone();
    let at = usize::from(tamper_at) % bad.len();
    bad[at] ^= tamper_xor;
    assert!(miio::decode(&keys, did, &bad).is_err(), "byte {at} changed");
    let cut = usize::from(cut) % pkt.len();
    assert!(miio::decode(&keys, did, &pkt[..cut]).is_err());
    // Two packets back to back on a stream split where they should.
    let mut stream = pkt.clone();
    stream.extend_from_slice(&miio::keepalive(&keys, did, stamp));
    assert_eq!(miio::stream_frame_len(&stream), Ok(Some(pkt.len())));
    assert_eq!(
        miio::stream_frame_len(&stream[pkt.len()..]),
        Ok(Some(miio::HEADER_LEN))
    );
}

/// What `open` must make of a plaintext (P§2.7 step 5 after the MD5): the text before the first
/// NUL, UTF-8, then a JSON object.
fn opened(plain: &[u8]) -> Result<miio::Opened, miio::Error> {
    let upto = plain.iter().position(|&b| b == 0).unwrap_or(plain.len());
    match std::str::from_utf8(&plain[..upto]) {
        Err(_) => Err(miio::Error::NotUtf8),
        Ok(t) => match rpc::parse_object(t.as_bytes()) {
            Ok(v) => Ok(miio::Opened {
                text: t.to_owned(),
                value: v,
            }),
            Err(rpc::RpcError::NotObject) => Err(miio::Error::NotObject),
            Err(rpc::RpcError::Parse) => Err(miio::Error::NotJson),
        },
    }
}

// ---- (2) wire::json_stream --------------------------------------------------------------------

/// Everything a splitter yields for `chunks`, up to and including the first error.
fn split_all(max: usize, chunks: &[&[u8]]) -> Vec<Result<Vec<u8>, SplitError>> {
    let mut s = Splitter::new(max);
    let mut out = Vec::new();
    for c in chunks {
        s.push(c);
        while let Some(r) = s.next_piece() {
            // The fast path's head is the scan of its text (which then needs no second scan).
            if let Ok(Piece::Scanned { text, head }) = &r {
                assert_eq!(rpc::scan(text.as_bytes()).as_ref(), Ok(head), "piece head");
            }
            let r = r.map(Piece::into_bytes);
            let err = r.is_err();
            out.push(r);
            if err {
                // Sticky: the same error again, and later input is ignored.
                assert_eq!(s.next(), out.last().cloned());
                s.push(b"{}");
                assert_eq!(s.next(), out.last().cloned());
                assert_eq!(s.buffered(), 0, "an error releases the buffer");
                return out;
            }
        }
        // L§3: at most `max` bytes of an unfinished value plus the last push are held.
        assert!(
            s.buffered() <= max + c.len(),
            "{} bytes held (max {max}, push {})",
            s.buffered(),
            c.len()
        );
    }
    out
}

/// The splitter under three chunkings of one stream (whole, fuzzed, byte by byte): the same values
/// and the same error; each value is a substring of the input in order, separated only by
/// whitespace and NUL; and on a stream serde reads as back-to-back values, the same values as serde.
pub fn json_stream(data: &[u8]) {
    let mut u = Input::new(data);
    let max = match u.u8() % 4 {
        0 => 16384,
        1 => 1 + usize::from(u.u8() % 64),
        2 => 256,
        _ => 1 + usize::from(u.u16()),
    };
    let mut seed = u64::from(u.u8());
    let stream = u.rest();

    let whole = split_all(max, &[stream]);
    let mut chunks = Vec::new();
    let mut rest = stream;
    while !rest.is_empty() {
        let n = 1 + (mix(&mut seed) % 17) as usize;
        let (a, b) = rest.split_at(n.min(rest.len()));
        chunks.push(a);
        rest = b;
    }
    assert_eq!(split_all(max, &chunks), whole, "fuzzed chunking");
    let bytes: Vec<&[u8]> = stream.chunks(1).collect();
    assert_eq!(split_all(max, &bytes), whole, "byte by byte");

    let is_sep = |b: u8| matches!(b, b' ' | b'\t' | b'\r' | b'\n' | 0);
    let mut pos = 0;
    let mut values = Vec::new();
    for r in &whole {
        match r {
            Ok(v) => {
                assert!(
                    !v.is_empty() && v.len() <= max,
                    "value of {} bytes",
                    v.len()
                );
                while stream.get(pos).is_some_and(|&b| is_sep(b)) {
                    pos += 1;
                }
                assert!(
                    stream[pos..].starts_with(v),
                    "value at {pos} is not the input"
                );
                match v[0] {
                    b'{' => assert_eq!(v.last(), Some(&b'}')),
                    b'[' => assert_eq!(v.last(), Some(&b']')),
                    b'"' => assert!(v.len() >= 2 && v.last() == Some(&b'"')),
                    b => assert!(!is_sep(b) && !b"}],:".contains(&b)),
                }
                pos += v.len();
                values.push(v.clone());
            }
            Err(SplitError::Syntax { offset }) => {
                let at = usize::try_from(*offset).unwrap_or(usize::MAX);
                assert!(at >= pos && at < stream.len(), "syntax error at {at}");
                assert!(
                    b"}],:".contains(&stream[at]),
                    "a syntax error is a stray closer"
                );
                assert!(!e_display(r).is_empty());
            }
            Err(SplitError::TooLarge { size }) => {
                assert!(*size > max);
                assert!(!e_display(r).is_empty());
            }
        }
    }
    let errored = whole.last().is_some_and(Result::is_err);

    // serde as the oracle: on input it reads entirely as JSON values (no NUL, depth < 128), every
    // value serde finds comes out whole, except a bare scalar at the very end, which the splitter
    // holds until its delimiter arrives.
    if max >= stream.len() && !stream.contains(&0) {
        let mut it =
            serde_json::Deserializer::from_slice(stream).into_iter::<serde::de::IgnoredAny>();
        let mut ends = Vec::new();
        let mut ok = true;
        while let Some(r) = it.next() {
            if r.is_err() {
                ok = false;
                break;
            }
            ends.push(it.byte_offset());
        }
        if ok {
            let mut start = 0;
            let mut want = Vec::new();
            for end in ends {
                let v = &stream[start..end];
                let trimmed = v.iter().position(|&b| !is_sep(b)).map_or(v, |i| &v[i..]);
                want.push(trimmed.to_vec());
                start = end;
            }
            assert!(!errored, "serde reads values where the splitter errs");
            let held_last = want.len() == values.len() + 1
                && want
                    .last()
                    .is_some_and(|v| !b"{[\"".contains(&v[0]) && stream.ends_with(v));
            assert!(
                values == want || (held_last && want[..values.len()] == values[..]),
                "serde and the splitter disagree"
            );
        }
    }
}

fn e_display(r: &Result<Vec<u8>, SplitError>) -> String {
    match r {
        Err(e) => e.to_string(),
        Ok(_) => String::new(),
    }
}

// ---- (3) wire::rpc ----------------------------------------------------------------------------

/// The ids the id rewrite is asked to put in.
const NEW_IDS: [u64; 6] = [0, 1, 77, u32::MAX as u64, u64::MAX, 1 << 53];

/// One message: `parse_object` against serde, the member scan behind `rewrite_id`/`raw_id`
/// (a rewrite exactly when the parser sees an `id`; everything else kept), `classify` and the
/// builders (their output always parses).
pub fn rpc(data: &[u8]) {
    let mut u = Input::new(data);
    let new_id = u.pick(&NEW_IDS);
    let raw = u.rest();
    let r = rpc::parse_object(raw);
    let Ok(text) = std::str::from_utf8(raw) else {
        assert_eq!(r, Err(rpc::RpcError::Parse), "invalid UTF-8 is not JSON");
        return;
    };
    // serde's verdicts: a Value, or at least valid syntax (its skipping reader).
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(m)) => assert_eq!(r.as_ref(), Ok(&m)),
        Ok(_) => assert_eq!(r, Err(rpc::RpcError::NotObject)),
        Err(_) => {
            if serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok() {
                assert_ne!(r, Err(rpc::RpcError::Parse), "valid JSON is never -32700");
            }
        }
    }
    let rewritten = rpc::rewrite_id(text, new_id);
    let raw_id = rpc::raw_id(text);
    assert_eq!(rewritten.is_some(), raw_id.is_some());
    // The scan the report path routes on: parse_object's verdict, the tree's members, and the
    // same rewrite through the id's place it found.
    let head = rpc::scan(raw);
    // The scan of a `str` (the local path, which checks UTF-8 once before it) is the same scan.
    if let Ok(s) = core::str::from_utf8(raw) {
        assert_eq!(rpc::scan_str(s), head, "scan_str and scan disagree");
    }
    match (&head, &r) {
        (Ok(h), Ok(o)) => {
            scanned_as_parsed(h, raw);
            assert_eq!(h.kind(), rpc::classify(o), "scan and classify disagree");
            assert_eq!(rpc::rewrite_id_scanned(text, h, new_id), rewritten);
            // The buffer and in-place forms the report path uses give the same text.
            let mut buf = String::from("left over");
            let into = rpc::rewrite_id_scanned_into(text, h, new_id, &mut buf);
            assert_eq!(into.then_some(buf), rewritten);
            let mut own = text.to_owned();
            let in_place = rpc::rewrite_id_in_place(&mut own, h, new_id);
            assert_eq!(in_place.then(|| own.clone()), rewritten);
            if !in_place {
                assert_eq!(own, text, "a refused rewrite leaves the text");
            }
        }
        (Err(a), Err(b)) => assert_eq!(a, b, "scan and parse_object refuse differently"),
        _ => panic!("scan {head:?} against parse_object {r:?}"),
    }
    let obj = match r {
        Ok(o) => o,
        Err(e) => {
            assert!(rewritten.is_none(), "rewrote a text that is not an object");
            assert!(matches!(e.code(), -32700 | -32600) && !e.to_string().is_empty());
            return;
        }
    };
    assert_eq!(
        rewritten.is_some(),
        obj.contains_key("id"),
        "rewrite iff an id"
    );
    if let Some(out) = &rewritten {
        let o2 = rpc::parse_object(out.as_bytes()).expect("a rewritten object parses");
        assert_eq!(o2.get("id"), Some(&Value::from(new_id)));
        assert_eq!(o2.len(), obj.len());
        for (k, v) in &obj {
            if k != "id" {
                assert_eq!(o2.get(k), Some(v), "member {k:?} changed");
            }
        }
        assert_eq!(rpc::raw_id(out), Some(new_id.to_string().as_str()));
        assert_eq!(rpc::rewrite_id(out, new_id).as_ref(), Some(out));
        let there = rpc::rewrite_id(out, 5).expect("still has an id");
        assert_eq!(rpc::rewrite_id(&there, new_id).as_ref(), Some(out));
        // The reply to a bad id echoes it as sent and parses (L§4.1).
        let raw_id = raw_id.unwrap_or("null");
        let inv = rpc::invalid_request(raw_id);
        assert!(obj_ok(&inv), "invalid_request does not parse");
        assert_eq!(rpc::raw_id(&inv), Some(raw_id));
    }
    match rpc::classify(&obj) {
        rpc::Kind::Request { method, id } => {
            assert_eq!(obj.get("method"), Some(&Value::from(method)));
            assert_eq!(id, obj.get("id"));
        }
        rpc::Kind::Reply { id } => {
            assert!(!obj.contains_key("method") && obj.get("id") == Some(id));
            assert!(obj.contains_key("result") || obj.contains_key("error"));
        }
        rpc::Kind::Other => {}
    }
    if let Some(id) = obj.get("id") {
        assert_eq!(
            rpc::id_u32(id),
            id.as_u64().and_then(|n| u32::try_from(n).ok())
        );
    }
    let msg = text.get(..text.len().min(40)).unwrap_or("");
    let params = obj.get("params").cloned().unwrap_or(Value::Null);
    let method = obj.get("method").and_then(Value::as_str).unwrap_or("m");
    for t in [
        rpc::error_reply(obj.get("id"), -32600, msg),
        rpc::result_reply(obj.get("id").unwrap_or(&Value::Null), &params),
        rpc::request(obj.get("id"), method, &params),
        rpc::local_status(msg),
    ] {
        assert!(obj_ok(&t), "a builder's output does not parse");
    }
}

fn obj_ok(text: &str) -> bool {
    rpc::parse_object(text.as_bytes()).is_ok()
}

// ---- (4) config -------------------------------------------------------------------------------

/// The data-file parsers: the first byte picks device.conf, wifi.conf, device.token, os-release or
/// device.country; the rest is the file. Parsed values obey their rules and survive a render (or a
/// did/key rewrite) and a parse; secrets never show in `Debug`.
pub fn config_files(data: &[u8]) {
    let mut u = Input::new(data);
    let which = u.u8();
    let pick = u.u8();
    let text = String::from_utf8_lossy(u.rest()).into_owned();
    match which % 5 {
        0 => device_conf(&text, pick),
        1 => wifi_conf(&text),
        2 => token_file(&text, data),
        3 => os_release(&text),
        _ => country_file(&text),
    }
}

fn device_conf(text: &str, pick: u8) {
    use config::device;
    let Ok(d) = device::parse(text) else {
        return;
    };
    assert_eq!(device::check_did(&d.did.to_string()), Ok(d.did));
    assert!(device::check_mac(&d.mac).is_ok_and(|m| m == d.mac));
    assert!(device::check_model(&d.model).is_ok() && device::check_vendor(&d.vendor).is_ok());
    let key = d.key.as_ascii().expect("a key is printable ASCII");
    assert!(device::check_key(key).is_ok_and(|k| k == d.key));
    let other = device::DeviceConf {
        key: Secret16::new([b'x'; 16]),
        ..d.clone()
    };
    assert_eq!(
        format!("{d:?}"),
        format!("{other:?}"),
        "the key shows in Debug"
    );
    // L§16 step 4: a rewrite keeps the rest and the parser sees the new did and key.
    let did = DIDS[usize::from(pick) % DIDS.len()];
    let new_key = CLOUD_KEYS[usize::from(pick) % CLOUD_KEYS.len()];
    let again = device::parse(&device::rewrite_didkey(text, did, new_key))
        .expect("a rewritten device.conf parses");
    assert_eq!((again.did, again.key.as_ascii()), (did, Some(new_key)));
    assert_eq!(
        (&again.mac, &again.model, &again.vendor),
        (&d.mac, &d.model, &d.vendor)
    );
    let same = device::rewrite_didkey(text, d.did, key);
    assert_eq!(device::parse(&same).as_ref(), Ok(&d));
}

fn wifi_conf(text: &str) {
    use config::wifi;
    let Ok(w) = wifi::parse(text) else {
        return;
    };
    assert!(!w.ssid.is_empty() && (w.key_mgmt == "WPA" || w.key_mgmt == "NONE"));
    let back = wifi::parse(&wifi::render(&w)).expect("a rendered wifi.conf parses");
    assert_eq!((&back.ssid, &back.psk, back.uid), (&w.ssid, &w.psk, w.uid));
    // `Debug` does not depend on the password (beyond whether there is one).
    let other = wifi::WifiConf {
        psk: "x".repeat(w.psk.len().min(1)),
        ..w.clone()
    };
    assert_eq!(
        format!("{w:?}"),
        format!("{other:?}"),
        "the password shows in Debug"
    );
}

fn token_file(text: &str, random: &[u8]) {
    use config::token;
    if let Ok(t) = token::parse(text) {
        assert_eq!(token::parse(&token::render(&t)).as_ref(), Ok(&t));
        let hex = token::to_hex(&t);
        assert!(hex.len() == 32 && hex.bytes().all(|b| b"0123456789abcdef".contains(&b)));
        assert_eq!(token::parse(&hex).as_ref(), Ok(&t));
        assert_eq!(format!("{t:?}"), "***");
    }
    if let Some(t) = token::generate(random) {
        let s = t.as_ascii().expect("a generated token is ASCII");
        assert!(token::is_valid_token_str(s));
        assert_eq!(token::render(&t), s);
        assert_eq!(token::parse(s).as_ref(), Ok(&t));
    }
}

fn os_release(text: &str) {
    let (vendor, body) = text.split_once('\n').unwrap_or(("", text));
    let v = config::osrelease::fw_version(body, vendor);
    if vendor.is_empty() {
        assert_eq!(v, None);
    }
    if let Some(v) = v {
        assert!(!v.is_empty() && body.contains(&v));
    }
}

fn country_file(text: &str) {
    if let Ok(Some(c)) = config::country::parse(text) {
        assert!((1..=7).contains(&c.len()) && c.bytes().all(|b| b.is_ascii_lowercase()));
        assert_ne!(c, "cn");
        assert!(config::country::valid_country(&c).is_ok());
    }
}

// ---- (5) wire::dns ----------------------------------------------------------------------------

/// The mDNS codec: a service description and a message from the input. A query that parses gets
/// a response (legacy or not) and the announcement; both are read back record by record.
pub fn dns(data: &[u8]) {
    let mut u = Input::new(data);
    let mlen = usize::from(u.u8() % 81);
    let info = dns::ServiceInfo {
        model: String::from_utf8_lossy(u.bytes(mlen)).into_owned(),
        did: u.u32(),
        ip: Ipv4Addr::from(u.u32()),
        port: u.u16(),
    };
    let legacy = u.bool();
    let msg = u.rest();

    assert!(info.label().len() <= 63);
    let announcement = dns::build_announcement(&info);
    read_response(&announcement, 0, &[], &info);
    let ptr = [
        0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 5, b'_', b'm', b'i', b'i', b'o', 4, b'_', b'u', b'd',
        b'p', 5, b'l', b'o', b'c', b'a', b'l', 0, 0, 12, 0, 1,
    ];
    let q = dns::parse_query(&ptr).expect("a PTR query parses");
    assert!(
        dns::answers_for(&q, &info),
        "the service PTR is always ours"
    );

    let q = match dns::parse_query(msg) {
        Ok(q) => q,
        Err(e) => {
            assert!(e.to_string().starts_with("mDNS"));
            return;
        }
    };
    assert!(q.questions.len() <= dns::MAX_QUESTIONS);
    let _ = (dns::answers_for(&q, &info), q.wants_unicast());
    let resp = dns::build_response(&info, Some(&q), legacy);
    if legacy {
        read_response(&resp, q.id, &q.questions, &info);
    } else {
        assert_eq!(resp, announcement, "a multicast answer is the announcement");
    }
}

/// Reads a response of ours: header, the echoed questions (checked by parsing them back as a
/// query), then exactly five uncompressed records with the right rdata lengths.
fn read_response(m: &[u8], id: u16, questions: &[dns::Question], info: &dns::ServiceInfo) {
    let be16 = |at: usize| u16::from_be_bytes([m[at], m[at + 1]]);
    assert_eq!(be16(0), id);
    assert_eq!(be16(2), 0x8400);
    assert_eq!(usize::from(be16(4)), questions.len());
    assert_eq!((be16(6), be16(8), be16(10)), (5, 0, 0));
    let name = |mut at: usize| -> usize {
        let start = at;
        loop {
            let n = usize::from(m[at]);
            assert!(n <= 63, "label of {n} bytes");
            at += 1 + n;
            if n == 0 {
                assert!(at - start <= 255, "name of {} bytes", at - start);
                return at;
            }
        }
    };
    let mut at = 12;
    for _ in questions {
        at = name(at) + 4;
    }
    if !questions.is_empty() {
        // The echoed questions, read back as a query, are the asked ones with class IN.
        let mut as_query = m[..at].to_vec();
        as_query[2] = 0;
        as_query[3] = 0;
        as_query[6] = 0;
        let back = dns::parse_query(&as_query).expect("echoed questions parse");
        assert_eq!(back.questions.len(), questions.len());
        for (a, b) in back.questions.iter().zip(questions) {
            assert_eq!((&a.name, a.qtype), (&b.name, b.qtype));
            assert_eq!((a.qclass, a.unicast), (dns::CLASS_IN, false));
        }
    }
    let mut types = Vec::new();
    for _ in 0..5 {
        at = name(at);
        types.push(be16(at));
        let len = usize::from(be16(at + 8));
        let rdata = at + 10;
        match be16(at) {
            dns::TYPE_PTR => assert_eq!(name(rdata), rdata + len),
            dns::TYPE_SRV => {
                assert_eq!(be16(rdata + 4), info.port);
                assert_eq!(name(rdata + 6), rdata + len);
            }
            dns::TYPE_A => assert_eq!(&m[rdata..rdata + len], &info.ip.octets()),
            _ => {}
        }
        at = rdata + len;
    }
    assert_eq!(
        types,
        [
            dns::TYPE_PTR,
            dns::TYPE_PTR,
            dns::TYPE_SRV,
            dns::TYPE_TXT,
            dns::TYPE_A
        ]
    );
    assert_eq!(at, m.len(), "no trailing bytes");
}

// ---- virtual time -----------------------------------------------------------------------------

/// A machine on a virtual clock, as the reactor drives it: `handle_timeout` only when the earliest
/// deadline is due, every action drained after each input.
trait Clocked {
    fn now(&self) -> Instant;
    fn set_now(&mut self, t: Instant);
    fn deadline(&self) -> Option<Instant>;
    /// `handle_timeout(now)`, drain and check the actions, then the deadline rule of [`after_fire`].
    fn fire(&mut self);
}

/// After `handle_timeout(now)`: no deadline left at or before `now` (the reactor would spin), or,
/// with timers of length 0 configured, none before `now`.
fn after_fire(now: Instant, next: Option<Instant>, zero_timers: bool) {
    if let Some(t) = next {
        if zero_timers {
            assert!(
                t >= now,
                "deadline {t:?} in the past after handle_timeout({now:?})"
            );
        } else {
            assert!(t > now, "deadline {t:?} not after handle_timeout({now:?})");
        }
    }
}

/// Where the virtual clock stops: 2^50 ms, 35,700 years of boot time. Deadlines of timers set to
/// `u64::MAX` ms lie beyond it, as they do for the daemon. (At `u64::MAX` itself `now + period` would
/// saturate to `now` and a periodic timer would be due for ever.)
const CLOCK_END: Instant = Instant(1 << 50);

/// An `advance` event: move the clock, either stepping through the deadlines on the way (at most
/// 64, as a daemon that stays awake) or in one jump (a suspend: what fell due fires once at the end).
fn advance<H: Clocked>(h: &mut H, u: &mut Input) {
    let stepwise = u.bool();
    let now = h.now();
    let to_next = h.deadline().map_or(0, |t| t.saturating_since(now).millis());
    let ms = match u.u8() % 8 {
        0 => u64::from(u.u8()),
        1 => u64::from(u.u16()),
        2 => u64::from(u.u8()) * 1000,
        3 => u64::from(u.u8()) * 60_000,
        4 => u64::from(u.u8()) * 3_600_000,
        5 => to_next,
        6 => to_next.saturating_add(u64::from(u.u8())),
        _ => u64::from(u.u8()) * 86_400_000,
    };
    let end = (now + Duration::from_millis(ms)).min(CLOCK_END).max(now);
    if stepwise {
        for _ in 0..64 {
            match h.deadline() {
                Some(t) if t <= end => {
                    h.set_now(h.now().max(t));
                    h.fire();
                }
                _ => break,
            }
        }
    }
    h.set_now(end);
    if h.deadline().is_some_and(|t| t <= end) {
        h.fire();
    }
}

/// At most this many events per input: inputs are short anyway, this bounds a pathological one.
const MAX_EVENTS: usize = 4096;

// ---- the cloud's side, shared by the cloud and node targets -----------------------------------

/// Server times of time-sync replies: the vectors' stamp, our own hello's 0, past 2097, the end.
const SERVER_STAMPS: [u32; 5] = [0x5a9b_239d, 0, 0xF000_0001, u32::MAX, 1];
const OTC_IPS: [&str; 5] = ["1.2.3.4", "10.0.0.9", "127.0.0.1", "0.0.0.0", "x"];

/// The cloud's answer to request `id` (`method`): acks, `_otc.info` replies with server lists and
/// refresh periods, refusals and odd shapes.
fn cloud_ack(u: &mut Input, id: u32, method: &str) -> String {
    let info = method == "_otc.info";
    match u.u8() % 8 {
        0 | 1 if info => {
            let mut list = Vec::new();
            for _ in 0..u.u8() % 4 {
                let port = u.pick(&[json!(8053), json!(0), json!(70000), json!("1")]);
                list.push(json!({"ip": u.pick(&OTC_IPS), "port": port}));
            }
            let interval = u.pick(&[json!(1800), json!(0), json!(1), json!(u64::MAX), json!("x")]);
            json!({"id": id, "result": {"otc_list": list, "otc_test": {"interval": interval}}})
                .to_string()
        }
        0 | 1 => format!(r#"{{"id":{id},"result":"ok"}}"#),
        2 => format!(r#"{{"id":{id},"error":{{"code":-1,"message":"refused"}}}}"#),
        3 => format!(r#"{{"id":{id},"result":["ok"]}}"#),
        4 => format!(r#"{{"id":{id}}}"#),
        5 => format!(r#"{{"id":{id},"result":{{}}}}"#),
        6 => format!(r#"{{"id":{id},"method":"props","result":1}}"#),
        _ => format!(
            r#"{{"id":{id},"result":"ok","pad":"{}"}}"#,
            "x".repeat(usize::from(u.u8()) * 8)
        ),
    }
}

const CLOUD_METHODS: [&str; 12] = [
    "get_prop",
    "set_power",
    "miIO.info",
    "miIO.wifi_assoc_state",
    "miIO.config_tz",
    "miIO.config_loglevel",
    "miIO.config_router",
    "miIO.config",
    "miIO.stop_diag_mode",
    "local.query_status",
    "_internal.hello",
    "miIO.ota",
];

fn cloud_params(u: &mut Input) -> String {
    match u.u8() % 9 {
        0 => "[]".into(),
        1 => r#"{"loglevel":2}"#.into(),
        2 => r#"{"loglevel":9}"#.into(),
        3 => r#"{"tz":"Asia/Shanghai"}"#.into(),
        4 => r#"{"tz":"../etc"}"#.into(),
        5 => r#"{"enauth":1}"#.into(),
        6 => r#"{"ssid":"net","passwd":"password1","uid":123}"#.into(),
        7 => "null".into(),
        _ => Value::String(u.text()).to_string(),
    }
}

/// A command from the cloud (P§5.8): id, method and params picked by the input.
fn cloud_command(u: &mut Input, last: Option<u32>, fresh: u32) -> String {
    let method = match u.u8() % 8 {
        7 => Value::String(u.text()).to_string(),
        _ => Value::from(u.pick(&CLOUD_METHODS)).to_string(),
    };
    let params = cloud_params(u);
    let id = match u.u8() % 8 {
        0 | 1 => Some(fresh.to_string()),
        2 => last.map(|l| l.to_string()),
        3 => Some("0".into()),
        4 => Some(u.u32().to_string()),
        5 => Some(
            u.pick(&["\"7\"", "-1", "1.5", "4294967296", "1e400"])
                .to_string(),
        ),
        6 => None,
        _ => Some(fresh.to_string()),
    };
    match id {
        Some(id) => format!(r#"{{"id":{id},"method":{method},"params":{params}}}"#),
        None => format!(r#"{{"method":{method},"params":{params}}}"#),
    }
}

/// Bytes as the cloud link delivers them: one datagram, or stream bytes cut in two or three.
fn chunk_plan(u: &mut Input, len: usize) -> Vec<usize> {
    match u.u8() % 4 {
        0 | 1 => vec![len],
        2 => {
            let a = u.below(len + 1);
            vec![a, len - a]
        }
        _ => {
            let a = u.below(len + 1);
            let b = u.below(len - a + 1);
            vec![a, b, len - a - b]
        }
    }
}

/// What the session's stamps must do (P§5.5): data never below, keepalives strictly above every
/// stamp sent before on this connection.
#[derive(Default)]
struct Stamps {
    max: Option<u32>,
}

impl Stamps {
    fn data(&mut self, s: u32) {
        assert!(self.max.is_none_or(|m| s >= m), "data stamp {s} went back");
        self.max = Some(s);
    }

    fn keepalive(&mut self, s: u32) {
        assert!(
            self.max.is_none_or(|m| s > m),
            "keepalive stamp {s} not increasing"
        );
        self.max = Some(s);
    }
}

// ---- (6) proto::cloud -------------------------------------------------------------------------

const LOCAL_IPS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(10, 0, 0, 2),
    Ipv4Addr::new(1, 9, 9, 9),
    Ipv4Addr::new(192, 168, 1, 5),
];
const DNS_IPS: [Ipv4Addr; 6] = [
    Ipv4Addr::new(1, 2, 3, 4),
    Ipv4Addr::new(10, 0, 0, 5),
    Ipv4Addr::new(127, 0, 0, 1),
    Ipv4Addr::new(0, 1, 2, 3),
    Ipv4Addr::new(224, 0, 0, 1),
    Ipv4Addr::new(5, 6, 7, 8),
];
const SELF_METHODS: [&str; 7] = [
    "miIO.info",
    "miIO.wifi_assoc_state",
    "miIO.config_router",
    "miIO.config_tz",
    "miIO.config_loglevel",
    "miIO.config",
    "miIO.stop_diag_mode",
];
/// P§5.7, P§5.8: the caps of the pending tables.
const MAX_UPSTREAM: usize = 128;
const MAX_DOWNSTREAM: usize = 64;

fn cloud_config(u: &mut Input) -> CloudConfig {
    let did = u.pick(&DIDS);
    let key = u.pick(&CLOUD_KEYS);
    let cc = u.pick(&["", "de", "cn"]);
    let mut c = CloudConfig::new(
        did,
        b16(key),
        "vendor.camera.v1",
        "aa:bb:cc:01:02:03",
        "4142434445464748494a4b4c4d4e4f50",
        cc,
    );
    c.transports = u.pick(&[
        vec![Transport::Udp, Transport::Tcp],
        vec![Transport::Tcp, Transport::Udp],
        vec![Transport::Udp],
        vec![Transport::Tcp],
    ]);
    for ep in [&mut c.udp, &mut c.tcp] {
        match u.u8() % 4 {
            0 => {}
            1 => (ep.host, ep.explicit) = ("1.2.3.4".into(), true),
            2 => (ep.host, ep.explicit) = ("127.0.0.1".into(), false),
            _ => (ep.host, ep.explicit) = ("10.0.0.9".into(), true),
        }
    }
    // Timers as the command line takes them (cli.rs): keepalive from 0.1 s, the others from 0,
    // all up to u64::MAX ms; backoff-min at most backoff-max.
    const FOREVER: Duration = Duration(u64::MAX);
    c.keepalive = Duration::from_millis(u.pick(&[100, 1000, 20_000, u64::MAX]));
    c.ack_timeout = Duration::from_millis(u.pick(&[0, 1, 3000, u64::MAX]));
    c.user_ack_timeout = Duration::from_millis(u.pick(&[0, 5000, u64::MAX]));
    (c.backoff_min, c.backoff_max) = u.pick(&[
        (Duration::from_secs(5), Duration::from_secs(300)),
        (Duration::ZERO, Duration::ZERO),
        (Duration::from_millis(1), Duration::from_secs(1)),
        (Duration::ZERO, FOREVER),
        (FOREVER, FOREVER),
    ]);
    c.refresh = u.pick(&[
        None,
        Some(Duration::from_millis(1)),
        Some(Duration::from_secs(60)),
        Some(FOREVER),
    ]);
    c.max_cloud_payload = u.pick(&[64, 1024, 16384]);
    c.seed = u.u64();
    c
}

/// The reactor, the node and the cloud around one cloud machine.
struct CloudH {
    c: Cloud,
    out: Outbox,
    cfg: CloudConfig,
    keys: Keys,
    now: Instant,
    // The reactor: the socket and the resolver.
    link: Option<Transport>,
    connecting: bool,
    attempt: Option<u32>,
    stamps: Stamps,
    // The cloud: what it was sent.
    hello_out: bool,
    requests: VecDeque<(u32, String)>,
    /// Every request id of the run with its text: a retransmission repeats both, nothing else
    /// may reuse an id (P§5.7).
    ids: BTreeMap<u32, String>,
    last_ka: Option<Vec<u8>>,
    ping: Option<Vec<u8>>,
    delivered: Option<String>,
    next_cmd: u32,
    last_cmd: Option<u32>,
    // The node: local clients waiting for a reply, commands it was handed.
    waiting: Vec<(u32, Value)>,
    pending_down: BTreeSet<u32>,
    handed: VecDeque<u32>,
}

impl Clocked for CloudH {
    fn now(&self) -> Instant {
        self.now
    }
    fn set_now(&mut self, t: Instant) {
        self.now = t;
    }
    fn deadline(&self) -> Option<Instant> {
        self.c.poll_timeout()
    }
    fn fire(&mut self) {
        self.c.handle_timeout(self.now, &mut self.out);
        self.drain();
        after_fire(self.now, self.c.poll_timeout(), false);
        // Calling it again with nothing due does nothing (ARCHITECTURE.md §3).
        self.c.handle_timeout(self.now, &mut self.out);
        assert_eq!(
            cloud_out(&mut self.out, &mut self.c),
            None,
            "a second handle_timeout acted"
        );
    }
}

impl CloudH {
    fn new(cfg: CloudConfig) -> CloudH {
        CloudH {
            c: Cloud::new(cfg.clone()),
            out: Outbox::default(),
            keys: Keys::new(&cfg.key),
            cfg,
            now: Instant(1_000_000),
            link: None,
            connecting: false,
            attempt: None,
            stamps: Stamps::default(),
            hello_out: false,
            requests: VecDeque::new(),
            ids: BTreeMap::new(),
            last_ka: None,
            ping: None,
            delivered: None,
            next_cmd: 1000,
            last_cmd: None,
            waiting: Vec::new(),
            pending_down: BTreeSet::new(),
            handed: VecDeque::new(),
        }
    }

    fn drain(&mut self) {
        while let Some(a) = cloud_out(&mut self.out, &mut self.c) {
            self.on_action(a);
        }
        if self.c.state() != CloudState::Stopped {
            assert!(
                self.c.poll_timeout().is_some(),
                "running without a deadline"
            );
        }
        if self.c.state() == CloudState::Connected {
            assert!(self.link.is_some() && !self.connecting);
        }
        assert!(
            self.waiting.len() <= MAX_UPSTREAM,
            "upstream table over its cap"
        );
        assert!(
            self.pending_down.len() <= MAX_DOWNSTREAM,
            "downstream table over its cap"
        );
    }

    fn on_action(&mut self, a: CloudOut) {
        match a {
            CloudOut::Resolve {
                transport,
                host,
                port,
                attempt,
            } => {
                assert_ne!(Some(attempt), self.attempt, "a Resolve tag reused");
                let ep = match transport {
                    Transport::Udp => &self.cfg.udp,
                    Transport::Tcp => &self.cfg.tcp,
                };
                assert!(host.parse::<Ipv4Addr>().is_err() || !ep.explicit);
                assert_eq!(port, ep.port);
                self.attempt = Some(attempt);
            }
            CloudOut::Connect { transport, .. } => {
                assert!(self.cfg.transports.contains(&transport));
                self.link = Some(transport);
                self.connecting = true;
                self.stamps = Stamps::default();
                self.hello_out = false;
                self.last_ka = None;
            }
            CloudOut::Send(b) => self.on_send(&b),
            CloudOut::Close => {
                assert!(self.link.is_some(), "Close without a socket");
                self.link = None;
                self.connecting = false;
                self.pending_down.clear();
            }
            CloudOut::NeedInfo => {}
            CloudOut::ToClient { client, text } => {
                let o = obj(&text).expect("a reply to a client parses");
                let id = o.get("id").cloned().unwrap_or(Value::Null);
                let i = self
                    .waiting
                    .iter()
                    .position(|(c, w)| *c as ConnId == client && *w == id)
                    .unwrap_or_else(|| panic!("a reply nobody waits for: {text}"));
                self.waiting.remove(i);
            }
            CloudOut::Command { text, id } => {
                assert_eq!(
                    Some(&text),
                    self.delivered.as_ref(),
                    "not forwarded verbatim"
                );
                if let Some(i) = id {
                    assert_ne!(i, 0);
                    assert_eq!(
                        obj(&text).and_then(|o| o.get("id").and_then(rpc::id_u32)),
                        Some(i)
                    );
                    assert!(self.pending_down.insert(i), "command {i} handed twice");
                    self.handed.push_back(i);
                }
            }
            CloudOut::SelfMethod { id, method, .. } => {
                assert!(
                    SELF_METHODS.contains(&method.as_str()),
                    "{method} is not ours"
                );
                if let Some(i) = id {
                    assert!(self.pending_down.insert(i), "command {i} handed twice");
                    self.handed.push_back(i);
                }
            }
            CloudOut::Event(_) | CloudOut::Didkey(_) => {}
        }
        while self.handed.len() > 64 {
            self.handed.pop_front();
        }
    }

    fn on_send(&mut self, b: &[u8]) {
        assert!(
            self.link.is_some() && !self.connecting,
            "Send without a set-up socket"
        );
        let p = miio::Packet::new_checked(b).expect("our packet passes steps 1-3");
        if p.is_control() {
            if b == miio::cloud_hello() {
                self.hello_out = true;
            } else if self.ping.as_deref() == Some(b) {
                self.ping = None;
            } else {
                assert_eq!(p.did(), self.cfg.did);
                assert!(miio::control_md5_ok(&self.keys, &p), "keepalive MD5");
                self.stamps.keepalive(p.stamp());
                self.last_ka = Some(b.to_vec());
            }
            return;
        }
        let o = miio::decode(&self.keys, self.cfg.did, b).expect("our data packet opens");
        self.stamps.data(p.stamp());
        assert!(
            o.text.len() <= self.cfg.max_cloud_payload.max(128),
            "{} bytes sent, over OT_MAX_PAYLOAD",
            o.text.len()
        );
        let id = o.value.get("id").and_then(rpc::id_u32);
        match (o.value.get("method").and_then(Value::as_str), id) {
            (Some(m), Some(id)) => {
                assert!(
                    (1..=0x7fff_ffff).contains(&id),
                    "cloud id {id} out of range"
                );
                if let Some(old) = self.ids.insert(id, o.text.clone()) {
                    assert_eq!(old, o.text, "cloud id {id} reused");
                }
                self.requests.push_back((id, m.to_owned()));
                if self.requests.len() > 32 {
                    self.requests.pop_front();
                }
            }
            (Some(_), None) => {}
            (None, Some(id)) => {
                self.pending_down.remove(&id);
            }
            (None, None) => panic!("a reply without an id went up: {}", o.text),
        }
    }

    /// Bytes from the cloud on the current socket; none when there is none (P§5: data read after
    /// Close is never delivered).
    fn deliver(&mut self, u: &mut Input, bytes: &[u8]) {
        match self.link {
            Some(Transport::Udp) => self.c.handle_datagram(self.now, bytes, &mut self.out),
            Some(Transport::Tcp) => {
                let mut at = 0;
                for n in chunk_plan(u, bytes.len()) {
                    self.c
                        .handle_stream(self.now, &bytes[at..at + n], &mut self.out);
                    at += n;
                }
            }
            None => return,
        }
        self.drain();
    }

    fn deliver_json(&mut self, u: &mut Input, text: &str) {
        let stamp = match u.u8() % 4 {
            0 => u.u32(),
            _ => self.c.stamp(self.now),
        };
        self.delivered = Some(text.split('\0').next().unwrap_or("").to_owned());
        let pkt = miio::seal(&self.keys, self.cfg.did, stamp, text.as_bytes());
        self.deliver(u, &pkt);
    }

    fn upstream(&mut self, u: &mut Input) {
        let client = u32::from(u.u8() % 4);
        let method = match u.u8() % 8 {
            0 => "local.query_status".to_owned(),
            1 => "_internal.info".to_owned(),
            2 => "miIO.info".to_owned(),
            3 => u.text(),
            4 => "event.motion".to_owned(),
            _ => "props".to_owned(),
        };
        let id = match u.u8() % 10 {
            0 => None,
            1 => Some(
                self.waiting
                    .last()
                    .map_or(Value::from(5), |w| w.1.clone())
                    .to_string(),
            ),
            2 => Some("0".to_owned()),
            3 => Some(u32::MAX.to_string()),
            4 => Some(
                u.pick(&["-1", "1.5", "\"s\"", "4294967296", "1e400", "null"])
                    .to_owned(),
            ),
            _ => Some(u.u32().to_string()),
        };
        let pad = match u.u8() % 4 {
            0 => "x".repeat(usize::from(u.u16()) % 20_000),
            _ => String::new(),
        };
        let method = Value::from(method).to_string();
        let params = format!(r#"{{"ota_state":"idle","pad":"{pad}"}}"#);
        let text = match id {
            Some(id) => format!(r#"{{"id":{id},"method":{method},"params":{params}}}"#),
            None => format!(r#"{{"method":{method},"params":{params}}}"#),
        };
        let Some(o) = obj(&text) else {
            return;
        };
        let m = o.get("method").and_then(Value::as_str).unwrap_or("");
        if !m.starts_with("local.") && !m.starts_with("_internal.") {
            if let Some(id) = o.get("id") {
                self.waiting.push((client, id.clone()));
            }
        }
        let h = rpc::scan(text.as_bytes()).expect("parse_object took it");
        self.c
            .upstream(self.now, client as ConnId, text.clone(), &h, &mut self.out);
        self.drain();
    }

    /// A client's reply to a command: `local_reply` says true exactly for a pending id.
    fn local_reply(&mut self, u: &mut Input) {
        let client = u32::from(u.u8() % 4);
        let id = match u.u8() % 4 {
            0 => u.u32(),
            _ => {
                let i = u.below(self.handed.len());
                self.handed.get(i).copied().unwrap_or(0)
            }
        };
        let text = match u.u8() % 6 {
            0 => format!(r#"{{"id":{id},"error":{{"code":-10000,"message":"x"}}}}"#),
            1 => format!(r#"{{"id":{id},"error":{{"code":-32601,"message":"x"}}}}"#),
            2 => format!(r#"{{"id":{id},"error":{{"code":-5,"message":"x"}}}}"#),
            3 => format!(
                r#"{{"id":{id},"result":"{}"}}"#,
                "y".repeat(usize::from(u.u16()) % 20_000)
            ),
            _ => format!(r#"{{"id":{id},"result":["ok"]}}"#),
        };
        let o = obj(&text).expect("a reply template parses");
        let pending = id != 0 && self.pending_down.contains(&id);
        if pending && text.len() > self.cfg.max_cloud_payload {
            self.waiting.push((client, Value::from(id)));
        }
        let h = rpc::scan(text.as_bytes()).expect("a reply template scans");
        assert_eq!(
            h.error_code,
            o.get("error").and_then(|e| e["code"].as_i64())
        );
        let taken = self
            .c
            .local_reply(self.now, client as ConnId, &text, &h, &mut self.out);
        assert_eq!(
            taken, pending,
            "local_reply({id}) against the pending table"
        );
        self.drain();
    }

    fn self_reply(&mut self, u: &mut Input) {
        let id = match u.u8() % 4 {
            0 => u.u32(),
            _ => {
                let i = u.below(self.handed.len());
                self.handed.get(i).copied().unwrap_or(0)
            }
        };
        let text = format!(r#"{{"id":{id},"result":["OK"]}}"#);
        let pending = id != 0 && self.pending_down.contains(&id);
        assert_eq!(
            self.c.self_reply(self.now, id, &text, &mut self.out),
            pending
        );
        self.drain();
    }

    fn info(&mut self, u: &mut Input) {
        let info = match u.u8() % 5 {
            0 => json!({"params": {"hw_ver": "Linux", "fw_ver": "1.2.3_0001"}}),
            1 => json!({"partner_id": "", "params": {"hw_ver": "Linux"}, "id": 5}),
            2 => json!({"params": "x"}),
            3 => json!({"params": {"pad": "z".repeat(usize::from(u.u16()) % 20_000)}}),
            _ => json!({}),
        };
        let Some(m) = crate::wire::rpc::Members::of_object(info.to_string().as_bytes()) else {
            return;
        };
        self.c.handle_info(self.now, &m, &mut self.out);
        self.drain();
    }

    fn event(&mut self, u: &mut Input) {
        match u.u8() % 22 {
            0 => advance(self, u),
            1 => {
                self.c.start(self.now, &mut self.out);
                self.drain();
            }
            2 => {
                self.c.stop(self.now, &mut self.out);
                self.drain();
                assert_eq!(self.c.poll_timeout(), None, "stopped with a deadline");
                assert!(self.waiting.is_empty(), "stop left a client unanswered");
            }
            3 => {
                let attempt = match u.u8() % 4 {
                    0 => u.u32(),
                    1 => self.attempt.unwrap_or(0).wrapping_sub(1),
                    _ => self.attempt.unwrap_or(0),
                };
                let r = match u.u8() % 4 {
                    0 => Err("no such host".to_owned()),
                    _ => Ok((0..u.u8() % 20)
                        .map(|_| match u.u8() % 8 {
                            7 => Ipv4Addr::from(u.u32()),
                            i => DNS_IPS[usize::from(i) % DNS_IPS.len()],
                        })
                        .collect()),
                };
                self.c.handle_resolved(self.now, attempt, r, &mut self.out);
                self.drain();
            }
            4 => {
                // The socket is set up (UDP at once, TCP when the connect completed).
                let local = u.pick(&LOCAL_IPS);
                self.connecting = false;
                self.c.handle_connected(self.now, local, &mut self.out);
                self.drain();
            }
            5 => {
                self.c
                    .handle_connect_failed(self.now, "refused", &mut self.out);
                self.drain();
            }
            6 => {
                self.c.handle_link_down(self.now, &mut self.out);
                self.drain();
            }
            7 => {
                let stamp = match u.u8() % 6 {
                    5 => u.u32(),
                    i => SERVER_STAMPS[usize::from(i)],
                };
                self.deliver(u, &miio::time_sync_reply(stamp));
            }
            8 => {
                let i = u.below(self.requests.len());
                let (id, method) = self
                    .requests
                    .get(i)
                    .cloned()
                    .unwrap_or((u.u32(), String::new()));
                let text = cloud_ack(u, id, &method);
                self.deliver_json(u, &text);
            }
            9 => {
                if let Some(ka) = self.last_ka.clone() {
                    self.deliver(u, &ka);
                }
            }
            10 => {
                let stamp = u.u32();
                let ping = miio::keepalive(&self.keys, self.cfg.did, stamp).to_vec();
                self.ping = Some(ping.clone());
                self.deliver(u, &ping);
            }
            11 => {
                self.next_cmd += 1;
                let text = cloud_command(u, self.last_cmd, self.next_cmd);
                self.last_cmd = obj(&text)
                    .and_then(|o| o.get("id").and_then(rpc::id_u32))
                    .or(self.last_cmd);
                self.deliver_json(u, &text);
            }
            12 => {
                let plain = String::from_utf8_lossy(u.blob()).into_owned();
                self.deliver_json(u, &plain);
            }
            13 => {
                let raw = u.blob().to_vec();
                self.deliver(u, &raw);
            }
            14 => self.upstream(u),
            15 => self.local_reply(u),
            16 => self.self_reply(u),
            17 => self.info(u),
            18 => {
                let uid = u.u32().to_string();
                let key = u.bool().then(|| "bindkey0123".to_owned());
                self.c.set_bind(uid, key);
            }
            19 => {
                // The node's way to a new identity: stop, then a new machine that carries on.
                let carry = self.c.carry();
                self.c.stop(self.now, &mut self.out);
                self.drain();
                self.c = Cloud::new(self.cfg.clone());
                self.c.resume(carry);
                self.attempt = None;
            }
            20 => {
                // The client's connection closed: nothing more may be addressed to it.
                let k = u32::from(u.u8() % 4);
                self.c.client_gone(k as ConnId);
                self.waiting.retain(|w| w.0 != k);
                self.drain();
            }
            _ => {
                let _ = (self.c.is_busy(), self.c.stamp(self.now), self.c.offset());
                let p = self
                    .c
                    .info_params(self.now, &crate::wire::rpc::Members::new());
                for k in ["model", "mac", "token", "life"] {
                    assert!(p.get(k).is_some(), "INFO without {k}");
                }
            }
        }
    }
}

/// The cloud link machine (P§5) against a scripted reactor, node and cloud.
pub fn cloud(data: &[u8]) {
    let mut u = Input::new(data);
    let cfg = cloud_config(&mut u);
    let mut h = CloudH::new(cfg);
    for _ in 0..MAX_EVENTS {
        if u.is_empty() {
            break;
        }
        h.event(&mut u);
    }
    h.c.stop(h.now, &mut h.out);
    h.drain();
    assert!(h.waiting.is_empty(), "a client request was never answered");
    assert_eq!(h.c.poll_timeout(), None);
}

// ---- (7) proto::lan ---------------------------------------------------------------------------

const STATES: [State; 10] = [
    State::DeviceInit,
    State::DidkeyReq1,
    State::DidkeyReq2,
    State::DidkeyDone,
    State::TokenDone,
    State::WifiApMode,
    State::WifiStaMode,
    State::CloudTrying,
    State::CloudConnected,
    State::CloudRetry,
];
/// P§4.5, P§5.8: replay guard lifetime and size, pending commands.
const GUARD_TTL: Duration = Duration::from_secs(600);
const GUARD_MAX: u64 = 256;
const LAN_MAX_PENDING: usize = 64;

fn phone(i: usize) -> SocketAddr {
    SocketAddr::from(([192, 168, 1, 20 + i as u8], 40000 + i as u16))
}

const LAN_METHODS: [&str; 10] = [
    "get_prop",
    "miIO.info",
    "miIO.config_router",
    "miIO.config_tz",
    "miIO.config_loglevel",
    "miIO.config",
    "miIO.wifi_assoc_state",
    "miIO.stop_diag_mode",
    "local.query_status",
    "_internal.hello",
];

/// A phone command (P§4.4) with the id, method and params the input picks, and its id if it has
/// a u32 one.
fn phone_command(u: &mut Input, fresh: u32) -> (String, Option<u32>) {
    let method = match u.u8() % 8 {
        7 => Value::String(u.text()).to_string(),
        _ => Value::from(u.pick(&LAN_METHODS)).to_string(),
    };
    let params = cloud_params(u);
    let id = match u.u8() % 6 {
        0 => Some(u.u32().to_string()),
        1 => Some(
            u.pick(&["0", "-1", "\"9\"", "1.5", "4294967296", "null"])
                .to_owned(),
        ),
        2 => None,
        _ => Some(fresh.to_string()),
    };
    let text = match &id {
        Some(id) => format!(r#"{{"id":{id},"method":{method},"params":{params}}}"#),
        None => format!(r#"{{"method":{method}}}"#),
    };
    let id = obj(&text).and_then(|o| o.get("id").and_then(rpc::id_u32));
    (text, id)
}

/// A datagram being delivered: its bytes, its JSON if it opens, the phone.
type Delivery = (Vec<u8>, Option<Map<String, Value>>, usize);

/// The node and the phones around one LAN machine.
/// What the LAN driver sees of the machine: a datagram it put in the outbox, or an event.
enum LanOut {
    Send { to: SocketAddr, bytes: Vec<u8> },
    Event(LanEvent),
}

struct LanH {
    l: Lan,
    out: Outbox,
    now: Instant,
    timeout: Duration,
    identity: Option<(u32, [u8; 16])>,
    state: State,
    /// Changes of identity: each forgets the guard.
    epoch: u64,
    /// Data datagrams delivered: an upper bound of what entered the guard since.
    seq: u64,
    sent: VecDeque<(Vec<u8>, usize)>,
    /// The datagram being delivered, its text (if it opens) and sender.
    current: Option<Delivery>,
    phone_ids: BTreeSet<u32>,
    /// Accepted commands: datagram, when, `seq` and `epoch` then (the replay guard, P§4.5).
    accepted: VecDeque<(Vec<u8>, Instant, u64, u64)>,
    forwarded: BTreeMap<u32, u32>,
    selfs: BTreeMap<u64, Instant>,
    next_id: u32,
}

impl Clocked for LanH {
    fn now(&self) -> Instant {
        self.now
    }
    fn set_now(&mut self, t: Instant) {
        self.now = t;
    }
    fn deadline(&self) -> Option<Instant> {
        self.l.poll_timeout()
    }
    fn fire(&mut self) {
        self.l.handle_timeout(self.now, &mut self.out);
        let now = self.now;
        self.selfs.retain(|_, d| *d > now);
        self.drain();
        after_fire(self.now, self.l.poll_timeout(), false);
        self.l.handle_timeout(self.now, &mut self.out);
        assert!(
            self.out.is_empty() && self.l.poll_event().is_none(),
            "a second handle_timeout acted"
        );
    }
}

impl LanH {
    fn drain(&mut self) {
        loop {
            let a = match self.out.pop() {
                Some(NodeAction::LanSend { to, bytes }) => LanOut::Send { to, bytes },
                Some(a) => panic!("the LAN machine queued {a:?}"),
                None => match self.l.poll_event() {
                    Some(e) => LanOut::Event(e),
                    None => break,
                },
            };
            self.on_action(a);
        }
        assert!(!self.l.is_busy());
        let l = &self.l;
        self.forwarded.retain(|&id, _| l.is_local_id_pending(id));
        assert!(
            self.forwarded.len() + self.selfs.len() <= LAN_MAX_PENDING,
            "pending LAN commands over the cap"
        );
        if self.forwarded.is_empty() && self.selfs.is_empty() {
            assert_eq!(
                self.l.poll_timeout(),
                None,
                "a deadline with nothing pending"
            );
        }
    }

    /// The command being delivered was executed: never twice inside the guard (P§4.5).
    fn executed(&mut self) -> Map<String, Value> {
        let (bytes, o, _) = self.current.clone().expect("an action without a datagram");
        for (b, at, seq, epoch) in &self.accepted {
            let inside = *epoch == self.epoch
                && self.now.saturating_since(*at) < GUARD_TTL
                && self.seq - seq < GUARD_MAX;
            assert!(
                !(inside && *b == bytes),
                "a replayed packet was executed again"
            );
        }
        self.accepted
            .push_back((bytes, self.now, self.seq, self.epoch));
        if self.accepted.len() > 300 {
            self.accepted.pop_front();
        }
        o.expect("an executed command opened")
    }

    fn on_action(&mut self, a: LanOut) {
        match a {
            LanOut::Send { to, bytes } => {
                assert!((0..3).any(|i| phone(i) == to), "sent to {to}, not a phone");
                assert!(bytes.len() <= 65507);
                let (did, token) = self.identity.expect("sent without an identity");
                let p = miio::Packet::new_checked(&bytes[..]).expect("our packet passes 1-3");
                if p.is_control() {
                    // P§4.2: hellos are answered from token_done on. (A reply to a command taken
                    // earlier may still go out after the state fell back.)
                    assert!(
                        self.state.token_known(),
                        "hello answered before the token is known"
                    );
                    assert_eq!((p.did(), p.stamp()), (did, self.l.stamp(self.now)));
                    let want = if self.state == State::WifiApMode {
                        token
                    } else {
                        [0xff; 16]
                    };
                    assert_eq!(
                        p.checksum(),
                        want,
                        "the hello reveals the token only in AP mode"
                    );
                } else {
                    let o = miio::decode(&Keys::new(&token), did, &bytes).expect("our reply opens");
                    let id = o
                        .value
                        .get("id")
                        .and_then(rpc::id_u32)
                        .expect("a reply has an id");
                    assert!(
                        self.phone_ids.contains(&id),
                        "reply id {id} was never asked"
                    );
                }
            }
            LanOut::Event(LanEvent::Command { local_id, text }) => {
                assert!(
                    (0x4000_0000..=0x7fff_ffff).contains(&local_id),
                    "local id {local_id}"
                );
                assert!(self.l.is_local_id_pending(local_id));
                assert!(
                    !self.forwarded.contains_key(&local_id),
                    "local id {local_id} reused"
                );
                let o = self.executed();
                let mut got = obj(&text).expect("a forwarded command parses");
                assert_eq!(got.get("id"), Some(&Value::from(local_id)));
                let phone_id = o
                    .get("id")
                    .and_then(rpc::id_u32)
                    .expect("a command has a u32 id");
                got.insert("id".into(), Value::from(phone_id));
                assert_eq!(got, o, "the command changed beyond its id");
                self.forwarded.insert(local_id, phone_id);
            }
            LanOut::Event(LanEvent::SelfMethod {
                handle, method, id, ..
            }) => {
                assert!(
                    SELF_METHODS.contains(&method.as_str()),
                    "{method} is not ours"
                );
                let o = self.executed();
                assert_eq!(o.get("id").and_then(rpc::id_u32), Some(id));
                assert!(self.selfs.insert(handle, self.now + self.timeout).is_none());
            }
        }
    }

    fn datagram(&mut self, who: usize, bytes: Vec<u8>) {
        let o = self.identity.and_then(|(did, t)| {
            miio::decode(&Keys::new(&t), did, &bytes)
                .ok()
                .map(|o| o.value)
        });
        if bytes.len() > miio::HEADER_LEN {
            self.seq += 1;
        }
        self.current = Some((bytes.clone(), o, who));
        self.sent.push_back((bytes.clone(), who));
        if self.sent.len() > 16 {
            self.sent.pop_front();
        }
        self.l
            .handle_datagram(self.now, phone(who), &bytes, &mut self.out);
        self.drain();
        self.current = None;
    }

    fn seal(&mut self, u: &mut Input, text: &str) -> Vec<u8> {
        let (did, token) = match (u.u8() % 8, self.identity) {
            (0, _) | (_, None) => (u.pick(&DIDS), b16(u.pick(&TOKENS))),
            (_, Some(i)) => i,
        };
        let stamp = match u.u8() % 4 {
            0 => u.u32(),
            _ => self.l.stamp(self.now),
        };
        miio::seal(&Keys::new(&token), did, stamp, text.as_bytes())
    }

    fn event(&mut self, u: &mut Input) {
        match u.u8() % 13 {
            0 => advance(self, u),
            1 => {
                let id = (u.pick(&DIDS), b16(u.pick(&TOKENS)));
                if self.identity != Some(id) {
                    self.epoch += 1;
                }
                self.identity = Some(id);
                self.l.set_identity(id.0, id.1);
            }
            2 => {
                self.state = u.pick(&STATES);
                self.l.set_state(self.state);
            }
            3 => {
                let off = u.pick(&[0, 0x5a9b_239d - 1000, -(1 << 40), i64::MAX, i64::MIN]);
                self.l.set_offset(off);
            }
            4 => {
                let who = u.below(3);
                self.datagram(who, miio::lan_hello().to_vec());
            }
            5 => {
                let who = u.below(3);
                let mut c = miio::lan_hello();
                c[u.below(16)] = u.u8();
                self.datagram(who, c.to_vec());
            }
            6 => {
                self.next_id += 1;
                let (text, id) = phone_command(u, self.next_id);
                self.phone_ids.extend(id);
                let pkt = self.seal(u, &text);
                let who = u.below(3);
                self.datagram(who, pkt);
            }
            7 => {
                let i = u.below(self.sent.len());
                if let Some((b, who)) = self.sent.get(i).cloned() {
                    let who = if u.bool() { who } else { u.below(3) };
                    self.datagram(who, b);
                }
            }
            8 => {
                let raw = u.blob().to_vec();
                let who = u.below(3);
                self.datagram(who, raw);
            }
            9 => {
                let text = String::from_utf8_lossy(u.blob()).into_owned();
                if let Some(id) = obj(&text).and_then(|o| o.get("id").and_then(rpc::id_u32)) {
                    self.phone_ids.insert(id);
                }
                let pkt = self.seal(u, &text);
                let who = u.below(3);
                self.datagram(who, pkt);
            }
            10 => {
                let ids: Vec<u32> = self.forwarded.keys().copied().collect();
                let id = match u.u8() % 4 {
                    0 => u.u32(),
                    _ => ids.get(u.below(ids.len())).copied().unwrap_or(0x4000_0000),
                };
                // A reply too long for a datagram only on 255: it costs 70 KB of AES.
                let text = match u.u8() {
                    255 => format!(r#"{{"id":{id},"result":"{}"}}"#, "y".repeat(70_000)),
                    v => match v % 6 {
                        0 => format!(r#"{{"id":{id},"error":{{"code":-10000,"message":"x"}}}}"#),
                        1 => format!(r#"{{"id":{id},"error":{{"code":-32601,"message":"x"}}}}"#),
                        2 => r#"{"result":["ok"]}"#.to_owned(),
                        3 => "{bad".to_owned(),
                        _ => format!(r#"{{"id":{id},"result":["ok"]}}"#),
                    },
                };
                let pending = self.l.is_local_id_pending(id);
                let want = pending && rpc::rewrite_id(&text, 0).is_some();
                assert_eq!(
                    self.l.local_reply(self.now, id, &text, &mut self.out),
                    want,
                    "local_reply({id})"
                );
                self.drain();
            }
            11 => {
                let hs: Vec<u64> = self.selfs.keys().copied().collect();
                let h = match u.u8() % 4 {
                    0 => u.u64(),
                    _ => hs.get(u.below(hs.len())).copied().unwrap_or(1),
                };
                let text = match u.u8() {
                    255 => format!(r#"{{"id":1,"result":"{}"}}"#, "y".repeat(70_000)),
                    v if v % 4 == 0 => r#"{"result":["OK"]}"#.to_owned(),
                    _ => r#"{"id":1,"code":0,"result":["OK"]}"#.to_owned(),
                };
                let want = self.selfs.contains_key(&h)
                    && rpc::rewrite_id(&text, 0).is_some()
                    && text.len() < 60_000;
                assert_eq!(
                    self.l.answer(self.now, h, &text, &mut self.out),
                    want,
                    "answer({h})"
                );
                if want {
                    self.selfs.remove(&h);
                }
                self.drain();
            }
            _ => {
                let _ = (self.l.stamp(self.now), self.l.is_local_id_pending(u.u32()));
            }
        }
    }
}

/// The LAN machine (P§4) against scripted phones and node.
pub fn lan(data: &[u8]) {
    let mut u = Input::new(data);
    let seed = u.u64();
    let timeout = Duration::from_millis(u.pick(&[0, 1, 5000, 60_000]));
    let mut h = LanH {
        l: Lan::new(seed, timeout),
        out: Outbox::default(),
        now: Instant(u64::from(u.u32())),
        timeout,
        identity: None,
        state: State::DeviceInit,
        epoch: 0,
        seq: 0,
        sent: VecDeque::new(),
        current: None,
        phone_ids: BTreeSet::new(),
        accepted: VecDeque::new(),
        forwarded: BTreeMap::new(),
        selfs: BTreeMap::new(),
        next_id: 0,
    };
    if u.bool() {
        let id = (u.pick(&DIDS), b16(u.pick(&TOKENS)));
        h.identity = Some(id);
        h.l.set_identity(id.0, id.1);
        h.state = u.pick(&STATES);
        h.l.set_state(h.state);
    }
    for _ in 0..MAX_EVENTS {
        if u.is_empty() {
            break;
        }
        h.event(&mut u);
    }
    // Every command is answered by its deadline: past it nothing is pending.
    h.now = h.now + h.timeout + Duration::from_millis(1);
    h.fire();
    assert!(
        h.forwarded.is_empty() && h.selfs.is_empty(),
        "a command outlived its deadline"
    );
    assert_eq!(h.l.poll_timeout(), None);
}

// ---- (8) proto::local -------------------------------------------------------------------------

/// L§2: extra connections beyond max-clients, for helpers only.
const EXTRA_HELPER_CONNS: usize = 2;
const SLOTS: usize = 6;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Class {
    Unclassified {
        deadline: Instant,
        held: Vec<String>,
    },
    Ordinary,
    Helper,
    Ble,
}

/// The model of one connection, and the reactor's splitter for it.
struct ConnModel {
    port: Port,
    class: Class,
    extra: bool,
    split: Splitter,
}

/// Local messages: helper and client traffic of L§4–§9 and the framing errors of L§3.
fn local_message(u: &mut Input, id: u32) -> Vec<u8> {
    let t = match u.u8() % 14 {
        0 => r#"{"method":"_internal.hello"}"#.to_owned(),
        1 => r#"{"method":"_internal.helper_ready"}"#.to_owned(),
        2 => format!(r#"{{"id":{id},"method":"local.query_status"}}"#),
        3 => format!(r#"{{"id":{id},"method":"props","params":{{"a":1}}}}"#),
        4 => format!(r#"{{"id":{id},"result":["ok"]}}"#),
        5 => r#"{"method":"event.x","params":[]}"#.to_owned(),
        6 => "[1,2]".to_owned(),
        7 => "{bad}".to_owned(),
        8 => format!(
            r#"{{"id":{},"method":"props"}}"#,
            u.pick(&["-1", "1.5", "\"s\"", "1e400", "99999999999999999999"])
        ),
        9 => r#"{"id":3}"#.to_owned(),
        10 => r#"{"method":"local.status","params":"wifi_ap_mode"}"#.to_owned(),
        11 => "\"just a string\" 12 ".to_owned(),
        12 => format!(r#"{{"id":{id},"error":{{"code":-1}}}}"#),
        _ => return u.blob().to_vec(),
    };
    t.into_bytes()
}

fn error_no_id(e: rpc::RpcError) -> String {
    rpc::error_reply(None, e.code(), e.message())
}

/// The reactor and the node around the table of local connections.
struct LocalH {
    l: Local,
    /// Where the table pushes its actions.
    o: Outbox,
    now: Instant,
    max_clients: usize,
    max_msg: usize,
    conns: BTreeMap<ConnId, ConnModel>,
    /// What the machine must emit for the current call, in order.
    want: Vec<LocalAction>,
    next: u32,
}

impl Clocked for LocalH {
    fn now(&self) -> Instant {
        self.now
    }
    fn set_now(&mut self, t: Instant) {
        self.now = t;
    }
    fn deadline(&self) -> Option<Instant> {
        self.l.poll_timeout()
    }
    fn fire(&mut self) {
        let now = self.now;
        let due: Vec<ConnId> = self
            .conns
            .iter()
            .filter(
                |(_, c)| matches!(c.class, Class::Unclassified { deadline, .. } if deadline <= now),
            )
            .map(|(&id, _)| id)
            .collect();
        for id in due {
            self.classify(id, false);
        }
        self.l.handle_timeout(&mut self.o, now);
        self.check();
        after_fire(now, self.l.poll_timeout(), false);
        self.l.handle_timeout(&mut self.o, now);
        assert!(self.o.is_empty(), "a second handle_timeout acted");
    }
}

impl LocalH {
    /// The machine's actions for this call are exactly `want`; the table matches the model.
    fn check(&mut self) {
        let got: Vec<LocalAction> = std::iter::from_fn(|| self.o.pop())
            .map(|a| match a {
                NodeAction::Local(a) => a,
                other => panic!("not a local action: {other:?}"),
            })
            .collect();
        assert_eq!(got, std::mem::take(&mut self.want), "local actions");
        for a in &got {
            if let LocalAction::Send(_, t) = a {
                assert!(obj_ok(t), "a local message that does not parse: {t}");
            }
        }
        assert_eq!(self.l.len(), self.conns.len());
        assert_eq!(self.l.is_empty(), self.conns.is_empty());
        let bles = self.conns.values().filter(|c| c.port == Port::Ble).count();
        assert!(bles <= 1 && self.conns.len() <= self.max_clients + EXTRA_HELPER_CONNS + 1);
        let audience = self
            .conns
            .values()
            .filter(|c| !c.extra && matches!(c.class, Class::Ordinary | Class::Unclassified { .. }))
            .count();
        assert_eq!(self.l.command_audience(), audience);
        for (&id, c) in &self.conns {
            assert_eq!(self.l.is_helper(id), c.class == Class::Helper);
        }
        let deadline = self
            .conns
            .values()
            .filter_map(|c| match c.class {
                Class::Unclassified { deadline, .. } => Some(deadline),
                _ => None,
            })
            .min();
        assert_eq!(self.l.poll_timeout(), deadline);
    }

    fn send(&mut self, id: ConnId, t: String) {
        self.want.push(LocalAction::Send(id, t.into()));
    }

    fn close(&mut self, id: ConnId) {
        self.conns.remove(&id);
        self.want.push(LocalAction::Close(id));
    }

    /// L§2: the first message (or 1 s of silence) decides; an extra connection that is no helper
    /// is closed, an ordinary one gets what was held for it.
    fn classify(&mut self, id: ConnId, helper: bool) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        let Class::Unclassified { held, .. } = &mut c.class else {
            return;
        };
        let held = std::mem::take(held);
        if helper {
            c.class = Class::Helper;
        } else if c.extra {
            self.close(id);
        } else {
            c.class = Class::Ordinary;
            for t in held {
                self.send(id, t);
            }
        }
    }

    fn broadcast(&mut self, t: &str, to_ble: bool) {
        let mut to = Vec::new();
        for (&id, c) in self.conns.iter_mut() {
            match &mut c.class {
                Class::Ordinary => to.push(id),
                Class::Ble if to_ble => to.push(id),
                Class::Unclassified { held, .. } if !c.extra => held.push(t.to_owned()),
                _ => {}
            }
        }
        for id in to {
            self.send(id, t.to_owned());
        }
    }

    /// One value as the splitter cut it: the model's routing of L§3–§4, then the machine's.
    fn value(&mut self, id: ConnId, raw: &[u8]) {
        let Some(port) = self.conns.get(&id).map(|c| c.port) else {
            return;
        };
        let got = self.l.handle_value(&mut self.o, self.now, id, raw);
        let want = match rpc::parse_object(raw) {
            // L§3 answers, except to an extra connection that this first message closed (L§2).
            Err(e @ rpc::RpcError::Parse) => {
                self.classify(id, false);
                if self.conns.contains_key(&id) {
                    self.send(id, error_no_id(e));
                    self.close(id);
                }
                None
            }
            Err(e @ rpc::RpcError::NotObject) => {
                self.classify(id, false);
                if self.conns.contains_key(&id) {
                    self.send(id, error_no_id(e));
                }
                None
            }
            Ok(o) => {
                let text = String::from_utf8_lossy(raw).into_owned();
                let (method, msg_id) = match rpc::classify(&o) {
                    rpc::Kind::Request { method, id } => (Some(method.to_owned()), id.cloned()),
                    rpc::Kind::Reply { id } => (None, Some(id.clone())),
                    rpc::Kind::Other => (None, None),
                };
                let internal = method
                    .as_deref()
                    .is_some_and(|m| m.starts_with("_internal."));
                if port == Port::Local {
                    self.classify(id, internal);
                }
                if !self.conns.contains_key(&id) {
                    None
                } else {
                    match method {
                        Some(m) if m.starts_with("local.") => Some("local"),
                        Some(_) if port == Port::Ble => {
                            let e = rpc::error_reply(msg_id.as_ref(), -32601, "Method not found");
                            self.send(id, e);
                            None
                        }
                        Some(_) if internal => Some("internal"),
                        Some(_) => {
                            if msg_id.as_ref().is_some_and(|v| rpc::id_u32(v).is_none()) {
                                let echo = rpc::raw_id(&text).unwrap_or("null");
                                self.send(id, rpc::invalid_request(echo));
                                None
                            } else {
                                Some("upstream")
                            }
                        }
                        None => match msg_id.as_ref().and_then(rpc::id_u32) {
                            Some(_) if port == Port::Local => Some("reply"),
                            _ => None,
                        },
                    }
                }
            }
        };
        let kind = got.as_ref().map(|g| match g {
            Inbound::Local { conn, method, .. } => {
                assert!(*conn == id && method.starts_with("local."));
                "local"
            }
            Inbound::Internal { conn, method, .. } => {
                assert!(*conn == id && method.starts_with("_internal."));
                "internal"
            }
            Inbound::Upstream { conn, head, text } => {
                assert!(*conn == id && text.as_bytes() == raw);
                assert!(head.id.as_ref().is_none_or(|v| rpc::id_u32(v).is_some()));
                scanned_as_parsed(head, raw);
                "upstream"
            }
            Inbound::Reply {
                conn, id: n, head, ..
            } => {
                assert!(*conn == id && head.id.as_ref().and_then(rpc::id_u32) == Some(*n));
                scanned_as_parsed(head, raw);
                "reply"
            }
        });
        assert_eq!(kind, want, "routing of a local message");
    }

    /// Bytes from a client, through its splitter as the reactor reads them (L§3).
    fn bytes(&mut self, id: ConnId, data: &[u8]) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        c.split.push(data);
        loop {
            let Some(c) = self.conns.get_mut(&id) else {
                return;
            };
            match c.split.next() {
                None => return,
                Some(Ok(v)) => {
                    self.value(id, &v);
                    self.check();
                }
                Some(Err(SplitError::TooLarge { .. })) => {
                    // The reactor closes it without a word.
                    self.conns.remove(&id);
                    self.l.closed(id);
                    self.check();
                    return;
                }
                Some(Err(SplitError::Syntax { .. })) => {
                    if self.conns.remove(&id).is_some() {
                        self.send(id, error_no_id(rpc::RpcError::Parse));
                        self.want.push(LocalAction::Close(id));
                    }
                    self.l.syntax_error(&mut self.o, self.now, id);
                    self.check();
                    return;
                }
            }
        }
    }

    fn event(&mut self, u: &mut Input) {
        let id = u.below(SLOTS);
        match u.u8() % 10 {
            0 => advance(self, u),
            1 => {
                // The reactor never accepts into an open slot.
                if self.conns.contains_key(&id) {
                    return;
                }
                let port = if u.u8().is_multiple_of(4) {
                    Port::Ble
                } else {
                    Port::Local
                };
                let locals = self.conns.values().filter(|c| c.port == Port::Local);
                let extras = locals.clone().filter(|c| c.extra).count();
                let seats = locals.filter(|c| !c.extra).count();
                let extra = port == Port::Local && seats >= self.max_clients;
                let ok = match port {
                    Port::Ble => !self.conns.values().any(|c| c.port == Port::Ble),
                    Port::Local => !(extra && extras >= EXTRA_HELPER_CONNS),
                    Port::Mqtt => unreachable!("the node attaches its MQTT connections"),
                };
                assert_eq!(self.l.accept(self.now, id, port), ok, "admission (L§2)");
                if ok {
                    let class = match port {
                        Port::Ble => Class::Ble,
                        Port::Local => Class::Unclassified {
                            deadline: self.now + CLASSIFY_WINDOW,
                            held: Vec::new(),
                        },
                        Port::Mqtt => Class::Ordinary,
                    };
                    let split = Splitter::new(self.max_msg);
                    self.conns.insert(
                        id,
                        ConnModel {
                            port,
                            class,
                            extra,
                            split,
                        },
                    );
                }
                self.check();
            }
            2 => {
                self.conns.remove(&id);
                self.l.closed(id);
                self.check();
            }
            3 | 4 => {
                self.next += 1;
                let m = local_message(u, self.next);
                self.bytes(id, &m);
            }
            5 => {
                let data = u.blob().to_vec();
                self.bytes(id, &data);
            }
            6 => {
                self.next += 1;
                let t = match u.u8() % 3 {
                    0 => rpc::local_status(u.pick(&["cloud_connected", "wifi_ap_mode", "a\"b"])),
                    _ => format!(r#"{{"id":{},"method":"get_prop","params":[]}}"#, self.next),
                };
                let status = t.contains("local.status");
                self.broadcast(&t, status);
                if status {
                    self.l.broadcast_status(&mut self.o, &t);
                } else {
                    self.l.broadcast_command(&mut self.o, &t);
                }
                self.check();
            }
            7 => {
                let t = format!(r#"{{"id":{},"result":["ok"]}}"#, u.u8());
                if self.conns.contains_key(&id) {
                    self.send(id, t.clone());
                }
                self.l.send_to(&mut self.o, id, t);
                self.check();
            }
            8 => {
                if self.conns.contains_key(&id) {
                    self.close(id);
                }
                self.l.close(&mut self.o, id);
                self.check();
            }
            _ => {
                if self.conns.remove(&id).is_some() {
                    self.send(id, error_no_id(rpc::RpcError::Parse));
                    self.want.push(LocalAction::Close(id));
                }
                self.l.syntax_error(&mut self.o, self.now, id);
                self.check();
            }
        }
    }
}

/// The table of local connections (L§2–§4) against an exact model of its answers.
pub fn local(data: &[u8]) {
    let mut u = Input::new(data);
    let max_clients = u.pick(&[1, 2, 20]);
    let max_msg = u.pick(&[16384, 256, 16]);
    let mut h = LocalH {
        l: Local::new(max_clients),
        o: Outbox::default(),
        now: Instant(u64::from(u.u32())),
        max_clients,
        max_msg,
        conns: BTreeMap::new(),
        want: Vec::new(),
        next: 0,
    };
    for _ in 0..MAX_EVENTS {
        if u.is_empty() {
            break;
        }
        h.event(&mut u);
    }
}

// ---- (9) proto::node --------------------------------------------------------------------------

/// device.conf texts of the fake data dir: valid identities, a dynamic did, a broken file.
const DEVICE_FILES: [&str; 6] = [
    "did=1234567\nkey=YWJjZGVmZ2hpamts\nmac=aa:bb:cc:01:02:03\nvendor=acme\nmodel=acme.dev.v1\n",
    "did=123456789\nkey=0123456789abcdef\nmac=AA:BB:CC:01:02:04\nvendor=xiaomi\nmodel=xiaomi.dev.v1\n",
    "did=0\nkey=YWJjZGVmZ2hpamts\nmac=aa:bb:cc:01:02:03\nmodel=m\n",
    "did=4294967295\nkey=Key with space!~\nmac=aa:bb:cc:01:02:05\nvendor=v\nmodel=acme.dev.v2\n",
    "garbage\n",
    "",
];
const OS_RELEASES: [&str; 3] = [
    "",
    "NAME=x\nACME_VERSION=1.2.3_0001\n",
    "XIAOMI_VERSION=\"2.0.0_0002\"\n",
];
/// Ids of the clients' upstream requests: every one must get exactly one reply.
const UP_BASE: u32 = 0x3000_0000;
const UP_SPAN: u32 = 1 << 24;

fn is_up_id(id: u32) -> bool {
    (UP_BASE..UP_BASE + UP_SPAN).contains(&id)
}

/// The token file of the fake data dir.
#[derive(Clone, Copy, PartialEq, Eq)]
enum TokenFile {
    Missing,
    Bad,
    Good(usize),
}

/// The data dir as the reactor reads and writes it (L§9.5, L§8, L§17).
struct Files {
    device: usize,
    country: Option<String>,
    token: TokenFile,
    wifi: Option<(String, Option<u64>)>,
    writable: bool,
    backup: Option<Option<(String, Option<u64>)>>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Role {
    Unclassified(Instant),
    Ordinary,
    Helper,
    Ble,
}

struct Client {
    port: Port,
    role: Role,
    extra: bool,
    split: Splitter,
    /// Ids of commands broadcast to it, for its replies.
    commands: VecDeque<u32>,
    /// It sent `_internal.hello` (L§9.2).
    hello: bool,
}

/// The cloud secrets the node may seal with: every device.conf and helper identity.
fn cloud_secrets() -> Vec<[u8; 16]> {
    CLOUD_KEYS.iter().map(|k| b16(k)).collect()
}

/// The LAN tokens the node may seal with: every token file, helper answer and the fresh one.
fn lan_secrets() -> Vec<[u8; 16]> {
    let mut v: Vec<[u8; 16]> = TOKENS.iter().map(|t| b16(t)).collect();
    v.push(*FRESH_TOKEN);
    v.push(HEX_TOKEN);
    v
}

const HEX_TOKEN: [u8; 16] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15];

/// A data packet the node sent opens under one of the secrets it may hold.
fn opens_with(secrets: &[[u8; 16]], b: &[u8]) -> Option<miio::Opened> {
    let did = miio::Packet::new_checked(b).ok()?.did();
    secrets
        .iter()
        .find_map(|s| miio::decode(&Keys::new(s), did, b).ok())
}

struct NodeH {
    n: Node,
    now: Instant,
    zero: bool,
    max_clients: usize,
    max_sleep: Duration,
    files: Files,
    os: usize,
    clients: BTreeMap<ConnId, Client>,
    // The cloud's side.
    link: Option<Transport>,
    connecting: bool,
    attempt: Option<u32>,
    hello_out: bool,
    requests: VecDeque<(u32, String)>,
    last_ka: Option<Vec<u8>>,
    ping: Option<Vec<u8>>,
    next_cmd: u32,
    last_cmd: Option<u32>,
    stamps: Stamps,
    // Phones.
    lan_sent: VecDeque<(Vec<u8>, usize)>,
    next_phone: u32,
    // Clients waiting for the reply to an upstream request.
    waiting: Vec<(ConnId, u32)>,
    next_up: u32,
    /// The mDNS responder's service as the node set it (P§4.8).
    mdns: Option<dns::ServiceInfo>,
    /// Announcements still expected: a service the LAN can reach is announced now and a second
    /// later, and a new one restarts the pair.
    mdns_announce: u8,
}

impl Clocked for NodeH {
    fn now(&self) -> Instant {
        self.now
    }
    fn set_now(&mut self, t: Instant) {
        self.now = t;
    }
    fn deadline(&self) -> Option<Instant> {
        self.n.poll_timeout()
    }
    fn fire(&mut self) {
        let now = self.now;
        for c in self.clients.values_mut() {
            if matches!(c.role, Role::Unclassified(d) if d <= now) {
                c.role = Role::Ordinary;
            }
        }
        self.n.handle_timeout(now);
        after_fire(now, self.n.poll_timeout(), self.zero);
        self.drain();
    }
}

impl NodeH {
    fn drain(&mut self) {
        while let Some(a) = self.n.poll_action() {
            self.on_action(a);
        }
        let w = self.n.wakeup_time(self.now);
        assert!(
            w <= self.max_sleep.secs_ceil().max(1),
            "wakeup_time {w} over max-sleep"
        );
        let _ = (self.n.state(), self.n.cloud_state(), self.n.stamp(self.now));
        // P§4.8: a service only in the STA states, for the identity in use.
        if let Some(s) = &self.mdns {
            let state = self.n.state();
            assert!(
                matches!(
                    state,
                    State::WifiStaMode
                        | State::CloudTrying
                        | State::CloudConnected
                        | State::CloudRetry
                ),
                "mDNS service in {state:?}"
            );
            // (A router change in STA mode drops the identity until Wi-Fi is back; the service
            // stays: the device is the same.)
            if let Some(id) = self.n.identity() {
                assert!(id.provisioned && id.did == s.did && id.model == s.model);
            }
        }
    }

    fn on_action(&mut self, a: NodeAction) {
        let now = self.now;
        match a {
            // The driver gives no --mqtt.
            #[cfg(feature = "mqtt")]
            NodeAction::BrokerConnect | NodeAction::BrokerSend(_) | NodeAction::BrokerClose => {
                panic!("a broker action without --mqtt: {a:?}")
            }
            NodeAction::Local(LocalAction::Send(c, t)) => self.client_gets(c, &t),
            NodeAction::Local(LocalAction::Close(c)) => {
                assert!(
                    self.clients.contains_key(&c),
                    "Close of a closed connection {c}"
                );
                self.gone(c);
                self.n.local_closed(c);
            }
            NodeAction::Resolve { attempt, .. } => self.attempt = Some(attempt),
            NodeAction::Connect { transport, .. } => {
                self.link = Some(transport);
                self.connecting = true;
                self.stamps = Stamps::default();
                self.hello_out = false;
                self.last_ka = None;
            }
            NodeAction::CloudSend(b) => self.cloud_sent(&b),
            NodeAction::CloudClose => {
                assert!(self.link.is_some(), "CloudClose without a socket");
                self.link = None;
                self.connecting = false;
            }
            NodeAction::LanSend { to, bytes } => {
                assert!((0..3).any(|i| phone(i) == to), "LAN send to {to}");
                let p = miio::Packet::new_checked(&bytes[..]).expect("our LAN packet passes 1-3");
                if !p.is_control() {
                    let o = opens_with(&lan_secrets(), &bytes).expect("our LAN reply opens");
                    assert!(o.value.get("id").and_then(rpc::id_u32).is_some());
                }
            }
            NodeAction::SetLogLevel(l) => assert!(l <= 4),
            // The reactor answers the flag write like a wifi.conf write: ok when the dir takes it.
            NodeAction::TrustFlag(_) => {
                let ok = self.files.writable;
                self.n.trust_written(now, ok);
            }
            NodeAction::ShutdownWrite(c) => {
                assert!(
                    self.clients.contains_key(&c),
                    "ShutdownWrite of a closed connection"
                );
            }
            NodeAction::LoadFiles(step) => self.load(step),
            NodeAction::WriteWifi(text) => {
                let w = config::wifi::parse(&text).expect("the node writes a wifi.conf it reads");
                let ok = self.files.writable;
                let mut replaced = None;
                if ok {
                    replaced = self.files.wifi.as_ref().map(|(ssid, uid)| {
                        WifiText(config::wifi::render(&config::wifi::WifiConf::new(
                            ssid, "pw", *uid,
                        )))
                    });
                    self.files.backup = Some(self.files.wifi.take());
                    self.files.wifi = Some((w.ssid, w.uid));
                }
                self.n.wifi_written(now, ok, replaced);
            }
            // The node chose what goes back: the file the last good write replaced, or none.
            NodeAction::RestoreWifi(text) => {
                let back = text.map(|t| {
                    let w = config::wifi::parse(&t).expect("the node restores a wifi.conf it read");
                    (w.ssid, w.uid)
                });
                assert_eq!(
                    back,
                    self.files.backup.take().flatten(),
                    "restored wifi.conf"
                );
                self.files.wifi = back;
            }
            // Stored or removed when the dir takes it; the node uses the fresh token either way.
            NodeAction::TokenFile(t) => {
                let ok = self.files.writable;
                if ok {
                    self.files.token = match t {
                        Some(t) => {
                            assert_eq!(
                                t,
                                Secret16::new(*FRESH_TOKEN),
                                "only a fresh token is stored"
                            );
                            TokenFile::Good(2)
                        }
                        None => TokenFile::Missing,
                    };
                }
                let r = if ok { Ok(()) } else { Err(OsError::Errno(30)) };
                self.n.token_written(now, r);
            }
            // The did/key lines rewritten when the dir takes it (L§16 step 4).
            NodeAction::StoreDidkey { did, .. } => {
                assert!(did >= 2, "a bootstrap did stored: {did}");
                let r = if self.files.writable {
                    Ok(())
                } else {
                    Err(config::ConfError::new("device.conf", 0, "read-only"))
                };
                self.n.didkey_written(now, r);
            }
            NodeAction::WriteCountry(cc) => {
                assert!(
                    config::country::valid_country(&cc).is_ok(),
                    "country {cc:?}"
                );
                self.files.country = config::country::parse(&cc).ok().flatten();
            }
            // Only changes, for a real address of the cloud socket on the LAN port.
            NodeAction::MdnsService(info) => {
                assert_ne!(info, self.mdns, "an unchanged mDNS service");
                if let Some(i) = &info {
                    assert!(!i.ip.is_unspecified() && i.port == 54321, "{i:?}");
                    assert!(LOCAL_IPS.contains(&i.ip) || i.ip == Ipv4Addr::new(10, 0, 0, 2));
                    if !i.ip.is_loopback() {
                        self.mdns_announce = 2;
                    }
                }
                self.mdns = info;
            }
            // Only the two a new service the LAN can reach asked for (the second may find the
            // service gone: the responder then sends nothing).
            NodeAction::MdnsAnnounce => {
                assert!(self.mdns_announce > 0, "mDNS announcement nobody asked for");
                self.mdns_announce -= 1;
            }
            NodeAction::ReadSsid => {
                let ssid = self
                    .files
                    .wifi
                    .as_ref()
                    .map(|w| w.0.clone())
                    .unwrap_or_default();
                self.n.file_ssid(ssid);
            }
        }
    }

    fn gone(&mut self, c: ConnId) {
        self.clients.remove(&c);
        self.waiting.retain(|w| w.0 != c);
    }

    /// A message to a local client: a reply, a broadcast or a helper message, each only where
    /// it may go (L§4, L§6, L§9.2).
    fn client_gets(&mut self, c: ConnId, t: &str) {
        let cl = self
            .clients
            .get_mut(&c)
            .unwrap_or_else(|| panic!("a message for closed connection {c}: {t}"));
        let o = obj(t).unwrap_or_else(|| panic!("a local message that does not parse: {t}"));
        let method = o.get("method").and_then(Value::as_str);
        let id = o.get("id");
        match method {
            Some(m) if m.starts_with("_internal.") => {
                // L§9.2: any connection that said hello may be the channel.
                assert!(
                    cl.role == Role::Helper || cl.hello,
                    "{m} to a client that is no helper"
                );
            }
            Some("local.status") if id.is_none() => {
                assert!(
                    cl.role != Role::Helper && !cl.extra,
                    "a broadcast to a helper"
                );
            }
            Some(m) if !m.starts_with("local.") => {
                // A cloud or LAN command (D6): ordinary 54322 clients only.
                assert!(
                    cl.role == Role::Ordinary && !cl.extra && cl.port == Port::Local,
                    "command {m} to a {:?} client",
                    cl.role
                );
                if let Some(i) = id.and_then(rpc::id_u32) {
                    cl.commands.push_back(i);
                    if cl.commands.len() > 16 {
                        cl.commands.pop_front();
                    }
                }
            }
            Some(_) => {}
            None => {
                if let Some(i) = id.and_then(rpc::id_u32).filter(|&i| is_up_id(i)) {
                    let at = self
                        .waiting
                        .iter()
                        .position(|w| *w == (c, i))
                        .unwrap_or_else(|| panic!("reply {i} to client {c}, which never asked"));
                    self.waiting.remove(at);
                }
            }
        }
    }

    fn cloud_sent(&mut self, b: &[u8]) {
        assert!(
            self.link.is_some() && !self.connecting,
            "CloudSend without a set-up socket"
        );
        let p = miio::Packet::new_checked(b).expect("our cloud packet passes 1-3");
        if p.is_control() {
            if b == miio::cloud_hello() {
                self.hello_out = true;
            } else if self.ping.as_deref() == Some(b) {
                self.ping = None;
            } else {
                assert!(
                    cloud_secrets()
                        .iter()
                        .any(|s| miio::control_md5_ok(&Keys::new(s), &p)),
                    "keepalive MD5"
                );
                self.stamps.keepalive(p.stamp());
                self.last_ka = Some(b.to_vec());
            }
            return;
        }
        let o = opens_with(&cloud_secrets(), b).expect("our cloud packet opens");
        self.stamps.data(p.stamp());
        if let (Some(m), Some(id)) = (
            o.value.get("method").and_then(Value::as_str),
            o.value.get("id").and_then(rpc::id_u32),
        ) {
            self.requests.push_back((id, m.to_owned()));
            if self.requests.len() > 32 {
                self.requests.pop_front();
            }
        }
    }

    /// The reactor's file side (client.rs `load_files`).
    fn load(&mut self, step: helper::Step) {
        let now = self.now;
        match step {
            helper::Step::Dinfo => {
                let d = config::device::parse(DEVICE_FILES[self.files.device]);
                let cc = self.files.country.clone();
                self.n.file_dinfo(now, d, cc);
            }
            helper::Step::Token => {
                // What the reactor reads; the node decides (L§9.3).
                let token = match self.files.token {
                    TokenFile::Good(i) => {
                        let t = TOKENS.get(i).map_or(HEX_TOKEN, |t| b16(t));
                        Ok(Some(config::token::render(&Secret16::new(t))))
                    }
                    TokenFile::Missing => Ok(None),
                    TokenFile::Bad => Err(config::ConfError {
                        file: "device.token".into(),
                        line: 0,
                        reason: "cannot read: Permission denied (os error 13)".into(),
                    }),
                };
                let files = TokenFiles {
                    wifi_conf: self.files.wifi.is_some(),
                    token,
                    fresh: Secret16::new(*FRESH_TOKEN),
                };
                self.n.file_token(now, files);
            }
            helper::Step::WifiStatus => {
                let (p, ssid, uid) = match &self.files.wifi {
                    Some((s, uid)) => (true, s.clone(), *uid),
                    None => (false, String::new(), None),
                };
                self.n.file_wifi(now, p, ssid, uid);
            }
            _ => {}
        }
    }

    fn deliver_cloud(&mut self, u: &mut Input, bytes: &[u8]) {
        let now = self.now;
        match self.link {
            Some(Transport::Udp) => self.n.cloud_datagram(now, bytes),
            Some(Transport::Tcp) => {
                let mut at = 0;
                for k in chunk_plan(u, bytes.len()) {
                    self.n.cloud_stream(now, &bytes[at..at + k]);
                    at += k;
                }
            }
            None => return,
        }
        self.drain();
    }

    fn cloud_key(&self) -> (u32, [u8; 16]) {
        self.n.identity().map_or((0, CLOUD_KEY), |i| (i.did, i.key))
    }

    fn deliver_json(&mut self, u: &mut Input, text: &str) {
        let (did, key) = self.cloud_key();
        let stamp = self.n.stamp(self.now);
        let pkt = miio::seal(&Keys::new(&key), did, stamp, text.as_bytes());
        self.deliver_cloud(u, &pkt);
    }

    /// A cooperative cloud for one round: answers the resolver, the connect, the hello and every
    /// request seen, as the node tests' `serve` does.
    fn serve(&mut self, u: &mut Input) {
        let now = self.now;
        if let Some(a) = self.attempt.take() {
            self.n
                .cloud_resolved(now, a, Ok(vec![Ipv4Addr::new(1, 2, 3, 4)]));
            self.drain();
        }
        if self.connecting {
            self.connecting = false;
            let netif = Netif {
                ip: "10.0.0.2".into(),
                mask: "255.0.0.0".into(),
                gw: "10.0.0.1".into(),
            };
            self.n
                .cloud_connected(now, netif, Ipv4Addr::new(10, 0, 0, 2));
            self.drain();
        }
        if self.hello_out {
            self.hello_out = false;
            self.deliver_cloud(u, &miio::time_sync_reply(1_700_000_000));
        }
        for _ in 0..8 {
            let Some((id, m)) = self.requests.pop_front() else {
                break;
            };
            let text = if m == "_otc.info" {
                format!(r#"{{"id":{id},"result":{{"otc_list":[]}}}}"#)
            } else {
                format!(r#"{{"id":{id},"result":"ok"}}"#)
            };
            self.deliver_json(u, &text);
        }
    }

    fn accept(&mut self, id: ConnId, port: Port) {
        if self.clients.contains_key(&id) {
            return;
        }
        let locals = self.clients.values().filter(|c| c.port == Port::Local);
        let seats = locals.filter(|c| !c.extra).count();
        let extra = port == Port::Local && seats >= self.max_clients;
        if self.n.local_accept(self.now, id, port) {
            let role = match port {
                Port::Ble => Role::Ble,
                Port::Local => Role::Unclassified(self.now + CLASSIFY_WINDOW),
                Port::Mqtt => unreachable!("the node attaches its MQTT connections"),
            };
            let split = Splitter::new(16384);
            let commands = VecDeque::new();
            self.clients.insert(
                id,
                Client {
                    port,
                    role,
                    extra,
                    split,
                    commands,
                    hello: false,
                },
            );
        }
        self.drain();
    }

    /// Bytes from a client through its splitter, as `client_ready` reads them.
    fn client_bytes(&mut self, id: ConnId, data: &[u8]) {
        let Some(c) = self.clients.get_mut(&id) else {
            return;
        };
        c.split.push(data);
        loop {
            let Some(c) = self.clients.get_mut(&id) else {
                return;
            };
            match c.split.next_piece() {
                None => return,
                Some(Ok(piece)) => {
                    let v = piece.clone().into_bytes();
                    let o = rpc::parse_object(&v).ok();
                    let up = o.as_ref().and_then(|o| o.get("id")).and_then(rpc::id_u32);
                    if up.is_some_and(is_up_id) {
                        // Only the templates use these ids: their replies are counted.
                        continue;
                    }
                    let m = o
                        .as_ref()
                        .and_then(|o| o.get("method"))
                        .and_then(Value::as_str);
                    if c.port == Port::Local {
                        if let Role::Unclassified(_) = c.role {
                            let helper = m.is_some_and(|m| m.starts_with("_internal."));
                            c.role = if helper { Role::Helper } else { Role::Ordinary };
                        }
                        c.hello |= m == Some("_internal.hello");
                    }
                    // The daemon's path: a scanned piece is not scanned again.
                    self.n.local_piece(self.now, id, piece);
                    self.drain();
                }
                Some(Err(SplitError::TooLarge { .. })) => {
                    self.gone(id);
                    self.n.local_closed(id);
                    self.drain();
                    return;
                }
                Some(Err(SplitError::Syntax { .. })) => {
                    self.n.local_syntax_error(self.now, id);
                    self.drain();
                    return;
                }
            }
        }
    }

    /// A template message from a client: the helper's side of L§9, `local.*` of L§5, upstream
    /// requests, replies to the commands it was sent.
    fn client_message(&mut self, u: &mut Input, id: ConnId) {
        let did = u.pick(&DIDS);
        let key = u.pick(&CLOUD_KEYS);
        let t = match u.u8() % 22 {
            0 => r#"{"method":"_internal.hello"}"#.to_owned(),
            1 => r#"{"method":"_internal.helper_ready"}"#.to_owned(),
            2 => format!(
                r#"{{"method":"_internal.response_dinfo","params":{{"did":{did},"key":"{key}","vendor":"acme","mac":"aa:bb:cc:01:02:03","model":"acme.dev.v1"}}}}"#
            ),
            3 => format!(
                r#"{{"method":"_internal.response_dtoken","params":"{}"}}"#,
                u.pick(&TOKENS)
            ),
            4 => format!(
                r#"{{"method":"_internal.res_wifi_conf_status","params":{}}}"#,
                u.pick(&["0", "1", "\"1\"", "2"])
            ),
            5 => r#"{"method":"_internal.info","partner_id":"","params":{"hw_ver":"Linux","fw_ver":"2.1.1_9527","ap":{"ssid":"s","bssid":"AA:BB:CC:00:11:22"}}}"#.to_owned(),
            6 => r#"{"method":"_internal.wifi_connected","params":{"ssid":"x"}}"#.to_owned(),
            7 => r#"{"method":"_internal.wifi_ap_mode","params":null}"#.to_owned(),
            8 => format!(
                r#"{{"method":"_internal.response_dcountry","params":"{}"}}"#,
                u.pick(&["", "cn", "de", "TOOLONGXX"])
            ),
            9 => r#"{"method":"_internal.reboot"}"#.to_owned(),
            10 => format!(
                r#"{{"id":{},"method":"{}"}}"#,
                u.u8(),
                u.pick(&[
                    "local.query_status",
                    "local.query_time",
                    "local.query_country",
                    "local.prep_suspend",
                    "local.nonesuch",
                ])
            ),
            11 | 12 => {
                let ssid = u.pick(&["newnet", "", "a\"b", "x\u{7}y"]);
                let extra = u.pick(&[
                    "",
                    r#","uid":12345"#,
                    r#","uid":"77","bind_key":"bk","country_domain":"de","tz":"Europe/Berlin""#,
                    r#","country_domain":"toolongcc""#,
                    r#","uid":-1"#,
                ]);
                format!(
                    r#"{{"id":{},"method":"local.ble.config_router","params":{{"ssid":"{ssid}","passwd":"pw12345678"{extra}}}}}"#,
                    u.u8()
                )
            }
            13 => r#"{"method":"local.status","params":"wifi_ap_mode"}"#.to_owned(),
            14..=16 => {
                self.next_up = (self.next_up + 1) % UP_SPAN;
                let n = UP_BASE + self.next_up;
                let pad = "p".repeat(usize::from(u.u8()) * 8);
                let t = format!(r#"{{"id":{n},"method":"props","params":{{"a":"{pad}"}}}}"#);
                // Whole, between two values: `client_bytes` keeps these ids out of other input.
                let Some(c) = self.clients.get_mut(&id).filter(|c| c.split.buffered() == 0) else {
                    return;
                };
                if let Role::Unclassified(_) = c.role {
                    if c.port == Port::Local {
                        c.role = Role::Ordinary;
                    }
                }
                self.waiting.push((id, n));
                self.n.local_value(self.now, id, t.as_bytes());
                self.drain();
                return;
            }
            17..=19 => {
                let cid = self
                    .clients
                    .get(&id)
                    .and_then(|c| c.commands.get(u.below(c.commands.len())).copied())
                    .unwrap_or(0x4000_0000);
                match u.u8() % 4 {
                    0 => format!(r#"{{"id":{cid},"error":{{"code":-10000,"message":"x"}}}}"#),
                    1 => format!(r#"{{"id":{cid},"error":{{"code":-32601,"message":"x"}}}}"#),
                    _ => format!(r#"{{"id":{cid},"result":["ok"]}}"#),
                }
            }
            20 => r#"{"method":"_internal.res_didkeymac","params":{"a":[1]}}"#.to_owned(),
            _ => r#"{"method":"_internal.config_tz_ack"}"#.to_owned(),
        };
        self.client_bytes(id, t.as_bytes());
    }

    fn phone_datagram(&mut self, who: usize, bytes: Vec<u8>) {
        self.lan_sent.push_back((bytes.clone(), who));
        if self.lan_sent.len() > 16 {
            self.lan_sent.pop_front();
        }
        self.n.lan_datagram(self.now, phone(who), &bytes);
        self.drain();
    }

    fn event(&mut self, u: &mut Input) {
        let now = self.now;
        match u.u8() % 25 {
            0 => advance(self, u),
            1 => {
                let port = if u.u8().is_multiple_of(4) {
                    Port::Ble
                } else {
                    Port::Local
                };
                self.accept(u.below(SLOTS), port);
            }
            2 => {
                let id = u.below(SLOTS);
                if self.clients.contains_key(&id) {
                    self.gone(id);
                    self.n.local_closed(id);
                    self.drain();
                }
            }
            3..=5 => {
                let id = u.below(SLOTS);
                self.client_message(u, id);
            }
            6 => {
                let id = u.below(SLOTS);
                let data = u.blob().to_vec();
                self.client_bytes(id, &data);
            }
            7 => match u.u8() % 5 {
                0 => self.files.device = u.below(DEVICE_FILES.len()),
                1 => self.files.country = u.pick(&[None, Some("de".to_owned())]),
                2 => {
                    self.files.token = match u.u8() % 3 {
                        0 => TokenFile::Missing,
                        1 => TokenFile::Bad,
                        _ => TokenFile::Good(u.below(TOKENS.len() + 1)),
                    }
                }
                3 => {
                    self.files.wifi = match u.u8() % 3 {
                        0 => None,
                        _ => Some(("home".to_owned(), u.bool().then_some(42))),
                    }
                }
                _ => self.files.writable = !self.files.writable,
            },
            8 => {
                // SIGHUP: os-release and the data files again (client.rs `reload`).
                self.os = u.below(OS_RELEASES.len());
                let text = Some(OS_RELEASES[self.os].to_owned()).filter(|t| !t.is_empty());
                self.n.set_os_release(text);
                self.n.retry_files();
                self.drain();
            }
            9 => {
                let attempt = match u.u8() % 3 {
                    0 => u.u32(),
                    _ => self.attempt.unwrap_or(0),
                };
                let r = match u.u8() % 4 {
                    0 => Err("no such host".to_owned()),
                    _ => Ok((0..u.u8() % 4).map(|_| u.pick(&DNS_IPS)).collect()),
                };
                self.n.cloud_resolved(now, attempt, r);
                self.drain();
            }
            10 => {
                if self.connecting {
                    self.connecting = false;
                    let ip = u.pick(&LOCAL_IPS);
                    let netif = Netif {
                        ip: ip.to_string(),
                        mask: "255.255.255.0".into(),
                        gw: String::new(),
                    };
                    self.n.cloud_connected(now, netif, ip);
                    self.drain();
                }
            }
            11 => {
                if self.connecting {
                    self.n.cloud_connect_failed(now, OsError::Errno(111)); // ECONNREFUSED
                    self.drain();
                }
            }
            12 => {
                if self.link.is_some() {
                    self.n.cloud_link_down(now);
                    self.drain();
                }
            }
            13 => {
                let stamp = match u.u8() % 6 {
                    5 => u.u32(),
                    i => SERVER_STAMPS[usize::from(i)],
                };
                self.deliver_cloud(u, &miio::time_sync_reply(stamp));
            }
            14 => {
                let i = u.below(self.requests.len());
                let (id, m) = self
                    .requests
                    .get(i)
                    .cloned()
                    .unwrap_or((u.u32(), String::new()));
                let text = cloud_ack(u, id, &m);
                self.deliver_json(u, &text);
            }
            15 => {
                if u.bool() {
                    if let Some(ka) = self.last_ka.clone() {
                        self.deliver_cloud(u, &ka);
                    }
                } else {
                    let (did, key) = self.cloud_key();
                    let ping = miio::keepalive(&Keys::new(&key), did, u.u32()).to_vec();
                    self.ping = Some(ping.clone());
                    self.deliver_cloud(u, &ping);
                }
            }
            16 => {
                self.next_cmd += 1;
                let text = cloud_command(u, self.last_cmd, self.next_cmd);
                self.last_cmd = obj(&text)
                    .and_then(|o| o.get("id").and_then(rpc::id_u32))
                    .or(self.last_cmd);
                self.deliver_json(u, &text);
            }
            17 => {
                if u.bool() {
                    let raw = u.blob().to_vec();
                    self.deliver_cloud(u, &raw);
                } else {
                    let text = String::from_utf8_lossy(u.blob()).into_owned();
                    if obj(&text)
                        .and_then(|o| o.get("id").and_then(rpc::id_u32))
                        .is_some_and(is_up_id)
                    {
                        return;
                    }
                    self.deliver_json(u, &text);
                }
            }
            18 => self.serve(u),
            19 => {
                let who = u.below(3);
                self.phone_datagram(who, miio::lan_hello().to_vec());
            }
            20 => {
                self.next_phone += 1;
                let (text, _) = phone_command(u, self.next_phone);
                let (did, token) = match (u.u8() % 4, self.n.identity()) {
                    (0, _) | (_, None) => (u.pick(&DIDS), u.pick(&lan_secrets())),
                    (_, Some(i)) => (i.did, i.token),
                };
                let stamp = self.n.stamp(now);
                let pkt = miio::seal(&Keys::new(&token), did, stamp, text.as_bytes());
                let who = u.below(3);
                self.phone_datagram(who, pkt);
            }
            21 => {
                let i = u.below(self.lan_sent.len());
                if let Some((b, who)) = self.lan_sent.get(i).cloned() {
                    self.phone_datagram(who, b);
                }
            }
            22 => {
                let raw = u.blob().to_vec();
                let who = u.below(3);
                self.phone_datagram(who, raw);
            }
            23 => self.n.set_cloud_backlog(u.bool()),
            _ => {
                self.n.shutdown(now);
                self.drain();
                assert_eq!(self.n.cloud_state(), CloudState::Stopped);
            }
        }
    }
}

/// The whole node (L§7, L§9, P§4, P§5) against a scripted reactor, data dir, helper, clients,
/// phones and cloud.
pub fn node(data: &[u8]) {
    let mut u = Input::new(data);
    let mut c = cloud_config(&mut u);
    let hosts_explicit = (c.udp.explicit, c.tcp.explicit);
    let zero = c.ack_timeout == Duration::ZERO || c.user_ack_timeout == Duration::ZERO;
    let max_clients = u.pick(&[1, 2, 20]);
    let max_sleep = Duration::from_millis(u.pick(&[1000, 3_600_000]));
    let grace = Duration::from_millis(u.pick(&[0, 2000]));
    let timeout = Duration::from_millis(u.pick(&[1, 10_000, 0, u64::MAX]));
    let zero = zero || grace == Duration::ZERO || timeout == Duration::ZERO;
    c.did = 0;
    let cfg = NodeConfig {
        max_clients,
        max_sleep,
        cloud: c,
        country_override: u.pick(&[None, Some("de".to_owned())]),
        hosts_explicit,
        helper: helper::Config {
            datadir: "/data/miio".into(),
            grace,
            timeout,
        },
        mdns: Some(54321),
    };
    let now = Instant(u64::from(u.u32()));
    let files = Files {
        device: u.below(DEVICE_FILES.len()),
        country: None,
        token: match u.u8() % 3 {
            0 => TokenFile::Missing,
            _ => TokenFile::Good(u.below(TOKENS.len() + 1)),
        },
        wifi: u.bool().then(|| ("home".to_owned(), None)),
        writable: true,
        backup: None,
    };
    let mut h = NodeH {
        n: Node::new(now, cfg, Secret16::new(*FRESH_TOKEN)),
        now,
        zero,
        max_clients,
        max_sleep,
        files,
        os: 0,
        clients: BTreeMap::new(),
        link: None,
        connecting: false,
        attempt: None,
        hello_out: false,
        requests: VecDeque::new(),
        last_ka: None,
        ping: None,
        next_cmd: 1000,
        last_cmd: None,
        stamps: Stamps::default(),
        lan_sent: VecDeque::new(),
        next_phone: 0,
        waiting: Vec::new(),
        next_up: 0,
        mdns: None,
        mdns_announce: 0,
    };
    h.n.start(now);
    h.drain();
    for _ in 0..MAX_EVENTS {
        if u.is_empty() {
            break;
        }
        h.event(&mut u);
    }
    h.n.shutdown(h.now);
    h.drain();
    assert!(
        h.waiting.is_empty(),
        "upstream requests never answered: {:?}",
        h.waiting
    );
}

/// The machine's scan of a routed message reads what the tree holds (the model parses).
fn scanned_as_parsed(head: &rpc::Head, raw: &[u8]) {
    let o = rpc::parse_object(raw).expect("a routed message parses");
    assert_eq!(
        (
            &head
                .method
                .as_ref()
                .map(|m| m.as_ref().map(|m| m.as_str().to_owned())),
            &head.id,
            head.answer,
            head.error_code,
        ),
        (
            &o.get("method").map(|m| m.as_str().map(str::to_owned)),
            &o.get("id").cloned(),
            o.contains_key("result") || o.contains_key("error"),
            o.get("error")
                .and_then(|e| e.get("code"))
                .and_then(Value::as_i64),
        ),
        "scan and tree disagree"
    );
}

// ---- (10) wire::mqtt and proto::mqtt ----------------------------------------------------------

/// The MQTT codec and the client session (L§11). The first part of the input is a stream cut in
/// a chunking the input chooses: every frame the splitter gives is the same whole or chunked, and
/// one that decodes encodes back to a packet that decodes the same. The rest is a program for the
/// session, with a broker played from the input (raw bytes or well-formed answers to what the
/// session sent): everything it writes is whole client packets with non-zero ids, no PINGREQ with
/// keep-alive 0, no deadline in the past after a timeout, the unacknowledged publishes bounded.
#[cfg(feature = "mqtt")]
pub fn mqtt(data: &[u8]) {
    use crate::proto::mqtt as session;
    use crate::wire::mqtt as codec;

    let mut u = Input::new(data);
    let cap = 2 + usize::from(u.u16() % 2048);
    let mut seed = u64::from(u.u8());
    let stream = u.blob();

    // Whole, then in chunks: the same frames, or the same first error.
    let frames = |chunks: &mut dyn Iterator<Item = &[u8]>| {
        let mut s = codec::Splitter::new(cap);
        let mut out = Vec::new();
        for c in chunks {
            s.push(c);
            loop {
                match s.next_frame() {
                    Ok(Some(f)) => out.push(Ok(f.to_vec())),
                    Ok(None) => break,
                    Err(e) => {
                        out.push(Err(e));
                        return out;
                    }
                }
            }
        }
        out
    };
    let whole = frames(&mut std::iter::once(stream));
    let mut rest = stream;
    let chunked = frames(&mut std::iter::from_fn(|| {
        if rest.is_empty() {
            return None;
        }
        let n = 1 + (mix(&mut seed) % 16) as usize;
        let (a, b) = rest.split_at(n.min(rest.len()));
        rest = b;
        Some(a)
    }));
    assert_eq!(whole, chunked, "the chunking changed the frames");
    for f in whole.iter().flatten() {
        assert!(f.len() <= cap, "a frame above the cap");
        if let Ok(p) = codec::decode(f) {
            let mut out = Vec::new();
            p.encode(&mut out).expect("a decoded packet encodes again");
            assert_eq!(
                codec::decode(&out),
                Ok(p),
                "the round trip changed the packet"
            );
        }
    }

    // The session.
    let cfg = session::Config {
        client_id: ["miio_client", "", "id-é"][u.below(3)].to_owned(),
        keep_alive: [0, 0, 1, 30][u.below(4)],
        max_packet: 64 + usize::from(u.u16() % 4096),
        max_inflight: 1 + u.below(8),
    };
    let keep_alive = cfg.keep_alive;
    let max_inflight = cfg.max_inflight;
    let mut s = session::Session::new(cfg);
    let mut now = Instant::ZERO;
    s.start(now);
    // What the played broker knows: a connect asked for, the SUBSCRIBE and publishes seen.
    let mut connect_asked = false;
    let mut sub_id: Option<u16> = None;
    let mut published: Vec<u16> = Vec::new();
    let mut steps = 0;
    while !u.is_empty() && steps < 2000 {
        steps += 1;
        match u.u8() % 10 {
            0 => {
                now += Duration::from_millis(u64::from(u.u16()) * 8);
                if s.poll_timeout().is_some_and(|t| t <= now) {
                    s.handle_timeout(now);
                    assert!(
                        s.poll_timeout().is_none_or(|t| t > now),
                        "a deadline in the past after handle_timeout"
                    );
                }
            }
            1 => s.received(now, u.blob()),
            2 if connect_asked => {
                connect_asked = false;
                if u.bool() {
                    s.connected(now)
                } else {
                    s.connect_failed(now)
                }
            }
            3 => s.received(now, &[0x20, 2, 0, u.u8() % 8]),
            4 => {
                let id = sub_id.unwrap_or(u.u16()).to_be_bytes();
                let n = 1 + u.below(4);
                let mut p = vec![0x90, 2 + n as u8, id[0], id[1]];
                p.extend((0..n).map(|_| [0, 1, 2, 0x80][u.below(4)]));
                s.received(now, &p);
            }
            5 => {
                let id = if published.is_empty() || u.bool() {
                    u.u16()
                } else {
                    published.swap_remove(u.below(published.len()))
                };
                s.received(now, &[0x40, 2, (id >> 8) as u8, id as u8]);
            }
            6 => {
                let topic = u.pick(&session::Topic::ALL).name();
                let id = u.u16();
                let p = codec::Publish {
                    dup: u.bool(),
                    qos: codec::QoS::AtLeastOnce,
                    retain: false,
                    topic,
                    id: Some(id.max(1)),
                    payload: u.blob(),
                };
                let mut out = Vec::new();
                codec::publish(&p, &mut out).expect("a valid PUBLISH");
                s.received(now, &out);
            }
            7 => {
                let topic = u.pick(&session::Topic::ALL);
                let payload = u.blob();
                let was_up = s.is_up();
                match s.publish(now, topic, payload) {
                    Ok(id) => assert!(id != 0 && was_up, "a publish taken with id 0 or while down"),
                    Err(session::Dropped::NotUp) => assert!(!was_up),
                    Err(_) => {}
                }
            }
            8 => match u.u8() % 4 {
                0 => s.stop(now),
                1 => s.start(now),
                2 => s.received(now, &[0xd0, 0]),
                _ => s.closed(now),
            },
            _ => {}
        }
        // Drain and check what the session did.
        while let Some(a) = s.poll_action() {
            match a {
                session::Action::Connect => connect_asked = true,
                session::Action::Close => connect_asked = false,
                session::Action::Send(bytes) => {
                    let mut sp = codec::Splitter::new(usize::MAX);
                    sp.push(&bytes);
                    let f = sp
                        .next_frame()
                        .expect("a well-formed packet")
                        .expect("a whole packet");
                    assert_eq!(f.len(), bytes.len(), "one whole packet per send");
                    match codec::decode(f).expect("the session sends valid packets") {
                        codec::Packet::Subscribe { id, .. } => sub_id = Some(id),
                        codec::Packet::Publish(p) => {
                            assert_eq!(p.qos, codec::QoS::AtLeastOnce);
                            published.extend(p.id);
                        }
                        codec::Packet::PingReq => {
                            assert!(keep_alive > 0, "PINGREQ with keep-alive 0")
                        }
                        codec::Packet::Connect(_)
                        | codec::Packet::PubAck(_)
                        | codec::Packet::Disconnect => {}
                        other => panic!("the session sent {other:?}"),
                    }
                }
            }
        }
        while let Some(e) = s.poll_event() {
            if let session::Event::Message { topic, .. } = e {
                assert!(session::Topic::SUBSCRIBED.contains(&topic));
            }
        }
        assert!(
            s.inflight() <= max_inflight,
            "the unacknowledged publishes overflowed"
        );
        if s.is_up() && keep_alive == 0 {
            assert_eq!(
                s.poll_timeout(),
                None,
                "a deadline while up with keep-alive 0"
            );
        }
        published.truncate(64);
    }
}
