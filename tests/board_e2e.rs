//! One end-to-end run of a board binary (ARCHITECTURE.md §6): the daemon against the host's
//! `miio_fakecloud` until `cloud_connected`, a command pushed from the cloud answered by a local client,
//! and `miIO.info` asked over the LAN by python-miio (PROTOCOL.md §4, §5).
//!
//! `MIIO_BOARD_BIN` names the binary (a `make static` result) and `MIIO_BOARD_RUNNER` what runs it
//! (`qemu-mipsel-static`, `qemu-s390x-static`; empty or unset: run it directly). .ci/run sets both
//! for every board whose CPU differs from the host's. Unset, the test runs the host build the same
//! way, so `make test` covers the test itself.
//!
//! Every peer is a host program, so on a big-endian board (s390x) each field the daemon writes or
//! reads crosses a byte-order boundary: the miio header (fake cloud, python-miio), the local API
//! port, and the `netif` member of INFO, whose address, netmask and gateway the daemon reads from
//! the kernel (qemu-user hands a big-endian guest `/proc/net/route` in its own byte order, as that
//! board's kernel would). Each must come out as the host sees it.

mod common;
use common::*;
use serde_json::Value;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Generous: the daemon runs under an emulator on a loaded machine.
const T: Duration = Duration::from_secs(60);

/// The daemon's command: `[runner] board-binary`, or the host build.
fn board_cmd() -> Vec<String> {
    let bin = std::env::var("MIIO_BOARD_BIN").unwrap_or_default();
    if bin.is_empty() {
        eprintln!("NOTE MIIO_BOARD_BIN unset: the host build plays the board");
        return vec![BIN.into()];
    }
    let bin = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(bin);
    assert!(
        bin.is_file(),
        "MIIO_BOARD_BIN: no file at {}",
        bin.display()
    );
    let runner = std::env::var("MIIO_BOARD_RUNNER").unwrap_or_default();
    let mut cmd: Vec<String> = runner.split_whitespace().map(String::from).collect();
    cmd.push(bin.display().to_string());
    eprintln!("NOTE board binary: {}", cmd.join(" "));
    cmd
}

/// The default gateway as the host reads its own /proc/net/route (the test runs natively), or ""
/// when there is none: what INFO's `netif.gw` must say.
fn host_gateway() -> String {
    let route = std::fs::read_to_string("/proc/net/route").unwrap_or_default();
    route
        .lines()
        .skip(1)
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() < 8 || f[1] != "00000000" || f[7] != "00000000" {
                return None;
            }
            let g = u32::from_str_radix(f[2], 16).ok()?;
            (g != 0).then(|| Ipv4Addr::from(g.to_ne_bytes()).to_string())
        })
        .unwrap_or_default()
}

#[test]
fn board_binary_end_to_end() {
    if !python_has("miio") {
        skip("python-miio");
        return;
    }
    let cmd = board_cmd();
    let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
    let cloud = fakecloud();
    // python-miio says hello to port 54321 only: take it, one test at a time (ARCHITECTURE.md §5).
    let _lock = PortLock::take(54321);
    let dir = provisioned_dir("board");
    let a = cloud_args(&dir, cloud.port)
        .set("--lan-port", 54321)
        .link("udp")
        .build();
    let d = Daemon::start_cmd(&cmd, &dir, &a);
    let mut c = LocalClient::connect(d.local());
    c.send(r#"{"id":1,"method":"local.query_status"}"#);
    c.recv_until(T, |v| v["params"] == "cloud_connected")
        .unwrap_or_else(|| panic!("no cloud_connected; log:\n{}", d.log_text()));

    // A command pushed from the fake cloud reaches the local client; its answer goes back up.
    let mut send = Command::new(BIN);
    send.args([
        "miio_fakecloud",
        "send",
        "--ctl-port",
        &cloud.ctl.to_string(),
        "--did",
        &DID.to_string(),
        r#"{"id":4242,"method":"get_prop","params":["power","temp"]}"#,
    ])
    .stdout(Stdio::piped());
    let child = send.spawn().unwrap();
    let got = c
        .recv_until(T, |v| v["method"] == "get_prop")
        .unwrap_or_else(|| panic!("get_prop not forwarded; log:\n{}", d.log_text()));
    assert_eq!(got["id"], 4242, "{got}");
    assert_eq!(got["params"], serde_json::json!(["power", "temp"]), "{got}");
    c.send(r#"{"id":4242,"result":["on",23.5]}"#);
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains(r#""result":["on",23.5]"#),
        "{text}"
    );

    // The phone: miIO.info over the LAN, sealed with the device token.
    let script = r#"
import json, miio
d = miio.Device("127.0.0.1", "4142434445464748494a4b4c4d4e4f50", timeout=5)
print(json.dumps({"info": d.info().raw}), flush=True)
"#;
    let mut p = Command::new(python());
    p.args(["-c", script]);
    let py = Lines::spawn(p);
    let info = py
        .wait(T, |v| v.get("info").is_some())
        .unwrap_or_else(|| panic!("no miIO.info: {:?}\nlog:\n{}", py.all(), d.log_text()));
    let info = &info["info"];
    assert_eq!(info["model"], "acme.dev.v1", "{info}");
    assert_eq!(info["token"], "4142434445464748494a4b4c4d4e4f50", "{info}");
    assert!(info["life"].as_u64().is_some(), "{info}");
    // The cloud socket's side of 127.0.0.1, the netmask of lo, the gateway of this machine.
    let netif: &Value = &info["netif"];
    assert_eq!(netif["localIp"], "127.0.0.1", "{info}");
    assert_eq!(netif["mask"], "255.0.0.0", "{info}");
    assert_eq!(netif["gw"], host_gateway().as_str(), "{info}");
}
