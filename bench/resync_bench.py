#!/usr/bin/env python3
"""Line-rate benchmark of a resync (docs/architecture.md, "Measuring"), on loopback.

In one run:
  * astaire   - N MemcachedStore-layout records loaded into a 2-node cluster, resized to 3;
                the Astaire daemon for the new node, running on the old view, is told
                with 'astaire reload' and timed from the reload to sync (--start cold:
                from the daemon's start).
  * ceiling   - a fresh memcached ingesting the records the new node received, as
                pre-encoded pipelined binary ADDQ frames on one connection.
  * per-record- the original pattern: GET then ADD, one round trip each, per record
                (on a sample of --per-record-sample records, rate extrapolated).
  * baseline  - (crawler path) the requests no stream can do without, asked of the same
                loaded sources by a plain client: per old replica, one listing, then one
                meta get per wanted record; the sources' CPU in the resync is reported
                against it.
Reports records/s (records the new node ends up holding, per second), entries/s (Astaire
streams every vbucket from both old replicas, so it receives about twice as many), MB/s,
the ratio to the ceiling (ceiling time / Astaire time for the same records), Astaire's CPU
seconds per million records placed (and the sources' and the target's, beside the
ceiling target's CPU for the same records), and peak RSS, as JSON (--json-out) and a table.

    python bench/resync_bench.py                 # 1,000,000 x 100-byte values
    python bench/resync_bench.py --records 100000
    python bench/resync_bench.py --source tap            # the Clearwater fork as every node
    python bench/resync_bench.py --source tap-replay     # TAP dumps replayed at memory speed
    python bench/resync_bench.py --throttle 5            # plus a run under astaire-throttle 5%
"""
from __future__ import annotations

import argparse
import gc
import glob
import json
import shutil
import struct
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

import psutil

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))  # run from a checkout

from astaire import codec
from astaire.client import BinaryClient
from astaire.cluster.settings import parse_server
from astaire.demo.run import run_until_synced
from astaire.demo import localcluster
from astaire.demo.localcluster import LocalCluster, MemcachedServer
from astaire.cluster.view import ClusterView, vbucket_for_key
from astaire.demo import workload


class ProcessSampler(threading.Thread):
    """Peak RSS (sum over a process tree) and CPU seconds of the tree, sampled every 50 ms.

    The tree is listed at every sample for the first second (the supervisor forks its workers
    then), and afterwards every ``REFRESH`` samples and at the last one: psutil finds children
    by reading every process's /proc entry, about 2.5 ms a time, which at 20 samples a second
    took ~4% of a 2-core machine from the run it measures. The daemon's workers are
    long-lived, so a list up to a second old misses nothing."""

    REFRESH = 20

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.root = psutil.Process(pid)
        self.peak_rss = 0
        self.peak_by_process: dict[int, int] = {}
        self.cpu: dict[int, float] = {}
        self.sys: dict[int, float] = {}
        self.stop_event = threading.Event()
        self.procs: list[psutil.Process] = []
        self.samples = 0
        # CPU the tree had used when sampling began (a daemon started earlier, resized by
        # reload): subtracted, so the figures are the resync's own.
        self.sample(refresh=True)
        self.base = dict(self.cpu)
        self.base_sys = dict(self.sys)

    def sample(self, refresh: bool = False):
        if refresh or self.samples < self.REFRESH or self.samples % self.REFRESH == 0:
            try:
                self.procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                return
        self.samples += 1
        rss = 0
        for p in self.procs:
            try:
                with p.oneshot():
                    one = p.memory_info().rss
                    rss += one
                    self.peak_by_process[p.pid] = max(self.peak_by_process.get(p.pid, 0), one)
                    t = p.cpu_times()
                    self.cpu[p.pid] = t.user + t.system
                    self.sys[p.pid] = t.system
            except psutil.Error:
                pass
        self.peak_rss = max(self.peak_rss, rss)

    def run(self):
        while not self.stop_event.wait(0.05):
            self.sample()

    def stop(self) -> float:
        self.sample(refresh=True)
        self.stop_event.set()
        self.join()
        return sum(self.used().values())

    def used(self, system_only: bool = False) -> dict[int, float]:
        """CPU seconds (user + system, or system alone) each process used since sampling began."""
        now, base = (self.sys, self.base_sys) if system_only else (self.cpu, self.base)
        return {p: c - base.get(p, 0.0) for p, c in now.items()}


def _cpu(pids) -> float:
    """CPU seconds (user + system) used so far by the processes ``pids``, summed."""
    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def per_million(cpu: float, n: int) -> float:
    return round(cpu / max(n, 1) * 1e6, 2)


def fork_prefix() -> str:
    """The Clearwater TAP fork, built (idempotently) from ../shared/tap-fork."""
    try:
        return localcluster.tap_fork_prefix()
    except RuntimeError as e:  # TapForkMissing included
        raise SystemExit(f"--source tap needs the Clearwater fork: {e}") from None


class Nodes:
    """How memcached is started for this run: stock, or the Clearwater fork for every node."""

    def __init__(self, source: str):
        self.fork = source == "tap"
        self.extra: tuple[str, ...] = ()
        if self.fork:
            prefix = fork_prefix()
            localcluster.MEMCACHED = os.path.join(prefix, "bin", "memcached")
            self.extra = ("-E", os.path.join(prefix, "lib", "memcached", "default_engine.so"))

    def cluster(self, n: int, mem: int) -> LocalCluster:
        return LocalCluster(n, memory_mb=mem, threads=2, extra_args=self.extra)

    def server(self, mem: int, threads: int = 2) -> MemcachedServer:
        return MemcachedServer(memory_mb=mem, threads=threads, extra_args=self.extra)


class Replay:
    """tap-replay: one bench/tap_replay.py process per old replica. With 2 nodes and 2 replicas
    each old replica holds every record, so each serves a dump of all of them."""

    def __init__(self, records, workdir: str, slots: int = 2):
        self.procs = []
        self.names = []
        for i in range(slots):
            held = records
            dump = os.path.join(workdir, f"replay{i}.tap")
            with open(dump, "wb") as f:
                for n in range(0, len(held), 20000):
                    f.write(b"".join(codec.encode_tap_mutation(r.key, r.value, r.flags, r.expiration, 1 + n + j)
                                     for j, r in enumerate(held[n:n + 20000])))
            portfile = os.path.join(workdir, f"replay{i}.port")
            self.procs.append(subprocess.Popen([sys.executable, os.path.join(os.path.dirname(__file__),
                                                                             "tap_replay.py"), dump, portfile]))
            while not os.path.exists(portfile):
                time.sleep(0.02)
            with open(portfile) as f:
                self.names.append(f"127.0.0.1:{f.read().strip()}")

    def stop(self) -> None:
        for p in self.procs:
            p.kill()
            p.wait()


def start_throttle(percent: float, workdir: str, pidfile: str) -> subprocess.Popen:
    exe = os.path.join(os.path.dirname(sys.executable), "astaire-throttle")
    return subprocess.Popen([exe, "--config", os.path.join(workdir, "config"), "--pidfile", pidfile,
                             "--poll-interval", "0.1", "--cgroup-name", f"astaire-bench-{os.getpid()}",
                             "--log-file", os.path.join(workdir, "throttle.log")])


def remove_throttle_group() -> None:
    """The throttle lifts its limit on exit but leaves its (now empty) cgroup: remove it."""
    for group in glob.glob(f"/sys/fs/cgroup/*/astaire-bench-{os.getpid()}") + glob.glob(
            f"/sys/fs/cgroup/astaire-bench-{os.getpid()}"):
        try:
            os.rmdir(group)
        except OSError:
            pass


def flush(name: str) -> None:
    """Empty a node (binary FLUSH, which the stock server and the fork both take) and wait out
    the second: memcached flushes items written in the second of the flush as well."""
    with BinaryClient(name, role="target") as client:
        frame = client.request(struct.pack(">BBHBBHIIQ", 0x80, 0x08, 0, 0, 0, 0, 0, 0, 0), 0x08, "flush")
        if frame.status:
            raise SystemExit(f"flush of {name} failed: status 0x{frame.status:04x}")
    time.sleep(1.1)


def run_astaire(records, value_size, workers, source, throttle: float | None = None, repeat: int = 1,
                start: str = "reload", keep_workdir: bool = False, baseline: bool = False) -> tuple[dict, list]:
    """Load the records, then time the new node's resync ``repeat`` times (the new node a fresh
    memcached each run). Returns the run with the median Astaire CPU per record placed (with every
    run's main figures under ``runs``) and the records the new node must hold. With ``baseline``, on
    the crawler path, the run also carries the sources' baseline (``sources_baseline``).

    The work directory (settings, config, each run's daemon log) is removed afterwards, unless
    ``keep_workdir`` or the runs failed: then its path is printed to stderr."""
    workdir = tempfile.mkdtemp(prefix="astaire-bench-")
    kept = keep_workdir
    try:
        result = _run_astaire(workdir, records, value_size, workers, source, throttle, repeat, start, baseline)
        kept = kept or result[0]["result"] != "ok" or not result[0]["placement_ok"]
    except BaseException:
        kept = True
        raise
    finally:
        if kept:
            print(f"resync_bench: work directory (daemon logs) kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return result


def _run_astaire(workdir, records, value_size, workers, source, throttle, repeat, start, baseline):
    settings = os.path.join(workdir, "cluster_settings")
    with open(os.path.join(workdir, "config"), "w") as f:
        f.write(f"astaire_cpu_limit_percentage={throttle if throttle is not None else 5}\nlog_level={os.environ.get('ASTAIRE_BENCH_LOG_LEVEL', 2)}\n")
    mem = max(256, len(records) * (value_size + 150) * 2 // (1 << 20))
    nodes = Nodes(source)
    replay = None
    with nodes.cluster(1 if source == "tap-replay" else 3, mem) as cluster:
        t = time.monotonic()
        if source == "tap-replay":
            (c,) = cluster.names
            replay = Replay(records, workdir)
            a, b = replay.names
            source_pids = [p.pid for p in replay.procs]
        else:
            a, b, c = cluster.names
            workload.load(ClusterView([a, b]), records)
            source_pids = [s.proc.pid for s in cluster.servers[:2]]
        load_s = time.monotonic() - t
        after = ClusterView([a, b], [a, b, c])
        moved = [r for r in records if c in after.new[vbucket_for_key(r.key)]]
        with open(settings, "w") as f:
            f.write(f"servers={a},{b}\nnew_servers={a},{b},{c}\n")
        runs = []
        baseline_figures = None
        # This process holds the workload, millions of objects. Frozen, they are never walked by
        # the collections that the sampler thread's allocations trigger: under perf, that thread
        # took 2% of the machine from the run it measured, most of it in the collector.
        gc.collect()
        gc.freeze()
        try:
            for i in range(max(1, repeat)):
                # A fresh memcached on the same port, as a joining node is and as the
                # ceiling's server is: a flushed one keeps its slab pages and its grown hash
                # table, which made every run after the first cheaper for the target
                # (100k x 4 KB: 4.4-5.6 CPU-s per M placed flushed, 6.2-21 fresh; docs/architecture.md).
                cluster.servers[-1].restart()
                target_pid = cluster.servers[-1].proc.pid
                rundir = os.path.join(workdir, f"run{i}")
                os.mkdir(rundir)
                shutil.copy(os.path.join(workdir, "config"), rundir)
                runs.append(_one_resync(nodes, c, moved, settings, rundir, source, workers, throttle,
                                        source_pids, target_pid, start, f"servers={a},{b}\n"))
                runs[-1]["load_seconds"] = round(load_s, 2)
            if baseline and source in ("auto", "crawler"):
                baseline_figures = sources_baseline(cluster.servers[:2], after, moved, repeat)
        finally:
            if replay is not None:
                replay.stop()
    chosen = sorted(runs, key=lambda r: r["cpu_seconds_per_million_placed"])[len(runs) // 2]
    if baseline_figures is not None:
        chosen = dict(chosen, sources_baseline=baseline_figures)
    if len(runs) > 1:
        chosen = dict(chosen, runs=[{k: r[k] for k in RUN_SUMMARY} for r in runs])
        # Every run must have been right, not only the one reported.
        chosen["placement_ok"] = all(r["placement_ok"] for r in runs)
        chosen["result"] = "ok" if all(r["result"] == "ok" for r in runs) else "failed"
    return chosen, moved


RUN_SUMMARY = ("seconds", "cpu_seconds_per_million_placed", "startup_cpu_seconds", "sources_cpu_seconds_per_million_placed",
               "target_cpu_seconds_per_million_placed", "peak_rss_mb", "result", "placement_ok", "target_pid")


def _one_resync(nodes, c, moved, settings, workdir, source, workers, throttle, source_pids, target_pid,
                start: str = "reload", before: str = "") -> dict:
    sampler = None
    throttler = None
    mark: dict = {}

    def running(pid: int) -> None:
        nonlocal throttler
        if throttle is not None:
            throttler = start_throttle(throttle, workdir, os.path.join(workdir, "astaire.pid"))

    def start_sampling(pid: int) -> None:
        nonlocal sampler
        mark["sources"], mark["target"] = _cpu(source_pids), _cpu([target_pid])
        sampler = ProcessSampler(pid)
        mark["startup"] = sum(sampler.base.values()) if start == "reload" else None
        sampler.start()

    cpu = 0.0

    def stop_sampling() -> None:
        nonlocal cpu
        cpu = sampler.stop()
        mark["sources"] = _cpu(source_pids) - mark["sources"]
        mark["target"] = _cpu([target_pid]) - mark["target"]

    try:
        daemon_source = "tap" if source.startswith("tap") else source
        # The time reported is the daemon's own (its status says how long the resync took), so
        # wait-sync polls at its default interval: polling faster only took CPU from the run.
        sync = run_until_synced(c, settings, workdir, daemon_source, workers, poll_interval=0.2,
                                on_started=start_sampling, on_synced=stop_sampling, on_running=running,
                                before_settings=before if start == "reload" else None)
    finally:
        if throttler is not None:
            throttler.terminate()
            throttler.wait()
            remove_throttle_group()
    if not sync.ok:
        raise SystemExit(f"wait-sync failed: {sync.error}")
    status, wall = sync.status, sync.seconds
    last = status["last_resync"]
    if nodes.fork:  # the fork has no crawler to list keys with: check the records it must hold
        held = workload.fetch(c, [r.key for r in moved])
        placement_ok = len(held) == len(moved) and all(held[r.key] == (r.value, r.flags) for r in moved)
    else:
        placement = workload.check_placement(moved, {c: {r.key for r in moved}}, [c], compare_expiry=False)
        if placement.missing and not (placement.wrong or placement.misplaced):
            # The check lists with "lru_crawler metadump hash", which lists every item; where a
            # server refuses it, "all" walks the LRU and can miss items that memcached's LRU
            # maintainer moves between segments during the walk (just after a bulk load it is
            # busy): a key listed missing is fetched before it counts as missing.
            held = workload.fetch(c, [k for _, k in placement.missing])
            if len(held) == len(placement.missing):
                print(f"placement: the listing missed {len(held)} key(s) the target holds; listing again",
                      file=sys.stderr)
                time.sleep(1)
                placement = workload.check_placement(moved, {c: {r.key for r in moved}}, [c],
                                                     compare_expiry=False)
        placement_ok = placement.ok
        if not placement_ok:
            print(f"placement: {placement}", file=sys.stderr)
    entries, data = int(last["entries"]), int(last["bytes"])
    secs = float(last.get("seconds") or wall)
    placed = len(moved)
    used_sys = sampler.used(system_only=True)
    return {"records_for_new_node": placed, "entries": entries,
            "bytes": data, "seconds": round(secs, 3), "wall_seconds_to_sync": round(wall, 3),
            # The new node must end up holding len(moved) records; it streams each of its vbuckets
            # from both old replicas, so it receives about twice that many entries.
            "records_per_second": round(placed / secs),
            "entries_per_second": round(entries / secs), "mb_per_second": round(data / secs / 1e6, 2),
            "cpu_seconds": round(cpu, 2),
            "cpu_seconds_per_million": per_million(cpu, entries),  # per entry received (older field)
            "cpu_seconds_per_million_placed": per_million(cpu, placed),
            "sources_cpu_seconds": round(mark["sources"], 2),
            "sources_cpu_seconds_per_million_placed": per_million(mark["sources"], placed),
            "target_cpu_seconds": round(mark["target"], 2),
            "target_cpu_seconds_per_million_placed": per_million(mark["target"], placed),
            "peak_rss_mb": round(sampler.peak_rss / (1 << 20), 1),
            # each process's own peak (they need not peak together), the supervisor first
            "peak_rss_mb_by_process": [round(sampler.peak_by_process[p] / (1 << 20), 1)
                                       for p in sampler.peak_by_process],
            # [user + system, system] CPU seconds of each Astaire process (the supervisor first)
            "cpu_by_process": [[round(c, 2), round(used_sys[p], 2)] for p, c in sampler.used().items()],
            # the daemon's own start (interpreter, imports, forking the workers, its first
            # resync of nothing), before the reload that resized it: paid once per daemon life
            "startup_cpu_seconds": None if mark.get("startup") is None else round(mark["startup"], 2),
            "start": start,
            "result": last["result"], "placement_ok": placement_ok,
            "target_pid": target_pid}  # the fresh memcached this run wrote into


def sources_baseline(sources: list[MemcachedServer], view: ClusterView, moved, repeat: int = 1) -> dict:
    """The requests the crawler path cannot do without, asked of the same loaded sources by a
    plain client: per source, one listing, then one meta get per wanted record it holds
    (``source_fetch_bench.stream_baseline``). The sources' CPU of a run is read against this:
    what they spent beyond these requests' own cost. ``repeat`` times; the median total."""
    from bench.source_fetch_bench import stream_baseline

    held = [(server, [r.key for r in moved if server.name in view.current[vbucket_for_key(r.key)]])
            for server in sources]
    runs = []
    for _ in range(max(1, repeat)):
        parts = {"listing": 0.0, "fetches": 0.0, "total": 0.0}
        for server, keys in held:
            for k, v in stream_baseline(server, keys).items():
                parts[k] += v
        runs.append(parts)
    chosen = sorted(runs, key=lambda r: r["total"])[len(runs) // 2]
    return {"cpu_seconds": round(chosen["total"], 2),
            "cpu_seconds_per_million_placed": per_million(chosen["total"], len(moved)),
            "listing_cpu_seconds": round(chosen["listing"], 2), "fetches_cpu_seconds": round(chosen["fetches"], 2),
            "runs_cpu_seconds": [round(r["total"], 2) for r in runs]}


def run_ceiling(moved, value_size, nodes: "Nodes", repeat: int = 1) -> dict:
    """Pre-encoded ADDQ frames into a fresh memcached, one connection, NOOP at the end;
    ``repeat`` times, each into a fresh memcached: the run with the median time."""
    frames = codec.encode_batch((codec.OP_ADDQ, r.key, r.value, r.flags, r.expiration, 0, 0) for r in moved)
    runs = sorted((_one_ceiling(moved, frames, value_size, nodes) for _ in range(max(1, repeat))),
                  key=lambda r: r["seconds"])
    chosen = runs[len(runs) // 2]
    if len(runs) > 1:
        chosen = dict(chosen, runs=[{k: r[k] for k in ("seconds", "target_cpu_seconds_per_million")} for r in runs])
    return chosen


def _one_ceiling(moved, frames, value_size, nodes: "Nodes") -> dict:
    mem = max(256, len(moved) * (value_size + 150) * 2 // (1 << 20))
    with nodes.server(mem) as server:
        host, port = parse_server(server.name)
        with socket.create_connection((host, port)) as s:
            cpu0 = _cpu([server.proc.pid])
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
            target_cpu = _cpu([server.proc.pid]) - cpu0
            sender.join()
    return {"records": len(moved), "bytes": len(frames), "seconds": round(secs, 3),
            "records_per_second": round(len(moved) / secs), "mb_per_second": round(len(frames) / secs / 1e6, 2),
            "target_cpu_seconds": round(target_cpu, 2),
            "target_cpu_seconds_per_million": per_million(target_cpu, len(moved)),
            "errors": errors}


def run_per_record(moved, sample, value_size, nodes: "Nodes") -> dict:
    """The original pattern: GET (wait for the answer), then ADD (wait), per record."""
    subset = moved[:sample]
    with nodes.server(256, threads=1) as server:
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


def byte_compile() -> None:
    """Byte-compile Astaire's modules, as an installed package is (Debian's Python packaging
    compiles at install time). In a checkout run with PYTHONDONTWRITEBYTECODE set, every
    daemon start would otherwise compile its modules from source, about 0.1 s of CPU counted
    against the resync."""
    import compileall

    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
    for package in ("astaire", os.path.join("throttle", "astaire_throttle")):
        compileall.compile_dir(os.path.join(root, package), quiet=1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, default=1_000_000)
    p.add_argument("--value-size", type=int, default=100)
    p.add_argument("--workers", type=int, default=None, help="Astaire workers (default one per CPU)")
    p.add_argument("--source", default="auto", choices=("auto", "crawler", "tap", "tap-replay"),
                   help="auto/crawler: stock memcached everywhere; tap: the Clearwater fork as every node "
                        "(built with ../shared/tap-fork/build.sh); tap-replay: each old replica is a replay "
                        "server sending a pre-encoded TAP dump at memory speed, the target stock memcached")
    p.add_argument("--throttle", type=float, metavar="PCT",
                   help="also run the resync under astaire-throttle at PCT%% (5 is the product's default) "
                        "and report it beside the unthrottled run")
    p.add_argument("--throttle-records", type=int,
                   help="records for the throttled run (default: --records)")
    p.add_argument("--per-record-sample", type=int, default=50_000,
                   help="records timed for the per-record round-trip pattern (default %(default)s)")
    p.add_argument("--repeat", type=int, default=1,
                   help="time the resync and the ceiling this many times on the same loaded cluster (the new "
                        "node a fresh memcached each run) and report the run with the median Astaire CPU and the "
                        "median ceiling, with every run's figures under 'runs': a shared machine is noisy")
    p.add_argument("--start", default="reload", choices=("reload", "cold"),
                   help="reload (default): the new node's daemon runs first on the old view, idle, and the "
                        "resize reaches it with 'astaire reload', as on a node; its CPU and time are counted "
                        "from the reload, and its start-up CPU is reported apart (startup_cpu_seconds). "
                        "cold: the daemon is started on the resized view, and its start-up counts in the "
                        "resync's CPU and time (the bench's figures until December 2026)")
    p.add_argument("--json-out", help="also write the JSON report to this file")
    p.add_argument("--keep-workdir", action="store_true",
                   help="keep the work directory (cluster settings, config, each run's daemon log; its "
                        "path is printed) instead of removing it; it is always kept when a run fails. Set "
                        "ASTAIRE_BENCH_LOG_LEVEL=5 for each stream's summary in the logs")
    args = p.parse_args(argv)

    byte_compile()
    records = list(workload.make_records(args.records, args.value_size, table="bench"))
    astaire, moved = run_astaire(records, args.value_size, args.workers, args.source, repeat=args.repeat,
                                 start=args.start, keep_workdir=args.keep_workdir, baseline=True)
    nodes = Nodes(args.source if args.source == "tap" else "stock")
    ceiling = run_ceiling(moved, args.value_size, nodes, repeat=args.repeat)
    per_record = run_per_record(moved, args.per_record_sample, args.value_size, nodes)
    throttled = None
    if args.throttle is not None:
        n = args.throttle_records or args.records
        throttled, _ = run_astaire(records[:n], args.value_size, args.workers, args.source, args.throttle,
                                   start=args.start, keep_workdir=args.keep_workdir)
        throttled["percent"] = args.throttle
    report = {
        "records_loaded": args.records, "value_size": args.value_size, "codec": codec.IMPLEMENTATION, "codec_build": codec.BUILD,
        "source": args.source,
        "cpus": os.cpu_count(), "astaire": astaire, "ceiling_addq": ceiling, "per_record_get_add": per_record,
        # Same records into the same kind of node: ratio of the times to get them there.
        "ratio_to_ceiling": round(ceiling["seconds"] / astaire["seconds"], 3),
        "speedup_over_per_record": round(astaire["records_per_second"] / per_record["records_per_second"], 1),
        # The target's CPU per record placed against what the same records cost it as plain ADDQ.
        "target_cpu_ratio_to_ceiling": round(astaire["target_cpu_seconds_per_million_placed"]
                                             / max(ceiling["target_cpu_seconds_per_million"], 1e-9), 2),
    }
    if "sources_baseline" in astaire:
        # The sources' CPU against what the same requests cost them from a plain client.
        report["sources_cpu_ratio_to_baseline"] = round(astaire["sources_cpu_seconds"]
                                                        / max(astaire["sources_baseline"]["cpu_seconds"], 1e-9), 2)
    if throttled is not None:
        report["throttled"] = throttled
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
          f"pattern; peak RSS {astaire['peak_rss_mb']} MB, placement {'ok' if astaire['placement_ok'] else 'WRONG'}")
    print(f"CPU s per million records placed: Astaire {astaire['cpu_seconds_per_million_placed']}, sources "
          f"{astaire['sources_cpu_seconds_per_million_placed']}, target {astaire['target_cpu_seconds_per_million_placed']}"
          f" (ceiling's target {ceiling['target_cpu_seconds_per_million']}: x{report['target_cpu_ratio_to_ceiling']})")
    if "sources_baseline" in astaire:
        f = astaire["sources_baseline"]
        print(f"sources' baseline (per source, a listing then a meta get per wanted record, from a plain client): "
              f"{f['cpu_seconds_per_million_placed']} CPU s per million placed (listing {f['listing_cpu_seconds']} s, "
              f"fetches {f['fetches_cpu_seconds']} s); the run's sources x{report['sources_cpu_ratio_to_baseline']}")
    ok = astaire["placement_ok"] and astaire["result"] == "ok"
    if throttled is not None:
        print(f"under astaire-throttle {args.throttle:g}%: {throttled['records_for_new_node']:,} records placed in "
              f"{throttled['seconds']:.2f} s ({throttled['records_per_second']:,}/s), Astaire CPU "
              f"{throttled['cpu_seconds_per_million_placed']} s per million placed, placement "
              f"{'ok' if throttled['placement_ok'] else 'WRONG'}")
        ok = ok and throttled["placement_ok"] and throttled["result"] == "ok"
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
