"""Property tests: random valid and corrupted TAP streams cut into random chunks give the
same records or the same error (class, offset, message) from FrameParser + decode,
filter_mutations / filter_count and Writer.feed_tap, in each build and across builds;
the Writer plays the conflict rule against a model memcached with racing clients and
never overwrites newer data; encoders, hash and metadump parsing agree across builds.

Each test runs once per build (the ``tap`` fixture) and compares it with the pure
reference, so the compiled build is checked against the pure one example by example.
"""
from __future__ import annotations

import hashlib
import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from astaire import _tap_py as ref
from astaire.protocol_errors import ProtocolError, TapNotSupported, UnexpectedFrame

from codec_impls import IMPLS
from test_writer import meta_answer


@pytest.fixture(scope="module", params=IMPLS)
def tap(request):
    return request.param


# Per build: each property sees twice this many examples per session (pure + compiled).
# ASTAIRE_FUZZ_EXAMPLES raises it for a longer soak.
EXAMPLES = int(os.environ.get("ASTAIRE_FUZZ_EXAMPLES", "2500"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
HEADER = struct.Struct(">BBHBBHIIQ")
MAX_BODY = 4096
OWN = b"astaire\\\\"


def response(opcode, status=0, key=b"", value=b"", extras=b"", opaque=0, cas=0):
    return HEADER.pack(0x81, opcode, len(key), len(extras), 0, status, len(extras) + len(key) + len(value),
                       opaque, cas) + extras + key + value


# -- strategies --------------------------------------------------------------------------
#
# Each example is one drawn byte string decoded by ``Blob`` into frames, chunk sizes and
# scripts: drawing dozens of small values per example made data generation, not the code
# under test, dominate the run time. Shrinking still works (towards zero bytes).


class Blob:
    def __init__(self, data):
        self.data = data
        self.i = 0

    def byte(self):
        if self.i >= len(self.data):
            return 0
        self.i += 1
        return self.data[self.i - 1]

    def int(self, hi):
        """0..hi inclusive."""
        v = 0
        for _ in range(max(1, (hi.bit_length() + 7) // 8)):
            v = (v << 8) | self.byte()
        return v % (hi + 1)

    def u32(self):
        return self.int(2**32 - 1)

    def bytes(self, maxlen):
        n = self.int(maxlen)
        out = self.data[self.i:self.i + n]
        self.i += n
        return out

    def choice(self, seq):
        return seq[self.int(len(seq) - 1)]


# Zero bytes (what an exhausted or shrunk blob reads as) decode to the plain cases.
blobs = st.binary(min_size=100, max_size=1000)


def key_from(b):
    form = b.int(4)
    if form == 0:
        return b.bytes(24)
    if form == 1:
        return b.bytes(80)
    if form == 2:
        return b"t\\\\" + b.bytes(20)
    if form == 3:
        return OWN + b.bytes(4)
    return b.choice([b"astaire\\", b"astaire", OWN])


def mutation_from(b):
    return ref.encode_tap_mutation(key_from(b), b.bytes(40), b.u32(), b.u32(), b.int(2**64 - 1), b.int(255),
                                   b.int(0xFFFF), b.bytes(6))


def corrupt_from(b):
    kind = b.int(7)
    if kind == 0:  # bad magic
        m = b.byte()
        return bytes([0 if m in (0x80, 0x81) else m]) + b.bytes(30)
    if kind == 1:  # the server has no TAP
        return response(0x40, b.int(0xFFFF))
    if kind == 2:  # a request with no place on a TAP stream
        op = b.byte()
        return ref.encode_request(0 if 0x41 <= op <= 0x47 else op, b"k", b"v")
    if kind == 3:  # a response other than TAP_CONNECT's
        op = b.byte()
        return response(0 if op == 0x40 else op, 0, b"k", b"v")
    if kind == 4:  # TAP_MUTATION extras not 16
        e = b.int(40)
        e = 15 if e == 16 else e
        return HEADER.pack(0x80, 0x41, 1, e, 0, 0, e + 1, 0, 0) + b"\0" * e + b"k"
    if kind == 5:  # engine length beyond key + value
        frame = bytearray(ref.encode_tap_mutation(b"key", b"val"))
        frame[24:26] = (3 + 1 + b.int(300)).to_bytes(2, "big")
        return bytes(frame)
    if kind == 6:  # over the body limit
        return HEADER.pack(0x80, 0x41, 0, 16, 0, 0, MAX_BODY + 1 + b.int(2**32 - MAX_BODY - 2), 0, 0)
    body = b.int(300)  # any header lengths
    return HEADER.pack(0x80, 0x41, b.int(0xFFFF), b.int(255), 0, 0, body, 0, 0) + b"\0" * min(body, 64)


def sizes_from(b, hi=100):
    return [1 + b.int(hi - 1) for _ in range(1 + b.int(7))]


def wanted_from(b):
    if b.int(1) == 0:
        return frozenset(range(128))
    bits = int.from_bytes(b.bytes(16).ljust(16, b"\0"), "little")
    return frozenset(vb for vb in range(128) if bits >> vb & 1)


@st.composite
def tap_streams(draw):
    """(stream bytes, chunk sizes, wanted vbuckets): mostly valid frames, sometimes one
    corrupt frame, a cut end or a flipped byte."""
    b = Blob(draw(blobs))
    frames = []
    for _ in range(b.int(12)):
        if b.int(3):
            frames.append(mutation_from(b))
        else:
            frames.append(ref.encode_request(0x42 + b.int(5), b.bytes(8), b.bytes(8)))
    if b.int(3) == 3:
        frames.insert(b.int(len(frames)), corrupt_from(b))
    data = b"".join(frames)
    trouble = b.int(9)
    if trouble == 8 and data:
        data = data[:b.int(len(data) - 1)]
    elif trouble == 9 and data:
        i = b.int(len(data) - 1)
        data = data[:i] + bytes([b.byte()]) + data[i + 1:]
    return data, sizes_from(b), wanted_from(b)


def cut(data, sizes):
    out, i, k = [], 0, 0
    while i < len(data):
        n = sizes[k % len(sizes)]
        out.append(data[i:i + n])
        i += n
        k += 1
    return out


# -- outcomes of the three paths -----------------------------------------------------------


def err(e):
    return ("error", type(e).__name__, e.offset, str(e))


def mut_tuple(m):
    return (m.key, m.value, m.flags, m.expiration, m.cas, m.ttl, m.tap_flags, m.engine_specific)


def via_parser(tap, chunks):
    """FrameParser + decode_tap_mutation + the TAP stream's rules, applied by hand."""
    parser = tap.FrameParser(MAX_BODY)
    events = []
    try:
        for c in chunks:
            parser.feed(c)
            for f in parser:
                if f.magic == 0x80 and f.opcode == 0x41:
                    events.append(mut_tuple(tap.decode_tap_mutation(f)))
                elif f.magic == 0x80 and 0x42 <= f.opcode <= 0x47:
                    events.append(("other", f.opcode))
                elif f.magic == 0x81 and f.opcode == 0x40:
                    raise TapNotSupported("TAP_CONNECT refused", f.offset)
                else:
                    raise UnexpectedFrame("foreign frame", f.offset)
    except ProtocolError as e:
        return events, err(e)[:3]
    return events, ("ok", parser.offset)


def via_filter(tap, data, wanted):
    try:
        records, consumed = tap.filter_mutations(data, wanted, max_body=MAX_BODY)
    except ProtocolError as e:
        return None, err(e)
    return [mut_tuple(m) for m in records], ("ok", consumed)


def via_count(tap, data, wanted):
    try:
        return tap.filter_count(data, wanted, max_body=MAX_BODY)
    except ProtocolError as e:
        return err(e)


def via_writer(tap, chunks, wanted):
    w = tap.Writer(wanted, window=64, max_body=MAX_BODY)
    accepted = []
    outcome = ("ok",)
    try:
        for c in chunks:
            accepted.append(w.feed_tap(c))
        w.finish()
    except ProtocolError as e:
        outcome = err(e)
    out = w.target_requests()
    stats = w.stats()
    return accepted, outcome, out, stats, w.vbucket_counts()


@FUZZ
@given(stream=tap_streams())
def test_parser_filters_and_writer_agree_on_any_stream(tap, stream):
    data, sizes, wanted = stream
    chunks = cut(data, sizes)
    events, p_outcome = via_parser(tap, chunks)
    muts = [e for e in events if e[0] != "other"]

    # filter_mutations sees the whole buffer: same records up to the same error or end.
    f_records, f_outcome = via_filter(tap, data, range(128))
    if p_outcome[0] == "ok":
        assert f_outcome == ("ok", p_outcome[1]) and f_records == muts
    else:
        assert f_outcome[:3] == p_outcome
    kept = [m for m in muts if ref.vbucket_of(m[0]) in wanted]
    w_records, w_out = via_filter(tap, data, wanted)
    count = via_count(tap, data, wanted)
    if p_outcome[0] == "ok":
        assert w_records == kept
        assert count == (len(kept), len(muts), p_outcome[1])
    else:
        assert count[:3] == p_outcome == w_out[:3]

    # The Writer, fed the same chunks: same error, and exactly the wanted, non-own records,
    # in order, as quiet ADDs.
    accepted, outcome, out, stats, vbc = via_writer(tap, chunks, wanted)
    own = [m for m in muts if m[0].startswith(OWN)]
    records = [m for m in kept if not m[0].startswith(OWN)]
    if p_outcome[0] == "ok":
        truncated = p_outcome[1] != len(data)
        assert outcome[0] == ("error" if truncated else "ok")
        if truncated:
            assert outcome[1:3] == ("MalformedFrame", p_outcome[1])
    else:
        assert outcome[1:3] == p_outcome[1:3]
    assert stats["entries"] == len(records)  # a call that raises keeps what it took before the error
    assert sum(accepted) == len(records) if outcome[0] == "ok" else sum(accepted) <= len(records)
    assert stats["skipped_own"] == len(own)
    assert stats["skipped_unwanted"] == len([m for m in muts if m not in own and ref.vbucket_of(m[0]) not in wanted])
    assert stats["other_tap"] == len(events) - len(muts)
    assert stats["tombstones"] == len([m for m in records if m[1] == b""])
    adds = [(f.key, f.value, f.extras) for f in _frames(out) if f.opcode == 0x12]
    assert adds == [(m[0], m[1], struct.pack(">II", m[2], m[3])) for m in records]
    assert sum(e for e, _ in vbc.values()) == len(records)
    assert set(vbc) == set(wanted)

    # The pure build gives the very same answers, messages included.
    if tap is not ref:
        assert via_filter(tap, data, wanted) == via_filter(ref, data, wanted)
        assert via_count(tap, data, wanted) == via_count(ref, data, wanted)
        assert (accepted, outcome, out, stats, vbc) == via_writer(ref, chunks, wanted)
        assert via_parser(tap, chunks) == via_parser(ref, chunks)


def _frames(data):
    p = ref.FrameParser()
    p.feed(data)
    return p.frames()


@FUZZ
@given(blob=st.binary(min_size=1, max_size=300))
def test_random_bytes_never_crash_or_hang_and_fail_alike(tap, blob):
    b = Blob(blob)
    max_body = b.choice([MAX_BODY, 0, 16, 100])
    sizes = sizes_from(b, 50)
    data = blob[b.i:]
    def run(mod):
        parser = mod.FrameParser(max_body)
        got = []
        try:
            for c in cut(data, sizes):
                parser.feed(c)
                got.extend((f.magic, f.opcode, f.status, f.opaque, f.cas, f.extras, f.key, f.value, f.size, f.offset)
                           for f in parser)
        except ProtocolError as e:
            return got, err(e), parser.buffered
        return got, None, parser.buffered, parser.offset

    result = run(tap)
    if tap is not ref:
        assert result == run(ref)
    w_results = []
    for mod in {tap, ref}:
        w = mod.Writer(range(128), max_body=max_body)
        try:
            for c in cut(data, sizes):
                w.feed_target(c)
            w_results.append(None)
        except ProtocolError as e:
            w_results.append(err(e))
    assert len(set(w_results)) == 1


@FUZZ
@given(key=st.binary(max_size=300))
def test_hash_is_md5_for_any_key(tap, key):
    assert tap.vbucket_hash(key) == int.from_bytes(hashlib.md5(key).digest()[:4], "little")


STORE_OPS = [0x01, 0x02, 0x03, 0x11, 0x12, 0x13]


@FUZZ
@given(blob=blobs)
def test_encoders_match_the_reference_and_parse_back(tap, blob):
    b = Blob(blob)
    reqs = [(b.choice(STORE_OPS) if b.int(1) else b.byte(), b.bytes(30), b.bytes(60), b.u32(), b.u32(), b.u32(),
             b.int(2**64 - 1)) for _ in range(b.int(8))]
    assert tap.encode_batch(reqs) == ref.encode_batch(reqs)
    key, value, flags, exp, opaque, cas = b.bytes(30), b.bytes(60), b.u32(), b.u32(), b.u32(), b.int(2**64 - 1)
    for name in ("add", "addq", "set"):
        got = getattr(tap, "encode_" + name)(key, value, flags, exp, opaque, cas)
        assert got == getattr(ref, "encode_" + name)(key, value, flags, exp, opaque, cas)
        (f,) = _frames(got)
        assert (f.key, f.value, f.extras, f.opaque, f.cas, f.vbucket) == (
            key, value, struct.pack(">II", flags, exp), opaque, cas, 0)
    assert tap.encode_tap_mutation(key, value, flags, exp, cas, opaque & 0xFF, opaque & 0xFFFF, value[:5], opaque) == \
        ref.encode_tap_mutation(key, value, flags, exp, cas, opaque & 0xFF, opaque & 0xFFFF, value[:5], opaque)
    assert tap.encode_getk(key, opaque) == ref.encode_getk(key, opaque)
    assert tap.encode_delete(key, opaque, cas) == ref.encode_delete(key, opaque, cas)


# -- the Writer against a model memcached with racing clients ------------------------------

# Flags near the wrap point, in increasing (wrap-safe) order.
TIMES = [0xFFFFFFF0, 0xFFFFFFFF, 0, 5, 10, 100]


def newer(a, b):
    """int32(a - b) > 0."""
    d = (a - b) & 0xFFFFFFFF
    return d != 0 and d < 0x80000000


class ModelMemcached:
    """Enough of memcached's binary protocol for the Writer: ADD(Q), GETK, SET with CAS,
    NOOP, in order. Checks, at the moment of every write, that the Writer only ever
    replaces an older copy."""

    def __init__(self, items, big_keys):
        self.items = dict(items)  # key -> [value, flags, cas]
        self.cas = 100
        self.big = big_keys
        self.parser = ref.FrameParser()

    def write(self, key, value, flags):
        self.cas += 1
        self.items[key] = [value, flags, self.cas]

    def handle(self, data):
        self.parser.feed(data)
        out = bytearray()
        for f in self.parser:
            assert f.magic == 0x80 and f.vbucket == 0
            op, key, o = f.opcode, f.key, f.opaque
            if op == 0x0A:
                out += response(0x0A, opaque=o)
                continue
            assert op in (0x12, 0x02, 0x0C, 0x01), op  # never a delete, never a blind set
            if op in (0x12, 0x02, 0x01) and key in self.big:
                out += response(op, 0x03, value=b"Too large.", opaque=o)
            elif op in (0x12, 0x02):
                if key in self.items:
                    out += response(op, 0x02, value=b"Data exists for key.", opaque=o)
                else:
                    self.write(key, f.value, struct.unpack(">I", f.extras[:4])[0])
                    if op == 0x02:
                        out += response(op, opaque=o, cas=self.cas)
            elif op == 0x0C:
                item = self.items.get(key)
                if item is None:
                    out += response(op, 0x01, key, b"Not found", opaque=o)
                else:
                    out += response(op, 0, key, item[0], struct.pack(">I", item[1]), opaque=o, cas=item[2])
            else:
                assert f.cas, "the Writer replaces only with CAS"
                item = self.items.get(key)
                new_flags = struct.unpack(">I", f.extras[:4])[0]
                if item is None:
                    out += response(op, 0x01, opaque=o)
                elif item[2] != f.cas:
                    out += response(op, 0x02, opaque=o)
                else:
                    assert newer(new_flags, item[1]), "overwrote data that was not older"
                    self.write(key, f.value, new_flags)
                    out += response(op, opaque=o, cas=self.cas)
        return bytes(out)


@st.composite
def races(draw):
    """A stream of records for a few keys, what the target holds first, other clients'
    writes and deletes by round, keys the target refuses as too big, and the knobs."""
    b = Blob(draw(blobs))
    nkeys = 1 + b.int(5)
    names = [b"t\\\\r%d" % i for i in range(nkeys)]
    records = [(b.int(nkeys - 1), b.choice(TIMES), b.bytes(3)) for _ in range(1 + b.int(19))]
    initial = {b.int(nkeys - 1): b.choice(TIMES) for _ in range(b.int(nkeys))}
    meddling = [(b.int(12), b.choice(["set", "delete"]), b.int(nkeys - 1), b.choice(TIMES)) for _ in range(b.int(8))]
    big = {names[b.int(nkeys - 1)]} if b.int(4) == 4 else set()
    window = b.choice([1, 2, 3, 8, 64])
    sizes = sizes_from(b, 60)
    max_retries = b.choice([0, 1, 64])
    mode = b.choice(["addq", "read", "auto"])
    return names, records, initial, meddling, big, window, sizes, max_retries, mode


def play(tap, race):
    names, records, initial, meddling, big, window, sizes, max_retries, mode = race
    model = ModelMemcached({names[i]: [b"init", t, 1 + i] for i, t in initial.items()}, big)
    w = tap.Writer(range(128), window=window, max_retries=max_retries, mode=mode)
    stream = b"".join(ref.encode_tap_mutation(names[k], v, t) for k, t, v in records)
    for c in cut(stream, sizes):
        w.feed_tap(c)
    w.finish()
    trace = []
    deleted = set()
    for step in range(1000):
        if w.done:
            break
        out = w.target_requests()
        for when, what, k, t in meddling:  # other clients write between the Writer's requests
            if when == step:
                if what == "set":
                    # A live client writes with the current time: newer than what is stored.
                    item = model.items.get(names[k])
                    if item is None or newer(t, item[1]):
                        model.write(names[k], b"other", t)
                else:
                    model.items.pop(names[k], None)
                    deleted.add(names[k])
        answer = model.handle(out)
        trace.append((out, answer))
        for c in cut(answer, sizes):
            w.feed_target(c)
    assert w.done, w.stats()
    return trace, w.stats(), model, deleted


@FUZZ
@given(race=races())
def test_the_conflict_rule_holds_under_races_and_both_builds_play_alike(tap, race):
    names, records, initial, meddling, big, window, sizes, max_retries, mode = race
    trace, stats, model, deleted = play(tap, race)
    assert stats["entries"] == len(records)
    assert stats["added"] + stats["replaced"] + stats["kept"] + stats["failed"] == len(records)
    assert stats["backlog"] == 0
    if max_retries == 64:
        refused = sum(1 for k, _, _ in records if names[k] in big)
        if mode == "addq":
            assert stats["failed"] == refused
        else:  # reading first, a record the target already holds as new is kept, never written
            assert stats["failed"] <= refused
    # Whatever raced, a key nobody deleted ends no older than any record (stored timestamps
    # only move forward: the model checks each write; this checks nothing was dropped).
    for k, t, _ in records:
        key = names[k]
        if key in deleted or key in big or stats["failed"]:
            continue
        assert key in model.items
        assert not newer(t, model.items[key][1])
    if tap is not ref:
        assert play(ref, race)[:2] == (trace, stats)


# -- crawler: metadump text and fetches ----------------------------------------------------

def _uri(key):
    return b"".join(bytes([c]) if (48 <= c <= 57 or 65 <= c <= 90 or 97 <= c <= 122) else b"%%%02X" % c
                    for c in key)


EXPS = [b"-1", b"0", b"12345", b"4294967295", b"4294967296", b"99999999999999999999999", b"-2", b"-0", b"",
        b"x", b"+1", b"1_0", b"-", b"-1-1", b"1764800000", b"00000000001", b"-00000000001", b"9999999999",
        # around the compiled build's eight-digit words: whole words, a word and a part, a byte
        # just off '0'-'9' ('/', ':') or past 0x7F right after a digit, 2^64 and past
        b"12345678", b"123456789", b"0000000012345678", b"1234567812345678", b"12345678/", b"1234567:",
        b"123\xb0", b"0\xff", b"00000000", b"18446744073709551615", b"18446744073709551616", b"4294967295x"]
OTHER_LINES = [b"OK", b"BUSY currently processing crawler request", b"ERROR", b"CLIENT_ERROR x", b"SERVER_ERROR y",
               b"key=a%4 exp=1", b"key=%zz exp=1", b"key=abc", b"garbage", b"", b"key= exp=1", b"END"]
TAILS = [b" la=1 cas=2 fetch=no cls=1 size=70", b"", b" flags=5", b"  exp=9", b" "]


def metadump_line(b):
    kind = b.int(7)
    if kind <= 3:
        key = key_from(b) or b"k"
        return b"key=" + _uri(key) + b" exp=" + b.choice(EXPS) + b.choice(TAILS)
    if kind == 4:  # long unescaped runs, escapes among them, up to past the 250 decoded bytes a key may have
        key = b"".join(b"k" * b.int(40) + (b"%5C" if b.int(1) else b"%zz"[:1 + b.int(2)]) for _ in range(b.int(8)))
        return b"key=" + key + b"x" * b.int(260) + b" exp=" + b.choice(EXPS) + b.choice(TAILS)
    if kind == 5:
        return b.choice(OTHER_LINES)
    return b.bytes(20)


@FUZZ
@given(blob=blobs)
def test_metadump_and_fetches_behave_alike_in_both_builds(tap, blob):
    b = Blob(blob)
    lines = [metadump_line(b) for _ in range(b.int(10))]
    end = b.int(1)
    crlf = [b.int(1) for _ in range(1 + b.int(3))]
    sizes = sizes_from(b, 40)
    present = {b.int(9) for _ in range(b.int(10))}
    window = b.choice([1, 3, 64])
    text = b"".join(line + (b"\r\n" if crlf[i % len(crlf)] else b"\n") for i, line in enumerate(lines))
    if end:
        text += b"END\r\n"

    def run(mod):
        w = mod.Writer(range(0, 128, 2), window=window)
        results = []
        try:
            for c in cut(text, sizes):
                results.append(w.feed_metadump(c))
        except ProtocolError as e:
            results.append(err(e))
        trace = []
        for _ in range(200):  # a model source: the listed keys whose index is in `present`
            req = w.fetch_requests()
            if not req:
                break
            # Hits carry no TTL (t-1) so both builds' records match byte for byte.
            answer = meta_answer(req, lambda i, key: (b"v" + key, i, -1) if i % 10 in present else None)
            for c in cut(answer, sizes):
                w.feed_fetch(c)
            out = w.target_requests()
            trace.append((req, out))
            acks = b"".join(response(0x0A, opaque=f.opaque) for f in _frames(out) if f.opcode == 0x0A)
            w.feed_target(acks)
        return results, trace, w.stats(), w.vbucket_counts()

    results, trace, stats, vbc = run(tap)
    assert stats["fetch_backlog"] == 0 and stats["backlog"] == 0
    assert stats["entries"] == stats["added"]
    if tap is not ref:
        assert (results, trace, stats, vbc) == run(ref)
