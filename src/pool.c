/*
 * pool.c - a pool's life from the main thread's side: creation (eventfds,
 * shared memory, spawner, I/O thread), queuing calls and consuming records,
 * waking the I/O thread, waiting, stopping, freeing.  Main thread only
 * (the rules are in pool.h).
 */
#include <errno.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "arena.h"
#include "run.h"
#include "forkserver.h"
#include "ioloop.h"
#include "lend.h"
#include "pool.h"
#include "spawner.h"
#include "sys.h"
#include "worker.h"

#define CHUNK_SIZE 65536

/* Pools of this process whose I/O thread runs.  A fork while some other
 * thread is inside malloc hands the child a locked allocator: glibc's
 * malloc guards against that, but other allocators (a sanitizer's, for one)
 * do not, and workers forked from that child then hang at their first
 * allocation.  So the spawner is forked with every running pool's I/O
 * thread parked on its own lock, which it holds except while it sleeps in
 * epoll_wait.  The list and its lock belong to the process that made the
 * pools: a forked child (a spawner, then its workers) starts with neither
 * (forget_parents_pools), so a pool made inside a worker finds a list of
 * its own. */
static pthread_mutex_t running_lock = PTHREAD_MUTEX_INITIALIZER;
static pz_pool *running_pools;

static void park_io_threads(void)
{
    pthread_mutex_lock(&running_lock);
    for (pz_pool *q = running_pools; q; q = q->next_running)
        pz_io_park(q->io, 1);
}

static void unpark_io_threads(void)
{
    for (pz_pool *q = running_pools; q; q = q->next_running)
        pz_io_park(q->io, 0);
    pthread_mutex_unlock(&running_lock);
}

/* The pools that ran in the processes this one was forked from, as the
 * fork handler below (mark_pools_forked) found them: running_pools is
 * emptied there, before the spawner's own code runs.  A fork's copies are
 * never freed (pz_pool_free): kept here, they are no leak. */
static pz_pool *parents_pools;

/* Runs in the spawner right after the fork (or, from the fork server, the
 * clone), after mark_pools_forked: none of the parent's locks, nor its
 * pools, are the child's (their threads did not come along). */
static void forget_parents_pools(void)
{
    /* Their regions' pages must go when those pools go, not when this
     * spawner does. */
    for (pz_pool *q = parents_pools; q; q = q->next_running)
        pz_arena_unmap(q->arena);
    parents_pools = NULL;
    /* (done by the handler already; a clone runs no fork handler) */
    running_lock = (pthread_mutex_t)PTHREAD_MUTEX_INITIALIZER;
    running_pools = NULL;
}

/* pthread_atfork's child handler: the script forked (ffi.C.fork, a C
 * module's fork) while pools ran.  Their I/O threads did not come along,
 * and their spawners, workers and sockets are the parent's: the child's
 * copies are marked so that using one raises, and collecting one (at the
 * child's exit, when its Lua state closes) neither waits for a thread
 * that is not there nor touches the parent's workers (nor frees what the
 * I/O thread owned: pz_pool_free).  The list starts empty, so that a pool the child makes parks
 * no I/O lock a vanished thread may hold.  Runs in the child of every
 * fork of this process (a spawner's too: forget_parents_pools then takes
 * the list from parents_pools); the list is changed by the main thread
 * only, under running_lock, so a fork the main thread makes sees it
 * whole. */
static void mark_pools_forked(void)
{
    /* Every fork, the spawner's included: a flag set around the parent's
     * own fork of its spawner was seen by a fork another thread made at
     * that moment, whose child then kept the list and a lock held by a
     * thread it does not have.  Plain stores only (async-signal-safe). */
    pz_pool *last = NULL;
    for (pz_pool *q = running_pools; q; q = q->next_running) {
        q->forked = 1;
        q->stopped = 1;
        last = q;
    }
    if (last) { /* before those of a fork this process came from */
        last->next_running = parents_pools;
        parents_pools = running_pools;
    }
    running_lock = (pthread_mutex_t)PTHREAD_MUTEX_INITIALIZER;
    running_pools = NULL;
}

static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;
static int atfork_errno; /* pthread_atfork's failure, if it failed */

static void register_atfork(void)
{
    atfork_errno = pthread_atfork(NULL, NULL, mark_pools_forked);
}

static void add_running(pz_pool *p)
{
    pthread_mutex_lock(&running_lock);
    p->next_running = running_pools;
    running_pools = p;
    pthread_mutex_unlock(&running_lock);
}

static void forget_running(pz_pool *p)
{
    pthread_mutex_lock(&running_lock);
    for (pz_pool **q = &running_pools; *q; q = &(*q)->next_running)
        if (*q == p) {
            *q = p->next_running;
            break;
        }
    pthread_mutex_unlock(&running_lock);
}

static void free_init(pz_buf *init, int n)
{
    for (int i = 0; i < n; i++)
        pz_buf_free(&init[i]);
    free(init);
}

void pz_pool_free_launch(char ***launch, int nslots)
{
    if (!launch)
        return;
    for (int i = 0; i < nslots; i++) {
        for (char **a = launch[i]; a && *a; a++)
            free(*a);
        free(launch[i]);
    }
    free(launch);
}

pz_pool *pz_pool_new(int nslots, pz_buf *init, char ***launch, const pz_options *opt,
                     pz_state_setup setup, const char **err)
{
    /* Aligned as its cache-line groups are (pool.h); sizeof is a multiple
     * of the alignment. */
    pz_pool *p = aligned_alloc(_Alignof(pz_pool), sizeof *p);
    if (p)
        memset(p, 0, sizeof *p);
    if (!p) {
        free_init(init, nslots);
        pz_pool_free_launch(launch, nslots);
        *err = "out of memory";
        return NULL;
    }
    p->nslots = nslots;
    p->owner = getpid();
    /* Without the handler, a fork of the script would hang at its end on
     * the copy of this pool (and a pool it made would park locks of
     * threads it does not have). */
    pthread_once(&atfork_once, register_atfork);
    if (atfork_errno != 0) {
        free(p);
        free_init(init, nslots);
        pz_pool_free_launch(launch, nslots);
        errno = atfork_errno;
        *err = "pthread_atfork failed";
        return NULL;
    }
    p->opt = *opt;
    p->spin.budget_ns = opt->spin_ns;
    p->init = init;
    p->launch = launch;
    p->io_wake_fd = p->main_wake_fd = p->spawner_fd = p->lent_fd = -1;
    p->next_id = 1;
    atomic_init(&p->finish_ns, -1);
    atomic_init(&p->stop_hurry, 0);
    if (pz_bigbufs_init(&p->spares) != 0) {
        *err = "pthread_mutex_init failed";
        goto fail;
    }
    p->spares_ready = 1;
    if (pz_spsc_init(&p->submit, CHUNK_SIZE) != 0 || pz_spsc_init(&p->done, CHUNK_SIZE) != 0) {
        *err = "out of memory";
        goto fail;
    }
    /* Shared with every worker through the spawner: see worker.h.  Its
     * memfd goes to the fork server, if the spawner comes from there. */
    int shared_fd;
    p->shared = pz_map_shared(pz_slots_shared_size(nslots), 0, &shared_fd);
    if (!p->shared) {
        *err = "cannot map memory shared with the workers";
        goto fail;
    }
    /* Without it every string goes inline: a pool works without. */
    if (!launch)
        p->arena = pz_arena_new(2 * nslots);
    pz_spawner_config sc = {p->shared, p->arena, setup, forget_parents_pools, opt->kill_leftovers,
                            (char *const *const *)p->launch, nslots, shared_fd};
    int forked = 0;
    if (pz_forkserver_spawner(&sc, &p->spawner_pid, &p->spawner_fd) != 0) {
        park_io_threads();
        forked = pz_spawner_start(&sc, &p->spawner_pid, &p->spawner_fd);
        unpark_io_threads();
    }
    /* The spawner has mapped both regions (or inherited them). */
    if (shared_fd >= 0)
        close(shared_fd);
    pz_arena_close_fd(p->arena);
    if (forked != 0) {
        *err = "cannot fork the spawner process";
        goto fail;
    }
    /* Made only now: the memfds above are closed, so that a process short
     * of descriptors needs no more of them than it did without those. */
    p->io_wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    p->main_wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (p->io_wake_fd < 0 || p->main_wake_fd < 0) {
        *err = "eventfd failed";
        goto fail;
    }
    if (pz_set_nonblock(p->spawner_fd) != 0) {
        *err = "cannot make the spawner socket non-blocking";
        goto fail;
    }
    p->io = pz_io_new(p);
    if (!p->io) {
        *err = "cannot set up the I/O thread's epoll";
        goto fail;
    }
    /* The I/O thread takes no signal: Ctrl-C must reach the main thread,
     * which is the one running Lua. */
    sigset_t all, old;
    sigfillset(&all);
    /* Registered again by each pool: a worker's own pool is in another
     * process, which registers for itself. */
    p->asym_fence = pz_membarrier_register() == 0;
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int rc = pthread_create(&p->thread, NULL, pz_io_main, p);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0) {
        errno = rc;
        *err = "cannot start the I/O thread";
        goto fail;
    }
    p->thread_started = 1;
    add_running(p);
    return p;
fail:
    {
        int e = errno;
        p->stopped = 1;
        pz_pool_stop(p, 0, NULL);
        pz_pool_free(p);
        errno = e;
    }
    return NULL;
}

/* ---- calls in, records out ----------------------------------------------- */

/* Makes the queued calls visible to the I/O thread, and wakes it if it
 * sleeps with room for them, unless the lone-call shortcut (lend.c) could
 * do without it. */
static void kick(pz_pool *p)
{
    /* Publish, then look whether the I/O thread sleeps: it sets the flag,
     * then looks at the queue, and one of the two must see the other's
     * store.  That takes a full fence between each side's store and load.
     * With membarrier, the I/O thread runs it for both sides before it
     * sleeps (ioloop.c), and a call costs a plain store and load here:
     * the fence a call paid was an eighth of the main thread's time in a
     * loop of p(i). */
    if (p->asym_fence)
        pz_spsc_publish_release(&p->submit);
    else
        pz_spsc_publish(&p->submit);
    /* A second call: the I/O thread takes the lent worker back, so that it
     * can feed it too. */
    if (p->lent_fd >= 0)
        p->lent_fd = pz_lend_collect(p->io, 0);
    atomic_signal_fence(memory_order_seq_cst); /* the load stays after the store */
    int sleeping = p->asym_fence ? atomic_load_explicit(&p->io_sleeping, memory_order_relaxed)
                                 : atomic_load(&p->io_sleeping);
    if (sleeping && !atomic_exchange(&p->io_woken, 1)) {
        if (pz_lend_dispatch(p->io, &p->lent_fd)) {
            atomic_store(&p->io_woken, 0);
            return;
        }
        pz_wake(p->io_wake_fd, "the I/O thread");
    }
}

char *pz_pool_reserve_call(pz_pool *p, size_t max_len)
{
    char *d = pz_spsc_reserve(&p->submit, PZ_FRAME_HEADER + max_len);
    return d ? d + PZ_FRAME_HEADER : NULL;
}

uint64_t pz_pool_commit_call(pz_pool *p, size_t len, uint8_t tag, uint32_t timeout_ms, uint8_t flags)
{
    char *d = p->submit.wr->data + p->submit.wpos;
    uint64_t id = p->next_id++;
    pz_frame_header(d, PZ_F_CALL, id, (uint32_t)len);
    pz_frame_set_tag(d, tag);
    pz_frame_set_timeout_ms(d, timeout_ms);
    pz_frame_set_flags(d, flags);
    pz_spsc_advance(&p->submit, PZ_FRAME_HEADER + len);
    p->bytes_submitted += PZ_FRAME_HEADER + len;
    kick(p);
    return id;
}

uint64_t pz_pool_submit(pz_pool *p, const char *args, size_t len, uint8_t tag, uint32_t timeout_ms,
                        uint8_t flags)
{
    char *d = pz_pool_reserve_call(p, len);
    if (!d)
        return 0;
    if (len)
        memcpy(d, args, len);
    return pz_pool_commit_call(p, len, tag, timeout_ms, flags);
}

/* Takes what the main thread consumed off p->backlog: once per batch
 * rather than once per record (an atomic add costs a tiny call's time). */
static void settle_backlog(pz_pool *p)
{
    if (p->consumed) {
        atomic_fetch_sub_explicit(&p->backlog, p->consumed, memory_order_relaxed);
        p->consumed = 0;
    }
}

int pz_pool_peek_record(pz_pool *p, pz_frame *f)
{
    size_t avail;
    const char *d = pz_spsc_peek(&p->done, &avail);
    if (!d && p->lent_fd >= 0) {
        p->lent_fd = pz_lend_collect(p->io, 1);
        d = pz_spsc_peek(&p->done, &avail);
    }
    if (!d) {
        settle_backlog(p);
        return 0;
    }
    pz_frame_read(d, f);
    /* The kind of an ERROR record, without the arena's mark (consume
     * reads it from the record). */
    if (f->type == PZ_F_ERROR)
        f->flags &= (uint8_t)~PZ_REC_HELD;
    if (f->type == PZ_F_RESULT && (f->flags & PZ_REC_BOXED)) {
        pz_box box;
        memcpy(&box, f->payload, sizeof box);
        f->payload = box.payload;
        f->len = box.len; /* f->size stays the record's */
    }
    return 1;
}

/* The buffer of the boxed record at d, handed back as a spare. */
static void unbox(pz_pool *p, const char *d)
{
    pz_box box;
    memcpy(&box, d + PZ_FRAME_HEADER, sizeof box);
    pz_bigbufs_give(&p->spares, box.base, box.cap);
}

void pz_pool_consume(pz_pool *p, const pz_frame *f)
{
    size_t avail;
    if (f->type == PZ_F_RESULT && (f->flags & PZ_REC_BOXED))
        unbox(p, pz_spsc_peek(&p->done, &avail)); /* f's record: the first */
    if (f->type == PZ_F_RESULT && (f->flags & PZ_REC_RUN))
        p->drained += pz_run_record_count(f);
    else if (f->type == PZ_F_RESULT || f->type == PZ_F_ERROR)
        p->drained++;
    if (p->arena) {
        /* A call's big arguments go with its last record, unless a worker
         * may still read them (f's kind lacks the mark: it is read from
         * the record); a RELEASE record comes then.  A ring's blocks go
         * once the record that read them is done with. */
        /* (A run's calls have no big arguments: run.h.) */
        int held = f->type == PZ_F_ERROR &&
                   (pz_frame_flags(pz_spsc_peek(&p->done, &avail)) & PZ_REC_HELD);
        if (f->type == PZ_F_RESULT || (f->type == PZ_F_ERROR && !held) || f->type == PZ_F_RELEASE)
            pz_arena_release_call(p->arena, f->id);
        if (p->arena->reader.last_end)
            pz_arena_release_ring(p->arena, p->shared, p->arena->reader.last_end);
        p->arena->reader.last_end = 0;
    }
    pz_spsc_consume(&p->done, f->size);
    p->consumed += f->size;
    if (p->consumed >= PZ_BACKLOG_WAKE / 4)
        settle_backlog(p);
}

int pz_pool_slots_settled(pz_pool *p)
{
    return atomic_load(&p->slots_settled);
}

const char *pz_pool_fatal(pz_pool *p)
{
    return atomic_load(&p->fatal) ? p->fatal_reason : NULL;
}

/* ---- waiting ------------------------------------------------------------- */

/* True when the lent socket has something to read (or has closed). */
static int lent_ready(pz_pool *p)
{
    struct pollfd pf = {p->lent_fd, POLLIN, 0};
    return p->lent_fd >= 0 && poll(&pf, 1, 0) != 0;
}

static int condition(pz_pool *p, int kind)
{
    if (atomic_load(&p->fatal) || (kind != PZ_WAIT_EXIT && atomic_load(&p->halted)))
        return 1;
    switch (kind) {
    case PZ_WAIT_PROGRESS:
        return atomic_load(&p->calls_done) >= atomic_load(&p->main_done_target) ||
               atomic_load(&p->calls_taken) >= atomic_load(&p->main_taken_target);
    case PZ_WAIT_INIT:
        return atomic_load(&p->slots_settled) >= p->nslots;
    case PZ_WAIT_EXIT:
        return atomic_load(&p->finished);
    }
    return 1;
}

/* Polls for what `kind` waits for until the spin deadline `until`, with
 * every signal blocked by the caller (sleep_until).  Returns PZ_WAITED
 * when the wait is over, or -1 to sleep. */
static int poll_briefly(pz_pool *p, int kind, int64_t until)
{
    do {
        if (lent_ready(p)) {
            /* Answers read here are published without waking this
             * thread: it looks at the condition itself, next. */
            atomic_store(&p->main_waiting, PZ_WAIT_NONE);
            p->lent_fd = pz_lend_collect(p->io, 1);
            atomic_store(&p->main_waiting, kind);
        }
        if (condition(p, kind) || atomic_load(&p->backlog) >= PZ_BACKLOG_WAKE)
            return PZ_WAITED;
        until = pz_spin_yield(pz_now_ns(), until);
    } while (until);
    return -1;
}

/* A wait is over: the signal mask it changed (old, when not NULL) is put
 * back, and the I/O thread no longer wakes this thread. */
static void end_wait(pz_pool *p, const sigset_t *old)
{
    /* pthread_sigmask fails only for an invalid `how`. */
    if (old)
        pthread_sigmask(SIG_SETMASK, old, NULL);
    atomic_store(&p->main_waiting, PZ_WAIT_NONE);
}

/* Sleeps until the I/O thread says the condition holds, the deadline
 * (absolute, pz_now_ns; -1: none) passes, or, when `signalled` is given, a
 * signal arrives.  Waits for calls or initialization also end when enough
 * records have piled up that the main thread should drain them.  Waits for
 * calls poll first while they are usually short (spin.h).
 *
 * A signal must not be lost between the caller's last look and the sleep:
 * its handler would have run (Ctrl-C's sets a Lua hook, which fires only
 * once the wait returns), and the sleep would last until its condition came
 * true, hours perhaps.  So every signal is blocked before the last look,
 * and ppoll unblocks them for the sleep itself: one arriving after the
 * block interrupts the sleep at once.  One that arrived before it (while
 * the caller drained records, say) has left its mark, which `signalled`
 * sees: the sleep is not begun. */
static int sleep_until(pz_pool *p, int kind, int64_t deadline, const pz_signalled *signalled)
{
    atomic_store(&p->main_waiting, kind);
    if (condition(p, kind) ||
        (kind != PZ_WAIT_EXIT && atomic_load(&p->backlog) >= PZ_BACKLOG_WAKE)) {
        end_wait(p, NULL);
        return PZ_WAITED;
    }
    sigset_t all, old, *mask = NULL;
    if (signalled) {
        sigfillset(&all);
        pthread_sigmask(SIG_BLOCK, &all, &old);
        mask = &old;
        if (signalled->check(signalled->ud)) {
            end_wait(p, mask);
            return PZ_WAIT_INTERRUPTED;
        }
    }
    int64_t start = pz_now_ns(), spin_until = 0;
    if (kind == PZ_WAIT_PROGRESS && signalled) {
        spin_until = pz_spin_until(&p->spin, start);
        if (deadline >= 0 && spin_until > deadline)
            spin_until = deadline;
    }
    int r = 0, err = 0, lent = -1;
    struct pollfd pf[2];
    if (spin_until <= start || poll_briefly(p, kind, spin_until) != PZ_WAITED) {
        struct timespec ts, *tsp = NULL;
        if (deadline >= 0) {
            int64_t left = deadline - pz_now_ns();
            if (left <= 0) {
                end_wait(p, mask);
                return PZ_WAIT_TIMEOUT;
            }
            ts.tv_sec = (time_t)(left / 1000000000);
            ts.tv_nsec = (long)(left % 1000000000);
            tsp = &ts;
        }
        /* A lone call's answer comes on the lent socket, if any (lend.c);
         * whatever else happens comes on the eventfd. */
        lent = p->lent_fd;
        pf[0] = (struct pollfd){p->main_wake_fd, POLLIN, 0};
        pf[1] = (struct pollfd){lent, POLLIN, 0};
        r = ppoll(pf, lent >= 0 ? 2 : 1, tsp, mask);
        err = errno;
    }
    end_wait(p, mask);
    if (r > 0 && lent >= 0 && pf[1].revents)
        p->lent_fd = pz_lend_collect(p->io, 1);
    if (kind == PZ_WAIT_PROGRESS)
        pz_spin_note(&p->spin, pz_now_ns() - start);
    if (r < 0 && err == EINTR)
        return signalled ? PZ_WAIT_INTERRUPTED : PZ_WAITED;
    if (r < 0) {
        /* poll on valid descriptors fails only for lack of memory: do not
         * spin, try again shortly. */
        pz_sleep_ns(1000000);
        return PZ_WAITED;
    }
    if (r > 0 && pf[0].revents)
        pz_wake_clear(p->main_wake_fd);
    return PZ_WAITED;
}

int pz_pool_sleep(pz_pool *p, int kind, uint64_t done_target, uint64_t taken_target,
                  int64_t deadline, const pz_signalled *signalled)
{
    if (atomic_load(&p->fatal))
        return PZ_WAIT_FATAL;
    if (atomic_load(&p->halted))
        return PZ_WAIT_HALTED;
    if (kind == PZ_WAIT_PROGRESS) {
        atomic_store(&p->main_done_target, done_target);
        atomic_store(&p->main_taken_target, taken_target);
    }
    return sleep_until(p, kind, deadline, signalled);
}

/* ---- the end ----------------------------------------------------------- */

void pz_pool_stop(pz_pool *p, int64_t finish_ns, const pz_signalled *signalled)
{
    if (p->reaped)
        return;
    p->stopped = 1;
    if (p->forked) { /* a fork's copy: nothing to stop, nothing to reap */
        p->thread_started = 0;
        p->lent_fd = -1;
        p->spawner_pid = 0;
        p->reaped = 1;
        return;
    }
    if (p->thread_started)
        forget_running(p);
    if (p->lent_fd >= 0)
        p->lent_fd = pz_lend_collect(p->io, 0);
    if (p->thread_started) {
        atomic_store(&p->finish_ns, finish_ns);
        atomic_store(&p->stop_requested, 1);
        pz_wake(p->io_wake_fd, "the I/O thread");
        /* Signals do not cut this short: stop must leave nothing behind.
         * The first one seen hurries the I/O thread (pool.h); the wait
         * then goes on deaf to them. */
        while (!atomic_load(&p->finished))
            if (sleep_until(p, PZ_WAIT_EXIT, -1, signalled) == PZ_WAIT_INTERRUPTED &&
                signalled->check(signalled->ud)) { /* not any signal's EINTR */
                signalled = NULL;
                atomic_store(&p->stop_hurry, 1);
                pz_wake(p->io_wake_fd, "the I/O thread");
            }
        pthread_join(p->thread, NULL);
        p->thread_started = 0;
    } else if (p->spawner_fd >= 0) {
        shutdown(p->spawner_fd, SHUT_WR);
    }
    if (p->spawner_pid > 0) {
        int status;
        while (waitpid(p->spawner_pid, &status, 0) < 0 && errno == EINTR)
            ;
        p->spawner_pid = 0;
    }
    p->reaped = 1;
}

typedef struct aborted_walk {
    void (*fn)(const char *frame, size_t size, void *ud);
    void *ud;
} aborted_walk;

/* pz_spsc_walk's visitor for pz_pool_aborted: each call in the chunk.  A
 * call cancelled while it waited here (the I/O thread flags it in place,
 * pz_dispatch_cancel) has its error record already. */
static int aborted_visit(char *data, size_t n, void *ud)
{
    aborted_walk *w = ud;
    for (size_t pos = 0; pos < n; pos += pz_frame_size(data + pos))
        if (!(pz_frame_flags(data + pos) & PZ_CALL_CANCELLED))
            w->fn(data + pos, pz_frame_size(data + pos), w->ud);
    return 0;
}

void pz_pool_aborted(pz_pool *p, void (*fn)(const char *frame, size_t size, void *ud), void *ud)
{
    if (p->io)
        pz_io_leftovers(p->io, fn, ud);
    /* Walked, not consumed: fn may raise (out of memory in the Lua state
     * it fills), and so may whatever the caller does with them next (their
     * decoding), and a stop tried again must find them all.  The pool's
     * free takes them with the queue (pz_spsc_destroy). */
    aborted_walk w = {fn, ud};
    pz_spsc_walk(&p->submit, aborted_visit, &w);
}

int pz_pool_cancel(pz_pool *p, uint64_t id)
{
    return pz_io_cancel(p->io, id);
}

void pz_pool_get_stats(pz_pool *p, pz_pool_stats *st)
{
    pz_io_get_stats(p->io, st);
}

/* pz_spsc_walk's visitor: the buffers of boxed records nobody consumed
 * go back to the spares (freed with them). */
static int free_boxes(char *data, size_t n, void *ud)
{
    for (size_t pos = 0; pos < n; pos += pz_frame_size(data + pos))
        if (pz_frame_type(data + pos) == PZ_F_RESULT && (pz_frame_flags(data + pos) & PZ_REC_BOXED))
            unbox(ud, data + pos);
    return 0;
}

void pz_pool_free(pz_pool *p)
{
    if (!p)
        return;
    if (p->forked) {
        /* A fork's copy: what the I/O thread owned may have been half
         * changed at the fork (a buffer between its realloc and the store
         * of the new pointer, a descriptor between its close and the -1),
         * so none of it is touched; the copy stays on parents_pools.  The
         * descriptors the main thread made are closed, as any copy the
         * child has no use for. */
        int *fds[] = {&p->spawner_fd, &p->io_wake_fd, &p->main_wake_fd};
        for (size_t i = 0; i < sizeof fds / sizeof fds[0]; i++)
            if (*fds[i] >= 0) {
                close(*fds[i]);
                *fds[i] = -1;
            }
        return;
    }
    pz_io_free(p->io);
    if (p->spawner_fd >= 0)
        close(p->spawner_fd);
    if (p->io_wake_fd >= 0)
        close(p->io_wake_fd);
    if (p->main_wake_fd >= 0)
        close(p->main_wake_fd);
    if (p->submit.rd)
        pz_spsc_destroy(&p->submit);
    if (p->done.rd) {
        pz_spsc_walk(&p->done, free_boxes, p);
        pz_spsc_destroy(&p->done);
    }
    if (p->spares_ready)
        pz_bigbufs_destroy(&p->spares);
    if (p->init)
        free_init(p->init, p->nslots);
    pz_pool_free_launch(p->launch, p->nslots);
    if (p->shared)
        munmap(p->shared, pz_slots_shared_size(p->nslots));
    pz_arena_free(p->arena);
    if (p->fatal_owned)
        free((char *)p->fatal_reason);
    free(p);
}
