/*
 * ioloop.c - the pool's I/O thread: one epoll loop that feeds workers with
 * calls, collects their results, notices deaths, requeues what the dead
 * held, asks the spawner for replacements and carries out stop().
 *
 * It never touches Lua.  Calls come in through pool->submit (CALL frames
 * built by the main thread); results and events go out through pool->done
 * (records, see frame.h).  All worker sockets are non-blocking, so a worker
 * that stops reading can never block the loop.
 *
 * A worker's in-flight calls are kept as the very bytes sent to it, in
 * order, in w->out: [out_head, out_sent) sent and unanswered, [out_sent,
 * len) not yet sent.  A worker answers calls in the order it received them,
 * so a result always belongs to the frame at out_head; when a worker dies,
 * everything from out_head on goes back to the front of the queue.
 */
#include <errno.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include "codec_format.h"
#include "frame.h"
#include "pool.h"
#include "spawner.h"
#include "sys.h"
#include "worker.h"

#define READ_CHUNK 65536
#define EOF_GRACE_NS 2000000000LL /* closed its socket but did not exit */
#define MAX_BACKOFF_NS 2000000000LL
#define BACKOFF_NS 50000000LL

enum { S_IDLE, S_STARTING, S_READY, S_STOPPING, S_GONE };
enum { TOKEN_WAKE = 0, TOKEN_SPAWNER = 1, TOKEN_WORKER = 2 };

typedef struct worker {
    int slot;
    int state;
    int fd;              /* socket, -1 when closed */
    pid_t pid;           /* 0 until the spawner reports it */
    int alive;           /* a process exists (or is being forked) */
    int exited;          /* the spawner reported its end */
    int status;
    uint32_t gen;
    pz_buf out;
    size_t out_head, out_sent;
    uint32_t inflight, depth;
    double avg_ns;       /* moving average of call durations, 0: unknown */
    pz_buf in;
    int want_out;        /* EPOLLOUT registered */
    int settled;         /* counted in pool->settled */
    int init_crashes;
    int64_t respawn_at;  /* S_IDLE: when to spawn again */
    int64_t eof_at;      /* saw EOF while the process still ran */
    int kill_sent;
    int pending_sig;     /* to send once the spawner has told us the pid */
    int lent;            /* lent to the main thread: see "lending" below */
    char why[200];       /* set when the parent killed it */
} worker;

typedef struct spawn_req {
    pz_spawn_msg m;
    int fd;
} spawn_req;

struct pz_io {
    pz_pool *p;
    /* Held by the I/O thread except while it sleeps in epoll_wait, so that
     * the main thread can hand a call to an idle worker itself (see
     * pz_io_dispatch_now). */
    pthread_mutex_t lock;
    int ep;
    worker *w;
    int rr;                      /* round-robin dispatch cursor */
    int last_idle;               /* the worker that most recently ran dry */
    worker *lent;                /* lent to the waiting main thread, or NULL */
    pz_buf rq;                   /* requeued CALL frames, dispatched first */
    size_t rq_pos;
    spawn_req *spq;              /* spawner messages not yet sent */
    size_t nspq, capspq;
    int spawner_out;             /* EPOLLOUT on the spawner socket */
    int spawner_gone;
    int stopping;
    int spawner_shut;
    int64_t term_at, kill_at;    /* stop: SIGTERM / SIGKILL deadlines, 0: none */
    int finished;
    uint64_t calls_done;
    int settled;
    int fatal_sent;
    char first_error[512];
};

static void publish(struct pz_io *io);

/* The I/O thread cannot go on without memory: losing a record or a call
 * would break the accounting the whole library promises, so it stops the
 * process loudly instead. */
static _Noreturn void oom(void)
{
    fprintf(stderr, "parallelize: out of memory in the I/O thread\n");
    abort();
}

/* ---- records to the main thread ---------------------------------------- */

/* Appends a record whose payload is the concatenation of up to three parts,
 * each optionally varint-prefixed (prefix[i] != 0). */
static void put_record(struct pz_io *io, uint8_t type, uint64_t id, const char *a, size_t alen,
                       int pa, const char *b, size_t blen, int pb, const char *c, size_t clen)
{
    uint8_t va[PZ_VARINT_MAX_BYTES], vb[PZ_VARINT_MAX_BYTES];
    size_t na = pa ? pz_put_varint(va, alen) : 0, nb = pb ? pz_put_varint(vb, blen) : 0;
    size_t len = na + alen + nb + blen + clen;
    char *d = pz_spsc_reserve(&io->p->done, PZ_FRAME_HEADER + len);
    if (!d)
        oom();
    pz_frame_header(d, type, 0, id, (uint32_t)len);
    char *q = d + PZ_FRAME_HEADER;
    memcpy(q, va, na), q += na;
    if (alen)
        memcpy(q, a, alen), q += alen;
    memcpy(q, vb, nb), q += nb;
    if (blen)
        memcpy(q, b, blen), q += blen;
    if (clen)
        memcpy(q, c, clen);
    pz_spsc_advance(&io->p->done, PZ_FRAME_HEADER + len);
    atomic_fetch_add_explicit(&io->p->backlog, PZ_FRAME_HEADER + len, memory_order_relaxed);
    if (type == PZ_F_RESULT || type == PZ_F_ERROR)
        io->calls_done++;
}

static void settle(struct pz_io *io, worker *w)
{
    if (!w->settled) {
        w->settled = 1;
        io->settled++;
    }
}

static void remember_error(struct pz_io *io, const char *msg)
{
    if (!io->first_error[0])
        snprintf(io->first_error, sizeof io->first_error, "%s", msg);
}

/* ---- epoll and spawner plumbing ----------------------------------------- */

static uint64_t token(const worker *w)
{
    return (uint64_t)w->gen << 32 | (uint32_t)(TOKEN_WORKER + w->slot);
}

static void watch(struct pz_io *io, worker *w, int op)
{
    if (w->lent)
        return; /* out of the set until given back (give_back) */
    struct epoll_event ev = {EPOLLIN | (w->want_out ? EPOLLOUT : 0), {.u64 = token(w)}};
    if (epoll_ctl(io->ep, op, w->fd, &ev) != 0) {
        fprintf(stderr, "parallelize: epoll_ctl: %s\n", strerror(errno));
        abort();
    }
}

static void spawner_watch(struct pz_io *io)
{
    int want = io->nspq > 0;
    if (want == io->spawner_out || io->spawner_gone)
        return;
    io->spawner_out = want;
    struct epoll_event ev = {EPOLLIN | (want ? EPOLLOUT : 0), {.u64 = TOKEN_SPAWNER}};
    epoll_ctl(io->ep, EPOLL_CTL_MOD, io->p->spawner_fd, &ev);
}

/* Sends queued spawner messages until the socket is full. */
static void spawner_flush(struct pz_io *io)
{
    size_t i = 0;
    while (i < io->nspq && !io->spawner_gone) {
        spawn_req *r = &io->spq[i];
        if (pz_spawn_send(io->p->spawner_fd, &r->m, r->fd) != 0) {
            /* Full, or short of kernel memory for a moment: try again when
             * the socket is writable. */
            if (errno == EAGAIN || errno == EWOULDBLOCK || errno == ENOBUFS || errno == ENOMEM)
                break;
            /* Anything else: the spawner cannot be used.  Closing our side
             * makes it kill its workers and leave; its end of file then
             * takes the usual path (spawner_lost). */
            io->spawner_gone = 1;
            shutdown(io->p->spawner_fd, SHUT_WR);
            break;
        }
        if (r->fd >= 0)
            close(r->fd);
        i++;
    }
    memmove(io->spq, io->spq + i, (io->nspq - i) * sizeof *io->spq);
    io->nspq -= i;
    spawner_watch(io);
}

static void spawner_send(struct pz_io *io, int kind, int slot, uint32_t gen, pid_t pid, int arg,
                         int fd)
{
    if (io->nspq == io->capspq) {
        size_t cap = io->capspq ? io->capspq * 2 : 16;
        spawn_req *q = realloc(io->spq, cap * sizeof *q);
        if (!q)
            oom();
        io->spq = q;
        io->capspq = cap;
    }
    io->spq[io->nspq++] = (spawn_req){{kind, slot, gen, pid, arg}, fd};
    spawner_flush(io);
}

/* Has the spawner send sig to the worker.  Before the spawner has said
 * which pid the worker got, the signal waits (the strongest one asked for)
 * and goes out when it does. */
static void kill_worker(struct pz_io *io, worker *w, int sig)
{
    if (!w->alive || w->exited)
        return;
    if (w->pid > 0)
        spawner_send(io, PZ_S_KILL, w->slot, w->gen, w->pid, sig, -1);
    else if (w->pending_sig != SIGKILL)
        w->pending_sig = sig;
}

/* ---- worker lifecycle --------------------------------------------------- */

static void flush_worker(struct pz_io *io, worker *w);
static void give_up(struct pz_io *io, worker *w, const char *why, const char *tb, size_t tblen);
static int64_t backoff(int crashes);

/* Starts a worker process for slot w: a socket pair, the child end handed
 * to the spawner, the INIT frame queued on our end. */
static void start_worker(struct pz_io *io, worker *w)
{
    int sv[2] = {-1, -1};
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0 || pz_set_nonblock(sv[0]) != 0) {
        /* Out of descriptors, most likely: try again later, as for a
         * worker that died while starting, and give up after as many. */
        char msg[200];
        snprintf(msg, sizeof msg, "worker %d could not be started: socketpair: %s", w->slot + 1,
                 strerror(errno));
        if (sv[0] >= 0) {
            close(sv[0]);
            close(sv[1]);
        }
        w->state = S_IDLE;
        if (++w->init_crashes >= io->p->opt.init_attempts) {
            give_up(io, w, msg, NULL, 0);
            return;
        }
        w->respawn_at = pz_now_ns() + backoff(w->init_crashes);
        remember_error(io, msg);
        return;
    }
    w->gen++;
    w->pending_sig = 0;
    w->fd = sv[0];
    w->pid = 0;
    w->alive = 1;
    w->exited = 0;
    w->kill_sent = 0;
    w->eof_at = 0;
    w->why[0] = 0;
    w->state = S_STARTING;
    w->inflight = 0;
    w->depth = 1;
    w->out.len = w->out_head = w->out_sent = 0;
    w->in.len = 0;
    const pz_buf *init = &io->p->init[w->slot];
    char *d = pz_buf_reserve(&w->out, PZ_FRAME_HEADER + init->len);
    if (!d)
        oom();
    pz_frame_header(d, PZ_F_INIT, 0, 0, (uint32_t)init->len);
    memcpy(d + PZ_FRAME_HEADER, init->data, init->len);
    w->out.len = PZ_FRAME_HEADER + init->len;
    /* The INIT frame sits before out_head: it is not a call, and it is
     * dropped once the worker has answered it. */
    w->out_head = w->out.len;
    w->want_out = 0;
    watch(io, w, EPOLL_CTL_ADD);
    spawner_send(io, PZ_S_SPAWN, w->slot, w->gen, 0, 0, sv[1]);
    flush_worker(io, w);
}

static void check_fatal(struct pz_io *io)
{
    if (io->stopping || io->fatal_sent)
        return;
    for (int i = 0; i < io->p->nslots; i++)
        if (io->w[i].state != S_GONE)
            return;
    char msg[640];
    snprintf(msg, sizeof msg, "no worker is left and none can be started: %s",
             io->first_error[0] ? io->first_error : "every worker was lost");
    put_record(io, PZ_F_FATAL, 0, NULL, 0, 0, NULL, 0, 0, msg, strlen(msg));
    io->fatal_sent = 1; /* pool->fatal is set by publish, after the record */
}

/* Gives slot w up for good, keeping why as an init error. */
static void give_up(struct pz_io *io, worker *w, const char *why, const char *tb, size_t tblen)
{
    w->state = S_GONE;
    if (why) {
        put_record(io, PZ_F_INIT_ERROR, (uint64_t)w->slot, why, strlen(why), 1, NULL, 0, 0, tb, tblen);
        remember_error(io, why);
    }
    settle(io, w);
    check_fatal(io);
}

/* Moves the CALL frames from w->out[from..] to the front of the requeue,
 * but for call `drop` (0: none), which has become an error; a STOP frame
 * queued behind them is dropped too. */
static void requeue_from(struct pz_io *io, worker *w, size_t from, uint64_t drop)
{
    size_t rest = io->rq.len - io->rq_pos;
    if (from >= w->out.len)
        return;
    pz_buf nb = PZ_BUF_INIT;
    if (!pz_buf_reserve(&nb, w->out.len - from + rest))
        oom();
    for (size_t pos = from; pos < w->out.len;) {
        size_t size = PZ_FRAME_HEADER + pz_frame_payload_len(w->out.data + pos);
        if (w->out.data[pos + 4] == PZ_F_CALL && pz_frame_id(w->out.data + pos) != drop)
            pz_buf_append(&nb, w->out.data + pos, size); /* room reserved above */
        pos += size;
    }
    pz_buf_append(&nb, io->rq.data + io->rq_pos, rest);
    pz_buf_free(&io->rq);
    io->rq = nb;
    io->rq_pos = 0;
    w->out.len = from;
}

/* A worker that held calls died.  The call it was running (its id is in
 * the shared memory, see worker.h) is charged with a death and becomes an
 * error once it has killed max_deaths workers; every other call it held,
 * including calls whose results it had not sent yet, goes back to the
 * front of the queue. */
static void requeue_inflight(struct pz_io *io, worker *w, const char *how)
{
    uint64_t running = atomic_load(&io->p->shared[w->slot].running), drop = 0;
    /* Workers terminated by stop() or lost with the spawner did not die of
     * their call. */
    if (running && w->inflight > 0 && !io->stopping && !io->spawner_gone) {
        for (size_t pos = w->out_head; pos < w->out_sent;) {
            char *fr = w->out.data + pos;
            uint32_t plen = pz_frame_payload_len(fr);
            size_t size = PZ_FRAME_HEADER + plen;
            if (fr[4] != PZ_F_CALL || pz_frame_id(fr) != running) {
                pos += size;
                continue;
            }
            uint8_t deaths = (uint8_t)(fr[5] + 1);
            fr[5] = (char)deaths;
            if (deaths >= io->p->opt.max_deaths) {
                char msg[512];
                snprintf(msg, sizeof msg,
                         "call %" PRIu64 " killed %d workers (max_deaths = %d); the last: worker "
                         "%d (pid %d) %s while running call %" PRIu64,
                         running, deaths, io->p->opt.max_deaths, w->slot + 1, (int)w->pid, how,
                         running);
                put_record(io, PZ_F_ERROR, running, fr + PZ_FRAME_HEADER, plen, 1, msg,
                           strlen(msg), 1, NULL, 0);
                drop = running;
            }
            break;
        }
    }
    atomic_store(&io->p->shared[w->slot].running, 0);
    requeue_from(io, w, w->out_head, drop);
    w->out.len = w->out_head = w->out_sent = 0;
    w->inflight = 0;
}

static void close_worker_fd(struct pz_io *io, worker *w)
{
    if (w->fd < 0)
        return;
    if (w->lent) {
        w->lent = 0;
        io->lent = NULL;
    } else {
        epoll_ctl(io->ep, EPOLL_CTL_DEL, w->fd, NULL);
    }
    close(w->fd);
    w->fd = -1;
    w->want_out = 0;
}

static int read_worker(struct pz_io *io, worker *w);

static int64_t backoff(int crashes)
{
    int64_t ns = BACKOFF_NS;
    for (int i = 1; i < crashes && ns < MAX_BACKOFF_NS; i++)
        ns *= 2;
    return ns < MAX_BACKOFF_NS ? ns : MAX_BACKOFF_NS;
}

/* The worker's process is gone (status valid when known).  Reads what it
 * left in the socket, then requeues, respawns or gives the slot up. */
static void worker_ended(struct pz_io *io, worker *w, int known, int status)
{
    /* Everything it wrote before it died is still in the socket. */
    while (w->fd >= 0 && read_worker(io, w))
        ;
    close_worker_fd(io, w);
    pz_buf_trim(&w->in, 0);
    w->in.len = 0;
    w->alive = 0;
    char how[240];
    if (w->why[0])
        snprintf(how, sizeof how, "%s", w->why);
    else if (known)
        pz_describe_status(status, how, sizeof how);
    else
        snprintf(how, sizeof how, "ended with the spawner");
    switch (w->state) {
    case S_STARTING:
        if (io->stopping || io->spawner_gone) {
            char msg[512];
            snprintf(msg, sizeof msg, "worker %d (pid %d) %s during initialization", w->slot + 1,
                     (int)w->pid, how);
            give_up(io, w, io->stopping ? NULL : msg, NULL, 0);
            return;
        }
        w->init_crashes++;
        if (w->init_crashes >= io->p->opt.init_attempts) {
            char msg[512];
            snprintf(msg, sizeof msg,
                     "worker %d died during initialization %d times; the last time, pid %d %s",
                     w->slot + 1, w->init_crashes, (int)w->pid, how);
            give_up(io, w, msg, NULL, 0);
            return;
        }
        w->state = S_IDLE;
        w->respawn_at = pz_now_ns() + backoff(w->init_crashes);
        return;
    case S_READY:
    case S_STOPPING:
        requeue_inflight(io, w, how);
        if (w->state == S_STOPPING || io->stopping) {
            w->state = S_GONE;
            return;
        }
        if (io->p->opt.respawn && !io->spawner_gone) {
            w->state = S_IDLE;
            w->respawn_at = pz_now_ns();
            return;
        }
        {
            char msg[512];
            snprintf(msg, sizeof msg, "worker %d (pid %d) %s%s", w->slot + 1, (int)w->pid, how,
                     io->spawner_gone ? " and no worker can be started without the spawner"
                                      : "; not replaced (respawn = false)");
            remember_error(io, msg);
            w->state = S_GONE;
            check_fatal(io);
        }
        return;
    default:
        return; /* S_GONE after an init error: nothing held */
    }
}

/* The parent kills a worker that broke the protocol; it is then handled
 * like any other death. */
static void reject_worker(struct pz_io *io, worker *w, const char *why)
{
    if (w->why[0])
        return;
    snprintf(w->why, sizeof w->why, "was killed after it sent a malformed frame (%s)", why);
    close_worker_fd(io, w);
    if (!w->kill_sent) {
        w->kill_sent = 1;
        kill_worker(io, w, SIGKILL);
    }
}

/* ---- frames from workers ------------------------------------------------ */

static void update_depth(struct pz_io *io, worker *w, uint64_t ns)
{
    const pz_options *o = &io->p->opt;
    w->avg_ns = w->avg_ns > 0 ? w->avg_ns * 0.875 + (double)ns * 0.125 : (double)ns + 1;
    double d = (double)o->window_ns / w->avg_ns;
    w->depth = d < 1 ? 1 : d > o->max_inflight ? o->max_inflight : (uint32_t)d;
}

static void on_answer(struct pz_io *io, worker *w, const pz_frame *f)
{
    if ((w->state != S_READY && w->state != S_STOPPING) || w->inflight == 0) {
        reject_worker(io, w, "an answer to no call");
        return;
    }
    const char *head = w->out.data + w->out_head;
    if (pz_frame_id(head) != f->id) {
        reject_worker(io, w, "an answer to the wrong call");
        return;
    }
    const char *p = f->payload;
    size_t n = f->len;
    uint64_t ns;
    if (pz_take_varint(&p, &n, &ns) != 0) {
        reject_worker(io, w, "a truncated answer");
        return;
    }
    uint32_t plen = pz_frame_payload_len(head);
    if (f->type == PZ_F_RESULT) {
        put_record(io, PZ_F_RESULT, f->id, NULL, 0, 0, NULL, 0, 0, p, n);
    } else {
        const char *msg, *tb;
        size_t mlen, tblen;
        if (pz_split_prefixed(p, n, &msg, &mlen, &tb, &tblen) != 0) {
            reject_worker(io, w, "a truncated error");
            return;
        }
        put_record(io, PZ_F_ERROR, f->id, head + PZ_FRAME_HEADER, plen, 1, msg, mlen, 1, tb, tblen);
    }
    update_depth(io, w, ns);
    w->out_head += PZ_FRAME_HEADER + plen;
    if (--w->inflight == 0)
        io->last_idle = w->slot;
    if (w->out_head == w->out.len) {
        w->out.len = w->out_head = w->out_sent = 0;
        pz_buf_trim(&w->out, 1 << 20);
    } else if (w->out_head >= READ_CHUNK && w->out_head >= w->out.len / 2) {
        /* A worker that always has calls in flight never empties its
         * buffer: drop the answered frames now and then. */
        pz_buf_consume(&w->out, w->out_head);
        w->out_sent -= w->out_head;
        w->out_head = 0;
    }
}

static void on_init(struct pz_io *io, worker *w, const pz_frame *f)
{
    if (w->state != S_STARTING && w->state != S_STOPPING) {
        reject_worker(io, w, "an unexpected INIT answer");
        return;
    }
    if (f->type == PZ_F_INIT_OK) {
        uint8_t v[PZ_VARINT_MAX_BYTES];
        size_t nv = pz_put_varint(v, f->id);
        put_record(io, PZ_F_INIT_OK, (uint64_t)w->slot, (const char *)v, nv, 0, NULL, 0, 0,
                   f->payload, f->len);
        w->init_crashes = 0;
        if (w->state == S_STARTING)
            w->state = S_READY;
        if (w->out_sent == w->out.len && w->out_head == w->out.len)
            w->out.len = w->out_head = w->out_sent = 0;
        settle(io, w);
        return;
    }
    const char *msg, *tb;
    size_t mlen, tblen;
    if (pz_split_prefixed(f->payload, f->len, &msg, &mlen, &tb, &tblen) != 0) {
        reject_worker(io, w, "a truncated INIT error");
        return;
    }
    char buf[300];
    snprintf(buf, sizeof buf, "%.*s", (int)(mlen < 250 ? mlen : 250), msg);
    remember_error(io, buf);
    put_record(io, PZ_F_INIT_ERROR, (uint64_t)w->slot, msg, mlen, 1, NULL, 0, 0, tb, tblen);
    w->state = S_GONE;
    settle(io, w);
    check_fatal(io);
}

/* Reads what a worker sent and handles whole frames, for a bounded number
 * of reads so that one busy worker cannot starve the others.  Returns 1
 * when that bound stopped it (more may be waiting), else 0. */
static int read_worker(struct pz_io *io, worker *w)
{
    size_t max_payload = (size_t)io->p->opt.max_message + 64;
    int more = 0;
    for (int rounds = 0; w->fd >= 0; rounds++) {
        if (rounds == 8) {
            more = 1;
            break;
        }
        size_t want = READ_CHUNK;
        pz_frame f;
        size_t need = 0;
        const char *why;
        if (pz_frame_parse(w->in.data, w->in.len, max_payload, &f, &need, &why) == PZ_PARSE_MORE &&
            need > w->in.len + READ_CHUNK)
            want = need - w->in.len;
        if (!pz_buf_reserve(&w->in, want)) {
            reject_worker(io, w, "out of memory for its frame");
            return 0;
        }
        size_t room = w->in.cap - w->in.len;
        ssize_t r = recv(w->fd, w->in.data + w->in.len, room, MSG_DONTWAIT);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            break;
        if (r <= 0) {
            close_worker_fd(io, w);
            if (!w->exited && !w->eof_at)
                w->eof_at = pz_now_ns();
            break;
        }
        w->in.len += (size_t)r;
        size_t pos = 0;
        for (;;) {
            int rc = pz_frame_parse(w->in.data + pos, w->in.len - pos, max_payload, &f, NULL, &why);
            if (rc == PZ_PARSE_MORE)
                break;
            if (rc == PZ_PARSE_BAD) {
                reject_worker(io, w, why);
                return 0;
            }
            pos += f.size;
            if (f.type == PZ_F_RESULT || f.type == PZ_F_ERROR)
                on_answer(io, w, &f);
            else if (f.type == PZ_F_INIT_OK || f.type == PZ_F_INIT_ERROR)
                on_init(io, w, &f);
            else
                reject_worker(io, w, "a frame type workers do not send");
            if (w->why[0])
                return 0;
        }
        pz_buf_consume(&w->in, pos);
        if ((size_t)r < room)
            break; /* drained */
    }
    if (w->in.len == 0)
        pz_buf_trim(&w->in, 1 << 20);
    return more;
}

/* ---- sending calls ------------------------------------------------------ */

static void flush_worker(struct pz_io *io, worker *w)
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
                watch(io, w, EPOLL_CTL_MOD);
            }
            return;
        }
        /* EPIPE / ECONNRESET: the worker is dying; its end is handled
         * when the spawner reports it. */
        return;
    }
    if (w->want_out && w->fd >= 0) {
        w->want_out = 0;
        watch(io, w, EPOLL_CTL_MOD);
    }
}

static worker *pick_worker(struct pz_io *io)
{
    int n = io->p->nslots;
    for (int i = 0; i < n; i++) {
        worker *w = &io->w[(io->rr + i) % n];
        if (w->state == S_READY && w->fd >= 0 && w->inflight < w->depth && !w->lent) {
            io->rr = (w->slot + 1) % n;
            return w;
        }
    }
    return NULL;
}

/* Queues one CALL frame for worker w. */
static void hand_call(worker *w, const char *frame, size_t size)
{
    if (pz_buf_append(&w->out, frame, size) != 0)
        oom();
    w->inflight++;
}

/* Hands queued calls to workers with room, requeued calls first. */
static void dispatch(struct pz_io *io)
{
    if (io->stopping)
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
        worker *w = pick_worker(io);
        if (!w)
            break;
        size_t size = PZ_FRAME_HEADER + pz_frame_payload_len(fr);
        hand_call(w, fr, size);
        if (from_rq) {
            io->rq_pos += size;
        } else {
            sp += size;
            savail -= size;
            pz_spsc_consume(q, size);
        }
    }
    if (io->rq_pos == io->rq.len) {
        io->rq.len = io->rq_pos = 0;
        pz_buf_trim(&io->rq, 1 << 20);
    }
    for (int i = 0; i < io->p->nslots; i++)
        if (io->w[i].out_sent < io->w[i].out.len)
            flush_worker(io, &io->w[i]);
}

/* True when some ready worker could take another call. */
static int has_room(struct pz_io *io)
{
    for (int i = 0; i < io->p->nslots; i++) {
        worker *w = &io->w[i];
        if (w->state == S_READY && w->fd >= 0 && w->inflight < w->depth && !w->lent)
            return 1;
    }
    return 0;
}

/* ---- stopping ----------------------------------------------------------- */

/* Takes back the calls not yet sent (whole frames past out_sent). */
static void unsend(struct pz_io *io, worker *w)
{
    size_t pos = w->out_head;
    while (pos < w->out.len && pos < w->out_sent)
        pos += PZ_FRAME_HEADER + pz_frame_payload_len(w->out.data + pos);
    for (size_t q = pos; q < w->out.len; q += PZ_FRAME_HEADER + pz_frame_payload_len(w->out.data + q))
        w->inflight--;
    requeue_from(io, w, pos, 0);
}

static void append_stop(worker *w)
{
    char *d = pz_buf_reserve(&w->out, PZ_FRAME_HEADER);
    if (!d)
        oom();
    pz_frame_header(d, PZ_F_STOP, 0, 0, 0);
    w->out.len += PZ_FRAME_HEADER;
}

static void begin_stop(struct pz_io *io)
{
    io->stopping = 1;
    int64_t finish = atomic_load(&io->p->finish_ns);
    if (finish >= 0)
        io->term_at = finish > 0 ? finish : 1;
    for (int i = 0; i < io->p->nslots; i++) {
        worker *w = &io->w[i];
        switch (w->state) {
        case S_READY:
            unsend(io, w);
            /* fall through */
        case S_STARTING:
            append_stop(w);
            w->state = S_STOPPING;
            flush_worker(io, w);
            break;
        case S_IDLE:
            w->state = S_GONE;
            break;
        default:
            break;
        }
    }
}

static int any_alive(struct pz_io *io)
{
    for (int i = 0; i < io->p->nslots; i++)
        if (io->w[i].alive)
            return 1;
    return 0;
}

/* Advances stop(): terminate after the deadline, shut the spawner down once
 * no worker is left, finish once the spawner has gone. */
static void progress_stop(struct pz_io *io, int64_t now)
{
    if (io->term_at && now >= io->term_at) {
        io->term_at = 0;
        io->kill_at = now + io->p->opt.kill_grace_ns;
        for (int i = 0; i < io->p->nslots; i++)
            kill_worker(io, &io->w[i], SIGTERM);
    }
    if (io->kill_at && now >= io->kill_at) {
        io->kill_at = 0;
        for (int i = 0; i < io->p->nslots; i++)
            kill_worker(io, &io->w[i], SIGKILL);
    }
    if (!any_alive(io) && !io->spawner_shut && io->nspq == 0) {
        io->spawner_shut = 1;
        shutdown(io->p->spawner_fd, SHUT_WR);
    }
    if (io->spawner_shut && io->spawner_gone)
        io->finished = 1;
}

/* ---- events ------------------------------------------------------------- */

static worker *worker_by_pid(struct pz_io *io, pid_t pid)
{
    for (int i = 0; i < io->p->nslots; i++)
        if (io->w[i].alive && io->w[i].pid == pid)
            return &io->w[i];
    return NULL;
}

static void spawner_lost(struct pz_io *io)
{
    io->spawner_gone = 1;
    epoll_ctl(io->ep, EPOLL_CTL_DEL, io->p->spawner_fd, NULL);
    for (size_t i = 0; i < io->nspq; i++)
        if (io->spq[i].fd >= 0)
            close(io->spq[i].fd);
    io->nspq = 0;
    if (!io->stopping)
        remember_error(io, "the spawner process died");
    /* Its workers die with it (their parent-death signal). */
    for (int i = 0; i < io->p->nslots; i++) {
        worker *w = &io->w[i];
        if (w->alive)
            worker_ended(io, w, 0, 0);
        if (w->state == S_IDLE)
            w->state = S_GONE;
    }
    check_fatal(io);
}

static void read_spawner(struct pz_io *io)
{
    for (;;) {
        pz_spawn_msg m;
        int fd;
        int r = pz_spawn_recv(io->p->spawner_fd, &m, &fd);
        if (fd >= 0)
            close(fd);
        if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
            return;
        if (r <= 0) {
            spawner_lost(io);
            return;
        }
        worker *w;
        switch (m.kind) {
        case PZ_S_SPAWNED:
            if (m.slot >= 0 && m.slot < io->p->nslots && io->w[m.slot].gen == m.gen) {
                w = &io->w[m.slot];
                w->pid = m.pid;
                if (w->pending_sig) {
                    kill_worker(io, w, w->pending_sig);
                    w->pending_sig = 0;
                }
            }
            break;
        case PZ_S_FAILED:
            if (m.slot >= 0 && m.slot < io->p->nslots && io->w[m.slot].gen == m.gen) {
                w = &io->w[m.slot];
                snprintf(w->why, sizeof w->why, "could not be forked (%s)", strerror(m.arg));
                worker_ended(io, w, 0, 0);
            }
            break;
        case PZ_S_EXITED:
            if ((w = worker_by_pid(io, m.pid)) != NULL) {
                w->exited = 1;
                worker_ended(io, w, 1, m.arg);
            }
            break;
        default:
            break;
        }
    }
}

static void on_event(struct pz_io *io, const struct epoll_event *ev)
{
    uint64_t t = ev->data.u64;
    if (t == TOKEN_WAKE) {
        uint64_t v;
        if (read(io->p->io_wake_fd, &v, sizeof v) < 0 && errno != EAGAIN)
            fprintf(stderr, "parallelize: reading the wake-up eventfd: %s\n", strerror(errno));
        atomic_store(&io->p->io_woken, 0);
        return;
    }
    if (t == TOKEN_SPAWNER) {
        if (ev->events & EPOLLOUT)
            spawner_flush(io);
        if (ev->events & (EPOLLIN | EPOLLHUP | EPOLLERR))
            read_spawner(io);
        return;
    }
    int slot = (int)(uint32_t)t - TOKEN_WORKER;
    if (slot < 0 || slot >= io->p->nslots)
        return;
    worker *w = &io->w[slot];
    if (w->gen != (uint32_t)(t >> 32) || w->fd < 0)
        return; /* an event for a socket closed earlier in this batch */
    if (ev->events & EPOLLOUT)
        flush_worker(io, w);
    if (ev->events & (EPOLLIN | EPOLLHUP | EPOLLERR))
        read_worker(io, w);
}

/* Respawns due slots, kills workers that closed their socket but linger;
 * returns the next deadline (0 when none). */
static int64_t run_timers(struct pz_io *io, int64_t now)
{
    int64_t next = 0;
#define CONSIDER(t) \
    if ((t) > 0 && (next == 0 || (t) < next)) next = (t)
    for (int i = 0; i < io->p->nslots; i++) {
        worker *w = &io->w[i];
        if (w->state == S_IDLE && !io->stopping && !io->spawner_gone) {
            if (now >= w->respawn_at)
                start_worker(io, w);
            if (w->state == S_IDLE) /* not started, or failed to: later */
                CONSIDER(w->respawn_at);
        }
        if (w->eof_at && w->alive && !w->exited) {
            if (now - w->eof_at >= EOF_GRACE_NS) {
                if (!w->kill_sent) {
                    w->kill_sent = 1;
                    kill_worker(io, w, SIGKILL);
                }
            } else {
                CONSIDER(w->eof_at + EOF_GRACE_NS);
            }
        }
    }
    if (io->stopping) {
        CONSIDER(io->term_at);
        CONSIDER(io->kill_at);
    }
#undef CONSIDER
    return next;
}

static int main_condition(struct pz_io *io, int waiting)
{
    pz_pool *p = io->p;
    if (io->fatal_sent || io->finished)
        return 1;
    if (atomic_load_explicit(&p->backlog, memory_order_relaxed) >= PZ_BACKLOG_WAKE && waiting != PZ_WAIT_EXIT)
        return 1;
    if (waiting == PZ_WAIT_CALLS)
        return io->calls_done >= atomic_load(&p->main_target);
    if (waiting == PZ_WAIT_INIT)
        return io->settled >= p->nslots;
    return 0;
}

/* Makes this round's records visible and wakes the main thread if it waits
 * for something that is now true. */
static void publish(struct pz_io *io)
{
    pz_pool *p = io->p;
    pz_spsc_publish(&p->done);
    atomic_store(&p->calls_done, io->calls_done);
    atomic_store(&p->settled, io->settled);
    if (io->fatal_sent)
        atomic_store(&p->fatal, 1);
    if (io->finished)
        atomic_store(&p->io_finished, 1);
    int waiting = atomic_load(&p->main_waiting);
    if (waiting && main_condition(io, waiting) &&
        atomic_compare_exchange_strong(&p->main_waiting, &waiting, PZ_WAIT_NONE)) {
        uint64_t one = 1;
        if (write(p->main_wake_fd, &one, sizeof one) < 0 && errno != EAGAIN)
            fprintf(stderr, "parallelize: waking the main thread: %s\n", strerror(errno));
    }
}

void *pz_io_main(void *arg)
{
    pz_pool *p = arg;
    struct pz_io *io = p->io;
    struct epoll_event evs[64];
    pthread_mutex_lock(&io->lock);
    for (int i = 0; i < p->nslots; i++)
        start_worker(io, &io->w[i]);
    while (!io->finished) {
        int64_t now = pz_now_ns();
        if (!io->stopping && atomic_load(&p->stop_requested))
            begin_stop(io);
        int64_t deadline = run_timers(io, now);
        if (io->stopping)
            progress_stop(io, now);
        dispatch(io);
        publish(io);
        if (io->finished)
            break;
        int timeout = -1;
        if (deadline > 0)
            timeout = deadline <= now ? 0 : (int)((deadline - now + 999999) / 1000000);
        /* Tell the main thread we sleep with room for calls, then look once
         * more: a call published before the flag was set would otherwise
         * wait for the next event. */
        int room = !io->stopping && has_room(io);
        if (room) {
            atomic_store(&p->io_sleeping, 1);
            size_t avail;
            if ((io->rq_pos < io->rq.len || pz_spsc_peek(&p->submit, &avail)) ) {
                atomic_store(&p->io_sleeping, 0);
                continue;
            }
        }
        pthread_mutex_unlock(&io->lock);
        int n = epoll_wait(io->ep, evs, 64, timeout);
        pthread_mutex_lock(&io->lock);
        if (room)
            atomic_store(&p->io_sleeping, 0);
        if (n < 0 && errno != EINTR) {
            fprintf(stderr, "parallelize: epoll_wait: %s\n", strerror(errno));
            abort();
        }
        for (int i = 0; i < n; i++)
            on_event(io, &evs[i]);
    }
    publish(io);
    pthread_mutex_unlock(&io->lock);
    uint64_t one = 1;
    if (write(p->main_wake_fd, &one, sizeof one) < 0 && errno != EAGAIN)
        fprintf(stderr, "parallelize: waking the main thread: %s\n", strerror(errno));
    return NULL;
}

/* ---- lending a lone call's worker to the main thread ------------------- */

/* A lone call on an idle pool would otherwise cost one wake-up more: the
 * I/O thread's, to relay the answer.  On a virtual machine that thread
 * often sleeps on the other, idle, CPU, where a wake-up costs tens of
 * microseconds, paid by the worker in its write.  So the main thread sends
 * a lone call itself and takes the worker's socket out of the epoll set
 * before it does: the answer then wakes only the main thread, which reads
 * it with the code below (read_worker), under the lock.  The I/O thread
 * leaves a lent worker alone (pick_worker, has_room, watch) except to
 * handle its death (close_worker_fd ends the lend) and, when it took an
 * event for that socket from epoll_wait just before the lend, to read it:
 * harmless, since both read under the lock. */

/* Called by the main thread, under the lock: the I/O thread looks again
 * at everything once it can take the lock. */
static void wake_io_thread(struct pz_io *io)
{
    uint64_t one = 1;
    if (write(io->p->io_wake_fd, &one, sizeof one) < 0 && errno != EAGAIN)
        fprintf(stderr, "parallelize: waking the I/O thread: %s\n", strerror(errno));
}

static void give_back(struct pz_io *io)
{
    worker *w = io->lent;
    io->lent = NULL;
    w->lent = 0;
    watch(io, w, EPOLL_CTL_ADD);
    /* An I/O thread that went to sleep during the lend may have found no
     * room for calls (has_room skips a lent worker), and then p(...) would
     * not wake it: wake it now so that it looks again. */
    if (!atomic_load(&io->p->io_sleeping))
        wake_io_thread(io);
}

/* The submit queue holds exactly one frame (as far as its first chunk
 * shows). */
static const char *lone_call(struct pz_io *io, size_t *size)
{
    size_t avail;
    const char *fr = pz_spsc_peek(&io->p->submit, &avail);
    if (!fr)
        return NULL;
    *size = PZ_FRAME_HEADER + pz_frame_payload_len(fr);
    return *size == avail ? fr : NULL;
}

int pz_io_dispatch_now(struct pz_io *io, int *lent_fd)
{
    size_t avail, size;
    int done = 0;
    if (pthread_mutex_trylock(&io->lock) != 0)
        return 0;
    /* Only for a pool with nothing in flight: a call then waits for no
     * other, and the I/O thread, which sleeps, would only relay it.  Under
     * a stream of calls the I/O thread batches them instead. */
    if (atomic_load(&io->p->io_sleeping) && !io->stopping && io->rq_pos == io->rq.len && !io->lent) {
        int idle = 1;
        for (int i = 0; i < io->p->nslots && idle; i++)
            idle = io->w[i].inflight == 0;
        if (idle) {
            /* The worker that answered last is the one most likely still
             * awake (it polls a while before sleeping) and warm. */
            io->rr = io->last_idle;
            const char *fr = lone_call(io, &size);
            worker *w = fr ? pick_worker(io) : NULL;
            if (w && epoll_ctl(io->ep, EPOLL_CTL_DEL, w->fd, NULL) == 0) {
                w->lent = 1;
                io->lent = w;
                hand_call(w, fr, size);
                pz_spsc_consume(&io->p->submit, size);
                flush_worker(io, w);
                if (io->lent && w->out_sent < w->out.len)
                    give_back(io); /* the rest goes out when it can */
                else if (io->lent)
                    *lent_fd = w->fd;
            } else {
                dispatch(io);
            }
            done = !pz_spsc_peek(&io->p->submit, &avail);
        }
    }
    pthread_mutex_unlock(&io->lock);
    return done;
}

void pz_io_park(struct pz_io *io, int park)
{
    if (park)
        pthread_mutex_lock(&io->lock);
    else
        pthread_mutex_unlock(&io->lock);
}

int pz_io_collect(struct pz_io *io, int keep)
{
    pthread_mutex_lock(&io->lock);
    worker *w = io->lent;
    if (w) {
        read_worker(io, w);
        if (io->lent && (!keep || w->inflight == 0))
            give_back(io);
        if (w->fd < 0) {
            /* It died: its requeued calls and its timers are the I/O
             * thread's business. */
            wake_io_thread(io);
        }
    }
    publish(io);
    int fd = io->lent ? io->lent->fd : -1;
    pthread_mutex_unlock(&io->lock);
    return fd;
}

struct pz_io *pz_io_new(pz_pool *p)
{
    struct pz_io *io = calloc(1, sizeof *io);
    if (!io)
        return NULL;
    if (pthread_mutex_init(&io->lock, NULL) != 0) {
        free(io);
        return NULL;
    }
    io->p = p;
    io->w = calloc((size_t)p->nslots, sizeof *io->w);
    io->ep = epoll_create1(EPOLL_CLOEXEC);
    if (!io->w || io->ep < 0) {
        if (io->ep >= 0)
            close(io->ep);
        pthread_mutex_destroy(&io->lock);
        free(io->w);
        free(io);
        return NULL;
    }
    for (int i = 0; i < p->nslots; i++) {
        io->w[i].slot = i;
        io->w[i].fd = -1;
        io->w[i].state = S_IDLE;
    }
    struct epoll_event ev = {EPOLLIN, {.u64 = TOKEN_WAKE}};
    struct epoll_event sv = {EPOLLIN, {.u64 = TOKEN_SPAWNER}};
    if (epoll_ctl(io->ep, EPOLL_CTL_ADD, p->io_wake_fd, &ev) != 0 ||
        epoll_ctl(io->ep, EPOLL_CTL_ADD, p->spawner_fd, &sv) != 0) {
        pz_io_free(io);
        return NULL;
    }
    return io;
}

void pz_io_leftovers(struct pz_io *io, void (*fn)(const char *, size_t, void *), void *ud)
{
    for (size_t pos = io->rq_pos; pos < io->rq.len;) {
        size_t size = PZ_FRAME_HEADER + pz_frame_payload_len(io->rq.data + pos);
        fn(io->rq.data + pos, size, ud);
        pos += size;
    }
    for (int i = 0; i < io->p->nslots; i++) {
        worker *w = &io->w[i];
        for (size_t pos = w->out_head; pos < w->out.len;) {
            size_t size = PZ_FRAME_HEADER + pz_frame_payload_len(w->out.data + pos);
            if (w->out.data[pos + 4] == PZ_F_CALL)
                fn(w->out.data + pos, size, ud);
            pos += size;
        }
    }
}

void pz_io_free(struct pz_io *io)
{
    if (!io)
        return;
    for (int i = 0; i < io->p->nslots; i++) {
        worker *w = &io->w[i];
        if (w->fd >= 0)
            close(w->fd);
        pz_buf_free(&w->out);
        pz_buf_free(&w->in);
    }
    for (size_t i = 0; i < io->nspq; i++)
        if (io->spq[i].fd >= 0)
            close(io->spq[i].fd);
    free(io->spq);
    pz_buf_free(&io->rq);
    close(io->ep);
    pthread_mutex_destroy(&io->lock);
    free(io->w);
    free(io);
}
