/*
 * lpool.h - the Lua binding of the pool (lpool.c).
 */
#ifndef PZ_LPOOL_H
#define PZ_LPOOL_H

#include <lua.h>

/* Adds pool_new, pool_wait, pool_drain, pool_stop, pool_counts, pool_size,
 * pool_env, pool_stopped and pool_metatable to the table on top. */
void pz_lpool_register(lua_State *L);

#endif
