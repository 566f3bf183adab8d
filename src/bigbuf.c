/*
 * bigbuf.c - the spare buffers of big results (see bigbuf.h).
 */
#include <stdlib.h>
#include <string.h>

#include "bigbuf.h"

int pz_bigbufs_init(pz_bigbufs *s)
{
    s->n = 0;
    return pthread_mutex_init(&s->lock, NULL) == 0 ? 0 : -1;
}

void pz_bigbufs_destroy(pz_bigbufs *s)
{
    for (int i = 0; i < s->n; i++)
        free(s->data[i]);
    s->n = 0;
    pthread_mutex_destroy(&s->lock);
}

void pz_bigbufs_give(pz_bigbufs *s, char *data, size_t cap)
{
    if (cap > PZ_SPARE_MAX) {
        free(data);
        return;
    }
    pthread_mutex_lock(&s->lock);
    if (s->n < PZ_SPARES) {
        s->data[s->n] = data;
        s->cap[s->n++] = cap;
        data = NULL;
    } else {
        int small = 0;
        for (int i = 1; i < s->n; i++)
            if (s->cap[i] < s->cap[small])
                small = i;
        if (s->cap[small] < cap) {
            char *old = s->data[small];
            s->data[small] = data;
            s->cap[small] = cap;
            data = old;
        }
    }
    pthread_mutex_unlock(&s->lock);
    free(data); /* outside the lock */
}

int pz_bigbufs_take(pz_bigbufs *s, pz_buf *b, size_t need)
{
    char *data = NULL;
    size_t cap = 0;
    pthread_mutex_lock(&s->lock);
    for (int i = 0; i < s->n; i++) {
        if (s->cap[i] >= need) {
            data = s->data[i];
            cap = s->cap[i];
            s->data[i] = s->data[--s->n];
            s->cap[i] = s->cap[s->n];
            break;
        }
    }
    pthread_mutex_unlock(&s->lock);
    if (!data)
        return -1;
    if (b->len)
        memcpy(data, b->data, b->len);
    free(b->data);
    b->data = data;
    b->cap = cap;
    return 0;
}
