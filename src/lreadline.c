/*
 * lreadline.c - core.read_line (see lreadline.h for the rules).
 *
 *   core.read_line(file) -> text, true      a whole line (without its
 *                                           newline; the last line of a
 *                                           file may lack one)
 *                        -> text, false     a part of a line: a signal
 *                                           interrupted the read; the rest
 *                                           comes with the next call
 *                        -> nil             the end of the file
 *                        -> nil, reason, errno
 *                                           a read that failed (EINTR when
 *                                           a signal came before any byte)
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include <lauxlib.h>
#include <lualib.h> /* LUA_FILEHANDLE */

#include "lreadline.h"

static int l_read_line(lua_State *L)
{
    FILE **f = (FILE **)luaL_checkudata(L, 1, LUA_FILEHANDLE);
    if (*f == NULL)
        return luaL_error(L, "read_line: the file is closed");
    FILE *in = *f;
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    size_t got = 0;
    int c;
    /* Unlocked: only the main thread reads a Lua file (the pool's I/O
     * thread has descriptors of its own), and a raise of the buffer's
     * pushes (memory) must not leave the FILE locked. */
    while ((c = getc_unlocked(in)) != EOF) {
        if (c == '\n') {
            luaL_pushresult(&b);
            lua_pushboolean(L, 1);
            return 2;
        }
        luaL_addchar(&b, (char)c);
        got++;
    }
    int err = ferror(in) ? errno : 0;
    clearerr(in);
    if (err == 0 && got == 0) {
        lua_pushnil(L);
        return 1;
    }
    if (err == 0 || err == EINTR) {
        if (got == 0) { /* EINTR before any byte */
            lua_pushnil(L);
            lua_pushstring(L, strerror(err));
            lua_pushinteger(L, err);
            return 3;
        }
        luaL_pushresult(&b);
        lua_pushboolean(L, err == 0); /* the end of the file ends the line */
        return 2;
    }
    lua_pushnil(L);
    lua_pushstring(L, strerror(err));
    lua_pushinteger(L, err);
    return 3;
}

void pz_readline_register(lua_State *L)
{
    lua_pushcfunction(L, l_read_line);
    lua_setfield(L, -2, "read_line");
}
