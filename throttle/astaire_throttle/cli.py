"""The ``astaire-throttle`` command line."""
from __future__ import annotations

import argparse
import logging
import logging.handlers
import signal
import sys

from astaire.cli.argtypes import number
from astaire_throttle import __version__
from astaire_throttle.cgroup import DEFAULT_CGROUP_NAME, CgroupUnavailable, check_group_name
from astaire_throttle.config import DEFAULT_CONFIG_PATH, DEFAULT_PERCENTAGE, PERCENTAGE_SETTING
from astaire_throttle.service import MODES, Throttle, Waker
from astaire_throttle.signals import DutyCycleLimiter
from astaire_throttle.targets import DEFAULT_PIDFILE

log = logging.getLogger("astaire_throttle")

EXIT_OK = 0
EXIT_FAILED = 1  # the limit could not be applied as asked

DESCRIPTION = f"""\
Hold Astaire (its supervisor and every worker) to {PERCENTAGE_SETTING}% of each
CPU of this node, summed over all CPUs: with 2 CPUs and the default
{DEFAULT_PERCENTAGE:g}%, Astaire gets 0.1 CPU seconds per second in total.

The percentage is read from the config file (shell-style name=value lines;
read, never executed). Missing: {DEFAULT_PERCENTAGE:g}. Not a number, 0 or below, or above
100: an error is logged and {DEFAULT_PERCENTAGE:g} is used.

The limit is a cpu quota on a cgroup (default name "{DEFAULT_CGROUP_NAME}"): quota =
period x CPUs x percentage / 100, in cpu.cfs_quota_us (cgroup v1) or cpu.max
(cgroup v2). Processes forked later inherit the group. Where no cgroup is
writable, the processes are stopped and continued (SIGSTOP/SIGCONT) on a
100 ms duty cycle instead, which is coarser.

Without --once it runs as a service: every --poll-interval seconds it re-reads
the pidfile and moves any new Astaire process (a restarted Astaire, a new
worker) under the limit; a missing pidfile or dead pid is logged and polling
continues. SIGTERM or SIGINT lift the limit (quota -1 / "max"; processes stay
in the group) and end it; SIGHUP re-reads the percentage. Restarting the
service re-reads it too.
"""

EPILOG = """\
exit status: 0 done (or stopped by a signal); 1 the limit could not be applied
as asked (a forced --mode unusable, or --once without a cgroup); 2 bad usage.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="astaire-throttle", description=DESCRIPTION,
                                epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE", default=DEFAULT_CONFIG_PATH,
                   help=f"node config holding {PERCENTAGE_SETTING} (default: %(default)s)")
    p.add_argument("--pidfile", metavar="FILE", default=DEFAULT_PIDFILE,
                   help="Astaire's pidfile, naming its supervisor (default: %(default)s)")
    p.add_argument("--once", action="store_true",
                   help="apply the limit to the current Astaire processes and exit, leaving "
                        "it in place (needs a cgroup; later workers inherit it, a restarted "
                        "Astaire does not)")
    p.add_argument("--mode", choices=MODES, default="auto",
                   help="how to hold the limit: auto (cgroup v1 cpu, else cgroup v2, else "
                        "signal), v1, v2 (only that hierarchy, fail otherwise) or signal "
                        "(SIGSTOP/SIGCONT duty cycle) (default: %(default)s)")
    p.add_argument("--cgroup-name", metavar="NAME", default=DEFAULT_CGROUP_NAME,
                   type=_group_name, help="the cgroup to create or reuse (default: %(default)s)")
    p.add_argument("--cgroup-v1-root", metavar="DIR",
                   help="cgroup v1 hierarchy with the cpu controller (default: found in "
                        "/proc/self/mountinfo, e.g. /sys/fs/cgroup/cpu)")
    p.add_argument("--cgroup-v2-root", metavar="DIR",
                   help="cgroup v2 directory to create the group under (default: the "
                        "cgroup2 mount found in /proc/self/mountinfo)")
    p.add_argument("--poll-interval", metavar="SECONDS", type=_positive, default=1.0,
                   help="how often to re-read the pidfile and look for new processes "
                        "(default: %(default)s)")
    p.add_argument("--log-file", metavar="FILE",
                   help="append the log to FILE (reopened if rotated) instead of stderr")
    p.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error"],
                   help="least severe level logged (default: %(default)s)")
    p.add_argument("--version", action="version", version=f"astaire-throttle {__version__}")
    return p


def _group_name(text: str) -> str:
    try:
        return check_group_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


_positive = number(float, lambda v: v > 0, "must be more than 0 seconds")


def _setup_logging(log_file: str | None, level: str) -> logging.Handler:
    if log_file:
        handler: logging.Handler = logging.handlers.WatchedFileHandler(log_file)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        "%(asctime)s astaire-throttle[%(process)d] %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(level.upper())
    log.propagate = False
    return handler


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = _setup_logging(args.log_file, args.log_level)
    try:
        return _run(args)
    finally:
        log.removeHandler(handler)
        handler.close()


def _run(args: argparse.Namespace) -> int:
    throttle = Throttle(config_path=args.config, pidfile=args.pidfile, mode=args.mode,
                        cgroup_name=args.cgroup_name, v1_root=args.cgroup_v1_root,
                        v2_root=args.cgroup_v2_root, poll_interval=args.poll_interval)
    log.info("starting (config %s, pidfile %s, mode %s)", args.config, args.pidfile, args.mode)
    waker = Waker().install()  # before the limiter exists: a SIGTERM now still lifts it
    try:
        try:
            throttle.start()
        except CgroupUnavailable as exc:
            log.error("cannot apply the limit with --mode %s: %s", args.mode, exc)
            return EXIT_FAILED
        if args.once:
            if isinstance(throttle.limiter, DutyCycleLimiter):
                throttle.stop()
                log.error("--once needs a cgroup: the signal duty cycle holds the limit only "
                          "while the service runs")
                return EXIT_FAILED
            held = throttle.apply()
            log.info("--once: %d process(es) held by %s; the limit stays in place",
                     held, throttle.limiter)
            return EXIT_OK
        throttle.run(waker)
        if waker.signum is not None:
            log.info("stopped by %s", signal.Signals(waker.signum).name)
        return EXIT_OK
    finally:
        waker.close()


if __name__ == "__main__":
    sys.exit(main())
