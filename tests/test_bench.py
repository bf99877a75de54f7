"""The line-rate benchmark (bench/resync_bench.py) at a small scale, on real memcached: its
report is whole, every run's records landed, every run wrote into a fresh memcached (as a
joining node is, and as the ceiling's server is), and its sampler counted the daemon's
workers. Speed itself is never asserted here: the bench measures it, as ratios."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.daemon_helpers import REPO


@pytest.mark.parametrize("start", ["reload", "cold"])
def test_the_bench_reports_every_run_on_a_fresh_target(tmp_path, start):
    out = tmp_path / "bench.json"
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    keep = ["--keep-workdir"] if start == "cold" else []  # one case each way: kept on request, else removed
    r = subprocess.run([sys.executable, "bench/resync_bench.py", "--records", "3000", "--repeat", "2",
                        "--workers", "2", "--per-record-sample", "50", "--start", start, "--json-out", str(out)]
                       + keep, cwd=REPO, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, TMPDIR=str(tmp)))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    left = list(tmp.glob("astaire-bench-*"))
    if keep:
        assert len(left) == 1 and f"kept in {left[0]}" in r.stderr, (left, r.stderr[-2000:])
        assert sorted(p.name for p in left[0].glob("run*/astaire*.log")) == ["astaire_current.log"] * 2
    else:
        assert left == [], "the bench left its work directory behind"
    report = json.loads(out.read_text())
    a = report["astaire"]
    assert a["placement_ok"] and a["result"] == "ok", a
    assert len(a["runs"]) == 2 and all(run["placement_ok"] for run in a["runs"])
    pids = [run["target_pid"] for run in a["runs"]]
    assert len(set(pids)) == 2, f"both runs wrote into the same memcached (pid {pids[0]})"
    # the sampler found the supervisor and its two workers (a worker's CPU at this size can
    # round to 0.00 s, so only the sum is checked)
    assert len(a["cpu_by_process"]) == 3 and a["cpu_seconds"] > 0, a["cpu_by_process"]
    assert a["records_for_new_node"] > 0 and a["entries"] >= a["records_for_new_node"]
    assert report["ceiling_addq"]["errors"] == 0 and report["ratio_to_ceiling"] > 0
    assert "ratio to ceiling" in r.stdout
    assert a["start"] == start
    if start == "reload":
        # the daemon ran (interpreter, imports, workers forked) before the reload: that CPU is
        # reported apart, and the resync's own figures start from the reload
        assert all(run["startup_cpu_seconds"] > 0 for run in a["runs"]), a["runs"]
    else:
        assert all(run["startup_cpu_seconds"] is None for run in a["runs"]), a["runs"]
    # the crawler path's requests are also asked of the sources by a plain client, as a baseline
    baseline = a["sources_baseline"]
    assert len(baseline["runs_cpu_seconds"]) == 2 and baseline["cpu_seconds"] >= 0, baseline
    assert report["sources_cpu_ratio_to_baseline"] >= 0 and "sources' baseline" in r.stdout


def test_the_sources_baseline_asks_one_listing_and_one_meta_get_per_key(monkeypatch):
    from pymemcache.client.base import Client

    import bench.source_fetch_bench as sfb
    from astaire.demo.localcluster import MemcachedServer
    from astaire.resync.source import METADUMP_HASH

    sent = []
    real_pipe = sfb._pipe
    monkeypatch.setattr(sfb, "_pipe", lambda server, chunks, until: (sent.append(b"".join(chunks)),
                                                                     real_pipe(server, chunks, until))[1])
    keys = [b"bench\\\\key-%d" % i for i in range(500)]
    with MemcachedServer(memory_mb=64) as server:
        client = Client((server.host, server.port))
        client.set_many({k: b"v" * 100 for k in keys}, noreply=False)
        before = client.stats()
        parts = sfb.stream_baseline(server, keys[:300], batch=64)
        after = client.stats()
        client.close()
    assert sent[0] == METADUMP_HASH  # the listing a stream asks for, read to its END
    assert sent[1].count(b"mg ") == 301 and sent[1].count(b"mn\r\n") == 5  # 300 in batches of 64, the sentinel
    assert after[b"get_hits"] - before[b"get_hits"] == 300
    assert after[b"get_misses"] - before[b"get_misses"] == 1  # the sentinel that ends the pipe
    assert parts["total"] == pytest.approx(parts["listing"] + parts["fetches"]) and parts["total"] >= 0


def test_the_sources_baseline_waits_for_a_running_crawl_before_listing():
    """memcached holds a crawl request made during another crawl (or answers BUSY): the
    baseline's listing waits until no crawl runs, and gives up with an error when the crawl
    stays, instead of waiting on an answer that may not come. Another client's stalled
    metadump keeps the crawler running."""
    import threading
    import time

    import bench.source_fetch_bench as sfb
    from astaire.demo.localcluster import MemcachedServer
    from tests.test_stream_crawler import MetadumpHog, busy_records, load

    with MemcachedServer(memory_mb=64) as server:
        load(server, busy_records())
        hog = MetadumpHog(server)
        deadline = time.monotonic() + 10
        while not sfb._crawler_running(server):
            assert time.monotonic() < deadline, "the hog's crawl never showed as running"
            time.sleep(0.05)
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match="stayed busy"):
            sfb._listing(server, tries=3)
        assert time.monotonic() - t0 < 5
        released = []
        timer = threading.Timer(0.5, lambda: (released.append(time.monotonic()), hog.release()))
        timer.start()
        try:
            sfb._listing(server)
            done = time.monotonic()
        finally:
            timer.cancel()
            if not released:
                hog.release()
        assert released and done >= released[0]  # listed only once the other crawl was gone
        assert not sfb._crawler_running(server)


def test_ab_runs_a_base_revision_on_its_own_build_alternating_with_this_checkout(tmp_path):
    """bench/ab.py: the base revision exported and built in its own tree, both benches run in
    turn on the same workload, and the pairs and their medians reported; its temporary tree is
    removed afterwards."""
    out = tmp_path / "ab.json"
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    r = subprocess.run([sys.executable, "bench/ab.py", "--base", "HEAD", "--pairs", "2", "--json-out", str(out),
                        "--", "--records", "3000", "--workers", "2", "--per-record-sample", "50"],
                       cwd=REPO, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, TMPDIR=str(tmp), ASTAIRE_PGO="0"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert list(tmp.iterdir()) == [], "ab left its work directory behind"
    report = json.loads(out.read_text())
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert report["base_commit"] == head
    assert len(report["pairs"]) == 2
    for pair in report["pairs"]:
        assert pair["base"]["placement_ok"] and pair["head"]["placement_ok"], pair
        # the same workload on both sides: the same records moved to the new node
        assert pair["base"]["records_placed"] == pair["head"]["records_placed"] > 0, pair
        # the base's daemon ran its own build: compiled in its tree, with the profile turned off
        assert pair["base"]["codec_build"] == "plain", pair
    summary = report["summary"]
    for name in ("astaire_cpu", "sources_cpu", "target_cpu", "target_ratio", "seconds", "ratio_to_ceiling",
                 "peak_rss_mb"):
        s = summary[name]
        assert s["pairs"] == 2 and s["base_median"] >= 0 and s["head_median"] >= 0, (name, s)
        if s["base_median"]:  # CPU at this size can round to 0.00 s
            assert s["ratio"] == round(s["head_median"] / s["base_median"], 3), (name, s)
    assert summary["seconds"]["base_median"] > 0 and summary["peak_rss_mb"]["head_median"] > 0, summary
    assert "Astaire CPU s per M placed" in r.stdout


def test_ab_refuses_a_revision_the_repository_does_not_have(tmp_path):
    r = subprocess.run([sys.executable, "bench/ab.py", "--base", "no-such-revision-0000"], cwd=REPO,
                       capture_output=True, text=True, timeout=60, env=dict(os.environ, TMPDIR=str(tmp_path)))
    assert r.returncode == 2 and "'no-such-revision-0000' is not a commit" in r.stderr, r.stderr
    assert list(tmp_path.iterdir()) == []
