//! Routing (LOCAL_API.md §4, PROTOCOL.md §5.7–§5.8): the glue that drains the cloud, LAN and helper
//! machines into decisions, the cloud's I/O results, and the local connections' inbound messages.

use std::net::{Ipv4Addr, SocketAddr};

use serde_json::{json, Value};

use super::provisioning::ProvisionFrom;
use super::{Netif, Node};
use crate::proto::cloud::{self, Cloud, CloudEvent};
use crate::proto::helper;
use crate::proto::ioerr::OsError;
use crate::proto::lan::LanEvent;
use crate::proto::local::{ConnId, Inbound, Local, Port};
use crate::proto::outbox::{Action, Outbox};
use crate::proto::state::State;
use crate::time::Instant;
use crate::wire::json_stream::Piece;
use crate::wire::rpc;

/// The helper's effects go through the local table into the Outbox as it decides them: a
/// connection the table already closed (a framing error, L§3) gets no more writes.
pub(super) struct Conns<'a> {
    table: &'a mut Local,
    out: &'a mut Outbox,
}

impl<'a> Conns<'a> {
    pub(super) fn new(table: &'a mut Local, out: &'a mut Outbox) -> Conns<'a> {
        Conns { table, out }
    }
}

impl helper::Out for Conns<'_> {
    fn write(&mut self, conn: ConnId, text: helper::HelperText) {
        self.table.send_to(self.out, conn, text.into_string());
    }
    fn shutdown_write(&mut self, conn: ConnId) {
        self.out.push(Action::ShutdownWrite(conn));
    }
    fn close(&mut self, conn: ConnId) {
        self.table.close(self.out, conn);
    }
}

impl Node {
    /// Drains the machines' actions into node actions and decisions.
    pub(super) fn pump(&mut self, now: Instant) {
        #[cfg(feature = "mqtt")]
        self.mqtt_now(now);
        loop {
            if let Some(e) = self.cloud.as_mut().and_then(Cloud::poll_event) {
                self.on_cloud_event(now, e);
                continue;
            }
            if let Some(e) = self.helper.poll_event() {
                self.on_helper_event(now, e);
                continue;
            }
            if let Some(c) = self.cloud.as_ref() {
                self.lan.set_offset(c.offset());
            }
            match self.lan.poll_event() {
                Some(e) => self.on_lan_event(now, e),
                None => break,
            }
        }
    }

    pub(super) fn on_lan_event(&mut self, now: Instant, e: LanEvent) {
        match e {
            LanEvent::Command { local_id, text } => {
                if self.local.command_audience() == 0 {
                    let r = rpc::error_reply(Some(&json!(local_id)), -9999, "user ack timeout");
                    self.lan.local_reply(now, local_id, &r, &mut self.actions);
                } else {
                    self.local.broadcast_command(&mut self.actions, &text);
                }
            }
            LanEvent::SelfMethod {
                handle,
                method,
                id,
                params,
            } if method == "miIO.config_router" => {
                let from = ProvisionFrom::Lan(handle);
                match self.provision_check(now, Some(&params), &json!(id), from) {
                    Err(r) => {
                        self.lan.answer(now, handle, &r, &mut self.actions);
                    }
                    Ok(p) => self.provision_write(from, json!(id), p),
                }
            }
            // P§4.6: answered once the flag file is written (`trust_written`).
            LanEvent::SelfMethod {
                handle,
                method,
                id,
                params,
            } if method == "miIO.config" => match params.get("enauth").and_then(Value::as_u64) {
                Some(v @ 0..=1) => {
                    self.trusting = Some((handle, json!(id)));
                    self.actions.push(Action::TrustFlag(v == 1));
                }
                _ => {
                    let r = rpc::result_reply(&json!(id), &json!(["ERROR"]));
                    self.lan.answer(now, handle, &r, &mut self.actions);
                }
            },
            LanEvent::SelfMethod {
                handle,
                method,
                id,
                params,
            } => {
                let reply = self.self_method(now, &method, &params, Some(json!(id)), true);
                if let Some(r) = reply {
                    self.lan.answer(now, handle, &r, &mut self.actions);
                }
            }
        }
    }

    /// A datagram on the LAN socket (54321).
    pub fn lan_datagram(&mut self, now: Instant, from: SocketAddr, data: &[u8]) {
        self.lan.handle_datagram(now, from, data, &mut self.actions);
        self.pump(now);
    }

    pub(super) fn on_cloud_event(&mut self, now: Instant, e: cloud::Event) {
        match e {
            cloud::Event::NeedInfo => self
                .helper
                .ask_info(&mut Conns::new(&mut self.local, &mut self.actions), now),
            cloud::Event::Command { text, id } => {
                if id.is_some_and(|i| self.lan.is_local_id_pending(i)) {
                    // P§4.7: a cloud id that collides with a pending LAN id is answered at once.
                    crate::warn_limited!(
                        now,
                        "cloud command id collides with a pending LAN command; answered -9999"
                    );
                    if let (Some(id), Some(c)) = (id, self.cloud.as_mut()) {
                        let r = rpc::error_reply(Some(&json!(id)), -9999, "user ack timeout");
                        c.self_reply(now, id, &r, &mut self.actions);
                    }
                } else if self.local.command_audience() == 0 {
                    // P§5.8: MAY answer at once when the command reached no local client.
                    if let (Some(id), Some(c)) = (id, self.cloud.as_mut()) {
                        let r = rpc::error_reply(Some(&json!(id)), -9999, "user ack timeout");
                        c.self_reply(now, id, &r, &mut self.actions);
                    }
                } else {
                    self.local.broadcast_command(&mut self.actions, &text);
                }
            }
            cloud::Event::SelfMethod { id, method, params } => {
                let reply = self.self_method(now, &method, &params, id.map(|i| json!(i)), false);
                if let (Some(id), Some(r), Some(c)) = (id, reply, self.cloud.as_mut()) {
                    c.self_reply(now, id, &r, &mut self.actions);
                }
            }
            cloud::Event::State(e) => self.on_cloud_state(now, e),
            cloud::Event::Didkey(d) => self.on_didkey(now, d),
        }
    }

    pub(super) fn on_cloud_state(&mut self, now: Instant, e: CloudEvent) {
        match e {
            CloudEvent::Trying => self.set_state(State::CloudTrying),
            CloudEvent::InternetConnected => self.broadcast("internet_connected"),
            CloudEvent::InternetFailed => {
                self.helper.offline_start(now);
                self.broadcast("internet_failed");
            }
            CloudEvent::Connected => {
                self.helper.offline_stop();
                self.set_state(State::CloudConnected);
                self.broadcast("cloud_connected");
            }
            CloudEvent::Retry => {
                self.helper.offline_start(now);
                self.set_state(State::CloudRetry);
                self.broadcast("cloud_retry");
            }
        }
    }

    pub fn cloud_resolved(
        &mut self,
        now: Instant,
        attempt: u32,
        result: Result<Vec<Ipv4Addr>, String>,
    ) {
        if let Some(c) = self.cloud.as_mut() {
            c.handle_resolved(now, attempt, result, &mut self.actions);
        }
        self.pump(now);
    }

    /// A cloud socket is open with the local address `local` (UNSPECIFIED: not IPv4). It is also
    /// the mDNS service's address (P§4.8).
    pub fn cloud_connected(&mut self, now: Instant, netif: Netif, local: Ipv4Addr) {
        self.netif = netif;
        if let Some(c) = self.cloud.as_mut() {
            c.handle_connected(now, local, &mut self.actions);
        }
        self.pump(now);
        if super::sta(self.state) {
            self.mdns_ip = Some(local);
        }
        if self.mdns_update() {
            self.mdns_announce(now);
        }
    }

    pub fn cloud_connect_failed(&mut self, now: Instant, reason: OsError) {
        if let Some(c) = self.cloud.as_mut() {
            c.handle_connect_failed(now, &reason.to_string(), &mut self.actions);
        }
        self.pump(now);
    }

    pub fn cloud_datagram(&mut self, now: Instant, data: &[u8]) {
        if let Some(c) = self.cloud.as_mut() {
            c.handle_datagram(now, data, &mut self.actions);
        }
        self.pump(now);
    }

    pub fn cloud_stream(&mut self, now: Instant, data: &[u8]) {
        if let Some(c) = self.cloud.as_mut() {
            c.handle_stream(now, data, &mut self.actions);
        }
        self.pump(now);
    }

    pub fn cloud_link_down(&mut self, now: Instant) {
        if let Some(c) = self.cloud.as_mut() {
            c.handle_link_down(now, &mut self.actions);
        }
        self.pump(now);
    }

    pub fn set_cloud_backlog(&mut self, backlog: bool) {
        self.cloud_backlog = backlog;
    }

    // ---- local connections -----------------------------------------------------------------

    /// A new local connection. False: the reactor closes it at once.
    pub fn local_accept(&mut self, now: Instant, conn: ConnId, port: Port) -> bool {
        self.local.accept(now, conn, port)
    }

    pub fn local_closed(&mut self, conn: ConnId) {
        self.local.closed(conn);
        self.helper.handle_closed(conn);
        // The reactor reuses the slot: acks still due to this connection must go to no one.
        if let Some(c) = self.cloud.as_mut() {
            c.client_gone(conn);
        }
    }

    /// A JSON syntax error in a local connection's stream.
    pub fn local_syntax_error(&mut self, now: Instant, conn: ConnId) {
        self.local.syntax_error(&mut self.actions, now, conn);
    }

    /// One complete JSON value from a local connection.
    pub fn local_value(&mut self, now: Instant, conn: ConnId, raw: &[u8]) {
        let inbound = self.local.handle_value(&mut self.actions, now, conn, raw);
        self.local_inbound(now, inbound);
    }

    /// [`Node::local_value`] of a value as the splitter cut it: one it scanned already is not
    /// scanned again (json_stream::Piece).
    // Not inlined: the MQTT bridge routes through here too, and one copy of the routing is what a
    // board's flash should carry (ARCHITECTURE.md §6).
    #[inline(never)]
    pub fn local_piece(&mut self, now: Instant, conn: ConnId, piece: Piece) {
        let inbound = match piece {
            Piece::Scanned { text, head } => {
                self.local
                    .handle_scanned(&mut self.actions, now, conn, text, head)
            }
            Piece::Raw(raw) => self.local.handle_value(&mut self.actions, now, conn, &raw),
        };
        self.local_inbound(now, inbound);
    }

    fn local_inbound(&mut self, now: Instant, inbound: Option<Inbound>) {
        match inbound {
            Some(Inbound::Local {
                conn,
                method,
                id,
                obj,
            }) => self.local_request(now, conn, &method, id, &obj),
            Some(Inbound::Internal {
                conn, obj, text, ..
            }) => self.helper.handle_message(
                &mut Conns::new(&mut self.local, &mut self.actions),
                now,
                conn,
                &obj,
                text.as_bytes(),
            ),
            Some(Inbound::Upstream { conn, head, text }) => match self.cloud.as_mut() {
                Some(c) => c.upstream(now, conn, text, &head, &mut self.actions),
                None => {
                    if let Some(id) = head.id.as_ref() {
                        self.local.send_to(
                            &mut self.actions,
                            conn,
                            rpc::error_reply(Some(id), -30011, "OT server disconnected"),
                        );
                    }
                }
            },
            Some(Inbound::Reply {
                conn,
                id,
                head,
                text,
            }) => {
                let taken = if self.lan.is_local_id_pending(id) {
                    self.lan.local_reply(now, id, &text, &mut self.actions)
                } else {
                    match self.cloud.as_mut() {
                        Some(c) => c.local_reply(now, conn, &text, &head, &mut self.actions),
                        None => false,
                    }
                };
                if !taken {
                    crate::info_limited!(
                        now,
                        "reply from local client {conn} matches no pending command; dropped"
                    );
                }
            }
            None => {}
        }
        self.pump(now);
    }
}

#[cfg(test)]
mod tests {
    use super::super::harness::*;
    use super::*;

    /// Found by the month simulation (`proto::sim`): a tool sends a report and closes before the
    /// ack; the reactor gives the next connection the same slot. The ack must not reach it: P§5.7
    /// drops the ack of a client that has gone.
    #[test]
    fn an_ack_never_reaches_the_next_connection_in_a_closed_slot() {
        let keys = Keys::new(&KEY);
        let mut n = node();
        let t0 = Instant(10_000);
        n.handle_timeout(t0); // the helper grace (2 s) is over: file mode
        n.set_identity(t0, identity(true));
        serve(&mut n, t0);
        assert_eq!(n.state(), State::CloudConnected);
        let t1 = t0 + Duration::from_secs(1);
        n.local_accept(t1, 3, Port::Local);
        n.local_value(t1, 3, br#"{"id":7,"method":"props","params":{"a":1}}"#);
        let mut up = Vec::new();
        while let Some(a) = n.poll_action() {
            if let Action::CloudSend(b) = a {
                up.push(miio::decode(&keys, DID, &b).unwrap().value);
            }
        }
        assert_eq!(up.len(), 1, "{up:?}");
        n.local_closed(3);
        assert!(n.local_accept(t1, 3, Port::Local));
        let ack = format!(r#"{{"id":{},"result":"ok"}}"#, up[0]["id"]);
        n.cloud_datagram(t1, &miio::seal(&keys, DID, 1_700_000_001, ack.as_bytes()));
        let out = serve(&mut n, t1);
        assert!(out.is_empty(), "the newcomer got {out:?}");
        // Nothing in flight (the next deadline is the newcomer's 1 s classification window).
        assert_eq!(n.wakeup_time(t1), 1);
    }
}
