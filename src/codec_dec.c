/*
 * codec_dec.c - the decoder: bytes (codec_format.h) back to Lua values.
 *
 * Decoding is one recursive descent that checks every count against the
 * bytes left before it allocates, so malformed input costs at most time and
 * memory in proportion to its length and ends in a Lua error naming the
 * problem and its byte position (1-based, as string.sub counts).  Functions
 * (bytecode, which LuaJIT does not verify) are loaded only when the caller
 * says the bytes are trusted (PZ_DECODE_FUNCTIONS).  Packed arrays of
 * doubles are unpacked by codec_array.c, which owns the rule on NaNs.
 * Objects get their reference numbers in stack slots reserved at the start,
 * past the first few in a Lua table.
 *
 * Keeping every table for a reference that almost never comes cost about a
 * tenth of a small record's decode, so a decode first runs lazily: tables
 * are only counted, and at the first thing that needs the numbering (a
 * reference, a function, a module) it starts over from the value's first
 * byte, keeping every object (dec_run).  A value that shares a table or
 * holds a function decodes up to that point twice; one made of scalars
 * and tables alone, once.  The first pass has no effect the second would
 * not undo: it stops before any function is loaded (whose globals are set
 * only when absent) or module required, its objects are dropped from the
 * stack, a table of items' results (dec_table_into) gets the same entries
 * again, and the shared strings' counts are put back.
 */
#include <lauxlib.h>
#include <lua.h>
#include <limits.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "codec.h"
#include "codec_array.h"
#include "codec_format.h"

/* Objects kept in stack slots before the reference table is needed: most
 * values hold a few tables at most. */
#define DS_REF_SLOTS 8

/* Stack slots reserved by every top-level decode, relative to dec.slots. */
enum {
    DS_REFS,  /* reference number -> object, from DS_REF_SLOTS on */
    DS_REF0,  /* objects with reference numbers 0 .. DS_REF_SLOTS - 1 */
    DS_COUNT = DS_REF0 + DS_REF_SLOTS
};

typedef struct dec {
    lua_State *L;
    const uint8_t *p, *end;
    const uint8_t *base; /* byte positions in errors count from here */
    int flags;
    int slots;
    int nrefs; /* objects started so far */
    int depth; /* open tables and functions */
    int lazy;  /* the first pass: tables are not kept (dec_run) */
    jmp_buf *again; /* where a lazy pass starts over, while lazy */
    pz_arena_reader *arena; /* where PZ_T_SHARED strings are, or NULL */
} dec;

static void dec_any(dec *d);
static void dec_shared(dec *d, const uint8_t *at);

/* Raises "cannot decode: <what> at byte N", N being the 1-based position
 * of `at` from the start of the input. */
__attribute__((format(printf, 3, 4), noreturn))
static void dec_fail(dec *d, const uint8_t *at, const char *fmt, ...)
{
    char msg[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    lua_pushfstring(d->L, "cannot decode: %s at byte ", msg);
    snprintf(msg, sizeof msg, "%zu", (size_t)(at - d->base) + 1);
    lua_pushstring(d->L, msg);
    lua_concat(d->L, 2);
    lua_error(d->L);
    abort(); /* not reached: lua_error does not return */
}

static inline size_t dec_left(const dec *d)
{
    return (size_t)(d->end - d->p);
}

/* Pushes the scalar that starts at *pp, whole before end, and moves *pp
 * past it: integers, strings, doubles, nil, booleans, null.  Returns
 * 0, pushing nothing, for anything else, valid or not, which is left to
 * dec_any (it also says what is wrong).  The common values take this path
 * inside tables, and whole calls and results take it before any decoder
 * is set up. */
static inline __attribute__((always_inline)) int dec_scalar(lua_State *L, const uint8_t **pp,
                                                           const uint8_t *end)
{
    const uint8_t *p = *pp;
    uint64_t v;
    double d;
    if (p >= end)
        return 0;
    /* The common tags first, as they come in tables: with every number's
     * test first, the small record's decode took 6% longer. */
    uint8_t tag = *p++;
    if (tag >= PZ_T_FIXINT) {
        lua_pushnumber(L, tag - PZ_T_FIXINT);
    } else if (tag >= PZ_T_SHORTSTR && tag <= PZ_T_SHORTSTR + PZ_SHORTSTR_MAX) {
        size_t n = (size_t)(tag - PZ_T_SHORTSTR);
        if (n > (size_t)(end - p))
            return 0;
        lua_pushlstring(L, (const char *)p, n);
        p += n;
    } else if (tag == PZ_T_NIL) {
        lua_pushnil(L);
    } else if (tag == PZ_T_FALSE || tag == PZ_T_TRUE) {
        lua_pushboolean(L, tag == PZ_T_TRUE);
    } else if (tag == PZ_T_NULL) {
        lua_pushlightuserdata(L, NULL);
    } else if (tag == PZ_T_STRING) {
        if (pz_get_varint(&p, end, &v) != 0 || v > (uint64_t)(end - p))
            return 0;
        lua_pushlstring(L, (const char *)p, (size_t)v);
        p += v;
    } else {
        p--; /* the other numbers: pz_get_number reads the tag too */
        if (!pz_get_number(&p, end, &d))
            return 0;
        lua_pushnumber(L, d);
    }
    *pp = p;
    return 1;
}

/* Decodes one value and pushes it.  It runs for every table entry, so it is
 * inline and takes scalars itself; the rest, and every error, go to
 * dec_any. */
static inline __attribute__((always_inline)) void dec_value(dec *d)
{
    if (!dec_scalar(d->L, &d->p, d->end))
        dec_any(d);
}

/* Reads a varint, raising with `what` when it is truncated or too long.
 * A one-byte varint (below 128: most counts and lengths) is read inline. */
static uint64_t dec_varint_long(dec *d, const char *what)
{
    uint64_t v;
    const uint8_t *at = d->p;
    if (pz_get_varint(&d->p, d->end, &v))
        dec_fail(d, at, "bad or truncated %s", what);
    return v;
}

static inline uint64_t dec_varint(dec *d, const char *what)
{
    if (d->p < d->end && *d->p < 0x80)
        return *d->p++;
    return dec_varint_long(d, what);
}

/* Reads a varint length and checks that many bytes follow; returns the
 * bytes and stores the length. */
static const char *dec_bytes(dec *d, size_t *len, const char *what)
{
    const uint8_t *at = d->p;
    uint64_t n = dec_varint(d, what);
    const char *s = (const char *)d->p;
    if (n > dec_left(d))
        dec_fail(d, at, "%s of %llu bytes exceeds the %zu bytes left", what,
                 (unsigned long long)n, dec_left(d));
    d->p += n;
    *len = (size_t)n;
    return s;
}

/* Leaves the lazy pass, which met what needs every object kept, for the
 * full one (dec_run). */
__attribute__((noreturn)) static void dec_start_over(dec *d)
{
    longjmp(*d->again, 1);
}

/* Keeps the object on top of the stack under the next reference number. */
static void dec_ref_keep(dec *d)
{
    lua_State *L = d->L;
    int r = d->nrefs;
    lua_pushvalue(L, -1);
    if (r < DS_REF_SLOTS) {
        lua_replace(L, d->slots + DS_REF0 + r);
    } else {
        if (r == DS_REF_SLOTS) {
            lua_createtable(L, 64, 0);
            lua_replace(L, d->slots + DS_REFS);
        }
        lua_rawseti(L, d->slots + DS_REFS, r);
    }
    d->nrefs = r + 1;
}

/* Gives the object on top of the stack the next reference number: the
 * lazy pass only counts it. */
static inline void dec_ref_add(dec *d)
{
    if (d->lazy)
        d->nrefs++;
    else
        dec_ref_keep(d);
}

/* Gives the table at stack index t the next reference number, as
 * dec_ref_add. */
static void dec_ref_add_at(dec *d, int t)
{
    if (d->lazy) {
        d->nrefs++;
        return;
    }
    lua_pushvalue(d->L, t);
    dec_ref_keep(d);
    lua_pop(d->L, 1);
}

/* Pushes the object with reference number r (already checked < nrefs). */
static void dec_ref_push(dec *d, int r)
{
    if (r < DS_REF_SLOTS)
        lua_pushvalue(d->L, d->slots + DS_REF0 + r);
    else
        lua_rawgeti(d->L, d->slots + DS_REFS, r);
}

/* Reads a reference number and checks it names an object already started. */
static int dec_ref_number(dec *d)
{
    const uint8_t *at = d->p;
    uint64_t r = dec_varint(d, "reference");
    if (r >= (uint64_t)d->nrefs)
        dec_fail(d, at, "reference %llu to an object not yet decoded (%d so far)",
                 (unsigned long long)r, d->nrefs);
    return (int)r;
}

/* Free stack slots made sure of on entering levels 1, 1 + ENTER_EVERY,
 * ... (and by every function): a level keeps at most 3 slots taken below
 * the next one (a table and a key; a function and a global's name), and
 * needs 8 for its own work, so ENTER_SLOTS covers the levels up to the
 * next check.  Level 0 (a value of the tuple or the value decoded) has the
 * 8 slots its caller made sure of (dec_start, dec_tuple_count): checking
 * it too would take more room than the tuple's count left, and refuse the
 * last table of a tuple near the stack's limit.  lua_checkstack on every
 * table cost the decode of a small record a few percent. */
#define ENTER_EVERY 4
#define ENTER_SLOTS (3 * (ENTER_EVERY - 1) + 8)

/* Raises unless one more table or function may be opened; `always`
 * checks the stack whatever the depth. */
static inline void dec_enter(dec *d, const uint8_t *at, int always)
{
    if (d->depth >= PZ_MAX_DEPTH)
        dec_fail(d, at, "nesting deeper than %d levels", PZ_MAX_DEPTH);
    if ((always || d->depth % ENTER_EVERY == 1) && !lua_checkstack(d->L, ENTER_SLOTS))
        dec_fail(d, at, "stack overflow");
    d->depth++;
}

/* Numbers are read into blocks of this many doubles on the C stack. */
#define NUMBERS_BLOCK 256

/* Reads numbers from *pp (before end) into dst, at most want of them, and
 * moves *pp past them; returns how many it read.  It stops at anything
 * else, a NaN included (codec_array.c: a NaN reaches Lua through
 * lua_pushnumber only), and leaves that to dec_value.  Integers of one and
 * two varint bytes (below 16384) are read without the varint loop. */
static size_t scan_numbers(const uint8_t **pp, const uint8_t *end, double *dst, size_t want)
{
    const uint8_t *p = *pp;
    size_t k = 0;
    for (; k < want && p < end; k++) {
        uint8_t tag = p[0];
        uint64_t v;
        if (tag >= PZ_T_FIXINT) {
            dst[k] = tag - PZ_T_FIXINT;
            p++;
            continue;
        }
        if (tag == PZ_T_POSINT || tag == PZ_T_NEGINT) {
            const uint8_t *q = p + 1;
            if (end - q >= 2 && (q[0] & 0x80) && !(q[1] & 0x80)) {
                v = (uint64_t)(q[0] & 0x7f) | (uint64_t)q[1] << 7;
                q += 2;
            } else if (pz_get_varint(&q, end, &v) != 0 || v > (uint64_t)1 << 53) {
                break;
            }
            dst[k] = tag == PZ_T_NEGINT ? -(double)v : (double)v;
            p = q;
            continue;
        }
        if (tag == PZ_T_DOUBLE && end - p >= 9) {
            double x = pz_le_double_get(p + 1);
            if (isnan(x))
                break;
            dst[k] = x;
            p += 9;
            continue;
        }
        break;
    }
    *pp = p;
    return k;
}

/* Decodes the numbers that start the array part of a table (narr items)
 * into the table at t, item i under key offset + i: a block of them at a
 * time is read in C and stored by pz_fill_doubles, which costs a
 * nanosecond or two a number where lua_pushnumber and lua_rawseti cost
 * several.  Returns the index of the first item not decoded (narr + 1 when
 * all were numbers); the caller decodes the rest one by one, and says
 * what is wrong if anything is. */
static uint64_t dec_numbers(dec *d, int t, uint64_t narr, size_t offset)
{
    double block[NUMBERS_BLOCK];
    uint64_t i = 1;
    if (narr < 2 || d->p >= d->end)
        return 1;
    uint8_t tag = *d->p; /* an array of anything else is not looked at */
    if (tag < PZ_T_FIXINT && tag != PZ_T_DOUBLE && tag != PZ_T_POSINT && tag != PZ_T_NEGINT)
        return 1;
    if (!lua_checkstack(d->L, 8))
        return 1;
    while (i <= narr) {
        size_t want = narr - i + 1 < NUMBERS_BLOCK ? (size_t)(narr - i + 1) : NUMBERS_BLOCK;
        size_t k = scan_numbers(&d->p, d->end, block, want);
        pz_fill_doubles(d->L, t, offset + (size_t)(i - 1), block, k);
        i += k;
        if (k < want)
            break;
    }
    return i;
}

/* Reads a table's counts (after its tag at `at`), checked against the
 * bytes left: each value takes at least one byte. */
static void dec_table_counts(dec *d, const uint8_t *at, uint64_t *narr, uint64_t *nhash)
{
    *narr = dec_varint(d, "table size");
    *nhash = dec_varint(d, "table size");
    if (*narr > dec_left(d) || *nhash > dec_left(d) / 2 || *narr + 2 * *nhash > dec_left(d))
        dec_fail(d, at, "table of %llu + %llu entries does not fit in the %zu bytes left",
                 (unsigned long long)*narr, (unsigned long long)*nhash, dec_left(d));
}

/* Decodes a table after its tag: counts, the array part, the hash part (no
 * nil or NaN keys), then the metatable if with_mt. */
static void dec_table(dec *d, const uint8_t *at, int with_mt)
{
    lua_State *L = d->L;
    uint64_t narr, nhash;
    int t;
    dec_enter(d, at, 0);
    dec_table_counts(d, at, &narr, &nhash);
    lua_createtable(L, narr > (1 << 24) ? 1 << 24 : (int)narr,
                    nhash > (1 << 24) ? 1 << 24 : (int)nhash);
    t = lua_gettop(L);
    dec_ref_add(d);
    for (uint64_t i = dec_numbers(d, t, narr, 0); i <= narr; i++) {
        dec_value(d);
        lua_rawseti(L, t, (int)i);
    }
    for (uint64_t i = 0; i < nhash; i++) {
        const uint8_t *kat = d->p;
        int string_key = kat < d->end && ((*kat >= PZ_T_SHORTSTR &&
                                           *kat <= PZ_T_SHORTSTR + PZ_SHORTSTR_MAX) ||
                                          *kat == PZ_T_STRING);
        dec_value(d);
        if (!string_key) { /* the common keys need no look */
            if (lua_isnil(L, -1))
                dec_fail(d, kat, "nil table key");
            if (lua_type(L, -1) == LUA_TNUMBER && isnan(lua_tonumber(L, -1)))
                dec_fail(d, kat, "NaN table key");
        }
        dec_value(d);
        lua_rawset(L, t);
    }
    if (with_mt) {
        const uint8_t *mat = d->p;
        dec_value(d);
        if (!lua_istable(L, -1))
            dec_fail(d, mat, "metatable is a %s, not a table", luaL_typename(L, -1));
        lua_setmetatable(L, t);
    }
    d->depth--;
}

/* Reads the count of a packed array of doubles (after its tag at `at`),
 * checked against the bytes left, and room on the stack for storing them. */
static size_t dec_doubles_count(dec *d, const uint8_t *at)
{
    uint64_t n = dec_varint(d, "array size");
    if (n > dec_left(d) / 8)
        dec_fail(d, at, "array of %llu doubles does not fit in the %zu bytes left",
                 (unsigned long long)n, dec_left(d));
    if (!lua_checkstack(d->L, 8))
        dec_fail(d, at, "stack overflow");
    return (size_t)n;
}

/* Decodes a packed array of doubles after its tag: a table like any other
 * (it gets a reference number), with no nesting inside. */
static void dec_doubles(dec *d, const uint8_t *at)
{
    size_t n = dec_doubles_count(d, at);
    pz_unpack_doubles(d->L, d->p, n);
    d->p += 8 * n;
    dec_ref_add(d);
}

/* Decodes the table whose tag is at `at` (read already) into the table at
 * stack index into: each entry under its key plus offset, keys being item
 * numbers (integers from 1).  It must be a table without metatable or
 * packed doubles.  It gets its reference number as any table would, with
 * `into` standing for it. */
static void dec_table_into(dec *d, const uint8_t *at, uint8_t tag, int into, size_t offset)
{
    lua_State *L = d->L;
    uint64_t narr, nhash;
    if (tag == PZ_T_DOUBLES && !(d->flags & PZ_DECODE_FORMAT_1)) {
        size_t n = dec_doubles_count(d, at);
        if (n > (size_t)INT_MAX - offset)
            dec_fail(d, at, "%zu items' results past the last a table can hold", n);
        pz_fill_wire_doubles(L, into, offset, d->p, n);
        d->p += 8 * n;
        dec_ref_add_at(d, into);
        return;
    }
    if (tag != PZ_T_TABLE)
        dec_fail(d, at, "expected a table of items' results, found tag 0x%02x", tag);
    dec_enter(d, at, 0);
    dec_table_counts(d, at, &narr, &nhash);
    if (narr > (uint64_t)INT_MAX - offset)
        dec_fail(d, at, "%llu items' results past the last a table can hold",
                 (unsigned long long)narr);
    dec_ref_add_at(d, into);
    for (uint64_t i = dec_numbers(d, into, narr, offset); i <= narr; i++) {
        dec_value(d);
        lua_rawseti(L, into, (int)(offset + i));
    }
    for (uint64_t i = 0; i < nhash; i++) {
        const uint8_t *kat = d->p;
        dec_value(d);
        double k = lua_type(L, -1) == LUA_TNUMBER ? lua_tonumber(L, -1) : 0;
        if (!(k >= 1 && k <= (double)(INT_MAX - offset) && k == floor(k)))
            dec_fail(d, kat, "a key that is no item number in a table of items' results");
        lua_pop(L, 1);
        dec_value(d);
        lua_rawseti(L, into, (int)(offset + (size_t)k));
    }
    d->depth--;
}

/* Raises the refusal to load functions from data not trusted. */
__attribute__((noreturn))
static void dec_refuse(dec *d, const char *what)
{
    lua_pushfstring(d->L, "refusing to load %s: decode with {functions = true}, "
                          "and only data you trust", what);
    lua_error(d->L);
    abort(); /* not reached */
}

/* Pushes package.loaded[name], `require`-ing it in protected mode first when
 * functions are allowed; raises when the module cannot be had. */
static void dec_load_module(dec *d, const uint8_t *at, const char *name, size_t n)
{
    lua_State *L = d->L;
    lua_getfield(L, LUA_REGISTRYINDEX, "_LOADED");
    if (!lua_istable(L, -1))
        dec_fail(d, at, "package.loaded is missing");
    lua_pushlstring(L, name, n);
    lua_rawget(L, -2);
    lua_remove(L, -2);
    if (!lua_isnil(L, -1))
        return;
    lua_pop(L, 1);
    if (!(d->flags & PZ_DECODE_FUNCTIONS))
        dec_fail(d, at, "module '%.*s' is not loaded", (int)(n > 64 ? 64 : n), name);
    lua_getglobal(L, "require");
    lua_pushlstring(L, name, n);
    if (lua_pcall(L, 1, 1, 0))
        dec_fail(d, at, "cannot require module '%.*s': %.120s", (int)(n > 64 ? 64 : n), name,
                 lua_isstring(L, -1) ? lua_tostring(L, -1) : "(error object is not a string)");
}

/* Decodes a PZ_T_MODULE or PZ_T_MEMBER reference after its tag and pushes
 * the object it names, which must be a table, or a function when functions
 * are allowed. */
static void dec_module(dec *d, const uint8_t *at, int member)
{
    lua_State *L = d->L;
    size_t n, kn = 0;
    const char *name = dec_bytes(d, &n, "module name"), *key = NULL;
    int t;
    if (member)
        key = dec_bytes(d, &kn, "member name");
    dec_load_module(d, at, name, n);
    if (member) {
        if (!lua_istable(L, -1))
            dec_fail(d, at, "module '%.*s' is not a table", (int)(n > 64 ? 64 : n), name);
        lua_pushlstring(L, key, kn);
        lua_rawget(L, -2);
        lua_remove(L, -2);
    }
    t = lua_type(L, -1);
    if (t != LUA_TTABLE && t != LUA_TFUNCTION)
        dec_fail(d, at, "'%.*s%s%.*s' is a %s, not a table or function",
                 (int)(n > 64 ? 64 : n), name, member ? "." : "",
                 (int)(kn > 64 ? 64 : kn), member ? key : "", luaL_typename(L, -1));
    if (t == LUA_TFUNCTION && !(d->flags & PZ_DECODE_FUNCTIONS))
        dec_refuse(d, "a function reference");
    dec_ref_add(d);
}

/* Joins upvalue i of the function at f to the upvalue that a PZ_T_UPJOIN
 * (tag already read) names, after checking it exists. */
static void dec_upjoin(dec *d, const uint8_t *at, int f, int i)
{
    lua_State *L = d->L;
    int r = dec_ref_number(d), n;
    if (d->p >= d->end)
        dec_fail(d, at, "truncated upvalue join");
    n = *d->p++;
    dec_ref_push(d, r);
    if (!lua_isfunction(L, -1) || lua_iscfunction(L, -1))
        dec_fail(d, at, "upvalue join names a %s, not a Lua function", luaL_typename(L, -1));
    if (n < 1 || !lua_getupvalue(L, -1, n))
        dec_fail(d, at, "upvalue join names upvalue %d, which does not exist", n);
    lua_pop(L, 1);
    lua_upvaluejoin(L, f, i, lua_gettop(L), n);
    lua_pop(L, 1);
}

/* Decodes the upvalues of the freshly loaded function at f. */
static void dec_upvalues(dec *d, int f)
{
    lua_State *L = d->L;
    const uint8_t *at = d->p;
    int n, have = 0;
    if (d->p >= d->end)
        dec_fail(d, at, "truncated function");
    n = *d->p++;
    while (lua_getupvalue(L, f, have + 1)) {
        lua_pop(L, 1);
        have++;
    }
    if (n != have)
        dec_fail(d, at, "function has %d upvalues, the encoding %d", have, n);
    for (int i = 1; i <= n; i++) {
        const uint8_t *uat = d->p;
        if (d->p < d->end && *d->p == PZ_T_UPJOIN) {
            d->p++;
            dec_upjoin(d, uat, f, i);
            continue;
        }
        dec_value(d);
        lua_setupvalue(L, f, i);
    }
}

/* Decodes a function's globals: each is set in the decoding state's
 * globals only when absent there, so a parent never loses its own. */
static void dec_globals(dec *d)
{
    lua_State *L = d->L;
    const uint8_t *at = d->p;
    uint64_t n = dec_varint(d, "global count");
    if (n > dec_left(d) / 2)
        dec_fail(d, at, "%llu globals do not fit in the %zu bytes left",
                 (unsigned long long)n, dec_left(d));
    for (uint64_t i = 0; i < n; i++) {
        size_t len;
        const char *name = dec_bytes(d, &len, "global name");
        lua_pushlstring(L, name, len);
        dec_value(d);
        lua_pushvalue(L, -2);
        lua_rawget(L, LUA_GLOBALSINDEX);
        if (lua_isnil(L, -1)) {
            lua_pop(L, 1);
            lua_rawset(L, LUA_GLOBALSINDEX);
        } else {
            lua_pop(L, 3);
        }
    }
}

/* Decodes a function after its tag: only with PZ_DECODE_FUNCTIONS, since
 * LuaJIT does not verify bytecode. */
static void dec_function(dec *d, const uint8_t *at)
{
    lua_State *L = d->L;
    size_t len;
    const char *code;
    int f;
    if (!(d->flags & PZ_DECODE_FUNCTIONS))
        dec_refuse(d, "an encoded function");
    dec_enter(d, at, 1);
    code = dec_bytes(d, &len, "bytecode");
    if (luaL_loadbufferx(L, code, len, "=(decoded function)", "b"))
        dec_fail(d, at, "bad bytecode (%.120s)", lua_tostring(L, -1));
    f = lua_gettop(L);
    dec_ref_add(d);
    dec_upvalues(d, f);
    dec_globals(d);
    d->depth--;
}

/* Decodes a number after its tag. */
static void dec_number(dec *d, const uint8_t *at, uint8_t tag)
{
    uint64_t v;
    double x;
    if (tag == PZ_T_DOUBLE) {
        if (dec_left(d) < 8)
            dec_fail(d, at, "truncated number");
        x = pz_le_double_get(d->p);
        d->p += 8;
        lua_pushnumber(d->L, x);
        return;
    }
    v = dec_varint(d, "integer");
    if (v > (uint64_t)1 << 53)
        dec_fail(d, at, "integer out of range");
    x = (double)v;
    lua_pushnumber(d->L, tag == PZ_T_NEGINT ? -x : x);
}

/* Decodes one value of any kind and pushes it (see dec_value). */
static __attribute__((noinline)) void dec_any(dec *d)
{
    lua_State *L = d->L;
    const uint8_t *at = d->p;
    uint8_t tag;
    size_t n;
    const char *s;
    if (at >= d->end)
        dec_fail(d, at, "truncated input");
    tag = *d->p++;
    if (tag >= PZ_T_FIXINT) {
        lua_pushnumber(L, tag - PZ_T_FIXINT);
        return;
    }
    if (tag >= PZ_T_SHORTSTR && tag <= PZ_T_SHORTSTR + PZ_SHORTSTR_MAX) {
        n = (size_t)(tag - PZ_T_SHORTSTR);
        if (n > dec_left(d))
            dec_fail(d, at, "truncated string");
        lua_pushlstring(L, (const char *)d->p, n);
        d->p += n;
        return;
    }
    switch (tag) {
    case PZ_T_NIL:
        lua_pushnil(L);
        return;
    case PZ_T_FALSE:
    case PZ_T_TRUE:
        lua_pushboolean(L, tag == PZ_T_TRUE);
        return;
    case PZ_T_NULL:
        lua_pushlightuserdata(L, NULL);
        return;
    case PZ_T_DOUBLE:
    case PZ_T_POSINT:
    case PZ_T_NEGINT:
        dec_number(d, at, tag);
        return;
    case PZ_T_STRING:
        s = dec_bytes(d, &n, "string");
        lua_pushlstring(L, s, n);
        return;
    case PZ_T_SHARED:
        dec_shared(d, at);
        return;
    case PZ_T_TABLE:
    case PZ_T_TABLE_MT:
        dec_table(d, at, tag == PZ_T_TABLE_MT);
        return;
    case PZ_T_REF:
        if (d->lazy)
            dec_start_over(d);
        dec_ref_push(d, dec_ref_number(d));
        return;
    case PZ_T_MODULE:
    case PZ_T_MEMBER:
        if (d->lazy)
            dec_start_over(d);
        dec_module(d, at, tag == PZ_T_MEMBER);
        return;
    case PZ_T_FUNCTION:
        if (d->lazy)
            dec_start_over(d);
        dec_function(d, at);
        return;
    case PZ_T_DOUBLES:
        if (d->flags & PZ_DECODE_FORMAT_1)
            dec_fail(d, at, "unknown tag 0x%02x", tag);
        dec_doubles(d, at);
        return;
    case PZ_T_UPJOIN:
        dec_fail(d, at, "upvalue join outside a function's upvalues");
    default:
        dec_fail(d, at, "unknown tag 0x%02x", tag);
    }
}

/* A string in shared memory (PZ_T_SHARED): its place is checked against
 * the region, whose bytes a worker may have changed since, but never
 * outside it. */
static void dec_shared(dec *d, const uint8_t *at)
{
    uint64_t offset = dec_varint(d, "shared string offset");
    uint64_t n = dec_varint(d, "shared string length");
    if (!d->arena)
        dec_fail(d, at, "a string in a pool's shared memory, outside a pool");
    if (offset > d->arena->size || n > d->arena->size - offset)
        dec_fail(d, at, "shared string of %llu bytes at %llu, outside the %zu bytes shared",
                 (unsigned long long)n, (unsigned long long)offset, d->arena->size);
    lua_pushlstring(d->L, d->arena->base + offset, (size_t)n);
    d->arena->last_end = offset + n;
    d->arena->bytes += n;
}

/* Sets up a decoder over [p, end), positions counted from base; reserves
 * its stack slots. */
static void dec_start(dec *d, lua_State *L, const char *base, const char *p, const char *end, int flags)
{
    d->L = L;
    d->base = (const uint8_t *)base;
    d->p = (const uint8_t *)p;
    d->end = (const uint8_t *)end;
    d->flags = flags;
    d->nrefs = d->depth = 0;
    d->lazy = 0;
    d->again = NULL;
    d->arena = NULL;
    luaL_checkstack(L, DS_COUNT + 8, "cannot decode: stack overflow");
    d->slots = lua_gettop(L) + 1;
    lua_settop(L, d->slots + DS_COUNT - 1);
}

/* Raises when bytes are left over after the value. */
static void dec_check_end(dec *d)
{
    if (d->p != d->end)
        dec_fail(d, d->p, "%zu trailing byte%s after the value", dec_left(d),
                 dec_left(d) == 1 ? "" : "s");
}

/* One decode after dec_start: it reads the input and pushes its values
 * above the reserved slots (or stores them), and returns what its entry
 * point will. */
typedef int (*dec_body)(dec *d, void *ctx);

/* Runs body lazily and, if that pass starts over (dec_start_over), again
 * in full from where it began: the stack cut back to the reserved slots,
 * the shared strings' counts as they were (the module's comment says why
 * nothing else need be undone).  Nothing is changed between the setjmp
 * and the longjmp but *d, *d->arena and the Lua stack, all reset here,
 * and a table of items' results (pz_decode_tuple_into), whose entries the
 * full pass writes again. */
static int dec_run(dec *d, dec_body body, void *ctx)
{
    jmp_buf again;
    const uint8_t *start = d->p;
    const pz_arena_reader counts = d->arena ? *d->arena : (pz_arena_reader){0};
    if (setjmp(again) == 0) {
        d->lazy = 1;
        d->again = &again;
    } else {
        lua_settop(d->L, d->slots + DS_COUNT - 1);
        d->p = start;
        d->nrefs = d->depth = 0;
        d->lazy = 0;
        d->again = NULL;
        if (d->arena)
            *d->arena = counts;
    }
    return body(d, ctx);
}

static int decode_value_body(dec *d, void *ctx)
{
    (void)ctx;
    dec_value(d);
    dec_check_end(d);
    return 1;
}

/* Decodes exactly one value in [p, end) and pushes it. */
static void decode_value(lua_State *L, const char *base, const char *p, const char *end, int flags)
{
    dec d;
    dec_start(&d, L, base, p, end, flags);
    dec_run(&d, decode_value_body, NULL);
    lua_replace(L, d.slots);
    lua_settop(L, d.slots);
}

void pz_decode_value_at(lua_State *L, const char *base, const char *p, size_t n, int flags)
{
    const uint8_t *q = (const uint8_t *)p, *end = q + n;
    luaL_checkstack(L, 1, "cannot decode: stack overflow");
    if (dec_scalar(L, &q, end)) {
        if (q == end)
            return;
        lua_pop(L, 1); /* trailing bytes: the full decoder says so */
    }
    decode_value(L, base, p, p + n, flags);
}

void pz_decode_value(lua_State *L, const char *p, size_t n, int flags)
{
    pz_decode_value_at(L, p, p, n, flags);
}

/* Pushes the values of a tuple at [p, p+n) when all are scalars (most
 * calls' arguments) and returns how many; returns -1, pushing nothing,
 * otherwise. */
static int decode_scalar_tuple(lua_State *L, const char *p, size_t n)
{
    const uint8_t *q = (const uint8_t *)p, *end = q + n;
    uint64_t count;
    double x;
    /* One number, the commonest tuple (a tiny call's argument, its
     * result), read straight: the general loop's set-up was about a sixth
     * of a tiny call's time in a worker. */
    if (n >= 2 && q[0] == 1) {
        const uint8_t *r = q + 1;
        if (pz_get_number(&r, end, &x) && r == end && lua_checkstack(L, 2)) {
            lua_pushnumber(L, x);
            return 1;
        }
    }
    if (pz_get_varint(&q, end, &count) != 0 || count > 64 || !lua_checkstack(L, (int)count + 1))
        return -1;
    for (int i = 0; i < (int)count; i++) {
        if (!dec_scalar(L, &q, end)) {
            lua_pop(L, i);
            return -1;
        }
    }
    if (q != end) {
        lua_pop(L, (int)count);
        return -1;
    }
    return (int)count;
}

/* Reads a tuple's value count, checked against the bytes left and the
 * stack. */
static int dec_tuple_count(dec *d)
{
    const uint8_t *at = d->p;
    uint64_t count = dec_varint(d, "value count");
    if (count > dec_left(d) || count > 1000000 || !lua_checkstack(d->L, (int)count + 8))
        dec_fail(d, at, "tuple of %llu values is too large for the %zu bytes left or the stack",
                 (unsigned long long)count, dec_left(d));
    return (int)count;
}

/* Moves the tuple's count values, pushed above the reserved slots, down
 * over them; returns count. */
static int dec_tuple_end(dec *d, int count)
{
    lua_State *L = d->L;
    dec_check_end(d);
    for (int i = 0; i < count; i++) {
        lua_pushvalue(L, d->slots + DS_COUNT + i);
        lua_replace(L, d->slots + i);
    }
    lua_settop(L, d->slots + count - 1);
    return count;
}

static int decode_tuple_body(dec *d, void *ctx)
{
    (void)ctx;
    int count = dec_tuple_count(d);
    for (int i = 0; i < count; i++)
        dec_value(d);
    return dec_tuple_end(d, count);
}

int pz_decode_tuple(lua_State *L, const char *p, size_t n, int flags, pz_arena_reader *arena)
{
    int scalars = decode_scalar_tuple(L, p, n);
    if (scalars >= 0)
        return scalars;
    dec d;
    dec_start(&d, L, p, p, p + n, flags);
    d.arena = arena;
    return dec_run(&d, decode_tuple_body, NULL);
}

/* Where pz_decode_tuple_into puts the items' results. */
typedef struct into_target {
    int into;
    size_t offset;
} into_target;

static int decode_tuple_into_body(dec *d, void *ctx)
{
    const into_target *t = ctx;
    const uint8_t *at = d->p;
    if (t->offset >= INT_MAX)
        dec_fail(d, at, "items' results past the last a table can hold");
    int count = dec_tuple_count(d);
    if (count < 1 || d->p >= d->end)
        dec_fail(d, at, "expected a table of items' results, found no value");
    at = d->p++;
    dec_table_into(d, at, *at, t->into, t->offset);
    lua_pushboolean(d->L, 1);
    for (int i = 1; i < count; i++)
        dec_value(d);
    return dec_tuple_end(d, count);
}

int pz_decode_tuple_into(lua_State *L, const char *p, size_t n, int flags, int into, size_t offset,
                         pz_arena_reader *arena)
{
    dec d;
    into_target target = {into < 0 ? lua_gettop(L) + into + 1 : into, offset};
    dec_start(&d, L, p, p, p + n, flags);
    d.arena = arena;
    return dec_run(&d, decode_tuple_into_body, &target);
}

