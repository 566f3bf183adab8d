/*
 * pzlua.h - what pzlua.c (the command line) shares with pzlua_repl.c (the
 * interactive mode). Main thread only; nothing here is used by the module.
 */
#ifndef PZLUA_H
#define PZLUA_H

#include <lua.h>

/* The program's name for messages: argv[0], as luajit names itself. */
extern const char *pzlua_program;
/* What error reports start with: pzlua_program, or NULL (no prefix) while
 * the REPL runs, as in luajit. */
extern const char *pzlua_progname;

/* Calls the function below the narg arguments on top of the stack with a
 * traceback handler, Ctrl-C raising "interrupted!" in it. Returns the
 * lua_pcall status; leaves nres results, or the error value. */
int pzlua_docall(lua_State *L, int narg, int nres);

/* When status is an error, prints the error value on top of the stack (as
 * luajit does) and pops it. Returns status. */
int pzlua_report(lua_State *L, int status);

/* The read-eval-print loop on stdin, until end of input. */
void pzlua_repl(lua_State *L);

#endif
