"""What the astaire-throttle tests share: where the cgroup hierarchies are, a fake cgroup2
layout, and a test-only group that is removed afterwards (the ``group_name`` fixture, made
available by conftest)."""
import errno
import os
import secrets
import sys
import time
from pathlib import Path

import pytest

try:
    import astaire_throttle  # noqa: F401  (installed, or on PYTHONPATH)
except ImportError:  # running from a bare checkout: the package lives in throttle/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "throttle"))

from astaire_throttle.cgroup import find_v1_cpu_root, find_v2_root, read_mounts

MOUNTS = read_mounts()
V1_ROOT = find_v1_cpu_root(MOUNTS)
V2_ROOT = find_v2_root(MOUNTS)
CPUS = os.cpu_count()


def v1_writable() -> bool:
    return bool(V1_ROOT) and os.access(os.path.join(V1_ROOT, "cgroup.procs"), os.W_OK)


needs_v1 = pytest.mark.skipif(not v1_writable(), reason="no writable cgroup v1 cpu hierarchy")


def fake_cgroup2(root: Path, child: str, subtree_control: str = "") -> Path:
    """Lay ``root`` out like a cgroup2 root with the cpu controller available and one child
    group, whose path is returned (the kernel would create the child's files at mkdir; a
    plain directory cannot)."""
    group = root / child
    group.mkdir(parents=True)
    (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (root / "cgroup.subtree_control").write_text(subtree_control)
    (root / "cgroup.procs").write_text("")
    (group / "cpu.max").write_text("max 100000\n")
    (group / "cgroup.procs").write_text("")
    return group


def remove_group(root: str, path: str) -> None:
    """Move every process in the cgroup at *path* back to *root*, then remove it.

    rmdir fails with EBUSY while a killed member is still being reaped: retry a while.
    """
    deadline = time.monotonic() + 10
    while os.path.isdir(path):
        with open(os.path.join(path, "cgroup.procs")) as f:
            pids = f.read().split()
        for pid in pids:
            try:
                with open(os.path.join(root, "cgroup.procs"), "w") as f:
                    f.write(pid)
            except OSError as exc:
                if exc.errno != errno.ESRCH:
                    raise
        try:
            os.rmdir(path)
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@pytest.fixture
def group_name():
    """A test-only cgroup name; the group is removed from both hierarchies (its processes
    moved back to the root) afterwards."""
    name = f"astaire-test-{secrets.token_hex(4)}"
    yield name
    for root in (V1_ROOT, V2_ROOT):
        if root:
            remove_group(root, os.path.join(root, name))
