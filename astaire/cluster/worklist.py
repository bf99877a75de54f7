"""What the local node must pull, and from whom (docs/compatibility.md, "The worklist").

Each vbucket the local node (newly) owns is streamed from every reachable old replica: a
replica that restarted and lost records cannot leave the new home short. The original
streamed in rounds (each round the first remaining source of every vbucket); because the
conflict rule makes the final state independent of arrival order, one pass per source is
equivalent and cheaper: each old replica is streamed once, for every wanted vbucket it
holds, all sources at once. A source that fails is dropped for this resync; its vbuckets
still count as served when another replica streamed them. A failure of the target (the
local memcached) is not the source's and is not recorded here.
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
        self._served: set[int] = set()
        self._handed_out = False
        self.failed_servers: list[str] = []

    @property
    def vbuckets(self) -> list[int]:
        return sorted(self.sources)

    def streams(self) -> dict[str, list[int]]:
        """Server -> every wanted vbucket it holds, primaries first in server order; the
        first call hands out the whole pass, later calls nothing."""
        if self._handed_out:
            return {}
        self._handed_out = True
        groups: dict[str, list[int]] = {}
        for vb in sorted(self.sources):
            for server in self.sources[vb]:
                groups.setdefault(server, []).append(vb)
        return groups

    def hold(self, server: str, vbuckets) -> list[list[int]]:
        """The Writer's ``hold`` for ``server``'s stream: [vbucket, bit] for each of its
        vbuckets that has two old replicas, ``bit`` being the server's place among them (0
        for the first). The two streams of such a vbucket then hold back opposite halves of
        its keys (by their key_hash64's top bit): each key is sent first by one stream, and
        the other's copy waits for the settled table to note it (astaire.resync.settled),
        rather than reaching the target at the same moment and costing it a read."""
        out = []
        for vb in vbuckets:
            sources = self.sources.get(vb, [])
            if len(sources) == 2 and server in sources:
                out.append([vb, sources.index(server)])
        return out

    def stream_succeeded(self, server: str, vbuckets) -> None:
        self._served.update(vbuckets)

    def server_failed(self, server: str) -> None:
        """A server that failed (connect, protocol error, disconnect, stall) for this resync."""
        if server not in self.failed_servers:
            self.failed_servers.append(server)

    @property
    def failed_vbuckets(self) -> list[int]:
        """Vbuckets no source has served (final once every stream has ended)."""
        return sorted(vb for vb in self.sources if vb not in self._served)
