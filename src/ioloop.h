/*
 * ioloop.h - the I/O thread of a pool, as pool.c starts, parks and ends
 * it.  Its state and rules are in io.h.
 */
#ifndef PZ_IOLOOP_H
#define PZ_IOLOOP_H

#include <stddef.h>
#include <stdint.h>

#include "pool.h"

/* Sets up the I/O side of pool p (its epoll set and slots) before the
 * thread starts; returns NULL when out of memory or descriptors. */
struct pz_io *pz_io_new(pz_pool *p);

/* The thread's entry point: starts every slot's worker, then serves the
 * pool until stop has ended every process. */
void *pz_io_main(void *pool);

/* Main thread: takes (park = 1) or releases (0) the I/O thread's lock,
 * which keeps the thread out of everything but epoll_wait meanwhile. */
void pz_io_park(struct pz_io *io, int park);

/* Main thread: queues a cancel of call id for the I/O thread and wakes it.
 * Returns 0, or -1 when out of memory. */
int pz_io_cancel(struct pz_io *io, uint64_t id);

/* Main thread: copies the I/O thread's counts into *st (pool.h), whose
 * `slots` has room for one entry per slot.  Takes the I/O lock. */
void pz_io_get_stats(struct pz_io *io, pz_pool_stats *st);

/* After the thread ended: calls fn for each CALL frame it still held
 * (requeued first, then each slot's), in order. */
void pz_io_leftovers(struct pz_io *io, void (*fn)(const char *frame, size_t size, void *ud),
                     void *ud);

/* Frees the I/O side; the thread must have ended (or never started). */
void pz_io_free(struct pz_io *io);

#endif
