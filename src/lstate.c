/*
 * lstate.c - the Lua states pzlua and every worker create (see lstate.h).
 */
#include <stdio.h>
#include <stdlib.h>

#include <lauxlib.h>
#include <lua.h>

#include "lstate.h"

#ifdef PZ_MALLOC_STATES

static void *malloc_alloc(void *ud, void *ptr, size_t osize, size_t nsize)
{
    (void)ud;
    (void)osize;
    if (nsize == 0) {
        free(ptr);
        return NULL;
    }
    return realloc(ptr, nsize);
}

/* What luaL_newstate's state does on an error outside any pcall. */
static int panic(lua_State *L)
{
    const char *msg = lua_tostring(L, -1);
    fprintf(stderr, "PANIC: unprotected error in call to Lua API (%s)\n", msg ? msg : "?");
    fflush(stderr);
    return 0;
}

lua_State *pz_new_state(void)
{
    lua_State *L = lua_newstate(malloc_alloc, NULL);
    if (L)
        lua_atpanic(L, panic);
    return L;
}

#else

lua_State *pz_new_state(void)
{
    return luaL_newstate();
}

#endif
