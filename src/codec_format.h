/*
 * codec_format.h - the wire format of encoded Lua values.
 *
 * One tag byte starts every value.  Integers and short strings fold their
 * size into the tag, so the common small argument costs one or two bytes.
 * Every table or function gets the next reference number (0, 1, 2, ...) when
 * it is first met, in encoding order, whatever tag it is written with; a
 * later occurrence of the same object is written as PZ_T_REF.  This is what
 * keeps shared references and cycles intact.  (An encoder may also write a
 * later occurrence in full again, as a new object with a new number: the
 * encoder does so for the items of a map's chunk, PZ_ENCODE_APART in
 * codec.h, so that each item arrives as if sent alone.)
 *
 *   0x00 nil        0x01 false      0x02 true      0x03 parallelize.null
 *   0x04 double     8 bytes, IEEE 754, little-endian
 *   0x05 +integer   varint n: the value n (128 .. 2^53)
 *   0x06 -integer   varint n: the value -n (1 .. 2^53)
 *   0x07 string     varint length, bytes
 *   0x08 table      varint narr, varint nhash, narr values (keys 1..narr),
 *                   nhash key/value pairs
 *   0x09 table+mt   as 0x08, then the metatable (a value that is a table)
 *   0x0a ref        varint reference number of an earlier table/function
 *   0x0b module     varint length, name: package.loaded[name]
 *   0x0c member     module name, key name (each varint length, bytes):
 *                   package.loaded[module][key]
 *   0x0d function   varint length, bytecode (lua_dump); a byte nups, then
 *                   nups upvalues, each a value or a PZ_T_UPJOIN; then
 *                   varint nglobals and that many (name, value) pairs, a
 *                   name being varint length, bytes
 *   0x0e upjoin     varint reference number of a function, a byte n: this
 *                   upvalue is that function's upvalue n (1-based), shared
 *   0x0f doubles    varint n, then n doubles (8 bytes each, as 0x04): a
 *                   table whose keys are 1 .. n, without metatable (since
 *                   version 2; the encoder writes it for a sequence of 16
 *                   or more numbers, at most half of them integers, where
 *                   the JIT runs: codec_array.c)
 *   0x10 shared     varint offset, varint length: a string whose bytes are
 *                   in the memory a pool shares with its forked workers
 *                   (arena.h), never in the output of encode(); only a
 *                   pool and its workers write and read it, so it needs no
 *                   format version
 *   0x40..0x5f      string of length tag - 0x40 (0..31), bytes follow
 *   0x80..0xff      integer tag - 0x80 (0..127)
 *
 * A tuple (the arguments of one call) is a varint count followed by that
 * many values; all values of a tuple share one reference numbering.
 * Varints are LEB128 (varint.h).
 */
#ifndef PZ_CODEC_FORMAT_H
#define PZ_CODEC_FORMAT_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "le.h"
#include "shortcopy.h"
#include "varint.h"

/* The byte that starts the output of the Lua-facing encode (not the C API's,
 * whose callers frame values themselves).  Version 2 added PZ_T_DOUBLES and
 * changed nothing else, so the Lua-facing decode reads versions 1 and 2. */
#define PZ_FORMAT_VERSION 2
#define PZ_FORMAT_OLDEST 1

enum {
    PZ_T_NIL = 0x00,
    PZ_T_FALSE = 0x01,
    PZ_T_TRUE = 0x02,
    PZ_T_NULL = 0x03,
    PZ_T_DOUBLE = 0x04,
    PZ_T_POSINT = 0x05,
    PZ_T_NEGINT = 0x06,
    PZ_T_STRING = 0x07,
    PZ_T_TABLE = 0x08,
    PZ_T_TABLE_MT = 0x09,
    PZ_T_REF = 0x0a,
    PZ_T_MODULE = 0x0b,
    PZ_T_MEMBER = 0x0c,
    PZ_T_FUNCTION = 0x0d,
    PZ_T_UPJOIN = 0x0e,
    PZ_T_DOUBLES = 0x0f,
    PZ_T_SHARED = 0x10,
    PZ_T_SHORTSTR = 0x40, /* + length, 0..31 */
    PZ_T_FIXINT = 0x80    /* + value, 0..127 */
};

#define PZ_SHORTSTR_MAX 31
/* Strings this long or longer go through shared memory when the encoder
 * has it (codec.h, pz_arena_writer): below it, the copy through the socket
 * costs less than the bookkeeping. */
#define PZ_SHARED_MIN (64u << 10)
#define PZ_FIXINT_MAX 127
#define PZ_MAX_SAFE_INT 9007199254740992.0 /* 2^53 */

/* Room reserved for one number: pz_put_number writes at most 9 bytes (a
 * tag and an 8-byte double, or a tag and a varint of at most 53 bits);
 * 11 would hold a tag and a varint of any 64 bits. */
#define PZ_NUMBER_MAX_BYTES 11

/* Writes the encoding of number d at dst (room: PZ_NUMBER_MAX_BYTES);
 * returns the byte count.  Integral values within +-2^53 (but not -0.0)
 * take the integer tags; everything else, NaN and infinities included,
 * travels as the raw 8 bytes. */
static inline size_t pz_put_number(uint8_t *dst, double d)
{
    if (d >= 0 && d <= PZ_FIXINT_MAX && d == (double)(int)d) {
        if (d != 0 || !signbit(d)) {
            dst[0] = (uint8_t)(PZ_T_FIXINT + (int)d);
            return 1;
        }
    } else if (d >= -PZ_MAX_SAFE_INT && d <= PZ_MAX_SAFE_INT && d == (double)(int64_t)d) {
        if (d > 0) {
            dst[0] = PZ_T_POSINT;
            return 1 + pz_put_varint(dst + 1, (uint64_t)d);
        }
        dst[0] = PZ_T_NEGINT;
        return 1 + pz_put_varint(dst + 1, (uint64_t)(-d));
    }
    dst[0] = PZ_T_DOUBLE;
    pz_le_double_put(dst + 1, d);
    return 9;
}

/* Room for a tuple of one number, as pz_put_number_tuple writes it. */
#define PZ_NUMBER_TUPLE_MAX_BYTES (1 + PZ_NUMBER_MAX_BYTES)

/* Writes a tuple of one number, d, at dst (room:
 * PZ_NUMBER_TUPLE_MAX_BYTES): its count, 1, then the number, as the tuple
 * encoder would; returns the byte count.  The commonest tuple (a tiny
 * call's argument, its result), written without the encoder's set-up. */
static inline size_t pz_put_number_tuple(uint8_t *dst, double d)
{
    dst[0] = 1;
    return 1 + pz_put_number(dst + 1, d);
}

/* Reads a number as pz_put_number writes it, from *p (end: the end of the
 * bytes); returns 1 and moves *p past it, or 0 when what is there is not
 * a number, is cut short, or is an integer beyond 2^53 (never written:
 * a double would not hold it exactly). */
static inline int pz_get_number(const uint8_t **p, const uint8_t *end, double *out)
{
    const uint8_t *q = *p;
    if (q >= end)
        return 0;
    uint8_t tag = *q++;
    if (tag >= PZ_T_FIXINT) {
        *out = tag - PZ_T_FIXINT;
    } else if (tag == PZ_T_POSINT || tag == PZ_T_NEGINT) {
        uint64_t v;
        if (pz_get_varint(&q, end, &v) != 0 || v > (uint64_t)1 << 53)
            return 0;
        *out = tag == PZ_T_NEGINT ? -(double)v : (double)v;
    } else if (tag == PZ_T_DOUBLE && end - q >= 8) {
        *out = pz_le_double_get(q);
        q += 8;
    } else {
        return 0;
    }
    *p = q;
    return 1;
}

/* Writes the header of a string of length len (the bytes follow it);
 * returns the header's byte count (at most 1 + PZ_VARINT_MAX_BYTES). */
static inline size_t pz_put_string_header(uint8_t *dst, size_t len)
{
    if (len <= PZ_SHORTSTR_MAX) {
        dst[0] = (uint8_t)(PZ_T_SHORTSTR + len);
        return 1;
    }
    dst[0] = PZ_T_STRING;
    return 1 + pz_put_varint(dst + 1, len);
}

/* Writes string s of length len inline, its header then its bytes;
 * returns the byte count (at most 1 + PZ_VARINT_MAX_BYTES + len). */
static inline size_t pz_put_string(uint8_t *dst, const char *s, size_t len)
{
    size_t h = pz_put_string_header(dst, len);
    pz_copy_short(dst + h, s, len);
    return h + len;
}

#endif
