/*
 * wruns.h - a worker's run (run.h) of calls whose argument is one number,
 * made by a Lua loop that LuaJIT's JIT compiles.
 *
 * Why: made by worker.c's C loop, a tiny call cost its worker about 40 ns
 * (2 M calls of x * 2): the executor pushed and called through the C API
 * (each call enters the VM anew), its argument decoded and its result
 * read through API calls.  Compiled, the loop reads each argument through
 * the FFI, calls the executor inside the trace (a small Lua executor is
 * inlined), and hands a result of one number to a C function through the
 * FFI, which appends it to the output and names the next call: about 25
 * ns a call in all.  Interpreted, the FFI costs more than the C API, so
 * with the JIT off the helper makes no call and the C loop makes them all,
 * as it does when the FFI could not be taken (jithelper.h).
 *
 * The helper is loaded without debug information: its frame names no
 * line, and the executor's frame is named as the C loop's call named it
 * (<file:line>).  on_error takes the helper's line out of a traceback
 * (pz_wruns_untrace) and its place off a message that error(message, 2)
 * gave it (pz_wruns_unwhere).  Memory running out while the helper runs
 * (in the executor or in the helper, which cannot be told apart) is the
 * call's error, and C makes every call after it.
 *
 * What stays as the C loop does it: each result goes into the output as
 * soon as its call returns, under the output's lock (the flusher may
 * write it while a long call follows); the shared memory names each call
 * before it starts (worker.h), and W.run_next is the call being made, so
 * that an error the executor raises reaches worker.c's handler (on_error,
 * the protected call around the loop) as the C loop's would, naming that
 * call.  A result that is not one number, and an argument that is not one
 * number as pz_put_number writes it (NaN, integers of magnitude 2^49 or
 * more and -0 as an integer included), go back to the C loop.
 *
 * Worker main thread only, inside run_calls' protected call (worker.c).
 * The C function the helper calls must not raise (an error cannot cross
 * an FFI call): it returns nonzero when memory runs out instead.
 */
#ifndef PZ_WRUNS_H
#define PZ_WRUNS_H

#include <stddef.h>

#include <lua.h>

#include "run.h"

/* The helper's chunk name, as tracebacks show it. */
#define PZ_WRUNS_CHUNK "parallelize.runs"

/* What pz_wruns_make did. */
enum {
    PZ_WRUNS_OFF = -1,    /* nothing: the JIT is off, or no FFI */
    PZ_WRUNS_STOPPED = 0, /* made calls up to one whose argument it leaves to C, or to the end */
    PZ_WRUNS_VALUES = 1,  /* made the current call, which returned the values now on the stack */
    PZ_WRUNS_NO_MEMORY = 2 /* answer ran out of memory for the current call's result */
};

/* Worker start-up, before the executor's code runs: takes the standard
 * functions the helper will use (jithelper.h; the helper itself is
 * compiled at the first pz_wruns_make); answer(x) is what it hands a
 * result of one number to (returning 0, or nonzero when memory ran out;
 * it must not raise).  Raises when memory runs out. */
void pz_wruns_prepare(lua_State *L, int (*answer)(double));

/* Makes the run's calls items[next - 1 .. n - 1] (1-based next) with the
 * executor at stack index `executor`, until one whose argument is not one
 * number; the current call's place is what answer advances (worker.c).
 * Raises what the executor raises.  Returns one of the codes above; with
 * PZ_WRUNS_VALUES the current call's values are above the stack top it
 * found. */
int pz_wruns_make(lua_State *L, int executor, const pz_run_item *items, size_t next, size_t n);

/* Takes the helper's line out of the traceback on top of the stack (the
 * executor's error, as on_error makes it): its frame is the pool's, not
 * the user's.  Raises only when memory runs out. */
void pz_wruns_untrace(lua_State *L);

/* Takes the helper's place ("parallelize.runs:0: ") off the front of the
 * error message at `index`, a string: error(message, 2) in an executor
 * names its caller's place, which the C loop, a C function, has not.
 * Raises only when memory runs out. */
void pz_wruns_unwhere(lua_State *L, int index);

#endif
