//! The real binary under abuse: what a peer can make it log, and options it accepts but does not
//! implement yet (the hardening issue, items 2 and 7f).

mod common;
use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const T: Duration = Duration::from_secs(10);

fn lines(d: &Daemon) -> usize {
    d.log_text().lines().count()
}

/// A local client that sends `values` and then a `local.query_country` with id 424242, reading
/// everything the daemon answers on a thread (a client that does not read is closed, L§2).
fn flood_local(port: u16, values: &[&str], times: usize) {
    let mut s = wait_connect(port);
    let mut r = s.try_clone().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut all = Vec::new();
        let mut buf = [0u8; 65536];
        loop {
            match r.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => all.extend_from_slice(&buf[..n]),
            }
            if all.windows(6).any(|w| w == b"424242") {
                let _ = tx.send(());
                break;
            }
        }
    });
    let mut batch = String::new();
    for i in 0..times {
        batch.push_str(values[i % values.len()]);
        if batch.len() > 8192 {
            s.write_all(batch.as_bytes()).unwrap();
            batch.clear();
        }
    }
    batch.push_str(r#"{"id":424242,"method":"local.query_country"}"#);
    s.write_all(batch.as_bytes()).unwrap();
    assert!(
        rx.recv_timeout(Duration::from_secs(30)).is_ok(),
        "the daemon did not answer after the flood"
    );
}

fn wait_connect(port: u16) -> TcpStream {
    let mut s = None;
    assert!(wait_until(T, || {
        s = TcpStream::connect(("127.0.0.1", port)).ok();
        s.is_some()
    }));
    s.unwrap()
}

#[test]
fn ten_thousand_invalid_values_from_a_local_client_log_a_few_lines() {
    let dir = TempDir::new("logflood");
    dir.write("device.conf", GOOD_DEVICE_CONF);
    let cloud = DeadPort::new();
    let args = cloud_args(&dir, cloud.port)
        .opt("-l", 2)
        .opt("--helper-grace", "0.3")
        .build();
    let d = Daemon::start(&dir, &args);
    let local = d.local();
    assert!(d.wait_log("STATE_", T), "{}", d.log_text());
    // Warm up: one of each kind is logged once; what counts is that the next 10,000 add (almost) nothing.
    let kinds = [
        "1",                                 // not an object: -32600 and a warning (L§3)
        "{}",                                // no method, no id: dropped
        r#"{"id":"x"}"#,                     // no method, id not a number: dropped
        r#"{"id":7,"result":0}"#,            // a reply to nothing pending
        r#"{"method":"local.query_time"}"#,  // msg does not have 'id'
        r#"{"id":8,"method":"local.nope"}"#, // unknown local method
        r#"{"method":"miIO.event"}"#,        // a notification while the cloud is down
    ];
    flood_local(local, &kinds, kinds.len());
    let before = lines(&d);
    flood_local(local, &kinds, 10_000);
    let grew = lines(&d) - before;
    eprintln!("the log grew by {grew} lines");
    // The cloud retries add a line now and then; a limit per kind adds at most one line per kind
    // per 10 s. Before the limit this grew by 10,000.
    assert!(grew <= 20, "the log grew by {grew} lines:\n{}", {
        let t = d.log_text();
        t.lines().rev().take(40).collect::<Vec<_>>().join("\n")
    });
}

fn run(args: &[&str]) -> (i32, String) {
    let out = Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn options_are_taken_without_a_note() {
    // A log file that cannot be opened stops the daemon right after the options are parsed: its
    // line is all stderr holds (no usage text, no note about an option).
    let bad_log = "/nonexistent-dir/miio.log";
    let only_the_log_line = |err: &str| {
        err.lines().count() == 1 && err.starts_with("miio_client: cannot open log file")
    };
    let (code, err) = run(&["--didkey-method=_otc.x", "-L", bad_log]);
    assert_eq!(code, 1, "{err}");
    assert!(only_the_log_line(&err), "{err}");
    if cfg!(feature = "mqtt") {
        let (code, err) = run(&[
            "--mqtt",
            "--mqtt-id=abc",
            "--didkey-method=m",
            "-L",
            bad_log,
        ]);
        assert_eq!(code, 1, "{err}");
        assert!(only_the_log_line(&err), "{err}");
    }
}
