/*
 * arena.h - big strings handed to forked workers, and back, through memory
 * the pool shares with them, instead of being copied through their sockets.
 *
 * A pool whose workers are all forked (no launcher: a remote worker cannot
 * see the parent's memory) maps one region MAP_SHARED before its spawner
 * starts, so that every worker, replacements included, sees it at the
 * same address: a memfd, which the fork server maps at that address in
 * the spawner it makes (forkserver.h).  The codec writes a string of
 * PZ_SHARED_MIN bytes or more into the region and only (offset, length)
 * into the frame (PZ_T_SHARED, codec_format.h); the decoder on the other
 * side makes the Lua string from the region.  Per direction that is one copy in, one copy out, where the
 * socket took four (into the submit queue, into the worker's buffer, the
 * kernel's two).
 *
 * Layout: [calls area: calls_size][ring 0: ring_size]...[ring nrings - 1].
 *
 * The calls area holds the big strings of p(...)'s arguments and of maps'
 * chunks.  Rules: the parent's main thread alone takes and frees its
 * blocks, and the bookkeeping lives in the parent's own memory, never in
 * the region a worker could write.  A call's blocks stay until its last
 * record (RESULT or ERROR) is consumed: a worker's death or a retry sends
 * the same frame again, and an ERROR record decodes the arguments again.
 * A call cancelled after it was sent is still decoded by its worker: its
 * blocks stay until the I/O thread's RELEASE record (frame.h).
 * Blocks are taken in order, round the area, and freed in any order; the
 * area's tail passes freed blocks only.  A string whose encode fails is
 * given back (pz_calls_writer_abandon).
 *
 * Rings: one per worker record (io.h), for results.  Rules: only the
 * worker holding the record writes its ring, at the ring's head
 * (pz_slot_shared.ring_head, kept there so that a replacement goes on
 * where its predecessor stopped); the parent's main thread reads each
 * result as it consumes its record, in the order the worker sent them, and
 * then moves the ring's tail (pz_slot_shared.ring_tail) past it.  Blocks
 * of a result the worker does not send (refused, or its encode raised)
 * go back at once (pz_ring_writer_rewind); others no record names (the
 * worker died with them unsent) are passed when the tail moves beyond a
 * later one.
 *
 * No room is never a wait for a worker: the string then travels inline,
 * as it does without an arena.  p(...) waits for room in the calls area
 * as it waits for max_pending_bytes (lsubmit.c), and only while blocks are
 * taken, which the drain of their records frees.
 */
#ifndef PZ_ARENA_H
#define PZ_ARENA_H

#include <stddef.h>
#include <stdint.h>

#include "codec.h"

struct pz_slot_shared;

/* One block of the calls area: bytes [start, end) counted round the area
 * from the pool's start (the area's offset is start % calls_size). */
typedef struct pz_arena_block {
    uint64_t start, end;
    uint64_t id;   /* its call's, 0 while the call is being encoded */
    uint64_t next; /* the next block of the same call (a sequence number), or PZ_NO_BLOCK */
    int freed;
} pz_arena_block;

#define PZ_NO_BLOCK UINT64_MAX

typedef struct pz_arena {
    /* fixed once made */
    char *base;
    size_t size;
    size_t calls_size;
    size_t calls_soft;       /* past this, blocks go round early when they can */
    size_t ring_size;
    size_t ring_soft;
    int nrings;
    int nrecords;
    int fd;                  /* the region's memfd until the spawner has it, or -1 */
    /* the main thread's: the calls area */
    uint64_t head, tail;     /* bytes taken and freed, round the area */
    pz_arena_block *blocks;  /* by sequence number modulo cap */
    uint64_t first_seq;      /* the oldest block not passed by the tail */
    uint64_t next_seq;
    size_t cap;              /* a power of two */
    struct pz_arena_slot *by_id; /* call id -> its first block: open addressing */
    size_t by_id_cap;        /* a power of two, at least twice the calls held */
    size_t calls_held;       /* calls with blocks, committed */
    size_t calls_open;       /* writers with blocks, not committed yet */
    pz_arena_reader reader;  /* the records' decoder: its last_end says which ring block it read last */
    uint64_t sent;           /* bytes of arguments placed, in all (p:stats()) */
    struct pz_arena_queued *queued; /* calls with blocks, in id order (a ring) */
    size_t queued_first, queued_count, queued_cap; /* cap: a power of two */
    uint64_t queued_bytes;   /* their bytes */
} pz_arena;

/* Maps the region for a pool of nrecords worker records.  Returns NULL
 * (errno set) when it cannot: the pool then goes without, every string
 * inline. */
pz_arena *pz_arena_new(int nrecords);

/* In a spawner made by the fork server (forkserver.h): maps the parent's
 * region, memfd `fd`, at the parent's address `base`, for workers that
 * only read and write it (their records' rings and the calls area); the
 * parent's bookkeeping is not there.  NULL (errno set) when it cannot,
 * EEXIST when something else is mapped there. */
pz_arena *pz_arena_attach(int fd, void *base, int nrecords);

/* Closes the region's memfd (once the spawner has mapped it). */
void pz_arena_close_fd(pz_arena *a);

/* Unmaps the region and frees the bookkeeping. */
void pz_arena_free(pz_arena *a);

/* In a child forked from the parent (the spawner): unmaps the region
 * without touching the bookkeeping, which the parent's main thread may
 * have been changing at the fork.  A pool's spawner drops every other
 * pool's region so that their pages go when those pools do. */
void pz_arena_unmap(pz_arena *a);

/* ---- the calls area (parent, main thread) -------------------------------- */

/* The writer one encode of a call's arguments places its big strings
 * with; its blocks are given a call by commit, or back by abandon. */
typedef struct pz_calls_writer {
    pz_arena_writer w; /* first: the codec sees this */
    pz_arena *a;
    uint64_t first, last; /* sequence numbers of its blocks, PZ_NO_BLOCK */
} pz_calls_writer;

/* Returns &cw->w, ready for an encode, or NULL when a is NULL. */
pz_arena_writer *pz_calls_writer_init(pz_calls_writer *cw, pz_arena *a);

/* The encode's blocks belong to call id from now on (id > 0).  Cannot
 * fail: the bookkeeping's room was taken with the first block. */
void pz_calls_writer_commit(pz_calls_writer *cw, uint64_t id);

/* The encode failed or its call was not queued: its blocks are free. */
void pz_calls_writer_abandon(pz_calls_writer *cw);

/* Call id's last record was consumed: its blocks, if any, are free. */
void pz_arena_release_call(pz_arena *a, uint64_t id);

/* Forgets the big strings of the first `taken` calls (taken by workers:
 * ids are given and taken in order), for pz_arena_pending_bytes. */
void pz_arena_forget_taken(pz_arena *a, uint64_t taken);

/* The bytes of big strings held by the calls no worker has taken yet, as
 * of the last pz_arena_forget_taken. */
uint64_t pz_arena_pending_bytes(const pz_arena *a);

/* Whether p(...) should wait before placing `need` bytes of big strings:
 * they would fit in the area once freed, do not fit now, and blocks are
 * held (their records' drain frees them). */
int pz_arena_calls_full(const pz_arena *a, size_t need);

/* ---- the rings ----------------------------------------------------------- */

/* The writer a worker places its results' big strings with. */
typedef struct pz_ring_writer {
    pz_arena_writer w; /* first: the codec sees this */
    char *base;        /* the region */
    uint64_t offset;   /* the ring's, from base */
    size_t size;
    size_t soft;       /* past this, blocks go round early when they can */
    uint64_t skip_from, skip_to; /* the last bytes skipped going round */
    struct pz_slot_shared *shared; /* the record's: head and tail */
} pz_ring_writer;

/* Returns &rw->w for ring `record` of a (worker process). */
pz_arena_writer *pz_ring_writer_init(pz_ring_writer *rw, const pz_arena *a, int record,
                                     struct pz_slot_shared *shared);

/* Where a ring's writer stands, taken before an encode whose frame may not
 * be sent. */
typedef struct pz_ring_mark {
    uint64_t head, skip_from, skip_to;
} pz_ring_mark;

pz_ring_mark pz_ring_writer_mark(const pz_ring_writer *rw);

/* The frame of the encode begun at mark is not sent (the result was
 * refused, or its encode raised): its blocks go back to the ring at once.
 * No frame names them, so the parent never reads them; left in place,
 * they would count as unread until it read a later block, and a ring
 * filled with them would never see one. */
void pz_ring_writer_rewind(pz_ring_writer *rw, const pz_ring_mark *mark);

/* The parent's main thread consumed a record whose decode last read a
 * string ending at offset `end` (a->reader.last_end): the ring that holds
 * it, if any, is free up to there.  shared: the pool's worker records. */
void pz_arena_release_ring(pz_arena *a, struct pz_slot_shared *shared, uint64_t end);

#endif
