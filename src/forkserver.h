/*
 * forkserver.h - a small process, started at the script's request
 * (parallelize.forkserver()), that makes every later pool's spawner.
 *
 * fork() copies the page tables of the process that calls it, and the end
 * of every copy tears them down again: a spawner forked from a script that
 * holds 800 MB of Lua tables is itself that big, and every worker it forks
 * then costs about 15 ms to fork and more to end (measured here: 2,200
 * worker replacements a second from a small script, 69 from one holding
 * 800 MB, whose pool of 64 workers took 1.4 s to stop).  A script that
 * will hold a big heap starts the server first, while it is small; each
 * pool then asks it for its spawner, which it makes with
 * clone(CLONE_PARENT): the spawner is the script's child, as if the script
 * had forked it, only small.
 *
 * It is not started unless asked for, because a child it makes is not a
 * fork of the script: what a fork would inherit the server must copy or
 * check.  The child takes, before it becomes the spawner, the state the
 * script has when it makes the pool (sent with the request): working
 * directory, environment, umask, resource limits, nice value, scheduling
 * policy, CPU affinity, I/O priority, oom_score_adj, timer slack, the THP
 * switch, dumpability, personality, stdout and stderr.  What a script can
 * only lose (user and group ids, groups, capabilities, no_new_privs,
 * seccomp filters, speculation controls, namespaces, cgroup, audit login,
 * security label, root directory, session and process group) the server
 * reads itself, from /proc, for the thread that started it, at every
 * request, and compares with its own: at the first difference it refuses
 * and ends, and every pool forks its spawner from the script, as without
 * it.  It believes nothing the request says about who sends it: the
 * kernel tells it the sender's pid (SO_PASSCRED), which must be the
 * script's, and a forked copy of the script never holds its socket.
 * Securebits and MDWE, which /proc does not show, the script's side
 * compares with their values at the server's start, ending it at a
 * difference.  Anything else the child cannot take (a
 * privilege it lacks, an address where the pool's memory cannot be mapped)
 * and the script forks that pool's spawner itself.  A sandbox the kernel
 * shows nowhere (Landlock) is not seen: a script that enters one after
 * starting the server takes its workers out of it.
 *
 * Rules: the server is single-threaded and serves one request at a time.
 * In the script, only the thread that started it asks, under this file's
 * lock; any other thread, and a copy of the script forked without exec,
 * forks its spawners itself.  The server ends when that thread does (its
 * parent-death signal), when the script closes its socket (exec, or the
 * module unloaded: a destructor), or at the first difference above.  It is
 * the script's child for as long as it lives: a script that waits for all
 * of its children waits for it.
 */
#ifndef PZ_FORKSERVER_H
#define PZ_FORKSERVER_H

#include <stddef.h>
#include <sys/types.h>

#include "spawner.h"

/* Starts the server (once; again after it ended).  Returns 0, or -1 with
 * why it cannot in why[len]. */
int pz_forkserver_start(char *why, size_t len);

/* The server's pid, or 0 when this process has none running. */
pid_t pz_forkserver_pid(void);

/* Asks the server for a spawner for `config`.  Returns 0 and sets *pid (a
 * child of this process) and *fd (the parent's end of its socket,
 * close-on-exec, blocking); -1 when the server cannot, and the caller forks
 * it (pz_spawner_start). */
int pz_forkserver_spawner(const pz_spawner_config *config, pid_t *pid, int *fd);

#endif
