"""The daemon end to end: ``python -m astaire.cli run`` against real memcached on loopback.

Every test starts its own memcached servers (and fake TAP servers where a fault or a slow
stream is needed) and its own daemons, and the ``daemons`` fixture kills whatever is left
(supervisor and workers) even when the test fails.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from astaire import codec, sink, workload
from astaire.config import settings_digest
from astaire.localcluster import MemcachedServer, free_port
from astaire.stats import StatsReader, StatsUnavailable
from astaire.view import ClusterView, vbucket_for_key
from astaire.worklist import Worklist
from tests.tapserver import TapServer

REPO = str(Path(__file__).resolve().parent.parent)


# -- harness (also used by test_ops.py) ---------------------------------------------------

def wait_for(predicate, timeout: float = 30.0, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def astaire(*args: str, timeout: float = 60.0, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "astaire.cli", *args], cwd=REPO, capture_output=True,
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
        self.proc = subprocess.Popen([sys.executable, "-m", "astaire.cli", *self.args()], cwd=REPO,
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


def owned_keys(records, view: ClusterView, node: str) -> set[bytes]:
    return {r.key for r in records if node in view.owners(vbucket_for_key(r.key, view.vbuckets))}


def assert_holds(node: str, records, view: ClusterView) -> None:
    """``node`` holds exactly the records of the vbuckets it owns in ``view`` (value, flags, expiry)."""
    report = workload.check_placement(records, {node: owned_keys(records, view, node)}, [node])
    assert report.ok, (report.missing[:5], report.wrong[:5], report.misplaced[:5])


# -- resizes ------------------------------------------------------------------------------

def test_scale_up_2_to_3_places_every_record_and_never_lets_older_data_win(servers, daemons):
    a, b, n = (s.name for s in servers(3))
    before, after = ClusterView([a, b]), ClusterView([a, b], [a, b, n])
    records = list(workload.make_records(3000, table="up"))
    workload.load(before, records)
    # A client rewrote some records after the resize began: the new home (n) already has
    # a newer version before Astaire brings the old one; more are rewritten during the resync.
    newer_before = [workload.Record(r.key, b"early-" + r.value, (r.flags + 5000) & 0xFFFFFFFF, r.expiration)
                    for r in records[:300]]
    newer_during = [workload.Record(r.key, b"during-" + r.value, (r.flags + 9000) & 0xFFFFFFFF, r.expiration)
                    for r in records[300:600]]
    load_mixed(after, newer_before, {})  # (workload.load skips servers only in new_servers)
    d = daemons(n, [a, b], [a, b, n], source="crawler")
    for i in range(0, len(newer_during), 50):
        load_mixed(after, newer_during[i:i + 50], {})
    s = d.wait_sync()
    assert s["last_resync"]["result"] == "ok" and s["last_resync"]["failed_vbuckets"] == []
    final = {r.key: r for r in records} | {r.key: r for r in newer_before + newer_during}
    report = workload.check_placement(list(final.values()),
                                      workload.expected_holders(records, before, after, [n]), [a, b, n])
    assert report.ok, (report.missing[:5], report.wrong[:5], report.misplaced[:5])
    assert "event 7006" in d.log() and "event 7007" in d.log()


def test_scale_down_3_to_2_with_a_daemon_on_each_node_that_gains(servers, daemons):
    a, b, c = (s.name for s in servers(3))
    before, after = ClusterView([a, b, c]), ClusterView([a, b, c], [a, b])
    records = list(workload.make_records(3000, table="down"))
    workload.load(before, records)
    gainers = [node for node in (a, b) if Worklist(after, node).sources]
    assert gainers, "a 3 -> 2 shrink moves vbuckets onto the remaining nodes"
    ds = [daemons(node, [a, b, c], [a, b], source="crawler", workers=1) for node in gainers]
    for d in ds:
        s = d.wait_sync()
        assert s["last_resync"]["result"] == "ok"
    report = workload.check_placement(records, workload.expected_holders(records, before, after, gainers), [a, b, c])
    assert report.ok, (report.missing[:5], report.wrong[:5], report.misplaced[:5])


# -- the tag ------------------------------------------------------------------------------

def test_local_memcached_restart_is_noticed_by_the_tag_and_triggers_a_full_resync(servers, daemons):
    local_server, other = servers(2)
    a, b = local_server.name, other.name
    view = ClusterView([a, b])
    records = list(workload.make_records(1500, table="tag"))
    workload.load(view, records)
    d = daemons(a, [a, b], source="crawler", tag_interval=0.3)
    s = d.wait_sync()
    assert s["last_resync"]["full"]  # no tag at first start: a full resync
    assert sink.tag_present(a)
    local_server.restart()  # same port, empty
    s = d.wait_sync(resyncs=2)
    assert s["last_resync"]["result"] == "ok" and s["last_resync"]["full"]
    assert s["last_resync"]["entries"] == len(records)  # everything came back from b
    assert "the resync tag is gone" in d.log()
    assert_holds(a, records, view)
    assert sink.tag_present(a)


def test_unreachable_local_memcached_is_a_warning_then_retried(servers, daemons):
    (other,) = servers(1)
    local = f"127.0.0.1:{free_port()}"
    d = daemons(local, [local, other.name], source="crawler", tag_interval=0.3)
    wait_for(lambda: d.log().count("cannot read the resync tag") >= 2, 10, what="a retried tag check")
    assert d.proc.poll() is None
    assert d.stop() == 0


# -- sources failing ---------------------------------------------------------------------

def test_a_source_killed_mid_stream_is_replaced_by_the_next_replica(tap_resize):
    r = tap_resize("die", 2000, tap={"die_after": 150})
    s = r.d.wait_sync()
    assert s["last_resync"]["result"] == "ok", r.d.log()
    assert s["last_resync"]["failed_vbuckets"] == []
    assert r.tap.connects, "the TAP server was streamed"
    assert f"from {r.tap.name} failed" in r.d.log()
    assert_holds(r.n.name, r.records, r.after)


def test_a_source_sending_malformed_frames_fails_while_the_daemon_keeps_running(daemons, servers, taps):
    (n,) = servers(1)
    bad = taps(garbage_after=40)
    dead = f"127.0.0.1:{free_port()}"
    before = ClusterView([bad.name, dead])
    after = ClusterView([bad.name, dead], [bad.name, dead, n.name])
    records = list(workload.make_records(500, table="bad"))
    load_mixed(before, records, {bad.name: bad, dead: TapServer()})  # the dead one's copy goes nowhere
    d = daemons(n.name, before.servers, after.new_servers, source="tap", tag_interval=60)
    s = d.wait_sync()
    wanted = sorted(Worklist(after, n.name).sources)
    assert s["last_resync"]["result"] == "failed"
    assert s["last_resync"]["failed_vbuckets"] == wanted
    log = d.log()
    assert "protocol" in log and "event 7005" in log
    assert d.proc.poll() is None  # still running
    assert sink.tag_present(n.name)  # the tag is set even after a failed resync
    status = d.cli("status", "--json")
    assert '"result": "failed"' in status.stdout


# -- requests during a resync -------------------------------------------------------------------

def test_sighup_in_the_middle_of_a_resync_lets_running_streams_finish_then_resyncs_the_new_view(
        servers, tap_resize):
    r = tap_resize("hup", 1500, tap={"delay_per_frame": 0.001})
    d, tap, n, before, resizing, records = r.d, r.tap, r.n, r.before, r.after, r.records
    (x,) = servers(1)
    wait_for(lambda: d.snapshot()["entries_resynchronized"] > 0 and d.snapshot()["state"] == "resyncing", 20,
             what="the resync under way")
    bigger = ClusterView(before.servers, [*resizing.new_servers, x.name])
    d.write_settings(before.servers, bigger.new_servers)
    d.signal(signal.SIGHUP)
    wait_for(lambda: "during a resync" in d.log(), 10, what="the request noticed")
    assert d.snapshot()["state"] == "resyncing"  # the running streams go on
    s = d.wait_sync(resyncs=1, timeout=60)
    log = d.log()
    assert "superseded resync stopped" in log
    assert log.count("event 7006") == 2 and log.count("event 7007") == 1
    assert tap.client_closed_early == 0  # no TAP stream was cut short
    assert s["last_resync"]["result"] == "ok"
    # Everything n owns in the new view is there; what the superseded resync had already
    # copied for the first view stays (Astaire never deletes), and nothing else is there.
    report = workload.check_placement(records, {n.name: owned_keys(records, bigger, n.name)}, [n.name])
    assert not report.missing and not report.wrong, (report.missing[:5], report.wrong[:5])
    assert {key for _, key in report.misplaced} <= owned_keys(records, resizing, n.name)


def test_a_worker_killed_mid_resync_is_replaced_and_its_stream_redone_without_double_counting(
        tap_resize):
    r = tap_resize("kill", 1200, tap={"delay_per_frame": 0.0015}, workers=2)
    d, tap, n, after, records = r.d, r.tap, r.n, r.after, r.records

    def tap_worker():
        if len(tap.connects) < 1 or d.snapshot()["entries_resynchronized"] == 0:
            return None
        for child in d.children():
            try:
                if any(c.raddr and c.raddr.port == tap.port for c in child.net_connections(kind="tcp")):
                    return child
            except psutil.NoSuchProcess:
                pass
        return None

    victim = wait_for(tap_worker, 20, what="a worker streaming from the TAP server")
    victim.send_signal(signal.SIGKILL)
    wait_for(lambda: "redoing the stream" in d.log(), 10, what="the stream redone")
    s = d.wait_sync(timeout=90)
    assert victim.pid not in [c.pid for c in d.children()]
    assert len(d.children()) == 2  # replaced
    assert len(tap.connects) >= 2  # the killed worker's stream was streamed again
    assert s["last_resync"]["result"] == "ok"
    # Every wanted record came once from each of the two old replicas: a redone stream
    # that was counted twice would push this higher.
    assert s["last_resync"]["entries"] == 2 * len(owned_keys(records, after, n.name))
    assert_holds(n.name, records, after)


# -- start, stop, refuse ------------------------------------------------------------------

def test_sigterm_in_the_middle_of_a_resync_exits_0_within_5_seconds(tap_resize):
    d = tap_resize("term", 2000, tap={"delay_per_frame": 0.002}, source="tap").d
    wait_for(lambda: d.snapshot()["entries_resynchronized"] > 0, 20, what="a stream under way")
    kids = d.children()
    t0 = time.monotonic()
    assert d.stop(timeout=5) == 0
    assert time.monotonic() - t0 < 5
    for k in kids:
        assert not k.is_running() or k.status() == psutil.STATUS_ZOMBIE
    assert not d.pidfile.exists() and not d.stats_file.exists()
    log = d.log()
    assert "event 7004" in log and "signal 15" in log and "event 7003" in log


def test_invalid_cluster_settings_at_start_exit_3_naming_file_and_line(servers, daemons):
    (n,) = servers(1)
    d = daemons(n.name, [n.name], start=False)
    d.settings.write_text(f"servers={n.name}\nbogus=1\n")
    r = astaire(*d.args(), timeout=20)
    assert r.returncode == 3, r.stderr
    assert f"{d.settings}:2" in r.stderr
    assert not d.pidfile.exists()


def test_missing_local_name_exits_2_with_a_clear_message(tmp_path):
    r = astaire("run", "--config", str(tmp_path / "none"), "--cluster-settings-file", str(tmp_path / "cs"),
                "--pidfile", str(tmp_path / "a.pid"), "--log-file", str(tmp_path / "log"), timeout=20)
    assert r.returncode == 2
    assert "--local-name" in r.stderr and "local_ip" in r.stderr


def test_local_name_comes_from_local_ip_in_the_node_config(servers, daemons):
    (n,) = servers(1)
    host, port = n.name.split(":")
    d = daemons(n.name, [n.name], start=False)
    (d.dir / "no-node-config").write_text(f"# node config\nlocal_ip={host}\nlog_level=3\n")
    args = d.args()
    i = args.index("--local-name")
    del args[i:i + 2]
    proc = subprocess.Popen([sys.executable, "-m", "astaire.cli", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    d.proc = proc
    d.out = open(os.devnull, "wb")
    d.known.add(proc.pid)
    wait_for(lambda: d._stats_pid() == proc.pid, 15, what="the daemon's statistics")
    assert d.snapshot()["local_name"] == f"{host}:11211"
    assert d.stop() == 0


def test_a_second_instance_with_the_same_pidfile_is_refused_and_a_stale_one_replaced(servers, daemons):
    (n,) = servers(1)
    d = daemons(n.name, [n.name], source="crawler")
    d.wait_sync()
    r = astaire(*d.args(), timeout=20)
    assert r.returncode == 1
    assert "already running" in r.stderr and str(d.pid) in r.stderr
    assert d.proc.poll() is None and d.snapshot()["pid"] == d.pid  # the first one is untouched
    assert d.stop() == 0
    d.pidfile.write_text("999999\n")  # stale: no such process, nobody holds the lock
    d.start()
    assert d.pidfile.read_text().strip() == str(d.pid)
    assert d.stop() == 0


def test_daemon_option_detaches_and_writes_the_daemons_pid(servers, daemons):
    (n,) = servers(1)
    d = daemons(n.name, [n.name], source="crawler", start=False, extra=("--daemon",))
    r = astaire(*d.args(), timeout=20)
    assert r.returncode == 0, r.stderr
    pid = wait_for(lambda: d.pidfile.exists() and d.pidfile.read_text().strip().isdigit()
                   and int(d.pidfile.read_text()), 10, what="the pidfile")
    d.known.add(pid)
    proc = psutil.Process(pid)
    d.known.update(c.pid for c in proc.children())
    assert proc.ppid() != os.getpid()
    assert os.getsid(pid) == pid or os.getsid(pid) != os.getsid(0)  # its own session
    wait_for(lambda: d._stats_pid() == pid, 10, what="the detached daemon's statistics")
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, 5,
             what="the detached daemon to exit")
    assert not d.pidfile.exists()


# -- reload -------------------------------------------------------------------------------

def test_reload_with_a_broken_file_keeps_the_old_view_and_a_good_one_resyncs(servers, daemons):
    a, b, n = (s.name for s in servers(3))
    before = ClusterView([a, b])
    after = ClusterView([a, b], [a, b, n])
    records = list(workload.make_records(1000, table="reload"))
    workload.load(before, records)
    d = daemons(n, [a, b], source="crawler")  # n is not in the cluster yet: nothing to pull
    s = d.wait_sync()
    assert s["last_resync"]["entries"] == 0
    old_digest = s["settings_digest"]
    d.settings.write_text(f"servers={a},{b}\nnew_servers={a},{b},{n}\nnonsense\n")
    r = d.cli("reload")
    assert r.returncode == 0, r.stderr
    wait_for(lambda: "keeping the current view" in d.log(), 10, what="the broken file logged")
    assert f"{d.settings}:3" in d.log()
    assert d.snapshot()["settings_digest"] == old_digest and d.snapshot()["state"] == "idle"
    d.write_settings([a, b], [a, b, n])
    assert d.cli("reload").returncode == 0
    s = d.wait_sync(resyncs=2)
    assert s["last_resync"]["result"] == "ok" and s["last_resync"]["entries"] > 0
    assert_holds(n, records, after)
