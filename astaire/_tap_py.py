"""Binary-protocol / TAP codec and the per-record resync loop, in pure Python.

The reference for, and fallback of, the Cython build ``astaire._tap``: same public
names, same results, same errors (class, offset and message). Tests run every case
against both.
"""
from __future__ import annotations

import base64
import os
import re
import select
import struct
import time
from collections import deque
from hashlib import md5 as _md5

from astaire.protocol_errors import (
    BadLengths,
    BadMagic,
    CrawlerBusy,
    CrawlerError,
    FrameTooLarge,
    MalformedFrame,
    ProtocolError,
    TapNotSupported,
    UnexpectedFrame,
)

MAGIC_REQUEST = 0x80
MAGIC_RESPONSE = 0x81

OP_GET = 0x00
OP_SET = 0x01
OP_ADD = 0x02
OP_REPLACE = 0x03
OP_DELETE = 0x04
OP_QUIT = 0x07
OP_GETQ = 0x09
OP_NOOP = 0x0A
OP_VERSION = 0x0B
OP_GETK = 0x0C
OP_GETKQ = 0x0D
OP_SETQ = 0x11
OP_ADDQ = 0x12
OP_REPLACEQ = 0x13
OP_TAP_CONNECT = 0x40
OP_TAP_MUTATION = 0x41
OP_TAP_DELETE = 0x42
OP_TAP_FLUSH = 0x43
OP_TAP_OPAQUE = 0x44
OP_TAP_VBUCKET_SET = 0x45
OP_TAP_CHECKPOINT_START = 0x46
OP_TAP_CHECKPOINT_END = 0x47

STATUS_SUCCESS = 0x00
STATUS_KEY_ENOENT = 0x01
STATUS_KEY_EEXISTS = 0x02
STATUS_E2BIG = 0x03
STATUS_EINVAL = 0x04
STATUS_NOT_STORED = 0x05
STATUS_NOT_MY_VBUCKET = 0x07
STATUS_UNKNOWN_COMMAND = 0x81
STATUS_ENOMEM = 0x82

TAP_FLAG_DUMP = 0x02
TAP_FLAG_LIST_VBUCKETS = 0x04

HEADER_SIZE = 24
DEFAULT_MAX_BODY = 32 * 1024 * 1024

OWN_PREFIX = b"astaire\\\\"

_HEADER = struct.Struct(">BBHBBHIIQ")
_TAP_EXTRAS = struct.Struct(">HHB3xII")
_STORE_EXTRAS = struct.Struct(">II")
_U32 = struct.Struct(">I")

# Opcodes whose request extras are item flags + expiration.
_STORAGE_OPS = frozenset((OP_SET, OP_ADD, OP_REPLACE, OP_SETQ, OP_ADDQ, OP_REPLACEQ))
# Statuses after which retrying the same record cannot help.
_STATUS_NAMES = {
    STATUS_SUCCESS: "SUCCESS",
    STATUS_KEY_ENOENT: "KEY_ENOENT",
    STATUS_KEY_EEXISTS: "KEY_EEXISTS",
    STATUS_E2BIG: "E2BIG",
    STATUS_EINVAL: "EINVAL",
    STATUS_NOT_STORED: "NOT_STORED",
    STATUS_NOT_MY_VBUCKET: "NOT_MY_VBUCKET",
    STATUS_UNKNOWN_COMMAND: "UNKNOWN_COMMAND",
    STATUS_ENOMEM: "ENOMEM",
}
_OP_NAMES = {OP_ADDQ: "ADDQ", OP_ADD: "ADD", OP_GETK: "GETK", OP_SET: "SET", OP_GETKQ: "GETKQ"}

# Opaques with this bit set are NOOP fences; record slots use the values below it.
FENCE_BIT = 0x80000000
_FENCE_MASK = 0x7FFFFFFF
# Copies held back (Writer ``hold``): at most this many key and value bytes at once.
HOLD_BYTES = 2 * 1024 * 1024
HOLD_WINDOWS = 4   # a record is held for this many windows of entries
DEFER_WINDOWS = 16             # a crawler fetch is deferred for this many windows of listed keys
DEFER_BYTES = 4 * 1024 * 1024  # at most this many bytes of deferred fetches at once (32 + key each)
DEFER_MIN_SIZE = 1024          # only fetches of items at least this large (metadump size=) are deferred
_DEFER_REC = 40                # what a deferred fetch costs besides its key (the compiled build's DRec)
# A metadump line longer than this (without a newline) is garbage, not a key listing.
MAX_METADUMP_LINE = 8192


# ---------------------------------------------------------------------------------------
# Hashing


def vbucket_hash(key) -> int:
    """libmemcached's MD5 hash: the first 4 bytes of md5(key), little-endian."""
    return int.from_bytes(_md5(key).digest()[:4], "little")


def _check_vbuckets(vbuckets) -> int:
    vbuckets = int(vbuckets)
    if vbuckets < 1 or vbuckets > 65536 or vbuckets & (vbuckets - 1):
        raise ValueError(f"vbuckets must be a power of 2 between 1 and 65536, not {vbuckets}")
    return vbuckets


def vbucket_of(key, vbuckets=128) -> int:
    return vbucket_hash(key) & (_check_vbuckets(vbuckets) - 1)


def _wanted_table(wanted, vbuckets) -> bytearray:
    vbuckets = _check_vbuckets(vbuckets)
    table = bytearray(vbuckets)
    for vb in wanted:
        vb = int(vb)
        if vb < 0 or vb >= vbuckets:
            raise ValueError(f"vbucket {vb} out of range 0..{vbuckets - 1}")
        table[vb] = 1
    return table


# ---------------------------------------------------------------------------------------
# Frames


class Frame:
    """One binary-protocol frame. ``vbucket`` (request) and ``status`` (response) name
    the same 16-bit header field."""

    __slots__ = ("magic", "opcode", "datatype", "_vbucket_or_status", "opaque", "cas",
                 "extras", "key", "value", "size", "offset")

    def __init__(self, magic, opcode, datatype, vbucket_or_status, opaque, cas,
                 extras, key, value, size, offset):
        self.magic = magic
        self.opcode = opcode
        self.datatype = datatype
        self._vbucket_or_status = vbucket_or_status
        self.opaque = opaque
        self.cas = cas
        self.extras = extras
        self.key = key
        self.value = value
        self.size = size
        self.offset = offset

    @property
    def vbucket(self) -> int:
        return self._vbucket_or_status

    @property
    def status(self) -> int:
        return self._vbucket_or_status

    def __repr__(self):
        return (f"Frame(magic=0x{self.magic:02x}, opcode=0x{self.opcode:02x}, "
                f"vbucket_or_status={self._vbucket_or_status}, opaque={self.opaque}, cas={self.cas}, "
                f"extras={self.extras!r}, key={self.key!r}, value={self.value!r}, "
                f"size={self.size}, offset={self.offset})")


class TapMutation:
    """A decoded TAP_MUTATION: the item and its TAP metadata."""

    __slots__ = ("key", "value", "flags", "expiration", "cas", "ttl", "tap_flags", "engine_specific")

    def __init__(self, key, value, flags, expiration, cas, ttl, tap_flags, engine_specific):
        self.key = key
        self.value = value
        self.flags = flags
        self.expiration = expiration
        self.cas = cas
        self.ttl = ttl
        self.tap_flags = tap_flags
        self.engine_specific = engine_specific

    def __eq__(self, other):
        if not isinstance(other, TapMutation):
            return NotImplemented
        return (self.key, self.value, self.flags, self.expiration, self.cas, self.ttl,
                self.tap_flags, self.engine_specific) == (
            other.key, other.value, other.flags, other.expiration, other.cas, other.ttl,
            other.tap_flags, other.engine_specific)

    __hash__ = None

    def __repr__(self):
        return (f"TapMutation(key={self.key!r}, value={self.value!r}, flags=0x{self.flags:08x}, "
                f"expiration={self.expiration}, cas={self.cas}, ttl={self.ttl}, "
                f"tap_flags=0x{self.tap_flags:04x}, engine_specific={self.engine_specific!r})")


def _header_error(buf, pos, avail, offset, max_body):
    """Validate the frame starting at buf[pos] with ``avail`` bytes present.

    Returns the whole frame size, 0 if more bytes are needed, or raises. Magic is
    checked from the first byte so that a text answer is not waited on for 24 bytes.
    """
    magic = buf[pos]
    if magic != MAGIC_REQUEST and magic != MAGIC_RESPONSE:
        raise BadMagic(f"bad magic 0x{magic:02x}", offset)
    if avail < HEADER_SIZE:
        return 0
    keylen = (buf[pos + 2] << 8) | buf[pos + 3]
    extlen = buf[pos + 4]
    body = _U32.unpack_from(buf, pos + 8)[0]
    if body > max_body:
        raise FrameTooLarge(f"frame body of {body} bytes exceeds the limit of {max_body}", offset)
    if extlen + keylen > body:
        raise BadLengths(f"extras ({extlen}) + key ({keylen}) longer than the body ({body})", offset)
    size = HEADER_SIZE + body
    return size if avail >= size else 0


def _frame_at(buf, pos, size, offset) -> Frame:
    magic, opcode, keylen, extlen, datatype, vbs, body, opaque, cas = _HEADER.unpack_from(buf, pos)
    p = pos + HEADER_SIZE
    k = p + extlen
    v = k + keylen
    return Frame(magic, opcode, datatype, vbs, opaque, cas,
                 bytes(buf[p:k]), bytes(buf[k:v]), bytes(buf[v:pos + size]), size, offset)


class FrameParser:
    """Streaming frame parser: ``feed`` chunks of any size, iterate complete frames.

    One growable buffer with a head offset, compacted when the consumed part dominates
    (msgpack's Unpacker style). Headers are validated as soon as they are complete, so a
    hostile length is refused before anything is allocated for it.
    """

    def __init__(self, max_body=DEFAULT_MAX_BODY):
        if max_body < 0:
            raise ValueError("max_body must be >= 0")
        self.max_body = int(max_body)
        self._buf = bytearray()
        self._head = 0
        self._offset = 0

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._head

    @property
    def offset(self) -> int:
        return self._offset

    def feed(self, data) -> None:
        buf = self._buf
        if self._head:
            if self._head == len(buf):
                buf.clear()
                self._head = 0
            elif self._head >= 65536 or self._head * 2 >= len(buf):
                del buf[:self._head]
                self._head = 0
        buf += data

    def _next(self):
        buf = self._buf
        pos = self._head
        avail = len(buf) - pos
        if avail == 0:
            return None
        size = _header_error(buf, pos, avail, self._offset, self.max_body)
        if not size:
            return None
        frame = _frame_at(buf, pos, size, self._offset)
        self._head = pos + size
        self._offset += size
        return frame

    def __iter__(self):
        return self

    def __next__(self) -> Frame:
        frame = self._next()
        if frame is None:
            raise StopIteration
        return frame

    def frames(self) -> list:
        """All complete frames buffered now."""
        out = []
        while True:
            frame = self._next()
            if frame is None:
                return out
            out.append(frame)


def _decode_tap_body(buf, pos, size, offset, want_value=True):
    """Decode the TAP_MUTATION whose frame is buf[pos:pos+size] (header already checked).

    Returns (engine_len, keylen, tap_flags, ttl, flags, expiration)."""
    keylen = (buf[pos + 2] << 8) | buf[pos + 3]
    extlen = buf[pos + 4]
    if extlen != 16:
        raise MalformedFrame(f"TAP_MUTATION extras length {extlen}, expected 16", offset)
    engine_len, tap_flags, ttl, flags, expiration = _TAP_EXTRAS.unpack_from(buf, pos + HEADER_SIZE)
    body = size - HEADER_SIZE
    if 16 + engine_len + keylen > body:
        raise BadLengths(
            f"TAP_MUTATION extras (16) + engine ({engine_len}) + key ({keylen}) longer than the body ({body})",
            offset)
    return engine_len, keylen, tap_flags, ttl, flags, expiration


def decode_tap_mutation(frame) -> TapMutation:
    """Decode a TAP_MUTATION frame in the Clearwater fork's layout (docs/compatibility.md, "Binary protocol and TAP")."""
    if frame.magic != MAGIC_REQUEST or frame.opcode != OP_TAP_MUTATION:
        raise UnexpectedFrame(
            f"not a TAP_MUTATION (magic 0x{frame.magic:02x}, opcode 0x{frame.opcode:02x})", frame.offset)
    extras = frame.extras
    keylen = len(frame.key)
    if len(extras) != 16:
        raise MalformedFrame(f"TAP_MUTATION extras length {len(extras)}, expected 16", frame.offset)
    engine_len, tap_flags, ttl, flags, expiration = _TAP_EXTRAS.unpack(extras)
    rest = frame.key + frame.value
    body = 16 + len(rest)
    if 16 + engine_len + keylen > body:
        raise BadLengths(
            f"TAP_MUTATION extras (16) + engine ({engine_len}) + key ({keylen}) longer than the body ({body})",
            frame.offset)
    return TapMutation(rest[engine_len:engine_len + keylen], rest[engine_len + keylen:], flags, expiration,
                       frame.cas, ttl, tap_flags, rest[:engine_len])


def _classify_tap(buf, pos, offset):
    """0 = TAP_MUTATION, 1 = other TAP opcode to skip; raises for anything else."""
    magic = buf[pos]
    opcode = buf[pos + 1]
    if magic == MAGIC_REQUEST:
        if opcode == OP_TAP_MUTATION:
            return 0
        if OP_TAP_DELETE <= opcode <= OP_TAP_CHECKPOINT_END:
            return 1
    elif opcode == OP_TAP_CONNECT:
        status = (buf[pos + 6] << 8) | buf[pos + 7]
        raise TapNotSupported(f"server answered TAP_CONNECT with status 0x{status:04x}: no TAP", offset)
    kind = "request" if magic == MAGIC_REQUEST else "response"
    raise UnexpectedFrame(f"unexpected {kind} opcode 0x{opcode:02x} on a TAP stream", offset)


def _scan_tap(data, wanted, vbuckets, max_body, keep):
    """Shared body of filter_mutations / filter_count."""
    table = _wanted_table(wanted, vbuckets)
    mask = len(table) - 1
    buf = memoryview(data).cast("B") if not isinstance(data, (bytes, bytearray)) else data
    end = len(buf)
    pos = 0
    kept = seen = 0
    records = [] if keep else None
    while pos < end:
        size = _header_error(buf, pos, end - pos, pos, max_body)
        if not size:
            break
        if _classify_tap(buf, pos, pos) == 0:
            engine_len, keylen, tap_flags, ttl, flags, expiration = _decode_tap_body(buf, pos, size, pos)
            seen += 1
            k = pos + HEADER_SIZE + 16 + engine_len
            key = bytes(buf[k:k + keylen])
            if table[vbucket_hash(key) & mask]:
                kept += 1
                if keep:
                    cas = int.from_bytes(buf[pos + 16:pos + 24], "big")
                    records.append(TapMutation(key, bytes(buf[k + keylen:pos + size]), flags, expiration, cas,
                                               ttl, tap_flags, bytes(buf[k - engine_len:k])))
        pos += size
    return records, kept, seen, pos


def filter_mutations(data, wanted, vbuckets=128, max_body=DEFAULT_MAX_BODY):
    """Parse a buffer of TAP frames, keep the TAP_MUTATIONs of wanted vbuckets.

    Returns (records, consumed): consumed = bytes of whole frames. Other TAP opcodes are
    skipped; frames with no place on a TAP stream raise as ``Writer.feed_tap`` does."""
    records, _kept, _seen, consumed = _scan_tap(data, wanted, vbuckets, max_body, True)
    return records, consumed


def filter_count(data, wanted, vbuckets=128, max_body=DEFAULT_MAX_BODY):
    """Like filter_mutations but only counts: (kept, seen, consumed)."""
    _records, kept, seen, consumed = _scan_tap(data, wanted, vbuckets, max_body, False)
    return kept, seen, consumed


# ---------------------------------------------------------------------------------------
# Encoders


def _u32(name, v):
    v = int(v)
    if v < 0 or v > 0xFFFFFFFF:
        raise OverflowError(f"{name} {v} does not fit in 32 bits")
    return v


def _u64(name, v):
    v = int(v)
    if v < 0 or v > 0xFFFFFFFFFFFFFFFF:
        raise OverflowError(f"{name} {v} does not fit in 64 bits")
    return v


def _header_into(out, magic, opcode, keylen, extlen, vbucket, bodylen, opaque, cas):
    if keylen > 0xFFFF:
        raise ValueError(f"key of {keylen} bytes is longer than 65535")
    if extlen > 0xFF:
        raise ValueError(f"extras of {extlen} bytes is longer than 255")
    if bodylen > 0xFFFFFFFF:
        raise ValueError(f"body of {bodylen} bytes is longer than 4 GiB")
    out += _HEADER.pack(magic, opcode, keylen, extlen, 0, vbucket, bodylen, opaque, cas)


def _request_into(out, opcode, key, value, extras, opaque, cas, vbucket):
    opcode = int(opcode)
    if opcode < 0 or opcode > 0xFF:
        raise OverflowError(f"opcode {opcode} does not fit in 8 bits")
    vbucket = int(vbucket)
    if vbucket < 0 or vbucket > 0xFFFF:
        raise OverflowError(f"vbucket {vbucket} does not fit in 16 bits")
    _header_into(out, MAGIC_REQUEST, opcode, len(key), len(extras), vbucket,
                 len(extras) + len(key) + len(value), _u32("opaque", opaque), _u64("cas", cas))
    out += extras
    out += key
    out += value


def encode_request(opcode, key=b"", value=b"", extras=b"", opaque=0, cas=0, vbucket=0) -> bytes:
    out = bytearray()
    _request_into(out, opcode, key, value, extras, opaque, cas, vbucket)
    return bytes(out)


def encode_tap_connect(flags=TAP_FLAG_DUMP, vbuckets=None, name=b"") -> bytes:
    flags = _u32("flags", flags)
    value = b""
    if vbuckets is not None:
        ids = [int(v) for v in vbuckets]
        if len(ids) > 0xFFFF:
            raise ValueError("too many vbuckets in TAP_CONNECT")
        for v in ids:
            if v < 0 or v > 0xFFFF:
                raise OverflowError(f"vbucket {v} does not fit in 16 bits")
        flags |= TAP_FLAG_LIST_VBUCKETS
        value = struct.pack(f">H{len(ids)}H", len(ids), *ids)
    return encode_request(OP_TAP_CONNECT, name, value, _U32.pack(flags))


def encode_get(key, opaque=0) -> bytes:
    return encode_request(OP_GET, key, opaque=opaque)


def encode_getk(key, opaque=0) -> bytes:
    return encode_request(OP_GETK, key, opaque=opaque)


def encode_getkq(key, opaque=0) -> bytes:
    return encode_request(OP_GETKQ, key, opaque=opaque)


def _store(opcode, key, value, flags, expiration, opaque, cas):
    extras = _STORE_EXTRAS.pack(_u32("flags", flags), _u32("expiration", expiration))
    return encode_request(opcode, key, value, extras, opaque, cas)


def encode_add(key, value, flags=0, expiration=0, opaque=0, cas=0) -> bytes:
    return _store(OP_ADD, key, value, flags, expiration, opaque, cas)


def encode_addq(key, value, flags=0, expiration=0, opaque=0, cas=0) -> bytes:
    return _store(OP_ADDQ, key, value, flags, expiration, opaque, cas)


def encode_set(key, value, flags=0, expiration=0, opaque=0, cas=0) -> bytes:
    return _store(OP_SET, key, value, flags, expiration, opaque, cas)


def encode_delete(key, opaque=0, cas=0) -> bytes:
    return encode_request(OP_DELETE, key, opaque=opaque, cas=cas)


def encode_noop(opaque=0) -> bytes:
    return encode_request(OP_NOOP, opaque=opaque)


def encode_version(opaque=0) -> bytes:
    return encode_request(OP_VERSION, opaque=opaque)


def encode_tap_mutation(key, value, flags=0, expiration=0, cas=0, ttl=0xFF, tap_flags=0,
                        engine_specific=b"", opaque=0) -> bytes:
    """A TAP_MUTATION in the Clearwater fork's layout (used by the test TAP server)."""
    ttl = int(ttl)
    if ttl < 0 or ttl > 0xFF:
        raise OverflowError(f"ttl {ttl} does not fit in 8 bits")
    tap_flags = int(tap_flags)
    if tap_flags < 0 or tap_flags > 0xFFFF:
        raise OverflowError(f"tap_flags {tap_flags} does not fit in 16 bits")
    if len(engine_specific) > 0xFFFF:
        raise ValueError("engine_specific longer than 65535 bytes")
    extras = _TAP_EXTRAS.pack(len(engine_specific), tap_flags, ttl, _u32("flags", flags),
                              _u32("expiration", expiration))
    out = bytearray()
    _header_into(out, MAGIC_REQUEST, OP_TAP_MUTATION, len(key), 16, 0,
                 16 + len(engine_specific) + len(key) + len(value), _u32("opaque", opaque), _u64("cas", cas))
    out += extras
    out += engine_specific
    out += key
    out += value
    return bytes(out)


def encode_batch(requests) -> bytes:
    """Encode (opcode, key, value, flags, expiration, opaque, cas) tuples into one buffer.
    Storage opcodes get flags + expiration extras; the others ignore them."""
    out = bytearray()
    for opcode, key, value, flags, expiration, opaque, cas in requests:
        if opcode in _STORAGE_OPS:
            extras = _STORE_EXTRAS.pack(_u32("flags", flags), _u32("expiration", expiration))
        else:
            extras = b""
        _request_into(out, opcode, key, value, extras, opaque, cas, 0)
    return bytes(out)


# ---------------------------------------------------------------------------------------
# The Writer: per-record resync loop

# Record states: what the record waits for.
_ST_FREE = 0
_ST_ADDQ = 1   # quiet ADD sent: an error response, or its fence, settles it
_ST_GETK = 2   # read of the local copy sent
_ST_SET = 3    # CAS SET sent
_ST_ADD = 4    # non-quiet ADD sent (after the key vanished, or read-first found none)
_ST_READ = 5   # read-first: GETK of the local copy sent before any write

_EXPECTED_OP = {_ST_ADDQ: OP_ADDQ, _ST_GETK: OP_GETK, _ST_SET: OP_SET, _ST_ADD: OP_ADD, _ST_READ: OP_GETK}

# How the Writer first touches a record in the target (see Writer).
MODE_ADDQ = "addq"
MODE_READ = "read"
MODE_AUTO = "auto"
WRITER_MODES = (MODE_ADDQ, MODE_READ, MODE_AUTO)


_M64 = (1 << 64) - 1


def key_hash64(key) -> int:
    """The settled table's 64-bit hash of a key (astaire.resync.settled): 64-bit words of
    the key, little-endian, the last one zero-padded, each mixed in by multiply and shift."""
    key = bytes(key)
    h = 0x9E3779B97F4A7C15 ^ len(key)
    for i in range(0, len(key), 8):
        h = ((h ^ int.from_bytes(key[i:i + 8], "little")) * 0xFF51AFD7ED558CCD) & _M64
        h ^= h >> 32
    h ^= h >> 29
    h = (h * 0xC4CEB9FE1A85EC53) & _M64
    return h ^ (h >> 32)


def _settled_entries(settled, generation) -> int:
    """Entries of a settled table (two 64-bit words each); checks the table and generation."""
    if not 1 <= generation <= 255:
        raise ValueError(f"generation must be between 1 and 255, not {generation!r}")
    with memoryview(settled) as m:
        n = m.nbytes // 16
        if m.readonly:
            raise ValueError("the settled table must be writable")
        if n < 2 or n * 16 != m.nbytes or n & (n - 1) or not m.c_contiguous:
            raise ValueError("the settled table must be a contiguous buffer of a power of two (at least 2) "
                             "of 16-byte entries")
    return n


class _Record:
    __slots__ = ("key", "value", "flags", "exp", "state", "rounds", "fence", "hash")

    def __init__(self, key, value, flags, exp, hash=0):
        self.key = key
        self.value = value
        self.flags = flags
        self.exp = exp
        self.hash = hash
        self.state = _ST_FREE
        self.rounds = 0
        self.fence = 0


class _Answers:
    """A buffer of response frames: the bytes from ``head`` on are not consumed yet, and
    ``offset`` is the stream offset of ``head``."""
    __slots__ = ("buf", "head", "offset")

    def __init__(self):
        self.buf = bytearray()
        self.head = 0
        self.offset = 0


def _hold_table(hold, table) -> bytearray:
    """Writer ``hold`` as a table by vbucket: 0 holds nothing, 1 + bit holds the keys whose
    key_hash64 has ``bit`` as its top bit."""
    out = bytearray(len(table))
    for vb, bit in hold:
        vb, bit = int(vb), int(bit)
        if vb < 0 or vb >= len(table) or not table[vb]:
            raise ValueError(f"hold: vbucket {vb} is not a wanted vbucket")
        if bit not in (0, 1):
            raise ValueError(f"hold: bit must be 0 or 1, not {bit}")
        out[vb] = 1 + bit
    return out


def _key_text(key) -> str:
    return repr(bytes(key[:80]))


_HEX = frozenset(b"0123456789abcdefABCDEF")


def _listed_flags(fields):
    """The flags a metadump line lists (``flags=``, memcached 1.6.24 on, the line's last
    field) in its ``fields`` after exp, or None: the last field counts only as ``flags=``
    with 1-10 ASCII digits up to 0xFFFFFFFF (else the copy is fetched as without it)."""
    fields = [f for f in fields if f]
    if not fields or not fields[-1].startswith(b"flags="):
        return None
    digits = fields[-1][6:]
    if digits.isdigit() and len(digits) <= 10 and int(digits) <= 0xFFFFFFFF:
        return int(digits)
    return None


def _decode_uri(raw, offset):
    """memcached's uriencode reversed (%XX); strict about malformed escapes."""
    if b"%" not in raw:
        return bytes(raw)
    parts = raw.split(b"%")
    out = bytearray(parts[0])
    for part in parts[1:]:
        if len(part) < 2:
            raise CrawlerError("bad %-escape in metadump key", offset)
        if part[0] not in _HEX or part[1] not in _HEX:
            raise CrawlerError("bad %-escape in metadump key", offset)
        out.append(int(part[:2], 16))
        out += part[2:]
    return bytes(out)


class Writer:
    """Writes one source stream's records into the local memcached (the target), by the
    conflict rule, pipelined: ADDQ first with a NOOP fence per batch, GETK + CAS SET
    only for records the ADDQ found present. The caller (a stream's loop, or the ``Pump``
    that runs its hot part) does the socket I/O and hands whole chunks to ``feed_tap`` /
    ``feed_metadump`` / ``feed_fetch`` / ``feed_target``; it sends what ``target_requests``
    and ``fetch_requests`` return.

    ``mode`` chooses a record's first request to the target: "addq" (the quiet ADD above:
    one request when the target has no copy, three when it has one), "read" (read first:
    GETK, then ADD if there is no copy, CAS SET if it is older, nothing otherwise: one
    request when the target has a copy, two when not) or "auto": ADDQ first, and for each
    following batch of ``window // 4`` records whichever of the two the last batch's first
    requests favoured (read first once more than half of them found a copy).

    ``hold`` (with a settled table): ``(vbucket, bit)`` pairs. A record of such a vbucket
    whose key_hash64 has ``bit`` as its top bit, and which the table does not know yet, is
    held back rather than sent: it is looked up again once ``4 * window`` more records have
    arrived (sooner when more than ``4 * window`` records or HOLD_BYTES are held, and at
    once when the source has ended), and sent only if still unknown. The other old replica
    of the vbucket is given the other bit, so each key goes first through one stream while
    the other's copy waits for the note that makes it free (see _hold_table). A crawler stream
    (``feed_metadump``) defers fetches instead of holding values: a listed key of such a
    vbucket and bit whose item is at least DEFER_MIN_SIZE bytes (the listing's ``size=``) is
    fetched only once ``16 * window`` more wanted keys were listed (sooner past DEFER_BYTES of
    deferred keys, and as soon as the listing ended), so its copy usually arrives known and
    costs the target nothing; one already noted when released is asked for its flags alone
    (``mg <key> f q``), and fetched whole only if newer than the note (``refetched``). A
    deferred fetch costs a few dozen bytes; small items are not
    deferred (the two crawler streams drift apart by more than a deferral, and alternating
    runs measured it no cheaper for 100-byte values)."""

    def __init__(self, wanted, vbuckets=128, window=4096, max_body=DEFAULT_MAX_BODY, max_retries=64,
                 mode=MODE_ADDQ, settled=None, generation=0, hold=None):
        if mode not in WRITER_MODES:
            raise ValueError(f"mode must be one of {', '.join(WRITER_MODES)}, not {mode!r}")
        # The settled table (astaire.resync.settled), shared with the other streams of a resync.
        self._settled = None
        if settled is not None:
            entries = _settled_entries(settled, generation)
            self._settled = memoryview(settled).cast("B").cast("Q")
            self._settled_mask = entries // 2 - 1   # buckets of two entries
            self._settled_gen = generation << 32
        self._table = _wanted_table(wanted, vbuckets)
        # Whether a listed key is checked against the fetches queued and not sent yet, so that
        # a key listed again before its fetch went out is fetched once (``duplicates``). A walk
        # of the LRUs (``lru_crawler metadump all``) lists an item again when live traffic
        # moves it to another LRU; a walk of the hash table visits each key's bucket once and lists
        # it once, and there the stream turns the check off: the check costs every listed key,
        # and a key fetched twice would be written by the conflict rule like any second copy.
        # Set before the first listing text.
        self.check_duplicates = True
        self._mask = len(self._table) - 1
        self._hold = _hold_table(hold, self._table) if hold and settled is not None else None
        self.vbuckets = len(self._table)
        window = int(window)
        if window < 1 or window > _FENCE_MASK:
            raise ValueError(f"window must be between 1 and {_FENCE_MASK}, not {window}")
        if max_body < 0:
            raise ValueError("max_body must be >= 0")
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        self.window = window
        self.max_body = int(max_body)
        self.max_retries = int(max_retries)
        self._fence_every = max(1, window // 4)
        self.mode = mode
        self._read_first = mode == MODE_READ
        self._probe_present = 0   # auto: first requests that found a local copy, this batch
        self._probe_total = 0     # auto: first requests answered, this batch
        # Counters.
        self.entries = 0
        self.bytes = 0
        self.added = 0
        self.replaced = 0
        self.kept = 0
        self.failed = 0
        self.retries = 0
        self.skipped_own = 0
        self.skipped_unwanted = 0
        self.tombstones = 0
        self.other_tap = 0
        self.vanished = 0
        self.duplicates = 0
        self.kept_as_listed = 0    # copies listed with flags not newer than the note: kept unfetched
        self.read_first = 0       # records whose first request was a read
        self.deduplicated = 0     # records settled as kept from the settled table (also in kept)
        self.held = 0             # records held back (hold): those found known then are in deduplicated
        self.refetched = 0        # deferred fetches asked for flags alone, then found newer: fetched whole
        self.last_error = ""
        self._vb_entries = [0] * self.vbuckets
        self._vb_bytes = [0] * self.vbuckets
        # Source side (TAP).
        self._src = bytearray()
        self._src_head = 0
        self._src_offset = 0
        self._finished = False
        # Records accepted but not yet given a slot, and the slots (opaque = index).
        self._queue = deque()
        self._held = deque()      # (due: entries count, record), oldest first
        self._held_bytes = 0
        self._slots = [None] * window
        self._free = list(range(window - 1, -1, -1))
        self._in_use = 0
        # Quiet ADDs in flight, in send order: (slot, fence seq); and fences awaited.
        self._addq_fifo = deque()
        self._fences = deque()
        self._fence_seq = 0
        self._unfenced = 0
        self._out = bytearray()
        # Target side.
        self._tgt = _Answers()
        # Crawler side.
        self._md = bytearray()
        self._md_head = 0
        self._md_offset = 0
        self._md_ended = False
        self._md_lists_flags = 0           # 0 until the first key line, then 1 if it listed flags, else 2
        self._defer = None                 # a crawler stream's hold: fetches deferred (see the class docstring)
        self._deferred = deque()           # (due: listed count, key, exp, vb, key_hash64, listed flags, line bytes), oldest first
        self._deferred_bytes = 0
        self._listed = 0                   # wanted keys listed so far (the deferral's clock)
        self._fetch_queue = deque()        # (key, exp, vb, flags only) not sent yet
        self._fetch_queued_keys = {}       # key -> count, for the not-sent ones (duplicate detection)
        self._fetch_batches = deque()      # {opaque: (key, listed exp, vb, flags only)} per batch of meta gets, until its MN
        self._fetch_in_flight = 0
        self._fetch_seq = 0
        self._fetch_out = bytearray()
        self._fch = _Answers()
        self._backlog_bytes = 0

    # -- state -----------------------------------------------------------------------

    @property
    def backlog(self) -> int:
        """Records accepted but not yet settled."""
        return len(self._queue) + self._in_use

    @property
    def backlog_bytes(self) -> int:
        """Key and value bytes of the records accepted but not yet settled (what the backlog
        holds in memory: a stream bounds it as well as the record count)."""
        return self._backlog_bytes

    @property
    def fetch_backlog(self) -> int:
        """Crawler fetches listed but not yet answered."""
        return len(self._fetch_queue) + self._fetch_in_flight

    @property
    def done(self) -> bool:
        return ((self._finished or self._md_ended) and not self._queue and not self._held and not self._in_use
                and not self._deferred
                and not self._fences and not self._out and not self._fetch_queue
                and not self._fetch_in_flight)

    def stats(self) -> dict:
        return {
            "entries": self.entries, "bytes": self.bytes, "added": self.added,
            "replaced": self.replaced, "kept": self.kept, "failed": self.failed,
            "retries": self.retries, "skipped_own": self.skipped_own,
            "skipped_unwanted": self.skipped_unwanted, "tombstones": self.tombstones,
            "other_tap": self.other_tap, "vanished": self.vanished, "duplicates": self.duplicates,
            "kept_as_listed": self.kept_as_listed,
            "read_first": self.read_first, "deduplicated": self.deduplicated, "held": self.held,
            "refetched": self.refetched,
            "last_error": self.last_error, "backlog": self.backlog,
            "fetch_backlog": self.fetch_backlog, "done": self.done,
        }

    def vbucket_counts(self) -> dict:
        """{vbucket: (entries, bytes)} for every wanted vbucket, cumulative."""
        return {vb: (self._vb_entries[vb], self._vb_bytes[vb])
                for vb in range(self.vbuckets) if self._table[vb]}

    def finish(self) -> None:
        """The source ended cleanly. A frame cut short by the end is a protocol error."""
        if self._src_head < len(self._src):
            raise MalformedFrame(
                f"source stream ended inside a frame ({len(self._src) - self._src_head} bytes buffered)",
                self._src_offset)
        self._finished = True
        self._close_batch()

    # -- source: TAP -----------------------------------------------------------------

    def _count_entry(self, vb, size):
        """One more entry of vbucket ``vb`` taken from the source, ``size`` bytes of it received."""
        self.entries += 1
        self.bytes += size
        self._vb_entries[vb] += 1
        self._vb_bytes[vb] += size

    def _accept(self, key, value, flags, exp, vb, size):
        self._count_entry(vb, size)
        if not value:
            self.tombstones += 1
        h = 0
        if self._settled is not None:
            h = key_hash64(key)
            if self._known(h, flags):
                self.deduplicated += 1
                self.kept += 1
                return
        rec = _Record(key, value, flags, exp, h)
        if self._hold is not None and self._hold[vb] == 1 + (h >> 63) and not self._finished:
            self.held += 1
            self._held.append((self.entries + HOLD_WINDOWS * self.window, rec))
            self._held_bytes += len(key) + len(value)
            return
        self._enqueue(rec)

    def _enqueue(self, rec):
        self._backlog_bytes += len(rec.key) + len(rec.value)
        if self._free and not self._queue:
            self._start(rec)  # straight into a slot: same order as queueing then pumping
        else:
            self._queue.append(rec)

    def _release_held(self):
        """Look up again the held records that are due (or pressed out: too many, too many
        bytes, or the source ended); send those the table still does not know."""
        held = self._held
        while held:
            due, rec = held[0]
            if not (self._finished or due <= self.entries or len(held) > HOLD_WINDOWS * self.window
                    or self._held_bytes > HOLD_BYTES):
                return
            held.popleft()
            self._held_bytes -= len(rec.key) + len(rec.value)
            if self._known(rec.hash, rec.flags):
                self.deduplicated += 1
                self.kept += 1
            else:
                self._enqueue(rec)

    def feed_tap(self, data) -> int:
        """Take a chunk of the TAP stream; returns how many records it accepted."""
        buf = self._src
        if self._src_head:
            del buf[:self._src_head]
            self._src_head = 0
        buf += data
        pos = 0
        end = len(buf)
        accepted = 0
        table = self._table
        mask = self._mask
        max_body = self.max_body
        try:
            while pos < end:
                offset = self._src_offset
                size = _header_error(buf, pos, end - pos, offset, max_body)
                if not size:
                    break
                if _classify_tap(buf, pos, offset):
                    self.other_tap += 1
                else:
                    engine_len, keylen, _tf, _ttl, flags, exp = _decode_tap_body(buf, pos, size, offset)
                    k = pos + HEADER_SIZE + 16 + engine_len
                    key = bytes(buf[k:k + keylen])
                    if key.startswith(OWN_PREFIX):
                        self.skipped_own += 1
                    else:
                        vb = vbucket_hash(key) & mask
                        if table[vb]:
                            self._accept(key, bytes(buf[k + keylen:pos + size]), flags, exp, vb, size)
                            accepted += 1
                        else:
                            self.skipped_unwanted += 1
                pos += size
                self._src_offset += size
        finally:
            self._src_head = pos
        return accepted

    # -- target ----------------------------------------------------------------------

    def _emit_fence(self):
        seq = self._fence_seq
        self._fence_seq = (seq + 1) & _FENCE_MASK
        self._fences.append(seq)
        self._out += encode_noop(FENCE_BIT | seq)
        self._unfenced = 0

    def _close_batch(self):
        if self._unfenced:
            self._emit_fence()

    def _start(self, rec):
        """Give a record a free slot (its opaque) and send its first request: a read (GETK)
        in read-first mode, else a quiet ADD (fenced every batch)."""
        slot = self._free.pop()
        self._slots[slot] = rec
        self._in_use += 1
        if self._read_first:
            rec.state = _ST_READ
            self.read_first += 1
            self._out += encode_request(OP_GETK, rec.key, opaque=slot)
            return
        rec.state = _ST_ADDQ
        rec.fence = self._fence_seq
        self._out += _store(OP_ADDQ, rec.key, rec.value, rec.flags, rec.exp, slot, 0)
        self._addq_fifo.append((slot, rec.fence))
        self._unfenced += 1
        if self._unfenced >= self._fence_every:
            self._emit_fence()

    def _pump(self):
        """Start queued records in free slots, a batch at a time: while fewer than a batch
        of slots is free (and the queue holds more), wait for more answers rather than
        send dribs (each a wake-up of the target and a syscall on both sides)."""
        if self._held:
            self._release_held()
        queue = self._queue
        free = self._free
        if len(free) < self._fence_every and len(free) < len(queue):
            self._close_batch()
            return
        while queue and free:
            self._start(queue.popleft())
        self._close_batch()

    def target_requests(self) -> bytes:
        """The frames to send to the local memcached now (the buffer is cleared)."""
        self._pump()
        out = bytes(self._out)
        self._out.clear()
        return out

    def _probed(self, present):
        """Auto mode: a first request's answer (did the target hold a copy that had to be
        read? A copy of a key the settled table knew, with flags not older, counts as none)."""
        if self.mode != MODE_AUTO:
            return
        self._probe_total += 1
        if present:
            self._probe_present += 1
        if self._probe_total >= self._fence_every:
            self._read_first = self._probe_present * 2 > self._probe_total
            self._probe_present = self._probe_total = 0

    def _probed_found(self, rec):
        """Auto mode: a read-first GETK found a copy. It counts as one that had to be read
        unless the table knew the key with flags not older; the table is looked at only in
        auto mode."""
        if self.mode == MODE_AUTO:
            self._probed(not (self._settled is not None and self._known(rec.hash, rec.flags)))

    # -- the settled table (astaire.resync.settled) ------------------------------------

    def _note_of(self, h):
        """The table's note of this key in this resync: its second word, or None. The key's
        bucket is two entries (``4 * (h & mask)``): the newer note first."""
        t = self._settled
        i = 4 * (h & self._settled_mask)
        for j in (i, i + 2):
            if t[j] == h:
                word = t[j + 1]
                if (word >> 40) == (h & 0xFFFFFF) and (word & 0xFF00000000) == self._settled_gen:
                    return word
        return None

    def _known(self, h, flags) -> bool:
        """The target was seen holding this key, in this resync, with flags not older than
        ``flags``: another copy changes nothing (see astaire.resync.settled)."""
        word = self._note_of(h)
        return word is not None and not ((word & 0xFFFFFFFF) - flags) & 0x80000000

    def _noted(self, h) -> bool:
        """The table has a note of this key in this resync (whatever its flags)."""
        return self._settled is not None and self._note_of(h) is not None

    def _note(self, rec, held) -> None:
        """The target holds the record's key with flags ``held`` (it just added, replaced
        or kept it)."""
        if self._settled is None:
            return
        t = self._settled
        i = 4 * (rec.hash & self._settled_mask)
        if t[i] != rec.hash:
            if t[i + 2] == rec.hash:
                i += 2  # the key's older note: replaced where it is
            else:  # the bucket's newer note becomes its older one, the older one goes
                t[i + 2] = t[i]
                t[i + 3] = t[i + 1]
        t[i] = rec.hash
        t[i + 1] = ((rec.hash & 0xFFFFFF) << 40) | self._settled_gen | held

    def _kept_as_noted(self, slot, rec) -> bool:
        """A write that lost to the key being there (an ADD that found it present, a CAS
        replace that found it changed): if the table notes the key meanwhile with flags not
        older than this copy (the other old replica's stream wrote it first, usually the very
        copy this write ran into), the copy is settled as kept and nothing is read back."""
        if self._settled is not None and self._known(rec.hash, rec.flags):
            self.deduplicated += 1
            self._settle(slot, 2)
            return True
        return False

    def _settle(self, slot, outcome):
        rec = self._slots[slot]
        self._backlog_bytes -= len(rec.key) + len(rec.value)
        self._slots[slot] = None
        self._free.append(slot)
        self._in_use -= 1
        if outcome == 0:
            self.added += 1
        elif outcome == 1:
            self.replaced += 1
        elif outcome == 2:
            self.kept += 1
        else:
            self.failed += 1

    def _fail(self, slot, rec, what):
        self.last_error = what
        self._settle(slot, 3)

    def _retry(self, slot, rec, state):
        """Another round for a record that lost a race: re-read (GETK) or re-add (ADD)."""
        rec.rounds += 1
        self.retries += 1
        if rec.rounds > self.max_retries:
            self._fail(slot, rec, f"gave up on key {_key_text(rec.key)} after {self.max_retries} retries")
            return
        self._send(slot, rec, state)

    def _send(self, slot, rec, state):
        rec.state = state
        if state == _ST_GETK:
            self._out += encode_request(OP_GETK, rec.key, opaque=slot)
        else:  # _ST_ADD
            self._out += _store(OP_ADD, rec.key, rec.value, rec.flags, rec.exp, slot, 0)

    def feed_target(self, data) -> None:
        """Take a chunk of the local memcached's responses."""
        self._feed_answers(data, self._tgt, self._on_target)

    def _feed_answers(self, data, answers, on_frame) -> None:
        """Append a chunk to a response buffer and hand each whole frame to ``on_frame``;
        a frame cut short stays buffered for the next chunk."""
        buf = answers.buf
        if answers.head:
            del buf[:answers.head]
            answers.head = 0
        buf += data
        pos = 0
        end = len(buf)
        try:
            while pos < end:
                offset = answers.offset
                size = _header_error(buf, pos, end - pos, offset, self.max_body)
                if not size:
                    break
                on_frame(_frame_at(buf, pos, size, offset))
                pos += size
                answers.offset += size
        finally:
            answers.head = pos

    def _on_target(self, f):
        offset = f.offset
        if f.magic != MAGIC_RESPONSE:
            raise UnexpectedFrame(f"request opcode 0x{f.opcode:02x} from the target", offset)
        opaque = f.opaque
        if f.opcode == OP_NOOP and opaque & FENCE_BIT:
            seq = opaque & _FENCE_MASK
            if not self._fences or self._fences[0] != seq:
                raise UnexpectedFrame(f"NOOP response with unexpected opaque 0x{opaque:08x} from the target",
                                      offset)
            self._fences.popleft()
            fifo = self._addq_fifo
            slots = self._slots
            while fifo and fifo[0][1] == seq:
                slot, fseq = fifo.popleft()
                rec = slots[slot]
                if rec is not None and rec.state == _ST_ADDQ and rec.fence == fseq:
                    self._probed(False)
                    self._note(rec, rec.flags)
                    self._settle(slot, 0)
            return
        rec = self._slots[opaque] if opaque < self.window else None
        if rec is None or _EXPECTED_OP[rec.state] != f.opcode:
            raise UnexpectedFrame(
                f"response opcode 0x{f.opcode:02x} with unexpected opaque 0x{opaque:08x} from the target", offset)
        status = f.status
        slot = opaque
        state = rec.state
        if state == _ST_GETK or state == _ST_READ:
            if status == STATUS_SUCCESS:
                if len(f.extras) != 4:
                    raise MalformedFrame(f"GETK response extras length {len(f.extras)}, expected 4", offset)
                if f.key != rec.key:
                    raise UnexpectedFrame("GETK response for another key from the target", offset)
                local = _U32.unpack(f.extras)[0]
                if state == _ST_READ:
                    self._probed_found(rec)
                if (local - rec.flags) & 0x80000000:  # int32(local - record) < 0: the local copy is older
                    rec.state = _ST_SET
                    self._out += _store(OP_SET, rec.key, rec.value, rec.flags, rec.exp, slot, f.cas)
                else:
                    self._note(rec, local)
                    self._settle(slot, 2)
                return
            if status == STATUS_KEY_ENOENT:
                if state == _ST_READ:
                    self._probed(False)
                    self._send(slot, rec, _ST_ADD)  # the normal path when the key is absent
                else:
                    self._retry(slot, rec, _ST_ADD)
                return
        elif state == _ST_ADDQ or state == _ST_ADD:
            if status == STATUS_SUCCESS:
                self._note(rec, rec.flags)
                self._settle(slot, 0)
                return
            if status == STATUS_KEY_EEXISTS or status == STATUS_NOT_STORED:
                if self._kept_as_noted(slot, rec):
                    if state == _ST_ADDQ:
                        self._probed(False)  # found, but known: no read was needed
                    return
                if state == _ST_ADDQ:
                    self._probed(True)
                    self._send(slot, rec, _ST_GETK)   # the normal path when the key is present
                else:
                    self._retry(slot, rec, _ST_GETK)
                return
        else:  # _ST_SET
            if status == STATUS_SUCCESS:
                self._note(rec, rec.flags)
                self._settle(slot, 1)
                return
            if status == STATUS_KEY_EEXISTS or status == STATUS_NOT_STORED:
                if not self._kept_as_noted(slot, rec):
                    self._retry(slot, rec, _ST_GETK)
                return
            if status == STATUS_KEY_ENOENT:
                self._retry(slot, rec, _ST_ADD)
                return
        name = _STATUS_NAMES.get(status, "unknown status")
        text = bytes(f.value[:200]).decode("utf-8", "replace")
        self._fail(slot, rec, f"{_OP_NAMES[f.opcode]} of key {_key_text(rec.key)} failed: "
                              f"status 0x{status:04x} {name} {text!r}")

    # -- source: crawler -------------------------------------------------------------

    def feed_metadump(self, data) -> bool:
        """Take a chunk of ``lru_crawler metadump all`` text; True once END was seen."""
        if self._hold is not None:  # a crawler stream defers fetches instead (see the class docstring)
            self._defer, self._hold = self._hold, None
        if self._md_ended:
            if data:
                raise CrawlerError("data after END", self._md_offset)
            return True
        buf = self._md
        if self._md_head:
            del buf[:self._md_head]
            self._md_head = 0
        buf += data
        pos = 0
        try:
            while True:
                nl = buf.find(b"\n", pos)
                if nl < 0:
                    if len(buf) - pos > MAX_METADUMP_LINE:
                        raise CrawlerError("metadump line too long", self._md_offset)
                    break
                if nl - pos > MAX_METADUMP_LINE:
                    raise CrawlerError("metadump line too long", self._md_offset)
                end = nl
                if end > pos and buf[end - 1] == 0x0D:
                    end -= 1
                line = bytes(buf[pos:end])
                offset = self._md_offset
                self._md_offset += nl + 1 - pos
                pos = nl + 1
                if self._on_metadump_line(line, offset):
                    self._md_ended = True
                    if pos < len(buf):
                        raise CrawlerError("data after END", self._md_offset)
                    break
        finally:
            self._md_head = pos
        return self._md_ended

    def _on_metadump_line(self, line, offset) -> bool:
        if line.startswith(b"key="):
            sp = line.find(b" ")
            raw = line[4:] if sp < 0 else line[4:sp]
            exp = None
            size = 0
            flags = None  # the listed flags (memcached 1.6.24 on): see _listed_flags
            if sp >= 0:
                fields = line[sp + 1:].split(b" ")
                for i, field in enumerate(fields):
                    if field.startswith(b"exp="):
                        digits = field[5:] if field[4:5] == b"-" else field[4:]
                        if not digits.isdigit():  # ASCII digits only (int() would take "+1", "1_0")
                            raise CrawlerError("bad exp in metadump line", offset)
                        exp = int(field[4:])
                        if self._defer is not None:  # the last size= after exp (a hint, lenient)
                            for f in reversed(fields[i + 1:]):
                                if f.startswith(b"size=") and len(f) > 5:
                                    digits = re.match(rb"[0-9]*", f[5:]).group()
                                    size = min(int(digits or b"0"), 0xFFFFFFFF)
                                    break
                        if self._settled is not None and self._md_lists_flags != 2:
                            flags = _listed_flags(fields[i + 1:])
                        if self._md_lists_flags == 0:  # a server lists flags on every line or on none
                            self._md_lists_flags = 1 if flags is not None else 2
                        break
            if exp is None or exp < -1 or exp > 0xFFFFFFFF:
                raise CrawlerError("metadump line without a valid exp", offset)
            key = _decode_uri(raw, offset)
            if not key or len(key) > 250:
                raise CrawlerError("bad key in metadump line", offset)
            if exp < 0:
                exp = 0
            if key.startswith(OWN_PREFIX):
                self.skipped_own += 1
                return False
            vb = vbucket_hash(key) & self._mask
            if not self._table[vb]:
                self.skipped_unwanted += 1
                return False
            if self.check_duplicates and key in self._fetch_queued_keys:
                self.duplicates += 1  # the one queued fetch will read the latest copy
                return False
            self._listed += 1
            # the key's table hash, for the listed flags or the deferral (the fetch computes its own)
            kh = key_hash64(key) if flags is not None or self._defer is not None else 0
            if flags is not None and self._known(kh, flags):
                # Listed with flags (1.6.24 on) not newer than the note: kept, and not fetched.
                self._listed_kept(vb, len(line) + 1)
                return False
            if self._defer is not None and self._defer[vb] == 1 + (kh >> 63) and size >= DEFER_MIN_SIZE:
                self._deferred.append((self._listed + DEFER_WINDOWS * self.window, key, exp, vb, kh, flags,
                                       len(line) + 1))
                self._deferred_bytes += _DEFER_REC + len(key)
                self.held += 1
                if self._deferred_bytes > DEFER_BYTES:
                    self._release_deferred(0)
                return False
            if self.check_duplicates:
                self._fetch_queued_keys[key] = 1
            self._fetch_queue.append((key, exp, vb, False))
            return False
        if line == b"END":
            return True
        if line == b"OK":
            return False
        if line == b"BUSY" or line.startswith(b"BUSY "):
            raise CrawlerBusy(f"crawler busy: {line[:200].decode('utf-8', 'replace')}", offset)
        if line == b"ERROR" or line.startswith((b"ERROR ", b"CLIENT_ERROR", b"SERVER_ERROR")):
            raise CrawlerError(f"crawler error: {line[:200].decode('utf-8', 'replace')}", offset)
        raise CrawlerError(f"unparseable metadump line: {line[:200].decode('utf-8', 'replace')}", offset)

    def _release_deferred(self, room):
        """Queue the deferred fetches that are due (or, once the listing ended, any) while
        fewer than ``room`` fetches wait unsent; and the oldest past DEFER_BYTES whatever
        the room."""
        deferred = self._deferred
        while deferred:
            due, key, exp, vb, kh, flags, size = deferred[0]
            if not (self._deferred_bytes > DEFER_BYTES
                    or (len(self._fetch_queue) < room
                        and (self._md_ended or self._finished or due <= self._listed))):
                return
            deferred.popleft()
            self._deferred_bytes -= _DEFER_REC + len(key)
            if flags is not None and self._known(kh, flags):
                self._listed_kept(vb, size)
                continue
            # Noted meanwhile: first ask the source for the flags alone; the value follows only
            # if this copy turns out newer than the note.
            self._requeue_fetch(key, exp, vb, self._noted(kh))

    def fetch_requests(self) -> bytes:
        """Pending meta gets for listed keys (``mg <key> v f t q O<n>``: value, flags and
        remaining TTL in one read, misses silent), each batch closed by ``mn``. At most
        ``window`` fetches and unsettled records are in flight together."""
        if self._deferred:
            self._release_deferred(self.window)
        room = self.window - self._fetch_in_flight - self.backlog
        queue = self._fetch_queue
        queued = self._fetch_queued_keys
        out = self._fetch_out
        while room > 0 and queue:
            n = min(room, self._fence_every, len(queue))
            if n < self._fence_every and n < len(queue):
                break  # a batch at a time, as for the target: wait for room for a whole one
            batch = {}
            for _ in range(n):
                key, exp, vb, flags_only = queue.popleft()
                queued.pop(key, None)
                if flags_only == _FETCH_WHOLE:  # a flags-only answer showed this copy newer
                    flags_only = False
                elif not flags_only and self._noted(key_hash64(key)):
                    # The other replica's copy settled already: ask for the flags alone (as
                    # for a deferred fetch); the value follows only if this copy is newer.
                    flags_only = True
                opaque = self._fetch_seq
                self._fetch_seq = (opaque + 1) & _FENCE_MASK
                batch[opaque] = (key, exp, vb, flags_only)
                out += _meta_get(key, opaque, flags_only)
            out += b"mn\r\n"
            self._fetch_batches.append(batch)
            self._fetch_in_flight += n
            room -= n
        data = bytes(out)
        out.clear()
        return data

    def feed_fetch(self, data) -> None:
        """Take a chunk of the source's answers to ``fetch_requests``."""
        answers = self._fch
        buf = answers.buf
        if answers.head:
            del buf[:answers.head]
            answers.head = 0
        buf += data
        pos = 0
        try:
            while pos < len(buf):
                nl = buf.find(b"\n", pos, pos + _MAX_META_LINE)
                if nl < 0:
                    if len(buf) - pos >= _MAX_META_LINE:
                        raise MalformedFrame("meta answer line too long on the fetch connection", answers.offset)
                    break
                used = self._on_meta_answer(buf, pos, nl, answers.offset)
                if not used:
                    break
                pos += used
                answers.offset += used
        finally:
            answers.head = pos

    def _kept_on_flags(self, vb, size):
        """A crawler copy whose flags (answered alone, or listed) are not newer than the
        table's note is settled as kept; no value travelled (``size``: the bytes that
        carried the flags)."""
        self._count_entry(vb, size)
        self.deduplicated += 1
        self.kept += 1

    def _listed_kept(self, vb, size):
        """A copy listed with flags not newer than the note: kept without a fetch (``size``:
        its listing line's bytes)."""
        self._kept_on_flags(vb, size)
        self.kept_as_listed += 1

    def _flags_answer(self, key, listed, vb, flags, size):
        """A flags-only fetch's answer: a copy not newer than the note is settled as kept, as
        the Writer's records are (no value travelled); a newer one is fetched again whole."""
        if self._known(key_hash64(key), flags):
            self._kept_on_flags(vb, size)
            return
        self.refetched += 1
        self._requeue_fetch(key, listed, vb, _FETCH_WHOLE)

    def _requeue_fetch(self, key, exp, vb, flags_only):
        """Queue again a fetch that waited (deferred, or asked for flags alone), unless its key
        was listed again meanwhile: the one queued fetch then reads the latest copy."""
        if self.check_duplicates:
            if key in self._fetch_queued_keys:
                self.duplicates += 1
                return
            self._fetch_queued_keys[key] = 1
        self._fetch_queue.append((key, exp, vb, flags_only))

    def _take_answer(self, batch, opaque, flags_only, offset):
        """The in-flight fetch an answer with ``opaque`` is for, taken from its batch; an
        opaque of no fetch awaiting this kind of answer is a protocol error."""
        if opaque not in batch or (flags_only and not batch[opaque][3]):
            raise UnexpectedFrame(f"meta get answer with unexpected opaque {opaque} on the fetch connection", offset)
        if batch[opaque][3] and not flags_only:
            raise UnexpectedFrame(f"a value for the flags-only meta get {opaque} on the fetch connection", offset)
        self._fetch_in_flight -= 1
        return batch.pop(opaque)

    def _on_meta_answer(self, buf, pos, nl, offset) -> int:
        """One answer to a meta get: the bytes it took, or 0 when its value is not all here."""
        line = bytes(buf[pos:nl - 1 if nl > pos and buf[nl - 1] == 13 else nl])
        total = nl + 1 - pos
        if not self._fetch_batches:
            raise UnexpectedFrame(f"unexpected answer {line[:120]!r} on the fetch connection", offset)
        batch = self._fetch_batches[0]
        if line == b"MN":
            self._fetch_batches.popleft()
            self.vanished += len(batch)
            self._fetch_in_flight -= len(batch)
            return total
        if line.startswith(b"VA "):
            hit = _parse_va(line)
            if hit is None:
                raise MalformedFrame(f"bad meta get answer {line[:120]!r} on the fetch connection", offset)
            vlen, flags, ttl, opaque = hit
            need = total + vlen + 2
            if len(buf) - pos < need:
                if need > self.max_body + _MAX_META_LINE:
                    raise FrameTooLarge(f"meta get value of {vlen} bytes exceeds the limit of {self.max_body}",
                                        offset)
                return 0
            if buf[pos + need - 2:pos + need] != b"\r\n":
                raise MalformedFrame("meta get value not followed by CRLF on the fetch connection", offset)
            key, listed, vb, _ = self._take_answer(batch, opaque, False, offset)
            self._accept(key, bytes(buf[pos + total:pos + total + vlen]), flags, _read_expiry(listed, ttl), vb, need)
            return need
        if line.startswith(b"HD "):
            hit = _parse_hd(line)
            if hit is None:
                raise MalformedFrame(f"bad meta get answer {line[:120]!r} on the fetch connection", offset)
            flags, opaque = hit
            key, listed, vb, _ = self._take_answer(batch, opaque, True, offset)
            self._flags_answer(key, listed, vb, flags, total)
            return total
        if line.startswith((b"CLIENT_ERROR", b"SERVER_ERROR")):
            self.failed += 1  # the fetch it answered stays unanswered: its batch's MN counts it
            self.last_error = f"meta get failed on the fetch connection: {line[:120]!r}"
            return total
        if line == b"ERROR":
            raise UnexpectedFrame("the source refused a meta get (ERROR): no meta commands", offset)
        raise UnexpectedFrame(f"unexpected answer {line[:120]!r} on the fetch connection", offset)


_MAX_META_LINE = 2048
_FETCH_WHOLE = 2  # a queued refetch's flags_only: sent whole even if the key is noted
_RELATIVE_EXPIRY_MAX = 2592000  # memcached: an expiry up to 30 days is relative


_EXPIRY_SLACK = 2


def _read_expiry(listed: int, ttl: int) -> int:
    """The expiry to store for a record whose remaining TTL (-1: none) came with its value.
    The listing's absolute expiry is exact, but the record may have changed since it was
    listed: it is kept only when the read agrees with it within memcached's one-second
    clock (2 s: both ends may lag); otherwise the read decides (_ttl_expiry)."""
    if ttl >= 0 and listed and abs(listed - (int(time.time()) + ttl)) <= _EXPIRY_SLACK:
        return listed
    return _ttl_expiry(ttl)


def _ttl_expiry(ttl: int) -> int:
    """The expiry to store for a remaining TTL read with the value (-1: none). Up to 30 days
    it stays relative, as memcached reads such an expiry: the target's clock then counts
    the same seconds the source's did (an absolute time would add both servers' clock lag).
    0 (expiring this second) becomes 1, since a relative 0 means never."""
    if ttl < 0:
        return 0
    if ttl == 0:
        return 1
    if ttl <= _RELATIVE_EXPIRY_MAX:
        return ttl
    return (int(time.time()) + ttl) & 0xFFFFFFFF


def _meta_get(key: bytes, opaque: int, flags_only: bool = False) -> bytes:
    """``mg <key> v f t q O<opaque>\r\n`` (``mg <key> f q O<opaque>`` for the flags alone); a
    key the text protocol cannot carry (a space, a control byte) goes base64-encoded with the
    ``b`` flag."""
    what = b" f q O%d\r\n" % opaque if flags_only else b" v f t q O%d\r\n" % opaque
    if any(c <= 32 or c == 127 for c in key):
        return b"mg " + base64.b64encode(key) + b" b" + what
    return b"mg " + key + what


def _number(token: bytes, signed: bool = False):
    digits = token[1:] if signed and token[:1] == b"-" else token
    if not digits or not digits.isdigit() or len(digits) > 12:
        return None
    return int(token)


def _meta_tokens(tokens):
    """The return flags of a meta answer: {b"f": flags, b"t": ttl, b"O": opaque} for those
    present (others skipped), or None for a bad number."""
    got = {}
    for tok in tokens:
        if tok[:1] in (b"f", b"t", b"O"):
            v = got[tok[:1]] = _number(tok[1:], signed=tok[:1] == b"t")
            if v is None or (v < -1 if tok[:1] == b"t" else v > 0xFFFFFFFF):
                return None
    return got


def _parse_hd(line: bytes):
    """``HD f<flags> O<opaque>`` (a flags-only meta get's hit; return flags in any order):
    (flags, opaque), or None."""
    got = _meta_tokens(line[3:].split(b" "))
    if got is None or b"f" not in got or b"O" not in got:
        return None
    return got[b"f"], got[b"O"]


def _parse_va(line: bytes):
    """``VA <len> f<flags> t<ttl> O<opaque>`` (return flags in any order): (len, flags, ttl,
    opaque), or None."""
    tokens = line[3:].split(b" ")
    vlen = _number(tokens[0])
    got = _meta_tokens(tokens[1:])
    if vlen is None or got is None or len(got) != 3:
        return None
    return vlen, got[b"f"], got[b"t"], got[b"O"]


# -- the stream's I/O loop, its hot part (twin of _writer.Pump) ----------------------------

PUMP_TIMEOUT = 0      # the deadline passed
PUMP_DONE = 1         # the source had ended, the Writer is done and nothing is left to send
PUMP_SOURCE = 2       # the source is readable and the caller reads it (the crawler's metadump)
PUMP_SIGNAL = 3       # a signal interrupted the wait; its Python handler has run
PUMP_SPOOL = 4        # a batch of fetches' room opened while the caller has listing text waiting
PUMP_SOURCE_EOF = 5   # the TAP source closed its stream
PUMP_TARGET_EOF = 6   # the target closed the connection
PUMP_FETCH_EOF = 7    # the crawler's fetch connection closed
PUMP_SOURCE_END = 8   # the crawler's listing ended (its END line was fed to the Writer)
PUMP_SRC_NONE = 0     # do not watch the source
PUMP_SRC_TAP = 1      # read the TAP source here, when the Writer has room
PUMP_SRC_CALLER = 2   # watch the source; the caller reads it
PUMP_SRC_LISTING = 3  # a crawler's listing: read here into the Writer while it has room for
                      # fetches and the caller spools none; else the caller reads it (SOURCE)

_PUMP_CHUNK = 512 * 1024
_TRICKLE_BYTES = 8192
_TRICKLE_WAIT = 0.0005
_POLL_IN = select.POLLIN | select.POLLERR | select.POLLHUP | select.POLLNVAL


class Pump:
    """The hot part of a stream's I/O loop (``astaire.resync.stream``): it moves bytes
    between the target's socket, the crawler's fetch socket and a TAP source's socket and
    the Writer until the caller has something to do (``run``'s codes, PUMP_*). The caller
    owns the sockets (non-blocking; it closes them), reads a crawler's listing while it has
    some spooled or the Writer's fetches fill the window (PUMP_SRC_LISTING: the Pump reads
    it otherwise), and does the timeouts, progress and stopping between calls.

    Flow control, as the caller's loop had it: the source (and a crawler's fetch answers)
    are read only while the Writer holds fewer than ``window`` unsettled records and
    ``window_bytes`` of them, and fewer than ``max_pending_out`` bytes wait for the target.

    After an exception from ``run`` (an ``OSError`` from a socket, a protocol error from
    the Writer), ``peer`` says whose it was ("target", "fetch" or "source") and, for an
    OSError, ``op`` whether it was a "send" or a "recv"."""

    def __init__(self, writer, target_fd, fetch_fd=-1, window_bytes=1024 * 1024, max_pending_out=1024 * 1024):
        if writer is None:
            raise TypeError("writer must be a Writer")
        if target_fd < 0:
            raise ValueError("target_fd must be a file descriptor")
        if window_bytes < 1 or max_pending_out < 1:
            raise ValueError("window_bytes and max_pending_out must be at least 1")
        self.w = writer
        self._tfd, self._ffd = target_fd, fetch_fd
        self.window_bytes, self.max_pending_out = window_bytes, max_pending_out
        self._tout = bytearray()
        self._fout = bytearray()
        self._trickle = False
        self.last_progress = time.monotonic()
        self._counts = {"target": (0, 0), "fetch": (0, 0), "source": (0, 0)}  # reads, bytes
        self.peer = self.op = ""

    @property
    def target_pending(self) -> int:
        """Bytes the Writer wants sent to the target that the socket has not taken yet."""
        return len(self._tout)

    @property
    def fetch_pending(self) -> int:
        """Meta gets not yet taken by the fetch socket."""
        return len(self._fout)

    def _room(self) -> bool:
        w = self.w
        return (w.backlog < w.window and w.backlog_bytes < self.window_bytes
                and len(self._tout) < self.max_pending_out)

    def _send(self, fd: int, out: bytearray, who: str) -> None:
        while out:
            try:
                n = os.write(fd, out)  # a socket: write(2) is send(2) without flags
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self.peer, self.op = who, "send"
                raise
            del out[:n]
            self.last_progress = time.monotonic()

    def _take(self, fd: int, who: str, feed) -> int:
        """One read, given to ``feed``: bytes read, 0 at EOF, -1 when nothing is ready."""
        try:
            data = os.read(fd, _PUMP_CHUNK)
        except (BlockingIOError, InterruptedError):
            return -1
        except OSError:
            self.peer, self.op = who, "recv"
            raise
        self.last_progress = time.monotonic()
        if data:
            reads, nbytes = self._counts[who]
            self._counts[who] = (reads + 1, nbytes + len(data))
            self.peer = who
            feed(data)
            self.peer = ""
        return len(data)

    target_reads = property(lambda self: self._counts["target"][0])
    target_bytes_read = property(lambda self: self._counts["target"][1])
    fetch_reads = property(lambda self: self._counts["fetch"][0])
    fetch_bytes_read = property(lambda self: self._counts["fetch"][1])
    source_reads = property(lambda self: self._counts["source"][0])
    source_bytes_read = property(lambda self: self._counts["source"][1])

    def run(self, timeout, src_fd=-1, src_mode=PUMP_SRC_NONE, src_ended=False, spool_waiting=False) -> int:
        """Move bytes until there is something for the caller, at most ``timeout`` seconds;
        returns a PUMP_* code. ``src_fd`` / ``src_mode``: the source's socket and how it is
        watched (PUMP_SRC_*). ``src_ended``: the source has ended (DONE can be reached).
        ``spool_waiting``: the caller holds listing text for the Writer (SPOOL is returned
        once a batch of fetches fits)."""
        w = self.w
        deadline = time.monotonic() + timeout
        self.peer = self.op = ""
        while True:
            if self._ffd >= 0 and w.backlog_bytes < self.window_bytes:  # fetched values become backlog
                self._fout += w.fetch_requests()
                self._send(self._ffd, self._fout, "fetch")
            self._tout += w.target_requests()
            self._send(self._tfd, self._tout, "target")
            if src_ended and w.done and not self._tout:
                return PUMP_DONE
            if spool_waiting and w.fetch_backlog + w._fence_every <= w.window:
                return PUMP_SPOOL
            poller = select.poll()
            poller.register(self._tfd, select.POLLIN | (select.POLLOUT if self._tout else 0))
            room = self._room()
            if self._ffd >= 0:
                poller.register(self._ffd, (select.POLLIN if room else 0) | (select.POLLOUT if self._fout else 0))
            watch_src = src_fd >= 0 and (src_mode in (PUMP_SRC_CALLER, PUMP_SRC_LISTING)
                                         or (src_mode == PUMP_SRC_TAP and room))
            if watch_src:
                poller.register(src_fd, select.POLLIN)
            if self._trickle:
                # The last answers came a few at a time (the Clearwater fork writes each
                # response on its own): let them gather rather than wake per handful.
                self._trickle = False
                time.sleep(_TRICKLE_WAIT)
            now = time.monotonic()
            if now >= deadline:
                return PUMP_TIMEOUT
            try:
                ready = dict(poller.poll(int(min(deadline - now, 3600.0) * 1000) + 1))
            except InterruptedError:  # pragma: no cover - PEP 475 retries; a raising handler propagates
                return PUMP_SIGNAL
            if not ready:
                continue
            if ready.get(self._tfd, 0) & select.POLLOUT:
                self._send(self._tfd, self._tout, "target")
            if self._ffd >= 0 and ready.get(self._ffd, 0) & select.POLLOUT:
                self._send(self._ffd, self._fout, "fetch")
            if ready.get(self._tfd, 0) & _POLL_IN:
                n = self._take(self._tfd, "target", w.feed_target)
                if n == 0:
                    return PUMP_TARGET_EOF
                self._trickle = 0 < n < _TRICKLE_BYTES
            if self._ffd >= 0 and ready.get(self._ffd, 0) & _POLL_IN:
                if self._take(self._ffd, "fetch", w.feed_fetch) == 0:
                    return PUMP_FETCH_EOF
            if watch_src and ready.get(src_fd, 0) & _POLL_IN:
                if src_mode == PUMP_SRC_CALLER:
                    return PUMP_SOURCE
                if src_mode == PUMP_SRC_LISTING:
                    if spool_waiting or w.fetch_backlog >= w.window:
                        return PUMP_SOURCE  # the text must wait: the caller spools it
                    if self._take(src_fd, "source", w.feed_metadump) == 0:
                        return PUMP_SOURCE_EOF
                    if w._md_ended:
                        return PUMP_SOURCE_END
                    continue
                if self._take(src_fd, "source", w.feed_tap) == 0:
                    return PUMP_SOURCE_EOF


__all__ = [
    "MAGIC_REQUEST", "MAGIC_RESPONSE",
    "OP_GET", "OP_SET", "OP_ADD", "OP_REPLACE", "OP_DELETE", "OP_QUIT", "OP_GETQ", "OP_NOOP",
    "OP_VERSION", "OP_GETK", "OP_GETKQ", "OP_SETQ", "OP_ADDQ", "OP_REPLACEQ",
    "OP_TAP_CONNECT", "OP_TAP_MUTATION", "OP_TAP_DELETE", "OP_TAP_FLUSH", "OP_TAP_OPAQUE",
    "OP_TAP_VBUCKET_SET", "OP_TAP_CHECKPOINT_START", "OP_TAP_CHECKPOINT_END",
    "STATUS_SUCCESS", "STATUS_KEY_ENOENT", "STATUS_KEY_EEXISTS", "STATUS_E2BIG", "STATUS_EINVAL",
    "STATUS_NOT_STORED", "STATUS_NOT_MY_VBUCKET", "STATUS_UNKNOWN_COMMAND", "STATUS_ENOMEM",
    "MODE_ADDQ", "MODE_READ", "MODE_AUTO", "WRITER_MODES",
    "TAP_FLAG_DUMP", "TAP_FLAG_LIST_VBUCKETS", "HEADER_SIZE", "DEFAULT_MAX_BODY", "OWN_PREFIX", "MAX_METADUMP_LINE",
    "ProtocolError", "BadMagic", "BadLengths", "FrameTooLarge", "TapNotSupported",
    "UnexpectedFrame", "MalformedFrame", "CrawlerBusy", "CrawlerError",
    "Frame", "TapMutation", "FrameParser", "Writer", "key_hash64",
    "Pump", "PUMP_TIMEOUT", "PUMP_DONE", "PUMP_SOURCE", "PUMP_SIGNAL", "PUMP_SPOOL", "PUMP_SOURCE_EOF",
    "PUMP_TARGET_EOF", "PUMP_FETCH_EOF", "PUMP_SOURCE_END", "PUMP_SRC_NONE", "PUMP_SRC_TAP", "PUMP_SRC_CALLER",
    "PUMP_SRC_LISTING",
    "vbucket_hash", "vbucket_of", "decode_tap_mutation", "filter_mutations", "filter_count",
    "encode_request", "encode_tap_connect", "encode_get", "encode_getk", "encode_getkq",
    "encode_add", "encode_addq", "encode_set",
    "encode_delete", "encode_noop", "encode_version", "encode_tap_mutation", "encode_batch",
]
