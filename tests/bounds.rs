//! Memory bounds under hostile local input (LOCAL_API.md §2 limits, §3 framing): the real daemon on
//! loopback against a client that writes as fast as it can and against clients that never read.
//! What is measured is what the board pays: the daemon's VmHWM (/proc/PID/status) and the kernel's
//! socket memory of the daemon's accepted sockets (`ss -tmn`: `tb` is SO_SNDBUF, `w` the bytes
//! queued for sending). Every wait has a deadline; the bounds are generous for a debug build and
//! still far below what an unbounded daemon reaches.

mod common;
use common::*;
use serde_json::{json, Value};
use std::io::Write;
use std::net::TcpStream;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(10);

/// A provisioned daemon whose cloud is an empty port (nothing needs the cloud here).
fn start(tag: &str, extra: &[&str]) -> (TempDir, Daemon, u16, u16, DeadPort) {
    let dir = provisioned_dir(tag);
    let cloud = DeadPort::new();
    // No helper script in the data dir: load the files after 0.3 s instead of waiting longer.
    let a = cloud_args(&dir, cloud.port)
        .opt("--transports", "udp")
        .opt("--helper-grace", "0.3")
        .args(extra)
        .build();
    let d = Daemon::start(&dir, &a);
    let (lan, local) = (d.lan(), d.local());
    (dir, d, lan, local, cloud)
}

/// A `kB` field of /proc/PID/status, in bytes.
fn status_kb(pid: u32, field: &str) -> u64 {
    let s = read_file(std::path::Path::new(&format!("/proc/{pid}/status")));
    s.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// `local.query_status` round trip; false when no reply came within the deadline.
fn served(c: &mut LocalClient, id: u64, limit: Duration) -> bool {
    c.send(&format!(r#"{{"id":{id},"method":"local.query_status"}}"#));
    c.recv_until(limit, |v| v.get("id") == Some(&json!(id)))
        .is_some()
}

#[test]
fn a_flooding_client_costs_no_memory_and_starves_nobody() {
    let (_dir, mut d, _lan, local, _cloud) = start("bounds-flood", &[]);
    let pid = d.child.id();
    let mut w = LocalClient::connect(local);
    assert!(served(&mut w, 1, T), "watcher not served before the flood");

    // `{}` back to back as fast as the socket takes it: about two million values a second.
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let (stop2, sent2) = (stop.clone(), sent.clone());
    let mut f = TcpStream::connect(("127.0.0.1", local)).expect("flooder connect");
    f.set_write_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let flooder = std::thread::spawn(move || {
        let chunk = b"{}".repeat(32 * 1024);
        while !stop2.load(Ordering::Relaxed) {
            match f.write(&chunk) {
                Ok(n) => {
                    sent2.fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(_) => break,
            }
        }
    });

    // Bounds: a debug build idles at a few MB; the unbounded daemon reached hundreds of MB in
    // seconds. Stop early far above the bound so a regression fails without eating the machine.
    const BOUND: u64 = 16 << 20;
    let end = Instant::now() + Duration::from_secs(4);
    let mut id = 10;
    let mut missed = None;
    let mut rss_max = 0;
    while Instant::now() < end {
        id += 1;
        // The watcher keeps being answered while the flood goes on.
        if !served(&mut w, id, Duration::from_secs(5)) {
            missed = Some(id);
            break;
        }
        rss_max = rss_max.max(status_kb(pid, "VmRSS"));
        if rss_max > 16 * BOUND {
            break;
        }
    }
    let hwm = status_kb(pid, "VmHWM");
    let flooded = sent.load(Ordering::Relaxed);
    eprintln!(
        "flood: {} MB written, {} round trips, VmRSS max {} KB, VmHWM {} KB",
        flooded >> 20,
        id - 10,
        rss_max >> 10,
        hwm >> 10
    );
    // SIGTERM is honoured while the flood still runs.
    d.signal("TERM");
    let code = d.wait_exit(Duration::from_secs(5));
    stop.store(true, Ordering::Relaxed);
    let _ = flooder.join();
    assert_eq!(missed, None, "watcher not answered during the flood");
    assert!(hwm > 0, "no VmHWM for pid {pid}");
    assert!(hwm < BOUND, "VmHWM {hwm} bytes under a `{{}}` flood");
    assert_eq!(code, Some(0), "no clean exit within 5 s of SIGTERM");
    assert!(
        flooded > 1 << 20,
        "the flood itself was too small to prove anything"
    );
}

#[test]
fn a_pipelining_client_is_slowed_down_not_dropped() {
    // A client that writes many requests before it reads any reply gets every reply, in order:
    // the daemon stops reading it while its replies wait (TCP pushes back), instead of queueing
    // them past the 64 KiB cap and closing it.
    let (_dir, _d, _lan, local, _cloud) = start("bounds-pipe", &[]);
    let mut c = LocalClient::connect(local);
    assert!(served(&mut c, 1, T));
    const N: u64 = 20_000;
    let mut s = c.stream.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let mut all = String::new();
        for id in 2..2 + N {
            all.push_str(&format!(r#"{{"id":{id},"method":"local.query_status"}}"#));
        }
        s.write_all(all.as_bytes()).is_ok()
    });
    // Not read until the writer is done or the daemon has had time to fall far behind.
    wait_until(Duration::from_secs(2), || writer.is_finished());
    let mut next = 2;
    while next < 2 + N {
        let v = c.recv(T).unwrap_or_else(|| panic!("reply {next} missing"));
        if v.get("id").is_none() {
            continue; // a `local.status` broadcast (the cloud attempts go on)
        }
        assert_eq!(v["id"], json!(next), "{v}");
        next += 1;
    }
    assert!(writer.join().unwrap(), "the writer failed");
}

/// One socket in `ss -tmn` output: state, `tb` (send buffer limit), `w` (queued for sending).
#[derive(Debug)]
struct Sock {
    state: String,
    tb: u64,
    w: u64,
}

/// The sockets whose local port is `port` (the daemon's side of its local connections).
fn ss(port: u16) -> Option<Vec<Sock>> {
    let out = Command::new("ss")
        .args(["-tmnH", "state", "all", "sport", "=", &format!(":{port}")])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut socks: Vec<Sock> = Vec::new();
    for tok in text.split_whitespace() {
        if let Some(mem) = tok.strip_prefix("skmem:(") {
            let field = |name: &str| {
                mem.trim_end_matches(')')
                    .split(',')
                    .find_map(|kv| kv.strip_prefix(name)?.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            if let Some(s) = socks.last_mut() {
                s.tb = field("tb");
                s.w = field("w");
            }
        } else if tok.starts_with(|c: char| c.is_ascii_uppercase())
            && tok
                .chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '-')
        {
            // ESTAB, FIN-WAIT-1, LAST-ACK, ...: a new socket starts.
            socks.push(Sock {
                state: tok.to_string(),
                tb: 0,
                w: 0,
            });
        }
    }
    Some(socks.into_iter().filter(|s| s.state != "LISTEN").collect())
}

#[test]
fn clients_that_never_read_cost_bounded_kernel_memory() {
    if ss(1).is_none() && skip("ss") {
        return;
    }
    const NEVER: usize = 20;
    let (_dir, d, lan, local, _cloud) = start(
        "bounds-never",
        &["--max-clients", "21", "--user-ack-timeout", "1"],
    );
    let mut w = LocalClient::connect(local);
    assert!(served(&mut w, 1, T));
    // Ordinary clients (their first message says so) that never read anything.
    let never: Vec<TcpStream> = (0..NEVER)
        .map(|_| {
            let mut s = TcpStream::connect(("127.0.0.1", local)).unwrap();
            s.write_all(br#"{"id":1,"method":"local.query_status"}"#)
                .unwrap();
            s
        })
        .collect();
    assert!(
        wait_until(T, || ss(local).is_some_and(|v| v.len() == NEVER + 1)),
        "{:?}",
        ss(local)
    );
    // The send buffer of an accepted socket is small from the start (loopback autotunes it to MBs).
    let socks = ss(local).unwrap();
    let tb_max = socks.iter().map(|s| s.tb).max().unwrap_or(0);

    // LAN commands of ~30 KB are broadcast to every ordinary client; the watcher reads and
    // answers each, the others never read.
    let phone = Phone::new(lan, TOKEN);
    assert!(
        wait_until(T, || {
            // Silent until the token is loaded: ask again, briefly.
            phone.raw(&miio_client::wire::miio::lan_hello());
            phone.recv(Duration::from_secs(1)).is_some()
        }),
        "no LAN hello reply: {}",
        d.log_text()
    );
    let pad = "f".repeat(30_000);
    let mut w_max = 0;
    let mut n = 0u32;
    let end = Instant::now() + Duration::from_secs(60);
    let gone = |v: &Vec<Sock>| v.iter().filter(|s| s.state == "ESTAB").count() == 1;
    loop {
        let socks = ss(local).unwrap_or_default();
        w_max = w_max.max(socks.iter().map(|s| s.w).max().unwrap_or(0));
        if gone(&socks) || Instant::now() > end || n >= 2000 {
            break;
        }
        n += 1;
        let id = 1000 + n;
        let m = json!({"id":id,"method":"flood","params":[n, pad]}).to_string();
        phone.raw(&phone.packet(n, &m));
        let cmd = w
            .recv_until(T, |v: &Value| v["method"] == "flood" && v["params"][0] == n)
            .unwrap_or_else(|| panic!("watcher missed command {n}"));
        w.send(&format!(r#"{{"id":{},"result":["ok"]}}"#, cmd["id"]));
    }
    let socks = ss(local).unwrap_or_default();
    eprintln!(
        "never-readers: {n} commands of 30 KB; daemon side tb max {tb_max}, w max {w_max}; now {socks:?}"
    );
    assert!(
        gone(&socks),
        "the never-readers were not all dropped: {socks:?}"
    );
    assert!(
        tb_max <= 64 * 1024,
        "SO_SNDBUF of accepted sockets: {tb_max}"
    );
    assert!(
        w_max <= 512 * 1024,
        "kernel send queue of one client: {w_max}"
    );
    // Dropped with a reset: no orphan keeps its send queue in FIN-WAIT-1 after the close.
    let orphans = |v: &Vec<Sock>| v.iter().filter(|s| s.state != "ESTAB").count();
    assert!(
        wait_until(Duration::from_secs(5), || ss(local)
            .is_some_and(|v| orphans(&v) == 0)),
        "orphans: {:?}",
        ss(local)
    );
    // The watcher is still served.
    assert!(served(&mut w, 2, T));
    drop(never);
    drop(d);
}
