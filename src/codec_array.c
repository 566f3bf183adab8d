/*
 * codec_array.c - sequences: telling them from other tables, handing their
 * items to the encoder, gathering their numbers for it, packed arrays of
 * numbers (PZ_T_DOUBLES) both ways, and numbers stored into a table in
 * bulk for the decoder.
 *
 * These are the codec's hot loops over many values, and the Lua C API costs
 * a call or more for each value of a table walked from C (several
 * nanoseconds each, several calls per value).  So they are Lua helpers:
 * compiled by LuaJIT's JIT, a loop over a table reads each slot in about a
 * nanosecond, and with the FFI it reads or writes a double in memory as
 * fast.  The standard functions the helpers use are taken when the module
 * is loaded, before a script can replace them; the helpers are compiled on
 * first use, and the FFI loaded when first needed, so a state that meets no
 * sequence (a worker that is passed numbers) does not pay for them.
 *
 * Rules this file owns:
 * - A table is a sequence of n values when its keys are exactly 1 .. n.
 *   Only visiting every key proves it (an extra key may sit anywhere in the
 *   hash part), so the survey walks them all with the compiled iterator:
 *   n keys, each an integer in 1 .. n, are 1 .. n.  It writes the values
 *   as it meets them, each at its key's place, in whatever order the keys
 *   come.
 *   Except when the table's array part holds slot n: LuaJIT keeps every
 *   integer key below the array part's size there, never in the hash part,
 *   so keys 1 .. n are all in it, and next(t, n), which goes on with the
 *   array slots after n and then the whole hash part, is nil exactly when
 *   no key but 0 .. n is there; t[0] is looked at alone.  The values are
 *   then read by index (about a nanosecond each, where next costs three).
 *   The array part's size is not in the C API: it is read from LuaJIT's
 *   table header, at the offset a probe of tables of known sizes found
 *   when the module was loaded (array_slots); on a layout the probe does
 *   not recognize, every table takes the walk.
 * - Packed doubles are read and written with the FFI only where the JIT
 *   runs: interpreted, the FFI is slower than the C API, so with the JIT
 *   off the encoder does not pack and the decoder unpacks in C.  The
 *   helpers look at jit.status() every 64th call only (it costs about as
 *   much as packing 50 numbers), so a change takes up to 64 calls to be
 *   seen; either way the bytes decode to the same values.
 *   They are read and written in the host's byte order, which must be the
 *   wire's (little-endian), at addresses of any alignment, so the FFI is
 *   used only on hosts that allow both (PZ_ARRAY_FFI).
 * - A double read from the wire reaches the Lua state only through
 *   lua_pushnumber, or through the FFI after pz_unpack_doubles found no NaN
 *   among them, or through pz_fill_doubles, whose caller (the decoder's
 *   scan_numbers) passes no NaN: LuaJIT tags its other values inside NaNs,
 *   and the FFI does not canonicalize a NaN it loads, so a crafted NaN
 *   would become a forged object.  lua_pushnumber canonicalizes.
 */
#include <lauxlib.h>
#include <lua.h>
#include <stdint.h>
#include <string.h>

#include "codec_array.h"
#include "le.h"

#define PZ_ARRAY_FFI PZ_FFI_IN_PLACE /* le.h */

/* Registry key of the helpers' table (its address is what counts): the
 * standard functions they use, by name, taken when the module is loaded,
 * and once compiled, [1] survey, [2] unpack_doubles, [3] unpack, [4] fill. */
static const char reg_helpers = 0;

enum { H_SURVEY = 1, H_UNPACK_DOUBLES, H_UNPACK, H_FILL, H_COUNT = H_FILL };

/* The helpers.
 *
 * survey(t, n, dst) tells whether t is a sequence of n values (false if
 * not); when dst is the address of room for n doubles and all n values are
 * numbers, it also writes them there and returns how many are not integral
 * (NaN when one is infinite or NaN); else it returns true.  It reads t raw
 * (next never calls metamethods).  The keys of a table built in order come
 * in order, which one comparison checks; survey_any takes any order.  The
 * count of fractions adds ceil(v - floor(v)), 1 or 0, without a branch: on
 * values that alternate, a branch would leave the compiled loop for a side
 * trace at every other value.
 *
 * unpack_doubles(src, n) returns a new table of the n doubles at address
 * src, or nil when the JIT is off.  fill(t, i, src, k) sets t[i + 1] ..
 * t[i + k] to the k doubles at address src and returns true, or returns
 * false when the JIT is off.  unpack is the standard one. */
static const char helpers_src[] =
    "local std, ffi_on = ...\n"
    "local next, pcall, rawget, require, type, unpack = std.next, std.pcall, std.rawget, std.require, std.type, std.unpack\n"
    "local floor, ceil = std.floor, std.ceil\n"
    "local status = std.jit_status or function() return false end\n"
    "local ok, cast, doubles, const_doubles, new = false\n"
    "local countdown, running, loaded = 0, false, false\n"
    "local function load_ffi()\n"
    "  loaded = true\n"
    "  local has_ffi, ffi = pcall(require, 'ffi')\n"
    "  if not (ffi_on and has_ffi) then return end\n"
    "  local has_new, table_new = pcall(require, 'table.new')\n"
    "  cast, doubles = ffi.cast, ffi.typeof('double *')\n"
    "  const_doubles = ffi.typeof('const double *')\n"
    "  new = has_new and table_new or function() return {} end\n"
    "  ok = true\n"
    "end\n"
    "local function jit_running()\n"
    "  countdown = countdown - 1\n"
    "  if countdown < 0 then\n"
    "    countdown, running = 63, status()\n"
    "    if running and not loaded then load_ffi() end\n"
    "  end\n"
    "  return running and ok\n"
    "end\n"
    "local function survey_any(t, n, p)\n"
    "  local count, fractional = 0, 0\n"
    "  for k, v in next, t do\n"
    "    if type(k) ~= 'number' or k < 1 or k > n or k % 1 ~= 0 then return false end\n"
    "    count = count + 1\n"
    "    if p then\n"
    "      if type(v) ~= 'number' then p = false\n"
    "      else p[k - 1] = v; fractional = fractional + ceil(v - floor(v)) end\n"
    "    end\n"
    "  end\n"
    "  if count ~= n then return false end\n"
    "  if p then return fractional end\n"
    "  return true\n"
    "end\n"
    "local function survey_indexed(t, n, p)\n"
    "  if rawget(t, 0) ~= nil or next(t, n) ~= nil then return false end\n"
    "  local fractional = 0\n"
    "  for i = 1, n do\n"
    "    local v = rawget(t, i)\n"
    "    if v == nil then return false end\n"
    "    if p then\n"
    "      if type(v) ~= 'number' then p = false\n"
    "      else p[i - 1] = v; fractional = fractional + ceil(v - floor(v)) end\n"
    "    end\n"
    "  end\n"
    "  if p then return fractional end\n"
    "  return true\n"
    "end\n"
    "local function survey(t, n, dst, indexed)\n"
    "  local p = dst and jit_running() and cast(doubles, dst)\n"
    "  if indexed then return survey_indexed(t, n, p) end\n"
    "  local count, fractional = 0, 0\n"
    "  for k, v in next, t do\n"
    "    count = count + 1\n"
    "    if k ~= count then return survey_any(t, n, p) end\n"
    "    if p then\n"
    "      if type(v) ~= 'number' then p = false\n"
    "      else p[count - 1] = v; fractional = fractional + ceil(v - floor(v)) end\n"
    "    end\n"
    "  end\n"
    "  if count ~= n then return false end\n"
    "  if p then return fractional end\n"
    "  return true\n"
    "end\n"
    "local function unpack_doubles(src, n)\n"
    "  if not jit_running() then return nil end\n"
    "  local p = cast(const_doubles, src)\n"
    "  local t = new(n, 0)\n"
    "  for i = 1, n do t[i] = p[i - 1] end\n"
    "  return t\n"
    "end\n"
    "local function fill(t, i, src, k)\n"
    "  if not jit_running() then return false end\n"
    "  local p = cast(const_doubles, src)\n"
    "  for j = 1, k do t[i + j] = p[j - 1] end\n"
    "  return true\n"
    "end\n"
    "return survey, unpack_doubles, unpack, fill\n";

/* Sets field `as` of the table on top of the stack to the global lib's
 * field name (nil when lib is not a table). */
static void take_field(lua_State *L, const char *lib, const char *name, const char *as)
{
    lua_getglobal(L, lib);
    if (lua_istable(L, -1))
        lua_getfield(L, -1, name);
    else
        lua_pushnil(L);
    lua_setfield(L, -3, as);
    lua_pop(L, 1);
}

/* Pushes the table the helpers live in (see reg_helpers), making it with
 * the standard functions they use when there is none. */
static void push_helpers(lua_State *L)
{
    static const char *const std[] = {"next", "pcall", "rawget", "require", "type", "unpack"};
    lua_pushlightuserdata(L, (void *)&reg_helpers);
    lua_rawget(L, LUA_REGISTRYINDEX);
    if (!lua_isnil(L, -1))
        return;
    lua_pop(L, 1);
    lua_createtable(L, H_COUNT, 8);
    for (size_t i = 0; i < sizeof std / sizeof *std; i++) {
        lua_getglobal(L, std[i]);
        lua_setfield(L, -2, std[i]);
    }
    take_field(L, "jit", "status", "jit_status");
    take_field(L, "math", "floor", "floor");
    take_field(L, "math", "ceil", "ceil");
    lua_pushlightuserdata(L, (void *)&reg_helpers);
    lua_pushvalue(L, -2);
    lua_rawset(L, LUA_REGISTRYINDEX);
}

/* Pushes helper h (H_*), compiling the helpers on first use in this state:
 * a state that never meets a sequence never pays for them. */
static void push_helper(lua_State *L, int h)
{
    push_helpers(L);
    lua_rawgeti(L, -1, h);
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        if (luaL_loadbuffer(L, helpers_src, sizeof helpers_src - 1, "=parallelize.codec.array"))
            lua_error(L);
        lua_pushvalue(L, -2);
        lua_pushboolean(L, PZ_ARRAY_FFI);
        lua_call(L, 2, H_COUNT);
        for (int i = H_COUNT; i >= 1; i--)
            lua_rawseti(L, -1 - i, i); /* pops each, last first */
        lua_rawgeti(L, -1, h);
    }
    lua_remove(L, -2);
}

/* Below this many doubles pz_fill_doubles stores them through the C API:
 * calling the helper costs more. */
#define FILL_MIN 16

/* True when addresses up to a are exact as Lua numbers: the helpers take
 * their pointers as numbers, because the JIT does not compile the
 * conversion of a light userdata to a pointer, and does a number's. */
static int address_fits(uintptr_t a)
{
    return (uint64_t)a < (UINT64_C(1) << 53);
}

/* Where LuaJIT's table header keeps the array part's size, a uint32
 * followed by the hash part's mask: 48 with 64-bit GC references (GC64,
 * the default on x86-64 and arm64), 24 with 32-bit ones.  0: not known
 * (the probe found neither), -1: not probed yet. */
static _Atomic int asize_offset = -1;

/* Tables made with n array slots (and 4 hash slots) have n + 1 array
 * slots (slot 0 too) and a hash mask of 3, on the layouts above: the
 * offset where every probed table reads so, or 0. */
static int probe_asize_offset(lua_State *L)
{
    static const int offsets[] = {48, 24};
    static const int sizes[] = {0, 1, 7, 100, 1000};
    for (size_t o = 0; o < sizeof offsets / sizeof *offsets; o++) {
        int ok = 1;
        for (size_t i = 0; ok && i < sizeof sizes / sizeof *sizes; i++) {
            lua_createtable(L, sizes[i], 4);
            const unsigned char *g = lua_topointer(L, -1);
            uint32_t asize, hmask;
            memcpy(&asize, g + offsets[o], sizeof asize);
            memcpy(&hmask, g + offsets[o] + 4, sizeof hmask);
            lua_pop(L, 1);
            ok = asize == (uint32_t)(sizes[i] ? sizes[i] + 1 : 0) && hmask == 3;
        }
        if (ok)
            return offsets[o];
    }
    return 0;
}

/* The number of array slots (0 .. n - 1) of the table at t, or 0 when the
 * layout is not known. */
static uint32_t array_slots(lua_State *L, int t)
{
    int offset = asize_offset;
    if (offset < 0)
        asize_offset = offset = probe_asize_offset(L);
    if (offset == 0)
        return 0;
    uint32_t asize;
    memcpy(&asize, (const unsigned char *)lua_topointer(L, t) + offset, sizeof asize);
    return asize;
}

void pz_array_prepare(lua_State *L)
{
    push_helpers(L);
    lua_pop(L, 1);
    if (asize_offset < 0)
        asize_offset = probe_asize_offset(L);
}

int pz_survey(lua_State *L, int t, size_t n, void *dst, double *fractional)
{
    int verdict;
    int indexed = n < array_slots(L, t);
    push_helper(L, H_SURVEY);
    lua_pushvalue(L, t);
    lua_pushnumber(L, (lua_Number)n);
    if (dst && address_fits((uintptr_t)dst + 8 * n))
        lua_pushnumber(L, (lua_Number)(uintptr_t)dst);
    else
        lua_pushnil(L);
    lua_pushboolean(L, indexed);
    lua_call(L, 4, 1);
    if (lua_type(L, -1) == LUA_TNUMBER) {
        *fractional = lua_tonumber(L, -1);
        verdict = PZ_SURVEY_PACKED;
    } else {
        verdict = lua_toboolean(L, -1) ? PZ_SURVEY_SEQUENCE : PZ_SURVEY_OTHER;
    }
    lua_pop(L, 1);
    return verdict;
}

void pz_push_items(lua_State *L, int t, size_t i, size_t j)
{
    push_helper(L, H_UNPACK);
    lua_pushvalue(L, t);
    lua_pushnumber(L, (lua_Number)i);
    lua_pushnumber(L, (lua_Number)j);
    lua_call(L, 3, LUA_MULTRET);
}


/* True when one of the n doubles at p is a NaN (exponent all ones and a
 * mantissa that is not zero), whatever its sign and payload. */
static int any_nan(const uint8_t *p, size_t n)
{
    uint64_t nan = 0;
    for (size_t i = 0; i < n; i++) {
        uint64_t bits;
        memcpy(&bits, p + 8 * i, sizeof bits);
        /* shifted left, a NaN is above the shifted infinity */
        nan |= (uint64_t)((bits << 1) > UINT64_C(0xffe0000000000000));
    }
    return nan != 0;
}

void pz_unpack_doubles(lua_State *L, const uint8_t *p, size_t n)
{
    if (PZ_ARRAY_FFI && address_fits((uintptr_t)p + 8 * n) && !any_nan(p, n)) {
        push_helper(L, H_UNPACK_DOUBLES);
        lua_pushnumber(L, (lua_Number)(uintptr_t)p);
        lua_pushnumber(L, (lua_Number)n);
        lua_call(L, 2, 1);
        if (lua_istable(L, -1))
            return;
        lua_pop(L, 1);
    }
    lua_createtable(L, n > INT32_MAX ? INT32_MAX : (int)n, 0);
    for (size_t i = 0; i < n; i++) {
        lua_pushnumber(L, pz_le_double_get(p + 8 * i));
        lua_rawseti(L, -2, (int)(i + 1));
    }
}

/* Sets t[i + 1] .. t[i + k] to the k doubles at src: in the host's order
 * (native), or little-endian at any alignment (the wire's).  Through the
 * helper only when nan_free (codec_array.c's rule on NaNs). */
static void fill(lua_State *L, int t, size_t i, const uint8_t *src, size_t k, int native,
                 int nan_free)
{
    if (PZ_ARRAY_FFI && nan_free && k >= FILL_MIN && address_fits((uintptr_t)src + 8 * k)) {
        push_helper(L, H_FILL);
        lua_pushvalue(L, t);
        lua_pushnumber(L, (lua_Number)i);
        lua_pushnumber(L, (lua_Number)(uintptr_t)src);
        lua_pushnumber(L, (lua_Number)k);
        lua_call(L, 4, 1);
        int done = lua_toboolean(L, -1);
        lua_pop(L, 1);
        if (done)
            return;
    }
    for (size_t j = 0; j < k; j++) {
        double x;
        if (native)
            memcpy(&x, src + 8 * j, sizeof x);
        else
            x = pz_le_double_get(src + 8 * j);
        lua_pushnumber(L, x);
        lua_rawseti(L, t, (int)(i + j + 1));
    }
}

void pz_fill_doubles(lua_State *L, int t, size_t i, const double *src, size_t k)
{
    fill(L, t, i, (const uint8_t *)src, k, 1, 1);
}

void pz_fill_wire_doubles(lua_State *L, int t, size_t i, const uint8_t *src, size_t k)
{
    fill(L, t, i, src, k, 0, !any_nan(src, k));
}
