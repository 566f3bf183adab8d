/* sighook.c - for spec/signals_spec.lua: a Lua-level signal handler set up
 * the way libraries such as luaposix (posix.signal) do it.  The C handler
 * counts the signal and sets a debug hook; the hook puts the hook it
 * replaced back and runs the Lua handlers of the signals counted.  So a
 * signal that is not Ctrl-C also changes the hook, which p:stop() must not
 * take for an interrupt. */
#include <signal.h>
#include <string.h>
#include <lua.h>
#include <lauxlib.h>

static lua_State *signalL;
static volatile sig_atomic_t pending[65];
static lua_Hook Hold;
static int Hmask, Hcount;

static void sig_handle(lua_State *L, lua_Debug *ar)
{
    (void)ar;
    lua_sethook(L, Hold, Hmask, Hcount);
    lua_getfield(L, LUA_REGISTRYINDEX, "sighook.handlers");
    for (int i = 1; i < 65; i++)
        while (pending[i]) {
            pending[i]--;
            lua_rawgeti(L, -1, i);
            if (lua_isfunction(L, -1)) { lua_pushinteger(L, i); lua_call(L, 1, 0); }
            else lua_pop(L, 1);
        }
    lua_pop(L, 1);
}

static void sig_postpone(int i)
{
    pending[i]++;
    if (lua_gethook(signalL) != sig_handle) {
        Hold = lua_gethook(signalL);
        Hmask = lua_gethookmask(signalL);
        Hcount = lua_gethookcount(signalL);
    }
    lua_sethook(signalL, sig_handle, LUA_MASKCALL | LUA_MASKRET | LUA_MASKCOUNT, 1);
}

/* signal(signum, f) */
static int l_signal(lua_State *L)
{
    int sig = luaL_checkint(L, 1);
    luaL_checktype(L, 2, LUA_TFUNCTION);
    signalL = L;
    lua_getfield(L, LUA_REGISTRYINDEX, "sighook.handlers");
    lua_pushvalue(L, 2);
    lua_rawseti(L, -2, sig);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = sig_postpone;
    sa.sa_flags = SA_RESTART;
    sigemptyset(&sa.sa_mask);
    sigaction(sig, &sa, NULL);
    return 0;
}

int luaopen_sighook(lua_State *L)
{
    lua_newtable(L);
    lua_setfield(L, LUA_REGISTRYINDEX, "sighook.handlers");
    lua_newtable(L);
    lua_pushcfunction(L, l_signal);
    lua_setfield(L, -2, "signal");
    return 1;
}
