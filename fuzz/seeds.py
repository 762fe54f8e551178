#!/usr/bin/env python3
"""Seed inputs for the fuzz targets (fuzz/README.md): `python3 fuzz/seeds.py DIR` writes DIR/<target>/*.

The codec seeds are the test vectors and the examples of the unit tests; the machine seeds are event
programs in the byte format of src/fuzzing.rs (`Input`: little-endian integers, `below(n)` reads one
byte for n <= 256 and nothing for n <= 1, a blob is a length byte then the bytes) that play a whole
session: connect, time sync, _otc.info, commands, replies, keepalives, provisioning. `make fuzz` adds
them to a campaign's inputs; the committed corpus under fuzz/corpus/ is what the campaigns kept.
"""

import os
import struct
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class P:
    """An input for one target, written the way src/fuzzing.rs `Input` reads it."""

    def __init__(self):
        self.b = bytearray()

    def u8(self, *vs):
        for v in vs:
            self.b.append(v & 0xFF)
        return self

    def u16(self, v):
        self.b += struct.pack("<H", v & 0xFFFF)
        return self

    def u32(self, v):
        self.b += struct.pack("<I", v & 0xFFFFFFFF)
        return self

    def u64(self, v):
        self.b += struct.pack("<Q", v & 0xFFFFFFFFFFFFFFFF)
        return self

    def raw(self, bs):
        self.b += bs if isinstance(bs, (bytes, bytearray)) else bs.encode()
        return self

    def blob(self, bs):
        bs = bs if isinstance(bs, (bytes, bytearray)) else bs.encode()
        assert len(bs) < 256
        return self.u8(len(bs)).raw(bs)


def vectors():
    out = {}
    with open(os.path.join(ROOT, "tests/vectors/miio.txt")) as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            name, hx = line.split()
            out[name] = bytes.fromhex(hx)
    return out


PLAINS = [
    '{"partner_id":"","params":{"hw_ver":"Linux","fw_ver":"3.3.9_003094"},"id":1234567,"method":"_otc.info"}',
    '{"id":1,"method":"miIO.info","params":[]}',
    '{"id": 12, "method": "miIO.info", "params": []}',
    '{"id":12,"result":["on"]}',
    '{"id":1001,"method":"props","params":{"ota_state":"idle"}}',
    '{"id":12345678,"result":["ok"]}',
    '{"id":1}\0\xff\xfe{junk',
    '{"tz":"Asia\\/Shanghai"}',
    '{"id":77,"method":"get_prop","params":[1e400,' + "1" * 60 + "]}",
    "[1,2]",
    "hello",
    '"s"\0',
    "\0{}",
]

STREAMS = [
    '{"id":0,"result":["ok"]}{"id":0,"result":["ok"]}',
    ' \t\r\n\0{"a":1}\n\0\0 [1, 2]\r\n{}\0',
    '{"a":"}]{[","b":"\\\\","c":"\\"}","d":"Asia\\/Shanghai"}',
    '"str" 123 true\0null\t-1.5e3 garbage{}',
    '1"x"',
    "true]",
    '{"a":[1}',
    "{},{}",
    '["\\"]"] "a\\"b" 1 ',
    '{"method":"x\\"y","p":[1,{}]}  {',
]

MESSAGES = [
    '{"id":5,"method":"x"}',
    '{"params":{"id":1,"a":[{"id":2}]},"s":"\\"id\\":3","id":4}',
    '{ "method" : "a" ,\n "id" :\t12 , "big": 123456789012345678901234567890, "f":1.50 }',
    '{"id":-3.5e2}',
    '{"id":{"a":"}"},"b":1}',
    '{"\\u0069d":1,"i\\"d":2}',
    '{"id":1,"id":2}',
    '{"\u00fc":"\u00e9","id":9}\n',
    '{"id":9}\0',
    '{"id":' + "9" * 40 + ',"method":"props","params":[1]}',
    '{"id":5,"method":"props","params":{"x":1e400,"y":-1E+999}}',
    '{"id":1,"params":' + "[" * 140 + "]" * 140 + ',"method":"m"}',
    '{"id":2,"method":"m","params":"\\ud800"}',
    '{"\\udc00":1,"id":3}',
    '{"a":1e400,}',
    "[1e400]",
    '{"id":3,"result":["ok"]}',
    '{"error":{"code":-1},"id":"x"}',
    '{"method":5,"id":1,"result":1}',
    "garbage",
]

CONFIGS = [
    (0, open(os.path.join(ROOT, "etc/miio/device.conf.example")).read()),
    (0, "did=1234567\r\nkey=YWJjZGVmZ2hpamts\r\nmac=aa:bb:cc:01:02:03\r\nvendor=acme\r\nmodel=acme.dev.v1"),
    (0, "# c\n did = 5 \nkey=0123456789abcdef\nmac=AA:BB:CC:DD:EE:FF\nmodel=m\ndid=7\n"),
    (1, 'ssid="demo-ssid"\npsk="demo-passwd"\nkey_mgmt=WPA\nuid=1\n'),
    (1, 'ssid="my \\"net\\""\npsk=""\nkey_mgmt="NONE"\nuid="42"\n'),
    (2, "DemoToken0123456"),
    (2, "000102030405060708090a0b0c0d0e0f\n"),
    (3, 'demo\nNAME="demo firmware"\nDEMO_VERSION=1.0.0_0001\n'),
    (3, "acme\nACME_VERSION='2.0'\nACME_VERSION=\"3.0\"\n"),
    (4, "de\n"),
    (4, "\n cn \n"),
]


def dns_query(qid, qs):
    m = struct.pack(">HHHHHH", qid, 0, len(qs), 0, 0, 0)
    for name, t, c in qs:
        for label in name.split("."):
            m += bytes([len(label)]) + label.encode()
        m += b"\0" + struct.pack(">HH", t, c)
    return m


SERVICE = "_miio._udp.local"
QUERIES = [
    dns_query(0x1234, [(SERVICE, 12, 1)]),
    dns_query(7, [(SERVICE, 12, 0x8001)]),
    dns_query(1, [(SERVICE, 255, 1), ("_services._dns-sd._udp.local", 12, 1)]),
    dns_query(1, [("xiaomi-dev-v1_miio11245._miio._udp.local", 33, 1)]),
    dns_query(1, [("xiaomi-dev-v1_miio11245.local", 1, 1)]),
    dns_query(1, [(SERVICE, 12, 1)])[:5] + b"\x02" + dns_query(1, [(SERVICE, 12, 1)])[6:] + b"\x01x\xc0\x12\x00\x0c\x00\x01",
    bytes([0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xC0, 12, 0, 1, 0, 1]),
]


def cloud_cfg(p, transports=2, udp=1, tcp=0, cc=0, ack=2, user=1, refresh=0, payload=1):
    # did, key, cc, transports, udp host, tcp host, keepalive 20 s, ack, user ack, backoff, refresh,
    # max payload, seed.
    return p.u8(0, 0, cc, transports, udp, tcp, 2, ack, user, 0, refresh, payload).u64(42)


# Event numbers of src/fuzzing.rs, per machine.
C_ADVANCE, C_START, C_STOP, C_RESOLVED, C_CONNECTED, C_FAILED, C_DOWN, C_SYNC, C_ACK, C_PONG = range(10)
C_PING, C_COMMAND, C_SEALED, C_RAW, C_UPSTREAM, C_REPLY, C_SELF, C_INFO, C_BIND, C_REBUILD = range(10, 20)


def secs(p, s):
    # advance stepwise by s seconds
    return p.u8(C_ADVANCE, 1, 2, s)


def cloud_seeds():
    out = {}
    # A UDP session to an IP literal: hello, time sync, _otc.info, the idle report, then traffic.
    p = cloud_cfg(P())
    p.u8(C_START, C_CONNECTED, 0)
    p.u8(C_SYNC, 0)
    p.u8(C_INFO, 0)
    p.u8(C_ACK, 0, 1, 0, 0, 0, 1)  # _otc.info: one otc_list entry, interval 1800
    p.u8(C_ACK, 1, 0, 1)  # the idle report
    p.u8(C_UPSTREAM, 0, 5, 5).u32(7).u8(1)
    p.u8(C_ACK, 2, 0, 1)
    p.u8(C_COMMAND, 0, 0, 0, 0, 1)  # get_prop, fresh id
    p.u8(C_REPLY, 0, 1, 5)
    p.u8(C_COMMAND, 0, 0, 0, 2, 1)  # the same id again: answered from the cache
    p.u8(C_COMMAND, 0, 2, 0, 0, 1)  # miIO.info: the daemon's own
    p.u8(C_SELF, 1, 1)
    p.u8(C_ADVANCE, 1, 2, 25)
    p.u8(C_PONG)
    p.u8(C_PING).u32(0x7FFFFFFF)
    p.u8(C_ADVANCE, 1, 2, 90)
    p.u8(C_STOP)
    out["udp-session"] = p.b
    # TCP with DNS: resolve two addresses, the stream cut in pieces.
    p = cloud_cfg(P(), transports=3, tcp=0, cc=1)
    p.u8(C_START, C_RESOLVED, 2, 1, 2, 0, 5)
    p.u8(C_CONNECTED, 0)
    p.u8(C_SYNC, 0, 2, 10)
    p.u8(C_INFO, 1)
    p.u8(C_ACK, 0, 1, 0, 1, 3)
    p.u8(C_ACK, 1, 0, 1, 3, 20, 20)
    p.u8(C_UPSTREAM, 1, 5, 5).u32(9).u8(1)
    p.u8(C_ADVANCE, 1, 2, 4)  # no ack within 3 s over TCP: -30011
    p.u8(C_DOWN)
    p.u8(C_ADVANCE, 1, 5)
    out["tcp-dns-session"] = p.b
    # Failures: DNS error, filtered answers, a refused connect, backoff, a rebuild.
    p = cloud_cfg(P(), transports=0, udp=0, tcp=0)
    p.u8(C_START, C_RESOLVED, 2, 0)
    p.u8(C_ADVANCE, 1, 5)
    p.u8(C_RESOLVED, 2, 1, 3, 2, 3, 4)
    p.u8(C_ADVANCE, 1, 5)
    p.u8(C_RESOLVED, 2, 1, 1, 1)
    p.u8(C_CONNECTED, 0)  # 10.x from DNS with a 10.x local address: the buggy-router rule
    p.u8(C_ADVANCE, 1, 5, C_RESOLVED, 2, 1, 1, 0, C_FAILED)
    p.u8(C_ADVANCE, 0, 7, 3)  # a three-day jump
    p.u8(C_REBUILD, C_START)
    out["failures"] = p.b
    return out


L_ADVANCE, L_IDENTITY, L_STATE, L_OFFSET, L_HELLO, L_CONTROL, L_COMMAND, L_REPLAY = range(8)
L_RAW, L_SEALED, L_LOCAL_REPLY, L_ANSWER, L_QUERY = range(8, 13)


def lan_seeds():
    out = {}
    p = P().u64(7).u8(2).u32(1_000_000).u8(1, 0, 0, 8)
    p.u8(L_OFFSET, 1)
    p.u8(L_HELLO, 0)
    p.u8(L_COMMAND, 0, 0, 0, 3, 1, 1, 0)  # get_prop with a fresh id, under the token
    p.u8(L_LOCAL_REPLY, 1, 5)
    p.u8(L_REPLAY, 1, 1)  # the same packet again: the cached reply
    p.u8(L_COMMAND, 0, 1, 0, 3, 1, 1, 1)  # miIO.info: the node answers
    p.u8(L_ANSWER, 1, 2)
    p.u8(L_COMMAND, 0, 0, 0, 3, 1, 1, 2)
    p.u8(L_LOCAL_REPLY, 1, 0)  # -10000 held
    p.u8(L_ADVANCE, 1, 2, 6)  # the held reply at the deadline
    p.u8(L_STATE, 5, L_HELLO, 1)  # AP mode: the hello carries the token
    p.u8(L_IDENTITY, 1, 1, L_REPLAY, 0, 1)
    p.u8(L_SEALED).blob('{"id":5,"method":"local.x"}').u8(1, 1, 2)
    p.u8(L_RAW).blob(vectors()["V10"][:40]).u8(0)
    out["phone-session"] = p.b
    p = P().u64(1).u8(0).u32(5).u8(1, 0, 0, 4)
    for i in range(70):
        p.u8(L_COMMAND, 0, 0, 0, 3, 1, 1, i % 3)
    p.u8(L_ADVANCE, 0, 2, 1)
    out["pending-full"] = p.b
    return out


def local_seeds():
    out = {}
    p = P().u8(0, 0).u32(1000)
    # event: slot, kind
    p.u8(0, 1, 1)  # accept 0 (Local)
    p.u8(1, 1, 1)  # accept 1: extra
    p.u8(2, 1, 1)  # accept 2: extra
    p.u8(3, 1, 1)  # accept 3: refused
    p.u8(4, 1, 0)  # accept 4: BLE
    p.u8(1, 3, 0)  # 1 says hello: helper
    p.u8(2, 3, 7)  # 2 sends garbage: closed
    p.u8(0, 6, 0, 0)  # status broadcast: held for 0
    p.u8(0, 6, 1)  # command broadcast
    p.u8(0, 3, 3)  # 0: props
    p.u8(4, 3, 2)  # BLE: local.query_status
    p.u8(4, 3, 3)  # BLE: props refused
    p.u8(0, 3, 8, 2)  # a bad id
    p.u8(0, 3, 6)  # not an object
    p.u8(0, 5).blob('{"id":1}{"a":')
    p.u8(0, 5).blob("1}  ]")
    p.u8(5, 1, 1, 5, 0, 1, 2, 5)  # accept, then advance 2 s
    p.u8(5, 7, 3, 5, 8, 0, 0, 9)  # send_to, close, syntax error
    out["table"] = p.b
    return out


N_ADVANCE, N_ACCEPT, N_EOF, N_MSG = 0, 1, 2, 3
N_RAW, N_FILES, N_HUP, N_RESOLVED, N_CONNECTED, N_FAILED, N_DOWN, N_SYNC, N_ACK = range(6, 15)
N_PONG, N_COMMAND, N_CLOUD_RAW, N_SERVE, N_HELLO, N_PHONE, N_REPLAY, N_PHONE_RAW = range(15, 23)
N_BACKLOG, N_SHUTDOWN = 23, 24


def node_msg(p, slot, variant, *rest):
    return p.u8(N_MSG, slot, 0, 0, variant, *rest)


def node_seeds():
    out = {}
    # File mode, provisioned: the cloud session, a client, a phone.
    p = cloud_cfg(P()).u8(2, 1, 1, 1, 0).u32(10_000).u8(0, 1, 0, 1)
    p.u8(N_ACCEPT, 1, 0)
    p.u8(N_ADVANCE, 1, 2, 3)  # the helper grace ends: the data files
    p.u8(N_SERVE)
    node_msg(p, 0, 14, 0)  # an upstream request
    p.u8(N_SERVE)
    p.u8(N_COMMAND, 0, 0, 0, 0)  # get_prop from the cloud, broadcast to 0
    node_msg(p, 0, 17, 2)  # 0 replies
    p.u8(N_HELLO, 0)
    p.u8(N_PHONE, 0, 0, 0, 3, 1, 0)  # the phone's get_prop
    node_msg(p, 0, 17, 1, 2)
    p.u8(N_PHONE, 0, 1, 0, 3, 1, 1)  # miIO.info from the phone
    node_msg(p, 0, 10, 3, 4)  # local.prep_suspend
    p.u8(N_ADVANCE, 1, 2, 25)
    p.u8(N_PONG, 1)
    p.u8(N_HUP, 1)
    p.u8(N_FILES, 0, 1, N_HUP, 0)  # another identity: a new session
    p.u8(N_SERVE)
    p.u8(N_SHUTDOWN)
    out["files-session"] = p.b
    # A helper answers the start-up steps; AP mode; provisioning over BLE; Wi-Fi up; the cloud.
    p = cloud_cfg(P()).u8(2, 1, 1, 1, 0).u32(10_000).u8(4, 0, 0)
    p.u8(N_ACCEPT, 1, 0)
    node_msg(p, 0, 1)  # helper_ready
    node_msg(p, 0, 0)  # hello: gets request_dinfo
    p.u8(N_ACCEPT, 1, 1)
    node_msg(p, 1, 2)  # response_dinfo
    p.u8(N_ACCEPT, 1, 2)
    node_msg(p, 2, 0)  # hello: gets request_dtoken
    p.u8(N_ACCEPT, 1, 3)
    node_msg(p, 3, 3, 0)  # response_dtoken
    node_msg(p, 3, 4, 0)  # not provisioned: AP mode
    p.u8(N_ACCEPT, 0, 4)  # BLE
    node_msg(p, 4, 11, 0, 1, 1)  # local.ble.config_router with a uid
    p.u8(N_ACCEPT, 1, 5)
    node_msg(p, 5, 0)  # hello: gets wifi_start
    node_msg(p, 3, 6)  # wifi_connected
    p.u8(N_SERVE)
    node_msg(p, 3, 5)  # _internal.info
    p.u8(N_SERVE, N_SERVE)
    p.u8(N_ADVANCE, 0, 4, 2)
    out["helper-provisioning"] = p.b
    # LAN provisioning in AP mode, a failed Wi-Fi, the file restored.
    p = cloud_cfg(P()).u8(2, 1, 1, 1, 0).u32(10_000).u8(0, 1, 0, 0)
    p.u8(N_ADVANCE, 1, 2, 3)
    p.u8(N_HELLO, 0)
    p.u8(N_PHONE, 0, 2, 6, 3, 1, 0)  # miIO.config_router
    p.u8(N_ACCEPT, 1, 0)
    node_msg(p, 0, 1)
    node_msg(p, 0, 7)  # wifi_ap_mode: failed
    p.u8(N_FILES, 4, N_PHONE, 0, 2, 6, 3, 1, 0)  # the data dir is read-only now
    out["lan-provisioning"] = p.b
    return out


def mqtt_seeds():
    """src/fuzzing.rs `mqtt`: a stream for the splitter, then a session played against a broker."""
    connack = bytes([0x20, 2, 0, 0])
    suback = bytes([0x90, 5, 0, 1, 1, 1, 0x80])
    pub1 = bytes([0x32, 0x11, 0, 11]) + b"miio/report" + bytes([0, 7]) + b"{}"
    stream = connack + suback + pub1 + bytes([0xD0, 0, 0x40, 2, 0, 1, 0xC0, 0, 0xE0, 0])
    connect = bytes([0x10, 0x17, 0, 4]) + b"MQTT" + bytes([4, 2, 0, 0, 0, 11]) + b"miio_client"
    out = {}

    def head(p, ka=0, stream=stream, cap=256):
        return p.u16(cap).u8(3).blob(stream).u8(0, ka, 0x00, 0x10, 4)

    def up(p):
        return p.u8(2, 1).u8(3, 0).u8(4, 3, 1, 1, 1)  # connected, CONNACK 0, SUBACK

    p = up(head(P()))
    p.u8(7, 0).blob('{"id":1,"method":"props"}')  # publish on miio/report_ack
    p.u8(5, 0)  # its PUBACK
    p.u8(6, 0).u16(9).u8(0).blob('{"id":2}')  # a message on miio/report
    p.u8(6, 0).u16(9).u8(1).blob('{"id":2}')  # the DUP of it
    p.u8(7, 2).blob('{"id":3}').u8(8, 3)  # publish, then the broker closes
    p.u8(0).u16(200).u8(2, 1).u8(3, 0)  # 1.6 s later: reconnect, CONNACK, the DUP publish
    p.u8(5, 0).u8(8, 0)  # PUBACK, stop
    out["session"] = p.b
    p = up(head(P(), ka=3, stream=connect, cap=64))
    p.u8(0).u16(4000).u8(8, 2).u8(0).u16(4000).u8(0).u16(4000)  # ping, PINGRESP, ping, timeout
    out["keepalive"] = p.b
    p = head(P(), stream=bytes([0x30, 0xFF, 0xFF, 0xFF, 0xFF]), cap=1000)
    for _ in range(8):  # refused and unreachable: the backoff
        p.u8(2, 0).u8(0).u16(8000)
    p.u8(2, 1).u8(3, 5).u8(0).u16(8000).u8(2, 1).u8(1).blob(bytes([0x62, 2, 0, 1]))
    out["backoff"] = p.b
    return out


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "fuzz/work/seeds")
    seeds = {}
    v = vectors()
    seeds["miio_packet"] = dict(v)
    seeds["miio_packet"]["V13+V9"] = v["V13"] + v["V9"]
    s = {}
    for i, plain in enumerate(PLAINS):
        for mode in (0, 1):
            key = 1 if i in (2, 3) else 0
            s[f"plain{i}-mode{mode}"] = (
                P().u8(key).u32(1234567).u32(0x5A9B239E).u8(mode).u16(40).u8(1).u16(33).raw(plain.encode("utf-8", "surrogateescape")).b
            )
    s["largest"] = P().u8(0).u32(1).u32(2).u8(255).u16(0).u8(1).u16(0).raw('{"id":1,"p":"').b
    seeds["miio_sealed"] = s
    seeds["json_stream"] = {f"s{i}": P().u8(0, i).raw(t).b for i, t in enumerate(STREAMS)}
    seeds["json_stream"]["small-max"] = P().u8(1, 5, 7).raw('{"id":1}{"id":2}').b
    seeds["rpc"] = {f"m{i}": P().u8(i % 6).raw(t).b for i, t in enumerate(MESSAGES)}
    seeds["config"] = {f"c{i}": P().u8(w, i).raw(t).b for i, (w, t) in enumerate(CONFIGS)}
    d = {}
    for i, q in enumerate(QUERIES):
        model = b"xiaomi.dev.v1"
        d[f"q{i}"] = P().u8(len(model)).raw(model).u32(11245).u32(0x9D01A8C0).u16(54321).u8(i % 2).raw(q).b
    seeds["dns"] = d
    seeds["cloud"] = cloud_seeds()
    seeds["lan"] = lan_seeds()
    seeds["local"] = local_seeds()
    seeds["node"] = node_seeds()
    seeds["mqtt"] = mqtt_seeds()
    for target, files in seeds.items():
        os.makedirs(os.path.join(out, target), exist_ok=True)
        for name, data in files.items():
            with open(os.path.join(out, target, name), "wb") as f:
                f.write(bytes(data))
    print(f"seeds written to {out}")


if __name__ == "__main__":
    main()
