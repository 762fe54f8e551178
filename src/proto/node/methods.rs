//! What the daemon answers itself: the methods of PROTOCOL.md §4.6 (from the LAN and the cloud),
//! `local.*` (LOCAL_API.md §5) and INFO (P§5.4).

use serde_json::{json, Map, Value};

use super::provisioning::ProvisionFrom;
use super::routing::Conns;
use super::Node;
use crate::proto::local::ConnId;
use crate::proto::outbox::Action;
use crate::proto::state::State;
use crate::time::Instant;
use crate::wire::rpc::{self, Compact, Members};

impl Node {
    /// INFO built by the daemon itself (P§5.4, no helper answer), members in the order shown there.
    pub(super) fn own_info(&self) -> Members {
        let fw = self
            .identity
            .as_ref()
            .and_then(|i| i.fw_ver.clone())
            .or_else(|| self.fw_ver())
            .unwrap_or_else(|| "unknown".into());
        let ssid = self
            .identity
            .as_ref()
            .map(|i| i.ssid.clone())
            .unwrap_or_default();
        let mut ap = Members::new();
        ap.set_str("ssid", &ssid);
        ap.set_str("bssid", "");
        let mut netif = Members::new();
        netif.set_str("localIp", &self.netif.ip);
        netif.set_str("mask", &self.netif.mask);
        netif.set_str("gw", &self.netif.gw);
        let mut p = Members::new();
        p.set_str("hw_ver", "Linux");
        p.set_str("fw_ver", &fw);
        p.set("ap", ap.to_json());
        p.set("netif", netif.to_json());
        p
    }

    /// INFO for `miIO.info` (P§4.6): the `_otc.info` params without `bindkey`, in every state,
    /// AP mode included: the helper's last `_internal.info` (or the daemon's own), then `model`,
    /// `mac`, `token`, `life` (P§5.4) and the uid of a provisioning in this run.
    pub(super) fn info(&self, now: Instant) -> Members {
        let mut p = match &self.helper_info {
            Some(h) => h.clone(),
            None => self.own_info(),
        };
        if let Some(d) = self.boot.device.as_ref() {
            p.set_str("model", &d.model);
            p.set_str("mac", &d.mac.to_ascii_uppercase());
        }
        if let Some(t) = self.boot.token.as_ref() {
            p.set_str("token", &crate::config::token::to_hex(t));
        }
        p.set("life", now.secs().to_string());
        if let Some((uid, _)) = &self.bind {
            p.set_str("uid", uid);
        }
        p
    }

    /// A method the daemon answers itself (P§4.6). Returns the reply text, if any.
    pub(super) fn self_method(
        &mut self,
        now: Instant,
        method: &str,
        params: &Value,
        id: Option<Value>,
        from_lan: bool,
    ) -> Option<String> {
        let id = id?;
        let ok = json!(["OK"]);
        let err = json!(["ERROR"]);
        Some(match method {
            "miIO.info" => format!(
                "{{\"id\":{},\"code\":0,\"message\":\"ok\",\"result\":{}}}",
                Compact(&id),
                self.info(now).to_json()
            ),
            "miIO.wifi_assoc_state" => {
                let state = if self.state == State::CloudConnected {
                    "ONLINE"
                } else {
                    "CONNECTING"
                };
                format!(
                    "{{\"id\":{},\"code\":0,\"message\":\"ok\",\"result\":{{\"state\":\"{state}\",\"auth_fail_count\":0,\"conn_success_count\":1,\"conn_fail_count\":0,\"dhcp_fail_count\":0}}}}",
                    Compact(&id)
                )
            }
            "miIO.config_loglevel" => match params.get("loglevel").and_then(Value::as_u64) {
                Some(l) if l <= 4 => {
                    self.actions.push(Action::SetLogLevel(l as u8));
                    rpc::result_reply(&id, &ok)
                }
                _ => rpc::result_reply(&id, &err),
            },
            // P§4.6: ["ERROR"] if tz is invalid (D15) or no helper runs.
            "miIO.config_tz" => {
                let tz = params.get("tz").and_then(Value::as_str).unwrap_or("");
                if self.helper.config_tz(
                    &mut Conns::new(&mut self.local, &mut self.actions),
                    now,
                    tz,
                ) {
                    rpc::result_reply(&id, &ok)
                } else {
                    rpc::result_reply(&id, &err)
                }
            }
            // LAN-only methods (the cloud machine already refuses them from the cloud);
            // `miIO.config` waits for its file write (`on_lan_event`).
            "miIO.stop_diag_mode" if from_lan => rpc::result_reply(&id, &ok),
            _ => rpc::error_reply(Some(&id), -32601, "Method not found"),
        })
    }

    // ---- cloud I/O results ---------------------------------------------------------------

    /// `local.*` requests (L§5).
    pub(super) fn local_request(
        &mut self,
        now: Instant,
        conn: ConnId,
        method: &str,
        id: Option<Value>,
        obj: &Map<String, Value>,
    ) {
        if method == "local.status" {
            // A helper notice (L§5): `wifi_ap_mode*` counts as `_internal.wifi_ap_mode`.
            // Only `_internal.info` reads the raw text.
            self.helper.handle_message(
                &mut Conns::new(&mut self.local, &mut self.actions),
                now,
                conn,
                obj,
                b"",
            );
            return;
        }
        let Some(id) = id.filter(|v| v.is_u64() || v.is_i64()) else {
            crate::warn_limited!(now, "msg does not have 'id'");
            return;
        };
        let reply = match method {
            "local.query_status" => format!(
                "{{\"id\":{},\"method\":\"local.status\",\"params\":\"{}\"}}",
                Compact(&id),
                self.state.status()
            ),
            "local.query_time" => format!(
                "{{\"id\":{},\"method\":\"local.time\",\"params\":{}}}",
                Compact(&id),
                self.stamp(now)
            ),
            "local.query_country" => format!(
                "{{\"id\":{},\"method\":\"local.country\",\"params\":{}}}",
                Compact(&id),
                rpc::json_str(&self.country().unwrap_or_else(|| "prc".into()))
            ),
            "local.ble.config_router" => {
                let from = ProvisionFrom::Local(conn);
                match self.provision_check(now, obj.get("params"), &id, from) {
                    Err(r) => r,
                    Ok(p) => return self.provision_write(from, id, p),
                }
            }
            "local.prep_suspend" => format!(
                "{{\"id\":{},\"method\":\"local.resp_suspend\",\"params\":{{\"wakeup_time\":{}}}}}",
                Compact(&id),
                self.wakeup_time(now)
            ),
            _ => {
                crate::info_limited!(now, "Unknown local method: {method}");
                rpc::error_reply(Some(&id), -32601, "Method not found")
            }
        };
        self.local.send_to(&mut self.actions, conn, reply);
    }
}

#[cfg(test)]
mod tests {
    use super::super::harness::*;
    use super::*;

    #[test]
    fn local_queries_and_unknown_local_method() {
        let mut n = node();
        let t0 = Instant(65_000);
        n.local_accept(t0, 1, Port::Local);
        n.set_identity(t0, identity(false));
        n.local_value(t0, 1, br#"{"id":1,"method":"local.query_status"}"#);
        n.local_value(t0, 1, br#"{"id":2,"method":"local.query_time"}"#);
        n.local_value(t0, 1, br#"{"id":3,"method":"local.query_country"}"#);
        n.local_value(t0, 1, br#"{"id":4,"method":"local.nonesuch"}"#);
        n.local_value(t0, 1, br#"{"method":"local.query_time"}"#);
        let out: Vec<String> = serve(&mut n, t0).into_iter().map(|(_, t)| t).collect();
        assert_eq!(
            out,
            vec![
                r#"{"method":"local.status","params":"wifi_ap_mode"}"#,
                r#"{"id":1,"method":"local.status","params":"wifi_ap_mode"}"#,
                r#"{"id":2,"method":"local.time","params":65}"#,
                r#"{"id":3,"method":"local.country","params":"prc"}"#,
                r#"{"id":4,"error":{"code":-32601,"message":"Method not found"}}"#,
            ]
        );
    }

    /// P§4.6/§5.4: `miIO.info` lists INFO's members in the order of P§5.4, and a helper's INFO
    /// in the helper's order with `model`, `mac`, `token`, `life` and `uid` set in place or after.
    #[test]
    fn miio_info_keeps_the_member_order() {
        let mut n = node();
        n.identity = Some(identity(true));
        n.netif = Netif {
            ip: "10.0.0.2".into(),
            mask: "255.0.0.0".into(),
            gw: "10.0.0.1".into(),
        };
        n.boot.token = Some(Secret16::new(*b"ABCDEFGHIJKLMNOP"));
        n.bind = Some(("42".into(), Some("bk".into())));
        let now = Instant(7_000);
        let ask =
            |n: &mut Node| n.self_method(now, "miIO.info", &Value::Null, Some(json!(3)), true);
        assert_eq!(
            ask(&mut n).unwrap(),
            r#"{"id":3,"code":0,"message":"ok","result":{"hw_ver":"Linux","fw_ver":"1.2.3_0001","ap":{"ssid":"home","bssid":""},"netif":{"localIp":"10.0.0.2","mask":"255.0.0.0","gw":"10.0.0.1"},"token":"4142434445464748494a4b4c4d4e4f50","life":7,"uid":"42"}}"#
        );
        n.helper_info = Members::of_object(br#"{"z":0,"token":"old","ap":{"y":1,"x":2}}"#);
        assert_eq!(
            ask(&mut n).unwrap(),
            r#"{"id":3,"code":0,"message":"ok","result":{"z":0,"token":"4142434445464748494a4b4c4d4e4f50","ap":{"y":1,"x":2},"life":7,"uid":"42"}}"#
        );
    }

    #[test]
    fn offline_with_a_helper_miio_info_has_the_ssid_of_wifi_conf() {
        let mut n = node();
        let t0 = Instant(10_000);
        n.start(t0);
        n.local_accept(t0, 1, Port::Local);
        n.local_value(t0, 1, br#"{"method":"_internal.helper_ready"}"#);
        for answer in [
            r#"{"method":"_internal.response_dinfo","params":{"did":123456789,"key":"YWJjZGVmZ2hpamts","vendor":"acme","mac":"aa:bb:cc:01:02:03","model":"acme.dev.v1"}}"#,
            r#"{"method":"_internal.response_dtoken","params":"abcDEF0123456789"}"#,
            r#"{"method":"_internal.res_wifi_conf_status","params":1}"#,
        ] {
            files(&mut n, t0, Some("home"));
            n.local_value(t0, 1, answer.as_bytes());
        }
        files(&mut n, t0, Some("home"));
        assert!(n.identity().is_some_and(|i| i.provisioned));
        assert_ne!(n.state(), State::CloudConnected);
        // No cloud, no helper `_internal.info`: the daemon's own INFO, with wifi.conf's ssid (P§5.4).
        assert_eq!(info_ssid(&n, t0), "home");
    }
}
