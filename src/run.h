/*
 * run.h - runs: several small calls travelling to a local worker as one
 * CALL frame.
 *
 * Why: a loop of tiny p(i) sent one frame per call, and the worker paid
 * for each a frame, a protected call, a clock reading and its output's
 * lock, and the parent a record per result: more than the call itself.
 * A run is read once, its calls are made by one C loop in one protected
 * call (worker.c), and their results come back together.
 *
 * What stays as it was: a run exists only between the I/O thread and the
 * worker.  The I/O thread keeps each call's own frame in the slot's `out`
 * (io.h), and every rule about calls in flight (answers in order, deaths,
 * cancels, stop) works on those frames.  Before each call the worker names
 * it in the shared memory (worker.h), so that a death is charged to the
 * call that was running.
 *
 * The answers: the worker puts each call's result in its output as soon
 * as the call returns, as for a call sent alone (the flusher may write it
 * while a long call runs after it; SIGTERM's last write takes it).  Calls
 * in a row that returned share one RESULT frame with flag PZ_RESULT_RUN
 * (frame.h), and each that raised, or whose result cannot travel, gets
 * its ERROR frame, in order.  A result above PZ_RUN_ANSWER_ITEM_MAX bytes
 * gets a RESULT frame of its own (a run's answer is held to
 * PZ_RUN_ANSWER_BYTES).  The I/O thread checks each call of such an
 * answer against its own frame and hands the main thread one record
 * (PZ_REC_RUN) for each stretch of calls with one tag.
 *
 * Which calls: consecutive CALL frames without flags, without a timeout
 * (a run does not say when each of its calls starts), whose arguments are
 * one number, boolean, nil, null or string inline (nothing whose decoding
 * runs code or can fail but for memory), PZ_RUN_ARGS_MAX bytes at most,
 * to a local worker whose calls took less than PZ_RUN_SPAN_NS / 2 each on
 * average so far.
 *
 * Payload of a CALL frame with flag PZ_CALL_RUN (header: the first call's
 * id, the other bookkeeping bytes zero):
 *   u16 n (little-endian)     the calls, at least 2
 *   n times: varint id, varint len, len bytes of the call's argument tuple
 *
 * Payload of a worker's RESULT frame with flag PZ_RESULT_RUN (header: the
 * first call's id):
 *   u16 n (little-endian)     the calls, at least 1
 *   u64 ns (little-endian)    each call's time, as the worker reckons it
 *   n times: varint id, u32 len (little-endian), len bytes of the tuple of
 *            values the call returned
 * (fixed widths: the worker rewrites the head as the answer grows).
 * Payload of a RESULT record with flag PZ_REC_RUN: u16 n, then the n
 * calls as above.
 *
 * Threads: pz_run_gather runs in whichever thread holds io->lock (io.h);
 * pz_run_record_count in the main thread; pz_run_open and pz_run_next in
 * the worker.
 */
#ifndef PZ_RUN_H
#define PZ_RUN_H

#include <stddef.h>
#include <stdint.h>

#include "frame.h"
#include "le.h"

struct pz_io;
struct pz_slot;

/* The work a run carries at most, at the worker's average call time: for
 * calls longer than half of it, a frame of their own costs little. */
#define PZ_RUN_SPAN_NS 50000

/* Calls in one run at most. */
#define PZ_RUN_ITEMS_MAX 256

/* Bytes of a run's payload at most (or max_message, if lower), and of one
 * call's argument tuple in it. */
#define PZ_RUN_BYTES_MAX 65536
#define PZ_RUN_ARGS_MAX 1024

/* A run's answer: its payload's bytes at most (the parent takes up to
 * max_message and more, whose least is 1 KiB: lpool.c), and one result's
 * tuple at most. */
#define PZ_RUN_ANSWER_BYTES 65536
#define PZ_RUN_ANSWER_ITEM_MAX 512

/* I/O side.  Looks at w->out from w->out_sent: when the frames there start
 * with at least two that may share a run, appends their run to w->wire and
 * returns the offset in w->out where the last of them ends.  Else returns
 * 0 and sets *direct to the end of the frames to send as they are: every
 * one before the next two that could share a run.  Returns -1 when out of
 * memory (the pool has failed). */
long pz_run_gather(struct pz_io *io, struct pz_slot *w, size_t *direct);

/* The head of a run answer's payload (u16 n, u64 ns), and its writer
 * (worker). */
#define PZ_RUN_ANSWER_HEAD 10
static inline void pz_run_answer_set_head(char *payload, unsigned n, uint64_t ns)
{
    pz_le16_put(payload, (uint16_t)n);
    pz_le64_put(payload + 2, ns);
}

/* The number of calls a run's payload, a run answer's or a run record's
 * says it holds (its first two bytes). */
static inline unsigned pz_run_count(const void *payload)
{
    return pz_le16_get(payload);
}

/* Main thread: the number of calls a RESULT record with flag PZ_REC_RUN
 * answers (its bytes are trusted). */
static inline unsigned pz_run_record_count(const pz_frame *f)
{
    return pz_run_count(f->payload);
}

/* The moving averages of call times (the worker's, and each slot's in the
 * I/O thread) weigh each call 1/8.  A run's n calls, each reckoned at
 * `each`, move `avg` as n calls of that time in a row would: moved once
 * per run, a slow first call (the first of a fresh worker took about 5 us,
 * its later ones 50 ns) took some 40 runs to wear off, and the depth it
 * gives a slot (window / average) stayed a tenth of what it should be for
 * most of a loop of 200,000 tiny calls, each worker running dry between
 * answers.  An average of 0 (none yet) becomes `each`. */
static inline double pz_run_average(double avg, double each, uint64_t n)
{
    if (avg <= 0)
        return each;
    double keep = 1, f = 0.875;
    for (uint64_t k = n; k && keep > 1e-9; k >>= 1, f *= f)
        if (k & 1)
            keep *= f;
    return avg * keep + each * (1 - keep);
}

/* Worker side: a run's calls, read one by one from its payload. */
typedef struct pz_run_reader {
    const uint8_t *p, *end;
    uint64_t left;
} pz_run_reader;

typedef struct pz_run_item {
    uint64_t id;
    const char *args;
    size_t len;
} pz_run_item;

/* Starts reading a run's payload.  Returns its number of calls, or 0 when
 * the payload is malformed. */
uint64_t pz_run_open(pz_run_reader *r, const char *payload, size_t len);

/* The next call.  Returns 0, or -1 when the payload is malformed (a call
 * missing or cut short, or bytes left after the last). */
int pz_run_next(pz_run_reader *r, pz_run_item *item);

#endif
