/*
 * codec.c - the value codec: Lua values to bytes (codec_format.h) and back.
 *
 * Encoding is one recursive walk over the value with the raw Lua C API.  The
 * walk keeps a few Lua objects in stack slots it reserves at the start (see
 * enc_slot): the reference table (object -> reference number), the upvalue
 * table (upvalue id -> function and index) and the module index.  Those
 * are created only when needed, so encoding a string or a flat table of
 * numbers allocates nothing but its output.
 *
 * The module index (object -> the bytes of a PZ_T_MODULE or PZ_T_MEMBER
 * reference) is built from package.loaded and cached in the registry.  A
 * top-level encode that meets a table or function compares, once,
 * package.loaded with the copy of it the index was built from, and rebuilds
 * the index when a module was loaded, dropped or replaced since, so that a
 * module required a moment ago travels by reference.  Building visits every
 * member of every module, so it is not done otherwise, except once for a C
 * function the index does not know (which could not travel at all); and a
 * hit is checked against package.loaded before it is used, so that a member
 * reassigned since is not sent as a reference to its successor.  A Lua
 * function added to a loaded module after the index was built travels by
 * value.
 *
 * Decoding is one recursive descent that checks every count against the
 * bytes left before it allocates, so malformed input costs at most time and
 * memory in proportion to its length and ends in a Lua error naming the
 * problem and its byte position (1-based, as string.sub counts).
 *
 * Error paths: the encoder keeps, for every open table or function, one
 * segment saying which slot of it is being encoded (a key at a stack index,
 * an upvalue name, ...).  Nothing is formatted unless an error is raised.
 */
#include <lauxlib.h>
#include <lua.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "codec.h"
#include "codec_format.h"

/* Registry keys (their addresses are what counts). */
static const char reg_index = 0;   /* the module index table */
static const char reg_scanner = 0; /* the Lua helper that lists a function's globals */
static const char reg_scratch = 0; /* metatable of scratch buffers */
static const char reg_same = 0;    /* the Lua helper that compares package.loaded */
static const char reg_items = 0;   /* the Lua helper that hands out a sequence's items */

/* Bodies up to this size are moved to shrink padded counts to minimal
 * varints; beyond it the padding costs less than the move.  Bounding the
 * move keeps encoding linear however deep the nesting is. */
#define COMPACT_MAX 1024

/* Width of the padded varints written before their value is known: 5 bytes
 * hold 35 bits, more than any table or bytecode size LuaJIT allows. */
#define PAD_WIDTH 5

/* ------------------------------------------------------------------------
 * Encoder state
 * --------------------------------------------------------------------- */

/* What the encoder is doing inside one open table or function. */
enum seg_kind {
    SEG_NONE,     /* nothing yet */
    SEG_KEY,      /* encoding a key of the table */
    SEG_VALUE,    /* encoding the value under the key at stack index idx */
    SEG_ITEM,     /* encoding item idx of a sequence (see enc_items) */
    SEG_MT,       /* encoding the table's metatable */
    SEG_UPVALUE,  /* encoding upvalue idx, called name */
    SEG_GLOBAL    /* encoding the global whose name is at stack index idx */
};

typedef struct seg {
    enum seg_kind kind;
    int idx;
    const char *name;
} seg;

/* Stack slots reserved by every top-level encode, relative to enc.slots. */
enum {
    ES_FIRST, /* the first table or function met (reference 0) */
    ES_REFS,  /* object -> reference number, once a second object is met */
    ES_UPVALS,/* upvalue id -> function reference * 256 + upvalue index */
    ES_INDEX, /* the module index, loaded on first use */
    ES_COUNT
};

typedef struct enc {
    lua_State *L;
    pz_buf *out;
    int flags;
    int slots;         /* stack index of the first reserved slot */
    int nrefs;         /* reference numbers given so far */
    int depth;         /* open tables and functions */
    int index_fresh;   /* the index was rebuilt during this encode */
    int index_checked; /* package.loaded was compared this encode */
    int tuple_index;   /* > 0: paths start with root[tuple_index] */
    int items_held;    /* stack slots enc_items holds, all open tables together */
    const char *root;
    int *busy;         /* cleared before raising: see l_encode */
    seg segs[PZ_MAX_DEPTH + 1];
} enc;

static void enc_other(enc *e, int idx, int type);

/* ------------------------------------------------------------------------
 * Encoder errors and paths
 * --------------------------------------------------------------------- */

/* True when s[0..n) can follow a dot in Lua source: an identifier that is
 * not a reserved word. */
static int is_identifier(const char *s, size_t n)
{
    static const char *const reserved[] = {
        "and", "break", "do", "else", "elseif", "end", "false", "for",
        "function", "goto", "if", "in", "local", "nil", "not", "or",
        "repeat", "return", "then", "true", "until", "while"};
    if (n == 0 || (s[0] >= '0' && s[0] <= '9'))
        return 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (!(c == '_' || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
              (c >= '0' && c <= '9')))
            return 0;
    }
    for (size_t i = 0; i < sizeof reserved / sizeof *reserved; i++)
        if (strlen(reserved[i]) == n && memcmp(reserved[i], s, n) == 0)
            return 0;
    return 1;
}

/* Appends s as a double-quoted Lua string literal, escaping what would not
 * print, and cutting it short when long: it is for reading, not loading. */
static void add_quoted(luaL_Buffer *b, const char *s, size_t n)
{
    size_t max = n > 64 ? 60 : n;
    luaL_addchar(b, '"');
    for (size_t i = 0; i < max; i++) {
        unsigned char c = (unsigned char)s[i];
        char tmp[8];
        if (c == '"' || c == '\\') {
            luaL_addchar(b, '\\');
            luaL_addchar(b, (char)c);
        } else if (c == '\n') {
            luaL_addlstring(b, "\\n", 2);
        } else if (c < 32 || c == 127) {
            snprintf(tmp, sizeof tmp, "\\%u", c);
            luaL_addstring(b, tmp);
        } else {
            luaL_addchar(b, (char)c);
        }
    }
    if (max < n)
        luaL_addlstring(b, "...", 3);
    luaL_addchar(b, '"');
}

/* Appends the path step for the key at stack index idx: .name, ["str"],
 * [12], [true], [table]. */
static void add_key(luaL_Buffer *b, lua_State *L, int idx)
{
    char tmp[64];
    size_t n;
    const char *s;
    double d;
    switch (lua_type(L, idx)) {
    case LUA_TSTRING:
        s = lua_tolstring(L, idx, &n);
        if (is_identifier(s, n)) {
            luaL_addchar(b, '.');
            luaL_addlstring(b, s, n);
        } else {
            luaL_addchar(b, '[');
            add_quoted(b, s, n);
            luaL_addchar(b, ']');
        }
        return;
    case LUA_TNUMBER:
        d = lua_tonumber(L, idx);
        if (d == floor(d) && fabs(d) <= PZ_MAX_SAFE_INT)
            snprintf(tmp, sizeof tmp, "[%.0f]", d);
        else
            snprintf(tmp, sizeof tmp, "[%.17g]", d);
        luaL_addstring(b, tmp);
        return;
    case LUA_TBOOLEAN:
        luaL_addstring(b, lua_toboolean(L, idx) ? "[true]" : "[false]");
        return;
    default:
        snprintf(tmp, sizeof tmp, "[%s]", luaL_typename(L, idx));
        luaL_addstring(b, tmp);
        return;
    }
}

/* Appends the path step of one open table or function. */
static void add_seg(luaL_Buffer *b, lua_State *L, const seg *s)
{
    char tmp[32];
    switch (s->kind) {
    case SEG_NONE:
        return;
    case SEG_KEY:
        luaL_addstring(b, "<key>");
        return;
    case SEG_VALUE:
        add_key(b, L, s->idx);
        return;
    case SEG_ITEM:
        snprintf(tmp, sizeof tmp, "[%d]", s->idx);
        luaL_addstring(b, tmp);
        return;
    case SEG_MT:
        luaL_addstring(b, "<metatable>");
        return;
    case SEG_UPVALUE:
        if (s->name && *s->name) {
            luaL_addstring(b, "<upvalue '");
            luaL_addstring(b, s->name);
            luaL_addstring(b, "'>");
        } else {
            snprintf(tmp, sizeof tmp, "<upvalue #%d>", s->idx);
            luaL_addstring(b, tmp);
        }
        return;
    case SEG_GLOBAL:
        luaL_addstring(b, "<global '");
        luaL_addstring(b, lua_tostring(L, s->idx));
        luaL_addstring(b, "'>");
        return;
    }
}

/* Appends the path of the value being encoded.  Very deep paths keep their
 * two ends: the start says where the value is, the end what it is. */
static void add_path(luaL_Buffer *b, enc *e)
{
    char tmp[32];
    luaL_addstring(b, e->root);
    if (e->tuple_index > 0) {
        snprintf(tmp, sizeof tmp, "[%d]", e->tuple_index);
        luaL_addstring(b, tmp);
    }
    for (int i = 0; i < e->depth; i++) {
        if (e->depth > 24 && i == 8) {
            luaL_addstring(b, "...");
            i = e->depth - 12;
        }
        add_seg(b, e->L, &e->segs[i]);
    }
}

/* Raises "<what> at <path>".  Clears the caller's busy flag first, so that
 * the scratch buffer of the Lua-facing encode is free again. */
__attribute__((noreturn))
static void enc_raise(enc *e, const char *what)
{
    luaL_Buffer b;
    if (e->busy)
        *e->busy = 0;
    luaL_buffinit(e->L, &b);
    luaL_addstring(&b, what);
    luaL_addstring(&b, " at ");
    add_path(&b, e);
    luaL_pushresult(&b);
    lua_error(e->L);
    abort(); /* not reached: lua_error does not return */
}

/* Raises the error for running out of memory while growing the output. */
__attribute__((noreturn))
static void enc_oom(enc *e)
{
    enc_raise(e, "cannot encode: out of memory");
}

/* ------------------------------------------------------------------------
 * Output
 * --------------------------------------------------------------------- */

/* Returns room for n more bytes at the end of the output, or raises. */
static inline uint8_t *enc_room(enc *e, size_t n)
{
    char *p = pz_buf_reserve(e->out, n);
    if (!p)
        enc_oom(e);
    return (uint8_t *)p;
}

static inline void put_byte(enc *e, uint8_t byte)
{
    *enc_room(e, 1) = byte;
    e->out->len++;
}

static inline void put_varint(enc *e, uint64_t v)
{
    e->out->len += pz_put_varint(enc_room(e, PZ_VARINT_MAX_BYTES), v);
}

static inline void put_bytes(enc *e, const void *p, size_t n)
{
    if (n)
        memcpy(enc_room(e, n), p, n);
    e->out->len += n;
}

static inline void enc_number(enc *e, double d)
{
    e->out->len += pz_put_number(enc_room(e, PZ_NUMBER_MAX_BYTES), d);
}

static inline void enc_string(enc *e, const char *s, size_t n)
{
    uint8_t *w = enc_room(e, 1 + PZ_VARINT_MAX_BYTES + n);
    size_t h = pz_put_string_header(w, n);
    memcpy(w + h, s, n);
    e->out->len += h + n;
}

/* Encodes the value at absolute stack index idx, leaving the stack as it
 * was.  It runs for every table entry, so it is inline and handles numbers
 * and strings itself; the other types, tables and functions among them,
 * go to enc_other, which keeps this small. */
static inline __attribute__((always_inline)) void enc_value(enc *e, int idx)
{
    lua_State *L = e->L;
    int type = lua_type(L, idx);
    if (type == LUA_TNUMBER) {
        enc_number(e, lua_tonumber(L, idx));
    } else if (type == LUA_TSTRING) {
        size_t n;
        const char *s = lua_tolstring(L, idx, &n);
        enc_string(e, s, n);
    } else {
        enc_other(e, idx, type);
    }
}

static size_t varint_len(uint64_t v)
{
    size_t n = 1;
    while (v >= 0x80) {
        v >>= 7;
        n++;
    }
    return n;
}

/* Writes v as a varint of exactly `width` bytes (continuation bits on the
 * padding): the decoder reads it like any other varint. */
static void put_padded_varint(uint8_t *dst, uint64_t v, int width)
{
    for (int i = 0; i < width - 1; i++) {
        dst[i] = (uint8_t)(v | 0x80);
        v >>= 7;
    }
    dst[width - 1] = (uint8_t)v;
}

/* Fills the hole of n * PAD_WIDTH bytes left at offset `at` with the
 * varints v[0..n).  When the bytes written after the hole are few, they are
 * moved back so the varints take their minimal size. */
static void patch_varints(enc *e, size_t at, const uint64_t *v, int n)
{
    uint8_t *data = (uint8_t *)e->out->data;
    size_t hole = (size_t)n * PAD_WIDTH, need = 0;
    size_t body = e->out->len - (at + hole);
    for (int i = 0; i < n; i++)
        need += varint_len(v[i]);
    if (need < hole && body <= COMPACT_MAX) {
        memmove(data + at + need, data + at + hole, body);
        for (int i = 0; i < n; i++)
            at += pz_put_varint(data + at, v[i]);
        e->out->len -= hole - need;
        return;
    }
    for (int i = 0; i < n; i++) {
        if (v[i] >> (7 * PAD_WIDTH))
            enc_raise(e, "cannot encode: table or function too large");
        put_padded_varint(data + at + (size_t)i * PAD_WIDTH, v[i], PAD_WIDTH);
    }
}

/* Reserves a hole of n padded varints; returns its offset. */
static size_t put_hole(enc *e, int n)
{
    size_t at = e->out->len;
    enc_room(e, (size_t)n * PAD_WIDTH);
    e->out->len += (size_t)n * PAD_WIDTH;
    return at;
}

/* ------------------------------------------------------------------------
 * References: every table or function met gets the next number
 * --------------------------------------------------------------------- */

static inline int enc_slot(const enc *e, int which)
{
    return e->slots + which;
}

/* Returns the reference number of the object at idx, or -1 if it was not
 * met yet.  The first object is compared directly, so that a value holding
 * one table needs no reference table at all. */
static int ref_find(enc *e, int idx)
{
    lua_State *L = e->L;
    int r;
    if (e->nrefs == 0)
        return -1;
    if (e->nrefs == 1)
        return lua_rawequal(L, idx, enc_slot(e, ES_FIRST)) ? 0 : -1;
    lua_pushvalue(L, idx);
    lua_rawget(L, enc_slot(e, ES_REFS));
    r = lua_isnil(L, -1) ? -1 : (int)lua_tointeger(L, -1);
    lua_pop(L, 1);
    return r;
}

/* Gives the object at idx the next reference number and returns it. */
static int ref_add(enc *e, int idx)
{
    lua_State *L = e->L;
    if (e->nrefs == 0) {
        lua_pushvalue(L, idx);
        lua_replace(L, enc_slot(e, ES_FIRST));
        return e->nrefs++;
    }
    if (e->nrefs == 1) {
        lua_createtable(L, 0, 8);
        lua_pushvalue(L, enc_slot(e, ES_FIRST));
        lua_pushinteger(L, 0);
        lua_rawset(L, -3);
        lua_replace(L, enc_slot(e, ES_REFS));
    }
    lua_pushvalue(L, idx);
    lua_pushinteger(L, e->nrefs);
    lua_rawset(L, enc_slot(e, ES_REFS));
    return e->nrefs++;
}

/* ------------------------------------------------------------------------
 * The module index: objects reachable from package.loaded -> their reference
 * --------------------------------------------------------------------- */

/* Pushes the bytes of a reference: PZ_T_MODULE name, or PZ_T_MEMBER name key
 * when key is not NULL. */
static void push_ref_bytes(lua_State *L, const char *name, size_t n, const char *key, size_t kn)
{
    luaL_Buffer b;
    uint8_t tmp[PZ_VARINT_MAX_BYTES];
    luaL_buffinit(L, &b);
    luaL_addchar(&b, (char)(key ? PZ_T_MEMBER : PZ_T_MODULE));
    luaL_addlstring(&b, (const char *)tmp, pz_put_varint(tmp, n));
    luaL_addlstring(&b, name, n);
    if (key) {
        luaL_addlstring(&b, (const char *)tmp, pz_put_varint(tmp, kn));
        luaL_addlstring(&b, key, kn);
    }
    luaL_pushresult(&b);
}

/* index[value at -1] = bytes at -2 unless already set; pops both. */
static void index_set_new(lua_State *L, int index)
{
    lua_pushvalue(L, -1);
    lua_rawget(L, index);
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        lua_insert(L, -2);
        lua_rawset(L, index);
    } else {
        lua_pop(L, 3);
    }
}

/* Adds the members of the module table at stack index mod (named name)
 * that are functions or tables.  From the globals table only C functions
 * are taken: a user's global would not exist in a fresh state. */
static void index_members(lua_State *L, int index, int mod, const char *name, size_t n)
{
    int only_c;
    lua_pushvalue(L, mod);
    only_c = lua_rawequal(L, -1, LUA_GLOBALSINDEX);
    lua_pop(L, 1);
    lua_pushnil(L);
    while (lua_next(L, mod)) {
        int t = lua_type(L, -1);
        if (lua_type(L, -2) == LUA_TSTRING &&
            (only_c ? lua_iscfunction(L, -1) : (t == LUA_TTABLE || t == LUA_TFUNCTION))) {
            size_t kn;
            const char *k = lua_tolstring(L, -2, &kn);
            push_ref_bytes(L, name, n, k, kn);
            lua_pushvalue(L, -2);
            index_set_new(L, index);
        }
        lua_pop(L, 1);
    }
}

/* Pushes the Lua helper whose source is src, compiling it on first use in
 * this state and keeping it in the registry under key. */
static void push_helper(lua_State *L, const void *key, const char *src, size_t len)
{
    lua_pushlightuserdata(L, (void *)key);
    lua_rawget(L, LUA_REGISTRYINDEX);
    if (!lua_isnil(L, -1))
        return;
    lua_pop(L, 1);
    if (luaL_loadbuffer(L, src, len, "=parallelize.codec"))
        lua_error(L);
    lua_call(L, 0, 1);
    lua_pushlightuserdata(L, (void *)key);
    lua_pushvalue(L, -2);
    lua_rawset(L, LUA_REGISTRYINDEX);
}

/* Tells whether package.loaded still holds what it held when the index was
 * built: called as same(loaded, snapshot, n), the snapshot being a copy of
 * package.loaded taken then and n its size; any module loaded, dropped or
 * replaced since makes it false.  Comparing sizes alone would miss one
 * module dropped and another loaded.  A Lua loop, because every encode that
 * meets a table runs it: each lua_next call hashes its key again to find
 * where it stopped, where the interpreter's iterator keeps its place, which
 * makes the loop several times cheaper. */
static const char same_src[] =
    "local next, rawget = next, rawget\n"
    "return function(loaded, snapshot, n)\n"
    "  for k, v in next, loaded do\n"
    "    if rawget(snapshot, k) ~= v then return false end\n"
    "    n = n - 1\n"
    "  end\n"
    "  return n == 0\n"
    "end\n";

/* True when package.loaded (at stack index loaded) is as the index (at
 * stack index index) saw it: see same_src. */
static int loaded_unchanged(lua_State *L, int loaded, int index)
{
    int same;
    lua_rawgeti(L, index, 1);
    if (!lua_istable(L, -1)) {
        lua_pop(L, 1);
        return 0;
    }
    push_helper(L, &reg_same, same_src, sizeof same_src - 1);
    lua_insert(L, -2);
    lua_pushvalue(L, loaded);
    lua_insert(L, -2);
    lua_rawgeti(L, index, 0);
    lua_call(L, 3, 1);
    same = lua_toboolean(L, -1);
    lua_pop(L, 1);
    return same;
}

/* Pushes a new table with weak keys ("k") or values ("v"). */
static void push_weak_table(lua_State *L, const char *mode, int nhash)
{
    lua_createtable(L, 0, nhash);
    lua_createtable(L, 0, 1);
    lua_pushstring(L, mode);
    lua_setfield(L, -2, "__mode");
    lua_setmetatable(L, -2);
}

/* Builds a new index from package.loaded, stores it in the registry and
 * pushes it.  Module values come first, so an object that is both a module
 * and a member is referred to as the module.  index[1] keeps a copy of
 * package.loaded and index[0] its size, for loaded_unchanged.  Weak keys
 * (and values in the copy): the index must not keep an unloaded module
 * alive. */
static void index_build(lua_State *L)
{
    int index, loaded;
    luaL_checkstack(L, 10, "cannot encode: stack overflow");
    push_weak_table(L, "k", 64);
    index = lua_gettop(L);
    lua_getfield(L, LUA_REGISTRYINDEX, "_LOADED");
    loaded = lua_gettop(L);
    if (lua_istable(L, loaded)) {
        int n = 0;
        push_weak_table(L, "v", 32);
        lua_pushnil(L);
        while (lua_next(L, loaded)) {
            lua_pushvalue(L, -2);
            lua_pushvalue(L, -2);
            lua_rawset(L, -5);
            lua_pop(L, 1);
            n++;
        }
        lua_rawseti(L, index, 1);
        lua_pushinteger(L, n);
        lua_rawseti(L, index, 0);
        lua_pushnil(L);
        while (lua_next(L, loaded)) {
            int t = lua_type(L, -1);
            if (lua_type(L, -2) == LUA_TSTRING && (t == LUA_TTABLE || t == LUA_TFUNCTION)) {
                size_t len;
                const char *name = lua_tolstring(L, -2, &len);
                push_ref_bytes(L, name, len, NULL, 0);
                lua_pushvalue(L, -2);
                index_set_new(L, index);
            }
            lua_pop(L, 1);
        }
        lua_pushnil(L);
        while (lua_next(L, loaded)) {
            if (lua_type(L, -2) == LUA_TSTRING && lua_istable(L, -1)) {
                size_t len;
                const char *name = lua_tolstring(L, -2, &len);
                index_members(L, index, lua_gettop(L), name, len);
            }
            lua_pop(L, 1);
        }
    }
    lua_pop(L, 1);
    lua_pushlightuserdata(L, (void *)&reg_index);
    lua_pushvalue(L, index);
    lua_rawset(L, LUA_REGISTRYINDEX);
}

/* Rebuilds the index into its slot. */
static void index_rebuild(enc *e)
{
    index_build(e->L);
    lua_replace(e->L, enc_slot(e, ES_INDEX));
    e->index_fresh = 1;
}

/* Makes sure the index slot holds an index that knows every module in
 * package.loaded: loads the cached one, and rebuilds it when there is none
 * or, once per top-level encode, when package.loaded changed. */
static void index_ready(enc *e)
{
    lua_State *L = e->L;
    int stale;
    if (!lua_isnil(L, enc_slot(e, ES_INDEX)) && e->index_checked)
        return;
    e->index_checked = 1;
    lua_pushlightuserdata(L, (void *)&reg_index);
    lua_rawget(L, LUA_REGISTRYINDEX);
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        index_rebuild(e);
        return;
    }
    lua_replace(L, enc_slot(e, ES_INDEX));
    if (e->index_fresh)
        return;
    lua_getfield(L, LUA_REGISTRYINDEX, "_LOADED");
    stale = lua_istable(L, -1) && !loaded_unchanged(L, lua_gettop(L), enc_slot(e, ES_INDEX));
    lua_pop(L, 1);
    if (stale)
        index_rebuild(e);
}

/* Reads one name (varint length, bytes) of the reference bytes [*p, end). */
static int ref_name(const uint8_t **p, const uint8_t *end, const char **name, size_t *n)
{
    uint64_t len;
    if (pz_get_varint(p, end, &len) || len > (uint64_t)(end - *p))
        return -1;
    *name = (const char *)*p;
    *n = (size_t)len;
    *p += len;
    return 0;
}

/* True when the reference bytes s[0..n) (see push_ref_bytes) still name the
 * object at idx in package.loaded: the index may be older than a module
 * replaced under the same name, or a member reassigned. */
static int ref_still_names(lua_State *L, const char *s, size_t n, int idx)
{
    const uint8_t *p = (const uint8_t *)s + 1, *end = (const uint8_t *)s + n;
    const char *name, *key = NULL;
    size_t nlen, klen = 0;
    int same;
    if (ref_name(&p, end, &name, &nlen) ||
        ((uint8_t)s[0] == PZ_T_MEMBER && ref_name(&p, end, &key, &klen)))
        return 0;
    lua_getfield(L, LUA_REGISTRYINDEX, "_LOADED");
    if (!lua_istable(L, -1)) {
        lua_pop(L, 1);
        return 0;
    }
    lua_pushlstring(L, name, nlen);
    lua_rawget(L, -2);
    if (key) {
        if (!lua_istable(L, -1)) {
            lua_pop(L, 2);
            return 0;
        }
        lua_pushlstring(L, key, klen);
        lua_rawget(L, -2);
        lua_remove(L, -2);
    }
    same = lua_rawequal(L, -1, idx);
    lua_pop(L, 2);
    return same;
}

/* Looks the object at idx up in the index; when it is there and still
 * named so in package.loaded, writes its reference, gives it a reference
 * number and returns 1; else returns 0.  A stale hit rebuilds the index
 * (once per top-level encode) and looks again. */
static int index_put(enc *e, int idx)
{
    lua_State *L = e->L;
    size_t n;
    const char *s;
    for (;;) {
        lua_pushvalue(L, idx);
        lua_rawget(L, enc_slot(e, ES_INDEX));
        if (lua_type(L, -1) != LUA_TSTRING) {
            lua_pop(L, 1);
            return 0;
        }
        s = lua_tolstring(L, -1, &n);
        if (ref_still_names(L, s, n, idx))
            break;
        lua_pop(L, 1);
        if (e->index_fresh)
            return 0;
        index_rebuild(e);
    }
    put_bytes(e, s, n);
    lua_pop(L, 1);
    ref_add(e, idx);
    return 1;
}

/* ------------------------------------------------------------------------
 * Tables
 * --------------------------------------------------------------------- */

/* Raises unless one more table or function may be opened. */
static void enc_enter(enc *e)
{
    if (e->depth >= PZ_MAX_DEPTH)
        enc_raise(e, "cannot encode: nesting deeper than 1000 levels");
    if (!lua_checkstack(e->L, 8))
        enc_raise(e, "cannot encode: stack overflow");
    e->segs[e->depth].kind = SEG_NONE;
    e->depth++;
}

/* Hands the items of a sequence to the encoder: called as items(t, n, i, j)
 * with n the length of t, it returns t[i], ..., t[j], raw; when i is 1, it
 * first checks that t is a sequence (its keys are 1 .. n and nothing else)
 * and returns nothing when it is not.  lua_next costs the encoder a call
 * and a look at the key for every entry; this loop over the keys and one
 * unpack cost several times less. */
static const char items_src[] =
    "local next, rawget, unpack = next, rawget, unpack\n"
    "return function(t, n, i, j)\n"
    "  if i == 1 then\n"
    "    local c = 0\n"
    "    for _ in next, t do c = c + 1 end\n"
    "    if c ~= n then return end\n"
    "    for k = 1, n do\n"
    "      if rawget(t, k) == nil then return end\n"
    "    end\n"
    "  end\n"
    "  return unpack(t, i, j)\n"
    "end\n";

/* Below this length a table goes through lua_next: the call costs more. */
#define ITEMS_MIN 8
/* Items taken onto the stack by one call. */
#define ITEMS_CHUNK 256
/* Most stack slots enc_items may hold at once, all open tables together.
 * LuaJIT gives a C function 8000 slots; a level of nesting takes about five
 * otherwise, so with this much on top the encoder still reaches 1000
 * levels.  A sequence that would need more goes through lua_next. */
#define ITEMS_BUDGET 2048

/* Writes the n items of the table at t when it is a sequence (see
 * items_src) and returns 1; returns 0, having written nothing, when it is
 * not. */
static int enc_items(enc *e, int t, size_t n, seg *s)
{
    lua_State *L = e->L;
    int held = (int)(n < ITEMS_CHUNK ? n : ITEMS_CHUNK) + 5;
    if (e->items_held + held > ITEMS_BUDGET || !lua_checkstack(L, held + 8))
        return 0;
    e->items_held += held;
    for (size_t i = 1; i <= n; i += ITEMS_CHUNK) {
        size_t j = n - i < ITEMS_CHUNK ? n : i + ITEMS_CHUNK - 1;
        int base = lua_gettop(L);
        push_helper(L, &reg_items, items_src, sizeof items_src - 1);
        lua_pushvalue(L, t);
        lua_pushnumber(L, (lua_Number)n);
        lua_pushnumber(L, (lua_Number)i);
        lua_pushnumber(L, (lua_Number)j);
        lua_call(L, 4, LUA_MULTRET);
        if ((size_t)(lua_gettop(L) - base) != j - i + 1) {
            lua_settop(L, base);
            if (i == 1) {
                e->items_held -= held;
                return 0;
            }
            enc_raise(e, "cannot encode: a table changed while it was encoded");
        }
        s->kind = SEG_ITEM;
        for (size_t k = i; k <= j; k++) {
            s->idx = (int)k;
            enc_value(e, base + 1 + (int)(k - i));
        }
        lua_settop(L, base);
    }
    e->items_held -= held;
    return 1;
}

/* Encodes the entries of the table at t.  A sequence long enough goes
 * through enc_items; anything else takes one lua_next pass: entries keyed
 * 1, 2, 3, ... from the start go to the array part, the rest (keys and
 * values) to the hash part.  The counts are patched in afterwards. */
static void enc_table_body(enc *e, int t, seg *s)
{
    lua_State *L = e->L;
    uint64_t counts[2] = {0, 0};
    size_t at = put_hole(e, 2);
    size_t n = lua_objlen(L, t);
    int key, in_array = 1;
    if (n >= ITEMS_MIN && n <= INT_MAX && enc_items(e, t, n, s)) {
        counts[0] = n;
        patch_varints(e, at, counts, 2);
        return;
    }
    key = lua_gettop(L) + 1;
    s->kind = SEG_VALUE;
    s->idx = key;
    lua_pushnil(L);
    while (lua_next(L, t)) {
        if (in_array) {
            if (lua_type(L, key) == LUA_TNUMBER &&
                lua_tonumber(L, key) == (double)(counts[0] + 1)) {
                counts[0]++;
                enc_value(e, key + 1);
                lua_pop(L, 1);
                continue;
            }
            in_array = 0;
        }
        s->kind = SEG_KEY;
        enc_value(e, key);
        s->kind = SEG_VALUE;
        enc_value(e, key + 1);
        counts[1]++;
        lua_pop(L, 1);
    }
    patch_varints(e, at, counts, 2);
}

/* Writes the table or function at idx as a reference when it was met
 * before in this encode, or as a module reference when the index knows
 * it; returns 1 if it did, 0 when it must be written in full. */
static int enc_known(enc *e, int idx)
{
    int r = ref_find(e, idx);
    if (r >= 0) {
        put_byte(e, PZ_T_REF);
        put_varint(e, (uint64_t)r);
        return 1;
    }
    index_ready(e);
    return index_put(e, idx);
}

/* Encodes the table at t: a reference if met before, a module reference if
 * it is in the index, else its contents, then its metatable if any. */
static void enc_table(enc *e, int t)
{
    lua_State *L = e->L;
    int mt;
    seg *s;
    if (enc_known(e, t))
        return;
    enc_enter(e);
    s = &e->segs[e->depth - 1];
    ref_add(e, t);
    mt = lua_getmetatable(L, t) ? lua_gettop(L) : 0;
    put_byte(e, mt ? PZ_T_TABLE_MT : PZ_T_TABLE);
    enc_table_body(e, t, s);
    if (mt) {
        s->kind = SEG_MT;
        enc_value(e, mt);
        lua_pop(L, 1);
    }
    e->depth--;
}

/* ------------------------------------------------------------------------
 * Functions
 * --------------------------------------------------------------------- */

/* Lists the globals a function reads that a fresh state would not have:
 * called as scan(f, env), returns {name1, value1, name2, value2, ...} for
 * the names read by GGET in f and its nested prototypes that are not
 * standard globals and are non-nil in env.  The GGET opcode is taken from a
 * probe function, so no opcode table is needed. */
static const char scanner_src[] =
    "local std = ...\n"
    "local ok, util = pcall(require, 'jit.util')\n"
    "if not ok then return function() return {} end end\n"
    "local bit = require 'bit'\n"
    "local band, rshift = bit.band, bit.rshift\n"
    "local funcbc, funck, rawget, type = util.funcbc, util.funck, rawget, type\n"
    "local function index(t, k) return t[k] end\n"
    "local function probe() return PZ_PROBE_GLOBAL end\n"
    "local GGET = band(funcbc(probe, 1), 0xff)\n"
    "local function scan(f, names, seen)\n"
    "  for pc = 1, 1e9 do\n"
    "    local ins = funcbc(f, pc)\n"
    "    if not ins then break end\n"
    "    if band(ins, 0xff) == GGET then\n"
    "      local name = funck(f, -1 - rshift(ins, 16))\n"
    "      if not seen[name] then seen[name] = true; names[#names + 1] = name end\n"
    "    end\n"
    "  end\n"
    "  for i = -1, -1e9, -1 do\n"
    "    local k = funck(f, i)\n"
    "    if k == nil then break end\n"
    "    if type(k) == 'proto' then scan(k, names, seen) end\n"
    "  end\n"
    "end\n"
    "return function(f, env)\n"
    "  local names, out = {}, {}\n"
    "  scan(f, names, {})\n"
    "  for i = 1, #names do\n"
    "    local name = names[i]\n"
    "    local v = not std[name] and rawget(env, name)\n"
    "    if v == nil and not std[name] then\n"
    "      local ok, x = pcall(index, env, name)\n"
    "      if ok then v = x end\n"
    "    end\n"
    "    if v ~= nil and not std[name] then\n"
    "      out[#out + 1] = name; out[#out + 1] = v\n"
    "    end\n"
    "  end\n"
    "  return out\n"
    "end\n";

/* The globals of a fresh LuaJIT 2.1 state after luaL_openlibs. */
static const char *const std_globals[] = {
    "_G", "_VERSION", "assert", "bit", "collectgarbage", "coroutine", "debug",
    "dofile", "error", "gcinfo", "getfenv", "getmetatable", "io", "ipairs",
    "jit", "load", "loadfile", "loadstring", "math", "module", "newproxy",
    "next", "os", "package", "pairs", "pcall", "print", "rawequal", "rawget",
    "rawset", "require", "select", "setfenv", "setmetatable", "string",
    "table", "tonumber", "tostring", "type", "unpack", "xpcall"};

/* Pushes the globals scanner, compiling it on first use in this state. */
static void push_scanner(lua_State *L)
{
    lua_pushlightuserdata(L, (void *)&reg_scanner);
    lua_rawget(L, LUA_REGISTRYINDEX);
    if (!lua_isnil(L, -1))
        return;
    lua_pop(L, 1);
    if (luaL_loadbuffer(L, scanner_src, sizeof scanner_src - 1, "=parallelize.codec"))
        lua_error(L);
    lua_createtable(L, 0, 64);
    for (size_t i = 0; i < sizeof std_globals / sizeof *std_globals; i++) {
        lua_pushboolean(L, 1);
        lua_setfield(L, -2, std_globals[i]);
    }
    lua_call(L, 1, 1);
    lua_pushlightuserdata(L, (void *)&reg_scanner);
    lua_pushvalue(L, -2);
    lua_rawset(L, LUA_REGISTRYINDEX);
}

/* lua_dump writer: appends to the output buffer; nonzero stops the dump. */
static int dump_writer(lua_State *L, const void *p, size_t n, void *ud)
{
    (void)L;
    return pz_buf_append((pz_buf *)ud, p, n) != 0;
}

/* Writes the bytecode of the Lua function at f: a varint length, then what
 * lua_dump produces (debug info kept, for tracebacks in workers). */
static void enc_bytecode(enc *e, int f)
{
    size_t at = put_hole(e, 1);
    uint64_t len;
    int rc;
    lua_pushvalue(e->L, f);
    rc = lua_dump(e->L, dump_writer, e->out);
    lua_pop(e->L, 1);
    if (rc)
        enc_oom(e);
    len = e->out->len - (at + PAD_WIDTH);
    patch_varints(e, at, &len, 1);
}

/* Writes the upvalues of the Lua function at f (reference fref): a byte
 * count, then each upvalue as a value, or as PZ_T_UPJOIN when the same
 * upvalue was already written for another function (or this one). */
static void enc_upvalues(enc *e, int f, int fref, seg *s)
{
    lua_State *L = e->L;
    int n = 0;
    while (lua_getupvalue(L, f, n + 1)) {
        lua_pop(L, 1);
        n++;
    }
    put_byte(e, (uint8_t)n);
    for (int i = 1; i <= n; i++) {
        int upvals = enc_slot(e, ES_UPVALS);
        if (lua_isnil(L, upvals)) {
            lua_createtable(L, 0, 8);
            lua_replace(L, upvals);
        }
        lua_pushlightuserdata(L, lua_upvalueid(L, f, i));
        lua_pushvalue(L, -1);
        lua_rawget(L, upvals);
        if (!lua_isnil(L, -1)) {
            lua_Integer where = lua_tointeger(L, -1);
            lua_pop(L, 2);
            put_byte(e, PZ_T_UPJOIN);
            put_varint(e, (uint64_t)(where / 256));
            put_byte(e, (uint8_t)(where % 256));
            continue;
        }
        lua_pop(L, 1);
        lua_pushinteger(L, (lua_Integer)fref * 256 + i);
        lua_rawset(L, upvals);
        s->kind = SEG_UPVALUE;
        s->idx = i;
        s->name = lua_getupvalue(L, f, i);
        enc_value(e, lua_gettop(L));
        lua_pop(L, 1);
    }
}

/* Writes the globals the Lua function at f reads and that a fresh state
 * lacks: a varint count, then (name, value) pairs. */
static void enc_globals(enc *e, int f, seg *s)
{
    lua_State *L = e->L;
    int list, n;
    push_scanner(L);
    lua_pushvalue(L, f);
    lua_getfenv(L, f);
    lua_call(L, 2, 1);
    list = lua_gettop(L);
    n = (int)lua_objlen(L, list) / 2;
    put_varint(e, (uint64_t)n);
    for (int i = 1; i <= n; i++) {
        size_t len;
        const char *name;
        lua_rawgeti(L, list, 2 * i - 1);
        lua_rawgeti(L, list, 2 * i);
        name = lua_tolstring(L, -2, &len);
        put_varint(e, len);
        put_bytes(e, name, len);
        s->kind = SEG_GLOBAL;
        s->idx = lua_gettop(L) - 1;
        enc_value(e, lua_gettop(L));
        lua_pop(L, 2);
    }
    lua_pop(L, 1);
}

/* Encodes the function at f: a reference if met before; a module reference
 * when it is in the index (see index_ready); else a Lua function travels as
 * bytecode, upvalues and globals, and a C function cannot travel. */
static void enc_function(enc *e, int f)
{
    int r;
    seg *s;
    if (enc_known(e, f))
        return;
    if (lua_iscfunction(e->L, f)) {
        /* It can only travel by reference: before giving up, look in an
         * index built now, in case a module gained it as a member since. */
        if (!e->index_fresh) {
            index_rebuild(e);
            if (index_put(e, f))
                return;
        }
        if (e->flags & PZ_ENCODE_LOSSY) {
            enc_string(e, "<C function>", 12);
            return;
        }
        enc_raise(e, "cannot encode a C function (not found in package.loaded)");
    }
    enc_enter(e);
    s = &e->segs[e->depth - 1];
    r = ref_add(e, f);
    put_byte(e, PZ_T_FUNCTION);
    enc_bytecode(e, f);
    enc_upvalues(e, f, r, s);
    enc_globals(e, f, s);
    e->depth--;
}

/* ------------------------------------------------------------------------
 * Values
 * --------------------------------------------------------------------- */

/* Raises "cannot encode a <type>", or in lossy mode writes "<type>". */
static void enc_unsupported(enc *e, const char *type)
{
    char msg[64];
    if (e->flags & PZ_ENCODE_LOSSY) {
        int n = snprintf(msg, sizeof msg, "<%s>", type);
        enc_string(e, msg, (size_t)n);
        return;
    }
    snprintf(msg, sizeof msg, "cannot encode a %s", type);
    enc_raise(e, msg);
}

/* Encodes the value of type `type` at absolute stack index idx that
 * enc_value does not handle itself. */
static __attribute__((noinline)) void enc_other(enc *e, int idx, int type)
{
    lua_State *L = e->L;
    switch (type) {
    case LUA_TNIL:
        put_byte(e, PZ_T_NIL);
        return;
    case LUA_TBOOLEAN:
        put_byte(e, lua_toboolean(L, idx) ? PZ_T_TRUE : PZ_T_FALSE);
        return;
    case LUA_TNUMBER:
    case LUA_TSTRING:
        enc_value(e, idx);
        return;
    case LUA_TTABLE:
        enc_table(e, idx);
        return;
    case LUA_TFUNCTION:
        enc_function(e, idx);
        return;
    case LUA_TLIGHTUSERDATA:
        if (lua_touserdata(L, idx) == NULL) {
            put_byte(e, PZ_T_NULL);
            return;
        }
        enc_unsupported(e, "light userdata");
        return;
    default:
        enc_unsupported(e, luaL_typename(L, idx));
        return;
    }
}

/* Turns a relative stack index into an absolute one. */
static int abs_index(lua_State *L, int idx)
{
    return (idx < 0 && idx > LUA_REGISTRYINDEX) ? lua_gettop(L) + idx + 1 : idx;
}

/* Sets up an encoder on L (reserving its stack slots); enc_done releases
 * them. */
static void enc_start(enc *e, lua_State *L, pz_buf *out, const char *root, int flags)
{
    e->L = L;
    e->out = out;
    e->flags = flags;
    e->nrefs = e->depth = e->index_fresh = e->index_checked = e->tuple_index = 0;
    e->items_held = 0;
    e->root = root;
    e->busy = NULL;
    luaL_checkstack(L, ES_COUNT + 8, "cannot encode: stack overflow");
    e->slots = lua_gettop(L) + 1;
    lua_settop(L, e->slots + ES_COUNT - 1);
}

static void enc_done(enc *e)
{
    lua_settop(e->L, e->slots - 1);
}

/* Encodes one value with an error path rooted at root; busy (may be NULL)
 * is cleared before any error this code raises. */
static void encode_value(lua_State *L, int idx, pz_buf *out, const char *root, int flags, int *busy)
{
    enc e;
    idx = abs_index(L, idx);
    enc_start(&e, L, out, root, flags);
    e.busy = busy;
    enc_value(&e, idx);
    enc_done(&e);
}

/* Appends the value at idx when it is a number, string, boolean or nil,
 * and returns 1; returns 0 for anything else, or when out of memory (the
 * full encoder then reports it), possibly having appended part of it. */
static int enc_scalar(lua_State *L, int idx, pz_buf *out)
{
    size_t n;
    const char *s;
    uint8_t *w;
    switch (lua_type(L, idx)) {
    case LUA_TNUMBER:
        if (!(w = (uint8_t *)pz_buf_reserve(out, PZ_NUMBER_MAX_BYTES)))
            return 0;
        out->len += pz_put_number(w, lua_tonumber(L, idx));
        return 1;
    case LUA_TSTRING:
        s = lua_tolstring(L, idx, &n);
        if (!(w = (uint8_t *)pz_buf_reserve(out, 1 + PZ_VARINT_MAX_BYTES + n)))
            return 0;
        size_t h = pz_put_string_header(w, n);
        memcpy(w + h, s, n);
        out->len += h + n;
        return 1;
    case LUA_TBOOLEAN:
    case LUA_TNIL: {
        uint8_t tag = lua_isnil(L, idx) ? PZ_T_NIL : lua_toboolean(L, idx) ? PZ_T_TRUE : PZ_T_FALSE;
        return pz_buf_append(out, &tag, 1) == 0;
    }
    default:
        return 0;
    }
}

/* Scalars (most arguments and results) are written without setting up the
 * encoder; anything else goes through it, from where the scalars began. */
void pz_encode_value(lua_State *L, int idx, pz_buf *out, const char *root, int flags)
{
    size_t start = out->len;
    if (enc_scalar(L, idx, out))
        return;
    out->len = start;
    encode_value(L, idx, out, root, flags, NULL);
}

void pz_encode_tuple(lua_State *L, int first, int count, pz_buf *out, const char *root, int flags)
{
    enc e;
    size_t start = out->len;
    uint8_t v[PZ_VARINT_MAX_BYTES];
    first = abs_index(L, first);
    if (count >= 0 && pz_buf_append(out, v, pz_put_varint(v, (uint64_t)count)) == 0) {
        int i = 0;
        while (i < count && enc_scalar(L, first + i, out))
            i++;
        if (i == count)
            return;
    }
    out->len = start;
    enc_start(&e, L, out, root, flags);
    put_varint(&e, (uint64_t)(count < 0 ? 0 : count));
    for (int i = 0; i < count; i++) {
        e.tuple_index = i + 1;
        enc_value(&e, first + i);
    }
    enc_done(&e);
}

/* ------------------------------------------------------------------------
 * Decoder
 * --------------------------------------------------------------------- */

/* Stack slots reserved by every top-level decode, relative to dec.slots. */
enum {
    DS_FIRST, /* object with reference 0 */
    DS_REFS,  /* reference number -> object, for numbers 1 and up */
    DS_COUNT
};

typedef struct dec {
    lua_State *L;
    const uint8_t *p, *end;
    const uint8_t *base; /* byte positions in errors count from here */
    int flags;
    int slots;
    int nrefs; /* objects started so far */
    int depth; /* open tables and functions */
} dec;

static void dec_any(dec *d);

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
 * past it: integers, short strings, doubles, nil, booleans, null.  Returns
 * 0, pushing nothing, for anything else, valid or not, which is left to
 * dec_any (it also says what is wrong).  The common values take this path
 * inside tables, and whole calls and results take it before any decoder
 * is set up. */
static inline int dec_scalar(lua_State *L, const uint8_t **pp, const uint8_t *end)
{
    const uint8_t *p = *pp;
    uint64_t v;
    if (p >= end)
        return 0;
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
    } else if (tag == PZ_T_POSINT || tag == PZ_T_NEGINT) {
        if (pz_get_varint(&p, end, &v) != 0 || v > (uint64_t)1 << 53)
            return 0;
        lua_pushnumber(L, tag == PZ_T_NEGINT ? -(double)v : (double)v);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    } else if (tag == PZ_T_DOUBLE && end - p >= 8) {
        double x;
        memcpy(&x, p, sizeof x); /* the wire order is the host's */
        lua_pushnumber(L, x);
        p += 8;
#endif
    } else {
        return 0;
    }
    *pp = p;
    return 1;
}

/* Decodes one value and pushes it.  It runs for every table entry, so it is
 * inline and takes scalars itself; the rest, and every error, go to
 * dec_any. */
static inline void dec_value(dec *d)
{
    if (!dec_scalar(d->L, &d->p, d->end))
        dec_any(d);
}

/* Reads a varint, raising with `what` when it is truncated or too long. */
static uint64_t dec_varint(dec *d, const char *what)
{
    uint64_t v;
    const uint8_t *at = d->p;
    if (pz_get_varint(&d->p, d->end, &v))
        dec_fail(d, at, "bad or truncated %s", what);
    return v;
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

/* Gives the object on top of the stack the next reference number. */
static void dec_ref_add(dec *d)
{
    lua_State *L = d->L;
    if (d->nrefs == 0) {
        lua_pushvalue(L, -1);
        lua_replace(L, d->slots + DS_FIRST);
    } else {
        if (d->nrefs == 1) {
            lua_createtable(L, 8, 0);
            lua_replace(L, d->slots + DS_REFS);
        }
        lua_pushvalue(L, -1);
        lua_rawseti(L, d->slots + DS_REFS, d->nrefs);
    }
    d->nrefs++;
}

/* Pushes the object with reference number r (already checked < nrefs). */
static void dec_ref_push(dec *d, int r)
{
    if (r == 0)
        lua_pushvalue(d->L, d->slots + DS_FIRST);
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

/* Raises unless one more table or function may be opened. */
static void dec_enter(dec *d, const uint8_t *at)
{
    if (d->depth >= PZ_MAX_DEPTH)
        dec_fail(d, at, "nesting deeper than %d levels", PZ_MAX_DEPTH);
    if (!lua_checkstack(d->L, 8))
        dec_fail(d, at, "stack overflow");
    d->depth++;
}

/* Decodes a table after its tag: counts (checked against the bytes left,
 * each value taking at least one byte), the array part, the hash part (no
 * nil or NaN keys), then the metatable if with_mt. */
static void dec_table(dec *d, const uint8_t *at, int with_mt)
{
    lua_State *L = d->L;
    uint64_t narr, nhash;
    int t;
    dec_enter(d, at);
    narr = dec_varint(d, "table size");
    nhash = dec_varint(d, "table size");
    if (narr > dec_left(d) || nhash > dec_left(d) / 2 || narr + 2 * nhash > dec_left(d))
        dec_fail(d, at, "table of %llu + %llu entries does not fit in the %zu bytes left",
                 (unsigned long long)narr, (unsigned long long)nhash, dec_left(d));
    lua_createtable(L, narr > (1 << 24) ? 1 << 24 : (int)narr,
                    nhash > (1 << 24) ? 1 << 24 : (int)nhash);
    t = lua_gettop(L);
    dec_ref_add(d);
    for (uint64_t i = 1; i <= narr; i++) {
        dec_value(d);
        lua_rawseti(L, t, (int)i);
    }
    for (uint64_t i = 0; i < nhash; i++) {
        const uint8_t *kat = d->p;
        dec_value(d);
        if (lua_isnil(L, -1))
            dec_fail(d, kat, "nil table key");
        if (lua_type(L, -1) == LUA_TNUMBER && isnan(lua_tonumber(L, -1)))
            dec_fail(d, kat, "NaN table key");
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
    dec_enter(d, at);
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
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
        memcpy(&x, d->p, sizeof x); /* the wire order is the host's */
#else
        v = 0;
        for (int i = 7; i >= 0; i--)
            v = (v << 8) | d->p[i];
        memcpy(&x, &v, sizeof x);
#endif
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
    case PZ_T_TABLE:
    case PZ_T_TABLE_MT:
        dec_table(d, at, tag == PZ_T_TABLE_MT);
        return;
    case PZ_T_REF:
        dec_ref_push(d, dec_ref_number(d));
        return;
    case PZ_T_MODULE:
    case PZ_T_MEMBER:
        dec_module(d, at, tag == PZ_T_MEMBER);
        return;
    case PZ_T_FUNCTION:
        dec_function(d, at);
        return;
    case PZ_T_UPJOIN:
        dec_fail(d, at, "upvalue join outside a function's upvalues");
    default:
        dec_fail(d, at, "unknown tag 0x%02x", tag);
    }
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

/* Decodes exactly one value in [p, end) and pushes it. */
static void decode_value(lua_State *L, const char *base, const char *p, const char *end, int flags)
{
    dec d;
    dec_start(&d, L, base, p, end, flags);
    dec_value(&d);
    dec_check_end(&d);
    lua_replace(L, d.slots);
    lua_settop(L, d.slots);
}

void pz_decode_value(lua_State *L, const char *p, size_t n, int flags)
{
    const uint8_t *q = (const uint8_t *)p, *end = q + n;
    luaL_checkstack(L, 1, "cannot decode: stack overflow");
    if (dec_scalar(L, &q, end)) {
        if (q == end)
            return;
        lua_pop(L, 1); /* trailing bytes: the full decoder says so */
    }
    decode_value(L, p, p, p + n, flags);
}

/* Pushes the values of a tuple at [p, p+n) when all are scalars (most
 * calls' arguments) and returns how many; returns -1, pushing nothing,
 * otherwise. */
static int decode_scalar_tuple(lua_State *L, const char *p, size_t n)
{
    const uint8_t *q = (const uint8_t *)p, *end = q + n;
    uint64_t count;
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

int pz_decode_tuple(lua_State *L, const char *p, size_t n, int flags)
{
    int scalars = decode_scalar_tuple(L, p, n);
    if (scalars >= 0)
        return scalars;
    dec d;
    uint64_t count;
    const uint8_t *at;
    dec_start(&d, L, p, p, p + n, flags);
    at = d.p;
    count = dec_varint(&d, "value count");
    if (count > dec_left(&d) || count > 1000000 || !lua_checkstack(L, (int)count + 8))
        dec_fail(&d, at, "tuple of %llu values is too large for the %zu bytes left or the stack",
                 (unsigned long long)count, dec_left(&d));
    for (uint64_t i = 0; i < count; i++)
        dec_value(&d);
    dec_check_end(&d);
    lua_remove(L, d.slots);
    lua_remove(L, d.slots);
    return (int)count;
}

/* ------------------------------------------------------------------------
 * Lua-facing functions
 * --------------------------------------------------------------------- */

/* A buffer owned by a full userdata, so that an error raised mid-encode
 * leaks nothing: the GC frees it. */
typedef struct scratch {
    pz_buf buf;
    int busy; /* an encode is using it (a finalizer may re-enter encode) */
} scratch;

static int scratch_gc(lua_State *L)
{
    scratch *s = (scratch *)lua_touserdata(L, 1);
    pz_buf_free(&s->buf);
    return 0;
}

/* Pushes a new scratch userdata. */
static scratch *scratch_new(lua_State *L)
{
    scratch *s = (scratch *)lua_newuserdata(L, sizeof *s);
    s->buf = (pz_buf)PZ_BUF_INIT;
    s->busy = 0;
    lua_pushlightuserdata(L, (void *)&reg_scratch);
    lua_rawget(L, LUA_REGISTRYINDEX);
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        lua_createtable(L, 0, 1);
        lua_pushcfunction(L, scratch_gc);
        lua_setfield(L, -2, "__gc");
        lua_pushlightuserdata(L, (void *)&reg_scratch);
        lua_pushvalue(L, -2);
        lua_rawset(L, LUA_REGISTRYINDEX);
    }
    lua_setmetatable(L, -2);
    return s;
}

/* Reads boolean option `name` of the options table at index idx (absent or
 * nil: no options). */
static int opt_flag(lua_State *L, int idx, const char *name)
{
    int on;
    if (lua_isnoneornil(L, idx))
        return 0;
    luaL_checktype(L, idx, LUA_TTABLE);
    lua_getfield(L, idx, name);
    on = lua_toboolean(L, -1);
    lua_pop(L, 1);
    return on;
}

/* encode(v [, {lossy = true}]) -> string: a format version byte, then v.
 * With lossy, values that cannot travel become strings such as "<thread>"
 * instead of raising.  Encodes into the scratch buffer of upvalue 1; when
 * that is busy (a finalizer called encode during an encode), into a fresh
 * one.  An error not raised by the encoder itself (out of memory inside
 * Lua) can leave the flag set: later calls then use fresh buffers, slower
 * but still correct. */
static int l_encode(lua_State *L)
{
    int flags;
    scratch *s;
    luaL_checkany(L, 1);
    flags = opt_flag(L, 2, "lossy") ? PZ_ENCODE_LOSSY : 0;
    lua_settop(L, 1);
    s = (scratch *)lua_touserdata(L, lua_upvalueindex(1));
    if (s->busy)
        s = scratch_new(L);
    s->buf.len = 0;
    if (pz_buf_append(&s->buf, "\x01", 1))
        return luaL_error(L, "cannot encode: out of memory");
    s->busy = 1;
    if (!enc_scalar(L, 1, &s->buf)) {
        s->buf.len = 1;
        encode_value(L, 1, &s->buf, "value", flags, &s->busy);
    }
    lua_pushlstring(L, s->buf.data, s->buf.len);
    s->busy = 0;
    s->buf.len = 0;
    pz_buf_trim(&s->buf, 1 << 20);
    return 1;
}

/* decode(s [, {functions = true}]) -> v.  Checks the format version byte. */
static int l_decode(lua_State *L)
{
    size_t n;
    const char *s;
    int flags;
    if (lua_type(L, 1) != LUA_TSTRING)
        return luaL_typerror(L, 1, "string");
    flags = opt_flag(L, 2, "functions") ? PZ_DECODE_FUNCTIONS : 0;
    s = lua_tolstring(L, 1, &n);
    if (n == 0)
        return luaL_error(L, "cannot decode: empty input (no format version byte)");
    if ((uint8_t)s[0] != PZ_FORMAT_VERSION)
        return luaL_error(L, "cannot decode: unknown format version %d at byte 1 (expected %d)",
                          (int)(uint8_t)s[0], PZ_FORMAT_VERSION);
    decode_value(L, s, s + 1, s + n, flags);
    return 1;
}

void pz_codec_register(lua_State *L)
{
    /* The helpers take next, rawget and unpack from the globals when they
     * are compiled: now, before a script can have replaced them. */
    push_helper(L, &reg_same, same_src, sizeof same_src - 1);
    push_helper(L, &reg_items, items_src, sizeof items_src - 1);
    lua_pop(L, 2);
    scratch_new(L);
    lua_pushcclosure(L, l_encode, 1);
    lua_setfield(L, -2, "encode");
    lua_pushcfunction(L, l_decode);
    lua_setfield(L, -2, "decode");
    lua_pushlightuserdata(L, NULL);
    lua_setfield(L, -2, "null");
}
