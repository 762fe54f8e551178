//! LAN UDP 54321 end to end (PROTOCOL.md §4): the real daemon against a raw UDP phone built on the
//! crate's own codec, and against python-miio (the phone of home-automation users) when available.

mod common;
use common::*;
use miio_client::wire::crypto::Keys;
use miio_client::wire::miio;
use std::process::Command;
use std::time::Duration;

const T: Duration = Duration::from_secs(10);

/// The daemon, its LAN port `lan` (None: one of its own), and a cloud that is not there: LAN works
/// offline-first (D7). The dead cloud port lives as long as the daemon.
fn start(dir: &TempDir, lan: Option<u16>, extra: &[&str]) -> (Daemon, DeadPort) {
    let dead = DeadPort::new();
    let mut a = cloud_args(dir, dead.port).args(extra).build();
    if let Some(p) = lan {
        set_opt(&mut a, "--lan-port", p);
    }
    let d = Daemon::start(dir, &a);
    assert!(d.wait_log("STATE_WIFI", T), "{}", d.log_text());
    (d, dead)
}

#[test]
fn hello_reveals_the_token_only_in_ap_mode() {
    let ap = TempDir::new("lan-ap");
    ap.write("device.conf", GOOD_DEVICE_CONF);
    let (ap_d, _dead) = start(&ap, None, &[]);
    let port = ap_d.lan();
    let r = Phone::new(port, TOKEN).hello().expect("hello reply");
    assert_eq!(r.len(), 32);
    assert_eq!(&r[8..12], &(DID as u32).to_be_bytes());
    let token = std::fs::read(ap.join("device.token")).unwrap();
    assert_eq!(&r[16..32], &token[..], "AP mode: the raw token");
    // miIO.info in AP mode (no cloud socket): the full INFO, netif empty (P§4.6).
    let t: [u8; 16] = token[..].try_into().unwrap();
    let info = Phone::new(port, &t)
        .call(3, r#"{"id":5,"method":"miIO.info","params":[]}"#, T)
        .expect("miIO.info answered in AP mode");
    let hex: String = t.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(info["result"]["model"], "acme.dev.v1", "{info}");
    assert_eq!(info["result"]["mac"], "AA:BB:CC:01:02:03");
    assert_eq!(info["result"]["token"], hex.as_str());
    assert_eq!(info["result"]["netif"]["localIp"], "");
    assert!(info["result"]["life"].is_u64());

    let sta = provisioned_dir("lan-sta");
    let (sta_d, _dead2) = start(&sta, None, &[]);
    let port = sta_d.lan();
    let r = Phone::new(port, TOKEN).hello().expect("hello reply");
    assert_eq!(&r[16..32], &[0xff; 16], "provisioned: ff filler (D7)");
    assert_eq!(&r[0..8], &[0x21, 0x31, 0x00, 0x20, 0, 0, 0, 0]);
}

#[test]
fn info_forwarding_replay_and_timeout() {
    let dir = provisioned_dir("lan-fwd");
    let (d, _dead) = start(&dir, None, &["--user-ack-timeout", "1"]);
    let (port, local) = (d.lan(), d.local());
    let phone = Phone::new(port, TOKEN);
    assert!(phone.hello().is_some());
    assert!(phone.info_ok(1), "miIO.info answered with the cloud down");

    // A device method reaches the local client with a rewritten id; the reply restores the phone's.
    let mut lc = LocalClient::connect(local);
    lc.send(r#"{"id":1,"method":"local.query_status"}"#);
    assert!(lc.recv(T).is_some());
    let pkt = phone.packet(200, r#"{"id":42,"method":"get_prop","params":["power"]}"#);
    phone.raw(&pkt);
    let cmd = lc
        .recv_until(T, |v| v["method"] == "get_prop")
        .expect("command at the local client");
    let local_id = cmd["id"].as_u64().unwrap();
    assert!((0x4000_0000..=0x7fff_ffff).contains(&local_id), "{cmd}");
    lc.send(&format!(r#"{{"id":{local_id},"result":["on"]}}"#));
    let r = phone.recv(T).expect("reply");
    let v = miio::decode(&phone.keys, DID as u32, &r).unwrap().value;
    assert_eq!(v["id"], 42);
    assert_eq!(v["result"][0], "on");

    // The same datagram again: not executed again, answered from the stored reply (P§4.5).
    phone.raw(&pkt);
    let r2 = phone.recv(T).expect("replayed reply");
    let v2 = miio::decode(&phone.keys, DID as u32, &r2).unwrap().value;
    assert_eq!(v2, v);
    // A new request after it: the daemon reads datagrams in order, so had the replay been
    // executed, its command would reach the local client first.
    phone.raw(&phone.packet(250, r#"{"id":44,"method":"get_prop","params":["mode"]}"#));
    let next = lc
        .recv_until(T, |v| v["method"] == "get_prop")
        .expect("the next command");
    assert_eq!(
        next["params"][0], "mode",
        "a replay is never executed: {next}"
    );
    let next_id = next["id"].as_u64().unwrap();
    lc.send(&format!(r#"{{"id":{next_id},"result":["auto"]}}"#));
    let r = phone.recv(T).expect("reply to 44");
    let v = miio::decode(&phone.keys, DID as u32, &r).unwrap().value;
    assert_eq!(v["id"], 44, "{v:?}");

    // Nobody answers: -9999 after the user-ack timeout.
    let v = phone
        .call(300, r#"{"id":43,"method":"set_power","params":["off"]}"#, T)
        .expect("timeout reply");
    assert_eq!(v["error"]["code"], -9999, "{v}");
    assert!(
        d.wait_log("STATE_CLOUD", T),
        "cloud attempts go on meanwhile"
    );
}

#[test]
fn bad_input_matrix_keeps_the_daemon_answering() {
    let dir = provisioned_dir("lan-bad");
    let (mut d, _dead) = start(&dir, None, &[]);
    let port = d.lan();
    let phone = Phone::new(port, TOKEN);
    let good = phone.packet(7, r#"{"id":12,"method":"miIO.info","params":[]}"#);
    let mut flipped = good.clone();
    flipped[40] ^= 1;
    let mut did = good.clone();
    did[11] ^= 1;
    let mut len = good.clone();
    len[3] = len[3].wrapping_add(1);
    let wrong_key = miio::seal(
        &Keys::new(b"YWJjZGVmZ2hpamts"),
        DID as u32,
        7,
        br#"{"id":12,"method":"miIO.info"}"#,
    );
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("payload byte flipped", flipped),
        ("wrong did", did),
        ("length field", len),
        ("truncated to 40", good[..40].to_vec()),
        ("31 bytes", vec![0x21; 31]),
        ("65507 bytes", vec![0x21; 65507]),
        ("wrong token", wrong_key),
        ("no id", phone.packet(8, r#"{"method":"miIO.info"}"#)),
        (
            "_internal from LAN",
            phone.packet(9, r#"{"id":5,"method":"_internal.info"}"#),
        ),
        (
            "local from LAN",
            phone.packet(10, r#"{"id":6,"method":"local.query_status"}"#),
        ),
        ("not an object", phone.packet(11, "[1,2,3]")),
    ];
    for (i, (name, bytes)) in cases.iter().enumerate() {
        phone.raw(bytes);
        // The daemon reads datagrams in order: any answer to the bad one would come before the
        // answer to this good request.
        let id = 1000 + i as u64;
        let v = phone
            .call(
                100 + i as u32,
                &format!(r#"{{"id":{id},"method":"miIO.info","params":[]}}"#),
                T,
            )
            .unwrap_or_else(|| panic!("{name}: the next packet is not a reply under the token"));
        assert_eq!(v["id"], id, "{name}: no answer, daemon still answers: {v}");
    }
    // Random datagrams (a randomized test of 100k datagrams, xorshift so the run is reproducible).
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut buf = vec![0u8; 2048];
    for n in 0..100_000u32 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let l = (x % 200) as usize + if n % 3 == 0 { 32 } else { 0 };
        for b in buf.iter_mut().take(l) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        if n % 2 == 0 && l >= 4 {
            buf[0] = 0x21;
            buf[1] = 0x31;
            buf[2] = (l >> 8) as u8;
            buf[3] = l as u8;
        }
        let _ = phone.sock.send_to(&buf[..l], ("127.0.0.1", port));
        if n % 5000 == 0 {
            // Keep loopback buffers from overflowing and check liveness along the way.
            assert!(
                phone.info_ok(2_000_000 + u64::from(n)),
                "alive after {n} datagrams"
            );
        }
    }
    // Drain whatever hello replies the random bytes provoked, then a final check.
    while phone.recv(Duration::from_millis(100)).is_some() {}
    assert!(
        phone.info_ok(3_000_000),
        "alive after 100k random datagrams"
    );
    assert!(d.is_running());
}

#[test]
fn python_miio_as_the_phone() {
    if !python_has("miio") {
        skip("python-miio");
        return;
    }
    // python-miio always says hello to port 54321: take it, one test at a time (ARCHITECTURE.md §5).
    let _lock = PortLock::take(54321);
    let dir = provisioned_dir("pymiio");
    let (d, _dead) = start(&dir, Some(54321), &["--user-ack-timeout", "1"]);
    let local = d.local();
    let mut lc = LocalClient::connect(local);
    lc.send(r#"{"id":1,"method":"local.query_status"}"#);
    assert!(lc.recv(T).is_some());
    let script = r#"
import sys, json, threading, miio
d = miio.Device("127.0.0.1", "4142434445464748494a4b4c4d4e4f50", timeout=3)
info = d.info()
print(json.dumps({"model": info.model}), flush=True)
print(json.dumps({"prop": d.send("get_prop", ["power"])}), flush=True)
try:
    d.send("set_nothing", [])
    print(json.dumps({"err": None}), flush=True)
except Exception as e:
    print(json.dumps({"err": str(e)}), flush=True)
"#;
    let mut c = Command::new(python());
    c.args(["-c", script]);
    let py = Lines::spawn(c);
    let cmd = lc
        .recv_until(T, |v| v["method"] == "get_prop")
        .expect("get_prop forwarded");
    let id = cmd["id"].as_u64().unwrap();
    lc.send(&format!(r#"{{"id":{id},"result":["on"]}}"#));
    assert!(
        py.wait(T, |v| v["model"] == "acme.dev.v1").is_some(),
        "{:?}",
        py.all()
    );
    assert!(
        py.wait(T, |v| v["prop"][0] == "on").is_some(),
        "{:?}",
        py.all()
    );
    // Unanswered: -9999; python-miio retries that once with a new id, then gives up.
    let e = py.wait(T, |v| v.get("err").is_some()).expect("error line");
    let msg = e["err"].as_str().unwrap_or("");
    assert!(
        msg.contains("-9999") || msg.contains("Unable to recover"),
        "{e}"
    );
    assert!(lc.recv_until(T, |v| v["method"] == "set_nothing").is_some());
}
