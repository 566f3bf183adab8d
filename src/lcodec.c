/*
 * lcodec.c - the Lua binding of the codec: parallelize.encode, .decode and
 * .null (see codec.h for what they do, codec_format.h for the bytes).
 *
 * The Lua-facing encode starts its output with a format version byte, which
 * decode checks: the bytes may be stored, and a later version of the module
 * must read them as they were meant or reject them, never misread them.
 * decode reads every version from PZ_FORMAT_OLDEST on (codec_format.h says
 * what changed).  The C API used between the pool's processes writes no
 * version byte: both ends run the same build.
 */
#include <lauxlib.h>
#include <lua.h>
#include <stdint.h>

#include "buf.h"
#include "codec.h"
#include "codec_format.h"

/* Registry key of the scratch buffers' metatable (its address counts). */
static const char reg_scratch = 0;

/* A buffer owned by a full userdata, so that an error raised mid-encode
 * leaks nothing: the GC frees it. */
typedef struct scratch {
    pz_buf buf;
    int busy; /* an encode is using it (a finalizer may re-enter encode) */
} scratch;

static int scratch_gc(lua_State *L)
{
    scratch *s = (scratch *)lua_touserdata(L, 1);
    pz_buf_free(&s->buf);
    return 0;
}

/* Pushes a new scratch userdata. */
static scratch *scratch_new(lua_State *L)
{
    scratch *s = (scratch *)lua_newuserdata(L, sizeof *s);
    s->buf = (pz_buf)PZ_BUF_INIT;
    s->busy = 0;
    lua_pushlightuserdata(L, (void *)&reg_scratch);
    lua_rawget(L, LUA_REGISTRYINDEX);
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        lua_createtable(L, 0, 1);
        lua_pushcfunction(L, scratch_gc);
        lua_setfield(L, -2, "__gc");
        lua_pushlightuserdata(L, (void *)&reg_scratch);
        lua_pushvalue(L, -2);
        lua_rawset(L, LUA_REGISTRYINDEX);
    }
    lua_setmetatable(L, -2);
    return s;
}

/* Reads boolean option `name` of the options table at index idx (absent or
 * nil: no options). */
static int opt_flag(lua_State *L, int idx, const char *name)
{
    int on;
    if (lua_isnoneornil(L, idx))
        return 0;
    luaL_checktype(L, idx, LUA_TTABLE);
    lua_getfield(L, idx, name);
    on = lua_toboolean(L, -1);
    lua_pop(L, 1);
    return on;
}

/* encode(v [, {lossy = true}]) -> string: a format version byte, then v.
 * With lossy, values that cannot travel become strings such as "<thread>"
 * instead of raising.  Encodes into the scratch buffer of upvalue 1; when
 * that is busy (a finalizer called encode during an encode), into a fresh
 * one.  An error not raised by the encoder itself (out of memory inside
 * Lua) can leave the flag set: later calls then use fresh buffers, slower
 * but still correct. */
static int l_encode(lua_State *L)
{
    int flags = 0;
    scratch *s;
    if (lua_gettop(L) != 1) { /* options, or no value at all */
        luaL_checkany(L, 1);
        flags = opt_flag(L, 2, "lossy") ? PZ_ENCODE_LOSSY : 0;
        lua_settop(L, 1);
    }
    s = (scratch *)lua_touserdata(L, lua_upvalueindex(1));
    if (s->busy)
        s = scratch_new(L);
    s->buf.len = 0;
    uint8_t version = PZ_FORMAT_VERSION;
    if (pz_buf_append(&s->buf, &version, 1))
        return luaL_error(L, "cannot encode: out of memory");
    s->busy = 1;
    int is_table = lua_type(L, 1) == LUA_TTABLE;
    if (is_table || !pz_encode_scalar(L, 1, &s->buf, NULL)) {
        s->buf.len = 1;
        pz_encode_value_marked(L, 1, &s->buf, "value", flags, &s->busy, is_table);
    }
    lua_pushlstring(L, s->buf.data, s->buf.len);
    s->busy = 0;
    s->buf.len = 0;
    pz_buf_trim(&s->buf, 1 << 20);
    return 1;
}

/* decode(s [, {functions = true}]) -> v.  Checks the format version byte:
 * versions PZ_FORMAT_OLDEST .. PZ_FORMAT_VERSION are read. */
static int l_decode(lua_State *L)
{
    size_t n;
    const char *s;
    int flags;
    if (lua_type(L, 1) != LUA_TSTRING)
        return luaL_typerror(L, 1, "string");
    flags = opt_flag(L, 2, "functions") ? PZ_DECODE_FUNCTIONS : 0;
    s = lua_tolstring(L, 1, &n);
    if (n == 0)
        return luaL_error(L, "cannot decode: empty input (no format version byte)");
    if ((uint8_t)s[0] < PZ_FORMAT_OLDEST || (uint8_t)s[0] > PZ_FORMAT_VERSION)
        return luaL_error(L, "cannot decode: unknown format version %d at byte 1 (expected %d)",
                          (int)(uint8_t)s[0], PZ_FORMAT_VERSION);
    if ((uint8_t)s[0] == 1)
        flags |= PZ_DECODE_FORMAT_1;
    pz_decode_value_at(L, s, s + 1, n - 1, flags);
    return 1;
}

/* codec_direct([on]) -> whether the direct walk was in use (codec.h). */
static int l_codec_direct(lua_State *L)
{
    int on = lua_isnoneornil(L, 1) ? -1 : lua_toboolean(L, 1);
    lua_pushboolean(L, pz_codec_direct(on));
    return 1;
}

void pz_codec_register(lua_State *L)
{
    /* The helpers take next, rawget and unpack from the globals when they
     * are compiled: now, before a script can have replaced them. */
    pz_codec_prepare(L);
    scratch_new(L);
    lua_pushcclosure(L, l_encode, 1);
    lua_setfield(L, -2, "encode");
    lua_pushcfunction(L, l_decode);
    lua_setfield(L, -2, "decode");
    lua_pushlightuserdata(L, NULL);
    lua_setfield(L, -2, "null");
    lua_pushcfunction(L, l_codec_direct);
    lua_setfield(L, -2, "codec_direct");
}
