/* The random source of the C checks in tests/data (xorshift64: the same sequence on every
 * machine, so a difference found can be found again). */
#ifndef ASTAIRE_CHECK_RND_H_INCLUDED
#define ASTAIRE_CHECK_RND_H_INCLUDED
#include <stdint.h>

static uint64_t state = 88172645463325252ULL;

static uint64_t rnd(void)
{
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return state;
}

#endif
