"""The astaire subtree (docs/compatibility.md, "Statistics") and its values for one statistics snapshot.

The names and OIDs below are checked against ``ASTAIRE-MIB.txt`` as compiled by pysmi
(tests/test_snmp_mib.py), so the MIB file that ships and the agent cannot drift apart.

``Tree`` is the whole subtree for one snapshot as a sorted list of (OID, kind, value), with
GET and GETNEXT over it; the front ends (pysnmp, AgentX, Prometheus) only translate.
"""
from __future__ import annotations

import bisect
import os
from dataclasses import dataclass

ASTAIRE = (1, 2, 826, 0, 1, 1578918, 9, 9)
MIB_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ASTAIRE-MIB.txt")

UINT32_MAX = 2 ** 32 - 1
SCOPE_PREVIOUS_5S = 1

# name -> OID, as the MIB module defines them (the test compares the two).
OBJECTS: dict[str, tuple[int, ...]] = {
    "astaire": ASTAIRE,
    "astaireBucketsNeedingResync": ASTAIRE + (1,),
    "astaireBucketsResynchronized": ASTAIRE + (2,),
    "astaireEntriesResynchronized": ASTAIRE + (3,),
    "astaireDataResynchronized": ASTAIRE + (4,),
    "astaireBandwidthTable": ASTAIRE + (5,),
    "astaireBandwidthEntry": ASTAIRE + (5, 1),
    "astaireBandwidthScope": ASTAIRE + (5, 1, 1),
    "astaireBandwidth": ASTAIRE + (5, 1, 2),
    "astaireConnectionTable": ASTAIRE + (6,),
    "astaireConnectionEntry": ASTAIRE + (6, 1),
    "astaireConnectionAddressType": ASTAIRE + (6, 1, 1),
    "astaireConnectionAddress": ASTAIRE + (6, 1, 2),
    "astaireConnectionPort": ASTAIRE + (6, 1, 3),
    "astaireConnectionBucketsNeedingResync": ASTAIRE + (6, 1, 4),
    "astaireConnectionBucketsResynchronized": ASTAIRE + (6, 1, 5),
    "astaireConnectionBucketTable": ASTAIRE + (7,),
    "astaireConnectionBucketEntry": ASTAIRE + (7, 1),
    "astaireConnectionBucketAddressType": ASTAIRE + (7, 1, 1),
    "astaireConnectionBucketAddress": ASTAIRE + (7, 1, 2),
    "astaireConnectionBucketPort": ASTAIRE + (7, 1, 3),
    "astaireConnectionBucketId": ASTAIRE + (7, 1, 4),
    "astaireConnectionBucketEntriesResynchronized": ASTAIRE + (7, 1, 5),
    "astaireConnectionBucketDataResynchronized": ASTAIRE + (7, 1, 6),
    "astaireConnectionBucketBandwidthTable": ASTAIRE + (8,),
    "astaireConnectionBucketBandwidthEntry": ASTAIRE + (8, 1),
    "astaireConnectionBucketBandwidthAddressType": ASTAIRE + (8, 1, 1),
    "astaireConnectionBucketBandwidthAddress": ASTAIRE + (8, 1, 2),
    "astaireConnectionBucketBandwidthPort": ASTAIRE + (8, 1, 3),
    "astaireConnectionBucketBandwidthBucketId": ASTAIRE + (8, 1, 4),
    "astaireConnectionBucketBandwidthScope": ASTAIRE + (8, 1, 5),
    "astaireConnectionBucketBandwidth": ASTAIRE + (8, 1, 6),
}
# The readable objects: every one is Unsigned32 (scalars) or Gauge32 (table columns).
READABLE = {
    "astaireBucketsNeedingResync": "Unsigned32",
    "astaireBucketsResynchronized": "Unsigned32",
    "astaireEntriesResynchronized": "Unsigned32",
    "astaireDataResynchronized": "Unsigned32",
    "astaireBandwidth": "Gauge32",
    "astaireConnectionBucketsNeedingResync": "Gauge32",
    "astaireConnectionBucketsResynchronized": "Gauge32",
    "astaireConnectionBucketEntriesResynchronized": "Gauge32",
    "astaireConnectionBucketDataResynchronized": "Gauge32",
    "astaireConnectionBucketBandwidth": "Gauge32",
}
SCALARS = (
    ("astaireBucketsNeedingResync", "buckets_needing_resync"),
    ("astaireBucketsResynchronized", "buckets_resynchronized"),
    ("astaireEntriesResynchronized", "entries_resynchronized"),
    ("astaireDataResynchronized", "data_resynchronized"),
)
SCALAR_OIDS = tuple(OBJECTS[name] + (0,) for name, _ in SCALARS)

# Value kinds, shared by the front ends.
UNSIGNED32, GAUGE32 = "Unsigned32", "Gauge32"


def clamp(value: float) -> int:
    """Values above 2^32-1 stay at 2^32-1 (Gauge32 style); negatives are 0."""
    return max(0, min(UINT32_MAX, int(value)))


def address_index(address_type: int, address: str) -> tuple[int, ...]:
    """InetAddressType + InetAddress as index sub-identifiers: type, length, octets."""
    import ipaddress

    if address_type in (1, 2):
        try:
            octets = ipaddress.ip_address(address).packed
        except ValueError:
            octets = address.encode()
    else:
        octets = address.encode()
    return (address_type, len(octets), *octets)


@dataclass(frozen=True)
class Row:
    oid: tuple[int, ...]
    kind: str
    value: int


class Tree:
    """The astaire subtree for one snapshot (None: daemon down or stale, so no instances)."""

    def __init__(self, snap: dict | None, bucket_rates: dict | None = None):
        rows: list[Row] = []
        if snap is not None:
            for (name, field), oid in zip(SCALARS, SCALAR_OIDS):
                rows.append(Row(oid, UNSIGNED32, clamp(snap[field])))
            rows.append(Row(OBJECTS["astaireBandwidth"] + (SCOPE_PREVIOUS_5S,), GAUGE32, clamp(snap["bandwidth"])))
            rates = bucket_rates or {}
            for c in snap["connections"]:
                conn = address_index(c["address_type"], c["address"]) + (c["port"],)
                rows.append(Row(OBJECTS["astaireConnectionBucketsNeedingResync"] + conn, GAUGE32,
                                clamp(c["buckets_needing_resync"])))
                rows.append(Row(OBJECTS["astaireConnectionBucketsResynchronized"] + conn, GAUGE32,
                                clamp(c["buckets_resynchronized"])))
                for b in c["buckets"]:
                    idx = conn + (b["vbucket"],)
                    rows.append(Row(OBJECTS["astaireConnectionBucketEntriesResynchronized"] + idx, GAUGE32,
                                    clamp(b["entries"])))
                    rows.append(Row(OBJECTS["astaireConnectionBucketDataResynchronized"] + idx, GAUGE32,
                                    clamp(b["bytes"])))
                    rate = rates.get((c["address_type"], c["address"], c["port"], b["vbucket"]), 0.0)
                    rows.append(Row(OBJECTS["astaireConnectionBucketBandwidth"] + idx + (SCOPE_PREVIOUS_5S,),
                                    GAUGE32, clamp(rate)))
        rows.sort(key=lambda r: r.oid)
        # Two connections to the same server would collide; keep the first (cannot happen today).
        self.rows = [r for i, r in enumerate(rows) if i == 0 or rows[i - 1].oid != r.oid]
        self.oids = [r.oid for r in self.rows]
        self.up = snap is not None

    def get(self, oid: tuple[int, ...]) -> Row | None:
        i = bisect.bisect_left(self.oids, oid)
        if i < len(self.oids) and self.oids[i] == oid:
            return self.rows[i]
        return None

    def next(self, oid: tuple[int, ...]) -> Row | None:
        """The first instance after ``oid`` in lexicographic order, or None (end of the subtree)."""
        i = bisect.bisect_right(self.oids, oid)
        return self.rows[i] if i < len(self.rows) else None

    def is_known_object(self, oid: tuple[int, ...]) -> bool:
        """Whether ``oid`` names an instance of a readable object (for noSuchInstance vs noSuchObject)."""
        for name in READABLE:
            base = OBJECTS[name]
            if oid[:len(base)] == base and len(oid) > len(base):
                return True
        return False


STUB_DIR = os.path.join(os.path.dirname(MIB_FILE), "stubs")


def compile_mib() -> dict:
    """ASTAIRE-MIB compiled by pysmi (JSON code generator), offline: the base SMI modules
    are pysmi's stubs, INET-ADDRESS-MIB comes from ``stubs/``. Returns symbol -> definition."""
    import json

    from pysmi.codegen import JsonCodeGen
    from pysmi.compiler import MibCompiler
    from pysmi.parser import SmiStarParser
    from pysmi.reader import FileReader
    from pysmi.searcher import StubSearcher
    from pysmi.writer import CallbackWriter

    out: dict[str, str] = {}
    compiler = MibCompiler(SmiStarParser(), JsonCodeGen(),
                           CallbackWriter(lambda name, data, ctx: out.__setitem__(name, data)))
    compiler.add_sources(FileReader(os.path.dirname(MIB_FILE), recursive=False), FileReader(STUB_DIR, recursive=False))
    compiler.add_searchers(StubSearcher(*JsonCodeGen.baseMibs))
    status = compiler.compile("ASTAIRE-MIB", rebuild=True, genTexts=True)
    if status.get("ASTAIRE-MIB") != "compiled":
        raise ValueError(f"ASTAIRE-MIB did not compile: {status}")
    return json.loads(out["ASTAIRE-MIB"])


def check_against_mib(compiled: dict | None = None) -> list[str]:
    """Differences between this module's objects and the compiled MIB (empty: they agree)."""
    compiled = compile_mib() if compiled is None else compiled
    problems = []
    for name, oid in OBJECTS.items():
        node = compiled.get(name)
        if node is None:
            problems.append(f"{name} is not in ASTAIRE-MIB")
            continue
        if node["oid"] != ".".join(map(str, oid)):
            problems.append(f"{name}: agent {'.'.join(map(str, oid))}, MIB {node['oid']}")
        access = node.get("maxaccess")
        if name in READABLE:
            if access != "read-only":
                problems.append(f"{name}: readable in the agent, {access} in the MIB")
            if node["syntax"]["type"] != READABLE[name]:
                problems.append(f"{name}: {READABLE[name]} in the agent, {node['syntax']['type']} in the MIB")
        elif access not in (None, "not-accessible"):
            problems.append(f"{name}: not served by the agent but {access} in the MIB")
    for name, node in compiled.items():
        if node.get("class") == "objecttype" and node.get("maxaccess") == "read-only" and name not in READABLE:
            problems.append(f"{name} is readable in the MIB but not served by the agent")
    return problems
