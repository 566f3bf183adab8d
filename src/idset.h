/*
 * idset.h - which call ids have finished, in memory that stays small
 * however many calls run: every id below `low` has finished, and the few
 * that finished ahead of it are kept in an open-addressed hash set.  Calls
 * finish roughly in the order they were queued, so the set holds about as
 * many ids as there are calls in flight.  Main thread only (lpool.c).
 */
#ifndef PZ_IDSET_H
#define PZ_IDSET_H

#include <stdint.h>
#include <stdlib.h>

typedef struct pz_idset {
    uint64_t low;    /* every id in [1, low) has finished */
    uint64_t *slots; /* ids above low (0: empty) */
    size_t cap, n;   /* cap: a power of two, or 0 */
} pz_idset;

static inline size_t pz_idset_hash(uint64_t id, size_t cap)
{
    return (size_t)((id * 0x9E3779B97F4A7C15ull) >> 17) & (cap - 1);
}

static inline int pz_idset_has(const pz_idset *s, uint64_t id)
{
    if (id < s->low)
        return 1;
    if (s->n == 0)
        return 0;
    for (size_t i = pz_idset_hash(id, s->cap);; i = (i + 1) & (s->cap - 1)) {
        if (s->slots[i] == id)
            return 1;
        if (s->slots[i] == 0)
            return 0;
    }
}

/* Removes id from the hash part (it is there); keeps probe chains whole. */
static inline void pz_idset_remove(pz_idset *s, uint64_t id)
{
    size_t mask = s->cap - 1, i = pz_idset_hash(id, s->cap);
    while (s->slots[i] != id)
        i = (i + 1) & mask;
    s->slots[i] = 0;
    s->n--;
    for (size_t j = (i + 1) & mask; s->slots[j] != 0; j = (j + 1) & mask) {
        uint64_t v = s->slots[j];
        s->slots[j] = 0;
        size_t k = pz_idset_hash(v, s->cap);
        while (s->slots[k] != 0)
            k = (k + 1) & mask;
        s->slots[k] = v;
    }
}

static inline int pz_idset_insert_raw(pz_idset *s, uint64_t id)
{
    if ((s->n + 1) * 2 > s->cap) {
        size_t cap = s->cap ? s->cap * 2 : 64;
        uint64_t *slots = calloc(cap, sizeof *slots);
        if (!slots)
            return -1;
        for (size_t i = 0; i < s->cap; i++) {
            if (s->slots[i] == 0)
                continue;
            size_t k = pz_idset_hash(s->slots[i], cap);
            while (slots[k] != 0)
                k = (k + 1) & (cap - 1);
            slots[k] = s->slots[i];
        }
        free(s->slots);
        s->slots = slots;
        s->cap = cap;
    }
    size_t k = pz_idset_hash(id, s->cap);
    while (s->slots[k] != 0 && s->slots[k] != id)
        k = (k + 1) & (s->cap - 1);
    if (s->slots[k] == 0) {
        s->slots[k] = id;
        s->n++;
    }
    return 0;
}

/* Records that call id has finished.  Returns 0, or -1 when out of memory
 * (the set is unchanged). */
static inline int pz_idset_add(pz_idset *s, uint64_t id)
{
    if (id < s->low)
        return 0;
    if (id != s->low)
        return pz_idset_insert_raw(s, id);
    s->low++;
    while (s->n > 0 && pz_idset_has(s, s->low)) {
        pz_idset_remove(s, s->low);
        s->low++;
    }
    return 0;
}

static inline void pz_idset_free(pz_idset *s)
{
    free(s->slots);
    s->slots = NULL;
    s->cap = s->n = 0;
}

#endif
