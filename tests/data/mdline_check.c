/* astaire/_mdline.h's scanners against the byte-at-a-time loops they replaced, on random
 * input shaped like metadump keys and exp fields, and the text-protocol key check on keys with
 * bytes at its edges (tests/test_mdline.py builds and runs it).
 * Usage: mdline_check DIGIT_CASES KEY_CASES; prints the differences found, exits 1 on any. */
#include <stdio.h>
#include <stdlib.h>
#include "_mdline.h"
#include "check_rnd.h"

static const char *plain_digits(const char *p, const char *lend, uint64_t *val_out)
{
    uint64_t val = 0;
    while (p < lend && (unsigned char)(*p - '0') <= 9) {
        val = val * 10 + (uint64_t)(unsigned char)(*p - '0');
        p++;
    }
    *val_out = val;
    return p;
}

static const char *plain_key(const char *p, const char *lend, char *dst, size_t cap, size_t *dlen_out, int *bad)
{
    size_t dlen = 0;
    while (p < lend && *p != ' ') {
        if (*p == '%') {
            int hi = -1, lo = -1;
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
            p += 3;
        } else {
            if (dlen < cap)
                dst[dlen] = *p;
            p++;
        }
        dlen++;
    }
    *dlen_out = dlen;
    return p;
}

static int plain_text_key(const char *k, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)k[i];
        if (c <= 32 || c == 127)
            return 0;
    }
    return 1;
}

int main(int argc, char **argv)
{
    long digit_cases = argc > 1 ? atol(argv[1]) : 1000000, key_cases = argc > 2 ? atol(argv[2]) : 200000;
    static const char odd[] = "0123456789/:% aAfFgGzZ\xb0\xff\x80-";
    static const char keyish[] = "abcXYZ09% 5CcF%zG-_.";
    char buf[600], d1[250], d2[250];
    long differences = 0;
    for (long it = 0; it < digit_cases; it++) {
        /* digits only; digits with an odd byte here and there; any bytes */
        int n = (int)(rnd() % 40), mode = (int)(rnd() % 3);
        for (int i = 0; i < n; i++)
            buf[i] = mode == 0 ? (char)('0' + rnd() % 10)
                   : mode == 1 ? (rnd() % 8 ? (char)('0' + rnd() % 10) : odd[rnd() % (sizeof odd - 1)])
                   : (char)rnd();
        uint64_t v1, v2;
        const char *e1 = astaire_md_digits(buf, buf + n, &v1), *e2 = plain_digits(buf, buf + n, &v2);
        if (e1 != e2 || v1 != v2) {
            if (differences++ < 10)
                printf("digits differ: \"%.*s\": %zu/%zu bytes, %llu/%llu\n", n, buf, (size_t)(e1 - buf),
                       (size_t)(e2 - buf), (unsigned long long)v1, (unsigned long long)v2);
        }
    }
    for (long it = 0; it < key_cases; it++) {
        /* escapes good and bad among key bytes; long runs with a bad escape; long runs with
           good escapes and a space now and then, up to twice the 250 bytes a key may have */
        int n = (int)(rnd() % 520), mode = (int)(rnd() % 3);
        for (int i = 0; i < n; i++) {
            if (mode == 0)
                buf[i] = keyish[rnd() % (sizeof keyish - 1)];
            else if (mode == 1)
                buf[i] = rnd() % 20 ? 'k' : '%';
            else if (rnd() % 10 == 0 && i + 3 <= n) {
                memcpy(buf + i, rnd() % 2 ? "%5c" : "%5C", 3);
                i += 2;
            } else
                buf[i] = rnd() % 200 ? 'q' : ' ';
        }
        size_t l1 = 0, l2 = 0;
        int b1 = 0, b2 = 0;
        memset(d1, 0, sizeof d1);
        memset(d2, 0, sizeof d2);
        const char *e1 = astaire_md_key(buf, buf + n, d1, sizeof d1, &l1, &b1);
        const char *e2 = plain_key(buf, buf + n, d2, sizeof d2, &l2, &b2);
        size_t stored = l1 < sizeof d1 ? l1 : sizeof d1;
        if (e1 != e2 || l1 != l2 || b1 != b2 || (!b1 && memcmp(d1, d2, stored) != 0)) {
            if (differences++ < 10)
                printf("keys differ: %d bytes: end %zu/%zu, length %zu/%zu, bad escape %d/%d\n", n,
                       (size_t)(e1 - buf), (size_t)(e2 - buf), l1, l2, b1, b2);
        }
    }
    for (long it = 0; it < key_cases; it++) {
        /* keys for the text protocol: mostly printable, now and then one byte at or next to
           the edges (0x1f, 0x20, 0x21, 0x7e, 0x7f, 0x80, 0xff, 0x00) anywhere */
        static const char edge[] = "\x1f\x20\x21\x7e\x7f\x80\xff";
        int n = (int)(rnd() % 300), mode = (int)(rnd() % 3);
        for (int i = 0; i < n; i++)
            buf[i] = (char)('!' + rnd() % 94);
        if (mode && n) {
            buf[rnd() % n] = rnd() % 8 ? edge[rnd() % (sizeof edge - 1)] : 0;
            if (mode == 2)
                buf[rnd() % n] = (char)rnd();
        }
        int t1 = astaire_text_key(buf, (size_t)n), t2 = plain_text_key(buf, (size_t)n);
        if (t1 != t2 && differences++ < 10)
            printf("text key check differs: %d bytes: %d/%d\n", n, t1, t2);
    }
    printf("%ld digit strings, %ld keys (twice): %ld differences\n", digit_cases, key_cases, differences);
    return differences != 0;
}
