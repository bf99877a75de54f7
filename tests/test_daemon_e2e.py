"""The daemon end to end: ``python -m astaire.cli run`` against real memcached on loopback.

Every test starts its own memcached servers (and fake TAP servers where a fault or a slow
stream is needed) and its own daemons, and the ``daemons`` fixture kills whatever is left
(supervisor and workers) even when the test fails.
"""
from __future__ import annotations

import os
import signal
import subprocess

import psutil

from astaire.demo import workload
from astaire.resync import target
from astaire.demo.localcluster import free_port
from astaire.cluster.view import ClusterView, vbucket_for_key
from astaire.cluster.worklist import Worklist
from astaire.demo.run import CLI
from tests.daemon_helpers import REPO, astaire, gone, load_mixed, wait_for
from tests.tapserver import TapServer


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
    assert target.tag_present(a)
    local_server.restart()  # same port, empty
    s = d.wait_sync(resyncs=2)
    assert s["last_resync"]["result"] == "ok" and s["last_resync"]["full"]
    assert s["last_resync"]["entries"] == len(records)  # everything came back from b
    assert "(it restarted)" in d.log() or "restarted (pid" in d.log()  # the tag or the identity check
    assert_holds(a, records, view)
    assert target.tag_present(a)


def test_unreachable_local_memcached_is_a_warning_then_retried(servers, daemons):
    (other,) = servers(1)
    local = f"127.0.0.1:{free_port()}"
    d = daemons(local, [local, other.name], source="crawler", tag_interval=0.3)
    wait_for(lambda: d.log().count("does not answer") >= 2, 10, what="a retried check of the local memcached")
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
    assert target.tag_present(n.name)  # the tag is set even after a failed resync
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

def test_sigterm_in_the_middle_of_a_resync_drains_then_exits_0_leaving_nothing_behind(tap_resize):
    r = tap_resize("term", 2000, tap={"delay_per_frame": 0.002}, source="tap")
    d = r.d
    wait_for(lambda: d.snapshot()["entries_resynchronized"] > 0, 20, what="a stream under way")
    kids = d.children()
    assert d.stop(timeout=60) == 0  # the TAP stream is read to the server's close first (--stop-timeout)
    assert r.tap.client_closed_early == 0
    for k in kids:
        assert gone(k)
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
    proc = subprocess.Popen([*CLI, *args], cwd=REPO, stdout=subprocess.DEVNULL,
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
    wait_for(lambda: gone(pid), 30,
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
