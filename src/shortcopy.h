/*
 * shortcopy.h - a copy of a few bytes without a call.
 *
 * Why: memcpy with a length known only at run time is a call into libc,
 * whose dispatch costs more than copying a tiny call's argument tuple (2
 * to 10 bytes).  In a loop of tiny calls the I/O thread's copies of the
 * arguments into a run (pz_run_gather) spent most of that function's time
 * in __memmove_avx_unaligned_erms.  Up to 16 bytes, two fixed-width
 * copies that may overlap do it: each is one load and one store, and
 * neither reads or writes a byte outside the n given.
 *
 * No thread rules: it touches only the bytes it is given.  The two areas
 * must not overlap.
 */
#ifndef PZ_SHORTCOPY_H
#define PZ_SHORTCOPY_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

static inline void pz_copy_short(void *dst, const void *src, size_t n)
{
    unsigned char *d = (unsigned char *)dst;
    const unsigned char *s = (const unsigned char *)src;
    if (n > 16) {
        memcpy(d, s, n);
    } else if (n >= 8) {
        uint64_t a, b;
        memcpy(&a, s, 8);
        memcpy(&b, s + n - 8, 8);
        memcpy(d, &a, 8);
        memcpy(d + n - 8, &b, 8);
    } else if (n >= 4) {
        uint32_t a, b;
        memcpy(&a, s, 4);
        memcpy(&b, s + n - 4, 4);
        memcpy(d, &a, 4);
        memcpy(d + n - 4, &b, 4);
    } else if (n >= 2) {
        uint16_t a, b;
        memcpy(&a, s, 2);
        memcpy(&b, s + n - 2, 2);
        memcpy(d, &a, 2);
        memcpy(d + n - 2, &b, 2);
    } else if (n == 1) {
        d[0] = s[0];
    }
}

#endif
