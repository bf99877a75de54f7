"""Shared by the SNMP tests: ``astaire-snmp`` subprocesses and net-snmp's real command-line tools.

Every process listens on loopback on a port chosen at run time (the agent binds port 0 and
logs the port it got) and is stopped by the fixture that started it.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from astaire.snmp.mib import ASTAIRE, MIB_FILE
from tests.daemon_helpers import REPO, wait_for

A = ".".join(map(str, ASTAIRE))
SCALARS = {f"{A}.{n}.0": name for n, name in enumerate(
    ["buckets_needing_resync", "buckets_resynchronized", "entries_resynchronized", "data_resynchronized"], 1)}
MIB_DIRS = f"{os.path.join(os.path.dirname(MIB_FILE), 'stubs')}:{os.path.dirname(MIB_FILE)}"

needs_netsnmp = pytest.mark.skipif(shutil.which("snmpget") is None, reason="net-snmp tools not installed (scripts/setup)")


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def snmp_env(tmp: Path) -> dict:
    """net-snmp reads no system configuration and writes its persistent state under ``tmp``."""
    conf = tmp / "netsnmp-conf"
    conf.mkdir(exist_ok=True)
    return {**os.environ, "SNMPCONFPATH": str(conf), "SNMP_PERSISTENT_DIR": str(tmp / "netsnmp-state"),
            "MIBS": "", "MIBDIRS": MIB_DIRS}


class NetSnmp:
    """net-snmp's command-line tools against one agent (v2c, community ``clearwater``, numeric OIDs)."""

    def __init__(self, tmp: Path, port: int, community: str = "clearwater"):
        self.tmp, self.port, self.community = tmp, port, community
        self.env = snmp_env(tmp)

    def cmd(self, tool: str, *oids: str, opts=(), **kw) -> subprocess.CompletedProcess:
        """``tool`` with the agent address before the OIDs, as net-snmp wants them."""
        version = kw.pop("version", "2c")
        community = kw.pop("community", None)
        timeout, retries, check = kw.pop("timeout", 1.0), kw.pop("retries", 2), kw.pop("check", True)
        auth = ["-v", version, "-c", community or self.community] if version != "3" else ["-v", "3"]
        cmd = [tool, *auth, "-t", str(timeout), "-r", str(retries), *opts, f"127.0.0.1:{self.port}", *oids]
        r = subprocess.run(cmd, capture_output=True, text=True, env=self.env, timeout=60)
        if check:
            assert r.returncode == 0, f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr}{r.stdout}"
        return r

    def values(self, tool: str, *oids: str, **kw) -> dict[str, str]:
        """Numeric OID (no leading dot) -> value text, from ``-On -Oqv``-style output."""
        r = self.cmd(tool, *oids, opts=("-On", "-Oq", *kw.pop("opts", ())), **kw)
        return parse_values(r.stdout)


def parse_values(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        if not line.startswith(".") or "No more variables left" in line:
            continue
        oid, _, value = line.partition(" ")
        out[oid[1:]] = value.strip()
    return out


class AgentProcess:
    """One ``astaire-snmp`` subprocess; its log goes to ``agent.log`` in its directory."""

    def __init__(self, workdir: Path, *args: str, standalone: bool = True):
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.logfile = self.dir / "agent.log"
        self.args = (["--listen", "127.0.0.1:0"] if standalone else []) + list(args)
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None

    def start(self, wait_for_port: bool = True) -> "AgentProcess":
        self.out = open(self.logfile, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "astaire.snmp.cli", "--log-level", "debug", *self.args],
                                     cwd=REPO, stdout=self.out, stderr=subprocess.STDOUT)
        if wait_for_port:
            def port():
                assert self.proc.poll() is None, f"astaire-snmp exited {self.proc.returncode}: {self.log()}"
                m = re.search(r"listening on 127\.0\.0\.1:(\d+)", self.log())
                return int(m.group(1)) if m else None
            self.port = wait_for(port, 20, what="astaire-snmp to listen")
        return self

    def log(self) -> str:
        return self.logfile.read_text(errors="replace") if self.logfile.exists() else ""

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        if self.proc is not None:
            self.out.close()


@pytest.fixture
def snmp_agents(tmp_path):
    """``make(*args, standalone=True)`` -> a started AgentProcess; all stopped afterwards."""
    made: list[AgentProcess] = []

    def make(*args: str, standalone: bool = True, start: bool = True, wait_for_port: bool = True) -> AgentProcess:
        a = AgentProcess(tmp_path / f"agent-{len(made)}", *args, standalone=standalone)
        made.append(a)
        return a.start(wait_for_port) if start else a

    yield make
    for a in made:
        a.close()


class Trapd:
    """A real ``snmptrapd`` on a free loopback port that logs (numeric OIDs) what it receives."""

    def __init__(self, tmp: Path, community: str = "clearwater"):
        self.tmp = tmp
        self.conf = tmp / "snmptrapd.conf"
        self.conf.write_text(f"authCommunity log {community}\n")
        self.logfile = tmp / "snmptrapd.log"
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None

    def start(self, port: int | None = None) -> "Trapd":
        for _ in range(10):
            p = port or free_udp_port()
            self.out = open(self.logfile, "ab")
            self.proc = subprocess.Popen(
                ["snmptrapd", "-f", "-Lo", "-On", "-C", "-c", str(self.conf), "-n", f"udp:127.0.0.1:{p}"],
                stdout=self.out, stderr=subprocess.STDOUT, env=snmp_env(self.tmp))
            try:
                wait_for(lambda: self.proc.poll() is not None or "NET-SNMP version" in self.log(), 10,
                         what="snmptrapd to start")
            except AssertionError:
                pass
            if self.proc.poll() is None:
                self.port = p
                return self
            self.out.close()
            if port:
                break
        raise RuntimeError(f"snmptrapd did not start: {self.log()}")

    def log(self) -> str:
        return self.logfile.read_text(errors="replace") if self.logfile.exists() else ""

    def stop(self) -> None:
        stop_process(self.proc, self.out)


@pytest.fixture
def trapd(tmp_path):
    t = Trapd(tmp_path)
    yield t
    t.stop()


def wait_until(predicate, timeout=10.0, what="condition"):
    return wait_for(predicate, timeout, interval=0.1, what=what)


def seconds_since(t0: float) -> float:
    return time.monotonic() - t0


def stop_process(proc, output) -> None:
    """Terminate ``proc`` (kill it if it lingers) and close the file its output went to."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        output.close()
