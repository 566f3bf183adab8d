/*
 * fuzz_value.c - libFuzzer harness for the value decoder (codec.c) in its
 * default mode, the one that reads bytes nobody vouches for: no bytecode,
 * no `require`.
 *
 * Every input goes four ways, each inside lua_pcall on one LuaJIT state
 * made at start-up:
 *   1. the Lua-facing decode (parallelize.decode), version byte and all;
 *   2. pz_decode_value over the whole input;
 *   3. pz_decode_tuple over the whole input;
 *   4. pz_decode_tuple_into (a map's chunk's answer) over the whole input,
 *      into a new table, at an offset taken from the input's size: when it
 *      succeeds, pz_decode_tuple must succeed too and agree (the same
 *      count; each entry of its first value, a table, at its key plus the
 *      offset, with the same type and, for scalars, the same value).
 * A decode may fail, with a Lua error; it must never crash, read out of
 * bounds or allocate out of proportion to the input (the sanitizers and
 * libFuzzer's -rss_limit_mb / -malloc_limit_mb watch those).  When 2. or 3.
 * succeeds, what was decoded is encoded again and the encoding decoded: a
 * value the decoder accepts must be one the encoder can write, and its
 * encoding must decode (a tuple also with PZ_ENCODE_APART), and be the
 * bytes the C API path writes without the direct walk (when under 1,000
 * bytes, where that path pads no count).  A failure
 * there aborts, so libFuzzer reports it.
 *
 *   make fuzz FUZZ_SECONDS=60        (builds build/fuzz/fuzz_value)
 */
#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "buf.h"
#include "codec.h"

static lua_State *L;
static const char *in_data;
static size_t in_size;
static pz_buf out = PZ_BUF_INIT;

/* How far the current step got: a Lua error after DECODED breaks the
 * round-trip property. */
enum { STARTED, DECODED };
static int stage;

/* decode(in) with the Lua-facing function, which checks the version byte. */
static int lua_facing(lua_State *L1)
{
    lua_getfield(L1, LUA_REGISTRYINDEX, "pz_fuzz_decode");
    lua_pushlstring(L1, in_data, in_size);
    lua_call(L1, 1, 1);
    return 1;
}

static pz_buf slow = PZ_BUF_INIT;

static int value_round_trip(lua_State *L1)
{
    pz_decode_value(L1, in_data, in_size, 0);
    stage = DECODED;
    out.len = 0;
    pz_encode_value(L1, -1, &out, "value", 0);
    /* The direct walk of tables (codec_direct.c) against the C API path:
     * the same bytes where the latter leaves no count padded. */
    slow.len = 0;
    pz_codec_direct(0);
    pz_encode_value(L1, -1, &slow, "value", 0);
    pz_codec_direct(1);
    if (slow.len < 1000 && (slow.len != out.len || memcmp(slow.data, out.data, out.len))) {
        fprintf(stderr, "the direct walk wrote %zu bytes, the C API path %zu, not the same\n",
                out.len, slow.len);
        abort();
    }
    pz_decode_value(L1, out.data, out.len, 0);
    return 0;
}

/* A stand-in for a pool's shared memory (arena.h): shared strings in the
 * input must lie inside it, or fail to decode, never read past it. */
static char region[4096];

static int tuple_round_trip(lua_State *L1)
{
    pz_arena_reader reader = {region, sizeof region, 0, 0};
    int n = pz_decode_tuple(L1, in_data, in_size, 0, &reader);
    if (reader.last_end > sizeof region) {
        fprintf(stderr, "a shared string ends at %llu, past the region\n",
                (unsigned long long)reader.last_end);
        abort();
    }
    stage = DECODED;
    out.len = 0;
    int first = lua_gettop(L1) - n + 1;
    pz_encode_tuple(L1, first, n, &out, "args", 0, NULL);
    if (pz_decode_tuple(L1, out.data, out.len, 0, NULL) != n) {
        fprintf(stderr, "tuple of %d values re-decoded to another count\n", n);
        abort();
    }
    /* Encoded again with the first value's items apart (a map's chunk:
     * codec.h), the tuple must decode as well: the encoder forgets what
     * earlier items met, and the numbers it writes must still agree with
     * the ones the decoder gives. */
    lua_settop(L1, first + n - 1);
    out.len = 0;
    pz_encode_tuple(L1, first, n, &out, "args", PZ_ENCODE_APART, NULL);
    if (pz_decode_tuple(L1, out.data, out.len, 0, NULL) != n) {
        fprintf(stderr, "tuple of %d values, encoded apart, re-decoded to another count\n", n);
        abort();
    }
    return 0;
}

/* Aborts with a message about way 4. */
static void into_disagrees(const char *what)
{
    fprintf(stderr, "pz_decode_tuple_into and pz_decode_tuple disagree: %s\n", what);
    abort();
}

static int into_round_trip(lua_State *L1)
{
    size_t offset = in_size % 7;
    lua_newtable(L1);
    int into = lua_gettop(L1);
    int n = pz_decode_tuple_into(L1, in_data, in_size, 0, into, offset, NULL);
    stage = DECODED;
    int m = pz_decode_tuple(L1, in_data, in_size, 0, NULL);
    if (m != n)
        into_disagrees("value count");
    int t = lua_gettop(L1) - m + 1;
    if (!lua_istable(L1, t))
        into_disagrees("the first value is not a table");
    int entries = 0, stored = 0;
    lua_pushnil(L1);
    while (lua_next(L1, t)) {
        entries++;
        if (lua_type(L1, -2) != LUA_TNUMBER)
            into_disagrees("a key that is not a number");
        lua_rawgeti(L1, into, (int)(offset + (size_t)lua_tonumber(L1, -2)));
        int type = lua_type(L1, -1);
        if (type != lua_type(L1, -2))
            into_disagrees("an entry's type");
        if ((type == LUA_TNUMBER || type == LUA_TSTRING || type == LUA_TBOOLEAN) &&
            !lua_rawequal(L1, -1, -2) && !(type == LUA_TNUMBER && lua_tonumber(L1, -1) != lua_tonumber(L1, -1)))
            into_disagrees("an entry's value");
        lua_pop(L1, 2);
    }
    lua_pushnil(L1);
    while (lua_next(L1, into)) {
        stored++;
        lua_pop(L1, 1);
    }
    if (entries != stored)
        into_disagrees("the number of entries");
    return 0;
}

/* Runs fn in protected mode; aborts when it failed after decoding. */
static void run(lua_CFunction fn, const char *what)
{
    stage = STARTED;
    lua_settop(L, 0);
    if (lua_cpcall(L, fn, NULL) != 0 && stage == DECODED) {
        fprintf(stderr, "%s: decoded, but the round trip failed: %s\n", what,
                lua_isstring(L, -1) ? lua_tostring(L, -1) : "(not a string)");
        abort();
    }
    lua_settop(L, 0);
}

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    L = luaL_newstate();
    if (!L)
        abort();
    luaL_openlibs(L);
    lua_newtable(L);
    pz_codec_register(L);
    lua_getfield(L, -1, "decode");
    lua_setfield(L, LUA_REGISTRYINDEX, "pz_fuzz_decode");
    /* parallelize.null and a module table to be referred to by name */
    lua_getfield(L, LUA_REGISTRYINDEX, "_LOADED");
    lua_pushvalue(L, -2);
    lua_setfield(L, -2, "parallelize");
    lua_settop(L, 0);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static unsigned runs;
    in_data = (const char *)data;
    in_size = size;
    run(lua_facing, "decode");
    run(value_round_trip, "pz_decode_value");
    run(tuple_round_trip, "pz_decode_tuple");
    run(into_round_trip, "pz_decode_tuple_into");
    /* Keep the heap of the long-lived state from hiding growth. */
    if (++runs % 4096 == 0)
        lua_gc(L, LUA_GCCOLLECT, 0);
    out.len = 0;
    pz_buf_trim(&out, 1 << 16);
    return 0;
}
