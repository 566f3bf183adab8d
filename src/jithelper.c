/*
 * jithelper.c - loading a Lua helper the JIT compiles (see jithelper.h).
 */
#include "jithelper.h"

#include <lauxlib.h>

#include "codec_format.h"
#include "le.h"

/* Protected: returns the chunk at 1 dumped without debug information by
 * string.dump (upvalue 2, as it was when the standard functions were
 * taken) and loaded again as chunk `name` (upvalue 1). */
static int strip_chunk(lua_State *L)
{
    lua_pushvalue(L, lua_upvalueindex(2));
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

void pz_jit_helper_std(lua_State *L)
{
    lua_createtable(L, 0, 12);
    static const char *const names[] = {"pcall", "require", "rawget", "select", "type"};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        lua_getglobal(L, names[i]);
        lua_setfield(L, -2, names[i]);
    }
    lua_getfield(L, LUA_REGISTRYINDEX, "_LOADED"); /* package.loaded, whatever a script calls it */
    lua_setfield(L, -2, "loaded");
    static const struct {
        const char *lib, *name, *as;
    } fields[] = {{"jit", "status", "jit_status"}, {"jit", "flush", "jit_flush"}, {"string", "dump", "dump"}};
    for (size_t i = 0; i < sizeof fields / sizeof fields[0]; i++) {
        lua_getglobal(L, fields[i].lib);
        if (lua_istable(L, -1))
            lua_getfield(L, -1, fields[i].name);
        else
            lua_pushnil(L);
        lua_setfield(L, -3, fields[i].as);
        lua_pop(L, 1);
    }
    /* The codec's tags of numbers (codec_format.h). */
    static const struct {
        const char *name;
        int tag;
    } tags[] = {{"FIX", PZ_T_FIXINT}, {"POS", PZ_T_POSINT}, {"NEG", PZ_T_NEGINT}, {"DBL", PZ_T_DOUBLE}};
    for (size_t i = 0; i < sizeof tags / sizeof tags[0]; i++) {
        lua_pushinteger(L, tags[i].tag);
        lua_setfield(L, -2, tags[i].name);
    }
}

void pz_jit_helper_load(lua_State *L, int std, const char *src, size_t len, const char *name, void *extra,
                        int strip)
{
    std = std < 0 ? lua_gettop(L) + std + 1 : std;
    if (luaL_loadbuffer(L, src, len, name))
        lua_error(L);
    lua_getfield(L, std, "dump");
    if (strip && lua_isfunction(L, -1)) {
        /* What string.dump cannot do leaves the chunk as it was. */
        lua_pushstring(L, name);
        lua_insert(L, -2);
        lua_pushcclosure(L, strip_chunk, 2);
        lua_pushvalue(L, -2);
        if (lua_pcall(L, 1, 1, 0) == 0)
            lua_replace(L, -2);
        else
            lua_pop(L, 1);
    } else {
        lua_pop(L, 1);
    }
    lua_pushvalue(L, std);
    lua_pushboolean(L, PZ_FFI_IN_PLACE);
    if (extra)
        lua_pushlightuserdata(L, extra);
    else
        lua_pushnil(L);
    lua_call(L, 3, 1);
}

/* The FFI's loader in package.preload, wrapped: notes in the table of
 * standard functions (upvalue 1) that something required the FFI, then
 * calls the loader (upvalue 2). */
static int watched_loader(lua_State *L)
{
    lua_pushboolean(L, 1);
    lua_setfield(L, lua_upvalueindex(1), "ffi_required");
    lua_pushvalue(L, lua_upvalueindex(2));
    lua_insert(L, 1);
    lua_call(L, lua_gettop(L) - 1, LUA_MULTRET);
    return lua_gettop(L);
}

void pz_jit_helper_watch(lua_State *L, int std)
{
    std = std < 0 ? lua_gettop(L) + std + 1 : std;
    lua_getglobal(L, "package");
    if (lua_istable(L, -1)) {
        lua_getfield(L, -1, "preload");
        if (lua_istable(L, -1)) {
            lua_getfield(L, -1, "ffi");
            if (lua_isfunction(L, -1)) {
                lua_pushvalue(L, std);
                lua_insert(L, -2);
                lua_pushcclosure(L, watched_loader, 2);
                lua_setfield(L, -2, "ffi");
            } else {
                lua_pop(L, 1);
            }
        }
        lua_pop(L, 1);
    }
    lua_pop(L, 1);
}
