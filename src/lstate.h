/*
 * lstate.h - the Lua states pzlua and every worker create.
 */
#ifndef PZ_LSTATE_H
#define PZ_LSTATE_H

#include <lua.h>

/* A new Lua state, as luaL_newstate makes it; NULL when out of memory.
 *
 * Built with -DPZ_MALLOC_STATES (build/valgrind/pzlua, for `make
 * valgrind`), the state allocates through malloc, realloc and free instead
 * of LuaJIT's own allocator, which carves its objects out of big mmap'd
 * regions: there memcheck sees every byte as allocated and defined, so a
 * read past the end of a userdata, or of memory never written, would go
 * unnoticed.  With malloc each object is a block of its own, with
 * red zones and definedness tracked.  LuaJIT allows a custom allocator on
 * 64-bit hosts only in its GC64 mode; without it the state cannot be made
 * and this returns NULL (the build of the normal pzlua never asks). */
lua_State *pz_new_state(void);

#endif
