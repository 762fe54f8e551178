//! The MQTT 3.1.1 codec of the broker link (LOCAL_API.md §11): every control packet a client sends or
//! receives, and a frame splitter for the TCP stream.
//!
//! Contract: [`Splitter`] cuts a byte stream, in any chunking, into whole frames (fixed header and
//! body), refusing a remaining length longer than 4 bytes (MQTT 3.1.1 §2.2.3) or a frame above the
//! cap its caller sets. [`decode`] turns one frame into a [`Packet`] that borrows the frame (no
//! allocation) after checking everything the standard asks of it: the fixed-header flags
//! (MQTT 3.1.1 §2.2.2), the exact length of the fixed-size packets, UTF-8 strings without U+0000
//! (MQTT 3.1.1 §1.5.3), packet identifiers never 0 (MQTT 3.1.1 §2.3.1), no wildcard in a PUBLISH
//! topic (MQTT 3.1.1 §3.3.2.1), no bytes left over. After it no accessor can fail or panic. The
//! encoders check the same rules on the way out and append to a buffer the caller owns. The first
//! failing rule is the [`Error`] returned; nothing here does I/O or panics on any input.

use core::fmt;

/// The largest remaining length four bytes can carry (MQTT 3.1.1 §2.2.3).
pub const MAX_REMAINING: usize = 268_435_455;
/// The longest UTF-8 string or binary field: a two-byte length prefix (MQTT 3.1.1 §1.5.3).
pub const MAX_STRING: usize = 65_535;

/// Control packet types, the high nibble of the first byte (MQTT 3.1.1 §2.2.1).
pub mod kind {
    pub const CONNECT: u8 = 1;
    pub const CONNACK: u8 = 2;
    pub const PUBLISH: u8 = 3;
    pub const PUBACK: u8 = 4;
    pub const PUBREC: u8 = 5;
    pub const PUBREL: u8 = 6;
    pub const PUBCOMP: u8 = 7;
    pub const SUBSCRIBE: u8 = 8;
    pub const SUBACK: u8 = 9;
    pub const UNSUBSCRIBE: u8 = 10;
    pub const UNSUBACK: u8 = 11;
    pub const PINGREQ: u8 = 12;
    pub const PINGRESP: u8 = 13;
    pub const DISCONNECT: u8 = 14;
}

/// Why bytes were refused, in decoding or encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// The remaining length has a fifth byte (MQTT 3.1.1 §2.2.3).
    RemainingLength,
    /// A frame (or a packet to encode) larger than the cap.
    TooLarge { len: usize, cap: usize },
    /// The frame ends before a field it announces, or its length field disagrees with its size.
    Truncated,
    /// Bytes after the last field of the packet.
    Trailing,
    /// Type 0 or 15 (MQTT 3.1.1 §2.2.1).
    ReservedType(u8),
    /// Fixed-header flags other than the ones the type requires (MQTT 3.1.1 §2.2.2).
    BadFlags { kind: u8, flags: u8 },
    /// A fixed-size packet whose remaining length is not its size.
    BadLength { kind: u8, len: usize },
    /// CONNECT: a protocol name other than `MQTT` or a level other than 4 (MQTT 3.1.1 §3.1.2.1–2).
    BadProtocol,
    /// CONNECT: the reserved flag set, a will QoS without a will, a password without a user name
    /// (MQTT 3.1.1 §3.1.2.3–9).
    BadConnectFlags(u8),
    /// CONNACK: reserved acknowledge flags or a return code above 5 (MQTT 3.1.1 §3.2.2).
    BadConnAck,
    /// QoS 3, or a requested QoS byte with its reserved bits set (MQTT 3.1.1 §3.3.1.2, §3.8.3.1).
    BadQos(u8),
    /// PUBLISH with QoS 0 and DUP set (MQTT 3.1.1 §3.3.1.1).
    DupWithoutQos,
    /// A string that is not UTF-8, contains U+0000, or is longer than 65535 bytes (MQTT 3.1.1 §1.5.3).
    BadString,
    /// An empty topic, or a wildcard in a PUBLISH topic (MQTT 3.1.1 §4.7.3, §3.3.2.1).
    BadTopic,
    /// Packet identifier 0 (MQTT 3.1.1 §2.3.1).
    PacketIdZero,
    /// SUBSCRIBE, UNSUBSCRIBE or SUBACK without any entry (MQTT 3.1.1 §3.8.3, §3.10.3).
    EmptyList,
    /// A SUBACK return code other than 0, 1, 2 or 0x80 (MQTT 3.1.1 §3.9.3).
    BadSubAckCode(u8),
    /// [`decode_from_broker`]: a packet type only a client sends (CONNECT, SUBSCRIBE,
    /// UNSUBSCRIBE, PINGREQ, DISCONNECT).
    FromClient(u8),
}

impl fmt::Display for Error {
    // Static texts only: the variant's fields are for tests, and formatting numbers here would
    // cost flash on every board for a line that names the fault well enough (ARCHITECTURE.md §6).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Error {
    /// The text of [`fmt::Display`].
    pub fn as_str(&self) -> &'static str {
        match self {
            Error::RemainingLength => "MQTT: length over 4 bytes",
            Error::TooLarge { .. } => "MQTT: packet over the cap",
            Error::Truncated => "MQTT: truncated",
            Error::Trailing => "MQTT: trailing bytes",
            Error::ReservedType(_) => "MQTT: reserved type",
            Error::BadFlags { .. } => "MQTT: bad flags",
            Error::BadLength { .. } => "MQTT: bad length",
            Error::BadProtocol => "MQTT: not protocol level 4",
            Error::BadConnectFlags(_) => "MQTT: bad CONNECT flags",
            Error::BadConnAck => "MQTT: bad CONNACK",
            Error::BadQos(_) => "MQTT: bad QoS",
            Error::DupWithoutQos => "MQTT: DUP at QoS 0",
            Error::BadString => "MQTT: bad string",
            Error::BadTopic => "MQTT: bad topic",
            Error::PacketIdZero => "MQTT: packet id 0",
            Error::EmptyList => "MQTT: empty list",
            Error::BadSubAckCode(_) => "MQTT: bad SUBACK code",
            Error::FromClient(_) => "MQTT: a client's packet",
        }
    }
}

impl std::error::Error for Error {}

/// Quality of service (MQTT 3.1.1 §4.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum QoS {
    AtMostOnce = 0,
    AtLeastOnce = 1,
    ExactlyOnce = 2,
}

impl QoS {
    pub fn from_bits(b: u8) -> Result<QoS, Error> {
        match b {
            0 => Ok(QoS::AtMostOnce),
            1 => Ok(QoS::AtLeastOnce),
            2 => Ok(QoS::ExactlyOnce),
            _ => Err(Error::BadQos(b)),
        }
    }
}

/// The will of a CONNECT (MQTT 3.1.1 §3.1.2.5–7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Will<'a> {
    pub topic: &'a str,
    pub message: &'a [u8],
    pub qos: QoS,
    pub retain: bool,
}

/// CONNECT (MQTT 3.1.1 §3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Connect<'a> {
    pub client_id: &'a str,
    pub clean_session: bool,
    /// Seconds; 0 turns the keep-alive off (MQTT 3.1.1 §3.1.2.10).
    pub keep_alive: u16,
    pub will: Option<Will<'a>>,
    pub username: Option<&'a str>,
    pub password: Option<&'a [u8]>,
}

/// CONNACK return codes (MQTT 3.1.1 §3.2.2.3).
pub mod connack {
    pub const ACCEPTED: u8 = 0;
    pub const BAD_PROTOCOL: u8 = 1;
    pub const ID_REJECTED: u8 = 2;
    pub const UNAVAILABLE: u8 = 3;
    pub const BAD_CREDENTIALS: u8 = 4;
    pub const NOT_AUTHORIZED: u8 = 5;
}

/// PUBLISH (MQTT 3.1.1 §3.3). `id` is `Some` exactly when `qos` is above 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Publish<'a> {
    pub dup: bool,
    pub qos: QoS,
    pub retain: bool,
    pub topic: &'a str,
    pub id: Option<u16>,
    pub payload: &'a [u8],
}

/// The entries of a decoded SUBSCRIBE (topic filter and requested QoS) or UNSUBSCRIBE (topic filter,
/// no QoS): the checked bytes, walked by [`Filters::iter`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Filters<'a> {
    raw: &'a [u8],
    with_qos: bool,
}

impl<'a> Filters<'a> {
    /// Each entry: the filter and, for SUBSCRIBE, the requested QoS.
    pub fn iter(&self) -> impl Iterator<Item = (&'a str, Option<QoS>)> + 'a {
        let mut rest = self.raw;
        let with_qos = self.with_qos;
        core::iter::from_fn(move || {
            if rest.is_empty() {
                return None;
            }
            // Checked by `Filters::parse`, so neither can fail; an empty answer ends the walk.
            let (topic, after) = take_str(rest).ok()?;
            let (qos, after) = if with_qos {
                let (&b, after) = after.split_first()?;
                (QoS::from_bits(b).ok(), after)
            } else {
                (None, after)
            };
            rest = after;
            Some((topic, qos))
        })
    }

    fn parse(raw: &'a [u8], with_qos: bool) -> Result<Filters<'a>, Error> {
        if raw.is_empty() {
            return Err(Error::EmptyList);
        }
        let mut rest = raw;
        while !rest.is_empty() {
            let (topic, after) = take_str(rest)?;
            check_filter(topic)?;
            rest = after;
            if with_qos {
                let (&b, after) = rest.split_first().ok_or(Error::Truncated)?;
                QoS::from_bits(b)?;
                rest = after;
            }
        }
        Ok(Filters { raw, with_qos })
    }
}

/// One control packet, borrowing the frame it was decoded from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Packet<'a> {
    Connect(Connect<'a>),
    ConnAck {
        session_present: bool,
        code: u8,
    },
    Publish(Publish<'a>),
    PubAck(u16),
    PubRec(u16),
    PubRel(u16),
    PubComp(u16),
    Subscribe {
        id: u16,
        filters: Filters<'a>,
    },
    /// The return codes, one per filter: 0, 1, 2 (granted QoS) or 0x80 (failure).
    SubAck {
        id: u16,
        codes: &'a [u8],
    },
    Unsubscribe {
        id: u16,
        filters: Filters<'a>,
    },
    UnsubAck(u16),
    PingReq,
    PingResp,
    Disconnect,
}

// ---- the frame splitter ------------------------------------------------------------------------

/// Reads the remaining length at the start of `b` (the bytes after the first one):
/// `Ok(None)` when more bytes are needed, else the value and the number of bytes it took.
pub fn remaining_length(b: &[u8]) -> Result<Option<(usize, usize)>, Error> {
    let mut value = 0usize;
    for i in 0..4 {
        let Some(&byte) = b.get(i) else {
            return Ok(None);
        };
        value |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(Some((value, i + 1)));
        }
    }
    Err(Error::RemainingLength)
}

/// Cuts a TCP byte stream into whole frames. The caller pushes what it read and then takes frames
/// until [`Splitter::next_frame`] answers `Ok(None)`; so the buffer holds at most one unfinished
/// frame (below the cap) and the last read. After an error the stream is lost: the caller closes
/// the connection and [`Splitter::clear`]s.
#[derive(Debug, Clone)]
pub struct Splitter {
    buf: Vec<u8>,
    /// Bytes of `buf` already handed out as frames.
    start: usize,
    cap: usize,
}

impl Splitter {
    /// A splitter that refuses frames (fixed header included) above `cap` bytes.
    pub fn new(cap: usize) -> Splitter {
        Splitter {
            buf: Vec::new(),
            start: 0,
            cap,
        }
    }

    pub fn push(&mut self, bytes: &[u8]) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes held that are not yet a whole frame.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.start
    }

    pub fn clear(&mut self) {
        self.buf.clear();
        self.start = 0;
    }

    /// The next whole frame, for [`decode`]; `Ok(None)` when it is not all here yet.
    pub fn next_frame(&mut self) -> Result<Option<&[u8]>, Error> {
        let b = &self.buf[self.start..];
        if b.is_empty() {
            return Ok(None);
        }
        let Some((len, n)) = remaining_length(&b[1..])? else {
            return Ok(None);
        };
        let total = 1 + n + len;
        if total > self.cap {
            return Err(Error::TooLarge {
                len: total,
                cap: self.cap,
            });
        }
        if b.len() < total {
            return Ok(None);
        }
        let at = self.start;
        self.start += total;
        Ok(Some(&self.buf[at..at + total]))
    }
}

// ---- decoding ----------------------------------------------------------------------------------

fn take_u16(b: &[u8]) -> Result<(u16, &[u8]), Error> {
    match b {
        [h, l, rest @ ..] => Ok((u16::from_be_bytes([*h, *l]), rest)),
        _ => Err(Error::Truncated),
    }
}

fn take_bytes(b: &[u8]) -> Result<(&[u8], &[u8]), Error> {
    let (len, rest) = take_u16(b)?;
    let len = usize::from(len);
    if rest.len() < len {
        return Err(Error::Truncated);
    }
    Ok(rest.split_at(len))
}

/// A UTF-8 string field (MQTT 3.1.1 §1.5.3): valid UTF-8 (so no surrogates) without U+0000.
fn take_str(b: &[u8]) -> Result<(&str, &[u8]), Error> {
    let (s, rest) = take_bytes(b)?;
    let s = core::str::from_utf8(s).map_err(|_| Error::BadString)?;
    if has_nul(s) {
        return Err(Error::BadString);
    }
    Ok((s, rest))
}

/// U+0000 in a string (a byte loop: `str::contains` links a searcher).
fn has_nul(s: &str) -> bool {
    s.bytes().any(|b| b == 0)
}

fn take_id(b: &[u8]) -> Result<(u16, &[u8]), Error> {
    let (id, rest) = take_u16(b)?;
    if id == 0 {
        return Err(Error::PacketIdZero);
    }
    Ok((id, rest))
}

/// A topic filter of SUBSCRIBE/UNSUBSCRIBE: at least one character (MQTT 3.1.1 §4.7.3). The
/// placement of wildcards is the broker's to judge.
fn check_filter(t: &str) -> Result<(), Error> {
    if t.is_empty() {
        return Err(Error::BadTopic);
    }
    Ok(())
}

/// A topic name of PUBLISH: at least one character and no wildcard (MQTT 3.1.1 §3.3.2.1).
pub fn check_topic(t: &str) -> Result<(), Error> {
    if t.is_empty() || t.bytes().any(|b| b == b'#' || b == b'+') {
        return Err(Error::BadTopic);
    }
    if t.len() > MAX_STRING || has_nul(t) {
        return Err(Error::BadString);
    }
    Ok(())
}

fn done<T>(v: T, rest: &[u8]) -> Result<T, Error> {
    if rest.is_empty() {
        Ok(v)
    } else {
        Err(Error::Trailing)
    }
}

/// Decodes one whole frame (as [`Splitter::next_frame`] gives it: fixed header, remaining length,
/// body, nothing more).
pub fn decode(frame: &[u8]) -> Result<Packet<'_>, Error> {
    decode_as::<true>(frame)
}

/// [`decode`] of what a broker may send a client: the packets only a client sends are
/// [`Error::FromClient`] after the fixed header's checks, and their decoders are not linked
/// into a build that uses only this one.
pub fn decode_from_broker(frame: &[u8]) -> Result<Packet<'_>, Error> {
    decode_as::<false>(frame)
}

fn decode_as<const CLIENT: bool>(frame: &[u8]) -> Result<Packet<'_>, Error> {
    let (&first, rest) = frame.split_first().ok_or(Error::Truncated)?;
    let (len, n) = remaining_length(rest)?.ok_or(Error::Truncated)?;
    let body = &rest[n..];
    if body.len() != len {
        return Err(Error::Truncated);
    }
    let (t, flags) = (first >> 4, first & 0x0f);
    // MQTT 3.1.1 §2.2.2: PUBREL, SUBSCRIBE and UNSUBSCRIBE carry 0010, PUBLISH its own, others 0.
    let want = match t {
        0 | 15 => return Err(Error::ReservedType(t)),
        kind::PUBLISH => flags,
        kind::PUBREL | kind::SUBSCRIBE | kind::UNSUBSCRIBE => 0b0010,
        _ => 0,
    };
    if flags != want {
        return Err(Error::BadFlags { kind: t, flags });
    }
    let fixed = |size: usize| {
        if len == size {
            Ok(())
        } else {
            Err(Error::BadLength { kind: t, len })
        }
    };
    if !CLIENT
        && matches!(
            t,
            kind::CONNECT | kind::SUBSCRIBE | kind::UNSUBSCRIBE | kind::PINGREQ | kind::DISCONNECT
        )
    {
        return Err(Error::FromClient(t));
    }
    match t {
        kind::CONNECT => decode_connect(body).map(Packet::Connect),
        kind::CONNACK => {
            fixed(2)?;
            if body[0] & 0xfe != 0 || body[1] > connack::NOT_AUTHORIZED {
                return Err(Error::BadConnAck);
            }
            Ok(Packet::ConnAck {
                session_present: body[0] & 1 == 1,
                code: body[1],
            })
        }
        kind::PUBLISH => decode_publish(flags, body).map(Packet::Publish),
        kind::PUBACK | kind::PUBREC | kind::PUBREL | kind::PUBCOMP | kind::UNSUBACK => {
            fixed(2)?;
            let (id, _) = take_id(body)?;
            Ok(match t {
                kind::PUBACK => Packet::PubAck(id),
                kind::PUBREC => Packet::PubRec(id),
                kind::PUBREL => Packet::PubRel(id),
                kind::PUBCOMP => Packet::PubComp(id),
                _ => Packet::UnsubAck(id),
            })
        }
        kind::SUBSCRIBE | kind::UNSUBSCRIBE => {
            let (id, rest) = take_id(body)?;
            let filters = Filters::parse(rest, t == kind::SUBSCRIBE)?;
            Ok(if t == kind::SUBSCRIBE {
                Packet::Subscribe { id, filters }
            } else {
                Packet::Unsubscribe { id, filters }
            })
        }
        kind::SUBACK => {
            let (id, codes) = take_id(body)?;
            if codes.is_empty() {
                return Err(Error::EmptyList);
            }
            if let Some(&c) = codes.iter().find(|&&c| c > 2 && c != 0x80) {
                return Err(Error::BadSubAckCode(c));
            }
            Ok(Packet::SubAck { id, codes })
        }
        kind::PINGREQ => fixed(0).map(|_| Packet::PingReq),
        kind::PINGRESP => fixed(0).map(|_| Packet::PingResp),
        _ => fixed(0).map(|_| Packet::Disconnect),
    }
}

fn decode_connect(body: &[u8]) -> Result<Connect<'_>, Error> {
    let (name, rest) = take_bytes(body)?;
    let (&level, rest) = rest.split_first().ok_or(Error::Truncated)?;
    if name != b"MQTT" || level != 4 {
        return Err(Error::BadProtocol);
    }
    let (&cf, rest) = rest.split_first().ok_or(Error::Truncated)?;
    let (keep_alive, rest) = take_u16(rest)?;
    let will_flag = cf & 0x04 != 0;
    let will_qos = (cf >> 3) & 3;
    let will_retain = cf & 0x20 != 0;
    let has_user = cf & 0x80 != 0;
    let has_pass = cf & 0x40 != 0;
    // MQTT 3.1.1 §3.1.2.3 (reserved bit), §3.1.2.6–7 (no will: QoS and retain 0), §3.1.2.9.
    if cf & 1 != 0
        || (!will_flag && (will_qos != 0 || will_retain))
        || will_qos == 3
        || (has_pass && !has_user)
    {
        return Err(Error::BadConnectFlags(cf));
    }
    let (client_id, mut rest) = take_str(rest)?;
    let mut will = None;
    if will_flag {
        let (topic, r) = take_str(rest)?;
        check_topic(topic)?;
        let (message, r) = take_bytes(r)?;
        will = Some(Will {
            topic,
            message,
            qos: QoS::from_bits(will_qos)?,
            retain: will_retain,
        });
        rest = r;
    }
    let mut username = None;
    if has_user {
        let (u, r) = take_str(rest)?;
        username = Some(u);
        rest = r;
    }
    let mut password = None;
    if has_pass {
        let (p, r) = take_bytes(rest)?;
        password = Some(p);
        rest = r;
    }
    done(
        Connect {
            client_id,
            clean_session: cf & 0x02 != 0,
            keep_alive,
            will,
            username,
            password,
        },
        rest,
    )
}

fn decode_publish(flags: u8, body: &[u8]) -> Result<Publish<'_>, Error> {
    let dup = flags & 0x08 != 0;
    let qos = QoS::from_bits((flags >> 1) & 3)?;
    if dup && qos == QoS::AtMostOnce {
        return Err(Error::DupWithoutQos);
    }
    let (topic, rest) = take_str(body)?;
    check_topic(topic)?;
    let (id, payload) = if qos == QoS::AtMostOnce {
        (None, rest)
    } else {
        let (id, rest) = take_id(rest)?;
        (Some(id), rest)
    };
    Ok(Publish {
        dup,
        qos,
        retain: flags & 1 != 0,
        topic,
        id,
        payload,
    })
}

// ---- encoding ----------------------------------------------------------------------------------

/// Appends the fixed header; the body follows.
fn header(out: &mut Vec<u8>, first: u8, len: usize) -> Result<(), Error> {
    if len > MAX_REMAINING {
        return Err(Error::TooLarge {
            len,
            cap: MAX_REMAINING,
        });
    }
    out.push(first);
    let mut v = len;
    loop {
        let mut byte = (v & 0x7f) as u8;
        v >>= 7;
        if v > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if v == 0 {
            return Ok(());
        }
    }
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    // Callers checked the length against MAX_STRING.
    out.extend_from_slice(&(b.len() as u16).to_be_bytes());
    out.extend_from_slice(b);
}

fn string_len(s: &str) -> Result<usize, Error> {
    if s.len() > MAX_STRING || has_nul(s) {
        return Err(Error::BadString);
    }
    Ok(2 + s.len())
}

fn bytes_len(b: &[u8]) -> Result<usize, Error> {
    if b.len() > MAX_STRING {
        return Err(Error::BadString);
    }
    Ok(2 + b.len())
}

fn nonzero(id: u16) -> Result<u16, Error> {
    if id == 0 {
        Err(Error::PacketIdZero)
    } else {
        Ok(id)
    }
}

/// Appends a CONNECT. On an error nothing is appended.
pub fn connect(c: &Connect<'_>, out: &mut Vec<u8>) -> Result<(), Error> {
    let mut len = 10 + string_len(c.client_id)?;
    let mut cf = 0u8;
    if c.clean_session {
        cf |= 0x02;
    }
    if let Some(w) = &c.will {
        check_topic(w.topic)?;
        len += string_len(w.topic)? + bytes_len(w.message)?;
        cf |= 0x04 | ((w.qos as u8) << 3);
        if w.retain {
            cf |= 0x20;
        }
    }
    if let Some(u) = c.username {
        len += string_len(u)?;
        cf |= 0x80;
    }
    if let Some(p) = c.password {
        if c.username.is_none() {
            return Err(Error::BadConnectFlags(cf | 0x40));
        }
        len += bytes_len(p)?;
        cf |= 0x40;
    }
    header(out, kind::CONNECT << 4, len)?;
    put_bytes(out, b"MQTT");
    out.push(4);
    out.push(cf);
    out.extend_from_slice(&c.keep_alive.to_be_bytes());
    put_bytes(out, c.client_id.as_bytes());
    if let Some(w) = &c.will {
        put_bytes(out, w.topic.as_bytes());
        put_bytes(out, w.message);
    }
    if let Some(u) = c.username {
        put_bytes(out, u.as_bytes());
    }
    if let Some(p) = c.password {
        put_bytes(out, p);
    }
    Ok(())
}

/// Appends a PUBLISH. `p.id` must be `Some` (not 0) exactly when `p.qos` is above 0.
pub fn publish(p: &Publish<'_>, out: &mut Vec<u8>) -> Result<(), Error> {
    check_topic(p.topic)?;
    let mut len = string_len(p.topic)? + p.payload.len();
    let mut first = kind::PUBLISH << 4 | (p.qos as u8) << 1;
    match (p.qos, p.id) {
        (QoS::AtMostOnce, None) if p.dup => return Err(Error::DupWithoutQos),
        (QoS::AtMostOnce, None) => {}
        (QoS::AtMostOnce, Some(_)) => return Err(Error::Trailing),
        (_, None) => return Err(Error::PacketIdZero),
        (_, Some(id)) => {
            nonzero(id)?;
            len += 2;
        }
    }
    if p.dup {
        first |= 0x08;
    }
    if p.retain {
        first |= 0x01;
    }
    header(out, first, len)?;
    put_bytes(out, p.topic.as_bytes());
    if let Some(id) = p.id {
        out.extend_from_slice(&id.to_be_bytes());
    }
    out.extend_from_slice(p.payload);
    Ok(())
}

/// Appends a SUBSCRIBE for these filters, each with its requested QoS.
pub fn subscribe(id: u16, filters: &[(&str, QoS)], out: &mut Vec<u8>) -> Result<(), Error> {
    nonzero(id)?;
    if filters.is_empty() {
        return Err(Error::EmptyList);
    }
    let mut len = 2;
    for (f, _) in filters {
        check_filter(f)?;
        len += string_len(f)? + 1;
    }
    header(out, kind::SUBSCRIBE << 4 | 0b0010, len)?;
    out.extend_from_slice(&id.to_be_bytes());
    for (f, q) in filters {
        put_bytes(out, f.as_bytes());
        out.push(*q as u8);
    }
    Ok(())
}

/// Appends an UNSUBSCRIBE for these filters.
pub fn unsubscribe(id: u16, filters: &[&str], out: &mut Vec<u8>) -> Result<(), Error> {
    nonzero(id)?;
    if filters.is_empty() {
        return Err(Error::EmptyList);
    }
    let mut len = 2;
    for f in filters {
        check_filter(f)?;
        len += string_len(f)?;
    }
    header(out, kind::UNSUBSCRIBE << 4 | 0b0010, len)?;
    out.extend_from_slice(&id.to_be_bytes());
    for f in filters {
        put_bytes(out, f.as_bytes());
    }
    Ok(())
}

impl Packet<'_> {
    /// Appends this packet; a decoded packet encodes to the bytes it came from (up to a
    /// non-minimal remaining length).
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), Error> {
        // The fixed-size packets: their first byte and two-byte body, or none.
        let (first, body) = match self {
            Packet::Connect(c) => return connect(c, out),
            Packet::Publish(p) => return publish(p, out),
            Packet::Subscribe { id, filters } | Packet::Unsubscribe { id, filters } => {
                nonzero(*id)?;
                let t = if filters.with_qos {
                    kind::SUBSCRIBE
                } else {
                    kind::UNSUBSCRIBE
                };
                header(out, t << 4 | 0b0010, 2 + filters.raw.len())?;
                out.extend_from_slice(&id.to_be_bytes());
                out.extend_from_slice(filters.raw);
                return Ok(());
            }
            Packet::SubAck { id, codes } => {
                nonzero(*id)?;
                if codes.is_empty() {
                    return Err(Error::EmptyList);
                }
                if let Some(&c) = codes.iter().find(|&&c| c > 2 && c != 0x80) {
                    return Err(Error::BadSubAckCode(c));
                }
                header(out, kind::SUBACK << 4, 2 + codes.len())?;
                out.extend_from_slice(&id.to_be_bytes());
                out.extend_from_slice(codes);
                return Ok(());
            }
            Packet::ConnAck {
                session_present,
                code,
            } => {
                if *code > connack::NOT_AUTHORIZED {
                    return Err(Error::BadConnAck);
                }
                (
                    kind::CONNACK << 4,
                    Some([u8::from(*session_present), *code]),
                )
            }
            Packet::PubAck(id) => (kind::PUBACK << 4, Some(nonzero(*id)?.to_be_bytes())),
            Packet::PubRec(id) => (kind::PUBREC << 4, Some(nonzero(*id)?.to_be_bytes())),
            Packet::PubRel(id) => (
                kind::PUBREL << 4 | 0b0010,
                Some(nonzero(*id)?.to_be_bytes()),
            ),
            Packet::PubComp(id) => (kind::PUBCOMP << 4, Some(nonzero(*id)?.to_be_bytes())),
            Packet::UnsubAck(id) => (kind::UNSUBACK << 4, Some(nonzero(*id)?.to_be_bytes())),
            Packet::PingReq => (kind::PINGREQ << 4, None),
            Packet::PingResp => (kind::PINGRESP << 4, None),
            Packet::Disconnect => (kind::DISCONNECT << 4, None),
        };
        match body {
            Some([a, b]) => out.extend_from_slice(&[first, 2, a, b]),
            None => out.extend_from_slice(&[first, 0]),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn enc(p: &Packet<'_>) -> Vec<u8> {
        let mut v = Vec::new();
        p.encode(&mut v).unwrap();
        v
    }

    // Byte vectors written from the packet layouts of MQTT 3.1.1 §3.1–§3.14.

    #[test]
    fn connect_vector() {
        // §3.1.2: 00 04 'MQTT', level 4, flags (clean session), keep alive 0; payload: client id.
        let bytes = [
            0x10, 0x17, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 0x00, 0x00, 0x0b,
            b'm', b'i', b'i', b'o', b'_', b'c', b'l', b'i', b'e', b'n', b't',
        ];
        let c = Connect {
            client_id: "miio_client",
            clean_session: true,
            keep_alive: 0,
            will: None,
            username: None,
            password: None,
        };
        let mut out = Vec::new();
        connect(&c, &mut out).unwrap();
        assert_eq!(out, bytes);
        assert_eq!(decode(&bytes), Ok(Packet::Connect(c)));
    }

    #[test]
    fn connect_with_everything() {
        let c = Connect {
            client_id: "id",
            clean_session: false,
            keep_alive: 60,
            will: Some(Will {
                topic: "w",
                message: b"bye",
                qos: QoS::AtLeastOnce,
                retain: true,
            }),
            username: Some("u"),
            password: Some(b"p"),
        };
        let bytes = enc(&Packet::Connect(c));
        // flags: user 80 | pass 40 | will retain 20 | will QoS 1 08 | will 04 = ec
        assert_eq!(bytes[9], 0xec);
        assert_eq!(&bytes[10..12], &[0, 60]);
        assert_eq!(decode(&bytes), Ok(Packet::Connect(c)));
    }

    #[test]
    fn connect_refusals() {
        let good = enc(&Packet::Connect(Connect {
            client_id: "x",
            clean_session: true,
            keep_alive: 0,
            will: None,
            username: None,
            password: None,
        }));
        let mut b = good.clone();
        b[8] = 3; // MQTT 3.1 level
        assert_eq!(decode(&b), Err(Error::BadProtocol));
        let mut b = good.clone();
        b[9] |= 1; // reserved flag
        assert_eq!(decode(&b), Err(Error::BadConnectFlags(0x03)));
        let mut b = good.clone();
        b[9] |= 0x08; // will QoS without a will
        assert_eq!(decode(&b), Err(Error::BadConnectFlags(0x0a)));
        let mut b = good.clone();
        b[9] |= 0x40; // password without user name
        assert_eq!(decode(&b), Err(Error::BadConnectFlags(0x42)));
        let mut b = good;
        b[0] = 0x11;
        assert_eq!(decode(&b), Err(Error::BadFlags { kind: 1, flags: 1 }));
    }

    #[test]
    fn connack_vectors() {
        assert_eq!(
            decode(&[0x20, 0x02, 0x00, 0x00]),
            Ok(Packet::ConnAck {
                session_present: false,
                code: 0
            })
        );
        assert_eq!(
            decode(&[0x20, 0x02, 0x01, 0x05]),
            Ok(Packet::ConnAck {
                session_present: true,
                code: connack::NOT_AUTHORIZED
            })
        );
        assert_eq!(decode(&[0x20, 0x02, 0x02, 0x00]), Err(Error::BadConnAck));
        assert_eq!(decode(&[0x20, 0x02, 0x00, 0x06]), Err(Error::BadConnAck));
        assert_eq!(
            decode(&[0x20, 0x03, 0x00, 0x00, 0x00]),
            Err(Error::BadLength { kind: 2, len: 3 })
        );
    }

    #[test]
    fn publish_vectors() {
        // §3.3: QoS 1, topic "a/b", id 10, payload "hi".
        let q1 = [
            0x32, 0x09, 0x00, 0x03, b'a', b'/', b'b', 0x00, 0x0a, b'h', b'i',
        ];
        let p = Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: "a/b",
            id: Some(10),
            payload: b"hi",
        };
        assert_eq!(decode(&q1), Ok(Packet::Publish(p)));
        assert_eq!(enc(&Packet::Publish(p)), q1);
        // The same with DUP and RETAIN: 0x3b.
        let mut d = q1;
        d[0] = 0x3b;
        let dp = Publish {
            dup: true,
            retain: true,
            ..p
        };
        assert_eq!(decode(&d), Ok(Packet::Publish(dp)));
        assert_eq!(enc(&Packet::Publish(dp)), d);
        // QoS 0 has no packet id.
        let q0 = [0x30, 0x04, 0x00, 0x01, b't', b'x'];
        assert_eq!(
            decode(&q0),
            Ok(Packet::Publish(Publish {
                dup: false,
                qos: QoS::AtMostOnce,
                retain: false,
                topic: "t",
                id: None,
                payload: b"x"
            }))
        );
        // QoS 0 with DUP, QoS 3, id 0, a wildcard, a NUL, bad UTF-8, an empty topic.
        assert_eq!(
            decode(&[0x38, 0x04, 0x00, 0x01, b't', b'x']),
            Err(Error::DupWithoutQos)
        );
        assert_eq!(
            decode(&[0x36, 0x05, 0x00, 0x01, b't', 0, 1]),
            Err(Error::BadQos(3))
        );
        assert_eq!(
            decode(&[0x32, 0x05, 0x00, 0x01, b't', 0, 0]),
            Err(Error::PacketIdZero)
        );
        assert_eq!(
            decode(&[0x30, 0x03, 0x00, 0x01, b'#']),
            Err(Error::BadTopic)
        );
        assert_eq!(decode(&[0x30, 0x03, 0x00, 0x01, 0]), Err(Error::BadString));
        assert_eq!(
            decode(&[0x30, 0x03, 0x00, 0x01, 0xff]),
            Err(Error::BadString)
        );
        assert_eq!(decode(&[0x30, 0x02, 0x00, 0x00]), Err(Error::BadTopic));
        assert_eq!(
            decode(&[0x32, 0x04, 0x00, 0x01, b't', 0]),
            Err(Error::Truncated)
        );
    }

    #[test]
    fn acks_vectors() {
        assert_eq!(
            decode(&[0x40, 0x02, 0x12, 0x34]),
            Ok(Packet::PubAck(0x1234))
        );
        assert_eq!(decode(&[0x50, 0x02, 0x00, 0x01]), Ok(Packet::PubRec(1)));
        assert_eq!(decode(&[0x62, 0x02, 0x00, 0x01]), Ok(Packet::PubRel(1)));
        assert_eq!(decode(&[0x70, 0x02, 0x00, 0x01]), Ok(Packet::PubComp(1)));
        assert_eq!(
            decode(&[0xb0, 0x02, 0xff, 0xff]),
            Ok(Packet::UnsubAck(0xffff))
        );
        // PUBREL must carry 0010 (§3.6.1), the others 0000.
        assert_eq!(
            decode(&[0x60, 0x02, 0x00, 0x01]),
            Err(Error::BadFlags { kind: 6, flags: 0 })
        );
        assert_eq!(
            decode(&[0x42, 0x02, 0x00, 0x01]),
            Err(Error::BadFlags { kind: 4, flags: 2 })
        );
        assert_eq!(decode(&[0x40, 0x02, 0x00, 0x00]), Err(Error::PacketIdZero));
        assert_eq!(
            decode(&[0x40, 0x01, 0x00]),
            Err(Error::BadLength { kind: 4, len: 1 })
        );
        for (p, b) in [
            (Packet::PubAck(7), [0x40, 2, 0, 7]),
            (Packet::PubRec(7), [0x50, 2, 0, 7]),
            (Packet::PubRel(7), [0x62, 2, 0, 7]),
            (Packet::PubComp(7), [0x70, 2, 0, 7]),
            (Packet::UnsubAck(7), [0xb0, 2, 0, 7]),
        ] {
            assert_eq!(enc(&p), b);
        }
        assert_eq!(
            Packet::PubAck(0).encode(&mut Vec::new()),
            Err(Error::PacketIdZero)
        );
    }

    #[test]
    fn subscribe_vectors() {
        // §3.8: id 1, "a/b" QoS 1, "c/#" QoS 0.
        let bytes = [
            0x82, 0x0e, 0x00, 0x01, 0x00, 0x03, b'a', b'/', b'b', 0x01, 0x00, 0x03, b'c', b'/',
            b'#', 0x00,
        ];
        let mut out = Vec::new();
        subscribe(
            1,
            &[("a/b", QoS::AtLeastOnce), ("c/#", QoS::AtMostOnce)],
            &mut out,
        )
        .unwrap();
        assert_eq!(out, bytes);
        let Ok(p @ Packet::Subscribe { id: 1, filters }) = decode(&bytes) else {
            panic!("a SUBSCRIBE")
        };
        assert_eq!(
            filters.iter().collect::<Vec<_>>(),
            [
                ("a/b", Some(QoS::AtLeastOnce)),
                ("c/#", Some(QoS::AtMostOnce))
            ]
        );
        assert_eq!(enc(&p), bytes);
        // Flags 0000, no entries, a requested QoS byte with reserved bits, id 0.
        let mut b = bytes;
        b[0] = 0x80;
        assert_eq!(decode(&b), Err(Error::BadFlags { kind: 8, flags: 0 }));
        assert_eq!(decode(&[0x82, 0x02, 0x00, 0x01]), Err(Error::EmptyList));
        let mut b = bytes;
        b[9] = 0x05;
        assert_eq!(decode(&b), Err(Error::BadQos(5)));
        assert_eq!(
            subscribe(0, &[("a", QoS::AtLeastOnce)], &mut Vec::new()),
            Err(Error::PacketIdZero)
        );
        assert_eq!(subscribe(1, &[], &mut Vec::new()), Err(Error::EmptyList));
    }

    #[test]
    fn suback_vectors() {
        assert_eq!(
            decode(&[0x90, 0x05, 0x00, 0x02, 0x01, 0x00, 0x80]),
            Ok(Packet::SubAck {
                id: 2,
                codes: &[1, 0, 0x80]
            })
        );
        assert_eq!(
            decode(&[0x90, 0x03, 0x00, 0x02, 0x03]),
            Err(Error::BadSubAckCode(3))
        );
        assert_eq!(decode(&[0x90, 0x02, 0x00, 0x02]), Err(Error::EmptyList));
        assert_eq!(
            enc(&Packet::SubAck { id: 2, codes: &[1] }),
            [0x90, 0x03, 0x00, 0x02, 0x01]
        );
    }

    #[test]
    fn unsubscribe_vectors() {
        // §3.10: id 3, "a/b".
        let bytes = [0xa2, 0x07, 0x00, 0x03, 0x00, 0x03, b'a', b'/', b'b'];
        let mut out = Vec::new();
        unsubscribe(3, &["a/b"], &mut out).unwrap();
        assert_eq!(out, bytes);
        let Ok(p @ Packet::Unsubscribe { id: 3, filters }) = decode(&bytes) else {
            panic!("an UNSUBSCRIBE")
        };
        assert_eq!(filters.iter().collect::<Vec<_>>(), [("a/b", None)]);
        assert_eq!(enc(&p), bytes);
        assert_eq!(decode(&[0xa2, 0x02, 0x00, 0x03]), Err(Error::EmptyList));
    }

    #[test]
    fn empty_packets() {
        assert_eq!(decode(&[0xc0, 0x00]), Ok(Packet::PingReq));
        assert_eq!(decode(&[0xd0, 0x00]), Ok(Packet::PingResp));
        assert_eq!(decode(&[0xe0, 0x00]), Ok(Packet::Disconnect));
        assert_eq!(enc(&Packet::PingReq), [0xc0, 0]);
        assert_eq!(enc(&Packet::PingResp), [0xd0, 0]);
        assert_eq!(enc(&Packet::Disconnect), [0xe0, 0]);
        assert_eq!(
            decode(&[0xc0, 0x01, 0x00]),
            Err(Error::BadLength { kind: 12, len: 1 })
        );
        assert_eq!(
            decode(&[0xe1, 0x00]),
            Err(Error::BadFlags { kind: 14, flags: 1 })
        );
        // What only a client sends is refused from a broker, after the header's checks.
        for frame in [&[0xc0, 0x00][..], &[0xe0, 0x00], &[0x82, 0x02, 0x00, 0x01]] {
            assert!(decode(frame).is_ok() || frame[0] == 0x82, "{frame:?}");
            let t = frame[0] >> 4;
            assert_eq!(decode_from_broker(frame), Err(Error::FromClient(t)));
        }
        assert_eq!(
            decode_from_broker(&[0xc1, 0x00]),
            Err(Error::BadFlags { kind: 12, flags: 1 })
        );
        assert_eq!(decode_from_broker(&[0xd0, 0x00]), Ok(Packet::PingResp));
        assert_eq!(decode(&[0x00, 0x00]), Err(Error::ReservedType(0)));
        assert_eq!(decode(&[0xf0, 0x00]), Err(Error::ReservedType(15)));
        assert_eq!(decode(&[]), Err(Error::Truncated));
        assert_eq!(decode(&[0xc0]), Err(Error::Truncated));
        assert_eq!(decode(&[0xc0, 0x00, 0x00]), Err(Error::Truncated));
    }

    #[test]
    fn remaining_length_vectors() {
        // The table of MQTT 3.1.1 §2.2.3.
        for (bytes, v) in [
            (&[0x00][..], 0),
            (&[0x7f][..], 127),
            (&[0x80, 0x01][..], 128),
            (&[0xff, 0x7f][..], 16_383),
            (&[0x80, 0x80, 0x01][..], 16_384),
            (&[0xff, 0xff, 0x7f][..], 2_097_151),
            (&[0x80, 0x80, 0x80, 0x01][..], 2_097_152),
            (&[0xff, 0xff, 0xff, 0x7f][..], MAX_REMAINING),
        ] {
            assert_eq!(remaining_length(bytes), Ok(Some((v, bytes.len()))));
            let mut out = Vec::new();
            header(&mut out, 0x30, v).unwrap();
            assert_eq!(&out[1..], bytes);
        }
        assert_eq!(remaining_length(&[0x80, 0x80]), Ok(None));
        assert_eq!(
            remaining_length(&[0xff, 0xff, 0xff, 0xff, 0x01]),
            Err(Error::RemainingLength)
        );
        assert!(header(&mut Vec::new(), 0x30, MAX_REMAINING + 1).is_err());
    }

    #[test]
    fn splitter_cap_and_errors() {
        // The size is known, and refused, as soon as the remaining length is whole.
        let mut s = Splitter::new(8);
        s.push(&[0x30]);
        assert_eq!(s.next_frame(), Ok(None));
        s.push(&[0x87]);
        assert_eq!(s.next_frame(), Ok(None));
        s.push(&[0x01]);
        assert_eq!(s.next_frame(), Err(Error::TooLarge { len: 138, cap: 8 }));
        s.clear();
        s.push(&[0x30, 0x06, 0, 1, b't', 1, 2, 3]);
        assert_eq!(
            s.next_frame(),
            Ok(Some(&[0x30, 0x06, 0, 1, b't', 1, 2, 3][..]))
        );
        s.push(&[0x30, 0x07]);
        assert_eq!(s.next_frame(), Err(Error::TooLarge { len: 9, cap: 8 }));
        let mut s = Splitter::new(1 << 20);
        s.push(&[0x30, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(s.next_frame(), Err(Error::RemainingLength));
    }

    #[test]
    fn splitter_any_chunking() {
        let mut stream = Vec::new();
        let frames: Vec<Vec<u8>> = vec![
            vec![0x20, 0x02, 0x00, 0x00],
            vec![0x90, 0x03, 0x00, 0x01, 0x01],
            vec![
                0x32, 0x09, 0x00, 0x03, b'a', b'/', b'b', 0x00, 0x0a, b'h', b'i',
            ],
            vec![0xd0, 0x00],
        ];
        for f in &frames {
            stream.extend_from_slice(f);
        }
        for size in 1..=stream.len() {
            let mut s = Splitter::new(64);
            let mut got = Vec::new();
            for chunk in stream.chunks(size) {
                s.push(chunk);
                while let Some(f) = s.next_frame().unwrap() {
                    assert!(decode(f).is_ok());
                    got.push(f.to_vec());
                }
            }
            assert_eq!(got, frames, "chunks of {size}");
            assert_eq!(s.pending(), 0);
        }
    }

    fn topic() -> impl Strategy<Value = String> {
        "[a-z0-9/_ é]{1,20}"
    }

    fn qos() -> impl Strategy<Value = QoS> {
        prop_oneof![
            Just(QoS::AtMostOnce),
            Just(QoS::AtLeastOnce),
            Just(QoS::ExactlyOnce)
        ]
    }

    proptest! {
        #[test]
        fn publish_round_trip(
            t in topic(), q in qos(), dup: bool, retain: bool, id in 1u16..,
            payload in proptest::collection::vec(any::<u8>(), 0..300),
            chunk in 1usize..64,
        ) {
            let p = Publish {
                dup: dup && q != QoS::AtMostOnce,
                qos: q,
                retain,
                topic: &t,
                id: (q != QoS::AtMostOnce).then_some(id),
                payload: &payload,
            };
            let mut out = Vec::new();
            publish(&p, &mut out).unwrap();
            prop_assert_eq!(decode(&out), Ok(Packet::Publish(p)));
            let mut s = Splitter::new(1024);
            let mut n = 0;
            for c in out.chunks(chunk) {
                s.push(c);
                while let Some(f) = s.next_frame().unwrap() {
                    prop_assert_eq!(f, &out[..]);
                    n += 1;
                }
            }
            prop_assert_eq!(n, 1);
        }

        #[test]
        fn subscribe_round_trip(
            id in 1u16..,
            fs in proptest::collection::vec((topic(), qos()), 1..8),
        ) {
            let list: Vec<(&str, QoS)> = fs.iter().map(|(t, q)| (t.as_str(), *q)).collect();
            let mut out = Vec::new();
            subscribe(id, &list, &mut out).unwrap();
            let p = decode(&out).unwrap();
            let Packet::Subscribe { id: got, filters } = p else { panic!("a SUBSCRIBE") };
            prop_assert_eq!(got, id);
            let back: Vec<(&str, QoS)> = filters.iter().map(|(t, q)| (t, q.unwrap())).collect();
            prop_assert_eq!(back, list.clone());
            prop_assert_eq!(enc(&p), out);
            let names: Vec<&str> = list.iter().map(|(t, _)| *t).collect();
            let mut u = Vec::new();
            unsubscribe(id, &names, &mut u).unwrap();
            let Ok(Packet::Unsubscribe { filters, .. }) = decode(&u) else { panic!("an UNSUBSCRIBE") };
            prop_assert_eq!(filters.iter().map(|(t, _)| t).collect::<Vec<_>>(), names);
        }

        #[test]
        fn connect_round_trip(
            cid in "[a-zA-Z0-9_]{0,23}", clean: bool, ka: u16,
            will in proptest::option::of((topic(), proptest::collection::vec(any::<u8>(), 0..20), qos(), any::<bool>())),
            user in proptest::option::of("[a-z]{0,8}"),
            pass in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..8)),
        ) {
            let c = Connect {
                client_id: &cid,
                clean_session: clean,
                keep_alive: ka,
                will: will.as_ref().map(|(t, m, q, r)| Will { topic: t, message: m, qos: *q, retain: *r }),
                username: user.as_deref(),
                password: if user.is_some() { pass.as_deref() } else { None },
            };
            let mut out = Vec::new();
            connect(&c, &mut out).unwrap();
            prop_assert_eq!(decode(&out), Ok(Packet::Connect(c)));
        }

        #[test]
        fn any_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode(&bytes);
            let mut s = Splitter::new(32);
            s.push(&bytes);
            while let Ok(Some(f)) = s.next_frame() {
                if let Ok(p) = decode(f) {
                    let mut out = Vec::new();
                    p.encode(&mut out).unwrap();
                    prop_assert_eq!(decode(&out), Ok(p));
                }
            }
        }
    }
}
