"""The fault drills' table (issue 8): one row per drill check, printed in pytest's terminal
summary and written as JSON to ``$ASTAIRE_DRILLS_REPORT`` (default
``.pytest_cache/drills-report.json``) and as markdown beside it."""
from __future__ import annotations

import json
import os
from pathlib import Path

ROWS: list[dict] = []


def record(name: str, check, seconds: float, **extra) -> None:
    ROWS.append({"drill": name, "nodes": check.nodes, "checked": check.checked, "missing": len(check.missing),
                 "stale": len(check.stale), "wrong": len(check.wrong), "seconds": round(seconds, 1), **extra})


def markdown() -> str:
    lines = ["| drill | records checked | missing | stale | wrong | tombstones | time (s) | notes |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    base = {"drill", "nodes", "checked", "missing", "stale", "wrong", "seconds", "tombstones", "writes"}
    for r in ROWS:
        lines.append(f"| {r['drill']} | {r['checked']} | {r['missing']} | {r['stale']} | {r['wrong']} | "
                     f"{r.get('tombstones', 0)} | {r['seconds']} | "
                     + ", ".join(f"{k} {v}" for k, v in r.items() if k not in base) + " |")
    return "\n".join(lines)


def summary(terminalreporter, rootdir: str) -> None:
    if not ROWS:
        return
    path = Path(os.environ.get("ASTAIRE_DRILLS_REPORT") or Path(rootdir) / ".pytest_cache" / "drills-report.json")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(ROWS, indent=1) + "\n")
        path.with_suffix(".md").write_text(markdown() + "\n")
    except OSError:
        pass
    terminalreporter.section("fault drills")
    terminalreporter.write_line(markdown())
    terminalreporter.write_line(f"(written to {path})")
