//! miio_ota end to end (LOCAL_API.md §14): the real daemon against `miio_fakecloud`, which pushes
//! `miIO.ota` and sees the `props` reports; the real `miio_ota` on 54322 (and through the real
//! `miio_agent`); the shipped `ota_download.sh` under BusyBox sh with BusyBox wget, fetching from
//! Python's `http.server` on a free port, or from a small server that cuts the transfer. Every port
//! is a free one; every wait has a deadline.
#![cfg(feature = "ota")]

mod common;
use common::*;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const T: Duration = Duration::from_secs(20);

fn tools() -> bool {
    let bb = Command::new("busybox")
        .args(["wget", "--help"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if !bb {
        return !skip("busybox");
    }
    if !python_has("http.server") {
        return !skip("python3");
    }
    true
}

fn shipped(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("etc/miio")
        .join(name)
}

/// What one test runs: the cloud and its event stream, the daemon, an HTTP server, miio_ota.
struct Env {
    cloud: FakeCloudProc,
    events: Lines,
    dir: TempDir,
    daemon: Daemon,
    _http: Lines,
    http: u16,
    ota: Option<Child>,
    agent: Option<Lines>,
    gates: std::cell::RefCell<std::collections::HashMap<String, Gate>>,
}

fn write_exec(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

impl Env {
    fn new(tag: &str) -> Env {
        let cloud = fakecloud();
        let mut watch = Command::new(BIN);
        watch.args([
            "miio_fakecloud",
            "ctl",
            "--ctl-port",
            &cloud.ctl.to_string(),
        ]);
        watch.arg(r#"{"cmd":"watch"}"#);
        let events = Lines::spawn(watch);
        let dir = provisioned_dir(tag);
        let a = cloud_args(&dir, cloud.port)
            .link("tcp")
            .opt("--user-ack-timeout", 1)
            .build();
        let daemon = Daemon::start(&dir, &a);
        assert!(
            daemon.wait_log("STATE_CLOUD_CONNECTED", T),
            "{}",
            daemon.log_text()
        );

        // The files served, and the test's own wrappers of the commands.
        let www = dir.join("www");
        std::fs::create_dir(&www).unwrap();
        let mut c = Command::new(python());
        // `python3 -m http.server --bind 127.0.0.1 0` without its request log on stderr.
        c.args([
            "-u",
            "-c",
            "import http.server as h; h.SimpleHTTPRequestHandler.log_message = lambda *a: None; \
             h.test(HandlerClass=h.SimpleHTTPRequestHandler, port=0, bind='127.0.0.1')",
        ])
        .current_dir(&www);
        let http_out = Lines::spawn(c);
        let line = http_out
            .wait_line(T, |l| l.contains(" port "))
            .expect("http.server started");
        let http: u16 = line
            .split(" port ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|p| p.parse().ok())
            .expect("its port");
        let bin = dir.join("bin");
        std::fs::create_dir(&bin).unwrap();
        std::os::unix::fs::symlink(which_busybox(), bin.join("wget")).unwrap();
        // The download: the URL as received is kept byte for byte, its pid noted, a gate (FIFO)
        // holds it, then the shipped script under BusyBox sh does the work.
        write_exec(
            &dir.join("download.sh"),
            &format!(
                "#!/bin/sh\nd={d}\nprintf '%s' \"$1\" >\"$d/url.got\"\necho $# >\"$d/argc.got\"\n\
                 echo $$ >\"$d/dl.pid\"\n\
                 [ -p \"$d/hold_dl\" ] && read -r _ <\"$d/hold_dl\"\n\
                 PATH=\"$d/bin:$PATH\" exec busybox sh {s} \"$@\"\n",
                d = dir.path().display(),
                s = shipped("ota_download.sh").display()
            ),
        );
        // The install: held by a gate, records its environment, exits with install_rc.
        write_exec(
            &dir.join("install.sh"),
            &format!(
                "#!/bin/sh\nd={d}\n[ -p \"$d/hold_in\" ] && read -r _ <\"$d/hold_in\"\n\
                 echo \"$MIIO_OTA_MODE $MIIO_OTA_MD5 $(md5sum <\"$1\" | cut -c1-32)\" >>\"$d/installs\"\n\
                 exit $(cat \"$d/install_rc\" 2>/dev/null || echo 0)\n",
                d = dir.path().display()
            ),
        );
        let port = daemon.local();
        let mut e = Env {
            cloud,
            events,
            dir,
            daemon,
            _http: http_out,
            http,
            ota: None,
            agent: None,
            gates: Default::default(),
        };
        e.start_ota(port, &[]);
        e
    }

    fn start_ota(&mut self, port: u16, extra: &[&str]) {
        let log = self.dir.join("ota.log");
        let child = Command::new(BIN)
            .args(["miio_ota", "--port", &port.to_string(), "--ota-dir"])
            .arg(self.dir.join("ota"))
            .arg("--download-cmd")
            .arg(self.dir.join("download.sh"))
            .arg("--install-cmd")
            .arg(self.dir.join("install.sh"))
            .args(extra)
            .args(["-l", "3", "-L"])
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn miio_ota");
        self.ota = Some(child);
        assert!(
            wait_until(T, || self.ota_log().contains("ota: connected")),
            "{}",
            self.ota_log()
        );
        // Connected is not yet routed to: commands reach miio_ota once the daemon (or the agent)
        // has read its first message. A state query answered by miio_ota is the barrier.
        let mut id = 9000;
        assert!(
            wait_until(T, || {
                id += 1;
                self.send(&json!({"id":id,"method":"miIO.get_ota_state"}))
                    .get("result")
                    .is_some()
            }),
            "{}",
            self.ota_log()
        );
    }

    fn ota_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("ota.log")).unwrap_or_default()
    }

    fn serve(&self, name: &str, bytes: &[u8]) -> String {
        std::fs::write(self.dir.join("www").join(name), bytes).unwrap();
        format!("{:x}", md5_of(bytes))
    }

    /// Pushes `cmd` from the cloud and returns the device's reply.
    fn send(&self, cmd: &Value) -> Value {
        let out = Command::new(BIN)
            .args([
                "miio_fakecloud",
                "send",
                "--ctl-port",
                &self.cloud.ctl.to_string(),
            ])
            .args(["--did", &DID.to_string(), &cmd.to_string()])
            .stderr(Stdio::null())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .map(|v| {
                if v.get("json").is_some() {
                    v["json"].clone()
                } else {
                    v
                }
            })
            .find(|v| v.get("id").is_some() && v.get("method").is_none())
            .unwrap_or_else(|| panic!("no reply to {cmd}: {text}"))
    }

    fn ota(&self, id: u64, url: &str, md5: &str, proc: &str, mode: &str) -> Value {
        self.send(&json!({"id":id,"method":"miIO.ota","params":{
            "app_url":url,"file_md5":md5,"proc":proc,"mode":mode}}))
    }

    fn state(&self, id: u64) -> Value {
        self.send(&json!({"id":id,"method":"miIO.get_ota_state","params":{}}))["result"][0].clone()
    }

    fn progress(&self, id: u64) -> Value {
        self.send(&json!({"id":id,"method":"miIO.get_ota_progress","params":{}}))["result"][0]
            .clone()
    }

    /// Waits until the cloud has seen `n` `ota_state` reports in all; returns them in order.
    fn states(&self, n: usize) -> Vec<String> {
        let got = self.events.wait_all(T, n, |v| {
            // The daemon's own `idle` after a cloud connect (D12) is not miio_ota's.
            v["ev"] == "msg"
                && v["dir"] == "in"
                && v["json"]["params"]["ota_state"].is_string()
                && v["json"]["params"]["ota_state"] != "idle"
        });
        got.iter()
            .map(|v| {
                v["json"]["params"]["ota_state"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect()
    }

    /// The `ota_progress` reports seen by the cloud up to its first 100 (waited for).
    fn progresses(&self) -> Vec<u64> {
        let is_p = |v: &Value| {
            v["ev"] == "msg" && v["dir"] == "in" && v["json"]["params"]["ota_progress"].is_u64()
        };
        let p = |v: &Value| v["json"]["params"]["ota_progress"].as_u64().unwrap();
        self.events
            .wait(T, |v| is_p(v) && p(v) == 100)
            .expect("progress 100");
        let all: Vec<u64> = self
            .events
            .json()
            .iter()
            .filter(|v| is_p(v))
            .map(p)
            .collect();
        let end = all.iter().position(|&x| x == 100).unwrap();
        all[..=end].to_vec()
    }

    /// Closes (`on`) or opens the gate `name` of the download or install stub (a FIFO, see
    /// `Gate`).
    fn hold(&self, name: &str, on: bool) {
        let mut gates = self.gates.borrow_mut();
        if on {
            let gate = Gate::closed(self.dir.join(name));
            assert!(
                gates.insert(name.to_string(), gate).is_none(),
                "{name} held"
            );
        } else {
            gates.remove(name).expect("a gate held").open();
        }
    }

    fn installs(&self) -> Vec<String> {
        read_file(&self.dir.join("installs"))
            .lines()
            .map(String::from)
            .collect()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(mut c) = self.ota.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.agent.take();
    }
}

fn which_busybox() -> PathBuf {
    find("busybox").expect("busybox")
}

fn md5_of(b: &[u8]) -> u128 {
    use md5::{Digest, Md5};
    u128::from_be_bytes(Md5::digest(b).into())
}

fn ok(v: &Value) {
    assert_eq!(v["result"], json!(["OK"]), "{v}");
}

/// A server that answers every connection with a Content-Length of 100000 and closes after half.
fn cutting_server() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut s in l.incoming().map_while(Result::ok) {
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let _ = s.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 100000\r\n\r\n");
            let _ = s.write_all(&[b'x'; 50000]);
        }
    });
    port
}

fn payload(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
}

/// The whole life of jobs on 54322, each step answered to `get_ota_state`/`get_ota_progress`.
fn jobs(e: &Env) {
    let fw = payload(300_000);
    let md5 = e.serve("fw.bin", &fw);
    let url = format!("http://127.0.0.1:{}/fw.bin", e.http);
    assert_eq!(e.state(1), "idle");
    assert_eq!(e.progress(2), 0);

    // dnld install, normal: downloading → progress → installing → installed.
    e.hold("hold_dl", true);
    e.hold("hold_in", true);
    ok(&e.ota(10, &url, &md5, "dnld install", "normal"));
    assert_eq!(e.states(1), ["downloading"]);
    assert_eq!(e.state(11), "downloading");
    assert_eq!(e.progress(12), 0);
    // A second job while one runs: busy (held by the daemon as a fallback, D16, then sent).
    let busy = e.ota(13, &url, &md5, "dnld", "normal");
    assert_eq!(
        busy["error"],
        json!({"code":-10000,"message":"busy"}),
        "{busy}"
    );
    e.hold("hold_dl", false);
    assert_eq!(e.states(2), ["downloading", "installing"]);
    assert_eq!(e.state(14), "installing");
    assert_eq!(e.progress(15), 100);
    let p = e.progresses();
    assert_eq!(p.first(), Some(&0));
    assert_eq!(p.last(), Some(&100), "{p:?}");
    assert!(p.windows(2).all(|w| w[0] < w[1] && w[1] % 10 == 0), "{p:?}");
    e.hold("hold_in", false);
    assert_eq!(e.states(3)[2], "installed");
    assert_eq!(e.state(16), "installed");
    assert_eq!(e.installs(), [format!("normal {md5} {md5}")]);

    // dnld silent → wait_install; then install → installed without a second download.
    let fw2 = payload(200_000);
    let md5b = e.serve("fw2.bin", &fw2);
    let url2 = format!("http://127.0.0.1:{}/fw2.bin", e.http);
    ok(&e.ota(20, &url2, &md5b, "dnld", "silent"));
    assert_eq!(e.states(5)[3..], ["downloading", "wait_install"]);
    assert_eq!(e.state(21), "wait_install");
    assert_eq!(e.progress(22), 100);
    std::fs::remove_file(e.dir.join("url.got")).unwrap();
    ok(&e.ota(23, &url2, &md5b, "install", "silent"));
    assert_eq!(e.states(7)[5..], ["installing", "installed"]);
    assert!(!e.dir.join("url.got").exists(), "no second download");
    assert_eq!(e.installs()[1], format!("silent {md5b} {md5b}"));

    // A wrong md5: down error, the file removed.
    ok(&e.ota(30, &url, &"0".repeat(32), "dnld install", "normal"));
    assert_eq!(
        e.states(9)[7..],
        ["downloading", "failed|-33001|down error"]
    );
    assert_eq!(e.state(31), "failed");
    assert_eq!(e.progress(32), 0);
    assert!(!e.dir.join("ota/ota.bin").exists());

    // The server gone: connect error.
    let dead = DeadPort::new();
    let gone = format!("http://127.0.0.1:{}/fw.bin", dead.port);
    ok(&e.ota(40, &gone, &md5, "dnld install", "normal"));
    assert_eq!(
        e.states(11)[9..],
        ["downloading", "failed|-33003|connect error"]
    );

    // The transfer cut halfway: disconnect, no partial file left.
    let cut = format!("http://127.0.0.1:{}/fw.bin", cutting_server());
    ok(&e.ota(50, &cut, &md5, "dnld install", "normal"));
    assert_eq!(
        e.states(13)[11..],
        ["downloading", "failed|-33004|disconnect"]
    );
    assert!(!e.dir.join("ota/ota.bin").exists());

    // The install script fails: install error.
    std::fs::write(e.dir.join("install_rc"), "1").unwrap();
    ok(&e.ota(60, &url, &md5, "dnld install", "normal"));
    assert_eq!(
        e.states(16)[13..],
        ["downloading", "installing", "failed|-33005|install error"]
    );
    std::fs::remove_file(e.dir.join("install_rc")).unwrap();

    // dnld, normal mode: downloaded, waiting for an install.
    ok(&e.ota(70, &url, &md5, "dnld", "normal"));
    assert_eq!(e.states(18)[16..], ["downloading", "downloaded"]);
    assert_eq!(e.state(71), "downloaded");
    assert_eq!(e.progress(72), 100);
}

#[test]
fn jobs_on_54322() {
    if !tools() {
        return;
    }
    let e = Env::new("ota-e2e");
    jobs(&e);
    // Other commands are not answered by miio_ota: the daemon's -9999 comes.
    let v = e.send(&json!({"id":90,"method":"get_prop","params":[]}));
    assert_eq!(v["error"]["code"], -9999, "{v}");
    let _ = &e.daemon;
}

#[test]
fn jobs_through_miio_agent() {
    if !tools() {
        return;
    }
    let mut e = Env::new("ota-agent");
    // The same miio_ota, now behind the agent: the one on 54322 goes.
    if let Some(mut c) = e.ota.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
    let _ = std::fs::remove_file(e.dir.join("ota.log"));
    let mut a = Command::new(BIN);
    a.args(["miio_agent", "--port", "0", "--daemon-port"])
        .arg(e.daemon.local().to_string())
        .args(["-l", "3"]);
    let agent = Lines::spawn(a);
    let line = agent
        .wait_line(T, |l| l.contains("bound: agent tcp 127.0.0.1:"))
        .expect("the agent started");
    let port: u16 = line
        .split("127.0.0.1:")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .and_then(|p| p.parse().ok())
        .unwrap();
    assert!(agent
        .wait_line(T, |l| l.contains("agent: connected to the daemon"))
        .is_some());
    e.agent = Some(agent);
    // start_ota's barrier: the four registrations are in once a state query is answered.
    e.start_ota(port, &["--agent"]);
    jobs(&e);
}

#[test]
fn a_hostile_url_is_one_argument_and_runs_nothing() {
    if !tools() {
        return;
    }
    let e = Env::new("ota-inject");
    let canary = e.dir.join("canary");
    let c = canary.display();
    let url = format!(
        "http://127.0.0.1:{}/x;touch${{IFS}}{c};$(touch${{IFS}}{c})`touch${{IFS}}{c}`'\"'\"|&>{c}",
        e.http
    );
    ok(&e.ota(1, &url, &"a".repeat(32), "dnld install", "normal"));
    assert_eq!(e.states(2), ["downloading", "failed|-33001|down error"]);
    assert_eq!(read_file(&e.dir.join("url.got")), url, "byte for byte");
    assert_eq!(read_file(&e.dir.join("argc.got")).trim(), "2");
    assert!(!canary.exists(), "something ran");

    for bad in [
        format!("http://127.0.0.1:{}/a b", e.http),
        format!("http://127.0.0.1:{}/a\nb", e.http),
        format!("http://127.0.0.1:{}/a\u{1}", e.http),
        "ftp://127.0.0.1/x".to_string(),
    ] {
        let v = e.ota(2, &bad, &"a".repeat(32), "dnld", "normal");
        assert_eq!(
            v["error"],
            json!({"code":-10000,"message":"invalid params"}),
            "{bad:?}: {v}"
        );
    }
    assert_eq!(e.state(3), "failed", "nothing started");
}

#[test]
fn sigterm_cancels_a_download() {
    if !tools() {
        return;
    }
    let mut e = Env::new("ota-term");
    let md5 = e.serve("fw.bin", &payload(1000));
    e.hold("hold_dl", true);
    let url = format!("http://127.0.0.1:{}/fw.bin", e.http);
    ok(&e.ota(1, &url, &md5, "dnld install", "normal"));
    assert_eq!(e.states(1), ["downloading"]);
    // The stub runs (its pid noted just before its gate).
    let dl_pid = e.dir.join("dl.pid");
    assert!(wait_until(T, || read_file(&dl_pid).ends_with('\n')));
    let pid = e.ota.as_ref().unwrap().id();
    let ok = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    assert_eq!(e.states(2)[1], "failed|-33006|cancel");
    let mut c = e.ota.take().unwrap();
    let status = wait_child(&mut c).expect("miio_ota exits");
    assert!(status.success(), "{status:?}");
    // The download's whole process group went with it: the stub blocked at its gate is gone
    // (a zombie until someone reaps it counts as gone), and nothing was written.
    let stub = read_file(&dl_pid).trim().to_string();
    let stat = PathBuf::from(format!("/proc/{stub}/stat"));
    assert!(
        wait_until(T, || read_file(&stat)
            .rsplit_once(") ")
            .is_none_or(|(_, st)| st.starts_with('Z'))),
        "the download stub {stub} still runs"
    );
    assert!(!e.dir.join("ota/ota.bin").exists());
    e.hold("hold_dl", false);
}

fn wait_child(c: &mut Child) -> Option<std::process::ExitStatus> {
    let mut st = None;
    wait_until(T, || {
        st = c.try_wait().ok().flatten();
        st.is_some()
    });
    st
}

/// L§14: the daemon names the version rule when `fw_ver` breaks it, and says
/// nothing when it keeps it.
#[test]
fn the_daemon_warns_of_a_fw_ver_that_breaks_the_rule() {
    for (v, warned) in [("2.1.1", true), ("2.1.1_9527", false)] {
        let dir = provisioned_dir("ota-fwver");
        dir.write("os-release", &format!("ACME_VERSION={v}\n"));
        let dead = DeadPort::new();
        let d = Daemon::start(&dir, &cloud_args(&dir, dead.port).build());
        // The warning comes before the `bound:` line Daemon::start waited for.
        assert_eq!(
            d.log_has("breaks the version rule x.y.z_nnnn"),
            warned,
            "{v}: {}",
            d.log_text()
        );
    }
}

/// `init.d/S52miio_ota` under BusyBox: start, restart, stop.
#[test]
fn init_script_start_restart_stop_under_busybox() {
    // The daemon is a port where nobody listens: miio_ota retries, and stops at once.
    let dead = DeadPort::new();
    let dir = TempDir::new("ota-initd");
    let args = format!(
        "--port {} --ota-dir {}",
        dead.port,
        dir.join("ota").display()
    );
    init_script_cycle(
        &dir,
        "S52miio_ota",
        "miio_ota",
        "MIIO_OTA",
        &args,
        "ota: to 127.0.0.1:",
    );
}
