/*
 * lerrobj.h - an error value that is not a string, as text: the one rule
 * pzlua's message handler and the workers' (worker.c) share.
 *
 * Runs in whichever thread runs the Lua state it is given (a message
 * handler: the error's own stack).
 */
#ifndef PZ_LERROBJ_H
#define PZ_LERROBJ_H

#include <lua.h>

/* When the value at idx (an absolute index) has a __tostring metafield,
 * calls it protected and pushes what it returned (any type), or, when it
 * raised, "(error object is a T value; its __tostring raised: why)", and
 * returns 1; pushes nothing and returns 0 when it has none.  Protected:
 * a __tostring that raised inside a message handler made the whole error
 * "error in error handling", its traceback and value lost. */
int pz_error_tostring(lua_State *L, int idx);

#endif
