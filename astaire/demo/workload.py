"""MemcachedStore-shaped records: generate, load onto a cluster, check where they ended up.

Used by ``astaire demo``, the benchmark and the end-to-end tests. Records are written the
way Project Clearwater's MemcachedStore writes them: key ``table\\\\key``, item flags = the
low 32 bits of the write time in milliseconds, absolute expiry, one copy on each replica of
the key's vbucket. Nothing makes a round trip per record.

Loading uses the binary protocol (``astaire.client``), exact flags and expiry per record,
and works on any server, the Clearwater fork included. The placement check needs stock
memcached (it lists keys with ``lru_crawler metadump``, which the fork lacks) and reads
the records back over the text protocol with pymemcache's multi-key ``get``; it never asks
for ``stats``, whose text form crashes the fork (docs/compatibility.md).
"""
from __future__ import annotations

import random
import socket
import time
import urllib.parse
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from pymemcache.client.base import Client as TextClient

from astaire import codec
from astaire.client import BinaryClient
from astaire.cluster.settings import parse_server
from astaire.cluster.view import ClusterView, vbucket_for_key
from astaire.resync.source import (ANSWER_BUSY, ANSWER_FALL_BACK, ANSWER_LISTING, ANSWER_REFUSED, METADUMP_ALL,
                                   METADUMP_HASH, metadump_answer)

BATCH = 2000


@dataclass(frozen=True)
class Record:
    key: bytes
    value: bytes
    flags: int
    expiration: int


def make_records(count: int, value_size: int = 100, table: str = "demo", seed: int = 1,
                 now_ms: int | None = None, ttl: int = 3600) -> Iterator[Record]:
    """``count`` records with keys ``table\\\\key-N``, values of ``value_size`` bytes."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    expiration = int(time.time()) + ttl if ttl else 0
    rng = random.Random(seed)
    filler = bytes(rng.randrange(33, 127) for _ in range(max(value_size, 1) + 64))
    prefix = table.encode() + b"\\\\"
    for n in range(count):
        key = prefix + b"key-%d" % n
        start = n % 64
        value = filler[start:start + value_size]
        yield Record(key, value, (now_ms - n) & 0xFFFFFFFF, expiration)


def _batches(items: Iterable, size: int = BATCH) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def load(view: ClusterView, records: Iterable[Record]) -> int:
    """Write each record to every replica of its vbucket in ``view`` (current replicas)."""
    clients = {name: BinaryClient(name) for name in dict.fromkeys(n for replicas in view.write for n in replicas)}
    count = 0
    try:
        for batch in _batches(records):
            out: dict[str, list] = {name: [] for name in clients}
            for r in batch:
                for name in view.write[vbucket_for_key(r.key, view.vbuckets)]:
                    out[name].append((codec.OP_SETQ, r.key, r.value, r.flags, r.expiration, 0, 0))
            for name, reqs in out.items():
                if reqs:
                    errors = clients[name].round_trip(codec.encode_batch(reqs))
                    if errors:
                        raise RuntimeError(f"{name}: SET failed with status {errors[0].status}")
            count += len(batch)
    finally:
        for c in clients.values():
            c.close()
    return count


class _ValueAndFlags:
    """pymemcache serde that hands back what the server holds: ``(value bytes, item flags)``."""

    def serialize(self, key, value):  # loading goes through the binary client, never here
        raise TypeError("the workload's text client only reads")

    def deserialize(self, key, value, flags):
        return value, flags


# Keys per text ``get`` in ``fetch``. The Clearwater fork, built with its assertions on,
# takes a buffer per key of a ``get`` from a cache whose every alloc and free scans the free
# list: a get of n keys costs it n^2. Fetching 656k records of 100 bytes took it 4.8-5.3 s
# of CPU at 2000 keys a get, 1.3 s at 200 (and 4.1-4.3 s instead of 5.2-5.7 s in all).
# Stock memcached does not care.
FETCH_BATCH = 200


def fetch(name: str, keys: list[bytes], timeout: float = 60.0) -> dict[bytes, tuple[bytes, int]]:
    """key -> (value, flags) for the keys ``name`` holds: one text ``get`` of many keys per
    batch (pymemcache), so no per-record round trip; stock memcached or the Clearwater fork."""
    client = TextClient(parse_server(name), serde=_ValueAndFlags(), connect_timeout=timeout, timeout=timeout)
    try:
        found: dict[bytes, tuple[bytes, int]] = {}
        for batch in _batches(keys, FETCH_BATCH):
            found.update(client.get_many(batch))
        return found
    finally:
        client.close()


def metadump(name: str, timeout: float = 60.0) -> dict[bytes, int]:
    """key -> absolute expiry (0 = never) of every item ``name`` holds (lru_crawler).

    ``lru_crawler metadump hash`` walks the hash table and lists every item, as Astaire's
    crawler source does. ``all`` walks the LRUs and can miss items that memcached's LRU
    maintainer moves between segments during the walk (right after a bulk load it is busy: a
    placement check then reported copies "missing" that the server held); it is used only
    where ``hash`` is refused. A server with no crawler (the Clearwater fork) is an error."""
    host, port = parse_server(name)
    result: dict[bytes, int] = {}
    deadline = time.monotonic() + timeout
    command = METADUMP_HASH
    with socket.create_connection((host, port), timeout=timeout) as s:
        while True:
            s.sendall(command)
            buf = b""
            answer = None
            while True:
                data = s.recv(1 << 18)
                if not data:
                    raise ConnectionError(f"{name} closed the connection during metadump")
                buf += data
                if answer is None and b"\n" in buf:  # the first line says what the answer is
                    first = buf[:buf.index(b"\n")].rstrip(b"\r")
                    answer = metadump_answer(command, first)
                    if answer != ANSWER_LISTING:
                        break
                if buf.endswith(b"END\r\n"):
                    break
            if answer == ANSWER_FALL_BACK:
                command = METADUMP_ALL
                continue
            if answer == ANSWER_REFUSED:
                raise ConnectionError(f"{name} cannot list its items: lru_crawler metadump answered "
                                      f"{first.decode('ascii', 'replace')!r}")
            if answer == ANSWER_BUSY:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{name}: lru_crawler stayed busy")
                time.sleep(0.1)
                continue
            break
    for line in buf.split(b"\n"):  # metadump lines end in "\n", END in "\r\n"
        line = line.rstrip(b"\r")
        if not line.startswith(b"key="):
            continue
        fields = dict(f.split(b"=", 1) for f in line.split(b" ") if b"=" in f)
        key = urllib.parse.unquote_to_bytes(fields[b"key"])
        exp = int(fields[b"exp"])
        result[key] = 0 if exp < 0 else exp
    return result


@dataclass
class PlacementReport:
    checked: int
    missing: list            # (server, key) expected but absent
    wrong: list              # (server, key, why)
    misplaced: list          # (server, key) present on a server that should not hold it

    @property
    def ok(self) -> bool:
        return not (self.missing or self.wrong or self.misplaced)


def check_placement(records: list[Record], expected: dict[str, set[bytes]], servers: list[str],
                    compare_expiry: bool = True, limit: int = 20) -> PlacementReport:
    """Every server holds exactly the keys in ``expected[server]`` with the records' value, flags and expiry."""
    by_key = {r.key: r for r in records}
    report = PlacementReport(0, [], [], [])
    for name in servers:
        want = expected.get(name, set())
        present = metadump(name)
        ours = {k for k in present if k in by_key}
        for key in sorted(ours - want)[:limit]:
            report.misplaced.append((name, key))
        for key in sorted(want - ours)[:limit]:
            report.missing.append((name, key))
        held = fetch(name, sorted(want & ours))
        for key, (value, flags) in held.items():
            r = by_key[key]
            report.checked += 1
            if value != r.value or flags != r.flags:
                report.wrong.append((name, key, "value/flags differ"))
            elif compare_expiry and present[key] != r.expiration:
                report.wrong.append((name, key, f"expiry {present[key]} != {r.expiration}"))
    return report


def expected_holders(records: list[Record], before: ClusterView, after: ClusterView,
                     copied_to: Iterable[str]) -> dict[str, set[bytes]]:
    """Which keys each server should hold after the nodes in ``copied_to`` resynchronised.

    Old replicas keep what they had (Astaire never deletes); a resynchronised node also holds
    every record of each vbucket it owns in ``after``.
    """
    copied_to = set(copied_to)
    result: dict[str, set[bytes]] = {}
    for r in records:
        vb = vbucket_for_key(r.key, before.vbuckets)
        holders = set(before.write[vb])
        holders |= {s for s in after.owners(vb) if s in copied_to}
        for s in holders:
            result.setdefault(s, set()).add(r.key)
    return result


def quote_key(key: bytes) -> str:
    return urllib.parse.quote_from_bytes(key, safe="")
