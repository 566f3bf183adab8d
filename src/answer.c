/*
 * answer.c - what a worker sends back, as the parent's I/O thread reads it:
 * reading its socket, cutting frames, and what each frame does (an answer
 * to a call, the answer to INIT, what close returned); the in-flight depth
 * the answers' run times set.  Runs with io->lock held (io.h).
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "frame.h"
#include "io.h"
#include "run.h"
#include "sys.h"
#include "varint.h"

#define READ_CHUNK 65536
/* A worker's buffers are kept when they empty, up to this size: freeing
 * and growing them again for every big call would cost a page fault per
 * page. */
#define KEEP_BYTES (2 * PZ_SLOT_BYTES)
#define READS_PER_TURN 8 /* then other slots get their turn */

/* A remote slot's launcher wrote something that is not a frame before
 * its worker answered INIT: most often a shell start-up file on the other
 * host printing on stdout, or a launcher that is not running pzlua
 * --worker.  The message shows what came. */
static void reject_output(struct pz_io *io, pz_slot *w, const char *why)
{
    char seen[PZ_SHOWN_BYTES_MAX];
    pz_show_bytes(w->in.data, w->in.len, seen);
    char msg[256];
    snprintf(msg, sizeof msg, "%s: \"%s\"...; does the remote shell print on stdout?", why, seen);
    pz_slot_reject(io, w, msg);
}

/* The in-flight depth: enough calls to cover `window` of work.  A remote
 * worker's also covers its round trip, plus the call it runs: an answer
 * takes half a round trip to come back and the call it makes room for
 * half a round trip to get there, and the worker should not run dry
 * meanwhile. */
void pz_slot_set_depth(struct pz_io *io, pz_slot *w)
{
    if (w->avg_ns <= 0)
        return; /* no answer yet: the depth a slot starts with */
    double d = (double)io->p->opt.window_ns / w->avg_ns;
    if (w->remote)
        d += w->rtt_ns / w->avg_ns + 1;
    w->depth = d < 1 ? 1 : d > io->inflight_cap ? io->inflight_cap : (uint32_t)d;
}

/* `calls` answered calls took `ns` each. */
static void update_depth(struct pz_io *io, pz_slot *w, uint64_t ns, unsigned calls)
{
    w->avg_ns = w->avg_ns > 0 ? pz_run_average(w->avg_ns, (double)ns, calls) : (double)ns + 1;
    pz_slot_set_depth(io, w);
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

/* The `n` calls before out_head, just moved past them, have been
 * answered: w holds them no more. */
static void answered(struct pz_io *io, pz_slot *w, uint32_t n, int64_t now)
{
    w->head_since = now;
    if ((w->inflight -= n) == 0)
        io->last_idle = w->index;
    /* Drop the answered frames at the front now and then: a worker that
     * always has calls in flight never empties its buffer.  Only once they
     * are four times what is left, so that moving the rest to the front
     * costs a quarter of a copy per byte at most. */
    if (w->out_head == w->out.len) {
        pz_slot_out_dropped(w, SIZE_MAX);
        pz_buf_trim(&w->out, KEEP_BYTES);
        pz_buf_trim(&w->wire, KEEP_BYTES);
    } else if (w->out_head >= READ_CHUNK && w->out_head / 4 >= w->out.len - w->out_head) {
        pz_buf_consume(&w->out, w->out_head);
        pz_slot_out_dropped(w, w->out_head);
    }
}

/* The call at out_head has been answered: drops it from w. */
static void answered_head(struct pz_io *io, pz_slot *w, int64_t now)
{
    w->out_head += pz_frame_size(w->out.data + w->out_head);
    answered(io, w, 1, now);
}

/* An ERROR answer from the worker (payload after the run time: message,
 * traceback, value): the call runs again when retries allow (and no_retry
 * is 0: a call cancelled while it ran does not), else becomes
 * an error record with every attempt it made.  Returns -1 when the pool
 * failed. */
static int on_error_answer(struct pz_io *io, pz_slot *w, char *head, const char *p, size_t n,
                           int no_retry)
{
    const char *msg, *tb, *value, *rest;
    size_t mlen, tblen, vlen, rlen;
    pz_split_prefixed(p, n, &msg, &mlen, &rest, &rlen); /* checked by the caller */
    pz_split_prefixed(rest, rlen, &tb, &tblen, &value, &vlen);
    if (!no_retry && pz_retry_again(io, w, head, msg, mlen) == 0)
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

/* The RESULT record of frame f, whose result is p[0..n), answering the
 * CALL `head`: a big one that fills w->in travels in that buffer
 * (bigbuf.h), and w->in starts anew; a chunk's is marked PZ_REC_CHUNK
 * (copied from its CALL here, the one place that knows both).  Returns
 * what pz_io_record does. */
static int record_result(struct pz_io *io, pz_slot *w, const pz_frame *f, const char *head,
                         const char *p, size_t n)
{
    uint8_t tag = pz_frame_tag(head);
    uint8_t flags = (pz_frame_flags(head) & PZ_CALL_CHUNK) ? PZ_REC_CHUNK : 0;
    int boxed = n >= PZ_BOX_MIN && f->payload - PZ_FRAME_HEADER == w->in.data && f->size == w->in.len;
    pz_box box = {w->in.data, w->in.cap, p, n};
    pz_part part = boxed ? (pz_part){&box, sizeof box, 0} : (pz_part){p, n, 0};
    if (pz_io_record(io, PZ_F_RESULT, tag, f->id, &part, 1) != 0)
        return -1;
    if (flags && (f->flags & PZ_RESULT_ITEM_RAISED)) {
        io->failed++; /* an error record, the map's or the store's (frame.h) */
        flags |= PZ_REC_FAILED;
    }
    if (boxed) {
        flags |= PZ_REC_BOXED;
        w->in = (pz_buf)PZ_BUF_INIT;
    }
    if (flags) {
        /* The record ends where the done queue's writing does. */
        pz_spsc *q = &io->p->done;
        pz_frame_set_flags(q->wr->data + q->wpos - (PZ_FRAME_HEADER + part.len), flags);
    }
    return 0;
}

/* A RESULT or ERROR frame: it answers the call at out_head. */
static void on_answer(struct pz_io *io, pz_slot *w, const pz_frame *f)
{
    if ((w->state != SLOT_READY && w->state != SLOT_STOPPING && w->state != SLOT_RETIRING) ||
        w->inflight == 0) {
        pz_slot_reject(io, w, "an answer to no call");
        return;
    }
    char *head = w->out.data + w->out_head;
    if (pz_frame_id(head) != f->id) {
        pz_slot_reject(io, w, "an answer to the wrong call");
        return;
    }
    const char *p = f->payload;
    size_t n = f->len;
    uint64_t ns;
    if (pz_take_varint(&p, &n, &ns) != 0) {
        pz_slot_reject(io, w, "a truncated answer");
        return;
    }
    if (f->type == PZ_F_ERROR) {
        /* Message, traceback, value: checked here, since the main thread
         * trusts records. */
        const char *s, *rest;
        size_t slen, rlen;
        if (pz_split_prefixed(p, n, &s, &slen, &rest, &rlen) != 0 ||
            pz_split_prefixed(rest, rlen, &s, &slen, &rest, &rlen) != 0) {
            pz_slot_reject(io, w, "a truncated error");
            return;
        }
    }
    /* A call cancelled while it ran that raised before its kill landed
     * has finished: it is not run again (retries). */
    int cancelled = w->doomed == f->id && w->doomed_kind == PZ_ERR_CANCELLED;
    if (w->doomed == f->id)
        w->doomed = 0; /* it finished before its kill: the kill requeues the rest */
    int64_t now = io->now; /* read once per read: the answers came at once */
    io->slot_stats[w->slot].calls++;
    io->slot_stats[w->slot].busy_ns += ns;
    if (pz_frame_flags(head) & PZ_CALL_CANCELLED) {
        /* Its cancellation is its record already. */
        pz_io_release(io, head);
    } else if (f->type == PZ_F_RESULT) {
        /* A call that raised before and succeeded now: its attempts are
         * nobody's any more (only an error record carries them). */
        if (pz_frame_tries(head))
            pz_retry_forget(io, f->id);
        if (record_result(io, w, f, head, p, n) != 0)
            return;
    } else if (on_error_answer(io, w, head, p, n, cancelled) != 0) {
        return;
    }
    if (w->remote)
        note_round_trip(w, f->id, ns);
    update_depth(io, w, ns, 1);
    answered_head(io, w, now);
}

/* One record for calls of a run's answer with one tag: `m` of them, whose
 * items (run.h) are items[0..len).  Returns what pz_io_record does. */
static int record_run(struct pz_io *io, uint8_t tag, uint64_t first, unsigned m, const uint8_t *items,
                      size_t len)
{
    uint8_t count[2] = {(uint8_t)(m & 0xff), (uint8_t)(m >> 8)};
    pz_part parts[] = {{count, 2, 0}, {items, len, 0}};
    if (pz_io_record(io, PZ_F_RESULT, tag, first, parts, 2) != 0)
        return -1;
    pz_spsc *q = &io->p->done;
    pz_frame_set_flags(q->wr->data + q->wpos - (PZ_FRAME_HEADER + 2 + len), PZ_REC_RUN);
    io->calls_done += m - 1; /* pz_io_record counted one */
    return 0;
}

/* Reads one call of a run's answer from [*p, end): its id and where its
 * item (run.h) and its tuple end.  Returns 0, or -1 when cut short. */
static int next_run_item(const uint8_t **p, const uint8_t *end, uint64_t *id)
{
    if (pz_get_varint(p, end, id) != 0 || end - *p < 4)
        return -1;
    const uint8_t *q = *p;
    uint32_t len = pz_le32_get((const char *)q);
    if ((size_t)(end - q) - 4 < len)
        return -1;
    *p = q + 4 + len;
    return 0;
}

/* A RESULT frame with flag PZ_RESULT_RUN: the results of calls in a row
 * from out_head on (run.h), read in one pass: each is checked against its
 * own CALL frame as it comes, and each stretch of calls with one tag
 * becomes one record (a cancelled call's result is dropped, as
 * on_answer's is).  A call whose part of the answer is malformed, or
 * names another call, has the worker rejected: the calls before it were
 * answered rightly and keep their results; it and those after it go back
 * to the queue with the rest of what the worker held.  (A first pass
 * that checked every call before recording any read each varint twice: a
 * seventh of the I/O thread's time in a loop of tiny calls.) */
static void on_run_answer(struct pz_io *io, pz_slot *w, const pz_frame *f)
{
    const uint8_t *p = (const uint8_t *)f->payload, *end = p + f->len;
    if ((w->state != SLOT_READY && w->state != SLOT_STOPPING && w->state != SLOT_RETIRING) ||
        f->len < PZ_RUN_ANSWER_HEAD) {
        pz_slot_reject(io, w, "a truncated answer");
        return;
    }
    unsigned n = pz_run_count(p);
    uint64_t ns = pz_le64_get(p + 2), id;
    p += PZ_RUN_ANSWER_HEAD;
    if (n == 0 || n > w->inflight) {
        pz_slot_reject(io, w, "an answer to no call");
        return;
    }
    int64_t now = io->now;
    const char *bad = NULL;
    int failed = 0;
    const uint8_t *from = p; /* the stretch not recorded yet */
    unsigned m = 0, i;
    uint8_t tag = 0;
    uint64_t first = 0;
    for (i = 0; i < n; i++) {
        const char *head = w->out.data + w->out_head;
        const uint8_t *item = p;
        if (next_run_item(&p, end, &id) != 0 || (i == n - 1 && p != end)) {
            bad = "a truncated answer";
            p = item;
            break;
        }
        if (pz_frame_id(head) != id) {
            bad = "an answer to the wrong call";
            p = item;
            break;
        }
        if (w->doomed == id)
            w->doomed = 0; /* it finished before its kill: the kill requeues the rest */
        int dropped = (pz_frame_flags(head) & PZ_CALL_CANCELLED) != 0;
        if (m > 0 && (dropped || pz_frame_tag(head) != tag)) {
            if (record_run(io, tag, first, m, from, (size_t)(item - from)) != 0) {
                failed = 1;
                break;
            }
            m = 0;
        }
        if (dropped) {
            pz_io_release(io, head); /* its cancellation is its record already */
        } else {
            if (pz_frame_tries(head))
                pz_retry_forget(io, id);
            if (m++ == 0) {
                from = item;
                tag = pz_frame_tag(head);
                first = id;
            }
        }
        w->out_head += pz_frame_size(head);
    }
    if (i > 0)
        answered(io, w, i, now);
    if (failed)
        return;
    if (m > 0 && record_run(io, tag, first, m, from, (size_t)(p - from)) != 0)
        return;
    io->slot_stats[w->slot].calls += i;
    io->slot_stats[w->slot].busy_ns += ns * i;
    if (bad) {
        pz_slot_reject(io, w, bad);
        return;
    }
    update_depth(io, w, ns, n);
}

/* An INIT_OK or INIT_ERROR frame. */
static void on_init(struct pz_io *io, pz_slot *w, const pz_frame *f)
{
    if (w->state != SLOT_STARTING && w->state != SLOT_STOPPING) {
        pz_slot_reject(io, w, "an unexpected INIT answer");
        return;
    }
    if (f->type == PZ_F_INIT_OK) {
        uint8_t v[PZ_VARINT_MAX_BYTES];
        pz_part parts[] = {{v, pz_put_varint(v, f->id), 0}, {f->payload, f->len, 0}};
        if (pz_io_record(io, PZ_F_INIT_OK, 0, (uint64_t)w->slot, parts, 2) != 0)
            return;
        /* A local worker's INIT_OK carries its getpid() (worker.c), and can
         * be read before the spawner's report of the fork: a worker that
         * answers calls at once would be named pid 0 in attempts, stats and
         * messages until then.  Only for naming it: signals and the match
         * with its end wait for the report (spawnq.c).  A remote slot's pid
         * is its launcher's, which only the spawner knows. */
        if (!w->remote && !w->pid_reported && f->id > 0 && f->id <= INT32_MAX)
            w->pid = (pid_t)f->id;
        io->slot_stats[w->slot].init_record = w->index + 1;
        io->slot_stats[w->slot].init_gen = w->gen;
        w->init_crashes = 0;
        if (w->state == SLOT_STARTING)
            w->state = SLOT_READY;
        if (!pz_slot_unsent(w) && w->out_head == w->out.len)
            pz_slot_out_dropped(w, SIZE_MAX);
        pz_io_settle(io, w);
        return;
    }
    const char *msg, *tb;
    size_t mlen, tblen;
    if (pz_split_prefixed(f->payload, f->len, &msg, &mlen, &tb, &tblen) != 0) {
        pz_slot_reject(io, w, "a truncated INIT error");
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
        int first = w->remote && w->state == SLOT_STARTING && pos == 0;
        if (first && rc != PZ_PARSE_BAD && w->in.len >= PZ_FRAME_HEADER &&
            !pz_frame_is_init_answer(w->in.data)) {
            /* Checked as soon as the header is in, not once its payload
             * is: printed bytes before it would make that never. */
            rc = PZ_PARSE_BAD;
            why = "not a worker's first answer";
        }
        if (rc == PZ_PARSE_MORE)
            return (ssize_t)pos;
        if (rc == PZ_PARSE_BAD) {
            if (first)
                reject_output(io, w, why);
            else
                pz_slot_reject(io, w, why);
            return -1;
        }
        if (f.type == PZ_F_RESULT && (f.flags & PZ_RESULT_RUN))
            on_run_answer(io, w, &f);
        else if (f.type == PZ_F_RESULT || f.type == PZ_F_ERROR)
            on_answer(io, w, &f);
        else if (f.type == PZ_F_INIT_OK || f.type == PZ_F_INIT_ERROR)
            on_init(io, w, &f);
        else if (f.type == PZ_F_CLOSED)
            on_closed(io, w, &f);
        else
            pz_slot_reject(io, w, "a frame type workers do not send");
        if (!w->in.data)
            return 0; /* a boxed result took the buffer, and the frame filled it */
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
        pz_slot_record_error(io, head, msg, PZ_ERR_PARENT) != 0)
        return 0; /* the pool failed; nothing more is read */
    w->discard = need - w->in.len;
    w->in.len = 0;
    pz_buf_trim(&w->in, 0);
    answered_head(io, w, pz_now_ns());
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
                need > w->in.len + READ_CHUNK) {
                want = need - w->in.len;
                /* A buffer a boxed result came back in, rather than fresh
                 * memory (bigbuf.h). */
                if (w->in.cap < need)
                    pz_bigbufs_take(&io->p->spares, &w->in, need);
            }
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
            pz_slot_close_fd(io, w);
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
