/*
 * dispatch.c - the calls that wait for a worker, and which slot gets which.
 * Runs with io->lock held (io.h).
 *
 * Calls wait in two places: the pool's submit queue (new calls, in the
 * order p(...) queued them) and io->rq (calls taken back from a worker that
 * died or was stopped), which goes first, so that a requeued call does not
 * wait behind everything queued after it.
 */
#include "frame.h"
#include "io.h"

pz_slot *pz_dispatch_pick(struct pz_io *io)
{
    int n = io->p->nslots;
    for (int i = 0; i < n; i++) {
        pz_slot *w = &io->slots[(io->rr + i) % n];
        if (pz_slot_has_room(w)) {
            io->rr = (w->index + 1) % n;
            return w;
        }
    }
    return NULL;
}

int pz_dispatch_has_room(struct pz_io *io)
{
    for (int i = 0; i < io->p->nslots; i++)
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
    if (io->stopping || io->fatal)
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
        pz_slot *w = pz_dispatch_pick(io);
        if (!w)
            break;
        size_t size = pz_frame_size(fr);
        if (pz_slot_hand_call(io, w, fr, size) != 0)
            return;
        if (from_rq) {
            io->rq_pos += size;
        } else {
            sp += size;
            savail -= size;
            pz_spsc_consume(q, size);
            io->calls_taken++;
        }
    }
    if (io->rq_pos == io->rq.len) {
        io->rq.len = io->rq_pos = 0;
        pz_buf_trim(&io->rq, 1 << 20);
    }
    for (int i = 0; i < io->p->nslots; i++)
        if (io->slots[i].out_sent < io->slots[i].out.len)
            pz_slot_flush(io, &io->slots[i]);
}

int pz_dispatch_requeue(struct pz_io *io, pz_slot *w, size_t from, uint64_t drop)
{
    size_t rest = io->rq.len - io->rq_pos;
    if (from >= w->out.len)
        return 0;
    pz_buf nb = PZ_BUF_INIT;
    if (!pz_buf_reserve(&nb, w->out.len - from + rest)) {
        pz_io_fail(io, "out of memory in the I/O thread (requeuing a dead worker's calls)");
        return -1;
    }
    for (size_t pos = from; pos < w->out.len;) {
        const char *fr = w->out.data + pos;
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
    w->out.len = from;
    return 0;
}
