/*
 * codec_layout.h - LuaJIT's objects as the codec reads them directly:
 * tagged values, tables (header, array part, hash nodes) and strings.
 *
 * The Lua C API costs a call or more per value read (lua_next hashes the
 * previous key again to find its place; lua_type, lua_tolstring... each
 * look the slot up), tens of nanoseconds a table entry in all, where the
 * bytes of the entry are a few loads away.  LuaJIT does not publish its
 * object layout, so pz_layout_probe checks, on objects it makes with the
 * C API, that every field read below says what the C API says (types,
 * pointers, numbers, string bytes, array and hash slots, lua_next's order,
 * the metatable).  Only LuaJIT 2.1's 64-bit layout (GC64: 8-byte tagged
 * values, the default on x86-64 and arm64) is known; on any other, or when
 * one check fails, pz_layout_known stays false and the codec uses the C API
 * alone.
 *
 * Rules this header owns:
 * - Nothing here is read unless pz_layout_known() is true.
 * - Reading is all it does: an object read here is never written, and a
 *   reader runs no Lua and allocates nothing from the Lua state, so no
 *   collection step can free or move what it holds while it reads; an
 *   object it found stays alive only as long as what refers to it does.
 * - The probe runs at module load (pz_codec_prepare) in every state; the
 *   result is per process (every state of a process is the same LuaJIT).
 */
#ifndef PZ_CODEC_LAYOUT_H
#define PZ_CODEC_LAYOUT_H

#include <lua.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>

/* A tagged value: the 8 bytes of one of LuaJIT's TValues. */
typedef uint64_t pz_tv;

/* The type tag of a value: its top 17 bits, sign-extended. */
static inline uint32_t pz_tv_tag(pz_tv v)
{
    return (uint32_t)((int64_t)v >> 47);
}

enum {
    PZ_TAG_NIL = ~0u,
    PZ_TAG_FALSE = ~1u,
    PZ_TAG_TRUE = ~2u,
    PZ_TAG_STR = ~4u,
    PZ_TAG_FUNC = ~8u,
    PZ_TAG_TAB = ~11u,
    PZ_TAG_UDATA = ~12u,
    PZ_TAG_NUMX = ~13u /* tags below it are numbers (their double's bits) */
};

/* Every value whose tag is PZ_TAG_NUMX or above is at least this,
 * unsigned; every number is below it (LuaJIT's one NaN is
 * 0xfff8000000000000). */
#define PZ_TV_NOT_NUMBER ((pz_tv)(uint32_t)PZ_TAG_NUMX << 47)

static inline int pz_tv_isnil(pz_tv v)
{
    return v == ~UINT64_C(0);
}

static inline int pz_tv_isnum(pz_tv v)
{
    return pz_tv_tag(v) < PZ_TAG_NUMX;
}

static inline double pz_tv_num(pz_tv v)
{
    double d;
    memcpy(&d, &v, sizeof d);
    return d;
}

/* The object of a value of a collectable type (string, table, ...). */
static inline const uint8_t *pz_tv_obj(pz_tv v)
{
    return (const uint8_t *)(uintptr_t)(v & ((UINT64_C(1) << 47) - 1));
}

/* Strings: the length (a uint32 at 16 in LuaJIT 2.1 beta3, at 20 since
 * string hashing changed in 2020: probed), then the bytes at 24. */
#define PZ_STR_DATA 24
extern _Atomic int pz_str_len_offset;

static inline uint32_t pz_str_len(const uint8_t *s)
{
    uint32_t n;
    memcpy(&n, s + atomic_load_explicit(&pz_str_len_offset, memory_order_relaxed), sizeof n);
    return n;
}

static inline const char *pz_str_data(const uint8_t *s)
{
    return (const char *)(s + PZ_STR_DATA);
}

/* Tables: the array part (slots 0 .. asize - 1, the value of key i in slot
 * i), the hash part (hmask + 1 nodes), the metatable (0: none). */
#define PZ_TAB_ARRAY 16
#define PZ_TAB_META 32
#define PZ_TAB_NODE 40
#define PZ_TAB_ASIZE 48
#define PZ_TAB_HMASK 52
/* A hash node: value, then key, then the chain link. */
#define PZ_NODE_SIZE 24
#define PZ_NODE_VAL 0
#define PZ_NODE_KEY 8

static inline uint64_t pz_load64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline uint32_t pz_load32(const uint8_t *p)
{
    uint32_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline const pz_tv *pz_tab_array(const uint8_t *t)
{
    return (const pz_tv *)(uintptr_t)pz_load64(t + PZ_TAB_ARRAY);
}

static inline uint32_t pz_tab_asize(const uint8_t *t)
{
    return pz_load32(t + PZ_TAB_ASIZE);
}

static inline const uint8_t *pz_tab_nodes(const uint8_t *t)
{
    return (const uint8_t *)(uintptr_t)pz_load64(t + PZ_TAB_NODE);
}

static inline uint32_t pz_tab_hmask(const uint8_t *t)
{
    return pz_load32(t + PZ_TAB_HMASK);
}

static inline int pz_tab_has_meta(const uint8_t *t)
{
    return pz_load64(t + PZ_TAB_META) != 0;
}

static inline pz_tv pz_node_val(const uint8_t *node)
{
    return pz_load64(node + PZ_NODE_VAL);
}

static inline pz_tv pz_node_key(const uint8_t *node)
{
    return pz_load64(node + PZ_NODE_KEY);
}

/* True when the probe (codec_layout.c) found the layout above.  Inline:
 * every encode of a table asks, twice.  Acquire: a state that finds the
 * layout probed by another thread's state sees what that probe stored
 * before (pz_str_len_offset). */
extern _Atomic int pz_layout_state;

static inline int pz_layout_known(void)
{
    return atomic_load_explicit(&pz_layout_state, memory_order_acquire) == 1;
}

/* Probes the layout on objects made in L (once per process; later calls
 * return at once).  Leaves the stack as it was. */
void pz_layout_probe(lua_State *L);

#endif
