/*
 * lpool.h - the Lua binding of the pool: the userdata (lpool.c) and the
 * turning of records into Lua values (lrecords.c).  Main thread only.
 */
#ifndef PZ_LPOOL_H
#define PZ_LPOOL_H

#include <stdint.h>

#include <lua.h>

#include "arena.h"
#include "buf.h"
#include "handshake.h"
#include "idset.h"
#include "pool.h"

#define PZ_POOL_MT "parallelize.pool"
#define PZ_ERROR_MT "parallelize.error"

/* A tag (frame.h) says who takes a call's result: 0, the pool's own store;
 * 1..PZ_TAGS-1, a map or a stream (a "claim", env.claims[tag]). */
#define PZ_TAGS 256
enum { PZ_TAG_FREE = 0, PZ_TAG_ACTIVE = 1, PZ_TAG_RELEASED = 2 };

typedef struct lpool {
    pz_pool *pool;     /* NULL once released */
    pz_buf scratch;    /* arguments being encoded by p(...) */
    uintptr_t encoding_at; /* frame of the p(...) encoding into scratch, or 0 */
    uintptr_t chunk_encoding_at; /* frame of a chunk encoding into the arena, or 0 */
    int draining;      /* records are being turned into Lua values */
    int keep_results;  /* the pool's store keeps results (option keep_results) */
    int quiet;         /* no warning when collected with calls unfinished */
    uint64_t max_pending; /* p(...) waits while this many are pending; 0: never */
    uint64_t max_pending_bytes; /* and while their frames hold this many bytes */
    pz_idset finished; /* ids whose RESULT or ERROR record was drained */
    uint8_t tag_state[PZ_TAGS];
    uint64_t tag_outstanding[PZ_TAGS]; /* calls queued with the tag, not drained */
    pz_buf *init;      /* INIT payloads until the pool owns them */
    int ninit;
    char ***launch;    /* launchers' argv (pool.h) until the pool owns them */
    int nslots;
    double calls;      /* after stop: calls queued in all */
    double drained;    /* after stop: calls with a result or an error */
    size_t arena_need; /* p(...) waits for this many bytes of the arena's
                        * calls area (arena.h), 0: it does not */
    pz_calls_writer open_writer; /* the arena blocks of the p(...) of scalars
                        * being encoded: one a raise left open is given back
                        * by the next (lsubmit.c) */
    lua_State *hook_L; /* the thread the pool was made in (kept in its
                        * environment), whose hook p(x)'s fast path reads:
                        * hooks are the Lua state's, not a thread's */
    unsigned fast_calls; /* p(x)'s through the fast path (lsubmit.c) */
    double helper_items; /* results the compiled helper took (lrunrec.h) */
    double salvaged;   /* results the drain could not decode and stored as
                        * errors of kind "parent" (lrecords.c): the I/O
                        * thread counted them done, p:stats() failed */
    unsigned run_taken; /* calls of the record at the head of the done queue
                         * (a run's: run.h) already stored, when a decode
                         * raised before its end (lrecords.c) */
    lua_Hook hook_seen; /* the debug hook when a wait last returned: another
                         * one later means a signal's handler set it (lpool.c) */
} lpool;

/* Moves every published record into the pool's store or its claims (see
 * lrecords.c).  The pool userdata is at idx.  A drain started by Lua code
 * that runs inside another drain does nothing. */
void pz_lrecords_drain(lua_State *L, lpool *u, int idx);

/* Builds u->init[i - 1], the INIT payload of slot i (1-based), from the
 * spec table on top of the stack: {kind = "value" | "module" | "deferred",
 * spec = v, args = {n = ...}} (linit.c), after the handshake carrying
 * `versions` (handshake.h).  Raises when it cannot be encoded or is above
 * max_message. */
void pz_linit_build(lua_State *L, lpool *u, int i, const pz_options *o, const pz_versions *versions);

/* Adds the error record metatable (PZ_ERROR_MT), core.error_metatable and
 * core.pool_helper_items to the table on top. */
void pz_lrecords_register(lua_State *L);

/* lpool.c's helpers, shared with lsubmit.c.  pz_lpool_check_running
 * returns the pool at idx when it still runs, and raises otherwise;
 * pz_lpool_check_not_draining raises when records are being drained:
 * `what` cannot run from Lua code that runs meanwhile. */
lpool *pz_lpool_check_running(lua_State *L, int idx);
void pz_lpool_check_not_draining(lua_State *L, const lpool *u, const char *what);

/* The address of the caller's stack frame.  The C stack grows down, so a
 * call that runs while another is still inside this module (from a
 * finalizer, say) has its frame below that one's; a frame recorded by a
 * call that raised since is at or below where later calls from the same
 * place run. */
static inline uintptr_t pz_lpool_frame_here(void)
{
    return (uintptr_t)__builtin_frame_address(0);
}

/* True when the frame `mark` (encoding_at, chunk_encoding_at; 0: none) is
 * above `here` on this thread's stack: an encode started there is still
 * running, or raised and left its mark behind.  For encoding_at a mark
 * left behind costs only a buffer of its own to a later p(...) made from
 * deeper in the C stack; chunk_encoding_at is never left behind (its
 * encode runs protected), because p:stop() refuses while it is above. */
static inline int pz_lpool_marked_above(uintptr_t mark, uintptr_t here)
{
    return mark != 0 && here < mark;
}

/* lsubmit.c.  pz_lpool_call is core.pool_call, p(...) -> id (the pool's
 * __call with the JIT off; otherwise pool.lua's, which goes to it for all
 * but one number or short string): the arguments encoded and queued
 * (nothing is queued when one cannot be encoded; the error says which).  pz_lpool_submit, pz_lpool_submit_each
 * and pz_lpool_submit_chunk are core.pool_submit, core.pool_submit_each
 * and core.pool_submit_chunk (their comments).  pz_lpool_has_room says
 * whether p(...) may queue one more call now: fewer than max_pending
 * calls wait for a worker, and their frames hold fewer than
 * max_pending_bytes (one call, however big, may always wait alone).
 * pz_lsubmit_prepare registers the metatable of the buffers submit may
 * need. */
int pz_lpool_call(lua_State *L);
int pz_lpool_submit(lua_State *L);
int pz_lpool_submit_each(lua_State *L);
int pz_lpool_submit_chunk(lua_State *L);
int pz_lpool_has_room(lpool *u);

/* Whether p(...) waits for room in the arena's calls area (arena_need). */
int pz_lpool_arena_full(lpool *u);
void pz_lsubmit_prepare(lua_State *L);
/* Adds core.fast_submit (the address of p(x)'s fast path, lsubmit.c),
 * core.pool_address and core.pool_fast_calls to the table on top. */
void pz_lsubmit_register(lua_State *L);

/* Adds pool_new, pool_wait, pool_drain, pool_stop and the other pool
 * functions, pool_metatable and max_message_limit to the table on top.
 * Workers of the pools made from here prepare their Lua states with
 * `setup`. */
void pz_lpool_register(lua_State *L, pz_state_setup setup);

#endif
