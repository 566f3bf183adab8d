/*
 * lpool.h - the Lua binding of the pool (lpool.c).
 */
#ifndef PZ_LPOOL_H
#define PZ_LPOOL_H

#include <lua.h>

#include "pool.h"

/* Adds pool_new, pool_wait, pool_drain, pool_stop, pool_counts, pool_size,
 * pool_env, pool_stopped, pool_metatable and max_message_limit to the table
 * on top.  Workers of the pools made from here prepare their Lua states
 * with `setup`. */
void pz_lpool_register(lua_State *L, pz_state_setup setup);

#endif
