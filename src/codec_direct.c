/*
 * codec_direct.c - the direct walk: a table and everything in it written
 * by reading LuaJIT's objects directly (codec_layout.h) instead of through
 * the Lua C API, which costs tens of nanoseconds a table entry (lua_next
 * finds its place again from the previous key, then lua_type, lua_tolstring
 * and the pops each look the slot up) where reading the entry is a few
 * loads.  A small record was written 8x slower than string.buffer's
 * serializer, which reads the objects directly too.  What is left beside
 * reading is kept off the path of each entry and each table: the loops
 * over a table's entries keep the output's end in registers (cursor), a
 * record's entries are counted as they are written (put_record), and a
 * table met for the first time is told so by a mask of 64 bits before
 * the search of the tables numbered so far (seen_bit).
 *
 * The walk writes what it knows: tables without metatable, numbers,
 * strings and booleans, under keys of those kinds.  At anything else (a
 * function, a userdata, a metatable, a table the module index may know, a
 * nesting deeper than DIRECT_MAX_DEPTH, a string bound for a pool's shared
 * memory, or out of memory) it gives up: the
 * output is cut back to where the walk began, its reference numbers are
 * forgotten, and the caller writes the table through the C API
 * (codec_enc.c), which knows every case; a walk that gave up is not tried
 * again in the same encode, so a value costs at most one wasted walk.
 *
 * Rules this file owns:
 * - The walk runs only for the last value of an encode, or one that only
 *   nil, booleans, numbers and strings follow, from the top (enc.direct,
 *   set by codec_enc.c), after the module index is current.  It runs no
 *   Lua and allocates nothing from the Lua state, so no collection step,
 *   and no finalizer, runs while it reads; the tables it numbers are not
 *   anchored (codec_enc.h), since nothing runs between their numbering and
 *   the end of the encode.
 * - Its output decodes to what the C API's would: tables numbered in the
 *   same order (before their contents), the same entries in lua_next's
 *   order (the array slots, then the hash nodes), keys 1, 2, 3 ... from
 *   the start in the array count, sequences of ITEMS_MIN or more in key
 *   order, packed doubles by enc_survey's rule: the same bytes, but where
 *   the C API path keeps a count padded (a body over COMPACT_MAX bytes),
 *   and with the JIT off, where that path never packs (codec_array.c: its
 *   FFI helpers would be slow) and the walk, which copies the doubles in
 *   C, still does.
 * - PZ_ENCODE_APART is honoured as codec_enc.c does: before each entry of
 *   the tuple's first table, the numbers given so far are forgotten.
 */
#include <lua.h>
#include <float.h>
#include <limits.h>
#include <math.h>
#include <stdlib.h>

#include "codec_enc.h"
#include "codec_layout.h"
#include "shortcopy.h"

/* Deeper values go through the C API (which goes to PZ_MAX_DEPTH): this
 * bounds the walk's own C stack. */
#define DIRECT_MAX_DEPTH 100
/* From this length a sequence partly in the hash part is written in key
 * order, below it in lua_next's (as codec_enc.c). */
#define DIRECT_ITEMS_MIN 8
/* Values of such a sequence gathered on the C stack, beyond on the heap. */
#define DIRECT_GATHER_INLINE 64
/* Below this length a sequence of numbers is not packed (as codec_enc.c). */
#define DIRECT_PACK_MIN 16
/* Tables the walk numbers in a list searched in order, before a hash
 * table on the heap is worth making. */
#define DIRECT_REFS_LINEAR 16

typedef struct direct {
    enc *e;
    pz_buf *out;
    int nrefs;       /* the next reference number */
    int depth;       /* tables open in this walk */
    int apart;       /* PZ_ENCODE_APART applies to this tuple's first value */
    int before;      /* tables were numbered before the walk */
    int count;       /* tables this walk numbered */
    uint64_t seen;   /* bit seen_bit(t) of every table t numbered */
    size_t mask;     /* past the list: refs has mask + 1 slots */
    ref_slot *refs;  /* NULL while the list holds them all */
    ref_slot list[DIRECT_REFS_LINEAR];
} direct;

/* ------------------------------------------------------------------------
 * The walk's reference numbers
 * --------------------------------------------------------------------- */

/* One bit of 64 for table t (Fibonacci hashing, as pz_ref_slot): most
 * tables a walk meets are new, and a bit of `seen` not set tells so at
 * once, where the list's search would compare with every table so far, a
 * loop whose length changes from table to table. */
static inline unsigned seen_bit(const void *t)
{
    return (unsigned)(((uint64_t)(uintptr_t)t * UINT64_C(0x9e3779b97f4a7c15)) >> 58);
}

/* Where table t's number is kept by this walk, or NULL. */
static ref_slot *ref_entry(direct *d, const void *t)
{
    if (!(d->seen >> seen_bit(t) & 1))
        return NULL;
    if (!d->refs) {
        for (int i = 0; i < d->count; i++)
            if (d->list[i].obj == t)
                return &d->list[i];
        return NULL;
    }
    ref_slot *s = pz_ref_slot(d->refs, d->mask, t);
    return s->obj ? s : NULL;
}

/* The number of table t: given by this walk, or before it; -1 if none
 * (or forgotten, PZ_ENCODE_APART: *entry then says where it was). */
static int ref_of(direct *d, const void *t, ref_slot **entry)
{
    ref_slot *s = *entry = ref_entry(d, t);
    if (s)
        return s->num >= d->e->ref_base ? s->num : -1;
    return d->before ? pz_ref_find(d->e, t) : -1;
}

/* Moves the numbers into a hash table of `slots` slots (a power of two,
 * more than twice their count); -1 when out of memory. */
static int ref_grow(direct *d, size_t slots)
{
    ref_slot *fresh = calloc(slots, sizeof *fresh);
    if (!fresh)
        return -1;
    if (!d->refs) {
        for (int i = 0; i < d->count; i++)
            *pz_ref_slot(fresh, slots - 1, d->list[i].obj) = d->list[i];
    } else {
        for (size_t i = 0; i <= d->mask; i++)
            if (d->refs[i].obj)
                *pz_ref_slot(fresh, slots - 1, d->refs[i].obj) = d->refs[i];
        free(d->refs);
    }
    d->refs = fresh;
    d->mask = slots - 1;
    return 0;
}

/* Numbers table t: at its forgotten entry when ref_of gave one, else in
 * a new one; -1 when out of memory. */
static int ref_add(direct *d, const void *t, ref_slot *forgotten)
{
    ref_slot *s;
    if (d->nrefs == INT_MAX)
        return -1;
    if (forgotten) {
        forgotten->num = d->nrefs++;
        return 0;
    }
    if (!d->refs && d->count == DIRECT_REFS_LINEAR && ref_grow(d, 4 * DIRECT_REFS_LINEAR))
        return -1;
    if (d->refs && (size_t)(d->count + 1) * 2 > d->mask + 1 && ref_grow(d, 2 * (d->mask + 1)))
        return -1;
    s = d->refs ? pz_ref_slot(d->refs, d->mask, t) : &d->list[d->count];
    *s = (ref_slot){t, d->nrefs++};
    d->count++;
    d->seen |= UINT64_C(1) << seen_bit(t);
    return 0;
}

/* ------------------------------------------------------------------------
 * Output (never raises: out of memory gives up)
 * --------------------------------------------------------------------- */

static inline uint8_t *room(direct *d, size_t n)
{
    return (uint8_t *)pz_buf_reserve(d->out, n);
}

/* Where the loops over a table's entries write: the end of the output and
 * of its room, kept in locals (registers) while they write small keys and
 * values, and given back to the buffer before anything else writes to it.
 * Written through d->out, every byte stored would make the compiler load
 * the buffer's fields again (a byte store may alias anything), a chain of
 * loads and stores each entry waits on.  The buffer always has room when
 * one is taken (pz_enc_direct reserves some first), so its data is never
 * NULL here. */
typedef struct cursor {
    uint8_t *w;   /* where the next byte goes */
    uint8_t *end; /* the end of the room */
} cursor;

static inline cursor cursor_take(const direct *d)
{
    uint8_t *data = (uint8_t *)d->out->data;
    return (cursor){data + d->out->len, data + d->out->cap};
}

static inline void cursor_give(direct *d, cursor c)
{
    d->out->len = (size_t)(c.w - (uint8_t *)d->out->data);
}

/* Makes room for n bytes at c, growing the buffer (which may move it);
 * -1 when out of memory. */
static inline int cursor_room(direct *d, cursor *c, size_t n)
{
    if ((size_t)(c->end - c->w) >= n)
        return 0;
    cursor_give(d, *c);
    if (!room(d, n))
        return -1;
    *c = cursor_take(d);
    return 0;
}

/* A reference to table number r. */
static inline int put_ref(direct *d, int r)
{
    uint8_t *w = room(d, 1 + PZ_VARINT_MAX_BYTES);
    if (!w)
        return -1;
    w[0] = PZ_T_REF;
    d->out->len += 1 + pz_put_varint(w + 1, (uint64_t)r);
    return 0;
}

/* A table's tag and counts. */
static inline int put_head(direct *d, uint64_t run, uint64_t rest)
{
    uint8_t *w = room(d, 1 + 2 * PZ_VARINT_MAX_BYTES);
    if (!w)
        return -1;
    w[0] = PZ_T_TABLE;
    size_t n = 1 + pz_put_varint(w + 1, run);
    d->out->len += n + pz_put_varint(w + n, rest);
    return 0;
}

static inline int put_num(direct *d, double x)
{
    uint8_t *w = room(d, PZ_NUMBER_MAX_BYTES);
    if (!w)
        return -1;
    d->out->len += pz_put_number(w, x);
    return 0;
}

/* Writes a string too long for put_small. */
static int put_long_str(direct *d, const uint8_t *s)
{
    size_t n = pz_str_len(s);
    if (n >= PZ_SHARED_MIN && d->e->arena)
        return -1; /* a place in shared memory could not be taken back if
                    * the walk gave up later: such a string's copy costs
                    * far more than the C API path's calls anyway */
    uint8_t *w = room(d, 1 + PZ_VARINT_MAX_BYTES + n);
    if (!w)
        return -1;
    d->out->len += pz_put_string(w, pz_str_data(s), n);
    return 0;
}

/* ------------------------------------------------------------------------
 * Tables
 * --------------------------------------------------------------------- */

static int put_value(direct *d, pz_tv v);
static int put_table(direct *d, const uint8_t *t);
static inline __attribute__((always_inline)) int put_big(direct *d, pz_tv v);

/* Whether PZ_ENCODE_APART applies to the entries of the table now open:
 * asked once a table by the loops over its entries, not once an entry. */
static inline int apart_here(const direct *d)
{
    return d->apart && d->depth == 1;
}

static inline void apart(direct *d)
{
    if (apart_here(d))
        d->e->ref_base = d->nrefs;
}

/* A sequence: its n values at items[1 .. n], all numbers or not. */
typedef struct sequence {
    const pz_tv *items;
    uint64_t n;
    int numbers;
} sequence;

/* Whether the n values at items[1 .. n] are all numbers. */
static int all_numbers(const pz_tv *items, uint64_t n)
{
    pz_tv others = 0;
    for (uint64_t k = 1; k <= n; k++) /* no early exit: the compiler may vectorize */
        others |= items[k] >= PZ_TV_NOT_NUMBER;
    return !others;
}

/* True when table t's entries are exactly keys 1 .. n, all in the array
 * part (slot 0 and the slots after n empty, every node empty): the common
 * shape of a list, told in one pass over its slots. */
static int array_sequence(const uint8_t *t, sequence *seq)
{
    const pz_tv *array = pz_tab_array(t);
    const uint8_t *nodes = pz_tab_nodes(t);
    uint32_t asize = pz_tab_asize(t), k = 1, hmask = pz_tab_hmask(t);
    pz_tv others = 0;
    if (asize < 2 || !pz_tv_isnil(array[0]))
        return 0;
    /* One pass finds the end and whether all are numbers: the tags of the
     * other kinds are the top of the unsigned range (nil the topmost), and
     * no number's bits reach them (LuaJIT keeps one NaN, below). */
    for (; k < asize; k++) {
        pz_tv v = array[k];
        if (pz_tv_isnil(v))
            break;
        others |= v >= PZ_TV_NOT_NUMBER;
    }
    seq->n = k - 1;
    for (; k < asize; k++)
        if (!pz_tv_isnil(array[k]))
            return 0;
    for (uint32_t j = 0; j <= hmask; j++)
        if (!pz_tv_isnil(pz_node_val(nodes + (size_t)j * PZ_NODE_SIZE)))
            return 0;
    seq->items = array;
    seq->numbers = !others;
    return 1;
}

/* True when the n numbers at array[1 .. n] are to be packed: codec_enc.c's
 * rule (enc_survey), so that either path writes a sequence of numbers
 * alike: at least half of them not integers, or one not finite.  A number
 * x below 2^52 in size is an integer when adding and taking away 2^52
 * leaves it as it is; above, every double is.  Counted in blocks, which
 * stop as soon as the answer is known. */
static int pack_numbers(const pz_tv *array, uint64_t n)
{
    /* Two numbers at a time, in the compiler's portable vectors (SSE2 on
     * x86-64, NEON on arm64): a comparison gives -1 or 0 per lane. */
    typedef double v2d __attribute__((vector_size(16)));
    typedef int64_t v2i __attribute__((vector_size(16)));
    const v2i abs_mask = {INT64_MAX, INT64_MAX};
    const v2d big = {0x1p52, 0x1p52}, max = {DBL_MAX, DBL_MAX};
    uint64_t fractional = 0, k = 1;
    int infinite = 0;
    for (; k <= n; k += 64) {
        uint64_t end = n + 1 - k < 64 ? n + 1 : k + 64, j = k;
        v2i frac = {0, 0}, inf = {0, 0};
        for (; j + 1 < end; j += 2) {
            v2i bits;
            memcpy(&bits, array + j, sizeof bits);
            v2d a = (v2d)(bits & abs_mask);
            frac -= (a < big) & ((a + big) - big != a);
            inf |= ~(a <= max);
        }
        fractional += (uint64_t)(frac[0] + frac[1]);
        infinite |= (inf[0] | inf[1]) != 0;
        for (; j < end; j++) {
            double a = fabs(pz_tv_num(array[j]));
            fractional += (a < 0x1p52) & ((a + 0x1p52) - 0x1p52 != a);
            infinite |= !(a <= DBL_MAX);
        }
        if (infinite || 2 * fractional >= n)
            return 1;
        if (2 * (fractional + n + 1 - end) < n) { /* too few fractions can follow */
            k = end;
            break;
        }
    }
    /* Only a number not finite among the rest packs them now: its bits,
     * the sign cleared, are at least an infinity's. */
    uint64_t inf_or_nan = 0;
    for (; k <= n; k++)
        inf_or_nan |= (array[k] & (uint64_t)INT64_MAX) >= UINT64_C(0x7ff0000000000000);
    return inf_or_nan != 0;
}

/* Room put_small may take. */
#define SMALL_ROOM (1 + PZ_SHORTSTR_MAX)

/* Writes v at w (room: SMALL_ROOM) when it is a number, a boolean or a
 * string short enough for PZ_T_SHORTSTR, and returns the bytes written;
 * returns 0, having written nothing, for anything else.  Inline: it is
 * most of a record's keys and values. */
static inline size_t put_small(uint8_t *w, pz_tv v)
{
    if (pz_tv_isnum(v))
        return pz_put_number(w, pz_tv_num(v));
    switch (pz_tv_tag(v)) {
    case PZ_TAG_STR: {
        const uint8_t *s = pz_tv_obj(v);
        size_t n = pz_str_len(s);
        if (n > PZ_SHORTSTR_MAX)
            return 0;
        w[0] = (uint8_t)(PZ_T_SHORTSTR + n);
        pz_copy_short(w + 1, pz_str_data(s), n); /* n <= PZ_SHORTSTR_MAX: no call */
        return 1 + n;
    }
    case PZ_TAG_FALSE:
        w[0] = PZ_T_FALSE;
        return 1;
    case PZ_TAG_TRUE:
        w[0] = PZ_T_TRUE;
        return 1;
    default:
        return 0;
    }
}

/* Writes the sequence `seq` of table t: as packed doubles when all are
 * numbers, enough of them, and pack_numbers says so, else as a table of n
 * array entries. */
static int put_sequence(direct *d, const sequence *seq)
{
    const pz_tv *array = seq->items;
    uint64_t n = seq->n;
    size_t at;
    uint8_t *w;
    if (seq->numbers && n >= DIRECT_PACK_MIN && pack_numbers(array, n)) {
        if (!(w = room(d, 1 + PZ_VARINT_MAX_BYTES + 8 * n)))
            return -1;
        w[0] = PZ_T_DOUBLES;
        at = 1 + pz_put_varint(w + 1, n);
        memcpy(w + at, array + 1, 8 * n); /* the host's order is the wire's (probed) */
        d->out->len += at + 8 * n;
        return 0;
    }
    if (seq->numbers) { /* no reference numbers among them: no apart */
        if (put_head(d, n, 0) || !(w = room(d, PZ_NUMBER_MAX_BYTES * n)))
            return -1;
        at = 0;
        for (uint64_t k = 1; k <= n; k++)
            at += pz_put_number(w + at, pz_tv_num(array[k]));
        d->out->len += at;
        return 0;
    }
    int each = apart_here(d);
    cursor c = cursor_take(d);
    if (cursor_room(d, &c, 1 + 2 * PZ_VARINT_MAX_BYTES))
        return -1;
    c.w[0] = PZ_T_TABLE; /* put_head's bytes: n values, no other entry */
    c.w += 1 + pz_put_varint(c.w + 1, n);
    *c.w++ = 0;
    for (uint64_t k = 1; k <= n; k++) {
        if (each)
            d->e->ref_base = d->nrefs;
        if (cursor_room(d, &c, SMALL_ROOM))
            return -1;
        if ((at = put_small(c.w, array[k]))) {
            c.w += at;
            continue;
        }
        cursor_give(d, c);
        if (put_big(d, array[k]))
            return -1;
        c = cursor_take(d);
    }
    cursor_give(d, c);
    return 0;
}

/* Writes table t, whose keys are 1 .. n, some of them in its hash part,
 * as a sequence: its values gathered in key order first. */
static int put_gathered(direct *d, const uint8_t *t, uint32_t n)
{
    const pz_tv *array = pz_tab_array(t);
    const uint8_t *node = pz_tab_nodes(t);
    uint32_t asize = pz_tab_asize(t), hmask = pz_tab_hmask(t);
    pz_tv small[DIRECT_GATHER_INLINE + 1], *items = small;
    if (n > DIRECT_GATHER_INLINE && !(items = malloc(((size_t)n + 1) * sizeof *items)))
        return -1;
    for (uint32_t i = 1; i < asize && i <= n; i++)
        items[i] = array[i];
    for (uint32_t i = 0; i <= hmask; i++, node += PZ_NODE_SIZE)
        if (!pz_tv_isnil(pz_node_val(node)))
            items[(uint32_t)pz_tv_num(pz_node_key(node))] = pz_node_val(node);
    sequence seq = {items, n, all_numbers(items, n)};
    int rc = put_sequence(d, &seq);
    if (items != small)
        free(items);
    return rc;
}

/* Writes the entries in the hash nodes node[0 .. last] (by PZ_NODE_SIZE):
 * the first `bare` of them, the end of the run, as values only, the
 * others as keys and values.  Returns the count of entries, or -1. */
static inline __attribute__((always_inline)) int64_t put_nodes(direct *d, const uint8_t *node,
                                                               uint32_t last, uint64_t bare)
{
    int each = apart_here(d);
    int64_t count = 0;
    cursor c = cursor_take(d);
    for (uint32_t i = 0; i <= last; i++, node += PZ_NODE_SIZE) {
        pz_tv key = pz_node_key(node), val = pz_node_val(node);
        size_t n;
        if (pz_tv_isnil(val))
            continue;
        if (each)
            d->e->ref_base = d->nrefs;
        /* Room for a small key and a small value: a record's entries
         * are mostly both, and take no call. */
        if (cursor_room(d, &c, 2 * SMALL_ROOM))
            return -1;
        if (count++ >= (int64_t)bare) { /* the key, unless the run counts it */
            if ((n = put_small(c.w, key))) {
                c.w += n;
            } else {
                cursor_give(d, c);
                if (put_big(d, key))
                    return -1;
                c = cursor_take(d);
                if (cursor_room(d, &c, SMALL_ROOM))
                    return -1;
            }
        }
        if ((n = put_small(c.w, val))) {
            c.w += n;
            continue;
        }
        cursor_give(d, c);
        if (put_big(d, val))
            return -1;
        c = cursor_take(d);
    }
    cursor_give(d, c);
    return count;
}

/* Writes a table whose entries are all in its hash nodes nodes[0 ..
 * hmask], hmask below 127, the first of them under a key that is not a
 * number (or that has no entry): no entry is in the run and the table is
 * no sequence, so put_contents' counting pass would find run 0 and rest
 * the entry count.  The entries are written in one pass instead, counted
 * as they go, after three bytes left for the head: put_head's bytes, the
 * count fitting one varint byte (fewer than 128). */
static int put_record(direct *d, const uint8_t *nodes, uint32_t hmask)
{
    uint8_t *w = room(d, 3);
    if (!w)
        return -1;
    size_t at = d->out->len;
    d->out->len += 3;
    int64_t count = put_nodes(d, nodes, hmask, 0);
    if (count < 0)
        return -1;
    w = (uint8_t *)d->out->data + at; /* the buffer may have moved */
    w[0] = PZ_T_TABLE;
    w[1] = 0;
    w[2] = (uint8_t)count;
    return 0;
}

/* Writes the contents of table t: a count of the entries keyed 1, 2, 3 ...
 * from the start (in lua_next's order: the array slots, then the nodes), a
 * count of the others, then the values of the first and the keys and
 * values of the others. */
static int put_contents(direct *d, const uint8_t *t)
{
    const pz_tv *array = pz_tab_array(t);
    const uint8_t *nodes = pz_tab_nodes(t), *node;
    uint32_t asize = pz_tab_asize(t), hmask = pz_tab_hmask(t), i;
    uint64_t run = 0, rest = 0, k = 0;
    uint32_t top = 0; /* the greatest key when all are positive integers */
    int in_run = 1;
    sequence seq;
    if (asize == 0 && hmask < 127) {
        /* A record (no array part, string keys) or an empty table: one
         * pass (put_record). */
        for (i = 0, node = nodes; i <= hmask && pz_tv_isnil(pz_node_val(node)); i++)
            node += PZ_NODE_SIZE;
        if (i > hmask || !pz_tv_isnum(pz_node_key(node)))
            return put_record(d, nodes, hmask);
    }
    if (array_sequence(t, &seq))
        return put_sequence(d, &seq);
    for (i = 0; i < asize; i++) {
        if (pz_tv_isnil(array[i]))
            continue;
        if (in_run && i == run + 1)
            run++;
        else
            in_run = 0, rest++;
        top = i;
    }
    for (i = 0, node = nodes; i <= hmask; i++, node += PZ_NODE_SIZE) {
        pz_tv key = pz_node_key(node);
        if (pz_tv_isnil(pz_node_val(node)))
            continue;
        if (!pz_tv_isnum(key)) {
            /* The run and a sequence end here: the other entries are only
             * counted (a record's keys are all strings). */
            uint64_t more = 1;
            for (i++, node += PZ_NODE_SIZE; i <= hmask; i++, node += PZ_NODE_SIZE)
                more += !pz_tv_isnil(pz_node_val(node));
            rest += more;
            top = UINT32_MAX;
            break;
        }
        if (in_run && pz_tv_num(key) == (double)(run + 1))
            run++;
        else
            in_run = 0, rest++;
        double x = pz_tv_num(key);
        if (x >= 1 && x <= (double)UINT32_MAX && x == (double)(uint32_t)x) {
            if ((uint32_t)x > top)
                top = (uint32_t)x;
        } else {
            top = UINT32_MAX; /* not a key of a sequence */
        }
    }
    /* Keys 1 .. run + rest and nothing else, some in the hash part: the C
     * API path writes such a table of ITEMS_MIN entries or more as the
     * sequence it is, in key order (codec_enc.c's enc_survey). */
    if (run + rest >= DIRECT_ITEMS_MIN && top == run + rest &&
        (asize == 0 || pz_tv_isnil(array[0])))
        return put_gathered(d, t, top);
    if (put_head(d, run, rest))
        return -1;
    for (i = 0; i < asize; i++) {
        if (pz_tv_isnil(array[i]))
            continue;
        apart(d);
        if (k++ >= run && put_num(d, (double)i))
            return -1;
        if (put_value(d, array[i]))
            return -1;
    }
    return put_nodes(d, nodes, hmask, run > k ? run - k : 0) < 0 ? -1 : 0;
}

/* Writes table t: a reference when it was met before, else in full. */
static int put_table(direct *d, const uint8_t *t)
{
    enc *e = d->e;
    ref_slot *forgotten;
    int r = ref_of(d, t, &forgotten);
    if (r >= 0)
        return put_ref(d, r);
    if (pz_index_may_hold(e, t) || d->depth >= DIRECT_MAX_DEPTH || pz_tab_has_meta(t))
        return -1;
    if (ref_add(d, t, forgotten))
        return -1;
    d->depth++;
    int rc = put_contents(d, t);
    d->depth--;
    return rc;
}

/* Writes key or value v: put_small, or the rest (put_big). */
static int put_value(direct *d, pz_tv v)
{
    uint8_t *w = room(d, SMALL_ROOM);
    size_t n;
    if (!w)
        return -1;
    if ((n = put_small(w, v))) {
        d->out->len += n;
        return 0;
    }
    return put_big(d, v);
}

/* Writes key or value v, which put_small did not: a long string or a
 * table; -1 for anything else (the C API path writes it).  Inline, like
 * put_nodes: a nested table costs one call, put_table's. */
static inline __attribute__((always_inline)) int put_big(direct *d, pz_tv v)
{
    switch (pz_tv_tag(v)) {
    case PZ_TAG_STR:
        return put_long_str(d, pz_tv_obj(v));
    case PZ_TAG_TAB:
        return put_table(d, pz_tv_obj(v));
    default:
        return -1;
    }
}

/* Whether the walk is tried at all: a switch for tests, which compare its
 * output with the C API path's (core.codec_direct). */
static _Atomic int direct_on = 1;

int pz_codec_direct(int on)
{
    int was = direct_on;
    if (on >= 0)
        direct_on = on != 0;
    return was && pz_layout_known();
}

int pz_enc_direct(enc *e, int t)
{
    if (!direct_on || !pz_layout_known()) {
        e->direct = 0;
        return 0;
    }
    direct d;
    d.e = e;
    d.nrefs = e->nrefs;
    d.depth = 0;
    d.apart = (e->flags & PZ_ENCODE_APART) && e->tuple_index == 1;
    d.out = e->out;
    d.before = e->nrefs > 0;
    d.count = 0;
    d.seen = 0;
    d.mask = 0;
    d.refs = NULL;
    size_t start = e->out->len;
    int ref_base = e->ref_base;
    /* Some room first: the loops' cursors need a buffer (cursor_take). */
    int rc = room(&d, SMALL_ROOM) ? put_table(&d, lua_topointer(e->L, t)) : -1;
    if (d.refs)
        free(d.refs);
    if (rc) {
        e->out->len = start;
        e->ref_base = ref_base;
        e->direct = 0;
        return 0;
    }
    e->nrefs = d.nrefs;
    return 1;
}
