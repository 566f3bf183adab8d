/*
 * codec_array.h - sequences and packed arrays of numbers, for the encoder
 * and the decoder (codec_array.c says how and why).
 */
#ifndef PZ_CODEC_ARRAY_H
#define PZ_CODEC_ARRAY_H

#include <lua.h>
#include <stddef.h>
#include <stdint.h>

/* What pz_survey found. */
enum {
    PZ_SURVEY_OTHER,    /* not a sequence of n values */
    PZ_SURVEY_SEQUENCE, /* a sequence of n values, not packed */
    PZ_SURVEY_PACKED    /* a sequence of n numbers, written at dst */
};

/* Surveys the table at stack index t, whose length is n (lua_objlen).  When
 * dst is not NULL (room for 8 * n bytes) and the values are all numbers,
 * and the JIT runs, writes them there as little-endian doubles, stores how
 * many are not integral in *fractional (NaN when one is not finite) and
 * returns PZ_SURVEY_PACKED.  Needs 5 free stack slots; leaves the stack as
 * it was. */
int pz_survey(lua_State *L, int t, size_t n, void *dst, double *fractional);

/* Pushes t[i], ..., t[j] of the table at stack index t, raw (the caller
 * checked room for j - i + 4 slots). */
void pz_push_items(lua_State *L, int t, size_t i, size_t j);

/* Pushes a new table of the n little-endian doubles at p (8 * n bytes,
 * checked by the caller).  Needs 3 free stack slots. */
void pz_unpack_doubles(lua_State *L, const uint8_t *p, size_t n);

/* Sets t[i + 1] .. t[i + k] of the table at stack index t (an absolute
 * index; its array part holds them already, for speed) to the k doubles
 * at src, none of them a NaN (the caller's promise: see codec_array.c's
 * rule on NaNs).  Needs 6 free stack slots. */
void pz_fill_doubles(lua_State *L, int t, size_t i, const double *src, size_t k);

/* As pz_fill_doubles, from k little-endian doubles at src (8 * k bytes,
 * checked by the caller, any alignment), which may hold NaNs. */
void pz_fill_wire_doubles(lua_State *L, int t, size_t i, const uint8_t *src, size_t k);

/* Takes the standard functions the helpers use (next, rawget, unpack...)
 * now, before a script can replace them, and probes LuaJIT's table
 * layout (codec_array.c). */
void pz_array_prepare(lua_State *L);

#endif
