//! benchkit: the measuring side of `make bench` (tests/bench/README.md). Not shipped.
//!
//! Subcommands (results as one JSON line on stdout):
//! - `crypto N`: N times what one report costs at the least with the daemon's crates (the floor): find
//!   `"id"` and `"method"` in the report's bytes, append the NUL, pad, AES-128-CBC encrypt, MD5 over
//!   header ‖ key ‖ cipher (the seal, PROTOCOL.md §2.2-§2.4); then the ack's open: MD5 check, decrypt,
//!   unpad. The AES key schedule is made once, as the daemon caches it. Run under callgrind with N
//!   and with 0; the difference over N is the instruction reference per report.
//! - `echo`: a bare UDP echo on 127.0.0.1 (port printed as `{"port":P}`), the reference cloud and LAN peer.
//! - `relay ECHO_PORT`: a bare TCP relay on 127.0.0.1 (port printed): every JSON object read from a
//!   client goes as one datagram to the echo, and the echoed datagram goes back to that client. The
//!   daemon's report path without the daemon: TCP in, UDP out and back, TCP out.
//! - `load --port P [--clients C] [--window W] [--count N] [--secs S] [--warmup K] [--drain S]
//!   [--lat-out FILE]`: C local clients, each keeping W reports in flight, until each has sent N (count
//!   mode) or S seconds passed; then waits up to `--drain` seconds for the missing answers. Counts
//!   answers, errors and losses, and the send-to-answer latency of each report after the first K
//!   (percentiles on stdout, every sample in FILE). `--cpu-pid PID` also reports the CPU time
//!   (utime + stime, clock ticks) that process PID used over the S seconds, as `cpu_ticks`.
//! - `hostile --port P --ctl C --secs S [--never N] [--every-ms M] [--push-bytes B] [--push-hz H]
//!   [--tail T]`: the hostile local load of the bench's `hostile` row, for S seconds: one client writes
//!   `{}` back to back as fast as the socket takes it (and drains what it is sent, so it stays); N
//!   ordinary clients never read (one request each, then nothing; one the daemon drops is replaced
//!   at once, so N are always there); through miio_fakecloud's control port C the cloud pushes
//!   H commands a second of about B bytes each; a watcher asks `local.query_status` every M ms and
//!   answers every command it is sent. After S seconds one JSON line with the window's figures;
//!   then the same load goes on until the daemon is gone (so that SIGTERM is timed under it) or T
//!   more seconds passed, and a last line says how it ended.
//!
//! Plain std threads and blocking sockets: the load must cost the machine as little as it can, so the
//! daemon, not the client, is what runs out of CPU.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aes::cipher::generic_array::GenericArray;
use aes::cipher::{BlockDecrypt, BlockEncrypt, KeyInit};
use md5::{Digest, Md5};

/// The report used everywhere (about 200 bytes): a device pushing its properties.
const REPORT_TAIL: &str = r#","method":"props","params":{"power":"on","mode":"auto","temperature":23.5,"humidity":41,"aqi":12,"fan_level":2,"child_lock":"off","led_level":1,"buzzer":"on","filter_life":87,"motor_speed":780}}"#;

fn report(id: u64) -> String {
    format!("{{\"id\":{id}{REPORT_TAIL}")
}

fn die(msg: &str) -> ! {
    eprintln!("benchkit: {msg}");
    std::process::exit(2)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("crypto") => crypto(args.get(1).and_then(|s| s.parse().ok()).unwrap_or(0)),
        Some("echo") => echo(),
        Some("relay") => relay(
            args.get(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| die("relay ECHO_PORT")),
        ),
        Some("load") => load(&args[1..]),
        Some("report") => println!("{}", report(1)),
        Some("hostile") => hostile(&args[1..]),
        _ => die(
            "usage: benchkit crypto N | echo | relay ECHO_PORT | load --port P ... | report | hostile ...",
        ),
    }
}

// --- crypto ---------------------------------------------------------------------------------------

fn md5(parts: &[&[u8]]) -> [u8; 16] {
    let mut h = Md5::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

/// The 16-byte header of a packet of `len` bytes (PROTOCOL.md §2.2).
fn header(len: usize, stamp: u32) -> [u8; 16] {
    let mut head = [0u8; 16];
    head[0] = 0x21;
    head[1] = 0x31;
    head[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    head[8..12].copy_from_slice(&123456789u32.to_be_bytes());
    head[12..16].copy_from_slice(&stamp.to_be_bytes());
    head
}

/// CBC over the cached cipher, chained by hand as the daemon does (no per-packet cipher copy).
fn cbc_encrypt(aes: &aes::Aes128, iv: &[u8; 16], data: &mut [u8]) {
    let mut prev = *iv;
    for block in data.chunks_exact_mut(16) {
        for (b, p) in block.iter_mut().zip(prev) {
            *b ^= p;
        }
        aes.encrypt_block(GenericArray::from_mut_slice(block));
        prev.copy_from_slice(block);
    }
}

fn cbc_decrypt(aes: &aes::Aes128, iv: &[u8; 16], data: &mut [u8]) {
    let mut prev = *iv;
    for block in data.chunks_exact_mut(16) {
        let mut cipher = [0u8; 16];
        cipher.copy_from_slice(block);
        aes.decrypt_block(GenericArray::from_mut_slice(block));
        for (b, p) in block.iter_mut().zip(prev) {
            *b ^= p;
        }
        prev = cipher;
    }
}

fn crypto(n: u64) {
    let secret = *b"DemoKey0123abcXY";
    let key = md5(&[&secret]);
    let iv = md5(&[&key, &secret]);
    let aes = aes::Aes128::new(GenericArray::from_slice(&key));
    let text = report(1234567);
    // The ack the cloud sends for it, sealed once here (its open is what each report pays).
    let ack_plain = {
        let mut p = br#"{"id":1234567,"result":["ok"]}"#.to_vec();
        p.push(0);
        let pad = 16 - p.len() % 16;
        p.resize(p.len() + pad, pad as u8);
        cbc_encrypt(&aes, &iv, &mut p);
        p
    };
    let ack_head = header(32 + ack_plain.len(), 7);
    let ack_sum = md5(&[&ack_head, &secret, &ack_plain]);
    let mut check = 0u8;
    for i in 0..n {
        let input = std::hint::black_box(text.as_bytes());
        // The scan: where "id" and "method" are (what routing reads).
        let find = |pat: &[u8]| input.windows(pat.len()).position(|w| w == pat);
        let at = find(b"\"id\"").unwrap_or(0) ^ find(b"\"method\"").unwrap_or(0);
        // The seal.
        let mut plain = Vec::with_capacity(input.len() + 17);
        plain.extend_from_slice(input);
        plain.push(0);
        let pad = 16 - plain.len() % 16;
        plain.resize(plain.len() + pad, pad as u8);
        cbc_encrypt(&aes, &iv, &mut plain);
        let head = header(32 + plain.len(), i as u32);
        let sum = md5(&[&head, &secret, &plain]);
        // The ack's open.
        let ack = std::hint::black_box(&ack_plain);
        let ok = md5(&[&ack_head, &secret, ack]) == ack_sum;
        let mut dec = ack.clone();
        cbc_decrypt(&aes, &iv, &mut dec);
        let pad = usize::from(dec.last().copied().unwrap_or(0));
        dec.truncate(dec.len().saturating_sub(pad));
        check ^= std::hint::black_box(sum)[0] ^ u8::from(ok) ^ (at as u8) ^ dec.len() as u8;
    }
    println!("{{\"n\":{n},\"bytes\":{},\"check\":{check}}}", text.len());
}

// --- echo and relay -------------------------------------------------------------------------------

fn echo() {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap_or_else(|e| die(&format!("bind: {e}")));
    let port = sock.local_addr().map(|a| a.port()).unwrap_or(0);
    println!("{{\"port\":{port}}}");
    let _ = std::io::stdout().flush();
    let mut buf = vec![0u8; 65536];
    loop {
        if let Ok((n, from)) = sock.recv_from(&mut buf) {
            let _ = sock.send_to(&buf[..n], from);
        }
    }
}

/// Ends of the complete top-level JSON objects at the start of `buf` (string-aware brace depth).
fn object_ends(buf: &[u8]) -> Vec<usize> {
    let mut ends = Vec::new();
    let (mut depth, mut in_str, mut esc) = (0usize, false, false);
    for (i, &b) in buf.iter().enumerate() {
        if in_str {
            match (esc, b) {
                (true, _) => esc = false,
                (false, b'\\') => esc = true,
                (false, b'"') => in_str = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_str = true,
            b'{' => depth += 1,
            b'}' if depth > 0 => {
                depth -= 1;
                if depth == 0 {
                    ends.push(i + 1);
                }
            }
            _ => {}
        }
    }
    ends
}

fn relay(echo_port: u16) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| die(&format!("bind: {e}")));
    let port = l.local_addr().map(|a| a.port()).unwrap_or(0);
    println!("{{\"port\":{port}}}");
    let _ = std::io::stdout().flush();
    for s in l.incoming().flatten() {
        std::thread::spawn(move || relay_conn(s, echo_port));
    }
}

fn relay_conn(mut s: TcpStream, echo_port: u16) {
    let Ok(u) = UdpSocket::bind("127.0.0.1:0") else {
        return;
    };
    if u.connect(("127.0.0.1", echo_port)).is_err() {
        return;
    }
    let _ = u.set_read_timeout(Some(Duration::from_secs(5)));
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 4096];
    let mut dgram = vec![0u8; 65536];
    loop {
        let n = match s.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        let ends = object_ends(&buf);
        let mut start = 0;
        for end in &ends {
            let obj = &buf[start..*end];
            start = *end;
            if u.send(obj).is_err() {
                return;
            }
            match u.recv(&mut dgram) {
                Ok(m) => {
                    if s.write_all(&dgram[..m]).is_err() {
                        return;
                    }
                }
                Err(_) => return,
            }
        }
        buf.drain(..start);
    }
}

// --- load -----------------------------------------------------------------------------------------

struct LoadArgs {
    port: u16,
    clients: usize,
    window: usize,
    /// Reports per client; None: until `secs` ends. `--count 0` connects, sends nothing, closes.
    count: Option<u64>,
    secs: f64,
    warmup: u64,
    drain: f64,
    /// Where to write every latency sample (us, one a line), so runs can be merged.
    lat_out: Option<String>,
    /// A process whose CPU time (utime + stime of all its threads, clock ticks) over the window
    /// is reported as `cpu_ticks`: the server under load, never this client.
    cpu_pid: Option<u32>,
}

fn num<T: std::str::FromStr>(k: &str, v: &str) -> T {
    v.parse()
        .unwrap_or_else(|_| die(&format!("bad value for {k}: {v}")))
}

fn parse_load(args: &[String]) -> LoadArgs {
    let mut a = LoadArgs {
        port: 0,
        clients: 1,
        window: 1,
        count: None,
        secs: 0.0,
        warmup: 0,
        drain: 15.0,
        lat_out: None,
        cpu_pid: None,
    };
    let mut it = args.iter();
    while let Some(k) = it.next() {
        let v = it
            .next()
            .unwrap_or_else(|| die(&format!("{k} needs a value")));
        match k.as_str() {
            "--port" => a.port = num(k, v),
            "--clients" => a.clients = num(k, v),
            "--window" => a.window = num(k, v),
            "--count" => a.count = Some(num(k, v)),
            "--secs" => a.secs = num(k, v),
            "--warmup" => a.warmup = num(k, v),
            "--drain" => a.drain = num(k, v),
            "--lat-out" => a.lat_out = Some(v.clone()),
            "--cpu-pid" => a.cpu_pid = Some(num(k, v)),
            _ => die(&format!("unknown option {k}")),
        }
    }
    if a.port == 0
        || a.clients == 0
        || a.clients > 41
        || a.window == 0
        || (a.count.is_none() && a.secs <= 0.0)
    {
        die("load needs --port, 1 <= --clients <= 41 (ids stay u32), --window >= 1 and --count or --secs");
    }
    a
}

#[derive(Default)]
struct ClientResult {
    sent: u64,
    ok: u64,
    ok_in_window: u64,
    errors: u64,
    unknown: u64,
    lat_us: Vec<f64>,
    first_error: Option<String>,
    io_error: Option<String>,
}

fn load(args: &[String]) {
    let a = parse_load(args);
    let cpu0 = a.cpu_pid.map(cpu_ticks);
    let start = Instant::now();
    let stop_at = (a.secs > 0.0).then(|| start + Duration::from_secs_f64(a.secs));
    let mut handles = Vec::new();
    for c in 0..a.clients {
        let (port, window, count, warmup, drain) = (a.port, a.window, a.count, a.warmup, a.drain);
        handles.push(std::thread::spawn(move || {
            client(c as u64, port, window, count, stop_at, warmup, drain)
        }));
    }
    // The server's CPU time over the window that `ok_in_window` counts: sampled at its start and
    // its end (`stop_at`), while the clients run.
    let cpu_window = match (cpu0, stop_at, a.cpu_pid) {
        (Some(t0), Some(end), Some(pid)) => {
            std::thread::sleep(end.saturating_duration_since(Instant::now()));
            Some(cpu_ticks(pid).saturating_sub(t0))
        }
        _ => None,
    };
    let results: Vec<ClientResult> = handles
        .into_iter()
        .map(|h| h.join().unwrap_or_default())
        .collect();
    let window_secs = match stop_at {
        Some(_) => a.secs,
        None => start.elapsed().as_secs_f64(),
    };
    let sum = |f: fn(&ClientResult) -> u64| results.iter().map(f).sum::<u64>();
    let (sent, ok, okw, errors, unknown) = (
        sum(|r| r.sent),
        sum(|r| r.ok),
        sum(|r| r.ok_in_window),
        sum(|r| r.errors),
        sum(|r| r.unknown),
    );
    let mut lat: Vec<f64> = results
        .iter()
        .flat_map(|r| r.lat_us.iter().copied())
        .collect();
    lat.sort_by(|x, y| x.total_cmp(y));
    let pct = |p: f64| -> f64 {
        if lat.is_empty() {
            return -1.0;
        }
        let i = ((p * lat.len() as f64).ceil() as usize).clamp(1, lat.len()) - 1;
        lat[i]
    };
    if let Some(path) = &a.lat_out {
        let text: String = lat.iter().map(|x| format!("{x:.3}\n")).collect();
        if let Err(e) = std::fs::write(path, text) {
            die(&format!("write {path}: {e}"));
        }
    }
    let mean = if lat.is_empty() {
        -1.0
    } else {
        lat.iter().sum::<f64>() / lat.len() as f64
    };
    let first_error = results.iter().find_map(|r| r.first_error.clone());
    let io_error = results.iter().find_map(|r| r.io_error.clone());
    let out = serde_json::json!({
        "clients": a.clients, "window": a.window, "sent": sent, "ok": ok, "errors": errors,
        "unknown": unknown, "lost": sent.saturating_sub(ok + errors),
        "secs": window_secs, "rate": okw as f64 / window_secs.max(1e-9),
        "samples": lat.len(), "p50_us": pct(0.50), "p99_us": pct(0.99), "mean_us": mean,
        "first_error": first_error, "io_error": io_error, "cpu_ticks": cpu_window,
        "ok_in_window": okw,
    });
    println!("{out}");
}

/// utime + stime of process `pid`, all its threads, in clock ticks (/proc/PID/stat fields 14, 15).
fn cpu_ticks(pid: u32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_else(|e| die(&format!("/proc/{pid}/stat: {e}")));
    // After the command name's closing parenthesis: field 3 (the state) onwards.
    let rest = text.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0)
}

fn client(
    c: u64,
    port: u16,
    window: usize,
    count: Option<u64>,
    stop_at: Option<Instant>,
    warmup: u64,
    drain: f64,
) -> ClientResult {
    let mut r = ClientResult::default();
    let mut s = match TcpStream::connect(("127.0.0.1", port)) {
        Ok(s) => s,
        Err(e) => {
            r.io_error = Some(format!("connect: {e}"));
            return r;
        }
    };
    let _ = s.set_nodelay(true);
    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
    // Ids: client c uses (c+1)*10^8 + 1, 2, ...: u32 values (P§3; the daemon answers -32600 to
    // any other id), distinct between clients for up to 41 of them.
    let base = (c + 1) * 100_000_000;
    let mut next = 0u64;
    let mut pending: HashMap<u64, Instant> = HashMap::new();
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 65536];
    let more = |next: u64| -> bool {
        count.is_none_or(|n| next < n) && stop_at.is_none_or(|t| Instant::now() < t)
    };
    let mut drain_until: Option<Instant> = None;
    loop {
        // Fill the window.
        if drain_until.is_none() {
            let mut out = Vec::new();
            while pending.len() < window && more(next) {
                next += 1;
                out.extend_from_slice(report(base + next).as_bytes());
                pending.insert(base + next, Instant::now());
                r.sent += 1;
            }
            if !out.is_empty() {
                if let Err(e) = s.write_all(&out) {
                    r.io_error = Some(format!("write: {e}"));
                    return r;
                }
            }
            if !more(next) {
                drain_until = Some(Instant::now() + Duration::from_secs_f64(drain));
            }
        }
        if pending.is_empty() && drain_until.is_some() {
            return r;
        }
        if drain_until.is_some_and(|t| Instant::now() >= t) {
            return r;
        }
        let n = match s.read(&mut chunk) {
            Ok(0) => {
                r.io_error = Some("the daemon closed the connection".into());
                return r;
            }
            Ok(n) => n,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                continue
            }
            Err(e) => {
                r.io_error = Some(format!("read: {e}"));
                return r;
            }
        };
        let now = Instant::now();
        buf.extend_from_slice(&chunk[..n]);
        let mut it = serde_json::Deserializer::from_slice(&buf).into_iter::<serde_json::Value>();
        let mut used = 0;
        while let Some(Ok(v)) = it.next() {
            used = it.byte_offset();
            let id = v.get("id").and_then(|x| x.as_u64()).unwrap_or(0);
            let Some(t0) = pending.remove(&id) else {
                r.unknown += 1;
                continue;
            };
            if v.get("error").is_some() {
                r.errors += 1;
                if r.first_error.is_none() {
                    r.first_error = Some(v.to_string());
                }
                continue;
            }
            r.ok += 1;
            if stop_at.is_none_or(|t| now < t) {
                r.ok_in_window += 1;
            }
            if id - base > warmup {
                r.lat_us.push(now.duration_since(t0).as_secs_f64() * 1e6);
            }
        }
        buf.drain(..used);
    }
}

// --- hostile -------------------------------------------------------------------------------------

/// Shared by the threads of `hostile`: `window` ends the measured window, `done` the whole run.
#[derive(Default)]
struct Hostile {
    window: AtomicBool,
    done: AtomicBool,
    flood_bytes: AtomicU64,
    flood_read: AtomicU64,
    never_conns: AtomicU64,
    never_dropped: AtomicU64,
    pushed: AtomicU64,
    push_refused: AtomicU64,
    cloud_replies: AtomicU64,
    cmds_seen: AtomicU64,
    /// Round trips (us) of the watcher within the window, and those that never came back.
    rtts: Mutex<Vec<f64>>,
    missed: AtomicU64,
    /// Why the flooder or the watcher stopped (the daemon closed them, an I/O error), if they did.
    flood_end: Mutex<Option<String>>,
    watch_end: Mutex<Option<String>>,
}

fn connect_local(port: u16) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect(("127.0.0.1", port))?;
    let _ = s.set_nodelay(true);
    Ok(s)
}

fn hostile(args: &[String]) {
    let (mut port, mut ctl, mut secs, mut never, mut every_ms) = (0u16, 0u16, 0f64, 20usize, 10u64);
    let (mut push_bytes, mut push_hz, mut tail) = (8192usize, 10f64, 10f64);
    let mut it = args.iter();
    while let Some(k) = it.next() {
        let v = it
            .next()
            .unwrap_or_else(|| die(&format!("{k} needs a value")));
        match k.as_str() {
            "--port" => port = num(k, v),
            "--ctl" => ctl = num(k, v),
            "--secs" => secs = num(k, v),
            "--never" => never = num(k, v),
            "--every-ms" => every_ms = num(k, v),
            "--push-bytes" => push_bytes = num(k, v),
            "--push-hz" => push_hz = num(k, v),
            "--tail" => tail = num(k, v),
            _ => die(&format!("unknown option {k}")),
        }
    }
    if port == 0 || ctl == 0 || secs <= 0.0 || push_hz <= 0.0 {
        die("hostile needs --port, --ctl, --secs > 0 and --push-hz > 0");
    }
    let h = Arc::new(Hostile::default());
    let start = Instant::now();
    // The threads are never joined: the run ends with process::exit.
    let spawn = |f: Box<dyn FnOnce(Arc<Hostile>) + Send>| {
        let h = h.clone();
        std::thread::spawn(move || f(h));
    };
    // The watcher first, so that it holds a seat before the others take theirs.
    let (tx, rx) = std::sync::mpsc::channel();
    spawn(Box::new(move |h| watcher(h, port, every_ms, tx)));
    if rx.recv_timeout(Duration::from_secs(10)) != Ok(true) {
        die("the watcher got no answer to local.query_status");
    }
    spawn(Box::new(move |h| flooder(h, port)));
    spawn(Box::new(move |h| never_readers(h, port, never)));
    spawn(Box::new(move |h| pusher(h, ctl, push_bytes, push_hz)));
    let window_end = start + Duration::from_secs_f64(secs);
    while Instant::now() < window_end {
        std::thread::sleep(Duration::from_millis(20));
    }
    h.window.store(true, Relaxed);
    let mut rtts = std::mem::take(&mut *h.rtts.lock().unwrap());
    rtts.sort_by(|x, y| x.total_cmp(y));
    let pct = |p: f64| -> f64 {
        if rtts.is_empty() {
            return -1.0;
        }
        rtts[((p * rtts.len() as f64).ceil() as usize).clamp(1, rtts.len()) - 1]
    };
    let out = serde_json::json!({
        "secs": start.elapsed().as_secs_f64(),
        "flood_bytes": h.flood_bytes.load(Relaxed), "flood_read": h.flood_read.load(Relaxed),
        "flood_end": h.flood_end.lock().unwrap().clone(),
        "never": never, "never_conns": h.never_conns.load(Relaxed),
        "never_dropped": h.never_dropped.load(Relaxed),
        "pushed": h.pushed.load(Relaxed), "push_refused": h.push_refused.load(Relaxed),
        "cloud_replies": h.cloud_replies.load(Relaxed), "cmds_seen": h.cmds_seen.load(Relaxed),
        "push_bytes": push_bytes, "push_hz": push_hz,
        "samples": rtts.len(), "missed": h.missed.load(Relaxed),
        "max_us": rtts.last().copied().unwrap_or(-1.0), "p50_us": pct(0.5), "p99_us": pct(0.99),
        "worst_us": rtts.iter().rev().take(5).collect::<Vec<_>>(),
        "watch_end": h.watch_end.lock().unwrap().clone(),
    });
    println!("{out}");
    let _ = std::io::stdout().flush();
    // The load goes on (the daemon is stopped under it) until the flooder and the watcher see it
    // gone, or `tail` seconds.
    let tail_end = Instant::now() + Duration::from_secs_f64(tail);
    let gone = |h: &Hostile| {
        h.flood_end.lock().unwrap().is_some() && h.watch_end.lock().unwrap().is_some()
    };
    while Instant::now() < tail_end && !gone(&h) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let t = serde_json::json!({
        "after_window_secs": (Instant::now() - window_end).as_secs_f64(),
        "daemon_gone": gone(&h),
        "flood_end": h.flood_end.lock().unwrap().clone(),
        "watch_end": h.watch_end.lock().unwrap().clone(),
    });
    println!("{t}");
    let _ = std::io::stdout().flush();
    // Threads may still block in sockets nobody serves any more: exit without joining them.
    h.done.store(true, Relaxed);
    std::process::exit(0);
}

/// `{}` back to back, 64 KiB a write; a second thread drains what the daemon sends it (commands).
fn flooder(h: Arc<Hostile>, port: u16) {
    let end = |h: &Hostile, why: String| {
        h.flood_end.lock().unwrap().get_or_insert(why);
    };
    let mut s = match connect_local(port) {
        Ok(s) => s,
        Err(e) => return end(&h, format!("connect: {e}")),
    };
    if let Ok(mut r) = s.try_clone() {
        let h = h.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while let Ok(n @ 1..) = r.read(&mut buf) {
                h.flood_read.fetch_add(n as u64, Relaxed);
            }
        });
    }
    let chunk = b"{}".repeat(32 * 1024);
    while !h.done.load(Relaxed) {
        match s.write(&chunk) {
            Ok(n) => {
                if !h.window.load(Relaxed) {
                    h.flood_bytes.fetch_add(n as u64, Relaxed);
                }
            }
            Err(e) => return end(&h, format!("write: {e}")),
        }
    }
}

/// `n` ordinary clients that never read: each sends one request, then only a space every 100 ms,
/// which the daemon skips between values and which fails once the daemon has dropped it; a dropped
/// one is replaced by a new connection.
fn never_readers(h: Arc<Hostile>, port: u16, n: usize) {
    let open = |h: &Hostile| -> Option<TcpStream> {
        let mut s = connect_local(port).ok()?;
        s.write_all(br#"{"id":1,"method":"local.query_status"}"#)
            .ok()?;
        h.never_conns.fetch_add(1, Relaxed);
        Some(s)
    };
    let mut socks: Vec<Option<TcpStream>> = (0..n).map(|_| open(&h)).collect();
    while !h.done.load(Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
        for slot in socks.iter_mut() {
            let alive = slot.as_mut().is_some_and(|s| s.write(b" ").is_ok());
            if !alive {
                if slot.is_some() {
                    h.never_dropped.fetch_add(1, Relaxed);
                }
                *slot = if h.window.load(Relaxed) {
                    None
                } else {
                    open(&h)
                };
            }
        }
    }
}

/// `{"cmd":"send"}` lines on the fake cloud's control port, `hz` a second, each a command of about
/// `bytes`; a second thread reads the control events (acks, the device's replies).
fn pusher(h: Arc<Hostile>, ctl: u16, bytes: usize, hz: f64) {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", ctl)) else {
        return;
    };
    if let Ok(r) = s.try_clone() {
        let h = h.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(r).lines() {
                let Ok(line) = line else { return };
                if line.contains(r#""ev":"reply""#) {
                    h.cloud_replies.fetch_add(1, Relaxed);
                } else if line.contains(r#""ev":"error""#) {
                    h.push_refused.fetch_add(1, Relaxed);
                }
            }
        });
    }
    let pad = "p".repeat(bytes.saturating_sub(60));
    let period = Duration::from_secs_f64(1.0 / hz);
    let mut next = Instant::now();
    let mut i = 0u64;
    while !h.done.load(Relaxed) {
        i += 1;
        let line = format!(
            "{{\"cmd\":\"send\",\"json\":{{\"method\":\"bench_push\",\"params\":[{i},\"{pad}\"]}}}}\n"
        );
        if s.write_all(line.as_bytes()).is_err() {
            return;
        }
        if !h.window.load(Relaxed) {
            h.pushed.fetch_add(1, Relaxed);
        }
        next += period;
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        } else {
            next = now;
        }
    }
}

/// `local.query_status` every `every_ms`, timed from send to its answer; commands it is sent are
/// answered. Tells `ready` once the first answer came.
fn watcher(h: Arc<Hostile>, port: u16, every_ms: u64, ready: std::sync::mpsc::Sender<bool>) {
    let end = |h: &Hostile, why: String| {
        h.watch_end.lock().unwrap().get_or_insert(why);
    };
    let mut s = match connect_local(port) {
        Ok(s) => s,
        Err(e) => {
            let _ = ready.send(false);
            return end(&h, format!("connect: {e}"));
        }
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(50)));
    const GIVE_UP: Duration = Duration::from_secs(5);
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 65536];
    let mut id = 0u64;
    while !h.done.load(Relaxed) {
        id += 1;
        let t0 = Instant::now();
        let q = format!(r#"{{"id":{id},"method":"local.query_status"}}"#);
        if let Err(e) = s.write_all(q.as_bytes()) {
            return end(&h, format!("write: {e}"));
        }
        let mut answered = false;
        while !answered && t0.elapsed() < GIVE_UP {
            let n = match s.read(&mut chunk) {
                Ok(0) => return end(&h, "the daemon closed it".into()),
                Ok(n) => n,
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    continue
                }
                Err(e) => return end(&h, format!("read: {e}")),
            };
            let now = Instant::now();
            buf.extend_from_slice(&chunk[..n]);
            let mut replies = String::new();
            let mut used = 0;
            let mut vals =
                serde_json::Deserializer::from_slice(&buf).into_iter::<serde_json::Value>();
            while let Some(Ok(v)) = vals.next() {
                used = vals.byte_offset();
                if v.get("method").and_then(|m| m.as_str()) == Some("bench_push") {
                    h.cmds_seen.fetch_add(1, Relaxed);
                    if let Some(cid) = v.get("id") {
                        replies.push_str(&format!(r#"{{"id":{cid},"result":["ok"]}}"#));
                    }
                } else if v.get("id").and_then(|x| x.as_u64()) == Some(id) {
                    answered = true;
                    if id == 1 {
                        let _ = ready.send(true);
                    } else if !h.window.load(Relaxed) {
                        let us = now.duration_since(t0).as_secs_f64() * 1e6;
                        h.rtts.lock().unwrap().push(us);
                    }
                }
            }
            buf.drain(..used);
            if !replies.is_empty() {
                if let Err(e) = s.write_all(replies.as_bytes()) {
                    return end(&h, format!("write: {e}"));
                }
            }
        }
        if !answered {
            if id == 1 {
                let _ = ready.send(false);
            }
            if !h.window.load(Relaxed) {
                h.missed.fetch_add(1, Relaxed);
            }
        }
        std::thread::sleep(Duration::from_millis(every_ms));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_ends_skips_braces_in_strings() {
        let b = br#"{"a":"}{"}{"b":{"c":1}}{"d""#;
        assert_eq!(object_ends(b), vec![10, 23]);
    }

    #[test]
    fn report_is_about_200_bytes_of_json() {
        let r = report(1234567);
        assert!((180..=230).contains(&r.len()), "{}", r.len());
        let v: serde_json::Value = serde_json::from_str(&r).unwrap();
        assert_eq!(v["id"], 1234567);
    }
}
