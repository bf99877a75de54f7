"""Which servers own each vbucket: Project Clearwater's ``MemcachedStoreView``, bit for bit.

The ring is rebuilt for every server list and grown one node at a time (docs/compatibility.md,
"The view"); the reference views in ``tests/data`` (computed with the original C++) are
reproduced by the tests.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence

DEFAULT_VBUCKETS = 128
DEFAULT_REPLICAS = 2


def key_hash(key: bytes) -> int:
    """libmemcached's MD5 hash: the first 4 digest bytes as a little-endian uint32."""
    return int.from_bytes(hashlib.md5(key).digest()[:4], "little")


def vbucket_for_key(key: bytes, vbuckets: int = DEFAULT_VBUCKETS) -> int:
    return key_hash(key) & (vbuckets - 1)


class Ring:
    """Slot ownership for ``nodes`` nodes over ``slots`` slots."""

    def __init__(self, slots: int, nodes: int):
        self.slots = slots
        self.ring = [0] * slots
        # Per node, its slots in ascending order (the C++ keeps a std::map<int,int>).
        self.node_slots: list[list[int]] = []
        if nodes > 0:
            self.node_slots = [list(range(slots))]
        for k in range(1, nodes):
            self._add_node(k)

    def _add_node(self, k: int) -> None:
        self.node_slots.append([])
        for i in range(self.slots // (k + 1)):
            max_node, max_slots = -1, -1
            for node in range(k):
                if len(self.node_slots[node]) >= max_slots:  # ties go to the highest-numbered
                    max_node, max_slots = node, len(self.node_slots[node])
            owned = self.node_slots[max_node]
            slot = owned[i % len(owned)]
            owned.remove(slot)
            self.ring[slot] = k
            target = self.node_slots[k]
            # keep ascending order
            pos = 0
            while pos < len(target) and target[pos] < slot:
                pos += 1
            target.insert(pos, slot)

    def replicas(self, slot: int, replicas: int) -> list[int]:
        nodes: list[int] = []
        for step in range(self.slots):
            node = self.ring[(slot + step) % self.slots]
            if node not in nodes:
                nodes.append(node)
                if len(nodes) == replicas:
                    return nodes
        while len(nodes) < replicas:
            nodes.append(self.ring[slot])
        return nodes


def _replica_names(servers: Sequence[str], vbuckets: int, replicas: int, padded: bool) -> list[list[str]]:
    """Per vbucket, the names of its replicas. The ring pads a short list (fewer nodes than
    replicas) with the slot's owner: resizing views keep that padding, stable views list
    each server once (both as the original C++ does; tests/data/views-padding.jsonl)."""
    if not servers:
        return [[] for _ in range(vbuckets)]
    ring = Ring(vbuckets, len(servers))
    if padded:
        return [[servers[n] for n in ring.replicas(vb, replicas)] for vb in range(vbuckets)]
    return [list(dict.fromkeys(servers[n] for n in ring.replicas(vb, replicas))) for vb in range(vbuckets)]


class ClusterView:
    """Replica lists per vbucket for a (possibly resizing) cluster.

    ``current``, ``new`` (None when stable), ``read`` and ``write`` are lists indexed by
    vbucket, each a list of server names.
    """

    def __init__(self, servers: Sequence[str], new_servers: Sequence[str] = (),
                 vbuckets: int = DEFAULT_VBUCKETS, replicas: int = DEFAULT_REPLICAS):
        if vbuckets < 1 or vbuckets & (vbuckets - 1):
            raise ValueError(f"vbuckets must be a power of two, not {vbuckets}")
        if replicas < 1:
            raise ValueError(f"replicas must be at least 1, not {replicas}")
        self.vbuckets = vbuckets
        self.replicas = replicas
        self.servers = list(servers)
        self.new_servers = list(new_servers)
        self.new: list[list[str]] | None
        if not self.new_servers or not self.servers:
            stable = self.servers or self.new_servers
            self.current = _replica_names(stable, vbuckets, replicas, padded=False)
            self.new = None
            self.read = [list(r) for r in self.current]
        else:
            self.current = _replica_names(self.servers, vbuckets, replicas, padded=True)
            self.new = _replica_names(self.new_servers, vbuckets, replicas, padded=True)
            self.read = []
            for vb in range(vbuckets):
                merged: list[str] = []
                for name in [self.current[vb][0], *self.new[vb], *self.current[vb]]:
                    if name not in merged:
                        merged.append(name)
                self.read.append(merged)
        self.write = [list(r) for r in self.read]

    @classmethod
    def from_settings(cls, settings, vbuckets: int = DEFAULT_VBUCKETS, replicas: int = DEFAULT_REPLICAS) -> "ClusterView":
        return cls(settings.servers, settings.new_servers, vbuckets, replicas)

    @property
    def resizing(self) -> bool:
        return self.new is not None

    def owners(self, vbucket: int) -> list[str]:
        """Where a vbucket's records belong once the resize is finished."""
        return (self.new if self.new is not None else self.current)[vbucket]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ClusterView):
            return NotImplemented
        return (self.vbuckets, self.current, self.new, self.read, self.write) == (
            other.vbuckets, other.current, other.new, other.read, other.write)

    def __repr__(self) -> str:
        return f"ClusterView(servers={self.servers!r}, new_servers={self.new_servers!r})"

    def to_json(self) -> dict:
        return {"vbuckets": self.vbuckets, "replicas": self.replicas, "servers": self.servers,
                "new_servers": self.new_servers, "current": self.current, "new": self.new,
                "read": self.read, "write": self.write}
