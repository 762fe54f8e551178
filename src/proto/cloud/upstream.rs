//! Upstream requests of local clients to the cloud and the daemon's own reports (P§5.7): cloud
//! ids, the id rewrite, acks and retransmissions, and -30011 when they cannot go up.

use log::{debug, warn};
use serde_json::Value;
use std::rc::Rc;

use super::*;

#[derive(Clone, Debug)]
pub(super) enum Origin {
    Client {
        client: ConnId,
        orig: u64,
    },
    /// A client's request whose client has gone: still retransmitted, its ack or error dropped.
    Gone,
    Info {
        refresh: bool,
    },
    IdleReport,
    /// The did/key request of a bootstrap session (P§5.11).
    Didkey,
}

#[derive(Clone, Debug)]
pub(super) struct Upstream {
    pub(super) cloud_id: u32,
    pub(super) origin: Origin,
    /// The text as sent (id rewritten), kept for retransmission.
    pub(super) text: String,
    pub(super) sends: u8,
}

impl Cloud {
    // ---- upstream (P§5.7) ------------------------------------------------------------------

    /// A request from a local client (`method` present, not `local.*`/`_internal.*`).
    pub fn upstream(
        &mut self,
        now: Instant,
        client: ConnId,
        mut text: String,
        head: &rpc::Head,
        out: &mut Outbox,
    ) {
        let method = head.method();
        if method.starts_with("local.") || method.starts_with("_internal.") {
            // P§5.7: these never reach the cloud, whoever routed them here.
            crate::warn_limited!(now, "{method} is not sent to the cloud");
            return;
        }
        let Some(idv) = head.id.as_ref() else {
            // Fire-and-forget: once, as is, untracked.
            if self.phase != Phase::Up {
                crate::info_limited!(now, "cloud down, notification dropped");
            } else if text.len() > self.cfg.max_cloud_payload {
                crate::warn_limited!(
                    now,
                    "msg too long, bigger than OT_MAX_PAYLOAD ({})",
                    self.cfg.max_cloud_payload
                );
            } else {
                self.send_json(now, &text, out);
            }
            return;
        };
        // P§3: ids are u32 (the local table refuses others first, L§4.1).
        let Some(orig) = rpc::id_u32(idv).map(u64::from) else {
            out.push(local_send(
                client,
                rpc::error_reply(Some(idv), -32600, "Invalid Request"),
            ));
            return;
        };
        if self.phase != Phase::Up {
            return self.tell_client(client, orig, -30011, "OT server disconnected", out);
        }
        if self.ups.len() >= MAX_UPSTREAM {
            return self.tell_client(client, orig, -30011, "OT queue full", out);
        }
        let id = self.alloc_id();
        // The client's text becomes the record: its id rewritten in place (json_stream leaves room).
        if !rpc::rewrite_id_in_place(&mut text, head, u64::from(id)) {
            out.push(local_send(
                client,
                rpc::error_reply(Some(idv), -32600, "Invalid Request"),
            ));
            return;
        }
        let new = text;
        if new.len() > self.cfg.max_cloud_payload {
            crate::warn_limited!(
                now,
                "msg too long, bigger than OT_MAX_PAYLOAD ({})",
                self.cfg.max_cloud_payload
            );
            return self.tell_client(client, orig, -32600, "msg too long", out);
        }
        debug!("U, orig_id:{orig}, id:{id}, client:{client}");
        self.send_up(now, id, Origin::Client { client, orig }, new, out);
    }

    /// The connection of `client` closed (P§5.7: "If that client has gone, the ack is dropped").
    /// Its pending requests stay, retransmitted as before, but their ack or error goes to no one:
    /// the reactor reuses the slot, and the next connection in it must not get them.
    pub fn client_gone(&mut self, client: ConnId) {
        for up in &mut self.ups {
            if matches!(up.origin, Origin::Client { client: c, .. } if c == client) {
                up.origin = Origin::Gone;
            }
        }
    }

    pub(super) fn tell_client(
        &mut self,
        client: ConnId,
        orig: u64,
        code: i64,
        msg: &str,
        out: &mut Outbox,
    ) {
        let text = rpc::error_reply(Some(&Value::from(orig)), code, msg);
        out.push(local_send(client, text));
    }

    pub(super) fn alloc_id(&mut self) -> u32 {
        loop {
            let id = self.next_id;
            self.next_id = if id >= MAX_CLOUD_ID { 1 } else { id + 1 };
            if !self.ups.iter().any(|u| u.cloud_id == id) {
                return id;
            }
        }
    }

    pub(super) fn send_up(
        &mut self,
        now: Instant,
        cloud_id: u32,
        origin: Origin,
        text: String,
        out: &mut Outbox,
    ) {
        self.send_json(now, &text, out);
        self.ups.push(Upstream {
            cloud_id,
            origin,
            text,
            sends: 1,
        });
        self.wheel
            .set(Timer::Ack(cloud_id), now + self.cfg.ack_timeout);
    }

    pub(super) fn ack_timeout(&mut self, now: Instant, id: u32, out: &mut Outbox) {
        let Some(i) = self.ups.iter().position(|u| u.cloud_id == id) else {
            return;
        };
        if self.link == Some(Transport::Udp) {
            if let Some(up) = self.ups.get_mut(i).filter(|u| u.sends <= RETRANSMITS) {
                // D5: same payload and id, fresh stamp and MD5.
                up.sends += 1;
                let text = up.text.clone();
                debug!("retransmit id:{id}");
                self.send_json(now, &text, out);
                self.wheel.set(Timer::Ack(id), now + self.cfg.ack_timeout);
                return;
            }
        }
        let up = self.ups.remove(i);
        match up.origin {
            Origin::Client { client, orig } => {
                crate::warn_limited!(now, "OT server noack, id:{id}");
                self.tell_client(client, orig, -30011, "OT server noack", out);
            }
            Origin::Gone => crate::warn_limited!(now, "OT server noack, id:{id} (client gone)"),
            Origin::Info { refresh: true } => warn!("refresh: _otc.info not acked"),
            Origin::Info { refresh: false } => self.fail(now, "_otc.info not acked", out),
            Origin::Didkey => self.fail(now, "did/key request not acked", out),
            Origin::IdleReport => {
                warn!("ota_state idle report not acked");
                self.idle_reported = true;
                self.announce();
            }
        }
    }

    pub(super) fn acked(
        &mut self,
        now: Instant,
        i: usize,
        text: &str,
        head: &rpc::Head,
        out: &mut Outbox,
    ) {
        let up = self.ups.remove(i);
        self.wheel.cancel(Timer::Ack(up.cloud_id));
        match up.origin {
            Origin::Client { client, orig } => {
                // D5: only the id changes back. Written in the reused buffer, so the one
                // allocation is the message handed to the client's write queue.
                let mut buf = std::mem::take(&mut self.scratch);
                if !rpc::rewrite_id_scanned_into(text, head, orig, &mut buf) {
                    buf.push_str(text);
                }
                out.push(Action::Local(LocalAction::Send(
                    client,
                    Rc::from(buf.as_str()),
                )));
                self.scratch = buf;
            }
            Origin::Gone => debug!("ack id:{} for a client that has gone: dropped", up.cloud_id),
            Origin::Info { refresh } => {
                // The one ack whose content matters: its tree, built only here.
                let obj = rpc::parse_object(text.as_bytes()).unwrap_or_default();
                self.info_reply(now, &obj, refresh, out);
            }
            Origin::IdleReport => {
                self.idle_reported = true;
                self.announce();
            }
            Origin::Didkey => {
                let obj = rpc::parse_object(text.as_bytes()).unwrap_or_default();
                self.didkey_reply(now, &obj, out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::cloud::testkit::Action;
    use crate::proto::cloud::testkit::*;
    use serde_json::json;

    // ---- upstream --------------------------------------------------------------------------

    #[test]
    fn upstream_acked_with_the_original_id() {
        let mut h = H::connected(cfg());
        let req = r#"{"id":7,"method":"props","params":{"a":1},"sid":"x"}"#;
        h.upstream(3, req);
        let (_, mut m) = h.expect_json();
        let cid = m.remove("id").unwrap();
        assert_ne!(cid, json!(7));
        let mut orig = obj(req);
        orig.remove("id");
        assert_eq!(m, orig);
        assert!(h.c.is_busy());
        h.deliver_json(&format!(r#"{{"id":{cid},"result":"ok","extra":1}}"#));
        assert_eq!(
            h.take(),
            vec![to_client(3, r#"{"id":7,"result":"ok","extra":1}"#)]
        );
        assert!(!h.c.is_busy());
        // A second ack with that id is the cloud acking nothing: swallowed.
        h.deliver_json(&format!(r#"{{"id":{cid},"result":"ok"}}"#));
        h.quiet();
        // No retransmission after the ack.
        h.advance(15_000);
        h.quiet();
    }

    #[test]
    fn two_clients_with_the_same_id_do_not_collide() {
        let mut h = H::connected(cfg());
        h.upstream(1, r#"{"id":1,"method":"a"}"#);
        h.upstream(2, r#"{"id":1,"method":"b"}"#);
        let (_, a) = h.expect_json();
        let (_, b) = h.expect_json();
        assert_ne!(a["id"], b["id"]);
        h.deliver_json(&format!(r#"{{"id":{},"result":"B"}}"#, b["id"]));
        h.deliver_json(&format!(r#"{{"id":{},"result":"A"}}"#, a["id"]));
        assert_eq!(
            h.take(),
            vec![
                to_client(2, r#"{"id":1,"result":"B"}"#),
                to_client(1, r#"{"id":1,"result":"A"}"#)
            ]
        );
    }

    /// Found by the month simulation (`proto::sim`): a tool that sends a report and exits at once,
    /// then a new connection in the same slot. The ack must not reach the newcomer, and the report
    /// is still retransmitted until the cloud acks it.
    #[test]
    fn ack_for_a_client_that_has_gone_is_dropped_not_given_to_its_slot() {
        let mut h = H::connected(cfg());
        h.upstream(4, r#"{"id":9,"method":"event.x","params":[]}"#);
        let (_, first) = h.expect_json();
        h.c.client_gone(4);
        h.advance(3000);
        let (_, again) = h.expect_json();
        assert_eq!(again, first, "still retransmitted");
        h.deliver_json(&format!(r#"{{"id":{},"result":"ok"}}"#, first["id"]));
        h.quiet();
        assert!(!h.c.is_busy());
        // Gone and never acked: the noack goes to no one either.
        h.upstream(4, r#"{"id":10,"method":"event.x","params":[]}"#);
        h.expect_json();
        h.c.client_gone(4);
        for _ in 0..3 {
            h.advance(3000);
            h.expect_json();
        }
        h.advance(3000);
        h.quiet();
        assert!(!h.c.is_busy());
    }

    #[test]
    fn upstream_retransmitted_three_times_then_noack_on_udp() {
        let mut h = H::connected(cfg());
        h.upstream(4, r#"{"id":9,"method":"event.x","params":[]}"#);
        let (s0, first) = h.expect_json();
        let mut last = s0;
        for _ in 0..3 {
            h.advance(3000);
            let (s, again) = h.expect_json();
            assert_eq!(again, first, "same payload, same cloud id");
            assert!(s > last, "fresh stamp");
            last = s;
            h.quiet();
        }
        h.advance(2999);
        h.quiet();
        h.advance(1);
        assert_eq!(
            h.take(),
            vec![to_client(
                4,
                r#"{"id":9,"error":{"code":-30011,"message":"OT server noack"}}"#
            )]
        );
        h.advance(60_000);
        assert!(h
            .take()
            .iter()
            .all(|a| matches!(a, Action::Send(b) if b.len() == 32)));
    }

    #[test]
    fn upstream_not_retransmitted_on_tcp() {
        let mut c = tcp_cfg();
        c.keepalive = Duration::from_secs(100);
        let mut h = H::connected(c);
        h.upstream(4, r#"{"id":9,"method":"event.x"}"#);
        h.expect_json();
        h.advance(2999);
        h.quiet();
        h.advance(1);
        assert_eq!(
            h.take(),
            vec![to_client(
                4,
                r#"{"id":9,"error":{"code":-30011,"message":"OT server noack"}}"#
            )]
        );
    }

    #[test]
    fn upstream_fails_at_once_on_link_loss_and_while_down() {
        let mut h = H::connected(cfg());
        h.upstream(1, r#"{"id":11,"method":"a"}"#);
        h.upstream(2, r#"{"id":12,"method":"b"}"#);
        h.take();
        h.c.handle_link_down(h.now, &mut h.o);
        let disc = |c, id| {
            to_client(
                c,
                &format!(
                    r#"{{"id":{id},"error":{{"code":-30011,"message":"OT server disconnected"}}}}"#
                ),
            )
        };
        assert_eq!(
            h.take(),
            vec![
                Action::Close,
                disc(1, 11),
                disc(2, 12),
                Action::Event(CloudEvent::Retry)
            ]
        );
        // While down (retry, then trying): at once.
        h.upstream(3, r#"{"id":13,"method":"c"}"#);
        assert_eq!(h.take(), vec![disc(3, 13)]);
        let t = h.c.poll_timeout().unwrap();
        h.advance(t.0 - h.now.0);
        h.take();
        h.upstream(3, r#"{"id":14,"method":"c"}"#);
        assert_eq!(h.take(), vec![disc(3, 14)]);
        // Fire-and-forget while down: dropped silently.
        h.upstream(3, r#"{"method":"c"}"#);
        h.quiet();
        // Also before the idle report is acked the session is up: requests go through.
    }

    #[test]
    fn local_and_internal_methods_never_go_up() {
        let mut h = H::connected(cfg());
        h.upstream(1, r#"{"id":1,"method":"local.query_status"}"#);
        h.upstream(1, r#"{"method":"_internal.info","params":{}}"#);
        h.quiet();
        // Nor LAN-only notifications from the cloud down.
        h.deliver_json(r#"{"method":"miIO.config","params":{"enauth":0}}"#);
        h.quiet();
    }

    #[test]
    fn upstream_queue_full_at_128() {
        let mut c = cfg();
        c.ack_timeout = Duration::from_secs(100);
        let mut h = H::connected(c);
        for i in 0..128 {
            h.upstream(1, &format!(r#"{{"id":{i},"method":"m"}}"#));
            h.expect_send();
        }
        h.upstream(1, r#"{"id":500,"method":"m"}"#);
        assert_eq!(
            h.take(),
            vec![to_client(
                1,
                r#"{"id":500,"error":{"code":-30011,"message":"OT queue full"}}"#
            )]
        );
    }

    #[test]
    fn upstream_too_long_and_invalid_ids() {
        let mut c = cfg();
        c.ack_timeout = Duration::from_secs(100);
        c.keepalive = Duration::from_secs(100);
        let mut h = H::connected(c);
        let long = format!(r#"{{"id":3,"method":"m","params":"{}"}}"#, "x".repeat(1024));
        h.upstream(1, &long);
        assert_eq!(
            h.take(),
            vec![to_client(
                1,
                r#"{"id":3,"error":{"code":-32600,"message":"msg too long"}}"#
            )]
        );
        // The limit counts the text after the rewrite: 1024 bytes pass, 1025 do not.
        let fit = |h: &mut H, n: usize| {
            let probe = format!(r#"{{"id":3,"method":"m","params":"{}"}}"#, "x".repeat(n));
            h.upstream(1, &probe);
            let a = h.take();
            match &a[..] {
                [Action::Send(b)] => Some(miio::decode(&h.keys, DID, b).unwrap().text.len()),
                _ => None,
            }
        };
        let mut sizes = Vec::new();
        for n in 980..1010 {
            if let Some(len) = fit(&mut h, n) {
                sizes.push(len);
            }
        }
        assert_eq!(sizes.iter().max(), Some(&1024));
        h.upstream(1, r#"{"id":"x","method":"m"}"#);
        assert_eq!(
            h.take(),
            vec![to_client(
                1,
                r#"{"id":"x","error":{"code":-32600,"message":"Invalid Request"}}"#
            )]
        );
        // A notification goes once, verbatim, untracked.
        h.upstream(1, r#"{"method":"n","params":[1]}"#);
        assert_eq!(h.expect_text(), r#"{"method":"n","params":[1]}"#);
        h.advance(3000);
        h.quiet();
    }

    #[test]
    fn cloud_ids_never_zero_and_skip_pending() {
        let mut c = Cloud::new(cfg());
        c.next_id = MAX_CLOUD_ID;
        assert_eq!(c.alloc_id(), MAX_CLOUD_ID);
        assert_eq!(c.alloc_id(), 1);
        c.ups.push(Upstream {
            cloud_id: 2,
            origin: Origin::IdleReport,
            text: String::new(),
            sends: 1,
        });
        assert_eq!(c.alloc_id(), 3);
    }
}
