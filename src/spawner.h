/*
 * spawner.h - the process that forks workers.
 *
 * Forking from the parent's I/O thread is unsafe: the main thread may hold
 * a stdio, malloc or dynamic-loader lock at that instant, and the child
 * would deadlock on its first print or require.  So each pool forks, from
 * its main thread inside a C function (where no such lock is held), one
 * single-threaded spawner; the I/O thread asks the spawner for workers over
 * a SOCK_SEQPACKET socket, passing each worker's socket with SCM_RIGHTS.
 * The spawner is the workers' parent: it reaps them and reports how they
 * ended, and it is the only one that signals them, so a pid is never
 * signalled after it was reaped and reused.  When the parent dies it gets
 * SIGTERM (its parent-death signal), kills every worker with what the
 * workers left running, and exits; a launcher gets SIGTERM first and a
 * second to end (see shut_down in spawner.c).
 *
 * A slot with a launcher (a pool made with the `launcher` option) gets no
 * forked worker: the spawner forks a child that puts the worker's socket
 * on its stdin and stdout and executes the launcher's argv (ssh, srun...),
 * which runs `pzlua --worker` somewhere.  To the rest of the pool that
 * process is the worker: its socket, its pid, its end.  It leads a process
 * group of its own, so that Ctrl-C at a terminal does not reach it, but
 * that group is never killed: a launcher's helpers must outlive it (srun's
 * shepherd cancels the job step after srun is killed).  An exec that fails
 * is reported (PZ_S_EXEC_FAILED), read from a close-on-exec pipe.
 */
#ifndef PZ_SPAWNER_H
#define PZ_SPAWNER_H

#include <stdint.h>
#include <sys/types.h>

enum pz_spawn_kind {
    PZ_S_SPAWN = 1,   /* parent -> spawner: fork a worker for record `slot` of the
                       * pool's slot `arg`, generation gen; carries its fd */
    PZ_S_KILL = 2,    /* parent -> spawner: send signal `arg` to child `pid` */
    PZ_S_SPAWNED = 3, /* spawner -> parent: (slot, gen) runs as `pid` */
    PZ_S_FAILED = 4,  /* spawner -> parent: fork for (slot, gen) failed, errno `arg` */
    PZ_S_EXITED = 5,  /* spawner -> parent: child `pid` ended with wait status `arg` */
    PZ_S_EXEC_FAILED = 6, /* spawner -> parent: the launcher of (slot, gen) could not be
                           * executed, errno `arg` */
    PZ_S_GAVE_UP = 7      /* spawner -> parent, its last word: step `slot` of its
                           * start (pz_spawner_step) failed with errno `arg` */
};

/* What step `step` of a PZ_S_GAVE_UP report is ("signalfd", ...), or NULL
 * when it is none the spawner has. */
const char *pz_spawner_step(int step);

typedef struct pz_spawn_msg {
    int32_t kind;
    int32_t slot;
    uint32_t gen;
    int32_t pid;
    int32_t arg;
} pz_spawn_msg;

struct pz_slot_shared;
struct pz_arena;
struct lua_State;

typedef struct pz_spawner_config {
    struct pz_slot_shared *shared;      /* the pool's, one per slot: workers write it */
    const struct pz_arena *arena;       /* the pool's shared strings (arena.h), or NULL */
    void (*setup)(struct lua_State *L); /* prepares each worker's Lua state */
    void (*in_child)(void);             /* runs in the spawner right after the fork */
    int kill_leftovers;                 /* each worker leads a process group, killed
                                         * (SIGKILL) when the worker has ended */
    char *const *const *launch;         /* per slot: the launcher's argv (NULL-ended),
                                         * or NULL for a forked worker; NULL: none */
    int nslots;                         /* slots (the length of launch), records / 2 */
    int shared_fd;                      /* shared's memfd, or -1 (forkserver.h) */
} pz_spawner_config;

/* Marks this process as a forked child that holds a copy of its parent's
 * heap: LeakSanitizer, in the sanitizer build, does not check it at exit
 * (see spawner.c).  The spawner and its workers are marked already. */
void pz_mark_forked_child(void);

/* Whether this process is a spawner or a worker (marked as above). */
int pz_forked_child(void);

/* Forks the spawner (pz_forkserver_spawner asks the fork server for one
 * instead).  Call from the main thread only.  On success returns 0 and
 * sets *pid and *fd (the parent's end, close-on-exec, blocking); on
 * failure returns -1 with errno set. */
int pz_spawner_start(const pz_spawner_config *config, pid_t *pid, int *fd);

/* In a child just made to be the spawner, with the socket's other end
 * `sock`, for the process `parent`: becomes it.  Never returns. */
_Noreturn void pz_spawner_become(const pz_spawner_config *config, int sock, pid_t parent);

/* Sends one message, with `pass_fd` attached when >= 0.  Returns 0, or -1
 * with errno set (EAGAIN on a full non-blocking socket). */
int pz_spawn_send(int fd, const pz_spawn_msg *m, int pass_fd);

/* Receives one message.  Returns 1, 0 on end of file, -1 with errno set.
 * A passed descriptor, if any, is stored in *passed_fd (else -1). */
int pz_spawn_recv(int fd, pz_spawn_msg *m, int *passed_fd);

#endif
