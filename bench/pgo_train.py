#!/usr/bin/env python3
"""The training run of the codec's profile-guided build (``setup.py``, ``ASTAIRE_PGO``).

It drives the compiled Writer in this process, with no socket and no server, through the
paths a resync spends its CPU on, in the shapes the benchmark and a real resize give them:

  * two crawler streams of one resize, one after the other, sharing a settled table: the
    listing (parse, MD5 lanes, vbucket filter), the meta gets, their answers, the writes
    and the fences; the second stream meets the first one's notes, so its copies take the
    flags-only fetch and are kept on the note, as a daemon's second stream's mostly are;
  * a listing of keys no vbucket wants;
  * a TAP stream through the Writer and the frame filter.

gcc records which branches these take and lays the code out for them; paths the run does
not reach are compiled as without a profile (``-fprofile-partial-training``). The answers
follow docs/compatibility.md: ``VA <len> f<flags> t<ttl> O<n>`` and the value for a full
fetch, ``HD f<flags> O<n>`` for a flags-only one, ``MN`` closing each batch; the target
acknowledges only the fences (binary NOOP), as stock memcached does for quiet ADDs that
succeed.

    python bench/pgo_train.py [--records 120000]

It needs only the standard library and the compiled ``astaire._tap`` and ``astaire._writer``
(it fails if they are not compiled), since it runs inside the build.
"""
from __future__ import annotations

import argparse
import mmap
import sys
import time

from astaire import _tap, _writer

VALUE = b"v" * 100
FLAGS = 1593835521
FENCE_REQUEST = bytes([0x80, 0x0A]) + bytes(10)  # a binary NOOP request: no key, no extras, vbucket 0


def metadump_text(n: int, exp: int) -> bytes:
    """A 1.6.18 ``lru_crawler metadump hash`` listing of MemcachedStore-shaped keys."""
    return b"".join(b"key=table%%5C%%5Ckey-%d exp=%d la=1700000000 cas=%d fetch=no cls=1 size=160\n"
                    % (i, exp, i + 1) for i in range(n)) + b"END\r\n"


def fetch_answers(requests: bytes) -> bytes:
    """A source's answers to the Writer's meta gets: every key found, with the same flags."""
    out = []
    for line in requests.split(b"\r\n"):
        if line.startswith(b"mg "):
            tokens = line.split(b" ")
            opaque = tokens[-1]
            if b"v" in tokens:
                out.append(b"VA %d f%d t-1 %s\r\n%s\r\n" % (len(VALUE), FLAGS, opaque, VALUE))
            else:
                out.append(b"HD f%d %s\r\n" % (FLAGS, opaque))
        elif line == b"mn":
            out.append(b"MN\r\n")
    return b"".join(out)


def fence_answers(out: bytes, seq: int) -> tuple[bytes, int]:
    """The target's NOOP responses to the fences in ``out`` (opaques count up from 0x80000000)."""
    count = out.count(FENCE_REQUEST)
    answers = b"".join(bytes([0x81, 0x0A]) + bytes(10) + (0x80000000 | (seq + i)).to_bytes(4, "big") + bytes(8)
                       for i in range(count))
    return answers, seq + count


def crawler_stream(text: bytes, wanted: list[int], table: mmap.mmap, hold_bit: int, window: int = 4096,
                   chunk: int = 128 * 1024) -> dict:
    w = _writer.Writer(wanted, window=window, settled=table, generation=1,
                       hold=[(vb, (vb & 1) ^ hold_bit) for vb in wanted])
    pos = seq = 0
    while not w.done:
        if pos < len(text) and w.fetch_backlog < window and w.backlog < window:
            w.feed_metadump(text[pos:pos + chunk])
            pos += chunk
        requests = w.fetch_requests()
        if requests:
            w.feed_fetch(fetch_answers(requests))
        acks, seq = fence_answers(w.target_requests(), seq)
        w.feed_target(acks)
    return w.stats()


def tap_stream(n: int, window: int = 4096, chunk: int = 256 * 1024) -> None:
    data = b"".join(_tap.encode_tap_mutation(b"table\\\\key-%d" % i, VALUE, FLAGS + i, 0, i + 1)
                    for i in range(n))
    _tap.filter_count(data, range(0, 128, 2))
    w = _writer.Writer(range(128), window=window)
    seq = 0
    for pos in range(0, len(data), chunk):
        w.feed_tap(data[pos:pos + chunk])
        while True:
            acks, seq = fence_answers(w.target_requests(), seq)
            w.feed_target(acks)
            if w.backlog < window:
                break
    w.finish()
    while not w.done:
        acks, seq = fence_answers(w.target_requests(), seq)
        w.feed_target(acks)
    if w.added != n:
        raise SystemExit(f"pgo_train: the TAP stream added {w.added} of {n} records")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=120_000, help="keys listed by each crawler stream")
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    text = metadump_text(args.records, int(time.time()) + 3600)
    wanted = [vb for vb in range(128) if vb % 3]  # two vbuckets in three, as in a 2 -> 3 resize
    table = mmap.mmap(-1, (1 << 18) * 16)
    first = crawler_stream(text, wanted, table, 0)
    second = crawler_stream(text, wanted, table, 1)
    if not first["added"] or not second["kept"]:
        raise SystemExit(f"pgo_train: the crawler streams did not take their paths: {first} / {second}")
    nobody = _writer.Writer([], window=4096)
    for pos in range(0, len(text), 128 * 1024):
        nobody.feed_metadump(text[pos:pos + 128 * 1024])
    tap_stream(args.records // 2)
    print(f"pgo_train: {args.records} keys listed twice, {first['added']} added, {second['kept']} kept by the "
          f"second stream, a TAP stream of {args.records // 2}, in {time.monotonic() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
