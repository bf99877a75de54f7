"""The agent's view of the daemon: one consistent statistics snapshot, or the reason there is none.

Everything comes from the shared-memory statistics file through the project's own reader
(``_sources``); the agent never talks to the daemon. A daemon that is not running, a
statistics file left by a dead daemon, and one whose heartbeat is too old all count as
"down": the scalars then have no instances at all, never a reassuring 0.
"""
from __future__ import annotations

import collections
import logging
import os
import threading
import time

from astaire.snmp import _sources
from astaire.snmp.mib import Tree

log = logging.getLogger("astaire.snmp")

# The daemon republishes at least every HEARTBEAT seconds; this many missed beats is stale.
STALE_AFTER = max(5.0, 5 * _sources.HEARTBEAT)
RATE_WINDOW = 5.0  # the MIB's bandwidth scope 1: the previous 5 s


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StatsSource:
    """Reads the statistics file on demand and keeps the last ``Tree`` while nothing changed.

    Thread-safe: the SNMP front end, the alarm poller and the Prometheus exporter share one.
    """

    def __init__(self, pidfile: str | None = None, stats_file: str | None = None, stale_after: float = STALE_AFTER):
        if stats_file is None:
            stats_file = _sources.stats_path_for(pidfile or _sources.DEFAULT_PIDFILE)
        self.pidfile = pidfile
        self.stats_file = stats_file
        self.stale_after = stale_after
        self.reader = _sources.StatsReader(stats_file)
        self._lock = threading.Lock()
        self._tree: Tree | None = None
        self._tree_key = None
        self._why_down: str | None = "not read yet"
        self._history: collections.deque = collections.deque()  # (monotonic, {(type, addr, port, vb): bytes})

    # -- one snapshot --------------------------------------------------------------------------

    def read(self) -> tuple[dict | None, str | None]:
        """(snapshot, None) when the daemon is up with fresh statistics, else (None, why)."""
        try:
            snap = self.reader.snapshot()
        except _sources.StatsUnavailable as e:
            return None, str(e)
        if snap["state"] == "stopped":
            return None, f"the daemon (pid {snap['pid']}) has stopped"
        if self.pidfile is not None:
            pid = _sources.daemon_pid(self.pidfile)
            if pid is None:
                return None, f"astaire is not running (no daemon holds {self.pidfile})"
            if pid != snap["pid"]:
                return None, f"{self.stats_file} belongs to pid {snap['pid']}, not to the running daemon {pid}"
        elif not _pid_alive(snap["pid"]):
            return None, f"the daemon that wrote {self.stats_file} (pid {snap['pid']}) is gone"
        age = time.time() - snap["heartbeat"]
        if age > self.stale_after:
            return None, f"{self.stats_file} is stale: last heartbeat {age:.1f} s ago (limit {self.stale_after:g} s)"
        return snap, None

    def _note(self, why: str | None) -> None:
        if why != self._why_down:
            if why is None:
                log.info("statistics available from %s", self.stats_file)
            else:
                log.warning("no statistics, the scalars answer noSuchInstance: %s", why)
            self._why_down = why

    def snapshot(self) -> dict | None:
        snap, why = self.read()
        with self._lock:
            self._note(why)
        return snap

    @property
    def why_down(self) -> str | None:
        return self._why_down

    # -- the subtree ---------------------------------------------------------------------------

    def tree(self) -> Tree:
        """The subtree now: rebuilt only when the daemon published something new."""
        snap, why = self.read()
        now = time.monotonic()
        with self._lock:
            self._note(why)
            key = None if snap is None else (snap["pid"], snap["sequence"], int(now))
            if self._tree is not None and key == self._tree_key:
                return self._tree
            rates = self._bucket_rates(snap, now) if snap is not None else {}
            self._tree = Tree(snap, rates)
            self._tree_key = key
            return self._tree

    def sample(self) -> None:
        """Record per-bucket byte counts (called about once a second) for the 5 s rates."""
        snap = self.snapshot()
        if snap is not None:
            with self._lock:
                self._bucket_rates(snap, time.monotonic())

    def _bucket_rates(self, snap: dict, now: float) -> dict:
        """Bytes/s per (type, address, port, vbucket) over the previous 5 s, from byte counts seen."""
        current = {(c["address_type"], c["address"], c["port"], b["vbucket"]): b["bytes"]
                   for c in snap["connections"] for b in c["buckets"]}
        h = self._history
        if not h or now - h[-1][0] >= 0.25:
            h.append((now, current))
        while len(h) > 1 and h[1][0] <= now - RATE_WINDOW:
            h.popleft()  # keep one sample at or before the window's start
        t0, base = h[0]
        rates = {}
        for key, nbytes in current.items():
            if key in base:
                start, span = base[key], max(now - t0, 1e-3)
                if now - t0 >= RATE_WINDOW:
                    span = now - t0
                rates[key] = max(0.0, (nbytes - start) / max(span, 1.0))
            else:  # the connection started after the oldest sample: it had 0 bytes then
                rates[key] = nbytes / RATE_WINDOW
        return rates
