/*
 * chunk.c - a map's chunk, run inside a worker (the rules: chunk.h).
 */
#include <lauxlib.h>
#include <lua.h>

#include "chunk.h"
#include "sys.h"

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
        lua_pushstring(L, m ? m : "error in the error handler");
        lua_pushliteral(L, "");
    }
    lua_remove(L, e);
}

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
    int64_t t0 = pz_now_ns();
    int failed = 0;
    for (int k = 1; k <= n; k++) {
        lua_pushvalue(L, exec);
        lua_rawgeti(L, items, k);
        if (lua_pcall(L, 1, 1, handler) != 0) {
            failed = k;
            break;
        }
        lua_rawseti(L, results, k);
    }
    lua_pushnumber(L, (lua_Number)(pz_now_ns() - t0) / 1e9);
    if (failed) {
        /* results, error, seconds -> results, seconds, k, message, traceback */
        lua_insert(L, -2);
        lua_pushinteger(L, failed);
        lua_insert(L, -2);
        push_message_and_traceback(L);
    }
    /* The executor and the arguments give way to the answer. */
    for (int i = 0; i < 3; i++)
        lua_remove(L, exec);
    return lua_gettop(L) - handler;
}
