/*
 * handshake.c - this process's versions, and the INIT prefix that compares
 * a parent's with a worker's (layout and rules: handshake.h).
 */
#include <stdio.h>
#include <string.h>

#include <lauxlib.h>

#include "handshake.h"

/* LuaJIT's bytecode dump header: ESC 'L' 'J', the format version, then
 * flags (lj_bcdump.h).  Only the flags that change how bytecode reads on
 * another machine are compared: byte order and two-slot frames (GC64). */
#define DUMP_FLAG_BE 0x01
#define DUMP_FLAG_FR2 0x08

typedef struct dump_head {
    unsigned char bytes[5];
    size_t len;
} dump_head;

/* lua_dump writer keeping the first bytes only. */
static int keep_head(lua_State *L, const void *p, size_t n, void *ud)
{
    (void)L;
    dump_head *h = ud;
    size_t take = sizeof h->bytes - h->len;
    if (take > n)
        take = n;
    memcpy(h->bytes + h->len, p, take);
    h->len += take;
    return 0;
}

void pz_versions_of(lua_State *L, pz_versions *v)
{
    int top = lua_gettop(L);
    v->protocol = PZ_PROTOCOL_VERSION;
    snprintf(v->luajit, sizeof v->luajit, "unknown");
    snprintf(v->bytecode, sizeof v->bytecode, "unknown");
    lua_getglobal(L, "jit");
    if (lua_istable(L, -1)) {
        lua_getfield(L, -1, "version");
        if (lua_type(L, -1) == LUA_TSTRING)
            snprintf(v->luajit, sizeof v->luajit, "%s", lua_tostring(L, -1));
    }
    lua_settop(L, top);
    dump_head h = {{0}, 0};
    if (luaL_loadstring(L, "return") == 0 && lua_dump(L, keep_head, &h) == 0 && h.len == 5 &&
        memcmp(h.bytes, "\033LJ", 3) == 0)
        snprintf(v->bytecode, sizeof v->bytecode, "LJ%u %s%s", (unsigned)h.bytes[3],
                 h.bytes[4] & DUMP_FLAG_BE ? "be" : "le", h.bytes[4] & DUMP_FLAG_FR2 ? " fr2" : "");
    lua_settop(L, top);
}

/* Appends a string of at most 255 bytes behind its length byte. */
static int put_short(pz_buf *b, const char *s)
{
    size_t n = strlen(s);
    unsigned char len = (unsigned char)(n > 255 ? 255 : n);
    return pz_buf_append(b, &len, 1) != 0 || pz_buf_append(b, s, len) != 0 ? -1 : 0;
}

int pz_handshake_put(pz_buf *b, const pz_versions *v)
{
    unsigned char proto = (unsigned char)v->protocol;
    if (pz_buf_append(b, "PZ", 2) != 0 || pz_buf_append(b, &proto, 1) != 0)
        return -1;
    return put_short(b, v->luajit) != 0 || put_short(b, v->bytecode) != 0 ? -1 : 0;
}

/* Reads a string behind its length byte into out (NUL-terminated,
 * truncated to fit); returns 0, or -1 when the bytes end first. */
static int take_short(const char **p, size_t *n, char *out, size_t cap)
{
    if (*n < 1)
        return -1;
    size_t len = (unsigned char)**p;
    if (*n < 1 + len)
        return -1;
    size_t keep = len < cap - 1 ? len : cap - 1;
    memcpy(out, *p + 1, keep);
    out[keep] = 0;
    *p += 1 + len;
    *n -= 1 + len;
    return 0;
}

int pz_handshake_check(const char **p, size_t *n, const pz_versions *mine, char *why, size_t len)
{
    const char *q = *p;
    size_t left = *n;
    if (left < 3 || memcmp(q, "PZ", 2) != 0) {
        snprintf(why, len,
                 "the parent sent no version handshake: it is not parallelize, or a version "
                 "older than protocol %d (this worker: %s, bytecode %s)",
                 mine->protocol, mine->luajit, mine->bytecode);
        return -1;
    }
    pz_versions theirs;
    theirs.protocol = (unsigned char)q[2];
    q += 3;
    left -= 3;
    if (theirs.protocol != mine->protocol) {
        /* Past the protocol number nothing is known to be laid out alike. */
        snprintf(why, len,
                 "version mismatch: the parent speaks parallelize protocol %d, this worker "
                 "protocol %d (%s, bytecode %s)",
                 theirs.protocol, mine->protocol, mine->luajit, mine->bytecode);
        return -1;
    }
    if (take_short(&q, &left, theirs.luajit, sizeof theirs.luajit) != 0 ||
        take_short(&q, &left, theirs.bytecode, sizeof theirs.bytecode) != 0) {
        snprintf(why, len, "the parent's version handshake is truncated");
        return -1;
    }
    if (strcmp(theirs.luajit, mine->luajit) != 0 || strcmp(theirs.bytecode, mine->bytecode) != 0) {
        snprintf(why, len,
                 "version mismatch: the parent runs %s (bytecode %s), this worker %s (bytecode "
                 "%s); both speak parallelize protocol %d, but functions travel as LuaJIT "
                 "bytecode, which needs the same LuaJIT on both sides",
                 theirs.luajit, theirs.bytecode, mine->luajit, mine->bytecode, mine->protocol);
        return -1;
    }
    *p = q;
    *n = left;
    return 0;
}
