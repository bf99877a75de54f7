"""Resync statistics in a shared-memory file, written by the supervisor only.

The file (meant for tmpfs, e.g. /run/astaire/astaire.stats) has a fixed layout, so any
process can read it without talking to the daemon: ``astaire wait-sync``, ``astaire
status``, an SNMP agent. Readers never see a half-written update: the writer bumps a
sequence counter to an odd number before it writes and to the next even number after
(a seqlock); a reader copies the file and retries if the counter was odd or moved.

Layout (little-endian, no padding), version 2:

    header  magic "ASTSTATS", version u32, total size u32, sequence u64
    body    see ``_BODY`` below: pid, state, geometry, heartbeat, the four MIB scalars,
            bandwidth, the settings digest the view is based on, the last resync, the
            condition flags (waiting for the local memcached, its CAS disabled, local node
            in neither server list) and the cluster settings file the daemon reads
    failed  bitmap of the last resync's failed vbuckets (vbucket_count bits)
    conns   ``max_connections`` slots of ``_CONN`` + vbucket ids (u16) + entries (u64)
            + bytes (u64), ``vbucket_count`` of each; the first ``connections`` are live

Counters follow the MIB's rules (docs/compatibility.md, "Statistics"): all 0 when no
resync runs; "buckets" count (vbucket, source) pairs.

Readers validate every count and offset against the file's size and say what is wrong
(``StatsUnavailable``); a damaged file never gives a traceback or a made-up number.
"""
from __future__ import annotations

import collections
import ipaddress
import mmap
import os
import struct
import time
from dataclasses import dataclass, field

MAGIC = b"ASTSTATS"
VERSION = 2

STATE_NAMES = {0: "idle", 1: "resyncing", 2: "stopped"}
STATE_IDLE, STATE_RESYNCING, STATE_STOPPED = 0, 1, 2
RESULT_NAMES = {0: None, 1: "ok", 2: "failed", 3: "refused"}
RESULT_CODES = {v: k for k, v in RESULT_NAMES.items()}

# Condition flags
FLAG_WAITING_FOR_LOCAL = 1      # the local memcached does not answer: work waits for it
FLAG_TARGET_CAS_DISABLED = 2    # the local memcached runs without CAS (-C): resyncs are refused
FLAG_LOCAL_NOT_IN_CLUSTER = 4   # the local node is in neither server list

# InetAddressType (RFC 4001), as the MIB's connection tables index by it.
ADDR_IPV4, ADDR_IPV6, ADDR_DNS = 1, 2, 16

_HEADER = struct.Struct("<8sIIQ")
_SEQ_OFFSET = 16
_BODY = struct.Struct(
    "<"
    "I"  # pid
    "I"  # state
    "I"  # vbucket_count
    "I"  # max_connections
    "I"  # workers
    "I"  # connections in use
    "d"  # heartbeat (time.time())
    "d"  # daemon started at
    "d"  # current resync started at (0 when idle)
    "I"  # current resync is full
    "Q"  # buckets needing resync
    "Q"  # buckets resynchronized
    "Q"  # entries resynchronized
    "Q"  # data resynchronized (bytes)
    "d"  # bandwidth over the previous 5 s, bytes/s
    "Q"  # resyncs completed since start
    "128s"  # settings digest the daemon's view is based on
    "64s"  # local node name
    "I"  # last resync result (0 none, 1 ok, 2 failed)
    "I"  # last resync was full
    "I"  # last resync failed vbucket count
    "d"  # last resync finished at
    "d"  # last resync duration, seconds
    "Q"  # last resync entries
    "Q"  # last resync bytes
    "I"  # condition flags (FLAG_*)
    "1024s"  # the cluster settings file the daemon reads
)
_CONN = struct.Struct("<IIIII64s")  # addr type, port, needing, resynced, vbucket count, address

MAX_VBUCKETS = 65536
MAX_CONNECTIONS = 4096


class StatsUnavailable(Exception):
    """No statistics file, or not one this version can read."""


def address_type(host: str) -> int:
    try:
        return ADDR_IPV6 if ipaddress.ip_address(host).version == 6 else ADDR_IPV4
    except ValueError:
        return ADDR_DNS


def _layout(vbucket_count: int, max_connections: int) -> tuple[int, int, int, int]:
    """(bitmap offset, first connection offset, connection slot size, total size)."""
    bitmap_at = _HEADER.size + _BODY.size
    conns_at = bitmap_at + (vbucket_count + 7) // 8
    slot = _CONN.size + vbucket_count * (2 + 8 + 8)
    return bitmap_at, conns_at, slot, conns_at + slot * max_connections


@dataclass
class Connection:
    """One stream in progress: a source server and the vbuckets it serves this round."""

    address: str
    port: int
    vbuckets: list[int]
    resynced: int = 0
    entries: dict[int, int] = field(default_factory=dict)
    bytes: dict[int, int] = field(default_factory=dict)


class Bandwidth:
    """Bytes per second over a sliding window (the MIB's "previous 5 s" scope)."""

    def __init__(self, window: float = 5.0):
        self.window = window
        self._samples: collections.deque[tuple[float, int]] = collections.deque()

    def add(self, nbytes: int, now: float | None = None) -> None:
        if nbytes:
            self._samples.append((time.monotonic() if now is None else now, nbytes))

    def rate(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        while self._samples and self._samples[0][0] <= now - self.window:
            self._samples.popleft()
        return sum(n for _, n in self._samples) / self.window

    def clear(self) -> None:
        self._samples.clear()


class StatsWriter:
    """The supervisor's side: set attributes, then ``publish()``.

    The file is built beside ``path`` and renamed into place, so a reader never opens a
    file shorter than its header says.
    """

    def __init__(self, path: str, vbucket_count: int = 128, max_connections: int = 16, pid: int | None = None):
        if not 0 < vbucket_count <= MAX_VBUCKETS:
            raise ValueError(f"vbucket_count out of range: {vbucket_count}")
        self.path = path
        self.vbucket_count = vbucket_count
        self.max_connections = max(1, max_connections)
        self.pid = os.getpid() if pid is None else pid
        self.started_at = time.time()
        self.state = STATE_IDLE
        self.workers = 0
        self.settings_digest = ""
        self.local_name = ""
        self.resync_started_at = 0.0
        self.resync_full = False
        self.buckets_needing = 0
        self.buckets_resynchronized = 0
        self.entries = 0
        self.bytes = 0
        self.resyncs_completed = 0
        self.bandwidth = Bandwidth()
        self.connections: dict[object, Connection] = {}
        self.last_resync: dict | None = None
        self.waiting_for_local = False
        self.target_cas_disabled = False
        self.local_in_cluster = True
        self.settings_file = ""
        self._seq = 0
        self._bitmap_at, self._conns_at, self._slot, size = _layout(vbucket_count, self.max_connections)
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd, size)
            self._mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        _HEADER.pack_into(self._mm, 0, MAGIC, VERSION, size, 0)
        self.publish()
        os.replace(tmp, path)

    def reset_counters(self) -> None:
        """Back to "no resync running": every MIB scalar and table is empty."""
        self.state = STATE_IDLE
        self.resync_started_at = 0.0
        self.resync_full = False
        self.buckets_needing = self.buckets_resynchronized = self.entries = self.bytes = 0
        self.connections.clear()
        self.bandwidth.clear()

    def publish(self) -> None:
        mm = self._mm
        self._seq += 1  # odd: readers retry
        struct.pack_into("<Q", mm, _SEQ_OFFSET, self._seq)
        last = self.last_resync or {}
        failed = [vb for vb in last.get("failed_vbuckets", ()) if 0 <= vb < self.vbucket_count]
        conns = list(self.connections.values())[: self.max_connections]
        _BODY.pack_into(
            mm, _HEADER.size,
            self.pid, self.state, self.vbucket_count, self.max_connections, self.workers, len(conns),
            time.time(), self.started_at, self.resync_started_at, int(self.resync_full),
            self.buckets_needing, self.buckets_resynchronized, self.entries, self.bytes,
            self.bandwidth.rate(), self.resyncs_completed,
            self.settings_digest.encode()[:128], self.local_name.encode()[:64],
            RESULT_CODES[last.get("result")], int(bool(last.get("full"))), len(failed),
            float(last.get("finished_at", 0.0)), float(last.get("seconds", 0.0)),
            int(last.get("entries", 0)), int(last.get("bytes", 0)),
            (FLAG_WAITING_FOR_LOCAL * self.waiting_for_local | FLAG_TARGET_CAS_DISABLED * self.target_cas_disabled
             | FLAG_LOCAL_NOT_IN_CLUSTER * (not self.local_in_cluster)),
            self.settings_file.encode()[:1024],
        )
        bitmap = bytearray((self.vbucket_count + 7) // 8)
        for vb in failed:
            bitmap[vb >> 3] |= 1 << (vb & 7)
        mm[self._bitmap_at:self._bitmap_at + len(bitmap)] = bytes(bitmap)
        vc = self.vbucket_count
        for i, c in enumerate(conns):
            at = self._conns_at + i * self._slot
            vbs = c.vbuckets[:vc]
            _CONN.pack_into(mm, at, address_type(c.address), c.port, len(c.vbuckets), c.resynced, len(vbs),
                            c.address.encode()[:64])
            at += _CONN.size
            struct.pack_into(f"<{len(vbs)}H", mm, at, *vbs)
            struct.pack_into(f"<{len(vbs)}Q", mm, at + 2 * vc, *(c.entries.get(vb, 0) for vb in vbs))
            struct.pack_into(f"<{len(vbs)}Q", mm, at + 10 * vc, *(c.bytes.get(vb, 0) for vb in vbs))
        self._seq += 1  # even: consistent again
        struct.pack_into("<Q", mm, _SEQ_OFFSET, self._seq)

    def close(self, remove: bool = True) -> None:
        """Stop publishing; the file goes (a reader then sees no daemon) unless ``remove`` is false."""
        if self._mm is None:
            return
        if not remove:
            self.reset_counters()
            self.state = STATE_STOPPED
            self.publish()
        self._mm.close()
        self._mm = None
        if remove:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


class StatsReader:
    """Anyone's side: ``snapshot()`` returns a consistent copy as a dict."""

    def __init__(self, path: str, retries: int = 2000):
        self.path = path
        self.retries = retries

    def _copy(self) -> bytes:
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            raise StatsUnavailable(f"no statistics file {self.path} (is astaire running?)") from None
        try:
            size = os.fstat(fd).st_size
            if size < _HEADER.size + _BODY.size:
                raise StatsUnavailable(f"{self.path} is not an astaire statistics file (too short)")
            with mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ) as mm:
                for _ in range(self.retries):
                    (seq1,) = struct.unpack_from("<Q", mm, _SEQ_OFFSET)
                    if not seq1 & 1:
                        data = mm[:]
                        (seq2,) = struct.unpack_from("<Q", mm, _SEQ_OFFSET)
                        if seq1 == seq2:
                            return data
                    time.sleep(0.0005)
        finally:
            os.close(fd)
        raise StatsUnavailable(f"{self.path}: no consistent read after {self.retries} tries")

    def snapshot(self) -> dict:
        """The statistics as a dict; StatsUnavailable (saying what is wrong) for a missing,
        foreign, truncated or damaged file."""
        data = self._copy()
        magic, version, size, seq = _HEADER.unpack_from(data, 0)
        if magic != MAGIC:
            raise StatsUnavailable(f"{self.path} is not an astaire statistics file (bad magic)")
        if version != VERSION:
            raise StatsUnavailable(f"{self.path} is a version {version} statistics file; this astaire reads "
                                   f"version {VERSION} (restart the daemon after an upgrade)")
        if size != len(data):
            raise StatsUnavailable(f"{self.path} is damaged: its header says {size} bytes, the file has {len(data)}")
        (pid, state, vc, max_conns, workers, nconns, heartbeat, started_at, resync_started_at, resync_full,
         needing, resynced, entries, nbytes, bandwidth, resyncs, digest, local, last_result, last_full,
         last_nfailed, last_finished, last_seconds, last_entries, last_bytes, flags,
         settings_file) = _BODY.unpack_from(data, _HEADER.size)
        problems = []
        if not 0 < vc <= MAX_VBUCKETS:
            problems.append(f"vbucket count {vc}")
        if not 0 < max_conns <= MAX_CONNECTIONS:
            problems.append(f"connection slots {max_conns}")
        if not problems and _layout(vc, max_conns)[3] != len(data):
            problems.append(f"geometry ({vc} vbuckets, {max_conns} slots) does not fit {len(data)} bytes")
        if nconns > max_conns:
            problems.append(f"{nconns} connections in {max_conns} slots")
        if state not in STATE_NAMES or last_result not in RESULT_NAMES:
            problems.append(f"state {state} / result {last_result}")
        if last_nfailed > vc:
            problems.append(f"{last_nfailed} failed vbuckets of {vc}")
        if problems:
            raise StatsUnavailable(f"{self.path} is damaged: " + "; ".join(problems))
        bitmap_at, conns_at, slot, _ = _layout(vc, max_conns)
        failed = [vb for vb in range(vc) if data[bitmap_at + (vb >> 3)] >> (vb & 7) & 1]
        connections = []
        for i in range(nconns):
            at = conns_at + i * slot
            atype, port, c_needing, c_resynced, nvb, addr = _CONN.unpack_from(data, at)
            if nvb > vc or port > 65535 or atype not in (ADDR_IPV4, ADDR_IPV6, ADDR_DNS):
                raise StatsUnavailable(f"{self.path} is damaged: connection {i} has {nvb} vbuckets, "
                                       f"port {port}, address type {atype}")
            at += _CONN.size
            vbs = struct.unpack_from(f"<{nvb}H", data, at)
            ents = struct.unpack_from(f"<{nvb}Q", data, at + 2 * vc)
            byts = struct.unpack_from(f"<{nvb}Q", data, at + 10 * vc)
            connections.append({
                "address_type": atype,
                "address": addr.rstrip(b"\0").decode(errors="replace"),
                "port": port,
                "buckets_needing_resync": c_needing,
                "buckets_resynchronized": c_resynced,
                "buckets": [{"vbucket": vb, "entries": e, "bytes": b} for vb, e, b in zip(vbs, ents, byts)],
            })
        return {
            "pid": pid,
            "state": STATE_NAMES.get(state, "unknown"),
            "sequence": seq,
            "vbuckets": vc,
            "workers": workers,
            "local_name": local.rstrip(b"\0").decode(errors="replace"),
            "heartbeat": heartbeat,
            "started_at": started_at,
            "resync_started_at": resync_started_at or None,
            "resync_full": bool(resync_full),
            "settings_digest": digest.rstrip(b"\0").decode(errors="replace"),
            "buckets_needing_resync": needing,
            "buckets_resynchronized": resynced,
            "entries_resynchronized": entries,
            "data_resynchronized": nbytes,
            "bandwidth": bandwidth,
            "resyncs_completed": resyncs,
            "connections": connections,
            "last_resync": {
                "result": RESULT_NAMES.get(last_result),
                "full": bool(last_full),
                "failed_vbuckets": failed,
                "finished_at": last_finished or None,
                "seconds": last_seconds,
                "entries": last_entries,
                "bytes": last_bytes,
            },
            "waiting_for_local": bool(flags & FLAG_WAITING_FOR_LOCAL),
            "target_cas_disabled": bool(flags & FLAG_TARGET_CAS_DISABLED),
            "local_in_cluster": not flags & FLAG_LOCAL_NOT_IN_CLUSTER,
            "settings_file": settings_file.rstrip(b"\0").decode(errors="replace"),
        }
