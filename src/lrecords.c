/*
 * lrecords.c - the records the I/O thread publishes, turned into Lua
 * values in the tables of the pool userdata's environment (main thread
 * only).  Where a call's result goes depends on its tag (frame.h):
 *
 *   tag 0, keep_results    the pool's lists: results (first values,
 *                          parallelize.null for nil), ids (ids[i] is the
 *                          call of results[i]), errors (error records),
 *                          extras[id] (every value, {n = count, ...}, when
 *                          there are not exactly one, or the one is nil)
 *   tag 0, not kept        unclaimed[id]: {n = count, ...} or the error
 *                          record, until p:result(id) or p:take() takes it
 *   tag of a map/stream    claims[tag]: lists as the pool's, which the map
 *                          or stream consumes (lua/parallelize/pool.lua)
 *
 * A map's chunk (chunks.lua) is a call whose claim names, in into_at[id],
 * where its items' results go in the table `into` (the map's output): its
 * answer's table of results is decoded straight into it
 * (pz_decode_tuple_into), true standing in its place among the values.
 * A chunk's answer that comes once its map has let it go (its tag is no
 * longer active; its record is marked PZ_REC_CHUNK, frame.h) goes to the
 * pool's store as chunks.lua's `stored` says (env.chunk_answer, given
 * env.chunks[id]): its array of results, or, when it stopped at an item
 * that raised, that item's error record, the same as release makes of an
 * answer its map had not taken.  Any other record pays one flag test.
 *
 * An error record is {id =, args =, message =, traceback =, value =,
 * kind =, attempts =} (and timeout = true or cancelled = true for those
 * kinds), with a metatable (PZ_ERROR_MT) whose __tostring gives the
 * message.  The other tables: executors[slot] (the copy a worker sent),
 * pids[slot], init_errors ({worker =, message =, traceback =}), closed[slot]
 * (what the executor's close returned), first_failure (the first error or
 * init error record, for fail_fast), fatal (why the pool cannot go on).
 */
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <lauxlib.h>
#include <lua.h>

#include "codec.h"
#include "frame.h"
#include "ldefer.h"
#include "lpool.h"
#include "lrunrec.h"
#include "run.h"
#include "varint.h"

/* Stack slots of drain_records: the environment, the pool's store, the
 * other tables, then the lists of the claim last seen (CLAIM_*). */
enum {
    D_U = 1, D_ENV, D_RESULTS, D_IDS, D_ERRORS, D_EXTRAS, D_UNCLAIMED, D_EXECUTORS, D_PIDS,
    D_INIT_ERRORS, D_CLAIMS, D_CLOSED, D_CLAIM_RESULTS, D_CLAIM_IDS, D_CLAIM_ERRORS,
    D_CLAIM_EXTRAS, D_CLAIM_INTO, D_CLAIM_INTO_AT, D_TOP = D_CLAIM_INTO_AT
};

static const char *const env_tables[] = {"results", "ids", "errors", "extras", "unclaimed",
                                         "executors", "pids", "init_errors", "claims", "closed"};

/* The lists a record goes to: base slot (D_RESULTS or D_CLAIM_RESULTS) and
 * their lengths, kept here rather than asked of Lua at every record. */
typedef struct lists {
    int base;
    int nresults, nerrors;
} lists;

typedef struct drain_state {
    lpool *u;
    lists pool;   /* the pool's own lists (keep_results) */
    lists claim;  /* the lists of claim `claim_tag` */
    int claim_tag;
} drain_state;

/* Pushes a new table {n = count, ...} of the count values on top, popping them. */
static void pack(lua_State *L, int count)
{
    int first = lua_gettop(L) - count + 1;
    lua_createtable(L, count, 1);
    lua_insert(L, first);
    for (int i = count; i >= 1; i--)
        lua_rawseti(L, first, i);
    lua_pushinteger(L, count);
    lua_setfield(L, first, "n");
}

/* The reader of the pool's shared strings (arena.h), or NULL. */
static pz_arena_reader *reader_of(lpool *u)
{
    return u->pool && u->pool->arena ? &u->pool->arena->reader : NULL;
}

/* Pushes a new table {n = count, ...} of the argument tuple at p. */
static void push_args(lua_State *L, const char *p, size_t n, pz_arena_reader *reader)
{
    pack(L, pz_decode_tuple(L, p, n, PZ_DECODE_FUNCTIONS, reader));
}

static void set_string(lua_State *L, const char *name, const char *s, size_t n)
{
    lua_pushlstring(L, s, n);
    lua_setfield(L, -2, name);
}

/* The lengths of l's lists.  A result stored without its id (memory ran
 * out between the two: store_result, the helper) is taken back: its call
 * is taken again, or salvaged, and the two lists stay paired. */
static void len_of(lua_State *L, lists *l)
{
    int nresults = (int)lua_objlen(L, l->base), nids = (int)lua_objlen(L, l->base + 1);
    for (; nresults > nids; nresults--) {
        lua_pushnil(L);
        lua_rawseti(L, l->base, nresults);
    }
    l->nresults = nresults;
    l->nerrors = (int)lua_objlen(L, l->base + 2);
}

/* The lists a record with this tag goes to, or NULL for `unclaimed`; a
 * claim's lists (and its into and into_at, nil when it has none) are
 * loaded into the D_CLAIM_* slots. */
static lists *lists_for(lua_State *L, drain_state *d, uint8_t tag)
{
    lpool *u = d->u;
    if (tag != 0 && u->tag_state[tag] == PZ_TAG_ACTIVE) {
        if (d->claim_tag != tag) {
            lua_rawgeti(L, D_CLAIMS, tag);
            if (!lua_istable(L, -1))
                luaL_error(L, "internal error: claim %d has no table", tag);
            static const char *const fields[] = {"results", "ids", "errors", "extras"};
            for (int i = 0; i < 4; i++) {
                lua_getfield(L, -1 - i, fields[i]);
                if (!lua_istable(L, -1))
                    luaL_error(L, "internal error: claim %d has no %s list", tag, fields[i]);
            }
            lua_getfield(L, -5, "into");
            lua_getfield(L, -6, "into_at");
            for (int i = 5; i >= 0; i--)
                lua_replace(L, D_CLAIM_RESULTS + i);
            lua_pop(L, 1);
            d->claim_tag = tag;
            len_of(L, &d->claim);
        }
        return &d->claim;
    }
    return u->keep_results ? &d->pool : NULL;
}

/* Counts a record against its tag. */
static void count_record(drain_state *d, uint8_t tag)
{
    if (tag != 0 && d->u->tag_outstanding[tag] > 0)
        d->u->tag_outstanding[tag]--;
}

/* count_record for k records of one tag. */
static void count_records(drain_state *d, uint8_t tag, unsigned k)
{
    if (tag != 0)
        d->u->tag_outstanding[tag] -= k < d->u->tag_outstanding[tag] ? k : d->u->tag_outstanding[tag];
}

/* True, with *offset set, when call id is a chunk whose answer goes into
 * the claim's `into` (the claim last loaded is id's). */
static int chunk_offset(lua_State *L, uint64_t id, size_t *offset)
{
    if (!lua_istable(L, D_CLAIM_INTO) || !lua_istable(L, D_CLAIM_INTO_AT))
        return 0;
    lua_pushnumber(L, (lua_Number)id);
    lua_rawget(L, D_CLAIM_INTO_AT);
    int found = lua_type(L, -1) == LUA_TNUMBER && lua_tonumber(L, -1) >= 0;
    if (found)
        *offset = (size_t)lua_tonumber(L, -1);
    lua_pop(L, 1);
    return found;
}

/* Keeps the record on top (without popping it) as env.first_failure when
 * it is the first failure (fail_fast raises it). */
static void note_failure(lua_State *L)
{
    lua_getfield(L, D_ENV, "first_failure");
    int first = lua_isnil(L, -1);
    lua_pop(L, 1);
    if (first) {
        lua_pushvalue(L, -1);
        lua_setfield(L, D_ENV, "first_failure");
    }
}

/* Stores the error record on top (popping it) for call id, tag. */
static void store_error(lua_State *L, drain_state *d, uint8_t tag, uint64_t id)
{
    lists *l = lists_for(L, d, tag);
    if (l) {
        lua_rawseti(L, l->base + 2, ++l->nerrors);
    } else {
        lua_pushnumber(L, (lua_Number)id);
        lua_insert(L, -2);
        lua_rawset(L, D_UNCLAIMED);
    }
    count_record(d, tag); /* once stored: see on_result */
    pz_idset_add(&d->u->finished, id); /* out of memory: not marked, nothing else */
}

/* Stores the `count` values above `top`, call id's result, in l (NULL:
 * unclaimed), and leaves the stack at top: the first value to the
 * results list, every value to extras when they are not exactly one
 * non-nil value. */
static void store_result(lua_State *L, lists *l, uint64_t id, int top, int count)
{
    if (!l) {
        pack(L, count);
        lua_pushnumber(L, (lua_Number)id);
        lua_insert(L, -2);
        lua_rawset(L, D_UNCLAIMED);
    } else if (count == 1 && !lua_isnil(L, top + 1)) {
        /* The usual case, one value: stored as it is, the stack back at top. */
        lua_rawseti(L, l->base, ++l->nresults);
        lua_pushnumber(L, (lua_Number)id);
        lua_rawseti(L, l->base + 1, l->nresults);
    } else {
        /* Every value, in extras[id], first: what allocates may run a
         * finalizer, whose error (passed on to the allocation) makes this
         * call's record one to salvage; stored before its result and id,
         * the call would have come back as both. */
        pack(L, count);
        lua_pushnumber(L, (lua_Number)id);
        lua_pushvalue(L, -2);
        lua_rawset(L, l->base + 3);
        /* The first value (null for nil or none), then the id: a store
         * that fails between the two is taken back (len_of). */
        lua_rawgeti(L, -1, 1);
        if (lua_isnil(L, -1)) {
            lua_pop(L, 1);
            lua_pushlightuserdata(L, NULL); /* parallelize.null */
        }
        lua_rawseti(L, l->base, ++l->nresults);
        lua_pushnumber(L, (lua_Number)id);
        lua_rawseti(L, l->base + 1, l->nresults);
    }
    lua_settop(L, top);
}

/* Drops env.chunk_tags[tag] (a map's chunk an interrupt left untracked,
 * chunks.lua's register) once that chunk's answer is stored; as
 * forget_chunk, only an entry that exists. */
static void forget_chunk_tag(lua_State *L, uint8_t tag)
{
    lua_getfield(L, D_ENV, "chunk_tags");
    if (lua_istable(L, -1)) {
        lua_rawgeti(L, -1, tag);
        int found = !lua_isnil(L, -1);
        lua_pop(L, 1);
        if (found) {
            lua_pushnil(L);
            lua_rawseti(L, -2, tag);
        }
    }
    lua_pop(L, 1);
}

/* Drops env.chunks[id], what the answer of chunk id needed, once it is
 * stored.  Only an entry that exists is cleared: storing nil under a key
 * a table lacks may allocate (its new key), and a raise after the store
 * would have the record taken again, stored twice.  Returns whether there
 * was one. */
static int forget_chunk(lua_State *L, uint64_t id)
{
    lua_getfield(L, D_ENV, "chunks");
    if (lua_istable(L, -1)) {
        lua_pushnumber(L, (lua_Number)id);
        lua_rawget(L, -2);
        int found = !lua_isnil(L, -1);
        lua_pop(L, 1);
        if (found) {
            lua_pushnumber(L, (lua_Number)id);
            lua_pushnil(L);
            lua_rawset(L, -3);
        }
        lua_pop(L, 1);
        return found;
    }
    lua_pop(L, 1);
    return 0;
}

/* An error of call id, whose map let it go, that had no env.chunks entry:
 * either one item's own call (info.starts names it) or the chunk an
 * interrupt left untracked, failed whole (its worker died, its answer
 * could not travel), whose env.chunk_tags entry (with the map's list and
 * output) is then done with, as a result's is (store_released_chunk).
 * An error record carries no PZ_REC_CHUNK: the map's starts tell them
 * apart.  As forget_chunk, only an entry that exists is cleared. */
static void forget_untracked_chunk(lua_State *L, uint8_t tag, uint64_t id)
{
    lua_getfield(L, D_ENV, "chunk_tags");
    if (lua_istable(L, -1)) {
        lua_rawgeti(L, -1, tag);
        if (lua_istable(L, -1)) {
            int untracked = 0;
            lua_getfield(L, -1, "starts");
            if (lua_istable(L, -1)) {
                lua_pushnumber(L, (lua_Number)id);
                lua_rawget(L, -2);
                untracked = lua_isnil(L, -1);
                lua_pop(L, 1);
            }
            lua_pop(L, 1);
            if (untracked) {
                lua_pushnil(L);
                lua_rawseti(L, -3, tag);
            }
        }
        lua_pop(L, 1);
    }
    lua_pop(L, 1);
}

/* Record f (a RESULT or ERROR) is stored: what a map that let its call go
 * registered for it is done with.  Its env.chunks entry; failing that, a
 * chunk's result is the untracked chunk's, found by its tag, and an error
 * may be (forget_untracked_chunk).  Records of an active tag, and results
 * that are no chunk's, have nothing registered. */
static void forget_stored(lua_State *L, const lpool *u, const pz_frame *f)
{
    if (f->tag == 0 || u->tag_state[f->tag] == PZ_TAG_ACTIVE)
        return;
    if (f->type == PZ_F_RESULT && !(f->flags & PZ_REC_CHUNK))
        return;
    if (forget_chunk(L, f->id))
        return;
    if (f->type == PZ_F_RESULT)
        forget_chunk_tag(L, f->tag);
    else
        forget_untracked_chunk(L, f->tag, f->id);
}

/* The answer of chunk f whose map let it go, its `count` values above
 * top, stored in l (NULL: unclaimed) as env.chunk_answer(env.chunks[id],
 * id, values...) says: nil, its results array made whole, stored as any
 * result; or the error record of the item that raised.  A raise (out of
 * memory) leaves the record to salvage (kind "parent"), nothing stored
 * and nothing counted; stored, it is counted and marked as on_result's. */
static void store_released_chunk(lua_State *L, drain_state *d, lists *l, const pz_frame *f, int top,
                                 int count)
{
    luaL_checkstack(L, count + 4, "a chunk's answer");
    lua_getfield(L, D_ENV, "chunk_answer");
    if (lua_isfunction(L, -1)) {
        lua_getfield(L, D_ENV, "chunks");
        if (lua_istable(L, -1)) {
            lua_pushnumber(L, (lua_Number)f->id);
            lua_rawget(L, -2);
            lua_replace(L, -2);
        } else {
            lua_pop(L, 1);
            lua_pushnil(L);
        }
        if (lua_isnil(L, -1)) {
            /* No entry of its own: the chunk an interrupt left untracked
             * (chunks.lua's register names it by its map's tag). */
            lua_pop(L, 1);
            lua_getfield(L, D_ENV, "chunk_tags");
            if (lua_istable(L, -1)) {
                lua_rawgeti(L, -1, f->tag);
                lua_replace(L, -2);
            } else {
                lua_pop(L, 1);
                lua_pushnil(L);
            }
        }
        lua_pushnumber(L, (lua_Number)f->id);
        for (int i = 1; i <= count; i++)
            lua_pushvalue(L, top + i);
        lua_call(L, count + 2, 1);
    }
    if (lua_istable(L, -1)) {
        /* (no note_failure: chunks never run under fail_fast, the one
         * reader of first_failure) */
        store_error(L, d, f->tag, f->id);
        lua_settop(L, top);
    } else {
        lua_pop(L, 1);
        store_result(L, l, f->id, top, count);
        count_record(d, f->tag);
        pz_idset_add(&d->u->finished, f->id);
    }
    forget_stored(L, d->u, f);
}

/* A RESULT record (see store_result); a chunk's goes straight into its
 * map's output, or, once its map let it go, store_released_chunk's way. */
static void on_result(lua_State *L, drain_state *d, const pz_frame *f)
{
    int top = lua_gettop(L), count;
    size_t offset;
    lists *l = lists_for(L, d, f->tag);
    if (l == &d->claim && chunk_offset(L, f->id, &offset))
        count = pz_decode_tuple_into(L, f->payload, f->len, PZ_DECODE_FUNCTIONS, D_CLAIM_INTO,
                                     offset, reader_of(d->u));
    else
        count = pz_decode_tuple(L, f->payload, f->len, PZ_DECODE_FUNCTIONS, reader_of(d->u));
    if ((f->flags & PZ_REC_CHUNK) && l != &d->claim) {
        store_released_chunk(L, d, l, f, top, count);
        return;
    }
    /* Counted once stored: a store that raises (out of memory) leaves the
     * record to be taken again or salvaged, which counts it then. */
    store_result(L, l, f->id, top, count);
    count_record(d, f->tag);
    pz_idset_add(&d->u->finished, f->id);
}

/* Protected: decodes the error value at 1 (length 2). */
static int decode_error_value(lua_State *L)
{
    size_t n;
    const char *p = lua_tolstring(L, 1, &n);
    pz_decode_value(L, p, n, PZ_DECODE_FUNCTIONS);
    return 1;
}

/* Sets field `attempts` of the error record on top from the attempts part
 * of an ERROR record: {{worker =, pid =, message =}, ...}. */
static void set_attempts(lua_State *L, const char *p, size_t n)
{
    uint64_t count = 0;
    if (pz_take_varint(&p, &n, &count) != 0 || count > n)
        count = 0;
    lua_createtable(L, (int)count, 0);
    for (uint64_t i = 1; i <= count; i++) {
        /* (Set: luaL_error does not return, but clang cannot know it.) */
        uint64_t slot = 0, pid = 0;
        const char *msg = NULL;
        size_t mlen = 0;
        if (pz_take_varint(&p, &n, &slot) != 0 || pz_take_varint(&p, &n, &pid) != 0 ||
            pz_split_prefixed(p, n, &msg, &mlen, &p, &n) != 0)
            luaL_error(L, "internal error: malformed attempts in an ERROR record");
        lua_createtable(L, 0, 3);
        lua_pushnumber(L, (lua_Number)slot);
        lua_setfield(L, -2, "worker");
        lua_pushnumber(L, (lua_Number)pid);
        lua_setfield(L, -2, "pid");
        set_string(L, "message", msg, mlen);
        lua_rawseti(L, -2, (int)i);
    }
    lua_setfield(L, -2, "attempts");
}

static const char *const kinds[] = {"raised", "timeout", "cancelled", "killer", "parent"};

/* Pushes an error record of this kind (PZ_ERR_*) from the parts of an
 * ERROR record, or from a message alone (args, value, attempts empty). */
static void push_error_record(lua_State *L, uint64_t id, const pz_error_parts *e, uint8_t kind,
                              pz_arena_reader *reader)
{
    lua_createtable(L, 0, 8);
    if (kind < sizeof kinds / sizeof *kinds) {
        lua_pushstring(L, kinds[kind]);
        lua_setfield(L, -2, "kind");
    }
    if (kind == PZ_ERR_TIMEOUT || kind == PZ_ERR_CANCELLED) {
        lua_pushboolean(L, 1);
        lua_setfield(L, -2, kind == PZ_ERR_TIMEOUT ? "timeout" : "cancelled");
    }
    set_attempts(L, e->attempts, e->attempts_len);
    lua_pushnumber(L, (lua_Number)id);
    lua_setfield(L, -2, "id");
    if (e->args_len)
        push_args(L, e->args, e->args_len, reader);
    else
        pack(L, 0);
    lua_setfield(L, -2, "args");
    set_string(L, "message", e->message, e->message_len);
    set_string(L, "traceback", e->traceback, e->traceback_len);
    /* The value error() was given; the message when it did not travel or
     * cannot be decoded here. */
    int decoded = 0;
    if (e->value_len) {
        lua_pushcfunction(L, decode_error_value);
        lua_pushlstring(L, e->value, e->value_len);
        decoded = lua_pcall(L, 1, 1, 0) == 0;
        if (!decoded)
            lua_pop(L, 1);
    }
    if (!decoded)
        lua_pushlstring(L, e->message, e->message_len);
    lua_setfield(L, -2, "value");
    luaL_getmetatable(L, PZ_ERROR_MT);
    lua_setmetatable(L, -2);
}

static void on_error(lua_State *L, drain_state *d, const pz_frame *f)
{
    pz_error_parts e;
    if (pz_record_error(f, &e) != 0)
        luaL_error(L, "internal error: malformed ERROR record");
    push_error_record(L, f->id, &e, f->flags, reader_of(d->u));
    if (f->flags != PZ_ERR_CANCELLED)
        note_failure(L);
    store_error(L, d, f->tag, f->id);
    /* A map's chunk that failed whole (its worker died, its answer could
     * not travel, it was cancelled) after its map let it go: its entry in
     * env.chunks (chunks.register), or the untracked chunk's in
     * env.chunk_tags, is done with, as a result's is. */
    forget_stored(L, d->u, f);
}

/* closed[slot] from a CLOSED record. */
static void on_closed(lua_State *L, const pz_frame *f)
{
    pz_decode_value(L, f->payload, f->len, PZ_DECODE_FUNCTIONS);
    lua_rawseti(L, D_CLOSED, (int)f->id + 1);
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
    note_failure(L);
    lua_rawseti(L, D_INIT_ERRORS, (int)lua_objlen(L, D_INIT_ERRORS) + 1);
}

/* The compiled helper (lrunrec.h) is called for this many calls left at
 * least, and when a call left it taking fewer, the C path takes this many
 * before it is called again: a call of it costs about as much as a few
 * items, which a record whose results alternate kinds would pay for every
 * item. */
#define HELPER_STRETCH 16

/* The calls of run record f from *p on (`left` of them) whose results are
 * one number each, appended to l by the compiled helper, counted and
 * marked finished as on_result would, u->run_taken counting them too;
 * moves *p past them.  Returns how many, or -1 when the JIT is off (the
 * helper will take nothing). */
static int take_numbers(lua_State *L, drain_state *d, lists *l, const pz_frame *f, const uint8_t **p,
                        const uint8_t *end, unsigned left)
{
    lpool *u = d->u;
    pz_runrec_taken t;
    int failed = pz_runrec_take_numbers(L, l->base, l->base + 1, l->nresults, *p, (size_t)(end - *p),
                                        left, &t);
    if (t.items == 0 && !failed)
        return t.jit_off ? -1 : 0;
    count_records(d, f->tag, t.items);
    if (failed) {
        /* Out of memory: what it took is in the lists; the call it was
         * taking is the one to salvage (drain_all). */
        for (unsigned k = 1; k <= t.items; k++) {
            lua_rawgeti(L, l->base + 1, l->nresults + (int)k);
            pz_idset_add(&u->finished, (uint64_t)lua_tonumber(L, -1));
            lua_pop(L, 1);
        }
        l->nresults += (int)t.items;
        u->run_taken += t.items;
        /* Raised again, it is no longer a memory error, for which
         * drain_all collects first: collected here. */
        if (failed == LUA_ERRMEM)
            lua_gc(L, LUA_GCCOLLECT, 0);
        lua_error(L);
    }
    l->nresults += (int)t.items;
    u->run_taken += t.items;
    u->helper_items += t.items;
    /* Out of memory: those it could not record stay unmarked, nothing else. */
    if (t.in_order) {
        pz_idset_add_run(&u->finished, t.first, t.items);
    } else {
        /* A worker's run holds the blocks of calls it was handed, each of
         * consecutive ids: marked a stretch at a time, as they come. */
        const uint8_t *q = *p;
        uint64_t first = 0, count = 0;
        for (unsigned k = 0; k < t.items; k++) {
            uint64_t id = 0;
            (void)pz_get_varint(&q, end, &id); /* the I/O thread checked the record */
            q += 4 + pz_le32_get(q);
            if (count && id == first + count) {
                count++;
                continue;
            }
            if (count)
                pz_idset_add_run(&u->finished, first, count);
            first = id;
            count = 1;
        }
        if (count)
            pz_idset_add_run(&u->finished, first, count);
    }
    *p += t.bytes;
    return (int)t.items;
}

/* A RESULT record with PZ_REC_RUN (run.h): each call's result taken as
 * on_result takes one, from the first not taken yet: a decode that raised
 * left those before it stored, and u->run_taken says how many.  Its calls
 * share a tag, so their lists are found once; a map's (whose chunks'
 * results go into its output: on_result) takes each as on_result does.
 * Stretches of calls whose results are one number each are taken by a
 * compiled helper (take_numbers), the others here. */
static void on_run_result(lua_State *L, drain_state *d, const pz_frame *f)
{
    lpool *u = d->u;
    unsigned n = pz_run_record_count(f);
    const uint8_t *p = (const uint8_t *)f->payload + 2, *end = (const uint8_t *)f->payload + f->len;
    pz_frame item = *f;
    item.flags = 0;
    int top = lua_gettop(L);
    lists *l = lists_for(L, d, f->tag);
    int into = l == &d->claim && lua_istable(L, D_CLAIM_INTO), helper = l && !into;
    pz_arena_reader *reader = reader_of(u);
    unsigned i = 0, c_until = 0; /* the C path's calls before the helper's next try */
    for (; i < u->run_taken; i++) { /* taken before a decode raised */
        (void)pz_get_varint(&p, end, &item.id); /* the I/O thread checked the record */
        p += 4 + pz_le32_get(p);
    }
    while (i < n) {
        if (helper && i >= c_until && n - i >= HELPER_STRETCH) {
            int k = take_numbers(L, d, l, f, &p, end, n - i);
            if (k < 0) {
                helper = 0; /* the JIT is off: C takes the record */
            } else {
                i += (unsigned)k;
                if (k < HELPER_STRETCH)
                    c_until = i + HELPER_STRETCH;
                if (i == n)
                    break;
            }
        }
        (void)pz_get_varint(&p, end, &item.id);
        uint32_t len = pz_le32_get(p);
        p += 4;
        if (into) {
            item.payload = (const char *)p;
            item.len = len;
            on_result(L, d, &item);
        } else {
            int count = pz_decode_tuple(L, (const char *)p, len, PZ_DECODE_FUNCTIONS, reader);
            store_result(L, l, item.id, top, count);
            count_record(d, f->tag); /* once stored: see on_result */
            pz_idset_add(&u->finished, item.id);
        }
        u->run_taken = ++i;
        p += len;
    }
    u->run_taken = 0;
}

/* The id of the call of the run record f (run.h) that salvage_record
 * blames: the first not taken yet. */
static uint64_t run_call_at(const pz_frame *f, unsigned k)
{
    const uint8_t *p = (const uint8_t *)f->payload + 2, *end = (const uint8_t *)f->payload + f->len;
    uint64_t id = 0;
    for (unsigned i = 0; i <= k; i++) {
        (void)pz_get_varint(&p, end, &id);
        p += 4 + pz_le32_get(p);
    }
    return id;
}

/* Puts the environment's tables into slots D_RESULTS .. D_CLAIMS (the
 * stack reaches D_TOP at least). */
static void load_tables(lua_State *L)
{
    for (size_t i = 0; i < sizeof env_tables / sizeof *env_tables; i++) {
        lua_getfield(L, D_ENV, env_tables[i]);
        if (!lua_istable(L, -1))
            luaL_error(L, "p.%s is no longer a table", env_tables[i]);
        lua_replace(L, D_RESULTS + (int)i);
    }
}

/* Protected: lpool light userdata at 1, environment at 2.  Turns records
 * into Lua values until the queue is empty, consuming each after it is
 * stored; an error leaves the record that raised it at the head. */
static int drain_records(lua_State *L)
{
    lpool *u = (lpool *)lua_touserdata(L, D_U);
    lua_settop(L, D_TOP);
    load_tables(L);
    drain_state d = {u, {D_RESULTS, 0, 0}, {D_CLAIM_RESULTS, 0, 0}, 0};
    len_of(L, &d.pool);
    pz_frame f;
    while (pz_pool_peek_record(u->pool, &f)) {
        switch (f.type) {
        case PZ_F_RESULT:
            if (f.flags & PZ_REC_RUN)
                on_run_result(L, &d, &f);
            else
                on_result(L, &d, &f);
            break;
        case PZ_F_ERROR:
            on_error(L, &d, &f);
            break;
        case PZ_F_INIT_OK:
            on_init_ok(L, &f);
            break;
        case PZ_F_INIT_ERROR:
            on_init_error(L, &f);
            break;
        case PZ_F_CLOSED:
            on_closed(L, &f);
            break;
        default:
            break;
        }
        pz_pool_consume(u->pool, &f);
    }
    return 0;
}

/* Protected, as drain_records: the record at the head could not be turned
 * into Lua values (a result naming a module the parent cannot load, or too
 * large for the memory left): a call's record becomes that call's error,
 * an executor copy becomes the message, so that nothing is lost.  The
 * reason is at 3.  Returns true when there was a record to blame. */
static int salvage_record(lua_State *L)
{
    lpool *u = (lpool *)lua_touserdata(L, D_U);
    lua_settop(L, D_TOP + 1);
    lua_pushvalue(L, 3); /* the reason, kept below what is pushed later */
    lua_replace(L, D_TOP + 1);
    const char *why = lua_isstring(L, D_TOP + 1) ? lua_tostring(L, D_TOP + 1) : "unknown error";
    load_tables(L);
    drain_state d = {u, {D_RESULTS, 0, 0}, {D_CLAIM_RESULTS, 0, 0}, 0};
    len_of(L, &d.pool);
    pz_frame f;
    if (!pz_pool_peek_record(u->pool, &f)) {
        lua_pushboolean(L, 0);
        return 1;
    }
    if (f.type == PZ_F_RESULT && (f.flags & PZ_REC_RUN)) {
        /* One call of a run: the others are taken as they would be. */
        uint64_t id = run_call_at(&f, u->run_taken);
        char buf[120];
        snprintf(buf, sizeof buf, "%llu", (unsigned long long)id);
        pz_error_parts e;
        memset(&e, 0, sizeof e);
        e.traceback = "";
        lua_pushfstring(L, "the result of call %s cannot be used in the parent: %s", buf, why);
        e.message = lua_tolstring(L, -1, &e.message_len);
        push_error_record(L, id, &e, PZ_ERR_PARENT, NULL);
        note_failure(L);
        store_error(L, &d, f.tag, id);
        u->salvaged++; /* a result to the I/O thread (lpool.h) */
        if (++u->run_taken < (unsigned)pz_run_record_count(&f)) {
            lua_pushboolean(L, 1);
            return 1;
        }
        u->run_taken = 0;
    } else if (f.type == PZ_F_RESULT || f.type == PZ_F_ERROR) {
        pz_error_parts e;
        memset(&e, 0, sizeof e);
        char buf[120];
        /* An error keeps its own message; its arguments are what failed. */
        if (f.type == PZ_F_ERROR && pz_record_error(&f, &e) == 0) {
            lua_pushlstring(L, e.message, e.message_len);
            lua_pushfstring(L, "%s (its arguments cannot be decoded in the parent: %s)",
                            lua_tostring(L, -1), why);
        } else {
            memset(&e, 0, sizeof e);
            e.traceback = "";
            snprintf(buf, sizeof buf, "%llu", (unsigned long long)f.id);
            lua_pushfstring(L, "the result of call %s cannot be used in the parent: %s", buf, why);
        }
        e.args_len = e.value_len = e.attempts_len = 0;
        e.message = lua_tolstring(L, -1, &e.message_len);
        push_error_record(L, f.id, &e, f.type == PZ_F_ERROR ? f.flags : PZ_ERR_PARENT, NULL);
        note_failure(L);
        store_error(L, &d, f.tag, f.id);
        /* A result to the I/O thread, unless it counted the chunk failed
         * already (an item raised in it). */
        if (f.type == PZ_F_RESULT && !(f.flags & PZ_REC_FAILED))
            u->salvaged++;
        forget_stored(L, u, &f);
    } else if (f.type == PZ_F_INIT_OK) {
        lua_pushfstring(L, "<executor copy cannot be decoded: %s>", why);
        lua_rawseti(L, D_EXECUTORS, (int)f.id + 1);
    }
    pz_pool_consume(u->pool, &f);
    lua_pushboolean(L, 1);
    return 1;
}

/* Protected: lpool light userdata at 1, pool userdata at 2.  Drains every
 * record, turning one that cannot be decoded into an error of its own, so
 * that one bad record neither blocks the others nor is lost. */
static int drain_all(lua_State *L)
{
    lpool *u = (lpool *)lua_touserdata(L, 1);
    lua_getfenv(L, 2);
    int env = lua_gettop(L);
    for (;;) {
        lua_pushcfunction(L, drain_records);
        lua_pushlightuserdata(L, u);
        lua_pushvalue(L, env);
        int rc = lua_pcall(L, 2, 0, 0);
        if (rc == 0)
            break;
        /* What a failed decode built is garbage now: collect it first, so
         * that the error fits. */
        if (rc == LUA_ERRMEM)
            lua_gc(L, LUA_GCCOLLECT, 0);
        int why = lua_gettop(L);
        lua_pushcfunction(L, salvage_record);
        lua_pushlightuserdata(L, u);
        lua_pushvalue(L, env);
        lua_pushvalue(L, why);
        lua_call(L, 3, 1);
        if (!lua_toboolean(L, -1)) {
            lua_pushvalue(L, why); /* an error no record caused */
            return lua_error(L);
        }
        lua_settop(L, env);
    }
    const char *fatal = pz_pool_fatal(u->pool);
    if (fatal) {
        lua_pushstring(L, fatal);
        lua_setfield(L, env, "fatal");
    }
    return 0;
}

/* LuaJIT's message for an allocation that failed. */
#define MEMORY_ERROR "not enough memory"

/* Deferred (ldefer.h): Ctrl-C's hook, firing at one of the drain's own
 * calls (a protected decode, a module's require), would be taken for a
 * record that cannot be decoded, and the interrupt lost. */
void pz_lrecords_drain(lua_State *L, lpool *u, int idx)
{
    if (!u->pool || u->draining)
        return;
    /* Nothing to drain (a wait's every turn, a p(...) waiting for room):
     * no deferral, whose signal mask costs two system calls. */
    pz_frame first;
    if (!pz_pool_peek_record(u->pool, &first) && !pz_pool_fatal(u->pool))
        return;
    idx = idx < 0 ? lua_gettop(L) + idx + 1 : idx;
    lua_pushcfunction(L, drain_all);
    lua_pushlightuserdata(L, u);
    lua_pushvalue(L, idx);
    /* Set only now: a push may run a finalizer, and a finalizer's error
     * (LuaJIT passes it on to the allocation) would leave it set for
     * good, the pool busy for every wait and stop after. */
    u->draining = 1;
    int rc = pz_defer_pcall(L, 2, 0);
    u->draining = 0;
    if (rc != 0) {
        /* Short of memory even to make a record an error of its call
         * (salvage_record): nothing is lost, the record stays queued, and
         * the bare message would not say what failed. */
        size_t n;
        const char *s = lua_tolstring(L, -1, &n);
        if (s && n == sizeof MEMORY_ERROR - 1 && memcmp(s, MEMORY_ERROR, n) == 0) {
            lua_pop(L, 1);
            lua_gc(L, LUA_GCCOLLECT, 0);
            lua_pushliteral(L, "not enough memory to take the results that came (they stay queued: a wait "
                               "once memory is freed takes them)");
        }
        lua_error(L);
    }
}

/* __tostring of an error record: its message. */
static int error_tostring(lua_State *L)
{
    lua_getfield(L, 1, "message");
    if (!lua_isstring(L, -1))
        lua_pushliteral(L, "(an error record without a message)");
    return 1;
}

/* core.pool_helper_items(pool) -> how many results the compiled helper
 * took (lrunrec.h): for the tests. */
static int l_pool_helper_items(lua_State *L)
{
    lua_pushnumber(L, ((lpool *)luaL_checkudata(L, 1, PZ_POOL_MT))->helper_items);
    return 1;
}

void pz_lrecords_register(lua_State *L)
{
    /* The run-record helper takes pcall, require and jit.status from the
     * globals when it is compiled: now, before a script can have replaced
     * them. */
    pz_runrec_prepare(L);
    lua_pushcfunction(L, l_pool_helper_items);
    lua_setfield(L, -2, "pool_helper_items");
    if (luaL_newmetatable(L, PZ_ERROR_MT)) {
        lua_pushcfunction(L, error_tostring);
        lua_setfield(L, -2, "__tostring");
    }
    lua_setfield(L, -2, "error_metatable");
}
