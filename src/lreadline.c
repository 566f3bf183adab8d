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
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <lauxlib.h>
#include <lualib.h> /* LUA_FILEHANDLE */

#include "buf.h"
#include "lreadline.h"

/* The line being read is gathered in a C buffer, kept from call to call
 * (read_line's upvalue, a userdata whose __gc frees it) and pushed as one
 * string at the end: a luaL_Buffer pushes a string for every few KiB and
 * joins them as it goes, which cost a 200 MB line 1.45 s and 640 MB.  A
 * read_line from a finalizer that runs while the string is pushed (an
 * allocation, where a collection may run) finds the buffer busy and
 * gathers into one of its own.  Busy is told by the stack frame of the
 * read_line using it (`user`): a call made from inside that one runs
 * deeper in the C stack, below it; a mark left by a call that raised
 * (memory) is at or below where later calls from the same place run, so it
 * keeps nobody out. */
#define LINE_MT "parallelize.line_buffer"
#define LINE_KEEP (1u << 20) /* bytes kept allocated after a longer line */

typedef struct line_buffer {
    pz_buf b;
    uintptr_t user; /* the frame of the read_line using it, or 0 */
} line_buffer;

static int line_buffer_gc(lua_State *L)
{
    pz_buf_free(&((line_buffer *)lua_touserdata(L, 1))->b);
    return 0;
}

/* Pushes a new, empty buffer. */
static line_buffer *push_line_buffer(lua_State *L)
{
    line_buffer *lb = (line_buffer *)lua_newuserdata(L, sizeof *lb);
    *lb = (line_buffer){PZ_BUF_INIT, 0};
    if (luaL_newmetatable(L, LINE_MT)) {
        lua_pushcfunction(L, line_buffer_gc);
        lua_setfield(L, -2, "__gc");
    }
    lua_setmetatable(L, -2);
    return lb;
}

/* The buffer to gather a line in: the shared one, or, when it is busy, a
 * fresh one left on the stack. */
static line_buffer *take_line_buffer(lua_State *L, uintptr_t here)
{
    line_buffer *lb = (line_buffer *)lua_touserdata(L, lua_upvalueindex(1));
    if (lb->user != 0 && here < lb->user)
        return push_line_buffer(L);
    lb->user = here;
    return lb;
}

/* Appends n bytes, raising when memory runs out.  The line is lost then,
 * and what it had gathered is freed first, and the buffer left to anyone:
 * kept until the next read_line, it would leave the caller, and the
 * raise's own message, short of the memory that ran out. */
static void gather(lua_State *L, line_buffer *lb, const char *p, size_t n)
{
    if (pz_buf_append(&lb->b, p, n) != 0) {
        double size = (double)lb->b.len + (double)n;
        pz_buf_free(&lb->b);
        lb->user = 0; /* this call's mark: a fresh buffer has none */
        luaL_error(L, "read_line: out of memory for a line of %f bytes", size);
    }
}

/* Reads into lb up to a newline (not kept) or the end of what the file
 * gives: 1 at a newline, else 0 (end of file, error or signal: ferror
 * and feof tell).  On glibc the bytes already in the FILE's buffer are
 * taken a span at a time (memchr and one copy), as its own getc does one
 * byte at a time; getc fills the buffer again. */
static int gather_line(lua_State *L, line_buffer *lb, FILE *in)
{
    int c;
    for (;;) {
#ifdef __GLIBC__
        if (in->_IO_read_ptr < in->_IO_read_end) {
            char *p = in->_IO_read_ptr;
            size_t avail = (size_t)(in->_IO_read_end - p);
            char *nl = memchr(p, '\n', avail);
            size_t take = nl ? (size_t)(nl - p) : avail;
            gather(L, lb, p, take);
            in->_IO_read_ptr += take + (nl != NULL);
            if (nl)
                return 1;
        }
#endif
        if ((c = getc_unlocked(in)) == EOF)
            return 0;
        if (c == '\n')
            return 1;
        char ch = (char)c;
        gather(L, lb, &ch, 1);
    }
}

static int l_read_line(lua_State *L)
{
    FILE **f = (FILE **)luaL_checkudata(L, 1, LUA_FILEHANDLE);
    if (*f == NULL)
        return luaL_error(L, "read_line: the file is closed");
    FILE *in = *f;
    line_buffer *lb = take_line_buffer(L, (uintptr_t)__builtin_frame_address(0));
    lb->b.len = 0;
    /* Unlocked: only the main thread reads a Lua file (the pool's I/O
     * thread has descriptors of its own), and a raise (memory) must not
     * leave the FILE locked. */
    int whole = gather_line(L, lb, in), err = 0;
    if (!whole) {
        err = ferror(in) ? errno : 0;
        clearerr(in);
    }
    int nret;
    if (whole || ((err == 0 || err == EINTR) && lb->b.len > 0)) {
        lua_pushlstring(L, lb->b.data ? lb->b.data : "", lb->b.len);
        /* a line, or its part a signal cut short, or the last one, which the
         * end of the file ends */
        lua_pushboolean(L, whole || err == 0);
        nret = 2;
    } else if (err == 0) {
        lua_pushnil(L); /* the end of the file */
        nret = 1;
    } else { /* a failed read, or EINTR before any byte */
        lua_pushnil(L);
        lua_pushstring(L, strerror(err));
        lua_pushinteger(L, err);
        nret = 3;
    }
    if (lb->b.cap > LINE_KEEP)
        pz_buf_trim(&lb->b, 0);
    lb->b.len = 0;
    lb->user = 0;
    return nret;
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
    push_line_buffer(L);
    lua_pushcclosure(L, l_read_line, 1);
    lua_setfield(L, -2, "read_line");
    lua_pushcfunction(L, l_line_ready);
    lua_setfield(L, -2, "line_ready");
}
