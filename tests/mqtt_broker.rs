//! The MQTT session (`proto::mqtt`, L§11) against a real broker: Debian's `mosquitto` on a free
//! loopback port with its own config, driven over a real socket by a tiny test-only loop. The
//! session subscribes, a message published with `mosquitto_pub` arrives as an event, and a QoS 1
//! publish of the session is acknowledged and seen by `mosquitto_sub`. Skipped (and recorded) when
//! mosquitto is missing.
#![cfg(feature = "mqtt")]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use miio_client::proto::mqtt::{Action, Config, Event, Session, Topic};
use miio_client::time::Instant as VInstant;

use common::{find, mosquitto, skip};

/// The io side of the session, test-only: one blocking socket with a short read timeout.
struct Driver {
    s: Session,
    port: u16,
    sock: Option<TcpStream>,
    t0: Instant,
    events: Vec<Event>,
}

impl Driver {
    fn now(&self) -> VInstant {
        VInstant::from_millis(self.t0.elapsed().as_millis() as u64)
    }

    /// Carries out the actions, then reads once (up to 50 ms) and runs the deadline.
    fn turn(&mut self) {
        while let Some(a) = self.s.poll_action() {
            let now = self.now();
            match a {
                Action::Connect => match TcpStream::connect(("127.0.0.1", self.port)) {
                    Ok(sock) => {
                        sock.set_read_timeout(Some(Duration::from_millis(50)))
                            .unwrap();
                        self.sock = Some(sock);
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
        if let Some(sock) = self.sock.as_mut() {
            let mut buf = [0u8; 4096];
            match sock.read(&mut buf) {
                Ok(0) => {
                    self.sock = None;
                    let now = self.now();
                    self.s.closed(now);
                }
                Ok(n) => {
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
            std::thread::sleep(Duration::from_millis(20));
        }
        let now = self.now();
        if self.s.poll_timeout().is_some_and(|t| t <= now) {
            self.s.handle_timeout(now);
        }
        self.events
            .extend(std::iter::from_fn(|| self.s.poll_event()));
    }

    fn until(&mut self, limit: Duration, mut cond: impl FnMut(&mut Driver) -> bool) -> bool {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            self.turn();
            if cond(self) {
                return true;
            }
        }
        false
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
    let mut d = Driver {
        s: Session::new(Config::default()),
        port: b.port,
        sock: None,
        t0: Instant::now(),
        events: Vec::new(),
    };
    d.s.start(d.now());
    assert!(
        d.until(Duration::from_secs(10), |d| d.events.contains(&Event::Up)),
        "no CONNACK from mosquitto"
    );
    assert_eq!(
        d.s.poll_timeout(),
        None,
        "keep-alive 0: no deadline while up"
    );

    // Inbound: a QoS 1 message on miio/report. Sent again until it arrives, since the SUBACK
    // cannot be seen from here.
    let port = b.port.to_string();
    let mut got = false;
    for _ in 0..20 {
        let st = Command::new(&publ)
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-q",
                "1",
                "-t",
                "miio/report",
            ])
            .args(["-m", "{\"id\":1,\"method\":\"props\"}"])
            .status()
            .expect("mosquitto_pub runs");
        assert!(st.success());
        got = d.until(Duration::from_millis(500), |d| {
            d.events.iter().any(|e| {
                *e == Event::Message {
                    topic: Topic::Report,
                    payload: b"{\"id\":1,\"method\":\"props\"}".to_vec(),
                }
            })
        });
        if got {
            break;
        }
    }
    assert!(got, "the message on miio/report never arrived");

    // Outbound: a QoS 1 publish on miio/command, seen by mosquitto_sub and acked to the session.
    let watcher = Command::new(&sub)
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
        .args(["-C", "1", "-W", "20", "-v"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("mosquitto_sub runs");
    let mut watcher = KillOnDrop(watcher);
    let mut seen = false;
    for _ in 0..40 {
        let now = d.now();
        d.s.publish(now, Topic::Command, b"{\"id\":2,\"method\":\"get_prop\"}")
            .expect("taken while up");
        // Until the broker acks it.
        assert!(
            d.until(Duration::from_secs(5), |d| d.s.inflight() == 0),
            "no PUBACK from mosquitto"
        );
        if watcher.0.try_wait().unwrap().is_some() {
            seen = true;
            break;
        }
        d.until(Duration::from_millis(250), |_| false);
        if watcher.0.try_wait().unwrap().is_some() {
            seen = true;
            break;
        }
    }
    assert!(seen, "mosquitto_sub never saw the publish");
    let mut out = String::new();
    watcher
        .0
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert_eq!(
        out.trim_end(),
        "miio/command {\"id\":2,\"method\":\"get_prop\"}"
    );
    assert_eq!(d.s.stats().dropped_not_up + d.s.stats().dropped_full, 0);

    // A clean stop: DISCONNECT, then the connection closed.
    let now = d.now();
    d.s.stop(now);
    d.turn();
    assert!(d.sock.is_none());
    assert_eq!(d.events.last(), Some(&Event::Down));
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
