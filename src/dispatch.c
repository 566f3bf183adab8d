/*
 * dispatch.c - the calls that wait for a worker, and which worker gets
 * which; cancelling a call wherever it waits.  Runs with io->lock held
 * (io.h).
 *
 * Calls wait in two places: the pool's submit queue (new calls, in the
 * order p(...) queued them) and io->rq (calls taken back from a worker that
 * died or was stopped, and calls that run again after raising), which goes
 * first, so that a requeued call does not wait behind everything queued
 * after it.  A cancelled call keeps its place with a flag (PZ_CALL_CANCELLED)
 * and is dropped when its turn comes.
 *
 * How many calls a worker may hold (io->inflight_cap, the ceiling of each
 * slot's depth) follows the backlog.  It starts at PZ_INFLIGHT_START; it
 * doubles, up to max_inflight, whenever every worker is full and more
 * than twice as many calls wait in the submit queue as the workers hold
 * together (twice: a stream's window is what workers hold at the start,
 * and must not count as a backlog); it halves back when the queue is
 * empty, the workers hold less than half of what they may, and no backlog
 * has been seen for PZ_INFLIGHT_CALM_NS (without that wait, a stream over
 * one fast worker and three slow ones grew and shrank it 57 times).
 * A loop of tiny p(i) queues far faster than workers run them: with four
 * busy threads on two CPUs the I/O thread can wait a scheduler's time
 * slice for a CPU, and a worker holding 256 calls (about 20 microseconds
 * of them) ran dry meanwhile.  A caller that paces its calls, as p:stream
 * does with a window of 256 a worker, gains nothing from deeper workers:
 * they took the whole window at once and the stream ran a quarter slower
 * (its window and its results then came in bursts).  So depth beyond the
 * start is given only to a backlog (a stream whose window widens makes
 * one: pool.lua).
 */
#include <inttypes.h>
#include <stdio.h>

#include "frame.h"
#include "io.h"

/* Calls handed to one slot in a row at most, before the next is picked:
 * few enough that workers with room share a burst of calls. */
#define DISPATCH_STREAK 32

/* The next slot with room, round robin from io->rr (without a division
 * per call); with `empty`, one that holds no call either (a suspect's:
 * slot.c, broken_by). */
static pz_slot *pick(struct pz_io *io, int empty)
{
    int n = io->nrecords, k = io->rr < n ? io->rr : 0;
    for (int i = 0; i < n; i++, k = k + 1 == n ? 0 : k + 1) {
        pz_slot *w = &io->slots[k];
        if ((!empty || w->inflight == 0) && pz_slot_has_room(w)) {
            io->rr = k + 1 == n ? 0 : k + 1;
            return w;
        }
    }
    return NULL;
}

pz_slot *pz_dispatch_pick(struct pz_io *io)
{
    return pick(io, 0);
}

int pz_dispatch_has_room(struct pz_io *io)
{
    /* A suspect at the front of the requeue goes only to a slot that holds
     * nothing, and the calls behind it wait for it (pz_dispatch).  Room
     * elsewhere is no room: the I/O loop, told otherwise, went round
     * without sleeping, never read the answers that would empty a slot,
     * and held its lock for good. */
    int empty = io->rq_pos < io->rq.len && pz_call_goes_alone(io->rq.data + io->rq_pos);
    for (int i = 0; i < io->nrecords; i++)
        if ((!empty || io->slots[i].inflight == 0) && pz_slot_has_room(&io->slots[i]))
            return 1;
    return 0;
}

/* io->inflight_cap changed: the depths under it follow.  A slot still at
 * depth 1 keeps it (a worker that has not answered yet gets one call; one
 * whose calls are longer than `window` stays at 1 anyway). */
static void apply_cap(struct pz_io *io)
{
    for (int i = 0; i < io->nrecords; i++)
        if (io->slots[i].state == SLOT_READY && io->slots[i].depth > 1)
            pz_slot_set_depth(io, &io->slots[i]);
}

/* All of the workers are full: doubles io->inflight_cap (and the depths
 * under it) when the cap is what holds a worker back (a slot holds as
 * many calls as the cap allows, where its calls' time or their bytes
 * would allow more) and more than twice as many calls wait in the submit
 * queue as the workers may hold together now (in bytes, at the calls'
 * average size).  Returns whether it grew. */
static int grow_for_backlog(struct pz_io *io)
{
    uint32_t most = io->p->opt.max_inflight;
    if (io->inflight_cap >= most || io->calls_taken == 0)
        return 0;
    uint64_t held = 0;
    int capped = 0;
    for (int i = 0; i < io->nrecords; i++) {
        const pz_slot *w = &io->slots[i];
        if (w->state == SLOT_READY) {
            held += w->depth;
            capped |= w->depth >= io->inflight_cap && w->inflight >= w->depth;
        }
    }
    if (!capped)
        return 0;
    uint64_t frame = io->bytes_taken / io->calls_taken; /* a call's bytes, on average */
    if (!pz_spsc_holds(&io->p->submit, (size_t)(2 * held * frame) + 1))
        return 0;
    io->inflight_cap = io->inflight_cap > most / 2 ? most : 2 * io->inflight_cap;
    io->backlog_at = pz_now_ns();
    apply_cap(io);
    return 1;
}

/* The submit queue is empty: halves io->inflight_cap when the workers
 * hold less than half of what they may (the backlog that raised it is
 * gone; whoever queues calls now does it no faster than they run). */
static void shrink_without_backlog(struct pz_io *io)
{
    if (io->inflight_cap <= PZ_INFLIGHT_START)
        return;
    uint64_t held = 0, room = 0;
    for (int i = 0; i < io->nrecords; i++)
        if (io->slots[i].state == SLOT_READY) {
            held += io->slots[i].inflight;
            room += io->slots[i].depth;
        }
    if (2 * held >= room || pz_now_ns() - io->backlog_at < PZ_INFLIGHT_CALM_NS)
        return;
    io->inflight_cap /= 2;
    if (io->inflight_cap < PZ_INFLIGHT_START)
        io->inflight_cap = PZ_INFLIGHT_START;
    apply_cap(io);
}

/* How many calls in a row w takes from fr on (at most `avail` bytes of
 * frames, the submit queue's), handed together under a backlog: as many
 * as its room (depth and bytes, as pz_slot_has_room counts them), the
 * `left` of its streak and max_calls allow, up to a cancelled one.  At
 * least the first, which pz_slot_has_room let in.  Sets *bytes to their
 * size.  (Handed one by one, each call was a pick, a room test and an
 * append: a fifth of the I/O thread's time in a loop of tiny calls.) */
static uint32_t block_for(struct pz_io *io, const pz_slot *w, const char *fr, size_t avail, uint32_t left,
                          size_t *bytes)
{
    uint32_t most = w->depth - w->inflight, n = 0;
    uint64_t max_calls = io->p->opt.max_calls;
    if (most > left)
        most = left;
    if (max_calls && max_calls - w->given < most)
        most = (uint32_t)(max_calls - w->given);
    size_t held = w->out.len - w->out_head, size = 0;
    do {
        size += pz_frame_size(fr + size);
        n++;
    } while (n < most && size < avail && held + size < PZ_SLOT_BYTES &&
             !(pz_frame_flags(fr + size) & PZ_CALL_CANCELLED));
    *bytes = size;
    return n;
}

int pz_dispatch_waiting(struct pz_io *io)
{
    size_t avail;
    return io->rq_pos < io->rq.len || pz_spsc_peek(&io->p->submit, &avail) != NULL;
}

void pz_dispatch(struct pz_io *io)
{
    if (io->stopping || io->fatal || io->halted)
        return;
    pz_spsc *q = &io->p->submit;
    const char *sp = NULL;
    size_t savail = 0;
    pz_slot *last = NULL; /* the slot the last call went to */
    int streak = 0;       /* and how many in a row */
    for (;;) {
        const char *fr;
        int from_rq = io->rq_pos < io->rq.len;
        if (from_rq) {
            fr = io->rq.data + io->rq_pos;
        } else {
            if (savail == 0 && !(sp = pz_spsc_peek(q, &savail))) {
                shrink_without_backlog(io);
                break;
            }
            fr = sp;
        }
        size_t size = pz_frame_size(fr);
        uint32_t taken = 1;
        if (!(pz_frame_flags(fr) & PZ_CALL_CANCELLED)) {
            /* Under a backlog (more calls waiting, at this one's size, than
             * a streak for every slot), calls go to one slot
             * DISPATCH_STREAK at a time while it has room: a pick looks at
             * every slot, and calls in a row to one worker can share a run
             * (run.h).  Otherwise each goes to the next slot with room: a
             * burst of calls whose time nobody knows yet spreads over the
             * workers (8 calls of 0.2 s after tiny ones on 8 workers: one
             * worker took 6 in streaks, and they took 0.6-1.2 s). */
            size_t waiting = from_rq ? io->rq.len - io->rq_pos : savail;
            int backlog = waiting >= (size_t)io->nrecords * DISPATCH_STREAK * size;
            pz_slot *w = backlog && last && streak < DISPATCH_STREAK && pz_slot_has_room(last) ? last : NULL;
            int alone = pz_call_goes_alone(fr);
            if (alone) {
                /* Alone in its worker (slot.c, broken_by); the calls
                 * behind it wait until a worker holds nothing. */
                if (!(w = pick(io, 1)))
                    break;
                streak = 0;
            } else if (!w) {
                w = pz_dispatch_pick(io);
                if (!w && grow_for_backlog(io))
                    w = pz_dispatch_pick(io);
                if (!w)
                    break;
                streak = 0;
            }
            uint32_t count = 1;
            if (backlog && !from_rq && !alone)
                count = block_for(io, w, fr, savail, DISPATCH_STREAK - (uint32_t)streak, &size);
            last = w;
            streak += (int)count;
            if (pz_slot_hand_calls(io, w, fr, size, count) != 0)
                return;
            taken = count;
        } else {
            pz_io_release(io, fr);
            if (!from_rq)
                io->cancelled_unseen--;
        }
        if (from_rq) {
            io->rq_pos += size;
        } else {
            sp += size;
            savail -= size;
            pz_spsc_consume(q, size);
            io->calls_taken += taken;
            io->bytes_taken += size;
        }
    }
    if (io->rq_pos == io->rq.len) {
        io->rq.len = io->rq_pos = 0;
        pz_buf_trim(&io->rq, 1 << 20);
    }
    for (int i = 0; i < io->nrecords; i++)
        if (io->slots[i].out_sent < io->slots[i].out.len)
            pz_slot_flush(io, &io->slots[i]);
}

/* Puts `count` bytes of frames from `from` in front of the requeue. */
static int requeue_bytes(struct pz_io *io, const char *from, size_t count, uint64_t drop)
{
    size_t rest = io->rq.len - io->rq_pos;
    pz_buf nb = PZ_BUF_INIT;
    if (!pz_buf_reserve(&nb, count + rest)) {
        pz_io_fail(io, "out of memory in the I/O thread (requeuing calls)");
        return -1;
    }
    for (size_t pos = 0; pos < count;) {
        const char *fr = from + pos;
        size_t size = pz_frame_size(fr);
        /* Room was reserved above: these appends cannot fail. */
        if (pz_frame_type(fr) == PZ_F_CALL && pz_frame_id(fr) != drop)
            pz_buf_append(&nb, fr, size);
        pos += size;
    }
    pz_buf_append(&nb, io->rq.data + io->rq_pos, rest);
    pz_buf_free(&io->rq);
    io->rq = nb;
    io->rq_pos = 0;
    return 0;
}

int pz_dispatch_requeue(struct pz_io *io, pz_slot *w, size_t from, uint64_t drop)
{
    if (from >= w->out.len)
        return 0;
    if (requeue_bytes(io, w->out.data + from, w->out.len - from, drop) != 0)
        return -1;
    w->out.len = from;
    return 0;
}

int pz_dispatch_requeue_frame(struct pz_io *io, const char *frame, size_t size)
{
    return requeue_bytes(io, frame, size, 0);
}

/* Writes the cancellation record of the waiting CALL frame fr and flags
 * it, so that it is dropped when its turn comes.  Returns 1 when it did. */
static int cancel_waiting(struct pz_io *io, char *fr)
{
    char msg[80];
    snprintf(msg, sizeof msg, "call %" PRIu64 " cancelled", pz_frame_id(fr));
    if (pz_slot_record_error(io, fr, msg, PZ_ERR_CANCELLED) != 0)
        return 0;
    pz_frame_set_flags(fr, pz_frame_flags(fr) | PZ_CALL_CANCELLED);
    return 1;
}

int pz_id_among(const uint64_t *ids, size_t n, uint64_t id)
{
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (ids[mid] < id)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo < n && ids[lo] == id;
}

typedef struct cancel_search {
    struct pz_io *io;
    const uint64_t *ids;
    size_t n, found; /* each id is in one place at most: done at found == n */
} cancel_search;

/* Cancels fr, a waiting CALL frame (requeued or in the submit queue), if
 * its id is to be; returns 1 when it flagged it now. */
static int cancel_if_among(cancel_search *c, char *fr)
{
    if (!pz_id_among(c->ids, c->n, pz_frame_id(fr)))
        return 0;
    c->found++;
    return !(pz_frame_flags(fr) & PZ_CALL_CANCELLED) && cancel_waiting(c->io, fr);
}

/* pz_spsc_walk's visitor over the submit queue's frames. */
static int cancel_in_chunk(char *data, size_t n, void *ud)
{
    cancel_search *c = ud;
    for (size_t pos = 0; pos < n && c->found < c->n; pos += pz_frame_size(data + pos))
        c->io->cancelled_unseen += (uint64_t)cancel_if_among(c, data + pos);
    return c->found == c->n;
}

void pz_dispatch_cancel(struct pz_io *io, const uint64_t *ids, size_t n)
{
    cancel_search c = {io, ids, n, 0};
    for (size_t pos = io->rq_pos; pos < io->rq.len && c.found < n; pos += pz_frame_size(io->rq.data + pos))
        cancel_if_among(&c, io->rq.data + pos);
    for (int i = 0; i < io->nrecords && c.found < n; i++)
        c.found += pz_slot_cancel(io, &io->slots[i], ids, n);
    /* The submit queue: its consumer (us) may read, and flag, what the
     * producer has published. */
    if (c.found < n)
        pz_spsc_walk(&io->p->submit, cancel_in_chunk, &c);
}
