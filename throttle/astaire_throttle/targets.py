"""Which processes are Astaire: the pid its pidfile names (identity checked) and all its descendants."""
from __future__ import annotations

import os

import psutil

from astaire.daemon.pidfile import DEFAULT_PIDFILE, NotRunning, find_daemon

NoTarget = NotRunning  # no live Astaire to hold (the message says why)

__all__ = ["DEFAULT_PIDFILE", "NoTarget", "read_pidfile", "process_tree"]


def read_pidfile(path: str) -> int:
    """The pid named in *path*, checked to be the process the file was written for (a
    locked pidfile, or a process started before the file was written); raises NoTarget."""
    return find_daemon(path, require_lock=False)


def process_tree(pid: int) -> list[int]:
    """*pid* and its descendants (children, recursively), never this process itself."""
    own = os.getpid()
    try:
        root = psutil.Process(pid)
        pids = [pid] + [c.pid for c in root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    return [p for p in pids if p != own]
