/*
 * ldefer.c - Ctrl-C put off while the pool's bookkeeping must not be cut in
 * two (see ldefer.h for the rules).  Main thread only.
 *
 * For the Lua layer:
 *
 *   core.atomically(f, ...)         f(...) deferred; its results, or its
 *                                   error raised again
 *   core.settle_after(work, settle, ...)
 *                                   work(...) protected but not deferred
 *                                   (Ctrl-C interrupts it), then
 *                                   settle(ok, results or error) deferred:
 *                                   nothing runs between the two, so a
 *                                   map's claim is released whatever ended
 *                                   its wait, and what settle returns
 *                                   reaches the caller whole
 *   core.commit(n, t1, k1, v1, ..., tn, kn, vn, ...)
 *                                   t1[k1] = v1 ... tn[kn] = vn (raw), then
 *                                   returns the rest of its arguments: a
 *                                   C function runs no hook, so the
 *                                   assignments happen all or none, and
 *                                   as a tail call its values go straight
 *                                   to the caller (a stream's hand-out,
 *                                   once per result: no system call)
 *   core.write_then(file, text, n, t1, k1, v1, ...)
 *                                   writes text whole to the Lua file,
 *                                   then makes the n assignments (the
 *                                   buffer that held the text emptied),
 *                                   and returns true: nothing is written
 *                                   twice or dropped for an interrupt
 *                                   between the two.  A write Ctrl-C
 *                                   interrupts (EINTR) goes on; one that
 *                                   fails returns nil, the reason, and
 *                                   makes no assignment
 */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h> /* LUA_FILEHANDLE */

#include "ldefer.h"

/* What a deferral changed, to put back. */
typedef struct deferral {
    lua_State *L;
    lua_Hook hook;
    int mask, count;
    sigset_t old;
} deferral;

/* Begins deferring: blocks SIGINT (and SIGTERM and SIGHUP, whose handler
 * under pzlua --map sets the same hook: pzlua.c) and takes the debug hook
 * off. */
static void defer_begin(deferral *d, lua_State *L)
{
    sigset_t intr;
    sigemptyset(&intr);
    sigaddset(&intr, SIGINT);
    sigaddset(&intr, SIGTERM);
    sigaddset(&intr, SIGHUP);
    /* pthread_sigmask fails only for an invalid `how`.  Blocked first: a
     * hook read afterwards is one no handler can replace meanwhile. */
    pthread_sigmask(SIG_BLOCK, &intr, &d->old);
    d->L = L;
    d->hook = lua_gethook(L);
    d->mask = lua_gethookmask(L);
    d->count = lua_gethookcount(L);
    if (d->hook)
        lua_sethook(L, NULL, 0, 0);
}

/* Ends it: puts the hook back (unless another was set meanwhile), then
 * SIGINT's mask, which delivers one that came meanwhile. */
static void defer_end(deferral *d)
{
    if (d->hook && !lua_gethook(d->L))
        lua_sethook(d->L, d->hook, d->mask, d->count);
    /* A SIGINT that came meanwhile is handled here, its hook set after
     * the one put back (luajit's and pzlua's replace any). */
    pthread_sigmask(SIG_SETMASK, &d->old, NULL);
}

int pz_defer_pcall(lua_State *L, int nargs, int nresults)
{
    deferral d;
    defer_begin(&d, L);
    int rc = lua_pcall(L, nargs, nresults, 0);
    defer_end(&d);
    return rc;
}

/* core.atomically(f, ...) -> f(...), run deferred. */
static int l_atomically(lua_State *L)
{
    luaL_checktype(L, 1, LUA_TFUNCTION);
    if (pz_defer_pcall(L, lua_gettop(L) - 1, LUA_MULTRET) != 0)
        return lua_error(L);
    return lua_gettop(L);
}

/* core.settle_after(work, settle, ...) -> settle(true, work(...)) or
 * settle(false, error), settle run deferred. */
static int l_settle_after(lua_State *L)
{
    luaL_checktype(L, 1, LUA_TFUNCTION);
    luaL_checktype(L, 2, LUA_TFUNCTION);
    int top = lua_gettop(L);
    luaL_checkstack(L, top, "settle_after: too many arguments");
    lua_pushvalue(L, 1);
    for (int i = 3; i <= top; i++)
        lua_pushvalue(L, i);
    int ok = lua_pcall(L, top - 2, LUA_MULTRET, 0) == 0;
    /* No Lua runs from here until settle: no hook can fire in between. */
    luaL_checkstack(L, 2, "settle_after: too many results");
    lua_pushvalue(L, 2);
    lua_insert(L, top + 1);
    lua_pushboolean(L, ok);
    lua_insert(L, top + 2);
    if (pz_defer_pcall(L, lua_gettop(L) - top - 1, LUA_MULTRET) != 0)
        return lua_error(L);
    return lua_gettop(L) - top;
}

/* Checks the n triples (t, k, v) from index `at` on: each t a table, and
 * no fewer than n of them.  Raises before any assignment is made. */
static void check_triples(lua_State *L, int narg, int n, int at)
{
    luaL_argcheck(L, n >= 0 && at - 1 + 3 * n <= lua_gettop(L), narg, "fewer assignments than said");
    for (int i = 0; i < n; i++)
        luaL_checktype(L, at + 3 * i, LUA_TTABLE);
}

/* Makes the n assignments t[k] = v (raw) checked by check_triples. */
static void assign_triples(lua_State *L, int n, int at)
{
    for (int i = 0; i < n; i++) {
        int t = at + 3 * i;
        lua_pushvalue(L, t + 1);
        lua_pushvalue(L, t + 2);
        lua_rawset(L, t);
    }
}

/* core.commit(n, t1, k1, v1, ..., ...) -> what follows the n triples. */
static int l_commit(lua_State *L)
{
    int n = (int)luaL_checkinteger(L, 1);
    check_triples(L, 1, n, 2);
    assign_triples(L, n, 2);
    return lua_gettop(L) - 1 - 3 * n;
}

/* core.write_then(file, text, n, t1, k1, v1, ...) -> true | nil, reason. */
static int l_write_then(lua_State *L)
{
    FILE **f = (FILE **)luaL_checkudata(L, 1, LUA_FILEHANDLE);
    size_t len;
    const char *text = luaL_checklstring(L, 2, &len);
    int n = (int)luaL_checkinteger(L, 3);
    check_triples(L, 3, n, 4);
    if (*f == NULL)
        return luaL_error(L, "write_then: the file is closed");
    size_t done = 0;
    while (done < len) {
        size_t w = fwrite(text + done, 1, len - done, *f);
        done += w;
        if (done < len) {
            if (!ferror(*f) || errno != EINTR) {
                lua_pushnil(L);
                lua_pushstring(L, strerror(ferror(*f) ? errno : EIO));
                return 2;
            }
            clearerr(*f);
        }
    }
    while (fflush(*f) != 0) {
        if (errno != EINTR) {
            lua_pushnil(L);
            lua_pushstring(L, strerror(errno));
            return 2;
        }
        clearerr(*f);
    }
    assign_triples(L, n, 4);
    lua_pushboolean(L, 1);
    return 1;
}

void pz_defer_register(lua_State *L)
{
    lua_pushcfunction(L, l_atomically);
    lua_setfield(L, -2, "atomically");
    lua_pushcfunction(L, l_settle_after);
    lua_setfield(L, -2, "settle_after");
    lua_pushcfunction(L, l_commit);
    lua_setfield(L, -2, "commit");
    lua_pushcfunction(L, l_write_then);
    lua_setfield(L, -2, "write_then");
}
