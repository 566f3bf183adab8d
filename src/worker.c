/*
 * worker.c - a worker process: a fresh LuaJIT state, one executor, and a
 * loop that runs calls in the order they arrive.
 *
 * The worker's I/O is blocking: it is single-threaded and the parent's side
 * never blocks, so neither can wait on the other forever.  Results are
 * batched: they go out when the worker has nothing more to read, or when
 * enough of them (or enough time) has piled up that the parent should hear
 * about them now to keep the other workers fed.
 *
 * A remote worker (pzlua --worker, remote.c) differs in four ways: its
 * input and output are two descriptors (pipes from sshd or srun, not a
 * socket); it shares no memory with the parent, so it writes its results
 * before every call, which makes the oldest call the parent has no answer
 * for the one that was running when it died; it never polls for input (the
 * round trip is a network's); and its initialization errors start with its
 * host name.
 */
#include <errno.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

#include "arena.h"
#include "buf.h"
#include "chunk.h"
#include "codec.h"
#include "codec_format.h"
#include "frame.h"
#include "handshake.h"
#include "lerrobj.h"
#include "lstate.h"
#include "run.h"
#include "shortcopy.h"
#include "spin.h"
#include "sys.h"
#include "worker.h"
#include "wout.h"
#include "wruns.h"

#define READ_CHUNK 65536
#define FLUSH_BYTES 65536
#define FLUSH_FRAMES 1024
/* Results that have waited this long go out after the call that follows
 * them (the flusher writes them anyway if that call runs long: wout.h).
 * Long enough that a worker busy with calls of a few hundred microseconds
 * writes its results in batches, which wakes the parent's I/O thread once
 * per batch rather than once per result, and each wake-up takes a CPU from
 * a worker.  Three quarters of the pool's default window (options.lua), so
 * that the calls a worker holds last until its batch goes out and the
 * answer brings more.  20,000 calls of 100 us on 2 workers, alternating
 * runs: 1.045-1.095x their ideal (0.055-0.061 I/O wake-ups a call) when
 * a batch went out at 2 ms, at each read that had to wait and at the
 * flusher's alarm, also 2 ms; 1.032-1.067x (0.032-0.035) with 3 ms, a
 * read that finds calls already sent not writing the batch (next_frame)
 * and the flusher at 4.5 ms.  Earlier: 1.086-1.123x with 1 ms and a 2 ms
 * window (0.109-0.114). */
#define FLUSH_NS PZ_WOUT_BATCH_NS

/* One worker process has exactly one of these. */
static struct {
    lua_State *L;
    int in_fd;           /* frames from the parent (output: wout.c) */
    int remote;          /* started by pzlua --worker (see the top) */
    char host[64];       /* remote: this host's name, for messages */
    int slot;
    pz_buf in;
    size_t in_pos;       /* parsed bytes at the front of `in` */
    int64_t started;     /* when the call being run began */
    size_t mark;         /* output length when the result began (locked) */
    int mark_frames;
    int64_t clock;       /* when the last call ended; 0 after a read */
    double avg_ns;       /* moving average of the calls' run times */
    size_t max_message;
    int exec_ref;        /* registry ref of the executor */
    int handler_ref;     /* registry ref of on_error */
    int run_ref;         /* registry ref of run_call */
    int report_ref;      /* registry ref of report_executor_error */
    pz_frame call;       /* the call run_call works on */
    int in_executor;     /* run_call is in the executor (IN_EXECUTOR) */
    pz_slot_shared *shared; /* where the running call's id is published */
    pz_spin spin;        /* how reads poll before they block */
    pz_buf scratch;      /* an error value being encoded */
    pz_arena_reader arena_in;   /* the pool's shared strings (arena.h) */
    pz_arena_reader *reader;    /* &arena_in, or NULL without them */
    pz_ring_writer ring;        /* this worker's results' big strings */
    pz_arena_writer *writer;    /* &ring.w, or NULL */
    pz_ring_mark ring_mark;     /* the ring before the running call's result */
    int ring_marked;            /* ring_mark is the running call's */
    int kill_leftovers;  /* kill the own process group before leaving */
    /* The run being made (handle_run): its calls, the next to make, and
     * the references of its protected steps. */
    pz_run_item *run;
    size_t run_cap, run_n, run_next;
    int run_calls_ref, run_error_ref;
    int helper_ready;    /* wruns.h's helper may be asked (pz_wruns_prepare ran) */
    int run_helper;      /* ask it for this run's calls (run_calls) */
    int in_helper;       /* run_calls is in the helper */
    uint64_t c_run_calls; /* run calls made by the C loop (HELPER_AFTER) */
    long fail_answer_in; /* tests: answer_number fails at this call, counting down */
    pz_buf item;         /* one result of the run, encoded */
    /* The last run answer in the output (answer_open): where it starts
     * and ends, the output's writes then, its calls. */
    size_t ans_at, ans_end;
    uint64_t ans_writes;
    unsigned ans_n;
} W;

static _Noreturn void die(const char *what)
{
    if (W.remote)
        fprintf(stderr, "parallelize: worker on %s (pid %d): %s\n", W.host, (int)getpid(), what);
    else
        fprintf(stderr, "parallelize: worker %d (pid %d): %s\n", W.slot + 1, (int)getpid(), what);
    fflush(stderr);
    _exit(3);
}

/* Appends a frame made of these parts to the output (wout.h: locked). */
static void put_frame(uint8_t type, uint64_t id, const pz_part *parts, int nparts)
{
    pz_buf *out = pz_wout_buf();
    size_t len = pz_frame_parts_len(parts, nparts);
    if (len == SIZE_MAX)
        die("message too long for a frame");
    char *dst = pz_buf_reserve(out, PZ_FRAME_HEADER + len);
    if (!dst)
        die("out of memory");
    out->len += pz_frame_put(dst, type, id, parts, nparts);
    pz_wout_frame_done(W.clock, 0);
}

/* Cuts an error's parts to fit a frame whose payload has room for `room`
 * bytes besides `varints` varints.  Like a result, an ERROR or INIT_ERROR
 * frame must fit max_message: the parent takes a bigger one for a
 * malformed frame and kills the worker, and the call would run again, and
 * fail again, for ever (or the slot would be given up for the wrong
 * reason).  What does not fit is left out: the value first (vlen may be
 * NULL; the parent then gives the message as the value), then the
 * traceback's end, then the message's end. */
static void fit_error(int varints, size_t *mlen, size_t *tlen, size_t *vlen)
{
    size_t room = W.max_message - (size_t)varints * PZ_VARINT_MAX_BYTES;
    size_t v = vlen ? *vlen : 0;
    if (*mlen + *tlen + v > room && vlen)
        *vlen = 0;
    if (*mlen + *tlen > room)
        *tlen = *mlen < room ? room - *mlen : 0;
    if (*mlen > room)
        *mlen = room;
}

/* Appends an ERROR frame for call id (frame.h); `value` holds the error
 * value encoded, or nothing. */
static void put_error(uint64_t id, uint64_t ns, const char *msg, size_t mlen, const char *tb,
                      size_t tblen, const pz_buf *value)
{
    size_t vlen = value ? value->len : 0;
    fit_error(3, &mlen, &tblen, &vlen); /* the time and the two lengths */
    uint8_t v[PZ_VARINT_MAX_BYTES];
    pz_part parts[] = {{v, pz_put_varint(v, ns), 0},
                       {msg, mlen, 1},
                       {tb, tblen, 1},
                       {vlen ? value->data : NULL, vlen, 0}};
    put_frame(PZ_F_ERROR, id, parts, 4);
}

const char *pz_worker_whose_memory(const char *msg, char *buf, size_t size)
{
    static const char bare[] = "not enough memory";
    size_t n = strlen(msg), b = sizeof bare - 1;
    if (n < b || strcmp(msg + n - b, bare) != 0)
        return msg;
    /* (A remote worker does not know its slot: its host names it, as in die.) */
    int len = W.remote ? snprintf(buf, size, "%s (in the worker on %s, pid %d)", msg, W.host, (int)getpid())
                       : snprintf(buf, size, "%s (in worker %d, pid %d)", msg, W.slot + 1, (int)getpid());
    return len > 0 && (size_t)len < size ? buf : msg;
}

/* An ERROR frame with a message only (the codec failed, the result was too
 * large, the error handler itself failed, memory ran out). */
static void put_error_message(uint64_t id, uint64_t ns, const char *msg)
{
    char whose[256];
    msg = pz_worker_whose_memory(msg, whose, sizeof whose);
    put_error(id, ns, msg, strlen(msg), NULL, 0, NULL);
}

/* Message handler for executor calls: turns any error value into a table
 * {message, traceback, value}. */
static int on_error(lua_State *L)
{
    if (W.in_helper)
        pz_wruns_unwhere(L, 1);
    if (lua_type(L, 1) == LUA_TSTRING || lua_type(L, 1) == LUA_TNUMBER)
        lua_pushstring(L, lua_tostring(L, 1));
    else {
        int pushed = pz_error_tostring(L, 1);
        if (!pushed || !lua_isstring(L, -1)) {
            if (pushed)
                lua_pop(L, 1); /* __tostring returned no string */
            lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, 1));
        }
    }
    luaL_traceback(L, L, NULL, 1);
    if (W.in_helper)
        pz_wruns_untrace(L);
    lua_createtable(L, 3, 0);
    lua_insert(L, -3);
    lua_rawseti(L, -3, 2);
    lua_rawseti(L, -2, 1);
    lua_pushvalue(L, 1);
    lua_rawseti(L, -2, 3);
    return 1;
}

/* Protected: encodes the value at 2 lossily into the buffer at 1 (a
 * userdata that can travel nowhere raises nothing: it becomes a string).
 * For error values and what close returns. */
static int encode_error_value(lua_State *L)
{
    pz_buf *b = lua_touserdata(L, 1);
    pz_encode_value(L, 2, b, "error", PZ_ENCODE_LOSSY);
    return 0;
}

/* Appends an ERROR frame from the {message, traceback, value} table on top.
 * The value travels when it can be encoded; the message always does. */
static void put_error_from_table(lua_State *L, uint64_t id, uint64_t ns)
{
    size_t mlen = 0, tlen = 0;
    int t = lua_gettop(L);
    lua_rawgeti(L, t, 1);
    lua_rawgeti(L, t, 2);
    const char *msg = lua_tolstring(L, -2, &mlen);
    const char *tb = lua_tolstring(L, -1, &tlen);
    W.scratch.len = 0;
    lua_pushcfunction(L, encode_error_value);
    lua_pushlightuserdata(L, &W.scratch);
    lua_rawgeti(L, t, 3);
    if (lua_pcall(L, 2, 0, 0) != 0) {
        W.scratch.len = 0;
        lua_pop(L, 1);
    }
    put_error(id, ns, msg ? msg : "?", msg ? mlen : 1, tb, tb ? tlen : 0, &W.scratch);
    pz_buf_trim(&W.scratch, 1 << 16);
    lua_settop(L, t);
}

/* Marks where the output stands (locked), for a frame about to be built:
 * pz_wout_truncate goes back there when it cannot be finished. */
static void mark_output(void)
{
    W.mark = pz_wout_buf()->len;
    W.mark_frames = pz_wout_frames();
}

/* The executor has returned or raised: takes the call's time (the end of
 * one call is the start of the next, see handle_call), takes the output's
 * lock and marks where the call's frame begins (W.mark, W.mark_frames).
 * Returns the nanoseconds the call ran. */
static uint64_t end_call(void)
{
    W.clock = pz_now_ns();
    uint64_t ns = (uint64_t)(W.clock - W.started);
    W.avg_ns = W.avg_ns * 0.875 + (double)ns * 0.125;
    if (pz_wout_lock())
        W.clock = pz_now_ns(); /* it waited for the flusher's write: see handle_call */
    mark_output();
    return ns;
}

/* Appends call id's RESULT frame (locked): the `nres` values above stack
 * index `base`, and the time the call ran.  A chunk's results (`apart`)
 * are encoded apart, as their own calls' would be.  Big strings placed in
 * the ring count toward max_message as if they were inline; a result
 * refused, or whose encode raises, gives its blocks back (no frame names
 * them).  A result above max_message becomes the call's error.  May raise
 * (the encode). */
static int put_result(lua_State *L, uint64_t id, uint64_t ns, int base, int nres, int apart)
{
    pz_buf *out = pz_wout_buf();
    size_t start = out->len;
    char *hdr = pz_buf_reserve(out, PZ_FRAME_HEADER + PZ_VARINT_MAX_BYTES);
    if (!hdr)
        return luaL_error(L, "out of memory");
    out->len += PZ_FRAME_HEADER;
    out->len += pz_put_varint((uint8_t *)out->data + out->len, ns);
    if (W.writer) {
        W.writer->placed = 0;
        W.ring_mark = pz_ring_writer_mark(&W.ring);
        W.ring_marked = 1;
    }
    pz_encode_tuple(L, base + 1, nres, out, "result", apart ? PZ_ENCODE_APART : 0, W.writer);
    size_t len = out->len - start - PZ_FRAME_HEADER;
    size_t size = len + (W.writer ? W.writer->placed : 0);
    if (size > W.max_message) {
        out->len = start;
        if (W.writer)
            pz_ring_writer_rewind(&W.ring, &W.ring_mark);
        lua_pushfstring(L, "the result of call %f is %f bytes, above max_message (%f)", (double)id,
                        (double)size, (double)W.max_message);
        put_error_message(id, ns, lua_tostring(L, -1));
        return 0;
    }
    pz_frame_header(out->data + start, PZ_F_RESULT, id, (uint32_t)len);
    if (apart && nres > 2) /* a chunk's answer naming the item that raised (chunk.h) */
        pz_frame_set_flags(out->data + start, PZ_RESULT_ITEM_RAISED);
    pz_wout_frame_done(W.clock, size - len);
    return 0;
}

/* Where run_call is: what an error it raises comes from. */
enum { IN_CODEC = 0, IN_EXECUTOR = 1 };

/* Protected: runs the call in W.call.  Decoding the arguments or encoding
 * the result may raise, and so may the executor, which is called
 * unprotected (one protected call a call, not two: it costs a tiny call's
 * time); W.in_executor tells handle_call which raised.  A plain call's
 * protected call has on_error as its message handler, below run_call; a
 * chunk's has none (its items' errors are caught one by one, with on_error
 * pushed here).  Either way the executor's frames begin where they did
 * when run_call pushed the handler and called the executor protected:
 * LuaJIT leaves a message handler a little stack after a stack overflow,
 * and whether on_error fits in it, and the error keeps its traceback,
 * depends on that place.  Takes the output's lock once the executor has
 * returned, and leaves it held (handle_call releases it): W.mark says
 * where this call's frame began. */
static int run_call(lua_State *L)
{
    uint64_t id = W.call.id;
    int chunk = (W.call.flags & PZ_CALL_CHUNK) != 0;
    if (chunk)
        lua_rawgeti(L, LUA_REGISTRYINDEX, W.handler_ref);
    int base = lua_gettop(L); /* the executor goes above */
    lua_rawgeti(L, LUA_REGISTRYINDEX, W.exec_ref);
    int nargs = pz_decode_tuple(L, W.call.payload, W.call.len, PZ_DECODE_FUNCTIONS, W.reader);
    if (chunk) {
        pz_chunk_run(L, base, nargs); /* its items' errors are in its answer */
    } else {
        W.in_executor = IN_EXECUTOR;
        lua_call(L, nargs, LUA_MULTRET);
        W.in_executor = IN_CODEC;
    }
    uint64_t ns = end_call();
    /* Every value the executor returned travels, as a tuple. */
    return put_result(L, id, ns, base, lua_gettop(L) - base, chunk);
}

/* Protected: the executor raised the error at 1 (on_error's table, or a
 * message when there was no memory for one or on_error itself failed):
 * takes the output's lock and appends the call's ERROR frame, with the
 * time the call ran. */
static int report_executor_error(lua_State *L)
{
    uint64_t ns = end_call();
    if (lua_istable(L, 1)) {
        put_error_from_table(L, W.call.id, ns);
    } else { /* out of memory or an error in the handler itself */
        const char *m = lua_tostring(L, 1);
        put_error_message(W.call.id, ns, m ? m : "error in the error handler");
    }
    return 0;
}

/* Appends call id's ERROR frame for the error on top, which the codec
 * raised (or which reporting the executor's error raised): "call N:
 * message".  Outside any protected call, where a raise would abort the
 * process, and maybe because memory ran out: so nothing here allocates
 * from Lua.  `handled` says the error went through on_error, whose table's
 * first field is the message (a memory error skips the handler and stays
 * a string); a chunk's codec error is the value raised. */
static void put_codec_error(lua_State *L, uint64_t id, int handled)
{
    int t = lua_gettop(L);
    if (handled && lua_istable(L, t)) {
        lua_rawgeti(L, t, 1);
        t++;
    }
    const char *m = "unknown error";
    char num[32];
    if (lua_type(L, t) == LUA_TSTRING) {
        m = lua_tostring(L, t);
    } else if (lua_type(L, t) == LUA_TNUMBER) { /* lua_tostring would allocate */
        snprintf(num, sizeof num, "%.14g", (double)lua_tonumber(L, t));
        m = num;
    }
    size_t size = strlen(m) + 48;
    char *text = malloc(size);
    if (text)
        snprintf(text, size, "call %.14g: %s", (double)id, m);
    put_error_message(id, 0, text ? text : m);
    free(text);
}

/* After a call's frame (locked): writes the batch when it is big or old
 * enough, and unlocks the output. */
static void end_output(void)
{
    if ((pz_wout_bytes() >= FLUSH_BYTES || pz_wout_frames() >= FLUSH_FRAMES ||
         W.clock - pz_wout_oldest() >= FLUSH_NS) &&
        pz_wout_flush())
        W.clock = pz_now_ns();
    pz_wout_unlock();
}

static void handle_call(lua_State *L, const pz_frame *f)
{
    /* A remote worker writes what it has before each call: the parent,
     * which cannot see what it runs, charges a death to the oldest call it
     * has no answer for.  A local one leaves results to the batch (the
     * flusher bounds their wait); the parent charges a death to the call
     * the shared slot names, and runs again the calls whose results died
     * unwritten. */
    /* The clock is read again after a write: it may have waited, and the
     * time is nobody's call's (timeouts count from W.started). */
    if (W.remote && pz_wout_flush())
        W.clock = pz_now_ns();
    W.call = *f;
    W.ring_marked = 0;
    /* From decoding the arguments to encoding the result, whatever kills
     * this process is this call's doing: see pz_slot_shared. */
    /* Calls that run back to back share a clock reading: the end of one is
     * the start of the next (reading the clock is a visible share of a
     * tiny call's cost).  The start first, then the id: see pz_slot_shared. */
    W.started = W.clock ? W.clock : pz_now_ns();
    atomic_store_explicit(&W.shared->started, W.started, memory_order_relaxed);
    atomic_store_explicit(&W.shared->running, f->id, memory_order_release);
    /* run_call says where the executor's frames begin (and why there). */
    int chunk = (f->flags & PZ_CALL_CHUNK) != 0;
    W.in_executor = IN_CODEC;
    if (!chunk)
        lua_rawgeti(L, LUA_REGISTRYINDEX, W.handler_ref);
    lua_rawgeti(L, LUA_REGISTRYINDEX, W.run_ref);
    if (lua_pcall(L, 0, 0, chunk ? 0 : 1) != 0) {
        /* Unprotected from here on: no allocation from Lua (the error may
         * be that memory ran out, or may leave none to the report). */
        int raised = lua_gettop(L);
        int reported = 0;
        if (W.in_executor == IN_EXECUTOR) {
            /* Nothing of the call is in the output yet, nor is it locked. */
            lua_rawgeti(L, LUA_REGISTRYINDEX, W.report_ref);
            lua_pushvalue(L, raised);
            reported = lua_pcall(L, 1, 0, 0) == 0;
            lua_settop(L, raised);
        }
        if (!reported) {
            /* The codec raised (or reporting the executor's error did):
             * drop any partial frame, report why. */
            if (pz_wout_locked()) {
                pz_wout_truncate(W.mark, W.mark_frames);
            } else {
                pz_wout_lock();
            }
            if (W.ring_marked) /* the result's blocks: no frame names them */
                pz_ring_writer_rewind(&W.ring, &W.ring_mark);
            put_codec_error(L, f->id, !chunk);
        }
    }
    atomic_store_explicit(&W.shared->running, 0, memory_order_relaxed);
    lua_settop(L, 0);
    end_output();
}

/* ---- runs (run.h) --------------------------------------------------------
 *
 * A run's calls are made one after the other by one C loop inside one
 * protected call (run_calls), restarted after a call that raises: no
 * frame to parse, no protected call, no clock reading per call.  Each
 * result goes into the output as soon as its call returns, as a single
 * call's would, so that the flusher can write it while a long call runs
 * after it, and SIGTERM's write takes it along.  Results in a row share
 * one RESULT frame (PZ_RESULT_RUN), kept whole in the output after each
 * one and extended by the next while nothing has been written or
 * appended behind it.  The time of a run's calls is known only at its
 * end: each answer carries the worker's average so far (W.avg_ns), which
 * the run's end then updates. */

/* Whether the run answer at W.ans_at is still the output's last frame,
 * unwritten: the next result may join it. */
static int answer_open(void)
{
    return W.ans_at != SIZE_MAX && pz_wout_buf()->len == W.ans_end && pz_wout_writes() == W.ans_writes;
}

/* Room in the open run answer, or in a new one (locked), for call id's
 * result of at most max_len bytes: writes the id and returns where the
 * tuple's length goes, the tuple after it.  Until answer_put_done, the
 * answer is not whole (its length and count are the old ones): the
 * caller writes at most max_len bytes at the returned address + 4 and
 * calls answer_put_done before anything else touches the output and
 * before it unlocks.  NULL when memory ran out (the output may hold a new
 * answer of no calls: callers truncate to W.mark). */
static uint8_t *answer_put(uint64_t id, size_t max_len)
{
    pz_buf *out = pz_wout_buf();
    size_t item = PZ_VARINT_MAX_BYTES + 4 + max_len;
    size_t most = W.max_message < PZ_RUN_ANSWER_BYTES ? W.max_message : PZ_RUN_ANSWER_BYTES;
    if (!answer_open() || W.ans_n == UINT16_MAX ||
        out->len - W.ans_at - PZ_FRAME_HEADER + item > most) {
        if (!pz_buf_reserve(out, PZ_FRAME_HEADER + PZ_RUN_ANSWER_HEAD))
            return NULL;
        W.ans_at = out->len;
        W.ans_n = 0;
        out->len += PZ_FRAME_HEADER + PZ_RUN_ANSWER_HEAD;
        pz_frame_header(out->data + W.ans_at, PZ_F_RESULT, id, 0);
        pz_frame_set_flags(out->data + W.ans_at, PZ_RESULT_RUN);
        pz_wout_frame_done(W.clock, 0);
    }
    uint8_t *d = (uint8_t *)pz_buf_reserve(out, item);
    return d ? d + pz_put_varint(d, id) : NULL;
}

/* The item answer_put began, its tuple of `len` bytes written after the
 * length at d (its big strings took `shared` bytes of the ring): leaves
 * the answer whole. */
static void answer_put_done(uint8_t *d, size_t len, size_t shared)
{
    pz_buf *out = pz_wout_buf();
    pz_le32_put(d, (uint32_t)len);
    out->len = (size_t)((char *)d + 4 + len - out->data);
    pz_wout_add_shared(shared);
    /* Whole again: its length, its count, the time of each call. */
    char *h = out->data + W.ans_at;
    W.ans_n++;
    pz_le32_put(h + PZ_FO_LEN, (uint32_t)(out->len - W.ans_at - PZ_FRAME_HEADER));
    pz_run_answer_set_head(h + PZ_FRAME_HEADER, W.ans_n, (uint64_t)W.avg_ns);
    W.ans_end = out->len;
    W.ans_writes = pz_wout_writes();
}

/* Appends call id's result (its tuple: `len` bytes at `tuple`, whose big
 * strings took `shared` bytes of the ring) to the open run answer, or to
 * a new one.  Returns 0, or -1 when memory ran out (as answer_put). */
static int answer_append(uint64_t id, const void *tuple, size_t len, size_t shared)
{
    uint8_t *d = answer_put(id, len);
    if (!d)
        return -1;
    pz_copy_short(d + 4, tuple, len);
    answer_put_done(d, len, shared);
    return 0;
}

/* Appends call id's result, the one number x, encoded where it goes (no
 * tuple of its own to copy).  Returns as answer_append. */
static int answer_append_number(uint64_t id, double x)
{
    uint8_t *d = answer_put(id, PZ_NUMBER_TUPLE_MAX_BYTES);
    if (!d)
        return -1;
    answer_put_done(d, pz_put_number_tuple(d + 4, x), 0);
    return 0;
}

/* answer_append, raising when memory runs out. */
static void answer_add(lua_State *L, uint64_t id, const void *tuple, size_t len, size_t shared)
{
    if (answer_append(id, tuple, len, shared) != 0)
        luaL_error(L, "out of memory");
}

/* Names the run's call W.run_next in the shared memory (worker.h), when
 * there is one. */
static void name_run_call(void)
{
    if (W.run_next <= W.run_n)
        atomic_store_explicit(&W.shared->running, W.run[W.run_next - 1].id, memory_order_release);
}

/* wruns.h's answer: the run's call W.run_next returned the one number x.
 * Appends its result, moves to the next call and names it.  Returns 0, or
 * -1 when memory ran out (the output as it was, the call still current).
 * Called by the compiled helper through the FFI: it must not raise. */
static int answer_number(double x)
{
    if (W.fail_answer_in > 0 && --W.fail_answer_in == 0)
        return -1;
    pz_wout_lock();
    mark_output();
    if (answer_append_number(W.run[W.run_next - 1].id, x) != 0) {
        pz_wout_truncate(W.mark, W.mark_frames);
        W.ans_at = SIZE_MAX;
        pz_wout_unlock();
        return -1;
    }
    pz_wout_unlock();
    W.run_next++;
    name_run_call();
    return 0;
}

/* Appends the result of the run's call `id`, the `nres` values above
 * `base` (locks, then unlocks): into the run's answer, but for one above
 * PZ_RUN_ANSWER_ITEM_MAX bytes, which gets a RESULT frame of its own, and
 * one above max_message, which becomes its call's error.  Raises when the
 * encode does (unlocked) or memory runs out (locked, W.mark marking where
 * the output stood). */
static void put_run_result(lua_State *L, uint64_t id, int base, int nres)
{
    if (nres == 1 && lua_type(L, base + 1) == LUA_TNUMBER) {
        /* One number, the commonest result: no encoder, no ring, and
         * always within max_message (1 KiB at least). */
        double x = lua_tonumber(L, base + 1);
        pz_wout_lock();
        mark_output();
        if (answer_append_number(id, x) != 0)
            luaL_error(L, "out of memory");
        pz_wout_unlock();
        return;
    }
    W.item.len = 0;
    W.ring_marked = 0;
    if (W.writer) {
        W.writer->placed = 0;
        W.ring_mark = pz_ring_writer_mark(&W.ring);
        W.ring_marked = 1;
    }
    pz_encode_tuple(L, base + 1, nres, &W.item, "result", 0, W.writer);
    size_t shared = W.writer ? W.writer->placed : 0;
    uint64_t ns = (uint64_t)W.avg_ns;
    pz_wout_lock();
    mark_output();
    if (W.item.len + shared > W.max_message) {
        if (W.writer)
            pz_ring_writer_rewind(&W.ring, &W.ring_mark);
        lua_pushfstring(L, "the result of call %f is %f bytes, above max_message (%f)", (double)id,
                        (double)(W.item.len + shared), (double)W.max_message);
        put_error_message(id, ns, lua_tostring(L, -1));
    } else if (W.item.len > PZ_RUN_ANSWER_ITEM_MAX) {
        uint8_t v[PZ_VARINT_MAX_BYTES];
        pz_part parts[] = {{v, pz_put_varint(v, ns), 0}, {W.item.data, W.item.len, 0}};
        pz_buf *out = pz_wout_buf();
        char *d = pz_buf_reserve(out, PZ_FRAME_HEADER + pz_frame_parts_len(parts, 2));
        if (!d)
            luaL_error(L, "out of memory");
        out->len += pz_frame_put(d, PZ_F_RESULT, id, parts, 2);
        pz_wout_frame_done(W.clock, shared);
    } else {
        answer_add(L, id, W.item.data, W.item.len, shared);
    }
    W.ring_marked = 0;
    pz_wout_unlock();
}

/* Calls in a row the helper must have made for the run's next call that
 * it could take to go to it again: asking costs about one call's time. */
#define RUN_HELPER_STRETCH 8

/* Run calls the C loop makes before the helper is asked: loading it and
 * the FFI costs a worker about 60 us, the time of some 2,000 tiny calls,
 * and 256 workers sharing 200,000 calls (780 each) lost a third of
 * their throughput to it when each loaded it at its first run. */
#define HELPER_AFTER 4096

/* Whether call c's argument tuple is one number (what wruns.h's helper
 * takes, but for the values it leaves to C). */
static int one_number_args(const pz_run_item *c)
{
    if (c->len < 2 || c->args[0] != 1)
        return 0;
    uint8_t t = (uint8_t)c->args[1];
    return t >= PZ_T_FIXINT || t == PZ_T_DOUBLE || t == PZ_T_POSINT || t == PZ_T_NEGINT;
}

/* Protected, the executor at 1: makes the run's calls from W.run_next to
 * W.run_n, each named in the shared memory first (worker.h), and puts
 * each one's result in the output.  A raise leaves W.run_next at the call
 * that failed, and W.in_executor saying whether its executor raised. */
static int run_calls(lua_State *L)
{
    int base = lua_gettop(L);
    name_run_call();
    while (W.run_next <= W.run_n) {
        const pz_run_item *c = &W.run[W.run_next - 1];
        if (W.run_helper && W.c_run_calls >= HELPER_AFTER && one_number_args(c)) {
            size_t from = W.run_next;
            W.in_executor = IN_EXECUTOR;
            W.in_helper = 1;
            int made = pz_wruns_make(L, 1, W.run, W.run_next, W.run_n);
            W.in_helper = 0;
            W.in_executor = IN_CODEC;
            /* C makes the rest of the run when the helper made too few
             * calls to pay for asking (or is off). */
            if (made == PZ_WRUNS_OFF || W.run_next - from < RUN_HELPER_STRETCH)
                W.run_helper = 0;
            if (made == PZ_WRUNS_VALUES) {
                put_run_result(L, W.run[W.run_next - 1].id, base, lua_gettop(L) - base);
                lua_settop(L, base);
                W.run_next++;
                name_run_call();
                continue;
            }
            if (made == PZ_WRUNS_NO_MEMORY)
                luaL_error(L, "out of memory");
            /* Stopped: C makes the call it stopped at. */
            if (W.run_next > W.run_n)
                break;
            c = &W.run[W.run_next - 1];
        }
        lua_pushvalue(L, 1);
        int nargs = pz_decode_tuple(L, c->args, c->len, PZ_DECODE_FUNCTIONS, W.reader);
        W.in_executor = IN_EXECUTOR;
        lua_call(L, nargs, LUA_MULTRET);
        W.in_executor = IN_CODEC;
        put_run_result(L, c->id, base, lua_gettop(L) - base);
        lua_settop(L, base);
        W.run_next++;
        W.c_run_calls++;
        name_run_call();
    }
    return 0;
}

/* Protected: appends the ERROR frame of the run's call W.run_next, whose
 * executor raised the error at 1 (locked). */
static int report_run_error(lua_State *L)
{
    uint64_t id = W.run[W.run_next - 1].id, ns = (uint64_t)W.avg_ns;
    if (lua_istable(L, 1)) {
        put_error_from_table(L, id, ns);
    } else {
        const char *m = lua_tostring(L, 1);
        put_error_message(id, ns, m ? m : "error in the error handler");
    }
    return 0;
}

/* The run's call W.run_next failed with the error on top (on_error's
 * table, or a bare message): its ERROR frame, as handle_call writes
 * one.  Unprotected: nothing here allocates from Lua. */
static void report_run_failure(lua_State *L)
{
    uint64_t id = W.run[W.run_next - 1].id;
    int raised = lua_gettop(L);
    if (W.in_executor == IN_EXECUTOR) {
        pz_wout_lock();
        mark_output();
        lua_rawgeti(L, LUA_REGISTRYINDEX, W.run_error_ref);
        lua_pushvalue(L, raised);
        if (lua_pcall(L, 1, 0, 0) == 0) {
            pz_wout_unlock();
            return;
        }
        lua_settop(L, raised);
        pz_wout_truncate(W.mark, W.mark_frames);
        W.ans_at = SIZE_MAX; /* it may have begun after the mark */
    } else if (pz_wout_locked()) {
        pz_wout_truncate(W.mark, W.mark_frames); /* a result cut short */
        W.ans_at = SIZE_MAX;
    } else {
        pz_wout_lock();
    }
    if (W.ring_marked) /* the result's blocks: no frame names them */
        pz_ring_writer_rewind(&W.ring, &W.ring_mark);
    W.ring_marked = 0;
    put_codec_error(L, id, 1);
    pz_wout_unlock();
}

/* Makes room for a run of n calls in W.run. */
static void run_room(size_t n)
{
    if (n <= W.run_cap)
        return;
    pz_run_item *calls = realloc(W.run, n * sizeof *calls);
    if (!calls)
        die("out of memory (a run of calls)");
    W.run = calls;
    W.run_cap = n;
}

/* A run (run.h): its calls made by run_calls, each answered in order. */
static void handle_run(lua_State *L, const pz_frame *f)
{
    pz_run_reader r;
    uint64_t n = pz_run_open(&r, f->payload, f->len);
    if (n == 0)
        die("a malformed run of calls from the parent");
    run_room((size_t)n);
    for (uint64_t k = 0; k < n; k++)
        if (pz_run_next(&r, &W.run[k]) != 0)
            die("a malformed run of calls from the parent");
    W.run_n = (size_t)n;
    /* The start first, then the id: see pz_slot_shared (no timeout reads
     * a run's, but a death is charged by the id). */
    int64_t t0 = W.clock ? W.clock : pz_now_ns();
    W.clock = t0; /* what the run's answers are dated (the flusher's alarm) */
    atomic_store_explicit(&W.shared->started, t0, memory_order_relaxed);
    W.run_helper = W.helper_ready;
    for (W.run_next = 1; W.run_next <= W.run_n; W.run_next++) {
        W.in_executor = IN_CODEC;
        lua_rawgeti(L, LUA_REGISTRYINDEX, W.handler_ref);
        lua_rawgeti(L, LUA_REGISTRYINDEX, W.run_calls_ref);
        lua_rawgeti(L, LUA_REGISTRYINDEX, W.exec_ref);
        int rc = lua_pcall(L, 1, 0, 1);
        if (rc == 0)
            break;
        /* Memory ran out in the helper: in the executor or in the
         * helper's own work (interpreted, it allocates as it reads), which
         * cannot be told apart; the call has the error, and C makes every
         * call from then on, as it did before the helper (turned off for
         * the run only, it made the first call of each later run fail
         * while memory stayed short). */
        if (rc == LUA_ERRMEM && W.in_helper)
            W.run_helper = W.helper_ready = 0;
        W.in_helper = 0;
        report_run_failure(L);
        lua_settop(L, 0);
    }
    lua_settop(L, 0);
    atomic_store_explicit(&W.shared->running, 0, memory_order_relaxed);
    W.clock = pz_now_ns();
    W.avg_ns = pz_run_average(W.avg_ns, (double)(W.clock - t0) / (double)n, n);
    pz_wout_lock();
    end_output();
}

/* SIGINT and SIGQUIT in a worker: see pz_worker_signals. */
static void leave_to_parent(int sig)
{
    (void)sig;
}

int pz_worker_signals(void)
{
    sigset_t none;
    sigemptyset(&none);
    for (int sig = 1; sig < NSIG; sig++)
        if (sig != SIGKILL && sig != SIGSTOP)
            signal(sig, SIG_DFL);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = leave_to_parent;
    sa.sa_flags = SA_RESTART;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGINT, &sa, NULL) != 0 || sigaction(SIGQUIT, &sa, NULL) != 0)
        return -1;
    return sigprocmask(SIG_SETMASK, &none, NULL);
}

/* Kills what the executor left running in this worker's process group
 * (the spawner made the worker its leader): a process group cannot be
 * signalled but for one member, so the worker first moves to its parent's
 * group.  Done before lua_close, whose finalizers would otherwise wait on
 * them (an unclosed io.popen waits for its program to end). */
static void kill_leftovers(void)
{
    pid_t me = getpid();
    if (getpgrp() != me || setpgid(0, getpgid(getppid())) != 0)
        return; /* not a leader, or the spawner is gone: it kills the group */
    kill(-me, SIGKILL);
}

/* Sends what close returned (on top of the stack) in a CLOSED frame, for
 * p.closed: lossily encoded, nothing when even that fails. */
static void send_closed(lua_State *L)
{
    int top = lua_gettop(L);
    W.scratch.len = 0;
    lua_pushcfunction(L, encode_error_value); /* a lossy encode of any value */
    lua_pushlightuserdata(L, &W.scratch);
    lua_pushvalue(L, top);
    if (lua_pcall(L, 2, 0, 0) == 0) {
        pz_part part = {W.scratch.data, W.scratch.len, 0};
        pz_wout_lock();
        put_frame(PZ_F_CLOSED, 0, &part, 1);
        pz_wout_unlock();
        pz_wout_flush();
    }
    lua_settop(L, top);
}

/* Calls executor:close() if the executor has such a method (its return
 * value goes to the parent), kills what it left running (when asked to),
 * then leaves. */
static _Noreturn void shut_down(lua_State *L)
{
    pz_wout_flush();
    if (L && W.exec_ref != LUA_NOREF) {
        lua_rawgeti(L, LUA_REGISTRYINDEX, W.exec_ref);
        if (lua_type(L, -1) == LUA_TTABLE || lua_type(L, -1) == LUA_TUSERDATA) {
            lua_getfield(L, -1, "close");
            if (lua_isfunction(L, -1)) {
                lua_insert(L, -2);
                if (lua_pcall(L, 1, 1, 0) != 0) {
                    fprintf(stderr, "parallelize: worker %d: close failed: %s\n", W.slot + 1,
                            lua_tostring(L, -1));
                } else {
                    send_closed(L);
                }
            }
        }
    }
    if (W.kill_leftovers)
        kill_leftovers();
    if (L)
        lua_close(L);
    fflush(NULL);
    _exit(0);
}

/* Reads what the parent sent, waiting for it: polling first while waits
 * are usually short (spin.h), so that the next call of a quick series finds
 * the worker awake. */
static ssize_t read_input(void *p, size_t cap)
{
    int64_t start = pz_now_ns(), until = pz_spin_until(&W.spin, start);
    ssize_t n;
    for (;;) {
        if (until == 0) {
            n = pz_read(W.in_fd, p, cap);
            break;
        }
        n = recv(W.in_fd, p, cap, MSG_DONTWAIT);
        if (n >= 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR))
            break;
        /* Polls on though another thread may want the CPU: see
         * pz_spin_yield for why a worker does not stop then. */
        if (pz_now_ns() >= until)
            until = 0;
        else
            sched_yield();
    }
    int err = errno;
    W.clock = pz_now_ns(); /* the next call starts now */
    pz_spin_note(&W.spin, W.clock - start);
    errno = err;
    return n;
}

/* What the parent has sent already, without waiting: a local worker's
 * socket read with MSG_DONTWAIT.  Returns the bytes read, or 0 when none
 * have come or the worker is remote (its input may be a pipe, and it
 * writes its results before each call anyway); end of file and errors are
 * left to the read that waits, which sees them again. */
static ssize_t read_ready(void *p, size_t cap)
{
    if (W.remote)
        return 0;
    ssize_t n = recv(W.in_fd, p, cap, MSG_DONTWAIT);
    return n > 0 ? n : 0;
}

/* Returns the next whole frame, reading (and, before a read that would
 * wait, writing the results) when none is buffered.  Ends the process on
 * end of file. */
static pz_frame next_frame(void)
{
    for (;;) {
        pz_frame f;
        size_t need = 0;
        const char *why = NULL;
        int r = pz_frame_parse(W.in.data + W.in_pos, W.in.len - W.in_pos, W.max_message + PZ_FRAME_SLACK, &f,
                               &need, &why);
        if (r == PZ_PARSE_OK) {
            W.in_pos += f.size;
            return f;
        }
        if (r == PZ_PARSE_BAD)
            die(why);
        pz_buf_consume(&W.in, W.in_pos);
        W.in_pos = 0;
        size_t want = need > W.in.len + READ_CHUNK ? need - W.in.len : READ_CHUNK;
        if (!pz_buf_reserve(&W.in, want))
            die("out of memory");
        /* Calls the parent has sent already: the batch stays open (its
         * own rules in handle_call write it).  Only a read that would wait
         * writes it first, since the parent may be waiting for it. */
        ssize_t n = read_ready(W.in.data + W.in.len, W.in.cap - W.in.len);
        if (n > 0) {
            W.in.len += (size_t)n;
            continue;
        }
        pz_wout_flush_idle();
        n = read_input(W.in.data + W.in.len, W.in.cap - W.in.len);
        /* ECONNRESET: the parent died with bytes of ours unread, which a
         * SIGKILL leaves as often as not; its end all the same. */
        if (n == 0 || (n < 0 && errno == ECONNRESET))
            shut_down(W.L);
        if (n < 0) {
            char what[160];
            snprintf(what, sizeof what, "reading calls from the parent: %s", strerror(errno));
            die(what);
        }
        W.in.len += (size_t)n;
    }
}

/* Protected: turns "mod.sub.name" into the executor it names: the longest
 * prefix that `require` finds, then fields for the rest. */
static int require_by_name(lua_State *L)
{
    const char *name = lua_tostring(L, 1);
    size_t len = strlen(name);
    for (size_t cut = len; cut > 0; cut--) {
        if (cut < len && name[cut] != '.')
            continue;
        lua_settop(L, 1);
        lua_pushlstring(L, name, cut);                                  /* 2: prefix */
        lua_pushfstring(L, "module '%s' not found", lua_tostring(L, 2)); /* 3 */
        lua_getglobal(L, "require");
        lua_pushvalue(L, 2);
        if (lua_pcall(L, 1, 1, 0) != 0) {
            /* Not found: a shorter prefix may be the module. */
            const char *err = lua_tostring(L, -1);
            if (err && strstr(err, lua_tostring(L, 3)) && memchr(name, '.', cut))
                continue;
            return lua_error(L);
        }
        for (const char *p = name + cut; *p == '.';) {
            const char *q = strchr(p + 1, '.');
            size_t n = q ? (size_t)(q - p - 1) : strlen(p + 1);
            if (!lua_istable(L, -1) && !lua_isuserdata(L, -1))
                return luaL_error(L, "'%s' is not a module field: '%s' is a %s", name,
                                  lua_tostring(L, 2), luaL_typename(L, -1));
            lua_pushlstring(L, p + 1, n);
            lua_gettable(L, -2);
            p += 1 + n;
        }
        return 1;
    }
    return luaL_error(L, "module '%s' not found", name);
}

static int is_callable(lua_State *L, int idx)
{
    if (lua_isfunction(L, idx))
        return 1;
    if (!luaL_getmetafield(L, idx, "__call"))
        return 0;
    lua_pop(L, 1);
    return 1;
}

/* A remote worker leads a process group (remote.c), so that what its
 * executor leaves running can be killed with it; with kill_leftovers off
 * it joins its supervisor's group instead, where nothing kills it. */
static void leave_own_group(void)
{
    if (getpgrp() == getpid() && setpgid(0, getpgid(getppid())) != 0)
        die("cannot leave its own process group (kill_leftovers = false)");
}

/* package[name] = the parent's package[name] (settings table at 1,
 * package on top).  A remote worker keeps its own after the parent's: the
 * parent's directories may not exist on its host, and its own installation
 * (LUA_PATH, pzlua's built-in modules) should still be found. */
static void set_search_path(lua_State *L, const char *name)
{
    lua_getfield(L, 1, name);
    if (W.remote && lua_type(L, -1) == LUA_TSTRING) {
        lua_pushliteral(L, ";");
        lua_getfield(L, -3, name);
        if (lua_type(L, -1) == LUA_TSTRING)
            lua_concat(L, 3);
        else
            lua_pop(L, 2);
    }
    lua_setfield(L, -2, name);
}

/* Protected: reads the INIT frame's payload, sets package paths, builds the
 * executor, stores it in the registry.  Raises {message, traceback}-style
 * errors through on_error when user code fails. */
static int build_executor(lua_State *L)
{
    const pz_frame *f = lua_touserdata(L, 1);
    const char *part, *spec, *args;
    size_t partlen, speclen, argslen;
    if (pz_split_prefixed(f->payload, f->len, &part, &partlen, &spec, &speclen) != 0 ||
        pz_split_prefixed(spec, speclen, &spec, &speclen, &args, &argslen) != 0)
        return luaL_error(L, "malformed INIT frame");
    lua_settop(L, 0);
    pz_decode_value(L, part, partlen, PZ_DECODE_FUNCTIONS); /* 1: the settings (frame.h) */
    if (!lua_istable(L, 1))
        return luaL_error(L, "malformed INIT frame");
    lua_getfield(L, 1, "spin_ns");
    /* Polling for input that comes over a network would only burn CPU. */
    W.spin.budget_ns = W.remote ? 0 : (int64_t)lua_tonumber(L, -1);
    lua_getfield(L, 1, "max_message");
    W.max_message = (size_t)lua_tonumber(L, -1);
    lua_getfield(L, 1, "kill_leftovers");
    W.kill_leftovers = lua_toboolean(L, -1);
    if (W.remote && !W.kill_leftovers)
        leave_own_group();
    lua_getglobal(L, "package");
    set_search_path(L, "path");
    set_search_path(L, "cpath");
    lua_settop(L, 1);
    lua_getfield(L, 1, "kind"); /* 2 */
    lua_pushcfunction(L, on_error);
    lua_replace(L, 1);
    /* stack: on_error, kind; the spec is decoded only now that
     * package.path is set, since decoding it may require modules. */
    pz_decode_value(L, spec, speclen, PZ_DECODE_FUNCTIONS);
    int nargs = pz_decode_tuple(L, args, argslen, PZ_DECODE_FUNCTIONS, NULL);
    int base = lua_gettop(L) - nargs; /* the spec's index */
    lua_createtable(L, nargs, 1);
    for (int i = 1; i <= nargs; i++) {
        lua_pushvalue(L, base + i);
        lua_rawseti(L, -2, i);
    }
    lua_pushinteger(L, nargs);
    lua_setfield(L, -2, "n");
    lua_insert(L, base + 1);
    lua_settop(L, base + 1);
    /* stack: on_error, kind, spec, args */
    const char *kind = lua_tostring(L, 2);
    int rc = 0;
    if (kind && strcmp(kind, "module") == 0) {
        lua_pushcfunction(L, require_by_name);
        lua_pushvalue(L, 3);
        rc = lua_pcall(L, 1, 1, 1);
    } else if (kind && strcmp(kind, "deferred") == 0) {
        lua_pushvalue(L, 3);
        int n = 0;
        if (lua_istable(L, 4)) {
            lua_getfield(L, 4, "n");
            n = (int)lua_tointeger(L, -1);
            lua_pop(L, 1);
        }
        luaL_checkstack(L, n + 1, "too many constructor arguments");
        for (int i = 1; i <= n; i++)
            lua_rawgeti(L, 4, i);
        rc = lua_pcall(L, n, 1, 1);
    } else {
        lua_pushvalue(L, 3);
    }
    if (rc != 0)
        return lua_error(L); /* the {message, traceback} table */
    if (!is_callable(L, -1)) {
        const char *what = lua_isnil(L, -1) ? "nil" : luaL_typename(L, -1);
        if (kind && strcmp(kind, "deferred") == 0)
            lua_pushfstring(L, "the Deferred constructor returned %s, which is not callable", what);
        else if (kind && strcmp(kind, "module") == 0)
            lua_pushfstring(L, "'%s' names %s, which is not callable", lua_tostring(L, 3), what);
        else
            lua_pushfstring(L, "the executor is %s, which is not callable", what);
        lua_createtable(L, 2, 0);
        lua_insert(L, -2);
        lua_rawseti(L, -2, 1);
        return lua_error(L);
    }
    W.exec_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    return 0;
}

/* Protected: the lossy copy of the executor that INIT_OK carries. */
static int encode_copy(lua_State *L)
{
    pz_buf *b = lua_touserdata(L, 1);
    lua_rawgeti(L, LUA_REGISTRYINDEX, W.exec_ref);
    pz_encode_value(L, -1, b, "executor", PZ_ENCODE_LOSSY);
    return 0;
}

/* Answers INIT_ERROR with msg and the traceback tb (a remote worker's
 * message starting with its host name, so that the user knows which host
 * lacks a module or runs another version), then leaves. */
static _Noreturn void refuse_init(lua_State *L, const char *msg, size_t mlen, const char *tb,
                                  size_t tlen)
{
    char whose[256];
    if (W.remote) {
        lua_pushfstring(L, "host %s: ", W.host);
        lua_pushlstring(L, msg, mlen);
        lua_concat(L, 2);
        msg = lua_tolstring(L, -1, &mlen);
    } else if (strlen(msg) == mlen) {
        /* A constructor that ran out of memory: the parent says "not
         * enough memory" of its own too.  (A remote one's host says whose.) */
        msg = pz_worker_whose_memory(msg, whose, sizeof whose);
        mlen = strlen(msg);
    }
    if (!tb)
        tlen = 0;
    fit_error(1, &mlen, &tlen, NULL); /* the message's length */
    pz_part parts[] = {{msg, mlen, 1}, {tb, tlen, 0}};
    put_frame(PZ_F_INIT_ERROR, (uint64_t)getpid(), parts, 2);
    W.exec_ref = LUA_NOREF;
    pz_wout_flush();
    lua_close(L);
    fflush(NULL);
    _exit(0);
}

static void initialize(lua_State *L)
{
    pz_frame f = next_frame();
    if (f.type == PZ_F_STOP)
        shut_down(L);
    if (f.type != PZ_F_INIT)
        die("the first frame was not INIT");
    /* Nothing codec-encoded is read before the versions are known to
     * match (handshake.h). */
    pz_versions mine;
    char why[512];
    pz_versions_of(L, &mine);
    if (pz_handshake_check(&f.payload, &f.len, &mine, why, sizeof why) != 0)
        refuse_init(L, why, strlen(why), NULL, 0);
    lua_pushcfunction(L, build_executor);
    lua_pushlightuserdata(L, &f);
    if (lua_pcall(L, 1, 0, 0) != 0) {
        size_t mlen = 0, tlen = 0;
        const char *msg, *tb = NULL;
        if (lua_istable(L, -1)) {
            lua_rawgeti(L, -1, 1);
            lua_rawgeti(L, -2, 2);
            tb = lua_tolstring(L, -1, &tlen);
            msg = lua_tolstring(L, -2, &mlen);
        } else {
            msg = lua_tolstring(L, -1, &mlen);
        }
        if (!msg) {
            msg = "initialization failed";
            mlen = strlen(msg);
        }
        refuse_init(L, msg, mlen, tb, tlen);
    }
    lua_settop(L, 0);
    pz_buf copy = PZ_BUF_INIT;
    lua_pushcfunction(L, encode_copy);
    lua_pushlightuserdata(L, &copy);
    if (lua_pcall(L, 1, 0, 0) != 0) {
        copy.len = 0;
        /* null: the copy is only informative */
        pz_buf_append(&copy, &(char){PZ_T_NULL}, 1);
    }
    lua_settop(L, 0);
    if (copy.len > UINT32_MAX)
        copy.len = 0;
    pz_part part = {copy.data, copy.len, 0};
    put_frame(PZ_F_INIT_OK, (uint64_t)getpid(), &part, 1);
    pz_buf_free(&copy);
    pz_wout_flush();
    /* W.clock is when INIT was read: the first call, if it is in the
     * socket before the next read would wait, must not start its clock
     * then (building the executor is no call's time): it reads the clock
     * itself (handle_call). */
    W.clock = 0;
}

int pz_worker_fail_answer(lua_State *L)
{
    W.fail_answer_in = (long)luaL_checkinteger(L, 1);
    return 0;
}

/* Protected: takes the standard functions wruns.h's helper will use,
 * before the executor's code runs (the helper is compiled when first
 * asked: run_calls, HELPER_AFTER). */
static int prepare_runs(lua_State *L)
{
    pz_wruns_prepare(L, answer_number);
    return 0;
}

_Noreturn void pz_worker_main(int in_fd, int out_fd, int slot, pz_slot_shared *shared,
                              const pz_arena *arena, int record, void (*setup)(lua_State *L),
                              int remote)
{
    /* A worker of a pool made inside a worker inherits that worker's state
     * through two forks: start from nothing (the inherited buffers are
     * copies nobody else uses). */
    memset(&W, 0, sizeof W);
    W.in_fd = in_fd;
    W.remote = remote;
    if (remote && gethostname(W.host, sizeof W.host - 1) != 0)
        snprintf(W.host, sizeof W.host, "(unknown host: %s)", strerror(errno));
    pz_wout_init(out_fd);
    W.slot = slot;
    W.shared = shared;
    if (arena) {
        W.arena_in = (pz_arena_reader){arena->base, arena->size, 0, 0};
        W.reader = &W.arena_in;
        W.writer = pz_ring_writer_init(&W.ring, arena, record, shared);
    }
    W.exec_ref = LUA_NOREF;
    W.ans_at = SIZE_MAX;
    W.max_message = UINT32_MAX - PZ_FRAME_SLACK; /* until INIT says otherwise */
    /* Output of many workers interleaves line by line, as a user expects. */
    setvbuf(stdout, NULL, _IOLBF, 0);
    lua_State *L = pz_new_state();
    if (!L)
        die("cannot create a Lua state: out of memory");
    W.L = L;
    luaL_openlibs(L);
    setup(L);
    lua_pushcfunction(L, prepare_runs);
    W.helper_ready = lua_pcall(L, 0, 0, 0) == 0; /* else the C loop makes every call */
    lua_settop(L, 0);
    initialize(L);
    pz_wout_start_flusher();
    lua_pushcfunction(L, on_error);
    W.handler_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_pushcfunction(L, run_call);
    W.run_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_pushcfunction(L, report_executor_error);
    W.report_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_pushcfunction(L, run_calls);
    W.run_calls_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_pushcfunction(L, report_run_error);
    W.run_error_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    for (;;) {
        pz_frame f = next_frame();
        if (f.type == PZ_F_CALL && (f.flags & PZ_CALL_RUN))
            handle_run(L, &f);
        else if (f.type == PZ_F_CALL)
            handle_call(L, &f);
        else if (f.type == PZ_F_STOP)
            shut_down(L);
        else
            die("unexpected frame type from the parent");
    }
}
