#!/usr/bin/env python3
"""Independent OT-cloud peer for the end-to-end tests of miio_client.

Contract: this file is a second, separate implementation of the cloud side of the miio cloud link
(PROTOCOL.md §2, §5). It shares no code with the Rust crate, so the daemon and the Rust fake cloud cannot
agree on a mistake that this peer would not catch. Third-party code: only AES-128-CBC and MD5 from the
`cryptography` package.

It serves UDP and TCP on one port, writes one JSON event per line on stdout (flushed at once) and reads one
JSON command per line on stdin. EOF on stdin means quit. See README.md in this folder for the line formats.

One thread, one selector, no timers: the process only ever waits for sockets or stdin.
"""

import argparse
import json
import os
import selectors
import socket
import struct
import sys
import time

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

# ---------------------------------------------------------------------------------------------------------
# Codec (P§2). Pure functions, no I/O.
# ---------------------------------------------------------------------------------------------------------

MAGIC = b"\x21\x31"
HEADER_LEN = 32
MAX_PACKET = 0xFFFF  # the u16 length field (P§2.7)
FF8 = b"\xff" * 8
# P§2.6: the cloud hello, matched byte for byte.
CLOUD_HELLO = bytes.fromhex("21310020ffffffffffffffff00000000") + bytes(16)


class Drop(Exception):
    """A received packet fails validation; `reason` is a short stable word used in the drop event."""

    def __init__(self, reason, detail=""):
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


def md5(data):
    h = hashes.Hash(hashes.MD5())
    h.update(data)
    return h.finalize()


def key_iv(secret):
    """P§2.3: K = MD5(secret), IV = MD5(K ‖ secret)."""
    k = md5(secret)
    return k, md5(k + secret)


def encrypt(secret, plain):
    """AES-128-CBC with PKCS#7; block-aligned input gets a full block of 0x10 (P§2.3)."""
    k, iv = key_iv(secret)
    pad = 16 - len(plain) % 16
    enc = Cipher(algorithms.AES(k), modes.CBC(iv)).encryptor()
    return enc.update(plain + bytes([pad]) * pad) + enc.finalize()


def decrypt(secret, cipher):
    """Inverse of encrypt(); raises Drop("align") or Drop("padding")."""
    if not cipher or len(cipher) % 16:
        raise Drop("align", "payload length %d is not a positive multiple of 16" % len(cipher))
    k, iv = key_iv(secret)
    dec = Cipher(algorithms.AES(k), modes.CBC(iv)).decryptor()
    data = dec.update(cipher) + dec.finalize()
    pad = data[-1]
    if pad < 1 or pad > 16 or data[-pad:] != bytes([pad]) * pad:
        raise Drop("padding", "bad PKCS#7 padding")
    return data[:-pad]


def header(length, unknown, did, stamp):
    return MAGIC + struct.pack(">HIII", length, unknown, did, stamp)


def seal(did, stamp, secret, plain, unknown=0):
    """A data packet: header ‖ MD5(header[0..16] ‖ secret ‖ cipher) ‖ cipher (P§2.1, §2.2)."""
    cipher = encrypt(secret, plain)
    length = HEADER_LEN + len(cipher)
    if length > MAX_PACKET:
        raise ValueError("packet too long: %d" % length)
    head = header(length, unknown, did, stamp)
    return head + md5(head + secret + cipher) + cipher


def seal_text(did, stamp, secret, text):
    """D3: the JSON text followed by exactly one NUL, then sealed."""
    return seal(did, stamp, secret, text.encode("utf-8") + b"\x00")


def keepalive(did, stamp, secret):
    """P§2.6: a 32-byte packet, checksum MD5(first 16 bytes ‖ key)."""
    head = header(HEADER_LEN, 0, did, stamp)
    return head + md5(head + secret)


def time_sync_reply(server_time):
    """P§2.6: bytes 4..11 ff, the server time as stamp, checksum ff×16 (as Valetudo sends)."""
    return header(HEADER_LEN, 0xFFFFFFFF, 0xFFFFFFFF, server_time & 0xFFFFFFFF) + b"\xff" * 16


def check_frame(data):
    """P§2.7 steps 1-3. Returns (length, unknown, did, stamp, checksum)."""
    if len(data) < HEADER_LEN:
        raise Drop("short", "%d bytes, less than the 32-byte header" % len(data))
    if data[:2] != MAGIC:
        raise Drop("magic", "magic %s" % data[:2].hex())
    length, unknown, did, stamp = struct.unpack(">HIII", data[2:16])
    if length != len(data):
        raise Drop("length", "length field %d, packet %d bytes" % (length, len(data)))
    return length, unknown, did, stamp, data[16:32]


def open_data(data, secret):
    """P§2.7 step 5 after the did check: MD5, n % 16, decrypt, unpad. Returns the plaintext."""
    if md5(data[:16] + secret + data[32:]) != data[16:32]:
        raise Drop("md5", "checksum does not match")
    return decrypt(secret, data[32:])


def decode_text(plain):
    """P§2.4: text up to the first NUL, UTF-8, one JSON object.

    Returns (obj, text, nul, after_nul): nul tells whether a NUL ended the text, after_nul how many
    plaintext bytes followed that NUL (D3 wants nul and after_nul == 0 from our daemon)."""
    cut = plain.find(b"\x00")
    nul = cut >= 0
    raw = plain[:cut] if nul else plain
    after = len(plain) - cut - 1 if nul else 0
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Drop("utf8", str(e))
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except ValueError as e:
        raise Drop("json", str(e))
    if not isinstance(obj, dict):
        raise Drop("not_object", "JSON %s" % type(obj).__name__)
    return obj, text, nul, after


def _reject_constant(name):
    # NaN/Infinity are a Python extension, not JSON.
    raise ValueError("not JSON: %s" % name)


class Framer:
    """TCP stream framing by the length field (P§5.2). feed() returns the complete packets; it raises Drop
    ("magic" or "length") when the stream cannot be framed, after which the connection must be closed."""

    def __init__(self):
        self.buf = bytearray()

    def feed(self, data):
        self.buf += data
        out = []
        while len(self.buf) >= 4:
            if self.buf[:2] != MAGIC:
                raise Drop("magic", "stream magic %s" % bytes(self.buf[:2]).hex())
            length = struct.unpack(">H", self.buf[2:4])[0]
            if length < HEADER_LEN:
                raise Drop("length", "stream length field %d < 32" % length)
            if len(self.buf) < length:
                break
            out.append(bytes(self.buf[:length]))
            del self.buf[:length]
        return out


def compact(obj):
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def parse_otc_list(text):
    """"ip:port,ip:port" -> [{"ip":..,"port":..}]; raises ValueError."""
    out = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        ip, sep, port = item.rpartition(":")
        if not sep or not ip:
            raise ValueError("otc list entry %r is not ip:port" % item)
        out.append({"ip": ip, "port": int(port)})
    return out


def parse_key(text):
    key = text.encode("ascii")
    if len(key) != 16:
        raise ValueError("a cloud key is 16 ASCII characters (P§2.5)")
    return key


# ---------------------------------------------------------------------------------------------------------
# Server
# ---------------------------------------------------------------------------------------------------------


class Conn:
    def __init__(self, cid, sock, peer):
        self.cid = cid
        self.sock = sock
        self.peer = peer
        self.framer = Framer()
        self.out = bytearray()


def peer_str(addr):
    return "%s:%d" % (addr[0], addr[1])


class Cloud:
    def __init__(self, host, port, devices, interval, otc_list, out=None, control=True):
        self.out = out or sys.stdout
        self.devices = dict(devices)  # did -> key bytes
        self.interval = interval
        self.otc_list = otc_list
        self.time_offset = 0
        self.silent = False
        self.drop_all_acks = False
        self.drop_methods = set()
        self.ack_replies = False
        self.answers = {}  # method -> body members merged after "id"
        self.endpoint = {}  # did -> ("udp", addr) | ("tcp", cid): where the device was last heard
        self.last_in = {}  # (did, endpoint) -> last stamp accepted from the device on that endpoint
        self.last_out = {}  # did -> last stamp we sent to it
        self.pending = {}  # did -> set of ids of pushed commands not yet answered
        self.pings = {}  # did -> {packet bytes: answered?}
        self.conns = {}
        self.next_cid = 1
        self.running = True
        self.inbuf = b""

        self.sel = selectors.PollSelector() if hasattr(selectors, "PollSelector") else selectors.DefaultSelector()
        self.tcp, self.udp = self._bind(host, port)
        self.port = self.udp.getsockname()[1]
        self.sel.register(self.udp, selectors.EVENT_READ, ("udp", None))
        self.sel.register(self.tcp, selectors.EVENT_READ, ("listen", None))
        if control:
            self.sel.register(0, selectors.EVENT_READ, ("stdin", None))

    @staticmethod
    def _bind(host, port):
        # Port 0: take a free TCP port, then the same number for UDP; retry if UDP has it taken.
        for _ in range(50):
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                tcp.bind((host, port))
                udp.bind((host, tcp.getsockname()[1]))
            except OSError:
                tcp.close()
                udp.close()
                if port:
                    raise
                continue
            tcp.listen(16)
            tcp.setblocking(False)
            udp.setblocking(False)
            return tcp, udp
        raise OSError("no free port for both UDP and TCP")

    # -- output ------------------------------------------------------------------------------------------

    def emit(self, ev, **kw):
        line = json.dumps(dict(ev=ev, **kw), separators=(",", ":"))
        try:
            self.out.write(line + "\n")
            self.out.flush()
        except (BrokenPipeError, ValueError):
            # Nobody reads our events any more: nothing left to do.
            self.running = False

    def ep_fields(self, ep):
        if ep[0] == "udp":
            return {"transport": "udp", "peer": peer_str(ep[1])}
        conn = self.conns.get(ep[1])
        return {"transport": "tcp", "conn": ep[1], "peer": peer_str(conn.peer) if conn else None}

    def drop(self, ep, reason, detail="", **kw):
        self.emit("drop", reason=reason, detail=detail, **self.ep_fields(ep), **kw)

    # -- main loop -----------------------------------------------------------------------------------------

    def run(self):
        self.emit("listening", host=self.udp.getsockname()[0], port=self.port)
        while self.running:
            for key, mask in self.sel.select():
                kind, cid = key.data
                if kind == "udp":
                    self.on_udp()
                elif kind == "listen":
                    self.on_accept()
                elif kind == "stdin":
                    self.on_stdin()
                elif kind == "tcp":
                    conn = self.conns.get(cid)
                    if conn and mask & selectors.EVENT_WRITE:
                        self.flush_conn(conn)
                    conn = self.conns.get(cid)
                    if conn and mask & selectors.EVENT_READ:
                        self.on_tcp_read(conn)
                if not self.running:
                    break
        for conn in list(self.conns.values()):
            self.close_conn(conn, "quit")
        self.udp.close()
        self.tcp.close()

    def on_udp(self):
        while True:
            try:
                data, addr = self.udp.recvfrom(MAX_PACKET + 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self.emit("error", what="recvfrom", error=str(e))
                return
            self.on_packet(data, ("udp", addr))

    def on_accept(self):
        while True:
            try:
                sock, addr = self.tcp.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self.emit("error", what="accept", error=str(e))
                return
            sock.setblocking(False)
            conn = Conn(self.next_cid, sock, addr)
            self.next_cid += 1
            self.conns[conn.cid] = conn
            self.sel.register(sock, selectors.EVENT_READ, ("tcp", conn.cid))
            self.emit("tcp_open", conn=conn.cid, peer=peer_str(addr))

    def on_tcp_read(self, conn):
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self.close_conn(conn, "error: %s" % e)
            return
        if not data:
            self.close_conn(conn, "eof")
            return
        try:
            packets = conn.framer.feed(data)
        except Drop as d:
            # P§5.2: a stream that cannot be framed is a protocol error; close it.
            self.drop(("tcp", conn.cid), d.reason, d.detail)
            self.close_conn(conn, d.reason)
            return
        for pkt in packets:
            if conn.cid not in self.conns:
                return
            self.on_packet(pkt, ("tcp", conn.cid))

    def close_conn(self, conn, reason):
        if self.conns.pop(conn.cid, None) is None:
            return
        try:
            self.sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()
        for did, ep in list(self.endpoint.items()):
            if ep == ("tcp", conn.cid):
                del self.endpoint[did]
        self.emit("tcp_close", conn=conn.cid, reason=reason)

    def flush_conn(self, conn):
        while conn.out:
            try:
                n = conn.sock.send(conn.out)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                self.close_conn(conn, "error: %s" % e)
                return
            del conn.out[:n]
        want = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.out else 0)
        self.sel.modify(conn.sock, want, ("tcp", conn.cid))

    def transmit(self, ep, data):
        """Sends one packet; returns an error text or None."""
        if ep[0] == "udp":
            try:
                self.udp.sendto(data, ep[1])
            except OSError as e:
                self.emit("error", what="sendto", error=str(e))
                return str(e)
            return None
        conn = self.conns.get(ep[1])
        if conn is None:
            return "tcp connection %d is closed" % ep[1]
        conn.out += data
        self.flush_conn(conn)
        return None

    # -- protocol ----------------------------------------------------------------------------------------

    def now(self):
        return (int(time.time()) + self.time_offset) & 0xFFFFFFFF

    def out_stamp(self, did, bump=False):
        """Our stamps to one device never decrease; a ping needs one above all earlier ones (P§5.6)."""
        last = self.last_out.get(did, 0)
        stamp = max(self.now(), last + 1 if bump else last)
        self.last_out[did] = stamp
        return stamp

    def send_json(self, ep, did, obj, kind):
        text = obj if isinstance(obj, str) else compact(obj)
        stamp = self.out_stamp(did)
        err = self.transmit(ep, seal_text(did, stamp, self.devices[did], text))
        if err is None:
            self.emit("sent", kind=kind, did=did, stamp=stamp, text=text, **self.ep_fields(ep))
        return stamp, err

    def on_packet(self, data, ep):
        try:
            length, _unknown, did, stamp, checksum = check_frame(data)
        except Drop as d:
            self.drop(ep, d.reason, d.detail, len=len(data))
            return
        if length == HEADER_LEN:
            self.on_control(data, ep, did, stamp, checksum)
        else:
            self.on_data(data, ep, did, stamp)

    def on_control(self, data, ep, did, stamp, checksum):
        if data == CLOUD_HELLO:
            self.emit("hello", did=None, **self.ep_fields(ep))
            if self.silent:
                self.emit("unanswered", reason="silent", what="hello", **self.ep_fields(ep))
                return
            server_time = self.now()
            if self.transmit(ep, time_sync_reply(server_time)) is None:
                self.emit("sent", kind="timesync", did=None, stamp=server_time, **self.ep_fields(ep))
            return
        if data[4:12] == FF8:
            self.drop(ep, "hello_mismatch", "bytes 4..11 are ff but this is not the cloud hello", hex=data.hex())
            return
        if did not in self.devices:
            self.drop(ep, "did", "unknown did", did=did)
            return
        key = self.devices[did]
        known = self.pings.get(did, {})
        if data in known:
            # The daemon echoed our ping (P§5.6); never echo it back.
            self.emit("ping_echo", did=did, stamp=stamp, dup=known[data], **self.ep_fields(ep))
            known[data] = True
            return
        if md5(data[:16] + key) != checksum:
            self.drop(ep, "md5", "keepalive checksum does not match", did=did, stamp=stamp)
            return
        last = self.last_in.get((did, ep))
        if last is not None and stamp <= last:
            self.drop(ep, "stamp", "keepalive stamp not above the last one seen", did=did, stamp=stamp, last=last)
            return
        self.last_in[(did, ep)] = stamp
        self.endpoint[did] = ep
        self.emit("keepalive", did=did, stamp=stamp, **self.ep_fields(ep))
        if self.silent:
            self.emit("unanswered", reason="silent", what="keepalive", did=did, stamp=stamp, **self.ep_fields(ep))
            return
        if self.transmit(ep, data) is None:
            self.emit("sent", kind="pong", did=did, stamp=stamp, **self.ep_fields(ep))

    def on_data(self, data, ep, did, stamp):
        if did not in self.devices:
            self.drop(ep, "did", "unknown did", did=did, stamp=stamp)
            return
        try:
            plain = open_data(data, self.devices[did])
            obj, text, nul, after = decode_text(plain)
        except Drop as d:
            self.drop(ep, d.reason, d.detail, did=did, stamp=stamp)
            return
        last = self.last_in.get((did, ep))
        self.last_in[(did, ep)] = stamp if last is None else max(last, stamp)
        self.endpoint[did] = ep
        fields = self.ep_fields(ep)
        self.emit("msg", did=did, stamp=stamp, json=obj, raw=text, nul=nul, after_nul=after,
                  stamp_back=last is not None and stamp < last, **fields)
        msg_id = obj.get("id")
        if "method" in obj:
            self.on_request(ep, did, obj, msg_id, fields)
        else:
            waiting = self.pending.get(did, set())
            hit = isinstance(msg_id, int) and msg_id in waiting
            if hit:
                waiting.discard(msg_id)  # first reply wins; a later one reports pending=false
            self.emit("reply", did=did, id=msg_id, pending=hit, json=obj, **fields)
            if self.ack_replies and msg_id is not None and not self.silent:
                self.send_json(ep, did, {"id": msg_id, "result": "ok"}, "reply_ack")

    def on_request(self, ep, did, obj, msg_id, fields):
        if msg_id is None:
            return  # P§3: a notification gets no answer.
        method = obj.get("method")
        if self.silent:
            self.emit("unanswered", reason="silent", what="request", did=did, id=msg_id, method=method, **fields)
            return
        if self.drop_all_acks or (isinstance(method, str) and method in self.drop_methods):
            self.emit("unanswered", reason="drop_acks", what="request", did=did, id=msg_id, method=method, **fields)
            return
        body = self.answers.get(method) if isinstance(method, str) else None
        if body is not None:
            kind = "answer"
        elif method == "_otc.info":
            kind = "otc_info"
            body = {"result": {"otc_list": self.otc_list,
                               "otc_test": {"list": [], "interval": self.interval, "firsttest": 600}}}
        else:
            kind = "ack"
            body = {"result": "ok"}
        reply = {"id": msg_id}
        reply.update(body)
        self.send_json(ep, did, reply, kind)

    # -- control input -----------------------------------------------------------------------------------

    def on_stdin(self):
        try:
            data = os.read(0, 65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self.emit("error", what="stdin", error=str(e))
            data = b""
        if not data:
            for line in self.inbuf.split(b"\n"):
                self.on_line(line)
            self.emit("quit", reason="eof")
            self.running = False
            return
        self.inbuf += data
        while b"\n" in self.inbuf and self.running:
            line, self.inbuf = self.inbuf.split(b"\n", 1)
            self.on_line(line)

    def on_line(self, line):
        line = line.strip()
        if not line or not self.running:
            return
        try:
            cmd = json.loads(line.decode("utf-8"))
        except ValueError as e:
            self.emit("error", cmd=None, error="bad command line: %s" % e)
            return
        if not isinstance(cmd, dict) or not isinstance(cmd.get("cmd"), str):
            self.emit("error", cmd=None, error="a command is an object with a \"cmd\" string")
            return
        name = cmd["cmd"]
        handler = getattr(self, "cmd_" + name, None)
        if handler is None:
            self.emit("error", cmd=name, error="unknown command")
            return
        try:
            extra = handler(cmd) or {}
        except (KeyError, TypeError, ValueError) as e:
            self.emit("error", cmd=name, error="%s: %s" % (type(e).__name__, e))
            return
        if "error" in extra:
            self.emit("error", cmd=name, **extra)
        else:
            self.emit("ok", cmd=name, **extra)

    def _route(self, cmd):
        did = cmd["did"]
        if did not in self.devices:
            return did, None, {"error": "unknown did %s" % did}
        ep = self.endpoint.get(did)
        if ep is None:
            return did, None, {"error": "no known address for did %d" % did}
        return did, ep, None

    def cmd_send(self, cmd):
        did, ep, err = self._route(cmd)
        if err:
            return err
        if "text" in cmd:
            if not isinstance(cmd["text"], str):
                raise TypeError("text must be a string")
            payload = cmd["text"]
            try:
                obj = json.loads(payload)
            except ValueError:
                obj = None
        else:
            obj = cmd["json"]
            if not isinstance(obj, dict):
                raise TypeError("json must be an object")
            payload = obj
        msg_id = obj.get("id") if isinstance(obj, dict) else None
        stamp, err = self.send_json(ep, did, payload, "command")
        if err:
            return {"error": err}
        if isinstance(msg_id, int) and isinstance(obj, dict) and "method" in obj:
            self.pending.setdefault(did, set()).add(msg_id)
        return {"did": did, "id": msg_id, "stamp": stamp, **self.ep_fields(ep)}

    def cmd_raw(self, cmd):
        did, ep, err = self._route(cmd)
        if err:
            return err
        data = bytes.fromhex(cmd["hex"])
        err = self.transmit(ep, data)
        if err:
            return {"error": err}
        return {"did": did, "len": len(data), **self.ep_fields(ep)}

    def cmd_ping(self, cmd):
        did, ep, err = self._route(cmd)
        if err:
            return err
        stamp = cmd.get("stamp")
        if stamp is None:
            stamp = self.out_stamp(did, bump=True)
        else:
            stamp = int(stamp) & 0xFFFFFFFF
            self.last_out[did] = max(self.last_out.get(did, 0), stamp)
        pkt = keepalive(did, stamp, self.devices[did])
        self.pings.setdefault(did, {})[pkt] = False
        err = self.transmit(ep, pkt)
        if err:
            return {"error": err}
        return {"did": did, "stamp": stamp, **self.ep_fields(ep)}

    @staticmethod
    def _flag(cmd):
        on = cmd["on"]
        if not isinstance(on, bool):
            raise TypeError("on must be true or false")
        return on

    def cmd_silent(self, cmd):
        self.silent = self._flag(cmd)
        return {"on": self.silent}

    def cmd_drop_acks(self, cmd):
        on = self._flag(cmd)
        methods = cmd.get("methods")
        if methods is not None and not (isinstance(methods, list) and all(isinstance(m, str) for m in methods)):
            raise TypeError("methods must be a list of strings")
        if not on:
            self.drop_all_acks = False
            self.drop_methods = set()
        elif methods is None:
            self.drop_all_acks = True
        else:
            self.drop_methods |= set(methods)
        return {"on": on, "all": self.drop_all_acks, "methods": sorted(self.drop_methods)}

    def cmd_ack_replies(self, cmd):
        self.ack_replies = self._flag(cmd)
        return {"on": self.ack_replies}

    def cmd_answer(self, cmd):
        method = cmd["method"]
        body = cmd.get("json")
        if body is None:
            self.answers.pop(method, None)
        elif isinstance(body, dict) and "id" not in body and "method" not in body:
            self.answers[method] = body
        else:
            raise TypeError("json must be an object without id and method, or null")
        return {"method": method}

    def cmd_add_device(self, cmd):
        did = cmd["did"]
        if not isinstance(did, int) or not 0 <= did <= 0xFFFFFFFF:
            raise ValueError("did must be a u32")
        self.devices[did] = parse_key(cmd["key"])
        return {"did": did}

    def cmd_config(self, cmd):
        if "otc_list" in cmd:
            v = cmd["otc_list"]
            self.otc_list = parse_otc_list(v) if isinstance(v, str) else list(v)
        if "interval" in cmd:
            self.interval = cmd["interval"]
        if "time_offset" in cmd:
            self.time_offset = int(cmd["time_offset"])
        return {"otc_list": self.otc_list, "interval": self.interval, "time_offset": self.time_offset}

    def cmd_close_tcp(self, _cmd):
        closed = sorted(self.conns)
        for conn in list(self.conns.values()):
            self.close_conn(conn, "close_tcp")
        return {"closed": closed}

    def cmd_status(self, _cmd):
        return {
            "port": self.port,
            "devices": {str(d): self.ep_fields(ep) for d, ep in self.endpoint.items()},
            "tcp": sorted(self.conns),
            "pending": {str(d): sorted(ids) for d, ids in self.pending.items() if ids},
        }

    def cmd_quit(self, _cmd):
        self.running = False
        return {}


def main(argv=None):
    ap = argparse.ArgumentParser(description="Independent OT cloud peer for miio_client tests")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True, help="UDP and TCP port; 0 picks a free one")
    ap.add_argument("--did", type=int, action="append", default=[], required=True)
    ap.add_argument("--key", action="append", default=[], required=True, help="16-character cloud key")
    ap.add_argument("--interval", type=int, default=1800, help="otc_test.interval in the _otc.info reply")
    ap.add_argument("--otc-list", default="", help="ip:port,... for otc_list in the _otc.info reply")
    ap.add_argument("--no-control", action="store_true", help="do not read commands from stdin")
    a = ap.parse_args(argv)
    if len(a.did) != len(a.key):
        ap.error("give one --key for each --did")
    try:
        devices = {d: parse_key(k) for d, k in zip(a.did, a.key)}
        otc = parse_otc_list(a.otc_list)
    except ValueError as e:
        ap.error(str(e))
    for d in devices:
        if not 0 <= d <= 0xFFFFFFFF:
            ap.error("did %d is not a u32" % d)
    cloud = Cloud(a.host, a.port, devices, a.interval, otc, control=not a.no_control)
    cloud.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
