/*
 * frame.h - the messages between the parent and its workers, and between
 * the parent's I/O thread and its main thread.  This file owns their byte
 * layout: no other file reads or writes a header byte by its offset.
 *
 * A frame is a 14-byte header and a payload:
 *
 *   u32 payload length (little-endian)
 *   u8  type            (enum pz_frame_type)
 *   u8  aux             CALL: how many workers the call has killed (the
 *                       parent's bookkeeping; workers ignore it)
 *   u64 id              CALL/RESULT/ERROR: the call id; INIT_OK: the pid;
 *                       records: the worker slot
 *
 * Many frames go in one write and come out of one read; pz_frame_parse finds
 * the boundaries and rejects anything malformed.
 *
 * Payloads between processes (varint = LEB128, see codec_format.h):
 *   INIT        the version handshake (handshake.h: plain bytes, checked
 *               before anything else is decoded); varint n, n bytes: the
 *               worker's settings, an encoded table
 *               with fields path, cpath (package paths), kind ("value",
 *               "module" or "deferred"), max_message, spin_ns and
 *               kill_leftovers; varint n,
 *               n bytes: the executor spec; then the tuple of constructor
 *               arguments.  Built by lpool.c, read by worker.c.
 *   INIT_OK     the executor, encoded lossily (a copy for p.executors)
 *   INIT_ERROR  varint n, n bytes of message, then the traceback
 *   CALL        the argument tuple
 *   RESULT      varint nanoseconds the call ran, then the encoded value
 *   ERROR       varint nanoseconds, varint n, n bytes of message, traceback
 *   STOP        empty: finish, call the executor's close, exit
 *
 * Records (I/O thread -> main thread, through the pool's done queue) reuse
 * the header; they never cross a process boundary:
 *   RESULT      id = call id; payload = the encoded value
 *   ERROR       id = call id; payload = varint n, n bytes of argument tuple,
 *               varint m, m bytes of message, then the traceback
 *   INIT_OK     id = slot; payload = varint pid, then the executor copy
 *   INIT_ERROR  id = slot; payload = varint n, message, then the traceback;
 *               the slot is given up
 */
#ifndef PZ_FRAME_H
#define PZ_FRAME_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define PZ_FRAME_HEADER 14

/* Bytes a frame may carry beyond the encoded value that max_message limits:
 * the varints and the message of a RESULT or ERROR frame.  The parser of
 * either side accepts payloads up to max_message + PZ_FRAME_SLACK. */
#define PZ_FRAME_SLACK 64

enum pz_frame_type {
    PZ_F_INIT = 1,
    PZ_F_INIT_OK = 2,
    PZ_F_INIT_ERROR = 3,
    PZ_F_CALL = 4,
    PZ_F_RESULT = 5,
    PZ_F_ERROR = 6,
    PZ_F_STOP = 7,
    PZ_F_LAST = 7
};

typedef struct pz_frame {
    uint8_t type;
    uint8_t aux;
    uint64_t id;
    const char *payload;
    size_t len;  /* payload bytes */
    size_t size; /* header + payload */
} pz_frame;

/* One part of a payload for pz_frame_put: `len` bytes at `data`, preceded by
 * their length as a varint when `prefixed`. */
typedef struct pz_part {
    const void *data;
    size_t len;
    int prefixed;
} pz_part;

/* Writes a header at dst. */
static inline void pz_frame_header(char *dst, uint8_t type, uint8_t aux, uint64_t id, uint32_t len)
{
    unsigned char *d = (unsigned char *)dst;
    for (int i = 0; i < 4; i++)
        d[i] = (unsigned char)(len >> (8 * i));
    d[4] = type;
    d[5] = aux;
    for (int i = 0; i < 8; i++)
        d[6 + i] = (unsigned char)(id >> (8 * i));
}

/* Reads the payload length of the frame starting at p (14 bytes there). */
static inline uint32_t pz_frame_payload_len(const char *p)
{
    const unsigned char *s = (const unsigned char *)p;
    return (uint32_t)s[0] | (uint32_t)s[1] << 8 | (uint32_t)s[2] << 16 | (uint32_t)s[3] << 24;
}

/* Header plus payload of the frame starting at p. */
static inline size_t pz_frame_size(const char *p)
{
    return PZ_FRAME_HEADER + (size_t)pz_frame_payload_len(p);
}

static inline uint8_t pz_frame_type(const char *p)
{
    return (uint8_t)p[4];
}

static inline uint8_t pz_frame_aux(const char *p)
{
    return (uint8_t)p[5];
}

static inline void pz_frame_set_aux(char *p, uint8_t aux)
{
    p[5] = (char)aux;
}

/* Reads the id of the frame starting at p. */
static inline uint64_t pz_frame_id(const char *p)
{
    const unsigned char *s = (const unsigned char *)p + 6;
    uint64_t id = 0;
    for (int i = 7; i >= 0; i--)
        id = id << 8 | s[i];
    return id;
}

static inline const char *pz_frame_payload(const char *p)
{
    return p + PZ_FRAME_HEADER;
}

/* Fills *f from a whole frame at p whose bytes are trusted (a record this
 * process wrote, a frame in a queue): no checks. */
static inline void pz_frame_read(const char *p, pz_frame *f)
{
    f->type = pz_frame_type(p);
    f->aux = pz_frame_aux(p);
    f->id = pz_frame_id(p);
    f->len = pz_frame_payload_len(p);
    f->payload = p + PZ_FRAME_HEADER;
    f->size = PZ_FRAME_HEADER + f->len;
}

enum { PZ_PARSE_MORE = 0, PZ_PARSE_OK = 1, PZ_PARSE_BAD = -1 };

/* Looks for one frame at the start of [p, p+n), whose bytes are not
 * trusted.  Returns PZ_PARSE_OK and fills *f, PZ_PARSE_MORE when the bytes
 * end inside the frame (*need, if given, is set to the frame's full size
 * once the header is in), or PZ_PARSE_BAD with *why set when the header is
 * invalid: an unknown type, or a payload longer than max_payload. */
int pz_frame_parse(const char *p, size_t n, size_t max_payload, pz_frame *f, size_t *need,
                   const char **why);

/* Bytes of the varint that carries n (see codec_format.h). */
static inline size_t pz_frame_varint_len(uint64_t n)
{
    size_t len = 1;
    while (n >= 0x80) {
        n >>= 7;
        len++;
    }
    return len;
}

/* The payload size of a frame made of these parts (pz_frame_put), or
 * SIZE_MAX when it does not fit a frame's 32-bit length.  Inline, like
 * pz_frame_put: callers on the paths of every call pass constant parts. */
static inline size_t pz_frame_parts_len(const pz_part *parts, int nparts)
{
    size_t len = 0;
    for (int i = 0; i < nparts; i++) {
        size_t add = parts[i].len + (parts[i].prefixed ? pz_frame_varint_len(parts[i].len) : 0);
        if (add < parts[i].len || len + add < len)
            return SIZE_MAX;
        len += add;
    }
    return len > UINT32_MAX ? SIZE_MAX : len;
}

/* Writes a whole frame at dst, whose room is PZ_FRAME_HEADER +
 * pz_frame_parts_len(parts): the header, then each part.  Returns the
 * frame's size. */
static inline size_t pz_frame_put(char *dst, uint8_t type, uint8_t aux, uint64_t id,
                                  const pz_part *parts, int nparts)
{
    unsigned char *q = (unsigned char *)dst + PZ_FRAME_HEADER;
    for (int i = 0; i < nparts; i++) {
        if (parts[i].prefixed) {
            uint64_t v = parts[i].len;
            while (v >= 0x80) {
                *q++ = (unsigned char)(v | 0x80);
                v >>= 7;
            }
            *q++ = (unsigned char)v;
        }
        if (parts[i].len)
            memcpy(q, parts[i].data, parts[i].len);
        q += parts[i].len;
    }
    size_t len = (size_t)(q - (unsigned char *)dst) - PZ_FRAME_HEADER;
    pz_frame_header(dst, type, aux, id, (uint32_t)len);
    return PZ_FRAME_HEADER + len;
}

/* Splits a payload that starts with a varint-prefixed byte string: sets
 * *s and *slen to that string and *rest and *rlen to what follows.  Returns 0, or -1
 * when it is truncated. */
int pz_split_prefixed(const char *p, size_t n, const char **s, size_t *slen, const char **rest,
                      size_t *rlen);

/* Reads a leading varint from a payload: returns 0 and advances *p and *n, or -1. */
int pz_take_varint(const char **p, size_t *n, uint64_t *v);

/* The three parts of an ERROR record, or the message and traceback of an
 * INIT_ERROR record (args empty).  Returns 0, or -1 when malformed. */
typedef struct pz_error_parts {
    const char *args, *message, *traceback;
    size_t args_len, message_len, traceback_len;
} pz_error_parts;
int pz_record_error(const pz_frame *f, pz_error_parts *e);
int pz_record_init_error(const pz_frame *f, pz_error_parts *e);

#endif
