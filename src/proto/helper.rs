//! The helper protocol (LOCAL_API.md §9, with §8 `wifi_start`, §13 offline notices, §16 did/key):
//! a sans-IO machine. No socket, no clock, no file: `handle_*(out, now, …)` in; its writes,
//! shutdowns and closes go into `out` (an [`Out`]) as it decides them, and what the helper said
//! comes out as [`Event`]s through `poll_event()`; `poll_timeout()` is its earliest deadline.
//!
//! Contract:
//! - The node asks for each step (`ask_dinfo`, `ask_token`, …) when its own state machine reaches it
//!   (L§9.3: device_init → dinfo, didkey_done → dtoken, token_done → wifi status, before each
//!   `_otc.info` → info). Each ask ends in exactly one outcome event for that step: the helper's
//!   validated answer (`Identity`, `Token`, `WifiStatus`, `Info`, …) or `UseFiles(step)`, "take this
//!   step from your own data". A helper's later answer to a step that ended in `UseFiles` still wins
//!   and yields its outcome (L§9.5); the node then restarts from that step if a value changed.
//!   Outcomes may therefore repeat; the node acts on changes only.
//! - Messages for the helper wait in a FIFO that keeps only the latest of each kind. Requests that
//!   expect an answer stay at the head and are written again on each hello until answered or until
//!   `timeout`; every other message is removed once written (L§9.2).
//! - A connection that sends `_internal.hello` is *the* helper channel; a newer one replaces (and
//!   closes) the older. It gets exactly one message, then its write side is shut.
//! - A helper is present once `_internal.hello` or `_internal.helper_ready` arrived. If none is when
//!   `grace` ends, every pending and later step ends in `UseFiles` at once, until a helper appears;
//!   then the identity step is asked again, since the helper's answers take precedence (L§9.5).
//! - Nothing here panics on any message; invalid answers are logged and ignored. The token, the key
//!   and the Wi-Fi password never reach a log line or a `Debug` output.

use std::fmt;

use log::{debug, info, warn};
use serde_json::{Map, Value};

use super::local::LocalAction;
use super::outbox::{Action, Outbox};
use crate::config::{self, device, device::DeviceConf, Secret16};
use crate::time::{Duration, Instant};
use crate::wire::rpc::Members;

/// The node's name for a local connection (its slab slot).
pub type ConnId = usize;

/// L§8: how long the daemon waits for the helper's Wi-Fi result.
const WIFI_START_LIMIT: Duration = Duration::from_secs(120);
/// L§9.2: `No helper script?` at most this often.
const NO_HELPER_EVERY: Duration = Duration::from_secs(30);
/// L§13: the offline notices come every 15 minutes; every 4th is a reload.
const OFFLINE_STEP: Duration = Duration::from_secs(15 * 60);

/// The knobs of L§18 (`-d`, `--helper-grace`, `--helper-timeout`).
#[derive(Clone, Debug)]
pub struct Config {
    /// The data dir; a missing trailing `/` is added (L§9.3: helpers concatenate).
    pub datadir: String,
    /// How long to wait for any helper before using the data files (default 2 s).
    pub grace: Duration,
    /// How long a present helper has to answer a request (default 10 s).
    pub timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            datadir: "/etc/miio/".into(),
            grace: Duration::from_secs(2),
            timeout: Duration::from_secs(10),
        }
    }
}

/// A request that expects an answer (L§9.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// `request_dinfo` → `response_dinfo`: the identity (device.conf).
    Dinfo,
    /// `request_dtoken` → `response_dtoken`: the token (device.token).
    Token,
    /// `req_wifi_conf_status` → `res_wifi_conf_status`: provisioned or not (wifi.conf).
    WifiStatus,
    /// `_internal.info` both ways: the base of `_otc.info` (P§5.4).
    Info,
    /// `req_didkeymac` → `res_didkeymac`: material for a dynamic did (L§16 step 1).
    Didkeymac,
    /// `req_didkeymac2` → `res_didkeymac2`: store the assigned did/key (L§16 step 4).
    Didkeymac2,
}

impl Step {
    fn index(self) -> usize {
        self as usize
    }

    /// The method of the daemon's request.
    pub fn request_method(self) -> &'static str {
        match self {
            Step::Dinfo => "_internal.request_dinfo",
            Step::Token => "_internal.request_dtoken",
            Step::WifiStatus => "_internal.req_wifi_conf_status",
            Step::Info => "_internal.info",
            Step::Didkeymac => "_internal.req_didkeymac",
            Step::Didkeymac2 => "_internal.req_didkeymac2",
        }
    }

    /// The method of the helper's answer.
    pub fn answer_method(self) -> &'static str {
        match self {
            Step::Dinfo => "_internal.response_dinfo",
            Step::Token => "_internal.response_dtoken",
            Step::WifiStatus => "_internal.res_wifi_conf_status",
            Step::Info => "_internal.info",
            Step::Didkeymac => "_internal.res_didkeymac",
            Step::Didkeymac2 => "_internal.res_didkeymac2",
        }
    }
}

/// One message for the helper. `Debug` shows the method and the length only: `request_dtoken`,
/// `req_didkeymac2` and `wifi_start` carry secrets.
#[derive(Clone, PartialEq, Eq)]
pub struct HelperText {
    method: &'static str,
    text: String,
}

impl HelperText {
    pub fn as_str(&self) -> &str {
        &self.text
    }
    pub fn as_bytes(&self) -> &[u8] {
        self.text.as_bytes()
    }
    pub fn method(&self) -> &'static str {
        self.method
    }
    pub fn into_string(self) -> String {
        self.text
    }
}

impl fmt::Debug for HelperText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HelperText({}, {} bytes)", self.method, self.text.len())
    }
}

/// Where the helper's effects go, in the order it decides them. The node passes its local table
/// with its [`Outbox`] (a connection the table already closed gets nothing); an `Outbox` alone
/// takes them unfiltered.
pub trait Out {
    /// Write `text` on `conn` as one write. A `shutdown_write` for the same conn always follows.
    fn write(&mut self, conn: ConnId, text: HelperText);
    /// Shut the write side of `conn` once its queued output is flushed (the one message per hello).
    fn shutdown_write(&mut self, conn: ConnId);
    /// Close `conn` (after flushing it): an older helper channel a newer hello replaced.
    fn close(&mut self, conn: ConnId);
}

impl Out for Outbox {
    fn write(&mut self, conn: ConnId, text: HelperText) {
        self.push(Action::Local(LocalAction::Send(conn, text.text.into())));
    }
    fn shutdown_write(&mut self, conn: ConnId) {
        self.push(Action::ShutdownWrite(conn));
    }
    fn close(&mut self, conn: ConnId) {
        self.push(Action::Local(LocalAction::Close(conn)));
    }
}

/// What the helper said, for the node.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// A valid `response_dinfo` (L§9.3). did 0/1 asks for the dynamic flow (L§16).
    Identity(DeviceConf),
    /// A valid `response_dtoken`: 16 `[0-9A-Za-z]`.
    Token(Secret16),
    /// `response_dcountry`: `None` for `""` or `cn` (no host prefix).
    Country(Option<String>),
    /// `res_wifi_conf_status`: true = provisioned (sta_mode), false = wifi_ap_mode.
    WifiStatus(bool),
    /// The helper's `_internal.info`, its members in the order it sent them but `method` and `id`:
    /// `params` is INFO, the others (e.g. `partner_id`) go to the top level of `_otc.info` (P§5.4).
    Info(Members),
    /// `res_didkeymac`: any JSON, as its text, passed unread to the cloud as `data` (L§16 step 1).
    DidkeyMaterial(String),
    /// `res_didkeymac2` `"ok"`: the helper stored the assigned did/key.
    DidkeyStored,
    /// `_internal.wifi_connected`, or a `wifi_start` with no helper to run it (D9).
    WifiConnected,
    /// `_internal.wifi_ap_mode` (or a client's `local.status` `wifi_ap_mode*`), or 120 s without a
    /// Wi-Fi result after `wifi_start` (L§8).
    WifiFailed,
    /// `_internal.reboot`: broadcast `reboot` (L§15).
    Reboot,
    /// Take this step from the data files / the daemon's own data (L§9.5): no helper when the
    /// grace ended, or a present helper did not answer in time.
    UseFiles(Step),
}

/// The Wi-Fi credentials and settings of a provisioning (L§8). `bind_key` is not passed on.
pub struct WifiStart<'a> {
    pub ssid: &'a str,
    pub passwd: &'a str,
    /// 0 when the phone sent none (D18); it still goes out as `"0"`.
    pub uid: u64,
    pub country_domain: &'a str,
    pub tz: &'a str,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Ask(Step),
    WifiStart,
    ConfigTz,
    /// `wifi_reconnect` and `wifi_reload` are one kind: only the latest notice waits (L§13).
    Offline,
}

struct Entry {
    kind: Kind,
    text: HelperText,
    /// Requests only: when the step falls back to the node's own data.
    deadline: Option<Instant>,
    /// Already written once (a re-hello writes a request again).
    sent: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StepState {
    /// Not asked (or answered before the last ask): answers are ignored.
    Idle,
    /// Queued, inside its timeout.
    Pending,
    /// Answered by the helper: duplicates are ignored (the vendor double-send, L§9.2).
    Answered,
    /// Ended in `UseFiles`: a late answer still wins (L§9.5).
    Fallback,
}

struct Channel {
    conn: ConnId,
    /// Its one message was written; the write side is shut.
    spent: bool,
}

struct Offline {
    start: Instant,
    next: Instant,
}

/// The helper-protocol machine.
pub struct Helper {
    cfg: Config,
    /// Queues of a few entries, so plain `Vec`s: a `VecDeque` is a copy of its ring-buffer code
    /// per element type, which the board's flash pays for (the same in `cloud`, `lan`,
    /// `downstream`).
    fifo: Vec<Entry>,
    steps: [StepState; 6],
    channel: Option<Channel>,
    present: bool,
    /// Until a helper is present or the grace has been judged.
    grace_end: Option<Instant>,
    files_mode: bool,
    no_helper_logged: Option<Instant>,
    wifi_deadline: Option<Instant>,
    offline: Option<Offline>,
    events: Vec<Event>,
}

use crate::wire::rpc::json_str;

/// D15: a zoneinfo name. 1–64 bytes of letters, digits and `_ + - . /`; not absolute; no empty,
/// `.` or `..` component. So it cannot leave the zoneinfo dir nor name the dir itself.
pub fn valid_tz(tz: &str) -> bool {
    (1..=64).contains(&tz.len())
        && tz
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_+-./".contains(&b))
        && tz
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..")
}

impl Helper {
    /// A machine started at `now`; the grace period runs from here.
    pub fn new(now: Instant, mut cfg: Config) -> Helper {
        if !cfg.datadir.ends_with('/') {
            cfg.datadir.push('/');
        }
        let grace_end = Some(now + cfg.grace);
        Helper {
            cfg,
            fifo: Vec::new(),
            steps: [StepState::Idle; 6],
            channel: None,
            present: false,
            grace_end,
            files_mode: false,
            no_helper_logged: None,
            wifi_deadline: None,
            offline: None,
            events: Vec::new(),
        }
    }

    // ---- requests (each ends in its outcome or UseFiles) ----

    /// device_init: `{"method":"_internal.request_dinfo","params":"<datadir>"}`.
    pub fn ask_dinfo(&mut self, out: &mut impl Out, now: Instant) {
        let t = format!(
            r#"{{"method":"_internal.request_dinfo","params":{}}}"#,
            json_str(&self.cfg.datadir)
        );
        self.ask(out, now, Step::Dinfo, t);
    }

    /// didkey_done: `request_dtoken` with a fresh `ntoken` and its closing brace (D9).
    pub fn ask_token(&mut self, out: &mut impl Out, now: Instant, ntoken: &Secret16) {
        let t = format!(
            r#"{{"method":"_internal.request_dtoken","params":{{"dir":{},"ntoken":{}}}}}"#,
            json_str(&self.cfg.datadir),
            json_str(&config::token::render(ntoken))
        );
        self.ask(out, now, Step::Token, t);
    }

    /// token_done: `{"method":"_internal.req_wifi_conf_status","params":"<datadir>"}`.
    pub fn ask_wifi_status(&mut self, out: &mut impl Out, now: Instant) {
        let t = format!(
            r#"{{"method":"_internal.req_wifi_conf_status","params":{}}}"#,
            json_str(&self.cfg.datadir)
        );
        self.ask(out, now, Step::WifiStatus, t);
    }

    /// Before each `_otc.info`: `{"method":"_internal.info"}`.
    pub fn ask_info(&mut self, out: &mut impl Out, now: Instant) {
        self.ask(
            out,
            now,
            Step::Info,
            r#"{"method":"_internal.info"}"#.to_string(),
        );
    }

    /// didkey_req1: `{"method":"_internal.req_didkeymac","params":"<datadir>"}` (L§16).
    pub fn ask_didkeymac(&mut self, out: &mut impl Out, now: Instant) {
        let t = format!(
            r#"{{"method":"_internal.req_didkeymac","params":{}}}"#,
            json_str(&self.cfg.datadir)
        );
        self.ask(out, now, Step::Didkeymac, t);
    }

    /// After a did/key assignment: `req_didkeymac2` with the new did and key (L§16 step 4).
    pub fn ask_didkeymac2(&mut self, out: &mut impl Out, now: Instant, did: u32, key: &Secret16) {
        let Some(key) = key.as_ascii() else {
            // A key always passed check_key; this cannot be sent as text, so the node stores it.
            self.fallback(Step::Didkeymac2);
            return;
        };
        let t = format!(
            r#"{{"method":"_internal.req_didkeymac2","params":{{"dir":{},"did":{did},"key":{}}}}}"#,
            json_str(&self.cfg.datadir),
            json_str(key)
        );
        self.ask(out, now, Step::Didkeymac2, t);
    }

    fn ask(&mut self, out: &mut impl Out, now: Instant, step: Step, text: String) {
        self.remove_kind(Kind::Ask(step));
        if !self.present {
            self.log_no_helper(now);
        }
        if self.files_mode {
            self.fallback(step);
            return;
        }
        debug!("helper: queue {}", step.request_method());
        self.steps[step.index()] = StepState::Pending;
        self.fifo.push(Entry {
            kind: Kind::Ask(step),
            text: HelperText {
                method: step.request_method(),
                text,
            },
            deadline: Some(now + self.cfg.timeout),
            sent: false,
        });
        self.pump(out, now);
    }

    fn fallback(&mut self, step: Step) {
        self.steps[step.index()] = StepState::Fallback;
        self.events.push(Event::UseFiles(step));
    }

    fn log_no_helper(&mut self, now: Instant) {
        let due = match self.no_helper_logged {
            Some(t) => now - t >= NO_HELPER_EVERY,
            None => true,
        };
        if due {
            warn!("No helper script?");
            self.no_helper_logged = Some(now);
        }
    }

    // ---- messages that expect no answer ----

    /// L§8 step 4: `_internal.wifi_start`; its result (`WifiConnected`/`WifiFailed`) comes within
    /// 120 s. Without a helper the network is managed outside the daemon: `WifiConnected` at once (D9).
    pub fn wifi_start(&mut self, out: &mut impl Out, now: Instant, p: &WifiStart<'_>) {
        if !self.present {
            crate::info_limited!(
                now,
                "no helper to start Wi-Fi; assuming the network is managed outside"
            );
            self.events.push(Event::WifiConnected);
            return;
        }
        let t = format!(
            r#"{{"method":"_internal.wifi_start","params":{{"datadir":{},"ssid":{},"passwd":{},"uid":{},"country_domain":{},"tz":{}}}}}"#,
            json_str(&self.cfg.datadir),
            json_str(p.ssid),
            json_str(p.passwd),
            json_str(&p.uid.to_string()),
            json_str(p.country_domain),
            json_str(p.tz)
        );
        self.wifi_deadline = Some(now + WIFI_START_LIMIT);
        self.enqueue(out, now, Kind::WifiStart, "_internal.wifi_start", t);
    }

    /// `miIO.config_tz` (P§4.6): queues `_internal.config_tz`. False (the caller answers
    /// `["ERROR"]`) when the tz is not a zoneinfo name (D15) or no helper is present.
    pub fn config_tz(&mut self, out: &mut impl Out, now: Instant, tz: &str) -> bool {
        if !valid_tz(tz) {
            crate::warn_limited!(
                now,
                "illegal tz {}",
                crate::config::Quoted(tz.get(..64).unwrap_or(tz))
            );
            return false;
        }
        if !self.present {
            crate::warn_limited!(now, "config_tz: no helper to set the time zone");
            return false;
        }
        let t = format!(
            r#"{{"method":"_internal.config_tz","params":{{"tz":{}}}}}"#,
            json_str(tz)
        );
        self.enqueue(out, now, Kind::ConfigTz, "_internal.config_tz", t);
        true
    }

    /// D11: the first cloud failure in STA mode starts the offline clock (a running one is kept).
    pub fn offline_start(&mut self, now: Instant) {
        if self.offline.is_none() {
            debug!("offline clock started");
            self.offline = Some(Offline {
                start: now,
                next: now + OFFLINE_STEP,
            });
        }
    }

    /// D11: `cloud_connected` or AP mode stops the clock; a notice not yet written is dropped.
    pub fn offline_stop(&mut self) {
        if self.offline.take().is_some() {
            debug!("offline clock stopped");
            self.remove_kind(Kind::Offline);
        }
    }

    fn enqueue(
        &mut self,
        out: &mut impl Out,
        now: Instant,
        kind: Kind,
        method: &'static str,
        text: String,
    ) {
        self.remove_kind(kind);
        debug!("helper: queue {method}");
        self.fifo.push(Entry {
            kind,
            text: HelperText { method, text },
            deadline: None,
            sent: false,
        });
        self.pump(out, now);
    }

    fn remove_kind(&mut self, kind: Kind) {
        self.fifo.retain(|e| e.kind != kind);
    }

    /// Writes the head of the FIFO on a waiting hello connection, if both exist.
    fn pump(&mut self, out: &mut impl Out, now: Instant) {
        let Some(ch) = self.channel.as_mut().filter(|c| !c.spent) else {
            return;
        };
        // A request stays at the head until answered: each hello gets it again.
        let (text, again) = match self.fifo.first_mut() {
            None => return,
            Some(e) if matches!(e.kind, Kind::Ask(_)) => {
                (e.text.clone(), std::mem::replace(&mut e.sent, true))
            }
            Some(_) => (self.fifo.remove(0).text, false),
        };
        ch.spent = true;
        let conn = ch.conn;
        if again {
            // A helper that says hello and never answers would write this line per hello.
            crate::info_limited!(now, "to helper again (fd {conn}): {}", text.method);
        } else {
            info!("to helper (fd {conn}): {}", text.method);
        }
        out.write(conn, text);
        out.shutdown_write(conn);
    }

    // ---- inputs ----

    /// A message from a local client whose method is `_internal.*`, or a client's `local.status`
    /// (its `wifi_ap_mode*` params count as `_internal.wifi_ap_mode`, L§5). Others are ignored.
    /// `raw` is the text `msg` was parsed from: `_internal.info` is taken from it, in its order.
    pub fn handle_message(
        &mut self,
        out: &mut impl Out,
        now: Instant,
        conn: ConnId,
        msg: &Map<String, Value>,
        raw: &[u8],
    ) {
        let Some(method) = msg.get("method").and_then(Value::as_str) else {
            return;
        };
        let params = msg.get("params").unwrap_or(&Value::Null);
        match method {
            "_internal.hello" => self.on_hello(out, now, conn),
            "_internal.helper_ready" => {
                crate::info_limited!(now, "helper ready (fd {conn})");
                self.on_present(out, now);
            }
            "_internal.response_dinfo" => self.on_answer(out, now, Step::Dinfo, msg, raw),
            "_internal.response_dtoken" => self.on_answer(out, now, Step::Token, msg, raw),
            "_internal.res_wifi_conf_status" => {
                self.on_answer(out, now, Step::WifiStatus, msg, raw)
            }
            "_internal.info" => self.on_answer(out, now, Step::Info, msg, raw),
            "_internal.res_didkeymac" => self.on_answer(out, now, Step::Didkeymac, msg, raw),
            "_internal.res_didkeymac2" => self.on_answer(out, now, Step::Didkeymac2, msg, raw),
            "_internal.response_dcountry" => match parse_country(params) {
                Ok(cc) => self.events.push(Event::Country(cc)),
                Err(why) => {
                    crate::warn_limited!(now, "invalid _internal.response_dcountry: {why}; ignored")
                }
            },
            "_internal.wifi_connected" => {
                crate::info_limited!(now, "helper: Wi-Fi connected");
                self.wifi_result();
                self.events.push(Event::WifiConnected);
            }
            "_internal.wifi_ap_mode" => self.on_wifi_failed(now),
            // L§5: a client's wifi_ap_mode* notice; any other value is ignored.
            "local.status"
                if params
                    .as_str()
                    .is_some_and(|v| v.starts_with("wifi_ap_mode")) =>
            {
                self.on_wifi_failed(now)
            }
            "_internal.reboot" => {
                crate::info_limited!(now, "helper: reboot");
                self.events.push(Event::Reboot);
            }
            m if m.starts_with("_internal.res_wifi_")
                || m == "_internal.process_wifistart"
                || m == "_internal.record_offline"
                || m == "_internal.response_offline" =>
            {
                crate::info_limited!(now, "helper: {m}");
            }
            m if m.starts_with("_internal.") => {
                crate::info_limited!(now, "unknown helper message {m}, ignored")
            }
            _ => {}
        }
    }

    /// `conn` is gone (EOF, error or closed by the node).
    pub fn handle_closed(&mut self, conn: ConnId) {
        if self.channel.as_ref().is_some_and(|c| c.conn == conn) {
            self.channel = None;
        }
    }

    /// Fires what is due at `now`; an extra call is a no-op.
    pub fn handle_timeout(&mut self, out: &mut impl Out, now: Instant) {
        if self.grace_end.is_some_and(|g| now >= g) {
            self.grace_end = None;
            if !self.present {
                self.enter_files_mode();
            }
        }
        while let Some(pos) = self
            .fifo
            .iter()
            .position(|e| e.deadline.is_some_and(|d| d <= now))
        {
            if let Entry {
                kind: Kind::Ask(step),
                ..
            } = self.fifo.remove(pos)
            {
                warn!(
                    "helper did not answer {} within {}; using own data",
                    step.request_method(),
                    self.cfg.timeout
                );
                self.fallback(step);
            }
        }
        if self.wifi_deadline.is_some_and(|d| now >= d) {
            warn!("no Wi-Fi result from the helper within 120 s");
            self.wifi_deadline = None;
            self.remove_kind(Kind::WifiStart);
            self.events.push(Event::WifiFailed);
        }
        self.fire_offline(out, now);
        // A removed head may uncover a message for a waiting hello.
        self.pump(out, now);
    }

    /// The oldest thing the helper said that the node has not taken yet.
    pub fn poll_event(&mut self) -> Option<Event> {
        (!self.events.is_empty()).then(|| self.events.remove(0))
    }

    /// The earliest deadline: grace, request timeouts, the Wi-Fi limit, the next offline notice.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.fifo
            .iter()
            .filter_map(|e| e.deadline)
            .chain(self.grace_end)
            .chain(self.wifi_deadline)
            .chain(self.offline.as_ref().map(|o| o.next))
            .min()
    }

    // ---- queries ----

    /// `conn` is the current hello connection: it never gets broadcasts nor commands (D6).
    pub fn is_helper_conn(&self, conn: ConnId) -> bool {
        self.channel.as_ref().is_some_and(|c| c.conn == conn)
    }

    /// A helper has said hello or helper_ready.
    pub fn present(&self) -> bool {
        self.present
    }

    /// A request is inside its timeout, or a `wifi_start` awaits its result: a suspend must wait
    /// (L§12 `wakeup_time` 0).
    pub fn busy(&self) -> bool {
        self.wifi_deadline.is_some() || self.fifo.iter().any(|e| e.deadline.is_some())
    }

    // ---- internals ----

    fn on_hello(&mut self, out: &mut impl Out, now: Instant, conn: ConnId) {
        match self.channel.take() {
            Some(old) if old.conn != conn => {
                crate::info_limited!(now, "new fd: {conn}, close last fd: {}", old.conn);
                out.close(old.conn);
            }
            Some(old) if old.spent => {
                // Its write side is shut: nothing more can go there.
                debug!("hello again on spent fd {conn}, ignored");
                self.channel = Some(old);
                return;
            }
            _ => {}
        }
        self.channel = Some(Channel { conn, spent: false });
        self.on_present(out, now);
        self.pump(out, now);
    }

    fn on_present(&mut self, out: &mut impl Out, now: Instant) {
        self.present = true;
        self.grace_end = None;
        if self.files_mode {
            // L§9.5: the helper's answers take precedence over the files.
            self.files_mode = false;
            if self.steps[Step::Dinfo.index()] == StepState::Fallback {
                info!("helper appeared; asking it for the identity again");
                self.ask_dinfo(out, now);
            }
        }
    }

    fn enter_files_mode(&mut self) {
        warn!("No helper script? using data files");
        self.files_mode = true;
        let mut i = 0;
        while i < self.fifo.len() {
            match self.fifo.get(i).map(|e| e.kind) {
                Some(Kind::Ask(step)) => {
                    self.fifo.remove(i);
                    self.fallback(step);
                }
                _ => i += 1,
            }
        }
    }

    /// `raw`: the text of `msg`, read for `Step::Info` (its members in order).
    fn on_answer(
        &mut self,
        out: &mut impl Out,
        now: Instant,
        step: Step,
        msg: &Map<String, Value>,
        raw: &[u8],
    ) {
        let state = self.steps[step.index()];
        if matches!(state, StepState::Idle | StepState::Answered) {
            debug!("{}: not awaited, ignored", step.answer_method());
            return;
        }
        let params = msg.get("params").unwrap_or(&Value::Null);
        let parsed = match step {
            Step::Dinfo => parse_dinfo(params).map(Event::Identity),
            Step::Token => parse_token(params).map(Event::Token),
            Step::WifiStatus => Ok(Event::WifiStatus(
                params.as_u64() == Some(1) || params.as_str() == Some("1"),
            )),
            Step::Info => match (params, Members::of_object(raw)) {
                (Value::Object(_), Some(m)) => {
                    let mut info = Members::new();
                    for (k, v) in m.iter().filter(|(k, _)| !matches!(*k, "method" | "id")) {
                        info.set(k, v.to_owned());
                    }
                    Ok(Event::Info(info))
                }
                _ => Err("params not an object".to_string()),
            },
            // The material's own text, unread (no serializer linked for it).
            Step::Didkeymac => Ok(Event::DidkeyMaterial(
                Members::of_object(raw)
                    .and_then(|m| m.get("params").map(str::to_owned))
                    .unwrap_or_else(|| "null".into()),
            )),
            Step::Didkeymac2 => match params.as_str() {
                Some("ok") => Ok(Event::DidkeyStored),
                _ => Err("params is not \"ok\"".to_string()),
            },
        };
        match parsed {
            // Still at the head of the FIFO if pending: written again on the next hello.
            Err(why) => {
                crate::warn_limited!(now, "invalid {}: {why}; ignored", step.answer_method())
            }
            Ok(action) => {
                if state == StepState::Fallback {
                    info!("late {} from the helper: it wins", step.answer_method());
                } else {
                    info!("helper answered {}", step.answer_method());
                }
                self.steps[step.index()] = StepState::Answered;
                self.remove_kind(Kind::Ask(step));
                self.events.push(action);
                self.pump(out, now);
            }
        }
    }

    fn on_wifi_failed(&mut self, now: Instant) {
        crate::info_limited!(now, "helper: Wi-Fi failed");
        self.wifi_result();
        self.events.push(Event::WifiFailed);
    }

    /// A Wi-Fi result ends the wait; a `wifi_start` not yet written is moot.
    fn wifi_result(&mut self) {
        self.wifi_deadline = None;
        self.remove_kind(Kind::WifiStart);
    }

    fn fire_offline(&mut self, out: &mut impl Out, now: Instant) {
        let Some(o) = self.offline.as_mut() else {
            return;
        };
        if now < o.next {
            return;
        }
        // After a long suspend only the latest due notice goes out (L§12: fire once).
        let k = (now - o.start).millis() / OFFLINE_STEP.millis();
        o.next = o.start + Duration::from_millis(OFFLINE_STEP.millis().saturating_mul(k + 1));
        let method = if k.is_multiple_of(4) {
            "_internal.wifi_reload"
        } else {
            "_internal.wifi_reconnect"
        };
        let minutes = k.saturating_mul(15);
        if self.present {
            info!("offline for {minutes} min: {method}");
            let t = format!(r#"{{"method":"{method}","params":""}}"#);
            self.enqueue(out, now, Kind::Offline, method, t);
        } else {
            info!("offline for {minutes} min; no helper for {method}");
        }
    }
}

/// Collection sizes for the month simulation (`proto::sim`): each must stay bounded.
#[cfg(test)]
impl Helper {
    pub(crate) fn debug_sizes(&self, out: &mut Vec<(&'static str, usize)>) {
        out.extend([
            ("helper.fifo", self.fifo.len()),
            ("helper.events", self.events.len()),
        ]);
    }
}

/// L§9.3: did (JSON integer or decimal string, u32), key (16 printable ASCII), mac, model (1–23),
/// vendor (≤ 16, may be absent). Reasons never contain the key.
fn parse_dinfo(p: &Value) -> Result<DeviceConf, String> {
    let o = p.as_object().ok_or("params not an object")?;
    let did = match o.get("did") {
        Some(Value::Number(n)) => n
            .as_u64()
            .and_then(|d| u32::try_from(d).ok())
            .ok_or_else(|| format!("did must be 0..4294967295 (got {n})"))?,
        Some(Value::String(s)) => device::check_did(s)?,
        _ => return Err("did missing".into()),
    };
    let field = |k: &str| {
        o.get(k)
            .and_then(Value::as_str)
            .ok_or_else(|| format!("{k} missing or not a string"))
    };
    let key = device::check_key(field("key")?)?;
    let mac = device::check_mac(field("mac")?)?;
    let model = field("model")?;
    device::check_model(model)?;
    let vendor = match o.get("vendor") {
        None | Some(Value::Null) => "",
        Some(Value::String(v)) => v,
        Some(_) => return Err("vendor not a string".into()),
    };
    device::check_vendor(vendor)?;
    Ok(DeviceConf {
        did,
        key,
        mac,
        vendor: vendor.to_string(),
        model: model.to_string(),
    })
}

/// L§9.3: exactly 16 `[0-9A-Za-z]`. The reason never contains the token.
fn parse_token(p: &Value) -> Result<Secret16, String> {
    let bad = || "token must be 16 characters [0-9A-Za-z]".to_string();
    let s = p.as_str().filter(|s| config::token::is_valid_token_str(s));
    let raw: [u8; 16] = s
        .and_then(|s| s.as_bytes().try_into().ok())
        .ok_or_else(bad)?;
    Ok(Secret16::new(raw))
}

/// L§9.4: `""` or `cn` mean none; otherwise `[a-z]{1,7}`.
fn parse_country(p: &Value) -> Result<Option<String>, String> {
    let s = p.as_str().ok_or("params not a string")?;
    if s.contains(['\r', '\n']) {
        return Err("illegal country domain.".into());
    }
    config::country::parse(s).map_err(|e| e.reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1000;
    const MIN: u64 = 60 * SEC;

    fn at(ms: u64) -> Instant {
        Instant::from_millis(ms)
    }

    fn cfg() -> Config {
        Config {
            datadir: "/data/miio".into(),
            ..Config::default()
        }
    }

    fn obj(s: &str) -> Map<String, Value> {
        match serde_json::from_str(s) {
            Ok(Value::Object(m)) => m,
            other => panic!("not an object: {s} ({other:?})"),
        }
    }

    /// What a call produced, effects and events in one list (effects first) for the assertions.
    #[derive(Clone, Debug, PartialEq)]
    enum Action {
        HelperWrite { conn: ConnId, text: HelperText },
        ShutdownWrite { conn: ConnId },
        Close { conn: ConnId },
        Identity(DeviceConf),
        Token(Secret16),
        Country(Option<String>),
        WifiStatus(bool),
        Info(Members),
        DidkeyMaterial(String),
        DidkeyStored,
        WifiConnected,
        WifiFailed,
        Reboot,
        UseFiles(Step),
    }

    impl From<Event> for Action {
        fn from(e: Event) -> Action {
            match e {
                Event::Identity(d) => Action::Identity(d),
                Event::Token(t) => Action::Token(t),
                Event::Country(c) => Action::Country(c),
                Event::WifiStatus(p) => Action::WifiStatus(p),
                Event::Info(m) => Action::Info(m),
                Event::DidkeyMaterial(v) => Action::DidkeyMaterial(v),
                Event::DidkeyStored => Action::DidkeyStored,
                Event::WifiConnected => Action::WifiConnected,
                Event::WifiFailed => Action::WifiFailed,
                Event::Reboot => Action::Reboot,
                Event::UseFiles(s) => Action::UseFiles(s),
            }
        }
    }

    /// Records the helper's effects in order.
    #[derive(Default)]
    struct Rec(Vec<Action>);

    impl Out for Rec {
        fn write(&mut self, conn: ConnId, text: HelperText) {
            self.0.push(Action::HelperWrite { conn, text });
        }
        fn shutdown_write(&mut self, conn: ConnId) {
            self.0.push(Action::ShutdownWrite { conn });
        }
        fn close(&mut self, conn: ConnId) {
            self.0.push(Action::Close { conn });
        }
    }

    /// The machine with a recorder for its effects, driven like the node drives it.
    struct H {
        h: Helper,
        o: Rec,
    }

    impl std::ops::Deref for H {
        type Target = Helper;
        fn deref(&self) -> &Helper {
            &self.h
        }
    }

    impl std::ops::DerefMut for H {
        fn deref_mut(&mut self) -> &mut Helper {
            &mut self.h
        }
    }

    impl H {
        fn new(now: Instant, cfg: Config) -> H {
            H {
                h: Helper::new(now, cfg),
                o: Rec::default(),
            }
        }
        fn ask_dinfo(&mut self, now: Instant) {
            self.h.ask_dinfo(&mut self.o, now)
        }
        fn ask_token(&mut self, now: Instant, ntoken: &Secret16) {
            self.h.ask_token(&mut self.o, now, ntoken)
        }
        fn ask_wifi_status(&mut self, now: Instant) {
            self.h.ask_wifi_status(&mut self.o, now)
        }
        fn ask_info(&mut self, now: Instant) {
            self.h.ask_info(&mut self.o, now)
        }
        fn ask_didkeymac(&mut self, now: Instant) {
            self.h.ask_didkeymac(&mut self.o, now)
        }
        fn ask_didkeymac2(&mut self, now: Instant, did: u32, key: &Secret16) {
            self.h.ask_didkeymac2(&mut self.o, now, did, key)
        }
        fn wifi_start(&mut self, now: Instant, p: &WifiStart<'_>) {
            self.h.wifi_start(&mut self.o, now, p)
        }
        fn config_tz(&mut self, now: Instant, tz: &str) -> bool {
            self.h.config_tz(&mut self.o, now, tz)
        }
        fn handle_message(
            &mut self,
            now: Instant,
            conn: ConnId,
            msg: &Map<String, Value>,
            raw: &[u8],
        ) {
            self.h.handle_message(&mut self.o, now, conn, msg, raw)
        }
        fn handle_timeout(&mut self, now: Instant) {
            self.h.handle_timeout(&mut self.o, now)
        }
    }

    fn drain(h: &mut H) -> Vec<Action> {
        let mut got = std::mem::take(&mut h.o.0);
        got.extend(std::iter::from_fn(|| h.h.poll_event()).map(Action::from));
        got
    }

    /// The texts written, with their conn; asserts each write is followed by its shutdown.
    fn writes(actions: &[Action]) -> Vec<(ConnId, String)> {
        let mut out = Vec::new();
        let mut it = actions.iter().peekable();
        while let Some(a) = it.next() {
            if let Action::HelperWrite { conn, text } = a {
                assert_eq!(it.next(), Some(&Action::ShutdownWrite { conn: *conn }));
                out.push((*conn, text.as_str().to_string()));
            }
        }
        out
    }

    fn hello(h: &mut H, now: u64, conn: ConnId) -> Vec<Action> {
        let hello = r#"{"method":"_internal.hello"}"#;
        h.handle_message(at(now), conn, &obj(hello), hello.as_bytes());
        drain(h)
    }

    fn send(h: &mut H, now: u64, conn: ConnId, s: &str) -> Vec<Action> {
        h.handle_message(at(now), conn, &obj(s), s.as_bytes());
        drain(h)
    }

    const DINFO: &str = r#"{"method":"_internal.request_dinfo","params":"/data/miio/"}"#;
    const GOOD_DINFO: &str = r#"{"method":"_internal.response_dinfo","params":{"did":123456789,"key":"YWJjZGVmZ2hpamts","vendor":"acme","mac":"aa:bb:cc:01:02:03","model":"acme.dev.v1"}}"#;
    const NTOKEN: &[u8; 16] = b"abcDEF0123456789";

    fn good_identity() -> DeviceConf {
        DeviceConf {
            did: 123456789,
            key: Secret16::new(*b"YWJjZGVmZ2hpamts"),
            mac: "AA:BB:CC:01:02:03".into(),
            vendor: "acme".into(),
            model: "acme.dev.v1".into(),
        }
    }

    #[test]
    fn exact_literals() {
        let mut h = H::new(at(0), cfg());
        hello(&mut h, 0, 1);
        h.ask_dinfo(at(0));
        assert_eq!(writes(&drain(&mut h)), vec![(1, DINFO.to_string())]);
        let mut h = H::new(at(0), cfg());
        hello(&mut h, 0, 1);
        h.ask_token(at(0), &Secret16::new(*NTOKEN));
        assert_eq!(
            writes(&drain(&mut h)),
            vec![(
                1,
                r#"{"method":"_internal.request_dtoken","params":{"dir":"/data/miio/","ntoken":"abcDEF0123456789"}}"#
                    .to_string()
            )]
        );
        let mut h = H::new(at(0), cfg());
        hello(&mut h, 0, 1);
        h.ask_wifi_status(at(0));
        assert_eq!(
            writes(&drain(&mut h)),
            vec![(
                1,
                r#"{"method":"_internal.req_wifi_conf_status","params":"/data/miio/"}"#.into()
            )]
        );
        let mut h = H::new(at(0), cfg());
        hello(&mut h, 0, 1);
        h.ask_info(at(0));
        assert_eq!(
            writes(&drain(&mut h)),
            vec![(1, r#"{"method":"_internal.info"}"#.into())]
        );
        let mut h = H::new(at(0), cfg());
        hello(&mut h, 0, 1);
        h.ask_didkeymac2(at(0), 77, &Secret16::new(*b"YWJjZGVmZ2hpamts"));
        assert_eq!(
            writes(&drain(&mut h)),
            vec![(
                1,
                r#"{"method":"_internal.req_didkeymac2","params":{"dir":"/data/miio/","did":77,"key":"YWJjZGVmZ2hpamts"}}"#
                    .into()
            )]
        );
        // A datadir with a quote is escaped, not spliced.
        let mut h = H::new(
            at(0),
            Config {
                datadir: "/a\"b/".into(),
                ..Config::default()
            },
        );
        hello(&mut h, 0, 1);
        h.ask_dinfo(at(0));
        assert_eq!(
            writes(&drain(&mut h)),
            vec![(
                1,
                r#"{"method":"_internal.request_dinfo","params":"/a\"b/"}"#.into()
            )]
        );
    }

    #[test]
    fn whole_startup_with_a_helper() {
        let mut h = H::new(at(0), cfg());
        // The message is due before any hello: queued; nothing written.
        h.ask_dinfo(at(0));
        assert!(drain(&mut h).is_empty());
        assert!(h.busy());
        // helper_ready marks presence before the grace ends: no fallback at 2 s.
        send(&mut h, 500, 9, r#"{"method":"_internal.helper_ready"}"#);
        h.handle_timeout(at(2 * SEC));
        assert!(drain(&mut h).is_empty());
        // First hello: the request, then the write side is shut.
        assert_eq!(writes(&hello(&mut h, 600, 1)), vec![(1, DINFO.into())]);
        h.handle_closed(1);
        // No answer yet: the next hello gets the same request again.
        assert_eq!(writes(&hello(&mut h, 900, 2)), vec![(2, DINFO.into())]);
        h.handle_closed(2);
        // The answer on another (send_line) connection.
        assert_eq!(
            send(&mut h, 1000, 3, GOOD_DINFO),
            vec![Action::Identity(good_identity())]
        );
        assert!(!h.busy());
        // A hello waits with an empty FIFO; the token request goes out on it as soon as it is due.
        assert!(hello(&mut h, 1100, 4).is_empty());
        h.ask_token(at(1200), &Secret16::new(*NTOKEN));
        let w = writes(&drain(&mut h));
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].0, 4);
        assert!(w[0]
            .1
            .starts_with(r#"{"method":"_internal.request_dtoken""#));
        // A duplicate dinfo answer (vendor double-send) is ignored.
        assert!(send(&mut h, 1250, 5, GOOD_DINFO).is_empty());
        h.handle_closed(4);
        assert_eq!(
            send(
                &mut h,
                1300,
                6,
                r#"{"method":"_internal.response_dtoken","params":"abcDEF0123456789"}"#
            ),
            vec![Action::Token(Secret16::new(*NTOKEN))]
        );
        assert_eq!(
            send(
                &mut h,
                1301,
                6,
                r#"{"method":"_internal.response_dcountry","params":"de"}"#
            ),
            vec![Action::Country(Some("de".into()))]
        );
        h.ask_wifi_status(at(1400));
        let w = writes(&hello(&mut h, 1500, 7));
        assert_eq!(
            w[0].1,
            r#"{"method":"_internal.req_wifi_conf_status","params":"/data/miio/"}"#
        );
        h.handle_closed(7);
        assert_eq!(
            send(
                &mut h,
                1600,
                8,
                r#"{"method":"_internal.res_wifi_conf_status","params":1}"#
            ),
            vec![Action::WifiStatus(true)]
        );
        // Before _otc.info.
        h.ask_info(at(1700));
        assert_eq!(
            writes(&hello(&mut h, 1800, 10)),
            vec![(10, r#"{"method":"_internal.info"}"#.into())]
        );
        let got = send(
            &mut h,
            1900,
            11,
            r#"{"method":"_internal.info","partner_id":"","params":{"hw_ver":"Linux","fw_ver":"2.1.1_9527","ap":{"ssid":"s","bssid":"AA:BB:CC:00:11:22"},"netif":{"localIp":"1.2.3.4","mask":"255.0.0.0","gw":"1.0.0.1"}}}"#,
        );
        match got.as_slice() {
            [Action::Info(m)] => assert_eq!(
                m.iter().collect::<Vec<_>>(),
                [
                    ("partner_id", r#""""#),
                    (
                        "params",
                        r#"{"hw_ver":"Linux","fw_ver":"2.1.1_9527","ap":{"ssid":"s","bssid":"AA:BB:CC:00:11:22"},"netif":{"localIp":"1.2.3.4","mask":"255.0.0.0","gw":"1.0.0.1"}}"#
                    )
                ]
            ),
            other => panic!("{other:?}"),
        }
        // Nothing left to time out.
        h.handle_timeout(at(60 * SEC));
        assert!(drain(&mut h).is_empty());
        assert_eq!(h.poll_timeout(), None);
    }

    #[test]
    fn without_a_helper_files_at_exactly_the_grace() {
        let mut h = H::new(at(0), cfg());
        h.ask_dinfo(at(0));
        assert_eq!(h.poll_timeout(), Some(at(2 * SEC)));
        h.handle_timeout(at(2 * SEC - 1));
        assert!(drain(&mut h).is_empty());
        h.handle_timeout(at(2 * SEC));
        assert_eq!(drain(&mut h), vec![Action::UseFiles(Step::Dinfo)]);
        // Every later step at once.
        h.ask_token(at(2 * SEC), &Secret16::new(*NTOKEN));
        h.ask_wifi_status(at(2 * SEC));
        h.ask_info(at(3 * SEC));
        assert_eq!(
            drain(&mut h),
            vec![
                Action::UseFiles(Step::Token),
                Action::UseFiles(Step::WifiStatus),
                Action::UseFiles(Step::Info)
            ]
        );
        assert!(!h.busy());
        assert_eq!(h.poll_timeout(), None);
        // No helper: Wi-Fi is someone else's business; config_tz cannot be done; notices only logged.
        h.wifi_start(
            at(4 * SEC),
            &WifiStart {
                ssid: "s",
                passwd: "p",
                uid: 0,
                country_domain: "",
                tz: "",
            },
        );
        assert_eq!(drain(&mut h), vec![Action::WifiConnected]);
        assert!(!h.config_tz(at(0), "Europe/Berlin"));
        h.offline_start(at(5 * SEC));
        h.handle_timeout(at(5 * SEC + 15 * MIN));
        assert!(drain(&mut h).is_empty());
    }

    #[test]
    fn a_late_answer_still_wins() {
        let mut h = H::new(at(0), cfg());
        send(&mut h, 0, 9, r#"{"method":"_internal.helper_ready"}"#);
        h.ask_dinfo(at(100));
        assert_eq!(h.poll_timeout(), Some(at(10_100)));
        h.handle_timeout(at(10_099));
        assert!(drain(&mut h).is_empty());
        h.handle_timeout(at(10_100));
        assert_eq!(drain(&mut h), vec![Action::UseFiles(Step::Dinfo)]);
        // The request is gone: a hello now waits.
        assert!(hello(&mut h, 11_000, 1).is_empty());
        assert_eq!(
            send(&mut h, 12_000, 2, GOOD_DINFO),
            vec![Action::Identity(good_identity())]
        );
        // Once answered, a repeat is ignored.
        assert!(send(&mut h, 12_001, 2, GOOD_DINFO).is_empty());
        // An answer to a step never asked is ignored.
        assert!(send(
            &mut h,
            12_002,
            2,
            r#"{"method":"_internal.response_dtoken","params":"abcDEF0123456789"}"#
        )
        .is_empty());
    }

    #[test]
    fn late_answer_after_file_mode_and_a_late_helper_is_asked_again() {
        let mut h = H::new(at(0), cfg());
        h.ask_dinfo(at(0));
        h.handle_timeout(at(2 * SEC));
        assert_eq!(drain(&mut h), vec![Action::UseFiles(Step::Dinfo)]);
        // A helper turns up at 5 s: it is asked for the identity again, on its hello.
        assert_eq!(writes(&hello(&mut h, 5 * SEC, 1)), vec![(1, DINFO.into())]);
        assert_eq!(
            send(&mut h, 5 * SEC + 10, 2, GOOD_DINFO),
            vec![Action::Identity(good_identity())]
        );
        // Later steps go to the helper now.
        h.ask_token(at(6 * SEC), &Secret16::new(*NTOKEN));
        assert!(drain(&mut h).is_empty());
        assert!(h.busy());
    }

    #[test]
    fn invalid_dinfo_is_ignored_and_asked_again() {
        let mut h = H::new(at(0), cfg());
        h.ask_dinfo(at(0));
        for (conn, bad) in (1..).zip([
            r#"{"did":1,"key":"YWJjZGVmZ2hpamts","mac":"AA:BB:CC:01:02","model":"m"}"#,
            r#"{"did":1,"key":"YWJjZGVmZ2hpamt","mac":"AA:BB:CC:01:02:03","model":"m"}"#,
            r#"{"did":-1,"key":"YWJjZGVmZ2hpamts","mac":"AA:BB:CC:01:02:03","model":"m"}"#,
            r#"{"did":4294967296,"key":"YWJjZGVmZ2hpamts","mac":"AA:BB:CC:01:02:03","model":"m"}"#,
            r#"{"did":"12a","key":"YWJjZGVmZ2hpamts","mac":"AA:BB:CC:01:02:03","model":"m"}"#,
            r#"{"did":1.5,"key":"YWJjZGVmZ2hpamts","mac":"AA:BB:CC:01:02:03","model":"m"}"#,
            r#"{"key":"YWJjZGVmZ2hpamts","mac":"AA:BB:CC:01:02:03","model":"m"}"#,
            r#"{"did":1,"key":"YWJjZGVmZ2hpamts","mac":"AA:BB:CC:01:02:03","model":""}"#,
            r#"{"did":1,"key":"YWJjZGVmZ2hpamts","mac":"AA:BB:CC:01:02:03","model":"aaaaaaaaaaaaaaaaaaaaaaaa"}"#,
            r#"{"did":1,"key":"YWJjZGVmZ2hpamts","mac":"AA:BB:CC:01:02:03","model":"m","vendor":"aaaaaaaaaaaaaaaaa"}"#,
            r#"{"did":1,"key":"YWJjZGVmZ2hpam\u00e9","mac":"AA:BB:CC:01:02:03","model":"m"}"#,
            r#""not an object""#,
        ]) {
            let msg = format!(r#"{{"method":"_internal.response_dinfo","params":{bad}}}"#);
            assert!(send(&mut h, 100, 50, &msg).is_empty(), "{bad}");
            // Re-sent on the next hello.
            assert_eq!(
                writes(&hello(&mut h, 100, conn)),
                vec![(conn, DINFO.into())],
                "{bad}"
            );
            h.handle_closed(conn);
        }
        // A did as a decimal string, no vendor, did 0 (dynamic flow): all fine.
        let got = send(
            &mut h,
            200,
            50,
            r#"{"method":"_internal.response_dinfo","params":{"did":"0","key":"YWJjZGVmZ2hpamts","mac":"AA:BB:CC:01:02:03","model":"m"}}"#,
        );
        match got.as_slice() {
            [Action::Identity(d)] => {
                assert_eq!(d.did, 0);
                assert_eq!(d.vendor, "");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn invalid_token_and_info_are_ignored() {
        let mut h = H::new(at(0), cfg());
        hello(&mut h, 0, 1);
        h.ask_token(at(0), &Secret16::new(*NTOKEN));
        drain(&mut h);
        for bad in [
            r#""short""#,
            r#""abcDEF012345678!""#,
            "1234567890123456",
            "null",
        ] {
            let msg = format!(r#"{{"method":"_internal.response_dtoken","params":{bad}}}"#);
            assert!(send(&mut h, 10, 2, &msg).is_empty(), "{bad}");
        }
        h.ask_info(at(0));
        assert!(send(&mut h, 10, 2, r#"{"method":"_internal.info","params":"x"}"#).is_empty());
        assert!(h.busy());
        // Countries: "" and cn mean none; anything not [a-z]{0,7} is ignored.
        assert_eq!(
            send(
                &mut h,
                10,
                2,
                r#"{"method":"_internal.response_dcountry","params":""}"#
            ),
            vec![Action::Country(None)]
        );
        assert_eq!(
            send(
                &mut h,
                10,
                2,
                r#"{"method":"_internal.response_dcountry","params":"cn"}"#
            ),
            vec![Action::Country(None)]
        );
        for bad in [r#""DE""#, r#""abcdefgh""#, "7", r#""de\nx""#] {
            let msg = format!(r#"{{"method":"_internal.response_dcountry","params":{bad}}}"#);
            assert!(send(&mut h, 10, 2, &msg).is_empty(), "{bad}");
        }
        // res_wifi_conf_status: 1 or "1" is provisioned, anything else is not.
        h.ask_wifi_status(at(20));
        assert_eq!(
            send(
                &mut h,
                30,
                2,
                r#"{"method":"_internal.res_wifi_conf_status","params":0}"#
            ),
            vec![Action::WifiStatus(false)]
        );
        h.ask_wifi_status(at(40));
        assert_eq!(
            send(
                &mut h,
                50,
                2,
                r#"{"method":"_internal.res_wifi_conf_status","params":"1"}"#
            ),
            vec![Action::WifiStatus(true)]
        );
    }

    #[test]
    fn newer_hello_closes_the_older() {
        let mut h = H::new(at(0), cfg());
        assert!(hello(&mut h, 0, 1).is_empty());
        assert!(h.is_helper_conn(1));
        assert_eq!(hello(&mut h, 10, 2), vec![Action::Close { conn: 1 }]);
        assert!(!h.is_helper_conn(1));
        assert!(h.is_helper_conn(2));
        // The next message goes to the newer one.
        h.ask_info(at(20));
        assert_eq!(
            writes(&drain(&mut h)),
            vec![(2, r#"{"method":"_internal.info"}"#.into())]
        );
        // One message per hello: a second request waits for the next hello.
        h.ask_wifi_status(at(30));
        assert!(drain(&mut h).is_empty());
        // A hello on the spent conn itself changes nothing.
        assert!(hello(&mut h, 40, 2).is_empty());
        h.handle_closed(2);
        assert!(!h.is_helper_conn(2));
    }

    #[test]
    fn broadcast_targets_exclude_only_the_helper_channel() {
        let mut h = H::new(at(0), cfg());
        // Ordinary clients are never helper connections; answers sent via send_line don't make one.
        send(&mut h, 0, 5, GOOD_DINFO);
        assert!(!h.is_helper_conn(5));
        hello(&mut h, 0, 7);
        // The hello conn is excluded while it is waiting and after its one message.
        assert!(h.is_helper_conn(7));
        h.ask_info(at(1));
        drain(&mut h);
        assert!(h.is_helper_conn(7));
        assert!(!h.is_helper_conn(5));
        // A node that closes it (EOF) forgets it; the slot may be reused by a client.
        h.handle_closed(7);
        assert!(!h.is_helper_conn(7));
        // handle_closed of another conn does not touch the channel.
        hello(&mut h, 2, 8);
        h.handle_closed(5);
        assert!(h.is_helper_conn(8));
    }

    #[test]
    fn fifo_order_requests_block_until_answered_or_timed_out() {
        let mut h = H::new(at(0), cfg());
        send(&mut h, 0, 9, r#"{"method":"_internal.helper_ready"}"#);
        h.ask_info(at(0));
        assert!(h.config_tz(at(0), "Europe/Berlin"));
        assert!(h.config_tz(at(0), "Asia/Shanghai")); // only the latest of a kind is kept
                                                      // The request is at the head: each hello gets it until answered.
        let w = writes(&hello(&mut h, 100, 1));
        assert_eq!(w[0].1, r#"{"method":"_internal.info"}"#);
        h.handle_closed(1);
        let w = writes(&hello(&mut h, 200, 2));
        assert_eq!(w[0].1, r#"{"method":"_internal.info"}"#);
        h.handle_closed(2);
        // Unanswered until its 10 s: removed; the tz goes out on the next hello.
        h.handle_timeout(at(10 * SEC));
        assert_eq!(drain(&mut h), vec![Action::UseFiles(Step::Info)]);
        assert_eq!(
            writes(&hello(&mut h, 10 * SEC + 1, 5)),
            vec![(
                5,
                r#"{"method":"_internal.config_tz","params":{"tz":"Asia/Shanghai"}}"#.into()
            )]
        );
        // Written once, then removed: the next hello waits.
        h.handle_closed(5);
        assert!(hello(&mut h, 11 * SEC, 6).is_empty());
        assert!(!h.busy());
    }

    #[test]
    fn wifi_start_literal_and_results() {
        let mut h = H::new(at(0), cfg());
        hello(&mut h, 0, 1);
        let p = WifiStart {
            ssid: "my \"net\"",
            passwd: "secret\\pw",
            uid: 0,
            country_domain: "de",
            tz: "Europe/Berlin",
        };
        h.wifi_start(at(1000), &p);
        let got = drain(&mut h);
        assert_eq!(
            writes(&got),
            vec![(
                1,
                r#"{"method":"_internal.wifi_start","params":{"datadir":"/data/miio/","ssid":"my \"net\"","passwd":"secret\\pw","uid":"0","country_domain":"de","tz":"Europe/Berlin"}}"#
                    .into()
            )]
        );
        // The password never shows in Debug.
        assert!(!format!("{got:?}").contains("secret"), "{got:?}");
        assert!(h.busy());
        assert_eq!(h.poll_timeout(), Some(at(121_000)));
        h.handle_timeout(at(120_999));
        assert!(drain(&mut h).is_empty());
        h.handle_timeout(at(121_000));
        assert_eq!(drain(&mut h), vec![Action::WifiFailed]);
        assert!(!h.busy());

        // A helper that connects in time: WifiConnected, and no WifiFailed at 120 s.
        h.handle_closed(1);
        h.wifi_start(at(200_000), &WifiStart { uid: 42, ..p });
        let w = writes(&hello(&mut h, 201_000, 2));
        assert!(w[0].1.contains(r#""uid":"42""#));
        assert_eq!(
            send(
                &mut h,
                230_000,
                3,
                r#"{"method":"_internal.wifi_connected","params":{"ssid":"x","bssid":"y","result":"ok"}}"#
            ),
            vec![Action::WifiConnected]
        );
        h.handle_timeout(at(400_000));
        assert!(drain(&mut h).is_empty());

        // wifi_ap_mode from the helper, or a client's local.status wifi_ap_mode_2: failed.
        h.wifi_start(at(500_000), &p);
        assert_eq!(
            send(
                &mut h,
                501_000,
                3,
                r#"{"method":"_internal.wifi_ap_mode","params":null}"#
            ),
            vec![Action::WifiFailed]
        );
        assert_eq!(
            send(
                &mut h,
                502_000,
                4,
                r#"{"method":"local.status","params":"wifi_ap_mode_2"}"#
            ),
            vec![Action::WifiFailed]
        );
        assert!(send(
            &mut h,
            502_000,
            4,
            r#"{"method":"local.status","params":"cloud_connected"}"#
        )
        .is_empty());
        // The result made the queued (never written) wifi_start moot.
        h.handle_closed(2);
        assert!(hello(&mut h, 503_000, 8).is_empty());
        h.handle_timeout(at(700_000));
        assert!(drain(&mut h).is_empty());
        // 120 s without any hello: failed, and the stale message is dropped.
        h.handle_closed(8);
        h.wifi_start(at(800_000), &p);
        h.handle_timeout(at(920_000));
        assert_eq!(drain(&mut h), vec![Action::WifiFailed]);
        assert!(hello(&mut h, 921_000, 9).is_empty());
    }

    /// Runs the machine from `from` to `to`, with a helper that says hello again after each
    /// message; returns (minute, method) of every message written.
    fn run_notices(h: &mut H, from: u64, to: u64, conn: &mut ConnId) -> Vec<(u64, String)> {
        let mut out = Vec::new();
        let mut now = from;
        while let Some(next) = h.poll_timeout().map(Instant::millis).filter(|&t| t <= to) {
            now = now.max(next);
            h.handle_timeout(at(now));
            for (_, text) in writes(&drain(h)) {
                let m = obj(&text);
                assert_eq!(m["params"], "");
                out.push((now / MIN, m["method"].as_str().unwrap_or("").to_string()));
                h.handle_closed(*conn);
                *conn += 1;
                assert!(hello(h, now, *conn).is_empty());
            }
        }
        out
    }

    #[test]
    fn offline_notices_over_two_hours() {
        let mut h = H::new(at(0), cfg());
        let mut conn = 1;
        hello(&mut h, 0, conn);
        h.offline_start(at(0));
        h.offline_start(at(5 * MIN)); // a running clock is kept
        let got = run_notices(&mut h, 0, 125 * MIN, &mut conn);
        let r = "_internal.wifi_reconnect";
        let l = "_internal.wifi_reload";
        let want: Vec<(u64, String)> = [
            (15, r),
            (30, r),
            (45, r),
            (60, l),
            (75, r),
            (90, r),
            (105, r),
            (120, l),
        ]
        .iter()
        .map(|(m, s)| (*m, s.to_string()))
        .collect();
        assert_eq!(got, want);
        // Stopped by cloud_connected: no more notices.
        h.offline_stop();
        assert_eq!(h.poll_timeout(), None);
        assert!(run_notices(&mut h, 125 * MIN, 300 * MIN, &mut conn).is_empty());
    }

    #[test]
    fn only_the_latest_offline_notice_waits() {
        let mut h = H::new(at(0), cfg());
        send(&mut h, 0, 9, r#"{"method":"_internal.helper_ready"}"#);
        h.offline_start(at(0));
        for m in [15, 30, 45, 60] {
            h.handle_timeout(at(m * MIN));
        }
        assert!(drain(&mut h).is_empty());
        // One notice waits: the reload of minute 60.
        assert_eq!(
            writes(&hello(&mut h, 61 * MIN, 1)),
            vec![(
                1,
                r#"{"method":"_internal.wifi_reload","params":""}"#.into()
            )]
        );
        h.handle_closed(1);
        assert!(hello(&mut h, 62 * MIN, 2).is_empty());
        // A day asleep: one notice (the latest due), then the cycle goes on from the start.
        h.handle_closed(2);
        h.handle_timeout(at(24 * 60 * MIN + 20 * MIN));
        assert_eq!(
            writes(&hello(&mut h, 24 * 60 * MIN + 21 * MIN, 3)),
            vec![(
                3,
                r#"{"method":"_internal.wifi_reconnect","params":""}"#.into()
            )]
        );
        assert_eq!(h.poll_timeout(), Some(at(24 * 60 * MIN + 30 * MIN)));
        // A stop drops the notice not yet written.
        h.handle_closed(3);
        h.handle_timeout(at(24 * 60 * MIN + 30 * MIN));
        h.offline_stop();
        assert!(hello(&mut h, 24 * 60 * MIN + 31 * MIN, 4).is_empty());
    }

    #[test]
    fn tz_names() {
        for ok in [
            "Europe/Berlin",
            "UTC",
            "America/Argentina/Buenos_Aires",
            "Etc/GMT+8",
            "posixrules",
            "a.b",
        ] {
            assert!(valid_tz(ok), "{ok}");
        }
        let long = "a".repeat(65);
        for bad in [
            "",
            "../../etc/passwd",
            "/etc",
            "a//b",
            ".",
            "..",
            "a/",
            "a/./b",
            "a b",
            "a;b",
            "Europe/Berlin\n",
            long.as_str(),
        ] {
            assert!(!valid_tz(bad), "{bad:?}");
        }
        assert!(valid_tz(&"a".repeat(64)));
        let mut h = H::new(at(0), cfg());
        hello(&mut h, 0, 1);
        assert!(!h.config_tz(at(0), "../../etc/passwd"));
        assert!(drain(&mut h).is_empty());
        assert!(h.config_tz(at(0), "Europe/Berlin"));
        assert_eq!(
            writes(&drain(&mut h)),
            vec![(
                1,
                r#"{"method":"_internal.config_tz","params":{"tz":"Europe/Berlin"}}"#.into()
            )]
        );
    }

    #[test]
    fn didkey_steps_and_reboot() {
        let mut h = H::new(at(0), cfg());
        hello(&mut h, 0, 1);
        h.ask_didkeymac(at(0));
        assert_eq!(
            writes(&drain(&mut h)),
            vec![(
                1,
                r#"{"method":"_internal.req_didkeymac","params":"/data/miio/"}"#.into()
            )]
        );
        assert_eq!(
            send(
                &mut h,
                1,
                2,
                r#"{"method":"_internal.res_didkeymac","params":{"a":[1]}}"#
            ),
            vec![Action::DidkeyMaterial(r#"{"a":[1]}"#.into())]
        );
        h.ask_didkeymac2(at(2), 5, &Secret16::new(*b"YWJjZGVmZ2hpamts"));
        assert!(send(
            &mut h,
            3,
            2,
            r#"{"method":"_internal.res_didkeymac2","params":"no"}"#
        )
        .is_empty());
        h.handle_timeout(at(10_002));
        assert_eq!(drain(&mut h), vec![Action::UseFiles(Step::Didkeymac2)]);
        assert_eq!(
            send(
                &mut h,
                10_003,
                2,
                r#"{"method":"_internal.res_didkeymac2","params":"ok"}"#
            ),
            vec![Action::DidkeyStored]
        );
        assert_eq!(
            send(&mut h, 10_004, 2, r#"{"method":"_internal.reboot"}"#),
            vec![Action::Reboot]
        );
    }

    #[test]
    fn secrets_stay_out_of_debug() {
        let mut h = H::new(at(0), cfg());
        hello(&mut h, 0, 1);
        h.ask_token(at(0), &Secret16::new(*NTOKEN));
        let mut got = drain(&mut h);
        got.extend(send(
            &mut h,
            1,
            2,
            r#"{"method":"_internal.response_dtoken","params":"abcDEF0123456789"}"#,
        ));
        got.push(Action::Identity(good_identity()));
        let dbg = format!("{got:?}");
        assert!(!dbg.contains("abcDEF0123456789"), "{dbg}");
        assert!(!dbg.contains("YWJjZGVmZ2hpamts"), "{dbg}");
        assert!(dbg.contains("_internal.request_dtoken"), "{dbg}");
    }

    #[test]
    fn odd_messages_never_panic() {
        let methods = [
            "_internal.hello",
            "_internal.helper_ready",
            "_internal.response_dinfo",
            "_internal.response_dtoken",
            "_internal.response_dcountry",
            "_internal.res_wifi_conf_status",
            "_internal.info",
            "_internal.res_didkeymac",
            "_internal.res_didkeymac2",
            "_internal.wifi_connected",
            "_internal.wifi_ap_mode",
            "_internal.reboot",
            "_internal.res_wifi_reload",
            "_internal.debug",
            "local.status",
            "other",
        ];
        let params = [
            "null",
            "1",
            "-1",
            "1e400",
            "18446744073709551616",
            r#""""#,
            r#""\u0000""#,
            "[]",
            "{}",
            r#"{"did":{"x":1},"key":[],"mac":null}"#,
            r#"{"hw_ver":1}"#,
            "true",
        ];
        let mut h = H::new(at(0), cfg());
        let mut n = 0;
        for step in [Step::Dinfo, Step::Token, Step::WifiStatus, Step::Info] {
            match step {
                Step::Dinfo => h.ask_dinfo(at(0)),
                Step::Token => h.ask_token(at(0), &Secret16::new(*NTOKEN)),
                Step::WifiStatus => h.ask_wifi_status(at(0)),
                _ => h.ask_info(at(0)),
            }
        }
        for m in methods {
            for p in params {
                n += 1;
                let text = format!(r#"{{"method":"{m}","params":{p},"id":"x"}}"#);
                if let Ok(Value::Object(o)) = serde_json::from_str::<Value>(&text) {
                    h.handle_message(at(n), n as ConnId % 4, &o, text.as_bytes());
                }
                for s in [r#"{"method":5}"#, r#"{"params":1}"#] {
                    h.handle_message(at(n), 1, &obj(s), s.as_bytes());
                }
                h.handle_timeout(at(n * 1000));
                drain(&mut h);
            }
        }
    }
}
