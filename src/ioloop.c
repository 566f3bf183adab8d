/*
 * ioloop.c - the pool's I/O thread: one epoll loop over the wake-up
 * eventfd, the spawner's socket and the workers' sockets.  Each turn it
 * runs the timers, advances stop, hands waiting calls to workers, and
 * publishes what it read to the main thread; then it sleeps until an event
 * or the next deadline.  What each event means is handled elsewhere: a
 * slot's in slot.c, the spawner's in spawnq.c.  Rules: io.h.
 *
 * It never touches Lua.  Calls come in through pool->submit (CALL frames
 * built by the main thread); results and events go out through pool->done
 * (records, see frame.h).
 */
#include <errno.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <unistd.h>

#include "frame.h"
#include "io.h"
#include "ioloop.h"
#include "sys.h"

#define EVENTS_PER_WAIT 64

/* ---- records and failures ------------------------------------------------ */

int pz_io_record(struct pz_io *io, uint8_t type, uint8_t tag, uint64_t id, const pz_part *parts,
                 int nparts)
{
    size_t len = pz_frame_parts_len(parts, nparts);
    char *d = len == SIZE_MAX ? NULL : pz_spsc_reserve(&io->p->done, PZ_FRAME_HEADER + len);
    if (!d) {
        pz_io_fail(io, "out of memory in the I/O thread (a record for the main thread)");
        return -1;
    }
    size_t size = pz_frame_put(d, type, id, parts, nparts);
    pz_frame_set_tag(d, tag);
    pz_spsc_advance(&io->p->done, size);
    io->backlog_added += size; /* added to p->backlog by pz_io_publish, once */
    if (type == PZ_F_RESULT || type == PZ_F_ERROR)
        io->calls_done++;
    if (type == PZ_F_INIT_ERROR && io->p->opt.fail_fast)
        io->halted = 1;
    return 0;
}

void pz_io_release(struct pz_io *io, const char *fr)
{
    /* Out of memory fails the pool, which frees everything. */
    if (io->p->arena)
        (void)pz_io_record(io, PZ_F_RELEASE, 0, pz_frame_id(fr), NULL, 0);
}

int pz_io_record_error(struct pz_io *io, uint8_t kind, uint8_t tag, uint64_t id,
                       const pz_part *parts, int nparts)
{
    if (pz_io_record(io, PZ_F_ERROR, tag, id, parts, nparts) != 0)
        return -1;
    /* The record ends where the done queue's writing does (in a new chunk,
     * if it opened one): its header is that far back. */
    pz_spsc *q = &io->p->done;
    size_t size = PZ_FRAME_HEADER + pz_frame_parts_len(parts, nparts);
    char *d = q->wr->data + q->wpos - size;
    pz_frame_set_flags(d, kind);
    kind &= (uint8_t)~PZ_REC_HELD;
    io->failed++;
    if (kind == PZ_ERR_TIMEOUT)
        io->timeouts++;
    if (kind == PZ_ERR_CANCELLED)
        io->cancelled++;
    else if (io->p->opt.fail_fast)
        io->halted = 1; /* the first failure stops dispatching */
    return 0;
}

void pz_io_settle(struct pz_io *io, pz_slot *w)
{
    if (!io->settled[w->slot]) {
        io->settled[w->slot] = 1;
        io->slots_settled++;
    }
}

void pz_io_remember_error(struct pz_io *io, const char *msg)
{
    if (!io->first_error)
        io->first_error = strdup(msg); /* NULL when out of memory: said later */
}

/* Fails the pool with a reason made of two parts. */
static void fail2(struct pz_io *io, const char *a, const char *b)
{
    if (io->fatal)
        return;
    pz_pool *p = io->p;
    size_t na = strlen(a), nb = strlen(b);
    char *reason = malloc(na + nb + 1);
    if (reason) {
        memcpy(reason, a, na);
        memcpy(reason + na, b, nb + 1);
        p->fatal_reason = reason;
        p->fatal_owned = 1;
    } else {
        p->fatal_reason = "the pool failed, and its reason did not fit in memory";
    }
    io->fatal = 1; /* published (p->fatal) by pz_io_publish, after the reason */
    /* The spawner kills every worker when its socket is shut; their calls
     * stay where they are and stop() returns them as aborted. */
    pz_spawnq_shut(io);
}

void pz_io_fail(struct pz_io *io, const char *why)
{
    fail2(io, why, "");
}

void pz_io_check_fatal(struct pz_io *io)
{
    if (io->stopping || io->fatal)
        return;
    for (int i = 0; i < io->nrecords; i++)
        if (io->slots[i].state != SLOT_GONE && io->slots[i].state != SLOT_SPARE)
            return;
    fail2(io, "no worker is left and none can be started: ",
          io->first_error ? io->first_error : "every worker was lost");
}

/* ---- waking the main thread ------------------------------------------- */

static int main_condition(struct pz_io *io, int waiting)
{
    pz_pool *p = io->p;
    if (io->fatal || io->finished || io->halted)
        return 1;
    if (waiting != PZ_WAIT_EXIT &&
        atomic_load_explicit(&p->backlog, memory_order_relaxed) >= PZ_BACKLOG_WAKE)
        return 1;
    if (waiting == PZ_WAIT_PROGRESS)
        return io->calls_done >= atomic_load(&p->main_done_target) ||
               io->calls_taken >= atomic_load(&p->main_taken_target);
    if (waiting == PZ_WAIT_INIT)
        return io->slots_settled >= p->nslots;
    return 0;
}

void pz_io_publish(struct pz_io *io)
{
    pz_pool *p = io->p;
    /* Only what changed is stored: each store takes the line from the
     * main thread, which reads these, and the loop publishes at every turn.
     * A count stored is ordered before the load of main_waiting below; one
     * left alone is the value the main thread already sees. */
    if (atomic_load_explicit(&p->done.wr->tail, memory_order_relaxed) != p->done.wpos)
        pz_spsc_publish(&p->done);
    if (io->backlog_added) {
        atomic_fetch_add_explicit(&p->backlog, io->backlog_added, memory_order_relaxed);
        io->backlog_added = 0;
    }
    if (atomic_load_explicit(&p->calls_done, memory_order_relaxed) != io->calls_done)
        atomic_store(&p->calls_done, io->calls_done);
    if (atomic_load_explicit(&p->calls_taken, memory_order_relaxed) != io->calls_taken) {
        atomic_store(&p->bytes_taken, io->bytes_taken);
        atomic_store(&p->calls_taken, io->calls_taken);
    }
    if (atomic_load_explicit(&p->slots_settled, memory_order_relaxed) != io->slots_settled)
        atomic_store(&p->slots_settled, io->slots_settled);
    if (io->fatal)
        atomic_store(&p->fatal, 1);
    if (io->halted)
        atomic_store(&p->halted, 1);
    if (io->finished)
        atomic_store(&p->finished, 1);
    int waiting = atomic_load(&p->main_waiting);
    if (waiting && main_condition(io, waiting) &&
        atomic_compare_exchange_strong(&p->main_waiting, &waiting, PZ_WAIT_NONE))
        pz_wake(p->main_wake_fd, "the main thread");
}

/* ---- timers and stop ---------------------------------------------------- */

/* Runs what is due; returns the next deadline (0 when none). */
static int64_t run_timers(struct pz_io *io, int64_t now)
{
    int64_t next = 0;
    for (int i = 0; i < io->nrecords; i++)
        pz_slot_timers(io, &io->slots[i], now, &next);
    if (io->stopping) {
        if (io->term_at && (next == 0 || io->term_at < next))
            next = io->term_at;
        if (io->kill_at && (next == 0 || io->kill_at < next))
            next = io->kill_at;
    }
    return next;
}

static void begin_stop(struct pz_io *io)
{
    io->stopping = 1;
    int64_t finish = atomic_load(&io->p->finish_ns);
    if (finish >= 0)
        io->term_at = finish > 0 ? finish : 1;
    for (int i = 0; i < io->nrecords; i++)
        pz_slot_stop(io, &io->slots[i]);
}

/* A signal came while the main thread waited for the running calls
 * (pz_pool_stop): their deadline is now, whatever finish_ns said.  Once
 * the SIGTERM has gone out (progress_stop, the same turn), nothing more. */
static void hurry_stop(struct pz_io *io)
{
    if (!io->term_sent)
        io->term_at = 1;
}

static void signal_all(struct pz_io *io, int sig)
{
    for (int i = 0; i < io->nrecords; i++)
        pz_spawnq_kill(io, &io->slots[i], sig);
}

static int any_alive(struct pz_io *io)
{
    for (int i = 0; i < io->nrecords; i++)
        if (io->slots[i].alive)
            return 1;
    return 0;
}

/* Advances stop(): terminate after the deadline, shut the spawner down once
 * no worker is left, finish once the spawner has gone. */
static void progress_stop(struct pz_io *io, int64_t now)
{
    if (io->term_at && now >= io->term_at) {
        io->term_at = 0;
        io->term_sent = 1;
        int64_t grace = io->p->opt.kill_grace_ns;
        for (int i = 0; i < io->nrecords; i++) {
            int64_t g = pz_slot_grace_ns(io, &io->slots[i]);
            if (io->slots[i].alive && g > grace)
                grace = g;
        }
        io->kill_at = now + grace;
        signal_all(io, SIGTERM);
    }
    if (io->kill_at && now >= io->kill_at) {
        io->kill_at = 0;
        signal_all(io, SIGKILL);
    }
    if (!any_alive(io) && io->nspq == 0)
        pz_spawnq_shut(io);
    if (io->spawner_shut && io->spawner_gone)
        io->finished = 1;
}

/* ---- requests from the main thread, and stats ---------------------------- */

static int compare_ids(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

/* Carries out the cancels the main thread asked for (pz_io_cancel): all
 * of them at once, sorted, repeats dropped (a call asked twice gets one
 * record), so that pz_dispatch_cancel passes over each place once. */
static void take_requests(struct pz_io *io)
{
    pthread_mutex_lock(&io->ctl_lock);
    uint64_t *ids = io->cancels;
    size_t n = io->ncancels;
    if (n > 0) {
        io->cancels = NULL;
        io->ncancels = io->capcancels = 0;
    }
    pthread_mutex_unlock(&io->ctl_lock);
    if (n == 0)
        return;
    qsort(ids, n, sizeof *ids, compare_ids);
    size_t kept = 1;
    for (size_t i = 1; i < n; i++)
        if (ids[i] != ids[kept - 1])
            ids[kept++] = ids[i];
    pz_dispatch_cancel(io, ids, kept);
    free(ids);
}

int pz_io_cancel(struct pz_io *io, uint64_t id)
{
    pthread_mutex_lock(&io->ctl_lock);
    int rc = 0;
    if (io->ncancels == io->capcancels) {
        size_t cap = io->capcancels ? io->capcancels * 2 : 16;
        uint64_t *c = realloc(io->cancels, cap * sizeof *c);
        if (!c)
            rc = -1;
        else {
            io->cancels = c;
            io->capcancels = cap;
        }
    }
    if (rc == 0)
        io->cancels[io->ncancels++] = id;
    pthread_mutex_unlock(&io->ctl_lock);
    if (rc == 0)
        pz_wake(io->p->io_wake_fd, "the I/O thread");
    return rc;
}

#define SAMPLE_NS 500000000LL

/* Keeps calls_done now and then (every half second at most, while the loop
 * turns) for the rates of p:stats(). */
static void sample(struct pz_io *io, int64_t now)
{
    if (now - io->last_sample_ns < SAMPLE_NS)
        return;
    io->last_sample_ns = now;
    if (io->nsamples == 8) {
        memmove(io->sample_ns, io->sample_ns + 1, 7 * sizeof *io->sample_ns);
        memmove(io->sample_done, io->sample_done + 1, 7 * sizeof *io->sample_done);
        io->nsamples = 7;
    }
    io->sample_ns[io->nsamples] = now;
    io->sample_done[io->nsamples++] = io->calls_done;
}

void pz_io_get_stats(struct pz_io *io, pz_pool_stats *st)
{
    pthread_mutex_lock(&io->lock);
    st->done = io->calls_done;
    st->failed = io->failed;
    st->deaths = io->deaths;
    st->respawns = io->respawns;
    st->recycles = io->recycles;
    st->timeouts = io->timeouts;
    st->cancelled = io->cancelled;
    st->retries = io->retried;
    st->retrying = pz_retry_held(io);
    /* A call cancelled after it was sent is failed already (its record is
     * made at the cancel): counted as running too, it made done + failed +
     * pending + running exceed the calls until its worker started it. */
    st->running = 0;
    for (int i = 0; i < io->nrecords; i++)
        st->running += io->slots[i].inflight - pz_slot_cancelled_held(&io->slots[i]);
    /* Cancelled calls waiting are failed already: not counted as queued
     * (nor, with cancelled_unseen, as pending in the submit queue). */
    st->queued = 0;
    for (size_t pos = io->rq_pos; pos < io->rq.len; pos += pz_frame_size(io->rq.data + pos))
        st->queued += !(pz_frame_flags(io->rq.data + pos) & PZ_CALL_CANCELLED);
    st->taken = io->calls_taken;
    st->cancelled_unseen = io->cancelled_unseen;
    st->started_ns = io->started_ns;
    st->nsamples = io->nsamples;
    memcpy(st->sample_ns, io->sample_ns, sizeof st->sample_ns);
    memcpy(st->sample_done, io->sample_done, sizeof st->sample_done);
    memcpy(st->slots, io->slot_stats, (size_t)io->p->nslots * sizeof *st->slots);
    /* The pid of each slot's worker: the one taking calls, else the one
     * retiring or starting, looked up now since it may be learnt late (a
     * local worker's from its INIT_OK or the spawner's report, whichever
     * comes first; a remote slot's launcher's from the report only). */
    for (int pass = 0; pass < 2; pass++)
        for (int i = 0; i < io->nrecords; i++) {
            const pz_slot *w = &io->slots[i];
            int ready = w->state == SLOT_READY;
            if (w->alive && w->pid > 0 && (pass == 0 ? !ready : ready))
                st->slots[w->slot].pid = w->pid;
        }
    for (int s = 0; s < io->p->nslots; s++) {
        pz_slot_stats *ss = &st->slots[s];
        const pz_slot *w = ss->init_record ? &io->slots[ss->init_record - 1] : NULL;
        ss->init_alive = w && w->gen == ss->init_gen && w->alive;
    }
    pthread_mutex_unlock(&io->lock);
}

/* ---- the loop ----------------------------------------------------------- */

static void on_event(struct pz_io *io, const struct epoll_event *ev)
{
    uint64_t t = ev->data.u64;
    if (t == PZ_TOKEN_WAKE) {
        pz_wake_clear(io->p->io_wake_fd);
        atomic_store(&io->p->io_woken, 0);
        return;
    }
    if (t == PZ_TOKEN_SPAWNER) {
        if (ev->events & EPOLLOUT)
            pz_spawnq_flush(io);
        if (ev->events & (EPOLLIN | EPOLLHUP | EPOLLERR))
            pz_spawnq_read(io);
        return;
    }
    int index = (int)(uint32_t)t - PZ_TOKEN_SLOT;
    if (index < 0 || index >= io->nrecords)
        return;
    pz_slot *w = &io->slots[index];
    if (w->gen != (uint32_t)(t >> 32) || w->fd < 0)
        return; /* an event for a socket closed earlier in this batch */
    if (ev->events & EPOLLOUT)
        pz_slot_flush(io, w);
    if (ev->events & (EPOLLIN | EPOLLHUP | EPOLLERR))
        pz_slot_read(io, w);
}

/* Milliseconds epoll_wait may sleep until `deadline` (0: none).  A
 * deadline more than INT_MAX ms (24.8 days) away (a timeout of 4e6 s)
 * sleeps INT_MAX ms and looks again: converted as it is, it would wrap to
 * a negative wait, which epoll_wait takes as no limit. */
static int timeout_ms(int64_t deadline, int64_t now)
{
    if (deadline == 0)
        return -1;
    if (deadline <= now)
        return 0;
    int64_t ms = (deadline - now + 999999) / 1000000;
    return ms > INT_MAX ? INT_MAX : (int)ms;
}

void *pz_io_main(void *arg)
{
    pz_pool *p = arg;
    struct pz_io *io = p->io;
    struct epoll_event evs[EVENTS_PER_WAIT];
    pthread_mutex_lock(&io->lock);
    for (int i = 0; i < p->nslots; i++)
        pz_slot_start(io, &io->slots[i]);
    io->started_ns = pz_now_ns();
    while (!io->finished) {
        int64_t now = io->now = pz_now_ns();
        if (!io->stopping && atomic_load(&p->stop_requested))
            begin_stop(io);
        if (io->stopping && atomic_load(&p->stop_hurry))
            hurry_stop(io);
        take_requests(io);
        sample(io, now);
        pz_dispatch(io);
        /* After dispatch: the calls it handed out may have timeouts. */
        int64_t deadline = run_timers(io, now);
        if (io->stopping)
            progress_stop(io, now);
        pz_io_publish(io);
        if (io->finished)
            break;
        /* Tell the main thread we sleep with room for calls, then look once
         * more: a call published before the flag was set would otherwise
         * wait for the next event. */
        int room = !io->stopping && !io->fatal && !io->halted && pz_dispatch_has_room(io);
        int nap = 0;
        if (room) {
            atomic_store(&p->io_sleeping, 1);
            /* The main thread's side of the fence (pool.c, kick): after
             * it, a call it publishes later sees the flag, and one it
             * published earlier is in the queue.  Should it ever fail, the
             * sleep is cut short instead, so that such a call waits 1 ms
             * at most. */
            if (p->asym_fence && pz_membarrier() != 0)
                nap = 1;
            if (pz_dispatch_waiting(io)) {
                atomic_store(&p->io_sleeping, 0);
                continue;
            }
        }
        pthread_mutex_unlock(&io->lock);
        int wait_ms = timeout_ms(deadline, now);
        if (nap && (wait_ms < 0 || wait_ms > 1))
            wait_ms = 1;
        int n = epoll_wait(io->ep, evs, EVENTS_PER_WAIT, wait_ms);
        int err = errno;
        pthread_mutex_lock(&io->lock);
        if (room)
            atomic_store(&p->io_sleeping, 0);
        if (n < 0 && err != EINTR) {
            /* Cannot happen with a valid epoll descriptor; without it
             * nothing more can be heard from anyone, so end here: the
             * spawner, shut, kills the workers, and stop aborts their calls. */
            char msg[160];
            snprintf(msg, sizeof msg, "epoll_wait failed: %s", strerror(err));
            pz_io_fail(io, msg);
            io->finished = 1;
            break;
        }
        for (int i = 0; i < n; i++)
            on_event(io, &evs[i]);
    }
    pz_io_publish(io);
    pthread_mutex_unlock(&io->lock);
    pz_wake(p->main_wake_fd, "the main thread");
    return NULL;
}

/* ---- life of the I/O side ------------------------------------------------ */

struct pz_io *pz_io_new(pz_pool *p)
{
    struct pz_io *io = calloc(1, sizeof *io);
    if (!io)
        return NULL;
    io->p = p;
    io->ep = -1;
    io->inflight_cap = p->opt.max_inflight < PZ_INFLIGHT_START ? p->opt.max_inflight : PZ_INFLIGHT_START;
    io->nrecords = 2 * p->nslots;
    io->slots = calloc((size_t)io->nrecords, sizeof *io->slots);
    io->settled = calloc((size_t)p->nslots, sizeof *io->settled);
    io->slot_stats = calloc((size_t)p->nslots, sizeof *io->slot_stats);
    int locks = pthread_mutex_init(&io->lock, NULL) == 0;
    locks += locks && pthread_mutex_init(&io->ctl_lock, NULL) == 0;
    if (locks == 2)
        io->ep = epoll_create1(EPOLL_CLOEXEC);
    if (locks < 2 || !io->slots || !io->settled || !io->slot_stats || io->ep < 0) {
        if (locks >= 1)
            pthread_mutex_destroy(&io->lock);
        if (locks == 2)
            pthread_mutex_destroy(&io->ctl_lock);
        if (io->ep >= 0)
            close(io->ep);
        free(io->slots);
        free(io->settled);
        free(io->slot_stats);
        free(io);
        return NULL;
    }
    /* Records r and r + nslots belong to slot r; the second waits, SPARE,
     * for its first worker's replacement (io.h). */
    for (int i = 0; i < io->nrecords; i++) {
        io->slots[i].index = i;
        io->slots[i].slot = i % p->nslots;
        io->slots[i].fd = -1;
        io->slots[i].state = i < p->nslots ? SLOT_IDLE : SLOT_SPARE;
        io->slots[i].remote = p->launch && p->launch[i % p->nslots];
    }
    struct epoll_event ev = {EPOLLIN, {.u64 = PZ_TOKEN_WAKE}};
    struct epoll_event sv = {EPOLLIN, {.u64 = PZ_TOKEN_SPAWNER}};
    if (epoll_ctl(io->ep, EPOLL_CTL_ADD, p->io_wake_fd, &ev) != 0 ||
        epoll_ctl(io->ep, EPOLL_CTL_ADD, p->spawner_fd, &sv) != 0) {
        pz_io_free(io);
        return NULL;
    }
    return io;
}

void pz_io_park(struct pz_io *io, int park)
{
    if (park)
        pthread_mutex_lock(&io->lock);
    else
        pthread_mutex_unlock(&io->lock);
}

void pz_io_leftovers(struct pz_io *io, void (*fn)(const char *, size_t, void *), void *ud)
{
    for (size_t pos = io->rq_pos; pos < io->rq.len; pos += pz_frame_size(io->rq.data + pos))
        if (!(pz_frame_flags(io->rq.data + pos) & PZ_CALL_CANCELLED))
            fn(io->rq.data + pos, pz_frame_size(io->rq.data + pos), ud);
    for (int i = 0; i < io->nrecords; i++) {
        pz_slot *w = &io->slots[i];
        for (size_t pos = w->out_head; pos < w->out.len; pos += pz_frame_size(w->out.data + pos)) {
            const char *fr = w->out.data + pos;
            if (pz_frame_type(fr) == PZ_F_CALL && !(pz_frame_flags(fr) & PZ_CALL_CANCELLED))
                fn(fr, pz_frame_size(fr), ud);
        }
    }
}

void pz_io_free(struct pz_io *io)
{
    if (!io)
        return;
    for (int i = 0; i < io->nrecords; i++) {
        pz_slot *w = &io->slots[i];
        if (w->fd >= 0)
            close(w->fd);
        pz_buf_free(&w->out);
        pz_buf_free(&w->wire);
        pz_buf_free(&w->in);
    }
    for (size_t i = 0; i < io->nspq; i++)
        if (io->spq[i].fd >= 0)
            close(io->spq[i].fd);
    free(io->spq);
    free(io->first_error);
    free(io->cancels);
    pz_retry_free(io);
    pz_buf_free(&io->rq);
    close(io->ep);
    pthread_mutex_destroy(&io->lock);
    pthread_mutex_destroy(&io->ctl_lock);
    free(io->slots);
    free(io->settled);
    free(io->slot_stats);
    free(io);
}
