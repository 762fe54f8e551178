//! miio_agent's core (LOCAL_API.md §10): the applications on 54320, their subscriptions, and the
//! one upstream connection to the daemon's 54322. Sans-IO like `proto::local`: the applet reports
//! accepts, closes, complete JSON values (cut by `wire::json_stream`) and the upstream connection's
//! fate; this machine decides, names its next deadline in [`Agent::poll_timeout`], and carries out
//! its few effects through the [`Io`] it owns, in the order decided (no queue between: the one
//! implementation is the applet's sockets, so the calls cost no effect list on flash).

use std::rc::Rc;

use log::{debug, info};

use super::local::ConnId;
use crate::time::{Duration, Instant};
use crate::wire::json_stream::{Piece, SplitError};
use crate::wire::rpc::{self, Head, RpcError};

/// L§10: the daemon is tried again every 3 s, the first connection included.
pub const RETRY: Duration = Duration::from_secs(3);
/// L§10: a rewritten id is kept this long for its answer.
pub const MAPPING_TTL: Duration = Duration::from_secs(180);
/// L§10: a registration key is at most 31 bytes.
pub const MAX_KEY: usize = 31;
/// L§10: at most 20 connections per key.
pub const MAX_PER_KEY: usize = 20;
/// Keys one connection may hold; beyond, a `register` is refused with a log line.
pub const MAX_KEYS_PER_APP: usize = 64;
/// Rewritten ids waiting for an answer; beyond, the oldest mapping is given up.
pub const MAX_PENDING: usize = 1024;
/// What the agent sends the daemon first (L§10): id 0 is outside the counter's range.
const QUERY: &str = r#"{"id":0,"method":"local.query_status"}"#;
/// L§10: the counter runs over 1..2^31−1 and wraps.
pub const MAX_ID: u32 = 0x7fff_ffff;

/// Logs a line a peer (an application, the daemon) can make the agent repeat. One kind for the whole
/// agent (P§2.7: one line per 10 s, the count carried by the next), so each cause costs only its
/// short text.
#[inline(never)]
pub fn note(now: Instant, why: &str) {
    crate::warn_limited!(now, "agent: {why}");
}

/// The agent's effects, carried out at once by the io side.
pub trait Io {
    /// Queues `text` to application `app`. False: its queue is over the cap (L§2); the core then
    /// closes it.
    fn send(&mut self, app: ConnId, text: Rc<str>) -> bool;
    /// Closes application `app`; output the kernel cannot take now is not waited for.
    fn close(&mut self, app: ConnId);
    /// Queues `text` to the daemon. False: its queue is over the cap and the io side has dropped
    /// the connection.
    fn up(&mut self, text: Rc<str>) -> bool;
    /// Opens the connection to the daemon; the applet then reports [`Agent::upstream_connected`]
    /// or [`Agent::upstream_closed`]. False: it failed at once.
    fn connect(&mut self) -> bool;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Upstream {
    /// Waiting to try again at this instant.
    Down(Instant),
    /// A connect is under way.
    Connecting,
    Up,
}

#[derive(Debug, Default)]
struct App {
    /// The keys this connection registered (at most [`MAX_KEYS_PER_APP`]).
    keys: Vec<String>,
}

/// A request an application sent up under a rewritten id.
#[derive(Debug)]
struct Pending {
    app: ConnId,
    /// The application's integer id: its magnitude and whether it was negative. An integer id's
    /// text is the canonical decimal (JSON has no leading zero or `+`, and `-0` is a float), so
    /// writing it again puts it back byte for byte, without a string kept per request.
    orig: (bool, u64),
    /// The request was `local.*`: its answer carries a `method` (L§5).
    local: bool,
    expires: Instant,
}

/// The agent's state, and the io side it drives (`io`, for the applet's loop to reach its sockets).
#[derive(Debug)]
pub struct Agent<I> {
    pub io: I,
    max_clients: usize,
    /// The applications in the order they came, each with its keys. Plain vectors searched
    /// linearly: they are small (`--max-clients`, [`MAX_PENDING`]) and cost no map code on flash.
    apps: Vec<(ConnId, App)>,
    /// The mappings by rewritten id, in the order they were made, which is the order they
    /// expire in (one TTL for all): the first is the next to expire.
    pending: Vec<(u32, Pending)>,
    next_id: u32,
    up: Upstream,
}

impl<I: Io> Agent<I> {
    /// A new agent, which connects to the daemon at once (L§10: no supervisor restarts an agent
    /// that gave up).
    pub fn new(max_clients: usize, io: I, now: Instant) -> Agent<I> {
        let mut a = Agent {
            io,
            max_clients,
            apps: Vec::new(),
            pending: Vec::new(),
            next_id: 1,
            up: Upstream::Down(now),
        };
        a.tick(now);
        a
    }

    pub fn is_connected(&self) -> bool {
        self.up == Upstream::Up
    }

    pub fn apps(&self) -> usize {
        self.apps.len()
    }

    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    fn app_mut(&mut self, app: ConnId) -> Option<&mut App> {
        self.apps
            .iter_mut()
            .find(|(c, _)| *c == app)
            .map(|(_, a)| a)
    }

    /// The earliest deadline: the next connect attempt or the next mapping to expire.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let exp = self.pending.first().map(|(_, p)| p.expires);
        match self.up {
            Upstream::Down(at) => Some(exp.map_or(at, |e| e.min(at))),
            _ => exp,
        }
    }

    /// Runs what is due at `now`: a connect attempt, expired mappings.
    pub fn tick(&mut self, now: Instant) {
        if let Upstream::Down(at) = self.up {
            if now >= at {
                self.up = Upstream::Connecting;
                if !self.io.connect() {
                    self.upstream_failed(now);
                }
            }
        }
        while self.pending.first().is_some_and(|(_, p)| p.expires <= now) {
            self.pending.remove(0);
        }
    }

    /// The connect succeeded. The first message classifies the connection at once (L§2): without
    /// one the daemon holds commands for its 1 s window, a second of the user-ack timeout lost.
    /// Its answer carries id 0, which the counter never uses, and is dropped.
    pub fn upstream_connected(&mut self, now: Instant) {
        if self.up != Upstream::Up {
            info!("agent: connected to the daemon");
        }
        self.up = Upstream::Up;
        self.send_up(now, Rc::from(QUERY));
    }

    /// The connect failed: try again in [`RETRY`].
    pub fn upstream_failed(&mut self, now: Instant) {
        note(now, "no daemon; retry in 3 s");
        self.up = Upstream::Down(now + RETRY);
    }

    /// The upstream connection closed (or failed, or never came up): its answers will never come,
    /// so the mappings go; the applications and their keys stay (L§10). Try again in [`RETRY`].
    pub fn upstream_closed(&mut self, now: Instant) {
        self.pending.clear();
        if self.up == Upstream::Up {
            note(now, "lost the daemon; retry in 3 s");
            self.up = Upstream::Down(now + RETRY);
        } else {
            self.upstream_failed(now);
        }
    }

    /// A new application connection. False: the table is full, close it at once.
    pub fn accept(&mut self, now: Instant, app: ConnId) -> bool {
        if self.apps.len() >= self.max_clients {
            note(now, "too many clients; closed");
            return false;
        }
        self.apps.push((app, App::default()));
        true
    }

    /// The application's connection ended: it leaves all its keys and mappings (L§10).
    pub fn closed(&mut self, app: ConnId) {
        self.apps.retain(|(c, _)| *c != app);
        self.pending.retain(|(_, p)| p.app != app);
    }

    fn find(&self, id: u32) -> Option<usize> {
        self.pending.iter().position(|(i, _)| *i == id)
    }

    /// False: the application does not read (L§2) and is closed.
    fn send_app(&mut self, now: Instant, app: ConnId, text: Rc<str>) -> bool {
        if self.io.send(app, text) {
            return true;
        }
        note(now, "a client does not read; closed");
        self.close_app(app);
        false
    }

    fn close_app(&mut self, app: ConnId) {
        self.closed(app);
        self.io.close(app);
    }

    /// The splitter refused an application's stream (L§3): a syntax error is answered -32700,
    /// then the connection is closed.
    pub fn app_framing_error(&mut self, now: Instant, app: ConnId, err: SplitError) {
        if self.app_mut(app).is_none() {
            return;
        }
        note(now, "bad stream from a client; closed");
        if let SplitError::Syntax { .. } = err {
            self.refuse(now, app, None, RpcError::Parse);
        }
        self.close_app(app);
    }

    /// Answers an application's request with an error: -32600 with its id as sent, or another
    /// code without an id.
    fn refuse(&mut self, now: Instant, app: ConnId, raw_id: Option<&str>, e: RpcError) {
        let text = match raw_id {
            Some(raw) => rpc::invalid_request(raw),
            None => rpc::error_reply(None, e.code(), e.message()),
        };
        self.send_app(now, app, text.into());
    }

    /// One complete JSON value from an application.
    pub fn app_message(&mut self, now: Instant, app: ConnId, piece: Piece) {
        if self.app_mut(app).is_none() {
            return;
        }
        let Some((text, head)) = rpc::piece_text(piece) else {
            return;
        };
        let head = match head {
            Ok(h) => h,
            Err(e) => {
                note(now, "bad request from a client");
                self.refuse(now, app, None, e);
                if e == RpcError::Parse {
                    self.close_app(app);
                }
                return;
            }
        };
        let m = match &head.method {
            Some(Some(m)) => m.as_str(),
            // A reply (or anything without a string method): forwarded unchanged.
            _ => {
                self.send_up(now, text.into());
                return;
            }
        };
        if m == "register" || m == "unregister" {
            self.registration(now, app, m == "register", &text);
        } else if m.starts_with("_internal.") {
            // L§10: the helper channel is the daemon's own (L§9); through the agent it would make
            // the agent's connection a helper connection, which receives no commands (L§4.2).
            note(now, "_internal.* not forwarded");
        } else {
            self.request_up(now, app, text, &head);
        }
    }

    /// `register` / `unregister` (L§10): exact method names, a string key, no answer.
    fn registration(&mut self, now: Instant, app: ConnId, reg: bool, text: &str) {
        // The one member read from the text, without a tree of the whole message.
        let key = rpc::str_member(text, "key").flatten();
        let subs = key.as_ref().map_or(0, |k| {
            self.apps.iter().filter(|(_, a)| a.keys.contains(k)).count()
        });
        let Some(a) = self.app_mut(app) else {
            return;
        };
        match key {
            // `"key":""` removes every key.
            Some(k) if !reg => a.keys.retain(|x| !k.is_empty() && *x != k),
            Some(k) if a.keys.contains(&k) => {}
            Some(k)
                if !k.is_empty()
                    && k.len() <= MAX_KEY
                    && a.keys.len() < MAX_KEYS_PER_APP
                    && subs < MAX_PER_KEY =>
            {
                debug!("agent: registered a key");
                a.keys.push(k);
            }
            _ => note(now, "(un)register refused"),
        }
    }

    /// A request from an application: an integer id is rewritten (L§10), any other goes as it is.
    fn request_up(&mut self, now: Instant, app: ConnId, text: String, head: &Head) {
        let Some(id) = &head.id else {
            self.send_up(now, text.into());
            return;
        };
        let orig = match (id.as_u64(), id.as_i64()) {
            (Some(n), _) => (false, n),
            (None, Some(n)) => (true, n.unsigned_abs()),
            _ => {
                // The daemon would answer -32600 under an id the agent could not route back
                // (L§4.1): the agent answers it itself, with the id as sent.
                note(now, "a client's id is not an integer");
                let raw = rpc::raw_id(&text).unwrap_or("null");
                return self.refuse(now, app, Some(raw), RpcError::NotObject);
            }
        };
        let new = self.alloc_id(now);
        // The same splice that puts the application's id back (`with_id`).
        let mut buf = [0; 20];
        let Some(up) = with_id(&text, head, rpc::decimal(u64::from(new), &mut buf)) else {
            return;
        };
        if self.send_up(now, up.into()) {
            self.pending.push((
                new,
                Pending {
                    app,
                    orig,
                    local: head.method().starts_with("local."),
                    expires: now + MAPPING_TTL,
                },
            ));
        }
    }

    /// The next id of the counter that is not pending; the oldest mapping goes when all
    /// [`MAX_PENDING`] are taken.
    fn alloc_id(&mut self, now: Instant) -> u32 {
        if self.pending.len() >= MAX_PENDING {
            note(now, "1024 pending; oldest given up");
            self.pending.remove(0);
        }
        loop {
            let id = self.next_id;
            self.next_id = if id >= MAX_ID { 1 } else { id + 1 };
            if self.find(id).is_none() {
                return id;
            }
        }
    }

    /// One message to the daemon. False: dropped (the daemon is away, or does not read: then
    /// the connection is given up and retried).
    fn send_up(&mut self, now: Instant, text: Rc<str>) -> bool {
        if self.up != Upstream::Up {
            note(now, "no daemon; message dropped");
            return false;
        }
        if self.io.up(text) {
            return true;
        }
        note(now, "the daemon does not read; reconnecting");
        self.upstream_closed(now);
        false
    }

    /// One complete JSON value from the daemon (L§10, the dispatch table).
    pub fn upstream_message(&mut self, now: Instant, piece: Piece) {
        if let Some((text, Ok(head))) = rpc::piece_text(piece) {
            if self.dispatch(now, text, &head) {
                return;
            }
        }
        note(now, "daemon message for nobody; dropped");
    }

    /// False: nobody takes `text`.
    fn dispatch(&mut self, now: Instant, text: String, head: &Head) -> bool {
        let method = match &head.method {
            Some(Some(m)) => Some(m.as_str()),
            _ => None,
        };
        // The answer to the agent's own first message.
        if method == Some("local.status") && head.id.as_ref().and_then(rpc::id_u32) == Some(0) {
            return true;
        }
        // An answer to a rewritten id. A message with a method is one only when the request was
        // `local.*` (L§5 answers carry a method); a cloud command that happens to use a pending
        // id is a command.
        if let Some(id) = head.id.as_ref().and_then(rpc::id_u32) {
            let hit = self.find(id).filter(|&i| {
                let p = &self.pending[i].1;
                method.is_none_or(|m| p.local && m.starts_with("local."))
            });
            if let Some(i) = hit {
                let (_, p) = self.pending.remove(i);
                // The digits at the end of `buf`, the sign before them (a negative id has at
                // most 19 digits, so there is room).
                let mut buf = [0; 20];
                let mut i = buf.len() - rpc::decimal(p.orig.1, &mut buf).len();
                if p.orig.0 {
                    i -= 1;
                    buf[i] = b'-';
                }
                let orig = core::str::from_utf8(&buf[i..]).unwrap_or("0");
                let back = with_id(&text, head, orig).unwrap_or(text);
                self.send_app(now, p.app, back.into());
                return true;
            }
        }
        let Some(m) = method else {
            return false;
        };
        // To every connection registered for exactly `m`; one that does not read is closed, and
        // the next one then sits at the same index.
        let text: Rc<str> = text.into();
        let mut sent = false;
        let mut i = 0;
        while let Some((c, a)) = self.apps.get(i) {
            if a.keys.iter().any(|k| k == m) {
                sent = true;
                if !self.send_app(now, *c, text.clone()) {
                    continue;
                }
            }
            i += 1;
        }
        sent
    }
}

/// `text` with its id's value replaced by the JSON text `raw`: the agent's id on the way up, the
/// application's id as it wrote it on the way back.
fn with_id(text: &str, head: &Head, raw: &str) -> Option<String> {
    if let Some(span) = head.id_span.clone() {
        let (a, b) = (text.get(..span.start)?, text.get(span.end..)?);
        let mut out = String::with_capacity(a.len() + raw.len() + b.len());
        out.push_str(a);
        out.push_str(raw);
        out.push_str(b);
        return Some(out);
    }
    // Several ids: each of them is set (the daemon's walk, `rpc::rewrite_id`), so a parser that
    // keeps the first and one that keeps the last see the same id.
    rpc::rewrite_id_raw(text, raw)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::local::LocalAction;
    use serde_json::{json, Value};

    /// The effects as the agent made them, in order.
    #[derive(Clone, Debug, PartialEq, Eq)]
    enum AgentAction {
        App(LocalAction),
        Up(Rc<str>),
        Connect,
    }

    impl Io for Vec<AgentAction> {
        fn send(&mut self, app: ConnId, text: Rc<str>) -> bool {
            self.push(AgentAction::App(LocalAction::Send(app, text)));
            true
        }
        fn close(&mut self, app: ConnId) {
            self.push(AgentAction::App(LocalAction::Close(app)));
        }
        fn up(&mut self, text: Rc<str>) -> bool {
            self.push(AgentAction::Up(text));
            true
        }
        fn connect(&mut self) -> bool {
            self.push(AgentAction::Connect);
            true
        }
    }

    impl Agent<Vec<AgentAction>> {
        fn take_actions(&mut self) -> Vec<AgentAction> {
            std::mem::take(&mut self.io)
        }

        /// The connections registered for `key`, in the order they connected.
        fn subscribers(&self, key: &str) -> Vec<ConnId> {
            self.apps
                .iter()
                .filter(|(_, a)| a.keys.iter().any(|k| k == key))
                .map(|&(c, _)| c)
                .collect()
        }
    }

    fn new(max_clients: usize) -> Agent<Vec<AgentAction>> {
        Agent::new(max_clients, Vec::new(), at(0))
    }

    fn at(s: u64) -> Instant {
        Instant::from_millis(s * 1000)
    }

    fn piece(v: &str) -> Piece {
        match rpc::scan_str(v) {
            Ok(head) => Piece::Scanned {
                text: v.to_owned(),
                head,
            },
            Err(_) => Piece::Raw(v.as_bytes().to_vec()),
        }
    }

    /// An agent connected to the daemon with apps 1 and 2.
    fn agent() -> Agent<Vec<AgentAction>> {
        let mut a = new(20);
        assert_eq!(a.take_actions(), vec![AgentAction::Connect]);
        a.upstream_connected(at(0));
        assert_eq!(a.take_actions(), vec![AgentAction::Up(QUERY.into())]);
        // Its answer is the agent's own: dropped, silently.
        a.upstream_message(
            at(0),
            piece(r#"{"id":0,"method":"local.status","params":"cloud_connected"}"#),
        );
        assert!(a.take_actions().is_empty());
        assert!(a.accept(at(0), 1));
        assert!(a.accept(at(0), 2));
        a
    }

    fn no_keys(a: &Agent<Vec<AgentAction>>) -> bool {
        a.apps.iter().all(|(_, x)| x.keys.is_empty())
    }

    fn app_msgs(acts: &[AgentAction]) -> Vec<(ConnId, Value)> {
        acts.iter()
            .filter_map(|x| match x {
                AgentAction::App(LocalAction::Send(c, t)) => {
                    Some((*c, serde_json::from_str(t).unwrap()))
                }
                _ => None,
            })
            .collect()
    }

    fn ups(acts: &[AgentAction]) -> Vec<Value> {
        acts.iter()
            .filter_map(|x| match x {
                AgentAction::Up(t) => Some(serde_json::from_str(t).unwrap()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn commands_reach_only_their_subscribers() {
        let mut a = agent();
        a.app_message(at(0), 1, piece(r#"{"method":"register","key":"get_prop"}"#));
        a.app_message(
            at(0),
            2,
            piece(r#"{"method":"register","key":"set_power"}"#),
        );
        a.app_message(
            at(0),
            2,
            piece(r#"{"method":"register","key":"local.status"}"#),
        );
        assert!(
            a.take_actions().is_empty(),
            "register is not answered nor forwarded"
        );
        a.upstream_message(at(1), piece(r#"{"id":7,"method":"get_prop","params":[]}"#));
        a.upstream_message(
            at(1),
            piece(r#"{"id":8,"method":"set_power","params":["on"]}"#),
        );
        a.upstream_message(
            at(1),
            piece(r#"{"method":"local.status","params":"cloud_connected"}"#),
        );
        a.upstream_message(at(1), piece(r#"{"id":9,"method":"nobody","params":[]}"#));
        let got = app_msgs(&a.take_actions());
        assert_eq!(
            got,
            vec![
                (1, json!({"id":7,"method":"get_prop","params":[]})),
                (2, json!({"id":8,"method":"set_power","params":["on"]})),
                (
                    2,
                    json!({"method":"local.status","params":"cloud_connected"})
                ),
            ]
        );
    }

    #[test]
    fn register_matches_exactly_and_keys_are_bounded() {
        let mut a = agent();
        // Not a registration: a method that only begins with `register` goes up like any other.
        a.app_message(at(0), 1, piece(r#"{"method":"register_x","key":"a"}"#));
        assert_eq!(ups(&a.take_actions()).len(), 1);
        assert!(a.subscribers("a").is_empty());
        let long = "k".repeat(MAX_KEY + 1);
        a.app_message(
            at(0),
            1,
            piece(&format!(r#"{{"method":"register","key":"{long}"}}"#)),
        );
        a.app_message(at(0), 1, piece(r#"{"method":"register","key":""}"#));
        a.app_message(at(0), 1, piece(r#"{"method":"register","key":5}"#));
        assert!(no_keys(&a));
        let ok = "k".repeat(MAX_KEY);
        a.app_message(
            at(0),
            1,
            piece(&format!(r#"{{"method":"register","key":"{ok}"}}"#)),
        );
        a.app_message(
            at(0),
            1,
            piece(&format!(r#"{{"method":"register","key":"{ok}"}}"#)),
        );
        assert_eq!(a.subscribers(&ok), [1]);
        for i in 0..MAX_KEYS_PER_APP + 5 {
            a.app_message(
                at(0),
                2,
                piece(&format!(r#"{{"method":"register","key":"m{i}"}}"#)),
            );
        }
        assert_eq!(a.app_mut(2).unwrap().keys.len(), MAX_KEYS_PER_APP);
        assert!(a.take_actions().is_empty());
    }

    #[test]
    fn at_most_twenty_connections_per_key() {
        let mut a = new(30);
        a.upstream_connected(at(0));
        for c in 0..25 {
            assert!(a.accept(at(0), c));
            a.app_message(at(0), c, piece(r#"{"method":"register","key":"m"}"#));
        }
        assert_eq!(a.subscribers("m").len(), MAX_PER_KEY);
        // One leaves: the next registration gets its seat.
        a.closed(3);
        a.app_message(at(0), 24, piece(r#"{"method":"register","key":"m"}"#));
        assert!(a.subscribers("m").contains(&24));
    }

    #[test]
    fn unregister_one_key_or_all() {
        let mut a = agent();
        for k in ["a", "b", "c"] {
            a.app_message(
                at(0),
                1,
                piece(&format!(r#"{{"method":"register","key":"{k}"}}"#)),
            );
        }
        a.app_message(at(0), 1, piece(r#"{"method":"unregister","key":"b"}"#));
        assert_eq!(a.subscribers("a"), [1]);
        assert!(a.subscribers("b").is_empty());
        a.app_message(at(0), 1, piece(r#"{"method":"unregister","key":""}"#));
        assert!(no_keys(&a));
        assert!(a.take_actions().is_empty());
    }

    #[test]
    fn same_ids_from_two_apps_never_collide_and_acks_go_back() {
        let mut a = agent();
        a.app_message(
            at(0),
            1,
            piece(r#"{"id":1,"method":"props","params":{"a":1}}"#),
        );
        a.app_message(
            at(0),
            2,
            piece(r#"{"id":1,"method":"props","params":{"b":2}}"#),
        );
        let up = ups(&a.take_actions());
        let (x, y) = (up[0]["id"].as_u64().unwrap(), up[1]["id"].as_u64().unwrap());
        assert_ne!(x, y);
        assert_eq!(up[0]["params"], json!({"a":1}));
        a.upstream_message(at(1), piece(&format!(r#"{{"id":{y},"result":"ok"}}"#)));
        a.upstream_message(at(1), piece(&format!(r#"{{"id":{x},"result":"ok"}}"#)));
        assert_eq!(
            app_msgs(&a.take_actions()),
            vec![
                (2, json!({"id":1,"result":"ok"})),
                (1, json!({"id":1,"result":"ok"}))
            ]
        );
        assert_eq!(a.pending(), 0);
        // A second answer to the same id finds no mapping and is dropped.
        a.upstream_message(at(1), piece(&format!(r#"{{"id":{x},"result":"ok"}}"#)));
        assert!(a.take_actions().is_empty());
    }

    #[test]
    fn local_answers_route_by_id_and_commands_with_a_pending_id_stay_commands() {
        let mut a = agent();
        a.app_message(
            at(0),
            1,
            piece(r#"{"id":-5,"method":"local.query_status"}"#),
        );
        let up = ups(&a.take_actions());
        let n = up[0]["id"].as_u64().unwrap();
        a.app_message(at(0), 2, piece(r#"{"method":"register","key":"get_prop"}"#));
        a.app_message(at(0), 2, piece(r#"{"id":44,"method":"props","params":{}}"#));
        let m = ups(&a.take_actions())[0]["id"].as_u64().unwrap();
        // A cloud command that uses the pending id of a report is still a command.
        a.upstream_message(
            at(1),
            piece(&format!(r#"{{"id":{m},"method":"get_prop"}}"#)),
        );
        a.upstream_message(
            at(1),
            piece(&format!(
                r#"{{"id":{n},"method":"local.status","params":"cloud_connected"}}"#
            )),
        );
        assert_eq!(
            app_msgs(&a.take_actions()),
            vec![
                (2, json!({"id":m,"method":"get_prop"})),
                (
                    1,
                    json!({"id":-5,"method":"local.status","params":"cloud_connected"})
                ),
            ]
        );
    }

    #[test]
    fn internal_messages_are_not_forwarded() {
        let mut a = agent();
        a.app_message(at(0), 1, piece(r#"{"method":"_internal.hello"}"#));
        a.app_message(
            at(0),
            1,
            piece(r#"{"id":3,"method":"_internal.wifi_connected"}"#),
        );
        assert!(a.take_actions().is_empty());
        assert_eq!(a.pending(), 0);
    }

    #[test]
    fn replies_and_notifications_go_up_unchanged() {
        let mut a = agent();
        let reply = r#"{"id":77,"result":["ok"]}"#;
        let note = r#"{"method":"event.x","params":[]}"#;
        a.app_message(at(0), 1, piece(reply));
        a.app_message(at(0), 1, piece(note));
        assert_eq!(
            a.take_actions(),
            vec![AgentAction::Up(reply.into()), AgentAction::Up(note.into())]
        );
        assert_eq!(a.pending(), 0);
    }

    #[test]
    fn bad_input_is_answered_and_never_panics() {
        let mut a = agent();
        a.app_message(at(0), 1, piece(r#"{"id":"x","method":"props"}"#));
        a.app_message(at(0), 1, piece("[1,2]"));
        assert_eq!(
            app_msgs(&a.take_actions()),
            vec![
                (
                    1,
                    json!({"id":"x","error":{"code":-32600,"message":"Invalid Request"}})
                ),
                (
                    1,
                    json!({"error":{"code":-32600,"message":"Invalid Request"}})
                ),
            ]
        );
        a.app_framing_error(at(0), 1, SplitError::Syntax { offset: 3 });
        let acts = a.take_actions();
        assert_eq!(app_msgs(&acts)[0].1["error"]["code"], json!(-32700));
        assert_eq!(acts.last(), Some(&AgentAction::App(LocalAction::Close(1))));
        assert_eq!(a.apps(), 1);
        a.app_framing_error(at(0), 2, SplitError::TooLarge { size: 20000 });
        assert_eq!(
            a.take_actions(),
            vec![AgentAction::App(LocalAction::Close(2))]
        );
        // From the daemon: garbage and orphans are dropped.
        for t in [
            "{",
            "[]",
            r#"{"id":5,"result":1}"#,
            r#"{"result":1}"#,
            "\u{0}",
        ] {
            a.upstream_message(at(0), Piece::Raw(t.as_bytes().to_vec()));
        }
        assert!(a.take_actions().is_empty());
    }

    #[test]
    fn mappings_expire_after_180_s() {
        let mut a = agent();
        a.app_message(at(0), 1, piece(r#"{"id":1,"method":"props"}"#));
        let n = ups(&a.take_actions())[0]["id"].as_u64().unwrap();
        assert_eq!(a.poll_timeout(), Some(at(180)));
        a.tick(at(179));
        assert_eq!(a.pending(), 1);
        a.tick(at(180));
        assert_eq!(a.pending(), 0);
        assert_eq!(a.poll_timeout(), None, "idle: nothing armed");
        a.upstream_message(at(181), piece(&format!(r#"{{"id":{n},"result":"ok"}}"#)));
        assert!(a.take_actions().is_empty());
    }

    #[test]
    fn the_counter_wraps_and_skips_pending_ids() {
        let mut a = agent();
        a.next_id = MAX_ID;
        a.app_message(at(0), 1, piece(r#"{"id":1,"method":"props"}"#));
        a.app_message(at(0), 1, piece(r#"{"id":2,"method":"props"}"#));
        let ids: Vec<u64> = ups(&a.take_actions())
            .iter()
            .map(|v| v["id"].as_u64().unwrap())
            .collect();
        assert_eq!(ids, vec![u64::from(MAX_ID), 1]);
        a.next_id = MAX_ID;
        a.app_message(at(0), 1, piece(r#"{"id":3,"method":"props"}"#));
        let ids: Vec<u64> = ups(&a.take_actions())
            .iter()
            .map(|v| v["id"].as_u64().unwrap())
            .collect();
        assert_eq!(ids, vec![2], "MAX_ID and 1 are pending");
    }

    #[test]
    fn pending_is_bounded() {
        let mut a = agent();
        for i in 0..MAX_PENDING + 10 {
            a.app_message(
                at(0),
                1,
                piece(&format!(r#"{{"id":{i},"method":"props"}}"#)),
            );
        }
        assert_eq!(a.pending(), MAX_PENDING);
    }

    #[test]
    fn a_closed_app_leaves_its_keys_and_mappings() {
        let mut a = agent();
        a.app_message(at(0), 1, piece(r#"{"method":"register","key":"get_prop"}"#));
        a.app_message(at(0), 1, piece(r#"{"id":1,"method":"props"}"#));
        a.take_actions();
        a.closed(1);
        assert!(no_keys(&a));
        assert_eq!(a.pending(), 0);
        a.upstream_message(at(1), piece(r#"{"id":3,"method":"get_prop"}"#));
        assert!(a.take_actions().is_empty());
    }

    #[test]
    fn max_clients() {
        let mut a = new(2);
        assert!(a.accept(at(0), 1));
        assert!(a.accept(at(0), 2));
        assert!(!a.accept(at(0), 3));
        a.closed(1);
        assert!(a.accept(at(0), 3));
    }

    #[test]
    fn the_daemon_is_retried_every_3_s_and_keys_survive_its_restart() {
        let mut a = new(20);
        assert_eq!(a.take_actions(), vec![AgentAction::Connect]);
        a.upstream_failed(at(0));
        assert_eq!(a.poll_timeout(), Some(at(3)));
        a.tick(at(2));
        assert!(a.take_actions().is_empty());
        a.tick(at(3));
        assert_eq!(a.take_actions(), vec![AgentAction::Connect]);
        assert_eq!(a.poll_timeout(), None);
        a.upstream_connected(at(3));
        assert!(a.accept(at(3), 1));
        a.app_message(at(4), 1, piece(r#"{"method":"register","key":"get_prop"}"#));
        a.app_message(at(4), 1, piece(r#"{"id":1,"method":"props"}"#));
        a.take_actions();
        a.upstream_closed(at(10));
        assert_eq!(a.pending(), 0);
        assert_eq!(a.poll_timeout(), Some(at(13)));
        // Down: requests are dropped, not queued.
        a.app_message(at(11), 1, piece(r#"{"id":2,"method":"props"}"#));
        assert!(a.take_actions().is_empty());
        a.tick(at(13));
        assert_eq!(a.take_actions(), vec![AgentAction::Connect]);
        a.upstream_connected(at(13));
        a.upstream_message(at(14), piece(r#"{"id":3,"method":"get_prop"}"#));
        assert_eq!(
            app_msgs(&a.take_actions()),
            vec![(1, json!({"id":3,"method":"get_prop"}))]
        );
    }

    #[test]
    fn with_id_without_a_span_sets_every_id() {
        let t = r#"{"id":5,"id":6,"result":1}"#;
        let head = rpc::scan_str(t).unwrap();
        let back = with_id(t, &head, "\"abc\"").unwrap();
        assert_eq!(
            serde_json::from_str::<Value>(&back).unwrap(),
            json!({"id":"abc","result":1})
        );
    }
}
