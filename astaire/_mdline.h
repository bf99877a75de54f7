/* A metadump line's key and exp, read a vector or a word at a time: the scanners of the
 * compiled Writer's one-pass line parse (astaire/_writer.pyx, Writer._metadump_line); and
 * the check of a key for the text protocol (emit_meta_get).
 *
 * Each gives what a byte-at-a-time loop gives (tests/test_mdline.py holds both against the
 * plain loops on random input). Everything is static inline and touches no Python object.
 */
#ifndef ASTAIRE_MDLINE_H_INCLUDED
#define ASTAIRE_MDLINE_H_INCLUDED

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif
static inline int astaire_hexval(unsigned char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}
/* The key memcached lists (URI-escaped) from p to its end, the first space or lend:
   decoded into dst, of which at most cap bytes are stored (past that only counted).
   Returns the end; *dlen_out gets the decoded length. A bad escape sets *bad and the end
   is then the next space (or lend). Runs between escapes are found and copied sixteen
   bytes at a time (the store may write past the run inside dst's cap: the key's length
   says where it ends). */
static inline const char *astaire_md_key(const char *p, const char *lend, char *dst, size_t cap,
                                         size_t *dlen_out, int *bad) {
    size_t dlen = 0;
    int hi, lo;
#if defined(__SSE2__)
    const __m128i sp = _mm_set1_epi8(' '), pct = _mm_set1_epi8('%');
#endif
    for (;;) {
#if defined(__SSE2__)
        while (lend - p >= 16) {
            __m128i v = _mm_loadu_si128((const __m128i *)p);
            unsigned m = (unsigned)_mm_movemask_epi8(_mm_or_si128(_mm_cmpeq_epi8(v, sp), _mm_cmpeq_epi8(v, pct)));
            unsigned k = m ? (unsigned)__builtin_ctz(m) : 16u;
            if (dlen + 16 <= cap)
                _mm_storeu_si128((__m128i *)(dst + dlen), v);
            else if (dlen < cap)
                memcpy(dst + dlen, p, (cap - dlen < k) ? cap - dlen : k);
            p += k;
            dlen += k;
            if (m)
                goto special;
        }
#endif
        while (p < lend && *p != ' ' && *p != '%') {
            if (dlen < cap)
                dst[dlen] = *p;
            dlen++;
            p++;
        }
#if defined(__SSE2__)
    special:
#endif
        if (p >= lend || *p == ' ')
            break;
        hi = lo = -1;  /* '%' */
        if (lend - p >= 3) {
            hi = astaire_hexval((unsigned char)p[1]);
            lo = astaire_hexval((unsigned char)p[2]);
        }
        if (hi < 0 || lo < 0) {
            *bad = 1;
            p = (const char *)memchr(p, ' ', (size_t)(lend - p));
            if (p == NULL)
                p = lend;
            break;
        }
        if (dlen < cap)
            dst[dlen] = (char)(hi * 16 + lo);
        dlen++;
        p += 3;
    }
    *dlen_out = dlen;
    return p;
}
/* The decimal digits at p (up to lend): returns their end, *val_out their value modulo
   2^64. Eight at a time where eight bytes are there to load: the bytes less '0', the
   first that is not 0-9 found by carries into bit 7, the digits before it moved to the
   word's top (zeros below are leading zeros) and combined in three multiplies. */
static inline const char *astaire_md_digits(const char *p, const char *lend, uint64_t *val_out) {
    static const uint64_t pow10[9] = {1ULL, 10ULL, 100ULL, 1000ULL, 10000ULL, 100000ULL, 1000000ULL,
                                      10000000ULL, 100000000ULL};
    uint64_t val = 0, x, t, m;
    unsigned k;
    while (lend - p >= 8) {
        memcpy(&x, p, 8);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        x = __builtin_bswap64(x);  /* p[0] in the low byte, as on x86 */
#endif
        t = x - 0x3030303030303030ULL;
        m = ((t + 0x7676767676767676ULL) | t) & 0x8080808080808080ULL;
        k = m ? (unsigned)__builtin_ctzll(m) >> 3 : 8u;
        if (k == 0)
            break;
        t <<= 8 * (8 - k);
        t = (t * 10 + (t >> 8)) & 0x00FF00FF00FF00FFULL;
        t = (t * 100 + (t >> 16)) & 0x0000FFFF0000FFFFULL;
        t = (t * 10000 + (t >> 32)) & 0xFFFFFFFFULL;
        val = val * pow10[k] + t;
        p += k;
        if (k < 8) {
            *val_out = val;
            return p;
        }
    }
    while (p < lend && (unsigned char)(*p - '0') <= 9) {
        val = val * 10 + (uint64_t)(unsigned char)(*p - '0');
        p++;
    }
    *val_out = val;
    return p;
}

/* Whether the text protocol can carry the key k[0..n) as it is: no byte is a space, a
   control byte (below 0x20) or DEL (0x7f). Sixteen bytes at a time: a byte is at most
   0x20 when the unsigned maximum of it and 0x20 is 0x20. */
static inline int astaire_text_key(const char *k, size_t n) {
    size_t i = 0;
#if defined(__SSE2__)
    const __m128i sp = _mm_set1_epi8(' '), del = _mm_set1_epi8(0x7f);
    for (; i + 16 <= n; i += 16) {
        __m128i v = _mm_loadu_si128((const __m128i *)(k + i));
        if (_mm_movemask_epi8(_mm_or_si128(_mm_cmpeq_epi8(_mm_max_epu8(v, sp), sp), _mm_cmpeq_epi8(v, del))))
            return 0;
    }
#endif
    for (; i < n; i++) {
        unsigned char c = (unsigned char)k[i];
        if (c <= ' ' || c == 0x7f)
            return 0;
    }
    return 1;
}

#endif
