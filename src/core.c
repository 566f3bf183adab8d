/*
 * core.c - luaopen_parallelize_core: the table of C functions the Lua layer
 * (lua/parallelize.lua) builds the public API from.
 */
#include <lauxlib.h>
#include <lua.h>

#include "codec.h"
#include "core.h"

static pz_preloader extra_preloader;

void pz_set_extra_preloader(pz_preloader fn)
{
    extra_preloader = fn;
}

void pz_preload(lua_State *L)
{
    lua_getglobal(L, "package");
    lua_getfield(L, -1, "preload");
    lua_pushcfunction(L, luaopen_parallelize_core);
    lua_setfield(L, -2, "parallelize.core");
    lua_pop(L, 2);
    if (extra_preloader)
        extra_preloader(L);
}

int luaopen_parallelize_core(lua_State *L)
{
    lua_newtable(L);
    pz_codec_register(L);
    return 1;
}
