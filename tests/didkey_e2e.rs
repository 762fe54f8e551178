//! The dynamic did/key exchange end to end (LOCAL_API.md §16, PROTOCOL.md §5.11) with
//! `miio_fakecloud` as the issuing cloud: did 1 through AP provisioning by python-miio to
//! `cloud_connected` under the assigned identity, did 0 without provisioning and its
//! `retry_after` in `wakeup_time`, the daemon killed at each step of the exchange (`device.conf`
//! is always wholly old or wholly new, and a restart resumes), the keys never in the log, and the
//! shipped helper storing the identity and restarting udhcpc under the new DHCP hostname.

mod common;
use common::*;
use serde_json::json;
use std::process::Command;
use std::time::Duration;

const T: Duration = Duration::from_secs(20);
const BOOT_KEY: &str = "BootstrapKey0001";
const NEW_DID: u64 = 555;
const NEW_KEY: &str = "Nk3w9Zq0aB7cD1eF";
const MAC: &str = "AA:BB:CC:01:02:03";

/// A `device.conf` with a bootstrap did, a comment and an unknown line, both of which the rewrite
/// must keep.
fn boot_conf(did: u32) -> String {
    format!(
        "# identity of this board\ndid={did}\nkey={BOOT_KEY}\nmac={MAC}\nvendor=acme\n\
         model=acme.dev.v1\nextra=kept # unknown keys stay\n"
    )
}

/// The same file after the assignment: only the did and key lines differ.
fn new_conf(did: u32) -> String {
    boot_conf(did)
        .replace(&format!("did={did}\n"), &format!("did={NEW_DID}\n"))
        .replace(&format!("key={BOOT_KEY}\n"), &format!("key={NEW_KEY}\n"))
}

/// The fake cloud knowing the bootstrap did with its key, assigning `NEW_DID`.
fn cloud(did: u32, extra: &[&str]) -> FakeCloudProc {
    let d = did.to_string();
    let assign = format!("{NEW_DID}:{NEW_KEY}");
    let mut a = vec!["--did", &d, "--key", BOOT_KEY, "--assign", &assign];
    a.extend_from_slice(extra);
    fakecloud_with(&a)
}

/// The fake cloud's event stream (`miio_fakecloud ctl … {"cmd":"watch"}`).
fn watch(c: &FakeCloudProc) -> Lines {
    let mut w = Command::new(BIN);
    w.args(["miio_fakecloud", "ctl", "--ctl-port", &c.ctl.to_string()]);
    w.arg(r#"{"cmd":"watch"}"#);
    let l = Lines::spawn(w);
    assert!(l.wait(T, |v| v["ev"] == "ok").is_some(), "{:?}", l.all());
    l
}

fn args(dir: &TempDir, port: u16) -> Vec<String> {
    cloud_args(dir, port).opt("--helper-grace", 0).build()
}

/// The state lines of the log, in order.
fn states(d: &Daemon) -> Vec<String> {
    d.log_text()
        .lines()
        .filter_map(|l| l.split("-> ").nth(1).filter(|_| l.contains("STATE: ")))
        .map(String::from)
        .collect()
}

fn is_new_info(v: &serde_json::Value) -> bool {
    v["ev"] == "msg" && v["did"] == NEW_DID && v["json"]["method"] == "_otc.info"
}

fn is_assigned(v: &serde_json::Value) -> bool {
    v["ev"] == "didkey" && v["result"] == "assigned"
}

/// The cloud saw the `n`th `_otc.info` from the assigned did.
fn info_under_new_did(events: &Lines, n: usize) -> bool {
    events.wait_nth(T, n, is_new_info).is_some()
}

fn assert_no_key(d: &Daemon) {
    let log = d.log_text();
    for k in [NEW_KEY, BOOT_KEY] {
        assert!(!log.contains(k), "a key in the log at info level:\n{log}");
    }
}

/// L§16 for did 1: AP provisioning by python-miio (the phone), the exchange under the bootstrap
/// did, the new identity in `device.conf` with every other line kept, then `cloud_connected`
/// under it; the states in the order of L§16; no key in the info-level log.
#[test]
fn did1_provisioned_by_a_phone_then_connected_under_the_assigned_identity() {
    let _lock = PortLock::take(54321);
    let c = cloud(1, &[]);
    let events = watch(&c);
    let dir = TempDir::new("didkey-1");
    dir.write("device.conf", &boot_conf(1));
    let mut a = args(&dir, c.port);
    set_opt(&mut a, "--lan-port", 54321);
    let d = Daemon::start(&dir, &a);
    assert!(d.wait_log("STATE_WIFI_AP_MODE", T), "{}", d.log_text());
    let token: [u8; 16] = std::fs::read(dir.join("device.token"))
        .unwrap()
        .try_into()
        .expect("16-byte token");
    let mut watcher = LocalClient::connect(d.local());
    let params = json!({"ssid": "home-net", "passwd": "s3cret-pass", "uid": 987654,
        "country_domain": "", "tz": "Europe/Berlin"});
    if python_has("miio") {
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
        // Our own phone, sealing under the bootstrap did.
        use miio_client::wire::miio;
        let phone = Phone::new(d.lan(), &token);
        let req = json!({"id": 7, "method": "miIO.config_router", "params": params});
        phone.raw(&miio::seal(&phone.keys, 1, 5, req.to_string().as_bytes()));
        let r = phone.recv(T).expect("an answer");
        let r = miio::decode(&phone.keys, 1, &r).expect("sealed under did 1");
        assert_eq!(r.value["result"][0], "OK");
    }
    let asked = events.wait(T, is_assigned).expect("the did/key request");
    assert_eq!(asked["did"], 1);
    assert_eq!(asked["mac"], MAC);
    assert!(
        watcher
            .recv_until(T, |v| v["params"] == "cloud_connected")
            .is_some(),
        "{}",
        d.log_text()
    );
    assert!(info_under_new_did(&events, 1), "{}", d.log_text());
    assert_eq!(read_file(&dir.join("device.conf")), new_conf(1));
    let want = [
        "STATE_DIDKEY_REQ1",
        "STATE_DIDKEY_DONE",
        "STATE_TOKEN_DONE",
        "STATE_WIFI_AP_MODE",
        "STATE_WIFI_STA_MODE",
        "STATE_CLOUD_TRYING",
        "STATE_DIDKEY_REQ2",
        "STATE_DIDKEY_DONE",
        "STATE_WIFI_STA_MODE",
        "STATE_CLOUD_TRYING",
        "STATE_CLOUD_CONNECTED",
    ];
    let got = states(&d);
    let mut it = got.iter();
    for w in want {
        assert!(it.any(|s| s == w), "{w} missing or out of order: {got:?}");
    }
    // The token is not asked again after the assignment (L§16).
    assert_eq!(
        got.iter().filter(|s| *s == "STATE_TOKEN_DONE").count(),
        1,
        "{got:?}"
    );
    // The LAN answers under the new did.
    let hello = Phone::new(d.lan(), &token).hello().expect("hello reply");
    let did = u32::from_be_bytes(hello[8..12].try_into().unwrap());
    assert_eq!(u64::from(did), NEW_DID);
    assert_no_key(&d);
}

/// L§16 for did 0: online without `wifi.conf` (no AP mode); a queued request keeps
/// `didkey_req2`, and `local.prep_suspend` answers a `wakeup_time` of that `retry_after`.
#[test]
fn did0_goes_online_and_reports_the_retry_after_in_wakeup_time() {
    let c = cloud(0, &["--didkey-retry", "600"]);
    let events = watch(&c);
    let dir = TempDir::new("didkey-0");
    dir.write("device.conf", &boot_conf(0));
    let d = Daemon::start(&dir, &args(&dir, c.port));
    let queued = events
        .wait(T, |v| v["ev"] == "didkey" && v["result"] == "retry")
        .expect("the did/key request");
    assert_eq!(queued["did"], 0);
    assert!(d.wait_log("next try in 600", T), "{}", d.log_text());
    let mut l = LocalClient::connect(d.local());
    l.send(r#"{"id":1,"method":"local.query_status"}"#);
    let st = l.recv_until(T, |v| v["id"] == 1).expect("status");
    assert_eq!(st["params"], "didkey_req2", "{st}");
    l.send(r#"{"id":2,"method":"local.prep_suspend","params":[]}"#);
    let r = l
        .recv_until(T, |v| v["method"] == "local.resp_suspend")
        .expect("resp_suspend");
    let w = r["params"]["wakeup_time"].as_u64().unwrap();
    assert!((590..=600).contains(&w), "{r}");
    assert!(!dir.join("wifi.conf").exists());
    let got = states(&d);
    assert!(!got.iter().any(|s| s == "STATE_WIFI_AP_MODE"), "{got:?}");
    assert_eq!(read_file(&dir.join("device.conf")), boot_conf(0));
    // The token survives a restart without wifi.conf.
    let token = read_file(&dir.join("device.token"));
    drop(d);
    let _ = std::fs::rename(dir.join("miio.log"), dir.join("miio.log.1"));
    let d = Daemon::start(&dir, &args(&dir, c.port));
    assert!(d.wait_log("STATE_DIDKEY_REQ2", T), "{}", d.log_text());
    assert_eq!(read_file(&dir.join("device.token")), token);
    assert_no_key(&d);
}

/// One step of the exchange to wait for: the daemon, and the assignments the cloud made before.
type Step<'a> = &'a dyn Fn(&Daemon, usize) -> bool;

/// Crash safety (D15): the daemon killed with SIGKILL at each observable step of the exchange
/// leaves `device.conf` wholly old or wholly new, and a restart resumes to `cloud_connected`
/// under the assigned identity (the cloud gives the same one to the same mac).
#[test]
fn killed_at_every_step_the_identity_is_whole_and_a_restart_resumes() {
    let c = cloud(1, &[]);
    let events = watch(&c);
    // Each step waits for what it names; `n` is the count of assignments before the start.
    let steps: [Step; 5] = [
        &|d, _| d.wait_log("STATE_DIDKEY_REQ1", T),
        &|d, _| d.wait_log("STATE_DIDKEY_REQ2", T),
        &|_, n| events.wait_nth(T, n + 1, is_assigned).is_some(),
        &|d, _| d.wait_log("stored the new identity", T),
        &|d, _| d.wait_log("STATE_CLOUD_CONNECTED", T),
    ];
    for (i, step) in steps.iter().enumerate() {
        let assigned = events.count(is_assigned);
        let dir = TempDir::new(&format!("didkey-kill{i}"));
        dir.write("device.conf", &boot_conf(1));
        // Provisioned: the exchange starts without a phone.
        dir.write(
            "wifi.conf",
            "ssid=\"home\"\npsk=\"pw12345678\"\nkey_mgmt=WPA\nuid=42\n",
        );
        let mut d = Daemon::start(&dir, &args(&dir, c.port));
        assert!(step(&d, assigned), "step {i}: {}", d.log_text());
        d.child.kill().unwrap();
        d.child.wait().unwrap();
        let conf = read_file(&dir.join("device.conf"));
        assert!(
            conf == boot_conf(1) || conf == new_conf(1),
            "step {i}: half a device.conf:\n{conf}"
        );
        drop(d);
        let _ = std::fs::rename(dir.join("miio.log"), dir.join("miio.log.killed"));
        let infos = events.count(is_new_info);
        let d = Daemon::start(&dir, &args(&dir, c.port));
        assert!(
            d.wait_log("STATE_CLOUD_CONNECTED", T),
            "step {i}: {}",
            d.log_text()
        );
        assert_eq!(read_file(&dir.join("device.conf")), new_conf(1), "step {i}");
        assert!(info_under_new_did(&events, infos + 1), "step {i}");
        assert_eq!(
            d.log_line("device did")
                .map(|l| l.contains(&format!("did {NEW_DID}"))),
            Some(conf == new_conf(1)),
            "step {i}: a restart after the store starts under the new did"
        );
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".device.conf"))
            .collect();
        assert!(leftovers.len() <= 1, "step {i}: {leftovers:?}");
        assert_no_key(&d);
    }
}

/// The shipped helper (`etc/miio/miio_client_helper.sh`) under BusyBox sh for a did 0 device: it
/// answers both did/key steps at once (no 10 s fallback), keeps the token without `wifi.conf`,
/// and stores the assignment in `device.conf` itself, every other line kept.
#[test]
fn shipped_helper_under_busybox_stores_the_assigned_identity() {
    if Command::new("busybox").arg("true").status().is_err() {
        skip("busybox");
        return;
    }
    let c = cloud(0, &[]);
    let dir = TempDir::new("didkey-sh");
    // CRLF lines and a mode of its own, both of which the helper keeps.
    let conf = boot_conf(0).replace('\n', "\r\n");
    dir.write("device.conf", &conf);
    use std::os::unix::fs::PermissionsExt;
    let perm = std::fs::Permissions::from_mode(0o640);
    std::fs::set_permissions(dir.join("device.conf"), perm).unwrap();
    dir.write("device.token", "TokenOfDid0Dev01");
    let bin = TempDir::new("didkey-sh-bin");
    for a in ["miio_recv_line", "miio_send_line"] {
        std::os::unix::fs::symlink(BIN, bin.join(a)).unwrap();
    }
    // A grace far longer than the test: only the helper can bring the daemon on.
    let mut a = args(&dir, c.port);
    set_opt(&mut a, "--helper-grace", "60");
    let d = Daemon::start(&dir, &a);
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/etc/miio/miio_client_helper.sh"
    );
    let helper_log = dir.join("helper.log");
    let mut helper = Command::new("busybox")
        .args(["sh", script])
        .env("MIIO_BIN_DIR", bin.path())
        .env("MIIO_LOCAL_PORT", d.local().to_string())
        .env("MIIO_DATADIR", dir.dir_arg())
        .env("MIIO_WIFI_START", "/bin/true")
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&helper_log).unwrap())
        .stderr(std::fs::File::create(dir.join("helper.err")).unwrap())
        .spawn()
        .expect("busybox sh");
    let ok = d.wait_log("STATE_CLOUD_CONNECTED", T);
    let _ = helper.kill();
    let _ = helper.wait();
    let log = d.log_text();
    assert!(ok, "{log}\nhelper: {}", read_file(&dir.join("helper.err")));
    for line in [
        "helper answered _internal.res_didkeymac",
        "helper answered _internal.res_didkeymac2",
        "the helper stored the new identity",
    ] {
        assert!(log.contains(line), "{line}: {log}");
    }
    assert!(
        !log.contains("stored the new identity in device.conf"),
        "{log}"
    );
    assert_eq!(
        read_file(&dir.join("device.conf")),
        new_conf(0).replace('\n', "\r\n")
    );
    let mode = std::fs::metadata(dir.join("device.conf"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o640);
    assert_eq!(read_file(&dir.join("device.token")), "TokenOfDid0Dev01");
    assert_no_key(&d);
}

fn write_exec(path: &std::path::Path, text: &str) {
    std::fs::write(path, text).unwrap();
    let _ = Command::new("chmod").arg("755").arg(path).status();
}

/// The shipped helper with the shipped `wifi_start.sh` (udhcpc, ifconfig and the Wi-Fi tools
/// stubbed): the board came up under did 0 with udhcpc sending `…_miio0`; after the assignment
/// udhcpc is started again with the hostname of the new did, asking for the address it had.
#[test]
fn shipped_helper_restarts_udhcpc_under_the_assigned_did() {
    if Command::new("busybox").arg("true").status().is_err() {
        skip("busybox");
        return;
    }
    let c = cloud(0, &[]);
    let dir = TempDir::new("didkey-rehost");
    dir.write("device.conf", &boot_conf(0));
    dir.write("wifi.conf", "ssid=\"x\"\npsk=\"pw123456\"\nkey_mgmt=WPA\n");
    dir.write("device.token", "TokenOfDid0Dev01");
    let run = TempDir::new("didkey-rehost-run");
    let stubs = TempDir::new("didkey-rehost-stubs");
    let log = run.join("cmds");
    // udhcpc: logs its arguments and stays under its pid file, as with a lease: a `cat` of a
    // closed gate, which runs until it is killed or the gate opens at the end of the test.
    let lease = Gate::closed(run.join("lease"));
    write_exec(
        &stubs.join("udhcpc"),
        &format!(
            "#!/bin/sh\necho \"udhcpc $*\" >>'{}'\npf=\nwhile [ $# -gt 0 ]; do\n\tcase $1 in -p) pf=$2; shift ;; esac\n\tshift\ndone\ncat '{}' </dev/null >/dev/null 2>&1 &\necho $! >\"$pf\"\n",
            log.display(),
            run.join("lease").display()
        ),
    );
    write_exec(
        &stubs.join("ifconfig"),
        "#!/bin/sh\n[ $# -eq 1 ] && echo '          inet addr:192.168.1.57  Bcast:192.168.1.255  Mask:255.255.255.0'\nexit 0\n",
    );
    write_exec(&stubs.join("wpa_supplicant"), "#!/bin/sh\nexit 0\n");
    write_exec(
        &stubs.join("wpa_cli"),
        "#!/bin/sh\necho wpa_state=COMPLETED\n",
    );
    let wifi_start = concat!(env!("CARGO_MANIFEST_DIR"), "/etc/miio/wifi_start.sh");
    let env = |cmd: &mut Command| {
        cmd.env("MIIO_DATADIR", dir.dir_arg())
            .env("MIIO_RUN_DIR", run.path())
            .env("MIIO_WIFI_START", wifi_start)
            .env("MIIO_IP", stubs.join("none"));
        for name in ["udhcpc", "ifconfig", "wpa_supplicant", "wpa_cli"] {
            cmd.env(format!("MIIO_{}", name.to_uppercase()), stubs.join(name));
        }
    };
    // The board's start, before the daemon: udhcpc under the bootstrap did.
    let mut start = Command::new("busybox");
    start.args(["sh", wifi_start, "sta"]);
    env(&mut start);
    let out = start.output().expect("busybox sh");
    assert!(out.status.success(), "{out:?}");
    let pidfile = run.join("udhcpc.pid");
    let first = read_file(&pidfile).trim().to_owned();
    assert!(
        read_file(&log).contains("-x hostname:acme-dev-v1_miio0"),
        "{}",
        read_file(&log)
    );

    let bin = TempDir::new("didkey-rehost-bin");
    for a in ["miio_recv_line", "miio_send_line"] {
        std::os::unix::fs::symlink(BIN, bin.join(a)).unwrap();
    }
    let mut a = args(&dir, c.port);
    set_opt(&mut a, "--helper-grace", "60");
    let d = Daemon::start(&dir, &a);
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/etc/miio/miio_client_helper.sh"
    );
    let mut helper = Command::new("busybox");
    helper
        .args(["sh", script])
        .env("MIIO_BIN_DIR", bin.path())
        .env("MIIO_LOCAL_PORT", d.local().to_string())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join("helper.err")).unwrap());
    env(&mut helper);
    let mut helper = helper.spawn().expect("busybox sh");
    let restarted = wait_until(T, || {
        read_file(&log)
            .lines()
            .any(|l| l.contains("-x hostname:acme-dev-v1_miio555"))
    });
    let ok = d.wait_log("STATE_CLOUD_CONNECTED", T);
    let _ = helper.kill();
    let _ = helper.wait();
    let last = read_file(&pidfile).trim().to_owned();
    drop(lease);
    let cmds = read_file(&log);
    let helper_err = read_file(&dir.join("helper.err"));
    assert!(restarted, "{cmds}\nhelper: {helper_err}");
    assert!(ok, "{}\nhelper: {helper_err}", d.log_text());
    let lines: Vec<&str> = cmds.lines().filter(|l| l.starts_with("udhcpc")).collect();
    assert_eq!(lines.len(), 2, "{cmds}");
    assert!(
        lines[1].contains("-r 192.168.1.57 -x hostname:acme-dev-v1_miio555"),
        "{cmds}"
    );
    assert!(
        d.log_text().contains("the helper stored the new identity"),
        "{}",
        d.log_text()
    );
    assert_ne!(first, last);
}
