/*
 * core.c - luaopen_parallelize_core: the table of C functions the Lua layer
 * (lua/parallelize.lua) builds the public API from.
 */
#include <errno.h>
#include <sched.h>
#include <math.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <lauxlib.h>
#include <lua.h>

#include "codec.h"
#include "ldefer.h"
#include "ljson.h"
#include "lreadline.h"
#include "core.h"
#include "worker.h"
#include "forkserver.h"
#include "lpool.h"
#include "sys.h"

static pz_preloader extra_preloader;

void pz_set_extra_preloader(pz_preloader fn)
{
    extra_preloader = fn;
}

void pz_preload(lua_State *L)
{
    lua_getglobal(L, "package");
    lua_getfield(L, -1, "preload");
    lua_pushcfunction(L, luaopen_parallelize_core);
    lua_setfield(L, -2, "parallelize.core");
    lua_pop(L, 2);
    if (extra_preloader)
        extra_preloader(L);
}

/* getpid() -> the pid of the calling process (a worker's own inside an
 * executor). */
static int l_getpid(lua_State *L)
{
    lua_pushinteger(L, (lua_Integer)getpid());
    return 1;
}

/* sleep(seconds): sleeps, fractions included.  A signal cuts the sleep
 * short so that Ctrl-C's "interrupted!" is raised promptly; other signals
 * resume it. */
static int l_sleep(lua_State *L)
{
    double s = luaL_checknumber(L, 1);
    luaL_argcheck(L, s >= 0 && s == s, 1, "seconds must be a non-negative number");
    if (s > 1e9)
        s = 1e9;
    struct timespec req = {(time_t)s, (long)((s - floor(s)) * 1e9)}, rem;
    while (nanosleep(&req, &rem) != 0) {
        if (errno != EINTR)
            return luaL_error(L, "sleep failed: %s", strerror(errno));
        if (lua_gethook(L) != NULL)
            break; /* an interrupt hook is set: let it fire */
        req = rem;
    }
    return 0;
}

/* cpu_count() -> the CPUs this process may run on (its affinity mask),
 * at least 1. */
static int l_cpu_count(lua_State *L)
{
    cpu_set_t set;
    long n = 0;
    if (sched_getaffinity(0, sizeof set, &set) == 0)
        n = CPU_COUNT(&set);
    if (n < 1)
        n = sysconf(_SC_NPROCESSORS_ONLN);
    lua_pushinteger(L, n < 1 ? 1 : (lua_Integer)n);
    return 1;
}

/* isatty(fd) -> whether descriptor fd is a terminal (progress bars). */
static int l_isatty(lua_State *L)
{
    lua_pushboolean(L, isatty((int)luaL_checkinteger(L, 1)) == 1);
    return 1;
}

/* now() -> seconds on the monotonic clock, for deadlines. */
static int l_now(lua_State *L)
{
    lua_pushnumber(L, (lua_Number)pz_now_ns() / 1e9);
    return 1;
}

/* forkserver_pid() -> the fork server's pid (forkserver.h), or nil. */
static int l_forkserver_pid(lua_State *L)
{
    pid_t pid = pz_forkserver_pid();
    if (pid > 0)
        lua_pushinteger(L, (lua_Integer)pid);
    else
        lua_pushnil(L);
    return 1;
}

/* forkserver() -> true | false, why: starts the fork server (forkserver.h). */
static int l_forkserver(lua_State *L)
{
    char why[160];
    if (pz_forkserver_start(why, sizeof why) == 0) {
        lua_pushboolean(L, 1);
        return 1;
    }
    lua_pushboolean(L, 0);
    lua_pushfstring(L, "cannot start the fork server: %s", why);
    return 2;
}

int luaopen_parallelize_core(lua_State *L)
{
    /* Under a host that was started with stdout closed, a pool's pipe
     * could take descriptor 1, and print() would write into it.  Nothing
     * to say if /dev/null cannot be opened: the host's own stderr may be
     * the descriptor missing. */
    (void)pz_occupy_closed_std_fds();
    lua_newtable(L);
    pz_codec_register(L);
    pz_lpool_register(L, pz_preload);
    pz_defer_register(L);
    pz_readline_register(L);
    pz_json_register(L);
    lua_pushcfunction(L, l_getpid);
    lua_setfield(L, -2, "getpid");
    lua_pushcfunction(L, l_sleep);
    lua_setfield(L, -2, "sleep");
    lua_pushcfunction(L, l_now);
    lua_setfield(L, -2, "now");
    lua_pushcfunction(L, l_cpu_count);
    lua_setfield(L, -2, "cpu_count");
    lua_pushcfunction(L, l_isatty);
    lua_setfield(L, -2, "isatty");
    lua_pushcfunction(L, l_forkserver_pid);
    lua_setfield(L, -2, "forkserver_pid");
    lua_pushcfunction(L, l_forkserver);
    lua_setfield(L, -2, "forkserver");
    lua_pushcfunction(L, pz_worker_fail_answer);
    lua_setfield(L, -2, "worker_fail_answer");
    return 1;
}
