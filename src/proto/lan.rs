//! The LAN machine of UDP 54321 (PROTOCOL.md §4, §2.7; LOCAL_API.md §4.3).
//!
//! Contract (ARCHITECTURE.md §3): sans-IO. No socket, no clock, no file. Inputs are
//! [`Lan::handle_datagram`], [`Lan::handle_timeout`], [`Lan::local_reply`] and [`Lan::answer`];
//! configuration comes from the node through [`Lan::set_identity`], [`Lan::set_state`] and
//! [`Lan::set_offset`]. Datagrams go straight into the caller's [`Outbox`] (`LanSend`), in order;
//! what the node decides is a [`LanEvent`], drained with [`Lan::poll_event`].
//! [`Lan::poll_timeout`] is the earliest user-ack deadline of a pending command; the replay guard and
//! the reply cache expire lazily on the next datagram and never wake the daemon (L§12).
//!
//! What it does: answers hellos once the token is known (P§4.2, D7: the raw token only in
//! `wifi_ap_mode`); opens data packets under the token (P§2.7); refuses anything but a command with a
//! string `method` and a u32 `id`, and `local.*`/`_internal.*` methods (P§4.4); never executes a
//! repeated packet and answers it from the reply cache (P§4.5 D7); hands the methods of P§4.6 to the
//! node ([`LanEvent::SelfMethod`]); forwards every other command with its id rewritten to a local id
//! (P§4.7 D7); and answers the phone with the first local reply, the held -10000/-32601 fallback
//! (D16) or -9999 after the user-ack timeout (P§5.8).
//!
//! The node's side:
//! - `Action::LanSend{to, bytes}` (in the outbox): one datagram from the 54321 socket to `to`.
//! - `Command{local_id, text}`: broadcast `text` to the local clients like a cloud command (D6).
//!   Feed replies whose id is a pending local id ([`Lan::is_local_id_pending`]) to
//!   [`Lan::local_reply`]. If the command reached no local client, the node may leave it to the timeout.
//! - `SelfMethod{handle, method, id, params}`: build the reply (`{"id":<id>,...}`) and give it to
//!   [`Lan::answer`], now or later (the helper may be asked first); unanswered, the phone gets -9999.

use core::fmt;
use std::net::SocketAddr;

use log::{debug, warn};
use serde_json::Value;

use crate::proto::downstream::{self, Downstream, Rng, CACHE_MAX_TEXT};
use crate::proto::outbox::{Action, Outbox};
use crate::proto::state::State;
use crate::time::{Duration, Instant};
use crate::wire::crypto::Keys;
use crate::wire::miio::{self, Packet};
use crate::wire::rpc;

/// Default wait for a local reply before -9999 (P§5.8, `--user-ack-timeout`).
pub const DEFAULT_USER_ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// Replay guard: lifetime and size (P§4.5 D7).
const GUARD_TTL: Duration = Duration::from_secs(600);
const GUARD_MAX: usize = 256;
/// Local ids of forwarded LAN commands (P§4.7 D7).
const LOCAL_ID_MIN: u32 = 0x4000_0000;
const LOCAL_ID_MAX: u32 = 0x7fff_ffff;
/// The largest UDP payload over IPv4: a longer reply cannot be sent.
const MAX_DATAGRAM: usize = 65507;

/// What the LAN machine leaves to the node (its datagrams go straight into the [`Outbox`]).
#[derive(Clone, PartialEq)]
pub enum LanEvent {
    /// A phone command, id rewritten to `local_id`, to broadcast to local clients (P§4.7).
    Command { local_id: u32, text: String },
    /// A method of P§4.6 for the node to answer with [`Lan::answer`]`(now, handle, reply)`.
    /// `id` is the phone's id; `params` is `null` when the request had none.
    SelfMethod {
        handle: u64,
        method: String,
        id: u32,
        params: Value,
    },
}

// `params` of miIO.config_router carries the Wi-Fi password: never printed (P§2.5).
impl fmt::Debug for LanEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LanEvent::Command { local_id, text } => {
                write!(f, "Command {{ local_id: {local_id}, text: {text:?} }}")
            }
            LanEvent::SelfMethod {
                handle, method, id, ..
            } => write!(
                f,
                "SelfMethod {{ handle: {handle}, method: {method:?}, id: {id}, params: <redacted> }}"
            ),
        }
    }
}

/// What makes a command packet unique for the replay guard (P§4.5 D7).
#[derive(Clone, Copy, PartialEq, Eq)]
struct GuardKey {
    id: u32,
    stamp: u32,
    checksum: [u8; 16],
}

/// Who answers a pending command.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Route {
    /// Broadcast to local clients under this local id.
    Forwarded(u32),
    /// Answered by the node under this handle.
    SelfAnswered(u64),
}

/// What the LAN keeps per pending command: who answers it and where the reply goes.
#[derive(Clone, Copy)]
struct Origin {
    route: Route,
    phone_id: u32,
    to: SocketAddr,
    key: GuardKey,
}

/// The LAN machine. Not `Debug`: it holds the token and replies that may carry it.
pub struct Lan {
    /// Our did and the token's keys; None until the node knows them.
    identity: Option<(u32, Keys)>,
    state: State,
    /// Stamp offset of the last cloud time sync (P§4.3).
    offset: i64,
    user_ack_timeout: Duration,
    next_local: u32,
    next_handle: u64,
    /// Pending commands, and the replies (plaintext with the phone's id, no NUL) cached by
    /// replay-guard key for repeats.
    pending: Downstream<Origin, GuardKey>,
    /// Accepted commands, oldest first, with the time they were accepted (a `Vec`, as in
    /// `proto::helper`).
    guard: Vec<(GuardKey, Instant)>,
    events: Vec<LanEvent>,
}

impl Lan {
    /// A machine with no identity (silent) in `device_init`. `seed` picks the first local id.
    pub fn new(seed: u64, user_ack_timeout: Duration) -> Lan {
        let span = u64::from(LOCAL_ID_MAX - LOCAL_ID_MIN) + 1;
        // span is 2^30, so the remainder fits in u32.
        let start = LOCAL_ID_MIN + (Rng::new(seed).next_u64() % span) as u32;
        Lan {
            identity: None,
            state: State::DeviceInit,
            offset: 0,
            user_ack_timeout,
            next_local: start,
            next_handle: 1,
            pending: Downstream::new(CACHE_MAX_TEXT),
            guard: Vec::new(),
            events: Vec::new(),
        }
    }

    /// Our did and the 16-byte token (P§2.5). A change forgets the replay guard and the reply cache,
    /// which belong to the old secret; pending commands are answered under the new one.
    pub fn set_identity(&mut self, did: u32, token: [u8; 16]) {
        let same = self
            .identity
            .as_ref()
            .is_some_and(|(d, k)| *d == did && k.secret() == &token);
        if !same {
            self.identity = Some((did, Keys::new(&token)));
            self.guard.clear();
            self.pending.clear_cache();
        }
    }

    /// The daemon state: hellos and commands are served from `token_done` on (P§4.2, P§4.4); the
    /// hello reveals the token only in `wifi_ap_mode` (D7).
    pub fn set_state(&mut self, state: State) {
        self.state = state;
    }

    /// The stamp offset the cloud time sync set (the cloud machine's `offset()`, P§4.3). Stamps are
    /// `floor(boottime s) + offset`, as on the cloud link.
    pub fn set_offset(&mut self, offset: i64) {
        self.offset = offset;
    }

    /// The plain device stamp for LAN packets (P§4.3, P§5.5: LAN replies use it as is).
    pub fn stamp(&self, now: Instant) -> u32 {
        let secs = i64::try_from(now.secs()).unwrap_or(i64::MAX);
        secs.wrapping_add(self.offset) as u32
    }

    /// What the node must decide next (a command to broadcast, a method to answer).
    pub fn poll_event(&mut self) -> Option<LanEvent> {
        (!self.events.is_empty()).then(|| self.events.remove(0))
    }

    /// The earliest user-ack deadline; None when nothing is pending.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.pending.poll_timeout()
    }

    /// L§12 counts "the LAN socket has unsent output": here, events the node has not drained
    /// (the datagrams themselves are in the [`Outbox`]). Pending commands do not block a suspend;
    /// their deadline is in [`Lan::poll_timeout`].
    pub fn is_busy(&self) -> bool {
        !self.events.is_empty()
    }

    /// True when `id` is the local id of a forwarded LAN command still waiting for a reply.
    pub fn is_local_id_pending(&self, id: u32) -> bool {
        self.pending.contains(|o| o.route == Route::Forwarded(id))
    }

    /// One datagram received on 54321 from `from`.
    pub fn handle_datagram(
        &mut self,
        now: Instant,
        from: SocketAddr,
        bytes: &[u8],
        out: &mut Outbox,
    ) {
        self.expire(now);
        let pkt = match Packet::new_checked(bytes) {
            Ok(p) => p,
            Err(e) => return self.log_drop(now, from, &e),
        };
        if pkt.is_control() {
            if pkt.is_lan_hello() {
                self.hello(now, from, out);
            } else {
                debug!("LAN control packet from {from} ignored");
            }
            return;
        }
        let Some((did, keys)) = self.identity.as_ref().filter(|_| self.state.token_known()) else {
            debug!("LAN packet from {from} before the token is known: ignored");
            return;
        };
        let opened = match miio::open(keys, *did, &pkt) {
            Ok(o) => o,
            Err(e) => return self.log_drop(now, from, &e),
        };
        let id = opened.value.get("id").and_then(rpc::id_u32);
        let (method, id) = match (opened.value.get("method"), id) {
            (Some(Value::String(m)), Some(id)) => (m.as_str(), id),
            _ => return self.log_drop(now, from, &"mobile msg not commands, ignore"),
        };
        if method.starts_with("local.") || method.starts_with("_internal.") {
            // P§4.4: never taken from the LAN.
            return self.log_drop(now, from, &format_args!("LAN method {method} refused"));
        }
        let key = GuardKey {
            id,
            stamp: pkt.stamp(),
            checksum: pkt.checksum(),
        };
        if self.guard.iter().any(|(k, _)| *k == key) {
            return self.repeated(now, from, key, out);
        }
        if self.guard.len() >= GUARD_MAX {
            self.guard.remove(0);
        }
        self.guard.push((key, now));

        if self.pending.is_full() {
            crate::warn_limited!(now, "too many pending LAN commands, id:{id} answered -9999");
            let text = downstream::user_ack_timeout_reply(id);
            self.send_reply(now, from, key, text, out);
            return;
        }
        let deadline = now + self.user_ack_timeout;
        if downstream::self_answered(method) {
            let handle = self.next_handle;
            self.next_handle = self.next_handle.wrapping_add(1);
            let event = LanEvent::SelfMethod {
                handle,
                method: method.to_owned(),
                id,
                params: opened.value.get("params").cloned().unwrap_or(Value::Null),
            };
            let origin = Origin {
                route: Route::SelfAnswered(handle),
                phone_id: id,
                to: from,
                key,
            };
            self.pending.insert(origin, deadline);
            self.events.push(event);
            return;
        }
        let local_id = self.next_local_id();
        let Some(text) = rpc::rewrite_id(&opened.text, u64::from(local_id)) else {
            // Cannot happen for a text that parsed with an id; dropped rather than trusted.
            return self.log_drop(now, from, &"LAN command id not rewritable");
        };
        crate::info_limited!(
            now,
            "M, orig_id:{id}, new_id:{local_id}, len:{}",
            text.len()
        );
        let origin = Origin {
            route: Route::Forwarded(local_id),
            phone_id: id,
            to: from,
            key,
        };
        self.pending.insert(origin, deadline);
        self.events.push(LanEvent::Command { local_id, text });
    }

    /// A local client's reply to a forwarded command (`text` is the reply as received). Returns
    /// whether `local_id` was pending here. The first reply wins; -10000/-32601 are held (D16).
    pub fn local_reply(
        &mut self,
        now: Instant,
        local_id: u32,
        text: &str,
        out: &mut Outbox,
    ) -> bool {
        let Some(i) = self
            .pending
            .position(|o| o.route == Route::Forwarded(local_id))
        else {
            return false;
        };
        let Ok(obj) = rpc::parse_object(text.as_bytes()) else {
            return false;
        };
        let Some(phone_id) = self.pending.get(i).map(|p| p.origin.phone_id) else {
            return false;
        };
        let Some(restored) = rpc::rewrite_id(text, u64::from(phone_id)) else {
            return false;
        };
        let code = obj
            .get("error")
            .and_then(|e| e.get("code"))
            .and_then(Value::as_i64);
        if downstream::is_fallback(code) {
            // D16: a fallback only; the first one is kept until something better comes.
            self.pending.hold(i, restored);
            return true;
        }
        self.finish(now, i, restored, out);
        true
    }

    /// The node's reply to a [`LanEvent::SelfMethod`]. `text` is a JSON object with a top-level
    /// `id` (restored to the phone's id here). False when the handle is no longer pending or the
    /// reply is unusable (then the phone gets -9999 at the deadline).
    pub fn answer(&mut self, now: Instant, handle: u64, text: &str, out: &mut Outbox) -> bool {
        let Some(i) = self
            .pending
            .position(|o| o.route == Route::SelfAnswered(handle))
        else {
            return false;
        };
        let Some(phone_id) = self.pending.get(i).map(|p| p.origin.phone_id) else {
            return false;
        };
        match rpc::rewrite_id(text, u64::from(phone_id)) {
            Some(restored) => self.finish(now, i, restored, out),
            None => {
                warn!("LAN self reply without id, handle {handle}: not sent");
                false
            }
        }
    }

    /// Answers every command whose user-ack deadline has passed: the held error, else -9999.
    pub fn handle_timeout(&mut self, now: Instant, out: &mut Outbox) {
        while let Some(p) = self.pending.pop_due(now) {
            let Origin {
                phone_id, to, key, ..
            } = p.origin;
            let text = p.timeout_reply(now, phone_id);
            if !self.send_reply(now, to, key, text, out) {
                // The held reply could not be sealed: the phone still gets its -9999.
                let text = downstream::user_ack_timeout_reply(phone_id);
                self.send_reply(now, to, key, text, out);
            }
        }
    }

    /// Sends `text` for pending entry `i` and removes it; false (entry kept) if it cannot be sent.
    fn finish(&mut self, now: Instant, i: usize, text: String, out: &mut Outbox) -> bool {
        let Some((to, key)) = self.pending.get(i).map(|p| (p.origin.to, p.origin.key)) else {
            return false;
        };
        if !self.send_reply(now, to, key, text, out) {
            return false;
        }
        self.pending.remove(i);
        true
    }

    /// Seals `text` for `to` with the current stamp and caches it for repeats (P§4.4, P§4.5).
    fn send_reply(
        &mut self,
        now: Instant,
        to: SocketAddr,
        key: GuardKey,
        text: String,
        out: &mut Outbox,
    ) -> bool {
        let Some(bytes) = self.seal(now, &text) else {
            return false;
        };
        crate::info_limited!(now, "ACK, id:{}, to:mobile {to}", key.id);
        out.push(Action::LanSend { to, bytes });
        self.pending.cache_put(now, key, text);
        true
    }

    /// A reply packet: unknown 0, our did, the current stamp, MD5 under the token, JSON + NUL.
    fn seal(&self, now: Instant, text: &str) -> Option<Vec<u8>> {
        let (did, keys) = self.identity.as_ref()?;
        let bytes = miio::seal(keys, *did, self.stamp(now), text.as_bytes());
        if bytes.is_empty() || bytes.len() > MAX_DATAGRAM {
            crate::warn_limited!(
                now,
                "LAN reply of {} bytes too long for a datagram: not sent",
                text.len()
            );
            return None;
        }
        Some(bytes)
    }

    fn hello(&mut self, now: Instant, from: SocketAddr, out: &mut Outbox) {
        let Some((did, keys)) = self.identity.as_ref().filter(|_| self.state.token_known()) else {
            debug!("LAN hello from {from} before the token is known: silent");
            return;
        };
        // D7: the state alone decides whether the hello reveals the token.
        let token = (self.state == State::WifiApMode).then(|| keys.secret());
        let bytes = miio::lan_hello_reply(*did, self.stamp(now), token).to_vec();
        debug!("LAN hello from {from} answered");
        out.push(Action::LanSend { to: from, bytes });
    }

    /// A packet the guard has seen: never executed again (P§4.5 D7).
    fn repeated(&mut self, now: Instant, from: SocketAddr, key: GuardKey, out: &mut Outbox) {
        self.log_drop(
            now,
            from,
            &format_args!(
                "look like a repeated msg:{},{}, ts: {}",
                key.id,
                key.stamp,
                now.secs()
            ),
        );
        if self.pending.contains(|o| o.key == key) {
            return;
        }
        let Some(text) = self.pending.cached(now, &key).map(str::to_owned) else {
            return;
        };
        if let Some(bytes) = self.seal(now, &text) {
            out.push(Action::LanSend { to: from, bytes });
        }
    }

    /// Lazy expiry of the guard and the cache, oldest first.
    fn expire(&mut self, now: Instant) {
        let old = self
            .guard
            .iter()
            .take_while(|(_, at)| *at + GUARD_TTL <= now)
            .count();
        self.guard.drain(..old);
        self.pending.expire(now);
    }

    /// Next local id: +1, wraps to 0x40000000, skips pending ones (P§4.7 D7).
    fn next_local_id(&mut self) -> u32 {
        loop {
            let id = self.next_local;
            self.next_local = if id >= LOCAL_ID_MAX {
                LOCAL_ID_MIN
            } else {
                id + 1
            };
            // At most MAX_PENDING ids are skipped, so this ends.
            if !self.is_local_id_pending(id) {
                return id;
            }
        }
    }

    /// A drop line, rate limited for the whole process (P§2.7, `crate::ratelimit`).
    fn log_drop(&mut self, now: Instant, from: SocketAddr, what: &dyn fmt::Display) {
        crate::warn_limited!(now, "{what} (from {from})");
    }
}

/// Collection sizes for the month simulation (`proto::sim`): each must stay bounded.
#[cfg(test)]
impl Lan {
    pub(crate) fn debug_sizes(&self, out: &mut Vec<(&'static str, usize)>) {
        out.extend([
            ("lan.pending", self.pending.len()),
            ("lan.pending_held", self.pending.held()),
            ("lan.guard", self.guard.len()),
            ("lan.reply_cache", self.pending.cache_len()),
            ("lan.actions", self.events.len()),
        ]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    const DID: u32 = 1234567;
    const TOKEN: [u8; 16] = *b"ABCDEFGHIJKLMNOP";
    const CLOUD_KEY: [u8; 16] = *b"YWJjZGVmZ2hpamts";
    /// Boot time of the first packet in these tests; the offset makes its stamp `5a9b239d`.
    const T0: Instant = Instant::from_millis(1_000_000);
    const OFFSET: i64 = 0x5a9b_239d - 1000;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// One vector of tests/vectors/miio.txt (P§7).
    fn vector(name: &str) -> Vec<u8> {
        let line = include_str!("../../tests/vectors/miio.txt")
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no vector {name}"));
        hex(line)
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([192, 168, 1, 20], port))
    }

    fn at(secs: u64) -> Instant {
        T0 + Duration::from_secs(secs)
    }

    /// What a test sees of the machine: its datagrams (from the outbox) and its events, in order
    /// (no call makes both).
    #[derive(Debug, PartialEq)]
    enum LanAction {
        Send {
            to: SocketAddr,
            bytes: Vec<u8>,
        },
        Command {
            local_id: u32,
            text: String,
        },
        SelfMethod {
            handle: u64,
            method: String,
            id: u32,
            params: Value,
        },
    }

    /// The machine with the node's outbox beside it.
    struct L {
        l: Lan,
        out: Outbox,
    }

    impl From<Lan> for L {
        fn from(l: Lan) -> L {
            L {
                l,
                out: Outbox::default(),
            }
        }
    }

    impl std::ops::Deref for L {
        type Target = Lan;
        fn deref(&self) -> &Lan {
            &self.l
        }
    }

    impl std::ops::DerefMut for L {
        fn deref_mut(&mut self) -> &mut Lan {
            &mut self.l
        }
    }

    impl L {
        fn handle_datagram(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) {
            self.l.handle_datagram(now, from, bytes, &mut self.out);
        }

        fn handle_timeout(&mut self, now: Instant) {
            self.l.handle_timeout(now, &mut self.out);
        }

        fn local_reply(&mut self, now: Instant, local_id: u32, text: &str) -> bool {
            self.l.local_reply(now, local_id, text, &mut self.out)
        }

        fn answer(&mut self, now: Instant, handle: u64, text: &str) -> bool {
            self.l.answer(now, handle, text, &mut self.out)
        }

        fn poll_action(&mut self) -> Option<LanAction> {
            match self.out.pop() {
                Some(Action::LanSend { to, bytes }) => return Some(LanAction::Send { to, bytes }),
                Some(a) => panic!("the LAN machine queued {a:?}"),
                None => {}
            }
            Some(match self.l.poll_event()? {
                LanEvent::Command { local_id, text } => LanAction::Command { local_id, text },
                LanEvent::SelfMethod {
                    handle,
                    method,
                    id,
                    params,
                } => LanAction::SelfMethod {
                    handle,
                    method,
                    id,
                    params,
                },
            })
        }
    }

    fn lan(state: State) -> L {
        let mut l = L::from(Lan::new(7, DEFAULT_USER_ACK_TIMEOUT));
        l.set_identity(DID, TOKEN);
        l.set_state(state);
        l.set_offset(OFFSET);
        l
    }

    fn drain(l: &mut L) -> Vec<LanAction> {
        std::iter::from_fn(|| l.poll_action()).collect()
    }

    /// A phone packet under the token with `stamp` and `plain` + NUL.
    fn phone(stamp: u32, plain: &str) -> Vec<u8> {
        miio::seal(&Keys::new(&TOKEN), DID, stamp, plain.as_bytes())
    }

    /// The one Send of `acts`, decoded under the token: (to, stamp, text).
    fn sent(acts: &[LanAction]) -> (SocketAddr, u32, String) {
        match acts {
            [LanAction::Send { to, bytes }] => {
                let pkt = Packet::new_checked(&bytes[..]).unwrap();
                let text = miio::open(&Keys::new(&TOKEN), DID, &pkt).unwrap().text;
                (*to, pkt.stamp(), text)
            }
            other => panic!("want one Send, got {other:?}"),
        }
    }

    fn command(acts: &[LanAction]) -> (u32, String) {
        match acts {
            [LanAction::Command { local_id, text }] => (*local_id, text.clone()),
            other => panic!("want one Command, got {other:?}"),
        }
    }

    fn self_method(acts: &[LanAction]) -> (u64, String, u32, Value) {
        match acts {
            [LanAction::SelfMethod {
                handle,
                method,
                id,
                params,
            }] => (*handle, method.clone(), *id, params.clone()),
            other => panic!("want one SelfMethod, got {other:?}"),
        }
    }

    const GET_PROP: &str = r#"{"id": 12, "method": "get_prop", "params": ["power"]}"#;

    #[test]
    fn hello_in_sta_mode_is_v5() {
        for state in [
            State::TokenDone,
            State::WifiStaMode,
            State::CloudTrying,
            State::CloudConnected,
            State::CloudRetry,
            State::DidkeyReq2,
        ] {
            let mut l = lan(state);
            l.handle_datagram(T0, addr(40000), &vector("V4"));
            let want = LanAction::Send {
                to: addr(40000),
                bytes: vector("V5"),
            };
            assert_eq!(drain(&mut l), vec![want], "{state:?}");
        }
    }

    #[test]
    fn hello_in_ap_mode_is_v6() {
        let mut l = lan(State::WifiApMode);
        l.handle_datagram(T0, addr(40000), &vector("V4"));
        let want = LanAction::Send {
            to: addr(40000),
            bytes: vector("V6"),
        };
        assert_eq!(drain(&mut l), vec![want]);
        // Each hello is answered once; the checksum bytes of a hello are ignored.
        let mut h = vector("V4");
        h[20] = 0;
        l.handle_datagram(T0, addr(40001), &h);
        l.handle_datagram(T0, addr(40002), &h);
        assert_eq!(drain(&mut l).len(), 2);
    }

    #[test]
    fn stamp_follows_offset() {
        let mut l = lan(State::WifiStaMode);
        assert_eq!(l.stamp(T0), 0x5a9b_239d);
        l.set_offset(0);
        assert_eq!(l.stamp(Instant::from_millis(12_999)), 12);
        l.set_offset(-20);
        assert_eq!(l.stamp(Instant::from_millis(12_999)), (-8i32) as u32);
    }

    #[test]
    fn silent_before_token_done() {
        for state in [State::DeviceInit, State::DidkeyReq1, State::DidkeyDone] {
            let mut l = lan(state);
            l.handle_datagram(T0, addr(1), &vector("V4"));
            l.handle_datagram(T0, addr(1), &vector("V10"));
            assert!(drain(&mut l).is_empty(), "{state:?}");
            assert_eq!(l.poll_timeout(), None);
        }
        // Without an identity even token_done is silent.
        let mut l = L::from(Lan::new(1, DEFAULT_USER_ACK_TIMEOUT));
        l.set_state(State::TokenDone);
        l.handle_datagram(T0, addr(1), &vector("V4"));
        l.handle_datagram(T0, addr(1), &vector("V10"));
        assert!(drain(&mut l).is_empty());
    }

    #[test]
    fn v10_is_self_answered_and_the_reply_is_v11() {
        let mut l = lan(State::CloudConnected);
        l.handle_datagram(at(1), addr(5000), &vector("V10"));
        let (handle, method, id, params) = self_method(&drain(&mut l));
        assert_eq!((method.as_str(), id, params), ("miIO.info", 12, json!([])));
        assert!(!l.is_local_id_pending(handle as u32));
        // Whatever id the node writes, the phone's comes back; stamp 5a9b239f gives V11 exactly.
        assert!(l.answer(at(2), handle, r#"{"id":99,"result":["on"]}"#));
        let want = LanAction::Send {
            to: addr(5000),
            bytes: vector("V11"),
        };
        assert_eq!(drain(&mut l), vec![want]);
        assert!(!l.answer(at(2), handle, r#"{"id":12,"result":["on"]}"#));
        assert_eq!(l.poll_timeout(), None);
    }

    #[test]
    fn forwarded_command_restores_the_phone_id() {
        let mut l = lan(State::WifiStaMode);
        l.handle_datagram(at(1), addr(5000), &phone(0x5a9b_239e, GET_PROP));
        let (local_id, text) = command(&drain(&mut l));
        assert!((LOCAL_ID_MIN..=LOCAL_ID_MAX).contains(&local_id));
        assert_eq!(
            text,
            format!(r#"{{"id": {local_id}, "method": "get_prop", "params": ["power"]}}"#)
        );
        assert!(l.is_local_id_pending(local_id));
        assert_eq!(l.poll_timeout(), Some(at(6)));

        let reply = format!(r#"{{"id":{local_id},"result":["on"]}}"#);
        assert!(l.local_reply(at(2), local_id, &reply));
        let acts = drain(&mut l);
        // V11: the phone's id 12, our did, stamp 5a9b239f, the token: byte for byte.
        assert_eq!(
            acts,
            vec![LanAction::Send {
                to: addr(5000),
                bytes: vector("V11")
            }]
        );
        assert_eq!(
            sent(&acts),
            (
                addr(5000),
                0x5a9b_239f,
                r#"{"id":12,"result":["on"]}"#.to_owned()
            )
        );
        // First reply wins: later ones are not ours any more.
        assert!(!l.is_local_id_pending(local_id));
        assert!(!l.local_reply(at(2), local_id, &reply));
        assert!(drain(&mut l).is_empty());
        assert_eq!(l.poll_timeout(), None);
    }

    #[test]
    fn unknown_members_are_kept() {
        let mut l = lan(State::WifiStaMode);
        let plain = r#"{"method":"set_power","params":["on"],"sid":"x","id":7,"from":"4"}"#;
        l.handle_datagram(T0, addr(1), &phone(5, plain));
        let (local_id, text) = command(&drain(&mut l));
        assert_eq!(
            text,
            format!(
                r#"{{"method":"set_power","params":["on"],"sid":"x","id":{local_id},"from":"4"}}"#
            )
        );
        let reply = format!(r#"{{"id":{local_id},"result":["ok"],"exe_time":10}}"#);
        assert!(l.local_reply(T0, local_id, &reply));
        let (_, _, text) = sent(&drain(&mut l));
        assert_eq!(text, r#"{"id":7,"result":["ok"],"exe_time":10}"#);
    }

    #[test]
    fn repeats_run_once_and_get_the_stored_reply() {
        let mut l = lan(State::WifiStaMode);
        let pkt = phone(0x5a9b_239e, GET_PROP);
        l.handle_datagram(at(1), addr(5000), &pkt);
        let (local_id, _) = command(&drain(&mut l));
        // While the first copy is pending, a repeat is dropped.
        l.handle_datagram(at(1), addr(5000), &pkt);
        l.handle_datagram(at(1), addr(5001), &pkt);
        assert!(drain(&mut l).is_empty());
        assert!(l.local_reply(
            at(2),
            local_id,
            &format!(r#"{{"id":{local_id},"result":[1]}}"#)
        ));
        let first = sent(&drain(&mut l));
        assert_eq!(first.0, addr(5000));
        // Later copies: the same reply, to the new source address, never a second Command.
        l.handle_datagram(at(3), addr(6000), &pkt);
        let second = sent(&drain(&mut l));
        assert_eq!(second.0, addr(6000));
        assert_eq!(second.2, first.2);
        assert_eq!(second.1, 0x5a9b_23a0, "sealed with the current stamp");
        l.handle_datagram(at(4), addr(5000), &pkt);
        assert_eq!(sent(&drain(&mut l)).2, first.2);
    }

    #[test]
    fn repeated_self_method_is_answered_from_the_cache() {
        let mut l = lan(State::WifiStaMode);
        l.handle_datagram(at(1), addr(5000), &vector("V10"));
        let (handle, ..) = self_method(&drain(&mut l));
        l.handle_datagram(at(1), addr(5000), &vector("V10"));
        assert!(drain(&mut l).is_empty());
        assert!(l.answer(at(2), handle, r#"{"id":12,"result":["on"]}"#));
        drain(&mut l);
        l.handle_datagram(at(2), addr(7000), &vector("V10"));
        let want = LanAction::Send {
            to: addr(7000),
            bytes: vector("V11"),
        };
        assert_eq!(drain(&mut l), vec![want]);
    }

    #[test]
    fn two_python_miio_first_packets() {
        // Two fresh clients got the same hello stamp S and both send id 1 at S+1: identical bytes.
        let mut l = lan(State::CloudConnected);
        let s = l.stamp(T0);
        l.handle_datagram(T0, addr(41000), &vector("V4"));
        l.handle_datagram(T0, addr(42000), &vector("V4"));
        assert_eq!(drain(&mut l).len(), 2);
        let pkt = phone(
            s + 1,
            r#"{"id": 1, "method": "get_prop", "params": ["power"]}"#,
        );
        l.handle_datagram(at(1), addr(41000), &pkt);
        let (local_id, _) = command(&drain(&mut l));
        assert!(l.local_reply(
            at(1),
            local_id,
            &format!(r#"{{"id":{local_id},"result":["on"]}}"#)
        ));
        let a = sent(&drain(&mut l));
        l.handle_datagram(at(2), addr(42000), &pkt);
        let b = sent(&drain(&mut l));
        assert_eq!((a.0, b.0), (addr(41000), addr(42000)));
        assert_eq!(a.2, r#"{"id":1,"result":["on"]}"#);
        assert_eq!(a.2, b.2);
    }

    #[test]
    fn same_id_and_stamp_but_other_payload_is_new() {
        let mut l = lan(State::WifiStaMode);
        l.handle_datagram(T0, addr(1), &phone(9, r#"{"id":3,"method":"a"}"#));
        l.handle_datagram(T0, addr(1), &phone(9, r#"{"id":3,"method":"b"}"#));
        let acts = drain(&mut l);
        assert_eq!(acts.len(), 2);
        assert!(acts.iter().all(|a| matches!(a, LanAction::Command { .. })));
    }

    #[test]
    fn user_ack_timeout_after_five_seconds() {
        let mut l = lan(State::WifiStaMode);
        l.handle_datagram(at(1), addr(5000), &phone(1, GET_PROP));
        let (local_id, _) = command(&drain(&mut l));
        assert_eq!(l.poll_timeout(), Some(at(6)));
        l.handle_timeout(Instant::from_millis(at(6).millis() - 1));
        assert!(drain(&mut l).is_empty());
        l.handle_timeout(at(6));
        let (to, _, text) = sent(&drain(&mut l));
        assert_eq!(to, addr(5000));
        assert_eq!(
            text,
            r#"{"id":12,"error":{"code":-9999,"message":"user ack timeout"}}"#
        );
        assert_eq!(l.poll_timeout(), None);
        // A late reply is not ours; an extra timeout call is a no-op.
        assert!(!l.local_reply(
            at(7),
            local_id,
            &format!(r#"{{"id":{local_id},"result":[]}}"#)
        ));
        l.handle_timeout(at(8));
        assert!(drain(&mut l).is_empty());
    }

    #[test]
    fn unanswered_self_method_times_out() {
        let mut l = L::from(Lan::new(3, Duration::from_millis(2500)));
        l.set_identity(DID, TOKEN);
        l.set_state(State::WifiApMode);
        l.set_offset(OFFSET);
        l.handle_datagram(T0, addr(5000), &vector("V10"));
        let (handle, ..) = self_method(&drain(&mut l));
        assert_eq!(l.poll_timeout(), Some(T0 + Duration::from_millis(2500)));
        l.handle_timeout(at(3));
        let (_, _, text) = sent(&drain(&mut l));
        assert_eq!(
            text,
            r#"{"id":12,"error":{"code":-9999,"message":"user ack timeout"}}"#
        );
        assert!(!l.answer(at(3), handle, r#"{"id":12,"result":["OK"]}"#));
    }

    #[test]
    fn d16_fallback_errors() {
        let mut l = lan(State::WifiStaMode);
        // Held, then replaced by a real reply.
        l.handle_datagram(T0, addr(1), &phone(1, GET_PROP));
        let (id, _) = command(&drain(&mut l));
        let undefined =
            format!(r#"{{"id":{id},"error":{{"code":-10000,"message":"user undefined error"}}}}"#);
        let not_found =
            format!(r#"{{"id":{id},"error":{{"code":-32601,"message":"Method not found"}}}}"#);
        assert!(l.local_reply(T0, id, &undefined));
        assert!(l.local_reply(T0, id, &not_found));
        assert!(drain(&mut l).is_empty());
        assert!(l.is_local_id_pending(id));
        assert!(l.local_reply(at(1), id, &format!(r#"{{"id":{id},"result":["on"]}}"#)));
        assert_eq!(sent(&drain(&mut l)).2, r#"{"id":12,"result":["on"]}"#);
        l.handle_timeout(at(10));
        assert!(drain(&mut l).is_empty());

        // Held and sent at the timeout instead of -9999 (the first one held).
        l.handle_datagram(T0, addr(2), &phone(2, GET_PROP));
        let (id, _) = command(&drain(&mut l));
        let undefined =
            format!(r#"{{"id":{id},"error":{{"code":-10000,"message":"user undefined error"}}}}"#);
        let not_found =
            format!(r#"{{"id":{id},"error":{{"code":-32601,"message":"Method not found"}}}}"#);
        assert!(l.local_reply(at(1), id, &undefined));
        assert!(l.local_reply(at(2), id, &not_found));
        l.handle_timeout(at(4));
        assert!(drain(&mut l).is_empty());
        l.handle_timeout(at(5));
        let (to, _, text) = sent(&drain(&mut l));
        assert_eq!(to, addr(2));
        assert_eq!(
            text,
            r#"{"id":12,"error":{"code":-10000,"message":"user undefined error"}}"#
        );

        // Other errors are ordinary replies and win at once.
        l.handle_datagram(T0, addr(3), &phone(3, GET_PROP));
        let (id, _) = command(&drain(&mut l));
        let busy = format!(r#"{{"id":{id},"error":{{"code":-5001,"message":"busy"}}}}"#);
        assert!(l.local_reply(at(1), id, &busy));
        assert_eq!(
            sent(&drain(&mut l)).2,
            r#"{"id":12,"error":{"code":-5001,"message":"busy"}}"#
        );
    }

    #[test]
    fn lan_negative_vectors_are_dropped() {
        let v10 = vector("V10");
        let mut flipped = v10.clone();
        flipped[40] ^= 1;
        let mut other_did = v10.clone();
        other_did[8..12].copy_from_slice(&hex("0012d688"));
        let mut length = v10.clone();
        length[2..4].copy_from_slice(&hex("0061"));
        let truncated = v10[..40].to_vec();
        let short = v10[..31].to_vec();
        let mut huge = v10.clone();
        huge.resize(65507, 0);
        let mut l = lan(State::CloudConnected);
        for (name, bad) in [
            ("payload byte flipped", flipped),
            ("did 0012d688", other_did),
            ("length 0061", length),
            ("truncated to 40", truncated),
            ("31 bytes", short),
            ("65507 bytes", huge),
            ("empty", Vec::new()),
        ] {
            l.handle_datagram(T0, addr(9), &bad);
            assert!(drain(&mut l).is_empty(), "{name}");
            assert_eq!(l.poll_timeout(), None, "{name}");
        }
        // The machine still serves the real thing afterwards.
        l.handle_datagram(T0, addr(9), &v10);
        self_method(&drain(&mut l));
    }

    #[test]
    fn cloud_key_is_refused_on_the_lan() {
        let mut l = lan(State::CloudConnected);
        let pkt = miio::seal(&Keys::new(&CLOUD_KEY), DID, 5, GET_PROP.as_bytes());
        l.handle_datagram(T0, addr(9), &pkt);
        // The cloud vectors too (V12: a data packet under the key; V9: a keepalive).
        l.handle_datagram(T0, addr(9), &vector("V12"));
        l.handle_datagram(T0, addr(9), &vector("V9"));
        l.handle_datagram(T0, addr(9), &vector("V7"));
        assert!(drain(&mut l).is_empty());
    }

    #[test]
    fn local_and_internal_methods_are_dropped() {
        let mut l = lan(State::CloudConnected);
        for plain in [
            r#"{"id":1,"method":"local.query_status"}"#,
            r#"{"id":2,"method":"_internal.info"}"#,
            r#"{"id":3,"method":"local.ble.config_router","params":{"ssid":"x"}}"#,
            r#"{"id":4,"method":"_internal.wifi_start","params":{}}"#,
        ] {
            l.handle_datagram(T0, addr(9), &phone(1, plain));
            assert!(drain(&mut l).is_empty(), "{plain}");
        }
    }

    #[test]
    fn not_commands_are_dropped() {
        let mut l = lan(State::CloudConnected);
        for plain in [
            r#"{"method":"get_prop","params":[]}"#,
            r#"{"id":"1","method":"get_prop"}"#,
            r#"{"id":-1,"method":"get_prop"}"#,
            r#"{"id":1.5,"method":"get_prop"}"#,
            r#"{"id":4294967296,"method":"get_prop"}"#,
            r#"{"id":1,"method":5}"#,
            r#"{"id":1,"result":["ok"]}"#,
            r#"{"id":1}"#,
            r#"[1,2]"#,
            "not json",
        ] {
            l.handle_datagram(T0, addr(9), &phone(1, plain));
            assert!(drain(&mut l).is_empty(), "{plain}");
        }
        // A payload without the NUL (python-miio before 0.5) is still a command.
        let raw = miio::seal_raw(&Keys::new(&TOKEN), DID, 1, GET_PROP.as_bytes()).unwrap();
        l.handle_datagram(T0, addr(9), &raw);
        command(&drain(&mut l));
    }

    #[test]
    fn all_self_methods_go_to_the_node() {
        let mut l = lan(State::WifiApMode);
        for (i, m) in downstream::SELF_METHODS.iter().enumerate() {
            let plain = format!(r#"{{"id":{i},"method":"{m}","params":{{"k":1}}}}"#);
            l.handle_datagram(T0, addr(9), &phone(1, &plain));
            let (_, method, id, params) = self_method(&drain(&mut l));
            assert_eq!(
                (method.as_str(), id, params),
                (*m, i as u32, json!({"k":1}))
            );
        }
        // Members other than method, id, params are the node's business: params alone travels.
        l.handle_datagram(
            T0,
            addr(9),
            &phone(2, r#"{"id":50,"method":"miIO.config_tz"}"#),
        );
        assert_eq!(self_method(&drain(&mut l)).3, Value::Null);
        // miIO.ota and device methods are forwarded.
        l.handle_datagram(
            T0,
            addr(9),
            &phone(3, r#"{"id":51,"method":"miIO.ota","params":{}}"#),
        );
        command(&drain(&mut l));
    }

    #[test]
    fn debug_hides_params() {
        let a = LanEvent::SelfMethod {
            handle: 1,
            method: "miIO.config_router".into(),
            id: 2,
            params: json!({"ssid":"s","passwd":"hunter22"}),
        };
        let s = format!("{a:?}");
        assert!(
            !s.contains("hunter22") && s.contains("miIO.config_router"),
            "{s}"
        );
    }

    #[test]
    fn at_most_64_pending() {
        let mut l = lan(State::WifiStaMode);
        for i in 0..64u32 {
            let plain = format!(r#"{{"id":{i},"method":"get_prop"}}"#);
            l.handle_datagram(T0, addr(9), &phone(1, &plain));
        }
        let acts = drain(&mut l);
        assert_eq!(acts.len(), 64);
        assert!(acts.iter().all(|a| matches!(a, LanAction::Command { .. })));
        l.handle_datagram(
            at(1),
            addr(10),
            &phone(1, r#"{"id":64,"method":"get_prop"}"#),
        );
        let (to, _, text) = sent(&drain(&mut l));
        assert_eq!(to, addr(10));
        assert_eq!(
            text,
            r#"{"id":64,"error":{"code":-9999,"message":"user ack timeout"}}"#
        );
        l.handle_datagram(at(1), addr(10), &vector("V10"));
        assert!(matches!(&drain(&mut l)[..], [LanAction::Send { .. }]));
        // All 64 time out together.
        l.handle_timeout(at(5));
        assert_eq!(drain(&mut l).len(), 64);
    }

    #[test]
    fn local_ids_wrap_and_skip_pending() {
        let mut l = lan(State::WifiStaMode);
        l.next_local = LOCAL_ID_MAX - 1;
        let mut ids = Vec::new();
        for i in 0..3u32 {
            let plain = format!(r#"{{"id":{i},"method":"get_prop"}}"#);
            l.handle_datagram(T0, addr(9), &phone(1, &plain));
            ids.push(command(&drain(&mut l)).0);
        }
        assert_eq!(ids, [LOCAL_ID_MAX - 1, LOCAL_ID_MAX, LOCAL_ID_MIN]);
        // Go around to just before a pending id: it is skipped.
        l.next_local = LOCAL_ID_MAX;
        l.handle_datagram(T0, addr(9), &phone(1, r#"{"id":9,"method":"x"}"#));
        let (next, _) = command(&drain(&mut l));
        assert_eq!(next, LOCAL_ID_MIN + 1, "MAX and MIN are pending");
        // Seeds spread the start over the whole range.
        let starts: Vec<u32> = (0..64)
            .map(|s| Lan::new(s, Duration::ZERO).next_local)
            .collect();
        assert!(starts
            .iter()
            .all(|s| (LOCAL_ID_MIN..=LOCAL_ID_MAX).contains(s)));
        assert!(starts.iter().any(|&s| s > LOCAL_ID_MIN + 0x2000_0000));
        assert!(starts.iter().any(|&s| s < LOCAL_ID_MIN + 0x2000_0000));
    }

    #[test]
    fn guard_and_cache_expire_lazily() {
        let mut l = lan(State::WifiStaMode);
        let pkt = phone(1, GET_PROP);
        l.handle_datagram(T0, addr(9), &pkt);
        let (id, _) = command(&drain(&mut l));
        assert!(l.local_reply(T0, id, &format!(r#"{{"id":{id},"result":[]}}"#)));
        drain(&mut l);
        // Caches never wake the daemon.
        assert_eq!(l.poll_timeout(), None);
        assert!(!l.is_busy());
        // Within 60 s: the stored reply. After: dropped (still a repeat).
        l.handle_datagram(at(59), addr(9), &pkt);
        assert_eq!(drain(&mut l).len(), 1);
        l.handle_datagram(at(60), addr(9), &pkt);
        assert!(drain(&mut l).is_empty());
        l.handle_datagram(at(599), addr(9), &pkt);
        assert!(drain(&mut l).is_empty());
        // After 600 s the guard has forgotten it: a new command.
        l.handle_datagram(at(600), addr(9), &pkt);
        command(&drain(&mut l));
    }

    #[test]
    fn guard_keeps_256_entries() {
        let mut l = lan(State::WifiStaMode);
        let first = phone(1, r#"{"id":1000,"method":"x"}"#);
        l.handle_datagram(T0, addr(9), &first);
        for i in 0..256u32 {
            let plain = format!(r#"{{"id":{i},"method":"x"}}"#);
            l.handle_datagram(T0, addr(9), &phone(1, &plain));
        }
        l.handle_timeout(at(10));
        drain(&mut l);
        assert_eq!(l.guard.len(), GUARD_MAX);
        // The oldest was evicted: it runs again. The newest is still refused.
        l.handle_datagram(at(10), addr(9), &first);
        command(&drain(&mut l));
        // Ids 63.. got -9999 at once; the 64 timed-out replies then pushed them out of the cache.
        l.handle_datagram(at(10), addr(9), &phone(1, r#"{"id":255,"method":"x"}"#));
        assert!(drain(&mut l).is_empty());
        l.handle_datagram(at(10), addr(9), &phone(1, r#"{"id":62,"method":"x"}"#));
        assert!(matches!(&drain(&mut l)[..], [LanAction::Send { .. }]));
    }

    #[test]
    fn big_replies_are_sent_but_not_cached() {
        let mut l = lan(State::WifiStaMode);
        let pkt = phone(1, GET_PROP);
        l.handle_datagram(T0, addr(9), &pkt);
        let (id, _) = command(&drain(&mut l));
        let big = format!(r#"{{"id":{id},"result":["{}"]}}"#, "x".repeat(3000));
        assert!(l.local_reply(T0, id, &big));
        assert_eq!(drain(&mut l).len(), 1);
        l.handle_datagram(at(1), addr(9), &pkt);
        assert!(drain(&mut l).is_empty());
        // A reply too big for a datagram does not count: the command stays pending.
        l.handle_datagram(T0, addr(9), &phone(2, GET_PROP));
        let (id, _) = command(&drain(&mut l));
        let huge = format!(r#"{{"id":{id},"result":["{}"]}}"#, "x".repeat(65_500));
        assert!(l.local_reply(T0, id, &huge));
        assert!(drain(&mut l).is_empty());
        assert!(l.is_local_id_pending(id));
    }

    #[test]
    fn identity_change_forgets_guard_and_cache() {
        let mut l = lan(State::WifiStaMode);
        l.handle_datagram(T0, addr(9), &vector("V10"));
        let (h, ..) = self_method(&drain(&mut l));
        l.answer(T0, h, r#"{"id":12,"result":[]}"#);
        drain(&mut l);
        l.set_identity(DID, TOKEN);
        l.handle_datagram(T0, addr(9), &vector("V10"));
        assert_eq!(
            drain(&mut l).len(),
            1,
            "same identity: still a repeat, answered"
        );
        l.set_identity(DID, *b"ABCDEFGHIJKLMNOQ");
        l.set_identity(DID, TOKEN);
        l.handle_datagram(T0, addr(9), &vector("V10"));
        self_method(&drain(&mut l));
    }

    /// Datagrams that look like packets often enough to reach the late checks.
    fn datagram() -> impl Strategy<Value = Vec<u8>> {
        let framed = (
            any::<bool>(),
            prop::collection::vec(any::<u8>(), 0..96),
            any::<[u8; 28]>(),
        )
            .prop_map(|(ours, body, mut head)| {
                let len = (32 + body.len()) as u16;
                let mut b = vec![0x21, 0x31];
                b.extend_from_slice(&len.to_be_bytes());
                if ours {
                    head[4..8].copy_from_slice(&DID.to_be_bytes());
                }
                b.extend_from_slice(&head);
                b.extend_from_slice(&body);
                b
            });
        prop_oneof![
            prop::collection::vec(any::<u8>(), 0..80),
            framed.clone(),
            framed.clone(),
            framed,
        ]
    }

    proptest! {
        // 500 runs of 20 datagrams: 10 000 datagrams on a live machine.
        #![proptest_config(ProptestConfig::with_cases(500))]

        #[test]
        fn random_datagrams_only_get_hello_replies(
            dgrams in prop::collection::vec(datagram(), 20),
            ap in any::<bool>(),
        ) {
            let mut l = lan(if ap { State::WifiApMode } else { State::CloudConnected });
            for (i, d) in dgrams.iter().enumerate() {
                let now = T0 + Duration::from_millis(i as u64 * 300);
                l.handle_datagram(now, addr(9), d);
                l.handle_timeout(now);
                let hello = d.len() == 32 && d[..4] == [0x21, 0x31, 0, 32] && d[4..16].iter().all(|&b| b == 0xff);
                let acts = drain(&mut l);
                prop_assert_eq!(acts.len(), usize::from(hello), "{:?}", acts);
                prop_assert_eq!(l.poll_timeout(), None);
            }
        }
    }
}
