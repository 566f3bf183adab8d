/*
 * codec_index.c - the module index: objects reachable from package.loaded
 * -> the bytes of their PZ_T_MODULE or PZ_T_MEMBER reference.
 *
 * A module table, or a C function, cannot travel by value (a C function not
 * at all), and a module's tables and functions should arrive as the
 * receiving state's own; so the encoder writes what package.loaded holds as
 * a name.  The index is built from package.loaded and cached in the
 * registry.  A top-level encode that meets a table or function compares,
 * once, package.loaded with the copy of it the index was built from, and
 * rebuilds the index when a module was loaded, dropped or replaced since,
 * so that a module required a moment ago travels by reference.  Building
 * visits every member of every module, so it is not done otherwise, except
 * once for a C function the index does not know (which could not travel at
 * all); and a hit is checked against package.loaded before it is used, so
 * that a member reassigned since is not sent as a reference to its
 * successor.  A Lua function added to a loaded module after the index was
 * built travels by value.
 */
#include <lauxlib.h>
#include <lua.h>
#include <stdint.h>

#include "codec_enc.h"

/* Registry key of the index table (its address is what counts). */
static const char reg_index = 0;
/* Registry key of the Lua helper that compares package.loaded. */
static const char reg_same = 0;

/* Pushes the bytes of a reference: PZ_T_MODULE name, or PZ_T_MEMBER name key
 * when key is not NULL. */
static void push_ref_bytes(lua_State *L, const char *name, size_t n, const char *key, size_t kn)
{
    luaL_Buffer b;
    uint8_t tmp[PZ_VARINT_MAX_BYTES];
    luaL_buffinit(L, &b);
    luaL_addchar(&b, (char)(key ? PZ_T_MEMBER : PZ_T_MODULE));
    luaL_addlstring(&b, (const char *)tmp, pz_put_varint(tmp, n));
    luaL_addlstring(&b, name, n);
    if (key) {
        luaL_addlstring(&b, (const char *)tmp, pz_put_varint(tmp, kn));
        luaL_addlstring(&b, key, kn);
    }
    luaL_pushresult(&b);
}

/* index[value at -1] = bytes at -2 unless already set; pops both. */
static void index_set_new(lua_State *L, int index)
{
    lua_pushvalue(L, -1);
    lua_rawget(L, index);
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        lua_insert(L, -2);
        lua_rawset(L, index);
    } else {
        lua_pop(L, 3);
    }
}

/* Adds the members of the module table at stack index mod (named name)
 * that are functions or tables.  From the globals table only C functions
 * are taken: a user's global would not exist in a fresh state. */
static void index_members(lua_State *L, int index, int mod, const char *name, size_t n)
{
    int only_c;
    lua_pushvalue(L, mod);
    only_c = lua_rawequal(L, -1, LUA_GLOBALSINDEX);
    lua_pop(L, 1);
    lua_pushnil(L);
    while (lua_next(L, mod)) {
        int t = lua_type(L, -1);
        if (lua_type(L, -2) == LUA_TSTRING &&
            (only_c ? lua_iscfunction(L, -1) : (t == LUA_TTABLE || t == LUA_TFUNCTION))) {
            size_t kn;
            const char *k = lua_tolstring(L, -2, &kn);
            push_ref_bytes(L, name, n, k, kn);
            lua_pushvalue(L, -2);
            index_set_new(L, index);
        }
        lua_pop(L, 1);
    }
}

/* Tells whether package.loaded still holds what it held when the index was
 * built: called as same(loaded, snapshot, n), the snapshot being a copy of
 * package.loaded taken then and n its size; any module loaded, dropped or
 * replaced since makes it false.  Comparing sizes alone would miss one
 * module dropped and another loaded.  A Lua loop, because every encode that
 * meets a table runs it: each lua_next call hashes its key again to find
 * where it stopped, where the interpreter's iterator keeps its place, which
 * makes the loop several times cheaper. */
static const char same_src[] =
    "local next, rawget = next, rawget\n"
    "return function(loaded, snapshot, n)\n"
    "  for k, v in next, loaded do\n"
    "    if rawget(snapshot, k) ~= v then return false end\n"
    "    n = n - 1\n"
    "  end\n"
    "  return n == 0\n"
    "end\n";

/* True when package.loaded (at stack index loaded) is as the index (at
 * stack index index) saw it: see same_src. */
static int loaded_unchanged(lua_State *L, int loaded, int index)
{
    int same;
    lua_rawgeti(L, index, 1);
    if (!lua_istable(L, -1)) {
        lua_pop(L, 1);
        return 0;
    }
    pz_codec_push_helper(L, &reg_same, same_src, sizeof same_src - 1);
    lua_insert(L, -2);
    lua_pushvalue(L, loaded);
    lua_insert(L, -2);
    lua_rawgeti(L, index, 0);
    lua_call(L, 3, 1);
    same = lua_toboolean(L, -1);
    lua_pop(L, 1);
    return same;
}

/* Pushes a new table with weak keys ("k") or values ("v"). */
static void push_weak_table(lua_State *L, const char *mode, int nhash)
{
    lua_createtable(L, 0, nhash);
    lua_createtable(L, 0, 1);
    lua_pushstring(L, mode);
    lua_setfield(L, -2, "__mode");
    lua_setmetatable(L, -2);
}

/* Builds a new index from package.loaded, stores it in the registry and
 * pushes it.  Module values come first, so an object that is both a module
 * and a member is referred to as the module.  index[1] keeps a copy of
 * package.loaded and index[0] its size, for loaded_unchanged.  Weak keys
 * (and values in the copy): the index must not keep an unloaded module
 * alive. */
static void index_build(lua_State *L)
{
    int index, loaded;
    luaL_checkstack(L, 10, "cannot encode: stack overflow");
    push_weak_table(L, "k", 64);
    index = lua_gettop(L);
    lua_getfield(L, LUA_REGISTRYINDEX, "_LOADED");
    loaded = lua_gettop(L);
    if (lua_istable(L, loaded)) {
        int n = 0;
        push_weak_table(L, "v", 32);
        lua_pushnil(L);
        while (lua_next(L, loaded)) {
            lua_pushvalue(L, -2);
            lua_pushvalue(L, -2);
            lua_rawset(L, -5);
            lua_pop(L, 1);
            n++;
        }
        lua_rawseti(L, index, 1);
        lua_pushinteger(L, n);
        lua_rawseti(L, index, 0);
        lua_pushnil(L);
        while (lua_next(L, loaded)) {
            int t = lua_type(L, -1);
            if (lua_type(L, -2) == LUA_TSTRING && (t == LUA_TTABLE || t == LUA_TFUNCTION)) {
                size_t len;
                const char *name = lua_tolstring(L, -2, &len);
                push_ref_bytes(L, name, len, NULL, 0);
                lua_pushvalue(L, -2);
                index_set_new(L, index);
            }
            lua_pop(L, 1);
        }
        lua_pushnil(L);
        while (lua_next(L, loaded)) {
            if (lua_type(L, -2) == LUA_TSTRING && lua_istable(L, -1)) {
                size_t len;
                const char *name = lua_tolstring(L, -2, &len);
                index_members(L, index, lua_gettop(L), name, len);
            }
            lua_pop(L, 1);
        }
    }
    lua_pop(L, 1);
    lua_pushlightuserdata(L, (void *)&reg_index);
    lua_pushvalue(L, index);
    lua_rawset(L, LUA_REGISTRYINDEX);
}

/* Rebuilds the index into its slot. */
void pz_index_rebuild(enc *e)
{
    index_build(e->L);
    lua_replace(e->L, enc_slot(e, ES_INDEX));
    e->index_fresh = 1;
}

/* Makes sure the index slot holds an index that knows every module in
 * package.loaded: loads the cached one, and rebuilds it when there is none
 * or, once per top-level encode, when package.loaded changed. */
void pz_index_ready(enc *e)
{
    lua_State *L = e->L;
    int stale;
    if (!lua_isnil(L, enc_slot(e, ES_INDEX)) && e->index_checked)
        return;
    e->index_checked = 1;
    lua_pushlightuserdata(L, (void *)&reg_index);
    lua_rawget(L, LUA_REGISTRYINDEX);
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        pz_index_rebuild(e);
        return;
    }
    lua_replace(L, enc_slot(e, ES_INDEX));
    if (e->index_fresh)
        return;
    lua_getfield(L, LUA_REGISTRYINDEX, "_LOADED");
    stale = lua_istable(L, -1) && !loaded_unchanged(L, lua_gettop(L), enc_slot(e, ES_INDEX));
    lua_pop(L, 1);
    if (stale)
        pz_index_rebuild(e);
}

/* Reads one name (varint length, bytes) of the reference bytes [*p, end). */
static int ref_name(const uint8_t **p, const uint8_t *end, const char **name, size_t *n)
{
    uint64_t len;
    if (pz_get_varint(p, end, &len) || len > (uint64_t)(end - *p))
        return -1;
    *name = (const char *)*p;
    *n = (size_t)len;
    *p += len;
    return 0;
}

/* True when the reference bytes s[0..n) (see push_ref_bytes) still name the
 * object at idx in package.loaded: the index may be older than a module
 * replaced under the same name, or a member reassigned. */
static int ref_still_names(lua_State *L, const char *s, size_t n, int idx)
{
    const uint8_t *p = (const uint8_t *)s + 1, *end = (const uint8_t *)s + n;
    const char *name, *key = NULL;
    size_t nlen, klen = 0;
    int same;
    if (ref_name(&p, end, &name, &nlen) ||
        ((uint8_t)s[0] == PZ_T_MEMBER && ref_name(&p, end, &key, &klen)))
        return 0;
    lua_getfield(L, LUA_REGISTRYINDEX, "_LOADED");
    if (!lua_istable(L, -1)) {
        lua_pop(L, 1);
        return 0;
    }
    lua_pushlstring(L, name, nlen);
    lua_rawget(L, -2);
    if (key) {
        if (!lua_istable(L, -1)) {
            lua_pop(L, 2);
            return 0;
        }
        lua_pushlstring(L, key, klen);
        lua_rawget(L, -2);
        lua_remove(L, -2);
    }
    same = lua_rawequal(L, -1, idx);
    lua_pop(L, 2);
    return same;
}

/* Looks the object at idx up in the index; when it is there and still
 * named so in package.loaded, writes its reference, gives it a reference
 * number and returns 1; else returns 0.  A stale hit rebuilds the index
 * (once per top-level encode) and looks again. */
int pz_index_put(enc *e, int idx)
{
    lua_State *L = e->L;
    size_t n;
    const char *s;
    for (;;) {
        lua_pushvalue(L, idx);
        lua_rawget(L, enc_slot(e, ES_INDEX));
        if (lua_type(L, -1) != LUA_TSTRING) {
            lua_pop(L, 1);
            return 0;
        }
        s = lua_tolstring(L, -1, &n);
        if (ref_still_names(L, s, n, idx))
            break;
        lua_pop(L, 1);
        if (e->index_fresh)
            return 0;
        pz_index_rebuild(e);
    }
    put_bytes(e, s, n);
    lua_pop(L, 1);
    pz_ref_add(e, idx);
    return 1;
}

/* Compiles the Lua helper now, while next and rawget are the standard ones. */
void pz_index_prepare(lua_State *L)
{
    pz_codec_push_helper(L, &reg_same, same_src, sizeof same_src - 1);
    lua_pop(L, 1);
}
