//! The fault matrix of the hardening issue, end to end against the real daemon.
//!
//! - Network faults, injected by `miio_fakecloud` (its `drop`, `dup`, `reorder`, `delay`,
//!   `silent` and `reset_tcp` control commands) on the UDP and on the TCP cloud link.
//! - Misbehaving local peers: a helper that answers junk or nothing (L§9), a local client that
//!   stops reading while commands are broadcast (L§2).
//! - A data dir that is full (no page, or no inode) or read-only when the daemon writes each of its
//!   files (L§17): a tmpfs or a read-only remount in a mount namespace of the daemon's own, flipped
//!   from outside with `nsenter` while it runs.
//! - A storm of 100 SIGHUPs while reports flow.
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

/// The daemon against `miio_fakecloud` over one transport, with short timers: the ack timeout is
/// 0.5 s (UDP resends after 0.5, 1.0 and 1.5 s), a keepalive every second.
struct Net {
    ctl: Ctl,
    d: Daemon,
    c: Client,
    transport: &'static str,
    _cloud: FakeCloudProc,
    _dir: TempDir,
}

fn net_args(dir: &TempDir, port: u16, transport: &str) -> Vec<String> {
    let mut a = base_args(dir);
    a.extend(
        [
            "-H",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "--transports",
            transport,
            "--keepalive",
            "1",
            "--ack-timeout",
            "0.5",
            "--backoff-min",
            "1",
            "--backoff-max",
            "2",
            "--helper-grace",
            "0.2",
            "-l",
            "3",
        ]
        .map(String::from),
    );
    a
}

impl Net {
    fn start(name: &str, transport: &'static str) -> Net {
        let cloud = fakecloud();
        let ctl = Ctl::connect(cloud.ctl);
        let dir = provisioned_dir(&format!("{name}-{transport}"));
        let d = Daemon::start(&dir, &net_args(&dir, cloud.port, transport));
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

/// Lost requests and lost acks. UDP resends under the same cloud id (P§5.7 D5), so every report is
/// acked; TCP never resends, so a lost request or ack is `OT server noack`. Then 30% of all packets
/// both ways (seeded) for 20 reports: whatever the link does, nothing acked is lost.
fn drop_family(t: &'static str) {
    let mut n = Net::start("drop", t);
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
    let mut n = Net::start("dup", t);
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
    let mut n = Net::start("reorder", t);
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

/// Every packet 150 ms late both ways (a round trip under the 0.5 s ack timeout): all acked, nothing
/// resent. Then 400 ms (a round trip of 0.8 s): UDP resends and takes the late ack; TCP answers
/// noack and swallows the late ack (P§5.7, P§5.8). The keepalive keeps the link up throughout.
fn delay_family(t: &'static str) {
    let mut n = Net::start("delay", t);
    n.ctl.cmd(json!({"cmd":"delay","ms":150}));
    let mut all = n.c.reports(4);
    assert!(all.iter().all(Report::ok), "{all:?}");
    assert!(n.ctl.wait(T, fault("delay", "out")).is_some());

    n.ctl.cmd(json!({"cmd":"delay","ms":400}));
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
    let mut n = Net::start("silent", t);
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
    let mut n = Net::start("reset", "tcp");
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
