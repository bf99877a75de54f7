#!/usr/bin/env python3
"""One process, no daemon: ``run_stream`` from each old replica into a fresh target, with
the CPU (user and system) of this process, the sources and the target. For iterating on
the stream loop and the codec; ``resync_bench.py`` is the end-to-end measure.

    python bench/stream_bench.py --records 300000 [--source crawler|tap-replay] [--value-size 100]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

import psutil

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from astaire.cluster.view import ClusterView, vbucket_for_key  # noqa: E402
from astaire.demo import workload  # noqa: E402
from astaire.resync import settled  # noqa: E402
from astaire.resync.stream import StreamJob, run_stream  # noqa: E402


def _cpu(pid: int) -> tuple[float, float]:
    t = psutil.Process(pid).cpu_times()
    return t.user, t.system


def _runs(args, sources, wanted, c, replay, source_pids, target_pid, placed) -> dict:
    """Every run, by settled mode (``--settled``): the target flushed between runs."""
    from bench.resync_bench import flush  # noqa: E402
    table = settled.create()
    modes = {"on": [True], "off": [False], "both": [True, False]}[args.settled]
    runs: dict[bool, list] = {m: [] for m in modes}
    first = True
    for _ in range(max(1, args.repeat)):
        for m in modes:
            if not first:
                flush(c)
            first = False
            gen = table.next_generation() if m else 0
            runs[m].append(_one_run(args, sources, wanted, c, replay, source_pids, target_pid, placed, gen))
    return runs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, default=300_000)
    p.add_argument("--value-size", type=int, default=100)
    p.add_argument("--source", default="crawler", choices=("crawler", "tap", "tap-replay"),
                   help="crawler: stock memcached; tap: the Clearwater fork as every node; tap-replay: "
                        "pre-encoded TAP dumps replayed at memory speed into a stock target")
    p.add_argument("--window", type=int, default=None)
    p.add_argument("--perf", metavar="FILE",
                   help="perf record this process during the streams into FILE (PERF_ALL=1: every process "
                        "on the machine, sources and target too; PERF_CALLGRAPH: fp, the default, or dwarf)")
    p.add_argument("--repeat", type=int, default=1,
                   help="run the streams this many times (the target flushed between runs) and report each run "
                        "and the median of the CPU figures")
    p.add_argument("--settled", choices=("on", "off", "both"), default="on",
                   help="give the streams a settled table (astaire.resync.settled), as the daemon does; 'both' "
                        "alternates runs with and without it (--repeat each) to compare them")
    p.add_argument("--log", action="store_true", help="log each stream's summary (astaire.stream, INFO) to stderr")
    args = p.parse_args(argv)
    if args.log:
        import logging
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    records = list(workload.make_records(args.records, args.value_size, table="bench"))
    mem = max(256, len(records) * (args.value_size + 150) * 2 // (1 << 20))
    from bench.resync_bench import Nodes  # noqa: E402
    nodes = Nodes(args.source)
    with nodes.cluster(3, mem) as cluster:
        a, b, c = cluster.names
        after = ClusterView([a, b], [a, b, c])
        wanted = sorted(vb for vb in range(128) if c in after.new[vb])
        replay = None
        if args.source == "tap-replay":
            from bench.resync_bench import Replay  # noqa: E402
            import tempfile
            replay_dir = tempfile.TemporaryDirectory(prefix="astaire-stream-bench-")
            replay = Replay(records, replay_dir.name)
            sources = replay.names
            source_pids = [pr.pid for pr in replay.procs]
        else:
            workload.load(ClusterView([a, b]), records)
            sources = [a, b]
            source_pids = [s.proc.pid for s in cluster.servers[:2]]
        target_pid = cluster.servers[2].proc.pid
        placed = sum(1 for r in records if vbucket_for_key(r.key) in set(wanted))
        try:
            runs = _runs(args, sources, wanted, c, replay, source_pids, target_pid, placed)
        finally:
            if replay:
                replay.stop()
                replay_dir.cleanup()

    def summary(rs):
        return rs[-1] if len(rs) == 1 else {
            "runs": rs, **{k: statistics.median(r[k] for r in rs)
                           for k in ("seconds", "astaire_per_M_placed", "sources_per_M_placed", "target_per_M_placed")},
            "ok": all(r["ok"] for r in rs), "max_rss_mb": rs[-1]["max_rss_mb"]}
    modes = list(runs)
    report = (summary(runs[modes[0]]) if len(modes) == 1
              else {"settled_on": summary(runs[True]), "settled_off": summary(runs[False]),
                    "ok": all(r["ok"] for rs in runs.values() for r in rs)})
    print(json.dumps(report, indent=1))
    return 0 if report["ok"] else 1


def _one_run(args, sources, wanted, c, replay, source_pids, target_pid, placed, generation) -> dict:
    before = {"self": os.times(), "sources": [_cpu(x) for x in source_pids], "target": _cpu(target_pid)}
    perf = None
    if args.perf:
        import subprocess
        which = ["-a"] if os.environ.get("PERF_ALL") else ["-p", str(os.getpid())]
        perf = subprocess.Popen(["perf", "record", "-q", "--call-graph", os.environ.get("PERF_CALLGRAPH", "fp"),
                                 *which, "-o", args.perf], stderr=subprocess.DEVNULL)
        time.sleep(0.5)
    t0 = time.monotonic()
    results = []
    for src in sources:
        job = StreamJob(src, wanted, c, source_kind="crawler" if args.source == "crawler" else "tap",
                        settled_generation=generation)
        if args.window:
            job.window = args.window
        results.append(run_stream(job))
    secs = time.monotonic() - t0
    if perf is not None:
        import signal
        perf.send_signal(signal.SIGINT)
        perf.wait()
    after_t = {"self": os.times(), "sources": [_cpu(x) for x in source_pids], "target": _cpu(target_pid)}
    me = (after_t["self"].user - before["self"].user, after_t["self"].system - before["self"].system)
    src = [sum(x[i] - y[i] for x, y in zip(after_t["sources"], before["sources"])) for i in (0, 1)]
    tgt = [after_t["target"][i] - before["target"][i] for i in (0, 1)]
    per = lambda u_s: round(sum(u_s) / placed * 1e6, 2)  # noqa: E731
    report = {
        "placed": placed, "seconds": round(secs, 2), "ok": all(r.ok for r in results),
        "errors": [r.error for r in results if not r.ok],
        "entries": sum(r.stats["entries"] for r in results),
        "stats": [{k: v for k, v in r.stats.items() if isinstance(v, int) and v} for r in results],
        "astaire_user_sys": [round(x, 2) for x in me], "astaire_per_M_placed": per(me),
        "sources_user_sys": [round(x, 2) for x in src], "sources_per_M_placed": per(src),
        "target_user_sys": [round(x, 2) for x in tgt], "target_per_M_placed": per(tgt),
        "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    return report


if __name__ == "__main__":
    sys.exit(main())
