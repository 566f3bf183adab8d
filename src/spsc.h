/*
 * spsc.h - an unbounded single-producer, single-consumer queue of records.
 *
 * The main thread hands calls to the I/O thread through one, and the I/O
 * thread hands results back through another, with no lock: the producer
 * appends into a chain of chunks and publishes how far it has written with
 * one atomic store; the consumer reads up to that point.  A record never
 * spans two chunks, so the consumer always sees whole records.
 *
 * One producer and one consumer at any moment: a role may pass from one
 * thread to another only through a lock that both take (the pool's I/O
 * lock does, pool.h), which orders everything each did before.
 */
#ifndef PZ_SPSC_H
#define PZ_SPSC_H

#include <stdatomic.h>
#include <stddef.h>

/* A cache line: what one side writes often is kept off the lines the
 * other side reads, or each write would cost the reader a miss. */
#define PZ_CACHE_LINE 64

/* Chunks kept for reuse at most: of chunk_size each, but for one that
 * may be bigger (a big record's). */
#define PZ_SPSC_SPARES 4

/* Written by the producer only; the consumer reads it. */
typedef struct pz_chunk {
    struct pz_chunk *_Atomic next; /* set once the producer has left it */
    _Atomic size_t tail;           /* bytes published */
    size_t cap;
    char data[];
} pz_chunk;

/* The producer's fields, the consumer's and the one both exchange are on
 * lines of their own: with the consumer's read position in the chunk,
 * next to the tail the producer stores for every record, the two threads
 * took the line from each other at every record (a third of the main
 * thread's time in a loop of p(i), in pz_pool_consume). */
typedef struct pz_spsc {
    /* producer */
    _Alignas(PZ_CACHE_LINE) pz_chunk *wr; /* its chunk */
    size_t wpos;   /* its write position in wr (>= published tail) */
    size_t chunk_size;
    /* consumer */
    _Alignas(PZ_CACHE_LINE) pz_chunk *rd; /* its chunk */
    size_t head;   /* bytes of rd consumed */
    /* Chunks the consumer has left, for the producer's next ones: fresh
     * memory costs a page fault per page the first time it is written,
     * which for small records costs more than the copy into them, and a
     * chunk freed by one thread and allocated again by the other went
     * back to the kernel in between (a loop of 2,000,000 tiny calls: 6,000
     * faults in the I/O thread for its records, a sixth of its time).
     * The consumer fills an empty place (compare-and-swap from NULL), the
     * producer empties one (exchange with NULL). */
    _Alignas(PZ_CACHE_LINE) pz_chunk *_Atomic spare[PZ_SPSC_SPARES];
} pz_spsc;

/* Returns 0, or -1 when out of memory. */
int pz_spsc_init(pz_spsc *q, size_t chunk_size);

/* Frees every chunk; only once neither side uses the queue. */
void pz_spsc_destroy(pz_spsc *q);

/* Producer: returns room for n contiguous bytes, or NULL when out of memory.
 * The bytes become visible only after pz_spsc_advance and pz_spsc_publish. */
char *pz_spsc_reserve(pz_spsc *q, size_t n);

/* Producer: counts n reserved bytes as written. */
static inline void pz_spsc_advance(pz_spsc *q, size_t n)
{
    q->wpos += n;
}

/* Producer: makes everything written so far visible to the consumer.  The
 * store is sequentially consistent: the wake-up protocol relies on it being
 * ordered before the producer's next load of the consumer's sleep flag. */
static inline void pz_spsc_publish(pz_spsc *q)
{
    atomic_store(&q->wr->tail, q->wpos);
}

/* Producer: as pz_spsc_publish, with a release store only, for a wake-up
 * protocol whose fence the consumer runs for both sides (membarrier:
 * pool.c). */
static inline void pz_spsc_publish_release(pz_spsc *q)
{
    atomic_store_explicit(&q->wr->tail, q->wpos, memory_order_release);
}

/* Consumer: returns the published, unconsumed bytes of the current chunk
 * (whole records) and sets *n, or returns NULL with *n = 0 when empty. */
const char *pz_spsc_peek(pz_spsc *q, size_t *n);

/* Consumer: calls fn with the published, unconsumed bytes of each chunk in
 * turn (whole records), until fn returns nonzero; returns that value, or
 * 0.  The consumer may change bytes in place: the producer never touches
 * what it has published. */
int pz_spsc_walk(pz_spsc *q, int (*fn)(char *data, size_t n, void *ud), void *ud);

/* Consumer: whether at least n published bytes are unconsumed (it looks
 * at as many chunks as that takes). */
int pz_spsc_holds(pz_spsc *q, size_t n);

/* Consumer: drops n bytes returned by the last peek. */
static inline void pz_spsc_consume(pz_spsc *q, size_t n)
{
    q->head += n;
}

#endif
