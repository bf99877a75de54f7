#!/usr/bin/env python3
"""The resync bench of two builds, alternating on this machine: a ratio measured in one run.

A shared machine's speed drifts by a quarter between spells (other tenants, steal), more than most
changes move the bench's figures, so one build's figures against another's taken at another
time say little. This runs ``bench/resync_bench.py`` for a base revision and for this checkout
in turn, ``--pairs`` times (base then head, then head then base, and so on: drift cancels), and
reports each pair's figures, their medians and the medians' ratio head / base:

  * ``astaire_cpu``: Astaire's CPU seconds per million records placed (from ``cpu_seconds``
    and ``records_for_new_node`` when an older bench does not report it);
  * ``sources_cpu``, ``target_cpu``: the sources' and the target's, where both benches report
    them; ``target_ratio``: the target's against the same run's ceiling's target;
  * ``seconds``, ``ratio_to_ceiling``, ``peak_rss_mb``.

The base revision is exported with ``git archive`` into a temporary directory (``../shared``
linked beside it, as beside this checkout), its codec built there with this interpreter
(``setup.py build_ext --inplace``; ``ASTAIRE_PGO`` applies), and each side runs its own bench
with ``PYTHONPATH`` and the working directory on its own tree, so each daemon is its own
build. This checkout runs as it is: build it first (``scripts/setup``).

Arguments after ``--`` go to both benches, so both must know them (an older bench knows
fewer: it refuses what it does not know, and this stops). ``--base-args``/``--head-args`` go
to one side only: an older bench counted the daemon's start in the resync, as
``--start cold`` does now.

    python bench/ab.py --base 9327bf7 --pairs 5 -- --per-record-sample 2000 --repeat 1
    python bench/ab.py --base cd5d6dc --head-args "--start cold" -- --per-record-sample 2000
"""
from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (name, what it is, lower is better)
FIGURES = (("astaire_cpu", "Astaire CPU s per M placed", True),
           ("sources_cpu", "sources' CPU s per M placed", True),
           ("target_cpu", "target CPU s per M placed", True),
           ("target_ratio", "target CPU / ceiling's target", True),
           ("seconds", "resync seconds", True),
           ("ratio_to_ceiling", "ratio to the ceiling", False),
           ("peak_rss_mb", "peak RSS MB", True))


class ABError(Exception):
    """A step that could not be done, said in one line."""


def _tail(path: str, lines: int = 15) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:])


def resolve(rev: str) -> str:
    """The commit ``rev`` names in this checkout's repository."""
    r = subprocess.run(["git", "-C", REPO, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise ABError(f"{rev!r} is not a commit of the repository at {REPO}")
    return r.stdout.strip()


def head_description() -> tuple[str, str]:
    """This checkout's commit, and " with uncommitted changes" when its tracked files differ
    from it (else "")."""
    sha = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", REPO, "diff", "--quiet", "HEAD", "--"]).returncode != 0
    return sha, " with uncommitted changes" if dirty else ""


def export(commit: str, workdir: str) -> str:
    """The tree of ``commit`` in ``workdir/base``, with ``../shared`` beside it when this
    checkout has one; its codec built. Returns the tree's path."""
    tree = os.path.join(workdir, "base")
    archive = subprocess.run(["git", "-C", REPO, "archive", "--format=tar", commit], capture_output=True)
    if archive.returncode != 0:
        raise ABError(f"git archive {commit}: {archive.stderr.decode(errors='replace').strip()}")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        if hasattr(tarfile, "data_filter"):  # Python 3.11.4 on
            tar.extractall(tree, filter="data")
        else:
            tar.extractall(tree)
    shared = os.path.join(os.path.dirname(REPO), "shared")
    if os.path.isdir(shared):
        os.symlink(shared, os.path.join(workdir, "shared"))
    log = os.path.join(workdir, "base-build.log")
    with open(log, "w") as out:
        r = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tree, stdout=out,
                           stderr=subprocess.STDOUT)
    if r.returncode != 0:
        raise ABError(f"building the codec of {commit[:12]} failed (exit {r.returncode}); the end of {log}:\n"
                      + _tail(log))
    return tree


def figures(report: dict) -> dict:
    """The compared figures of one bench report (None where that bench does not give one)."""
    a = report["astaire"]
    placed = a["records_for_new_node"]
    cpu = a.get("cpu_seconds_per_million_placed")
    if cpu is None:
        cpu = round(a["cpu_seconds"] / max(placed, 1) * 1e6, 2)
    return {"astaire_cpu": cpu,
            "sources_cpu": a.get("sources_cpu_seconds_per_million_placed"),
            "target_cpu": a.get("target_cpu_seconds_per_million_placed"),
            "target_ratio": report.get("target_cpu_ratio_to_ceiling"),
            "seconds": a.get("seconds"),
            "ratio_to_ceiling": report.get("ratio_to_ceiling"),
            "peak_rss_mb": a.get("peak_rss_mb"),
            "records_placed": placed,
            "codec_build": report.get("codec_build"),
            "placement_ok": a.get("placement_ok")}


def run_bench(tree: str, args: list[str], json_out: str, log: str) -> dict:
    """One run of ``tree``'s bench, on ``tree``'s own build; its figures."""
    env = dict(os.environ, PYTHONPATH=tree)
    with open(log, "w") as out:
        r = subprocess.run([sys.executable, os.path.join(tree, "bench", "resync_bench.py"), *args,
                            "--json-out", json_out], cwd=tree, env=env, stdout=out, stderr=subprocess.STDOUT)
    if r.returncode != 0 or not os.path.exists(json_out):
        raise ABError(f"the bench of {tree} failed (exit {r.returncode}); the end of {log}:\n" + _tail(log))
    with open(json_out) as f:
        return figures(json.load(f))


def summarize(pairs: list[dict]) -> dict:
    """Medians per side, their ratio head / base, and in how many pairs head did better."""
    out = {}
    for name, _, lower_better in FIGURES:
        both = [p for p in pairs if p["base"][name] is not None and p["head"][name] is not None]
        if not both:
            continue
        base = [p["base"][name] for p in both]
        head = [p["head"][name] for p in both]
        mb, mh = round(statistics.median(base), 3), round(statistics.median(head), 3)
        better = sum(1 for b, h in zip(base, head) if (h < b if lower_better else h > b))
        out[name] = {"base_median": mb, "head_median": mh, "ratio": round(mh / mb, 3) if mb else None,
                     "head_better_in": better, "pairs": len(base)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 2)[2],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="the revision to compare against (any git revision)")
    ap.add_argument("--pairs", type=int, default=3, help="runs of each side, alternating (default 3)")
    ap.add_argument("--base-args", default="", help="arguments for the base's bench only (one string)")
    ap.add_argument("--head-args", default="", help="arguments for this checkout's bench only (one string)")
    ap.add_argument("--json-out", help="also write the pairs and the summary here")
    ap.add_argument("--keep", action="store_true", help="keep the base's tree, the runs' logs and JSON")
    ap.add_argument("bench_args", nargs=argparse.REMAINDER, help="after --: arguments for both benches")
    args = ap.parse_args(argv)
    if args.pairs < 1:
        ap.error("--pairs must be at least 1")
    common = args.bench_args[1:] if args.bench_args[:1] == ["--"] else args.bench_args
    try:
        commit = resolve(args.base)
    except ABError as e:
        ap.error(str(e))
    missing = [m for m in ("Cython", "setuptools") if importlib.util.find_spec(m) is None]
    if missing:
        ap.error(f"the base's codec is built with this interpreter ({sys.executable}), which lacks "
                 f"{' and '.join(missing)}: install Astaire's test extra (pip install -e '.[test]', as scripts/setup does)")
    head_sha, head_state = head_description()
    workdir = tempfile.mkdtemp(prefix="astaire-ab-")
    try:
        print(f"ab: base {args.base} = {commit[:12]}, head {head_sha[:12]}{head_state}; building the base in "
              f"{workdir}", flush=True)
        base_tree = export(commit, workdir)
        sides = {"base": (base_tree, common + shlex.split(args.base_args)),
                 "head": (REPO, common + shlex.split(args.head_args))}
        pairs = []
        for i in range(args.pairs):
            order = ("base", "head") if i % 2 == 0 else ("head", "base")
            pair = {}
            for side in order:
                tree, side_args = sides[side]
                stem = os.path.join(workdir, f"{side}-{i + 1}")
                pair[side] = run_bench(tree, side_args, stem + ".json", stem + ".log")
            pairs.append(pair)
            print(f"ab: pair {i + 1}: Astaire CPU per M placed base {pair['base']['astaire_cpu']} "
                  f"head {pair['head']['astaire_cpu']}", flush=True)
    except ABError as e:
        print(f"ab: {e}\nab: its logs are in {workdir}", file=sys.stderr)
        return 1
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    summary = summarize(pairs)
    report = {"base": args.base, "base_commit": commit, "head": head_sha + head_state, "bench_args": common,
              "base_args": args.base_args, "head_args": args.head_args, "pairs": pairs, "summary": summary}
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(report, f, indent=2)
    print(f"\n{'figure':<28} {'base median':>12} {'head median':>12} {'head/base':>10}  head better in")
    for name, label, _ in FIGURES:
        s = summary.get(name)
        if s:
            print(f"{label:<28} {s['base_median']:>12} {s['head_median']:>12} {s['ratio']!s:>10}  "
                  f"{s['head_better_in']} of {s['pairs']} pairs")
    if args.keep:
        print(f"ab: kept {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
