//! The cloud link end to end (PROTOCOL.md §5): the real daemon against `miio_fakecloud` and against
//! an independent Python cloud (tests/pycloud), over UDP and over TCP only, with faults.

mod common;
use common::*;
use serde_json::Value;
use std::process::{Command, Stdio};
use std::time::Duration;

const T: Duration = Duration::from_secs(15);

fn daemon_args(dir: &TempDir, port: u16, transport: &str) -> Vec<String> {
    cloud_args(dir, port)
        .link(transport)
        .opt("--keepalive", 1)
        .build()
}

fn run_fakecloud(transport: &str) {
    let cloud = fakecloud();
    let ctl = cloud.ctl;
    let dir = provisioned_dir(&format!("fc-{transport}"));
    let args = daemon_args(&dir, cloud.port, transport);
    let d = Daemon::start(&dir, &args);
    assert!(d.wait_log("STATE_CLOUD_CONNECTED", T), "{}", d.log_text());
    // Logged before the state change above.
    assert!(
        d.log_has(&format!("over {}", transport.to_uppercase())),
        "{}",
        d.log_text()
    );

    // An upstream report is acked with the client's own id.
    let mut c = LocalClient::connect(d.local());
    c.send(r#"{"id":5,"method":"props","params":{"power":"on"}}"#);
    let ack = c
        .recv_until(T, |v| v.get("id") == Some(&Value::from(5)))
        .expect("ack");
    assert_eq!(ack["result"], "ok", "{ack}");

    // A command pushed from the fake cloud reaches the client; its reply goes back up.
    let mut send = Command::new(BIN);
    send.args([
        "miio_fakecloud",
        "send",
        "--ctl-port",
        &ctl.to_string(),
        "--did",
        &DID.to_string(),
        r#"{"id":77,"method":"get_prop","params":["power"]}"#,
    ])
    .stdout(Stdio::piped());
    let child = send.spawn().unwrap();
    let cmd = c
        .recv_until(T, |v| v.get("method") == Some(&Value::from("get_prop")))
        .expect("command reaches the local client");
    assert_eq!(cmd["id"], 77);
    c.send(r#"{"id":77,"result":["on"]}"#);
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains(r#""result":["on"]"#),
        "{text}"
    );
}

#[test]
fn fakecloud_over_udp() {
    run_fakecloud("udp");
}

#[test]
fn fakecloud_over_tcp_only() {
    run_fakecloud("tcp");
}

fn ev<'a>(name: &'a str) -> impl Fn(&Value) -> bool + 'a {
    move |v| v["ev"] == name
}

fn is_msg(method: &str) -> impl Fn(&Value) -> bool + '_ {
    move |v| v["ev"] == "msg" && v["json"]["method"] == method
}

fn run_pycloud(transport: &str) {
    let Some(mut py) = pycloud() else { return };
    let dir = provisioned_dir(&format!("py-{transport}"));
    let args = daemon_args(&dir, py.port, transport);
    let d = Daemon::start(&dir, &args);
    assert!(d.wait_log("STATE_CLOUD_CONNECTED", T), "{}", d.log_text());
    let c = &py.cloud;
    assert!(c.wait(T, ev("hello")).is_some());
    let info = c.wait(T, is_msg("_otc.info")).expect("_otc.info");
    let p = &info["json"]["params"];
    assert_eq!(p["model"], "acme.dev.v1");
    assert_eq!(p["mac"], "AA:BB:CC:01:02:03");
    assert_eq!(p["token"], "4142434445464748494a4b4c4d4e4f50");
    assert_eq!(p["hw_ver"], "Linux");
    assert_eq!(p["netif"]["localIp"], "127.0.0.1");
    assert_eq!(info["transport"], transport);
    let idle = c.wait(T, is_msg("props")).expect("ota_state idle report");
    assert_eq!(idle["json"]["params"]["ota_state"], "idle");
    // Keepalives are echoed; pongs keep the link up.
    assert!(c
        .wait(T, |v| v["ev"] == "sent" && v["kind"] == "pong")
        .is_some());

    let mut lc = LocalClient::connect(d.local());
    lc.send(r#"{"id":9,"method":"event.motion","params":[1],"extra":{"k":[1,2]}}"#);
    let ack = lc
        .recv_until(T, |v| v.get("id") == Some(&Value::from(9)))
        .expect("ack");
    assert_eq!(ack["result"], "ok");
    let up = c.wait(T, is_msg("event.motion")).unwrap();
    assert_ne!(up["json"]["id"], 9, "the cloud sees a rewritten id (D5)");
    assert_eq!(up["json"]["extra"]["k"][1], 2, "other members kept");

    py.push(&serde_json::json!({"id":501,"method":"get_prop","params":["power"]}));
    let cmd = lc
        .recv_until(T, |v| v.get("method") == Some(&Value::from("get_prop")))
        .expect("command");
    assert_eq!(cmd["id"], 501);
    lc.send(r#"{"id":501,"result":["on"]}"#);
    let r = py
        .cloud
        .wait(T, |v| v["ev"] == "reply" && v["id"] == 501)
        .expect("reply reaches the cloud");
    assert_eq!(r["pending"], true);
    assert_eq!(r["json"]["result"][0], "on");

    // D3 and D4 on every packet the cloud decoded. The reply above was the daemon's last packet
    // but keepalives; sync makes sure every event the cloud wrote for what it read is in.
    py.sync();
    for m in py.cloud.json().iter().filter(|v| v["ev"] == "msg") {
        assert_eq!(m["nul"], true, "{m}");
        assert_eq!(m["after_nul"], 0, "{m}");
        assert_eq!(m["stamp_back"], false, "{m}");
    }
    assert_eq!(py.cloud.count(ev("drop")), 0, "{:?}", py.cloud.all());
}

#[test]
fn python_cloud_over_udp() {
    run_pycloud("udp");
}

#[test]
fn python_cloud_over_tcp_only() {
    run_pycloud("tcp");
}

/// Every event of the device's first session is in: over UDP the cloud reads one socket in
/// order, so the hello of the next attempt comes after all of it; over TCP the first connection's
/// close (the daemon drops it for the next attempt) comes after its last byte.
fn first_session_over(py: &Py, transport: &str) {
    let end = if transport == "udp" {
        py.cloud.wait_nth(T, 2, ev("hello"))
    } else {
        py.cloud
            .wait(T, |v| v["ev"] == "tcp_close" && v["conn"] == 1)
    };
    assert!(
        end.is_some(),
        "first session never ended: {:?}",
        py.cloud.all()
    );
}

fn silent_cloud_then_recovery(transport: &str) {
    let Some(mut py) = pycloud() else { return };
    let dir = provisioned_dir(&format!("silent-{transport}"));
    let args = daemon_args(&dir, py.port, transport);
    let d = Daemon::start(&dir, &args);
    assert!(d.wait_log("STATE_CLOUD_CONNECTED", T), "{}", d.log_text());
    assert!(py
        .cloud
        .wait(T, |v| v["ev"] == "sent" && v["kind"] == "pong")
        .is_some());
    let mut lc = LocalClient::connect(d.local());
    py.cmd(r#"{"cmd":"silent","on":true}"#);
    let st = lc
        .recv_until(T, |v| v["params"] == "cloud_retry")
        .expect("cloud_retry broadcast");
    assert_eq!(st["method"], "local.status");
    // Upstream while down: OT server disconnected at once (D5).
    lc.send(r#"{"id":3,"method":"props","params":{}}"#);
    let e = lc
        .recv_until(T, |v| v.get("id") == Some(&Value::from(3)))
        .unwrap();
    assert_eq!(e["error"]["code"], -30011);
    first_session_over(&py, transport);
    // P§5.6: lost at the 3rd tick after the first unanswered keepalive, so at most 2 more were sent.
    // (While down the daemon sends hellos, not keepalives.)
    let unanswered = py
        .cloud
        .count(|v| v["ev"] == "unanswered" && v["what"] == "keepalive");
    assert!(
        (1..=3).contains(&unanswered),
        "{unanswered} keepalives went unanswered"
    );
    py.cmd(r#"{"cmd":"silent","on":false}"#);
    lc.recv_until(Duration::from_secs(20), |v| {
        v["params"] == "cloud_connected"
    })
    .expect("reconnects when the cloud is back");
    // A report sent now reaches the cloud after everything of the new session's start (same
    // socket, in order): then the counts are final.
    lc.send(r#"{"id":4,"method":"test.barrier","params":[]}"#);
    assert!(py.cloud.wait(T, is_msg("test.barrier")).is_some());
    assert_eq!(py.cloud.count(is_msg("_otc.info")), 2);
    // D12: the idle report only once per daemon run.
    let idle = py
        .cloud
        .count(|v| v["ev"] == "msg" && v["json"]["params"]["ota_state"] == "idle");
    assert_eq!(idle, 1);
}

#[test]
fn silent_cloud_udp() {
    silent_cloud_then_recovery("udp");
}

#[test]
fn silent_cloud_tcp() {
    silent_cloud_then_recovery("tcp");
}

#[test]
fn bad_packets_are_dropped_and_the_link_stays_up() {
    let Some(mut py) = pycloud() else { return };
    let dir = provisioned_dir("badpkt");
    let args = daemon_args(&dir, py.port, "udp");
    let d = Daemon::start(&dir, &args);
    assert!(d.wait_log("STATE_CLOUD_CONNECTED", T), "{}", d.log_text());
    // The cloud knows the device's address once a packet of it arrived.
    assert!(py.cloud.wait(T, is_msg("_otc.info")).is_some());
    // V12 (a valid uplink under this key and did 1234567) and its mangled forms, plus garbage.
    let v12 = "21310060000000000012d6875a9b23a026e3fd6419fdfce1305f76990f67481cc6f4ab6a152c05839b1d041d93659271e8865b7c78bb5a97f72088246b796d79d9efa9253dcb29863821b9855ce110f0b35ebb5082ae9f7d19c854e0cabd4c10";
    let ours = format!("{DID:08x}");
    let fixed = v12.replacen("0012d687", &ours, 1);
    let keys = miio_client::wire::crypto::Keys::new(KEY.as_bytes().try_into().unwrap());
    let non_json: String = miio_client::wire::miio::seal_raw(&keys, DID as u32, 1, b"not json\0")
        .unwrap()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut flipped = fixed.clone();
    flipped.replace_range(100..102, "00");
    // Each `ok` says the packet was sent, so all of them are in the daemon's socket before the
    // request below is even written: its ack comes after the daemon has read them all.
    for hex in [
        flipped.as_str(),
        v12,                                                                // wrong did
        &fixed[..80],                                                       // truncated
        "00",                                                               // short
        "2131002000000000ffffffff00000000ffffffffffffffffffffffffffffffff", // not ours
        &fixed.replacen("21310060", "21310061", 1),                         // bad length
        &non_json, // valid MD5 and padding, not JSON
    ] {
        py.cmd(&format!(r#"{{"cmd":"raw","did":{DID},"hex":"{hex}"}}"#));
    }
    let mut lc = LocalClient::connect(d.local());
    lc.send(r#"{"id":11,"method":"props","params":{}}"#);
    let ack = lc
        .recv_until(T, |v| v.get("id") == Some(&Value::from(11)))
        .unwrap();
    assert_eq!(ack["result"], "ok", "link still up: {ack}");
    assert!(
        wait_until(T, || d.log_has("MD5") || d.log_has("device id")),
        "drops are logged: {}",
        d.log_text()
    );
    assert!(!d.log_has("cloud_retry"), "{}", d.log_text());
}

#[test]
fn tcp_closed_mid_packet_reconnects() {
    let Some(mut py) = pycloud() else { return };
    let dir = provisioned_dir("tcpcut");
    let args = daemon_args(&dir, py.port, "tcp");
    let d = Daemon::start(&dir, &args);
    assert!(d.wait_log("STATE_CLOUD_CONNECTED", T), "{}", d.log_text());
    assert!(py.cloud.wait(T, is_msg("_otc.info")).is_some());
    let mut lc = LocalClient::connect(d.local());
    // Half a packet header, then the cloud closes the connection.
    py.cmd(&format!(
        r#"{{"cmd":"raw","did":{DID},"hex":"21310060000000"}}"#
    ));
    py.cmd(r#"{"cmd":"close_tcp"}"#);
    lc.recv_until(T, |v| v["params"] == "cloud_retry")
        .expect("link down");
    lc.recv_until(Duration::from_secs(20), |v| {
        v["params"] == "cloud_connected"
    })
    .expect("reconnected");
    assert!(
        py.cloud.wait_nth(T, 2, ev("tcp_open")).is_some(),
        "{:?}",
        py.cloud.all()
    );
}
