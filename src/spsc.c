/*
 * spsc.c - chunk management of the single-producer single-consumer queue.
 */
#include <stdlib.h>

#include "spsc.h"

static pz_chunk *chunk_new(size_t cap)
{
    pz_chunk *c = malloc(sizeof *c + cap);
    if (!c)
        return NULL;
    atomic_init(&c->next, NULL);
    atomic_init(&c->tail, 0);
    c->cap = cap;
    return c;
}

/* Producer: a spare chunk, or NULL. */
static pz_chunk *take_spare(pz_spsc *q)
{
    for (int i = 0; i < PZ_SPSC_SPARES; i++)
        if (atomic_load_explicit(&q->spare[i], memory_order_relaxed)) {
            pz_chunk *c = atomic_exchange(&q->spare[i], NULL);
            if (c)
                return c;
        }
    return NULL;
}

/* Consumer: keeps chunk c for the producer, or frees it when every place
 * it may take is taken: a chunk bigger than chunk_size (a big record's)
 * only the first, so that what the queue keeps stays bounded. */
static void give_spare(pz_spsc *q, pz_chunk *c)
{
    int places = c->cap > q->chunk_size ? 1 : PZ_SPSC_SPARES;
    for (int i = 0; i < places; i++) {
        pz_chunk *empty = NULL;
        if (atomic_compare_exchange_strong(&q->spare[i], &empty, c))
            return;
    }
    free(c);
}

int pz_spsc_init(pz_spsc *q, size_t chunk_size)
{
    q->chunk_size = chunk_size;
    for (int i = 0; i < PZ_SPSC_SPARES; i++)
        atomic_init(&q->spare[i], NULL);
    q->wr = q->rd = chunk_new(chunk_size);
    q->wpos = 0;
    q->head = 0;
    return q->wr ? 0 : -1;
}

void pz_spsc_destroy(pz_spsc *q)
{
    pz_chunk *c = q->rd;
    while (c) {
        pz_chunk *next = atomic_load(&c->next);
        free(c);
        c = next;
    }
    q->wr = q->rd = NULL;
    for (int i = 0; i < PZ_SPSC_SPARES; i++)
        free(atomic_exchange(&q->spare[i], NULL));
}

char *pz_spsc_reserve(pz_spsc *q, size_t n)
{
    pz_chunk *w = q->wr;
    if (w->cap - q->wpos >= n)
        return w->data + q->wpos;
    /* Publish what this chunk holds before leaving it: the consumer moves to
     * the next chunk only when it has read this one's final tail. */
    size_t cap = n > q->chunk_size ? n : q->chunk_size;
    pz_chunk *c = take_spare(q);
    if (c && c->cap >= cap) {
        atomic_store_explicit(&c->next, NULL, memory_order_relaxed);
        atomic_store_explicit(&c->tail, 0, memory_order_relaxed);
    } else {
        free(c);
        if (!(c = chunk_new(cap)))
            return NULL;
    }
    atomic_store(&w->tail, q->wpos);
    atomic_store(&w->next, c);
    q->wr = c;
    q->wpos = 0;
    return c->data;
}

const char *pz_spsc_peek(pz_spsc *q, size_t *n)
{
    for (;;) {
        pz_chunk *r = q->rd;
        size_t tail = atomic_load(&r->tail);
        if (q->head < tail) {
            *n = tail - q->head;
            return r->data + q->head;
        }
        pz_chunk *next = atomic_load(&r->next);
        if (!next) {
            *n = 0;
            return NULL;
        }
        /* The producer stored this chunk's final tail before `next`. */
        if (q->head < atomic_load(&r->tail))
            continue;
        q->rd = next;
        q->head = 0;
        give_spare(q, r);
    }
}

int pz_spsc_holds(pz_spsc *q, size_t n)
{
    size_t head = q->head, seen = 0;
    for (pz_chunk *c = q->rd; c; c = atomic_load(&c->next), head = 0) {
        size_t tail = atomic_load(&c->tail);
        if (head < tail && (seen += tail - head) >= n)
            return 1;
    }
    return n == 0;
}

int pz_spsc_walk(pz_spsc *q, int (*fn)(char *data, size_t n, void *ud), void *ud)
{
    size_t head = q->head; /* the chunks after rd are unread */
    for (pz_chunk *c = q->rd; c; c = atomic_load(&c->next), head = 0) {
        size_t tail = atomic_load(&c->tail);
        if (head < tail) {
            int r = fn(c->data + head, tail - head, ud);
            if (r)
                return r;
        }
    }
    return 0;
}
