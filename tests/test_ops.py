"""Operator commands (status, wait-sync, reload, full-resync), the init script and the unit."""
from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from astaire.cli import commands as ops
from astaire.demo import workload
from astaire.cluster.view import ClusterView
from astaire.demo.run import CLI
from tests.daemon_helpers import REPO, astaire, gone, wait_for


def test_stats_file_sits_beside_the_pidfile():
    assert ops.stats_path_for("/var/run/astaire/astaire.pid") == "/var/run/astaire/astaire.stats"
    assert ops.stats_path_for("/tmp/astaire") == "/tmp/astaire.stats"


def test_run_help_explains_every_option():
    r = astaire("run", "--help")
    assert r.returncode == 0
    for option in ("--local-name", "--cluster-settings-file", "--log-file", "--log-level", "--pidfile", "--daemon",
                   "--workers", "--source", "--config", "--tag-interval", "--stats-file"):
        assert option in r.stdout


def test_an_invalid_option_value_exits_2(tmp_path):
    r = astaire("run", "--local-name", "127.0.0.1:11211", "--log-level", "9", "--pidfile", str(tmp_path / "p"))
    assert r.returncode == 2 and "log level" in r.stderr


def test_commands_say_clearly_when_the_daemon_is_not_running(tmp_path):
    pidfile = str(tmp_path / "astaire.pid")
    for command in ("reload", "full-resync"):
        r = astaire(command, "--pidfile", pidfile)
        assert r.returncode == 1 and "not running" in r.stderr
    settings = tmp_path / "cs"
    r = astaire("wait-sync", "--pidfile", pidfile, "--cluster-settings-file", str(settings))
    assert r.returncode == 2 and "cannot read" in r.stderr and str(settings) in r.stderr
    settings.write_text("servers=127.0.0.1:11211\n")
    r = astaire("wait-sync", "--pidfile", pidfile, "--cluster-settings-file", str(settings))
    assert r.returncode == 1 and "not running" in r.stderr
    r = astaire("status", "--pidfile", pidfile)
    assert r.returncode == 3 and "not running" in r.stdout
    r = astaire("status", "--json", "--pidfile", pidfile)
    assert r.returncode == 3
    status = json.loads(r.stdout)
    assert status["state"] == "stopped" and status["pid"] is None
    assert status["last_resync"] == {"result": None, "failed_vbuckets": []}


def test_a_stale_pidfile_is_not_a_running_daemon(tmp_path):
    pidfile = tmp_path / "astaire.pid"
    pidfile.write_text(f"{os.getpid()}\n")  # a live pid, but nobody holds the lock
    r = astaire("reload", "--pidfile", str(pidfile))
    assert r.returncode == 1 and "not running" in r.stderr


def test_status_json_and_text_of_a_running_daemon(servers, daemons):
    a, b = (s.name for s in servers(2))
    workload.load(ClusterView([a, b]), list(workload.make_records(300, table="status")))
    d = daemons(a, [a, b], source="crawler")
    d.wait_sync()
    r = d.cli("status", "--json")
    assert r.returncode == 0, r.stderr
    status = json.loads(r.stdout)
    assert status["state"] == "idle" and status["pid"] == d.pid
    for key in ("buckets_needing_resync", "buckets_resynchronized", "entries_resynchronized", "data_resynchronized"):
        assert status[key] == 0  # no resync running
    assert status["last_resync"]["result"] == "ok" and status["last_resync"]["failed_vbuckets"] == []
    assert status["last_resync"]["entries"] == 300  # the start-up full resync read b's copies
    assert status["connections"] == [] and status["settings_current"] is True
    text = d.cli("status")
    assert text.returncode == 0 and f"pid {d.pid}" in text.stdout and "idle" in text.stdout
    assert "last full resync ok" in text.stdout


def test_status_shows_streaming_connections_during_a_resync(tap_resize):
    r = tap_resize("conn", 800, tap={"delay_per_frame": 0.002})
    d, tap = r.d, r.tap

    def tap_streaming():
        s = json.loads(d.cli("status", "--json").stdout)
        return s if any(c["port"] == tap.port and c["buckets"] for c in s["connections"]) else None

    s = wait_for(tap_streaming, 20, interval=0.1, what="the TAP connection in the table")
    assert s["state"] == "resyncing" and s["buckets_needing_resync"] > 0
    conn = next(c for c in s["connections"] if c["port"] == tap.port)
    assert conn["address"] == "127.0.0.1" and conn["address_type"] == 1
    assert conn["buckets_needing_resync"] == len(conn["buckets"])
    d.wait_sync()


def test_full_resync_command_makes_the_daemon_pull_everything_again(servers, daemons):
    a, b = (s.name for s in servers(2))
    records = list(workload.make_records(200, table="full"))
    workload.load(ClusterView([a, b]), records)
    d = daemons(a, [a, b], source="crawler")
    d.wait_sync()
    r = d.cli("full-resync")
    assert r.returncode == 0 and str(d.pid) in r.stdout
    s = d.wait_sync(resyncs=2)
    assert s["last_resync"]["full"] and s["last_resync"]["entries"] == len(records)


def test_wait_sync_shows_progress_and_returns_0_once_in_sync(tap_resize):
    d = tap_resize("wait", 800, tap={"delay_per_frame": 0.002}).d
    r = d.cli("wait-sync", "--timeout-without-progress", "30")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert any("buckets" in line and "entries" in line for line in lines)  # plain progress lines
    assert "in sync" in lines[-1]
    assert "\r" not in r.stdout  # no progress bar when stdout is not a terminal
    assert d.synced()


def test_wait_sync_draws_a_progress_bar_on_a_terminal(tap_resize):
    d = tap_resize("tty", 800, tap={"delay_per_frame": 0.002}).d
    master, slave = pty.openpty()
    proc = subprocess.Popen([*CLI, "wait-sync", "--pidfile", str(d.pidfile),
                             "--cluster-settings-file", str(d.settings)], cwd=REPO, stdout=slave,
                            stderr=subprocess.DEVNULL)
    os.close(slave)
    out = b""
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(master, 4096)
                except OSError:
                    break
                if not chunk:
                    break
                out += chunk
            elif proc.poll() is not None:
                break
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    assert b"\r" in out and b"[#" in out and b"buckets" in out


def test_wait_sync_gives_up_without_progress_and_names_the_reason(servers, daemons):
    (a,) = servers(1)
    d = daemons(a.name, [a.name], source="crawler")
    d.wait_sync()
    d.settings.write_text(d.settings.read_text() + "# edited, not reloaded\n")
    t0 = time.monotonic()
    r = d.cli("wait-sync", "--timeout-without-progress", "1")
    assert r.returncode == ops.EXIT_NO_PROGRESS
    assert time.monotonic() - t0 < 10
    assert "without progress" in r.stderr and "astaire reload" in r.stderr
    assert d.cli("reload").returncode == 0
    assert d.cli("wait-sync", "--timeout-without-progress", "10").returncode == 0


def test_wait_sync_fails_when_the_daemon_stops_while_waiting(servers, daemons):
    (a,) = servers(1)
    d = daemons(a.name, [a.name], source="crawler")
    d.wait_sync()
    d.settings.write_text(d.settings.read_text() + "# not reloaded: wait-sync waits\n")
    proc = subprocess.Popen([*CLI, "wait-sync", "--pidfile", str(d.pidfile),
                             "--cluster-settings-file", str(d.settings)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)
        assert proc.poll() is None
        assert d.stop() == 0
        _, err = proc.communicate(timeout=10)
        assert proc.returncode == ops.EXIT_NOT_RUNNING
        assert "stopped while waiting" in err
    finally:
        if proc.poll() is None:
            proc.kill()


# -- service files ------------------------------------------------------------------------

def test_systemd_unit_runs_in_the_foreground_and_reloads_with_sighup():
    unit = (Path(REPO) / "service" / "astaire.service").read_text()
    assert "ExecReload=/bin/kill -HUP $MAINPID" in unit
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    assert " run " in exec_start and "--daemon" not in exec_start
    assert "RestartPreventExitStatus=2 3" in unit


def test_init_script_start_status_reload_wait_sync_full_resync_stop(servers, tmp_path):
    a, b = (s.name for s in servers(2))
    workload.load(ClusterView([a, b]), list(workload.make_records(200, table="init")))
    settings = tmp_path / "cluster_settings"
    settings.write_text(f"servers={a},{b}\n")
    defaults = tmp_path / "default-astaire"
    pidfile = tmp_path / "run" / "astaire.pid"
    defaults.write_text(
        f'ASTAIRE="{sys.executable} -m astaire.cli"\nPIDFILE={pidfile}\nLOG_DIR={tmp_path / "log"}\n'
        f'CLUSTER_SETTINGS={settings}\nCONFIG={tmp_path / "config"}\n'
        f'DAEMON_ARGS="--local-name {a} --workers 1 --source crawler --tag-interval 30"\n')
    env = {**os.environ, "ASTAIRE_DEFAULTS": str(defaults)}
    script = str(Path(REPO) / "service" / "astaire.init")

    def init(command: str, timeout: float = 60):
        return subprocess.run(["sh", script, command], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=timeout)

    pid = None
    try:
        assert init("status").returncode == 3
        r = init("start")
        assert r.returncode == 0, r.stdout + r.stderr
        pid = int(pidfile.read_text())
        assert psutil.Process(pid).ppid() != os.getpid()  # detached
        assert init("start").returncode == 0 and int(pidfile.read_text()) == pid  # already running: no second
        r = init("wait-sync")
        assert r.returncode == 0, r.stdout + r.stderr
        st = init("status")
        assert st.returncode == 0 and f"pid {pid}" in st.stdout
        assert init("reload").returncode == 0
        assert init("full-resync").returncode == 0
        r = init("restart")
        assert r.returncode == 0, r.stdout + r.stderr
        assert gone(pid)
        pid = int(pidfile.read_text())
        r = init("stop")
        assert r.returncode == 0, r.stdout + r.stderr
        assert not pidfile.exists()
        assert init("status").returncode == 3
        assert init("bogus").returncode == 3
    finally:
        if pid and psutil.pid_exists(pid):
            for p in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
                try:
                    p.send_signal(signal.SIGKILL)
                except psutil.NoSuchProcess:
                    pass
