"""Self-test of ocloud.py: the codec against the PROTOCOL.md §7 vectors, then the real server process driven
by a minimal device client over UDP and TCP. Run: python3 -m unittest discover -s tests/pycloud -v

Every wait has a deadline (socket timeouts, queue timeouts); there are no bare sleeps."""

import json
import os
import queue
import socket
import struct
import subprocess
import sys
import threading
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import ocloud  # noqa: E402

OCLOUD = os.path.join(HERE, "ocloud.py")
DEADLINE = 5.0

KEY = b"YWJjZGVmZ2hpamts"
TOKEN = b"ABCDEFGHIJKLMNOP"
DID = 1234567

V1 = bytes.fromhex(
    "21310180000000000012d6875a9b239d9878d8dc74a92a8abd6202af14e4956030246b33f80ee16f9dbe47f9ab220d8e5a7ce560bffb"
    "f89feb76a1a449afa001120c514cc1669fc888ce16e5d238a25c7a12a95213ee95365139e8fd174af22715d89ec6014d7778e794fcb3"
    "388ec9b1ed6e3c223a6a7072c38dbc00fc9d7f5f15e3e9b0f84f987bc6ed18ec6bc5287120a1ebd34e13dba232e8446d4a6be30aa489"
    "2f67e22fb6d8c961492828aec4dad8cba3b6ea1c721c908cb701865d1b5a5d1d32abd6390a87dd5149b4dd9874f664bfd145dd0cc75d"
    "52d70fb4c879b1e99519940c2de56c2775411f60925e6aaac4c342223f5f61e76f53dfdffc4626a9125f97f4bdbbb7dd692884a15a6e"
    "7a6a7cb0cbe00eb04463fb6b94dc38a92db7d75e56583ad65dcf08d784c6d3f021b9d6bc01a13f863408971c61b9735c573224e5a0c5"
    "80588bdf5f6feb7b3da622a26668da544d03e02e872be05ad1d2538f6e5426b446db370b9c158644bc85cb50aaad0d0cd775c3a38ce5"
    "0ad5ff1d9b41"
)
V1_TEXT = (
    '{"partner_id":"","params":{"hw_ver":"Linux","fw_ver":"3.3.9_003094","ap":{"ssid":"WIFI","bssid":"00:11:22:33:'
    '44:55","rssi":-46},"netif":{"localIp":"10.0.0.122","mask":"255.255.255.0","gw":"10.0.0.254"},"model":"rockrobo'
    '.vacuum.v1","mac":"11:11:11:22:22:ED","token":"784ba0e9bc3542ce69fe744012564c08","life":12345},"id":1234567,'
    '"method":"_otc.info"}'
)
V2 = bytes.fromhex("21310030000000000123456700000000dbcfd26369cf65a172b5737cc131f6de754865dce4359d961e1bfee48e12817e")
V3_TOKEN = bytes.fromhex("00112233445566778899aabbccddeeff")
V3_TEXT = '{"id":1,"method":"miIO.info","params":[]}'
V3_NO_NUL = bytes.fromhex(
    "2131005000000000123456785f5e10008a6c774840894b738969011269660fa4a5516ec6151955dc2bb2d43e7c84c18352a39a7f22fd29"
    "03d282a5783c6d56ac8c9c7629130a25fac17d38175c1a7799"
)
V3_NUL = bytes.fromhex(
    "2131005000000000123456785f5e1000b667666f08ace608545fc4caff78fe4ba5516ec6151955dc2bb2d43e7c84c18352a39a7f22fd29"
    "03d282a5783c6d56acd8b5de0116c0ebf35983dd023f849c97"
)
V7 = bytes.fromhex("21310020ffffffffffffffff0000000000000000000000000000000000000000")
V8 = bytes.fromhex("21310020ffffffffffffffff5a9b239dffffffffffffffffffffffffffffffff")
V9 = bytes.fromhex("21310020000000000012d6875a9b239dd556a5166d6c407ddf3046d36df36608")
V10 = bytes.fromhex(
    "21310060000000000012d6875a9b239e88e551a4a985f4995011af4a120a78e759f087e096a6fca401e85ec4e3ba2d4f3f1c40cc4995c1"
    "423bd6745c412c59796d29f523bf15fba3e8da8e0bb383553a873d6ba2573aac6afa6c42f682f54bf3"
)
V11 = bytes.fromhex(
    "21310040000000000012d6875a9b239f0149c1304fba7343f8e430ae16cdf2bbb25de3ee95c3a3e5fcb7f6e3c054ebc0f635d84d5164fdad"
    "90ff7de94e62b9aa"
)
V12 = bytes.fromhex(
    "21310060000000000012d6875a9b23a026e3fd6419fdfce1305f76990f67481cc6f4ab6a152c05839b1d041d93659271e8865b7c78bb5a"
    "97f72088246b796d79d9efa9253dcb29863821b9855ce110f0b35ebb5082ae9f7d19c854e0cabd4c10"
)
V13 = bytes.fromhex(
    "21310040000000000012d6875a9b23a0d123ed7c2451cb120917e23498a3e8fa56636837b2e750e921ffd6dd982c109d9e2d814c5c05b48c"
    "48b788843cb55071"
)
V14 = bytes.fromhex(
    "21310050000000000012d6875a9b23a12bf71dbb26fb33897212ffb2a038240f8fb17ec3798e9485f04573019ca85a47a2cc66e5a4e95756"
    "91940ef7eecf444fa4add7395efb29f722fbdd4860f043f6"
)


def nul(text):
    return text.encode() + b"\x00"


class CodecVectors(unittest.TestCase):
    def test_key_iv_table(self):
        table = [
            (bytes(16), "4ae71336e44bf9bf79d2752e234818a5", "1e38275872be38346a6f072771a7f58b"),
            (V3_TOKEN, "6e8311168ee16d6aa1aa48c64145003c", "6f434fa9acd75da73e5fb999f641cda2"),
            (KEY, "d5385b48033e3a37d1eaebc2f7541a04", "b5dedfcb9dc8a251f157defa2d9706f4"),
            (TOKEN, "19fc8eff82037f1fc0d8ea1d32b5e339", "d8fd9459b02eaca5c995ca433cf6a3e8"),
        ]
        for secret, k, iv in table:
            self.assertEqual(ocloud.key_iv(secret), (bytes.fromhex(k), bytes.fromhex(iv)), secret)

    def sealed(self, vector, secret, plain):
        """The vector is exactly our sealing of plain, and opens back to it."""
        _, unknown, did, stamp, _ = ocloud.check_frame(vector)
        self.assertEqual(unknown, 0)
        self.assertEqual(ocloud.seal(did, stamp, secret, plain).hex(), vector.hex())
        self.assertEqual(ocloud.open_data(vector, secret), plain)

    def test_v1_rocklet_otc_info(self):
        self.sealed(V1, KEY, V1_TEXT.encode())
        obj, text, has_nul, after = ocloud.decode_text(ocloud.open_data(V1, KEY))
        self.assertEqual((obj["method"], obj["id"], text, has_nul, after), ("_otc.info", 1234567, V1_TEXT, False, 0))
        self.assertEqual(len(V1), 0x180)

    def test_v2_python_miio(self):
        self.sealed(V2, bytes(16), b'{"id": 123456}')

    def test_v3_nul_changes_only_last_block(self):
        self.sealed(V3_NO_NUL, V3_TOKEN, V3_TEXT.encode())
        self.sealed(V3_NUL, V3_TOKEN, nul(V3_TEXT))
        self.assertEqual(V3_NO_NUL[32:-16], V3_NUL[32:-16])
        for v, has_nul in ((V3_NO_NUL, False), (V3_NUL, True)):
            obj, text, got_nul, after = ocloud.decode_text(ocloud.open_data(v, V3_TOKEN))
            self.assertEqual((obj["method"], text, got_nul, after), ("miIO.info", V3_TEXT, has_nul, 0))

    def test_v7_v8_v9_control_packets(self):
        self.assertEqual(ocloud.CLOUD_HELLO, V7)
        self.assertEqual(ocloud.time_sync_reply(0x5A9B239D), V8)
        self.assertEqual(ocloud.keepalive(DID, 0x5A9B239D, KEY), V9)

    def test_v10_v11_lan(self):
        self.sealed(V10, TOKEN, nul('{"id": 12, "method": "miIO.info", "params": []}'))
        self.sealed(V11, TOKEN, nul('{"id":12,"result":["on"]}'))
        self.assertEqual(ocloud.seal_text(DID, 0x5A9B239F, TOKEN, '{"id":12,"result":["on"]}'), V11)

    def test_v12_v13_v14_cloud(self):
        self.sealed(V12, KEY, nul('{"id":1001,"method":"props","params":{"ota_state":"idle"}}'))
        self.sealed(V13, KEY, nul('{"id":1001,"result":"ok"}'))
        text = '{"id":12345678,"result":["ok"]}'
        self.assertEqual(len(text), 31)
        self.sealed(V14, KEY, nul(text))
        self.assertEqual(len(V14), 32 + 48)  # 32 bytes of text+NUL, then a full block of 0x10
        self.assertEqual(ocloud.seal_text(DID, 0x5A9B23A1, KEY, text), V14)

    def test_v15_stream_framing(self):
        stream = V13 + V9
        self.assertEqual(len(stream), 96)
        self.assertEqual(ocloud.Framer().feed(stream), [V13, V9])
        for cut in range(len(stream) + 1):
            f = ocloud.Framer()
            self.assertEqual(f.feed(stream[:cut]) + f.feed(stream[cut:]), [V13, V9], cut)
        f = ocloud.Framer()
        self.assertEqual([p for b in stream for p in f.feed(bytes([b]))], [V13, V9])

    def assertDrop(self, reason, fn, *args):
        with self.assertRaises(ocloud.Drop) as cm:
            fn(*args)
        self.assertEqual(cm.exception.reason, reason)

    def test_negatives(self):
        flipped = bytearray(V12)
        flipped[40] ^= 1
        ocloud.check_frame(bytes(flipped))
        self.assertDrop("md5", ocloud.open_data, bytes(flipped), KEY)
        other_did = V12[:8] + bytes.fromhex("0012d688") + V12[12:]
        self.assertEqual(ocloud.check_frame(other_did)[2], 0x12D688)  # the did check is the server's (below)
        self.assertDrop("md5", ocloud.open_data, V12, TOKEN)
        self.assertDrop("length", ocloud.check_frame, V12[:2] + b"\x00\x61" + V12[4:])
        self.assertDrop("length", ocloud.check_frame, V12[:40])
        self.assertDrop("short", ocloud.check_frame, V12[:31])
        self.assertDrop("short", ocloud.check_frame, b"")
        self.assertDrop("magic", ocloud.check_frame, b"\x21\x32" + V12[2:])
        self.assertDrop("length", ocloud.check_frame, V12 + bytes(65507 - len(V12)))
        self.assertDrop("length", ocloud.Framer().feed, b"\x21\x31\x00\x1f")
        self.assertDrop("magic", ocloud.Framer().feed, b"\x00\x00\x00\x40")
        # A valid MD5 over a payload that is not block-aligned, and over one whose padding is wrong.
        self.assertDrop("align", ocloud.open_data, resign(ocloud.header(52, 0, DID, 1), bytes(20)), KEY)
        bad_pad = aes_raw(KEY, b"{}" + bytes(14))
        self.assertDrop("padding", ocloud.open_data, resign(ocloud.header(48, 0, DID, 1), bad_pad), KEY)

    def test_decode_text(self):
        self.assertEqual(ocloud.decode_text(b'{"a":"x\\/y"}\x00junk\xff'), ({"a": "x/y"}, '{"a":"x\\/y"}', True, 5))
        self.assertDrop("json", ocloud.decode_text, b'{"a":')
        self.assertDrop("json", ocloud.decode_text, b'{"a":NaN}')
        self.assertDrop("not_object", ocloud.decode_text, b"[1]\x00")
        self.assertDrop("utf8", ocloud.decode_text, b'{"a":"\xff"}')


def resign(head, payload, secret=KEY):
    """A packet whose MD5 is valid for whatever payload it carries."""
    return head + ocloud.md5(head + secret + payload) + payload


def aes_raw(secret, block_aligned):
    """AES-CBC of data that is used as-is, without padding (to build bad padding)."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    k, iv = ocloud.key_iv(secret)
    enc = Cipher(algorithms.AES(k), modes.CBC(iv)).encryptor()
    return enc.update(block_aligned) + enc.finalize()


# ---------------------------------------------------------------------------------------------------------
# The server as a process, and a minimal device
# ---------------------------------------------------------------------------------------------------------


class Server:
    def __init__(self, *extra):
        args = [sys.executable, OCLOUD, "--port", "0", "--did", str(DID), "--key", KEY.decode(), *extra]
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self.q = queue.Queue()
        self.seen = []
        threading.Thread(target=self._read, daemon=True).start()
        self.port = self.expect("listening")["port"]

    def _read(self):
        for line in self.proc.stdout:
            self.q.put(json.loads(line))
        self.q.put(None)

    def expect(self, ev, timeout=DEADLINE, **match):
        """The next event named ev whose fields equal match; earlier events are skipped (kept in seen)."""
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            try:
                e = self.q.get(timeout=max(left, 0))
            except queue.Empty:
                raise AssertionError("no %s %s within %ss; seen %s" % (ev, match, timeout, self.seen[-10:]))
            if e is None:
                raise AssertionError("server exited waiting for %s %s; seen %s" % (ev, match, self.seen[-10:]))
            self.seen.append(e)
            if e["ev"] == ev and all(e.get(k) == v for k, v in match.items()):
                return e

    def cmd(self, **c):
        self.proc.stdin.write(json.dumps(c) + "\n")
        self.proc.stdin.flush()
        end = time.monotonic() + DEADLINE
        while True:
            e = self.expect_any(end)
            if e["ev"] in ("ok", "error") and e.get("cmd") in (c.get("cmd"), None):
                return e

    def expect_any(self, end):
        try:
            e = self.q.get(timeout=max(end - time.monotonic(), 0))
        except queue.Empty:
            raise AssertionError("no command answer; seen %s" % self.seen[-10:])
        if e is None:
            raise AssertionError("server exited; seen %s" % self.seen[-10:])
        self.seen.append(e)
        return e

    def close(self):
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        if self.proc.poll() is None:
            try:
                self.proc.wait(DEADLINE)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()


class Device:
    def __init__(self, transport, port, did=DID, key=KEY):
        self.transport, self.did, self.key = transport, did, key
        if transport == "udp":
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.sock.connect(("127.0.0.1", port))
        else:
            self.sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
            self.framer = ocloud.Framer()
            self.ready = []
        self.sock.settimeout(DEADLINE)
        self.stamp = 1000

    def send(self, data):
        self.sock.sendall(data) if self.transport == "tcp" else self.sock.send(data)

    def recv(self):
        if self.transport == "udp":
            return self.sock.recv(65536)
        while not self.ready:
            data = self.sock.recv(65536)
            if not data:
                return b""
            self.ready += self.framer.feed(data)
        return self.ready.pop(0)

    def next_stamp(self):
        self.stamp += 1
        return self.stamp

    def packet(self, obj):
        return ocloud.seal_text(self.did, self.next_stamp(), self.key, json.dumps(obj, separators=(",", ":")))

    def request(self, obj):
        self.send(self.packet(obj))

    def keepalive(self, stamp=None):
        pkt = ocloud.keepalive(self.did, self.next_stamp() if stamp is None else stamp, self.key)
        self.send(pkt)
        return pkt

    def recv_json(self, test):
        """Receives a data packet for us, checks its header and D3, returns the decoded object."""
        pkt = self.recv()
        _, unknown, did, _, _ = ocloud.check_frame(pkt)
        test.assertEqual((unknown, did), (0, self.did))
        plain = ocloud.open_data(pkt, self.key)
        obj, text, has_nul, after = ocloud.decode_text(plain)
        test.assertEqual(plain, text.encode() + b"\x00")  # D3: exactly one NUL
        return obj

    def close(self):
        self.sock.close()


class LiveBase(unittest.TestCase):
    extra = ()

    def setUp(self):
        self.srv = Server(*self.extra)
        self.addCleanup(self.srv.close)

    def device(self, transport, **kw):
        d = Device(transport, self.srv.port, **kw)
        self.addCleanup(d.close)
        if transport == "tcp":
            self.srv.expect("tcp_open")
        return d


class Session(LiveBase):
    extra = ("--interval", "1234", "--otc-list", "10.0.0.1:8053,10.0.0.2:8053")

    def run_session(self, transport):
        srv, dev = self.srv, self.device(transport)
        # Hello -> time sync.
        dev.send(V7)
        reply = dev.recv()
        self.assertEqual(len(reply), 32)
        self.assertEqual(reply[:12], bytes.fromhex("21310020ffffffffffffffff"))
        self.assertEqual(reply[16:], b"\xff" * 16)
        self.assertLess(abs(struct.unpack(">I", reply[12:16])[0] - time.time()), 5)
        srv.expect("hello", transport=transport, did=None)

        # _otc.info -> otc_list and otc_test.
        dev.request({"id": 5, "method": "_otc.info", "params": {"model": "x.y.z"}})
        self.assertEqual(dev.recv_json(self), {"id": 5, "result": {
            "otc_list": [{"ip": "10.0.0.1", "port": 8053}, {"ip": "10.0.0.2", "port": 8053}],
            "otc_test": {"list": [], "interval": 1234, "firsttest": 600}}})
        e = srv.expect("msg", transport=transport, did=DID)
        self.assertEqual((e["json"]["method"], e["nul"], e["after_nul"], e["stamp"]), ("_otc.info", True, 0, dev.stamp))
        self.assertEqual(json.loads(e["raw"]), e["json"])

        # A notification is never acked: the next packet is the ack of the request after it.
        dev.request({"method": "event.fired", "params": []})
        dev.request({"id": 6, "method": "props", "params": {"ota_state": "idle"}})
        self.assertEqual(dev.recv_json(self), {"id": 6, "result": "ok"})

        # Keepalive -> the same bytes back; a stale stamp is dropped, the next fresh one answered.
        ka = dev.keepalive()
        self.assertEqual(dev.recv(), ka)
        srv.expect("keepalive", did=DID, stamp=dev.stamp)
        dev.keepalive(stamp=dev.stamp)
        srv.expect("drop", reason="stamp", did=DID)
        ka = dev.keepalive()
        self.assertEqual(dev.recv(), ka)

        # A pushed command reaches the device; its reply is reported once as pending.
        ok = srv.cmd(cmd="send", did=DID, json={"id": 77, "method": "get_prop", "params": ["power"]})
        self.assertEqual((ok["ev"], ok["id"], ok["transport"]), ("ok", 77, transport))
        self.assertEqual(dev.recv_json(self), {"id": 77, "method": "get_prop", "params": ["power"]})
        dev.request({"id": 77, "result": ["on"]})
        e = srv.expect("reply", did=DID)
        self.assertEqual((e["json"], e["pending"]), ({"id": 77, "result": ["on"]}, True))
        dev.request({"id": 77, "result": ["late"]})
        e = srv.expect("reply", did=DID)
        self.assertEqual((e["id"], e["pending"]), (77, False))

        # A cloud-initiated ping carries a valid MD5; its echo is reported and not echoed back.
        ok = srv.cmd(cmd="ping", did=DID)
        ping = dev.recv()
        self.assertEqual(len(ping), 32)
        self.assertEqual(ping[16:], ocloud.md5(ping[:16] + KEY))
        self.assertEqual(struct.unpack(">I", ping[12:16])[0], ok["stamp"])
        dev.send(ping)
        srv.expect("ping_echo", did=DID, stamp=ok["stamp"], dup=False)
        ka = dev.keepalive()
        self.assertEqual(dev.recv(), ka)

        # Raw bytes go out untouched.
        raw = ocloud.keepalive(DID, 42, KEY)
        srv.cmd(cmd="raw", did=DID, hex=raw.hex())
        self.assertEqual(dev.recv(), raw)

    def test_udp_session(self):
        self.run_session("udp")

    def test_tcp_session(self):
        self.run_session("tcp")


class Tcp(LiveBase):
    def test_packets_back_to_back_and_split(self):
        dev = self.device("tcp")
        ka_stamp = dev.stamp + 2
        chunk = dev.packet({"id": 1, "method": "props", "params": {}}) + V7 + ocloud.keepalive(DID, ka_stamp, KEY)
        dev.stamp = ka_stamp
        dev.send(chunk)
        self.assertEqual(dev.recv_json(self), {"id": 1, "result": "ok"})
        self.assertEqual(dev.recv()[4:12], b"\xff" * 8)
        self.assertEqual(dev.recv(), ocloud.keepalive(DID, ka_stamp, KEY))
        pkt = dev.packet({"id": 2, "method": "props", "params": {}})
        for b in pkt:
            dev.send(bytes([b]))
        self.assertEqual(dev.recv_json(self), {"id": 2, "result": "ok"})

    def test_short_length_closes(self):
        dev = self.device("tcp")
        dev.send(b"\x21\x31\x00\x1f")
        self.srv.expect("drop", reason="length", transport="tcp")
        self.srv.expect("tcp_close", reason="length")
        self.assertEqual(dev.recv(), b"")

    def test_close_tcp_command(self):
        dev = self.device("tcp")
        dev.keepalive()
        self.assertEqual(len(dev.recv()), 32)
        ok = self.srv.cmd(cmd="close_tcp")
        self.assertEqual(len(ok["closed"]), 1)
        # The close is reported before the command's ok line.
        self.assertIn({"ev": "tcp_close", "conn": ok["closed"][0], "reason": "close_tcp"}, self.srv.seen)
        self.assertEqual(dev.recv(), b"")
        err = self.srv.cmd(cmd="send", did=DID, json={"id": 1, "method": "x"})
        self.assertEqual(err["ev"], "error")


class Udp(LiveBase):
    extra = ("--did", "7", "--key", "0123456789abcdef")

    def test_negatives_are_dropped_and_server_lives(self):
        srv, dev = self.srv, self.device("udp")
        flipped = bytearray(V12)
        flipped[40] ^= 1
        cases = [
            (bytes(flipped), "md5"),
            (V12[:8] + bytes.fromhex("0012d688") + V12[12:], "did"),
            (V12[:2] + b"\x00\x61" + V12[4:], "length"),
            (V12[:40], "length"),
            (V12[:31], "short"),
            (b"\x21\x32" + V12[2:], "magic"),
            (V8, "hello_mismatch"),
            (bytes.fromhex("21310020") + b"\xff" * 28, "hello_mismatch"),
            (ocloud.keepalive(DID, 5, TOKEN), "md5"),
            (ocloud.keepalive(DID, 5, b"0123456789abcdef"), "md5"),
            (resign(ocloud.header(52, 0, DID, 1), bytes(20)), "align"),
            (resign(ocloud.header(48, 0, DID, 1), aes_raw(KEY, b"{}" + bytes(14))), "padding"),
            (ocloud.seal(DID, 1, KEY, b"not json\x00"), "json"),
            (ocloud.seal(DID, 1, KEY, b"[1,2]\x00"), "not_object"),
            (V12 + bytes(65507 - len(V12)), "length"),
        ]
        for pkt, reason in cases:
            dev.send(pkt)
            e = srv.expect("drop")
            self.assertEqual(e["reason"], reason, (pkt[:40].hex(), e))
        dev.send(V7)
        self.assertEqual(dev.recv()[4:12], b"\xff" * 8)

    def test_second_device_and_garbage_after_nul(self):
        dev = self.device("udp", did=7, key=b"0123456789abcdef")
        dev.send(ocloud.seal(7, 9, dev.key, b'{"id":3,"method":"m"}\x00xyz'))
        self.assertEqual(dev.recv_json(self), {"id": 3, "result": "ok"})
        e = self.srv.expect("msg", did=7)
        self.assertEqual((e["nul"], e["after_nul"]), (True, 3))

    def test_v12_gets_v13_shaped_ack(self):
        dev = self.device("udp")
        dev.send(V12)
        pkt = dev.recv()
        self.assertEqual(ocloud.check_frame(pkt)[:3], (len(V13), 0, DID))
        self.assertEqual(ocloud.open_data(pkt, KEY), nul('{"id":1001,"result":"ok"}'))
        if ocloud.check_frame(pkt)[3] == 0x5A9B23A0:
            self.assertEqual(pkt, V13)  # same stamp, same bytes

    def test_silent_and_drop_acks(self):
        srv, dev = self.srv, self.device("udp")
        self.assertEqual(srv.cmd(cmd="silent", on=True)["on"], True)
        dev.send(V7)
        srv.expect("unanswered", reason="silent", what="hello")
        dev.keepalive()
        srv.expect("unanswered", reason="silent", what="keepalive")
        dev.request({"id": 8, "method": "props"})
        srv.expect("unanswered", reason="silent", what="request", id=8)
        srv.cmd(cmd="silent", on=False)
        ka = dev.keepalive()
        self.assertEqual(dev.recv(), ka)  # nothing came for the silent ones

        srv.cmd(cmd="drop_acks", on=True, methods=["props"])
        dev.request({"id": 9, "method": "props"})
        srv.expect("unanswered", reason="drop_acks", id=9)
        dev.request({"id": 10, "method": "_otc.info", "params": {}})
        self.assertEqual(dev.recv_json(self)["id"], 10)
        srv.cmd(cmd="drop_acks", on=True)
        dev.request({"id": 11, "method": "_otc.info", "params": {}})
        srv.expect("unanswered", reason="drop_acks", id=11)
        srv.cmd(cmd="drop_acks", on=False)
        dev.request({"id": 12, "method": "props"})
        self.assertEqual(dev.recv_json(self), {"id": 12, "result": "ok"})

    def test_answer_and_ack_replies(self):
        srv, dev = self.srv, self.device("udp")
        err = {"code": -1, "message": "no"}
        srv.cmd(cmd="answer", method="_otc.info", json={"error": err})
        dev.request({"id": 4, "method": "_otc.info", "params": {}})
        self.assertEqual(dev.recv_json(self), {"id": 4, "error": err})
        srv.cmd(cmd="answer", method="_otc.info", json=None)
        srv.cmd(cmd="ack_replies", on=True)
        dev.request({"id": 30, "result": ["x"]})
        self.assertEqual(dev.recv_json(self), {"id": 30, "result": "ok"})

    def test_command_errors(self):
        srv = self.srv
        self.assertEqual(srv.cmd(cmd="send", did=99, json={"id": 1})["ev"], "error")
        self.assertIn("no known address", srv.cmd(cmd="send", did=DID, json={"id": 1})["error"])
        self.assertEqual(srv.cmd(cmd="nope")["ev"], "error")
        self.assertEqual(srv.cmd(cmd="silent", on="yes")["ev"], "error")
        srv.proc.stdin.write("not json\n")
        srv.proc.stdin.flush()
        self.assertEqual(srv.expect("error")["cmd"], None)
        self.assertEqual(srv.cmd(cmd="status")["port"], srv.port)


class Lifecycle(unittest.TestCase):
    def test_quit_command(self):
        srv = Server()
        try:
            srv.cmd(cmd="quit")
            self.assertEqual(srv.proc.wait(DEADLINE), 0)
        finally:
            srv.close()

    def test_eof_on_stdin_quits(self):
        srv = Server()
        try:
            srv.proc.stdin.close()
            srv.expect("quit", reason="eof")
            self.assertEqual(srv.proc.wait(DEADLINE), 0)
        finally:
            srv.close()


if __name__ == "__main__":
    unittest.main()
