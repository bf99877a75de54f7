"""The throttle's setting, ``astaire_cpu_limit_percentage``, from the node config.

The node config is read by Astaire's one reader (:mod:`astaire.cluster.nodeconfig`):
parsed as shell text, never run.
"""
from __future__ import annotations

import logging
import math

from astaire.cluster.nodeconfig import DEFAULT_NODE_CONFIG, read_node_config

DEFAULT_CONFIG_PATH = DEFAULT_NODE_CONFIG
PERCENTAGE_SETTING = "astaire_cpu_limit_percentage"
DEFAULT_PERCENTAGE = 5.0

log = logging.getLogger(__name__)


class InvalidPercentage(ValueError):
    """The configured percentage is not a number in (0, 100]."""


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
        raw = read_node_config(path).get(PERCENTAGE_SETTING)
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
