//! miio_ota's core (LOCAL_API.md §14): the OTA agent's state machine, sans-IO like `proto::agent`.
//! The applet reports what happened (a complete JSON value from the daemon or the agent, a line the
//! download command printed, a child's exit, the connection's fate, SIGTERM); this machine decides,
//! names its one deadline in [`Ota::poll_timeout`], and carries out its effects through the [`Io`]
//! it owns, at the moment it decides them (no queue between, as in `proto::agent`).
//!
//! Contract:
//! - It answers `miIO.ota`, `miIO.get_ota_state` and `miIO.get_ota_progress`, reads `local.status`,
//!   and is silent on every other message (L§4.1).
//! - At most one child runs: the `--busy-cmd` check, the download or the install. A download (and
//!   the check) has a deadline, after which its whole process group is killed; an install is never
//!   interrupted, not even by SIGTERM (L§14: a cut flash write can brick the board).
//! - The outcome of a killed child is decided when it is killed and reported when it is reaped, so
//!   the partial file is removed only once nothing writes it any more.
//! - Every string from the cloud is checked here (an http or https URL of printable ASCII without
//!   spaces, 32 hex digits) and reaches the io side only as a value, never as shell text.

use log::info;
use serde_json::Value;

use crate::time::{Duration, Instant};
use crate::wire::json_stream::Piece;
use crate::wire::rpc;

/// The daemon (or miio_agent) is tried again every 3 s, the first connection included (as L§10).
pub const RETRY: Duration = Duration::from_secs(3);
/// L§14: the `--busy-cmd` check gets this long; one that hangs counts as busy.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(30);
/// L§14: the longest URL accepted. Download URLs are signed links of a few hundred bytes.
pub const MAX_URL: usize = 2048;
/// What an `--agent` connection sends first (L§10, L§14): the four methods it handles, registered.
pub const REGISTER: &str = concat!(
    r#"{"method":"register","key":"miIO.ota"}"#,
    r#"{"method":"register","key":"miIO.get_ota_state"}"#,
    r#"{"method":"register","key":"miIO.get_ota_progress"}"#,
    r#"{"method":"register","key":"local.status"}"#,
);

/// What a 54322 connection sends first: the daemon's state, answered as `local.status` (L§14).
pub const QUERY: &str = r#"{"id":1,"method":"local.query_status"}"#;

/// Logs a line a peer (the cloud, the daemon, the download command) can make miio_ota repeat: one
/// kind for the whole applet (P§2.7).
#[inline(never)]
pub fn note(now: Instant, why: &str) {
    crate::warn_limited!(now, "ota: {why}");
}

/// What `proc` asks for (L§14).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proc {
    Dnld,
    Install,
    DnldInstall,
}

/// A job's parameters, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Job {
    pub url: String,
    /// Lower-case hex.
    pub md5: String,
    pub proc: Proc,
    pub silent: bool,
}

/// The failure codes of L§14, fixed by the vendor, with their messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fail {
    Down,
    Dns,
    Connect,
    Disconnect,
    Install,
    Cancel,
    LowEnergy,
    Unknown,
}

impl Fail {
    /// The state as reported, `failed|<code>|<message>` (L§14): whole texts, so no number is
    /// formatted for a report.
    pub fn text(self) -> &'static str {
        match self {
            Fail::Down => "failed|-33001|down error",
            Fail::Dns => "failed|-33002|dns error",
            Fail::Connect => "failed|-33003|connect error",
            Fail::Disconnect => "failed|-33004|disconnect",
            Fail::Install => "failed|-33005|install error",
            Fail::Cancel => "failed|-33006|cancel",
            Fail::LowEnergy => "failed|-33007|low energy",
            Fail::Unknown => "failed|-33020|unknown",
        }
    }

    /// L§14: the download command's exit status (`None`: killed by a signal we did not send).
    pub fn of_download(code: Option<i32>) -> Fail {
        match code {
            Some(2) => Fail::Dns,
            Some(3) => Fail::Connect,
            Some(4) => Fail::Disconnect,
            Some(6) => Fail::Cancel,
            Some(7) => Fail::LowEnergy,
            Some(_) => Fail::Down,
            None => Fail::Unknown,
        }
    }

    /// L§14: the install command's exit status other than 0.
    pub fn of_install(code: Option<i32>) -> Fail {
        match code {
            Some(7) => Fail::LowEnergy,
            Some(_) => Fail::Install,
            None => Fail::Unknown,
        }
    }
}

/// The states of L§14.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Idle,
    Downloading,
    Downloaded,
    WaitInstall,
    Installing,
    Installed,
    Failed(Fail),
    Busy,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::Idle => "idle",
            State::Downloading => "downloading",
            State::Downloaded => "downloaded",
            State::WaitInstall => "wait_install",
            State::Installing => "installing",
            State::Installed => "installed",
            State::Failed(_) => "failed",
            State::Busy => "busy",
        }
    }
}

/// The child processes miio_ota runs, one at a time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `--busy-cmd`: exit 0 means busy.
    Check,
    /// `<download-cmd> <url> <file>`.
    Download,
    /// `<install-cmd> <file>` with `MIIO_OTA_MODE` and `MIIO_OTA_MD5`.
    Install,
}

/// miio_ota's effects, carried out at once by the io side.
pub trait Io {
    /// Queues `text` to the daemon (or the agent). False: not connected; the text is dropped.
    fn send(&mut self, text: &str) -> bool;
    /// Starts the child of `kind` for `job` in a process group of its own. False: it could not start.
    fn spawn(&mut self, kind: Kind, job: &Job) -> bool;
    /// Kills the running child's whole process group; its exit is still reported.
    fn kill(&mut self);
    /// The MD5 of the download file, or None when there is none (or it cannot be read).
    fn file_md5(&mut self) -> Option<[u8; 16]>;
    /// Removes the download file (a partial or a wrong one).
    fn remove(&mut self);
    /// Opens the connection to the daemon; the applet then reports [`Ota::connected`] or
    /// [`Ota::disconnected`]. False: it failed at once.
    fn connect(&mut self) -> bool;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Upstream {
    /// Waiting to try again at this instant.
    Down(Instant),
    Connecting,
    Up,
}

/// The running child.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Running {
    kind: Kind,
    /// When it is killed (not for an install).
    deadline: Option<Instant>,
    /// Killed: the outcome decided then, applied when it is reaped.
    killed: Option<Fail>,
}

/// The settings from the command line.
#[derive(Clone, Copy, Debug)]
pub struct Config {
    pub download_timeout: Duration,
    /// `--busy-cmd` was given.
    pub busy_check: bool,
    /// Connected through miio_agent: register [`METHODS`] on every connect.
    pub agent: bool,
}

pub struct Ota<I: Io> {
    pub io: I,
    cfg: Config,
    state: State,
    progress: u8,
    /// The last progress reported in this job (L§14: 0, each step of 10, 100).
    reported: Option<u8>,
    job: Option<Job>,
    running: Option<Running>,
    /// SIGTERM came: exit once no child runs.
    stopping: bool,
    up: Upstream,
    next_id: u32,
}

impl<I: Io> Ota<I> {
    /// Idle, with the first connect due at `now` (L§14: idle after every start).
    pub fn new(cfg: Config, io: I, now: Instant) -> Ota<I> {
        Ota {
            io,
            cfg,
            state: State::Idle,
            progress: 0,
            reported: None,
            job: None,
            running: None,
            stopping: false,
            up: Upstream::Down(now),
            next_id: 1,
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// L§14: 0 in idle, failed and busy, 100 from downloaded on.
    pub fn progress(&self) -> u8 {
        match self.state {
            State::Idle | State::Failed(_) | State::Busy => 0,
            State::Downloading => self.progress,
            _ => 100,
        }
    }

    /// The earliest deadline: the next connect attempt or the running child's end.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let retry = match self.up {
            Upstream::Down(at) => Some(at),
            _ => None,
        };
        let kill = self.running.and_then(|r| r.deadline);
        match (retry, kill) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Runs what is due at `now`: a connect attempt, a child past its deadline.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Upstream::Down(at) = self.up {
            if now >= at {
                self.up = Upstream::Connecting;
                if !self.io.connect() {
                    self.disconnected(now);
                }
            }
        }
        if let Some(r) = self.running.as_mut() {
            if r.deadline.is_some_and(|d| now >= d) {
                r.deadline = None;
                // A check that hangs counts as busy; a download that takes too long is -33004.
                r.killed = Some(match r.kind {
                    Kind::Download => Fail::Disconnect,
                    _ => Fail::Unknown,
                });
                self.io.kill();
            }
        }
    }

    /// The connection to the daemon (or the agent) is up.
    pub fn connected(&mut self, _now: Instant) {
        if self.up != Upstream::Up {
            info!("ota: connected");
        }
        self.up = Upstream::Up;
        // The first message classifies the connection at once (L§2): without one the daemon
        // holds commands for its 1 s window, a second of the user-ack timeout lost.
        self.io.send(if self.cfg.agent { REGISTER } else { QUERY });
    }

    /// The connection failed or closed: try again in [`RETRY`]. A running job goes on.
    pub fn disconnected(&mut self, now: Instant) {
        if self.up == Upstream::Up {
            note(now, "lost the daemon; retry in 3 s");
        } else {
            note(now, "no daemon; retry in 3 s");
        }
        self.up = Upstream::Down(now + RETRY);
    }

    pub fn is_connected(&self) -> bool {
        self.up == Upstream::Up
    }

    /// SIGTERM (or SIGINT): a download or a check is cancelled (-33006); an install is waited for.
    /// The applet exits once [`Ota::can_exit`] says so.
    pub fn stop(&mut self, _now: Instant) {
        self.stopping = true;
        if let Some(r) = self.running.as_mut() {
            if r.kind != Kind::Install && r.killed.is_none() {
                r.killed = Some(Fail::Cancel);
                r.deadline = None;
                self.io.kill();
            }
        }
    }

    /// SIGTERM came and no child runs any more.
    pub fn can_exit(&self) -> bool {
        self.stopping && self.running.is_none()
    }

    /// Whether a child runs (the applet reads its output and reaps it).
    pub fn child_kind(&self) -> Option<Kind> {
        self.running.map(|r| r.kind)
    }

    /// One complete JSON value from the daemon (or the agent), as the splitter cut it. Routed on
    /// the splitter's scan (`method`, `id`); the few params read are raw members of the text, with
    /// no tree of the message.
    pub fn message(&mut self, now: Instant, piece: Piece) {
        let Some((text, Ok(head))) = rpc::piece_text(piece) else {
            note(now, "a message that is not a JSON object; dropped");
            return;
        };
        // Acks of our reports and everything not ours: silent (L§4.1).
        let Some(Some(method)) = &head.method else {
            return;
        };
        let id = head.id.as_ref();
        match method.as_str() {
            "miIO.ota" => self.ota(now, id, &text),
            "miIO.get_ota_state" => {
                let s = self.state.name();
                self.answer(id, format_args!(r#""result":["{s}"]"#));
            }
            "miIO.get_ota_progress" => {
                let p = self.progress();
                self.answer(id, format_args!(r#""result":[{p}]"#));
            }
            // L§14: after a cloud connect, a state other than idle is reported again.
            "local.status"
                if self.state != State::Idle
                    && rpc::str_member(&text, "params").flatten().as_deref()
                        == Some("cloud_connected") =>
            {
                self.report_state();
                if self.state == State::Downloading {
                    self.report_progress(self.progress);
                }
            }
            _ => {}
        }
    }

    /// A line the download command printed: `progress <0..100>` (L§14); anything else is ignored.
    pub fn output_line(&mut self, now: Instant, line: &[u8]) {
        let Some(n) = line
            .strip_prefix(b"progress ")
            .and_then(|n| core::str::from_utf8(n).ok())
            .and_then(crate::cli::uint::<u8>)
        else {
            return;
        };
        if n > 100 {
            note(now, "a progress above 100; ignored");
            return;
        }
        if self.state != State::Downloading
            || self
                .running
                .is_none_or(|r| r.kind != Kind::Download || r.killed.is_some())
        {
            return;
        }
        // Progress only grows; 100 is reported when the file is verified.
        if n > self.progress && n < 100 {
            self.progress = n;
            let step = n / 10 * 10;
            if self.reported.is_none_or(|r| step > r) {
                self.report_progress(step);
            }
        }
    }

    /// The running child exited: `code` is its exit status, None when a signal ended it.
    pub fn child_exited(&mut self, now: Instant, code: Option<i32>) {
        let Some(r) = self.running.take() else {
            return;
        };
        if let Some(f) = r.killed {
            if r.kind == Kind::Check && f != Fail::Cancel {
                // It hung: busy.
                self.job = None;
                self.enter(State::Busy);
            } else {
                self.fail(f);
            }
            return;
        }
        if self.stopping && r.kind != Kind::Install {
            self.fail(Fail::Cancel);
            return;
        }
        match r.kind {
            Kind::Check if code == Some(0) => {
                self.job = None;
                self.enter(State::Busy);
            }
            Kind::Check => self.begin(now),
            Kind::Download if code == Some(0) => self.downloaded(now),
            Kind::Download => self.fail(Fail::of_download(code)),
            Kind::Install if code == Some(0) => {
                self.job = None;
                self.enter(State::Installed);
            }
            Kind::Install => self.fail(Fail::of_install(code)),
        }
    }

    /// `miIO.ota` (L§14).
    fn ota(&mut self, now: Instant, id: Option<&Value>, text: &str) {
        if self.running.is_some() || self.stopping {
            self.answer(
                id,
                format_args!(r#""error":{{"code":-10000,"message":"busy"}}"#),
            );
            return;
        }
        // The vendor guide spells it `param`.
        let params = rpc::raw_member(text, "params").or_else(|| rpc::raw_member(text, "param"));
        let Some(job) = params.and_then(job_of) else {
            note(now, "miIO.ota with invalid params");
            self.answer(
                id,
                format_args!(r#""error":{{"code":-10000,"message":"invalid params"}}"#),
            );
            return;
        };
        self.answer(id, format_args!(r#""result":["OK"]"#));
        self.job = Some(job);
        self.progress = 0;
        self.reported = None;
        if self.cfg.busy_check {
            self.start(now, Kind::Check, Some(now + CHECK_TIMEOUT));
        } else {
            self.begin(now);
        }
    }

    /// The job proper: an install of a file already here skips the download (L§14).
    fn begin(&mut self, now: Instant) {
        let Some(job) = &self.job else {
            return;
        };
        if job.proc == Proc::Install && self.file_matches() {
            self.install(now);
            return;
        }
        self.io.remove();
        self.enter(State::Downloading);
        self.report_progress(0);
        let deadline = now + self.cfg.download_timeout;
        self.start(now, Kind::Download, Some(deadline));
    }

    fn downloaded(&mut self, now: Instant) {
        if !self.file_matches() {
            self.fail(Fail::Down);
            return;
        }
        self.progress = 100;
        self.report_progress(100);
        let Some(job) = &self.job else {
            return;
        };
        match (job.proc, job.silent) {
            (Proc::Dnld, false) => self.enter(State::Downloaded),
            (Proc::Dnld, true) => self.enter(State::WaitInstall),
            _ => self.install(now),
        }
    }

    fn install(&mut self, now: Instant) {
        self.enter(State::Installing);
        self.start(now, Kind::Install, None);
    }

    fn start(&mut self, _now: Instant, kind: Kind, deadline: Option<Instant>) {
        let Some(job) = &self.job else {
            return;
        };
        if !self.io.spawn(kind, job) {
            if kind == Kind::Check {
                // No check to run: as if it said "not busy" would skip a check the maker asked
                // for; refuse instead.
                self.job = None;
                self.enter(State::Busy);
            } else {
                self.fail(Fail::Unknown);
            }
            return;
        }
        self.running = Some(Running {
            kind,
            deadline,
            killed: None,
        });
    }

    fn file_matches(&mut self) -> bool {
        let Some(job) = &self.job else {
            return false;
        };
        self.io.file_md5().is_some_and(|d| md5_is(&d, &job.md5))
    }

    fn fail(&mut self, f: Fail) {
        if matches!(self.state, State::Downloading) {
            self.io.remove();
        }
        self.job = None;
        self.enter(State::Failed(f));
    }

    fn enter(&mut self, s: State) {
        self.state = s;
        let v = self.report_state();
        info!("ota: {v}");
    }

    /// Reports the state; returns its text.
    fn report_state(&mut self) -> &'static str {
        let v = match self.state {
            State::Failed(f) => f.text(),
            s => s.name(),
        };
        self.report("ota_state", format_args!("\"{v}\""));
        v
    }

    fn report_progress(&mut self, p: u8) {
        self.reported = Some(p);
        self.report("ota_progress", format_args!("{p}"));
    }

    /// `{"id":R,"method":"props","params":{"<key>":<json>}}` upstream (L§14); R from our own
    /// counter (the daemon or the agent rewrites it anyway, L§4.3).
    fn report(&mut self, key: &str, json: core::fmt::Arguments) {
        let id = self.next_id;
        self.next_id = if id >= 0x7fff_ffff { 1 } else { id + 1 };
        let text = format!(r#"{{"id":{id},"method":"props","params":{{"{key}":{json}}}}}"#);
        self.io.send(&text);
    }

    /// `{"id":<id>,<body>}` to the daemon; nothing for a request without an id.
    fn answer(&mut self, id: Option<&Value>, body: core::fmt::Arguments) {
        if let Some(id) = id {
            self.io
                .send(&format!(r#"{{"id":{},{body}}}"#, rpc::Compact(id)));
        }
    }
}

/// The checked parameters of `miIO.ota` (L§14), read from the text of the `params` object, or
/// None: invalid params (not an object, a member missing or of the wrong type, a bad value).
fn job_of(p: &str) -> Option<Job> {
    let url = rpc::str_member(p, "app_url")??;
    if !url_ok(&url) {
        return None;
    }
    let mut md5 = rpc::str_member(p, "file_md5")??;
    if md5.len() != 32 || !md5.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let proc = match rpc::str_member(p, "proc") {
        None => Proc::DnldInstall,
        Some(Some(s)) if s == "dnld install" => Proc::DnldInstall,
        Some(Some(s)) if s == "dnld" => Proc::Dnld,
        Some(Some(s)) if s == "install" => Proc::Install,
        Some(_) => return None,
    };
    let silent = match rpc::str_member(p, "mode") {
        None => false,
        Some(Some(s)) if s == "normal" => false,
        Some(Some(s)) if s == "silent" => true,
        Some(_) => return None,
    };
    md5.make_ascii_lowercase();
    Some(Job {
        url,
        md5,
        proc,
        silent,
    })
}

/// L§14: `http://` or `https://` and a host, at most [`MAX_URL`] bytes of printable ASCII with no
/// space (a raw space or a control character is refused, not escaped: the cloud sends URLs encoded).
pub fn url_ok(url: &str) -> bool {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"));
    url.len() <= MAX_URL
        && rest.is_some_and(|r| !r.is_empty() && !r.starts_with('/'))
        && url.bytes().all(|b| (0x21..0x7f).contains(&b))
}

/// Whether `hex` (lower-case, as `job_of` leaves it) is the digest `d`: compared digit by digit,
/// without a copy.
pub fn md5_is(d: &[u8; 16], hex: &str) -> bool {
    const H: &[u8; 16] = b"0123456789abcdef";
    hex.len() == 32
        && d.iter()
            .zip(hex.as_bytes().chunks(2))
            .all(|(b, h)| h == [H[usize::from(b >> 4)], H[usize::from(b & 15)]])
}

#[cfg(test)]
mod tests {
    use super::*;

    const MD5: &str = "0123456789abcdef0123456789ABCDEF";

    fn digest() -> [u8; 16] {
        let mut d = [0u8; 16];
        for (i, b) in d.iter_mut().enumerate() {
            *b = u8::from_str_radix(&MD5[2 * i..2 * i + 2], 16).unwrap();
        }
        d
    }

    #[derive(Debug, Default)]
    struct Rec {
        sent: Vec<String>,
        spawned: Vec<(Kind, Job)>,
        kills: usize,
        removes: usize,
        file: Option<[u8; 16]>,
        spawn_fails: bool,
        connects: usize,
    }

    impl Io for Rec {
        fn send(&mut self, text: &str) -> bool {
            self.sent.push(text.to_string());
            true
        }
        fn spawn(&mut self, kind: Kind, job: &Job) -> bool {
            self.spawned.push((kind, job.clone()));
            !self.spawn_fails
        }
        fn kill(&mut self) {
            self.kills += 1;
        }
        fn file_md5(&mut self) -> Option<[u8; 16]> {
            self.file
        }
        fn remove(&mut self) {
            self.removes += 1;
            self.file = None;
        }
        fn connect(&mut self) -> bool {
            self.connects += 1;
            true
        }
    }

    fn cfg() -> Config {
        Config {
            download_timeout: Duration::from_secs(3600),
            busy_check: false,
            agent: false,
        }
    }

    fn ota_with(c: Config) -> Ota<Rec> {
        let mut o = Ota::new(c, Rec::default(), Instant(0));
        o.handle_timeout(Instant(0));
        o.connected(Instant(0));
        o.io.sent.clear();
        o
    }

    fn ota() -> Ota<Rec> {
        ota_with(cfg())
    }

    fn cmd(o: &mut Ota<Rec>, t: u64, text: &str) -> Vec<String> {
        // As the applet gets it: cut (and scanned) by the splitter, or raw when it cannot be.
        let mut sp = crate::wire::json_stream::Splitter::new(65536);
        sp.push(text.as_bytes());
        match sp.next_piece() {
            Some(Ok(p)) if sp.buffered() == 0 => o.message(Instant(t), p),
            _ => o.message(Instant(t), Piece::Raw(text.as_bytes().to_vec())),
        }
        std::mem::take(&mut o.io.sent)
    }

    fn ota_cmd(proc: &str, mode: &str) -> String {
        format!(
            r#"{{"id":7,"method":"miIO.ota","params":{{"app_url":"http://h/f.bin","file_md5":"{MD5}","proc":"{proc}","mode":"{mode}"}}}}"#
        )
    }

    /// The `params` of each report, in order.
    fn reports(sent: &[String]) -> Vec<String> {
        sent.iter()
            .filter(|s| s.contains(r#""method":"props""#))
            .map(|s| {
                let p = s.find(r#""params":"#).unwrap();
                s[p + 9..s.len() - 1].to_string()
            })
            .collect()
    }

    #[test]
    fn dnld_install_normal_runs_to_installed_with_reports() {
        let mut o = ota();
        let out = cmd(&mut o, 0, &ota_cmd("dnld install", "normal"));
        assert_eq!(out[0], r#"{"id":7,"result":["OK"]}"#);
        assert_eq!(
            reports(&out),
            [r#"{"ota_state":"downloading"}"#, r#"{"ota_progress":0}"#]
        );
        assert_eq!(o.io.spawned.len(), 1);
        assert_eq!(o.io.spawned[0].0, Kind::Download);
        assert_eq!(o.io.spawned[0].1.md5, MD5.to_ascii_lowercase());
        assert_eq!(o.poll_timeout(), Some(Instant(3_600_000)));
        for p in [3, 9, 10, 15, 42, 41, 99] {
            o.output_line(Instant(1), format!("progress {p}").as_bytes());
        }
        o.output_line(Instant(1), b"Connecting to h");
        assert_eq!(
            reports(&std::mem::take(&mut o.io.sent)),
            [
                r#"{"ota_progress":10}"#,
                r#"{"ota_progress":40}"#,
                r#"{"ota_progress":90}"#
            ]
        );
        assert_eq!(
            cmd(&mut o, 1, r#"{"id":8,"method":"miIO.get_ota_progress"}"#),
            [r#"{"id":8,"result":[99]}"#]
        );
        o.io.file = Some(digest());
        o.child_exited(Instant(2), Some(0));
        assert_eq!(
            reports(&std::mem::take(&mut o.io.sent)),
            [r#"{"ota_progress":100}"#, r#"{"ota_state":"installing"}"#]
        );
        assert_eq!(o.io.spawned[1].0, Kind::Install);
        assert_eq!(o.poll_timeout(), None, "an install has no deadline");
        assert_eq!(
            cmd(
                &mut o,
                3,
                r#"{"id":9,"method":"miIO.get_ota_state","params":{}}"#
            ),
            [r#"{"id":9,"result":["installing"]}"#]
        );
        o.child_exited(Instant(4), Some(0));
        assert_eq!(
            reports(&std::mem::take(&mut o.io.sent)),
            [r#"{"ota_state":"installed"}"#]
        );
        assert_eq!(o.state(), State::Installed);
        assert_eq!(o.progress(), 100);
    }

    #[test]
    fn silent_dnld_waits_then_install_skips_the_download() {
        let mut o = ota();
        cmd(&mut o, 0, &ota_cmd("dnld", "silent"));
        o.io.file = Some(digest());
        o.child_exited(Instant(1), Some(0));
        assert_eq!(o.state(), State::WaitInstall);
        assert_eq!(
            reports(&std::mem::take(&mut o.io.sent)),
            [r#"{"ota_progress":100}"#, r#"{"ota_state":"wait_install"}"#]
        );
        let out = cmd(&mut o, 2, &ota_cmd("install", "silent"));
        assert_eq!(reports(&out), [r#"{"ota_state":"installing"}"#]);
        assert_eq!(o.io.spawned.last().unwrap().0, Kind::Install);
        assert!(o.io.spawned.last().unwrap().1.silent);
        assert_eq!(o.io.spawned.len(), 2, "no second download");
    }

    #[test]
    fn dnld_normal_stops_at_downloaded_and_install_of_a_missing_file_downloads() {
        let mut o = ota();
        let c = ota_cmd("dnld", "normal").replace(r#","mode":"normal""#, "");
        cmd(&mut o, 0, &c);
        o.io.file = Some(digest());
        o.child_exited(Instant(1), Some(0));
        assert_eq!(o.state(), State::Downloaded);
        o.io.sent.clear();
        o.io.file = None;
        let out = cmd(&mut o, 2, &ota_cmd("install", "normal"));
        assert_eq!(
            reports(&out),
            [r#"{"ota_state":"downloading"}"#, r#"{"ota_progress":0}"#]
        );
    }

    #[test]
    fn failures_map_to_the_fixed_codes_and_remove_the_file() {
        for (code, want) in [
            (Some(1), "failed|-33001|down error"),
            (Some(2), "failed|-33002|dns error"),
            (Some(3), "failed|-33003|connect error"),
            (Some(4), "failed|-33004|disconnect"),
            (Some(6), "failed|-33006|cancel"),
            (Some(7), "failed|-33007|low energy"),
            (None, "failed|-33020|unknown"),
        ] {
            let mut o = ota();
            cmd(&mut o, 0, &ota_cmd("dnld install", "normal"));
            o.child_exited(Instant(1), code);
            let r = reports(&std::mem::take(&mut o.io.sent));
            assert_eq!(r, [format!(r#"{{"ota_state":"{want}"}}"#)]);
            assert_eq!(o.io.removes, 2, "before and after");
            assert_eq!(o.progress(), 0);
            assert_eq!(
                cmd(&mut o, 2, r#"{"id":1,"method":"miIO.get_ota_state"}"#),
                [r#"{"id":1,"result":["failed"]}"#]
            );
        }
    }

    #[test]
    fn wrong_md5_is_a_down_error() {
        let mut o = ota();
        cmd(&mut o, 0, &ota_cmd("dnld install", "normal"));
        o.io.file = Some([0; 16]);
        o.child_exited(Instant(1), Some(0));
        assert_eq!(o.state(), State::Failed(Fail::Down));
        assert_eq!(o.io.file, None, "removed");
        assert_eq!(o.io.spawned.len(), 1, "no install");
    }

    #[test]
    fn install_exit_codes() {
        for (code, want) in [
            (Some(1), State::Failed(Fail::Install)),
            (Some(7), State::Failed(Fail::LowEnergy)),
            (None, State::Failed(Fail::Unknown)),
        ] {
            let mut o = ota();
            o.io.file = Some(digest());
            cmd(&mut o, 0, &ota_cmd("install", "normal"));
            o.child_exited(Instant(1), code);
            assert_eq!(o.state(), want);
            let r = reports(&std::mem::take(&mut o.io.sent));
            assert_eq!(
                r.last().unwrap(),
                &format!(
                    r#"{{"ota_state":"{}"}}"#,
                    match want {
                        State::Failed(Fail::Install) => "failed|-33005|install error",
                        State::Failed(Fail::LowEnergy) => "failed|-33007|low energy",
                        _ => "failed|-33020|unknown",
                    }
                )
            );
            assert_eq!(
                o.io.removes, 0,
                "an installed file is not the download's to remove"
            );
        }
    }

    #[test]
    fn busy_while_running_and_invalid_params() {
        let mut o = ota();
        cmd(&mut o, 0, &ota_cmd("dnld install", "normal"));
        assert_eq!(
            cmd(&mut o, 1, &ota_cmd("dnld", "normal")),
            [r#"{"id":7,"error":{"code":-10000,"message":"busy"}}"#]
        );
        let mut o = ota();
        for bad in [
            r#"{"app_url":"ftp://h/f","file_md5":"0123456789abcdef0123456789abcdef"}"#,
            r#"{"app_url":"http://h/a b","file_md5":"0123456789abcdef0123456789abcdef"}"#,
            r#"{"app_url":"http://h/a\u0001","file_md5":"0123456789abcdef0123456789abcdef"}"#,
            r#"{"app_url":"http://","file_md5":"0123456789abcdef0123456789abcdef"}"#,
            r#"{"app_url":"http://h/f","file_md5":"0123"}"#,
            r#"{"app_url":"http://h/f","file_md5":"0123456789abcdef0123456789abcdeg"}"#,
            r#"{"app_url":"http://h/f","file_md5":"0123456789abcdef0123456789abcdef","proc":"x"}"#,
            r#"{"app_url":"http://h/f","file_md5":"0123456789abcdef0123456789abcdef","mode":1}"#,
            r#"{"file_md5":"0123456789abcdef0123456789abcdef"}"#,
            r#"[]"#,
        ] {
            let out = cmd(
                &mut o,
                0,
                &format!(r#"{{"id":3,"method":"miIO.ota","params":{bad}}}"#),
            );
            assert_eq!(
                out,
                [r#"{"id":3,"error":{"code":-10000,"message":"invalid params"}}"#],
                "{bad}"
            );
        }
        assert!(o.io.spawned.is_empty());
        // `param`, the vendor guide's spelling, and no proc/mode: dnld install, normal.
        let out = cmd(
            &mut o,
            0,
            r#"{"id":4,"method":"miIO.ota","param":{"app_url":"https://h/;$(x)`y`'\"","file_md5":"0123456789abcdef0123456789abcdef"}}"#,
        );
        assert_eq!(out[0], r#"{"id":4,"result":["OK"]}"#);
        assert_eq!(o.io.spawned[0].1.url, "https://h/;$(x)`y`'\"");
        assert_eq!(o.io.spawned[0].1.proc, Proc::DnldInstall);
    }

    #[test]
    fn silent_on_other_messages() {
        let mut o = ota();
        for m in [
            r#"{"id":1,"method":"get_prop","params":[]}"#,
            r#"{"id":1,"result":["ok"]}"#,
            r#"{"method":"local.status","params":"cloud_connected"}"#,
            r#"{"method":"local.status","params":"cloud_retry"}"#,
            r#"not json"#,
            r#"{"id":1,"method":5}"#,
        ] {
            assert!(cmd(&mut o, 0, m).is_empty(), "{m}");
        }
    }

    #[test]
    fn cloud_connected_reports_again_unless_idle() {
        let mut o = ota();
        cmd(&mut o, 0, &ota_cmd("dnld install", "normal"));
        o.output_line(Instant(1), b"progress 35");
        o.io.sent.clear();
        let out = cmd(
            &mut o,
            2,
            r#"{"method":"local.status","params":"cloud_connected"}"#,
        );
        assert_eq!(
            reports(&out),
            [r#"{"ota_state":"downloading"}"#, r#"{"ota_progress":35}"#]
        );
    }

    #[test]
    fn timeout_kills_the_group_and_fails_when_reaped() {
        let mut o = ota_with(Config {
            download_timeout: Duration::from_secs(10),
            ..cfg()
        });
        cmd(&mut o, 0, &ota_cmd("dnld install", "normal"));
        o.handle_timeout(Instant(9_999));
        assert_eq!(o.io.kills, 0);
        o.handle_timeout(Instant(10_000));
        assert_eq!(o.io.kills, 1);
        assert_eq!(o.poll_timeout(), None);
        assert_eq!(o.state(), State::Downloading, "decided, not yet reaped");
        o.output_line(Instant(10_001), b"progress 50");
        assert!(reports(&std::mem::take(&mut o.io.sent)).is_empty());
        o.child_exited(Instant(10_002), None);
        assert_eq!(o.state(), State::Failed(Fail::Disconnect));
        assert_eq!(o.io.removes, 2);
    }

    #[test]
    fn sigterm_cancels_a_download_but_waits_for_an_install() {
        let mut o = ota();
        cmd(&mut o, 0, &ota_cmd("dnld install", "normal"));
        o.stop(Instant(1));
        assert_eq!(o.io.kills, 1);
        assert!(!o.can_exit());
        o.child_exited(Instant(2), None);
        assert_eq!(o.state(), State::Failed(Fail::Cancel));
        assert!(o.can_exit());

        let mut o = ota();
        o.io.file = Some(digest());
        cmd(&mut o, 0, &ota_cmd("install", "normal"));
        o.stop(Instant(1));
        assert_eq!(o.io.kills, 0, "an install is never interrupted");
        assert!(!o.can_exit());
        assert_eq!(
            cmd(&mut o, 1, &ota_cmd("dnld", "normal")),
            [r#"{"id":7,"error":{"code":-10000,"message":"busy"}}"#]
        );
        o.child_exited(Instant(2), Some(0));
        assert_eq!(o.state(), State::Installed);
        assert!(o.can_exit());

        let mut o = ota();
        o.stop(Instant(1));
        assert!(o.can_exit());
    }

    #[test]
    fn busy_check() {
        let c = Config {
            busy_check: true,
            ..cfg()
        };
        let mut o = ota_with(c);
        cmd(&mut o, 0, &ota_cmd("dnld install", "normal"));
        assert_eq!(o.io.spawned[0].0, Kind::Check);
        o.child_exited(Instant(1), Some(0));
        assert_eq!(o.state(), State::Busy);
        assert_eq!(reports(&o.io.sent), [r#"{"ota_state":"busy"}"#]);

        let mut o = ota_with(c);
        cmd(&mut o, 0, &ota_cmd("dnld install", "normal"));
        o.child_exited(Instant(1), Some(1));
        assert_eq!(o.state(), State::Downloading);
        assert_eq!(o.io.spawned[1].0, Kind::Download);

        // A check that hangs is killed at its deadline and counts as busy.
        let mut o = ota_with(c);
        cmd(&mut o, 0, &ota_cmd("dnld install", "normal"));
        assert_eq!(o.poll_timeout(), Some(Instant(30_000)));
        o.handle_timeout(Instant(30_000));
        o.child_exited(Instant(30_001), None);
        assert_eq!(o.state(), State::Busy);
    }

    #[test]
    fn a_command_that_cannot_start_is_unknown() {
        let mut o = ota();
        o.io.spawn_fails = true;
        cmd(&mut o, 0, &ota_cmd("dnld install", "normal"));
        assert_eq!(o.state(), State::Failed(Fail::Unknown));
        assert_eq!(o.child_kind(), None);
    }

    #[test]
    fn reconnects_and_registers_through_the_agent() {
        let mut o = Ota::new(
            Config {
                agent: true,
                ..cfg()
            },
            Rec::default(),
            Instant(0),
        );
        assert_eq!(o.poll_timeout(), Some(Instant(0)));
        o.handle_timeout(Instant(0));
        assert_eq!(o.io.connects, 1);
        assert_eq!(
            o.poll_timeout(),
            None,
            "connecting, nothing else to wait for"
        );
        o.connected(Instant(1));
        assert_eq!(o.io.sent.len(), 1);
        assert!(o.io.sent[0].starts_with(r#"{"method":"register","key":"miIO.ota"}{"#));
        assert_eq!(o.io.sent[0].matches("register").count(), 4);
        o.disconnected(Instant(5));
        assert_eq!(o.poll_timeout(), Some(Instant(3005)));
        o.handle_timeout(Instant(3005));
        assert_eq!(o.io.connects, 2);
    }

    /// On 54322 the first message is a status query: the daemon classifies the connection at once
    /// instead of holding commands for its 1 s window (L§2), and its answer is a `local.status`.
    #[test]
    fn a_local_connection_starts_with_a_status_query() {
        let mut o = Ota::new(cfg(), Rec::default(), Instant(0));
        o.handle_timeout(Instant(0));
        o.connected(Instant(1));
        assert_eq!(o.io.sent, [QUERY]);
        let v: serde_json::Value = serde_json::from_str(QUERY).unwrap();
        assert_eq!(v["method"], "local.query_status");
    }

    #[test]
    fn idle_has_no_deadline() {
        let o = ota();
        assert_eq!(o.poll_timeout(), None);
        assert_eq!(o.state(), State::Idle);
        assert_eq!(o.progress(), 0);
    }

    #[test]
    fn url_rule() {
        assert!(url_ok("http://a"));
        assert!(url_ok("https://a/b?c=d&e=%20;$(x)"));
        assert!(!url_ok("https://"));
        assert!(!url_ok("HTTP://a"));
        assert!(!url_ok("file:///etc/passwd"));
        assert!(!url_ok("http://a/\u{e9}"));
        assert!(!url_ok(&format!("http://a/{}", "x".repeat(MAX_URL))));
        assert!(md5_is(&digest(), &MD5.to_ascii_lowercase()));
        assert!(
            !md5_is(&digest(), MD5),
            "upper case is not what job_of leaves"
        );
        assert!(!md5_is(&[0; 16], &MD5.to_ascii_lowercase()));
        assert!(!md5_is(&digest(), &MD5.to_ascii_lowercase()[..30]));
    }
}
