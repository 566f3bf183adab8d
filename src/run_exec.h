/*
 * run_exec.h - the calls of a run (run.h), made inside a worker: their
 * arguments decoded into one Lua table, and one compiled Lua loop that
 * calls the executor on each in turn, naming each call in the shared
 * memory before it starts (worker.h: a death is charged to that call).
 * A call that raises ends the loop there; the worker reports it and starts
 * the loop again after it.
 *
 * Worker process only, its main thread (the flusher touches no Lua).  The
 * loop and its tables live in the registry of the worker's state, made by
 * pz_run_exec_init before any user code runs.
 */
#ifndef PZ_RUN_EXEC_H
#define PZ_RUN_EXEC_H

#include <stdint.h>

#include <lua.h>

#include "arena.h"
#include "run.h"

/* Protected (a lua_CFunction): makes the loop, given where the worker
 * names the call it runs (a light userdata at 1: an 8-byte word, written
 * with one store).  Before any user code runs: the loop takes the FFI
 * through require, which an executor could replace. */
int pz_run_exec_init(lua_State *L);

/* Protected (a lua_CFunction, no arguments): decodes the arguments of
 * calls[0..n) (each one value, run.h) into the loop's table, and gives the
 * loop ids[0..n), the calls' ids.  Set by pz_run_exec_prepare. */
int pz_run_exec_load(lua_State *L);
void pz_run_exec_prepare(const pz_run_item *calls, const uint64_t *ids, size_t n,
                         pz_arena_reader *reader);

/* Calls the executor (at exec in the registry) on calls from..n (1-based),
 * protected with the message handler at stack index `handler`.  Returns
 * lua_pcall's status; on an error, its value is on top, and the call that
 * raised is the one named in the shared memory. */
int pz_run_exec_call(lua_State *L, int handler, int exec_ref, size_t from, size_t n);

/* Pushes the loop's tables of results (two values, at `tables` once
 * pushed), then, for call k (1-based), the values it returned, and returns
 * how many.  May raise (out of memory). */
void pz_run_exec_push_tables(lua_State *L);
int pz_run_exec_push_result(lua_State *L, int tables, size_t k);

/* Protected (a lua_CFunction, no arguments): drops what the last run left
 * in the loop's tables, so that it keeps none of its values alive. */
int pz_run_exec_clear(lua_State *L);

#endif
