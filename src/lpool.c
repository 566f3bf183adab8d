/*
 * lpool.c - the pool as Lua sees it: a full userdata whose __call queues a
 * call, and the functions the Lua layer (lua/parallelize.lua) builds
 * Parallelize from.  Each function checks its arguments, calls pool.c and
 * pushes what it returns; the policy (defaults, option ranges, messages
 * about misuse) is the Lua layer's.
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
 *   fatal        why the pool cannot go on, once it cannot
 *
 * Re-entrancy.  Lua code can run inside these functions: a __gc finalizer
 * (a collection can start at any allocation), or the top-level code of a
 * module that a decoded value names.  If that code uses the same pool:
 *   - p(...) works: a call made while another is encoding its arguments
 *     encodes into a buffer of its own, and each is queued whole;
 *   - reading the pool while it drains records sees the tables as they are
 *     (a nested drain does nothing);
 *   - waiting or stopping while records are drained, and stopping while
 *     p(...) encodes, raise "the pool is busy: ..." instead of corrupting
 *     the pool or waiting forever.
 *
 * Everything malloc'ed is owned by a userdata, so an error raised while
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
#include "handshake.h"
#include "lpool.h"
#include "pool.h"
#include "sys.h"

#define POOL_MT "parallelize.pool"
#define BUFFER_MT "parallelize.buffer"

/* Largest max_message.  Frame lengths are 32 bits, and the largest record,
 * an error carrying its call's arguments and a message from the worker,
 * holds two messages and a few varints: 2 GiB less 1 KiB each fits.
 * parallelize.lua reads it as core.max_message_limit. */
#define MAX_MESSAGE_LIMIT (2147483648.0 - 1024)

/* What pool workers run to prepare their Lua states (pz_lpool_register). */
static pz_state_setup worker_setup;

typedef struct lpool {
    pz_pool *pool;     /* NULL once released */
    pz_buf scratch;    /* arguments being encoded by p(...) */
    uintptr_t encoding_at; /* frame of the p(...) encoding into scratch, or 0 */
    int draining;      /* records are being turned into Lua values */
    pz_buf *init;      /* INIT payloads until the pool owns them */
    int ninit;
    char ***launch;    /* launchers' argv (pool.h) until the pool owns them */
    int nslots;
    double calls;      /* after stop: calls queued in all */
    double finished;   /* after stop: calls with a result or an error */
} lpool;

/* The address of the caller's stack frame.  The C stack grows down, so a
 * call that runs while another is still inside this module (from a
 * finalizer, say) has its frame below that one's; a frame recorded by a
 * call that raised since is at or below where later calls from the same
 * place run. */
static inline uintptr_t frame_here(void)
{
    return (uintptr_t)__builtin_frame_address(0);
}

/* True when a p(...) of this pool is encoding its arguments further up
 * this thread's stack. */
static int encoding_above(const lpool *u, uintptr_t here)
{
    return u->encoding_at != 0 && here < u->encoding_at;
}

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

/* Raises when records are being drained: `what` cannot run from Lua code
 * that runs meanwhile. */
static void check_not_draining(lua_State *L, const lpool *u, const char *what)
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

/* A pz_buf owned by a userdata (pushed), for the rare encode that cannot use
 * the pool's scratch buffer. */
static int buffer_gc(lua_State *L)
{
    pz_buf_free((pz_buf *)lua_touserdata(L, 1));
    return 0;
}

static pz_buf *push_buffer(lua_State *L)
{
    pz_buf *b = (pz_buf *)lua_newuserdata(L, sizeof *b);
    *b = (pz_buf)PZ_BUF_INIT;
    luaL_getmetatable(L, BUFFER_MT);
    lua_setmetatable(L, -2);
    return b;
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
    pz_error_parts e;
    if (pz_record_error(f, &e) != 0)
        luaL_error(L, "internal error: malformed ERROR record");
    lua_createtable(L, 0, 4);
    lua_pushnumber(L, (lua_Number)f->id);
    lua_setfield(L, -2, "id");
    push_args(L, e.args, e.args_len);
    lua_setfield(L, -2, "args");
    set_string(L, "message", e.message, e.message_len);
    set_string(L, "traceback", e.traceback, e.traceback_len);
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
    pz_error_parts e;
    if (pz_record_init_error(f, &e) != 0)
        luaL_error(L, "internal error: malformed INIT_ERROR record");
    lua_createtable(L, 0, 3);
    lua_pushinteger(L, (lua_Integer)f->id + 1);
    lua_setfield(L, -2, "worker");
    set_string(L, "message", e.message, e.message_len);
    set_string(L, "traceback", e.traceback, e.traceback_len);
    append(L, D_INIT_ERRORS);
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
    while (pz_pool_peek_record(u->pool, &f)) {
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
        default:
            break;
        }
        pz_pool_consume(u->pool, &f);
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
    if (!pz_pool_peek_record(u->pool, &f))
        return 0;
    const char *why = lua_isstring(L, -1) ? lua_tostring(L, -1) : "unknown error";
    if (f.type == PZ_F_RESULT || f.type == PZ_F_ERROR) {
        pz_error_parts e;
        /* An error keeps its own message; its arguments are what failed. */
        int has_message = f.type == PZ_F_ERROR && pz_record_error(&f, &e) == 0;
        lua_createtable(L, 0, 4);
        lua_pushnumber(L, (lua_Number)f.id);
        lua_setfield(L, -2, "id");
        lua_createtable(L, 0, 1);
        lua_pushinteger(L, 0);
        lua_setfield(L, -2, "n");
        lua_setfield(L, -2, "args");
        if (has_message) {
            lua_pushlstring(L, e.message, e.message_len);
            lua_pushfstring(L, "%s (its arguments cannot be decoded in the parent: %s)",
                            lua_tostring(L, -1), why);
            lua_remove(L, -2);
        } else {
            lua_pushfstring(L, "the result of call %d cannot be used in the parent: %s",
                            (int)f.id, why);
        }
        lua_setfield(L, -2, "message");
        if (has_message)
            lua_pushlstring(L, e.traceback, e.traceback_len);
        else
            lua_pushliteral(L, "");
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
    pz_pool_consume(u->pool, &f);
    return 1;
}

/* Protected: lpool light userdata at 1, pool userdata at 2.  Drains every
 * record (drain_records), turning a record that cannot be decoded into an
 * error of its own (salvage_record), so that one bad record neither blocks
 * the others nor is lost. */
static int drain_all(lua_State *L)
{
    lpool *u = (lpool *)lua_touserdata(L, 1);
    lua_getfenv(L, 2);
    int env = lua_gettop(L);
    /* The tables drain_records fills, checked here once: a table replaced
     * through the internal core.pool_env would make every attempt below
     * fail, so it is refused before any record is touched. */
    for (size_t i = 0; i < sizeof env_tables / sizeof *env_tables; i++) {
        lua_getfield(L, env, env_tables[i]);
        if (!lua_istable(L, -1))
            return luaL_error(L, "p.%s is no longer a table", env_tables[i]);
    }
    for (;;) {
        lua_pushcfunction(L, drain_records);
        lua_pushlightuserdata(L, u);
        for (int i = env; i < env + D_TOP - 1; i++) /* env and its tables */
            lua_pushvalue(L, i);
        int rc = lua_pcall(L, D_TOP, 0, 0);
        if (rc == 0)
            break;
        /* The record at the head raised (even for lack of memory: a huge
         * result): it becomes an error value.  An error no record caused
         * is raised.  What a failed decode built is garbage now: collect it
         * first, so that the error fits. */
        if (rc == LUA_ERRMEM)
            lua_gc(L, LUA_GCCOLLECT, 0);
        if (!salvage_record(L, u, env))
            return lua_error(L);
        lua_settop(L, env + D_TOP - 1);
    }
    const char *fatal = pz_pool_fatal(u->pool);
    if (fatal) {
        lua_pushstring(L, fatal);
        lua_setfield(L, env, "fatal");
    }
    return 0;
}

/* Moves every published record into the environment table of the pool
 * userdata at idx.  A drain started by Lua code that runs inside another
 * drain does nothing: the outer one is on it.
 *
 * Hooks are off meanwhile: Ctrl-C sets a hook that raises "interrupted!"
 * at the next call, and that call could be drain's own lua_pcall, whose
 * error would then be taken for a record that cannot be decoded.  A hook
 * set while draining (by a signal handler) is kept for the caller. */
static void drain(lua_State *L, lpool *u, int idx)
{
    if (!u->pool || u->draining)
        return;
    idx = idx < 0 ? lua_gettop(L) + idx + 1 : idx;
    lua_Hook hook = lua_gethook(L);
    int mask = lua_gethookmask(L), count = lua_gethookcount(L);
    if (hook)
        lua_sethook(L, NULL, 0, 0);
    u->draining = 1;
    lua_pushcfunction(L, drain_all);
    lua_pushlightuserdata(L, u);
    lua_pushvalue(L, idx);
    int rc = lua_pcall(L, 2, 0, 0);
    u->draining = 0;
    if (hook && !lua_gethook(L))
        lua_sethook(L, hook, mask, count);
    if (rc != 0)
        lua_error(L);
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

/* Appends `part` to b behind a varint length. */
static void append_prefixed(lua_State *L, pz_buf *b, const pz_buf *part)
{
    uint8_t v[PZ_VARINT_MAX_BYTES];
    size_t n = pz_put_varint(v, part->len);
    if (pz_buf_append(b, v, n) != 0 || pz_buf_append(b, part->data, part->len) != 0)
        luaL_error(L, "cannot start the pool: out of memory");
}

/* Pushes the worker settings of the INIT frame (frame.h). */
static void push_settings(lua_State *L, int spec, const pz_options *o)
{
    lua_createtable(L, 0, 5);
    lua_getglobal(L, "package");
    lua_getfield(L, -1, "path");
    lua_setfield(L, -3, "path");
    lua_getfield(L, -1, "cpath");
    lua_setfield(L, -3, "cpath");
    lua_pop(L, 1);
    lua_getfield(L, spec, "kind");
    lua_setfield(L, -2, "kind");
    lua_pushnumber(L, (lua_Number)o->max_message);
    lua_setfield(L, -2, "max_message");
    lua_pushnumber(L, (lua_Number)o->spin_ns);
    lua_setfield(L, -2, "spin_ns");
    lua_pushboolean(L, o->kill_leftovers);
    lua_setfield(L, -2, "kill_leftovers");
}

/* Builds the INIT payload of slot i (1-based) from the spec table on top
 * of the stack: {kind = "value" | "module" | "deferred", spec = v,
 * args = {n = ...}}.  See frame.h for the layout; it starts with the
 * versions of the handshake (handshake.h). */
static void build_init(lua_State *L, lpool *u, int i, const pz_options *o, const pz_versions *v)
{
    int spec = lua_gettop(L), top;
    pz_buf *b = &u->init[i - 1];
    char root[64];

    if (pz_handshake_put(b, v) != 0)
        luaL_error(L, "cannot start the pool: out of memory");
    push_settings(L, spec, o);
    u->scratch.len = 0;
    pz_encode_value(L, -1, &u->scratch, "settings", 0);
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
 * option set, checked by the Lua layer. */
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
    pz_versions versions;
    pz_versions_of(L, &versions);
    for (int i = 1; i <= n; i++) {
        lua_rawgeti(L, 1, i);
        luaL_checktype(L, -1, LUA_TTABLE);
        build_init(L, u, i, &o, &versions);
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
    return 1;
}

/* ------------------------------------------------------------------------
 * Calls
 * --------------------------------------------------------------------- */

/* True when the values at first .. first+count-1 are all numbers, strings,
 * booleans or nil: encoding them runs no Lua code. */
static int all_scalars(lua_State *L, int first, int count)
{
    for (int i = first; i < first + count; i++) {
        int t = lua_type(L, i);
        if (t != LUA_TNUMBER && t != LUA_TSTRING && t != LUA_TBOOLEAN && t != LUA_TNIL)
            return 0;
    }
    return 1;
}

/* pool(...) -> id: encodes the arguments and queues the call.  Nothing is
 * queued when an argument cannot be encoded (the error says which).
 *
 * Arguments are encoded into the pool's scratch buffer.  Encoding tables
 * or functions can run Lua code (a finalizer), which may call p(...)
 * again: that inner call finds the scratch buffer taken (encoding_at marks
 * the outer call's frame above it) and encodes into a buffer of its own. */
static int l_pool_call(lua_State *L)
{
    lpool *u = check_running(L, 1);
    int nargs = lua_gettop(L) - 1;
    uintptr_t here = frame_here();
    pz_buf *b = &u->scratch;
    int claimed = 0;
    if (encoding_above(u, here)) {
        b = push_buffer(L);
    } else if (!all_scalars(L, 2, nargs)) {
        u->encoding_at = here; /* a raise leaves it stale: see frame_here */
        claimed = 1;
    }
    b->len = 0;
    pz_encode_tuple(L, 2, nargs, b, "args", 0);
    if (claimed)
        u->encoding_at = 0;
    /* Lua code that ran while encoding may have stopped the pool. */
    pz_pool *p = u->pool;
    if (!p || p->stopped)
        return luaL_error(L, "the pool is stopped");
    if (b->len > p->opt.max_message)
        return luaL_error(L, "cannot queue the call: its arguments are %f bytes encoded, "
                             "above max_message (%f)",
                          (double)b->len, (double)p->opt.max_message);
    uint64_t id = pz_pool_submit(p, b->data, b->len);
    if (b == &u->scratch && b->cap > (1u << 20))
        pz_buf_trim(b, 0);
    if (id == 0)
        return luaL_error(L, "cannot queue the call: out of memory");
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
 * interrupt hook, if any, fires on return) or "fatal" (the pool cannot go
 * on: env.fatal says why). */
static int l_pool_wait(lua_State *L)
{
    lpool *u = check_running(L, 1);
    pz_pool *p = u->pool;
    static const char *const kinds[] = {"calls", "init", NULL};
    int kind = luaL_checkoption(L, 2, NULL, kinds) == 0 ? PZ_WAIT_CALLS : PZ_WAIT_INIT;
    check_not_draining(L, u, kind == PZ_WAIT_CALLS ? "p:wait()" : "p.executors");
    int64_t deadline = deadline_from(L, 3);
    for (;;) {
        int settled = pz_pool_slots_settled(p);
        drain(L, u, 1);
        if (kind == PZ_WAIT_CALLS ? pz_pool_finished(p) >= pz_pool_calls(p) : settled >= u->nslots) {
            lua_pushliteral(L, "done");
            return 1;
        }
        int r = pz_pool_sleep(p, kind, deadline);
        if (r == PZ_WAIT_FATAL) {
            drain(L, u, 1);
            lua_pushliteral(L, "fatal");
            return 1;
        }
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
    lua_pushnumber(L, u->pool ? (lua_Number)pz_pool_calls(u->pool) : u->calls);
    lua_pushnumber(L, u->pool ? (lua_Number)pz_pool_finished(u->pool) : u->finished);
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
    push_args(L, pz_frame_payload(frame), n - PZ_FRAME_HEADER);
    lua_pushnumber(L, (lua_Number)pz_frame_id(frame));
    lua_setfield(L, -2, "id");
    return 1;
}

/* Pushes the list of aborted calls, {n =, id =, ...} each, from the list of
 * their frames at index frames. */
static void push_aborted(lua_State *L, int frames)
{
    int n = (int)lua_objlen(L, frames);
    lua_createtable(L, n, 0);
    for (int i = 1; i <= n; i++) {
        lua_pushcfunction(L, decode_aborted);
        lua_rawgeti(L, frames, i);
        if (lua_pcall(L, 1, 1, 0) != 0) {
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

/* core.pool_stop(pool [, finish_timeout]) -> aborted: stops dispatching,
 * lets the calls workers hold finish (terminating them once finish_timeout
 * seconds have passed, when given), ends every process, then returns the
 * arguments of every call that never finished.  A stopped pool returns {}. */
static int l_pool_stop(lua_State *L)
{
    lpool *u = to_lpool(L, 1);
    int64_t finish = deadline_from(L, 2);
    lua_settop(L, 1);
    if (!u->pool) {
        lua_newtable(L);
        return 1;
    }
    check_not_draining(L, u, "p:stop()");
    if (encoding_above(u, frame_here()))
        return luaL_error(L, "the pool is busy: p:stop() called while p(...) encodes its "
                             "arguments (from a __gc finalizer?); call it afterwards");
    pz_pool_stop(u->pool, finish);
    drain(L, u, 1);
    /* The frames are copied out and the pool freed before any argument is
     * decoded: decoding may fail (an argument naming a module the parent
     * no longer has), and the pool must end stopped whatever happens. */
    lua_newtable(L); /* 2: their frames */
    aborted_ctx c = {L, 2};
    pz_pool_aborted(u->pool, add_aborted, &c);
    u->calls = (double)pz_pool_calls(u->pool);
    u->finished = (double)pz_pool_finished(u->pool);
    pz_pool_free(u->pool);
    u->pool = NULL;
    push_aborted(L, 2);
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

void pz_lpool_register(lua_State *L, pz_state_setup setup)
{
    static const luaL_Reg funcs[] = {
        {"pool_new", l_pool_new},       {"pool_drain", l_pool_drain},
        {"pool_wait", l_pool_wait},     {"pool_stop", l_pool_stop},
        {"pool_counts", l_pool_counts}, {"pool_size", l_pool_size},
        {"pool_env", l_pool_env},       {"pool_stopped", l_pool_stopped},
        {NULL, NULL}};
    worker_setup = setup;
    if (luaL_newmetatable(L, BUFFER_MT)) {
        lua_pushcfunction(L, buffer_gc);
        lua_setfield(L, -2, "__gc");
    }
    lua_pop(L, 1);
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
    lua_pushnumber(L, MAX_MESSAGE_LIMIT);
    lua_setfield(L, -2, "max_message_limit");
}
