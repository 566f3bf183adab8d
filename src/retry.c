/*
 * retry.c - calls whose executor raised, run again (option retries), and
 * the attempts each made, kept until the call succeeds or fails for good.
 * Runs with io->lock held (io.h).
 *
 * The attempts of a call are kept as the bytes its ERROR record will carry
 * (frame.h: varint slot, varint pid, varint-prefixed message each), in a
 * small open-addressed table keyed by call id: only calls that raised and
 * may run again are in it.
 */
#include <stdlib.h>
#include <string.h>

#include "frame.h"
#include "io.h"
#include "varint.h"

typedef struct entry {
    uint64_t id;      /* 0: empty */
    uint32_t count;   /* attempts noted */
    pz_buf bytes;
} entry;

struct pz_retries {
    entry *e;
    size_t cap, n;    /* cap: a power of two */
};

static size_t hash(uint64_t id, size_t cap)
{
    return (size_t)((id * 0x9E3779B97F4A7C15ull) >> 20) & (cap - 1);
}

static entry *find(struct pz_retries *r, uint64_t id)
{
    if (!r || r->n == 0)
        return NULL;
    for (size_t i = hash(id, r->cap);; i = (i + 1) & (r->cap - 1)) {
        if (r->e[i].id == id)
            return &r->e[i];
        if (r->e[i].id == 0)
            return NULL;
    }
}

/* The entry for id, made when missing; NULL when out of memory. */
static entry *find_or_add(struct pz_io *io, uint64_t id)
{
    entry *found = find(io->retries, id);
    if (found)
        return found;
    struct pz_retries *r = io->retries;
    if (!r) {
        r = io->retries = calloc(1, sizeof *r);
        if (!r)
            return NULL;
    }
    if ((r->n + 1) * 2 > r->cap) {
        size_t cap = r->cap ? r->cap * 2 : 16;
        entry *e = calloc(cap, sizeof *e);
        if (!e)
            return NULL;
        for (size_t i = 0; i < r->cap; i++) {
            if (r->e[i].id == 0)
                continue;
            size_t k = hash(r->e[i].id, cap);
            while (e[k].id != 0)
                k = (k + 1) & (cap - 1);
            e[k] = r->e[i];
        }
        free(r->e);
        r->e = e;
        r->cap = cap;
    }
    size_t k = hash(id, r->cap);
    while (r->e[k].id != 0)
        k = (k + 1) & (r->cap - 1);
    r->e[k] = (entry){id, 0, PZ_BUF_INIT};
    r->n++;
    return &r->e[k];
}

/* Removes e from the table, keeping probe chains whole. */
static void forget(struct pz_retries *r, entry *e)
{
    pz_buf_free(&e->bytes);
    size_t i = (size_t)(e - r->e), mask = r->cap - 1;
    r->e[i].id = 0;
    r->n--;
    for (size_t j = (i + 1) & mask; r->e[j].id != 0; j = (j + 1) & mask) {
        entry moved = r->e[j];
        r->e[j].id = 0;
        size_t k = hash(moved.id, r->cap);
        while (r->e[k].id != 0)
            k = (k + 1) & mask;
        r->e[k] = moved;
    }
}

/* Appends one attempt (frame.h) to b. */
static int note(pz_buf *b, const pz_slot *w, const char *msg, size_t mlen)
{
    uint8_t v[3 * PZ_VARINT_MAX_BYTES];
    size_t n = pz_put_varint(v, (uint64_t)w->slot + 1);
    n += pz_put_varint(v + n, (uint64_t)w->pid);
    n += pz_put_varint(v + n, mlen);
    return pz_buf_append(b, v, n) != 0 || pz_buf_append(b, msg, mlen) != 0 ? -1 : 0;
}

int pz_retry_again(struct pz_io *io, pz_slot *w, char *call, const char *msg, size_t mlen)
{
    int tries = pz_frame_tries(call);
    if (tries >= io->p->opt.retries || tries >= 255)
        return -1;
    entry *e = find_or_add(io, pz_frame_id(call));
    if (!e || note(&e->bytes, w, msg, mlen) != 0) {
        pz_io_fail(io, "out of memory in the I/O thread (noting an attempt of a call)");
        return 0; /* nothing is sent: the pool has failed */
    }
    e->count++;
    pz_frame_set_tries(call, (uint8_t)(tries + 1));
    /* A copy goes back to the queue, to run on whichever worker is free;
     * the caller drops the frame from w as an answered call. */
    if (pz_dispatch_requeue_frame(io, call, pz_frame_size(call)) == 0)
        io->retried++;
    return 0;
}

int pz_retry_take(struct pz_io *io, pz_slot *w, uint64_t id, const char *msg, size_t mlen,
                  pz_buf *out)
{
    entry *e = find(io->retries, id);
    uint8_t v[PZ_VARINT_MAX_BYTES];
    uint32_t count = (e ? e->count : 0) + 1;
    if (pz_buf_append(out, v, pz_put_varint(v, count)) != 0 ||
        (e && pz_buf_append(out, e->bytes.data, e->bytes.len) != 0) || note(out, w, msg, mlen) != 0)
        return -1;
    if (e)
        forget(io->retries, e);
    return 0;
}

int pz_retry_take_noted(struct pz_io *io, uint64_t id, pz_buf *out)
{
    entry *e = find(io->retries, id);
    uint8_t v[PZ_VARINT_MAX_BYTES];
    if (pz_buf_append(out, v, pz_put_varint(v, e ? e->count : 0)) != 0 ||
        (e && pz_buf_append(out, e->bytes.data, e->bytes.len) != 0))
        return -1;
    if (e)
        forget(io->retries, e);
    return 0;
}

void pz_retry_forget(struct pz_io *io, uint64_t id)
{
    entry *e = find(io->retries, id);
    if (e)
        forget(io->retries, e);
}

size_t pz_retry_held(const struct pz_io *io)
{
    return io->retries ? io->retries->n : 0;
}

void pz_retry_free(struct pz_io *io)
{
    struct pz_retries *r = io->retries;
    if (!r)
        return;
    for (size_t i = 0; i < r->cap; i++)
        if (r->e[i].id != 0)
            pz_buf_free(&r->e[i].bytes);
    free(r->e);
    free(r);
    io->retries = NULL;
}
