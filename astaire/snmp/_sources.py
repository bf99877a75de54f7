"""The one place astaire-snmp reaches into the rest of Astaire.

The agent reads the daemon's statistics only through the project's own stats reader and
the node config only through the project's config reader; both are imported here, so a
package reorganisation needs a change in this file alone.
"""
from __future__ import annotations

from astaire.cli.commands import stats_path_for  # noqa: F401
from astaire.cluster.nodeconfig import DEFAULT_NODE_CONFIG, read_node_config  # noqa: F401
from astaire.daemon.arbiter import HEARTBEAT  # noqa: F401
from astaire.daemon.pidfile import DEFAULT_PIDFILE, daemon_pid  # noqa: F401
from astaire.stats import StatsReader, StatsUnavailable  # noqa: F401
