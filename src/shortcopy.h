/*
 * shortcopy.h - a copy of a few bytes without a call.
 *
 * Why: memcpy with a length known only at run time is a call into libc,
 * whose dispatch costs more than copying a tiny call's argument tuple (2
 * to 10 bytes) or a record's short string.  In a loop of tiny calls the
 * I/O thread's copies of the arguments into a run (pz_run_gather) spent
 * most of that function's time in __memmove_avx_unaligned_erms.  Up to 32
 * bytes, two fixed-size copies that may overlap do it: each is a load and
 * a store, and neither reads or writes a byte outside the n given; longer
 * copies go to memcpy.  Users: run.c (a run's arguments), worker.c (a
 * result into its run's answer), codec_direct.c and codec_format.h's
 * pz_put_string (a short string).
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
    if (n > 32) {
        memcpy(d, s, n);
    } else if (n >= 16) {
        memcpy(d, s, 16);
        memcpy(d + n - 16, s + n - 16, 16);
    } else if (n >= 8) {
        memcpy(d, s, 8);
        memcpy(d + n - 8, s + n - 8, 8);
    } else if (n >= 4) {
        memcpy(d, s, 4);
        memcpy(d + n - 4, s + n - 4, 4);
    } else if (n >= 2) {
        memcpy(d, s, 2);
        memcpy(d + n - 2, s + n - 2, 2);
    } else if (n == 1) {
        d[0] = s[0];
    }
}

#endif
