/*
 * slot.c - one worker record, as the parent's I/O thread sees it: starting
 * its process, the frames that go to it (what comes back: answer.c), its
 * replacement after max_calls, the calls it is killed for (timeouts,
 * cancels), its death and what happens to the calls it held.  Runs with
 * io->lock held (io.h).
 *
 * All worker sockets are non-blocking, so a worker that stops reading can
 * never block the loop.
 */
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
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
#include "run.h"
#include "sys.h"
#include "varint.h"
#include "worker.h"

#define SOCKET_BUFFER (1 << 20)
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

void pz_slot_close_fd(struct pz_io *io, pz_slot *w)
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
    /* Big calls and results go through in fewer writes and wake-ups with
     * room for a whole one in the socket.  Only a tuning: the kernel caps
     * it (net.core.wmem_max), and a refusal changes nothing else. */
    for (int i = 0; i < 2; i++)
        (void)setsockopt(sv[i], SOL_SOCKET, SO_SNDBUF, &(int){SOCKET_BUFFER}, sizeof(int));
    const pz_buf *init = &io->p->init[w->slot];
    pz_slot_out_dropped(w, SIZE_MAX);
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
    w->pid_reported = 0;
    w->alive = 1;
    w->exited = 0;
    w->kill_sent = 0;
    w->kill_at = 0;
    w->close_by = 0;
    w->init_deadline = io->p->opt.init_timeout_ns ? pz_now_ns() + io->p->opt.init_timeout_ns : 0;
    w->eof_at = 0;
    w->why[0] = 0;
    w->state = SLOT_STARTING;
    w->inflight = 0;
    w->depth = 1;
    w->given = 0;
    w->doomed = 0;
    w->doom_killed = 0;
    w->cancels_sent = 0;
    w->stopped_starting = 0;
    w->in.len = 0;
    w->discard = 0;
    w->want_out = 0;
    atomic_store(&io->p->shared[w->index].running, 0);
    pz_slot_watch(io, w, EPOLL_CTL_ADD);
    pz_spawnq_spawn(io, w, sv[1]);
    pz_slot_flush(io, w);
}

/* Sends w SIGKILL unless it was sent already. */
static void kill_once(struct pz_io *io, pz_slot *w)
{
    if (!w->kill_sent) {
        w->kill_sent = 1;
        pz_spawnq_kill(io, w, SIGKILL);
    }
}

/* With kill_grace = 0, srun got SIGTERM and SIGKILL in one pass, too
 * quickly to withdraw a job still queued, which stayed in Slurm's queue
 * (3 workers queued with --begin: stop(0), a collected pool and
 * init_timeout left their jobs 2 runs of 2; kill_grace = 0.01 left none). */
int64_t pz_slot_grace_ns(const struct pz_io *io, const pz_slot *w)
{
    int64_t grace = io->p->opt.kill_grace_ns;
    return w->remote && grace < PZ_LAUNCHER_GRACE_NS ? PZ_LAUNCHER_GRACE_NS : grace;
}

/* Ends a worker the pool gives up on while it starts (stop, init_timeout)
 * or runs (a call's timeout or cancel: doom).  A launcher gets SIGTERM,
 * and SIGKILL pz_slot_grace_ns later (pz_slot_timers): one still waiting
 * for the place it launches on (srun queued for an allocation) withdraws
 * the request (srun cancels its pending job), where SIGKILL would leave
 * the job in Slurm's queue for good; and `pzlua --worker` launched
 * directly passes SIGTERM on, then kills what its worker left running
 * (remote.c), which SIGKILLed it could not.  ssh and srun end their
 * remote side on SIGTERM as on SIGKILL.  A local worker: SIGKILL at once
 * (the spawner kills its leftovers). */
static void end_process(struct pz_io *io, pz_slot *w)
{
    if (w->remote) {
        /* Once only: stop() after init_timeout would otherwise start the
         * grace again, and SIGKILL come up to twice kill_grace late. */
        if (w->kill_at || w->kill_sent)
            return;
        pz_spawnq_kill(io, w, SIGTERM);
        w->kill_at = pz_now_ns() + pz_slot_grace_ns(io, w);
    } else {
        kill_once(io, w);
    }
}

/* The parent kills a worker that broke the protocol; it is then handled
 * like any other death. */
void pz_slot_reject(struct pz_io *io, pz_slot *w, const char *why)
{
    if (w->why[0])
        return;
    snprintf(w->why, sizeof w->why, "was killed after it sent a malformed frame (%s)", why);
    pz_slot_close_fd(io, w);
    kill_once(io, w);
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

/* Whether a local worker holding calls ended itself with a failure
 * status, killed by nobody: a worker exits so when its own descriptors
 * fail it (writing results, reading calls) or its memory runs out, and
 * with no call named as running (worker.h), one of the calls it ran broke
 * it and returned: closed its descriptors, say.  Charged to no call, the
 * culprit went back to the queue again and again: 1,264 workers in 0.7 s
 * for one call that closed descriptors 3 to 20. */
static int ended_itself(const pz_slot *w, int known, int status)
{
    /* 128 + SIGTERM: the flusher's end for a SIGTERM the executor blocked
     * (wout.c, end_by_term), someone else's doing. */
    return known && WIFEXITED(status) && WEXITSTATUS(status) != 0 &&
           WEXITSTATUS(status) != 128 + SIGTERM && !w->why[0] && !w->kill_sent && !w->doomed &&
           w->inflight > 0;
}

/* The call that broke w (ended_itself), or 0 when that cannot be told.
 * The calls it was sent become suspects (PZ_CALL_SUSPECT); a suspect goes
 * to a worker that holds nothing, and the worker takes no other call until
 * it is answered (dispatch.c), so when it breaks that worker in turn, it
 * is the one: charged with the death, and an error at max_deaths like any
 * call that kills its workers.  An innocent suspect runs alone (again
 * alone when it raises and is retried: the mark stays with the frame). */
static uint64_t broken_by(pz_slot *w)
{
    const char *head = w->out.data + w->out_head;
    /* Only a call it received whole can have broken it. */
    if (pz_slot_holds_suspect(w) && w->inflight == 1 && w->out_head + pz_frame_size(head) <= w->out_sent)
        return pz_frame_id(head);
    for (size_t pos = w->out_head; pos < w->out.len && pos < w->out_sent;) {
        char *fr = w->out.data + pos;
        pz_frame_set_flags(fr, pz_frame_flags(fr) | PZ_CALL_SUSPECT);
        pos += pz_frame_size(fr);
    }
    return 0;
}

/* Writes an ERROR record of this kind for the CALL frame `call` that the
 * parent itself gives up on: its arguments, the message, no traceback, no
 * value, and the attempts it raised in before (option retries: a call
 * that raised, then timed out on its retry, says both).  Returns what
 * pz_io_record does. */
int pz_slot_record_error(struct pz_io *io, const char *call, const char *msg, uint8_t kind)
{
    pz_buf attempts = PZ_BUF_INIT;
    if (pz_retry_take_noted(io, pz_frame_id(call), &attempts) != 0) {
        pz_buf_free(&attempts);
        pz_io_fail(io, "out of memory in the I/O thread (the attempts of a call)");
        return -1;
    }
    pz_part parts[] = {{pz_frame_payload(call), pz_frame_payload_len(call), 1},
                       {msg, strlen(msg), 1},
                       {NULL, 0, 1},
                       {NULL, 0, 1},
                       {attempts.data, attempts.len, 0}};
    int rc = pz_io_record_error(io, kind, pz_frame_tag(call), pz_frame_id(call), parts, 5);
    pz_buf_free(&attempts);
    return rc;
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
    w->doom_killed = 1;
    end_process(io, w);
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

/* A call cancelled after it was sent (pz_slot_cancel) still reaches the
 * worker, which would run it, for ever perhaps, and the calls behind it
 * with it: once it runs, its worker is ended, as for a call cancelled
 * while it runs.  Returns 1 when it was; else lowers *next to when to look
 * again: soon when it is the oldest (the worker starts it without a word),
 * else at the next answer (which wakes the I/O thread anyway). */
static int end_cancelled(struct pz_io *io, pz_slot *w, const char *head, const char *fr, uint64_t id,
                         int64_t now, int64_t *next)
{
    if (fr && (pz_frame_flags(fr) & PZ_CALL_CANCELLED)) {
        doom(io, w, id, PZ_ERR_CANCELLED); /* its record exists: none is made at the death */
        return 1;
    }
    if (pz_frame_flags(head) & PZ_CALL_CANCELLED) {
        int64_t due = now + TIMEOUT_RECHECK_NS;
        if (*next == 0 || due < *next)
            *next = due;
        return 0;
    }
    for (size_t pos = w->out_head; pos < w->out_sent; pos += pz_frame_size(w->out.data + pos))
        if (pz_frame_flags(w->out.data + pos) & PZ_CALL_CANCELLED)
            return 0;
    w->cancels_sent = 0; /* answered, all of them */
    return 0;
}

/* True when w's process (a local worker, or a remote one's launcher) is
 * known to have ended although the pool has not handled its end yet: its
 * end of the socket is closed (an exit closes it before the process is
 * reaped, so a zombie shows too), or the pid names no process (a worker
 * that forked keeps a copy of the socket open: its pid tells).  The I/O
 * thread handles the end at its next turn, as a death. */
static int worker_gone(const pz_slot *w)
{
    if (w->fd >= 0) {
        struct pollfd pfd = {.fd = w->fd, .events = POLLRDHUP};
        if (poll(&pfd, 1, 0) > 0 && (pfd.revents & (POLLRDHUP | POLLHUP | POLLERR)))
            return 1;
    }
    return w->pid > 0 && kill(w->pid, 0) != 0 && errno == ESRCH;
}

/* Ends the call w's worker runs if it has run out of time, or was
 * cancelled after it was sent; lowers *next to when to look again. */
static void check_timeout(struct pz_io *io, pz_slot *w, int64_t now, int64_t *next)
{
    if (w->inflight == 0 || w->doomed || w->out_head >= w->out_sent)
        return;
    const char *head = w->out.data + w->out_head;
    int64_t started;
    uint64_t id = running_call(io, w, &started);
    const char *fr = id ? sent_frame(w, id) : NULL;
    if (w->cancels_sent && end_cancelled(io, w, head, fr, id, now, next))
        return;
    int64_t limit, due;
    if (fr) {
        limit = pz_slot_timeout_ns(io, fr);
        if (!limit)
            return;
        due = started + limit;
        if (now >= due) {
            /* A worker killed from outside keeps its last call in the
             * shared slot until the pool learns of its death (the
             * spawner's report, or its socket's end): that call did not
             * run out of time, it died with the worker, and the death,
             * which comes next, runs it again.  Under load the news can
             * come a quarter of a second later and more.  (A worker that
             * answered and then died has its answer in the socket: read
             * first, it is not a timeout either.) */
            if (!worker_gone(w)) {
                doom(io, w, id, PZ_ERR_TIMEOUT);
                return;
            }
            due = now + TIMEOUT_RECHECK_NS;
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

/* What pz_slot_cancel does to the frame fr, at pos, of a call to cancel:
 * returns 1 when the frame is to be dropped from w->out. */
static int cancel_frame(struct pz_io *io, pz_slot *w, char *fr, size_t pos)
{
    if (pz_frame_flags(fr) & PZ_CALL_CANCELLED)
        return 0;
    uint64_t id = pz_frame_id(fr);
    char msg[80];
    snprintf(msg, sizeof msg, "call %" PRIu64 " cancelled", id);
    if (pos >= w->out_sent) {
        /* Not sent yet: it never will be. */
        if (pz_slot_record_error(io, fr, msg, PZ_ERR_CANCELLED) != 0)
            return 0;
        w->inflight--;
        return 1;
    }
    int64_t started;
    if (running_call(io, w, &started) == id) {
        doom(io, w, id, PZ_ERR_CANCELLED); /* the error comes with its death */
        return 0;
    }
    /* Sent, not started: dropped now; its answer, if one comes, is not.
     * The worker will still decode its arguments: their big strings stay
     * until it has (PZ_REC_HELD, pz_io_release). */
    if (pz_slot_record_error(io, fr, msg, PZ_ERR_CANCELLED | PZ_REC_HELD) == 0) {
        pz_frame_set_flags(fr, pz_frame_flags(fr) | PZ_CALL_CANCELLED);
        w->cancels_sent = 1; /* ended as it starts: check_timeout */
    }
    return 0;
}

uint32_t pz_slot_cancelled_held(const pz_slot *w)
{
    uint32_t n = 0;
    for (size_t pos = w->out_head; pos < w->out_sent; pos += pz_frame_size(w->out.data + pos))
        if (pz_frame_flags(w->out.data + pos) & PZ_CALL_CANCELLED)
            n++;
    return n;
}

size_t pz_slot_cancel(struct pz_io *io, pz_slot *w, const uint64_t *ids, size_t n)
{
    /* One pass; the frames dropped (never sent: all past out_sent) are
     * closed up behind it, the kept ones moved down to `to`. */
    size_t held = 0, to = w->out_head, direct_end = w->direct_end, dropped_before_direct = 0;
    for (size_t pos = w->out_head; pos < w->out.len;) {
        char *fr = w->out.data + pos;
        size_t size = pz_frame_size(fr);
        int drop = 0;
        if (held < n && pz_frame_type(fr) == PZ_F_CALL && pz_id_among(ids, n, pz_frame_id(fr))) {
            held++;
            drop = cancel_frame(io, w, fr, pos);
        }
        if (drop) {
            if (direct_end > pos)
                dropped_before_direct += size;
        } else {
            if (to != pos)
                memmove(w->out.data + to, fr, size);
            to += size;
        }
        pos += size;
    }
    w->out.len = to;
    w->direct_end = direct_end - dropped_before_direct;
    return held;
}

/* ---- deaths ---------------------------------------------------------------- */

/* A worker that held calls died.  The call it was killed for (timeout,
 * cancel) becomes an error of that kind; else the call it was running
 * (its id is in the shared memory, see worker.h; a remote worker's:
 * remote_running_call) is charged with a death
 * and becomes an error once it has killed max_deaths workers; a map's
 * chunk (PZ_CALL_CHUNK) at its first: run again whole, its items would all
 * run again, as many times as it is killed, and the map runs them as calls
 * of their own anyway once it fails (chunks.lua), each with max_deaths to
 * spend.  Every other call it held, including calls whose results it had
 * not sent yet, goes back to the front of the queue. */
static void requeue_inflight(struct pz_io *io, pz_slot *w, const char *how, int known, int status)
{
    uint64_t running = atomic_load(&io->p->shared[w->index].running), drop = 0;
    atomic_store(&io->p->shared[w->index].running, 0);
    /* "while running" the call, or "after running" it: one that broke its
     * worker had returned (broken_by). */
    const char *when = "while";
    if (w->remote) {
        running = remote_running_call(w, known, status);
    } else if (!running && ended_itself(w, known, status)) {
        running = broken_by(w);
        when = "after";
    }
    w->cancels_sent = 0; /* its calls leave it */
    if (w->doomed) {
        char *fr = sent_frame(w, w->doomed);
        /* A call cancelled after it was sent has its record already: it
         * goes back to the queue, which drops it (and releases it). */
        if (fr && !(pz_frame_flags(fr) & PZ_CALL_CANCELLED)) {
            char msg[160], secs[32];
            if (w->doomed_kind == PZ_ERR_TIMEOUT) {
                pz_format_seconds(pz_slot_timeout_ns(io, fr), secs, sizeof secs);
                snprintf(msg, sizeof msg, "call %" PRIu64 " timed out after %s s", w->doomed, secs);
            } else {
                snprintf(msg, sizeof msg, "call %" PRIu64 " cancelled", w->doomed);
            }
            if (pz_slot_record_error(io, fr, msg, w->doomed_kind) == 0)
                drop = w->doomed;
        }
        w->doomed = 0;
    } else if (running && w->inflight > 0 && !io->stopping && !io->spawner_gone && !w->doom_killed) {
        /* Workers terminated by stop() or lost with the spawner did not
         * die of their call, nor did one killed for a call that finished
         * before the kill landed (the one it ran then is innocent). */
        char *fr = sent_frame(w, running);
        if (fr && !(pz_frame_flags(fr) & PZ_CALL_CANCELLED)) {
            uint8_t deaths = (uint8_t)(pz_frame_deaths(fr) + 1);
            pz_frame_set_deaths(fr, deaths);
            char msg[640];
            if (pz_frame_flags(fr) & PZ_CALL_CHUNK)
                snprintf(msg, sizeof msg,
                         "call %" PRIu64 " (a chunk of a map's items) ended with its worker: "
                         "worker %d (pid %d) %s %s running it; a map still running runs its "
                         "items again as calls of their own",
                         running, w->slot + 1, (int)w->pid, how, when);
            else if (deaths >= io->p->opt.max_deaths)
                snprintf(msg, sizeof msg,
                         "call %" PRIu64 " killed %d worker%s (max_deaths = %d); the last: worker "
                         "%d (pid %d) %s %s running call %" PRIu64,
                         running, deaths, deaths == 1 ? "" : "s", io->p->opt.max_deaths, w->slot + 1,
                         (int)w->pid, how, when, running);
            else
                msg[0] = 0;
            if (msg[0] && pz_slot_record_error(io, fr, msg, PZ_ERR_KILLER) == 0)
                drop = running;
        }
    }
    if (pz_dispatch_requeue(io, w, w->out_head, drop) != 0)
        return; /* the pool failed: the frames stay for stop to abort */
    pz_slot_out_dropped(w, SIZE_MAX);
    w->inflight = 0;
}

/* How a remote slot's launcher ended, for messages: "ended: its launcher
 * ssh exited with status 137 (...)". */
static void describe_launcher_end(struct pz_io *io, const pz_slot *w, int status, const char *wrote,
                                  char *buf, size_t len)
{
    char end[80];
    pz_describe_status(status, end, sizeof end);
    const char *name = io->p->launch[w->slot][0];
    int code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    const char *note = "";
    char sig[80];
    if (code == 255)
        note = " (its connection was lost, or it could not start the worker: see its messages on "
               "stderr)";
    else if (code == 127)
        note = " (its command was not found there: is pzlua on the remote PATH?)";
    else if (code == 126)
        note = " (its command could not be run there: not executable?)";
    else if (code > 128 && code < 128 + 65) {
        snprintf(sig, sizeof sig, " (the worker was killed by signal %d on its host)", code - 128);
        note = sig;
    }
    snprintf(buf, len, "ended: its launcher %.60s %s%s%s", name, end, wrote, note);
}

void pz_show_bytes(const char *p, size_t n, char *out)
{
    size_t len = 0;
    out[0] = '\0';
    for (size_t i = 0; i < n && i < 24 && len + 5 < PZ_SHOWN_BYTES_MAX; i++) {
        unsigned char c = (unsigned char)p[i];
        len += (size_t)snprintf(out + len, PZ_SHOWN_BYTES_MAX - len,
                                c >= 32 && c < 127 && c != '"' ? "%c" : "\\x%02x", c);
    }
}

void pz_slot_ended(struct pz_io *io, pz_slot *w, int known, int status)
{
    /* Everything it wrote before it died is still in the socket. */
    while (w->fd >= 0 && !io->fatal && pz_slot_read(io, w))
        ;
    pz_slot_close_fd(io, w);
    /* A launcher that wrote less than a frame header and ended (a remote
     * shell's "module: not found"): what it wrote is said, as for one that
     * wrote more (answer.c, reject_output). */
    char wrote[PZ_SHOWN_BYTES_MAX + 64] = "";
    if (w->remote && w->state == SLOT_STARTING && w->in.len > 0) {
        char seen[PZ_SHOWN_BYTES_MAX];
        pz_show_bytes(w->in.data, w->in.len, seen);
        snprintf(wrote, sizeof wrote, ", having written \"%s\"%s on its stdout", seen,
                 w->in.len > 24 ? "..." : "");
    }
    pz_buf_trim(&w->in, 0);
    w->in.len = 0;
    w->alive = 0;
    char how[448];
    if (w->why[0])
        snprintf(how, sizeof how, "%s", w->why);
    else if (known && w->remote)
        describe_launcher_end(io, w, status, wrote, how, sizeof how);
    else if (known)
        pz_describe_status(status, how, sizeof how);
    else
        snprintf(how, sizeof how, "ended with the spawner");
    if (w->doomed) {
        /* The pool killed it (a timeout, a cancel): said, or with respawn
         * = false "killed by signal 9" would read as someone else's kill. */
        size_t len = strlen(how);
        snprintf(how + len, sizeof how - len, " (ended by the pool: call %" PRIu64 " %s)", w->doomed,
                 w->doomed_kind == PZ_ERR_TIMEOUT ? "timed out" : "was cancelled");
    }
    char msg[640];
    switch (w->state) {
    case SLOT_STARTING:
        if (io->stopping || io->spawner_gone) {
            snprintf(msg, sizeof msg, "worker %d (pid %d) %s during initialization", w->slot + 1,
                     (int)w->pid, how);
            give_up(io, w, io->stopping ? NULL : msg, NULL, 0);
            return;
        }
        if (w->pid == 0) /* no process was ever there */
            snprintf(msg, sizeof msg, "worker %d could not be started (%d attempt%s); the last time, it %s",
                     w->slot + 1, w->init_crashes + 1, w->init_crashes ? "s" : "", how);
        else
            snprintf(msg, sizeof msg,
                     "worker %d died during initialization %d time%s; the last time, pid %d %s",
                     w->slot + 1, w->init_crashes + 1, w->init_crashes ? "s" : "", (int)w->pid, how);
        init_failed(io, w, msg);
        return;
    case SLOT_READY:
    case SLOT_RETIRING:
    case SLOT_STOPPING:
        if (io->fatal) {
            w->state = SLOT_GONE; /* its calls stay in w->out: stop aborts them */
            return;
        }
        /* Not an exit it was asked for; one stop() ended while it was
         * starting (SIGTERM or SIGKILL) was asked for. */
        if (!w->stopped_starting && (w->state == SLOT_READY || w->inflight > 0 || !known ||
                                     !WIFEXITED(status) || WEXITSTATUS(status) != 0))
            io->deaths++;
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
            else
                /* Its replacement may have been given up meanwhile (a
                 * Deferred constructor that raised): this was then the
                 * last worker of its slot, and perhaps of the pool. */
                pz_io_check_fatal(io);
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

/* ---- frames to the worker ---------------------------------------------- */

/* Writes what w's socket takes of bytes [*sent, len) at data, advancing
 * *sent.  Returns 1 when all went, 0 when the socket is full (EPOLLOUT is
 * then watched) or the worker is dying (its end is handled when the
 * spawner reports it: EPIPE, ECONNRESET). */
static int send_bytes(struct pz_io *io, pz_slot *w, const char *data, size_t *sent, size_t len)
{
    while (*sent < len) {
        ssize_t r = send(w->fd, data + *sent, len - *sent, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (r > 0) {
            *sent += (size_t)r;
            continue;
        }
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) && !w->want_out) {
            w->want_out = 1;
            pz_slot_watch(io, w, EPOLL_CTL_MOD);
        }
        return 0;
    }
    return 1;
}

/* Writes what w's socket takes of its output: first the runs made so far
 * (w->wire), then frames from w->out_sent, as runs where they may share
 * one (run.h), else as they are. */
static void flush_bytes(struct pz_io *io, pz_slot *w)
{
    while (w->fd >= 0) {
        if (w->wire_sent < w->wire.len) {
            if (!send_bytes(io, w, w->wire.data, &w->wire_sent, w->wire.len))
                return;
        }
        w->wire.len = w->wire_sent = 0;
        /* Runs in a row go out in one write: each one written apart cost a
         * system call on both sides per run (256 workers: 17 times the
         * writes). */
        while (w->out_sent < w->out.len && w->out_sent >= w->direct_end) {
            long gathered = pz_run_gather(io, w, &w->direct_end);
            if (gathered < 0)
                return;
            if (gathered == 0)
                break;
            w->out_sent = (size_t)gathered;
        }
        if (w->wire.len > 0)
            continue;
        if (w->out_sent >= w->out.len)
            break;
        if (!send_bytes(io, w, w->out.data, &w->out_sent, w->direct_end))
            return;
    }
    if (w->want_out && w->fd >= 0) {
        w->want_out = 0;
        pz_slot_watch(io, w, EPOLL_CTL_MOD);
    }
}

/* Whether w's oldest call has been written whole. */
static int head_sent(const pz_slot *w)
{
    return w->inflight > 0 && w->out_head + pz_frame_size(w->out.data + w->out_head) <= w->out_sent;
}

void pz_slot_flush(struct pz_io *io, pz_slot *w)
{
    /* A remote worker's oldest call cannot have started before its last
     * byte left: through a slow link, big arguments take seconds, which a
     * timeout must not count (head_since, check_timeout).  A local worker
     * says when it starts (worker.h). */
    if (w->remote && !head_sent(w)) {
        flush_bytes(io, w);
        if (head_sent(w))
            w->head_since = pz_now_ns();
        return;
    }
    flush_bytes(io, w);
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
    else if (next->state == SLOT_RETIRING && next->alive && io->p->opt.timeout_ms > 0)
        /* The slot's next worker starts only once `next` has exited: an
         * executor's close that never returns would hold the slot for
         * good.  The pool's timeout bounds it as it bounds a call
         * (pz_slot_timers). */
        next->close_by = pz_now_ns() + (int64_t)io->p->opt.timeout_ms * 1000000;
}

int pz_slot_hand_calls(struct pz_io *io, pz_slot *w, const char *frames, size_t size, uint32_t count)
{
    if (pz_buf_append(&w->out, frames, size) != 0) {
        pz_io_fail(io, "out of memory in the I/O thread (handing calls to a worker)");
        return -1;
    }
    if (w->inflight == 0) {
        w->head_since = pz_now_ns();
        if (w->remote) {
            w->probe_id = pz_frame_id(frames);
            w->probe_at = w->head_since;
        }
    }
    w->inflight += count;
    if ((w->given += count) == io->p->opt.max_calls)
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
        if (pz_dispatch_requeue(io, w, pos, 0) != 0)
            return;
        if (w->direct_end > pos)
            w->direct_end = pos;
        if (append_stop(io, w) != 0)
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
        w->stopped_starting = 1;
        end_process(io, w);
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
    /* init_timeout: a start that hangs (a Deferred constructor that never
     * returns, a launcher that never connects) ends like a death during
     * initialization: started again after a back-off, given up after
     * init_attempts.  After the start above, whose deadline it counts.
     * Its socket is closed at once: nothing it sends is read any more
     * (bytes after the deadline would pile up until the kill lands), and
     * a worker behind a launcher sees the end of its input and exits. */
    if (w->state == SLOT_STARTING && w->init_deadline && w->alive && !w->exited && !w->why[0]) {
        if (now >= w->init_deadline) {
            /* As given: %g would read 0.1234 as 0.123, 4e6 as 4e+06. */
            snprintf(w->why, sizeof w->why,
                     "was ended by the pool: it had not initialized within init_timeout (%.14g s)",
                     (double)io->p->opt.init_timeout_ns / 1e9);
            pz_slot_close_fd(io, w);
            end_process(io, w);
        } else {
            CONSIDER(w->init_deadline);
        }
    }
    if (w->eof_at && w->alive && !w->exited) {
        if (now - w->eof_at >= EOF_GRACE_NS) {
            kill_once(io, w);
        } else {
            CONSIDER(w->eof_at + EOF_GRACE_NS);
        }
    }
    if (w->kill_at && w->alive && !w->exited) {
        if (now >= w->kill_at) {
            w->kill_at = 0;
            kill_once(io, w);
        } else {
            CONSIDER(w->kill_at);
        }
    }
    if (w->close_by && w->alive && !w->exited && w->state == SLOT_RETIRING) {
        int64_t timeout = (int64_t)io->p->opt.timeout_ms * 1000000;
        if (w->inflight > 0) {
            /* Its last calls run on, each under its own timeout: the
             * close's time counts from the last answer. */
            w->close_by = now + timeout;
            CONSIDER(w->close_by);
        } else if (now >= w->close_by) {
            w->close_by = 0;
            snprintf(w->why, sizeof w->why,
                     "its executor's close had not returned within timeout (%g s) while its "
                     "replacement waited",
                     (double)timeout / 1e9);
            kill_once(io, w);
        } else {
            CONSIDER(w->close_by);
        }
    }
    if (w->alive && !io->fatal)
        check_timeout(io, w, now, next);
#undef CONSIDER
}
