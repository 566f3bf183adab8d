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
 */
#include <inttypes.h>
#include <stdio.h>

#include "frame.h"
#include "io.h"

pz_slot *pz_dispatch_pick(struct pz_io *io)
{
    /* Round robin from io->rr, without a division per call. */
    int n = io->nrecords, k = io->rr < n ? io->rr : 0;
    for (int i = 0; i < n; i++, k = k + 1 == n ? 0 : k + 1) {
        pz_slot *w = &io->slots[k];
        if (pz_slot_has_room(w)) {
            io->rr = k + 1 == n ? 0 : k + 1;
            return w;
        }
    }
    return NULL;
}

int pz_dispatch_has_room(struct pz_io *io)
{
    for (int i = 0; i < io->nrecords; i++)
        if (pz_slot_has_room(&io->slots[i]))
            return 1;
    return 0;
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
    for (;;) {
        const char *fr;
        int from_rq = io->rq_pos < io->rq.len;
        if (from_rq) {
            fr = io->rq.data + io->rq_pos;
        } else {
            if (savail == 0 && !(sp = pz_spsc_peek(q, &savail)))
                break;
            fr = sp;
        }
        size_t size = pz_frame_size(fr);
        if (!(pz_frame_flags(fr) & PZ_CALL_CANCELLED)) {
            pz_slot *w = pz_dispatch_pick(io);
            if (!w)
                break;
            if (pz_slot_hand_call(io, w, fr, size) != 0)
                return;
        } else {
            pz_io_release(io, fr);
        }
        if (from_rq) {
            io->rq_pos += size;
        } else {
            sp += size;
            savail -= size;
            pz_spsc_consume(q, size);
            io->calls_taken++;
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
 * it, so that it is dropped when its turn comes. */
static void cancel_waiting(struct pz_io *io, char *fr)
{
    char msg[80];
    snprintf(msg, sizeof msg, "call %" PRIu64 " cancelled", pz_frame_id(fr));
    if (pz_slot_record_error(io, fr, msg, PZ_ERR_CANCELLED) == 0)
        pz_frame_set_flags(fr, pz_frame_flags(fr) | PZ_CALL_CANCELLED);
}

typedef struct cancel_search {
    struct pz_io *io;
    uint64_t id;
} cancel_search;

/* pz_spsc_walk's visitor over the submit queue's frames. */
static int cancel_in_chunk(char *data, size_t n, void *ud)
{
    cancel_search *c = ud;
    for (size_t pos = 0; pos < n; pos += pz_frame_size(data + pos)) {
        char *fr = data + pos;
        if (pz_frame_id(fr) == c->id) {
            if (!(pz_frame_flags(fr) & PZ_CALL_CANCELLED))
                cancel_waiting(c->io, fr);
            return 1;
        }
    }
    return 0;
}

int pz_dispatch_cancel(struct pz_io *io, uint64_t id)
{
    for (size_t pos = io->rq_pos; pos < io->rq.len; pos += pz_frame_size(io->rq.data + pos)) {
        char *fr = io->rq.data + pos;
        if (pz_frame_id(fr) == id) {
            if (!(pz_frame_flags(fr) & PZ_CALL_CANCELLED))
                cancel_waiting(io, fr);
            return 1;
        }
    }
    for (int i = 0; i < io->nrecords; i++)
        if (pz_slot_cancel(io, &io->slots[i], id))
            return 1;
    /* The submit queue: its consumer (us) may read, and flag, what the
     * producer has published. */
    cancel_search c = {io, id};
    return pz_spsc_walk(&io->p->submit, cancel_in_chunk, &c);
}
