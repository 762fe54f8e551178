//! `miio_fakecloud`: a small stand-in for the OT cloud, for offline demos and as the test peer of
//! the daemon (PROTOCOL.md §5 seen from the cloud side; LOCAL_API.md §18).
//!
//! Contract:
//! - UDP and TCP are served on one port from one mio `Poll`. The loop blocks in `poll` until a
//!   socket or the [`StopHandle`] wakes it: no timer, no tick.
//! - The exact cloud hello gets a time-sync reply carrying wall-clock Unix seconds; a keepalive of
//!   a known did with a valid MD5 is echoed unchanged; `_otc.info` and `_otc.didkey_req` (P§5.11)
//!   get their replies; every other upstream request with an id gets `{"id":N,"result":"ok"}`.
//!   Requests without an id are logged only. A message without `method` is a device's reply to a
//!   pushed command and goes back to the control connection that pushed it.
//! - Every packet is checked in the P§2.7 order; a bad one is dropped with a log line rate-limited
//!   to 1/s per source and a `drop` event. No input makes the server panic or stop.
//! - A control socket on 127.0.0.1 speaks line-delimited JSON: push commands, failure modes
//!   (`silent`, `drop_acks`, `close_tcp`), the did/key answer (`didkey`), `status` and an event
//!   stream (`watch`).
//!   `miio_fakecloud send` / `miio_fakecloud ctl` are its command-line clients.
//! - Network faults for the daemon's fault tests: each device packet, in either direction and on
//!   either transport, passes one rule per fault kind (`drop`, `dup`, `reorder`, `delay`) before it
//!   is handled or sent, and `reset_tcp` cuts a TCP link mid-packet. Every fault done is a `fault`
//!   event. A delayed or held packet is the only reason the loop ever wakes on a deadline.
//! - Keys never reach Debug output or a log line; logged messages have secret members (`token`,
//!   `key`, ...) masked unless the level is debug (P§2.5).

use std::collections::HashMap;
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use log::{debug, info, log_enabled, warn, Level, LevelFilter};
use mio::net::{TcpListener, TcpStream, UdpSocket};
use mio::{Events, Interest, Poll, Token, Waker};
use serde_json::{json, Map, Value};

use crate::wire::crypto::Keys;
use crate::wire::miio::{self, Packet};
use crate::wire::rpc;

/// The cloud hello, byte for byte (P§2.6, V7). Only this exact packet gets a time sync.
const CLOUD_HELLO: [u8; 32] = [
    0x21, 0x31, 0x00, 0x20, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
];

const DEFAULT_PORT: u16 = 8053;
const DEFAULT_INTERVAL: u32 = 1800;
/// P§5.4: `firsttest` is sent as the vendor cloud does; the daemon ignores it.
const FIRSTTEST: u32 = 600;
/// How long `miio_fakecloud send` waits for the device's reply.
const SEND_WAIT: Duration = Duration::from_secs(10);

const UDP: Token = Token(0);
const TCP_LISTEN: Token = Token(1);
const CTL_LISTEN: Token = Token(2);
const WAKER: Token = Token(3);
const FIRST_CONN: usize = 16;

/// Bounds that keep a misbehaving peer from eating memory.
const MAX_DEVICE_CONNS: usize = 256;
const MAX_CTL_CONNS: usize = 32;
const MAX_CTL_LINE: usize = 65536;
const MAX_WBUF: usize = 4 << 20;
const MAX_PENDING: usize = 1024;
const READ_CHUNK: usize = 16384;
/// Packets waiting for their `delay`; more are lost with a warning.
const MAX_LATER: usize = 4096;
/// The longest `delay` or `reorder` hold a command may ask for, ms.
const MAX_FAULT_MS: u64 = 600_000;
/// How long `reorder` holds a packet when no next one comes, ms.
const DEFAULT_HOLD_MS: u64 = 2000;
/// How many bytes of a packet `reset_tcp` sends before the reset.
const DEFAULT_CUT: usize = 10;

/// One device the cloud knows: its did and its 16-byte cloud key (P§2.5).
#[derive(Clone, PartialEq, Eq)]
pub struct DeviceCred {
    pub did: u32,
    pub key: [u8; 16],
}

// The key is a secret (P§2.5): Debug shows the did only.
impl fmt::Debug for DeviceCred {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceCred {{ did: {}, key: <redacted> }}", self.did)
    }
}

/// Everything the server needs; [`FakeCloudConfig::new`] gives the CLI defaults.
#[derive(Clone, Debug)]
pub struct FakeCloudConfig {
    /// Address UDP and TCP bind to.
    pub host: IpAddr,
    /// UDP and TCP port; 0 picks a free port that is free for both.
    pub port: u16,
    /// Control port on 127.0.0.1; 0 picks a free port.
    pub ctl_port: u16,
    pub devices: Vec<DeviceCred>,
    /// `otc_test.interval` in the `_otc.info` reply (P§5.10), seconds.
    pub interval: u32,
    /// `otc_list` in the `_otc.info` reply; `None` lists the server's own address.
    pub otc_list: Option<Vec<SocketAddr>>,
    /// The identity handed out by `_otc.didkey_req` (P§5.11).
    pub assign: Option<DeviceCred>,
    /// When set, `_otc.didkey_req` is answered `{"retry_after":S}` (takes precedence over `assign`).
    pub didkey_retry: Option<u32>,
}

impl FakeCloudConfig {
    /// The defaults of the command line: 127.0.0.1:8053, control port 8054, interval 1800 s.
    pub fn new(devices: Vec<DeviceCred>) -> Self {
        FakeCloudConfig {
            host: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port: DEFAULT_PORT,
            ctl_port: DEFAULT_PORT + 1,
            devices,
            interval: DEFAULT_INTERVAL,
            otc_list: None,
            assign: None,
            didkey_retry: None,
        }
    }
}

/// Wakes a running server and makes [`FakeCloud::run`] return `Ok(())`.
#[derive(Clone)]
pub struct StopHandle {
    waker: Arc<Waker>,
    flag: Arc<AtomicBool>,
}

impl StopHandle {
    pub fn stop(&self) {
        self.flag.store(true, Ordering::SeqCst);
        if let Err(e) = self.waker.wake() {
            warn!("fakecloud: cannot wake the server: {e}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Command line

const USAGE: &str = "\
Usage: miio_fakecloud [--port 8053] [--host 127.0.0.1] --did N --key KEY16 [--did N --key KEY16 ...]
                      [--devices FILE] [--ctl-port PORT] [--interval S] [--otc-list IP:PORT,...]
                      [--assign DID:KEY16] [--didkey-retry S] [-l LEVEL] [-h]
       miio_fakecloud send [--ctl-port PORT] [--did N] '<json>'
       miio_fakecloud ctl [--ctl-port PORT] '<control command>'

A fake OT cloud: serves UDP and TCP on one port (PROTOCOL.md section 5, cloud side).
  --port P          UDP and TCP port (default 8053)
  --host IP         address to bind (default 127.0.0.1)
  --did N --key K   a device and its 16-character cloud key; repeat for more devices
  --devices FILE    more devices, one 'did key' per line, '#' starts a comment
  --ctl-port P      control socket on 127.0.0.1 (default port + 1)
  --interval S      otc_test.interval in the _otc.info reply (default 1800)
  --otc-list L      otc_list in the _otc.info reply (default: this server)
  --assign DID:KEY  identity handed out by _otc.didkey_req (to one mac, again on a retry)
  --didkey-retry S  answer _otc.didkey_req with retry_after S instead
  -l LEVEL          0 error, 1 warning, 2 info (default), 3 debug, 4 verbose
  -h                this text

send: pushes <json> to the device (an id is added when missing) and prints its reply;
      exit 1 when none comes within 10 s. --did may be left out when one device is known.
ctl:  sends one control command ({\"cmd\":\"status\"}, {\"cmd\":\"silent\",\"on\":true},
      {\"cmd\":\"watch\"}, ...) and prints the answer lines.

Control commands: send, status, watch, silent, drop_acks, close_tcp, and the network faults
  {\"cmd\":\"drop\"|\"dup\"|\"reorder\"|\"delay\", \"dir\":\"in\"|\"out\"|\"both\", \"kind\":\"any\"|\"data\"|\"control\",
   \"n\":N, \"rate\":0..1, \"seed\":S, \"ms\":D}
  drop: lose the packet; dup: handle/send it twice; reorder: hold it until the next packet of the
  same direction and kind has passed (at most ms, default 2000); delay: handle/send it ms later.
  in = device to cloud, out = cloud to device; kind data = sealed JSON, control = 32-byte packets.
  n = how many packets the rule may touch (absent: no limit, 0: rule off); rate = the chance that a
  matching packet is touched, drawn from a generator seeded with seed (default 1). One rule per
  fault; a new command replaces it. Both transports alike.
  {\"cmd\":\"reset_tcp\",\"dir\":\"out\",\"kind\":...,\"after\":K}: the next packet (of that kind) to a
   device over TCP is cut after K bytes (default 10) and the connection reset; dir in: the next
   packet from a device over TCP resets the connection unread.
  {\"cmd\":\"clear\"}: every fault rule off, held packets released now (delayed ones stay due).
  {\"cmd\":\"didkey\",\"retry_after\":S|null}: answer _otc.didkey_req with retry_after S, or (null)
   with the --assign identity, from now on.
";

/// What the command line asks for.
#[derive(Debug)]
enum Cli {
    Help,
    Serve(FakeCloudConfig, LevelFilter),
    /// `send` (`ctl == false`) or `ctl`: a control-socket client.
    Client {
        ctl: bool,
        port: u16,
        did: Option<u32>,
        json: String,
    },
}

/// The applet entry point. `args` are the arguments after the program name (a leading
/// `…miio_fakecloud` is skipped too). Returns the exit status.
pub fn main(args: &[String]) -> i32 {
    let args = match args.first() {
        Some(a) if a.ends_with("miio_fakecloud") => args.get(1..).unwrap_or(&[]),
        _ => args,
    };
    match parse_cli(args) {
        Ok(Cli::Help) => {
            eprint!("{USAGE}");
            1
        }
        Ok(Cli::Serve(cfg, level)) => {
            // The vendor log format on stdout; then the level asked for.
            let _ = crate::io::log::init(2, None);
            log::set_max_level(level);
            let server = match FakeCloud::bind(cfg) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("miio_fakecloud: {e}");
                    return 1;
                }
            };
            match server.run() {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("miio_fakecloud: {e}");
                    1
                }
            }
        }
        Ok(Cli::Client {
            ctl,
            port,
            did,
            json,
        }) => client(ctl, port, did, &json),
        Err(e) => {
            eprintln!("miio_fakecloud: {e}\n(miio_fakecloud -h shows the usage)");
            1
        }
    }
}

/// `--name=value` becomes `--name value`, so the parser sees one form.
fn split_eq(args: &[String]) -> Vec<String> {
    let mut out = Vec::with_capacity(args.len());
    for a in args {
        match a.strip_prefix("--").and_then(|r| r.split_once('=')) {
            Some((name, value)) => {
                out.push(format!("--{name}"));
                out.push(value.to_string());
            }
            None => out.push(a.clone()),
        }
    }
    out
}

fn value<'a>(args: &'a [String], i: &mut usize, name: &str) -> Result<&'a str, String> {
    *i += 1;
    args.get(*i)
        .map(String::as_str)
        .ok_or_else(|| format!("option {name} needs a value"))
}

fn parse_cli(args: &[String]) -> Result<Cli, String> {
    let args = split_eq(args);
    match args.first().map(String::as_str) {
        Some("send") => return parse_client(false, args.get(1..).unwrap_or(&[])),
        Some("ctl") => return parse_client(true, args.get(1..).unwrap_or(&[])),
        _ => {}
    }
    let mut cfg = FakeCloudConfig::new(Vec::new());
    let mut level = LevelFilter::Info;
    let mut dids = Vec::new();
    let mut keys = Vec::new();
    let mut files = Vec::new();
    let mut ctl_port = None;
    let mut i = 0;
    while let Some(a) = args.get(i) {
        let a = a.as_str();
        match a {
            "-h" | "--help" => return Ok(Cli::Help),
            "--port" | "-p" => cfg.port = parse_port(value(&args, &mut i, a)?)?,
            "--host" | "-H" => {
                let v = value(&args, &mut i, a)?;
                cfg.host = v
                    .parse()
                    .map_err(|_| format!("bad --host {v:?}: an IP address is needed"))?;
            }
            "--did" => dids.push(parse_did(value(&args, &mut i, a)?)?),
            "--key" => keys.push(parse_key(value(&args, &mut i, a)?)?),
            "--devices" => files.push(value(&args, &mut i, a)?.to_string()),
            "--ctl-port" => ctl_port = Some(parse_port(value(&args, &mut i, a)?)?),
            "--interval" => {
                let v = value(&args, &mut i, a)?;
                cfg.interval = v
                    .parse()
                    .map_err(|_| format!("bad --interval {v:?}: seconds are needed"))?;
            }
            "--otc-list" => cfg.otc_list = Some(parse_otc_list(value(&args, &mut i, a)?)?),
            "--assign" => cfg.assign = Some(parse_assign(value(&args, &mut i, a)?)?),
            "--didkey-retry" => {
                let v = value(&args, &mut i, a)?;
                cfg.didkey_retry = Some(
                    v.parse()
                        .map_err(|_| format!("bad --didkey-retry {v:?}: seconds are needed"))?,
                );
            }
            "-l" | "--loglevel" => level = parse_level(value(&args, &mut i, a)?)?,
            other => return Err(format!("unknown argument {other:?}")),
        }
        i += 1;
    }
    if dids.len() != keys.len() {
        return Err(format!(
            "{} --did but {} --key: give them in pairs",
            dids.len(),
            keys.len()
        ));
    }
    cfg.devices = dids
        .into_iter()
        .zip(keys)
        .map(|(did, key)| DeviceCred { did, key })
        .collect();
    for f in files {
        let text = std::fs::read_to_string(&f).map_err(|e| format!("cannot read {f}: {e}"))?;
        let more = parse_devices(&text).map_err(|e| format!("{f}: {e}"))?;
        cfg.devices.extend(more);
    }
    if cfg.devices.is_empty() {
        return Err("no device: give --did N --key KEY16 or --devices FILE".into());
    }
    cfg.ctl_port = match ctl_port {
        Some(p) => p,
        None if cfg.port == 0 => 0,
        None => cfg
            .port
            .checked_add(1)
            .ok_or("--port 65535 needs an explicit --ctl-port")?,
    };
    Ok(Cli::Serve(cfg, level))
}

fn parse_client(ctl: bool, args: &[String]) -> Result<Cli, String> {
    let mut port = DEFAULT_PORT + 1;
    let mut did = None;
    let mut json = None;
    let mut i = 0;
    while let Some(a) = args.get(i) {
        let a = a.as_str();
        match a {
            "-h" | "--help" => return Ok(Cli::Help),
            "--ctl-port" => port = parse_port(value(args, &mut i, a)?)?,
            "--did" if !ctl => did = Some(parse_did(value(args, &mut i, a)?)?),
            _ if json.is_none() && !a.starts_with("--") => json = Some(a.to_string()),
            other => return Err(format!("unknown argument {other:?}")),
        }
        i += 1;
    }
    let json = json.ok_or("a JSON argument is needed")?;
    match serde_json::from_str::<Value>(&json) {
        Ok(Value::Object(_)) => {}
        _ => return Err(format!("not a JSON object: {json}")),
    }
    Ok(Cli::Client {
        ctl,
        port,
        did,
        json,
    })
}

fn parse_port(s: &str) -> Result<u16, String> {
    s.parse().map_err(|_| format!("bad port {s:?}"))
}

fn parse_level(s: &str) -> Result<LevelFilter, String> {
    Ok(match s {
        "0" | "error" => LevelFilter::Error,
        "1" | "warn" | "warning" => LevelFilter::Warn,
        "2" | "info" => LevelFilter::Info,
        "3" | "debug" => LevelFilter::Debug,
        "4" | "verbose" | "trace" => LevelFilter::Trace,
        _ => return Err(format!("bad log level {s:?}: 0..4")),
    })
}

/// A did: decimal, 0..=4294967294 (`ffffffff` marks hellos, P§2.1). 0 and 1 are bootstrap dids.
pub fn parse_did(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(d) if d != u32::MAX => Ok(d),
        _ => Err(format!("bad did {s:?}: a decimal number below 4294967295")),
    }
}

/// A cloud key: exactly 16 printable ASCII characters, used as bytes (P§2.5, P§8 item 8).
/// The error never repeats the key.
pub fn parse_key(s: &str) -> Result<[u8; 16], String> {
    if !s.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("bad key: must be 16 printable ASCII characters".into());
    }
    s.as_bytes()
        .try_into()
        .map_err(|_| format!("bad key: must be 16 characters, got {}", s.len()))
}

/// A devices file: `did key` per line; blank lines and `#` comments are skipped.
pub fn parse_devices(text: &str) -> Result<Vec<DeviceCred>, String> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let mut words = line.split_whitespace();
        let (Some(did), Some(key), None) = (words.next(), words.next(), words.next()) else {
            return Err(format!("line {}: expected 'did key'", n + 1));
        };
        let did = parse_did(did).map_err(|e| format!("line {}: {e}", n + 1))?;
        let key = parse_key(key).map_err(|e| format!("line {}: {e}", n + 1))?;
        out.push(DeviceCred { did, key });
    }
    Ok(out)
}

/// `DID:KEY`: the identity `_otc.didkey_req` assigns; a real did (≥ 2) and a 16-char alnum key (P§5.11).
fn parse_assign(s: &str) -> Result<DeviceCred, String> {
    let (did, key) = s
        .split_once(':')
        .ok_or("bad --assign: expected DID:KEY16")?;
    let did = parse_did(did)?;
    if did < 2 {
        return Err("bad --assign: the assigned did must be 2 or more".into());
    }
    if !key.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err("bad --assign: the key must be 16 letters or digits".into());
    }
    Ok(DeviceCred {
        did,
        key: parse_key(key)?,
    })
}

fn parse_otc_list(s: &str) -> Result<Vec<SocketAddr>, String> {
    s.split(',')
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            e.trim()
                .parse::<SocketAddr>()
                .map_err(|_| format!("bad --otc-list entry {e:?}: expected IP:PORT"))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Control client (`send` and `ctl`)

fn client(ctl: bool, port: u16, did: Option<u32>, json: &str) -> i32 {
    let cmd = match serde_json::from_str::<Value>(json) {
        Ok(Value::Object(m)) if ctl => Value::Object(m),
        Ok(Value::Object(m)) => {
            let mut c = Map::new();
            c.insert("cmd".into(), "send".into());
            if let Some(d) = did {
                c.insert("did".into(), d.into());
            }
            c.insert("json".into(), Value::Object(m));
            Value::Object(c)
        }
        _ => {
            eprintln!("miio_fakecloud: not a JSON object: {json}");
            return 1;
        }
    };
    let watch = ctl && cmd.get("cmd").and_then(Value::as_str) == Some("watch");
    match client_run(port, &cmd, ctl, watch) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("miio_fakecloud: control port {port}: {e}");
            1
        }
    }
}

fn client_run(port: u16, cmd: &Value, ctl: bool, watch: bool) -> io::Result<i32> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.write_all(format!("{cmd}\n").as_bytes())?;
    let deadline = Instant::now() + SEND_WAIT;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=nl).collect();
            let text = String::from_utf8_lossy(&line);
            let text = text.trim();
            let Ok(v) = serde_json::from_str::<Value>(text) else {
                continue;
            };
            let ev = v.get("ev").and_then(Value::as_str).unwrap_or("");
            if ctl {
                println!("{text}");
                match ev {
                    "error" => return Ok(1),
                    "ok" if !watch => return Ok(0),
                    _ => {}
                }
            } else {
                match ev {
                    "error" => {
                        let m = v.get("message").and_then(Value::as_str).unwrap_or("");
                        eprintln!("miio_fakecloud: {m}");
                        return Ok(1);
                    }
                    "reply" => {
                        println!("{}", v.get("json").unwrap_or(&Value::Null));
                        return Ok(0);
                    }
                    _ => {}
                }
            }
        }
        if buf.len() > MAX_CTL_LINE {
            buf.clear();
        }
        let timeout = if watch {
            None
        } else {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                eprintln!("no reply within {} s", SEND_WAIT.as_secs());
                return Ok(1);
            }
            Some(left)
        };
        s.set_read_timeout(timeout)?;
        match s.read(&mut chunk) {
            Ok(0) => {
                eprintln!("miio_fakecloud: the server closed the control connection");
                return Ok(1);
            }
            Ok(n) => buf.extend_from_slice(chunk.get(..n).unwrap_or(&[])),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The server

/// How a packet arrived, and so how the answer goes back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Via {
    Udp(SocketAddr),
    Tcp(Token, SocketAddr),
}

impl Via {
    fn transport(self) -> &'static str {
        match self {
            Via::Udp(_) => "udp",
            Via::Tcp(..) => "tcp",
        }
    }
    fn addr(self) -> SocketAddr {
        match self {
            Via::Udp(a) | Via::Tcp(_, a) => a,
        }
    }
}

struct Device {
    keys: Keys,
    /// Where the device last spoke from; pushed commands go there.
    link: Option<Via>,
    last_seen: Option<Instant>,
    /// The last stamp the device sent: pushed commands carry it.
    last_stamp: u32,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Device,
    Ctl,
}

struct Conn {
    stream: TcpStream,
    peer: SocketAddr,
    kind: Kind,
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
    /// WRITABLE interest is registered (only while `wbuf` holds data).
    want_write: bool,
    /// Control connection: receives every event line.
    watch: bool,
    /// Close once `wbuf` is flushed.
    closing: bool,
}

/// A bound fake cloud; [`FakeCloud::run`] serves it until stopped.
pub struct FakeCloud {
    poll: Poll,
    udp: UdpSocket,
    tcp: TcpListener,
    ctl: TcpListener,
    addr: SocketAddr,
    ctl_addr: SocketAddr,
    waker: Arc<Waker>,
    stop: Arc<AtomicBool>,
    devices: HashMap<u32, Device>,
    conns: HashMap<Token, Conn>,
    next_token: usize,
    /// (did, pushed command id) → the control connection waiting for the device's reply.
    pending: HashMap<(u32, u64), Token>,
    next_push_id: u64,
    silent: bool,
    drop_acks: bool,
    interval: u32,
    otc_list: Vec<SocketAddr>,
    assign: Option<DeviceCred>,
    /// The mac `assign` went to: the same mac asking again gets the same identity (P§5.11).
    assigned_to: Option<String>,
    didkey_retry: Option<u32>,
    /// Last drop log per source, for the 1/s limit of P§2.7.
    drop_log: HashMap<SocketAddr, Instant>,
    ubuf: Vec<u8>,
    faults: Faults,
}

impl FakeCloud {
    /// Binds UDP and TCP on `host:port` (one free port for both when `port` is 0) and the control
    /// socket on `127.0.0.1:ctl_port`.
    pub fn bind(cfg: FakeCloudConfig) -> io::Result<FakeCloud> {
        let (tcp, udp) = bind_pair(cfg.host, cfg.port)?;
        let addr = tcp.local_addr()?;
        let ctl = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, cfg.ctl_port)))
            .map_err(|e| io::Error::new(e.kind(), format!("control port {}: {e}", cfg.ctl_port)))?;
        let ctl_addr = ctl.local_addr()?;
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let mut me = FakeCloud {
            poll,
            udp,
            tcp,
            ctl,
            addr,
            ctl_addr,
            waker,
            stop: Arc::new(AtomicBool::new(false)),
            devices: HashMap::new(),
            conns: HashMap::new(),
            next_token: FIRST_CONN,
            pending: HashMap::new(),
            next_push_id: 1001,
            silent: false,
            drop_acks: false,
            interval: cfg.interval,
            otc_list: cfg.otc_list.unwrap_or_else(|| vec![addr]),
            assign: cfg.assign,
            assigned_to: None,
            didkey_retry: cfg.didkey_retry,
            drop_log: HashMap::new(),
            ubuf: vec![0; 65536],
            faults: Faults::default(),
        };
        for d in cfg.devices {
            me.add_device(d.did, &d.key);
        }
        let reg = me.poll.registry();
        reg.register(&mut me.udp, UDP, Interest::READABLE)?;
        reg.register(&mut me.tcp, TCP_LISTEN, Interest::READABLE)?;
        reg.register(&mut me.ctl, CTL_LISTEN, Interest::READABLE)?;
        Ok(me)
    }

    /// The UDP and TCP address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The control socket address.
    pub fn ctl_addr(&self) -> SocketAddr {
        self.ctl_addr
    }

    pub fn stop_handle(&self) -> StopHandle {
        StopHandle {
            waker: self.waker.clone(),
            flag: self.stop.clone(),
        }
    }

    /// Serves until the [`StopHandle`] fires. Errors only when polling itself fails.
    pub fn run(mut self) -> io::Result<()> {
        info!(
            "fakecloud: udp+tcp {} control {} devices {:?}",
            self.addr,
            self.ctl_addr,
            self.devices.keys().collect::<Vec<_>>()
        );
        let mut events = Events::with_capacity(128);
        loop {
            // Only a delayed or held packet (network faults) gives the wait an end.
            let timeout = self
                .faults
                .next_due()
                .map(|t| t.saturating_duration_since(Instant::now()));
            match self.poll.poll(&mut events, timeout) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            if self.stop.load(Ordering::SeqCst) {
                info!("fakecloud: stopped");
                return Ok(());
            }
            for ev in events.iter() {
                match ev.token() {
                    UDP => self.udp_readable(),
                    TCP_LISTEN => self.accept(Kind::Device),
                    CTL_LISTEN => self.accept(Kind::Ctl),
                    WAKER => {}
                    t => {
                        if ev.is_writable() {
                            self.flush(t);
                        }
                        if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                            self.conn_readable(t);
                        }
                    }
                }
            }
            self.run_due(Instant::now());
        }
    }

    fn add_device(&mut self, did: u32, key: &[u8; 16]) {
        let d = Device {
            keys: Keys::new(key),
            link: None,
            last_seen: None,
            last_stamp: 0,
        };
        self.devices.insert(did, d);
    }

    // ---- sockets ---------------------------------------------------------------------------

    fn udp_readable(&mut self) {
        let mut buf = std::mem::take(&mut self.ubuf);
        loop {
            match self.udp.recv_from(&mut buf) {
                Ok((n, from)) => {
                    let pkt = buf.get(..n).unwrap_or(&[]);
                    self.pass(Dir::In, Via::Udp(from), pkt);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    warn!("fakecloud: udp receive: {e}");
                    break;
                }
            }
        }
        self.ubuf = buf;
    }

    fn accept(&mut self, kind: Kind) {
        loop {
            let listener = if kind == Kind::Device {
                &self.tcp
            } else {
                &self.ctl
            };
            let (mut stream, peer) = match listener.accept() {
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    warn!("fakecloud: accept: {e}");
                    return;
                }
            };
            let (count, max) = (
                self.conns.values().filter(|c| c.kind == kind).count(),
                if kind == Kind::Device {
                    MAX_DEVICE_CONNS
                } else {
                    MAX_CTL_CONNS
                },
            );
            if count >= max {
                warn!("fakecloud: too many connections, closing {peer}");
                continue;
            }
            let t = Token(self.next_token);
            self.next_token += 1;
            if let Err(e) = self
                .poll
                .registry()
                .register(&mut stream, t, Interest::READABLE)
            {
                warn!("fakecloud: register {peer}: {e}");
                continue;
            }
            if kind == Kind::Device {
                info!("fakecloud: tcp connection from {peer}");
            } else {
                debug!("fakecloud: control connection from {peer}");
            }
            self.conns.insert(
                t,
                Conn {
                    stream,
                    peer,
                    kind,
                    rbuf: Vec::new(),
                    wbuf: Vec::new(),
                    want_write: false,
                    watch: false,
                    closing: false,
                },
            );
        }
    }

    fn conn_readable(&mut self, t: Token) {
        let mut chunk = [0u8; READ_CHUNK];
        loop {
            let Some(c) = self.conns.get_mut(&t) else {
                return;
            };
            match c.stream.read(&mut chunk) {
                Ok(0) => {
                    self.close(t, "closed by peer");
                    return;
                }
                Ok(n) => {
                    c.rbuf.extend_from_slice(chunk.get(..n).unwrap_or(&[]));
                    if c.kind == Kind::Device {
                        self.device_frames(t);
                    } else {
                        self.ctl_lines(t);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.close(t, &format!("read error: {e}"));
                    return;
                }
            }
        }
    }

    /// P§5.2: packets back to back, each framed by its length field; a length below 32 closes.
    fn device_frames(&mut self, t: Token) {
        loop {
            let Some(c) = self.conns.get_mut(&t) else {
                return;
            };
            let peer = c.peer;
            let n = match miio::stream_frame_len(&c.rbuf) {
                Ok(Some(n)) if c.rbuf.len() >= n => n,
                Ok(_) => return,
                Err(e) => {
                    self.drop_packet(Via::Tcp(t, peer), &e.to_string());
                    self.close(t, "stream framing error");
                    return;
                }
            };
            let frame: Vec<u8> = c.rbuf.drain(..n).collect();
            let control = frame.len() == CLOUD_HELLO.len();
            if self
                .faults
                .reset_tcp
                .is_some_and(|(d, c, _)| d == Dir::In && c.is_none_or(|c| c == control))
            {
                self.faults.reset_tcp = None;
                self.fault_event("reset_tcp", Dir::In, Via::Tcp(t, peer), frame.len(), None);
                self.reset_conn(t, "reset_tcp command");
                return;
            }
            self.pass(Dir::In, Via::Tcp(t, peer), &frame);
        }
    }

    fn ctl_lines(&mut self, t: Token) {
        loop {
            let Some(c) = self.conns.get_mut(&t) else {
                return;
            };
            let Some(nl) = c.rbuf.iter().position(|&b| b == b'\n') else {
                if c.rbuf.len() > MAX_CTL_LINE {
                    c.rbuf.clear();
                    self.ctl_error(t, "line too long");
                    if let Some(c) = self.conns.get_mut(&t) {
                        c.closing = true;
                    }
                    self.flush(t);
                }
                return;
            };
            let line: Vec<u8> = c.rbuf.drain(..=nl).collect();
            let text = String::from_utf8_lossy(&line);
            let text = text.trim();
            if !text.is_empty() {
                self.ctl_command(t, text);
            }
        }
    }

    /// Queues bytes on a connection and writes what the socket takes now.
    fn queue(&mut self, t: Token, bytes: &[u8]) {
        let Some(c) = self.conns.get_mut(&t) else {
            return;
        };
        if c.wbuf.len() + bytes.len() > MAX_WBUF {
            self.close(t, "peer does not read");
            return;
        }
        c.wbuf.extend_from_slice(bytes);
        self.flush(t);
    }

    fn flush(&mut self, t: Token) {
        let Some(c) = self.conns.get_mut(&t) else {
            return;
        };
        let mut failed = None;
        while !c.wbuf.is_empty() {
            match c.stream.write(&c.wbuf) {
                Ok(0) => {
                    failed = Some("write returned 0".to_string());
                    break;
                }
                Ok(n) => {
                    c.wbuf.drain(..n.min(c.wbuf.len()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    failed = Some(format!("write error: {e}"));
                    break;
                }
            }
        }
        if let Some(why) = failed {
            return self.close(t, &why);
        }
        if c.wbuf.is_empty() && c.closing {
            return self.close(t, "closing");
        }
        let want = !c.wbuf.is_empty();
        if want != c.want_write {
            let interest = if want {
                Interest::READABLE | Interest::WRITABLE
            } else {
                Interest::READABLE
            };
            match self.poll.registry().reregister(&mut c.stream, t, interest) {
                Ok(()) => c.want_write = want,
                Err(e) => self.close(t, &format!("reregister: {e}")),
            }
        }
    }

    fn close(&mut self, t: Token, why: &str) {
        let Some(mut c) = self.conns.remove(&t) else {
            return;
        };
        let _ = self.poll.registry().deregister(&mut c.stream);
        match c.kind {
            Kind::Device => {
                info!("fakecloud: tcp {} closed: {why}", c.peer);
                for d in self.devices.values_mut() {
                    if matches!(d.link, Some(Via::Tcp(tok, _)) if tok == t) {
                        d.link = None;
                    }
                }
            }
            Kind::Ctl => {
                debug!("fakecloud: control {} closed: {why}", c.peer);
                self.pending.retain(|_, tok| *tok != t);
            }
        }
    }

    /// Sends bytes back the way a packet came, through the network faults.
    fn send(&mut self, via: Via, bytes: &[u8]) {
        self.pass(Dir::Out, via, bytes);
    }

    /// Puts bytes on the wire, past the faults; `reset_tcp` (out) cuts the first TCP packet.
    fn transmit(&mut self, via: Via, bytes: &[u8]) {
        match via {
            Via::Udp(to) => {
                if let Err(e) = self.udp.send_to(bytes, to) {
                    warn!("fakecloud: udp send to {to}: {e}");
                }
            }
            Via::Tcp(t, _) => {
                let control = bytes.len() == CLOUD_HELLO.len();
                let cut = match self.faults.reset_tcp {
                    Some((Dir::Out, c, k))
                        if self.conns.contains_key(&t) && c.is_none_or(|c| c == control) =>
                    {
                        k
                    }
                    _ => return self.queue(t, bytes),
                };
                self.faults.reset_tcp = None;
                let part = bytes
                    .get(..cut.min(bytes.len().saturating_sub(1)))
                    .unwrap_or(&[]);
                self.queue(t, part);
                self.fault_event("reset_tcp", Dir::Out, via, part.len(), None);
                self.reset_conn(t, "reset_tcp command");
            }
        }
    }

    /// Closes a connection with a TCP reset (SO_LINGER 0) instead of a FIN.
    fn reset_conn(&mut self, t: Token, why: &str) {
        if let Some(c) = self.conns.get(&t) {
            if let Err(e) = crate::io::sys::set_linger_reset(c.stream.as_raw_fd()) {
                warn!("fakecloud: SO_LINGER on {}: {e}", c.peer);
            }
        }
        self.close(t, why);
    }

    // ---- network faults --------------------------------------------------------------------

    /// Every device packet passes here: `In` before it is handled, `Out` before it is sent. Drop,
    /// then duplicate, then hold (reorder), then delay; a held packet follows the next packet of its
    /// direction that the reorder rule selects.
    fn pass(&mut self, dir: Dir, via: Via, bytes: &[u8]) {
        if self.faults.idle() {
            return self.deliver(dir, via, bytes);
        }
        let control = bytes.len() == CLOUD_HELLO.len();
        if self.faults.fire(Fault::Drop, dir, control) {
            return self.fault_event("drop", dir, via, bytes.len(), None);
        }
        let copies = if self.faults.fire(Fault::Dup, dir, control) {
            self.fault_event("dup", dir, via, bytes.len(), None);
            2
        } else {
            1
        };
        let d = dir as usize;
        if self.faults.held[d].is_none() && self.faults.fire(Fault::Reorder, dir, control) {
            let ms = self.faults.rule_ms(Fault::Reorder);
            self.fault_event("hold", dir, via, bytes.len(), Some(ms));
            self.faults.held[d] = Some(Held {
                via,
                bytes: bytes.to_vec(),
                copies,
                until: Instant::now() + Duration::from_millis(ms),
            });
            return;
        }
        self.schedule(dir, via, bytes, copies);
        let next = match &self.faults.rules[Fault::Reorder as usize] {
            Some(r) => r.selects(dir, control),
            None => true,
        };
        if next {
            self.release(dir);
        }
    }

    /// A held packet goes now (after the packet that passed, or at its deadline).
    fn release(&mut self, dir: Dir) {
        if let Some(h) = self.faults.held[dir as usize].take() {
            self.fault_event("release", dir, h.via, h.bytes.len(), None);
            self.schedule(dir, h.via, &h.bytes, h.copies);
        }
    }

    /// Delivers now, or queues for later when the delay rule takes the packet.
    fn schedule(&mut self, dir: Dir, via: Via, bytes: &[u8], copies: u8) {
        let control = bytes.len() == CLOUD_HELLO.len();
        if !self.faults.fire(Fault::Delay, dir, control) {
            for _ in 0..copies {
                self.deliver(dir, via, bytes);
            }
            return;
        }
        let ms = self.faults.rule_ms(Fault::Delay);
        if self.faults.later.len() + usize::from(copies) > MAX_LATER {
            warn!("fakecloud: {MAX_LATER} packets delayed already, this one is lost");
            return self.fault_event("drop", dir, via, bytes.len(), None);
        }
        self.fault_event("delay", dir, via, bytes.len(), Some(ms));
        let due = Instant::now() + Duration::from_millis(ms);
        for _ in 0..copies {
            self.faults.seq += 1;
            let seq = self.faults.seq;
            self.faults.later.push(Later {
                due,
                seq,
                dir,
                via,
                bytes: bytes.to_vec(),
            });
        }
    }

    fn deliver(&mut self, dir: Dir, via: Via, bytes: &[u8]) {
        match dir {
            Dir::In => self.handle_packet(via, bytes),
            Dir::Out => self.transmit(via, bytes),
        }
    }

    /// Held packets whose hold ended, then delayed packets that are due, in order.
    fn run_due(&mut self, now: Instant) {
        for dir in [Dir::In, Dir::Out] {
            if self.faults.held[dir as usize]
                .as_ref()
                .is_some_and(|h| h.until <= now)
            {
                self.release(dir);
            }
        }
        while let Some(i) = self.faults.first_due(now) {
            let l = self.faults.later.swap_remove(i);
            self.deliver(l.dir, l.via, &l.bytes);
        }
    }

    fn fault_event(&mut self, what: &str, dir: Dir, via: Via, len: usize, ms: Option<u64>) {
        debug!(
            "fakecloud: fault {what} {} {} {} bytes",
            dir.name(),
            via.transport(),
            len
        );
        let mut ev = json!({"ev":"fault","fault":what,"dir":dir.name(),
            "transport":via.transport(),"len":len});
        if let (Some(ms), Value::Object(m)) = (ms, &mut ev) {
            m.insert("ms".into(), ms.into());
        }
        self.event(ev);
    }

    /// `drop`, `dup`, `reorder`, `delay`: sets (or with `"n":0` removes) the rule of that fault.
    fn ctl_fault(&mut self, t: Token, fault: Fault, cmd: &Map<String, Value>) {
        match Rule::parse(fault, cmd) {
            Ok(r) => {
                info!("fakecloud: fault {}", r.describe());
                let slot = &mut self.faults.rules[fault as usize];
                *slot = (r.left != Some(0)).then_some(r);
                if fault == Fault::Reorder && slot.is_none() {
                    self.release(Dir::In);
                    self.release(Dir::Out);
                }
                self.ctl_ok(t);
            }
            Err(e) => self.ctl_error(t, &e),
        }
    }

    fn ctl_reset_tcp(&mut self, t: Token, cmd: &Map<String, Value>) {
        let dir = match cmd.get("dir").and_then(Value::as_str) {
            None | Some("out") => Dir::Out,
            Some("in") => Dir::In,
            Some(_) => return self.ctl_error(t, "\"dir\" must be \"in\" or \"out\""),
        };
        let control = match parse_kind(cmd) {
            Ok(c) => c,
            Err(e) => return self.ctl_error(t, &e),
        };
        let after = match cmd.get("after") {
            None => DEFAULT_CUT,
            Some(v) => match v.as_u64().and_then(|k| usize::try_from(k).ok()) {
                Some(k) => k,
                None => return self.ctl_error(t, "\"after\" must be a byte count"),
            },
        };
        info!("fakecloud: reset_tcp {} after {after} bytes", dir.name());
        self.faults.reset_tcp = Some((dir, control, after));
        self.ctl_ok(t);
    }

    // ---- the cloud side of P§5 -------------------------------------------------------------

    /// One received packet, checked in the P§2.7 order.
    fn handle_packet(&mut self, via: Via, buf: &[u8]) {
        // Steps 1–3: size, magic, length field.
        let pkt = match Packet::new_checked(buf) {
            Ok(p) => p,
            Err(e) => return self.drop_packet(via, &e.to_string()),
        };
        // Step 4: control packets (P§2.6).
        if pkt.is_control() {
            if buf == CLOUD_HELLO {
                return self.hello(via);
            }
            if pkt.ids_all_ff() {
                return self.drop_packet(via, "hello-like packet that is not the cloud hello");
            }
            return self.keepalive(via, &pkt, buf);
        }
        // Step 5: did, MD5, payload, decrypt, unpad, JSON object.
        let did = pkt.did();
        let Some(dev) = self.devices.get(&did) else {
            return self.drop_packet(via, &format!("OT device id not match. (unknown did {did})"));
        };
        let opened = match miio::open(&dev.keys, did, &pkt) {
            Ok(o) => o,
            Err(e) => return self.drop_packet(via, &e.to_string()),
        };
        self.seen(did, via, pkt.stamp());
        self.log_msg(did, via, "<-", &opened.value);
        self.dispatch(did, via, pkt.stamp(), opened.value);
    }

    fn hello(&mut self, via: Via) {
        info!("fakecloud: {} {} <- hello", via.transport(), via.addr());
        self.event(json!({"ev":"hello","transport":via.transport(),"addr":via.addr().to_string()}));
        if self.silent {
            return;
        }
        // P§5.3: the device sets its stamp offset from this; wall-clock Unix seconds.
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.send(via, &miio::time_sync_reply(now as u32));
    }

    /// P§2.6/§5.6: a keepalive of a known did with a valid MD5 is echoed unchanged.
    fn keepalive(&mut self, via: Via, pkt: &Packet<&[u8]>, buf: &[u8]) {
        let did = pkt.did();
        let Some(dev) = self.devices.get(&did) else {
            return self.drop_packet(via, &format!("OT device id not match. (unknown did {did})"));
        };
        if !miio::control_md5_ok(&dev.keys, pkt) {
            return self.drop_packet(via, "OT MD5 not match. (keepalive)");
        }
        self.seen(did, via, pkt.stamp());
        debug!("fakecloud: did {did} {} <- keepalive", via.transport());
        self.event(json!({"ev":"keepalive","did":did,"transport":via.transport()}));
        if !self.silent {
            self.send(via, buf);
        }
    }

    fn seen(&mut self, did: u32, via: Via, stamp: u32) {
        if let Some(d) = self.devices.get_mut(&did) {
            d.link = Some(via);
            d.last_seen = Some(Instant::now());
            d.last_stamp = stamp;
        }
    }

    fn dispatch(&mut self, did: u32, via: Via, stamp: u32, msg: Map<String, Value>) {
        let (method, id) = match rpc::classify(&msg) {
            rpc::Kind::Request { method, id } => (method.to_string(), id.cloned()),
            rpc::Kind::Reply { id } => {
                let id = id.clone();
                return self.device_reply(did, id, msg);
            }
            rpc::Kind::Other => {
                info!("fakecloud: did {did}: neither a request nor a reply, ignored");
                return;
            }
        };
        let Some(id) = id.filter(Value::is_number) else {
            info!("fakecloud: did {did}: {method} has no id, not acked");
            return;
        };
        if self.silent || self.drop_acks {
            info!("fakecloud: did {did}: ack of {method} id {id} dropped on purpose");
            return;
        }
        let reply = match method.as_str() {
            "_otc.info" => {
                let list: Vec<Value> = self
                    .otc_list
                    .iter()
                    .map(|a| json!({"ip": a.ip().to_string(), "port": a.port()}))
                    .collect();
                json!({"id": id, "result": {"otc_list": list,
                    "otc_test": {"list": [], "interval": self.interval, "firsttest": FIRSTTEST}}})
            }
            "_otc.didkey_req" => self.didkey(did, id, msg.get("params")),
            _ => json!({"id": id, "result": "ok"}),
        };
        self.send_json(did, via, stamp, &reply);
    }

    /// P§5.11: hand out the configured identity (and accept it from now on), or ask to retry
    /// later. The request must come from a bootstrap did (0 or 1) whose `type` says the same, and
    /// name its mac: the identity goes to one mac, and that mac asking again (a device that lost
    /// the answer, or restarted before it stored it) gets the same one.
    fn didkey(&mut self, did: u32, id: Value, params: Option<&Value>) -> Value {
        let refuse = |me: &mut Self, code: i64, why: &str| {
            warn!("fakecloud: did {did}: didkey request refused: {why}");
            me.event(json!({"ev":"didkey","did":did,"result":"error","message":why}));
            json!({"id": id, "error": {"code": code, "message": why}})
        };
        if did >= 2 {
            return refuse(self, -32600, "not a bootstrap did");
        }
        let ty = params.and_then(|p| p.get("type")).and_then(Value::as_u64);
        if ty != Some(u64::from(did)) {
            return refuse(self, -32602, "params.type is not the did of the header");
        }
        let Some(mac) = params
            .and_then(|p| p.get("mac"))
            .and_then(Value::as_str)
            .map(str::to_ascii_uppercase)
        else {
            return refuse(self, -32602, "params.mac is missing");
        };
        if let Some(s) = self.didkey_retry {
            info!("fakecloud: did {did} mac {mac}: didkey request queued, retry_after {s}");
            self.event(json!({"ev":"didkey","did":did,"mac":mac,"result":"retry","retry_after":s}));
            return json!({"id": id, "result": {"retry_after": s}});
        }
        let Some(a) = self.assign.clone() else {
            return refuse(self, -10000, "no did/key to assign");
        };
        if self.assigned_to.as_ref().is_some_and(|m| *m != mac) {
            return refuse(self, -10000, "the did/key went to another mac");
        }
        info!("fakecloud: did {did} mac {mac}: assigning did {}", a.did);
        self.assigned_to = Some(mac.clone());
        self.add_device(a.did, &a.key);
        self.event(json!({"ev":"didkey","did":did,"mac":mac,"result":"assigned","assigned":a.did}));
        let key = String::from_utf8_lossy(&a.key).into_owned();
        json!({"id": id, "result": {"did": a.did, "key": key}})
    }

    /// A message without `method`: the device's answer to a pushed command.
    fn device_reply(&mut self, did: u32, id: Value, msg: Map<String, Value>) {
        let waiting = id.as_u64().and_then(|k| self.pending.remove(&(did, k)));
        let Some(t) = waiting else {
            info!("fakecloud: did {did}: reply to no pushed command (id {id})");
            return;
        };
        let line = json!({"ev":"reply","did":did,"json":Value::Object(msg)});
        self.ctl_line(t, &line);
    }

    /// Seals one JSON message for a device (D3: one NUL) and sends it the way given.
    fn send_json(&mut self, did: u32, via: Via, stamp: u32, msg: &Value) {
        let Some(dev) = self.devices.get(&did) else {
            return;
        };
        let text = msg.to_string();
        let bytes = miio::seal(&dev.keys, did, stamp, text.as_bytes());
        if bytes.is_empty() {
            warn!("fakecloud: did {did}: message too long to send");
            return;
        }
        if let Value::Object(m) = msg {
            self.log_msg(did, via, "->", m);
        }
        self.send(via, &bytes);
    }

    /// `did 123 udp <- {...}`, secrets masked unless the level is debug (P§2.5), plus a `msg` event.
    fn log_msg(&mut self, did: u32, via: Via, dir: &str, msg: &Map<String, Value>) {
        let full = Value::Object(msg.clone());
        if log_enabled!(Level::Debug) {
            debug!("did {did} {} {dir} {full}", via.transport());
        } else {
            info!("did {did} {} {dir} {}", via.transport(), redact(&full));
        }
        let dir = if dir == "<-" { "in" } else { "out" };
        self.event(json!({"ev":"msg","did":did,"transport":via.transport(),"dir":dir,"json":full}));
    }

    /// P§2.7: drop, one log line per source per second, and a `drop` event.
    fn drop_packet(&mut self, via: Via, reason: &str) {
        let now = Instant::now();
        let src = via.addr();
        let quiet = self
            .drop_log
            .get(&src)
            .is_some_and(|&t| now.duration_since(t) < Duration::from_secs(1));
        if !quiet {
            if self.drop_log.len() >= 256 {
                self.drop_log.clear();
            }
            self.drop_log.insert(src, now);
            warn!("fakecloud: {} {src}: dropped: {reason}", via.transport());
        }
        self.event(
            json!({"ev":"drop","reason":reason,"transport":via.transport(),"addr":src.to_string()}),
        );
    }

    // ---- control socket --------------------------------------------------------------------

    fn ctl_line(&mut self, t: Token, v: &Value) {
        let mut s = v.to_string();
        s.push('\n');
        self.queue(t, s.as_bytes());
    }

    fn ctl_ok(&mut self, t: Token) {
        self.ctl_line(t, &json!({"ev":"ok"}));
    }

    fn ctl_error(&mut self, t: Token, message: &str) {
        self.ctl_line(t, &json!({"ev":"error","message":message}));
    }

    /// Sends an event line to every watching control connection.
    fn event(&mut self, v: Value) {
        let watchers: Vec<Token> = self
            .conns
            .iter()
            .filter(|(_, c)| c.watch)
            .map(|(t, _)| *t)
            .collect();
        if watchers.is_empty() {
            return;
        }
        let mut s = v.to_string();
        s.push('\n');
        for t in watchers {
            self.queue(t, s.as_bytes());
        }
    }

    fn ctl_command(&mut self, t: Token, text: &str) {
        let cmd = match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(m)) => m,
            _ => return self.ctl_error(t, "not a JSON object"),
        };
        let on = cmd.get("on").and_then(Value::as_bool);
        match cmd.get("cmd").and_then(Value::as_str).unwrap_or("") {
            "send" => self.ctl_send(t, &cmd),
            "silent" => match on {
                Some(on) => {
                    info!("fakecloud: silent {on}");
                    self.silent = on;
                    self.ctl_ok(t);
                }
                None => self.ctl_error(t, "\"on\" must be true or false"),
            },
            "drop_acks" => match on {
                Some(on) => {
                    info!("fakecloud: drop_acks {on}");
                    self.drop_acks = on;
                    self.ctl_ok(t);
                }
                None => self.ctl_error(t, "\"on\" must be true or false"),
            },
            "close_tcp" => {
                let tcp: Vec<Token> = self
                    .conns
                    .iter()
                    .filter(|(_, c)| c.kind == Kind::Device)
                    .map(|(t, _)| *t)
                    .collect();
                for d in tcp {
                    self.close(d, "close_tcp command");
                }
                self.ctl_ok(t);
            }
            "drop" => self.ctl_fault(t, Fault::Drop, &cmd),
            "dup" => self.ctl_fault(t, Fault::Dup, &cmd),
            "reorder" => self.ctl_fault(t, Fault::Reorder, &cmd),
            "delay" => self.ctl_fault(t, Fault::Delay, &cmd),
            "reset_tcp" => self.ctl_reset_tcp(t, &cmd),
            "clear" => {
                info!("fakecloud: faults cleared");
                self.faults.rules = [None; 4];
                self.faults.reset_tcp = None;
                self.release(Dir::In);
                self.release(Dir::Out);
                self.ctl_ok(t);
            }
            "status" => {
                let devices: Vec<Value> = self
                    .devices
                    .iter()
                    .filter_map(|(did, d)| {
                        let via = d.link?;
                        let ms = d.last_seen.map_or(0, |s| s.elapsed().as_millis());
                        Some(json!({"did":did,"transport":via.transport(),
                            "addr":via.addr().to_string(),"last_seen_ms":ms as u64}))
                    })
                    .collect();
                let f = &self.faults;
                let rules: Vec<Value> = f.active().map(Rule::describe).collect();
                let held = f.held.iter().flatten().count();
                let reset = f.reset_tcp.map(|(d, _, _)| d.name());
                let line = json!({"ev":"status","devices":devices,"faults":rules,
                    "held":held,"delayed":f.later.len(),"reset_tcp":reset});
                self.ctl_line(t, &line);
                self.ctl_ok(t);
            }
            // P§5.11: `{"cmd":"didkey","retry_after":S}` queues the requests from now on;
            // `"retry_after":null` switches to the assignment.
            "didkey" => match cmd.get("retry_after") {
                Some(Value::Null) => {
                    info!("fakecloud: didkey requests are assigned from now on");
                    self.didkey_retry = None;
                    self.ctl_ok(t);
                }
                Some(v) => match v.as_u64().and_then(|s| u32::try_from(s).ok()) {
                    Some(s) => {
                        info!("fakecloud: didkey requests get retry_after {s} from now on");
                        self.didkey_retry = Some(s);
                        self.ctl_ok(t);
                    }
                    None => self.ctl_error(t, "\"retry_after\" must be seconds or null"),
                },
                None => self.ctl_error(t, "missing \"retry_after\""),
            },
            "watch" => {
                if let Some(c) = self.conns.get_mut(&t) {
                    c.watch = on.unwrap_or(true);
                }
                self.ctl_ok(t);
            }
            "" => self.ctl_error(t, "missing \"cmd\""),
            other => self.ctl_error(t, &format!("unknown cmd {other:?}")),
        }
    }

    /// `{"cmd":"send","did":N,"json":{…}}`: push a command; the reply comes back as `ev reply`.
    fn ctl_send(&mut self, t: Token, cmd: &Map<String, Value>) {
        let Some(Value::Object(body)) = cmd.get("json") else {
            return self.ctl_error(t, "\"json\" must be an object");
        };
        let did = match cmd.get("did") {
            Some(v) => match v.as_u64().and_then(|d| u32::try_from(d).ok()) {
                Some(d) => d,
                None => return self.ctl_error(t, "\"did\" must be a did"),
            },
            // Without a did, the only device (or the only one seen) is meant.
            None => {
                let seen: Vec<u32> = if self.devices.len() == 1 {
                    self.devices.keys().copied().collect()
                } else {
                    self.devices
                        .iter()
                        .filter(|(_, d)| d.link.is_some())
                        .map(|(k, _)| *k)
                        .collect()
                };
                match seen.as_slice() {
                    [d] => *d,
                    _ => return self.ctl_error(t, "give \"did\": several devices are known"),
                }
            }
        };
        let Some(dev) = self.devices.get(&did) else {
            return self.ctl_error(t, &format!("unknown did {did}"));
        };
        let Some(via) = dev.link else {
            return self.ctl_error(t, &format!("did {did} has not connected yet"));
        };
        let stamp = dev.last_stamp;
        let mut msg = Map::new();
        let id = match body.get("id") {
            Some(id) => id.clone(),
            None => {
                let id = self.next_push_id;
                self.next_push_id = if id >= u64::from(u32::MAX) { 1 } else { id + 1 };
                msg.insert("id".into(), id.into());
                id.into()
            }
        };
        msg.extend(body.clone());
        if let Some(k) = id.as_u64() {
            if self.pending.len() >= MAX_PENDING {
                return self.ctl_error(t, "too many commands waiting for replies");
            }
            self.pending.insert((did, k), t);
        }
        self.send_json(did, via, stamp, &Value::Object(msg));
        self.ctl_line(t, &json!({"ev":"ok","id":id}));
    }
}

// ---------------------------------------------------------------------------------------------
// Network faults: the rules and the packets they hold back

/// Which way a device packet goes: `In` from the device to the cloud, `Out` back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dir {
    In = 0,
    Out = 1,
}

impl Dir {
    fn name(self) -> &'static str {
        match self {
            Dir::In => "in",
            Dir::Out => "out",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    Drop = 0,
    Dup = 1,
    Reorder = 2,
    Delay = 3,
}

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::Drop => "drop",
            Fault::Dup => "dup",
            Fault::Reorder => "reorder",
            Fault::Delay => "delay",
        }
    }
}

/// One fault's rule: which packets it selects, how many it may still touch, with what chance.
#[derive(Clone, Copy, Debug)]
struct Rule {
    fault: Fault,
    /// Selected directions, indexed by `Dir`.
    dirs: [bool; 2],
    /// `None` every packet; `Some(true)` 32-byte control packets only; `Some(false)` data only.
    control: Option<bool>,
    /// Packets the rule may still touch; `None` is no limit.
    left: Option<u64>,
    /// A selected packet is touched when the next draw (32 bits) is below this; `None` always.
    below: Option<u64>,
    /// The splitmix64 state the draws come from (`seed`).
    rng: u64,
    /// `delay`: the delay; `reorder`: the longest hold.
    ms: u64,
}

impl Rule {
    fn parse(fault: Fault, cmd: &Map<String, Value>) -> Result<Rule, String> {
        let dirs = match cmd.get("dir").map(Value::as_str) {
            None | Some(Some("both")) => [true, true],
            Some(Some("in")) => [true, false],
            Some(Some("out")) => [false, true],
            _ => return Err("\"dir\" must be \"in\", \"out\" or \"both\"".into()),
        };
        let control = parse_kind(cmd)?;
        let left = match cmd.get("n") {
            None => None,
            Some(v) => Some(v.as_u64().ok_or("\"n\" must be a count")?),
        };
        let below = match cmd.get("rate") {
            None => None,
            Some(v) => match v.as_f64() {
                Some(r) if (0.0..=1.0).contains(&r) => Some((r * 4_294_967_296.0) as u64),
                _ => return Err("\"rate\" must be a number from 0 to 1".into()),
            },
        };
        let rng = match cmd.get("seed") {
            None => 1,
            Some(v) => v.as_u64().ok_or("\"seed\" must be an unsigned integer")?,
        };
        let ms = match (fault, cmd.get("ms")) {
            (Fault::Delay, None) => return Err("delay needs \"ms\"".into()),
            (Fault::Reorder, None) => DEFAULT_HOLD_MS,
            (_, None) => 0,
            (_, Some(v)) => match v.as_u64() {
                Some(ms) if ms <= MAX_FAULT_MS => ms,
                _ => return Err(format!("\"ms\" must be 0 to {MAX_FAULT_MS}")),
            },
        };
        Ok(Rule {
            fault,
            dirs,
            control,
            left,
            below,
            rng,
            ms,
        })
    }

    /// The packet is one this rule is about (whether or not it will touch it).
    fn selects(&self, dir: Dir, control: bool) -> bool {
        self.dirs[dir as usize] && self.control.is_none_or(|c| c == control)
    }

    /// Whether the rule touches this packet; counts it when it does.
    fn fire(&mut self, dir: Dir, control: bool) -> bool {
        if !self.selects(dir, control) || self.left == Some(0) {
            return false;
        }
        if let Some(below) = self.below {
            if splitmix64(&mut self.rng) >> 32 >= below {
                return false;
            }
        }
        if let Some(n) = self.left.as_mut() {
            *n -= 1;
        }
        true
    }

    fn describe(&self) -> Value {
        let dir = match self.dirs {
            [true, true] => "both",
            [true, false] => "in",
            _ => "out",
        };
        let kind = match self.control {
            None => "any",
            Some(true) => "control",
            Some(false) => "data",
        };
        let mut v = json!({"fault":self.fault.name(),"dir":dir,"kind":kind});
        if let Value::Object(m) = &mut v {
            if let Some(n) = self.left {
                m.insert("n".into(), n.into());
            }
            if let Some(b) = self.below {
                m.insert("rate".into(), (b as f64 / 4_294_967_296.0).into());
            }
            if matches!(self.fault, Fault::Delay | Fault::Reorder) {
                m.insert("ms".into(), self.ms.into());
            }
        }
        v
    }
}

/// `kind`: `None` for any packet, `Some(true)` for 32-byte control packets, `Some(false)` for data.
fn parse_kind(cmd: &Map<String, Value>) -> Result<Option<bool>, String> {
    match cmd.get("kind").map(Value::as_str) {
        None | Some(Some("any")) => Ok(None),
        Some(Some("data")) => Ok(Some(false)),
        Some(Some("control")) => Ok(Some(true)),
        _ => Err("\"kind\" must be \"any\", \"data\" or \"control\"".into()),
    }
}

/// splitmix64: a seeded generator good enough to pick packets, and the same on every run.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A packet `reorder` holds back, with the copies `dup` asked for.
struct Held {
    via: Via,
    bytes: Vec<u8>,
    copies: u8,
    until: Instant,
}

/// A packet `delay` holds back until `due`; `seq` keeps packets of one instant in order.
struct Later {
    due: Instant,
    seq: u64,
    dir: Dir,
    via: Via,
    bytes: Vec<u8>,
}

#[derive(Default)]
struct Faults {
    /// Indexed by `Fault`.
    rules: [Option<Rule>; 4],
    /// Indexed by `Dir`.
    held: [Option<Held>; 2],
    later: Vec<Later>,
    seq: u64,
    /// `reset_tcp`: the direction, the packets it applies to (as `Rule::control`) and, for
    /// `Out`, the bytes sent before the reset.
    reset_tcp: Option<(Dir, Option<bool>, usize)>,
}

impl Faults {
    /// The rules that may still touch a packet (a used-up one stays only to release what it
    /// holds).
    fn active(&self) -> impl Iterator<Item = &Rule> {
        self.rules.iter().flatten().filter(|r| r.left != Some(0))
    }

    /// No rule left, nothing held: packets go straight through.
    fn idle(&self) -> bool {
        self.active().next().is_none() && self.held.iter().all(Option::is_none)
    }

    fn fire(&mut self, fault: Fault, dir: Dir, control: bool) -> bool {
        self.rules[fault as usize]
            .as_mut()
            .is_some_and(|r| r.fire(dir, control))
    }

    fn rule_ms(&self, fault: Fault) -> u64 {
        self.rules[fault as usize].map_or(0, |r| r.ms)
    }

    fn next_due(&self) -> Option<Instant> {
        let held = self.held.iter().flatten().map(|h| h.until);
        held.chain(self.later.iter().map(|l| l.due)).min()
    }

    /// The index of the earliest delayed packet that is due by `now`.
    fn first_due(&self, now: Instant) -> Option<usize> {
        self.later
            .iter()
            .enumerate()
            .filter(|(_, l)| l.due <= now)
            .min_by_key(|(_, l)| (l.due, l.seq))
            .map(|(i, _)| i)
    }
}

/// Binds TCP and UDP on one port. With port 0 the kernel picks the TCP port, and UDP takes the
/// same number; if that is busy for UDP, try again.
fn bind_pair(host: IpAddr, port: u16) -> io::Result<(TcpListener, UdpSocket)> {
    let mut last = None;
    for _ in 0..if port == 0 { 20 } else { 1 } {
        let tcp = TcpListener::bind(SocketAddr::new(host, port))
            .map_err(|e| io::Error::new(e.kind(), format!("tcp {host}:{port}: {e}")))?;
        let p = tcp.local_addr()?.port();
        match UdpSocket::bind(SocketAddr::new(host, p)) {
            Ok(udp) => return Ok((tcp, udp)),
            Err(e) => last = Some(io::Error::new(e.kind(), format!("udp {host}:{p}: {e}"))),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("cannot bind")))
}

/// A copy of `v` with secret members masked, for log lines above debug (P§2.5).
fn redact(v: &Value) -> Value {
    const SECRET: [&str; 5] = ["token", "key", "bindkey", "bind_key", "passwd"];
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, v)| {
                    let v = if SECRET.contains(&k.as_str()) && v.is_string() {
                        Value::from("***")
                    } else {
                        redact(v)
                    };
                    (k.clone(), v)
                })
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(redact).collect()),
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    fn serve(s: &str) -> Result<(FakeCloudConfig, LevelFilter), String> {
        match parse_cli(&args(s))? {
            Cli::Serve(c, l) => Ok((c, l)),
            other => panic!("not serve: {other:?}"),
        }
    }

    #[test]
    fn cloud_hello_is_v7() {
        let v7 = "21310020ffffffffffffffff0000000000000000000000000000000000000000";
        let hex: String = CLOUD_HELLO.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, v7);
    }

    #[test]
    fn cli_defaults_and_pairs() {
        let (c, l) = serve("--did 1234567 --key YWJjZGVmZ2hpamts").unwrap();
        assert_eq!(c.port, 8053);
        assert_eq!(c.ctl_port, 8054);
        assert_eq!(c.interval, 1800);
        assert_eq!(c.host, IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert_eq!(l, LevelFilter::Info);
        assert_eq!(c.devices.len(), 1);
        assert_eq!(c.devices[0].did, 1234567);
        assert_eq!(&c.devices[0].key, b"YWJjZGVmZ2hpamts");

        let (c, l) = serve(
            "--port=9000 --did 5 --key AAAAAAAAAAAAAAAA --did 6 --key BBBBBBBBBBBBBBBB -l 3 \
             --interval 60 --otc-list 10.0.0.1:8053,10.0.0.2:80 --assign 77:CCCCCCCCCCCCCCCC",
        )
        .unwrap();
        assert_eq!((c.port, c.ctl_port, c.interval), (9000, 9001, 60));
        assert_eq!(l, LevelFilter::Debug);
        assert_eq!(c.devices.len(), 2);
        assert_eq!(c.otc_list.as_ref().map(Vec::len), Some(2));
        assert_eq!(c.assign.as_ref().map(|a| a.did), Some(77));
    }

    #[test]
    fn cli_errors() {
        assert!(serve("").unwrap_err().contains("no device"));
        assert!(serve("--did 5").unwrap_err().contains("pairs"));
        assert!(serve("--did 5 --key short").unwrap_err().contains("16"));
        assert!(serve("--did x --key AAAAAAAAAAAAAAAA")
            .unwrap_err()
            .contains("bad did"));
        assert!(serve("--did 4294967295 --key AAAAAAAAAAAAAAAA").is_err());
        assert!(serve("--did 5 --key AAAAAAAAAAAAAAAA --bogus").is_err());
        assert!(serve("--did 5 --key AAAAAAAAAAAAAAAA --port").is_err());
        assert!(serve("--did 5 --key AAAAAAAAAAAAAAAA --assign 1:CCCCCCCCCCCCCCCC").is_err());
        assert!(serve("--did 5 --key AAAAAAAAAAAAAAAA --port 65535").is_err());
        assert!(matches!(parse_cli(&args("-h")), Ok(Cli::Help)));
        // The key itself never appears in an error.
        let e = serve("--did 5 --key SECRETSECRET").unwrap_err();
        assert!(!e.contains("SECRET"), "{e}");
    }

    #[test]
    fn cli_client_modes() {
        match parse_cli(&args("send --did 7 --ctl-port 99 {\"method\":\"x\"}")).unwrap() {
            Cli::Client { ctl, port, did, .. } => {
                assert_eq!((ctl, port, did), (false, 99, Some(7)))
            }
            other => panic!("{other:?}"),
        }
        assert!(parse_cli(&args("send [1]")).is_err());
        assert!(parse_cli(&args("send")).is_err());
        assert!(matches!(
            parse_cli(&args("ctl {\"cmd\":\"status\"}")),
            Ok(Cli::Client { ctl: true, .. })
        ));
    }

    #[test]
    fn devices_file() {
        let d = parse_devices("# devices\n\n 12 AAAAAAAAAAAAAAAA # first\n13\tBBBBBBBBBBBBBBBB\n")
            .unwrap();
        assert_eq!(d.iter().map(|d| d.did).collect::<Vec<_>>(), vec![12, 13]);
        assert!(parse_devices("12\n").unwrap_err().contains("line 1"));
        assert!(parse_devices("\n12 AAAAAAAAAAAAAAAA x\n")
            .unwrap_err()
            .contains("line 2"));
        assert!(parse_devices("12 AAAAAAAAAAAAAAAAA\n").is_err());
    }

    #[test]
    fn debug_hides_key() {
        let d = DeviceCred {
            did: 5,
            key: *b"SECRETSECRETSECR",
        };
        assert!(!format!("{d:?}").contains("SECRET"));
    }

    fn rule(fault: Fault, v: Value) -> Result<Rule, String> {
        match v {
            Value::Object(m) => Rule::parse(fault, &m),
            _ => unreachable!(),
        }
    }

    #[test]
    fn fault_rules_parse_and_refuse() {
        let r = rule(Fault::Drop, json!({"dir":"in","kind":"data","n":2})).unwrap();
        assert_eq!(
            r.describe(),
            json!({"fault":"drop","dir":"in","kind":"data","n":2})
        );
        let r = rule(Fault::Delay, json!({"ms":150})).unwrap();
        assert_eq!(
            r.describe(),
            json!({"fault":"delay","dir":"both","kind":"any","ms":150})
        );
        assert_eq!(rule(Fault::Reorder, json!({})).unwrap().ms, DEFAULT_HOLD_MS);
        for bad in [
            json!({"dir":"up"}),
            json!({"dir":1}),
            json!({"kind":"big"}),
            json!({"n":-1}),
            json!({"n":"3"}),
            json!({"rate":1.5}),
            json!({"rate":"half"}),
            json!({"seed":-2}),
            json!({"ms":MAX_FAULT_MS + 1}),
        ] {
            assert!(rule(Fault::Drop, bad.clone()).is_err(), "{bad}");
        }
        assert!(rule(Fault::Delay, json!({})).unwrap_err().contains("ms"));
    }

    #[test]
    fn fault_rule_counts_selects_and_draws_the_same_every_run() {
        let mut r = rule(Fault::Drop, json!({"dir":"out","kind":"control","n":2})).unwrap();
        assert!(!r.fire(Dir::In, true), "other direction");
        assert!(!r.fire(Dir::Out, false), "other kind");
        assert!(r.fire(Dir::Out, true) && r.fire(Dir::Out, true));
        assert!(!r.fire(Dir::Out, true), "n used up");

        let draws = |seed: u64| {
            let mut r = rule(Fault::Drop, json!({"rate":0.3,"seed":seed})).unwrap();
            (0..1000)
                .map(|_| r.fire(Dir::In, false))
                .collect::<Vec<_>>()
        };
        let a = draws(7);
        assert_eq!(a, draws(7), "seeded: the same packets every run");
        assert_ne!(a, draws(8));
        let hits = a.iter().filter(|&&x| x).count();
        assert!((230..370).contains(&hits), "about 30%: {hits}");
        let mut never = rule(Fault::Dup, json!({"rate":0})).unwrap();
        let mut always = rule(Fault::Dup, json!({"rate":1})).unwrap();
        assert!((0..100).all(|_| !never.fire(Dir::In, true) && always.fire(Dir::In, true)));
    }

    #[test]
    fn redact_masks_secrets_at_any_depth() {
        let v = json!({"id":1,"params":{"token":"abc","mac":"m","x":[{"key":"k"}]}});
        let r = redact(&v).to_string();
        assert!(!r.contains("abc") && !r.contains("\"k\""), "{r}");
        assert!(r.contains("\"mac\":\"m\""));
    }
}
