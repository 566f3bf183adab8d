/*
 * codec_enc.c - the encoder: Lua values to bytes (codec_format.h).
 *
 * Encoding is one recursive walk over the value with the raw Lua C API.
 * Reference numbers are kept in C, by object address: a short list, then
 * an open-addressing hash table; the objects numbered stay anchored in
 * stack slots the walk reserves at the start (codec_enc.h), past the first
 * few in a Lua table.  The other slots hold the upvalue table (upvalue id ->
 * function and index) and the module index.  All of these are made only
 * when needed, so encoding a string or a small table allocates nothing but
 * its output.  A plain table that is the encode's last value is first
 * offered to the direct walk (codec_direct.c), which reads LuaJIT's objects
 * instead of calling the C API and gives the table back when it holds
 * something only this walk writes.  Tables of eight or more items are
 * surveyed by codec_array.c, which gathers the numbers of a sequence of
 * numbers as doubles: the table is then written from them, as packed
 * doubles or one number at a time (enc_survey); functions are written by
 * codec_func.c, module references by codec_index.c, error paths by
 * codec_path.c.
 */
#include <lauxlib.h>
#include <lua.h>
#include <limits.h>
#include <stdint.h>
#include <string.h>

#include "codec_array.h"
#include "codec_enc.h"
#include "codec_layout.h"

/* Bodies up to this size are moved to shrink padded counts to minimal
 * varints; beyond it the padding costs less than the move.  Bounding the
 * move keeps encoding linear however deep the nesting is. */
#define COMPACT_MAX 1024

static void enc_other(enc *e, int idx, int type);

/* ------------------------------------------------------------------------
 * Output
 * --------------------------------------------------------------------- */

static inline void enc_number(enc *e, double d)
{
    e->out->len += pz_put_number(enc_room(e, PZ_NUMBER_MAX_BYTES), d);
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

/* Fills the hole of n * PZ_ENC_PAD_WIDTH bytes left at offset `at` with the
 * varints v[0..n).  When the bytes written after the hole are few, they are
 * moved back so the varints take their minimal size. */
void pz_enc_patch(enc *e, size_t at, const uint64_t *v, int n)
{
    uint8_t *data = (uint8_t *)e->out->data;
    size_t hole = (size_t)n * PZ_ENC_PAD_WIDTH, need = 0;
    size_t body = e->out->len - (at + hole);
    for (int i = 0; i < n; i++)
        need += pz_varint_len(v[i]);
    if (need < hole && body <= COMPACT_MAX) {
        memmove(data + at + need, data + at + hole, body);
        for (int i = 0; i < n; i++)
            at += pz_put_varint(data + at, v[i]);
        e->out->len -= hole - need;
        return;
    }
    for (int i = 0; i < n; i++) {
        if (v[i] >> (7 * PZ_ENC_PAD_WIDTH))
            pz_enc_raise(e, "cannot encode: table or function too large");
        put_padded_varint(data + at + (size_t)i * PZ_ENC_PAD_WIDTH, v[i], PZ_ENC_PAD_WIDTH);
    }
}

/* Reserves a hole of n padded varints; returns its offset. */
size_t pz_enc_hole(enc *e, int n)
{
    size_t at = e->out->len;
    enc_room(e, (size_t)n * PZ_ENC_PAD_WIDTH);
    e->out->len += (size_t)n * PZ_ENC_PAD_WIDTH;
    return at;
}

/* ------------------------------------------------------------------------
 * References: every table or function met gets the next number
 * --------------------------------------------------------------------- */

/* The slot of obj in the hash table (pz_ref_slot). */
static inline ref_slot *ref_slot_of(const enc *e, const void *obj)
{
    return pz_ref_slot(e->refs, e->refs_mask, obj);
}

/* Returns the reference number of obj, or -1 if it was not met yet (since
 * ref_base; codec_enc.h).  An object met again after ref_base moved gets a new number,
 * which replaces the old one in the hash table; in the list, the search
 * starts at ref_base. */
int pz_ref_find(const enc *e, const void *obj)
{
    if (e->nrefs <= REFS_LINEAR) {
        for (int i = e->ref_base; i < e->nrefs; i++)
            if (e->refs_list[i] == obj)
                return i;
        return -1;
    }
    const ref_slot *s = ref_slot_of(e, obj);
    return s->obj && s->num >= e->ref_base ? s->num : -1;
}

int pz_ref_forgotten(const enc *e, int num)
{
    return num < e->ref_base;
}

/* With PZ_ENCODE_APART, called before each item of the tuple's first
 * value: what earlier items met is forgotten. */
static inline void apart(enc *e)
{
    if ((e->flags & PZ_ENCODE_APART) && e->depth == 1 && e->tuple_index == 1)
        e->ref_base = e->nrefs;
}

/* Moves the reference numbers into a hash table of `slots` slots (a power
 * of two, at least twice the numbers given): the inline one, or a userdata
 * kept in ES_REFMEM, so that an error raised later frees it. */
static void ref_rehash(enc *e, size_t slots)
{
    ref_slot *old = e->refs, *fresh;
    size_t old_slots = old ? e->refs_mask + 1 : 0;
    if (slots <= REFS_INLINE) {
        fresh = e->refs_inline;
    } else {
        if (slots > SIZE_MAX / sizeof *fresh)
            pz_enc_raise(e, "cannot encode: out of memory");
        fresh = (ref_slot *)lua_newuserdata(e->L, slots * sizeof *fresh);
        lua_replace(e->L, enc_slot(e, ES_REFMEM)); /* the old one may go */
    }
    memset(fresh, 0, slots * sizeof *fresh);
    e->refs = fresh;
    e->refs_mask = slots - 1;
    if (!old) {
        for (int i = 0; i < REFS_LINEAR; i++)
            *ref_slot_of(e, e->refs_list[i]) = (ref_slot){e->refs_list[i], i};
        return;
    }
    /* The old table is still readable: a userdata replaced above is only
     * collected at a later allocation, and the inline one is never freed. */
    for (size_t i = 0; i < old_slots; i++)
        if (old[i].obj)
            *ref_slot_of(e, old[i].obj) = old[i];
}

/* Keeps the object at idx, numbered r, alive until the encode ends. */
static void ref_anchor(enc *e, int idx, int r)
{
    lua_State *L = e->L;
    if (r < ES_ANCHOR_SLOTS) {
        lua_pushvalue(L, idx);
        lua_replace(L, enc_slot(e, ES_ANCHOR0 + r));
        return;
    }
    if (r == ES_ANCHOR_SLOTS) {
        lua_createtable(L, 64, 0);
        lua_replace(L, enc_slot(e, ES_ANCHORS));
    }
    lua_pushvalue(L, idx);
    lua_rawseti(L, enc_slot(e, ES_ANCHORS), r);
}

/* Gives the object at idx, whose address is obj, the next reference
 * number and returns it. */
int pz_ref_add(enc *e, int idx, const void *obj)
{
    int r = e->nrefs;
    if (r == INT_MAX)
        pz_enc_raise(e, "cannot encode: too many tables and functions");
    ref_anchor(e, idx, r);
    if (r < REFS_LINEAR) {
        e->refs_list[r] = obj;
    } else {
        if (r == REFS_LINEAR)
            ref_rehash(e, REFS_INLINE);
        else if ((size_t)r >= (e->refs_mask + 1) / 2)
            ref_rehash(e, 2 * (e->refs_mask + 1));
        *ref_slot_of(e, obj) = (ref_slot){obj, r};
    }
    e->nrefs = r + 1;
    return r;
}

/* ------------------------------------------------------------------------
 * Tables
 * --------------------------------------------------------------------- */

/* Raises unless one more table or function may be opened. */
void pz_enc_enter(enc *e)
{
    if (e->depth >= PZ_MAX_DEPTH)
        pz_enc_raise(e, "cannot encode: nesting deeper than 1000 levels");
    if (!lua_checkstack(e->L, 8))
        pz_enc_raise(e, "cannot encode: stack overflow");
    e->segs[e->depth].kind = SEG_NONE;
    e->depth++;
}

/* Below this length a table goes through lua_next: surveying it costs more. */
#define ITEMS_MIN 8
/* Below this length an array of numbers is not packed: the call costs more. */
#define PACK_MIN 16
/* Items taken onto the stack by one call. */
#define ITEMS_CHUNK 256
/* Most stack slots enc_items may hold at once, all open tables together.
 * LuaJIT gives a C function 8000 slots; a level of nesting takes about five
 * otherwise, so with this much on top the encoder still reaches 1000
 * levels.  A sequence that would need more goes through lua_next. */
#define ITEMS_BUDGET 2048

/* Surveys the table at t, of length n (codec_array.h), and writes it when
 * it is a sequence of numbers without metatable: as packed doubles when
 * that is worth it (long enough, and integral values at most half of them,
 * since the integer tags write a small integer in one to three bytes),
 * else as a table of numbers, each read back from the double the survey
 * wrote, which costs a few nanoseconds against the C API's several calls
 * per value.  Returns what the survey found, PZ_SURVEY_PACKED when the
 * table was written (in either form).
 *
 * The survey writes its doubles `gap` bytes into the room.  For the table
 * form they must be far enough that the table written from the room's
 * start never overtakes them: item k (from 0) ends at most
 * head + 1 + 9 (k + 1) (a number takes at most 9 bytes, pz_put_number),
 * and the doubles still to read start at gap + 8 (k + 1); with
 * gap = far = head + 1 + n the first is never past the second.  For
 * packed doubles they belong right after the header (gap = head).  The
 * survey is told the place its first value suggests, and the doubles are
 * moved when that was wrong. */
static int enc_survey(enc *e, int t, size_t n, int has_mt)
{
    lua_State *L = e->L;
    uint8_t *w = NULL;
    size_t head = 0, gap = 0, far = 0;
    double fractional = 0;
    int verdict;
    if (!has_mt && n <= (SIZE_MAX - 2 - 2 * PZ_VARINT_MAX_BYTES) / 9) {
        lua_rawgeti(L, t, 1);
        if (lua_type(L, -1) == LUA_TNUMBER) {
            double first = lua_tonumber(L, -1);
            head = 1 + pz_varint_len(n);
            far = head + 1 + n;
            gap = n >= PACK_MIN && first != floor(first) ? head : far;
            w = enc_room(e, far + 8 * n);
        }
        lua_pop(L, 1);
    }
    verdict = pz_survey(L, t, n, w ? w + gap : NULL, &fractional);
    if (verdict != PZ_SURVEY_PACKED)
        return verdict;
    if (n >= PACK_MIN && !(2 * fractional < (double)n)) { /* NaN: not finite, packed */
        w[0] = PZ_T_DOUBLES;
        pz_put_varint(w + 1, n);
        if (gap != head)
            memmove(w + head, w + gap, 8 * n);
        e->out->len += head + 8 * n;
        return PZ_SURVEY_PACKED;
    }
    if (gap != far) {
        memmove(w + far, w + gap, 8 * n);
        gap = far;
    }
    w[0] = PZ_T_TABLE;
    pz_put_varint(w + 1, n);
    w[head] = 0; /* no hash part */
    size_t pos = head + 1;
    for (size_t k = 0; k < n; k++) {
        double x;
        memcpy(&x, w + gap + 8 * k, sizeof x); /* the host's order, as the survey wrote */
        pos += pz_put_number(w + pos, x);
    }
    e->out->len += pos;
    return PZ_SURVEY_PACKED;
}

/* Writes the counts and the n items of the sequence at t and returns 1;
 * returns 0, having written nothing, when holding its items on the stack
 * would take too much of it. */
static int enc_items(enc *e, int t, size_t n, seg *s)
{
    lua_State *L = e->L;
    int held = (int)(n < ITEMS_CHUNK ? n : ITEMS_CHUNK) + 5;
    if (e->items_held + held > ITEMS_BUDGET || !lua_checkstack(L, held + 8))
        return 0;
    e->items_held += held;
    put_varint(e, n);
    put_byte(e, 0);
    s->kind = SEG_ITEM;
    for (size_t i = 1; i <= n; i += ITEMS_CHUNK) {
        size_t j = n - i < ITEMS_CHUNK ? n : i + ITEMS_CHUNK - 1;
        int base = lua_gettop(L);
        pz_push_items(L, t, i, j);
        for (size_t k = i; k <= j; k++) {
            s->idx = (int)k;
            apart(e);
            enc_value(e, base + 1 + (int)(k - i));
        }
        lua_settop(L, base);
    }
    e->items_held -= held;
    return 1;
}

/* Writes the counts and the entries of the table at t in one lua_next
 * pass: entries keyed 1, 2, 3, ... from the start go to the array part,
 * the rest (keys and values) to the hash part.  The counts are patched in
 * afterwards. */
static void enc_pairs(enc *e, int t, seg *s)
{
    lua_State *L = e->L;
    uint64_t counts[2] = {0, 0};
    size_t at = pz_enc_hole(e, 2);
    int key = lua_gettop(L) + 1, in_array = 1;
    s->kind = SEG_VALUE;
    s->idx = key;
    lua_pushnil(L);
    while (lua_next(L, t)) {
        if (in_array) {
            if (lua_type(L, key) == LUA_TNUMBER &&
                lua_tonumber(L, key) == (double)(counts[0] + 1)) {
                counts[0]++;
                apart(e);
                enc_value(e, key + 1);
                lua_pop(L, 1);
                continue;
            }
            in_array = 0;
        }
        s->kind = SEG_KEY;
        apart(e);
        enc_value(e, key);
        s->kind = SEG_VALUE;
        enc_value(e, key + 1);
        counts[1]++;
        lua_pop(L, 1);
    }
    pz_enc_patch(e, at, counts, 2);
}

/* Writes the table or function at idx as a reference when it was met
 * before in this encode, or as a module reference when the index knows
 * it; returns 1 if it did, 0 when it must be written in full. */
int pz_enc_known(enc *e, int idx, const void *obj)
{
    int r = pz_ref_find(e, obj);
    if (r >= 0) {
        put_byte(e, PZ_T_REF);
        put_varint(e, (uint64_t)r);
        return 1;
    }
    pz_index_ready(e);
    return pz_index_put(e, idx, obj);
}

/* Encodes the table at t: a reference if met before, a module reference if
 * it is in the index, packed doubles if it is an array of numbers, else its
 * contents (a sequence long enough through enc_items, anything else through
 * enc_pairs), then its metatable if any. */
static void enc_table(enc *e, int t)
{
    lua_State *L = e->L;
    int mt, survey = PZ_SURVEY_OTHER;
    size_t n;
    seg *s;
    const void *obj;
    if (e->direct && e->depth == 0) {
        pz_index_ready(e); /* may run Lua: before the walk */
        if (pz_enc_direct(e, t))
            return;
    }
    obj = lua_topointer(L, t);
    if (pz_enc_known(e, t, obj))
        return;
    pz_enc_enter(e);
    s = &e->segs[e->depth - 1];
    pz_ref_add(e, t, obj);
    mt = lua_getmetatable(L, t) ? lua_gettop(L) : 0;
    n = lua_objlen(L, t);
    if (n >= ITEMS_MIN && n <= INT_MAX)
        survey = enc_survey(e, t, n, mt);
    if (survey != PZ_SURVEY_PACKED) {
        put_byte(e, mt ? PZ_T_TABLE_MT : PZ_T_TABLE);
        if (survey != PZ_SURVEY_SEQUENCE || !enc_items(e, t, n, s))
            enc_pairs(e, t, s);
    }
    if (mt) {
        s->kind = SEG_MT;
        enc_value(e, mt);
        lua_pop(L, 1);
    }
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
    pz_enc_raise(e, msg);
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
        pz_enc_function(e, idx);
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

void pz_enc_value(enc *e, int idx)
{
    enc_value(e, idx);
}

/* Turns a relative stack index into an absolute one. */
static int abs_index(lua_State *L, int idx)
{
    return (idx < 0 && idx > LUA_REGISTRYINDEX) ? lua_gettop(L) + idx + 1 : idx;
}

/* Sets up an encoder on L without its stack slots (enc_start reserves
 * them). */
static void enc_init(enc *e, lua_State *L, pz_buf *out, const char *root, int flags)
{
    e->L = L;
    e->out = out;
    e->flags = flags;
    e->nrefs = e->ref_base = e->depth = e->index_fresh = e->index_checked = e->tuple_index = 0;
    e->index_deferred = 0;
    e->items_held = e->direct = 0;
    e->refs = NULL;
    e->refs_mask = 0;
    e->index_filter = NULL;
    e->root = root;
    e->busy = NULL;
    e->arena = NULL;
    e->slots = 0;
}

/* Reserves the encoder's stack slots; enc_done releases them. */
static void enc_start(enc *e)
{
    lua_State *L = e->L;
    luaL_checkstack(L, ES_COUNT + 8, "cannot encode: stack overflow");
    e->slots = lua_gettop(L) + 1;
    lua_settop(L, e->slots + ES_COUNT - 1);
}

/* Writes the table at idx, the encode's last value, by the direct walk
 * before the stack slots are set up, when the module index is known
 * current without running Lua; returns 0, e as it was, when it did not.
 * is_table: the caller knows the value is a table (one call fewer). */
static int direct_first(enc *e, int idx, int is_table)
{
    /* The walk takes no stack slot, but a value is written only when the
     * C API path could have: the decoder needs about as much room as it,
     * and a tuple that leaves too little must fail here as there. */
    if ((!is_table && lua_type(e->L, idx) != LUA_TTABLE) || !lua_checkstack(e->L, ES_COUNT + 8) ||
        !pz_index_quick(e))
        return 0;
    if (pz_enc_direct(e, idx))
        return 1;
    e->index_filter = NULL; /* enc_table makes the index ready, anchored */
    return 0;
}

static void enc_done(enc *e)
{
    lua_settop(e->L, e->slots - 1);
}

/* Encodes one value with an error path rooted at root; busy (may be NULL)
 * is cleared before any error this code raises. */
static void encode_value(lua_State *L, int idx, pz_buf *out, const char *root, int flags, int *busy,
                         int is_table)
{
    enc e;
    idx = abs_index(L, idx);
    enc_init(&e, L, out, root, flags);
    e.busy = busy;
    e.direct = 1;
    if (direct_first(&e, idx, is_table))
        return;
    enc_start(&e);
    enc_value(&e, idx);
    enc_done(&e);
}

int pz_encode_shared(pz_arena_writer *arena, pz_buf *out, const char *s, size_t n)
{
    uint8_t *w = (uint8_t *)pz_buf_reserve(out, 1 + 2 * PZ_VARINT_MAX_BYTES);
    if (!w)
        return -1;
    uint64_t offset;
    char *dst = arena->place(arena, n, &offset);
    if (!dst)
        return 0;
    memcpy(dst, s, n);
    arena->placed += n;
    w[0] = PZ_T_SHARED;
    size_t h = 1 + pz_put_varint(w + 1, offset);
    out->len += h + pz_put_varint(w + h, n);
    return 1;
}

/* See codec.h: without the encoder's set-up, nothing to raise. */
int pz_encode_scalar(lua_State *L, int idx, pz_buf *out, pz_arena_writer *arena)
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
        if (n >= PZ_SHARED_MIN && arena) {
            int placed = pz_encode_shared(arena, out, s, n);
            if (placed != 0)
                return placed > 0;
        }
        if (!(w = (uint8_t *)pz_buf_reserve(out, 1 + PZ_VARINT_MAX_BYTES + n)))
            return 0;
        out->len += pz_put_string(w, s, n);
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
void pz_encode_value_marked(lua_State *L, int idx, pz_buf *out, const char *root, int flags,
                            int *busy, int is_table)
{
    encode_value(L, idx, out, root, flags, busy, is_table);
}

void pz_encode_value(lua_State *L, int idx, pz_buf *out, const char *root, int flags)
{
    size_t start = out->len;
    if (pz_encode_scalar(L, idx, out, NULL))
        return;
    out->len = start;
    encode_value(L, idx, out, root, flags, NULL, 0);
}

/* True when the value at idx is nil, a boolean, a number or a string:
 * written without running Lua. */
static int plain_scalar(lua_State *L, int idx)
{
    int type = lua_type(L, idx);
    return type == LUA_TNIL || type == LUA_TBOOLEAN || type == LUA_TNUMBER ||
           type == LUA_TSTRING;
}

void pz_encode_tuple(lua_State *L, int first, int count, pz_buf *out, const char *root, int flags,
                     pz_arena_writer *arena)
{
    enc e;
    uint8_t v[PZ_VARINT_MAX_BYTES];
    size_t start = out->len, at = start;
    int i = 0;
    uint8_t *w;
    /* One number, the commonest tuple (a tiny call's result), written
     * straight: a count of 1, then the number (decode_scalar_tuple reads
     * it so). */
    if (count == 1 && lua_type(L, first) == LUA_TNUMBER &&
        (w = (uint8_t *)pz_buf_reserve(out, PZ_NUMBER_TUPLE_MAX_BYTES))) {
        out->len += pz_put_number_tuple(w, lua_tonumber(L, first));
        return;
    }
    if (count < 0)
        count = 0;
    first = abs_index(L, first);
    int counted = pz_buf_append(out, v, pz_put_varint(v, (uint64_t)count)) == 0;
    if (counted) {
        for (at = out->len; i < count && pz_encode_scalar(L, first + i, out, arena); at = out->len)
            i++;
        if (i == count)
            return;
    }
    /* The full encoder goes on from the item the scalars stopped at (what
     * pz_encode_scalar appended of it is dropped): it writes a scalar's
     * bytes as they do and gives it no reference number, so the scalars
     * before it are neither written nor placed in the arena twice. */
    out->len = counted ? at : start;
    enc_init(&e, L, out, root, flags);
    e.arena = arena;
    /* Tables from `last` on may take the direct walk: nothing after them
     * runs Lua (codec_direct.c's rule). */
    int last = count;
    while (last > i && plain_scalar(L, first + last - 1))
        last--;
    last = last > i ? last - 1 : i;
    if (counted && i == last) {
        e.tuple_index = i + 1;
        e.direct = 1;
        int walked = direct_first(&e, first + i, 0);
        if (!e.direct)
            last++; /* the walk gave that table back: not again */
        if (walked) {
            for (at = out->len, i++; i < count && pz_encode_scalar(L, first + i, out, arena);
                 at = out->len)
                i++;
            if (i == count)
                return;
            out->len = at; /* out of memory: the encoder raises it */
        }
    }
    enc_start(&e);
    if (!counted)
        put_varint(&e, (uint64_t)count);
    for (; i < count; i++) {
        e.tuple_index = i + 1;
        e.direct = i >= last;
        enc_value(&e, first + i);
    }
    enc_done(&e);
}

void pz_codec_prepare(lua_State *L)
{
    pz_layout_probe(L);
    pz_index_prepare(L);
    pz_array_prepare(L);
}
