/*
 * jithelper.h - what the Lua helpers the JIT compiles share: lrunrec.c's,
 * which takes a run record's one-number results in the main thread, and
 * wruns.c's, which makes a run's one-number calls in a worker.
 *
 * Both read bytes through the FFI, which costs more than the C API when
 * interpreted: so each asks jit_running() first, and C does the work
 * when the JIT is off.  Both read a tuple of one number as pz_put_number
 * writes it (codec_format.h), and leave to C what the FFI would read
 * wrongly or what pz_put_number never writes: NaN (the FFI does not
 * canonicalize one, and LuaJIT tags its other values inside NaNs), an
 * integer of magnitude 2^49 or more (varints are read up to seven bytes,
 * unrolled: a loop inside the helper's loop made LuaJIT compile the inner
 * one as the root trace, and the outer one in pieces around it; seven
 * bytes keep every sum exact in a double), and -0 as an integer.  A
 * pool's call ids are varints too, read the same way: C takes the results
 * of calls from 2^49 on.  (Read up to four bytes, the main thread's
 * helper left every result after a pool's call 2^28 to C.)
 *
 * Whichever thread owns the Lua state the helper is loaded in.
 */
#ifndef PZ_JITHELPER_H
#define PZ_JITHELPER_H

#include <stddef.h>

#include <lua.h>

/* The source every helper begins with.  Its chunk's arguments are
 * (std, ffi_on, extra): the standard functions it may use, as they were
 * when it was loaded (a script that replaces them later does not reach
 * into the helper), whether the FFI may read wire fields in place, and
 * what pz_jit_helper_load passed.  It defines:
 *   on_ffi          assigned by the helper: called with the FFI module,
 *                   to make its types
 *   jit_running()   whether the JIT runs (looked at every 64th call:
 *                   jit.status costs about as much as 50 items) and the
 *                   FFI taken is still package.loaded.ffi; the first
 *                   time, it loads the FFI if nothing has: a worker that
 *                   makes no run pays neither for wruns.c's helper nor
 *                   for the FFI (20 KiB, and 13 ms in the start of 250
 *                   workers, when every worker loaded it)
 *   ffi_moved()     whether package.loaded.ffi is no longer the FFI
 *                   taken.  The helper's types belong to the FFI's state,
 *                   which a second load of the module (package.loaded.ffi
 *                   set to nil, then require) makes anew: types made
 *                   before it fail or crash the compiled code.  So the
 *                   helper loads the FFI only when nothing is registered
 *                   the first time it looks, and nothing required it
 *                   before (std.ffi_required, which pz_jit_helper_watch
 *                   sets: an executor that loaded the FFI and cleared
 *                   package.loaded.ffi, as a module reloader would, kept
 *                   its cdata only if the helper did not load it again),
 *                   takes it again when another one is
 *                   registered (and flushes the compiled code when one
 *                   was taken before: a trace made under the old state's
 *                   types checks their numbers only, which the new state
 *                   gives to other types, and a live cdata of it is
 *                   rebuilt under the new one at a trace's exit; inside
 *                   a __gc finalizer jit.flush does nothing, and those
 *                   traces stay), and
 *                   says no while none is, or while taking it fails (a
 *                   script replaced its functions, or the module).
 *   varint(p, i, e) the varint at p[i], its bytes ending before p[e]
 *                   (i < e: p[i] is read unchecked): its value and the
 *                   index after it, or nil (cut short, or longer than
 *                   seven bytes)
 *   number(p, i, size)  the number in the tuple of `size` bytes at p[i],
 *                   or nil (cast and doubles_t: set by on_ffi) */
#define PZ_JIT_HELPER_PRELUDE                                                                           \
    "local std, ffi_on, extra = ...\n"                                                                  \
    "local pcall, require, rawget, select, type = std.pcall, std.require, std.rawget, std.select, std.type\n" \
    "local FIX, POS, NEG, DBL = std.FIX, std.POS, std.NEG, std.DBL\n"                                   \
    "local status = std.jit_status or function() return false end\n"                                    \
    "local LOADED = std.loaded\n"                                                                      \
    "local on_ffi, cast, doubles_t, taken\n"                                                           \
    "local ok, countdown, running = false, 0, false\n"                                                 \
    "local function take_ffi(ffi)\n"                                                                    \
    "  cast, doubles_t = ffi.cast, ffi.typeof('const double *')\n"                                      \
    "  on_ffi(ffi)\n"                                                                                   \
    "end\n"                                                                                             \
    "local flush, last = std.jit_flush, nil\n"                                                          \
    "local function retake()\n"                                                                         \
    "  ok = false\n"                                                                                    \
    "  taken = rawget(LOADED, 'ffi')\n"                                                                 \
    "  if taken ~= nil and last ~= nil and taken ~= last and flush then flush() end\n"                  \
    "  if taken ~= nil then last = taken end\n"                                                         \
    "  ok = ffi_on and taken ~= nil and pcall(take_ffi, taken)\n"                                       \
    "end\n"                                                                                             \
    "local tried = false\n"                                                                             \
    "local function load_ffi()\n"                                                                       \
    "  tried = true\n"                                                                                  \
    "  if pcall(require, 'ffi') then retake() end\n"                                                    \
    "end\n"                                                                                             \
    "local function ffi_moved()\n"                                                                      \
    "  return rawget(LOADED, 'ffi') ~= taken\n"                                                         \
    "end\n"                                                                                             \
    "local function jit_running()\n"                                                                    \
    "  if not tried then\n"                                                                              \
    "    tried = true\n"                                                                                \
    "    if rawget(LOADED, 'ffi') == nil and not std.ffi_required then load_ffi() end\n"                \
    "  end\n"                                                                                           \
    "  if ffi_moved() then retake() end\n"                                                              \
    "  countdown = countdown - 1\n"                                                                     \
    "  if countdown < 0 then countdown, running = 63, status() end\n"                                   \
    "  return running and ok\n"                                                                         \
    "end\n"                                                                                             \
    "local function varint(p, i, e)\n"                                                                  \
    "  local b0 = p[i]\n"                                                                               \
    "  if b0 < 128 then return b0, i + 1 end\n"                                                         \
    "  if i + 1 >= e then return nil end\n"                                                             \
    "  local b1 = p[i + 1]\n"                                                                           \
    "  if b1 < 128 then return b0 - 128 + b1 * 128, i + 2 end\n"                                        \
    "  if i + 2 >= e then return nil end\n"                                                             \
    "  local b2 = p[i + 2]\n"                                                                           \
    "  if b2 < 128 then return b0 - 128 + (b1 - 128) * 128 + b2 * 16384, i + 3 end\n"                   \
    "  if i + 3 >= e then return nil end\n"                                                             \
    "  local b3 = p[i + 3]\n"                                                                           \
    "  if b3 < 128 then return b0 - 128 + (b1 - 128) * 128 + (b2 - 128) * 16384 + b3 * 2097152, i + 4 end\n" \
    "  local low = b0 - 128 + (b1 - 128) * 128 + (b2 - 128) * 16384 + (b3 - 128) * 2097152\n"         \
    "  if i + 4 >= e then return nil end\n"                                                             \
    "  local b4 = p[i + 4]\n"                                                                           \
    "  if b4 < 128 then return low + b4 * 268435456, i + 5 end\n"                                      \
    "  if i + 5 >= e then return nil end\n"                                                             \
    "  local b5 = p[i + 5]\n"                                                                           \
    "  if b5 < 128 then return low + (b4 - 128) * 268435456 + b5 * 34359738368, i + 6 end\n"            \
    "  if i + 6 >= e then return nil end\n"                                                             \
    "  local b6 = p[i + 6]\n"                                                                           \
    "  if b6 < 128 then\n"                                                                              \
    "    return low + (b4 - 128) * 268435456 + (b5 - 128) * 34359738368 + b6 * 4398046511104, i + 7\n"  \
    "  end\n"                                                                                           \
    "  return nil\n"                                                                                    \
    "end\n"                                                                                             \
    "local function number(p, i, size)\n"                                                               \
    "  if size < 2 or p[i] ~= 1 then return nil end\n"                                                  \
    "  local t = p[i + 1]\n"                                                                            \
    "  if t >= FIX then\n"                                                                              \
    "    if size == 2 then return t - FIX end\n"                                                        \
    "  elseif t == DBL then\n"                                                                          \
    "    if size == 10 then\n"                                                                          \
    "      local v = cast(doubles_t, p + i + 2)[0]\n"                                                   \
    "      if v == v then return v end\n"                                                               \
    "    end\n"                                                                                         \
    "  elseif (t == POS or t == NEG) and size >= 3 then\n"                                              \
    "    local v, e = varint(p, i + 2, i + size)\n"                                                     \
    "    if v and e == i + size and not (t == NEG and v == 0) then\n"                                   \
    "      if t == NEG then return -v end\n"                                                            \
    "      return v\n"                                                                                  \
    "    end\n"                                                                                         \
    "  end\n"                                                                                           \
    "  return nil\n"                                                                                    \
    "end\n"

/* Pushes a table of the standard functions the helpers use (and
 * package.loaded, the codec's tags of numbers), as they are now: a script
 * that replaces them later does not reach into a helper loaded with it. */
void pz_jit_helper_std(lua_State *L);

/* Makes the table of standard functions at stack index std note, as
 * std.ffi_required, that something required the FFI: package.preload's
 * loader of the FFI is wrapped (it returns what the loader returns).  Done
 * before the executor's code runs in a worker whose helper is loaded
 * later. */
void pz_jit_helper_watch(lua_State *L, int std);

/* Loads the helper source src (len bytes, beginning with
 * PZ_JIT_HELPER_PRELUDE) as chunk `name`, runs it with the table of
 * standard functions at stack index std (pz_jit_helper_std), whether the
 * FFI may read in place, and extra (a light userdata, or nil when NULL),
 * and leaves what it returns (the helper) on the stack.  With strip, the
 * chunk is loaded without its debug information when the table's
 * string.dump can strip it: its frames then name no line, and do not
 * name the functions they call.  Raises what loading raises. */
void pz_jit_helper_load(lua_State *L, int std, const char *src, size_t len, const char *name, void *extra,
                        int strip);

#endif
