"""Real memcached processes on loopback, for the demo, the benchmark and the tests.

Ports are picked by binding port 0 and are retried if memcached loses the race for one.
Every process started here is stopped by ``stop()`` / the context manager.
"""
from __future__ import annotations

import functools
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

MEMCACHED = os.environ.get("ASTAIRE_MEMCACHED", "memcached")

# The Clearwater TAP fork is built from ../shared/tap-fork beside a checkout (or the script
# this variable names); its build script prints the install prefix last.
TAP_FORK_BUILD_ENV = "ASTAIRE_TAP_FORK_BUILD"


class TapForkMissing(RuntimeError):
    """No build script for the Clearwater TAP fork is available."""


def tap_fork_build_script() -> Path:
    """The fork's build script: $ASTAIRE_TAP_FORK_BUILD, else ``../shared/tap-fork/build.sh``
    beside this checkout; TapForkMissing if neither exists."""
    given = os.environ.get(TAP_FORK_BUILD_ENV)
    script = Path(given) if given else Path(__file__).resolve().parents[3] / "shared" / "tap-fork" / "build.sh"
    if not script.exists():
        raise TapForkMissing(f"the Clearwater TAP fork's build script {script} is absent "
                             f"(set {TAP_FORK_BUILD_ENV})")
    return script


@functools.cache
def tap_fork_prefix() -> str:
    """The fork's install prefix, built (idempotently) by its build script on first use.
    TapForkMissing without a script; RuntimeError, with the build's output, if it fails."""
    return run_build_script(tap_fork_build_script(), "the TAP fork")


def run_build_script(script: str | Path, what: str) -> str:
    """Run an idempotent build script (the TAP fork's, scripts/build-memcached) and return
    the last line it prints (where it installed); RuntimeError, with its output, if it fails."""
    r = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=600)
    if r.returncode != 0 or not r.stdout.strip():
        raise RuntimeError(f"building {what} with {script} failed: {r.stderr[-2000:]}")
    return r.stdout.strip().splitlines()[-1]


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the caller must still cope with losing it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_connectable(host: str, port: int, timeout: float = 5.0, proc: subprocess.Popen | None = None) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.02)
    return False


class MemcachedServer:
    """One stock memcached on 127.0.0.1 and a free port (``exe``: another memcached binary
    than ASTAIRE_MEMCACHED, by default Debian's)."""

    def __init__(self, memory_mb: int = 256, threads: int = 1, extra_args: tuple[str, ...] = (), host: str = "127.0.0.1",
                 exe: str | None = None):
        self.exe = exe or MEMCACHED
        self.memory_mb = memory_mb
        self.threads = threads
        self.extra_args = tuple(extra_args)
        self.host = host
        self.port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def name(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> "MemcachedServer":
        exe = shutil.which(self.exe)
        if exe is None:
            raise RuntimeError(f"{self.exe} is not installed (apt-get install memcached)")
        for _attempt in range(20):
            port = self.port or free_port(self.host)
            args = [exe, "-l", self.host, "-p", str(port), "-U", "0", "-m", str(self.memory_mb),
                    "-t", str(self.threads), "-c", "4096", *self.extra_args]
            if os.geteuid() == 0:
                args += ["-u", "root"]
            proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            if wait_connectable(self.host, port, proc=proc):
                self.port, self.proc = port, proc
                return self
            proc.kill()
            proc.wait()
            if self.port:  # a fixed port (restart) that did not come back
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                raise RuntimeError(f"memcached did not start on {self.host}:{port}: {err.strip()}")
        raise RuntimeError("could not start memcached on a free port after 20 attempts")

    def stop(self) -> None:
        # memcached keeps nothing on disk, and 1.6.18 takes about a second to honour SIGTERM
        # once a client has connected: SIGKILL is both quicker and equivalent.
        self.kill()

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            if self.proc.stderr:
                self.proc.stderr.close()
            self.proc = None

    def restart(self) -> None:
        """Stop and start again on the same port: memcached comes back empty."""
        self.stop()
        self.start()

    def __enter__(self) -> "MemcachedServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class LocalCluster:
    """Several memcached servers; ``names`` in start order."""

    def __init__(self, count: int, **kwargs):
        self.servers = [MemcachedServer(**kwargs) for _ in range(count)]

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.servers]

    def start(self) -> "LocalCluster":
        try:
            for s in self.servers:
                s.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for s in self.servers:
            s.stop()

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
