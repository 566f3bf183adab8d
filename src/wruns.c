/*
 * wruns.c - a run's calls whose argument is one number, made by a Lua
 * loop the JIT compiles (see wruns.h for why and the rules).
 */
#include "wruns.h"

#include <lauxlib.h>
#include <stddef.h>
#include <string.h>

#include "jithelper.h"
#include "le.h"

/* The helper reads pz_run_item through the FFI as a struct of the same
 * members, of the same types, in the same order (uint64_t, a pointer,
 * size_t), which the FFI lays out by the platform's rules, as the C
 * compiler does. */

/* Registry key of the helper (its address is what counts). */
static const char reg_helper = 0;

/* make(executor, addr, next, n) -> 0 | 1, values | 2 | -1
 *
 * Makes the calls items[next..n] of the run at address addr (a number:
 * the JIT compiles its conversion to a pointer), the executor each time
 * with the one number its argument tuple holds, as long as it holds one
 * that jithelper.h's number() reads, and hands each result that is one
 * number to answer (the C function wruns.h names: it appends it to the
 * output and names the next call).  Returns 0 when it stopped at a call
 * whose argument it leaves to C, or after the last; 1 and
 * {n = count, ...} when the call it made returned anything but one
 * number (the caller answers it); 2 when answer ran out of memory; -1,
 * having made no call, when the JIT is off or the FFI missing.
 *
 * No cdata of the loop lives across the executor's call: the items'
 * pointer is made again for each call, from locals the JIT folds (cast
 * from the upvalues, loaded again after each answer, it cost 2.5 ns a
 * call), and the item read goes out of scope before the call (a local in
 * scope stays in every snapshot taken in the calls below it; out of
 * scope, its slot goes to the call).  Should the executor load the FFI
 * anew, the exit at ffi_moved() would otherwise rebuild that cdata under
 * the new state's types, with a type number of the old one. */
static const char helper_src[] =
    PZ_JIT_HELPER_PRELUDE
    "local items_t, answer\n"
    "on_ffi = function(ffi)\n"
    "  items_t = ffi.typeof('const struct { uint64_t id; const uint8_t *args; size_t len; } *')\n"
    "  answer = ffi.cast('int (*)(double)', extra)\n"
    "end\n"
    /* nil once a result of one number is answered, false when answer ran
     * out of memory, the values otherwise: also when the executor loaded
     * the FFI anew, whose state the helper's types no longer name (the
     * next make takes it again). */
    "local function settle(...)\n"
    "  if select('#', ...) == 1 then\n"
    "    local r = ...\n"
    "    if type(r) == 'number' and not ffi_moved() then\n"
    "      if answer(r) ~= 0 then return false end\n"
    "      return nil\n"
    "    end\n"
    "  end\n"
    "  return { n = select('#', ...), ... }\n"
    "end\n"
    "return function(executor, addr, next, n)\n"
    "  if not jit_running() then return -1 end\n"
    "  local cast_, items_t_ = cast, items_t\n"
    "  for k = next, n do\n"
    "    local x\n"
    "    do\n"
    "      local item = cast_(items_t_, addr)[k - 1]\n"
    "      x = number(item.args, 0, item.len)\n"
    "    end\n"
    "    if x == nil then return 0 end\n"
    "    local t = settle(executor(x))\n"
    "    if t ~= nil then\n"
    "      if t == false then return 2 end\n"
    "      return 1, t\n"
    "    end\n"
    "  end\n"
    "  return 0\n"
    "end\n";

/* Registry key of the standard functions the helper will use, taken
 * before the executor's code ran (pz_wruns_prepare). */
static const char reg_std = 0;

/* What the helper hands results to. */
static int (*answer_fn)(double);

/* Registry key of load_helper, made at start-up: pushing a C function
 * allocates, and the first time may come with no memory left. */
static const char reg_loader = 0;

/* Loading the helper failed (memory): C makes every call from then on. */
static int load_failed;

static int load_helper(lua_State *L);

void pz_wruns_prepare(lua_State *L, int (*answer)(double))
{
    answer_fn = answer;
    lua_pushlightuserdata(L, (void *)&reg_std);
    pz_jit_helper_std(L);
    pz_jit_helper_watch(L, -1);
    lua_rawset(L, LUA_REGISTRYINDEX);
    lua_pushlightuserdata(L, (void *)&reg_loader);
    lua_pushcfunction(L, load_helper);
    lua_rawset(L, LUA_REGISTRYINDEX);
}

/* Protected: loads the helper with the standard functions taken before
 * the executor's code ran, and keeps it in the registry. */
static int load_helper(lua_State *L)
{
    /* A function pointer cannot travel as a data pointer in ISO C; its
     * bytes can, and the FFI casts the light userdata back. */
    void *at;
    _Static_assert(sizeof at == sizeof answer_fn, "function pointers fit a light userdata");
    memcpy(&at, &answer_fn, sizeof at);
    lua_pushlightuserdata(L, (void *)&reg_helper);
    lua_pushlightuserdata(L, (void *)&reg_std);
    lua_rawget(L, LUA_REGISTRYINDEX);
    pz_jit_helper_load(L, -1, helper_src, sizeof helper_src - 1, "=" PZ_WRUNS_CHUNK, at, 1);
    lua_remove(L, -2);
    lua_rawset(L, LUA_REGISTRYINDEX);
    return 0;
}

int pz_wruns_make(lua_State *L, int executor, const pz_run_item *items, size_t next, size_t n)
{
    if (!PZ_FFI_IN_PLACE || load_failed || (uint64_t)(uintptr_t)(items + n) >= (UINT64_C(1) << 53))
        return PZ_WRUNS_OFF;
    lua_pushlightuserdata(L, (void *)&reg_helper);
    lua_rawget(L, LUA_REGISTRYINDEX);
    if (lua_isnil(L, -1)) {
        /* The first time it is asked (worker.c asks after HELPER_AFTER
         * calls in runs): the helper is loaded now (a worker that makes
         * few calls pays for neither it nor the FFI).  Should that fail
         * (memory), C makes the calls from then on: trying again at
         * each run made the first call of each fail for memory. */
        lua_pop(L, 1);
        lua_pushlightuserdata(L, (void *)&reg_loader);
        lua_rawget(L, LUA_REGISTRYINDEX);
        if (lua_pcall(L, 0, 0, 0) != 0) {
            lua_pop(L, 1);
            load_failed = 1;
            return PZ_WRUNS_OFF;
        }
        lua_pushlightuserdata(L, (void *)&reg_helper);
        lua_rawget(L, LUA_REGISTRYINDEX);
    }
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

/* The helper's frame in a traceback, as luaL_traceback writes it for a
 * chunk without debug information (pz_jit_helper_load's strip). */
static const char helper_frame[] = "\n\t" PZ_WRUNS_CHUNK ": in function <" PZ_WRUNS_CHUNK ":0>";

/* What error(message, 2) in the executor puts before its message: the
 * position of its caller, the helper, which has no lines. */
static const char helper_where[] = PZ_WRUNS_CHUNK ":0: ";

void pz_wruns_untrace(lua_State *L)
{
    size_t len;
    const char *tb = lua_tolstring(L, -1, &len);
    const char *at = tb ? strstr(tb, helper_frame) : NULL;
    if (!at)
        return;
    lua_pushlstring(L, tb, (size_t)(at - tb));
    lua_pushstring(L, at + sizeof helper_frame - 1);
    lua_concat(L, 2);
    lua_replace(L, -2);
}

void pz_wruns_unwhere(lua_State *L, int index)
{
    size_t len;
    if (index < 0)
        index = lua_gettop(L) + index + 1;
    if (lua_type(L, index) != LUA_TSTRING)
        return;
    const char *m = lua_tolstring(L, index, &len);
    if (len < sizeof helper_where - 1 || memcmp(m, helper_where, sizeof helper_where - 1) != 0)
        return;
    lua_pushlstring(L, m + sizeof helper_where - 1, len - (sizeof helper_where - 1));
    lua_replace(L, index);
}
