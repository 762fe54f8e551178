//! Provisioning (LOCAL_API.md §8): `miIO.config_router` from the LAN and `local.ble.config_router`
//! checked, `wifi.conf` written before the answer, the helper's Wi-Fi result; and `miIO.config`'s
//! flag file (P§4.6), answered once written.

use log::info;
use serde_json::{json, Value};

use super::routing::Conns;
use super::Node;
use crate::proto::helper;
use crate::proto::local::ConnId;
use crate::proto::outbox::{Action, WifiText};
use crate::proto::state::State;
use crate::time::Instant;
use crate::wire::rpc;

/// Where a provisioning came from, for its reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ProvisionFrom {
    /// `miIO.config_router` from the phone, under this LAN handle: `["OK"]` / `["ERROR"]`.
    Lan(u64),
    /// `local.ble.config_router` (BLE on 54323, QR on 54322) from this connection: `["OK"]` /
    /// -33020 with the reason.
    Local(ConnId),
}

/// A checked provisioning whose `wifi.conf` is being written; it is answered when the write is.
pub(super) struct Written {
    pub(super) from: ProvisionFrom,
    pub(super) id: Value,
    pub(super) params: crate::proto::provision::Params,
}

/// The refusal of a provisioning (L§8), logged with its reason.
pub(super) fn refusal(now: Instant, from: ProvisionFrom, id: &Value, reason: &str) -> String {
    match from {
        ProvisionFrom::Lan(_) => {
            crate::warn_limited!(now, "config_router refused: {reason}");
            rpc::result_reply(id, &json!(["ERROR"]))
        }
        ProvisionFrom::Local(_) => {
            crate::warn_limited!(now, "ble.config_router refused: {reason}");
            rpc::error_reply(Some(id), -33020, reason)
        }
    }
}

impl Node {
    /// L§8 validation: the checked parameters, or the refusal reply for the requester.
    pub(super) fn provision_check(
        &mut self,
        now: Instant,
        params: Option<&Value>,
        id: &Value,
        from: ProvisionFrom,
    ) -> Result<crate::proto::provision::Params, String> {
        let refuse = |reason: &str| refusal(now, from, id, reason);
        if self.provisioning.is_some() || self.writing.is_some() {
            return Err(refuse("provisioning in progress."));
        }
        let p = crate::proto::provision::parse(params).map_err(|r| refuse(&r))?;
        if !self.state.token_known() || self.boot.device.is_none() {
            return Err(refuse("device not ready."));
        }
        Ok(p)
    }

    /// L§8 step 1, before any reply: write wifi.conf (D18: no uid keeps the previous uid= line).
    /// A data dir that is full or read-only must not get an `["OK"]` that loses the binding at
    /// the next restart, so the requester is answered from [`Node::wifi_written`].
    pub(super) fn provision_write(
        &mut self,
        from: ProvisionFrom,
        id: Value,
        params: crate::proto::provision::Params,
    ) {
        let uid = params.uid.or(self.boot.uid);
        let w = crate::config::wifi::WifiConf::new(&params.ssid, &params.passwd, uid);
        self.actions
            .push(Action::WriteWifi(WifiText(crate::config::wifi::render(&w))));
        self.writing = Some(Written { from, id, params });
    }

    /// The result of [`Action::WriteWifi`], with the `wifi.conf` it replaced (None: there was none,
    /// or it could not be read). Written: `["OK"]`, then the rest of L§8; the replaced file is
    /// kept for a failed Wi-Fi change. Not written (the reactor logged the errno): `["ERROR"]` or
    /// -33020 `cannot write wifi.conf`, and nothing else happens: no state change, no broadcast,
    /// no uid for `_otc.info`.
    pub fn wifi_written(&mut self, now: Instant, ok: bool, replaced: Option<WifiText>) {
        if ok {
            self.wifi_backup = Some(replaced);
        }
        let Some(Written { from, id, params }) = self.writing.take() else {
            return;
        };
        let reply = if ok {
            rpc::result_reply(&id, &json!(["OK"]))
        } else {
            refusal(now, from, &id, "cannot write wifi.conf")
        };
        if ok {
            // The country file goes to the reactor ahead of the reply, so a requester that reads
            // `device.country` once it has its `["OK"]` finds it written (L§8 step 2).
            self.provision_country(&params);
        }
        match from {
            ProvisionFrom::Lan(handle) => {
                self.lan.answer(now, handle, &reply, &mut self.actions);
            }
            ProvisionFrom::Local(conn) => self.local.send_to(&mut self.actions, conn, reply),
        }
        if ok {
            self.provision_start(now, params);
        }
        self.pump(now);
    }

    /// The result of [`Action::TrustFlag`]: `["OK"]` when the flag file was created or removed,
    /// `["ERROR"]` when not (the reactor logged the errno), so a phone is never told that a
    /// setting is stored when it is not.
    pub fn trust_written(&mut self, now: Instant, ok: bool) {
        let Some((handle, id)) = self.trusting.take() else {
            return;
        };
        let r = if ok { json!(["OK"]) } else { json!(["ERROR"]) };
        self.lan
            .answer(now, handle, &rpc::result_reply(&id, &r), &mut self.actions);
        self.pump(now);
    }

    /// L§8 after the `["OK"]` went out (wifi.conf is written): the country, uid and bind_key,
    /// broadcast `wifi_connecting` and ask the helper to start Wi-Fi.
    pub(super) fn provision_start(&mut self, now: Instant, p: crate::proto::provision::Params) {
        let in_ap = self.state == State::WifiApMode;
        info!(
            "provisioning ssid {} ({} mode)",
            crate::config::Quoted(&p.ssid),
            if in_ap { "AP" } else { "STA" }
        );
        let uid = p.uid.or(self.boot.uid);
        // 2. uid and bind_key (memory only, for _otc.info); the country is written already.
        if let Some(u) = p.uid {
            self.bind = Some((u.to_string(), p.bind_key.clone()));
        }
        self.boot.ssid = p.ssid.clone();
        self.boot.uid = uid;
        self.provisioning = Some(in_ap);
        // In STA mode (a router password change) the session closes and restarts after Wi-Fi is up.
        if !in_ap {
            self.drop_session(now);
            self.set_state(State::WifiStaMode);
        }
        // 3. broadcast, 4. the helper starts Wi-Fi (without one: connected at once, D9).
        self.broadcast("wifi_connecting");
        let cc = p.country.clone().unwrap_or_default();
        let tz = p.tz.clone().unwrap_or_default();
        self.helper.wifi_start(
            &mut Conns::new(&mut self.local, &mut self.actions),
            now,
            &helper::WifiStart {
                ssid: &p.ssid,
                passwd: &p.passwd,
                uid: p.uid.unwrap_or(0),
                country_domain: &cc,
                tz: &tz,
            },
        );
    }

    /// L§8 step 2, the country: `device.country` written, and the host prefix it gives.
    pub(super) fn provision_country(&mut self, p: &crate::proto::provision::Params) {
        if let Some(cc) = &p.country {
            self.actions.push(Action::WriteCountry(cc.clone()));
            self.boot.country = Some(cc.clone()).filter(|c| c != "cn");
        }
    }

    pub(super) fn wifi_connected(&mut self, now: Instant) {
        if self.provisioning.take().is_none() {
            crate::info_limited!(now, "helper: wifi connected");
            return;
        }
        self.broadcast("wifi_connected");
        self.boot.provisioned = Some(true);
        self.rebuild_identity(now, true);
    }

    pub(super) fn wifi_failed(&mut self, now: Instant) {
        let Some(in_ap) = self.provisioning.take() else {
            crate::info_limited!(now, "helper: wifi failed");
            return;
        };
        // L§8: AP → delete wifi.conf and back to AP mode; STA → the old wifi.conf and sta_mode.
        // The file is put back before the clients hear `wifi_failed`: the one the last write
        // replaced, or none (deleted) when there was none or nothing was written.
        let old = self.wifi_backup.take().flatten();
        self.actions.push(Action::RestoreWifi(old));
        self.actions.push(Action::ReadSsid);
        self.broadcast("wifi_failed");
        self.bind = None;
        self.boot.provisioned = Some(!in_ap);
        self.rebuild_identity(now, !in_ap);
    }
}

#[cfg(test)]
mod tests {
    use super::super::harness::*;
    use super::*;

    #[test]
    fn a_failed_ap_provisioning_leaves_no_ssid_in_miio_info() {
        let mut n = node();
        let t0 = Instant(10_000);
        n.start(t0);
        n.handle_timeout(t0); // the helper grace is over: file mode
        files(&mut n, t0, None);
        assert_eq!(n.state(), State::WifiApMode);
        // A helper appears (it will run wifi_start), then the phone provisions over BLE.
        n.local_accept(t0, 1, Port::Local);
        n.local_value(t0, 1, br#"{"method":"_internal.helper_ready"}"#);
        n.local_accept(t0, 2, Port::Ble);
        n.local_value(
            t0,
            2,
            br#"{"id":1,"method":"local.ble.config_router","params":{"ssid":"newnet","passwd":"pw12345678"}}"#,
        );
        let a = files(&mut n, t0, Some("newnet"));
        assert!(a.iter().any(|a| matches!(a, Action::WriteWifi(_))), "{a:?}");
        // Wi-Fi fails: wifi.conf is deleted (L§8), and miIO.info must not name the failed network.
        n.local_value(t0, 1, br#"{"method":"_internal.wifi_ap_mode"}"#);
        let a = files(&mut n, t0, None);
        assert!(a.contains(&Action::RestoreWifi(None)), "{a:?}");
        assert_eq!(n.state(), State::WifiApMode);
        assert_eq!(info_ssid(&n, t0), "");
    }

    /// L§8: wifi.conf is written before the reply. When the write fails (a read-only or full data
    /// dir) the requester is refused and nothing else happens: no state change, no broadcast, no
    /// helper `wifi_start`, no uid for `_otc.info`, and the cloud session stays.
    #[test]
    fn provisioning_refused_when_wifi_conf_cannot_be_written() {
        let mut n = node();
        let t0 = Instant(10_000);
        let mut sent = Vec::new();
        n.local_accept(t0, 1, Port::Local);
        n.start(t0);
        let t1 = t0 + Duration::from_secs(3);
        n.handle_timeout(t1);
        serve_with(&mut n, t1, Some(CONF), &mut sent);
        assert_eq!(n.state(), State::CloudConnected);
        let before = sent.len();

        // QR path on 54322: the write fails, the reply is -33020, nothing else is done.
        let t2 = t1 + Duration::from_secs(5);
        n.local_value(
            t2,
            1,
            br#"{"id":5,"method":"local.ble.config_router","params":{"ssid":"new","uid":"42","country_domain":"de"}}"#,
        );
        let mut out = Vec::new();
        let mut wrote = 0;
        while let Some(a) = n.poll_action() {
            match a {
                Action::WriteWifi(text) => {
                    assert!(out.is_empty(), "no reply before the write: {out:?}");
                    assert!(text.contains("ssid=\"new\""), "{}", &*text);
                    wrote += 1;
                    n.wifi_written(t2, false, None);
                }
                Action::Local(LocalAction::Send(c, t)) => out.push((c, t.to_string())),
                other => panic!("nothing else may happen: {other:?}"),
            }
        }
        assert_eq!(wrote, 1);
        assert_eq!(
            out,
            vec![(
                1,
                r#"{"id":5,"error":{"code":-33020,"message":"cannot write wifi.conf"}}"#
                    .to_string()
            )]
        );
        assert_eq!(n.state(), State::CloudConnected);
        assert_eq!(n.cloud_state(), CloudState::Connected);
        // A later provisioning is not "in progress", and the next session has no uid.
        let t3 = t2 + Duration::from_secs(1);
        n.local_value(
            t3,
            1,
            br#"{"id":6,"method":"local.ble.config_router","params":{"ssid":"other"}}"#,
        );
        let out = serve_with(&mut n, t3, Some(CONF), &mut sent);
        assert!(
            out.iter().any(|(_, t)| t == r#"{"id":6,"result":["OK"]}"#),
            "{out:?}"
        );
        let infos: Vec<&Value> = sent[before..]
            .iter()
            .filter(|v| v["method"] == "_otc.info")
            .collect();
        assert_eq!(infos.len(), 1, "{sent:?}");
        assert!(infos[0]["params"].get("uid").is_none(), "{infos:?}");
    }

    /// The LAN path: `["ERROR"]` when the write fails, `["OK"]` only after it succeeded.
    #[test]
    fn lan_config_router_answers_after_the_write() {
        let keys = Keys::new(b"ABCDEFGHIJKLMNOP");
        let phone: SocketAddr = "127.0.0.1:5555".parse().unwrap();
        let mut n = node();
        let t0 = Instant(10_000);
        n.start(t0);
        let t1 = t0 + Duration::from_secs(3);
        n.handle_timeout(t1);
        while let Some(a) = n.poll_action() {
            match a {
                Action::LoadFiles(Step::Dinfo) => {
                    n.file_dinfo(t1, crate::config::device::parse(CONF), None)
                }
                Action::LoadFiles(Step::Token) => n.file_token(t1, token_files(true)),
                Action::LoadFiles(Step::WifiStatus) => n.file_wifi(t1, false, String::new(), None),
                _ => {}
            }
        }
        assert_eq!(n.state(), State::WifiApMode);
        let req = |id: u32| {
            let text = format!(
                r#"{{"id":{id},"method":"miIO.config_router","params":{{"ssid":"home","passwd":"pw12345678","uid":7}}}}"#
            );
            miio::seal(&keys, DID, 100 + id, text.as_bytes())
        };
        for (id, ok, want) in [(1u32, false, r#"["ERROR"]"#), (2, true, r#"["OK"]"#)] {
            n.lan_datagram(t1, phone, &req(id));
            let mut replies = Vec::new();
            let mut wrote = false;
            while let Some(a) = n.poll_action() {
                match a {
                    Action::WriteWifi(_) => {
                        assert!(replies.is_empty(), "no reply before the write");
                        wrote = true;
                        n.wifi_written(t1, ok, None);
                    }
                    Action::LanSend { bytes, .. } => {
                        let o = miio::decode(&keys, DID, &bytes).unwrap();
                        replies.push(o.value["result"].to_string());
                    }
                    _ => {}
                }
            }
            assert!(wrote);
            assert_eq!(replies, vec![want.to_string()], "id {id}");
            // The failed one changed nothing; without a helper the good one connects at once (D9).
            assert_eq!(n.state() == State::WifiApMode, !ok, "id {id}");
        }
    }

    /// `miIO.config` (P§4.6): the phone's answer follows the flag file's write, `["ERROR"]` when
    /// it failed; an `enauth` that is neither 0 nor 1 is `["ERROR"]` with nothing written.
    #[test]
    fn lan_trust_flag_answers_after_the_write() {
        let keys = Keys::new(b"ABCDEFGHIJKLMNOP");
        let phone: SocketAddr = "127.0.0.1:5555".parse().unwrap();
        let mut n = node();
        let t0 = Instant(10_000);
        n.start(t0);
        let t1 = t0 + Duration::from_secs(3);
        n.handle_timeout(t1);
        while let Some(a) = n.poll_action() {
            match a {
                Action::LoadFiles(Step::Dinfo) => {
                    n.file_dinfo(t1, crate::config::device::parse(CONF), None)
                }
                Action::LoadFiles(Step::Token) => n.file_token(t1, token_files(true)),
                Action::LoadFiles(Step::WifiStatus) => n.file_wifi(t1, false, String::new(), None),
                _ => {}
            }
        }
        let cases = [
            (1u32, 1, Some(false), r#"["ERROR"]"#),
            (2, 1, Some(true), r#"["OK"]"#),
            (3, 0, Some(true), r#"["OK"]"#),
            (4, 7, None, r#"["ERROR"]"#),
        ];
        for (id, enauth, written, want) in cases {
            let text =
                format!(r#"{{"id":{id},"method":"miIO.config","params":{{"enauth":{enauth}}}}}"#);
            n.lan_datagram(
                t1,
                phone,
                &miio::seal(&keys, DID, 100 + id, text.as_bytes()),
            );
            let mut replies = Vec::new();
            let mut flag = None;
            while let Some(a) = n.poll_action() {
                match a {
                    Action::TrustFlag(on) => {
                        assert!(replies.is_empty(), "no reply before the write");
                        flag = Some(on);
                        n.trust_written(t1, written.unwrap());
                    }
                    Action::LanSend { bytes, .. } => {
                        let o = miio::decode(&keys, DID, &bytes).unwrap();
                        replies.push(o.value["result"].to_string());
                    }
                    _ => {}
                }
            }
            assert_eq!(flag, written.map(|_| enauth == 1), "id {id}");
            assert_eq!(replies, vec![want.to_string()], "id {id}");
        }
    }

    /// L§8: `device.country` is handed to the reactor before the `["OK"]`, and the restore of
    /// `wifi.conf` before `wifi_failed`: a client that reads the files once it heard either finds
    /// them as they will stay.
    #[test]
    fn the_files_go_out_before_the_messages_that_announce_them() {
        const OLD: &str = "ssid=\"home\"\npsk=\"old-password\"\n";
        let mut n = node();
        let t0 = Instant(10_000);
        n.local_accept(t0, 1, Port::Local);
        n.start(t0);
        let t1 = t0 + Duration::from_secs(3);
        n.handle_timeout(t1);
        serve_with(&mut n, t1, Some(CONF), &mut Vec::new());
        assert_eq!(n.state(), State::CloudConnected);
        let t2 = t1 + Duration::from_secs(1);
        n.local_value(
            t2,
            1,
            br#"{"id":5,"method":"local.ble.config_router","params":{"ssid":"new","country_domain":"de"}}"#,
        );
        let mut seen = Vec::new();
        while let Some(a) = n.poll_action() {
            match a {
                Action::WriteWifi(_) => n.wifi_written(t2, true, Some(WifiText(OLD.into()))),
                Action::WriteCountry(cc) => seen.push(format!("country {cc}")),
                Action::Local(LocalAction::Send(1, t)) if t.contains(r#""result":["OK"]"#) => {
                    seen.push("OK".into())
                }
                _ => {}
            }
        }
        assert_eq!(seen, ["country de", "OK"]);
        // No helper: connected at once (D9); a helper's `wifi_ap_mode` notice would fail it.
        n.provisioning = Some(false);
        n.wifi_failed(t2);
        let order: Vec<String> = drain(&mut n)
            .into_iter()
            .filter_map(|a| match a {
                // The file the write replaced goes back (STA mode: L§8).
                Action::RestoreWifi(Some(t)) if *t == *OLD => Some("restore".to_string()),
                Action::Local(LocalAction::Send(1, t)) if t.contains("wifi_failed") => {
                    Some("wifi_failed".into())
                }
                _ => None,
            })
            .collect();
        assert_eq!(order, ["restore", "wifi_failed"]);
    }

    /// L§8: the choice between putting the old `wifi.conf` back and deleting it is the node's,
    /// from what the reactor reported with the write: a failed write keeps nothing, a restore is
    /// used once, and without a previous file the new one is deleted.
    #[test]
    fn a_failed_wifi_change_restores_what_the_write_replaced() {
        let old = WifiText("ssid=\"home\"\npsk=\"pw\"\n".into());
        let restore = |n: &mut Node| {
            n.provisioning = Some(false);
            n.wifi_failed(Instant(1));
            drain(n).into_iter().find_map(|a| match a {
                Action::RestoreWifi(t) => Some(t),
                _ => None,
            })
        };
        let mut n = node();
        n.wifi_written(Instant(1), true, Some(old.clone()));
        n.wifi_written(Instant(1), false, None); // a failed write replaces nothing
        assert_eq!(restore(&mut n), Some(Some(old)));
        assert_eq!(restore(&mut n), Some(None), "used once; then deleted");
        n.wifi_written(Instant(1), true, None);
        assert_eq!(restore(&mut n), Some(None));
    }
}
