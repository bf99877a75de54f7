"""The daemon's pidfile: one module for the daemon, the operator commands and the throttle.

The daemon holds an exclusive ``flock`` on its pidfile for its whole life, so a held lock
means a running daemon, and a file nobody locks is stale (a crashed daemon's) and is
replaced at the next start. Readers check the process's identity before they signal or
throttle it: a pid can be reused by an unrelated process once the daemon is gone. Where
the lock cannot prove identity (a pidfile written by hand, or by a supervisor such as
start-stop-daemon), the process must have started before the file was last written: a
process started later is not the one the file names.
"""
from __future__ import annotations

import errno
import fcntl
import os

DEFAULT_PIDFILE = "/var/run/astaire/astaire.pid"
START_SLACK = 1.0  # seconds: process start times and file times come from different clocks


class AlreadyRunning(Exception):
    def __init__(self, pid: int | None, path: str):
        self.pid, self.path = pid, path
        who = f"with pid {pid}" if pid else "(pid unknown)"
        super().__init__(f"astaire is already running {who}: {path} is held by it; stop it first")


class NotRunning(Exception):
    """No live daemon is named by the pidfile; the message says why."""


def read_pid(path: str) -> int | None:
    """The pid written in ``path``; None when the file is missing or holds no pid."""
    try:
        with open(path) as f:
            text = f.read(64).strip()
    except OSError:
        return None
    first = text.split()[0] if text else ""
    return int(first) if first.isdigit() and int(first) > 0 else None


def _locked(path: str) -> bool | None:
    """Whether some process holds a lock on ``path`` (None when it cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def find_daemon(path: str, require_lock: bool = True) -> int:
    """The pid of the live process ``path`` names; raises NotRunning saying why not.

    With ``require_lock`` (the daemon's own pidfile) a file nobody locks is stale. Without
    it, an unlocked file is believed only if its process started before the file was
    written.
    """
    try:
        with open(path) as f:
            text = f.read(64).strip()
        written = os.stat(path).st_mtime
    except FileNotFoundError:
        raise NotRunning(f"pidfile {path} does not exist") from None
    except OSError as exc:
        raise NotRunning(f"cannot read pidfile {path}: {exc.strerror or exc}") from None
    try:
        pid = int(text.split()[0])
    except (ValueError, IndexError):
        raise NotRunning(f"pidfile {path} holds no pid ({text[:40]!r})") from None
    if pid <= 1:
        raise NotRunning(f"pidfile {path} names pid {pid}, which cannot be Astaire")
    locked = _locked(path)
    if require_lock and not locked:
        raise NotRunning(f"pidfile {path} is stale: no running astaire holds it (pid {pid})")
    import psutil  # here, not at the top: the daemon itself never needs it (0.025 s at start-up)

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            raise NotRunning(f"pid {pid} from {path} has exited")
        started = proc.create_time()
    except psutil.NoSuchProcess:
        raise NotRunning(f"pid {pid} from {path} is not running") from None
    if not locked and started > written + START_SLACK:
        raise NotRunning(f"pid {pid} from {path} belongs to another process, started after the "
                         f"pidfile was written (the pid was reused)")
    return pid


def daemon_pid(path: str) -> int | None:
    """The pid of the daemon holding ``path``, or None when no live daemon holds it."""
    try:
        return find_daemon(path)
    except NotRunning:
        return None


class Pidfile:
    """The pidfile, locked (flock) for the daemon's lifetime: a live lock means a running
    daemon; a file without one is stale and is replaced."""

    def __init__(self, path: str):
        self.path = path
        self.fd: int | None = None

    def acquire(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise AlreadyRunning(read_pid(self.path), self.path) from None
            raise
        self.fd = fd

    def write(self, pid: int) -> None:
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{pid}\n".encode(), 0)

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            if read_pid(self.path) == os.getpid():
                os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None
