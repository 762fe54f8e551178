//! End-to-end tests of `miio_fakecloud` on loopback: the server runs in-process on free ports and
//! a raw test device speaks to it over UDP and TCP with `wire::miio::seal`/`open`. Every wait has
//! a deadline (socket read timeouts); nothing sleeps.
#![cfg(feature = "fakecloud")]

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use miio_client::applets::fakecloud::{self, DeviceCred, FakeCloud, FakeCloudConfig, StopHandle};
use miio_client::wire::crypto::Keys;
use miio_client::wire::miio::{self, Packet};
use serde_json::{json, Value};

const DID: u32 = 1234567;
const KEY: &[u8; 16] = b"YWJjZGVmZ2hpamts";
/// Generous: a loaded machine; a wait ends as soon as its packet arrives.
const WAIT: Duration = Duration::from_secs(15);

struct Server {
    addr: SocketAddr,
    ctl: SocketAddr,
    stop: StopHandle,
    join: Option<JoinHandle<io::Result<()>>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.stop();
        if let Some(j) = self.join.take() {
            let r = j.join().expect("server thread panicked");
            if !std::thread::panicking() {
                r.expect("server failed");
            }
        }
    }
}

fn config() -> FakeCloudConfig {
    let mut cfg = FakeCloudConfig::new(vec![DeviceCred {
        did: DID,
        key: *KEY,
    }]);
    cfg.port = 0;
    cfg.ctl_port = 0;
    cfg.interval = 77;
    cfg
}

fn start(cfg: FakeCloudConfig) -> Server {
    let server = FakeCloud::bind(cfg).expect("bind");
    let addr = server.local_addr();
    let ctl = server.ctl_addr();
    let stop = server.stop_handle();
    let join = std::thread::spawn(move || server.run());
    Server {
        addr,
        ctl,
        stop,
        join: Some(join),
    }
}

fn now_secs() -> u32 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as u32
}

/// A raw device link to the fake cloud.
enum Dev {
    Udp(UdpSocket),
    Tcp(TcpStream, Vec<u8>),
}

impl Dev {
    fn udp(server: SocketAddr) -> Dev {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.connect(server).unwrap();
        Dev::Udp(s)
    }

    fn tcp(server: SocketAddr) -> Dev {
        let s = TcpStream::connect(server).unwrap();
        s.set_nodelay(true).unwrap();
        Dev::Tcp(s, Vec::new())
    }

    fn send(&mut self, bytes: &[u8]) {
        match self {
            Dev::Udp(s) => {
                s.send(bytes).unwrap();
            }
            Dev::Tcp(s, _) => s.write_all(bytes).unwrap(),
        }
    }

    /// The next packet, or None at the deadline (or on EOF for TCP).
    fn recv(&mut self) -> Option<Vec<u8>> {
        let deadline = Instant::now() + WAIT;
        match self {
            Dev::Udp(s) => {
                let mut buf = vec![0u8; 65536];
                loop {
                    let left = deadline.checked_duration_since(Instant::now())?;
                    s.set_read_timeout(Some(left.max(Duration::from_millis(1))))
                        .unwrap();
                    match s.recv(&mut buf) {
                        Ok(n) => return Some(buf[..n].to_vec()),
                        Err(e) if is_timeout(&e) => {}
                        Err(e) => panic!("udp recv: {e}"),
                    }
                }
            }
            Dev::Tcp(s, buf) => loop {
                if let Ok(Some(n)) = miio::stream_frame_len(buf) {
                    if buf.len() >= n {
                        return Some(buf.drain(..n).collect());
                    }
                }
                let left = deadline.checked_duration_since(Instant::now())?;
                s.set_read_timeout(Some(left.max(Duration::from_millis(1))))
                    .unwrap();
                let mut chunk = [0u8; 4096];
                match s.read(&mut chunk) {
                    Ok(0) => return None,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    Err(e) if is_timeout(&e) => {}
                    Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return None,
                    Err(e) => panic!("tcp read: {e}"),
                }
            },
        }
    }

    /// True once the server has closed the TCP stream (within the deadline).
    fn closed(&mut self) -> bool {
        let Dev::Tcp(s, _) = self else {
            panic!("not tcp")
        };
        let deadline = Instant::now() + WAIT;
        let mut chunk = [0u8; 4096];
        loop {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return false;
            };
            s.set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .unwrap();
            match s.read(&mut chunk) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e) if is_timeout(&e) => {}
                Err(_) => return true,
            }
        }
    }

    fn transport(&self) -> &'static str {
        match self {
            Dev::Udp(_) => "udp",
            Dev::Tcp(..) => "tcp",
        }
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

/// A control-socket client.
struct Ctl {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Ctl {
    fn connect(addr: SocketAddr) -> Ctl {
        Ctl {
            s: TcpStream::connect(addr).unwrap(),
            buf: Vec::new(),
        }
    }

    fn send(&mut self, cmd: &Value) {
        self.s.write_all(format!("{cmd}\n").as_bytes()).unwrap();
    }

    fn send_raw(&mut self, line: &str) {
        self.s.write_all(line.as_bytes()).unwrap();
    }

    /// The next line that satisfies `want`, skipping others; panics at the deadline.
    fn expect(&mut self, what: &str, want: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            while let Some(nl) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=nl).collect();
                let v: Value = serde_json::from_slice(&line).expect("control line is JSON");
                if want(&v) {
                    return v;
                }
            }
            let left = deadline
                .checked_duration_since(Instant::now())
                .unwrap_or_else(|| panic!("control: no {what} within {WAIT:?}"));
            self.s
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .unwrap();
            let mut chunk = [0u8; 4096];
            match self.s.read(&mut chunk) {
                Ok(0) => panic!("control connection closed while waiting for {what}"),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if is_timeout(&e) => {}
                Err(e) => panic!("control read: {e}"),
            }
        }
    }

    /// Sends a command and returns its `ok` line (panics on `error`).
    fn cmd(&mut self, cmd: Value) -> Value {
        self.send(&cmd);
        let v = self.expect("ok/error", |v| v["ev"] == "ok" || v["ev"] == "error");
        assert_eq!(v["ev"], "ok", "command {cmd} failed: {v}");
        v
    }

    fn watch(addr: SocketAddr) -> Ctl {
        let mut c = Ctl::connect(addr);
        c.cmd(json!({"cmd":"watch"}));
        c
    }
}

fn keys() -> Keys {
    Keys::new(KEY)
}

fn seal(did: u32, keys: &Keys, stamp: u32, v: &Value) -> Vec<u8> {
    miio::seal(keys, did, stamp, v.to_string().as_bytes())
}

fn open(did: u32, keys: &Keys, bytes: &[u8]) -> Value {
    let pkt = Packet::new_checked(bytes).expect("valid packet");
    let o = miio::open(keys, did, &pkt).expect("opens under the key");
    assert!(o.text.len() < bytes.len());
    Value::Object(o.value)
}

/// Hello → time sync; returns the server time.
fn time_sync(dev: &mut Dev) -> u32 {
    dev.send(&miio::cloud_hello());
    let r = dev.recv().expect("time-sync reply");
    let p = Packet::new_checked(&r[..]).expect("valid packet");
    assert_eq!(r.len(), 32);
    assert!(p.ids_all_ff(), "bytes 4..12 all ff");
    let now = now_secs();
    assert!(
        p.stamp().abs_diff(now) <= 5,
        "stamp {} now {now}",
        p.stamp()
    );
    p.stamp()
}

/// A keepalive with `stamp`, and its pong: identical bytes.
fn ping(dev: &mut Dev, stamp: u32) {
    let ka = miio::keepalive(&keys(), DID, stamp);
    dev.send(&ka);
    assert_eq!(
        dev.recv().expect("pong"),
        ka.to_vec(),
        "pong echoes the keepalive"
    );
}

/// The whole session of P§5 from the device side, then a pushed command through the control socket.
fn session(server: &Server, mut dev: Dev) {
    let k = keys();
    let mut stamp = time_sync(&mut dev);

    // _otc.info → otc_list (this server by default) and otc_test.interval.
    stamp += 1;
    let info = json!({"id":1,"method":"_otc.info","params":{"hw_ver":"Linux","token":"00"}});
    dev.send(&seal(DID, &k, stamp, &info));
    let r = open(DID, &k, &dev.recv().expect("_otc.info reply"));
    assert_eq!(r["id"], 1);
    assert_eq!(r["result"]["otc_list"][0]["ip"], "127.0.0.1");
    assert_eq!(r["result"]["otc_list"][0]["port"], server.addr.port());
    assert_eq!(r["result"]["otc_test"]["interval"], 77);
    assert_eq!(r["result"]["otc_test"]["list"], json!([]));

    stamp += 1;
    ping(&mut dev, stamp);

    // An upstream request is acked.
    stamp += 1;
    let props = json!({"id":2,"method":"props","params":{"ota_state":"idle"}});
    dev.send(&seal(DID, &k, stamp, &props));
    let r = open(DID, &k, &dev.recv().expect("ack"));
    assert_eq!(r, json!({"id":2,"result":"ok"}));

    // A message without id is not acked: the next packet is the pong of the keepalive after it.
    dev.send(&seal(
        DID,
        &k,
        stamp,
        &json!({"method":"event.x","params":[]}),
    ));
    stamp += 1;
    ping(&mut dev, stamp);

    // Status shows the device and its transport.
    let mut ctl = Ctl::connect(server.ctl);
    ctl.send(&json!({"cmd":"status"}));
    let st = ctl.expect("status", |v| v["ev"] == "status");
    let d = &st["devices"][0];
    assert_eq!(d["did"], DID);
    assert_eq!(d["transport"], dev.transport());
    assert!(d["last_seen_ms"].is_u64());
    ctl.expect("ok", |v| v["ev"] == "ok");

    // A pushed command without id gets one; the device's reply reaches the control client.
    let ok =
        ctl.cmd(json!({"cmd":"send","did":DID,"json":{"method":"get_prop","params":["power"]}}));
    let id = ok["id"].as_u64().expect("assigned id");
    let cmd = open(DID, &k, &dev.recv().expect("pushed command"));
    assert_eq!(cmd["method"], "get_prop");
    assert_eq!(cmd["id"], id);
    stamp += 1;
    dev.send(&seal(DID, &k, stamp, &json!({"id":id,"result":["on"]})));
    let rep = ctl.expect("reply", |v| v["ev"] == "reply");
    assert_eq!(rep["did"], DID);
    assert_eq!(rep["json"], json!({"id":id,"result":["on"]}));

    // An id given by the pusher is kept.
    ctl.cmd(json!({"cmd":"send","json":{"id":4242,"method":"miIO.info","params":[]}}));
    let cmd = open(DID, &k, &dev.recv().expect("pushed command"));
    assert_eq!(cmd["id"], 4242);
    dev.send(&seal(
        DID,
        &k,
        stamp,
        &json!({"id":4242,"result":{"fw_ver":"1"}}),
    ));
    let rep = ctl.expect("reply", |v| v["ev"] == "reply");
    assert_eq!(rep["json"]["result"]["fw_ver"], "1");
}

#[test]
fn udp_session() {
    let server = start(config());
    session(&server, Dev::udp(server.addr));
}

#[test]
fn tcp_session() {
    let server = start(config());
    session(&server, Dev::tcp(server.addr));
}

#[test]
fn tcp_framing() {
    let server = start(config());
    let k = keys();
    let mut dev = Dev::tcp(server.addr);
    let stamp = time_sync(&mut dev);

    // Two packets in one write (V15), then one packet split over two writes.
    let mut two = seal(
        DID,
        &k,
        stamp,
        &json!({"id":7,"method":"props","params":{}}),
    );
    let ka = miio::keepalive(&k, DID, stamp + 1);
    two.extend_from_slice(&ka);
    dev.send(&two);
    assert_eq!(open(DID, &k, &dev.recv().unwrap())["id"], 7);
    assert_eq!(dev.recv().unwrap(), ka.to_vec());
    let pkt = seal(
        DID,
        &k,
        stamp + 2,
        &json!({"id":8,"method":"props","params":{}}),
    );
    let (a, b) = pkt.split_at(20);
    dev.send(a);
    dev.send(b);
    assert_eq!(open(DID, &k, &dev.recv().unwrap())["id"], 8);

    // A bad frame is dropped and the stream stays usable.
    let mut bad = seal(
        DID,
        &k,
        stamp + 3,
        &json!({"id":9,"method":"props","params":{}}),
    );
    let last = bad.len() - 1;
    bad[last] ^= 1;
    dev.send(&bad);
    ping(&mut dev, stamp + 4);

    // A length field below 32 closes the connection (P§5.2).
    dev.send(&[0x21, 0x31, 0x00, 0x10, 0, 0, 0, 0]);
    assert!(dev.closed(), "short length closes the stream");

    // close_tcp closes every device stream.
    let mut dev = Dev::tcp(server.addr);
    time_sync(&mut dev);
    Ctl::connect(server.ctl).cmd(json!({"cmd":"close_tcp"}));
    assert!(dev.closed(), "close_tcp closes the stream");
}

#[test]
fn bad_packets_are_dropped() {
    let server = start(config());
    let k = keys();
    let mut watch = Ctl::watch(server.ctl);
    let mut dev = Dev::udp(server.addr);
    let stamp = time_sync(&mut dev);
    watch.expect("hello event", |v| v["ev"] == "hello");

    let good = seal(
        DID,
        &k,
        stamp,
        &json!({"id":1,"method":"props","params":{}}),
    );
    let mut bad_md5 = good.clone();
    bad_md5[40] ^= 1;
    let mut bad_did = good.clone();
    bad_did[11] ^= 1;
    let mut bad_len = good.clone();
    bad_len[3] ^= 1;
    let other_key = seal(
        DID,
        &Keys::new(b"AAAAAAAAAAAAAAAA"),
        stamp,
        &json!({"id":1}),
    );
    let mut bad_ka = miio::keepalive(&k, DID, stamp).to_vec();
    bad_ka[31] ^= 1;
    let unknown_ka = miio::keepalive(&k, DID + 1, stamp).to_vec();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("bad md5", bad_md5),
        ("wrong did", bad_did),
        ("bad length field", bad_len),
        ("truncated", good[..40].to_vec()),
        ("short", vec![0x21, 0x31, 0, 0x1f]),
        (
            "garbage",
            b"hello, this is not a miio packet at all".to_vec(),
        ),
        ("other key", other_key),
        ("bad keepalive md5", bad_ka),
        ("keepalive of an unknown did", unknown_ka),
        ("lan hello", miio::lan_hello().to_vec()),
        ("time sync echoed", miio::time_sync_reply(stamp).to_vec()),
    ];
    for (what, bytes) in &cases {
        dev.send(bytes);
        let ev = watch.expect("drop event", |v| v["ev"] == "drop" || v["ev"] == "msg");
        assert_eq!(ev["ev"], "drop", "{what}: {ev}");
        assert!(ev["reason"].is_string(), "{what}");
    }
    // Nothing was answered, and the server still works: the next packet is this pong.
    ping(&mut dev, stamp + 1);
    dev.send(&good);
    assert_eq!(open(DID, &k, &dev.recv().unwrap())["result"], "ok");
}

#[test]
fn silent_and_drop_acks() {
    let server = start(config());
    let k = keys();
    let mut ctl = Ctl::connect(server.ctl);
    let mut watch = Ctl::watch(server.ctl);
    let mut dev = Dev::udp(server.addr);
    let stamp = time_sync(&mut dev);

    // Silent: the keepalive is seen (event) but not echoed; neither is a hello.
    ctl.cmd(json!({"cmd":"silent","on":true}));
    dev.send(&miio::keepalive(&k, DID, stamp + 1));
    watch.expect("keepalive event", |v| v["ev"] == "keepalive");
    dev.send(&miio::cloud_hello());
    watch.expect("hello event", |v| v["ev"] == "hello");
    ctl.cmd(json!({"cmd":"silent","on":false}));
    // The first packet after that is the pong of this keepalive, not an answer sent while silent.
    ping(&mut dev, stamp + 2);

    // drop_acks: upstream requests get nothing, pongs still flow.
    ctl.cmd(json!({"cmd":"drop_acks","on":true}));
    dev.send(&seal(
        DID,
        &k,
        stamp + 3,
        &json!({"id":5,"method":"props","params":{}}),
    ));
    ping(&mut dev, stamp + 4);
    ctl.cmd(json!({"cmd":"drop_acks","on":false}));
    dev.send(&seal(
        DID,
        &k,
        stamp + 5,
        &json!({"id":6,"method":"props","params":{}}),
    ));
    assert_eq!(open(DID, &k, &dev.recv().unwrap())["id"], 6);
}

#[test]
fn control_errors() {
    let server = start(config());
    let mut ctl = Ctl::connect(server.ctl);
    let err = |ctl: &mut Ctl, line: &str| {
        ctl.send_raw(line);
        let v = ctl.expect("answer", |v| v["ev"] == "ok" || v["ev"] == "error");
        assert_eq!(v["ev"], "error", "{line}");
        assert!(v["message"].is_string());
    };
    err(&mut ctl, "not json\n");
    err(&mut ctl, "[1,2]\n");
    err(&mut ctl, "{\"cmd\":\"nope\"}\n");
    err(&mut ctl, "{\"cmd\":\"silent\"}\n");
    err(&mut ctl, "{\"cmd\":\"send\",\"did\":9,\"json\":{}}\n");
    // Known did, but it has never connected.
    err(
        &mut ctl,
        &format!("{{\"cmd\":\"send\",\"did\":{DID},\"json\":{{}}}}\n"),
    );
    err(
        &mut ctl,
        &format!("{{\"cmd\":\"send\",\"did\":{DID},\"json\":5}}\n"),
    );
    // The connection survives all of that.
    ctl.cmd(json!({"cmd":"status"}));
}

/// P§5.11 from the cloud side: a bootstrap did asks, `retry_after` while the control socket says
/// so, then the assignment; the same mac asking again gets the same identity, another mac and a
/// did that is not a bootstrap one get an error; the new identity works at once.
#[test]
fn didkey_assign_and_retry() {
    let boot_key = *b"BOOTSTRAPKEY0001";
    let new_key = *b"Nk3w9Zq0aB7cD1eF";
    let mut cfg = config();
    cfg.devices.push(DeviceCred {
        did: 1,
        key: boot_key,
    });
    cfg.assign = Some(DeviceCred {
        did: 555,
        key: new_key,
    });
    cfg.didkey_retry = Some(120);
    let server = start(cfg);
    let mut ctl = Ctl::watch(server.ctl);
    let bk = Keys::new(&boot_key);
    let mut dev = Dev::udp(server.addr);
    let stamp = time_sync(&mut dev);
    let req = |id: u32, mac: &str| {
        json!({"id":id,"method":"_otc.didkey_req",
            "params":{"type":1,"model":"a.b.c","mac":mac,"vendor":"x","data":null}})
    };
    let ask = |dev: &mut Dev, did: u32, k: &Keys, r: Value| {
        dev.send(&seal(did, k, stamp, &r));
        open(did, k, &dev.recv().unwrap())
    };
    let r = ask(&mut dev, 1, &bk, req(3, "AA:BB:CC:DD:EE:FF"));
    assert_eq!(r, json!({"id":3,"result":{"retry_after":120}}));
    ctl.expect("didkey retry", |v| {
        v["ev"] == "didkey" && v["result"] == "retry" && v["mac"] == "AA:BB:CC:DD:EE:FF"
    });
    // The control socket switches to the assignment.
    ctl.cmd(json!({"cmd":"didkey","retry_after":null}));
    let assigned = json!({"did":555,"key":"Nk3w9Zq0aB7cD1eF"});
    let r = ask(&mut dev, 1, &bk, req(4, "aa:bb:cc:dd:ee:ff"));
    assert_eq!(r, json!({"id":4,"result":assigned}));
    ctl.expect("didkey assigned", |v| {
        v["ev"] == "didkey" && v["result"] == "assigned" && v["assigned"] == 555
    });
    // The same mac again: the same identity.
    let r = ask(&mut dev, 1, &bk, req(5, "AA:BB:CC:DD:EE:FF"));
    assert_eq!(r, json!({"id":5,"result":assigned}));
    // Another mac, a type that is not the header's did, no mac, a real did: errors.
    let r = ask(&mut dev, 1, &bk, req(6, "AA:BB:CC:DD:EE:00"));
    assert_eq!(r["error"]["code"], -10000, "{r}");
    let mut bad = req(7, "AA:BB:CC:DD:EE:FF");
    bad["params"]["type"] = json!(0);
    assert_eq!(ask(&mut dev, 1, &bk, bad)["error"]["code"], -32602);
    let mut bad = req(8, "AA:BB:CC:DD:EE:FF");
    bad["params"].as_object_mut().unwrap().remove("mac");
    assert_eq!(ask(&mut dev, 1, &bk, bad)["error"]["code"], -32602);
    let r = ask(&mut dev, DID, &keys(), req(9, "AA:BB:CC:DD:EE:FF"));
    assert_eq!(r["error"]["code"], -32600, "{r}");
    // The new identity works at once.
    let nk = Keys::new(&new_key);
    let ka = miio::keepalive(&nk, 555, stamp + 1);
    dev.send(&ka);
    assert_eq!(dev.recv().unwrap(), ka.to_vec());
    // And back to queueing; a bad value is refused.
    ctl.cmd(json!({"cmd":"didkey","retry_after":60}));
    let r = ask(&mut dev, 1, &bk, req(10, "AA:BB:CC:DD:EE:FF"));
    assert_eq!(r, json!({"id":10,"result":{"retry_after":60}}));
    ctl.send(&json!({"cmd":"didkey","retry_after":"x"}));
    ctl.expect("error", |v| v["ev"] == "error");
}

#[test]
fn send_client_prints_reply() {
    let server = start(config());
    let k = keys();
    let mut dev = Dev::udp(server.addr);
    let stamp = time_sync(&mut dev);
    ping(&mut dev, stamp + 1);
    let port = server.ctl.port().to_string();
    let args: Vec<String> = [
        "send",
        "--ctl-port",
        &port,
        r#"{"method":"get_prop","params":[]}"#,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let client = std::thread::spawn(move || fakecloud::main(&args));
    let cmd = open(DID, &k, &dev.recv().expect("pushed command"));
    dev.send(&seal(DID, &k, stamp, &json!({"id":cmd["id"],"result":[1]})));
    assert_eq!(client.join().unwrap(), 0);

    // An unknown did is an error, at once.
    let args: Vec<String> = ["send", "--ctl-port", &port, "--did", "9", "{}"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(fakecloud::main(&args), 1);
    // A usage error too.
    assert_eq!(fakecloud::main(&["--did".to_string()]), 1);
}

/// A props request with this id, and the id of the ack the device gets next.
fn props(dev: &mut Dev, stamp: u32, id: u64) {
    dev.send(&seal(
        DID,
        &keys(),
        stamp,
        &json!({"id":id,"method":"props","params":{}}),
    ));
}

fn next_id(dev: &mut Dev) -> Value {
    open(DID, &keys(), &dev.recv().expect("a packet"))["id"].clone()
}

/// The network faults of the control socket, seen from a raw device, on both transports.
fn faults_on(mut dev: Dev, server: &Server) {
    let mut ctl = Ctl::connect(server.ctl);
    let mut watch = Ctl::watch(server.ctl);
    let stamp = time_sync(&mut dev);
    let t = dev.transport();

    // drop: the first data packet in is lost, the next one is answered.
    ctl.cmd(json!({"cmd":"drop","dir":"in","kind":"data","n":1}));
    props(&mut dev, stamp, 1);
    props(&mut dev, stamp, 2);
    assert_eq!(next_id(&mut dev), 2);
    let ev = watch.expect("fault", |v| v["ev"] == "fault");
    assert_eq!(
        (&ev["fault"], &ev["dir"], &ev["transport"]),
        (&json!("drop"), &json!("in"), &json!(t))
    );

    // dup: one ack, sent twice.
    ctl.cmd(json!({"cmd":"dup","dir":"out","n":1}));
    props(&mut dev, stamp, 3);
    assert_eq!(next_id(&mut dev), 3);
    assert_eq!(next_id(&mut dev), 3);

    // reorder: the first ack is held until the second has gone; a control packet between them
    // does not release it (kind data).
    ctl.cmd(json!({"cmd":"reorder","dir":"out","kind":"data","n":1}));
    props(&mut dev, stamp, 4);
    ping(&mut dev, stamp + 1);
    props(&mut dev, stamp, 5);
    assert_eq!(next_id(&mut dev), 5);
    assert_eq!(next_id(&mut dev), 4);
    // Held with nothing after it: released at the end of the hold.
    ctl.cmd(json!({"cmd":"reorder","dir":"out","n":1,"ms":100}));
    props(&mut dev, stamp, 6);
    assert_eq!(next_id(&mut dev), 6);

    // delay: the ack comes no sooner than asked; status shows the rule until it is cleared.
    ctl.cmd(json!({"cmd":"delay","dir":"out","ms":300}));
    ctl.send(&json!({"cmd":"status"}));
    let st = ctl.expect("status", |v| v["ev"] == "status");
    assert_eq!(st["faults"][0]["fault"], "delay", "{st}");
    ctl.expect("ok", |v| v["ev"] == "ok");
    let t0 = Instant::now();
    props(&mut dev, stamp, 7);
    assert_eq!(next_id(&mut dev), 7);
    assert!(t0.elapsed() >= Duration::from_millis(300));
    ctl.cmd(json!({"cmd":"clear"}));
    props(&mut dev, stamp, 8);
    assert_eq!(next_id(&mut dev), 8);

    // A seeded rate drops some data packets and not all; a keepalive (not selected) after them
    // is answered after every ack.
    ctl.cmd(json!({"cmd":"drop","dir":"in","kind":"data","rate":0.5,"seed":3}));
    for k in 0..20 {
        props(&mut dev, stamp, 100 + k);
    }
    let ka = miio::keepalive(&keys(), DID, stamp + 2);
    dev.send(&ka);
    let mut acked = Vec::new();
    loop {
        let p = dev.recv().expect("a packet");
        if p == ka.to_vec() {
            break;
        }
        acked.push(open(DID, &keys(), &p)["id"].clone());
    }
    assert!((1..20).contains(&acked.len()), "{acked:?}");
    // `n` 0 turns the rule off.
    ctl.cmd(json!({"cmd":"drop","n":0}));
    props(&mut dev, stamp, 200);
    assert_eq!(next_id(&mut dev), 200);
}

#[test]
fn faults_udp() {
    let server = start(config());
    faults_on(Dev::udp(server.addr), &server);
}

#[test]
fn faults_tcp() {
    let server = start(config());
    faults_on(Dev::tcp(server.addr), &server);
}

#[test]
fn reset_tcp_mid_packet() {
    let server = start(config());
    let mut ctl = Ctl::connect(server.ctl);
    // Out: 10 bytes of the ack, then a reset.
    let mut dev = Dev::tcp(server.addr);
    let stamp = time_sync(&mut dev);
    ctl.cmd(json!({"cmd":"reset_tcp","after":10}));
    props(&mut dev, stamp, 1);
    assert!(dev.recv().is_none(), "no whole packet");
    let Dev::Tcp(_, buf) = &dev else {
        unreachable!()
    };
    assert_eq!(buf.len(), 10, "exactly the bytes before the cut");
    // In: the next packet from the device resets the connection unread.
    let mut dev = Dev::tcp(server.addr);
    let stamp = time_sync(&mut dev);
    ctl.cmd(json!({"cmd":"reset_tcp","dir":"in","kind":"data"}));
    ping(&mut dev, stamp + 1);
    props(&mut dev, stamp, 2);
    assert!(dev.closed());
    // Refused: a bad direction or kind.
    for bad in [
        json!({"cmd":"reset_tcp","dir":"both"}),
        json!({"cmd":"reset_tcp","kind":"x"}),
        json!({"cmd":"reset_tcp","after":-1}),
        json!({"cmd":"delay"}),
        json!({"cmd":"drop","rate":2}),
    ] {
        ctl.send(&bad);
        let v = ctl.expect("answer", |v| v["ev"] == "ok" || v["ev"] == "error");
        assert_eq!(v["ev"], "error", "{bad}");
    }
}
