/*
 * wruns.c - a run's calls whose argument is one number, made by a Lua
 * loop the JIT compiles (see wruns.h for why and the rules).
 */
#include "wruns.h"

#include <lauxlib.h>
#include <stddef.h>
#include <string.h>

#include "codec_format.h"
#include "le.h"

/* The helper reads pz_run_item through the FFI as this struct. */
_Static_assert(offsetof(pz_run_item, id) == 0 && offsetof(pz_run_item, args) == 8 &&
                   offsetof(pz_run_item, len) == 16 && sizeof(pz_run_item) == 24,
               "pz_run_item's layout is the helper's");

/* Registry key of the helper (its address is what counts). */
static const char reg_helper = 0;

/* make(f, addr, next, n) -> 0 | 1, values | 2 | -1
 *
 * Makes the calls items[next..n] of the run at address addr (a number:
 * the JIT compiles its conversion to a pointer), the executor each time
 * with the one number its argument tuple holds, as long as it holds one,
 * and hands each result that is one number to answer (the C function
 * wruns.h names: it appends it to the output and names the next call).
 * Returns 0 when it stopped at a call whose argument is something else,
 * or after the last; 1 and {n = count, ...} when the call it made
 * returned anything but one number (the caller answers it); 2 when
 * answer ran out of memory; -1, having made no call, when the JIT is off
 * (looked at every 64th time) or the FFI missing.  The argument tuple:
 * count 1, then the number as pz_put_number writes it (codec_format.h);
 * NaN, integers from 2^28 and -0 as an integer are left to C, as
 * lrunrec.c's helper leaves them. */
static const char helper_src[] =
    "local std, ffi_on, FIX, POS, NEG, DBL, answer_at = ...\n"
    "local pcall, require, select, type = std.pcall, std.require, std.select, std.type\n"
    "local status = std.jit_status or function() return false end\n"
    "local ok, cast, items_t, doubles_t, answer = false\n"
    "local countdown, running, loaded = 0, false, false\n"
    "local function jit_running()\n"
    "  countdown = countdown - 1\n"
    "  if countdown < 0 then\n"
    "    countdown, running = 63, status()\n"
    "    if running and not loaded then\n"
    "      loaded = true\n"
    "      local has_ffi, ffi = pcall(require, 'ffi')\n"
    "      if ffi_on and has_ffi then\n"
    "        cast, doubles_t = ffi.cast, ffi.typeof('const double *')\n"
    "        items_t = ffi.typeof('const struct { uint64_t id; const uint8_t *args; size_t len; } *')\n"
    "        answer = cast('int (*)(double)', answer_at)\n"
    "        ok = true\n"
    "      end\n"
    "    end\n"
    "  end\n"
    "  return running and ok\n"
    "end\n"
    /* The number in the tuple of len bytes at p, or nil. */
    "local function number(p, len)\n"
    "  if len < 2 or p[0] ~= 1 then return nil end\n"
    "  local t = p[1]\n"
    "  if t >= FIX then\n"
    "    if len == 2 then return t - FIX end\n"
    "  elseif t == DBL then\n"
    "    if len == 10 then\n"
    "      local v = cast(doubles_t, p + 2)[0]\n"
    "      if v == v then return v end\n"
    "    end\n"
    "  elseif t == POS or t == NEG then\n"
    "    local v\n"
    "    local b0 = len >= 3 and p[2] or 255\n"
    "    if b0 < 128 then if len == 3 then v = b0 end\n"
    "    elseif len >= 4 then\n"
    "      local b1 = p[3]\n"
    "      if b1 < 128 then if len == 4 then v = b0 - 128 + b1 * 128 end\n"
    "      elseif len >= 5 then\n"
    "        local b2 = p[4]\n"
    "        if b2 < 128 then if len == 5 then v = b0 - 128 + (b1 - 128) * 128 + b2 * 16384 end\n"
    "        elseif len == 6 then\n"
    "          local b3 = p[5]\n"
    "          if b3 < 128 then v = b0 - 128 + (b1 - 128) * 128 + (b2 - 128) * 16384 + b3 * 2097152 end\n"
    "        end\n"
    "      end\n"
    "    end\n"
    "    if v and t == NEG then if v == 0 then return nil end return -v end\n"
    "    return v\n"
    "  end\n"
    "  return nil\n"
    "end\n"
    /* nil once a result of one number is answered, false when answer ran
     * out of memory, the values otherwise. */
    "local function settle(...)\n"
    "  if select('#', ...) == 1 then\n"
    "    local r = ...\n"
    "    if type(r) == 'number' then return answer(r) ~= 0 and false or nil end\n"
    "  end\n"
    "  return { n = select('#', ...), ... }\n"
    "end\n"
    "return function(executor, addr, next, n)\n"
    "  if not jit_running() then return -1 end\n"
    "  local items = cast(items_t, addr)\n"
    "  for k = next, n do\n"
    "    local item = items[k - 1]\n"
    "    local x = number(item.args, item.len)\n"
    "    if x == nil then return 0 end\n"
    "    local t = settle(executor(x))\n"
    "    if t ~= nil then\n"
    "      if t == false then return 2 end\n"
    "      return 1, t\n"
    "    end\n"
    "  end\n"
    "  return 0\n"
    "end\n";

void pz_wruns_prepare(lua_State *L, int (*answer)(double))
{
    if (luaL_loadbuffer(L, helper_src, sizeof helper_src - 1, "=" PZ_WRUNS_CHUNK))
        lua_error(L);
    /* The standard functions it uses, as they are now: an executor that
     * replaces them does not reach into the loop. */
    lua_createtable(L, 0, 5);
    static const char *const names[] = {"pcall", "require", "select", "type"};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        lua_getglobal(L, names[i]);
        lua_setfield(L, -2, names[i]);
    }
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
    /* A function pointer cannot travel as a data pointer in ISO C; its
     * bytes can, and the FFI casts the light userdata back. */
    void *at;
    _Static_assert(sizeof at == sizeof answer, "function pointers fit a light userdata");
    memcpy(&at, &answer, sizeof at);
    lua_pushlightuserdata(L, at);
    lua_call(L, 7, 1);
    lua_pushlightuserdata(L, (void *)&reg_helper);
    lua_insert(L, -2);
    lua_rawset(L, LUA_REGISTRYINDEX);
}

int pz_wruns_make(lua_State *L, int executor, const pz_run_item *items, size_t next, size_t n)
{
    if (!PZ_FFI_IN_PLACE || (uint64_t)(uintptr_t)(items + n) >= (UINT64_C(1) << 53))
        return PZ_WRUNS_OFF;
    lua_pushlightuserdata(L, (void *)&reg_helper);
    lua_rawget(L, LUA_REGISTRYINDEX);
    lua_pushvalue(L, executor);
    lua_pushnumber(L, (lua_Number)(uintptr_t)items);
    lua_pushnumber(L, (lua_Number)next);
    lua_pushnumber(L, (lua_Number)n);
    int top = lua_gettop(L) - 5;
    lua_call(L, 4, LUA_MULTRET);
    int got = (int)lua_tointeger(L, top + 1);
    if (got == PZ_WRUNS_VALUES) {
        /* The values replace the code: top + 1 .. top + count. */
        int count = (int)lua_tointeger(L, (lua_getfield(L, top + 2, "n"), -1));
        lua_pop(L, 1);
        if (!lua_checkstack(L, count + 1))
            luaL_error(L, "out of memory");
        for (int i = 1; i <= count; i++)
            lua_rawgeti(L, top + 2, i);
        lua_remove(L, top + 2);
        lua_remove(L, top + 1);
        return PZ_WRUNS_VALUES;
    }
    lua_settop(L, top);
    return got;
}

void pz_wruns_untrace(lua_State *L)
{
    size_t len;
    const char *tb = lua_tolstring(L, -1, &len);
    static const char line[] = "\n\t" PZ_WRUNS_CHUNK ":";
    const char *at = tb ? strstr(tb, line) : NULL;
    if (!at)
        return;
    const char *end = strchr(at + 1, '\n');
    lua_pushlstring(L, tb, (size_t)(at - tb));
    if (end)
        lua_pushstring(L, end);
    else
        lua_pushliteral(L, "");
    lua_concat(L, 2);
    lua_replace(L, -2);
}
