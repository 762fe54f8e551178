//! The helper protocol end to end (LOCAL_API.md §9): the shipped helper script under BusyBox sh
//! drives the real daemon from device_init to cloud_connected through miio_recv_line and
//! miio_send_line; without any helper, the data files take over after the grace period.

mod common;
use common::*;
use std::process::{Command, Stdio};
use std::time::Duration;

const T: Duration = Duration::from_secs(20);

fn pycloud() -> Option<(Lines, u16)> {
    common::pycloud().map(|p| (p.cloud, p.port))
}

fn args(dir: &TempDir, cloud: u16, grace: &str) -> Vec<String> {
    cloud_args(dir, cloud)
        .opt("--helper-grace", grace)
        .opt("-l", 3)
        .build()
}

#[test]
fn shipped_helper_under_busybox_drives_the_start_up() {
    if Command::new("busybox").arg("true").status().is_err() {
        skip("busybox");
        return;
    }
    let Some((cloud, port)) = pycloud() else {
        return;
    };
    let dir = provisioned_dir("helper-sh");
    dir.write("os-release", "ACME_VERSION=\"1.2.3_0042\"\n");
    // The line tools are applets of the one binary: links named after them.
    let bin = TempDir::new("helper-bin");
    for a in ["miio_recv_line", "miio_send_line"] {
        std::os::unix::fs::symlink(BIN, bin.join(a)).unwrap();
    }
    // A grace far longer than the test: only the helper can bring the daemon on.
    let a = args(&dir, port, "60");
    let d = Daemon::start(&dir, &a);
    let local = d.local();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/etc/miio/miio_client_helper.sh"
    );
    let helper_log = dir.join("helper.log");
    let mut helper = Command::new("busybox")
        .args(["sh", script])
        .env("MIIO_BIN_DIR", bin.path())
        .env("MIIO_LOCAL_PORT", local.to_string())
        .env("MIIO_DATADIR", dir.dir_arg())
        .env("MIIO_OS_RELEASE", dir.join("os-release"))
        .env("MIIO_WIFI_START", "/bin/true")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&helper_log).unwrap())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("busybox sh");
    let ok = d.wait_log("STATE_CLOUD_CONNECTED", T);
    let _ = helper.kill();
    let _ = helper.wait();
    let log = d.log_text();
    assert!(
        ok,
        "daemon log:\n{log}\nhelper log:\n{}",
        read_file(&helper_log)
    );
    assert!(
        !log.contains("using data files"),
        "the helper, not the files: {log}"
    );
    // _otc.info carries what the helper answered (fw_ver from os-release via _internal.info).
    let info = cloud
        .wait(T, |v| {
            v["ev"] == "msg" && v["json"]["method"] == "_otc.info"
        })
        .expect("_otc.info");
    assert_eq!(info["json"]["params"]["fw_ver"], "1.2.3_0042", "{info}");
    assert_eq!(
        info["json"]["params"]["token"],
        "4142434445464748494a4b4c4d4e4f50"
    );
}

/// `[YYYYmmdd HH:MM:SS]` of the first log line containing `needle`, in seconds of the day.
fn stamp_of(log: &str, needle: &str) -> Option<u32> {
    let line = log.lines().find(|l| l.contains(needle))?;
    let t = line.get(10..18)?;
    let mut it = t.split(':').map(|x| x.parse::<u32>().ok());
    Some(it.next()?? * 3600 + it.next()?? * 60 + it.next()??)
}

#[test]
fn without_a_helper_the_files_take_over_after_the_grace() {
    let Some((_cloud, port)) = pycloud() else {
        return;
    };
    let dir = provisioned_dir("nohelper");
    let a = args(&dir, port, "1");
    let d = Daemon::start(&dir, &a);
    assert!(d.wait_log("STATE_CLOUD_CONNECTED", T), "{}", d.log_text());
    let log = d.log_text();
    assert!(log.contains("No helper script? using data files"), "{log}");
    // The files take over at the grace (1 s), read off the daemon's own log (1 s resolution,
    // and 1 s of slack for a loaded machine). What the cloud takes after that is not measured.
    let start = stamp_of(&log, "starting").unwrap();
    let files = stamp_of(&log, "using data files").unwrap();
    assert!((files + 86_400 - start) % 86_400 <= 3, "{log}");
}

#[test]
fn helper_hello_connection_gets_one_message_then_eof() {
    let dir = provisioned_dir("hello-eof");
    let dead = DeadPort::new();
    let a = args(&dir, dead.port, "60");
    // Start returns once the listeners are bound.
    let d = Daemon::start(&dir, &a);
    let local = d.local();
    let out = Command::new(BIN)
        .arg("miio_recv_line")
        .env("MIIO_LOCAL_PORT", local.to_string())
        .output()
        .expect("miio_recv_line");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    let msg: serde_json::Value = serde_json::from_str(text.trim()).expect("one JSON line");
    assert_eq!(msg["method"], "_internal.request_dinfo");
    assert_eq!(msg["params"], dir.dir_arg());
    // A valid answer through miio_send_line moves the daemon on to the token request.
    let dinfo = format!(
        r#"{{"method":"_internal.response_dinfo","params":{{"did":{DID},"key":"{KEY}","vendor":"acme","mac":"AA:BB:CC:01:02:03","model":"acme.dev.v1"}}}}"#
    );
    let st = Command::new(BIN)
        .args(["miio_send_line", &dinfo])
        .env("MIIO_LOCAL_PORT", local.to_string())
        .status()
        .unwrap();
    assert!(st.success());
    let out = Command::new(BIN)
        .arg("miio_recv_line")
        .env("MIIO_LOCAL_PORT", local.to_string())
        .output()
        .unwrap();
    let msg: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
    assert_eq!(msg["method"], "_internal.request_dtoken");
    assert_eq!(msg["params"]["dir"], dir.dir_arg());
    assert_eq!(msg["params"]["ntoken"].as_str().unwrap().len(), 16);
}

/// The whole AP quick connect driven by the shipped helper under BusyBox sh, with a stub
/// wifi_start.sh that succeeds, or fails every time (then 5 tries, `wifi_failed`, AP mode again).
fn quick_connect(stub_exit: i32) {
    if Command::new("busybox").arg("true").status().is_err() {
        skip("busybox");
        return;
    }
    let Some((_cloud, port)) = pycloud() else {
        return;
    };
    let dir = TempDir::new(&format!("qc-{stub_exit}"));
    dir.write("device.conf", GOOD_DEVICE_CONF);
    let runs = dir.join("wifi_start.runs");
    let stub = dir.join("wifi_start.sh");
    std::fs::write(
        &stub,
        format!(
            "#!/bin/sh\necho \"run $*\" >> '{}'\nexit {stub_exit}\n",
            runs.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&stub, std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = TempDir::new("qc-bin");
    for a in ["miio_recv_line", "miio_send_line"] {
        std::os::unix::fs::symlink(BIN, bin.join(a)).unwrap();
    }
    let a = args(&dir, port, "60");
    let d = Daemon::start(&dir, &a);
    let local = d.local();
    let mut helper = Command::new("busybox")
        .args([
            "sh",
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/etc/miio/miio_client_helper.sh"
            ),
        ])
        .env("MIIO_BIN_DIR", bin.path())
        .env("MIIO_LOCAL_PORT", local.to_string())
        .env("MIIO_DATADIR", dir.dir_arg())
        .env("MIIO_WIFI_START", &stub)
        .env("MIIO_WIFI_PAUSE", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    assert!(d.wait_log("STATE_WIFI_AP_MODE", T), "{}", d.log_text());
    let mut app = LocalClient::connect(local);
    app.send(r#"{"id":1,"method":"local.ble.config_router","params":{"ssid":"home","passwd":"pw12345678","uid":"77"}}"#);
    // The reply comes first, then the broadcasts (L§8: "after the reply the daemon ...").
    let ok = app.recv(T);
    let mut seen = Vec::new();
    let wanted: &[&str] = if stub_exit == 0 {
        &["wifi_connecting", "wifi_connected", "cloud_connected"]
    } else {
        &["wifi_connecting", "wifi_failed", "wifi_ap_mode"]
    };
    for ev in wanted {
        let got = app.recv_until(Duration::from_secs(30), |v| v["params"] == *ev);
        seen.push((ev, got.is_some()));
    }
    let _ = helper.kill();
    let _ = helper.wait();
    assert_eq!(
        ok.as_ref().map(|v| v["id"].clone()),
        Some(1.into()),
        "{ok:?}"
    );
    assert_eq!(ok.map(|v| v["result"][0].clone()), Some("OK".into()));
    assert!(seen.iter().all(|(_, s)| *s), "{seen:?}\n{}", d.log_text());
    let n = read_file(&runs).lines().count();
    if stub_exit == 0 {
        assert!(n >= 1);
        assert!(dir.join("wifi.conf").exists());
    } else {
        assert!(n >= 5, "5 tries before giving up, saw {n}");
        assert!(
            !dir.join("wifi.conf").exists(),
            "no wifi.conf after a failure"
        );
    }
}

#[test]
fn ap_quick_connect_by_the_shipped_helper() {
    quick_connect(0);
}

#[test]
fn ap_quick_connect_failure_returns_to_ap_mode() {
    quick_connect(1);
}
