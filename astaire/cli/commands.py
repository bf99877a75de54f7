"""Operator commands: ``astaire run | reload | full-resync | wait-sync | status``.

``run`` starts the daemon (``astaire.daemon``). The others find it through its
pidfile (signals) and read its shared-memory statistics (``astaire.stats``) without
talking to it.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

from astaire.daemon import logs
from astaire.cluster.nodeconfig import DEFAULT_NODE_CONFIG, local_name_from_config, read_node_config
from astaire.cluster.settings import DEFAULT_CLUSTER_SETTINGS, parse_server, settings_digest
from astaire.daemon.bookkeeping import ranges
from astaire.daemon.pidfile import DEFAULT_PIDFILE, daemon_pid
from astaire.stats import StatsReader, StatsUnavailable
from astaire.cli.argtypes import number, positive_int

DEFAULT_LOG_DIR = "/var/log/astaire"
DEFAULT_LOG_LEVEL = 2
DEFAULT_TAG_INTERVAL = 10.0
DEFAULT_WAIT_TIMEOUT = 600.0

EXIT_NOT_RUNNING = 1
EXIT_USAGE = 2
EXIT_NO_PROGRESS = 4
EXIT_NOT_IN_CLUSTER = 5
EXIT_FAILED_VBUCKETS = 6
EXIT_STATUS_NOT_RUNNING = 3  # LSB: "program is not running"


def stats_path_for(pidfile: str) -> str:
    """The statistics file beside the pidfile: ``astaire.pid`` -> ``astaire.stats``."""
    root, ext = os.path.splitext(pidfile)
    return (root if ext == ".pid" else pidfile) + ".stats"


_clearwater_level = number(int, lambda n: 0 <= n <= 5, "is not a log level 0 (errors only) to 5 (debug)")
_positive_seconds = number(float, lambda n: n > 0, "must be more than 0 seconds")


def _add_pidfile(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pidfile", default=DEFAULT_PIDFILE, metavar="FILE",
                   help="the running daemon's pidfile (default %(default)s)")


def _add_stats_file(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stats-file", metavar="FILE",
                   help="the daemon's statistics file (default: the pidfile's path with .stats for .pid)")


def register(sub) -> None:
    p = sub.add_parser(
        "run", help="run the Astaire daemon",
        description="Run the Astaire daemon: keep the local memcached's data complete while the cluster "
        "in the cluster settings file is resized. Signals: SIGHUP re-reads the cluster settings (astaire "
        "reload), SIGUSR1 forces a full resync (astaire full-resync), SIGTERM/SIGINT stop it. Exit codes: "
        "0 stopped, 1 already running, 2 invalid or missing option, 3 invalid cluster settings.")
    p.add_argument("--local-name", metavar="HOST:PORT",
                   help="this node's memcached as named in the cluster settings "
                   "(default: $local_ip:11211 from the node config)")
    p.add_argument("--cluster-settings-file", default=DEFAULT_CLUSTER_SETTINGS, metavar="FILE",
                   help="the servers/new_servers file (default %(default)s); re-read on SIGHUP")
    p.add_argument("--config", default=DEFAULT_NODE_CONFIG, metavar="FILE",
                   help="the node config, shell-style name=value, read not executed: local_ip, "
                   "log_level (default %(default)s)")
    p.add_argument("--log-file", default=DEFAULT_LOG_DIR, metavar="DIR",
                   help="the directory for the diagnostics log astaire_current.log, rotated "
                   "(default %(default)s; the name is the original's)")
    p.add_argument("--log-level", type=_clearwater_level, metavar="N",
                   help="0 errors, 1 warnings, 2 status, 3 info, 4 verbose, 5 debug "
                   "(default: log_level from the node config, else 2)")
    p.add_argument("--pidfile", default=DEFAULT_PIDFILE, metavar="FILE",
                   help="where the daemon writes its pid; a second daemon with the same pidfile refuses "
                   "to start (default %(default)s)")
    p.add_argument("--stats-file", metavar="FILE",
                   help="the shared-memory statistics file, best on tmpfs "
                   "(default: the pidfile's path with .stats for .pid)")
    p.add_argument("--daemon", action="store_true",
                   help="detach (double fork) and run in the background")
    p.add_argument("--workers", type=positive_int, default=os.cpu_count() or 1, metavar="N",
                   help="worker processes streaming in parallel (default: one per CPU, %(default)s here)")
    p.add_argument("--source", choices=("tap", "crawler", "auto"), default="auto",
                   help="how to read the old replicas: tap (Clearwater memcached fork), crawler (stock "
                   "memcached 1.6: lru_crawler metadump + meta gets), auto (detect per server; default)")
    p.add_argument("--tag-interval", type=_positive_seconds, default=DEFAULT_TAG_INTERVAL, metavar="SECONDS",
                   help="how often to check the local memcached's resync tag; a missing tag (memcached "
                   "restarted) starts a full resync (default %(default)g)")
    p.add_argument("--connect-timeout", type=_positive_seconds, default=5.0, metavar="SECONDS",
                   help="how long to wait for a server to accept a connection or answer a first request "
                   "(default %(default)g)")
    p.add_argument("--idle-timeout", type=_positive_seconds, default=60.0, metavar="SECONDS",
                   help="a stream with no progress from a peer for this long fails (default %(default)g)")
    p.add_argument("--worker-timeout", type=_positive_seconds, default=30.0, metavar="SECONDS",
                   help="a streaming worker silent this long (hung or stopped) is killed and its stream redone "
                   "(default %(default)g; time the whole daemon was paused, e.g. by astaire-throttle, does not count)")
    p.add_argument("--stall-timeout", type=_positive_seconds, default=120.0, metavar="SECONDS",
                   help="a source that delivers no complete record for this long is abandoned as stalled and "
                   "another replica serves its vbuckets (default %(default)g)")
    p.add_argument("--stop-timeout", type=_positive_seconds, default=60.0, metavar="SECONDS",
                   help="on SIGTERM, how long workers get to read open TAP streams to their end before they are "
                   "killed (default %(default)g; keep the service manager's stop timeout above it)")
    p.set_defaults(func=cmd_run)
    default_error = p.error

    def run_error(message: str):  # an invalid option is also an operator event (7001)
        logs.INVALID_OPTION.log(message)
        default_error(message)

    p.error = run_error

    p = sub.add_parser("reload", help="make the daemon re-read the cluster settings (SIGHUP)",
                       description="Send SIGHUP to the running daemon: it re-reads the cluster settings file "
                       "and resyncs if the cluster view changed (an invalid file is logged and the current "
                       "view stays). Exit 1 if the daemon is not running.")
    _add_pidfile(p)
    p.set_defaults(func=lambda a: _signal_daemon(a, signal.SIGHUP, "re-read the cluster settings"))

    p = sub.add_parser("full-resync", help="make the daemon resync everything the local node owns (SIGUSR1)",
                       description="Send SIGUSR1 to the running daemon: it pulls every vbucket the local node "
                       "owns from the other replicas. Exit 1 if the daemon is not running.")
    _add_pidfile(p)
    p.set_defaults(func=lambda a: _signal_daemon(a, signal.SIGUSR1, "run a full resync"))

    p = sub.add_parser("wait-sync", help="wait until the daemon has no bucket left to resync",
                       description="Block until the daemon has taken in the current cluster settings file and "
                       "no bucket needs resync, showing progress. Exit 0 then; 1 if the daemon is not running "
                       "or stops; 2 if the cluster settings file cannot be read; 4 after "
                       "--timeout-without-progress seconds without progress; 5 if the local node is in neither "
                       "server list of the settings the daemon took in (a typo in local_ip must not look like a "
                       "finished resync; a file edited but not yet reloaded is waited for); 6 if the last "
                       "resync ended with vbuckets no source could serve, or was refused (local memcached "
                       "without CAS).")
    _add_pidfile(p)
    _add_stats_file(p)
    p.add_argument("--cluster-settings-file", metavar="FILE",
                   help="the file the daemon must have taken in (default: the file the daemon runs with)")
    p.add_argument("--timeout-without-progress", type=_positive_seconds, default=DEFAULT_WAIT_TIMEOUT,
                   metavar="SECONDS", help="give up after this long without progress (default %(default)g)")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    p.add_argument("--poll-interval", type=_positive_seconds, default=0.2, metavar="SECONDS",
                   help="how often to read the daemon's statistics (default %(default)s)")
    p.set_defaults(func=cmd_wait_sync)

    p = sub.add_parser("status", help="show the daemon's resync statistics",
                       description="Show the running daemon's state and resync statistics, read from its "
                       "statistics file. Exit 0 if it runs, 3 if not (as LSB status does).")
    _add_pidfile(p)
    _add_stats_file(p)
    p.add_argument("--cluster-settings-file", metavar="FILE",
                   help="report whether the daemon has taken in this file (default: the file the daemon runs with)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=cmd_status)


# -- run --------------------------------------------------------------------------------------

def _usage_error(message: str) -> int:
    print(f"astaire run: {message}", file=sys.stderr)
    logs.INVALID_OPTION.log(message)
    return EXIT_USAGE


def cmd_run(args) -> int:
    from astaire.daemon import arbiter, main

    node = read_node_config(args.config)
    local = args.local_name or local_name_from_config(node)
    if not local:
        return _usage_error(f"no local node name: give --local-name HOST:PORT or set local_ip in {args.config}")
    try:
        parse_server(local)
    except ValueError as e:
        if args.local_name:
            return _usage_error(f"invalid --local-name: {e}")
        return _usage_error(f"invalid local_ip in {args.config}: {e}; "
                            f"correct it or give --local-name HOST:PORT")
    level = args.log_level
    if level is None:
        try:
            level = _clearwater_level(node.get("log_level", str(DEFAULT_LOG_LEVEL)))
        except argparse.ArgumentTypeError as e:
            print(f"astaire run: log_level in {args.config}: {e}; using {DEFAULT_LOG_LEVEL}", file=sys.stderr)
            level = DEFAULT_LOG_LEVEL
    options = arbiter.Options(
        local_name=local,
        cluster_settings_file=os.path.abspath(args.cluster_settings_file),
        log_dir=os.path.abspath(args.log_file),
        log_level=level,
        pidfile=os.path.abspath(args.pidfile),
        stats_file=os.path.abspath(args.stats_file or stats_path_for(args.pidfile)),
        workers=args.workers,
        source=args.source,
        tag_interval=args.tag_interval,
        daemon=args.daemon,
        connect_timeout=args.connect_timeout,
        idle_timeout=args.idle_timeout,
        worker_timeout=args.worker_timeout,
        stall_timeout=args.stall_timeout,
        stop_timeout=args.stop_timeout,
    )
    return main.main(options)


# -- reload / full-resync ---------------------------------------------------------------------

def _signal_daemon(args, sig: int, what: str) -> int:
    pid = daemon_pid(args.pidfile)
    if pid is None:
        print(f"astaire is not running (no daemon holds {args.pidfile})", file=sys.stderr)
        return EXIT_NOT_RUNNING
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        print(f"astaire (pid {pid}) is not running", file=sys.stderr)
        return EXIT_NOT_RUNNING
    print(f"asked astaire (pid {pid}) to {what}")
    return 0


# -- reading the daemon's state ------------------------------------------------------------------

def _read(args) -> tuple[int | None, dict | None, str | None]:
    """(daemon pid or None, its statistics or None, why there are none: a damaged file, say)."""
    pid = daemon_pid(args.pidfile)
    if pid is None:
        return None, None, None
    try:
        snap = StatsReader(args.stats_file or stats_path_for(args.pidfile)).snapshot()
    except StatsUnavailable as e:
        return pid, None, str(e)
    return pid, (snap if snap["pid"] == pid else None), None


def _settings_file(args, snap: dict | None) -> str:
    """The settings file to check against: the one given, else the daemon's own."""
    if args.cluster_settings_file:
        return args.cluster_settings_file
    if snap and snap.get("settings_file"):
        return snap["settings_file"]
    return DEFAULT_CLUSTER_SETTINGS


def _synced(snap: dict, digest: str) -> bool:
    return (snap["state"] == "idle" and snap["buckets_needing_resync"] == 0
            and bool(digest) and snap["settings_digest"] == digest)


def _human_bytes(n: float) -> str:
    if n < 1000:
        return f"{n:.0f} B"
    for unit in ("kB", "MB", "GB"):
        n /= 1000
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}"


def _progress_line(snap: dict, width: int = 30) -> str:
    needing, done = snap["buckets_needing_resync"], snap["buckets_resynchronized"]
    text = (f"{done}/{needing} buckets, {snap['entries_resynchronized']} entries, "
            f"{_human_bytes(snap['data_resynchronized'])}, {_human_bytes(snap['bandwidth'])}/s")
    if width:
        filled = int(width * done / needing) if needing else 0
        text = "[" + "#" * filled + "." * (width - filled) + "] " + text
    return text


def cmd_wait_sync(args) -> int:
    _, first, _ = _read(args)
    settings_file = _settings_file(args, first)
    if not settings_digest(settings_file):
        print(f"astaire wait-sync: cannot read the cluster settings file {settings_file}", file=sys.stderr)
        return EXIT_USAGE
    tty = sys.stdout.isatty() and not args.quiet
    out = sys.stdout
    started = last_progress = time.monotonic()
    last_key = last_line = None
    last_print = 0.0
    first_pid = None

    def say(line: str) -> None:
        nonlocal last_line, last_print
        if args.quiet or line == last_line:
            return
        if tty:
            out.write("\r\033[K" + line)
        elif time.monotonic() - last_print < 1.0 and last_line is not None:
            return
        else:
            out.write(line + "\n")
        out.flush()
        last_line, last_print = line, time.monotonic()

    def finish_line() -> None:
        if tty and last_line is not None:
            out.write("\n")
            out.flush()

    while True:
        pid, snap, problem = _read(args)
        if pid is None:
            finish_line()
            if first_pid is None:
                print(f"astaire wait-sync: astaire is not running (no daemon holds {args.pidfile})", file=sys.stderr)
            else:
                print(f"astaire wait-sync: astaire (pid {first_pid}) stopped while waiting", file=sys.stderr)
            return EXIT_NOT_RUNNING
        if first_pid is not None and pid != first_pid:
            finish_line()
            print(f"astaire wait-sync: astaire (pid {first_pid}) stopped while waiting; pid {pid} runs now",
                  file=sys.stderr)
            return EXIT_NOT_RUNNING
        first_pid = pid
        settings_file = _settings_file(args, snap)
        digest = settings_digest(settings_file)
        now = time.monotonic()
        if snap is not None:
            # "Not in the cluster" is about the settings the daemon took in: it answers only
            # when those are the file's (edited and not yet reloaded, the file may name it).
            if _synced(snap, digest) or (not snap.get("local_in_cluster", True)
                                         and snap["settings_digest"] == digest):
                say(_progress_line(snap, 30 if tty else 0) if snap["buckets_resynchronized"] else "in sync")
                finish_line()
                return _sync_verdict(args, snap, settings_file)
            key = (snap["settings_digest"], snap["state"], snap["buckets_needing_resync"],
                   snap["buckets_resynchronized"], snap["entries_resynchronized"], snap["resyncs_completed"],
                   snap["resync_started_at"])
            if key != last_key:
                last_key, last_progress = key, now
            if snap.get("waiting_for_local"):
                say(f"waiting for the local memcached {snap['local_name']} to answer "
                    f"({_progress_line(snap, 0)})")
            elif snap["state"] == "resyncing":
                say(_progress_line(snap, 30 if tty else 0))
            elif snap["settings_digest"] != digest:
                say(f"waiting for astaire (pid {pid}) to take in {args.cluster_settings_file} "
                    f"(after editing it, run 'astaire reload')")
        if now - last_progress > args.timeout_without_progress:
            finish_line()
            if snap is None:
                why = f"astaire publishes no usable statistics ({problem or 'none yet'})"
            elif snap.get("waiting_for_local"):
                why = f"the local memcached {snap['local_name']} does not answer"
            elif snap["state"] == "idle" and snap["settings_digest"] != digest:
                why = (f"astaire has not taken in the current {args.cluster_settings_file} "
                       f"(run 'astaire reload')")
            else:
                why = (f"no resync progress: {snap['buckets_resynchronized']}/{snap['buckets_needing_resync']} "
                       f"buckets, {snap['entries_resynchronized']} entries")
            print(f"astaire wait-sync: gave up after {args.timeout_without_progress:g} s without progress "
                  f"({now - started:.0f} s in all): {why}", file=sys.stderr)
            return EXIT_NO_PROGRESS
        time.sleep(args.poll_interval)


def _sync_verdict(args, snap: dict, settings_file: str) -> int:
    """No bucket needs resync: say whether that is the truth an operator may act on."""
    last = snap["last_resync"]
    if not snap.get("local_in_cluster", True):
        print(f"astaire wait-sync: the local node {snap['local_name']} is in neither server list of "
              f"{settings_file}: nothing was resynchronised (check local_ip or --local-name)", file=sys.stderr)
        return EXIT_NOT_IN_CLUSTER
    if last["result"] == "refused":
        print(f"astaire wait-sync: the last resync was refused: the local memcached {snap['local_name']} runs "
              f"without CAS (-C); restart it without -C", file=sys.stderr)
        return EXIT_FAILED_VBUCKETS
    if last["result"] == "failed":
        print(f"astaire wait-sync: the last resync could not serve vbuckets {ranges(last['failed_vbuckets'])}: "
              f"no old replica streamed them (see the log; 'astaire full-resync' retries)", file=sys.stderr)
        return EXIT_FAILED_VBUCKETS
    if not args.quiet:
        print(f"astaire is in sync with {settings_file}")
    return 0


# -- status -----------------------------------------------------------------------------------

def status_dict(pid: int | None, snap: dict | None, digest: str | None) -> dict:
    if snap is None:
        return {"state": "stopped" if pid is None else "starting", "pid": pid,
                "buckets_needing_resync": 0, "buckets_resynchronized": 0,
                "entries_resynchronized": 0, "data_resynchronized": 0, "bandwidth": 0,
                "last_resync": {"result": None, "failed_vbuckets": []}, "connections": [],
                "settings_current": None, "waiting_for_local": False, "target_cas_disabled": False,
                "local_in_cluster": None}
    out = dict(snap)
    out["settings_current"] = (snap["settings_digest"] == digest) if digest else None
    return out


def cmd_status(args) -> int:
    pid, snap, problem = _read(args)
    args.cluster_settings_file = _settings_file(args, snap)
    digest = settings_digest(args.cluster_settings_file) or None
    status = status_dict(pid, snap, digest)
    if problem:
        status["statistics_problem"] = problem
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
        return 0 if pid else EXIT_STATUS_NOT_RUNNING
    if pid is None:
        print("astaire is not running")
        return EXIT_STATUS_NOT_RUNNING
    if snap is None:
        if problem:
            print(f"astaire (pid {pid}) is running, but its statistics cannot be read: {problem}")
        else:
            print(f"astaire (pid {pid}) is starting: no statistics yet")
        return 0
    lines = [f"astaire (pid {pid}) is {snap['state']}, local node {snap['local_name']}, {snap['workers']} workers"]
    if snap["waiting_for_local"]:
        lines.append(f"  waiting for the local memcached {snap['local_name']} to answer")
    if snap["target_cas_disabled"]:
        lines.append(f"  the local memcached {snap['local_name']} runs without CAS (-C): resyncs are refused")
    if not snap["local_in_cluster"]:
        lines.append(f"  the local node {snap['local_name']} is in neither server list: nothing to resync")
    if status["settings_current"] is False:
        lines.append(f"  has not taken in the current {args.cluster_settings_file} (run 'astaire reload')")
    if snap["state"] == "resyncing":
        lines.append(f"  {'full ' if snap['resync_full'] else ''}resync running for "
                     f"{time.time() - snap['resync_started_at']:.0f} s: {_progress_line(snap, 0)}")
        for c in snap["connections"]:
            entries = sum(b["entries"] for b in c["buckets"])
            lines.append(f"    streaming {c['buckets_needing_resync']} vbuckets from {c['address']}:{c['port']}: "
                         f"{entries} entries")
    else:
        lines.append("  buckets needing resync: 0")
    last = snap["last_resync"]
    if last["result"] is None:
        lines.append("  no resync completed yet")
    else:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(last["finished_at"]))
        lines.append(f"  last {'full ' if last['full'] else ''}resync {last['result']} at {when} "
                     f"after {last['seconds']:.1f} s: {last['entries']} entries, {_human_bytes(last['bytes'])}")
        if last["failed_vbuckets"]:
            lines.append(f"  vbuckets no source could serve: {last['failed_vbuckets']}")
    print("\n".join(lines))
    return 0
