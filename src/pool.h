/*
 * pool.h - one pool: the state its main thread and its I/O thread share,
 * and the operations the Lua binding (lpool.c) calls.
 *
 * Threads and ownership.  A pool has two threads in the parent: the main
 * thread, which runs Lua and calls the functions below, and the I/O thread
 * (ioloop.c and the files of io.h), which talks to the workers.
 *   - Fields under "fixed" are written before the I/O thread starts and
 *     only read afterwards.
 *   - "main" fields are read and written by the main thread only.
 *   - The two threads exchange calls and records through two queues
 *     (spsc.h) and signal progress through the atomics below, each written
 *     by one side only, as marked.
 *   - Everything the I/O thread owns (struct pz_io, io.h) belongs to
 *     whichever thread holds its lock: the I/O thread holds it except while
 *     it sleeps in epoll_wait, and the main thread takes it only in lend.c,
 *     to send a lone call and read its answer itself.  While it holds the
 *     lock, the main thread is the consumer of `submit` and the producer of
 *     `done` in the I/O thread's place; the lock hands those roles over, so
 *     each queue still has one producer and one consumer at any moment.
 */
#ifndef PZ_POOL_H
#define PZ_POOL_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <sys/types.h>

#include <lua.h>

#include "bigbuf.h"
#include "buf.h"
#include "frame.h"
#include "spin.h"
#include "spsc.h"

/* What the main thread waits for: PROGRESS, that calls_done or calls_taken
 * reach their targets (main_done_target, main_taken_target); INIT, that
 * every slot has settled; EXIT, that the I/O thread has finished. */
enum { PZ_WAIT_NONE = 0, PZ_WAIT_PROGRESS = 1, PZ_WAIT_INIT = 2, PZ_WAIT_EXIT = 3 };

/* A target that is never reached. */
#define PZ_NEVER UINT64_MAX

/* Wait outcomes. */
enum {
    PZ_WAITED = 0,
    PZ_WAIT_INTERRUPTED = 1,
    PZ_WAIT_FATAL = 2,
    PZ_WAIT_TIMEOUT = 3,
    PZ_WAIT_HALTED = 4 /* fail_fast: a failure stopped dispatching */
};

/* Published records (bytes) that make the I/O thread wake a waiting main
 * thread early, so that it drains them, and that p(...) drains before it
 * queues its call (lsubmit.c).  About 5,000 tiny results: a
 * main thread that waits while they pile up drains them all at the end,
 * alone, with the workers done and their CPUs idle (200,000 tiny calls on
 * 2 workers: the last 5-7 ms of a 20 ms loop, at 1 MiB).  At 64 KiB it
 * drains them while the workers run, for a wake-up per 64 KiB: 11.5 M/s
 * [11.2-12.3] against 10.3 [8.5-12.5], 10 alternated rounds. */
#define PZ_BACKLOG_WAKE (1u << 16)

/* Prepares a fresh Lua state inside a worker (package.preload entries):
 * given by the module's entry point, so that the pool code does not depend
 * on it. */
typedef void (*pz_state_setup)(lua_State *L);

typedef struct pz_options {
    int max_deaths;           /* a call that killed this many workers is an error */
    int respawn;              /* replace dead workers */
    uint32_t max_message;     /* largest encoded arguments or result */
    uint32_t max_inflight;    /* most calls queued in one worker */
    int64_t window_ns;        /* in-flight depth covers this much work */
    int init_attempts;        /* init crashes before a slot is given up */
    int64_t kill_grace_ns;    /* SIGTERM -> SIGKILL */
    int64_t spin_ns;          /* waits poll this long before sleeping (spin.h) */
    int kill_leftovers;       /* kill what a worker leaves running (spawner.h) */
    uint32_t timeout_ms;      /* a call running longer is ended; 0: none */
    int64_t init_timeout_ns;  /* a worker not initialized this long after it
                               * was started is ended; 0: none */
    int retries;              /* a call whose executor raised runs again, this often */
    uint64_t max_calls;       /* a worker is replaced after this many calls; 0: never */
    int fail_fast;            /* the first failure stops dispatching */
} pz_options;

/* What the pool counts for p:stats() (pz_pool_stats): the I/O thread's
 * share, copied under its lock. */
typedef struct pz_slot_stats {
    pid_t pid;           /* the slot's current worker, 0 when none */
    uint64_t calls;      /* answers from the slot's workers */
    uint64_t busy_ns;    /* the time those calls ran, as the workers measured */
    int init_record;     /* the record (index + 1) of the worker whose
                          * INIT_OK came last, 0 when none (answer.c) */
    uint32_t init_gen;   /* and that record's generation then */
    int init_alive;      /* that worker still lives (filled by
                          * pz_pool_get_stats): p.pids[slot] is its pid */
} pz_slot_stats;

typedef struct pz_pool_stats {
    uint64_t done, failed, deaths, respawns, recycles, timeouts, cancelled, retries;
    uint64_t retrying;        /* calls that raised and run again: their attempts are kept */
    uint64_t running;    /* calls in workers */
    uint64_t queued;     /* calls requeued, waiting for a worker */
    uint64_t taken;      /* calls taken from the submit queue */
    uint64_t cancelled_unseen; /* calls in the submit queue cancelled there */
    int64_t started_ns;  /* when the pool started */
    /* calls_done sampled now and then, oldest first (rates): */
    int nsamples;
    int64_t sample_ns[8];
    uint64_t sample_done[8];
    pz_slot_stats *slots; /* nslots of them, filled by pz_pool_stats */
} pz_pool_stats;

struct pz_io;

typedef struct pz_pool {
    /* fixed */
    int nslots;
    pz_options opt;
    pz_buf *init;             /* per slot: the INIT payload */
    char ***launch;           /* per slot: the launcher's argv (NULL-ended,
                               * malloc'ed with its strings) or NULL for a
                               * forked worker; NULL when no slot has one */
    struct pz_slot_shared *shared; /* per worker record (io.h), mapped shared
                                    * with the workers */
    struct pz_arena *arena;   /* big strings shared with the workers (arena.h),
                               * or NULL (remote slots, or the region could
                               * not be mapped); its calls area and reader
                               * are the main thread's */
    int io_wake_fd;           /* eventfd: main -> io */
    int main_wake_fd;         /* eventfd: io -> main */
    int spawner_fd;
    pid_t spawner_pid;
    pthread_t thread;
    int thread_started;
    struct pz_io *io;
    int asym_fence;           /* the submit queue's wake-up uses membarrier
                               * (pool.c, kick): its fence is the I/O thread's */

    /* written by the main thread.  Each group from here on starts a cache
     * line of its own (pz_spsc's are aligned too): a field one thread
     * writes often must not share a line with one the other reads often
     * (the pool is allocated aligned, pz_pool_new). */
    pz_spsc submit;           /* CALL frames; producer: main */
    _Alignas(PZ_CACHE_LINE) _Atomic int stop_requested;
    _Atomic int64_t finish_ns; /* stop: absolute deadline for running calls, or -1 */
    _Atomic int stop_hurry;   /* stop: a signal came: that deadline is now */
    _Atomic int main_waiting; /* PZ_WAIT_*: wake main when that is met (io clears it) */
    _Atomic uint64_t main_done_target;  /* PZ_WAIT_PROGRESS: calls_done to reach */
    _Atomic uint64_t main_taken_target; /* PZ_WAIT_PROGRESS: or calls_taken to reach */
    _Atomic int io_woken;     /* a wake-up is on its way (main sets, io clears) */

    /* written by the I/O thread (or the main thread lending, see above) */
    pz_spsc done;             /* records; producer: io */
    pz_bigbufs spares;        /* buffers of boxed results (bigbuf.h): both */
    int spares_ready;         /* its lock was made (pz_pool_free) */
    /* Alone: the main thread reads it at every call it queues. */
    _Alignas(PZ_CACHE_LINE) _Atomic int io_sleeping; /* io waits in epoll and
                                                      * has room for calls */
    /* Stored at each pz_io_publish that changed them: */
    _Alignas(PZ_CACHE_LINE) _Atomic uint64_t calls_done; /* RESULT/ERROR records published */
    _Atomic uint64_t calls_taken; /* calls taken from the submit queue */
    _Atomic uint64_t bytes_taken; /* their bytes (bytes_submitted's side) */
    _Atomic int slots_settled;    /* slots that initialized once or were given up */
    _Atomic int fatal;        /* the pool cannot go on: fatal_reason says why */
    _Atomic int halted;       /* fail_fast: a failure stopped dispatching */
    const char *fatal_reason; /* set before `fatal`; owned as fatal_owned says */
    int fatal_owned;          /* fatal_reason was malloc'ed */
    _Atomic int finished;     /* the I/O thread has ended everything */
    _Atomic size_t backlog;   /* bytes published and not yet drained (approx.;
                               * io adds, main subtracts) */

    /* main */
    _Alignas(PZ_CACHE_LINE) uint64_t next_id; /* ids handed out: 1 .. next_id - 1 */
    uint64_t taken_seen;      /* calls_taken and bytes_taken as last read */
    uint64_t bytes_taken_seen; /* (pz_lpool_has_room) */
    uint64_t drained;         /* RESULT/ERROR records consumed */
    uint64_t bytes_submitted; /* bytes of CALL frames queued so far */
    size_t consumed;          /* bytes drained, not yet taken off backlog */
    int stopped;              /* stop ran (or is running) */
    int reaped;               /* threads and processes are gone */
    int forked;               /* this process is a fork of `owner` (the
                               * script forked while the pool ran): its I/O
                               * thread, spawner and workers are owner's,
                               * so nothing here may use them (pool.c's
                               * pthread_atfork handler sets it, and stopped) */
    pid_t owner;              /* the process that made the pool */
    pz_spin spin;             /* how waits for calls poll */
    int lent_fd;              /* a worker's socket lent to this thread, or -1
                               * (lend.c); stale (closed, maybe reused) once
                               * the I/O thread ended the lend: polling it
                               * then only wakes this thread once, and
                               * pz_lend_collect, which looks under the lock,
                               * returns -1 */
    struct pz_pool *next_running; /* pool.c's list of running pools (its lock) */
} pz_pool;

/* Creates a pool: forks the spawner, starts the I/O thread, which spawns
 * one worker per INIT payload.  Takes ownership of `init` (nslots buffers,
 * malloc'ed array) and of `launch` (see the field; may be NULL), even on
 * failure.  `setup` prepares each worker's Lua state.  Returns NULL with
 * *err set to a static description and errno to the cause. */
pz_pool *pz_pool_new(int nslots, pz_buf *init, char ***launch, const pz_options *opt,
                     pz_state_setup setup, const char **err);

/* Frees a per-slot launcher array as pz_pool_new takes it. */
void pz_pool_free_launch(char ***launch, int nslots);

/* Main thread: queues a call whose encoded argument tuple is args[0..len)
 * (at most opt.max_message bytes), for the taker `tag` (frame.h) and with
 * a timeout of its own (timeout_ms, 0 for the pool's) and the CALL flags
 * `flags` (PZ_CALL_CHUNK or 0), and wakes the I/O thread if it sleeps with
 * room for it.  Returns the call's id, or 0 when
 * out of memory (nothing is queued then). */
uint64_t pz_pool_submit(pz_pool *p, const char *args, size_t len, uint8_t tag, uint32_t timeout_ms,
                        uint8_t flags);

/* Main thread: pz_pool_submit in two steps, for a caller that encodes
 * straight into the queue (one copy less): pz_pool_reserve_call returns
 * room for up to max_len bytes of arguments (NULL when out of memory),
 * then pz_pool_commit_call queues the first len of them, as
 * pz_pool_submit would.  Nothing else may use the queue in between. */
char *pz_pool_reserve_call(pz_pool *p, size_t max_len);
uint64_t pz_pool_commit_call(pz_pool *p, size_t len, uint8_t tag, uint32_t timeout_ms, uint8_t flags);

/* Main thread: the first record the I/O thread published and the main
 * thread has not consumed (frame.h describes the records), read into *f;
 * returns 0 when there is none.  A lone call's answer is read first (see
 * lend.c).  The record stays until pz_pool_consume: nothing else may consume
 * records meanwhile. */
int pz_pool_peek_record(pz_pool *p, pz_frame *f);

/* Main thread: drops the record that pz_pool_peek_record returned.  A
 * call's RESULT or ERROR record frees the call's big strings in the arena,
 * and the ring block its decode read last (arena.h): decode it first. */
void pz_pool_consume(pz_pool *p, const pz_frame *f);

/* Main thread: calls queued so far, and how many of them have had their
 * RESULT or ERROR record consumed. */
static inline uint64_t pz_pool_calls(const pz_pool *p)
{
    return p->next_id - 1;
}
static inline uint64_t pz_pool_finished(const pz_pool *p)
{
    return p->drained;
}

/* Main thread: calls queued that no worker has taken yet (as published). */
static inline uint64_t pz_pool_pending(pz_pool *p)
{
    return p->next_id - 1 - atomic_load(&p->calls_taken);
}

/* Main thread: the bytes of the calls pz_pool_pending counts. */
static inline uint64_t pz_pool_pending_bytes(pz_pool *p)
{
    return p->bytes_submitted - atomic_load(&p->bytes_taken);
}

/* Main thread: RESULT/ERROR records published so far (drained or not). */
static inline uint64_t pz_pool_published(pz_pool *p)
{
    return atomic_load(&p->calls_done);
}

/* Main thread: whether records pile up undrained (PZ_BACKLOG_WAKE). */
static inline int pz_pool_backlogged(pz_pool *p)
{
    return atomic_load_explicit(&p->backlog, memory_order_relaxed) >= PZ_BACKLOG_WAKE;
}

/* Main thread: slots that have initialized once or been given up (as
 * published; records may still wait to be drained). */
int pz_pool_slots_settled(pz_pool *p);

/* Main thread: why the pool cannot go on (no worker is left and none can
 * be started, or the I/O thread ran out of memory), or NULL. */
const char *pz_pool_fatal(pz_pool *p);

/* How a sleep learns that a signal was handled before it could block
 * signals: check(ud), called with every signal blocked, returns nonzero
 * when a handler has run since the caller's wait began (Ctrl-C's sets a
 * Lua hook: lpool.c compares it with the hook the pool's last wait
 * returned with). */
typedef struct pz_signalled {
    int (*check)(void *ud);
    void *ud;
} pz_signalled;

/* Main thread: sleeps until what `kind` waits for (see PZ_WAIT_*; for
 * PROGRESS, the two targets, PZ_NEVER for none) may have come true,
 * records wait to be drained, the pool failed, the deadline (absolute,
 * pz_now_ns; -1 for none) passed or a signal interrupted the sleep: one
 * that arrives during the sleep, or one `signalled` says was handled
 * before it (it is not begun then).  Returns PZ_WAITED (check again),
 * PZ_WAIT_FATAL, PZ_WAIT_HALTED, PZ_WAIT_TIMEOUT or PZ_WAIT_INTERRUPTED.
 * The caller drains records and checks its own condition before each
 * call. */
int pz_pool_sleep(pz_pool *p, int kind, uint64_t done_target, uint64_t taken_target,
                  int64_t deadline, const pz_signalled *signalled);

/* Main thread: asks the I/O thread to stop (finish_ns: absolute deadline for
 * running calls, or -1 to wait for them), then joins it and reaps the
 * spawner.  Signals do not cut it short: it always ends with every process
 * reaped.  But when `signalled` (may be NULL) says one came during the
 * wait (Ctrl-C), the running calls' deadline becomes that moment: they are
 * terminated as a finish_ns then passed would have them (SIGTERM, SIGKILL
 * kill_grace later), instead of being waited for however long they take.
 * Afterwards the submit queue and the I/O thread's queues hold the calls
 * that never finished: see pz_pool_aborted. */
void pz_pool_stop(pz_pool *p, int64_t finish_ns, const pz_signalled *signalled);

/* Main thread, after pz_pool_stop: calls fn for each CALL frame that never
 * finished (frame bytes), in order; not for a cancelled call, whose record
 * (its cancellation) is its end.  Consumes nothing: called again (fn
 * raised), it finds them all again; pz_pool_free frees them. */
void pz_pool_aborted(pz_pool *p, void (*fn)(const char *frame, size_t size, void *ud), void *ud);

/* Main thread: asks the I/O thread to cancel call id (dispatch.c says how).
 * Returns 0, or -1 when out of memory. */
int pz_pool_cancel(pz_pool *p, uint64_t id);

/* Main thread: the I/O thread's counts; st->slots has room for nslots. */
void pz_pool_get_stats(pz_pool *p, pz_pool_stats *st);

/* Frees the pool, its descriptors, buffers and shared memory.  The pool
 * must be stopped (pz_pool_stop). */
void pz_pool_free(pz_pool *p);

#endif
