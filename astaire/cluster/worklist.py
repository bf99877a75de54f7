"""What the local node must pull, and in which rounds (docs/compatibility.md, "The worklist").

Each vbucket the local node (newly) owns is streamed from every reachable old replica,
primary first, one server per round: a replica that restarted and lost records cannot
leave the new home short.
"""
from __future__ import annotations

from astaire.cluster.view import ClusterView


class Worklist:
    def __init__(self, view: ClusterView, local: str, full: bool = False):
        self.local = local
        self.full = full
        self.sources: dict[int, list[str]] = {}
        for vb in range(view.vbuckets):
            if local not in view.owners(vb):
                continue
            sources = list(dict.fromkeys(view.current[vb]))  # resizing lists may be padded
            if full:
                sources = [s for s in sources if s != local]
            if sources and local not in sources:
                self.sources[vb] = sources
        self.needing = sum(len(s) for s in self.sources.values())
        self._remaining = {vb: list(s) for vb, s in self.sources.items()}
        self._served: set[int] = set()
        self.failed_servers: list[str] = []

    @property
    def vbuckets(self) -> list[int]:
        return sorted(self.sources)

    def next_round(self) -> dict[str, list[int]]:
        """Server -> its vbuckets for this round; each server is taken off those lists.

        Empty when every list is exhausted (the resync is then finished once the streams
        already handed out have ended).
        """
        groups: dict[str, list[int]] = {}
        for vb in sorted(self._remaining):
            remaining = self._remaining[vb]
            if remaining:
                groups.setdefault(remaining[0], []).append(vb)
        for server, vbs in groups.items():
            for vb in vbs:
                self._remaining[vb].remove(server)
        return groups

    def stream_succeeded(self, server: str, vbuckets) -> None:
        self._served.update(vbuckets)

    def server_failed(self, server: str) -> None:
        """A server that failed (connect, protocol error, disconnect) leaves every list."""
        if server not in self.failed_servers:
            self.failed_servers.append(server)
        for remaining in self._remaining.values():
            if server in remaining:
                remaining.remove(server)

    @property
    def done(self) -> bool:
        return not any(self._remaining.values())

    @property
    def failed_vbuckets(self) -> list[int]:
        """Vbuckets no source has served (final once the last round's streams ended)."""
        return sorted(vb for vb in self.sources if vb not in self._served)
