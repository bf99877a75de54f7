"""The cluster settings file (``cluster_settings``): the server lists the view is built from.

Project Clearwater's rules, followed exactly: lines are stripped; blank lines and lines
starting with ``#`` are ignored; every other line is ``key=value`` split on ``=`` (more than
one ``=`` is an error, no ``=`` means an empty value); the keys are ``servers`` (required)
and ``new_servers`` (optional), nothing else; values are comma-separated ``host:port``
entries with empty entries dropped. An invalid file at start-up is fatal (exit 3); on a
reload it is logged and the old view stays.
"""
from __future__ import annotations

import hashlib
import ipaddress
import logging
import re
from dataclasses import dataclass, field

log = logging.getLogger("astaire.cluster")

DEFAULT_CLUSTER_SETTINGS = "/etc/clearwater/cluster_settings"


class ConfigError(ValueError):
    """A configuration file that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class ClusterSettings:
    servers: list[str] = field(default_factory=list)
    new_servers: list[str] = field(default_factory=list)

    @property
    def resizing(self) -> bool:
        return bool(self.new_servers) and bool(self.servers)


MAX_SERVERS = 1024  # per list: far beyond any real cluster (128 vbuckets), short of a runaway file
_HOSTNAME = re.compile(r"(?=.{1,253}\.?\Z)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
                       r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?\Z")


def quote(text: str, limit: int = 80) -> str:
    """``repr(text)``, cut short: error messages must stay readable whatever the input."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def parse_server(name: str) -> tuple[str, int]:
    """``"host:port"`` (or ``"[v6addr]:port"``) to ``(host, port)``; ValueError if malformed.
    The host is an IPv4 address, a bracketed IPv6 address or a DNS name."""
    host, sep, port_text = name.rpartition(":")
    if not sep or not host or not port_text.isdigit() or len(port_text) > 5:
        raise ValueError(f"{quote(name)} is not HOST:PORT")
    port = int(port_text)
    if not 0 < port < 65536:
        raise ValueError(f"{quote(name)} has port {port} outside 1-65535")
    if host.startswith("["):
        if not host.endswith("]") or len(host) < 3:
            raise ValueError(f"{quote(name)} has a malformed [IPv6] address")
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{quote(name)} has a malformed [IPv6] address") from None
    elif ":" in host:
        raise ValueError(f"{quote(name)}: write IPv6 addresses as [addr]:port")
    elif not _HOSTNAME.match(host):
        raise ValueError(f"{quote(name)}: {quote(host, 40)} is neither an IP address nor a host name")
    return host, port


def parse_server_list(value: str) -> list[str]:
    """Comma-separated HOST:PORT entries, stripped, empty ones dropped; ValueError names a bad
    one, or too many."""
    entries = [e for e in (e.strip() for e in value.split(",")) if e]
    if len(entries) > MAX_SERVERS:
        raise ValueError(f"lists {len(entries)} servers; at most {MAX_SERVERS} are accepted")
    for entry in entries:
        parse_server(entry)
    return entries


def parse_cluster_settings(text: str, source: str = "<cluster_settings>") -> ClusterSettings:
    """Parse cluster_settings text; raise ConfigError naming ``source`` and the line."""
    values: dict[str, list[str]] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split("=")
        if len(parts) > 2:
            raise ConfigError(f"{source}:{lineno}: more than one '=' in {quote(line)}")
        key = parts[0].strip()
        value = parts[1] if len(parts) == 2 else ""
        if key not in ("servers", "new_servers"):
            raise ConfigError(f"{source}:{lineno}: unknown key {quote(key, 40)} (expected 'servers' or 'new_servers')")
        try:
            values[key] = parse_server_list(value)
        except ValueError as exc:
            raise ConfigError(f"{source}:{lineno}: {key}: {exc}") from None
    if "servers" not in values:
        raise ConfigError(f"{source}: no 'servers' line")
    return ClusterSettings(values["servers"], values.get("new_servers", []))


def read_cluster_settings(path: str) -> ClusterSettings:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read cluster settings: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    return parse_cluster_settings(text, path)


def settings_digest(path: str) -> str:
    """A digest of the file's bytes: tells whether the daemon has taken in the current file."""
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return ""
