/*
 * codec.h - encode Lua values to bytes and back (format: codec_format.h).
 *
 * Encoding walks the value with the Lua C API and appends to a pz_buf.  It
 * raises a Lua error naming the value's type and its path when something
 * cannot travel ("cannot encode a thread at args[2].co"); the buffer then
 * holds a partial encoding, so callers encode into a buffer they own through
 * a userdata (never one that would leak on the raise) and copy it on success.
 *
 * Decoding never trusts its input unless PZ_DECODE_FUNCTIONS is given: it
 * rejects malformed bytes with a Lua error, never reads out of bounds, and
 * allocates at most in proportion to the input.  Bytecode is only loaded
 * with PZ_DECODE_FUNCTIONS, because LuaJIT does not verify it.
 */
#ifndef PZ_CODEC_H
#define PZ_CODEC_H

#include <stddef.h>
#include <stdint.h>
#include <lua.h>

#include "buf.h"

/* Encoding flags. */
#define PZ_ENCODE_LOSSY 1 /* values that cannot travel become strings such as
                             "<userdata>" instead of raising */
#define PZ_ENCODE_APART 2 /* a tuple whose first value is a table of items (a
                             map's chunk, or its results: chunk.h): each item
                             is written as if encoded alone, so a table or
                             function two items share arrives as two copies,
                             as it would in two calls.  Reference numbers go
                             on counting: the decoder needs nothing new. */

/* Decoding flags. */
#define PZ_DECODE_FUNCTIONS 1 /* load bytecode and resolve function references;
                                 also lets module references `require` */

/* Big strings through shared memory (arena.h).  An encoder given a writer
 * asks it for room for each string of PZ_SHARED_MIN bytes or more, copies
 * the string there and writes only where it is (PZ_T_SHARED); without
 * room, or without a writer, the string is written inline.  `placed`
 * counts the bytes placed, so that limits on a call's size (max_message)
 * count them too. */
typedef struct pz_arena_writer {
    /* Room for n bytes, or NULL; *offset is where, from the region's start. */
    char *(*place)(struct pz_arena_writer *w, size_t n, uint64_t *offset);
    size_t placed;
} pz_arena_writer;

/* A decoder given a reader takes PZ_T_SHARED strings from the region
 * [base, base + size), checking each lies inside it; without one, the tag
 * is an error.  last_end is set to the end offset of the last such string
 * read (0: none yet), for the region's bookkeeping (arena.h); `bytes`
 * counts the bytes read. */
typedef struct pz_arena_reader {
    const char *base;
    size_t size;
    uint64_t last_end;
    uint64_t bytes;
} pz_arena_reader;

/* Deepest nesting of tables and functions either side accepts. */
#define PZ_MAX_DEPTH 1000

/* Appends the encoding of the value at stack index idx to out.  `root` names
 * the value in error paths ("value", "result", "executors[3]"). */
void pz_encode_value(lua_State *L, int idx, pz_buf *out, const char *root, int flags);

/* Appends a tuple: a varint count, then the `count` values at stack indexes
 * first .. first+count-1; error paths read root[1], root[2], ...  Big
 * strings go to `arena` when it is not NULL (see pz_arena_writer). */
void pz_encode_tuple(lua_State *L, int first, int count, pz_buf *out, const char *root, int flags,
                     pz_arena_writer *arena);

/* Decodes one value from exactly n bytes at p and pushes it.  Trailing bytes
 * are an error. */
void pz_decode_value(lua_State *L, const char *p, size_t n, int flags);

/* Decodes a tuple from exactly n bytes at p, pushes its values and returns
 * how many were pushed (checking the stack has room for them).  Shared
 * strings are read from `arena` (NULL: none may appear). */
int pz_decode_tuple(lua_State *L, const char *p, size_t n, int flags, pz_arena_reader *arena);

/* As pz_decode_tuple, for a chunk's answer (chunk.h): its first value, a
 * table of items' results (a table without metatable, or packed doubles,
 * whose keys are item numbers), is not made: each entry is stored in the
 * table at stack index into under its key plus offset, and true is pushed
 * in its place.  A decoding error may leave some entries stored. */
int pz_decode_tuple_into(lua_State *L, const char *p, size_t n, int flags, int into, size_t offset,
                         pz_arena_reader *arena);

/* Appends the value at idx and returns 1 when it is a number, a string, a
 * boolean or nil (most arguments and results); returns 0 for anything else,
 * or when out of memory, possibly having appended part of it (the caller
 * truncates out and takes the full encoder).  It raises nothing and sets
 * nothing up: pz_encode_value and pz_encode_tuple try it first. */
int pz_encode_scalar(lua_State *L, int idx, pz_buf *out, pz_arena_writer *arena);

/* For the Lua binding (lcodec.c) -------------------------------------- */

/* As pz_encode_value, without trying pz_encode_scalar first; when busy is
 * not NULL, *busy is cleared before any error the encoder raises, so that a
 * caller can mark a buffer it reuses as in use while it is (l_encode).
 * is_table: the caller found the value is a table, so the encoder need not
 * ask the Lua API again (a call per encode, on the path of every table). */
void pz_encode_value_marked(lua_State *L, int idx, pz_buf *out, const char *root, int flags,
                            int *busy, int is_table);

/* A decoding flag: the bytes are format version 1, which had no packed
 * arrays (PZ_T_DOUBLES is then an unknown tag, as it was). */
#define PZ_DECODE_FORMAT_1 2

/* As pz_decode_value over the n bytes at p, with the byte positions in
 * error messages counted from base (<= p) instead of p. */
void pz_decode_value_at(lua_State *L, const char *base, const char *p, size_t n, int flags);

/* Compiles the codec's Lua helpers in L now, while the globals they take
 * (next, rawget, ...) are still the standard ones. */
void pz_codec_prepare(lua_State *L);

/* codec_direct.c: turns the direct walk of tables (reading LuaJIT's
 * objects directly) on (1) or off (0), or leaves it (-1); returns whether
 * it was in use before (on, and the layout known).  For tests. */
int pz_codec_direct(int on);

/* Adds encode, decode and null to the table on top of the stack:
 *   encode(v) -> string          (a format version byte, then the value)
 *   decode(s [, {functions = bool}]) -> v
 *   null                         (a light userdata NULL, equal to cjson.null)
 *   codec_direct([on]) -> was    (pz_codec_direct, for tests) */
void pz_codec_register(lua_State *L);

#endif
