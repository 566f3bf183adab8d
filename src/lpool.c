/*
 * lpool.c - the pool as Lua sees it: a full userdata whose __call queues a
 * call (lsubmit.c), and the functions the Lua layer
 * (lua/parallelize/pool.lua) builds the pool's methods from.  Each function
 * checks its arguments, calls pool.c and pushes what it returns; the
 * policy (defaults, option ranges, messages about misuse) is the Lua
 * layer's.  What records become is in lrecords.c, the INIT payloads in
 * linit.c.  Main thread only.
 *
 * Re-entrancy.  Lua code can run inside these functions: a __gc finalizer
 * (a collection can start at any allocation), a function environment's
 * __index while arguments are encoded, or the top-level code of a module
 * that a decoded value names.  If that code uses the same pool:
 *   - p(...) works: a call made while another is encoding its arguments
 *     encodes into a buffer of its own, and each is queued whole;
 *   - reading the pool while it drains records sees the tables as they are
 *     (a nested drain does nothing);
 *   - stopping while p(...) encodes works, and that p(...) then raises
 *     "the pool is stopped" (its encode uses nothing of the pool);
 *   - waiting or stopping while records are drained, and stopping while a
 *     map encodes a chunk (into the pool's shared memory), raise "the
 *     pool is busy: ..." instead of corrupting the pool or waiting
 *     forever.
 *
 * Everything malloc'ed is owned by a userdata, so an error raised while
 * encoding (an argument that cannot travel) leaks nothing.
 */
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>
#include <lua.h>

#include "arena.h"
#include "codec.h"
#include "frame.h"
#include "handshake.h"
#include "ldefer.h"
#include "lpool.h"
#include "pool.h"
#include "sys.h"

/* Largest max_message.  Frame lengths are 32 bits, and the largest record,
 * an error carrying its call's arguments and a message from the worker,
 * holds two messages and a few varints: 2 GiB less 1 KiB each fits.
 * parallelize.lua reads it as core.max_message_limit. */
#define MAX_MESSAGE_LIMIT (2147483648.0 - 1024)

/* What pool workers run to prepare their Lua states (pz_lpool_register). */
static pz_state_setup worker_setup;

/* Returns the pool userdata at idx, or raises; raises too in a process
 * forked from the one that made the pool (pool.h's `forked`): its I/O
 * thread and workers are that process's, and its locks may be held by a
 * thread this process does not have. */
static lpool *to_lpool(lua_State *L, int idx)
{
    lpool *u = (lpool *)luaL_checkudata(L, idx, PZ_POOL_MT);
    if (u->pool && u->pool->forked)
        luaL_error(L, "the pool belongs to process %d, which made it: this process is a fork "
                      "of it, and cannot use it (make a pool of its own)",
                   (int)u->pool->owner);
    return u;
}

lpool *pz_lpool_check_running(lua_State *L, int idx)
{
    lpool *u = to_lpool(L, idx);
    if (!u->pool || u->pool->stopped)
        luaL_error(L, "the pool is stopped");
    return u;
}

/* The deadline (pz_now_ns) that the optional number of seconds at idx
 * sets, or -1 for none.  The Lua layer has checked it; what it did not
 * check (a negative number, NaN) counts as no time at all. */
static int64_t deadline_from(lua_State *L, int idx)
{
    if (lua_isnoneornil(L, idx))
        return -1;
    double t = luaL_checknumber(L, idx);
    return pz_now_ns() + (int64_t)((t > 0 ? fmin(t, 1e9) : 0) * 1e9);
}

void pz_lpool_check_not_draining(lua_State *L, const lpool *u, const char *what)
{
    if (u->draining)
        luaL_error(L, "the pool is busy: %s called while the pool turns results into Lua values "
                      "(from a __gc finalizer or a module's top-level code); call it afterwards",
                   what);
}

static void free_init(lpool *u)
{
    pz_pool_free_launch(u->launch, u->ninit);
    u->launch = NULL;
    if (!u->init)
        return;
    for (int i = 0; i < u->ninit; i++)
        pz_buf_free(&u->init[i]);
    free(u->init);
    u->init = NULL;
    u->ninit = 0;
}

/* ------------------------------------------------------------------------
 * Creating a pool
 * --------------------------------------------------------------------- */

/* Reads numeric option `name` of the options table at 2.  The Lua layer
 * has checked its range; a caller bypassing it gets a terse error. */
static double opt_number(lua_State *L, const char *name)
{
    lua_getfield(L, 2, name);
    if (lua_type(L, -1) != LUA_TNUMBER)
        luaL_error(L, "internal: option %s is not a number", name);
    double v = lua_tonumber(L, -1);
    lua_pop(L, 1);
    return v;
}

static int opt_bool(lua_State *L, const char *name)
{
    lua_getfield(L, 2, name);
    int v = lua_toboolean(L, -1);
    lua_pop(L, 1);
    return v;
}

/* The tables of a pool's environment (lrecords.c says what each holds). */
static const char *const env_tables[] = {"results", "ids", "errors", "extras", "unclaimed",
                                         "executors", "pids", "init_errors", "claims", "closed"};

/* Reads the launcher of slot i (1-based) from field `launcher` of the
 * spec table on top of the stack, when it has one: an array of strings,
 * the argv of the command that starts the slot's worker elsewhere (the Lua
 * layer has checked it). */
static void read_launcher(lua_State *L, lpool *u, int i)
{
    lua_getfield(L, -1, "launcher");
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        return;
    }
    luaL_checktype(L, -1, LUA_TTABLE);
    int argc = (int)lua_objlen(L, -1);
    luaL_argcheck(L, argc >= 1, 1, "a launcher needs a command");
    if (!u->launch && !(u->launch = calloc((size_t)u->ninit, sizeof *u->launch)))
        luaL_error(L, "cannot start the pool: out of memory");
    char **argv = calloc((size_t)argc + 1, sizeof *argv);
    if (!argv)
        luaL_error(L, "cannot start the pool: out of memory");
    u->launch[i - 1] = argv; /* owned from here: freed with u->launch */
    for (int k = 1; k <= argc; k++) {
        lua_rawgeti(L, -1, k);
        size_t len;
        const char *a = lua_tolstring(L, -1, &len);
        if (lua_type(L, -1) != LUA_TSTRING || strlen(a) != len)
            luaL_error(L, "internal: launcher word %d of executor %d is not a string", k, i);
        if (!(argv[k - 1] = strdup(a)))
            luaL_error(L, "cannot start the pool: out of memory");
        lua_pop(L, 1);
    }
    lua_pop(L, 1);
}

/* core.pool_new(specs, options) -> pool.  specs: an array of
 * {kind =, spec =, args =, launcher =}, one per worker; options: every
 * option set, checked by the Lua layer (max_pending: 0 for none). */
static int l_pool_new(lua_State *L)
{
    pz_options o;
    luaL_checktype(L, 1, LUA_TTABLE);
    luaL_checktype(L, 2, LUA_TTABLE);
    int n = (int)lua_objlen(L, 1);
    if (n < 1)
        return luaL_error(L, "a pool needs at least one executor");
    o.max_deaths = (int)opt_number(L, "max_deaths");
    o.respawn = opt_bool(L, "respawn");
    double max_message = opt_number(L, "max_message");
    luaL_argcheck(L, max_message >= 1024 && max_message <= MAX_MESSAGE_LIMIT, 2,
                  "max_message out of range");
    o.max_message = (uint32_t)max_message;
    double max_inflight = opt_number(L, "max_inflight");
    luaL_argcheck(L, max_inflight >= 1 && max_inflight <= UINT32_MAX, 2, "max_inflight out of range");
    o.max_inflight = (uint32_t)max_inflight;
    o.window_ns = (int64_t)(opt_number(L, "window") * 1e9);
    o.init_attempts = (int)opt_number(L, "init_attempts");
    o.kill_grace_ns = (int64_t)(opt_number(L, "kill_grace") * 1e9);
    o.spin_ns = (int64_t)(opt_number(L, "spin") * 1e9);
    o.kill_leftovers = opt_bool(L, "kill_leftovers");
    /* Rounded, not truncated: 1.001 * 1e3 is 1000.9999999999999. */
    double timeout = round(opt_number(L, "timeout") * 1e3);
    o.timeout_ms = timeout <= 0 ? 0 : timeout >= PZ_NO_TIMEOUT ? PZ_NO_TIMEOUT - 1 : timeout < 1 ? 1 : (uint32_t)timeout;
    o.init_timeout_ns = (int64_t)llround(opt_number(L, "init_timeout") * 1e9);
    o.retries = (int)opt_number(L, "retries");
    o.max_calls = (uint64_t)opt_number(L, "max_calls");
    o.fail_fast = opt_bool(L, "fail_fast");
    double max_pending = opt_number(L, "max_pending");
    double max_pending_bytes = opt_number(L, "max_pending_bytes");

    lpool *u = (lpool *)lua_newuserdata(L, sizeof *u);
    memset(u, 0, sizeof *u);
    u->scratch = (pz_buf)PZ_BUF_INIT;
    u->finished.low = 1;
    u->keep_results = opt_bool(L, "keep_results");
    u->quiet = opt_bool(L, "quiet");
    u->max_pending = max_pending >= 1 ? (uint64_t)max_pending : 0;
    u->max_pending_bytes = max_pending_bytes >= 1 ? (uint64_t)max_pending_bytes : UINT64_MAX;
    luaL_getmetatable(L, PZ_POOL_MT);
    lua_setmetatable(L, -2);
    int ud = lua_gettop(L);

    lua_createtable(L, 0, 12);
    for (size_t i = 0; i < sizeof env_tables / sizeof *env_tables; i++) {
        lua_newtable(L);
        lua_setfield(L, -2, env_tables[i]);
    }
    lua_pushthread(L);
    lua_setfield(L, -2, "thread");
    u->hook_L = L;
    lua_setfenv(L, ud);

    u->init = calloc((size_t)n, sizeof *u->init);
    if (!u->init)
        return luaL_error(L, "cannot start the pool: out of memory");
    u->ninit = n;
    pz_versions versions;
    pz_versions_of(L, &versions);
    for (int i = 1; i <= n; i++) {
        lua_rawgeti(L, 1, i);
        luaL_checktype(L, -1, LUA_TTABLE);
        pz_linit_build(L, u, i, &o, &versions);
        read_launcher(L, u, i);
        lua_pop(L, 1);
    }
    pz_buf_trim(&u->scratch, 0);

    const char *err = NULL;
    pz_buf *init = u->init;
    char ***launch = u->launch;
    u->init = NULL; /* pz_pool_new owns them from here, even on failure */
    u->launch = NULL;
    u->ninit = 0;
    u->nslots = n;
    u->pool = pz_pool_new(n, init, launch, &o, worker_setup, &err);
    if (!u->pool)
        return luaL_error(L, "cannot start the pool: %s (%s)", err, strerror(errno));
    pz_calls_writer_init(&u->open_writer, u->pool->arena);
    return 1;
}

/* core.pool_drain(pool): moves the records received so far into the
 * environment tables. */
static int l_pool_drain(lua_State *L)
{
    pz_lrecords_drain(L, to_lpool(L, 1), 1);
    return 0;
}

/* core.pool_draining(pool) -> whether records are being moved into the
 * environment tables now (Lua running inside a drain: a finalizer). */
static int l_pool_draining(lua_State *L)
{
    lua_pushboolean(L, to_lpool(L, 1)->draining);
    return 1;
}

/* A wait must not sleep through a signal whose handler ran while it
 * drained records, or in the instant before its sleep blocked signals:
 * Ctrl-C's handler (pzlua's, luajit's) sets a debug hook that fires only
 * once the wait returns.  So a wait ends, with "interrupted", when the hook
 * is not the one the last wait on the pool returned with.  That one, not
 * the hook as this wait begins: a signal can come between the interpreter's
 * last look at the hook and this function's first line.  A hook the user
 * set between two waits costs one return to the Lua loop, which waits
 * again. */
typedef struct hook_watch {
    lua_State *L;
    lua_Hook seen;
} hook_watch;

/* pz_signalled's check: the hook has changed. */
static int hook_changed(void *ud)
{
    const hook_watch *h = ud;
    return lua_gethook(h->L) != h->seen;
}

/* Ends a wait with status: drains what came meanwhile, and notes the hook
 * it returns with (hook_watch). */
static int wait_returns(lua_State *L, lpool *u, const char *status, int drain)
{
    if (drain)
        pz_lrecords_drain(L, u, 1);
    u->hook_seen = lua_gethook(L);
    lua_pushstring(L, status);
    return 1;
}

/* core.pool_wait(pool, what [, timeout [, finished [, pending_below]]])
 * -> status.  what: "calls" (every queued call finished), "init" (every
 * worker initialized or given up) or "progress" (at least `finished` calls
 * have finished in all, or fewer than `pending_below` wait for a worker;
 * either may be nil) or "room" (p(...) may queue a call: max_pending and
 * max_pending_bytes allow it).  Drains first.  Returns "done", "timeout",
 * "interrupted" (a signal arrived: the caller's interrupt hook, if any,
 * fires on return), "fatal" (the pool cannot go on: env.fatal says why) or
 * "halted" (fail_fast: a failure, env.first_failure, stopped dispatch). */
static int l_pool_wait(lua_State *L)
{
    lpool *u = pz_lpool_check_running(L, 1);
    pz_pool *p = u->pool;
    static const char *const kinds[] = {"calls", "init", "progress", "room", NULL};
    int what = luaL_checkoption(L, 2, NULL, kinds);
    pz_lpool_check_not_draining(L, u, what == 1 ? "p.executors" : "p:wait()");
    int64_t deadline = deadline_from(L, 3);
    uint64_t finished = PZ_NEVER, below = 0;
    if (what == 2 && !lua_isnoneornil(L, 4))
        finished = (uint64_t)luaL_checknumber(L, 4);
    if (what == 2 && !lua_isnoneornil(L, 5))
        below = (uint64_t)luaL_checknumber(L, 5);
    hook_watch watch = {L, u->hook_seen};
    const pz_signalled signalled = {hook_changed, &watch};
    for (;;) {
        if (what == 0) /* Lua that ran while draining may have queued more */
            finished = pz_pool_calls(p);
        int settled = pz_pool_slots_settled(p);
        pz_lrecords_drain(L, u, 1);
        if (what == 0)
            finished = pz_pool_calls(p);
        int done = what == 1   ? settled >= u->nslots
                   : what == 3 ? pz_lpool_has_room(u)
                               : pz_pool_finished(p) >= finished || pz_pool_pending(p) < below;
        if (done)
            return wait_returns(L, u, "done", 0);
        int r;
        if (what == 1) {
            r = pz_pool_sleep(p, PZ_WAIT_INIT, PZ_NEVER, PZ_NEVER, deadline, &signalled);
        } else if (what == 3) {
            /* Room comes as calls are taken: one more than has_room saw is
             * the least (p->taken_seen, read when it said no: a fresh read
             * here may already count the takes that made room, and then
             * waited for one more take than there are calls, forever, the
             * I/O thread idle; a one-worker pool with max_pending hung
             * within a few thousand p(i)); room in the arena, as the
             * records of calls holding it come: one more than were drained
             * (published meanwhile, it is there now). */
            int arena_full = pz_lpool_arena_full(u);
            uint64_t drained_to = arena_full ? pz_pool_finished(p) + 1 : PZ_NEVER;
            uint64_t taken_to = arena_full ? atomic_load(&p->calls_taken) + 1 : p->taken_seen + 1;
            r = pz_pool_sleep(p, PZ_WAIT_PROGRESS, drained_to, taken_to, deadline, &signalled);
        } else {
            /* Fewer than `below` pending once next_id - below calls are taken. */
            uint64_t queued = pz_pool_calls(p);
            uint64_t taken = below == 0 ? PZ_NEVER : queued + 1 > below ? queued + 1 - below : 0;
            r = pz_pool_sleep(p, PZ_WAIT_PROGRESS, finished, taken, deadline, &signalled);
        }
        if (r == PZ_WAIT_FATAL || r == PZ_WAIT_HALTED)
            return wait_returns(L, u, r == PZ_WAIT_FATAL ? "fatal" : "halted", 1);
        if (r == PZ_WAIT_INTERRUPTED || r == PZ_WAIT_TIMEOUT)
            return wait_returns(L, u, r == PZ_WAIT_TIMEOUT ? "timeout" : "interrupted", 1);
    }
}

/* core.pool_counts(pool) -> calls, finished, pending: calls queued so far,
 * how many have had their result or error drained, how many wait for a
 * worker. */
static int l_pool_counts(lua_State *L)
{
    lpool *u = to_lpool(L, 1);
    if (!u->pool) {
        lua_pushnumber(L, u->calls);
        lua_pushnumber(L, u->drained);
        lua_pushnumber(L, 0);
        return 3;
    }
    lua_pushnumber(L, (lua_Number)pz_pool_calls(u->pool));
    lua_pushnumber(L, (lua_Number)pz_pool_finished(u->pool));
    lua_pushnumber(L, (lua_Number)pz_pool_pending(u->pool));
    return 3;
}

/* core.pool_finished(pool, id) -> boolean: whether call id's result or
 * error has been drained. */
static int l_pool_finished(lua_State *L)
{
    lpool *u = to_lpool(L, 1);
    double id = luaL_checknumber(L, 2);
    lua_pushboolean(L, id >= 1 && pz_idset_has(&u->finished, (uint64_t)id));
    return 1;
}

/* core.idset_trial(ops, upto) -> low, finished: for the tests, a fresh
 * set (idset.h) given ops, a flat list of pairs (id, 0): pz_idset_add(id),
 * or (first, k): pz_idset_add_run(first, k); returns its low and a list
 * of pz_idset_has for ids 1 .. upto. */
static int l_idset_trial(lua_State *L)
{
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_Number count = luaL_checknumber(L, 2);
    luaL_argcheck(L, count >= 0 && count <= 0x1p24 && count == floor(count), 2, "an integer from 0 to 2^24");
    int upto = (int)count, n = (int)lua_objlen(L, 1);
    if (n % 2 != 0)
        return luaL_error(L, "idset_trial: the operations are pairs, and %d values were given", n);
    /* Everything that may raise comes before the set exists or after it is
     * freed: the operations are checked first. */
    for (int i = 1; i <= n; i++) {
        lua_rawgeti(L, 1, i);
        lua_Number v = lua_tonumber(L, -1);
        int fits = lua_type(L, -1) == LUA_TNUMBER && v == floor(v) &&
                   (i % 2 ? v >= 1 && v < 0x1p53 : v >= 0 && v <= 0x1p24);
        lua_pop(L, 1);
        if (!fits)
            return luaL_error(L, "idset_trial: value %d: ids are integers from 1 below 2^53, counts integers "
                                 "from 0 to 2^24", i);
    }
    unsigned char *has = lua_newuserdata(L, (size_t)upto + 1);
    pz_idset s = {.low = 1, .bits = NULL, .cap = 0};
    int failed = 0;
    for (int i = 1; i < n && !failed; i += 2) {
        lua_rawgeti(L, 1, i);
        lua_rawgeti(L, 1, i + 1);
        lua_Number a = lua_tonumber(L, -2), k = lua_tonumber(L, -1);
        lua_pop(L, 2);
        failed = (k == 0 ? pz_idset_add(&s, (uint64_t)a) : pz_idset_add_run(&s, (uint64_t)a, (uint64_t)k)) != 0;
    }
    for (int id = 1; id <= upto; id++)
        has[id] = (unsigned char)pz_idset_has(&s, (uint64_t)id);
    uint64_t low = s.low;
    pz_idset_free(&s);
    if (failed)
        return luaL_error(L, "idset_trial: out of memory");
    lua_pushnumber(L, (lua_Number)low);
    lua_createtable(L, upto, 0);
    for (int id = 1; id <= upto; id++) {
        lua_pushboolean(L, has[id]);
        lua_rawseti(L, -2, id);
    }
    return 2;
}

/* core.pool_cancel(pool, id) -> boolean: asks the I/O thread to cancel
 * call id (io.h), unless it has finished; returns whether it had not. */
static int l_pool_cancel(lua_State *L)
{
    lpool *u = pz_lpool_check_running(L, 1);
    double id = luaL_checknumber(L, 2);
    pz_lrecords_drain(L, u, 1);
    /* No call has a NaN or a fractional id (and converting a NaN to an
     * integer is undefined): such an id names nothing unfinished. */
    if (!(id >= 1) || id > (double)pz_pool_calls(u->pool) || id != floor(id) ||
        pz_idset_has(&u->finished, (uint64_t)id)) {
        lua_pushboolean(L, 0);
        return 1;
    }
    if (pz_pool_cancel(u->pool, (uint64_t)id) != 0)
        return luaL_error(L, "cannot cancel call %f: out of memory", id);
    lua_pushboolean(L, 1);
    return 1;
}

static void set_count(lua_State *L, const char *name, uint64_t v)
{
    lua_pushnumber(L, (lua_Number)v);
    lua_setfield(L, -2, name);
}

/* Copies the I/O thread's counts into *st, its slots' entries in a buffer
 * pushed on the stack (the caller pops it).  The pool must not be freed. */
static void fetch_stats(lua_State *L, lpool *u, pz_pool_stats *st)
{
    memset(st, 0, sizeof *st);
    st->slots = (pz_slot_stats *)lua_newuserdata(L, (size_t)u->nslots * sizeof *st->slots);
    pz_pool_get_stats(u->pool, st);
}

/* Pushes the I/O thread's counts: {done, failed, deaths, respawns,
 * recycles, timeouts, cancelled, retries, retrying, running, requeued,
 * taken, cancelled_unseen, elapsed (seconds), samples = {{t, done}, ...},
 * workers = {{pid =, calls =, busy =}, ...}, shared = {sent =, received
 * =}}; `done` counts results and errors, `failed` the errors, with the
 * results the drain could not decode (u->salvaged).  The pool must not be
 * freed yet. */
static void push_stats(lua_State *L, lpool *u)
{
    pz_pool_stats st;
    fetch_stats(L, u, &st);
    int64_t now = pz_now_ns();
    lua_createtable(L, 0, 16);
    set_count(L, "done", st.done);
    set_count(L, "failed", st.failed + (uint64_t)u->salvaged);
    set_count(L, "deaths", st.deaths);
    set_count(L, "respawns", st.respawns);
    set_count(L, "recycles", st.recycles);
    set_count(L, "timeouts", st.timeouts);
    set_count(L, "cancelled", st.cancelled);
    set_count(L, "retries", st.retries);
    set_count(L, "retrying", st.retrying);
    set_count(L, "running", st.running);
    set_count(L, "requeued", st.queued);
    set_count(L, "taken", st.taken);
    set_count(L, "cancelled_unseen", st.cancelled_unseen);
    lua_pushnumber(L, st.started_ns ? (lua_Number)(now - st.started_ns) / 1e9 : 0);
    lua_setfield(L, -2, "elapsed");
    lua_createtable(L, st.nsamples + 1, 0);
    for (int i = 0; i <= st.nsamples; i++) {
        lua_createtable(L, 2, 0);
        lua_pushnumber(L, (lua_Number)((i < st.nsamples ? st.sample_ns[i] : now)) / 1e9);
        lua_rawseti(L, -2, 1);
        lua_pushnumber(L, (lua_Number)(i < st.nsamples ? st.sample_done[i] : st.done));
        lua_rawseti(L, -2, 2);
        lua_rawseti(L, -2, i + 1);
    }
    lua_setfield(L, -2, "samples");
    lua_createtable(L, u->nslots, 0);
    for (int i = 0; i < u->nslots; i++) {
        lua_createtable(L, 0, 3);
        set_count(L, "pid", (uint64_t)st.slots[i].pid);
        set_count(L, "calls", st.slots[i].calls);
        lua_pushnumber(L, (lua_Number)st.slots[i].busy_ns / 1e9);
        lua_setfield(L, -2, "busy");
        lua_rawseti(L, -2, i + 1);
    }
    lua_setfield(L, -2, "workers");
    lua_createtable(L, 0, 2);
    set_count(L, "sent", u->pool->arena ? u->pool->arena->sent : 0);
    set_count(L, "received", u->pool->arena ? u->pool->arena->reader.bytes : 0);
    lua_setfield(L, -2, "shared");
    lua_remove(L, -2); /* the slots' buffer */
}

/* core.pool_slots_alive(pool) -> {[slot] = true, ...}: the slots whose
 * worker that initialized last still lives (none after stop).  p.pids
 * names only those: a pid whose process has ended may be another's by
 * now. */
static int l_pool_slots_alive(lua_State *L)
{
    lpool *u = to_lpool(L, 1);
    lua_newtable(L);
    if (!u->pool || u->pool->stopped)
        return 1;
    pz_pool_stats st;
    fetch_stats(L, u, &st);
    for (int i = 0; i < u->nslots; i++)
        if (st.slots[i].init_alive) {
            lua_pushboolean(L, 1);
            lua_rawseti(L, -3, i + 1);
        }
    lua_pop(L, 1);
    return 1;
}

/* core.pool_stats(pool) -> the I/O thread's counts (push_stats); after
 * stop, the last ones it had.  The Lua layer adds what the main thread
 * knows. */
static int l_pool_stats(lua_State *L)
{
    lpool *u = to_lpool(L, 1);
    if (u->pool) {
        push_stats(L, u);
    } else {
        lua_getfenv(L, 1);
        lua_getfield(L, -1, "final_stats");
    }
    return 1;
}

/* ------------------------------------------------------------------------
 * Claims: the results of a map or a stream, kept apart (lrecords.c)
 * --------------------------------------------------------------------- */

/* core.pool_claim(pool) -> tag: a tag whose results go to
 * env.claims[tag] = {results = {}, ids = {}, errors = {}, extras = {}}. */
static int l_pool_claim(lua_State *L)
{
    lpool *u = pz_lpool_check_running(L, 1);
    int tag = 1;
    while (tag < PZ_TAGS && !(u->tag_state[tag] == PZ_TAG_FREE ||
                              (u->tag_state[tag] == PZ_TAG_RELEASED && u->tag_outstanding[tag] == 0)))
        tag++;
    if (tag == PZ_TAGS)
        return luaL_error(L, "too many maps and streams at once on one pool (%d)", PZ_TAGS - 1);
    u->tag_state[tag] = PZ_TAG_ACTIVE;
    u->tag_outstanding[tag] = 0;
    lua_getfenv(L, 1);
    lua_getfield(L, -1, "claims");
    lua_createtable(L, 0, 4);
    static const char *const lists[] = {"results", "ids", "errors", "extras"};
    for (int i = 0; i < 4; i++) {
        lua_newtable(L);
        lua_setfield(L, -2, lists[i]);
    }
    lua_rawseti(L, -2, tag);
    lua_pushinteger(L, tag);
    return 1;
}

/* core.pool_release(pool, tag): the claim's later records go to the pool's
 * store; its table leaves env.claims (the caller moves what it holds).
 * The tag is reused once none of its calls is outstanding. */
static int l_pool_release(lua_State *L)
{
    lpool *u = to_lpool(L, 1);
    int tag = (int)luaL_checkinteger(L, 2);
    luaL_argcheck(L, tag > 0 && tag < PZ_TAGS, 2, "not a tag");
    if (u->tag_state[tag] == PZ_TAG_ACTIVE)
        u->tag_state[tag] = PZ_TAG_RELEASED;
    lua_getfenv(L, 1);
    lua_getfield(L, -1, "claims");
    lua_pushnil(L);
    lua_rawseti(L, -2, tag);
    return 0;
}

/* ------------------------------------------------------------------------
 * Stopping
 * --------------------------------------------------------------------- */

typedef struct aborted_ctx {
    lua_State *L;
    int list;
} aborted_ctx;

/* Appends an aborted CALL frame, as a string, to the list. */
static void add_aborted(const char *frame, size_t size, void *ud)
{
    aborted_ctx *c = ud;
    lua_pushlstring(c->L, frame, size);
    lua_rawseti(c->L, c->list, (int)lua_objlen(c->L, c->list) + 1);
}

/* Protected: turns the CALL frame in string 1 into {n =, id =, ...}; its
 * big strings are read from the arena's reader, light userdata 2 (NULL
 * without one). */
static int decode_aborted(lua_State *L)
{
    size_t n;
    const char *frame = lua_tolstring(L, 1, &n);
    pz_arena_reader *reader = (pz_arena_reader *)lua_touserdata(L, 2);
    lua_settop(L, 1);
    int count = pz_decode_tuple(L, pz_frame_payload(frame), n - PZ_FRAME_HEADER, PZ_DECODE_FUNCTIONS,
                                reader);
    lua_createtable(L, count, 2);
    lua_insert(L, 2);
    for (int i = count; i >= 1; i--)
        lua_rawseti(L, 2, i);
    lua_pushinteger(L, count);
    lua_setfield(L, 2, "n");
    lua_pushnumber(L, (lua_Number)pz_frame_id(frame));
    lua_setfield(L, 2, "id");
    return 1;
}

/* Pushes the list of aborted calls, {n =, id =, ...} each, from the list of
 * their frames at index frames, whose big strings are in `reader`'s
 * region (NULL: none). */
static void push_aborted(lua_State *L, int frames, pz_arena_reader *reader)
{
    int n = (int)lua_objlen(L, frames);
    lua_createtable(L, n, 0);
    for (int i = 1; i <= n; i++) {
        lua_pushcfunction(L, decode_aborted);
        lua_rawgeti(L, frames, i);
        lua_pushlightuserdata(L, reader);
        if (lua_pcall(L, 2, 1, 0) != 0) {
            const char *why = lua_tostring(L, -1);
            lua_rawgeti(L, frames, i);
            const char *frame = lua_tostring(L, -1);
            lua_createtable(L, 0, 3);
            lua_pushinteger(L, 0);
            lua_setfield(L, -2, "n");
            lua_pushnumber(L, (lua_Number)pz_frame_id(frame));
            lua_setfield(L, -2, "id");
            lua_pushfstring(L, "the arguments cannot be decoded: %s", why ? why : "unknown error");
            lua_setfield(L, -2, "error");
            lua_replace(L, -3);
            lua_pop(L, 1);
        }
        lua_rawseti(L, -2, i);
    }
}

/* The error on top of the stack as text, for a message around it. */
static const char *error_text(lua_State *L)
{
    const char *s = lua_tostring(L, -1);
    return s ? s : "an error that is not a string";
}

/* Protected: a new table of the frames of the calls pz_pool (light
 * userdata 1) never finished. */
static int collect_aborted(lua_State *L)
{
    pz_pool *pool = (pz_pool *)lua_touserdata(L, 1);
    lua_newtable(L);
    aborted_ctx c = {L, lua_gettop(L)};
    pz_pool_aborted(pool, add_aborted, &c);
    return 1;
}

/* Protected: push_aborted of the frames at 1, the reader (a light userdata,
 * NULL: none) at 2. */
static int push_aborted_at(lua_State *L)
{
    push_aborted(L, 1, (pz_arena_reader *)lua_touserdata(L, 2));
    return 1;
}

/* Returns the aborted list on top, passed through settle(aborted) when
 * the caller gave one (at 3): deferred (ldefer.h), and with no Lua code
 * between the stop and it, so that Ctrl-C during the stop fires once
 * settle's results are the caller's. */
static int stop_returns(lua_State *L)
{
    int top = lua_gettop(L) - 1;
    if (!lua_isnoneornil(L, 3)) {
        lua_pushvalue(L, 3);
        lua_insert(L, -2);
        if (pz_defer_pcall(L, 1, LUA_MULTRET) != 0)
            return lua_error(L);
    }
    /* Returned (settle did not raise): a stop after returns {}. */
    lua_getfenv(L, 1);
    lua_pushnil(L);
    lua_setfield(L, -2, "unreturned_aborted");
    lua_pop(L, 1);
    return lua_gettop(L) - top;
}

/* The signals that must not hurry a stop (pz_pool_stop's `signalled`):
 * every one with a handler of its own but SIGINT (Ctrl-C: pzlua's and
 * luajit's handlers set a hook), SIGTERM and SIGHUP (pzlua --map's do the
 * same), and the faults.  A hook is how a Lua-level handler runs too:
 * luaposix's posix.signal sets one for SIGCHLD, SIGALRM, SIGWINCH..., and
 * the script's own child ending during a stop ended the running calls.
 * Blocked for the stop's wait, they are delivered once it is over (their
 * Lua handlers could not run before anyway). */
static void quiet_signals(sigset_t *set)
{
    sigemptyset(set);
    for (int sig = 1; sig < NSIG; sig++) {
        struct sigaction sa;
        if (sig == SIGINT || sig == SIGTERM || sig == SIGHUP || sig == SIGKILL || sig == SIGSTOP ||
            sig == SIGSEGV || sig == SIGBUS || sig == SIGFPE || sig == SIGILL || sig == SIGTRAP ||
            sig == SIGSYS || sig == SIGABRT)
            continue;
        if (sigaction(sig, NULL, &sa) != 0)
            continue; /* one the C library keeps for itself */
        if ((sa.sa_flags & SA_SIGINFO) || (sa.sa_handler != SIG_DFL && sa.sa_handler != SIG_IGN))
            sigaddset(set, sig);
    }
}

/* core.pool_stop(pool [, finish_timeout [, settle]]) -> aborted: stops
 * dispatching, lets the calls workers hold finish (terminating them once
 * finish_timeout seconds have passed, when given, or at once when a signal
 * comes meanwhile: pz_pool_stop), ends every process,
 * then returns the arguments of every call that never finished, or what
 * settle(aborted) returns (stop_returns).  A stopped pool's list is {}. */
static int l_pool_stop(lua_State *L)
{
    lpool *u = to_lpool(L, 1);
    int64_t finish = deadline_from(L, 2);
    if (!lua_isnoneornil(L, 3))
        luaL_checktype(L, 3, LUA_TFUNCTION);
    lua_settop(L, 3);
    if (!u->pool) {
        /* What a stop whose settle raised could not return, else {}. */
        lua_getfenv(L, 1);
        lua_getfield(L, -1, "unreturned_aborted");
        lua_remove(L, -2);
        if (!lua_istable(L, -1)) {
            lua_pop(L, 1);
            lua_newtable(L);
        }
        return stop_returns(L);
    }
    pz_lpool_check_not_draining(L, u, "p:stop()");
    if (pz_lpool_marked_above(u->chunk_encoding_at, pz_lpool_frame_here()))
        return luaL_error(L, "the pool is busy: p:stop() called while a map encodes a chunk "
                             "of its items (from a __gc finalizer?); call it afterwards");
    /* A signal during the stop (its handler sets a hook: hook_changed)
     * ends the running calls; one from before fires afterwards.  Only an
     * interrupt may: the other signals with a handler wait until the stop
     * is over (quiet_signals), blocked before the hook is read. */
    sigset_t quiet, old;
    quiet_signals(&quiet);
    pthread_sigmask(SIG_BLOCK, &quiet, &old);
    hook_watch watch = {L, lua_gethook(L)};
    const pz_signalled signalled = {hook_changed, &watch};
    pz_pool_stop(u->pool, finish, &signalled);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    pz_lrecords_drain(L, u, 1);
    lua_getfenv(L, 1);
    push_stats(L, u);
    lua_setfield(L, -2, "final_stats");
    lua_pop(L, 1);
    /* The frames are copied out and their arguments decoded before the
     * pool is freed: out of memory in either raises with the pool stopped
     * and whole, and a stop tried again (with memory freed) finds every
     * call.  An argument that cannot be decoded (naming a module the
     * parent no longer has) does not raise: push_aborted records it.
     * Deferred, as the decode below: Ctrl-C during the stop, whose hook
     * fires at the first call, would be taken for this one's failure. */
    lua_pushcfunction(L, collect_aborted);
    lua_pushlightuserdata(L, u->pool);
    if (pz_defer_pcall(L, 1, 1) != 0) { /* 4: their frames */
        lua_gc(L, LUA_GCCOLLECT, 0); /* (what the list had: the message needs room) */
        return luaL_error(L, "stop: the aborted calls could not be listed (%s); the pool is stopped, "
                             "and p:stop() again returns them", error_text(L));
    }
    /* Deferred (ldefer.h): Ctrl-C during the stop fires at the first call
     * of Lua code, which would be a decode's, and an aborted call's
     * arguments would be lost to "interrupted!". */
    lua_pushcfunction(L, push_aborted_at);
    lua_pushvalue(L, 4);
    lua_pushlightuserdata(L, u->pool->arena ? &u->pool->arena->reader : NULL);
    if (pz_defer_pcall(L, 2, 1) != 0) {
        lua_gc(L, LUA_GCCOLLECT, 0);
        return luaL_error(L, "stop: the aborted calls could not be listed (%s); the pool is stopped, "
                             "and p:stop() again returns them", error_text(L));
    }
    lua_replace(L, 4);
    lua_settop(L, 4);
    /* Kept until settle has returned it: a settle that raises (out of
     * memory) leaves it for the next stop to return. */
    lua_getfenv(L, 1);
    lua_pushvalue(L, 4);
    lua_setfield(L, -2, "unreturned_aborted");
    lua_pop(L, 1);
    u->calls = (double)pz_pool_calls(u->pool);
    u->drained = (double)pz_pool_finished(u->pool);
    pz_pool_free(u->pool);
    u->pool = NULL;
    return stop_returns(L);
}

/* __gc: a pool collected (or closed with its state) without stop is
 * terminated at once, and its processes are reaped. */
static int l_pool_gc(lua_State *L)
{
    lpool *u = (lpool *)lua_touserdata(L, 1);
    if (u->pool && !u->quiet && !u->pool->forked) {
        uint64_t calls = pz_pool_calls(u->pool), done = pz_pool_published(u->pool);
        if (done < calls)
            fprintf(stderr,
                    "parallelize: a pool was dropped (collected, or still open when the program "
                    "ended) with %llu of its %llu calls unfinished; to keep them, call p:wait() "
                    "before the program ends (or pass quiet = true to say nothing)\n",
                    (unsigned long long)(calls - done), (unsigned long long)calls);
    }
    if (u->pool) {
        pz_pool_stop(u->pool, pz_now_ns(), NULL);
        pz_pool_free(u->pool);
        u->pool = NULL;
    }
    free_init(u);
    pz_buf_free(&u->scratch);
    pz_idset_free(&u->finished);
    return 0;
}

static int l_pool_tostring(lua_State *L)
{
    lpool *u = (lpool *)luaL_checkudata(L, 1, PZ_POOL_MT);
    const char *state = u->pool ? "running" : "stopped";
    lua_pushfstring(L, "parallelize pool (%d workers, %s): %p", u->nslots, state, (void *)u);
    return 1;
}

/* core.pool_size(pool) -> number of worker slots. */
static int l_pool_size(lua_State *L)
{
    lua_pushinteger(L, to_lpool(L, 1)->nslots);
    return 1;
}

/* core.pool_env(pool) -> the environment table (lrecords.c). */
static int l_pool_env(lua_State *L)
{
    to_lpool(L, 1);
    lua_getfenv(L, 1);
    return 1;
}

/* core.pool_stopped(pool) -> boolean */
static int l_pool_stopped(lua_State *L)
{
    lpool *u = to_lpool(L, 1);
    /* (a stop that could not list its aborted calls leaves the pool
     * stopped, and whole for the next stop: reaped) */
    lua_pushboolean(L, !u->pool || u->pool->reaped);
    return 1;
}

void pz_lpool_register(lua_State *L, pz_state_setup setup)
{
    static const luaL_Reg funcs[] = {
        {"pool_new", l_pool_new},         {"pool_submit", pz_lpool_submit},
        {"pool_submit_each", pz_lpool_submit_each}, {"pool_submit_chunk", pz_lpool_submit_chunk},
        {"pool_drain", l_pool_drain},     {"pool_draining", l_pool_draining},
        {"pool_wait", l_pool_wait},
        {"pool_stop", l_pool_stop},       {"pool_counts", l_pool_counts},
        {"pool_finished", l_pool_finished}, {"pool_claim", l_pool_claim},
        {"pool_release", l_pool_release}, {"pool_size", l_pool_size},
        {"pool_cancel", l_pool_cancel},   {"pool_stats", l_pool_stats},
        {"pool_slots_alive", l_pool_slots_alive},
        {"pool_env", l_pool_env},         {"pool_stopped", l_pool_stopped},
        {"pool_call", pz_lpool_call},     {"idset_trial", l_idset_trial},
        {NULL, NULL}};
    worker_setup = setup;
    pz_lsubmit_prepare(L);
    pz_lsubmit_register(L);
    if (luaL_newmetatable(L, PZ_POOL_MT)) {
        lua_pushcfunction(L, l_pool_gc);
        lua_setfield(L, -2, "__gc");
        lua_pushcfunction(L, pz_lpool_call);
        lua_setfield(L, -2, "__call");
        lua_pushcfunction(L, l_pool_tostring);
        lua_setfield(L, -2, "__tostring");
        lua_pushliteral(L, "parallelize.pool");
        lua_setfield(L, -2, "__metatable");
    }
    lua_setfield(L, -2, "pool_metatable");
    for (const luaL_Reg *f = funcs; f->name; f++) {
        lua_pushcfunction(L, f->func);
        lua_setfield(L, -2, f->name);
    }
    lua_pushnumber(L, MAX_MESSAGE_LIMIT);
    lua_setfield(L, -2, "max_message_limit");
    pz_lrecords_register(L);
}
