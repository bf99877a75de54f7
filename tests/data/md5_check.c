/* astaire/_md5.h's sixteen-lane MD5 variants (generic; AVX2 and AVX-512VL where this CPU has
 * them) against its one-key function, on random keys of every length a lane takes
 * (tests/test_md5.py builds and runs it; test_codec.py holds the one-key function to
 * hashlib). Usage: md5_check ROUNDS; prints the variants run and the differences found,
 * exits 1 on any. */
#include <stdio.h>
#include <stdlib.h>
#include "_md5.h"
#include "check_rnd.h"

typedef void (*lanes_fn)(const unsigned char *const p[ASTAIRE_MD5_LANES], const size_t n[ASTAIRE_MD5_LANES],
                         uint32_t out[ASTAIRE_MD5_LANES]);

int main(int argc, char **argv)
{
    long rounds = argc > 1 ? atol(argv[1]) : 100000, differences = 0;
    /* the builds by the dispatcher's numbers; a CPU with AVX-512VL has AVX2 too */
    static const char *const names[3] = {"generic", "avx2", "avx512vl"};
    lanes_fn fns[3] = {astaire_md5_first32_lanes_generic, NULL, NULL};
    int have = 1;
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
    fns[1] = astaire_md5_first32_lanes_avx2;
    fns[2] = astaire_md5_first32_lanes_avx512vl;
    have = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") ? 3
         : __builtin_cpu_supports("avx2") ? 2 : 1;
    /* the dispatcher picks the best build there is */
    unsigned char k0[1] = {'k'};
    const unsigned char *p0[ASTAIRE_MD5_LANES];
    size_t n0[ASTAIRE_MD5_LANES];
    uint32_t o0[ASTAIRE_MD5_LANES];
    for (int l = 0; l < ASTAIRE_MD5_LANES; l++) {
        p0[l] = k0;
        n0[l] = 1;
    }
    astaire_md5_first32_lanes(p0, n0, o0);
    if (astaire_md5_variant != have - 1) {
        printf("the dispatcher chose variant %d of %d\n", astaire_md5_variant, have);
        differences++;
    }
#endif
    unsigned char keys[ASTAIRE_MD5_LANES][ASTAIRE_MD5_MAX_SHORT];
    const unsigned char *p[ASTAIRE_MD5_LANES];
    size_t n[ASTAIRE_MD5_LANES];
    uint32_t out[ASTAIRE_MD5_LANES];
    for (long it = 0; it < rounds; it++) {
        for (int l = 0; l < ASTAIRE_MD5_LANES; l++) {
            /* every length 0-55 in turn across lanes and rounds, any bytes */
            n[l] = (size_t)((it * ASTAIRE_MD5_LANES + l) % (ASTAIRE_MD5_MAX_SHORT + 1));
            for (size_t i = 0; i < n[l]; i++)
                keys[l][i] = (unsigned char)rnd();
            p[l] = keys[l];
        }
        for (int f = 0; f < have; f++) {
            fns[f](p, n, out);
            for (int l = 0; l < ASTAIRE_MD5_LANES; l++)
                if (out[l] != astaire_md5_first32(p[l], n[l]) && differences++ < 10)
                    printf("%s differs on a key of %zu bytes\n", names[f], n[l]);
        }
    }
    printf("variants:");
    for (int f = 0; f < have; f++)
        printf(" %s", names[f]);
    printf("; %ld rounds of %d keys: %ld differences\n", rounds, ASTAIRE_MD5_LANES, differences);
    return differences != 0;
}
