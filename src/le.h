/*
 * le.h - fixed-width integers and doubles in byte buffers, little-endian:
 * the order of every fixed-width field of the wire formats (frame.h,
 * run.h, codec_format.h).
 *
 * Why not a loop over the bytes: gcc turns the 4-byte OR of shifts into
 * one load, but not the 8-byte loops.  Reading a frame's id took eight
 * loads and shifts, half of pz_run_gather's time (perf annotate over
 * 2,000,000 tiny calls).  memcpy of the bytes is one load or store on a
 * little-endian host, plus a byte swap on a big-endian one.
 *
 * No thread rules: these touch only the bytes they are given.
 */
#ifndef PZ_LE_H
#define PZ_LE_H

#include <stdint.h>
#include <string.h>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define PZ_LE16(v) (v)
#define PZ_LE32(v) (v)
#define PZ_LE64(v) (v)
#elif defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
#define PZ_LE16(v) __builtin_bswap16(v)
#define PZ_LE32(v) __builtin_bswap32(v)
#define PZ_LE64(v) __builtin_bswap64(v)
#else
#error "le.h: the host's byte order is unknown (__BYTE_ORDER__)"
#endif

/* 1 where LuaJIT's FFI may read and write these fields where they lie:
 * the host's order is the wire's and loads at any alignment are allowed
 * (codec_array.c's packed doubles, lrunrec.c's run records). */
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__ && \
    (defined(__x86_64__) || defined(__i386__) || defined(__aarch64__))
#define PZ_FFI_IN_PLACE 1
#else
#define PZ_FFI_IN_PLACE 0
#endif

static inline uint16_t pz_le16_get(const void *p)
{
    uint16_t v;
    memcpy(&v, p, sizeof v);
    return PZ_LE16(v);
}

static inline void pz_le16_put(void *p, uint16_t v)
{
    v = PZ_LE16(v);
    memcpy(p, &v, sizeof v);
}

static inline uint32_t pz_le32_get(const void *p)
{
    uint32_t v;
    memcpy(&v, p, sizeof v);
    return PZ_LE32(v);
}

static inline void pz_le32_put(void *p, uint32_t v)
{
    v = PZ_LE32(v);
    memcpy(p, &v, sizeof v);
}

static inline uint64_t pz_le64_get(const void *p)
{
    uint64_t v;
    memcpy(&v, p, sizeof v);
    return PZ_LE64(v);
}

static inline void pz_le64_put(void *p, uint64_t v)
{
    v = PZ_LE64(v);
    memcpy(p, &v, sizeof v);
}

/* A double as the 8 bytes of its IEEE 754 bits, little-endian. */
static inline double pz_le_double_get(const void *p)
{
    uint64_t bits = pz_le64_get(p);
    double d;
    memcpy(&d, &bits, sizeof d);
    return d;
}

static inline void pz_le_double_put(void *p, double d)
{
    uint64_t bits;
    memcpy(&bits, &d, sizeof bits);
    pz_le64_put(p, bits);
}

#endif
