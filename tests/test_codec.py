"""The binary-protocol / TAP codec: constants, hash, frame parser, decoders, filters and
encoders. Every test runs against both implementations (pure ``astaire._tap_py`` and,
when built, the Cython ``astaire._tap``)."""
from __future__ import annotations

import hashlib
import json
import pickle
import urllib.parse
import struct
from pathlib import Path

import pytest

from astaire import _tap_py, protocol_errors
from astaire.protocol_errors import (
    BadLengths,
    BadMagic,
    FrameTooLarge,
    MalformedFrame,
    ProtocolError,
    TapNotSupported,
    UnexpectedFrame,
)

from codec_impls import _tap_c


VECTORS = Path(__file__).resolve().parent / "data" / "hashes.jsonl"  # from the original C++ (tests/data/README.md)

# The TAP_MUTATION exactly as the Clearwater memcached fork sent it.
FORK_FRAME = bytes.fromhex(
    "8041000d100000000000002800000000000000000000000100000000ff000000a50000006b04d198"
    "746170636865636b3a3030303076616c75652d303030302d"
)

HEADER = struct.Struct(">BBHBBHIIQ")


def header(magic=0x80, opcode=0x41, keylen=0, extlen=0, datatype=0, vbs=0, body=0, opaque=0, cas=0):
    return HEADER.pack(magic, opcode, keylen, extlen, datatype, vbs, body, opaque, cas)


def response(opcode, status=0, key=b"", value=b"", extras=b"", opaque=0, cas=0):
    return header(0x81, opcode, len(key), len(extras), 0, status, len(extras) + len(key) + len(value),
                  opaque, cas) + extras + key + value


def feed_bytewise(parser, data):
    out = []
    for i in range(len(data)):
        parser.feed(data[i:i + 1])
        out.extend(parser)
    return out


# -- constants and shared errors ---------------------------------------------------------

SPEC_CONSTANTS = dict(
    MAGIC_REQUEST=0x80, MAGIC_RESPONSE=0x81, OP_GET=0x00, OP_SET=0x01, OP_ADD=0x02, OP_REPLACE=0x03,
    OP_DELETE=0x04, OP_QUIT=0x07, OP_GETQ=0x09, OP_NOOP=0x0A, OP_VERSION=0x0B, OP_GETK=0x0C, OP_GETKQ=0x0D,
    OP_SETQ=0x11, OP_ADDQ=0x12, OP_REPLACEQ=0x13, OP_TAP_CONNECT=0x40, OP_TAP_MUTATION=0x41,
    OP_TAP_DELETE=0x42, OP_TAP_FLUSH=0x43, OP_TAP_OPAQUE=0x44, OP_TAP_VBUCKET_SET=0x45,
    OP_TAP_CHECKPOINT_START=0x46, OP_TAP_CHECKPOINT_END=0x47, STATUS_SUCCESS=0, STATUS_KEY_ENOENT=1,
    STATUS_KEY_EEXISTS=2, STATUS_E2BIG=3, STATUS_EINVAL=4, STATUS_NOT_STORED=5, STATUS_NOT_MY_VBUCKET=7,
    STATUS_UNKNOWN_COMMAND=0x81, STATUS_ENOMEM=0x82, TAP_FLAG_DUMP=0x02, TAP_FLAG_LIST_VBUCKETS=0x04,
    HEADER_SIZE=24, DEFAULT_MAX_BODY=32 * 1024 * 1024,
)


def test_constants_have_the_protocol_values(tap):
    for name, value in SPEC_CONSTANTS.items():
        assert getattr(tap, name) == value, name
    assert tap.OWN_PREFIX == b"astaire\\\\"


def test_both_builds_export_the_same_names(tap):
    assert set(tap.__all__) == set(_tap_py.__all__)
    for name in tap.__all__:
        assert hasattr(tap, name), name


def test_errors_are_the_shared_classes_so_except_clauses_work_with_either_build(tap):
    for name in protocol_errors.__all__:
        assert getattr(tap, name) is getattr(protocol_errors, name)
    for name in ("BadMagic", "BadLengths", "FrameTooLarge", "TapNotSupported", "UnexpectedFrame",
                 "MalformedFrame", "CrawlerBusy", "CrawlerError"):
        assert issubclass(getattr(protocol_errors, name), ProtocolError)
    assert issubclass(ProtocolError, ValueError)


def test_protocol_error_names_problem_and_offset_and_survives_pickling():
    err = BadMagic("bad magic 0x00", 1234)
    assert err.offset == 1234 and "bad magic 0x00" in str(err) and "1234" in str(err)
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is BadMagic and back.offset == 1234 and str(back) == str(err)


def test_codec_selector_loads_a_build_and_says_which():
    from astaire import codec

    assert codec.IMPLEMENTATION in ("python", "cython")
    assert codec.Writer is (_tap_c.Writer if codec.IMPLEMENTATION == "cython" else _tap_py.Writer)


# -- hashing -----------------------------------------------------------------------------


def test_hash_reproduces_the_reference_vectors(tap):
    lines = [json.loads(line) for line in VECTORS.read_text().splitlines() if line.strip()]
    assert lines
    for v in lines:
        key = bytes.fromhex(v["key_hex"])
        assert tap.vbucket_hash(key) == v["hash"]
        assert tap.vbucket_of(key) == v["vbucket"]
        assert tap.vbucket_of(key, 128) == v["hash"] & 127


@pytest.mark.parametrize("length", [0, 1, 54, 55, 56, 57, 63, 64, 65, 119, 120, 128, 250, 1000])
def test_hash_matches_md5_across_block_boundaries(tap, length):
    key = bytes((i * 31 + length) & 0xFF for i in range(length))
    assert tap.vbucket_hash(key) == int.from_bytes(hashlib.md5(key).digest()[:4], "little")
    assert tap.vbucket_hash(bytearray(key)) == tap.vbucket_hash(memoryview(key)) == tap.vbucket_hash(key)


def test_vbucket_count_must_be_a_power_of_two(tap):
    assert tap.vbucket_of(b"a", 1) == 0
    assert tap.vbucket_of(b"a", 1024) == tap.vbucket_hash(b"a") & 1023
    for bad in (0, 3, 100, 131072):
        with pytest.raises(ValueError):
            tap.vbucket_of(b"a", bad)


# -- the fork's TAP_MUTATION -------------------------------------------------------------


def test_fork_frame_decodes_fed_one_byte_at_a_time(tap):
    parser = tap.FrameParser()
    frames = feed_bytewise(parser, FORK_FRAME)
    assert len(frames) == 1 and parser.buffered == 0 and parser.offset == 64
    f = frames[0]
    assert (f.magic, f.opcode, f.vbucket, f.status, f.opaque, f.cas, f.size, f.offset) == (
        0x80, 0x41, 0, 0, 0, 1, 64, 0)
    m = tap.decode_tap_mutation(f)
    assert m.key == b"tapcheck:0000"
    assert m.value == b"value-0000-"
    assert m.flags == 0xA5000000
    assert m.expiration == 0x6B04D198
    assert m.cas == 1
    assert m.ttl == 0xFF
    assert m.tap_flags == 0
    assert m.engine_specific == b""


def test_encode_tap_mutation_reproduces_the_fork_frame(tap):
    assert tap.encode_tap_mutation(b"tapcheck:0000", b"value-0000-", flags=0xA5000000, expiration=0x6B04D198,
                                   cas=1) == FORK_FRAME


def test_engine_specific_bytes_sit_between_extras_and_key(tap):
    raw = tap.encode_tap_mutation(b"k\\\\1", b"VAL", flags=5, expiration=6, cas=7, ttl=3, tap_flags=0x0102,
                                  engine_specific=b"ENG!")
    assert raw[2:4] == b"\x00\x04"  # header key length counts only the key
    assert raw[24:26] == b"\x00\x04" and raw[40:44] == b"ENG!" and raw[44:48] == b"k\\\\1"
    (f,) = list(_feed(tap, raw))
    m = tap.decode_tap_mutation(f)
    assert (m.key, m.value, m.flags, m.expiration, m.cas, m.ttl, m.tap_flags, m.engine_specific) == (
        b"k\\\\1", b"VAL", 5, 6, 7, 3, 0x0102, b"ENG!")
    records, consumed = tap.filter_mutations(raw, range(128))
    assert consumed == len(raw) and records == [m]


def _feed(tap, data, max_body=None):
    parser = tap.FrameParser() if max_body is None else tap.FrameParser(max_body)
    parser.feed(data)
    return parser.frames()


def test_decode_rejects_wrong_extras_engine_overrun_and_other_frames(tap):
    bad_extras = header(0x80, 0x41, 1, 8, body=9) + b"\0" * 8 + b"k"
    (f,) = _feed(tap, b"\x80\x0a" + b"\0" * 22 + bad_extras)[1:]
    with pytest.raises(MalformedFrame) as e:
        tap.decode_tap_mutation(f)
    assert e.value.offset == 24
    overrun = tap.encode_tap_mutation(b"key", b"", engine_specific=b"")
    overrun = overrun[:24] + b"\x00\x09" + overrun[26:]  # engine length 9 > the 3 bytes after extras
    (f,) = _feed(tap, overrun)
    with pytest.raises(BadLengths):
        tap.decode_tap_mutation(f)
    (f,) = _feed(tap, tap.encode_noop())
    with pytest.raises(UnexpectedFrame):
        tap.decode_tap_mutation(f)


# -- FrameParser -------------------------------------------------------------------------


def test_parser_yields_frames_across_any_chunking_and_keeps_partials(tap):
    frames = [tap.encode_getk(b"k%d" % i, opaque=i) for i in range(50)] + [
        response(0x0C, 1, opaque=99), tap.encode_set(b"x" * 300, b"y" * 70000, flags=3)]
    stream = b"".join(frames)
    for chunk in (1, 7, 24, 25, 1000, len(stream)):
        parser = tap.FrameParser()
        got = []
        for i in range(0, len(stream), chunk):
            parser.feed(stream[i:i + chunk])
            got.extend(parser)
        assert [f.size for f in got] == [len(f) for f in frames]
        assert [f.offset for f in got] == [sum(len(x) for x in frames[:i]) for i in range(len(frames))]
        assert parser.offset == len(stream) and parser.buffered == 0
        assert got[3].key == b"k3" and got[3].opaque == 3 and got[3].vbucket == 0
        assert got[50].magic == 0x81 and got[50].status == 1 and got[50].opaque == 99
        assert got[51].value == b"y" * 70000 and got[51].extras == struct.pack(">II", 3, 0)


def test_parser_next_and_frames_and_buffered(tap):
    parser = tap.FrameParser()
    data = tap.encode_noop(1) + tap.encode_noop(2)
    parser.feed(data[:30])
    assert parser.buffered == 30
    assert next(parser).opaque == 1
    assert parser.buffered == 6 and parser.offset == 24
    with pytest.raises(StopIteration):
        next(parser)
    parser.feed(memoryview(data)[30:])
    assert [f.opaque for f in parser.frames()] == [2]
    assert parser.frames() == []


def test_parser_rejects_bad_magic_from_the_first_byte_with_its_offset(tap):
    parser = tap.FrameParser()
    parser.feed(tap.encode_noop() + b"E")
    assert len(list(_take(parser))) == 1
    with pytest.raises(BadMagic) as e:
        next(parser)
    assert e.value.offset == 24 and "0x45" in str(e.value) and "24" in str(e.value)
    with pytest.raises(BadMagic):  # stays broken, never loops or skips
        next(parser)


def _take(parser):
    try:
        yield next(parser)
    except StopIteration:
        return


def test_parser_refuses_a_huge_length_from_the_header_alone(tap):
    parser = tap.FrameParser(max_body=1024)
    parser.feed(tap.encode_noop())
    parser.feed(header(0x81, 0x41, body=1025))  # nothing of the body sent: refused before allocating
    assert next(parser).opcode == 0x0A
    with pytest.raises(FrameTooLarge) as e:
        next(parser)
    assert e.value.offset == 24
    parser = tap.FrameParser()
    parser.feed(header(0x80, 0x41, body=0xFFFFFFFF))
    with pytest.raises(FrameTooLarge):
        parser.frames()
    exactly = tap.FrameParser(max_body=10)
    exactly.feed(tap.encode_request(0x01, b"k", b"123456789"))
    assert exactly.frames()[0].value == b"123456789"


def test_parser_rejects_extras_plus_key_longer_than_body(tap):
    parser = tap.FrameParser()
    parser.feed(header(0x80, 0x01, keylen=10, extlen=8, body=17))
    with pytest.raises(BadLengths) as e:
        parser.frames()
    assert e.value.offset == 0


def test_parser_handles_a_multi_megabyte_frame_in_small_chunks(tap):
    value = bytes(range(256)) * (5 * 4096)  # 5 MiB
    frame = tap.encode_set(b"big", value)
    parser = tap.FrameParser()
    got = []
    for i in range(0, len(frame), 65536):
        parser.feed(frame[i:i + 65536])
        got.extend(parser)
    assert len(got) == 1 and got[0].value == value


# -- filters -----------------------------------------------------------------------------


def _stream(tap, n=40):
    frames = []
    for i in range(n):
        frames.append(tap.encode_tap_mutation(b"table\\\\key-%d" % i, b"v%d" % i, flags=i, expiration=i * 2,
                                              cas=i + 1))
        if i % 7 == 0:
            frames.append(tap.encode_request(0x42 + i % 6, b"x"))
    return frames


def test_filters_keep_wanted_vbuckets_and_count_whole_frames(tap):
    frames = _stream(tap)
    data = b"".join(frames)
    wanted = set(range(0, 128, 3))
    expect = [m for m in (tap.decode_tap_mutation(f) for f in _feed(tap, data) if f.opcode == 0x41)
              if tap.vbucket_of(m.key) in wanted]
    assert 0 < len(expect) < 40
    for cut in (len(data), len(data) - 1, len(data) - len(frames[-1]) + 23):
        records, consumed = tap.filter_mutations(data[:cut], wanted)
        whole = len(data) if cut == len(data) else len(data) - len(frames[-1])
        assert consumed == whole
        keep = [m for m in expect if cut == len(data) or m.key != b"table\\\\key-39"]
        assert records == keep
        kept, seen, consumed2 = tap.filter_count(data[:cut], wanted)
        assert (kept, seen, consumed2) == (len(keep), 40 if cut == len(data) else 39, whole)
    assert tap.filter_count(data, set())[0] == 0
    assert tap.filter_count(bytearray(data), range(128))[:2] == (40, 40)


def test_filters_raise_like_the_writer_for_frames_foreign_to_a_tap_stream(tap):
    good = tap.encode_tap_mutation(b"a", b"b")
    not_supported = response(0x40, 0x81)
    with pytest.raises(TapNotSupported) as e:
        tap.filter_mutations(good + not_supported, range(128))
    assert e.value.offset == len(good)
    with pytest.raises(UnexpectedFrame) as e:
        tap.filter_count(good + good + tap.encode_get(b"x"), range(128))
    assert e.value.offset == 2 * len(good)
    with pytest.raises(BadMagic):
        tap.filter_count(good + b"\x00", range(128))
    with pytest.raises(FrameTooLarge):
        tap.filter_mutations(good + header(0x80, 0x41, body=2000), range(128), max_body=1000)
    with pytest.raises(MalformedFrame):
        tap.filter_count(header(0x80, 0x41, keylen=1, extlen=4, body=5) + b"\0\0\0\0k", range(128))


# -- encoders ----------------------------------------------------------------------------


def test_request_encoders_lay_out_headers_and_bodies(tap):
    def req(opcode, key=b"", value=b"", extras=b"", opaque=0, cas=0, vbucket=0):
        return header(0x80, opcode, len(key), len(extras), 0, vbucket, len(extras) + len(key) + len(value),
                      opaque, cas) + extras + key + value

    ext = struct.pack(">II", 0xDEADBEEF, 1234)
    assert tap.encode_request(0x01, b"k", b"v", ext, 5, 6, 7) == req(0x01, b"k", b"v", ext, 5, 6, 7)
    assert tap.encode_get(b"k", 3) == req(0x00, b"k", opaque=3)
    assert tap.encode_getk(b"k", 3) == req(0x0C, b"k", opaque=3)
    assert tap.encode_getkq(b"k", 3) == req(0x0D, b"k", opaque=3)
    for name, op in (("add", 0x02), ("addq", 0x12), ("set", 0x01)):
        got = getattr(tap, "encode_" + name)(b"key", b"value", 0xDEADBEEF, 1234, opaque=9, cas=2**64 - 1)
        assert got == req(op, b"key", b"value", ext, 9, 2**64 - 1), name
    assert tap.encode_delete(b"k", 1, 2) == req(0x04, b"k", opaque=1, cas=2)
    assert tap.encode_noop(7) == req(0x0A, opaque=7)
    assert tap.encode_version(8) == req(0x0B, opaque=8)


def test_tap_connect_with_and_without_a_vbucket_list(tap):
    assert tap.encode_tap_connect() == header(0x80, 0x40, 0, 4, body=4) + b"\0\0\0\x02"
    got = tap.encode_tap_connect(vbuckets=[3, 70], name=b"astaire")
    value = struct.pack(">HHH", 2, 3, 70)
    assert got == header(0x80, 0x40, 7, 4, body=4 + 7 + len(value)) + struct.pack(">I", 0x06) + b"astaire" + value


def test_encode_batch_is_the_concatenation_of_single_encodes(tap):
    reqs = [(0x12, b"k1", b"v1", 1, 2, 3, 0), (0x01, b"k2", b"", 4, 5, 6, 7), (0x0C, b"k3", b"", None, None, 8, 0),
            (0x0A, b"", b"", 0, 0, 9, 0)]
    assert tap.encode_batch(reqs) == (tap.encode_addq(b"k1", b"v1", 1, 2, 3) + tap.encode_set(b"k2", b"", 4, 5, 6, 7)
                                      + tap.encode_getk(b"k3", 8) + tap.encode_noop(9))
    assert tap.encode_batch(iter(reqs)) == tap.encode_batch(reqs)
    assert tap.encode_batch([]) == b""


def test_encoders_refuse_what_the_header_cannot_carry(tap):
    with pytest.raises(ValueError):
        tap.encode_get(b"k" * 65536)
    with pytest.raises(ValueError):
        tap.encode_request(0x01, extras=b"e" * 256)
    with pytest.raises(OverflowError):
        tap.encode_noop(2**32)
    with pytest.raises(OverflowError):
        tap.encode_set(b"k", b"v", flags=-1)
    with pytest.raises(OverflowError):
        tap.encode_request(0x01, cas=2**64)
    with pytest.raises(ValueError):
        tap.encode_batch([(0x12, b"k" * 70000, b"", 0, 0, 0, 0)])
    with pytest.raises(TypeError):
        tap.encode_get("text key")


def test_filters_and_writer_hash_keys_of_every_length_in_mixed_batches(tap):
    """Keys are hashed eight at a time when short (<= 55 bytes): mix lengths around the
    one-block limit, other TAP frames and batch edges, and check every vbucket against MD5."""
    keys = [bytes((i * 7 + j) & 0xFF for j in range(i % 121)) for i in range(400)]
    frames = []
    for i, key in enumerate(keys):
        frames.append(tap.encode_tap_mutation(key, b"v", flags=i))
        if i % 11 == 0:
            frames.append(tap.encode_request(0x46))
    data = b"".join(frames)
    md5_vb = [int.from_bytes(hashlib.md5(k).digest()[:4], "little") & 127 for k in keys]
    for wanted in (set(range(0, 128, 2)), {5}, set(range(128))):
        expect = [k for k, vb in zip(keys, md5_vb) if vb in wanted]
        records, consumed = tap.filter_mutations(data, wanted)
        assert [m.key for m in records] == expect and consumed == len(data)
        assert tap.filter_count(data, wanted) == (len(expect), len(keys), len(data))
        for cut in (len(data), len(data) - 5):
            w = tap.Writer(wanted, window=1 << 16)
            w.feed_tap(data[:cut])
            own = sum(1 for k in expect if k.startswith(b"astaire\\\\"))
            assert w.entries + own == len(expect) - (cut != len(data) and md5_vb[-1] in wanted)


def test_the_listing_filter_hashes_keys_of_every_length_like_md5(tap):
    """The crawler's listing is hashed eight keys at a time too (keys of at most 55 bytes, the
    padded block built from the key's own words): every length, every place in a batch."""
    keys = [bytes(33 + (i * 13 + j * 7) % 94 for j in range(1 + i % 70)) for i in range(561)]
    listing = b"".join(b"key=%s exp=-1 la=1 cas=1 fetch=no cls=1 size=60\n"
                       % urllib.parse.quote_from_bytes(k, safe="").encode() for k in keys) + b"END\r\n"
    md5_vb = [int.from_bytes(hashlib.md5(k).digest()[:4], "little") & 127 for k in keys]
    for wanted in (set(range(0, 128, 2)), {5}, set(range(128))):
        w = tap.Writer(wanted, window=1 << 16)
        w.feed_metadump(listing)
        assert w.skipped_unwanted == sum(1 for vb in md5_vb if vb not in wanted)
        asked = [line.split(b" ")[1] for line in w.fetch_requests().split(b"\r\n") if line.startswith(b"mg ")]
        assert sorted(asked) == sorted(k for k, vb in zip(keys, md5_vb) if vb in wanted)
