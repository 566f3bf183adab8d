/*
 * chunk.c - a map's chunk, run inside a worker (the rules: chunk.h).
 */
#include <lauxlib.h>
#include <lua.h>

#include "chunk.h"
#include "sys.h"
#include "worker.h"

/* Pushes the message and traceback of the error value on top (worker.c's
 * on_error makes it {message, traceback, value}; out of memory or an error
 * in the handler leave a bare string), popping it. */
static void push_message_and_traceback(lua_State *L)
{
    int e = lua_gettop(L);
    if (lua_istable(L, e)) {
        lua_rawgeti(L, e, 1);
        lua_rawgeti(L, e, 2);
    } else {
        const char *m = lua_tostring(L, e);
        char whose[256];
        lua_pushstring(L, m ? pz_worker_whose_memory(m, whose, sizeof whose)
                            : "error in the error handler");
        lua_pushliteral(L, "");
    }
    lua_remove(L, e);
}

/* The loop itself is Lua: compiled by the JIT with the executor, a chunk of
 * tiny calls costs a few nanoseconds an item, where a protected call from C
 * for each costs tens.  `at[1]` says which item is running when one raises. */
static const char RUNNER[] = "local exec, items, n, results, at = ...\n"
                             "for k = 1, n do\n"
                             "  at[1] = k\n"
                             "  results[k] = exec(items[k])\n"
                             "end\n";

/* The compiled RUNNER sits in the registry under this address, made at the
 * first chunk.  A key, not a process-wide luaL_ref number: a worker's
 * executor may start a pool of its own, whose workers are forked from this
 * process with a fresh Lua state, where a number kept from this one would
 * name some other value. */
static const char runner_key = 0;

int pz_chunk_run(lua_State *L, int handler, int nargs)
{
    int exec = handler + 1, items = handler + 2, count = handler + 3;
    if (nargs != 2 || !lua_istable(L, items) || lua_type(L, count) != LUA_TNUMBER)
        return luaL_error(L, "a chunk's arguments must be (items, n)");
    lua_Number nn = lua_tonumber(L, count);
    if (!(nn >= 0 && nn <= (lua_Number)(1 << 30)))
        return luaL_error(L, "a chunk's n is out of range");
    int n = (int)nn;
    lua_createtable(L, n, 0);
    int results = lua_gettop(L);
    lua_createtable(L, 1, 0);
    int at = lua_gettop(L);
    lua_pushlightuserdata(L, (void *)&runner_key);
    lua_rawget(L, LUA_REGISTRYINDEX);
    if (!lua_isfunction(L, -1)) {
        lua_pop(L, 1);
        if (luaL_loadbuffer(L, RUNNER, sizeof RUNNER - 1, "=parallelize map chunk") != 0)
            return lua_error(L);
        lua_pushlightuserdata(L, (void *)&runner_key);
        lua_pushvalue(L, -2);
        lua_rawset(L, LUA_REGISTRYINDEX);
    }
    lua_pushvalue(L, exec);
    lua_pushvalue(L, items);
    lua_pushinteger(L, n);
    lua_pushvalue(L, results);
    lua_pushvalue(L, at);
    int64_t t0 = pz_now_ns();
    int rc = lua_pcall(L, 5, 0, handler);
    lua_Number seconds = (lua_Number)(pz_now_ns() - t0) / 1e9;
    if (rc == 0) {
        lua_pop(L, 1); /* at */
        lua_pushnumber(L, seconds);
    } else {
        /* results, at, error -> results, seconds, k, message, traceback */
        lua_rawgeti(L, at, 1);
        lua_Integer k = lua_tointeger(L, -1);
        lua_pop(L, 1);
        lua_remove(L, at);
        lua_pushnumber(L, seconds);
        lua_insert(L, -2);
        lua_pushinteger(L, k);
        lua_insert(L, -2);
        push_message_and_traceback(L);
        /* The items before k ran; what the one that raised left is not a
         * result (the runner stored nothing for it). */
    }
    /* The executor and the arguments give way to the answer. */
    for (int i = 0; i < 3; i++)
        lua_remove(L, exec);
    return lua_gettop(L) - handler;
}
