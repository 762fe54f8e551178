//! The cloud link machine (PROTOCOL.md §5): server list, connect, hello and time sync, `_otc.info`,
//! keepalive and pings, upstream requests with id rewrite and acks, downstream commands with
//! first-reply-wins, the reply cache, the periodic refresh and the reconnect backoff.
//!
//! Contract (ARCHITECTURE.md §3): sans-IO. No socket, no clock, no file. Inputs are `start`, `stop`,
//! `handle_*(now, ..)`, `upstream`, `local_reply`, `self_reply`; outputs are [`Action`]s drained with
//! [`Cloud::poll_action`]; [`Cloud::poll_timeout`] is the earliest non-lazy deadline. Randomness (cloud
//! ids, DNS shuffle, backoff jitter) comes from a PRNG seeded by the caller ([`CloudConfig::seed`]).
//!
//! The reactor's side of the protocol:
//! - `Resolve{transport, host, port, attempt}`: resolve off the loop, then call
//!   [`Cloud::handle_resolved`] with `attempt` and the IPv4 A records or an error text. The machine
//!   owns the 10 s DNS deadline; a late answer (an older attempt) is ignored. Nothing is filtered by the
//!   reactor: the machine drops 0/8, 127/8, 224/3 (P§5.1 D1). The first-octet rule needs the local
//!   address on the route, so it is checked in [`Cloud::handle_connected`].
//! - `Connect{transport, addr}`: drop any previous cloud socket, open a new one (UDP: a new connected
//!   socket; TCP: a non-blocking connect). Call [`Cloud::handle_connected`] with the socket's local
//!   address once it is set up (UDP: at once), or [`Cloud::handle_connect_failed`]. The machine owns
//!   the 5 s connect deadline.
//! - `Send(bytes)`: one packet on the current cloud socket (one datagram, or bytes on the stream).
//! - `Close`: close the cloud socket. Data read after it must not be delivered.
//! - Received data: [`Cloud::handle_datagram`] (UDP, one datagram each) or [`Cloud::handle_stream`]
//!   (TCP, any chunking, chunks of at most 64 KiB). EOF or a socket error: [`Cloud::handle_link_down`].
//!   `ECONNREFUSED` on the UDP socket is NOT reported: it counts as nothing received (P§5.6).
//! - `NeedInfo`: answer with [`Cloud::handle_info`] (the helper's `_internal.info` answer, or the
//!   daemon's own `{"params":{..}}`).
//! - `ToClient`, `Command`, `SelfMethod`, `Event`: for the node (see [`Action`]).

use core::fmt;
use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddrV4};

use log::{debug, info, warn};
use serde_json::{Map, Value};

use super::downstream::{self, Downstream, Rng, CACHE_MAX_TEXT};
use super::local::ConnId;
use crate::time::{Duration, Instant};
use crate::timer::TimerWheel;
use crate::wire::crypto::Keys;
use crate::wire::miio::{self, Packet};
use crate::wire::rpc::{self, Members};

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

/// A cloud transport (P§5.2): the one type, from the command line's `--transports` on.
pub use crate::cli::Transport;

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Transport::Udp => "UDP",
            Transport::Tcp => "TCP",
        })
    }
}

/// One transport's server: a host name or IPv4 literal and a port (P§5.1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    /// Set by `-H`, `--udp-host`, `--tcp-host`: its addresses are never filtered (P§5.1 D1).
    pub explicit: bool,
}

/// Everything the machine needs to know, fixed for a run.
#[derive(Clone)]
pub struct CloudConfig {
    pub did: u32,
    /// The cloud key: 16 ASCII characters used as bytes (P§2.5). Secret.
    pub key: [u8; 16],
    pub model: String,
    pub mac: String,
    /// 32 lowercase hex chars of the token, for `_otc.info` (P§5.4). Secret.
    pub token_hex: String,
    /// Order of the transports tried (`--transports`).
    pub transports: Vec<Transport>,
    pub udp: Endpoint,
    pub tcp: Endpoint,
    pub keepalive: Duration,
    pub ack_timeout: Duration,
    pub user_ack_timeout: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// `-i`: overrides `otc_test.interval` (P§5.10).
    pub refresh: Option<Duration>,
    pub max_cloud_payload: usize,
    pub seed: u64,
}

impl CloudConfig {
    /// The defaults of P§5.1–§5.9 for a device identity; `cc` is the country code (`-C`).
    pub fn new(did: u32, key: [u8; 16], model: &str, mac: &str, token_hex: &str, cc: &str) -> Self {
        let (udp, tcp) = default_hosts(cc);
        CloudConfig {
            did,
            key,
            model: model.to_owned(),
            mac: mac.to_owned(),
            token_hex: token_hex.to_owned(),
            transports: vec![Transport::Udp, Transport::Tcp],
            udp: Endpoint {
                host: udp,
                port: 8053,
                explicit: false,
            },
            tcp: Endpoint {
                host: tcp,
                port: 80,
                explicit: false,
            },
            keepalive: Duration::from_secs(20),
            ack_timeout: Duration::from_secs(3),
            user_ack_timeout: Duration::from_secs(5),
            backoff_min: Duration::from_secs(5),
            backoff_max: Duration::from_secs(300),
            refresh: None,
            max_cloud_payload: 1024,
            seed: 0,
        }
    }
}

/// Default host names for a country code: `<cc>.ot.io.mi.com` unless it is empty or `cn` (P§5.1 D1).
pub fn default_hosts(cc: &str) -> (String, String) {
    if cc.is_empty() || cc.eq_ignore_ascii_case("cn") {
        ("ot.io.mi.com".into(), "ott.io.mi.com".into())
    } else {
        (format!("{cc}.ot.io.mi.com"), format!("{cc}.ott.io.mi.com"))
    }
}

// The key and token never reach a log line (P§2.5).
impl fmt::Debug for CloudConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CloudConfig")
            .field("did", &self.did)
            .field("key", &"<redacted>")
            .field("model", &self.model)
            .field("mac", &self.mac)
            .field("token_hex", &"<redacted>")
            .field("transports", &self.transports)
            .field("udp", &self.udp)
            .field("tcp", &self.tcp)
            .field("keepalive", &self.keepalive)
            .field("ack_timeout", &self.ack_timeout)
            .field("user_ack_timeout", &self.user_ack_timeout)
            .field("backoff_min", &self.backoff_min)
            .field("backoff_max", &self.backoff_max)
            .field("refresh", &self.refresh)
            .field("max_cloud_payload", &self.max_cloud_payload)
            .finish_non_exhaustive()
    }
}

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

/// What the reactor or the node must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Resolve `host` off the loop; answer with [`Cloud::handle_resolved`] and `attempt`.
    Resolve {
        transport: Transport,
        host: String,
        port: u16,
        attempt: u32,
    },
    /// Open a new cloud socket to `addr`; answer with `handle_connected` / `handle_connect_failed`.
    Connect {
        transport: Transport,
        addr: SocketAddrV4,
    },
    /// One packet on the current cloud socket.
    Send(Vec<u8>),
    /// Close the cloud socket.
    Close,
    /// Get the device info; answer with [`Cloud::handle_info`].
    NeedInfo,
    /// A message for one local client only (an ack with its id restored, or an error).
    ToClient {
        client: ConnId,
        text: String,
    },
    /// A cloud command to broadcast verbatim to local clients (P§5.8 D6). `id` is the tracked id, if
    /// any; the node answers at once with `self_reply(-9999)` if it collides with a pending LAN id (P§4.7).
    Command {
        text: String,
        id: Option<u32>,
    },
    /// A method the daemon answers itself (P§4.6); answer with [`Cloud::self_reply`] when `id` is set.
    SelfMethod {
        id: Option<u32>,
        method: String,
        params: Value,
    },
    Event(CloudEvent),
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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Server {
    addr: SocketAddrV4,
    from_dns: bool,
}

#[derive(Clone, Debug)]
enum Origin {
    Client {
        client: ConnId,
        orig: u64,
    },
    /// A client's request whose client has gone: still retransmitted, its ack or error dropped.
    Gone,
    Info {
        refresh: bool,
    },
    IdleReport,
}

#[derive(Clone, Debug)]
struct Upstream {
    cloud_id: u32,
    origin: Origin,
    /// The text as sent (id rewritten), kept for retransmission.
    text: String,
    sends: u8,
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
    actions: VecDeque<Action>,
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
            actions: VecDeque::new(),
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

    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
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
    pub fn start(&mut self, now: Instant) {
        if self.phase != Phase::Stopped {
            return;
        }
        self.failures = 0;
        self.begin_attempt(now);
    }

    /// Closes everything: AP mode, a new identity, shutdown. Pending upstream senders get -30011.
    pub fn stop(&mut self, _now: Instant) {
        if self.phase == Phase::Stopped {
            return;
        }
        self.end_session();
        self.wheel = TimerWheel::new();
        self.phase = Phase::Stopped;
        self.list_built = false;
        self.list.clear();
        self.tidx = 0;
        self.pos = 0;
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(t) = self.wheel.pop_due(now) {
            self.fire(now, t);
        }
        while let Some(p) = self.downs.pop_due(now) {
            let reply = p.timeout_reply(now, p.origin);
            self.reply_sent(now, p.origin, reply);
        }
    }

    fn fire(&mut self, now: Instant, t: Timer) {
        match t {
            Timer::Backoff => {
                if self.phase == Phase::Retry {
                    self.begin_attempt(now);
                }
            }
            Timer::Dns => {
                if self.phase == Phase::Resolving {
                    self.build_list(Vec::new());
                    self.dns_failed(now, "no answer within 10 s");
                }
            }
            Timer::Connect => {
                if self.phase == Phase::Connecting {
                    self.connect_failed(now, "connect timeout");
                }
            }
            Timer::Hello => self.hello_tick(now),
            Timer::Info => {
                if self.phase == Phase::Info && self.info_for == Some(true) {
                    self.fail(now, "no device info");
                }
            }
            Timer::Keepalive => self.keepalive_tick(now),
            Timer::Refresh => self.refresh_tick(now),
            Timer::RefreshHello => {
                // P§5.10: 5 s without a time-sync reply; go on with `_otc.info`.
                if self.phase == Phase::Up {
                    self.hello_out = false;
                    self.want_info(false);
                }
            }
            Timer::Ack(id) => self.ack_timeout(now, id),
        }
    }

    // ---- attempts, DNS, connect ------------------------------------------------------------

    fn begin_attempt(&mut self, now: Instant) {
        self.phase = Phase::Resolving;
        self.emit(Action::Event(CloudEvent::Trying));
        self.next_server(now);
    }

    fn transport(&self) -> Transport {
        self.cfg
            .transports
            .get(self.tidx)
            .copied()
            .unwrap_or(Transport::Udp)
    }

    fn endpoint(&self, t: Transport) -> &Endpoint {
        match t {
            Transport::Udp => &self.cfg.udp,
            Transport::Tcp => &self.cfg.tcp,
        }
    }

    /// Connects to the next server, or asks for the next transport's list (P§5.1, §5.9).
    fn next_server(&mut self, now: Instant) {
        // Each round either connects, asks the resolver, or builds a list from an IP literal; a list of
        // literals can be empty only when filtered, so one pass over the transports is enough.
        for _ in 0..=self.cfg.transports.len() {
            if let Some(&s) = self.list.get(self.pos).filter(|_| self.list_built) {
                self.pos += 1;
                self.connect(now, s);
                return;
            }
            if self.list_built {
                self.tidx = (self.tidx + 1) % self.cfg.transports.len().max(1);
            }
            self.list_built = false;
            self.list.clear();
            self.pos = 0;
            let t = self.transport();
            let ep = self.endpoint(t).clone();
            match ep.host.parse::<Ipv4Addr>() {
                Ok(ip) => self.build_list(vec![ip]),
                Err(_) => {
                    self.phase = Phase::Resolving;
                    info!("getaddrinfo ({}:{}) for {t}", ep.host, ep.port);
                    self.dns_attempt = self.dns_attempt.wrapping_add(1);
                    self.wheel.set(Timer::Dns, now + DNS_TIMEOUT);
                    self.emit(Action::Resolve {
                        transport: t,
                        host: ep.host,
                        port: ep.port,
                        attempt: self.dns_attempt,
                    });
                    return;
                }
            }
        }
        self.dns_failed(now, "no usable server address");
    }

    /// The resolver's answer to `Resolve` number `attempt`. Stale answers are ignored.
    pub fn handle_resolved(
        &mut self,
        now: Instant,
        attempt: u32,
        result: Result<Vec<Ipv4Addr>, String>,
    ) {
        if self.phase != Phase::Resolving || attempt != self.dns_attempt {
            debug!("late DNS answer (attempt {attempt}) ignored");
            return;
        }
        self.wheel.cancel(Timer::Dns);
        match result {
            Ok(addrs) => {
                self.build_list(addrs);
                if self.list.is_empty() {
                    self.dns_failed(now, "no usable address");
                } else {
                    self.next_server(now);
                }
            }
            Err(e) => {
                // Keep what does not need DNS (otc_list) for the next attempt.
                self.build_list(Vec::new());
                self.dns_failed(now, &e);
            }
        }
    }

    fn dns_failed(&mut self, now: Instant, why: &str) {
        let t = self.transport();
        warn!("resolving {} for {t} failed: {why}", self.endpoint(t).host);
        self.emit(Action::Event(CloudEvent::InternetFailed));
        self.fail(now, "name resolution failed");
    }

    /// DNS records (filtered unless explicit, shuffled), then for UDP the `otc_list` entries (P§5.1).
    fn build_list(&mut self, mut addrs: Vec<Ipv4Addr>) {
        let t = self.transport();
        let ep = self.endpoint(t);
        let (port, from_dns) = (ep.port, !ep.explicit);
        if from_dns {
            addrs.retain(|a| {
                let o = a.octets()[0];
                let bad = o == 0 || o == 127 || o >= 224;
                if bad {
                    warn!("server ip({a}) from DNS refused");
                }
                !bad
            });
        }
        // Fisher-Yates.
        for i in (1..addrs.len()).rev() {
            let j = self.rng.below(i as u64 + 1) as usize;
            addrs.swap(i, j);
        }
        addrs.truncate(MAX_DNS);
        let mut list: Vec<Server> = Vec::new();
        let dns = addrs.into_iter().map(|ip| Server {
            addr: SocketAddrV4::new(ip, port),
            from_dns,
        });
        let otc = self.otc_list.iter().map(|&addr| Server {
            addr,
            from_dns: false,
        });
        let otc = otc.filter(|_| t == Transport::Udp);
        for s in dns.chain(otc) {
            if !list.iter().any(|x| x.addr == s.addr) {
                list.push(s);
            }
        }
        self.list = list;
        self.pos = 0;
        self.list_built = true;
    }

    fn connect(&mut self, now: Instant, s: Server) {
        let t = self.transport();
        self.phase = Phase::Connecting;
        self.current = Some(s);
        self.link = Some(t);
        self.generation = self.generation.wrapping_add(1);
        info!("connecting to {} over {t}", s.addr);
        self.emit(Action::Connect {
            transport: t,
            addr: s.addr,
        });
        self.wheel.set(Timer::Connect, now + CONNECT_TIMEOUT);
    }

    /// The socket is set up; `local` is its local address (the route to the server).
    pub fn handle_connected(&mut self, now: Instant, local: Ipv4Addr) {
        if self.phase != Phase::Connecting {
            return;
        }
        self.wheel.cancel(Timer::Connect);
        if let Some(s) = self.current {
            // P§5.1 D1: a router that answers DNS with a LAN address.
            if s.from_dns && s.addr.ip().octets()[0] == local.octets()[0] {
                warn!(
                    "server ip({}), my ip({local}), we might be using a buggy router.",
                    s.addr.ip()
                );
                self.connect_failed(now, "server address on the local network");
                return;
            }
        }
        self.emit(Action::Event(CloudEvent::InternetConnected));
        self.last_tx = 0;
        self.sent_stamps = [0; SENT_STAMPS];
        self.last_rx = None;
        self.rx_buf.clear();
        self.phase = Phase::Hello;
        self.hellos = 0;
        self.hello_tick(now);
    }

    /// The connect failed (refused, unreachable, ...).
    pub fn handle_connect_failed(&mut self, now: Instant, reason: &str) {
        if self.phase == Phase::Connecting {
            self.connect_failed(now, reason);
        }
    }

    fn connect_failed(&mut self, now: Instant, reason: &str) {
        if let Some(s) = self.current {
            warn!("connect to {} failed: {reason}", s.addr);
        }
        self.emit(Action::Event(CloudEvent::InternetFailed));
        self.fail(now, "connect failed");
    }

    /// EOF or an error on the cloud socket (not `ECONNREFUSED` on UDP).
    pub fn handle_link_down(&mut self, now: Instant) {
        match self.phase {
            Phase::Connecting => self.connect_failed(now, "socket error"),
            Phase::Hello | Phase::Info | Phase::Up => self.fail(now, "link down"),
            _ => {}
        }
    }

    /// Closes the socket and fails what depends on it; no state change, no event.
    fn end_session(&mut self) {
        if self.link.take().is_some() {
            self.emit(Action::Close);
        }
        for t in [
            Timer::Dns,
            Timer::Connect,
            Timer::Hello,
            Timer::Info,
            Timer::Keepalive,
            Timer::Refresh,
            Timer::RefreshHello,
        ] {
            self.wheel.cancel(t);
        }
        self.current = None;
        self.hello_out = false;
        self.info_for = None;
        self.announced = false;
        self.rx_buf = Vec::new();
        // P§5.7 D5: every pending request fails at once.
        for up in std::mem::take(&mut self.ups) {
            self.wheel.cancel(Timer::Ack(up.cloud_id));
            if let Origin::Client { client, orig } = up.origin {
                self.tell_client(client, orig, -30011, "OT server disconnected");
            }
        }
        // Replies to this session's commands can no longer go up.
        self.downs.clear_pending();
    }

    /// An attempt failed or the link was lost (P§5.9): close, fail pending, back off.
    fn fail(&mut self, now: Instant, why: &str) {
        warn!("cloud: {why}, retry later");
        self.end_session();
        self.failures = self.failures.saturating_add(1);
        let delay = self.backoff(self.failures);
        info!("next cloud attempt in {delay}");
        self.wheel.set(Timer::Backoff, now + delay);
        if self.phase != Phase::Retry {
            self.emit(Action::Event(CloudEvent::Retry));
        }
        self.phase = Phase::Retry;
    }

    /// D4: min(cap, base·2^(k−1)) · U[0.8, 1.2], clamped to [1 s, cap].
    fn backoff(&mut self, k: u32) -> Duration {
        let cap = self.cfg.backoff_max.millis().max(1000);
        let shift = k.saturating_sub(1).min(40);
        let d = self
            .cfg
            .backoff_min
            .millis()
            .saturating_mul(1u64 << shift)
            .min(cap);
        let permille = 800 + self.rng.below(401);
        let d = d.saturating_mul(permille) / 1000;
        Duration::from_millis(d.clamp(1000, cap))
    }

    // ---- hello, time sync, info ------------------------------------------------------------

    fn hello_tick(&mut self, now: Instant) {
        if self.phase != Phase::Hello {
            return;
        }
        if self.hellos >= HELLO_TRIES {
            // P§5.3 D4: fails 5 s after the 3rd unanswered hello.
            self.fail(now, "no time-sync reply to 3 hellos");
            return;
        }
        self.hellos += 1;
        self.hello_out = true;
        debug!("cloud hello ({}/{HELLO_TRIES})", self.hellos);
        self.emit(Action::Send(miio::cloud_hello().to_vec()));
        self.wheel.set(Timer::Hello, now + HELLO_PERIOD);
    }

    fn time_sync(&mut self, now: Instant, server: u32) {
        // P§5.3: only while our hello on this connection is unanswered, and never stamp 0 (our own hello).
        if !self.hello_out || server == 0 {
            debug!("time-sync reply ignored (stamp {server})");
            return;
        }
        if server > MAX_SERVER_STAMP {
            // P§5.5: keepalive stamps must keep increasing; from here they would stick at
            // 0xffffffff within a few minutes. Treated as no reply: the hello is tried again.
            crate::warn_limited!(
                now,
                "time-sync stamp {server:#x} is implausible (past 2097); ignored"
            );
            return;
        }
        self.hello_out = false;
        self.rx_since_ka = true;
        let local = secs(now);
        self.offset = i64::from(server) - local;
        info!(
            "sync time with server, server: {server}, local(mono): {local}, diff: {}",
            self.offset
        );
        match self.phase {
            Phase::Hello => {
                self.wheel.cancel(Timer::Hello);
                self.phase = Phase::Info;
                self.wheel.set(Timer::Info, now + INFO_WAIT);
                self.want_info(true);
            }
            Phase::Up if self.wheel.cancel(Timer::RefreshHello) => self.want_info(false),
            _ => {}
        }
    }

    fn want_info(&mut self, session: bool) {
        self.info_for = Some(session);
        self.emit(Action::NeedInfo);
    }

    /// The answer to `NeedInfo`: the members of the helper's `_internal.info` (its `params` plus
    /// top-level extras), or the daemon's own `{"params":{..}}`. Sent as `_otc.info` (P§5.4), the
    /// members in the order they came.
    pub fn handle_info(&mut self, now: Instant, info: &Members) {
        let session = match self.info_for {
            Some(true) if self.phase == Phase::Info => true,
            Some(false) if self.phase == Phase::Up => false,
            _ => return,
        };
        self.info_for = None;
        self.wheel.cancel(Timer::Info);
        let params = info
            .get("params")
            .and_then(|p| Members::of_object(p.as_bytes()))
            .unwrap_or_default();
        let mut params = self.info_params(now, &params);
        if let Some((uid, bindkey)) = &self.bind {
            params.set_str("uid", uid);
            if let Some(k) = bindkey {
                params.set_str("bindkey", k);
            }
        }
        let id = self.alloc_id();
        let mut msg = Members::new();
        msg.set("id", id.to_string());
        msg.set_str("method", "_otc.info");
        msg.set("params", params.to_json());
        for (k, v) in info.iter() {
            if !matches!(k, "id" | "method" | "params") {
                msg.set(k, v.to_owned());
            }
        }
        let text = msg.to_json();
        if text.len() > self.cfg.max_cloud_payload {
            warn!("_otc.info too long ({} bytes), not sent", text.len());
            if session {
                self.fail(now, "_otc.info too long");
            }
            return;
        }
        // The text holds the token: its content stays out of the log.
        info!("send _otc.info, id:{id}");
        self.send_up(now, id, Origin::Info { refresh: !session }, text);
    }

    fn info_reply(&mut self, now: Instant, obj: &Map<String, Value>, refresh: bool) {
        match obj.get("result") {
            Some(Value::Object(r)) => {
                self.apply_otc(r);
                if !refresh && self.phase == Phase::Info {
                    self.session_up(now);
                }
            }
            _ if refresh => warn!("refresh: _otc.info not accepted"),
            _ => self.fail(now, "_otc.info refused"),
        }
    }

    /// `otc_list` and `otc_test.interval` of an `_otc.info` reply (P§5.4).
    fn apply_otc(&mut self, r: &Map<String, Value>) {
        if let Some(Value::Array(entries)) = r.get("otc_list") {
            let mut list: Vec<SocketAddrV4> = Vec::new();
            for e in entries {
                let ip = e.get("ip").and_then(Value::as_str);
                let ip = ip.and_then(|s| s.parse::<Ipv4Addr>().ok());
                let port = e.get("port").and_then(Value::as_u64);
                let port = port.and_then(|p| u16::try_from(p).ok()).filter(|&p| p != 0);
                if let (Some(ip), Some(port)) = (ip, port) {
                    let a = SocketAddrV4::new(ip, port);
                    if !ip.is_unspecified() && !list.contains(&a) && list.len() < MAX_OTC_LIST {
                        list.push(a);
                    }
                }
            }
            debug!("otc_list: {} entries", list.len());
            self.otc_list = list;
        }
        let iv = r.get("otc_test").and_then(|t| t.get("interval"));
        if let Some(s) = iv.and_then(Value::as_u64).filter(|&s| s > 0) {
            self.cloud_interval = Duration::from_secs(s).max(MIN_CLOUD_REFRESH);
        }
    }

    fn refresh_period(&self) -> Duration {
        self.cfg
            .refresh
            .unwrap_or(self.cloud_interval)
            .max(Duration::from_secs(1))
    }

    /// P§5.3 step 6.
    fn session_up(&mut self, now: Instant) {
        self.phase = Phase::Up;
        self.failures = 0;
        self.misses = 0;
        self.ka_sent = false;
        self.rx_since_ka = false;
        info!("cloud connected");
        self.wheel.set(Timer::Keepalive, now + self.cfg.keepalive);
        self.wheel.set(Timer::Refresh, now + self.refresh_period());
        if self.idle_reported {
            self.announce();
        } else {
            // D12: the first session after start reports OTA idle, and only then is announced.
            let id = self.alloc_id();
            let text = format!(r#"{{"id":{id},"method":"props","params":{{"ota_state":"idle"}}}}"#);
            self.send_up(now, id, Origin::IdleReport, text);
        }
    }

    fn announce(&mut self) {
        if self.phase == Phase::Up && !self.announced {
            self.announced = true;
            self.emit(Action::Event(CloudEvent::Connected));
        }
    }

    fn refresh_tick(&mut self, now: Instant) {
        if self.phase != Phase::Up {
            return;
        }
        self.wheel.set(Timer::Refresh, now + self.refresh_period());
        let busy = self.info_for.is_some()
            || self.wheel.is_armed(Timer::RefreshHello)
            || self
                .ups
                .iter()
                .any(|u| matches!(u.origin, Origin::Info { .. }));
        if busy {
            return;
        }
        debug!("refresh: cloud hello");
        self.hello_out = true;
        self.emit(Action::Send(miio::cloud_hello().to_vec()));
        self.wheel
            .set(Timer::RefreshHello, now + REFRESH_HELLO_WAIT);
    }

    // ---- keepalive -------------------------------------------------------------------------

    fn keepalive_tick(&mut self, now: Instant) {
        if self.phase != Phase::Up {
            return;
        }
        // P§5.6: a miss is a tick with nothing valid since the previous keepalive.
        if self.ka_sent && !self.rx_since_ka {
            self.misses += 1;
            info!("server_noack: {}", self.misses);
        } else {
            self.misses = 0;
        }
        if self.misses >= KEEPALIVE_MISSES {
            self.fail(now, "3 keepalives unanswered");
            return;
        }
        let stamp = self.stamp(now).max(self.last_tx.saturating_add(1));
        self.last_tx = stamp;
        self.sent_stamps[self.sent_idx % SENT_STAMPS] = stamp;
        self.sent_idx = self.sent_idx.wrapping_add(1);
        self.emit(Action::Send(
            miio::keepalive(&self.keys, self.cfg.did, stamp).to_vec(),
        ));
        self.ka_sent = true;
        self.rx_since_ka = false;
        self.wheel.set(Timer::Keepalive, now + self.cfg.keepalive);
    }

    // ---- receiving -------------------------------------------------------------------------

    fn receiving(&self, t: Transport) -> bool {
        self.link == Some(t) && matches!(self.phase, Phase::Hello | Phase::Info | Phase::Up)
    }

    /// One UDP datagram from the cloud socket.
    pub fn handle_datagram(&mut self, now: Instant, data: &[u8]) {
        if self.receiving(Transport::Udp) {
            self.on_packet(now, data);
        }
    }

    /// Bytes read from the TCP cloud socket, in any chunking (P§5.2).
    pub fn handle_stream(&mut self, now: Instant, data: &[u8]) {
        if !self.receiving(Transport::Tcp) {
            return;
        }
        let gen = self.generation;
        self.rx_buf.extend_from_slice(data);
        loop {
            match miio::stream_frame_len(&self.rx_buf) {
                Err(e) => {
                    warn!("{e}");
                    self.fail(now, "stream protocol error");
                    return;
                }
                Ok(Some(n)) if n <= self.rx_buf.len() => {
                    let pkt: Vec<u8> = self.rx_buf.drain(..n).collect();
                    self.on_packet(now, &pkt);
                    if self.generation != gen || !self.receiving(Transport::Tcp) {
                        return;
                    }
                }
                Ok(_) => break,
            }
        }
        // Only a partial frame (< 64 KiB) is left: the buffer stays bounded.
        if self.rx_buf.is_empty() {
            self.rx_buf = Vec::new();
        }
    }

    /// P§2.7, at the first failure drop with one rate-limited log line.
    fn on_packet(&mut self, now: Instant, data: &[u8]) {
        let pkt = match Packet::new_checked(data) {
            Ok(p) => p,
            Err(e) => return self.dropped(now, &e),
        };
        if pkt.is_control() {
            if pkt.ids_all_ff() {
                self.time_sync(now, pkt.stamp());
            } else {
                self.control(now, &pkt, data);
            }
            return;
        }
        match miio::open_scanned(&self.keys, self.cfg.did, &pkt) {
            Ok(o) => {
                self.rx_since_ka = true;
                self.last_rx = Some(self.last_rx.map_or(pkt.stamp(), |l| l.max(pkt.stamp())));
                self.on_message(now, &o.text, &o.head);
            }
            Err(e) => self.dropped(now, &e),
        }
    }

    /// A pong, or a cloud-initiated ping (P§5.6).
    fn control(&mut self, now: Instant, pkt: &Packet<&[u8]>, raw: &[u8]) {
        if pkt.did() != self.cfg.did {
            return self.dropped(now, &miio::Error::DidMismatch { got: pkt.did() });
        }
        let sum = pkt.checksum();
        let md5_ok = miio::control_md5_ok(&self.keys, pkt);
        let filler = sum == [0; 16] || sum == [0xff; 16];
        let stamp = pkt.stamp();
        let ours = self.sent_stamps.contains(&stamp) && stamp != 0;
        if md5_ok && !ours && self.last_rx.is_none_or(|l| stamp > l) {
            debug!("ping from the cloud, stamp {stamp}: echoed");
            self.last_rx = Some(stamp);
            self.rx_since_ka = true;
            self.emit(Action::Send(raw.to_vec()));
        } else if md5_ok || filler {
            self.rx_since_ka = true;
        } else {
            self.dropped(now, &miio::Error::Md5Mismatch);
        }
    }

    fn dropped(&mut self, now: Instant, why: &dyn fmt::Display) {
        // P§2.7, rate limited for the whole process (`crate::ratelimit`).
        crate::warn_limited!(now, "{why}");
    }

    /// An authenticated JSON object from the cloud, as scanned (no tree: an ack needs none).
    fn on_message(&mut self, now: Instant, text: &str, head: &rpc::Head) {
        match &head.method {
            None => {
                let id = head.id.as_ref().and_then(rpc::id_u32);
                match id.and_then(|id| self.ups.iter().position(|u| u.cloud_id == id)) {
                    Some(i) => self.acked(now, i, text, head),
                    // P§5.8: the cloud's ack of one of our replies.
                    None => debug!("cloud ack swallowed: id {id:?}"),
                }
            }
            Some(Some(m)) => self.command(now, m, text, head),
            Some(None) => self.dropped(now, &"cloud message with a non-string method"),
        }
    }

    // ---- upstream (P§5.7) ------------------------------------------------------------------

    /// A request from a local client (`method` present, not `local.*`/`_internal.*`).
    pub fn upstream(&mut self, now: Instant, client: ConnId, text: &str, head: &rpc::Head) {
        let method = head.method();
        if method.starts_with("local.") || method.starts_with("_internal.") {
            // P§5.7: these never reach the cloud, whoever routed them here.
            crate::warn_limited!(now, "{method} is not sent to the cloud");
            return;
        }
        let Some(idv) = head.id.as_ref() else {
            // Fire-and-forget: once, as is, untracked.
            if self.phase != Phase::Up {
                crate::info_limited!(now, "cloud down, notification dropped");
            } else if text.len() > self.cfg.max_cloud_payload {
                crate::warn_limited!(
                    now,
                    "msg too long, bigger than OT_MAX_PAYLOAD ({})",
                    self.cfg.max_cloud_payload
                );
            } else {
                self.send_json(now, text);
            }
            return;
        };
        // P§3: ids are u32 (the local table refuses others first, L§4.1).
        let Some(orig) = rpc::id_u32(idv).map(u64::from) else {
            self.emit(Action::ToClient {
                client,
                text: rpc::error_reply(Some(idv), -32600, "Invalid Request"),
            });
            return;
        };
        if self.phase != Phase::Up {
            return self.tell_client(client, orig, -30011, "OT server disconnected");
        }
        if self.ups.len() >= MAX_UPSTREAM {
            return self.tell_client(client, orig, -30011, "OT queue full");
        }
        let id = self.alloc_id();
        let Some(new) = rpc::rewrite_id_scanned(text, head, u64::from(id)) else {
            self.emit(Action::ToClient {
                client,
                text: rpc::error_reply(Some(idv), -32600, "Invalid Request"),
            });
            return;
        };
        if new.len() > self.cfg.max_cloud_payload {
            crate::warn_limited!(
                now,
                "msg too long, bigger than OT_MAX_PAYLOAD ({})",
                self.cfg.max_cloud_payload
            );
            return self.tell_client(client, orig, -32600, "msg too long");
        }
        debug!("U, orig_id:{orig}, id:{id}, client:{client}");
        self.send_up(now, id, Origin::Client { client, orig }, new);
    }

    /// The connection of `client` closed (P§5.7: "If that client has gone, the ack is dropped").
    /// Its pending requests stay, retransmitted as before, but their ack or error goes to no one:
    /// the reactor reuses the slot, and the next connection in it must not get them.
    pub fn client_gone(&mut self, client: ConnId) {
        for up in &mut self.ups {
            if matches!(up.origin, Origin::Client { client: c, .. } if c == client) {
                up.origin = Origin::Gone;
            }
        }
    }

    fn tell_client(&mut self, client: ConnId, orig: u64, code: i64, msg: &str) {
        let text = rpc::error_reply(Some(&Value::from(orig)), code, msg);
        self.emit(Action::ToClient { client, text });
    }

    fn alloc_id(&mut self) -> u32 {
        loop {
            let id = self.next_id;
            self.next_id = if id >= MAX_CLOUD_ID { 1 } else { id + 1 };
            if !self.ups.iter().any(|u| u.cloud_id == id) {
                return id;
            }
        }
    }

    fn send_up(&mut self, now: Instant, cloud_id: u32, origin: Origin, text: String) {
        self.send_json(now, &text);
        self.ups.push(Upstream {
            cloud_id,
            origin,
            text,
            sends: 1,
        });
        self.wheel
            .set(Timer::Ack(cloud_id), now + self.cfg.ack_timeout);
    }

    fn ack_timeout(&mut self, now: Instant, id: u32) {
        let Some(i) = self.ups.iter().position(|u| u.cloud_id == id) else {
            return;
        };
        if self.link == Some(Transport::Udp) {
            if let Some(up) = self.ups.get_mut(i).filter(|u| u.sends <= RETRANSMITS) {
                // D5: same payload and id, fresh stamp and MD5.
                up.sends += 1;
                let text = up.text.clone();
                debug!("retransmit id:{id}");
                self.send_json(now, &text);
                self.wheel.set(Timer::Ack(id), now + self.cfg.ack_timeout);
                return;
            }
        }
        let up = self.ups.remove(i);
        match up.origin {
            Origin::Client { client, orig } => {
                crate::warn_limited!(now, "OT server noack, id:{id}");
                self.tell_client(client, orig, -30011, "OT server noack");
            }
            Origin::Gone => crate::warn_limited!(now, "OT server noack, id:{id} (client gone)"),
            Origin::Info { refresh: true } => warn!("refresh: _otc.info not acked"),
            Origin::Info { refresh: false } => self.fail(now, "_otc.info not acked"),
            Origin::IdleReport => {
                warn!("ota_state idle report not acked");
                self.idle_reported = true;
                self.announce();
            }
        }
    }

    fn acked(&mut self, now: Instant, i: usize, text: &str, head: &rpc::Head) {
        let up = self.ups.remove(i);
        self.wheel.cancel(Timer::Ack(up.cloud_id));
        match up.origin {
            Origin::Client { client, orig } => {
                // D5: only the id changes back.
                let text =
                    rpc::rewrite_id_scanned(text, head, orig).unwrap_or_else(|| text.to_owned());
                self.emit(Action::ToClient { client, text });
            }
            Origin::Gone => debug!("ack id:{} for a client that has gone: dropped", up.cloud_id),
            Origin::Info { refresh } => {
                // The one ack whose content matters: its tree, built only here.
                let obj = rpc::parse_object(text.as_bytes()).unwrap_or_default();
                self.info_reply(now, &obj, refresh);
            }
            Origin::IdleReport => {
                self.idle_reported = true;
                self.announce();
            }
        }
    }

    // ---- downstream (P§5.8) ----------------------------------------------------------------

    fn command(&mut self, now: Instant, method: &str, text: &str, head: &rpc::Head) {
        if method.starts_with("local.") || method.starts_with("_internal.") {
            return self.dropped(now, &format_args!("cloud method {method} dropped"));
        }
        let lan_only = downstream::lan_only(method);
        let own = downstream::self_answered(method) && !lan_only;
        // Params are read only for the methods the daemon answers itself: the tree, built then.
        let params = || {
            rpc::parse_object(text.as_bytes())
                .ok()
                .and_then(|mut o| o.get_mut("params").map(Value::take))
                .unwrap_or(Value::Null)
        };
        // Id 0 is never answered (P§5.8), so such a command is not tracked either.
        let Some(id) = head.id.as_ref().and_then(rpc::id_u32).filter(|&id| id != 0) else {
            if own {
                self.emit(Action::SelfMethod {
                    id: None,
                    method: method.to_owned(),
                    params: params(),
                });
            } else if lan_only {
                debug!("LAN-only notification {method} from the cloud dropped");
            } else {
                self.emit(Action::Command {
                    text: text.to_owned(),
                    id: None,
                });
            }
            return;
        };
        if self.downs.contains(|&d| d == id) {
            crate::info_limited!(now, "cloud msg repeated, id:{id}");
            return;
        }
        if let Some(reply) = self.downs.cached(now, &id).map(str::to_owned) {
            crate::info_limited!(now, "cloud msg repeated, id:{id}: answered from the cache");
            return self.send_json(now, &reply);
        }
        if lan_only {
            crate::warn_limited!(now, "LAN-only method {method} from the cloud refused");
            let reply = rpc::error_reply(Some(&id.into()), -32601, "Method not found");
            return self.reply_sent(now, id, reply);
        }
        if !self.downs.insert(id, now + self.cfg.user_ack_timeout) {
            crate::warn_limited!(now, "too many pending cloud commands, id:{id}");
            let reply = downstream::user_ack_timeout_reply(id);
            return self.reply_sent(now, id, reply);
        }
        if own {
            self.emit(Action::SelfMethod {
                id: Some(id),
                method: method.to_owned(),
                params: params(),
            });
        } else {
            self.emit(Action::Command {
                text: text.to_owned(),
                id: Some(id),
            });
        }
    }

    /// A reply from a local client (no `method`, integer `id`). Returns whether its id was a pending
    /// cloud command (else the node may try the LAN machine). The first reply wins (P§5.8).
    pub fn local_reply(
        &mut self,
        now: Instant,
        client: ConnId,
        text: &str,
        head: &rpc::Head,
    ) -> bool {
        let Some(id) = head.id.as_ref().and_then(rpc::id_u32) else {
            return false;
        };
        self.reply(now, Some(client), id, text, head.error_code)
    }

    /// The daemon's own answer to a `SelfMethod` (or a -9999 for a command that collides with a LAN id).
    pub fn self_reply(&mut self, now: Instant, id: u32, text: &str) -> bool {
        self.reply(now, None, id, text, None)
    }

    fn reply(
        &mut self,
        now: Instant,
        client: Option<ConnId>,
        id: u32,
        text: &str,
        code: Option<i64>,
    ) -> bool {
        if id == 0 {
            return false;
        }
        let Some(i) = self.downs.position(|&d| d == id) else {
            return false;
        };
        if text.len() > self.cfg.max_cloud_payload {
            // P§2.7: not sent, does not count; the command stays pending.
            crate::warn_limited!(
                now,
                "msg too long, bigger than OT_MAX_PAYLOAD ({})",
                self.cfg.max_cloud_payload
            );
            if let Some(c) = client {
                self.tell_client(c, u64::from(id), -32600, "msg too long");
            }
            return true;
        }
        if downstream::is_fallback(code) {
            // D16: held as a fallback; any other reply replaces it.
            self.downs.hold(i, text.to_owned());
            return true;
        }
        self.downs.remove(i);
        self.reply_sent(now, id, text.to_owned());
        true
    }

    /// Sends a reply to a cloud command and remembers it for repeats (P§5.8).
    fn reply_sent(&mut self, now: Instant, id: u32, text: String) {
        self.send_json(now, &text);
        self.downs.cache_put(now, id, text);
    }

    // ---- sending ---------------------------------------------------------------------------

    /// One data packet on the link, with a stamp that never decreases in the session (P§5.5 D4).
    fn send_json(&mut self, now: Instant, text: &str) {
        if self.link.is_none() {
            debug!("no cloud link, message not sent");
            return;
        }
        let stamp = self.stamp(now).max(self.last_tx);
        self.last_tx = stamp;
        let pkt = miio::seal(&self.keys, self.cfg.did, stamp, text.as_bytes());
        self.emit(Action::Send(pkt));
    }

    fn emit(&mut self, a: Action) {
        self.actions.push_back(a);
    }
}

/// Collection sizes for the month simulation (`proto::sim`): each must stay bounded.
#[cfg(test)]
impl Cloud {
    pub(crate) fn debug_sizes(&self, out: &mut Vec<(&'static str, usize)>) {
        out.extend([
            ("cloud.wheel", self.wheel.len()),
            ("cloud.actions", self.actions.len()),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::crypto::md5;
    use proptest::prelude::*;
    use serde_json::json;

    const DID: u32 = 1234567;
    const KEY: &[u8; 16] = b"YWJjZGVmZ2hpamts";
    const LOCAL: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
    const SERVER: Ipv4Addr = Ipv4Addr::new(1, 2, 3, 4);
    /// Server time of the time-sync replies.
    const T0: u32 = 0x5a9b_239d;

    fn cfg() -> CloudConfig {
        let mut c = CloudConfig::new(
            DID,
            *KEY,
            "vendor.camera.v1",
            "aa:bb:cc:01:02:03",
            "4142434445464748494a4b4c4d4e4f50",
            "",
        );
        c.seed = 42;
        c
    }

    fn tcp_cfg() -> CloudConfig {
        let mut c = cfg();
        c.transports = vec![Transport::Tcp];
        c
    }

    fn obj(text: &str) -> Map<String, Value> {
        rpc::parse_object(text.as_bytes()).expect("test JSON object")
    }

    /// The members of an `_internal.info`-shaped text, for `handle_info`.
    fn info(text: &str) -> Members {
        Members::of_object(text.as_bytes()).expect("test JSON object")
    }

    fn head(text: &str) -> rpc::Head {
        rpc::scan(text.as_bytes()).expect("test JSON object")
    }

    /// A packet with any payload bytes and a correct MD5 (for the negative vectors).
    fn raw_packet(did: u32, stamp: u32, payload: &[u8]) -> Vec<u8> {
        let len = (HEADER + payload.len()) as u16;
        let mut p = Vec::new();
        p.extend_from_slice(&[0x21, 0x31]);
        p.extend_from_slice(&len.to_be_bytes());
        p.extend_from_slice(&[0; 4]);
        p.extend_from_slice(&did.to_be_bytes());
        p.extend_from_slice(&stamp.to_be_bytes());
        let sum = md5(&[&p[..16], KEY, payload]);
        p.extend_from_slice(&sum);
        p.extend_from_slice(payload);
        p
    }
    const HEADER: usize = miio::HEADER_LEN;

    /// Virtual-time harness: the reactor and the node, played by the test.
    struct H {
        c: Cloud,
        now: Instant,
        out: VecDeque<Action>,
        keys: Keys,
        tcp: bool,
    }

    impl H {
        fn new(cfg: CloudConfig) -> H {
            H {
                c: Cloud::new(cfg),
                now: Instant(1_000_000),
                out: VecDeque::new(),
                keys: Keys::new(KEY),
                tcp: false,
            }
        }

        fn connected(cfg: CloudConfig) -> H {
            let mut h = H::new(cfg);
            h.up();
            h
        }

        fn pump(&mut self) {
            while let Some(a) = self.c.poll_action() {
                self.out.push_back(a);
            }
        }

        fn take(&mut self) -> Vec<Action> {
            self.pump();
            self.out.drain(..).collect()
        }

        fn next(&mut self) -> Action {
            self.pump();
            self.out.pop_front().expect("an action")
        }

        #[track_caller]
        fn quiet(&mut self) {
            let a = self.take();
            assert!(a.is_empty(), "unexpected actions {a:?}");
        }

        /// Fires every deadline up to now + ms; the actions queue up for the test.
        fn advance(&mut self, ms: u64) {
            let end = Instant(self.now.0 + ms);
            while let Some(t) = self.c.poll_timeout().filter(|&t| t <= end) {
                self.now = self.now.max(t);
                self.c.handle_timeout(self.now);
                self.pump();
            }
            self.now = end;
        }

        /// The resolver's answer to the last `Resolve`.
        fn resolved(&mut self, r: Result<Vec<Ipv4Addr>, String>) {
            self.c.handle_resolved(self.now, self.c.dns_attempt, r);
        }

        fn deliver(&mut self, bytes: &[u8]) {
            if self.tcp {
                self.c.handle_stream(self.now, bytes);
            } else {
                self.c.handle_datagram(self.now, bytes);
            }
            self.pump();
        }

        fn msg(&self, json: &str) -> Vec<u8> {
            miio::seal(&self.keys, DID, self.c.stamp(self.now), json.as_bytes())
        }

        fn deliver_json(&mut self, json: &str) {
            let p = self.msg(json);
            self.deliver(&p);
        }

        #[track_caller]
        fn expect_send(&mut self) -> Vec<u8> {
            match self.next() {
                Action::Send(b) => b,
                a => panic!("expected Send, got {a:?}"),
            }
        }

        /// The next action is a data packet: its stamp and JSON.
        #[track_caller]
        fn expect_json(&mut self) -> (u32, Map<String, Value>) {
            let b = self.expect_send();
            let o = miio::decode(&self.keys, DID, &b).expect("a data packet");
            let stamp = Packet::new_checked(&b[..]).map(|p| p.stamp()).unwrap_or(0);
            (stamp, o.value)
        }

        #[track_caller]
        fn expect_text(&mut self) -> String {
            let b = self.expect_send();
            miio::decode(&self.keys, DID, &b)
                .expect("a data packet")
                .text
        }

        #[track_caller]
        fn expect_event(&mut self, e: CloudEvent) {
            assert_eq!(self.next(), Action::Event(e));
        }

        fn up(&mut self) -> bool {
            self.c.start(self.now);
            self.expect_event(CloudEvent::Trying);
            self.finish_attempt()
        }

        /// From `Resolve`/`Connect` to `Connected`; true when the D12 idle report went up.
        fn finish_attempt(&mut self) -> bool {
            let mut a = self.next();
            if let Action::Resolve { .. } = a {
                self.resolved(Ok(vec![SERVER]));
                a = self.next();
            }
            let Action::Connect { transport, .. } = a else {
                panic!("expected Connect, got {a:?}");
            };
            self.tcp = transport == Transport::Tcp;
            self.c.handle_connected(self.now, LOCAL);
            self.expect_event(CloudEvent::InternetConnected);
            assert_eq!(self.expect_send(), miio::cloud_hello());
            self.deliver(&miio::time_sync_reply(T0));
            assert_eq!(self.next(), Action::NeedInfo);
            self.c
                .handle_info(self.now, &info(r#"{"params":{"hw_ver":"Linux"}}"#));
            let (_, m) = self.expect_json();
            assert_eq!(m["method"], "_otc.info");
            let ack =
                json!({"id": m["id"], "result": {"otc_list": [], "otc_test": {"interval": 1800}}});
            self.deliver_json(&ack.to_string());
            match self.next() {
                Action::Send(b) => {
                    let m = miio::decode(&self.keys, DID, &b).unwrap().value;
                    assert_eq!(m["method"], "props");
                    assert_eq!(m["params"], json!({"ota_state": "idle"}));
                    assert_eq!(
                        self.c.state(),
                        CloudState::Trying,
                        "not announced before the ack"
                    );
                    self.deliver_json(&json!({"id": m["id"], "result": "ok"}).to_string());
                    self.expect_event(CloudEvent::Connected);
                    self.quiet();
                    true
                }
                a => {
                    assert_eq!(a, Action::Event(CloudEvent::Connected));
                    self.quiet();
                    false
                }
            }
        }

        fn upstream(&mut self, client: u32, text: &str) {
            self.c
                .upstream(self.now, client as ConnId, text, &head(text));
            self.pump();
        }

        fn reply(&mut self, client: u32, text: &str) -> bool {
            let r = self
                .c
                .local_reply(self.now, client as ConnId, text, &head(text));
            self.pump();
            r
        }
    }

    fn to_client(client: u32, text: &str) -> Action {
        Action::ToClient {
            client: client as ConnId,
            text: text.to_owned(),
        }
    }

    // ---- session start ---------------------------------------------------------------------

    #[test]
    fn session_start_sends_exact_hello_and_full_otc_info() {
        let mut h = H::new(cfg());
        h.c.start(h.now);
        h.expect_event(CloudEvent::Trying);
        assert_eq!(
            h.next(),
            Action::Resolve {
                transport: Transport::Udp,
                host: "ot.io.mi.com".into(),
                port: 8053,
                attempt: 1,
            }
        );
        assert!(h.c.is_busy());
        h.resolved(Ok(vec![SERVER]));
        assert_eq!(
            h.next(),
            Action::Connect {
                transport: Transport::Udp,
                addr: SocketAddrV4::new(SERVER, 8053)
            }
        );
        h.c.handle_connected(h.now, LOCAL);
        h.expect_event(CloudEvent::InternetConnected);
        // V7, byte for byte.
        let v7 = "21310020ffffffffffffffff0000000000000000000000000000000000000000";
        let hex: String = h.expect_send().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, v7);
        h.deliver(&miio::time_sync_reply(T0));
        assert_eq!(h.c.offset(), i64::from(T0) - 1000);
        assert_eq!(h.c.stamp(h.now), T0);
        assert_eq!(h.next(), Action::NeedInfo);
        let text = r#"{"method":"_internal.info","partner_id":"","params":{"hw_ver":"Linux","fw_ver":"1.0","ap":{"ssid":"s","bssid":"b"},"netif":{"localIp":"10.0.0.2","mask":"255.255.255.0","gw":"10.0.0.1"},"model":"old"}}"#;
        h.c.handle_info(h.now, &info(text));
        let (stamp, m) = h.expect_json();
        assert_eq!(stamp, T0);
        assert_eq!(m["method"], "_otc.info");
        assert_eq!(m["partner_id"], "");
        let p = &m["params"];
        assert_eq!(p["hw_ver"], "Linux");
        assert_eq!(p["netif"]["gw"], "10.0.0.1");
        assert_eq!(p["model"], "vendor.camera.v1");
        assert_eq!(p["mac"], "AA:BB:CC:01:02:03");
        assert_eq!(p["token"], "4142434445464748494a4b4c4d4e4f50");
        assert_eq!(p["life"], 1000);
        assert!(p.get("uid").is_none());
        assert_eq!(h.c.state(), CloudState::Trying);
        h.deliver_json(&json!({"id": m["id"], "result": {"otc_list": []}}).to_string());
        let (_, props) = h.expect_json();
        assert_eq!(props["method"], "props");
        assert_ne!(props["id"], m["id"]);
    }

    #[test]
    fn otc_info_carries_uid_and_bindkey_after_provisioning() {
        let mut h = H::new(cfg());
        h.c.set_bind("12345".into(), Some("bk".into()));
        h.c.start(h.now);
        h.take();
        h.resolved(Ok(vec![SERVER]));
        h.c.handle_connected(h.now, LOCAL);
        h.take();
        h.deliver(&miio::time_sync_reply(T0));
        h.take();
        h.c.handle_info(h.now, &info(r#"{"params":{}}"#));
        let (_, m) = h.expect_json();
        assert_eq!(m["params"]["uid"], "12345");
        assert_eq!(m["params"]["bindkey"], "bk");
    }

    /// P§5.4: INFO keeps the helper's order (nested objects too), `model`/`mac`/`token`/`life`
    /// replace members in place or follow, then `uid` and `bindkey`; extras follow `params`.
    #[test]
    fn otc_info_keeps_the_member_order() {
        let mut h = H::new(cfg());
        h.c.set_bind("12345".into(), Some("bk".into()));
        h.c.start(h.now);
        h.take();
        h.resolved(Ok(vec![SERVER]));
        h.c.handle_connected(h.now, LOCAL);
        h.take();
        h.deliver(&miio::time_sync_reply(T0));
        h.take();
        let text = r#"{"zz":1, "method":"_internal.info","params":{"z":"1","mac":"x","ap":{"ssid":"s","bssid":"b","rssi":-46}, "b": [1, {"y":2,"x":1}]},"partner_id":"","id":9}"#;
        h.c.handle_info(h.now, &info(text));
        let id = h.c.next_id - 1;
        assert_eq!(
            h.expect_text(),
            format!(
                r#"{{"id":{id},"method":"_otc.info","params":{{"z":"1","mac":"AA:BB:CC:01:02:03","ap":{{"ssid":"s","bssid":"b","rssi":-46}},"b":[1,{{"y":2,"x":1}}],"model":"vendor.camera.v1","token":"4142434445464748494a4b4c4d4e4f50","life":1000,"uid":"12345","bindkey":"bk"}},"zz":1,"partner_id":""}}"#
            )
        );
    }

    #[test]
    fn otc_info_error_fails_the_attempt() {
        let mut h = H::new(cfg());
        h.c.start(h.now);
        h.take();
        h.resolved(Ok(vec![SERVER]));
        h.c.handle_connected(h.now, LOCAL);
        h.deliver(&miio::time_sync_reply(T0));
        h.take();
        h.c.handle_info(h.now, &info(r#"{"params":{}}"#));
        let (_, m) = h.expect_json();
        h.deliver_json(&json!({"id": m["id"], "error": {"code": -1, "message": "no"}}).to_string());
        assert_eq!(
            h.take(),
            vec![Action::Close, Action::Event(CloudEvent::Retry)]
        );
        assert_eq!(h.c.state(), CloudState::Retry);
    }

    #[test]
    fn otc_info_noack_fails_after_retransmits() {
        let mut h = H::new(cfg());
        h.c.start(h.now);
        h.take();
        h.resolved(Ok(vec![SERVER]));
        h.c.handle_connected(h.now, LOCAL);
        h.deliver(&miio::time_sync_reply(T0));
        h.take();
        h.c.handle_info(h.now, &info(r#"{"params":{}}"#));
        let (_, first) = h.expect_json();
        for _ in 0..3 {
            h.advance(3000);
            assert_eq!(h.expect_json().1, first);
        }
        h.advance(2999);
        h.quiet();
        h.advance(1);
        assert_eq!(
            h.take(),
            vec![Action::Close, Action::Event(CloudEvent::Retry)]
        );
    }

    #[test]
    fn a_lost_info_answer_fails_the_attempt_after_the_guard() {
        let mut h = H::new(cfg());
        h.c.start(h.now);
        h.take();
        h.resolved(Ok(vec![SERVER]));
        h.c.handle_connected(h.now, LOCAL);
        h.deliver(&miio::time_sync_reply(T0));
        assert_eq!(h.take().last(), Some(&Action::NeedInfo));
        assert!(h.c.is_busy());
        h.advance(29_999);
        h.quiet();
        h.advance(1);
        assert_eq!(
            h.take(),
            vec![Action::Close, Action::Event(CloudEvent::Retry)]
        );
        // A late answer is ignored.
        h.c.handle_info(h.now, &info(r#"{"params":{}}"#));
        h.quiet();
    }

    #[test]
    fn hello_misses_fail_five_seconds_after_the_third() {
        let mut h = H::new(cfg());
        h.c.start(h.now);
        h.take();
        h.resolved(Ok(vec![SERVER]));
        h.c.handle_connected(h.now, LOCAL);
        let t0 = h.now;
        let a = h.take();
        assert_eq!(a.len(), 3, "{a:?}");
        for _ in 0..2 {
            h.advance(5000);
            assert_eq!(h.take(), vec![Action::Send(miio::cloud_hello().to_vec())]);
        }
        h.advance(4999);
        h.quiet();
        h.advance(1);
        assert_eq!(h.now, Instant(t0.0 + 15_000));
        assert_eq!(
            h.take(),
            vec![Action::Close, Action::Event(CloudEvent::Retry)]
        );
        assert!(!h.c.is_busy());
    }

    #[test]
    fn time_sync_only_while_a_hello_is_outstanding() {
        let mut h = H::new(cfg());
        h.c.start(h.now);
        h.take();
        // Not connected: nothing is read at all.
        h.deliver(&miio::time_sync_reply(T0));
        h.quiet();
        h.resolved(Ok(vec![SERVER]));
        h.c.handle_connected(h.now, LOCAL);
        h.take();
        // V7 echoed back (stamp 0) is not a time sync.
        h.deliver(&miio::cloud_hello());
        h.quiet();
        assert_eq!(h.c.offset(), 0);
        h.deliver(&miio::time_sync_reply(T0));
        assert_eq!(h.take(), vec![Action::NeedInfo]);
        assert_eq!(h.c.offset(), i64::from(T0) - 1000);
        // The hello is answered: a second reply changes nothing.
        h.deliver(&miio::time_sync_reply(T0 + 500));
        h.quiet();
        assert_eq!(h.c.offset(), i64::from(T0) - 1000);

        // Nor while connected without a refresh hello (V8 unsolicited).
        let mut h = H::connected(cfg());
        h.deliver(&miio::time_sync_reply(T0 + 999));
        h.quiet();
        assert_eq!(h.c.offset(), i64::from(T0) - 1000);
    }

    #[test]
    fn a_time_sync_past_2097_is_refused() {
        let mut h = H::new(cfg());
        h.c.start(h.now);
        h.take();
        h.resolved(Ok(vec![SERVER]));
        h.c.handle_connected(h.now, LOCAL);
        assert!(h
            .take()
            .contains(&Action::Send(miio::cloud_hello().to_vec())));
        // 0xfffffff0 would make every keepalive 0xffffffff after 15 s: not taken, no NeedInfo.
        h.deliver(&miio::time_sync_reply(0xffff_fff0));
        h.quiet();
        assert_eq!(h.c.offset(), 0);
        h.deliver(&miio::time_sync_reply(MAX_SERVER_STAMP + 1));
        h.quiet();
        // The hello is still unanswered: the next plausible reply is the time sync.
        h.deliver(&miio::time_sync_reply(MAX_SERVER_STAMP));
        assert_eq!(h.take(), vec![Action::NeedInfo]);
        assert_eq!(h.c.offset(), i64::from(MAX_SERVER_STAMP) - 1000);
    }

    #[test]
    fn a_refused_time_sync_is_no_answer_to_the_hello() {
        let mut h = H::new(cfg());
        h.c.start(h.now);
        h.take();
        h.resolved(Ok(vec![SERVER]));
        h.c.handle_connected(h.now, LOCAL);
        h.take();
        // A cloud that only ever answers 0xfffffff0: the hellos run out and the attempt fails, as
        // with no answer at all, instead of a session whose stamps are stuck at 0xffffffff.
        for _ in 0..60 {
            h.deliver(&miio::time_sync_reply(0xffff_fff0));
            h.advance(500);
        }
        let a = h.take();
        assert!(
            a.contains(&Action::Event(CloudEvent::Retry)),
            "the attempt did not fail: {a:?}"
        );
        assert!(!a.contains(&Action::NeedInfo), "{a:?}");
    }

    #[test]
    fn a_resolver_that_never_answers_fails_the_attempt_after_10_s() {
        let mut h = H::new(cfg());
        h.c.start(h.now);
        h.expect_event(CloudEvent::Trying);
        let Action::Resolve { attempt: first, .. } = h.next() else {
            panic!("expected Resolve");
        };
        // The resolver thread could not start: no answer ever comes. The machine has a deadline,
        // so a suspend gets a wakeup time and the link does not stay in Resolving forever.
        assert_eq!(h.c.poll_timeout(), Some(h.now + DNS_TIMEOUT));
        h.advance(DNS_TIMEOUT.millis() - 1);
        h.quiet();
        h.advance(1);
        let a = h.take();
        assert!(
            a.contains(&Action::Event(CloudEvent::InternetFailed))
                && a.contains(&Action::Event(CloudEvent::Retry)),
            "{a:?}"
        );
        assert_eq!(h.c.state(), CloudState::Retry);
        // The next attempt resolves again, with a new tag.
        let t = h.c.poll_timeout().expect("a backoff deadline");
        h.advance(t.0 - h.now.0);
        h.expect_event(CloudEvent::Trying);
        let Action::Resolve {
            attempt: second, ..
        } = h.next()
        else {
            panic!("expected Resolve");
        };
        assert_ne!(first, second);
        // The first attempt's answer arrives late: ignored, still resolving.
        h.c.handle_resolved(h.now, first, Ok(vec![SERVER]));
        h.quiet();
        // The current one is taken.
        h.c.handle_resolved(h.now, second, Ok(vec![SERVER]));
        assert!(matches!(h.next(), Action::Connect { .. }));
    }

    #[test]
    fn idle_report_only_on_the_first_connect() {
        let mut h = H::new(cfg());
        assert!(h.up(), "first connect reports idle");
        h.c.handle_link_down(h.now);
        assert_eq!(
            h.take(),
            vec![Action::Close, Action::Event(CloudEvent::Retry)]
        );
        let t = h.c.poll_timeout().unwrap();
        h.advance(t.0 - h.now.0);
        h.expect_event(CloudEvent::Trying);
        assert!(!h.finish_attempt(), "no idle report on a reconnect");
        assert_eq!(h.c.state(), CloudState::Connected);
    }

    #[test]
    fn idle_report_retried_when_the_link_dropped_before_its_ack() {
        let mut h = H::new(cfg());
        h.c.start(h.now);
        h.take();
        h.resolved(Ok(vec![SERVER]));
        h.c.handle_connected(h.now, LOCAL);
        h.deliver(&miio::time_sync_reply(T0));
        h.take();
        h.c.handle_info(h.now, &info(r#"{"params":{}}"#));
        let (_, m) = h.expect_json();
        h.deliver_json(&json!({"id": m["id"], "result": {}}).to_string());
        let (_, props) = h.expect_json();
        assert_eq!(props["method"], "props");
        h.c.handle_link_down(h.now);
        assert_eq!(
            h.take(),
            vec![Action::Close, Action::Event(CloudEvent::Retry)]
        );
        let t = h.c.poll_timeout().unwrap();
        h.advance(t.0 - h.now.0);
        h.expect_event(CloudEvent::Trying);
        assert!(h.finish_attempt());
    }

    // ---- keepalive and stamps --------------------------------------------------------------

    #[test]
    fn an_hour_connected() {
        let mut h = H::connected(cfg());
        let end = Instant(h.now.0 + 3_600_000);
        let (mut kas, mut refreshes) = (0, 0);
        let mut ka_stamps: Vec<u32> = Vec::new();
        let mut all_stamps: Vec<u32> = Vec::new();
        while let Some(t) = h.c.poll_timeout().filter(|&t| t <= end) {
            h.now = t;
            h.c.handle_timeout(t);
            while let Some(a) = h.c.poll_action() {
                match a {
                    Action::Send(b) if b[..] == miio::cloud_hello()[..] => {
                        refreshes += 1;
                        // The refresh moves the clock back by 7 s: stamps must not follow.
                        let back = h.c.stamp(h.now) - 7;
                        h.c.handle_datagram(h.now, &miio::time_sync_reply(back));
                    }
                    Action::Send(b) => {
                        let p = Packet::new_checked(&b[..]).unwrap();
                        all_stamps.push(p.stamp());
                        if p.is_control() {
                            kas += 1;
                            ka_stamps.push(p.stamp());
                            assert_eq!(b[..], miio::keepalive(&h.keys, DID, p.stamp())[..]);
                            h.c.handle_datagram(h.now, &b); // the pong
                        } else {
                            let m = miio::decode(&h.keys, DID, &b).unwrap().value;
                            assert_eq!(m["method"], "_otc.info");
                            let ack = json!({"id": m["id"], "result": {"otc_list": []}});
                            let p = h.msg(&ack.to_string());
                            h.c.handle_datagram(h.now, &p);
                        }
                    }
                    Action::NeedInfo => h.c.handle_info(h.now, &info(r#"{"params":{}}"#)),
                    a => panic!("unexpected {a:?}"),
                }
            }
        }
        assert_eq!(kas, 180);
        assert_eq!(refreshes, 2);
        assert!(ka_stamps.windows(2).all(|w| w[0] < w[1]), "{ka_stamps:?}");
        assert!(
            all_stamps.windows(2).all(|w| w[0] <= w[1]),
            "{all_stamps:?}"
        );
        assert_eq!(h.c.state(), CloudState::Connected);
        assert!(!h.c.is_busy());
    }

    #[test]
    fn three_keepalive_misses_lose_the_link_three_intervals_after_the_first() {
        let mut h = H::connected(cfg());
        let up = h.now;
        for _ in 0..2 {
            h.advance(20_000);
            let ka = h.expect_send();
            h.quiet();
            h.deliver(&ka);
            h.quiet();
        }
        h.advance(20_000);
        let first_unanswered = h.now;
        assert_eq!(first_unanswered, Instant(up.0 + 60_000));
        h.expect_send();
        h.advance(59_999);
        let a = h.take();
        assert_eq!(a.len(), 2, "two more keepalives, no failure: {a:?}");
        assert!(a
            .iter()
            .all(|a| matches!(a, Action::Send(b) if b.len() == 32)));
        h.advance(1);
        assert_eq!(h.now, Instant(first_unanswered.0 + 60_000));
        assert_eq!(
            h.take(),
            vec![Action::Close, Action::Event(CloudEvent::Retry)]
        );
    }

    #[test]
    fn any_valid_packet_resets_the_misses() {
        let mut h = H::connected(cfg());
        for _ in 0..10 {
            h.advance(20_000);
            h.expect_send();
            // No pong, but a cloud ack of some earlier reply: valid, so no miss.
            h.deliver_json(r#"{"id":999,"result":"ok"}"#);
            h.quiet();
        }
        assert_eq!(h.c.state(), CloudState::Connected);
    }

    #[test]
    fn filler_pong_accepted_and_cloud_ping_echoed_once() {
        let mut h = H::connected(cfg());
        h.advance(20_000);
        let ka = h.expect_send();
        // A filler pong (all ff checksum) counts as an answer and is never echoed.
        let mut filler = ka.clone();
        filler[16..].fill(0xff);
        h.deliver(&filler);
        h.quiet();
        // The real pong (our own stamp, valid MD5): not echoed.
        h.deliver(&ka);
        h.quiet();
        // A ping: valid MD5, a stamp we did not send, above what the cloud sent before.
        let ping = miio::keepalive(&h.keys, DID, h.c.stamp(h.now) + 100);
        h.deliver(&ping);
        assert_eq!(h.take(), vec![Action::Send(ping.to_vec())]);
        h.deliver(&ping);
        h.quiet();
        // A bad checksum that is not filler is dropped.
        let mut bad = ka.clone();
        bad[20] ^= 1;
        h.deliver(&bad);
        h.quiet();
        // Wrong did.
        h.deliver(&miio::keepalive(&h.keys, DID + 1, h.c.stamp(h.now) + 200));
        h.quiet();
        for _ in 0..5 {
            h.advance(20_000);
            let ka = h.expect_send();
            h.deliver(&ka);
        }
        assert_eq!(h.c.state(), CloudState::Connected);
    }

    #[test]
    fn refresh_sends_hello_then_info_after_five_seconds() {
        let mut c = cfg();
        c.refresh = Some(Duration::from_secs(100));
        c.keepalive = Duration::from_secs(1000);
        let mut h = H::connected(c);
        h.advance(100_000);
        assert_eq!(h.take(), vec![Action::Send(miio::cloud_hello().to_vec())]);
        h.advance(4999);
        h.quiet();
        h.advance(1);
        assert_eq!(h.take(), vec![Action::NeedInfo]);
        h.c.handle_info(h.now, &info(r#"{"params":{}}"#));
        let (_, m) = h.expect_json();
        assert_eq!(m["method"], "_otc.info");
        // Its reply updates otc_list; no event.
        let ack = json!({"id": m["id"], "result": {"otc_list": [{"ip": "5.6.7.8", "port": 8053}]}});
        h.deliver_json(&ack.to_string());
        h.quiet();
        assert_eq!(
            h.c.otc_list,
            vec![SocketAddrV4::new(Ipv4Addr::new(5, 6, 7, 8), 8053)]
        );
        // An error reply of a refresh is only logged.
        h.advance(100_000);
        let hello = h.expect_send();
        assert_eq!(hello, miio::cloud_hello());
        h.deliver(&miio::time_sync_reply(T0 + 300));
        assert_eq!(h.take(), vec![Action::NeedInfo]);
        h.c.handle_info(h.now, &info(r#"{"params":{}}"#));
        let (_, m) = h.expect_json();
        h.deliver_json(&json!({"id": m["id"], "error": {"code": -1, "message": "x"}}).to_string());
        h.quiet();
        assert_eq!(h.c.state(), CloudState::Connected);
    }

    // ---- backoff, server list, DNS ---------------------------------------------------------

    fn d4_bounds(k: u32, min: u64, cap: u64) -> (u64, u64) {
        let d = min.saturating_mul(1 << (k - 1)).min(cap);
        (
            (d * 8 / 10).clamp(1000, cap),
            (d * 12 / 10).clamp(1000, cap),
        )
    }

    #[test]
    fn backoff_within_d4_bounds_and_reset_after_connect() {
        for seed in 0..20 {
            let mut c = cfg();
            c.seed = seed;
            let mut h = H::new(c);
            h.c.start(h.now);
            for k in 1..=8 {
                assert_eq!(h.next(), Action::Event(CloudEvent::Trying));
                assert!(matches!(h.next(), Action::Resolve { .. }));
                h.resolved(Err("NXDOMAIN".into()));
                assert_eq!(
                    h.take(),
                    vec![
                        Action::Event(CloudEvent::InternetFailed),
                        Action::Event(CloudEvent::Retry)
                    ]
                );
                let d = h.c.poll_timeout().unwrap().0 - h.now.0;
                let (lo, hi) = d4_bounds(k, 5000, 300_000);
                assert!(lo <= d && d <= hi, "k={k} d={d} not in [{lo},{hi}]");
                h.advance(d);
            }
            h.expect_event(CloudEvent::Trying);
            h.finish_attempt();
            h.c.handle_link_down(h.now);
            h.take();
            let d = h.c.poll_timeout().unwrap().0 - h.now.0;
            let (lo, hi) = d4_bounds(1, 5000, 300_000);
            assert!(lo <= d && d <= hi, "after a connect k=1 again: {d}");
        }
    }

    #[test]
    fn backoff_clamped_to_one_second_and_cap() {
        let mut c = cfg();
        c.backoff_min = Duration::from_millis(100);
        c.backoff_max = Duration::from_secs(2);
        let mut cl = Cloud::new(c);
        assert_eq!(cl.backoff(1), Duration::from_secs(1));
        for k in 6..40 {
            let d = cl.backoff(k).millis();
            assert!((1600..=2000).contains(&d), "k={k} d={d}");
        }
        assert!(cl.backoff(u32::MAX) <= Duration::from_secs(2));
    }

    #[test]
    fn dns_addresses_filtered_and_shuffled_otc_list_appended() {
        let mut h = H::connected(cfg());
        // Teach an otc_list through a refresh reply.
        h.c.apply_otc(&obj(
            r#"{"otc_list":[{"ip":"1.2.3.4","port":8053},{"ip":"9.9.9.9","port":8054},{"ip":"","port":1},{"ip":"bad"},{"ip":"8.8.8.8","port":0},{"ip":"127.0.0.1","port":8053}]}"#,
        ));
        h.c.handle_link_down(h.now);
        h.take();
        let t = h.c.poll_timeout().unwrap();
        h.advance(t.0 - h.now.0);
        h.expect_event(CloudEvent::Trying);
        // The old list (one server) is used up: the next transport (TCP) resolves.
        assert!(matches!(
            h.next(),
            Action::Resolve {
                transport: Transport::Tcp,
                ..
            }
        ));
        h.resolved(Err("x".into()));
        h.take();
        let t = h.c.poll_timeout().unwrap();
        h.advance(t.0 - h.now.0);
        h.expect_event(CloudEvent::Trying);
        // TCP had no list: back to UDP, resolved again.
        assert!(matches!(
            h.next(),
            Action::Resolve {
                transport: Transport::Udp,
                ..
            }
        ));
        let dns = vec![
            Ipv4Addr::new(0, 1, 2, 3),
            Ipv4Addr::new(127, 0, 0, 1),
            Ipv4Addr::new(224, 0, 0, 1),
            Ipv4Addr::new(250, 0, 0, 1),
            SERVER,
            Ipv4Addr::new(4, 4, 4, 4),
        ];
        h.resolved(Ok(dns));
        let mut order = Vec::new();
        loop {
            match h.next() {
                Action::Connect { addr, .. } => order.push(addr),
                a => panic!("{a:?}"),
            }
            h.c.handle_connect_failed(h.now, "refused");
            h.take();
            let t = h.c.poll_timeout().unwrap();
            h.advance(t.0 - h.now.0);
            h.expect_event(CloudEvent::Trying);
            if order.len() == 4 {
                break;
            }
        }
        let a = |a, b, c, d, p| SocketAddrV4::new(Ipv4Addr::new(a, b, c, d), p);
        let mut dns_part = order[..2].to_vec();
        dns_part.sort();
        assert_eq!(dns_part, vec![a(1, 2, 3, 4, 8053), a(4, 4, 4, 4, 8053)]);
        // otc_list entries: no duplicate of 1.2.3.4, never filtered (127.0.0.1 kept).
        assert_eq!(order[2..], [a(9, 9, 9, 9, 8054), a(127, 0, 0, 1, 8053)]);
        // After the last UDP server: TCP.
        assert!(matches!(
            h.next(),
            Action::Resolve {
                transport: Transport::Tcp,
                ..
            }
        ));
    }

    #[test]
    fn explicit_hosts_are_never_filtered() {
        let mut c = cfg();
        c.udp = Endpoint {
            host: "127.0.0.1".into(),
            port: 8053,
            explicit: true,
        };
        let mut h = H::new(c);
        h.c.start(h.now);
        h.expect_event(CloudEvent::Trying);
        let lo = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 8053);
        assert_eq!(
            h.next(),
            Action::Connect {
                transport: Transport::Udp,
                addr: lo
            }
        );
        // Same first octet as the local address: fine for an explicit host.
        h.c.handle_connected(h.now, Ipv4Addr::LOCALHOST);
        h.expect_event(CloudEvent::InternetConnected);

        // An explicit name: its DNS answer is not filtered either.
        let mut c = cfg();
        c.udp.host = "localhost".into();
        c.udp.explicit = true;
        let mut h = H::new(c);
        h.c.start(h.now);
        h.take();
        h.resolved(Ok(vec![Ipv4Addr::LOCALHOST]));
        assert_eq!(
            h.next(),
            Action::Connect {
                transport: Transport::Udp,
                addr: lo
            }
        );
    }

    #[test]
    fn dns_answer_in_our_subnet_is_a_buggy_router() {
        let mut h = H::new(cfg());
        h.c.start(h.now);
        h.take();
        h.resolved(Ok(vec![Ipv4Addr::new(10, 0, 0, 1)]));
        assert!(matches!(h.next(), Action::Connect { .. }));
        h.c.handle_connected(h.now, LOCAL);
        assert_eq!(
            h.take(),
            vec![
                Action::Event(CloudEvent::InternetFailed),
                Action::Close,
                Action::Event(CloudEvent::Retry)
            ]
        );
    }

    #[test]
    fn all_dns_answers_refused_is_a_dns_failure() {
        let mut h = H::new(cfg());
        h.c.start(h.now);
        h.take();
        h.resolved(Ok(vec![Ipv4Addr::LOCALHOST]));
        assert_eq!(
            h.take(),
            vec![
                Action::Event(CloudEvent::InternetFailed),
                Action::Event(CloudEvent::Retry)
            ]
        );
    }

    #[test]
    fn tcp_connect_deadline_is_five_seconds() {
        let mut h = H::new(tcp_cfg());
        h.c.start(h.now);
        h.take();
        h.resolved(Ok(vec![SERVER]));
        assert!(matches!(
            h.next(),
            Action::Connect {
                transport: Transport::Tcp,
                ..
            }
        ));
        assert!(h.c.is_busy());
        h.advance(4999);
        h.quiet();
        h.advance(1);
        assert_eq!(
            h.take(),
            vec![
                Action::Event(CloudEvent::InternetFailed),
                Action::Close,
                Action::Event(CloudEvent::Retry)
            ]
        );
        // A late connect is ignored.
        h.c.handle_connected(h.now, LOCAL);
        h.quiet();
    }

    #[test]
    fn stop_closes_and_fails_pending() {
        let mut h = H::connected(cfg());
        h.upstream(1, r#"{"id":5,"method":"m"}"#);
        h.take();
        h.c.stop(h.now);
        assert_eq!(
            h.take(),
            vec![
                Action::Close,
                to_client(
                    1,
                    r#"{"id":5,"error":{"code":-30011,"message":"OT server disconnected"}}"#
                )
            ]
        );
        assert_eq!(h.c.state(), CloudState::Stopped);
        assert_eq!(h.c.poll_timeout(), None);
        h.advance(1_000_000);
        h.quiet();
        // And it starts again at once.
        h.c.start(h.now);
        h.expect_event(CloudEvent::Trying);
        assert!(matches!(
            h.next(),
            Action::Resolve {
                transport: Transport::Udp,
                ..
            }
        ));
    }

    // ---- upstream --------------------------------------------------------------------------

    #[test]
    fn upstream_acked_with_the_original_id() {
        let mut h = H::connected(cfg());
        let req = r#"{"id":7,"method":"props","params":{"a":1},"sid":"x"}"#;
        h.upstream(3, req);
        let (_, mut m) = h.expect_json();
        let cid = m.remove("id").unwrap();
        assert_ne!(cid, json!(7));
        let mut orig = obj(req);
        orig.remove("id");
        assert_eq!(m, orig);
        assert!(h.c.is_busy());
        h.deliver_json(&format!(r#"{{"id":{cid},"result":"ok","extra":1}}"#));
        assert_eq!(
            h.take(),
            vec![to_client(3, r#"{"id":7,"result":"ok","extra":1}"#)]
        );
        assert!(!h.c.is_busy());
        // A second ack with that id is the cloud acking nothing: swallowed.
        h.deliver_json(&format!(r#"{{"id":{cid},"result":"ok"}}"#));
        h.quiet();
        // No retransmission after the ack.
        h.advance(15_000);
        h.quiet();
    }

    #[test]
    fn two_clients_with_the_same_id_do_not_collide() {
        let mut h = H::connected(cfg());
        h.upstream(1, r#"{"id":1,"method":"a"}"#);
        h.upstream(2, r#"{"id":1,"method":"b"}"#);
        let (_, a) = h.expect_json();
        let (_, b) = h.expect_json();
        assert_ne!(a["id"], b["id"]);
        h.deliver_json(&format!(r#"{{"id":{},"result":"B"}}"#, b["id"]));
        h.deliver_json(&format!(r#"{{"id":{},"result":"A"}}"#, a["id"]));
        assert_eq!(
            h.take(),
            vec![
                to_client(2, r#"{"id":1,"result":"B"}"#),
                to_client(1, r#"{"id":1,"result":"A"}"#)
            ]
        );
    }

    /// Found by the month simulation (`proto::sim`): a tool that sends a report and exits at once,
    /// then a new connection in the same slot. The ack must not reach the newcomer, and the report
    /// is still retransmitted until the cloud acks it.
    #[test]
    fn ack_for_a_client_that_has_gone_is_dropped_not_given_to_its_slot() {
        let mut h = H::connected(cfg());
        h.upstream(4, r#"{"id":9,"method":"event.x","params":[]}"#);
        let (_, first) = h.expect_json();
        h.c.client_gone(4);
        h.advance(3000);
        let (_, again) = h.expect_json();
        assert_eq!(again, first, "still retransmitted");
        h.deliver_json(&format!(r#"{{"id":{},"result":"ok"}}"#, first["id"]));
        h.quiet();
        assert!(!h.c.is_busy());
        // Gone and never acked: the noack goes to no one either.
        h.upstream(4, r#"{"id":10,"method":"event.x","params":[]}"#);
        h.expect_json();
        h.c.client_gone(4);
        for _ in 0..3 {
            h.advance(3000);
            h.expect_json();
        }
        h.advance(3000);
        h.quiet();
        assert!(!h.c.is_busy());
    }

    #[test]
    fn upstream_retransmitted_three_times_then_noack_on_udp() {
        let mut h = H::connected(cfg());
        h.upstream(4, r#"{"id":9,"method":"event.x","params":[]}"#);
        let (s0, first) = h.expect_json();
        let mut last = s0;
        for _ in 0..3 {
            h.advance(3000);
            let (s, again) = h.expect_json();
            assert_eq!(again, first, "same payload, same cloud id");
            assert!(s > last, "fresh stamp");
            last = s;
            h.quiet();
        }
        h.advance(2999);
        h.quiet();
        h.advance(1);
        assert_eq!(
            h.take(),
            vec![to_client(
                4,
                r#"{"id":9,"error":{"code":-30011,"message":"OT server noack"}}"#
            )]
        );
        h.advance(60_000);
        assert!(h
            .take()
            .iter()
            .all(|a| matches!(a, Action::Send(b) if b.len() == 32)));
    }

    #[test]
    fn upstream_not_retransmitted_on_tcp() {
        let mut c = tcp_cfg();
        c.keepalive = Duration::from_secs(100);
        let mut h = H::connected(c);
        h.upstream(4, r#"{"id":9,"method":"event.x"}"#);
        h.expect_json();
        h.advance(2999);
        h.quiet();
        h.advance(1);
        assert_eq!(
            h.take(),
            vec![to_client(
                4,
                r#"{"id":9,"error":{"code":-30011,"message":"OT server noack"}}"#
            )]
        );
    }

    #[test]
    fn upstream_fails_at_once_on_link_loss_and_while_down() {
        let mut h = H::connected(cfg());
        h.upstream(1, r#"{"id":11,"method":"a"}"#);
        h.upstream(2, r#"{"id":12,"method":"b"}"#);
        h.take();
        h.c.handle_link_down(h.now);
        let disc = |c, id| {
            to_client(
                c,
                &format!(
                    r#"{{"id":{id},"error":{{"code":-30011,"message":"OT server disconnected"}}}}"#
                ),
            )
        };
        assert_eq!(
            h.take(),
            vec![
                Action::Close,
                disc(1, 11),
                disc(2, 12),
                Action::Event(CloudEvent::Retry)
            ]
        );
        // While down (retry, then trying): at once.
        h.upstream(3, r#"{"id":13,"method":"c"}"#);
        assert_eq!(h.take(), vec![disc(3, 13)]);
        let t = h.c.poll_timeout().unwrap();
        h.advance(t.0 - h.now.0);
        h.take();
        h.upstream(3, r#"{"id":14,"method":"c"}"#);
        assert_eq!(h.take(), vec![disc(3, 14)]);
        // Fire-and-forget while down: dropped silently.
        h.upstream(3, r#"{"method":"c"}"#);
        h.quiet();
        // Also before the idle report is acked the session is up: requests go through.
    }

    #[test]
    fn local_and_internal_methods_never_go_up() {
        let mut h = H::connected(cfg());
        h.upstream(1, r#"{"id":1,"method":"local.query_status"}"#);
        h.upstream(1, r#"{"method":"_internal.info","params":{}}"#);
        h.quiet();
        // Nor LAN-only notifications from the cloud down.
        h.deliver_json(r#"{"method":"miIO.config","params":{"enauth":0}}"#);
        h.quiet();
    }

    #[test]
    fn upstream_queue_full_at_128() {
        let mut c = cfg();
        c.ack_timeout = Duration::from_secs(100);
        let mut h = H::connected(c);
        for i in 0..128 {
            h.upstream(1, &format!(r#"{{"id":{i},"method":"m"}}"#));
            h.expect_send();
        }
        h.upstream(1, r#"{"id":500,"method":"m"}"#);
        assert_eq!(
            h.take(),
            vec![to_client(
                1,
                r#"{"id":500,"error":{"code":-30011,"message":"OT queue full"}}"#
            )]
        );
    }

    #[test]
    fn upstream_too_long_and_invalid_ids() {
        let mut c = cfg();
        c.ack_timeout = Duration::from_secs(100);
        c.keepalive = Duration::from_secs(100);
        let mut h = H::connected(c);
        let long = format!(r#"{{"id":3,"method":"m","params":"{}"}}"#, "x".repeat(1024));
        h.upstream(1, &long);
        assert_eq!(
            h.take(),
            vec![to_client(
                1,
                r#"{"id":3,"error":{"code":-32600,"message":"msg too long"}}"#
            )]
        );
        // The limit counts the text after the rewrite: 1024 bytes pass, 1025 do not.
        let fit = |h: &mut H, n: usize| {
            let probe = format!(r#"{{"id":3,"method":"m","params":"{}"}}"#, "x".repeat(n));
            h.upstream(1, &probe);
            let a = h.take();
            match &a[..] {
                [Action::Send(b)] => Some(miio::decode(&h.keys, DID, b).unwrap().text.len()),
                _ => None,
            }
        };
        let mut sizes = Vec::new();
        for n in 980..1010 {
            if let Some(len) = fit(&mut h, n) {
                sizes.push(len);
            }
        }
        assert_eq!(sizes.iter().max(), Some(&1024));
        h.upstream(1, r#"{"id":"x","method":"m"}"#);
        assert_eq!(
            h.take(),
            vec![to_client(
                1,
                r#"{"id":"x","error":{"code":-32600,"message":"Invalid Request"}}"#
            )]
        );
        // A notification goes once, verbatim, untracked.
        h.upstream(1, r#"{"method":"n","params":[1]}"#);
        assert_eq!(h.expect_text(), r#"{"method":"n","params":[1]}"#);
        h.advance(3000);
        h.quiet();
    }

    // ---- downstream ------------------------------------------------------------------------

    const CMD: &str = r#"{"id":55,"method":"set_power","params":["on"],"from":"4"}"#;

    #[test]
    fn command_broadcast_verbatim_first_reply_wins() {
        let mut h = H::connected(cfg());
        h.deliver_json(CMD);
        assert_eq!(
            h.take(),
            vec![Action::Command {
                text: CMD.into(),
                id: Some(55)
            }]
        );
        // A repeat while pending is ignored.
        h.deliver_json(CMD);
        h.quiet();
        assert!(h.reply(1, r#"{"id":55,"result":["ok"]}"#));
        assert_eq!(h.expect_text(), r#"{"id":55,"result":["ok"]}"#);
        assert!(!h.reply(2, r#"{"id":55,"result":["late"]}"#));
        h.quiet();
        h.advance(10_000);
        assert!(h
            .take()
            .iter()
            .all(|a| !matches!(a, Action::Send(b) if b.len() > 32)));
        // The cloud's ack of our reply is swallowed.
        h.deliver_json(r#"{"id":55,"result":"ok"}"#);
        h.quiet();
    }

    #[test]
    fn command_times_out_to_9999() {
        let mut h = H::connected(cfg());
        h.deliver_json(CMD);
        h.take();
        h.advance(4999);
        h.quiet();
        h.advance(1);
        assert_eq!(
            h.expect_text(),
            r#"{"id":55,"error":{"code":-9999,"message":"user ack timeout"}}"#
        );
        assert!(!h.reply(1, r#"{"id":55,"result":["late"]}"#));
        h.quiet();
    }

    #[test]
    fn d16_held_error_replaced_by_a_real_reply() {
        let mut h = H::connected(cfg());
        h.deliver_json(CMD);
        h.take();
        let e = r#"{"id":55,"error":{"code":-10000,"message":"user undefined error"}}"#;
        assert!(h.reply(1, e));
        assert!(h.reply(
            3,
            r#"{"id":55,"error":{"code":-32601,"message":"Method not found"}}"#
        ));
        h.quiet();
        assert!(h.reply(2, r#"{"id":55,"result":["ok"]}"#));
        assert_eq!(h.expect_text(), r#"{"id":55,"result":["ok"]}"#);
        h.advance(5000);
        assert!(h
            .take()
            .iter()
            .all(|a| !matches!(a, Action::Send(b) if b.len() > 32)));
    }

    #[test]
    fn d16_held_error_sent_at_timeout_instead_of_9999() {
        let mut h = H::connected(cfg());
        h.deliver_json(CMD);
        h.take();
        let e = r#"{"id":55,"error":{"code":-10000,"message":"user undefined error"}}"#;
        assert!(h.reply(1, e));
        h.quiet();
        h.advance(5000);
        assert_eq!(h.expect_text(), e);
    }

    #[test]
    fn repeated_command_answered_from_the_cache() {
        let mut h = H::connected(cfg());
        h.deliver_json(CMD);
        h.take();
        h.reply(1, r#"{"id":55,"result":["ok"]}"#);
        h.expect_send();
        h.advance(30_000);
        h.take();
        h.deliver_json(CMD);
        assert_eq!(h.expect_text(), r#"{"id":55,"result":["ok"]}"#);
        h.quiet();
        // After 60 s the entry is gone: a new command.
        h.advance(31_000);
        h.take();
        h.deliver_json(CMD);
        assert_eq!(
            h.take(),
            vec![Action::Command {
                text: CMD.into(),
                id: Some(55)
            }]
        );
    }

    #[test]
    fn reply_cache_keeps_32() {
        let mut c = cfg();
        c.keepalive = Duration::from_secs(1000);
        let mut h = H::connected(c);
        for id in 1..=33 {
            h.deliver_json(&format!(r#"{{"id":{id},"method":"m"}}"#));
            h.take();
            h.reply(1, &format!(r#"{{"id":{id},"result":{id}}}"#));
            h.take();
        }
        h.deliver_json(r#"{"id":1,"method":"m"}"#);
        assert!(
            matches!(&h.take()[..], [Action::Command { .. }]),
            "1 was evicted"
        );
        h.deliver_json(r#"{"id":33,"method":"m"}"#);
        assert_eq!(h.expect_text(), r#"{"id":33,"result":33}"#);
    }

    #[test]
    fn id_zero_never_forwarded() {
        let mut h = H::connected(cfg());
        let cmd = r#"{"id":0,"method":"m"}"#;
        h.deliver_json(cmd);
        assert_eq!(
            h.take(),
            vec![Action::Command {
                text: cmd.into(),
                id: None
            }]
        );
        assert!(!h.reply(1, r#"{"id":0,"result":"ok"}"#));
        h.quiet();
        h.advance(10_000);
        assert!(h
            .take()
            .iter()
            .all(|a| !matches!(a, Action::Send(b) if b.len() > 32)));
        // Unknown ids neither.
        assert!(!h.reply(1, r#"{"id":77,"result":"ok"}"#));
        h.quiet();
    }

    #[test]
    fn oversize_reply_not_sent_and_does_not_count() {
        let mut h = H::connected(cfg());
        h.deliver_json(CMD);
        h.take();
        let big = format!(r#"{{"id":55,"result":"{}"}}"#, "x".repeat(1100));
        assert!(h.reply(1, &big));
        assert_eq!(
            h.take(),
            vec![to_client(
                1,
                r#"{"id":55,"error":{"code":-32600,"message":"msg too long"}}"#
            )]
        );
        assert!(h.reply(2, r#"{"id":55,"result":["small"]}"#));
        assert_eq!(h.expect_text(), r#"{"id":55,"result":["small"]}"#);
    }

    #[test]
    fn cloud_methods_filtered() {
        let mut h = H::connected(cfg());
        h.deliver_json(r#"{"id":60,"method":"local.query_status"}"#);
        h.deliver_json(r#"{"id":61,"method":"_internal.info"}"#);
        h.quiet();
        h.deliver_json(r#"{"id":62,"method":"miIO.config_router","params":{"ssid":"x"}}"#);
        assert_eq!(
            h.expect_text(),
            r#"{"id":62,"error":{"code":-32601,"message":"Method not found"}}"#
        );
        h.quiet();
        h.deliver_json(r#"{"id":63,"method":"miIO.info","params":[]}"#);
        assert_eq!(
            h.take(),
            vec![Action::SelfMethod {
                id: Some(63),
                method: "miIO.info".into(),
                params: json!([])
            }]
        );
        assert!(h.c.self_reply(
            h.now,
            63,
            r#"{"id":63,"code":0,"message":"ok","result":{}}"#
        ));
        assert_eq!(
            h.expect_text(),
            r#"{"id":63,"code":0,"message":"ok","result":{}}"#
        );
        h.deliver_json(r#"{"id":64,"method":"miIO.config_tz","params":{"tz":"Asia/Shanghai"}}"#);
        assert!(matches!(
            &h.take()[..],
            [Action::SelfMethod { id: Some(64), .. }]
        ));
        h.advance(5000);
        assert_eq!(
            h.expect_text(),
            r#"{"id":64,"error":{"code":-9999,"message":"user ack timeout"}}"#
        );
        // A method that is not a string is dropped.
        h.deliver_json(r#"{"id":65,"method":5}"#);
        h.quiet();
    }

    #[test]
    fn at_most_64_pending_commands() {
        let mut c = cfg();
        c.user_ack_timeout = Duration::from_secs(100);
        c.keepalive = Duration::from_secs(1000);
        let mut h = H::connected(c);
        for id in 1..=64 {
            h.deliver_json(&format!(r#"{{"id":{id},"method":"m"}}"#));
            assert!(matches!(&h.take()[..], [Action::Command { .. }]));
        }
        h.deliver_json(r#"{"id":65,"method":"m"}"#);
        assert_eq!(
            h.expect_text(),
            r#"{"id":65,"error":{"code":-9999,"message":"user ack timeout"}}"#
        );
    }

    #[test]
    fn pending_commands_dropped_with_the_link() {
        let mut h = H::connected(cfg());
        h.deliver_json(CMD);
        h.take();
        h.c.handle_link_down(h.now);
        h.take();
        assert!(!h.reply(1, r#"{"id":55,"result":"ok"}"#));
        h.quiet();
    }

    // ---- receiving: framing and bad input --------------------------------------------------

    /// A TCP session with one upstream pending, and a stream that acks it, carries a command and a ping.
    fn stream_case() -> (H, Vec<u8>) {
        let mut c = tcp_cfg();
        c.keepalive = Duration::from_secs(1000);
        let mut h = H::connected(c);
        h.upstream(1, r#"{"id":1,"method":"x"}"#);
        let (_, m) = h.expect_json();
        let mut s = h.msg(&format!(r#"{{"id":{},"result":"ok"}}"#, m["id"]));
        s.extend(h.msg(CMD));
        s.extend(miio::keepalive(&h.keys, DID, h.c.stamp(h.now) + 50));
        s.extend(h.msg(r#"{"id":70,"method":"get_prop","params":["a"]}"#));
        (h, s)
    }

    #[test]
    fn tcp_stream_split_anywhere_gives_the_same_packets() {
        let (mut h, s) = stream_case();
        h.deliver(&s);
        let want = h.take();
        assert_eq!(want.len(), 4, "{want:?}");
        for i in 0..=s.len() {
            let (mut h, s2) = stream_case();
            assert_eq!(s2, s);
            h.deliver(&s[..i]);
            h.deliver(&s[i..]);
            assert_eq!(h.take(), want, "split at {i}");
        }
        let (mut h, _) = stream_case();
        for b in &s {
            h.deliver(std::slice::from_ref(b));
        }
        assert_eq!(h.take(), want, "byte by byte");
    }

    #[test]
    fn tcp_stream_length_below_32_fails_the_attempt() {
        let mut h = H::connected(tcp_cfg());
        h.deliver(&[0x21, 0x31, 0x00, 0x10, 0, 0]);
        assert_eq!(
            h.take(),
            vec![Action::Close, Action::Event(CloudEvent::Retry)]
        );
        // After the failure, stream bytes are ignored.
        h.deliver(&[0x21, 0x31, 0x00, 0x10]);
        h.quiet();
    }

    #[test]
    fn tcp_v15_two_packets_in_one_chunk() {
        let mut h = H::connected(tcp_cfg());
        h.advance(20_000);
        let ka = h.expect_send();
        let mut s = h.msg(r#"{"id":1001,"result":"ok"}"#);
        s.extend_from_slice(&ka);
        h.deliver(&s);
        h.quiet();
        assert_eq!(h.c.state(), CloudState::Connected);
        // And TCP EOF drops the link.
        h.c.handle_link_down(h.now);
        assert_eq!(
            h.take(),
            vec![Action::Close, Action::Event(CloudEvent::Retry)]
        );
    }

    #[test]
    fn bad_packets_dropped_link_stays_up() {
        let mut h = H::connected(cfg());
        let good = h.msg(CMD);
        let mut bad: Vec<Vec<u8>> = Vec::new();
        let mut flip = good.clone();
        flip[40] ^= 1;
        bad.push(flip);
        bad.push(miio::seal(&h.keys, DID + 1, 1, CMD.as_bytes()));
        let mut len = good.clone();
        len[3] = len[3].wrapping_add(1);
        bad.push(len);
        bad.push(good[..40].to_vec());
        bad.push(good[..31].to_vec());
        bad.push(Vec::new());
        let mut magic = good.clone();
        magic[0] = 0x22;
        bad.push(magic);
        // Bad padding: one block whose last plaintext byte is 0x41.
        let ct = h.keys.encrypt(&[0x41; 16]);
        bad.push(raw_packet(DID, 1, &ct[..16]));
        bad.push(raw_packet(DID, 1, &[7; 20]));
        bad.push(miio::seal(&h.keys, DID, 1, b"not json"));
        bad.push(miio::seal(&h.keys, DID, 1, b"[1,2]"));
        bad.push(miio::seal(&h.keys, DID, 1, &[0xff, 0xfe]));
        // Another key.
        bad.push(miio::seal(
            &Keys::new(b"ABCDEFGHIJKLMNOP"),
            DID,
            1,
            CMD.as_bytes(),
        ));
        // A time-sync reply with no hello outstanding.
        bad.push(miio::time_sync_reply(T0).to_vec());
        for b in &bad {
            h.deliver(b);
            h.quiet();
        }
        assert_eq!(h.c.state(), CloudState::Connected);
        h.deliver(&good);
        assert!(matches!(&h.take()[..], [Action::Command { .. }]));
        h.reply(1, r#"{"id":55,"result":0}"#);
        h.expect_send();
        h.advance(20_000);
        assert!(matches!(&h.take()[..], [Action::Send(b)] if b.len() == 32));
    }

    #[test]
    fn garbage_before_connect_is_ignored() {
        let mut h = H::new(cfg());
        h.deliver(b"hello");
        h.c.handle_stream(h.now, b"\x21\x31\x00\x01");
        h.c.handle_link_down(h.now);
        h.resolved(Ok(vec![SERVER]));
        h.c.handle_info(h.now, &Members::new());
        h.quiet();
        assert_eq!(h.c.state(), CloudState::Stopped);
    }

    #[test]
    fn config_debug_hides_secrets() {
        let s = format!("{:?}", cfg());
        assert!(!s.contains("YWJj"), "{s}");
        assert!(!s.contains("4142434445"), "{s}");
        assert!(s.contains("redacted"));
    }

    #[test]
    fn country_hosts() {
        assert_eq!(default_hosts("de").0, "de.ot.io.mi.com");
        assert_eq!(default_hosts("de").1, "de.ott.io.mi.com");
        assert_eq!(default_hosts("cn").0, "ot.io.mi.com");
        assert_eq!(default_hosts("").1, "ott.io.mi.com");
    }

    #[test]
    fn cloud_ids_never_zero_and_skip_pending() {
        let mut c = Cloud::new(cfg());
        c.next_id = MAX_CLOUD_ID;
        assert_eq!(c.alloc_id(), MAX_CLOUD_ID);
        assert_eq!(c.alloc_id(), 1);
        c.ups.push(Upstream {
            cloud_id: 2,
            origin: Origin::IdleReport,
            text: String::new(),
            sends: 1,
        });
        assert_eq!(c.alloc_id(), 3);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn arbitrary_datagrams_never_panic(
            dgrams in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..120), 1..16),
            header in any::<bool>(),
        ) {
            let mut h = H::connected(cfg());
            for mut d in dgrams {
                if header && d.len() >= 4 {
                    // Reach past the framing checks.
                    d[0] = 0x21;
                    d[1] = 0x31;
                    let n = d.len() as u16;
                    d[2..4].copy_from_slice(&n.to_be_bytes());
                }
                h.deliver(&d);
                h.advance(7000);
                h.take();
            }
        }

        #[test]
        fn arbitrary_stream_chunks_never_panic(
            chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..80), 1..16),
        ) {
            let mut h = H::connected(tcp_cfg());
            let mut first = true;
            for mut c in chunks {
                if first && c.len() >= 4 {
                    c[0] = 0x21;
                    c[1] = 0x31;
                    first = false;
                }
                h.deliver(&c);
                h.advance(3000);
                h.take();
            }
        }
    }
}
