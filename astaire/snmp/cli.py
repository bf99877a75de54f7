"""``astaire-snmp``: the statistics agent beside the daemon (its contract: docs/compatibility.md)."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from astaire.snmp import _sources

log = logging.getLogger("astaire.snmp")

DEFAULT_AGENTX_SOCKET = "/var/agentx/master"
DEFAULT_LISTEN = "127.0.0.1:161"
POLL_INTERVAL = 0.5


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="astaire-snmp",
        description="Serve Astaire's resync statistics (the astaire subtree 1.2.826.0.1.1578918.9.9 of "
        "PROJECT-CLEARWATER-MIB) over SNMP, raise alarm 5501 as INFORMs while a resync runs, and "
        "optionally export Prometheus metrics. It only reads the daemon's statistics file.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--pidfile", metavar="FILE",
                     help=f"the daemon's pidfile; its statistics file sits beside it (default {_sources.DEFAULT_PIDFILE})")
    src.add_argument("--stats-file", metavar="FILE", help="the daemon's statistics file, read directly")
    p.add_argument("--config", default=_sources.DEFAULT_NODE_CONFIG, metavar="FILE",
                   help="the node config: snmp_ip says where alarm INFORMs go (default %(default)s)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--listen", metavar="ADDR:PORT",
                      help="a standalone agent on UDP (port 0: any free port, logged); default, when "
                      f"{DEFAULT_AGENTX_SOCKET} does not exist: {DEFAULT_LISTEN}")
    mode.add_argument("--agentx", nargs="?", const=DEFAULT_AGENTX_SOCKET, metavar="SOCKET",
                      help=f"an AgentX subagent of snmpd on this unix socket (default {DEFAULT_AGENTX_SOCKET})")
    p.add_argument("--community", default="clearwater", help="the read community, also used for INFORMs "
                   "(default %(default)s)")
    p.add_argument("--inform-port", type=int, default=162, metavar="PORT",
                   help="the UDP port alarm INFORMs go to on each snmp_ip address (default %(default)s)")
    p.add_argument("--prometheus", metavar="ADDR:PORT", help="serve /metrics for Prometheus here")
    p.add_argument("--v3-user", metavar="NAME", help="also answer SNMPv3 (USM authPriv, SHA + AES) for this user")
    p.add_argument("--v3-auth-key", metavar="KEY", help="the v3 user's SHA authentication pass phrase (8+ chars)")
    p.add_argument("--v3-priv-key", metavar="KEY", help="the v3 user's AES privacy pass phrase (8+ chars)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="diagnostics to stderr at this level (default %(default)s)")
    return p


def _check(args, p: argparse.ArgumentParser) -> None:
    v3 = (args.v3_user, args.v3_auth_key, args.v3_priv_key)
    if any(v3) and not all(v3):
        p.error("--v3-user, --v3-auth-key and --v3-priv-key go together")
    if args.v3_user and (len(args.v3_auth_key) < 8 or len(args.v3_priv_key) < 8):
        p.error("SNMPv3 keys must be at least 8 characters")
    if not 0 < args.inform_port < 65536:
        p.error("--inform-port must be 1-65535")


async def run(args) -> int:
    from astaire.snmp.alarm import AlarmNotifier, destinations
    from astaire.snmp.source import StatsSource

    source = StatsSource(pidfile=None if args.stats_file else (args.pidfile or _sources.DEFAULT_PIDFILE),
                         stats_file=args.stats_file)
    node = _sources.read_node_config(args.config)
    targets = destinations(node.get("snmp_ip", ""), args.inform_port)
    if targets:
        log.info("alarm INFORMs go to %s", ", ".join(f"{h}:{p}" for h, p in targets))
    else:
        log.info("no snmp_ip in %s: no alarm INFORMs", args.config)
    notifier = AlarmNotifier(targets, args.community)
    notifier.start()

    agentx_socket = args.agentx
    if args.listen is None and agentx_socket is None and os.path.exists(DEFAULT_AGENTX_SOCKET):
        agentx_socket = DEFAULT_AGENTX_SOCKET
    closers = []
    if agentx_socket is not None:
        from astaire.snmp.agentx import AgentXSubagent

        sub = AgentXSubagent(source, agentx_socket)
        sub.start()
        closers.append(sub.close)
    else:
        from astaire.snmp.standalone import StandaloneAgent, parse_listen

        agent = StandaloneAgent(source, parse_listen(args.listen or DEFAULT_LISTEN), args.community,
                                args.v3_user, args.v3_auth_key, args.v3_priv_key)
        agent.start()
        closers.append(agent.close)
    metrics = None
    if args.prometheus:
        from astaire.snmp.prometheus import MetricsExporter
        from astaire.snmp.standalone import parse_listen

        metrics = MetricsExporter(source)
        metrics.serve(*parse_listen(args.prometheus))
        closers.append(metrics.close)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("astaire-snmp started (pid %d), statistics from %s", os.getpid(), source.stats_file)
    try:
        while not stop.is_set():
            snap = source.snapshot()
            source.sample()
            if snap is not None:
                notifier.update(snap["state"] == "resyncing" or snap["buckets_needing_resync"] > 0)
            if metrics is not None:
                metrics.observe(snap)
            try:
                await asyncio.wait_for(stop.wait(), POLL_INTERVAL)
            except asyncio.TimeoutError:
                pass
    finally:
        log.info("astaire-snmp stopping")
        for close in reversed(closers):
            close()
        notifier.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    _check(args, p)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), stream=sys.stderr,
                        format="%(asctime)s astaire-snmp %(levelname)s %(message)s")
    try:
        return asyncio.run(run(args))
    except OSError as e:
        log.error("cannot start: %s", e)
        return 1
    except ValueError as e:
        log.error("%s", e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
