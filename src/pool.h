/*
 * pool.h - one pool: the state its main thread and its I/O thread share,
 * and the operations the Lua binding (core.c) calls.
 *
 * Ownership: fields under "fixed" are written before the I/O thread starts
 * and only read afterwards; "main" fields belong to the thread that runs
 * Lua; "io" fields to the I/O thread (ioloop.c).  They meet only through the
 * two queues and the atomics below.
 */
#ifndef PZ_POOL_H
#define PZ_POOL_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <sys/types.h>

#include "buf.h"
#include "spin.h"
#include "spsc.h"

/* What the main thread waits for. */
enum { PZ_WAIT_NONE = 0, PZ_WAIT_CALLS = 1, PZ_WAIT_INIT = 2, PZ_WAIT_EXIT = 3 };

/* Wait outcomes. */
enum { PZ_WAITED = 0, PZ_WAIT_INTERRUPTED = 1, PZ_WAIT_FATAL = 2, PZ_WAIT_TIMEOUT = 3 };

/* Published records (bytes) that make the I/O thread wake a waiting main
 * thread early, so that it drains them. */
#define PZ_BACKLOG_WAKE (1u << 20)


typedef struct pz_options {
    int max_deaths;           /* a call that killed this many workers is an error */
    int respawn;              /* replace dead workers */
    uint32_t max_message;     /* largest encoded arguments or result */
    uint32_t max_inflight;    /* most calls queued in one worker */
    int64_t window_ns;        /* in-flight depth covers this much work */
    int init_attempts;        /* init crashes before a slot is given up */
    int64_t kill_grace_ns;    /* SIGTERM -> SIGKILL */
    int64_t spin_ns;          /* waits poll this long before sleeping (spin.h) */
} pz_options;

struct pz_io;

typedef struct pz_pool {
    /* fixed */
    int nslots;
    pz_options opt;
    pz_buf *init;             /* per slot: INIT payload (shared buffers are copied) */
    struct pz_slot_shared *shared; /* per slot, mapped shared with the workers */
    int io_wake_fd;           /* eventfd: main -> io */
    int main_wake_fd;         /* eventfd: io -> main */
    int spawner_fd;
    pid_t spawner_pid;
    pthread_t thread;
    int thread_started;

    /* main -> io */
    pz_spsc submit;           /* CALL frames, producer: main */
    _Atomic int io_sleeping;  /* io waits in epoll and has room for calls */
    _Atomic int io_woken;     /* a wake-up is already on its way */
    _Atomic int stop_requested;
    _Atomic int64_t finish_ns; /* stop: absolute deadline for running calls, or -1 */

    /* io -> main */
    pz_spsc done;             /* records, producer: io */
    _Atomic uint64_t calls_done; /* RESULT/ERROR records published */
    _Atomic int settled;      /* slots that initialized once or were given up */
    _Atomic int fatal;        /* a FATAL record was published */
    _Atomic int io_finished;  /* the I/O thread has ended everything */
    _Atomic size_t backlog;   /* bytes published and not yet drained (approx.) */
    _Atomic int main_waiting; /* PZ_WAIT_*: wake main when that is met */
    _Atomic uint64_t main_target; /* PZ_WAIT_CALLS: calls_done to reach */

    /* main */
    uint64_t next_id;         /* ids handed out: 1 .. next_id - 1 */
    uint64_t drained;         /* RESULT/ERROR records turned into Lua values */
    int stopped;              /* stop ran (or is running) */
    int reaped;               /* threads and processes are gone */
    pz_spin spin;             /* how waits for calls poll */
    int lent_fd;              /* a worker's socket lent to this thread, or -1;
                               * stale (closed, maybe reused) once the I/O
                               * thread ended the lend: polling it then only
                               * wakes this thread once, and pz_io_collect,
                               * which looks under the lock, returns -1 */

    struct pz_pool *next_running; /* pool.c's list of running pools */

    /* io */
    struct pz_io *io;
} pz_pool;

/* Creates a pool: forks the spawner, starts the I/O thread, which spawns
 * one worker per INIT payload.  Takes ownership of `init` (nslots buffers,
 * malloc'ed array).  Returns NULL with *err set to a static description. */
pz_pool *pz_pool_new(int nslots, pz_buf *init, const pz_options *opt, const char **err);

/* Main thread: makes the published CALL frame visible and wakes the I/O
 * thread if it sleeps with room for calls. */
void pz_pool_kick(pz_pool *p);

/* Main thread: reads the answers a lent socket holds (see
 * pz_io_dispatch_now), before records are drained. */
void pz_pool_collect(pz_pool *p);

/* Main thread: sleeps until what `kind` waits for (see PZ_WAIT_*) may have
 * come true, records wait to be drained, the pool failed, the deadline
 * (absolute, pz_now_ns; -1 for none) passed or a signal interrupted the
 * sleep.  Returns PZ_WAITED (check again), PZ_WAIT_FATAL, PZ_WAIT_TIMEOUT
 * or PZ_WAIT_INTERRUPTED.  The caller drains records and checks its own
 * condition before each call. */
int pz_pool_sleep(pz_pool *p, int kind, int64_t deadline);

/* Main thread: asks the I/O thread to stop (finish_ns: absolute deadline for
 * running calls, or -1 to wait for them), then joins it and reaps the
 * spawner.  Signals do not interrupt it.  Afterwards the submit queue and
 * the io's requeue hold the calls that never finished: see pz_pool_aborted. */
void pz_pool_stop(pz_pool *p, int64_t finish_ns);

/* Main thread, after pz_pool_stop: calls fn for each CALL frame that never
 * finished (frame bytes), in order. */
void pz_pool_aborted(pz_pool *p, void (*fn)(const char *frame, size_t size, void *ud), void *ud);

/* Frees the pool, its descriptors, buffers and shared memory.  The pool
 * must be stopped (pz_pool_stop). */
void pz_pool_free(pz_pool *p);

/* I/O thread entry (ioloop.c). */
void *pz_io_main(void *pool);
struct pz_io *pz_io_new(pz_pool *p);
void pz_io_free(struct pz_io *io);
/* Main thread: when the I/O thread sleeps and no call is in flight, hands
 * the queued calls to workers itself, sparing the wake-up of the I/O thread
 * (one cross-CPU hop of a round trip).  Returns 1 when nothing is left for
 * the I/O thread to do, else 0 (it must be woken as usual).  When a lone
 * call went to a worker, lends that worker's socket to the main thread
 * (ioloop.c, "lending") and stores it in *lent_fd. */
int pz_io_dispatch_now(struct pz_io *io, int *lent_fd);
/* Main thread: takes (park = 1) or releases (0) the I/O thread's lock,
 * which keeps the thread out of everything but epoll_wait meanwhile. */
void pz_io_park(struct pz_io *io, int park);
/* Main thread: reads what the lent socket holds and publishes the records.
 * Gives the socket back when its calls are answered, when it is closed, or
 * when `keep` is 0.  Returns the socket when it is still lent, else -1. */
int pz_io_collect(struct pz_io *io, int keep);
/* After the I/O thread ended: frames to abort (requeue then in-flight). */
void pz_io_leftovers(struct pz_io *io, void (*fn)(const char *frame, size_t size, void *ud), void *ud);

#endif
