//! The virtual-time harness the cloud machine's tests share: the reactor and the node, played
//! by the test.

use std::collections::VecDeque;
use std::net::Ipv4Addr;

use serde_json::{json, Map, Value};

use super::*;
use crate::fuzzing::cloud_out;
pub(super) use crate::fuzzing::CloudOut as Action;
use crate::wire::crypto::md5;

pub(super) const DID: u32 = 1234567;
pub(super) const KEY: &[u8; 16] = b"YWJjZGVmZ2hpamts";
pub(super) const LOCAL: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
pub(super) const SERVER: Ipv4Addr = Ipv4Addr::new(1, 2, 3, 4);
/// Server time of the time-sync replies.
pub(super) const T0: u32 = 0x5a9b_239d;

pub(super) fn cfg() -> CloudConfig {
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

pub(super) fn tcp_cfg() -> CloudConfig {
    let mut c = cfg();
    c.transports = vec![Transport::Tcp];
    c
}

pub(super) fn obj(text: &str) -> Map<String, Value> {
    rpc::parse_object(text.as_bytes()).expect("test JSON object")
}

/// The members of an `_internal.info`-shaped text, for `handle_info`.
pub(super) fn info(text: &str) -> Members {
    Members::of_object(text.as_bytes()).expect("test JSON object")
}

pub(super) fn head(text: &str) -> rpc::Head {
    rpc::scan(text.as_bytes()).expect("test JSON object")
}

/// A packet with any payload bytes and a correct MD5 (for the negative vectors).
pub(super) fn raw_packet(did: u32, stamp: u32, payload: &[u8]) -> Vec<u8> {
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
pub(super) const HEADER: usize = miio::HEADER_LEN;

/// Virtual-time harness: the reactor and the node, played by the test.
pub(super) struct H {
    pub(super) c: Cloud,
    pub(super) now: Instant,
    /// What the machine did, as the test reads it: the effects, then the events of each call.
    pub(super) out: VecDeque<Action>,
    /// The outbox the machine pushes its effects into.
    pub(super) o: Outbox,
    pub(super) keys: Keys,
    pub(super) tcp: bool,
}

impl H {
    pub(super) fn new(cfg: CloudConfig) -> H {
        H {
            c: Cloud::new(cfg),
            now: Instant(1_000_000),
            out: VecDeque::new(),
            o: Outbox::default(),
            keys: Keys::new(KEY),
            tcp: false,
        }
    }

    pub(super) fn connected(cfg: CloudConfig) -> H {
        let mut h = H::new(cfg);
        h.up();
        h
    }

    pub(super) fn pump(&mut self) {
        while let Some(a) = cloud_out(&mut self.o, &mut self.c) {
            self.out.push_back(a);
        }
    }

    pub(super) fn take(&mut self) -> Vec<Action> {
        self.pump();
        self.out.drain(..).collect()
    }

    pub(super) fn next(&mut self) -> Action {
        self.pump();
        self.out.pop_front().expect("an action")
    }

    #[track_caller]
    pub(super) fn quiet(&mut self) {
        let a = self.take();
        assert!(a.is_empty(), "unexpected actions {a:?}");
    }

    /// Fires every deadline up to now + ms; the actions queue up for the test.
    pub(super) fn advance(&mut self, ms: u64) {
        let end = Instant(self.now.0 + ms);
        while let Some(t) = self.c.poll_timeout().filter(|&t| t <= end) {
            self.now = self.now.max(t);
            self.c.handle_timeout(self.now, &mut self.o);
            self.pump();
        }
        self.now = end;
    }

    /// The resolver's answer to the last `Resolve`.
    pub(super) fn resolved(&mut self, r: Result<Vec<Ipv4Addr>, String>) {
        self.c
            .handle_resolved(self.now, self.c.dns_attempt, r, &mut self.o);
    }

    pub(super) fn deliver(&mut self, bytes: &[u8]) {
        if self.tcp {
            self.c.handle_stream(self.now, bytes, &mut self.o);
        } else {
            self.c.handle_datagram(self.now, bytes, &mut self.o);
        }
        self.pump();
    }

    pub(super) fn msg(&self, json: &str) -> Vec<u8> {
        miio::seal(&self.keys, DID, self.c.stamp(self.now), json.as_bytes())
    }

    pub(super) fn deliver_json(&mut self, json: &str) {
        let p = self.msg(json);
        self.deliver(&p);
    }

    #[track_caller]
    pub(super) fn expect_send(&mut self) -> Vec<u8> {
        match self.next() {
            Action::Send(b) => b,
            a => panic!("expected Send, got {a:?}"),
        }
    }

    /// The next action is a data packet: its stamp and JSON.
    #[track_caller]
    pub(super) fn expect_json(&mut self) -> (u32, Map<String, Value>) {
        let b = self.expect_send();
        let o = miio::decode(&self.keys, DID, &b).expect("a data packet");
        let stamp = Packet::new_checked(&b[..]).map(|p| p.stamp()).unwrap_or(0);
        (stamp, o.value)
    }

    #[track_caller]
    pub(super) fn expect_text(&mut self) -> String {
        let b = self.expect_send();
        miio::decode(&self.keys, DID, &b)
            .expect("a data packet")
            .text
    }

    #[track_caller]
    /// The next event is `e`. Events are a channel of their own, read after the effects of their
    /// call: effects queued before it (a Resolve after Trying, a hello after InternetConnected)
    /// stay for the test to read next.
    pub(super) fn expect_event(&mut self, e: CloudEvent) {
        self.pump();
        let i = self.out.iter().position(is_event);
        let got = i.and_then(|i| self.out.remove(i));
        assert_eq!(got, Some(Action::Event(e)));
    }

    pub(super) fn up(&mut self) -> bool {
        self.c.start(self.now, &mut self.o);
        self.expect_event(CloudEvent::Trying);
        self.finish_attempt()
    }

    /// From `Resolve`/`Connect` to `Connected`; true when the D12 idle report went up.
    pub(super) fn finish_attempt(&mut self) -> bool {
        let mut a = self.next();
        if let Action::Resolve { .. } = a {
            self.resolved(Ok(vec![SERVER]));
            a = self.next();
        }
        let Action::Connect { transport, .. } = a else {
            panic!("expected Connect, got {a:?}");
        };
        self.tcp = transport == Transport::Tcp;
        self.c.handle_connected(self.now, LOCAL, &mut self.o);
        self.expect_event(CloudEvent::InternetConnected);
        assert_eq!(self.expect_send(), miio::cloud_hello());
        self.deliver(&miio::time_sync_reply(T0));
        assert_eq!(self.next(), Action::NeedInfo);
        self.c.handle_info(
            self.now,
            &info(r#"{"params":{"hw_ver":"Linux"}}"#),
            &mut self.o,
        );
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

    pub(super) fn upstream(&mut self, client: u32, text: &str) {
        self.c.upstream(
            self.now,
            client as ConnId,
            text.to_owned(),
            &head(text),
            &mut self.o,
        );
        self.pump();
    }

    pub(super) fn reply(&mut self, client: u32, text: &str) -> bool {
        let r = self
            .c
            .local_reply(self.now, client as ConnId, text, &head(text), &mut self.o);
        self.pump();
        r
    }
}

pub(super) fn to_client(client: u32, text: &str) -> Action {
    Action::ToClient {
        client: client as ConnId,
        text: text.to_owned(),
    }
}
/// A cloud command the tests send down (P§5.8).
pub(super) const CMD: &str = r#"{"id":55,"method":"set_power","params":["on"],"from":"4"}"#;

/// True for what the machine left to the node (an event), false for an effect in the outbox.
pub(super) fn is_event(a: &Action) -> bool {
    matches!(
        a,
        Action::NeedInfo
            | Action::Command { .. }
            | Action::SelfMethod { .. }
            | Action::Event(_)
            | Action::Didkey(_)
    )
}

/// `v` as its two channels: the effects in order, and the events in order.
pub(super) fn channels(v: Vec<Action>) -> (Vec<Action>, Vec<Action>) {
    v.into_iter().partition(|a| !is_event(a))
}
