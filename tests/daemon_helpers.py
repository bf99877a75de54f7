"""The daemon harness the end-to-end tests share (test_daemon_e2e.py, test_ops.py): ``astaire``
subprocesses, and the ``daemons``, ``servers``, ``taps`` and ``tap_resize`` fixtures, made
available by conftest."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from astaire import codec
from astaire.demo import workload
from astaire.cluster.settings import settings_digest
from astaire.demo.localcluster import MemcachedServer
from astaire.stats import StatsReader, StatsUnavailable
from astaire.cluster.view import ClusterView, vbucket_for_key
from astaire.demo.run import CLI
from tests.tapserver import TapServer

REPO = str(Path(__file__).resolve().parent.parent)


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def gone(proc: "psutil.Process | int") -> bool:
    """Whether a process has exited (reaped, or a zombie its parent has not reaped yet). Race-free:
    the process may be reaped between any two looks at /proc, which psutil reports as
    NoSuchProcess."""
    try:
        p = proc if isinstance(proc, psutil.Process) else psutil.Process(proc)
        return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def astaire(*args: str, timeout: float = 60.0, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, **kwargs)


class Daemon:
    """One ``astaire run`` subprocess with its own pidfile, stats file, log dir and settings."""

    def __init__(self, workdir: Path, local: str, servers, new_servers=(), *, workers: int = 2,
                 tag_interval: float = 10.0, source: str = "auto", extra=()):
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.local = local
        self.settings = self.dir / "cluster_settings"
        self.pidfile = self.dir / "astaire.pid"
        self.stats_file = self.dir / "astaire.stats"
        self.log_dir = self.dir / "log"
        self.workers, self.tag_interval, self.source, self.extra = workers, tag_interval, source, tuple(extra)
        self.proc: subprocess.Popen | None = None
        self.known: set[int] = set()  # every pid seen in this daemon's tree, for the clean-up
        self.write_settings(servers, new_servers)

    def write_settings(self, servers, new_servers=()) -> None:
        text = f"servers={','.join(servers)}\n"
        if new_servers:
            text += f"new_servers={','.join(new_servers)}\n"
        self.settings.write_text(text)

    def args(self) -> list[str]:
        return ["run", "--local-name", self.local, "--cluster-settings-file", str(self.settings),
                "--config", str(self.dir / "no-node-config"), "--log-file", str(self.log_dir), "--log-level", "5",
                "--pidfile", str(self.pidfile), "--workers", str(self.workers),
                "--tag-interval", str(self.tag_interval), "--source", self.source, *self.extra]

    def start(self, wait: bool = True) -> "Daemon":
        self.out = open(self.dir / "daemon.out", "ab")
        self.proc = subprocess.Popen([*CLI, *self.args()], cwd=REPO,
                                     stdout=self.out, stderr=subprocess.STDOUT)
        self.known.add(self.proc.pid)
        if wait:
            wait_for(lambda: self.proc.poll() is not None or self._stats_pid() == self.proc.pid, 15,
                     what="the daemon's statistics")
            assert self.proc.poll() is None, self.output()
            self.note_children()
        return self

    def _stats_pid(self):
        try:
            return StatsReader(str(self.stats_file)).snapshot()["pid"]
        except StatsUnavailable:
            return None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def snapshot(self) -> dict:
        return StatsReader(str(self.stats_file)).snapshot()

    def children(self) -> list[psutil.Process]:
        try:
            kids = psutil.Process(self.pid).children()
        except psutil.NoSuchProcess:
            return []
        self.known.update(k.pid for k in kids)
        return kids

    note_children = children

    def synced(self) -> bool:
        try:
            s = self.snapshot()
        except StatsUnavailable:
            return False
        return (s["state"] == "idle" and s["buckets_needing_resync"] == 0
                and s["settings_digest"] == settings_digest(str(self.settings)))

    def wait_sync(self, timeout: float = 60.0, resyncs: int = 1) -> dict:
        def done():
            self.note_children()
            assert self.proc.poll() is None, f"daemon exited {self.proc.returncode}: {self.output()}"
            return self.synced() and self.snapshot()["resyncs_completed"] >= resyncs
        wait_for(done, timeout, what=f"sync of {self.local}")
        return self.snapshot()

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def log(self) -> str:
        path = self.log_dir / "astaire_current.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def output(self) -> str:
        path = self.dir / "daemon.out"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self, timeout: float = 5.0) -> int:
        self.note_children()
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def cli(self, command: str, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        common = ["--pidfile", str(self.pidfile)]
        if command in ("wait-sync", "status"):
            common += ["--cluster-settings-file", str(self.settings)]
        return astaire(command, *common, *args, timeout=timeout)

    def kill_everything(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.note_children()
        for pid in sorted(self.known, reverse=True):
            try:
                psutil.Process(pid).kill()
            except psutil.NoSuchProcess:
                pass
        if self.proc is not None:
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
            self.out.close()


@pytest.fixture
def daemons(tmp_path):
    """``make(local, servers, new_servers, **kw)`` -> a started Daemon; all killed afterwards."""
    made: list[Daemon] = []

    def make(local, servers, new_servers=(), start=True, **kwargs) -> Daemon:
        d = Daemon(tmp_path / f"daemon-{len(made)}", local, servers, new_servers, **kwargs)
        made.append(d)
        return d.start() if start else d

    yield make
    for d in made:
        d.kill_everything()


@pytest.fixture
def servers():
    """``make(n)`` -> n started MemcachedServers; stopped afterwards."""
    started: list[MemcachedServer] = []

    def make(n: int) -> list[MemcachedServer]:
        new = [MemcachedServer(memory_mb=64).start() for _ in range(n)]
        started.extend(new)
        return new

    yield make
    for s in started:
        s.kill()  # SIGTERM costs memcached 1.6 a second once it has had a client


@pytest.fixture
def taps():
    started: list[TapServer] = []

    def make(**kwargs) -> TapServer:
        t = TapServer(**kwargs).start()
        started.append(t)
        return t

    yield make
    for t in started:
        t.stop()


def load_mixed(view: ClusterView, records, tap_servers: dict[str, TapServer]) -> None:
    """MemcachedStore-style load onto each record's write replicas, fake TAP servers included."""
    real: dict[str, list] = {}
    for r in records:
        for name in view.write[vbucket_for_key(r.key, view.vbuckets)]:
            if name in tap_servers:
                tap_servers[name].put(r.key, r.value, r.flags, r.expiration)
            else:
                real.setdefault(name, []).append((codec.OP_SETQ, r.key, r.value, r.flags, r.expiration, 0, 0))
    for name, reqs in real.items():
        with workload.BinaryClient(name) as client:
            for i in range(0, len(reqs), workload.BATCH):
                assert client.round_trip(codec.encode_batch(reqs[i:i + workload.BATCH])) == []


@pytest.fixture
def tap_resize(servers, daemons, taps):
    """``make(table, count, tap={...}, **daemon_options)``: a fake TAP server (with the given
    faults or delay) and a real memcached hold ``count`` records as the old replicas; a new
    node n joins and its daemon starts. Returns a namespace: d, tap, mc, n, before, after, records."""

    def make(table: str, count: int, tap=None, **daemon_options) -> SimpleNamespace:
        mc, n = servers(2)
        t = taps(**(tap or {}))
        before = ClusterView([t.name, mc.name])
        after = ClusterView(before.servers, [*before.servers, n.name])
        records = list(workload.make_records(count, table=table))
        load_mixed(before, records, {t.name: t})
        d = daemons(n.name, before.servers, after.new_servers, **daemon_options)
        return SimpleNamespace(d=d, tap=t, mc=mc, n=n, before=before, after=after, records=records)

    return make
