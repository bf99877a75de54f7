"""The supervisor's parts: resync bookkeeping, the pidfile, the worker channel, and the
arbiter itself run in a forked child with forked workers whose streams are faked (the
end-to-end tests in test_daemon_e2e.py use real streams)."""
from __future__ import annotations

import os
import signal
import socket
import time
from types import SimpleNamespace

import pytest

from astaire.daemon import logs, worker
from astaire.stats import StatsReader, StatsUnavailable
from astaire.daemon.arbiter import Options, Supervisor
from astaire.daemon.bookkeeping import MAX_STREAM_ATTEMPTS, Resync, ranges as _ranges
from astaire.daemon.pidfile import AlreadyRunning, Pidfile, daemon_pid
from astaire.cluster.view import ClusterView
from astaire.cluster.worklist import Worklist

S1, S2, LOCAL = "10.0.0.1:11211", "10.0.0.2:11211", "10.0.0.3:11211"
RESIZING = ClusterView([S1, S2], [S1, S2, LOCAL])


# -- resync bookkeeping -------------------------------------------------------------------

def test_one_pass_hands_out_each_server_once_and_counts_buckets_on_success_only():
    wl = Worklist(RESIZING, LOCAL)
    r = Resync(wl, full=False)
    assert r.needing == wl.needing == 2 * len(wl.sources)
    assert r.start()
    assert sorted(s.server for s in r.pending) == [S1, S2]
    first, second = r.take(101), r.take(102)
    assert r.take(103) is None and set(r.running) == {first.id, second.id}
    assert len(first.vbuckets) == len(second.vbuckets) == len(wl.sources)  # every vbucket from both
    r.progress(first, {first.vbuckets[0]: (3, 300)})
    r.finished(first, True, {first.vbuckets[0]: (5, 500)})  # final counts replace the progress
    assert (r.entries, r.bytes, r.resynchronized) == (5, 500, len(first.vbuckets))
    r.progress(second, {second.vbuckets[0]: (7, 700)})
    r.finished(second, False, {second.vbuckets[0]: (7, 700)})
    assert r.resynchronized == len(first.vbuckets)  # a failed stream resynchronizes nothing
    assert r.entries == 12  # ...but what it received was received
    assert second.server in wl.failed_servers
    assert not r.start()  # one pass: nothing more
    assert wl.failed_vbuckets == []  # the good source served them all


def test_a_stream_whose_target_failed_is_requeued_and_its_source_not_blamed():
    wl = Worklist(RESIZING, LOCAL)
    r = Resync(wl, full=False)
    r.start()
    s = r.take(1)
    r.progress(s, {s.vbuckets[0]: (4, 400)})
    r.requeue(s)
    assert (r.entries, r.bytes) == (0, 0) and r.pending[0] is s and s.attempts == 0
    assert wl.failed_servers == []


def test_a_stream_whose_worker_died_is_requeued_first_and_its_progress_uncounted():
    r = Resync(Worklist(RESIZING, LOCAL), full=False)
    r.start()
    s = r.take(1)
    r.progress(s, {s.vbuckets[0]: (40, 4000), s.vbuckets[1]: (2, 200)})
    assert (r.entries, r.bytes) == (42, 4200)
    assert r.worker_lost(s)
    assert (r.entries, r.bytes) == (0, 0) and s.reported == {}
    assert r.pending[0] is s and s.id not in r.running
    again = r.take(2)
    assert again is s and s.worker == 2
    r.progress(s, {s.vbuckets[0]: (40, 4000)})
    r.finished(s, True, {s.vbuckets[0]: (45, 4500)})
    assert (r.entries, r.bytes) == (45, 4500)  # counted once


def test_a_stream_that_kills_its_worker_every_time_fails_its_source():
    wl = Worklist(RESIZING, LOCAL)
    r = Resync(wl, full=False)
    r.start()
    s = r.take(1)
    for attempt in range(1, MAX_STREAM_ATTEMPTS):
        assert r.worker_lost(s)
        assert r.take(attempt + 1) is s
    assert not r.worker_lost(s)
    assert s.server in wl.failed_servers and s not in r.pending


def test_a_superseded_resync_hands_out_nothing_more():
    r = Resync(Worklist(RESIZING, LOCAL), full=False)
    r.start()
    r.superseded = True
    assert r.take(1) is None and r.pending


def test_stream_ids_stay_unique_across_resyncs():
    import itertools

    ids = itertools.count(1)
    a = Resync(Worklist(RESIZING, LOCAL), False, ids=ids)
    a.start()
    b = Resync(Worklist(RESIZING, LOCAL), True, ids=ids)
    b.start()
    assert not {s.id for s in a.pending} & {s.id for s in b.pending}


def test_ranges():
    assert _ranges([]) == ""
    assert _ranges([1, 2, 3, 7, 9, 10]) == "1-3,7,9-10"


# -- pidfile -----------------------------------------------------------------------------

def test_pidfile_is_locked_while_held_and_a_stale_one_is_replaced(tmp_path):
    path = str(tmp_path / "run" / "astaire.pid")
    first = Pidfile(path)
    first.acquire()
    first.write(os.getpid())
    assert daemon_pid(path) == os.getpid()
    with pytest.raises(AlreadyRunning) as exc:
        Pidfile(path).acquire()
    assert str(os.getpid()) in str(exc.value) and path in str(exc.value)
    first.release()
    assert not os.path.exists(path) and daemon_pid(path) is None
    with open(path, "w") as f:
        f.write("4194000\n")  # stale: nobody holds the lock
    assert daemon_pid(path) is None
    second = Pidfile(path)
    second.acquire()
    second.write(os.getpid())
    with open(path) as f:
        assert f.read() == f"{os.getpid()}\n"
    second.release()


# -- the worker channel ---------------------------------------------------------------------

def _fake_run_stream(job, progress=None, progress_interval=0.25, should_stop=None):
    if job.source == S2:
        return SimpleNamespace(ok=False, error="source broke the protocol", kind="tap", stats={},
                               vbucket_counts={}, seconds=0.01)
    if progress:
        progress({vb: (1, 10) for vb in job.vbuckets})
    time.sleep(0.02)
    return SimpleNamespace(ok=True, error=None, kind="crawler", stats={"entries": 2 * len(job.vbuckets)},
                           vbucket_counts={vb: (2, 20) for vb in job.vbuckets}, seconds=0.02)


def _fake_stream(monkeypatch, run=_fake_run_stream):
    monkeypatch.setattr(worker, "_load_stream", lambda: (lambda **kw: SimpleNamespace(**kw), run))


def _messages(sock: socket.socket, want: str, timeout: float = 10.0) -> list[dict]:
    sock.settimeout(timeout)
    up, got = worker.unpacker(), []
    while True:
        data = sock.recv(65536)
        assert data, f"channel closed before {want!r}: {got}"
        up.feed(data)
        for msg in up:
            got.append(msg)
            if msg["t"] == want:
                return got


def _end(pid, sock):
    """Close the supervisor's end of a worker's channel and make sure the worker is gone."""
    sock.close()
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


def test_a_worker_reports_ready_progress_and_result_then_quits(monkeypatch):
    _fake_stream(monkeypatch)
    pid, sock = worker.spawn()
    try:
        assert _messages(sock, "ready")[0] == {"t": "ready", "pid": pid}
        sock.sendall(worker.pack({"t": "job", "id": 7, "job": {"source": S1, "vbuckets": [3, 4], "target": LOCAL}}))
        msgs = _messages(sock, "result")
        assert msgs[0] == {"t": "progress", "id": 7, "d": {3: [1, 10], 4: [1, 10]}}
        result = msgs[-1]
        assert result["ok"] and result["id"] == 7 and result["counts"] == {3: [2, 20], 4: [2, 20]}
        sock.sendall(worker.pack({"t": "quit"}))
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == worker.EXIT_OK
    finally:
        _end(pid, sock)


def test_a_sigterm_that_reaches_a_worker_before_it_took_its_signals_still_stops_it(monkeypatch):
    """The supervisor stops workers with SIGTERM. One that came between the fork and the
    worker's own handler ran the supervisor's handler in the child and was lost: the worker
    then waited for jobs until the supervisor's stop timeout (60 s) killed it."""
    _fake_stream(monkeypatch)
    supervisor_saw = []
    previous = signal.signal(signal.SIGTERM, lambda sig, frame: supervisor_saw.append(sig))  # as the supervisor's

    def slow_reopen():  # the child's set-up before the worker takes its signals, made long
        time.sleep(1.0)

    monkeypatch.setattr(worker.logs, "reopen_for_worker", slow_reopen)
    try:
        pid, sock = worker.spawn()
    finally:
        signal.signal(signal.SIGTERM, previous)
    try:
        time.sleep(0.2)
        os.kill(pid, signal.SIGTERM)  # inside the window
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.05)
        assert done == pid, "the worker did not stop on SIGTERM"
        assert os.waitstatus_to_exitcode(status) in (worker.EXIT_OK, -signal.SIGTERM)
    finally:
        _end(pid, sock)


def test_a_worker_that_cannot_load_the_stream_machinery_exits_with_the_boot_failure_code(monkeypatch):
    def broken():
        raise ImportError("no astaire.stream")

    monkeypatch.setattr(worker, "_load_stream", broken)
    pid, sock = worker.spawn()
    sock.close()
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == worker.EXIT_BOOT_ERROR


def test_a_worker_exits_when_the_supervisor_goes_away(monkeypatch):
    _fake_stream(monkeypatch)
    pid, sock = worker.spawn()
    _messages(sock, "ready")
    sock.close()
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == worker.EXIT_OK


def test_an_unexpected_exception_in_a_stream_is_a_failed_result_not_a_dead_worker(monkeypatch):
    def buggy(job, progress=None, progress_interval=0.25, should_stop=None):
        raise RuntimeError("bug")

    _fake_stream(monkeypatch, buggy)
    pid, sock = worker.spawn()
    try:
        _messages(sock, "ready")
        sock.sendall(worker.pack({"t": "job", "id": 1, "job": {"source": S1, "vbuckets": [1], "target": LOCAL}}))
        result = _messages(sock, "result")[-1]
        assert not result["ok"] and "bug" in result["error"]
    finally:
        sock.close()
        os.waitpid(pid, 0)


# -- the arbiter in a child process -----------------------------------------------------------

class Child:
    """A Supervisor.run() in a forked child; events go to a file through the injectable sink.
    The local memcached's tag is the file ``self.tag``: set_tag creates it, a "restart" removes it."""

    def __init__(self, tmp_path, view: ClusterView, workers: int = 2, tag: bool = True):
        self.dir = tmp_path
        self.settings = tmp_path / "cluster_settings"
        self.settings.write_text(f"servers={','.join(view.servers)}\nnew_servers={','.join(view.new_servers)}\n")
        self.events = tmp_path / "events"
        self.log = tmp_path / "log" / "astaire_current.log"
        self.options = Options(local_name=LOCAL, cluster_settings_file=str(self.settings),
                               log_dir=str(tmp_path / "log"), log_level=5, pidfile=str(tmp_path / "a.pid"),
                               stats_file=str(tmp_path / "a.stats"), workers=workers, tag_interval=0.2)
        self.view = view
        self.tag = tmp_path / "tag"
        if tag:
            self.tag.touch()
        self.pid = None

    def start(self) -> "Child":
        pid = os.fork()
        if pid == 0:
            code = 99
            try:
                events = open(self.events, "a")

                def sink(priority, message):
                    events.write(f"{priority} {message}\n")
                    events.flush()

                logs.set_event_sink(sink)
                logs.setup_logging(self.options.log_dir, 5)
                tag = self.tag

                class FakeNode:  # the local memcached: its tag is a file; it never restarts otherwise
                    def __init__(self, name, timeout=5.0):
                        pass

                    def identity(self):
                        return (1, 1)

                    def tag_present(self):
                        return tag.exists()

                    def set_tag(self):
                        tag.touch()

                    def cas_enabled(self):
                        return True

                Supervisor.node_factory = FakeNode
                from astaire.cluster.settings import settings_digest

                pidfile = Pidfile(self.options.pidfile)
                pidfile.acquire()
                pidfile.write(os.getpid())
                code = Supervisor(self.options, self.view, settings_digest(str(self.settings)), pidfile).run()
            finally:
                os._exit(code)
        self.pid = pid
        return self

    def snapshot(self) -> dict | None:
        try:
            return StatsReader(self.options.stats_file).snapshot()
        except StatsUnavailable:
            return None

    def wait_resyncs(self, n: int, timeout: float = 10.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = self.snapshot()
            if s and s["resyncs_completed"] >= n and s["state"] == "idle":
                return s
            time.sleep(0.02)
        raise AssertionError(f"no {n} resyncs: {self.snapshot()}\n{self.log.read_text()}")

    def stop(self) -> int:
        os.kill(self.pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.pid = None
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.02)
        raise AssertionError("the supervisor did not stop within 5 s")

    def kill(self) -> None:
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass

    def event_ids(self) -> list[int]:
        return [int(line.split()[1]) for line in self.events.read_text().splitlines()]


@pytest.fixture
def child(tmp_path, monkeypatch):
    made = []

    def make(view, **kw) -> Child:
        c = Child(tmp_path, view, **kw)
        made.append(c)
        return c.start()

    yield make
    for c in made:
        c.kill()


def test_a_failed_source_is_replaced_by_the_next_replica_and_the_events_are_in_order(child, monkeypatch):
    _fake_stream(monkeypatch)
    c = child(RESIZING)
    s = c.wait_resyncs(1)
    wanted = Worklist(RESIZING, LOCAL).sources
    assert s["last_resync"]["result"] == "ok" and s["last_resync"]["failed_vbuckets"] == []
    # S2 failed in round 1; S1 served every wanted vbucket once (2 entries each).
    assert s["last_resync"]["entries"] == 2 * len(wanted)
    assert s["buckets_needing_resync"] == s["entries_resynchronized"] == 0
    assert c.stop() == 0
    assert c.event_ids() == [7002, 7006, 7007, 7004, 7003]
    assert not os.path.exists(c.options.pidfile) and not os.path.exists(c.options.stats_file)
    assert all(" - Description: " in line and "@@Cause: " in line and "@@Effect: " in line and "@@Action: " in line
               for line in c.events.read_text().splitlines())


def test_vbuckets_no_source_could_serve_are_reported_and_the_resync_still_ends(child, monkeypatch):
    def all_fail(job, progress=None, progress_interval=0.25, should_stop=None):
        return SimpleNamespace(ok=False, error="unreachable", kind=None, stats={}, vbucket_counts={}, seconds=0)

    _fake_stream(monkeypatch, all_fail)
    c = child(RESIZING)
    s = c.wait_resyncs(1)
    assert s["last_resync"]["result"] == "failed"
    assert s["last_resync"]["failed_vbuckets"] == sorted(Worklist(RESIZING, LOCAL).sources)
    assert c.stop() == 0
    assert 7005 in c.event_ids() and 7007 not in c.event_ids()
    assert "vbuckets" in c.events.read_text()


def test_sigusr1_forces_a_full_resync_and_sighup_with_an_unchanged_view_does_not_resync(child, monkeypatch):
    _fake_stream(monkeypatch)
    c = child(RESIZING)
    s = c.wait_resyncs(1)
    assert not s["last_resync"]["full"]
    os.kill(c.pid, signal.SIGUSR1)
    s = c.wait_resyncs(2)
    assert s["last_resync"]["full"]
    c.settings.write_text(c.settings.read_text() + "# a comment changes the digest, not the view\n")
    os.kill(c.pid, signal.SIGHUP)
    from astaire.cluster.settings import settings_digest

    deadline = time.monotonic() + 5
    while c.snapshot()["settings_digest"] != settings_digest(str(c.settings)):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(0.3)
    assert c.snapshot()["resyncs_completed"] == 2
    assert "view unchanged" in c.log.read_text()
    assert c.stop() == 0


def test_a_same_view_edit_during_a_resync_is_taken_in_when_the_resync_ends(child, monkeypatch):
    def slow(job, progress=None, progress_interval=0.25, should_stop=None):
        time.sleep(0.6)
        return _fake_run_stream(job, progress, progress_interval, should_stop)

    _fake_stream(monkeypatch, slow)
    c = child(RESIZING)
    deadline = time.monotonic() + 5
    while (c.snapshot() or {}).get("state") != "resyncing":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    c.settings.write_text(c.settings.read_text() + "# comment only\n")
    os.kill(c.pid, signal.SIGHUP)
    s = c.wait_resyncs(1)
    from astaire.cluster.settings import settings_digest

    assert s["settings_digest"] == settings_digest(str(c.settings))
    assert s["resyncs_completed"] == 1  # the same view: no second resync
    assert c.stop() == 0


def test_a_missing_tag_triggers_a_full_resync_at_start_and_is_set_after_it(child, monkeypatch):
    _fake_stream(monkeypatch)
    c = child(ClusterView([S1, LOCAL]), tag=False)
    s = c.wait_resyncs(1)
    assert s["last_resync"]["full"] and c.tag.exists()
    c.tag.unlink()  # the local memcached restarted
    s = c.wait_resyncs(2)
    assert s["last_resync"]["full"] and c.tag.exists()
    assert c.stop() == 0


def test_a_local_restart_during_a_resync_that_began_with_the_tag_supersedes_it_with_a_full_one(
        child, monkeypatch):
    def slow(job, progress=None, progress_interval=0.25, should_stop=None):
        time.sleep(0.5)
        return _fake_run_stream(job, progress, progress_interval, should_stop)

    _fake_stream(monkeypatch, slow)
    c = child(RESIZING)  # tag present: a view resync, watched
    deadline = time.monotonic() + 5
    while (c.snapshot() or {}).get("state") != "resyncing":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert not c.snapshot()["resync_full"]
    c.tag.unlink()
    s = c.wait_resyncs(1)
    assert s["last_resync"]["full"]  # the view resync was superseded, not completed
    log = c.log.read_text()
    assert "the resync tag is gone" in log and "superseded resync stopped" in log
    assert c.stop() == 0


def test_workers_that_fail_to_boot_are_respawned_with_growing_delays(child, monkeypatch):
    def broken():
        raise ImportError("no astaire.stream")

    monkeypatch.setattr(worker, "_load_stream", broken)
    c = child(RESIZING, workers=1)
    time.sleep(2.2)
    assert c.stop() == 0
    log = c.log.read_text()
    delays = [float(line.split("next spawn in ")[1].split()[0]) for line in log.splitlines()
              if "failed to boot" in line]
    assert 2 <= len(delays) <= 4, log  # 0.5 + 1 + 2 s: not a tight crash loop
    assert delays == sorted(delays) and delays[1] == 2 * delays[0]
    assert "no astaire.stream" in log
