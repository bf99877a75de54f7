"""The settled table: what the local memcached was seen holding during this resync, shared by
every stream of the daemon.

Each vbucket is streamed from every old replica, so a record usually arrives twice. Without
this table the second copy costs the target a write that fails and a read of the first copy
(on the Clearwater fork, which answers every request on its own, two answers), and the
Writer a round of the conflict rule, only to keep what is there. Instead, when a record
settles in the target (added, replaced by CAS, or kept because the local copy is not older),
the Writer notes the key and the flags the target then held; a copy of that key arriving
later in the same resync with flags that are not newer is settled as kept without touching
the target. A copy that raced the first (both sent before either settled) meets the note
one step later: when its ADD comes back "present", or its CAS replace of an older local copy
comes back "exists" (the other copy replaced it first), and the key is noted by then with
flags not older, it is settled as kept without reading the local copy back (GETK, value and
all).
Such copies are counted in ``kept`` and in ``deduplicated``.

Why the outcome is the conflict rule's: the rule's result does not depend on the order in
which copies arrive, and at the moment of the note the target held flags F with
``int32(F - R.flags) >= 0``. Processing R right then would have kept the local copy, and
anything clients did to the key since (a write, a delete, an eviction) is concurrent with the
resync and could as well have come after R. A note is only trusted within the resync that
made it: every resync (a full resync after a restart of the local memcached included) takes a
new generation, and the table is cleared when it starts. Notes are never needed for
correctness: a note overwritten, or missing, means the target is asked, as without the table.

Layout (the Writer reads and writes it from C, each word whole: atomic on 64-bit machines):
``ENTRIES`` entries of two 64-bit words, in buckets of two entries (32 bytes), the bucket
indexed by the low bits of a 64-bit hash of the key (``codec.key_hash64``):
  word 0: the hash;
  word 1: bits 63-40 the hash's low 24 bits again, 39-32 the generation, 31-0 the flags.
A note matches a key only if word 0 equals the key's hash and word 1 repeats its low bits and
the generation: two different keys are confused only if their 64-bit hashes are equal, and an
entry torn by two writers at once does not match (its two words disagree). A bucket holds its
newer note first: a key's note replaces its older note where that is, and otherwise the first
entry moves to the second (whose note goes) and the new note takes the first. A note is
needed until the other old replica's copy arrives, so what counts is how long a note lives:
with one entry per index (until December 2026) a note was lost once any later note took its
index, with two only once two have (at 1M x 100 B over the Clearwater fork, with the streams
paced, 93-94% of the second copies were still noted against 98.8-99.2% with two; with one,
it took a table eight times as large, 16 MiB, made resident in every worker).

The supervisor creates the table (anonymous shared memory) before it forks the workers, who
inherit it; ``StreamJob.settled_generation`` tells a stream which generation to use (0: no
table, as for streams run outside the daemon). Beside it, in memory of its own, are the pace
slots of ``astaire.resync.pace``, cleared with it.
"""
from __future__ import annotations

import mmap

from astaire.resync import pace

ENTRIES = 1 << 17   # 2 MiB, buckets of two entries: notes for the last ~100,000 records settled
ENTRY_BYTES = 16

_table: "SettledTable | None" = None


class SettledTable:
    def __init__(self, entries: int = ENTRIES):
        if entries < 2 or entries & (entries - 1):
            raise ValueError(f"entries must be a power of two, at least 2, not {entries}")
        self.buffer = mmap.mmap(-1, entries * ENTRY_BYTES)  # anonymous, MAP_SHARED: workers forked later share it
        self._pace = mmap.mmap(-1, pace.SLOTS * pace.SLOT_BYTES)
        self.pace_words = memoryview(self._pace).cast("Q")   # the streams' pace slots
        self.generation = 0

    def next_generation(self) -> int:
        """Clear the table and return the generation for a new resync (1..255, cycling)."""
        try:
            # Gives the pages back (they read as zeros again): the supervisor, which never
            # reads the table, does not make it resident by clearing it.
            self.buffer.madvise(mmap.MADV_REMOVE)
        except (AttributeError, OSError):
            self.buffer[:] = bytes(len(self.buffer))
        self._pace[:] = bytes(len(self._pace))
        self.generation = self.generation % 255 + 1
        return self.generation


def create() -> SettledTable:
    """The daemon's table (the supervisor calls this before forking any worker)."""
    global _table
    if _table is None:
        _table = SettledTable()
    return _table


def shared() -> SettledTable | None:
    """The table inherited from the supervisor, if there is one."""
    return _table
