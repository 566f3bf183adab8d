/*
 * slot.c - one worker record, as the parent's I/O thread sees it: starting
 * its process, the frames that go to it and come from it, its replacement
 * after max_calls, the calls it is killed for (timeouts, cancels), its
 * death and what happens to the calls it held.  Runs with io->lock held
 * (io.h).
 *
 * All worker sockets are non-blocking, so a worker that stops reading can
 * never block the loop.
 */
#include <errno.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "frame.h"
#include "io.h"
#include "sys.h"
#include "varint.h"
#include "worker.h"

#define READ_CHUNK 65536
/* A buffer of a worker's kept when it empties, up to this size: freeing and
 * growing it again for every big call would cost a page fault per page. */
#define KEEP_BYTES (2 * PZ_SLOT_BYTES)
#define READS_PER_TURN 8          /* then other slots get their turn */
#define EOF_GRACE_NS 2000000000LL /* closed its socket but did not exit */
#define BACKOFF_NS 50000000LL     /* first restart after an init crash */
#define MAX_BACKOFF_NS 2000000000LL
#define TIMEOUT_RECHECK_NS 1000000 /* a timeout seen due between two calls */

/* epoll's data for a record's socket: its index, and its generation so that
 * an event for a socket closed and replaced in the same batch is ignored. */
static uint64_t token(const pz_slot *w)
{
    return (uint64_t)w->gen << 32 | (uint32_t)(PZ_TOKEN_SLOT + w->index);
}

/* The other record of w's slot. */
static pz_slot *partner(struct pz_io *io, pz_slot *w)
{
    int n = io->p->nslots;
    return &io->slots[w->index < n ? w->index + n : w->index - n];
}

void pz_slot_watch(struct pz_io *io, pz_slot *w, int op)
{
    if (w->lent)
        return; /* out of the set until given back (pz_lend_end) */
    struct epoll_event ev = {EPOLLIN | (w->want_out ? EPOLLOUT : 0), {.u64 = token(w)}};
    if (epoll_ctl(io->ep, op, w->fd, &ev) != 0) {
        char msg[160];
        snprintf(msg, sizeof msg, "epoll_ctl on worker %d's socket failed: %s", w->slot + 1,
                 strerror(errno));
        pz_io_fail(io, msg);
    }
}

static void close_fd(struct pz_io *io, pz_slot *w)
{
    if (w->fd < 0)
        return;
    if (w->lent) {
        w->lent = 0;
        io->lent = NULL;
    } else {
        /* Cannot fail for a descriptor in the set; close removes it anyway. */
        epoll_ctl(io->ep, EPOLL_CTL_DEL, w->fd, NULL);
    }
    close(w->fd);
    w->fd = -1;
    w->want_out = 0;
}

static int64_t backoff(int crashes)
{
    int64_t ns = BACKOFF_NS;
    for (int i = 1; i < crashes && ns < MAX_BACKOFF_NS; i++)
        ns *= 2;
    return ns < MAX_BACKOFF_NS ? ns : MAX_BACKOFF_NS;
}

/* Gives record w up for good, keeping why (if any) as an init error. */
static void give_up(struct pz_io *io, pz_slot *w, const char *why, const char *tb, size_t tblen)
{
    w->state = SLOT_GONE;
    if (why) {
        pz_part parts[] = {{why, strlen(why), 1}, {tb, tblen, 0}};
        pz_io_record(io, PZ_F_INIT_ERROR, 0, (uint64_t)w->slot, parts, 2);
        pz_io_remember_error(io, why);
    }
    pz_io_settle(io, w);
    pz_io_check_fatal(io);
}

/* A start that failed before any process existed, or a worker that died
 * while initializing: try again after a back-off, give up after
 * init_attempts. */
static void init_failed(struct pz_io *io, pz_slot *w, const char *final_msg)
{
    if (++w->init_crashes >= io->p->opt.init_attempts) {
        give_up(io, w, final_msg, NULL, 0);
        return;
    }
    w->state = SLOT_IDLE;
    w->respawn_at = pz_now_ns() + backoff(w->init_crashes);
}

void pz_slot_start(struct pz_io *io, pz_slot *w)
{
    int sv[2] = {-1, -1};
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0 || pz_set_nonblock(sv[0]) != 0) {
        /* Out of descriptors, most likely: try again later, as for a
         * worker that died while starting. */
        char msg[200];
        snprintf(msg, sizeof msg, "worker %d could not be started: socketpair: %s", w->slot + 1,
                 strerror(errno));
        if (sv[0] >= 0) {
            close(sv[0]);
            close(sv[1]);
        }
        pz_io_remember_error(io, msg);
        init_failed(io, w, msg);
        return;
    }
    const pz_buf *init = &io->p->init[w->slot];
    w->out.len = w->out_head = w->out_sent = 0;
    char *d = pz_buf_reserve(&w->out, PZ_FRAME_HEADER + init->len);
    if (!d) {
        close(sv[0]);
        close(sv[1]);
        pz_io_fail(io, "out of memory in the I/O thread (starting a worker)");
        return;
    }
    pz_part part = {init->data, init->len, 0};
    w->out.len = pz_frame_put(d, PZ_F_INIT, 0, &part, 1);
    w->out_head = w->out.len;
    w->gen++;
    w->pending_sig = 0;
    w->fd = sv[0];
    w->pid = 0;
    w->alive = 1;
    w->exited = 0;
    w->kill_sent = 0;
    w->eof_at = 0;
    w->why[0] = 0;
    w->state = SLOT_STARTING;
    w->inflight = 0;
    w->depth = 1;
    w->given = 0;
    w->doomed = 0;
    w->in.len = 0;
    w->discard = 0;
    w->want_out = 0;
    atomic_store(&io->p->shared[w->index].running, 0);
    pz_slot_watch(io, w, EPOLL_CTL_ADD);
    pz_spawnq_spawn(io, w, sv[1]);
    pz_slot_flush(io, w);
}

/* The parent kills a worker that broke the protocol; it is then handled
 * like any other death. */
static void reject(struct pz_io *io, pz_slot *w, const char *why)
{
    if (w->why[0])
        return;
    snprintf(w->why, sizeof w->why, "was killed after it sent a malformed frame (%s)", why);
    close_fd(io, w);
    if (!w->kill_sent) {
        w->kill_sent = 1;
        pz_spawnq_kill(io, w, SIGKILL);
    }
}

/* The call a remote worker was running when its launcher ended with wait
 * status `status` (known: the spawner reported it), or 0 when its end is
 * not a call's doing.  A remote worker shares no memory with the parent,
 * but it writes its results before each call (worker.c), so once
 * everything it sent is read, the oldest call without an answer is the
 * one it was running.  Not charged: a launcher killed by a signal (here:
 * by stop, by a user, by the kernel), and one that exited with status 255,
 * which is ssh's status for a lost connection, and what pzlua --worker
 * exits with when its input ended (remote.c).  A task killed on its host
 * (a signal, scancel) exits 128 + the signal through ssh and srun, and is
 * charged like a local worker's death. */
static uint64_t remote_running_call(const pz_slot *w, int known, int status)
{
    if (!known || w->why[0] || !WIFEXITED(status) || WEXITSTATUS(status) == 255)
        return 0;
    /* Only a call it received whole can have been running. */
    if (w->inflight == 0 || w->out_head + pz_frame_size(w->out.data + w->out_head) > w->out_sent)
        return 0;
    return pz_frame_id(w->out.data + w->out_head);
}

/* A remote slot's launcher wrote something that is not a frame before
 * its worker answered INIT: most often a shell start-up file on the other
 * host printing on stdout, or a launcher that is not running pzlua
 * --worker.  The message shows what came. */
static void reject_output(struct pz_io *io, pz_slot *w, const char *why)
{
    char seen[64];
    size_t n = 0;
    for (size_t i = 0; i < w->in.len && i < 24 && n + 5 < sizeof seen; i++) {
        unsigned char c = (unsigned char)w->in.data[i];
        n += (size_t)snprintf(seen + n, sizeof seen - n, c >= 32 && c < 127 && c != '"' ? "%c" : "\\x%02x", c);
    }
    char msg[160];
    snprintf(msg, sizeof msg, "%s: \"%s\"...; does the remote shell print on stdout?", why, seen);
    reject(io, w, msg);
}

/* Writes an ERROR record of this kind for the CALL frame `call` that the
 * parent itself gives up on: its arguments, the message, no traceback, no
 * value, no attempts.  Returns what pz_io_record does. */
static int record_error(struct pz_io *io, const char *call, const char *msg, uint8_t kind)
{
    uint8_t no_attempts = 0;
    pz_part parts[] = {{pz_frame_payload(call), pz_frame_payload_len(call), 1},
                       {msg, strlen(msg), 1},
                       {NULL, 0, 1},
                       {NULL, 0, 1},
                       {&no_attempts, 1, 0}};
    return pz_io_record_error(io, kind, pz_frame_tag(call), pz_frame_id(call), parts, 5);
}

/* ---- calls killed on purpose (timeouts, cancels) ------------------------ */

int64_t pz_slot_timeout_ns(struct pz_io *io, const char *frame)
{
    uint32_t ms = pz_frame_timeout_ms(frame);
    if (ms == 0)
        ms = io->p->opt.timeout_ms;
    return ms == 0 || ms == PZ_NO_TIMEOUT ? 0 : (int64_t)ms * 1000000;
}

/* Kills w's worker for call id (a timeout or a cancel): when its death is
 * handled, that call becomes an error of that kind, and the others it
 * held go back to the queue without being charged. */
static void doom(struct pz_io *io, pz_slot *w, uint64_t id, uint8_t kind)
{
    if (w->doomed)
        return;
    w->doomed = id;
    w->doomed_kind = kind;
    if (!w->kill_sent) {
        w->kill_sent = 1;
        pz_spawnq_kill(io, w, SIGKILL);
    }
}

/* The frame of call id among those w has sent and not had answered, or NULL. */
static char *sent_frame(pz_slot *w, uint64_t id)
{
    for (size_t pos = w->out_head; pos < w->out_sent; pos += pz_frame_size(w->out.data + pos))
        if (pz_frame_type(w->out.data + pos) == PZ_F_CALL && pz_frame_id(w->out.data + pos) == id)
            return w->out.data + pos;
    return NULL;
}

/* The call w's worker runs now and when it began, read from the shared
 * memory (worker.h); 0 when it runs none.  A remote worker shares no
 * memory, but writes its results before each call: the oldest call it has
 * received whole and not answered is the one it runs, since about when it
 * became the oldest. */
static uint64_t running_call(struct pz_io *io, pz_slot *w, int64_t *started)
{
    if (w->remote) {
        if (w->inflight == 0 || w->out_head + pz_frame_size(w->out.data + w->out_head) > w->out_sent)
            return 0;
        *started = w->head_since;
        return pz_frame_id(w->out.data + w->out_head);
    }
    pz_slot_shared *sh = &io->p->shared[w->index];
    for (;;) {
        uint64_t id = atomic_load_explicit(&sh->running, memory_order_acquire);
        *started = atomic_load_explicit(&sh->started, memory_order_acquire);
        if (atomic_load_explicit(&sh->running, memory_order_acquire) == id)
            return id;
    }
}

/* Ends the call w's worker runs if it has run out of time; lowers *next to
 * when to look again. */
static void check_timeout(struct pz_io *io, pz_slot *w, int64_t now, int64_t *next)
{
    if (w->inflight == 0 || w->doomed || w->out_head >= w->out_sent)
        return;
    const char *head = w->out.data + w->out_head;
    int64_t started;
    uint64_t id = running_call(io, w, &started);
    const char *fr = id ? sent_frame(w, id) : NULL;
    int64_t limit, due;
    if (fr) {
        limit = pz_slot_timeout_ns(io, fr);
        if (!limit)
            return;
        due = started + limit;
        if (now >= due) {
            doom(io, w, id, PZ_ERR_TIMEOUT);
            return;
        }
    } else {
        /* Between two calls: the oldest unanswered one cannot have started
         * before head_since; when that is due, look again shortly, as the
         * worker will then be running it or have answered it. */
        limit = pz_slot_timeout_ns(io, head);
        if (!limit)
            return;
        due = w->head_since + limit;
        if (due <= now)
            due = now + TIMEOUT_RECHECK_NS;
    }
    if (*next == 0 || due < *next)
        *next = due;
}

int pz_slot_cancel(struct pz_io *io, pz_slot *w, uint64_t id)
{
    for (size_t pos = w->out_head; pos < w->out.len;) {
        char *fr = w->out.data + pos;
        size_t size = pz_frame_size(fr);
        if (pz_frame_type(fr) != PZ_F_CALL || pz_frame_id(fr) != id) {
            pos += size;
            continue;
        }
        if (pz_frame_flags(fr) & PZ_CALL_CANCELLED)
            return 1;
        char msg[80];
        snprintf(msg, sizeof msg, "call %" PRIu64 " cancelled", id);
        if (pos >= w->out_sent) {
            /* Not sent yet: it never will be. */
            if (record_error(io, fr, msg, PZ_ERR_CANCELLED) != 0)
                return 1;
            memmove(fr, fr + size, w->out.len - pos - size);
            w->out.len -= size;
            w->inflight--;
            return 1;
        }
        int64_t started;
        if (running_call(io, w, &started) == id) {
            doom(io, w, id, PZ_ERR_CANCELLED); /* the error comes with its death */
            return 1;
        }
        /* Sent, not started: dropped now; its answer, if one comes, is not. */
        if (record_error(io, fr, msg, PZ_ERR_CANCELLED) == 0)
            pz_frame_set_flags(fr, pz_frame_flags(fr) | PZ_CALL_CANCELLED);
        return 1;
    }
    return 0;
}

/* ---- deaths ---------------------------------------------------------------- */

/* A worker that held calls died.  The call it was killed for (timeout,
 * cancel) becomes an error of that kind; else the call it was running
 * (its id is in the shared memory, see worker.h; a remote worker's:
 * remote_running_call) is charged with a death
 * and becomes an error once it has killed max_deaths workers.  Every other
 * call it held, including calls whose results it had not sent yet, goes
 * back to the front of the queue. */
static void requeue_inflight(struct pz_io *io, pz_slot *w, const char *how, int known, int status)
{
    uint64_t running = atomic_load(&io->p->shared[w->index].running), drop = 0;
    atomic_store(&io->p->shared[w->index].running, 0);
    if (w->remote)
        running = remote_running_call(w, known, status);
    if (w->doomed) {
        char *fr = sent_frame(w, w->doomed);
        if (fr) {
            char msg[160];
            int64_t limit = pz_slot_timeout_ns(io, fr);
            if (w->doomed_kind == PZ_ERR_TIMEOUT)
                snprintf(msg, sizeof msg, "call %" PRIu64 " timed out after %g s", w->doomed,
                         (double)limit / 1e9);
            else
                snprintf(msg, sizeof msg, "call %" PRIu64 " cancelled", w->doomed);
            if (record_error(io, fr, msg, w->doomed_kind) == 0)
                drop = w->doomed;
        }
        w->doomed = 0;
    } else if (running && w->inflight > 0 && !io->stopping && !io->spawner_gone) {
        /* Workers terminated by stop() or lost with the spawner did not
         * die of their call. */
        char *fr = sent_frame(w, running);
        if (fr) {
            uint8_t deaths = (uint8_t)(pz_frame_deaths(fr) + 1);
            pz_frame_set_deaths(fr, deaths);
            if (deaths >= io->p->opt.max_deaths) {
                char msg[512];
                snprintf(msg, sizeof msg,
                         "call %" PRIu64 " killed %d workers (max_deaths = %d); the last: worker "
                         "%d (pid %d) %s while running call %" PRIu64,
                         running, deaths, io->p->opt.max_deaths, w->slot + 1, (int)w->pid, how,
                         running);
                if (record_error(io, fr, msg, PZ_ERR_KILLER) == 0)
                    drop = running;
            }
        }
    }
    if (pz_dispatch_requeue(io, w, w->out_head, drop) != 0)
        return; /* the pool failed: the frames stay for stop to abort */
    w->out.len = w->out_head = w->out_sent = 0;
    w->inflight = 0;
}

/* How a remote slot's launcher ended, for messages: "ended: its launcher
 * ssh exited with status 137 (...)". */
static void describe_launcher_end(struct pz_io *io, const pz_slot *w, int status, char *buf,
                                  size_t len)
{
    char end[80];
    pz_describe_status(status, end, sizeof end);
    const char *name = io->p->launch[w->index][0];
    int code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    const char *note = "";
    char sig[80];
    if (code == 255)
        note = " (its connection was lost, or it could not start the worker: see its messages on "
               "stderr)";
    else if (code > 128 && code < 128 + 65) {
        snprintf(sig, sizeof sig, " (the worker was killed by signal %d on its host)", code - 128);
        note = sig;
    }
    snprintf(buf, len, "ended: its launcher %.60s %s%s", name, end, note);
}

void pz_slot_ended(struct pz_io *io, pz_slot *w, int known, int status)
{
    /* Everything it wrote before it died is still in the socket. */
    while (w->fd >= 0 && !io->fatal && pz_slot_read(io, w))
        ;
    close_fd(io, w);
    pz_buf_trim(&w->in, 0);
    w->in.len = 0;
    w->alive = 0;
    char how[320];
    if (w->why[0])
        snprintf(how, sizeof how, "%s", w->why);
    else if (known && w->remote)
        describe_launcher_end(io, w, status, how, sizeof how);
    else if (known)
        pz_describe_status(status, how, sizeof how);
    else
        snprintf(how, sizeof how, "ended with the spawner");
    char msg[512];
    switch (w->state) {
    case SLOT_STARTING:
        if (io->stopping || io->spawner_gone) {
            snprintf(msg, sizeof msg, "worker %d (pid %d) %s during initialization", w->slot + 1,
                     (int)w->pid, how);
            give_up(io, w, io->stopping ? NULL : msg, NULL, 0);
            return;
        }
        if (w->pid == 0) /* no process was ever there */
            snprintf(msg, sizeof msg, "worker %d could not be started (%d attempts); the last time, it %s",
                     w->slot + 1, w->init_crashes + 1, how);
        else
            snprintf(msg, sizeof msg,
                     "worker %d died during initialization %d times; the last time, pid %d %s",
                     w->slot + 1, w->init_crashes + 1, (int)w->pid, how);
        init_failed(io, w, msg);
        return;
    case SLOT_READY:
    case SLOT_RETIRING:
    case SLOT_STOPPING:
        if (io->fatal) {
            w->state = SLOT_GONE; /* its calls stay in w->out: stop aborts them */
            return;
        }
        if (w->state == SLOT_READY || w->inflight > 0 || !known || !WIFEXITED(status) ||
            WEXITSTATUS(status) != 0)
            io->deaths++; /* not an exit it was asked for */
        requeue_inflight(io, w, how, known, status);
        if (w->state == SLOT_STOPPING || io->stopping) {
            w->state = SLOT_GONE;
            return;
        }
        if (w->state == SLOT_RETIRING) {
            /* Its partner took over; or it is retiring in its turn (it
             * reached max_calls before this one was gone), and this record
             * starts the next worker of the slot. */
            w->state = SLOT_SPARE;
            if (partner(io, w)->state == SLOT_RETIRING && !io->spawner_gone)
                pz_slot_start(io, w);
            return;
        }
        if (io->p->opt.respawn && !io->spawner_gone) {
            io->respawns++;
            w->state = SLOT_IDLE;
            w->respawn_at = pz_now_ns();
            return;
        }
        snprintf(msg, sizeof msg, "worker %d (pid %d) %s%s", w->slot + 1, (int)w->pid, how,
                 io->spawner_gone ? " and no worker can be started without the spawner"
                                  : "; not replaced (respawn = false)");
        pz_io_remember_error(io, msg);
        w->state = SLOT_GONE;
        pz_io_check_fatal(io);
        return;
    case SLOT_SPARE:
    case SLOT_IDLE:
    case SLOT_GONE:
        return; /* nothing held */
    }
}

/* ---- frames from the worker -------------------------------------------- */

/* The in-flight depth: enough calls to cover `window` of work.  A remote
 * worker's also covers its round trip, plus the call it runs: an answer
 * takes half a round trip to come back and the call it makes room for
 * half a round trip to get there, and the worker should not run dry
 * meanwhile. */
static void update_depth(struct pz_io *io, pz_slot *w, uint64_t ns)
{
    const pz_options *o = &io->p->opt;
    w->avg_ns = w->avg_ns > 0 ? w->avg_ns * 0.875 + (double)ns * 0.125 : (double)ns + 1;
    double d = (double)o->window_ns / w->avg_ns;
    if (w->remote)
        d += w->rtt_ns / w->avg_ns + 1;
    w->depth = d < 1 ? 1 : d > o->max_inflight ? o->max_inflight : (uint32_t)d;
}

/* A remote slot's round trip, measured on a call sent while it held no
 * other (so that it waited behind none): the time to its answer less the
 * time it ran. */
static void note_round_trip(pz_slot *w, uint64_t id, uint64_t ns)
{
    if (id != w->probe_id)
        return;
    w->probe_id = 0;
    double rtt = (double)(pz_now_ns() - w->probe_at) - (double)ns;
    if (rtt <= 0)
        return;
    w->rtt_ns = w->rtt_ns > 0 ? w->rtt_ns * 0.75 + rtt * 0.25 : rtt;
}

/* The call at out_head has been answered: drops it from w. */
static void answered(struct pz_io *io, pz_slot *w, int64_t now)
{
    w->out_head += pz_frame_size(w->out.data + w->out_head);
    w->head_since = now;
    if (--w->inflight == 0)
        io->last_idle = w->index;
    /* Drop the answered frames at the front now and then: a worker that
     * always has calls in flight never empties its buffer.  Only once they
     * are four times what is left, so that moving the rest to the front
     * costs a quarter of a copy per byte at most. */
    if (w->out_head == w->out.len) {
        w->out.len = w->out_head = w->out_sent = 0;
        pz_buf_trim(&w->out, KEEP_BYTES);
    } else if (w->out_head >= READ_CHUNK && w->out_head / 4 >= w->out.len - w->out_head) {
        pz_buf_consume(&w->out, w->out_head);
        w->out_sent -= w->out_head;
        w->out_head = 0;
    }
}

/* An ERROR answer from the worker (payload after the run time: message,
 * traceback, value): the call runs again when retries allow, else becomes
 * an error record with every attempt it made.  Returns -1 when the pool
 * failed. */
static int on_error_answer(struct pz_io *io, pz_slot *w, char *head, const char *p, size_t n)
{
    const char *msg, *tb, *value, *rest;
    size_t mlen, tblen, vlen, rlen;
    pz_split_prefixed(p, n, &msg, &mlen, &rest, &rlen); /* checked by the caller */
    pz_split_prefixed(rest, rlen, &tb, &tblen, &value, &vlen);
    if (pz_retry_again(io, w, head, msg, mlen) == 0)
        return 0;
    pz_buf attempts = PZ_BUF_INIT;
    if (pz_retry_take(io, w, pz_frame_id(head), msg, mlen, &attempts) != 0) {
        pz_io_fail(io, "out of memory in the I/O thread (the attempts of a call)");
        return -1;
    }
    pz_part parts[] = {{pz_frame_payload(head), pz_frame_payload_len(head), 1},
                       {msg, mlen, 1},
                       {tb, tblen, 1},
                       {value, vlen, 1},
                       {attempts.data, attempts.len, 0}};
    int rc = pz_io_record_error(io, PZ_ERR_RAISED, pz_frame_tag(head), pz_frame_id(head), parts, 5);
    pz_buf_free(&attempts);
    return rc;
}

/* A RESULT or ERROR frame: it answers the call at out_head. */
static void on_answer(struct pz_io *io, pz_slot *w, const pz_frame *f)
{
    if ((w->state != SLOT_READY && w->state != SLOT_STOPPING && w->state != SLOT_RETIRING) ||
        w->inflight == 0) {
        reject(io, w, "an answer to no call");
        return;
    }
    char *head = w->out.data + w->out_head;
    if (pz_frame_id(head) != f->id) {
        reject(io, w, "an answer to the wrong call");
        return;
    }
    const char *p = f->payload;
    size_t n = f->len;
    uint64_t ns;
    if (pz_take_varint(&p, &n, &ns) != 0) {
        reject(io, w, "a truncated answer");
        return;
    }
    if (f->type == PZ_F_ERROR) {
        /* Message, traceback, value: checked here, since the main thread
         * trusts records. */
        const char *s, *rest;
        size_t slen, rlen;
        if (pz_split_prefixed(p, n, &s, &slen, &rest, &rlen) != 0 ||
            pz_split_prefixed(rest, rlen, &s, &slen, &rest, &rlen) != 0) {
            reject(io, w, "a truncated error");
            return;
        }
    }
    if (w->doomed == f->id)
        w->doomed = 0; /* it finished before its kill: the kill requeues the rest */
    int64_t now = io->now; /* read once per read: the answers came at once */
    io->slot_stats[w->slot].calls++;
    io->slot_stats[w->slot].busy_ns += ns;
    if (pz_frame_flags(head) & PZ_CALL_CANCELLED) {
        /* Its cancellation is its record already. */
    } else if (f->type == PZ_F_RESULT) {
        pz_part part = {p, n, 0};
        if (pz_io_record(io, PZ_F_RESULT, pz_frame_tag(head), f->id, &part, 1) != 0)
            return;
    } else if (on_error_answer(io, w, head, p, n) != 0) {
        return;
    }
    if (w->remote)
        note_round_trip(w, f->id, ns);
    update_depth(io, w, ns);
    answered(io, w, now);
}

/* An INIT_OK or INIT_ERROR frame. */
static void on_init(struct pz_io *io, pz_slot *w, const pz_frame *f)
{
    if (w->state != SLOT_STARTING && w->state != SLOT_STOPPING) {
        reject(io, w, "an unexpected INIT answer");
        return;
    }
    if (f->type == PZ_F_INIT_OK) {
        uint8_t v[PZ_VARINT_MAX_BYTES];
        pz_part parts[] = {{v, pz_put_varint(v, f->id), 0}, {f->payload, f->len, 0}};
        if (pz_io_record(io, PZ_F_INIT_OK, 0, (uint64_t)w->slot, parts, 2) != 0)
            return;
        w->init_crashes = 0;
        if (w->state == SLOT_STARTING)
            w->state = SLOT_READY;
        if (w->out_sent == w->out.len && w->out_head == w->out.len)
            w->out.len = w->out_head = w->out_sent = 0;
        pz_io_settle(io, w);
        return;
    }
    const char *msg, *tb;
    size_t mlen, tblen;
    if (pz_split_prefixed(f->payload, f->len, &msg, &mlen, &tb, &tblen) != 0) {
        reject(io, w, "a truncated INIT error");
        return;
    }
    pz_part parts[] = {{msg, mlen, 1}, {tb, tblen, 0}};
    if (pz_io_record(io, PZ_F_INIT_ERROR, 0, (uint64_t)w->slot, parts, 2) != 0)
        return;
    char *why = strndup(msg, mlen);
    pz_io_remember_error(io, why ? why : "initialization failed (its message did not fit in memory)");
    free(why);
    w->state = SLOT_GONE;
    pz_io_settle(io, w);
    pz_io_check_fatal(io);
}

/* A CLOSED frame: what the executor's close returned, for p.closed. */
static void on_closed(struct pz_io *io, pz_slot *w, const pz_frame *f)
{
    pz_part part = {f->payload, f->len, 0};
    pz_io_record(io, PZ_F_CLOSED, 0, (uint64_t)w->slot, &part, 1);
}

/* Handles the whole frames at the front of w->in; returns how many bytes
 * they took, or -1 when the worker was rejected or the pool failed. */
static ssize_t handle_frames(struct pz_io *io, pz_slot *w, size_t max_payload)
{
    size_t pos = 0;
    for (;;) {
        pz_frame f;
        const char *why;
        int rc = pz_frame_parse(w->in.data + pos, w->in.len - pos, max_payload, &f, NULL, &why);
        if (rc == PZ_PARSE_MORE)
            return (ssize_t)pos;
        if (rc == PZ_PARSE_BAD) {
            if (w->remote && w->state == SLOT_STARTING && pos == 0)
                reject_output(io, w, why);
            else
                reject(io, w, why);
            return -1;
        }
        if (f.type == PZ_F_RESULT || f.type == PZ_F_ERROR)
            on_answer(io, w, &f);
        else if (f.type == PZ_F_INIT_OK || f.type == PZ_F_INIT_ERROR)
            on_init(io, w, &f);
        else if (f.type == PZ_F_CLOSED)
            on_closed(io, w, &f);
        else
            reject(io, w, "a frame type workers do not send");
        if (w->why[0] || io->fatal)
            return -1;
        pos += f.size;
    }
}

/* The parent has no room for the answer whose header starts w->in (need
 * bytes in all): if it answers w's current call, that call becomes an
 * error saying so, the rest of the frame is skipped as it comes, and the
 * worker goes on.  Returns 0 then; -1 when the frame is not such an
 * answer. */
static int skip_answer(struct pz_io *io, pz_slot *w, size_t need)
{
    const char *head = w->out.data + w->out_head;
    uint8_t type = pz_frame_type(w->in.data);
    if ((type != PZ_F_RESULT && type != PZ_F_ERROR) || w->inflight == 0 ||
        (w->state != SLOT_READY && w->state != SLOT_STOPPING && w->state != SLOT_RETIRING) ||
        pz_frame_id(head) != pz_frame_id(w->in.data))
        return -1;
    char msg[200];
    snprintf(msg, sizeof msg, "call %" PRIu64 ": the parent could not allocate %zu bytes for its %s",
             pz_frame_id(head), need, type == PZ_F_RESULT ? "result" : "error");
    if (!(pz_frame_flags(head) & PZ_CALL_CANCELLED) &&
        record_error(io, head, msg, PZ_ERR_PARENT) != 0)
        return 0; /* the pool failed; nothing more is read */
    w->discard = need - w->in.len;
    w->in.len = 0;
    pz_buf_trim(&w->in, 0);
    answered(io, w, pz_now_ns());
    return 0;
}

/* Reads and drops up to w->discard bytes; returns what recv returned. */
static ssize_t read_discarded(pz_slot *w)
{
    char sink[READ_CHUNK];
    ssize_t r = recv(w->fd, sink, w->discard < sizeof sink ? w->discard : sizeof sink, MSG_DONTWAIT);
    if (r > 0)
        w->discard -= (size_t)r;
    return r;
}

int pz_slot_read(struct pz_io *io, pz_slot *w)
{
    size_t max_payload = (size_t)io->p->opt.max_message + PZ_FRAME_SLACK;
    for (int rounds = 0; w->fd >= 0 && !io->fatal; rounds++) {
        if (rounds == READS_PER_TURN)
            return 1;
        size_t room = 0;
        ssize_t r;
        if (w->discard > 0) {
            r = read_discarded(w);
        } else {
            /* Room for the rest of a frame whose header is in, at once;
             * and no more than its rest, so that nothing behind it has to
             * be moved to the front once it is handled. */
            size_t want = READ_CHUNK, need = 0;
            pz_frame f;
            const char *why;
            if (pz_frame_parse(w->in.data, w->in.len, max_payload, &f, &need, &why) ==
                    PZ_PARSE_MORE &&
                need > w->in.len + READ_CHUNK)
                want = need - w->in.len;
            if (!pz_buf_reserve(&w->in, want)) {
                if (want > READ_CHUNK && skip_answer(io, w, need) == 0)
                    continue;
                pz_io_fail(io, "out of memory in the I/O thread (reading from a worker)");
                return 0;
            }
            room = want > READ_CHUNK ? want : w->in.cap - w->in.len;
            r = recv(w->fd, w->in.data + w->in.len, room, MSG_DONTWAIT);
        }
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            break;
        if (r <= 0) {
            close_fd(io, w);
            if (!w->exited && !w->eof_at)
                w->eof_at = pz_now_ns();
            break;
        }
        if (room == 0)
            continue; /* discarded */
        w->in.len += (size_t)r;
        io->now = pz_now_ns();
        ssize_t used = handle_frames(io, w, max_payload);
        if (used < 0)
            return 0;
        pz_buf_consume(&w->in, (size_t)used);
        if ((size_t)r < room)
            break; /* drained */
    }
    if (w->in.len == 0)
        pz_buf_trim(&w->in, KEEP_BYTES);
    return 0;
}

/* ---- frames to the worker ---------------------------------------------- */

void pz_slot_flush(struct pz_io *io, pz_slot *w)
{
    while (w->fd >= 0 && w->out_sent < w->out.len) {
        ssize_t r = send(w->fd, w->out.data + w->out_sent, w->out.len - w->out_sent,
                         MSG_DONTWAIT | MSG_NOSIGNAL);
        if (r > 0) {
            w->out_sent += (size_t)r;
            continue;
        }
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            if (!w->want_out) {
                w->want_out = 1;
                pz_slot_watch(io, w, EPOLL_CTL_MOD);
            }
            return;
        }
        /* EPIPE / ECONNRESET: the worker is dying; its end is handled
         * when the spawner reports it. */
        return;
    }
    if (w->want_out && w->fd >= 0) {
        w->want_out = 0;
        pz_slot_watch(io, w, EPOLL_CTL_MOD);
    }
}

/* Appends a STOP frame to w's output. */
static int append_stop(struct pz_io *io, pz_slot *w)
{
    char *d = pz_buf_reserve(&w->out, PZ_FRAME_HEADER);
    if (!d) {
        pz_io_fail(io, "out of memory in the I/O thread (stopping a worker)");
        return -1;
    }
    w->out.len += pz_frame_put(d, PZ_F_STOP, 0, NULL, 0);
    return 0;
}

/* w has been given its last call (max_calls): it gets STOP behind it, and
 * the slot's other record starts the replacement now, while it finishes
 * (or, if that record's own worker is still retiring, once it has gone:
 * pz_slot_ended). */
static void retire(struct pz_io *io, pz_slot *w)
{
    if (append_stop(io, w) != 0)
        return;
    w->state = SLOT_RETIRING;
    io->recycles++;
    pz_slot *next = partner(io, w);
    if (next->state == SLOT_SPARE && !io->stopping && !io->spawner_gone)
        pz_slot_start(io, next);
}

int pz_slot_hand_call(struct pz_io *io, pz_slot *w, const char *frame, size_t size)
{
    if (pz_buf_append(&w->out, frame, size) != 0) {
        pz_io_fail(io, "out of memory in the I/O thread (handing a call to a worker)");
        return -1;
    }
    if (w->remote && w->inflight == 0) {
        w->probe_id = pz_frame_id(frame);
        w->probe_at = pz_now_ns();
    }
    if (w->inflight++ == 0)
        w->head_since = pz_now_ns();
    if (++w->given == io->p->opt.max_calls)
        retire(io, w);
    return 0;
}

void pz_slot_stop(struct pz_io *io, pz_slot *w)
{
    switch (w->state) {
    case SLOT_READY: {
        /* Take back the calls not yet written: whole frames past out_sent. */
        size_t pos = w->out_head;
        while (pos < w->out.len && pos < w->out_sent)
            pos += pz_frame_size(w->out.data + pos);
        for (size_t q = pos; q < w->out.len; q += pz_frame_size(w->out.data + q))
            w->inflight--;
        if (pz_dispatch_requeue(io, w, pos, 0) != 0 || append_stop(io, w) != 0)
            return;
        w->state = SLOT_STOPPING;
        pz_slot_flush(io, w);
        return;
    }
    case SLOT_RETIRING:
        /* STOP is queued already, behind its last calls. */
        w->state = SLOT_STOPPING;
        return;
    case SLOT_STARTING:
        /* It holds no call: nothing to finish. */
        w->state = SLOT_STOPPING;
        pz_spawnq_kill(io, w, SIGKILL);
        return;
    case SLOT_IDLE:
    case SLOT_SPARE:
        w->state = SLOT_GONE;
        return;
    case SLOT_STOPPING:
    case SLOT_GONE:
        return;
    }
}

void pz_slot_timers(struct pz_io *io, pz_slot *w, int64_t now, int64_t *next)
{
#define CONSIDER(t) \
    if ((t) > 0 && (*next == 0 || (t) < *next)) *next = (t)
    if (w->state == SLOT_IDLE && !io->stopping && !io->spawner_gone && !io->fatal) {
        if (now >= w->respawn_at)
            pz_slot_start(io, w);
        if (w->state == SLOT_IDLE) /* not started, or failed to: later */
            CONSIDER(w->respawn_at);
    }
    if (w->eof_at && w->alive && !w->exited) {
        if (now - w->eof_at >= EOF_GRACE_NS) {
            if (!w->kill_sent) {
                w->kill_sent = 1;
                pz_spawnq_kill(io, w, SIGKILL);
            }
        } else {
            CONSIDER(w->eof_at + EOF_GRACE_NS);
        }
    }
    if (w->alive && !io->fatal)
        check_timeout(io, w, now, next);
#undef CONSIDER
}
