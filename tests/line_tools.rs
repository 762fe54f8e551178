//! `miio_send_line` and `miio_recv_line` as the real binary runs them (LOCAL_API.md §9.1), against a
//! plain TcpListener standing in for the daemon on a free port given through `MIIO_LOCAL_PORT`.

mod common;
use common::*;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

const T: Duration = Duration::from_secs(10);
const HELLO: &[u8] = br#"{"method":"_internal.hello"}"#;

fn listener() -> (TcpListener, u16) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let p = l.local_addr().unwrap().port();
    (l, p)
}

/// A port nobody listens on, held (bound, not listening) for as long as the value lives.
fn dead_port() -> DeadPort {
    DeadPort::new()
}

fn spawn(applet: &str, args: &[&str], port: u16) -> Child {
    Command::new(BIN)
        .arg(applet)
        .args(args)
        .env("MIIO_LOCAL_PORT", port.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn")
}

/// Waits for the child with a deadline (kills it and fails the test when it hangs).
fn finish(mut child: Child) -> (i32, String, String) {
    let done = wait_until(T, || matches!(child.try_wait(), Ok(Some(_))));
    if !done {
        let _ = child.kill();
    }
    let out: Output = child.wait_with_output().expect("wait");
    assert!(done, "applet did not exit");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn accept(l: &TcpListener) -> TcpStream {
    let (s, _) = l.accept().expect("accept");
    s.set_read_timeout(Some(T)).unwrap();
    s
}

fn read_to_eof(s: &mut TcpStream) -> Vec<u8> {
    let mut v = Vec::new();
    s.read_to_end(&mut v).expect("read");
    v
}

fn read_hello(s: &mut TcpStream) {
    let mut b = [0u8; 28];
    s.read_exact(&mut b).expect("hello");
    assert_eq!(&b[..], HELLO);
}

#[test]
fn send_line_writes_the_message_exactly_then_closes() {
    let (l, port) = listener();
    let msg = r#"{"method":"_internal.response_dtoken","params":"abcDEF0123456789"}"#;
    let child = spawn("miio_send_line", &[msg], port);
    let mut s = accept(&l);
    assert_eq!(read_to_eof(&mut s), msg.as_bytes());
    assert_eq!(finish(child), (0, String::new(), String::new()));

    // Exactly 16384 bytes is allowed; no newline or NUL is added.
    let big = format!("{{\"a\":\"{}\"}}", "x".repeat(16384 - 8));
    assert_eq!(big.len(), 16384);
    let child = spawn("miio_send_line", &[&big], port);
    let mut s = accept(&l);
    assert_eq!(read_to_eof(&mut s), big.as_bytes());
    assert_eq!(finish(child).0, 0);
}

#[test]
fn send_line_errors() {
    let dead = dead_port();
    let (code, out, err) = finish(spawn("miio_send_line", &[], dead.port));
    assert_eq!(code, 1);
    assert!(out.is_empty());
    assert!(err.contains("Usage: miio_send_line msg"), "{err}");

    let long = "x".repeat(16385);
    let (code, _, err) = finish(spawn("miio_send_line", &[&long], dead.port));
    assert_eq!(code, 1);
    assert!(err.contains("msg too long, max 16384"), "{err}");

    let port = dead.port;
    let (code, _, err) = finish(spawn("miio_send_line", &["{}"], port));
    assert_eq!(code, 255);
    assert!(
        err.contains(&format!("Connect to server error: 127.0.0.1:{port}")),
        "{err}"
    );
}

#[test]
fn recv_line_says_hello_and_prints_one_object() {
    let (l, port) = listener();
    let mut child = spawn("miio_recv_line", &[], port);
    let mut s = accept(&l);
    read_hello(&mut s);
    // It blocks until the daemon has something to say.
    assert!(matches!(child.try_wait(), Ok(None)));
    // One object in two pieces, then a second one it must not print; the socket stays open.
    s.write_all(b"\n{\"method\":\"_internal.request_dinfo\",")
        .unwrap();
    s.flush().unwrap();
    s.write_all(br#""params":"/etc/miio/"}{"method":"other"}"#)
        .unwrap();
    let (code, out, err) = finish(child);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out,
        "{\"method\":\"_internal.request_dinfo\",\"params\":\"/etc/miio/\"}\n"
    );
    drop(s);
}

#[test]
fn recv_line_eof_and_size_and_connect_errors() {
    let (l, port) = listener();
    // EOF before any byte: 255, nothing printed.
    let child = spawn("miio_recv_line", &[], port);
    let mut s = accept(&l);
    read_hello(&mut s);
    drop(s);
    let (code, out, _) = finish(child);
    assert_eq!(code, 255);
    assert!(out.is_empty());

    // A message over 16384 bytes.
    let child = spawn("miio_recv_line", &[], port);
    let mut s = accept(&l);
    read_hello(&mut s);
    let big = format!("{{\"a\":\"{}\"}}", "x".repeat(20000));
    // The tool may exit (closing its end) before everything is written.
    let _ = s.write_all(big.as_bytes());
    let (code, out, err) = finish(child);
    assert_eq!(code, 1);
    assert!(out.is_empty());
    assert!(err.contains("ERROR, buffer too small"), "{err}");

    // Exactly 16384 bytes still fits.
    let child = spawn("miio_recv_line", &[], port);
    let mut s = accept(&l);
    read_hello(&mut s);
    let fits = format!("{{\"a\":\"{}\"}}", "x".repeat(16384 - 8));
    s.write_all(fits.as_bytes()).unwrap();
    let (code, out, _) = finish(child);
    assert_eq!(code, 0);
    assert_eq!(out, format!("{fits}\n"));

    // Nobody listening.
    let dead = dead_port();
    let port = dead.port;
    let (code, _, err) = finish(spawn("miio_recv_line", &[], port));
    assert_eq!(code, 255);
    assert!(
        err.contains(&format!("Connect to server error: 127.0.0.1:{port}")),
        "{err}"
    );
}

#[test]
fn recv_line_prints_a_partial_message_at_eof() {
    let (l, port) = listener();
    let child = spawn("miio_recv_line", &[], port);
    let mut s = accept(&l);
    read_hello(&mut s);
    s.write_all(br#"{"method":"cut"#).unwrap();
    drop(s);
    let (code, out, _) = finish(child);
    assert_eq!(code, 0);
    assert_eq!(out, "{\"method\":\"cut\n");
}

// ---- The shipped helper scripts under BusyBox sh (LOCAL_API.md §9.6), through the real line tools ----

use serde_json::{json, Value};
use std::path::{Path, PathBuf};

const SCRIPTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/etc/miio");

/// BusyBox, or a skip (a failure under MIIO_REQUIRE_ALL=1, ARCHITECTURE.md §5).
fn busybox() -> bool {
    let ok = Command::new("busybox")
        .args(["sh", "-c", "exit 0"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        skip("busybox");
    }
    ok
}

fn write_exec(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    let _ = Command::new("chmod").arg("755").arg(path).status();
}

/// One connection to the stand-in daemon: a hello (recv_line waiting) or a whole message (send_line).
enum Incoming {
    Hello(TcpStream),
    Msg(Value),
}

fn accept_within(l: &TcpListener) -> TcpStream {
    let mut got = None;
    assert!(
        wait_until(T, || match l.accept() {
            Ok((s, _)) => {
                got = Some(s);
                true
            }
            Err(_) => false,
        }),
        "no connection from the helper"
    );
    let s = got.unwrap();
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    s
}

fn incoming(l: &TcpListener) -> Incoming {
    let mut s = accept_within(l);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Ok(v) = serde_json::from_slice::<Value>(&buf) {
            if buf == HELLO {
                return Incoming::Hello(s);
            }
            return Incoming::Msg(v);
        }
        let n = s.read(&mut chunk).expect("read from helper");
        assert!(
            n > 0,
            "EOF inside a message: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn expect_msg(l: &TcpListener) -> Value {
    match incoming(l) {
        Incoming::Msg(v) => v,
        Incoming::Hello(_) => panic!("hello where a message was expected"),
    }
}

/// Waits for the next hello and hands it `msg` (one message, then EOF, as the daemon does).
fn tell(l: &TcpListener, msg: &str) {
    match incoming(l) {
        Incoming::Hello(mut s) => {
            s.write_all(msg.as_bytes()).unwrap();
            s.shutdown(std::net::Shutdown::Write).unwrap();
        }
        Incoming::Msg(v) => panic!("message {v} where a hello was expected"),
    }
}

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn data_dir(dir: &TempDir) -> String {
    std::fs::create_dir_all(dir.join("data")).unwrap();
    format!("{}/data/", dir.path().display())
}

#[test]
fn helper_script_answers_the_daemon() {
    if !busybox() {
        return;
    }
    let dir = TempDir::new("helper");
    let data = data_dir(&dir);
    let d = |name: &str| PathBuf::from(format!("{data}{name}"));
    // A key with a quote and a backslash must come back intact through the JSON escaping.
    std::fs::write(
        d("device.conf"),
        "# test\r\ndid = 123456789\r\nkey=ab\"cd\\efghijklmn\nmac=aa:bb:cc:01:02:03\nvendor=acme\nmodel=acme.dev.v1\n",
    )
    .unwrap();
    std::fs::write(
        d("wifi.conf"),
        "ssid=\"my \\\"net\\\\\"\npsk=\"pw123456\"\nkey_mgmt=WPA\n",
    )
    .unwrap();
    std::fs::write(d("device.country"), "de\n").unwrap();
    std::fs::write(
        dir.join("os-release"),
        "NAME=x\nACME_VERSION=\"2.1.1_9527\"\n",
    )
    .unwrap();
    std::fs::create_dir_all(dir.join("zoneinfo/Europe")).unwrap();
    std::fs::write(dir.join("zoneinfo/Europe/Berlin"), "TZif").unwrap();
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    for a in ["miio_recv_line", "miio_send_line"] {
        std::os::unix::fs::symlink(BIN, bin.join(a)).unwrap();
    }
    // wifi_start.sh stand-in: logs its arguments, exits with the status in wifi.rc.
    let calls = dir.join("wifi.calls");
    write_exec(
        &dir.join("wifi_start.sh"),
        &format!(
            "#!/bin/sh\nprintf '%s|%s\\n' \"$*\" \"$MIIO_DATADIR\" >>'{}'\nexit $(cat '{}')\n",
            calls.display(),
            dir.join("wifi.rc").display()
        ),
    );
    std::fs::write(dir.join("wifi.rc"), "0").unwrap();

    let (l, port) = listener();
    l.set_nonblocking(true).unwrap();
    let none = dir.join("none").display().to_string();
    let _helper = Killed(
        Command::new("busybox")
            .arg("sh")
            .arg(format!("{SCRIPTS}/miio_client_helper.sh"))
            .env("MIIO_LOCAL_PORT", port.to_string())
            .env("MIIO_BIN_DIR", &bin)
            .env("MIIO_DATADIR", "/nonexistent/")
            .env("MIIO_OS_RELEASE", dir.join("os-release"))
            .env("MIIO_TZ_DIR", dir.join("zoneinfo"))
            .env("MIIO_TZ_LINK", dir.join("localtime"))
            .env("MIIO_WIFI_START", dir.join("wifi_start.sh"))
            .env("MIIO_WIFI_TRIES", "2")
            .env("MIIO_WIFI_PAUSE", "0")
            .env("MIIO_WPA_CLI", &none)
            .env("MIIO_IP", &none)
            .env("MIIO_IFCONFIG", &none)
            .env("MIIO_ROUTE", &none)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("busybox sh"),
    );

    assert_eq!(expect_msg(&l), json!({"method":"_internal.helper_ready"}));

    tell(
        &l,
        &format!(r#"{{"method":"_internal.request_dinfo","params":"{data}"}}"#),
    );
    assert_eq!(
        expect_msg(&l),
        json!({"method":"_internal.response_dinfo","params":{"did":123456789,"key":"ab\"cd\\efghijklmn","vendor":"acme","mac":"aa:bb:cc:01:02:03","model":"acme.dev.v1"}})
    );

    // wifi.conf exists, no device.token: the ntoken is stored (0600) and answered, country first.
    tell(
        &l,
        &format!(
            r#"{{"method":"_internal.request_dtoken","params":{{"dir":"{data}","ntoken":"abcDEF0123456789"}}}}"#
        ),
    );
    assert_eq!(
        expect_msg(&l),
        json!({"method":"_internal.response_dcountry","params":"de"})
    );
    assert_eq!(
        expect_msg(&l),
        json!({"method":"_internal.response_dtoken","params":"abcDEF0123456789"})
    );
    assert_eq!(read_file(&d("device.token")), "abcDEF0123456789");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(d("device.token"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    // A valid token file wins over a new ntoken, also in its 32-hex form with a newline (L§17).
    std::fs::write(d("device.token"), "61626344454630313233343536373839\n").unwrap();
    tell(
        &l,
        &format!(
            r#"{{"method":"_internal.request_dtoken","params":{{"dir":"{data}","ntoken":"ZZZZZZZZZZZZZZZZ"}}}}"#
        ),
    );
    expect_msg(&l);
    assert_eq!(
        expect_msg(&l),
        json!({"method":"_internal.response_dtoken","params":"abcDEF0123456789"})
    );

    tell(
        &l,
        &format!(r#"{{"method":"_internal.req_wifi_conf_status","params":"{data}"}}"#),
    );
    assert_eq!(
        expect_msg(&l),
        json!({"method":"_internal.res_wifi_conf_status","params":1})
    );

    // No wpa_cli, ip, ifconfig or route: the ssid of wifi.conf and empty netif.
    tell(&l, r#"{"method":"_internal.info"}"#);
    assert_eq!(
        expect_msg(&l),
        json!({"method":"_internal.info","partner_id":"","params":{"hw_ver":"Linux","fw_ver":"2.1.1_9527","ap":{"ssid":"my \"net\\","bssid":""},"netif":{"localIp":"","mask":"","gw":""}}})
    );

    // config_tz: a bad name is refused, a good one relinks.
    tell(
        &l,
        r#"{"method":"_internal.config_tz","params":{"tz":"../../etc/passwd"}}"#,
    );
    tell(
        &l,
        r#"{"method":"_internal.config_tz","params":{"tz":"Europe/Berlin"}}"#,
    );
    // The next hello proves the previous message was handled.
    tell(
        &l,
        &format!(r#"{{"method":"_internal.req_wifi_conf_status","params":"{data}"}}"#),
    );
    expect_msg(&l);
    assert_eq!(
        std::fs::read_link(dir.join("localtime")).unwrap(),
        dir.join("zoneinfo/Europe/Berlin")
    );

    // wifi_start: wifi_start.sh succeeds at once.
    let start = format!(
        r#"{{"method":"_internal.wifi_start","params":{{"datadir":"{data}","ssid":"x","passwd":"y","uid":"0","country_domain":"","tz":""}}}}"#
    );
    tell(&l, &start);
    assert_eq!(expect_msg(&l), json!({"method":"_internal.wifi_connected"}));
    assert_eq!(read_file(&calls), format!("|{data}\n"));
    // It fails on every try: wifi_ap_mode, and once wifi.conf is gone, wifi_start.sh once more.
    std::fs::write(dir.join("wifi.rc"), "1").unwrap();
    tell(&l, &start);
    assert_eq!(
        expect_msg(&l),
        json!({"method":"_internal.wifi_ap_mode","params":null})
    );
    std::fs::remove_file(d("wifi.conf")).unwrap();
    assert!(wait_until(T, || read_file(&calls).lines().count() == 4));

    // Offline notices run wifi_start.sh in the background.
    tell(&l, r#"{"method":"_internal.wifi_reload","params":""}"#);
    assert!(wait_until(T, || read_file(&calls).contains("reload|")));

    // Not provisioned any more: the token is forgotten and the new ntoken stored.
    tell(
        &l,
        &format!(
            r#"{{"method":"_internal.request_dtoken","params":{{"dir":"{data}","ntoken":"ZZZZZZZZZZZZZZZZ"}}}}"#
        ),
    );
    expect_msg(&l);
    assert_eq!(
        expect_msg(&l),
        json!({"method":"_internal.response_dtoken","params":"ZZZZZZZZZZZZZZZZ"})
    );
    tell(
        &l,
        &format!(r#"{{"method":"_internal.req_wifi_conf_status","params":"{data}"}}"#),
    );
    assert_eq!(
        expect_msg(&l),
        json!({"method":"_internal.res_wifi_conf_status","params":0})
    );
}

/// wifi_start.sh with every external command stubbed: each stub logs `name args` to a file.
fn wifi_start_run(dir: &TempDir, data: &str, arg: Option<&str>) -> (i32, String) {
    let stubs = dir.join("stubs");
    std::fs::create_dir_all(&stubs).unwrap();
    let log = dir.join("cmds");
    for name in ["wpa_supplicant", "hostapd", "udhcpc", "udhcpd", "ifconfig"] {
        write_exec(
            &stubs.join(name),
            &format!("#!/bin/sh\necho \"{name} $*\" >>'{}'\n", log.display()),
        );
    }
    write_exec(
        &stubs.join("wpa_cli"),
        "#!/bin/sh\necho wpa_state=COMPLETED\n",
    );
    let mut c = Command::new("busybox");
    c.arg("sh")
        .arg(format!("{SCRIPTS}/wifi_start.sh"))
        .args(arg)
        .env("MIIO_DATADIR", data)
        .env("MIIO_RUN_DIR", dir.join("run"))
        .stdin(Stdio::null());
    for name in [
        "wpa_supplicant",
        "hostapd",
        "udhcpc",
        "udhcpd",
        "ifconfig",
        "wpa_cli",
    ] {
        c.env(format!("MIIO_{}", name.to_uppercase()), stubs.join(name));
    }
    let out = c.output().expect("busybox sh");
    (out.status.code().unwrap_or(-1), read_file(&log))
}

#[test]
fn wifi_start_script_sta_and_ap() {
    if !busybox() {
        return;
    }
    let dir = TempDir::new("wifistart");
    let data = data_dir(&dir);
    std::fs::write(
        format!("{data}device.conf"),
        "did=123456789\nkey=0123456789abcdef\nmac=aa:bb:cc:01:a7:47\nmodel=acme.dev.v1\n",
    )
    .unwrap();

    // No wifi.conf: AP mode with the vendor SSID rule.
    let (code, cmds) = wifi_start_run(&dir, &data, None);
    assert_eq!(code, 0, "{cmds}");
    let conf = read_file(&dir.join("run/hostapd.conf"));
    assert!(conf.contains("\nssid=acme-dev-v1_miapA747\n"), "{conf}");
    assert!(cmds.contains("hostapd -B"), "{cmds}");
    assert!(cmds.contains("udhcpd "), "{cmds}");
    assert!(!cmds.contains("wpa_supplicant"), "{cmds}");

    // wifi.conf: STA, credentials from the file (the SSID in hex), the DHCP hostname rule.
    std::fs::write(
        format!("{data}wifi.conf"),
        "ssid=\"a\\\"b$(x)\"\npsk=\"pass \\\\word\"\nkey_mgmt=WPA\nuid=5\n",
    )
    .unwrap();
    std::fs::remove_file(dir.join("cmds")).unwrap();
    let (code, cmds) = wifi_start_run(&dir, &data, None);
    assert_eq!(code, 0, "{cmds}");
    let conf = read_file(&dir.join("run/wpa_supplicant.conf"));
    let hex: String = "a\"b$(x)".bytes().map(|b| format!("{b:02x}")).collect();
    assert!(conf.contains(&format!("\tssid={hex}\n")), "{conf}");
    assert!(conf.contains("\tpsk=\"pass \\word\"\n"), "{conf}");
    assert!(cmds.contains("udhcpc -i wlan0"), "{cmds}");
    assert!(
        cmds.contains("-x hostname:acme-dev-v1_miio123456789"),
        "{cmds}"
    );
    assert!(!cmds.contains("hostapd"), "{cmds}");

    let (code, _) = wifi_start_run(&dir, &data, Some("bogus"));
    assert_eq!(code, 2);
}

/// The helper with only BusyBox's applets: PATH is an empty dir, so a tool BusyBox lacks (cksum
/// in Debian's busybox-static) is "not found", as on a board. After wifi_ap_mode the helper must
/// see the daemon delete wifi.conf at once, not wait out its bound (5 s, 3600 s here).
#[test]
fn helper_script_runs_on_busybox_alone_and_sees_wifi_conf_go() {
    if !busybox() {
        return;
    }
    let dir = TempDir::new("helper-bb");
    let data = data_dir(&dir);
    let conf = PathBuf::from(format!("{data}wifi.conf"));
    std::fs::write(&conf, "ssid=\"x\"\npsk=\"pw123456\"\nkey_mgmt=WPA\n").unwrap();
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    for a in ["miio_recv_line", "miio_send_line"] {
        std::os::unix::fs::symlink(BIN, bin.join(a)).unwrap();
    }
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    // wifi_start.sh stand-in with shell builtins only (PATH is empty): logs a line, fails.
    let calls = dir.join("wifi.calls");
    write_exec(
        &dir.join("wifi_start.sh"),
        &format!("#!/bin/sh\necho \"$*\" >>'{}'\nexit 1\n", calls.display()),
    );
    // The child's PATH is also where Command looks for the program: find busybox on ours.
    let busybox = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|d| d.join("busybox"))
        .find(|p| p.exists())
        .expect("busybox on PATH");
    let (l, port) = listener();
    l.set_nonblocking(true).unwrap();
    let none = dir.join("none").display().to_string();
    let _helper = Killed(
        Command::new(busybox)
            .arg("sh")
            .arg(format!("{SCRIPTS}/miio_client_helper.sh"))
            .env("PATH", &empty)
            .env("MIIO_LOCAL_PORT", port.to_string())
            .env("MIIO_BIN_DIR", &bin)
            .env("MIIO_DATADIR", &data)
            .env("MIIO_WIFI_START", dir.join("wifi_start.sh"))
            .env("MIIO_WIFI_TRIES", "1")
            .env("MIIO_WIFI_PAUSE", "0")
            .env("MIIO_WIFI_CONF_WAIT", "3600")
            .env("MIIO_WPA_CLI", &none)
            .env("MIIO_IP", &none)
            .env("MIIO_IFCONFIG", &none)
            .env("MIIO_ROUTE", &none)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("busybox sh"),
    );
    assert_eq!(expect_msg(&l), json!({"method":"_internal.helper_ready"}));
    tell(
        &l,
        &format!(
            r#"{{"method":"_internal.wifi_start","params":{{"datadir":"{data}","ssid":"x","passwd":"y","uid":"0","country_domain":"","tz":""}}}}"#
        ),
    );
    assert_eq!(
        expect_msg(&l),
        json!({"method":"_internal.wifi_ap_mode","params":null})
    );
    // The daemon's part: back to AP mode, wifi.conf deleted.
    std::fs::remove_file(&conf).unwrap();
    // Its wait is 3600 s here: only seeing the change can run wifi_start.sh before the deadline.
    assert!(
        wait_until(T, || read_file(&calls).lines().count() == 2),
        "wifi_start.sh not run again after wifi.conf went (no change seen)"
    );
}

/// `wifi_start.sh reconnect` with wpa_supplicant running but no udhcpc pid file: no stray
/// "can't open" on stderr, and a DHCP run.
#[test]
fn wifi_start_reconnect_without_a_udhcpc_pid_file_is_quiet() {
    if !busybox() {
        return;
    }
    let dir = TempDir::new("wifi-reconnect");
    let data = data_dir(&dir);
    std::fs::write(
        format!("{data}device.conf"),
        "did=123456789\nkey=0123456789abcdef\nmac=aa:bb:cc:01:a7:47\nmodel=acme.dev.v1\n",
    )
    .unwrap();
    std::fs::write(
        format!("{data}wifi.conf"),
        "ssid=\"x\"\npsk=\"pw123456\"\nkey_mgmt=WPA\n",
    )
    .unwrap();
    let run = dir.join("run");
    std::fs::create_dir_all(&run).unwrap();
    std::fs::write(run.join("wpa_supplicant.pid"), "999999\n").unwrap();
    let stubs = dir.join("stubs");
    std::fs::create_dir_all(&stubs).unwrap();
    let log = dir.join("cmds");
    let mut c = Command::new("busybox");
    c.arg("sh")
        .arg(format!("{SCRIPTS}/wifi_start.sh"))
        .arg("reconnect")
        .env("MIIO_DATADIR", &data)
        .env("MIIO_RUN_DIR", &run)
        .stdin(Stdio::null());
    for name in ["wpa_supplicant", "hostapd", "udhcpc", "udhcpd", "ifconfig"] {
        write_exec(
            &stubs.join(name),
            &format!("#!/bin/sh\necho \"{name} $*\" >>'{}'\n", log.display()),
        );
        c.env(format!("MIIO_{}", name.to_uppercase()), stubs.join(name));
    }
    write_exec(
        &stubs.join("wpa_cli"),
        "#!/bin/sh\necho wpa_state=COMPLETED\n",
    );
    c.env("MIIO_WPA_CLI", stubs.join("wpa_cli"));
    let out = c.output().expect("busybox sh");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.is_empty(), "stderr: {err}");
    assert!(
        read_file(&log).contains("udhcpc -i wlan0"),
        "{}",
        read_file(&log)
    );
}

/// A udhcpc stand-in for `wifi_start.sh`: logs `udhcpc ARGS` to `log`, notes an overlap when the
/// udhcpc of the pid file still runs, and leaves a process under that pid file, as a udhcpc with a
/// lease does: a `cat` of the FIFO `lease` (a closed `Gate`), which runs until it is killed or the
/// gate opens.
fn udhcpc_stub(path: &Path, log: &Path, lease: &Path) {
    write_exec(
        path,
        &format!(
            r#"#!/bin/sh
echo "udhcpc $*" >>'{log}'
pf=
while [ $# -gt 0 ]; do
	case $1 in -p) pf=$2; shift ;; esac
	shift
done
old=$(cat "$pf" 2>/dev/null)
if [ -n "$old" ] && kill -0 "$old" 2>/dev/null; then
	st=$(cat "/proc/$old/stat" 2>/dev/null)
	st=${{st##*) }}
	[ "${{st%% *}}" = Z ] || echo "udhcpc overlap: $old still runs" >>'{log}'
fi
cat '{lease}' </dev/null >/dev/null 2>&1 &
echo $! >"$pf"
"#,
            log = log.display(),
            lease = lease.display()
        ),
    );
}

/// The process runs (a zombie does not count).
fn alive(pid: &str) -> bool {
    let stat = read_file(Path::new(&format!("/proc/{pid}/stat")));
    match stat.rsplit_once(") ") {
        Some((_, rest)) => !rest.starts_with('Z'),
        None => false,
    }
}

/// `wifi_start.sh rehost` (L§16): udhcpc is restarted under the hostname of the did now in
/// `device.conf`, asking for the address the interface has, after the old one is gone; nothing
/// happens when the hostname is unchanged, the udhcpc of the pid file is dead, or there is none.
#[test]
fn wifi_start_rehost_restarts_udhcpc_under_the_new_did() {
    if !busybox() {
        return;
    }
    let dir = TempDir::new("wifi-rehost");
    let data = data_dir(&dir);
    let conf = |did: u32| {
        std::fs::write(
            format!("{data}device.conf"),
            format!("did={did}\nkey=0123456789abcdef\nmac=aa:bb:cc:01:a7:47\nmodel=acme.dev.v1\n"),
        )
        .unwrap()
    };
    conf(1);
    std::fs::write(
        format!("{data}wifi.conf"),
        "ssid=\"x\"\npsk=\"pw123456\"\nkey_mgmt=WPA\n",
    )
    .unwrap();
    let run = dir.join("run");
    let stubs = dir.join("stubs");
    std::fs::create_dir_all(&stubs).unwrap();
    let log = dir.join("cmds");
    // Every stand-in udhcpc left running ends when this gate opens, at the end of the test.
    let lease = Gate::closed(dir.join("lease"));
    udhcpc_stub(&stubs.join("udhcpc"), &log, &dir.join("lease"));
    // ifconfig prints ifconfig.out when asked about the interface alone.
    let ifout = dir.join("ifconfig.out");
    write_exec(
        &stubs.join("ifconfig"),
        &format!(
            "#!/bin/sh\nif [ $# -eq 1 ]; then cat '{}'; else echo \"ifconfig $*\" >>'{}'; fi\n",
            ifout.display(),
            log.display()
        ),
    );
    std::fs::write(
        &ifout,
        "wlan0     Link encap:Ethernet  HWaddr AA:BB:CC:01:A7:47\n          \
         inet addr:192.168.1.57  Bcast:192.168.1.255  Mask:255.255.255.0\n          \
         inet6 addr: fe80::1/64 Scope:Link\n",
    )
    .unwrap();
    write_exec(
        &stubs.join("wpa_supplicant"),
        &format!(
            "#!/bin/sh\necho \"wpa_supplicant $*\" >>'{}'\n",
            log.display()
        ),
    );
    write_exec(
        &stubs.join("wpa_cli"),
        "#!/bin/sh\necho wpa_state=COMPLETED\n",
    );
    let wifi_start = |arg: &str| {
        let mut c = Command::new("busybox");
        c.arg("sh")
            .arg(format!("{SCRIPTS}/wifi_start.sh"))
            .arg(arg)
            .env("MIIO_DATADIR", &data)
            .env("MIIO_RUN_DIR", &run)
            .stdin(Stdio::null());
        for name in ["udhcpc", "ifconfig", "wpa_supplicant", "wpa_cli"] {
            c.env(format!("MIIO_{}", name.to_uppercase()), stubs.join(name));
        }
        let out = c.output().expect("busybox sh");
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(0), "{arg}: {err}");
        err
    };
    let pidfile = run.join("udhcpc.pid");
    let udhcpc_lines = || {
        read_file(&log)
            .lines()
            .filter(|l| l.starts_with("udhcpc"))
            .map(String::from)
            .collect::<Vec<_>>()
    };

    // The board's start under the bootstrap did.
    wifi_start("sta");
    let started = udhcpc_lines();
    assert_eq!(started.len(), 1, "{started:?}");
    assert!(
        started[0].contains("-x hostname:acme-dev-v1_miio1"),
        "{started:?}"
    );
    let first = read_file(&pidfile).trim().to_owned();
    assert!(alive(&first), "the stand-in udhcpc {first} runs");

    // Same did: nothing.
    wifi_start("rehost");
    assert_eq!(udhcpc_lines(), started);
    assert!(alive(&first));

    // The assignment: the old udhcpc goes first, the new one asks for the address held now.
    conf(555);
    let err = wifi_start("rehost");
    let lines = udhcpc_lines();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(
        lines[1].contains("-x hostname:acme-dev-v1_miio555"),
        "{lines:?}"
    );
    assert!(lines[1].contains("-r 192.168.1.57"), "{lines:?}");
    assert!(lines[1].contains("-b"), "{lines:?}");
    assert!(!read_file(&log).contains("overlap"), "{}", read_file(&log));
    assert!(!alive(&first), "the old udhcpc {first} still runs");
    assert!(err.contains("acme-dev-v1_miio555"), "{err}");
    let second = read_file(&pidfile).trim().to_owned();
    assert!(second != first && alive(&second), "{second}");

    // Again: the hostname is the one udhcpc has.
    wifi_start("rehost");
    assert_eq!(udhcpc_lines(), lines);

    // net-tools' ifconfig says `inet A netmask M`.
    std::fs::write(
        &ifout,
        "wlan0: flags=4163<UP,BROADCAST,RUNNING,MULTICAST>  mtu 1500\n        \
         inet 10.0.0.8  netmask 255.255.255.0  broadcast 10.0.0.255\n        \
         inet6 fe80::1  prefixlen 64  scopeid 0x20<link>\n",
    )
    .unwrap();
    conf(556);
    wifi_start("rehost");
    let lines = udhcpc_lines();
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert!(
        lines[2].contains("-r 10.0.0.8 -x hostname:acme-dev-v1_miio556"),
        "{lines:?}"
    );

    // The udhcpc of the pid file is dead, then there is no pid file: nothing.
    let third = read_file(&pidfile).trim().to_owned();
    let _ = Command::new("kill").arg(&third).status();
    assert!(wait_until(T, || !alive(&third)));
    conf(557);
    wifi_start("rehost");
    std::fs::remove_file(&pidfile).unwrap();
    wifi_start("rehost");
    assert_eq!(udhcpc_lines(), lines);
    drop(lease);
}

/// `req_didkeymac2` (L§16): the helper stores the pair, then runs `wifi_start.sh rehost` in the
/// data dir (which finds the new did), and only then answers "ok": the daemon's new session must
/// not start while udhcpc restarts.
#[test]
fn helper_script_rehosts_after_storing_the_assignment_and_before_the_ok() {
    if !busybox() {
        return;
    }
    let dir = TempDir::new("helper-rehost");
    let data = data_dir(&dir);
    std::fs::write(
        format!("{data}device.conf"),
        "did=0\nkey=BootstrapKey0001\nmac=aa:bb:cc:01:02:03\nmodel=acme.dev.v1\n",
    )
    .unwrap();
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    for a in ["miio_recv_line", "miio_send_line"] {
        std::os::unix::fs::symlink(BIN, bin.join(a)).unwrap();
    }
    // wifi_start.sh stand-in: logs its arguments and the did line device.conf has at that moment.
    let calls = dir.join("wifi.calls");
    write_exec(
        &dir.join("wifi_start.sh"),
        &format!(
            "#!/bin/sh\nprintf '%s|%s\\n' \"$*\" \"$(grep '^did=' \"${{MIIO_DATADIR}}device.conf\")\" >>'{}'\n",
            calls.display()
        ),
    );
    let (l, port) = listener();
    l.set_nonblocking(true).unwrap();
    let _helper = Killed(
        Command::new("busybox")
            .arg("sh")
            .arg(format!("{SCRIPTS}/miio_client_helper.sh"))
            .env("MIIO_LOCAL_PORT", port.to_string())
            .env("MIIO_BIN_DIR", &bin)
            .env("MIIO_DATADIR", &data)
            .env("MIIO_WIFI_START", dir.join("wifi_start.sh"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("busybox sh"),
    );
    assert_eq!(expect_msg(&l), json!({"method":"_internal.helper_ready"}));
    tell(
        &l,
        &format!(
            r#"{{"method":"_internal.req_didkeymac2","params":{{"dir":"{data}","did":555,"key":"Nk3w9Zq0aB7cD1eF"}}}}"#
        ),
    );
    assert_eq!(
        expect_msg(&l),
        json!({"method":"_internal.res_didkeymac2","params":"ok"})
    );
    // The "ok" came after the stand-in had run, so its line is there already.
    assert_eq!(read_file(&calls), "rehost|did=555\n");
}
