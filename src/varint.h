/*
 * varint.h - LEB128 varints, the one integer encoding of the codec
 * (codec_format.h) and of frame payloads (frame.h).
 *
 * A varint holds an unsigned 64-bit value in 7 bits a byte, least
 * significant group first, the high bit set on every byte but the last: at
 * most PZ_VARINT_MAX_BYTES bytes.  Readers never trust their input: a
 * varint that is truncated, longer than 10 bytes, or holds more than 64 bits
 * is rejected, so that no byte string is read as another value.
 */
#ifndef PZ_VARINT_H
#define PZ_VARINT_H

#include <stddef.h>
#include <stdint.h>

#define PZ_VARINT_MAX_BYTES 10

/* Writes v at dst (room: PZ_VARINT_MAX_BYTES); returns the byte count. */
static inline size_t pz_put_varint(uint8_t *dst, uint64_t v)
{
    size_t n = 0;
    while (v >= 0x80) {
        dst[n++] = (uint8_t)(v | 0x80);
        v >>= 7;
    }
    dst[n++] = (uint8_t)v;
    return n;
}

/* The byte count pz_put_varint writes for v. */
static inline size_t pz_varint_len(uint64_t v)
{
    size_t n = 1;
    while (v >= 0x80) {
        v >>= 7;
        n++;
    }
    return n;
}

/* Reads a varint from [*p, end); returns 0 and advances *p, or -1 when the
 * input is truncated, longer than 10 bytes, or holds more than 64 bits.  The
 * tenth byte has room for bit 63 only: anything else in it would be dropped,
 * and a value must never be read as another one. */
static inline int pz_get_varint(const uint8_t **p, const uint8_t *end, uint64_t *out)
{
    uint64_t v = 0;
    const uint8_t *q = *p;
    for (unsigned shift = 0; shift < 70; shift += 7) {
        if (q >= end)
            return -1;
        uint8_t byte = *q++;
        if (shift == 63 && byte > 1)
            return -1;
        v |= (uint64_t)(byte & 0x7f) << shift;
        if (!(byte & 0x80)) {
            *p = q;
            *out = v;
            return 0;
        }
    }
    return -1;
}

#endif
