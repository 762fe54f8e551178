//! The MQTT bridge (LOCAL_API.md §11): the node's side of `--mqtt`. It owns the broker session
//! (`proto::mqtt`), turns its actions into the node's `Broker*` actions, and makes the broker two
//! more ordinary local clients of the local table, so that the routing of L§4 (the upstream rules,
//! the id rewrite, first reply wins, `local.*`) is the one of 54322 with no second copy:
//!
//! - [`REPORT_CONN`] carries what arrives on `miio/report` and `miio/command_ack`;
//!   [`LOCAL_CONN`] what arrives on `local/miio_client_in`. Both are attached while the session is
//!   up and closed like a client that left when it goes down, so what is meant for a broker that
//!   is unreachable is dropped (L§11) and a command finds no audience there.
//! - What the node sends to them becomes a publish, its topic chosen by what it is
//!   ([`topic_for`]): to `REPORT_CONN`, a reply (an ack or error of an upstream request) goes to
//!   `miio/report_ack`, a request or notice (a command, a `local.status` broadcast) to
//!   `miio/command`; an answer to `local.*` (it names a `local.*` method and has an id) goes to
//!   `local/miio_client_out`, and so does everything for `LOCAL_CONN` except the copies of the
//!   broadcasts, which `REPORT_CONN` publishes once.
//!
//! The publish is made when the io side takes the action (`Node::poll_action`), so the broker's
//! packets keep the order of the node's decisions. Nothing here has a deadline but the session's:
//! with the default keep-alive of 0 an idle daemon does not wake for the broker.

use super::Node;
use crate::proto::local::{ConnId, LocalAction};
use crate::proto::mqtt::{self, Session, Topic};
use crate::proto::outbox::Action;
use crate::time::Instant;
use crate::wire::json_stream::Piece;
use crate::wire::rpc;

/// The local connection of `miio/report` and `miio/command_ack`; no reactor slot is this high.
pub const REPORT_CONN: ConnId = usize::MAX;
/// The local connection of `local/miio_client_in`.
pub const LOCAL_CONN: ConnId = usize::MAX - 1;

pub(super) struct Bridge {
    session: Session,
    /// The time of the node's last input: publishes are made when io takes their action.
    now: Instant,
}

/// The topic a message the node sent to a bridge connection is published on, or None for the
/// copy of a broadcast that `REPORT_CONN` publishes already.
pub fn topic_for(conn: ConnId, text: &str) -> Option<Topic> {
    let head = rpc::scan_str(text).ok()?;
    let local = conn == LOCAL_CONN;
    match &head.method {
        None => Some(if local {
            Topic::LocalOut
        } else {
            Topic::ReportAck
        }),
        Some(_) if head.id.is_some() && head.method().starts_with("local.") => {
            Some(Topic::LocalOut)
        }
        Some(_) if local => None,
        Some(_) => Some(Topic::Command),
    }
}

impl Node {
    /// `--mqtt`: starts the broker session with these settings (L§11).
    pub fn mqtt_start(&mut self, now: Instant, cfg: mqtt::Config) {
        let mut session = Session::new(cfg);
        session.start(now);
        self.mqtt = Some(Bridge { session, now });
        self.mqtt_pump(now);
    }

    /// The broker connection is open.
    pub fn broker_connected(&mut self, now: Instant) {
        self.with_session(now, |s| s.connected(now));
    }

    /// The broker connection could not be opened.
    pub fn broker_connect_failed(&mut self, now: Instant) {
        self.with_session(now, |s| s.connect_failed(now));
    }

    /// The broker closed the connection, a read or write failed, or its backlog overflowed.
    pub fn broker_closed(&mut self, now: Instant) {
        self.with_session(now, |s| s.closed(now));
    }

    /// Bytes read from the broker connection.
    pub fn broker_bytes(&mut self, now: Instant, bytes: &[u8]) {
        self.with_session(now, |s| s.received(now, bytes));
    }

    fn with_session(&mut self, now: Instant, f: impl FnOnce(&mut Session)) {
        if let Some(b) = self.mqtt.as_mut() {
            f(&mut b.session);
        }
        self.mqtt_pump(now);
    }

    /// The time of the node's input, for the publishes io takes after it.
    pub(super) fn mqtt_now(&mut self, now: Instant) {
        if let Some(b) = self.mqtt.as_mut() {
            b.now = now;
        }
    }

    /// The session's deadline (none while up with keep-alive 0).
    pub(super) fn mqtt_timeout(&self) -> Option<Instant> {
        self.mqtt.as_ref().and_then(|b| b.session.poll_timeout())
    }

    pub(super) fn mqtt_handle_timeout(&mut self, now: Instant) {
        self.with_session(now, |s| s.handle_timeout(now));
    }

    /// Shutdown: DISCONNECT when up.
    pub(super) fn mqtt_stop(&mut self, now: Instant) {
        self.with_session(now, |s| s.stop(now));
    }

    /// Moves the session's actions into the outbox and routes its events, until it has none.
    pub(super) fn mqtt_pump(&mut self, now: Instant) {
        loop {
            let Some(b) = self.mqtt.as_mut() else { return };
            b.now = now;
            if let Some(a) = b.session.poll_action() {
                self.actions.push(broker_action(a));
                continue;
            }
            let Some(e) = b.session.poll_event() else {
                return;
            };
            match e {
                mqtt::Event::Up => {
                    self.local.attach(REPORT_CONN);
                    self.local.attach(LOCAL_CONN);
                }
                mqtt::Event::Down => {
                    self.local_closed(REPORT_CONN);
                    self.local_closed(LOCAL_CONN);
                }
                mqtt::Event::Message { topic, mut payload } => {
                    let conn = if topic == Topic::LocalIn {
                        LOCAL_CONN
                    } else {
                        REPORT_CONN
                    };
                    // L§11: a payload may end in whitespace or NUL.
                    let end = payload
                        .iter()
                        .rposition(|c| !matches!(c, b' ' | b'\t' | b'\r' | b'\n' | 0))
                        .map_or(0, |i| i + 1);
                    // A framing error closes a 54322 client (L§3); the broker's messages come
                    // from many apps, so the connection is attached again for the next one.
                    self.local.attach(conn);
                    payload.truncate(end);
                    // The path of a 54322 client's value (not `local_value`): one copy of the
                    // routing code on flash.
                    self.local_piece(now, conn, Piece::Raw(payload));
                }
            }
        }
    }

    /// What io takes from the outbox: a message for a bridge connection becomes its publish (or
    /// nothing: the broker is down, its queue is full, a broadcast's copy), anything else is
    /// given as it is.
    pub(super) fn mqtt_divert(&mut self, a: Action) -> Option<Action> {
        let Some(b) = self.mqtt.as_mut() else {
            return Some(a);
        };
        match a {
            Action::Local(LocalAction::Send(conn, text)) if conn >= LOCAL_CONN => {
                let topic = topic_for(conn, &text)?;
                b.session.publish(b.now, topic, text.as_bytes()).ok()?;
                // A publish is one packet, queued by the session just now.
                b.session.poll_action().map(broker_action)
            }
            Action::Local(LocalAction::Close(conn)) if conn >= LOCAL_CONN => None,
            a => Some(a),
        }
    }
}

fn broker_action(a: mqtt::Action) -> Action {
    match a {
        mqtt::Action::Connect => Action::BrokerConnect,
        mqtt::Action::Send(b) => Action::BrokerSend(b),
        mqtt::Action::Close => Action::BrokerClose,
    }
}

#[cfg(test)]
mod tests {
    use super::super::harness::*;
    use super::*;
    use crate::wire::mqtt::{self as codec, Packet, QoS, Splitter};

    /// A node in the cloud-connected state with the bridge up; returns the node and `now`.
    fn bridged() -> (Node, Instant) {
        let mut n = node();
        let t0 = Instant(10_000);
        n.handle_timeout(t0); // the helper grace is over: file mode
        n.set_identity(t0, identity(true));
        serve(&mut n, t0);
        assert_eq!(n.state(), State::CloudConnected);
        n.mqtt_start(t0, crate::proto::mqtt::Config::default());
        assert_eq!(drain(&mut n), vec![Action::BrokerConnect]);
        n.broker_connected(t0);
        let connect = drain(&mut n);
        assert!(
            matches!(&connect[..], [Action::BrokerSend(_)]),
            "{connect:?}"
        );
        n.broker_bytes(t0, &[0x20, 2, 0, 0]); // CONNACK accepted
        let sub = drain(&mut n);
        assert!(matches!(&sub[..], [Action::BrokerSend(_)]), "{sub:?}");
        n.broker_bytes(t0, &[0x90, 5, 0, 1, 1, 1, 1]); // SUBACK, QoS 1 granted
        assert!(drain(&mut n).is_empty());
        (n, t0)
    }

    fn publish_in(topic: &str, id: u16, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let p = codec::Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic,
            id: Some(id),
            payload,
        };
        codec::publish(&p, &mut out).unwrap();
        out
    }

    /// The publishes in `actions` as (topic, payload); PUBACKs and other packets left out.
    fn published(actions: &[Action]) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for a in actions {
            if let Action::BrokerSend(b) = a {
                let mut s = Splitter::new(1 << 20);
                s.push(b);
                while let Ok(Some(f)) = s.next_frame() {
                    if let Ok(Packet::Publish(p)) = codec::decode(f) {
                        out.push((
                            p.topic.to_owned(),
                            String::from_utf8_lossy(p.payload).into_owned(),
                        ));
                    }
                }
            }
        }
        out
    }

    fn cloud_sends(keys: &Keys, actions: &[Action]) -> Vec<Value> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::CloudSend(b) => {
                    Some(Value::Object(miio::decode(keys, DID, b).unwrap().value))
                }
                _ => None,
            })
            .collect()
    }

    #[test]
    fn the_topic_follows_what_is_sent() {
        let cases = [
            (
                REPORT_CONN,
                r#"{"id":7,"result":"ok"}"#,
                Some(Topic::ReportAck),
            ),
            (
                REPORT_CONN,
                r#"{"id":7,"error":{"code":-30011,"message":"x"}}"#,
                Some(Topic::ReportAck),
            ),
            (
                REPORT_CONN,
                r#"{"id":9,"method":"set_power","params":["on"]}"#,
                Some(Topic::Command),
            ),
            (
                REPORT_CONN,
                r#"{"method":"local.status","params":"cloud_connected"}"#,
                Some(Topic::Command),
            ),
            (
                REPORT_CONN,
                r#"{"id":1,"method":"local.status","params":"cloud_connected"}"#,
                Some(Topic::LocalOut),
            ),
            (
                LOCAL_CONN,
                r#"{"id":1,"method":"local.time","params":5}"#,
                Some(Topic::LocalOut),
            ),
            (
                LOCAL_CONN,
                r#"{"id":4,"error":{"code":-32601,"message":"Method not found"}}"#,
                Some(Topic::LocalOut),
            ),
            (
                LOCAL_CONN,
                r#"{"method":"local.status","params":"cloud_retry"}"#,
                None,
            ),
            (
                LOCAL_CONN,
                r#"{"id":9,"method":"set_power","params":["on"]}"#,
                None,
            ),
        ];
        for (conn, text, want) in cases {
            assert_eq!(topic_for(conn, text), want, "{conn} {text}");
        }
    }

    /// L§11: a report on `miio/report` goes up with a cloud id; the cloud's ack comes back on
    /// `miio/report_ack` under the original id. The broker's PUBLISH is acked.
    #[test]
    fn a_report_goes_up_and_its_ack_comes_back_on_report_ack() {
        let keys = Keys::new(&KEY);
        let (mut n, t0) = bridged();
        n.broker_bytes(
            t0,
            &publish_in(
                "miio/report",
                3,
                br#"{"id":41,"method":"props","params":{"a":1}} "#,
            ),
        );
        let out = drain(&mut n);
        assert!(
            out.contains(&Action::BrokerSend(vec![0x40, 2, 0, 3])),
            "{out:?}"
        );
        let up = cloud_sends(&keys, &out);
        assert_eq!(up.len(), 1, "{out:?}");
        assert_eq!(up[0]["method"], "props");
        let ack = format!(r#"{{"id":{},"result":"ok"}}"#, up[0]["id"]);
        n.cloud_datagram(t0, &miio::seal(&keys, DID, 1_700_000_001, ack.as_bytes()));
        assert_eq!(
            published(&drain(&mut n)),
            vec![(
                "miio/report_ack".into(),
                r#"{"id":41,"result":"ok"}"#.into()
            )]
        );
    }

    /// A cloud command goes to `miio/command`; the reply on `miio/command_ack` goes up, and the
    /// first reply wins.
    #[test]
    fn a_command_goes_out_and_the_first_reply_goes_up() {
        let keys = Keys::new(&KEY);
        let (mut n, t0) = bridged();
        let cmd = r#"{"id":900,"method":"set_power","params":["on"]}"#;
        n.cloud_datagram(t0, &miio::seal(&keys, DID, 1_700_000_001, cmd.as_bytes()));
        let out = drain(&mut n);
        let p = published(&out);
        assert_eq!(p.len(), 1, "{out:?}");
        assert_eq!(p[0].0, "miio/command");
        let sent: Value = serde_json::from_str(&p[0].1).unwrap();
        assert_eq!(sent["method"], "set_power");
        let reply = format!(r#"{{"id":{},"result":["ok"]}}"#, sent["id"]);
        n.broker_bytes(t0, &publish_in("miio/command_ack", 4, reply.as_bytes()));
        n.broker_bytes(t0, &publish_in("miio/command_ack", 5, reply.as_bytes()));
        let up = cloud_sends(&keys, &drain(&mut n));
        assert_eq!(up, vec![json!({"id":900,"result":["ok"]})]);
    }

    /// `local/miio_client_in` → `local/miio_client_out`, and the answer is not published twice
    /// (the bridge's other connection gets no copy).
    #[test]
    fn local_requests_are_answered_on_local_out() {
        let (mut n, t0) = bridged();
        n.broker_bytes(
            t0,
            &publish_in(
                "local/miio_client_in",
                6,
                br#"{"id":2,"method":"local.query_status"}"#,
            ),
        );
        n.broker_bytes(
            t0,
            &publish_in(
                "local/miio_client_in",
                7,
                b"{\"id\":3,\"method\":\"local.nonesuch\"}\0",
            ),
        );
        assert_eq!(
            published(&drain(&mut n)),
            vec![
                (
                    "local/miio_client_out".into(),
                    r#"{"id":2,"method":"local.status","params":"cloud_connected"}"#.into()
                ),
                (
                    "local/miio_client_out".into(),
                    r#"{"id":3,"error":{"code":-32601,"message":"Method not found"}}"#.into()
                ),
            ]
        );
    }

    /// A broadcast reaches `miio/command` once; a malformed payload is answered and the next
    /// message is still taken.
    #[test]
    fn broadcasts_once_and_bad_payloads_do_not_detach() {
        let (mut n, t0) = bridged();
        n.broadcast("internet_connected");
        assert_eq!(
            published(&drain(&mut n)),
            vec![(
                "miio/command".into(),
                r#"{"method":"local.status","params":"internet_connected"}"#.into()
            )]
        );
        n.broker_bytes(t0, &publish_in("miio/report", 8, b"{nope"));
        n.broker_bytes(
            t0,
            &publish_in(
                "local/miio_client_in",
                9,
                br#"{"id":5,"method":"local.query_time"}"#,
            ),
        );
        let p = published(&drain(&mut n));
        assert_eq!(p.len(), 2, "{p:?}");
        assert_eq!(p[0].0, "miio/report_ack");
        assert!(p[0].1.contains("-32700"), "{p:?}");
        assert_eq!(p[1].0, "local/miio_client_out");
    }

    /// L§11: while the broker is down what is meant for it is dropped, a cloud command counts no
    /// audience there, and the session's backoff is the only deadline; up again, it resubscribes.
    #[test]
    fn down_drops_and_reconnects_with_backoff() {
        let keys = Keys::new(&KEY);
        let (mut n, t0) = bridged();
        n.broker_closed(t0);
        assert!(drain(&mut n).is_empty());
        assert_eq!(n.poll_timeout(), Some(t0 + Duration::from_secs(1)));
        let cmd = r#"{"id":901,"method":"set_power","params":["on"]}"#;
        n.cloud_datagram(t0, &miio::seal(&keys, DID, 1_700_000_001, cmd.as_bytes()));
        let out = drain(&mut n);
        assert!(published(&out).is_empty(), "{out:?}");
        // No local client: answered -9999 at once (P§5.8).
        let up = cloud_sends(&keys, &out);
        assert_eq!(up[0]["error"]["code"], -9999, "{up:?}");
        let t1 = t0 + Duration::from_secs(1);
        n.handle_timeout(t1);
        assert_eq!(drain(&mut n), vec![Action::BrokerConnect]);
        n.broker_connected(t1);
        drain(&mut n);
        n.broker_bytes(t1, &[0x20, 2, 0, 0]);
        let sub = drain(&mut n);
        assert_eq!(sub.len(), 1, "{sub:?}");
        n.broker_bytes(t1, &[0x90, 5, 0, 2, 1, 1, 1]);
        n.broadcast("cloud_retry");
        assert_eq!(published(&drain(&mut n)).len(), 1);
    }

    /// An idle connected bridge with keep-alive 0 has no deadline of its own.
    #[test]
    fn an_idle_bridge_sets_no_deadline() {
        let (mut n, t0) = bridged();
        let without = {
            let mut m = node();
            m.handle_timeout(t0);
            m.set_identity(t0, identity(true));
            serve(&mut m, t0);
            m.poll_timeout()
        };
        assert_eq!(n.poll_timeout(), without);
        n.handle_timeout(t0);
        assert!(published(&drain(&mut n)).is_empty());
    }
}
