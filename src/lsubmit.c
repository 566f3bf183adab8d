/*
 * lsubmit.c - queuing calls from Lua: p(...), core.pool_submit and
 * core.pool_submit_each encode their arguments and queue them (pool.h),
 * waiting first while the pool has no room (max_pending,
 * max_pending_bytes); p(x) of one number or short string from compiled
 * code queues through core.fast_submit, which never raises nor waits
 * (its section below).  Main thread only; the rules about Lua code that
 * runs while arguments are encoded are lpool.c's (its header comment).
 */
#include <math.h>
#include <stdint.h>

#include <lauxlib.h>
#include <lua.h>

#include "codec.h"
#include "codec_format.h"
#include "frame.h"
#include "ldefer.h"
#include "lpool.h"
#include "pool.h"

#define BUFFER_MT "parallelize.buffer"

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

/* Registry key of encode_chunk (its address is what counts): kept there,
 * so that no closure is made for each chunk (an allocation, which can run
 * finalizers where nothing may raise). */
static const char reg_encode_chunk = 0;

/* Protected: encodes the chunk (items at 1, n at 2) into a buffer of its
 * own, which it returns, each item apart (PZ_ENCODE_APART: as its own call
 * would be), its big strings through the arena writer at 3 (NULL: none).
 * The buffer is made here, inside the protection: its allocation can run
 * finalizers, which may raise. */
static int encode_chunk(lua_State *L)
{
    pz_arena_writer *w = (pz_arena_writer *)lua_touserdata(L, 3);
    pz_buf *b = push_buffer(L);
    pz_encode_tuple(L, 1, 2, b, "args", PZ_ENCODE_APART, w);
    return 1;
}

void pz_lsubmit_prepare(lua_State *L)
{
    if (luaL_newmetatable(L, BUFFER_MT)) {
        lua_pushcfunction(L, buffer_gc);
        lua_setfield(L, -2, "__gc");
    }
    lua_pop(L, 1);
    lua_pushlightuserdata(L, (void *)&reg_encode_chunk);
    lua_pushcfunction(L, encode_chunk);
    lua_rawset(L, LUA_REGISTRYINDEX);
}

/* The most bytes the arguments at first .. first + count - 1 take encoded
 * when every one is a scalar (no more than pz_encode_scalar reserves for
 * each), or 0 when one is not.  *big: the bytes of the strings among them
 * long enough for the arena (PZ_SHARED_MIN). */
static size_t scalars_bound(lua_State *L, int first, int count, size_t *big)
{
    size_t bound = PZ_VARINT_MAX_BYTES, n;
    *big = 0;
    for (int i = first; i < first + count; i++) {
        switch (lua_type(L, i)) {
        case LUA_TNUMBER:
            bound += PZ_NUMBER_MAX_BYTES;
            break;
        case LUA_TSTRING:
            n = lua_objlen(L, i);
            bound += 1 + PZ_VARINT_MAX_BYTES + n;
            if (n >= PZ_SHARED_MIN)
                *big += n;
            break;
        case LUA_TBOOLEAN:
        case LUA_TNIL:
            bound += 1;
            break;
        default:
            return 0;
        }
    }
    return bound;
}

/* Whether the calls pending as of the I/O thread's counts `taken` and
 * `bytes_taken` leave room for one more. */
static int room_as_of(lpool *u, uint64_t taken, uint64_t bytes_taken)
{
    pz_pool *p = u->pool;
    uint64_t pending = p->next_id - 1 - taken; /* pz_pool_pending, as of `taken` */
    return (u->max_pending == 0 || pending < u->max_pending) &&
           (pending == 0 || p->bytes_submitted - bytes_taken + pz_arena_pending_bytes(p->arena) <
                                u->max_pending_bytes);
}

int pz_lpool_has_room(lpool *u)
{
    pz_pool *p = u->pool;
    if (pz_lpool_arena_full(u))
        return 0;
    /* The counts as last read first: older ones only overstate what is
     * pending, so room by them is room.  Read at every call, the I/O
     * thread's counts cost a cache miss whenever it had published.  They
     * are read every 1024th call anyway, so that the arena's list of
     * pending big strings (pz_arena_forget_taken) stays short when
     * max_pending_bytes is too high ever to say no. */
    if ((p->next_id & 1023) != 0 && room_as_of(u, p->taken_seen, p->bytes_taken_seen))
        return 1;
    p->taken_seen = atomic_load(&p->calls_taken);
    p->bytes_taken_seen = atomic_load(&p->bytes_taken);
    pz_arena_forget_taken(p->arena, p->taken_seen);
    return room_as_of(u, p->taken_seen, p->bytes_taken_seen);
}

int pz_lpool_arena_full(lpool *u)
{
    return u->arena_need && pz_arena_calls_full(u->pool->arena, u->arena_need);
}

/* While the pool has no room (pz_lpool_has_room), p(...) waits: through the Lua
 * layer's env.wait_room(p), so that Ctrl-C's hook can fire in its loop (a
 * C function cannot let it).  arena_need: the bytes of big strings the
 * call would place in the arena's calls area, whose room it waits for too
 * (u->arena_need), unless it runs inside a drain, which cannot wait: what
 * does not fit then goes inline. */
static void wait_for_room(lua_State *L, lpool *u, int pool_idx, size_t arena_need)
{
    u->arena_need = u->draining ? 0 : arena_need;
    if (pz_lpool_has_room(u)) {
        u->arena_need = 0;
        return;
    }
    pz_lpool_check_not_draining(L, u, "a p(...) that must wait for room (max_pending, max_pending_bytes)");
    lua_getfenv(L, pool_idx);
    lua_getfield(L, -1, "wait_room");
    lua_pushvalue(L, pool_idx);
    lua_call(L, 1, 0); /* a raise leaves arena_need set: the next wait sets it again */
    lua_pop(L, 1);
    u->arena_need = 0;
    /* A finalizer that ran on the way out of the wait may have stopped it. */
    pz_lpool_check_running(L, pool_idx);
}

/* submit's path for arguments that are all scalars, `bound` bytes at most
 * encoded (scalars_bound): encoded where the call waits.  A p(...) that is
 * encoding tables further up the stack cannot be in the way: it queues
 * its call only once it has encoded it whole. */
static int submit_scalars(lua_State *L, lpool *u, int first, int nargs, size_t bound, uint8_t tag,
                          uint32_t timeout_ms)
{
    pz_pool *p = u->pool;
    char *d = pz_pool_reserve_call(p, bound);
    if (!d)
        return luaL_error(L, "cannot queue the call: out of memory");
    /* The room is enough for every pz_encode_scalar: none reallocates it. */
    pz_buf view = {d, 0, bound};
    pz_encode_tuple(L, first, nargs, &view, "args", 0, NULL);
    if (view.len > p->opt.max_message)
        return luaL_error(L, "cannot queue the call: its arguments are %f bytes encoded, "
                             "above max_message (%f)",
                          (double)view.len, (double)p->opt.max_message);
    uint64_t id = pz_pool_commit_call(p, view.len, tag, timeout_ms, 0);
    if (tag)
        u->tag_outstanding[tag]++;
    lua_pushnumber(L, (lua_Number)id);
    return 1;
}

/* Queues the argument tuple encoded in b for `tag` with timeout_ms and
 * flags (pool.h), its big strings in cw's blocks (cw may be NULL), and
 * pushes the call's id.  Raises when it cannot: the pool was stopped (by
 * Lua code that ran while the arguments were encoded), the arguments are
 * above max_message (the big strings counted), or out of memory; cw's
 * blocks are given back first. */
static int queue_encoded(lua_State *L, lpool *u, pz_buf *b, pz_calls_writer *cw, uint8_t tag,
                         uint32_t timeout_ms, uint8_t flags)
{
    pz_pool *p = u->pool;
    size_t size = b->len + (cw ? cw->w.placed : 0);
    if (!p || p->stopped) {
        if (cw)
            pz_calls_writer_abandon(cw);
        return luaL_error(L, "the pool is stopped");
    }
    if (size > p->opt.max_message) {
        if (cw)
            pz_calls_writer_abandon(cw);
        return luaL_error(L, "cannot queue the call: its arguments are %f bytes encoded, "
                             "above max_message (%f)",
                          (double)size, (double)p->opt.max_message);
    }
    uint64_t id = pz_pool_submit(p, b->data, b->len, tag, timeout_ms, flags);
    if (b == &u->scratch && b->cap > (1u << 20))
        pz_buf_trim(b, 0);
    if (id != 0 && cw)
        pz_calls_writer_commit(cw, id);
    if (id == 0) {
        if (cw)
            pz_calls_writer_abandon(cw);
        return luaL_error(L, "cannot queue the call: out of memory");
    }
    if (tag)
        u->tag_outstanding[tag]++;
    lua_pushnumber(L, (lua_Number)id);
    return 1;
}

/* submit's path for arguments that are all scalars, some of them strings
 * of PZ_SHARED_MIN bytes or more: those go to the arena (what has no room
 * there goes inline), the rest into the scratch buffer, queued from there.
 * No Lua code runs while the arguments are encoded, so no other p(...)
 * can come in between; a raise (out of memory) leaves u->open_writer's
 * blocks taken, and the next call gives them back. */
static int submit_shared(lua_State *L, lpool *u, int first, int nargs, uint8_t tag,
                         uint32_t timeout_ms)
{
    pz_calls_writer *cw = &u->open_writer;
    pz_calls_writer_abandon(cw);
    pz_buf *b = pz_lpool_marked_above(u->encoding_at, pz_lpool_frame_here()) ? push_buffer(L) : &u->scratch;
    b->len = 0;
    pz_encode_tuple(L, first, nargs, b, "args", 0, pz_calls_writer_init(cw, u->pool->arena));
    return queue_encoded(L, u, b, cw, tag, timeout_ms, 0);
}

/* Encodes the arguments at first .. top and queues them for `tag` with
 * timeout_ms (pool.h); pushes the call's id.
 *
 * Arguments are encoded into the pool's scratch buffer.  Encoding tables
 * or functions can run Lua code (a finalizer), which may call p(...)
 * again: that inner call finds the scratch buffer taken (encoding_at marks
 * the outer call's frame above it) and encodes into a buffer of its own.
 * Nothing of the pool is used while the encode runs, so a p:stop() from
 * that Lua code is safe: the call then raises "the pool is stopped". */
static int submit(lua_State *L, lpool *u, int first, uint8_t tag, uint32_t timeout_ms)
{
    int nargs = lua_gettop(L) - first + 1;
    size_t big;
    size_t bound = scalars_bound(L, first, nargs, &big);
    pz_arena *arena = u->pool->arena;
    int shared = big && arena && bound > 0;
    /* The records in are drained as calls go out, once they pile up
     * (PZ_BACKLOG_WAKE), so that the done queue's chunks are reused while
     * they are warm.  Big strings among scalars go to the arena, which
     * has room once the records of calls holding it are drained (their
     * big results hold their workers' rings until then): for those every
     * record in is drained first, so that a loop of p(s) keeps both
     * flowing through shared memory, as they do when it waits for room. */
    if (shared ? pz_pool_published(u->pool) > pz_pool_finished(u->pool) : pz_pool_backlogged(u->pool)) {
        pz_lrecords_drain(L, u, 1);
        pz_lpool_check_running(L, 1); /* Lua code it ran may have stopped it */
    }
    if (shared) {
        wait_for_room(L, u, 1, big);
        return submit_shared(L, u, first, nargs, tag, timeout_ms);
    }
    wait_for_room(L, u, 1, 0);
    /* Scalars, which run no Lua code and whose size is known, are encoded
     * straight into the submit queue. */
    if (bound > 0 && bound - PZ_VARINT_MAX_BYTES <= u->pool->opt.max_message)
        return submit_scalars(L, u, first, nargs, bound, tag, timeout_ms);
    uintptr_t here = pz_lpool_frame_here();
    pz_buf *b = &u->scratch;
    int claimed = 0;
    if (pz_lpool_marked_above(u->encoding_at, here)) {
        b = push_buffer(L);
    } else {
        u->encoding_at = here; /* a raise leaves it stale: see frame_here */
        claimed = 1;
    }
    b->len = 0;
    pz_encode_tuple(L, first, nargs, b, "args", 0, NULL);
    if (claimed)
        u->encoding_at = 0;
    return queue_encoded(L, u, b, NULL, tag, timeout_ms, 0);
}

/* Raises unless the argument at 2, tag, is 0 or an active claim's. */
static void check_tag(lua_State *L, const lpool *u, int tag)
{
    luaL_argcheck(L, tag >= 0 && tag < PZ_TAGS && (tag == 0 || u->tag_state[tag] == PZ_TAG_ACTIVE),
                  2, "not an active tag");
}

/* pool(...) -> id: encodes the arguments and queues the call.  Nothing is
 * queued when an argument cannot be encoded (the error says which). */
int pz_lpool_call(lua_State *L)
{
    return submit(L, pz_lpool_check_running(L, 1), 2, 0, 0);
}

/* core.pool_submit(pool, tag, timeout, ...) -> id: a call for a map or
 * stream (tag, from pool_claim; 0 for the pool's own store) with a timeout
 * of its own (seconds; nil for the pool's, math.huge for none). */
int pz_lpool_submit(lua_State *L)
{
    lpool *u = pz_lpool_check_running(L, 1);
    int tag = (int)luaL_checkinteger(L, 2);
    check_tag(L, u, tag);
    uint32_t timeout_ms = 0;
    if (!lua_isnil(L, 3)) {
        /* Rounded, not truncated: 1.001 * 1e3 is 1000.9999999999999. */
        double t = round(luaL_checknumber(L, 3) * 1e3);
        timeout_ms = !(t < (double)PZ_NO_TIMEOUT) ? PZ_NO_TIMEOUT : t < 1 ? 1 : (uint32_t)t;
    }
    return submit(L, u, 4, (uint8_t)tag, timeout_ms);
}

/* How far a pool_submit_each has gone: what it returns, kept outside the
 * protected loop that may raise. */
typedef struct each_progress {
    lpool *u;
    uint8_t tag;
    int i, j;
    int next;        /* the item being queued, or j + 1 when all were */
    double first, last;
    int interleaved;
} each_progress;

/* Protected (the pool at 1, as submit wants it; list at 2, ids at 3, the
 * progress at 4): queues list[k] for k from progress->next to j, noting
 * each id as it goes. */
static int submit_each_loop(lua_State *L)
{
    each_progress *e = (each_progress *)lua_touserdata(L, 4);
    for (int k = e->next; k <= e->j; k = ++e->next) {
        lua_rawgeti(L, 2, k);
        submit(L, e->u, 5, e->tag, 0);
        double id = lua_tonumber(L, -1);
        lua_pop(L, 2);
        if (k == e->i) {
            e->first = id;
        } else if (!e->interleaved && id != e->last + 1) {
            e->interleaved = 1;
            for (int m = e->i; m < k; m++) {
                lua_pushnumber(L, e->first + (m - e->i));
                lua_rawseti(L, 3, m - e->i + 1);
            }
        }
        if (e->interleaved) {
            lua_pushnumber(L, id);
            lua_rawseti(L, 3, k - e->i + 1);
        }
        e->last = id;
    }
    return 0;
}

/* core.pool_submit_each(pool, tag, list, i, j, ids) -> first, last,
 * interleaved [, err, k]: queues list[k] as the one argument of a call,
 * for every k from i to j, for `tag` (as pool_submit).  The ids are
 * first .. last, one after the other, unless Lua code that ran while an
 * argument was encoded queued a call in between (interleaved is then
 * true, and ids[k - i + 1] holds each one's id).  When item k cannot be
 * queued (it cannot be encoded, Ctrl-C while waiting for room, a stopped
 * pool), the items before it stay queued: the call returns what they got
 * (first and last nil when none was), then the error and k, for the
 * caller to note them and raise.  One C call for a whole map: p(list[k])
 * from Lua, once a call, costs the main thread more than the call
 * itself. */
int pz_lpool_submit_each(lua_State *L)
{
    each_progress e = {0};
    e.u = pz_lpool_check_running(L, 1);
    int tag = (int)luaL_checkinteger(L, 2);
    check_tag(L, e.u, tag);
    e.tag = (uint8_t)tag;
    luaL_checktype(L, 3, LUA_TTABLE);
    e.i = (int)luaL_checkinteger(L, 4);
    e.j = (int)luaL_checkinteger(L, 5);
    luaL_checktype(L, 6, LUA_TTABLE);
    lua_settop(L, 6);
    e.next = e.i;
    lua_pushcfunction(L, submit_each_loop);
    lua_pushvalue(L, 1);
    lua_pushvalue(L, 3);
    lua_pushvalue(L, 6);
    lua_pushlightuserdata(L, &e);
    int rc = lua_pcall(L, 4, 0, 0);
    /* A mark below this frame is a raise's, left by a call that has
     * ended (frame_here): cleared, it cannot be taken for an encode in
     * progress by a later call from deeper down. */
    if (rc != 0 && e.u->encoding_at != 0 && e.u->encoding_at < pz_lpool_frame_here())
        e.u->encoding_at = 0;
    if (e.next > e.i) {
        lua_pushnumber(L, e.first);
        lua_pushnumber(L, e.last);
    } else {
        lua_pushnil(L);
        lua_pushnil(L);
    }
    lua_pushboolean(L, e.interleaved);
    if (rc == 0)
        return 3;
    lua_pushvalue(L, 7); /* the error */
    lua_pushinteger(L, e.next);
    return 5;
}

/* core.pool_submit_chunk(pool, tag, items, n [, note, first]) -> id, bytes
 * | nil, why:
 * queues items[1..n] as one chunk (chunk.h) for `tag`: a call whose
 * arguments are (items, n), which the worker runs as n calls of its
 * executor; bytes is their size encoded.  When the items cannot travel as
 * one call (one cannot be encoded, or together they are above
 * max_message), nothing is queued and why says so: the caller splits the
 * chunk, down to an item's own call, which raises as p(item) would.
 * Anything else raises (Ctrl-C while waiting for room, a stopped pool).
 * (The caller builds `items` in Lua, where a compiled loop copies a slice
 * of a list faster than the C API can.)  The chunk is encoded into a
 * buffer of its own, not the scratch buffer: a chunk is milliseconds of
 * work, and its encode may fail without leaving anything claimed.  With a
 * table `note` (chunks.lua's info, whose fields pending and pending_count
 * exist), the chunk once queued is noted there as (first, n) before this
 * returns: Ctrl-C's hook fires only in Lua code, so no interrupt can come
 * between the queuing and the note (the map clears it once it tracks the
 * call's id), nor leave a note for a chunk never queued. */
int pz_lpool_submit_chunk(lua_State *L)
{
    lpool *u = pz_lpool_check_running(L, 1);
    int tag = (int)luaL_checkinteger(L, 2);
    check_tag(L, u, tag);
    luaL_checktype(L, 3, LUA_TTABLE);
    lua_Integer n = luaL_checkinteger(L, 4);
    int noted = lua_istable(L, 5);
    lua_Integer first = noted ? luaL_checkinteger(L, 6) : 0;
    lua_settop(L, 6);
    wait_for_room(L, u, 1, 0);
    /* From here on the encode runs Lua code (finalizers, from the buffer's
     * allocation on): a p:stop() from there would free the pool and its
     * arena under cw, so it raises (lpool.c) while chunk_encoding_at marks
     * this frame.  Nothing between the mark and the pcall allocates, so
     * nothing can raise there and leave the mark behind; the pcall catches
     * the rest. */
    uintptr_t here = pz_lpool_frame_here();
    int claimed = !pz_lpool_marked_above(u->chunk_encoding_at, here);
    if (claimed)
        u->chunk_encoding_at = here;
    /* The encode runs Lua code (finalizers) which may queue calls of its
     * own, each with its own writer; this one's blocks are its own. */
    pz_calls_writer cw;
    pz_arena_writer *w = pz_calls_writer_init(&cw, u->pool->arena);
    lua_pushlightuserdata(L, (void *)&reg_encode_chunk);
    lua_rawget(L, LUA_REGISTRYINDEX);
    lua_pushvalue(L, 3);
    lua_pushvalue(L, 4);
    lua_pushlightuserdata(L, w);
    /* Deferred (ldefer.h): Ctrl-C's hook firing in the encode would be
     * taken for items that cannot travel together, and lost. */
    int rc = pz_defer_pcall(L, 3, 1);
    if (claimed)
        u->chunk_encoding_at = 0;
    if (rc != 0) {
        pz_calls_writer_abandon(&cw);
        lua_pushnil(L);
        lua_insert(L, -2);
        return 2;
    }
    pz_buf *b = (pz_buf *)lua_touserdata(L, -1); /* kept on the stack */
    pz_pool *p = u->pool;
    size_t size = b->len + cw.w.placed;
    if (p && !p->stopped && size > p->opt.max_message) {
        pz_calls_writer_abandon(&cw);
        lua_pushnil(L);
        lua_pushfstring(L, "its items are %f bytes encoded, above max_message (%f)", (double)size,
                        (double)p->opt.max_message);
        return 2;
    }
    queue_encoded(L, u, b, &cw, (uint8_t)tag, 0, PZ_CALL_CHUNK);
    if (noted) {
        /* (existing keys of a plain table: nothing allocates, nothing raises) */
        lua_pushinteger(L, first);
        lua_setfield(L, 5, "pending");
        lua_pushinteger(L, n);
        lua_setfield(L, 5, "pending_count");
    }
    lua_pushnumber(L, (lua_Number)size);
    return 2;
}

/* ---- p(x) from compiled code -----------------------------------------
 *
 * LuaJIT's call of a C function through a metamethod costs a compiled
 * loop about 40 ns (the interpreter's frame for it, then a trace started
 * again after it), where queuing a number takes about 20.  So while the
 * JIT runs, the pool's __call is a Lua function (pool.lua) that hands one
 * number, or one string shorter than the arena's PZ_SHARED_MIN, to these
 * through the FFI, and anything else to pz_lpool_call; a stream queues
 * its inputs of those kinds through their tagged twins, and anything else
 * through core.pool_submit or core.pool_submit_each.  They queue the
 * call as submit_scalars would and return its id, or return 0, having
 * queued nothing, whenever pz_lpool_call must decide: the pool is
 * stopped, p(...) would wait for room, the arguments are above
 * max_message, memory ran out, or a debug hook is set.  Compiled code
 * does not run hooks, and Ctrl-C's handler sets one: pz_lpool_call is
 * called from the interpreter, where it fires.  Every FAST_LOOK_EVERY
 * calls p(x)'s (not the tagged twins') return -1 instead, having queued
 * nothing either: pool.lua then looks whether the JIT still runs
 * (jit.status() costs several calls' time; interpreted, the FFI costs
 * more than the C API).  They
 * never raise (nothing may unwind through an FFI call), and touch no Lua
 * state but u->hook_L's hook. */
#define FAST_LOOK_EVERY 1024

static double fast_queue(lpool *u, uint8_t tag, double x, const char *s, size_t n)
{
    pz_pool *p = u->pool;
    /* A stream (tag) looks at the JIT once, when it starts (pool.lua). */
    if (++u->fast_calls % FAST_LOOK_EVERY == 0 && tag == 0)
        return -1;
    if (!p || p->stopped || lua_gethook(u->hook_L) != NULL || !pz_lpool_has_room(u) ||
        (tag != 0 && u->tag_state[tag] != PZ_TAG_ACTIVE))
        return 0;
    size_t bound = s ? 1 + 1 + PZ_VARINT_MAX_BYTES + n : 1 + PZ_NUMBER_MAX_BYTES;
    uint8_t *d = (uint8_t *)pz_pool_reserve_call(p, bound);
    if (!d)
        return 0;
    size_t len = pz_put_varint(d, 1); /* the tuple's count */
    len += s ? pz_put_string(d + len, s, n) : pz_put_number(d + len, x);
    if (len > p->opt.max_message)
        return 0; /* reserved, not queued: pz_lpool_call raises */
    if (tag != 0)
        u->tag_outstanding[tag]++;
    return (double)pz_pool_commit_call(p, len, tag, 0, 0);
}

static double fast_number(void *u, double x)
{
    return fast_queue((lpool *)u, 0, x, NULL, 0);
}

static double fast_string(void *u, const char *s, size_t n)
{
    return n < PZ_SHARED_MIN ? fast_queue((lpool *)u, 0, 0, s, n) : 0;
}

/* The same for a map's or a stream's call (tag: pool_submit's, with no
 * timeout of its own): 0 also when the tag is not an active claim's, for
 * core.pool_submit to raise. */
static double fast_tagged_number(void *u, double tag, double x)
{
    return tag >= 0 && tag < PZ_TAGS ? fast_queue((lpool *)u, (uint8_t)tag, x, NULL, 0) : 0;
}

static double fast_tagged_string(void *u, double tag, const char *s, size_t n)
{
    return tag >= 0 && tag < PZ_TAGS && n < PZ_SHARED_MIN ? fast_queue((lpool *)u, (uint8_t)tag, 0, s, n)
                                                           : 0;
}

/* What pool.lua casts core.fast_submit to. */
static const struct {
    double (*number)(void *u, double x);
    double (*string)(void *u, const char *s, size_t n);
    double (*tagged_number)(void *u, double tag, double x);
    double (*tagged_string)(void *u, double tag, const char *s, size_t n);
} fast_submit = {fast_number, fast_string, fast_tagged_number, fast_tagged_string};

/* core.pool_address(pool) -> the light userdata the fast path takes. */
static int l_pool_address(lua_State *L)
{
    lua_pushlightuserdata(L, luaL_checkudata(L, 1, PZ_POOL_MT));
    return 1;
}

/* core.pool_fast_calls(pool) -> how many p(x) the fast path was asked to
 * queue (declined ones too): for the tests. */
static int l_pool_fast_calls(lua_State *L)
{
    lua_pushnumber(L, ((lpool *)luaL_checkudata(L, 1, PZ_POOL_MT))->fast_calls);
    return 1;
}

void pz_lsubmit_register(lua_State *L)
{
    lua_pushcfunction(L, l_pool_fast_calls);
    lua_setfield(L, -2, "pool_fast_calls");
    lua_pushlightuserdata(L, (void *)&fast_submit);
    lua_setfield(L, -2, "fast_submit");
    lua_pushcfunction(L, l_pool_address);
    lua_setfield(L, -2, "pool_address");
}
