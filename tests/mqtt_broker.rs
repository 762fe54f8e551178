//! The MQTT session (`proto::mqtt`, L§11) against a real broker: Debian's `mosquitto` on a free
//! loopback port with its own config, driven over a real socket by a tiny test-only loop. The
//! session subscribes, a message published with `mosquitto_pub` arrives as an event, and a QoS 1
//! publish of the session is acknowledged and seen by `mosquitto_sub`. Skipped (and recorded) when
//! mosquitto is missing.
#![cfg(feature = "mqtt")]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use miio_client::proto::mqtt::{Action, Config, Event, Session, Topic};
use miio_client::time::Instant as VInstant;
use miio_client::wire::mqtt::{kind, Splitter};

use common::{find, mosquitto, skip, Lines};

const T: Duration = Duration::from_secs(10);

/// The io side of the session, test-only: one blocking socket, read until the session's next
/// deadline or the caller's, whichever comes first.
struct Driver {
    s: Session,
    port: u16,
    sock: Option<TcpStream>,
    t0: Instant,
    events: Vec<Event>,
    /// The kinds of the packets the broker sent, in order (the test's own split of the bytes the
    /// session got: the SUBACK, which the session does not report, is the barrier for a publish).
    from_broker: Vec<u8>,
    split: Splitter,
}

impl Driver {
    fn new(port: u16) -> Driver {
        Driver {
            s: Session::new(Config::default()),
            port,
            sock: None,
            t0: Instant::now(),
            events: Vec::new(),
            from_broker: Vec::new(),
            split: Splitter::new(1 << 20),
        }
    }

    fn now(&self) -> VInstant {
        VInstant::from_millis(self.t0.elapsed().as_millis() as u64)
    }

    /// Carries out the actions, then waits for input until the session's deadline or `end`
    /// (nothing else can happen without a connection), and runs the deadline.
    fn turn(&mut self, end: Instant) {
        while let Some(a) = self.s.poll_action() {
            let now = self.now();
            match a {
                Action::Connect => match TcpStream::connect(("127.0.0.1", self.port)) {
                    Ok(sock) => {
                        self.sock = Some(sock);
                        self.split.clear();
                        self.s.connected(now);
                    }
                    Err(_) => self.s.connect_failed(now),
                },
                Action::Send(bytes) => {
                    let ok = self
                        .sock
                        .as_mut()
                        .is_some_and(|s| s.write_all(&bytes).is_ok());
                    assert!(ok, "a write on the broker connection failed");
                }
                Action::Close => self.sock = None,
            }
        }
        self.events
            .extend(std::iter::from_fn(|| self.s.poll_event()));
        let due = self
            .s
            .poll_timeout()
            .map(|t| self.t0 + Duration::from_millis(t.millis()));
        let wake = due.map_or(end, |d| d.min(end));
        let left = wake.saturating_duration_since(Instant::now());
        if let Some(sock) = self.sock.as_mut() {
            // A zero timeout is refused; 1 ms is the least wait.
            sock.set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .unwrap();
            let mut buf = [0u8; 4096];
            match sock.read(&mut buf) {
                Ok(0) => {
                    self.sock = None;
                    let now = self.now();
                    self.s.closed(now);
                }
                Ok(n) => {
                    self.split.push(&buf[..n]);
                    while let Ok(Some(f)) = self.split.next_frame() {
                        self.from_broker.push(f[0] >> 4);
                    }
                    let now = self.now();
                    self.s.received(now, &buf[..n]);
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => panic!("a read on the broker connection failed: {e}"),
            }
        } else {
            // No connection: the session's deadline (a reconnect) is all that can come.
            std::thread::park_timeout(left);
        }
        let now = self.now();
        if self.s.poll_timeout().is_some_and(|t| t <= now) {
            self.s.handle_timeout(now);
        }
        self.events
            .extend(std::iter::from_fn(|| self.s.poll_event()));
    }

    /// Turns until `cond` holds (true) or `limit` passes (false).
    fn until(&mut self, limit: Duration, mut cond: impl FnMut(&mut Driver) -> bool) -> bool {
        let end = Instant::now() + limit;
        loop {
            if cond(self) {
                return true;
            }
            if Instant::now() >= end {
                return false;
            }
            self.turn(end);
        }
    }
}

#[test]
fn session_subscribes_receives_and_publishes_through_mosquitto() {
    let (Some(bin), Some(sub), Some(publ)) = (
        find("mosquitto"),
        find("mosquitto_sub"),
        find("mosquitto_pub"),
    ) else {
        skip("mosquitto");
        return;
    };
    let b = mosquitto(&bin);
    let mut d = Driver::new(b.port);
    d.s.start(d.now());
    assert!(
        d.until(T, |d| d.events.contains(&Event::Up)),
        "no CONNACK from mosquitto"
    );
    assert_eq!(
        d.s.poll_timeout(),
        None,
        "keep-alive 0: no deadline while up"
    );

    // Inbound: once the broker has acked the session's SUBSCRIBE, a QoS 1 message on
    // miio/report published by mosquitto_pub arrives as an event.
    assert!(
        d.until(T, |d| d.from_broker.contains(&kind::SUBACK)),
        "no SUBACK from mosquitto: {:?}",
        d.from_broker
    );
    let port = b.port.to_string();
    let st = Command::new(&publ)
        .args(["-h", "127.0.0.1", "-p", &port, "-q", "1"])
        .args(["-t", "miio/report", "-m", "{\"id\":1,\"method\":\"props\"}"])
        .status()
        .expect("mosquitto_pub runs");
    assert!(st.success());
    assert!(
        d.until(T, |d| d.events.iter().any(|e| {
            *e == Event::Message {
                topic: Topic::Report,
                payload: b"{\"id\":1,\"method\":\"props\"}".to_vec(),
            }
        })),
        "the message on miio/report never arrived: {:?}",
        d.events
    );

    // Outbound: once mosquitto_sub says its SUBSCRIBE was acked, a QoS 1 publish of the session
    // on miio/command is acked to the session and seen by mosquitto_sub.
    // stdbuf: mosquitto_sub's lines through a pipe, each as it is written (its `-d` SUBACK line
    // is the barrier).
    let mut c = Command::new(find("stdbuf").expect("stdbuf (coreutils)"));
    c.arg("-oL")
        .arg(&sub)
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-q",
            "1",
            "-t",
            "miio/command",
        ])
        .args(["-C", "1", "-W", "20", "-v", "-d"]);
    let watcher = Lines::spawn(c);
    assert!(
        watcher
            .wait_line(T, |l| l.contains("received SUBACK"))
            .is_some(),
        "mosquitto_sub did not subscribe: {:?}",
        watcher.all()
    );
    let now = d.now();
    d.s.publish(now, Topic::Command, b"{\"id\":2,\"method\":\"get_prop\"}")
        .expect("taken while up");
    assert!(
        d.until(T, |d| d.s.inflight() == 0),
        "no PUBACK from mosquitto"
    );
    let got = watcher.wait_line(T, |l| l.starts_with("miio/command "));
    assert_eq!(
        got.as_deref(),
        Some("miio/command {\"id\":2,\"method\":\"get_prop\"}"),
        "{:?}",
        watcher.all()
    );
    assert_eq!(d.s.stats().dropped_not_up + d.s.stats().dropped_full, 0);

    // A clean stop: DISCONNECT, then the connection closed.
    let now = d.now();
    d.s.stop(now);
    d.turn(Instant::now());
    assert!(d.sock.is_none());
    assert_eq!(d.events.last(), Some(&Event::Down));
}
