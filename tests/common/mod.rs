//! Shared helpers of the end-to-end tests: a temp data dir, the real binary on ports it reports
//! itself, peers whose output is read line by line, and waiting for a condition with a deadline
//! (never a bare sleep, never an assertion on a snapshot of what a peer may not have said yet).
#![allow(dead_code)]

use std::io::Read;
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_miio_client");

/// The value of a port option that `Daemon::start` replaces with a fresh port on each attempt
/// (`base_args` puts it on every listener).
pub const AUTO: &str = "auto";

/// A port that was free for both TCP and UDP on loopback at the time of the call: only a
/// candidate, since someone else may bind it before the daemon does. `Daemon::start` therefore
/// retries with fresh ones when the daemon says its port is taken; no test depends on it staying
/// free.
fn candidate_port() -> u16 {
    loop {
        let t = TcpListener::bind("127.0.0.1:0").expect("bind tcp");
        let p = t.local_addr().unwrap().port();
        if UdpSocket::bind(("0.0.0.0", p)).is_ok() {
            return p;
        }
    }
}

/// A cloud address where nobody answers, held for the life of the value so that no other
/// process can take the port: UDP datagrams to it are queued and never read (hellos stay
/// unanswered, no ICMP error), TCP connections are refused (the socket is bound, not listening).
pub struct DeadPort {
    pub port: u16,
    _udp: UdpSocket,
    _tcp: std::os::fd::OwnedFd,
}

impl DeadPort {
    pub fn new() -> DeadPort {
        use std::os::fd::FromRawFd;
        for _ in 0..100 {
            let udp = UdpSocket::bind("127.0.0.1:0").expect("bind udp");
            let port = udp.local_addr().unwrap().port();
            // SAFETY: plain socket(2)/bind(2) on a zeroed sockaddr_in of the right size; the fd is
            // owned by the OwnedFd right after a successful socket().
            let tcp = unsafe {
                let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
                assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
                let fd = std::os::fd::OwnedFd::from_raw_fd(fd);
                let mut a: libc::sockaddr_in = std::mem::zeroed();
                a.sin_family = libc::AF_INET as libc::sa_family_t;
                a.sin_port = port.to_be();
                a.sin_addr.s_addr = u32::from(std::net::Ipv4Addr::LOCALHOST).to_be();
                let r = libc::bind(
                    std::os::fd::AsRawFd::as_raw_fd(&fd),
                    (&a as *const libc::sockaddr_in).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                );
                (r == 0).then_some(fd)
            };
            if let Some(tcp) = tcp {
                return DeadPort {
                    port,
                    _udp: udp,
                    _tcp: tcp,
                };
            }
        }
        panic!("no port free for both a UDP and a TCP socket");
    }
}

impl Default for DeadPort {
    fn default() -> Self {
        DeadPort::new()
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

/// The part of the daemon's log read so far: the file is read from the last offset, complete
/// lines only, so waiting for a line costs the new bytes, not the whole log again.
#[derive(Default)]
struct LogCursor {
    /// Bytes of the current file consumed (complete lines plus `partial`).
    offset: u64,
    /// Inode of the file the offset belongs to: a rotated (renamed) log starts a new file.
    ino: u64,
    /// Every complete line read, across rotations.
    text: String,
    /// A last line without its newline yet.
    partial: Vec<u8>,
    /// Per needle searched for: how far `text` was searched, and whether it was found.
    searched: std::collections::HashMap<String, (usize, bool)>,
}

impl LogCursor {
    /// Reads what was appended to `path`; returns where the new text starts (a line start).
    fn refresh(&mut self, path: &Path) -> usize {
        use std::io::{Seek, SeekFrom};
        use std::os::unix::fs::MetadataExt;
        let from = self.text.len();
        let Ok(mut f) = std::fs::File::open(path) else {
            return from;
        };
        let Ok(meta) = f.metadata() else { return from };
        if meta.ino() != self.ino || meta.len() < self.offset {
            self.ino = meta.ino();
            self.offset = 0;
            self.partial.clear();
        }
        if meta.len() == self.offset || f.seek(SeekFrom::Start(self.offset)).is_err() {
            return from;
        }
        let mut buf = Vec::new();
        let _ = f.read_to_end(&mut buf);
        self.offset += buf.len() as u64;
        self.partial.extend_from_slice(&buf);
        if let Some(nl) = self.partial.iter().rposition(|&b| b == b'\n') {
            let rest = self.partial.split_off(nl + 1);
            self.text.push_str(&String::from_utf8_lossy(&self.partial));
            self.partial = rest;
        }
        from
    }
}

/// The listening ports a daemon reported in its `bound:` line (None: off).
#[derive(Clone, Copy, Debug, Default)]
pub struct Ports {
    pub lan: Option<u16>,
    pub local: Option<u16>,
    pub ble: Option<u16>,
    pub mdns: Option<u16>,
}

/// The start-up line that names every listener (src/applets/client.rs `log_bound`).
pub const BOUND_LINE: &str = "[I] bound: ";
/// The daemon's line for a port in use (exit 1).
pub const QUIT_BOUND: &str = "Quit, maybe another miio_client is already running.";

impl Ports {
    /// `... [I] bound: LAN udp 0.0.0.0:1, local API tcp 127.0.0.1:2, BLE off, mDNS off`
    fn parse(line: &str) -> Option<Ports> {
        let rest = &line[line.find(BOUND_LINE)? + BOUND_LINE.len()..];
        let mut p = Ports::default();
        for item in rest.trim_end().split(", ") {
            let port = if item.ends_with(" off") {
                None
            } else {
                Some(item.rsplit(':').next()?.parse().ok()?)
            };
            let slot = if item.starts_with("LAN ") {
                &mut p.lan
            } else if item.starts_with("local API ") {
                &mut p.local
            } else if item.starts_with("BLE ") {
                &mut p.ble
            } else if item.starts_with("mDNS ") {
                &mut p.mdns
            } else {
                return None;
            };
            *slot = port;
        }
        Some(p)
    }
}

/// How long a start may take before the daemon has bound its sockets (a loaded machine).
const LAUNCH: Duration = Duration::from_secs(30);
/// Attempts with fresh ports before a clash is a failure.
const LAUNCH_ATTEMPTS: u32 = 8;

/// The daemon under test, killed on drop.
pub struct Daemon {
    pub child: Child,
    pub log: PathBuf,
    /// The ports it bound (all None for `Daemon::spawn` until `wait_bound`).
    pub ports: Ports,
    cursor: std::sync::Mutex<LogCursor>,
}

enum Launch {
    Bound(Ports),
    /// Exit 1 with the port-in-use line, or an AUTO port that could not be bound.
    Clash,
    Failed(String),
}

impl Daemon {
    /// Starts the binary with `-L <dir>/miio.log` plus `args` and waits until its listeners are
    /// bound (the `bound:` line). Every `AUTO` port value is a fresh candidate port on each
    /// attempt; when one turns out to be taken (exit 1 with the vendor's line, or an mDNS port
    /// it could not bind), the daemon is started again with fresh ones. The ports it got are in
    /// `ports` (and `lan()`, `local()`, `ble()`, `mdns()`).
    pub fn start<S: AsRef<str>>(dir: &TempDir, args: &[S]) -> Daemon {
        Daemon::start_via(&[], dir, args)
    }

    /// `start` with the binary run through `prefix` (a command that ends by exec'ing its next
    /// argument, the binary, with the rest: `unshare -m sh -c '…; exec "$0" "$@"'`).
    pub fn start_via<S: AsRef<str>>(prefix: &[&str], dir: &TempDir, args: &[S]) -> Daemon {
        let cmd: Vec<&str> = prefix.iter().copied().chain([BIN]).collect();
        Daemon::start_cmd(&cmd, dir, args)
    }

    /// `start` with `cmd` in place of the host build: the program and its leading arguments, e.g.
    /// `["qemu-mipsel-static", "target/static/mipsel/miio_client"]` (tests/board_e2e.rs).
    pub fn start_cmd<S: AsRef<str>>(cmd: &[&str], dir: &TempDir, args: &[S]) -> Daemon {
        let args: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
        let mut why = String::new();
        for attempt in 1..=LAUNCH_ATTEMPTS {
            let argv: Vec<String> = args
                .iter()
                .map(|a| {
                    if *a == AUTO {
                        candidate_port().to_string()
                    } else {
                        a.to_string()
                    }
                })
                .collect();
            let mut d = Daemon::spawn_cmd(cmd, dir, &argv);
            match d.launch(&args) {
                Launch::Bound(p) => {
                    d.ports = p;
                    return d;
                }
                Launch::Clash => {
                    why = d.log_text();
                    eprintln!("NOTE daemon start {attempt}: a port was taken; fresh ports");
                    drop(d);
                    // Keep the failed attempt's log for a reader, out of the way of the next.
                    let _ = std::fs::rename(
                        dir.join("miio.log"),
                        dir.join(&format!("miio.log.clash{attempt}")),
                    );
                }
                Launch::Failed(log) => panic!("the daemon did not start: {log}"),
            }
        }
        panic!("{LAUNCH_ATTEMPTS} starts, each with a port taken; last log:\n{why}");
    }

    /// Starts the binary with `-L <dir>/miio.log` plus `args`, as given, and returns at once
    /// (stdout/stderr discarded). For a test that wants the start to fail.
    pub fn spawn<S: AsRef<str>>(dir: &TempDir, args: &[S]) -> Daemon {
        Daemon::spawn_cmd(&[BIN], dir, args)
    }

    fn spawn_cmd<S: AsRef<str>>(cmd: &[&str], dir: &TempDir, args: &[S]) -> Daemon {
        let log = dir.join("miio.log");
        let (first, rest) = cmd.split_first().expect("a command");
        let child = Command::new(first)
            .args(rest)
            .args(["-L", log.to_str().unwrap()])
            .args(args.iter().map(AsRef::as_ref))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn miio_client");
        Daemon {
            child,
            log,
            ports: Ports::default(),
            cursor: Default::default(),
        }
    }

    /// Waits for the `bound:` line or the exit. A parent that exits 0 (-D) leaves the line to
    /// its detached child.
    fn launch(&mut self, asked: &[&str]) -> Launch {
        let mut out = None;
        let mut exited = None;
        wait_until(LAUNCH, || {
            if let Some(line) = self.log_line(BOUND_LINE) {
                out = Some(match Ports::parse(&line) {
                    Some(p) => p,
                    None => return true,
                });
                return true;
            }
            if exited.is_none() {
                exited = self.child.try_wait().ok().flatten();
            }
            matches!(exited, Some(st) if !st.success())
        });
        if let Some(p) = out {
            // An AUTO port the daemon runs without (mDNS only warns) was taken too.
            let auto = |opt: &str| {
                asked
                    .iter()
                    .position(|a| *a == opt)
                    .is_some_and(|i| asked.get(i + 1) == Some(&AUTO))
            };
            let mdns_on = !asked.contains(&"--no-mdns");
            if auto("--mdns-port") && mdns_on && p.mdns.is_none() {
                return Launch::Clash;
            }
            return Launch::Bound(p);
        }
        let log = self.log_text();
        if let Some(line) = self.log_line(BOUND_LINE) {
            return Launch::Failed(format!("unreadable {line:?}\n{log}"));
        }
        match exited {
            Some(st) if st.code() == Some(1) && log.contains(QUIT_BOUND) => Launch::Clash,
            Some(st) => Launch::Failed(format!("exit {st}, log:\n{log}")),
            None => Launch::Failed(format!(
                "no bound line within {LAUNCH:?} (an info line: -l 2 or more), log:\n{log}"
            )),
        }
    }

    /// The LAN port (panics when the daemon runs without one).
    pub fn lan(&self) -> u16 {
        self.ports.lan.expect("the daemon has no LAN port")
    }
    pub fn local(&self) -> u16 {
        self.ports.local.expect("the daemon has no local API port")
    }
    pub fn ble(&self) -> u16 {
        self.ports.ble.expect("the daemon has no BLE port")
    }
    pub fn mdns(&self) -> u16 {
        self.ports.mdns.expect("the daemon has no mDNS port")
    }

    /// The whole log so far (all rotations).
    pub fn log_text(&self) -> String {
        let mut c = self.cursor.lock().unwrap();
        c.refresh(&self.log);
        c.text.clone()
    }

    /// The first complete log line containing `needle`, if any yet.
    pub fn log_line(&self, needle: &str) -> Option<String> {
        let mut c = self.cursor.lock().unwrap();
        c.refresh(&self.log);
        c.text
            .lines()
            .find(|l| l.contains(needle))
            .map(str::to_owned)
    }

    /// Whether the log holds `needle` now (a check after something that proves it was written).
    pub fn log_has(&self, needle: &str) -> bool {
        self.wait_log(needle, Duration::ZERO)
    }

    /// Waits for `needle` in a log line. Each poll reads only the new bytes, and no part of the
    /// log is searched twice for the same needle (in this call or an earlier one).
    pub fn wait_log(&self, needle: &str, limit: Duration) -> bool {
        wait_until(limit, || {
            let mut c = self.cursor.lock().unwrap();
            c.refresh(&self.log);
            let (from, found) = c.searched.get(needle).copied().unwrap_or((0, false));
            if found {
                return true;
            }
            // `from` is a line start; a needle never spans lines.
            let hit = c.text[from..].contains(needle);
            let len = c.text.len();
            c.searched.insert(needle.to_owned(), (len, hit));
            hit
        })
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

/// Base arguments: a data dir and a fresh port (`AUTO`) for every listener.
pub fn base_args(dir: &TempDir) -> Vec<String> {
    vec![
        "-d".into(),
        dir.dir_arg(),
        "--lan-port".into(),
        AUTO.into(),
        "--local-port".into(),
        AUTO.into(),
        "--ble-port".into(),
        AUTO.into(),
        "--os-release".into(),
        dir.join("os-release").display().to_string(),
        // No multicast from tests; tests/mdns.rs turns it on with a port of its own.
        "--no-mdns".into(),
    ]
}

/// Sets the value of `opt` in an argument list made by `base_args`.
pub fn set_opt(args: &mut [String], opt: &str, value: impl ToString) {
    let i = args
        .iter()
        .position(|x| x == opt)
        .unwrap_or_else(|| panic!("{opt} not in the arguments"));
    args[i + 1] = value.to_string();
}

/// The daemon's arguments for a device against a cloud on 127.0.0.1:`port`: `base_args` plus
/// `-H 127.0.0.1 -p <port>`. What a test needs on top is one call each; `build` gives the list.
/// `cloud_args(&dir, cloud.port).link("tcp").build()` is what most end-to-end tests run.
pub fn cloud_args(dir: &TempDir, port: u16) -> CloudArgs {
    let mut a = base_args(dir);
    a.extend([
        "-H".into(),
        "127.0.0.1".into(),
        "-p".into(),
        port.to_string(),
    ]);
    CloudArgs(a)
}

/// See [`cloud_args`].
pub struct CloudArgs(Vec<String>);

impl CloudArgs {
    /// The link of the end-to-end tests: only `transport` (`udp`, `tcp`), a lost link tried
    /// again within 1 to 2 s, and the debug lines (`-l 3`) some waits look for.
    pub fn link(self, transport: &str) -> CloudArgs {
        self.opt("--transports", transport)
            .opt("--backoff-min", 1)
            .opt("--backoff-max", 2)
            .opt("-l", 3)
    }
    /// Any other option with its value.
    pub fn opt(mut self, name: &str, value: impl ToString) -> CloudArgs {
        self.0.extend([name.to_string(), value.to_string()]);
        self
    }
    /// Options as given (flags, `--opt=value`, a test's extra arguments).
    pub fn args<S: AsRef<str>>(mut self, more: &[S]) -> CloudArgs {
        self.0.extend(more.iter().map(|s| s.as_ref().to_string()));
        self
    }
    /// Sets the value of an option of `base_args` (`--lan-port`, `--local-port`, …).
    pub fn set(mut self, opt: &str, value: impl ToString) -> CloudArgs {
        set_opt(&mut self.0, opt, value);
        self
    }
    pub fn build(self) -> Vec<String> {
        self.0
    }
}

/// `MIIO_REQUIRE_ALL=1` (set by .ci/run) turns a missing outside tool into a failure. Otherwise
/// the skip is printed and recorded, one `test<TAB>tool` line, in the file named by
/// `MIIO_SKIP_FILE` (set by `make test`, which prints the list at the end).
pub fn skip(tool: &str) -> bool {
    if std::env::var("MIIO_REQUIRE_ALL").is_ok_and(|v| v == "1") {
        panic!("{tool} is required (MIIO_REQUIRE_ALL=1) but missing");
    }
    let test = std::thread::current()
        .name()
        .unwrap_or("?")
        .trim_start_matches("tests::")
        .to_owned();
    eprintln!("SKIP {tool}");
    if let Some(path) = std::env::var_os("MIIO_SKIP_FILE").filter(|p| !p.is_empty()) {
        use std::io::Write;
        let line = format!("{}::{test}\t{tool}\n", env!("CARGO_CRATE_NAME"));
        // One write to an O_APPEND file: lines of parallel test binaries do not interleave.
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path);
        if let Err(e) = f.and_then(|mut f| f.write_all(line.as_bytes())) {
            panic!("cannot record the skip in {path:?}: {e}");
        }
    }
    true
}

/// The python3 that tests use for outside peers: `MIIO_PYTHON` (when set and not empty), else the
/// venv .ci/run builds, else python3.
pub fn python() -> String {
    if let Some(p) = std::env::var("MIIO_PYTHON").ok().filter(|p| !p.is_empty()) {
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

/// What a `Lines` child has written so far: each line stored once, parsed once.
#[derive(Default)]
struct Feed {
    lines: Vec<String>,
    /// `lines[i]` as JSON, when it is JSON.
    json: Vec<Option<serde_json::Value>>,
    /// The child closed its stdout: no line will come any more.
    eof: bool,
}

type Shared = std::sync::Arc<(std::sync::Mutex<Feed>, std::sync::Condvar)>;

/// A line-oriented child (python cloud, fake cloud, python-miio script) whose stdout lines are
/// collected by a reader thread. The thread may lag behind the child, so a test never asserts on
/// a snapshot of what arrived (`all`, `json`, `count`) unless a barrier proved the lines it needs
/// are in (a later line waited for); everything else waits with a deadline (`wait*`). Waiting
/// sleeps on a condition variable and looks at each new line once.
pub struct Lines {
    pub child: Child,
    feed: Shared,
    stdin: Option<std::process::ChildStdin>,
    sent: usize,
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
        let feed: Shared = Default::default();
        let f2 = feed.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            let (m, cv) = &*f2;
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                let v = serde_json::from_str(&line).ok();
                let mut f = m.lock().unwrap();
                f.lines.push(line);
                f.json.push(v);
                cv.notify_all();
            }
            m.lock().unwrap().eof = true;
            cv.notify_all();
        });
        Lines {
            child,
            feed,
            stdin,
            sent: 0,
        }
    }

    /// Looks at the lines in order until `hit` says stop (returns its index), the child has
    /// closed its stdout, or `limit` passes. Each line is looked at once.
    fn scan(
        &self,
        limit: Duration,
        hit: impl FnMut(&str, Option<&serde_json::Value>) -> bool,
    ) -> Option<usize> {
        self.scan_from(0, limit, hit)
    }

    /// `scan` from line `i` on.
    fn scan_from(
        &self,
        mut i: usize,
        limit: Duration,
        mut hit: impl FnMut(&str, Option<&serde_json::Value>) -> bool,
    ) -> Option<usize> {
        let end = Instant::now() + limit;
        let (m, cv) = &*self.feed;
        let mut f = m.lock().unwrap();
        loop {
            while i < f.lines.len() {
                if hit(&f.lines[i], f.json[i].as_ref()) {
                    return Some(i);
                }
                i += 1;
            }
            let left = end.saturating_duration_since(Instant::now());
            if f.eof || left.is_zero() {
                return None;
            }
            f = cv.wait_timeout(f, left).unwrap().0;
        }
    }

    fn json_at(&self, i: usize) -> serde_json::Value {
        self.feed.0.lock().unwrap().json[i].clone().unwrap()
    }

    /// Snapshot of the lines read so far (for messages, or after a barrier).
    pub fn all(&self) -> Vec<String> {
        self.feed.0.lock().unwrap().lines.clone()
    }
    /// Snapshot of the JSON lines read so far (only after a barrier).
    pub fn json(&self) -> Vec<serde_json::Value> {
        self.feed
            .0
            .lock()
            .unwrap()
            .json
            .iter()
            .flatten()
            .cloned()
            .collect()
    }
    /// How many JSON lines read so far match (only after a barrier).
    pub fn count(&self, pred: impl Fn(&serde_json::Value) -> bool) -> usize {
        let f = self.feed.0.lock().unwrap();
        f.json.iter().flatten().filter(|v| pred(v)).count()
    }

    /// Waits for a JSON line matching `pred` and returns it.
    pub fn wait(
        &self,
        limit: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Option<serde_json::Value> {
        self.wait_nth(limit, 1, pred)
    }

    /// Waits for the `n`th (from 1) JSON line matching `pred` and returns it.
    pub fn wait_nth(
        &self,
        limit: Duration,
        n: usize,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Option<serde_json::Value> {
        let mut seen = 0;
        let i = self.scan(limit, |_, v| {
            if v.is_some_and(&pred) {
                seen += 1;
            }
            seen == n
        })?;
        Some(self.json_at(i))
    }

    /// Waits until `n` JSON lines match `pred`; returns every match then (fewer at the deadline).
    pub fn wait_all(
        &self,
        limit: Duration,
        n: usize,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Vec<serde_json::Value> {
        let mut got = Vec::new();
        self.scan(limit, |_, v| {
            if let Some(v) = v.filter(|v| pred(v)) {
                got.push(v.clone());
            }
            got.len() >= n
        });
        got
    }

    /// Waits for a line (JSON or not) matching `pred` and returns it.
    pub fn wait_line(&self, limit: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        let i = self.scan(limit, |l, _| pred(l))?;
        Some(self.feed.0.lock().unwrap().lines[i].clone())
    }

    /// Writes one line to the child's stdin; returns how many lines were written so far.
    pub fn send(&mut self, line: &str) -> usize {
        use std::io::Write;
        let s = self.stdin.as_mut().expect("stdin");
        s.write_all(line.as_bytes()).unwrap();
        s.write_all(b"\n").unwrap();
        s.flush().unwrap();
        self.sent += 1;
        self.sent
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
        let end = Instant::now() + Duration::from_secs(15);
        while Instant::now() < end {
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
        // Generous: the holder is another whole test on a loaded machine.
        let end = Instant::now() + Duration::from_secs(300);
        loop {
            assert!(Instant::now() < end, "{} held for 300 s", p.display());
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

/// The independent Python cloud (tests/pycloud) on a port of its own choosing, or a visible skip
/// without python3 + cryptography.
pub struct Py {
    pub cloud: Lines,
    pub port: u16,
    /// Answers to command lines counted so far, and the line after the last one counted.
    answers: (usize, usize),
}

const PY_T: Duration = Duration::from_secs(15);

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
        .wait(PY_T, |v| v["ev"] == "listening")
        .expect("python cloud listening");
    let port = l["port"].as_u64().unwrap() as u16;
    Some(Py {
        cloud,
        port,
        answers: (0, 0),
    })
}

/// The cloud's answer to a command line: every non-empty line gets exactly one, in order
/// (tests/pycloud/README.md), and its effects come before it.
fn is_answer(v: &serde_json::Value) -> bool {
    v["ev"] == "ok" || (v["ev"] == "error" && v.get("cmd").is_some())
}

impl Py {
    /// Writes one command line and waits for its own `ok` (the k-th answer for the k-th line
    /// written, whoever wrote the earlier ones); panics on an `error`.
    pub fn cmd(&mut self, line: &str) -> serde_json::Value {
        let k = self.cloud.send(line);
        let (mut n, from) = self.answers;
        let i = self
            .cloud
            .scan_from(from, PY_T, |_, v| {
                if v.is_some_and(is_answer) {
                    n += 1;
                }
                n == k
            })
            .unwrap_or_else(|| panic!("python cloud did not answer {line}"));
        self.answers = (n, i + 1);
        let v = self.cloud.json_at(i);
        assert_eq!(v["ev"], "ok", "{line} -> {v}");
        v
    }

    /// A barrier on the cloud's event stream: every event the cloud wrote before it read this
    /// command is in. (Not a barrier for the daemon's packets still on their way: for those, wait
    /// for a later packet of the daemon's on the same socket.)
    pub fn sync(&mut self) {
        self.cmd(r#"{"cmd":"status"}"#);
    }

    /// Pushes a command (or any message) to the device and waits until it was sent.
    pub fn push(&mut self, msg: &serde_json::Value) {
        self.cmd(&serde_json::json!({"cmd":"send","did":DID,"json":msg}).to_string());
    }

    /// Every `msg` event (a data packet from the device) whose JSON matches `pred`, read so far
    /// (after a barrier only).
    pub fn msgs(&self, pred: impl Fn(&serde_json::Value) -> bool) -> Vec<serde_json::Value> {
        self.cloud
            .json()
            .into_iter()
            .filter(|v| v["ev"] == "msg" && pred(&v["json"]))
            .collect()
    }

    /// Waits until `n` `msg` events match `pred`; returns them (fewer at the deadline).
    pub fn wait_msgs(
        &self,
        n: usize,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Vec<serde_json::Value> {
        self.cloud
            .wait_all(PY_T, n, |v| v["ev"] == "msg" && pred(&v["json"]))
    }

    /// Every `reply` event (a message without `method`) with this id read so far (after a
    /// barrier only).
    pub fn replies(&self, id: u64) -> Vec<serde_json::Value> {
        self.cloud
            .json()
            .into_iter()
            .filter(|v| v["ev"] == "reply" && v["id"] == id)
            .collect()
    }
}

/// `miio_fakecloud` (the product's own fake cloud) for the test device, on ports it picks itself.
pub struct FakeCloudProc {
    pub out: Lines,
    /// UDP and TCP.
    pub port: u16,
    /// The control socket.
    pub ctl: u16,
}

pub fn fakecloud() -> FakeCloudProc {
    fakecloud_with(&[])
}

/// [`fakecloud`] with more arguments (more devices, `--assign`, `--didkey-retry`).
pub fn fakecloud_with(extra: &[&str]) -> FakeCloudProc {
    let mut c = Command::new(BIN);
    c.args([
        "miio_fakecloud",
        "--port",
        "0",
        "--ctl-port",
        "0",
        "--did",
        &DID.to_string(),
        "--key",
        KEY,
    ]);
    c.args(extra);
    let out = Lines::spawn(c);
    // `[...] [I] fakecloud: udp+tcp 127.0.0.1:P control 127.0.0.1:C devices [...]`
    let line = out
        .wait_line(PY_T, |l| l.contains("fakecloud: udp+tcp "))
        .unwrap_or_else(|| panic!("miio_fakecloud did not start: {:?}", out.all()));
    let port_after = |key: &str| -> u16 {
        let rest = &line[line.find(key).unwrap() + key.len()..];
        let addr = rest.split_whitespace().next().unwrap();
        addr.rsplit(':').next().unwrap().parse().unwrap()
    };
    let (port, ctl) = (port_after("udp+tcp "), port_after(" control "));
    FakeCloudProc { out, port, ctl }
}

// ---- a real MQTT broker (Debian's mosquitto) ----------------------------------------------------

/// The first file called `name` in PATH, /usr/sbin or /usr/bin.
pub fn find(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    dirs.extend(["/usr/sbin", "/usr/bin"].map(PathBuf::from));
    dirs.iter().map(|d| d.join(name)).find(|p| p.is_file())
}

pub struct Broker {
    pub child: Child,
    pub port: u16,
    _dir: TempDir,
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// mosquitto on `port` with the config of `dir`: None when it could not listen there.
pub fn mosquitto_on(bin: &Path, dir: TempDir, port: u16) -> Option<Broker> {
    // L§11: mosquitto 2 refuses anonymous clients unless the listener allows them.
    dir.write(
        "mosquitto.conf",
        &format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"),
    );
    let mut child = Command::new(bin)
        .arg("-c")
        .arg(dir.join("mosquitto.conf"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("mosquitto starts");
    let up = wait_until(Duration::from_secs(10), || {
        TcpStream::connect(("127.0.0.1", port)).is_ok() || child.try_wait().ok().flatten().is_some()
    });
    if up && child.try_wait().ok().flatten().is_none() {
        return Some(Broker {
            child,
            port,
            _dir: dir,
        });
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// mosquitto on a port that was free a moment ago; another try when it lost the race for it.
pub fn mosquitto(bin: &Path) -> Broker {
    for _ in 0..5 {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if let Some(b) = mosquitto_on(bin, TempDir::new("mosquitto"), port) {
            return b;
        }
    }
    panic!("mosquitto did not start on a free port in 5 tries");
}

// ---- gates for shell stubs ----------------------------------------------------------------------

/// A FIFO that holds a test's shell stub until the test lets it go, with nothing polling: the stub
/// runs `[ -p "$gate" ] && read -r _ <"$gate"` and blocks in the read. The test holds the only
/// write end (opened read-write, which does not wait for a reader), so [`Gate::open`] releases
/// every stub at once: the path goes first (a stub that comes later finds no FIFO and goes on; one
/// that looked just before gets ENOENT from its redirection and goes on), then the write end is
/// closed (a stub in the read gets end of file). Dropped, the gate opens.
pub struct Gate {
    path: PathBuf,
    write: Option<std::fs::File>,
}

impl Gate {
    /// Makes the FIFO at `path`, closed.
    pub fn closed(path: PathBuf) -> Gate {
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: mkfifo(3) on a NUL-terminated path.
        let r = unsafe { libc::mkfifo(c.as_ptr(), 0o600) };
        assert_eq!(
            r,
            0,
            "mkfifo {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
        let write = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .expect("open the gate read-write");
        Gate {
            path,
            write: Some(write),
        }
    }

    /// Lets every stub through, now and later.
    pub fn open(mut self) {
        self.release();
    }

    fn release(&mut self) {
        if let Some(w) = self.write.take() {
            let _ = std::fs::remove_file(&self.path);
            drop(w);
        }
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.release();
    }
}

// ---- init scripts under BusyBox -----------------------------------------------------------------

/// `init.d/<script>` under BusyBox sh: start, restart and stop of the applet `applet`, installed
/// in `dir` as a link to the multicall binary (as `make install` does). Each start is seen in the
/// applet's log (one more `started` line), the restart gives a new pid in the pid file and ends the
/// old process, the stop ends the new one and removes the pid file. `var` is the prefix of the
/// script's settings (`MIIO_AGENT`: `MIIO_AGENT`, `…_LOGFILE`, `…_PIDFILE`, `…_ARGS`, and
/// `…_DEFAULTS`, the file the test writes them to); `args` goes to `…_ARGS`. Skipped (and
/// recorded) without busybox.
pub fn init_script_cycle(
    dir: &TempDir,
    script: &str,
    applet: &str,
    var: &str,
    args: &str,
    started: &str,
) {
    const T: Duration = Duration::from_secs(20);
    if Command::new("busybox").arg("true").status().is_err() {
        skip("busybox");
        return;
    }
    let exe = dir.join(applet);
    std::os::unix::fs::symlink(BIN, &exe).unwrap();
    let (log, pid, defaults) = (
        dir.join(&format!("{applet}.log")),
        dir.join(&format!("{applet}.pid")),
        dir.join("defaults"),
    );
    std::fs::write(
        &defaults,
        format!(
            "{var}='{}'\n{var}_LOGFILE='{}'\n{var}_PIDFILE='{}'\n{var}_ARGS='{args}'\n",
            exe.display(),
            log.display(),
            pid.display(),
        ),
    )
    .unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("init.d")
        .join(script);
    let run = |action: &str| {
        let out = Command::new("busybox")
            .arg("sh")
            .arg(&script)
            .arg(action)
            .env(format!("{var}_DEFAULTS"), &defaults)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success(), "{action}: {out:?}");
    };
    let starts = |n: usize| wait_until(T, || read_file(&log).matches(started).count() >= n);
    let gone = |p: &str| {
        let proc = PathBuf::from(format!("/proc/{}", p.trim()));
        wait_until(T, || !proc.exists())
    };
    run("start");
    assert!(starts(1), "{}", read_file(&log));
    let first = std::fs::read_to_string(&pid).unwrap();
    run("restart");
    assert!(starts(2), "{}", read_file(&log));
    let second = std::fs::read_to_string(&pid).unwrap();
    assert_ne!(first, second, "{applet} was restarted");
    assert!(gone(&first), "the first {applet} stopped");
    run("stop");
    assert!(gone(&second), "{applet} stopped");
    assert!(!pid.exists(), "the pid file is removed");
}
