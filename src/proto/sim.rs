//! A simulated month of the whole [`Node`] in virtual time (the hardening issue).
//!
//! The node runs for 30 days of [`Instant`]s under a simulated reactor that plays the io side as
//! `io::daemon` and `io::effects` do: it answers `LoadFiles`, `ReadSsid`, `WriteWifi`, `Resolve` and `Connect`,
//! carries cloud packets to a simulated cloud built on the crate's own codec with the device key,
//! delivers LAN datagrams from a simulated phone, and plays the local clients: two applications, short
//! command-line clients, a power manager that asks `local.prep_suspend`, the BLE/QR provisioning
//! processes and a helper that follows the shipped script (L§9: `helper_ready`, then one hello
//! connection per message, answers over short `miio_send_line` connections).
//!
//! The driver is the reactor's loop without the system calls: it advances exactly to
//! `min(node.poll_timeout(), next event)`, delivers the events due (inputs before timers, as the
//! reactor does), calls `handle_timeout` when a deadline is due, executes the actions, and checks.
//! A seeded schedule injects outages (a silent cloud, Wi-Fi down, UDP blocked, a TCP reset),
//! suspends (a jump of boot time with nothing delivered, ARCHITECTURE.md §4.5), jumps of the
//! cloud's clock (the daemon sees them at the next time sync, P§5.5), helper restarts, provisioning
//! over the LAN, BLE and QR (L§8), changes of `otc_test.interval` (P§5.10), cloud and LAN commands,
//! reports, local clients coming and going, and `local.prep_suspend` requests (L§12).
//!
//! What is checked, continuously:
//! 1. Timers: after each turn nothing is overdue (`poll_timeout() > now`), a deadline exists
//!    whenever the state needs one, and the node's earliest deadline is never later than any deadline
//!    an independent model expects (keepalive, refresh, refresh hello, user-ack of cloud and LAN
//!    commands, classification of new connections, the next offline notice, the Wi-Fi result, acks).
//!    When the model knows the node is idle, the node's earliest deadline is exactly the model's.
//! 2. Every collection of every machine is sampled after every turn and stays under a fixed bound;
//!    the action queues are empty after a turn. The maximum of each, and per day, is reported.
//! 3. `wakeup_time` (L§12): never 0 when the model knows nothing is in flight, and then exactly
//!    the whole seconds to the model's next deadline; 0 when something certainly is in flight;
//!    otherwise consistent with the node's own earliest deadline.
//! 4. Keepalives go out exactly on the model's schedule (one interval after the session came up,
//!    then every interval, once at resume after a suspend), so their count over the month is the
//!    model's; refresh hellos likewise (P§5.10); cloud ids are unique for the whole month (P§5.7 D5)
//!    and LAN local ids too (P§4.7); within a session a keepalive stamp is above every stamp sent
//!    before it and a data stamp never goes down (P§5.5 D4).
//!
//! Beside these: every request of a local client gets exactly one reply (P§5.7), every cloud and LAN
//! command exactly one answer chosen by first-reply-wins, the held -10000 or -9999 (P§5.8 D16),
//! offline notices come on the 15-minute grid with the right kind (L§13), and `_otc.info` carries
//! the uid of the last successful provisioning only (P§5.4, L§8).
//!
//! `MIIO_SIM_SEED` and `MIIO_SIM_DAYS` replay another schedule; the report is printed with
//! `cargo test --lib month -- --nocapture`.

use std::cmp::{Ordering, Reverse};
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};

use serde_json::{json, Map, Value};

use super::cloud::{CloudConfig, Transport};
use super::helper::{self, Step};
use super::ioerr::OsError;
use super::local::{ConnId, LocalAction, Port};
use super::node::{Action, Netif, Node, NodeConfig, TokenFiles};
use super::outbox::WifiText;
use super::state::State;
use crate::config::Secret16;
use crate::time::{Duration, Instant};
use crate::wire::crypto::Keys;
use crate::wire::dns::ServiceInfo;
use crate::wire::miio::{self, Packet};
use crate::wire::rpc;

const SEC: u64 = 1000;
const MIN: u64 = 60 * SEC;
const HOUR: u64 = 60 * MIN;
const DAY: u64 = 24 * HOUR;

const DID: u32 = 123_456_789;
const KEY: [u8; 16] = *b"YWJjZGVmZ2hpamts";
const TOKEN: [u8; 16] = *b"ABCDEFGHIJKLMNOP";
const CONF: &str =
    "did=123456789\nkey=YWJjZGVmZ2hpamts\nmac=AA:BB:CC:01:02:03\nvendor=acme\nmodel=acme.dev.v1\n";
const DINFO: &str = r#"{"method":"_internal.response_dinfo","params":{"did":123456789,"key":"YWJjZGVmZ2hpamts","vendor":"acme","mac":"AA:BB:CC:01:02:03","model":"acme.dev.v1"}}"#;

/// The node's timers as configured (the defaults of P§5.6–§5.9, L§9.5, L§12).
const KEEPALIVE: u64 = 20 * SEC;
const ACK_TIMEOUT: u64 = 3 * SEC;
const USER_ACK: u64 = 5 * SEC;
const BACKOFF_MAX: u64 = 300 * SEC;
const HELPER_TIMEOUT: u64 = 10 * SEC;
const WIFI_LIMIT: u64 = 120 * SEC;
const OFFLINE_STEP: u64 = 15 * MIN;
const MAX_SLEEP: u64 = 3600;
/// The reply caches keep a repeated command's answer this long (P§5.8, P§4.5).
const REPLY_TTL: u64 = 60 * SEC;
/// The LAN replay guard forgets an accepted packet after this (P§4.5 D7).
const GUARD_TTL: u64 = 600 * SEC;

const UDP_IP: Ipv4Addr = Ipv4Addr::new(1, 2, 3, 4);
const TCP_IP: Ipv4Addr = Ipv4Addr::new(5, 6, 7, 8);
const LOCAL_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 50);
/// The cloud's clock at boot time 0.
const SERVER_BASE: i64 = 1_700_000_000;
/// Cloud command ids stay far below the LAN's local ids (0x40000000..), so no P§4.7 collision.
const FIRST_CLOUD_CMD: u32 = 100_000;
const LOCAL_ID_MIN: u32 = 0x4000_0000;

/// The bound of every sampled collection for this load. The action queues must be empty after a
/// turn; the others are set well above what the load needs and far below what a leak reaches in
/// a month. A name missing here fails the run, so a new collection gets a bound.
const BOUNDS: &[(&str, usize)] = &[
    ("node.actions", 0),
    ("node.helper_info", 8),
    ("cloud.machines", 1),
    ("cloud.wheel", 32),
    ("cloud.actions", 0),
    ("cloud.list", 3),
    ("cloud.otc_list", 2),
    ("cloud.ups", 16),
    ("cloud.downs", 8),
    ("cloud.downs_held", 8),
    ("cloud.reply_cache", 8),
    ("cloud.rx_buf", 0),
    ("lan.pending", 8),
    ("lan.pending_held", 8),
    ("lan.guard", 16),
    ("lan.reply_cache", 8),
    ("lan.actions", 0),
    ("local.conns", 12),
    ("local.held", 8),
    ("helper.fifo", 9),
    ("helper.events", 0),
];

fn clock(t: Instant) -> String {
    let ms = t.millis();
    format!(
        "d{:02} {:02}:{:02}:{:02}.{:03}",
        ms / DAY,
        ms % DAY / HOUR,
        ms % HOUR / MIN,
        ms % MIN / SEC,
        ms % SEC
    )
}

fn obj(text: &str) -> Value {
    match rpc::parse_object(text.as_bytes()) {
        Ok(m) => Value::Object(m),
        Err(e) => panic!("not an object ({e:?}): {text}"),
    }
}

/// splitmix64, as the machines use: seeded, so a run replays exactly.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in lo..=hi.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    /// Exponential with this mean (a Poisson process's gaps), at least 1 ms.
    fn exp(&mut self, mean: u64) -> u64 {
        let u = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        ((-(1.0 - u).ln()) * mean as f64).max(1.0) as u64
    }
    /// Log-uniform in lo..=hi: as many short ones as long ones.
    fn log_range(&mut self, lo: u64, hi: u64) -> u64 {
        let u = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        ((lo as f64).ln() + u * ((hi as f64).ln() - (lo as f64).ln())).exp() as u64
    }
}

// ---- the schedule ----------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outage {
    /// The cloud is a black hole: DNS answers, nothing else does.
    Silent,
    /// The Wi-Fi is gone: DNS and connects fail at once, a TCP link is reset.
    WifiDown,
    /// UDP is black-holed; TCP works.
    UdpBlocked,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Via {
    Lan,
    Ble,
    Qr,
}

#[derive(Clone, Debug)]
enum Inj {
    Outage(Outage, u64),
    TcpReset,
    Suspend { ms: u64, polite: bool },
    ClockJump(i64),
    HelperRestart(u64),
    Provision(Via),
    Interval(u64),
    CloudCommand,
    PhoneCommand,
    Cli,
    PrepSuspend,
    Churn(usize),
}

impl Inj {
    fn name(&self) -> &'static str {
        match self {
            Inj::Outage(Outage::Silent, _) => "outage: cloud silent",
            Inj::Outage(Outage::WifiDown, _) => "outage: wifi down",
            Inj::Outage(Outage::UdpBlocked, _) => "outage: udp blocked",
            Inj::TcpReset => "tcp reset",
            Inj::Suspend { polite: true, .. } => "suspend after prep_suspend",
            Inj::Suspend { .. } => "suspend unannounced",
            Inj::ClockJump(_) => "cloud clock jump",
            Inj::HelperRestart(_) => "helper restart",
            Inj::Provision(Via::Lan) => "provision: LAN miIO.config_router",
            Inj::Provision(Via::Ble) => "provision: BLE local.ble.config_router",
            Inj::Provision(Via::Qr) => "provision: QR local.ble.config_router",
            Inj::Interval(_) => "otc_test.interval change",
            Inj::CloudCommand => "cloud command",
            Inj::PhoneCommand => "LAN command",
            Inj::Cli => "short-lived client",
            Inj::PrepSuspend => "local.prep_suspend",
            Inj::Churn(_) => "application reconnect",
        }
    }
}

/// Who holds a local connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Actor {
    App(usize),
    Cli,
    Pm,
    Ble,
    Qr,
    HelperHello,
    HelperLine,
}

/// What a packet from the cloud is, for the models (the bytes are what the node gets).
#[derive(Clone, Debug)]
enum Rx {
    TimeSync,
    Pong,
    /// The ack of an upstream request; `interval` for an `_otc.info` ack.
    Ack {
        id: u32,
        interval: Option<u64>,
    },
    /// The cloud's ack of one of our replies (swallowed, P§5.8).
    ReplyAck,
    Command {
        id: u32,
        self_method: bool,
    },
}

enum Ev {
    /// The clock of the world: keeps the driver moving when the node has no deadline (AP mode).
    /// Sizes are sampled after every turn, which includes every hour.
    Hour,
    Inject(Inj),
    OutageEnd,
    Sleep(u64),
    CloudRx {
        gen: u32,
        what: Rx,
        bytes: Vec<u8>,
    },
    LinkDown {
        gen: u32,
    },
    Resolved {
        attempt: u32,
        result: Result<Vec<Ipv4Addr>, String>,
    },
    TcpConnected {
        gen: u32,
        ok: bool,
    },
    Tx {
        cid: u64,
        text: String,
    },
    Close {
        cid: u64,
    },
    HelperStart {
        epoch: u32,
    },
    HelperHello {
        epoch: u32,
    },
    HelperLine {
        epoch: u32,
        text: String,
    },
    PhoneTx {
        bytes: Vec<u8>,
        id: Option<u32>,
    },
    AppTick(usize),
    AppConnect(usize),
    /// The next run of a tool that did not wait (it takes the slot just freed).
    CliAgain,
}

struct Sched {
    at: Instant,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Sched {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Sched {}
impl PartialOrd for Sched {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Sched {
    fn cmp(&self, o: &Self) -> Ordering {
        (self.at, self.seq).cmp(&(o.at, o.seq))
    }
}

// ---- the peers -------------------------------------------------------------------------------

struct ConnRec {
    cid: u64,
    actor: Actor,
    port: Port,
    /// A value was delivered (the connection is classified, L§2).
    spoke: bool,
    /// Its first value was `_internal.*`: a helper connection, no command audience.
    internal: bool,
}

/// The cloud socket the reactor holds and the cloud's view of that connection.
struct Link {
    gen: u32,
    transport: Transport,
    /// UDP at once; TCP once the connect finished.
    up: bool,
    /// The session's `_otc.info` ack reached the node (P§5.3 step 6).
    session_up: bool,
    /// The id of the session's `_otc.info`.
    session_info: Option<u32>,
    opened: Instant,
    came_up: Option<Instant>,
    max_stamp: Option<u32>,
    /// Keepalive times sent on this link.
    kas: Vec<Instant>,
    /// Packets from the cloud keep their order.
    last_rx: Instant,
}

/// A request of the node that awaits the cloud's ack (P§5.7): the model of `is_busy`.
struct Out {
    last_send: Instant,
    sends: u8,
    info: bool,
    tcp: bool,
}

struct HelperSim {
    epoch: u32,
    up: bool,
    hello: Option<u64>,
    /// The hello was delivered and nothing was written on it yet.
    waiting: bool,
    /// Requests it read and whose answer has not reached the node yet.
    seen: Vec<&'static str>,
    died: Instant,
    wifi: bool,
}

#[derive(Default)]
struct Pend {
    delivered: bool,
    sent: Instant,
}

struct App {
    cid: Option<u64>,
    next_id: u64,
    pending: BTreeMap<u64, Pend>,
    /// Commands seen (cloud ids and LAN local ids): a second broadcast of one is a failure.
    seen: HashSet<u32>,
}

struct Cli {
    id: u64,
    kind: &'static str,
    delivered: bool,
    sent: Instant,
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
enum Src {
    Cloud,
    Lan,
}

/// One command, cloud or LAN, and what the local applications and the node did with it.
struct Cmd {
    delivered: Option<Instant>,
    audience0: bool,
    main: Option<Instant>,
    other: Option<Instant>,
    replies: Vec<(Instant, Value)>,
    /// The link went down before an answer was due: none is expected.
    exempt: bool,
    repeat: Option<Instant>,
    /// LAN: the phone sent the same packet again at this time.
    self_method: bool,
}

struct Phone {
    addr: SocketAddr,
    token: Option<[u8; 16]>,
    stamp: Option<(u32, Instant)>,
    next_id: u32,
    queued: Vec<String>,
    /// Phone id → the text it sent.
    sent: HashMap<u32, String>,
}

struct Prov {
    start: Instant,
    uid: Option<u64>,
    ok_seen: bool,
}

#[derive(Default)]
struct Files {
    wifi: Option<crate::config::wifi::WifiConf>,
    backup: Option<Option<crate::config::wifi::WifiConf>>,
    country: Option<String>,
    /// `device.token`'s text.
    token: Option<String>,
}

/// The independent model of the node's deadlines and busy state.
#[derive(Default)]
struct Model {
    ka_next: Option<Instant>,
    refresh_next: Option<Instant>,
    refresh_hello: Option<Instant>,
    /// The node asked for INFO for a refresh and has not sent the `_otc.info` yet.
    info_wait: bool,
    interval: u64,
    offline: Option<Instant>,
    outstanding: HashMap<u32, Out>,
    classify: BTreeMap<u64, Instant>,
    prov: Option<Prov>,
    /// uid expected in `_otc.info` (P§5.4): the last successful provisioning's.
    bind: Option<u64>,
    /// uid of the provisioning in progress, if it brought one.
    bind_pending: Option<Option<u64>>,
}

#[derive(Default)]
struct Stats {
    turns: u64,
    hours: u64,
    timer_turns: u64,
    injected: BTreeMap<&'static str, u64>,
    keepalives: u64,
    keepalives_at_resume: u64,
    refresh_hellos: u64,
    refresh_skipped: u64,
    session_hellos: u64,
    sessions: u64,
    sessions_tcp: u64,
    up_ms: u64,
    naive_keepalives: u64,
    expected_keepalives: u64,
    info_sent: u64,
    idle_reports: u64,
    upstream_acked: u64,
    upstream_refused: u64,
    notifications: u64,
    cloud_cmds: u64,
    cloud_cmd_repeats: u64,
    cloud_replies: BTreeMap<&'static str, u64>,
    lan_replies: BTreeMap<&'static str, u64>,
    lan_cmds: u64,
    lost_asleep: u64,
    cli_done: u64,
    prep: BTreeMap<&'static str, u64>,
    wakeups: BTreeMap<u64, u64>,
    offline_notices: u64,
    offline_exact: u64,
    provisions_ok: u64,
    provisions_failed: u64,
    provisions_skipped: u64,
    helper_answers: u64,
    overdue_at_resume: u64,
    slept_ms: u64,
    dropped_asleep: u64,
    stamps_checked: u64,
    cloud_ids: u64,
    conns_opened: u64,
}

struct Sim {
    node: Node,
    now: Instant,
    end: Instant,
    rng: Rng,
    seq: u64,
    events: BinaryHeap<Reverse<Sched>>,
    /// The month's injections, in time order (kept out of the heap: it stays small and fast).
    planned: std::collections::VecDeque<(Instant, Inj)>,
    keys: Keys,
    token_keys: Keys,
    files: Files,
    conns: BTreeMap<ConnId, ConnRec>,
    slot_of: HashMap<u64, ConnId>,
    next_cid: u64,
    link: Option<Link>,
    /// The mDNS responder's service as the node set it (from the first connection in STA mode
    /// until the node leaves the STA states, P§4.8), and when the announcements it asked for are
    /// due.
    mdns_service: Option<ServiceInfo>,
    mdns_due: std::collections::VecDeque<Instant>,
    gen: u32,
    // the cloud
    outage: Option<(Outage, Instant)>,
    skew: i64,
    interval: u64,
    ids: HashMap<u32, (u32, String)>,
    next_cmd: u32,
    // the peers
    helper: HelperSim,
    apps: Vec<App>,
    clis: HashMap<u64, Cli>,
    phone: Phone,
    cmds: HashMap<(Src, u32), Cmd>,
    /// Commands delivered to the node and not answered yet (not exempt), with their delivery.
    open_cmds: BTreeMap<(Src, u32), Instant>,
    local_to_phone: HashMap<u32, u32>,
    // models, figures
    m: Model,
    prev_state: State,
    /// In AP mode the user tries the phone again a few minutes later (L§8: "so the phone can try
    /// again").
    ap_retry: bool,
    last_notice: Option<Instant>,
    suspends: Vec<(Instant, Instant)>,
    resumed_at: Option<Instant>,
    stats: Stats,
    next_deadline: Option<Instant>,
    sizes: Vec<(&'static str, usize)>,
    /// Per position of `sizes`: the name's address and its index in [`BOUNDS`].
    size_idx: Vec<(usize, usize)>,
    max: Vec<(usize, Instant)>,
    daily: Vec<[usize; BOUNDS.len()]>,
}

impl Sim {
    fn new(seed: u64, days: u64) -> Sim {
        let t0 = Instant(8 * SEC);
        let mut c = CloudConfig::new(0, [0; 16], "", "", "", "");
        c.seed = seed;
        let cfg = NodeConfig {
            max_clients: 20,
            max_sleep: Duration::from_secs(MAX_SLEEP),
            cloud: c,
            country_override: None,
            hosts_explicit: (false, false),
            helper: helper::Config {
                datadir: "/data/miio".into(),
                grace: Duration::from_secs(2),
                timeout: Duration::from_millis(HELPER_TIMEOUT),
            },
            mdns: Some(54321),
        };
        let mut s = Sim {
            node: Node::new(t0, cfg, Secret16::new(TOKEN)),
            now: t0,
            end: t0 + Duration(days * DAY),
            rng: Rng(seed ^ 0x5151_5151),
            seq: 0,
            events: BinaryHeap::new(),
            planned: std::collections::VecDeque::new(),
            keys: Keys::new(&KEY),
            token_keys: Keys::new(&TOKEN),
            files: Files::default(),
            conns: BTreeMap::new(),
            slot_of: HashMap::new(),
            next_cid: 1,
            link: None,
            mdns_service: None,
            mdns_due: Default::default(),
            gen: 0,
            outage: None,
            skew: 0,
            interval: 1800,
            ids: HashMap::new(),
            next_cmd: FIRST_CLOUD_CMD,
            helper: HelperSim {
                epoch: 0,
                up: false,
                hello: None,
                waiting: false,
                seen: Vec::new(),
                died: t0,
                wifi: false,
            },
            apps: (0..2)
                .map(|i| App {
                    cid: None,
                    next_id: 1 + 1000 * i as u64,
                    pending: BTreeMap::new(),
                    seen: HashSet::new(),
                })
                .collect(),
            clis: HashMap::new(),
            phone: Phone {
                addr: "192.168.1.77:50123".parse().expect("addr"),
                token: None,
                stamp: None,
                next_id: 1,
                queued: Vec::new(),
                sent: HashMap::new(),
            },
            cmds: HashMap::new(),
            open_cmds: BTreeMap::new(),
            local_to_phone: HashMap::new(),
            m: Model {
                interval: 1800 * SEC,
                ..Model::default()
            },
            prev_state: State::DeviceInit,
            ap_retry: false,
            last_notice: None,
            suspends: Vec::new(),
            resumed_at: None,
            stats: Stats::default(),
            next_deadline: None,
            sizes: Vec::new(),
            size_idx: Vec::new(),
            max: vec![(0, t0); BOUNDS.len()],
            daily: Vec::new(),
        };
        s.plan();
        s
    }

    fn at(&mut self, at: Instant, ev: Ev) {
        assert!(at >= self.now, "event scheduled in the past");
        self.seq += 1;
        self.events.push(Reverse(Sched {
            at,
            seq: self.seq,
            ev,
        }));
    }

    fn after(&mut self, ms: u64, ev: Ev) {
        let at = self.now + Duration(ms);
        self.at(at, ev);
    }

    #[track_caller]
    fn fail(&self, what: impl AsRef<str>) -> ! {
        panic!(
            "{} [{:?}, seed replay: MIIO_SIM_SEED]: {}",
            clock(self.now),
            self.node.state(),
            what.as_ref()
        )
    }

    /// The seeded schedule of the month: Poisson processes of each kind of injection.
    fn plan(&mut self) {
        let t0 = self.now;
        let span = self.end.millis() - t0.millis();
        let mut plan: Vec<(u64, Inj)> = Vec::new();
        let mut every = |rng: &mut Rng, mean: u64, f: &mut dyn FnMut(&mut Rng) -> Inj| {
            let mut t = rng.exp(mean);
            while t < span {
                plan.push((t, f(rng)));
                t += rng.exp(mean);
            }
        };
        let r = &mut self.rng;
        every(r, 8 * HOUR, &mut |r| {
            let kind = match r.range(0, 99) {
                0..=34 => Outage::Silent,
                35..=64 => Outage::WifiDown,
                _ => Outage::UdpBlocked,
            };
            Inj::Outage(kind, r.log_range(20 * SEC, 3 * HOUR))
        });
        every(r, 2 * DAY, &mut |_| Inj::TcpReset);
        every(r, 3 * HOUR, &mut |r| Inj::Suspend {
            ms: r.log_range(MIN, 4 * HOUR),
            polite: r.chance(50),
        });
        every(r, DAY, &mut |r| {
            let secs = r.log_range(1, 3 * 3600) as i64;
            Inj::ClockJump(if r.chance(50) { -secs } else { secs })
        });
        every(r, DAY, &mut |r| {
            Inj::HelperRestart(r.log_range(SEC, 2 * MIN))
        });
        every(r, 4 * DAY, &mut |r| {
            Inj::Provision(match r.range(0, 2) {
                0 => Via::Lan,
                1 => Via::Ble,
                _ => Via::Qr,
            })
        });
        every(r, 6 * HOUR, &mut |r| {
            Inj::Interval([60, 60, 120, 300, 600, 1800, 1800, 3600][r.range(0, 7) as usize])
        });
        every(r, 30 * MIN, &mut |_| Inj::CloudCommand);
        every(r, 2 * HOUR, &mut |_| Inj::PhoneCommand);
        every(r, 45 * MIN, &mut |_| Inj::Cli);
        every(r, 15 * MIN, &mut |_| Inj::PrepSuspend);
        every(r, 12 * HOUR, &mut |r| Inj::Churn(usize::from(r.chance(75))));
        // The first provisioning: the phone over the LAN, 10 minutes after a boot in AP mode.
        plan.push((10 * MIN, Inj::Provision(Via::Lan)));
        if std::env::var("MIIO_SIM_QUIET").is_ok() {
            plan.retain(|(t, _)| *t == 10 * MIN);
        }
        plan.sort_by_key(|(t, _)| *t);
        self.planned = plan
            .into_iter()
            .map(|(t, i)| (t0 + Duration(t), i))
            .collect();
        self.at(t0 + Duration(HOUR), Ev::Hour);
        // The helper starts late (the file mode first, L§9.5); the applications soon after boot.
        self.at(t0 + Duration(5 * SEC), Ev::HelperStart { epoch: 0 });
        self.at(t0 + Duration(SEC), Ev::AppConnect(0));
        self.at(t0 + Duration(3 * SEC), Ev::AppConnect(1));
        self.at(t0 + Duration(2 * MIN), Ev::AppTick(0));
    }

    // ---- the driver ----------------------------------------------------------------------------

    fn run(&mut self) {
        self.node.start(self.now);
        self.run_actions();
        self.after_turn();
        loop {
            // The node's earliest deadline as `after_turn` read it: nothing ran since.
            let tn = self.next_deadline;
            let te = self.events.peek().map(|Reverse(s)| s.at);
            let tp = self.planned.front().map(|(t, _)| *t);
            let next = [tn, te, tp].into_iter().flatten().min().expect("an event");
            if next > self.end {
                break;
            }
            if next < self.now {
                self.fail(format!("went back to {}", clock(next)));
            }
            self.now = next;
            self.stats.turns += 1;
            self.resumed_at = None;
            while let Some(ev) = self.due_event() {
                self.event(ev);
            }
            if self.node.poll_timeout().is_some_and(|t| t <= self.now) {
                self.stats.timer_turns += 1;
                self.node.handle_timeout(self.now);
                self.run_actions();
            }
            self.after_turn();
        }
        // A suspend that began before the end may have resumed after it.
        self.end = self.end.max(self.now);
        self.now = self.end;
        self.finish();
    }

    fn event(&mut self, ev: Ev) {
        match ev {
            Ev::Hour => {
                self.stats.hours += 1;
                self.after(HOUR, Ev::Hour);
            }
            Ev::Inject(i) => {
                *self.stats.injected.entry(i.name()).or_default() += 1;
                self.inject(i);
            }
            Ev::OutageEnd => {
                if self.outage.is_some_and(|(_, until)| until <= self.now) {
                    self.outage = None;
                }
            }
            Ev::Sleep(ms) => self.sleep(ms),
            Ev::CloudRx { gen, what, bytes } => self.cloud_deliver(gen, what, &bytes),
            Ev::LinkDown { gen } => {
                if self.link.as_ref().is_some_and(|l| l.gen == gen && l.up) {
                    self.node.cloud_link_down(self.now);
                    self.run_actions();
                }
            }
            Ev::Resolved { attempt, result } => {
                self.node.cloud_resolved(self.now, attempt, result);
                self.run_actions();
            }
            Ev::TcpConnected { gen, ok } => {
                if self.link.as_ref().is_some_and(|l| l.gen == gen && !l.up) {
                    if ok {
                        self.link_up();
                    } else {
                        self.node
                            .cloud_connect_failed(self.now, OsError::Errno(101));
                        // ENETUNREACH
                    }
                    self.run_actions();
                }
            }
            Ev::Tx { cid, text } => self.tx(cid, &text),
            Ev::Close { cid } => self.client_close(cid),
            Ev::HelperStart { epoch } => self.helper_start(epoch),
            Ev::HelperHello { epoch } => self.helper_hello(epoch),
            Ev::HelperLine { epoch, text } => self.helper_line(epoch, &text),
            Ev::PhoneTx { bytes, id } => {
                let audience0 = self.audience() == 0;
                let now = self.now;
                if let Some(c) = id.and_then(|id| self.cmds.get_mut(&(Src::Lan, id))) {
                    // D7: a copy within the guard's 600 s is never run again (phone datagrams do
                    // not outlive a suspend, see `sleep`).
                    if c.delivered.is_some_and(|d| now >= d + Duration(GUARD_TTL)) {
                        self.fail("a phone copy after the guard's lifetime");
                    }
                    if c.delivered.is_none() {
                        c.delivered = Some(self.now);
                        self.open_cmds.insert((Src::Lan, id.unwrap_or(0)), self.now);
                        c.audience0 = audience0 && !c.self_method;
                    } else {
                        c.repeat = Some(self.now);
                    }
                }
                self.node.lan_datagram(self.now, self.phone.addr, &bytes);
                self.run_actions();
            }
            Ev::AppTick(i) => self.app_tick(i),
            Ev::CliAgain => self.cli(false),
            Ev::AppConnect(i) => {
                if self.apps[i].cid.is_none() {
                    let cid = self.open(Actor::App(i), Port::Local);
                    self.apps[i].cid = cid;
                }
            }
        }
    }

    /// The earliest event due now, from the heap or the plan.
    fn due_event(&mut self) -> Option<Ev> {
        let te = self
            .events
            .peek()
            .map(|Reverse(s)| s.at)
            .filter(|t| *t <= self.now);
        let tp = self
            .planned
            .front()
            .map(|(t, _)| *t)
            .filter(|t| *t <= self.now);
        match (te, tp) {
            (Some(e), p) if p.is_none_or(|p| e <= p) => self.events.pop().map(|Reverse(s)| s.ev),
            (_, Some(_)) => self.planned.pop_front().map(|(_, i)| Ev::Inject(i)),
            _ => None,
        }
    }

    /// The board sleeps: boot time jumps, nothing runs, what was due or in flight comes at resume.
    fn sleep(&mut self, ms: u64) {
        let from = self.now;
        let to = from + Duration(ms);
        let mut moved = Vec::new();
        while self.planned.front().is_some_and(|(t, _)| *t < to) {
            if let Some((t, i)) = self.planned.pop_front() {
                self.seq += 1;
                self.events.push(Reverse(Sched {
                    at: t,
                    seq: self.seq,
                    ev: Ev::Inject(i),
                }));
            }
        }
        while let Some(Reverse(s)) = self.events.peek() {
            if s.at >= to {
                break;
            }
            if let Some(Reverse(s)) = self.events.pop() {
                match s.ev {
                    // Nothing on the board runs while it sleeps: local activity planned for the
                    // window does not happen; the world (outages, clocks) goes on.
                    Ev::Inject(
                        Inj::Cli
                        | Inj::PrepSuspend
                        | Inj::PhoneCommand
                        | Inj::CloudCommand
                        | Inj::Churn(_)
                        | Inj::Provision(_)
                        | Inj::Suspend { .. }
                        | Inj::HelperRestart(_),
                    ) => self.stats.dropped_asleep += 1,
                    // A phone's command to a sleeping board is lost (it does not wait hours
                    // in a buffer; its copy would outlive the replay guard, P§4.5).
                    Ev::PhoneTx { id: Some(_), .. } => self.stats.lost_asleep += 1,
                    ev => moved.push(ev),
                }
            }
        }
        let overdue = self.node.poll_timeout().is_some_and(|t| t < to);
        self.stats.overdue_at_resume += u64::from(overdue);
        self.stats.slept_ms += ms;
        self.suspends.push((from, to));
        self.now = to;
        self.resumed_at = Some(to);
        for ev in moved {
            self.at(to, ev);
        }
        // A deadline that passed while asleep fires once, at resume (L§12).
        for t in [&mut self.m.ka_next, &mut self.m.refresh_next] {
            if let Some(x) = t.as_mut().filter(|x| **x < to) {
                *x = to;
            }
        }
        if let Some(l) = self.link.as_mut() {
            l.last_rx = l.last_rx.max(to);
        }
        for a in &mut self.apps {
            for p in a.pending.values_mut() {
                p.sent += Duration(ms);
            }
        }
        for c in self.clis.values_mut() {
            c.sent += Duration(ms);
        }
    }

    /// When a deadline at `t` fires: at `t`, or at the resume that followed a suspend over it. A
    /// suspend that begins at a resume instant (inputs run before timers) carries it on.
    fn fires_at(&self, mut t: Instant) -> Instant {
        // Suspends come in time order and never overlap.
        loop {
            let i = self.suspends.partition_point(|(s, _)| *s <= t);
            match i.checked_sub(1).and_then(|i| self.suspends.get(i)) {
                Some(&(_, r)) if t < r => t = r,
                _ => return t,
            }
        }
    }

    // ---- the reactor ---------------------------------------------------------------------------

    fn run_actions(&mut self) {
        while let Some(a) = self.node.poll_action() {
            match a {
                Action::Local(LocalAction::Send(slot, text)) => {
                    self.deliver_local(slot, text.to_string())
                }
                Action::Local(LocalAction::Close(slot)) => self.server_close(slot),
                // Each announcement the service change asked for, none early and none more (a
                // late one is caught as an overdue deadline).
                // Only a change goes to the responder; a new service (LOCAL_IP stands for a LAN
                // address) is announced now and once more a second later (P§4.8).
                Action::MdnsService(info) => {
                    if info == self.mdns_service {
                        self.fail("an unchanged mDNS service");
                    }
                    if let Some(i) = &info {
                        let id = self.node.identity();
                        if i.ip != LOCAL_IP || i.port != 54321 || id.is_none_or(|d| d.did != i.did)
                        {
                            self.fail(format!("mDNS service {i:?}"));
                        }
                        // A change restarts the pair.
                        self.mdns_due = [self.now, self.now + Duration::from_secs(1)].into();
                    }
                    self.mdns_service = info;
                }
                #[cfg(feature = "mqtt")]
                Action::BrokerConnect | Action::BrokerSend(_) | Action::BrokerClose => {
                    self.fail("a broker action without --mqtt")
                }
                Action::MdnsAnnounce => match self.mdns_due.pop_front() {
                    Some(t) if t <= self.now => {}
                    Some(t) => self.fail(format!("mDNS announcement early, due at {:?}", clock(t))),
                    None => self.fail("mDNS announcement nobody asked for"),
                },
                Action::Resolve {
                    transport,
                    host,
                    attempt,
                    ..
                } => {
                    let wifi_down = matches!(self.outage, Some((Outage::WifiDown, _)));
                    let result = if wifi_down {
                        Err("Temporary failure in name resolution".to_string())
                    } else if host.contains(".ott.") || host.starts_with("ott.") {
                        Ok(vec![TCP_IP])
                    } else {
                        Ok(vec![UDP_IP])
                    };
                    if (transport == Transport::Tcp) != (result == Ok(vec![TCP_IP]))
                        && result.is_ok()
                    {
                        self.fail(format!("{transport} resolves {host}"));
                    }
                    let d = self.rng.range(5, 120);
                    self.after(d, Ev::Resolved { attempt, result });
                }
                Action::Connect { transport, .. } => {
                    if self.link.is_some() {
                        self.link_closed();
                    }
                    self.gen += 1;
                    self.link = Some(Link {
                        gen: self.gen,
                        transport,
                        up: false,
                        session_up: false,
                        session_info: None,
                        opened: self.now,
                        came_up: None,
                        max_stamp: None,
                        kas: Vec::new(),
                        last_rx: self.now,
                    });
                    match transport {
                        // A connected UDP socket is set up at once (the reactor calls back inline).
                        Transport::Udp => self.link_up(),
                        Transport::Tcp => match self.outage.map(|o| o.0) {
                            Some(Outage::WifiDown) => {
                                let gen = self.gen;
                                self.after(15, Ev::TcpConnected { gen, ok: false })
                            }
                            // A black hole: the node's 5 s connect deadline decides.
                            Some(Outage::Silent) => {}
                            _ => {
                                let gen = self.gen;
                                let d = self.rng.range(20, 200);
                                self.after(d, Ev::TcpConnected { gen, ok: true })
                            }
                        },
                    }
                }
                Action::CloudSend(b) => self.cloud_recv(&b),
                Action::CloudClose => self.link_closed(),
                Action::LanSend { to, bytes } => self.phone_recv(to, &bytes),
                Action::SetLogLevel(_) => {}
                // The flag file is written, as the reactor reports it (the reply waits for that).
                Action::TrustFlag(_) => self.node.trust_written(self.now, true),
                Action::ShutdownWrite(slot) => self.shutdown_write(slot),
                Action::LoadFiles(step) => self.load_files(step),
                Action::WriteWifi(text) => {
                    let w = crate::config::wifi::parse(&text)
                        .unwrap_or_else(|e| self.fail(format!("wifi.conf written bad: {e}")));
                    let old = self.files.wifi.replace(w);
                    let replaced = old
                        .as_ref()
                        .map(|o| WifiText(crate::config::wifi::render(o)));
                    self.files.backup = Some(old);
                    self.node.wifi_written(self.now, true, replaced);
                }
                // The node chose what goes back: what the last write replaced, as the model kept it.
                Action::RestoreWifi(text) => {
                    let Some(old) = self.files.backup.take() else {
                        self.fail("RestoreWifi without a write");
                    };
                    let back = text.map(|t| {
                        crate::config::wifi::parse(&t)
                            .unwrap_or_else(|e| self.fail(format!("wifi.conf restored bad: {e}")))
                    });
                    if back != old {
                        self.fail("RestoreWifi is not the file the write replaced");
                    }
                    self.files.wifi = back;
                }
                Action::ReadSsid => {
                    let ssid = self.files.wifi.as_ref().map(|w| w.ssid.clone());
                    self.node.file_ssid(ssid.unwrap_or_default());
                }
                Action::WriteCountry(cc) => self.files.country = Some(cc),
                // The simulated device has a real did: it never asks for one (L§16).
                Action::StoreDidkey { did, .. } => {
                    self.fail(format!("did {did} stored without a bootstrap did"))
                }
                // The token step (L§9.3): the fresh token is the only one ever stored.
                Action::TokenFile(t) => {
                    if t.as_ref().is_some_and(|t| *t != Secret16::new(TOKEN)) {
                        self.fail("a token other than the fresh one stored");
                    }
                    self.files.token = t.map(|t| crate::config::token::render(&t));
                    self.node.token_written(self.now, Ok(()));
                }
            }
        }
    }

    fn link_up(&mut self) {
        let Some(l) = self.link.as_mut() else { return };
        l.up = true;
        let netif = Netif {
            ip: LOCAL_IP.to_string(),
            mask: "255.255.255.0".into(),
            gw: "192.168.1.1".into(),
        };
        self.node.cloud_connected(self.now, netif, LOCAL_IP);
    }

    /// The cloud socket is closed: the session, and the model's view of it, end.
    fn link_closed(&mut self) {
        let Some(l) = self.link.take() else {
            self.fail("CloudClose without a socket");
        };
        if let Some(up) = l.came_up {
            self.session_ended(up, self.now, &l.kas);
        }
        let _ = l.opened;
        self.m.ka_next = None;
        self.m.refresh_next = None;
        self.m.refresh_hello = None;
        self.m.info_wait = false;
        self.m.outstanding.clear();
        // Commands of this session can no longer be answered (P§5.9).
        let open: Vec<_> = self
            .open_cmds
            .range((Src::Cloud, 0)..=(Src::Cloud, u32::MAX))
            .map(|(k, _)| *k)
            .collect();
        for k in open {
            self.open_cmds.remove(&k);
            if let Some(c) = self.cmds.get_mut(&k) {
                c.exempt = true;
            }
        }
    }

    fn load_files(&mut self, step: Step) {
        let now = self.now;
        match step {
            Step::Dinfo => {
                let d = crate::config::device::parse(CONF);
                let cc = self.files.country.clone();
                self.node.file_dinfo(now, d, cc);
            }
            Step::Token => {
                let files = TokenFiles {
                    wifi_conf: self.files.wifi.is_some(),
                    token: Ok(self.files.token.clone()),
                    fresh: Secret16::new(TOKEN),
                };
                self.node.file_token(now, files);
            }
            Step::WifiStatus => {
                let w = self.files.wifi.as_ref();
                let ssid = w.map(|w| w.ssid.clone()).unwrap_or_default();
                let uid = w.and_then(|w| w.uid);
                self.node.file_wifi(now, w.is_some(), ssid, uid);
            }
            other => self.fail(format!("LoadFiles({other:?})")),
        }
    }

    // ---- local connections ---------------------------------------------------------------------

    fn open(&mut self, actor: Actor, port: Port) -> Option<u64> {
        let slot = (0..).find(|s| !self.conns.contains_key(s)).unwrap_or(0);
        self.stats.conns_opened += 1;
        if !self.node.local_accept(self.now, slot, port) {
            self.fail(format!("{actor:?} refused on {port:?}"));
        }
        let cid = self.next_cid;
        self.next_cid += 1;
        self.conns.insert(
            slot,
            ConnRec {
                cid,
                actor,
                port,
                spoke: false,
                internal: false,
            },
        );
        self.slot_of.insert(cid, slot);
        if port == Port::Local {
            self.m.classify.insert(cid, self.now + Duration(SEC));
        }
        Some(cid)
    }

    /// How many connections a command reaches (ordinary and unclassified ones on 54322, L§4.2).
    fn audience(&self) -> usize {
        self.conns
            .values()
            .filter(|c| c.port == Port::Local && !c.internal)
            .count()
    }

    /// A client sends one value.
    fn tx(&mut self, cid: u64, text: &str) {
        let Some(&slot) = self.slot_of.get(&cid) else {
            return; // it closed meanwhile
        };
        let first = self.conns.get(&slot).is_some_and(|c| !c.spoke);
        if let Some(c) = self.conns.get_mut(&slot) {
            c.spoke = true;
            if first {
                c.internal = text.contains("\"_internal.");
            }
        }
        self.m.classify.remove(&cid);
        self.note_tx(cid, text);
        self.node.local_value(self.now, slot, text.as_bytes());
        self.run_actions();
    }

    /// The client side closes (EOF for the daemon).
    fn client_close(&mut self, cid: u64) {
        let Some(slot) = self.slot_of.remove(&cid) else {
            return;
        };
        self.conns.remove(&slot);
        self.m.classify.remove(&cid);
        self.clis.remove(&cid);
        self.node.local_closed(slot);
        self.run_actions();
    }

    /// The daemon closes a connection (after flushing, L§9.2 or a framing error).
    fn server_close(&mut self, slot: ConnId) {
        let Some(c) = self.conns.remove(&slot) else {
            return;
        };
        self.slot_of.remove(&c.cid);
        self.m.classify.remove(&c.cid);
        self.node.local_closed(slot);
        match c.actor {
            Actor::App(i) => {
                self.apps[i].cid = None;
                self.apps[i].pending.clear();
                self.after(1000, Ev::AppConnect(i));
            }
            Actor::HelperHello if self.helper.hello == Some(c.cid) => {
                self.helper.hello = None;
                self.helper.waiting = false;
                let epoch = self.helper.epoch;
                self.after(100, Ev::HelperHello { epoch });
            }
            _ => {}
        }
    }

    fn shutdown_write(&mut self, slot: ConnId) {
        let Some(c) = self.conns.get(&slot) else {
            return;
        };
        if c.actor != Actor::HelperHello {
            self.fail(format!("ShutdownWrite on a {:?} connection", c.actor));
        }
        // miio_recv_line has its value; it exits, which closes the connection.
        let cid = c.cid;
        self.after(1, Ev::Close { cid });
    }

    /// What a client receives.
    fn deliver_local(&mut self, slot: ConnId, text: String) {
        let Some(c) = self.conns.get(&slot) else {
            return; // the reactor drops output for a closed slot
        };
        let (cid, actor) = (c.cid, c.actor);
        let v = obj(&text);
        match actor {
            Actor::App(i) => self.app_got(i, cid, &v, &text),
            Actor::HelperHello => self.helper_got(cid, &v),
            Actor::HelperLine => self.fail(format!("a miio_send_line connection got {text}")),
            Actor::Cli | Actor::Pm | Actor::Qr | Actor::Ble => self.cli_got(actor, cid, &v, &text),
        }
    }

    /// Bookkeeping for the models when a client's value reaches the node.
    fn note_tx(&mut self, cid: u64, text: &str) {
        let v = obj(text);
        let id = v.get("id").and_then(rpc::id_u32);
        if let Some(c) = self.clis.get_mut(&cid) {
            c.delivered = true;
        }
        for a in self.apps.iter_mut().filter(|a| a.cid == Some(cid)) {
            if let Some(p) = v
                .get("id")
                .and_then(Value::as_u64)
                .and_then(|i| a.pending.get_mut(&i))
            {
                p.delivered = true;
            }
        }
        // A local application's reply to a command.
        if let (None, Some(id)) = (v.get("method"), id) {
            let key = match self.local_to_phone.get(&id) {
                Some(&p) if id >= LOCAL_ID_MIN => (Src::Lan, p),
                _ => (Src::Cloud, id),
            };
            let main = v.get("result").is_some();
            if let Some(c) = self.cmds.get_mut(&key) {
                let slot = if main { &mut c.main } else { &mut c.other };
                slot.get_or_insert(self.now);
            }
        }
    }

    // ---- the applications ----------------------------------------------------------------------

    fn app_tick(&mut self, i: usize) {
        let next = self.rng.exp(10 * MIN);
        self.after(next, Ev::AppTick(i));
        let Some(cid) = self.apps[i].cid else { return };
        let id = self.apps[i].next_id;
        self.apps[i].next_id += 1;
        let text = match self.rng.range(0, 9) {
            0 => format!(r#"{{"method":"props","params":{{"seq":{id}}}}}"#),
            1 | 2 => format!(r#"{{"id":{id},"method":"event.motion","params":[{id}]}}"#),
            _ => format!(
                r#"{{"id":{id},"method":"props","params":{{"temp":{}}}}}"#,
                id % 40
            ),
        };
        if text.contains("\"id\"") {
            self.apps[i].pending.insert(
                id,
                Pend {
                    delivered: false,
                    sent: self.now,
                },
            );
        } else {
            self.stats.notifications += 1;
        }
        let d = self.rng.range(1, 20);
        self.after(d, Ev::Tx { cid, text });
    }

    fn app_got(&mut self, i: usize, cid: u64, v: &Value, text: &str) {
        match v.get("method").and_then(Value::as_str) {
            Some("local.status") => {}
            Some(_) => {
                let Some(id) = v.get("id").and_then(rpc::id_u32) else {
                    return;
                };
                if !self.apps[i].seen.insert(id) {
                    self.fail(format!("app {i} got command id {id} twice: {text}"));
                }
                if id >= LOCAL_ID_MIN {
                    let phone = v["params"]["n"].as_u64().map(|n| n as u32);
                    let Some(p) = phone else {
                        self.fail(format!("a LAN command lost its params: {text}"))
                    };
                    if let Some(old) = self.local_to_phone.insert(id, p) {
                        if old != p {
                            self.fail(format!("LAN local id {id} reused for {old} and {p}"));
                        }
                    }
                }
                // The main application answers most commands, some late, some never; the other
                // one answers most with -10000 at once (D16), and ignores the rest.
                let (delay, reply) = if i == 0 {
                    match self.rng.range(0, 99) {
                        0..=69 => (self.rng.range(10, 2000), true),
                        70..=84 => (self.rng.range(4000, 7000), true),
                        _ => (0, false),
                    }
                } else {
                    (self.rng.range(5, 100), self.rng.chance(70))
                };
                if reply {
                    let text = if i == 0 {
                        format!(r#"{{"id":{id},"result":["ok",{id}]}}"#)
                    } else {
                        format!(
                            r#"{{"id":{id},"error":{{"code":-10000,"message":"unsupported"}}}}"#
                        )
                    };
                    self.after(delay, Ev::Tx { cid, text });
                }
            }
            None => {
                let Some(id) = v.get("id").and_then(Value::as_u64) else {
                    self.fail(format!("app {i} got {text}"));
                };
                if self.apps[i].pending.remove(&id).is_none() {
                    self.fail(format!("app {i} got a reply to nothing it asked: {text}"));
                }
                self.upstream_reply(text, v);
            }
        }
    }

    /// The reply to an upstream request: the cloud's ack with the id restored, or -30011.
    fn upstream_reply(&mut self, text: &str, v: &Value) {
        if v.get("result") == Some(&json!("ok")) {
            self.stats.upstream_acked += 1;
        } else if v["error"]["code"] == -30011 {
            self.stats.upstream_refused += 1;
        } else {
            self.fail(format!("unexpected reply to a request: {text}"));
        }
    }

    // ---- short-lived clients -------------------------------------------------------------------

    fn cli_got(&mut self, actor: Actor, cid: u64, v: &Value, text: &str) {
        if v.get("method").and_then(Value::as_str) == Some("local.status") && v.get("id").is_none()
        {
            return; // a broadcast
        }
        if v.get("method").is_some() && v.get("id").is_some() && !text.contains("local.") {
            return; // a command broadcast to every ordinary connection
        }
        let Some(c) = self.clis.remove(&cid) else {
            self.fail(format!("{actor:?} got a reply to nothing it asked: {text}"));
        };
        if v.get("id").and_then(Value::as_u64) != Some(c.id) {
            self.fail(format!("{actor:?} asked id {} and got {text}", c.id));
        }
        self.stats.cli_done += 1;
        match c.kind {
            "query_status" => {
                let want = self.node.state().status();
                if v["params"] != want {
                    self.fail(format!("local.query_status: {text}, state {want}"));
                }
            }
            // The device stamp (P§4.3), the same as LAN replies carry.
            "query_time" if v["params"] != self.node.stamp(self.now) => {
                self.fail(format!("local.time: {text}"));
            }
            "report" => self.upstream_reply(text, v),
            "prep_suspend" => self.check_wakeup(v, text),
            "provision" => self.provision_reply(v.get("result"), text),
            _ => {}
        }
        let d = self.rng.range(1, 10);
        self.after(d, Ev::Close { cid });
    }

    fn cli(&mut self, may_burst: bool) {
        let id = self.rng.range(1, 1 << 31);
        let (kind, text) = match self.rng.range(0, 3) {
            0 => (
                "query_status",
                format!(r#"{{"id":{id},"method":"local.query_status"}}"#),
            ),
            1 => (
                "query_time",
                format!(r#"{{"id":{id},"method":"local.query_time"}}"#),
            ),
            _ => (
                "report",
                format!(r#"{{"id":{id},"method":"event.cli","params":[{id}]}}"#),
            ),
        };
        // A tool run in a loop that does not wait for the ack: it sends and closes at once, and
        // the next run takes the same slot (the lowest free one).
        let burst = may_burst && kind == "report" && self.rng.chance(30);
        let Some(cid) = self.open(Actor::Cli, Port::Local) else {
            return;
        };
        // A tool that does not wait may still get an answer given at once (-30011): it reads
        // until it closes.
        self.clis.insert(
            cid,
            Cli {
                id,
                kind,
                delivered: false,
                sent: self.now,
            },
        );
        let d = self.rng.range(1, 5);
        self.after(d, Ev::Tx { cid, text });
        if burst {
            self.after(d + 1, Ev::Close { cid });
            let again = self.rng.range(1, 3);
            for k in 0..again {
                self.after(d + 2 + k, Ev::CliAgain);
            }
        }
    }

    fn prep_suspend(&mut self) {
        let Some(cid) = self.open(Actor::Pm, Port::Local) else {
            return;
        };
        let id = 9527;
        self.clis.insert(
            cid,
            Cli {
                id,
                kind: "prep_suspend",
                delivered: false,
                sent: self.now,
            },
        );
        let text = format!(r#"{{"id":{id},"method":"local.prep_suspend","params":[]}}"#);
        self.tx(cid, &text);
    }

    // ---- L§12: wakeup_time -----------------------------------------------------------------------

    /// What makes the node busy for certain (L§12), as the model sees it.
    fn busy_certain(&self) -> Option<&'static str> {
        if matches!(self.node.state(), State::CloudTrying) {
            return Some("cloud attempt");
        }
        let app = self
            .apps
            .iter()
            .any(|a| a.pending.values().any(|p| p.delivered));
        let cli = self
            .clis
            .values()
            .any(|c| c.delivered && c.kind == "report");
        if app || cli || !self.m.outstanding.is_empty() {
            return Some("upstream awaiting ack");
        }
        if self.m.prov.as_ref().is_some_and(|p| p.ok_seen) {
            return Some("provisioning");
        }
        if !self.helper.seen.is_empty() {
            return Some("helper request");
        }
        None
    }

    /// Nothing is in flight, for certain.
    fn idle_certain(&self) -> bool {
        let h = &self.helper;
        matches!(self.node.state(), State::CloudConnected | State::WifiApMode)
            && self.busy_certain().is_none()
            && !self.m.info_wait
            && h.up
            && h.waiting
            && !h.wifi
            && self.now >= h.died + Duration(HELPER_TIMEOUT)
    }

    /// The deadlines the model knows are armed.
    fn model_deadlines(&self) -> Vec<(&'static str, Instant)> {
        let mut d: Vec<(&'static str, Instant)> = Vec::new();
        let m = &self.m;
        d.extend(m.ka_next.map(|t| ("keepalive", t)));
        d.extend(m.refresh_next.map(|t| ("refresh", t)));
        d.extend(m.refresh_hello.map(|t| ("refresh hello", t)));
        for (&(src, _), &at) in &self.open_cmds {
            let what = match src {
                Src::Cloud => "cloud user ack",
                Src::Lan => "LAN user ack",
            };
            d.push((what, at + Duration(USER_ACK)));
        }
        d.extend(m.classify.values().map(|&t| ("classify", t)));
        if let Some(s) = m.offline {
            let k = (self.now.millis() - s.millis()) / OFFLINE_STEP;
            d.push(("offline notice", s + Duration(OFFLINE_STEP * (k + 1))));
        }
        if let Some(p) = m.prov.as_ref().filter(|p| p.ok_seen) {
            d.push(("wifi result", p.start + Duration(WIFI_LIMIT)));
        }
        for o in m.outstanding.values() {
            d.push(("ack", o.last_send + Duration(ACK_TIMEOUT)));
        }
        d.extend(self.mdns_due.front().map(|&t| ("mDNS announcement", t)));
        d
    }

    fn check_wakeup(&mut self, v: &Value, text: &str) {
        let Some(w) = v["params"]["wakeup_time"].as_u64() else {
            self.fail(format!("resp_suspend: {text}"));
        };
        *self.stats.wakeups.entry(w.min(60) / 10 * 10).or_default() += 1;
        let secs = |t: Instant| t.saturating_since(self.now).secs_ceil().clamp(1, MAX_SLEEP);
        if let Some(why) = self.busy_certain() {
            *self.stats.prep.entry("busy (model): 0").or_default() += 1;
            if w != 0 {
                self.fail(format!("wakeup_time {w} while busy: {why}"));
            }
        } else if self.idle_certain() {
            *self.stats.prep.entry("idle (model): exact").or_default() += 1;
            let want = self
                .model_deadlines()
                .into_iter()
                .map(|(_, t)| t)
                .min()
                .map_or(MAX_SLEEP, secs);
            if w != want {
                let due: Vec<_> = self
                    .model_deadlines()
                    .into_iter()
                    .map(|(what, t)| format!("{what} at {}", clock(t)))
                    .collect();
                self.fail(format!(
                    "wakeup_time {w} while idle, the next deadline is in {want} s: {due:?}"
                ));
            }
        } else {
            *self.stats.prep.entry("undecided: consistent").or_default() += 1;
            let own = self.node.poll_timeout().map_or(MAX_SLEEP, secs);
            if w != 0 && w != own {
                self.fail(format!(
                    "wakeup_time {w}, the node's next deadline is in {own} s"
                ));
            }
        }
    }

    // ---- the helper ----------------------------------------------------------------------------

    fn helper_start(&mut self, epoch: u32) {
        if epoch != self.helper.epoch || self.helper.up {
            return;
        }
        self.helper.up = true;
        self.helper_line(epoch, r#"{"method":"_internal.helper_ready"}"#);
        self.after(10, Ev::HelperHello { epoch });
    }

    /// `miio_recv_line`: a connection that says hello and waits for its one message.
    fn helper_hello(&mut self, epoch: u32) {
        if epoch != self.helper.epoch || !self.helper.up || self.helper.hello.is_some() {
            return;
        }
        let Some(cid) = self.open(Actor::HelperHello, Port::Local) else {
            return;
        };
        self.helper.hello = Some(cid);
        self.helper.waiting = true;
        self.tx(cid, r#"{"method":"_internal.hello"}"#);
    }

    /// `miio_send_line`: connect, write one value, close.
    fn helper_line(&mut self, epoch: u32, text: &str) {
        if epoch != self.helper.epoch || !self.helper.up {
            return;
        }
        let Some(cid) = self.open(Actor::HelperLine, Port::Local) else {
            return;
        };
        let method = obj(text)["method"].as_str().unwrap_or("").to_string();
        self.helper.seen.retain(|m| *m != method.as_str());
        if method == "_internal.wifi_connected" || method == "_internal.wifi_ap_mode" {
            self.helper.wifi = false;
            if self.m.prov.take().is_some() {
                if method == "_internal.wifi_connected" {
                    self.stats.provisions_ok += 1;
                    if let Some(b) = self.m.bind_pending.take() {
                        self.m.bind = b.or(self.m.bind);
                    }
                } else {
                    self.stats.provisions_failed += 1;
                    self.m.bind_pending = None;
                    self.m.bind = None;
                }
            }
        }
        if method == "_internal.info" {
            self.stats.helper_answers += 1;
        }
        self.tx(cid, text);
        self.client_close(cid);
    }

    /// The one message of a hello connection: the shipped helper's dispatch (L§9.6).
    fn helper_got(&mut self, cid: u64, v: &Value) {
        if self.helper.hello != Some(cid) || !self.helper.waiting {
            self.fail(format!("a second message on one hello connection: {v:?}"));
        }
        self.helper.waiting = false;
        self.helper.hello = None;
        let method = v["method"].as_str().unwrap_or("").to_string();
        let epoch = self.helper.epoch;
        let think = self.rng.range(10, 150);
        let answer = match method.as_str() {
            "_internal.request_dinfo" => Some(("_internal.response_dinfo", DINFO.to_string())),
            "_internal.request_dtoken" => Some((
                "_internal.response_dtoken",
                r#"{"method":"_internal.response_dtoken","params":"ABCDEFGHIJKLMNOP"}"#.into(),
            )),
            "_internal.req_wifi_conf_status" => Some((
                "_internal.res_wifi_conf_status",
                format!(
                    r#"{{"method":"_internal.res_wifi_conf_status","params":{}}}"#,
                    u8::from(self.files.wifi.is_some())
                ),
            )),
            "_internal.info" => {
                let ssid = self.files.wifi.as_ref().map_or("", |w| w.ssid.as_str());
                Some((
                    "_internal.info",
                    json!({"method":"_internal.info","partner_id":"","params":{
                        "hw_ver":"Linux","fw_ver":"1.2.3_0001",
                        "ap":{"ssid":ssid,"bssid":"10:20:30:40:50:60"},
                        "netif":{"localIp":"192.168.1.50","mask":"255.255.255.0","gw":"192.168.1.1"}}})
                    .to_string(),
                ))
            }
            "_internal.wifi_start" => {
                // wifi_start.sh up to 5 times, 3 s apart; mostly it works.
                self.helper.wifi = true;
                let ok = self.rng.chance(85);
                let text = if ok {
                    r#"{"method":"_internal.wifi_connected"}"#
                } else {
                    r#"{"method":"_internal.wifi_ap_mode","params":null}"#
                };
                let d = self.rng.range(3 * SEC, 20 * SEC);
                self.after(
                    d,
                    Ev::HelperLine {
                        epoch,
                        text: text.into(),
                    },
                );
                self.after(d + 20, Ev::HelperHello { epoch });
                return;
            }
            "_internal.config_tz" => None,
            "_internal.wifi_reconnect" | "_internal.wifi_reload" => {
                self.offline_notice(&method);
                None
            }
            other => self.fail(format!("the helper got {other}")),
        };
        if let Some((ans, text)) = answer {
            self.helper.seen.push(ans);
            self.after(think, Ev::HelperLine { epoch, text });
        }
        self.after(think + 5, Ev::HelperHello { epoch });
    }

    fn helper_restart(&mut self, gap: u64) {
        if !self.helper.up {
            return;
        }
        self.helper.up = false;
        self.helper.epoch += 1;
        self.helper.seen.clear();
        self.helper.waiting = false;
        self.helper.died = self.now;
        if self.helper.wifi {
            // Its wifi_start.sh dies with it: the node's 120 s limit decides (L§8).
            self.helper.wifi = false;
        }
        if let Some(cid) = self.helper.hello.take() {
            self.client_close(cid);
        }
        let epoch = self.helper.epoch;
        self.after(gap, Ev::HelperStart { epoch });
    }

    /// L§13: a notice on the 15-minute grid of the offline clock, reload every fourth.
    fn offline_notice(&mut self, method: &str) {
        let Some(start) = self.m.offline else {
            self.fail(format!("{method} while the offline clock is stopped"));
        };
        // After a suspend only the latest due notice goes out (L§12): never two at once.
        if self.last_notice == Some(self.now) {
            self.fail("two offline notices at one instant");
        }
        self.last_notice = Some(self.now);
        self.stats.offline_notices += 1;
        let since = self.now.millis() - start.millis();
        let k = since / OFFLINE_STEP;
        if k == 0 {
            self.fail(format!("{method} before 15 minutes offline"));
        }
        if since.is_multiple_of(OFFLINE_STEP) {
            self.stats.offline_exact += 1;
            let want = if k.is_multiple_of(4) {
                "_internal.wifi_reload"
            } else {
                "_internal.wifi_reconnect"
            };
            if method != want {
                self.fail(format!("{method} at {k}×15 min offline, want {want}"));
            }
        }
    }

    // ---- the cloud -------------------------------------------------------------------------------

    fn server_now(&self) -> u32 {
        (SERVER_BASE + self.now.secs() as i64 + self.skew) as u32
    }

    fn reachable(&self, t: Transport) -> bool {
        match self.outage.map(|o| o.0) {
            None => true,
            Some(Outage::UdpBlocked) => t == Transport::Tcp,
            Some(_) => false,
        }
    }

    /// The cloud sends `text` (or a control packet) to the node over the current link.
    fn cloud_send(&mut self, what: Rx, bytes: Vec<u8>) {
        let Some(l) = self.link.as_mut() else { return };
        let at = (self.now + Duration(self.rng.range(20, 200))).max(l.last_rx + Duration(1));
        l.last_rx = at;
        let gen = l.gen;
        self.at(at, Ev::CloudRx { gen, what, bytes });
    }

    fn cloud_seal(&self, text: &str) -> Vec<u8> {
        miio::seal(&self.keys, DID, self.server_now(), text.as_bytes())
    }

    /// A packet the node sent on the cloud socket: the checks, then the cloud's answer.
    fn cloud_recv(&mut self, b: &[u8]) {
        let Some(l) = self.link.as_ref() else {
            self.fail("CloudSend without a socket");
        };
        if !l.up {
            self.fail("CloudSend before the socket is connected");
        }
        let (transport, session_up) = (l.transport, l.session_up);
        let p = Packet::new_checked(b).unwrap_or_else(|e| self.fail(format!("bad packet: {e}")));
        let reach = self.reachable(transport);
        if p.is_control() && p.ids_all_ff() {
            if session_up {
                self.refresh_hello_seen();
            } else {
                self.stats.session_hellos += 1;
            }
            if reach {
                let r = miio::time_sync_reply(self.server_now()).to_vec();
                self.cloud_send(Rx::TimeSync, r);
            }
            return;
        }
        let stamp = p.stamp();
        let max = self.link.as_ref().and_then(|l| l.max_stamp);
        if p.is_control() {
            // A keepalive (P§5.6): on the model's schedule, with a stamp above all before it.
            // The MD5 on a sample (debug-build MD5 is the month's largest cost).
            let first = self.link.as_ref().is_some_and(|l| l.kas.is_empty());
            let sample = first || self.stats.keepalives.is_multiple_of(64);
            if p.did() != DID || (sample && !miio::control_md5_ok(&self.keys, &p)) {
                self.fail("a keepalive with a bad did or MD5");
            }
            if !session_up {
                self.fail("a keepalive outside a session");
            }
            if self.m.ka_next != Some(self.now) {
                self.fail(format!(
                    "keepalive at {}, the model expects {:?}",
                    clock(self.now),
                    self.m.ka_next.map(clock)
                ));
            }
            if max.is_some_and(|m| stamp <= m) {
                self.fail(format!("keepalive stamp {stamp} not above {max:?} (P§5.5)"));
            }
            self.stats.keepalives += 1;
            if self.resumed_at == Some(self.now) {
                self.stats.keepalives_at_resume += 1;
            }
            self.m.ka_next = Some(self.now + Duration(KEEPALIVE));
            let now = self.now;
            if let Some(l) = self.link.as_mut() {
                l.kas.push(now);
            }
        } else {
            if max.is_some_and(|m| stamp < m) {
                self.fail(format!("data stamp {stamp} below {max:?} (P§5.5)"));
            }
        }
        self.stats.stamps_checked += 1;
        if let Some(l) = self.link.as_mut() {
            l.max_stamp = Some(max.map_or(stamp, |m| m.max(stamp)));
        }
        if p.is_control() {
            if reach {
                self.cloud_send(Rx::Pong, b.to_vec()); // the pong echoes the keepalive
            }
            return;
        }
        let o = miio::open(&self.keys, DID, &p)
            .unwrap_or_else(|e| self.fail(format!("the cloud cannot open a packet: {e}")));
        self.cloud_message(&o.text, &Value::Object(o.value), transport, reach);
    }

    fn cloud_message(&mut self, text: &str, v: &Value, t: Transport, reach: bool) {
        let gen = self.gen;
        let id = v.get("id").and_then(rpc::id_u32);
        let method = v.get("method").and_then(Value::as_str);
        match (method, id) {
            (Some(m), Some(id)) => {
                if m.starts_with("local.") || m.starts_with("_internal.") {
                    self.fail(format!("{m} reached the cloud"));
                }
                // P§5.7 D5: unique for the month; a retransmission repeats one exactly.
                match self.ids.get(&id) {
                    Some((g, old)) if *g == gen && old == text && t == Transport::Udp => {}
                    Some((_, old)) => {
                        self.fail(format!("cloud id {id} used twice: {old} / {text}"))
                    }
                    None => {
                        self.stats.cloud_ids += 1;
                        self.ids.insert(id, (gen, text.to_string()));
                    }
                }
                let info = m == "_otc.info";
                let o = self.m.outstanding.entry(id).or_insert(Out {
                    last_send: self.now,
                    sends: 0,
                    info,
                    tcp: t == Transport::Tcp,
                });
                o.last_send = self.now;
                o.sends += 1;
                let sends = o.sends;
                if sends > 4 || (t == Transport::Tcp && sends > 1) {
                    self.fail(format!("id {id} sent {sends} times over {t}"));
                }
                let first = sends == 1;
                if info && first {
                    self.check_info(v);
                    self.m.info_wait = false;
                    if let Some(l) = self.link.as_mut().filter(|l| !l.session_up) {
                        if l.session_info.is_none() {
                            l.session_info = Some(id);
                        }
                    }
                }
                if m == "props" && v["params"]["ota_state"] == "idle" && first {
                    self.stats.idle_reports += 1;
                    if self.stats.idle_reports > 1 {
                        self.fail("ota_state idle went up twice in one run (D12)");
                    }
                }
                if reach {
                    let (ack, interval) = if info {
                        let ack = json!({"id":id,"result":{
                            "otc_list":[{"ip":"1.2.3.5","port":8053},{"ip":"1.2.3.6","port":8053}],
                            "otc_test":{"list":[],"interval":self.interval,"firsttest":600}}});
                        (ack.to_string(), Some(self.interval))
                    } else {
                        (format!(r#"{{"id":{id},"result":"ok"}}"#), None)
                    };
                    let pkt = self.cloud_seal(&ack);
                    self.cloud_send(Rx::Ack { id, interval }, pkt);
                }
            }
            (Some(_), None) => {}
            (None, Some(id)) => {
                self.cloud_reply(id, v);
                if reach && self.rng.chance(50) {
                    let pkt = self.cloud_seal(&format!(r#"{{"id":{id},"result":"ok"}}"#));
                    self.cloud_send(Rx::ReplyAck, pkt);
                }
            }
            (None, None) => self.fail(format!("the cloud got {text}")),
        }
    }

    /// `_otc.info` (P§5.4): the identity, and the uid of the last successful provisioning only.
    fn check_info(&mut self, v: &Value) {
        self.stats.info_sent += 1;
        let p = &v["params"];
        let token = crate::config::token::to_hex(&Secret16::new(TOKEN));
        if p["model"] != "acme.dev.v1"
            || p["token"] != token.as_str()
            || p["life"] != self.now.secs()
        {
            self.fail(format!("_otc.info params: {p}"));
        }
        let uid = p.get("uid").and_then(Value::as_str).map(str::to_string);
        let want = self.m.bind.map(|u| u.to_string());
        if uid != want {
            self.fail(format!(
                "_otc.info uid {uid:?}, the last provisioning gave {want:?}"
            ));
        }
    }

    /// The node's answer to a cloud command.
    fn cloud_reply(&mut self, id: u32, v: &Value) {
        self.command_answer(Src::Cloud, id, v.clone());
    }

    fn refresh_hello_seen(&mut self) {
        if self.m.refresh_next != Some(self.now) {
            self.fail(format!(
                "refresh hello at {}, the model expects {:?}",
                clock(self.now),
                self.m.refresh_next.map(clock)
            ));
        }
        self.stats.refresh_hellos += 1;
        self.m.refresh_next = Some(self.now + Duration(self.m.interval));
        self.m.refresh_hello = Some(self.now + Duration(5 * SEC));
    }

    /// A packet from the cloud reaches the node (if its socket is still the one open).
    fn cloud_deliver(&mut self, gen: u32, what: Rx, bytes: &[u8]) {
        let Some(l) = self.link.as_ref().filter(|l| l.gen == gen && l.up) else {
            return;
        };
        let tcp = l.transport == Transport::Tcp;
        let mut session_started = false;
        match &what {
            Rx::Ack { id, interval } => {
                if self.m.outstanding.remove(id).is_some() {
                    if let Some(i) = interval {
                        self.m.interval = (*i).max(60) * SEC;
                    }
                    if l.session_info == Some(*id) && !l.session_up {
                        session_started = true;
                    }
                }
            }
            Rx::TimeSync => {
                if self.m.refresh_hello.take().is_some() {
                    self.m.info_wait = true;
                }
            }
            Rx::Command { id, self_method } => {
                let audience = self.audience();
                let self_method = *self_method;
                // A repeat after the reply cache forgot the answer (a suspend delayed it) is a
                // new command (P§5.8).
                let now = self.now;
                let expired = self.cmds.get(&(Src::Cloud, *id)).is_some_and(|c| {
                    c.replies
                        .first()
                        .is_some_and(|(t, _)| now >= *t + Duration(REPLY_TTL))
                });
                if expired {
                    self.cmds.remove(&(Src::Cloud, *id));
                    for a in &mut self.apps {
                        a.seen.remove(id);
                    }
                }
                let repeat = self.cmds.contains_key(&(Src::Cloud, *id));
                if repeat {
                    if let Some(c) = self.cmds.get_mut(&(Src::Cloud, *id)) {
                        c.repeat = Some(self.now);
                    }
                } else {
                    self.open_cmds.insert((Src::Cloud, *id), self.now);
                    self.cmds.insert(
                        (Src::Cloud, *id),
                        Cmd {
                            delivered: Some(self.now),
                            audience0: audience == 0 && !self_method,
                            main: None,
                            other: None,
                            replies: Vec::new(),
                            exempt: false,
                            repeat: None,
                            self_method,
                        },
                    );
                }
            }
            Rx::Pong | Rx::ReplyAck => {}
        }
        if session_started {
            if let Some(l) = self.link.as_mut() {
                l.session_up = true;
                l.came_up = Some(self.now);
            }
            self.stats.sessions += 1;
            self.stats.sessions_tcp += u64::from(tcp);
            self.m.ka_next = Some(self.now + Duration(KEEPALIVE));
            self.m.refresh_next = Some(self.now + Duration(self.m.interval));
        }
        if tcp {
            // Any chunking (P§5.2): sometimes in two pieces.
            let cut = if bytes.len() > 1 && self.rng.chance(30) {
                self.rng.range(1, bytes.len() as u64 - 1) as usize
            } else {
                bytes.len()
            };
            self.node.cloud_stream(self.now, &bytes[..cut]);
            if cut < bytes.len() {
                self.node.cloud_stream(self.now, &bytes[cut..]);
            }
        } else {
            self.node.cloud_datagram(self.now, bytes);
        }
        self.run_actions();
    }

    fn cloud_command(&mut self) {
        let Some(l) = self.link.as_ref() else { return };
        if !l.session_up || !self.reachable(l.transport) {
            return;
        }
        let id = self.next_cmd;
        self.next_cmd += 1;
        self.stats.cloud_cmds += 1;
        let self_method = self.rng.chance(10);
        let text = if self_method {
            format!(r#"{{"id":{id},"method":"miIO.info","params":[]}}"#)
        } else {
            format!(r#"{{"id":{id},"method":"set_power","params":{{"c":{id}}}}}"#)
        };
        let pkt = self.cloud_seal(&text);
        self.cloud_send(Rx::Command { id, self_method }, pkt);
        if self.rng.chance(10) {
            // The cloud sends the same command again (P§5.8: ignored, or answered from the cache).
            self.stats.cloud_cmd_repeats += 1;
            let d = self.rng.range(SEC, 8 * SEC);
            let pkt = self.cloud_seal(&text);
            let Some(l) = self.link.as_mut() else { return };
            let at = (self.now + Duration(d)).max(l.last_rx + Duration(1));
            l.last_rx = at;
            let gen = l.gen;
            self.at(
                at,
                Ev::CloudRx {
                    gen,
                    what: Rx::Command { id, self_method },
                    bytes: pkt,
                },
            );
        }
    }

    /// The answer to a cloud or LAN command: first reply wins, the held -10000, or -9999 at the
    /// user-ack deadline (P§5.8 D16), once; a repeat is answered from the cache.
    fn command_answer(&mut self, src: Src, id: u32, r: Value) {
        let now = self.now;
        let Some(c) = self.cmds.get(&(src, id)) else {
            self.fail(format!("{src:?} answer to unknown command {id}: {r}"));
        };
        let Some(at) = c.delivered else {
            self.fail(format!("{src:?} answer to undelivered command {id}"));
        };
        if r.get("id").and_then(rpc::id_u32) != Some(id) {
            self.fail(format!("{src:?} answer with the wrong id: {r}"));
        }
        let kind: &'static str = if r.get("result").is_some() {
            "app result"
        } else {
            match r["error"]["code"].as_i64() {
                Some(-10000) => "held -10000",
                Some(-9999) => "-9999",
                _ => "other",
            }
        };
        if let Some((first_at, first)) = c.replies.first() {
            // A second answer: only the cache's, to a repeat that came after the first answer.
            let ok = c
                .repeat
                .is_some_and(|t| t == now && *first_at <= t && t < *first_at + Duration(REPLY_TTL))
                && *first == r;
            if !ok {
                self.fail(format!(
                    "{src:?} command {id} answered twice: {first} at {} / {r}; delivered {:?}, repeat {:?}",
                    clock(*first_at),
                    c.delivered.map(clock),
                    c.repeat.map(clock)
                ));
            }
            if let Some(c) = self.cmds.get_mut(&(src, id)) {
                c.replies.push((now, r));
            }
            return;
        }
        if c.self_method {
            if r.get("result").is_none() || now != at {
                self.fail(format!("{src:?} self method {id}: {r}"));
            }
        } else if c.audience0 {
            if kind != "-9999" || now != at {
                self.fail(format!(
                    "no audience: {src:?} {id} answered {r} at {}",
                    clock(now)
                ));
            }
        } else {
            let deadline = self.fires_at(at + Duration(USER_ACK));
            let main = c.main.filter(|&t| t <= now);
            let other = c.other.filter(|&t| t <= now);
            let want = match (main, other) {
                (Some(t), _) if t <= deadline => {
                    if now != t {
                        self.fail(format!("{src:?} {id}: the app answered at {}", clock(t)));
                    }
                    "app result"
                }
                (_, Some(_)) => "held -10000",
                _ => "-9999",
            };
            if want != "app result" && now != deadline {
                self.fail(format!(
                    "{src:?} {id}: {kind} at {}, the deadline fires at {}",
                    clock(now),
                    clock(deadline)
                ));
            }
            if kind != want {
                self.fail(format!("{src:?} {id}: answered {kind} ({r}), want {want}"));
            }
        }
        let stats = match src {
            Src::Cloud => &mut self.stats.cloud_replies,
            Src::Lan => &mut self.stats.lan_replies,
        };
        *stats.entry(kind).or_default() += 1;
        self.open_cmds.remove(&(src, id));
        if let Some(c) = self.cmds.get_mut(&(src, id)) {
            c.replies.push((now, r));
        }
    }

    // ---- the phone (LAN, P§4) ------------------------------------------------------------------

    fn phone_send_hello(&mut self) {
        let d = self.rng.range(1, 30);
        self.after(
            d,
            Ev::PhoneTx {
                bytes: miio::lan_hello().to_vec(),
                id: None,
            },
        );
    }

    fn phone_command(&mut self, text: Option<String>) {
        let id = self.phone.next_id;
        self.phone.next_id += 1;
        let text = text.unwrap_or_else(|| {
            if self.rng.chance(15) {
                format!(r#"{{"id":{id},"method":"miIO.info","params":[]}}"#)
            } else {
                format!(r#"{{"id":{id},"method":"set_light","params":{{"n":{id}}}}}"#)
            }
        });
        let text = rpc::rewrite_id(&text, u64::from(id)).unwrap_or(text);
        self.phone.queued.push(text);
        self.phone_send_hello();
    }

    fn phone_recv(&mut self, to: SocketAddr, b: &[u8]) {
        if to != self.phone.addr {
            self.fail(format!("a LAN datagram to {to}"));
        }
        let p = Packet::new_checked(b).unwrap_or_else(|e| self.fail(format!("LAN: {e}")));
        if b.len() == 32 {
            // The hello reply (P§4.2): the token in clear only in AP mode (D7).
            let ap = self.node.state() == State::WifiApMode;
            let sum = p.checksum();
            if p.did() != DID || (ap && sum != TOKEN) || (!ap && sum != [0xff; 16]) {
                self.fail(format!(
                    "LAN hello reply in {:?}: {b:02x?}",
                    self.node.state()
                ));
            }
            self.phone.token = Some(TOKEN);
            self.phone.stamp = Some((p.stamp(), self.now));
            for text in std::mem::take(&mut self.phone.queued) {
                self.phone_send(text);
            }
            return;
        }
        let o = miio::open(&self.token_keys, DID, &p)
            .unwrap_or_else(|e| self.fail(format!("the phone cannot open a reply: {e}")));
        let Some(id) = o.value.get("id").and_then(rpc::id_u32) else {
            self.fail(format!("LAN reply without id: {}", o.text));
        };
        let Some(sent) = self.phone.sent.get(&id).cloned() else {
            self.fail(format!("LAN reply to nothing: {}", o.text));
        };
        if sent.contains("miIO.config_router") {
            if !self.cmds.contains_key(&(Src::Lan, id)) {
                self.provision_reply(o.value.get("result"), &o.text);
                self.cmds
                    .insert((Src::Lan, id), self_cmd(self.now, o.value.clone()));
                return;
            }
            self.fail(format!("config_router {id} answered twice"));
        }
        self.command_answer(Src::Lan, id, Value::Object(o.value));
    }

    fn phone_send(&mut self, text: String) {
        let Some((stamp, at)) = self.phone.stamp else {
            return;
        };
        let Some(token) = self.phone.token else {
            return;
        };
        let v = obj(&text);
        let id = v.get("id").and_then(rpc::id_u32).unwrap_or(0);
        let stamp = stamp + (self.now.secs() - at.secs()) as u32;
        let bytes = miio::seal(&Keys::new(&token), DID, stamp, text.as_bytes());
        let d = self.rng.range(2, 40);
        let self_method = text.contains("\"miIO.");
        self.phone.sent.insert(id, text.clone());
        if !text.contains("miIO.config_router") {
            self.stats.lan_cmds += 1;
            self.cmds.insert(
                (Src::Lan, id),
                Cmd {
                    delivered: None,
                    audience0: false,
                    main: None,
                    other: None,
                    replies: Vec::new(),
                    exempt: false,
                    repeat: None,
                    self_method,
                },
            );
            let id = Some(id);
            self.after(
                d,
                Ev::PhoneTx {
                    bytes: bytes.clone(),
                    id,
                },
            );
            if self.rng.chance(25) {
                // The phone sends the same packet again (P§4.5): never executed twice.
                let again = self.rng.range(SEC, 8 * SEC);
                self.after(again, Ev::PhoneTx { bytes, id });
            }
        } else {
            self.after(d, Ev::PhoneTx { bytes, id: None });
        }
    }

    // ---- provisioning (L§8) ----------------------------------------------------------------------

    fn provision(&mut self, via: Via) {
        if self.m.prov.is_some() || self.helper.wifi {
            self.stats.provisions_skipped += 1;
            return;
        }
        if !matches!(
            self.node.state(),
            State::WifiApMode | State::CloudConnected | State::CloudRetry | State::CloudTrying
        ) {
            self.stats.provisions_skipped += 1;
            return;
        }
        let n = self.rng.range(1, 1000);
        let uid = (via != Via::Qr || self.rng.chance(50)).then_some(7000 + n);
        let mut p = json!({"ssid": format!("net-{n}"), "passwd": "pw12345678"});
        if let Some(u) = uid {
            p["uid"] = json!(u);
        }
        if self.rng.chance(50) {
            p["bind_key"] = json!(format!("bk{n}"));
        }
        if self.rng.chance(20) {
            p["country_domain"] = json!(["de", "sg", "cn"][self.rng.range(0, 2) as usize]);
        }
        if self.rng.chance(20) {
            p["tz"] = json!("Europe/Berlin");
        }
        self.ap_retry = false;
        self.m.prov = Some(Prov {
            start: self.now,
            uid,
            ok_seen: false,
        });
        match via {
            Via::Lan => {
                let text = json!({"id":0,"method":"miIO.config_router","params":p}).to_string();
                self.phone_command(Some(text));
            }
            Via::Ble | Via::Qr => {
                let (actor, port) = if via == Via::Ble {
                    (Actor::Ble, Port::Ble)
                } else {
                    (Actor::Qr, Port::Local)
                };
                let text =
                    json!({"id":1,"method":"local.ble.config_router","params":p}).to_string();
                let Some(cid) = self.open(actor, port) else {
                    return;
                };
                self.clis.insert(
                    cid,
                    Cli {
                        id: 1,
                        kind: "provision",
                        delivered: false,
                        sent: self.now,
                    },
                );
                let d = self.rng.range(1, 20);
                self.after(d, Ev::Tx { cid, text });
            }
        }
    }

    fn provision_reply(&mut self, result: Option<&Value>, text: &str) {
        let Some(p) = self.m.prov.as_mut() else {
            self.fail(format!("a provisioning reply without one: {text}"));
        };
        if result != Some(&json!(["OK"])) || p.ok_seen {
            self.fail(format!("provisioning refused: {text}"));
        }
        p.ok_seen = true;
        // The provisioning runs from the write; its start is the Wi-Fi limit's (L§8).
        p.start = self.now;
        let uid = p.uid;
        self.m.bind_pending = Some(uid);
    }

    // ---- injections ------------------------------------------------------------------------------

    fn inject(&mut self, i: Inj) {
        match i {
            Inj::Outage(kind, ms) => {
                if self.outage.is_some() {
                    return;
                }
                let until = self.now + Duration(ms);
                self.outage = Some((kind, until));
                self.at(until, Ev::OutageEnd);
                if kind == Outage::WifiDown {
                    if let Some(l) = self.link.as_ref().filter(|l| l.transport == Transport::Tcp) {
                        let gen = l.gen;
                        self.after(10, Ev::LinkDown { gen });
                    }
                }
            }
            Inj::TcpReset => {
                if let Some(l) = self.link.as_ref().filter(|l| l.transport == Transport::Tcp) {
                    let gen = l.gen;
                    self.after(10, Ev::LinkDown { gen });
                }
            }
            Inj::Suspend { ms, polite } => {
                if polite {
                    self.prep_suspend();
                }
                self.after(20, Ev::Sleep(ms));
            }
            Inj::ClockJump(s) => self.skew += s,
            Inj::HelperRestart(gap) => self.helper_restart(gap),
            Inj::Provision(via) => self.provision(via),
            Inj::Interval(s) => {
                self.interval = s;
                if s < 600 {
                    // A short period is an episode (and each refresh is the month's dearest
                    // exchange in a debug build): back to 30 minutes after a while.
                    let d = self.rng.range(20 * MIN, 60 * MIN);
                    self.after(d, Ev::Inject(Inj::Interval(1800)));
                }
            }
            Inj::CloudCommand => self.cloud_command(),
            Inj::PhoneCommand => {
                if self.node.state().token_known() {
                    self.phone_command(None);
                }
            }
            Inj::Cli => self.cli(true),
            Inj::PrepSuspend => self.prep_suspend(),
            Inj::Churn(i) => {
                if let Some(cid) = self.apps[i].cid.take() {
                    self.apps[i].pending.clear();
                    self.after(1, Ev::Close { cid });
                    let back = self.rng.log_range(SEC, 10 * MIN);
                    self.after(back, Ev::AppConnect(i));
                }
            }
        }
    }

    // ---- the checks after each turn ------------------------------------------------------------

    fn after_turn(&mut self) {
        let now = self.now;
        let state = self.node.state();
        // P§4.8: with a cloud socket up and a provisioned identity the responder has the service,
        // at the socket's address.
        let provisioned = self.node.identity().is_some_and(|i| i.provisioned);
        if self.link.as_ref().is_some_and(|l| l.up)
            && provisioned
            && self.mdns_service.as_ref().map(|i| i.ip) != Some(LOCAL_IP)
        {
            self.fail("no mDNS service at the cloud socket's address");
        }
        if self.mdns_service.is_some()
            && !matches!(
                state,
                State::WifiStaMode | State::CloudTrying | State::CloudConnected | State::CloudRetry
            )
        {
            self.fail(format!("an mDNS service in {state:?}"));
        }

        // (1) Nothing overdue is left behind.
        let next = self.node.poll_timeout();
        self.next_deadline = next;
        if next.is_some_and(|t| t <= now) {
            self.fail(format!(
                "deadline {:?} still due after the turn",
                next.map(clock)
            ));
        }
        // Deadlines whose firing the model has seen this turn.
        self.m.classify.retain(|_, t| *t > now);
        // P§5.7 D5: 3 s per send; on UDP up to 3 retransmissions, then the request is given up.
        if let Some((id, _)) = self
            .m
            .outstanding
            .iter()
            .find(|(_, o)| o.last_send + Duration(ACK_TIMEOUT) <= now && !o.tcp && o.sends < 4)
        {
            self.fail(format!(
                "request {id} not retransmitted at its ack deadline"
            ));
        }
        self.m
            .outstanding
            .retain(|_, o| o.last_send + Duration(ACK_TIMEOUT) > now);
        if self.m.refresh_hello.is_some_and(|t| t <= now) {
            self.m.refresh_hello = None;
            self.m.info_wait = true;
        }
        if self
            .m
            .prov
            .as_ref()
            .is_some_and(|p| p.ok_seen && p.start + Duration(WIFI_LIMIT) <= now)
        {
            self.m.prov = None;
            self.m.bind_pending = None;
            self.m.bind = None;
            self.stats.provisions_failed += 1;
        }
        if let Some(t) = self.m.refresh_next.filter(|t| *t <= now) {
            // The tick came and sent no hello: only while the previous refresh still runs.
            if !(self.m.info_wait || self.m.outstanding.values().any(|o| o.info)) {
                self.fail(format!("refresh due at {} not done", clock(t)));
            }
            self.stats.refresh_skipped += 1;
            self.m.refresh_next = Some(now + Duration(self.m.interval));
        }
        if let Some(t) = self.m.ka_next.filter(|t| *t <= now) {
            self.fail(format!("keepalive due at {} not sent", clock(t)));
        }
        if let Some(((src, id), _)) = self
            .open_cmds
            .iter()
            .find(|(_, at)| **at + Duration(USER_ACK) <= now)
        {
            self.fail(format!("{src:?} command {id} not answered by its deadline"));
        }
        // The offline clock (L§13, D11).
        match state {
            State::CloudConnected | State::WifiApMode => self.m.offline = None,
            State::CloudRetry if self.prev_state != State::CloudRetry => {
                self.m.offline.get_or_insert(now);
            }
            _ => {}
        }
        self.prev_state = state;
        if state == State::WifiApMode
            && self.m.prov.is_none()
            && !self.ap_retry
            && now > Instant(11 * MIN)
        {
            self.ap_retry = true;
            let d = self.rng.range(2 * MIN, 5 * MIN);
            self.after(d, Ev::Inject(Inj::Provision(Via::Lan)));
        }
        // A deadline exists whenever the state needs one, never later than the model's.
        let bound = match state {
            State::CloudConnected => Some(KEEPALIVE),
            State::CloudRetry => Some(BACKOFF_MAX),
            State::CloudTrying => Some(30 * SEC),
            State::WifiStaMode => Some(WIFI_LIMIT),
            _ => None,
        };
        if let Some(b) = bound {
            if next.is_none_or(|t| t > now + Duration(b)) {
                self.fail(format!(
                    "in {state:?} the next deadline is {:?}",
                    next.map(clock)
                ));
            }
        }
        let model = self.model_deadlines();
        if let Some((what, t)) = model.iter().min_by_key(|(_, t)| *t) {
            if next.is_none_or(|n| n > *t) {
                self.fail(format!(
                    "the node wakes at {:?}, after the {what} due at {}",
                    next.map(clock),
                    clock(*t)
                ));
            }
            if self.idle_certain() && next != Some(*t) {
                self.fail(format!(
                    "idle: the node wakes at {:?}, the model at {} ({what})",
                    next.map(clock),
                    clock(*t)
                ));
            }
        } else if self.idle_certain() && next.is_some() {
            self.fail(format!(
                "idle with nothing due, yet a wakeup at {:?}",
                next.map(clock)
            ));
        }
        // Pending requests of clients are answered in time (12 s of retransmissions on UDP).
        for a in &self.apps {
            let late = a
                .pending
                .iter()
                .find(|(_, p)| p.sent + Duration(20 * SEC) < now);
            if let Some((id, p)) = late {
                self.fail(format!("app request {id} of {} unanswered", clock(p.sent)));
            }
        }
        if let Some(c) = self
            .clis
            .values()
            .find(|c| c.sent + Duration(20 * SEC) < now)
        {
            self.fail(format!("{} request {} unanswered", c.kind, c.id));
        }
        // (2) Every collection stays bounded.
        let mut sizes = std::mem::take(&mut self.sizes);
        sizes.clear();
        self.node.debug_sizes(&mut sizes);
        let day = (now.millis() / DAY) as usize;
        while self.daily.len() <= day {
            self.daily.push([0; BOUNDS.len()]);
        }
        for (pos, &(name, n)) in sizes.iter().enumerate() {
            // The names come from the same literals each turn: their address finds the index.
            let addr = name.as_ptr() as usize;
            let i = match self.size_idx.get(pos) {
                Some(&(a, i)) if a == addr => i,
                _ => {
                    let Some(i) = BOUNDS.iter().position(|(b, _)| *b == name) else {
                        self.fail(format!("no bound for {name}"));
                    };
                    self.size_idx.truncate(pos);
                    self.size_idx.push((addr, i));
                    i
                }
            };
            let bound = BOUNDS[i].1;
            if n > bound {
                let who: Vec<_> = self.conns.values().map(|c| c.actor).collect();
                let who = if name.starts_with("local.") {
                    format!(" (connections {who:?})")
                } else {
                    String::new()
                };
                self.fail(format!("{name} holds {n}, above its bound {bound}{who}"));
            }
            if n > self.max[i].0 {
                self.max[i] = (n, now);
            }
            self.daily[day][i] = self.daily[day][i].max(n);
        }
        self.sizes = sizes;
    }

    /// (4) The keepalives a session `[up, end)` must have sent, from its window alone: one every
    /// interval after `up`, the one that fell in a suspend at its resume and the next an interval
    /// later (L§12); a tick at the very end is not sent (the link went down first, or it was the
    /// third miss, P§5.6).
    fn session_ended(&mut self, up: Instant, end: Instant, sent: &[Instant]) {
        self.stats.up_ms += end.millis() - up.millis();
        self.stats.naive_keepalives += (end.millis() - up.millis()) / KEEPALIVE;
        let mut t = up + Duration(KEEPALIVE);
        let mut want = Vec::new();
        loop {
            let fire = self.fires_at(t);
            if fire >= end {
                break;
            }
            want.push(fire);
            t = fire + Duration(KEEPALIVE);
        }
        if want != sent {
            let i = want
                .iter()
                .zip(sent)
                .position(|(a, b)| a != b)
                .unwrap_or(want.len().min(sent.len()));
            self.fail(format!(
                "session {}..{}: {} keepalives, its window gives {}; first difference #{i}: sent {:?}, window {:?}",
                clock(up),
                clock(end),
                sent.len(),
                want.len(),
                sent.get(i).map(|t| clock(*t)),
                want.get(i).map(|t| clock(*t)),
            ));
        }
        self.stats.expected_keepalives += want.len() as u64;
    }

    fn finish(&mut self) {
        let pending: Vec<_> = self
            .cmds
            .iter()
            .filter(|(_, c)| c.delivered.is_some() && c.replies.is_empty() && !c.exempt)
            .filter(|(_, c)| {
                c.delivered
                    .is_some_and(|t| t + Duration(USER_ACK) < self.end)
            })
            .map(|(k, _)| *k)
            .collect();
        if !pending.is_empty() {
            self.fail(format!("commands never answered: {pending:?}"));
        }
        if let Some(l) = self.link.take() {
            if let Some(up) = l.came_up {
                // The last turn may be at `end` itself: its tick counts.
                self.session_ended(up, self.end + Duration(1), &l.kas);
            }
        }
    }

    fn report(&self, days: u64) -> String {
        let s = &self.stats;
        let mut r = String::new();
        let mut line = |t: String| {
            r.push_str(&t);
            r.push('\n');
        };
        line(format!(
            "simulated {days} days ({} hour ticks, delayed by suspends): {} turns, {} with due timers; sizes sampled after every turn",
            s.hours, s.turns, s.timer_turns
        ));
        line("injected:".into());
        for (k, v) in &s.injected {
            line(format!("  {k:<40} {v}"));
        }
        line(format!(
            "keepalives {} (expected from the session windows {}; {} at a resume; connected time / 20 s = {}); sessions {} ({} TCP), connected {:.1} h of {:.1} h",
            s.keepalives,
            s.expected_keepalives,
            s.keepalives_at_resume,
            s.naive_keepalives,
            s.sessions,
            s.sessions_tcp,
            s.up_ms as f64 / HOUR as f64,
            (self.end.millis() as f64) / HOUR as f64
        ));
        line(format!(
            "session hellos {}, refresh hellos {} ({} ticks skipped while one ran), _otc.info {}, idle report {}",
            s.session_hellos, s.refresh_hellos, s.refresh_skipped, s.info_sent, s.idle_reports
        ));
        line(format!(
            "suspends {} ({:.1} h asleep), {} with a deadline overdue at resume; {} planned injections fell asleep",
            self.suspends.len(),
            s.slept_ms as f64 / HOUR as f64,
            s.overdue_at_resume,
            s.dropped_asleep
        ));
        line(format!(
            "cloud ids {} unique, stamps checked {}; upstream acked {}, refused -30011 {}, notifications {}",
            s.cloud_ids, s.stamps_checked, s.upstream_acked, s.upstream_refused, s.notifications
        ));
        line(format!(
            "cloud commands {} ({} repeated): {:?}",
            s.cloud_cmds, s.cloud_cmd_repeats, s.cloud_replies
        ));
        line(format!(
            "LAN commands {} ({} phone datagrams lost to a sleeping board): {:?}",
            s.lan_cmds, s.lost_asleep, s.lan_replies
        ));
        line(format!(
            "provisioning ok {}, failed {}, skipped (one running) {}; helper info answers {}",
            s.provisions_ok, s.provisions_failed, s.provisions_skipped, s.helper_answers
        ));
        line(format!(
            "offline notices {} ({} exactly on the 15-min grid); short clients answered {}; connections opened {}",
            s.offline_notices, s.offline_exact, s.cli_done, s.conns_opened
        ));
        line(format!("prep_suspend: {:?}", s.prep));
        line(format!(
            "wakeup_time histogram (10 s buckets, 60 = 60+): {:?}",
            s.wakeups
        ));
        line("collection                max  bound  at            day1  last day".into());
        for (i, &(name, bound)) in BOUNDS.iter().enumerate() {
            let (m, at) = self.max[i];
            let first = self.daily.first().map_or(0, |d| d[i]);
            let last = self.daily.last().map_or(0, |d| d[i]);
            line(format!(
                "  {name:<22} {m:>4} {bound:>6}  {}  {first:>4}  {last:>4}",
                clock(at)
            ));
        }
        r
    }
}

fn self_cmd(now: Instant, v: Map<String, Value>) -> Cmd {
    Cmd {
        delivered: Some(now),
        audience0: false,
        main: None,
        other: None,
        replies: vec![(now, Value::Object(v))],
        exempt: true,
        repeat: None,
        self_method: true,
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn month() {
    let seed = env_u64("MIIO_SIM_SEED", 20_240_601);
    let days = env_u64("MIIO_SIM_DAYS", 30);
    let mut sim = Sim::new(seed, days);
    sim.run();
    let report = sim.report(days);
    println!("seed {seed}\n{report}");
    let s = &sim.stats;
    // (4) Every keepalive went out on the model's schedule as it ran (checked at each one); the
    // total is also what the session windows and the suspends alone give.
    assert_eq!(s.keepalives, s.expected_keepalives);
    assert!(s.keepalives > 0 && s.sessions > 1 && s.refresh_hellos > 0);
    // Coverage of the default schedule: a change of the plan that loses it fails here. Other
    // seeds (MIIO_SIM_SEED) may cover less; their checks are the same.
    if days >= 30 && std::env::var("MIIO_SIM_SEED").is_err() {
        assert!(s.offline_notices > 0 && s.sessions_tcp > 0 && s.provisions_ok > 1);
        assert!(s.prep.get("idle (model): exact").is_some_and(|&n| n > 100));
    }
}
