/*
 * lreadline.h - core.read_line: a line of a Lua file, NUL bytes and all.
 *
 * Rules this file owns: a line is every byte up to a newline (not
 * included) or the end of the file, whatever the bytes are (LuaJIT's
 * file:read("*l") reads with fgets and cuts a line at its first NUL byte,
 * joining what follows to the next line); a read that a signal interrupts
 * returns to Lua at once, with the part of the line read so far, so that
 * Ctrl-C's hook can fire while a slow pipe keeps the line unfinished.
 */
#ifndef PZ_LREADLINE_H
#define PZ_LREADLINE_H

#include <lua.h>

/* Adds core.read_line to the table on top. */
void pz_readline_register(lua_State *L);

#endif
