/*
 * codec_enc.h - the encoder's state, shared by the files that write values:
 * codec_enc.c (values and tables), codec_func.c (Lua functions),
 * codec_index.c (module references) and codec_path.c (error paths); the
 * encoder also uses codec_array.h (sequences, packed arrays).
 *
 * Rules this header owns:
 * - One encode is one `enc` on the C stack and ES_COUNT Lua stack slots
 *   reserved above the caller's (enc_slot); every function leaves the stack
 *   as it found it, above those slots.
 * - Every table or function met gets the next reference number, in
 *   encoding order, whatever it is written as (codec_format.h); the one that
 *   writes it in full, or as a module reference, calls pz_ref_add.  With
 *   PZ_ENCODE_APART, before each item of the tuple's first table the
 *   numbers given so far are forgotten (ref_base): an object met again is
 *   written in full again, with a new number, and no upvalue is joined to
 *   a forgotten function.  The encoder finds numbers by object address
 *   (lua_topointer), which names an object only while it lives, so
 *   pz_ref_add also anchors the object until the encode ends: a finalizer
 *   run by a collection step during the encode (a step may run wherever
 *   the encoder allocates or calls Lua: functions, the module index,
 *   anchors past the first few) could otherwise drop the last reference to
 *   one, and a new object at the same address would be written as a
 *   reference to the old.  The direct walk (codec_direct.c) is the one
 *   exception: it numbers tables without anchoring them, which is safe
 *   because it runs only for the last value of an encode, or one only
 *   scalars follow (enc.direct), and runs no Lua, so nothing runs between
 *   a number and the encode's end.
 * - Output goes through the inline writers below, which raise on running
 *   out of memory; the buffer then holds a partial encoding.
 * - Errors go through pz_enc_raise, which names the value's path and clears
 *   the caller's busy flag (see lcodec.c) before raising.
 */
#ifndef PZ_CODEC_ENC_H
#define PZ_CODEC_ENC_H

#include <lua.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "buf.h"
#include "codec.h"
#include "codec_format.h"

/* What the encoder is doing inside one open table or function: one segment
 * of the path an error names. */
enum seg_kind {
    SEG_NONE,     /* nothing yet */
    SEG_KEY,      /* encoding a key of the table */
    SEG_VALUE,    /* encoding the value under the key at stack index idx */
    SEG_ITEM,     /* encoding item idx of a sequence */
    SEG_MT,       /* encoding the table's metatable */
    SEG_UPVALUE,  /* encoding upvalue idx, called name */
    SEG_GLOBAL    /* encoding the global whose name is at stack index idx */
};

typedef struct seg {
    enum seg_kind kind;
    int idx;
    const char *name;
} seg;

/* Objects anchored in stack slots (ES_ANCHOR0 ...) before the anchor table
 * is needed; reference numbers kept in a list searched in order before the
 * hash table is needed.  Most values hold a few tables at most. */
#define ES_ANCHOR_SLOTS 8
#define REFS_LINEAR 8
/* Slots of the hash table of reference numbers inside the enc struct;
 * beyond half of them it moves to a userdata (ES_REFMEM). */
#define REFS_INLINE 64

/* Stack slots reserved by every top-level encode, relative to enc.slots. */
enum {
    ES_ANCHORS, /* reference number -> object, from ES_ANCHOR_SLOTS on */
    ES_REFMEM,  /* the userdata holding the reference hash table, once grown */
    ES_UPVALS,  /* upvalue id -> function reference * 256 + upvalue index */
    ES_INDEX,   /* the module index, loaded on first use */
    ES_INDEX_FILTER, /* the filter of its objects' addresses (codec_index.c) */
    ES_ANCHOR0, /* objects with reference numbers 0 .. ES_ANCHOR_SLOTS - 1 */
    ES_COUNT = ES_ANCHOR0 + ES_ANCHOR_SLOTS
};

/* One entry of the reference hash table: an object's address and number. */
typedef struct ref_slot {
    const void *obj; /* NULL: free */
    int num;
} ref_slot;

/* The slot of obj in the open-addressing table refs of mask + 1 slots:
 * where it is, or the free slot where it would go.  Addresses are aligned
 * and clustered, so they are mixed (Fibonacci hashing) before the low
 * bits are taken.  The encoder's numbers and the direct walk's share it. */
static inline ref_slot *pz_ref_slot(ref_slot *refs, size_t mask, const void *obj)
{
    uint64_t h = (uint64_t)(uintptr_t)obj * UINT64_C(0x9e3779b97f4a7c15);
    size_t i = (size_t)(h >> 32) & mask;
    while (refs[i].obj && refs[i].obj != obj)
        i = (i + 1) & mask;
    return &refs[i];
}

typedef struct enc {
    lua_State *L;
    pz_buf *out;
    int flags;
    int slots;         /* stack index of the first reserved slot */
    int nrefs;         /* reference numbers given so far */
    int ref_base;      /* numbers below it are forgotten (PZ_ENCODE_APART):
                        * their objects are written in full again */
    int depth;         /* open tables and functions */
    int index_fresh;   /* the index was rebuilt during this encode */
    int index_checked; /* package.loaded was compared this encode */
    int index_deferred; /* the index slot is not filled yet (codec_index.c) */
    int tuple_index;   /* > 0: paths start with root[tuple_index] */
    int items_held;    /* stack slots enc_items holds, all open tables together */
    int direct;        /* the value now encoded at the top is the encode's
                        * last: a table there may take the direct walk */
    const struct pz_addr_filter *index_filter; /* the userdata in ES_INDEX_FILTER, or NULL */
    const char *root;
    int *busy;         /* cleared before raising: see lcodec.c */
    pz_arena_writer *arena; /* big strings go there when it has room (codec.h) */
    /* reference numbers: the first REFS_LINEAR objects in refs_list (object
     * i has number i), then in the hash table refs (refs_mask + 1 slots) */
    const void *refs_list[REFS_LINEAR];
    ref_slot *refs;
    size_t refs_mask;
    ref_slot refs_inline[REFS_INLINE];
    seg segs[PZ_MAX_DEPTH + 1];
} enc;

static inline int enc_slot(const enc *e, int which)
{
    return e->slots + which;
}

/* codec_path.c: raises "<what> at <path>" (clearing *e->busy first). */
__attribute__((noreturn)) void pz_enc_raise(enc *e, const char *what);

/* Returns room for n more bytes at the end of the output, or raises. */
static inline uint8_t *enc_room(enc *e, size_t n)
{
    char *p = pz_buf_reserve(e->out, n);
    if (!p)
        pz_enc_raise(e, "cannot encode: out of memory");
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

/* codec_enc.c: writes a string of PZ_SHARED_MIN bytes or more to the
 * arena writer and its place to out (PZ_T_SHARED).  Returns 1, 0 when the
 * writer has no room (nothing written), -1 when out is out of memory. */
int pz_encode_shared(pz_arena_writer *arena, pz_buf *out, const char *s, size_t n);

static inline void enc_string(enc *e, const char *s, size_t n)
{
    if (n >= PZ_SHARED_MIN && e->arena) {
        int placed = pz_encode_shared(e->arena, e->out, s, n);
        if (placed < 0)
            pz_enc_raise(e, "cannot encode: out of memory");
        if (placed)
            return;
    }
    uint8_t *w = enc_room(e, 1 + PZ_VARINT_MAX_BYTES + n);
    e->out->len += pz_put_string(w, s, n);
}

/* Width of the padded varints written before their value is known: 5 bytes
 * hold 35 bits, more than any table or bytecode size LuaJIT allows. */
#define PZ_ENC_PAD_WIDTH 5

/* True when reference number num was given before ref_base: its object
 * must not be joined to (PZ_ENCODE_APART). */
int pz_ref_forgotten(const enc *e, int num);

/* A filter over the addresses of the objects in an index (a Bloom filter:
 * two bits an address, 64 bits an object, so that about 0.1% of the
 * other addresses pass; each one that passes makes the direct walk give
 * its table back): the common case, the value's own tables, is told
 * apart without touching the Lua index, in little memory (every worker
 * keeps one).  An address that passes may still not be in the index, and
 * the index's keys are weak, so an address may outlive its object and come
 * back as another one's: passing is only a reason to look in the index. */
typedef struct pz_addr_filter {
    uint64_t mask; /* bits - 1, bits a power of two */
    uint64_t word[];
} pz_addr_filter;

/* The two bits of obj: halves of one product (Fibonacci hashing mixes the
 * aligned, clustered addresses). */
static inline void pz_addr_bits(const pz_addr_filter *f, const void *obj, uint64_t *a, uint64_t *b)
{
    uint64_t h = (uint64_t)(uintptr_t)obj * UINT64_C(0x9e3779b97f4a7c15);
    *a = (h >> 40) & f->mask;
    *b = (h >> 16) & f->mask;
}

static inline int pz_addr_may_hold(const pz_addr_filter *f, const void *obj)
{
    uint64_t a, b;
    pz_addr_bits(f, obj, &a, &b);
    return (f->word[a >> 6] >> (a & 63) & 1) && (f->word[b >> 6] >> (b & 63) & 1);
}

/* True when obj may be in the module index (codec_index.c): no Lua. */
static inline int pz_index_may_hold(const enc *e, const void *obj)
{
    return e->index_filter && pz_addr_may_hold(e->index_filter, obj);
}

/* codec_enc.c */
void pz_enc_value(enc *e, int idx);          /* any value, at absolute index idx */
int pz_enc_known(enc *e, int idx, const void *obj); /* writes a reference if idx was met or is a module */
void pz_enc_enter(enc *e);                   /* opens a table or function, or raises */
int pz_ref_add(enc *e, int idx, const void *obj); /* the next reference number, for idx */
size_t pz_enc_hole(enc *e, int n);           /* room for n counts patched later */
void pz_enc_patch(enc *e, size_t at, const uint64_t *v, int n); /* fills the hole */

/* The reference number of obj, or -1 if it was not met yet (since
 * ref_base). */
int pz_ref_find(const enc *e, const void *obj);

/* codec_direct.c: writes the table at idx, at the top of the encode's last
 * value, reading LuaJIT's objects directly, and returns 1; returns 0 having
 * written nothing (and cleared e->direct) when the table holds what only
 * the C API path writes.  The module index must be current (pz_index_ready
 * or pz_index_quick) and its filter in e->index_filter. */
int pz_enc_direct(enc *e, int idx);

/* codec_func.c: writes the function at idx (a reference, or in full). */
void pz_enc_function(enc *e, int idx);

/* codec_index.c: the module index (see there). */
void pz_index_ready(enc *e);                 /* the index slot holds a current index */
int pz_index_quick(enc *e);                  /* without Lua or stack slots: see there */
void pz_index_rebuild(enc *e);               /* builds it again, now */
int pz_index_put(enc *e, int idx, const void *obj); /* writes a module reference if it is one */
void pz_index_prepare(lua_State *L);         /* compiles its Lua keeper */

#endif
