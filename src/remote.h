/*
 * remote.h - `pzlua --worker`: one pool worker served on the standard
 * input and output that a launcher (ssh, srun, any command) connects back
 * to the parent.  See remote.c.
 */
#ifndef PZ_REMOTE_H
#define PZ_REMOTE_H

/* Runs the worker and its supervisor (remote.c) on descriptors 0 and 1;
 * worker states are prepared by pz_preload (core.h).  Never returns: exits
 * with the worker's exit status, 128 + the signal that killed it, or 255
 * when its input ended before it did (the parent or the link is gone). */
_Noreturn void pz_remote_worker_main(void);

#endif
