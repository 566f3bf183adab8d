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
 *
 *   core.line_ready(file) -> boolean        whether read_line would find a
 *                                           line (or the end) without
 *                                           waiting for its first bytes
 */
#include <errno.h>
#include <poll.h>
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

/* Whether the FILE's buffer holds a newline.  Only glibc's buffer can be
 * looked into (its fields are in <stdio.h>); elsewhere the answer is yes,
 * and a caller reads, waiting if it must, as it did before asking. */
static int buffer_has_line(FILE *in)
{
#ifdef __GLIBC__
    return in->_IO_read_ptr < in->_IO_read_end &&
           memchr(in->_IO_read_ptr, '\n', (size_t)(in->_IO_read_end - in->_IO_read_ptr)) != NULL;
#else
    (void)in;
    return 1;
#endif
}

static int l_line_ready(lua_State *L)
{
    FILE **f = (FILE **)luaL_checkudata(L, 1, LUA_FILEHANDLE);
    if (*f == NULL)
        return luaL_error(L, "line_ready: the file is closed");
    if (buffer_has_line(*f) || feof(*f) || ferror(*f)) {
        lua_pushboolean(L, 1);
        return 1;
    }
    struct pollfd pfd = {.fd = fileno(*f), .events = POLLIN};
    int rc = poll(&pfd, 1, 0);
    /* A descriptor poll cannot look at (an error other than a signal)
     * counts as ready: the read that follows says what is wrong. */
    lua_pushboolean(L, rc != 0 && !(rc < 0 && errno == EINTR));
    return 1;
}

void pz_readline_register(lua_State *L)
{
    lua_pushcfunction(L, l_read_line);
    lua_setfield(L, -2, "read_line");
    lua_pushcfunction(L, l_line_ready);
    lua_setfield(L, -2, "line_ready");
}
