"""The fallback when no cgroup is writable: a SIGSTOP/SIGCONT duty cycle.

As ``cpulimit`` did, Astaire's processes are continued for part of every
short slot (100 ms) and stopped for the rest. The running part of the slot
follows a feedback loop: the group's measured CPU use (through psutil)
is compared with the allowed share, the difference accumulates as a bounded
debt, and the next slot's running time is what pays the share minus part of
that debt at the group's measured demand. It is coarser than a cfs quota
(a busy worker can overshoot within one slot) but holds the average.

Whatever happens, the processes are left continued: every ``hold`` ends with
SIGCONT, and so does ``release``.
"""
from __future__ import annotations

import logging
import os
import signal
import time
from typing import Iterable

import psutil

log = logging.getLogger(__name__)

SLOT_SECONDS = 0.1
DEBT_GAIN = 0.3  # fraction of the accumulated overshoot repaid per slot
MAX_CREDIT_SECONDS = 1.0  # an idle spell earns at most this many seconds of share


def read_stat(pid: int) -> tuple[float, float] | None:
    """(start time, CPU seconds used) of *pid*, through psutil; None if it is gone or a zombie."""
    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            if proc.status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
                return None
            times = proc.cpu_times()
            return proc.create_time(), times.user + times.system
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


class DutyCycleLimiter:
    """Holds a set of processes to a CPU share by stopping and continuing them."""

    kind = "signal duty cycle"
    inherits = False  # a new worker must be found and tracked

    def __init__(self, cpus: int | None = None, slot: float = SLOT_SECONDS):
        self.cpus = cpus or os.cpu_count() or 1
        self.slot = slot
        self.percentage: float | None = None
        self._target = 0.0  # CPU seconds per wall second
        self._start: dict[int, float] = {}  # pid -> start time (guards against pid reuse)
        self._ticks: dict[int, float] = {}  # pid -> CPU seconds at the last measurement
        self._measured_at: float | None = None
        self._demand: float | None = None  # CPUs the group uses while running
        self._debt = 0.0  # CPU seconds used beyond the share (negative: credit)
        self._run_fraction = 1.0
        self._stopped = False

    def __str__(self) -> str:
        return f"{self.kind} ({self.slot * 1000:g} ms slots)"

    def set_percentage(self, percentage: float) -> None:
        self.percentage = percentage
        self._target = self.cpus * percentage / 100
        log.info("%s: holding the processes to %g CPU seconds per second "
                 "(%g%% of each of %d CPUs)", self, self._target, percentage, self.cpus)

    def members(self) -> set[int]:
        return set(self._start)

    def attach(self, pids: Iterable[int]) -> list[int]:
        """Track exactly *pids* from now on; the ones newly tracked."""
        wanted = list(dict.fromkeys(pids))
        for pid in set(self._start) - set(wanted):
            if self._stopped:
                self._signal_one(pid, signal.SIGCONT)  # it left the tree: never leave it stopped
            self._start.pop(pid, None)
            self._ticks.pop(pid, None)
        added = []
        for pid in wanted:
            if pid in self._start:
                continue
            stat = read_stat(pid)
            if stat is None:
                continue
            self._start[pid], self._ticks[pid] = stat
            if self._stopped:
                self._signal_one(pid, signal.SIGSTOP)
            added.append(pid)
        return added

    def _signal_one(self, pid: int, sig: int) -> None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

    def _signal_all(self, sig: int) -> None:
        for pid in list(self._start):
            self._signal_one(pid, sig)
        self._stopped = sig == signal.SIGSTOP

    def _measure(self) -> float:
        """CPU seconds the tracked processes used since the last call; drops dead ones."""
        used = 0
        for pid, start in list(self._start.items()):
            stat = read_stat(pid)
            if stat is None or stat[0] != start:
                del self._start[pid], self._ticks[pid]
                continue
            used += max(0, stat[1] - self._ticks[pid])
            self._ticks[pid] = stat[1]
        return used

    def _steer(self, used: float, wall: float, ran: float) -> None:
        """Choose the next slot's running fraction from the last slot's figures."""
        if ran > 0.002 * self.slot:
            measured = used / ran
            self._demand = measured if self._demand is None else 0.5 * (self._demand + measured)
        self._debt += used - self._target * wall
        self._debt = max(self._debt, -self._target * MAX_CREDIT_SECONDS)
        demand = self._demand if self._demand is not None else float(max(1, len(self._start)))
        if demand <= 1e-6:
            self._run_fraction = 1.0  # idle: nothing to hold back
            return
        wanted = self._target * self.slot - DEBT_GAIN * self._debt
        self._run_fraction = min(1.0, max(0.0, wanted / (demand * self.slot)))

    def hold(self, seconds: float, waker) -> bool:
        """Run the duty cycle for *seconds*; True if *waker* says stop. Leaves all continued."""
        deadline = time.monotonic() + seconds
        ran = 0.0
        try:
            while True:
                now = time.monotonic()
                used = self._measure()
                if self._measured_at is not None:
                    self._steer(used, now - self._measured_at, ran)
                self._measured_at = now
                if now >= deadline:
                    return False
                slot = min(self.slot, deadline - now)
                run = slot * self._run_fraction
                began = time.monotonic()
                self._signal_all(signal.SIGCONT)
                if run > 0 and waker.wait(run):
                    return True
                if self._run_fraction < 1.0:
                    self._signal_all(signal.SIGSTOP)
                ran = time.monotonic() - began
                if waker.wait(max(0.0, slot - ran)):
                    return True
        finally:
            self._signal_all(signal.SIGCONT)

    def release(self) -> None:
        """Continue every tracked process and stop tracking them."""
        self._signal_all(signal.SIGCONT)
        log.info("%s: limit lifted, %d process(es) continued", self, len(self._start))
        self._start.clear()
        self._ticks.clear()
