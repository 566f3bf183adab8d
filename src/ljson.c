/*
 * ljson.c - core.json_encode (the rules: ljson.h).
 *
 * The text is built in a malloc'd buffer, under a protected call: whatever
 * raises meanwhile (lua_checkstack when memory runs out, our own errors),
 * the caller frees the buffer, then raises the error again.
 */
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>
#include <lua.h>

#include "buf.h"
#include "ljson.h"

#define MAX_DEPTH 1000
/* Integral doubles below this in magnitude are exact integers. */
#define EXACT_INTEGERS 9007199254740992.0

typedef struct encoder {
    lua_State *L;    /* these two set by encode_protected */
    pz_buf out;
    int null;        /* stack index of the null sentinel, 0 when none */
    char why[128];   /* the error, when a put returned -1 */
} encoder;

static int fail(encoder *e, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->why, sizeof e->why, fmt, ap);
    va_end(ap);
    return -1;
}

static int put(encoder *e, const char *s, size_t n)
{
    char *p = pz_buf_reserve(&e->out, n);
    if (!p)
        return fail(e, "Cannot serialise: out of memory");
    memcpy(p, s, n);
    e->out.len += n;
    return 0;
}

static int put_char(encoder *e, char c)
{
    return put(e, &c, 1);
}

/* lua-cjson's escapes: NULL for a byte written as it is. */
static const char *escape_of(unsigned char c)
{
    static const char *const control[32] = {
        "\\u0000", "\\u0001", "\\u0002", "\\u0003", "\\u0004", "\\u0005", "\\u0006", "\\u0007",
        "\\b",     "\\t",     "\\n",     "\\u000b", "\\f",     "\\r",     "\\u000e", "\\u000f",
        "\\u0010", "\\u0011", "\\u0012", "\\u0013", "\\u0014", "\\u0015", "\\u0016", "\\u0017",
        "\\u0018", "\\u0019", "\\u001a", "\\u001b", "\\u001c", "\\u001d", "\\u001e", "\\u001f",
    };
    if (c < 32)
        return control[c];
    switch (c) {
    case '"':
        return "\\\"";
    case '\\':
        return "\\\\";
    case '/':
        return "\\/";
    case 127:
        return "\\u007f";
    }
    return NULL;
}

static int put_string(encoder *e, const char *s, size_t len)
{
    if (put_char(e, '"') != 0)
        return -1;
    size_t run = 0; /* bytes before s[i] not yet written */
    for (size_t i = 0; i < len; i++) {
        const char *esc = escape_of((unsigned char)s[i]);
        if (!esc)
            continue;
        if (put(e, s + run, i - run) != 0 || put(e, esc, strlen(esc)) != 0)
            return -1;
        run = i + 1;
    }
    if (put(e, s + run, len - run) != 0)
        return -1;
    return put_char(e, '"');
}

/* Writes v's decimal digits, most significant first, into end's left
 * (v > 0); returns where they begin. */
static char *digits_before(char *end, unsigned long long v)
{
    do {
        *--end = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    return end;
}

/* The shortest text, from 14 significant digits up, that reads back as
 * v; integers without a point or an exponent. */
static int put_number(encoder *e, double v)
{
    if (isnan(v) || isinf(v))
        return fail(e, "Cannot serialise number: must not be NaN or Inf");
    char text[40];
    if (v == floor(v) && fabs(v) < EXACT_INTEGERS) {
        if (v == 0)
            return signbit(v) ? put(e, "-0", 2) : put_char(e, '0');
        char *end = text + sizeof text;
        char *p = digits_before(end, (unsigned long long)fabs(v));
        if (v < 0)
            *--p = '-';
        return put(e, p, (size_t)(end - p));
    }
    int n = 0;
    for (int digits = 14; digits <= 17; digits++) {
        n = snprintf(text, sizeof text, "%.*g", digits, v);
        if (digits == 17 || strtod(text, NULL) == v)
            break;
    }
    return put(e, text, (size_t)n);
}

static int put_value(encoder *e, int idx, int depth);

/* The array length of the table at idx (its largest key) when every key
 * is a positive integer up to INT_MAX; 0 when it is empty or an object;
 * -1 (with the error) when it is an excessively sparse array.  A key
 * above INT_MAX makes an object: lua-cjson 2.1.0 keeps the largest key
 * in an int, which such a key overflows ({[2^31] = 1} comes out as the
 * object {"2147483648":1}, and {[1] = 1, [2^31] = 2} as [1], a key
 * dropped). */
static int array_length(encoder *e, int idx, double *length)
{
    lua_State *L = e->L;
    double max = 0, count = 0;
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        lua_pop(L, 1);
        double k = lua_type(L, -1) == LUA_TNUMBER ? lua_tonumber(L, -1) : 0;
        if (!(k >= 1 && k <= INT_MAX && k == floor(k))) {
            lua_pop(L, 1);
            *length = 0;
            return 0;
        }
        if (k > max)
            max = k;
        count++;
    }
    if (max > 10 && max > 2 * count)
        return fail(e, "Cannot serialise table: excessively sparse array");
    *length = max;
    return 0;
}

static int put_array(encoder *e, int idx, double length, int depth)
{
    lua_State *L = e->L;
    if (put_char(e, '[') != 0)
        return -1;
    for (double i = 1; i <= length; i++) {
        if (i > 1 && put_char(e, ',') != 0)
            return -1;
        lua_rawgeti(L, idx, (int)i);
        int r = put_value(e, lua_gettop(L), depth);
        lua_pop(L, 1);
        if (r != 0)
            return -1;
    }
    return put_char(e, ']');
}

static int put_object(encoder *e, int idx, int depth)
{
    lua_State *L = e->L;
    if (put_char(e, '{') != 0)
        return -1;
    int first = 1;
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        int kt = lua_type(L, -2);
        if (!first && put_char(e, ',') != 0)
            return -1;
        first = 0;
        if (kt == LUA_TSTRING) {
            size_t len;
            const char *k = lua_tolstring(L, -2, &len);
            if (put_string(e, k, len) != 0)
                return -1;
        } else if (kt == LUA_TNUMBER) {
            /* lua_tonumber: lua_tolstring would turn the key into a
             * string in place, which breaks lua_next. */
            if (put_char(e, '"') != 0 || put_number(e, lua_tonumber(L, -2)) != 0 || put_char(e, '"') != 0)
                return -1;
        } else {
            return fail(e, "Cannot serialise %s: table key must be a number or string", lua_typename(L, kt));
        }
        if (put_char(e, ':') != 0 || put_value(e, lua_gettop(L), depth) != 0)
            return -1;
        lua_pop(L, 1);
    }
    return put_char(e, '}');
}

static int put_value(encoder *e, int idx, int depth)
{
    lua_State *L = e->L;
    int t = lua_type(L, idx);
    switch (t) {
    case LUA_TSTRING: {
        size_t len;
        const char *s = lua_tolstring(L, idx, &len);
        return put_string(e, s, len);
    }
    case LUA_TNUMBER:
        return put_number(e, lua_tonumber(L, idx));
    case LUA_TBOOLEAN:
        return lua_toboolean(L, idx) ? put(e, "true", 4) : put(e, "false", 5);
    case LUA_TNIL:
        return put(e, "null", 4);
    case LUA_TTABLE: {
        depth++;
        if (depth > MAX_DEPTH)
            return fail(e, "Cannot serialise, excessive nesting (%d)", depth);
        /* a key and a value of each level, and one more for rawgeti */
        if (!lua_checkstack(L, 4))
            return fail(e, "Cannot serialise: no room on the Lua stack");
        double length = 0;
        if (array_length(e, idx, &length) != 0)
            return -1;
        return length > 0 ? put_array(e, idx, length, depth) : put_object(e, idx, depth);
    }
    default:
        if (e->null && lua_rawequal(L, idx, e->null))
            return put(e, "null", 4);
        return fail(e, "Cannot serialise %s: type not supported", lua_typename(L, t));
    }
}

/* Protected: encodes the value at 2 (the null sentinel at 3, or nil)
 * with the encoder at 1, and pushes the text. */
static int encode_protected(lua_State *L)
{
    encoder *e = lua_touserdata(L, 1);
    e->L = L;
    e->null = lua_isnil(L, 3) ? 0 : 3;
    if (put_value(e, 2, 0) != 0)
        return luaL_error(L, "%s", e->why);
    lua_pushlstring(L, e->out.data ? e->out.data : "", e->out.len);
    return 1;
}

/* core.json_encode(value [, null]) -> text */
static int l_json_encode(lua_State *L)
{
    luaL_checkany(L, 1);
    lua_settop(L, 2);
    encoder e = {NULL, PZ_BUF_INIT, 0, ""};
    lua_pushcfunction(L, encode_protected);
    lua_pushlightuserdata(L, &e);
    lua_pushvalue(L, 1);
    lua_pushvalue(L, 2);
    int status = lua_pcall(L, 3, 1, 0);
    free(e.out.data);
    if (status != 0)
        return lua_error(L);
    return 1;
}

void pz_json_register(lua_State *L)
{
    lua_pushcfunction(L, l_json_encode);
    lua_setfield(L, -2, "json_encode");
}
