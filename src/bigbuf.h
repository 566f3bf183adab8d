/*
 * bigbuf.h - big results handed from the I/O thread to the main thread
 * without a copy, and the buffers they came in, recycled.
 *
 * The I/O thread reads a big frame into a buffer of its own.  Copying the
 * result into the done queue would cost the I/O thread a pass over every
 * byte; instead the record it publishes carries the buffer itself (a
 * pz_box, record flag PZ_REC_BOXED), and the main thread, once it has
 * decoded the result, hands the buffer back to a short list of spares
 * that the I/O thread takes its next big buffer from: fresh memory would
 * cost a page fault per page.
 *
 * Rules: a boxed buffer belongs to the record until the main thread
 * consumes it (pz_pool_consume), or to pz_pool_free.  The spares are
 * shared by the two threads (the main thread lending, lend.c, counts as
 * the I/O thread) under their own lock, held for a few instructions.
 */
#ifndef PZ_BIGBUF_H
#define PZ_BIGBUF_H

#include <pthread.h>
#include <stddef.h>

#include "buf.h"

/* Results at least this big travel boxed. */
#define PZ_BOX_MIN (256u << 10)
#define PZ_SPARES 4
/* Buffers bigger than this are freed, not kept: a few huge results must not
 * hold hundreds of MiB for the pool's whole life. */
#define PZ_SPARE_MAX (16u << 20)

/* The payload of a boxed RESULT record. */
typedef struct pz_box {
    char *base;          /* the buffer (malloc'ed) */
    size_t cap;          /* its size */
    const char *payload; /* the result, inside it */
    size_t len;
} pz_box;

typedef struct pz_bigbufs {
    pthread_mutex_t lock;
    int n;
    char *data[PZ_SPARES];
    size_t cap[PZ_SPARES];
} pz_bigbufs;

/* Returns 0, or -1 (errno set) when the lock cannot be made. */
int pz_bigbufs_init(pz_bigbufs *s);

/* Frees the spares; only once neither thread uses them. */
void pz_bigbufs_destroy(pz_bigbufs *s);

/* Keeps the buffer as a spare, or frees it when it is above PZ_SPARE_MAX or
 * the list is full (the smallest goes). */
void pz_bigbufs_give(pz_bigbufs *s, char *data, size_t cap);

/* Makes b a buffer of at least `need` bytes from a spare, keeping what b
 * holds (b's old memory is freed).  Returns 0, or -1 when no spare is big
 * enough (b unchanged). */
int pz_bigbufs_take(pz_bigbufs *s, pz_buf *b, size_t need);

#endif
