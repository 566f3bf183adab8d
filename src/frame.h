/*
 * frame.h - the messages between the parent and its workers, and between
 * the parent's I/O thread and its main thread.  This file owns their byte
 * layout: no other file reads or writes a header byte by its offset.
 *
 * A frame is a 24-byte header and a payload, integers little-endian:
 *
 *   u32 payload length
 *   u8  type            (enum pz_frame_type)
 *   u8  deaths          CALL: workers the call has killed
 *   u8  tag             CALL, RESULT, ERROR: who takes the result: 0 for
 *                       the pool's own lists, else a map or stream (lpool.c)
 *   u8  tries           CALL: times its executor raised and it ran again
 *   u8  flags           CALL: PZ_CALL_*; ERROR record: its kind, PZ_ERR_*
 *   u8  reserved[3]     zero
 *   u32 timeout_ms      CALL: 0 for the pool's timeout, PZ_NO_TIMEOUT for none
 *   u64 id              CALL/RESULT/ERROR: the call id; INIT_OK: the pid;
 *                       records: the worker slot
 *
 * deaths, tag, tries, flags and timeout_ms are the parent's bookkeeping,
 * carried with the call wherever it goes; workers read only the flags
 * PZ_CALL_CHUNK and PZ_CALL_RUN and answer with 0 in all of them, but for
 * the flags PZ_RESULT_RUN and PZ_RESULT_ITEM_RAISED.
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
 *               arguments.  Built by linit.c, read by worker.c.
 *   INIT_OK     the executor, encoded lossily (a copy for p.executors)
 *   INIT_ERROR  varint n, n bytes of message, then the traceback
 *   CALL        the argument tuple; with flag PZ_CALL_CHUNK, the tuple
 *               (items, n): the executor runs once on each of items[1..n]
 *               (chunk.h), and the result is that chunk's answer; with
 *               flag PZ_CALL_RUN, several calls of their own (run.h),
 *               each answered by a RESULT or ERROR frame of its own
 *   RESULT      varint nanoseconds the call ran, then the tuple of values
 *               the executor returned; with flag PZ_RESULT_RUN, the
 *               results of several calls of a run (run.h)
 *   ERROR       varint nanoseconds, varint n, n bytes of message, varint m,
 *               m bytes of traceback, then the value error() was given,
 *               encoded lossily (empty when even that failed)
 *   STOP        empty: finish, call the executor's close, exit
 *   CLOSED      what the executor's close returned, encoded lossily (sent
 *               before a worker leaves after STOP, when it has a close)
 *
 * Records (I/O thread -> main thread, through the pool's done queue) reuse
 * the header; they never cross a process boundary:
 *   RESULT      id = call id, tag; payload = the tuple of values, or with
 *               flags PZ_REC_BOXED a pz_box (bigbuf.h) holding it; with
 *               PZ_REC_RUN, the results of several calls with this tag
 *               (id: the first's; payload: run.h); PZ_REC_CHUNK when the
 *               call was a map's chunk (never in a run)
 *   ERROR       id = call id, tag, flags = its kind (PZ_ERR_*), with
 *               PZ_REC_HELD when a worker may still run the call; payload =
 *               four varint-prefixed byte strings: the argument tuple, the
 *               message, the traceback, the encoded error value (may be
 *               empty); then the earlier attempts (retries): varint count,
 *               and for each varint slot (1-based), varint pid, varint n
 *               and n bytes of message
 *   INIT_OK     id = slot; payload = varint pid, then the executor copy
 *   INIT_ERROR  id = slot; payload = varint n, message, then the traceback;
 *               the slot is given up
 *   CLOSED      id = slot; payload = the value its executor's close returned
 *   RELEASE     id = call id, no payload: a call cancelled while a worker
 *               held it (its ERROR record had PZ_REC_HELD) has left that
 *               worker, unrun or with its answer dropped: no process
 *               reads its arguments any more (their big strings, arena.h)
 */
#ifndef PZ_FRAME_H
#define PZ_FRAME_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "le.h"

#define PZ_FRAME_HEADER 24

/* flags of a CALL frame. */
#define PZ_CALL_CANCELLED 1 /* given up on: its answer, if any comes, is dropped */
#define PZ_CALL_CHUNK 2     /* a map's chunk of items, one executor call each (chunk.h) */
#define PZ_CALL_RUN 4       /* several calls in one frame, on the wire only (run.h) */
#define PZ_CALL_SUSPECT 8   /* was sent to a worker that broke between calls: goes alone (slot.c) */

/* flags of a worker's RESULT frame: it answers several calls of a run in a
 * row (run.h); it answers a chunk one of whose items raised (chunk.h):
 * the I/O thread counts it a failure, as the error record it becomes
 * (the map's, or the store's: chunks.lua) is one. */
#define PZ_RESULT_RUN 4
#define PZ_RESULT_ITEM_RAISED 8

/* flags of a RESULT record. */
#define PZ_REC_BOXED 0x80 /* the payload is a pz_box (bigbuf.h) */
#define PZ_REC_RUN 0x20   /* the results of several calls (run.h) */
/* the answer of a map's chunk (its CALL had PZ_CALL_CHUNK): once its map
 * has let it go, the drain cannot tell it from a call by its tag, and a
 * chunk that stopped at an item that raised is stored as an error record
 * (lrecords.c, chunks.lua), not as the results of the items before it */
#define PZ_REC_CHUNK 0x10
/* a chunk's answer the I/O thread counted failed (its worker flagged it
 * PZ_RESULT_ITEM_RAISED): a drain that cannot decode it and makes it an
 * error of kind "parent" does not count it again (lrecords.c) */
#define PZ_REC_FAILED 0x08

/* flag of an ERROR record, beside its kind: the call was cancelled after it
 * was sent, and its worker may still decode its arguments; a RELEASE
 * record says when it no longer can. */
#define PZ_REC_HELD 0x40

/* flags of an ERROR record: why the call failed. */
enum pz_error_kind {
    PZ_ERR_RAISED = 0,    /* the executor raised (or its result could not travel) */
    PZ_ERR_TIMEOUT = 1,   /* it ran longer than its timeout */
    PZ_ERR_CANCELLED = 2, /* p:cancel */
    PZ_ERR_KILLER = 3,    /* it killed max_deaths workers */
    PZ_ERR_PARENT = 4     /* the parent could not take its result */
};

/* timeout_ms of a call that has none, whatever the pool's. */
#define PZ_NO_TIMEOUT UINT32_MAX

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
    PZ_F_CLOSED = 8,
    PZ_F_LAST = 8,  /* the last type that crosses a process boundary */
    PZ_F_RELEASE = 9 /* a record only: see the top */
};

typedef struct pz_frame {
    uint8_t type;
    uint8_t deaths, tag, tries, flags;
    uint32_t timeout_ms;
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

/* Byte offsets in the header. */
enum {
    PZ_FO_LEN = 0,
    PZ_FO_TYPE = 4,
    PZ_FO_DEATHS = 5,
    PZ_FO_TAG = 6,
    PZ_FO_TRIES = 7,
    PZ_FO_FLAGS = 8,
    PZ_FO_TIMEOUT = 12,
    PZ_FO_ID = 16
};

/* Writes a header at dst, the bookkeeping bytes zero. */
static inline void pz_frame_header(char *dst, uint8_t type, uint64_t id, uint32_t len)
{
    /* type, then deaths, tag, tries, flags and reserved zero; timeout 0 */
    pz_le32_put(dst + PZ_FO_LEN, len);
    pz_le64_put(dst + PZ_FO_TYPE, type);
    pz_le32_put(dst + PZ_FO_TIMEOUT, 0);
    pz_le64_put(dst + PZ_FO_ID, id);
}

/* Whether the header at p can be a worker's answer to INIT: type INIT_OK
 * or INIT_ERROR, and the bookkeeping bytes zero, as a worker writes them.
 * What a remote launcher prints before its worker starts (a shell's
 * start-up file) may pass pz_frame_parse's checks once the real header
 * follows: "hi!\n" reads as a 170 MB frame whose type is the INIT_OK's
 * low length byte, and its length would be waited for. */
static inline int pz_frame_is_init_answer(const char *p)
{
    uint8_t type = (uint8_t)p[PZ_FO_TYPE];
    if (type != PZ_F_INIT_OK && type != PZ_F_INIT_ERROR)
        return 0;
    for (int i = PZ_FO_DEATHS; i < PZ_FO_ID; i++)
        if (p[i])
            return 0;
    return 1;
}

/* Reads the payload length of the frame starting at p (a header there). */
static inline uint32_t pz_frame_payload_len(const char *p)
{
    return pz_le32_get(p + PZ_FO_LEN);
}

/* Header plus payload of the frame starting at p. */
static inline size_t pz_frame_size(const char *p)
{
    return PZ_FRAME_HEADER + (size_t)pz_frame_payload_len(p);
}

static inline uint8_t pz_frame_type(const char *p)
{
    return (uint8_t)p[PZ_FO_TYPE];
}

static inline uint8_t pz_frame_deaths(const char *p)
{
    return (uint8_t)p[PZ_FO_DEATHS];
}

static inline void pz_frame_set_deaths(char *p, uint8_t deaths)
{
    p[PZ_FO_DEATHS] = (char)deaths;
}

static inline uint8_t pz_frame_tag(const char *p)
{
    return (uint8_t)p[PZ_FO_TAG];
}

static inline void pz_frame_set_tag(char *p, uint8_t tag)
{
    p[PZ_FO_TAG] = (char)tag;
}

static inline uint8_t pz_frame_tries(const char *p)
{
    return (uint8_t)p[PZ_FO_TRIES];
}

static inline void pz_frame_set_tries(char *p, uint8_t tries)
{
    p[PZ_FO_TRIES] = (char)tries;
}

static inline uint8_t pz_frame_flags(const char *p)
{
    return (uint8_t)p[PZ_FO_FLAGS];
}

static inline void pz_frame_set_flags(char *p, uint8_t flags)
{
    p[PZ_FO_FLAGS] = (char)flags;
}

static inline uint32_t pz_frame_timeout_ms(const char *p)
{
    return pz_le32_get(p + PZ_FO_TIMEOUT);
}

static inline void pz_frame_set_timeout_ms(char *p, uint32_t ms)
{
    pz_le32_put(p + PZ_FO_TIMEOUT, ms);
}

/* Reads the id of the frame starting at p. */
static inline uint64_t pz_frame_id(const char *p)
{
    return pz_le64_get(p + PZ_FO_ID);
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
    f->deaths = pz_frame_deaths(p);
    f->tag = pz_frame_tag(p);
    f->tries = pz_frame_tries(p);
    f->flags = pz_frame_flags(p);
    f->timeout_ms = pz_frame_timeout_ms(p);
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
 * pz_frame_parts_len(parts): the header (bookkeeping bytes zero), then
 * each part.  Returns the frame's size. */
static inline size_t pz_frame_put(char *dst, uint8_t type, uint64_t id, const pz_part *parts,
                                  int nparts)
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
    pz_frame_header(dst, type, id, (uint32_t)len);
    return PZ_FRAME_HEADER + len;
}

/* Splits a payload that starts with a varint-prefixed byte string: sets
 * *s and *slen to that string and *rest and *rlen to what follows.  Returns 0, or -1
 * when it is truncated. */
int pz_split_prefixed(const char *p, size_t n, const char **s, size_t *slen, const char **rest,
                      size_t *rlen);

/* Reads a leading varint from a payload: returns 0 and advances *p and *n, or -1. */
int pz_take_varint(const char **p, size_t *n, uint64_t *v);

/* The parts of an ERROR record, or the message and traceback of an
 * INIT_ERROR record (the rest empty).  `attempts` is left unparsed (see
 * the layout above).  Returns 0, or -1 when malformed. */
typedef struct pz_error_parts {
    const char *args, *message, *traceback, *value, *attempts;
    size_t args_len, message_len, traceback_len, value_len, attempts_len;
} pz_error_parts;
int pz_record_error(const pz_frame *f, pz_error_parts *e);
int pz_record_init_error(const pz_frame *f, pz_error_parts *e);

#endif
