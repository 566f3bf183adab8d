/*
 * lrunrec.c - a run record's one-number results appended to a pool's
 * lists by a compiled Lua helper (see lrunrec.h for why and the rules).
 */
#include "lrunrec.h"

#include <lauxlib.h>

#include "jithelper.h"
#include "le.h"

/* Registry key of the helper (its address is what counts). */
static const char reg_helper = 0;

/* take(addr, len, n, results, ids, count) -> items, bytes, first, in_order
 *
 * Reads items at address addr (a number: the JIT compiles the conversion
 * of a number to a pointer, not a light userdata's) while each holds a
 * tuple of one number, up to n of them and len bytes, and stores each
 * result and id at results[count + k] and ids[count + k], the result
 * first, so that an item is whole exactly when its id is there.  With the
 * JIT off it takes nothing and returns -1 items.  An item's id is a
 * varint, then its tuple's length (u32, little-endian) and the tuple: what
 * jithelper.h's number() leaves to C, and an id from 2^49, stop it. */
static const char helper_src[] =
    PZ_JIT_HELPER_PRELUDE
    "local bytes_t\n"
    "on_ffi = function(ffi) bytes_t = ffi.typeof('const uint8_t *') end\n"
    "return function(addr, len, n, results, ids, count)\n"
    "  if not jit_running() then return -1, 0, 0, false end\n"
    "  local p = cast(bytes_t, addr)\n"
    "  local i, k, first, in_order = 0, 0, 0, true\n"
    "  while k < n and i < len do\n"
    "    local id, at = varint(p, i, len)\n"
    "    if not id then return k, i, first, in_order end\n"
    "    local size = p[at] + p[at + 1] * 256 + p[at + 2] * 65536 + p[at + 3] * 16777216\n"
    "    at = at + 4\n"
    "    local v = number(p, at, size)\n"
    "    if v == nil then return k, i, first, in_order end\n"
    "    k = k + 1\n"
    "    results[count + k] = v\n"
    "    ids[count + k] = id\n"
    "    if k == 1 then first = id elseif id ~= first + k - 1 then in_order = false end\n"
    "    i = at + size\n"
    "  end\n"
    "  return k, i, first, in_order\n"
    "end\n";

/* Pushes the helper, compiling it on first use in this state. */
static void push_helper(lua_State *L)
{
    lua_pushlightuserdata(L, (void *)&reg_helper);
    lua_rawget(L, LUA_REGISTRYINDEX);
    if (!lua_isnil(L, -1))
        return;
    lua_pop(L, 1);
    pz_jit_helper_std(L);
    pz_jit_helper_watch(L, -1);
    pz_jit_helper_load(L, -1, helper_src, sizeof helper_src - 1, "=parallelize.runrec", NULL, 0);
    lua_remove(L, -2);
    lua_pushlightuserdata(L, (void *)&reg_helper);
    lua_pushvalue(L, -2);
    lua_rawset(L, LUA_REGISTRYINDEX);
}

void pz_runrec_prepare(lua_State *L)
{
    push_helper(L);
    lua_pop(L, 1);
}

int pz_runrec_take_numbers(lua_State *L, int results, int ids, int count, const uint8_t *p, size_t len,
                           unsigned n, pz_runrec_taken *taken)
{
    taken->items = 0;
    taken->jit_off = !PZ_FFI_IN_PLACE;
    taken->bytes = 0;
    taken->first = 0;
    taken->in_order = 1;
    /* Addresses travel as numbers: exact below 2^53. */
    if (!PZ_FFI_IN_PLACE || (uint64_t)((uintptr_t)p + len) >= (UINT64_C(1) << 53))
        return 0;
    push_helper(L);
    lua_pushnumber(L, (lua_Number)(uintptr_t)p);
    lua_pushnumber(L, (lua_Number)len);
    lua_pushnumber(L, (lua_Number)n);
    lua_pushvalue(L, results);
    lua_pushvalue(L, ids);
    lua_pushnumber(L, (lua_Number)count);
    int status = lua_pcall(L, 6, 4, 0);
    if (status != 0) {
        /* Out of memory while storing: the items whose id is there are
         * whole; a result stored without its id is taken back. */
        int whole = (int)lua_objlen(L, ids) - count;
        if (whole < 0)
            whole = 0;
        if ((int)lua_objlen(L, results) > count + whole) {
            lua_pushnil(L);
            lua_rawseti(L, results, count + whole + 1);
        }
        taken->items = (unsigned)whole;
        return status;
    }
    double items = lua_tonumber(L, -4);
    taken->jit_off = items < 0;
    taken->items = items < 0 ? 0 : (unsigned)items;
    taken->bytes = (size_t)lua_tonumber(L, -3);
    taken->first = (uint64_t)lua_tonumber(L, -2);
    taken->in_order = lua_toboolean(L, -1);
    lua_pop(L, 4);
    return 0;
}
