/*
 * codec_layout.c - the probe of LuaJIT's object layout (codec_layout.h):
 * objects of every kind the codec reads directly are made with the C API,
 * then read both ways; the layout counts as known only when every reading
 * agrees.
 */
#include <lauxlib.h>
#include <lua.h>
#include <stdint.h>
#include <string.h>

#include "codec_layout.h"

/* 1: known, 0: not, -1: not probed yet.  Every state of a process is the
 * same LuaJIT, so the first probe answers for all. */
_Atomic int pz_layout_state = -1;

_Atomic int pz_str_len_offset = 16;

/* True when the value v read directly is the value at stack index idx. */
static int same_value(lua_State *L, int idx, pz_tv v)
{
    switch (lua_type(L, idx)) {
    case LUA_TNIL:
        return pz_tv_isnil(v);
    case LUA_TBOOLEAN:
        return pz_tv_tag(v) == (lua_toboolean(L, idx) ? PZ_TAG_TRUE : PZ_TAG_FALSE);
    case LUA_TNUMBER: {
        double d = lua_tonumber(L, idx);
        return pz_tv_isnum(v) && (pz_tv_num(v) == d || (d != d && pz_tv_num(v) != pz_tv_num(v)));
    }
    case LUA_TSTRING: {
        size_t n;
        const char *s = lua_tolstring(L, idx, &n);
        const uint8_t *o = pz_tv_obj(v);
        return pz_tv_tag(v) == PZ_TAG_STR && o == lua_topointer(L, idx) &&
               pz_str_len(o) == n && pz_str_data(o) == s;
    }
    case LUA_TTABLE:
        return pz_tv_tag(v) == PZ_TAG_TAB && pz_tv_obj(v) == lua_topointer(L, idx);
    case LUA_TFUNCTION:
        return pz_tv_tag(v) == PZ_TAG_FUNC && pz_tv_obj(v) == lua_topointer(L, idx);
    case LUA_TUSERDATA:
        return pz_tv_tag(v) == PZ_TAG_UDATA;
    default:
        return 0;
    }
}

/* Walks the table at t directly, in lua_next's order (the array slots, then
 * the nodes), checking each entry against lua_next's; true when both walks
 * agree entry for entry and end together. */
static int same_walk(lua_State *L, int t)
{
    const uint8_t *g = lua_topointer(L, t);
    const pz_tv *array = pz_tab_array(g);
    const uint8_t *nodes = pz_tab_nodes(g);
    uint32_t asize = pz_tab_asize(g), slots = pz_tab_hmask(g) + 1;
    uint64_t i = 0, end = (uint64_t)asize + slots;
    int ok = 1;
    lua_pushnil(L);
    while (ok && lua_next(L, t)) {
        pz_tv key = 0, val = ~UINT64_C(0);
        int in_array = 0;
        for (; i < end && pz_tv_isnil(val); i++) {
            in_array = i < asize;
            if (in_array) {
                val = array[i];
            } else {
                val = pz_node_val(nodes + (i - asize) * PZ_NODE_SIZE);
                key = pz_node_key(nodes + (i - asize) * PZ_NODE_SIZE);
            }
        }
        if (pz_tv_isnil(val)) {
            ok = 0;
        } else if (in_array) { /* key i - 1 */
            ok = lua_type(L, -2) == LUA_TNUMBER && lua_tonumber(L, -2) == (double)(i - 1) &&
                 same_value(L, -1, val);
        } else {
            ok = same_value(L, -2, key) && same_value(L, -1, val);
        }
        lua_pop(L, 1);
    }
    if (!ok) {
        lua_pop(L, 1); /* the key lua_next left */
        return 0;
    }
    for (; i < end; i++) /* nothing lua_next did not see */
        if (!pz_tv_isnil(i < asize ? array[i]
                                   : pz_node_val(nodes + (i - asize) * PZ_NODE_SIZE)))
            return 0;
    return 1;
}

static int probe_cfunction(lua_State *L)
{
    (void)L;
    return 0;
}

/* Finds where strings keep their length: the offset where strings of
 * several lengths all read their own; 0 when neither does. */
static int probe_str_len(lua_State *L)
{
    static const int offsets[] = {16, 20};
    static const size_t lengths[] = {0, 1, 7, 31, 1000};
    static const char bytes[1000];
    for (size_t o = 0; o < sizeof offsets / sizeof *offsets; o++) {
        int ok = 1;
        for (size_t i = 0; ok && i < sizeof lengths / sizeof *lengths; i++) {
            uint32_t n;
            lua_pushlstring(L, bytes, lengths[i]);
            lua_pushinteger(L, (lua_Integer)i); /* strings of one length differ */
            lua_concat(L, 2);
            const uint8_t *s = lua_topointer(L, -1);
            size_t len;
            const char *data = lua_tolstring(L, -1, &len);
            memcpy(&n, s + offsets[o], sizeof n);
            ok = s && n == len && (const uint8_t *)data == s + PZ_STR_DATA;
            lua_pop(L, 1);
        }
        if (ok)
            return offsets[o];
    }
    return 0;
}

/* Makes the probe's objects and compares: a table of 3 array slots (a
 * number, a string, true) and 4 hash slots (false, a table, a C function,
 * a userdata under string keys), NaN and -0 in a second table with a
 * number key in its hash part, an empty table, and the metatable. */
static int probe(lua_State *L)
{
    static const char text[] = "parallelize layout probe";
    const uint8_t *g;
    int ok, top = lua_gettop(L);
    if (sizeof(void *) != 8 || !lua_checkstack(L, 12))
        return 0;
#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
    return 0;
#endif
    int len_offset = probe_str_len(L);
    if (!len_offset)
        return 0;
    pz_str_len_offset = len_offset; /* every prober finds the same */
    lua_pushlstring(L, text, sizeof text - 1);
    int str = lua_gettop(L);
    lua_createtable(L, 3, 4);
    int t = lua_gettop(L);
    lua_pushnumber(L, 1.5);
    lua_rawseti(L, t, 1);
    lua_pushvalue(L, str);
    lua_rawseti(L, t, 2);
    lua_pushboolean(L, 1);
    lua_rawseti(L, t, 3);
    lua_pushliteral(L, "k");
    lua_pushboolean(L, 0);
    lua_rawset(L, t);
    lua_pushliteral(L, "m");
    lua_createtable(L, 0, 0);
    lua_rawset(L, t);
    lua_pushliteral(L, "f");
    lua_pushcfunction(L, probe_cfunction);
    lua_rawset(L, t);
    lua_pushliteral(L, "u");
    lua_newuserdata(L, 1);
    lua_rawset(L, t);
    g = lua_topointer(L, t);
    ok = g && pz_tab_asize(g) == 4 && pz_tab_hmask(g) == 3 && !pz_tab_has_meta(g) &&
         pz_tv_isnil(pz_tab_array(g)[0]) && same_walk(L, t);
    lua_createtable(L, 0, 0);
    int mt = lua_gettop(L);
    if (ok) {
        g = lua_topointer(L, mt);
        ok = pz_tab_asize(g) == 0 && pz_tab_hmask(g) == 0 &&
             pz_tv_isnil(pz_node_val(pz_tab_nodes(g))) && same_walk(L, mt);
    }
    if (ok) {
        lua_pushvalue(L, mt);
        lua_setmetatable(L, t);
        g = lua_topointer(L, t);
        ok = pz_load64(g + PZ_TAB_META) == (uint64_t)(uintptr_t)lua_topointer(L, mt);
    }
    if (ok) {
        lua_createtable(L, 2, 1);
        int u = lua_gettop(L);
        lua_pushnumber(L, 0.0 / 0.0);
        lua_rawseti(L, u, 1);
        lua_pushnumber(L, -0.0);
        lua_rawseti(L, u, 2);
        lua_pushnumber(L, 1e300);
        lua_pushnumber(L, -2.25);
        lua_rawset(L, u);
        ok = same_walk(L, u);
    }
    lua_settop(L, top);
    return ok;
}

void pz_layout_probe(lua_State *L)
{
    if (pz_layout_state < 0)
        pz_layout_state = probe(L);
}
