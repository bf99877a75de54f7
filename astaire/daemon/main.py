"""Starting the daemon: check the settings, take the pidfile, detach if asked, run the arbiter."""
from __future__ import annotations

import logging
import os
import sys

from astaire.cluster.settings import ConfigError, read_cluster_settings, settings_digest
from astaire.cluster.view import ClusterView
from astaire.daemon import logs
from astaire.daemon.arbiter import EXIT_ALREADY_RUNNING, EXIT_CONFIG, EXIT_USAGE, Options, Supervisor
from astaire.daemon.pidfile import AlreadyRunning, Pidfile

log = logging.getLogger("astaire.supervisor")


def daemonize() -> None:
    """Double fork, new session, cwd /, standard streams to /dev/null."""
    if os.fork():
        os._exit(0)
    os.setsid()
    if os.fork():
        os._exit(0)
    os.chdir("/")
    os.umask(0o022)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    if null > 2:
        os.close(null)


def main(options: Options) -> int:
    """Start the daemon with checked ``options``: refuse a second instance, read the
    settings (exit 3 if invalid), detach if asked, run until stopped."""
    try:
        logs.setup_logging(options.log_dir, options.log_level)
    except OSError as e:
        message = f"cannot write the log in {options.log_dir}: {e.strerror or e}"
        print(f"astaire: {message}", file=sys.stderr)
        logs.INVALID_OPTION.log(f"--log-file {options.log_dir}: {e.strerror or e}")
        return EXIT_USAGE
    digest = settings_digest(options.cluster_settings_file)
    try:
        settings = read_cluster_settings(options.cluster_settings_file)
    except ConfigError as e:
        print(f"astaire: invalid cluster settings: {e}", file=sys.stderr)
        log.error("invalid cluster settings at start: %s", e)
        return EXIT_CONFIG
    view = ClusterView.from_settings(settings, options.vbuckets, options.replicas)
    pidfile = Pidfile(options.pidfile)
    try:
        pidfile.acquire()
    except AlreadyRunning as e:
        print(f"astaire: {e}", file=sys.stderr)
        log.error("%s", e)
        return EXIT_ALREADY_RUNNING
    except OSError as e:
        print(f"astaire: cannot use pidfile {options.pidfile}: {e}", file=sys.stderr)
        return EXIT_ALREADY_RUNNING
    if options.daemon:
        daemonize()
        logs.setup_logging(options.log_dir, options.log_level)  # a fresh handler in the daemon
    pidfile.write(os.getpid())
    return Supervisor(options, view, digest, pidfile).run()
