/*
 * run_exec.c - the calls of a run, made inside a worker (the rules:
 * run_exec.h).
 */
#include "run_exec.h"

#include <lauxlib.h>

#include "codec.h"

/* The loop is Lua: compiled by the JIT with the executor, it costs a tiny
 * call a few nanoseconds, where a protected call from C costs tens.  Each
 * call's id is stored through the FFI before the call (one store, no C
 * function: calling one would end the trace).  Every value a call returns
 * is kept: the first in `results`, all of them in `extras` when there are
 * not exactly one, as the parent's lists want them (lrecords.c). */
static const char LOOP[] = "local ffi, running_at = ...\n"
                           "local cast, select = ffi.cast, select\n"
                           "local clear = require 'table.clear'\n"
                           "local running = cast('uint64_t *', running_at)\n"
                           "local ids\n"
                           "local items, results, extras = {}, {}, {}\n"
                           "local function keep(k, ...)\n"
                           "  results[k] = ...\n"
                           "  if select('#', ...) ~= 1 then\n"
                           "    extras[k] = { n = select('#', ...), ... }\n"
                           "  end\n"
                           "end\n"
                           "local function run(exec, from, n)\n"
                           "  for k = from, n do\n"
                           "    running[0] = ids[k - 1]\n"
                           "    keep(k, exec(items[k]))\n"
                           "  end\n"
                           "end\n"
                           "local function bind(ids_at)\n"
                           "  ids = cast('const uint64_t *', ids_at)\n"
                           "end\n"
                           "local function wipe()\n"
                           "  clear(items); clear(results); clear(extras)\n"
                           "end\n"
                           "return run, bind, items, results, extras, wipe\n";

/* Registry references to what LOOP returns, made in this process's state
 * (a worker's pool forks workers that make their own). */
static struct {
    int run, bind, items, results, extras, wipe;
    /* What pz_run_exec_load reads. */
    const pz_run_item *calls;
    const uint64_t *ids, *bound;
    size_t n;
    pz_arena_reader *reader;
} R;

int pz_run_exec_init(lua_State *L)
{
    void *running = lua_touserdata(L, 1);
    R.bound = NULL;
    if (luaL_loadbuffer(L, LOOP, sizeof LOOP - 1, "=parallelize run") != 0)
        lua_error(L);
    lua_getglobal(L, "require");
    lua_pushliteral(L, "ffi");
    lua_call(L, 1, 1);
    lua_pushlightuserdata(L, running);
    lua_call(L, 2, 6);
    R.wipe = luaL_ref(L, LUA_REGISTRYINDEX);
    R.extras = luaL_ref(L, LUA_REGISTRYINDEX);
    R.results = luaL_ref(L, LUA_REGISTRYINDEX);
    R.items = luaL_ref(L, LUA_REGISTRYINDEX);
    R.bind = luaL_ref(L, LUA_REGISTRYINDEX);
    R.run = luaL_ref(L, LUA_REGISTRYINDEX);
    return 0;
}

void pz_run_exec_prepare(const pz_run_item *calls, const uint64_t *ids, size_t n,
                         pz_arena_reader *reader)
{
    R.calls = calls;
    R.ids = ids;
    R.n = n;
    R.reader = reader;
}

int pz_run_exec_load(lua_State *L)
{
    if (R.ids != R.bound) {
        lua_rawgeti(L, LUA_REGISTRYINDEX, R.bind);
        lua_pushlightuserdata(L, (void *)R.ids);
        lua_call(L, 1, 0);
        R.bound = R.ids;
    }
    lua_rawgeti(L, LUA_REGISTRYINDEX, R.items);
    int items = lua_gettop(L);
    for (size_t k = 0; k < R.n; k++) {
        int count = pz_decode_tuple(L, R.calls[k].args, R.calls[k].len, PZ_DECODE_FUNCTIONS, R.reader);
        if (count != 1)
            return luaL_error(L, "call %f of a run has %d arguments, not one",
                              (double)R.calls[k].id, count);
        lua_rawseti(L, items, (int)k + 1);
    }
    return 0;
}

int pz_run_exec_call(lua_State *L, int handler, int exec_ref, size_t from, size_t n)
{
    lua_rawgeti(L, LUA_REGISTRYINDEX, R.run);
    lua_rawgeti(L, LUA_REGISTRYINDEX, exec_ref);
    lua_pushinteger(L, (lua_Integer)from);
    lua_pushinteger(L, (lua_Integer)n);
    return lua_pcall(L, 3, 0, handler);
}

void pz_run_exec_push_tables(lua_State *L)
{
    lua_rawgeti(L, LUA_REGISTRYINDEX, R.results);
    lua_rawgeti(L, LUA_REGISTRYINDEX, R.extras);
}

int pz_run_exec_push_result(lua_State *L, int tables, size_t k)
{
    lua_rawgeti(L, tables + 1, (int)k);
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        lua_rawgeti(L, tables, (int)k);
        return 1;
    }
    int t = lua_gettop(L);
    lua_getfield(L, t, "n");
    int count = (int)lua_tointeger(L, -1);
    lua_pop(L, 1);
    luaL_checkstack(L, count, "too many results");
    for (int i = 1; i <= count; i++)
        lua_rawgeti(L, t, i);
    lua_remove(L, t);
    return count;
}

int pz_run_exec_clear(lua_State *L)
{
    lua_rawgeti(L, LUA_REGISTRYINDEX, R.wipe);
    lua_call(L, 0, 0);
    return 0;
}
