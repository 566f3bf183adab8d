/*
 * codec_path.c - the path an encoding error names: "cannot encode a thread
 * at args[2].co[1]".
 *
 * The encoder keeps, for every open table or function, one segment saying
 * which slot of it is being encoded (a key at a stack index, an upvalue
 * name, ...; see codec_enc.h).  Nothing is formatted unless an error is
 * raised: this file runs only then.
 */
#include <lauxlib.h>
#include <lua.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "codec_enc.h"

/* True when s[0..n) can follow a dot in Lua source: an identifier that is
 * not a reserved word. */
static int is_identifier(const char *s, size_t n)
{
    static const char *const reserved[] = {
        "and", "break", "do", "else", "elseif", "end", "false", "for",
        "function", "goto", "if", "in", "local", "nil", "not", "or",
        "repeat", "return", "then", "true", "until", "while"};
    if (n == 0 || (s[0] >= '0' && s[0] <= '9'))
        return 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (!(c == '_' || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
              (c >= '0' && c <= '9')))
            return 0;
    }
    for (size_t i = 0; i < sizeof reserved / sizeof *reserved; i++)
        if (strlen(reserved[i]) == n && memcmp(reserved[i], s, n) == 0)
            return 0;
    return 1;
}

/* Appends s as a double-quoted Lua string literal, escaping what would not
 * print, and cutting it short when long: it is for reading, not loading. */
static void add_quoted(luaL_Buffer *b, const char *s, size_t n)
{
    size_t max = n > 64 ? 60 : n;
    luaL_addchar(b, '"');
    for (size_t i = 0; i < max; i++) {
        unsigned char c = (unsigned char)s[i];
        char tmp[8];
        if (c == '"' || c == '\\') {
            luaL_addchar(b, '\\');
            luaL_addchar(b, (char)c);
        } else if (c == '\n') {
            luaL_addlstring(b, "\\n", 2);
        } else if (c < 32 || c == 127) {
            snprintf(tmp, sizeof tmp, "\\%u", c);
            luaL_addstring(b, tmp);
        } else {
            luaL_addchar(b, (char)c);
        }
    }
    if (max < n)
        luaL_addlstring(b, "...", 3);
    luaL_addchar(b, '"');
}

/* Appends the path step for the key at stack index idx: .name, ["str"],
 * [12], [true], [table]. */
static void add_key(luaL_Buffer *b, lua_State *L, int idx)
{
    char tmp[64];
    size_t n;
    const char *s;
    double d;
    switch (lua_type(L, idx)) {
    case LUA_TSTRING:
        s = lua_tolstring(L, idx, &n);
        if (is_identifier(s, n)) {
            luaL_addchar(b, '.');
            luaL_addlstring(b, s, n);
        } else {
            luaL_addchar(b, '[');
            add_quoted(b, s, n);
            luaL_addchar(b, ']');
        }
        return;
    case LUA_TNUMBER:
        d = lua_tonumber(L, idx);
        if (d == floor(d) && fabs(d) <= PZ_MAX_SAFE_INT)
            snprintf(tmp, sizeof tmp, "[%.0f]", d);
        else
            snprintf(tmp, sizeof tmp, "[%.17g]", d);
        luaL_addstring(b, tmp);
        return;
    case LUA_TBOOLEAN:
        luaL_addstring(b, lua_toboolean(L, idx) ? "[true]" : "[false]");
        return;
    default:
        snprintf(tmp, sizeof tmp, "[%s]", luaL_typename(L, idx));
        luaL_addstring(b, tmp);
        return;
    }
}

/* Appends the path step of one open table or function. */
static void add_seg(luaL_Buffer *b, lua_State *L, const seg *s)
{
    char tmp[32];
    switch (s->kind) {
    case SEG_NONE:
        return;
    case SEG_KEY:
        luaL_addstring(b, "<key>");
        return;
    case SEG_VALUE:
        add_key(b, L, s->idx);
        return;
    case SEG_ITEM:
        snprintf(tmp, sizeof tmp, "[%d]", s->idx);
        luaL_addstring(b, tmp);
        return;
    case SEG_MT:
        luaL_addstring(b, "<metatable>");
        return;
    case SEG_UPVALUE:
        if (s->name && *s->name) {
            luaL_addstring(b, "<upvalue '");
            luaL_addstring(b, s->name);
            luaL_addstring(b, "'>");
        } else {
            snprintf(tmp, sizeof tmp, "<upvalue #%d>", s->idx);
            luaL_addstring(b, tmp);
        }
        return;
    case SEG_GLOBAL:
        luaL_addstring(b, "<global '");
        luaL_addstring(b, lua_tostring(L, s->idx));
        luaL_addstring(b, "'>");
        return;
    }
}

/* Appends the path of the value being encoded.  Very deep paths keep their
 * two ends: the start says where the value is, the end what it is. */
static void add_path(luaL_Buffer *b, enc *e)
{
    char tmp[32];
    luaL_addstring(b, e->root);
    if (e->tuple_index > 0) {
        snprintf(tmp, sizeof tmp, "[%d]", e->tuple_index);
        luaL_addstring(b, tmp);
    }
    for (int i = 0; i < e->depth; i++) {
        if (e->depth > 24 && i == 8) {
            luaL_addstring(b, "...");
            i = e->depth - 12;
        }
        add_seg(b, e->L, &e->segs[i]);
    }
}

/* Raises "<what> at <path>".  Clears the caller's busy flag first, so that
 * the scratch buffer of the Lua-facing encode is free again. */
__attribute__((noreturn))
void pz_enc_raise(enc *e, const char *what)
{
    luaL_Buffer b;
    if (e->busy)
        *e->busy = 0;
    luaL_buffinit(e->L, &b);
    luaL_addstring(&b, what);
    luaL_addstring(&b, " at ");
    add_path(&b, e);
    luaL_pushresult(&b);
    lua_error(e->L);
    abort(); /* not reached: lua_error does not return */
}
