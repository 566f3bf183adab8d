/*
 * linit.c - the INIT payload of each worker (frame.h): the versions of the
 * handshake (handshake.h), the worker's settings, the executor and its
 * constructor's arguments, encoded once
 * when the pool is made and sent again to every worker the slot starts.
 * Main thread only.
 */
#include <stdio.h>

#include <lauxlib.h>
#include <lua.h>

#include "codec.h"
#include "handshake.h"
#include "varint.h"
#include "lpool.h"

/* Appends `part` to b behind a varint length. */
static void append_prefixed(lua_State *L, pz_buf *b, const pz_buf *part)
{
    uint8_t v[PZ_VARINT_MAX_BYTES];
    size_t n = pz_put_varint(v, part->len);
    if (pz_buf_append(b, v, n) != 0 || pz_buf_append(b, part->data, part->len) != 0)
        luaL_error(L, "cannot start the pool: out of memory");
}

/* Pushes the worker settings of the INIT frame (frame.h). */
static void push_settings(lua_State *L, int spec, const pz_options *o)
{
    lua_createtable(L, 0, 5);
    lua_getglobal(L, "package");
    lua_getfield(L, -1, "path");
    lua_setfield(L, -3, "path");
    lua_getfield(L, -1, "cpath");
    lua_setfield(L, -3, "cpath");
    lua_pop(L, 1);
    lua_getfield(L, spec, "kind");
    lua_setfield(L, -2, "kind");
    lua_pushnumber(L, (lua_Number)o->max_message);
    lua_setfield(L, -2, "max_message");
    lua_pushnumber(L, (lua_Number)o->spin_ns);
    lua_setfield(L, -2, "spin_ns");
    lua_pushboolean(L, o->kill_leftovers);
    lua_setfield(L, -2, "kill_leftovers");
}

void pz_linit_build(lua_State *L, lpool *u, int i, const pz_options *o, const pz_versions *versions)
{
    int spec = lua_gettop(L), top;
    pz_buf *b = &u->init[i - 1];
    char root[64];

    if (pz_handshake_put(b, versions) != 0)
        luaL_error(L, "cannot start the pool: out of memory");
    push_settings(L, spec, o);
    u->scratch.len = 0;
    pz_encode_value(L, -1, &u->scratch, "settings", 0);
    append_prefixed(L, b, &u->scratch);
    lua_settop(L, spec);

    lua_getfield(L, spec, "spec");
    snprintf(root, sizeof root, "executors[%d]", i);
    u->scratch.len = 0;
    pz_encode_value(L, -1, &u->scratch, root, 0);
    append_prefixed(L, b, &u->scratch);
    lua_pop(L, 1);

    lua_getfield(L, spec, "args");
    top = lua_gettop(L);
    int n = 0;
    if (lua_istable(L, top)) {
        lua_getfield(L, top, "n");
        n = (int)lua_tointeger(L, -1);
        lua_pop(L, 1);
        luaL_checkstack(L, n, "too many constructor arguments");
        for (int k = 1; k <= n; k++)
            lua_rawgeti(L, top, k);
    }
    snprintf(root, sizeof root, "executors[%d].args", i);
    u->scratch.len = 0;
    pz_encode_tuple(L, top + 1, n, &u->scratch, root, 0, NULL);
    if (pz_buf_append(b, u->scratch.data, u->scratch.len) != 0)
        luaL_error(L, "cannot start the pool: out of memory");
    if (b->len > o->max_message)
        luaL_error(L, "executor %d is %f bytes encoded, above max_message (%f)", i,
                   (double)b->len, (double)o->max_message);
    lua_settop(L, spec);
}

