/*
 * run.c - runs: the frame that carries several small calls to a local
 * worker, written by the I/O thread and read by the worker (the rules:
 * run.h).
 */
#include "run.h"

#include <string.h>

#include "codec_format.h"
#include "frame.h"
#include "io.h"
#include "shortcopy.h"
#include "varint.h"

/* Whether the frame at fr may travel in a run (run.h: which calls), the
 * pool's own timeout being `pool_timeout_ms`: its argument tuple is one
 * value whose decoding runs no code and cannot fail but for memory (nil, a
 * boolean, null, a number or an inline string), and small (a run is for
 * calls whose frame costs more than their bytes). */
static int runnable(const char *fr, uint32_t pool_timeout_ms)
{
    uint32_t len = pz_frame_payload_len(fr);
    const uint8_t *a = (const uint8_t *)pz_frame_payload(fr);
    uint32_t ms = pz_frame_timeout_ms(fr);
    if (pz_frame_type(fr) != PZ_F_CALL || pz_frame_flags(fr) != 0 || len < 2 ||
        len > PZ_RUN_ARGS_MAX || a[0] != 1 || (ms == 0 ? pool_timeout_ms != 0 : ms != PZ_NO_TIMEOUT))
        return 0;
    uint8_t t = a[1];
    return t <= PZ_T_STRING || (t >= PZ_T_SHORTSTR && t <= PZ_T_SHORTSTR + PZ_SHORTSTR_MAX) ||
           t >= PZ_T_FIXINT;
}

/* How many calls one run to w may carry now; below 2, none.  A quarter of
 * its depth at most, so that it holds several runs: it answers one while
 * the next is on its way. */
static uint32_t run_items(const pz_slot *w)
{
    if (w->remote || w->avg_ns <= 0)
        return 0;
    double by_time = (double)PZ_RUN_SPAN_NS / w->avg_ns;
    uint32_t most = w->depth / 4;
    if (most > PZ_RUN_ITEMS_MAX)
        most = PZ_RUN_ITEMS_MAX;
    return by_time < (double)most ? (uint32_t)by_time : most;
}

long pz_run_gather(struct pz_io *io, pz_slot *w, size_t *direct)
{
    size_t pos = w->out_sent, end = w->out.len;
    uint32_t most = run_items(w), pool_ms = io->p->opt.timeout_ms;
    *direct = end;
    if (most < 2)
        return 0;
    /* Where the first two calls in a row that may share a run begin. */
    size_t at = pos, q = pos;
    int streak = 0;
    while (q < end && streak < 2) {
        const char *fr = w->out.data + q;
        if (runnable(fr, pool_ms)) {
            if (streak++ == 0)
                at = q;
        } else {
            streak = 0;
        }
        q += pz_frame_size(fr);
    }
    if (streak < 2)
        return 0;
    if (at > pos) {
        *direct = at;
        return 0;
    }
    /* The run: as many calls as fit, written as they are read. */
    size_t cap = io->p->opt.max_message < PZ_RUN_BYTES_MAX ? io->p->opt.max_message : PZ_RUN_BYTES_MAX;
    char *d = pz_buf_reserve(&w->wire, PZ_FRAME_HEADER + cap);
    if (!d) {
        pz_io_fail(io, "out of memory in the I/O thread (sending calls to a worker)");
        return -1;
    }
    uint8_t *start = (uint8_t *)d + PZ_FRAME_HEADER, *o = start + 2;
    uint32_t n = 0;
    for (q = pos; q < end && n < most; n++) {
        const char *fr = w->out.data + q;
        uint32_t alen = pz_frame_payload_len(fr);
        uint64_t id = pz_frame_id(fr);
        if (!runnable(fr, pool_ms) ||
            (size_t)(o - start) + pz_varint_len(id) + pz_varint_len(alen) + alen > cap)
            break;
        o += pz_put_varint(o, id);
        o += pz_put_varint(o, alen);
        pz_copy_short(o, pz_frame_payload(fr), alen);
        o += alen;
        q += PZ_FRAME_HEADER + alen;
    }
    if (n < 2) {
        *direct = pos + pz_frame_size(w->out.data + pos);
        return 0;
    }
    pz_le16_put(start, (uint16_t)n);
    size_t len = (size_t)(o - start);
    pz_frame_header(d, PZ_F_CALL, pz_frame_id(w->out.data + pos), (uint32_t)len);
    pz_frame_set_flags(d, PZ_CALL_RUN);
    w->wire.len += PZ_FRAME_HEADER + len;
    *direct = q;
    return (long)q;
}

uint64_t pz_run_open(pz_run_reader *r, const char *payload, size_t len)
{
    r->p = (const uint8_t *)payload;
    r->end = r->p + len;
    if (len < 2)
        return 0;
    r->left = pz_run_count(r->p);
    r->p += 2;
    return r->left >= 2 ? r->left : 0;
}

int pz_run_next(pz_run_reader *r, pz_run_item *item)
{
    uint64_t len;
    if (r->left == 0 || pz_get_varint(&r->p, r->end, &item->id) != 0 ||
        pz_get_varint(&r->p, r->end, &len) != 0 || len > (uint64_t)(r->end - r->p))
        return -1;
    item->args = (const char *)r->p;
    item->len = (size_t)len;
    r->p += len;
    /* The last call ends the payload. */
    if (--r->left == 0 && r->p != r->end)
        return -1;
    return 0;
}
