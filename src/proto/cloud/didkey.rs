//! The did/key exchange of a bootstrap session (P§5.11, D14): a device whose did is 0 or 1 asks
//! the cloud for its identity after the time sync, under the bootstrap did and key, instead of
//! sending `_otc.info`. The reply is an assignment (the machine stops and the node stores it and
//! starts over under the new identity), a `retry_after` (the session closes and the next attempt
//! waits that long, the node's state unchanged), or anything else: a failed attempt (§5.9).
//! The key of an assignment is a [`Secret16`]; it reaches no log line.

use log::{info, warn};
use serde_json::{Map, Value};

use super::*;
use crate::config::Secret16;

/// `retry_after` when the reply has none (P§5.11: type 0 is processed in a daily batch).
pub const RETRY_DEFAULT: Duration = Duration::from_secs(86_400);
/// The shortest wait a `retry_after` may ask for (P§5.11).
pub const RETRY_MIN: Duration = Duration::from_secs(60);
/// The longest: a bounded wait whatever the cloud sends (our choice, P§5.11).
pub const RETRY_MAX: Duration = Duration::from_secs(7 * 86_400);

/// What the exchange leaves to the node (L§16).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Didkey {
    /// The request went up: state `didkey_req2`.
    Asked,
    /// The cloud assigned an identity; the machine has stopped. The node stores it (helper or
    /// `device.conf`) and starts a new machine under it.
    Assigned { did: u32, key: Secret16 },
    /// The request is queued by the cloud; the session is closed and the next attempt is due
    /// after this wait (the machine's own deadline, so `wakeup_time` sees it).
    RetryAfter(Duration),
}

impl Cloud {
    /// Sends the did/key request (P§5.11) on the synced session.
    pub(super) fn didkey_request(&mut self, now: Instant, out: &mut Outbox) {
        if self.cfg.didkey.is_none() {
            return;
        }
        let id = self.alloc_id();
        let Some(ask) = self.cfg.didkey.as_ref() else {
            return;
        };
        let build = |id: u32, data: &str| {
            let mut p = Members::new();
            p.set("type", self.cfg.did.to_string());
            p.set_str("model", &self.cfg.model);
            p.set_str("mac", &self.cfg.mac.to_ascii_uppercase());
            p.set_str("vendor", &ask.vendor);
            p.set("data", data.to_owned());
            let mut m = Members::new();
            m.set("id", id.to_string());
            m.set_str("method", &self.cfg.didkey_method);
            m.set("params", p.to_json());
            m.to_json()
        };
        let mut text = build(id, &ask.data);
        if text.len() > self.cfg.max_cloud_payload {
            warn!(
                "did/key request too long ({} bytes): sent without the helper's material",
                text.len()
            );
            text = build(id, "null");
        }
        info!("send {}, id:{id}", self.cfg.didkey_method);
        self.send_up(now, id, Origin::Didkey, text, out);
        self.note(Event::Didkey(Didkey::Asked));
    }

    /// The reply to the did/key request (P§5.11).
    pub(super) fn didkey_reply(
        &mut self,
        now: Instant,
        obj: &Map<String, Value>,
        out: &mut Outbox,
    ) {
        if self.phase != Phase::Info {
            return;
        }
        match parse_reply(obj) {
            Ok(Reply::Assigned(did, key)) => {
                info!("the cloud assigned did {did}");
                self.stop(now, out);
                self.note(Event::Didkey(Didkey::Assigned { did, key }));
            }
            Ok(Reply::Retry(wait)) => {
                info!("did/key request queued by the cloud; next try in {wait}");
                self.end_session(out);
                // The next try starts again from the first server: this one answered.
                self.list_built = false;
                self.list.clear();
                self.tidx = 0;
                self.pos = 0;
                self.phase = Phase::Retry;
                self.wheel.set(Timer::Backoff, now + wait);
                self.note(Event::Didkey(Didkey::RetryAfter(wait)));
            }
            Err(why) => self.fail(now, &format!("did/key request refused: {why}"), out),
        }
    }
}

enum Reply {
    Assigned(u32, Secret16),
    Retry(Duration),
}

/// The three reply forms of P§5.11; anything else is the error text of a failed attempt.
fn parse_reply(obj: &Map<String, Value>) -> Result<Reply, String> {
    let r = match obj.get("result") {
        Some(Value::Object(r)) => r,
        Some(_) => return Err("the result is not an object".into()),
        None if obj.contains_key("error") => {
            let code = obj.get("error").and_then(|e| e.get("code"));
            return Err(format!(
                "error {}",
                code.and_then(Value::as_i64).unwrap_or(0)
            ));
        }
        None => return Err("no result".into()),
    };
    if r.contains_key("did") || r.contains_key("key") {
        let did = r.get("did").and_then(Value::as_u64);
        let did = match did.and_then(|d| u32::try_from(d).ok()) {
            Some(d) if d >= 2 => d,
            // A did of 0 or 1 would ask again at every start: never stored.
            _ => return Err("the assigned did is not a number from 2 to 4294967295".into()),
        };
        let key = r.get("key").and_then(Value::as_str).unwrap_or("");
        if key.len() != 16 || !key.bytes().all(|b| b.is_ascii_alphanumeric()) {
            // The key itself stays out of the log.
            return Err("the assigned key is not 16 ASCII letters or digits".into());
        }
        let mut k = [0; 16];
        k.copy_from_slice(key.as_bytes());
        return Ok(Reply::Assigned(did, Secret16::new(k)));
    }
    match r.get("retry_after") {
        None => Ok(Reply::Retry(RETRY_DEFAULT)),
        Some(v) => match v.as_u64() {
            Some(s) => Ok(Reply::Retry(
                Duration::from_secs(s.min(RETRY_MAX.millis() / 1000)).max(RETRY_MIN),
            )),
            None => Err("retry_after is not a number of seconds".into()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::cloud::testkit::Action;
    use crate::proto::cloud::testkit::*;
    use serde_json::json;

    fn boot_cfg(did: u32) -> CloudConfig {
        let mut c = cfg();
        c.did = did;
        c.didkey = Some(DidkeyAsk {
            vendor: "acme".into(),
            data: r#"{"a":[1]}"#.into(),
        });
        c
    }

    /// Up to the did/key request: its JSON, after `Asked`.
    fn asked(h: &mut H) -> Map<String, Value> {
        h.c.start(h.now, &mut h.o);
        h.expect_event(CloudEvent::Trying);
        if let Action::Resolve { .. } = h.next() {
            h.resolved(Ok(vec![SERVER]));
        }
        assert!(matches!(h.next(), Action::Connect { .. }));
        h.c.handle_connected(h.now, LOCAL, &mut h.o);
        h.expect_event(CloudEvent::InternetConnected);
        assert_eq!(h.expect_send(), miio::cloud_hello());
        h.deliver(&miio::time_sync_reply(T0));
        let b = h.expect_send();
        let m = miio::decode(&h.keys, h.c.cfg.did, &b)
            .expect("sealed")
            .value;
        assert_eq!(h.next(), Action::Didkey(Didkey::Asked));
        m
    }

    fn answer(h: &mut H, reply: Value) {
        let p = miio::seal(
            &h.keys,
            h.c.cfg.did,
            h.c.stamp(h.now),
            reply.to_string().as_bytes(),
        );
        h.deliver(&p);
    }

    /// P§5.11: after the time sync, the request under the bootstrap did; no `_otc.info`.
    #[test]
    fn the_request_goes_up_after_the_time_sync() {
        let mut h = H::new(boot_cfg(1));
        let m = asked(&mut h);
        let id = m["id"].clone();
        assert_eq!(
            Value::Object(m),
            json!({"id": id, "method": "_otc.didkey_req", "params": {"type": 1,
                "model": "vendor.camera.v1", "mac": "AA:BB:CC:01:02:03", "vendor": "acme",
                "data": {"a": [1]}}})
        );
        // A command on the bootstrap session is dropped.
        answer(
            &mut h,
            json!({"id": 9, "method": "set_power", "params": []}),
        );
        h.quiet();
        // The assignment stops the machine: closed, no cloud_connected.
        answer(
            &mut h,
            json!({"id": id, "result": {"did": 555, "key": "Nk3w9Zq0aB7cD1eF"}}),
        );
        assert_eq!(
            h.take(),
            vec![
                Action::Close,
                Action::Didkey(Didkey::Assigned {
                    did: 555,
                    key: Secret16::new(*b"Nk3w9Zq0aB7cD1eF")
                })
            ]
        );
        assert_eq!(h.c.state(), CloudState::Stopped);
        assert_eq!(h.c.poll_timeout(), None);
    }

    /// `--didkey-method` renames the method; material too long for a packet is left out.
    #[test]
    fn method_renamed_and_oversized_material_dropped() {
        let mut c = boot_cfg(0);
        c.didkey_method = "_otc.x".into();
        c.didkey.as_mut().unwrap().data = format!("\"{}\"", "z".repeat(2000));
        let mut h = H::new(c);
        let m = asked(&mut h);
        assert_eq!(m["method"], "_otc.x");
        assert_eq!(m["params"]["type"], 0);
        assert_eq!(m["params"]["data"], Value::Null);
    }

    /// `retry_after`: closed, the next attempt exactly that much later (60 s at least, a day
    /// when absent), no `cloud_retry`; the deadline is the machine's, so a suspend sees it.
    #[test]
    fn retry_after_waits_as_asked() {
        for (ra, wait) in [
            (json!({"retry_after": 120}), 120),
            (json!({"retry_after": 5}), 60),
            (json!({}), 86_400),
            (json!({"retry_after": u64::MAX}), 7 * 86_400),
        ] {
            let mut h = H::new(boot_cfg(0));
            let m = asked(&mut h);
            answer(&mut h, json!({"id": m["id"], "result": ra}));
            assert_eq!(
                h.take(),
                vec![
                    Action::Close,
                    Action::Didkey(Didkey::RetryAfter(Duration::from_secs(wait)))
                ]
            );
            assert_eq!(h.c.state(), CloudState::Retry);
            assert_eq!(h.c.poll_timeout(), Some(h.now + Duration::from_secs(wait)));
            h.advance(wait * 1000 - 1);
            h.quiet();
            h.advance(1);
            h.expect_event(CloudEvent::Trying);
        }
    }

    /// Garbage, an error, a did of 0/1 or a bad key: a failed attempt (D4 backoff), nothing
    /// assigned; the log names the reason, never the key.
    #[test]
    fn bad_replies_fail_the_attempt() {
        for bad in [
            json!({"error": {"code": -1, "message": "no"}}),
            json!({"result": "ok"}),
            json!({"result": {"did": 1, "key": "Nk3w9Zq0aB7cD1eF"}}),
            json!({"result": {"did": 0, "key": "Nk3w9Zq0aB7cD1eF"}}),
            json!({"result": {"did": 4_294_967_296u64, "key": "Nk3w9Zq0aB7cD1eF"}}),
            json!({"result": {"did": "555", "key": "Nk3w9Zq0aB7cD1eF"}}),
            json!({"result": {"did": 555, "key": "short"}}),
            json!({"result": {"did": 555, "key": "Nk3w9Zq0aB7cD1e!"}}),
            json!({"result": {"did": 555}}),
            json!({"result": {"retry_after": "soon"}}),
            json!({"result": {"retry_after": -5}}),
        ] {
            let mut h = H::new(boot_cfg(1));
            let m = asked(&mut h);
            let mut r = bad.clone();
            r["id"] = m["id"].clone();
            answer(&mut h, r);
            let got = h.take();
            assert_eq!(
                got,
                vec![Action::Close, Action::Event(CloudEvent::Retry)],
                "{bad}"
            );
            let t = h.c.poll_timeout().expect("a backoff");
            assert!(t <= h.now + Duration::from_secs(6), "{bad}: D4, not a day");
        }
        // No ack at all (UDP: three retransmissions, then the attempt fails).
        let mut h = H::new(boot_cfg(1));
        asked(&mut h);
        for _ in 0..3 {
            h.advance(3000);
            h.expect_send();
        }
        h.advance(3000);
        assert_eq!(
            h.take(),
            vec![Action::Close, Action::Event(CloudEvent::Retry)]
        );
    }
}
