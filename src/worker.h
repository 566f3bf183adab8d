/*
 * worker.h - the loop every worker process runs.
 */
#ifndef PZ_WORKER_H
#define PZ_WORKER_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

/* What a worker tells its parent without sending a message: one of these
 * per worker record (io.h) lives in memory the parent maps shared before
 * its spawner starts (a memfd: see forkserver.h), so every worker
 * inherits it.  `running` is the id
 * of the call the worker is handling, from decoding its arguments to
 * encoding its result (0 between calls), so that when the worker dies the
 * parent knows which call killed it, even though results of the calls
 * before it may still sit unsent in the worker's buffer.  `started` is
 * when that call began (pz_now_ns: the clock is the same in every
 * process), for its timeout; the worker stores it before `running`, so a
 * reader that sees a call's id sees that call's start or a later one,
 * never an earlier one.  Padded to a cache line so that workers do not
 * slow each other down.  ring_head and ring_tail belong to arena.h. */
typedef struct pz_slot_shared {
    _Atomic uint64_t running;
    _Atomic int64_t started;
    /* The record's ring of big results (arena.h): bytes written round it by
     * its workers, and bytes the parent has read. */
    _Atomic uint64_t ring_head; /* written by the record's worker */
    _Atomic uint64_t ring_tail; /* written by the parent's main thread */
    char pad[32];
} pz_slot_shared;

/* The bytes of a pool's array of them: one per worker record, two per
 * slot (io.h). */
static inline size_t pz_slots_shared_size(int nslots)
{
    return 2 * (size_t)nslots * sizeof(pz_slot_shared);
}

struct lua_State;
struct pz_arena;

/* Gives a new worker process its signal dispositions: every signal's
 * default, an empty mask, and SIGINT and SIGQUIT caught by a handler that
 * does nothing (Ctrl-C is the parent's to handle; a handler rather than
 * SIG_IGN because an ignored signal stays ignored across exec, and programs
 * the executor starts should get the defaults).  Returns 0, or -1 when
 * sigaction fails. */
int pz_worker_signals(void);

/* core.worker_fail_answer(k), for tests: in a worker, the k-th result of
 * one number that wruns.h's helper hands over from now reports that
 * memory ran out, as it would had the output no room for it (outside a
 * worker it changes nothing). */
int pz_worker_fail_answer(lua_State *L);

/* Lua's own message for a raise that found no memory is a bare "not
 * enough memory", the same words the parent uses for its own lack.  A
 * message that ends with those words ("not enough memory" itself, or a
 * codec error's "call N: not enough memory") comes back with " (in worker
 * S, pid P)" added (remote: " (in the worker on HOST, pid P)"), written
 * into buf; any other message, or one too long for buf, comes back as it
 * is.  Allocates nothing (memory is short).  Worker process only. */
const char *pz_worker_whose_memory(const char *msg, char *buf, size_t size);

/* Runs in a fresh worker process: builds a fresh LuaJIT state (prepared by
 * `setup`: package.preload), reads the INIT frame from in_fd, builds the
 * executor, then serves CALL frames until STOP or end of file, answering
 * on out_fd.  A local worker has one socket for both (in_fd == out_fd)
 * and publishes its running call in `shared`; a remote one (`remote`, see
 * worker.c) has two pipes and a `shared` nobody reads.  `arena` (NULL for
 * none) holds the pool's shared strings; the worker writes its results' big
 * strings into ring `record` (arena.h).  Never returns. */
_Noreturn void pz_worker_main(int in_fd, int out_fd, int slot, pz_slot_shared *shared,
                              const struct pz_arena *arena, int record,
                              void (*setup)(struct lua_State *L), int remote);

#endif
