"""Diagnostics to ``<log dir>/astaire_current.log``; operator events to syslog.

Clearwater log levels are numbers: 0 error, 1 warning, 2 status, 3 info, 4 verbose,
5 debug. They map onto Python levels, with STATUS (25) and VERBOSE (15) added.

Operator events follow Clearwater's PDLog: syslog facility LOG_DAEMON, ident
"astaire", message ``"<id> - Description: ... @@Cause: ... @@Effect: ... @@Action: ..."``
with ids 7000 + n. Every event also goes to the diagnostics log. The syslog sink is
replaceable (``set_event_sink``) so tests can capture events.
"""
from __future__ import annotations

import logging
import logging.handlers
import os
import syslog
import time
from dataclasses import dataclass
from collections.abc import Callable

STATUS = 25
VERBOSE = 15
logging.addLevelName(STATUS, "Status")
logging.addLevelName(VERBOSE, "Verbose")

CLEARWATER_LEVELS = {0: logging.ERROR, 1: logging.WARNING, 2: STATUS, 3: logging.INFO, 4: VERBOSE, 5: logging.DEBUG}
LOG_FILE_NAME = "astaire_current.log"
MAX_BYTES = 10 * 1024 * 1024
BACKUP_COUNT = 5

logger = logging.getLogger("astaire")


def python_level(clearwater_level: int) -> int:
    """Clearwater 0..5 to a Python level; out-of-range values clamp to the nearest end."""
    return CLEARWATER_LEVELS[min(5, max(0, int(clearwater_level)))]


_LEVEL_NAMES = {logging.ERROR: "Error", logging.WARNING: "Warning", STATUS: "Status", logging.INFO: "Info",
                VERBOSE: "Verbose", logging.DEBUG: "Debug"}


class _Formatter(logging.Formatter):
    """Clearwater's shape: ``25-11-2025 16:11:00.123 UTC Status ...``."""

    converter = time.gmtime

    def format(self, record):
        record.cwlevel = _LEVEL_NAMES.get(record.levelno, record.levelname)
        return super().format(record)

    def formatTime(self, record, datefmt=None):  # noqa: N802 (logging's name)
        return time.strftime("%d-%m-%Y %H:%M:%S", self.converter(record.created)) + f".{int(record.msecs):03d} UTC"


FORMAT = "%(asctime)s %(cwlevel)s [%(process)d] %(name)s: %(message)s"


def setup_logging(log_dir: str, level: int = 2) -> logging.Handler:
    """Log to ``log_dir/astaire_current.log`` (rotated at 10 MB, 5 kept) at Clearwater ``level``.

    Only the supervisor rotates; forked workers call ``reopen_for_worker()`` so that they
    append to whatever file is current instead of rotating it under the supervisor.
    """
    os.makedirs(log_dir, exist_ok=True)
    handler = logging.handlers.RotatingFileHandler(
        os.path.join(log_dir, LOG_FILE_NAME), maxBytes=MAX_BYTES, backupCount=BACKUP_COUNT)
    handler.setFormatter(_Formatter(FORMAT))
    for old in list(logger.handlers):
        logger.removeHandler(old)
        old.close()
    logger.addHandler(handler)
    logger.setLevel(python_level(level))
    logger.propagate = False
    return handler


def reopen_for_worker() -> None:
    """In a forked worker: append to the current log file without ever rotating it."""
    for old in list(logger.handlers):
        if isinstance(old, logging.handlers.RotatingFileHandler):
            logger.removeHandler(old)
            new = logging.handlers.WatchedFileHandler(old.baseFilename)
            new.setFormatter(old.formatter)
            logger.addHandler(new)
            old.close()  # this process's copy of the descriptor only


# -- operator events ---------------------------------------------------------------------

EventSink = Callable[[int, str], None]


def _syslog_sink(priority: int, message: str) -> None:
    syslog.openlog("astaire", syslog.LOG_PID, syslog.LOG_DAEMON)
    syslog.syslog(priority, message)


_sink: EventSink = _syslog_sink


def set_event_sink(sink: EventSink | None) -> EventSink:
    """Send events to ``sink(priority, message)`` instead of syslog (None restores syslog)."""
    global _sink
    previous = _sink
    _sink = sink or _syslog_sink
    return previous


@dataclass(frozen=True)
class Event:
    id: int
    priority: int
    description: str
    cause: str
    effect: str
    action: str

    def format(self, *args) -> str:
        description = self.description % args if args else self.description
        return (f"{self.id} - Description: {description} @@Cause: {self.cause} "
                f"@@Effect: {self.effect} @@Action: {self.action}")

    def log(self, *args) -> str:
        message = self.format(*args)
        level = logging.ERROR if self.priority <= syslog.LOG_ERR else (
            logging.WARNING if self.priority == syslog.LOG_WARNING else STATUS)
        if logger.handlers:  # before setup_logging (a bad option) there is no log file yet
            logger.log(level, "event %s", message)
        try:
            _sink(self.priority, message)
        except Exception:  # a broken syslog must not take the daemon down
            logger.exception("could not send event %d to syslog", self.id)
        return message


BASE = 7000

INVALID_OPTION = Event(
    BASE + 1, syslog.LOG_ERR,
    "Fatal - Astaire was started with an invalid or missing option: %s.",
    "The command line or /etc/clearwater/config gives Astaire an option it cannot use.",
    "Astaire exits.",
    "Correct the option (run 'astaire run --help' for the options) and start Astaire again.")
STARTED = Event(
    BASE + 2, syslog.LOG_NOTICE,
    "Astaire started.",
    "The Astaire application is starting.",
    "Normal.",
    "None.")
ENDED = Event(
    BASE + 3, syslog.LOG_NOTICE,
    "Astaire ended.",
    "The Astaire application has stopped.",
    "Memcached data is no longer actively resynchronised on this node.",
    "None if the stop was intended; otherwise start Astaire again.")
TERMINATED = Event(
    BASE + 4, syslog.LOG_ERR,
    "Astaire has been terminated by signal %d.",
    "Astaire received a signal asking it to stop.",
    "Astaire stops its workers and exits; a running resync is abandoned.",
    "None if the stop was intended (for example by the service manager); otherwise start Astaire again.")
RESYNC_FAILED = Event(
    BASE + 5, syslog.LOG_ERR,
    "Astaire resync failed: no source could serve vbuckets %s.",
    "Every old replica of these vbuckets was unreachable or failed while streaming.",
    "Records of these vbuckets may be missing from the local memcached until clients rewrite them.",
    "Check that the memcached nodes in cluster_settings are running and reachable, then run "
    "'astaire full-resync'.")
RESYNC_STARTED = Event(
    BASE + 6, syslog.LOG_NOTICE,
    "Astaire has started a %sresync operation.",
    "The cluster view changed, an operator asked for a full resync, or the local memcached restarted.",
    "Astaire copies the data the local memcached should hold from the other nodes.",
    "Wait for the resync to complete ('astaire wait-sync') before changing the cluster again.")
RESYNC_COMPLETED = Event(
    BASE + 7, syslog.LOG_NOTICE,
    "Astaire has completed a resync operation.",
    "Astaire has copied all the data the local memcached should hold.",
    "Normal.",
    "None.")
RESYNC_REFUSED = Event(
    BASE + 8, syslog.LOG_ERR,
    "Astaire refused to resync: the local memcached %s has CAS disabled.",
    "The local memcached was started with -C, so it gives no CAS values and Astaire could not "
    "replace an older record without risking a newer one written meanwhile.",
    "The local memcached is not resynchronised; its records arrive only as clients write them.",
    "Restart the local memcached without -C; Astaire then runs a full resync.")
LOCAL_NOT_IN_CLUSTER = Event(
    BASE + 9, syslog.LOG_WARNING,
    "Astaire's local node %s is in neither server list of cluster_settings.",
    "local_ip in /etc/clearwater/config (or --local-name) does not name a server of the cluster, "
    "often a typo.",
    "Astaire pulls nothing to this node; 'astaire wait-sync' exits 5.",
    "Correct local_ip (or the server lists in cluster_settings) and restart Astaire.")
