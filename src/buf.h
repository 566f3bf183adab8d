/*
 * buf.h - a growable byte buffer, the one container every layer shares.
 *
 * Growth failures are reported, never hidden: pz_buf_reserve returns NULL and
 * leaves the buffer unchanged, so a caller can raise a Lua error or drop a
 * worker without leaking.  The buffer never shrinks by itself; callers that
 * keep one for a long time call pz_buf_trim when it is empty.
 */
#ifndef PZ_BUF_H
#define PZ_BUF_H

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct pz_buf {
    char *data;
    size_t len;   /* bytes in use */
    size_t cap;   /* bytes allocated */
} pz_buf;

#define PZ_BUF_INIT {NULL, 0, 0}

/* Makes room for `extra` more bytes; returns a pointer to the free space
 * (data + len) or NULL when the allocation fails or the size overflows. */
static inline char *pz_buf_reserve(pz_buf *b, size_t extra)
{
    if (b->cap - b->len < extra) {
        size_t need = b->len + extra, cap = b->cap ? b->cap : 256;
        if (need < b->len)
            return NULL;
        while (cap < need) {
            if (cap > SIZE_MAX / 2) {
                cap = need;
                break;
            }
            cap *= 2;
        }
        char *p = realloc(b->data, cap);
        if (!p)
            return NULL;
        b->data = p;
        b->cap = cap;
    }
    return b->data + b->len;
}

/* Appends n bytes; returns 0 on success, -1 when out of memory. */
static inline int pz_buf_append(pz_buf *b, const void *src, size_t n)
{
    char *dst = pz_buf_reserve(b, n);
    if (!dst)
        return -1;
    if (n)
        memcpy(dst, src, n);
    b->len += n;
    return 0;
}

/* Drops the first n bytes, keeping the rest. */
static inline void pz_buf_consume(pz_buf *b, size_t n)
{
    if (n >= b->len) {
        b->len = 0;
        return;
    }
    memmove(b->data, b->data + n, b->len - n);
    b->len -= n;
}

/* Returns memory to the allocator when a long-lived buffer has grown large
 * for one big message and is now empty. */
static inline void pz_buf_trim(pz_buf *b, size_t keep)
{
    if (b->len == 0 && b->cap > keep) {
        free(b->data);
        b->data = NULL;
        b->cap = 0;
    }
}

static inline void pz_buf_free(pz_buf *b)
{
    free(b->data);
    b->data = NULL;
    b->len = b->cap = 0;
}

#endif
