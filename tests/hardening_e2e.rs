//! End to end checks of the hardening issue: valid JSON that serde cannot hold is forwarded byte for
//! byte on all three entry points (P§3, L§4.1), cloud ids stay unique across cloud sessions of one
//! run (P§5.7 D5, D12), and a provisioning whose wifi.conf cannot be written is refused (L§8).

mod common;
use common::*;
use miio_client::wire::json_stream::Splitter;
use miio_client::wire::miio;
use serde_json::Value;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(15);

/// A provisioned daemon against a cloud on 127.0.0.1:`cloud` (UDP).
fn udp_args(dir: &TempDir, cloud: u16) -> Vec<String> {
    cloud_args(dir, cloud).link("udp").build()
}

/// A 54322 client that keeps the raw text of each message: some messages here hold numbers that
/// no serde `Value` (the test client's own parser included) can represent.
struct Raw {
    s: TcpStream,
    split: Splitter,
}

impl Raw {
    fn connect(port: u16) -> Raw {
        Raw {
            s: LocalClient::connect(port).stream,
            split: Splitter::new(1 << 20),
        }
    }

    fn send(&mut self, text: &str) {
        self.s.write_all(text.as_bytes()).unwrap();
    }

    /// The next complete message as text, or None at the deadline or EOF.
    fn next(&mut self, limit: Duration) -> Option<String> {
        let end = Instant::now() + limit;
        loop {
            if let Some(v) = self.split.next() {
                return Some(String::from_utf8(v.ok()?).unwrap());
            }
            if Instant::now() >= end {
                return None;
            }
            let mut b = [0u8; 4096];
            match self.s.read(&mut b) {
                Ok(0) => return None,
                Ok(n) => self.split.push(&b[..n]),
                Err(_) => {}
            }
        }
    }

    /// Reads until a message satisfies `pred`; returns it.
    fn until(&mut self, limit: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        let end = Instant::now() + limit;
        while let Some(m) = self.next(end.saturating_duration_since(Instant::now())) {
            if pred(&m) {
                return Some(m);
            }
        }
        None
    }
}

// ---- item 6: valid JSON that serde rejects ------------------------------------------------------

/// 54322: an id of 400 digits is -32600 with the id as sent and the connection stays open (L§4.1);
/// `1e400` in params goes to the cloud byte for byte and is acked.
#[test]
fn local_valid_json_beyond_serde_is_answered_and_forwarded() {
    let Some(py) = pycloud() else { return };
    let dir = provisioned_dir("hard-local-json");
    let d = Daemon::start(&dir, &udp_args(&dir, py.port));
    let local = d.local();
    assert!(d.wait_log("STATE_CLOUD_CONNECTED", T), "{}", d.log_text());

    let mut c = Raw::connect(local);
    let big = "9".repeat(400);
    c.send(&format!(r#"{{"id":{big},"method":"props","params":{{}}}}"#));
    let want = format!(r#"{{"id":{big},"error":{{"code":-32600,"message":"Invalid Request"}}}}"#);
    let got = c.until(T, |m| m.contains("error"));
    assert_eq!(got.as_deref(), Some(want.as_str()), "{}", d.log_text());

    // The same connection: a number beyond f64 in params is forwarded verbatim.
    c.send(r#"{"id":8,"method":"props","params":{"x":1e400,"y":[-2E+999]}}"#);
    let ack = c.until(T, |m| m.starts_with(r#"{"id":8,"#));
    assert_eq!(
        ack.as_deref(),
        Some(r#"{"id":8,"result":"ok"}"#),
        "{}",
        d.log_text()
    );
    // The Python cloud prints the raw text inside a JSON string (quotes escaped).
    let seen = wait_until(T, || {
        py.cloud
            .all()
            .iter()
            .any(|l| l.contains(r#"\"params\":{\"x\":1e400,\"y\":[-2E+999]}"#))
    });
    assert!(seen, "{:?}", py.cloud.all());
}

/// Cloud → local → cloud: a command with `1e400` reaches the local client verbatim, and its reply
/// with `1e400` goes back up verbatim (P§5.8).
#[test]
fn cloud_command_beyond_serde_is_forwarded_verbatim() {
    let Some(mut py) = pycloud() else { return };
    let dir = provisioned_dir("hard-cloud-json");
    let d = Daemon::start(&dir, &udp_args(&dir, py.port));
    let local = d.local();
    assert!(d.wait_log("STATE_CLOUD_CONNECTED", T), "{}", d.log_text());
    let mut c = Raw::connect(local);
    c.send(r#"{"id":1,"method":"local.query_status"}"#);
    assert!(c.until(T, |m| m.starts_with(r#"{"id":1,"#)).is_some());

    let cmd = r#"{"id":77,"method":"get_prop","params":[1e400,"\ud800"]}"#;
    py.cloud.send(&format!(
        r#"{{"cmd":"send","did":{DID},"text":{}}}"#,
        Value::from(cmd)
    ));
    let got = c.until(T, |m| m.contains("get_prop"));
    assert_eq!(got.as_deref(), Some(cmd), "{}", d.log_text());
    c.send(r#"{"id":77,"result":[1e400]}"#);
    let seen = wait_until(T, || {
        py.cloud
            .all()
            .iter()
            .any(|l| l.contains(r#""raw":"{\"id\":77,\"result\":[1e400]}""#))
    });
    assert!(seen, "{:?}", py.cloud.all());
}

/// LAN 54321: a phone's command with `1e400` reaches the local client with only its id rewritten
/// (D7), and the reply reaches the phone with the phone's id restored.
#[test]
fn lan_command_beyond_serde_is_forwarded_verbatim() {
    let dir = provisioned_dir("hard-lan-json");
    let cloud = DeadPort::new();
    let d = Daemon::start(&dir, &cloud_args(&dir, cloud.port).build());
    let (lan, local) = (d.lan(), d.local());
    assert!(d.wait_log("STATE_WIFI", T), "{}", d.log_text());
    let mut c = Raw::connect(local);
    c.send(r#"{"id":1,"method":"local.query_status"}"#);
    assert!(c.until(T, |m| m.starts_with(r#"{"id":1,"#)).is_some());

    let phone = Phone::new(lan, TOKEN);
    assert!(phone.hello().is_some());
    phone.raw(&phone.packet(
        200,
        r#"{"id":42,"method":"get_prop","params":[1e400,123456789012345678901234567890]}"#,
    ));
    let cmd = c
        .until(T, |m| m.contains("get_prop"))
        .unwrap_or_else(|| panic!("no command at the local client\n{}", d.log_text()));
    let local_id = miio_client::wire::rpc::parse_object(cmd.as_bytes()).unwrap()["id"]
        .as_u64()
        .expect("a u32 local id");
    assert_eq!(
        cmd,
        format!(
            r#"{{"id":{local_id},"method":"get_prop","params":[1e400,123456789012345678901234567890]}}"#
        )
    );
    c.send(&format!(r#"{{"id":{local_id},"result":[1e400]}}"#));
    let r = phone.recv(T).expect("reply at the phone");
    let o = miio::decode(&phone.keys, DID as u32, &r).unwrap();
    assert_eq!(o.text, r#"{"id":42,"result":[1e400]}"#);
}

// ---- item 5: ids unique across cloud sessions -----------------------------------------------------

/// A router password change (L§8, QR path on 54322, no helper: D9) starts a new cloud session in
/// the same run: the cloud must see new ids (P§5.7 D5) and no second `ota_state idle` (D12).
#[test]
fn new_cloud_session_in_a_run_uses_new_ids() {
    let Some(py) = pycloud() else { return };
    let dir = provisioned_dir("hard-ids");
    let d = Daemon::start(&dir, &udp_args(&dir, py.port));
    let local = d.local();
    assert!(d.wait_log("STATE_CLOUD_CONNECTED", T), "{}", d.log_text());
    let msgs = |method: &'static str| {
        move |c: &Lines| -> Vec<Value> {
            c.json()
                .into_iter()
                .filter(|v| v["ev"] == "msg" && v["json"]["method"] == method)
                .collect()
        }
    };
    let (infos, idles) = (msgs("_otc.info"), msgs("props"));
    assert!(wait_until(T, || idles(&py.cloud).len() == 1));

    let mut c = LocalClient::connect(local);
    c.send(r#"{"id":5,"method":"local.ble.config_router","params":{"ssid":"new","passwd":"pw12345678","uid":"42"}}"#);
    let r = c
        .recv_until(T, |v| v["id"] == 5)
        .expect("config_router reply");
    assert_eq!(r["result"][0], "OK", "{r}");
    let again = || d.log_text().matches("STATE_CLOUD_CONNECTED").count() >= 2;
    assert!(wait_until(T, again), "{}", d.log_text());
    // An upstream request of the new session, after its session messages.
    c.send(r#"{"id":6,"method":"props","params":{"power":"on"}}"#);
    assert!(c.recv_until(T, |v| v["id"] == 6).is_some());
    assert!(wait_until(T, || idles(&py.cloud).len() >= 2));

    let info = infos(&py.cloud);
    assert_eq!(info.len(), 2, "{info:?}");
    assert_eq!(info[1]["json"]["params"]["uid"], "42");
    let props = idles(&py.cloud);
    let idle: Vec<&Value> = props
        .iter()
        .filter(|v| v["json"]["params"]["ota_state"] == "idle")
        .collect();
    assert_eq!(idle.len(), 1, "D12: once per start: {props:?}");
    let mut ids: Vec<u64> = info
        .iter()
        .chain(&props)
        .map(|v| v["json"]["id"].as_u64().unwrap())
        .collect();
    let n = ids.len();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), n, "an id went up twice: {info:?} {props:?}");
}

// ---- item 4: provisioning that cannot write wifi.conf ---------------------------------------------

/// Starts the daemon (`-L <logdir>/miio.log` plus `args`) in a private mount namespace after the
/// shell commands `setup` ran there: a read-only bind mount or a full tmpfs over the data dir, which
/// chmod cannot give a root CI. None, with a visible skip, without root or unshare.
fn start_in_namespace(setup: &str, logdir: &TempDir, args: &[String]) -> Option<Daemon> {
    let usable = Command::new("unshare")
        .args(["-m", "sh", "-c", "mount -t tmpfs tmpfs /mnt"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !usable {
        skip("root for mount namespace");
        return None;
    }
    let script = format!("{setup} && exec \"$0\" \"$@\"");
    Some(Daemon::start_via(
        &["unshare", "-m", "sh", "-c", &script],
        logdir,
        args,
    ))
}

/// AP mode on a read-only data dir: the daemon still reaches AP mode (the token it cannot store is
/// used from memory), and a phone's `miIO.config_router` gets `["ERROR"]` (L§8) with nothing else
/// done: no `wifi_connecting`, no state change, no wifi.conf.
#[test]
fn read_only_data_dir_refuses_lan_provisioning() {
    let dir = TempDir::new("hard-ro");
    dir.write("device.conf", GOOD_DEVICE_CONF);
    dir.write("device.token", "ABCDEFGHIJKLMNOP");
    let logdir = TempDir::new("hard-ro-log");
    let a = base_args(&dir);
    let d_path = dir.path().display().to_string();
    let setup = format!("mount --bind {d_path} {d_path} && mount -o remount,bind,ro {d_path}");
    let Some(d) = start_in_namespace(&setup, &logdir, &a) else {
        return;
    };
    let (lan, local) = (d.lan(), d.local());
    assert!(d.wait_log("STATE_WIFI_AP_MODE", T), "{}", d.log_text());
    let mut c = LocalClient::connect(local);
    c.send(r#"{"id":1,"method":"local.query_status"}"#);
    assert!(c.recv_until(T, |v| v["id"] == 1).is_some());

    let hello = Phone::new(lan, TOKEN).hello().expect("hello reply");
    let token: [u8; 16] = hello[16..32].try_into().unwrap();
    assert_ne!(token, [0xff; 16], "AP mode hands out the token");
    let phone = Phone::new(lan, &token);
    let r = phone
        .call(
            300,
            r#"{"id":9,"method":"miIO.config_router","params":{"ssid":"home","passwd":"pw12345678","uid":"42"}}"#,
            T,
        )
        .unwrap_or_else(|| panic!("config_router answered\n{}", d.log_text()));
    assert_eq!(
        r["result"],
        serde_json::json!(["ERROR"]),
        "{}",
        d.log_text()
    );
    // Still in AP mode: local.query_status says so. Its answer is also the barrier after which
    // the log holds everything the refusal did.
    c.send(r#"{"id":2,"method":"local.query_status"}"#);
    let s = c.recv_until(T, |v| v["id"] == 2).expect("status");
    assert_eq!(s["params"], "wifi_ap_mode", "{s}");
    let log = d.log_text();
    assert!(
        log.contains("Read-only file system"),
        "the errno is logged: {log}"
    );
    assert!(log.contains("cannot write wifi.conf"), "{log}");
    assert!(!log.contains("wifi_connecting"), "{log}");
    assert!(!dir.join("wifi.conf").exists());
    let last_state = log.lines().rfind(|l| l.contains("STATE:"));
    assert!(
        last_state.is_some_and(|l| l.ends_with("STATE_WIFI_AP_MODE")),
        "{log}"
    );
}

/// STA mode on a full data dir (a tmpfs with no space left): a router password change on 54322 (QR
/// path) gets -33020 `cannot write wifi.conf`, the errno is logged, the cloud session stays, no
/// `_otc.info` with the uid goes up, and the old wifi.conf is intact.
#[test]
fn full_data_dir_refuses_qr_provisioning() {
    let Some(py) = pycloud() else { return };
    let src = provisioned_dir("hard-full-src");
    let data = TempDir::new("hard-full");
    let logdir = TempDir::new("hard-full-log");
    let mut a = udp_args(&data, py.port);
    let (s, d_path) = (src.path().display(), data.path().display());
    // Four pages: the three files take three, the filler the last one.
    let setup = format!(
        "mount -t tmpfs -o size=16k tmpfs {d_path} && cp {s}/device.conf {s}/device.token {s}/wifi.conf {d_path}/ \
         && {{ dd if=/dev/zero of={d_path}/fill bs=1k 2>/dev/null; true; }}"
    );
    set_opt(&mut a, "-d", data.dir_arg());
    let Some(d) = start_in_namespace(&setup, &logdir, &a) else {
        return;
    };
    let local = d.local();
    assert!(d.wait_log("STATE_CLOUD_CONNECTED", T), "{}", d.log_text());
    let infos = || {
        py.cloud
            .json()
            .into_iter()
            .filter(|v| v["ev"] == "msg" && v["json"]["method"] == "_otc.info")
            .count()
    };
    assert!(wait_until(T, || infos() == 1));

    let mut c = LocalClient::connect(local);
    c.send(r#"{"id":5,"method":"local.ble.config_router","params":{"ssid":"new","passwd":"pw12345678","uid":"42"}}"#);
    let r = c
        .recv_until(T, |v| v["id"] == 5)
        .expect("config_router reply");
    assert_eq!(
        r,
        serde_json::json!({"id":5,"error":{"code":-33020,"message":"cannot write wifi.conf"}}),
        "{}",
        d.log_text()
    );
    // The session is the same: an upstream request is acked at once, no new _otc.info.
    c.send(r#"{"id":6,"method":"props","params":{"power":"on"}}"#);
    let ack = c.recv_until(T, |v| v["id"] == 6).expect("ack");
    assert_eq!(ack["result"], "ok", "{ack}");
    // Barrier: the cloud's event for that request is in, so any _otc.info before it is too.
    let seen6 = || {
        py.cloud.json().iter().any(|v| {
            v["ev"] == "msg"
                && v["json"]["method"] == "props"
                && v["json"]["params"]["power"] == "on"
        })
    };
    assert!(wait_until(T, seen6), "{:?}", py.cloud.all());
    let log = d.log_text();
    assert!(
        log.contains("No space left on device"),
        "the errno is logged: {log}"
    );
    assert!(!log.contains("wifi_connecting"), "{log}");
    assert_eq!(log.matches("STATE_CLOUD_CONNECTED").count(), 1, "{log}");
    assert_eq!(infos(), 1);
    // The daemon's view of its data dir (its mount namespace): the old wifi.conf, no temp file.
    let root = format!("/proc/{}/root{}", d.child.id(), d_path);
    let wifi = read_file(std::path::Path::new(&format!("{root}/wifi.conf")));
    assert_eq!(wifi, read_file(&src.join("wifi.conf")));
    let names: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!names.iter().any(|n| n.contains(".tmp")), "{names:?}");
}
