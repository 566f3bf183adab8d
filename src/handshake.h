/*
 * handshake.h - the versions a parent and a worker must share, and the
 * fixed prefix of the INIT payload that carries the parent's.
 *
 * A worker on another host may run another build: another parallelize,
 * another LuaJIT, a LuaJIT whose bytecode differs (GC64 or not, byte
 * order).  Executors and values travel as LuaJIT bytecode and in the
 * codec's format, so nothing codec-encoded may be decoded before the
 * versions are known to match.  The prefix is therefore plain bytes, laid
 * out here and nowhere else, and it never changes with the codec:
 *
 *   "PZ"          2 bytes, magic
 *   u8            the protocol version (PZ_PROTOCOL_VERSION)
 *   u8 n, n bytes LuaJIT's version (jit.version, "LuaJIT 2.1.0-beta3")
 *   u8 m, m bytes the bytecode format ("LJ2 le fr2": lua_dump's format
 *                 byte, byte order, two-slot frames)
 *
 * The worker checks it (pz_handshake_check) and answers INIT_ERROR with
 * both sides' versions when anything differs.  The protocol version counts
 * changes of the frames (frame.h), the INIT settings, and the codec's
 * format (codec_format.h): bump it with any of them.
 */
#ifndef PZ_HANDSHAKE_H
#define PZ_HANDSHAKE_H

#include <stddef.h>

#include <lua.h>

#include "buf.h"

#define PZ_PROTOCOL_VERSION 2 /* 2: chunks (PZ_CALL_CHUNK) */

typedef struct pz_versions {
    int protocol;
    char luajit[64];   /* jit.version of the running LuaJIT */
    char bytecode[32]; /* "LJ<format> <le|be>[ fr2]" */
} pz_versions;

/* This process's versions, read from the running LuaJIT through L (the
 * state must have the standard libraries open).  Never fails: what cannot
 * be read is named "unknown". */
void pz_versions_of(lua_State *L, pz_versions *v);

/* Appends the prefix carrying v to b; returns 0, or -1 when out of
 * memory. */
int pz_handshake_put(pz_buf *b, const pz_versions *v);

/* Checks the prefix at the start of [*p, *p + *n) against `mine`.  Returns
 * 0 and moves *p and *n past it when every version matches; otherwise -1
 * with a sentence naming both sides' versions in why[0..len). */
int pz_handshake_check(const char **p, size_t *n, const pz_versions *mine, char *why, size_t len);

#endif
