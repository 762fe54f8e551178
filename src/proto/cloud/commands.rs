//! Cloud commands to local clients and the daemon (P§5.8): the method filters, the pending table
//! and its reply cache (`proto::downstream`), first reply wins, and the replies sent up.

use log::debug;
use serde_json::Value;

use super::*;

impl Cloud {
    // ---- downstream (P§5.8) ----------------------------------------------------------------

    pub(super) fn command(
        &mut self,
        now: Instant,
        method: &str,
        text: &str,
        head: &rpc::Head,
        out: &mut Outbox,
    ) {
        if method.starts_with("local.") || method.starts_with("_internal.") {
            return self.dropped(now, &format_args!("cloud method {method} dropped"));
        }
        let lan_only = downstream::lan_only(method);
        let own = downstream::self_answered(method) && !lan_only;
        // Params are read only for the methods the daemon answers itself: the tree, built then.
        let params = || {
            rpc::parse_object(text.as_bytes())
                .ok()
                .and_then(|mut o| o.get_mut("params").map(Value::take))
                .unwrap_or(Value::Null)
        };
        // Id 0 is never answered (P§5.8), so such a command is not tracked either.
        let Some(id) = head.id.as_ref().and_then(rpc::id_u32).filter(|&id| id != 0) else {
            if own {
                self.note(Event::SelfMethod {
                    id: None,
                    method: method.to_owned(),
                    params: params(),
                });
            } else if lan_only {
                debug!("LAN-only notification {method} from the cloud dropped");
            } else {
                self.note(Event::Command {
                    text: text.to_owned(),
                    id: None,
                });
            }
            return;
        };
        if self.downs.contains(|&d| d == id) {
            crate::info_limited!(now, "cloud msg repeated, id:{id}");
            return;
        }
        if let Some(reply) = self.downs.cached(now, &id).map(str::to_owned) {
            crate::info_limited!(now, "cloud msg repeated, id:{id}: answered from the cache");
            return self.send_json(now, &reply, out);
        }
        if lan_only {
            crate::warn_limited!(now, "LAN-only method {method} from the cloud refused");
            let reply = rpc::error_reply(Some(&id.into()), -32601, "Method not found");
            return self.reply_sent(now, id, reply, out);
        }
        if !self.downs.insert(id, now + self.cfg.user_ack_timeout) {
            crate::warn_limited!(now, "too many pending cloud commands, id:{id}");
            let reply = downstream::user_ack_timeout_reply(id);
            return self.reply_sent(now, id, reply, out);
        }
        if own {
            self.note(Event::SelfMethod {
                id: Some(id),
                method: method.to_owned(),
                params: params(),
            });
        } else {
            self.note(Event::Command {
                text: text.to_owned(),
                id: Some(id),
            });
        }
    }

    /// A reply from a local client (no `method`, integer `id`). Returns whether its id was a pending
    /// cloud command (else the node may try the LAN machine). The first reply wins (P§5.8).
    pub fn local_reply(
        &mut self,
        now: Instant,
        client: ConnId,
        text: &str,
        head: &rpc::Head,
        out: &mut Outbox,
    ) -> bool {
        let Some(id) = head.id.as_ref().and_then(rpc::id_u32) else {
            return false;
        };
        self.reply(now, Some(client), id, text, head.error_code, out)
    }

    /// The daemon's own answer to a `SelfMethod` (or a -9999 for a command that collides with a LAN id).
    pub fn self_reply(&mut self, now: Instant, id: u32, text: &str, out: &mut Outbox) -> bool {
        self.reply(now, None, id, text, None, out)
    }

    pub(super) fn reply(
        &mut self,
        now: Instant,
        client: Option<ConnId>,
        id: u32,
        text: &str,
        code: Option<i64>,
        out: &mut Outbox,
    ) -> bool {
        if id == 0 {
            return false;
        }
        let Some(i) = self.downs.position(|&d| d == id) else {
            return false;
        };
        if text.len() > self.cfg.max_cloud_payload {
            // P§2.7: not sent, does not count; the command stays pending.
            crate::warn_limited!(
                now,
                "msg too long, bigger than OT_MAX_PAYLOAD ({})",
                self.cfg.max_cloud_payload
            );
            if let Some(c) = client {
                self.tell_client(c, u64::from(id), -32600, "msg too long", out);
            }
            return true;
        }
        if downstream::is_fallback(code) {
            // D16: held as a fallback; any other reply replaces it.
            self.downs.hold(i, text.to_owned());
            return true;
        }
        self.downs.remove(i);
        self.reply_sent(now, id, text.to_owned(), out);
        true
    }

    /// Sends a reply to a cloud command and remembers it for repeats (P§5.8).
    pub(super) fn reply_sent(&mut self, now: Instant, id: u32, text: String, out: &mut Outbox) {
        self.send_json(now, &text, out);
        self.downs.cache_put(now, id, text);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::cloud::testkit::Action;
    use crate::proto::cloud::testkit::*;
    use serde_json::json;

    // ---- downstream ------------------------------------------------------------------------

    #[test]
    fn command_broadcast_verbatim_first_reply_wins() {
        let mut h = H::connected(cfg());
        h.deliver_json(CMD);
        assert_eq!(
            h.take(),
            vec![Action::Command {
                text: CMD.into(),
                id: Some(55)
            }]
        );
        // A repeat while pending is ignored.
        h.deliver_json(CMD);
        h.quiet();
        assert!(h.reply(1, r#"{"id":55,"result":["ok"]}"#));
        assert_eq!(h.expect_text(), r#"{"id":55,"result":["ok"]}"#);
        assert!(!h.reply(2, r#"{"id":55,"result":["late"]}"#));
        h.quiet();
        h.advance(10_000);
        assert!(h
            .take()
            .iter()
            .all(|a| !matches!(a, Action::Send(b) if b.len() > 32)));
        // The cloud's ack of our reply is swallowed.
        h.deliver_json(r#"{"id":55,"result":"ok"}"#);
        h.quiet();
    }

    #[test]
    fn command_times_out_to_9999() {
        let mut h = H::connected(cfg());
        h.deliver_json(CMD);
        h.take();
        h.advance(4999);
        h.quiet();
        h.advance(1);
        assert_eq!(
            h.expect_text(),
            r#"{"id":55,"error":{"code":-9999,"message":"user ack timeout"}}"#
        );
        assert!(!h.reply(1, r#"{"id":55,"result":["late"]}"#));
        h.quiet();
    }

    #[test]
    fn d16_held_error_replaced_by_a_real_reply() {
        let mut h = H::connected(cfg());
        h.deliver_json(CMD);
        h.take();
        let e = r#"{"id":55,"error":{"code":-10000,"message":"user undefined error"}}"#;
        assert!(h.reply(1, e));
        assert!(h.reply(
            3,
            r#"{"id":55,"error":{"code":-32601,"message":"Method not found"}}"#
        ));
        h.quiet();
        assert!(h.reply(2, r#"{"id":55,"result":["ok"]}"#));
        assert_eq!(h.expect_text(), r#"{"id":55,"result":["ok"]}"#);
        h.advance(5000);
        assert!(h
            .take()
            .iter()
            .all(|a| !matches!(a, Action::Send(b) if b.len() > 32)));
    }

    #[test]
    fn d16_held_error_sent_at_timeout_instead_of_9999() {
        let mut h = H::connected(cfg());
        h.deliver_json(CMD);
        h.take();
        let e = r#"{"id":55,"error":{"code":-10000,"message":"user undefined error"}}"#;
        assert!(h.reply(1, e));
        h.quiet();
        h.advance(5000);
        assert_eq!(h.expect_text(), e);
    }

    #[test]
    fn repeated_command_answered_from_the_cache() {
        let mut h = H::connected(cfg());
        h.deliver_json(CMD);
        h.take();
        h.reply(1, r#"{"id":55,"result":["ok"]}"#);
        h.expect_send();
        h.advance(30_000);
        h.take();
        h.deliver_json(CMD);
        assert_eq!(h.expect_text(), r#"{"id":55,"result":["ok"]}"#);
        h.quiet();
        // After 60 s the entry is gone: a new command.
        h.advance(31_000);
        h.take();
        h.deliver_json(CMD);
        assert_eq!(
            h.take(),
            vec![Action::Command {
                text: CMD.into(),
                id: Some(55)
            }]
        );
    }

    #[test]
    fn reply_cache_keeps_32() {
        let mut c = cfg();
        c.keepalive = Duration::from_secs(1000);
        let mut h = H::connected(c);
        for id in 1..=33 {
            h.deliver_json(&format!(r#"{{"id":{id},"method":"m"}}"#));
            h.take();
            h.reply(1, &format!(r#"{{"id":{id},"result":{id}}}"#));
            h.take();
        }
        h.deliver_json(r#"{"id":1,"method":"m"}"#);
        assert!(
            matches!(&h.take()[..], [Action::Command { .. }]),
            "1 was evicted"
        );
        h.deliver_json(r#"{"id":33,"method":"m"}"#);
        assert_eq!(h.expect_text(), r#"{"id":33,"result":33}"#);
    }

    #[test]
    fn id_zero_never_forwarded() {
        let mut h = H::connected(cfg());
        let cmd = r#"{"id":0,"method":"m"}"#;
        h.deliver_json(cmd);
        assert_eq!(
            h.take(),
            vec![Action::Command {
                text: cmd.into(),
                id: None
            }]
        );
        assert!(!h.reply(1, r#"{"id":0,"result":"ok"}"#));
        h.quiet();
        h.advance(10_000);
        assert!(h
            .take()
            .iter()
            .all(|a| !matches!(a, Action::Send(b) if b.len() > 32)));
        // Unknown ids neither.
        assert!(!h.reply(1, r#"{"id":77,"result":"ok"}"#));
        h.quiet();
    }

    #[test]
    fn oversize_reply_not_sent_and_does_not_count() {
        let mut h = H::connected(cfg());
        h.deliver_json(CMD);
        h.take();
        let big = format!(r#"{{"id":55,"result":"{}"}}"#, "x".repeat(1100));
        assert!(h.reply(1, &big));
        assert_eq!(
            h.take(),
            vec![to_client(
                1,
                r#"{"id":55,"error":{"code":-32600,"message":"msg too long"}}"#
            )]
        );
        assert!(h.reply(2, r#"{"id":55,"result":["small"]}"#));
        assert_eq!(h.expect_text(), r#"{"id":55,"result":["small"]}"#);
    }

    #[test]
    fn cloud_methods_filtered() {
        let mut h = H::connected(cfg());
        h.deliver_json(r#"{"id":60,"method":"local.query_status"}"#);
        h.deliver_json(r#"{"id":61,"method":"_internal.info"}"#);
        h.quiet();
        h.deliver_json(r#"{"id":62,"method":"miIO.config_router","params":{"ssid":"x"}}"#);
        assert_eq!(
            h.expect_text(),
            r#"{"id":62,"error":{"code":-32601,"message":"Method not found"}}"#
        );
        h.quiet();
        h.deliver_json(r#"{"id":63,"method":"miIO.info","params":[]}"#);
        assert_eq!(
            h.take(),
            vec![Action::SelfMethod {
                id: Some(63),
                method: "miIO.info".into(),
                params: json!([])
            }]
        );
        assert!(h.c.self_reply(
            h.now,
            63,
            r#"{"id":63,"code":0,"message":"ok","result":{}}"#,
            &mut h.o
        ));
        assert_eq!(
            h.expect_text(),
            r#"{"id":63,"code":0,"message":"ok","result":{}}"#
        );
        h.deliver_json(r#"{"id":64,"method":"miIO.config_tz","params":{"tz":"Asia/Shanghai"}}"#);
        assert!(matches!(
            &h.take()[..],
            [Action::SelfMethod { id: Some(64), .. }]
        ));
        h.advance(5000);
        assert_eq!(
            h.expect_text(),
            r#"{"id":64,"error":{"code":-9999,"message":"user ack timeout"}}"#
        );
        // A method that is not a string is dropped.
        h.deliver_json(r#"{"id":65,"method":5}"#);
        h.quiet();
    }

    #[test]
    fn at_most_64_pending_commands() {
        let mut c = cfg();
        c.user_ack_timeout = Duration::from_secs(100);
        c.keepalive = Duration::from_secs(1000);
        let mut h = H::connected(c);
        for id in 1..=64 {
            h.deliver_json(&format!(r#"{{"id":{id},"method":"m"}}"#));
            assert!(matches!(&h.take()[..], [Action::Command { .. }]));
        }
        h.deliver_json(r#"{"id":65,"method":"m"}"#);
        assert_eq!(
            h.expect_text(),
            r#"{"id":65,"error":{"code":-9999,"message":"user ack timeout"}}"#
        );
    }

    #[test]
    fn pending_commands_dropped_with_the_link() {
        let mut h = H::connected(cfg());
        h.deliver_json(CMD);
        h.take();
        h.c.handle_link_down(h.now, &mut h.o);
        h.take();
        assert!(!h.reply(1, r#"{"id":55,"result":"ok"}"#));
        h.quiet();
    }
}
