/*
 * idset.h - which call ids have finished, in memory that stays small
 * however many calls run: every id below `low` has finished, and those that
 * finished ahead of it are bits in a ring that covers the ids from `low`
 * on.  Calls finish roughly in the order they were queued, so the ring
 * spans about as many ids as there are calls in flight: one bit each (a
 * call that runs for long while millions finish after it costs a bit per
 * call finished meanwhile, and the ring grows to that).  Main thread only
 * (lpool.c, lrecords.c).
 */
#ifndef PZ_IDSET_H
#define PZ_IDSET_H

#include <stdint.h>
#include <stdlib.h>

typedef struct pz_idset {
    uint64_t low;   /* every id in [1, low) has finished */
    uint64_t *bits; /* id's bit: word (id / 64) % cap, bit id % 64, for
                     * ids in [low, low + 64 * cap); bits below low are 0 */
    size_t cap;     /* words: a power of two, or 0 */
} pz_idset;

static inline int pz_idset_bit(const pz_idset *s, uint64_t id)
{
    return (int)(s->bits[(id >> 6) & (s->cap - 1)] >> (id & 63)) & 1;
}

static inline int pz_idset_has(const pz_idset *s, uint64_t id)
{
    if (id < s->low)
        return 1;
    if (id - s->low >= 64 * (uint64_t)s->cap)
        return 0;
    return pz_idset_bit(s, id);
}

/* Makes the ring cover id (above low); returns 0, or -1 when out of
 * memory (the set is unchanged). */
static inline int pz_idset_grow(pz_idset *s, uint64_t id)
{
    size_t cap = s->cap ? s->cap : 16;
    while (id - s->low >= 64 * (uint64_t)cap) {
        if (cap > SIZE_MAX / 2 / sizeof *s->bits)
            return -1;
        cap *= 2;
    }
    uint64_t *bits = calloc(cap, sizeof *bits);
    if (!bits)
        return -1;
    for (uint64_t i = s->low; s->cap && i < s->low + 64 * (uint64_t)s->cap; i++)
        if (pz_idset_bit(s, i))
            bits[(i >> 6) & (cap - 1)] |= 1ull << (i & 63);
    free(s->bits);
    s->bits = bits;
    s->cap = cap;
    return 0;
}

/* The bits of ids [a, b), all inside the ring, set (on) or cleared, a
 * word at a time. */
static inline void pz_idset_mark_range(pz_idset *s, uint64_t a, uint64_t b, int on)
{
    while (a < b) {
        unsigned off = (unsigned)(a & 63);
        uint64_t n = b - a < 64 - off ? b - a : 64 - off;
        uint64_t mask = n == 64 ? ~0ull : ((1ull << n) - 1) << off;
        uint64_t *w = &s->bits[(a >> 6) & (s->cap - 1)];
        *w = on ? *w | mask : *w & ~mask;
        a += n;
    }
}

/* Moves low past the ids from low on that have finished, clearing their
 * bits for the ids the ring will cover next: a word at a time, so that a
 * run record that arrived ahead of the one before it (two workers' runs
 * interleave) is taken in a few steps, not bit by bit. */
static inline void pz_idset_advance(pz_idset *s)
{
    while (s->cap) {
        uint64_t *w = &s->bits[(s->low >> 6) & (s->cap - 1)];
        unsigned off = (unsigned)(s->low & 63);
        uint64_t rest = *w >> off; /* bit 0: low's */
        if (!(rest & 1))
            return;
        /* The finished ids in a row from low, in this word. */
        unsigned n = ~rest ? (unsigned)__builtin_ctzll(~rest) : 64;
        if (n > 64 - off)
            n = 64 - off;
        *w &= ~(n == 64 ? ~0ull : ((1ull << n) - 1) << off);
        s->low += n;
        if (off + n < 64)
            return;
    }
}

/* Records that call id has finished.  Returns 0, or -1 when out of memory
 * (the set is unchanged). */
static inline int pz_idset_add(pz_idset *s, uint64_t id)
{
    if (id < s->low)
        return 0;
    if (id == s->low) {
        /* The usual case, calls finishing in order: no bit to set (the
         * ring is made only once one finishes ahead of another). */
        s->low++;
        if (!s->cap)
            return 0;
    } else {
        if (id - s->low >= 64 * (uint64_t)s->cap && pz_idset_grow(s, id) != 0)
            return -1;
        s->bits[(id >> 6) & (s->cap - 1)] |= 1ull << (id & 63);
    }
    pz_idset_advance(s);
    return 0;
}

/* Records that calls first .. first + k - 1 have finished (the calls of
 * a run record, in order).  Returns 0, or -1 when out of memory (those
 * before the one it could not record are recorded). */
static inline int pz_idset_add_run(pz_idset *s, uint64_t first, uint64_t k)
{
    if (first == s->low) {
        /* As pz_idset_add's usual case, k at once; their bits, should
         * any of them have been recorded before, are cleared for the ids
         * the ring will cover next. */
        uint64_t span = 64 * (uint64_t)s->cap;
        if (span)
            pz_idset_mark_range(s, s->low, s->low + (k < span ? k : span), 0);
        s->low += k;
        pz_idset_advance(s);
        return 0;
    }
    if (k == 0 || first + k <= s->low)
        return 0;
    uint64_t from = first > s->low ? first : s->low, last = first + k - 1;
    if (last - s->low < 64 * (uint64_t)s->cap || pz_idset_grow(s, last) == 0) {
        pz_idset_mark_range(s, from, last + 1, 1);
        pz_idset_advance(s);
        return 0;
    }
    /* Out of memory for the whole run: as many of its ids as fit. */
    for (uint64_t j = 0; j < k; j++)
        if (pz_idset_add(s, first + j) != 0)
            return -1;
    return 0;
}

static inline void pz_idset_free(pz_idset *s)
{
    free(s->bits);
    s->bits = NULL;
    s->cap = 0;
}

#endif
