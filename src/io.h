/*
 * io.h - the I/O thread's state, shared by the files that make up the I/O
 * side of a pool:
 *
 *   ioloop.c    the epoll loop, wake-ups, records to the main thread,
 *               timers, the stop sequence
 *   slot.c      one worker slot: its process, socket, calls in flight
 *   dispatch.c  calls waiting for a worker: which slot gets which call
 *   spawnq.c    requests to the spawner process and its reports
 *   lend.c      the lone-call shortcut, run by the main thread
 *
 * Rule: everything reachable from a struct pz_io belongs to the thread that
 * holds io->lock.  The I/O thread holds it at all times except while it
 * sleeps in epoll_wait; the main thread takes it in lend.c (and pool.c
 * parks the thread on it around a fork).  No field here is atomic and none
 * needs to be.  What the main thread reads goes through the pool's queues
 * and atomics (pool.h), written in publish() (ioloop.c).
 */
#ifndef PZ_IO_H
#define PZ_IO_H

#include <pthread.h>
#include <stdint.h>
#include <sys/types.h>

#include "buf.h"
#include "pool.h"
#include "spawner.h"

/* What an epoll event's data says it is about: the wake-up eventfd, the
 * spawner's socket, or slot (value - PZ_TOKEN_SLOT) in the low 32 bits with
 * the slot's generation in the high 32. */
enum { PZ_TOKEN_WAKE = 0, PZ_TOKEN_SPAWNER = 1, PZ_TOKEN_SLOT = 2 };

/* Where a worker record is in its life. */
enum pz_slot_state {
    SLOT_SPARE,    /* the unused record of a slot's pair (recycling, below) */
    SLOT_IDLE,     /* no process; (re)started when respawn_at comes */
    SLOT_STARTING, /* forked, INIT sent, no answer yet */
    SLOT_READY,    /* initialized: takes calls */
    SLOT_RETIRING, /* given its last call (max_calls) and STOP: finishes them */
    SLOT_STOPPING, /* STOP sent by stop(): finishes what it holds, then exits */
    SLOT_GONE      /* given up, or stopped: never started again */
};

/* The parent's view of one worker process, in its record (the worker itself
 * runs worker.c).  Each of the pool's slots has two records: one runs the
 * slot's worker; the other stays SPARE until that worker has been given
 * max_calls calls, then starts the replacement while the old worker
 * finishes its last calls (RETIRING), so that the slot is never without a
 * worker ready for long.  Record r and r + nslots belong to slot r.
 *
 * A worker's calls are kept as the very bytes sent to it, in order, in
 * `out`: [out_head, out_sent) sent and unanswered, [out_sent, len) not yet
 * sent.  A worker answers in the order it received, so an answer always
 * belongs to the frame at out_head; when the worker dies, everything from
 * out_head on goes back to the queue.  The INIT frame sits before out_head
 * until the worker has answered it. */
typedef struct pz_slot {
    int index;           /* the record's: epoll tokens, shared memory */
    int slot;            /* the pool's slot, 0-based; users see slot + 1 */
    enum pz_slot_state state;
    int fd;              /* socket, -1 when closed */
    pid_t pid;           /* 0 until known: from the spawner's report, or
                          * from a local worker's INIT_OK (its getpid), which
                          * may come first (answer.c) */
    int pid_reported;    /* the spawner reported pid: only then is it
                          * signalled or matched with an end (spawnq.c) */
    int alive;           /* a process exists (or is being forked) */
    int exited;          /* the spawner reported its end */
    uint32_t gen;        /* bumped at each start: tells stale events apart */
    pz_buf out;
    size_t out_head, out_sent;
    /* Bytes for the socket made from the frames before out_sent, not yet
     * all written: runs (run.h).  Frames that travel as they are go from
     * `out` itself, up to direct_end (the end of a frame), once `wire` is
     * written. */
    pz_buf wire;
    size_t wire_sent, direct_end;
    uint32_t inflight;   /* calls in `out` from out_head on */
    uint32_t depth;      /* how many it may hold (window / avg) */
    uint64_t given;      /* calls handed to this process (max_calls) */
    double avg_ns;       /* moving average of call durations, 0: unknown */
    int64_t head_since;  /* when the call at out_head became the oldest: it
                          * cannot have started earlier (timeouts) */
    uint64_t doomed;     /* the call it is being killed for, or 0 */
    uint8_t doomed_kind; /* PZ_ERR_TIMEOUT or PZ_ERR_CANCELLED */
    int doom_killed;     /* killed for a call (doomed), which may have
                          * finished before the kill landed: the call it
                          * ran next is not charged with the death */
    int cancels_sent;    /* it may hold calls cancelled after they were
                          * sent: each is ended as it starts (slot.c) */
    pz_buf in;           /* bytes read, not yet a whole frame */
    size_t discard;      /* bytes still to skip of an answer the parent
                          * could not allocate room for (slot.c) */
    int want_out;        /* EPOLLOUT registered */
    int init_crashes;
    int64_t respawn_at;  /* SLOT_IDLE: when to start again */
    int64_t eof_at;      /* saw end of file while the process still ran */
    int kill_sent;       /* SIGKILL asked for (end of file, rejection) */
    int64_t init_deadline; /* SLOT_STARTING: when init_timeout ends it; 0: never */
    int64_t kill_at;     /* a launcher sent SIGTERM while starting: when
                          * SIGKILL follows (slot.c, end_starting) */
    int64_t close_by;    /* SLOT_RETIRING and holding up its slot (its
                          * partner retires too): when it is ended unless it
                          * has exited, the pool's timeout after its last
                          * answer; 0: none (slot.c, retire) */
    int pending_sig;     /* to send once the spawner has told us the pid */
    int lent;            /* its socket is lent to the main thread (lend.c) */
    int stopped_starting; /* stop() ended it before it had initialized: its
                           * end is no death (p:stats().deaths) */
    char why[256];       /* set when the parent killed it: the reason */
    /* A remote slot (its process is a launcher: spawner.h) differs only
     * where these are read (slot.c): which call its death is charged to,
     * and a depth that covers the round trip. */
    int remote;
    double rtt_ns;       /* moving average of the round trip, 0: unknown */
    uint64_t probe_id;   /* a call sent to it while it held none, 0: none */
    int64_t probe_at;    /* when that call was handed to it */
} pz_slot;

/* A message for the spawner not yet sent (its socket was full). */
typedef struct pz_spawn_req {
    pz_spawn_msg m;
    int fd;
} pz_spawn_req;

struct pz_io {
    pz_pool *p;
    pthread_mutex_t lock;    /* see the rule at the top */
    int ep;                  /* epoll: wake-up eventfd, spawner, slots */
    pz_slot *slots;          /* nrecords of them: two per slot (see pz_slot) */
    int nrecords;
    int *settled;            /* per slot: initialized once, or given up */
    pz_slot_stats *slot_stats; /* per slot: calls and busy time (pids: pz_io_get_stats) */

    /* dispatch.c */
    int rr;                  /* round-robin cursor */
    uint32_t inflight_cap;   /* the most calls a worker may hold now: from
                              * PZ_INFLIGHT_START up to max_inflight while
                              * more than twice what the workers hold waits
                              * for them (dispatch.c) */
    int64_t backlog_at;      /* when inflight_cap last grew */
    int last_idle;           /* the slot that most recently ran dry */
    pz_buf rq;               /* requeued CALL frames, dispatched first */
    size_t rq_pos;

    /* lend.c */
    pz_slot *lent;           /* lent to the main thread, or NULL */

    /* spawnq.c */
    pz_spawn_req *spq;       /* spawner messages not yet sent */
    size_t nspq, capspq;
    int spawner_out;         /* EPOLLOUT registered on the spawner socket */
    int spawner_gone;        /* its socket failed or reached end of file */
    char spawner_why[160];   /* what its PZ_S_GAVE_UP said, or "" */
    int spawner_shut;        /* we shut our side: it kills what is left */

    /* ioloop.c: stop */
    int stopping;
    int64_t term_at, kill_at; /* SIGTERM / SIGKILL deadlines, 0: none */
    int term_sent;           /* the SIGTERM of stop has gone out */
    int finished;            /* everything ended: the loop returns */

    /* control.c: requests from the main thread (cancel), under ctl_lock */
    pthread_mutex_t ctl_lock;
    uint64_t *cancels;       /* ids to cancel */
    size_t ncancels, capcancels;
    struct pz_retries *retries; /* retry.c: attempts of calls that raised */

    /* ioloop.c: counts for stats */
    uint64_t failed, deaths, respawns, recycles, timeouts, cancelled, retried;
    int64_t started_ns, last_sample_ns;
    int nsamples;
    int64_t sample_ns[8];
    uint64_t sample_done[8];

    /* ioloop.c: what publish() makes visible */
    int halted;              /* fail_fast: the first failure stopped dispatch */
    uint64_t calls_done;     /* RESULT/ERROR records written */
    int64_t now;             /* pz_now_ns as last read: at each turn of the
                              * loop, and after each read from a worker */
    uint64_t calls_taken;    /* CALL frames taken from the submit queue */
    uint64_t cancelled_unseen; /* frames in the submit queue flagged cancelled
                                * (their records made), not taken yet */
    uint64_t bytes_taken;    /* and their bytes */
    size_t backlog_added;    /* bytes of records written since the last publish */
    int slots_settled;
    int fatal;               /* the pool failed: p->fatal_reason is set */
    char *first_error;       /* the first reason a worker was lost (malloc'ed) */
};

/* ---- ioloop.c ---------------------------------------------------------- */

/* Appends a record for the main thread (frame.h); `tag` says who takes a
 * call's result (the CALL frame's tag).  Returns 0, or -1 when out of
 * memory, after failing the pool (pz_io_fail): the caller keeps what the
 * record was about, so that it is aborted rather than lost. */
int pz_io_record(struct pz_io *io, uint8_t type, uint8_t tag, uint64_t id, const pz_part *parts,
                 int nparts);

/* Makes the records written so far visible to the main thread, with the
 * counters that go with them, and wakes it if what it waits for is now
 * true. */
void pz_io_publish(struct pz_io *io);

/* pz_io_record for an ERROR record of this kind (PZ_ERR_*): counted in
 * the stats, and, with fail_fast, the first one stops dispatching. */
int pz_io_record_error(struct pz_io *io, uint8_t kind, uint8_t tag, uint64_t id,
                       const pz_part *parts, int nparts);

/* The cancelled CALL frame fr is dropped for good (never run, or its
 * answer dropped): when the pool shares big strings with its workers, a
 * RELEASE record lets the main thread free its arguments' (frame.h;
 * nothing to free for a call cancelled before it was sent). */
void pz_io_release(struct pz_io *io, const char *fr);

/* Counts slot w as settled (initialized once or given up), once. */
void pz_io_settle(struct pz_io *io, pz_slot *w);

/* Keeps msg as the reason to give when no worker is left, if it is the
 * first one. */
void pz_io_remember_error(struct pz_io *io, const char *msg);

/* Fails the pool when no slot can ever run a call again. */
void pz_io_check_fatal(struct pz_io *io);

/* Fails the pool: `why` (copied) becomes the error wait raises; every
 * worker is ended and every unfinished call is aborted at stop.  Uses no
 * memory it cannot do without (out of memory is one of its causes). */
void pz_io_fail(struct pz_io *io, const char *why);

/* ---- slot.c ------------------------------------------------------------ */

/* Starts a worker process for slot w: a socket pair, the child's end
 * handed to the spawner, the INIT frame queued on ours. */
void pz_slot_start(struct pz_io *io, pz_slot *w);

/* The worker's process is gone (status valid when known): reads what it
 * left in its socket, then requeues its calls, respawns it or gives the
 * slot up. */
void pz_slot_ended(struct pz_io *io, pz_slot *w, int known, int status);

/* slot.c's own helpers, for answer.c and dispatch.c: a worker that broke
 * the protocol is killed (its death is handled like any other); an ERROR
 * record of `kind` for the CALL frame `call` that the parent itself gives
 * up on (returns what pz_io_record does); the record's socket closed and
 * out of the epoll set. */
void pz_slot_reject(struct pz_io *io, pz_slot *w, const char *why);
int pz_slot_record_error(struct pz_io *io, const char *call, const char *msg, uint8_t kind);
void pz_slot_close_fd(struct pz_io *io, pz_slot *w);

/* answer.c: reads what a worker sent and handles whole frames, for a
 * bounded number of reads so that one busy worker cannot starve the
 * others.  Returns 1 when that bound stopped it (more may be waiting),
 * else 0. */
int pz_slot_read(struct pz_io *io, pz_slot *w);

/* Writes what w->out holds unsent, as far as the socket takes it (small
 * calls in a row as runs: run.h), registering for EPOLLOUT when it is
 * full. */
void pz_slot_flush(struct pz_io *io, pz_slot *w);

/* Whether w has bytes not yet written to its socket. */
static inline int pz_slot_unsent(const pz_slot *w)
{
    return w->out_sent < w->out.len || w->wire_sent < w->wire.len;
}

/* The frames before w->out_sent are gone from w->out: `dropped` bytes of
 * them (answered), or all (cleared: dropped is then SIZE_MAX and the
 * buffer is empty). */
static inline void pz_slot_out_dropped(pz_slot *w, size_t dropped)
{
    if (dropped == SIZE_MAX) {
        w->out.len = w->out_head = w->out_sent = w->direct_end = 0;
        w->wire.len = w->wire_sent = 0;
        return;
    }
    w->out_head -= dropped;
    w->out_sent -= dropped;
    w->direct_end = w->direct_end > dropped ? w->direct_end - dropped : 0;
}

/* Adds w's socket to the epoll set (op EPOLL_CTL_ADD) or updates it
 * (EPOLL_CTL_MOD), unless it is lent.  Fails the pool when epoll does. */
void pz_slot_watch(struct pz_io *io, pz_slot *w, int op);

/* The bytes of calls one worker may hold unanswered (it may always hold
 * one, however big): enough to keep it busy on big arguments, while the
 * rest wait in the submit queue, where p(...) can see them pile up
 * (max_pending_bytes). */
#define PZ_SLOT_BYTES (4u << 20)

/* The most calls a worker holds until a backlog builds (dispatch.c:
 * io->inflight_cap), or max_inflight if lower. */
#define PZ_INFLIGHT_START 256

/* ... and halves back only this long after it last grew. */
#define PZ_INFLIGHT_CALM_NS 50000000

/* Sets w's in-flight depth from its calls' average time (answer.c):
 * `window` of work, plus a remote slot's round trip, between 1 and
 * io->inflight_cap. */
void pz_slot_set_depth(struct pz_io *io, pz_slot *w);

/* Whether the CALL frame fr waits for a slot that holds nothing: a
 * suspect (slot.c, broken_by) not cancelled meanwhile. */
static inline int pz_call_goes_alone(const char *fr)
{
    return (pz_frame_flags(fr) & (PZ_CALL_SUSPECT | PZ_CALL_CANCELLED)) == PZ_CALL_SUSPECT;
}

/* Whether w holds a suspect: handed only to a slot holding nothing, which
 * then takes no other call, it is then w's only call, at out_head. */
static inline int pz_slot_holds_suspect(const pz_slot *w)
{
    return w->inflight > 0 && (pz_frame_flags(w->out.data + w->out_head) & PZ_CALL_SUSPECT);
}

/* True when w can take one more call now. */
static inline int pz_slot_has_room(const pz_slot *w)
{
    return w->state == SLOT_READY && w->fd >= 0 && w->inflight < w->depth && !w->lent &&
           (w->inflight == 0 ||
            (w->out.len - w->out_head < PZ_SLOT_BYTES && !pz_slot_holds_suspect(w)));
}

/* Queues `count` CALL frames in a row for w, `size` bytes from `frames`
 * (sent by the next pz_slot_flush); the caller has checked that w has
 * room for them and that max_calls does not fall inside them (only on
 * the last).  Returns 0, or -1 when out of memory (the pool has failed;
 * the frames stay where they were). */
int pz_slot_hand_calls(struct pz_io *io, pz_slot *w, const char *frames, size_t size, uint32_t count);

/* stop(): takes back w's unsent calls and sends it STOP; a starting worker
 * holds no call and is ended at once. */
void pz_slot_stop(struct pz_io *io, pz_slot *w);

/* Respawns w when due, kills it when it closed its socket but lingers,
 * ends the call it runs when that has run out of time; lowers *next to
 * w's next deadline. */
void pz_slot_timers(struct pz_io *io, pz_slot *w, int64_t now, int64_t *next);

/* The time the CALL frame `frame` may run (its own timeout, else the
 * pool's), or 0 for no limit. */
int64_t pz_slot_timeout_ns(struct pz_io *io, const char *frame);

/* Cancels the calls of ids (sorted, n of them) that w holds: those w has
 * not sent are dropped (an error record now), one it runs gets its worker
 * killed, one sent and not started is flagged (ended as it starts).
 * Returns how many of them w held. */
size_t pz_slot_cancel(struct pz_io *io, pz_slot *w, const uint64_t *ids, size_t n);

/* How many of the calls w holds were cancelled after they were sent: each
 * has its error record already, and leaves `inflight` only as it starts
 * (its worker ended) or is answered. */
uint32_t pz_slot_cancelled_held(const pz_slot *w);

/* Whether id is among the n sorted ids (a cancel batch). */
int pz_id_among(const uint64_t *ids, size_t n, uint64_t id);

/* ---- retry.c ----------------------------------------------------------- */

/* Call `call` (a CALL frame w held) raised with message msg: when it may
 * run again (option retries), notes the attempt, requeues it and returns
 * 0; returns -1 when it may not (its error goes to the main thread). */
int pz_retry_again(struct pz_io *io, pz_slot *w, char *call, const char *msg, size_t mlen);

/* Writes into `out` the attempts part of the ERROR record of call id,
 * which failed for good on w with message msg (frame.h): every attempt,
 * that one last, and forgets them.  Returns 0, or -1 when out of memory. */
int pz_retry_take(struct pz_io *io, pz_slot *w, uint64_t id, const char *msg, size_t mlen,
                  pz_buf *out);

/* Writes into `out` the attempts part of the ERROR record of call id,
 * which the parent gives up on (a timeout, a cancel, max_deaths): the
 * attempts it raised in before, none when it never raised, and forgets
 * them.  Returns 0, or -1 when out of memory. */
int pz_retry_take_noted(struct pz_io *io, uint64_t id, pz_buf *out);

/* Forgets the attempts of call id (it succeeded after raising). */
void pz_retry_forget(struct pz_io *io, uint64_t id);

/* How many calls have attempts kept (they raised and run again). */
size_t pz_retry_held(const struct pz_io *io);

/* Frees what retry.c keeps. */
void pz_retry_free(struct pz_io *io);

/* ---- dispatch.c -------------------------------------------------------- */

/* Hands waiting calls (requeued ones first) to slots with room. */
void pz_dispatch(struct pz_io *io);

/* A slot with room, round-robin from io->rr, or NULL. */
pz_slot *pz_dispatch_pick(struct pz_io *io);

/* True when some slot could take the next waiting call now. */
int pz_dispatch_has_room(struct pz_io *io);

/* True when calls wait for a worker (requeued or in the submit queue). */
int pz_dispatch_waiting(struct pz_io *io);

/* Moves w's CALL frames from w->out[from..] to the front of the requeue,
 * but for call `drop` (0: none), which has become an error.  Returns 0, or
 * -1 when out of memory (the pool has failed; the frames stay in w->out,
 * where stop finds them). */
int pz_dispatch_requeue(struct pz_io *io, pz_slot *w, size_t from, uint64_t drop);

/* Puts a copy of one CALL frame at the front of the requeue.  Returns 0,
 * or -1 when out of memory (the pool has failed). */
int pz_dispatch_requeue_frame(struct pz_io *io, const char *frame, size_t size);

/* Cancels the calls of ids (sorted, without repeats, n of them) wherever
 * the I/O side holds them (requeued, in a worker, or still in the submit
 * queue), in one pass over each place however many they are: one pass per
 * id made cancelling tens of thousands of queued calls quadratic (80,000:
 * 7.8 s of the I/O thread), and a running call's cancel queued behind
 * them came seconds late.  Ids found nowhere have finished. */
void pz_dispatch_cancel(struct pz_io *io, const uint64_t *ids, size_t n);

/* ---- spawnq.c ---------------------------------------------------------- */

/* Asks the spawner to fork slot w's worker, passing it `fd`. */
void pz_spawnq_spawn(struct pz_io *io, pz_slot *w, int fd);

/* Has the spawner send sig to w's worker.  Before the spawner has said
 * which pid the worker got, the signal waits (the strongest one asked for)
 * and goes out when it does. */
void pz_spawnq_kill(struct pz_io *io, pz_slot *w, int sig);

/* Sends the queued requests that the spawner's socket takes. */
void pz_spawnq_flush(struct pz_io *io);

/* Handles the spawner's reports (forked, failed, exited), or its end. */
void pz_spawnq_read(struct pz_io *io);

/* Shuts our side of the spawner's socket: it kills what is left and exits. */
void pz_spawnq_shut(struct pz_io *io);

/* ---- lend.c ------------------------------------------------------------ */

/* Gives the lent slot back to the I/O thread (called with the lock held by
 * either thread). */
void pz_lend_end(struct pz_io *io);

/* The grace between SIGTERM and SIGKILL for slot w: the pool's kill_grace,
 * and for a launcher at least PZ_LAUNCHER_GRACE_NS, the moment srun needs
 * to withdraw a job still queued (slot.c). */
#define PZ_LAUNCHER_GRACE_NS 100000000
int64_t pz_slot_grace_ns(const struct pz_io *io, const pz_slot *w);

/* Writes into `out` (PZ_SHOWN_BYTES_MAX bytes) the first bytes of p (n
 * of them; 24 at most, fewer when many need escapes), printable ASCII as
 * it is and the rest as \xHH: what a launcher wrote instead of frames,
 * for a message. */
#define PZ_SHOWN_BYTES_MAX 64
void pz_show_bytes(const char *p, size_t n, char *out);

#endif
