//! The table of local connections on 54322 and 54323 (LOCAL_API.md §2–§4): who may connect, what a
//! connection is (unclassified, ordinary, helper, BLE), the framing errors of §3, and who receives a
//! broadcast. Sans-IO: the reactor reports accepts, complete JSON values and closes; this machine
//! pushes its `LocalAction`s into the caller's [`Outbox`] as it decides them and hands classified
//! messages to the node as `Inbound`.
//!
//! Shaped so that miio_agent and the MQTT bridge are only more kinds of ordinary client.

use std::rc::Rc;

use serde_json::{Map, Value};

use super::outbox::{Action, Outbox};
use crate::time::{Duration, Instant};
use crate::wire::rpc::{self, Kind, RpcError};

/// A connection handle given by the reactor (its slab slot).
pub type ConnId = usize;

/// L§2: a new connection is unclassified until its first message or 1 s after accept.
pub const CLASSIFY_WINDOW: Duration = Duration::from_millis(1000);
/// L§2: beyond max-clients, at most 2 extra (helper) connections.
pub const EXTRA_HELPER_CONNS: usize = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Port {
    /// 54322: the local API and the helper channel.
    Local,
    /// 54323: the BLE provisioning process (one client, `local.*` only).
    Ble,
    /// The MQTT bridge (L§11): a connection the node attaches itself, ordinary from the start,
    /// on no seat of `--max-clients`.
    Mqtt,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Class {
    /// Until the first message or `deadline`. `extra` connections arrived beyond max-clients and
    /// are kept only if their first message is `_internal.*`.
    Unclassified {
        deadline: Instant,
        held: Vec<Rc<str>>,
    },
    Ordinary,
    Helper,
    Ble,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LocalAction {
    /// Write one whole message (compact JSON) to the connection. A broadcast is one allocation
    /// that the actions of all its connections share (and their write queues after them).
    Send(ConnId, Rc<str>),
    /// Close the connection (after flushing what is queued).
    Close(ConnId),
}

/// A classified message from a local connection, for the node to route (L§4.1).
#[derive(Debug)]
pub enum Inbound {
    /// `local.*` with its id as sent (None only for `local.status` notices).
    Local {
        conn: ConnId,
        method: String,
        id: Option<Value>,
        obj: Map<String, Value>,
    },
    /// `_internal.*` from any connection.
    Internal {
        conn: ConnId,
        method: String,
        obj: Map<String, Value>,
        text: String,
    },
    /// Any other method: upstream to the cloud (scanned, no tree: P§5.7 reads only method and id).
    Upstream {
        conn: ConnId,
        head: rpc::Head,
        text: String,
    },
    /// A reply (no method, integer id, result or error) to a pending command.
    Reply {
        conn: ConnId,
        id: u32,
        head: rpc::Head,
        text: String,
    },
}

#[derive(Debug)]
struct Conn {
    port: Port,
    class: Class,
    /// Admitted beyond max-clients: kept only as a helper connection (L§2).
    extra: bool,
}

/// The local connections. Their outgoing messages go into the caller's [`Outbox`].
#[derive(Debug)]
pub struct Local {
    max_clients: usize,
    conns: Table,
}

/// The connections by id, in id order (the order broadcasts go out in). A sorted `Vec`: the
/// table is small (max-clients plus a few), and a map type would cost the board several KB.
#[derive(Debug)]
struct Table(Vec<(ConnId, Conn)>);

impl Table {
    fn find(&self, id: ConnId) -> Result<usize, usize> {
        self.0.binary_search_by_key(&id, |&(k, _)| k)
    }
    fn insert(&mut self, id: ConnId, c: Conn) {
        match self.find(id) {
            Ok(i) => self.0[i].1 = c,
            Err(i) => self.0.insert(i, (id, c)),
        }
    }
    fn remove(&mut self, id: &ConnId) -> Option<Conn> {
        self.find(*id).ok().map(|i| self.0.remove(i).1)
    }
    fn get(&self, id: &ConnId) -> Option<&Conn> {
        self.find(*id).ok().map(|i| &self.0[i].1)
    }
    fn get_mut(&mut self, id: &ConnId) -> Option<&mut Conn> {
        self.find(*id).ok().map(|i| &mut self.0[i].1)
    }
    fn contains_key(&self, id: &ConnId) -> bool {
        self.find(*id).is_ok()
    }
    fn values(&self) -> impl Iterator<Item = &Conn> {
        self.0.iter().map(|(_, c)| c)
    }
    fn len(&self) -> usize {
        self.0.len()
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn lossy(raw: &[u8]) -> String {
    // Routed text passed the scan, so it is UTF-8: one copy, no per-chunk repair.
    match String::from_utf8(raw.to_vec()) {
        Ok(s) => s,
        Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
    }
}

impl Local {
    pub fn new(max_clients: usize) -> Local {
        Local {
            max_clients,
            conns: Table(Vec::new()),
        }
    }

    /// A new connection on `port`. Returns false when it must be closed at once (and logs why).
    pub fn accept(&mut self, now: Instant, conn: ConnId, port: Port) -> bool {
        if port == Port::Ble {
            if self.conns.values().any(|c| c.port == Port::Ble) {
                crate::warn_limited!(now, "already have one bt client, ignore...");
                return false;
            }
            self.conns.insert(
                conn,
                Conn {
                    port,
                    class: Class::Ble,
                    extra: false,
                },
            );
            return true;
        }
        let local = self.conns.values().filter(|c| c.port == Port::Local);
        let (extras, seats) = local.fold(
            (0, 0),
            |(e, s), c| if c.extra { (e + 1, s) } else { (e, s + 1) },
        );
        let extra = seats >= self.max_clients;
        if extra && extras >= EXTRA_HELPER_CONNS {
            crate::warn_limited!(now, "too many sockets to track");
            return false;
        }
        self.conns.insert(
            conn,
            Conn {
                port,
                class: Class::Unclassified {
                    deadline: now + CLASSIFY_WINDOW,
                    held: Vec::new(),
                },
                extra,
            },
        );
        true
    }

    /// Attaches a connection of the node's own (`Port::Mqtt`), ordinary at once. Attaching one
    /// that is attached changes nothing: such a connection has no other state.
    pub fn attach(&mut self, conn: ConnId) {
        self.conns.insert(
            conn,
            Conn {
                port: Port::Mqtt,
                class: Class::Ordinary,
                extra: false,
            },
        );
    }

    /// The reactor saw EOF or an error: forget the connection.
    pub fn closed(&mut self, conn: ConnId) {
        self.conns.remove(&conn);
    }

    pub fn is_helper(&self, conn: ConnId) -> bool {
        self.conns
            .get(&conn)
            .is_some_and(|c| c.class == Class::Helper)
    }

    pub fn len(&self) -> usize {
        self.conns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// Closes a connection after its queued output (an older helper channel, L§9.2).
    pub fn close(&mut self, out: &mut Outbox, conn: ConnId) {
        if self.conns.remove(&conn).is_some() {
            push_close(out, conn);
        }
    }

    /// Sends `text` to one connection (a reply or an ack). Unknown connections are ignored.
    pub fn send_to(&mut self, out: &mut Outbox, conn: ConnId, text: String) {
        if self.conns.contains_key(&conn) {
            push_send(out, conn, text.into());
        }
    }

    /// Marks a connection as a helper connection (the node decided from its first message).
    fn classify_as(&mut self, out: &mut Outbox, now: Instant, conn: ConnId, helper: bool) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if let Class::Unclassified { held, .. } = &mut c.class {
            let held = std::mem::take(held);
            let extra = c.extra;
            if helper {
                c.class = Class::Helper;
            } else if extra {
                // An extra connection whose first message is not `_internal.*`.
                crate::warn_limited!(now, "too many sockets to track");
                self.conns.remove(&conn);
                push_close(out, conn);
            } else {
                c.class = Class::Ordinary;
                for t in held {
                    push_send(out, conn, t);
                }
            }
        }
    }

    /// `local.status` broadcasts: every ordinary 54322 connection and the 54323 client.
    pub fn broadcast_status(&mut self, out: &mut Outbox, text: &str) {
        self.broadcast(out, text, true);
    }

    /// Cloud and LAN commands: every ordinary 54322 connection (D6), never helpers or BLE.
    pub fn broadcast_command(&mut self, out: &mut Outbox, text: &str) {
        self.broadcast(out, text, false);
    }

    /// How many connections a command would reach now (0 lets the node answer -9999 at once).
    pub fn command_audience(&self) -> usize {
        self.conns
            .values()
            .filter(|c| !c.extra && matches!(c.class, Class::Ordinary | Class::Unclassified { .. }))
            .count()
    }

    /// One copy of `text` for all: each connection's action (or held list) shares it.
    fn broadcast(&mut self, out: &mut Outbox, text: &str, to_ble: bool) {
        let text: Rc<str> = text.into();
        for (id, c) in self.conns.0.iter_mut() {
            let id = *id;
            match &mut c.class {
                Class::Ordinary => push_send(out, id, text.clone()),
                Class::Ble if to_ble => push_send(out, id, text.clone()),
                Class::Unclassified { held, .. } if !c.extra => held.push(text.clone()),
                _ => {}
            }
        }
    }

    /// The earliest classification deadline.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.conns
            .values()
            .filter_map(|c| match c.class {
                Class::Unclassified { deadline, .. } => Some(deadline),
                _ => None,
            })
            .min()
    }

    /// Connections silent for 1 s become ordinary (held messages flushed); extras are closed.
    pub fn handle_timeout(&mut self, out: &mut Outbox, now: Instant) {
        let due: Vec<ConnId> = self
            .conns
            .0
            .iter()
            .filter(
                |(_, c)| matches!(c.class, Class::Unclassified { deadline, .. } if deadline <= now),
            )
            .map(|&(id, _)| id)
            .collect();
        for id in due {
            self.classify_as(out, now, id, false);
        }
    }

    /// The splitter found a syntax error in `conn`'s stream: -32700, then close (L§3).
    pub fn syntax_error(&mut self, out: &mut Outbox, now: Instant, conn: ConnId) {
        if self.conns.remove(&conn).is_some() {
            crate::warn_limited!(now, "local client {conn}: JSON syntax error; closing");
            push_send(out, conn, error_no_id(RpcError::Parse).into());
            push_close(out, conn);
        }
    }

    /// One complete JSON value from `conn` (as cut by the splitter). Framing errors are answered
    /// here (L§3); a well-formed message is classified and returned for routing.
    pub fn handle_value(
        &mut self,
        out: &mut Outbox,
        now: Instant,
        conn: ConnId,
        raw: &[u8],
    ) -> Option<Inbound> {
        self.conns.get(&conn)?;
        // One scan for what routing needs; a tree only for the messages whose params are read.
        // UTF-8 is checked once, here: the scan of a `str` does not check it again.
        let utf8 = core::str::from_utf8(raw).ok();
        let scanned = match utf8 {
            Some(s) => rpc::scan_str(s),
            None => rpc::scan(raw),
        };
        let head = match scanned {
            Ok(h) => h,
            Err(e @ RpcError::Parse) => {
                crate::warn_limited!(now, "local client {conn}: {e}; closing");
                self.classify_as(out, now, conn, false);
                // An extra connection was just closed by that (L§2): nothing more goes to it.
                if self.conns.remove(&conn).is_some() {
                    push_send(out, conn, error_no_id(e).into());
                    push_close(out, conn);
                }
                return None;
            }
            Err(e @ RpcError::NotObject) => {
                crate::warn_limited!(now, "local client {conn}: {e}");
                self.classify_as(out, now, conn, false);
                if self.conns.contains_key(&conn) {
                    push_send(out, conn, error_no_id(e).into());
                }
                return None;
            }
        };
        let text = utf8.map_or_else(|| lossy(raw), str::to_owned);
        self.handle_scanned(out, now, conn, text, head)
    }

    /// [`Local::handle_value`] of a message already scanned (valid JSON, UTF-8): `head` is what
    /// [`rpc::scan`] gives for `text` (json_stream::Piece).
    pub fn handle_scanned(
        &mut self,
        out: &mut Outbox,
        now: Instant,
        conn: ConnId,
        text: String,
        head: rpc::Head,
    ) -> Option<Inbound> {
        let port = self.conns.get(&conn)?.port;
        let (method, id) = match head.kind() {
            Kind::Request { method, id } => (Some(method), id.cloned()),
            Kind::Reply { id } => (None, Some(id.clone())),
            Kind::Other => (None, None),
        };
        // The scan accepted it, so the parser does too.
        let tree = || rpc::parse_object(text.as_bytes()).unwrap_or_default();
        let internal = method.is_some_and(|m| m.starts_with("_internal."));
        if port == Port::Local {
            self.classify_as(out, now, conn, internal);
            if !self.conns.contains_key(&conn) {
                return None;
            }
        }
        match method {
            Some(m) if m.starts_with("local.") => Some(Inbound::Local {
                conn,
                method: m.to_owned(),
                id,
                obj: tree(),
            }),
            Some(m) if port == Port::Ble => {
                crate::warn_limited!(now, "BLE client sent {m}: only local.* is allowed");
                push_send(
                    out,
                    conn,
                    rpc::error_reply(id.as_ref(), -32601, "Method not found").into(),
                );
                None
            }
            Some(m) if internal => Some(Inbound::Internal {
                conn,
                method: m.to_owned(),
                obj: tree(),
                text,
            }),
            Some(_) => {
                // L§4.1, P§3: an id must be a u32. The reply echoes it as sent, even one no
                // `Value` holds (an id of 400 digits reads as null in `obj`).
                if id.as_ref().is_some_and(|v| rpc::id_u32(v).is_none()) {
                    let echo = rpc::raw_id(&text).unwrap_or("null");
                    push_send(out, conn, rpc::invalid_request(echo).into());
                    return None;
                }
                Some(Inbound::Upstream { conn, head, text })
            }
            None => match id.as_ref().and_then(rpc::id_u32) {
                Some(idn) if port != Port::Ble => Some(Inbound::Reply {
                    conn,
                    id: idn,
                    head,
                    text,
                }),
                _ => {
                    crate::info_limited!(
                        now,
                        "local client {conn}: message without method dropped"
                    );
                    None
                }
            },
        }
    }
}

/// Collection sizes for the month simulation (`proto::sim`): each must stay bounded.
#[cfg(test)]
impl Local {
    pub(crate) fn debug_sizes(&self, out: &mut Vec<(&'static str, usize)>) {
        let held = self.conns.values().map(|c| match &c.class {
            Class::Unclassified { held, .. } => held.len(),
            _ => 0,
        });
        out.extend([
            ("local.conns", self.conns.len()),
            ("local.held", held.sum()),
        ]);
    }
}

fn push_send(out: &mut Outbox, conn: ConnId, text: Rc<str>) {
    out.push(Action::Local(LocalAction::Send(conn, text)));
}

fn push_close(out: &mut Outbox, conn: ConnId) {
    out.push(Action::Local(LocalAction::Close(conn)));
}

fn error_no_id(e: RpcError) -> String {
    rpc::error_reply(None, e.code(), e.message())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The local actions pushed so far, in order.
    fn texts(o: &mut Outbox) -> Vec<LocalAction> {
        std::iter::from_fn(|| o.pop())
            .map(|a| match a {
                Action::Local(a) => a,
                other => panic!("not a local action: {other:?}"),
            })
            .collect()
    }

    fn sent_to(actions: &[LocalAction], conn: ConnId) -> Vec<String> {
        actions
            .iter()
            .filter_map(|a| match a {
                LocalAction::Send(c, t) if *c == conn => Some(t.to_string()),
                _ => None,
            })
            .collect()
    }

    const T0: Instant = Instant(1000);

    #[test]
    fn framing_errors() {
        let mut o = Outbox::default();
        let mut l = Local::new(20);
        assert!(l.accept(T0, 1, Port::Local));
        assert!(l.handle_value(&mut o, T0, 1, b"[1,2]").is_none());
        let a = texts(&mut o);
        assert_eq!(
            sent_to(&a, 1),
            vec![r#"{"error":{"code":-32600,"message":"Invalid Request"}}"#]
        );
        assert!(l.handle_value(&mut o, T0, 1, b"{bad").is_none());
        let a = texts(&mut o);
        assert_eq!(
            sent_to(&a, 1),
            vec![r#"{"error":{"code":-32700,"message":"Parse error"}}"#]
        );
        assert!(a.contains(&LocalAction::Close(1)));
        assert_eq!(l.len(), 0);
    }

    #[test]
    fn classification_and_held_broadcasts() {
        let mut o = Outbox::default();
        let mut l = Local::new(20);
        l.accept(T0, 1, Port::Local);
        l.accept(T0, 2, Port::Local);
        l.broadcast_status(
            &mut o,
            r#"{"method":"local.status","params":"cloud_connected"}"#,
        );
        assert!(texts(&mut o).is_empty(), "held while unclassified");
        // conn 1 says hello: helper; its held broadcast is discarded.
        let m = l.handle_value(&mut o, T0, 1, br#"{"method":"_internal.hello"}"#);
        assert!(matches!(m, Some(Inbound::Internal { conn: 1, .. })));
        assert!(l.is_helper(1));
        assert!(texts(&mut o).is_empty());
        // conn 2 stays silent: after 1 s it is ordinary and gets the held broadcast.
        assert_eq!(l.poll_timeout(), Some(T0 + CLASSIFY_WINDOW));
        l.handle_timeout(&mut o, T0 + CLASSIFY_WINDOW);
        let a = texts(&mut o);
        assert_eq!(sent_to(&a, 2).len(), 1);
        // A later broadcast reaches 2, never the helper.
        l.broadcast_command(&mut o, r#"{"id":5,"method":"get_prop"}"#);
        let a = texts(&mut o);
        assert_eq!(sent_to(&a, 2).len(), 1);
        assert!(sent_to(&a, 1).is_empty());
    }

    #[test]
    fn routing_kinds() {
        let mut o = Outbox::default();
        let mut l = Local::new(20);
        l.accept(T0, 1, Port::Local);
        assert!(matches!(
            l.handle_value(&mut o, T0, 1, br#"{"id":1,"method":"local.query_status"}"#),
            Some(Inbound::Local { .. })
        ));
        assert!(matches!(
            l.handle_value(
                &mut o,
                T0,
                1,
                br#"{"id":2,"method":"props","params":{"a":1}}"#
            ),
            Some(Inbound::Upstream { .. })
        ));
        assert!(matches!(
            l.handle_value(&mut o, T0, 1, br#"{"id":3,"result":["ok"]}"#),
            Some(Inbound::Reply { id: 3, .. })
        ));
        assert!(l
            .handle_value(&mut o, T0, 1, br#"{"id":"x","method":"props"}"#)
            .is_none());
        let a = texts(&mut o);
        assert_eq!(
            sent_to(&a, 1),
            vec![r#"{"id":"x","error":{"code":-32600,"message":"Invalid Request"}}"#]
        );
        assert!(l.handle_value(&mut o, T0, 1, br#"{"foo":1}"#).is_none());
    }

    #[test]
    fn a_broadcast_is_one_allocation_for_every_connection() {
        let mut o = Outbox::default();
        let mut l = Local::new(20);
        for c in 1..=3 {
            l.accept(T0, c, Port::Local);
        }
        l.handle_timeout(&mut o, T0 + CLASSIFY_WINDOW);
        l.accept(T0, 4, Port::Local); // unclassified: holds the broadcast
        l.broadcast_command(&mut o, r#"{"id":5,"method":"get_prop"}"#);
        let a = texts(&mut o);
        let shared: Vec<&Rc<str>> = a
            .iter()
            .filter_map(|a| match a {
                LocalAction::Send(_, t) => Some(t),
                _ => None,
            })
            .collect();
        assert_eq!(shared.len(), 3);
        assert!(shared.iter().all(|t| Rc::ptr_eq(t, shared[0])));
        // Three actions and conn 4's held list: four holders of one string.
        assert_eq!(Rc::strong_count(shared[0]), 4);
        let kept = shared[0].clone();
        drop(a);
        l.handle_timeout(&mut o, T0 + CLASSIFY_WINDOW + CLASSIFY_WINDOW);
        match texts(&mut o).as_slice() {
            [LocalAction::Send(4, t)] => assert!(Rc::ptr_eq(t, &kept)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn ble_port_rules() {
        let mut o = Outbox::default();
        let mut l = Local::new(20);
        assert!(l.accept(T0, 7, Port::Ble));
        assert!(!l.accept(T0, 8, Port::Ble), "one BLE client only");
        assert!(l
            .handle_value(&mut o, T0, 7, br#"{"id":4,"method":"props"}"#)
            .is_none());
        let a = texts(&mut o);
        assert_eq!(
            sent_to(&a, 7),
            vec![r#"{"id":4,"error":{"code":-32601,"message":"Method not found"}}"#]
        );
        l.broadcast_status(&mut o, "S");
        l.broadcast_command(&mut o, "C");
        let a = texts(&mut o);
        assert_eq!(sent_to(&a, 7), vec!["S".to_string()]);
    }

    #[test]
    fn limit_and_extra_helper_connections() {
        let mut o = Outbox::default();
        let mut l = Local::new(2);
        assert!(l.accept(T0, 1, Port::Local));
        assert!(l.accept(T0, 2, Port::Local));
        // Two extras may wait to prove they are helpers; a third is refused at once.
        assert!(l.accept(T0, 3, Port::Local));
        assert!(l.accept(T0, 4, Port::Local));
        assert!(!l.accept(T0, 5, Port::Local));
        // Extra 3 is a helper: kept. Extra 4 sends a plain request: closed.
        assert!(l
            .handle_value(&mut o, T0, 3, br#"{"method":"_internal.helper_ready"}"#)
            .is_some());
        assert!(l.is_helper(3));
        assert!(l
            .handle_value(&mut o, T0, 4, br#"{"id":1,"method":"props"}"#)
            .is_none());
        let a = texts(&mut o);
        assert!(a.contains(&LocalAction::Close(4)));
        assert_eq!(l.len(), 3);
    }

    #[test]
    fn silent_extra_is_closed_after_the_window() {
        let mut o = Outbox::default();
        let mut l = Local::new(1);
        l.accept(T0, 1, Port::Local);
        l.accept(T0, 2, Port::Local);
        l.handle_timeout(&mut o, T0 + CLASSIFY_WINDOW);
        let a = texts(&mut o);
        assert!(a.contains(&LocalAction::Close(2)));
        assert!(!a.contains(&LocalAction::Close(1)));
    }

    #[test]
    fn valid_json_beyond_serde_is_routed_not_a_parse_error() {
        // L§4.1: an id that is not a u32 gets -32600 with the id as sent; the connection stays.
        let mut o = Outbox::default();
        let mut l = Local::new(20);
        l.accept(T0, 1, Port::Local);
        let big = "9".repeat(400);
        let t = format!(r#"{{"id":{big},"method":"props","params":{{}}}}"#);
        assert!(l.handle_value(&mut o, T0, 1, t.as_bytes()).is_none());
        let a = texts(&mut o);
        let invalid = |id: &str| {
            format!(r#"{{"id":{id},"error":{{"code":-32600,"message":"Invalid Request"}}}}"#)
        };
        assert_eq!(sent_to(&a, 1), vec![invalid(&big)]);
        assert!(!a.contains(&LocalAction::Close(1)));
        for id in ["4294967296", "-1", "1.5", "1e400"] {
            let t = format!(r#"{{"id":{id},"method":"props"}}"#);
            assert!(
                l.handle_value(&mut o, T0, 1, t.as_bytes()).is_none(),
                "{id}"
            );
            assert_eq!(sent_to(&texts(&mut o), 1), vec![invalid(id)], "{id}");
        }
        // Valid JSON with a number no f64 holds goes upstream byte for byte.
        let t = r#"{"id":7,"method":"props","params":{"x":1e400, "y":[-2E+999]}}"#;
        match l.handle_value(&mut o, T0, 1, t.as_bytes()) {
            Some(Inbound::Upstream {
                conn: 1,
                text,
                head,
            }) => {
                assert_eq!(text, t);
                assert_eq!(head.id, Some(7.into()));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(l.len(), 1);
    }
}
