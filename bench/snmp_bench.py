#!/usr/bin/env python3
"""SNMP agent benchmark (issue 9): on loopback, a real daemon resyncing a new node of a 3-node
cluster off 2 old replicas (about 84 (vbucket, source) pairs), held still by freezing both
sources (SIGSTOP) while net-snmp's ``snmpbulkwalk`` walks the whole astaire subtree of a
standalone ``astaire-snmp``; then GETs per second (one GET of the four scalars at a time,
on one UDP socket) against the same agent.

    python bench/snmp_bench.py [--walks 5] [--get-seconds 3] [--json-out FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))  # run from a checkout

from astaire.demo import workload  # noqa: E402
from astaire.demo.localcluster import MemcachedServer  # noqa: E402
from astaire.snmp.mib import ASTAIRE  # noqa: E402
from astaire.stats import StatsReader, StatsUnavailable  # noqa: E402
from astaire.cluster.view import ClusterView  # noqa: E402
from astaire.demo.run import CLI  # noqa: E402

A = ".".join(map(str, ASTAIRE))


def wait(pred, timeout, what):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    raise SystemExit(f"timed out waiting for {what}")


def encoded_get(community: str = "clearwater") -> bytes:
    from pyasn1.codec.ber import encoder
    from pysnmp.proto.api import v2c

    pdu = v2c.GetRequestPDU()
    v2c.apiPDU.set_defaults(pdu)
    v2c.apiPDU.set_varbinds(pdu, [(f"{A}.{n}.0", v2c.Null("")) for n in range(1, 5)])
    msg = v2c.Message()
    v2c.apiMessage.set_defaults(msg)
    v2c.apiMessage.set_community(msg, community)
    v2c.apiMessage.set_pdu(msg, pdu)
    return encoder.encode(msg)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--walks", type=int, default=5)
    p.add_argument("--get-seconds", type=float, default=3.0)
    p.add_argument("--records", type=int, default=3000)
    p.add_argument("--json-out")
    args = p.parse_args()
    env = {**os.environ, "MIBS": "", "SNMPCONFPATH": os.devnull}
    tmp = tempfile.mkdtemp(prefix="astaire-snmp-bench-")
    servers = [MemcachedServer(memory_mb=64).start() for _ in range(3)]
    a, b, n = servers
    procs = []
    try:
        workload.load(ClusterView([a.name, b.name]), list(workload.make_records(args.records, table="bench")))
        pidfile = os.path.join(tmp, "astaire.pid")
        settings = os.path.join(tmp, "cluster_settings")
        with open(settings, "w") as f:
            f.write(f"servers={a.name},{b.name}\nnew_servers={a.name},{b.name},{n.name}\n")
        agent_log = open(os.path.join(tmp, "agent.log"), "w+")
        agent = subprocess.Popen([sys.executable, "-m", "astaire.snmp.cli", "--pidfile", pidfile, "--config",
                                  os.devnull, "--listen", "127.0.0.1:0"], stdout=agent_log, stderr=subprocess.STDOUT)
        procs.append(agent)
        port = int(wait(lambda: re.search(r"listening on 127\.0\.0\.1:(\d+)", open(agent_log.name).read()), 20,
                        "the agent").group(1))
        for s in (a, b):
            os.kill(s.proc.pid, signal.SIGSTOP)
        daemon = subprocess.Popen([*CLI, "run", "--local-name", n.name,
                                   "--cluster-settings-file", settings, "--config", os.devnull, "--log-file", tmp,
                                   "--pidfile", pidfile, "--workers", "2", "--source", "crawler"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(daemon)

        def two_streams():
            try:
                return len(StatsReader(os.path.join(tmp, "astaire.stats")).snapshot()["connections"]) == 2
            except StatsUnavailable:
                return False
        wait(two_streams, 20, "both streams")
        snap = StatsReader(os.path.join(tmp, "astaire.stats")).snapshot()
        times, rows = [], 0
        walk = ["snmpbulkwalk", "-v2c", "-c", "clearwater", "-On", "-Cr25", f"127.0.0.1:{port}", A]
        for _ in range(args.walks):
            t0 = time.perf_counter()
            out = subprocess.run(walk, capture_output=True, text=True, env=env, check=True).stdout
            times.append(time.perf_counter() - t0)
            rows = len(out.splitlines())
        for s in (a, b):
            os.kill(s.proc.pid, signal.SIGCONT)

        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.settimeout(2)
        sock.connect(("127.0.0.1", port))
        msg = encoded_get()
        count, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < args.get_seconds:
            sock.send(msg)
            sock.recv(65536)
            count += 1
        gets = count / (time.perf_counter() - t0)
        result = {"pairs_needing_resync": snap["buckets_needing_resync"], "connections": len(snap["connections"]),
                  "rows_walked": rows, "bulkwalk_seconds_min": min(times), "bulkwalk_seconds_median":
                  sorted(times)[len(times) // 2], "gets_per_second": gets}
        print(json.dumps(result, indent=2))
        print(f"\nsnmpbulkwalk of the subtree ({rows} instances, {snap['buckets_needing_resync']} pairs, "
              f"{len(snap['connections'])} sources): min {min(times) * 1000:.0f} ms, median "
              f"{sorted(times)[len(times) // 2] * 1000:.0f} ms; GETs (4 scalars each): {gets:.0f}/s")
        if args.json_out:
            with open(args.json_out, "w") as f:
                json.dump(result, f, indent=2)
    finally:
        for s in (a, b):
            try:
                os.kill(s.proc.pid, signal.SIGCONT)
            except (ProcessLookupError, AttributeError):
                pass
        for pr in procs:
            pr.terminate()
            try:
                pr.wait(10)
            except subprocess.TimeoutExpired:
                pr.kill()
        for s in servers:
            s.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
