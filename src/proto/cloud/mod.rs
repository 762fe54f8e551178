//! The cloud link machine (PROTOCOL.md §5): server list, connect, hello and time sync, `_otc.info`,
//! keepalive and pings, upstream requests with id rewrite and acks, downstream commands with
//! first-reply-wins, the reply cache, the periodic refresh and the reconnect backoff.
//!
//! Contract (ARCHITECTURE.md §3): sans-IO. No socket, no clock, no file. Inputs are `start`, `stop`,
//! `handle_*(now, ..)`, `upstream`, `local_reply`, `self_reply`. Each takes the node's [`Outbox`] and
//! pushes its effects into it in the order it decides them (`Resolve`, `Connect`, `CloudSend`,
//! `CloudClose`, and `Local(Send)` for a message to one local client); what the node decides is an
//! [`Event`], drained with [`Cloud::poll_event`]. [`Cloud::poll_timeout`] is the earliest non-lazy
//! deadline. Randomness (cloud
//! ids, DNS shuffle, backoff jitter) comes from a PRNG seeded by the caller ([`CloudConfig::seed`]).
//!
//! The reactor's side of the protocol (the actions of `proto::outbox`):
//! - `Resolve{transport, host, port, attempt}`: resolve off the loop, then call
//!   [`Cloud::handle_resolved`] with `attempt` and the IPv4 A records or an error text. The machine
//!   owns the 10 s DNS deadline; a late answer (an older attempt) is ignored. Nothing is filtered by the
//!   reactor: the machine drops 0/8, 127/8, 224/3 (P§5.1 D1). The first-octet rule needs the local
//!   address on the route, so it is checked in [`Cloud::handle_connected`].
//! - `Connect{transport, addr}`: drop any previous cloud socket, open a new one (UDP: a new connected
//!   socket; TCP: a non-blocking connect). Call [`Cloud::handle_connected`] with the socket's local
//!   address once it is set up (UDP: at once), or [`Cloud::handle_connect_failed`]. The machine owns
//!   the 5 s connect deadline.
//! - `CloudSend(bytes)`: one packet on the current cloud socket (one datagram, or bytes on the stream).
//! - `CloudClose`: close the cloud socket. Data read after it must not be delivered.
//! - Received data: [`Cloud::handle_datagram`] (UDP, one datagram each) or [`Cloud::handle_stream`]
//!   (TCP, any chunking, chunks of at most 64 KiB). EOF or a socket error: [`Cloud::handle_link_down`].
//!   `ECONNREFUSED` on the UDP socket is NOT reported: it counts as nothing received (P§5.6).
//! - `Local(Send(conn, text))`: an ack with its id restored, or an error, for one local client.
//!
//! The node's side: [`Event::NeedInfo`] (answer with [`Cloud::handle_info`]: the helper's
//! `_internal.info` answer, or the daemon's own `{"params":{..}}`), [`Event::Command`],
//! [`Event::SelfMethod`], [`Event::State`] and, in the bootstrap session of a did 0 or 1,
//! [`Event::Didkey`] (P§5.11).

use core::fmt;
use std::net::SocketAddrV4;

use log::debug;
use serde_json::Value;

use super::downstream::{self, Downstream, Rng, CACHE_MAX_TEXT};
use super::local::{ConnId, LocalAction};
use super::outbox::{Action, Outbox};
use crate::time::{Duration, Instant};
use crate::timer::TimerWheel;
use crate::wire::crypto::Keys;
use crate::wire::miio::{self, Packet};
use crate::wire::rpc::{self, Members};

mod commands;
mod config;
mod didkey;
mod servers;
mod session;
#[cfg(test)]
mod testkit;
mod upstream;

pub use config::{default_hosts, CloudConfig, DidkeyAsk, Endpoint, Transport};
pub use didkey::Didkey;
use servers::Server;
use upstream::{Origin, Upstream};

/// Hello resend period and the wait after the last one (P§5.3 D4).
const HELLO_PERIOD: Duration = Duration::from_secs(5);
/// Hellos sent before an attempt fails (P§5.3 D4).
const HELLO_TRIES: u8 = 3;
/// TCP connect deadline (P§5.2).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Refresh: how long to wait for the time-sync reply before `_otc.info` (P§5.10).
const REFRESH_HELLO_WAIT: Duration = Duration::from_secs(5);
/// How long the session start waits for the node's info (its helper timeout is 10 s, LOCAL_API.md §9)
/// before the attempt fails: a guard, so that a lost answer cannot stall the link for ever.
const INFO_WAIT: Duration = Duration::from_secs(30);
/// DNS answers kept per name: bounded memory whatever the resolver returns.
const MAX_DNS: usize = 16;
/// Keepalive misses that declare the link lost (P§5.6).
const KEEPALIVE_MISSES: u8 = 3;
/// UDP retransmissions of an unacked upstream request (P§5.7 D5).
const RETRANSMITS: u8 = 3;
/// Pending upstream requests (P§5.7).
const MAX_UPSTREAM: usize = 128;
/// Keepalive stamps remembered to tell a pong from a cloud ping (P§5.6).
const SENT_STAMPS: usize = 8;
/// Default refresh period when the cloud sends no `otc_test.interval` (P§5.4).
const DEFAULT_REFRESH: Duration = Duration::from_secs(1800);
/// Shortest refresh period taken from the cloud: a bad value must not make us chatter.
const MIN_CLOUD_REFRESH: Duration = Duration::from_secs(60);
/// `otc_list` entries kept: bounded memory whatever the cloud sends.
const MAX_OTC_LIST: usize = 16;
/// Ids of upstream requests: 1..=2^31-1, never 0 (P§5.7 D5).
const MAX_CLOUD_ID: u32 = 0x7fff_ffff;

/// Changes the node turns into states and `local.status` broadcasts (LOCAL_API.md §6, §7).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloudEvent {
    /// An attempt began: state `cloud_trying` (not broadcast).
    Trying,
    /// A server address resolved and the socket is set up: broadcast `internet_connected`.
    InternetConnected,
    /// Name resolution or connect failed: broadcast `internet_failed`.
    InternetFailed,
    /// Session up (after the D12 idle report on the first one): state and broadcast `cloud_connected`.
    Connected,
    /// An attempt failed or the link was lost: state and broadcast `cloud_retry`.
    Retry,
}

/// What the cloud machine leaves to the node to decide. Its socket and resolver effects, and its
/// messages to local clients, go straight into the [`Outbox`] passed to each call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// Get the device info; answer with [`Cloud::handle_info`].
    NeedInfo,
    /// A cloud command to broadcast verbatim to local clients (P§5.8 D6). `id` is the tracked id, if
    /// any; the node answers at once with `self_reply(-9999)` if it collides with a pending LAN id (P§4.7).
    Command { text: String, id: Option<u32> },
    /// A method the daemon answers itself (P§4.6); answer with [`Cloud::self_reply`] when `id` is set.
    SelfMethod {
        id: Option<u32>,
        method: String,
        params: Value,
    },
    /// A change of the link for the node's state and broadcasts.
    State(CloudEvent),
    /// The bootstrap session's did/key exchange (P§5.11).
    Didkey(Didkey),
}

/// A message for one local client only (an ack with its id restored, or an error).
fn local_send(client: ConnId, text: String) -> Action {
    Action::Local(LocalAction::Send(client, text.into()))
}

/// The machine's state as the node reports it (LOCAL_API.md §7).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloudState {
    /// Not started, or stopped (AP mode, shutdown).
    Stopped,
    /// `cloud_trying`.
    Trying,
    /// `cloud_connected` (announced).
    Connected,
    /// `cloud_retry`: waiting for the backoff.
    Retry,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Timer {
    Backoff,
    /// The resolver's answer is due (a thread that never starts or never returns).
    Dns,
    Connect,
    Hello,
    /// The session start waits for `handle_info`.
    Info,
    Keepalive,
    Refresh,
    RefreshHello,
    /// Ack deadline of an upstream request, by cloud id.
    Ack(u32),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Stopped,
    /// Waiting for the backoff timer.
    Retry,
    Resolving,
    Connecting,
    /// Hello sent, waiting for the time sync.
    Hello,
    /// Time synced; getting the info or waiting for the `_otc.info` ack.
    Info,
    /// `_otc.info` acked: session up.
    Up,
}

/// What outlives one cloud machine within a run: the id counter (P§5.7 D5: ids unique for the life
/// of the process), the PRNG, and whether `ota_state idle` went up (D12: once per start). The node
/// builds a new machine for each identity or Wi-Fi change and hands this on ([`Cloud::carry`],
/// [`Cloud::resume`]).
#[derive(Clone, Debug)]
pub struct Carry {
    rng: Rng,
    next_id: u32,
    idle_reported: bool,
}

/// The cloud link machine. See the module doc for the reactor protocol.
pub struct Cloud {
    cfg: CloudConfig,
    keys: Keys,
    rng: Rng,
    wheel: TimerWheel<Timer>,
    events: Vec<Event>,
    phase: Phase,
    /// `Connected` emitted for this session.
    announced: bool,
    /// The transport of the socket the reactor holds, if any.
    link: Option<Transport>,
    /// Bumped on every new socket: a handler can tell whether the link changed under it.
    generation: u32,
    /// The tag of the last `Resolve`: only its answer is taken.
    dns_attempt: u32,
    current: Option<Server>,

    // Server list (P§5.1): the list of transport `tidx`, when `list_built`.
    tidx: usize,
    list_built: bool,
    list: Vec<Server>,
    pos: usize,
    otc_list: Vec<SocketAddrV4>,
    cloud_interval: Duration,
    /// k of D4: consecutive failures.
    failures: u32,

    // Stamps (P§4.3, §5.5).
    offset: i64,
    last_tx: u32,
    sent_stamps: [u32; SENT_STAMPS],
    sent_idx: usize,
    last_rx: Option<u32>,
    hello_out: bool,
    hellos: u8,

    // Keepalive (P§5.6).
    ka_sent: bool,
    rx_since_ka: bool,
    misses: u8,

    info_for: Option<bool>,
    rx_buf: Vec<u8>,
    /// Buffers reused on the path of every report and ack, so that it allocates only what it
    /// hands on: a packet's plaintext as opened, an ack's text as rewritten for its client.
    rx_plain: Vec<u8>,
    scratch: String,
    next_id: u32,
    ups: Vec<Upstream>,
    /// Pending cloud commands by cloud command id, and the replies cached by id (P§5.8).
    downs: Downstream<u32, u32>,
    idle_reported: bool,
    bind: Option<(String, Option<String>)>,
}

impl Cloud {
    pub fn new(cfg: CloudConfig) -> Cloud {
        let mut rng = Rng::new(cfg.seed);
        let next_id = 1 + rng.below(u64::from(MAX_CLOUD_ID)) as u32;
        let keys = Keys::new(&cfg.key);
        let downs = Downstream::new(cfg.max_cloud_payload.max(CACHE_MAX_TEXT));
        Cloud {
            cfg,
            keys,
            rng,
            wheel: TimerWheel::new(),
            events: Vec::new(),
            phase: Phase::Stopped,
            announced: false,
            link: None,
            generation: 0,
            dns_attempt: 0,
            current: None,
            tidx: 0,
            list_built: false,
            list: Vec::new(),
            pos: 0,
            otc_list: Vec::new(),
            cloud_interval: DEFAULT_REFRESH,
            failures: 0,
            offset: 0,
            last_tx: 0,
            sent_stamps: [0; SENT_STAMPS],
            sent_idx: 0,
            last_rx: None,
            hello_out: false,
            hellos: 0,
            ka_sent: false,
            rx_since_ka: false,
            misses: 0,
            info_for: None,
            rx_buf: Vec::new(),
            rx_plain: Vec::new(),
            scratch: String::new(),
            next_id,
            ups: Vec::new(),
            downs,
            idle_reported: false,
            bind: None,
        }
    }

    /// What the next machine of this run must continue from (see [`Carry`]).
    pub fn carry(&self) -> Carry {
        Carry {
            rng: self.rng.clone(),
            next_id: self.next_id,
            idle_reported: self.idle_reported,
        }
    }

    /// Continues the run of an earlier machine: call before [`Cloud::start`].
    pub fn resume(&mut self, c: Carry) {
        self.rng = c.rng;
        self.next_id = c.next_id;
        self.idle_reported = c.idle_reported;
    }

    // ---- outputs ---------------------------------------------------------------------------

    /// What the node must decide next.
    pub fn poll_event(&mut self) -> Option<Event> {
        (!self.events.is_empty()).then(|| self.events.remove(0))
    }

    /// The earliest deadline that must wake the daemon.
    pub fn poll_timeout(&self) -> Option<Instant> {
        [self.wheel.earliest(), self.downs.poll_timeout()]
            .into_iter()
            .flatten()
            .min()
    }

    pub fn state(&self) -> CloudState {
        match self.phase {
            Phase::Stopped => CloudState::Stopped,
            Phase::Retry => CloudState::Retry,
            Phase::Up if self.announced => CloudState::Connected,
            _ => CloudState::Trying,
        }
    }

    /// For `local.prep_suspend` (LOCAL_API.md §12): upstream awaiting an ack, or an attempt in progress.
    pub fn is_busy(&self) -> bool {
        !self.ups.is_empty()
            || matches!(
                self.phase,
                Phase::Resolving | Phase::Connecting | Phase::Hello | Phase::Info
            )
    }

    /// The device stamp: boottime seconds + the time-sync offset (P§4.3). For LAN replies and `local.time`.
    pub fn stamp(&self, now: Instant) -> u32 {
        secs(now).wrapping_add(self.offset) as u32
    }

    /// The offset set by the last accepted time sync (0 before).
    pub fn offset(&self) -> i64 {
        self.offset
    }

    /// After a provisioning in this run: `uid` and the phone's `bind_key` go into `_otc.info` (P§5.4).
    pub fn set_bind(&mut self, uid: String, bindkey: Option<String>) {
        self.bind = Some((uid, bindkey));
    }

    /// `params` (the helper's, or the daemon's own) with `model`, `mac` (upper case), `token` and
    /// `life` appended or replaced (P§5.4). Without `uid`/`bindkey`: this is also INFO for `miIO.info`.
    pub fn info_params(&self, now: Instant, params: &Members) -> Members {
        let mut p = params.clone();
        p.set_str("model", &self.cfg.model);
        p.set_str("mac", &self.cfg.mac.to_ascii_uppercase());
        p.set_str("token", &self.cfg.token_hex);
        p.set("life", secs(now).to_string());
        p
    }

    // ---- life cycle ------------------------------------------------------------------------

    /// Starts connecting at once (P§5.9 D4: the first attempt is immediate). No-op when running.
    pub fn start(&mut self, now: Instant, out: &mut Outbox) {
        if self.phase != Phase::Stopped {
            return;
        }
        self.failures = 0;
        self.begin_attempt(now, out);
    }

    /// Closes everything: AP mode, a new identity, shutdown. Pending upstream senders get -30011.
    pub fn stop(&mut self, _now: Instant, out: &mut Outbox) {
        if self.phase == Phase::Stopped {
            return;
        }
        self.end_session(out);
        self.wheel = TimerWheel::new();
        self.phase = Phase::Stopped;
        self.list_built = false;
        self.list.clear();
        self.tidx = 0;
        self.pos = 0;
    }

    pub fn handle_timeout(&mut self, now: Instant, out: &mut Outbox) {
        // In deadline order across the wheel and the command table, as when both were one wheel:
        // after a suspend, a command's -9999 still goes up before a later keepalive loses the link.
        loop {
            let wheel = self.wheel.earliest().filter(|&t| t <= now);
            let down = self.downs.poll_timeout().filter(|&t| t <= now);
            match (wheel, down) {
                (w, Some(d)) if w.is_none_or(|w| d < w) => {
                    if let Some(p) = self.downs.pop_due(now) {
                        let reply = p.timeout_reply(now, p.origin);
                        self.reply_sent(now, p.origin, reply, out);
                    }
                }
                (Some(_), _) => match self.wheel.pop_due(now) {
                    Some(t) => self.fire(now, t, out),
                    None => break,
                },
                _ => break,
            }
        }
    }

    fn fire(&mut self, now: Instant, t: Timer, out: &mut Outbox) {
        match t {
            Timer::Backoff => {
                if self.phase == Phase::Retry {
                    self.begin_attempt(now, out);
                }
            }
            Timer::Dns => {
                if self.phase == Phase::Resolving {
                    self.build_list(Vec::new());
                    self.dns_failed(now, "no answer within 10 s", out);
                }
            }
            Timer::Connect => {
                if self.phase == Phase::Connecting {
                    self.connect_failed(now, "connect timeout", out);
                }
            }
            Timer::Hello => self.hello_tick(now, out),
            Timer::Info => {
                if self.phase == Phase::Info && self.info_for == Some(true) {
                    self.fail(now, "no device info", out);
                }
            }
            Timer::Keepalive => self.keepalive_tick(now, out),
            Timer::Refresh => self.refresh_tick(now, out),
            Timer::RefreshHello => {
                // P§5.10: 5 s without a time-sync reply; go on with `_otc.info`.
                if self.phase == Phase::Up {
                    self.hello_out = false;
                    self.want_info(false);
                }
            }
            Timer::Ack(id) => self.ack_timeout(now, id, out),
        }
    }

    // ---- sending ---------------------------------------------------------------------------

    /// One data packet on the link, with a stamp that never decreases in the session (P§5.5 D4).
    fn send_json(&mut self, now: Instant, text: &str, out: &mut Outbox) {
        if self.link.is_none() {
            debug!("no cloud link, message not sent");
            return;
        }
        let stamp = self.stamp(now).max(self.last_tx);
        self.last_tx = stamp;
        let pkt = miio::seal(&self.keys, self.cfg.did, stamp, text.as_bytes());
        out.push(Action::CloudSend(pkt));
    }

    fn note(&mut self, e: Event) {
        self.events.push(e);
    }
}

/// Collection sizes for the month simulation (`proto::sim`): each must stay bounded.
#[cfg(test)]
impl Cloud {
    pub(crate) fn debug_sizes(&self, out: &mut Vec<(&'static str, usize)>) {
        out.extend([
            ("cloud.wheel", self.wheel.len()),
            ("cloud.actions", self.events.len()),
            ("cloud.list", self.list.len()),
            ("cloud.otc_list", self.otc_list.len()),
            ("cloud.ups", self.ups.len()),
            ("cloud.downs", self.downs.len()),
            ("cloud.downs_held", self.downs.held()),
            ("cloud.reply_cache", self.downs.cache_len()),
            ("cloud.rx_buf", self.rx_buf.len()),
        ]);
    }
}

/// How long the resolver may take (P§5.1); then the attempt fails as a DNS failure.
const DNS_TIMEOUT: Duration = Duration::from_secs(10);

/// The latest plausible server time in a time-sync reply: 0xF0000000 (2097-08-05), 268 million
/// seconds below the end of the u32 stamp.
const MAX_SERVER_STAMP: u32 = 0xF000_0000;

fn secs(now: Instant) -> i64 {
    i64::try_from(now.secs()).unwrap_or(i64::MAX)
}
