"""Which processes are Astaire: the pid in its pidfile and all its descendants."""
from __future__ import annotations

import os

import psutil

DEFAULT_PIDFILE = "/var/run/astaire/astaire.pid"


class NoTarget(Exception):
    """No live Astaire to hold (the message says why)."""


def read_pidfile(path: str) -> int:
    """The pid named in *path*; raises NoTarget if there is none or it is not running."""
    try:
        with open(path) as f:
            text = f.read().strip()
    except FileNotFoundError:
        raise NoTarget(f"pidfile {path} does not exist") from None
    except OSError as exc:
        raise NoTarget(f"cannot read pidfile {path}: {exc.strerror}") from None
    try:
        pid = int(text.split()[0])
    except (ValueError, IndexError):
        raise NoTarget(f"pidfile {path} holds no pid ({text[:40]!r})") from None
    if pid <= 1:
        raise NoTarget(f"pidfile {path} names pid {pid}, which cannot be Astaire")
    try:
        if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            raise NoTarget(f"pid {pid} from {path} has exited")
    except psutil.NoSuchProcess:
        raise NoTarget(f"pid {pid} from {path} is not running") from None
    return pid


def process_tree(pid: int) -> list[int]:
    """*pid* and its descendants (children, recursively), never this process itself."""
    own = os.getpid()
    try:
        root = psutil.Process(pid)
        pids = [pid] + [c.pid for c in root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    return [p for p in pids if p != own]
