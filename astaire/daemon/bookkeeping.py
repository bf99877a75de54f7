"""The bookkeeping of one resync, apart from any I/O: which streams wait, which run, and
what the statistics count.

Counting of streams redone after a worker died: entries and bytes are counted live from
the workers' progress messages (so wait-sync and status see them move); each stream
remembers what it reported, and when its worker dies that amount is subtracted before the
stream is queued again. A stream's final result replaces its live counts, and buckets
resynchronized grows only when a stream returns ok.
"""
from __future__ import annotations

import collections
import itertools
import time
from dataclasses import dataclass, field

from astaire.cluster.worklist import Worklist

MAX_STREAM_ATTEMPTS = 3   # a stream whose worker dies this often counts as a failed source


@dataclass
class Stream:
    id: int
    server: str
    vbuckets: list[int]
    worker: int | None = None               # pid of the worker running it
    reported: dict[int, list[int]] = field(default_factory=dict)  # vb -> [entries, bytes] so far
    attempts: int = 0

    def totals(self) -> tuple[int, int]:
        return sum(e for e, _ in self.reported.values()), sum(b for _, b in self.reported.values())


class Resync:
    """One resync: its pass over the sources, the streams waiting and running, the counters."""

    def __init__(self, worklist: Worklist, full: bool, ids=None):
        self.worklist = worklist
        self.full = full
        self.pending: collections.deque[Stream] = collections.deque()
        self.running: dict[int, Stream] = {}
        self.superseded = False       # a newer request replaces it once running streams end
        self.watch_tag = False        # the tag was there at the start: a loss means a restart
        self.identity: tuple | None = None  # the local memcached's (pid, start) when it began
        self.finishing = False        # every stream ended: the local memcached is checked, then done
        self.finish_asked = False
        self.started = time.monotonic()
        self.started_at = time.time()
        self.resynchronized = 0
        self.entries = 0
        self.bytes = 0
        self.streams = 0  # streams queued (one per source server)
        self.settled_generation = 0   # this resync's generation in the settled table (astaire.resync.settled)
        self._ids = ids if ids is not None else itertools.count(1)

    @property
    def needing(self) -> int:
        return self.worklist.needing

    def start(self) -> bool:
        """Queue the pass: one stream per source server; False when there is nothing (more)."""
        groups = self.worklist.streams()
        if not groups:
            return False
        for server, vbuckets in groups.items():
            self.pending.append(Stream(next(self._ids), server, list(vbuckets)))
            self.streams += 1
        return True

    def take(self, pid: int) -> Stream | None:
        if self.superseded or not self.pending:
            return None
        s = self.pending.popleft()
        s.worker = pid
        self.running[s.id] = s
        return s

    def progress(self, stream: Stream, delta: dict) -> tuple[int, int]:
        entries = nbytes = 0
        for vb, (e, b) in delta.items():
            counts = stream.reported.setdefault(int(vb), [0, 0])
            counts[0] += e
            counts[1] += b
            entries += e
            nbytes += b
        self.entries += entries
        self.bytes += nbytes
        return entries, nbytes

    def finished(self, stream: Stream, ok: bool, counts: dict) -> tuple[int, int]:
        """The stream's result: its final counts replace what it reported; returns the bytes
        and entries that were not reported before (for the bandwidth)."""
        self.running.pop(stream.id, None)
        e0, b0 = stream.totals()
        stream.reported = {int(vb): [int(e), int(b)] for vb, (e, b) in counts.items()} if counts else stream.reported
        e1, b1 = stream.totals()
        self.entries += e1 - e0
        self.bytes += b1 - b0
        if ok:
            self.worklist.stream_succeeded(stream.server, stream.vbuckets)
            self.resynchronized += len(stream.vbuckets)
        else:
            self.worklist.server_failed(stream.server)
        return e1 - e0, b1 - b0

    def requeue(self, stream: Stream) -> None:
        """Forget what ``stream`` reported and queue it again, first. The source is not
        blamed (its worker died, or the target failed)."""
        self.running.pop(stream.id, None)
        entries, nbytes = stream.totals()
        self.entries -= entries
        self.bytes -= nbytes
        stream.reported = {}
        stream.worker = None
        self.pending.appendleft(stream)

    def worker_lost(self, stream: Stream) -> bool:
        """Its worker died: queue it again, or give up on the source after
        MAX_STREAM_ATTEMPTS. Returns True when it was queued again."""
        self.requeue(stream)
        stream.attempts += 1
        if stream.attempts >= MAX_STREAM_ATTEMPTS:
            self.pending.remove(stream)
            self.worklist.server_failed(stream.server)
            return False
        return True


def ranges(vbuckets: list[int]) -> str:
    """[1, 2, 3, 7] -> "1-3,7"."""
    out, start, prev = [], None, None
    for vb in vbuckets:
        if start is None:
            start = prev = vb
        elif vb == prev + 1:
            prev = vb
        else:
            out.append(f"{start}-{prev}" if prev != start else str(start))
            start = prev = vb
    if start is not None:
        out.append(f"{start}-{prev}" if prev != start else str(start))
    return ",".join(out)
