"""Shared machinery of the fault drills (tests/test_drills_*.py, issue 8).

Every drill runs a real resize against real memcached processes (stock memcached, and the
Clearwater TAP fork where the source side differs), injects one fault, and then checks every
key of a model on every node of the new view, Jepsen-style:

- ``Model`` keeps, per key, every write a client attempted and the newest one that was
  acknowledged (flags = the write's millisecond timestamp, as MemcachedStore writes them);
- ``verify`` reads every key back from every owner in the new view and counts what is
  missing, what is older than the newest acknowledged write ("stale"), and what is not a
  write anybody made ("wrong"); a tombstone (empty value) must be there, empty.

A fault lands at a chosen point of a resync: the daemon's workers are frozen at birth
(``start_frozen``), run until the point is reached, and are frozen again while the fault is
injected. To land at a share of the records placed (``reach_capped``) they run held to 1% of a
CPU by the real cgroup cpu controller, and the share is read off the local memcached; to land
early in the stream from a given source (``reach_stream``) they run in short SIGCONT bursts.

The memcached client here is a few lines of ``struct``, independent of ``astaire.codec``, so
that the check does not share the code under test. Only the binary protocol is used (the
fork crashes on text ``stats``).
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from astaire.cluster.view import ClusterView, vbucket_for_key
from astaire.demo import localcluster
from astaire.demo.localcluster import MemcachedServer, TapForkMissing, free_port, wait_connectable

REPO = Path(__file__).resolve().parent.parent
TAG_KEY = b"astaire\\\\tag"

# -- a tiny independent binary client -------------------------------------------------------------

HDR = struct.Struct(">BBHBBHIIQ")
OP_GET, OP_SET, OP_ADD, OP_NOOP, OP_GETK, OP_GETKQ, OP_STAT = 0x00, 0x01, 0x02, 0x0A, 0x0C, 0x0D, 0x10
ST_OK, ST_ENOENT, ST_EXISTS, ST_NOT_STORED = 0x00, 0x01, 0x02, 0x05


def _req(opcode: int, key: bytes = b"", value: bytes = b"", extras: bytes = b"", cas: int = 0,
         opaque: int = 0) -> bytes:
    return HDR.pack(0x80, opcode, len(key), len(extras), 0, 0, len(extras) + len(key) + len(value),
                    opaque, cas) + extras + key + value


class Mc:
    """One blocking binary connection (vbucket 0 in every header, as the fork wants)."""

    def __init__(self, name: str, timeout: float = 10.0):
        host, port = name.rsplit(":", 1)
        self.name = name
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        self.buf = bytearray()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(1 << 18)
            if not chunk:
                raise ConnectionError(f"{self.name} closed the connection")
            self.buf += chunk
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def frame(self):
        magic, opcode, keylen, extlen, _dt, status, bodylen, opaque, cas = HDR.unpack(self._read(24))
        body = self._read(bodylen)
        return opcode, status, opaque, cas, body[:extlen], body[extlen:extlen + keylen], body[extlen + keylen:]

    def get(self, key: bytes):
        """(value, flags, cas) or None."""
        self.sock.sendall(_req(OP_GETK, key))
        _op, status, _o, cas, extras, _k, value = self.frame()
        if status == ST_ENOENT:
            return None
        if status != ST_OK:
            raise RuntimeError(f"{self.name}: GET answered 0x{status:04x}")
        return value, struct.unpack(">I", extras[:4])[0], cas

    def store(self, opcode: int, key: bytes, value: bytes, flags: int, exp: int, cas: int = 0) -> int:
        self.sock.sendall(_req(opcode, key, value, struct.pack(">II", flags, exp), cas))
        return self.frame()[1]

    def get_many(self, keys) -> dict:
        """key -> (value, flags), pipelined GETKQ + NOOP in batches."""
        out = {}
        keys = list(keys)
        for i in range(0, len(keys), 2000):
            batch = keys[i:i + 2000]
            self.sock.sendall(b"".join(_req(OP_GETKQ, k) for k in batch) + _req(OP_NOOP))
            while True:
                opcode, status, _o, _c, extras, key, value = self.frame()
                if opcode == OP_NOOP:
                    break
                if status == ST_OK:
                    out[key] = (value, struct.unpack(">I", extras[:4])[0])
        return out

    def set_many(self, items) -> None:
        """items: (key, value, flags, exp); SETQ pipelined, NOOP fence."""
        items = list(items)
        for i in range(0, len(items), 2000):
            reqs = [_req(0x11, k, v, struct.pack(">II", f, e)) for k, v, f, e in items[i:i + 2000]]
            self.sock.sendall(b"".join(reqs) + _req(OP_NOOP))
            while True:
                opcode, status, *_ = self.frame()
                if opcode == OP_NOOP:
                    break
                raise RuntimeError(f"{self.name}: SETQ answered 0x{status:04x}")

    def stats(self) -> dict:
        self.sock.sendall(_req(OP_STAT))
        out = {}
        while True:
            _op, status, _o, _c, _e, key, value = self.frame()
            if not key:
                return out
            out[key.decode()] = value.decode(errors="replace")


def tag_present(name: str) -> bool:
    with Mc(name) as c:
        return c.get(TAG_KEY) is not None


def set_tag(name: str) -> None:
    with Mc(name) as c:
        assert c.store(OP_SET, TAG_KEY, b"{}", 0, 0) == ST_OK


# -- memcached processes: stock and the Clearwater fork ---------------------------------------------

def tap_fork_prefix() -> str:
    """The fork's install prefix, built by ``../shared/tap-fork/build.sh`` (idempotent)."""
    try:
        return localcluster.tap_fork_prefix()
    except TapForkMissing as e:
        pytest.skip(str(e))
    except RuntimeError as e:
        pytest.fail(str(e))


@pytest.fixture(scope="session")
def tap_fork() -> str:
    """The Clearwater TAP fork's install prefix (built by ../shared/tap-fork/build.sh if needed;
    skipped, saying why, only when that script is absent)."""
    return tap_fork_prefix()


class Node(MemcachedServer):
    """A memcached of ``kind`` "stock" or "fork", on a free loopback port (or an address in a
    network namespace: ``netns``). ``restart()`` keeps the port and comes back empty."""

    def __init__(self, kind: str = "stock", memory_mb: int = 64, host: str = "127.0.0.1",
                 netns: str | None = None, extra_args=()):
        super().__init__(memory_mb=memory_mb, threads=2, host=host, extra_args=tuple(extra_args))
        self.kind = kind
        self.netns = netns

    def command(self, port: int) -> list[str]:
        if self.kind == "fork":
            prefix = tap_fork_prefix()
            args = [f"{prefix}/bin/memcached", "-E", f"{prefix}/lib/memcached/default_engine.so"]
        else:
            exe = shutil.which("memcached")
            if exe is None:
                pytest.skip("memcached is not installed")
            args = [exe]
        args += ["-l", self.host, "-p", str(port), "-U", "0", "-m", str(self.memory_mb), "-t", str(self.threads),
                 "-c", "1024", *self.extra_args]
        if os.geteuid() == 0:
            args += ["-u", "root"]
        if self.netns:
            args = ["ip", "netns", "exec", self.netns, *args]
        return args

    def start(self) -> "Node":
        for _attempt in range(20):
            port = self.port or free_port("127.0.0.1" if self.netns else self.host)
            proc = subprocess.Popen(self.command(port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if wait_connectable(self.host, port, timeout=10, proc=proc):
                self.port, self.proc = port, proc
                return self
            proc.kill()
            proc.wait()
            if self.port:
                raise RuntimeError(f"{self.kind} memcached did not come back on {self.name}")
        raise RuntimeError(f"could not start {self.kind} memcached")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def pause(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None:
            os.kill(self.proc.pid, signal.SIGCONT)

    def kill(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)
        super().kill()

    def down(self) -> None:
        """Kill it (SIGKILL): the data is gone; ``up()`` starts it empty on the same port."""
        super().kill()

    def up(self) -> None:
        self.start()

    def alive(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            return False
        try:
            with Mc(self.name, timeout=2) as c:
                return "pid" in c.stats()
        except OSError:
            return False


@pytest.fixture
def nodes():
    """``make(n, kind="stock")`` -> n started Nodes; all killed afterwards."""
    started: list[Node] = []

    def make(n: int, kind: str = "stock", **kwargs) -> list[Node]:
        new = []
        for _ in range(n):
            node = Node(kind, **kwargs)
            started.append(node)
            new.append(node.start())
        return new

    yield make
    for node in started:
        node.kill()


# -- the model and the check ------------------------------------------------------------------------

def newer(a: int, b: int) -> bool:
    """Flags ``a`` is a later timestamp than ``b`` (wrap-safe, as the conflict rule compares)."""
    d = (a - b) & 0xFFFFFFFF
    return d != 0 and d < 0x80000000


class Model:
    """Per key: every write attempted ({flags: value}) and the newest acknowledged write."""

    def __init__(self):
        self.lock = threading.Lock()
        self.attempted: dict[bytes, dict[int, bytes]] = {}
        self.expiry: dict[tuple[bytes, int], int] = {}  # (key, flags) -> absolute expiry of that write
        self.acked: dict[bytes, tuple[int, bytes]] = {}
        self.writes = 0
        self.tombstones = 0

    def attempt(self, key: bytes, flags: int, value: bytes, exp: int | None = None) -> None:
        with self.lock:
            self.attempted.setdefault(key, {})[flags] = value
            if exp is not None:
                self.expiry[key, flags] = exp

    def ack(self, key: bytes, flags: int, value: bytes, exp: int | None = None) -> None:
        with self.lock:
            self.attempted.setdefault(key, {})[flags] = value
            if exp is not None:
                self.expiry[key, flags] = exp
            cur = self.acked.get(key)
            if cur is None or newer(flags, cur[0]):
                self.acked[key] = (flags, value)
            self.writes += 1
            self.tombstones += value == b""

    def keys(self) -> list[bytes]:
        with self.lock:
            return list(self.acked)


def load(model: Model, view: ClusterView, count: int, table: str = "drill", value_size: int = 60,
         tombstone_every: int = 10, seed: int = 1, ttl: int = 3600) -> list[bytes]:
    """``count`` MemcachedStore-style records on each key's write replicas in ``view`` (every
    ``tombstone_every``-th one a tombstone), acknowledged in ``model``; returns the keys."""
    rng = random.Random(seed)
    now_ms = int(time.time() * 1000) - 60_000  # a minute old: client writes during the drill are newer
    exp = int(time.time()) + ttl
    per_node: dict[str, list] = {}
    keys = []
    for n in range(count):
        key = f"{table}\\\\key-{n}".encode()
        value = b"" if tombstone_every and n % tombstone_every == 0 else rng.randbytes(value_size)
        flags = (now_ms - n) & 0xFFFFFFFF
        for name in view.write[vbucket_for_key(key, view.vbuckets)]:
            per_node.setdefault(name, []).append((key, value, flags, exp))
        model.ack(key, flags, value, exp)
        keys.append(key)
    for name, items in per_node.items():
        with Mc(name) as c:
            c.set_many(items)
    return keys


@dataclass
class Check:
    nodes: int = 0
    checked: int = 0
    missing: list = field(default_factory=list)   # (node, key)
    stale: list = field(default_factory=list)     # (node, key, found flags, acked flags)
    wrong: list = field(default_factory=list)     # (node, key, why)
    tombstones: int = 0
    expiries: int = 0                             # expiries compared (stock nodes: lru_crawler metadump)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.stale or self.wrong)

    def summary(self) -> str:
        return (f"{self.checked} (node, key) pairs on {self.nodes} nodes: {len(self.missing)} missing, "
                f"{len(self.stale)} stale, {len(self.wrong)} wrong; first: "
                f"{(self.missing[:3], self.stale[:3], self.wrong[:3])}")


def verify(model: Model, view: ClusterView, nodes=None, ttl_nodes=()) -> Check:
    """Every key of ``model`` on every owner of its vbucket in ``view``'s new ring (current ring
    when stable): present, not older than the newest acknowledged write, a write that was made;
    on ``ttl_nodes`` (stock memcached: it lists expiries) with that write's expiry (+-2 s)."""
    from astaire.demo.workload import metadump

    owners_of = (lambda vb: view.owners(vb))
    by_node: dict[str, list[bytes]] = {}
    for key in model.keys():
        for name in dict.fromkeys(owners_of(vbucket_for_key(key, view.vbuckets))):
            if nodes is None or name in nodes:
                by_node.setdefault(name, []).append(key)
    out = Check(nodes=len(by_node))
    for name, keys in sorted(by_node.items()):
        with Mc(name, timeout=30) as c:
            held = c.get_many(keys)
        listed = metadump(name) if name in ttl_nodes else {}
        for key in keys:
            out.checked += 1
            acked_flags, acked_value = model.acked[key]
            got = held.get(key)
            if got is None:
                out.missing.append((name, key))
                continue
            value, flags = got
            if newer(acked_flags, flags):
                out.stale.append((name, key, flags, acked_flags))
            elif model.attempted[key].get(flags) != value:
                out.wrong.append((name, key, f"flags {flags} with a value nobody wrote"))
            else:
                out.tombstones += value == b""
                want_exp = model.expiry.get((key, flags))
                if name in ttl_nodes and want_exp is not None and key in listed:
                    out.expiries += 1
                    if abs(listed[key] - want_exp) > 2:
                        out.wrong.append((name, key, f"expiry {listed[key]}, the write with flags {flags} "
                                                     f"set {want_exp}"))
    return out


# -- clients writing during the resize (MemcachedStore style) ---------------------------------------

class Clients:
    """Threads that keep writing newer records and tombstones to every write replica of the
    key's vbucket: GET, then ADD if absent or CAS over what was read, retried on races
    (EXISTS / NOT_STORED); flags = low 32 bits of the millisecond time, increasing per key.
    A write is acknowledged once every replica took it."""

    def __init__(self, model: Model, view: ClusterView, keys: list[bytes], threads: int = 2,
                 tombstone_share: float = 0.15, pause: float = 0.0, seed: int = 7):
        self.model, self.view, self.keys = model, view, keys
        self.threads_n, self.tombstone_share, self.pause = threads, tombstone_share, pause
        self.stop_event = threading.Event()
        self.threads: list[threading.Thread] = []
        self.last_flags: dict[bytes, int] = {}
        self.errors: list[str] = []
        self.races = 0
        self.seed = seed

    def _write_one(self, conns: dict, key: bytes, value: bytes, flags: int, exp: int) -> bool:
        for name in self.view.write[vbucket_for_key(key, self.view.vbuckets)]:
            c = conns.get(name) or conns.setdefault(name, Mc(name))
            for _attempt in range(50):
                cur = c.get(key)
                if cur is None:
                    status = c.store(OP_ADD, key, value, flags, exp)
                else:
                    status = c.store(OP_SET, key, value, flags, exp, cas=cur[2])
                if status == ST_OK:
                    break
                if status in (ST_EXISTS, ST_NOT_STORED, ST_ENOENT):
                    self.races += 1
                    continue
                raise RuntimeError(f"{name}: store answered 0x{status:04x}")
            else:
                return False
        return True

    def _run(self, index: int) -> None:
        rng = random.Random(self.seed + index)
        mine = self.keys[index::self.threads_n]
        conns: dict[str, Mc] = {}
        try:
            while not self.stop_event.is_set():
                key = rng.choice(mine)
                flags = int(time.time() * 1000) & 0xFFFFFFFF
                last = self.last_flags.get(key)
                if last is not None and not newer(flags, last):
                    flags = (last + 1) & 0xFFFFFFFF
                self.last_flags[key] = flags
                value = b"" if rng.random() < self.tombstone_share else b"client-%d-" % flags + rng.randbytes(20)
                exp = int(time.time()) + rng.randrange(1000, 5000)  # the TTL changes with every write
                self.model.attempt(key, flags, value, exp)
                try:
                    if self._write_one(conns, key, value, flags, exp):
                        self.model.ack(key, flags, value, exp)
                except OSError as e:  # a replica down: not acknowledged, never retried
                    self.errors.append(str(e))
                    for c in conns.values():
                        c.close()
                    conns.clear()
                    time.sleep(0.05)
                if self.pause:
                    time.sleep(self.pause)
        finally:
            for c in conns.values():
                c.close()

    def start(self) -> "Clients":
        for i in range(self.threads_n):
            t = threading.Thread(target=self._run, args=(i,), daemon=True, name=f"drill-client-{i}")
            t.start()
            self.threads.append(t)
        return self

    def stop(self) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(10)


# -- freezing a resync's workers ---------------------------------------------------------

class Freezer:
    """SIGSTOP/SIGCONT for a set of processes (``pids``: a callable giving the current pids), to
    stop a resync at a chosen point: ``reach_capped`` lets them run under a 1% cgroup cpu cap
    between freezes, ``reach_stream`` in bursts (``burst``). The pid list is looked up
    (slow: psutil scans /proc) only while everything is frozen, so that a burst lasts no longer
    than the scheduler makes it (on a busy 2-core machine, milliseconds for 0.06-0.5 ms asked)."""

    def __init__(self, pids):
        self.pids = pids
        self.current: list[int] = []
        self.seen: set[int] = set()
        self.frozen = False

    def refresh(self) -> list[int]:
        try:
            self.current = list(self.pids())
        except Exception:  # noqa: BLE001 (a process tree changing under us)
            pass
        self.seen |= set(self.current)
        return self.current

    def _kill(self, pids, sig) -> None:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def hold(self) -> None:
        self.frozen = True
        self._kill(self.refresh(), signal.SIGSTOP)

    def release(self) -> None:
        self.frozen = False
        self._kill(self.seen, signal.SIGCONT)

    def burst(self, seconds: float) -> None:
        pids = self.refresh()
        self._kill(self.seen, signal.SIGCONT)
        time.sleep(seconds)
        self._kill(pids, signal.SIGSTOP)
        self._kill(set(self.refresh()) - set(pids), signal.SIGSTOP)  # a worker born meanwhile

    def stop(self) -> None:
        self.release()


@pytest.fixture
def freezers():
    made: list[Freezer] = []

    def make(pids) -> Freezer:
        f = Freezer(pids)
        made.append(f)
        return f

    yield make
    for f in made:
        f.stop()


# -- daemons: status, wait-sync, logs ---------------------------------------------------------------

def status(d) -> dict:
    """``astaire status --json --pidfile P`` (nothing else: the daemon publishes its settings path)."""
    from tests.daemon_helpers import astaire

    r = astaire("status", "--json", "--pidfile", str(d.pidfile), timeout=30)
    assert "Traceback" not in r.stderr, r.stderr
    return json.loads(r.stdout)


def wait_sync(d, timeout: float = 120, no_progress: float | None = None):
    """``astaire wait-sync --pidfile P`` alone; returns the CompletedProcess."""
    from tests.daemon_helpers import astaire

    args = ["wait-sync", "--pidfile", str(d.pidfile), "--poll-interval", "0.1"]
    if no_progress is not None:
        args += ["--timeout-without-progress", str(no_progress)]
    r = astaire(*args, timeout=timeout)
    assert "Traceback" not in r.stderr, r.stderr
    return r


def events(d, number: int) -> int:
    return d.log().count(f"event {number}")


def wanted_entries(model: Model, view: ClusterView, local: str) -> int:
    """Records the local node's view resync brings in: keys of the vbuckets it pulls, times sources."""
    from astaire.cluster.worklist import Worklist

    wl = Worklist(view, local)
    return sum(len(wl.sources.get(vbucket_for_key(k, view.vbuckets), ())) for k in model.keys())


def worker_streaming_from(d, port: int):
    """A worker of daemon ``d`` with a TCP connection to ``port``, or None."""
    for child in d.children():
        try:
            if any(c.raddr and c.raddr.port == port for c in child.net_connections(kind="tcp")):
                return child
        except psutil.NoSuchProcess:
            pass
    return None


# -- the drill table ------------------------------------------------------------------------------

@pytest.fixture
def drill(request):
    """``drill.check(model, view)``: verify, record a row of the drill table, return the Check."""
    from tests import drills_report

    class Drill:
        started = time.monotonic()
        extra: dict = {}

        def check(self, model: Model, view: ClusterView, nodes=None, label: str = "", ttl_nodes=()) -> Check:
            c = verify(model, view, nodes, ttl_nodes)
            name = request.node.name + (f" [{label}]" if label else "")
            extra = dict(self.extra, **({"expiries_checked": c.expiries} if ttl_nodes else {}))
            drills_report.record(name, c, time.monotonic() - self.started, writes=model.writes,
                                 tombstones=c.tombstones, **extra)
            return c

    yield Drill()


def settle(d, local_name, problems: list, full: bool | None = None) -> dict | None:
    """Wait for ``d`` with ``astaire wait-sync --pidfile P`` alone, then read ``status``; what
    contradicts the contract goes to ``problems`` (checked after the data, so the drill table
    always gets its row). Falls back to the harness's own wait when wait-sync fails."""
    r = wait_sync(d, timeout=120)
    if r.returncode != 0:
        problems.append(f"{d.local}: wait-sync exited {r.returncode}: {r.stderr.strip()[-300:]}")
        d.wait_sync(timeout=120, resyncs=1)
    try:
        st = status(d)
    except Exception as e:  # noqa: BLE001 (reported, not raised: the data check comes first)
        problems.append(f"{d.local}: status --json --pidfile failed: {e!r}")
        return None
    last = st.get("last_resync", {})
    if last.get("result") != "ok" or last.get("failed_vbuckets"):
        problems.append(f"{d.local}: last resync {last}")
    for name, want in (("waiting_for_local", False), ("local_in_cluster", True)):
        if st.get(name) is not want:
            problems.append(f"{d.local}: status {name} = {st.get(name)!r}, expected {want}")
    if full is not None and last.get("full") is not full:
        problems.append(f"{d.local}: last resync full={last.get('full')}, expected {full}")
    if not tag_present(local_name):
        problems.append(f"{d.local}: no resync tag after the resync")
    return st


def sources_blamed(d, *names) -> list[str]:
    """Log lines that drop one of ``names`` as a source."""
    return [line for line in d.log().splitlines()
            if "dropped as a source" in line or "treating" in line and "as failed" in line
            if any(n in line for n in names)]


# -- landing a fault mid-stream ---------------------------------------------------------------------

def start_frozen(d, freezers, workers: int = 2) -> Freezer:
    """Start daemon ``d`` and freeze its workers as soon as they exist (before they stream much)."""
    from tests.daemon_helpers import wait_for

    d.start(wait=False)
    f = freezers(lambda: [w.pid for w in d.children()])

    def born():
        assert d.proc.poll() is None, f"the daemon exited {d.proc.returncode}: {d.output()[-2000:]}"
        return len(d.children()) >= workers
    wait_for(born, 15, interval=0.001, what="the daemon's workers")
    f.hold()
    return f


def streaming_from(snapshot: dict, port: int) -> int:
    """Entries the running stream from the source on ``port`` has brought in (-1: none runs)."""
    for c in snapshot.get("connections", []):
        if c["port"] == port:
            return sum(b["entries"] for b in c["buckets"])
    return -1


def reach_stream(d, frozen: Freezer, port: int, want: int, share: float = 0.0, limit: float = 90) -> float:
    """Let ``d``'s frozen workers run in bursts until the stream from the source on ``port`` is
    running and has brought in some records (and ``share`` of ``want`` entries are in): a fault
    then lands in the middle of that very stream. The daemon's statistics can show a stream
    that a burst has just carried to its end (a worker reports every 0.25 s), so a frozen
    worker must also still hold a TCP connection to ``port``. Bursts, not the 1% cap of
    ``reach_capped``: at 1% a worker reports so seldom that its first report of a stream can
    come a third of the way in, and the source drills need their fault early in the stream
    (the fork's dump must outsize the socket buffers after the fault, or it never stalls)."""
    t0 = time.monotonic()
    while True:
        s = d.snapshot()
        assert s["resyncs_completed"] == 0, f"the resync ended first: make the drill slower ({s['last_resync']})"
        if (s["state"] == "resyncing" and streaming_from(s, port) > 0 and s["entries_resynchronized"] >= share * want
                and worker_streaming_from(d, port) is not None):
            return s["entries_resynchronized"] / want
        assert time.monotonic() - t0 < limit, f"no stream from port {port} under way after {limit} s: {s}"
        frozen.burst(0.0003)
        time.sleep(0.12)


class Placed:
    """A resync's progress read off the local memcached itself: the records it has added there
    (``curr_items`` over binary STAT, which the fork answers too) as a share of ``records``.
    The daemon's own statistics lag: a worker reports at most every 0.25 s of its clock, so a
    report can show the state of one or two bursts ago. This does not lag."""

    def __init__(self, name: str, records: int):
        assert records > 0, "the resync adds nothing to the local node: nothing to reach"
        self.name = name
        self.records = records
        self.base = self.items()  # before the resync writes anything

    def items(self) -> int:
        with Mc(self.name) as c:
            return int(c.stats()["curr_items"])

    def __call__(self) -> float:
        return (self.items() - self.base) / self.records


def new_records(model: Model, view: ClusterView, local: str) -> int:
    """Records the local node's view resync adds to it: keys of the vbuckets it pulls, once each."""
    from astaire.cluster.worklist import Worklist

    wl = Worklist(view, local)
    return sum(1 for k in model.keys() if wl.sources.get(vbucket_for_key(k, view.vbuckets)))


def reach_capped(d, frozen: Freezer, share: float, placed: Placed, group: str, limit: float = 90) -> float:
    """Let ``d``'s frozen workers run, held to 1% of one CPU by the real cgroup v1 cpu controller
    (in the cgroup ``group``, the drill's own), until ``placed`` says ``share`` of the records
    are in the local memcached; returns the share, the workers frozen again (SIGSTOP) and the
    cap lifted. A SIGCONT burst lasts what the scheduler gives it: 0.6-6 ms measured on a busy
    2-core machine against 0.06-0.5 ms asked, up to a third of a small resync, so bursts could
    carry a resync from "under 75%" to its end. The kernel meters the CPU instead: 1 ms per
    100 ms period. Without a writable v1 cpu hierarchy the workers run in bursts instead."""
    from tests.throttle_helpers import V1_ROOT, v1_writable

    limiter = None
    if v1_writable():
        from astaire_throttle.cgroup import CgroupV1Limiter

        limiter = CgroupV1Limiter(V1_ROOT, group, cpus=1)
        limiter.set_percentage(1)  # the kernel's minimum quota, 1 ms per 100 ms period
    try:
        if limiter is not None:
            limiter.attach(frozen.refresh())
            frozen.release()
        t0 = time.monotonic()
        while True:
            try:
                s = d.snapshot()
            except Exception:  # noqa: BLE001 (statistics not published yet)
                s = None
            if s is not None:
                assert s["resyncs_completed"] == 0, \
                    f"the resync ended before {share:.0%} could be reached: make the drill slower ({s['last_resync']})"
                if s["state"] == "resyncing":
                    got = placed()
                    if got >= share:
                        return got  # frozen again below
            assert time.monotonic() - t0 < limit, f"no {share:.0%} of the resync after {limit} s: {s}"
            if limiter is None:
                frozen.burst(0.0003)
                time.sleep(0.12)
            else:
                time.sleep(0.02)
    finally:
        frozen.hold()
        if limiter is not None:
            limiter.release()  # quota -1; the group itself goes with the drill's group_name fixture


# -- network namespaces ----------------------------------------------------------------------------

@dataclass
class Netns:
    name: str
    host_if: str
    ns_if: str
    host_ip: str
    ns_ip: str
    cut_with: str = ""

    def ip(self, *args: str, inside: bool = False) -> subprocess.CompletedProcess:
        cmd = ["ip", "netns", "exec", self.name, *args] if inside else list(args)
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20)

    def cut(self) -> str:
        """Partition: every packet between the namespace and the host is dropped silently
        (``tc netem loss 100%`` where the kernel has netem, else the namespace's link down)."""
        r = self.ip("tc", "qdisc", "add", "dev", self.host_if, "root", "netem", "loss", "100%")
        if r.returncode == 0:
            self.ip("tc", "qdisc", "add", "dev", self.ns_if, "root", "netem", "loss", "100%", inside=True)
            self.cut_with = "tc netem loss 100%"
        else:
            r = self.ip("ip", "link", "set", self.ns_if, "down", inside=True)
            assert r.returncode == 0, r.stderr
            self.cut_with = "link down"
        return self.cut_with

    def heal(self) -> None:
        if self.cut_with.startswith("tc"):
            self.ip("tc", "qdisc", "del", "dev", self.host_if, "root")
            self.ip("tc", "qdisc", "del", "dev", self.ns_if, "root", inside=True)
        elif self.cut_with:
            self.ip("ip", "link", "set", self.ns_if, "up", inside=True)
        self.cut_with = ""


@pytest.fixture
def netns():
    """``make()`` -> a Netns joined to the host by a veth pair on a private /30; every namespace
    and link is removed afterwards. Skips when namespaces cannot be made (not root, no ip)."""
    made: list[Netns] = []
    rng = random.Random()

    def run(*cmd):
        return subprocess.run(list(cmd), capture_output=True, text=True, timeout=20)

    def make() -> Netns:
        if shutil.which("ip") is None:
            pytest.skip("the ip command (iproute2) is not installed")
        tag = f"{os.getpid() % 100000}{len(made)}"
        ns = Netns(f"astd{tag}", f"vah{tag}"[:15], f"van{tag}"[:15], "", "")
        third = rng.randrange(0, 256)
        fourth = 4 * rng.randrange(0, 64)
        ns.host_ip, ns.ns_ip = f"10.254.{third}.{fourth + 1}", f"10.254.{third}.{fourth + 2}"
        r = run("ip", "netns", "add", ns.name)
        if r.returncode != 0:
            pytest.skip(f"cannot create a network namespace (ip netns add: {r.stderr.strip()})")
        made.append(ns)
        for cmd in (["ip", "link", "add", ns.host_if, "type", "veth", "peer", "name", ns.ns_if],
                    ["ip", "link", "set", ns.ns_if, "netns", ns.name],
                    ["ip", "addr", "add", f"{ns.host_ip}/30", "dev", ns.host_if],
                    ["ip", "link", "set", ns.host_if, "up"],
                    ["ip", "netns", "exec", ns.name, "ip", "addr", "add", f"{ns.ns_ip}/30", "dev", ns.ns_if],
                    ["ip", "netns", "exec", ns.name, "ip", "link", "set", ns.ns_if, "up"],
                    ["ip", "netns", "exec", ns.name, "ip", "link", "set", "lo", "up"]):
            r = run(*cmd)
            if r.returncode != 0:
                pytest.skip(f"cannot set up the namespace's veth pair ({' '.join(cmd)}: {r.stderr.strip()})")
        return ns

    yield make
    for ns in made:
        with contextlib.suppress(Exception):
            ns.heal()
        run("ip", "link", "del", ns.host_if)
        run("ip", "netns", "del", ns.name)
