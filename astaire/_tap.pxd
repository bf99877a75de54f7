# Shared declarations of the compiled codec (asyncpg style): ``_tap.pyx`` (frame parser,
# TAP scanner, encoders) implements the non-inline functions and the classes declared here;
# ``_writer.pyx`` (the Writer's state machine) cimports them. Inline helpers live here so
# that both units compile them in place.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t
from libc.string cimport memcpy, memmove
from libc.stdlib cimport realloc, free
from cpython.buffer cimport PyBuffer_Release

cdef extern from "_md5.h" nogil:
    uint32_t astaire_md5_first32(const unsigned char *data, size_t n)
    void astaire_md5_first32_lanes(const unsigned char *const *p, const size_t *n, uint32_t *out)
    enum: ASTAIRE_MD5_MAX_SHORT
    enum: ASTAIRE_MD5_LANES

cdef extern from *:
    """
    /* "astaire" followed by two backslashes: Astaire's own records, never copied. */
    static const char astaire_own_prefix[9] = {97, 115, 116, 97, 105, 114, 101, 92, 92};
    static const char astaire_key_eq[4] = {107, 101, 121, 61};  /* "key=" */
    static const char astaire_exp_eq[4] = {101, 120, 112, 61};  /* "exp=" */
    """
    const char astaire_own_prefix[9]
    const char astaire_key_eq[4]
    const char astaire_exp_eq[4]

# C-level mirrors of the constants above.
cdef enum:
    C_HEADER = 24
    C_MAGIC_REQ = 0x80
    C_MAGIC_RES = 0x81
    C_OP_SET = 0x01
    C_OP_ADD = 0x02
    C_OP_NOOP = 0x0A
    C_OP_GETK = 0x0C
    C_OP_GETKQ = 0x0D
    C_OP_ADDQ = 0x12
    C_OP_TAP_CONNECT = 0x40
    C_OP_TAP_MUTATION = 0x41
    C_OP_TAP_FIRST_OTHER = 0x42
    C_OP_TAP_LAST_OTHER = 0x47
    C_ST_SUCCESS = 0x00
    C_ST_ENOENT = 0x01
    C_ST_EEXISTS = 0x02
    C_ST_NOT_STORED = 0x05
    C_OWN_LEN = 9
    C_MAX_LINE = 8192
    C_MAX_KEY = 250

# Characters, as the C code compares them.
cdef enum:
    CH_NL = 10
    CH_CR = 13
    CH_SP = 32
    CH_PCT = 37
    CH_MINUS = 45
    CH_0 = 48
    CH_9 = 57
    CH_A = 65
    CH_F = 70
    CH_a = 97
    CH_f = 102

# Results of the frame scanners: >= 0 what was found, < 0 what is wrong.
cdef enum:
    R_INCOMPLETE = 0
    R_FRAME = 1
    R_MUTATION = 2
    R_OTHER_TAP = 3
    E_BAD_MAGIC = -1
    E_TOO_LARGE = -2
    E_BAD_LENGTHS = -3
    E_TAP_NOT_SUPPORTED = -4
    E_UNEXPECTED = -5
    E_MALFORMED = -6
    E_TAP_BAD_LENGTHS = -7
    E_NOMEM = -100

# Byte helpers (no Python objects)

cdef inline uint16_t be16(const uint8_t *p) noexcept nogil:
    return <uint16_t>((<uint16_t>p[0] << 8) | p[1])


cdef inline uint32_t be32(const uint8_t *p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | <uint32_t>p[3]


cdef inline uint64_t be64(const uint8_t *p) noexcept nogil:
    return (<uint64_t>be32(p) << 32) | be32(p + 4)


cdef inline void put16(uint8_t *p, uint16_t v) noexcept nogil:
    p[0] = <uint8_t>(v >> 8)
    p[1] = <uint8_t>v


cdef inline void put32(uint8_t *p, uint32_t v) noexcept nogil:
    p[0] = <uint8_t>(v >> 24)
    p[1] = <uint8_t>(v >> 16)
    p[2] = <uint8_t>(v >> 8)
    p[3] = <uint8_t>v


cdef inline void put64(uint8_t *p, uint64_t v) noexcept nogil:
    put32(p, <uint32_t>(v >> 32))
    put32(p + 4, <uint32_t>v)


cdef inline void put_header(uint8_t *p, uint8_t magic, uint8_t opcode, uint16_t keylen, uint8_t extlen,
                            uint16_t vbucket, uint32_t body, uint32_t opaque, uint64_t cas) noexcept nogil:
    p[0] = magic
    p[1] = opcode
    put16(p + 2, keylen)
    p[4] = extlen
    p[5] = 0
    put16(p + 6, vbucket)
    put32(p + 8, body)
    put32(p + 12, opaque)
    put64(p + 16, cas)


# A growable byte buffer with a head offset (consumed part) that compacts instead of
# copying per frame.
cdef struct Buf:
    char *data
    size_t head
    size_t len
    size_t cap


cdef inline int buf_reserve(Buf *b, size_t extra) noexcept nogil:
    cdef size_t need = b.len + extra
    cdef size_t cap
    cdef char *p
    if need <= b.cap:
        return 0
    if b.head:
        memmove(b.data, b.data + b.head, b.len - b.head)
        b.len -= b.head
        b.head = 0
        need = b.len + extra
        if need <= b.cap:
            return 0
    cap = b.cap * 2 if b.cap else 4096
    while cap < need:
        cap *= 2
    p = <char *>realloc(b.data, cap)
    if p == NULL:
        return -1
    b.data = p
    b.cap = cap
    return 0


# An empty buffer bigger than this is given back rather than kept for the next burst.
cdef enum:
    KEEP_EMPTY_BUF = 1 << 24


cdef inline int inbuf_feed(Buf *b, const char *data, size_t n) noexcept nogil:
    if b.head == b.len and b.cap > KEEP_EMPTY_BUF and n < b.cap // 4:
        buf_free(b)
    if b.head:
        if b.head == b.len:
            b.head = 0
            b.len = 0
        elif b.head >= 65536 or b.head * 2 >= b.len:
            memmove(b.data, b.data + b.head, b.len - b.head)
            b.len -= b.head
            b.head = 0
    if n == 0:
        return 0
    if buf_reserve(b, n) < 0:
        return -1
    memcpy(b.data + b.len, data, n)
    b.len += n
    return 0


cdef inline void buf_free(Buf *b) noexcept nogil:
    free(b.data)
    b.data = NULL
    b.head = b.len = b.cap = 0


# Borrow a contiguous byte buffer from any buffer-protocol object (bytes fast path).
cdef struct CBuf:
    const char *p
    Py_ssize_t n
    bint has_view
    Py_buffer view


cdef int cbuf_get(object obj, CBuf *b) except -1


cdef inline void cbuf_release(CBuf *b) noexcept:
    if b.has_view:
        PyBuffer_Release(&b.view)
        b.has_view = False


cdef int inbuf_take(Buf *b, object data) except -1


cdef struct TapInfo:
    size_t size       # whole frame
    uint32_t keyoff   # from the frame's first byte
    uint32_t keylen
    uint32_t vallen
    uint32_t flags
    uint32_t exp


cdef inline int check_header(const uint8_t *p, size_t avail, uint64_t max_body, size_t *size) noexcept nogil:
    """R_FRAME (size set), R_INCOMPLETE or an E_ code. Magic is judged from the first byte
    so that a text answer is not waited on for 24 bytes."""
    cdef uint32_t body
    if p[0] != C_MAGIC_REQ and p[0] != C_MAGIC_RES:
        return E_BAD_MAGIC
    if avail < C_HEADER:
        return R_INCOMPLETE
    body = be32(p + 8)
    if body > max_body:
        return E_TOO_LARGE
    if <uint32_t>p[4] + <uint32_t>be16(p + 2) > body:
        return E_BAD_LENGTHS
    size[0] = C_HEADER + <size_t>body
    if avail < size[0]:
        return R_INCOMPLETE
    return R_FRAME


cdef inline int tap_frame(const uint8_t *p, size_t avail, uint64_t max_body, TapInfo *t) noexcept nogil:
    """A TAP-stream frame: R_MUTATION (t filled), R_OTHER_TAP, R_INCOMPLETE or an E_ code."""
    cdef int r = check_header(p, avail, max_body, &t.size)
    cdef uint8_t op
    cdef uint32_t eng, klen, body
    if r != R_FRAME:
        return r
    op = p[1]
    if p[0] == C_MAGIC_REQ:
        if op == C_OP_TAP_MUTATION:
            if p[4] != 16:
                return E_MALFORMED
            eng = be16(p + 24)
            klen = be16(p + 2)
            body = <uint32_t>(t.size - C_HEADER)
            if 16 + eng + klen > body:
                return E_TAP_BAD_LENGTHS
            t.keyoff = C_HEADER + 16 + eng
            t.keylen = klen
            t.vallen = body - 16 - eng - klen
            t.flags = be32(p + 32)
            t.exp = be32(p + 36)
            return R_MUTATION
        if op >= C_OP_TAP_FIRST_OTHER and op <= C_OP_TAP_LAST_OTHER:
            return R_OTHER_TAP
        return E_UNEXPECTED
    if op == C_OP_TAP_CONNECT:
        return E_TAP_NOT_SUPPORTED
    return E_UNEXPECTED


# TAP_MUTATIONs (and listed keys) are taken LANES at a time so that their keys are hashed
# side by side by astaire_md5_first32_lanes (the number is _md5.h's).
cdef enum:
    LANES = ASTAIRE_MD5_LANES
    MIN_LANES_FOR_BATCH = 4  # below this many short keys, one at a time is cheaper


cdef struct TapBatch:
    int n                   # mutations collected
    uint64_t other          # other TAP frames passed over
    size_t start[LANES]     # offsets of the mutations' first bytes
    TapInfo info[LANES]
    uint32_t hash[LANES]    # vbucket_hash of each key


cdef int scan_batch(const uint8_t *p, size_t n, size_t *pos, uint64_t max_body, TapBatch *tb) noexcept nogil
cdef int raise_frame_error(int code, const uint8_t *p, uint64_t offset, uint64_t max_body) except -1
cdef uint64_t max_body_arg(object max_body) except? 0


cdef class Frame:
    cdef readonly int magic
    cdef readonly int opcode
    cdef readonly int datatype
    cdef int _vbucket_or_status
    cdef readonly uint32_t opaque
    cdef readonly uint64_t cas
    cdef readonly object extras
    cdef readonly object key
    cdef readonly object value
    cdef readonly Py_ssize_t size
    cdef readonly uint64_t offset


cdef class TapMutation:
    cdef readonly object key
    cdef readonly object value
    cdef readonly uint32_t flags
    cdef readonly uint32_t expiration
    cdef readonly uint64_t cas
    cdef readonly int ttl
    cdef readonly int tap_flags
    cdef readonly object engine_specific


cdef class FrameParser:
    cdef Buf _buf
    cdef uint64_t _offset
    cdef uint64_t _max_body
    cdef readonly object max_body

    cdef Frame _next(self)
