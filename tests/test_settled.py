"""The settled table (astaire.resync.settled): a copy of a record the target was seen holding,
in the same resync, with flags not older, is settled as kept without a request; anything
else goes to the target as before. Both codec builds, and the two builds share one layout."""
from __future__ import annotations

import os

import pytest

from astaire import _tap_py
from astaire.resync import settled
from tests.test_writer import (ALL, FENCE, MN, NOW_MS, ack_fences, binary_set, connect, drive, frames_of,
                               meta_answer, meta_get, meta_gets, mutation, ops, response)

try:
    from tests.codec_impls import _tap_c
except ImportError:  # pragma: no cover - the pure build only
    _tap_c = None


def table(entries=1 << 10):
    return settled.SettledTable(entries)


def writer(tap, t, gen, window=16, **kw):
    return tap.Writer(ALL, window=window, settled=t.buffer, generation=gen, **kw)


def test_the_key_hash_is_the_same_in_both_builds():
    if _tap_c is None:
        pytest.skip("no compiled codec")
    for n in list(range(0, 40)) + [249, 250]:
        key = os.urandom(n)
        assert _tap_c.key_hash64(key) == _tap_py.key_hash64(key)
    # Pinned: every process of a daemon must hash alike, so a change of hash is deliberate.
    assert _tap_py.key_hash64(b"table\\\\key") == 0x81CC6CB0D30E4CFF


def test_a_second_copy_not_newer_is_kept_without_asking_the_target(tap):
    t = table()
    gen = t.next_generation()
    first = writer(tap, t, gen)
    first.feed_tap(mutation(tap, b"t\\\\a", b"A", flags=NOW_MS) + mutation(tap, b"t\\\\b", b"B", flags=NOW_MS))
    first.feed_target(ack_fences(first.target_requests()))  # both added: noted
    assert first.added == 2 and first.deduplicated == 0
    second = writer(tap, t, gen)
    second.feed_tap(mutation(tap, b"t\\\\a", b"A", flags=NOW_MS)            # equal: known
                    + mutation(tap, b"t\\\\b", b"B2", flags=NOW_MS - 1)     # older: known
                    + mutation(tap, b"t\\\\c", b"C", flags=NOW_MS))         # never seen: written
    out = second.target_requests()
    assert [f.key for f in frames_of(out) if f.opcode == 0x12] == [b"t\\\\c"]
    assert (second.kept, second.deduplicated, second.entries) == (2, 2, 3)
    second.feed_target(ack_fences(out))
    second.finish()
    assert second.done and second.stats()["deduplicated"] == 2


def test_a_newer_copy_goes_to_the_target_and_a_kept_copy_notes_the_local_flags(tap):
    t = table()
    gen = t.next_generation()
    first = writer(tap, t, gen)
    first.feed_tap(mutation(tap, b"t\\\\k", b"R", flags=NOW_MS))
    assert ops(first.target_requests()) == [(0x12, 0), (0x0A, FENCE)]
    first.feed_target(response(0x12, 2, opaque=0))  # present: read it
    assert ops(first.target_requests()) == [(0x0C, 0)]
    first.feed_target(response(0x0A, opaque=FENCE))
    first.feed_target(response(0x0C, 0, b"t\\\\k", b"LOCAL", (NOW_MS + 50).to_bytes(4, "big"), opaque=0, cas=9))
    assert first.kept == 1  # the local copy is newer: noted with its flags, NOW_MS + 50
    second = writer(tap, t, gen)
    second.feed_tap(mutation(tap, b"t\\\\k", b"R2", flags=NOW_MS + 50))   # not newer than the local copy
    assert second.target_requests() == b"" and second.deduplicated == 1
    second.feed_tap(mutation(tap, b"t\\\\k", b"R3", flags=NOW_MS + 51))   # newer: the conflict rule runs
    assert ops(second.target_requests()) == [(0x12, 0), (0x0A, FENCE)]
    assert second.deduplicated == 1


def test_a_copy_whose_add_finds_the_key_noted_meanwhile_is_kept_without_a_read(tap):
    """Both old replicas' streams send their copy of a key at about the same time: one ADD
    wins, and by the time the other learns that its ADD found the key present, the winner
    has noted it. Reading the local copy back (GETK, value and all) would tell nothing new."""
    t = table()
    gen = t.next_generation()
    first, second = writer(tap, t, gen), writer(tap, t, gen)
    first.feed_tap(mutation(tap, b"t\\\\a", b"A", flags=NOW_MS) + mutation(tap, b"t\\\\b", b"B", flags=NOW_MS))
    second.feed_tap(mutation(tap, b"t\\\\a", b"A", flags=NOW_MS)           # equal to the note: kept
                    + mutation(tap, b"t\\\\b", b"B2", flags=NOW_MS + 1))   # newer than the note: read
    first_out, second_out = first.target_requests(), second.target_requests()
    assert ops(second_out) == [(0x12, 0), (0x12, 1), (0x0A, FENCE)]  # neither noted yet: both ADDs go
    first.feed_target(ack_fences(first_out))  # the first stream's ADDs won: noted
    second.feed_target(response(0x12, 2, opaque=0) + response(0x12, 2, opaque=1))  # both present
    assert ops(second.target_requests()) == [(0x0C, 1)]  # only the newer copy is read
    assert (second.kept, second.deduplicated) == (1, 1)
    second.feed_target(response(0x0A, opaque=FENCE)
                       + response(0x0C, 0, b"t\\\\b", b"B", NOW_MS.to_bytes(4, "big"), opaque=1, cas=5))
    assert [(f.opcode, f.opaque, f.cas) for f in frames_of(second.target_requests())] == [(0x01, 1, 5)]
    second.feed_target(response(0x01, opaque=1))
    second.finish()
    assert second.done and (second.kept, second.replaced, second.deduplicated) == (1, 1, 1)
    assert second.stats()["deduplicated"] == 1


@pytest.mark.parametrize("noted", [True, False])
def test_auto_mode_reads_first_only_when_found_copies_had_to_be_read(tap, noted):
    """Auto mode turns to reading first when most first requests of a batch found a copy.
    A copy of a key noted meanwhile cost its ADDQ no read (it is kept on the note), so it
    does not count: the second stream of a resize, whose ADDQs mostly meet the first
    stream's noted copies, stays on ADDQs; copies that had to be read turn it to reads."""
    t = table()
    gen = t.next_generation()
    first = writer(tap, t, gen)
    second = writer(tap, t, gen, window=8, mode="auto")  # decides every 2 first answers
    copies = mutation(tap, b"t\\\\p", b"P", flags=NOW_MS) + mutation(tap, b"t\\\\q", b"Q", flags=NOW_MS)
    second.feed_tap(copies)
    assert ops(second.target_requests()) == [(0x12, 0), (0x12, 1), (0x0A, FENCE)]
    if noted:  # the first stream's copies got there first and settled: noted
        first.feed_tap(copies)
        first.feed_target(ack_fences(first.target_requests()))
    second.feed_target(response(0x12, 2, opaque=0) + response(0x12, 2, opaque=1))  # both found present
    assert ops(second.target_requests()) == ([] if noted else [(0x0C, 0), (0x0C, 1)])
    second.feed_tap(mutation(tap, b"t\\\\r", b"R", flags=NOW_MS))
    (first_request,) = [op for op, _ in ops(second.target_requests()) if op != 0x0A]
    assert first_request == (0x12 if noted else 0x0C)  # ADDQ on, or read first
    assert second.read_first == (0 if noted else 1)


def test_a_copy_whose_cas_replace_loses_to_a_noted_key_is_kept_without_a_read(tap):
    """Both streams found the same older local copy and sent their CAS replace; the other
    stream's won and noted the key. The loser's SET comes back EXISTS: if the note is not
    older than its copy, there is nothing left to read; if it is older, the rule runs again."""
    t = table()
    gen = t.next_generation()
    first, second = writer(tap, t, gen), writer(tap, t, gen)
    second.feed_tap(mutation(tap, b"t\\\\c", b"C1", flags=NOW_MS + 1) + mutation(tap, b"t\\\\d", b"D1", flags=NOW_MS + 1))
    assert ops(second.target_requests()) == [(0x12, 0), (0x12, 1), (0x0A, FENCE)]
    second.feed_target(response(0x12, 2, opaque=0) + response(0x12, 2, opaque=1))  # both present
    assert ops(second.target_requests()) == [(0x0C, 0), (0x0C, 1)]
    second.feed_target(response(0x0A, opaque=FENCE)
                       + response(0x0C, 0, b"t\\\\c", b"C0", NOW_MS.to_bytes(4, "big"), opaque=0, cas=5)
                       + response(0x0C, 0, b"t\\\\d", b"D0", NOW_MS.to_bytes(4, "big"), opaque=1, cas=6))
    assert [(f.opcode, f.opaque, f.cas) for f in frames_of(second.target_requests())] == [(0x01, 0, 5), (0x01, 1, 6)]
    first.feed_tap(mutation(tap, b"t\\\\c", b"C1", flags=NOW_MS + 1)    # the same copy: noted, equal
                   + mutation(tap, b"t\\\\d", b"D9", flags=NOW_MS))       # noted, older than second's
    first.feed_target(ack_fences(first.target_requests()))
    second.feed_target(response(0x01, 2, opaque=0) + response(0x01, 2, opaque=1))  # both CAS lost
    assert ops(second.target_requests()) == [(0x0C, 1)]  # only d is read again
    assert (second.kept, second.deduplicated, second.retries) == (1, 1, 1)
    second.feed_target(response(0x0C, 0, b"t\\\\d", b"D9", NOW_MS.to_bytes(4, "big"), opaque=1, cas=7))
    assert [(f.opcode, f.opaque, f.cas) for f in frames_of(second.target_requests())] == [(0x01, 1, 7)]
    second.feed_target(response(0x01, opaque=1))
    second.finish()
    assert second.done and (second.kept, second.replaced, second.deduplicated) == (1, 1, 1)


def test_notes_of_another_generation_or_another_table_count_for_nothing(tap):
    t = table()
    gen = t.next_generation()
    first = writer(tap, t, gen)
    first.feed_tap(mutation(tap, b"t\\\\g", b"G", flags=NOW_MS))
    first.feed_target(ack_fences(first.target_requests()))
    other_gen = writer(tap, t, gen % 255 + 1)  # a later resync (whose start would also clear the table)
    other_gen.feed_tap(mutation(tap, b"t\\\\g", b"G", flags=NOW_MS))
    assert [f.key for f in frames_of(other_gen.target_requests()) if f.opcode == 0x12] == [b"t\\\\g"]
    cleared = writer(tap, t, t.next_generation())
    cleared.feed_tap(mutation(tap, b"t\\\\g", b"G", flags=NOW_MS))
    assert cleared.deduplicated == 0
    plain = tap.Writer(ALL, window=16)  # no table: as before
    plain.feed_tap(mutation(tap, b"t\\\\g", b"G", flags=NOW_MS))
    assert plain.deduplicated == 0 and plain.stats()["deduplicated"] == 0


def test_the_builds_read_each_others_notes():
    if _tap_c is None:
        pytest.skip("no compiled codec")
    for a, b in ((_tap_c, _tap_py), (_tap_py, _tap_c)):
        t = table()
        gen = t.next_generation()
        w = writer(a, t, gen)
        w.feed_tap(mutation(a, b"t\\\\x", b"X", flags=7))
        w.feed_target(ack_fences(w.target_requests()))
        r = writer(b, t, gen)
        r.feed_tap(mutation(b, b"t\\\\x", b"X", flags=7))
        assert r.deduplicated == 1 and r.target_requests() == b""


@pytest.mark.parametrize("bad", [bytearray(24), bytearray(48), bytes(32), bytearray(0)])
def test_a_table_of_the_wrong_shape_or_a_bad_generation_is_refused(tap, bad):
    with pytest.raises(ValueError):
        tap.Writer(ALL, settled=bad, generation=1)
    with pytest.raises(ValueError):
        tap.Writer(ALL, settled=bytearray(32), generation=0)
    with pytest.raises(ValueError):
        tap.Writer(ALL, settled=bytearray(32), generation=256)


def test_with_real_memcached_the_second_copy_changes_nothing_and_newer_data_wins(tap, memcached):
    """Two streams of the same records through one table into a real memcached, a client
    writing newer data between them: the final state is the conflict rule's."""
    t = table(1 << 16)
    gen = t.next_generation()
    recs = [(b"t\\\\s%d" % i, b"v%d" % i, NOW_MS + i) for i in range(300)]
    stream = b"".join(mutation(tap, k, v, f) for k, v, f in recs)
    with connect(memcached) as target:
        first = writer(tap, t, gen)
        first.feed_tap(stream)
        first.finish()
        drive(first, target)
    assert first.added == 300
    binary_set(memcached, [(b"t\\\\s5", b"CLIENT", NOW_MS + 1000, 0)])  # a client's newer write
    with connect(memcached) as target:
        second = writer(tap, t, gen)
        second.feed_tap(stream + mutation(tap, b"t\\\\s7", b"NEWER", NOW_MS + 2000))
        second.finish()
        drive(second, target)
    # Direct-mapped: a note can be overwritten by another key's (then the target is asked).
    assert (second.kept, second.replaced, second.added, second.failed) == (300, 1, 0, 0)
    assert second.deduplicated > 290
    assert meta_get(memcached, b"t\\\\s5")[:2] == (b"CLIENT", NOW_MS + 1000)
    assert meta_get(memcached, b"t\\\\s7")[:2] == (b"NEWER", NOW_MS + 2000)
    assert meta_get(memcached, b"t\\\\s8")[:2] == (b"v8", NOW_MS + 8)


# -- holding back (Writer ``hold``) -----------------------------------------------------------

HOLD_FOR = 4 * 16  # entries a held copy waits, for the window of 16 these tests use (HOLD_WINDOWS)


def keys_with_top_bit(bit, n, prefix=b"t\\\\h"):
    """``n`` keys whose key_hash64 has ``bit`` as its top bit (what ``hold`` sorts by)."""
    out, i = [], 0
    while len(out) < n:
        key = prefix + b"%d" % i
        i += 1
        if _tap_py.key_hash64(key) >> 63 == bit:
            out.append(key)
    return out


def holding(tap, t, gen, bit, **kw):
    return writer(tap, t, gen, hold=[(vb, bit) for vb in ALL], **kw)


def added_keys(out):
    return [f.key for f in frames_of(out) if f.opcode == 0x12]


def answer_all(w):
    """Send what ``w`` has, every quiet ADD succeeding, until it has nothing more; the keys
    it added, in order."""
    keys = []
    while out := w.target_requests():
        keys += added_keys(out)
        w.feed_target(ack_fences(out))
    return keys


def test_a_held_copy_waits_for_the_other_streams_note_and_then_costs_nothing(tap):
    t = table()
    gen = t.next_generation()
    held, sent = keys_with_top_bit(1, 3), keys_with_top_bit(0, 2)
    w = holding(tap, t, gen, 1)
    w.feed_tap(b"".join(mutation(tap, k, b"V", flags=NOW_MS) for k in held + sent))
    out = w.target_requests()
    assert added_keys(out) == sent                      # the held copies are not sent ...
    assert (w.held, w.backlog, w.entries) == (3, 2, 5)  # ... nor counted in the backlog
    w.feed_target(ack_fences(out))
    other = holding(tap, t, gen, 0)                     # the other old replica's stream
    other.feed_tap(b"".join(mutation(tap, k, b"V", flags=NOW_MS) for k in held))
    out = other.target_requests()
    assert added_keys(out) == held  # its half: sent at once, then noted
    other.finish()
    other.feed_target(ack_fences(out + other.target_requests()))
    assert other.done and other.added == 3
    filler = keys_with_top_bit(0, HOLD_FOR, prefix=b"t\\\\f")
    w.feed_tap(b"".join(mutation(tap, k, b"F", flags=NOW_MS) for k in filler))
    assert answer_all(w) == filler                      # the held ones, due now, were known: never sent
    assert (w.deduplicated, w.kept) == (3, 3)
    w.finish()
    assert answer_all(w) == []
    assert w.done and (w.added, w.kept, w.entries) == (2 + HOLD_FOR, 3, 5 + HOLD_FOR)
    assert w.stats()["held"] == 3


def test_held_copies_nobody_noted_are_written_when_the_source_ends(tap):
    t = table()
    gen = t.next_generation()
    held = keys_with_top_bit(0, 4)
    w = holding(tap, t, gen, 0)
    w.feed_tap(b"".join(mutation(tap, k, b"V%d" % i, flags=NOW_MS) for i, k in enumerate(held)))
    assert w.target_requests() == b"" and w.held == 4
    w.finish()
    assert not w.done  # held copies keep the stream from ending
    out = w.target_requests()
    assert added_keys(out) == held  # in the order they came
    assert not w.done
    w.feed_target(ack_fences(out))
    assert w.done and (w.added, w.deduplicated) == (4, 0)


def test_too_many_held_copies_are_pressed_out_oldest_first(tap):
    t = table()
    gen = t.next_generation()
    held = keys_with_top_bit(1, HOLD_FOR + 5)
    w = holding(tap, t, gen, 1)
    w.feed_tap(b"".join(mutation(tap, k, b"V", flags=NOW_MS) for k in held))
    out = w.target_requests()
    assert added_keys(out) == held[:5]  # the count cap presses out what exceeds it, oldest first
    assert w.held == HOLD_FOR + 5 and w.backlog == 5
    w.feed_target(ack_fences(out))
    w.finish()
    assert answer_all(w) == held[5:]  # the rest at the end: none lost, order kept
    assert w.done and w.added == HOLD_FOR + 5


def test_both_builds_hold_and_release_alike():
    if _tap_c is None:
        pytest.skip("no compiled codec")
    keys = keys_with_top_bit(1, 40) + keys_with_top_bit(0, 40, prefix=b"t\\\\o")
    stream = b"".join(mutation(_tap_py, k, b"V" * (i % 7), flags=NOW_MS + i) for i, k in enumerate(keys))
    outs = []
    for tap in (_tap_c, _tap_py):
        t = table()
        gen = t.next_generation()
        noter = writer(tap, t, gen)  # notes half the held keys, as the other stream would
        noter.feed_tap(b"".join(mutation(tap, k, b"V", flags=NOW_MS + 100) for k in keys[:20]))
        answer_all(noter)
        w = holding(tap, t, gen, 1, window=4)
        trace = []
        for i in range(0, len(stream), 97):
            w.feed_tap(stream[i:i + 97])
            out = w.target_requests()
            trace.append(out)
            w.feed_target(ack_fences(out))
        w.finish()
        while not w.done:
            out = w.target_requests()
            trace.append(out)
            w.feed_target(ack_fences(out))
        outs.append((trace, w.stats()))
    assert outs[0] == outs[1]
    # The noted half is known on arrival; the other half of the held keys is held, then written.
    assert (outs[0][1]["held"], outs[0][1]["deduplicated"], outs[0][1]["added"]) == (20, 20, 60)


# -- deferring crawler fetches (``hold`` on a crawler stream) ----------------------------------

DEFER_FOR = 16 * 16  # listed keys a deferred fetch waits, for the window of 16 (DEFER_WINDOWS)


def listing(keys, size=4200):
    return b"".join(b"key=%s exp=-1 la=1 cas=1 fetch=no cls=1 size=%d\n" % (k, size) for k in keys)


def fetched_keys(req):
    return [g[0] for g in meta_gets(req) if g != MN]


def serve(w, value=b"V" * 3000, flags=NOW_MS, flags_only=None):
    """Answer every fetch ``w`` asks for, and every target request, until it asks nothing
    more; the keys it fetched and the keys it added, in order (and into ``flags_only`` the
    keys it asked the flags alone of)."""
    fetched, added = [], []
    while True:
        req = w.fetch_requests()
        fetched += fetched_keys(req)
        if flags_only is not None:
            flags_only += [g[0] for g in meta_gets(req) if len(g) == 3]
        if req:
            w.feed_fetch(meta_answer(req, lambda i, key: (value, flags, -1)))
        out = w.target_requests()
        added += added_keys(out)
        if out:
            w.feed_target(ack_fences(out))
        if not req and not out:
            return fetched, added


def test_a_crawler_stream_defers_large_fetches_of_its_half_until_the_other_stream_noted_them(tap):
    t = table(1 << 16)
    gen = t.next_generation()
    mine, small, theirs = keys_with_top_bit(1, 3), keys_with_top_bit(1, 2, prefix=b"t\\\\s"), keys_with_top_bit(0, 2)
    w = holding(tap, t, gen, 1)
    w.feed_metadump(listing(mine) + listing(small, size=60) + listing(theirs))
    fetched, added = serve(w)
    assert fetched == small + theirs  # small items are not worth waiting for: fetched at once
    assert (w.held, w.fetch_backlog, w.done) == (3, 0, False)  # the deferred wait outside the backlog
    other = writer(tap, t, gen)  # the other old replica's stream writes them: noted
    other.feed_tap(b"".join(mutation(tap, k, b"V", flags=NOW_MS) for k in mine))
    assert answer_all(other) == mine
    filler = keys_with_top_bit(0, DEFER_FOR, prefix=b"t\\\\f")
    w.feed_metadump(listing(filler))
    req = w.fetch_requests()
    gets = meta_gets(req)
    assert [g for g in gets if len(g) == 3] == []  # the filler first: the deferred are not due yet
    w.feed_fetch(meta_answer(req, lambda i, key: (b"V" * 3000, NOW_MS, -1)))
    flags_only = []
    fetched, added = serve(w, flags_only=flags_only)
    assert fetched[-3:] == mine and set(fetched[:-3]) | {g[0] for g in gets if g != MN} == set(filler)
    assert flags_only == mine  # noted by then: the source is asked their flags alone (no value travels)
    assert mine[0] not in added and (w.deduplicated, w.kept) == (3, 3)  # known: kept without a request
    assert w.feed_metadump(b"END\r\n")
    w.finish()
    assert serve(w) == ([], []) and w.done
    assert (w.added, w.held, w.entries) == (4 + DEFER_FOR, 3, 7 + DEFER_FOR)


def test_deferred_fetches_nobody_noted_are_fetched_and_written_once_the_listing_ends(tap):
    t = table()
    gen = t.next_generation()
    keys = keys_with_top_bit(0, 4)
    w = holding(tap, t, gen, 0)
    w.feed_metadump(listing(keys))
    assert serve(w) == ([], []) and w.held == 4
    assert w.feed_metadump(b"END\r\n")
    assert not w.done  # deferred fetches keep the stream from ending
    w.finish()
    assert serve(w) == (keys, keys)  # in the order they were listed
    assert w.done and (w.added, w.deduplicated) == (4, 0)


def test_a_newer_deferred_copy_is_still_written(tap):
    t = table()
    gen = t.next_generation()
    keys = keys_with_top_bit(1, 2)
    other = writer(tap, t, gen)
    other.feed_tap(b"".join(mutation(tap, k, b"old", flags=NOW_MS) for k in keys))
    answer_all(other)
    w = holding(tap, t, gen, 1)
    w.feed_metadump(listing(keys) + b"END\r\n")
    w.finish()
    req = w.fetch_requests()
    assert meta_gets(req) == [(k, i, "flags") for i, k in enumerate(keys)] + [MN]  # noted: flags alone first
    w.feed_fetch(meta_answer(req, lambda i, key: (b"new", NOW_MS + 1, -1)))
    assert w.target_requests() == b"" and w.refetched == 2 and w.entries == 0
    req = w.fetch_requests()
    assert meta_gets(req) == [(k, 2 + i) for i, k in enumerate(keys)] + [MN]  # newer: fetched whole
    w.feed_fetch(meta_answer(req, lambda i, key: (b"new", NOW_MS + 1, -1)))
    out = w.target_requests()
    assert added_keys(out) == keys and w.deduplicated == 0  # newer than the note: to the target, by the rule
    w.feed_target(ack_fences(out))
    assert w.done and (w.entries, w.added) == (2, 2)


@pytest.mark.parametrize("answer, error", [
    (lambda o: b"HD f1 O%d\r\n" % o, "UnexpectedFrame"),            # flags alone, for a value fetch
    (lambda o: b"HD f1\r\n", "MalformedFrame"),                      # no opaque
    (lambda o: b"HD fx O%d\r\n" % o, "MalformedFrame"),              # bad flags
])
def test_a_bad_flags_answer_is_a_protocol_error(tap, answer, error):
    w = tap.Writer(ALL, window=16)
    w.feed_metadump(listing([b"t\\\\k"]))
    (key, opaque), mn = meta_gets(w.fetch_requests())
    with pytest.raises(getattr(tap, error)):
        w.feed_fetch(answer(opaque))


def test_a_value_for_a_flags_only_fetch_is_a_protocol_error(tap):
    t = table()
    gen = t.next_generation()
    key = keys_with_top_bit(1, 1)[0]
    other = writer(tap, t, gen)
    other.feed_tap(mutation(tap, key, b"V", flags=NOW_MS))
    answer_all(other)
    w = holding(tap, t, gen, 1)
    w.feed_metadump(listing([key]) + b"END\r\n")
    (k, opaque, kind), mn = meta_gets(w.fetch_requests())
    with pytest.raises(tap.UnexpectedFrame):
        w.feed_fetch(b"VA 1 f1 t-1 O%d\r\nV\r\n" % opaque)


def test_too_many_deferred_fetches_are_pressed_out_oldest_first(monkeypatch):
    keys = [k for k in keys_with_top_bit(1, 40, prefix=b"t\\\\p") if len(k) == 6][:5]
    assert len(keys) == 5
    monkeypatch.setattr(_tap_py, "DEFER_BYTES", 3 * (_tap_py._DEFER_REC + 6))  # room for three of them
    t = table()
    w = holding(_tap_py, t, t.next_generation(), 1)
    w.feed_metadump(listing(keys))
    assert fetched_keys(w.fetch_requests()) == keys[:2] and w.held == 5


@pytest.mark.parametrize("fields, deferred", [
    (b"size=5000", True), (b"size=1024", True), (b"size=1023", False), (b"", False), (b"size=", False),
    (b"size=12x", False), (b"size=2000x", True), (b" size=2000", True), (b"size=99999999999999", True),
    # read from the line's end: the last size= counts
    (b"size=10 size=5000", True), (b"size=5000 size=10", False), (b"cls=1 size=3000 fetch=no", True),
    (b"size=3000 flags=0", True), (b"sizes=5000", False), (b"size=5000  ", True),
])
def test_the_listed_size_is_read_alike_by_both_builds(fields, deferred):
    if _tap_c is None:
        pytest.skip("no compiled codec")
    key = keys_with_top_bit(1, 1)[0]
    for tap in (_tap_c, _tap_py):
        t = table()
        w = holding(tap, t, t.next_generation(), 1)
        w.feed_metadump(b"key=%s exp=-1 la=1 cas=1 %s\n" % (key, fields))
        assert (w.held, fetched_keys(w.fetch_requests())) == ((1, []) if deferred else (0, [key])), tap


def test_both_builds_defer_and_release_fetches_alike():
    if _tap_c is None:
        pytest.skip("no compiled codec")
    keys = (keys_with_top_bit(1, 90) + keys_with_top_bit(0, 60, prefix=b"t\\\\o")
            + keys_with_top_bit(1, 30, prefix=b"t\\\\q"))
    text = b"".join(b"key=%s exp=%d la=1 cas=1 fetch=no cls=1 size=%d\n" % (k, -1 if i % 3 else 5000 + i,
                                                                           500 if i % 11 == 0 else 2000 + i)
                    for i, k in enumerate(keys)) + b"END\r\n"
    outs = []
    for tap in (_tap_c, _tap_py):
        t = table()
        gen = t.next_generation()
        noter = writer(tap, t, gen)  # notes a third of the keys, as the other stream would
        noter.feed_tap(b"".join(mutation(tap, k, b"V", flags=NOW_MS + 50) for k in keys[::3]))
        answer_all(noter)
        w = holding(tap, t, gen, 1, window=4)
        trace = []

        def step():
            req = w.fetch_requests()
            out = w.target_requests()
            trace.append((req, out))
            if req:
                w.feed_fetch(meta_answer(req, lambda j, key: (b"v" * (j % 5), NOW_MS + j % 100, -1)))
            if out:
                w.feed_target(ack_fences(out))

        for i in range(0, len(text), 101):
            w.feed_metadump(text[i:i + 101])
            step()
            step()
        w.finish()
        while not w.done:
            step()
        outs.append((trace, w.stats()))
    assert outs[0] == outs[1]
    st = outs[0][1]
    assert st["held"] > 50 and st["deduplicated"] > 0 and st["entries"] == len(keys)


def test_hold_is_checked_and_needs_a_table(tap):
    t = table()
    with pytest.raises(ValueError, match="not a wanted vbucket"):
        tap.Writer([1, 2], settled=t.buffer, generation=1, hold=[(3, 0)])
    with pytest.raises(ValueError, match="bit must be 0 or 1"):
        tap.Writer([1, 2], settled=t.buffer, generation=1, hold=[(1, 2)])
    plain = tap.Writer(ALL, window=16, hold=[(vb, 0) for vb in ALL])  # no table: nothing to wait for
    plain.feed_tap(b"".join(mutation(tap, k) for k in keys_with_top_bit(0, 3)))
    assert plain.held == 0 and len(added_keys(plain.target_requests())) == 3


def test_with_real_memcached_two_holding_streams_place_everything_once(tap, memcached):
    """Two streams of the same records, holding opposite halves, into a real memcached: every
    record lands, and each key costs the target one write."""
    t = table(1 << 16)
    gen = t.next_generation()
    recs = [(b"t\\\\r%d" % i, b"v%d" % i, NOW_MS + i) for i in range(500)]
    stream = b"".join(mutation(tap, k, v, f) for k, v, f in recs)
    first, second = holding(tap, t, gen, 0), holding(tap, t, gen, 1)
    with connect(memcached) as target:
        first.feed_tap(stream)
        first.finish()
        drive(first, target)
    with connect(memcached) as target:
        second.feed_tap(stream)
        second.finish()
        drive(second, target)
    assert first.added == 500 and first.held > 200
    assert (second.added, second.kept, second.failed) == (0, 500, 0)
    assert second.deduplicated > 490 and second.target_requests() == b""
    for k, v, f in recs[::50]:
        assert meta_get(memcached, k)[:2] == (v, f)


# -- flags in the listing (memcached 1.6.24 on: ``flags=``) -------------------------------------

def noted(tap, t, gen, keys, flags=NOW_MS):
    """The other old replica's stream wrote ``keys`` with ``flags``: the table notes them."""
    other = writer(tap, t, gen)
    other.feed_tap(b"".join(mutation(tap, k, b"V", flags=flags) for k in keys))
    assert answer_all(other) == keys


def test_a_copy_listed_with_flags_not_newer_than_the_note_is_kept_without_a_fetch(tap):
    t = table()
    gen = t.next_generation()
    equal, older, newer, unknown = (keys_with_top_bit(1, 1, prefix=p) for p in (b"t\\\\e", b"t\\\\o", b"t\\\\n", b"t\\\\u"))
    noted(tap, t, gen, equal + older + newer)
    w = writer(tap, t, gen)
    lines = [b"key=%s exp=-1 la=1 cas=1 fetch=no cls=1 size=60 flags=%d\n" % (k, f)
             for k, f in ((equal[0], NOW_MS), (older[0], NOW_MS - 1), (newer[0], NOW_MS + 1), (unknown[0], NOW_MS))]
    w.feed_metadump(b"".join(lines))
    req = w.fetch_requests()
    assert meta_gets(req) == [(newer[0], 0, "flags"), (unknown[0], 1), MN]  # the kept two: no request at all
    st = w.stats()
    assert (st["kept_as_listed"], st["kept"], st["deduplicated"]) == (2, 2, 2)
    assert (st["entries"], st["bytes"]) == (2, len(lines[0]) + len(lines[1]))
    w.feed_fetch(meta_answer(req, lambda i, key: (b"V", NOW_MS + 1, -1)))  # the newer one is fetched whole
    fetched, added = serve(w, value=b"V", flags=NOW_MS + 1)
    assert fetched == newer and set(added) == {newer[0], unknown[0]}
    assert w.feed_metadump(b"END\r\n")
    w.finish()
    assert serve(w) == ([], []) and w.done and w.stats()["entries"] == 4


@pytest.mark.parametrize("fields, kept", [
    (b"flags=%d" % NOW_MS, True), (b"size=60 flags=%d" % NOW_MS, True), (b"flags=%d  " % NOW_MS, True),
    (b"flags=%011d" % NOW_MS, False),  # eleven digits: not a listed flag
    (b"flags=", False), (b"flags=12x", False), (b"flags=-1", False), (b"flags=4294967296", False),
    (b"flags=99999999999", False), (b"flag=%d" % NOW_MS, False), (b"", False),
    (b"flags=1 flags=%d" % NOW_MS, True), (b"flags=%d flags=x" % NOW_MS, False),  # the last field counts
    (b"flags=%d size=60" % NOW_MS, False),  # flags= is memcached's last field: another last field, no flags
])
def test_the_listed_flags_are_read_alike_by_both_builds(fields, kept):
    """Only a well-formed ``flags=`` as the line's last field (1-10 ASCII digits, at most
    0xFFFFFFFF) spares a fetch; anything else and the copy is fetched as from 1.6.18."""
    key = keys_with_top_bit(1, 1)[0]
    taps = (_tap_py,) if _tap_c is None else (_tap_c, _tap_py)
    for tap in taps:
        t = table()
        gen = t.next_generation()
        noted(tap, t, gen, [key], flags=NOW_MS)
        w = writer(tap, t, gen)
        w.feed_metadump(b"key=%s exp=-1 la=1 cas=1 %s\n" % (key, fields))
        assert (w.kept_as_listed, fetched_keys(w.fetch_requests())) == ((1, []) if kept else (0, [key])), tap


def test_the_first_key_line_tells_whether_the_server_lists_flags(tap):
    """memcached lists flags on every line (1.6.24 on) or on none: after a first key line
    without them, later lines are not searched (their copies are fetched), which spares a
    1.6.18 listing the search on every line."""
    t = table()
    gen = t.next_generation()
    keys = keys_with_top_bit(1, 3, prefix=b"t\\\\ff")
    noted(tap, t, gen, keys)
    with_flags = [b"key=%s exp=-1 la=1 cas=1 fetch=no cls=1 size=60 flags=%d\n" % (k, NOW_MS) for k in keys]
    w = writer(tap, t, gen)
    w.feed_metadump(b"".join(with_flags))
    assert (w.kept_as_listed, fetched_keys(w.fetch_requests())) == (3, [])
    w = writer(tap, t, gen)
    w.feed_metadump(b"key=%s exp=-1 la=1 cas=1 fetch=no cls=1 size=60\n" % keys[0] + b"".join(with_flags[1:]))
    assert (w.kept_as_listed, fetched_keys(w.fetch_requests())) == (0, keys)


def test_a_deferred_copy_listed_with_flags_is_kept_without_a_fetch_once_noted(tap):
    t = table(1 << 16)
    gen = t.next_generation()
    mine = keys_with_top_bit(1, 3)
    w = holding(tap, t, gen, 1)
    w.feed_metadump(b"".join(b"key=%s exp=-1 la=1 cas=1 fetch=no cls=1 size=4200 flags=%d\n" % (k, NOW_MS)
                             for k in mine))
    assert serve(w) == ([], []) and w.held == 3  # not noted yet when listed: deferred
    noted(tap, t, gen, mine[:2])
    assert w.feed_metadump(b"END\r\n")
    w.finish()
    fetched, added = serve(w)
    assert fetched == mine[2:] and added == mine[2:]  # the noted two: no fetch; the third written
    assert w.done and (w.kept_as_listed, w.kept, w.added, w.entries) == (2, 2, 1, 3)


def test_with_real_memcached_listing_flags_a_second_stream_fetches_only_what_is_newer(cluster_factory,
                                                                                      memcached_flags):
    """Two streams from two real memcached 1.6.38 sources (which list flags) into one
    target: the second stream fetches nothing the listing shows it would keep, and the
    newer copies it holds still win."""
    from astaire.resync.stream import StreamJob, run_stream
    from tests.test_stream_tap import keys_in, mc_get_many, mc_store
    a, b, target = cluster_factory(3, memory_mb=64, exe=memcached_flags).servers
    keys = keys_in(ALL, b"t\\\\lf", 600)
    newer = set(keys[::10])
    mc_store(a, [(k, b"a:" + k, NOW_MS, 0) for k in keys])
    mc_store(b, [(k, (b"b:" if k in newer else b"a:") + k, NOW_MS + 5 if k in newer else NOW_MS, 0) for k in keys])
    gen = settled.create().next_generation()
    results = [run_stream(StreamJob(source=s.name, vbuckets=list(ALL), target=target.name, source_kind="crawler",
                                    settled_generation=gen)) for s in (a, b)]
    assert all(r.ok for r in results), [r.error for r in results]
    first, second = (r.stats for r in results)
    assert first["added"] == len(keys) and first["kept_as_listed"] == 0
    assert second["kept"] == len(keys) - len(newer) and second["replaced"] == len(newer)
    # kept on their listed flags alone; a few whose notes two other keys pushed out of their
    # bucket were fetched (flags only) first
    assert second["kept_as_listed"] >= 0.98 * second["kept"]
    got = mc_get_many(target, keys)
    for k in keys:
        assert got[k][:2] == ((b"b:" if k in newer else b"a:") + k, NOW_MS + 5 if k in newer else NOW_MS), k
