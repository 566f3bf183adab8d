/*
 * ljson.h - core.json_encode: a Lua value as JSON text, for `pzlua --map`'s
 * output (any thread that owns its Lua state: it keeps no state).
 *
 * Rules this file owns: the text is what lua-cjson 2.1.0's encoder writes
 * with its default settings, byte for byte, except for numbers, which are
 * written with as many significant digits as it takes to read back the
 * same double (lua-cjson writes at most 14, and refuses a higher
 * precision: 3.141592653589793 came out as 3.1415926535898).  Integral
 * numbers below 2^53 in magnitude are written as integers.  The rest
 * follows lua-cjson: its string escapes (`/` as `\/`, \b \t \n \f \r,
 * other control bytes and DEL as \u00XX, other bytes as they are); nil and
 * the null sentinel given (cjson.null) as null; a table whose keys are all
 * positive integers up to 2^31 - 1 is an array, its missing elements null,
 * unless it is excessively sparse (its
 * largest key above 10 and above twice its count of keys: an error); any
 * other table is an object in `lua_next`'s order, whose keys are strings
 * or numbers (written as strings: a key above 2^31 - 1 makes an object,
 * where lua-cjson 2.1.0, which keeps the largest key in an int, writes an
 * object for most such tables and drops keys of some); an empty table is
 * {}; more than 1000
 * nested tables, NaN, infinities, and values of other types raise, with
 * lua-cjson's messages.
 */
#ifndef PZ_LJSON_H
#define PZ_LJSON_H

#include <lua.h>

/* Adds core.json_encode(value [, null]) -> text to the table on top. */
void pz_json_register(lua_State *L);

#endif
