//! Shared helpers of the end-to-end tests: free ports, a temp data dir, the real binary, and
//! waiting for a condition with a deadline (never a bare sleep).
#![allow(dead_code)]

use std::io::Read;
use std::net::{TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_miio_client");

/// A port free for both TCP and UDP on loopback at the time of the call.
pub fn free_port() -> u16 {
    loop {
        let t = TcpListener::bind("127.0.0.1:0").expect("bind tcp");
        let p = t.local_addr().unwrap().port();
        if UdpSocket::bind(("0.0.0.0", p)).is_ok() {
            return p;
        }
    }
}

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "miio-test-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
    pub fn write(&self, name: &str, text: &str) {
        std::fs::write(self.join(name), text).unwrap();
    }
    pub fn dir_arg(&self) -> String {
        format!("{}/", self.0.display())
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub const GOOD_DEVICE_CONF: &str =
    "# test device\ndid=123456789\nkey=YWJjZGVmZ2hpamts\nmac=AA:BB:CC:01:02:03\nvendor=acme\nmodel=acme.dev.v1\n";

/// Polls `cond` until it holds or `limit` passes. The poll interval is short and bounded; the
/// deadline is what makes the test fail instead of hang.
pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::park_timeout(Duration::from_millis(20));
    }
}

pub fn read_file(p: &Path) -> String {
    let mut s = String::new();
    if let Ok(mut f) = std::fs::File::open(p) {
        let _ = f.read_to_string(&mut s);
    }
    s
}

/// The daemon under test, killed on drop.
pub struct Daemon {
    pub child: Child,
    pub log: PathBuf,
}

impl Daemon {
    /// Starts the binary with `-L <dir>/miio.log` plus `args`; stdout/stderr discarded.
    pub fn start(dir: &TempDir, args: &[&str]) -> Daemon {
        let log = dir.join("miio.log");
        let child = Command::new(BIN)
            .args(["-L", log.to_str().unwrap()])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn miio_client");
        Daemon { child, log }
    }
    pub fn log_text(&self) -> String {
        read_file(&self.log)
    }
    pub fn wait_log(&self, needle: &str, limit: Duration) -> bool {
        wait_until(limit, || self.log_text().contains(needle))
    }
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill -{sig} failed");
    }
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
    /// Waits for the exit status with a deadline.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let mut code = None;
        wait_until(limit, || match self.child.try_wait() {
            Ok(Some(st)) => {
                code = Some(st.code().unwrap_or(-1));
                true
            }
            _ => false,
        });
        code
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Base arguments: a data dir and free ports for every listener.
pub fn base_args(dir: &TempDir) -> Vec<String> {
    vec![
        "-d".into(),
        dir.dir_arg(),
        "--lan-port".into(),
        free_port().to_string(),
        "--local-port".into(),
        free_port().to_string(),
        "--ble-port".into(),
        free_port().to_string(),
        "--os-release".into(),
        dir.join("os-release").display().to_string(),
        // No multicast from tests; tests/mdns.rs turns it on with a port of its own.
        "--no-mdns".into(),
    ]
}

/// Sets the value of `opt` in an argument list made by `base_args` (every port there is free).
pub fn set_opt(args: &mut [String], opt: &str, value: impl ToString) {
    let i = args
        .iter()
        .position(|x| x == opt)
        .unwrap_or_else(|| panic!("{opt} not in the arguments"));
    args[i + 1] = value.to_string();
}

/// `MIIO_REQUIRE_ALL=1` (set by .ci/run) turns a missing outside tool into a failure.
pub fn skip(tool: &str) -> bool {
    if std::env::var("MIIO_REQUIRE_ALL").is_ok_and(|v| v == "1") {
        panic!("{tool} is required (MIIO_REQUIRE_ALL=1) but missing");
    }
    eprintln!("SKIP {tool}");
    true
}

/// The python3 that tests use for outside peers: `MIIO_PYTHON`, else the venv .ci/run builds, else python3.
pub fn python() -> String {
    if let Ok(p) = std::env::var("MIIO_PYTHON") {
        return p;
    }
    let venv = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/.venv/bin/python3");
    if Path::new(venv).exists() {
        return venv.into();
    }
    "python3".into()
}

/// Whether `python()` can import `module`.
pub fn python_has(module: &str) -> bool {
    Command::new(python())
        .args(["-c", &format!("import {module}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A line-oriented child (python cloud, fake cloud control) whose stdout lines are collected.
pub struct Lines {
    pub child: Child,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    stdin: Option<std::process::ChildStdin>,
}

impl Lines {
    pub fn spawn(mut cmd: Command) -> Lines {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn child");
        let out = child.stdout.take().unwrap();
        let stdin = child.stdin.take();
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let l2 = lines.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                l2.lock().unwrap().push(line);
            }
        });
        Lines {
            child,
            lines,
            stdin,
        }
    }
    pub fn all(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }
    pub fn json(&self) -> Vec<serde_json::Value> {
        self.all()
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
    /// Waits for a JSON line matching `pred` and returns it.
    pub fn wait(
        &self,
        limit: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Option<serde_json::Value> {
        let mut hit = None;
        wait_until(limit, || {
            hit = self.json().into_iter().find(|v| pred(v));
            hit.is_some()
        });
        hit
    }
    pub fn count(&self, pred: impl Fn(&serde_json::Value) -> bool) -> usize {
        self.json().iter().filter(|v| pred(v)).count()
    }
    pub fn send(&mut self, line: &str) {
        use std::io::Write;
        let s = self.stdin.as_mut().expect("stdin");
        s.write_all(line.as_bytes()).unwrap();
        s.write_all(b"\n").unwrap();
        s.flush().unwrap();
    }
}

impl Drop for Lines {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A local API client on 54322 (raw JSON objects back to back).
pub struct LocalClient {
    pub stream: std::net::TcpStream,
    buf: Vec<u8>,
}

impl LocalClient {
    pub fn connect(port: u16) -> LocalClient {
        let mut last = None;
        for _ in 0..100 {
            match std::net::TcpStream::connect(("127.0.0.1", port)) {
                Ok(s) => {
                    s.set_read_timeout(Some(Duration::from_millis(100)))
                        .unwrap();
                    return LocalClient {
                        stream: s,
                        buf: Vec::new(),
                    };
                }
                Err(e) => {
                    last = Some(e);
                    std::thread::park_timeout(Duration::from_millis(50));
                }
            }
        }
        panic!("connect 127.0.0.1:{port}: {last:?}");
    }
    pub fn send(&mut self, text: &str) {
        use std::io::Write;
        self.stream.write_all(text.as_bytes()).unwrap();
    }
    fn fill(&mut self) -> bool {
        use std::io::Read;
        let mut b = [0u8; 4096];
        match self.stream.read(&mut b) {
            Ok(0) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&b[..n]);
                true
            }
            Err(_) => true,
        }
    }
    /// Next complete object, or None at the deadline / EOF.
    pub fn recv(&mut self, limit: Duration) -> Option<serde_json::Value> {
        let end = Instant::now() + limit;
        loop {
            let mut it =
                serde_json::Deserializer::from_slice(&self.buf).into_iter::<serde_json::Value>();
            if let Some(Ok(v)) = it.next() {
                let used = it.byte_offset();
                self.buf.drain(..used);
                return Some(v);
            }
            if Instant::now() >= end || !self.fill() {
                return None;
            }
        }
    }
    /// Reads until a message matching `pred` arrives; returns it.
    pub fn recv_until(
        &mut self,
        limit: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Option<serde_json::Value> {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            if let Some(v) = self.recv(end - Instant::now()) {
                if pred(&v) {
                    return Some(v);
                }
            } else {
                return None;
            }
        }
        None
    }
}

/// The daemon's args for a provisioned device against a cloud on 127.0.0.1:`port`.
pub fn provisioned_dir(tag: &str) -> TempDir {
    let dir = TempDir::new(tag);
    dir.write("device.conf", GOOD_DEVICE_CONF);
    dir.write("device.token", "ABCDEFGHIJKLMNOP");
    dir.write(
        "wifi.conf",
        "ssid=\"home\"\npsk=\"secretpw\"\nkey_mgmt=WPA\n",
    );
    dir
}

pub const DID: u64 = 123456789;
pub const KEY: &str = "YWJjZGVmZ2hpamts";

/// A lock file for tests that must bind a fixed port (python-miio's hello goes to 54321).
pub struct PortLock(PathBuf);

impl PortLock {
    pub fn take(port: u16) -> PortLock {
        let p = std::env::temp_dir().join(format!("miio-test-port-{port}.lock"));
        loop {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&p)
            {
                Ok(mut f) => {
                    use std::io::Write;
                    let _ = write!(f, "{}", std::process::id());
                    return PortLock(p);
                }
                Err(_) => {
                    // A lock left by a killed run: stale when its pid is gone.
                    let stale = std::fs::read_to_string(&p)
                        .ok()
                        .and_then(|s| s.trim().parse::<u32>().ok())
                        .is_none_or(|pid| !Path::new(&format!("/proc/{pid}")).exists());
                    if stale {
                        let _ = std::fs::remove_file(&p);
                    }
                    std::thread::park_timeout(Duration::from_millis(50));
                }
            }
        }
    }
}

impl Drop for PortLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The LAN token of `provisioned_dir`.
pub const TOKEN: &[u8; 16] = b"ABCDEFGHIJKLMNOP";

/// A raw LAN phone on UDP, built on the crate's own codec.
pub struct Phone {
    pub sock: std::net::UdpSocket,
    pub port: u16,
    pub keys: miio_client::wire::crypto::Keys,
}

impl Phone {
    pub fn new(port: u16, token: &[u8; 16]) -> Phone {
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        Phone {
            sock,
            port,
            keys: miio_client::wire::crypto::Keys::new(token),
        }
    }
    pub fn raw(&self, bytes: &[u8]) {
        self.sock.send_to(bytes, ("127.0.0.1", self.port)).unwrap();
    }
    pub fn recv(&self, limit: Duration) -> Option<Vec<u8>> {
        let end = std::time::Instant::now() + limit;
        let mut buf = vec![0u8; 65536];
        while std::time::Instant::now() < end {
            if let Ok((n, _)) = self.sock.recv_from(&mut buf) {
                return Some(buf[..n].to_vec());
            }
        }
        None
    }
    pub fn hello(&self) -> Option<Vec<u8>> {
        self.raw(&miio_client::wire::miio::lan_hello());
        self.recv(Duration::from_secs(10))
    }
    pub fn packet(&self, stamp: u32, json: &str) -> Vec<u8> {
        miio_client::wire::miio::seal(&self.keys, DID as u32, stamp, json.as_bytes())
    }
    pub fn call(&self, stamp: u32, json: &str, limit: Duration) -> Option<serde_json::Value> {
        self.raw(&self.packet(stamp, json));
        let r = self.recv(limit)?;
        let o = miio_client::wire::miio::decode(&self.keys, DID as u32, &r).ok()?;
        Some(serde_json::Value::Object(o.value))
    }
    /// A good miIO.info is answered. Retried like a real phone does, since a flood may have
    /// filled the socket buffer and the kernel dropped the request itself.
    pub fn info_ok(&self, id: u64) -> bool {
        (0..5).any(|k| {
            let id = id * 10 + k;
            let req = format!(r#"{{"id":{id},"method":"miIO.info","params":[]}}"#);
            self.raw(&self.packet(100, &req));
            let end = std::time::Instant::now() + Duration::from_secs(2);
            while let Some(r) = self.recv(end.saturating_duration_since(std::time::Instant::now()))
            {
                if let Ok(o) = miio_client::wire::miio::decode(&self.keys, DID as u32, &r) {
                    if o.value["id"] == id && o.value["result"]["model"] == "acme.dev.v1" {
                        return true;
                    }
                }
            }
            false
        })
    }
}

/// The independent Python cloud (tests/pycloud) on a free port, or a visible skip without
/// python3 + cryptography.
pub struct Py {
    pub cloud: Lines,
    pub port: u16,
}

pub fn pycloud() -> Option<Py> {
    if !python_has("cryptography") {
        skip("python3 with cryptography");
        return None;
    }
    let mut c = Command::new(python());
    c.args([
        concat!(env!("CARGO_MANIFEST_DIR"), "/tests/pycloud/ocloud.py"),
        "--port",
        "0",
        "--did",
        &DID.to_string(),
        "--key",
        KEY,
    ]);
    let cloud = Lines::spawn(c);
    let l = cloud
        .wait(Duration::from_secs(15), |v| v["ev"] == "listening")
        .expect("python cloud listening");
    let port = l["port"].as_u64().unwrap() as u16;
    Some(Py { cloud, port })
}

/// `miio_fakecloud` (the product's own fake cloud) for the test device on `port`, control on `ctl`.
pub fn fakecloud(port: u16, ctl: u16) -> Lines {
    let mut c = Command::new(BIN);
    c.args([
        "miio_fakecloud",
        "--port",
        &port.to_string(),
        "--ctl-port",
        &ctl.to_string(),
        "--did",
        &DID.to_string(),
        "--key",
        KEY,
    ]);
    Lines::spawn(c)
}
