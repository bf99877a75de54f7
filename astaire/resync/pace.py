"""Pacing: the TAP streams of a resync keep within ``LEAD`` records of one another.

Each vbucket is streamed from both of its old replicas, and the settled table
(``astaire.resync.settled``) lets the second copy of a record be kept without asking the
target, but only while the first copy's note is still in the table. The table is
2 MiB, a note lasting until two later notes land in its bucket (roughly the last hundred
thousand records settled), so a note survives only while the other stream is close behind. The two replicas dump their
records in much the same order, but nothing kept their streams in step: one source often
ran ahead by most of the resync (in a 1M x 100 B run, one stream had placed 601k records
when it ended and the other 55k). The lagging stream then found its records present but no
longer noted, turned to reading first, and read back each record, value and all, from the
target. On the Clearwater fork, which writes every answer on its own, that is about 7 us
of the target's CPU per record.

So a TAP stream with a pace slot publishes how many records it has taken from its source
(``Writer.entries``), and stops reading its source while it is more than ``LEAD`` records
ahead of the slowest other stream of the same resync that is still moving. It keeps
serving the target meanwhile (its fences and answers), and looks again after ``NAP``
seconds. The slowest stream is never held, so the streams cannot wait for one another in a
circle. A stream whose count has not grown for ``STALL`` seconds is not waited for (its
source is slow or dead, or it waits for its own target): pacing only ever costs a delay of
that order, and a stream that ends, or fails, clears its slot.

Pacing changes when records reach the target, never which or how: the conflict rule's
outcome does not depend on the order of arrival. It is a cost measure, so it is simple:
streams are compared by records taken, not by their position in the source's dump, and
only the first ``SLOTS`` streams of a resync (by stream id) take part.

The slots are one 64-bit word each, in anonymous shared memory that the supervisor creates
with the settled table (before it forks the workers) and clears with it for every resync:
bits 63-56 the resync's generation, bits 55-0 the count plus one (0: the slot is free).
"""
from __future__ import annotations

import time

SLOTS = 64          # streams of one resync that pace one another (stream id modulo SLOTS)
SLOT_BYTES = 8
LEAD = 8192         # records a stream may be ahead of the slowest moving stream
STEP = 0.01         # s: the longest a pacing stream reads its source before it looks again
NAP = 0.002         # s: how long a stream that is ahead waits before it looks again
STALL = 0.25        # s: a stream whose count has not grown for this long is not waited for

_COUNT_MASK = (1 << 56) - 1


class Pacer:
    """One stream's view of the pace slots: ``words`` is the shared array (a memoryview of
    unsigned 64-bit words), ``slot`` this stream's own, ``generation`` its resync's (1-255)."""

    def __init__(self, words, slot: int, generation: int, lead: int = LEAD, stall: float = STALL,
                 clock=time.monotonic):
        if not 0 <= slot < len(words):
            raise ValueError(f"pace slot {slot} is not in 0..{len(words) - 1}")
        if not 1 <= generation <= 255:
            raise ValueError(f"generation {generation} is not in 1..255")
        self.words = words
        self.slot = slot
        self.tag = generation << 56
        self.lead = lead
        self.stall = stall
        self.clock = clock
        self.seen: dict[int, tuple[int, float]] = {}   # slot -> (count, when it was last seen to change)
        self.paced_seconds = 0.0   # time this stream spent not reading its source, waiting for another
        self.pauses = 0

    def publish(self, count: int) -> None:
        self.words[self.slot] = self.tag | (min(count, _COUNT_MASK - 1) + 1)

    def close(self) -> None:
        """Free the slot (the stream ended): nobody waits for it any more."""
        if self.words[self.slot] >> 56 == self.tag >> 56:
            self.words[self.slot] = 0

    def slowest(self) -> int | None:
        """The smallest count among the other streams of this resync that are still moving,
        or None when there is none."""
        now = self.clock()
        lowest = None
        gen = self.tag >> 56
        for i in range(len(self.words)):
            word = self.words[i]
            if i == self.slot or word == 0 or word >> 56 != gen:
                self.seen.pop(i, None)
                continue
            count = (word & _COUNT_MASK) - 1
            last = self.seen.get(i)
            if last is None or last[0] != count:
                self.seen[i] = (count, now)
            elif now - last[1] > self.stall:
                continue   # not moving: not waited for
            if lowest is None or count < lowest:
                lowest = count
        return lowest

    def allowance(self, count: int) -> int:
        """How many more records this stream, at ``count``, may take before it must wait
        (0 or less: wait now). It publishes ``count`` first."""
        self.publish(count)
        lowest = self.slowest()
        return self.lead if lowest is None else lowest + self.lead - count
