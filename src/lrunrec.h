/*
 * lrunrec.h - the results of a run record (run.h) that are one number
 * each, appended to a pool's lists by a compiled Lua helper.
 *
 * Why: the main thread took a tiny call's result in about 20 ns through
 * the C API (a decode, a push and two lua_rawseti, each an API call):
 * the largest share of its time in a loop of p(i).  A loop compiled by
 * LuaJIT's JIT reads the record's bytes through the FFI and stores into
 * the two tables directly, for a few nanoseconds an item.  Interpreted,
 * the FFI costs more than the C API, so with the JIT off the helper takes
 * nothing and the C path (lrecords.c) takes every item, as it takes every
 * item the helper stops at: anything but a tuple of exactly one number
 * that pz_get_number would read the same (no NaN: the FFI does not
 * canonicalize one it loads, and LuaJIT tags its other values inside
 * NaNs; no integer beyond 2^53, no -0 written as an integer).
 *
 * Main thread only, inside a drain (lrecords.c).  The record's framing
 * (each item's varint id, u32 length and bytes) was checked by the I/O
 * thread; what the items hold came from a worker and is checked here.
 */
#ifndef PZ_LRUNREC_H
#define PZ_LRUNREC_H

#include <stddef.h>
#include <stdint.h>

#include <lua.h>

/* What pz_runrec_take_numbers took. */
typedef struct pz_runrec_taken {
    unsigned items;   /* items appended */
    size_t bytes;     /* the bytes of the record's items they took */
    uint64_t first;   /* the first one's id */
    int in_order;     /* their ids were first, first + 1, ... */
    int jit_off;      /* it took nothing: the JIT is off (or no FFI) */
} pz_runrec_taken;

/* Appends to the tables at (positive) stack indices results and ids,
 * after their first `count` entries, the results and ids of the run
 * record's items at [p, p + len) while each result is one number, at
 * most n items.  Fills *taken (items 0 when the JIT is off or the FFI
 * missing, which jit_off says, or when the first item is not such a
 * result) and returns 0.  Out of memory, it puts the lists back as they
 * were before the item it was appending, sets taken->items to the items
 * appended before it (their ids are in the ids list), and returns
 * lua_pcall's status with the error on top of the stack. */
int pz_runrec_take_numbers(lua_State *L, int results, int ids, int count, const uint8_t *p, size_t len,
                           unsigned n, pz_runrec_taken *taken);

/* Compiles the helper in this state, taking the standard functions it
 * uses as they are now (pz_lrecords_register: when the module loads). */
void pz_runrec_prepare(lua_State *L);

#endif
