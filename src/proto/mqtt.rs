//! The MQTT client session of the broker link (LOCAL_API.md §11), sans-IO and in virtual time.
//!
//! Contract: the io side reports what happened to the one TCP connection (`connected`,
//! `connect_failed`, `received`, `closed`) with `now`, and carries out the [`Action`]s in the order
//! they come out of [`Session::poll_action`]: open the connection, write these bytes, close it. What
//! a caller must route comes out of [`Session::poll_event`]: the link is up or down, a message
//! arrived on one of the six topics. [`Session::poll_timeout`] is the session's one deadline and
//! [`Session::handle_timeout`] runs it; with the default keep-alive of 0 an idle link has none.
//!
//! The rules: CONNECT with a clean session, the client id and the keep-alive (L§11); after an
//! accepted CONNACK one SUBSCRIBE at QoS 1 to the three topics the daemon reads. Publishing is QoS 1,
//! packet ids never 0 and wrapping past 65535 (MQTT 3.1.1 §2.3.1), at most `max_inflight` publishes
//! unacknowledged: beyond that the new one is dropped with a rate-limited warning, and while the
//! link is not up whatever was meant for the broker is dropped (L§11). The unacknowledged ones are
//! sent again with DUP after a reconnect, under their packet ids (MQTT 3.1.1 §4.4). A QoS 1 PUBLISH
//! received is acked; one with DUP whose packet id was handled within the last 60 s is acked and
//! not delivered again (L§11). Malformed or unexpected input closes the connection (L§11); a
//! closed or refused connection is retried after 1 s, doubling to 60 s, reset by an accepted
//! CONNACK. PINGREQ only when the keep-alive is above 0 (MQTT 3.1.1 §3.1.2.10).

use log::{info, warn};

use crate::time::{Duration, Instant};
use crate::wire::mqtt::{self, connack, Packet, QoS, Splitter};

/// The six topics of L§11.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Topic {
    /// `miio/report`: app → daemon.
    Report,
    /// `miio/report_ack`: daemon → apps.
    ReportAck,
    /// `miio/command`: daemon → apps.
    Command,
    /// `miio/command_ack`: app → daemon.
    CommandAck,
    /// `local/miio_client_in`: app → daemon.
    LocalIn,
    /// `local/miio_client_out`: daemon → apps.
    LocalOut,
}

impl Topic {
    pub const ALL: [Topic; 6] = [
        Topic::Report,
        Topic::ReportAck,
        Topic::Command,
        Topic::CommandAck,
        Topic::LocalIn,
        Topic::LocalOut,
    ];
    /// The ones the daemon subscribes to, at QoS 1 (L§11).
    pub const SUBSCRIBED: [Topic; 3] = [Topic::Report, Topic::CommandAck, Topic::LocalIn];

    pub const fn name(self) -> &'static str {
        match self {
            Topic::Report => "miio/report",
            Topic::ReportAck => "miio/report_ack",
            Topic::Command => "miio/command",
            Topic::CommandAck => "miio/command_ack",
            Topic::LocalIn => "local/miio_client_in",
            Topic::LocalOut => "local/miio_client_out",
        }
    }

    pub fn from_name(name: &str) -> Option<Topic> {
        Topic::ALL.into_iter().find(|t| t.name() == name)
    }
}

/// The session's settings (L§11: `--mqtt-id`, `--mqtt-keepalive`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub client_id: String,
    /// Seconds; 0 (the default) sends no PINGREQ and sets no timer while the link is up.
    pub keep_alive: u16,
    /// The largest packet received or sent, fixed header included.
    pub max_packet: usize,
    /// Publishes sent and not yet acknowledged; a publish beyond them is dropped.
    pub max_inflight: usize,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            client_id: "miio_client".to_owned(),
            keep_alive: 0,
            max_packet: DEFAULT_MAX_PACKET,
            max_inflight: DEFAULT_MAX_INFLIGHT,
        }
    }
}

/// A 64 KiB JSON payload with its topic and headers.
pub const DEFAULT_MAX_PACKET: usize = 65_536 + 256;
pub const DEFAULT_MAX_INFLIGHT: usize = 32;
/// The first wait before a reconnect, and the longest (L§11).
pub const BACKOFF_MIN: Duration = Duration::from_secs(1);
pub const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// How long a connect, then the CONNACK, may take before the attempt counts as failed.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a received packet id is remembered for DUP (L§11).
pub const DUP_WINDOW: Duration = Duration::from_secs(60);
/// Received packet ids remembered at most; the oldest is forgotten first.
pub const DUP_IDS: usize = 64;

/// The SUBSCRIBE of [`Topic::SUBSCRIBED`] at QoS 1 with packet id 0, which is set before sending
/// (a unit test holds it to what `wire::mqtt::subscribe` writes).
const SUBSCRIBE: [u8; 60] =
    *b"\x82\x3a\0\0\0\x0bmiio/report\x01\0\x10miio/command_ack\x01\0\x14local/miio_client_in\x01";

/// What the io side must do with the broker connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Open the TCP connection; answer with [`Session::connected`] or [`Session::connect_failed`].
    Connect,
    /// Write these bytes (whole packets) on the connection.
    Send(Vec<u8>),
    /// Close the connection; no report is expected.
    Close,
}

/// What a caller must route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The broker accepted the session: publishes are taken from now on.
    Up,
    /// The connection of an accepted session is gone.
    Down,
    /// A message on a topic the daemon reads. The payload is as received (L§11: it may end in
    /// whitespace or NUL).
    Message { topic: Topic, payload: Vec<u8> },
}

/// Why a publish was not taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dropped {
    /// The link is not up (L§11: dropped while the broker is unreachable).
    NotUp,
    /// `max_inflight` publishes are waiting for their PUBACK.
    QueueFull,
    /// The packet would be larger than `max_packet`.
    TooLarge,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Not started, or stopped.
    Idle,
    /// Waiting to connect again.
    Backoff {
        until: Instant,
    },
    /// `Action::Connect` given, no answer yet.
    Connecting {
        deadline: Instant,
    },
    /// CONNECT sent.
    AwaitConnack {
        deadline: Instant,
    },
    Up,
}

/// One publish waiting for its PUBACK: its packet, sent again with DUP after a reconnect.
#[derive(Clone, Debug)]
struct Inflight {
    id: u16,
    packet: Vec<u8>,
}

/// Counters for tests and a future status line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub dropped_not_up: u64,
    pub dropped_full: u64,
    pub dropped_large: u64,
    pub duplicates: u64,
}

pub struct Session {
    cfg: Config,
    state: State,
    splitter: Splitter,
    backoff: Duration,
    next_id: u16,
    /// The packet id of the SUBSCRIBE waiting for its SUBACK.
    sub_id: Option<u16>,
    inflight: Vec<Inflight>,
    /// Packet ids of QoS 1 publishes received, with when (L§11, DUP); oldest first.
    seen: Vec<(u16, Instant)>,
    /// When we last wrote a packet, and the PINGREQ waiting for its PINGRESP (keep-alive only).
    last_send: Instant,
    ping_sent: Option<Instant>,
    actions: Vec<Action>,
    events: Vec<Event>,
    stats: Stats,
}

impl Session {
    pub fn new(cfg: Config) -> Session {
        let cap = cfg.max_packet;
        Session {
            cfg: Config {
                // Packet ids must stay free for new publishes.
                max_inflight: cfg.max_inflight.clamp(1, 1024),
                ..cfg
            },
            state: State::Idle,
            splitter: Splitter::new(cap),
            backoff: BACKOFF_MIN,
            next_id: 1,
            sub_id: None,
            inflight: Vec::new(),
            seen: Vec::new(),
            last_send: Instant::ZERO,
            ping_sent: None,
            actions: Vec::new(),
            events: Vec::new(),
            stats: Stats::default(),
        }
    }

    /// Connects now (the first attempt has no wait).
    pub fn start(&mut self, now: Instant) {
        if self.state == State::Idle {
            self.attempt(now);
        }
    }

    /// Sends DISCONNECT when up, closes, and stays idle; unacknowledged publishes are dropped.
    pub fn stop(&mut self, now: Instant) {
        match self.state {
            State::Idle => return,
            State::Up => {
                self.send(now, vec![mqtt::kind::DISCONNECT << 4, 0]);
                self.events.push(Event::Down);
                self.actions.push(Action::Close);
            }
            State::Connecting { .. } | State::AwaitConnack { .. } => {
                self.actions.push(Action::Close)
            }
            State::Backoff { .. } => {}
        }
        self.state = State::Idle;
        self.inflight.clear();
        self.reset_link();
    }

    pub fn is_up(&self) -> bool {
        self.state == State::Up
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Publishes unacknowledged.
    pub fn inflight(&self) -> usize {
        self.inflight.len()
    }

    pub fn poll_action(&mut self) -> Option<Action> {
        // A few at a time, drained at once by the node: a Vec is small on flash.
        (!self.actions.is_empty()).then(|| self.actions.remove(0))
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        (!self.events.is_empty()).then(|| self.events.remove(0))
    }

    /// The one deadline: the next connect, a connect or CONNACK timeout, a PINGREQ or a missing
    /// PINGRESP. None while idle, and while up with keep-alive 0.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::Idle => None,
            State::Backoff { until } => Some(until),
            State::Connecting { deadline } | State::AwaitConnack { deadline } => Some(deadline),
            State::Up => {
                let ka = self.keep_alive()?;
                Some(match self.ping_sent {
                    Some(at) => at + ka,
                    None => self.last_send + ka,
                })
            }
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        match self.state {
            State::Idle => {}
            State::Backoff { until } => {
                if now >= until {
                    self.attempt(now);
                }
            }
            State::Connecting { deadline } | State::AwaitConnack { deadline } => {
                if now >= deadline {
                    info!("mqtt: no answer from the broker in time");
                    self.lost(now, true);
                }
            }
            State::Up => {
                let Some(ka) = self.keep_alive() else { return };
                match self.ping_sent {
                    // MQTT 3.1.1 §3.1.2.10: no PINGRESP in a reasonable time closes the link.
                    Some(at) if now >= at + ka => {
                        warn!("mqtt: no PINGRESP from the broker, reconnecting");
                        self.lost(now, true);
                    }
                    Some(_) => {}
                    None if now >= self.last_send + ka => {
                        self.send(now, vec![mqtt::kind::PINGREQ << 4, 0]);
                        self.ping_sent = Some(now);
                    }
                    None => {}
                }
            }
        }
    }

    /// The TCP connection is open: CONNECT goes out.
    pub fn connected(&mut self, now: Instant) {
        let State::Connecting { .. } = self.state else {
            return;
        };
        // MQTT 3.1.1 §3.1: protocol "MQTT" level 4, clean session, no will, user or password,
        // written as bytes (a unit test holds them to the codec's `connect`).
        let id = self.cfg.client_id.as_bytes();
        let len = 12 + id.len();
        if id.contains(&0) || len > 127 {
            // A client id that is no MQTT string, or longer than --mqtt-id allows; nothing will
            // change it.
            warn!("mqtt: cannot connect with this client id");
            self.actions.push(Action::Close);
            self.state = State::Idle;
            return;
        }
        let mut out = vec![0x10, len as u8, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02];
        out.extend_from_slice(&self.cfg.keep_alive.to_be_bytes());
        out.extend_from_slice(&(id.len() as u16).to_be_bytes());
        out.extend_from_slice(id);
        self.send(now, out);
        self.state = State::AwaitConnack {
            deadline: now + CONNECT_TIMEOUT,
        };
    }

    /// The connect failed (refused, unreachable).
    pub fn connect_failed(&mut self, now: Instant) {
        if let State::Connecting { .. } = self.state {
            self.lost(now, false);
        }
    }

    /// The broker closed the connection, or a read or write on it failed.
    pub fn closed(&mut self, now: Instant) {
        if matches!(
            self.state,
            State::Connecting { .. } | State::AwaitConnack { .. } | State::Up
        ) {
            info!("mqtt: the broker closed the connection");
            self.lost(now, false);
        }
    }

    /// Bytes read from the connection, in any chunking.
    pub fn received(&mut self, now: Instant, bytes: &[u8]) {
        if !matches!(self.state, State::AwaitConnack { .. } | State::Up) {
            return;
        }
        self.splitter.push(bytes);
        // A frame borrows the splitter: it is taken out while its packets are handled, so each
        // is acted on as decoded, with nothing copied but a message's payload.
        let mut splitter = core::mem::replace(&mut self.splitter, Splitter::new(0));
        let res = loop {
            match splitter.next_frame() {
                Ok(None) => break Ok(()),
                Ok(Some(frame)) => {
                    if let Err(log) = mqtt::decode_from_broker(frame)
                        .map_err(|_| true)
                        .and_then(|p| self.handle(now, p))
                    {
                        break Err(log);
                    }
                }
                Err(_) => break Err(true),
            }
        };
        self.splitter = splitter;
        if let Err(log) = res {
            // L§11: malformed input closes the connection. One text for every fault: this is
            // a rare line, and a text for each would cost flash on every board.
            if log {
                crate::warn_limited!(
                    now,
                    "mqtt: malformed or unexpected input from the broker, closing"
                );
            }
            self.lost(now, true);
        }
    }

    /// Publishes `payload` on `topic` at QoS 1.
    pub fn publish(&mut self, now: Instant, topic: Topic, payload: &[u8]) -> Result<u16, Dropped> {
        if self.state != State::Up {
            self.stats.dropped_not_up += 1;
            return Err(Dropped::NotUp);
        }
        // Header (at most 5), topic and id: the payload must fit the rest.
        let full = self.inflight.len() >= self.cfg.max_inflight;
        if full
            || payload.len() + 5 + 2 + topic.name().len() + 2
                > self.cfg.max_packet.min(mqtt::MAX_REMAINING)
        {
            // One warning for both causes: a line for each would cost flash on every board.
            let why = if full {
                self.stats.dropped_full += 1;
                "PUBACKs awaited"
            } else {
                self.stats.dropped_large += 1;
                "over the packet cap"
            };
            crate::warn_limited!(now, "mqtt: a publish on {} dropped: {why}", topic.name());
            return Err(if full {
                Dropped::QueueFull
            } else {
                Dropped::TooLarge
            });
        }
        let id = self.alloc_id();
        // MQTT 3.1.1 §3.3: PUBLISH at QoS 1, written as bytes (the topics are fixed and valid, the
        // size checked; a unit test holds it to the codec's `publish`).
        let name = topic.name().as_bytes();
        let len = 2 + name.len() + 2 + payload.len();
        let mut packet = Vec::with_capacity(len + 5);
        packet.push(mqtt::kind::PUBLISH << 4 | 0b0010);
        let mut v = len;
        loop {
            let byte = (v & 0x7f) as u8;
            v >>= 7;
            packet.push(if v > 0 { byte | 0x80 } else { byte });
            if v == 0 {
                break;
            }
        }
        packet.extend_from_slice(&(name.len() as u16).to_be_bytes());
        packet.extend_from_slice(name);
        packet.extend_from_slice(&id.to_be_bytes());
        packet.extend_from_slice(payload);
        self.send(now, packet.clone());
        self.inflight.push(Inflight { id, packet });
        Ok(id)
    }

    // ---- inside ---------------------------------------------------------------------------------

    fn keep_alive(&self) -> Option<Duration> {
        (self.cfg.keep_alive > 0).then(|| Duration::from_secs(u64::from(self.cfg.keep_alive)))
    }

    fn attempt(&mut self, now: Instant) {
        self.actions.push(Action::Connect);
        self.state = State::Connecting {
            deadline: now + CONNECT_TIMEOUT,
        };
    }

    fn send(&mut self, now: Instant, bytes: Vec<u8>) {
        self.last_send = now;
        self.actions.push(Action::Send(bytes));
    }

    fn reset_link(&mut self) {
        self.splitter.clear();
        self.sub_id = None;
        self.ping_sent = None;
    }

    /// The connection is gone (closed by us when `close`): wait, then connect again.
    fn lost(&mut self, now: Instant, close: bool) {
        if close {
            self.actions.push(Action::Close);
        }
        if self.state == State::Up {
            self.events.push(Event::Down);
        }
        self.reset_link();
        self.state = State::Backoff {
            until: now + self.backoff,
        };
        self.backoff = Duration::from_millis((self.backoff.millis() * 2).min(BACKOFF_MAX.millis()));
    }

    /// The next packet id: never 0, wrapping, never one still waiting for its ack.
    fn alloc_id(&mut self) -> u16 {
        loop {
            let id = self.next_id;
            self.next_id = self.next_id.checked_add(1).unwrap_or(1);
            if Some(id) != self.sub_id && !self.inflight.iter().any(|f| f.id == id) {
                return id;
            }
        }
    }

    /// One packet; an error closes the connection (true: to be logged as malformed).
    fn handle(&mut self, now: Instant, p: Packet<'_>) -> Result<(), bool> {
        match (self.state, p) {
            (State::AwaitConnack { .. }, Packet::ConnAck { code, .. }) => {
                if code != connack::ACCEPTED {
                    // 5 is "not authorized": an anonymous client on mosquitto 2 without
                    // `allow_anonymous true` (L§11).
                    warn!("mqtt: the broker refused the session (CONNACK {code})");
                    return Err(false);
                }
                info!("mqtt: connected to the broker");
                self.state = State::Up;
                self.backoff = BACKOFF_MIN;
                self.events.push(Event::Up);
                let id = self.alloc_id();
                self.sub_id = Some(id);
                // The three filters at QoS 1 (L§11), fixed: the packet is written as bytes
                // rather than by the codec's general encoder, which a board need not carry.
                let mut out = SUBSCRIBE.to_vec();
                out[2..4].copy_from_slice(&id.to_be_bytes());
                self.send(now, out);
                // MQTT 3.1.1 §4.4: unacknowledged publishes again, with DUP, in their order.
                for i in 0..self.inflight.len() {
                    self.inflight[i].packet[0] |= 0x08;
                    let packet = self.inflight[i].packet.clone();
                    self.send(now, packet);
                }
                Ok(())
            }
            // A first packet that is not CONNACK.
            (State::AwaitConnack { .. }, _) => Err(true),
            (_, Packet::SubAck { id, codes }) if Some(id) == self.sub_id => {
                self.sub_id = None;
                if codes.len() != Topic::SUBSCRIBED.len() {
                    return Err(true);
                }
                if codes.contains(&0x80) {
                    warn!("mqtt: the broker refused a subscription");
                }
                Ok(())
            }
            (_, Packet::PubAck(id)) => {
                if let Some(i) = self.inflight.iter().position(|f| f.id == id) {
                    self.inflight.remove(i);
                } else {
                    crate::warn_limited!(now, "mqtt: a PUBACK or message not for us, ignored");
                }
                Ok(())
            }
            (_, Packet::PingResp) => {
                self.ping_sent = None;
                Ok(())
            }
            // QoS 2 is refused: the subscriptions are QoS 1.
            (_, Packet::Publish(p)) if p.qos != QoS::ExactlyOnce => {
                if let Some(id) = p.id {
                    // MQTT 3.1.1 §4.3.2: PUBACK for QoS 1.
                    self.send(
                        now,
                        vec![mqtt::kind::PUBACK << 4, 2, (id >> 8) as u8, id as u8],
                    );
                    self.seen
                        .retain(|&(_, at)| now.saturating_since(at) < DUP_WINDOW);
                    if p.dup && self.seen.iter().any(|&(s, _)| s == id) {
                        self.stats.duplicates += 1;
                        return Ok(());
                    }
                    if let Some(i) = self.seen.iter().position(|&(s, _)| s == id) {
                        self.seen.remove(i);
                    }
                    if self.seen.len() >= DUP_IDS {
                        self.seen.remove(0);
                    }
                    self.seen.push((id, now));
                }
                match Topic::SUBSCRIBED.into_iter().find(|t| t.name() == p.topic) {
                    Some(topic) => self.events.push(Event::Message {
                        topic,
                        payload: p.payload.to_vec(),
                    }),
                    None => {
                        crate::warn_limited!(now, "mqtt: a message on a topic not ours, ignored")
                    }
                }
                Ok(())
            }
            // A second CONNACK, a SUBACK for no SUBSCRIBE of ours, QoS 2 and its handshake,
            // UNSUBACK (we never unsubscribe), the client's own packets.
            _ => Err(true),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONNACK_OK: [u8; 4] = [0x20, 2, 0, 0];

    fn at(ms: u64) -> Instant {
        Instant::from_millis(ms)
    }

    /// Every action so far.
    fn drain(s: &mut Session) -> Vec<Action> {
        std::iter::from_fn(|| s.poll_action()).collect()
    }

    fn events(s: &mut Session) -> Vec<Event> {
        std::iter::from_fn(|| s.poll_event()).collect()
    }

    fn sends(actions: &[Action]) -> Vec<Vec<u8>> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Send(b) => Some(b.clone()),
                _ => None,
            })
            .collect()
    }

    /// A session up at `now` with its SUBSCRIBE acked; the actions drained.
    fn up(cfg: Config, now: Instant) -> Session {
        let mut s = Session::new(cfg);
        s.start(now);
        assert_eq!(drain(&mut s), [Action::Connect]);
        s.connected(now);
        s.received(now, &CONNACK_OK);
        let out = sends(&drain(&mut s));
        let Ok(Packet::Subscribe { id, .. }) = mqtt::decode(&out[1]) else {
            panic!("SUBSCRIBE after CONNACK: {out:?}")
        };
        s.received(now, &[0x90, 5, (id >> 8) as u8, id as u8, 1, 1, 1]);
        assert!(s.is_up());
        assert_eq!(events(&mut s), [Event::Up]);
        assert!(drain(&mut s).is_empty());
        s
    }

    fn puback(id: u16) -> [u8; 4] {
        [0x40, 2, (id >> 8) as u8, id as u8]
    }

    fn publish_in(topic: &str, id: Option<u16>, dup: bool, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        mqtt::publish(
            &mqtt::Publish {
                dup,
                qos: if id.is_some() {
                    QoS::AtLeastOnce
                } else {
                    QoS::AtMostOnce
                },
                retain: false,
                topic,
                id,
                payload,
            },
            &mut out,
        )
        .unwrap();
        out
    }

    #[test]
    fn connect_sends_clean_session_with_id_and_keep_alive_0() {
        let mut s = Session::new(Config::default());
        assert_eq!(s.poll_timeout(), None);
        s.start(at(0));
        assert_eq!(drain(&mut s), [Action::Connect]);
        s.connected(at(5));
        let out = sends(&drain(&mut s));
        assert_eq!(
            mqtt::decode(&out[0]),
            Ok(Packet::Connect(mqtt::Connect {
                client_id: "miio_client",
                clean_session: true,
                keep_alive: 0,
                will: None,
                username: None,
                password: None,
            }))
        );
        assert_eq!(s.poll_timeout(), Some(at(5) + CONNECT_TIMEOUT));
    }

    #[test]
    fn the_connect_is_the_codecs() {
        for (id, ka) in [("miio_client", 0), ("x", 30), ("id-é", 65535)] {
            let mut s = Session::new(Config {
                client_id: id.into(),
                keep_alive: ka,
                ..Config::default()
            });
            s.start(at(0));
            s.connected(at(0));
            let mut want = Vec::new();
            let c = mqtt::Connect {
                client_id: id,
                clean_session: true,
                keep_alive: ka,
                will: None,
                username: None,
                password: None,
            };
            mqtt::connect(&c, &mut want).unwrap();
            assert_eq!(sends(&drain(&mut s)), vec![want], "{id}");
        }
    }

    #[test]
    fn the_fixed_subscribe_is_the_codecs() {
        let filters = Topic::SUBSCRIBED.map(|t| (t.name(), QoS::AtLeastOnce));
        let mut out = Vec::new();
        mqtt::subscribe(0x1234, &filters, &mut out).unwrap();
        let mut fixed = SUBSCRIBE.to_vec();
        fixed[2..4].copy_from_slice(&0x1234u16.to_be_bytes());
        assert_eq!(fixed, out);
    }

    #[test]
    fn connack_subscribes_to_the_three_inbound_topics_at_qos_1() {
        let mut s = Session::new(Config::default());
        s.start(at(0));
        s.connected(at(0));
        drain(&mut s);
        s.received(at(1), &CONNACK_OK);
        let out = sends(&drain(&mut s));
        assert_eq!(out.len(), 1);
        let Ok(Packet::Subscribe { id, filters }) = mqtt::decode(&out[0]) else {
            panic!("a SUBSCRIBE")
        };
        assert_ne!(id, 0);
        assert_eq!(
            filters.iter().collect::<Vec<_>>(),
            [
                ("miio/report", Some(QoS::AtLeastOnce)),
                ("miio/command_ack", Some(QoS::AtLeastOnce)),
                ("local/miio_client_in", Some(QoS::AtLeastOnce)),
            ]
        );
        assert_eq!(events(&mut s), [Event::Up]);
        // Keep-alive 0: an idle session that is up has no deadline.
        assert_eq!(s.poll_timeout(), None);
    }

    #[test]
    fn refused_connack_closes_and_backs_off() {
        let mut s = Session::new(Config::default());
        s.start(at(0));
        s.connected(at(0));
        drain(&mut s);
        s.received(at(0), &[0x20, 2, 0, connack::ID_REJECTED]);
        assert_eq!(drain(&mut s), [Action::Close]);
        assert_eq!(s.poll_timeout(), Some(at(1000)));
        assert!(events(&mut s).is_empty());
    }

    #[test]
    fn backoff_doubles_to_60_s_and_resets_on_connack() {
        let mut s = Session::new(Config::default());
        let mut now = at(0);
        s.start(now);
        let mut waits = Vec::new();
        for _ in 0..9 {
            assert_eq!(drain(&mut s), [Action::Connect]);
            s.connect_failed(now);
            let next = s.poll_timeout().unwrap();
            waits.push(next.saturating_since(now).millis() / 1000);
            s.handle_timeout(at(next.millis() - 1));
            assert!(drain(&mut s).is_empty(), "not before the deadline");
            now = next;
            s.handle_timeout(now);
        }
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(drain(&mut s), [Action::Connect]);
        s.connected(now);
        s.received(now, &CONNACK_OK);
        drain(&mut s);
        s.closed(now);
        assert_eq!(events(&mut s), [Event::Up, Event::Down]);
        assert_eq!(s.poll_timeout(), Some(now + BACKOFF_MIN));
    }

    #[test]
    fn silent_connect_or_broker_times_out() {
        let mut s = Session::new(Config::default());
        s.start(at(0));
        drain(&mut s);
        s.handle_timeout(at(10_000));
        assert_eq!(drain(&mut s), [Action::Close]);
        s.handle_timeout(at(11_000));
        assert_eq!(drain(&mut s), [Action::Connect]);
        s.connected(at(11_000));
        drain(&mut s);
        s.handle_timeout(at(21_000));
        assert_eq!(drain(&mut s), [Action::Close]);
        assert_eq!(s.poll_timeout(), Some(at(23_000)));
    }

    #[test]
    fn publish_qos1_ids_never_0_and_wrap() {
        let mut s = up(Config::default(), at(0));
        // The SUBSCRIBE took id 1.
        s.next_id = u16::MAX - 1;
        let mut ids = Vec::new();
        for _ in 0..3 {
            let id = s.publish(at(1), Topic::Command, b"{}").unwrap();
            ids.push(id);
            let out = sends(&drain(&mut s));
            let Ok(Packet::Publish(p)) = mqtt::decode(&out[0]) else {
                panic!("a PUBLISH")
            };
            assert_eq!(
                (p.qos, p.id, p.topic, p.dup, p.retain),
                (QoS::AtLeastOnce, Some(id), "miio/command", false, false)
            );
            s.received(at(2), &puback(id));
        }
        assert_eq!(ids, [u16::MAX - 1, u16::MAX, 1]);
        assert_eq!(s.inflight(), 0);
    }

    #[test]
    fn ids_in_flight_are_skipped() {
        let mut s = up(Config::default(), at(0));
        let first = s.publish(at(0), Topic::Command, b"1").unwrap();
        s.next_id = first;
        let second = s.publish(at(0), Topic::Command, b"2").unwrap();
        assert_ne!(first, second);
    }

    #[test]
    fn puback_matches_its_publish_only() {
        let mut s = up(Config::default(), at(0));
        let a = s.publish(at(0), Topic::Command, b"a").unwrap();
        let b = s.publish(at(0), Topic::ReportAck, b"b").unwrap();
        drain(&mut s);
        s.received(at(1), &puback(b));
        assert_eq!(s.inflight(), 1);
        s.received(at(1), &puback(999));
        assert_eq!(s.inflight(), 1, "an unknown id changes nothing");
        assert!(s.is_up(), "and does not close");
        s.received(at(1), &puback(a));
        assert_eq!(s.inflight(), 0);
    }

    #[test]
    fn unacked_publishes_go_again_with_dup_after_reconnect() {
        let mut s = up(Config::default(), at(0));
        let a = s.publish(at(0), Topic::Command, b"a").unwrap();
        let b = s.publish(at(0), Topic::LocalOut, b"b").unwrap();
        s.received(at(0), &puback(a));
        drain(&mut s);
        s.closed(at(1));
        assert_eq!(events(&mut s), [Event::Down]);
        // Dropped while down (L§11).
        assert_eq!(s.publish(at(2), Topic::Command, b"c"), Err(Dropped::NotUp));
        s.handle_timeout(at(1001));
        assert_eq!(drain(&mut s), [Action::Connect]);
        s.connected(at(1001));
        s.received(at(1002), &CONNACK_OK);
        let out = sends(&drain(&mut s));
        assert_eq!(out.len(), 3, "CONNECT, SUBSCRIBE, the one publish");
        let Ok(Packet::Publish(p)) = mqtt::decode(&out[2]) else {
            panic!("a PUBLISH")
        };
        assert_eq!((p.dup, p.id, p.payload), (true, Some(b), &b"b"[..]));
        assert_eq!(s.stats().dropped_not_up, 1);
        s.received(at(1003), &puback(b));
        assert_eq!(s.inflight(), 0);
    }

    #[test]
    fn a_full_queue_drops_the_new_publish() {
        let cfg = Config {
            max_inflight: 2,
            ..Config::default()
        };
        let mut s = up(cfg, at(0));
        let a = s.publish(at(0), Topic::Command, b"a").unwrap();
        s.publish(at(0), Topic::Command, b"b").unwrap();
        assert_eq!(
            s.publish(at(0), Topic::Command, b"c"),
            Err(Dropped::QueueFull)
        );
        assert_eq!(s.stats().dropped_full, 1);
        s.received(at(1), &puback(a));
        assert!(s.publish(at(1), Topic::Command, b"d").is_ok());
    }

    #[test]
    fn a_publish_above_the_cap_is_dropped() {
        let cfg = Config {
            max_packet: 64,
            ..Config::default()
        };
        let mut s = up(cfg, at(0));
        assert_eq!(
            s.publish(at(0), Topic::Command, &[b'x'; 64]),
            Err(Dropped::TooLarge)
        );
        assert!(s.publish(at(0), Topic::Command, &[b'x'; 30]).is_ok());
    }

    #[test]
    fn received_publishes_are_events_and_qos1_is_acked() {
        let mut s = up(Config::default(), at(0));
        let mut stream = publish_in("miio/report", Some(7), false, b"{\"id\":1}\0");
        stream.extend(publish_in("local/miio_client_in", None, false, b"{}"));
        // One byte at a time.
        for b in &stream {
            s.received(at(1), core::slice::from_ref(b));
        }
        assert_eq!(sends(&drain(&mut s)), [puback(7).to_vec()]);
        assert_eq!(
            events(&mut s),
            [
                Event::Message {
                    topic: Topic::Report,
                    payload: b"{\"id\":1}\0".to_vec()
                },
                Event::Message {
                    topic: Topic::LocalIn,
                    payload: b"{}".to_vec()
                },
            ]
        );
        // A topic the daemon does not read is acked and ignored.
        s.received(at(2), &publish_in("miio/command", Some(8), false, b"{}"));
        assert_eq!(sends(&drain(&mut s)), [puback(8).to_vec()]);
        assert!(events(&mut s).is_empty());
    }

    #[test]
    fn a_dup_within_60_s_is_acked_not_delivered() {
        let mut s = up(Config::default(), at(0));
        s.received(at(0), &publish_in("miio/report", Some(5), false, b"a"));
        assert_eq!(events(&mut s).len(), 1);
        s.received(at(59_999), &publish_in("miio/report", Some(5), true, b"a"));
        assert_eq!(
            sends(&drain(&mut s)),
            [puback(5).to_vec(), puback(5).to_vec()]
        );
        assert!(events(&mut s).is_empty());
        assert_eq!(s.stats().duplicates, 1);
        // After 60 s it is a new message; so is a reused id without DUP.
        s.received(at(60_000), &publish_in("miio/report", Some(5), true, b"a"));
        s.received(at(60_001), &publish_in("miio/report", Some(5), false, b"b"));
        assert_eq!(events(&mut s).len(), 2);
    }

    #[test]
    fn malformed_or_unexpected_input_closes() {
        for bad in [
            &[0x62, 2, 0, 1][..],             // PUBREL
            &[0x34, 5, 0, 1, b't', 0, 1][..], // QoS 2
            &[0x20, 2, 0, 0][..],             // second CONNACK
            &[0x40, 2, 0, 0][..],             // packet id 0
            &[0xf0, 0][..],                   // reserved type
            &[0x30, 0xff, 0xff, 0xff, 0xff][..],
            &[0x30, 0xff, 0xff, 0x7f][..], // above the cap
        ] {
            let mut s = up(Config::default(), at(0));
            s.received(at(1), bad);
            assert_eq!(drain(&mut s), [Action::Close], "{bad:02x?}");
            assert_eq!(events(&mut s), [Event::Down]);
            assert_eq!(s.poll_timeout(), Some(at(1001)));
        }
    }

    #[test]
    fn keep_alive_pings_when_idle_and_closes_without_pingresp() {
        let cfg = Config {
            keep_alive: 30,
            ..Config::default()
        };
        let mut s = up(cfg, at(0));
        assert_eq!(s.poll_timeout(), Some(at(30_000)));
        // A publish postpones the ping.
        s.publish(at(10_000), Topic::Command, b"x").unwrap();
        drain(&mut s);
        assert_eq!(s.poll_timeout(), Some(at(40_000)));
        s.handle_timeout(at(40_000));
        assert_eq!(sends(&drain(&mut s)), [vec![0xc0, 0]]);
        s.received(at(40_010), &[0xd0, 0]);
        assert_eq!(s.poll_timeout(), Some(at(70_000)));
        s.handle_timeout(at(70_000));
        drain(&mut s);
        assert_eq!(s.poll_timeout(), Some(at(100_000)));
        s.handle_timeout(at(100_000));
        assert_eq!(drain(&mut s), [Action::Close]);
        assert_eq!(events(&mut s), [Event::Down]);
    }

    #[test]
    fn keep_alive_0_never_pings() {
        let mut s = up(Config::default(), at(0));
        s.handle_timeout(at(10_000_000));
        assert!(drain(&mut s).is_empty());
        assert_eq!(s.poll_timeout(), None);
    }

    #[test]
    fn stop_disconnects() {
        let mut s = up(Config::default(), at(0));
        s.publish(at(0), Topic::Command, b"x").unwrap();
        drain(&mut s);
        s.stop(at(1));
        assert_eq!(drain(&mut s), [Action::Send(vec![0xe0, 0]), Action::Close]);
        assert_eq!(events(&mut s), [Event::Down]);
        assert_eq!(s.poll_timeout(), None);
        assert_eq!(s.inflight(), 0);
    }

    #[test]
    fn topics_round_trip() {
        for t in Topic::ALL {
            assert_eq!(Topic::from_name(t.name()), Some(t));
        }
        assert_eq!(Topic::from_name("miio/other"), None);
    }
}
