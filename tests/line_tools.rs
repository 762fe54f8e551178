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

/// A port nobody listens on (bound, then released).
fn dead_port() -> u16 {
    listener().1
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
    let (code, out, err) = finish(spawn("miio_send_line", &[], dead_port()));
    assert_eq!(code, 1);
    assert!(out.is_empty());
    assert!(err.contains("Usage: miio_send_line msg"), "{err}");

    let long = "x".repeat(16385);
    let (code, _, err) = finish(spawn("miio_send_line", &[&long], dead_port()));
    assert_eq!(code, 1);
    assert!(err.contains("msg too long, max 16384"), "{err}");

    let port = dead_port();
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
    let port = dead_port();
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
