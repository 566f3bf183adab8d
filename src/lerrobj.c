/*
 * lerrobj.c - an error value that is not a string, as text (see lerrobj.h).
 */
#include "lerrobj.h"

#include <lauxlib.h>

int pz_error_tostring(lua_State *L, int idx)
{
    if (!luaL_getmetafield(L, idx, "__tostring"))
        return 0;
    lua_pushvalue(L, idx);
    if (lua_pcall(L, 1, 1, 0) != 0) {
        const char *why = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : NULL;
        lua_pushfstring(L, "(error object is a %s value; its __tostring raised: %s)", luaL_typename(L, idx),
                        why ? why : luaL_typename(L, -1));
        lua_remove(L, -2);
    }
    return 1;
}
