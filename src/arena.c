/*
 * arena.c - the region a pool shares with its forked workers for big
 * strings: its layout, the parent's blocks in the calls area, the
 * workers' rings (rules: arena.h).
 */
#include "arena.h"

#include <errno.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#include "sys.h"
#include "worker.h"

/* Sizes.  The calls area holds the big arguments of calls queued, running
 * and finished but not drained: 64 MiB keeps dozens of 1 MiB calls in
 * flight, as max_pending_bytes does for calls sent inline.  The rings
 * share 256 MiB, 16 MiB each at most: a ring holds the results its worker
 * sent and the parent has not drained yet.  Pages are touched only as
 * strings use them (MAP_NORESERVE; blocks go round early, so a pool whose
 * script keeps up touches a few MiB), and once touched are kept, not
 * given back between calls: faulting them in again would cost what the
 * region saves. */
#define CALLS_SIZE ((size_t)64 << 20)
#define RINGS_TOTAL ((size_t)256 << 20)
#define RING_MAX ((size_t)16 << 20)
#define RING_ALIGN ((size_t)64 << 10)
/* Where blocks go round early (ring_start): measured with 1 MiB strings,
 * 2 MiB and 1 MiB moved them fastest, ahead of 4 and 2, 8 and 4, and
 * none. */
#define CALLS_SOFT ((size_t)2 << 20)
#define RING_SOFT ((size_t)1 << 20)
#define BLOCKS_FIRST 64

/* A call whose big strings count toward max_pending_bytes until a worker
 * takes it. */
typedef struct pz_arena_queued {
    uint64_t id;
    uint64_t bytes;
} pz_arena_queued;

typedef struct pz_arena_slot {
    uint64_t id; /* 0: empty */
    uint64_t seq;
} pz_arena_slot;

/* The fixed part of a region for nrecords worker records: the same in
 * the parent and in a spawner that maps the region again (attach). */
static void layout(pz_arena *a, int nrecords)
{
    size_t ring = RINGS_TOTAL / (size_t)nrecords;
    if (ring > RING_MAX)
        ring = RING_MAX;
    ring -= ring % RING_ALIGN;
    a->calls_size = CALLS_SIZE;
    a->calls_soft = CALLS_SOFT;
    a->ring_soft = ring / 2 < RING_SOFT ? ring / 2 : RING_SOFT;
    a->ring_size = ring;
    a->nrings = ring ? nrecords : 0;
    a->nrecords = nrecords;
    a->size = a->calls_size + (size_t)a->nrings * ring;
}

/* A region for nrecords worker records: mapped anew when fd < 0 (its
 * memfd kept in a->fd), else memfd fd's mapped at base. */
static pz_arena *make(int nrecords, int fd, void *base)
{
    if (nrecords < 1)
        return errno = EINVAL, NULL;
    pz_arena *a = calloc(1, sizeof *a);
    if (!a)
        return NULL;
    layout(a, nrecords);
    a->fd = -1;
    if (fd < 0)
        a->base = pz_map_shared(a->size, MAP_NORESERVE, &a->fd);
    else if (pz_map_shared_at(fd, base, a->size, MAP_NORESERVE) == 0)
        a->base = base;
    if (!a->base) {
        int e = errno;
        free(a);
        errno = e;
        return NULL;
    }
    a->reader.base = a->base;
    a->reader.size = a->size;
    return a;
}

pz_arena *pz_arena_new(int nrecords)
{
    return make(nrecords, -1, NULL);
}

pz_arena *pz_arena_attach(int fd, void *base, int nrecords)
{
    if (fd < 0)
        return errno = EBADF, NULL;
    return make(nrecords, fd, base);
}

void pz_arena_close_fd(pz_arena *a)
{
    if (a && a->fd >= 0) {
        close(a->fd);
        a->fd = -1;
    }
}

void pz_arena_unmap(pz_arena *a)
{
    if (a && a->base)
        munmap(a->base, a->size);
}

void pz_arena_free(pz_arena *a)
{
    if (!a)
        return;
    pz_arena_unmap(a);
    pz_arena_close_fd(a);
    free(a->blocks);
    free(a->by_id);
    free(a->queued);
    free(a);
}

/* ---- the calls area ------------------------------------------------------ */

static pz_arena_block *block(const pz_arena *a, uint64_t seq)
{
    return &a->blocks[seq & (a->cap - 1)];
}

/* Room for one more block in the table of blocks; 0, or -1. */
static int blocks_room(pz_arena *a)
{
    if (a->next_seq - a->first_seq < a->cap)
        return 0;
    size_t cap = a->cap ? 2 * a->cap : BLOCKS_FIRST;
    pz_arena_block *nb = malloc(cap * sizeof *nb);
    if (!nb)
        return -1;
    for (uint64_t s = a->first_seq; s < a->next_seq; s++)
        nb[s & (cap - 1)] = *block(a, s);
    free(a->blocks);
    a->blocks = nb;
    a->cap = cap;
    return 0;
}

/* Where n bytes would start in a ring of `size` bytes whose writer is at
 * head and whose reader at tail: at the head, or at the start of the next
 * round when they do not fit before the end, or when the head is past
 * `soft` while at most `soft` bytes are unread.  Going round early keeps
 * the bytes in use within the first few MiB while the reader keeps up,
 * where the caches still hold them (with the calls area used end to end,
 * 64 MiB, p:map moved 1 MiB strings at half the speed, 4.4-5.6 GB/s
 * against 8.9-14.6 in alternating runs); the bytes it skips count as
 * used until the reader passes them, so it does so only while little is
 * unread, and a reader that lags has the whole ring. */
static uint64_t ring_start(uint64_t head, uint64_t tail, size_t size, size_t soft, size_t n)
{
    uint64_t pos = head % size, next = head + (size - pos);
    if (pos + n > size || (pos >= soft && head - tail <= soft && next + n - tail <= size))
        return next;
    return head;
}

static uint64_t calls_start(const pz_arena *a, size_t n)
{
    return ring_start(a->head, a->tail, a->calls_size, a->calls_soft, n);
}

static int by_id_room(pz_arena *a);

/* Room in the ring of queued calls for one more than are queued and open:
 * writers open at once (a finalizer's p(s) while a map's chunk encodes)
 * each took their room before either committed; 0, or -1. */
static int queued_room(pz_arena *a)
{
    size_t want = a->queued_count + a->calls_open + 1;
    if (want <= a->queued_cap)
        return 0;
    size_t cap = a->queued_cap ? 2 * a->queued_cap : BLOCKS_FIRST;
    while (cap < want)
        cap *= 2;
    pz_arena_queued *nq = malloc(cap * sizeof *nq);
    if (!nq)
        return -1;
    for (size_t i = 0; i < a->queued_count; i++)
        nq[i] = a->queued[(a->queued_first + i) & (a->queued_cap - 1)];
    free(a->queued);
    a->queued = nq;
    a->queued_cap = cap;
    a->queued_first = 0;
    return 0;
}

static char *calls_place(pz_arena_writer *w, size_t n, uint64_t *offset)
{
    pz_calls_writer *cw = (pz_calls_writer *)w;
    pz_arena *a = cw->a;
    if (n > a->calls_size / 2)
        return NULL;
    uint64_t start = calls_start(a, n);
    if (start + n - a->tail > a->calls_size || blocks_room(a) != 0)
        return NULL;
    /* A writer's first block takes its entry in the table of calls now,
     * so that commit, after the call is queued, cannot fail. */
    if (cw->first == PZ_NO_BLOCK) {
        if (by_id_room(a) != 0 || queued_room(a) != 0)
            return NULL;
        a->calls_open++;
    }
    uint64_t seq = a->next_seq++;
    *block(a, seq) = (pz_arena_block){start, start + n, 0, PZ_NO_BLOCK, 0};
    a->head = start + n;
    if (cw->last == PZ_NO_BLOCK)
        cw->first = seq;
    else
        block(a, cw->last)->next = seq;
    cw->last = seq;
    *offset = start % a->calls_size; /* the area starts the region */
    return a->base + *offset;
}

pz_arena_writer *pz_calls_writer_init(pz_calls_writer *cw, pz_arena *a)
{
    cw->w.place = calls_place;
    cw->w.placed = 0;
    cw->a = a;
    cw->first = cw->last = PZ_NO_BLOCK;
    return a ? &cw->w : NULL;
}

/* The tail passes the freed blocks at the front, and the bytes skipped
 * before the next one (going round). */
static void pass_freed(pz_arena *a)
{
    while (a->first_seq < a->next_seq && block(a, a->first_seq)->freed)
        a->first_seq++;
    a->tail = a->first_seq < a->next_seq ? block(a, a->first_seq)->start : a->head;
}

static void free_chain(pz_arena *a, uint64_t seq)
{
    for (; seq != PZ_NO_BLOCK; seq = block(a, seq)->next)
        block(a, seq)->freed = 1;
    pass_freed(a);
}

void pz_calls_writer_abandon(pz_calls_writer *cw)
{
    if (cw->a && cw->first != PZ_NO_BLOCK) {
        cw->a->calls_open--;
        free_chain(cw->a, cw->first);
    }
    cw->first = cw->last = PZ_NO_BLOCK;
}

static size_t slot_of(const pz_arena *a, uint64_t id)
{
    /* ids are consecutive: the low bits spread them well enough */
    return (size_t)(id * 0x9e3779b97f4a7c15u >> 20) & (a->by_id_cap - 1);
}

static void by_id_put(pz_arena *a, uint64_t id, uint64_t seq)
{
    size_t i = slot_of(a, id);
    while (a->by_id[i].id)
        i = (i + 1) & (a->by_id_cap - 1);
    a->by_id[i] = (pz_arena_slot){id, seq};
}

/* Room in the table of calls for one more than are held and open (kept
 * under half full); 0, or -1. */
static int by_id_room(pz_arena *a)
{
    if (2 * (a->calls_held + a->calls_open + 1) <= a->by_id_cap)
        return 0;
    size_t cap = a->by_id_cap ? 2 * a->by_id_cap : BLOCKS_FIRST;
    pz_arena_slot *old = a->by_id;
    size_t old_cap = a->by_id_cap;
    pz_arena_slot *nt = calloc(cap, sizeof *nt);
    if (!nt)
        return -1;
    a->by_id = nt;
    a->by_id_cap = cap;
    for (size_t i = 0; i < old_cap; i++)
        if (old[i].id)
            by_id_put(a, old[i].id, old[i].seq);
    free(old);
    return 0;
}

void pz_calls_writer_commit(pz_calls_writer *cw, uint64_t id)
{
    pz_arena *a = cw->a;
    if (!a || cw->first == PZ_NO_BLOCK)
        return;
    for (uint64_t s = cw->first; s != PZ_NO_BLOCK; s = block(a, s)->next)
        block(a, s)->id = id;
    by_id_put(a, id, cw->first); /* its room was taken by the first block */
    a->sent += cw->w.placed;
    /* Commits come in id order: each right after its call was queued. */
    a->queued[(a->queued_first + a->queued_count++) & (a->queued_cap - 1)] =
        (pz_arena_queued){id, cw->w.placed};
    a->queued_bytes += cw->w.placed;
    a->calls_open--;
    a->calls_held++;
    cw->first = cw->last = PZ_NO_BLOCK;
}

void pz_arena_release_call(pz_arena *a, uint64_t id)
{
    if (!a || a->calls_held == 0)
        return;
    size_t i = slot_of(a, id), mask = a->by_id_cap - 1;
    while (a->by_id[i].id != id) {
        if (!a->by_id[i].id)
            return; /* a call without big strings */
        i = (i + 1) & mask;
    }
    uint64_t seq = a->by_id[i].seq;
    /* Removes the entry, moving back those after it that it displaced. */
    size_t hole = i;
    for (size_t j = (i + 1) & mask; a->by_id[j].id; j = (j + 1) & mask) {
        size_t home = slot_of(a, a->by_id[j].id);
        if (((j - home) & mask) >= ((j - hole) & mask)) {
            a->by_id[hole] = a->by_id[j];
            hole = j;
        }
    }
    a->by_id[hole].id = 0;
    a->calls_held--;
    free_chain(a, seq);
}

void pz_arena_forget_taken(pz_arena *a, uint64_t taken)
{
    if (!a)
        return;
    while (a->queued_count && a->queued[a->queued_first].id <= taken) {
        a->queued_bytes -= a->queued[a->queued_first].bytes;
        a->queued_first = (a->queued_first + 1) & (a->queued_cap - 1);
        a->queued_count--;
    }
}

uint64_t pz_arena_pending_bytes(const pz_arena *a)
{
    return a ? a->queued_bytes : 0;
}

int pz_arena_calls_full(const pz_arena *a, size_t need)
{
    return a && a->calls_held > 0 && need <= a->calls_size / 2 &&
           calls_start(a, need) + need - a->tail > a->calls_size;
}

/* ---- the rings ------------------------------------------------------------- */

static char *ring_place(pz_arena_writer *w, size_t n, uint64_t *offset)
{
    pz_ring_writer *rw = (pz_ring_writer *)w;
    size_t size = rw->size;
    if (n > size / 2)
        return NULL;
    uint64_t head = atomic_load_explicit(&rw->shared->ring_head, memory_order_relaxed);
    uint64_t tail = atomic_load_explicit(&rw->shared->ring_tail, memory_order_acquire);
    /* The parent's tail moves to the ends of blocks it read; once it has
     * read every block before the last skip, the bytes skipped hold
     * nothing it will read, though it passes them only with the next
     * block. */
    if (tail >= rw->skip_from && tail < rw->skip_to)
        tail = rw->skip_to;
    if (tail > head)
        head = tail; /* only wrong sums in the parent could do it: never trust them past */
    uint64_t start = ring_start(head, tail, size, rw->soft, n);
    if (start + n - tail > size)
        return NULL;
    if (start != head) {
        rw->skip_from = head;
        rw->skip_to = start;
    }
    /* The parent reads the bytes only after the frame that names them,
     * which this process writes later: the socket orders the two. */
    atomic_store_explicit(&rw->shared->ring_head, start + n, memory_order_relaxed);
    *offset = rw->offset + start % size;
    return rw->base + *offset;
}

pz_arena_writer *pz_ring_writer_init(pz_ring_writer *rw, const pz_arena *a, int record,
                                     struct pz_slot_shared *shared)
{
    if (!a || record < 0 || record >= a->nrings)
        return NULL;
    rw->w.place = ring_place;
    rw->w.placed = 0;
    rw->base = a->base;
    rw->offset = a->calls_size + (uint64_t)record * a->ring_size;
    rw->size = a->ring_size;
    rw->soft = a->ring_soft;
    rw->skip_from = rw->skip_to = 0;
    rw->shared = shared;
    return &rw->w;
}

pz_ring_mark pz_ring_writer_mark(const pz_ring_writer *rw)
{
    return (pz_ring_mark){atomic_load_explicit(&rw->shared->ring_head, memory_order_relaxed),
                          rw->skip_from, rw->skip_to};
}

void pz_ring_writer_rewind(pz_ring_writer *rw, const pz_ring_mark *mark)
{
    atomic_store_explicit(&rw->shared->ring_head, mark->head, memory_order_relaxed);
    rw->skip_from = mark->skip_from;
    rw->skip_to = mark->skip_to;
}

void pz_arena_release_ring(pz_arena *a, struct pz_slot_shared *shared, uint64_t end)
{
    if (!a || end <= a->calls_size || end > a->size || !a->ring_size)
        return;
    uint64_t r = (end - 1 - a->calls_size) / a->ring_size;
    if (r >= (uint64_t)a->nrings)
        return;
    uint64_t size = a->ring_size;
    uint64_t end_pos = (end - a->calls_size - r * size) % size; /* 0 for the ring's end */
    pz_slot_shared *sh = &shared[r];
    /* The block ends at or below the ring's head (its writer moved the head
     * past it before it sent the frame naming it: the socket orders the
     * two), and less than a round below: a writer places its blocks within
     * a round of its tail, which is never past a block the parent has yet
     * to read (ring_place; the bytes it skipped going round count as read
     * once the parent has read every block before them).  So the block's
     * end is the head less the distance back from the head's place to
     * end_pos, round the ring.  (Not the distance forward from the
     * parent's tail: a block after a skip that no frame named leaves the
     * tail at the skip, more than a round behind the blocks after it.) */
    uint64_t head = atomic_load_explicit(&sh->ring_head, memory_order_relaxed);
    uint64_t tail = atomic_load_explicit(&sh->ring_tail, memory_order_relaxed);
    uint64_t back = (head % size + size - end_pos) % size;
    if (back > head)
        return; /* only a head a worker wrote wrong: never trust it past */
    uint64_t at = head - back;
    if (at > tail)
        atomic_store_explicit(&sh->ring_tail, at, memory_order_release);
}
