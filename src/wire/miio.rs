//! The 32-byte miio header, its control packets and sealed JSON payloads (PROTOCOL.md §2).
//!
//! Contract: [`Packet::new_checked`] does steps 1–3 of the validation order of P§2.7 (size, magic,
//! length field); after it no accessor can panic. [`open`] does step 5 in order (did, MD5, payload
//! length, decrypt, unpad, cut at the first NUL, UTF-8, JSON object). The first failing step is the
//! [`Error`] returned, and its `Display` is the vendor log text where the spec gives one. Step 4
//! (control packets) is the caller's: see [`Packet::is_control`]. [`seal`] builds a data packet with
//! exactly one NUL after the JSON (D3). Nothing here does I/O or panics on any input.

use core::fmt;

use serde_json::{Map, Value};

use super::crypto::{md5, Keys};
use super::rpc;

/// Size of the header; also the size of every control packet.
pub const HEADER_LEN: usize = 32;
/// Bytes 0..2 of every packet (P§2.1).
pub const MAGIC: u16 = 0x2131;
/// The largest packet the u16 length field can describe; receive buffers hold this much (P§2.7).
pub const MAX_PACKET: usize = 65535;
/// The longest JSON text [`seal`] accepts: JSON + NUL + padding must fit in `MAX_PACKET`.
pub const MAX_SEAL_JSON: usize = 65486;

/// Byte offsets of the header fields (P§2.1).
mod field {
    use core::ops::Range;
    pub const MAGIC: Range<usize> = 0..2;
    pub const LENGTH: Range<usize> = 2..4;
    pub const UNKNOWN: Range<usize> = 4..8;
    pub const DID: Range<usize> = 8..12;
    pub const STAMP: Range<usize> = 12..16;
    /// Everything the checksum covers before the secret.
    pub const CHECKED: Range<usize> = 0..16;
    /// Bytes 4..12: all `ff` in hellos and time-sync replies (P§2.1).
    pub const IDS: Range<usize> = 4..12;
    /// Bytes 4..16: all `ff` in a LAN hello (P§4.2).
    pub const HELLO: Range<usize> = 4..16;
    pub const CHECKSUM: Range<usize> = 16..32;
    pub const PAYLOAD: usize = 32;
}

/// Why a packet was dropped: one variant per step of P§2.7, plus the TCP framing error of P§5.2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// Step 1: fewer than 32 bytes received.
    TooShort(usize),
    /// Step 2: bytes 0..2 are not `2131`.
    BadMagic,
    /// Step 3: the length field differs from the number of bytes received.
    BadLength { field: u16, actual: usize },
    /// Step 5: the did is not ours.
    DidMismatch { got: u32 },
    /// Step 5: the checksum is not MD5(header[0..16] ‖ secret ‖ payload).
    Md5Mismatch,
    /// Step 5: the payload is empty or not a multiple of 16 bytes.
    BadPayloadLength(usize),
    /// Step 5: the decrypted payload has malformed PKCS#7 padding.
    BadPadding,
    /// Step 5: the text before the first NUL is not UTF-8.
    NotUtf8,
    /// Step 5: the text is not JSON.
    NotJson,
    /// Step 5: the JSON is not an object.
    NotObject,
    /// P§5.2: a TCP stream header whose length field is below 32.
    StreamLength(u16),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::TooShort(n) => write!(
                f,
                "OT received ({n}), less than size of OT header ({HEADER_LEN})."
            ),
            Error::BadMagic => f.write_str("OT protocol version not match."),
            // The vendor text has one number; the field is the one that is wrong.
            Error::BadLength { field, actual } => write!(
                f,
                "OT packet length not correct: {field}. (received {actual})"
            ),
            Error::DidMismatch { got } => write!(f, "OT device id not match. (got {got})"),
            Error::Md5Mismatch => f.write_str("OT MD5 not match."),
            Error::BadPayloadLength(n) => {
                write!(f, "OT payload length {n} is not a positive multiple of 16.")
            }
            Error::BadPadding => f.write_str("OT padding panic"),
            Error::NotUtf8 => f.write_str("OT payload is not UTF-8."),
            Error::NotJson => f.write_str("OT payload is not JSON."),
            Error::NotObject => f.write_str("OT payload is not a JSON object."),
            Error::StreamLength(n) => {
                write!(
                    f,
                    "OT stream length field {n} is less than the header (32)."
                )
            }
        }
    }
}

impl std::error::Error for Error {}

/// A checked view of one miio packet over a byte buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Steps 1–3 of P§2.7: at least 32 bytes, magic `2131`, length field equal to the buffer length.
    pub fn new_checked(buffer: T) -> Result<Packet<T>, Error> {
        let b = buffer.as_ref();
        if b.len() < HEADER_LEN {
            return Err(Error::TooShort(b.len()));
        }
        if be16(b, field::MAGIC) != MAGIC {
            return Err(Error::BadMagic);
        }
        let len = be16(b, field::LENGTH);
        if usize::from(len) != b.len() {
            return Err(Error::BadLength {
                field: len,
                actual: b.len(),
            });
        }
        Ok(Packet { buffer })
    }

    /// The length field: the whole packet, header included.
    pub fn length(&self) -> u16 {
        be16(self.buffer.as_ref(), field::LENGTH)
    }

    /// Bytes 4..8 (`00000000` on data packets, `ffffffff` in hellos).
    pub fn unknown(&self) -> u32 {
        be32(self.buffer.as_ref(), field::UNKNOWN)
    }

    pub fn did(&self) -> u32 {
        be32(self.buffer.as_ref(), field::DID)
    }

    pub fn stamp(&self) -> u32 {
        be32(self.buffer.as_ref(), field::STAMP)
    }

    /// Bytes 16..32: MD5, or filler/token in control packets (P§2.6).
    pub fn checksum(&self) -> [u8; 16] {
        self.buffer
            .as_ref()
            .get(field::CHECKSUM)
            .and_then(|s| s.try_into().ok())
            .unwrap_or([0; 16])
    }

    /// The encrypted payload (empty in control packets).
    pub fn payload(&self) -> &[u8] {
        self.buffer.as_ref().get(field::PAYLOAD..).unwrap_or(&[])
    }

    /// A control packet has no payload (P§2.7 step 4).
    pub fn is_control(&self) -> bool {
        self.payload().is_empty()
    }

    /// Bytes 4..12 all `ff`: a hello or a time-sync reply (P§2.1, P§5.3).
    pub fn ids_all_ff(&self) -> bool {
        all_ff(self.buffer.as_ref(), field::IDS)
    }

    /// Bytes 4..16 all `ff`: a LAN hello (P§4.2). Its checksum bytes are ignored.
    pub fn is_lan_hello(&self) -> bool {
        all_ff(self.buffer.as_ref(), field::HELLO)
    }

    pub fn into_inner(self) -> T {
        self.buffer
    }
}

fn be16(b: &[u8], r: core::ops::Range<usize>) -> u16 {
    b.get(r)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u16::from_be_bytes)
}

fn be32(b: &[u8], r: core::ops::Range<usize>) -> u32 {
    b.get(r)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u32::from_be_bytes)
}

fn all_ff(b: &[u8], r: core::ops::Range<usize>) -> bool {
    b.get(r).is_some_and(|s| s.iter().all(|&x| x == 0xff))
}

/// TCP framing (P§5.2): the size of the packet at the start of `buf`, once 4 bytes are there.
pub fn stream_frame_len(buf: &[u8]) -> Result<Option<usize>, Error> {
    if buf.len() < 4 {
        return Ok(None);
    }
    if be16(buf, field::MAGIC) != MAGIC {
        return Err(Error::BadMagic);
    }
    let len = be16(buf, field::LENGTH);
    if usize::from(len) < HEADER_LEN {
        return Err(Error::StreamLength(len));
    }
    Ok(Some(usize::from(len)))
}

/// A header with the given fields and a zero checksum.
fn header(len: u16, unknown: u32, did: u32, stamp: u32) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[field::MAGIC].copy_from_slice(&MAGIC.to_be_bytes());
    h[field::LENGTH].copy_from_slice(&len.to_be_bytes());
    h[field::UNKNOWN].copy_from_slice(&unknown.to_be_bytes());
    h[field::DID].copy_from_slice(&did.to_be_bytes());
    h[field::STAMP].copy_from_slice(&stamp.to_be_bytes());
    h
}

fn set_checksum(h: &mut [u8], sum: &[u8; 16]) {
    if let Some(dst) = h.get_mut(field::CHECKSUM) {
        dst.copy_from_slice(sum);
    }
}

/// A 32-byte packet: the header fields, then 16 checksum/filler bytes.
fn control(unknown: u32, did: u32, stamp: u32, tail: &[u8; 16]) -> [u8; HEADER_LEN] {
    let mut h = header(HEADER_LEN as u16, unknown, did, stamp);
    set_checksum(&mut h, tail);
    h
}

/// The phone's LAN hello (P§2.6, V4).
pub fn lan_hello() -> [u8; HEADER_LEN] {
    control(u32::MAX, u32::MAX, u32::MAX, &[0xff; 16])
}

/// Our answer to a LAN hello (P§4.2): the token in clear only in AP mode, else `ff`×16 (D7).
pub fn lan_hello_reply(did: u32, stamp: u32, token: Option<&[u8; 16]>) -> [u8; HEADER_LEN] {
    control(0, did, stamp, token.unwrap_or(&[0xff; 16]))
}

/// The cloud hello / time-sync request, byte for byte as fake clouds expect it (P§2.6, V7).
pub fn cloud_hello() -> [u8; HEADER_LEN] {
    control(u32::MAX, u32::MAX, 0, &[0; 16])
}

/// The cloud's time-sync reply as our fake cloud sends it (P§2.6, V8).
pub fn time_sync_reply(server_time: u32) -> [u8; HEADER_LEN] {
    control(u32::MAX, u32::MAX, server_time, &[0xff; 16])
}

/// A keepalive: MD5 of the first 16 bytes ‖ secret (P§2.6, V9). A pong echoes it.
pub fn keepalive(keys: &Keys, did: u32, stamp: u32) -> [u8; HEADER_LEN] {
    let mut h = header(HEADER_LEN as u16, 0, did, stamp);
    let sum = md5(&[h.get(field::CHECKED).unwrap_or(&[]), keys.secret()]);
    set_checksum(&mut h, &sum);
    h
}

/// True when the checksum is MD5(header[0..16] ‖ secret ‖ payload) (P§2.2; pongs and pings, P§5.6).
pub fn control_md5_ok(keys: &Keys, pkt: &Packet<&[u8]>) -> bool {
    md5_ok(keys, pkt)
}

fn md5_ok<T: AsRef<[u8]>>(keys: &Keys, pkt: &Packet<T>) -> bool {
    let b = pkt.buffer.as_ref();
    let sum = md5(&[
        b.get(field::CHECKED).unwrap_or(&[]),
        keys.secret(),
        pkt.payload(),
    ]);
    sum == pkt.checksum()
}

/// A data packet carrying `json` plus exactly one NUL (D3): unknown = 0, MD5 under the secret.
///
/// Callers keep their texts far below [`MAX_SEAL_JSON`] (P§2.7, LOCAL_API.md §2). A longer text
/// cannot be framed and gives an empty Vec; use [`seal_checked`] to see that case.
pub fn seal(keys: &Keys, did: u32, stamp: u32, json: &[u8]) -> Vec<u8> {
    seal_checked(keys, did, stamp, json).unwrap_or_default()
}

/// [`seal`], or None when `json` is longer than [`MAX_SEAL_JSON`].
pub fn seal_checked(keys: &Keys, did: u32, stamp: u32, json: &[u8]) -> Option<Vec<u8>> {
    if json.len() > MAX_SEAL_JSON {
        return None;
    }
    seal_into(keys, did, stamp, json, true)
}

/// Encrypts `plain` as given, without adding a NUL. Real peers (python-miio, V1–V3) send such
/// payloads; the daemon itself always uses [`seal`]. None when the packet would exceed 65535 bytes.
pub fn seal_raw(keys: &Keys, did: u32, stamp: u32, plain: &[u8]) -> Option<Vec<u8>> {
    seal_into(keys, did, stamp, plain, false)
}

/// The packet in one buffer: header, then `plain` (and the NUL) padded and encrypted in place, then
/// the checksum, computed over one contiguous slice with the secret standing where it goes.
fn seal_into(keys: &Keys, did: u32, stamp: u32, plain: &[u8], nul: bool) -> Option<Vec<u8>> {
    let text = plain.len() + usize::from(nul);
    // The padding adds 1..=16 bytes.
    let len = u16::try_from(HEADER_LEN + text + 16 - text % 16).ok()?;
    let mut out = Vec::with_capacity(usize::from(len));
    out.extend_from_slice(&header(len, 0, did, stamp));
    out.extend_from_slice(plain);
    if nul {
        out.push(0);
    }
    keys.encrypt_tail(&mut out, HEADER_LEN);
    // P§2.2: MD5(header[0..16] ‖ secret ‖ payload), and the secret's place is the checksum's.
    set_checksum(&mut out, keys.secret());
    let sum = md5(&[&out]);
    set_checksum(&mut out, &sum);
    Some(out)
}

/// The decrypted payload of a data packet.
#[derive(Debug, Clone, PartialEq)]
pub struct Opened {
    /// The plaintext up to the first NUL: what is forwarded verbatim (D6).
    pub text: String,
    /// That text parsed.
    pub value: Map<String, Value>,
}

/// [`open`] without the tree: the text and its [`rpc::Head`], from one scan of the plaintext. The
/// path of reports and acks, which read nothing else (ARCHITECTURE.md §6).
pub struct Scanned {
    pub text: String,
    pub head: rpc::Head,
}

/// [`open`] checked the same way, without building the tree.
pub fn open_scanned(keys: &Keys, our_did: u32, pkt: &Packet<&[u8]>) -> Result<Scanned, Error> {
    let mut buf = Vec::new();
    let (text, head) = open_scanned_in(keys, our_did, pkt, &mut buf)?;
    Ok(Scanned {
        text: text.to_owned(),
        head,
    })
}

/// [`open_scanned`] in `buf`, a buffer its caller reuses (its contents are replaced): the text
/// is borrowed from it, so a packet opened this way allocates nothing once `buf` has grown.
pub fn open_scanned_in<'b>(
    keys: &Keys,
    our_did: u32,
    pkt: &Packet<&[u8]>,
    buf: &'b mut Vec<u8>,
) -> Result<(&'b str, rpc::Head), Error> {
    open_text_in(keys, our_did, pkt, buf)?;
    let text = core::str::from_utf8(buf).map_err(|_| Error::NotUtf8)?;
    match rpc::scan_str(text) {
        Ok(head) => Ok((text, head)),
        Err(rpc::RpcError::NotObject) => Err(Error::NotObject),
        Err(rpc::RpcError::Parse) => Err(Error::NotJson),
    }
}

/// Steps 5a-g of P§2.7 up to the text: did, MD5, payload length, decrypt, unpad, NUL, UTF-8.
fn open_text(keys: &Keys, our_did: u32, pkt: &Packet<&[u8]>) -> Result<String, Error> {
    let mut plain = Vec::new();
    open_text_in(keys, our_did, pkt, &mut plain)?;
    String::from_utf8(plain).map_err(|_| Error::NotUtf8)
}

/// [`open_text`] up to the UTF-8 check, the bytes left in `plain` (its contents replaced).
fn open_text_in(
    keys: &Keys,
    our_did: u32,
    pkt: &Packet<&[u8]>,
    plain: &mut Vec<u8>,
) -> Result<(), Error> {
    if pkt.did() != our_did {
        return Err(Error::DidMismatch { got: pkt.did() });
    }
    // One copy of the packet, checked and opened in place: the secret stands where the checksum
    // was, so MD5(header[0..16] ‖ secret ‖ payload) is one slice (P§2.2), then the payload is
    // decrypted behind the header.
    plain.clear();
    plain.extend_from_slice(pkt.buffer);
    set_checksum(plain, keys.secret());
    if md5(&[plain]) != pkt.checksum() {
        return Err(Error::Md5Mismatch);
    }
    keys.decrypt_tail(plain, field::PAYLOAD)?;
    plain.drain(..field::PAYLOAD.min(plain.len()));
    if let Some(nul) = plain.iter().position(|&b| b == 0) {
        plain.truncate(nul);
    }
    Ok(())
}

/// Step 5 of P§2.7, in order: did, MD5, payload length, decrypt, unpad, cut at the first NUL
/// (bytes after it are ignored, P§2.4), UTF-8, JSON object.
pub fn open(keys: &Keys, our_did: u32, pkt: &Packet<&[u8]>) -> Result<Opened, Error> {
    let text = open_text(keys, our_did, pkt)?;
    // The one parser of local messages too: valid JSON that a serde Value cannot hold (`1e400`)
    // is still an object, so a LAN or cloud command goes on byte for byte (P§3).
    match rpc::parse_object(text.as_bytes()) {
        Ok(value) => Ok(Opened { text, value }),
        Err(rpc::RpcError::NotObject) => Err(Error::NotObject),
        Err(rpc::RpcError::Parse) => Err(Error::NotJson),
    }
}

/// [`Packet::new_checked`] then [`open`], for a buffer that must hold a data packet.
pub fn decode(keys: &Keys, our_did: u32, buf: &[u8]) -> Result<Opened, Error> {
    open(keys, our_did, &Packet::new_checked(buf)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    const DID: u32 = 1234567;

    /// The hex of one vector from tests/vectors/miio.txt.
    fn vector(name: &str) -> &'static str {
        include_str!("../../tests/vectors/miio.txt")
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no vector {name}"))
    }
    const CLOUD_KEY: &[u8; 16] = b"YWJjZGVmZ2hpamts";
    const TOKEN: &[u8; 16] = b"ABCDEFGHIJKLMNOP";

    const V1_PLAIN: &str = r#"{"partner_id":"","params":{"hw_ver":"Linux","fw_ver":"3.3.9_003094","ap":{"ssid":"WIFI","bssid":"00:11:22:33:44:55","rssi":-46},"netif":{"localIp":"10.0.0.122","mask":"255.255.255.0","gw":"10.0.0.254"},"model":"rockrobo.vacuum.v1","mac":"11:11:11:22:22:ED","token":"784ba0e9bc3542ce69fe744012564c08","life":12345},"id":1234567,"method":"_otc.info"}"#;
    const V3_PLAIN: &str = r#"{"id":1,"method":"miIO.info","params":[]}"#;
    const V10_PLAIN: &str = r#"{"id": 12, "method": "miIO.info", "params": []}"#;
    const V11_PLAIN: &str = r#"{"id":12,"result":["on"]}"#;
    const V12_PLAIN: &str = r#"{"id":1001,"method":"props","params":{"ota_state":"idle"}}"#;
    const V13_PLAIN: &str = r#"{"id":1001,"result":"ok"}"#;
    const V14_PLAIN: &str = r#"{"id":12345678,"result":["ok"]}"#;

    /// A packet with a correct MD5 around an arbitrary ciphertext, for the late failure steps.
    fn with_ct(keys: &Keys, did: u32, ct: &[u8]) -> Vec<u8> {
        let mut out = header((HEADER_LEN + ct.len()) as u16, 0, did, 7).to_vec();
        out.extend_from_slice(ct);
        let sum = md5(&[&out[..16], keys.secret(), ct]);
        out[16..32].copy_from_slice(&sum);
        out
    }

    #[test]
    fn v1_cloud_otc_info() {
        let keys = Keys::new(CLOUD_KEY);
        assert_eq!(V1_PLAIN.len() % 16, 12, "PKCS#7 pad 04x4");
        let pkt = seal_raw(&keys, DID, 0x5a9b239d, V1_PLAIN.as_bytes()).unwrap();
        assert_eq!(pkt, hex(vector("V1")));
        let got = decode(&keys, DID, &hex(vector("V1"))).unwrap();
        assert_eq!(got.text, V1_PLAIN);
        assert_eq!(got.value["id"], json!(1234567));
    }

    #[test]
    fn valid_json_beyond_serde_is_opened_verbatim() {
        // P§3: valid JSON is forwarded byte for byte, even where a serde Value cannot hold a member.
        let keys = Keys::new(CLOUD_KEY);
        let big = "1".repeat(400);
        let plain = format!(r#"{{"id":77,"method":"get_prop","params":[1e400,{big}]}}"#);
        let got = decode(&keys, DID, &seal(&keys, DID, 7, plain.as_bytes())).unwrap();
        assert_eq!(got.text, plain);
        assert_eq!(got.value["id"], json!(77));
        assert_eq!(got.value["method"], json!("get_prop"));
        let bad = seal(&keys, DID, 7, br#"{"id":77,"params":[1e400,]}"#);
        assert!(matches!(decode(&keys, DID, &bad), Err(Error::NotJson)));
    }

    #[test]
    fn v2_python_miio() {
        let keys = Keys::new(&[0; 16]);
        let pkt = seal_raw(&keys, 0x01234567, 0, br#"{"id": 123456}"#).unwrap();
        assert_eq!(pkt, hex(vector("V2")));
        let got = decode(&keys, 0x01234567, &pkt).unwrap();
        assert_eq!(got.value["id"], json!(123456));
    }

    #[test]
    fn v3_nul_changes_only_last_block() {
        let token: [u8; 16] = hex("00112233445566778899aabbccddeeff").try_into().unwrap();
        let keys = Keys::new(&token);
        let raw = seal_raw(&keys, 0x12345678, 0x5f5e1000, V3_PLAIN.as_bytes()).unwrap();
        assert_eq!(raw, hex(vector("V3_NO_NUL")));
        let sealed = seal(&keys, 0x12345678, 0x5f5e1000, V3_PLAIN.as_bytes());
        assert_eq!(sealed, hex(vector("V3_NUL")));
        assert_eq!(raw[32..64], sealed[32..64]);
        assert_ne!(raw[64..], sealed[64..]);
        // Both forms are accepted and give the same text (D3).
        for v in [vector("V3_NO_NUL"), vector("V3_NUL")] {
            assert_eq!(decode(&keys, 0x12345678, &hex(v)).unwrap().text, V3_PLAIN);
        }
    }

    #[test]
    fn v4_to_v9_control_packets() {
        assert_eq!(lan_hello().to_vec(), hex(vector("V4")));
        assert_eq!(
            lan_hello_reply(DID, 0x5a9b239d, None).to_vec(),
            hex(vector("V5"))
        );
        assert_eq!(
            lan_hello_reply(DID, 0x5a9b239d, Some(TOKEN)).to_vec(),
            hex(vector("V6"))
        );
        assert_eq!(cloud_hello().to_vec(), hex(vector("V7")));
        assert_eq!(time_sync_reply(0x5a9b239d).to_vec(), hex(vector("V8")));
        let keys = Keys::new(CLOUD_KEY);
        let ka = keepalive(&keys, DID, 0x5a9b239d);
        assert_eq!(ka.to_vec(), hex(vector("V9")));

        let ka = Packet::new_checked(&ka[..]).unwrap();
        assert!(ka.is_control() && !ka.ids_all_ff() && !ka.is_lan_hello());
        assert!(control_md5_ok(&keys, &ka));
        assert!(!control_md5_ok(&Keys::new(TOKEN), &ka));

        let v4 = hex(vector("V4"));
        let hello = Packet::new_checked(&v4[..]).unwrap();
        assert!(hello.is_control() && hello.is_lan_hello() && hello.ids_all_ff());

        let v8 = hex(vector("V8"));
        let ts = Packet::new_checked(&v8[..]).unwrap();
        assert!(ts.ids_all_ff() && !ts.is_lan_hello());
        assert_eq!(ts.stamp(), 0x5a9b239d);
        // The filler of a time-sync reply is no MD5 (its checksum is not checked, P§5.3).
        assert!(!control_md5_ok(&keys, &ts));

        // V7 echoed back: looks like a time-sync reply but carries stamp 0 (negative vector).
        let v7 = hex(vector("V7"));
        let echo = Packet::new_checked(&v7[..]).unwrap();
        assert!(echo.ids_all_ff() && echo.stamp() == 0 && !echo.is_lan_hello());
    }

    #[test]
    fn accessors() {
        let v5 = hex(vector("V5"));
        let p = Packet::new_checked(&v5[..]).unwrap();
        assert_eq!(p.length(), 32);
        assert_eq!(p.unknown(), 0);
        assert_eq!(p.did(), DID);
        assert_eq!(p.stamp(), 0x5a9b239d);
        assert_eq!(p.checksum(), [0xff; 16]);
        assert_eq!(p.payload(), &[] as &[u8]);
        assert_eq!(p.into_inner(), &v5[..]);
        let v4 = hex(vector("V4"));
        assert_eq!(Packet::new_checked(&v4[..]).unwrap().unknown(), u32::MAX);
    }

    #[test]
    fn v10_to_v14_round_trip() {
        let token = Keys::new(TOKEN);
        let cloud = Keys::new(CLOUD_KEY);
        let cases: [(&Keys, u32, &str, &str); 5] = [
            (&token, 0x5a9b239e, V10_PLAIN, vector("V10")),
            (&token, 0x5a9b239f, V11_PLAIN, vector("V11")),
            (&cloud, 0x5a9b23a0, V12_PLAIN, vector("V12")),
            (&cloud, 0x5a9b23a0, V13_PLAIN, vector("V13")),
            (&cloud, 0x5a9b23a1, V14_PLAIN, vector("V14")),
        ];
        for (keys, stamp, plain, vector) in cases {
            let sealed = seal(keys, DID, stamp, plain.as_bytes());
            assert_eq!(sealed, hex(vector), "{plain}");
            let opened = decode(keys, DID, &hex(vector)).unwrap();
            assert_eq!(opened.text, plain);
            let want: Value = serde_json::from_str(plain).unwrap();
            assert_eq!(Value::Object(opened.value), want);
        }
        // V14: 31 bytes + NUL is block-aligned, so a whole pad block follows.
        assert_eq!(V14_PLAIN.len() + 1, 32);
        assert_eq!(hex(vector("V14")).len(), 32 + 48);
        let plain = cloud.decrypt(&hex(vector("V14"))[32..]).unwrap();
        assert_eq!(plain.len(), 32);
    }

    #[test]
    fn v15_tcp_stream() {
        let mut stream = hex(vector("V13"));
        stream.extend_from_slice(&hex(vector("V9")));
        assert_eq!(stream.len(), 96);
        let keys = Keys::new(CLOUD_KEY);
        for n in 0..4 {
            assert_eq!(stream_frame_len(&stream[..n]), Ok(None));
        }
        let first = stream_frame_len(&stream).unwrap().unwrap();
        assert_eq!(first, 64);
        assert_eq!(
            decode(&keys, DID, &stream[..first]).unwrap().text,
            V13_PLAIN
        );
        let rest = &stream[first..];
        let second = stream_frame_len(rest).unwrap().unwrap();
        assert_eq!(second, 32);
        let ka = Packet::new_checked(&rest[..second]).unwrap();
        assert!(ka.is_control() && control_md5_ok(&keys, &ka));
        assert!(rest[second..].is_empty());

        assert_eq!(stream_frame_len(&[0x21, 0x32, 0, 32]), Err(Error::BadMagic));
        assert_eq!(
            stream_frame_len(&[0x21, 0x31, 0, 31]),
            Err(Error::StreamLength(31))
        );
        assert_eq!(
            stream_frame_len(&[0x21, 0x31, 0, 0]),
            Err(Error::StreamLength(0))
        );
        assert_eq!(stream_frame_len(&[0x21, 0x31, 0xff, 0xff]), Ok(Some(65535)));
    }

    #[test]
    fn cloud_negative_vectors() {
        let keys = Keys::new(CLOUD_KEY);
        let v12 = hex(vector("V12"));

        let mut flipped = v12.clone();
        flipped[40] ^= 1;
        assert_eq!(decode(&keys, DID, &flipped), Err(Error::Md5Mismatch));

        let mut other_did = v12.clone();
        other_did[8..12].copy_from_slice(&hex("0012d688"));
        assert_eq!(
            decode(&keys, DID, &other_did),
            Err(Error::DidMismatch { got: 0x0012d688 })
        );

        let mut bad_len = v12.clone();
        bad_len[2..4].copy_from_slice(&hex("0061"));
        assert_eq!(
            decode(&keys, DID, &bad_len),
            Err(Error::BadLength {
                field: 0x61,
                actual: 96
            })
        );

        assert_eq!(
            decode(&keys, DID, &v12[..40]),
            Err(Error::BadLength {
                field: 0x60,
                actual: 40
            })
        );

        // The cloud key is refused on the LAN (and vice versa) by the MD5 check.
        assert_eq!(
            decode(&Keys::new(TOKEN), DID, &v12),
            Err(Error::Md5Mismatch)
        );
    }

    #[test]
    fn lan_negative_vectors() {
        let keys = Keys::new(TOKEN);
        let v10 = hex(vector("V10"));

        let mut flipped = v10.clone();
        flipped[95] ^= 0x80;
        assert_eq!(decode(&keys, DID, &flipped), Err(Error::Md5Mismatch));

        let mut other_did = v10.clone();
        other_did[8..12].copy_from_slice(&hex("0012d688"));
        assert_eq!(
            decode(&keys, DID, &other_did),
            Err(Error::DidMismatch { got: 0x0012d688 })
        );

        let mut bad_len = v10.clone();
        bad_len[2..4].copy_from_slice(&hex("0061"));
        assert!(matches!(
            decode(&keys, DID, &bad_len),
            Err(Error::BadLength { field: 0x61, .. })
        ));

        assert_eq!(
            decode(&keys, DID, &v10[..40]),
            Err(Error::BadLength {
                field: 0x60,
                actual: 40
            })
        );
        assert_eq!(decode(&keys, DID, &v10[..31]), Err(Error::TooShort(31)));
        assert_eq!(decode(&keys, DID, &[]), Err(Error::TooShort(0)));

        let mut big = v10.clone();
        big.resize(65507, 0);
        assert_eq!(
            decode(&keys, DID, &big),
            Err(Error::BadLength {
                field: 0x60,
                actual: 65507
            })
        );

        let mut magic = v10.clone();
        magic[1] = 0x32;
        assert_eq!(decode(&keys, DID, &magic), Err(Error::BadMagic));
    }

    #[test]
    fn order_of_checks() {
        let keys = Keys::new(TOKEN);
        // Magic before length; did before MD5.
        let mut p = hex(vector("V10"));
        p[0] = 0;
        p[3] = 0;
        assert_eq!(decode(&keys, DID, &p), Err(Error::BadMagic));
        let mut p = hex(vector("V10"));
        p[8] ^= 1;
        p[40] ^= 1;
        assert!(matches!(
            decode(&keys, DID, &p),
            Err(Error::DidMismatch { .. })
        ));
        // A control packet opened as data fails at the payload length, after did and MD5.
        let ka = keepalive(&keys, DID, 5);
        assert_eq!(decode(&keys, DID, &ka), Err(Error::BadPayloadLength(0)));
        assert_eq!(
            decode(&keys, DID + 1, &ka),
            Err(Error::DidMismatch { got: DID })
        );
    }

    #[test]
    fn late_steps() {
        let keys = Keys::new(TOKEN);
        let fail = |ct: &[u8]| decode(&keys, DID, &with_ct(&keys, DID, ct));
        assert_eq!(fail(&[0; 17]), Err(Error::BadPayloadLength(17)));
        let two = keys.encrypt(b"0123456789abcde\x07");
        assert_eq!(fail(&two[..16]), Err(Error::BadPadding));
        assert_eq!(
            fail(&keys.encrypt(&[0xff, 0xfe, b'{'])),
            Err(Error::NotUtf8)
        );
        assert_eq!(fail(&keys.encrypt(b"hello")), Err(Error::NotJson));
        assert_eq!(fail(&keys.encrypt(b"{\"id\":1}x")), Err(Error::NotJson));
        assert_eq!(fail(&keys.encrypt(b"[1,2]")), Err(Error::NotObject));
        assert_eq!(fail(&keys.encrypt(b"\"s\"\0")), Err(Error::NotObject));
        // Garbage after the first NUL is ignored (P§2.4), even bytes that are not UTF-8.
        let ok = fail(&keys.encrypt(b"{\"id\":1}\0\xff\xfe{junk")).unwrap();
        assert_eq!(ok.text, "{\"id\":1}");
        // An empty text is not JSON.
        assert_eq!(fail(&keys.encrypt(b"\0{}")), Err(Error::NotJson));
        // `\/` is accepted (P§3).
        let ok = fail(&keys.encrypt(br#"{"tz":"Asia\/Shanghai"}"#)).unwrap();
        assert_eq!(ok.value["tz"], json!("Asia/Shanghai"));
    }

    #[test]
    fn largest_length_field() {
        let keys = Keys::new(TOKEN);
        let mut buf = vec![0u8; MAX_PACKET];
        buf[..4].copy_from_slice(&[0x21, 0x31, 0xff, 0xff]);
        let p = Packet::new_checked(&buf[..]).unwrap();
        assert_eq!(p.length(), 65535);
        assert_eq!(p.payload().len(), 65503);
        assert!(!p.is_control());
        assert_eq!(decode(&keys, 0, &buf), Err(Error::Md5Mismatch));
        // With a correct MD5 the odd payload length is the failure.
        let sum = md5(&[&buf[..16], keys.secret(), &buf[32..]]);
        buf[16..32].copy_from_slice(&sum);
        assert_eq!(decode(&keys, 0, &buf), Err(Error::BadPayloadLength(65503)));
        // One byte more cannot be described by the field.
        buf.push(0);
        assert!(matches!(
            Packet::new_checked(&buf[..]),
            Err(Error::BadLength {
                field: 65535,
                actual: 65536
            })
        ));
    }

    #[test]
    fn seal_limits() {
        let keys = Keys::new(TOKEN);
        let json = vec![b' '; MAX_SEAL_JSON];
        let pkt = seal_checked(&keys, DID, 1, &json).unwrap();
        assert!(pkt.len() <= MAX_PACKET && pkt.len() + 16 > MAX_PACKET);
        assert!(Packet::new_checked(&pkt[..]).is_ok());
        let json = vec![b' '; MAX_SEAL_JSON + 1];
        assert_eq!(seal_checked(&keys, DID, 1, &json), None);
        assert!(seal(&keys, DID, 1, &json).is_empty());
    }

    #[test]
    fn display_texts() {
        assert_eq!(
            Error::TooShort(31).to_string(),
            "OT received (31), less than size of OT header (32)."
        );
        assert_eq!(
            Error::BadMagic.to_string(),
            "OT protocol version not match."
        );
        assert!(Error::BadLength {
            field: 97,
            actual: 96
        }
        .to_string()
        .starts_with("OT packet length not correct: 97."));
        assert!(Error::DidMismatch { got: 1 }
            .to_string()
            .starts_with("OT device id not match."));
        assert_eq!(Error::Md5Mismatch.to_string(), "OT MD5 not match.");
        assert_eq!(Error::BadPadding.to_string(), "OT padding panic");
        for e in [
            Error::BadPayloadLength(3),
            Error::NotUtf8,
            Error::NotJson,
            Error::NotObject,
            Error::StreamLength(3),
        ] {
            assert!(!e.to_string().is_empty());
        }
    }

    /// Arbitrary JSON objects without floats (whose text form need not round-trip exactly).
    fn json_object() -> impl Strategy<Value = Map<String, Value>> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<String>().prop_map(Value::String),
        ];
        let value = leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::vec((any::<String>(), inner), 0..6)
                    .prop_map(|kv| Value::Object(kv.into_iter().collect())),
            ]
        });
        prop::collection::vec((any::<String>(), value), 0..8)
            .prop_map(|kv| kv.into_iter().collect())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(384))]

        #[test]
        fn arbitrary_bytes_never_panic(buf in prop::collection::vec(any::<u8>(), 0..200)) {
            let keys = Keys::new(TOKEN);
            if let Ok(p) = Packet::new_checked(&buf[..]) {
                let _ = (p.length(), p.unknown(), p.did(), p.stamp(), p.checksum(), p.payload());
                let _ = (p.is_control(), p.ids_all_ff(), p.is_lan_hello(), control_md5_ok(&keys, &p));
                let _ = open(&keys, DID, &p);
            }
            let _ = decode(&keys, DID, &buf);
            let _ = stream_frame_len(&buf);
        }

        #[test]
        fn framed_garbage_never_panics(body in prop::collection::vec(any::<u8>(), 0..160),
                                       did in prop_oneof![Just(DID), any::<u32>()]) {
            // Correct magic and length (and sometimes a correct MD5) reach the later steps.
            let keys = Keys::new(TOKEN);
            let mut buf = header((32 + body.len()) as u16, 0, did, 1).to_vec();
            buf.extend_from_slice(&body);
            let _ = decode(&keys, DID, &buf);
            let sum = md5(&[&buf[..16], keys.secret(), &body]);
            buf[16..32].copy_from_slice(&sum);
            let r = decode(&keys, DID, &buf);
            if did == DID {
                let early = matches!(r, Err(Error::Md5Mismatch | Error::DidMismatch { .. }));
                prop_assert!(!early, "{:?}", r);
            }
            prop_assert_eq!(stream_frame_len(&buf), Ok(Some(buf.len())));
        }

        #[test]
        fn seal_open_round_trip(obj in json_object(), did in any::<u32>(), stamp in any::<u32>()) {
            let keys = Keys::new(CLOUD_KEY);
            let text = Value::Object(obj.clone()).to_string();
            let pkt = seal(&keys, did, stamp, text.as_bytes());
            let p = Packet::new_checked(&pkt[..]).unwrap();
            prop_assert_eq!((p.did(), p.stamp(), p.unknown()), (did, stamp, 0));
            let opened = open(&keys, did, &p).unwrap();
            prop_assert_eq!(opened.text, text);
            prop_assert_eq!(opened.value, obj);
        }
    }
}
