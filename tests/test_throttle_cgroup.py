"""astaire-throttle's limiters, in process: cgroup v1 on the real cpu hierarchy, cgroup v2
on the real unified hierarchy where its cpu controller is usable and on a directory laid
out like one, the choice between them, and the signal duty cycle's bookkeeping."""
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.throttle_helpers import CPUS, V1_ROOT, V2_ROOT, fake_cgroup2, needs_v1  # first: it puts throttle/ on the path

from astaire_throttle.cgroup import (
    CgroupUnavailable,
    CgroupV1Limiter,
    CgroupV2Limiter,
    find_v1_cpu_root,
    find_v2_root,
    parse_mountinfo,
    quota_us,
    v2_controllers,
)
from astaire_throttle.service import open_limiter
from astaire_throttle.signals import DutyCycleLimiter


def _process(pid):
    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


@pytest.fixture
def sleeper():
    """A process (with a child) to move around; killed afterwards."""
    proc = subprocess.Popen([sys.executable, "-c",
                             "import os, signal, time\n"
                             "signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # no zombie child\n"
                             "os.fork()\ntime.sleep(60)"])
    pids = [proc.pid]
    try:
        parent = psutil.Process(proc.pid)
        while not parent.children():
            time.sleep(0.01)
        pids += [c.pid for c in parent.children()]
        yield pids
    finally:
        children = [p for p in map(_process, pids[1:]) if p]
        for p in children:  # the child first: its parent reaps it at once
            try:
                p.send_signal(signal.SIGCONT)
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(children, timeout=5)
        proc.kill()
        proc.wait()


def test_mountinfo_parsing_finds_both_hierarchies():
    text = (
        "32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:9 - cgroup cgroup rw,cpu,cpuacct\n"
        "34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset\n"
        "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw,nsdelegate\n"
        "42 23 0:39 / /mnt/with\\040space rw - cgroup cgroup rw,cpu\n"
        "22 1 8:1 / / rw - ext4 /dev/sda1 rw\n"
    )
    mounts = parse_mountinfo(text)
    assert [m.mount_point for m in mounts] == [
        "/sys/fs/cgroup/cpu,cpuacct", "/sys/fs/cgroup/cpuset", "/sys/fs/cgroup/unified",
        "/mnt/with space"]
    assert find_v1_cpu_root(mounts) == "/sys/fs/cgroup/cpu,cpuacct"
    assert find_v2_root(mounts) == "/sys/fs/cgroup/unified"
    assert find_v1_cpu_root(parse_mountinfo(text.splitlines()[1])) is None


def test_quota_is_period_times_cpus_times_percentage():
    assert quota_us(100_000, 2, 5) == 10_000
    assert quota_us(100_000, 8, 20) == 160_000
    assert quota_us(100_000, 1, 0.5) == 1_000  # the kernel's minimum


@needs_v1
def test_v1_group_gets_quota_members_and_lifted_limit(group_name, sleeper):
    limiter = CgroupV1Limiter(V1_ROOT, group_name)
    limiter.set_percentage(20)
    path = os.path.join(V1_ROOT, group_name)
    assert int(open(os.path.join(path, "cpu.cfs_quota_us")).read()) == quota_us(100_000, CPUS, 20)
    assert sorted(limiter.attach(sleeper)) == sorted(sleeper)
    assert limiter.attach(sleeper) == []  # already there: no writes
    assert {int(p) for p in open(os.path.join(path, "cgroup.procs")).read().split()} == set(sleeper)
    assert limiter.attach([2 ** 22 + 12345]) == []  # no such process: skipped, not fatal
    Path(path, "cpu.cfs_quota_us").write_text("-1")  # someone lifts it behind our back
    limiter.attach(sleeper)
    assert int(Path(path, "cpu.cfs_quota_us").read_text()) == quota_us(100_000, CPUS, 20)
    limiter.release()
    assert open(os.path.join(path, "cpu.cfs_quota_us")).read().strip() == "-1"
    # A second limiter (a restarted throttle) reuses the group.
    again = CgroupV1Limiter(V1_ROOT, group_name)
    again.set_percentage(5)
    assert int(open(os.path.join(path, "cpu.cfs_quota_us")).read()) == quota_us(100_000, CPUS, 5)
    assert again.members() == set(sleeper)


def test_v1_refuses_a_directory_that_is_not_a_cpu_hierarchy(tmp_path):
    with pytest.raises(CgroupUnavailable, match="not a cgroup v1 cpu hierarchy"):
        CgroupV1Limiter(str(tmp_path), "astaire").set_percentage(5)


@pytest.fixture
def fake_v2(tmp_path):
    """A directory laid out like a cgroup2 root with the cpu controller and a child group
    (the kernel would create the child's files at mkdir; a plain directory cannot)."""
    root = tmp_path / "unified"
    fake_cgroup2(root, "astaire", subtree_control="memory\n")
    return root


def test_v2_on_a_layout_like_cgroup2(fake_v2):
    limiter = CgroupV2Limiter(str(fake_v2), "astaire", cpus=2)
    limiter.set_percentage(5)
    assert (fake_v2 / "cgroup.subtree_control").read_text() == "+cpu"
    assert (fake_v2 / "astaire" / "cpu.max").read_text() == "10000 100000"
    assert limiter.attach([os.getpid(), os.getppid()]) == [os.getpid(), os.getppid()]
    assert (fake_v2 / "astaire" / "cgroup.procs").read_text() == f"{os.getpid()}\n{os.getppid()}\n"
    assert limiter.attach([os.getpid()]) == []
    (fake_v2 / "astaire" / "cpu.max").write_text("max 100000\n")
    limiter.attach([os.getpid()])
    assert (fake_v2 / "astaire" / "cpu.max").read_text() == "10000 100000"
    limiter.release()
    assert (fake_v2 / "astaire" / "cpu.max").read_text() == "max 100000"


def test_v2_without_the_cpu_controller_is_refused_with_the_reason(fake_v2):
    (fake_v2 / "cgroup.controllers").write_text("memory pids\n")
    with pytest.raises(CgroupUnavailable, match="cpu controller is not available"):
        CgroupV2Limiter(str(fake_v2), "astaire").set_percentage(5)


@pytest.mark.skipif(not V2_ROOT, reason="no cgroup2 hierarchy mounted")
def test_v2_on_the_real_unified_hierarchy(group_name, sleeper):
    """Where the unified hierarchy has the cpu controller the real cpu.max is set; where
    it has not (on hybrid systems cpu is bound to v1), the limiter says so."""
    limiter = CgroupV2Limiter(V2_ROOT, group_name)
    if "cpu" not in v2_controllers(V2_ROOT):
        with pytest.raises(CgroupUnavailable, match="cpu controller is not available"):
            limiter.set_percentage(5)
        assert not os.path.exists(os.path.join(V2_ROOT, group_name))
        return
    try:
        limiter.set_percentage(5)
    except CgroupUnavailable as exc:
        pytest.skip(f"the unified hierarchy's cpu controller is not usable here: {exc}")
    path = os.path.join(V2_ROOT, group_name)
    assert open(os.path.join(path, "cpu.max")).read().split() == [
        str(quota_us(100_000, CPUS, 5)), "100000"]
    assert sorted(limiter.attach(sleeper)) == sorted(sleeper)
    limiter.release()
    assert open(os.path.join(path, "cpu.max")).read().split()[0] == "max"


@needs_v1
def test_auto_mode_uses_v1_and_logs_what_it_found(group_name, caplog):
    with caplog.at_level(logging.INFO, logger="astaire_throttle"):
        limiter = open_limiter("auto", 5, group_name)
    assert isinstance(limiter, CgroupV1Limiter)
    assert "cgroup hierarchies: v1 with the cpu controller at" in caplog.text
    assert f"using cgroup v1 group {os.path.join(V1_ROOT, group_name)}" in caplog.text


def test_auto_mode_falls_back_to_signals_when_no_cgroup_is_usable(tmp_path, fake_v2, caplog):
    (fake_v2 / "cgroup.controllers").write_text("memory\n")
    with caplog.at_level(logging.INFO, logger="astaire_throttle"):
        limiter = open_limiter("auto", 5, "astaire", v1_root=str(tmp_path), v2_root=str(fake_v2))
    assert isinstance(limiter, DutyCycleLimiter)
    assert "falling back to stopping and continuing" in caplog.text
    with pytest.raises(CgroupUnavailable):
        open_limiter("v2", 5, "astaire", v1_root=str(tmp_path), v2_root=str(fake_v2))


class _NoWait:
    def wait(self, timeout):
        return False


def test_duty_cycle_never_leaves_a_process_stopped(sleeper):
    limiter = DutyCycleLimiter(cpus=1, slot=0.02)
    limiter.set_percentage(1)
    assert sorted(limiter.attach(sleeper)) == sorted(sleeper)
    limiter._stopped = True  # as if in the stopped part of a slot
    for pid in sleeper:
        os.kill(pid, signal.SIGSTOP)
    limiter.attach(sleeper[:1])  # the child left the tree: it is continued
    assert psutil.Process(sleeper[1]).status() != psutil.STATUS_STOPPED
    limiter.attach(sleeper)
    limiter.hold(0.1, _NoWait())
    assert all(psutil.Process(p).status() != psutil.STATUS_STOPPED for p in sleeper)
    for pid in sleeper:
        os.kill(pid, signal.SIGSTOP)
    limiter.release()
    assert all(psutil.Process(p).status() != psutil.STATUS_STOPPED for p in sleeper)


@needs_v1
def test_a_child_forked_while_its_parent_is_moved_is_held_at_once(group_name, sleeper, monkeypatch):
    """The race of a daemon start: the throttle walks the tree (only the supervisor yet), the
    supervisor forks a worker, then is moved. The worker, born outside the group, must not
    wait for the next full walk (10 s) to be held: apply() walks again after a move. The
    walk's timing is what no real start reproduces on demand, so the two walks are given."""
    from astaire_throttle import service

    parent, child = sleeper
    walks = iter([[parent], [parent, child]])
    monkeypatch.setattr(service, "read_pidfile", lambda path: parent)
    monkeypatch.setattr(service, "process_tree", lambda pid: next(walks))
    throttle = service.Throttle(pidfile="unused")
    throttle.limiter = CgroupV1Limiter(V1_ROOT, group_name)
    throttle.limiter.set_percentage(5)
    try:
        assert throttle.apply() == 2
        procs = {int(p) for p in open(os.path.join(V1_ROOT, group_name, "cgroup.procs")).read().split()}
        assert procs == {parent, child}
    finally:
        throttle.limiter.release()
