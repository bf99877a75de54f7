"""``astaire demo``: the main job on an embedded default, end to end on loopback.

Starts three stock memcached servers, loads MemcachedStore-shaped records onto the first
two, resizes the cluster from 2 to 3 nodes, runs the Astaire daemon for the new node,
waits for it to report sync, and checks that every record is where the new view says.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

from astaire.demo.localcluster import LocalCluster
from astaire.cluster.view import ClusterView, vbucket_for_key


def wait_until_running(pidfile: str, proc: subprocess.Popen, timeout: float = 30.0) -> bool:
    """True once the daemon started as ``proc`` holds ``pidfile``; False if it exits first."""
    from astaire.daemon.pidfile import daemon_pid

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if daemon_pid(pidfile) == proc.pid:
            return True
        time.sleep(0.02)
    return False


CLI = [sys.executable, "-m", "astaire.cli"]  # the astaire command, in this interpreter


def _astaire(*args: str, timeout: float | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


@dataclass
class SyncRun:
    """One daemon run from start to sync: wait-sync's verdict, the final status, the timing."""
    ok: bool
    error: str          # wait-sync's message and the daemon's stderr when not ok
    status: dict
    seconds: float      # from starting the daemon (or from the reload) to wait-sync returning


def run_until_synced(local: str, settings_file: str, workdir: str, source: str = "auto",
                     workers: int | None = None, poll_interval: float = 0.2,
                     on_started: Callable[[int], None] | None = None,
                     on_synced: Callable[[], None] | None = None,
                     before_settings: str | None = None,
                     on_running: Callable[[int], None] | None = None) -> SyncRun:
    """Start ``astaire run`` for ``local`` (pidfile, stats and log in ``workdir``), wait for
    sync, read its status, and stop it. ``on_started(pid)`` / ``on_synced()`` bracket the
    wait (the benchmark samples the daemon's CPU and memory there).

    With ``before_settings`` (the text of a cluster_settings file), the resize is made as on
    a node: the daemon starts on ``before_settings``, settles (its first resync done, idle),
    and only then is ``settings_file``'s text written back and the daemon told with ``astaire
    reload``; ``on_started`` runs just before the reload, and ``seconds`` counts from the
    reload. ``on_running(pid)`` runs as soon as the daemon holds its pidfile (in both modes)."""
    pidfile = os.path.join(workdir, "astaire.pid")
    run_args = ["run", "--local-name", local, "--cluster-settings-file", settings_file,
                "--pidfile", pidfile, "--log-file", workdir, "--source", source,
                "--config", os.path.join(workdir, "config")]
    if workers:
        run_args += ["--workers", str(workers)]
    after_settings = None
    if before_settings is not None:
        with open(settings_file) as f:
            after_settings = f.read()
        with open(settings_file, "w") as f:
            f.write(before_settings)
    t_start = time.monotonic()
    daemon = subprocess.Popen([*CLI, *run_args],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    status: dict = {}
    started = False
    waiter = None

    def start_waiter() -> subprocess.Popen:
        return subprocess.Popen([*CLI, "wait-sync", "--pidfile", pidfile, "--cluster-settings-file", settings_file,
                                 "--quiet", "--poll-interval", str(poll_interval)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        if after_settings is None and on_started:
            on_started(daemon.pid)
            started = True
        wait_error = ""
        if not wait_until_running(pidfile, daemon):
            wait_error = "the Astaire daemon did not start"
        else:
            if on_running:
                on_running(daemon.pid)
            if after_settings is not None:
                wait_error = _settle(pidfile, daemon)
                if not wait_error:
                    with open(settings_file, "w") as f:
                        f.write(after_settings)
                    # wait-sync first, as an operator might in another terminal: it waits for
                    # the daemon to take the edited file in, so its own start-up (an
                    # interpreter and imports) is over before the resize begins.
                    waiter = start_waiter()
                    _until_idle(waiter)
                    if on_started:
                        on_started(daemon.pid)
                        started = True
                    t_start = time.monotonic()
                    reload = _astaire("reload", "--pidfile", pidfile, timeout=30)
                    if reload.returncode:
                        wait_error = f"astaire reload failed: {reload.stderr.strip()}"
        if not wait_error:
            if waiter is None:
                waiter = start_waiter()
            out, err = waiter.communicate(timeout=3600)
            wait_error = "" if waiter.returncode == 0 else (err.strip() or out.strip())
        seconds = time.monotonic() - t_start
        if on_synced and started:
            on_synced()
        if not wait_error:
            status = json.loads(_astaire("status", "--json", "--pidfile", pidfile).stdout)
    finally:
        if waiter is not None and waiter.poll() is None:
            waiter.kill()
            waiter.communicate()
        daemon.send_signal(signal.SIGTERM)
        try:
            _, err = daemon.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            daemon.kill()
            _, err = daemon.communicate()
    error = "\n".join(x for x in (wait_error, "" if not wait_error else (err or "").strip()) if x)
    return SyncRun(not wait_error, error, status, seconds)


def _until_idle(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Return once ``proc`` has used no CPU for 50 ms (it sleeps in its loop), or has exited,
    or after ``timeout`` seconds."""
    import psutil

    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            t = psutil.Process(proc.pid).cpu_times()
        except psutil.Error:
            return
        if last is not None and t.user + t.system == last:
            return
        last = t.user + t.system
        time.sleep(0.05)


def _settle(pidfile: str, daemon: subprocess.Popen, timeout: float = 30.0, quiet: float = 0.5) -> str:
    """Wait until the daemon is idle after its first resync, its workers booted ("" on
    success, else what went wrong). Its statistics are read here, as ``astaire status``
    reads them, without starting a Python process per look."""
    from astaire.cli.commands import stats_path_for
    from astaire.stats import StatsReader, StatsUnavailable

    reader = StatsReader(stats_path_for(pidfile))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            return f"the Astaire daemon exited ({daemon.returncode}) before the resize"
        try:
            snap = reader.snapshot()
        except StatsUnavailable:  # not published yet
            snap = {}
        if snap.get("pid") == daemon.pid and snap.get("state") == "idle" and snap.get("resyncs_completed", 0) >= 1:
            time.sleep(quiet)  # the workers' boot (each says ready once)
            return ""
        time.sleep(0.1)
    return f"the Astaire daemon did not settle within {timeout:.0f} s before the resize"


def run(args) -> int:
    from astaire.demo import workload

    if args.records < 1 or args.value_size < 0:
        print("astaire demo: --records must be at least 1 and --value-size at least 0", file=sys.stderr)
        return 2
    workdir = tempfile.mkdtemp(prefix="astaire-demo-")
    settings_file = os.path.join(workdir, "cluster_settings")
    say = (lambda *a: None) if args.json else (lambda *a: print(*a, flush=True))
    with LocalCluster(3, memory_mb=max(64, args.records * (args.value_size + 120) * 3 // (1 << 20))) as cluster:
        a, b, c = cluster.names
        before = ClusterView([a, b])
        after = ClusterView([a, b], [a, b, c])
        say(f"memcached servers on loopback: {a}, {b} (current), {c} (joining)")
        records = list(workload.make_records(args.records, args.value_size))
        t0 = time.monotonic()
        workload.load(before, records)
        say(f"loaded {len(records):,} records onto {a} and {b} in {time.monotonic() - t0:.1f} s")
        with open(settings_file, "w") as f:
            f.write(f"servers={a},{b}\nnew_servers={a},{b},{c}\n")
        moving = sum(1 for vb in range(128) if c in after.new[vb])
        say(f"resizing 2 -> 3: {c} gains {moving} of 128 vbuckets; starting Astaire for it")
        sync = run_until_synced(c, settings_file, workdir, args.source, args.workers)
        if not sync.ok:
            print(f"astaire demo: wait-sync failed: {sync.error}", file=sys.stderr)
            print(f"logs kept in {workdir}", file=sys.stderr)
            return 1
        status, seconds = sync.status, sync.seconds
        last = status.get("last_resync") or {}
        entries = int(last.get("entries", 0))
        data = int(last.get("bytes", 0))
        resync_seconds = float(last.get("seconds") or seconds)
        say("checking every record on every server against the view ...")
        expected = workload.expected_holders(records, before, after, copied_to=[c])
        check = workload.check_placement(records, expected, [a, b, c])
    should_move = sum(1 for r in records if c in after.new[vbucket_for_key(r.key)])
    report = {
        "records_loaded": len(records),
        "records_for_new_node": should_move,
        "records_streamed": entries,
        "resync_seconds": round(resync_seconds, 3),
        "wall_seconds_to_sync": round(seconds, 3),
        # Records the new node ends up holding per second (it receives each about twice).
        "records_per_second": round(should_move / resync_seconds) if resync_seconds else None,
        "entries_per_second": round(entries / resync_seconds) if resync_seconds else None,
        "mb_per_second": round(data / resync_seconds / 1e6, 2) if resync_seconds else None,
        "last_resync": last.get("result"),
        "failed_vbuckets": last.get("failed_vbuckets", []),
        "placement_ok": check.ok,
        "records_checked": check.checked,
        "missing": len(check.missing), "wrong": len(check.wrong), "misplaced": len(check.misplaced),
        "workdir": workdir if args.keep_dir else None,
    }
    if not args.keep_dir:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print()
        print("Astaire demo report")
        print(f"  records loaded            {report['records_loaded']:>12,}")
        print(f"  records the new node owns {report['records_for_new_node']:>12,}")
        print(f"  records streamed          {report['records_streamed']:>12,}  (each vbucket from every old replica)")
        print(f"  resync time               {report['resync_seconds']:>12.2f} s")
        print(f"  rate                      {report['records_per_second'] or 0:>12,} records/s placed"
              f"  ({report['entries_per_second'] or 0:,} entries/s, {report['mb_per_second']} MB/s received)")
        print(f"  result                    {report['last_resync']:>12}")
        verdict = "OK: every record is where the view says" if check.ok else "FAILED"
        print(f"  placement check           {verdict} ({check.checked:,} copies checked, "
              f"{report['missing']} missing, {report['wrong']} wrong, {report['misplaced']} misplaced)")
        for item in (check.missing + check.wrong + check.misplaced)[:10]:
            print(f"    {item}")
    return 0 if check.ok and report["last_resync"] == "ok" else 1
