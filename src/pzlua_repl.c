/*
 * pzlua_repl.c - pzlua's interactive mode (-i, or a terminal on stdin): the
 * read-eval-print loop, as luajit's, except that a bare expression prints
 * its values without becoming a tail call (errors keep their position).
 *
 * Runs on the main thread only, between chunks: pzlua.c's pzlua_docall
 * catches Ctrl-C and adds tracebacks, its pzlua_report prints errors
 * (pzlua.h).
 */
#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>

#include <lauxlib.h>
#include <lua.h>

#include "pzlua.h"

/* Prints the prompt (global _PROMPT or _PROMPT2 when set, as in lua) and
 * reads one line of stdin. Pushes the line without its newline and returns
 * true, or pushes nothing and returns false at end of input. */
static bool pushline(lua_State *L, bool first)
{
    lua_getglobal(L, first ? "_PROMPT" : "_PROMPT2");
    const char *prompt = lua_tostring(L, -1);
    /* A failed write of the prompt is not worth stopping for: the answers
     * go to the same stdout and will fail visibly on their own. */
    fputs(prompt ? prompt : first ? "> " : ">> ", stdout);
    fflush(stdout);
    lua_pop(L, 1);
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    int c;
    size_t n = 0;
    while ((c = getchar()) != EOF && c != '\n') {
        luaL_addchar(&b, (char)c);
        n++;
    }
    luaL_pushresult(&b);
    if (c == EOF && ferror(stdin))
        fprintf(stderr, "%s: cannot read stdin: %s\n", pzlua_program, strerror(errno));
    if (c == EOF && n == 0) {
        lua_pop(L, 1);
        return false;
    }
    return true;
}

/* True when a load failed only because the chunk ended early, so that more
 * lines may complete it: LuaJIT's parser then complains near '<eof>'. */
static bool incomplete(lua_State *L, int status)
{
    static const char mark[] = "'<eof>'";
    size_t len, mlen = sizeof mark - 1;
    if (status != LUA_ERRSYNTAX)
        return false;
    const char *msg = lua_tolstring(L, -1, &len);
    return msg && len >= mlen && memcmp(msg + len - mlen, mark, mlen) == 0;
}

/* Compiles the line on top of the stack as a bare expression whose values
 * the REPL prints. On success replaces the line with the compiled function
 * and returns true; else leaves the line alone.
 *
 * A line is an expression when "return <line>" compiles. That chunk is not
 * what runs, though: for a call, `return f()` is a tail call, which drops
 * the line's own frame, so that an error raised by f would lose its
 * position ("stdin:1:") and the traceback its caller. What runs passes the
 * values through a function instead, so the line keeps its frame:
 * `return (function(...) return ... end)(<line>\n)` (the newline ends a
 * comment the line may end with). Lines that compile only the first way
 * are left alone, for the statement path to report. */
static bool load_expression(lua_State *L)
{
    size_t len;
    lua_pushliteral(L, "return ");
    lua_pushvalue(L, -2);
    lua_concat(L, 2);
    const char *code = lua_tolstring(L, -1, &len);
    int status = luaL_loadbuffer(L, code, len, "=stdin");
    lua_pop(L, 2); /* the function or the error, the code */
    if (status != 0)
        return false;
    lua_pushliteral(L, "return (function(...) return ... end)(");
    lua_pushvalue(L, -2);
    lua_pushliteral(L, "\n)");
    lua_concat(L, 3);
    code = lua_tolstring(L, -1, &len);
    if (luaL_loadbuffer(L, code, len, "=stdin") != 0) {
        lua_pop(L, 2);
        return false;
    }
    lua_replace(L, -3);
    lua_pop(L, 1);
    return true;
}

/* Reads and compiles one entry of the REPL: a line starting with '=' is
 * "return" plus the rest (as in luajit); a bare expression prints its
 * values; otherwise lines are read (">> ") until the chunk is complete.
 * Pushes the function (status 0) or the error message; returns -1 at end of
 * input. */
static int load_entry(lua_State *L)
{
    if (!pushline(L, true))
        return -1;
    if (lua_tostring(L, -1)[0] == '=') {
        lua_pushfstring(L, "return %s", lua_tostring(L, -1) + 1);
        lua_remove(L, -2);
    } else if (load_expression(L)) {
        return 0;
    }
    int status;
    for (;;) {
        size_t len;
        const char *code = lua_tolstring(L, -1, &len);
        status = luaL_loadbuffer(L, code, len, "=stdin");
        if (!incomplete(L, status) || !pushline(L, false))
            break;
        lua_remove(L, -2); /* the error message */
        lua_pushliteral(L, "\n");
        lua_insert(L, -2);
        lua_concat(L, 3);
    }
    lua_remove(L, -2); /* the source */
    return status;
}

/* Calls print with the n values from index base up, as the REPL shows
 * results. */
static void print_results(lua_State *L, int base, int n)
{
    lua_getglobal(L, "print");
    lua_insert(L, base);
    int status = pzlua_docall(L, n, 0);
    if (status != 0) {
        lua_pushfstring(L, "error calling 'print' (%s)", lua_tostring(L, -1));
        lua_remove(L, -2);
        pzlua_report(L, status);
    }
}

/* The read-eval-print loop, until end of input. Errors are reported
 * without the program's name, as in luajit, and do not end the loop. */
void pzlua_repl(lua_State *L)
{
    const char *saved_progname = pzlua_progname;
    pzlua_progname = NULL;
    int top = lua_gettop(L);
    int status;
    while ((status = load_entry(L)) != -1) {
        if (status == 0)
            status = pzlua_docall(L, 0, LUA_MULTRET);
        if (status == 0 && lua_gettop(L) > top)
            print_results(L, top + 1, lua_gettop(L) - top);
        pzlua_report(L, status);
        lua_settop(L, top);
    }
    fputs("\n", stdout);
    fflush(stdout);
    pzlua_progname = saved_progname;
}
