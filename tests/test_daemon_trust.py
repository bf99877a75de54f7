"""What the daemon must never do: report done when it is not. Real memcached on loopback."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from astaire.cluster.view import ClusterView, vbucket_for_key
from astaire.daemon.pidfile import NotRunning, find_daemon
from astaire.demo import workload
from astaire.demo.localcluster import MemcachedServer
from tests.daemon_helpers import astaire, wait_for


def test_a_local_memcached_without_cas_is_refused_with_event_7008_and_wait_sync_exit_6(servers, daemons):
    (source,) = servers(1)
    local = MemcachedServer(memory_mb=64, extra_args=("-C",)).start()
    try:
        view = ClusterView([source.name], [source.name, local.name])
        workload.load(ClusterView([source.name]), workload.make_records(200, table="nocas"))
        d = daemons(local.name, [source.name], [source.name, local.name], source="crawler", tag_interval=0.3)
        s = wait_for(lambda: d.snapshot()["last_resync"]["result"] == "refused" and d.snapshot(), 20,
                     what="the refusal")
        assert s["target_cas_disabled"] is True
        assert s["last_resync"]["failed_vbuckets"] == sorted(
            vb for vb in range(128) if local.name in view.new[vb])
        assert "event 7008" in d.log()
        assert workload.fetch(local.name, [b"nocas\\\\key-0"]) == {}  # nothing was blindly SET
        r = astaire("wait-sync", "--pidfile", str(d.pidfile), "--timeout-without-progress", "10")
        assert r.returncode == 6, r.stderr
        assert "without CAS" in r.stderr
        status = astaire("status", "--pidfile", str(d.pidfile))
        assert "runs without CAS" in status.stdout
    finally:
        local.stop()


def test_a_local_node_in_neither_list_warns_with_event_7009_and_wait_sync_exits_5(servers, daemons):
    a, b = servers(2)
    typo = f"localhost:{a.port}"  # named unlike the server lists (a typo): reachable, not a member
    d = daemons(typo, [a.name, b.name], source="crawler")
    s = wait_for(lambda: d.snapshot()["resyncs_completed"] >= 1 and d.snapshot(), 20, what="the first resync")
    assert s["local_in_cluster"] is False
    assert "event 7009" in d.log()
    r = astaire("wait-sync", "--pidfile", str(d.pidfile))
    assert r.returncode == 5, r.stderr
    assert "neither server list" in r.stderr


def test_wait_sync_does_not_take_a_stale_not_in_cluster_for_the_edited_settings(servers, daemons):
    """The node joins: its daemon ran with the local node in neither list, the settings now
    name it. Until the daemon takes them in (astaire reload), its statistics still say "not
    in the cluster", about the old file: wait-sync must wait for the new one, not exit 5."""
    a, b = servers(2)
    d = daemons(b.name, [a.name], source="crawler")
    wait_for(lambda: d.snapshot()["resyncs_completed"] >= 1, 20, what="the first resync")
    assert d.snapshot()["local_in_cluster"] is False
    d.write_settings([a.name], [a.name, b.name])  # edited, not yet reloaded
    r = astaire("wait-sync", "--pidfile", str(d.pidfile), "--timeout-without-progress", "1")
    assert r.returncode != 5 and "neither server list" not in r.stderr, r.stderr
    assert "run 'astaire reload'" in r.stderr, r.stderr
    d.signal(signal.SIGHUP)
    r = astaire("wait-sync", "--pidfile", str(d.pidfile), "--timeout-without-progress", "20")
    assert r.returncode == 0, r.stderr
    assert d.snapshot()["local_in_cluster"] is True


def test_wait_sync_and_status_find_the_daemons_settings_file_through_the_pidfile_alone(servers, daemons):
    a, b = servers(2)
    d = daemons(a.name, [a.name, b.name], source="crawler")
    d.wait_sync()
    for command in ("wait-sync", "status"):
        r = astaire(command, "--pidfile", str(d.pidfile))
        assert r.returncode == 0, (command, r.stderr)
    assert str(d.settings) in astaire("wait-sync", "--pidfile", str(d.pidfile)).stdout


def test_failed_vbuckets_make_wait_sync_exit_6_naming_them(servers, daemons):
    (n,) = servers(1)
    dead = "127.0.0.1:1"  # nothing listens on port 1: the only old replica of its vbuckets
    d = daemons(n.name, [dead], [dead, n.name], source="crawler", extra=("--stall-timeout", "5"))
    s = wait_for(lambda: d.snapshot()["resyncs_completed"] >= 1 and d.snapshot(), 30, what="the resync")
    assert s["last_resync"]["result"] == "failed" and s["last_resync"]["failed_vbuckets"]
    r = astaire("wait-sync", "--pidfile", str(d.pidfile))
    assert r.returncode == 6
    assert "could not serve vbuckets" in r.stderr


def test_the_arbiter_takes_sighup_and_sigterm_while_the_local_memcached_is_frozen(servers, daemons):
    local, other = servers(2)
    d = daemons(local.name, [local.name, other.name], source="crawler", tag_interval=0.2)
    d.wait_sync()
    os.kill(local.proc.pid, signal.SIGSTOP)
    try:
        time.sleep(0.5)  # a tag check is now stuck on the frozen memcached
        d.settings.write_text(f"servers={local.name},{other.name}\nnew_servers={other.name}\n")
        os.kill(d.pid, signal.SIGHUP)
        wait_for(lambda: "SIGHUP: cluster view changed" in d.log(), 5, what="SIGHUP taken while memcached is frozen")
        t0 = time.monotonic()
        assert d.stop(timeout=10) == 0
        assert time.monotonic() - t0 < 8
    finally:
        os.kill(local.proc.pid, signal.SIGCONT)


def test_a_restart_after_the_resync_ends_in_a_full_resync_that_restores_every_record(servers, daemons):
    """Found by the identity check (pid and start time over binary STAT), not only the tag."""
    a, b, n = servers(3)
    before = ClusterView([a.name, b.name])
    records = list(workload.make_records(3000, table="late"))
    workload.load(before, records)
    d = daemons(n.name, [a.name, b.name], [a.name, b.name, n.name], source="crawler", tag_interval=0.3)
    s = d.wait_sync()
    first = s["resyncs_completed"]
    n.restart()  # empty, same port: a new pid and start time
    s = d.wait_sync(resyncs=first + 1)
    assert s["last_resync"]["full"] and s["last_resync"]["result"] == "ok"
    holds = workload.fetch(n.name, [r.key for r in records])
    after = ClusterView([a.name, b.name], [a.name, b.name, n.name])
    owned = {r.key for r in records if n.name in after.new[vbucket_for_key(r.key)]}
    assert owned and owned <= set(holds), f"{len(owned - set(holds))} records missing after the restart"


def _sleeper_started_after(path) -> subprocess.Popen:
    time.sleep(1.2)  # the pidfile is older than the process by more than the slack
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])


def test_a_reused_pid_in_an_unlocked_pidfile_is_not_taken_for_astaire(tmp_path):
    pidfile = tmp_path / "astaire.pid"
    pidfile.write_text("0\n")
    os.utime(pidfile, (time.time() - 5, time.time() - 5))
    other = _sleeper_started_after(pidfile)
    try:
        mtime = pidfile.stat().st_mtime
        pidfile.write_text(f"{other.pid}\n")
        os.utime(pidfile, (mtime, mtime))  # as if written long before this process started
        with pytest.raises(NotRunning, match="reused"):
            find_daemon(str(pidfile), require_lock=False)
        pidfile.write_text(f"{other.pid}\n")  # written now, after the process started: believed
        assert find_daemon(str(pidfile), require_lock=False) == other.pid
        with pytest.raises(NotRunning, match="stale"):
            find_daemon(str(pidfile))  # the daemon's own pidfile must be locked
    finally:
        other.kill()
        other.wait()


def test_the_throttle_does_not_touch_a_process_that_reused_astaires_pid(tmp_path):
    from tests.throttle_helpers import V1_ROOT  # noqa: F401 (puts throttle/ on the path)
    from astaire_throttle.targets import NoTarget, read_pidfile

    pidfile = tmp_path / "astaire.pid"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        pidfile.write_text(f"{other.pid}\n")
        old = psutil.Process(other.pid).create_time() - 10
        os.utime(pidfile, (old, old))
        with pytest.raises(NoTarget, match="reused"):
            read_pidfile(str(pidfile))
    finally:
        other.kill()
        other.wait()


def _tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def test_pausing_the_whole_daemon_as_the_throttle_does_never_counts_as_a_hung_worker(tap_resize):
    r = tap_resize("paused", 400, tap={"delay_per_frame": 0.01}, source="tap",
                   extra=("--worker-timeout", "1", "--connect-timeout", "0.2"))
    wait_for(lambda: r.d.snapshot()["connections"], 20, what="a streaming worker")
    procs = _tree(r.d.pid)
    for p in procs:
        p.suspend()
    time.sleep(7)  # longer than the liveness bound (max(--worker-timeout, 3 x connect timeout + 5) = 5.6 s)
    for p in procs:
        p.resume()
    s = r.d.wait_sync()
    assert s["last_resync"]["result"] == "ok"
    assert "has been silent" not in r.d.log()
    assert r.tap.client_closed_early == 0


def test_sigterm_mid_tap_stream_reads_it_to_the_end_and_never_closes_early(tap_resize):
    r = tap_resize("term", 600, tap={"delay_per_frame": 0.004}, source="tap")
    wait_for(lambda: r.d.snapshot()["entries_resynchronized"] > 0, 20, what="the TAP stream under way")
    assert r.d.stop(timeout=30) == 0
    assert r.tap.client_closed_early == 0
    assert r.tap.streams_completed >= 1
    assert "discarding" in r.d.log()  # the log says what was drained
