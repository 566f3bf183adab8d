/*
 * ldefer.h - Ctrl-C put off while the pool's bookkeeping must not be cut in
 * two (main thread only).
 *
 * Ctrl-C's handler (luajit's, pzlua's) sets a debug hook that raises
 * "interrupted!" at the next call or instruction of Lua code, wherever it
 * is.  Where parallelize moves a call's result from one place to another
 * (a claim's lists to the pool's store, the store to the caller), or runs
 * protected code whose errors mean something else (a record that cannot
 * be decoded), an interrupt landing in the middle would lose the result,
 * give it twice, or be taken for that other error and lost itself.  So
 * such code runs deferred:
 *
 *   - SIGINT is blocked, so that its handler cannot set its hook
 *     meanwhile (a pending SIGINT is delivered when the mask is put back:
 *     its hook then fires at the caller's next call or instruction);
 *     so are SIGTERM and SIGHUP, which pzlua --map catches the same way
 *     (a host that leaves them fatal dies a moment later, no sooner);
 *   - the debug hook is off, so that one set before (a signal handled
 *     just before, or the user's own) does not fire inside; it is put
 *     back afterwards (a count hook's count starts again), unless the
 *     code set another.
 *
 * Deferred code must not block: Ctrl-C cannot cut it short (a wait's
 * sleep would be slept through).  A program started from it inherits the
 * blocked SIGINT: parallelize starts none there, but Lua code a drain
 * runs may (the top-level code of a module a decoded value names).
 */
#ifndef PZ_LDEFER_H
#define PZ_LDEFER_H

#include <lua.h>

/* lua_pcall(L, nargs, nresults, 0), deferred.  Returns its status.  (Only
 * protected code is deferred: a raise out of deferred code would leave
 * SIGINT blocked.) */
int pz_defer_pcall(lua_State *L, int nargs, int nresults);

/* Adds core.atomically, core.settle_after, core.commit and core.write_then
 * to the table on top. */
void pz_defer_register(lua_State *L);

#endif
