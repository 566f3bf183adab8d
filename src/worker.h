/*
 * worker.h - the loop every worker process runs.
 */
#ifndef PZ_WORKER_H
#define PZ_WORKER_H

/* Runs in a freshly forked worker whose socket to the parent is `fd`: builds
 * a fresh LuaJIT state, reads the INIT frame, builds the executor, then
 * serves CALL frames until STOP or end of file.  Never returns. */
_Noreturn void pz_worker_main(int fd, int slot);

#endif
