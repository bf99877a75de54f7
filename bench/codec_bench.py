"""Codec micro-benchmark: the per-record hot paths of both builds, in one run.

Sections (each for the compiled ``astaire._tap`` and the pure ``astaire._tap_py``, with the
ratio between them):

* ``filter``: TAP_MUTATION frames parsed, MD5-hashed and vbucket-filtered per second
  (``filter_count``: no allocation at all; ``filter_mutations``: objects for kept records
  only). 100-byte values, MemcachedStore keys ``table\\\\key-<n>``, half the vbuckets wanted.
* ``encode``: ADDQ frames encoded per second by ``encode_batch``.
* ``writer``: records per second through ``Writer.feed_tap`` + ``target_requests`` with
  every vbucket wanted, the target simulated by answering each NOOP fence (every quiet
  ADD succeeded), fed in 256 KiB chunks with the caller's flow control (no server).
* ``crawler``: records per second of codec time in crawler mode (stock memcached source):
  ``feed_metadump`` (64 KiB chunks) + ``fetch_requests`` + ``feed_fetch`` (every key
  found) + ``target_requests`` + ``feed_target``. Only the Writer's calls are timed; the
  simulated source and target (pure Python) are not. ``crawler_daemon``: the same listing
  through a Writer set up as a daemon's stream (two vbuckets in three wanted, a settled
  table, the hold on half of them), in listed lines per second. ``crawler_listing``: listed
  lines per second through ``feed_metadump`` alone (parse, MD5, vbucket filter; no vbucket
  wanted, so nothing is fetched), lines shaped as the resync bench's records list them
  (a ten-digit absolute exp).

Usage::

    python bench/codec_bench.py                    # 1,000,000 records, table + JSON
    python bench/codec_bench.py --records 200000 --json out.json
"""
from __future__ import annotations

import argparse
import gc
import json
import mmap
import os
import platform
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from astaire import _tap_py  # noqa: E402

try:
    from tests.codec_impls import _tap_c  # noqa: E402  (both compiled units as one namespace)
except ImportError:  # pragma: no cover - depends on the build
    _tap_c = None

# The synthetic listing, answers and TAP loop, shared with the build's PGO training.
from bench.pgo_train import VALUE, fence_answers, fetch_answers, metadump_text, run_writer  # noqa: E402


def tap_stream(n: int) -> bytes:
    enc = _tap_py.encode_tap_mutation
    return b"".join(enc(b"table\\\\key-%d" % i, VALUE, 0x5F000000 + i, 0, i + 1) for i in range(n))


def best_of(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        gc.collect()
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bench_filter(mod, data, n, repeat):
    wanted = range(0, 128, 2)
    result = {}
    kept, seen, consumed = mod.filter_count(data, wanted)
    assert seen == n and consumed == len(data), (seen, consumed)
    t = best_of(lambda: mod.filter_count(data, wanted), repeat)
    result["filter_count_per_s"] = n / t
    result["kept"] = kept
    t = best_of(lambda: mod.filter_mutations(data, wanted), repeat)
    result["filter_mutations_per_s"] = n / t
    result["mb_per_s"] = len(data) / t / 1e6
    return result


def bench_encode(mod, n, repeat):
    reqs = [(0x12, b"table\\\\key-%d" % i, VALUE, 0x5F000000 + i, 0, i & 0x7FFFFFFF, 0) for i in range(n)]
    out = mod.encode_batch(reqs)
    assert len(out) == sum(24 + 8 + len(r[1]) + len(r[2]) for r in reqs)
    t = best_of(lambda: mod.encode_batch(reqs), repeat)
    return {"encode_batch_per_s": n / t}


def run_crawler(mod, text, n, window=4096, chunk=64 * 1024, as_daemon=False):
    """Codec seconds of a crawler stream over ``text``. ``as_daemon``: the Writer as a
    daemon's stream has it, two vbuckets in three wanted, with a settled table and the hold
    on half of them (one replica only here, so nothing is found settled)."""
    if as_daemon:
        wanted = [vb for vb in range(128) if vb % 3]
        w = mod.Writer(wanted, window=window, settled=mmap.mmap(-1, (1 << 17) * 16), generation=1,
                       hold=[(vb, vb & 1) for vb in wanted])
        keep = set(wanted)
        n = sum(1 for i in range(n) if mod.vbucket_hash(b"table\\\\key-%d" % i) & 127 in keep)
    else:
        w = mod.Writer(range(128), window=window)
    timed = 0.0
    clock = time.perf_counter
    pos = seq = 0
    while not w.done:
        t0 = clock()
        if pos < len(text) and w.fetch_backlog < window and w.backlog < window:
            w.feed_metadump(text[pos:pos + chunk])
            pos += chunk
        req = w.fetch_requests()
        timed += clock() - t0
        answers = fetch_answers(req) if req else b""
        t0 = clock()
        if answers:
            w.feed_fetch(answers)
        out = w.target_requests()
        timed += clock() - t0
        acks, seq = fence_answers(out, seq)
        t0 = clock()
        w.feed_target(acks)
        timed += clock() - t0
    assert w.added == n and w.vanished == 0, w.stats()
    return timed


def run_listing(mod, chunks) -> float:
    """Seconds of ``feed_metadump`` over ``chunks`` into a Writer that wants no vbucket."""
    w = mod.Writer([], window=4096)
    t0 = time.perf_counter()
    for c in chunks:
        w.feed_metadump(c)
    return time.perf_counter() - t0


def bench_crawler(mod, n, repeat):
    text = metadump_text(n)
    best = min(run_crawler(mod, text, n) for _ in range(repeat))
    as_daemon = min(run_crawler(mod, text, n, as_daemon=True) for _ in range(repeat))
    listing = metadump_text(n, b"%d" % (int(time.time()) + 3600))
    chunks = [listing[i:i + 128 * 1024] for i in range(0, len(listing), 128 * 1024)]
    lines = min(run_listing(mod, chunks) for _ in range(repeat))
    return {"crawler_records_per_s": n / best, "crawler_daemon_lines_per_s": n / as_daemon,
            "crawler_listing_lines_per_s": n / lines}


def bench_writer(mod, data, n, repeat):
    t = best_of(lambda: run_writer(mod, data, n), repeat)
    return {"writer_records_per_s": n / t}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=1_000_000, help="records for the compiled build")
    ap.add_argument("--pure-records", type=int, default=None,
                    help="records for the pure build (default: records / 10, at least 10000)")
    ap.add_argument("--crawler-records", type=int, default=200_000,
                    help="records for the crawler section, compiled build (pure: a tenth)")
    ap.add_argument("--repeat", type=int, default=3, help="best of this many runs")
    ap.add_argument("--json", metavar="PATH", help="also write the results here ('-' = stdout only)")
    args = ap.parse_args(argv)
    n_c = args.records
    n_py = args.pure_records or max(10_000, n_c // 10)

    results = {"records": {"cython": n_c, "python": n_py}, "value_bytes": len(VALUE),
               "python": platform.python_version(), "machine": platform.machine(),
               "cpus": os.cpu_count(), "sections": {}}
    impls = [("python", _tap_py, n_py)]
    if _tap_c is not None:
        impls.insert(0, ("cython", _tap_c, n_c))
    else:
        print("astaire._tap is not built: pure-Python figures only", file=sys.stderr)
    streams = {n: tap_stream(n) for n in {n for _, _, n in impls}}
    for name, mod, n in impls:
        repeat = args.repeat if name == "cython" else 1
        data = streams[n]
        sec = {}
        sec.update(bench_filter(mod, data, n, repeat))
        sec.update(bench_encode(mod, n, repeat))
        sec.update(bench_writer(mod, data, n, repeat))
        n_crawl = args.crawler_records if name == "cython" else max(2000, args.crawler_records // 10)
        sec.update(bench_crawler(mod, n_crawl, repeat))
        results["records"][name + "_crawler"] = n_crawl
        results["sections"][name] = sec
    if "cython" in results["sections"]:
        c, p = results["sections"]["cython"], results["sections"]["python"]
        results["ratio"] = {k: c[k] / p[k] for k in c if k.endswith("_per_s")}

    rows = [("filter_count_per_s", "parse + MD5 + vbucket filter (frames/s)"),
            ("filter_mutations_per_s", "... + TapMutation for kept (frames/s)"),
            ("encode_batch_per_s", "ADDQ encode_batch (frames/s)"),
            ("writer_records_per_s", "Writer feed_tap + target_requests (rec/s)"),
            ("crawler_records_per_s", "Writer crawler mode, codec time (rec/s)"),
            ("crawler_daemon_lines_per_s", "... as a daemon's stream (listed lines/s)"),
            ("crawler_listing_lines_per_s", "metadump parse + MD5 + filter (lines/s)")]
    print(f"{'':44} {'cython':>14} {'python':>14} {'ratio':>8}")
    for key, label in rows:
        c = results["sections"].get("cython", {}).get(key)
        p = results["sections"]["python"][key]
        ratio = results.get("ratio", {}).get(key)
        print(f"{label:44} {(f'{c:,.0f}' if c else '-'):>14} {p:>14,.0f} {(f'{ratio:.1f}x' if ratio else '-'):>8}")
    print(f"(records: cython {n_c:,}, python {n_py:,}; {len(VALUE)}-byte values; best of {args.repeat} "
          f"for cython; one core)")
    text = json.dumps(results, indent=2, sort_keys=True)
    if args.json and args.json != "-":
        with open(args.json, "w") as f:
            f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
