"""The Writer: the per-record resync loop (TAP and crawler sources, the conflict rule on
the target), against hand-made responses and against real memcached processes. Every
test runs against both codec builds."""
from __future__ import annotations

import base64
import random
import select
import socket
import struct
import time

import pytest

from astaire import _tap_py
from astaire.demo.localcluster import MemcachedServer
from astaire.protocol_errors import (
    BadMagic,
    CrawlerBusy,
    CrawlerError,
    FrameTooLarge,
    MalformedFrame,
    TapNotSupported,
    UnexpectedFrame,
)


ALL = range(128)
HEADER = struct.Struct(">BBHBBHIIQ")
FENCE = 0x80000000
NOW_MS = int(time.time() * 1000) & 0xFFFFFFFF  # item flags are ms timestamps (low 32 bits)


def response(opcode, status=0, key=b"", value=b"", extras=b"", opaque=0, cas=0):
    return HEADER.pack(0x81, opcode, len(key), len(extras), 0, status, len(extras) + len(key) + len(value),
                       opaque, cas) + extras + key + value


def frames_of(data):
    parser = _tap_py.FrameParser()
    parser.feed(data)
    return parser.frames()


def ops(data):
    return [(f.opcode, f.opaque) for f in frames_of(data)]


MN = ("mn",)


def meta_gets(req):
    """The crawler's fetch requests as [(key, opaque) per ``mg ... v f t q O<n>``, (key, opaque,
    "flags") per ``mg ... f q O<n>``, MN per ``mn``]."""
    out = []
    assert req.endswith(b"\r\n") or not req
    for line in req.split(b"\r\n")[:-1]:
        parts = line.split(b" ")
        if parts == [b"mn"]:
            out.append(MN)
            continue
        flags_only = b"v" not in parts[2:]  # a deferred copy's flags alone: ``mg <key> f q O<n>``
        assert parts[0] == b"mg" and ({b"f", b"q"} if flags_only else {b"v", b"f", b"t", b"q"}) <= set(parts[2:]), line
        key = base64.b64decode(parts[1]) if b"b" in parts[2:] else parts[1]
        opaque = int(next(p for p in parts[2:] if p.startswith(b"O"))[1:])
        out.append((key, opaque, "flags") if flags_only else (key, opaque))
    return out


def meta_answer(req, hit=lambda i, key: None):
    """A source's answers to ``req``: ``hit(i, key)`` gives (value, flags, ttl) or None (a miss)."""
    answer = bytearray()
    for i, g in enumerate(meta_gets(req)):
        if g == MN:
            answer += b"MN\r\n"
            continue
        found = hit(i, g[0])
        if found is not None:
            value, flags, ttl = found
            if len(g) == 3:
                answer += b"HD f%d O%d\r\n" % (flags, g[1])
            else:
                answer += b"VA %d f%d t%d O%d\r\n%s\r\n" % (len(value), flags, ttl, g[1], value)
    return bytes(answer)


def key_in_vbucket(vb, prefix=b"t\\\\k", vbuckets=128):
    i = 0
    while True:
        key = prefix + b"%d" % i
        if _tap_py.vbucket_of(key, vbuckets) == vb:
            return key
        i += 1


def mutation(tap, key, value=b"v", flags=1000, exp=0, cas=1):
    return tap.encode_tap_mutation(key, value, flags=flags, expiration=exp, cas=cas)


def ack_fences(out):
    """The target's answers when every quiet ADD succeeded: one NOOP response per fence."""
    return b"".join(response(0x0A, opaque=f.opaque) for f in frames_of(out) if f.opcode == 0x0A)


# -- hand-made target responses ----------------------------------------------------------


def test_records_go_out_as_quiet_adds_and_a_fence_settles_them(tap):
    w = tap.Writer(ALL, window=16)
    data = b"".join(mutation(tap, b"t\\\\k%d" % i, b"val%d" % i, flags=100 + i, exp=50 + i) for i in range(3))
    assert w.feed_tap(data) == 3
    assert w.backlog == 3 and not w.done
    out = w.target_requests()
    fs = frames_of(out)
    assert [(f.opcode, f.opaque) for f in fs] == [(0x12, 0), (0x12, 1), (0x12, 2), (0x0A, FENCE)]
    assert all(f.vbucket == 0 for f in fs)  # the fork refuses writes with vbucket != 0
    assert fs[1].key == b"t\\\\k1" and fs[1].value == b"val1" and fs[1].extras == struct.pack(">II", 101, 51)
    assert w.target_requests() == b""
    w.feed_target(ack_fences(out))
    assert w.added == 3 and w.backlog == 0
    assert not w.done  # the source has not finished
    w.finish()
    assert w.done and w.target_requests() == b""


def test_fences_come_every_quarter_window_and_the_window_bounds_records_in_flight(tap):
    w = tap.Writer(ALL, window=8)
    w.feed_tap(b"".join(mutation(tap, b"t\\\\k%d" % i) for i in range(20)))
    assert w.backlog == 20
    out = w.target_requests()
    assert ops(out) == [(0x12, 0), (0x12, 1), (0x0A, FENCE), (0x12, 2), (0x12, 3), (0x0A, FENCE | 1),
                        (0x12, 4), (0x12, 5), (0x0A, FENCE | 2), (0x12, 6), (0x12, 7), (0x0A, FENCE | 3)]
    assert w.target_requests() == b""  # window full: nothing more until fences come back
    w.feed_target(response(0x0A, opaque=FENCE))
    assert w.added == 2 and w.backlog == 18
    more = w.target_requests()
    assert [f.opcode for f in frames_of(more)] == [0x12, 0x12, 0x0A]
    answers = ack_fences(out)[24:] + ack_fences(more)  # the first fence was answered above
    rounds = 0
    while w.backlog:
        assert w.backlog <= 18 and rounds < 20
        w.feed_target(answers)
        answers = ack_fences(w.target_requests())
        rounds += 1
    assert w.added == 20


def test_a_present_key_is_read_and_compared_then_replaced_kept_or_retried(tap):
    """The race sequence, played by hand: every branch of the conflict rule."""
    w = tap.Writer(ALL, window=4, max_retries=10)
    rec = 5000
    w.feed_tap(mutation(tap, b"t\\\\race", b"R", flags=rec, exp=77))
    assert ops(w.target_requests()) == [(0x12, 0), (0x0A, FENCE)]
    w.feed_target(response(0x12, 2, opaque=0))  # ADDQ: KEY_EEXISTS
    assert ops(w.target_requests()) == [(0x0C, 0)]  # GETK
    w.feed_target(response(0x0A, opaque=FENCE))  # the fence does not settle a record that got an error
    assert w.added == 0 and w.backlog == 1
    w.feed_target(response(0x0C, 0, b"t\\\\race", b"old", struct.pack(">I", rec - 1), opaque=0, cas=77))
    (s,) = frames_of(w.target_requests())
    assert (s.opcode, s.cas, s.key, s.value, s.extras) == (0x01, 77, b"t\\\\race", b"R", struct.pack(">II", rec, 77))
    w.feed_target(response(0x01, 2, opaque=0))  # CAS lost: someone wrote in between
    assert ops(w.target_requests()) == [(0x0C, 0)]
    w.feed_target(response(0x0C, 1, b"t\\\\race", opaque=0))  # ... and deleted it again
    (a,) = frames_of(w.target_requests())
    assert (a.opcode, a.value, a.extras) == (0x02, b"R", struct.pack(">II", rec, 77))
    w.feed_target(response(0x02, 5, opaque=0))  # ADD lost (NOT_STORED)
    assert ops(w.target_requests()) == [(0x0C, 0)]
    w.feed_target(response(0x0C, 0, b"t\\\\race", b"new", struct.pack(">I", rec + 1), opaque=0, cas=80))
    assert w.target_requests() == b""
    assert (w.kept, w.added, w.replaced, w.failed, w.retries) == (1, 0, 0, 0, 3)
    w.finish()
    assert w.done


@pytest.mark.parametrize("local,record,outcome", [
    (100, 200, "replaced"), (200, 100, "kept"), (150, 150, "kept"),
    (0xFFFFFFF0, 0x10, "replaced"),  # the clock wrapped: the record is newer
    (0x10, 0xFFFFFFF0, "kept"),
])
def test_timestamp_comparison_is_wrap_safe(tap, local, record, outcome):
    w = tap.Writer(ALL)
    w.feed_tap(mutation(tap, b"t\\\\k", flags=record))
    w.target_requests()
    w.feed_target(response(0x12, 2, opaque=0))
    w.target_requests()
    w.feed_target(response(0x0C, 0, b"t\\\\k", b"L", struct.pack(">I", local), opaque=0, cas=9))
    out = w.target_requests()
    if outcome == "replaced":
        assert ops(out) == [(0x01, 0)]
        w.feed_target(response(0x01, 0, opaque=0))
    else:
        assert out == b""
    assert getattr(w, outcome) == 1 and w.backlog == 0


def test_gives_up_after_max_retries(tap):
    w = tap.Writer(ALL, max_retries=2)
    w.feed_tap(mutation(tap, b"t\\\\busy", flags=10))
    w.target_requests()
    w.feed_target(response(0x12, 2, opaque=0))
    for _ in range(3):
        w.target_requests()
        w.feed_target(response(0x0C, 0, b"t\\\\busy", b"L", struct.pack(">I", 5), opaque=0, cas=1))
        w.target_requests()
        w.feed_target(response(0x01, 2, opaque=0))
    assert w.failed == 1 and w.retries == 3 and w.backlog == 0
    assert "gave up" in w.last_error and "busy" in w.last_error
    assert w.target_requests() == b""


@pytest.mark.parametrize("status,name", [(3, "E2BIG"), (4, "EINVAL"), (0x82, "ENOMEM"), (7, "NOT_MY_VBUCKET"),
                                         (0x81, "UNKNOWN_COMMAND")])
def test_hard_errors_fail_the_record_and_keep_the_text(tap, status, name):
    w = tap.Writer(ALL)
    w.feed_tap(mutation(tap, b"t\\\\a") + mutation(tap, b"t\\\\b"))
    out = w.target_requests()
    w.feed_target(response(0x12, status, value=b"Too large.", opaque=1) + ack_fences(out))
    assert (w.added, w.failed) == (1, 1)
    assert name in w.last_error and "Too large." in w.last_error and "t\\\\\\\\b" in w.last_error


def test_target_frames_that_match_nothing_outstanding_raise(tap):
    w = tap.Writer(ALL)
    w.feed_tap(mutation(tap, b"t\\\\a"))
    w.target_requests()
    for bad, exc in [
        (response(0x0A, opaque=FENCE | 5), UnexpectedFrame),  # a fence never sent
        (response(0x0C, 0, opaque=0), UnexpectedFrame),  # GETK answer while an ADDQ is outstanding
        (response(0x12, 2, opaque=3), UnexpectedFrame),  # free slot
        (response(0x12, 2, opaque=99999), UnexpectedFrame),  # beyond the window
        (HEADER.pack(0x80, 0x12, 0, 0, 0, 0, 0, 0, 0), UnexpectedFrame),  # a request from the target
        (b"\x00" * 24, BadMagic),
    ]:
        w2 = tap.Writer(ALL)
        w2.feed_tap(mutation(tap, b"t\\\\a"))
        w2.target_requests()
        w2.feed_target(response(0x0A, opaque=FENCE)[:10])  # a partial frame first: offsets count it
        with pytest.raises(exc) as e:
            w2.feed_target(response(0x0A, opaque=FENCE)[10:] + bad)
        assert e.value.offset == 24


def test_tap_source_counts_and_skips(tap):
    wanted_vb = 5
    mine = key_in_vbucket(wanted_vb)
    other = key_in_vbucket(6)
    own = b"astaire\\\\tag"
    w = tap.Writer([wanted_vb])
    frames = [mutation(tap, mine, b"x" * 10), mutation(tap, other), mutation(tap, own),
              mutation(tap, key_in_vbucket(wanted_vb, b"t\\\\tomb"), b"")]
    frames += [tap.encode_request(op, b"k", b"payload") for op in range(0x42, 0x48)]
    data = b"".join(frames)
    accepted = 0
    for i in range(0, len(data), 5):
        accepted += w.feed_tap(data[i:i + 5])
    assert accepted == 2
    s = w.stats()
    assert (s["entries"], s["skipped_unwanted"], s["skipped_own"], s["tombstones"], s["other_tap"]) == (2, 1, 1, 1, 6)
    assert s["bytes"] == len(frames[0]) + len(frames[3])
    assert w.vbucket_counts() == {wanted_vb: (2, len(frames[0]) + len(frames[3]))}
    assert tap.Writer(range(4)).vbucket_counts() == {0: (0, 0), 1: (0, 0), 2: (0, 0), 3: (0, 0)}


def test_tap_source_errors_carry_stream_offsets(tap):
    good = mutation(tap, b"t\\\\a")
    cases = [
        (response(0x40, 0x81), TapNotSupported),
        (tap.encode_get(b"x"), UnexpectedFrame),
        (response(0x41), UnexpectedFrame),  # a mutation must be a request
        (HEADER.pack(0x80, 0x41, 1, 4, 0, 0, 5, 0, 0) + b"\0\0\0\0k", MalformedFrame),
        (b"GARBAGE", BadMagic),
        (HEADER.pack(0x80, 0x41, 0, 0, 0, 0, 2**30, 0, 0), FrameTooLarge),
    ]
    for bad, exc in cases:
        w = tap.Writer(ALL)
        with pytest.raises(exc) as e:
            w.feed_tap(good + good + bad)
        assert e.value.offset == 2 * len(good), exc
        assert w.entries == 2  # the records before the bad frame were taken
    w = tap.Writer(ALL)
    w.feed_tap(good + good[:30])
    with pytest.raises(MalformedFrame) as e:
        w.finish()  # the source stopped inside a frame
    assert e.value.offset == len(good)


def test_memory_stays_bounded_by_the_window_when_the_caller_respects_backlog(tap):
    window = 32
    w = tap.Writer(ALL, window=window)
    stream = b"".join(mutation(tap, b"t\\\\k%d" % i, b"v" * 50) for i in range(3000))
    chunk = 4096
    pos = 0
    peak = 0
    while pos < len(stream) or w.backlog:
        if w.backlog < window and pos < len(stream):
            w.feed_tap(stream[pos:pos + chunk])
            pos += chunk
        peak = max(peak, w.backlog)
        w.feed_target(ack_fences(w.target_requests()))
    w.finish()
    assert w.done and w.added == 3000
    assert peak < window + chunk // 70 + 1


# -- crawler source, by hand ---------------------------------------------------------------


def test_metadump_lines_queue_fetches_for_wanted_keys(tap):
    k1 = key_in_vbucket(1, b"t\\\\a b%")  # space and % get uri-encoded by memcached
    k2 = key_in_vbucket(2)
    enc = lambda k: "".join(c if c.isalnum() else "%%%02X" % ord(c) for c in k.decode()).encode()  # noqa: E731
    w = tap.Writer([1], window=16)
    text = (b"OK\r\n"
            b"key=" + enc(k1) + b" exp=-1 la=1 cas=2 fetch=no cls=1 size=70 flags=0\n"
            b"key=" + enc(k2) + b" exp=123 la=1 cas=3 fetch=no cls=1 size=70\n"
            b"key=astaire%5C%5Ctag exp=0 la=1 cas=4 fetch=no cls=1 size=60\n"
            b"key=" + enc(k1) + b" exp=-1 la=1 cas=5 fetch=no cls=1 size=70\n"
            b"END\r\n")
    done = False
    for i in range(0, len(text), 3):
        done = w.feed_metadump(text[i:i + 3])
    assert done and w.feed_metadump(b"") is True
    assert (w.skipped_unwanted, w.skipped_own, w.duplicates, w.fetch_backlog) == (1, 1, 1, 1)
    req = w.fetch_requests()
    assert meta_gets(req) == [(k1, 0), MN]
    assert b" b " in req  # the key holds a space: it travels base64-encoded
    assert not w.done
    w.feed_fetch(b"VA 5 f4242 t-1 O0\r\nVALUE\r\nMN\r\n")
    assert w.fetch_backlog == 0 and w.entries == 1 and w.vanished == 0
    out = w.target_requests()
    (add, fence) = frames_of(out)
    assert (add.opcode, add.key, add.value, add.extras) == (0x12, k1, b"VALUE", struct.pack(">II", 4242, 0))
    w.feed_target(ack_fences(out))
    assert w.added == 1 and w.done


def test_fetch_without_an_answer_before_its_mn_vanished_and_the_expiry_comes_from_the_same_read(tap):
    w = tap.Writer(ALL, window=16)
    w.feed_metadump(b"key=a exp=5 la=1\nkey=b exp=6 la=1\nkey=c exp=-1 la=1\nEND\r\n")
    req = w.fetch_requests()
    assert meta_gets(req) == [(b"a", 0), (b"b", 1), (b"c", 2), MN]
    w.feed_fetch(b"VA 1 t100 O1 f7\r\nB\r\nMN\r\n")
    assert (w.entries, w.vanished, w.fetch_backlog) == (1, 2, 0)
    (add, _) = frames_of(w.target_requests())
    # The remaining TTL read with the value (relative, as memcached reads up to 30 days),
    # never the listing's exp=6.
    assert struct.unpack(">II", add.extras) == (7, 100)


def test_the_listed_expiry_is_kept_only_when_the_read_agrees_with_it(tap):
    now = int(time.time())
    w = tap.Writer(ALL, window=16)
    w.feed_metadump(b"key=same exp=%d\nkey=changed exp=%d\nkey=gone exp=%d\nEND\r\n" % (now + 5000, now + 5000, now + 50))
    w.fetch_requests()
    # "same": the read's TTL agrees within the clocks' second (exact absolute expiry kept);
    # "changed": rewritten since the listing with another TTL; "gone": now without expiry.
    w.feed_fetch(b"VA 1 f1 t4999 O0\r\nA\r\nVA 1 f2 t700 O1\r\nB\r\nVA 1 f3 t-1 O2\r\nC\r\nMN\r\n")
    exps = {f.key: struct.unpack(">II", f.extras)[1] for f in frames_of(w.target_requests()) if f.opcode == 0x12}
    assert exps == {b"same": now + 5000, b"changed": 700, b"gone": 0}


@pytest.mark.parametrize("ttl,expected", [(-1, 0), (0, 1), (1, 1), (2592000, 2592000), (2592001, None)])
def test_remaining_ttl_becomes_the_expiry_to_store(tap, ttl, expected):
    w = tap.Writer(ALL, window=16)
    w.feed_metadump(b"key=a exp=0\nEND\r\n")
    w.fetch_requests()
    before = int(time.time())
    w.feed_fetch(b"VA 1 f7 t%d O0\r\nB\r\nMN\r\n" % ttl)
    after = int(time.time())
    (add, _) = frames_of(w.target_requests())
    exp = struct.unpack(">II", add.extras)[1]
    if expected is None:  # beyond 30 days memcached reads absolute times
        assert before + ttl <= exp <= after + ttl
    else:
        assert exp == expected


def test_meta_get_answers_cut_anywhere_and_refusals(tap):
    w = tap.Writer(ALL, window=16)
    w.feed_metadump(b"key=a exp=0\nkey=b exp=0\nEND\r\n")
    req = w.fetch_requests()
    answer = b"VA 3 f1 t-1 O0\r\nA\r\n\r\nVA 0 f2 t-1 O1\r\n\r\nMN\r\n"
    for i in range(len(answer)):
        w.feed_fetch(answer[i:i + 1])
    assert (w.entries, w.tombstones, w.vanished, w.fetch_backlog) == (2, 1, 0, 0)
    out = frames_of(w.target_requests())
    assert [(f.key, f.value) for f in out if f.opcode == 0x12] == [(b"a", b"A\r\n"), (b"b", b"")]
    assert len(meta_gets(req)) == 3
    for bad, exc in ((b"ERROR\r\n", UnexpectedFrame), (b"VA 1 f1 O0\r\nx\r\n", MalformedFrame),
                     (b"VA 1 f1 t-1 O0\r\nxy\r\n", MalformedFrame), (b"VA 1 f1 t-1 O5\r\nx\r\n", UnexpectedFrame),
                     (b"HD\r\n", UnexpectedFrame)):
        w = tap.Writer(ALL, window=16)
        w.feed_metadump(b"key=a exp=0\nEND\r\n")
        w.fetch_requests()
        with pytest.raises(exc):
            w.feed_fetch(bad)
    w = tap.Writer(ALL, window=16)
    w.feed_metadump(b"key=a exp=0\nEND\r\n")
    w.fetch_requests()
    w.feed_fetch(b"CLIENT_ERROR bad key\r\nMN\r\n")
    assert w.failed == 1 and "CLIENT_ERROR bad key" in w.last_error and w.fetch_backlog == 0


WELL_FORMED_VA = (b"VA 1 f7 t-1 O0", b"VA 1 O0 t-1 f7", b"VA 1 t5 O0 f7", b"VA 1 f7  t-1 O0", b"VA 1 f7 t-1 O0 ",
                  b"VA 1 f7 t-1 O0 k", b"VA 1 f7 t-1 O0 s100", b"VA 1 f07 t0 O00", b"VA 1 f4294967295 t-1 O0",
                  b"VA 1 f000000000007 t999999999999 O0", b"VA 000000000001 f7 t-000000000001 O0")
MALFORMED_VA = (b"VA 1 f t-1 O0", b"VA 1 fx t-1 O0", b"VA 1 f7x t-1 O0", b"VA 1 f7 t-2 O0", b"VA 1 f7 t- O0",
                b"VA 1 f7 t-1x O0", b"VA 1 f4294967296 t-1 O0", b"VA 1 f7 t-1", b"VA 1 f7 O0", b"VA x f7 t-1 O0",
                b"VA  1 f7 t-1 O0", b"VA -1 f7 t-1 O0", b"VA 1 f-7 t-1 O0", b"VA 1 f7 t-1 O-0",
                b"VA 1 f7 t99999999999999 O0", b"VA 1 f7 t9999999999999 O0", b"VA 1 f0000000000007 t-1 O0",
                b"VA 0000000000001 f7 t-1 O0", b"VA 1 f7 t-1 O0000000000000", b"VA 1 f7 t-1 O0 f99999999999999999999",
                b"VA 1 f7 t-1 O99999999999999999999")


@pytest.mark.parametrize("head", WELL_FORMED_VA + MALFORMED_VA)
def test_meta_get_answer_tokens_are_read_alike_in_both_builds(tap, head):
    """A value's answer line, well formed or not: both builds take it (same flags and
    expiry) or refuse it as malformed."""
    def run(mod):
        w = mod.Writer(ALL, window=16)
        w.feed_metadump(b"key=a exp=0\nEND\r\n")
        w.fetch_requests()
        try:
            w.feed_fetch(head + b"\r\nx\r\nMN\r\n")
        except Exception as e:  # noqa: BLE001 (the type is compared)
            return type(e).__name__
        return [(f.key, f.value, f.extras) for f in frames_of(w.target_requests()) if f.key]

    got = run(tap)
    assert got == run(_tap_py)
    if head in WELL_FORMED_VA:
        ((key, value, extras),) = got
        flags = next(int(t[1:]) for t in head.split(b" ") if t[:1] == b"f")
        assert (key, value, extras[:4]) == (b"a", b"x", flags.to_bytes(4, "big")), got
    else:
        assert got == "MalformedFrame"


def test_fetches_in_flight_are_bounded_by_the_window(tap):
    w = tap.Writer(ALL, window=8)
    w.feed_metadump(b"".join(b"key=k%d exp=0\n" % i for i in range(30)))
    req = w.fetch_requests()
    assert sum(1 for g in meta_gets(req) if g != MN) == 8
    assert w.fetch_requests() == b"" and w.fetch_backlog == 30


def test_metadump_lines_off_the_common_shape_parse_as_the_common_ones(tap):
    """Valid lines off the common shape (exp later, zero-padded past ten digits, a raw key
    longer than a key that decodes within one) list their keys as the common ones do."""
    long_raw = b"%41" * 40 + b"b" * 210  # 330 raw bytes, 250 decoded: the longest key
    text = (b"key=k1 la=1 exp=5 cas=2\n"
            b"key=k2 exp=00000000007 la=1\n"
            b"key=k3 exp=-00000000001\n"
            b"key=" + long_raw + b" exp=1764800000 la=1 size=70\n"
            b"key=k%5C%5C5 exp=1764800000\n"
            b"END\r\n")
    w = tap.Writer(ALL, window=16)
    assert w.feed_metadump(text) is True
    assert [g for g in meta_gets(w.fetch_requests()) if g != MN] == [
        (b"k1", 0), (b"k2", 1), (b"k3", 2), (b"A" * 40 + b"b" * 210, 3), (b"k\\\\5", 4)]
    w = tap.Writer(ALL)
    with pytest.raises(CrawlerError) as e:
        w.feed_metadump(b"key=" + long_raw + b"c exp=1\n")  # 251 decoded bytes
    assert "bad key" in str(e.value)


def test_listed_expiries_and_long_keys_read_exactly(tap):
    """Exp is read eight digits at a time and a key's runs between escapes sixteen bytes at a
    time (compiled build): every listed expiry (ten digits, zero-padded or not, the line ending
    after it or not) reaches the target exactly, and keys of every length up to the longest
    (runs and escapes in every position) are asked for as decoded."""
    rng = random.Random(7)
    now = int(time.time())
    lines, want_exp, want_keys = [], {}, []
    for i in range(300):
        key = b"%d#" % i
        while len(key) < 250:
            key += b"k%d" % rng.randrange(10 ** rng.randrange(1, 20)) + rng.choice([b"", b"\\\\", b" ", b"%"])
        key = key[:max(len(b"%d#" % i), rng.choice([rng.randrange(1, 251), rng.randrange(225, 251)]))]
        exp = rng.randrange(now + 100, 0xFFFFFFFF + 1) if i else 0xFFFFFFFF
        lines.append(b"key=" + _uri_key(key) + b" exp=" + b"0" * rng.randrange(3) + b"%d" % exp
                     + rng.choice([b"", b" la=1 cas=2 fetch=no cls=1 size=70"]) + b"\n")
        want_exp[key] = exp
        want_keys.append(key)
    w = tap.Writer(ALL, window=len(lines))
    assert w.feed_metadump(b"".join(lines) + b"END\r\n") is True
    req = w.fetch_requests()
    gets = [g for g in meta_gets(req) if g != MN]
    assert [k for k, _ in gets] == want_keys
    w.feed_fetch(meta_answer(req, lambda i, key: (b"v", 1, want_exp[key] - now)))
    exps = {f.key: struct.unpack(">II", f.extras)[1] for f in frames_of(w.target_requests()) if f.opcode == 0x12}
    assert exps == want_exp


def _uri_key(key):
    """A key as memcached's metadump lists it: bytes other than letters and digits %-escaped."""
    return b"".join(bytes([c]) if (48 <= c <= 57 or 65 <= c <= 90 or 97 <= c <= 122) else b"%%%02X" % c
                    for c in key)


@pytest.mark.parametrize("line,exc", [
    (b"BUSY currently processing crawler request", CrawlerBusy),
    (b"ERROR cannot pipeline other commands before metadump", CrawlerError),
    (b"CLIENT_ERROR bad command line format", CrawlerError),
    (b"SERVER_ERROR out of memory", CrawlerError),
    (b"BADCLASS invalid class id", CrawlerError),
    (b"key=abc la=1", CrawlerError),  # no exp
    (b"key=abc exp=1_0", CrawlerError),
    (b"key=abc exp=-2", CrawlerError),
    (b"key=a%2 exp=1", CrawlerError),
    (b"key=a%zz exp=1", CrawlerError),
    (b"key= exp=1", CrawlerError),
    (b"key=abc exp=4294967296 la=1", CrawlerError),
    (b"key=abc exp=12x", CrawlerError),
    (b"key=abc exp=", CrawlerError),
])
def test_metadump_refusals_and_garbage_raise_with_the_line_offset(tap, line, exc):
    w = tap.Writer(ALL)
    first = b"key=ok exp=0 la=1\n"
    with pytest.raises(exc) as e:
        w.feed_metadump(first + line + b"\r\n")
    assert e.value.offset == len(first)


def test_metadump_data_after_end_and_overlong_lines_raise(tap):
    w = tap.Writer(ALL)
    with pytest.raises(CrawlerError):
        w.feed_metadump(b"END\r\nkey=x exp=0\n")
    w = tap.Writer(ALL)
    with pytest.raises(CrawlerError):
        w.feed_metadump(b"key=" + b"a" * 9000)


# -- against real memcached ----------------------------------------------------------------


def meta_get(server, key):
    """(value, flags, ttl) from memcached's meta protocol, or None when absent."""
    with socket.create_connection((server.host, server.port), timeout=5) as s:
        s.sendall(b"mg " + key + b" v f t\r\n")
        data = b""
        while not (data.startswith(b"EN\r\n") or (data.count(b"\r\n") >= 2 and data.startswith(b"VA"))):
            chunk = s.recv(65536)
            assert chunk, data
            data += chunk
    if data.startswith(b"EN"):
        return None
    head, rest = data.split(b"\r\n", 1)
    parts = head.split()
    size = int(parts[1])
    fields = {p[:1]: p[1:] for p in parts[2:]}
    return rest[:size], int(fields[b"f"]), int(fields[b"t"])


def binary_set(server, items):
    """Store (key, value, flags, exp) items with one pipelined batch; wait for the answers."""
    data = _tap_py.encode_batch([(0x01, k, v, f, e, i, 0) for i, (k, v, f, e) in enumerate(items)])
    data += _tap_py.encode_noop(0xFFFF)
    with socket.create_connection((server.host, server.port), timeout=5) as s:
        s.sendall(data)
        parser = _tap_py.FrameParser()
        while True:
            parser.feed(s.recv(65536))
            fs = parser.frames()
            for f in fs:
                assert f.opcode == 0x0A or f.status == 0, f
            if fs and fs[-1].opcode == 0x0A:
                return


def drive(w, target, source=None, hook=None, timeout=20.0):
    """The socket loop the stream layer runs, in small: send what the Writer has, feed it
    what comes back, until it is done."""
    deadline = time.monotonic() + timeout
    socks = [target] + ([source] if source is not None else [])
    while not w.done:
        if source is not None:
            req = w.fetch_requests()
            if req:
                source.sendall(req)
        out = w.target_requests()
        if out:
            if hook is not None:
                hook(out)
            target.sendall(out)
        if w.done:
            break
        ready, _, _ = select.select(socks, [], [], max(0.0, deadline - time.monotonic()))
        assert ready, f"no progress: {w.stats()}"
        for s in ready:
            data = s.recv(1 << 20)
            assert data, "connection closed"
            (w.feed_target if s is target else w.feed_fetch)(data)


def connect(server):
    return socket.create_connection((server.host, server.port), timeout=10)


MODES = ["addq", "read", "auto"]


@pytest.mark.parametrize("mode", MODES)
def test_conflict_rule_against_real_memcached(tap, memcached, mode):
    t = NOW_MS
    exp = int(time.time()) + 1000
    binary_set(memcached, [
        (b"t\\\\newer", b"LOCAL", t + 200, 0),
        (b"t\\\\older", b"LOCAL", t - 100, 0),
        (b"t\\\\equal", b"LOCAL", t, 0),
        (b"t\\\\wrapped", b"LOCAL", 0xFFFFFFF0, 0),
        (b"t\\\\notwrapped", b"LOCAL", 0x10, 0),
        (b"t\\\\tomb-older", b"LOCAL", t - 5, 0),
        (b"astaire\\\\tag", b"{}", 0, 0),
    ])
    unwanted = b"t\\\\unwanted"
    wanted = set(ALL) - {tap.vbucket_of(unwanted)}
    src = [
        mutation(tap, b"t\\\\newer", b"R", t), mutation(tap, b"t\\\\older", b"R", t),
        tap.encode_request(0x42, b"t\\\\x"), mutation(tap, b"t\\\\equal", b"R", t),
        mutation(tap, b"t\\\\wrapped", b"R", 0x10), mutation(tap, b"t\\\\notwrapped", b"R", 0xFFFFFFF0),
        tap.encode_request(0x43), tap.encode_request(0x44), tap.encode_request(0x45), tap.encode_request(0x46),
        tap.encode_request(0x47),
        mutation(tap, b"t\\\\absent", b"RECORD", t, exp), mutation(tap, b"t\\\\tomb-new", b"", t),
        mutation(tap, b"t\\\\tomb-older", b"", t), mutation(tap, b"astaire\\\\tag", b"THEIRS", t),
        mutation(tap, unwanted, b"R", t),
    ]
    w = tap.Writer(wanted, window=4, mode=mode)
    for frame in src:
        w.feed_tap(frame)
    w.finish()
    with connect(memcached) as target:
        drive(w, target)
    assert (w.added, w.replaced, w.kept, w.failed, w.retries) == (2, 3, 3, 0, 0)
    assert w.read_first == {"addq": 0, "read": 8}.get(mode, w.read_first)
    assert (w.skipped_own, w.skipped_unwanted, w.other_tap, w.tombstones) == (1, 1, 6, 2)
    get = lambda k: meta_get(memcached, k)  # noqa: E731
    assert get(b"t\\\\newer")[:2] == (b"LOCAL", t + 200)
    assert get(b"t\\\\older")[:2] == (b"R", t)
    assert get(b"t\\\\equal")[:2] == (b"LOCAL", t)
    assert get(b"t\\\\wrapped")[:2] == (b"R", 0x10)
    assert get(b"t\\\\notwrapped")[:2] == (b"LOCAL", 0x10)
    value, flags, ttl = get(b"t\\\\absent")
    # memcached's clock ticks once a second and may lag the wall clock by up to 1 s.
    assert (value, flags) == (b"RECORD", t) and 990 <= ttl <= 1001
    assert get(b"t\\\\tomb-new") == (b"", t, -1)
    assert get(b"t\\\\tomb-older")[:2] == (b"", t)
    assert get(b"astaire\\\\tag")[0] == b"{}"
    assert get(unwanted) is None


def test_thousands_of_records_through_a_small_window(tap, memcached):
    n = 3000
    stream = b"".join(mutation(tap, b"t\\\\bulk%d" % i, b"%d" % i * 10, NOW_MS + i) for i in range(n))
    w = tap.Writer(ALL, window=64)
    with connect(memcached) as target:
        for i in range(0, len(stream), 8192):
            w.feed_tap(stream[i:i + 8192])
            while w.backlog >= 64:  # flow control: stop reading the source
                target.sendall(w.target_requests())
                w.feed_target(target.recv(1 << 20))
        w.finish()
        drive(w, target)
        assert w.added == n
        # Streaming the same records again keeps every one; a newer copy replaces every one.
        again = tap.Writer(ALL, window=64)
        again.feed_tap(stream)
        again.finish()
        drive(again, target)
        assert (again.kept, again.added) == (n, 0)
        newer = tap.Writer(ALL, window=64)
        newer.feed_tap(b"".join(mutation(tap, b"t\\\\bulk%d" % i, b"new", NOW_MS + n + i) for i in range(n)))
        newer.finish()
        drive(newer, target)
        assert newer.replaced == n
    assert meta_get(memcached, b"t\\\\bulk7")[:2] == (b"new", NOW_MS + n + 7)


def _has(out, opcode):
    return any(f.opcode == opcode for f in frames_of(out))


@pytest.mark.parametrize("mode", MODES)
def test_a_newer_write_racing_the_cas_set_is_kept(tap, memcached, mode):
    binary_set(memcached, [(b"t\\\\race", b"OLD", 100, 0)])
    w = tap.Writer(ALL, mode=mode)
    w.feed_tap(mutation(tap, b"t\\\\race", b"RECORD", 200))
    w.finish()

    def other_client_writes_first(out):
        if _has(out, 0x01):  # the CAS SET is about to go: another client gets there first
            binary_set(memcached, [(b"t\\\\race", b"NEWEST", 300, 0)])

    with connect(memcached) as target:
        drive(w, target, hook=other_client_writes_first)
    assert (w.kept, w.replaced, w.retries) == (1, 0, 1)
    assert meta_get(memcached, b"t\\\\race")[:2] == (b"NEWEST", 300)


@pytest.mark.parametrize("mode", ["addq", "auto"])
def test_a_delete_racing_the_read_or_the_set_still_lands_the_record(tap, memcached, mode):
    binary_set(memcached, [(b"t\\\\r1", b"OLD", 100, 0), (b"t\\\\r2", b"OLD", 100, 0)])
    w = tap.Writer(ALL, mode=mode)
    w.feed_tap(mutation(tap, b"t\\\\r1", b"R1", 200) + mutation(tap, b"t\\\\r2", b"R2", 200))
    w.finish()
    deleted = set()

    def delete(key):
        with connect(memcached) as s:
            s.sendall(b"delete " + key + b"\r\n")
            assert s.recv(100) == b"DELETED\r\n"
        deleted.add(key)

    def hook(out):
        for f in frames_of(out):
            if f.opcode == 0x0C and f.key == b"t\\\\r1" and f.key not in deleted:
                delete(f.key)  # gone between the ADDQ and the GETK
            if f.opcode == 0x01 and f.key == b"t\\\\r2" and f.key not in deleted:
                delete(f.key)  # gone between the GETK and the CAS SET

    with connect(memcached) as target:
        drive(w, target, hook=hook)
    assert (w.added, w.replaced, w.failed, w.retries) == (2, 0, 0, 2)
    assert meta_get(memcached, b"t\\\\r1")[:2] == (b"R1", 200)
    assert meta_get(memcached, b"t\\\\r2")[:2] == (b"R2", 200)


def test_read_first_races_a_delete_and_a_concurrent_add(tap, memcached):
    """Read first: a key deleted between the read and the CAS SET is added; a key another
    client adds between the read (absent) and our ADD is read again and the rule applied."""
    binary_set(memcached, [(b"t\\\\gone", b"OLD", 100, 0)])
    w = tap.Writer(ALL, mode="read")
    w.feed_tap(mutation(tap, b"t\\\\gone", b"R1", 200) + mutation(tap, b"t\\\\late", b"R2", 200)
               + mutation(tap, b"t\\\\late-old", b"R3", 200))
    w.finish()
    done = set()

    def hook(out):
        for f in frames_of(out):
            if f.opcode == 0x01 and f.key == b"t\\\\gone" and f.key not in done:
                done.add(f.key)
                with connect(memcached) as s:  # gone between the read and the CAS SET
                    s.sendall(b"delete t\\\\gone\r\n")
                    assert s.recv(100) == b"DELETED\r\n"
            if f.opcode == 0x02 and f.key == b"t\\\\late" and f.key not in done:
                done.add(f.key)  # another client adds a newer copy first
                binary_set(memcached, [(b"t\\\\late", b"NEWEST", 300, 0)])
            if f.opcode == 0x02 and f.key == b"t\\\\late-old" and f.key not in done:
                done.add(f.key)  # another client adds an older copy first
                binary_set(memcached, [(b"t\\\\late-old", b"STALE", 150, 0)])

    with connect(memcached) as target:
        drive(w, target, hook=hook)
    assert (w.added, w.replaced, w.kept, w.failed, w.retries) == (1, 1, 1, 0, 3)
    assert w.read_first == 3
    assert meta_get(memcached, b"t\\\\gone")[:2] == (b"R1", 200)
    assert meta_get(memcached, b"t\\\\late")[:2] == (b"NEWEST", 300)
    assert meta_get(memcached, b"t\\\\late-old")[:2] == (b"R3", 200)


def test_auto_mode_reads_first_once_most_records_are_present(tap, memcached):
    """A second pass of the same records (a second old replica): auto switches to reading
    first after one batch, with the same outcome as ADDQ first; a fresh target stays on ADDQ."""
    n = 2000
    stream = b"".join(mutation(tap, b"t\\\\auto%d" % i, b"v%d" % i, NOW_MS + i) for i in range(n))
    with connect(memcached) as target:
        first = tap.Writer(ALL, window=64, mode="auto")
        first.feed_tap(stream)
        first.finish()
        drive(first, target)
        assert (first.added, first.read_first) == (n, 0)
        again = tap.Writer(ALL, window=64, mode="auto")
        again.feed_tap(stream)
        again.finish()
        drive(again, target)
        assert (again.kept, again.added, again.replaced, again.retries) == (n, 0, 0, 0)
        assert n - 200 < again.read_first < n
        newer = tap.Writer(ALL, window=64, mode="auto")
        newer.feed_tap(b"".join(mutation(tap, b"t\\\\auto%d" % i, b"new", NOW_MS + n + i) for i in range(n)))
        newer.finish()
        drive(newer, target)
        assert newer.replaced == n and newer.read_first > n - 200
    assert meta_get(memcached, b"t\\\\auto7")[:2] == (b"new", NOW_MS + n + 7)


def test_an_unknown_mode_is_refused(tap):
    with pytest.raises(ValueError, match="mode"):
        tap.Writer(ALL, mode="blind")
    assert tap.Writer(ALL).mode == "addq" and tap.Writer(ALL, mode="auto").mode == "auto"


def test_a_value_the_target_refuses_fails_alone(tap, memcached):
    w = tap.Writer(ALL)
    w.feed_tap(mutation(tap, b"t\\\\huge", b"x" * (2 << 20)) + mutation(tap, b"t\\\\fine", b"ok"))
    w.finish()
    with connect(memcached) as target:
        drive(w, target)
    assert (w.failed, w.added) == (1, 1)
    assert "E2BIG" in w.last_error
    assert meta_get(memcached, b"t\\\\fine")[0] == b"ok"


def metadump(server):
    """The whole ``lru_crawler metadump all`` answer, as the stream layer would read it."""
    with connect(server) as s:
        s.sendall(b"lru_crawler metadump all\r\n")
        data = b""
        while not data.endswith(b"END\r\n"):
            chunk = s.recv(1 << 20)
            assert chunk
            data += chunk
    return data


def test_crawler_mode_copies_a_stock_memcached_source(tap, memcached):
    with MemcachedServer(memory_mb=64) as source:
        t = NOW_MS
        exp = int(time.time()) + 5000
        items = [(b"t\\\\c%d" % i, b"value %d" % i, t + i, exp if i % 2 else 0) for i in range(500)]
        items += [(b"astaire\\\\tag", b"{}", 0, 0), (b"t\\\\tomb", b"", t, 0), (b"t\\\\gone", b"bye", t, 0),
                  (b"t\\\\sp%20ce%", b"odd key", t, 0)]
        binary_set(source, items)
        binary_set(memcached, [(b"t\\\\c3", b"LOCAL NEWER", t + 1000, 0), (b"t\\\\c4", b"LOCAL OLDER", 1, 0)])
        listing = metadump(source)
        with connect(source) as s:  # deleted after the listing, before the fetch
            s.sendall(b"delete t\\\\gone\r\n")
            assert s.recv(100) == b"DELETED\r\n"
        w = tap.Writer(ALL, window=32)
        chunks = [listing[i:i + 1000] for i in range(0, len(listing), 1000)]
        with connect(memcached) as target, connect(source) as fetch:
            for chunk in chunks:
                w.feed_metadump(chunk)
                while w.fetch_backlog >= 32 or w.backlog >= 32:  # flow control on the listing
                    drive_once(w, target, fetch)
            assert w.feed_metadump(b"") is True
            drive(w, target, fetch)
        assert (w.skipped_own, w.vanished, w.failed) == (1, 1, 0)
        assert w.entries == 502 and w.tombstones == 1
        assert (w.added, w.replaced, w.kept) == (500, 1, 1)
        assert sum(e for e, _ in w.vbucket_counts().values()) == 502
        assert meta_get(memcached, b"t\\\\c3")[0] == b"LOCAL NEWER"
        assert meta_get(memcached, b"t\\\\c4")[:2] == (b"value 4", t + 4)
        value, flags, ttl = meta_get(memcached, b"t\\\\c7")
        assert (value, flags) == (b"value 7", t + 7) and 4990 <= ttl <= 5001  # (1 s clock lag)
        assert meta_get(memcached, b"t\\\\c8")[2] == -1
        assert meta_get(memcached, b"t\\\\tomb") == (b"", t, -1)
        assert meta_get(memcached, b"t\\\\sp%20ce%")[0] == b"odd key"
        assert meta_get(memcached, b"astaire\\\\tag") is None
        assert meta_get(memcached, b"t\\\\gone") is None


def drive_once(w, target, fetch):
    req = w.fetch_requests()
    if req:
        fetch.sendall(req)
    out = w.target_requests()
    if out:
        target.sendall(out)
    ready, _, _ = select.select([target, fetch], [], [], 10)
    assert ready, w.stats()
    for s in ready:
        data = s.recv(1 << 20)
        assert data
        (w.feed_target if s is target else w.feed_fetch)(data)


@pytest.mark.parametrize("wanted", [ALL, [3]])
def test_duplicate_listings_are_counted_in_bounded_memory_like_the_reference(tap, wanted):
    """Many keys listed, some twice while their fetch is still queued, the queue drained in
    between: the same fetches, duplicates and vanished counts as the pure build."""
    # 1500 distinct keys, each listed 2-3 times; for one wanted vbucket, all keys in it (their
    # hashes share the low bits: the duplicate set must not cluster on them).
    distinct = []
    i = 0
    while len(distinct) < 1500:
        key = b"t\\\\dup%d" % i
        if wanted is ALL or _tap_py.vbucket_of(key) in wanted:
            distinct.append(key)
        i += 1
    keys = [distinct[i % 1500] for i in range(4000)]
    lines = [b"key=t%%5C%%5C%s exp=%d la=1\n" % (k[3:], i) for i, k in enumerate(keys)]

    def run(mod):
        w = mod.Writer(wanted, window=64)
        fetched = []
        for i in range(0, len(lines), 250):
            w.feed_metadump(b"".join(lines[i:i + 250]))
            req = w.fetch_requests()
            fetched.append(req)
            w.feed_fetch(meta_answer(req))  # every key vanished: nothing for the target
        w.feed_metadump(b"END\r\n")
        while w.fetch_backlog:
            req = w.fetch_requests()
            fetched.append(req)
            w.feed_fetch(meta_answer(req))
        return fetched, w.stats()

    fetched, stats = run(tap)
    assert stats["done"] and stats["duplicates"] > 0
    assert stats["duplicates"] + stats["vanished"] + stats["skipped_unwanted"] == len(keys)
    assert (fetched, stats) == run(_tap_py)


def test_without_the_duplicate_check_a_key_listed_twice_is_fetched_twice_and_written_once(tap):
    """``check_duplicates`` off (a hash-table walk): a key listed again before its fetch went
    out is fetched again, not counted as a duplicate; the target gets the first copy's ADD,
    and the second copy, equal, costs a failed ADD and a read, as a second replica's copy
    does. Both builds send the same requests."""
    k = key_in_vbucket(5)
    line = b"key=t%%5C%%5C%s exp=-1 la=1 cas=1 fetch=no cls=1 size=70\n" % k[3:]

    def run(mod):
        w = mod.Writer([5], window=16)
        w.check_duplicates = False
        assert w.feed_metadump(line + line + b"END\r\n")
        req = w.fetch_requests()
        w.feed_fetch(meta_answer(req, lambda i, key: (b"VALUE", 7, -1)))
        return w, req

    w, req = run(tap)
    assert meta_gets(req) == [(k, 0), (k, 1), MN]
    assert w.duplicates == 0 and w.entries == 2
    assert [op for op, _ in ops(w.target_requests())] == [0x12, 0x12, 0x0A]  # ADDQ twice, the fence
    assert req == run(_tap_py)[1]
    w.feed_target(response(0x12, 2, opaque=1))  # the second ADD finds the first copy
    assert [op for op, _ in ops(w.target_requests())] == [0x0C]  # GETK
    w.feed_target(response(0x0A, opaque=FENCE) + response(0x0C, 0, k, b"VALUE", struct.pack(">I", 7), opaque=1, cas=3))
    assert w.target_requests() == b""
    assert (w.added, w.kept, w.replaced, w.backlog) == (1, 1, 0, 0)
    on = tap.Writer([5], window=16)
    assert on.check_duplicates is True  # the default: an LRU walk can list an item twice
    on.feed_metadump(line + line + b"END\r\n")
    assert meta_gets(on.fetch_requests()) == [(k, 0), MN] and on.duplicates == 1


def test_a_frame_bigger_than_the_kept_buffers_passes_and_memory_is_given_back(tap):
    big = bytes(range(256)) * (80 * 1024)  # 20 MiB
    stream = mutation(tap, b"t\\\\big", big, flags=9) + mutation(tap, b"t\\\\small", b"s")
    w = tap.Writer(ALL, window=1)
    for i in range(0, len(stream), 1 << 20):
        w.feed_tap(stream[i:i + (1 << 20)])
    out = w.target_requests()
    (add, fence) = frames_of(out)
    assert add.key == b"t\\\\big" and add.value == big and w.backlog == 2
    w.feed_target(ack_fences(out))
    out = w.target_requests()
    assert [f.key for f in frames_of(out) if f.opcode == 0x12] == [b"t\\\\small"]
    w.feed_target(ack_fences(out))
    w.feed_tap(mutation(tap, b"t\\\\after", b"a"))
    w.finish()
    out = w.target_requests()
    w.feed_target(ack_fences(out))
    assert w.done and w.added == 3
