#!/usr/bin/env python3
"""Line-rate benchmark of a resync (docs/architecture.md, "Measuring"), on loopback with stock memcached.

In one run:
  * astaire   - N MemcachedStore-layout records loaded into a 2-node cluster, resized to 3;
                the Astaire daemon for the new node is timed from start to sync.
  * ceiling   - a fresh memcached ingesting the records the new node received, as
                pre-encoded pipelined binary ADDQ frames on one connection.
  * per-record- the original pattern: GET then ADD, one round trip each, per record
                (on a sample of --per-record-sample records, rate extrapolated).
Reports records/s (records the new node ends up holding, per second), entries/s (Astaire
streams every vbucket from both old replicas, so it receives about twice as many), MB/s,
the ratio to the ceiling (ceiling time / Astaire time for the same records), Astaire's CPU
seconds per million entries and peak RSS, as JSON (--json-out) and as a table.

    python bench/resync_bench.py                 # 1,000,000 x 100-byte values
    python bench/resync_bench.py --records 100000
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import threading
import time

import psutil

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))  # run from a checkout

from astaire import codec
from astaire.cluster.settings import parse_server
from astaire.demo.run import run_until_synced
from astaire.demo.localcluster import LocalCluster, MemcachedServer
from astaire.cluster.view import ClusterView, vbucket_for_key
from astaire.demo import workload


class ProcessSampler(threading.Thread):
    """Peak RSS (sum over a process tree) and CPU seconds of the tree, sampled every 50 ms."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.root = psutil.Process(pid)
        self.peak_rss = 0
        self.cpu: dict[int, float] = {}
        self.stop_event = threading.Event()

    def sample(self):
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return
        rss = 0
        for p in procs:
            try:
                with p.oneshot():
                    rss += p.memory_info().rss
                    t = p.cpu_times()
                    self.cpu[p.pid] = t.user + t.system
            except psutil.Error:
                pass
        self.peak_rss = max(self.peak_rss, rss)

    def run(self):
        while not self.stop_event.wait(0.05):
            self.sample()

    def stop(self) -> float:
        self.sample()
        self.stop_event.set()
        self.join()
        return sum(self.cpu.values())


def run_astaire(records, value_size, workers, source) -> dict:
    workdir = tempfile.mkdtemp(prefix="astaire-bench-")
    settings = os.path.join(workdir, "cluster_settings")
    mem = max(256, len(records) * (value_size + 150) * 2 // (1 << 20))
    with LocalCluster(3, memory_mb=mem, threads=2) as cluster:
        a, b, c = cluster.names
        before, after = ClusterView([a, b]), ClusterView([a, b], [a, b, c])
        t = time.monotonic()
        workload.load(before, records)
        load_s = time.monotonic() - t
        with open(settings, "w") as f:
            f.write(f"servers={a},{b}\nnew_servers={a},{b},{c}\n")
        sampler = None

        def start_sampling(pid: int) -> None:
            nonlocal sampler
            sampler = ProcessSampler(pid)
            sampler.start()

        cpu = 0.0

        def stop_sampling() -> None:
            nonlocal cpu
            cpu = sampler.stop()

        sync = run_until_synced(c, settings, workdir, source, workers, poll_interval=0.05,
                                on_started=start_sampling, on_synced=stop_sampling)
        if not sync.ok:
            raise SystemExit(f"wait-sync failed: {sync.error}")
        status, wall = sync.status, sync.seconds
        last = status["last_resync"]
        moved = [r for r in records if c in after.new[vbucket_for_key(r.key)]]
        placement = workload.check_placement(moved, {c: {r.key for r in moved}}, [c], compare_expiry=False)
    entries, data = int(last["entries"]), int(last["bytes"])
    secs = float(last.get("seconds") or wall)
    return {"load_seconds": round(load_s, 2), "records_for_new_node": len(moved), "entries": entries,
            "bytes": data, "seconds": round(secs, 3), "wall_seconds_to_sync": round(wall, 3),
            # The new node must end up holding len(moved) records; it streams each of its vbuckets
            # from both old replicas, so it receives about twice that many entries.
            "records_per_second": round(len(moved) / secs),
            "entries_per_second": round(entries / secs), "mb_per_second": round(data / secs / 1e6, 2),
            "cpu_seconds": round(cpu, 2),
            "cpu_seconds_per_million": round(cpu / max(entries, 1) * 1e6, 2),
            "peak_rss_mb": round(sampler.peak_rss / (1 << 20), 1),
            "result": last["result"], "placement_ok": placement.ok}, moved


def run_ceiling(moved, value_size) -> dict:
    """Pre-encoded ADDQ frames into a fresh memcached, one connection, NOOP at the end."""
    frames = codec.encode_batch((codec.OP_ADDQ, r.key, r.value, r.flags, r.expiration, 0, 0) for r in moved)
    mem = max(256, len(moved) * (value_size + 150) * 2 // (1 << 20))
    with MemcachedServer(memory_mb=mem, threads=2) as server:
        host, port = parse_server(server.name)
        with socket.create_connection((host, port)) as s:
            t0 = time.monotonic()
            sender = threading.Thread(target=s.sendall, args=(frames + codec.encode_noop(7),))
            sender.start()
            parser = codec.FrameParser()
            errors = 0
            done = False
            while not done:
                data = s.recv(1 << 18)
                if not data:
                    raise SystemExit("ceiling: memcached closed the connection")
                parser.feed(data)
                for f in parser:
                    if f.opcode == codec.OP_NOOP:
                        done = True
                    else:
                        errors += 1
            secs = time.monotonic() - t0
            sender.join()
    return {"records": len(moved), "bytes": len(frames), "seconds": round(secs, 3),
            "records_per_second": round(len(moved) / secs), "mb_per_second": round(len(frames) / secs / 1e6, 2),
            "errors": errors}


def run_per_record(moved, sample, value_size) -> dict:
    """The original pattern: GET (wait for the answer), then ADD (wait), per record."""
    subset = moved[:sample]
    with MemcachedServer(memory_mb=256) as server:
        host, port = parse_server(server.name)
        with socket.create_connection((host, port)) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            parser = codec.FrameParser()

            def call(req):
                s.sendall(req)
                while True:
                    for f in parser:
                        return f
                    parser.feed(s.recv(65536))

            nbytes = 0
            t0 = time.monotonic()
            for r in subset:
                call(codec.encode_get(r.key))
                req = codec.encode_add(r.key, r.value, r.flags, r.expiration)
                nbytes += len(req)
                call(req)
            secs = time.monotonic() - t0
    return {"records": len(subset), "seconds": round(secs, 3),
            "records_per_second": round(len(subset) / secs), "mb_per_second": round(nbytes / secs / 1e6, 2)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, default=1_000_000)
    p.add_argument("--value-size", type=int, default=100)
    p.add_argument("--workers", type=int, default=None, help="Astaire workers (default one per CPU)")
    p.add_argument("--source", default="auto", choices=("auto", "crawler", "tap"))
    p.add_argument("--per-record-sample", type=int, default=50_000,
                   help="records timed for the per-record round-trip pattern (default %(default)s)")
    p.add_argument("--json-out", help="also write the JSON report to this file")
    args = p.parse_args(argv)

    records = list(workload.make_records(args.records, args.value_size, table="bench"))
    astaire, moved = run_astaire(records, args.value_size, args.workers, args.source)
    ceiling = run_ceiling(moved, args.value_size)
    per_record = run_per_record(moved, args.per_record_sample, args.value_size)
    report = {
        "records_loaded": args.records, "value_size": args.value_size, "codec": codec.IMPLEMENTATION,
        "cpus": os.cpu_count(), "astaire": astaire, "ceiling_addq": ceiling, "per_record_get_add": per_record,
        # Same records into the same kind of node: ratio of the times to get them there.
        "ratio_to_ceiling": round(ceiling["seconds"] / astaire["seconds"], 3),
        "speedup_over_per_record": round(astaire["records_per_second"] / per_record["records_per_second"], 1),
    }
    print(json.dumps(report, indent=2))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(report, f, indent=2)
    rows = [("astaire resync", astaire), ("ceiling (ADDQ)", ceiling), ("per-record GET+ADD", per_record)]
    print()
    print(f"{'pattern':<22} {'records':>10} {'seconds':>9} {'records/s':>11} {'MB/s':>8}")
    for name, r in rows:
        n = r.get("records_for_new_node", r.get("records"))
        print(f"{name:<22} {n:>10,} {r['seconds']:>9.2f} {r['records_per_second']:>11,} {r['mb_per_second']:>8.2f}")
    print(f"(astaire streamed {astaire['entries']:,} entries, each vbucket from both old replicas: "
          f"{astaire['entries_per_second']:,} entries/s; MB/s counts the bytes it received)")
    print(f"\nratio to ceiling {report['ratio_to_ceiling']}, {report['speedup_over_per_record']}x the per-record "
          f"pattern; Astaire CPU {astaire['cpu_seconds_per_million']} s per million entries, "
          f"peak RSS {astaire['peak_rss_mb']} MB, placement {'ok' if astaire['placement_ok'] else 'WRONG'}")
    return 0 if astaire["placement_ok"] and astaire["result"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
