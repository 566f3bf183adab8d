/*
 * forkserver.h - a small process, forked when the module is loaded, that
 * forks every pool's spawner.
 *
 * fork() copies the page tables of the process that calls it, and the end
 * of every copy tears them down again: a spawner forked from a script that
 * holds 800 MB of Lua tables is itself that big, and every worker it forks
 * then costs about 15 ms to fork and more to end (measured here: 2,200
 * worker replacements a second from a small script, 69 from one holding
 * 800 MB, whose pool of 64 workers took 1.4 s to stop).  So the module,
 * when it is loaded (normally at the top of a script, before its data),
 * forks this server; a pool asks it for a spawner, which it makes with
 * clone(CLONE_PARENT): the spawner is the script's child, as if the script
 * had forked it, only small.
 *
 * The server copies, at each request, what a spawner and its workers would
 * have inherited from the script at that moment and that a script may
 * change after loading the module: the working directory, the environment,
 * the umask, the resource limits, the nice value, the CPU affinity,
 * stdout and stderr.  What it cannot copy it compares: user and group ids,
 * supplementary groups, capabilities, no_new_privs, seccomp filters,
 * namespaces, the cgroup and the security label must be the same in the
 * script and in the server, or the script forks its spawner itself, as it
 * does whenever the server cannot help (gone, not started, a memory region
 * that cannot be mapped at the script's address in the server).
 *
 * Rules: the server is single-threaded and serves one request at a time;
 * in the script any thread may ask (under a lock of this file's), and
 * only the process that started the server does (a process forked from
 * it without exec forks its spawners itself).  The server ends when the
 * script does (its parent-death signal) or closes its socket (exec, or
 * the module unloaded).  Not started in a spawner, a worker or a remote
 * worker: their pools are small processes' already.
 */
#ifndef PZ_FORKSERVER_H
#define PZ_FORKSERVER_H

#include <sys/types.h>

#include "spawner.h"

/* Starts the server, once per process, from the thread that loads the
 * module.  Failing is silent: spawners are then forked as before. */
void pz_forkserver_start(void);

/* The server's pid, or 0 when there is none (tests). */
pid_t pz_forkserver_pid(void);

/* Asks the server for a spawner for `config` on socket end `sock` (which
 * the caller still closes).  Returns 0 and sets *pid, a child of this
 * process; -1 when the server cannot, the caller then forks it. */
int pz_forkserver_spawner(const pz_spawner_config *config, int sock, pid_t *pid);

#endif
