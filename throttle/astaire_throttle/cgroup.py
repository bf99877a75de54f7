"""The cgroup cpu controller: find it, make the ``astaire`` group, set its quota.

cgroup v1 (a hierarchy with the cpu controller, e.g. ``/sys/fs/cgroup/cpu``)
goes through cgroupspy; cgroup v2 (``cpu.max`` in a child of the unified
hierarchy) is written directly, since cgroupspy knows only v1. Both take their
root directory as a constructor argument so tests can point them anywhere.

The quota is the node's share: ``period x CPUs x percentage / 100``, so 5% on
a 2-CPU node is 10 ms of CPU per 100 ms period, spread however the scheduler
likes over Astaire's processes.
"""
from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass
from typing import Iterable

from cgroupspy.controllers import CpuController
from cgroupspy.nodes import Node

log = logging.getLogger(__name__)

DEFAULT_CGROUP_NAME = "astaire"
DEFAULT_PERIOD_US = 100_000
MIN_QUOTA_US = 1_000  # the kernel refuses smaller cfs quotas


class CgroupUnavailable(RuntimeError):
    """This cgroup hierarchy cannot be used to hold Astaire (why is in the message)."""


def quota_us(period_us: int, cpus: int, percentage: float) -> int:
    """The cfs quota that grants *percentage*% of each of *cpus* CPUs per period."""
    return max(MIN_QUOTA_US, round(period_us * cpus * percentage / 100))


def check_group_name(name: str) -> str:
    """*name* if it is a single, plain cgroup directory name."""
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise ValueError(f"invalid cgroup name {name!r}: one plain directory name expected")
    return name


# -- Finding the hierarchies -------------------------------------------------------


@dataclass(frozen=True)
class Mount:
    mount_point: str
    fstype: str
    super_options: frozenset[str]


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    out, i = [], 0
    while i < len(field):
        code = field[i + 1:i + 4]
        if field[i] == "\\" and len(code) == 3 and code.isdigit():
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[Mount]:
    """The cgroup and cgroup2 mounts listed in /proc/self/mountinfo *text*."""
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        fstype = tail[0]
        if fstype not in ("cgroup", "cgroup2"):
            continue
        mounts.append(Mount(_unescape(fields[4]), fstype, frozenset(tail[2].split(","))))
    return mounts


def read_mounts(mountinfo_path: str = "/proc/self/mountinfo") -> list[Mount]:
    try:
        with open(mountinfo_path) as f:
            return parse_mountinfo(f.read())
    except OSError as exc:
        log.warning("cannot read %s (%s): no cgroup hierarchy found", mountinfo_path, exc)
        return []


def find_v1_cpu_root(mounts: Iterable[Mount]) -> str | None:
    """The mount point of the cgroup v1 hierarchy that has the cpu controller."""
    for m in mounts:
        if m.fstype == "cgroup" and "cpu" in m.super_options:
            return m.mount_point
    return None


def find_v2_root(mounts: Iterable[Mount]) -> str | None:
    """The mount point of the unified (cgroup2) hierarchy."""
    for m in mounts:
        if m.fstype == "cgroup2":
            return m.mount_point
    return None


def v2_controllers(root: str) -> set[str]:
    """The controllers the unified hierarchy at *root* can hand to its children."""
    try:
        with open(os.path.join(root, "cgroup.controllers")) as f:
            return set(f.read().split())
    except OSError:
        return set()


# -- The limiters ------------------------------------------------------------------


def _moved(pid: int, write) -> bool:
    """Write one *pid* to a procs file via *write*; False if the process is gone."""
    try:
        write(pid)
        return True
    except OSError as exc:
        if exc.errno == errno.ESRCH:
            return False
        raise


class _CgroupLimiter:
    """What the v1 and v2 limiters share: where the group is, and finding it again."""

    inherits = True  # children are born in their parent's cgroup

    def __init__(self, root: str, name: str, cpus: int | None):
        self.root = root.rstrip("/") or "/"
        self.name = check_group_name(name)
        self.cpus = cpus or os.cpu_count() or 1
        self.path = os.path.join(self.root, self.name)
        self.percentage: float | None = None

    def __str__(self) -> str:
        return f"{self.kind} group {self.path}"

    def _forget_group(self) -> None:
        """Drop what is known of the group, so that set_percentage creates it again."""
        raise NotImplementedError

    def _members_or_recreate(self) -> set[int]:
        """The group's members; if the group disappeared, it is created again (empty)."""
        try:
            return self.members()
        except FileNotFoundError:
            log.warning("%s disappeared; creating it again", self)
            self._forget_group()
            self.set_percentage(self.percentage)
            return set()

    def hold(self, seconds: float, waker) -> bool:
        """Wait for the next poll (the kernel enforces the quota); True if told to stop."""
        return waker.wait(seconds)


class CgroupV1Limiter(_CgroupLimiter):
    """The ``astaire`` group in a cgroup v1 hierarchy with the cpu controller."""

    kind = "cgroup v1"

    def __init__(self, root: str = "/sys/fs/cgroup/cpu", name: str = DEFAULT_CGROUP_NAME,
                 cpus: int | None = None):
        super().__init__(root, name, cpus)
        self._group: CpuController | None = None
        self._quota: int | None = None

    def _forget_group(self) -> None:
        self._group = None

    def _open_group(self) -> CpuController:
        if not os.path.isfile(os.path.join(self.root, "cpu.cfs_quota_us")):
            raise CgroupUnavailable(f"{self.root} is not a cgroup v1 cpu hierarchy "
                                    "(no cpu.cfs_quota_us)")
        hierarchy = Node(self.root.encode())
        try:
            node = hierarchy.create_cgroup(self.name)  # reuses an existing group
        except OSError as exc:
            raise CgroupUnavailable(f"cannot create {self.path}: {exc.strerror}") from exc
        # CpuController directly: cgroupspy infers controllers from the mount's name,
        # which is "cpu,cpuacct" on many systems.
        return CpuController(node)

    def set_percentage(self, percentage: float) -> None:
        """Create (or reuse) the group and set its quota; raises CgroupUnavailable."""
        group = self._group or self._open_group()
        try:
            period = group.cfs_period_us or DEFAULT_PERIOD_US
            quota = quota_us(period, self.cpus, percentage)
            group.cfs_quota_us = quota
        except OSError as exc:
            raise CgroupUnavailable(f"cannot set the cpu quota of {self.path}: "
                                    f"{exc.strerror}") from exc
        self._group, self.percentage, self._quota = group, percentage, quota
        log.info("%s: cpu.cfs_quota_us=%d per cpu.cfs_period_us=%d (%g%% of each of %d CPUs)",
                 self, quota, period, percentage, self.cpus)

    def members(self) -> set[int]:
        return set(self._group.procs) if self._group else set()

    def attach(self, pids: Iterable[int]) -> list[int]:
        """Move *pids* into the group (one pid per write); the ones newly moved.

        Also puts the quota back if something else changed it.
        """
        if self._group is None:
            raise RuntimeError("set_percentage() first")
        present = self._members_or_recreate()
        current = self._group.cfs_quota_us  # None means -1
        if current != self._quota:
            log.warning("%s: cpu.cfs_quota_us was changed to %s; setting it back to %d",
                        self, -1 if current is None else current, self._quota)
            self._group.cfs_quota_us = self._quota
        moved = []
        for pid in pids:
            if pid not in present and _moved(pid, lambda p: setattr(self._group, "procs", [p])):
                moved.append(pid)
        return moved

    def release(self) -> None:
        """Lift the limit (quota -1); the processes may stay in the group."""
        if self._group is not None:
            self._group.cfs_quota_us = -1
            log.info("%s: limit lifted (cpu.cfs_quota_us=-1)", self)


class CgroupV2Limiter(_CgroupLimiter):
    """The ``astaire`` child of a cgroup v2 (unified) hierarchy, via ``cpu.max``."""

    kind = "cgroup v2"

    def __init__(self, root: str = "/sys/fs/cgroup", name: str = DEFAULT_CGROUP_NAME,
                 cpus: int | None = None):
        super().__init__(root, name, cpus)
        self._ready = False
        self._cpu_max = ""

    def _forget_group(self) -> None:
        self._ready = False

    def _file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def _open_group(self) -> None:
        if "cpu" not in v2_controllers(self.root):
            raise CgroupUnavailable(
                f"the cpu controller is not available in {self.root} (cgroup.controllers "
                "lacks cpu; it may be bound to a cgroup v1 hierarchy)")
        control = os.path.join(self.root, "cgroup.subtree_control")
        try:
            with open(control) as f:
                enabled = f.read().split()
            if "cpu" not in enabled:
                with open(control, "w") as f:
                    f.write("+cpu")
                log.info("enabled +cpu in %s", control)
        except OSError as exc:
            raise CgroupUnavailable(f"cannot enable +cpu in {control}: {exc.strerror}") from exc
        try:
            os.makedirs(self.path, exist_ok=True)
        except OSError as exc:
            raise CgroupUnavailable(f"cannot create {self.path}: {exc.strerror}") from exc
        if not os.path.exists(self._file("cpu.max")):
            raise CgroupUnavailable(f"{self.path} has no cpu.max")
        self._ready = True

    def _period(self) -> int:
        with open(self._file("cpu.max")) as f:
            fields = f.read().split()
        return int(fields[1]) if len(fields) > 1 else DEFAULT_PERIOD_US

    def set_percentage(self, percentage: float) -> None:
        """Create (or reuse) the group and set ``cpu.max``; raises CgroupUnavailable."""
        if not self._ready:
            self._open_group()
        try:
            period = self._period()
            quota = quota_us(period, self.cpus, percentage)
            with open(self._file("cpu.max"), "w") as f:
                f.write(f"{quota} {period}")
        except (OSError, ValueError) as exc:
            raise CgroupUnavailable(f"cannot set {self._file('cpu.max')}: {exc}") from exc
        self.percentage, self._cpu_max = percentage, f"{quota} {period}"
        log.info("%s: cpu.max=\"%d %d\" (%g%% of each of %d CPUs)",
                 self, quota, period, percentage, self.cpus)

    def members(self) -> set[int]:
        with open(self._file("cgroup.procs")) as f:
            return {int(w) for w in f.read().split()}

    def _write_pid(self, pid: int) -> None:
        # O_APPEND: the kernel takes one pid per write either way, and a plain
        # directory laid out like a cgroup (tests) keeps every pid written.
        fd = os.open(self._file("cgroup.procs"), os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, b"%d\n" % pid)
        finally:
            os.close(fd)

    def attach(self, pids: Iterable[int]) -> list[int]:
        """Move *pids* into the group (one pid per write); the ones newly moved.

        Also puts ``cpu.max`` back if something else changed it.
        """
        if not self._ready:
            raise RuntimeError("set_percentage() first")
        present = self._members_or_recreate()
        with open(self._file("cpu.max")) as f:
            current = " ".join(f.read().split())
        if current != self._cpu_max:
            log.warning("%s: cpu.max was changed to %r; setting it back to %r",
                        self, current, self._cpu_max)
            with open(self._file("cpu.max"), "w") as f:
                f.write(self._cpu_max)
        return [pid for pid in pids if pid not in present and _moved(pid, self._write_pid)]

    def release(self) -> None:
        """Lift the limit (``cpu.max`` = max); the processes may stay in the group."""
        if self._ready:
            period = self._period()
            with open(self._file("cpu.max"), "w") as f:
                f.write(f"max {period}")
            log.info("%s: limit lifted (cpu.max=\"max %d\")", self, period)
