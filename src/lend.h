/*
 * lend.h - the lone-call shortcut: the main thread sends a lone call to an
 * idle worker itself and reads the answer itself (see lend.c for why and
 * for the locking rule).  Called by pool.c only, on the main thread.
 */
#ifndef PZ_LEND_H
#define PZ_LEND_H

struct pz_io;

/* When the I/O thread sleeps and no call is in flight, hands the queued
 * calls to workers itself.  Returns 1 when nothing is left for the I/O
 * thread to do, else 0 (it must be woken as usual).  When a lone call went
 * to a worker, lends that worker's socket to the main thread and stores it
 * in *lent_fd. */
int pz_lend_dispatch(struct pz_io *io, int *lent_fd);

/* Reads what the lent socket holds and publishes the records.  Gives the
 * socket back when its calls are answered, when it is closed, or when
 * `keep` is 0.  Returns the socket when it is still lent, else -1. */
int pz_lend_collect(struct pz_io *io, int keep);

#endif
