/*
 * jithelper.c - loading a Lua helper the JIT compiles (see jithelper.h).
 */
#include "jithelper.h"

#include <lauxlib.h>

#include "codec_format.h"
#include "le.h"

void pz_jit_helper_load(lua_State *L, const char *src, size_t len, const char *name, void *extra)
{
    if (luaL_loadbuffer(L, src, len, name))
        lua_error(L);
    lua_createtable(L, 0, 9);
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
    /* The codec's tags of numbers (codec_format.h). */
    static const struct {
        const char *name;
        int tag;
    } tags[] = {{"FIX", PZ_T_FIXINT}, {"POS", PZ_T_POSINT}, {"NEG", PZ_T_NEGINT}, {"DBL", PZ_T_DOUBLE}};
    for (size_t i = 0; i < sizeof tags / sizeof tags[0]; i++) {
        lua_pushinteger(L, tags[i].tag);
        lua_setfield(L, -2, tags[i].name);
    }
    lua_pushboolean(L, PZ_FFI_IN_PLACE);
    if (extra)
        lua_pushlightuserdata(L, extra);
    else
        lua_pushnil(L);
    lua_call(L, 3, 1);
}
