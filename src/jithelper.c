/*
 * jithelper.c - loading a Lua helper the JIT compiles (see jithelper.h).
 */
#include "jithelper.h"

#include <lauxlib.h>

#include "codec_format.h"
#include "le.h"

/* Protected: returns the chunk at 1 dumped without debug information and
 * loaded again as chunk `name` (upvalue 1). */
static int strip_chunk(lua_State *L)
{
    lua_getglobal(L, "string");
    lua_getfield(L, -1, "dump");
    lua_pushvalue(L, 1);
    lua_pushboolean(L, 1);
    lua_call(L, 2, 1);
    size_t n;
    const char *code = lua_tolstring(L, -1, &n);
    if (!code)
        return luaL_error(L, "string.dump returned no string");
    if (luaL_loadbuffer(L, code, n, lua_tostring(L, lua_upvalueindex(1))))
        return lua_error(L);
    return 1;
}

void pz_jit_helper_load(lua_State *L, const char *src, size_t len, const char *name, void *extra, int strip)
{
    if (luaL_loadbuffer(L, src, len, name))
        lua_error(L);
    if (strip) {
        /* What string.dump cannot do leaves the chunk as it was. */
        lua_pushstring(L, name);
        lua_pushcclosure(L, strip_chunk, 1);
        lua_pushvalue(L, -2);
        if (lua_pcall(L, 1, 1, 0) == 0)
            lua_replace(L, -2);
        else
            lua_pop(L, 1);
    }
    lua_createtable(L, 0, 9);
    static const char *const names[] = {"pcall", "require", "rawget", "select", "type"};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        lua_getglobal(L, names[i]);
        lua_setfield(L, -2, names[i]);
    }
    lua_getfield(L, LUA_REGISTRYINDEX, "_LOADED"); /* package.loaded, whatever a script calls it */
    lua_setfield(L, -2, "loaded");
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
