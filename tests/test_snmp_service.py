"""service/astaire-snmp.init (start|stop|restart|status) and the systemd unit."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import psutil

from tests.daemon_helpers import REPO, gone
from tests.snmp_helpers import wait_until


def test_unit_runs_astaire_snmp_in_the_foreground():
    unit = (Path(REPO) / "service" / "astaire-snmp.service").read_text()
    assert "Type=simple" in unit and re.search(r"^ExecStart=\S*astaire-snmp --pidfile", unit, re.M)
    assert "--daemon" not in unit


def test_init_script_start_status_restart_stop(tmp_path):
    env = {**os.environ, "ASTAIRE_SNMP": f"{sys.executable} -m astaire.snmp.cli",
           "ASTAIRE_PIDFILE": str(tmp_path / "astaire.pid"), "PIDFILE": str(tmp_path / "run" / "astaire-snmp.pid"),
           "LOGFILE": str(tmp_path / "log" / "astaire-snmp.log"), "CONFIG": os.devnull,
           "SNMP_ARGS": "--listen 127.0.0.1:0", "DEFAULTS": str(tmp_path / "none")}
    script = str(Path(REPO) / "service" / "astaire-snmp.init")

    def init(command):
        return subprocess.run(["sh", script, command], env=env, cwd=REPO, capture_output=True, text=True, timeout=30)

    pidfile = tmp_path / "run" / "astaire-snmp.pid"
    started = []
    try:
        assert init("status").returncode == 3
        assert init("start").returncode == 0
        pid = int(pidfile.read_text())
        started.append(pid)
        wait_until(lambda: "listening on 127.0.0.1:" in (tmp_path / "log" / "astaire-snmp.log").read_text(), 15,
                   "the agent to listen")
        assert init("status").returncode == 0
        assert init("start").returncode == 0 and int(pidfile.read_text()) == pid  # already running
        assert init("restart").returncode == 0
        new = int(pidfile.read_text())
        started.append(new)
        assert new != pid
        assert gone(pid)
        assert init("stop").returncode == 0
        assert init("status").returncode == 3
        assert not pidfile.exists()
    finally:
        for p in started:
            try:
                psutil.Process(p).kill()
            except psutil.NoSuchProcess:
                pass
