/*
 * core.h - what the rest of the C code needs from the module's entry point.
 */
#ifndef PZ_CORE_H
#define PZ_CORE_H

#include <lua.h>

#define PZ_EXPORT __attribute__((visibility("default")))

/* A function that adds entries to package.preload of a state. */
typedef void (*pz_preloader)(lua_State *L);

/* pzlua registers here the loader of its embedded Lua files, so that worker
 * states (fresh states inside forked workers) find them too. */
void pz_set_extra_preloader(pz_preloader fn);

/* Puts parallelize.core, and whatever the extra preloader adds, into
 * package.preload of L. */
void pz_preload(lua_State *L);

PZ_EXPORT int luaopen_parallelize_core(lua_State *L);

#endif
