#!/usr/bin/env python3
"""`make bench`: what the daemon costs, each figure next to a reference measured in the same run.

Contract (tests/bench/README.md):
- Runs on loopback only and installs nothing. A missing outside tool (valgrind, mosquitto, the Debian
  rust-web toolchain for static builds) is named and only the rows that need it are skipped.
- Reports, never judges: no figure is compared with a limit to pass or fail. Exit 0 when every row was
  measured or skipped for a named missing tool; exit 1 when the harness itself broke (a build failed, the
  daemon never connected, a helper process died): those rows say FAILED and why.
- Prints a table and writes target/bench/results.json: a list of {name, value, unit, reference, ratio, how},
  ratio = value / reference (null when either is missing).

Python 3 standard library; the LAN miIO.info row also imports tests/pycloud/ocloud.py (needs the
`cryptography` package). Knobs, all optional (environment): BENCH_IDLE_SECS (120), BENCH_TPUT_SECS (30),
BENCH_RTT_N (2000), BENCH_CPU_N (2000), BENCH_CPU_BIN, BENCH_STARTS (10), BENCH_LAN_N (1000), BENCH_SYSCALL_N (1000),
BENCH_ROUNDS (10),
BENCH_CPU (the CPU of the latency rows, or "none"),
BENCH_STATIC_TARGETS ("x86_64 aarch64 armv7", "" for none), BENCH_HOSTILE_SECS (60), BENCH_ONLY (comma
list of sections: flash,session,startup,static-memory,cpu,syscalls,hostile,agent,mqtt), BENCH_WITHOUT (tools or Debian packages to treat as missing,
e.g. "mosquitto valgrind perf qemu-arm-static rustc-web"), CARGO, MAKE.
"""

import json
import re
import os
import select
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
import traceback

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
HERE = os.path.join(ROOT, "tests", "bench")
OUT = os.path.join(ROOT, "target", "bench")
RUN = os.path.join(OUT, "run")
BIN = os.path.join(ROOT, "target", "release", "miio_client")
KIT_SRC = os.path.join(HERE, "benchkit")
KIT_DIR = os.path.join(OUT, "benchkit")
KIT = os.path.join(OUT, "cargo", "release", "benchkit")

DID = 123456789
KEY = "BenchKey0123abcX"
TOKEN = "BenchToken012345"


def env_num(name, default):
    v = os.environ.get(name, "")
    try:
        return float(v) if v.strip() else default
    except ValueError:
        print("bench: %s=%r is not a number; using %s" % (name, v, default), file=sys.stderr)
        return default


IDLE_SECS = env_num("BENCH_IDLE_SECS", 120)
TPUT_SECS = env_num("BENCH_TPUT_SECS", 30)
RTT_N = int(env_num("BENCH_RTT_N", 2000))
CPU_N = int(env_num("BENCH_CPU_N", 2000))
# The daemon binary of the CPU row: the host release build unless another is named (the board's
# static build, to see what its libc costs per report).
CPU_BIN = os.environ.get("BENCH_CPU_BIN") or None
STARTS = int(env_num("BENCH_STARTS", 10))
LAN_N = int(env_num("BENCH_LAN_N", 1000))
SYSCALL_N = max(1, int(env_num("BENCH_SYSCALL_N", 1000)))
HOSTILE_SECS = env_num("BENCH_HOSTILE_SECS", 60)
# The latency rows (round trip, LAN, start-up) run the daemon, the fake cloud, the references and the
# client on one CPU, as on the single-core boards the daemon is for. Spread over CPUs, a round trip
# pays for waking an idle CPU, which in a VM costs tens of microseconds and depends on where the
# scheduler happened to put each process: unpinned runs swung by 10x between the daemon and its
# reference. BENCH_CPU=N picks the CPU (default: the last one allowed), BENCH_CPU=none spreads them.
ALL_CPUS = os.sched_getaffinity(0)
_cpu = os.environ.get("BENCH_CPU", "").strip()
if _cpu == "none":
    ONE_CPU = None
elif _cpu.isdigit() and int(_cpu) in ALL_CPUS:
    ONE_CPU = {int(_cpu)}
else:
    ONE_CPU = {max(ALL_CPUS)}
# Timing rows alternate between the daemon and its reference in this many rounds.
ROUNDS = max(1, int(env_num("BENCH_ROUNDS", 10)))
STATIC_TARGETS = os.environ.get("BENCH_STATIC_TARGETS", "x86_64 aarch64 armv7").split()
ONLY = [s for s in os.environ.get("BENCH_ONLY", "").replace(",", " ").split() if s]
# Tools and Debian packages to treat as missing, to see the skips without uninstalling anything.
WITHOUT = set(os.environ.get("BENCH_WITHOUT", "").replace(",", " ").split())
CARGO = os.environ.get("CARGO", "cargo")
MAKE = os.environ.get("MAKE", "make")

# Budgets of the issue (KB = 1000 bytes, the stricter reading) and the vendor fact it quotes.
BUDGET_KB = {"x86_64": 400, "aarch64": 300, "armv7": 300}
VENDOR_AARCH64_KB = 86.8 + 32.0  # miio_client (dynamic) + libjson-c; glibc not counted

# Goals of the hardening issue for the hostile row (a board under hostile local load), each the
# reference of its figure. MB and KB are 1000-based, the stricter reading.
GOAL_HWM_KIB = 1e6 / 1024
GOAL_QUERY_MS = 100.0
GOAL_TERM_MS = 1000.0
GOAL_LOG_BYTES = 20000
# The hostile load: never-reading clients, and the cloud's command pushes (bytes each, per second).
NEVER = 20
PUSH_BYTES = 8192
PUSH_HZ = 10

# Clients per local port (the daemon's default --max-clients) and reports in flight per client: the
# daemon refuses more than 128 pending upstream requests (P§5.7), 20 x 6 = 120 stay under it.
CLIENTS = 20
WINDOW = 6

LOG = sys.stderr


def say(msg):
    print("bench: " + msg, file=LOG, flush=True)


class Broken(Exception):
    """The harness cannot measure this row (not a missing tool): the row says FAILED."""


# --- figures ----------------------------------------------------------------------------------------

FIGURES = []


def figure(name, value, unit, reference, how):
    ratio = None
    if isinstance(value, (int, float)) and isinstance(reference, (int, float)) and reference:
        ratio = value / reference
    FIGURES.append({"name": name, "value": value, "unit": unit, "reference": reference,
                    "ratio": ratio, "how": how})


def skipped(name, unit, why):
    FIGURES.append({"name": name, "value": None, "unit": unit, "reference": None, "ratio": None,
                    "how": "SKIP " + why})


def failed(name, unit, why):
    FIGURES.append({"name": name, "value": None, "unit": unit, "reference": None, "ratio": None,
                    "how": "FAILED " + why})



# --- processes: only those we start, ended by their own pid -------------------------------------------

PROCS = []


def spawn(args, **kw):
    kw.setdefault("stdin", subprocess.DEVNULL)
    kw.setdefault("cwd", ROOT)
    p = subprocess.Popen(args, **kw)
    PROCS.append(p)
    return p


def stop(p, sig=signal.SIGTERM, limit=10.0):
    """Ends one child we started: `sig`, then SIGKILL at the deadline. Returns its exit status."""
    if p.poll() is None:
        try:
            os.kill(p.pid, sig)
        except ProcessLookupError:
            pass
        try:
            p.wait(limit)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    if p in PROCS:
        PROCS.remove(p)
    return p.returncode


def stop_all():
    for p in list(PROCS):
        stop(p, limit=5.0)


def free_port():
    """A port free for both TCP and UDP on 127.0.0.1."""
    while True:
        t = socket.socket()
        t.bind(("127.0.0.1", 0))
        port = t.getsockname()[1]
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            u.bind(("0.0.0.0", port))
            return port
        except OSError:
            continue
        finally:
            u.close()
            t.close()


def wait_for(cond, limit, what):
    end = time.monotonic() + limit
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() >= end:
            raise Broken("timed out after %.0f s waiting for %s" % (limit, what))
        time.sleep(0.02)


def tcp_accepts(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def proc_status(pid, tid=None):
    """/proc/PID/status (or a thread's) as a dict of the first word of each value."""
    path = "/proc/%d/status" % pid if tid is None else "/proc/%d/task/%s/status" % (pid, tid)
    out = {}
    with open(path) as f:
        for line in f:
            k, _, v = line.partition(":")
            out[k] = v.split()[0] if v.split() else ""
    return out


def switches(pid):
    """Voluntary and involuntary context switches summed over every thread of the process."""
    vol = invol = 0
    for tid in os.listdir("/proc/%d/task" % pid):
        try:
            s = proc_status(pid, tid)
        except OSError:
            continue
        vol += int(s.get("voluntary_ctxt_switches", 0))
        invol += int(s.get("nonvoluntary_ctxt_switches", 0))
    return vol, invol


def udp_socket_drops(pid, port):
    """The `drops` count of the process's UDP socket bound to `port` (/proc/net/udp), or None when it
    has none. The kernel counts there every datagram delivered to the socket and not queued: those its
    socket filter refused, and those a full receive buffer lost."""
    inodes = set()
    for fd in os.listdir("/proc/%d/fd" % pid):
        try:
            link = os.readlink("/proc/%d/fd/%s" % (pid, fd))
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    with open("/proc/net/udp") as f:
        for line in f.readlines()[1:]:
            v = line.split()
            if v[9] in inodes and int(v[1].rsplit(":", 1)[1], 16) == port:
                return int(v[-1])
    return None


def udp_sockets_on(port):
    """How many UDP sockets of the machine's network namespace are bound to `port`."""
    with open("/proc/net/udp") as f:
        return sum(1 for line in f.readlines()[1:] if int(line.split()[1].rsplit(":", 1)[1], 16) == port)


def mem_kib(pid):
    s = proc_status(pid)
    return int(s["VmRSS"]), int(s["VmHWM"])


def fd_count(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


def _cpu_busy_ticks():
    """Busy clock ticks of the whole machine since boot (/proc/stat: all but idle and iowait)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return sum(v) - v[3] - v[4]


def _ticks_of(pid, children=False):
    """utime + stime of a process (all its threads); with `children`, also of its reaped children."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is the state (field 3); utime, stime, cutime, cstime are fields 14..17.
    n = int(fields[11]) + int(fields[12])
    if children:
        n += int(fields[13]) + int(fields[14])
    return n


def _our_ticks():
    n = _ticks_of(os.getpid(), children=True)
    for p in PROCS:
        try:
            n += _ticks_of(p.pid)
        except (OSError, ValueError, IndexError):
            pass
    return n


class Noise:
    """How much CPU other processes took while a figure was measured: the machine is shared, and this
    says how far to trust a timing row (its reference, measured alongside, shares the same noise)."""

    def __init__(self, pinned=True):
        self.where = ("daemon, cloud, reference and client all on CPU %d" % min(ONE_CPU)) \
            if pinned and ONE_CPU else "processes spread over the CPUs"
        self.t0 = time.monotonic()
        try:
            self.busy0, self.ours0 = _cpu_busy_ticks(), _our_ticks()
        except (OSError, ValueError, IndexError):
            self.busy0 = None

    def text(self):
        where = self.where
        ncpu = len(ALL_CPUS)
        if self.busy0 is None:
            return "; " + where
        try:
            other = (_cpu_busy_ticks() - self.busy0) - (_our_ticks() - self.ours0)
        except (OSError, ValueError, IndexError):
            return "; " + where
        secs = max(time.monotonic() - self.t0, 1e-3)
        share = max(0.0, other / os.sysconf("SC_CLK_TCK") / secs / ncpu * 100.0)
        return "; %s; other processes used %.0f%% of the %d CPUs meanwhile" % (where, share, ncpu)


def find_tool(name):
    if name in WITHOUT:
        return None
    return shutil.which(name) or next(
        (p for p in ("/usr/sbin/" + name, "/sbin/" + name) if os.access(p, os.X_OK)), None)


# --- builds -----------------------------------------------------------------------------------------

def run_logged(args, log_path, env=None):
    with open(log_path, "w") as log:
        return subprocess.call(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
                               stdin=subprocess.DEVNULL)


def tail(path, n=15):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


def build_host():
    say("cargo build --release (the daemon and miio_fakecloud)")
    log = os.path.join(OUT, "build-host.log")
    if run_logged([CARGO, "build", "--release"], log) != 0 or not os.access(BIN, os.X_OK):
        sys.stderr.write(tail(log))
        raise SystemExit("bench: cargo build --release failed (log: %s)" % log)


def build_kit():
    """benchkit, built from a copy next to the daemon's Cargo.lock, so it links the same crate versions."""
    say("building tests/bench/benchkit (crypto reference, relay, echo, load client)")
    src = os.path.join(KIT_DIR, "src")
    os.makedirs(src, exist_ok=True)
    shutil.copyfile(os.path.join(KIT_SRC, "Cargo.toml"), os.path.join(KIT_DIR, "Cargo.toml"))
    shutil.copyfile(os.path.join(KIT_SRC, "src", "main.rs"), os.path.join(src, "main.rs"))
    shutil.copyfile(os.path.join(ROOT, "Cargo.lock"), os.path.join(KIT_DIR, "Cargo.lock"))
    env = dict(os.environ, CARGO_TARGET_DIR=os.path.join(OUT, "cargo"))
    log = os.path.join(OUT, "build-benchkit.log")
    base = [CARGO, "build", "--release", "--manifest-path", os.path.join(KIT_DIR, "Cargo.toml")]
    # Offline first: the daemon's build already has every crate benchkit needs.
    if run_logged(base + ["--offline"], log, env) != 0 and run_logged(base, log, env) != 0:
        sys.stderr.write(tail(log))
        raise SystemExit("bench: building benchkit failed (log: %s)" % log)


# The defaults a user gets are what every daemon of the bench runs with: mDNS on its port 5353 and the
# default helper grace (doc/LOCAL_API.md §9.5: with no helper script the daemon waits this long, then
# reads its data files). Only the rows about another setting pass one, each named in the row.
HELPER_GRACE_S = 2.0


def client_options():
    """The options every daemon gets: none, the defaults a user gets (mDNS on, default helper grace)."""
    return []


def grace0_option():
    """`--helper-grace 0` for the start-up row about it, when `miio_client -h` lists it (else None)."""
    p = subprocess.run([BIN, "-h"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       stdin=subprocess.DEVNULL)
    return ["--helper-grace", "0"] if "--helper-grace" in p.stdout else None


# --- the daemon, the fake cloud, the references -------------------------------------------------------

def data_dir(name):
    d = os.path.join(RUN, name)
    os.makedirs(d, exist_ok=True)
    files = {
        "device.conf": "# bench identity, not a real device\ndid=%d\nkey=%s\nmac=02:00:00:be:0c:01\n"
                       "vendor=bench\nmodel=bench.plug.v1\n" % (DID, KEY),
        "device.token": TOKEN,
        "wifi.conf": 'ssid="bench"\npsk="bench-passwd"\nkey_mgmt=WPA\n',
    }
    for f, text in files.items():
        with open(os.path.join(d, f), "w") as fh:
            fh.write(text)
    return d + "/"


class Cloud:
    """miio_fakecloud on loopback, logging only errors (its info lines would cost it per report)."""

    def __init__(self):
        self.port = free_port()
        self.ctl = ctl = free_port()
        self.p = spawn([BIN, "miio_fakecloud", "--port", str(self.port), "--ctl-port", str(ctl),
                        "--did", str(DID), "--key", KEY, "-l", "0"],
                       stdout=subprocess.DEVNULL, stderr=open(os.path.join(RUN, "cloud.err"), "a"))
        wait_for(lambda: tcp_accepts(self.port) or self.dead(), 10, "miio_fakecloud to listen")
        if self.dead():
            raise Broken("miio_fakecloud exited with %s" % self.p.returncode)

    def dead(self):
        return self.p.poll() is not None

    def check(self, what):
        """Raises Broken when the fake cloud died: a figure measured without it would mislead."""
        if self.dead():
            raise Broken("miio_fakecloud exited (status %s) before the end of %s"
                         % (self.p.returncode, what))

    def close(self):
        stop(self.p)


class Daemon:
    """The daemon in the foreground. Its log (stdout) goes to a file that is polled, so no thread of
    ours competes with a measurement; `pipe=True` instead keeps stdout on a pipe for `wait_pipe`,
    which times a log line to the microsecond (start-up)."""

    def __init__(self, cloud_port, opts, tag, wrap=None, binary=BIN, pipe=False, ble=0, level="2"):
        self.dir = data_dir(tag)
        self.lan = free_port()
        self.local = free_port()
        self.log = os.path.join(RUN, tag + ".log")
        args = [binary, "-d", self.dir, "-H", "127.0.0.1", "-p", str(cloud_port),
                "--lan-port", str(self.lan), "--local-port", str(self.local), "--ble-port", str(ble),
                "--os-release", os.path.join(self.dir, "os-release")]
        args += (["-l", level] if level is not None else []) + opts
        out = subprocess.PIPE if pipe else open(self.log, "wb")
        self.t0 = time.perf_counter()
        self.p = spawn((wrap or []) + args, stdout=out,
                       stderr=open(os.path.join(RUN, tag + ".err"), "wb"))
        if not pipe:
            out.close()
        self.text = b""

    def wait_pipe(self, needle, limit):
        """perf_counter time of the read that completed the first log line holding `needle`."""
        end = time.monotonic() + limit
        fd = self.p.stdout.fileno()
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise Broken("no %r in the daemon's log after %.0f s; log tail:\n%s"
                             % (needle, limit, self.log_tail()))
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            now = time.perf_counter()
            if not chunk:
                raise Broken("the daemon exited before logging %r (status %s); log tail:\n%s"
                             % (needle, self.p.poll(), self.log_tail()))
            self.text += chunk
            if needle.encode() in self.text:
                return now

    def wait_log(self, needle, limit):
        def seen():
            try:
                with open(self.log, "rb") as f:
                    self.text = f.read()
            except OSError:
                return False
            if needle.encode() in self.text:
                return True
            if self.p.poll() is not None:
                raise Broken("the daemon exited (status %s) before logging %r; log tail:\n%s"
                             % (self.p.returncode, needle, self.log_tail()))
            return False
        try:
            wait_for(seen, limit, "%r in the daemon's log" % needle)
        except Broken as e:
            if "timed out" in str(e):
                raise Broken("%s; log tail:\n%s" % (e, self.log_tail()))
            raise

    def log_tail(self, n=8):
        lines = self.text.decode("utf-8", "replace").splitlines()
        return "\n".join(lines[-n:])

    def connected(self, limit=20.0):
        self.wait_log("STATE_CLOUD_CONNECTED", limit)

    def close(self):
        rc = stop(self.p, limit=60.0)
        if self.p.stdout:
            self.p.stdout.close()
        return rc


def kit_json(args, limit):
    p = subprocess.run([KIT] + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       timeout=limit, stdin=subprocess.DEVNULL)
    if p.returncode != 0:
        raise Broken("benchkit %s: exit %s: %s" % (" ".join(args), p.returncode, p.stderr.strip()))
    return json.loads(p.stdout.strip().splitlines()[-1])


def kit_server(args):
    """benchkit echo / relay: started, its port read from its first line."""
    p = spawn([KIT] + args, stdout=subprocess.PIPE)
    ready, _, _ = select.select([p.stdout], [], [], 10)
    if not ready:
        stop(p)
        raise Broken("benchkit %s did not start" % args[0])
    return p, json.loads(p.stdout.readline())["port"]


class Relay:
    """The bare reference path: TCP in (relay), UDP to an echo and back, TCP out."""

    def __init__(self):
        self.echo, self.echo_port = kit_server(["echo"])
        self.relay, self.port = kit_server(["relay", str(self.echo_port)])

    def close(self):
        stop(self.relay)
        stop(self.echo)


def load(port, **kw):
    args = ["load", "--port", str(port)]
    for k, v in kw.items():
        args += ["--" + k, str(v)]
    limit = kw.get("secs", 0) + kw.get("drain", 15) + 120
    return kit_json(args, limit)


# --- mosquitto, the reference broker ----------------------------------------------------------------

class Mosquitto:
    """mosquitto on loopback with one MQTT client that pings at the daemon's keepalive interval."""

    def __init__(self, exe, keepalive):
        self.port = free_port()
        conf = os.path.join(RUN, "mosquitto.conf")
        with open(conf, "w") as f:
            f.write("listener %d 127.0.0.1\nallow_anonymous true\npersistence false\nlog_dest none\n"
                    % self.port)
        self.p = spawn([exe, "-c", conf], stdout=subprocess.DEVNULL,
                       stderr=open(os.path.join(RUN, "mosquitto.err"), "w"))
        wait_for(lambda: tcp_accepts(self.port) or self.p.poll() is not None, 10, "mosquitto")
        if self.p.poll() is not None:
            raise Broken("mosquitto exited with %s (see %s)" % (self.p.returncode,
                                                                os.path.join(RUN, "mosquitto.err")))
        self.keepalive = keepalive
        self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        cid = b"bench"
        var = b"\x00\x04MQTT\x04\x02" + struct.pack(">H", keepalive)
        body = var + struct.pack(">H", len(cid)) + cid
        self.sock.sendall(bytes([0x10, len(body)]) + body)
        if self.sock.recv(4)[:1] != b"\x20":
            raise Broken("mosquitto sent no CONNACK")
        self.stopping = threading.Event()
        self.pinger = threading.Thread(target=self._ping, daemon=True)
        self.pinger.start()

    def _ping(self):
        while not self.stopping.wait(self.keepalive):
            try:
                self.sock.sendall(b"\xc0\x00")
                self.sock.recv(2)
            except OSError:
                return

    def close(self):
        self.stopping.set()
        self.sock.close()
        stop(self.p)


# --- sections ---------------------------------------------------------------------------------------

def sources_mtime():
    newest = 0.0
    for top in ("src",):
        for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
            for f in files:
                newest = max(newest, os.path.getmtime(os.path.join(dirpath, f)))
    for f in ("Cargo.toml", "Cargo.lock"):
        newest = max(newest, os.path.getmtime(os.path.join(ROOT, f)))
    return newest


def missing_static_packages(target):
    if not find_tool("dpkg-query"):
        return None, "dpkg-query (not Debian: cannot check the rust-web toolchain)"
    p = subprocess.run([MAKE, "-s", "--no-print-directory", "static-packages", "TARGET=" + target],
                       cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       stdin=subprocess.DEVNULL)
    if p.returncode != 0:
        return None, "make static-packages failed: " + p.stderr.strip()
    missing = []
    for pkg in p.stdout.split():
        q = subprocess.run(["dpkg-query", "-W", "-f=${db:Status-Status}", pkg],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        if q.stdout.strip() != "installed" or pkg in WITHOUT:
            missing.append(pkg)
    return missing, None


QEMU = {"aarch64": "qemu-aarch64-static", "armv7": "qemu-arm-static"}


def runs_check(target, path):
    """Whether the measured binary is a working program: `-v` natively or under qemu-user-static."""
    cmd = [path, "-v"]
    if target in QEMU:
        q = find_tool(QEMU[target])
        if not q:
            return "not run: qemu-user-static missing (%s)" % QEMU[target]
        cmd = [q] + cmd
    try:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60,
                           stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        return "DID NOT RUN: %s" % e
    said = p.stdout.strip().splitlines()[:1]
    if said and said[0].startswith("miio-client"):
        return "ran%s: -v says %r" % (" under " + QEMU[target] if target in QEMU else "", said[0])
    return "DID NOT RUN: -v exit %s, %r" % (p.returncode, p.stdout.strip()[:120])


def static_binary(t):
    """target/static/T/miio_client, built by `make static TARGET=T` unless one newer than the sources
    is there. Returns (path, how it came) or (None, ("SKIP" | "FAILED", why))."""
    out = os.path.join(ROOT, "target", "static", t, "miio_client")
    if os.path.exists(out) and os.path.getmtime(out) > sources_mtime():
        return out, "reused: newer than src/, Cargo.toml, Cargo.lock"
    missing, err = missing_static_packages(t)
    if err:
        return None, ("SKIP", err)
    if missing:
        # make static would install them through .ci/apt-install; the bench installs nothing.
        return None, ("SKIP", "missing Debian packages: %s (as root: make static-deps TARGET=%s)"
                      % (" ".join(missing), t))
    say("make static TARGET=%s (about a minute or two; log: target/bench/static-%s.log)" % (t, t))
    log = os.path.join(OUT, "static-%s.log" % t)
    t0 = time.monotonic()
    rc = run_logged([MAKE, "--no-print-directory", "static", "TARGET=" + t], log)
    if rc != 0 or not os.path.exists(out):
        return None, ("FAILED", "make static TARGET=%s exited %s; log %s:\n%s" % (t, rc, log, tail(log, 6)))
    return out, "built now in %.0f s" % (time.monotonic() - t0)


def section_flash():
    for t in ("x86_64", "aarch64", "armv7"):
        name = "flash: static %s (device applets)" % t
        if t not in STATIC_TARGETS:
            skipped(name, "KB", "not in BENCH_STATIC_TARGETS")
            continue
        out, built = static_binary(t)
        if out is None:
            (skipped if built[0] == "SKIP" else failed)(name, "KB", built[1])
            continue
        size = os.path.getsize(out)
        figure(name, size / 1000.0, "KB", BUDGET_KB[t],
               "stat of target/static/%s/miio_client (make static TARGET=%s, %d bytes, %s; %s); "
               "reference: the budget, %d KB (KB = 1000 bytes)"
               % (t, t, size, built, runs_check(t, out), BUDGET_KB[t]))
        if t == "aarch64":
            figure("flash: static aarch64 vs vendor", size / 1000.0, "KB", VENDOR_AARCH64_KB,
                   "ours: one static binary, libc included. Reference (a fact, quoted, not measured): "
                   "vendor aarch64 miio_client 86.8 KB dynamic + 32 KB libjson-c = 118.8 KB, plus a "
                   "shared glibc that is not counted")


def pin(cpus, *pids):
    """Sets the CPU affinity of this harness (children inherit it) or of the given processes."""
    if cpus is None:
        return
    for pid in pids or (0,):
        os.sched_setaffinity(pid, cpus)


def section_session(opts):
    """One connected daemon: memory, idle wakeups, round trip, LAN, throughput. The latency rows run
    with everything on one CPU (see ONE_CPU). The idle window does not: on one CPU the pong would
    preempt the daemon before it sleeps again, merging two wakeups that a board with a real network
    has. Throughput gets every CPU."""
    cloud = Cloud()
    d = None
    try:
        d = Daemon(cloud.port, opts, "session")
        d.connected()
        time.sleep(2.0)  # let the post-connect report (props ota_state) and its ack pass
        part("idle and memory", part_idle_memory, d, cloud)
        part("idle with mDNS traffic", part_idle_mdns, d, cloud)
        pin(ONE_CPU, 0, d.p.pid, cloud.p.pid)
        part("round trip", part_rtt, d)
        part("LAN", section_lan, d)
        pin(ALL_CPUS, 0, d.p.pid, cloud.p.pid)
        part("throughput", part_tput, d)
    finally:
        pin(ALL_CPUS)
        if d:
            d.close()
        cloud.close()


def split_cpus():
    """(device CPU, peer CPU) for the idle window, or None on a single CPU."""
    if len(ALL_CPUS) < 2:
        return None
    dev = min(ONE_CPU) if ONE_CPU else max(ALL_CPUS)
    return {dev}, {min(c for c in ALL_CPUS if c != dev)}


def part_idle_memory(d, cloud):
    pid = d.p.pid
    mosq = None
    # The device side (daemon, mosquitto) on one CPU, its peers (fake cloud, the MQTT client in this
    # harness) on another, as a real network puts them: then the pong comes after the daemon went back
    # to sleep and is a wakeup of its own. A peer on the daemon's CPU preempts it instead (one voluntary
    # plus one involuntary switch), and so does one that the scheduler moves there under load.
    cpus = split_cpus()
    if cpus:
        pin(cpus[0], pid)
        pin(cpus[1], 0, cloud.p.pid)
    try:
        base_fds = fd_count(pid)
        rss0, hwm0 = mem_kib(pid)

        # -- idle wakeups, mosquitto idle over the same window
        keepalive = 20.0
        exe = find_tool("mosquitto")
        mosq_err = None
        if exe:
            try:
                mosq = Mosquitto(exe, int(keepalive))
                if cpus:
                    pin(cpus[0], mosq.p.pid)
            except (Broken, OSError) as e:
                mosq_err = "mosquitto did not serve: %s" % e
        say("idle window: %.0f s (BENCH_IDLE_SECS), daemon connected%s" %
            (IDLE_SECS, " and mosquitto with one client" if mosq else ""))
        noise = Noise(pinned=False)
        noise.where = ("daemon and mosquitto on CPU %d, fake cloud and MQTT client on CPU %d"
                       % (min(cpus[0]), min(cpus[1]))) if cpus else "one CPU"
        v0, i0 = switches(pid)
        m0 = switches(mosq.p.pid) if mosq else None
        t0 = time.monotonic()
        time.sleep(IDLE_SECS)
        secs = time.monotonic() - t0
        v1, i1 = switches(pid)
        m1 = switches(mosq.p.pid) if mosq else None
        cloud.check("the idle window")
        per_min = (v1 - v0) * 60.0 / secs
        floor = 2 * 60.0 / keepalive
        mosq_min = (m1[0] - m0[0]) * 60.0 / secs if mosq else None
        how = ("voluntary_ctxt_switches delta of every thread (/proc/PID/task/*/status) over %.0f s, "
               "connected, idle, 0 local clients, keepalive %.0f s, mDNS on (%s), no mDNS traffic sent: "
               "%d sleeps ended (%d involuntary)"
               % (secs, keepalive, mdns_said(d.text), v1 - v0, i1 - i0)) + noise.text()
        if mosq:
            figure("wakeups, connected idle (vs mosquitto)", per_min, "/min", mosq_min,
                   how + "; reference: mosquitto with one MQTT client pinging every %.0f s, same window: "
                   "%d switches" % (keepalive, m1[0] - m0[0]))
        else:
            # The value itself is in the next row; this one exists for its reference.
            skipped("wakeups, connected idle (vs mosquitto)", "/min",
                    mosq_err or "mosquitto not installed")
        figure("wakeups, connected idle (vs keepalive floor)", per_min, "/min", floor,
               how + "; reference: the floor, a timer wake and a pong per keepalive interval")

        # -- memory, 0 and 20 clients
        mrss = mhwm = None
        if mosq:
            mrss, mhwm = mem_kib(mosq.p.pid)
            MOSQ_MEM.update(rss=mrss, hwm=mhwm)
        ref_how = ("reference: mosquitto %s with one idle client" % mosquitto_version(exe)) if mosq else \
            ("SKIP reference: " + (mosq_err or "mosquitto not installed"))
        figure("memory: VmRSS, connected idle, 0 clients", rss0, "KiB", mrss,
               "/proc/PID/status of target/release/miio_client (glibc host build), 2 s after "
               "cloud_connected; " + ref_how)
        figure("memory: VmHWM, connected idle, 0 clients", hwm0, "KiB", mhwm,
               "peak RSS since exec, same moment; " + ref_how)
        rss20, hwm20 = with_clients(pid, d.local)
        figure("memory: VmRSS, connected idle, 20 clients", rss20, "KiB", mrss,
               "20 local clients connected, each sent one report and got its ack, 1 s later; " + ref_how)
        figure("memory: VmHWM, connected idle, 20 clients", hwm20, "KiB", mhwm,
               "peak RSS since exec at that moment; " + ref_how)
        if mosq:
            mosq.close()
            mosq = None
        wait_for(lambda: fd_count(pid) <= base_fds, 10, "the daemon to close the 20 clients")
    finally:
        pin(ALL_CPUS, 0, pid, cloud.p.pid)
        if mosq:
            mosq.close()


MDNS_GROUP = "224.0.0.251"
MDNS_PORT = 5353


def mdns_query(name, qid):
    """An mDNS query (RFC 6762) with one PTR question for `name`, class IN, QM."""
    msg = struct.pack(">HHHHHH", qid, 0, 1, 0, 0, 0)
    for label in name.split("."):
        msg += bytes([len(label)]) + label.encode()
    return msg + b"\x00\x00\x0c\x00\x01"


def mdns_sender():
    """A UDP socket that sends to 224.0.0.251 over loopback (IP_MULTICAST_IF 127.0.0.1): the group
    address and port a query on the LAN has, without a packet leaving the machine. Its source port is
    not 5353, so the daemon answers a query for its service to this socket (legacy unicast, RFC 6762
    6.7)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1"))
    s.setblocking(False)
    return s


def mdns_window(pid, sock, query, secs):
    """Sends `query(i)` once a second for `secs` and collects what comes back. Returns
    (sent, answers, voluntary switches of the daemon, involuntary, drops of its mDNS socket, secs)."""
    answers = []
    d0 = udp_socket_drops(pid, MDNS_PORT)
    v0, i0 = switches(pid)
    t0 = time.monotonic()
    sent = 0
    while sent < secs:
        sock.sendto(query(sent), (MDNS_GROUP, MDNS_PORT))
        sent += 1
        time.sleep(max(0.0, t0 + sent - time.monotonic()))
        while True:
            try:
                answers.append(sock.recv(9000))
            except BlockingIOError:
                break
    took = time.monotonic() - t0
    v1, i1 = switches(pid)
    time.sleep(0.2)  # the last query's drop is counted by then
    d1 = udp_socket_drops(pid, MDNS_PORT)
    return sent, answers, v1 - v0, i1 - i0, d1 - d0, took


def part_idle_mdns(d, cloud):
    """The idle window again with one foreign mDNS query a second (a name the daemon does not answer,
    which its socket filter should drop in the kernel), then a shorter window with one query a second
    for its own service (each should wake it and get an answer), as a check that the traffic reaches
    it at all."""
    foreign_name = "wakeups, connected idle, 1 foreign mDNS query/s"
    ours_name = "wakeups, connected, 1 answered mDNS query/s (_miio._udp)"
    pid = d.p.pid
    keepalive = 20.0
    floor = 2 * 60.0 / keepalive
    mdns = mdns_said(d.text)
    if udp_socket_drops(pid, MDNS_PORT) is None:
        for n in (foreign_name, ours_name):
            failed(n, "/min", "the daemon has no UDP socket on %d, mDNS on by default: %s" % (MDNS_PORT, mdns))
        return
    cpus = split_cpus()
    if cpus:
        pin(cpus[0], pid)
        pin(cpus[1], 0, cloud.p.pid)
    tx = mdns_sender()
    try:
        check_secs = int(max(5, min(30, IDLE_SECS / 4)))
        others = udp_sockets_on(MDNS_PORT) - 1
        say("idle window with one foreign mDNS query a second: %.0f s (BENCH_IDLE_SECS), then %d s "
            "of one _miio._udp query a second" % (IDLE_SECS, check_secs))
        noise = Noise(pinned=False)
        noise.where = ("daemon on CPU %d, fake cloud and the query sender on CPU %d"
                       % (min(cpus[0]), min(cpus[1]))) if cpus else "one CPU"
        foreign = mdns_query("_googlecast._tcp.local", 0)
        sent, got, vol, invol, drops, secs = mdns_window(pid, tx, lambda i: foreign, int(IDLE_SECS))
        cloud.check("the window with foreign mDNS queries")
        f_noise = noise.text()
        noise = Noise(pinned=False)
        noise.where = ("daemon on CPU %d, fake cloud and the query sender on CPU %d"
                       % (min(cpus[0]), min(cpus[1]))) if cpus else "one CPU"
        want = b"_miio%d" % DID
        q_sent, answers, q_vol, q_invol, q_drops, q_secs = mdns_window(
            pid, tx, lambda i: mdns_query("_miio._udp.local", 1000 + i), check_secs)
        cloud.check("the window with _miio._udp queries")
        ours = [a for a in answers if want in a]
        if not ours:
            raise Broken("no answer naming %r to %d _miio._udp.local queries sent to %s:%d over "
                         "loopback (%d other answers): the queries may not reach the daemon"
                         % (want, q_sent, MDNS_GROUP, MDNS_PORT, len(answers) - len(ours)))
        where = ("sent from 127.0.0.1 to %s:%d with IP_MULTICAST_IF 127.0.0.1 (multicast over "
                 "loopback: the group and port of the LAN, no packet leaves the machine), the daemon "
                 "with mDNS on (%s; %d other socket(s) on this machine share port %d and get the "
                 "queries too)" % (MDNS_GROUP, MDNS_PORT, mdns, others, MDNS_PORT))
        check = ("check that such traffic reaches the daemon and would wake it: %d queries for "
                 "_miio._udp.local PTR sent the same way over %.0f s woke it %.1f times a minute and got "
                 "%d answers naming did %d (row 'wakeups, connected, 1 answered mDNS query/s')"
                 % (q_sent, q_secs, q_vol * 60.0 / q_secs, len(ours), DID))
        figure(foreign_name, vol * 60.0 / secs, "/min", floor,
               "voluntary_ctxt_switches delta of every thread over %.0f s, connected, idle, 0 local "
               "clients, keepalive %.0f s, while one mDNS query for _googlecast._tcp.local PTR (a name "
               "it does not answer) came each second: %d sleeps ended (%d involuntary); %d queries %s. "
               "Delivered: the drops count of the daemon's own mDNS socket in /proc/net/udp (datagrams "
               "the kernel delivered to that socket and did not queue, which is what its socket filter "
               "refusing them does) rose by %d over the window, %d answers came back. %s; reference: "
               "the keepalive floor, a timer wake and a pong per keepalive interval, the goal for "
               "idle with or without foreign traffic"
               % (secs, keepalive, vol, invol, sent, where, drops, len(got), check) + f_noise)
        figure(ours_name, q_vol * 60.0 / q_secs, "/min", floor + 60.0,
               "voluntary_ctxt_switches delta over %.0f s while one query for _miio._udp.local PTR (the "
               "daemon's service; a new id each) came each second, %s: %d sleeps ended (%d "
               "involuntary), %d queries, %d answers naming did %d (%d other answers); its socket's "
               "drops count rose by %d; reference: the keepalive floor plus one wake per query"
               % (q_secs, where, q_vol, q_invol, q_sent, len(ours), DID, len(answers) - len(ours),
                  q_drops, ) + noise.text())
    finally:
        tx.close()
        pin(ALL_CPUS, 0, pid, cloud.p.pid)


def with_clients(pid, port):
    """(VmRSS, VmHWM) in KiB with CLIENTS local clients connected, each having sent one report and got
    its ack, 1 s later. The clients are closed afterwards."""
    socks = []
    try:
        for i in range(CLIENTS):
            socks.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        for i, s in enumerate(socks):
            s.sendall(b'{"id":%d,"method":"props","params":{"power":"on","client":%d}}' % (i + 1, i))
        for s in socks:
            got = b""
            while b"}" not in got:
                chunk = s.recv(4096)
                if not chunk:
                    raise Broken("the daemon closed a local client: %r" % got)
                got += chunk
            if b'"result"' not in got:
                raise Broken("a report of the %d clients was not acked: %r" % (CLIENTS, got))
        time.sleep(1.0)
        return mem_kib(pid)
    finally:
        for s in socks:
            s.close()


def part(name, fn, *args):
    """One measurement of a section: a broken one is a FAILED row, the next still runs."""
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001  (any break of the harness becomes a FAILED row)
        broke(name, e)


def broke(name, e):
    if not isinstance(e, Broken):
        traceback.print_exc()
    say("%s broke: %s" % (name, e))
    failed(name, "", "%s: %s" % (type(e).__name__, e))


def interleaved(rounds, measure, *targets):
    """Runs `measure(target, round)` for every target in every round, alternating the order (A B, B A,
    ...), so that a load change on a shared machine hits the value and its reference alike."""
    out = {t: [] for t in targets}
    for r in range(rounds):
        for t in (targets if r % 2 == 0 else targets[::-1]):
            out[t].append(measure(t, r))
    return out


def part_rtt(d):
    rounds = ROUNDS
    chunk = max(1, RTT_N // rounds)
    warm = 20
    say("report round trip: %d reports, one client, daemon and bare relay alternating in %d rounds"
        % (chunk * rounds, rounds))
    noise = Noise()
    relay = Relay()
    try:
        ports = {"daemon": d.local, "relay": relay.port}

        def measure(t, r):
            path = os.path.join(RUN, "rtt-%s-%d.txt" % (t, r))
            res = load(ports[t], count=chunk + warm, warmup=warm, **{"lat-out": path})
            check_load(res, "%s round trip" % t)
            with open(path) as f:
                return [float(x) for x in f.read().split()]
        got = interleaved(rounds, measure, "daemon", "relay")
    finally:
        relay.close()
    dv = [x for c in got["daemon"] for x in c]
    rv = [x for c in got["relay"] for x in c]
    how = ("one local client on 54322 (benchkit load), %d reports of %d bytes one at a time, send to "
           "ack (%d rounds of %d, each after %d warm-up), miio_fakecloud acking; reference: benchkit "
           "relay (TCP in, UDP to a bare echo and back, TCP out), same client, rounds alternating"
           % (len(dv), REPORT_LEN, rounds, chunk, warm)) + noise.text()
    figure("report round trip p50", pct(dv, 0.50), "us", pct(rv, 0.50), how)
    figure("report round trip p99", pct(dv, 0.99), "us", pct(rv, 0.99), how)


CPU_TIME_NAME = "CPU time per report, %d clients pipelining" % CLIENTS


def part_tput(d):
    pid = d.p.pid
    rounds = min(ROUNDS, 3)
    secs = TPUT_SECS / rounds
    say("throughput: %d clients x %d in flight, %.0f s (BENCH_TPUT_SECS) each for the daemon and the "
        "relay, in %d alternating rounds" % (CLIENTS, WINDOW, TPUT_SECS, rounds))
    noise = Noise(pinned=False)
    relay = Relay()
    try:
        ports = {"daemon": d.local, "relay": relay.port}
        # The CPU time of the server under load (the daemon, or the relay alone: not the fake cloud,
        # the echo or the clients), sampled by the load client at the start and end of its window.
        pids = {"daemon": pid, "relay": relay.relay.pid}
        got = interleaved(rounds, lambda t, r: load(ports[t], clients=CLIENTS, window=WINDOW,
                                                     secs=secs, drain=15, **{"cpu-pid": pids[t]}),
                          "daemon", "relay")
    finally:
        relay.close()
    for t in got:
        for res in got[t]:
            if res.get("io_error"):
                raise Broken("%s throughput: %s" % (t, res["io_error"]))
    try:
        _, hwm_t = mem_kib(pid)
    except OSError:
        hwm_t = None
    tot = {t: merge_loads(got[t]) for t in got}
    figure("throughput: reports/s, %d clients pipelining" % CLIENTS, tot["daemon"]["rate"],
           "reports/s", tot["relay"]["rate"],
           "%d local clients, %d reports in flight each, %.0f s in %d rounds alternating with the "
           "reference, acks counted in the window; daemon: %s; its VmHWM after it %s KiB; reference "
           "benchkit relay: %s" % (CLIENTS, WINDOW, TPUT_SECS, rounds, load_summary(tot["daemon"]),
                                   hwm_t, load_summary(tot["relay"])) + noise.text())
    cpu = {}
    for t in got:
        ticks = sum(r.get("cpu_ticks") or 0 for r in got[t])
        acks = sum(r.get("ok_in_window") or 0 for r in got[t])
        if not acks:
            raise Broken("%s: no ack in the throughput window" % t)
        cpu[t] = (ticks, acks, ticks / os.sysconf("SC_CLK_TCK") * 1e6 / acks)
    figure(CPU_TIME_NAME, cpu["daemon"][2], "us", cpu["relay"][2],
           "utime + stime of the daemon process (/proc/PID/stat, all threads) over the throughput "
           "windows above (%d clients, %d in flight each, %.0f s in %d rounds), sampled by the load "
           "client at each window's start and end, over the acks counted in those windows: %d ticks "
           "of 1/%d s, %d acks; reference: the same for the benchkit relay process over its rounds, "
           "%d ticks, %d acks; neither counts its peers (fake cloud, echo, clients); goal 1.3x or less"
           % (CLIENTS, WINDOW, TPUT_SECS, rounds, cpu["daemon"][0], os.sysconf("SC_CLK_TCK"),
              cpu["daemon"][1], cpu["relay"][0], cpu["relay"][1]) + noise.text())


def merge_loads(results):
    m = {k: sum(r[k] for r in results) for k in ("sent", "ok", "errors", "lost", "unknown", "secs")}
    m["rate"] = sum(r["rate"] * r["secs"] for r in results) / max(m["secs"], 1e-9)
    m["first_error"] = next((r["first_error"] for r in results if r.get("first_error")), None)
    m["io_error"] = next((r["io_error"] for r in results if r.get("io_error")), None)
    return m


MOSQ_MEM = {}
REPORT_LEN = 0


def mosquitto_version(exe):
    try:
        p = subprocess.run([exe, "-h"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           timeout=5, stdin=subprocess.DEVNULL)
        first = p.stdout.splitlines()[0]
        return first.split("version")[-1].strip() if "version" in first else ""
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return ""


def check_load(r, what):
    if r.get("io_error"):
        raise Broken("%s: %s" % (what, r["io_error"]))
    if r["ok"] == 0:
        raise Broken("%s: no report acked; first error %s" % (what, r.get("first_error")))


def load_summary(r):
    s = "%d sent, %d acked, %d errors, %d lost" % (r["sent"], r["ok"], r["errors"], r["lost"])
    if r.get("unknown"):
        s += ", %d answers with an unknown id" % r["unknown"]
    if r.get("first_error"):
        s += ", first error %s" % r["first_error"]
    if r.get("io_error"):
        s += ", I/O error: %s" % r["io_error"]
    return s


def udp_rtts(port, packets):
    """Send each packet, wait for one answer; returns the round trips in us and the answers."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect(("127.0.0.1", port))
    s.settimeout(2.0)
    out, answers = [], []
    try:
        for pkt in packets:
            t0 = time.perf_counter_ns()
            s.send(pkt)
            try:
                ans = s.recv(65536)
            except socket.timeout:
                raise Broken("no UDP answer within 2 s from port %d" % port)
            out.append((time.perf_counter_ns() - t0) / 1000.0)
            answers.append(ans)
    finally:
        s.close()
    return out, answers


def pct(v, p):
    v = sorted(v)
    return v[max(0, min(len(v), int(-(-p * len(v) // 1))) - 1)]


def section_lan(d):
    rounds = ROUNDS
    chunk = max(1, LAN_N // rounds)
    warm = 10
    say("LAN: %d hellos and %d miIO.info, daemon and a bare UDP echo alternating in %d rounds"
        % (chunk * rounds, chunk * rounds, rounds))
    hello = bytes.fromhex("21310020") + b"\xff" * 28
    noise = Noise()
    echo, eport = kit_server(["echo"])
    ports = {"daemon": d.lan, "echo": eport}
    try:
        _, answers = udp_rtts(d.lan, [hello])
        reply = answers[0]
        if len(reply) != 32 or reply[:2] != b"\x21\x31":
            raise Broken("hello answer is not a 32-byte miio packet: %s" % reply.hex())
        did, stamp = struct.unpack(">II", reply[8:16])
        got = interleaved(rounds, lambda t, r: udp_rtts(ports[t], [hello] * (chunk + warm))[0][warm:],
                          "daemon", "echo")
        h = [x for c in got["daemon"] for x in c]
        e = [x for c in got["echo"] for x in c]
        how = ("raw UDP client (Python, perf_counter_ns around send and recv), %d hellos in %d rounds "
               "(each after %d warm-up); reference: the same client against a bare UDP echo (benchkit "
               "echo), rounds alternating" % (len(h), rounds, warm)) + noise.text()
        figure("LAN hello -> reply p50", pct(h, 0.50), "us", pct(e, 0.50), how)
        figure("LAN hello -> reply p99", pct(h, 0.99), "us", pct(e, 0.99), how)
        try:
            sys.path.insert(0, os.path.join(ROOT, "tests", "pycloud"))
            import ocloud  # noqa: E402  (needs the cryptography package)
        except ImportError as exc:
            for n in ("LAN miIO.info round trip p50", "LAN miIO.info round trip p99"):
                skipped(n, "us", "python3-cryptography (import ocloud: %s)" % exc)
            return
        tok = TOKEN.encode()
        ids = iter(range(1, 10 ** 9))
        sizes = []

        def info(t, r):
            # A new id for every request: the daemon answers a repeated packet from its replay cache.
            want = [next(ids) for _ in range(chunk + warm)]
            pkts = [ocloud.seal_text(did, stamp + 1, tok,
                                     '{"id":%d,"method":"miIO.info","params":[]}' % i) for i in want]
            rtts, answers = udp_rtts(ports[t], pkts)
            if t == "daemon":
                for i, a in zip(want, answers):
                    ocloud.check_frame(a)
                    obj = ocloud.decode_text(ocloud.open_data(a, tok))[0]
                    if obj.get("id") != i or "result" not in obj:
                        raise Broken("miIO.info answer for id %d is wrong: %s" % (i, obj))
                sizes[:] = [len(pkts[0]), len(answers[0])]
            return rtts[warm:]
        got = interleaved(rounds, info, "daemon", "echo")
        m = [x for c in got["daemon"] for x in c]
        e = [x for c in got["echo"] for x in c]
        how = ("raw UDP client, %d miIO.info requests (%d bytes, sealed with the token beforehand, a "
               "new id each; the %d-byte answers decrypted and checked afterwards) in %d rounds; "
               "reference: the same packets against a bare UDP echo, rounds alternating"
               % (len(m), sizes[0], sizes[1], rounds)) + noise.text()
        figure("LAN miIO.info round trip p50", pct(m, 0.50), "us", pct(e, 0.50), how)
        figure("LAN miIO.info round trip p99", pct(m, 0.99), "us", pct(e, 0.99), how)
    finally:
        stop(echo)


def section_startup(opts, grace0):
    """exec -> STATE_CLOUD_CONNECTED with the defaults (mDNS on, the default helper grace: no helper
    script here, so the daemon waits the grace out and reads its files) and with `--helper-grace 0`,
    interleaved with the reference, exec -> first byte of `miio_client -v`."""
    say("start-up: exec -> cloud_connected, median of %d each, default helper grace and "
        "--helper-grace 0, against exec -> -v" % STARTS)
    pin(ONE_CPU)
    cloud = Cloud()
    noise = Noise()
    kinds = ["default", "ref"] + (["grace0"] if grace0 else [])
    runs = {k: [] for k in kinds}
    files_at = []  # exec -> the "using data files" line, default grace
    mdns = ""
    try:
        def measure(k, r):
            if k == "ref":
                t0 = time.perf_counter()
                p = spawn([BIN, "-v"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                ready, _, _ = select.select([p.stderr], [], [], 10)
                if not ready or not p.stderr.read(1):
                    stop(p)
                    raise Broken("miio_client -v printed nothing on stderr")
                ms = (time.perf_counter() - t0) * 1000.0
                p.stderr.close()
                stop(p)
                return ms
            d = Daemon(cloud.port, opts + (grace0 if k == "grace0" else []), "startup-" + k,
                       pipe=True)
            try:
                if k == "default":
                    files_at.append((d.wait_pipe("using data files", 20) - d.t0) * 1000.0)
                ms = (d.wait_pipe("STATE_CLOUD_CONNECTED", 20) - d.t0) * 1000.0
                nonlocal mdns
                mdns = mdns_said(d.text)
                return ms
            finally:
                d.close()
        for r in range(STARTS):
            for k in (kinds if r % 2 == 0 else kinds[::-1]):
                runs[k].append(measure(k, r))
        ref = runs["ref"]
        ref_how = ("Popen to the first byte of `miio_client -v` on stderr (median %.2f ms, min %.2f, "
                   "max %.2f)" % (statistics.median(ref), min(ref), max(ref)))
        common = ("Popen to the read that brings the STATE_CLOUD_CONNECTED log line on the daemon's "
                  "stdout, miio_fakecloud on loopback, mDNS on (%s), no helper script, the three kinds "
                  "interleaved" % mdns)
        dv = runs["default"]
        figure("start-up: exec -> cloud_connected, default helper grace", statistics.median(dv), "ms",
               HELPER_GRACE_S * 1000.0,
               "median of %d (min %.2f, max %.2f ms): %s, default --helper-grace; exec -> its "
               "'No helper script? using data files' line: median %.2f ms; reference: the default "
               "helper grace, %.0f ms, the wait a daemon with no helper script makes before it reads "
               "its files (doc/LOCAL_API.md 9.5); the exec floor, %s"
               % (STARTS, min(dv), max(dv), common, statistics.median(files_at),
                  HELPER_GRACE_S * 1000.0, ref_how) + noise.text())
        if grace0:
            gv = runs["grace0"]
            figure("start-up: exec -> cloud_connected, --helper-grace 0", statistics.median(gv), "ms",
                   statistics.median(ref),
                   "median of %d (min %.2f, max %.2f ms): %s, --helper-grace 0 (the data files at once); "
                   "reference: %s" % (STARTS, min(gv), max(gv), common, ref_how) + noise.text())
        else:
            skipped("start-up: exec -> cloud_connected, --helper-grace 0", "ms",
                    "`miio_client -h` does not list --helper-grace")
    finally:
        pin(ALL_CPUS)
        cloud.close()


def section_static_memory(opts):
    """The board binary, where memory is the question: the static x86_64 musl build's VmRSS and VmHWM,
    connected, with the defaults (mDNS on, default helper grace), with 0 and with CLIENTS clients."""
    names = [("memory: VmRSS, static x86_64 musl, connected idle", "rss"),
             ("memory: VmHWM, static x86_64 musl, connected idle", "hwm"),
             ("memory: VmRSS, static x86_64 musl, %d clients" % CLIENTS, "rss"),
             ("memory: VmHWM, static x86_64 musl, %d clients" % CLIENTS, "hwm")]
    out, built = static_binary("x86_64")
    if out is None:
        for name, _ in names:
            (skipped if built[0] == "SKIP" else failed)(name, "KiB", built[1])
        return
    cloud = Cloud()
    try:
        d = Daemon(cloud.port, opts, "static", binary=out)
        try:
            d.connected()
            time.sleep(2.0)
            rss, hwm = mem_kib(d.p.pid)
            rss20, hwm20 = with_clients(d.p.pid, d.local)
            mdns = mdns_said(d.text)
        finally:
            d.close()
    finally:
        cloud.close()
    ref = ("reference: mosquitto with one idle client, VmRSS %d / VmHWM %d KiB (session section)"
           % (MOSQ_MEM["rss"], MOSQ_MEM["hwm"])) if MOSQ_MEM else \
        "SKIP reference: mosquitto not measured (not installed, or the session section did not run)"
    # The only memory goal the project states is the hardening issue's, for the hostile load (its own
    # row); none is stated for these, so they keep mosquitto as their reference.
    common = ("target/static/x86_64/miio_client (%s; the board binary, no fakecloud applet) with the "
              "defaults: mDNS on (%s), default helper grace; /proc/PID/status" % (built, mdns))
    when = ["0 clients, 2 s after cloud_connected", "0 clients, 2 s after cloud_connected: peak RSS since exec",
            "%d local clients connected, each sent one report and got its ack, 1 s later" % CLIENTS,
            "%d local clients, as above: peak RSS since exec" % CLIENTS]
    for (name, kind), value, w in zip(names, (rss, hwm, rss20, hwm20), when):
        figure(name, value, "KiB", MOSQ_MEM.get(kind), "%s, %s; %s" % (common, w, ref))


# -- miio_agent (L§10) -------------------------------------------------------------------------------

class AgentProc:
    """miio_agent in the foreground in front of a daemon, logging at debug level (its registration
    lines) to a file; its port (it binds port 0) is read from its `bound:` line."""

    def __init__(self, daemon_port, tag, binary=BIN):
        self.log = os.path.join(RUN, tag + ".log")
        if os.path.exists(self.log):
            os.unlink(self.log)
        self.p = spawn([binary, "miio_agent", "--port", "0", "--daemon-port", str(daemon_port),
                        "-l", "3", "-L", self.log], stdout=subprocess.DEVNULL,
                       stderr=open(os.path.join(RUN, tag + ".err"), "wb"))
        self.port = wait_for(self._port, 10, "the agent's bound: line")
        wait_for(lambda: "connected to the daemon" in self.text(), 10, "the agent to reach the daemon")

    def text(self):
        if self.p.poll() is not None:
            raise Broken("the agent exited (status %s)" % self.p.returncode)
        try:
            with open(self.log, encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def _port(self):
        m = re.search(r"bound: agent tcp 127\.0\.0\.1:(\d+)", self.text())
        return int(m.group(1)) if m else None

    def apps(self, n):
        """`n` applications, each registered for its own method; returns their sockets."""
        socks = []
        for i in range(n):
            s = socket.create_connection(("127.0.0.1", self.port), timeout=10)
            s.sendall(b'{"method":"register","key":"bench_method_%d"}' % i)
            socks.append(s)
        wait_for(lambda: self.text().count(" registered ") >= n, 10, "%d registrations" % n)
        return socks

    def close(self):
        stop(self.p)


def has_agent(binary):
    p = subprocess.run([binary, "--list-applets"], stdout=subprocess.PIPE, text=True,
                       stdin=subprocess.DEVNULL)
    return "miio_agent" in p.stdout.split()


AGENT_ROWS = ["agent: wakeups, idle, 2 registered apps", "agent: VmRSS, static x86_64 musl, 2 apps",
              "agent: report round trip p50", "agent: report round trip p99"]


def section_agent(opts):
    """miio_agent between applications and a connected daemon: its idle wakeups with two registered
    applications, its memory as the board binary, and a report's round trip through it beside the
    same client on 54322 directly."""
    if not has_agent(BIN):
        for n in AGENT_ROWS:
            skipped(n, "", "target/release/miio_client was built without the agent feature")
        return
    cloud = Cloud()
    d = None
    try:
        d = Daemon(cloud.port, opts, "agent-daemon")
        d.connected()
        time.sleep(2.0)
        part("agent idle", part_agent_idle, d, cloud)
        part("agent memory", part_agent_memory, d)
        pin(ONE_CPU, 0, d.p.pid, cloud.p.pid)
        part("agent round trip", part_agent_rtt, d)
    finally:
        pin(ALL_CPUS)
        if d:
            d.close()
        cloud.close()


def part_agent_idle(d, cloud):
    a = AgentProc(d.local, "agent-idle")
    socks = []
    cpus = split_cpus()
    try:
        socks = a.apps(2)
        if cpus:
            pin(cpus[0], a.p.pid, d.p.pid)
            pin(cpus[1], 0, cloud.p.pid)
        time.sleep(1.0)
        say("agent idle window: %.0f s (BENCH_IDLE_SECS), 2 registered applications" % IDLE_SECS)
        noise = Noise(pinned=False)
        if cpus:
            noise.where = ("agent and daemon on CPU %d, fake cloud on CPU %d"
                           % (min(cpus[0]), min(cpus[1])))
        v0, i0 = switches(a.p.pid)
        t0 = time.monotonic()
        time.sleep(IDLE_SECS)
        secs = time.monotonic() - t0
        v1, i1 = switches(a.p.pid)
        cloud.check("the agent's idle window")
        figure(AGENT_ROWS[0], (v1 - v0) * 60.0 / secs, "/min", 0,
               "voluntary_ctxt_switches delta of the agent (host build, every thread) over %.0f s, the "
               "same window length as the daemon's idle row; the daemon connected and idle behind it, "
               "two applications connected and registered, nothing sent: %d sleeps ended (%d "
               "involuntary); reference: 0, no tick and no deadline when idle (L§10)"
               % (secs, v1 - v0, i1 - i0) + noise.text())
    finally:
        if cpus:
            pin(ALL_CPUS, 0, d.p.pid, cloud.p.pid)
        for s in socks:
            s.close()
        a.close()


def part_agent_memory(d):
    name = AGENT_ROWS[1]
    out, built = static_binary("x86_64")
    if out is None:
        (skipped if built[0] == "SKIP" else failed)(name, "KiB", built[1])
        return
    if not has_agent(out):
        skipped(name, "KiB", "target/static/x86_64/miio_client (%s) was built without the agent "
                "feature" % built)
        return
    a = AgentProc(d.local, "agent-static", binary=out)
    socks = []
    try:
        socks = a.apps(2)
        time.sleep(1.0)
        rss, hwm = mem_kib(a.p.pid)
        figure(name, rss, "KiB", None,
               "/proc/PID/status of target/static/x86_64/miio_client run as miio_agent (%s), connected "
               "to the daemon, two applications registered, 1 s later (VmHWM %d KiB); the project "
               "states no goal for it" % (built, hwm))
    finally:
        for s in socks:
            s.close()
        a.close()


def part_agent_rtt(d):
    rounds = ROUNDS
    chunk = max(1, RTT_N // rounds)
    warm = 20
    a = AgentProc(d.local, "agent-rtt")
    try:
        pin(ONE_CPU, a.p.pid)
        say("agent round trip: %d reports, one client, through the agent and on 54322 directly, "
            "alternating in %d rounds" % (chunk * rounds, rounds))
        noise = Noise()
        ports = {"agent": a.port, "direct": d.local}

        def measure(t, r):
            path = os.path.join(RUN, "agent-rtt-%s-%d.txt" % (t, r))
            res = load(ports[t], count=chunk + warm, warmup=warm, **{"lat-out": path})
            check_load(res, "%s round trip" % t)
            with open(path) as f:
                return [float(x) for x in f.read().split()]
        got = interleaved(rounds, measure, "agent", "direct")
    finally:
        a.close()
    av = [x for c in got["agent"] for x in c]
    dv = [x for c in got["direct"] for x in c]
    how = ("one application (benchkit load) sends %d reports of %d bytes one at a time through "
           "miio_agent (host build), send to ack (%d rounds of %d, each after %d warm-up), "
           "miio_fakecloud acking; reference: the same client on the daemon's 54322 directly, same "
           "run, rounds alternating" % (len(av), REPORT_LEN, rounds, chunk, warm)) + noise.text()
    figure(AGENT_ROWS[2], pct(av, 0.50), "us", pct(dv, 0.50), how)
    figure(AGENT_ROWS[3], pct(av, 0.99), "us", pct(dv, 0.99), how)


# -- CPU: instructions per report ---------------------------------------------------------------------

def counter_tool():
    """('valgrind', path) or ('perf', path) or (None, why)."""
    vg = find_tool("valgrind")
    if vg:
        return "valgrind", vg
    perf = find_tool("perf")
    if perf:
        p = subprocess.run([perf, "stat", "-x,", "-e", "instructions:u", "true"], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL)
        first = (p.stdout.strip().splitlines() or [""])[-1].split(",")[0]
        if first.isdigit():
            return "perf", perf
        return None, "valgrind (and perf here cannot count instructions:u: %r)" % p.stdout.strip()[:80]
    return None, "valgrind (or perf)"


def wrapped(tool, exe, outfile):
    if tool == "valgrind":
        return [exe, "--tool=callgrind", "-q", "--callgrind-out-file=" + outfile]
    return [exe, "stat", "-x,", "-e", "instructions:u", "-o", outfile, "--"]


def count_of(tool, outfile):
    with open(outfile) as f:
        text = f.read()
    for line in text.splitlines():
        if tool == "valgrind" and line.startswith(("totals:", "summary:")):
            return int(line.split()[1])
        if tool == "perf" and ",instructions" in line:
            return int(line.split(",")[0])
    raise Broken("no instruction count in %s" % outfile)


def measured_pid(tool, p):
    """The pid to signal: valgrind runs the program in its own process, perf forks it."""
    if tool == "valgrind":
        return p.pid

    def child():
        try:
            with open("/proc/%d/task/%d/children" % (p.pid, p.pid)) as f:
                kids = f.read().split()
            return int(kids[0]) if kids else None
        except OSError:
            return None
    return wait_for(child, 10, "perf to start the daemon")


def daemon_instructions(tool, exe, opts, n, tag, binary=None):
    cloud = Cloud()
    out = os.path.join(RUN, "%s-%s.out" % (tool, tag))
    try:
        d = Daemon(cloud.port, opts, "cpu-" + tag, wrap=wrapped(tool, exe, out),
                   binary=binary or CPU_BIN or BIN)
        try:
            d.connected(limit=120)
            r = load(d.local, count=n)
            if n and r["ok"] != n:
                raise Broken("%d of %d reports acked under %s: %s" % (r["ok"], n, tool, load_summary(r)))
            pid = measured_pid(tool, d.p)
            os.kill(pid, signal.SIGTERM)
            d.p.wait(120)
        finally:
            d.close()
        return count_of(tool, out)
    finally:
        cloud.close()


def kit_instructions(tool, exe, n):
    out = os.path.join(RUN, "%s-crypto-%d.out" % (tool, n))
    p = subprocess.run(wrapped(tool, exe, out) + [KIT, "crypto", str(n)], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True, timeout=600, stdin=subprocess.DEVNULL)
    if p.returncode != 0:
        raise Broken("benchkit crypto under %s: %s" % (tool, p.stderr.strip()[-300:]))
    return count_of(tool, out)


def section_cpu(opts):
    """Instructions per report of the host release build (or BENCH_CPU_BIN) and, unless
    BENCH_CPU_BIN is set, of the static x86_64 board build, each against the one crate floor."""
    name = "CPU: user instructions per report"
    sname = "CPU: user instructions per report, static x86_64 musl"
    tool, exe = counter_tool()
    if not tool:
        skipped(name, "instr", exe)
        if not CPU_BIN:
            skipped(sname, "instr", exe)
        return
    say("CPU: %d reports under %s, and a baseline run with none" % (CPU_N, tool))
    ref_n = kit_instructions(tool, exe, CPU_N)
    ref_0 = kit_instructions(tool, exe, 0)
    ref = (ref_n - ref_0) / CPU_N

    def row(row_name, binary, label, tag):
        with_n = daemon_instructions(tool, exe, opts, CPU_N, tag + "n", binary)
        base = daemon_instructions(tool, exe, opts, 0, tag + "0", binary)
        per = (with_n - base) / CPU_N
        figure(row_name, per, "instr", ref,
               "daemon binary %s; %s: whole daemon run with %d reports sent one at a time and acked "
               "(%d instr) minus the same run with a client that sends none (%d), over %d (goal: "
               "25,000 or less); reference: the crate floor, benchkit crypto: a scan for \"id\" and "
               "\"method\", the seal (NUL, pad, AES-128-CBC, MD5) of the same %d-byte report and the "
               "open (MD5, decrypt, unpad) of its 31-byte ack, key schedule made once, same crates "
               "and release profile as the daemon, (%d - %d) / %d"
               % (label, "callgrind Ir" if tool == "valgrind" else "perf instructions:u", CPU_N,
                  with_n, base, CPU_N, REPORT_LEN, ref_n, ref_0, CPU_N))

    row(name, CPU_BIN or BIN, CPU_BIN or "the host release build (glibc)", "")
    if CPU_BIN:
        return
    out, built = static_binary("x86_64")
    if out is None:
        (skipped if built[0] == "SKIP" else failed)(sname, "instr", built[1])
        return
    row(sname, out, "%s, the board build (musl, std built for size)" % out, "static-")


# -- syscalls per report ------------------------------------------------------------------------------

SYSCALL_NAME = "syscalls per report"


def strace_counts(path):
    """{syscall: (calls, errors)} from the table of `strace -c`."""
    out = {}
    with open(path) as f:
        for line in f:
            v = line.split()
            if len(v) < 5 or v[-1] == "total":
                continue
            try:
                float(v[0])
                calls = int(v[3])
                errors = int(v[4]) if len(v) >= 6 else 0
            except ValueError:
                continue
            out[v[-1]] = (calls, errors)
    return out


def strace_window(strace, pid, tag, work, min_secs=0.0):
    """`strace -c -f -p PID` attached around `work()`, kept on until `min_secs` have passed, then
    detached with SIGINT. Returns ({syscall: (calls, errors)}, seconds traced)."""
    out = os.path.join(RUN, "strace-%s.txt" % tag)
    p = spawn([strace, "-c", "-f", "-o", out, "-p", str(pid)], stdout=subprocess.DEVNULL,
              stderr=subprocess.PIPE)
    said = b""
    end = time.monotonic() + 10
    while b"attached" not in said:
        ready, _, _ = select.select([p.stderr], [], [], max(0.0, end - time.monotonic()))
        chunk = os.read(p.stderr.fileno(), 4096) if ready else b""
        if not chunk:
            stop(p)
            raise Broken("strace did not attach to %d: %r" % (pid, said.decode(errors="replace")[-300:]))
        said += chunk
    time.sleep(0.2)  # the other threads of a threaded reference
    t0 = time.monotonic()
    work()
    time.sleep(max(0.0, t0 + min_secs - time.monotonic()))
    secs = time.monotonic() - t0
    os.kill(p.pid, signal.SIGINT)
    try:
        p.wait(30)
    except subprocess.TimeoutExpired:
        stop(p)
        raise Broken("strace did not detach from %d" % pid)
    p.stderr.close()
    if p in PROCS:
        PROCS.remove(p)
    return strace_counts(out), secs


def per_report(with_n, base, n):
    """Calls and errors per report of each syscall, (with_n - base) / n, the busiest first."""
    names = set(with_n) | set(base)
    rows = []
    for k in names:
        c = (with_n.get(k, (0, 0))[0] - base.get(k, (0, 0))[0]) / n
        e = (with_n.get(k, (0, 0))[1] - base.get(k, (0, 0))[1]) / n
        rows.append((k, c, e))
    rows.sort(key=lambda r: -r[1])
    return sum(r[1] for r in rows), rows


def per_report_text(rows):
    shown = ["%s %.2f%s" % (k, c, " (%.2f failed)" % e if e >= 0.005 else "")
             for k, c, e in rows if abs(c) >= 0.005]
    return ", ".join(shown) or "none"


def syscalls_of(strace, pid, port, n, tag):
    """Syscalls of `pid` per report: a window in which one client sends n reports one at a time
    (each acked before the next), minus a window as long in which the same client connects, sends
    nothing and closes."""
    got = {}

    def with_n():
        got["r"] = load(port, count=n)
    calls_n, secs_n = strace_window(strace, pid, tag + "-n", with_n)
    r = got["r"]
    if r["ok"] != n:
        raise Broken("%s: %d of %d reports acked under strace: %s" % (tag, r["ok"], n, load_summary(r)))
    calls_0, secs_0 = strace_window(strace, pid, tag + "-0", lambda: load(port, count=0), secs_n)
    total, rows = per_report(calls_n, calls_0, n)
    return total, rows, (sum(c for c, _ in calls_n.values()), secs_n,
                         sum(c for c, _ in calls_0.values()), secs_0)


def section_syscalls(opts):
    """Syscalls per report: the daemon (host build, defaults) and the bare relay, each traced by
    `strace -c -f` attached while one client sends SYSCALL_N reports one at a time, minus a window as
    long with a client that sends none."""
    strace = find_tool("strace")
    if not strace:
        skipped(SYSCALL_NAME, "calls", "strace")
        return
    say("syscalls: %d reports one at a time under strace -c -f, the daemon and the bare relay, each "
        "minus a window as long without reports" % SYSCALL_N)
    pin(ONE_CPU)
    cloud = Cloud()
    relay = None
    try:
        d = Daemon(cloud.port, opts, "syscalls")
        try:
            d.connected()
            time.sleep(2.0)
            dn, drows, dwin = syscalls_of(strace, d.p.pid, d.local, SYSCALL_N, "daemon")
            mdns = mdns_said(d.text)
        finally:
            d.close()
        relay = Relay()
        rn, rrows, rwin = syscalls_of(strace, relay.relay.pid, relay.port, SYSCALL_N, "relay")
    finally:
        if relay:
            relay.close()
        pin(ALL_CPUS)
        cloud.close()
    figure(SYSCALL_NAME, dn, "calls", rn,
           "strace -c -f attached to the daemon (target/release/miio_client, the defaults: mDNS on (%s), "
           "default helper grace), connected, while one client (benchkit load) sent %d reports of %d "
           "bytes one at a time, each acked by miio_fakecloud before the next: %d calls in %.1f s, minus "
           "a window as long (%d calls in %.1f s) in which the client connected, sent nothing and "
           "closed, over %d (goal: 9 or fewer). Per report: %s. Reference: the same for benchkit relay "
           "(TCP in, UDP to a bare echo and back, TCP out; blocking, a thread per client), the same "
           "client: %d calls in %.1f s minus %d in %.1f s; per report: %s. Neither counts its peer (the "
           "fake cloud, the echo); daemon, cloud, relay and client on one CPU"
           % (mdns, SYSCALL_N, REPORT_LEN, dwin[0], dwin[1], dwin[2], dwin[3], SYSCALL_N,
              per_report_text(drows), rwin[0], rwin[1], rwin[2], rwin[3], per_report_text(rrows)))


# -- hostile local load: the board binary ------------------------------------------------------------

HOSTILE_ROWS = (("memory: VmHWM, static x86_64, hostile local load", "KiB"),
                ("hostile load: worst local.query_status round trip", "ms"),
                ("hostile load: SIGTERM to exit", "ms"),
                ("hostile load: log growth, default level", "bytes"))


def log_summary(text, n=3):
    """The most frequent messages of a stretch of the daemon's log, numbers blurred."""
    import re
    counts = {}
    for line in text.decode("utf-8", "replace").splitlines():
        msg = re.sub(r"\d+", "N", line.split("] ", 2)[-1])[:90]
        counts[msg] = counts.get(msg, 0) + 1
    top = sorted(counts.items(), key=lambda kv: -kv[1])[:n]
    return "; ".join("%dx %r" % (c, m) for m, c in top) or "nothing"


def mdns_said(log):
    """What the daemon's start-up log says of mDNS: where it bound, and its warnings (a failed bind
    or multicast join, no socket filter), if any."""
    import re
    text = log.decode("utf-8", "replace")
    m = re.search(r"mDNS (udp \S+|off)", text)
    warns = [l.split("] ", 2)[-1] for l in text.splitlines() if "mDNS:" in l]
    return "%s, %s" % ("bound " + m.group(1) if m else "no bound line",
                       "; ".join(warns) if warns else "no mDNS warning (the group was joined)")


def exit_time(p, pid):
    """Seconds from SIGTERM to the process's exit: a pidfd when the kernel has them, else polling."""
    fd = None
    if hasattr(os, "pidfd_open"):
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            fd = None
    t0 = time.perf_counter()
    os.kill(pid, signal.SIGTERM)
    if fd is not None:
        try:
            ready, _, _ = select.select([fd], [], [], 30)
            t1 = time.perf_counter()
        finally:
            os.close(fd)
        if not ready:
            raise Broken("the daemon did not exit within 30 s of SIGTERM")
        p.wait(5)
        return t1 - t0, "pidfd"
    end = t0 + 30
    while p.poll() is None:
        if time.perf_counter() > end:
            raise Broken("the daemon did not exit within 30 s of SIGTERM")
        time.sleep(0.001)
    return time.perf_counter() - t0, "waitpid polled every 1 ms"


def section_hostile():
    """The board binary (static x86_64 musl) with the options a user gets, under a hostile local load
    for BENCH_HOSTILE_SECS: one client writes `{}` as fast as it can, NEVER clients never read, the
    cloud pushes PUSH_BYTES commands PUSH_HZ times a second, and a watcher times its
    local.query_status round trips. Then SIGTERM under the same load. Each figure beside its goal."""
    out, built = static_binary("x86_64")
    if out is None:
        for name, unit in HOSTILE_ROWS:
            (skipped if built[0] == "SKIP" else failed)(name, unit, built[1])
        return
    say("hostile: %.0f s (BENCH_HOSTILE_SECS) of a `{}` flood, %d clients that never read and %d-byte "
        "cloud commands %d/s, static x86_64 build" % (HOSTILE_SECS, NEVER, PUSH_BYTES, PUSH_HZ))
    pin(ONE_CPU)
    cloud = Cloud()
    noise = None
    try:
        # The defaults a user gets (log level, mDNS on its port 5353, helper grace), except the ports
        # (free ones, the machine is shared) and the seats: NEVER + the flooder + the watcher.
        d = Daemon(cloud.port, ["--max-clients", str(NEVER + 2)], "hostile", binary=out,
                   ble=free_port(), level=None)
        pid = d.p.pid
        d.connected(limit=30)
        time.sleep(2.0)
        with open(d.log, "rb") as f:
            boot = f.read()
        mdns = mdns_said(boot)
        rss0, hwm0 = mem_kib(pid)
        noise = Noise()
        kit = spawn([KIT, "hostile", "--port", str(d.local), "--ctl", str(cloud.ctl), "--secs",
                     str(HOSTILE_SECS), "--never", str(NEVER), "--push-bytes", str(PUSH_BYTES),
                     "--push-hz", str(PUSH_HZ)], stdout=subprocess.PIPE,
                    stderr=open(os.path.join(RUN, "hostile-kit.err"), "wb"))
        rss_max = rss0
        line = b""
        end = time.monotonic() + HOSTILE_SECS + 30
        while not line.endswith(b"\n"):
            if time.monotonic() > end or kit.poll() is not None and not line:
                raise Broken("benchkit hostile gave no result (exit %s): %s" % (
                    kit.poll(), tail(os.path.join(RUN, "hostile-kit.err"), 3)))
            ready, _, _ = select.select([kit.stdout], [], [], 0.5)
            if ready:
                line += os.read(kit.stdout.fileno(), 65536)
            if d.p.poll() is not None:
                raise Broken("the daemon exited (status %s) under the load; log tail:\n%s"
                             % (d.p.returncode, tail(d.log, 8)))
            rss_max = max(rss_max, mem_kib(pid)[0])
        res = json.loads(line.split(b"\n")[0])
        rss, hwm = mem_kib(pid)
        log1 = os.path.getsize(d.log)
        with open(d.log, "rb") as f:
            f.seek(len(boot))
            window_log = f.read(log1 - len(boot))
        secs, how_timed = exit_time(d.p, pid)
        rc = d.p.returncode
        after = b""
        ready, _, _ = select.select([kit.stdout], [], [], 15)
        if ready:
            after = kit.stdout.readline()
        stop(kit)
        d.close()
        try:
            after = json.loads(after)
        except ValueError:
            after = {}
    finally:
        pin(ALL_CPUS)
        cloud.close()
    load_how = ("%.0f s, static x86_64 musl build (%s) with the options a user gets (default log level, "
                "helper grace, mDNS on port 5353: %s) but free ports and --max-clients %d; load by "
                "benchkit hostile: a client wrote `{}` back to back (%.0f MB in the window, it drained "
                "%.0f KB of commands), %d clients that never read (each sent one request; %d connections "
                "in all, %d dropped by the daemon and replaced at once), the cloud (host miio_fakecloud) "
                "pushed %d commands of %d bytes at %d/s (%d reached the watcher, %d replies got back "
                "to the cloud)" % (
                    res["secs"], built, mdns,
                    NEVER + 2, res["flood_bytes"] / 1e6, res["flood_read"] / 1e3, NEVER,
                    res["never_conns"], res["never_dropped"], res["pushed"], PUSH_BYTES, PUSH_HZ,
                    res["cmds_seen"], res["cloud_replies"]))
    if res.get("flood_end") or res.get("watch_end"):
        load_how += "; ENDED EARLY: flooder %s, watcher %s" % (res.get("flood_end"), res.get("watch_end"))
    load_how += noise.text() if noise else ""
    goal = "reference: the goal of the hardening issue, "
    figure(HOSTILE_ROWS[0][0], hwm, "KiB", GOAL_HWM_KIB,
           "VmHWM of /proc/PID/status at the end of the window (before it: %d KiB; VmRSS %d KiB at the "
           "end, %d KiB at most, sampled every 0.5 s). %s; %s< 1 MB (10^6 bytes = %.1f KiB)"
           % (hwm0, rss, rss_max, load_how, goal, GOAL_HWM_KIB))
    if res["samples"]:
        figure(HOSTILE_ROWS[1][0], res["max_us"] / 1000.0, "ms", GOAL_QUERY_MS,
               "the watcher, another local client, sent local.query_status every 10 ms and timed send "
               "to answer: %d round trips in the window, p50 %.2f ms, p99 %.2f ms, max shown (the five "
               "worst: %s ms); %d got no answer within 5 s; it answered every command it was sent. Same "
               "load; the worst is one sample and moves with the machine's other load (its share is in the "
               "VmHWM row of this section); %swithin 100 ms"
               % (res["samples"], res["p50_us"] / 1000.0, res["p99_us"] / 1000.0,
                  ", ".join("%.1f" % (x / 1000.0) for x in res.get("worst_us", [])), res["missed"], goal))
    else:
        failed(HOSTILE_ROWS[1][0], "ms", "no round trip of the watcher in the window: %s" % res)
    figure(HOSTILE_ROWS[2][0], secs * 1000.0, "ms", GOAL_TERM_MS,
           "SIGTERM at the end of the window, the load still running, to the process's exit (%s); "
           "exit status %s; the load saw the daemon gone %.2f s after the window (%s); %s< 1 s"
           % (how_timed, rc, after.get("after_window_secs", -1), "flooder: %s, watcher: %s" % (
               after.get("flood_end"), after.get("watch_end")), goal))
    figure(HOSTILE_ROWS[3][0], len(window_log), "bytes", GOAL_LOG_BYTES,
           "bytes the daemon's log (stdout, default level) grew by in the window, %d lines; most "
           "frequent: %s; %s< 20 KB" % (window_log.count(b"\n"), log_summary(window_log), goal))


# --- report -----------------------------------------------------------------------------------------

def fmt(v):
    if v is None:
        return "-"
    if isinstance(v, float):
        if abs(v) >= 1000:
            return "%.0f" % v
        if abs(v) >= 10:
            return "%.1f" % v
        return "%.2f" % v
    return str(v)


def print_table():
    rows = []
    for i, f in enumerate(FIGURES, 1):
        val = fmt(f["value"]) + (" " + f["unit"] if f["value"] is not None else "")
        ref = fmt(f["reference"]) + (" " + f["unit"] if f["reference"] is not None else "")
        ratio = "-" if f["ratio"] is None else "%.2f" % f["ratio"]
        status = ""
        if f["how"].startswith("SKIP"):
            status = "skipped"
        elif f["how"].startswith("FAILED"):
            status = "FAILED"
        rows.append((str(i), f["name"], val if not status else status, ref, ratio))
    head = ("#", "figure", "value", "reference", "ratio")
    w = [max(len(r[k]) for r in rows + [head]) for k in range(5)]
    line = "  ".join("%-*s" % (w[k], head[k]) for k in range(5))
    print()
    print(line)
    print("-" * len(line))
    for r in rows:
        print("  ".join(("%*s" if k in (0, 2, 3, 4) else "%-*s") % (w[k], r[k]) for k in range(5)))
    print()
    print("ratio = value / reference. How each figure was measured:")
    for i, f in enumerate(FIGURES, 1):
        print("%2d. %s" % (i, f["how"]))


# --- the MQTT API (L§11) ------------------------------------------------------------------------------

class Broker:
    """mosquitto on loopback for the daemon's --mqtt: anonymous clients allowed (L§11), no client of
    ours kept connected."""

    def __init__(self, exe):
        self.port = free_port()
        conf = os.path.join(RUN, "mqtt-broker.conf")
        with open(conf, "w") as f:
            # set_tcp_nodelay: back-to-back reports would otherwise wait for the daemon's delayed
            # ACK of the broker's last PUBACK (Nagle on the broker's side, 40 ms on Linux).
            f.write("listener %d 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\n"
                    "persistence false\nlog_dest none\n" % self.port)
        self.p = spawn([exe, "-c", conf], stdout=subprocess.DEVNULL,
                       stderr=open(os.path.join(RUN, "mqtt-broker.err"), "w"))
        wait_for(lambda: tcp_accepts(self.port) or self.p.poll() is not None, 10, "mosquitto")
        if self.p.poll() is not None:
            raise Broken("mosquitto exited with %s" % self.p.returncode)

    def close(self):
        stop(self.p)


def mqtt_packet(first, body):
    n, rl = len(body), b""
    while True:
        b, n = n % 128, n // 128
        rl += bytes([b | (0x80 if n else 0)])
        if not n:
            return bytes([first]) + rl + body


def mqtt_str(s):
    return struct.pack(">H", len(s)) + s


class MqttApp:
    """A minimal MQTT 3.1.1 client, an app of L§11: QoS 0 publishes on miio/report, subscribed to
    miio/report_ack. Blocking socket; `recv_publish` returns (topic, payload)."""

    def __init__(self, port, cid=b"bench-app"):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self.sock.sendall(mqtt_packet(0x10, mqtt_str(b"MQTT") + b"\x04\x02\x00\x00" + mqtt_str(cid)))
        if self.packet()[0] >> 4 != 2:
            raise Broken("mosquitto sent no CONNACK to the bench app")
        self.sock.sendall(mqtt_packet(0x82, b"\x00\x01" + mqtt_str(b"miio/report_ack") + b"\x00"))
        if self.packet()[0] >> 4 != 9:
            raise Broken("mosquitto sent no SUBACK to the bench app")

    def packet(self):
        while True:
            if len(self.buf) >= 2:
                n, mul, i = 0, 1, 1
                while i < len(self.buf):
                    n += (self.buf[i] & 0x7F) * mul
                    mul *= 128
                    i += 1
                    if not self.buf[i - 1] & 0x80:
                        if len(self.buf) >= i + n:
                            p, self.buf = self.buf[:i + n], self.buf[i + n:]
                            return p[0], p[i:]
                        break
            chunk = self.sock.recv(65536)
            if not chunk:
                raise Broken("mosquitto closed the bench app's connection")
            self.buf += chunk

    def publish(self, topic, payload):
        self.sock.sendall(mqtt_packet(0x30, mqtt_str(topic) + payload))

    def recv_publish(self):
        while True:
            first, body = self.packet()
            if first >> 4 == 3:
                (tl,) = struct.unpack(">H", body[:2])
                rest = body[2 + tl:]
                if (first >> 1) & 3:
                    rest = rest[2:]  # a packet id (QoS 1 from the broker; the app subscribed at 0)
                return body[2:2 + tl], rest

    def close(self):
        self.sock.close()


def report_rtts(send, recv, n, tag):
    """Round trips (us) of n reports, one at a time: send(text) then recv() until the ack's id."""
    out = []
    for i in range(n):
        rid = 1 + i
        text = b'{"id":%d,"method":"props","params":{"bench":%d}}' % (rid, i)
        t0 = time.perf_counter()
        send(text)
        while True:
            v = json.loads(recv())
            if v.get("id") == rid:
                break
        if v.get("result") != "ok":
            raise Broken("%s: report %d answered %r" % (tag, rid, v))
        out.append((time.perf_counter() - t0) * 1e6)
    return out


class Direct:
    """A 54322 client with the same loop as the MQTT app."""

    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def recv(self):
        while True:
            try:
                v, end = json.JSONDecoder().raw_decode(self.buf.decode())
                self.buf = self.buf[end:].lstrip()
                return json.dumps(v)
            except ValueError:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise Broken("the daemon closed the bench client")
                self.buf += chunk

    def close(self):
        self.sock.close()


def section_mqtt(opts):
    """The daemon with --mqtt against a local mosquitto: idle wakeups beside the same daemon without
    it over the same window, and the report round trip through the broker beside the direct 54322
    path (L§11)."""
    idle = "wakeups, connected idle, --mqtt (vs without)"
    names = [idle, "report round trip via MQTT p50", "report round trip via MQTT p99"]
    exe = find_tool("mosquitto")
    if not exe:
        for n in names:
            skipped(n, "/min" if n == idle else "us", "mosquitto not installed")
        return
    broker = Broker(exe)
    clouds, daemons = [Cloud(), Cloud()], []
    try:
        plain = Daemon(clouds[0].port, opts, "mqtt-off")
        daemons.append(plain)
        with_mqtt = Daemon(clouds[1].port, opts + ["--mqtt=127.0.0.1:%d" % broker.port], "mqtt-on")
        daemons.append(with_mqtt)
        for d in daemons:
            d.connected()
        with_mqtt.wait_log("mqtt: connected to the broker", 20)
        time.sleep(2.0)  # the post-connect report and its ack pass
        part("mqtt idle", part_mqtt_idle, plain, with_mqtt, broker, clouds, idle)
        part("mqtt round trip", part_mqtt_rtt, with_mqtt, broker)
    finally:
        pin(ALL_CPUS)
        for d in daemons:
            d.close()
        for c in clouds:
            c.close()
        broker.close()


def part_mqtt_idle(plain, with_mqtt, broker, clouds, name):
    cpus = split_cpus()
    if cpus:
        pin(cpus[0], plain.p.pid, with_mqtt.p.pid, broker.p.pid)
        pin(cpus[1], 0, *[c.p.pid for c in clouds])
    say("mqtt idle window: %.0f s (BENCH_IDLE_SECS), two connected daemons, one with --mqtt"
        % IDLE_SECS)
    noise = Noise(pinned=False)
    noise.where = ("daemons and mosquitto on CPU %d, fake clouds on CPU %d"
                   % (min(cpus[0]), min(cpus[1]))) if cpus else "one CPU"
    a0, b0 = switches(plain.p.pid), switches(with_mqtt.p.pid)
    t0 = time.monotonic()
    time.sleep(IDLE_SECS)
    secs = time.monotonic() - t0
    a1, b1 = switches(plain.p.pid), switches(with_mqtt.p.pid)
    for c in clouds:
        c.check("the mqtt idle window")
    off = (a1[0] - a0[0]) * 60.0 / secs
    on = (b1[0] - b0[0]) * 60.0 / secs
    figure(name, on, "/min", off,
           "voluntary_ctxt_switches delta of every thread over %.0f s, connected, idle, 0 local "
           "clients, --mqtt to a local mosquitto (keep-alive 0): %d switches; reference: the same "
           "daemon without --mqtt, its own fake cloud, same window: %d switches"
           % (secs, b1[0] - b0[0], a1[0] - a0[0]) + noise.text())


def part_mqtt_rtt(d, broker):
    n = max(1, RTT_N // 10)
    rounds = ROUNDS
    chunk = max(1, n // rounds)
    say("report round trip via MQTT: %d reports, an app on mosquitto and a direct 54322 client "
        "alternating in %d rounds" % (chunk * rounds, rounds))
    pin(ONE_CPU, 0, d.p.pid, broker.p.pid)
    noise = Noise()
    app = MqttApp(broker.port)
    direct = Direct(d.local)
    try:
        # The daemon's subscription is up (its CONNACK was logged); warm both paths.
        report_rtts(lambda t: app.publish(b"miio/report", t), lambda: app.recv_publish()[1], 20, "mqtt")
        report_rtts(lambda t: direct.sock.sendall(t), direct.recv, 20, "direct")

        def measure(t, r):
            if t == "mqtt":
                return report_rtts(lambda x: app.publish(b"miio/report", x),
                                   lambda: app.recv_publish()[1], chunk, "mqtt")
            return report_rtts(lambda x: direct.sock.sendall(x), direct.recv, chunk, "direct")
        got = interleaved(rounds, measure, "mqtt", "direct")
    finally:
        app.close()
        direct.close()
    mv = [x for c in got["mqtt"] for x in c]
    dv = [x for c in got["direct"] for x in c]
    how = ("mosquitto with set_tcp_nodelay true; a Python MQTT app publishing on miio/report (QoS 0) "
           "and subscribed to miio/report_ack, "
           "one report at a time, publish to ack, %d reports in %d rounds after 20 warm-up, "
           "miio_fakecloud acking; reference: the direct 54322 path, the same Python loop on one "
           "local client, rounds alternating" % (len(mv), rounds)) + noise.text()
    figure("report round trip via MQTT p50", pct(mv, 0.50), "us", pct(dv, 0.50), how)
    figure("report round trip via MQTT p99", pct(mv, 0.99), "us", pct(dv, 0.99), how)


def section(name, fn, *args, rows=()):
    if ONLY and name not in ONLY:
        return
    t0 = time.monotonic()
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001
        broke("section " + name, e)
    finally:
        stop_all()
    say("section %s took %.0f s" % (name, time.monotonic() - t0))


def main():
    global REPORT_LEN
    t0 = time.monotonic()
    os.makedirs(RUN, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    try:
        build_host()
        build_kit()
        REPORT_LEN = len(subprocess.run([KIT, "report"], stdout=subprocess.PIPE,
                                        text=True).stdout.strip())
        opts = client_options()
        section("flash", section_flash)
        section("session", section_session, opts)
        section("startup", section_startup, opts, grace0_option())
        section("static-memory", section_static_memory, opts)
        section("cpu", section_cpu, opts)
        section("syscalls", section_syscalls, opts)
        section("hostile", section_hostile)
        section("agent", section_agent, opts)
        section("mqtt", section_mqtt, opts)
    finally:
        stop_all()
    with open(os.path.join(OUT, "results.json"), "w") as f:
        json.dump(FIGURES, f, indent=1)
        f.write("\n")
    print_table()
    broken = [f for f in FIGURES if f["how"].startswith("FAILED")]
    print("\nresults: %s (%d figures, %d skipped, %d failed) in %.0f s"
          % (os.path.relpath(os.path.join(OUT, "results.json"), ROOT), len(FIGURES),
             sum(f["how"].startswith("SKIP") for f in FIGURES), len(broken), time.monotonic() - t0))
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
