//! The real binary: command line, data-file errors, signals and ports (LOCAL_API.md §2, §9.5, §18).

mod common;
use common::*;
use std::process::{Command, Stdio};
use std::time::Duration;

const T: Duration = Duration::from_secs(10);

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn help_and_version_print_on_stderr_and_exit_1() {
    let (code, out, err) = run(&["-h"]);
    assert_eq!(code, 1);
    assert!(out.is_empty());
    assert!(err.contains("Usage: miio_client"), "{err}");
    let (code, out, err) = run(&["-v"]);
    assert_eq!(code, 1);
    assert!(out.is_empty());
    assert!(err.starts_with("miio-client "), "{err}");
    // The features built in, in a fixed order (this test binary is built with the same ones).
    let mut want = Vec::new();
    if cfg!(feature = "agent") {
        want.push("agent");
    }
    if cfg!(feature = "mqtt") {
        want.push("mqtt");
    }
    if cfg!(feature = "ota") {
        want.push("ota");
    }
    if cfg!(feature = "fakecloud") {
        want.push("fakecloud");
    }
    let want = if want.is_empty() {
        "none".to_string()
    } else {
        want.join(" ")
    };
    assert!(
        err.trim_end().ends_with(&format!("(features: {want})")),
        "{err}"
    );
}

#[test]
fn unknown_option_and_c_with_h_exit_1_with_usage() {
    let (code, _, err) = run(&["--no-such-option"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("unknown option") && err.contains("Usage:"),
        "{err}"
    );
    let (code, _, err) = run(&["-C", "de", "-H", "127.0.0.1"]);
    assert_eq!(code, 1);
    assert!(err.contains("-C and -H"), "{err}");
}

#[test]
fn multicall_by_first_argument_and_unknown_applet() {
    let (code, _, err) = run(&["miio_client", "-v"]);
    assert_eq!(code, 1);
    assert!(err.starts_with("miio-client "), "{err}");
    let (code, out, _) = run(&["--list-applets"]);
    assert_eq!(code, 0);
    assert!(out.lines().any(|l| l == "miio_client"), "{out}");
}

#[test]
fn bad_device_conf_keeps_daemon_up_and_sighup_brings_it_on() {
    let dir = TempDir::new("badconf");
    dir.write(
        "device.conf",
        "did=123456789\nkey=short\nmac=AA:BB:CC:01:02:03\nmodel=acme.dev.v1\n",
    );
    let args = base_args(&dir);
    let mut d = Daemon::start(&dir, &args);
    assert!(d.wait_log("device.conf:2:", T), "log: {}", d.log_text());
    let log = d.log_text();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("device.conf:")).collect();
    assert_eq!(lines.len(), 1, "one clear line: {log}");
    assert!(lines[0].contains("[E]"), "{log}");
    assert!(
        !log.contains("short"),
        "the key value must not be logged: {log}"
    );
    assert!(d.is_running());
    assert!(!log.contains("STATE_TOKEN_DONE"));

    dir.write("device.conf", GOOD_DEVICE_CONF);
    d.signal("HUP");
    assert!(d.wait_log("STATE_WIFI_AP_MODE", T), "log: {}", d.log_text());
    // No wifi.conf: a fresh token was stored with mode 0600.
    let meta = std::fs::metadata(dir.join("device.token")).expect("token written");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    d.signal("TERM");
    assert_eq!(d.wait_exit(T), Some(0));
}

#[test]
fn provisioned_device_reaches_sta_mode_and_sigterm_exits_0() {
    let dir = TempDir::new("sta");
    dir.write("device.conf", GOOD_DEVICE_CONF);
    dir.write("device.token", "ABCDEFGHIJKLMNOP");
    dir.write(
        "wifi.conf",
        "ssid=\"home\"\npsk=\"secretpw\"\nkey_mgmt=WPA\n",
    );
    let args = base_args(&dir);
    let mut d = Daemon::start(&dir, &args);
    assert!(
        d.wait_log("STATE: (4) -> STATE_WIFI_STA_MODE", T),
        "log: {}",
        d.log_text()
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("device.token")).unwrap(),
        "ABCDEFGHIJKLMNOP"
    );
    let log = d.log_text();
    assert!(
        !log.contains("secretpw") && !log.contains("ABCDEFGHIJKLMNOP"),
        "{log}"
    );
    d.signal("INT");
    assert_eq!(d.wait_exit(T), Some(0));
}

#[test]
fn port_in_use_gives_the_vendor_message_and_exit_1() {
    let dir = TempDir::new("busy");
    dir.write("device.conf", GOOD_DEVICE_CONF);
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port().to_string();
    let mut args = base_args(&dir);
    set_opt(&mut args, "--local-port", port);
    // The other ports are still AUTO here: give them numbers (a clash on one of them would end
    // the same way, which is what this test asserts anyway).
    let args: Vec<String> = args
        .into_iter()
        .map(|a| if a == AUTO { "0".into() } else { a })
        .collect();
    let mut d = Daemon::spawn(&dir, &args);
    assert_eq!(d.wait_exit(T), Some(1));
    assert!(
        d.log_text()
            .contains("Quit, maybe another miio_client is already running."),
        "{}",
        d.log_text()
    );
}

#[test]
fn sighup_reopens_the_log_file() {
    let dir = TempDir::new("reopen");
    dir.write("device.conf", GOOD_DEVICE_CONF);
    let args = base_args(&dir);
    let mut d = Daemon::start(&dir, &args);
    assert!(d.wait_log("STATE_WIFI_AP_MODE", T));
    std::fs::rename(&d.log, dir.join("miio.log.1")).unwrap();
    d.signal("HUP");
    assert!(
        d.wait_log("SIGHUP", T),
        "a new log file is written after SIGHUP"
    );
    d.signal("TERM");
    assert_eq!(d.wait_exit(T), Some(0));
}

#[test]
fn a_start_without_wifi_conf_makes_a_fresh_token_and_enters_ap_mode() {
    // L§15 reset: wifi.conf deleted, then a restart: a new token and AP mode.
    let dir = provisioned_dir("reset");
    std::fs::remove_file(dir.join("wifi.conf")).unwrap();
    let mut args = base_args(&dir);
    args.extend(["--helper-grace".to_string(), "1".to_string()]);
    let d = Daemon::start(&dir, &args);
    let mut c = LocalClient::connect(d.local());
    c.send(r#"{"id":1,"method":"local.query_time"}"#);
    assert!(c.recv(T).is_some(), "an ordinary client");
    let b = c.recv_until(T, |v| v["params"] == "wifi_ap_mode");
    assert!(b.is_some(), "wifi_ap_mode broadcast: {}", d.log_text());
    let token = std::fs::read_to_string(dir.join("device.token")).unwrap();
    assert_ne!(token, "ABCDEFGHIJKLMNOP", "the old token is replaced");
    assert_eq!(token.len(), 16);
    assert!(token.bytes().all(|b| b.is_ascii_alphanumeric()));
}

#[test]
fn init_script_start_reset_stop_under_busybox() {
    if Command::new("busybox").arg("true").status().is_err() {
        skip("busybox");
        return;
    }
    let dir = provisioned_dir("initd");
    let defaults = dir.join("defaults");
    let log = dir.join("miio.log");
    let pid = dir.join("miio.pid");
    // No listener at all (port 0 is off), so no start depends on a port staying free; the
    // cloud is a port held by the test where nobody answers.
    let dead = DeadPort::new();
    let args = format!(
        "--lan-port 0 --local-port 0 --ble-port 0 --no-mdns -H 127.0.0.1 -p {} --helper-grace 0 --os-release {}",
        dead.port,
        dir.join("os-release").display()
    );
    std::fs::write(
        &defaults,
        format!(
            "MIIO_CLIENT='{BIN}'\nMIIO_DATADIR='{}'\nMIIO_LOGFILE='{}'\nMIIO_CLIENT_ARGS='{args}'\nMIIO_PIDFILE='{}'\nMIIO_HELPER='{}'\nMIIO_HELPER_PIDFILE='{}'\nMIIO_WIFI_START='{}'\n",
            dir.dir_arg(),
            log.display(),
            pid.display(),
            dir.join("no-helper.sh").display(),
            dir.join("helper.pid").display(),
            dir.join("no-wifi-start.sh").display(),
        ),
    )
    .unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/init.d/S50miio_client");
    let run = |action: &str| {
        let out = Command::new("busybox")
            .args(["sh", script, action])
            .env("MIIO_DEFAULTS", &defaults)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success(), "{action}: {out:?}");
    };
    run("start");
    assert!(
        wait_until(T, || read_file(&log).contains("STATE_WIFI_STA_MODE")),
        "{}",
        read_file(&log)
    );
    let first_pid = std::fs::read_to_string(&pid).unwrap();
    run("reset");
    assert!(!dir.join("wifi.conf").exists(), "reset deletes wifi.conf");
    assert!(
        wait_until(T, || read_file(&log).contains("STATE_WIFI_AP_MODE")),
        "{}",
        read_file(&log)
    );
    assert_ne!(
        std::fs::read_to_string(dir.join("device.token")).unwrap(),
        "ABCDEFGHIJKLMNOP"
    );
    let second_pid = std::fs::read_to_string(&pid).unwrap();
    assert_ne!(first_pid, second_pid, "the daemon was restarted");
    run("stop");
    let p = second_pid.trim().to_string();
    assert!(
        wait_until(T, || !std::path::Path::new(&format!("/proc/{p}")).exists()),
        "stopped"
    );
}

#[test]
fn dash_d_detaches_and_the_daemon_keeps_running() {
    let dir = provisioned_dir("detach");
    let mut args = base_args(&dir);
    args.extend([
        "-D".to_string(),
        "--helper-grace".to_string(),
        "0".to_string(),
    ]);
    let mut parent = Daemon::start(&dir, &args);
    // The parent returns at once with 0; the detached child goes on and writes the log.
    assert_eq!(parent.wait_exit(T), Some(0));
    assert!(
        parent.wait_log("STATE_WIFI_STA_MODE", T),
        "{}",
        parent.log_text()
    );
    let pid: Option<String> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|p| p.bytes().all(|b| b.is_ascii_digit()))
        .find(|p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(&dir.dir_arg()))
                .unwrap_or(false)
        });
    let pid = pid.expect("the detached daemon runs");
    let st = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // setsid: it leads its own session (field 6 of /proc/PID/stat equals its pid).
    let fields: Vec<&str> = st.rsplit(')').next().unwrap().split_whitespace().collect();
    assert_eq!(fields[3], pid, "session leader: {st}");
    let ok = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    assert!(wait_until(T, || !std::path::Path::new(&format!(
        "/proc/{pid}"
    ))
    .exists()));
}

#[test]
fn sighup_takes_a_changed_device_conf_and_ignores_a_broken_one() {
    let dir = provisioned_dir("hup-id");
    let mut args = base_args(&dir);
    args.extend(["--helper-grace".to_string(), "0".to_string()]);
    let d = Daemon::start(&dir, &args);
    assert!(d.wait_log("STATE_WIFI_STA_MODE", T), "{}", d.log_text());
    // A broken file on SIGHUP: the identity in use is kept.
    dir.write("device.conf", "did=oops\n");
    d.signal("HUP");
    assert!(
        d.wait_log("keeping the identity in use", T),
        "{}",
        d.log_text()
    );
    // A new did: the sequence restarts from the token step with it.
    dir.write(
        "device.conf",
        &GOOD_DEVICE_CONF.replace("123456789", "987654321"),
    );
    d.signal("HUP");
    assert!(d.wait_log("device did 987654321", T), "{}", d.log_text());
    assert!(d.wait_log("the identity changed", T));
}
