"""The real astaire-throttle service (a subprocess) holding a CPU-hungry stand-in for Astaire.

The stand-in is a busy-looping process plus a busy-looping forked child, named in a
pidfile: together they would use every CPU. Their CPU use (CPU seconds per wall
second, summed) is measured with psutil over 3 s and must stay within 50%..120% of
CPUs x percentage / 100.
"""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.throttle_helpers import CPUS, V1_ROOT, V2_ROOT, fake_cgroup2, needs_v1  # first: it puts throttle/ on the path

from astaire_throttle.cgroup import quota_us

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(
    [str(REPO / "throttle"), str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
MEASURE_SECONDS = 3.0

BUSY = r"""
import ctypes, os, signal
libc = ctypes.CDLL(None)
libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: never outlive the test


def fork_worker(*_):
    if os.fork() == 0:
        libc.prctl(1, signal.SIGKILL)
        while True: pass


signal.signal(signal.SIGUSR1, fork_worker)  # a worker forked later
signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # workers are reaped at once when killed
fork_worker()
while True: pass
"""

def wait_for(predicate, what, timeout=10.0, log=None):
    """Poll *predicate* until true; fail with *what* (and the log) after *timeout*."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            detail = f"\n--- throttle log ---\n{log.read_text()}" if log and log.exists() else ""
            pytest.fail(f"timed out waiting for {what}{detail}")
        time.sleep(0.05)


def cpu_share(pids, seconds=MEASURE_SECONDS) -> float:
    """CPU seconds per wall second used by *pids* together over *seconds*."""
    procs = [psutil.Process(p) for p in pids]

    def used():
        return sum(sum(p.cpu_times()[:2]) for p in procs)

    c0, t0 = used(), time.monotonic()
    time.sleep(seconds)
    return (used() - c0) / (time.monotonic() - t0)


def held_share(service, pids, how: str) -> float:
    """The CPU share of *pids* while *service* holds them; prints the throttle's own CPU."""
    throttle_cpu0 = sum(service.ps.cpu_times()[:2])
    t0 = time.monotonic()
    share = cpu_share(pids)
    own = (sum(service.ps.cpu_times()[:2]) - throttle_cpu0) / (time.monotonic() - t0)
    print(f"throttle's own CPU while holding ({how}): {own:.5f} CPU s/s")
    return share


def assert_in_band(share, percentage):
    target = CPUS * percentage / 100
    print(f"held at {percentage}%: {share:.4f} CPU s/s (target {target:.3f}, "
          f"{100 * share / target:.0f}%)")
    assert 0.5 * target <= share <= 1.2 * target, (share, target)


def group_members(path) -> set[int]:
    try:
        return {int(p) for p in Path(path, "cgroup.procs").read_text().split()}
    except FileNotFoundError:
        return set()


class StandIn:
    """A CPU-hungry stand-in for Astaire: a supervisor and one worker, both busy."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", BUSY])
        self.pid = self.proc.pid
        self.pids = [self.pid]
        parent = psutil.Process(self.pid)
        wait_for(lambda: parent.children(), "the stand-in's worker")
        self.pids += [c.pid for c in parent.children()]

    def fork_worker(self) -> int:
        parent = psutil.Process(self.pid)
        os.kill(self.pid, signal.SIGUSR1)
        wait_for(lambda: len(parent.children()) > len(self.pids) - 1, "a new worker")
        pid = next(c.pid for c in parent.children() if c.pid not in self.pids)
        self.pids.append(pid)
        return pid

    def kill(self):
        """Workers first (the stand-in reaps them at once), then the stand-in itself."""
        workers = []
        for pid in self.pids[1:]:
            try:
                workers.append(psutil.Process(pid))
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, psutil.NoSuchProcess):
                pass
        psutil.wait_procs(workers, timeout=5)
        self.proc.kill()
        self.proc.wait()

    def statuses(self):
        return [psutil.Process(p).status() for p in self.pids]


class Service:
    """``python -m astaire_throttle.cli ...`` as a subprocess, logging to a file."""

    def __init__(self, log: Path, args, wrapper=()):
        self.log = log
        self.proc = subprocess.Popen(
            [*wrapper, sys.executable, "-m", "astaire_throttle.cli",
             "--log-file", str(log), "--log-level", "debug", *map(str, args)],
            env=ENV, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=open(log.with_suffix(".stderr"), "w"))
        self.ps = psutil.Process(self.proc.pid)

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def wait_log(self, text, timeout=10.0):
        wait_for(lambda: text in self.log_text(), repr(text), timeout, self.log)

    def stop(self, sig=signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


@pytest.fixture
def standins():
    made = []

    def make():
        made.append(StandIn())
        return made[-1]

    yield make
    for s in made:
        s.kill()


@pytest.fixture
def services(tmp_path, group_name, standins):
    """Start throttle services; each is stopped (then killed) before groups and stand-ins go."""
    started = []

    def start(*args, wrapper=()):
        log = tmp_path / f"throttle-{len(started)}.log"
        started.append(Service(log, args, wrapper))
        return started[-1]

    yield start
    for s in started:
        if s.proc.poll() is None:
            try:
                s.stop()
            except subprocess.TimeoutExpired:
                pass


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "config"

    def write(percentage):
        path.write_text(f"local_ip=10.0.0.1\nastaire_cpu_limit_percentage='{percentage}'\n")
        return path

    return write


@needs_v1
def test_holds_the_share_and_follows_the_percentage_across_a_restart(
        tmp_path, group_name, standins, services, config):
    astaire = standins()
    pidfile = tmp_path / "astaire.pid"
    pidfile.write_text(f"{astaire.pid}\n")
    group = os.path.join(V1_ROOT, group_name)
    args = ["--config", config(5), "--pidfile", pidfile, "--cgroup-name", group_name]

    first = services(*args)
    wait_for(lambda: group_members(group) >= set(astaire.pids), "the stand-in in the group",
             log=first.log)
    assert int(Path(group, "cpu.cfs_quota_us").read_text()) == quota_us(100_000, CPUS, 5)
    share_5 = held_share(first, astaire.pids, "cgroup v1")
    assert_in_band(share_5, 5)

    assert first.stop() == 0
    assert Path(group, "cpu.cfs_quota_us").read_text().strip() == "-1"  # limit lifted
    assert group_members(group) >= set(astaire.pids)  # the processes may stay
    assert "cgroup v1" in first.log_text()

    config(20)
    second = services(*args)
    second.wait_log("process(es) held by cgroup v1")
    assert int(Path(group, "cpu.cfs_quota_us").read_text()) == quota_us(100_000, CPUS, 20)
    share_20 = cpu_share(astaire.pids)
    assert_in_band(share_20, 20)
    assert share_20 > 2 * share_5


@needs_v1
def test_missing_pidfile_is_logged_and_a_new_pid_is_picked_up(
        tmp_path, group_name, standins, services, config):
    pidfile = tmp_path / "astaire.pid"
    group = os.path.join(V1_ROOT, group_name)
    service = services("--config", config(20), "--pidfile", pidfile, "--cgroup-name", group_name,
                       "--poll-interval", "0.2")
    service.wait_log(f"pidfile {pidfile} does not exist")
    assert service.proc.poll() is None

    old = standins()
    pidfile.write_text(f"{old.pid}\n")
    wait_for(lambda: group_members(group) >= set(old.pids), "the first Astaire in the group",
             log=service.log)

    old.kill()  # Astaire restarts: a new pid in the pidfile
    service.wait_log(f"pid {old.pid} from {pidfile} is not running")
    new = standins()
    pidfile.write_text(f"{new.pid}\n")
    wait_for(lambda: group_members(group) >= set(new.pids), "the restarted Astaire in the group",
             log=service.log)
    service.wait_log(f"Astaire pid {new.pid}")

    later = new.fork_worker()  # born in the group: cgroups are inherited
    assert later in group_members(group)
    for pid in new.pids:  # moved out behind the throttle's back: put back
        Path(V1_ROOT, "cgroup.procs").write_text(str(pid))
    wait_for(lambda: group_members(group) >= set(new.pids), "the processes back in the group",
             log=service.log)
    assert service.proc.poll() is None


@needs_v1
@pytest.mark.parametrize("bad", ["abc", "0", "-3", "101"])
def test_bad_percentage_is_logged_and_the_default_applied_once(
        tmp_path, group_name, standins, services, config, bad):
    astaire = standins()
    pidfile = tmp_path / "astaire.pid"
    pidfile.write_text(f"{astaire.pid}\n")
    once = services("--config", config(bad), "--pidfile", pidfile, "--cgroup-name", group_name,
                    "--once")
    assert once.proc.wait(30) == 0
    group = os.path.join(V1_ROOT, group_name)
    assert "ERROR invalid astaire_cpu_limit_percentage" in once.log_text()
    assert "using the default 5%" in once.log_text()
    assert int(Path(group, "cpu.cfs_quota_us").read_text()) == quota_us(100_000, CPUS, 5)
    assert group_members(group) >= set(astaire.pids)  # --once leaves the limit in place


@needs_v1
def test_bad_percentage_does_not_stop_the_service(tmp_path, group_name, standins, services,
                                                   config):
    astaire = standins()
    pidfile = tmp_path / "astaire.pid"
    pidfile.write_text(f"{astaire.pid}\n")
    service = services("--config", config("lots"), "--pidfile", pidfile,
                       "--cgroup-name", group_name)
    service.wait_log("process(es) held by cgroup v1")
    assert "invalid astaire_cpu_limit_percentage" in service.log_text()
    assert service.proc.poll() is None
    group = os.path.join(V1_ROOT, group_name)
    assert int(Path(group, "cpu.cfs_quota_us").read_text()) == quota_us(100_000, CPUS, 5)


def _read_only_cgroups_wrapper():
    """A command prefix running the throttle where every cgroup is read-only (as in an
    unprivileged container), or None if this machine cannot make such a namespace."""
    unshare, mount = shutil.which("unshare"), shutil.which("mount")
    if not (unshare and mount and V1_ROOT):
        return None
    remounts = " && ".join(f"{mount} -o remount,bind,ro {root}"
                           for root in (V1_ROOT, V2_ROOT) if root)
    wrapper = [unshare, "--mount", "--propagation", "private", "sh", "-c",
               f'{remounts} && exec "$@"', "sh"]
    probe = subprocess.run([*wrapper, "test", "!", "-w", os.path.join(V1_ROOT, "cgroup.procs")],
                           capture_output=True)
    return wrapper if probe.returncode == 0 else None


def test_signal_fallback_holds_the_share_and_continues_everything_on_exit(
        tmp_path, standins, services, config):
    """Where no cgroup is writable the service stops and continues the processes instead.
    Run in a mount namespace with the cgroup hierarchies read-only when the machine allows
    it (then the fallback is chosen by auto mode), else forced with --mode signal."""
    astaire = standins()
    pidfile = tmp_path / "astaire.pid"
    pidfile.write_text(f"{astaire.pid}\n")
    wrapper = _read_only_cgroups_wrapper()
    mode = ["--mode", "auto"] if wrapper else ["--mode", "signal"]
    service = services("--config", config(20), "--pidfile", pidfile, *mode,
                       "--cgroup-name", "astaire-test-never-created", wrapper=wrapper or ())
    service.wait_log("process(es) held by signal duty cycle")
    if wrapper:
        assert "falling back to stopping and continuing" in service.log_text()
    time.sleep(1.0)  # let the feedback loop settle on the stand-in's demand
    assert_in_band(held_share(service, astaire.pids, "signal duty cycle"), 20)
    assert service.stop() == 0
    assert psutil.STATUS_STOPPED not in astaire.statuses()
    assert "limit lifted" in service.log_text()
    for root in (V1_ROOT, V2_ROOT):
        assert not root or not os.path.exists(os.path.join(root, "astaire-test-never-created"))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_fallback_never_leaves_a_process_stopped(tmp_path, standins, services, config,
                                                        sig):
    # At 1% the stand-in is stopped ~99% of each slot: a stop almost surely lands then.
    astaire = standins()
    pidfile = tmp_path / "astaire.pid"
    pidfile.write_text(f"{astaire.pid}\n")
    service = services("--config", config(1), "--pidfile", pidfile, "--mode", "signal")
    service.wait_log("process(es) held by signal duty cycle")
    wait_for(lambda: psutil.STATUS_STOPPED in astaire.statuses(), "the stand-in stopped",
             log=service.log)
    assert service.stop(sig) == 0
    assert psutil.STATUS_STOPPED not in astaire.statuses()


def test_v2_mode_on_a_layout_like_cgroup2(tmp_path, standins, services, config):
    root = tmp_path / "unified"
    child = fake_cgroup2(root, "astaire-test")
    astaire = standins()
    pidfile = tmp_path / "astaire.pid"
    pidfile.write_text(f"{astaire.pid}\n")
    service = services("--config", config(20), "--pidfile", pidfile, "--mode", "v2",
                       "--cgroup-v2-root", root, "--cgroup-name", "astaire-test")
    service.wait_log("process(es) held by cgroup v2")
    assert (root / "cgroup.subtree_control").read_text() == "+cpu"
    assert (child / "cpu.max").read_text() == f"{quota_us(100_000, CPUS, 20)} 100000"
    assert group_members(child) == set(astaire.pids)
    assert service.stop() == 0
    assert (child / "cpu.max").read_text() == "max 100000"


def test_forced_mode_that_cannot_work_fails_clearly(tmp_path, services, config):
    service = services("--config", config(5), "--pidfile", tmp_path / "none.pid",
                       "--mode", "v1", "--cgroup-v1-root", tmp_path)
    assert service.proc.wait(30) == 1
    assert "cannot apply the limit with --mode v1" in service.log_text()


def test_help_explains_the_options():
    out = subprocess.run([sys.executable, "-m", "astaire_throttle.cli", "--help"], env=ENV,
                         capture_output=True, text=True, check=True).stdout
    for option in ("--config", "--pidfile", "--once", "--mode", "--cgroup-name",
                   "--cgroup-v1-root", "--cgroup-v2-root", "--poll-interval", "--log-file",
                   "--log-level", "astaire_cpu_limit_percentage", "SIGTERM"):
        assert option in out
