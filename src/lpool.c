/*
 * lpool.c - the pool as Lua sees it: a full userdata whose __call queues a
 * call, and the functions the Lua layer (lua/parallelize.lua) builds
 * Parallelize from.
 *
 * Each pool userdata has an environment table (lua_setfenv) holding the
 * Lua side of its state, which drain() fills from the records the I/O
 * thread publishes:
 *
 *   results      values in completion order (parallelize.null for nil)
 *   ids          ids[i] is the call id of results[i]
 *   errors       {id =, args =, message =, traceback =}
 *   executors    executors[slot]: the copy the worker sent when it started
 *   pids         pids[slot]: the pid of the slot's current worker
 *   init_errors  {worker =, message =, traceback =}
 *   fatal        set when no worker is left and none can be started
 *
 * Everything malloc'ed is owned by the userdata, so an error raised while
 * encoding (an argument that cannot travel) leaks nothing.
 */
#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>
#include <lua.h>

#include "codec.h"
#include "codec_format.h"
#include "frame.h"
#include "lpool.h"
#include "pool.h"
#include "sys.h"

#define POOL_MT "parallelize.pool"

/* Largest max_message.  Frame lengths are 32 bits, and the largest record,
 * an error carrying its call's arguments and a message from the worker,
 * holds two messages and a few varints: 2 GiB less 1 KiB each fits. */
#define MAX_MESSAGE_LIMIT (2147483648.0 - 1024)

typedef struct lpool {
    pz_pool *pool;     /* NULL once released */
    pz_buf scratch;    /* arguments being encoded */
    pz_buf *init;      /* INIT payloads until the pool owns them */
    int ninit;
    int nslots;
    int fatal_seen;    /* the FATAL record was drained */
    double calls;      /* after stop: calls queued in all */
    double finished;   /* after stop: calls with a result or an error */
} lpool;

/* Returns the pool userdata at idx, or raises. */
static lpool *to_lpool(lua_State *L, int idx)
{
    return (lpool *)luaL_checkudata(L, idx, POOL_MT);
}

/* Returns the pool at idx when it still runs; raises otherwise. */
static lpool *check_running(lua_State *L, int idx)
{
    lpool *u = to_lpool(L, idx);
    if (!u->pool || u->pool->stopped)
        luaL_error(L, "the pool is stopped");
    return u;
}

static void free_init(lpool *u)
{
    if (!u->init)
        return;
    for (int i = 0; i < u->ninit; i++)
        pz_buf_free(&u->init[i]);
    free(u->init);
    u->init = NULL;
    u->ninit = 0;
}

/* ------------------------------------------------------------------------
 * Draining records into the environment table
 * --------------------------------------------------------------------- */

/* Stack slots drain_records works with. */
enum { D_ENV = 2, D_RESULTS, D_IDS, D_ERRORS, D_EXECUTORS, D_PIDS, D_INIT_ERRORS, D_TOP = D_INIT_ERRORS };

static const char *const env_tables[] = {"results", "ids", "errors", "executors", "pids", "init_errors"};

/* Pushes a new table {n = count, ...} of the argument tuple at p. */
static void push_args(lua_State *L, const char *p, size_t n)
{
    int top = lua_gettop(L);
    int count = pz_decode_tuple(L, p, n, PZ_DECODE_FUNCTIONS);
    lua_createtable(L, count, 1);
    lua_insert(L, top + 1);
    for (int i = count; i >= 1; i--)
        lua_rawseti(L, top + 1, i);
    lua_pushinteger(L, count);
    lua_setfield(L, top + 1, "n");
}

/* Sets field `name` of the table on top to the string s[0..n). */
static void set_string(lua_State *L, const char *name, const char *s, size_t n)
{
    lua_pushlstring(L, s, n);
    lua_setfield(L, -2, name);
}

/* Appends the value on top to the array at idx (popping it). */
static void append(lua_State *L, int idx)
{
    lua_rawseti(L, idx, (int)lua_objlen(L, idx) + 1);
}

/* Appends {id =, args =, message =, traceback =} from an ERROR record. */
static void on_error_record(lua_State *L, const pz_frame *f)
{
    const char *args, *rest, *msg, *tb;
    size_t alen, rlen, mlen, tblen;
    if (pz_split_prefixed(f->payload, f->len, &args, &alen, &rest, &rlen) != 0 ||
        pz_split_prefixed(rest, rlen, &msg, &mlen, &tb, &tblen) != 0)
        luaL_error(L, "internal error: malformed ERROR record");
    lua_createtable(L, 0, 4);
    lua_pushnumber(L, (lua_Number)f->id);
    lua_setfield(L, -2, "id");
    push_args(L, args, alen);
    lua_setfield(L, -2, "args");
    set_string(L, "message", msg, mlen);
    set_string(L, "traceback", tb, tblen);
    append(L, D_ERRORS);
}

/* executors[slot] and pids[slot] from an INIT_OK record. */
static void on_init_ok(lua_State *L, const pz_frame *f)
{
    const char *p = f->payload;
    size_t n = f->len;
    uint64_t pid;
    int slot = (int)f->id + 1;
    if (pz_take_varint(&p, &n, &pid) != 0)
        luaL_error(L, "internal error: malformed INIT_OK record");
    lua_pushnumber(L, (lua_Number)pid);
    lua_rawseti(L, D_PIDS, slot);
    pz_decode_value(L, p, n, PZ_DECODE_FUNCTIONS);
    lua_rawseti(L, D_EXECUTORS, slot);
}

/* Appends {worker =, message =, traceback =} from an INIT_ERROR record. */
static void on_init_error(lua_State *L, const pz_frame *f)
{
    const char *msg, *tb;
    size_t mlen, tblen;
    if (pz_split_prefixed(f->payload, f->len, &msg, &mlen, &tb, &tblen) != 0)
        luaL_error(L, "internal error: malformed INIT_ERROR record");
    lua_createtable(L, 0, 3);
    lua_pushinteger(L, (lua_Integer)f->id + 1);
    lua_setfield(L, -2, "worker");
    set_string(L, "message", msg, mlen);
    set_string(L, "traceback", tb, tblen);
    append(L, D_INIT_ERRORS);
}

/* Reads the first record of the done queue into *f; returns 0 when the
 * queue is empty. */
static int peek_record(pz_pool *p, pz_frame *f)
{
    size_t avail;
    const char *d = pz_spsc_peek(&p->done, &avail);
    if (!d)
        return 0;
    f->type = (uint8_t)d[4];
    f->aux = (uint8_t)d[5];
    f->id = pz_frame_id(d);
    f->len = pz_frame_payload_len(d);
    f->payload = d + PZ_FRAME_HEADER;
    f->size = PZ_FRAME_HEADER + f->len;
    return 1;
}

static void consume_record(lpool *u, const pz_frame *f)
{
    pz_pool *p = u->pool;
    if (f->type == PZ_F_RESULT || f->type == PZ_F_ERROR)
        p->drained++;
    pz_spsc_consume(&p->done, f->size);
    atomic_fetch_sub_explicit(&p->backlog, f->size, memory_order_relaxed);
}

/* Protected: lpool light userdata at 1, environment at 2, its tables at
 * D_RESULTS .. D_TOP (drain_unhooked checked them).  Turns records
 * into Lua values until the queue is empty, consuming each after it is
 * stored; an error leaves the record that raised it at the head. */
static int drain_records(lua_State *L)
{
    lpool *u = (lpool *)lua_touserdata(L, 1);
    pz_frame f;
    int nres = (int)lua_objlen(L, D_RESULTS);
    while (peek_record(u->pool, &f)) {
        switch (f.type) {
        case PZ_F_RESULT:
            pz_decode_value(L, f.payload, f.len, PZ_DECODE_FUNCTIONS);
            lua_rawseti(L, D_RESULTS, ++nres);
            lua_pushnumber(L, (lua_Number)f.id);
            lua_rawseti(L, D_IDS, nres);
            break;
        case PZ_F_ERROR:
            on_error_record(L, &f);
            break;
        case PZ_F_INIT_OK:
            on_init_ok(L, &f);
            break;
        case PZ_F_INIT_ERROR:
            on_init_error(L, &f);
            break;
        case PZ_F_FATAL:
            lua_pushlstring(L, f.payload, f.len);
            lua_setfield(L, D_ENV, "fatal");
            u->fatal_seen = 1;
            break;
        default:
            break;
        }
        consume_record(u, &f);
    }
    return 0;
}

/* The record at the head could not be turned into Lua values (a result
 * naming a module the parent cannot load, say): a call's result becomes
 * that call's error, an executor copy becomes the message, so nothing is
 * lost.  Error message on top of the stack; env at index env.  Returns 0
 * when there was no record to blame. */
static int salvage_record(lua_State *L, lpool *u, int env)
{
    pz_frame f;
    if (!peek_record(u->pool, &f))
        return 0;
    const char *why = lua_isstring(L, -1) ? lua_tostring(L, -1) : "unknown error";
    if (f.type == PZ_F_RESULT || f.type == PZ_F_ERROR) {
        const char *args, *rest, *msg = NULL, *tb = "";
        size_t alen, rlen, mlen = 0, tblen = 0;
        /* An error keeps its own message; its arguments are what failed. */
        if (f.type == PZ_F_ERROR &&
            (pz_split_prefixed(f.payload, f.len, &args, &alen, &rest, &rlen) != 0 ||
             pz_split_prefixed(rest, rlen, &msg, &mlen, &tb, &tblen) != 0))
            msg = NULL, tb = "", tblen = 0;
        lua_createtable(L, 0, 4);
        lua_pushnumber(L, (lua_Number)f.id);
        lua_setfield(L, -2, "id");
        lua_createtable(L, 0, 1);
        lua_pushinteger(L, 0);
        lua_setfield(L, -2, "n");
        lua_setfield(L, -2, "args");
        if (msg) {
            lua_pushlstring(L, msg, mlen);
            lua_pushfstring(L, "%s (its arguments cannot be decoded in the parent: %s)",
                            lua_tostring(L, -1), why);
            lua_remove(L, -2);
        } else
            lua_pushfstring(L, "the result of call %d cannot be used in the parent: %s",
                            (int)f.id, why);
        lua_setfield(L, -2, "message");
        lua_pushlstring(L, tb, tblen);
        lua_setfield(L, -2, "traceback");
        lua_getfield(L, env, "errors");
        lua_insert(L, -2);
        append(L, lua_gettop(L) - 1);
        lua_pop(L, 1);
    } else if (f.type == PZ_F_INIT_OK) {
        lua_getfield(L, env, "executors");
        if (lua_istable(L, -1)) {
            lua_pushfstring(L, "<executor copy cannot be decoded: %s>", why);
            lua_rawseti(L, -2, (int)f.id + 1);
        }
        lua_pop(L, 1);
    }
    consume_record(u, &f);
    return 1;
}

/* drain, with hooks off. */
static int drain_unhooked(lua_State *L, lpool *u, int idx)
{
    lua_getfenv(L, idx);
    int env = lua_gettop(L);
    /* The tables drain_records fills, checked here once: a table replaced
     * through the internal core.pool_env would make every attempt below
     * fail, so it is refused before any record is touched. */
    for (size_t i = 0; i < sizeof env_tables / sizeof *env_tables; i++) {
        lua_getfield(L, env, env_tables[i]);
        if (!lua_istable(L, -1)) {
            lua_pushfstring(L, "p.%s is no longer a table", env_tables[i]);
            return LUA_ERRRUN;
        }
    }
    for (;;) {
        lua_pushcfunction(L, drain_records);
        lua_pushlightuserdata(L, u);
        for (int i = env; i < env + D_TOP - 1; i++) /* env and its tables */
            lua_pushvalue(L, i);
        int rc = lua_pcall(L, D_TOP, 0, 0);
        if (rc == 0)
            break;
        /* Out of memory, or an error no record caused: the message is on
         * top.  Else the record that raised becomes an error value. */
        if (rc == LUA_ERRMEM || !salvage_record(L, u, env))
            return rc;
        lua_settop(L, env + D_TOP - 1);
    }
    lua_settop(L, env - 1);
    return 0;
}

/* Moves every published record into the environment table of the pool
 * userdata at idx.
 *
 * Hooks are off meanwhile: Ctrl-C sets a hook that raises "interrupted!"
 * at the next call, and that call could be drain's own lua_pcall, whose
 * error would then be taken for a record that cannot be decoded.  A hook
 * set while draining (by a signal handler) is kept for the caller. */
static void drain(lua_State *L, lpool *u, int idx)
{
    if (!u->pool)
        return;
    pz_pool_collect(u->pool);
    lua_Hook hook = lua_gethook(L);
    int mask = lua_gethookmask(L), count = lua_gethookcount(L);
    if (hook)
        lua_sethook(L, NULL, 0, 0);
    int rc = drain_unhooked(L, u, idx);
    if (hook && !lua_gethook(L))
        lua_sethook(L, hook, mask, count);
    if (rc != 0)
        lua_error(L);
}

/* ------------------------------------------------------------------------
 * Creating a pool
 * --------------------------------------------------------------------- */

/* Reads numeric option `name` of the options table at 2, checking range. */
static double opt_number(lua_State *L, const char *name, double lo, double hi)
{
    lua_getfield(L, 2, name);
    if (lua_type(L, -1) != LUA_TNUMBER)
        luaL_error(L, "option %s must be a number (got %s)", name, luaL_typename(L, -1));
    double v = lua_tonumber(L, -1);
    lua_pop(L, 1);
    if (!(v >= lo && v <= hi))
        luaL_error(L, "option %s must be between %f and %f (got %f)", name, lo, hi, v);
    return v;
}

static int opt_bool(lua_State *L, const char *name)
{
    lua_getfield(L, 2, name);
    int v = lua_toboolean(L, -1);
    lua_pop(L, 1);
    return v;
}

/* Appends the contents of u->scratch to b behind a varint length. */
static void append_prefixed(lua_State *L, pz_buf *b, const pz_buf *part)
{
    uint8_t v[PZ_VARINT_MAX_BYTES];
    size_t n = pz_put_varint(v, part->len);
    if (pz_buf_append(b, v, n) != 0 || pz_buf_append(b, part->data, part->len) != 0)
        luaL_error(L, "cannot start the pool: out of memory");
}

/* Builds the INIT payload of slot i (1-based) from the spec table on top
 * of the stack: {kind = "value" | "module" | "deferred", spec = v,
 * args = {n = ...}}.  See frame.h for the layout. */
static void build_init(lua_State *L, lpool *u, int i, const pz_options *o)
{
    int spec = lua_gettop(L), top;
    pz_buf *b = &u->init[i - 1];
    char root[64];

    lua_getglobal(L, "package");
    lua_getfield(L, -1, "path");
    lua_getfield(L, -2, "cpath");
    lua_remove(L, -3);
    lua_pushinteger(L, i - 1);
    lua_pushnumber(L, (lua_Number)o->max_message);
    lua_getfield(L, spec, "kind");
    lua_pushnumber(L, (lua_Number)o->spin_ns);
    u->scratch.len = 0;
    pz_encode_tuple(L, spec + 1, 6, &u->scratch, "init", 0);
    append_prefixed(L, b, &u->scratch);
    lua_settop(L, spec);

    lua_getfield(L, spec, "spec");
    snprintf(root, sizeof root, "executors[%d]", i);
    u->scratch.len = 0;
    pz_encode_value(L, -1, &u->scratch, root, 0);
    append_prefixed(L, b, &u->scratch);
    lua_pop(L, 1);

    lua_getfield(L, spec, "args");
    top = lua_gettop(L);
    int n = 0;
    if (lua_istable(L, top)) {
        lua_getfield(L, top, "n");
        n = (int)lua_tointeger(L, -1);
        lua_pop(L, 1);
        luaL_checkstack(L, n, "too many constructor arguments");
        for (int k = 1; k <= n; k++)
            lua_rawgeti(L, top, k);
    }
    snprintf(root, sizeof root, "executors[%d].args", i);
    u->scratch.len = 0;
    pz_encode_tuple(L, top + 1, n, &u->scratch, root, 0);
    if (pz_buf_append(b, u->scratch.data, u->scratch.len) != 0)
        luaL_error(L, "cannot start the pool: out of memory");
    if (b->len > o->max_message)
        luaL_error(L, "executor %d is %f bytes encoded, above max_message (%f)", i,
                   (double)b->len, (double)o->max_message);
    lua_settop(L, spec);
}

/* core.pool_new(specs, options) -> pool.  specs: an array of
 * {kind =, spec =, args =}, one per worker; options: every option set
 * (the Lua layer fills in defaults). */
static int l_pool_new(lua_State *L)
{
    pz_options o;
    luaL_checktype(L, 1, LUA_TTABLE);
    luaL_checktype(L, 2, LUA_TTABLE);
    int n = (int)lua_objlen(L, 1);
    if (n < 1)
        return luaL_error(L, "a pool needs at least one executor");
    o.max_deaths = (int)opt_number(L, "max_deaths", 1, 255);
    o.respawn = opt_bool(L, "respawn");
    o.max_message = (uint32_t)opt_number(L, "max_message", 1024, MAX_MESSAGE_LIMIT);
    o.max_inflight = (uint32_t)opt_number(L, "max_inflight", 1, 1 << 20);
    o.window_ns = (int64_t)(opt_number(L, "window", 0, 3600) * 1e9);
    o.init_attempts = (int)opt_number(L, "init_attempts", 1, 1000);
    o.kill_grace_ns = (int64_t)(opt_number(L, "kill_grace", 0, 3600) * 1e9);
    o.spin_ns = (int64_t)(opt_number(L, "spin", 0, 0.01) * 1e9);

    lpool *u = (lpool *)lua_newuserdata(L, sizeof *u);
    memset(u, 0, sizeof *u);
    u->scratch = (pz_buf)PZ_BUF_INIT;
    luaL_getmetatable(L, POOL_MT);
    lua_setmetatable(L, -2);
    int ud = lua_gettop(L);

    lua_createtable(L, 0, 8);
    for (size_t i = 0; i < sizeof env_tables / sizeof *env_tables; i++) {
        lua_newtable(L);
        lua_setfield(L, -2, env_tables[i]);
    }
    lua_setfenv(L, ud);

    u->init = calloc((size_t)n, sizeof *u->init);
    if (!u->init)
        return luaL_error(L, "cannot start the pool: out of memory");
    u->ninit = n;
    for (int i = 1; i <= n; i++) {
        lua_rawgeti(L, 1, i);
        luaL_checktype(L, -1, LUA_TTABLE);
        build_init(L, u, i, &o);
        lua_pop(L, 1);
    }
    pz_buf_trim(&u->scratch, 0);

    const char *err = NULL;
    pz_buf *init = u->init;
    u->init = NULL; /* pz_pool_new owns it from here, even on failure */
    u->ninit = 0;
    u->nslots = n;
    u->pool = pz_pool_new(n, init, &o, &err);
    if (!u->pool)
        return luaL_error(L, "cannot start the pool: %s (%s)", err, strerror(errno));
    return 1;
}

/* ------------------------------------------------------------------------
 * Calls
 * --------------------------------------------------------------------- */

/* pool(...) -> id: encodes the arguments and queues the call.  Nothing is
 * queued when an argument cannot be encoded (the error says which). */
static int l_pool_call(lua_State *L)
{
    lpool *u = check_running(L, 1);
    pz_pool *p = u->pool;
    int nargs = lua_gettop(L) - 1;
    pz_buf *s = &u->scratch;
    s->len = 0;
    pz_encode_tuple(L, 2, nargs, s, "args", 0);
    if (s->len > p->opt.max_message)
        return luaL_error(L, "cannot queue the call: its arguments are %f bytes encoded, "
                             "above max_message (%f)",
                          (double)s->len, (double)p->opt.max_message);
    char *d = pz_spsc_reserve(&p->submit, PZ_FRAME_HEADER + s->len);
    if (!d)
        return luaL_error(L, "cannot queue the call: out of memory");
    uint64_t id = p->next_id++;
    pz_frame_header(d, PZ_F_CALL, 0, id, (uint32_t)s->len);
    memcpy(d + PZ_FRAME_HEADER, s->data, s->len);
    pz_spsc_advance(&p->submit, PZ_FRAME_HEADER + s->len);
    if (s->cap > (1u << 20))
        pz_buf_trim(s, 0);
    pz_pool_kick(p);
    lua_pushnumber(L, (lua_Number)id);
    return 1;
}

/* core.pool_drain(pool): moves the records received so far into the
 * environment tables. */
static int l_pool_drain(lua_State *L)
{
    lpool *u = to_lpool(L, 1);
    drain(L, u, 1);
    return 0;
}

/* core.pool_wait(pool, what [, timeout]) -> status: what is "calls" (every
 * queued call finished) or "init" (every worker initialized or given up).
 * Returns "done", "timeout", "interrupted" (a signal arrived: the caller's
 * interrupt hook, if any, fires on return) or "fatal" (no worker is left;
 * env.fatal says why). */
static int l_pool_wait(lua_State *L)
{
    lpool *u = check_running(L, 1);
    pz_pool *p = u->pool;
    static const char *const kinds[] = {"calls", "init", NULL};
    int kind = luaL_checkoption(L, 2, NULL, kinds) == 0 ? PZ_WAIT_CALLS : PZ_WAIT_INIT;
    int64_t deadline = -1;
    if (!lua_isnoneornil(L, 3)) {
        double t = luaL_checknumber(L, 3);
        luaL_argcheck(L, t >= 0, 3, "timeout must not be negative");
        deadline = pz_now_ns() + (int64_t)(fmin(t, 1e9) * 1e9);
    }
    for (;;) {
        int settled = atomic_load(&p->settled);
        drain(L, u, 1);
        if (kind == PZ_WAIT_CALLS ? p->drained + 1 >= p->next_id : settled >= u->nslots) {
            lua_pushliteral(L, "done");
            return 1;
        }
        if (u->fatal_seen) {
            lua_pushliteral(L, "fatal");
            return 1;
        }
        int r = pz_pool_sleep(p, kind, deadline);
        if (r == PZ_WAIT_INTERRUPTED || r == PZ_WAIT_TIMEOUT) {
            drain(L, u, 1);
            lua_pushstring(L, r == PZ_WAIT_TIMEOUT ? "timeout" : "interrupted");
            return 1;
        }
    }
}

/* core.pool_counts(pool) -> calls, finished: calls queued so far, and how
 * many of them have a result or an error in the Lua tables. */
static int l_pool_counts(lua_State *L)
{
    lpool *u = to_lpool(L, 1);
    lua_pushnumber(L, u->pool ? (lua_Number)(u->pool->next_id - 1) : u->calls);
    lua_pushnumber(L, u->pool ? (lua_Number)u->pool->drained : u->finished);
    return 2;
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
    append(c->L, c->list);
}

/* Protected: turns the CALL frame in string 1 into {n =, id =, ...}. */
static int decode_aborted(lua_State *L)
{
    size_t n;
    const char *frame = lua_tolstring(L, 1, &n);
    push_args(L, frame + PZ_FRAME_HEADER, n - PZ_FRAME_HEADER);
    lua_pushnumber(L, (lua_Number)pz_frame_id(frame));
    lua_setfield(L, -2, "id");
    return 1;
}

/* core.pool_stop(pool [, finish_timeout]) -> aborted: stops dispatching,
 * lets the calls workers hold finish (terminating them once finish_timeout
 * seconds have passed, when given), ends every process, then returns the
 * arguments of every call that never finished.  A stopped pool returns {}. */
static int l_pool_stop(lua_State *L)
{
    lpool *u = to_lpool(L, 1);
    int64_t finish = -1;
    if (!lua_isnoneornil(L, 2)) {
        double t = luaL_checknumber(L, 2);
        luaL_argcheck(L, t >= 0, 2, "finish_timeout must not be negative");
        finish = pz_now_ns() + (int64_t)(fmin(t, 1e9) * 1e9);
    }
    lua_settop(L, 1);
    lua_newtable(L); /* 2: the aborted calls */
    if (!u->pool)
        return 1;
    pz_pool_stop(u->pool, finish);
    drain(L, u, 1);
    /* The frames are copied out and the pool freed before any argument is
     * decoded: decoding may fail (an argument naming a module the parent
     * no longer has), and the pool must end stopped whatever happens. */
    lua_newtable(L); /* 3: their frames */
    aborted_ctx c = {L, 3};
    pz_pool_aborted(u->pool, add_aborted, &c);
    u->calls = (double)(u->pool->next_id - 1);
    u->finished = (double)u->pool->drained;
    pz_pool_free(u->pool);
    u->pool = NULL;
    int n = (int)lua_objlen(L, 3);
    for (int i = 1; i <= n; i++) {
        lua_pushcfunction(L, decode_aborted);
        lua_rawgeti(L, 3, i);
        if (lua_pcall(L, 1, 1, 0) != 0) {
            const char *why = lua_tostring(L, -1);
            lua_rawgeti(L, 3, i);
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
        lua_rawseti(L, 2, i);
    }
    lua_settop(L, 2);
    return 1;
}

/* __gc: a pool collected (or closed with its state) without stop is
 * terminated at once, and its processes are reaped. */
static int l_pool_gc(lua_State *L)
{
    lpool *u = (lpool *)lua_touserdata(L, 1);
    if (u->pool) {
        pz_pool_stop(u->pool, pz_now_ns());
        pz_pool_free(u->pool);
        u->pool = NULL;
    }
    free_init(u);
    pz_buf_free(&u->scratch);
    return 0;
}

static int l_pool_tostring(lua_State *L)
{
    lpool *u = to_lpool(L, 1);
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

/* core.pool_env(pool) -> the environment table (see the top of this file). */
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
    lua_pushboolean(L, !u->pool);
    return 1;
}

void pz_lpool_register(lua_State *L)
{
    static const luaL_Reg funcs[] = {
        {"pool_new", l_pool_new},       {"pool_drain", l_pool_drain},
        {"pool_wait", l_pool_wait},     {"pool_stop", l_pool_stop},
        {"pool_counts", l_pool_counts}, {"pool_size", l_pool_size},
        {"pool_env", l_pool_env},       {"pool_stopped", l_pool_stopped},
        {NULL, NULL}};
    if (luaL_newmetatable(L, POOL_MT)) {
        lua_pushcfunction(L, l_pool_gc);
        lua_setfield(L, -2, "__gc");
        lua_pushcfunction(L, l_pool_call);
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
}
