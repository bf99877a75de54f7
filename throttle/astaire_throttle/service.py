"""The throttle service: choose a limiter, keep Astaire's processes in it.

Once a second (by default) it reads Astaire's pidfile, walks the process
tree under that pid and hands any process not yet held to the limiter, so a
restarted Astaire (a new pid) or a new worker is picked up. SIGTERM/SIGINT
end the loop and lift the limit; SIGHUP re-reads the percentage.
"""
from __future__ import annotations

import logging
import os
import select
import signal
import time

from astaire_throttle.cgroup import (
    DEFAULT_CGROUP_NAME,
    CgroupUnavailable,
    CgroupV1Limiter,
    CgroupV2Limiter,
    find_v1_cpu_root,
    find_v2_root,
    read_mounts,
    v2_controllers,
)
from astaire_throttle.config import DEFAULT_CONFIG_PATH, load_cpu_limit
from astaire_throttle.signals import DutyCycleLimiter
from astaire_throttle.targets import DEFAULT_PIDFILE, NoTarget, process_tree, read_pidfile

log = logging.getLogger(__name__)

MODES = ("auto", "v1", "v2", "signal")
FULL_SCAN_SECONDS = 10.0


class Waker:
    """Sleeps that end early when a signal asks the service to stop (or reload).

    Signal handlers only set flags; the wakeup fd makes a sleeping select()
    return at once, so a stop is handled within milliseconds.
    """

    def __init__(self) -> None:
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)
        self.stop_requested = False
        self.reload_requested = False
        self.signum: int | None = None
        self._saved: dict[int, object] = {}
        self._saved_fd: int | None = None

    def install(self) -> "Waker":
        self._saved_fd = signal.set_wakeup_fd(self._w, warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._saved[sig] = signal.signal(sig, self._on_stop)
        self._saved[signal.SIGHUP] = signal.signal(signal.SIGHUP, self._on_reload)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)
        self._saved.clear()
        if self._saved_fd is not None:
            signal.set_wakeup_fd(self._saved_fd)
            self._saved_fd = None

    def close(self) -> None:
        self.uninstall()
        os.close(self._r)
        os.close(self._w)

    def _on_stop(self, signum, frame) -> None:
        self.stop_requested, self.signum = True, signum

    def _on_reload(self, signum, frame) -> None:
        self.reload_requested = True

    def request_stop(self) -> None:
        self.stop_requested = True
        try:
            os.write(self._w, b"\0")
        except BlockingIOError:
            pass

    def wait(self, timeout: float) -> bool:
        """Sleep up to *timeout* seconds; True if a stop was requested."""
        if not self.stop_requested and timeout > 0:
            select.select([self._r], [], [], timeout)
            try:
                while os.read(self._r, 512):
                    pass
            except BlockingIOError:
                pass
        return self.stop_requested


def open_limiter(mode: str, percentage: float, name: str = DEFAULT_CGROUP_NAME,
                 v1_root: str | None = None, v2_root: str | None = None,
                 cpus: int | None = None, mountinfo: str = "/proc/self/mountinfo"):
    """The first limiter *mode* allows that works, already set to *percentage*.

    ``auto`` tries the cgroup v1 cpu hierarchy, then cgroup v2, then the signal
    duty cycle. ``v1``/``v2`` use only that hierarchy and raise CgroupUnavailable
    if it cannot be used.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}")
    mounts = read_mounts(mountinfo) if mode != "signal" and not (v1_root and v2_root) else []
    v1_root = v1_root or find_v1_cpu_root(mounts)
    v2_root = v2_root or find_v2_root(mounts)
    if mode != "signal":
        log.info("cgroup hierarchies: v1 with the cpu controller at %s; cgroup2 at %s%s",
                 v1_root or "(none)", v2_root or "(none)",
                 f" (controllers: {' '.join(sorted(v2_controllers(v2_root))) or 'none'})"
                 if v2_root else "")
    candidates = []
    if mode in ("auto", "v1"):
        if v1_root:
            candidates.append(CgroupV1Limiter(v1_root, name, cpus))
        elif mode == "v1":
            raise CgroupUnavailable("no cgroup v1 hierarchy with the cpu controller is mounted")
    if mode in ("auto", "v2"):
        if v2_root:
            candidates.append(CgroupV2Limiter(v2_root, name, cpus))
        elif mode == "v2":
            raise CgroupUnavailable("no cgroup2 hierarchy is mounted")
    for limiter in candidates:
        try:
            limiter.set_percentage(percentage)
        except CgroupUnavailable as exc:
            if mode != "auto":
                raise
            log.warning("%s cannot be used: %s", limiter.kind, exc)
            continue
        log.info("using %s", limiter)
        return limiter
    if mode == "auto":
        log.warning("no writable cgroup cpu controller: falling back to stopping and "
                    "continuing Astaire's processes (SIGSTOP/SIGCONT duty cycle, as cpulimit "
                    "did); this is coarser than a cgroup quota")
    limiter = DutyCycleLimiter(cpus)
    limiter.set_percentage(percentage)
    log.info("using %s", limiter)
    return limiter


class Throttle:
    """Holds the processes of the Astaire named in *pidfile* to the configured share."""

    def __init__(self, config_path: str = DEFAULT_CONFIG_PATH, pidfile: str = DEFAULT_PIDFILE,
                 mode: str = "auto", cgroup_name: str = DEFAULT_CGROUP_NAME,
                 v1_root: str | None = None, v2_root: str | None = None,
                 poll_interval: float = 1.0, cpus: int | None = None,
                 mountinfo: str = "/proc/self/mountinfo"):
        self.config_path = config_path
        self.pidfile = pidfile
        self.mode = mode
        self.cgroup_name = cgroup_name
        self.v1_root = v1_root
        self.v2_root = v2_root
        self.poll_interval = poll_interval
        self.cpus = cpus
        self.mountinfo = mountinfo
        self.limiter = None
        self._pid: int | None = None
        self._held = 0
        self._next_walk = 0.0
        self._problem: str | None = None

    def start(self) -> None:
        """Read the percentage and set up the limiter; raises CgroupUnavailable."""
        percentage = load_cpu_limit(self.config_path)
        self.limiter = open_limiter(self.mode, percentage, self.cgroup_name, self.v1_root,
                                    self.v2_root, self.cpus, self.mountinfo)

    def reload(self) -> None:
        percentage = load_cpu_limit(self.config_path)
        if percentage == self.limiter.percentage:
            log.info("reload: the limit is unchanged at %g%%", percentage)
            return
        try:
            self.limiter.set_percentage(percentage)
        except CgroupUnavailable as exc:
            log.error("reload: cannot change the limit to %g%%: %s", percentage, exc)

    def apply(self) -> int:
        """Put every Astaire process not yet held under the limit; how many are held.

        Walking the process tree reads every /proc/<pid>/stat on the node, so with a
        cgroup it is done only when the pid changes, when the supervisor is found
        outside the group, and every FULL_SCAN_SECONDS; in between, workers forked
        by a supervisor in the group are in it already. A walk that moved something is
        followed by a second one: a child forked while its parent was being moved was
        born outside the group.
        """
        try:
            pid = read_pidfile(self.pidfile)
        except NoTarget as exc:
            if str(exc) != self._problem:
                log.warning("no Astaire to hold: %s; polling every %gs",
                            exc, self.poll_interval)
                self._problem = str(exc)
            self._pid, self._held = None, 0
            self.limiter.attach([])
            return 0
        self._problem = None
        now = time.monotonic()
        try:
            walk = pid != self._pid or not self.limiter.inherits or now >= self._next_walk
            if not walk:
                walk = bool(self.limiter.attach([pid]))  # moved out: its workers may be too
            if walk:
                pids = process_tree(pid)
                moved = self.limiter.attach(pids)
                if moved and self.limiter.inherits:
                    # A process moved just now may have forked between the walk and its
                    # move: that child was born outside the group and would stay there until
                    # the next full walk. A second walk finds it; anything forked after the
                    # move is born inside.
                    pids = process_tree(pid)
                    moved += self.limiter.attach(pids)
                self._held, self._next_walk = len(pids), now + FULL_SCAN_SECONDS
            else:
                moved = []
        except (OSError, CgroupUnavailable) as exc:
            log.error("cannot move Astaire's processes into %s: %s", self.limiter, exc)
            return 0
        if pid != self._pid:
            log.info("Astaire pid %d (from %s): %d process(es) held by %s",
                     pid, self.pidfile, self._held, self.limiter)
            self._pid = pid
        elif moved:
            log.info("%d new Astaire process(es) held by %s: %s",
                     len(moved), self.limiter, " ".join(map(str, moved)))
        return self._held

    def run(self, waker: Waker) -> None:
        """Keep the limit applied until *waker* says stop; then lift it."""
        try:
            while not waker.stop_requested:
                if waker.reload_requested:
                    waker.reload_requested = False
                    self.reload()
                self.apply()
                if self.limiter.hold(self.poll_interval, waker):
                    break
        finally:
            self.stop()

    def stop(self) -> None:
        if self.limiter is not None:
            try:
                self.limiter.release()
            except OSError as exc:
                log.error("cannot lift the limit of %s: %s", self.limiter, exc)
