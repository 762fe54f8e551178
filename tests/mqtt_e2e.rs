//! The daemon's MQTT API end to end (LOCAL_API.md §11): the real binary with `--mqtt` against
//! Debian's `mosquitto` on a free loopback port with its own config, `miio_fakecloud` as the cloud,
//! and `mosquitto_pub`/`mosquitto_sub` as the apps. A report reaches the cloud and its ack comes
//! back on `miio/report_ack` under the original id; a cloud command appears on `miio/command` and
//! the reply on `miio/command_ack` goes up; `local/miio_client_in` is answered on
//! `local/miio_client_out`; a `#` monitor shows it all. The broker killed and restarted: the daemon
//! reconnects and resubscribes, and 54322 is served meanwhile. A broker that never answers, or
//! talks garbage, stalls nothing either. Skipped (and recorded) without mosquitto.
#![cfg(feature = "mqtt")]

mod common;

use std::io::Write;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;

const T: Duration = Duration::from_secs(20);

struct Tools {
    broker: PathBuf,
    sub: PathBuf,
    publ: PathBuf,
}

fn tools() -> Option<Tools> {
    match (
        find("mosquitto"),
        find("mosquitto_sub"),
        find("mosquitto_pub"),
    ) {
        (Some(broker), Some(sub), Some(publ)) => Some(Tools { broker, sub, publ }),
        _ => {
            skip("mosquitto");
            None
        }
    }
}

/// `mosquitto_sub -v` on `topic`: one line `TOPIC PAYLOAD` per message.
fn monitor(t: &Tools, port: u16, topic: &str) -> Lines {
    let mut c = Command::new(&t.sub);
    c.args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1", "-v"])
        .args(["-t", topic]);
    Lines::spawn(c)
}

fn publish(t: &Tools, port: u16, topic: &str, payload: &str) {
    let st = Command::new(&t.publ)
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1"])
        .args(["-t", topic, "-m", payload])
        .status()
        .expect("mosquitto_pub runs");
    assert!(st.success(), "mosquitto_pub {topic} {payload}");
}

/// Publishes `payload` on `topic` until `mon` shows a line with `want` (the daemon's and the
/// monitor's subscriptions are up once it does); the line.
fn publish_until(
    t: &Tools,
    port: u16,
    mon: &Lines,
    topic: &str,
    payload: &str,
    want: &str,
) -> Option<String> {
    for _ in 0..30 {
        publish(t, port, topic, payload);
        if let Some(l) = mon.wait_line(Duration::from_millis(700), |l| l.contains(want)) {
            return Some(l);
        }
    }
    None
}

fn daemon_args(dir: &TempDir, cloud: u16, broker: u16) -> Vec<String> {
    cloud_args(dir, cloud)
        .opt("--transports", "udp")
        .args(&[format!("--mqtt=127.0.0.1:{broker}")])
        .build()
}

/// 54322 is served: a `local.*` answer and a report's ack.
fn local_api_serves(d: &Daemon, id: u64) {
    let mut c = LocalClient::connect(d.local());
    c.send(&format!(r#"{{"id":{id},"method":"local.query_status"}}"#));
    let v = c
        .recv_until(Duration::from_secs(5), |v| {
            v.get("id") == Some(&Value::from(id))
        })
        .expect("local.query_status answered");
    assert_eq!(v["params"], "cloud_connected", "{v}");
    c.send(&format!(
        r#"{{"id":{},"method":"props","params":{{"x":1}}}}"#,
        id + 1
    ));
    let ack = c
        .recv_until(Duration::from_secs(5), |v| {
            v.get("id") == Some(&Value::from(id + 1))
        })
        .expect("a report acked");
    assert_eq!(ack["result"], "ok", "{ack}");
}

#[test]
fn mqtt_topics_through_mosquitto_and_a_broker_restart() {
    let Some(t) = tools() else { return };
    let b = mosquitto(&t.broker);
    let port = b.port;
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
    let dir = provisioned_dir("mqtt-e2e");
    let d = Daemon::start(&dir, &daemon_args(&dir, cloud.port, port));
    assert!(d.wait_log("STATE_CLOUD_CONNECTED", T), "{}", d.log_text());
    assert!(
        d.wait_log("mqtt: connected to the broker", T),
        "{}",
        d.log_text()
    );

    // The whole traffic, as any app subscribed to `#` sees it (vendor §十七).
    let all = monitor(&t, port, "#");
    // local/miio_client_in → local/miio_client_out; retried until both subscriptions are up.
    let out = publish_until(
        &t,
        port,
        &all,
        "local/miio_client_in",
        r#"{"id":31,"method":"local.query_status"}"#,
        "local/miio_client_out ",
    )
    .unwrap_or_else(|| panic!("no answer on local/miio_client_out: {:?}", all.all()));
    assert_eq!(
        out,
        r#"local/miio_client_out {"id":31,"method":"local.status","params":"cloud_connected"}"#
    );

    // A report reaches the cloud (under a cloud id), its ack comes back under the original id.
    publish(
        &t,
        port,
        "miio/report",
        r#"{"id":4242,"method":"props","params":{"power":"on"}}"#,
    );
    let up = events
        .wait(T, |v| {
            v["ev"] == "msg" && v["dir"] == "in" && v["json"]["params"]["power"] == "on"
        })
        .expect("the report reached the fake cloud");
    assert_eq!(up["json"]["method"], "props");
    let ack = all
        .wait_line(T, |l| l.starts_with("miio/report_ack "))
        .expect("the ack on miio/report_ack");
    assert_eq!(ack, r#"miio/report_ack {"id":4242,"result":"ok"}"#);

    // A cloud command appears on miio/command; the reply on miio/command_ack goes up.
    let mut send = Command::new(BIN);
    send.args([
        "miio_fakecloud",
        "send",
        "--ctl-port",
        &cloud.ctl.to_string(),
    ])
    .args(["--did", &DID.to_string()])
    .arg(r#"{"id":77,"method":"get_prop","params":["power"]}"#)
    .stdout(Stdio::piped());
    let child = send.spawn().unwrap();
    let cmd = all
        .wait_line(T, |l| {
            l.starts_with("miio/command ") && l.contains("get_prop")
        })
        .expect("the command on miio/command");
    let cmd: Value = serde_json::from_str(cmd.split_once(' ').unwrap().1).unwrap();
    assert_eq!(cmd["id"], 77);
    publish(&t, port, "miio/command_ack", r#"{"id":77,"result":["on"]}"#);
    let reply = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&reply.stdout);
    assert!(
        reply.status.success() && text.contains(r#""result":["on"]"#),
        "{text}"
    );
    // The monitor saw the reply the app published too.
    assert!(all
        .wait_line(T, |l| l.starts_with("miio/command_ack "))
        .is_some());

    // The broker killed: the daemon notices, 54322 is served meanwhile.
    drop(b);
    drop(all);
    assert!(
        d.wait_log("mqtt: the broker closed the connection", T),
        "{}",
        d.log_text()
    );
    local_api_serves(&d, 50);
    // Restarted on the same port: the daemon reconnects and subscribes again.
    let b2 = mosquitto_on(&t.broker, TempDir::new("mosquitto"), port)
        .expect("mosquitto restarts on its port");
    assert!(
        wait_until(T, || d
            .log_text()
            .matches("mqtt: connected to the broker")
            .count()
            >= 2),
        "{}",
        d.log_text()
    );
    let all = monitor(&t, b2.port, "#");
    let out = publish_until(
        &t,
        port,
        &all,
        "local/miio_client_in",
        r#"{"id":32,"method":"local.query_time"}"#,
        "local/miio_client_out ",
    )
    .expect("answered after the restart: resubscribed");
    assert!(out.contains(r#""id":32,"method":"local.time""#), "{out}");
    local_api_serves(&d, 60);
}

/// A broker that accepts and never answers, then one that answers garbage: the daemon gives up
/// on each (the CONNACK's 10 s, malformed input) and goes on serving 54322 all the while.
#[test]
fn a_silent_or_hostile_broker_stalls_nothing() {
    if tools().is_none() {
        return;
    }
    let cloud = fakecloud();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let dir = provisioned_dir("mqtt-hostile");
    let d = Daemon::start(&dir, &daemon_args(&dir, cloud.port, port));
    assert!(d.wait_log("STATE_CLOUD_CONNECTED", T), "{}", d.log_text());
    // Silent: accepted by the kernel, never read.
    local_api_serves(&d, 10);
    // Hostile: accepted and answered with garbage, again and again.
    l.set_nonblocking(true).unwrap();
    let ok = wait_until(T, || {
        if let Ok((mut s, _)) = l.accept() {
            let _ = s.write_all(&[0xf0; 64]);
        }
        d.log_has("mqtt: malformed")
    });
    assert!(ok, "{}", d.log_text());
    local_api_serves(&d, 20);
    assert!(!d.log_has("mqtt: connected to the broker"));
}
