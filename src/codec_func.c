/*
 * codec_func.c - encoding Lua functions: bytecode, upvalues, and the
 * globals they read.
 *
 * A Lua function travels as its bytecode (lua_dump, debug info kept for
 * tracebacks in workers), its upvalues as values, and the globals it reads
 * that a fresh state lacks, so that a closure over a local table or a
 * function calling a helper the script defined still works in a worker.
 * Upvalues shared between closures stay shared (PZ_T_UPJOIN).  A C function
 * cannot travel except by reference (codec_index.c).
 */
#include <lauxlib.h>
#include <lua.h>
#include <stdint.h>

#include "codec_enc.h"

/* Registry key of the globals scanner (its address is what counts). */
static const char reg_scanner = 0;

/* Lists the globals a function reads that a fresh state would not have:
 * called as scan(f, env), returns {name1, value1, name2, value2, ...} for
 * the names read by GGET in f and its nested prototypes that are not
 * standard globals and are non-nil in env.  The GGET opcode is taken from a
 * probe function, so no opcode table is needed. */
static const char scanner_src[] =
    "local std = ...\n"
    "local ok, util = pcall(require, 'jit.util')\n"
    "if not ok then return function() return {} end end\n"
    "local bit = require 'bit'\n"
    "local band, rshift = bit.band, bit.rshift\n"
    "local funcbc, funck, rawget, type = util.funcbc, util.funck, rawget, type\n"
    "local function index(t, k) return t[k] end\n"
    "local function probe() return PZ_PROBE_GLOBAL end\n"
    "local GGET = band(funcbc(probe, 1), 0xff)\n"
    "local function scan(f, names, seen)\n"
    "  for pc = 1, 1e9 do\n"
    "    local ins = funcbc(f, pc)\n"
    "    if not ins then break end\n"
    "    if band(ins, 0xff) == GGET then\n"
    "      local name = funck(f, -1 - rshift(ins, 16))\n"
    "      if not seen[name] then seen[name] = true; names[#names + 1] = name end\n"
    "    end\n"
    "  end\n"
    "  for i = -1, -1e9, -1 do\n"
    "    local k = funck(f, i)\n"
    "    if k == nil then break end\n"
    "    if type(k) == 'proto' then scan(k, names, seen) end\n"
    "  end\n"
    "end\n"
    "return function(f, env)\n"
    "  local names, out = {}, {}\n"
    "  scan(f, names, {})\n"
    "  for i = 1, #names do\n"
    "    local name = names[i]\n"
    "    local v = not std[name] and rawget(env, name)\n"
    "    if v == nil and not std[name] then\n"
    "      local ok, x = pcall(index, env, name)\n"
    "      if ok then v = x end\n"
    "    end\n"
    "    if v ~= nil and not std[name] then\n"
    "      out[#out + 1] = name; out[#out + 1] = v\n"
    "    end\n"
    "  end\n"
    "  return out\n"
    "end\n";

/* The globals of a fresh LuaJIT 2.1 state after luaL_openlibs. */
static const char *const std_globals[] = {
    "_G", "_VERSION", "assert", "bit", "collectgarbage", "coroutine", "debug",
    "dofile", "error", "gcinfo", "getfenv", "getmetatable", "io", "ipairs",
    "jit", "load", "loadfile", "loadstring", "math", "module", "newproxy",
    "next", "os", "package", "pairs", "pcall", "print", "rawequal", "rawget",
    "rawset", "require", "select", "setfenv", "setmetatable", "string",
    "table", "tonumber", "tostring", "type", "unpack", "xpcall"};

/* Pushes the globals scanner, compiling it on first use in this state. */
static void push_scanner(lua_State *L)
{
    lua_pushlightuserdata(L, (void *)&reg_scanner);
    lua_rawget(L, LUA_REGISTRYINDEX);
    if (!lua_isnil(L, -1))
        return;
    lua_pop(L, 1);
    if (luaL_loadbuffer(L, scanner_src, sizeof scanner_src - 1, "=parallelize.codec.func"))
        lua_error(L);
    lua_createtable(L, 0, 64);
    for (size_t i = 0; i < sizeof std_globals / sizeof *std_globals; i++) {
        lua_pushboolean(L, 1);
        lua_setfield(L, -2, std_globals[i]);
    }
    lua_call(L, 1, 1);
    lua_pushlightuserdata(L, (void *)&reg_scanner);
    lua_pushvalue(L, -2);
    lua_rawset(L, LUA_REGISTRYINDEX);
}

/* lua_dump writer: appends to the output buffer; nonzero stops the dump. */
static int dump_writer(lua_State *L, const void *p, size_t n, void *ud)
{
    (void)L;
    return pz_buf_append((pz_buf *)ud, p, n) != 0;
}

/* Writes the bytecode of the Lua function at f: a varint length, then what
 * lua_dump produces (debug info kept, for tracebacks in workers). */
static void enc_bytecode(enc *e, int f)
{
    size_t at = pz_enc_hole(e, 1);
    uint64_t len;
    int rc;
    lua_pushvalue(e->L, f);
    rc = lua_dump(e->L, dump_writer, e->out);
    lua_pop(e->L, 1);
    if (rc)
        pz_enc_raise(e, "cannot encode: out of memory");
    len = e->out->len - (at + PZ_ENC_PAD_WIDTH);
    pz_enc_patch(e, at, &len, 1);
}

/* Writes the upvalues of the Lua function at f (reference fref): a byte
 * count, then each upvalue as a value, or as PZ_T_UPJOIN when the same
 * upvalue was already written for another function (or this one). */
static void enc_upvalues(enc *e, int f, int fref, seg *s)
{
    lua_State *L = e->L;
    int n = 0;
    while (lua_getupvalue(L, f, n + 1)) {
        lua_pop(L, 1);
        n++;
    }
    put_byte(e, (uint8_t)n);
    for (int i = 1; i <= n; i++) {
        int upvals = enc_slot(e, ES_UPVALS);
        if (lua_isnil(L, upvals)) {
            lua_createtable(L, 0, 8);
            lua_replace(L, upvals);
        }
        lua_pushlightuserdata(L, lua_upvalueid(L, f, i));
        lua_pushvalue(L, -1);
        lua_rawget(L, upvals);
        if (!lua_isnil(L, -1) && !pz_ref_forgotten(e, (int)(lua_tointeger(L, -1) / 256))) {
            lua_Integer where = lua_tointeger(L, -1);
            lua_pop(L, 2);
            put_byte(e, PZ_T_UPJOIN);
            put_varint(e, (uint64_t)(where / 256));
            put_byte(e, (uint8_t)(where % 256));
            continue;
        }
        lua_pop(L, 1);
        lua_pushinteger(L, (lua_Integer)fref * 256 + i);
        lua_rawset(L, upvals);
        s->kind = SEG_UPVALUE;
        s->idx = i;
        s->name = lua_getupvalue(L, f, i);
        pz_enc_value(e, lua_gettop(L));
        lua_pop(L, 1);
    }
}

/* Writes the globals the Lua function at f reads and that a fresh state
 * lacks: a varint count, then (name, value) pairs. */
static void enc_globals(enc *e, int f, seg *s)
{
    lua_State *L = e->L;
    int list, n;
    push_scanner(L);
    lua_pushvalue(L, f);
    lua_getfenv(L, f);
    lua_call(L, 2, 1);
    list = lua_gettop(L);
    n = (int)lua_objlen(L, list) / 2;
    put_varint(e, (uint64_t)n);
    for (int i = 1; i <= n; i++) {
        size_t len;
        const char *name;
        lua_rawgeti(L, list, 2 * i - 1);
        lua_rawgeti(L, list, 2 * i);
        name = lua_tolstring(L, -2, &len);
        put_varint(e, len);
        put_bytes(e, name, len);
        s->kind = SEG_GLOBAL;
        s->idx = lua_gettop(L) - 1;
        pz_enc_value(e, lua_gettop(L));
        lua_pop(L, 2);
    }
    lua_pop(L, 1);
}

/* Encodes the function at f: a reference if met before; a module reference
 * when it is in the index (see index_ready); else a Lua function travels as
 * bytecode, upvalues and globals, and a C function cannot travel. */
void pz_enc_function(enc *e, int f)
{
    int r;
    seg *s;
    const void *obj = lua_topointer(e->L, f);
    if (pz_enc_known(e, f, obj))
        return;
    if (lua_iscfunction(e->L, f)) {
        /* It can only travel by reference: before giving up, look in an
         * index built now, in case a module gained it as a member since. */
        if (!e->index_fresh) {
            pz_index_rebuild(e);
            if (pz_index_put(e, f, obj))
                return;
        }
        if (e->flags & PZ_ENCODE_LOSSY) {
            enc_string(e, "<C function>", 12);
            return;
        }
        pz_enc_raise(e, "cannot encode a C function (not found in package.loaded)");
    }
    pz_enc_enter(e);
    s = &e->segs[e->depth - 1];
    r = pz_ref_add(e, f, obj);
    put_byte(e, PZ_T_FUNCTION);
    enc_bytecode(e, f);
    enc_upvalues(e, f, r, s);
    enc_globals(e, f, s);
    e->depth--;
}
