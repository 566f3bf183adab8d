/*
 * fuzz_frame.c - libFuzzer harness for the frame layer (frame.c): the bytes
 * a worker writes, walked as the parent's I/O thread walks them, and the
 * payload splits the I/O thread, the pool binding and the worker make
 * (the worker's version handshake first, handshake.c).
 *
 * Input: byte 0 says how the stream is cut into reads (1 to 256 bytes a
 * read, as recv might return it), byte 1 the largest payload accepted (2^0
 * to 2^20 bytes); the rest is the stream.  Frames are parsed from a growing
 * buffer that is consumed as frames are handled, exactly as read_worker
 * does, including the read sized from a partial frame's announced length.
 *
 * Besides the sanitizers, it checks what callers rely on: a parsed frame
 * lies inside the bytes given, PZ_PARSE_MORE is returned only when more
 * bytes are really needed, a rejected frame says why, and every split stays
 * inside its payload.  A broken promise traps.
 *
 *   make fuzz FUZZ_SECONDS=60        (builds build/fuzz/fuzz_frame)
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "buf.h"
#include "frame.h"
#include "handshake.h"

static volatile unsigned sink;

static void check(int ok)
{
    if (!ok)
        __builtin_trap();
}

/* Reads every byte of [p, p+n), so that an out-of-bounds span is caught. */
static void touch(const char *p, size_t n)
{
    unsigned s = 0;
    for (size_t i = 0; i < n; i++)
        s += (unsigned char)p[i];
    sink += s;
}

/* Splits a varint-prefixed string off [p, p+n) and checks the parts. */
static int split(const char *p, size_t n, const char **s, size_t *slen, const char **rest,
                 size_t *rlen)
{
    if (pz_split_prefixed(p, n, s, slen, rest, rlen) != 0)
        return -1;
    check(*s >= p && *s + *slen == *rest && *rest + *rlen == p + n);
    touch(*s, *slen);
    return 0;
}

/* Reads varints off a payload until one fails, checking each step. */
static void take_all(const char *p, size_t n)
{
    uint64_t v;
    while (n > 0) {
        const char *before = p;
        size_t nbefore = n;
        if (pz_take_varint(&p, &n, &v) != 0) {
            check(p == before && n == nbefore);
            return;
        }
        check(p > before && p - before <= 10 && n == nbefore - (size_t)(p - before));
    }
}

/* What the parent (I/O thread and pool binding) and the worker do with a
 * frame of each type. */
static void on_frame(const pz_frame *f)
{
    const char *p = f->payload, *a, *b, *c;
    size_t n = f->len, alen, blen, clen;
    uint64_t v;
    char msg[300];
    pz_error_parts e;
    touch(p, n);
    take_all(p, n);
    switch (f->type) {
    case PZ_F_RESULT:
    case PZ_F_ERROR:
        /* I/O thread: nanoseconds, then the values, or the message,
         * traceback and value (the checks slot.c makes) */
        if (pz_take_varint(&p, &n, &v) != 0)
            return;
        check(p + n == f->payload + f->len);
        if (f->type == PZ_F_ERROR && split(p, n, &a, &alen, &b, &blen) == 0 &&
            split(b, blen, &c, &clen, &b, &blen) == 0) {
            snprintf(msg, sizeof msg, "%.*s", (int)(alen < 250 ? alen : 250), a);
            touch(c, clen);
            touch(b, blen);
        }
        /* pool binding, ERROR record: arguments, message, traceback, value,
         * then the attempts (what is left) */
        if (pz_record_error(f, &e) == 0) {
            check(e.args >= f->payload && e.value + e.value_len == e.attempts &&
                  e.attempts + e.attempts_len == f->payload + f->len);
            touch(e.args, e.args_len);
            touch(e.message, e.message_len);
            touch(e.traceback, e.traceback_len);
            touch(e.value, e.value_len);
            touch(e.attempts, e.attempts_len);
        }
        return;
    case PZ_F_INIT_OK:
        /* record: the pid, then the executor copy */
        if (pz_take_varint(&p, &n, &v) == 0)
            touch(p, n);
        return;
    case PZ_F_INIT_ERROR:
        if (pz_record_init_error(f, &e) == 0) {
            snprintf(msg, sizeof msg, "%.*s", (int)(e.message_len < 250 ? e.message_len : 250),
                     e.message);
            touch(e.traceback, e.traceback_len);
        }
        return;
    case PZ_F_INIT: {
        /* worker: the version handshake, then the settings, the executor
         * spec and its arguments */
        static const pz_versions mine = {PZ_PROTOCOL_VERSION, "LuaJIT 2.1.0-beta3", "LJ2 le fr2"};
        const char *q = p;
        size_t left = n;
        if (pz_handshake_check(&q, &left, &mine, msg, sizeof msg) != 0) {
            check(q == p && left == n && msg[0] != '\0');
            return;
        }
        check(q > p && q + left == p + n);
        if (split(q, left, &a, &alen, &b, &blen) == 0)
            split(b, blen, &c, &clen, &b, &blen);
        return;
    }
    default:
        return;
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 2)
        return 0;
    size_t chunk = (size_t)data[0] + 1;
    size_t max_payload = (size_t)1 << (data[1] % 21);
    const char *stream = (const char *)data + 2;
    size_t left = size - 2;
    pz_buf in = PZ_BUF_INIT;
    while (left > 0) {
        /* size the read like read_worker: a whole announced frame at once */
        pz_frame f;
        size_t need = 0, want = chunk;
        const char *why = NULL;
        if (pz_frame_parse(in.data, in.len, max_payload, &f, &need, &why) == PZ_PARSE_MORE &&
            need > in.len + chunk)
            want = need - in.len;
        if (want > left)
            want = left;
        check(pz_buf_append(&in, stream, want) == 0);
        stream += want;
        left -= want;
        size_t pos = 0;
        for (;;) {
            need = 0;
            why = NULL;
            int rc = pz_frame_parse(in.data + pos, in.len - pos, max_payload, &f, &need, &why);
            if (rc == PZ_PARSE_MORE) {
                check(need == 0 || (need > in.len - pos && need <= PZ_FRAME_HEADER + max_payload));
                check(need != 0 || in.len - pos < PZ_FRAME_HEADER);
                break;
            }
            if (rc == PZ_PARSE_BAD) {
                /* the worker is rejected: nothing more is read from it */
                check(why != NULL && *why != '\0');
                pz_buf_free(&in);
                return 0;
            }
            check(rc == PZ_PARSE_OK);
            check(f.size == PZ_FRAME_HEADER + f.len && f.len <= max_payload);
            check(f.size <= in.len - pos && f.payload == in.data + pos + PZ_FRAME_HEADER);
            check(f.type >= PZ_F_INIT && f.type <= PZ_F_LAST);
            check(f.id == pz_frame_id(in.data + pos));
            on_frame(&f);
            pos += f.size;
        }
        pz_buf_consume(&in, pos);
    }
    pz_buf_free(&in);
    return 0;
}
