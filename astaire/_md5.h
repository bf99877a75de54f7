/* _md5.h: the first 32 bits of MD5 (RFC 1321), all libmemcached's key hash needs.
 *
 * Written for Astaire after the manner of Alexander Peslyak's public-domain MD5
 * (round functions as macros, little-endian word loads, no tables) and placed in the
 * public domain likewise: there is no copyright; use it as you wish.
 *
 * Only the A word of the digest is used (vbucket_hash = digest[0:4] little-endian), so
 * the last block skips the final three steps, which change only B, C and D.
 * Everything is static inline and touches no Python object: callable without the GIL.
 */
#ifndef ASTAIRE_MD5_H_INCLUDED
#define ASTAIRE_MD5_H_INCLUDED

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define ASTAIRE_MD5_F(x, y, z) ((z) ^ ((x) & ((y) ^ (z))))
#define ASTAIRE_MD5_G(x, y, z) ((y) ^ ((z) & ((x) ^ (y))))
#define ASTAIRE_MD5_H(x, y, z) ((x) ^ (y) ^ (z))
#define ASTAIRE_MD5_I(x, y, z) ((y) ^ ((x) | ~(z)))

#define ASTAIRE_MD5_STEP(f, a, b, c, d, x, t, s) \
    (a) += ASTAIRE_MD5_##f((b), (c), (d)) + (x) + (t); \
    (a) = ((a) << (s)) | ((a) >> (32 - (s))); \
    (a) += (b);

static inline uint32_t astaire_md5_le32(const unsigned char *p)
{
#if defined(__BYTE_ORDER__) && (__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__)
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
#else
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
#endif
}

static inline void astaire_md5_load(uint32_t X[16], const unsigned char *p)
{
    int i;
    for (i = 0; i < 16; i++)
        X[i] = astaire_md5_le32(p + 4 * i);
}

/* One whole 64-byte block into the state. */
static inline void astaire_md5_block(uint32_t st[4], const unsigned char *p)
{
    uint32_t X[16];
    uint32_t a = st[0], b = st[1], c = st[2], d = st[3];
    astaire_md5_load(X, p);
    ASTAIRE_MD5_STEP(F, a, b, c, d, X[0], 0xd76aa478u, 7);
    ASTAIRE_MD5_STEP(F, d, a, b, c, X[1], 0xe8c7b756u, 12);
    ASTAIRE_MD5_STEP(F, c, d, a, b, X[2], 0x242070dbu, 17);
    ASTAIRE_MD5_STEP(F, b, c, d, a, X[3], 0xc1bdceeeu, 22);
    ASTAIRE_MD5_STEP(F, a, b, c, d, X[4], 0xf57c0fafu, 7);
    ASTAIRE_MD5_STEP(F, d, a, b, c, X[5], 0x4787c62au, 12);
    ASTAIRE_MD5_STEP(F, c, d, a, b, X[6], 0xa8304613u, 17);
    ASTAIRE_MD5_STEP(F, b, c, d, a, X[7], 0xfd469501u, 22);
    ASTAIRE_MD5_STEP(F, a, b, c, d, X[8], 0x698098d8u, 7);
    ASTAIRE_MD5_STEP(F, d, a, b, c, X[9], 0x8b44f7afu, 12);
    ASTAIRE_MD5_STEP(F, c, d, a, b, X[10], 0xffff5bb1u, 17);
    ASTAIRE_MD5_STEP(F, b, c, d, a, X[11], 0x895cd7beu, 22);
    ASTAIRE_MD5_STEP(F, a, b, c, d, X[12], 0x6b901122u, 7);
    ASTAIRE_MD5_STEP(F, d, a, b, c, X[13], 0xfd987193u, 12);
    ASTAIRE_MD5_STEP(F, c, d, a, b, X[14], 0xa679438eu, 17);
    ASTAIRE_MD5_STEP(F, b, c, d, a, X[15], 0x49b40821u, 22);
    ASTAIRE_MD5_STEP(G, a, b, c, d, X[1], 0xf61e2562u, 5);
    ASTAIRE_MD5_STEP(G, d, a, b, c, X[6], 0xc040b340u, 9);
    ASTAIRE_MD5_STEP(G, c, d, a, b, X[11], 0x265e5a51u, 14);
    ASTAIRE_MD5_STEP(G, b, c, d, a, X[0], 0xe9b6c7aau, 20);
    ASTAIRE_MD5_STEP(G, a, b, c, d, X[5], 0xd62f105du, 5);
    ASTAIRE_MD5_STEP(G, d, a, b, c, X[10], 0x02441453u, 9);
    ASTAIRE_MD5_STEP(G, c, d, a, b, X[15], 0xd8a1e681u, 14);
    ASTAIRE_MD5_STEP(G, b, c, d, a, X[4], 0xe7d3fbc8u, 20);
    ASTAIRE_MD5_STEP(G, a, b, c, d, X[9], 0x21e1cde6u, 5);
    ASTAIRE_MD5_STEP(G, d, a, b, c, X[14], 0xc33707d6u, 9);
    ASTAIRE_MD5_STEP(G, c, d, a, b, X[3], 0xf4d50d87u, 14);
    ASTAIRE_MD5_STEP(G, b, c, d, a, X[8], 0x455a14edu, 20);
    ASTAIRE_MD5_STEP(G, a, b, c, d, X[13], 0xa9e3e905u, 5);
    ASTAIRE_MD5_STEP(G, d, a, b, c, X[2], 0xfcefa3f8u, 9);
    ASTAIRE_MD5_STEP(G, c, d, a, b, X[7], 0x676f02d9u, 14);
    ASTAIRE_MD5_STEP(G, b, c, d, a, X[12], 0x8d2a4c8au, 20);
    ASTAIRE_MD5_STEP(H, a, b, c, d, X[5], 0xfffa3942u, 4);
    ASTAIRE_MD5_STEP(H, d, a, b, c, X[8], 0x8771f681u, 11);
    ASTAIRE_MD5_STEP(H, c, d, a, b, X[11], 0x6d9d6122u, 16);
    ASTAIRE_MD5_STEP(H, b, c, d, a, X[14], 0xfde5380cu, 23);
    ASTAIRE_MD5_STEP(H, a, b, c, d, X[1], 0xa4beea44u, 4);
    ASTAIRE_MD5_STEP(H, d, a, b, c, X[4], 0x4bdecfa9u, 11);
    ASTAIRE_MD5_STEP(H, c, d, a, b, X[7], 0xf6bb4b60u, 16);
    ASTAIRE_MD5_STEP(H, b, c, d, a, X[10], 0xbebfbc70u, 23);
    ASTAIRE_MD5_STEP(H, a, b, c, d, X[13], 0x289b7ec6u, 4);
    ASTAIRE_MD5_STEP(H, d, a, b, c, X[0], 0xeaa127fau, 11);
    ASTAIRE_MD5_STEP(H, c, d, a, b, X[3], 0xd4ef3085u, 16);
    ASTAIRE_MD5_STEP(H, b, c, d, a, X[6], 0x04881d05u, 23);
    ASTAIRE_MD5_STEP(H, a, b, c, d, X[9], 0xd9d4d039u, 4);
    ASTAIRE_MD5_STEP(H, d, a, b, c, X[12], 0xe6db99e5u, 11);
    ASTAIRE_MD5_STEP(H, c, d, a, b, X[15], 0x1fa27cf8u, 16);
    ASTAIRE_MD5_STEP(H, b, c, d, a, X[2], 0xc4ac5665u, 23);
    ASTAIRE_MD5_STEP(I, a, b, c, d, X[0], 0xf4292244u, 6);
    ASTAIRE_MD5_STEP(I, d, a, b, c, X[7], 0x432aff97u, 10);
    ASTAIRE_MD5_STEP(I, c, d, a, b, X[14], 0xab9423a7u, 15);
    ASTAIRE_MD5_STEP(I, b, c, d, a, X[5], 0xfc93a039u, 21);
    ASTAIRE_MD5_STEP(I, a, b, c, d, X[12], 0x655b59c3u, 6);
    ASTAIRE_MD5_STEP(I, d, a, b, c, X[3], 0x8f0ccc92u, 10);
    ASTAIRE_MD5_STEP(I, c, d, a, b, X[10], 0xffeff47du, 15);
    ASTAIRE_MD5_STEP(I, b, c, d, a, X[1], 0x85845dd1u, 21);
    ASTAIRE_MD5_STEP(I, a, b, c, d, X[8], 0x6fa87e4fu, 6);
    ASTAIRE_MD5_STEP(I, d, a, b, c, X[15], 0xfe2ce6e0u, 10);
    ASTAIRE_MD5_STEP(I, c, d, a, b, X[6], 0xa3014314u, 15);
    ASTAIRE_MD5_STEP(I, b, c, d, a, X[13], 0x4e0811a1u, 21);
    ASTAIRE_MD5_STEP(I, a, b, c, d, X[4], 0xf7537e82u, 6);
    ASTAIRE_MD5_STEP(I, d, a, b, c, X[11], 0xbd3af235u, 10);
    ASTAIRE_MD5_STEP(I, c, d, a, b, X[2], 0x2ad7d2bbu, 15);
    ASTAIRE_MD5_STEP(I, b, c, d, a, X[9], 0xeb86d391u, 21);
    st[0] += a;
    st[1] += b;
    st[2] += c;
    st[3] += d;
}

/* The last block: returns the final A word only (steps 62-64 do not touch A). */
static inline uint32_t astaire_md5_last(const uint32_t st[4], const unsigned char *p)
{
    uint32_t X[16];
    uint32_t a = st[0], b = st[1], c = st[2], d = st[3];
    astaire_md5_load(X, p);
    ASTAIRE_MD5_STEP(F, a, b, c, d, X[0], 0xd76aa478u, 7);
    ASTAIRE_MD5_STEP(F, d, a, b, c, X[1], 0xe8c7b756u, 12);
    ASTAIRE_MD5_STEP(F, c, d, a, b, X[2], 0x242070dbu, 17);
    ASTAIRE_MD5_STEP(F, b, c, d, a, X[3], 0xc1bdceeeu, 22);
    ASTAIRE_MD5_STEP(F, a, b, c, d, X[4], 0xf57c0fafu, 7);
    ASTAIRE_MD5_STEP(F, d, a, b, c, X[5], 0x4787c62au, 12);
    ASTAIRE_MD5_STEP(F, c, d, a, b, X[6], 0xa8304613u, 17);
    ASTAIRE_MD5_STEP(F, b, c, d, a, X[7], 0xfd469501u, 22);
    ASTAIRE_MD5_STEP(F, a, b, c, d, X[8], 0x698098d8u, 7);
    ASTAIRE_MD5_STEP(F, d, a, b, c, X[9], 0x8b44f7afu, 12);
    ASTAIRE_MD5_STEP(F, c, d, a, b, X[10], 0xffff5bb1u, 17);
    ASTAIRE_MD5_STEP(F, b, c, d, a, X[11], 0x895cd7beu, 22);
    ASTAIRE_MD5_STEP(F, a, b, c, d, X[12], 0x6b901122u, 7);
    ASTAIRE_MD5_STEP(F, d, a, b, c, X[13], 0xfd987193u, 12);
    ASTAIRE_MD5_STEP(F, c, d, a, b, X[14], 0xa679438eu, 17);
    ASTAIRE_MD5_STEP(F, b, c, d, a, X[15], 0x49b40821u, 22);
    ASTAIRE_MD5_STEP(G, a, b, c, d, X[1], 0xf61e2562u, 5);
    ASTAIRE_MD5_STEP(G, d, a, b, c, X[6], 0xc040b340u, 9);
    ASTAIRE_MD5_STEP(G, c, d, a, b, X[11], 0x265e5a51u, 14);
    ASTAIRE_MD5_STEP(G, b, c, d, a, X[0], 0xe9b6c7aau, 20);
    ASTAIRE_MD5_STEP(G, a, b, c, d, X[5], 0xd62f105du, 5);
    ASTAIRE_MD5_STEP(G, d, a, b, c, X[10], 0x02441453u, 9);
    ASTAIRE_MD5_STEP(G, c, d, a, b, X[15], 0xd8a1e681u, 14);
    ASTAIRE_MD5_STEP(G, b, c, d, a, X[4], 0xe7d3fbc8u, 20);
    ASTAIRE_MD5_STEP(G, a, b, c, d, X[9], 0x21e1cde6u, 5);
    ASTAIRE_MD5_STEP(G, d, a, b, c, X[14], 0xc33707d6u, 9);
    ASTAIRE_MD5_STEP(G, c, d, a, b, X[3], 0xf4d50d87u, 14);
    ASTAIRE_MD5_STEP(G, b, c, d, a, X[8], 0x455a14edu, 20);
    ASTAIRE_MD5_STEP(G, a, b, c, d, X[13], 0xa9e3e905u, 5);
    ASTAIRE_MD5_STEP(G, d, a, b, c, X[2], 0xfcefa3f8u, 9);
    ASTAIRE_MD5_STEP(G, c, d, a, b, X[7], 0x676f02d9u, 14);
    ASTAIRE_MD5_STEP(G, b, c, d, a, X[12], 0x8d2a4c8au, 20);
    ASTAIRE_MD5_STEP(H, a, b, c, d, X[5], 0xfffa3942u, 4);
    ASTAIRE_MD5_STEP(H, d, a, b, c, X[8], 0x8771f681u, 11);
    ASTAIRE_MD5_STEP(H, c, d, a, b, X[11], 0x6d9d6122u, 16);
    ASTAIRE_MD5_STEP(H, b, c, d, a, X[14], 0xfde5380cu, 23);
    ASTAIRE_MD5_STEP(H, a, b, c, d, X[1], 0xa4beea44u, 4);
    ASTAIRE_MD5_STEP(H, d, a, b, c, X[4], 0x4bdecfa9u, 11);
    ASTAIRE_MD5_STEP(H, c, d, a, b, X[7], 0xf6bb4b60u, 16);
    ASTAIRE_MD5_STEP(H, b, c, d, a, X[10], 0xbebfbc70u, 23);
    ASTAIRE_MD5_STEP(H, a, b, c, d, X[13], 0x289b7ec6u, 4);
    ASTAIRE_MD5_STEP(H, d, a, b, c, X[0], 0xeaa127fau, 11);
    ASTAIRE_MD5_STEP(H, c, d, a, b, X[3], 0xd4ef3085u, 16);
    ASTAIRE_MD5_STEP(H, b, c, d, a, X[6], 0x04881d05u, 23);
    ASTAIRE_MD5_STEP(H, a, b, c, d, X[9], 0xd9d4d039u, 4);
    ASTAIRE_MD5_STEP(H, d, a, b, c, X[12], 0xe6db99e5u, 11);
    ASTAIRE_MD5_STEP(H, c, d, a, b, X[15], 0x1fa27cf8u, 16);
    ASTAIRE_MD5_STEP(H, b, c, d, a, X[2], 0xc4ac5665u, 23);
    ASTAIRE_MD5_STEP(I, a, b, c, d, X[0], 0xf4292244u, 6);
    ASTAIRE_MD5_STEP(I, d, a, b, c, X[7], 0x432aff97u, 10);
    ASTAIRE_MD5_STEP(I, c, d, a, b, X[14], 0xab9423a7u, 15);
    ASTAIRE_MD5_STEP(I, b, c, d, a, X[5], 0xfc93a039u, 21);
    ASTAIRE_MD5_STEP(I, a, b, c, d, X[12], 0x655b59c3u, 6);
    ASTAIRE_MD5_STEP(I, d, a, b, c, X[3], 0x8f0ccc92u, 10);
    ASTAIRE_MD5_STEP(I, c, d, a, b, X[10], 0xffeff47du, 15);
    ASTAIRE_MD5_STEP(I, b, c, d, a, X[1], 0x85845dd1u, 21);
    ASTAIRE_MD5_STEP(I, a, b, c, d, X[8], 0x6fa87e4fu, 6);
    ASTAIRE_MD5_STEP(I, d, a, b, c, X[15], 0xfe2ce6e0u, 10);
    ASTAIRE_MD5_STEP(I, c, d, a, b, X[6], 0xa3014314u, 15);
    ASTAIRE_MD5_STEP(I, b, c, d, a, X[13], 0x4e0811a1u, 21);
    ASTAIRE_MD5_STEP(I, a, b, c, d, X[4], 0xf7537e82u, 6);
    (void)b; (void)c; (void)d;
    return st[0] + a;
}

/* md5(data)[0:4] read as a little-endian uint32. */
static inline uint32_t astaire_md5_first32(const unsigned char *data, size_t len)
{
    uint32_t st[4] = {0x67452301u, 0xefcdab89u, 0x98badcfeu, 0x10325476u};
    unsigned char blk[128];
    size_t full = len & ~(size_t)63;
    size_t rest = len - full;
    size_t padded = rest < 56 ? 64 : 128;
    uint64_t bits = (uint64_t)len << 3;
    size_t i;
    for (i = 0; i < full; i += 64)
        astaire_md5_block(st, data + i);
    if (rest)
        memcpy(blk, data + full, rest);
    blk[rest] = 0x80;
    memset(blk + rest + 1, 0, padded - rest - 9);
    for (i = 0; i < 8; i++)
        blk[padded - 8 + i] = (unsigned char)(bits >> (8 * i));
    if (padded == 128)
        astaire_md5_block(st, blk);
    return astaire_md5_last(st, blk + padded - 64);
}

/* Sixteen short messages at once. MD5 is one long dependency chain per message; hashing
 * sixteen keys side by side, in lane loops the compiler turns into SIMD (two AVX2 registers,
 * or four SSE2 registers, per state word), lets the chains overlap. Sixteen rather than
 * eight: with one register per state word each step waited on the one before, and two
 * independent halves fill that wait (TAP parse + MD5 + vbucket filter, 51-55 against 60-62 ns
 * per frame). Only for messages of at most 55 bytes (one padded block), which covers
 * MemcachedStore keys; longer ones go through astaire_md5_first32. Unused lanes may be
 * given length 0. */
#define ASTAIRE_MD5_MAX_SHORT 55
#define ASTAIRE_MD5_LANES 16

#define ASTAIRE_MD5_STEP_LANES(f, a, b, c, d, k, t, s) \
    for (l = 0; l < ASTAIRE_MD5_LANES; l++) { \
        uint32_t v_ = a[l] + ASTAIRE_MD5_##f(b[l], c[l], d[l]) + X[k][l] + (t); \
        a[l] = ((v_ << (s)) | (v_ >> (32 - (s)))) + b[l]; \
    }

#define ASTAIRE_MD5_DEFINE_LANES(name, attr) \
attr static void name(const unsigned char *const p[ASTAIRE_MD5_LANES], const size_t n[ASTAIRE_MD5_LANES], uint32_t out[ASTAIRE_MD5_LANES]) \
{ \
    uint32_t X[16][ASTAIRE_MD5_LANES]; \
    uint32_t a[ASTAIRE_MD5_LANES], b[ASTAIRE_MD5_LANES], c[ASTAIRE_MD5_LANES], d[ASTAIRE_MD5_LANES]; \
    int l, k; \
    memset(X, 0, sizeof(X)); \
    for (l = 0; l < ASTAIRE_MD5_LANES; l++) { \
        /* The padded block's words straight from the key: its whole words, then the word \
           holding its last 0-3 bytes and the 0x80, then the bit length in words 14-15 \
           (no padded copy, whose byte stores the word loads would wait on). */ \
        const unsigned char *q = p[l]; \
        size_t len = n[l], full = len >> 2, r = len & 3; \
        uint32_t w = 0x80u << (8 * r); \
        for (k = 0; k < (int)full; k++) \
            X[k][l] = astaire_md5_le32(q + 4 * k); \
        if (r > 0) w |= q[4 * full]; \
        if (r > 1) w |= (uint32_t)q[4 * full + 1] << 8; \
        if (r > 2) w |= (uint32_t)q[4 * full + 2] << 16; \
        X[full][l] = w; \
        X[14][l] = (uint32_t)((uint64_t)len << 3); \
        X[15][l] = (uint32_t)((uint64_t)len >> 29); \
        a[l] = 0x67452301u; \
        b[l] = 0xefcdab89u; \
        c[l] = 0x98badcfeu; \
        d[l] = 0x10325476u; \
    } \
    ASTAIRE_MD5_STEP_LANES(F, a, b, c, d, 0, 0xd76aa478u, 7); \
    ASTAIRE_MD5_STEP_LANES(F, d, a, b, c, 1, 0xe8c7b756u, 12); \
    ASTAIRE_MD5_STEP_LANES(F, c, d, a, b, 2, 0x242070dbu, 17); \
    ASTAIRE_MD5_STEP_LANES(F, b, c, d, a, 3, 0xc1bdceeeu, 22); \
    ASTAIRE_MD5_STEP_LANES(F, a, b, c, d, 4, 0xf57c0fafu, 7); \
    ASTAIRE_MD5_STEP_LANES(F, d, a, b, c, 5, 0x4787c62au, 12); \
    ASTAIRE_MD5_STEP_LANES(F, c, d, a, b, 6, 0xa8304613u, 17); \
    ASTAIRE_MD5_STEP_LANES(F, b, c, d, a, 7, 0xfd469501u, 22); \
    ASTAIRE_MD5_STEP_LANES(F, a, b, c, d, 8, 0x698098d8u, 7); \
    ASTAIRE_MD5_STEP_LANES(F, d, a, b, c, 9, 0x8b44f7afu, 12); \
    ASTAIRE_MD5_STEP_LANES(F, c, d, a, b, 10, 0xffff5bb1u, 17); \
    ASTAIRE_MD5_STEP_LANES(F, b, c, d, a, 11, 0x895cd7beu, 22); \
    ASTAIRE_MD5_STEP_LANES(F, a, b, c, d, 12, 0x6b901122u, 7); \
    ASTAIRE_MD5_STEP_LANES(F, d, a, b, c, 13, 0xfd987193u, 12); \
    ASTAIRE_MD5_STEP_LANES(F, c, d, a, b, 14, 0xa679438eu, 17); \
    ASTAIRE_MD5_STEP_LANES(F, b, c, d, a, 15, 0x49b40821u, 22); \
    ASTAIRE_MD5_STEP_LANES(G, a, b, c, d, 1, 0xf61e2562u, 5); \
    ASTAIRE_MD5_STEP_LANES(G, d, a, b, c, 6, 0xc040b340u, 9); \
    ASTAIRE_MD5_STEP_LANES(G, c, d, a, b, 11, 0x265e5a51u, 14); \
    ASTAIRE_MD5_STEP_LANES(G, b, c, d, a, 0, 0xe9b6c7aau, 20); \
    ASTAIRE_MD5_STEP_LANES(G, a, b, c, d, 5, 0xd62f105du, 5); \
    ASTAIRE_MD5_STEP_LANES(G, d, a, b, c, 10, 0x02441453u, 9); \
    ASTAIRE_MD5_STEP_LANES(G, c, d, a, b, 15, 0xd8a1e681u, 14); \
    ASTAIRE_MD5_STEP_LANES(G, b, c, d, a, 4, 0xe7d3fbc8u, 20); \
    ASTAIRE_MD5_STEP_LANES(G, a, b, c, d, 9, 0x21e1cde6u, 5); \
    ASTAIRE_MD5_STEP_LANES(G, d, a, b, c, 14, 0xc33707d6u, 9); \
    ASTAIRE_MD5_STEP_LANES(G, c, d, a, b, 3, 0xf4d50d87u, 14); \
    ASTAIRE_MD5_STEP_LANES(G, b, c, d, a, 8, 0x455a14edu, 20); \
    ASTAIRE_MD5_STEP_LANES(G, a, b, c, d, 13, 0xa9e3e905u, 5); \
    ASTAIRE_MD5_STEP_LANES(G, d, a, b, c, 2, 0xfcefa3f8u, 9); \
    ASTAIRE_MD5_STEP_LANES(G, c, d, a, b, 7, 0x676f02d9u, 14); \
    ASTAIRE_MD5_STEP_LANES(G, b, c, d, a, 12, 0x8d2a4c8au, 20); \
    ASTAIRE_MD5_STEP_LANES(H, a, b, c, d, 5, 0xfffa3942u, 4); \
    ASTAIRE_MD5_STEP_LANES(H, d, a, b, c, 8, 0x8771f681u, 11); \
    ASTAIRE_MD5_STEP_LANES(H, c, d, a, b, 11, 0x6d9d6122u, 16); \
    ASTAIRE_MD5_STEP_LANES(H, b, c, d, a, 14, 0xfde5380cu, 23); \
    ASTAIRE_MD5_STEP_LANES(H, a, b, c, d, 1, 0xa4beea44u, 4); \
    ASTAIRE_MD5_STEP_LANES(H, d, a, b, c, 4, 0x4bdecfa9u, 11); \
    ASTAIRE_MD5_STEP_LANES(H, c, d, a, b, 7, 0xf6bb4b60u, 16); \
    ASTAIRE_MD5_STEP_LANES(H, b, c, d, a, 10, 0xbebfbc70u, 23); \
    ASTAIRE_MD5_STEP_LANES(H, a, b, c, d, 13, 0x289b7ec6u, 4); \
    ASTAIRE_MD5_STEP_LANES(H, d, a, b, c, 0, 0xeaa127fau, 11); \
    ASTAIRE_MD5_STEP_LANES(H, c, d, a, b, 3, 0xd4ef3085u, 16); \
    ASTAIRE_MD5_STEP_LANES(H, b, c, d, a, 6, 0x04881d05u, 23); \
    ASTAIRE_MD5_STEP_LANES(H, a, b, c, d, 9, 0xd9d4d039u, 4); \
    ASTAIRE_MD5_STEP_LANES(H, d, a, b, c, 12, 0xe6db99e5u, 11); \
    ASTAIRE_MD5_STEP_LANES(H, c, d, a, b, 15, 0x1fa27cf8u, 16); \
    ASTAIRE_MD5_STEP_LANES(H, b, c, d, a, 2, 0xc4ac5665u, 23); \
    ASTAIRE_MD5_STEP_LANES(I, a, b, c, d, 0, 0xf4292244u, 6); \
    ASTAIRE_MD5_STEP_LANES(I, d, a, b, c, 7, 0x432aff97u, 10); \
    ASTAIRE_MD5_STEP_LANES(I, c, d, a, b, 14, 0xab9423a7u, 15); \
    ASTAIRE_MD5_STEP_LANES(I, b, c, d, a, 5, 0xfc93a039u, 21); \
    ASTAIRE_MD5_STEP_LANES(I, a, b, c, d, 12, 0x655b59c3u, 6); \
    ASTAIRE_MD5_STEP_LANES(I, d, a, b, c, 3, 0x8f0ccc92u, 10); \
    ASTAIRE_MD5_STEP_LANES(I, c, d, a, b, 10, 0xffeff47du, 15); \
    ASTAIRE_MD5_STEP_LANES(I, b, c, d, a, 1, 0x85845dd1u, 21); \
    ASTAIRE_MD5_STEP_LANES(I, a, b, c, d, 8, 0x6fa87e4fu, 6); \
    ASTAIRE_MD5_STEP_LANES(I, d, a, b, c, 15, 0xfe2ce6e0u, 10); \
    ASTAIRE_MD5_STEP_LANES(I, c, d, a, b, 6, 0xa3014314u, 15); \
    ASTAIRE_MD5_STEP_LANES(I, b, c, d, a, 13, 0x4e0811a1u, 21); \
    ASTAIRE_MD5_STEP_LANES(I, a, b, c, d, 4, 0xf7537e82u, 6); \
    for (l = 0; l < ASTAIRE_MD5_LANES; l++) \
        out[l] = 0x67452301u + a[l]; \
}

ASTAIRE_MD5_DEFINE_LANES(astaire_md5_first32_lanes_generic, )

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
/* Built for AVX2, and for AVX-512VL at 256-bit vectors (its rotates and three-input logic
   take about a quarter off a key), whatever the compile flags; each used only when the CPU
   (and the OS, for AVX-512's registers) has it. tests/test_md5.py runs every variant the
   machine can against the one-key function. */
ASTAIRE_MD5_DEFINE_LANES(astaire_md5_first32_lanes_avx2, __attribute__((target("avx2"))))
ASTAIRE_MD5_DEFINE_LANES(astaire_md5_first32_lanes_avx512vl,
                         __attribute__((target("avx2,avx512f,avx512vl,prefer-vector-width=256"))))
static int astaire_md5_variant = -1;  /* 0 generic, 1 AVX2, 2 AVX-512VL */

static inline int astaire_md5_cpu_variant(void)
{
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl"))
        return 2;
    return __builtin_cpu_supports("avx2") ? 1 : 0;
}
#endif

static inline void astaire_md5_first32_lanes(const unsigned char *const p[ASTAIRE_MD5_LANES], const size_t n[ASTAIRE_MD5_LANES], uint32_t out[ASTAIRE_MD5_LANES])
{
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
    if (astaire_md5_variant < 0)
        astaire_md5_variant = astaire_md5_cpu_variant();
    if (astaire_md5_variant == 2) {
        astaire_md5_first32_lanes_avx512vl(p, n, out);
        return;
    }
    if (astaire_md5_variant == 1) {
        astaire_md5_first32_lanes_avx2(p, n, out);
        return;
    }
#endif
    astaire_md5_first32_lanes_generic(p, n, out);
}

#endif /* ASTAIRE_MD5_H_INCLUDED */
