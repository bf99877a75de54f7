# cython: language_level=3
"""The Writer: the per-record resync state machine, compiled (twin of ``_tap_py.Writer``).

Frames come in through the scanners of ``astaire._tap`` (declared in ``_tap.pxd``); here
live the slots (one per record in flight, its index the opaque), the quiet-ADD fences,
the conflict rule, and the crawler's metadump parser and fetch queues. Per-record work runs
in C without the GIL and builds no Python object.
"""
cimport cython
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t
from libc.string cimport memcpy, memcmp, memmove, memchr
from libc.stdlib cimport malloc, calloc, realloc, free
from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_WRITABLE

from astaire._tap cimport *

from astaire._tap import DEFAULT_MAX_BODY, _wanted_table
from astaire.protocol_errors import CrawlerBusy, CrawlerError, FrameTooLarge, MalformedFrame, UnexpectedFrame

cdef extern from *:
    """
    #ifndef ASTAIRE_BUILD
    #define ASTAIRE_BUILD "plain"
    #endif
    """
    const char *ASTAIRE_BUILD

# How setup.py compiled the codec: "profile-guided" (gcc, trained by bench/pgo_train.py) or
# "plain" (-O3 alone). A string, not a number, so that both builds have the same control flow.
BUILD = ASTAIRE_BUILD.decode()

cdef extern from "<time.h>" nogil:
    ctypedef long time_t
    time_t time(time_t *t)

cdef extern from *:
    """
    static const char astaire_b64[65] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    """
    const char *B64 "astaire_b64"

cdef extern from "_mdline.h" nogil:
    const char *md_key "astaire_md_key"(const char *p, const char *lend, char *dst, size_t cap,
                                        size_t *dlen_out, int *bad)
    const char *md_digits "astaire_md_digits"(const char *p, const char *lend, uint64_t *val_out)
    bint text_key "astaire_text_key"(const char *k, size_t n)

cdef extern from *:
    """
    /* The settled table's key hash (astaire.resync.settled): 64-bit words of the key,
       little-endian, the last one zero-padded, each mixed in by multiply and shift. */
    static inline uint64_t astaire_le64(const unsigned char *p) {
        uint64_t w;
        memcpy(&w, p, 8);
    #if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        w = __builtin_bswap64(w);  /* the bytes read as little-endian, as on x86 */
    #endif
        return w;
    }
    /* 1 to 7 bytes as a little-endian word, zero-padded, from loads that stay inside them
       (astaire_md5_le32 is _md5.h's, included above)
       and overlap (the same byte lands in the same place twice): no byte-wise copy through
       memory, whose wide re-read stalls on store forwarding. */
    static inline uint64_t astaire_le_tail(const unsigned char *p, size_t k) {
        if (k >= 4)
            return (uint64_t)astaire_md5_le32(p) | ((uint64_t)astaire_md5_le32(p + k - 4) << (8 * (k - 4)));
        return (uint64_t)p[0] | ((uint64_t)p[k >> 1] << (8 * (k >> 1))) | ((uint64_t)p[k - 1] << (8 * (k - 1)));
    }
    static inline uint64_t astaire_key_hash64(const char *key, size_t n) {
        const unsigned char *p = (const unsigned char *)key;
        uint64_t h = 0x9E3779B97F4A7C15ULL ^ (uint64_t)n;
        for (; n >= 8; p += 8, n -= 8) {
            h = (h ^ astaire_le64(p)) * 0xFF51AFD7ED558CCDULL;
            h ^= h >> 32;
        }
        if (n) {
            h = (h ^ astaire_le_tail(p, n)) * 0xFF51AFD7ED558CCDULL;
            h ^= h >> 32;
        }
        h ^= h >> 29;
        h *= 0xC4CEB9FE1A85EC53ULL;
        h ^= h >> 32;
        return h;
    }
    static inline uint64_t astaire_load64(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    static inline void astaire_store64(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
    static inline void astaire_prefetch(const void *p) { __builtin_prefetch(p, 0, 3); }
    static inline void astaire_prefetch_w(const void *p) { __builtin_prefetch(p, 1, 3); }
    """
    void prefetch "astaire_prefetch"(const void *p) nogil
    void prefetch_w "astaire_prefetch_w"(const void *p) nogil
    uint64_t c_key_hash64 "astaire_key_hash64"(const char *p, size_t n) nogil
    uint64_t load64 "astaire_load64"(const uint64_t *p) nogil
    void store64 "astaire_store64"(uint64_t *p, uint64_t v) nogil

cdef enum:
    CH_D = 68
    CH_H = 72
    CH_M = 77
    CH_N = 78
    CH_O = 79
    CH_V = 86
    CH_t = 116
    CH_EQ = 61
    C_MAX_META_LINE = 2048
    RELATIVE_EXPIRY_MAX = 2592000  # memcached: an expiry up to 30 days is relative
    EXPIRY_SLACK = 2

cdef uint32_t C_FENCE_BIT = 0x80000000u
cdef uint32_t C_FENCE_MASK = 0x7FFFFFFFu

# Record states: what the record waits for.
cdef enum:
    ST_FREE = 0
    ST_ADDQ = 1   # quiet ADD sent: an error response, or its fence, settles it
    ST_GETK = 2   # read of the local copy sent
    ST_SET = 3    # CAS SET sent
    ST_ADD = 4    # non-quiet ADD sent (after the key vanished, or read-first found none)
    ST_READ = 5   # read-first: GETK of the local copy sent before any write

# How the Writer first touches a record in the target (see Writer).
MODE_ADDQ = "addq"
MODE_READ = "read"
MODE_AUTO = "auto"
WRITER_MODES = (MODE_ADDQ, MODE_READ, MODE_AUTO)

cdef enum:
    OUT_ADDED = 0
    OUT_REPLACED = 1
    OUT_KEPT = 2
    OUT_FAILED = 3

_STATUS_NAMES = {
    0x00: "SUCCESS", 0x01: "KEY_ENOENT", 0x02: "KEY_EEXISTS", 0x03: "E2BIG", 0x04: "EINVAL",
    0x05: "NOT_STORED", 0x07: "NOT_MY_VBUCKET", 0x81: "UNKNOWN_COMMAND", 0x82: "ENOMEM",
}
_OP_NAMES = {0x12: "ADDQ", 0x02: "ADD", 0x0C: "GETK", 0x01: "SET", 0x0D: "GETKQ"}


cdef int emit_store(Buf *out, uint8_t opcode, const char *key, uint32_t klen, const char *val, uint32_t vlen,
                    uint32_t flags, uint32_t exp, uint32_t opaque, uint64_t cas) noexcept nogil:
    cdef size_t size = C_HEADER + 8 + klen + vlen
    cdef uint8_t *p
    if buf_reserve(out, size) < 0:
        return -1
    p = <uint8_t *>out.data + out.len
    put_header(p, C_MAGIC_REQ, opcode, <uint16_t>klen, 8, 0, 8 + klen + vlen, opaque, cas)
    put32(p + 24, flags)
    put32(p + 28, exp)
    memcpy(p + 32, key, klen)
    memcpy(p + 32 + klen, val, vlen)
    out.len += size
    return 0


cdef int emit_key_only(Buf *out, uint8_t opcode, const char *key, uint32_t klen, uint32_t opaque) noexcept nogil:
    cdef uint8_t *p
    if buf_reserve(out, C_HEADER + klen) < 0:
        return -1
    p = <uint8_t *>out.data + out.len
    put_header(p, C_MAGIC_REQ, opcode, <uint16_t>klen, 0, 0, klen, opaque, 0)
    memcpy(p + 24, key, klen)
    out.len += C_HEADER + klen
    return 0


cdef inline bint same_bytes(const char *a, const char *b, size_t n) noexcept nogil:
    """memcmp(a, b, n) == 0 for the short runs compared per record (keys, the own prefix),
    inline: a libc call per record was 5% of a stream's CPU."""
    cdef size_t i = 0
    cdef uint64_t x, y
    while i + 8 <= n:
        memcpy(&x, a + i, 8)
        memcpy(&y, b + i, 8)
        if x != y:
            return False
        i += 8
    while i < n:
        if a[i] != b[i]:
            return False
        i += 1
    return True


# A FIFO of 64-bit entries (head/tail, compacting like Buf).
cdef struct U64Q:
    uint64_t *data
    size_t head
    size_t len
    size_t cap


cdef int q_push(U64Q *q, uint64_t v) noexcept nogil:
    if fifo_room(q) < 0:
        return -1
    q.data[q.len] = v
    q.len += 1
    return 0


cdef inline void q_pop(U64Q *q) noexcept nogil:
    q.head += 1
    if q.head == q.len:
        q.head = 0
        q.len = 0


# ---------------------------------------------------------------------------------------
# The Writer: per-record resync loop

cdef struct Slot:
    char *data        # key then value
    size_t cap
    uint32_t klen
    uint32_t vlen
    uint32_t flags
    uint32_t exp
    uint32_t rounds
    uint32_t fence
    uint8_t state
    uint64_t hash     # key_hash64 of the key, when the Writer has a settled table

# A queued record in the Writer's queue buffer: this header, then key, then value.
cdef struct QRec:
    uint64_t hash
    uint32_t flags
    uint32_t exp
    uint32_t klen
    uint32_t vlen

# A record held back (Writer ``hold``), before its key and value.
cdef struct HRec:
    uint64_t due      # looked up again once the Writer's entries count reaches this
    QRec q

# A crawler fetch deferred (Writer ``hold`` on a crawler stream), before its key.
cdef struct DRec:
    uint64_t due      # released once the Writer has listed this many wanted keys
    uint64_t key_hash
    uint32_t exp
    uint32_t vb
    uint32_t hash
    uint32_t flags    # the listed flags, if has_flags
    uint32_t size     # the listing line's bytes
    uint16_t klen
    uint8_t has_flags

# Slot buffers above this size are given back when their record settles.
cdef enum:
    DEFER_WINDOWS = 16             # a crawler fetch is deferred for this many windows of listed keys
    DEFER_BYTES = 4 * 1024 * 1024  # at most this many bytes of deferred fetches at once
    DEFER_MIN_SIZE = 1024          # only fetches of items at least this large (size=) are deferred
    HOLD_BYTES = 2 * 1024 * 1024   # at most this many key and value bytes held back at once
    HOLD_WINDOWS = 4               # a record is held for this many windows of entries
    SLOT_KEEP = 65536
    FETCH_PREFETCH = 8   # answers ahead whose settled-table entry is fetched early (their entries twice as far)
    FENCE_PREFETCH = 8   # records ahead, in a returned fence's batch, whose table entry is fetched early
    FETCH_WHOLE = 2      # Fetch.flags_only of a queued refetch: sent whole even if the key is noted


cdef inline int push_record(Buf *b, const void *head, size_t head_size, const char *key, uint32_t klen,
                            const char *val, uint32_t vlen) noexcept nogil:
    """Append a record to a FIFO buffer: its fixed-size header (QRec or HRec), key, value."""
    cdef char *d
    if buf_reserve(b, head_size + klen + vlen) < 0:
        return -1
    d = b.data + b.len
    memcpy(d, head, head_size)
    memcpy(d + head_size, key, klen)
    memcpy(d + head_size + klen, val, vlen)
    b.len += head_size + klen + vlen
    return 0


def _hold_table(hold, table):
    """Writer ``hold`` as a table by vbucket: 0 holds nothing, 1 + bit holds the keys whose
    key_hash64 has ``bit`` as its top bit (as astaire._tap_py._hold_table)."""
    out = bytearray(len(table))
    for vb, bit in hold:
        vb, bit = int(vb), int(bit)
        if vb < 0 or vb >= len(table) or not table[vb]:
            raise ValueError(f"hold: vbucket {vb} is not a wanted vbucket")
        if bit not in (0, 1):
            raise ValueError(f"hold: bit must be 0 or 1, not {bit}")
        out[vb] = 1 + bit
    return out


def _settled_entries(settled, generation):
    """Entries of a settled table (two 64-bit words each); checks the table and generation."""
    cdef Py_ssize_t n = 0
    if not 1 <= generation <= 255:
        raise ValueError(f"generation must be between 1 and 255, not {generation!r}")
    with memoryview(settled) as m:
        if m.readonly:
            raise ValueError("the settled table must be writable")
        n = m.nbytes // 16
        if n < 2 or n * 16 != m.nbytes or n & (n - 1) or not m.c_contiguous:
            raise ValueError("the settled table must be a contiguous buffer of a power of two (at least 2) "
                             "of 16-byte entries")
    return n


def key_hash64(key):
    """The settled table's 64-bit hash of a key (astaire.resync.settled)."""
    cdef CBuf b
    cdef uint64_t h
    cbuf_get(key, &b)
    try:
        h = c_key_hash64(b.p, <size_t>b.n)
    finally:
        cbuf_release(&b)
    return h


def _key_text(key):
    return repr(bytes(key[:80]))


# -- crawler fetches, in C ----------------------------------------------------------------
# Keys listed by the crawler wait in one FIFO of fixed-size entries (``Fetch``): at its front
# the sent ones, in opaque order, until their batch's MN comes back; behind them the listed
# ones that fetch_requests has not sent yet. An entry stays where it was written (it was
# copied into a second FIFO when sent: a 280-byte copy, and twice the memory in the cache).
# The FIFO is a ring (a power-of-two array): an entry is never moved while it is queued.
# (Compacting a flat array moved the live queue, megabytes of 280-byte entries, every time
# the array filled: about 2% of a crawler worker's samples, in memmove.)
# A small open-addressing set over the unsent entries finds a key listed again while its
# fetch is still queued.

cdef struct Fetch:
    uint64_t key_hash   # key_hash64(key), when the Writer has a settled table
    uint32_t exp
    uint32_t vb
    uint32_t hash       # vbucket_hash(key)
    uint16_t klen
    uint8_t answered
    uint8_t flags_only  # ``mg <key> f q``: a copy whose key the table knew when its fetch went out
                        # (FETCH_WHOLE while queued: a refetch, whole whatever the table says)
    char key[C_MAX_KEY]


cdef struct FetchQ:
    Fetch *data
    size_t head         # index of the oldest entry
    size_t n            # entries queued
    size_t cap          # 0 or a power of two
    uint64_t first      # sequence number of the oldest entry


cdef inline size_t fq_count(FetchQ *q) noexcept nogil:
    return q.n


cdef inline Fetch *fq_at(FetchQ *q, uint64_t seq) noexcept nogil:
    return &q.data[(q.head + <size_t>(seq - q.first)) & (q.cap - 1)]


# The U64Q FIFO makes room by compacting when at least half the array is consumed, else
# doubling. (Compacting whenever anything was consumed moved the whole live queue for every
# few entries popped.)
cdef inline int fifo_room(U64Q *q) noexcept nogil:
    """Room for one more entry at q.data[q.len]; -1 when out of memory."""
    cdef size_t cap
    cdef void *d
    if q.len < q.cap:
        return 0
    if q.head and q.head * 2 >= q.len:
        memmove(q.data, q.data + q.head, (q.len - q.head) * sizeof(q.data[0]))
        q.len -= q.head
        q.head = 0
    if q.len == q.cap:
        cap = q.cap * 2 if q.cap else 64
        d = realloc(q.data, cap * sizeof(q.data[0]))
        if d == NULL:
            return -1
        q.data = <uint64_t *>d
        q.cap = cap
    return 0


cdef Fetch *fq_push(FetchQ *q) noexcept nogil:
    """Room for one more entry at the tail (sequence number q.first + count), or NULL."""
    cdef size_t cap
    cdef Fetch *d
    if q.n == q.cap:
        cap = q.cap * 2 if q.cap else 64
        d = <Fetch *>realloc(q.data, cap * sizeof(Fetch))
        if d == NULL:
            return NULL
        if q.head:  # full: the newest ``head`` entries wrapped to the start; they follow the old end now
            memcpy(d + q.cap, d, q.head * sizeof(Fetch))
        q.data = d
        q.cap = cap
    q.n += 1
    return &q.data[(q.head + q.n - 1) & (q.cap - 1)]


cdef inline void fq_pop(FetchQ *q) noexcept nogil:
    q.n -= 1
    q.first += 1
    q.head = 0 if q.n == 0 else (q.head + 1) & (q.cap - 1)


# A slot holds the entry's hash beside its sequence number, so that probing compares hashes
# without touching the queue entries (a cache miss each: they are 260-byte records).
#
# Nothing is removed when a fetch is sent: a slot whose sequence number is below ``live``
# (the first unsent fetch) is dead, skipped by lookups and reused by inserts. Removing at
# send time (a probe and a backward shift per fetch, on slots long out of the cache) was
# the largest single cost of a crawler stream's process. Dead slots are dropped when the
# table is rebuilt: when half its slots are taken, it is rebuilt at four times the live
# count (at least), so a rebuild comes at most every quarter table of inserts.
cdef struct KSlot:
    uint64_t seq1       # sequence number + 1 of a queued Fetch; 0 = empty
    uint32_t hash


cdef struct KeySet:
    KSlot *slots
    size_t mask
    size_t used         # slots not empty (live or dead)
    int bits


cdef inline size_t ks_home(KeySet *ks, uint32_t h) noexcept nogil:
    # Multiplicative hashing: the low bits of h are the vbucket and may all be alike.
    return <size_t>(<uint32_t>(h * 2654435769u) >> (32 - ks.bits))


cdef bint ks_find(KeySet *ks, FetchQ *q, uint32_t h, const char *key, size_t klen, uint64_t live) noexcept nogil:
    """Whether an unsent fetch (sequence number ``live`` on) is queued for ``key``."""
    cdef size_t i
    cdef Fetch *e
    if ks.slots == NULL:
        return False
    i = ks_home(ks, h)
    while ks.slots[i].seq1:
        if ks.slots[i].hash == h and ks.slots[i].seq1 > live:
            e = fq_at(q, ks.slots[i].seq1 - 1)
            if e.klen == klen and same_bytes(e.key, key, klen):
                return True
        i = (i + 1) & ks.mask
    return False


cdef inline void ks_put(KeySet *ks, uint64_t seq, uint32_t h, uint64_t live) noexcept nogil:
    """Into the first empty or dead slot of the probe (the key is known to be absent)."""
    cdef size_t i = ks_home(ks, h)
    while ks.slots[i].seq1 > live:
        i = (i + 1) & ks.mask
    if ks.slots[i].seq1 == 0:
        ks.used += 1
    ks.slots[i].seq1 = seq + 1
    ks.slots[i].hash = h


cdef int ks_add(KeySet *ks, uint64_t seq, uint32_t h, uint64_t live) noexcept nogil:
    """Add the queued Fetch ``seq`` (already pushed; absent from the set); fetches before
    ``live`` have been sent. Rebuilt from its own live slots when half full."""
    cdef int bits = 6
    cdef size_t i, n = 0, old_size
    cdef KSlot *old = ks.slots
    cdef KSlot *slots
    if old != NULL and (ks.used + 1) * 2 <= ks.mask + 1:
        ks_put(ks, seq, h, live)
        return 0
    old_size = ks.mask + 1 if old != NULL else 0
    for i in range(old_size):
        if old[i].seq1 > live:
            n += 1
    while (<size_t>1 << bits) < (n + 1) * 4:
        bits += 1
    slots = <KSlot *>calloc(<size_t>1 << bits, sizeof(KSlot))
    if slots == NULL:
        return -1
    ks.slots = slots
    ks.bits = bits
    ks.mask = (<size_t>1 << bits) - 1
    ks.used = 0
    for i in range(old_size):
        if old[i].seq1 > live:
            ks_put(ks, old[i].seq1 - 1, old[i].hash, live)
    free(old)
    ks_put(ks, seq, h, live)
    return 0


# -- input without a copy -----------------------------------------------------------------
# A chunk read from a socket is parsed where it lies. Only an item (frame, line, answer) cut
# by the end of the previous chunk sits in the Writer's own buffer: it is completed there
# with just the bytes it lacks from the new chunk, and the rest of the chunk is parsed in
# place; the tail of the chunk that is cut in turn is copied into the buffer. (Every byte
# from the sources and the target was copied into the buffer before parsing.)

cdef enum:
    IN_TAP = 0        # binary frames: a 24-byte header gives the length
    IN_TARGET = 1
    IN_METADUMP = 2   # text lines
    IN_FETCH = 3      # text lines, some followed by a value: completed a line at a time


cdef inline size_t catch_up_size(Buf *own, const char *p, size_t n, int kind) noexcept nogil:
    """How much of the chunk ``p[:n]`` to append to ``own``, which holds a cut item: what
    the frame lacks (its header first), or up to the chunk's next newline."""
    cdef size_t have = own.len - own.head, need, total
    cdef const char *nl
    if kind == IN_TAP or kind == IN_TARGET:
        if have < C_HEADER:
            need = C_HEADER - have
        else:
            total = C_HEADER + <size_t>be32(<const uint8_t *>own.data + own.head + 8)
            need = total - have if total > have else 1
    else:
        nl = <const char *>memchr(p, CH_NL, n)
        need = <size_t>(nl - p) + 1 if nl != NULL else n
    return need if need < n else n


cdef inline int keep_rest(Buf *own, Buf *b) except -1:
    """After parsing ``b`` in place: its unparsed tail is kept in ``own``."""
    if b.head < b.len:
        if inbuf_feed(own, b.data + b.head, b.len - b.head) < 0:
            raise MemoryError()
    return 0


@cython.final
cdef class Writer:
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
    the other's copy waits for the note that makes it free. A crawler stream
    (``feed_metadump``) defers fetches instead of holding values: a listed key of such a
    vbucket and bit whose item is at least DEFER_MIN_SIZE bytes (the listing's ``size=``) is
    fetched only once ``16 * window`` more wanted keys were listed (sooner past DEFER_BYTES of
    deferred keys, and as soon as the listing ended), so its copy usually arrives known and
    costs the target nothing; one already noted when released is asked for its flags alone
    (``mg <key> f q``), and fetched whole only if newer than the note (``refetched``). A
    deferred fetch costs a few dozen bytes; small items are not
    deferred (the two crawler streams drift apart by more than a deferral, and alternating
    runs measured it no cheaper for 100-byte values).

    Not thread-safe: one Writer belongs to one stream's I/O loop (its C loops run without
    the GIL, so concurrent calls on one Writer would race on its buffers)."""

    cdef uint8_t *_table
    cdef uint32_t _mask
    cdef readonly uint32_t vbuckets
    cdef readonly uint32_t window
    cdef readonly uint64_t max_body
    cdef readonly uint32_t max_retries
    cdef uint32_t _fence_every
    cdef readonly str mode
    cdef bint _auto
    cdef bint _read_first
    cdef uint32_t _probe_present    # auto: first requests that found a local copy, this batch
    cdef uint32_t _probe_total      # auto: first requests answered, this batch
    # Counters.
    cdef readonly uint64_t entries
    cdef uint64_t _backlog_bytes
    cdef uint64_t _nbytes
    cdef readonly uint64_t added
    cdef readonly uint64_t replaced
    cdef readonly uint64_t kept
    cdef readonly uint64_t failed
    cdef readonly uint64_t retries
    cdef readonly uint64_t skipped_own
    cdef readonly uint64_t skipped_unwanted
    cdef readonly uint64_t tombstones
    cdef readonly uint64_t other_tap
    cdef readonly uint64_t vanished
    cdef readonly uint64_t duplicates
    cdef readonly uint64_t kept_as_listed  # copies listed with flags not newer than the note: kept unfetched
    # Whether a listed key is checked against the fetches queued and not sent yet (set before
    # the first listing text; see the pure build's Writer.check_duplicates).
    cdef public bint check_duplicates
    cdef readonly uint64_t read_first   # records whose first request was a read
    cdef readonly uint64_t deduplicated  # records settled as kept from the settled table (also in kept)
    cdef readonly uint64_t held          # records held back (hold): those found known then are in deduplicated
    cdef readonly uint64_t refetched     # deferred fetches asked for flags alone, then found newer: fetched whole
    # The settled table (astaire.resync.settled), shared with the other streams of a resync.
    cdef uint64_t *_settled
    cdef uint64_t _settled_mask       # buckets - 1 (two entries of two words each)
    cdef uint64_t _settled_gen        # generation << 32
    cdef Py_buffer _settled_view
    cdef bint _has_settled_view
    cdef readonly str last_error
    cdef uint64_t *_vb_entries
    cdef uint64_t *_vb_bytes
    # Source side (TAP).
    cdef Buf _src
    cdef uint64_t _src_offset
    cdef bint _finished
    cdef Py_ssize_t _accepted   # records the current feed_tap call accepted
    # Records accepted but not yet given a slot, and the slots (opaque = index).
    cdef Buf _queue
    cdef size_t _q_count
    # Records held back (hold): HRec, key, value each, oldest first.
    cdef uint8_t *_hold       # by vbucket: 0, or 1 + the top hash bit held back
    cdef Buf _held
    cdef size_t _held_count
    cdef uint64_t _held_bytes
    cdef uint64_t _hold_for   # entries a record is held for (and the most held at once)
    cdef Slot *_slots
    cdef uint32_t *_free
    cdef uint32_t _n_free
    cdef uint32_t _in_use
    # Quiet ADDs in flight in send order (slot << 32 | fence seq), and fences awaited.
    cdef U64Q _fifo
    cdef U64Q _fences
    cdef uint32_t _fence_seq
    cdef uint32_t _unfenced
    cdef Buf _out
    # Target side.
    cdef Buf _tgt
    cdef uint64_t _tgt_offset
    # Crawler side (not per-record hot: Python containers are fine here).
    cdef Buf _md
    cdef uint64_t _md_offset
    cdef bint _md_ended
    cdef int _mdn                               # listed keys parsed, not yet hashed
    cdef uint16_t _mdlen[LANES]
    cdef uint32_t _mdexp[LANES]
    cdef const char *_mdrest[LANES]   # the listed line after its exp field (valid until the lanes are
    cdef uint16_t _mdlinelen[LANES]   # the listed line's bytes (newline included)
    cdef uint32_t _mdflags[LANES]     # the listed flags (memcached 1.6.24 on), if _mdhasflags
    cdef bint _mdhasflags[LANES]
    cdef uint64_t _mdkh[LANES]        # the key's key_hash64, if _mdhasflags
    cdef int _md_lists_flags          # 0 until the first key line, then 1 if it listed flags, else 2
    cdef uint16_t _mdrestlen[LANES]   # flushed, within one _metadump_lines): size= is read there if needed
    cdef char _mdkeys[LANES * C_MAX_KEY]
    cdef uint8_t *_defer       # a crawler stream's hold (by vbucket, as _hold): fetches deferred
    cdef Buf _dq               # deferred fetches: DRec, key each, oldest first
    cdef size_t _dq_count
    cdef uint64_t _listed      # wanted keys listed so far (the deferral's clock)
    cdef uint64_t _defer_for
    cdef FetchQ _fq            # the sent fetches (its first _fq_sent entries, in opaque order, until
    cdef size_t _fq_sent       # their batch's MN), then the listed ones not yet sent
    cdef KeySet _fq_keys       # the keys of the fetches not yet sent
    cdef uint32_t _inflight_first   # opaque of _fq's first entry (when _fq_sent > 0)
    cdef U64Q _fetch_batches   # (NOOP opaque << 32 | fetch count) per batch in flight
    cdef size_t _front_answered
    cdef size_t _fetch_in_flight
    cdef uint32_t _fetch_seq
    cdef Buf _fetch_out
    cdef Buf _fch
    cdef uint64_t _fch_offset

    def __init__(self, wanted, vbuckets=128, window=4096, max_body=DEFAULT_MAX_BODY, max_retries=64,
                 mode=MODE_ADDQ, settled=None, generation=0, hold=None):
        cdef uint32_t i
        cdef Py_ssize_t entries
        if mode not in WRITER_MODES:
            raise ValueError(f"mode must be one of {', '.join(WRITER_MODES)}, not {mode!r}")
        if settled is not None:
            entries = _settled_entries(settled, generation)
            if self._has_settled_view:
                raise RuntimeError("Writer.__init__ called twice")
            PyObject_GetBuffer(settled, &self._settled_view, PyBUF_WRITABLE)
            self._has_settled_view = True
            self._settled = <uint64_t *>self._settled_view.buf
            self._settled_mask = <uint64_t>entries // 2 - 1   # buckets of two entries
            self._settled_gen = <uint64_t>generation << 32
        table = _wanted_table(wanted, vbuckets)
        holding = _hold_table(hold, table) if hold and settled is not None else None
        window = int(window)
        if window < 1 or window > 0x7FFFFFFF:
            raise ValueError(f"window must be between 1 and {0x7FFFFFFF}, not {window}")
        if max_body < 0:
            raise ValueError("max_body must be >= 0")
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        if self._table != NULL:
            raise RuntimeError("Writer.__init__ called twice")
        self.vbuckets = len(table)
        self.check_duplicates = True
        self._mask = self.vbuckets - 1
        self.window = window
        self.max_body = max_body_arg(max_body)
        self.max_retries = min(int(max_retries), 0xFFFFFFFF)
        self._fence_every = max(1, self.window // 4)
        self._hold_for = HOLD_WINDOWS * <uint64_t>self.window
        self._defer_for = DEFER_WINDOWS * <uint64_t>self.window
        self.mode = str(mode)
        self._auto = mode == MODE_AUTO
        self._read_first = mode == MODE_READ
        self.last_error = ""
        self._table = <uint8_t *>malloc(self.vbuckets)
        self._vb_entries = <uint64_t *>malloc(self.vbuckets * sizeof(uint64_t))
        self._vb_bytes = <uint64_t *>malloc(self.vbuckets * sizeof(uint64_t))
        self._slots = <Slot *>malloc(self.window * sizeof(Slot))
        self._free = <uint32_t *>malloc(self.window * sizeof(uint32_t))
        if (self._table == NULL or self._vb_entries == NULL or self._vb_bytes == NULL or self._slots == NULL
                or self._free == NULL):
            raise MemoryError()
        if holding is not None:
            self._hold = <uint8_t *>malloc(self.vbuckets)
            if self._hold == NULL:
                raise MemoryError()
            for i in range(self.vbuckets):
                self._hold[i] = holding[i]
        for i in range(self.vbuckets):
            self._table[i] = table[i]
            self._vb_entries[i] = 0
            self._vb_bytes[i] = 0
        for i in range(self.window):
            self._slots[i].data = NULL
            self._slots[i].cap = 0
            self._slots[i].state = ST_FREE
            self._free[i] = self.window - 1 - i
        self._n_free = self.window

    def __dealloc__(self):
        cdef uint32_t i
        if self._has_settled_view:
            PyBuffer_Release(&self._settled_view)
            self._has_settled_view = False
        if self._slots != NULL:
            for i in range(self.window):
                free(self._slots[i].data)
        free(self._slots)
        free(self._free)
        free(self._table)
        free(self._hold)
        free(self._defer)
        buf_free(&self._held)
        buf_free(&self._dq)
        free(self._vb_entries)
        free(self._vb_bytes)
        free(self._fifo.data)
        free(self._fences.data)
        buf_free(&self._src)
        buf_free(&self._queue)
        buf_free(&self._out)
        buf_free(&self._tgt)
        buf_free(&self._md)
        buf_free(&self._fetch_out)
        free(self._fq.data)
        free(self._fq_keys.slots)
        free(self._fetch_batches.data)
        buf_free(&self._fch)

    # -- state -----------------------------------------------------------------------

    @property
    def bytes(self):
        return self._nbytes

    @property
    def backlog(self):
        """Records accepted but not yet settled."""
        return self._backlog_n()

    cdef inline size_t _backlog_n(self) noexcept nogil:
        return self._q_count + self._in_use

    cdef inline size_t _fetch_backlog_n(self) noexcept nogil:
        return fq_count(&self._fq) - self._fq_sent + self._fetch_in_flight

    @property
    def backlog_bytes(self):
        """Key and value bytes of the records accepted but not yet settled (what the backlog
        holds in memory: a stream bounds it as well as the record count)."""
        return self._backlog_bytes

    @property
    def fetch_backlog(self):
        """Crawler fetches listed but not yet answered."""
        return self._fetch_backlog_n()

    @property
    def done(self):
        return ((self._finished or self._md_ended) and self._q_count == 0 and self._held_count == 0
                and self._dq_count == 0
                and self._in_use == 0
                and self._fences.len == self._fences.head and self._out.len == 0
                and fq_count(&self._fq) == self._fq_sent and self._fetch_in_flight == 0)

    def stats(self):
        return {
            "entries": self.entries, "bytes": self._nbytes, "added": self.added,
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

    def vbucket_counts(self):
        """{vbucket: (entries, bytes)} for every wanted vbucket, cumulative."""
        cdef uint32_t vb
        return {vb: (self._vb_entries[vb], self._vb_bytes[vb])
                for vb in range(self.vbuckets) if self._table[vb]}

    def finish(self):
        """The source ended cleanly. A frame cut short by the end is a protocol error."""
        if self._src.head < self._src.len:
            raise MalformedFrame(
                f"source stream ended inside a frame ({self._src.len - self._src.head} bytes buffered)",
                self._src_offset)
        self._finished = True
        if self._close_batch() < 0:
            raise MemoryError()

    # -- records and slots (C only) --------------------------------------------------

    cdef int _emit_fence(self) noexcept nogil:
        cdef uint32_t seq = self._fence_seq
        cdef uint8_t *p
        self._fence_seq = (seq + 1) & C_FENCE_MASK
        if q_push(&self._fences, seq) < 0 or buf_reserve(&self._out, C_HEADER) < 0:
            return -1
        p = <uint8_t *>self._out.data + self._out.len
        put_header(p, C_MAGIC_REQ, C_OP_NOOP, 0, 0, 0, 0, C_FENCE_BIT | seq, 0)
        self._out.len += C_HEADER
        self._unfenced = 0
        return 0

    cdef inline int _close_batch(self) noexcept nogil:
        if self._unfenced:
            return self._emit_fence()
        return 0

    cdef int _start(self, const char *key, uint32_t klen, const char *val, uint32_t vlen,
                    uint32_t flags, uint32_t exp, uint64_t hash) noexcept nogil:
        """Give a record a free slot (its opaque) and send its first request: a read (GETK)
        in read-first mode, else a quiet ADD (fenced every batch)."""
        cdef uint32_t slot
        cdef Slot *s
        cdef size_t need = <size_t>klen + vlen
        cdef size_t cap
        cdef char *d
        self._n_free -= 1
        slot = self._free[self._n_free]
        s = &self._slots[slot]
        # The next records' slots, early: a slot was last touched when its fence came back,
        # a window of traffic ago, so its entry (two ahead) and its buffer (one ahead, its
        # entry fetched by the call before) are cache misses that would stall the copy.
        if self._n_free >= 2:
            prefetch_w(&self._slots[self._free[self._n_free - 2]])
        if self._n_free >= 1:
            prefetch_w(self._slots[self._free[self._n_free - 1]].data)
        if s.cap < need:
            cap = need if need > 256 else 256
            d = <char *>realloc(s.data, cap)
            if d == NULL:
                self._n_free += 1
                return -1
            s.data = d
            s.cap = cap
        memcpy(s.data, key, klen)
        memcpy(s.data + klen, val, vlen)
        s.klen = klen
        s.vlen = vlen
        s.flags = flags
        s.exp = exp
        s.hash = hash
        s.rounds = 0
        self._in_use += 1
        if self._read_first:
            s.state = ST_READ
            self.read_first += 1
            return emit_key_only(&self._out, C_OP_GETK, s.data, klen, slot)
        s.state = ST_ADDQ
        s.fence = self._fence_seq
        if emit_store(&self._out, C_OP_ADDQ, key, klen, val, vlen, flags, exp, slot, 0) < 0:
            return -1
        if q_push(&self._fifo, (<uint64_t>slot << 32) | s.fence) < 0:
            return -1
        self._unfenced += 1
        if self._unfenced >= self._fence_every:
            return self._emit_fence()
        return 0

    cdef int _accept(self, const char *key, uint32_t klen, const char *val, uint32_t vlen, uint32_t flags,
                     uint32_t exp, uint32_t vb, uint64_t size, uint64_t hash) noexcept nogil:
        """Take one wanted record; ``hash`` is its key_hash64 when the Writer has a settled
        table (the callers compute it ahead, and fetch its entry early: the other workers
        write the table, so an entry read when needed is a cache miss that stalls)."""
        cdef HRec r
        self._count_entry(vb, size)
        if vlen == 0:
            self.tombstones += 1
        if self._settled != NULL:
            if self._known(hash, flags):
                self.deduplicated += 1
                self.kept += 1
                return 0
            if self._hold != NULL and self._hold[vb] == 1 + (hash >> 63) and not self._finished:
                r.due = self.entries + self._hold_for
                r.q.hash = hash
                r.q.flags = flags
                r.q.exp = exp
                r.q.klen = klen
                r.q.vlen = vlen
                if push_record(&self._held, &r, sizeof(HRec), key, klen, val, vlen) < 0:
                    return -1
                self._held_count += 1
                self._held_bytes += <uint64_t>klen + vlen
                self.held += 1
                return 0
        return self._enqueue(key, klen, val, vlen, flags, exp, hash)

    cdef inline void _count_entry(self, uint32_t vb, uint64_t size) noexcept nogil:
        """One more entry of vbucket ``vb`` taken from the source, ``size`` bytes of it received."""
        self.entries += 1
        self._nbytes += size
        self._vb_entries[vb] += 1
        self._vb_bytes[vb] += size

    cdef int _enqueue(self, const char *key, uint32_t klen, const char *val, uint32_t vlen, uint32_t flags,
                      uint32_t exp, uint64_t hash) noexcept nogil:
        cdef QRec h
        self._backlog_bytes += <uint64_t>klen + vlen
        if self._n_free and self._q_count == 0:
            return self._start(key, klen, val, vlen, flags, exp, hash)  # same order as queueing then pumping
        h.hash = hash
        h.flags = flags
        h.exp = exp
        h.klen = klen
        h.vlen = vlen
        if push_record(&self._queue, &h, sizeof(QRec), key, klen, val, vlen) < 0:
            return -1
        self._q_count += 1
        return 0

    cdef int _release_held(self) noexcept nogil:
        """Look up again the held records that are due (or pressed out: too many, too many
        bytes, or the source ended); send those the table still does not know."""
        cdef HRec r, following
        cdef const char *p
        while self._held_count:
            p = self._held.data + self._held.head
            memcpy(&r, p, sizeof(HRec))
            if not (self._finished or r.due <= self.entries or self._held_count > self._hold_for
                    or self._held_bytes > HOLD_BYTES):
                break
            if self._held_count > 1:  # the next one's table entry, early (another worker wrote it)
                memcpy(&following, p + sizeof(HRec) + r.q.klen + r.q.vlen, sizeof(HRec))
                prefetch(self._entry(following.q.hash))
            self._held.head += sizeof(HRec) + r.q.klen + r.q.vlen
            self._held_count -= 1
            self._held_bytes -= <uint64_t>r.q.klen + r.q.vlen
            if self._known(r.q.hash, r.q.flags):
                self.deduplicated += 1
                self.kept += 1
            elif self._enqueue(p + sizeof(HRec), r.q.klen, p + sizeof(HRec) + r.q.klen, r.q.vlen, r.q.flags,
                               r.q.exp, r.q.hash) < 0:
                return -1
        if self._held_count == 0:
            self._held.head = self._held.len = 0
            if self._held.cap > KEEP_EMPTY_BUF:
                buf_free(&self._held)
        return 0

    cdef int _pump(self) noexcept nogil:
        """Start queued records in free slots, a batch at a time: while fewer than a batch
        of slots is free (and the queue holds more), wait for more answers rather than
        send dribs (each a wake-up of the target and a syscall on both sides)."""
        cdef QRec h
        cdef const char *p
        if self._held_count and self._release_held() < 0:
            return -1
        if self._n_free < self._fence_every and self._n_free < self._q_count:
            return self._close_batch()
        while self._q_count and self._n_free:
            p = self._queue.data + self._queue.head
            memcpy(&h, p, sizeof(QRec))
            if self._start(p + sizeof(QRec), h.klen, p + sizeof(QRec) + h.klen, h.vlen, h.flags, h.exp, h.hash) < 0:
                return -1
            self._queue.head += sizeof(QRec) + h.klen + h.vlen
            self._q_count -= 1
        if self._q_count == 0:
            self._queue.head = self._queue.len = 0
            if self._queue.cap > KEEP_EMPTY_BUF:
                buf_free(&self._queue)
        return self._close_batch()

    cdef inline void _probed(self, bint present) noexcept nogil:
        """Auto mode: a first request's answer (did the target hold a copy that had to be
        read? A copy of a key the settled table knew, with flags not older, counts as none:
        an ADDQ that finds it costs no read, see _kept_as_noted)."""
        if not self._auto:
            return
        self._probe_total += 1
        if present:
            self._probe_present += 1
        if self._probe_total >= self._fence_every:
            self._read_first = self._probe_present * 2 > self._probe_total
            self._probe_present = 0
            self._probe_total = 0

    cdef inline void _probed_found(self, Slot *s) noexcept nogil:
        """Auto mode: a read-first GETK found a copy. It counts as one that had to be read
        unless the table knew the key with flags not older (an ADDQ would have been kept on
        the note); the table is looked at only in auto mode."""
        if self._auto:
            self._probed(not (self._settled != NULL and self._known(s.hash, s.flags)))

    # -- the settled table (astaire.resync.settled) ------------------------------------

    cdef inline uint64_t *_entry(self, uint64_t hash) noexcept nogil:
        """A key's bucket in the settled table: two entries of two words (32 bytes, half a
        cache line)."""
        return self._settled + 4 * (hash & self._settled_mask)

    cdef inline bint _note_of(self, uint64_t hash, uint64_t *word) noexcept nogil:
        """The table's note of this key in this resync: True (its second word in ``word``)
        or False."""
        cdef uint64_t *e = self._entry(hash)
        cdef int j
        for j in range(2):
            if load64(e) == hash:
                word[0] = load64(e + 1)
                if (word[0] >> 40) == (hash & 0xFFFFFFu) and (word[0] & 0xFF00000000u) == self._settled_gen:
                    return True
            e += 2
        return False

    cdef inline bint _known(self, uint64_t hash, uint32_t flags) noexcept nogil:
        """The target was seen holding this key, in this resync, with flags not older than
        ``flags``: another copy changes nothing (see astaire.resync.settled)."""
        cdef uint64_t word
        return self._note_of(hash, &word) and not ((<uint32_t>word - flags) & 0x80000000u)

    cdef inline bint _noted(self, uint64_t hash) noexcept nogil:
        """The table has a note of this key in this resync (whatever its flags)."""
        cdef uint64_t word
        return self._settled != NULL and self._note_of(hash, &word)

    cdef inline void _note(self, Slot *s, uint32_t held) noexcept nogil:
        """The target holds the slot's key with flags ``held`` (it just added, replaced or
        kept it)."""
        cdef uint64_t *e
        if self._settled == NULL:
            return
        e = self._entry(s.hash)
        if load64(e) != s.hash:
            if load64(e + 2) == s.hash:
                e += 2  # the key's older note: replaced where it is
            else:  # the bucket's newer note becomes its older one, the older one goes
                store64(e + 2, load64(e))
                store64(e + 3, load64(e + 1))
        store64(e, s.hash)
        store64(e + 1, ((s.hash & 0xFFFFFFu) << 40) | self._settled_gen | held)

    cdef inline bint _kept_as_noted(self, uint32_t slot, Slot *s) noexcept nogil:
        """A write that lost to the key being there (an ADD that found it present, a CAS
        replace that found it changed): if the table notes the key meanwhile with flags not
        older than this copy (the other old replica's stream wrote it first, usually the very
        copy this write ran into), the copy is settled as kept and nothing is read back."""
        if self._settled != NULL and self._known(s.hash, s.flags):
            self.deduplicated += 1
            self._settle(slot, OUT_KEPT)
            return True
        return False

    cdef void _settle(self, uint32_t slot, int outcome) noexcept nogil:
        cdef Slot *s = &self._slots[slot]
        s.state = ST_FREE
        self._backlog_bytes -= <uint64_t>s.klen + s.vlen
        if s.cap > SLOT_KEEP:
            free(s.data)
            s.data = NULL
            s.cap = 0
        self._free[self._n_free] = slot
        self._n_free += 1
        self._in_use -= 1
        if outcome == OUT_ADDED:
            self.added += 1
        elif outcome == OUT_REPLACED:
            self.replaced += 1
        elif outcome == OUT_KEPT:
            self.kept += 1
        else:
            self.failed += 1

    cdef int _send(self, uint32_t slot, int state) noexcept nogil:
        cdef Slot *s = &self._slots[slot]
        s.state = state
        if state == ST_GETK:
            return emit_key_only(&self._out, C_OP_GETK, s.data, s.klen, slot)
        return emit_store(&self._out, C_OP_ADD, s.data, s.klen, s.data + s.klen, s.vlen, s.flags, s.exp, slot, 0)

    cdef object _slot_key(self, uint32_t slot):
        return PyBytes_FromStringAndSize(self._slots[slot].data, self._slots[slot].klen)

    cdef int _fail(self, uint32_t slot, str what) except -1:
        self.last_error = what
        self._settle(slot, OUT_FAILED)
        return 0

    cdef int _retry(self, uint32_t slot, int state) except -1:
        """Another round for a record that lost a race: re-read (GETK) or re-add (ADD)."""
        cdef Slot *s = &self._slots[slot]
        s.rounds += 1
        self.retries += 1
        if s.rounds > self.max_retries:
            self._fail(slot, f"gave up on key {_key_text(self._slot_key(slot))} after {self.max_retries} retries")
            return 0
        if self._send(slot, state) < 0:
            raise MemoryError()
        return 0

    # -- source: TAP -----------------------------------------------------------------

    cdef int _tap_loop(self, Buf *b, Py_ssize_t *accepted) noexcept nogil:
        """Consume whole TAP frames from ``b``. Returns 0, or a scanner error code with the
        buffer's head left on the offending frame."""
        cdef const uint8_t *p = <const uint8_t *>b.data
        cdef const char *key
        cdef size_t pos = b.head
        cdef TapBatch tb
        cdef TapInfo *t
        cdef int r, i
        cdef uint32_t vb
        cdef uint64_t hashes[LANES]
        while True:
            r = scan_batch(p, b.len, &pos, self.max_body, &tb)
            self.other_tap += tb.other
            for i in range(tb.n):
                hashes[i] = 0
                # The table entries of the batch's wanted records are fetched together.
                if self._settled != NULL and self._table[tb.hash[i] & self._mask]:
                    t = &tb.info[i]
                    hashes[i] = c_key_hash64(<const char *>p + tb.start[i] + t.keyoff, t.keylen)
                    prefetch(self._entry(hashes[i]))
            for i in range(tb.n):
                t = &tb.info[i]
                key = <const char *>p + tb.start[i] + t.keyoff
                if t.keylen >= C_OWN_LEN and same_bytes(key, astaire_own_prefix, C_OWN_LEN):
                    self.skipped_own += 1
                    continue
                vb = tb.hash[i] & self._mask
                if not self._table[vb]:
                    self.skipped_unwanted += 1
                    continue
                if self._accept(key, t.keylen, key + t.keylen, t.vallen, t.flags, t.exp, vb, t.size, hashes[i]) < 0:
                    return E_NOMEM
                accepted[0] += 1
            self._src_offset += pos - b.head
            b.head = pos
            if r != 1:
                return r if r < 0 else 0

    def feed_tap(self, data):
        """Take a chunk of the TAP stream; returns how many records it accepted."""
        self._accepted = 0
        self._feed(data, &self._src, IN_TAP)
        return self._accepted

    cdef int _feed(self, object data, Buf *own, int kind) except -1:
        cdef CBuf c
        cbuf_get(data, &c)
        try:
            self._feed_ptr(c.p, <size_t>c.n, own, kind)
        finally:
            cbuf_release(&c)
        return 0

    cdef int _feed_ptr(self, const char *p, size_t n, Buf *own, int kind) except -1:
        """Parse a chunk: first complete the item ``own`` holds (appending only what it
        lacks), then parse the rest of the chunk in place and keep its cut tail in ``own``."""
        cdef Buf view
        cdef size_t k = 0, take
        while own.head < own.len and k < n:
            take = catch_up_size(own, p + k, n - k, kind)
            if inbuf_feed(own, p + k, take) < 0:
                raise MemoryError()
            k += take
            self._parse(own, kind)
        if k < n:
            view.data = <char *>p + k
            view.head = 0
            view.len = n - k
            view.cap = 0
            try:
                self._parse(&view, kind)
            finally:
                keep_rest(own, &view)
        return 0

    cdef int _parse(self, Buf *b, int kind) except -1:
        cdef int r
        cdef Py_ssize_t accepted = 0
        if kind == IN_TAP:
            with nogil:
                r = self._tap_loop(b, &accepted)
            self._accepted += accepted
            if r < 0:
                raise_frame_error(r, <const uint8_t *>b.data + b.head, self._src_offset, self.max_body)
        elif kind == IN_TARGET:
            self._target_frames(b)
        elif kind == IN_METADUMP:
            self._metadump_lines(b)
        else:
            self._meta_answers(b)
        return 0

    # -- target ----------------------------------------------------------------------

    def target_requests(self):
        """The frames to send to the local memcached now (the buffer is cleared)."""
        self._produce_target()
        out = PyBytes_FromStringAndSize(self._out.data + self._out.head, self._out.len - self._out.head)
        self._out.head = self._out.len = 0
        if self._out.cap > KEEP_EMPTY_BUF:  # do not keep a burst's worth of memory
            buf_free(&self._out)
        return out

    cdef int _produce_target(self) except -1:
        """Append the requests due to the target to ``_out`` (behind any not yet sent)."""
        cdef int r
        with nogil:
            r = self._pump()
        if r < 0:
            raise MemoryError()
        return 0

    def feed_target(self, data):
        """Take a chunk of the local memcached's responses."""
        self._feed(data, &self._tgt, IN_TARGET)

    cdef int _target_frames(self, Buf *b) except -1:
        """Hand each whole frame to ``_on_target``; a frame cut short stays for the next chunk."""
        cdef const uint8_t *p
        cdef size_t size = 0
        cdef int r
        while b.head < b.len:
            p = <const uint8_t *>b.data + b.head
            r = check_header(p, b.len - b.head, self.max_body, &size)
            if r == R_INCOMPLETE:
                break
            if r < 0:
                raise_frame_error(r, p, self._tgt_offset, self.max_body)
            self._on_target(p, size, self._tgt_offset)
            b.head += size
            self._tgt_offset += size
        return 0

    cdef int _on_target(self, const uint8_t *p, size_t size, uint64_t offset) except -1:
        cdef uint8_t opcode = p[1]
        cdef uint16_t status = be16(p + 6)
        cdef uint32_t opaque = be32(p + 12)
        cdef uint32_t seq, slot, local, extlen, keylen
        cdef uint64_t entry
        cdef Slot *s
        cdef int state, expected
        if p[0] != C_MAGIC_RES:
            raise UnexpectedFrame(f"request opcode 0x{opcode:02x} from the target", offset)
        if opcode == C_OP_NOOP and opaque & C_FENCE_BIT:
            seq = opaque & C_FENCE_MASK
            if self._fences.head == self._fences.len or self._fences.data[self._fences.head] != seq:
                raise UnexpectedFrame(f"NOOP response with unexpected opaque 0x{opaque:08x} from the target",
                                      offset)
            q_pop(&self._fences)
            while self._fifo.head < self._fifo.len:
                entry = self._fifo.data[self._fifo.head]
                if <uint32_t>entry != seq:
                    break
                if self._settled != NULL:
                    # the table entry this batch notes FENCE_PREFETCH records on: a cache miss
                    # in the shared table, started early; its key's hash is read from a slot
                    # fetched early in turn, twice as far on
                    if self._fifo.head + 2 * FENCE_PREFETCH < self._fifo.len:
                        prefetch(&self._slots[<uint32_t>(self._fifo.data[self._fifo.head + 2 * FENCE_PREFETCH] >> 32)].hash)
                    if self._fifo.head + FENCE_PREFETCH < self._fifo.len:
                        prefetch(self._entry(self._slots[<uint32_t>(
                            self._fifo.data[self._fifo.head + FENCE_PREFETCH] >> 32)].hash))
                q_pop(&self._fifo)
                slot = <uint32_t>(entry >> 32)
                s = &self._slots[slot]
                if s.state == ST_ADDQ and s.fence == seq:
                    self._probed(False)
                    self._note(s, s.flags)
                    self._settle(slot, OUT_ADDED)
            return 0
        if opaque >= self.window or self._slots[opaque].state == ST_FREE:
            expected = -1
        else:
            state = self._slots[opaque].state
            expected = (C_OP_ADDQ if state == ST_ADDQ else C_OP_GETK if state == ST_GETK or state == ST_READ
                        else C_OP_SET if state == ST_SET else C_OP_ADD)
        if expected != opcode:
            raise UnexpectedFrame(
                f"response opcode 0x{opcode:02x} with unexpected opaque 0x{opaque:08x} from the target", offset)
        slot = opaque
        s = &self._slots[slot]
        state = s.state
        extlen = p[4]
        keylen = be16(p + 2)
        if state == ST_GETK or state == ST_READ:
            if status == C_ST_SUCCESS:
                if extlen != 4:
                    raise MalformedFrame(f"GETK response extras length {extlen}, expected 4", offset)
                if keylen != s.klen or not same_bytes(<const char *>p + C_HEADER + 4, s.data, keylen):
                    raise UnexpectedFrame("GETK response for another key from the target", offset)
                local = be32(p + C_HEADER)
                if state == ST_READ:
                    self._probed_found(s)
                if (local - s.flags) & 0x80000000u:  # int32(local - record) < 0: the local copy is older
                    s.state = ST_SET
                    if emit_store(&self._out, C_OP_SET, s.data, s.klen, s.data + s.klen, s.vlen, s.flags, s.exp,
                                  slot, be64(p + 16)) < 0:
                        raise MemoryError()
                else:
                    self._note(s, local)
                    self._settle(slot, OUT_KEPT)
                return 0
            if status == C_ST_ENOENT:
                if state == ST_READ:
                    self._probed(False)
                    if self._send(slot, ST_ADD) < 0:  # the normal path when the key is absent
                        raise MemoryError()
                    return 0
                return self._retry(slot, ST_ADD)
        elif state == ST_ADDQ or state == ST_ADD:
            if status == C_ST_SUCCESS:
                self._note(s, s.flags)
                self._settle(slot, OUT_ADDED)
                return 0
            if status == C_ST_EEXISTS or status == C_ST_NOT_STORED:
                if self._kept_as_noted(slot, s):
                    if state == ST_ADDQ:
                        self._probed(False)  # found, but known: no read was needed
                    return 0
                if state == ST_ADDQ:
                    self._probed(True)
                    if self._send(slot, ST_GETK) < 0:  # the normal path when the key is present
                        raise MemoryError()
                    return 0
                return self._retry(slot, ST_GETK)
        else:  # ST_SET
            if status == C_ST_SUCCESS:
                self._note(s, s.flags)
                self._settle(slot, OUT_REPLACED)
                return 0
            if status == C_ST_EEXISTS or status == C_ST_NOT_STORED:
                if self._kept_as_noted(slot, s):
                    return 0
                return self._retry(slot, ST_GETK)
            if status == C_ST_ENOENT:
                return self._retry(slot, ST_ADD)
        cdef size_t vstart = C_HEADER + extlen + keylen
        cdef size_t vlen = min(size - vstart, <size_t>200)
        name = _STATUS_NAMES.get(status, "unknown status")
        text = PyBytes_FromStringAndSize(<const char *>p + vstart, vlen).decode("utf-8", "replace")
        self._fail(slot, f"{_OP_NAMES[opcode]} of key {_key_text(self._slot_key(slot))} failed: "
                         f"status 0x{status:04x} {name} {text!r}")
        return 0

    # -- source: crawler -------------------------------------------------------------

    def feed_metadump(self, data):
        """Take a chunk of ``lru_crawler metadump all`` text; True once END was seen."""
        self._listing_starts()
        if self._md_ended:
            if len(data):
                raise CrawlerError("data after END", self._md_offset)
            return True
        self._feed(data, &self._md, IN_METADUMP)
        return self._md_ended

    cdef inline void _listing_starts(self) noexcept:
        if self._hold != NULL:  # a crawler stream defers fetches instead (see the class docstring)
            self._defer = self._hold
            self._hold = NULL

    cdef int _metadump_lines(self, Buf *m) except -1:
        cdef const char *line
        cdef const char *nl
        cdef size_t n, end
        cdef uint64_t offset  # a C integer: an undeclared one is a Python int made per line
        if self._md_ended:  # END came at the end of an earlier piece of this chunk
            if m.head < m.len:
                raise CrawlerError("data after END", self._md_offset)
            return 0
        try:
            while True:
                line = m.data + m.head
                n = m.len - m.head
                nl = <const char *>memchr(line, CH_NL, n) if n else NULL
                if nl == NULL:
                    if n > C_MAX_LINE:
                        raise CrawlerError("metadump line too long", self._md_offset)
                    break
                end = <size_t>(nl - line)
                if end > C_MAX_LINE:
                    raise CrawlerError("metadump line too long", self._md_offset)
                offset = self._md_offset
                self._md_offset += end + 1
                m.head += end + 1
                if end > 0 and line[end - 1] == CH_CR:
                    end -= 1
                if self._metadump_line(line, end, offset):
                    self._md_ended = True
                    if m.head < m.len:
                        raise CrawlerError("data after END", self._md_offset)
                    break
        finally:
            self._md_flush()  # the lines before a bad one count, as in the pure build
        return 0

    cdef int _md_flush(self) except -1:
        """Hash the parsed key lines together and queue the fetches of the wanted ones."""
        cdef const unsigned char *keys[LANES]
        cdef size_t lens[LANES]
        cdef uint32_t hashes[LANES]
        cdef int i, n = self._mdn, short_keys = 0
        cdef const char *key
        cdef size_t dlen
        cdef uint32_t h, vb
        cdef uint64_t kh
        cdef uint32_t flags = 0
        cdef bint has_flags
        cdef DRec d
        if n == 0:
            return 0
        self._mdn = 0
        for i in range(LANES):
            if i < n and self._mdlen[i] <= ASTAIRE_MD5_MAX_SHORT:
                keys[i] = <const unsigned char *>self._mdkeys + i * C_MAX_KEY
                lens[i] = self._mdlen[i]
                short_keys += 1
            else:
                keys[i] = <const unsigned char *>self._mdkeys
                lens[i] = 0
        if short_keys >= MIN_LANES_FOR_BATCH:
            astaire_md5_first32_lanes(keys, lens, hashes)
        for i in range(n):
            if short_keys < MIN_LANES_FOR_BATCH or self._mdlen[i] > ASTAIRE_MD5_MAX_SHORT:
                hashes[i] = astaire_md5_first32(<const unsigned char *>self._mdkeys + i * C_MAX_KEY, self._mdlen[i])
        if self._fq_keys.slots != NULL and self.check_duplicates:  # the duplicate check's slots, fetched together
            for i in range(n):
                if self._table[hashes[i] & self._mask]:
                    prefetch(&self._fq_keys.slots[ks_home(&self._fq_keys, hashes[i])])
        for i in range(n):
            key = self._mdkeys + i * C_MAX_KEY
            dlen = self._mdlen[i]
            if dlen >= C_OWN_LEN and same_bytes(key, astaire_own_prefix, C_OWN_LEN):
                self.skipped_own += 1
                continue
            h = hashes[i]
            vb = h & self._mask
            if not self._table[vb]:
                self.skipped_unwanted += 1
                continue
            if self.check_duplicates and ks_find(&self._fq_keys, &self._fq, h, key, dlen,
                                                 self._fq.first + self._fq_sent):
                self.duplicates += 1  # the one queued fetch will read the latest copy
                continue
            self._listed += 1
            kh = 0
            has_flags = self._mdhasflags[i]
            flags = self._mdflags[i]
            if self._settled != NULL:
                kh = self._mdkh[i] if has_flags else c_key_hash64(key, dlen)
                if has_flags and self._known(kh, flags):
                    # Listed with flags (1.6.24 on) not newer than the note: kept, and not fetched.
                    self._listed_kept(vb, self._mdlinelen[i])
                    continue
            if (self._defer != NULL and self._defer[vb] == 1 + (kh >> 63)
                    and listed_size(self._mdrest[i], self._mdrestlen[i]) >= DEFER_MIN_SIZE):
                d.due = self._listed + self._defer_for
                d.key_hash = kh
                d.exp = self._mdexp[i]
                d.vb = vb
                d.hash = h
                d.flags = flags if has_flags else 0
                d.size = self._mdlinelen[i]
                d.has_flags = has_flags
                d.klen = <uint16_t>dlen
                if push_record(&self._dq, &d, sizeof(DRec), key, <uint32_t>dlen, key, 0) < 0:
                    raise MemoryError()
                self._dq_count += 1
                self.held += 1
                if self._dq.len - self._dq.head > DEFER_BYTES:
                    self._release_deferred(0)
                continue
            self._list_fetch(key, dlen, self._mdexp[i], vb, h, kh, False)
        return 0

    cdef int _list_fetch(self, const char *key, size_t dlen, uint32_t exp, uint32_t vb, uint32_t h,
                         uint64_t kh, uint8_t flags_only) except -1:
        cdef Fetch *e = fq_push(&self._fq)
        if e == NULL:
            raise MemoryError()
        e.key_hash = kh
        e.exp = exp
        e.vb = vb
        e.hash = h
        e.klen = <uint16_t>dlen
        e.answered = 0
        e.flags_only = flags_only
        memcpy(e.key, key, dlen)
        if self.check_duplicates and ks_add(&self._fq_keys, self._fq.first + fq_count(&self._fq) - 1, h,
                                            self._fq.first + self._fq_sent) < 0:
            raise MemoryError()
        return 0

    cdef int _requeue_fetch(self, const char *key, size_t dlen, uint32_t exp, uint32_t vb, uint32_t h,
                            uint64_t kh, uint8_t flags_only) except -1:
        """Queue again a fetch that waited (deferred, or asked for flags alone), unless its key
        was listed again meanwhile: the one queued fetch then reads the latest copy."""
        if self.check_duplicates and ks_find(&self._fq_keys, &self._fq, h, key, dlen, self._fq.first + self._fq_sent):
            self.duplicates += 1
            return 0
        return self._list_fetch(key, dlen, exp, vb, h, kh, flags_only)

    cdef int _release_deferred(self, size_t room) except -1:
        """Queue the deferred fetches that are due (or, once the listing ended, any) while
        fewer than ``room`` fetches wait unsent; and the oldest past DEFER_BYTES whatever
        the room."""
        cdef DRec d
        cdef const char *p
        while self._dq_count:
            p = self._dq.data + self._dq.head
            memcpy(&d, p, sizeof(DRec))
            if not (self._dq.len - self._dq.head > DEFER_BYTES
                    or (fq_count(&self._fq) - self._fq_sent < room
                        and (self._md_ended or self._finished or d.due <= self._listed))):
                break
            self._dq.head += sizeof(DRec) + d.klen
            self._dq_count -= 1
            if d.has_flags and self._known(d.key_hash, d.flags):
                self._listed_kept(d.vb, d.size)
                continue
            # Noted meanwhile: first ask the source for the flags alone; the value follows only
            # if this copy turns out newer than the note.
            self._requeue_fetch(p + sizeof(DRec), d.klen, d.exp, d.vb, d.hash, d.key_hash, self._noted(d.key_hash))
        if self._dq_count == 0:
            self._dq.head = self._dq.len = 0
            if self._dq.cap > KEEP_EMPTY_BUF:
                buf_free(&self._dq)
        return 0

    cdef bint _metadump_line(self, const char *line, size_t n, uint64_t offset) except -1:
        cdef const char *p
        cdef const char *f
        cdef const char *start
        cdef const char *digits
        cdef const char *lend = line + n
        cdef const char *rest = lend
        cdef size_t dlen = 0
        cdef bint found = False, neg
        cdef int bad_escape = 0
        cdef uint64_t val
        cdef int64_t exp = 0
        if n >= 4 and memcmp(line, astaire_key_eq, 4) == 0:
            # One pass over the line. The key (tens of bytes) is decoded into its lane's slot
            # while its end, the first space, is looked for, sixteen bytes at a time between
            # escapes; past C_MAX_KEY decoded bytes it is only counted. A bad escape is
            # remembered, not raised: a bad exp is reported first.
            p = md_key(line + 4, lend, &self._mdkeys[self._mdn * C_MAX_KEY], C_MAX_KEY, &dlen, &bad_escape)
            # The fields after the key are a few bytes each and are scanned inline (a memchr
            # call per field cost more than the scan); memcached lists exp first. Its digits
            # are read eight at a time: leading zeros skipped, more than ten significant
            # digits is past 0xFFFFFFFF, so no digit needs an overflow check.
            if p < lend:
                f = p + 1
                while True:
                    if lend - f >= 4 and memcmp(f, astaire_exp_eq, 4) == 0:
                        f += 4
                        neg = f < lend and f[0] == CH_MINUS
                        if neg:
                            f += 1
                        start = f
                        while f < lend and f[0] == CH_0:
                            f += 1
                        digits = f
                        f = md_digits(f, lend, &val)  # wraps only past 19 digits, refused below
                        if f == start or (f < lend and f[0] != CH_SP):
                            raise CrawlerError("bad exp in metadump line", offset)
                        found = f - digits <= 10 and val <= 0xFFFFFFFFu and (not neg or val <= 1)
                        exp = -<int64_t>val if neg else <int64_t>val
                        rest = f  # the fields after exp: a deferring stream reads size= there
                        break
                    while f < lend and f[0] != CH_SP:
                        f += 1
                    if f >= lend:
                        break
                    f += 1
            if not found:
                raise CrawlerError("metadump line without a valid exp", offset)
            if bad_escape:
                raise CrawlerError("bad %-escape in metadump key", offset)
            if dlen == 0 or dlen > C_MAX_KEY:
                raise CrawlerError("bad key in metadump line", offset)
            if exp < 0:
                exp = 0
            self._mdlen[self._mdn] = <uint16_t>dlen
            self._mdexp[self._mdn] = <uint32_t>exp
            self._mdrest[self._mdn] = rest
            self._mdlinelen[self._mdn] = <uint16_t>(n + 1)
            self._mdhasflags[self._mdn] = False
            if (self._settled != NULL and self._md_lists_flags != 2
                    and listed_flags(rest, lend - rest, &self._mdflags[self._mdn])):
                # Listed flags are checked against the settled table when the lanes are
                # flushed: the table entry, a cache miss (the other workers write the table),
                # is fetched now, while the next lines are parsed.
                self._mdhasflags[self._mdn] = True
                self._mdkh[self._mdn] = c_key_hash64(self._mdkeys + self._mdn * C_MAX_KEY, dlen)
                prefetch(self._entry(self._mdkh[self._mdn]))
            if self._md_lists_flags == 0:  # a server lists flags on every line or on none
                self._md_lists_flags = 1 if self._mdhasflags[self._mdn] else 2
            self._mdrestlen[self._mdn] = <uint16_t>(lend - rest)
            self._mdn += 1
            if self._mdn == LANES:
                self._md_flush()
            return False
        self._md_flush()  # in order: the keys before this line first
        return _other_metadump_line(PyBytes_FromStringAndSize(line, n), offset)

    def fetch_requests(self):
        """Pending meta gets for listed keys (``mg <key> v f t q O<n>``: value, flags and
        remaining TTL in one read, misses silent), each batch closed by ``mn``. At most
        ``window`` fetches and unsettled records are in flight together."""
        self._produce_fetches()
        out = PyBytes_FromStringAndSize(self._fetch_out.data + self._fetch_out.head,
                                        self._fetch_out.len - self._fetch_out.head)
        self._fetch_out.head = self._fetch_out.len = 0
        return out

    cdef int _produce_fetches(self) except -1:
        """Append the meta gets due to ``_fetch_out`` (behind any not yet sent)."""
        cdef Py_ssize_t room = (<Py_ssize_t>self.window - <Py_ssize_t>self._fetch_in_flight
                                - <Py_ssize_t>self._backlog_n())
        cdef int r
        if self._dq_count:
            self._release_deferred(self.window)
        with nogil:
            r = self._fetch_batches_out(room)
        if r < 0:
            raise MemoryError()
        return 0

    cdef int _fetch_batches_out(self, Py_ssize_t room) noexcept nogil:
        cdef size_t n, j, queued
        cdef uint64_t seq
        cdef Fetch *e
        while room > 0 and fq_count(&self._fq) > self._fq_sent:
            queued = fq_count(&self._fq) - self._fq_sent
            n = min(<size_t>room, <size_t>self._fence_every, queued)
            if n < <size_t>self._fence_every and n < queued:
                break  # a batch at a time, as for the target: wait for room for a whole one
            if self._fq_sent == 0:
                self._inflight_first = self._fetch_seq
            seq = self._fq.first + self._fq_sent
            for j in range(n):
                if j + 2 * FETCH_PREFETCH < n:  # entries listed long ago: fetch their first two cache lines early
                    e = fq_at(&self._fq, seq + j + 2 * FETCH_PREFETCH)
                    prefetch(e)
                    prefetch(<char *>e + 64)
                if self._settled != NULL and j + FETCH_PREFETCH < n:  # and, half as far on, their table entries
                    prefetch(self._entry(fq_at(&self._fq, seq + j + FETCH_PREFETCH).key_hash))
                e = fq_at(&self._fq, seq + j)
                if e.flags_only == FETCH_WHOLE:  # a flags-only answer showed this copy newer
                    e.flags_only = 0
                elif not e.flags_only and self._noted(e.key_hash):
                    # The other replica's copy settled already: ask for the flags alone (as
                    # for a deferred fetch); the value follows only if this copy is newer.
                    e.flags_only = 1
                if emit_meta_get(&self._fetch_out, e.key, e.klen, self._fetch_seq, e.flags_only) < 0:
                    return -1
                self._fetch_seq = (self._fetch_seq + 1) & C_FENCE_MASK
            self._fq_sent += n
            if buf_reserve(&self._fetch_out, 4) < 0 or q_push(&self._fetch_batches, n) < 0:
                return -1
            memcpy(self._fetch_out.data + self._fetch_out.len, b"mn\r\n", 4)
            self._fetch_out.len += 4
            self._fetch_in_flight += n
            room -= n
        return 0

    def feed_fetch(self, data):
        """Take a chunk of the source's answers to ``fetch_requests``."""
        self._feed(data, &self._fch, IN_FETCH)

    cdef int _meta_answers(self, Buf *b) except -1:
        """Hand each whole answer in the fetch buffer to its fetch: ``VA`` (a hit: the
        record, its flags and TTL from one read), ``MN`` (the batch ended: fetches without
        an answer found no key), errors."""
        cdef const char *line
        cdef const char *nl
        cdef size_t avail, end, linelen, total, need, idx
        cdef uint64_t offset
        cdef MetaHit hit
        cdef Fetch *e
        cdef int r
        cdef time_t now = time(NULL)
        while b.head < b.len:
            line = b.data + b.head
            avail = b.len - b.head
            offset = self._fch_offset
            nl = <const char *>memchr(line, CH_NL, min(avail, <size_t>C_MAX_META_LINE))
            if nl == NULL:
                if avail >= C_MAX_META_LINE:
                    raise MalformedFrame("meta answer line too long on the fetch connection", offset)
                return 0
            end = <size_t>(nl - line)
            linelen = end - 1 if end > 0 and line[end - 1] == CH_CR else end
            total = end + 1
            if self._fetch_batches.head == self._fetch_batches.len:
                raise UnexpectedFrame(f"unexpected answer {_line_text(line, linelen)} on the fetch connection",
                                      offset)
            if linelen == 2 and line[0] == CH_M and line[1] == CH_N:
                self._batch_ended()
            elif linelen >= 3 and line[0] == CH_V and line[1] == CH_A and line[2] == CH_SP:
                r = parse_va(line, linelen, &hit)
                if r < 0:
                    raise MalformedFrame(f"bad meta get answer {_line_text(line, linelen)} on the fetch connection",
                                         offset)
                need = total + hit.vlen + 2
                if avail < need:
                    if need > self.max_body + C_MAX_META_LINE:
                        raise FrameTooLarge(f"meta get value of {hit.vlen} bytes exceeds the limit of "
                                            f"{self.max_body}", offset)
                    return 0
                if line[need - 2] != CH_CR or line[need - 1] != CH_NL:
                    raise MalformedFrame("meta get value not followed by CRLF on the fetch connection", offset)
                idx = <size_t>self._take_answer(hit.opaque, False, offset)
                e = fq_at(&self._fq, self._fq.first + idx)
                if idx + 2 * FETCH_PREFETCH < self._fq_sent:
                    prefetch(fq_at(&self._fq, self._fq.first + idx + 2 * FETCH_PREFETCH))
                if self._settled != NULL and idx + FETCH_PREFETCH < self._fq_sent:
                    prefetch(self._entry(fq_at(&self._fq, self._fq.first + idx + FETCH_PREFETCH).key_hash))
                if self._accept(e.key, e.klen, line + total, hit.vlen, hit.flags, read_expiry(e.exp, hit.ttl, now),
                                e.vb, need, e.key_hash) < 0:
                    raise MemoryError()
                total = need
            elif linelen >= 3 and line[0] == CH_H and line[1] == CH_D and line[2] == CH_SP:
                if parse_hd(line, linelen, &hit) < 0:
                    raise MalformedFrame(f"bad meta get answer {_line_text(line, linelen)} on the fetch connection",
                                         offset)
                idx = <size_t>self._take_answer(hit.opaque, True, offset)
                if idx + 2 * FETCH_PREFETCH < self._fq_sent:
                    prefetch(fq_at(&self._fq, self._fq.first + idx + 2 * FETCH_PREFETCH))
                if self._settled != NULL and idx + FETCH_PREFETCH < self._fq_sent:
                    prefetch(self._entry(fq_at(&self._fq, self._fq.first + idx + FETCH_PREFETCH).key_hash))
                self._flags_answer(fq_at(&self._fq, self._fq.first + idx), hit.flags, total)
            elif linelen >= 12 and (memcmp(line, b"CLIENT_ERROR", 12) == 0 or memcmp(line, b"SERVER_ERROR", 12) == 0):
                self.failed += 1  # the fetch it answered stays unanswered: its batch's MN counts it
                self.last_error = f"meta get failed on the fetch connection: {_line_text(line, linelen)}"
            elif linelen == 5 and memcmp(line, b"ERROR", 5) == 0:
                raise UnexpectedFrame("the source refused a meta get (ERROR): no meta commands", offset)
            else:
                raise UnexpectedFrame(f"unexpected answer {_line_text(line, linelen)} on the fetch connection",
                                      offset)
            b.head += total
            self._fch_offset += total
        return 0

    cdef inline Py_ssize_t _take_answer(self, uint32_t opaque, bint flags_only, uint64_t offset) except -1:
        """The in-flight fetch an answer with ``opaque`` is for (its index from the front),
        marked answered; an opaque of no fetch awaiting this kind of answer is a protocol error."""
        cdef size_t idx = (opaque - self._inflight_first) & C_FENCE_MASK
        cdef Fetch *e
        if (idx >= (self._fetch_batches.data[self._fetch_batches.head] & 0xFFFFFFFFu)
                or fq_at(&self._fq, self._fq.first + idx).answered
                or (flags_only and not fq_at(&self._fq, self._fq.first + idx).flags_only)):
            raise UnexpectedFrame(f"meta get answer with unexpected opaque {opaque} on the fetch connection", offset)
        e = fq_at(&self._fq, self._fq.first + idx)
        if e.flags_only and not flags_only:
            raise UnexpectedFrame(f"a value for the flags-only meta get {opaque} on the fetch connection", offset)
        e.answered = 1
        self._front_answered += 1
        self._fetch_in_flight -= 1
        return <Py_ssize_t>idx

    cdef inline void _kept_on_flags(self, uint32_t vb, uint64_t size) noexcept nogil:
        """A crawler copy whose flags (answered alone, or listed) are not newer than the
        table's note is settled as kept; no value travelled (``size``: the bytes that
        carried the flags)."""
        self._count_entry(vb, size)
        self.deduplicated += 1
        self.kept += 1

    cdef inline void _listed_kept(self, uint32_t vb, uint64_t size) noexcept nogil:
        """A copy listed with flags not newer than the note: kept without a fetch (``size``:
        its listing line's bytes)."""
        self._kept_on_flags(vb, size)
        self.kept_as_listed += 1

    cdef int _flags_answer(self, Fetch *e, uint32_t flags, size_t size) except -1:
        """A flags-only fetch's answer: a copy not newer than the note is settled as kept, as
        the Writer's records are (no value travelled); a newer one is fetched again whole."""
        cdef Fetch f
        if self._known(e.key_hash, flags):
            self._kept_on_flags(e.vb, size)
            return 0
        self.refetched += 1
        memcpy(&f, e, sizeof(Fetch))  # the queue may move when it grows
        return self._requeue_fetch(f.key, f.klen, f.exp, f.vb, f.hash, f.key_hash, FETCH_WHOLE)

    cdef void _batch_ended(self) noexcept nogil:
        cdef size_t n = <size_t>(self._fetch_batches.data[self._fetch_batches.head] & 0xFFFFFFFFu)
        cdef size_t j
        self.vanished += n - self._front_answered
        self._fetch_in_flight -= n - self._front_answered
        for j in range(n):
            fq_pop(&self._fq)
        self._fq_sent -= n
        self._inflight_first = (self._inflight_first + <uint32_t>n) & C_FENCE_MASK
        q_pop(&self._fetch_batches)
        self._front_answered = 0


cdef object _line_text(const char *line, size_t n):
    return repr(PyBytes_FromStringAndSize(line, min(n, <size_t>120)))


cdef struct MetaHit:
    size_t vlen
    uint32_t flags
    int64_t ttl
    uint32_t opaque


cdef inline uint32_t read_expiry(uint32_t listed, int64_t ttl, time_t now) noexcept nogil:
    """The expiry to store for a record whose remaining TTL (-1: none) came with its value.
    The listing's absolute expiry is exact, but the record may have changed since it was
    listed: it is kept only when the read agrees with it within memcached's one-second
    clock (2 s: both ends may lag); otherwise the read decides (ttl_expiry)."""
    cdef int64_t d
    if ttl >= 0 and listed != 0:
        d = <int64_t>listed - (<int64_t>now + ttl)
        if -EXPIRY_SLACK <= d <= EXPIRY_SLACK:
            return listed
    return ttl_expiry(ttl, now)


cdef inline uint32_t ttl_expiry(int64_t ttl, time_t now) noexcept nogil:
    """The expiry to store for a remaining TTL read with the value (-1: none). Up to 30 days
    it stays relative, as memcached reads such an expiry: the target's clock then counts
    the same seconds the source's did (an absolute time would add both servers' clock lag).
    0 (expiring this second) becomes 1, since a relative 0 means never."""
    if ttl < 0:
        return 0
    if ttl == 0:
        return 1
    if ttl <= RELATIVE_EXPIRY_MAX:
        return <uint32_t>ttl
    return <uint32_t>(now + ttl)


cdef inline const char *scan_num(const char *p, const char *end, bint signed, int64_t *out) noexcept nogil:
    """The number (1-12 decimal digits, leading zeros counted, after a ``-`` if ``signed``)
    from ``p`` to the next space or ``end``: the pointer after it, or NULL when it is not a
    number (as ``_tap_py._number``). The digits are read eight at a time (md_digits)."""
    cdef bint neg = False
    cdef uint64_t v = 0
    cdef const char *start
    if signed and p < end and p[0] == CH_MINUS:
        neg = True
        p += 1
    start = p
    p = md_digits(p, end, &v)  # exact: more than 12 digits are refused, and 19 would not wrap
    if p == start or (p < end and p[0] != CH_SP) or p - start > 12:
        return NULL
    out[0] = -<int64_t>v if neg else <int64_t>v
    return p


cdef int meta_tokens(const char *p, const char *end, MetaHit *hit) noexcept nogil:
    """The return flags of a meta answer from ``p`` (at a space) to ``end``: ``f<flags>``,
    ``t<ttl>``, ``O<opaque>`` in any order, others skipped. The bits seen (1 f, 2 t, 4 O), or
    -1 for a bad number."""
    cdef int64_t v
    cdef int seen = 0
    cdef char c
    while p < end:
        p += 1  # the space
        if p == end:
            break
        c = p[0]
        if c == CH_f or c == CH_O:  # 32-bit unsigned: the flags, the opaque
            p = scan_num(p + 1, end, False, &v)
            if p == NULL or v > <int64_t>0xFFFFFFFFu:
                return -1
            if c == CH_f:
                hit.flags = <uint32_t>v
                seen |= 1
            else:
                hit.opaque = <uint32_t>v
                seen |= 4
        elif c == CH_t:
            p = scan_num(p + 1, end, True, &v)
            if p == NULL or v < -1:
                return -1
            hit.ttl = v
            seen |= 2
        else:
            while p < end and p[0] != CH_SP:  # a flag not asked for, or an empty token
                p += 1
    return seen


cdef int parse_va(const char *line, size_t n, MetaHit *hit) noexcept nogil:
    """``VA <len> f<flags> t<ttl> O<opaque>`` (return flags in any order): 0, or -1."""
    cdef const char *end = line + n
    cdef const char *p
    cdef int64_t v
    p = scan_num(line + 3, end, False, &v)
    if p == NULL:
        return -1
    hit.vlen = <size_t>v
    return 0 if meta_tokens(p, end, hit) == 7 else -1


cdef uint64_t listed_size(const char *f, size_t n) noexcept nogil:
    """The ``size=`` of a metadump line's fields ``f`` (after exp; lenient, a hint: 0 when
    there is none, leading digits only, at most 0xFFFFFFFF). Read from the line's end, where
    memcached puts it (last; from 1.6.24 ``flags=`` follows): the last ``size=`` counts."""
    cdef const char *e = f + n
    cdef const char *s
    cdef uint64_t size = 0
    while e > f:
        if (e - 1)[0] == CH_SP:
            e -= 1
            continue
        s = e - 1
        while s > f and (s - 1)[0] != CH_SP:
            s -= 1
        if e - s > 5 and memcmp(s, b"size=", 5) == 0:
            s += 5
            while s < e and s[0] >= CH_0 and s[0] <= CH_9 and size < 0xFFFFFFFFu:
                size = size * 10 + <uint64_t>(s[0] - CH_0)
                s += 1
            return min(size, <uint64_t>0xFFFFFFFFu)
        e = s
    return 0


cdef bint listed_flags(const char *f, size_t n, uint32_t *flags) noexcept nogil:
    """The flags a metadump line lists (``flags=``, memcached 1.6.24 on, the line's last
    field) in its fields ``f`` after exp, into ``*flags``; False if the last field is not
    ``flags=`` with 1-10 ASCII digits up to 0xFFFFFFFF (the copy is then fetched as without
    it). Only the last field is looked at: a line without flags costs one short scan."""
    cdef const char *e = f + n
    cdef const char *s
    cdef uint64_t v = 0
    while e > f and (e - 1)[0] == CH_SP:
        e -= 1
    s = e
    while s > f and (s - 1)[0] != CH_SP:
        s -= 1
    if e - s < 7 or e - s > 16 or memcmp(s, b"flags=", 6) != 0:
        return False
    s += 6
    while s < e:
        if s[0] < CH_0 or s[0] > CH_9:
            return False
        v = v * 10 + <uint64_t>(s[0] - CH_0)
        s += 1
    if v > 0xFFFFFFFFu:
        return False
    flags[0] = <uint32_t>v
    return True


cdef int parse_hd(const char *line, size_t n, MetaHit *hit) noexcept nogil:
    """``HD f<flags> O<opaque>`` (a flags-only meta get's hit; return flags in any order):
    0, or -1."""
    cdef int seen = meta_tokens(line + 2, line + n, hit)
    return 0 if seen >= 0 and seen & 5 == 5 else -1


cdef int emit_meta_get(Buf *out, const char *key, size_t klen, uint32_t opaque, bint flags_only) noexcept nogil:
    """``mg <key> v f t q O<opaque>\r\n`` (``mg <key> f q O<opaque>`` for the flags alone); a
    key the text protocol cannot carry (a space, a control byte) goes base64-encoded with the
    ``b`` flag."""
    cdef size_t i, j
    cdef char *p
    cdef char digits[12]
    cdef int nd = 0
    cdef uint32_t v
    cdef bint b64 = not text_key(key, klen)
    if buf_reserve(out, 3 + (klen + 2) // 3 * 4 + 32) < 0:
        return -1
    p = out.data + out.len
    memcpy(p, b"mg ", 3)
    p += 3
    if b64:
        i = 0
        while i < klen:
            v = <uint32_t>(<uint8_t>key[i]) << 16
            if i + 1 < klen:
                v |= <uint32_t>(<uint8_t>key[i + 1]) << 8
            if i + 2 < klen:
                v |= <uint8_t>key[i + 2]
            p[0] = B64[(v >> 18) & 63]
            p[1] = B64[(v >> 12) & 63]
            p[2] = B64[(v >> 6) & 63] if i + 1 < klen else CH_EQ
            p[3] = B64[v & 63] if i + 2 < klen else CH_EQ
            p += 4
            i += 3
        memcpy(p, b" b", 2)
        p += 2
    else:
        memcpy(p, key, klen)
        p += klen
    if flags_only:
        memcpy(p, b" f q O", 6)
        p += 6
    else:
        memcpy(p, b" v f t q O", 10)
        p += 10
    v = opaque
    while True:
        digits[nd] = <char>(CH_0 + v % 10)
        nd += 1
        v //= 10
        if v == 0:
            break
    for j in range(nd):
        p[j] = digits[nd - 1 - j]
    p += nd
    p[0] = CH_CR
    p[1] = CH_NL
    p += 2
    out.len = <size_t>(p - out.data)
    return 0


def _other_metadump_line(line, offset):
    """A metadump line that lists no key: END (True), OK (False) or an error."""
    if line == b"END":
        return True
    if line == b"OK":
        return False
    if line == b"BUSY" or line.startswith(b"BUSY "):
        raise CrawlerBusy(f"crawler busy: {line[:200].decode('utf-8', 'replace')}", offset)
    if line == b"ERROR" or line.startswith((b"ERROR ", b"CLIENT_ERROR", b"SERVER_ERROR")):
        raise CrawlerError(f"crawler error: {line[:200].decode('utf-8', 'replace')}", offset)
    raise CrawlerError(f"unparseable metadump line: {line[:200].decode('utf-8', 'replace')}", offset)



# -- the stream's I/O loop, its hot part -----------------------------------------------

cdef extern from "<poll.h>" nogil:
    cdef struct pollfd:
        int fd
        short events
        short revents
    int c_poll "poll"(pollfd *fds, unsigned long nfds, int timeout)
    enum:
        POLLIN
        POLLOUT
        POLLERR
        POLLHUP
        POLLNVAL

cdef extern from "<sys/socket.h>" nogil:
    ssize_t c_recv "recv"(int fd, void *buf, size_t n, int flags)
    ssize_t c_send "send"(int fd, const void *buf, size_t n, int flags)
    enum:
        MSG_NOSIGNAL

cdef extern from "<errno.h>" nogil:
    int errno
    enum:
        EINTR
        EAGAIN

cdef extern from "<time.h>" nogil:
    cdef struct timespec:
        long tv_sec
        long tv_nsec
    int clock_gettime(int clk, timespec *ts)
    int nanosleep(const timespec *req, timespec *rem)
    enum:
        CLOCK_MONOTONIC

from cpython.exc cimport PyErr_CheckSignals, PyErr_SetFromErrno

cdef enum:
    # Why Pump.run returned (twins in _tap_py; the stream's loop acts on each).
    C_PUMP_TIMEOUT = 0      # the deadline passed
    C_PUMP_DONE = 1         # the source had ended, the Writer is done and nothing is left to send
    C_PUMP_SOURCE = 2       # the source is readable and the caller reads it (the crawler's metadump)
    C_PUMP_SIGNAL = 3       # a signal interrupted the wait; its Python handler has run
    C_PUMP_SPOOL = 4        # a batch of fetches' room opened while the caller has listing text waiting
    C_PUMP_SOURCE_EOF = 5   # the TAP source closed its stream
    C_PUMP_TARGET_EOF = 6   # the target closed the connection
    C_PUMP_FETCH_EOF = 7    # the crawler's fetch connection closed
    C_PUMP_SOURCE_END = 8   # the crawler's listing ended (its END line was fed to the Writer)
    # Pump.run's src_mode
    C_SRC_NONE = 0          # do not watch the source
    C_SRC_TAP = 1           # read the TAP source here, when the Writer has room
    C_SRC_CALLER = 2        # watch the source; the caller reads it
    C_SRC_LISTING = 3       # a crawler's listing: read here into the Writer while it has room for
                            # fetches and the caller spools none; else the caller reads it (SOURCE)
    PUMP_CHUNK = 512 * 1024   # one recv: few syscalls
    TRICKLE_BYTES = 8192      # a target read smaller than this is followed by TRICKLE_NS of sleep,
    TRICKLE_NS = 500000       # so the answers of the Clearwater fork (one write each) arrive in larger reads

PUMP_TIMEOUT, PUMP_DONE, PUMP_SOURCE, PUMP_SIGNAL = C_PUMP_TIMEOUT, C_PUMP_DONE, C_PUMP_SOURCE, C_PUMP_SIGNAL
PUMP_SPOOL, PUMP_SOURCE_EOF, PUMP_TARGET_EOF, PUMP_FETCH_EOF = (C_PUMP_SPOOL, C_PUMP_SOURCE_EOF, C_PUMP_TARGET_EOF,
                                                                C_PUMP_FETCH_EOF)
PUMP_SOURCE_END = C_PUMP_SOURCE_END
PUMP_SRC_NONE, PUMP_SRC_TAP, PUMP_SRC_CALLER, PUMP_SRC_LISTING = C_SRC_NONE, C_SRC_TAP, C_SRC_CALLER, C_SRC_LISTING


cdef inline double monotonic() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <double>ts.tv_sec + <double>ts.tv_nsec * 1e-9


@cython.final
cdef class Pump:
    """The hot part of a stream's I/O loop (``astaire.resync.stream``), in C: it moves bytes
    between the target's socket, the crawler's fetch socket and a TAP source's socket and
    the Writer, sending straight from the Writer's buffers and reading into its own, until
    the caller has something to do (``run``'s codes, PUMP_*). The caller owns the sockets
    (non-blocking; it closes them), reads a crawler's listing while it has some spooled or
    the Writer's fetches fill the window (PUMP_SRC_LISTING: the Pump reads it otherwise),
    and does the timeouts, progress and stopping between calls.

    Flow control, as the caller's loop had it: the source (and a crawler's fetch answers)
    are read only while the Writer holds fewer than ``window`` unsettled records and
    ``window_bytes`` of them, and fewer than ``max_pending_out`` bytes wait for the target.

    After an exception from ``run`` (an ``OSError`` from a socket, a protocol error from
    the Writer), ``peer`` says whose it was ("target", "fetch" or "source") and, for an
    OSError, ``op`` whether it was a "send" or a "recv"."""

    cdef Writer w
    cdef int _tfd, _ffd
    cdef uint64_t window_bytes, max_pending_out
    cdef char *_tbuf
    cdef char *_fbuf
    cdef char *_sbuf
    cdef bint _trickle
    cdef readonly double last_progress
    cdef readonly uint64_t target_reads, target_bytes_read, fetch_reads, fetch_bytes_read
    cdef readonly uint64_t source_reads, source_bytes_read
    cdef readonly str peer
    cdef readonly str op

    def __init__(self, Writer writer not None, int target_fd, int fetch_fd=-1, window_bytes=1024 * 1024,
                 max_pending_out=1024 * 1024):
        if target_fd < 0:
            raise ValueError("target_fd must be a file descriptor")
        if window_bytes < 1 or max_pending_out < 1:
            raise ValueError("window_bytes and max_pending_out must be at least 1")
        self.w = writer
        self._tfd = target_fd
        self._ffd = fetch_fd
        self.window_bytes = window_bytes
        self.max_pending_out = max_pending_out
        self.last_progress = monotonic()
        self.peer = self.op = ""

    def __dealloc__(self):
        free(self._tbuf)
        free(self._fbuf)
        free(self._sbuf)

    @property
    def target_pending(self):
        """Bytes the Writer wants sent to the target that the socket has not taken yet."""
        return self.w._out.len - self.w._out.head

    @property
    def fetch_pending(self):
        """Meta gets not yet taken by the fetch socket."""
        return self.w._fetch_out.len - self.w._fetch_out.head

    cdef inline bint _room(self) noexcept:
        cdef Writer w = self.w
        return (w._backlog_n() < w.window and w._backlog_bytes < self.window_bytes
                and w._out.len - w._out.head < self.max_pending_out)

    cdef int _send(self, int fd, Buf *b, str who) except -1:
        """Send what ``b`` holds from its head as far as the socket takes it."""
        cdef ssize_t n
        while b.head < b.len:
            with nogil:
                n = c_send(fd, b.data + b.head, b.len - b.head, MSG_NOSIGNAL)
            if n < 0:
                if errno == EINTR:
                    continue
                if errno == EAGAIN:  # EWOULDBLOCK is EAGAIN on Linux
                    break
                self.peer, self.op = who, "send"
                PyErr_SetFromErrno(OSError)
                return -1
            b.head += <size_t>n
            self.last_progress = monotonic()
        if b.head == b.len:
            b.head = b.len = 0
            if b.cap > KEEP_EMPTY_BUF:  # do not keep a burst's worth of memory
                buf_free(b)
        return 0

    cdef ssize_t _take(self, int fd, char **buf, str who, Buf *own, int kind,
                       uint64_t *reads, uint64_t *nbytes) except -2:
        """One read into ``*buf`` (allocated on first use), fed to the Writer as ``kind``
        (its cut tail kept in ``own``): bytes read, 0 at EOF, -1 when nothing is ready."""
        cdef ssize_t n
        if buf[0] == NULL:
            buf[0] = <char *>malloc(PUMP_CHUNK)
            if buf[0] == NULL:
                raise MemoryError()
        while True:
            with nogil:
                n = c_recv(fd, buf[0], PUMP_CHUNK, 0)
            if n >= 0:
                break
            if errno == EINTR:
                continue
            if errno == EAGAIN:  # EWOULDBLOCK is EAGAIN on Linux
                return -1
            self.peer, self.op = who, "recv"
            PyErr_SetFromErrno(OSError)
            return -2
        self.last_progress = monotonic()
        if n > 0:
            reads[0] += 1
            nbytes[0] += <uint64_t>n
            self.peer = who
            self.w._feed_ptr(buf[0], <size_t>n, own, kind)
            self.peer = ""
        return n

    def run(self, double timeout, int src_fd=-1, int src_mode=C_SRC_NONE, bint src_ended=False,
            bint spool_waiting=False):
        """Move bytes until there is something for the caller, at most ``timeout`` seconds;
        returns a PUMP_* code. ``src_fd`` / ``src_mode``: the source's socket and how it is
        watched (PUMP_SRC_*). ``src_ended``: the source has ended (DONE can be reached).
        ``spool_waiting``: the caller holds listing text for the Writer (SPOOL is returned
        once a batch of fetches fits)."""
        cdef Writer w = self.w
        cdef pollfd fds[3]
        cdef int nfds, fi, si, ms, r
        cdef bint room
        cdef ssize_t n
        cdef double now, deadline = monotonic() + timeout
        cdef timespec nap
        self.peer = self.op = ""
        while True:
            if self._ffd >= 0 and w._backlog_bytes < self.window_bytes:  # fetched values become backlog
                w._produce_fetches()
                if w._fetch_out.head < w._fetch_out.len:
                    self._send(self._ffd, &w._fetch_out, "fetch")
            w._produce_target()
            if w._out.head < w._out.len:
                self._send(self._tfd, &w._out, "target")
            if src_ended and w.done:
                return C_PUMP_DONE
            if spool_waiting and w._fetch_backlog_n() + w._fence_every <= w.window:
                return C_PUMP_SPOOL
            fds[0].fd = self._tfd  # the target is always fds[0]
            fds[0].events = POLLIN | (POLLOUT if w._out.head < w._out.len else 0)
            nfds = 1
            fi = si = -1
            room = self._room()
            if self._ffd >= 0:
                fds[nfds].fd = self._ffd
                fds[nfds].events = ((POLLIN if room else 0)
                                    | (POLLOUT if w._fetch_out.head < w._fetch_out.len else 0))
                fi = nfds
                nfds += 1
            if src_fd >= 0 and (src_mode == C_SRC_CALLER or src_mode == C_SRC_LISTING
                                or (src_mode == C_SRC_TAP and room)):
                fds[nfds].fd = src_fd
                fds[nfds].events = POLLIN
                si = nfds
                nfds += 1
            if self._trickle:
                # The last answers came a few at a time (the Clearwater fork writes each
                # response on its own): let them gather rather than wake per handful.
                self._trickle = False
                nap.tv_sec = 0
                nap.tv_nsec = TRICKLE_NS
                with nogil:
                    nanosleep(&nap, NULL)
            now = monotonic()
            if now >= deadline:
                return C_PUMP_TIMEOUT
            ms = <int>(min(deadline - now, 3600.0) * 1000.0) + 1
            with nogil:
                r = c_poll(fds, nfds, ms)
            if r < 0:
                if errno == EINTR:
                    PyErr_CheckSignals()  # runs the Python handlers; raises what they raise
                    return C_PUMP_SIGNAL
                PyErr_SetFromErrno(OSError)
                return -1
            if r == 0:
                continue  # the deadline is checked above
            if fds[0].revents & POLLOUT:
                self._send(self._tfd, &w._out, "target")
            if fi >= 0 and fds[fi].revents & POLLOUT:
                self._send(self._ffd, &w._fetch_out, "fetch")
            if fds[0].revents & (POLLIN | POLLERR | POLLHUP | POLLNVAL):
                n = self._take(self._tfd, &self._tbuf, "target", &w._tgt, IN_TARGET,
                               &self.target_reads, &self.target_bytes_read)
                if n == 0:
                    return C_PUMP_TARGET_EOF
                self._trickle = 0 < n < TRICKLE_BYTES
            if fi >= 0 and fds[fi].revents & (POLLIN | POLLERR | POLLHUP | POLLNVAL):
                if self._take(self._ffd, &self._fbuf, "fetch", &w._fch, IN_FETCH,
                              &self.fetch_reads, &self.fetch_bytes_read) == 0:
                    return C_PUMP_FETCH_EOF
            if si >= 0 and fds[si].revents & (POLLIN | POLLERR | POLLHUP | POLLNVAL):
                if src_mode == C_SRC_CALLER:
                    return C_PUMP_SOURCE
                if src_mode == C_SRC_LISTING:
                    if spool_waiting or w._fetch_backlog_n() >= <size_t>w.window:
                        return C_PUMP_SOURCE  # the text must wait: the caller spools it
                    w._listing_starts()
                    n = self._take(src_fd, &self._sbuf, "source", &w._md, IN_METADUMP,
                                   &self.source_reads, &self.source_bytes_read)
                    if n == 0:
                        return C_PUMP_SOURCE_EOF
                    if w._md_ended:
                        return C_PUMP_SOURCE_END
                    continue
                if self._take(src_fd, &self._sbuf, "source", &w._src, IN_TAP,
                              &self.source_reads, &self.source_bytes_read) == 0:
                    return C_PUMP_SOURCE_EOF

__all__ = ["MODE_ADDQ", "MODE_READ", "MODE_AUTO", "WRITER_MODES", "Writer", "key_hash64", "Pump", "PUMP_TIMEOUT", "PUMP_DONE",
           "PUMP_SOURCE", "PUMP_SIGNAL", "PUMP_SPOOL", "PUMP_SOURCE_EOF", "PUMP_TARGET_EOF", "PUMP_FETCH_EOF",
           "PUMP_SOURCE_END", "PUMP_SRC_NONE", "PUMP_SRC_TAP", "PUMP_SRC_CALLER", "PUMP_SRC_LISTING"]
