"""The shared-memory statistics file: round trip, seqlock consistency, tables, bandwidth."""
import os
import signal
import time

import pytest

from astaire import stats
from astaire.stats import Bandwidth, Connection, StatsReader, StatsUnavailable, StatsWriter
from astaire.demo.run import CLI


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "astaire.stats")


def test_new_file_reads_as_idle_with_zero_counters(path):
    w = StatsWriter(path, vbucket_count=128, max_connections=4)
    snap = StatsReader(path).snapshot()
    assert snap["pid"] == os.getpid()
    assert snap["state"] == "idle"
    assert snap["vbuckets"] == 128
    for k in ("buckets_needing_resync", "buckets_resynchronized", "entries_resynchronized", "data_resynchronized"):
        assert snap[k] == 0
    assert snap["connections"] == []
    assert snap["last_resync"]["result"] is None and snap["last_resync"]["failed_vbuckets"] == []
    w.close()


def test_counters_tables_and_last_resync_round_trip(path):
    w = StatsWriter(path, vbucket_count=128, max_connections=4)
    w.state = stats.STATE_RESYNCING
    w.settings_digest = "ab" * 32
    w.local_name = "10.0.0.3:11211"
    w.buckets_needing, w.buckets_resynchronized, w.entries, w.bytes = 40, 12, 3456, 789012
    w.connections[7] = Connection("10.0.0.1", 11211, [3, 5, 127], entries={3: 10, 127: 2}, bytes={3: 1000, 127: 200})
    w.connections[8] = Connection("fe80::1", 11212, [9])
    w.connections[9] = Connection("mc.example", 11211, [1, 2])
    w.last_resync = {"result": "failed", "failed_vbuckets": [0, 9, 127], "full": True, "finished_at": 123.5,
                     "seconds": 2.25, "entries": 99, "bytes": 9900}
    w.publish()
    snap = StatsReader(path).snapshot()
    assert snap["state"] == "resyncing"
    assert snap["settings_digest"] == "ab" * 32
    assert snap["local_name"] == "10.0.0.3:11211"
    assert (snap["buckets_needing_resync"], snap["buckets_resynchronized"],
            snap["entries_resynchronized"], snap["data_resynchronized"]) == (40, 12, 3456, 789012)
    c = snap["connections"]
    assert [(x["address_type"], x["address"], x["port"]) for x in c] == [
        (stats.ADDR_IPV4, "10.0.0.1", 11211), (stats.ADDR_IPV6, "fe80::1", 11212), (stats.ADDR_DNS, "mc.example", 11211)]
    assert c[0]["buckets_needing_resync"] == 3 and c[0]["buckets_resynchronized"] == 0
    assert c[0]["buckets"] == [{"vbucket": 3, "entries": 10, "bytes": 1000}, {"vbucket": 5, "entries": 0, "bytes": 0},
                               {"vbucket": 127, "entries": 2, "bytes": 200}]
    last = snap["last_resync"]
    assert last == {"result": "failed", "failed_vbuckets": [0, 9, 127], "full": True, "finished_at": 123.5,
                    "seconds": 2.25, "entries": 99, "bytes": 9900}
    w.reset_counters()
    w.publish()
    snap = StatsReader(path).snapshot()
    assert snap["state"] == "idle" and snap["connections"] == []
    assert snap["buckets_needing_resync"] == snap["entries_resynchronized"] == 0
    assert snap["last_resync"]["result"] == "failed"  # survives the reset
    w.close()


def test_layout_is_fixed_for_a_geometry(path):
    w = StatsWriter(path, vbucket_count=128, max_connections=4)
    size = os.path.getsize(path)
    w.connections[1] = Connection("10.0.0.1", 1, list(range(128)))
    w.last_resync = {"result": "ok", "failed_vbuckets": list(range(128))}
    w.publish()
    assert os.path.getsize(path) == size
    w.close()


def test_more_connections_than_slots_are_truncated_not_overflowed(path):
    w = StatsWriter(path, vbucket_count=16, max_connections=2)
    for i in range(5):
        w.connections[i] = Connection("10.0.0.1", 1000 + i, [i])
    w.publish()
    assert [c["port"] for c in StatsReader(path).snapshot()["connections"]] == [1000, 1001]
    w.close()


def test_close_removes_the_file_and_readers_say_unavailable(path):
    w = StatsWriter(path)
    w.close()
    assert not os.path.exists(path)
    with pytest.raises(StatsUnavailable):
        StatsReader(path).snapshot()


def test_a_file_that_is_not_ours_is_refused(path):
    with open(path, "wb") as f:
        f.write(b"x" * 4096)
    with pytest.raises(StatsUnavailable):
        StatsReader(path).snapshot()


def test_readers_never_see_a_torn_update(path):
    """A forked writer keeps every counter equal to one value; no snapshot may mix two."""
    w = StatsWriter(path, vbucket_count=128, max_connections=8)
    pid = os.fork()
    if pid == 0:
        try:
            n = 0
            while True:
                n += 1
                w.buckets_needing = w.buckets_resynchronized = w.entries = w.bytes = n
                w.connections = {i: Connection("10.0.0.1", n & 0xFFFF, list(range(128)),
                                               entries=dict.fromkeys(range(128), n)) for i in range(8)}
                w.publish()
        finally:
            os._exit(0)
    try:
        reader = StatsReader(path)
        seen = set()
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            s = reader.snapshot()
            n = s["entries_resynchronized"]
            assert (s["buckets_needing_resync"], s["buckets_resynchronized"], s["data_resynchronized"]) == (n, n, n)
            for c in s["connections"]:
                assert c["port"] == n & 0xFFFF
                assert all(b["entries"] == n for b in c["buckets"])
            seen.add(s["entries_resynchronized"])
        assert len(seen) > 10  # the writer really was writing while we read
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        w.close()


def test_bandwidth_is_bytes_per_second_over_the_previous_five_seconds():
    bw = Bandwidth(window=5.0)
    bw.add(1000, now=100.0)
    bw.add(4000, now=103.0)
    assert bw.rate(now=104.0) == 1000.0
    assert bw.rate(now=105.5) == 800.0  # the first sample has left the window
    assert bw.rate(now=109.0) == 0.0


def test_a_damaged_file_is_a_clear_error_never_a_traceback_or_a_made_up_number(path):
    import random
    import shutil

    w = StatsWriter(path, vbucket_count=128, max_connections=4)
    w.state = stats.STATE_RESYNCING
    w.connections[1] = Connection("10.0.0.1", 11211, [3, 5], entries={3: 10})
    w.publish()
    good = open(path, "rb").read()
    w.close(remove=False)
    rng = random.Random(7)
    damaged = path + ".damaged"
    outcomes = {"read": 0, "refused": 0}
    header_and_body = 24 + 400
    for _ in range(3000):
        data = bytearray(good)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(header_and_body)] = rng.randrange(256)
        if rng.random() < 0.2:
            data = data[: rng.randrange(len(data))]
        with open(damaged, "wb") as f:
            f.write(data)
        try:
            snap = StatsReader(damaged, retries=2).snapshot()
        except StatsUnavailable as e:
            assert str(e).startswith(damaged)
            outcomes["refused"] += 1
            continue
        assert 0 < snap["vbuckets"] <= stats.MAX_VBUCKETS
        assert all(len(c["buckets"]) <= snap["vbuckets"] for c in snap["connections"])
        outcomes["read"] += 1
    assert outcomes["refused"] > 100 and outcomes["read"] > 100
    shutil.copy(path, damaged)


def test_status_and_wait_sync_report_a_damaged_file_clearly(tmp_path):
    import subprocess

    pidfile = tmp_path / "astaire.pid"
    stats_file = tmp_path / "astaire.stats"
    settings = tmp_path / "cluster_settings"
    settings.write_text("servers=127.0.0.1:11211\n")
    # A daemon stand-in: this process holds the pidfile's lock, the stats file is garbage.
    from astaire.daemon.pidfile import Pidfile

    pf = Pidfile(str(pidfile))
    pf.acquire()
    pf.write(os.getpid())
    stats_file.write_bytes(b"ASTSTATS" + b"\xff" * 500)
    try:
        r = subprocess.run([*CLI, "status", "--pidfile", str(pidfile),
                            "--cluster-settings-file", str(settings)], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0 and "cannot be read" in r.stdout and "Traceback" not in r.stderr
        r = subprocess.run([*CLI, "wait-sync", "--pidfile", str(pidfile),
                            "--cluster-settings-file", str(settings), "--timeout-without-progress", "0.5"],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 4 and "no usable statistics" in r.stderr and "Traceback" not in r.stderr
    finally:
        pf.release()
