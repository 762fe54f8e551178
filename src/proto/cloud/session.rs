//! The session on an open cloud socket (P§5.3–§5.6, §5.10): hello and time sync, `_otc.info`
//! and its answer, the D12 idle report, keepalive and pings, the periodic refresh, and every
//! packet received (framing, drops, acks and commands handed on).

use std::net::{Ipv4Addr, SocketAddrV4};

use log::{debug, info, warn};
use serde_json::{Map, Value};

use super::*;

impl Cloud {
    // ---- hello, time sync, info ------------------------------------------------------------

    pub(super) fn hello_tick(&mut self, now: Instant, out: &mut Outbox) {
        if self.phase != Phase::Hello {
            return;
        }
        if self.hellos >= HELLO_TRIES {
            // P§5.3 D4: fails 5 s after the 3rd unanswered hello.
            self.fail(now, "no time-sync reply to 3 hellos", out);
            return;
        }
        self.hellos += 1;
        self.hello_out = true;
        debug!("cloud hello ({}/{HELLO_TRIES})", self.hellos);
        out.push(Action::CloudSend(miio::cloud_hello().to_vec()));
        self.wheel.set(Timer::Hello, now + HELLO_PERIOD);
    }

    pub(super) fn time_sync(&mut self, now: Instant, server: u32, out: &mut Outbox) {
        // P§5.3: only while our hello on this connection is unanswered, and never stamp 0 (our own hello).
        if !self.hello_out || server == 0 {
            debug!("time-sync reply ignored (stamp {server})");
            return;
        }
        if server > MAX_SERVER_STAMP {
            // P§5.5: keepalive stamps must keep increasing; from here they would stick at
            // 0xffffffff within a few minutes. Treated as no reply: the hello is tried again.
            crate::warn_limited!(
                now,
                "time-sync stamp {server:#x} is implausible (past 2097); ignored"
            );
            return;
        }
        self.hello_out = false;
        self.rx_since_ka = true;
        let local = secs(now);
        self.offset = i64::from(server) - local;
        info!(
            "sync time with server, server: {server}, local(mono): {local}, diff: {}",
            self.offset
        );
        match self.phase {
            Phase::Hello => {
                self.wheel.cancel(Timer::Hello);
                self.phase = Phase::Info;
                if self.cfg.didkey.is_some() {
                    // P§5.11: a bootstrap session asks for its identity; no `_otc.info`.
                    self.didkey_request(now, out);
                } else {
                    self.wheel.set(Timer::Info, now + INFO_WAIT);
                    self.want_info(true);
                }
            }
            Phase::Up if self.wheel.cancel(Timer::RefreshHello) => self.want_info(false),
            _ => {}
        }
    }

    pub(super) fn want_info(&mut self, session: bool) {
        self.info_for = Some(session);
        self.note(Event::NeedInfo);
    }

    /// The answer to `NeedInfo`: the members of the helper's `_internal.info` (its `params` plus
    /// top-level extras), or the daemon's own `{"params":{..}}`. Sent as `_otc.info` (P§5.4), the
    /// members in the order they came.
    pub fn handle_info(&mut self, now: Instant, info: &Members, out: &mut Outbox) {
        let session = match self.info_for {
            Some(true) if self.phase == Phase::Info => true,
            Some(false) if self.phase == Phase::Up => false,
            _ => return,
        };
        self.info_for = None;
        self.wheel.cancel(Timer::Info);
        let params = info
            .get("params")
            .and_then(|p| Members::of_object(p.as_bytes()))
            .unwrap_or_default();
        let mut params = self.info_params(now, &params);
        if let Some((uid, bindkey)) = &self.bind {
            params.set_str("uid", uid);
            if let Some(k) = bindkey {
                params.set_str("bindkey", k);
            }
        }
        let id = self.alloc_id();
        let mut msg = Members::new();
        msg.set("id", id.to_string());
        msg.set_str("method", "_otc.info");
        msg.set("params", params.to_json());
        for (k, v) in info.iter() {
            if !matches!(k, "id" | "method" | "params") {
                msg.set(k, v.to_owned());
            }
        }
        let text = msg.to_json();
        if text.len() > self.cfg.max_cloud_payload {
            warn!("_otc.info too long ({} bytes), not sent", text.len());
            if session {
                self.fail(now, "_otc.info too long", out);
            }
            return;
        }
        // The text holds the token: its content stays out of the log.
        info!("send _otc.info, id:{id}");
        self.send_up(now, id, Origin::Info { refresh: !session }, text, out);
    }

    pub(super) fn info_reply(
        &mut self,
        now: Instant,
        obj: &Map<String, Value>,
        refresh: bool,
        out: &mut Outbox,
    ) {
        match obj.get("result") {
            Some(Value::Object(r)) => {
                self.apply_otc(r);
                if !refresh && self.phase == Phase::Info {
                    self.session_up(now, out);
                }
            }
            _ if refresh => warn!("refresh: _otc.info not accepted"),
            _ => self.fail(now, "_otc.info refused", out),
        }
    }

    /// `otc_list` and `otc_test.interval` of an `_otc.info` reply (P§5.4).
    pub(super) fn apply_otc(&mut self, r: &Map<String, Value>) {
        if let Some(Value::Array(entries)) = r.get("otc_list") {
            let mut list: Vec<SocketAddrV4> = Vec::new();
            for e in entries {
                let ip = e.get("ip").and_then(Value::as_str);
                let ip = ip.and_then(|s| s.parse::<Ipv4Addr>().ok());
                let port = e.get("port").and_then(Value::as_u64);
                let port = port.and_then(|p| u16::try_from(p).ok()).filter(|&p| p != 0);
                if let (Some(ip), Some(port)) = (ip, port) {
                    let a = SocketAddrV4::new(ip, port);
                    if !ip.is_unspecified() && !list.contains(&a) && list.len() < MAX_OTC_LIST {
                        list.push(a);
                    }
                }
            }
            debug!("otc_list: {} entries", list.len());
            self.otc_list = list;
        }
        let iv = r.get("otc_test").and_then(|t| t.get("interval"));
        if let Some(s) = iv.and_then(Value::as_u64).filter(|&s| s > 0) {
            self.cloud_interval = Duration::from_secs(s).max(MIN_CLOUD_REFRESH);
        }
    }

    pub(super) fn refresh_period(&self) -> Duration {
        self.cfg
            .refresh
            .unwrap_or(self.cloud_interval)
            .max(Duration::from_secs(1))
    }

    /// P§5.3 step 6.
    pub(super) fn session_up(&mut self, now: Instant, out: &mut Outbox) {
        self.phase = Phase::Up;
        self.failures = 0;
        self.misses = 0;
        self.ka_sent = false;
        self.rx_since_ka = false;
        info!("cloud connected");
        self.wheel.set(Timer::Keepalive, now + self.cfg.keepalive);
        self.wheel.set(Timer::Refresh, now + self.refresh_period());
        if self.idle_reported {
            self.announce();
        } else {
            // D12: the first session after start reports OTA idle, and only then is announced.
            let id = self.alloc_id();
            let text = format!(r#"{{"id":{id},"method":"props","params":{{"ota_state":"idle"}}}}"#);
            self.send_up(now, id, Origin::IdleReport, text, out);
        }
    }

    pub(super) fn announce(&mut self) {
        if self.phase == Phase::Up && !self.announced {
            self.announced = true;
            self.note(Event::State(CloudEvent::Connected));
        }
    }

    pub(super) fn refresh_tick(&mut self, now: Instant, out: &mut Outbox) {
        if self.phase != Phase::Up {
            return;
        }
        self.wheel.set(Timer::Refresh, now + self.refresh_period());
        let busy = self.info_for.is_some()
            || self.wheel.is_armed(Timer::RefreshHello)
            || self
                .ups
                .iter()
                .any(|u| matches!(u.origin, Origin::Info { .. }));
        if busy {
            return;
        }
        debug!("refresh: cloud hello");
        self.hello_out = true;
        out.push(Action::CloudSend(miio::cloud_hello().to_vec()));
        self.wheel
            .set(Timer::RefreshHello, now + REFRESH_HELLO_WAIT);
    }

    // ---- keepalive -------------------------------------------------------------------------

    pub(super) fn keepalive_tick(&mut self, now: Instant, out: &mut Outbox) {
        if self.phase != Phase::Up {
            return;
        }
        // P§5.6: a miss is a tick with nothing valid since the previous keepalive.
        if self.ka_sent && !self.rx_since_ka {
            self.misses += 1;
            info!("server_noack: {}", self.misses);
        } else {
            self.misses = 0;
        }
        if self.misses >= KEEPALIVE_MISSES {
            self.fail(now, "3 keepalives unanswered", out);
            return;
        }
        let stamp = self.stamp(now).max(self.last_tx.saturating_add(1));
        self.last_tx = stamp;
        self.sent_stamps[self.sent_idx % SENT_STAMPS] = stamp;
        self.sent_idx = self.sent_idx.wrapping_add(1);
        out.push(Action::CloudSend(
            miio::keepalive(&self.keys, self.cfg.did, stamp).to_vec(),
        ));
        self.ka_sent = true;
        self.rx_since_ka = false;
        self.wheel.set(Timer::Keepalive, now + self.cfg.keepalive);
    }

    // ---- receiving -------------------------------------------------------------------------

    pub(super) fn receiving(&self, t: Transport) -> bool {
        self.link == Some(t) && matches!(self.phase, Phase::Hello | Phase::Info | Phase::Up)
    }

    /// One UDP datagram from the cloud socket.
    pub fn handle_datagram(&mut self, now: Instant, data: &[u8], out: &mut Outbox) {
        if self.receiving(Transport::Udp) {
            self.on_packet(now, data, out);
        }
    }

    /// Bytes read from the TCP cloud socket, in any chunking (P§5.2).
    pub fn handle_stream(&mut self, now: Instant, data: &[u8], out: &mut Outbox) {
        if !self.receiving(Transport::Tcp) {
            return;
        }
        let gen = self.generation;
        self.rx_buf.extend_from_slice(data);
        loop {
            match miio::stream_frame_len(&self.rx_buf) {
                Err(e) => {
                    warn!("{e}");
                    self.fail(now, "stream protocol error", out);
                    return;
                }
                Ok(Some(n)) if n <= self.rx_buf.len() => {
                    let pkt: Vec<u8> = self.rx_buf.drain(..n).collect();
                    self.on_packet(now, &pkt, out);
                    if self.generation != gen || !self.receiving(Transport::Tcp) {
                        return;
                    }
                }
                Ok(_) => break,
            }
        }
        // Only a partial frame (< 64 KiB) is left: the buffer stays bounded.
        if self.rx_buf.is_empty() {
            self.rx_buf = Vec::new();
        }
    }

    /// P§2.7, at the first failure drop with one rate-limited log line.
    pub(super) fn on_packet(&mut self, now: Instant, data: &[u8], out: &mut Outbox) {
        let pkt = match Packet::new_checked(data) {
            Ok(p) => p,
            Err(e) => return self.dropped(now, &e),
        };
        if pkt.is_control() {
            if pkt.ids_all_ff() {
                self.time_sync(now, pkt.stamp(), out);
            } else {
                self.control(now, &pkt, data, out);
            }
            return;
        }
        // The plaintext in the machine's reused buffer, taken out while the message is handled.
        let mut plain = std::mem::take(&mut self.rx_plain);
        match miio::open_scanned_in(&self.keys, self.cfg.did, &pkt, &mut plain) {
            Ok((text, head)) => {
                self.rx_since_ka = true;
                self.last_rx = Some(self.last_rx.map_or(pkt.stamp(), |l| l.max(pkt.stamp())));
                self.on_message(now, text, &head, out);
            }
            Err(e) => self.dropped(now, &e),
        }
        self.rx_plain = plain;
    }

    /// A pong, or a cloud-initiated ping (P§5.6).
    pub(super) fn control(
        &mut self,
        now: Instant,
        pkt: &Packet<&[u8]>,
        raw: &[u8],
        out: &mut Outbox,
    ) {
        if pkt.did() != self.cfg.did {
            return self.dropped(now, &miio::Error::DidMismatch { got: pkt.did() });
        }
        let sum = pkt.checksum();
        let md5_ok = miio::control_md5_ok(&self.keys, pkt);
        let filler = sum == [0; 16] || sum == [0xff; 16];
        let stamp = pkt.stamp();
        let ours = self.sent_stamps.contains(&stamp) && stamp != 0;
        if md5_ok && !ours && self.last_rx.is_none_or(|l| stamp > l) {
            debug!("ping from the cloud, stamp {stamp}: echoed");
            self.last_rx = Some(stamp);
            self.rx_since_ka = true;
            out.push(Action::CloudSend(raw.to_vec()));
        } else if md5_ok || filler {
            self.rx_since_ka = true;
        } else {
            self.dropped(now, &miio::Error::Md5Mismatch);
        }
    }

    pub(super) fn dropped(&mut self, now: Instant, why: &dyn fmt::Display) {
        // P§2.7, rate limited for the whole process (`crate::ratelimit`).
        crate::warn_limited!(now, "{why}");
    }

    /// An authenticated JSON object from the cloud, as scanned (no tree: an ack needs none).
    pub(super) fn on_message(
        &mut self,
        now: Instant,
        text: &str,
        head: &rpc::Head,
        out: &mut Outbox,
    ) {
        match &head.method {
            None => {
                let id = head.id.as_ref().and_then(rpc::id_u32);
                match id.and_then(|id| self.ups.iter().position(|u| u.cloud_id == id)) {
                    Some(i) => self.acked(now, i, text, head, out),
                    // P§5.8: the cloud's ack of one of our replies.
                    // -1: no id, or none a cloud id can be.
                    None => debug!("cloud ack swallowed: id {}", id.map_or(-1, i64::from)),
                }
            }
            // P§5.11: a bootstrap identity takes no commands.
            Some(Some(m)) if self.cfg.didkey.is_some() => self.dropped(
                now,
                &format_args!("cloud method {} dropped: no identity yet", m.as_str()),
            ),
            Some(Some(m)) => self.command(now, m, text, head, out),
            Some(None) => self.dropped(now, &"cloud message with a non-string method"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::cloud::testkit::Action;
    use crate::proto::cloud::testkit::*;
    use proptest::prelude::*;
    use serde_json::json;

    // ---- session start ---------------------------------------------------------------------

    #[test]
    fn session_start_sends_exact_hello_and_full_otc_info() {
        let mut h = H::new(cfg());
        h.c.start(h.now, &mut h.o);
        h.expect_event(CloudEvent::Trying);
        assert_eq!(
            h.next(),
            Action::Resolve {
                transport: Transport::Udp,
                host: "ot.io.mi.com".into(),
                port: 8053,
                attempt: 1,
            }
        );
        assert!(h.c.is_busy());
        h.resolved(Ok(vec![SERVER]));
        assert_eq!(
            h.next(),
            Action::Connect {
                transport: Transport::Udp,
                addr: SocketAddrV4::new(SERVER, 8053)
            }
        );
        h.c.handle_connected(h.now, LOCAL, &mut h.o);
        h.expect_event(CloudEvent::InternetConnected);
        // V7, byte for byte.
        let v7 = "21310020ffffffffffffffff0000000000000000000000000000000000000000";
        let hex: String = h.expect_send().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, v7);
        h.deliver(&miio::time_sync_reply(T0));
        assert_eq!(h.c.offset(), i64::from(T0) - 1000);
        assert_eq!(h.c.stamp(h.now), T0);
        assert_eq!(h.next(), Action::NeedInfo);
        let text = r#"{"method":"_internal.info","partner_id":"","params":{"hw_ver":"Linux","fw_ver":"1.0","ap":{"ssid":"s","bssid":"b"},"netif":{"localIp":"10.0.0.2","mask":"255.255.255.0","gw":"10.0.0.1"},"model":"old"}}"#;
        h.c.handle_info(h.now, &info(text), &mut h.o);
        let (stamp, m) = h.expect_json();
        assert_eq!(stamp, T0);
        assert_eq!(m["method"], "_otc.info");
        assert_eq!(m["partner_id"], "");
        let p = &m["params"];
        assert_eq!(p["hw_ver"], "Linux");
        assert_eq!(p["netif"]["gw"], "10.0.0.1");
        assert_eq!(p["model"], "vendor.camera.v1");
        assert_eq!(p["mac"], "AA:BB:CC:01:02:03");
        assert_eq!(p["token"], "4142434445464748494a4b4c4d4e4f50");
        assert_eq!(p["life"], 1000);
        assert!(p.get("uid").is_none());
        assert_eq!(h.c.state(), CloudState::Trying);
        h.deliver_json(&json!({"id": m["id"], "result": {"otc_list": []}}).to_string());
        let (_, props) = h.expect_json();
        assert_eq!(props["method"], "props");
        assert_ne!(props["id"], m["id"]);
    }

    #[test]
    fn otc_info_carries_uid_and_bindkey_after_provisioning() {
        let mut h = H::new(cfg());
        h.c.set_bind("12345".into(), Some("bk".into()));
        h.c.start(h.now, &mut h.o);
        h.take();
        h.resolved(Ok(vec![SERVER]));
        h.c.handle_connected(h.now, LOCAL, &mut h.o);
        h.take();
        h.deliver(&miio::time_sync_reply(T0));
        h.take();
        h.c.handle_info(h.now, &info(r#"{"params":{}}"#), &mut h.o);
        let (_, m) = h.expect_json();
        assert_eq!(m["params"]["uid"], "12345");
        assert_eq!(m["params"]["bindkey"], "bk");
    }

    /// P§5.4: INFO keeps the helper's order (nested objects too), `model`/`mac`/`token`/`life`
    /// replace members in place or follow, then `uid` and `bindkey`; extras follow `params`.
    #[test]
    fn otc_info_keeps_the_member_order() {
        let mut h = H::new(cfg());
        h.c.set_bind("12345".into(), Some("bk".into()));
        h.c.start(h.now, &mut h.o);
        h.take();
        h.resolved(Ok(vec![SERVER]));
        h.c.handle_connected(h.now, LOCAL, &mut h.o);
        h.take();
        h.deliver(&miio::time_sync_reply(T0));
        h.take();
        let text = r#"{"zz":1, "method":"_internal.info","params":{"z":"1","mac":"x","ap":{"ssid":"s","bssid":"b","rssi":-46}, "b": [1, {"y":2,"x":1}]},"partner_id":"","id":9}"#;
        h.c.handle_info(h.now, &info(text), &mut h.o);
        let id = h.c.next_id - 1;
        assert_eq!(
            h.expect_text(),
            format!(
                r#"{{"id":{id},"method":"_otc.info","params":{{"z":"1","mac":"AA:BB:CC:01:02:03","ap":{{"ssid":"s","bssid":"b","rssi":-46}},"b":[1,{{"y":2,"x":1}}],"model":"vendor.camera.v1","token":"4142434445464748494a4b4c4d4e4f50","life":1000,"uid":"12345","bindkey":"bk"}},"zz":1,"partner_id":""}}"#
            )
        );
    }

    #[test]
    fn otc_info_error_fails_the_attempt() {
        let mut h = H::new(cfg());
        h.c.start(h.now, &mut h.o);
        h.take();
        h.resolved(Ok(vec![SERVER]));
        h.c.handle_connected(h.now, LOCAL, &mut h.o);
        h.deliver(&miio::time_sync_reply(T0));
        h.take();
        h.c.handle_info(h.now, &info(r#"{"params":{}}"#), &mut h.o);
        let (_, m) = h.expect_json();
        h.deliver_json(&json!({"id": m["id"], "error": {"code": -1, "message": "no"}}).to_string());
        assert_eq!(
            h.take(),
            vec![Action::Close, Action::Event(CloudEvent::Retry)]
        );
        assert_eq!(h.c.state(), CloudState::Retry);
    }

    #[test]
    fn otc_info_noack_fails_after_retransmits() {
        let mut h = H::new(cfg());
        h.c.start(h.now, &mut h.o);
        h.take();
        h.resolved(Ok(vec![SERVER]));
        h.c.handle_connected(h.now, LOCAL, &mut h.o);
        h.deliver(&miio::time_sync_reply(T0));
        h.take();
        h.c.handle_info(h.now, &info(r#"{"params":{}}"#), &mut h.o);
        let (_, first) = h.expect_json();
        for _ in 0..3 {
            h.advance(3000);
            assert_eq!(h.expect_json().1, first);
        }
        h.advance(2999);
        h.quiet();
        h.advance(1);
        assert_eq!(
            h.take(),
            vec![Action::Close, Action::Event(CloudEvent::Retry)]
        );
    }

    #[test]
    fn a_lost_info_answer_fails_the_attempt_after_the_guard() {
        let mut h = H::new(cfg());
        h.c.start(h.now, &mut h.o);
        h.take();
        h.resolved(Ok(vec![SERVER]));
        h.c.handle_connected(h.now, LOCAL, &mut h.o);
        h.deliver(&miio::time_sync_reply(T0));
        assert_eq!(h.take().last(), Some(&Action::NeedInfo));
        assert!(h.c.is_busy());
        h.advance(29_999);
        h.quiet();
        h.advance(1);
        assert_eq!(
            h.take(),
            vec![Action::Close, Action::Event(CloudEvent::Retry)]
        );
        // A late answer is ignored.
        h.c.handle_info(h.now, &info(r#"{"params":{}}"#), &mut h.o);
        h.quiet();
    }

    #[test]
    fn hello_misses_fail_five_seconds_after_the_third() {
        let mut h = H::new(cfg());
        h.c.start(h.now, &mut h.o);
        h.take();
        h.resolved(Ok(vec![SERVER]));
        h.c.handle_connected(h.now, LOCAL, &mut h.o);
        let t0 = h.now;
        let a = h.take();
        assert_eq!(a.len(), 3, "{a:?}");
        for _ in 0..2 {
            h.advance(5000);
            assert_eq!(h.take(), vec![Action::Send(miio::cloud_hello().to_vec())]);
        }
        h.advance(4999);
        h.quiet();
        h.advance(1);
        assert_eq!(h.now, Instant(t0.0 + 15_000));
        assert_eq!(
            h.take(),
            vec![Action::Close, Action::Event(CloudEvent::Retry)]
        );
        assert!(!h.c.is_busy());
    }

    #[test]
    fn time_sync_only_while_a_hello_is_outstanding() {
        let mut h = H::new(cfg());
        h.c.start(h.now, &mut h.o);
        h.take();
        // Not connected: nothing is read at all.
        h.deliver(&miio::time_sync_reply(T0));
        h.quiet();
        h.resolved(Ok(vec![SERVER]));
        h.c.handle_connected(h.now, LOCAL, &mut h.o);
        h.take();
        // V7 echoed back (stamp 0) is not a time sync.
        h.deliver(&miio::cloud_hello());
        h.quiet();
        assert_eq!(h.c.offset(), 0);
        h.deliver(&miio::time_sync_reply(T0));
        assert_eq!(h.take(), vec![Action::NeedInfo]);
        assert_eq!(h.c.offset(), i64::from(T0) - 1000);
        // The hello is answered: a second reply changes nothing.
        h.deliver(&miio::time_sync_reply(T0 + 500));
        h.quiet();
        assert_eq!(h.c.offset(), i64::from(T0) - 1000);

        // Nor while connected without a refresh hello (V8 unsolicited).
        let mut h = H::connected(cfg());
        h.deliver(&miio::time_sync_reply(T0 + 999));
        h.quiet();
        assert_eq!(h.c.offset(), i64::from(T0) - 1000);
    }

    #[test]
    fn a_time_sync_past_2097_is_refused() {
        let mut h = H::new(cfg());
        h.c.start(h.now, &mut h.o);
        h.take();
        h.resolved(Ok(vec![SERVER]));
        h.c.handle_connected(h.now, LOCAL, &mut h.o);
        assert!(h
            .take()
            .contains(&Action::Send(miio::cloud_hello().to_vec())));
        // 0xfffffff0 would make every keepalive 0xffffffff after 15 s: not taken, no NeedInfo.
        h.deliver(&miio::time_sync_reply(0xffff_fff0));
        h.quiet();
        assert_eq!(h.c.offset(), 0);
        h.deliver(&miio::time_sync_reply(MAX_SERVER_STAMP + 1));
        h.quiet();
        // The hello is still unanswered: the next plausible reply is the time sync.
        h.deliver(&miio::time_sync_reply(MAX_SERVER_STAMP));
        assert_eq!(h.take(), vec![Action::NeedInfo]);
        assert_eq!(h.c.offset(), i64::from(MAX_SERVER_STAMP) - 1000);
    }

    #[test]
    fn a_refused_time_sync_is_no_answer_to_the_hello() {
        let mut h = H::new(cfg());
        h.c.start(h.now, &mut h.o);
        h.take();
        h.resolved(Ok(vec![SERVER]));
        h.c.handle_connected(h.now, LOCAL, &mut h.o);
        h.take();
        // A cloud that only ever answers 0xfffffff0: the hellos run out and the attempt fails, as
        // with no answer at all, instead of a session whose stamps are stuck at 0xffffffff.
        for _ in 0..60 {
            h.deliver(&miio::time_sync_reply(0xffff_fff0));
            h.advance(500);
        }
        let a = h.take();
        assert!(
            a.contains(&Action::Event(CloudEvent::Retry)),
            "the attempt did not fail: {a:?}"
        );
        assert!(!a.contains(&Action::NeedInfo), "{a:?}");
    }

    #[test]
    fn a_resolver_that_never_answers_fails_the_attempt_after_10_s() {
        let mut h = H::new(cfg());
        h.c.start(h.now, &mut h.o);
        h.expect_event(CloudEvent::Trying);
        let Action::Resolve { attempt: first, .. } = h.next() else {
            panic!("expected Resolve");
        };
        // The resolver thread could not start: no answer ever comes. The machine has a deadline,
        // so a suspend gets a wakeup time and the link does not stay in Resolving forever.
        assert_eq!(h.c.poll_timeout(), Some(h.now + DNS_TIMEOUT));
        h.advance(DNS_TIMEOUT.millis() - 1);
        h.quiet();
        h.advance(1);
        let a = h.take();
        assert!(
            a.contains(&Action::Event(CloudEvent::InternetFailed))
                && a.contains(&Action::Event(CloudEvent::Retry)),
            "{a:?}"
        );
        assert_eq!(h.c.state(), CloudState::Retry);
        // The next attempt resolves again, with a new tag.
        let t = h.c.poll_timeout().expect("a backoff deadline");
        h.advance(t.0 - h.now.0);
        h.expect_event(CloudEvent::Trying);
        let Action::Resolve {
            attempt: second, ..
        } = h.next()
        else {
            panic!("expected Resolve");
        };
        assert_ne!(first, second);
        // The first attempt's answer arrives late: ignored, still resolving.
        h.c.handle_resolved(h.now, first, Ok(vec![SERVER]), &mut h.o);
        h.quiet();
        // The current one is taken.
        h.c.handle_resolved(h.now, second, Ok(vec![SERVER]), &mut h.o);
        assert!(matches!(h.next(), Action::Connect { .. }));
    }

    #[test]
    fn idle_report_only_on_the_first_connect() {
        let mut h = H::new(cfg());
        assert!(h.up(), "first connect reports idle");
        h.c.handle_link_down(h.now, &mut h.o);
        assert_eq!(
            h.take(),
            vec![Action::Close, Action::Event(CloudEvent::Retry)]
        );
        let t = h.c.poll_timeout().unwrap();
        h.advance(t.0 - h.now.0);
        h.expect_event(CloudEvent::Trying);
        assert!(!h.finish_attempt(), "no idle report on a reconnect");
        assert_eq!(h.c.state(), CloudState::Connected);
    }

    #[test]
    fn idle_report_retried_when_the_link_dropped_before_its_ack() {
        let mut h = H::new(cfg());
        h.c.start(h.now, &mut h.o);
        h.take();
        h.resolved(Ok(vec![SERVER]));
        h.c.handle_connected(h.now, LOCAL, &mut h.o);
        h.deliver(&miio::time_sync_reply(T0));
        h.take();
        h.c.handle_info(h.now, &info(r#"{"params":{}}"#), &mut h.o);
        let (_, m) = h.expect_json();
        h.deliver_json(&json!({"id": m["id"], "result": {}}).to_string());
        let (_, props) = h.expect_json();
        assert_eq!(props["method"], "props");
        h.c.handle_link_down(h.now, &mut h.o);
        assert_eq!(
            h.take(),
            vec![Action::Close, Action::Event(CloudEvent::Retry)]
        );
        let t = h.c.poll_timeout().unwrap();
        h.advance(t.0 - h.now.0);
        h.expect_event(CloudEvent::Trying);
        assert!(h.finish_attempt());
    }

    // ---- keepalive and stamps --------------------------------------------------------------

    #[test]
    fn an_hour_connected() {
        let mut h = H::connected(cfg());
        let end = Instant(h.now.0 + 3_600_000);
        let (mut kas, mut refreshes) = (0, 0);
        let mut ka_stamps: Vec<u32> = Vec::new();
        let mut all_stamps: Vec<u32> = Vec::new();
        while let Some(t) = h.c.poll_timeout().filter(|&t| t <= end) {
            h.now = t;
            h.c.handle_timeout(t, &mut h.o);
            while let Some(a) = crate::fuzzing::cloud_out(&mut h.o, &mut h.c) {
                match a {
                    Action::Send(b) if b[..] == miio::cloud_hello()[..] => {
                        refreshes += 1;
                        // The refresh moves the clock back by 7 s: stamps must not follow.
                        let back = h.c.stamp(h.now) - 7;
                        h.c.handle_datagram(h.now, &miio::time_sync_reply(back), &mut h.o);
                    }
                    Action::Send(b) => {
                        let p = Packet::new_checked(&b[..]).unwrap();
                        all_stamps.push(p.stamp());
                        if p.is_control() {
                            kas += 1;
                            ka_stamps.push(p.stamp());
                            assert_eq!(b[..], miio::keepalive(&h.keys, DID, p.stamp())[..]);
                            h.c.handle_datagram(h.now, &b, &mut h.o); // the pong
                        } else {
                            let m = miio::decode(&h.keys, DID, &b).unwrap().value;
                            assert_eq!(m["method"], "_otc.info");
                            let ack = json!({"id": m["id"], "result": {"otc_list": []}});
                            let p = h.msg(&ack.to_string());
                            h.c.handle_datagram(h.now, &p, &mut h.o);
                        }
                    }
                    Action::NeedInfo => h.c.handle_info(h.now, &info(r#"{"params":{}}"#), &mut h.o),
                    a => panic!("unexpected {a:?}"),
                }
            }
        }
        assert_eq!(kas, 180);
        assert_eq!(refreshes, 2);
        assert!(ka_stamps.windows(2).all(|w| w[0] < w[1]), "{ka_stamps:?}");
        assert!(
            all_stamps.windows(2).all(|w| w[0] <= w[1]),
            "{all_stamps:?}"
        );
        assert_eq!(h.c.state(), CloudState::Connected);
        assert!(!h.c.is_busy());
    }

    #[test]
    fn three_keepalive_misses_lose_the_link_three_intervals_after_the_first() {
        let mut h = H::connected(cfg());
        let up = h.now;
        for _ in 0..2 {
            h.advance(20_000);
            let ka = h.expect_send();
            h.quiet();
            h.deliver(&ka);
            h.quiet();
        }
        h.advance(20_000);
        let first_unanswered = h.now;
        assert_eq!(first_unanswered, Instant(up.0 + 60_000));
        h.expect_send();
        h.advance(59_999);
        let a = h.take();
        assert_eq!(a.len(), 2, "two more keepalives, no failure: {a:?}");
        assert!(a
            .iter()
            .all(|a| matches!(a, Action::Send(b) if b.len() == 32)));
        h.advance(1);
        assert_eq!(h.now, Instant(first_unanswered.0 + 60_000));
        assert_eq!(
            h.take(),
            vec![Action::Close, Action::Event(CloudEvent::Retry)]
        );
    }

    #[test]
    fn any_valid_packet_resets_the_misses() {
        let mut h = H::connected(cfg());
        for _ in 0..10 {
            h.advance(20_000);
            h.expect_send();
            // No pong, but a cloud ack of some earlier reply: valid, so no miss.
            h.deliver_json(r#"{"id":999,"result":"ok"}"#);
            h.quiet();
        }
        assert_eq!(h.c.state(), CloudState::Connected);
    }

    #[test]
    fn filler_pong_accepted_and_cloud_ping_echoed_once() {
        let mut h = H::connected(cfg());
        h.advance(20_000);
        let ka = h.expect_send();
        // A filler pong (all ff checksum) counts as an answer and is never echoed.
        let mut filler = ka.clone();
        filler[16..].fill(0xff);
        h.deliver(&filler);
        h.quiet();
        // The real pong (our own stamp, valid MD5): not echoed.
        h.deliver(&ka);
        h.quiet();
        // A ping: valid MD5, a stamp we did not send, above what the cloud sent before.
        let ping = miio::keepalive(&h.keys, DID, h.c.stamp(h.now) + 100);
        h.deliver(&ping);
        assert_eq!(h.take(), vec![Action::Send(ping.to_vec())]);
        h.deliver(&ping);
        h.quiet();
        // A bad checksum that is not filler is dropped.
        let mut bad = ka.clone();
        bad[20] ^= 1;
        h.deliver(&bad);
        h.quiet();
        // Wrong did.
        h.deliver(&miio::keepalive(&h.keys, DID + 1, h.c.stamp(h.now) + 200));
        h.quiet();
        for _ in 0..5 {
            h.advance(20_000);
            let ka = h.expect_send();
            h.deliver(&ka);
        }
        assert_eq!(h.c.state(), CloudState::Connected);
    }

    #[test]
    fn refresh_sends_hello_then_info_after_five_seconds() {
        let mut c = cfg();
        c.refresh = Some(Duration::from_secs(100));
        c.keepalive = Duration::from_secs(1000);
        let mut h = H::connected(c);
        h.advance(100_000);
        assert_eq!(h.take(), vec![Action::Send(miio::cloud_hello().to_vec())]);
        h.advance(4999);
        h.quiet();
        h.advance(1);
        assert_eq!(h.take(), vec![Action::NeedInfo]);
        h.c.handle_info(h.now, &info(r#"{"params":{}}"#), &mut h.o);
        let (_, m) = h.expect_json();
        assert_eq!(m["method"], "_otc.info");
        // Its reply updates otc_list; no event.
        let ack = json!({"id": m["id"], "result": {"otc_list": [{"ip": "5.6.7.8", "port": 8053}]}});
        h.deliver_json(&ack.to_string());
        h.quiet();
        assert_eq!(
            h.c.otc_list,
            vec![SocketAddrV4::new(Ipv4Addr::new(5, 6, 7, 8), 8053)]
        );
        // An error reply of a refresh is only logged.
        h.advance(100_000);
        let hello = h.expect_send();
        assert_eq!(hello, miio::cloud_hello());
        h.deliver(&miio::time_sync_reply(T0 + 300));
        assert_eq!(h.take(), vec![Action::NeedInfo]);
        h.c.handle_info(h.now, &info(r#"{"params":{}}"#), &mut h.o);
        let (_, m) = h.expect_json();
        h.deliver_json(&json!({"id": m["id"], "error": {"code": -1, "message": "x"}}).to_string());
        h.quiet();
        assert_eq!(h.c.state(), CloudState::Connected);
    }

    // ---- receiving: framing and bad input --------------------------------------------------

    /// A TCP session with one upstream pending, and a stream that acks it, carries a command and a ping.
    fn stream_case() -> (H, Vec<u8>) {
        let mut c = tcp_cfg();
        c.keepalive = Duration::from_secs(1000);
        let mut h = H::connected(c);
        h.upstream(1, r#"{"id":1,"method":"x"}"#);
        let (_, m) = h.expect_json();
        let mut s = h.msg(&format!(r#"{{"id":{},"result":"ok"}}"#, m["id"]));
        s.extend(h.msg(CMD));
        s.extend(miio::keepalive(&h.keys, DID, h.c.stamp(h.now) + 50));
        s.extend(h.msg(r#"{"id":70,"method":"get_prop","params":["a"]}"#));
        (h, s)
    }

    #[test]
    fn tcp_stream_split_anywhere_gives_the_same_packets() {
        let (mut h, s) = stream_case();
        h.deliver(&s);
        let want = h.take();
        assert_eq!(want.len(), 4, "{want:?}");
        // Each channel (effects, events) in the same order, however the bytes were cut.
        let want = channels(want);
        for i in 0..=s.len() {
            let (mut h, s2) = stream_case();
            assert_eq!(s2, s);
            h.deliver(&s[..i]);
            h.deliver(&s[i..]);
            assert_eq!(channels(h.take()), want, "split at {i}");
        }
        let (mut h, _) = stream_case();
        for b in &s {
            h.deliver(std::slice::from_ref(b));
        }
        assert_eq!(channels(h.take()), want, "byte by byte");
    }

    #[test]
    fn tcp_stream_length_below_32_fails_the_attempt() {
        let mut h = H::connected(tcp_cfg());
        h.deliver(&[0x21, 0x31, 0x00, 0x10, 0, 0]);
        assert_eq!(
            h.take(),
            vec![Action::Close, Action::Event(CloudEvent::Retry)]
        );
        // After the failure, stream bytes are ignored.
        h.deliver(&[0x21, 0x31, 0x00, 0x10]);
        h.quiet();
    }

    #[test]
    fn tcp_v15_two_packets_in_one_chunk() {
        let mut h = H::connected(tcp_cfg());
        h.advance(20_000);
        let ka = h.expect_send();
        let mut s = h.msg(r#"{"id":1001,"result":"ok"}"#);
        s.extend_from_slice(&ka);
        h.deliver(&s);
        h.quiet();
        assert_eq!(h.c.state(), CloudState::Connected);
        // And TCP EOF drops the link.
        h.c.handle_link_down(h.now, &mut h.o);
        assert_eq!(
            h.take(),
            vec![Action::Close, Action::Event(CloudEvent::Retry)]
        );
    }

    #[test]
    fn bad_packets_dropped_link_stays_up() {
        let mut h = H::connected(cfg());
        let good = h.msg(CMD);
        let mut bad: Vec<Vec<u8>> = Vec::new();
        let mut flip = good.clone();
        flip[40] ^= 1;
        bad.push(flip);
        bad.push(miio::seal(&h.keys, DID + 1, 1, CMD.as_bytes()));
        let mut len = good.clone();
        len[3] = len[3].wrapping_add(1);
        bad.push(len);
        bad.push(good[..40].to_vec());
        bad.push(good[..31].to_vec());
        bad.push(Vec::new());
        let mut magic = good.clone();
        magic[0] = 0x22;
        bad.push(magic);
        // Bad padding: one block whose last plaintext byte is 0x41.
        let ct = h.keys.encrypt(&[0x41; 16]);
        bad.push(raw_packet(DID, 1, &ct[..16]));
        bad.push(raw_packet(DID, 1, &[7; 20]));
        bad.push(miio::seal(&h.keys, DID, 1, b"not json"));
        bad.push(miio::seal(&h.keys, DID, 1, b"[1,2]"));
        bad.push(miio::seal(&h.keys, DID, 1, &[0xff, 0xfe]));
        // Another key.
        bad.push(miio::seal(
            &Keys::new(b"ABCDEFGHIJKLMNOP"),
            DID,
            1,
            CMD.as_bytes(),
        ));
        // A time-sync reply with no hello outstanding.
        bad.push(miio::time_sync_reply(T0).to_vec());
        for b in &bad {
            h.deliver(b);
            h.quiet();
        }
        assert_eq!(h.c.state(), CloudState::Connected);
        h.deliver(&good);
        assert!(matches!(&h.take()[..], [Action::Command { .. }]));
        h.reply(1, r#"{"id":55,"result":0}"#);
        h.expect_send();
        h.advance(20_000);
        assert!(matches!(&h.take()[..], [Action::Send(b)] if b.len() == 32));
    }

    #[test]
    fn garbage_before_connect_is_ignored() {
        let mut h = H::new(cfg());
        h.deliver(b"hello");
        h.c.handle_stream(h.now, b"\x21\x31\x00\x01", &mut h.o);
        h.c.handle_link_down(h.now, &mut h.o);
        h.resolved(Ok(vec![SERVER]));
        h.c.handle_info(h.now, &Members::new(), &mut h.o);
        h.quiet();
        assert_eq!(h.c.state(), CloudState::Stopped);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn arbitrary_datagrams_never_panic(
            dgrams in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..120), 1..16),
            header in any::<bool>(),
        ) {
            let mut h = H::connected(cfg());
            for mut d in dgrams {
                if header && d.len() >= 4 {
                    // Reach past the framing checks.
                    d[0] = 0x21;
                    d[1] = 0x31;
                    let n = d.len() as u16;
                    d[2..4].copy_from_slice(&n.to_be_bytes());
                }
                h.deliver(&d);
                h.advance(7000);
                h.take();
            }
        }

        #[test]
        fn arbitrary_stream_chunks_never_panic(
            chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..80), 1..16),
        ) {
            let mut h = H::connected(tcp_cfg());
            let mut first = true;
            for mut c in chunks {
                if first && c.len() >= 4 {
                    c[0] = 0x21;
                    c[1] = 0x31;
                    first = false;
                }
                h.deliver(&c);
                h.advance(3000);
                h.take();
            }
        }
    }
}
