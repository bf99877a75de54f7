"""``astaire view``: show a cluster view and what a resize moves."""
from __future__ import annotations

import json
import sys
from collections import Counter

from astaire.cli.argtypes import positive_int, power_of_two, server_list
from astaire.cluster.settings import ConfigError, read_cluster_settings
from astaire.cluster.view import DEFAULT_REPLICAS, DEFAULT_VBUCKETS, ClusterView


def register(sub) -> None:
    p = sub.add_parser(
        "view",
        help="show which servers own each vbucket, and what a resize moves",
        description="Print the cluster view (Project Clearwater's MemcachedStoreView) for a server "
        "list, or for a resize from --servers to --new-servers: per vbucket its current and new "
        "replicas and whether it moves, then the vbuckets each server gains and loses.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--servers", type=server_list, metavar="A,B,...",
                     help="current servers, comma-separated HOST:PORT")
    src.add_argument("--cluster-settings-file", metavar="FILE",
                     help="read servers/new_servers from a cluster_settings file instead")
    p.add_argument("--new-servers", type=server_list, default=[], metavar="A,B,...",
                   help="servers after the resize (omit for a stable cluster)")
    p.add_argument("--vbuckets", type=power_of_two, default=DEFAULT_VBUCKETS,
                   help="number of vbuckets, a power of two (default %(default)s)")
    p.add_argument("--replicas", type=positive_int, default=DEFAULT_REPLICAS,
                   help="replicas per vbucket (default %(default)s)")
    p.add_argument("--json", action="store_true",
                   help="print a JSON object with current, new, read and write (as in views.jsonl)")
    p.set_defaults(func=run)


def movement_summary(view: ClusterView) -> dict[str, dict[str, int]]:
    """Per server, how many vbucket replicas it gains and loses in the resize."""
    gained: Counter[str] = Counter()
    lost: Counter[str] = Counter()
    if view.new is not None:
        for vb in range(view.vbuckets):
            cur, new = set(view.current[vb]), set(view.new[vb])
            gained.update(new - cur)
            lost.update(cur - new)
    servers = list(dict.fromkeys([*view.servers, *view.new_servers]))
    return {s: {"gained": gained[s], "lost": lost[s]} for s in servers}


def render_table(view: ClusterView) -> str:
    lines = []
    width = max([len(", ".join(r)) for r in view.current] + [16])
    if view.new is None:
        lines.append(f"{'vbucket':>7}  replicas")
        for vb in range(view.vbuckets):
            lines.append(f"{vb:>7}  {', '.join(view.current[vb])}")
        lines.append("")
        lines.append(f"Stable cluster of {len(view.servers or view.new_servers)} servers: nothing moves.")
        return "\n".join(lines)
    lines.append(f"{'vbucket':>7}  {'current replicas':<{width}}  {'new replicas':<{width}}  moves")
    moving = 0
    for vb in range(view.vbuckets):
        moves = set(view.current[vb]) != set(view.new[vb])
        moving += moves
        lines.append(f"{vb:>7}  {', '.join(view.current[vb]):<{width}}  {', '.join(view.new[vb]):<{width}}  "
                     f"{'yes' if moves else ''}")
    lines.append("")
    lines.append(f"{moving} of {view.vbuckets} vbuckets change replicas.")
    lines.append(f"{'server':<24} {'gains':>6} {'loses':>6}")
    for server, counts in movement_summary(view).items():
        lines.append(f"{server:<24} {counts['gained']:>6} {counts['lost']:>6}")
    return "\n".join(lines)


def run(args) -> int:
    if args.cluster_settings_file:
        try:
            settings = read_cluster_settings(args.cluster_settings_file)
        except ConfigError as exc:
            print(f"astaire view: {exc}", file=sys.stderr)
            return 3
        servers, new_servers = settings.servers, settings.new_servers
    else:
        servers, new_servers = args.servers, args.new_servers
    view = ClusterView(servers, new_servers, args.vbuckets, args.replicas)
    if args.json:
        doc = view.to_json()
        print(json.dumps(doc))
    else:
        print(render_table(view))
    return 0
