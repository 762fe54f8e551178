//! (tests only) The node in virtual time: a node built with a test identity, and the io side's
//! part played for it: the cloud answered, the data files read, actions drained, time advanced by
//! the caller. Shared by the tests of every file of the node.

// What the node's tests name, in one import (`use super::super::harness::*`).
pub(super) use std::net::{Ipv4Addr, SocketAddr};

pub(super) use serde_json::{json, Value};

pub(super) use super::*;
pub(super) use crate::config::Secret16;
pub(super) use crate::proto::helper::{self, Step};
pub(super) use crate::proto::local::{ConnId, LocalAction, Port};
pub(super) use crate::proto::state::State;
pub(super) use crate::time::{Duration, Instant};
pub(super) use crate::wire::crypto::Keys;
pub(super) use crate::wire::miio;

pub(super) const KEY: [u8; 16] = *b"YWJjZGVmZ2hpamts";

pub(super) const DID: u32 = 1234567;

pub(super) const CONF: &str =
    "did=1234567\nkey=YWJjZGVmZ2hpamts\nmac=aa:bb:cc:01:02:03\nvendor=acme\nmodel=acme.dev.v1\n";

pub(super) fn identity(provisioned: bool) -> Identity {
    Identity {
        did: DID,
        key: KEY,
        mac: "aa:bb:cc:01:02:03".into(),
        model: "acme.dev.v1".into(),
        vendor: "acme".into(),
        token: *b"ABCDEFGHIJKLMNOP",
        provisioned,
        ssid: "home".into(),
        fw_ver: Some("1.2.3_0001".into()),
        country: None,
    }
}

pub(super) fn node() -> Node {
    let mut c = CloudConfig::new(0, [0; 16], "", "", "", "");
    c.udp.host = "127.0.0.1".into();
    c.udp.explicit = true;
    c.udp.port = 8053;
    c.seed = 7;
    Node::new(
        Instant(0),
        NodeConfig {
            max_clients: 20,
            max_sleep: Duration::from_secs(3600),
            cloud: c,
            country_override: None,
            hosts_explicit: (true, false),
            helper: helper::Config::default(),
            mdns: None,
        },
        Secret16::new(*b"FreshToken012345"),
    )
}

/// The token step's files (L§9.3): `wifi.conf` there or not, `device.token` holding the test
/// token, and a fresh token equal to it, so the token is the test token whatever the node decides.
pub(super) fn token_files(wifi_conf: bool) -> TokenFiles {
    TokenFiles {
        wifi_conf,
        token: Ok(Some("ABCDEFGHIJKLMNOP".into())),
        fresh: Secret16::new(*b"ABCDEFGHIJKLMNOP"),
    }
}

/// Every action the node has queued, oldest first, none of them carried out.
pub(super) fn drain(n: &mut Node) -> Vec<Action> {
    std::iter::from_fn(|| n.poll_action()).collect()
}

/// Time moves to `now`: the node fires what is due, and [`serve`] plays the io side. Returns the
/// local-connection messages seen.
pub(super) fn advance(n: &mut Node, now: Instant) -> Vec<(ConnId, String)> {
    n.handle_timeout(now);
    serve(n, now)
}

/// Plays a cooperative cloud: answers resolve, connect, hello and every request. Returns the
/// local-connection messages seen.
pub(super) fn serve(n: &mut Node, now: Instant) -> Vec<(ConnId, String)> {
    serve_with(n, now, None, &mut Vec::new())
}

/// [`serve`], which also answers the file steps (L§9.5) from `conf` (a provisioned device with
/// the token `ABCDEFGHIJKLMNOP`) and appends every request the node sent to the cloud to `sent`.
pub(super) fn serve_with(
    n: &mut Node,
    now: Instant,
    conf: Option<&str>,
    sent: &mut Vec<Value>,
) -> Vec<(ConnId, String)> {
    let keys = Keys::new(&KEY);
    let mut out = Vec::new();
    while let Some(a) = n.poll_action() {
        match a {
            Action::LoadFiles(step) if conf.is_some() => match step {
                Step::Dinfo => {
                    let d = crate::config::device::parse(conf.unwrap_or_default());
                    n.file_dinfo(now, d, None)
                }
                Step::Token => n.file_token(now, token_files(true)),
                Step::WifiStatus => n.file_wifi(now, true, "home".into(), None),
                _ => {}
            },
            Action::WriteWifi(_) => n.wifi_written(now, true, None),
            Action::TokenFile(_) => n.token_written(now, Ok(())),
            Action::Resolve { attempt, .. } => {
                n.cloud_resolved(now, attempt, Ok(vec![Ipv4Addr::LOCALHOST]))
            }
            Action::Connect { .. } => n.cloud_connected(
                now,
                Netif {
                    ip: "127.0.0.1".into(),
                    mask: "255.0.0.0".into(),
                    gw: String::new(),
                },
                Ipv4Addr::LOCALHOST,
            ),
            Action::CloudSend(b) => {
                let Ok(p) = miio::Packet::new_checked(&b[..]) else {
                    continue;
                };
                if p.is_control() && p.ids_all_ff() {
                    n.cloud_datagram(now, &miio::time_sync_reply(1_700_000_000));
                } else if p.is_control() {
                    n.cloud_datagram(now, &b); // pong
                } else if let Ok(o) = miio::open(&keys, DID, &p) {
                    if o.value.contains_key("method") {
                        sent.push(Value::Object(o.value.clone()));
                    }
                    if let Some(id) = o.value.get("id") {
                        if let Some(m) = o.value.get("method") {
                            let ack = if m == "_otc.info" {
                                format!("{{\"id\":{id},\"result\":{{\"otc_list\":[]}}}}")
                            } else {
                                format!("{{\"id\":{id},\"result\":\"ok\"}}")
                            };
                            let pkt = miio::seal(&keys, DID, p.stamp(), ack.as_bytes());
                            n.cloud_datagram(now, &pkt);
                        }
                    }
                }
            }
            Action::Local(LocalAction::Send(c, t)) => out.push((c, t.to_string())),
            _ => {}
        }
    }
    out
}

pub(super) fn ask_suspend(n: &mut Node, now: Instant) -> u64 {
    n.local_value(
        now,
        1,
        br#"{"id":9527,"method":"local.prep_suspend","params":[]}"#,
    );
    let out = serve(n, now);
    let reply = out
        .iter()
        .find(|(_, t)| t.contains("resp_suspend"))
        .expect("resp_suspend");
    let v: Value = serde_json::from_str(&reply.1).unwrap();
    assert_eq!(v["id"], 9527);
    v["params"]["wakeup_time"].as_u64().unwrap()
}

/// Plays the reactor's file side: `wifi.conf` holds `file` (its ssid), or is absent (None).
/// Returns the other actions.
pub(super) fn files(n: &mut Node, now: Instant, file: Option<&str>) -> Vec<Action> {
    let mut other = Vec::new();
    while let Some(a) = n.poll_action() {
        match a {
            Action::LoadFiles(Step::Dinfo) => {
                let d = crate::config::device::parse(
                    "did=123456789\nkey=YWJjZGVmZ2hpamts\nmac=AA:BB:CC:01:02:03\nvendor=acme\nmodel=acme.dev.v1\n",
                );
                n.file_dinfo(now, d, None)
            }
            Action::LoadFiles(Step::Token) => n.file_token(now, token_files(file.is_some())),
            Action::TokenFile(_) => n.token_written(now, Ok(())),
            Action::LoadFiles(Step::WifiStatus) => {
                n.file_wifi(now, file.is_some(), file.unwrap_or("").into(), None)
            }
            Action::ReadSsid => n.file_ssid(file.unwrap_or("").into()),
            // The write succeeds; the caller still sees that it was asked for.
            Action::WriteWifi(w) => {
                other.push(Action::WriteWifi(w));
                n.wifi_written(now, true, None)
            }
            a => other.push(a),
        }
    }
    other
}

pub(super) fn info_ssid(n: &Node, now: Instant) -> Value {
    let info: Value = serde_json::from_str(&n.info(now).to_json()).unwrap();
    info["ap"]["ssid"].clone()
}
