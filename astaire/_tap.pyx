# cython: language_level=3
"""Binary-protocol / TAP codec, compiled: frame parser, TAP scanner, vbucket hash, encoders.

With ``astaire._writer`` (the Writer's per-record state machine) it is the twin of
``astaire._tap_py`` (same names, same results, same errors); ``_tap.pxd`` holds what the
two units share. The per-record work (frame parse, MD5 vbucket hash, vbucket filter)
runs in C on raw pointers without the GIL and builds no Python object.
"""
from libc.string cimport memcpy, memcmp, memmove, memchr
from libc.stdlib cimport malloc, calloc, realloc, free
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE

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

FENCE_BIT = 0x80000000
MAX_METADUMP_LINE = 8192

_STORAGE_OPS = frozenset((0x01, 0x02, 0x03, 0x11, 0x12, 0x13))
_HEX = frozenset(b"0123456789abcdefABCDEF")


# ---------------------------------------------------------------------------------------
# Byte helpers (no Python objects)

cdef int cbuf_get(object obj, CBuf *b) except -1:
    if type(obj) is bytes:
        b.p = PyBytes_AS_STRING(obj)
        b.n = PyBytes_GET_SIZE(obj)
        b.has_view = False
        return 0
    PyObject_GetBuffer(obj, &b.view, PyBUF_SIMPLE)
    b.p = <const char *>b.view.buf
    b.n = b.view.len
    b.has_view = True
    return 0


cdef int inbuf_take(Buf *b, object data) except -1:
    """Append a chunk (any buffer-protocol object) to an input buffer."""
    cdef CBuf c
    cdef int r
    cbuf_get(data, &c)
    try:
        r = inbuf_feed(b, c.p, <size_t>c.n)
    finally:
        cbuf_release(&c)
    if r < 0:
        raise MemoryError()
    return 0


# ---------------------------------------------------------------------------------------
# Hashing

def vbucket_hash(key):
    """libmemcached's MD5 hash: the first 4 bytes of md5(key), little-endian."""
    cdef CBuf b
    cdef uint32_t h
    cbuf_get(key, &b)
    try:
        with nogil:
            h = astaire_md5_first32(<const unsigned char *>b.p, <size_t>b.n)
    finally:
        cbuf_release(&b)
    return h


def _check_vbuckets(vbuckets):
    vbuckets = int(vbuckets)
    if vbuckets < 1 or vbuckets > 65536 or vbuckets & (vbuckets - 1):
        raise ValueError(f"vbuckets must be a power of 2 between 1 and 65536, not {vbuckets}")
    return vbuckets


def vbucket_of(key, vbuckets=128):
    cdef uint32_t mask = <uint32_t>_check_vbuckets(vbuckets) - 1
    return vbucket_hash(key) & mask


def _wanted_table(wanted, vbuckets):
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

cdef class Frame:
    """One binary-protocol frame. ``vbucket`` (request) and ``status`` (response) name
    the same 16-bit header field."""


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
    def vbucket(self):
        return self._vbucket_or_status

    @property
    def status(self):
        return self._vbucket_or_status

    def __repr__(self):
        return (f"Frame(magic=0x{self.magic:02x}, opcode=0x{self.opcode:02x}, "
                f"vbucket_or_status={self._vbucket_or_status}, opaque={self.opaque}, cas={self.cas}, "
                f"extras={self.extras!r}, key={self.key!r}, value={self.value!r}, "
                f"size={self.size}, offset={self.offset})")


cdef class TapMutation:
    """A decoded TAP_MUTATION: the item and its TAP metadata."""


    def __init__(self, key, value, flags, expiration, cas, ttl, tap_flags, engine_specific):
        self.key = key
        self.value = value
        self.flags = flags
        self.expiration = expiration
        self.cas = cas
        self.ttl = ttl
        self.tap_flags = tap_flags
        self.engine_specific = engine_specific

    def _astuple(self):
        return (self.key, self.value, self.flags, self.expiration, self.cas, self.ttl,
                self.tap_flags, self.engine_specific)

    def __eq__(self, other):
        if not isinstance(other, TapMutation):
            return NotImplemented
        return self._astuple() == (<TapMutation>other)._astuple()

    def __ne__(self, other):
        if not isinstance(other, TapMutation):
            return NotImplemented
        return self._astuple() != (<TapMutation>other)._astuple()

    __hash__ = None

    def __repr__(self):
        return (f"TapMutation(key={self.key!r}, value={self.value!r}, flags=0x{self.flags:08x}, "
                f"expiration={self.expiration}, cas={self.cas}, ttl={self.ttl}, "
                f"tap_flags=0x{self.tap_flags:04x}, engine_specific={self.engine_specific!r})")


cdef int scan_batch(const uint8_t *p, size_t n, size_t *pos, uint64_t max_body, TapBatch *tb) noexcept nogil:
    """Collect up to LANES TAP_MUTATIONs from p[pos:n], counting the other TAP frames passed
    over, and hash their keys. Returns 1 when the batch is full (call again), 0 when the
    whole frames ran out, or an error code with pos on the offending frame."""
    cdef TapInfo t
    cdef int r = R_INCOMPLETE
    cdef int i, short_keys = 0
    cdef const unsigned char *keys[LANES]
    cdef size_t lens[LANES]
    tb.n = 0
    tb.other = 0
    while pos[0] < n:
        r = tap_frame(p + pos[0], n - pos[0], max_body, &t)
        if r <= 0:
            break
        if r == R_MUTATION:
            tb.info[tb.n] = t
            tb.start[tb.n] = pos[0]
            tb.n += 1
        else:
            tb.other += 1
        pos[0] += t.size
        if tb.n == LANES:
            break
    for i in range(LANES):
        if i < tb.n and tb.info[i].keylen <= ASTAIRE_MD5_MAX_SHORT:
            keys[i] = p + tb.start[i] + tb.info[i].keyoff
            lens[i] = tb.info[i].keylen
            short_keys += 1
        else:
            keys[i] = p
            lens[i] = 0
    if short_keys >= MIN_LANES_FOR_BATCH:
        astaire_md5_first32_lanes(keys, lens, tb.hash)
    for i in range(tb.n):
        if short_keys < MIN_LANES_FOR_BATCH or tb.info[i].keylen > ASTAIRE_MD5_MAX_SHORT:
            tb.hash[i] = astaire_md5_first32(p + tb.start[i] + tb.info[i].keyoff, tb.info[i].keylen)
    if r < 0:
        return r
    return 1 if tb.n == LANES else 0


cdef int raise_frame_error(int code, const uint8_t *p, uint64_t offset, uint64_t max_body) except -1:
    """Raise the exception for scanner result ``code`` about the frame at ``p``."""
    cdef uint32_t body
    if code == E_NOMEM:
        raise MemoryError()
    if code == E_BAD_MAGIC:
        raise BadMagic(f"bad magic 0x{p[0]:02x}", offset)
    body = be32(p + 8)
    if code == E_TOO_LARGE:
        raise FrameTooLarge(f"frame body of {body} bytes exceeds the limit of {max_body}", offset)
    if code == E_BAD_LENGTHS:
        raise BadLengths(f"extras ({p[4]}) + key ({be16(p + 2)}) longer than the body ({body})", offset)
    if code == E_TAP_NOT_SUPPORTED:
        raise TapNotSupported(f"server answered TAP_CONNECT with status 0x{be16(p + 6):04x}: no TAP", offset)
    if code == E_UNEXPECTED:
        kind = "request" if p[0] == C_MAGIC_REQ else "response"
        raise UnexpectedFrame(f"unexpected {kind} opcode 0x{p[1]:02x} on a TAP stream", offset)
    if code == E_MALFORMED:
        raise MalformedFrame(f"TAP_MUTATION extras length {p[4]}, expected 16", offset)
    if code == E_TAP_BAD_LENGTHS:
        raise BadLengths(
            f"TAP_MUTATION extras (16) + engine ({be16(p + 24)}) + key ({be16(p + 2)}) longer than the body ({body})",
            offset)
    raise ProtocolError(f"scanner result {code}", offset)


cdef Frame make_frame(const uint8_t *p, size_t size, uint64_t offset):
    cdef Frame f = Frame.__new__(Frame)
    cdef size_t extlen = p[4]
    cdef size_t keylen = be16(p + 2)
    cdef const char *b = <const char *>p + C_HEADER
    f.magic = p[0]
    f.opcode = p[1]
    f.datatype = p[5]
    f._vbucket_or_status = be16(p + 6)
    f.opaque = be32(p + 12)
    f.cas = be64(p + 16)
    f.extras = PyBytes_FromStringAndSize(b, extlen)
    f.key = PyBytes_FromStringAndSize(b + extlen, keylen)
    f.value = PyBytes_FromStringAndSize(b + extlen + keylen, size - C_HEADER - extlen - keylen)
    f.size = size
    f.offset = offset
    return f


cdef uint64_t max_body_arg(object max_body) except? 0:
    if max_body < 0:
        raise ValueError("max_body must be >= 0")
    if max_body > 0xFFFFFFFF:
        return 0xFFFFFFFF
    return max_body


cdef class FrameParser:
    """Streaming frame parser: ``feed`` chunks of any size, iterate complete frames.

    One growable buffer with head/tail offsets, compacted when the consumed part
    dominates (msgpack's Unpacker style). Headers are validated as soon as they are
    complete, so a hostile length is refused before anything is allocated for it.
    """


    def __init__(self, max_body=DEFAULT_MAX_BODY):
        self._max_body = max_body_arg(max_body)
        self.max_body = int(max_body)

    def __dealloc__(self):
        buf_free(&self._buf)

    @property
    def buffered(self):
        return self._buf.len - self._buf.head

    @property
    def offset(self):
        return self._offset

    def feed(self, data):
        inbuf_take(&self._buf, data)

    cdef Frame _next(self):
        cdef Buf *b = &self._buf
        cdef size_t size = 0
        cdef const uint8_t *p
        cdef int r
        cdef Frame f
        if b.head >= b.len:
            return None
        p = <const uint8_t *>b.data + b.head
        r = check_header(p, b.len - b.head, self._max_body, &size)
        if r == R_INCOMPLETE:
            return None
        if r < 0:
            raise_frame_error(r, p, self._offset, self._max_body)
        f = make_frame(p, size, self._offset)
        b.head += size
        self._offset += size
        return f

    def __iter__(self):
        return self

    def __next__(self):
        cdef Frame f = self._next()
        if f is None:
            raise StopIteration
        return f

    def frames(self):
        """All complete frames buffered now."""
        cdef list out = []
        cdef Frame f
        while True:
            f = self._next()
            if f is None:
                return out
            out.append(f)


def decode_tap_mutation(frame):
    """Decode a TAP_MUTATION frame in the Clearwater fork's layout (docs/compatibility.md, "Binary protocol and TAP")."""
    if frame.magic != MAGIC_REQUEST or frame.opcode != OP_TAP_MUTATION:
        raise UnexpectedFrame(
            f"not a TAP_MUTATION (magic 0x{frame.magic:02x}, opcode 0x{frame.opcode:02x})", frame.offset)
    extras = bytes(frame.extras)
    keylen = len(frame.key)
    if len(extras) != 16:
        raise MalformedFrame(f"TAP_MUTATION extras length {len(extras)}, expected 16", frame.offset)
    cdef const uint8_t *e = <const uint8_t *>PyBytes_AS_STRING(extras)
    cdef Py_ssize_t engine_len = be16(e)
    rest = bytes(frame.key) + bytes(frame.value)
    body = 16 + len(rest)
    if 16 + engine_len + keylen > body:
        raise BadLengths(
            f"TAP_MUTATION extras (16) + engine ({engine_len}) + key ({keylen}) longer than the body ({body})",
            frame.offset)
    return TapMutation(rest[engine_len:engine_len + keylen], rest[engine_len + keylen:], be32(e + 8),
                       be32(e + 12), frame.cas, e[4], be16(e + 2), rest[:engine_len])


cdef TapMutation make_mutation(const uint8_t *p, TapInfo *t):
    cdef TapMutation m = TapMutation.__new__(TapMutation)
    cdef const char *k = <const char *>p + t.keyoff
    cdef uint32_t eng = be16(p + 24)
    m.key = PyBytes_FromStringAndSize(k, t.keylen)
    m.value = PyBytes_FromStringAndSize(k + t.keylen, t.vallen)
    m.flags = t.flags
    m.expiration = t.exp
    m.cas = be64(p + 16)
    m.ttl = p[28]
    m.tap_flags = be16(p + 26)
    m.engine_specific = PyBytes_FromStringAndSize(k - eng, eng)
    return m


# Up to this many kept frames are found without the GIL before their objects are built.
cdef enum:
    BATCH_KEPT = 512


def filter_mutations(data, wanted, vbuckets=128, max_body=DEFAULT_MAX_BODY):
    """Parse a buffer of TAP frames, keep the TAP_MUTATIONs of wanted vbuckets.

    Returns (records, consumed): consumed = bytes of whole frames. Other TAP opcodes are
    skipped; frames with no place on a TAP stream raise as ``Writer.feed_tap`` does.
    Filtered-out frames cost no Python object."""
    table = _wanted_table(wanted, vbuckets)
    cdef const uint8_t *tab = <const uint8_t *><char *>table
    cdef uint32_t mask = <uint32_t>len(table) - 1
    cdef uint64_t mb = max_body_arg(max_body)
    cdef CBuf b
    cdef const uint8_t *p
    cdef size_t n, pos = 0
    cdef TapBatch tb
    cdef TapInfo kept_info[BATCH_KEPT]
    cdef size_t kept_pos[BATCH_KEPT]
    cdef int nkept, i
    cdef int r = 1
    cdef list records = []
    cbuf_get(data, &b)
    try:
        p = <const uint8_t *>b.p
        n = <size_t>b.n
        while True:
            nkept = 0
            with nogil:
                while nkept + LANES <= BATCH_KEPT:
                    r = scan_batch(p, n, &pos, mb, &tb)
                    for i in range(tb.n):
                        if tab[tb.hash[i] & mask]:
                            kept_info[nkept] = tb.info[i]
                            kept_pos[nkept] = tb.start[i]
                            nkept += 1
                    if r != 1:
                        break
            for i in range(nkept):
                records.append(make_mutation(p + kept_pos[i], &kept_info[i]))
            if r < 0:
                raise_frame_error(r, p + pos, pos, mb)
            if r != 1:
                break
    finally:
        cbuf_release(&b)
    return records, pos


def filter_count(data, wanted, vbuckets=128, max_body=DEFAULT_MAX_BODY):
    """Like filter_mutations but only counts: (kept, seen, consumed). No allocation per frame."""
    table = _wanted_table(wanted, vbuckets)
    cdef const uint8_t *tab = <const uint8_t *><char *>table
    cdef uint32_t mask = <uint32_t>len(table) - 1
    cdef uint64_t mb = max_body_arg(max_body)
    cdef CBuf b
    cdef const uint8_t *p
    cdef size_t n, pos = 0
    cdef TapBatch tb
    cdef int r, i
    cdef uint64_t kept = 0, seen = 0
    cbuf_get(data, &b)
    try:
        p = <const uint8_t *>b.p
        n = <size_t>b.n
        with nogil:
            while True:
                r = scan_batch(p, n, &pos, mb, &tb)
                seen += tb.n
                for i in range(tb.n):
                    kept += tab[tb.hash[i] & mask]
                if r != 1:
                    break
        if r < 0:
            raise_frame_error(r, p + pos, pos, mb)
    finally:
        cbuf_release(&b)
    return kept, seen, pos


# ---------------------------------------------------------------------------------------
# Encoders

cdef bytes _encode(uint8_t magic, uint8_t opcode, CBuf *key, CBuf *value, const char *extras, size_t extlen,
                   uint16_t vbucket, uint32_t opaque, uint64_t cas, const char *engine=NULL, size_t englen=0):
    cdef size_t body = extlen + englen + <size_t>key.n + <size_t>value.n
    cdef bytes out
    cdef uint8_t *p
    if key.n > 0xFFFF:
        raise ValueError(f"key of {key.n} bytes is longer than 65535")
    if extlen > 0xFF:
        raise ValueError(f"extras of {extlen} bytes is longer than 255")
    if body > 0xFFFFFFFFu:
        raise ValueError(f"body of {body} bytes is longer than 4 GiB")
    out = PyBytes_FromStringAndSize(NULL, C_HEADER + body)
    p = <uint8_t *>PyBytes_AS_STRING(out)
    put_header(p, magic, opcode, <uint16_t>key.n, <uint8_t>extlen, vbucket, <uint32_t>body, opaque, cas)
    p += C_HEADER
    if extlen:
        memcpy(p, extras, extlen)
        p += extlen
    if englen:
        memcpy(p, engine, englen)
        p += englen
    if key.n:
        memcpy(p, key.p, key.n)
        p += key.n
    if value.n:
        memcpy(p, value.p, value.n)
    return out


cdef bytes _request(uint8_t opcode, object key, object value, const char *extras, size_t extlen,
                    uint32_t opaque, uint64_t cas, uint16_t vbucket):
    cdef CBuf k, v
    k.has_view = False
    v.has_view = False
    cbuf_get(key, &k)
    try:
        cbuf_get(value, &v)
        return _encode(C_MAGIC_REQ, opcode, &k, &v, extras, extlen, vbucket, opaque, cas)
    finally:
        cbuf_release(&v)
        cbuf_release(&k)


def encode_request(uint8_t opcode, key=b"", value=b"", extras=b"", uint32_t opaque=0, uint64_t cas=0,
                   uint16_t vbucket=0):
    cdef CBuf e
    cbuf_get(extras, &e)
    try:
        if e.n > 0xFF:
            raise ValueError(f"extras of {e.n} bytes is longer than 255")
        return _request(opcode, key, value, e.p, <size_t>e.n, opaque, cas, vbucket)
    finally:
        cbuf_release(&e)


def encode_tap_connect(uint32_t flags=TAP_FLAG_DUMP, vbuckets=None, name=b""):
    cdef uint8_t ext[4]
    cdef bytearray value = bytearray()
    cdef list ids
    if vbuckets is not None:
        ids = [int(v) for v in vbuckets]
        if len(ids) > 0xFFFF:
            raise ValueError("too many vbuckets in TAP_CONNECT")
        for v in ids:
            if v < 0 or v > 0xFFFF:
                raise OverflowError(f"vbucket {v} does not fit in 16 bits")
        flags |= TAP_FLAG_LIST_VBUCKETS
        value += len(ids).to_bytes(2, "big")
        for v in ids:
            value += (<int>v).to_bytes(2, "big")
    put32(ext, flags)
    return _request(C_OP_TAP_CONNECT, name, bytes(value), <const char *>ext, 4, 0, 0, 0)


def encode_get(key, uint32_t opaque=0):
    return _request(0x00, key, b"", NULL, 0, opaque, 0, 0)


def encode_getk(key, uint32_t opaque=0):
    return _request(C_OP_GETK, key, b"", NULL, 0, opaque, 0, 0)


def encode_getkq(key, uint32_t opaque=0):
    return _request(C_OP_GETKQ, key, b"", NULL, 0, opaque, 0, 0)


cdef inline bytes _store(uint8_t opcode, key, value, uint32_t flags, uint32_t expiration, uint32_t opaque,
                         uint64_t cas):
    cdef uint8_t ext[8]
    put32(ext, flags)
    put32(ext + 4, expiration)
    return _request(opcode, key, value, <const char *>ext, 8, opaque, cas, 0)


def encode_add(key, value, uint32_t flags=0, uint32_t expiration=0, uint32_t opaque=0, uint64_t cas=0):
    return _store(C_OP_ADD, key, value, flags, expiration, opaque, cas)


def encode_addq(key, value, uint32_t flags=0, uint32_t expiration=0, uint32_t opaque=0, uint64_t cas=0):
    return _store(C_OP_ADDQ, key, value, flags, expiration, opaque, cas)


def encode_set(key, value, uint32_t flags=0, uint32_t expiration=0, uint32_t opaque=0, uint64_t cas=0):
    return _store(C_OP_SET, key, value, flags, expiration, opaque, cas)


def encode_delete(key, uint32_t opaque=0, uint64_t cas=0):
    return _request(0x04, key, b"", NULL, 0, opaque, cas, 0)


def encode_noop(uint32_t opaque=0):
    return _request(C_OP_NOOP, b"", b"", NULL, 0, opaque, 0, 0)


def encode_version(uint32_t opaque=0):
    return _request(0x0B, b"", b"", NULL, 0, opaque, 0, 0)


def encode_tap_mutation(key, value, uint32_t flags=0, uint32_t expiration=0, uint64_t cas=0, uint8_t ttl=0xFF,
                        uint16_t tap_flags=0, engine_specific=b"", uint32_t opaque=0):
    """A TAP_MUTATION in the Clearwater fork's layout (used by the test TAP server)."""
    cdef uint8_t ext[16]
    cdef CBuf k, v, e
    k.has_view = v.has_view = e.has_view = False
    cbuf_get(engine_specific, &e)
    try:
        if e.n > 0xFFFF:
            raise ValueError("engine_specific longer than 65535 bytes")
        put16(ext, <uint16_t>e.n)
        put16(ext + 2, tap_flags)
        ext[4] = ttl
        ext[5] = ext[6] = ext[7] = 0
        put32(ext + 8, flags)
        put32(ext + 12, expiration)
        cbuf_get(key, &k)
        cbuf_get(value, &v)
        return _encode(C_MAGIC_REQ, C_OP_TAP_MUTATION, &k, &v, <const char *>ext, 16, 0, opaque, cas,
                       e.p, <size_t>e.n)
    finally:
        cbuf_release(&v)
        cbuf_release(&k)
        cbuf_release(&e)


cdef inline bint _is_storage_op(int opcode) noexcept:
    return opcode == 0x01 or opcode == 0x02 or opcode == 0x03 or opcode == 0x11 or opcode == 0x12 or opcode == 0x13


cdef struct BatchItem:
    uint8_t opcode
    uint8_t extlen
    uint32_t flags
    uint32_t exp
    uint32_t opaque
    uint64_t cas


cdef int _batch_item(object item, BatchItem *it) except -1:
    """Convert one (opcode, key, value, flags, expiration, opaque, cas) tuple's numbers, in
    the order (and with the errors) of the pure build."""
    opcode, key, value, flags, expiration, opaque, cas = item
    cdef int iop = opcode
    if _is_storage_op(iop):
        it.flags = flags
        it.exp = expiration
        it.extlen = 8
    else:
        it.flags = it.exp = 0
        it.extlen = 0
    it.opcode = opcode
    it.opaque = opaque
    it.cas = cas
    return 0


cdef Py_ssize_t _blen(object obj) except -1:
    if type(obj) is bytes:
        return PyBytes_GET_SIZE(obj)
    cdef CBuf b
    cbuf_get(obj, &b)
    cbuf_release(&b)
    return b.n


def encode_batch(requests):
    """Encode (opcode, key, value, flags, expiration, opaque, cas) tuples into one buffer.
    Storage opcodes get flags + expiration extras; the others ignore them."""
    cdef object items = requests if type(requests) is list or type(requests) is tuple else list(requests)
    cdef BatchItem it
    cdef CBuf k, v
    cdef Py_ssize_t klen, vlen
    cdef size_t body, total = 0
    cdef bytes out
    cdef uint8_t *p
    # Pass 1 validates and sizes; pass 2 writes straight into the result (one buffer, no
    # regrowth, no final copy: for big batches the memory traffic is the cost).
    for item in items:
        _batch_item(item, &it)
        klen = _blen(item[1])
        vlen = _blen(item[2])
        if klen > 0xFFFF:
            raise ValueError(f"key of {klen} bytes is longer than 65535")
        body = it.extlen + <size_t>klen + <size_t>vlen
        if body > 0xFFFFFFFFu:
            raise ValueError(f"body of {body} bytes is longer than 4 GiB")
        total += C_HEADER + body
    out = PyBytes_FromStringAndSize(NULL, total)
    p = <uint8_t *>PyBytes_AS_STRING(out)
    k.has_view = v.has_view = False
    for item in items:
        _batch_item(item, &it)
        cbuf_get(item[1], &k)
        try:
            cbuf_get(item[2], &v)
            body = it.extlen + <size_t>k.n + <size_t>v.n
            if C_HEADER + body > total:  # a buffer changed size between the passes
                raise RuntimeError("encode_batch: requests changed while being encoded")
            total -= C_HEADER + body
            put_header(p, C_MAGIC_REQ, it.opcode, <uint16_t>k.n, it.extlen, 0, <uint32_t>body, it.opaque, it.cas)
            p += C_HEADER
            if it.extlen:
                put32(p, it.flags)
                put32(p + 4, it.exp)
                p += 8
            memcpy(p, k.p, k.n)
            memcpy(p + k.n, v.p, v.n)
            p += k.n + v.n
        finally:
            cbuf_release(&v)
            cbuf_release(&k)
    return out


__all__ = [
    "MAGIC_REQUEST", "MAGIC_RESPONSE",
    "OP_GET", "OP_SET", "OP_ADD", "OP_REPLACE", "OP_DELETE", "OP_QUIT", "OP_GETQ", "OP_NOOP",
    "OP_VERSION", "OP_GETK", "OP_GETKQ", "OP_SETQ", "OP_ADDQ", "OP_REPLACEQ",
    "OP_TAP_CONNECT", "OP_TAP_MUTATION", "OP_TAP_DELETE", "OP_TAP_FLUSH", "OP_TAP_OPAQUE",
    "OP_TAP_VBUCKET_SET", "OP_TAP_CHECKPOINT_START", "OP_TAP_CHECKPOINT_END",
    "STATUS_SUCCESS", "STATUS_KEY_ENOENT", "STATUS_KEY_EEXISTS", "STATUS_E2BIG", "STATUS_EINVAL",
    "STATUS_NOT_STORED", "STATUS_NOT_MY_VBUCKET", "STATUS_UNKNOWN_COMMAND", "STATUS_ENOMEM",
    "TAP_FLAG_DUMP", "TAP_FLAG_LIST_VBUCKETS", "HEADER_SIZE", "DEFAULT_MAX_BODY", "OWN_PREFIX", "MAX_METADUMP_LINE",
    "ProtocolError", "BadMagic", "BadLengths", "FrameTooLarge", "TapNotSupported",
    "UnexpectedFrame", "MalformedFrame", "CrawlerBusy", "CrawlerError",
    "Frame", "TapMutation", "FrameParser",
    "vbucket_hash", "vbucket_of", "decode_tap_mutation", "filter_mutations", "filter_count",
    "encode_request", "encode_tap_connect", "encode_get", "encode_getk", "encode_getkq",
    "encode_add", "encode_addq", "encode_set",
    "encode_delete", "encode_noop", "encode_version", "encode_tap_mutation", "encode_batch",
]
