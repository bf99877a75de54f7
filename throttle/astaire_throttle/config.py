"""The node config (``/etc/clearwater/config``): read, never executed.

The file is shell syntax, ``name=value`` per line, values optionally quoted,
``#`` comments. Each line is tokenised with :mod:`shlex` (so quoting and
comments follow the shell's rules) and only plain assignments are kept;
nothing is expanded or run.
"""
from __future__ import annotations

import logging
import math
import re
import shlex

DEFAULT_CONFIG_PATH = "/etc/clearwater/config"
PERCENTAGE_SETTING = "astaire_cpu_limit_percentage"
DEFAULT_PERCENTAGE = 5.0

log = logging.getLogger(__name__)

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class InvalidPercentage(ValueError):
    """The configured percentage is not a number in (0, 100]."""


def parse_shell_assignments(text: str) -> dict[str, str]:
    """``name=value`` assignments in shell-style *text*; the last one of a name wins.

    Lines shlex cannot split (an unclosed quote, say) are skipped with a warning.
    ``export name=value`` counts as an assignment; any other command is ignored.
    """
    values: dict[str, str] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        try:
            words = shlex.split(line, comments=True, posix=True)
        except ValueError as exc:
            log.warning("config line %d cannot be parsed (%s); ignored", lineno, exc)
            continue
        if words and words[0] in ("export", "readonly", "declare", "local"):
            words = words[1:]
        for word in words:
            name, eq, value = word.partition("=")
            if not eq or not _NAME.match(name):
                break  # a command, not an assignment: its arguments are not settings
            values[name] = value
    return values


def read_config(path: str) -> dict[str, str]:
    """The assignments in the config file at *path* (empty if it does not exist)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return parse_shell_assignments(f.read())
    except FileNotFoundError:
        log.info("config file %s does not exist; using defaults", path)
        return {}


def parse_percentage(raw: str) -> float:
    """*raw* as a CPU percentage in (0, 100]; raises :class:`InvalidPercentage`."""
    try:
        value = float(raw.strip())
    except ValueError:
        raise InvalidPercentage(f"{raw!r} is not a number") from None
    if not math.isfinite(value):
        raise InvalidPercentage(f"{raw!r} is not a number")
    if value <= 0:
        raise InvalidPercentage(f"{raw!r} is 0 or below")
    if value > 100:
        raise InvalidPercentage(f"{raw!r} is above 100")
    return value


def load_cpu_limit(path: str) -> float:
    """``astaire_cpu_limit_percentage`` from *path*; the default when missing or invalid.

    An invalid value is logged as an error and replaced by the default: a typo in
    the config must not leave Astaire unthrottled, nor stop the throttle.
    """
    try:
        raw = read_config(path).get(PERCENTAGE_SETTING)
    except OSError as exc:
        log.error("cannot read config file %s (%s); using the default %s=%g",
                  path, exc, PERCENTAGE_SETTING, DEFAULT_PERCENTAGE)
        return DEFAULT_PERCENTAGE
    if raw is None:
        log.info("%s not set in %s; using the default %g%%",
                 PERCENTAGE_SETTING, path, DEFAULT_PERCENTAGE)
        return DEFAULT_PERCENTAGE
    try:
        return parse_percentage(raw)
    except InvalidPercentage as exc:
        log.error("invalid %s in %s: %s (must be a number above 0 and at most 100); "
                  "using the default %g%%", PERCENTAGE_SETTING, path, exc, DEFAULT_PERCENTAGE)
        return DEFAULT_PERCENTAGE
