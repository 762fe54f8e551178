//! Provisioning end to end (LOCAL_API.md §8, PROTOCOL.md §4.6): AP mode over the LAN, BLE on 54323
//! and QR on 54322, the failure paths, and what the log must never show.

mod common;
use common::*;
use serde_json::{json, Value};
use std::process::Command;
use std::time::Duration;

const T: Duration = Duration::from_secs(15);

struct Setup {
    d: Daemon,
    dir: TempDir,
    lan: u16,
    local: u16,
    ble: u16,
    cloud: Option<Lines>,
    _dead: Option<DeadPort>,
}

fn pycloud() -> Option<(Lines, u16)> {
    common::pycloud().map(|p| (p.cloud, p.port))
}

/// An unprovisioned device (AP mode) against the python cloud, or a dead port without one.
/// `lan`: a fixed LAN port (None: one of its own).
fn ap_device(tag: &str, lan: Option<u16>, with_cloud: bool) -> Option<Setup> {
    let dir = TempDir::new(tag);
    dir.write("device.conf", GOOD_DEVICE_CONF);
    let (cloud, dead, port) = if with_cloud {
        let (c, p) = pycloud()?;
        (Some(c), None, p)
    } else {
        let dead = DeadPort::new();
        let p = dead.port;
        (None, Some(dead), p)
    };
    let mut a = cloud_args(&dir, port).opt("--helper-grace", 0).build();
    if let Some(p) = lan {
        set_opt(&mut a, "--lan-port", p);
    }
    let d = Daemon::start(&dir, &a);
    assert!(d.wait_log("STATE_WIFI_AP_MODE", T), "{}", d.log_text());
    let (lan, local, ble) = (d.lan(), d.local(), d.ble());
    Some(Setup {
        d,
        dir,
        lan,
        local,
        ble,
        cloud,
        _dead: dead,
    })
}

fn ask(c: &mut LocalClient, id: u64, params: Value) -> Value {
    let m = json!({"id": id, "method": "local.ble.config_router", "params": params});
    c.send(&m.to_string());
    c.recv_until(T, |v| v["id"] == id).expect("reply")
}

#[test]
fn ble_and_qr_refuse_bad_parameters_and_write_nothing() {
    let s = ap_device("ble-bad", None, false).unwrap();
    let mut ble = LocalClient::connect(s.ble);
    let mut second = std::net::TcpStream::connect(("127.0.0.1", s.ble)).unwrap();
    // One BLE client only: the second is closed at once.
    second.set_read_timeout(Some(T)).unwrap();
    let mut b = [0u8; 16];
    assert_eq!(std::io::Read::read(&mut second, &mut b).unwrap_or(0), 0);
    let mut qr = LocalClient::connect(s.local);
    let cases = [
        (json!({"ssid": "s".repeat(33)}), "ssid too long."),
        (json!({"passwd": "x"}), "ssid not found."),
        (
            json!({"ssid": "a", "passwd": "p".repeat(65)}),
            "passwd too long.",
        ),
        (
            json!({"ssid": "a\nb"}),
            "illegal character in ssid or passwd.",
        ),
        (
            json!({"ssid": "a", "country_domain": "abcdefgh"}),
            "country domain too long: 8 >= 8",
        ),
        (
            json!({"ssid": "a", "tz": "../../etc/passwd"}),
            "illegal tz.",
        ),
        (json!("not an object"), "params not an object."),
    ];
    for (i, (params, reason)) in cases.iter().enumerate() {
        for (c, base) in [(&mut ble, 100u64), (&mut qr, 200u64)] {
            let r = ask(c, base + i as u64, params.clone());
            assert_eq!(r["error"]["code"], -33020, "{r}");
            assert_eq!(r["error"]["message"], *reason, "{r}");
        }
        assert!(
            !s.dir.join("wifi.conf").exists(),
            "{reason}: no file written"
        );
    }
    // The BLE client may send local.* only.
    ble.send(r#"{"id":9,"method":"props","params":{}}"#);
    let r = ble.recv_until(T, |v| v["id"] == 9).unwrap();
    assert_eq!(r["error"]["code"], -32601);
}

#[test]
fn a_second_request_while_one_runs_is_refused() {
    let s = ap_device("ble-busy", None, false).unwrap();
    // A helper is present (helper_ready), so wifi_start waits for its answer.
    let mut helper = LocalClient::connect(s.local);
    helper.send(r#"{"method":"_internal.helper_ready"}"#);
    assert!(s.d.wait_log("helper ready", T));
    let mut ble = LocalClient::connect(s.ble);
    let ok = ask(&mut ble, 1, json!({"ssid": "home", "passwd": "pw12345678"}));
    assert_eq!(ok["result"][0], "OK", "{ok}");
    let busy = ask(&mut ble, 2, json!({"ssid": "other"}));
    assert_eq!(
        busy["error"]["message"], "provisioning in progress.",
        "{busy}"
    );
    // The helper gets _internal.wifi_start with the credentials (after the identity request a
    // newly present helper is asked first, L§9.5); it reports a failure.
    let recv = || -> Value {
        let out = Command::new(BIN)
            .arg("miio_recv_line")
            .env("MIIO_LOCAL_PORT", s.local.to_string())
            .output()
            .unwrap();
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap()
    };
    let mut msg = recv();
    if msg["method"] == "_internal.request_dinfo" {
        let dinfo = format!(
            r#"{{"method":"_internal.response_dinfo","params":{{"did":{DID},"key":"{KEY}","vendor":"acme","mac":"AA:BB:CC:01:02:03","model":"acme.dev.v1"}}}}"#
        );
        helper.send(&dinfo);
        msg = recv();
    }
    assert_eq!(msg["method"], "_internal.wifi_start", "{msg}");
    assert_eq!(msg["params"]["ssid"], "home");
    assert_eq!(msg["params"]["uid"], "0");
    assert!(s.dir.join("wifi.conf").exists());
    let st = Command::new(BIN)
        .args([
            "miio_send_line",
            r#"{"method":"_internal.wifi_ap_mode","params":null}"#,
        ])
        .env("MIIO_LOCAL_PORT", s.local.to_string())
        .status()
        .unwrap();
    assert!(st.success());
    let f = ble.recv_until(T, |v| v["params"] == "wifi_failed");
    assert!(f.is_some(), "wifi_failed broadcast to the BLE client");
    assert!(
        wait_until(T, || !s.dir.join("wifi.conf").exists()),
        "a failed provisioning leaves no wifi.conf"
    );
    assert!(ble
        .recv_until(T, |v| v["params"] == "wifi_ap_mode")
        .is_some());
    assert!(s.d.log_text().contains("STATE_WIFI_AP_MODE"));
}

#[test]
fn ap_quick_connect_over_the_lan_reaches_the_cloud_with_uid_and_bindkey() {
    let _lock = PortLock::take(54321);
    let Some(s) = ap_device("ap-lan", Some(54321), true) else {
        return;
    };
    let cloud = s.cloud.as_ref().unwrap();
    let token: [u8; 16] = std::fs::read(s.dir.join("device.token"))
        .unwrap()
        .try_into()
        .expect("16-byte token");
    let mut watcher = LocalClient::connect(s.local);
    watcher.send(r#"{"id":1,"method":"local.query_status"}"#);
    assert!(watcher.recv(T).is_some());
    let params = json!({"ssid": "home-net", "passwd": "s3cret-pass", "uid": 987654, "bind_key": "BK-zz-11", "country_domain": "", "tz": "Europe/Berlin"});
    if python_has("miio") {
        // python-miio as the phone: the token comes from the AP-mode hello.
        let hex: String = token.iter().map(|b| format!("{b:02x}")).collect();
        let script = format!(
            "import json, miio\nd = miio.Device('127.0.0.1', '{hex}', timeout=5)\nprint(json.dumps(d.send('miIO.config_router', {params})), flush=True)\n"
        );
        let py = Lines::spawn({
            let mut c = Command::new(python());
            c.args(["-c", &script]);
            c
        });
        assert!(py.wait(T, |v| v[0] == "OK").is_some(), "{:?}", py.all());
    } else {
        skip("python-miio");
        let phone = Phone::new(s.lan, &token);
        let r = phone
            .call(
                5,
                &json!({"id": 7, "method": "miIO.config_router", "params": params}).to_string(),
                T,
            )
            .unwrap();
        assert_eq!(r["result"][0], "OK");
    }
    for ev in ["wifi_connecting", "wifi_connected", "cloud_connected"] {
        assert!(
            watcher.recv_until(T, |v| v["params"] == ev).is_some(),
            "{ev}: {}",
            s.d.log_text()
        );
    }
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(s.dir.join("wifi.conf")).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let conf = std::fs::read_to_string(s.dir.join("wifi.conf")).unwrap();
    assert!(
        conf.contains("ssid=\"home-net\"") && conf.contains("uid=987654"),
        "{conf}"
    );
    let info = cloud
        .wait(T, |v| {
            v["ev"] == "msg" && v["json"]["method"] == "_otc.info"
        })
        .unwrap();
    assert_eq!(info["json"]["params"]["uid"], "987654", "{info}");
    assert_eq!(info["json"]["params"]["bindkey"], "BK-zz-11", "{info}");
    // After provisioning the hello no longer reveals the token (D7).
    let phone = Phone::new(s.lan, &token);
    let r = phone.hello().unwrap();
    assert_eq!(&r[16..32], &[0xff; 16]);
    // Secrets never appear in the log at the default level.
    let log = s.d.log_text();
    let tok = String::from_utf8_lossy(&token).into_owned();
    for secret in ["s3cret-pass", "BK-zz-11", tok.as_str(), KEY] {
        assert!(!log.contains(secret), "{secret} in the log:\n{log}");
    }
}

#[test]
fn router_password_change_that_fails_restores_the_old_wifi_conf() {
    let dir = provisioned_dir("sta-change");
    let old = std::fs::read_to_string(dir.join("wifi.conf")).unwrap();
    let dead = DeadPort::new();
    let a = cloud_args(&dir, dead.port).opt("--helper-grace", 0).build();
    let d = Daemon::start(&dir, &a);
    let (lan, local) = (d.lan(), d.local());
    assert!(d.wait_log("STATE_WIFI_STA_MODE", T), "{}", d.log_text());
    let mut helper = LocalClient::connect(local);
    helper.send(r#"{"method":"_internal.helper_ready"}"#);
    assert!(d.wait_log("helper ready", T));
    let phone = Phone::new(lan, TOKEN);
    let r = phone
        .call(
            9,
            r#"{"id":3,"method":"miIO.config_router","params":{"ssid":"home","passwd":"newpass99"}}"#,
            T,
        )
        .expect("reply");
    assert_eq!(r["result"][0], "OK", "{r}");
    assert!(wait_until(T, || std::fs::read_to_string(
        dir.join("wifi.conf")
    )
    .unwrap_or_default()
    .contains("newpass99")));
    let st = Command::new(BIN)
        .args([
            "miio_send_line",
            r#"{"method":"_internal.wifi_ap_mode","params":null}"#,
        ])
        .env("MIIO_LOCAL_PORT", local.to_string())
        .status()
        .unwrap();
    assert!(st.success());
    assert!(
        wait_until(T, || std::fs::read_to_string(dir.join("wifi.conf"))
            .unwrap_or_default()
            == old),
        "the old wifi.conf is back: {}",
        d.log_text()
    );
    assert!(d.wait_log("wifi_failed", T));
    // Back on the old network: a state change after the failure (it may be logged later).
    let back = wait_until(T, || {
        let log = d.log_text();
        let after = &log[log.rfind("wifi_failed").unwrap()..];
        after.contains("STATE_WIFI_STA_MODE") || after.contains("STATE_CLOUD")
    });
    assert!(back, "{}", d.log_text());
}

#[test]
fn local_listeners_are_on_loopback_only() {
    let s = ap_device("ss", None, false).unwrap();
    let Ok(out) = Command::new("ss").args(["-lntuH"]).output() else {
        skip("ss (iproute2)");
        return;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    for port in [s.local, s.ble] {
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.contains(&format!(":{port} ")))
            .collect();
        assert!(!lines.is_empty(), "{port} listening:\n{text}");
        for l in lines {
            assert!(l.contains(&format!("127.0.0.1:{port}")), "{l}");
        }
    }
    assert!(
        text.contains(&format!("0.0.0.0:{}", s.lan)),
        "the LAN port is open to the LAN"
    );
}
