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

# The synthetic protocol below is shared with bench/codec_bench.py, which imports it from here:
# this module must stay importable in the build (standard library only at import time).
VALUE = b"v" * 100
FLAGS = 1593835521
FENCE_PREFIX = bytes([0x80, 0x0A]) + bytes(10)  # a request NOOP: no key, no extras, vbucket 0, no body


def metadump_text(n: int, exp: bytes = b"-1") -> bytes:
    """A 1.6.18 ``lru_crawler metadump hash`` listing of MemcachedStore-shaped keys."""
    return b"".join(b"key=table%%5C%%5Ckey-%d exp=%s la=1700000000 cas=%d fetch=no cls=1 size=160\n" % (i, exp, i + 1)
                    for i in range(n)) + b"END\r\n"


def fetch_answers(req: bytes) -> bytes:
    """The source's answers to the Writer's meta gets (batches closed by ``mn``): every key
    found, flags 0x5f000001, no expiry; ``VA`` and the value for ``mg <key> v f t q O<n>``,
    ``HD`` for a flags-only ``mg <key> f q O<n>``."""
    out = []
    for line in req.split(b"\r\n"):
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


def fence_answers(out: bytes, first_seq: int) -> tuple[bytes, int]:
    """NOOP responses for the fences in ``out`` (fence opaques count up from 0x80000000)."""
    count = out.count(FENCE_PREFIX)
    answers = b"".join(bytes([0x81, 0x0A]) + bytes(10) + (0x80000000 | (first_seq + i)).to_bytes(4, "big")
                       + bytes(8) for i in range(count))
    return answers, first_seq + count


def run_writer(mod, data, n, window=4096, chunk=256 * 1024):
    """A TAP stream ``data`` of ``n`` records through ``mod.Writer`` into a target that
    acknowledges the fences; the bytes the Writer sent."""
    w = mod.Writer(range(128), window=window)
    seq = 0
    sent = 0
    for pos in range(0, len(data), chunk):
        w.feed_tap(data[pos:pos + chunk])
        while True:  # flow control: settle down below the window before reading more
            out = w.target_requests()
            sent += len(out)
            answers, seq = fence_answers(out, seq)
            w.feed_target(answers)
            if w.backlog < window:
                break
    w.finish()
    while not w.done:
        out = w.target_requests()
        sent += len(out)
        answers, seq = fence_answers(out, seq)
        w.feed_target(answers)
    assert w.added == n and w.entries == n, w.stats()
    return sent


def crawler_stream(writer_class, text: bytes, wanted: list[int], table: mmap.mmap, hold_bit: int,
                   window: int = 4096, chunk: int = 128 * 1024) -> dict:
    """One crawler stream of a daemon over the listing ``text``, with the settled ``table``
    and the hold on the vbuckets whose low bit is not ``hold_bit``; the Writer's stats."""
    w = writer_class(wanted, window=window, settled=table, generation=1,
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=120_000, help="keys listed by each crawler stream")
    args = ap.parse_args(argv)
    from astaire import _tap, _writer  # the compiled build, or ImportError: nothing to train

    t0 = time.monotonic()
    text = metadump_text(args.records, b"%d" % (int(time.time()) + 3600))
    wanted = [vb for vb in range(128) if vb % 3]  # two vbuckets in three, as in a 2 -> 3 resize
    table = mmap.mmap(-1, (1 << 18) * 16)
    first = crawler_stream(_writer.Writer, text, wanted, table, 0)
    second = crawler_stream(_writer.Writer, text, wanted, table, 1)
    if not first["added"] or not second["kept"]:
        raise SystemExit(f"pgo_train: the crawler streams did not take their paths: {first} / {second}")
    nobody = _writer.Writer([], window=4096)
    for pos in range(0, len(text), 128 * 1024):
        nobody.feed_metadump(text[pos:pos + 128 * 1024])
    n = args.records // 2
    data = b"".join(_tap.encode_tap_mutation(b"table\\\\key-%d" % i, VALUE, FLAGS + i, 0, i + 1) for i in range(n))
    _tap.filter_count(data, range(0, 128, 2))
    run_writer(_writer, data, n)
    print(f"pgo_train: {args.records} keys listed twice, {first['added']} added, {second['kept']} kept by the "
          f"second stream, a TAP stream of {args.records // 2}, in {time.monotonic() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
