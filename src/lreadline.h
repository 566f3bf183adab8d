/*
 * lreadline.h - core.read_line: a line of a Lua file, NUL bytes and all;
 * core.line_ready: whether reading one would not wait.
 *
 * Rules this file owns: a line is every byte up to a newline (not
 * included) or the end of the file, whatever the bytes are (LuaJIT's
 * file:read("*l") reads with fgets and cuts a line at its first NUL byte,
 * joining what follows to the next line); a read that a signal interrupts
 * returns to Lua at once, with the part of the line read so far, so that
 * Ctrl-C's hook can fire while a slow pipe keeps the line unfinished.
 * A line is ready when the file's buffer holds a newline, or when its
 * descriptor has bytes, an end or an error to give: a line whose first
 * bytes came and whose rest is late still makes read_line wait for it.
 */
#ifndef PZ_LREADLINE_H
#define PZ_LREADLINE_H

#include <lua.h>

/* Adds core.read_line and core.line_ready to the table on top. */
void pz_readline_register(lua_State *L);

#endif
