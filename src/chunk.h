/*
 * chunk.h - a map's chunk, run inside a worker: one CALL frame whose
 * arguments are (items, n) and whose flag PZ_CALL_CHUNK (frame.h) asks the
 * worker to call its executor once on each of items[1..n], in order, as
 * n calls p(items[k]) would, and to answer for all of them at once.
 *
 * Why: a tiny call costs the parent and the worker far more in framing,
 * ids and records than the call itself; a map of a million tiny items
 * sent as a few hundred chunks pays that once per chunk.  The parent's
 * side (lua/parallelize/chunks.lua) sizes the chunks and uses them only
 * where a chunk behaves as its items would one by one (no timeout,
 * retries, max_calls, fail_fast or progress).
 *
 * The answer is an ordinary RESULT: the values
 *   results, seconds                      every item returned
 *   results, seconds, k, message, traceback   item k raised
 * where results[i] is item i's first value (nil kept as a hole) for every
 * item before the one that raised, seconds is the time the chunk ran, and
 * message and traceback are those of the error item k raised.  The items
 * after a raising one are not run: the map raises at once.
 *
 * Worker process only, inside run_call's protected call (worker.c).
 */
#ifndef PZ_CHUNK_H
#define PZ_CHUNK_H

#include <lua.h>

/* Runs the chunk whose executor and decoded arguments sit above `handler`
 * (the message handler: worker.c's on_error) on L's stack, `nargs` of
 * them.  Replaces the executor and the arguments with the chunk's answer,
 * and returns how many values it has.  Raises when the arguments are not
 * (items, n), which only a broken parent sends. */
int pz_chunk_run(lua_State *L, int handler, int nargs);

#endif
