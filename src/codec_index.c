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
#include <string.h>

#include "codec_enc.h"

/* Registry key of the index's keeper (its address is what counts). */
static const char reg_keeper = 0;

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

/* A filter over the addresses of the objects in an index (a Bloom filter:
 * two bits an address, 16 bits an object, so that fewer than 1% of the
 * other addresses pass): the common case, the value's own tables, is told
 * apart without touching the Lua index, in little memory (every worker
 * keeps one).  An address that passes may still not be in the index, and
 * the index's keys are weak, so an address may outlive its object and come
 * back as another one's: passing is only a reason to look in the index. */
typedef struct addr_filter {
    uint64_t mask; /* bits - 1, bits a power of two */
    uint64_t word[];
} addr_filter;

/* The two bits of obj: halves of one product (Fibonacci hashing mixes the
 * aligned, clustered addresses). */
static void addr_bits(const addr_filter *f, const void *obj, uint64_t *a, uint64_t *b)
{
    uint64_t h = (uint64_t)(uintptr_t)obj * UINT64_C(0x9e3779b97f4a7c15);
    *a = (h >> 40) & f->mask;
    *b = (h >> 16) & f->mask;
}

static int addr_may_hold(const addr_filter *f, const void *obj)
{
    uint64_t a, b;
    addr_bits(f, obj, &a, &b);
    return (f->word[a >> 6] >> (a & 63) & 1) && (f->word[b >> 6] >> (b & 63) & 1);
}

/* Pushes a filter passing the addresses of the keys of the table at index. */
static void push_addr_filter(lua_State *L, int index)
{
    uint64_t n = 0, bits = 512, a, b;
    addr_filter *f;
    lua_pushnil(L);
    while (lua_next(L, index)) {
        lua_pop(L, 1);
        n++;
    }
    while (bits < 16 * n && bits < (UINT64_C(1) << 24))
        bits *= 2;
    f = (addr_filter *)lua_newuserdata(L, sizeof *f + (size_t)(bits / 64) * sizeof f->word[0]);
    f->mask = bits - 1;
    memset(f->word, 0, (size_t)(bits / 64) * sizeof f->word[0]);
    lua_pushnil(L);
    while (lua_next(L, index)) {
        addr_bits(f, lua_topointer(L, -2), &a, &b);
        f->word[a >> 6] |= UINT64_C(1) << (a & 63);
        f->word[b >> 6] |= UINT64_C(1) << (b & 63);
        lua_pop(L, 1);
    }
}

/* Pushes a new table with weak keys. */
static void push_weak_keys(lua_State *L, int nhash)
{
    lua_createtable(L, 0, nhash);
    lua_createtable(L, 0, 1);
    lua_pushliteral(L, "k");
    lua_setfield(L, -2, "__mode");
    lua_setmetatable(L, -2);
}

/* build(loaded) -> index, filter: a new index of the package.loaded given
 * (an empty one when it is not a table) and the filter of its addresses.  Module
 * values come first, so an object that is both a module and a member is
 * referred to as the module.  Weak keys: the index must not keep an
 * unloaded module alive. */
static int index_build(lua_State *L)
{
    int index;
    luaL_checkstack(L, 10, "cannot encode: stack overflow");
    lua_settop(L, 1);
    push_weak_keys(L, 64);
    index = lua_gettop(L);
    if (lua_istable(L, 1)) {
        lua_pushnil(L);
        while (lua_next(L, 1)) {
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
        while (lua_next(L, 1)) {
            if (lua_type(L, -2) == LUA_TSTRING && lua_istable(L, -1)) {
                size_t len;
                const char *name = lua_tolstring(L, -2, &len);
                index_members(L, index, lua_gettop(L), name, len);
            }
            lua_pop(L, 1);
        }
    }
    push_addr_filter(L, index);
    return 2;
}

/* The index's keeper, compiled once per state with the registry and
 * index_build: current(force) -> index, filter, rebuilt.  It keeps the index,
 * its address filter, and package.loaded as the index saw it (keys and
 * values in traversal order, held weakly: a copy must not keep an unloaded
 * module alive); it builds them again when forced, or when package.loaded
 * changed: a module loaded, dropped or replaced.  Every top-level encode
 * that meets a table or function runs it, so it is Lua: the interpreter's
 * iterator keeps its place where each lua_next call hashes its key again
 * to find it, and the loop is compiled.  An unchanged table keeps its
 * traversal order, so an equal sequence of keys and values means an
 * unchanged package.loaded; a changed one may keep its order, which the
 * values or the count then tell. */
static const char current_src[] =
    "local registry, build = ...\n"
    "local next, setmetatable, type = next, setmetatable, type\n"
    "local index, filter\n"
    "local keys = setmetatable({}, {__mode = 'v'})\n"
    "local values = setmetatable({}, {__mode = 'v'})\n"
    "local count = -1\n"
    "return function(force)\n"
    "  local loaded = registry._LOADED\n"
    "  if type(loaded) ~= 'table' then loaded = nil end\n"
    "  if index and not force then\n"
    "    local i = 0\n"
    "    if loaded then\n"
    "      for k, v in next, loaded do\n"
    "        i = i + 1\n"
    "        if keys[i] ~= k or values[i] ~= v then i = -2; break end\n"
    "      end\n"
    "    end\n"
    "    if i == count then return index, filter, false end\n"
    "  end\n"
    "  index, filter = build(loaded)\n"
    "  local n = 0\n"
    "  if loaded then\n"
    "    for k, v in next, loaded do\n"
    "      n = n + 1\n"
    "      keys[n], values[n] = k, v\n"
    "    end\n"
    "  end\n"
    "  for i = n + 1, count do keys[i], values[i] = nil, nil end\n"
    "  count = n\n"
    "  return index, filter, true\n"
    "end\n";

/* Pushes the keeper (see current_src), making it on first use. */
static void push_keeper(lua_State *L)
{
    lua_pushlightuserdata(L, (void *)&reg_keeper);
    lua_rawget(L, LUA_REGISTRYINDEX);
    if (!lua_isnil(L, -1))
        return;
    lua_pop(L, 1);
    if (luaL_loadbuffer(L, current_src, sizeof current_src - 1, "=parallelize.codec.index"))
        lua_error(L);
    lua_pushvalue(L, LUA_REGISTRYINDEX);
    lua_pushcfunction(L, index_build);
    lua_call(L, 2, 1);
    lua_pushlightuserdata(L, (void *)&reg_keeper);
    lua_pushvalue(L, -2);
    lua_rawset(L, LUA_REGISTRYINDEX);
}

/* Puts a current index and its address filter in their slots: rebuilt when
 * forced, else as the keeper finds it. */
static void index_current(enc *e, int force)
{
    lua_State *L = e->L;
    push_keeper(L);
    lua_pushboolean(L, force);
    lua_call(L, 1, 3);
    if (lua_toboolean(L, -1))
        e->index_fresh = 1;
    lua_pop(L, 1);
    e->index_filter = lua_touserdata(L, -1);
    lua_replace(L, enc_slot(e, ES_INDEX_FILTER));
    lua_replace(L, enc_slot(e, ES_INDEX));
}

/* Rebuilds the index into its slots. */
void pz_index_rebuild(enc *e)
{
    index_current(e, 1);
}

/* Makes sure the index slots hold an index that knows every module in
 * package.loaded, once per top-level encode. */
void pz_index_ready(enc *e)
{
    if (e->index_checked)
        return;
    e->index_checked = 1;
    index_current(e, 0);
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
int pz_index_put(enc *e, int idx, const void *obj)
{
    lua_State *L = e->L;
    size_t n;
    const char *s;
    for (;;) {
        if (!e->index_filter || !addr_may_hold(e->index_filter, obj))
            return 0;
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
    pz_ref_add(e, idx, obj);
    return 1;
}

/* Compiles the keeper now, while next, setmetatable and type are the
 * standard ones. */
void pz_index_prepare(lua_State *L)
{
    push_keeper(L);
    lua_pop(L, 1);
}
