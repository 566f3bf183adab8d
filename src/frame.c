/*
 * frame.c - frame boundaries, frame building, and the splitting of
 * payloads, checked before any byte is trusted (a worker may write garbage).
 */
#include "frame.h"
#include "varint.h"

int pz_frame_parse(const char *p, size_t n, size_t max_payload, pz_frame *f, size_t *need,
                   const char **why)
{
    if (n < PZ_FRAME_HEADER)
        return PZ_PARSE_MORE;
    uint32_t len = pz_frame_payload_len(p);
    uint8_t type = pz_frame_type(p);
    if (type < PZ_F_INIT || type > PZ_F_LAST) {
        *why = "unknown frame type";
        return PZ_PARSE_BAD;
    }
    if (len > max_payload) {
        *why = "frame longer than max_message";
        return PZ_PARSE_BAD;
    }
    size_t size = PZ_FRAME_HEADER + (size_t)len;
    if (need)
        *need = size;
    if (n < size)
        return PZ_PARSE_MORE;
    pz_frame_read(p, f);
    return PZ_PARSE_OK;
}

int pz_take_varint(const char **p, size_t *n, uint64_t *v)
{
    const uint8_t *q = (const uint8_t *)*p, *end = q + *n;
    if (pz_get_varint(&q, end, v) != 0)
        return -1;
    *n -= (size_t)((const char *)q - *p);
    *p = (const char *)q;
    return 0;
}

int pz_split_prefixed(const char *p, size_t n, const char **s, size_t *slen, const char **rest,
                      size_t *rlen)
{
    uint64_t len;
    if (pz_take_varint(&p, &n, &len) != 0 || len > n)
        return -1;
    *s = p;
    *slen = (size_t)len;
    *rest = p + len;
    *rlen = n - (size_t)len;
    return 0;
}

int pz_record_error(const pz_frame *f, pz_error_parts *e)
{
    const char *rest;
    size_t rlen;
    if (pz_split_prefixed(f->payload, f->len, &e->args, &e->args_len, &rest, &rlen) != 0 ||
        pz_split_prefixed(rest, rlen, &e->message, &e->message_len, &rest, &rlen) != 0)
        return -1;
    return pz_split_prefixed(rest, rlen, &e->traceback, &e->traceback_len, &e->value,
                             &e->value_len);
}

int pz_record_init_error(const pz_frame *f, pz_error_parts *e)
{
    e->args = e->value = f->payload;
    e->args_len = e->value_len = 0;
    return pz_split_prefixed(f->payload, f->len, &e->message, &e->message_len, &e->traceback,
                             &e->traceback_len);
}
