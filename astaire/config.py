"""Readers for the two files Astaire takes its configuration from.

``cluster_settings`` (the server lists) follows Project Clearwater's rules exactly (see
DESIGN.md); ``/etc/clearwater/config`` is a shell-style ``name=value`` file that is parsed,
never executed.
"""
from __future__ import annotations

import hashlib
import logging
import re
import shlex
from dataclasses import dataclass, field

log = logging.getLogger("astaire.config")

DEFAULT_CLUSTER_SETTINGS = "/etc/clearwater/cluster_settings"
DEFAULT_NODE_CONFIG = "/etc/clearwater/config"
DEFAULT_MEMCACHED_PORT = 11211
_ASSIGNMENT = re.compile(r"^(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)$")


class ConfigError(ValueError):
    """A configuration file that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class ClusterSettings:
    servers: list[str] = field(default_factory=list)
    new_servers: list[str] = field(default_factory=list)

    @property
    def resizing(self) -> bool:
        return bool(self.new_servers) and bool(self.servers)


def parse_server(name: str) -> tuple[str, int]:
    """``"host:port"`` (or ``"[v6addr]:port"``) to ``(host, port)``; ValueError if malformed."""
    host, sep, port_text = name.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"{name!r} is not HOST:PORT")
    port = int(port_text)
    if not 0 < port < 65536:
        raise ValueError(f"{name!r} has port {port} outside 1-65535")
    if host.startswith("["):
        if not host.endswith("]") or len(host) < 3:
            raise ValueError(f"{name!r} has a malformed [IPv6] address")
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{name!r}: write IPv6 addresses as [addr]:port")
    return host, port


def parse_server_list(value: str) -> list[str]:
    """Comma-separated HOST:PORT entries, stripped, empty ones dropped; ValueError names a bad one."""
    entries = [e for e in (e.strip() for e in value.split(",")) if e]
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
            raise ConfigError(f"{source}:{lineno}: more than one '=' in {line!r}")
        key = parts[0].strip()
        value = parts[1] if len(parts) == 2 else ""
        if key not in ("servers", "new_servers"):
            raise ConfigError(f"{source}:{lineno}: unknown key {key!r} (expected 'servers' or 'new_servers')")
        try:
            values[key] = parse_server_list(value)
        except ValueError as exc:
            raise ConfigError(f"{source}:{lineno}: {key} entry {exc}") from None
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


def parse_node_config(text: str, source: str = "<config>") -> dict[str, str]:
    """Shell-style ``name=value`` lines (quotes, ``#`` comments, optional ``export``).

    The file is tokenised with shlex, never executed: command substitutions and variable
    references are kept as literal text. Lines that are not assignments are skipped with a
    warning naming the line.
    """
    result: dict[str, str] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _ASSIGNMENT.match(line)
        if not m:
            log.warning("%s:%d: ignored, not a name=value assignment: %r", source, lineno, line)
            continue
        try:
            tokens = shlex.split(m.group(2), comments=True, posix=True)
        except ValueError as exc:
            log.warning("%s:%d: ignored, cannot parse the value (%s): %r", source, lineno, exc, line)
            continue
        result[m.group(1)] = " ".join(tokens)
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
