//! The fault matrix of the hardening issue, end to end against the real daemon.
//!
//! - Network faults, injected by `miio_fakecloud` (its `drop`, `dup`, `reorder`, `delay`,
//!   `silent` and `reset_tcp` control commands) on the UDP and on the TCP cloud link.
//! - Misbehaving local peers: a helper that answers junk or nothing (L§9), a local client that
//!   stops reading while commands are broadcast (L§2).
//! - A data dir that is full (no page, or no inode) or read-only when the daemon writes each of its
//!   files (L§17): a tmpfs or a read-only remount in a mount namespace of the daemon's own, flipped
//!   from outside with `nsenter` while it runs.
//! - A storm of 100 SIGHUPs while reports flow, and the log file on a full disk.
//!
//! Every row checks the same invariants: the daemon stays up; every report it acknowledged
//! (`"result":"ok"`) was received by the cloud, and each got exactly one answer; no data file is
//! torn (each parses and holds the old or the new content, no temp file is left); and other clients
//! are still served. Waits have deadlines; absences are checked after a barrier.

mod common;
use common::*;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(20);
/// A link that has to come back: backoff (1–2 s), a loaded machine.
const RECOVER: Duration = Duration::from_secs(40);
/// The log name of the state after a lost link or a failed attempt (L§7).
const RETRY: &str = "STATE_CLOUD_CONNECT_RETRY";

// ---- the fake cloud's control socket ---------------------------------------------------------

#[derive(Default)]
struct Feed {
    lines: Vec<Value>,
    eof: bool,
}

/// One control connection to `miio_fakecloud` that watches: events and the answers to our commands
/// come in one ordered stream, read by a thread. A command's answer is a barrier for every event
/// the cloud emitted before it handled the command.
struct Ctl {
    w: TcpStream,
    feed: Arc<(Mutex<Feed>, Condvar)>,
    asked: usize,
}

fn is_answer(v: &Value) -> bool {
    v["ev"] == "ok" || v["ev"] == "error"
}

impl Ctl {
    fn connect(port: u16) -> Ctl {
        let w = TcpStream::connect(("127.0.0.1", port)).expect("control port");
        let r = w.try_clone().unwrap();
        let feed: Arc<(Mutex<Feed>, Condvar)> = Default::default();
        let f2 = feed.clone();
        std::thread::spawn(move || {
            let (m, cv) = &*f2;
            for line in std::io::BufReader::new(r).lines().map_while(Result::ok) {
                let v = serde_json::from_str(&line).unwrap_or(Value::Null);
                m.lock().unwrap().lines.push(v);
                cv.notify_all();
            }
            m.lock().unwrap().eof = true;
            cv.notify_all();
        });
        let mut c = Ctl { w, feed, asked: 0 };
        c.cmd(json!({"cmd":"watch"}));
        c
    }

    /// Looks at the lines from `from` on until `hit` says stop; the index, or None at the deadline.
    fn scan(
        &self,
        from: usize,
        limit: Duration,
        mut hit: impl FnMut(&Value) -> bool,
    ) -> Option<usize> {
        let end = Instant::now() + limit;
        let (m, cv) = &*self.feed;
        let mut f = m.lock().unwrap();
        let mut i = from;
        loop {
            while i < f.lines.len() {
                if hit(&f.lines[i]) {
                    return Some(i);
                }
                i += 1;
            }
            let left = end.saturating_duration_since(Instant::now());
            if f.eof || left.is_zero() {
                return None;
            }
            f = cv.wait_timeout(f, left).unwrap().0;
        }
    }

    fn line(&self, i: usize) -> Value {
        self.feed.0.lock().unwrap().lines[i].clone()
    }

    /// Sends a command and returns its answer (the k-th answer for the k-th command).
    fn try_cmd(&mut self, cmd: Value) -> Value {
        self.w.write_all(format!("{cmd}\n").as_bytes()).unwrap();
        self.asked += 1;
        let k = self.asked;
        let mut n = 0;
        let i = self
            .scan(0, T, |v| {
                n += usize::from(is_answer(v));
                n == k
            })
            .unwrap_or_else(|| panic!("the fake cloud did not answer {cmd}"));
        self.line(i)
    }

    fn cmd(&mut self, cmd: Value) -> Value {
        let a = self.try_cmd(cmd.clone());
        assert_eq!(a["ev"], "ok", "{cmd} -> {a}");
        a
    }

    /// The status line (and a barrier).
    fn status(&mut self) -> Value {
        self.cmd(json!({"cmd":"status"}));
        let k = self.asked;
        let mut n = 0;
        let mut last = Value::Null;
        // The status line is the last `status` event before the k-th answer.
        self.scan(0, Duration::ZERO, |v| {
            if v["ev"] == "status" {
                last = v.clone();
            }
            n += usize::from(is_answer(v));
            n == k
        });
        last
    }

    /// Where the stream is now: `wait_from` looks only at what comes after.
    fn mark(&self) -> usize {
        self.feed.0.lock().unwrap().lines.len()
    }

    /// Waits for the `n`th event from line `from` on matching `pred`; its index.
    fn wait_from(
        &self,
        from: usize,
        limit: Duration,
        n: usize,
        pred: impl Fn(&Value) -> bool,
    ) -> Option<usize> {
        let mut seen = 0;
        self.scan(from, limit, |v| {
            seen += usize::from(pred(v));
            seen == n
        })
    }

    /// Waits for the `n`th event matching `pred`.
    fn wait_nth(&self, limit: Duration, n: usize, pred: impl Fn(&Value) -> bool) -> Option<Value> {
        let i = self.wait_from(0, limit, n, pred)?;
        Some(self.line(i))
    }

    fn wait(&self, limit: Duration, pred: impl Fn(&Value) -> bool) -> Option<Value> {
        self.wait_nth(limit, 1, pred)
    }

    /// Events matching `pred` so far (after a barrier only).
    fn count(&self, pred: impl Fn(&Value) -> bool) -> usize {
        self.feed
            .0
            .lock()
            .unwrap()
            .lines
            .iter()
            .filter(|v| pred(v))
            .count()
    }

    fn events(&self, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
        let f = self.feed.0.lock().unwrap();
        f.lines.iter().filter(|v| pred(v)).cloned().collect()
    }

    /// Every rule off, and nothing the cloud still holds back or delays.
    fn clear(&mut self) {
        self.cmd(json!({"cmd":"clear"}));
        let calm = wait_until(T, || {
            let s = self.status();
            s["held"] == 0 && s["delayed"] == 0
        });
        assert!(
            calm,
            "the fake cloud still holds packets: {}",
            self.status()
        );
    }
}

/// A data packet from the device with this report tag.
fn up_tag(tag: &str) -> impl Fn(&Value) -> bool + '_ {
    move |v| v["ev"] == "msg" && v["dir"] == "in" && v["json"]["params"]["tag"] == tag
}

fn fault(what: &'static str, dir: &'static str) -> impl Fn(&Value) -> bool {
    move |v| v["ev"] == "fault" && v["fault"] == what && v["dir"] == dir
}

// ---- the daemon on a cloud link, and a local client that reports ---------------------------

/// The answer a report got.
#[derive(Clone, Debug)]
struct Report {
    id: u64,
    tag: String,
    answer: Value,
}

impl Report {
    fn ok(&self) -> bool {
        self.answer["result"] == "ok"
    }
    fn error(&self) -> Option<&str> {
        self.answer["error"]["message"].as_str()
    }
}

/// A local client on 54322 that sends reports, answers cloud commands, and files everything it
/// receives: answers to its reports by id, the rest in order.
struct Client {
    c: LocalClient,
    name: String,
    next: u64,
    /// How many answers each report id got.
    answers: HashMap<u64, Vec<Value>>,
    /// Everything else: broadcasts, cloud commands, answers to `local.*`.
    inbox: Vec<Value>,
    /// Answer cloud commands (with `["ok"]`).
    auto_reply: bool,
    /// `inbox` up to here was searched for broadcasts already.
    seen_bc: usize,
}

impl Client {
    fn connect(port: u16, name: &str) -> Client {
        let mut c = Client {
            c: LocalClient::connect(port),
            name: name.into(),
            next: 1,
            answers: HashMap::new(),
            inbox: Vec::new(),
            auto_reply: true,
            seen_bc: 0,
        };
        // An ordinary client from its first message on (L§2): it gets broadcasts and commands.
        let st = c.local("local.query_status");
        assert_eq!(st["method"], "local.status", "{st}");
        c
    }

    fn file(&mut self, v: Value) {
        if v.get("method").is_none() {
            if let Some(id) = v["id"].as_u64() {
                self.answers.entry(id).or_default().push(v);
                return;
            }
        }
        let method = v["method"].as_str().unwrap_or("");
        if self.auto_reply && method != "local.status" && method != "local.time" {
            if let Some(id) = v["id"].as_u64() {
                self.c.send(&format!(r#"{{"id":{id},"result":["ok"]}}"#));
            }
        }
        self.inbox.push(v);
    }

    /// Reads until `done` holds or the deadline passes.
    fn pump(&mut self, limit: Duration, mut done: impl FnMut(&Client) -> bool) -> bool {
        let end = Instant::now() + limit;
        loop {
            if done(self) {
                return true;
            }
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            match self.c.recv(left.min(Duration::from_millis(200))) {
                Some(v) => self.file(v),
                None => {
                    if Instant::now() >= end {
                        return done(self);
                    }
                }
            }
        }
    }

    /// A `local.*` query and its answer.
    fn local(&mut self, method: &str) -> Value {
        let id = 900_000 + self.next;
        self.next += 1;
        self.c
            .send(&format!(r#"{{"id":{id},"method":"{method}"}}"#));
        let mut got = None;
        let found = self.pump(T, |c| {
            got = c
                .inbox
                .iter()
                .rev()
                .find(|v| v["id"] == id && v["method"].is_string())
                .cloned();
            got.is_some()
        });
        assert!(found, "{method}: no answer");
        got.unwrap()
    }

    /// Sends `n` reports in one write and waits for an answer to each.
    fn reports(&mut self, n: usize) -> Vec<Report> {
        let sent = self.send_reports(n);
        self.collect(sent)
    }

    /// Sends `n` reports in one write; their ids and tags.
    fn send_reports(&mut self, n: usize) -> Vec<(u64, String)> {
        let mut text = String::new();
        let mut sent = Vec::new();
        for _ in 0..n {
            let id = self.next;
            self.next += 1;
            let tag = format!("{}-{id}", self.name);
            text.push_str(&format!(
                r#"{{"id":{id},"method":"props","params":{{"tag":"{tag}"}}}}"#
            ));
            sent.push((id, tag));
        }
        self.c.send(&text);
        sent
    }

    /// Waits for an answer to each report sent.
    fn collect(&mut self, sent: Vec<(u64, String)>) -> Vec<Report> {
        let ids: Vec<u64> = sent.iter().map(|s| s.0).collect();
        let all = self.pump(T, |c| ids.iter().all(|id| c.answers.contains_key(id)));
        assert!(all, "reports not all answered: {:?}", self.answers);
        sent.into_iter()
            .map(|(id, tag)| Report {
                answer: self.answers[&id][0].clone(),
                id,
                tag,
            })
            .collect()
    }

    /// Waits for the next broadcast `local.status` `event` after the last one waited for (any
    /// event); each broadcast is taken once.
    fn broadcast(&mut self, event: &str, limit: Duration) -> bool {
        let mut hit = None;
        let from = self.seen_bc;
        self.pump(limit, |c| {
            hit = c.inbox[from..]
                .iter()
                .position(|v| {
                    v["method"] == "local.status" && v["id"].is_null() && v["params"] == event
                })
                .map(|i| from + i + 1);
            hit.is_some()
        });
        if let Some(next) = hit {
            self.seen_bc = next;
        }
        hit.is_some()
    }

    /// Reads (and answers commands) for a while.
    fn idle(&mut self, d: Duration) {
        self.pump(d, |_| false);
    }

    /// Reports one at a time until one is acked (the link may be coming back); that report.
    fn until_acked(&mut self, limit: Duration) -> Report {
        let end = Instant::now() + limit;
        loop {
            let r = self.reports(1).remove(0);
            if r.ok() {
                return r;
            }
            assert!(
                Instant::now() < end,
                "no report acked within {limit:?}: {r:?}"
            );
            // Not up yet (-30011): the next try after a moment, without spinning.
            self.idle(Duration::from_millis(300));
        }
    }
}

/// The daemon against `miio_fakecloud` over one transport, with short timers: a keepalive every
/// second, and the ack timeout of each test (UDP resends after 1, 2 and 3 timeouts). A short one
/// makes a lost ack cost little; where an ack must not time out it is 2 s or more, for a loaded
/// machine.
struct Net {
    ctl: Ctl,
    d: Daemon,
    c: Client,
    transport: &'static str,
    _cloud: FakeCloudProc,
    _dir: TempDir,
}

fn net_args(dir: &TempDir, port: u16, transport: &str) -> Vec<String> {
    cloud_args(dir, port)
        .link(transport)
        .opt("--keepalive", 1)
        .opt("--ack-timeout", 2)
        .opt("--helper-grace", "0.2")
        .build()
}

impl Net {
    fn start(name: &str, transport: &'static str, ack_timeout: &str) -> Net {
        let cloud = fakecloud();
        let ctl = Ctl::connect(cloud.ctl);
        let dir = provisioned_dir(&format!("{name}-{transport}"));
        let mut a = net_args(&dir, cloud.port, transport);
        set_opt(&mut a, "--ack-timeout", ack_timeout);
        let d = Daemon::start(&dir, &a);
        assert!(d.wait_log("STATE_CLOUD_CONNECTED", T), "{}", d.log_text());
        let c = Client::connect(d.local(), &format!("{name}-{transport}"));
        Net {
            ctl,
            d,
            c,
            transport,
            _cloud: cloud,
            _dir: dir,
        }
    }

    fn udp(&self) -> bool {
        self.transport == "udp"
    }

    /// Pushes a command from the cloud; its id.
    fn push(&mut self, method: &str, params: Value) -> u64 {
        let a = self
            .ctl
            .cmd(json!({"cmd":"send","json":{"method":method,"params":params}}));
        a["id"].as_u64().unwrap()
    }

    /// Waits for the local client's answer to cloud command `id` at the cloud (the client reads
    /// and answers meanwhile).
    fn reply(&mut self, id: u64) -> Value {
        let want = |v: &Value| v["ev"] == "reply" && v["json"]["id"] == id;
        let mut got = None;
        let ctl = &self.ctl;
        self.c.pump(T, |_| {
            got = ctl.wait(Duration::ZERO, want);
            got.is_some()
        });
        let r = got.unwrap_or_else(|| panic!("no reply to command {id}\n{}", self.d.log_text()));
        assert_eq!(r["json"]["result"][0], "ok", "{r}");
        r
    }

    /// The invariants, after the faults are off: a report is acked again (the barrier); every
    /// report got exactly one answer, `ok` or -30011; every acked one reached the cloud; the daemon
    /// runs, and a new client and a LAN phone are served.
    fn finish(&mut self, reports: &[Report]) {
        self.ctl.clear();
        let probe = self.c.until_acked(RECOVER);
        for (id, a) in &self.c.answers {
            assert_eq!(a.len(), 1, "report {id} answered {} times: {a:?}", a.len());
        }
        for r in reports.iter().chain([&probe]) {
            assert!(
                r.ok() || r.answer["error"]["code"] == -30011,
                "unexpected answer {r:?}"
            );
            if r.ok() {
                assert!(
                    self.ctl.wait(T, up_tag(&r.tag)).is_some(),
                    "acked report {} never reached the cloud",
                    r.tag
                );
            }
        }
        assert!(self.d.is_running(), "{}", self.d.log_text());
        let mut other = Client::connect(self.d.local(), &format!("{}-other", self.c.name));
        assert!(other.until_acked(T).ok());
        let phone = Phone::new(self.d.lan(), TOKEN);
        assert!(phone.info_ok(7), "LAN phone not served");
    }
}

// ---- drop ------------------------------------------------------------------------------------

/// Lost requests and lost acks (an ack timeout of 1 s). UDP resends under the same cloud id (P§5.7 D5), so every report is
/// acked; TCP never resends, so a lost request or ack is `OT server noack`. Then 30% of all packets
/// both ways (seeded) for 20 reports: whatever the link does, nothing acked is lost.
fn drop_family(t: &'static str) {
    let mut n = Net::start("drop", t, "1");
    let mut all = Vec::new();

    // The first sends of two of three reports are lost.
    n.ctl
        .cmd(json!({"cmd":"drop","dir":"in","kind":"data","n":2}));
    let r = n.c.reports(3);
    n.ctl.status();
    assert_eq!(n.ctl.count(fault("drop", "in")), 2);
    if n.udp() {
        assert!(r.iter().all(Report::ok), "{r:?}\n{}", n.d.log_text());
        assert!(n.d.log_has("retransmit id:"), "{}", n.d.log_text());
    } else {
        let noack: Vec<_> = r
            .iter()
            .map(|r| r.error() == Some("OT server noack"))
            .collect();
        assert_eq!(noack, [true, true, false], "{r:?}");
    }
    all.extend(r);

    // The ack is lost: over UDP the cloud receives the request twice (the resend) and the client
    // is answered once; over TCP the client hears noack although the cloud has the report.
    n.ctl
        .cmd(json!({"cmd":"drop","dir":"out","kind":"data","n":1}));
    let r = n.c.reports(1);
    let tag = r[0].tag.clone();
    if n.udp() {
        assert!(r[0].ok(), "{r:?}");
        assert!(
            n.ctl.wait_nth(T, 2, up_tag(&tag)).is_some(),
            "no resend seen"
        );
    } else {
        assert_eq!(r[0].error(), Some("OT server noack"), "{r:?}");
        assert!(n.ctl.wait(T, up_tag(&tag)).is_some());
    }
    all.extend(r);

    // Two keepalives lost in a row are two misses, not a lost link (P§5.6: the third one is).
    let m = n.ctl.mark();
    n.ctl
        .cmd(json!({"cmd":"drop","dir":"in","kind":"control","n":2}));
    let second = n
        .ctl
        .wait_from(m, T, 2, fault("drop", "in"))
        .expect("keepalives dropped");
    // Barrier: two keepalives answered after the drops.
    let ka = |v: &Value| v["ev"] == "keepalive";
    assert!(n.ctl.wait_from(second, T, 2, ka).is_some());
    assert!(!n.d.log_has(RETRY), "{}", n.d.log_text());

    // 30% loss both ways, every kind of packet, a seeded draw.
    n.ctl.cmd(json!({"cmd":"drop","rate":0.3,"seed":7}));
    for _ in 0..4 {
        all.extend(n.c.reports(5));
    }
    let ok = all.iter().filter(|r| r.ok()).count();
    eprintln!(
        "drop {t}: {ok} of {} reports acked, {} packets dropped",
        all.len(),
        n.ctl.count(|v| v["ev"] == "fault" && v["fault"] == "drop")
    );
    n.finish(&all);
}

#[test]
fn drop_udp() {
    drop_family("udp");
}

#[test]
fn drop_tcp() {
    drop_family("tcp");
}

// ---- duplicate -------------------------------------------------------------------------------

/// Every data packet twice, both ways: the cloud receives each report twice and acks it twice, the
/// daemon answers the client once (the second ack is swallowed, P§5.8); a command pushed twice
/// reaches the local client once (`cloud msg repeated`) and its reply reaches the cloud.
fn dup_family(t: &'static str) {
    let mut n = Net::start("dup", t, "2");
    n.ctl.cmd(json!({"cmd":"dup","kind":"data"}));
    let r = n.c.reports(5);
    assert!(r.iter().all(Report::ok), "{r:?}");
    for x in &r {
        assert!(
            n.ctl.wait_nth(T, 2, up_tag(&x.tag)).is_some(),
            "{} not doubled",
            x.tag
        );
    }
    let mut ids = Vec::new();
    for k in 0..3 {
        ids.push(n.push("get_prop", json!(["power", k])));
    }
    for id in &ids {
        n.reply(*id);
    }
    n.finish(&r);
    // The barrier in finish (a report acked after the faults were off) came after every copy.
    for id in &ids {
        let seen = n.c.inbox.iter().filter(|v| v["id"] == *id).count();
        assert_eq!(seen, 1, "command {id} reached the client {seen} times");
    }
    assert!(n.d.log_has("cloud msg repeated"), "{}", n.d.log_text());
}

#[test]
fn dup_udp() {
    dup_family("udp");
}

#[test]
fn dup_tcp() {
    dup_family("tcp");
}

// ---- reorder ---------------------------------------------------------------------------------

/// Each data packet is held until the next one has passed (at most 200 ms), both ways: the cloud
/// receives the reports out of order and acks them out of order; the daemon matches acks by id,
/// so every report gets its own ack, once.
fn reorder_family(t: &'static str) {
    let mut n = Net::start("reorder", t, "2");
    n.ctl.cmd(json!({"cmd":"reorder","kind":"data","ms":200}));
    let r = n.c.reports(6);
    assert!(r.iter().all(Report::ok), "{r:?}\n{}", n.d.log_text());
    for x in &r {
        assert!(n.ctl.wait(T, up_tag(&x.tag)).is_some());
    }
    assert!(n.ctl.wait(T, fault("release", "in")).is_some());
    assert!(n.ctl.wait(T, fault("release", "out")).is_some());
    let id = n.push("get_prop", json!(["power"]));
    n.reply(id);
    n.ctl.status();
    // The cloud's order of arrival is not the order of sending.
    let got: Vec<u64> = n
        .ctl
        .events(|v| v["ev"] == "msg" && v["dir"] == "in" && v["json"]["method"] == "props")
        .iter()
        .filter_map(|v| v["json"]["params"]["tag"].as_str())
        .filter_map(|tag| r.iter().find(|x| x.tag == tag).map(|x| x.id))
        .collect();
    let mut sorted = got.clone();
    sorted.sort_unstable();
    assert_ne!(got, sorted, "nothing was reordered: {got:?}");
    n.finish(&r);
}

#[test]
fn reorder_udp() {
    reorder_family("udp");
}

#[test]
fn reorder_tcp() {
    reorder_family("tcp");
}

// ---- delay -----------------------------------------------------------------------------------

/// Every packet 150 ms late both ways (a round trip well under the 1 s ack timeout): all acked.
/// Then 700 ms (a round trip of 1.4 s): UDP resends and takes the late ack; TCP answers noack and
/// swallows the late ack (P§5.7, P§5.8). The keepalive keeps the link up throughout.
fn delay_family(t: &'static str) {
    let mut n = Net::start("delay", t, "1");
    n.ctl.cmd(json!({"cmd":"delay","ms":150}));
    let mut all = n.c.reports(4);
    assert!(all.iter().all(Report::ok), "{all:?}");
    assert!(n.ctl.wait(T, fault("delay", "out")).is_some());

    n.ctl.cmd(json!({"cmd":"delay","ms":700}));
    let r = n.c.reports(3);
    if n.udp() {
        assert!(r.iter().all(Report::ok), "{r:?}\n{}", n.d.log_text());
        assert!(
            n.ctl.wait_nth(T, 2, up_tag(&r[0].tag)).is_some(),
            "no resend"
        );
    } else {
        for x in &r {
            assert_eq!(x.error(), Some("OT server noack"), "{r:?}");
            // The cloud has it: noack does not mean lost.
            assert!(n.ctl.wait(T, up_tag(&x.tag)).is_some());
        }
        assert!(n.d.wait_log("cloud ack swallowed", T), "{}", n.d.log_text());
    }
    all.extend(r);
    n.finish(&all);
    assert!(!n.d.log_has(RETRY), "{}", n.d.log_text());
}

#[test]
fn delay_udp() {
    delay_family("udp");
}

#[test]
fn delay_tcp() {
    delay_family("tcp");
}

// ---- silence and lost keepalives ---------------------------------------------------------------

/// A cloud that answers nothing (`silent`), then one whose keepalives are lost three times in a row:
/// the link is declared lost (P§5.6), pending and new reports get -30011 at once, and the link comes
/// back by itself.
fn silent_family(t: &'static str) {
    let mut n = Net::start("silent", t, "1");
    let mut all = n.c.reports(2);
    n.ctl.cmd(json!({"cmd":"silent","on":true}));
    // Sent into the silence: the ack never comes; the answer is noack or, when the link is declared
    // lost first, disconnected.
    all.extend(n.c.reports(2));
    assert!(n.c.broadcast("cloud_retry", T), "{}", n.d.log_text());
    let down = n.c.reports(1);
    assert_eq!(down[0].error(), Some("OT server disconnected"), "{down:?}");
    all.extend(down);
    n.ctl.cmd(json!({"cmd":"silent","on":false}));
    assert!(
        n.c.broadcast("cloud_connected", RECOVER),
        "{}",
        n.d.log_text()
    );
    all.extend(n.c.reports(2));

    // Three keepalives lost in a row.
    n.ctl
        .cmd(json!({"cmd":"drop","dir":"in","kind":"control","n":3}));
    assert!(n.c.broadcast("cloud_retry", T), "{}", n.d.log_text());
    assert!(
        n.c.broadcast("cloud_connected", RECOVER),
        "{}",
        n.d.log_text()
    );
    all.extend(n.c.reports(2));
    n.finish(&all);
}

#[test]
fn silent_udp() {
    silent_family("udp");
}

#[test]
fn silent_tcp() {
    silent_family("tcp");
}

// ---- TCP reset mid-packet ----------------------------------------------------------------------

/// The cloud resets the TCP connection after 10 bytes of an ack (the daemon holds a partial frame),
/// and, once the link is back, on receiving a report it never reads: each time the link is lost,
/// the pending report gets -30011 disconnected, and the link comes back.
#[test]
fn tcp_reset_mid_packet() {
    let mut n = Net::start("reset", "tcp", "3");
    let mut all = n.c.reports(1);
    n.ctl
        .cmd(json!({"cmd":"reset_tcp","dir":"out","kind":"data","after":10}));
    let r = n.c.reports(1);
    assert_eq!(r[0].error(), Some("OT server disconnected"), "{r:?}");
    assert!(n.ctl.wait(T, up_tag(&r[0].tag)).is_some());
    assert!(n.ctl.wait(T, fault("reset_tcp", "out")).is_some());
    all.extend(r);
    assert!(
        n.c.broadcast("cloud_connected", RECOVER),
        "{}",
        n.d.log_text()
    );

    n.ctl
        .cmd(json!({"cmd":"reset_tcp","dir":"in","kind":"data"}));
    let r = n.c.reports(1);
    assert_eq!(r[0].error(), Some("OT server disconnected"), "{r:?}");
    assert!(n.ctl.wait(T, fault("reset_tcp", "in")).is_some());
    assert!(
        n.c.broadcast("cloud_connected", RECOVER),
        "{}",
        n.d.log_text()
    );
    let unread = r[0].tag.clone();
    all.extend(r);
    n.finish(&all);
    // After the barrier: the report the cloud reset on never reached it.
    assert_eq!(n.ctl.count(up_tag(&unread)), 0);
}

// ---- misbehaving local peers -------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum HelperMode {
    /// Answers every request with garbage: bytes that are not JSON, a JSON array, the right
    /// answer method with invalid params, unknown `_internal.*` methods, a stray reply, a message
    /// over the size limit, and junk on the hello connection itself.
    Junk,
    /// Says hello and reads, and never answers.
    Silent,
}

/// A helper double on 54322 (L§9.2): one hello connection after another, each reading the one
/// message the daemon writes on it. Everything it was sent is kept.
struct FakeHelper {
    stop: Arc<std::sync::atomic::AtomicBool>,
    got: Arc<Mutex<Vec<Value>>>,
    join: Option<std::thread::JoinHandle<()>>,
}

/// Writes `bytes` on a connection of its own (as `miio_send_line` does) and reads what the
/// daemon says until it closes or a short while passes.
fn send_line(port: u16, bytes: &[u8]) {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return;
    };
    let _ = s.write_all(bytes);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
    let mut sink = [0u8; 4096];
    while let Ok(n) = std::io::Read::read(&mut s, &mut sink) {
        if n == 0 {
            break;
        }
    }
}

fn junk(port: u16, request: &str) {
    let answer = match request {
        "_internal.request_dinfo" => {
            r#"{"method":"_internal.response_dinfo","params":{"did":-5,"key":"short","mac":"nope"}}"#
        }
        "_internal.request_dtoken" => {
            r#"{"method":"_internal.response_dtoken","params":"bad token!"}"#
        }
        "_internal.info" => r#"{"method":"_internal.info","params":"junk"}"#,
        // Any params would be an answer here (anything but 1 means AP mode, L§9.3): garbage only.
        _ => r#"{"method":"_internal.res_wifi_conf_statu","params":1}"#,
    };
    let big = format!(
        r#"{{"method":"_internal.info","params":"{}"}}"#,
        "A".repeat(20_000)
    );
    for bytes in [
        &b"\x00\xffnot json at all {{{"[..],
        b"[1,2,3]",
        answer.as_bytes(),
        br#"{"method":"_internal.no_such_thing","params":{"x":[1,{"y":null}]}}"#,
        br#"{"id":4242,"result":"stray"}"#,
        br#"{"method":"_internal.wifi_connected","params":"junk"}"#,
        big.as_bytes(),
    ] {
        send_line(port, bytes);
    }
}

impl FakeHelper {
    fn start(port: u16, mode: HelperMode) -> FakeHelper {
        let stop: Arc<std::sync::atomic::AtomicBool> = Default::default();
        let got: Arc<Mutex<Vec<Value>>> = Default::default();
        let (s2, g2) = (stop.clone(), got.clone());
        let join = std::thread::spawn(move || {
            use std::sync::atomic::Ordering::Relaxed;
            while !s2.load(Relaxed) {
                let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
                    std::thread::park_timeout(Duration::from_millis(50));
                    continue;
                };
                let _ = s.write_all(br#"{"method":"_internal.hello"}"#);
                let _ = s.set_read_timeout(Some(Duration::from_millis(100)));
                let mut split = miio_client::wire::json_stream::Splitter::new(1 << 20);
                let mut buf = [0u8; 4096];
                let msg = loop {
                    if s2.load(Relaxed) {
                        return;
                    }
                    if let Some(v) = split.next() {
                        break v
                            .ok()
                            .and_then(|b| serde_json::from_slice::<Value>(&b).ok());
                    }
                    match std::io::Read::read(&mut s, &mut buf) {
                        Ok(0) => break None,
                        Ok(n) => split.push(&buf[..n]),
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                        Err(_) => break None,
                    }
                };
                let Some(msg) = msg else { continue };
                g2.lock().unwrap().push(msg.clone());
                if mode == HelperMode::Junk {
                    let _ = s.write_all(b"}}} junk on the hello connection");
                    junk(port, msg["method"].as_str().unwrap_or(""));
                }
                // One hello after another, as the shipped script loops, without spinning.
                std::thread::park_timeout(Duration::from_millis(50));
            }
        });
        FakeHelper {
            stop,
            got,
            join: Some(join),
        }
    }

    fn got(&self) -> Vec<Value> {
        self.got.lock().unwrap().clone()
    }
}

impl Drop for FakeHelper {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
    }
}

/// A helper that answers junk, or nothing: every step it was asked falls back to the daemon's own
/// data after `--helper-timeout` (L§9.5), the session comes up, reports and commands flow, and the
/// helper's connections never receive a broadcast or a command (L§4.2).
fn bad_helper(mode: HelperMode) {
    let cloud = fakecloud();
    let mut ctl = Ctl::connect(cloud.ctl);
    let dir = provisioned_dir(&format!("helper-{mode:?}"));
    let mut a = net_args(&dir, cloud.port, "udp");
    // Only the helper is waited for; each unanswered request ends after one second.
    set_opt(&mut a, "--helper-grace", "60");
    a.extend(["--helper-timeout", "1"].map(String::from));
    let mut d = Daemon::start(&dir, &a);
    let h = FakeHelper::start(d.local(), mode);
    assert!(d.wait_log("STATE_CLOUD_CONNECTED", T), "{}", d.log_text());
    for step in [
        "_internal.request_dinfo",
        "_internal.request_dtoken",
        "_internal.req_wifi_conf_status",
        "_internal.info",
    ] {
        let line = format!("helper did not answer {step} within");
        assert!(d.log_has(&line), "{line}\n{}", d.log_text());
    }
    if mode == HelperMode::Junk {
        // The first refusal; later ones share the process-wide warning limit (1/s) with the
        // closed connections.
        let first = "invalid _internal.response_dinfo";
        assert!(d.log_has(first), "{}", d.log_text());
        assert!(d.log_has("message over 16384 bytes, closing"));
    }
    assert!(!d.log_has("No helper script? using data files"));

    let mut c = Client::connect(d.local(), &format!("helper-{mode:?}"));
    let r = c.reports(3);
    assert!(r.iter().all(Report::ok), "{r:?}");
    for x in &r {
        assert!(ctl.wait(T, up_tag(&x.tag)).is_some());
    }
    let id = ctl.cmd(json!({"cmd":"send","json":{"method":"get_prop","params":[]}}))["id"]
        .as_u64()
        .unwrap();
    let want = |v: &Value| v["ev"] == "reply" && v["json"]["id"] == id;
    assert!(c.pump(T, |_| ctl.wait(Duration::ZERO, want).is_some()));
    // The session's _otc.info carries the daemon's own INFO, not the junk.
    let info = ctl
        .wait(T, |v| {
            v["ev"] == "msg" && v["json"]["method"] == "_otc.info"
        })
        .unwrap();
    assert_eq!(info["json"]["params"]["hw_ver"], "Linux", "{info}");
    assert!(d.is_running());
    assert!(Phone::new(d.lan(), TOKEN).info_ok(3));
    // Whatever reached a helper connection is in `got` (the command and the broadcasts above
    // went out before their effects we waited for), and only requests may be there.
    for m in h.got() {
        let method = m["method"].as_str().unwrap_or("");
        assert!(method.starts_with("_internal."), "the helper got {m}");
    }
    assert!(!h.got().is_empty(), "the helper was asked");
}

#[test]
fn helper_that_answers_junk() {
    bad_helper(HelperMode::Junk);
}

#[test]
fn helper_that_never_answers() {
    bad_helper(HelperMode::Silent);
}

/// A client that stops reading while 4 KiB commands are broadcast: closed once more than 64 KiB
/// wait for it (L§2), with one log line; meanwhile the client that reads gets every command and
/// its replies reach the cloud, reports are acked, and a phone is served.
#[test]
fn client_that_stops_reading() {
    let mut n = Net::start("deaf", "udp", "2");
    let mut deaf = LocalClient::connect(n.d.local());
    deaf.send(r#"{"id":1,"method":"local.query_status"}"#);
    assert!(deaf.recv_until(T, |v| v["id"] == 1).is_some());
    // From here on `deaf` reads nothing.
    let blob = "x".repeat(4000);
    let closed = "more than 64 KiB unsent (it does not read), closing";
    let mut pushed = 0;
    while !n.d.log_has(closed) {
        assert!(pushed < 500, "never closed\n{}", n.d.log_text());
        let id = n.push("set_blob", json!([pushed, blob]));
        n.reply(id);
        pushed += 1;
    }
    eprintln!("deaf client closed after {pushed} commands of 4 KiB");
    // The deaf client's connection ends (a reset, after what the kernel had buffered).
    deaf.stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = vec![0u8; 65536];
    let end = Instant::now() + T;
    let eof = loop {
        assert!(Instant::now() < end, "the deaf client was never cut off");
        match std::io::Read::read(&mut deaf.stream, &mut buf) {
            Ok(0) | Err(_) => break true,
            Ok(_) => {}
        }
    };
    assert!(eof);
    // The reading client got every command once.
    let cmds =
        n.c.inbox
            .iter()
            .filter(|v| v["method"] == "set_blob")
            .count();
    assert_eq!(cmds, pushed);
    let r = n.c.reports(3);
    assert!(r.iter().all(Report::ok), "{r:?}");
    n.finish(&r);
}

// ---- a full or read-only data dir at each file write -------------------------------------------

/// What the data dir does to the next write.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum DiskFault {
    /// No free page: a temp file is created, its write fails.
    NoSpace,
    /// No free inode: the temp file cannot be created.
    NoInode,
    /// Remounted read-only.
    ReadOnly,
}

use DiskFault::*;

impl DiskFault {
    fn errno(self) -> &'static str {
        match self {
            NoSpace | NoInode => "No space left on device",
            ReadOnly => "Read-only file system",
        }
    }
}

/// The daemon in a mount namespace of its own (`unshare -m`), its data dir a tmpfs of 16 pages and
/// 32 inodes, filled or remounted from outside (`nsenter` into that namespace) while it runs: the
/// only way to make a write fail for a root CI, and one that leaves the host alone.
struct Disk {
    d: Daemon,
    /// The data dir, without the trailing slash.
    path: String,
    _data: TempDir,
    _src: TempDir,
    _log: TempDir,
}

/// Names of the fillers: not data files, ignored by the checks.
const FILL: &str = "zz.fill";

fn namespaces_usable() -> bool {
    let ok = |cmd: &mut Command| {
        cmd.stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    ok(Command::new("unshare").args(["-m", "sh", "-c", "mount -t tmpfs tmpfs /mnt"]))
        && ok(Command::new("nsenter").arg("--version"))
}

impl Disk {
    /// `files` go into the tmpfs; `fault`, when given, is in place before the daemon starts.
    /// None, with a visible skip, without root, unshare or nsenter.
    fn start(
        tag: &str,
        files: &[(&str, &str)],
        fault: Option<DiskFault>,
        args: impl FnOnce(&TempDir) -> Vec<String>,
    ) -> Option<Disk> {
        if !namespaces_usable() {
            skip("root, unshare and nsenter for a mount namespace");
            return None;
        }
        let src = TempDir::new(&format!("{tag}-src"));
        for (name, text) in files {
            src.write(name, text);
        }
        let data = TempDir::new(tag);
        let log = TempDir::new(&format!("{tag}-log"));
        let path = data.path().display().to_string();
        let setup = format!(
            "mount -t tmpfs -o size=64k,nr_inodes=32 tmpfs {path} && cp -a {}/. {path}/ {}",
            src.path().display(),
            fault.map_or(String::new(), |f| format!("&& {}", fault_script(&path, f)))
        );
        let script = format!("{setup} && exec \"$0\" \"$@\"");
        let a = args(&data);
        let d = Daemon::start_via(&["unshare", "-m", "sh", "-c", &script], &log, &a);
        Some(Disk {
            d,
            path,
            _data: data,
            _src: src,
            _log: log,
        })
    }

    /// Runs `script` in the daemon's mount namespace.
    fn sh(&self, script: &str) {
        let pid = self.d.child.id().to_string();
        let out = Command::new("nsenter")
            .args(["-t", &pid, "-m", "sh", "-c", script])
            .output()
            .expect("nsenter");
        assert!(out.status.success(), "{script}: {out:?}");
    }

    fn fault(&self, f: DiskFault) {
        self.sh(&fault_script(&self.path, f));
    }

    fn undo(&self, f: DiskFault) {
        let p = &self.path;
        self.sh(&match f {
            NoSpace | NoInode => format!("rm -f {p}/{FILL}*"),
            ReadOnly => format!("mount -o remount,rw {p}"),
        });
    }

    /// After `fault(NoSpace)` or `fault(NoInode)`: frees exactly one page or one inode.
    fn leave_one(&self, f: DiskFault) {
        let p = &self.path;
        self.sh(&match f {
            NoSpace => format!("truncate -s -4096 {p}/{FILL}"),
            NoInode => format!("rm {p}/{FILL}.0"),
            ReadOnly => unreachable!(),
        });
    }

    /// The data dir as the daemon sees it.
    fn root(&self) -> String {
        format!("/proc/{}/root{}", self.d.child.id(), self.path)
    }

    fn read(&self, name: &str) -> Option<String> {
        std::fs::read_to_string(format!("{}/{name}", self.root())).ok()
    }

    /// No data file is torn: each of `want` is absent or holds one of the contents allowed (None:
    /// absent) and parses, and no temp file is left.
    fn check_files(&self, want: &[(&str, &[Option<&str>])]) {
        let names: Vec<String> = std::fs::read_dir(self.root())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        let temps: Vec<&String> = names.iter().filter(|n| n.contains(".tmp")).collect();
        assert!(temps.is_empty(), "temp files left: {temps:?}");
        for (name, allowed) in want {
            let got = self.read(name);
            assert!(
                allowed.contains(&got.as_deref()),
                "{name}: {got:?}, expected one of {allowed:?}"
            );
            let Some(text) = got else { continue };
            let parsed = match *name {
                "wifi.conf" => miio_client::config::wifi::parse(&text).map(drop),
                "device.token" => miio_client::config::token::parse(&text).map(drop),
                "device.country" => miio_client::config::country::parse(&text).map(drop),
                "device.conf" => miio_client::config::device::parse(&text).map(drop),
                _ => Ok(()),
            };
            assert!(parsed.is_ok(), "{name} does not parse: {text:?}");
        }
    }
}

fn fault_script(p: &str, f: DiskFault) -> String {
    match f {
        // dd stops at ENOSPC (a whole number of pages on tmpfs); the status is that error.
        NoSpace => format!("{{ dd if=/dev/zero of={p}/{FILL} bs=4096 2>/dev/null; true; }}"),
        NoInode => format!(
            "i=0; while touch {p}/{FILL}.$i 2>/dev/null; do i=$((i+1)); done; test -e {p}/{FILL}.0"
        ),
        ReadOnly => format!("mount -o remount,ro {p}"),
    }
}

const OLD_WIFI: &str = "ssid=\"home\"\npsk=\"secretpw\"\nkey_mgmt=WPA\n";
const OLD_TOKEN: &str = "ABCDEFGHIJKLMNOP";
const ROUTER: &str = r#"{"id":77,"method":"local.ble.config_router","params":{"ssid":"new","passwd":"pw12345678","uid":"42","country_domain":"de"}}"#;

/// The new wifi.conf of `ROUTER`.
fn new_wifi() -> String {
    let w = miio_client::config::wifi::WifiConf::new("new", "pw12345678", Some(42));
    miio_client::config::wifi::render(&w)
}

/// A provisioned device in STA mode, connected to a fake cloud.
fn sta_disk(tag: &str, cloud: &FakeCloudProc) -> Option<Disk> {
    let files = [
        ("device.conf", GOOD_DEVICE_CONF),
        ("device.token", OLD_TOKEN),
        ("wifi.conf", OLD_WIFI),
    ];
    let port = cloud.port;
    let disk = Disk::start(tag, &files, None, |data| {
        let mut a = net_args(data, port, "udp");
        a.extend(["--helper-timeout", "0.5"].map(String::from));
        a
    })?;
    assert!(
        disk.d.wait_log("STATE_CLOUD_CONNECTED", T),
        "{}",
        disk.d.log_text()
    );
    Some(disk)
}

/// Sends a provisioning on 54322 and returns its answer.
fn provision(c: &mut Client) -> Value {
    c.c.send(ROUTER);
    let mut got = None;
    c.pump(T, |c| {
        got = c.answers.get(&77).and_then(|a| a.last().cloned());
        got.is_some()
    });
    c.answers.remove(&77);
    got.expect("config_router answered")
}

/// wifi.conf at a provisioning in STA mode (L§8 step 1): refused with -33020 and the errno logged,
/// the session and the old files kept; once the disk is back, the same request is written whole.
fn provisioning_write(f: DiskFault) {
    let cloud = fakecloud();
    let Some(disk) = sta_disk(&format!("disk-wifi-{f:?}"), &cloud) else {
        return;
    };
    let mut c = Client::connect(disk.d.local(), &format!("disk-wifi-{f:?}"));
    disk.fault(f);
    let r = provision(&mut c);
    assert_eq!(
        r,
        json!({"id":77,"error":{"code":-33020,"message":"cannot write wifi.conf"}}),
        "{}",
        disk.d.log_text()
    );
    assert!(disk.d.log_has(f.errno()), "{}", disk.d.log_text());
    assert!(c.until_acked(T).ok(), "the session is kept");
    assert_eq!(
        disk.d.log_text().matches("STATE_CLOUD_CONNECTED").count(),
        1
    );
    disk.check_files(&[
        ("wifi.conf", &[Some(OLD_WIFI)]),
        ("device.token", &[Some(OLD_TOKEN)]),
        ("device.country", &[None]),
    ]);
    disk.undo(f);
    let r = provision(&mut c);
    assert_eq!(r["result"][0], "OK", "{r}");
    let new = new_wifi();
    disk.check_files(&[
        ("wifi.conf", &[Some(&new)]),
        ("device.token", &[Some(OLD_TOKEN)]),
        ("device.country", &[Some("de\n")]),
    ]);
    // Without a helper the router change is done at once (D9): the session comes back.
    assert!(
        c.broadcast("cloud_connected", RECOVER),
        "{}",
        disk.d.log_text()
    );
    let r = c.until_acked(RECOVER);
    assert!(r.ok());
}

#[test]
fn disk_provisioning_no_space() {
    provisioning_write(NoSpace);
}

#[test]
fn disk_provisioning_no_inode() {
    provisioning_write(NoInode);
}

#[test]
fn disk_provisioning_read_only() {
    provisioning_write(ReadOnly);
}

/// device.country (L§8 step 2) in AP mode, where wifi.conf is new: one page (or inode) left, so
/// wifi.conf takes it and device.country finds none. The provisioning goes on (the country is kept
/// in memory for this run), the errno is logged, and no file is torn. Read-only cannot be reached
/// here: wifi.conf, written just before in the same turn, needs the same dir writable.
fn country_write(f: DiskFault) {
    let dead = DeadPort::new();
    let files = [("device.conf", GOOD_DEVICE_CONF)];
    let Some(disk) = Disk::start(&format!("disk-cc-{f:?}"), &files, None, |data| {
        cloud_args(data, dead.port)
            .opt("--helper-grace", "0.2")
            .build()
    }) else {
        return;
    };
    assert!(
        disk.d.wait_log("STATE_WIFI_AP_MODE", T),
        "{}",
        disk.d.log_text()
    );
    let token = disk.read("device.token").expect("a token stored at start");
    let mut c = Client::connect(disk.d.local(), &format!("disk-cc-{f:?}"));
    disk.fault(f);
    disk.leave_one(f);
    let r = provision(&mut c);
    assert_eq!(r["result"][0], "OK", "{r}\n{}", disk.d.log_text());
    let line = format!("device.country: {}", f.errno());
    assert!(disk.d.wait_log(&line, T), "{}", disk.d.log_text());
    let new = new_wifi();
    disk.check_files(&[
        ("wifi.conf", &[Some(&new)]),
        ("device.token", &[Some(&token)]),
        ("device.country", &[None]),
    ]);
    assert!(c.broadcast("wifi_connected", T), "{}", disk.d.log_text());
    assert_eq!(c.local("local.query_country")["params"], "de");
    assert!(Phone::new(disk.d.lan(), token.as_bytes().try_into().unwrap()).info_ok(5));
}

#[test]
fn disk_country_no_space() {
    country_write(NoSpace);
}

#[test]
fn disk_country_no_inode() {
    country_write(NoInode);
}

/// Marks a helper present (without a hello, it answers nothing) and waits until the identity it
/// was asked for again has fallen back to the daemon's own (L§9.5).
fn helper_present(d: &Daemon) {
    send_line(d.local(), br#"{"method":"_internal.helper_ready"}"#);
    let line = "helper did not answer _internal.request_dinfo within";
    assert!(d.wait_log(line, T), "{}", d.log_text());
}

/// The restore of wifi.conf after a failed router change (L§8, STA): a helper is present, so the
/// daemon waits for the Wi-Fi result; the disk fails, then the client notice `wifi_ap_mode` ends
/// the provisioning. The old wifi.conf cannot be put back: the errno is logged, the new file stays
/// whole, the device returns to sta_mode and the cloud.
fn restore_write(f: DiskFault) {
    let cloud = fakecloud();
    let Some(disk) = sta_disk(&format!("disk-restore-{f:?}"), &cloud) else {
        return;
    };
    helper_present(&disk.d);
    let mut c = Client::connect(disk.d.local(), &format!("disk-restore-{f:?}"));
    let r = provision(&mut c);
    assert_eq!(r["result"][0], "OK", "{r}\n{}", disk.d.log_text());
    assert!(c.broadcast("wifi_connecting", T));
    disk.fault(f);
    c.c.send(r#"{"method":"local.status","params":"wifi_ap_mode"}"#);
    assert!(c.broadcast("wifi_failed", T), "{}", disk.d.log_text());
    let line = format!("cannot write {}/wifi.conf: {}", disk.path, f.errno());
    assert!(disk.d.wait_log(&line, T), "{}", disk.d.log_text());
    let new = new_wifi();
    disk.check_files(&[
        ("wifi.conf", &[Some(&new)]),
        ("device.token", &[Some(OLD_TOKEN)]),
        ("device.country", &[Some("de\n")]),
    ]);
    disk.undo(f);
    assert!(
        c.broadcast("cloud_connected", RECOVER),
        "{}",
        disk.d.log_text()
    );
    assert!(c.until_acked(RECOVER).ok());
}

#[test]
fn disk_restore_no_space() {
    restore_write(NoSpace);
}

#[test]
fn disk_restore_read_only() {
    restore_write(ReadOnly);
}

/// The same failure in AP mode deletes the new wifi.conf (L§8). On a full disk the unlink works;
/// read-only, it fails with the errno logged, and the new file stays whole: the device is back in
/// AP mode, and serves the phone.
fn restore_remove(f: DiskFault) {
    let dead = DeadPort::new();
    let files = [("device.conf", GOOD_DEVICE_CONF)];
    let Some(disk) = Disk::start(&format!("disk-rm-{f:?}"), &files, None, |data| {
        cloud_args(data, dead.port)
            .opt("--helper-grace", "0.2")
            .opt("--helper-timeout", "0.5")
            .opt("-l", 3)
            .build()
    }) else {
        return;
    };
    assert!(
        disk.d.wait_log("STATE_WIFI_AP_MODE", T),
        "{}",
        disk.d.log_text()
    );
    let token = disk.read("device.token").expect("token");
    helper_present(&disk.d);
    let mut c = Client::connect(disk.d.local(), &format!("disk-rm-{f:?}"));
    let r = provision(&mut c);
    assert_eq!(r["result"][0], "OK", "{r}\n{}", disk.d.log_text());
    assert!(c.broadcast("wifi_connecting", T));
    disk.fault(f);
    c.c.send(r#"{"method":"local.status","params":"wifi_ap_mode"}"#);
    assert!(c.broadcast("wifi_failed", T), "{}", disk.d.log_text());
    assert!(c.broadcast("wifi_ap_mode", T), "{}", disk.d.log_text());
    let new = new_wifi();
    if f == ReadOnly {
        let line = format!("{}/wifi.conf: {}", disk.path, f.errno());
        assert!(disk.d.wait_log(&line, T), "{}", disk.d.log_text());
        disk.check_files(&[("wifi.conf", &[Some(&new)])]);
    } else {
        // Barrier: the state query comes after the restore.
        assert_eq!(c.local("local.query_status")["params"], "wifi_ap_mode");
        disk.check_files(&[("wifi.conf", &[None])]);
    }
    disk.check_files(&[("device.token", &[Some(&token)])]);
    let hello = Phone::new(disk.d.lan(), TOKEN).hello().expect("hello");
    assert_eq!(
        &hello[16..32],
        token.as_bytes(),
        "AP mode hands out the token"
    );
}

#[test]
fn disk_restore_remove_no_space() {
    restore_remove(NoSpace);
}

#[test]
fn disk_restore_remove_read_only() {
    restore_remove(ReadOnly);
}

/// device.token at start in AP mode (L§9.3 file mode: delete the old token, store a fresh one),
/// with the data dir already full or read-only: the device still reaches AP mode with a fresh token
/// in memory (the errno logged), hands it out, and serves a phone that uses it. Read-only: the old
/// token cannot even be deleted and stays whole. Full: a device without a token file (an old one's
/// deletion would free what the new one needs); none is stored, no part of one either.
fn token_write(f: DiskFault) {
    let dead = DeadPort::new();
    let mut files = vec![("device.conf", GOOD_DEVICE_CONF)];
    if f == ReadOnly {
        files.push(("device.token", OLD_TOKEN));
    }
    let Some(disk) = Disk::start(&format!("disk-token-{f:?}"), &files, Some(f), |data| {
        cloud_args(data, dead.port)
            .opt("--helper-grace", "0.2")
            .build()
    }) else {
        return;
    };
    assert!(
        disk.d.wait_log("STATE_WIFI_AP_MODE", T),
        "{}",
        disk.d.log_text()
    );
    let what = if f == ReadOnly { "remove" } else { "write" };
    let line = format!("device.token: cannot {what}: {}", f.errno());
    assert!(disk.d.log_has(&line), "{line}\n{}", disk.d.log_text());
    disk.check_files(&[
        (
            "device.token",
            &[if f == ReadOnly { Some(OLD_TOKEN) } else { None }],
        ),
        ("wifi.conf", &[None]),
    ]);
    let hello = Phone::new(disk.d.lan(), TOKEN).hello().expect("hello");
    let token: [u8; 16] = hello[16..32].try_into().unwrap();
    assert_ne!(&token, OLD_TOKEN.as_bytes(), "a fresh token");
    assert!(miio_client::config::token::parse(std::str::from_utf8(&token).unwrap()).is_ok());
    let phone = Phone::new(disk.d.lan(), &token);
    let r = phone
        .call(9, r#"{"id":9,"method":"miIO.info","params":[]}"#, T)
        .expect("miIO.info under the token in memory");
    assert_eq!(r["result"]["model"], "acme.dev.v1", "{r}");
    Client::connect(disk.d.local(), "disk-token");
}

#[test]
fn disk_token_no_space() {
    token_write(NoSpace);
}

#[test]
fn disk_token_no_inode() {
    token_write(NoInode);
}

#[test]
fn disk_token_read_only() {
    token_write(ReadOnly);
}

/// `otd_donot_trust_peer` (`miIO.config` from a phone, P§4.6): an empty file, so a disk without a
/// free page still takes it; without an inode or read-only it cannot be created.
fn trust_flag_write(f: DiskFault) {
    let dead = DeadPort::new();
    let files = [
        ("device.conf", GOOD_DEVICE_CONF),
        ("device.token", OLD_TOKEN),
        ("wifi.conf", OLD_WIFI),
    ];
    let Some(disk) = Disk::start(&format!("disk-trust-{f:?}"), &files, None, |data| {
        cloud_args(data, dead.port)
            .opt("--helper-grace", "0.2")
            .build()
    }) else {
        return;
    };
    assert!(
        disk.d.wait_log("STATE_WIFI_STA_MODE", T),
        "{}",
        disk.d.log_text()
    );
    let phone = Phone::new(disk.d.lan(), TOKEN);
    assert!(phone.hello().is_some());
    disk.fault(f);
    let r = phone
        .call(
            10,
            r#"{"id":10,"method":"miIO.config","params":{"enauth":1}}"#,
            T,
        )
        .expect("miIO.config answered");
    let flag = "otd_donot_trust_peer";
    if f == NoSpace {
        assert_eq!(r["result"], json!(["OK"]), "{r}");
        disk.check_files(&[(flag, &[Some("")])]);
    } else {
        assert_eq!(r["result"], json!(["ERROR"]), "{r}\n{}", disk.d.log_text());
        let line = format!("{flag}: {}", f.errno());
        assert!(disk.d.log_has(&line), "{line}\n{}", disk.d.log_text());
        disk.check_files(&[(flag, &[None])]);
        disk.undo(f);
        let r = phone
            .call(
                11,
                r#"{"id":11,"method":"miIO.config","params":{"enauth":1}}"#,
                T,
            )
            .expect("miIO.config answered");
        assert_eq!(r["result"], json!(["OK"]), "{r}");
        disk.check_files(&[(flag, &[Some("")])]);
    }
    disk.check_files(&[
        ("wifi.conf", &[Some(OLD_WIFI)]),
        ("device.token", &[Some(OLD_TOKEN)]),
    ]);
    assert!(phone.info_ok(12));
}

#[test]
fn disk_trust_flag_no_space() {
    trust_flag_write(NoSpace);
}

#[test]
fn disk_trust_flag_no_inode() {
    trust_flag_write(NoInode);
}

#[test]
fn disk_trust_flag_read_only() {
    trust_flag_write(ReadOnly);
}

// ---- SIGHUP storm ------------------------------------------------------------------------------

/// 100 SIGHUPs while reports flow, after the log was moved away as logrotate does: ten bursts of
/// ten, the reports of each burst in flight during the next. Every report is acked once and reached
/// the cloud, the cloud session is never restarted, the log is reopened (a new file) once per turn
/// that saw signals, and local and LAN clients are served.
#[test]
fn sighup_storm() {
    let mut n = Net::start("hup", "udp", "2");
    let old_log = n.d.log.with_extension("log.1");
    std::fs::rename(&n.d.log, &old_log).unwrap();
    let pid = n.d.child.id() as libc::pid_t;
    let mut in_flight = Vec::new();
    let mut r = Vec::new();
    for _ in 0..10 {
        for _ in 0..10 {
            // SAFETY: kill(2) on our own child, with a signal it handles.
            let k = unsafe { libc::kill(pid, libc::SIGHUP) };
            assert_eq!(k, 0, "kill: {}", std::io::Error::last_os_error());
        }
        r.extend(n.c.collect(std::mem::take(&mut in_flight)));
        in_flight = n.c.send_reports(2);
    }
    r.extend(n.c.collect(in_flight));
    assert!(r.iter().all(Report::ok), "{r:?}\n{}", n.d.log_text());
    assert!(
        n.d.wait_log("SIGHUP: log reopened", T),
        "{}",
        n.d.log_text()
    );
    n.finish(&r);
    // Both files, read whole after the barrier in finish: one session, reopened at most 100 times.
    let log = read_file(&old_log) + &read_file(&n.d.log);
    let reopened = log.matches("SIGHUP: log reopened").count();
    eprintln!("sighup storm: {reopened} reopens for 100 signals");
    // Signals that arrive together are one reopen: what counts is that it happened, and not more
    // often than asked.
    assert!((2..=100).contains(&reopened), "{reopened}");
    assert_eq!(log.matches("STATE_CLOUD_CONNECTED").count(), 1, "{log}");
    assert!(!log.contains(RETRY), "{log}");
    assert!(read_file(&n.d.log).contains("SIGHUP: log reopened"));
}

// ---- the log file on a full disk -------------------------------------------------------------

/// The daemon with its log (`-L`) on a tmpfs of its own mount namespace, which is then filled up:
/// log writes fail, and nothing else does: reports are acked and reach the cloud, a local query is
/// answered. Once space is back a SIGHUP reopens the log and lines appear again. (Not through
/// `Daemon::start_via`, which reads the log where the host sees it.)
#[test]
fn log_on_a_full_disk() {
    if !namespaces_usable() {
        skip("root, unshare and nsenter for a mount namespace");
        return;
    }
    let cloud = fakecloud();
    let ctl = Ctl::connect(cloud.ctl);
    let dir = provisioned_dir("logfull");
    let logdir = TempDir::new("logfull-log");
    let ld = logdir.path().display().to_string();
    let script = format!("mount -t tmpfs -o size=16k tmpfs {ld} && exec \"$0\" \"$@\"");
    let mut launched = None;
    for _ in 0..8 {
        // A port free now; the daemon says so when someone took it meanwhile, and we try again.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut a = net_args(&dir, cloud.port, "udp");
        set_opt(&mut a, "--local-port", port);
        set_opt(&mut a, "--lan-port", 0);
        set_opt(&mut a, "--ble-port", 0);
        let mut child = Command::new("unshare")
            .args([
                "-m",
                "sh",
                "-c",
                &script,
                BIN,
                "-L",
                &format!("{ld}/miio.log"),
            ])
            .args(&a)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let log = format!("/proc/{}/root{ld}/miio.log", child.id());
        let mut exited = false;
        let up = wait_until(T, || {
            exited = matches!(child.try_wait(), Ok(Some(_)));
            exited || read_file(std::path::Path::new(&log)).contains("STATE_CLOUD_CONNECTED")
        });
        if up && !exited {
            launched = Some((child, log, port));
            break;
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    let (child, log, port) = launched.expect("the daemon did not come up");
    let mut child = Killed(child);
    let text = || read_file(std::path::Path::new(&log));
    let pid = child.0.id().to_string();
    let sh = |s: &str| {
        let ok = Command::new("nsenter")
            .args(["-t", &pid, "-m", "sh", "-c", s])
            .status()
            .is_ok_and(|st| st.success());
        assert!(ok, "{s}");
    };
    sh(&format!(
        "{{ dd if=/dev/zero of={ld}/{FILL} bs=1024 2>/dev/null; true; }}"
    ));
    let before = text().len();
    let mut c = Client::connect(port, "logfull");
    let mut r = Vec::new();
    // 150 reports: about 9 KiB of log lines at -l 3 on a disk with room.
    for _ in 0..15 {
        r.extend(c.reports(10));
    }
    assert!(r.iter().all(Report::ok), "{r:?}");
    for x in &r {
        assert!(ctl.wait(T, up_tag(&x.tag)).is_some());
    }
    assert_eq!(c.local("local.query_status")["params"], "cloud_connected");
    assert!(matches!(child.0.try_wait(), Ok(None)), "the daemon died");
    // Nothing more fit (a page's worth at most, the end of the last one that did), although each
    // report logs lines at -l 3.
    let grew = text().len() - before;
    assert!(grew <= 4096, "the log grew by {grew} bytes on a full disk");
    sh(&format!("rm {ld}/{FILL}"));
    // SAFETY: kill(2) on our own child, with a signal it handles.
    assert_eq!(
        unsafe { libc::kill(child.0.id() as libc::pid_t, libc::SIGHUP) },
        0
    );
    assert!(
        wait_until(T, || text()[before..].contains("SIGHUP: log reopened")),
        "{}",
        text()
    );
}

/// A child killed on drop, also when the test fails.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
