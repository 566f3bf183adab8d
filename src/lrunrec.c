/*
 * lrunrec.c - a run record's one-number results appended to a pool's
 * lists by a compiled Lua helper (see lrunrec.h for why and the rules).
 */
#include "lrunrec.h"

#include <lauxlib.h>

#include "codec_format.h"
#include "run.h"

/* Registry key of the helper (its address is what counts). */
static const char reg_helper = 0;

/* take(addr, len, n, results, ids, count) -> items, bytes, first, in_order
 *
 * Reads items at address addr (a number: the JIT compiles the conversion
 * of a number to a pointer, not a light userdata's) while each holds a
 * tuple of one number, up to n of them and len bytes, and stores each
 * result and id at results[count + k] and ids[count + k], the result
 * first, so that an item is whole exactly when its id is there.  With the
 * JIT off (looked at every 64th call: jit.status costs about as much as
 * 50 items) it takes nothing and returns -1 items.  An item's id is a varint, then its tuple's
 * length (u32, little-endian) and the tuple: count 1, then the number as
 * pz_put_number writes it (codec_format.h).  Varints are read up to four
 * bytes (below 2^28), unrolled: a loop inside the loop made LuaJIT
 * compile the inner one as the root trace, and the outer one in pieces
 * around it.  An id or an integer longer than that, and -0 as an integer,
 * which pz_put_number never writes, go to the C path. */
static const char helper_src[] =
    "local std, ffi_on, FIX, POS, NEG, DBL = ...\n"
    "local pcall, require = std.pcall, std.require\n"
    "local status = std.jit_status or function() return false end\n"
    "local ok, cast, bytes_t, doubles_t = false\n"
    "local countdown, running, loaded = 0, false, false\n"
    "local function jit_running()\n"
    "  countdown = countdown - 1\n"
    "  if countdown < 0 then\n"
    "    countdown, running = 63, status()\n"
    "    if running and not loaded then\n"
    "      loaded = true\n"
    "      local has_ffi, ffi = pcall(require, 'ffi')\n"
    "      if ffi_on and has_ffi then\n"
    "        cast, bytes_t, doubles_t = ffi.cast, ffi.typeof('const uint8_t *'), ffi.typeof('const double *')\n"
    "        ok = true\n"
    "      end\n"
    "    end\n"
    "  end\n"
    "  return running and ok\n"
    "end\n"
    /* The varint at p[i], whose bytes end before p[e] (i < e): its value
     * and the index after it, or nil when it takes more than four bytes
     * or runs into p[e]. */
    "local function varint(p, i, e)\n"
    "  local b0 = p[i]\n"
    "  if b0 < 128 then return b0, i + 1 end\n"
    "  if i + 1 >= e then return nil end\n"
    "  local b1 = p[i + 1]\n"
    "  if b1 < 128 then return b0 - 128 + b1 * 128, i + 2 end\n"
    "  if i + 2 >= e then return nil end\n"
    "  local b2 = p[i + 2]\n"
    "  if b2 < 128 then return b0 - 128 + (b1 - 128) * 128 + b2 * 16384, i + 3 end\n"
    "  if i + 3 >= e then return nil end\n"
    "  local b3 = p[i + 3]\n"
    "  if b3 < 128 then return b0 - 128 + (b1 - 128) * 128 + (b2 - 128) * 16384 + b3 * 2097152, i + 4 end\n"
    "  return nil\n"
    "end\n"
    "return function(addr, len, n, results, ids, count)\n"
    "  if not jit_running() then return -1, 0, 0, false end\n"
    "  local p = cast(bytes_t, addr)\n"
    "  local i, k, first, in_order = 0, 0, 0, true\n"
    "  while k < n and i < len do\n"
    "    local id, at = varint(p, i, len)\n"
    "    if not id then return k, i, first, in_order end\n"
    "    local size = p[at] + p[at + 1] * 256 + p[at + 2] * 65536 + p[at + 3] * 16777216\n"
    "    at = at + 4\n"
    "    if size < 2 or p[at] ~= 1 then return k, i, first, in_order end\n"
    "    local t, v = p[at + 1]\n"
    "    if t >= FIX then\n"
    "      if size ~= 2 then return k, i, first, in_order end\n"
    "      v = t - FIX\n"
    "    elseif t == DBL then\n"
    "      if size ~= 10 then return k, i, first, in_order end\n"
    "      v = cast(doubles_t, p + at + 2)[0]\n"
    "      if v ~= v then return k, i, first, in_order end\n"
    "    elseif t == POS or t == NEG then\n"
    "      if size < 3 then return k, i, first, in_order end\n"
    "      local e\n"
    "      v, e = varint(p, at + 2, at + size)\n"
    "      if not v or e ~= at + size or (t == NEG and v == 0) then return k, i, first, in_order end\n"
    "      if t == NEG then v = -v end\n"
    "    else\n"
    "      return k, i, first, in_order\n"
    "    end\n"
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
    if (luaL_loadbuffer(L, helper_src, sizeof helper_src - 1, "=parallelize.runrec"))
        lua_error(L);
    /* The standard functions it uses, as they are now: a script that
     * replaces them later does not reach into the drain. */
    lua_createtable(L, 0, 3);
    lua_getglobal(L, "pcall");
    lua_setfield(L, -2, "pcall");
    lua_getglobal(L, "require");
    lua_setfield(L, -2, "require");
    lua_getglobal(L, "jit");
    if (lua_istable(L, -1))
        lua_getfield(L, -1, "status");
    else
        lua_pushnil(L);
    lua_setfield(L, -3, "jit_status");
    lua_pop(L, 1);
    lua_pushboolean(L, PZ_FFI_IN_PLACE);
    lua_pushinteger(L, PZ_T_FIXINT);
    lua_pushinteger(L, PZ_T_POSINT);
    lua_pushinteger(L, PZ_T_NEGINT);
    lua_pushinteger(L, PZ_T_DOUBLE);
    lua_call(L, 6, 1);
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
