"""The node config (``/etc/clearwater/config``): one reader for the daemon, the throttle and
the SNMP agent.

The file is shell syntax (``name=value`` per line, values optionally quoted, ``#``
comments, an optional ``export``). It is tokenised with shlex and never executed: command
substitutions and variable references stay literal text. Names Astaire uses: ``local_ip``
(the local node is ``$local_ip:11211``), ``log_level``, ``astaire_cpu_limit_percentage``
(the throttle's share, default 5) and ``snmp_ip`` (where alarms go).
"""
from __future__ import annotations

import logging
import re
import shlex

from astaire.cluster.settings import quote

log = logging.getLogger("astaire.config")

DEFAULT_NODE_CONFIG = "/etc/clearwater/config"
DEFAULT_MEMCACHED_PORT = 11211
MAX_WARNINGS = 5  # ignored lines named one by one; the rest are counted
_ASSIGNMENT = re.compile(r"^(?:(?:export|readonly|declare|local)\s+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)$")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def parse_node_config(text: str, source: str = "<config>") -> dict[str, str]:
    """Shell-style ``name=value`` assignments in ``text``; the last one of a name wins.

    Values follow shell quoting and ``#`` comments. ``a=1 b=2`` sets both; in
    ``log_level=2 some_command --flag=3`` only ``log_level`` is a setting (the rest is a
    command and its arguments). A command substitution (``$(...)`` or backticks) is kept as
    literal text, never run. Lines that are not assignments, or that shlex cannot split,
    are skipped with a warning naming the line (the first few; then one count).
    """
    result: dict[str, str] = {}
    ignored = 0

    def skip(lineno: int, why: str, line: str) -> None:
        nonlocal ignored
        ignored += 1
        if ignored <= MAX_WARNINGS:
            log.warning("%s:%d: ignored, %s: %s", source, lineno, why, quote(line))

    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _ASSIGNMENT.match(line)
        if not m:
            skip(lineno, "not a name=value assignment", line)
            continue
        try:
            tokens = shlex.split(m.group(2), comments=True, posix=True)
        except ValueError as exc:
            skip(lineno, f"cannot parse the value ({exc})", line)
            continue
        if m.group(2).lstrip().startswith(("$(", "`")):
            result[m.group(1)] = " ".join(tokens)
            continue
        result[m.group(1)] = tokens[0] if tokens else ""
        for word in tokens[1:]:
            name, eq, value = word.partition("=")
            if not eq or not _NAME.match(name):
                break  # a command, not an assignment: its arguments are not settings
            result[name] = value
    if ignored > MAX_WARNINGS:
        log.warning("%s: %d more lines ignored (not name=value assignments)", source, ignored - MAX_WARNINGS)
    return result


def read_node_config(path: str) -> dict[str, str]:
    """The node config as a dict; a missing file is an empty config."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return parse_node_config(f.read(), path)
    except FileNotFoundError:
        return {}
    except OSError as exc:
        log.warning("%s: cannot read node config: %s", path, exc)
        return {}


def local_name_from_config(config: dict[str, str]) -> str | None:
    ip = config.get("local_ip", "").strip()
    if not ip:
        return None
    if ":" in ip and not ip.startswith("["):
        ip = f"[{ip}]"
    return f"{ip}:{DEFAULT_MEMCACHED_PORT}"
