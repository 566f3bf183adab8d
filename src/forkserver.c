/*
 * forkserver.c - the fork server (forkserver.h): started on request, it
 * makes each pool's spawner with clone(CLONE_PARENT), and the spawner takes
 * the state the script is in when it asks.
 */
#include "forkserver.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/personality.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "arena.h"
#include "buf.h"
#include "sys.h"
#include "worker.h"

extern char **environ;

/* The server's socket is moved to this descriptor number. */
#define SERVER_FD 3
/* A request's first four bytes: "pzf" and the layout's version. */
#define REQUEST_MAGIC 0x707a6602u
/* The server answers in well under a millisecond; one that does not answer
 * in this long is stopped or stuck, and is given up. */
#define REPLY_TIMEOUT_MS 10000
/* Room for one file of the identity (see identity()). */
#define IDENTITY_FILE_MAX 16384
/* ioprio_get/ioprio_set's "who": the calling thread (process id 0). */
#define IOPRIO_WHO_PROCESS 1

/* The descriptors a request carries, in this order. */
enum { FD_REQUEST, FD_SOCK, FD_CWD, FD_STDOUT, FD_STDERR, FD_SHARED, FD_ARENA, NFDS };
_Static_assert(NFDS <= PZ_PASS_FDS_MAX, "a request's descriptors go in one message");

/* The request, written into a memfd (FD_REQUEST): this header, then the
 * environment (env_len bytes of NUL-ended strings, env_count of them, as
 * environ holds them) and the launchers (per slot: an int32 argc, -1 for
 * a forked worker, then argc NUL-ended strings). */
typedef struct request {
    uint32_t magic;
    int32_t requester;           /* the script's pid: the spawner's parent */
    uint64_t setup, in_child;    /* addresses of functions of this image, which the server shares */
    uint64_t shared_addr;         /* its size follows from nslots */
    uint64_t arena_addr;         /* 0: no arena */
    int32_t arena_records;
    int32_t kill_leftovers;
    int32_t nslots;
    int32_t has_launch;
    /* the script's state, which the spawner takes */
    uint32_t umask;
    int32_t nice;
    int32_t policy;
    struct sched_param sched;
    int32_t ioprio;
    int32_t oom_score_adj;
    int64_t timer_slack;
    int32_t thp_disable;
    int32_t dumpable;
    int32_t personality;
    int32_t stdout_cloexec, stderr_cloexec;
    struct rlimit limits[RLIM_NLIMITS];
    cpu_set_t cpus;
    uint64_t env_count, env_len, launch_len;
} request;

typedef struct reply {
    int32_t err; /* 0, or why no spawner was made (an errno) */
    int32_t pid; /* the child, also when it could not become the spawner: the script reaps it */
} reply;

/* ---- both sides -------------------------------------------------------- */

static ssize_t read_file(const char *path, char *buf, size_t cap)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    size_t len = 0;
    for (;;) {
        if (len == cap) {
            close(fd);
            errno = E2BIG;
            return -1;
        }
        ssize_t r = pz_read(fd, buf + len, cap - len);
        if (r < 0) {
            int e = errno;
            close(fd);
            errno = e;
            return -1;
        }
        if (r == 0)
            break;
        len += (size_t)r;
    }
    close(fd);
    return (ssize_t)len;
}

/* A pz_buf whose first failed append fails every later one, so that a
 * long run of appends is checked once. */
typedef struct text {
    pz_buf b;
    int failed;
} text;

static void put(text *t, const void *p, size_t n)
{
    if (!t->failed && pz_buf_append(&t->b, p, n) != 0)
        t->failed = 1;
}

static void put_str(text *t, const char *s)
{
    put(t, s, strlen(s) + 1);
}

/* The script's side: under `lock`.  owner is the process that started the
 * server and owner_tid its thread that did (a forked copy, whose pid
 * differs, leaves the rest be: it may hold a copy of the lock taken). */
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static int server_sock = -1;
static pid_t server_pid;
static _Atomic pid_t owner;
static pid_t owner_tid;
/* Restrictions nothing in /proc shows, as they were when the server
 * started (see restrictions()). */
static long started_restrictions[2];

/* ---- the server ---------------------------------------------------------- */

/* What the server must share with the thread `task` (a /proc directory of
 * a thread) to make its spawners, and what it cannot copy: ids, groups,
 * capabilities, no_new_privs, seccomp, speculation controls, cgroup, audit
 * login and session, namespaces, security label, then the root directory,
 * session and process group of `pid`.  Returns 0, or -1 when any of it
 * cannot be read. */
static int identity(text *t, const char *task, pid_t pid)
{
    static const char *const keys[] = {"Uid:", "Gid:", "Groups:", "CapInh:", "CapPrm:", "CapEff:",
                                       "CapBnd:", "CapAmb:", "NoNewPrivs:", "Seccomp:",
                                       "Seccomp_filters:", "Speculation_Store_Bypass:",
                                       "SpeculationIndirectBranch:", NULL};
    static const char *const files[] = {"cgroup", "loginuid", "sessionid", NULL};
    static const char *const namespaces[] = {"cgroup", "ipc", "mnt", "net", "pid", "pid_for_children",
                                             "time", "time_for_children", "user", "uts", NULL};
    static char buf[IDENTITY_FILE_MAX];
    char path[96];
    snprintf(path, sizeof path, "%s/status", task);
    ssize_t n = read_file(path, buf, sizeof buf);
    if (n < 0)
        return -1;
    for (char *line = buf, *end = buf + n; line < end;) {
        char *nl = memchr(line, '\n', (size_t)(end - line));
        size_t len = nl ? (size_t)(nl - line) + 1 : (size_t)(end - line);
        for (int i = 0; keys[i]; i++)
            if (len >= strlen(keys[i]) && memcmp(line, keys[i], strlen(keys[i])) == 0)
                put(t, line, len);
        line += len;
    }
    for (int i = 0; files[i]; i++) {
        snprintf(path, sizeof path, "%s/%s", task, files[i]);
        n = read_file(path, buf, sizeof buf);
        if (n < 0 && !(errno == ENOENT && i > 0)) /* ENOENT: a kernel without audit */
            return -1;
        put(t, buf, n < 0 ? 0 : (size_t)n);
        put(t, "\n", 1);
    }
    for (int i = 0; namespaces[i]; i++) {
        snprintf(path, sizeof path, "%s/ns/%s", task, namespaces[i]);
        n = readlink(path, buf, sizeof buf - 1);
        if (n < 0 && errno != ENOENT) /* ENOENT: a kernel without that kind */
            return -1;
        put(t, buf, n < 0 ? 0 : (size_t)n);
        put(t, "\n", 1);
    }
    /* No security module, or one without labels: nothing to compare. */
    snprintf(path, sizeof path, "%s/attr/current", task);
    n = read_file(path, buf, sizeof buf);
    if (n > 0)
        put(t, buf, (size_t)n);
    /* The root directory: its file, and its path from the server's root
     * (a chroot into a bind mount of / is the same file elsewhere). */
    struct stat root;
    snprintf(path, sizeof path, "/proc/%d/root", (int)pid);
    n = readlink(path, buf, sizeof buf - 1);
    if (n < 0)
        return -1;
    put(t, buf, (size_t)n);
    put(t, "\n", 1);
    snprintf(path, sizeof path, "/proc/%d/root/", (int)pid);
    pid_t sid = getsid(pid), pgid = getpgid(pid);
    if (stat(path, &root) != 0 || sid < 0 || pgid < 0)
        return -1;
    long ids[4] = {(long)root.st_dev, (long)root.st_ino, (long)sid, (long)pgid};
    put(t, ids, sizeof ids);
    return t->failed ? -1 : 0;
}

/* The server's own identity, read when it starts, and its parent's
 * thread that started it. */
static text server_identity;
static char script_task[64];
/* The script's command name, which the spawners take back. */
static char script_name[17];

/* Whether the script's thread is still what the server is. */
static int same_identity(void)
{
    text t = {PZ_BUF_INIT, 0};
    int same = identity(&t, script_task, getppid()) == 0 && t.b.len == server_identity.b.len &&
               memcmp(t.b.data, server_identity.b.data, t.b.len) == 0;
    pz_buf_free(&t.b);
    return same;
}

/* Sets what differs from the request (forkserver.h), in the child that is
 * to be the spawner; returns 0 or an errno. */
static int take_state(const request *h, const int *fds, char **env)
{
    if (fchdir(fds[FD_CWD]) != 0)
        return errno;
    umask((mode_t)h->umask);
    /* The limits first: RLIMIT_NICE and RLIMIT_RTPRIO bound what follows. */
    for (int i = 0; i < RLIM_NLIMITS; i++) {
        struct rlimit now;
        if (getrlimit((__rlimit_resource_t)i, &now) != 0)
            return errno;
        if ((now.rlim_cur != h->limits[i].rlim_cur || now.rlim_max != h->limits[i].rlim_max) &&
            setrlimit((__rlimit_resource_t)i, &h->limits[i]) != 0)
            return errno;
    }
    struct sched_param sp;
    int policy = sched_getscheduler(0);
    if (policy < 0 || sched_getparam(0, &sp) != 0)
        return errno;
    if ((policy != h->policy || sp.sched_priority != h->sched.sched_priority) &&
        sched_setscheduler(0, h->policy, &h->sched) != 0)
        return errno;
    errno = 0;
    int nice = getpriority(PRIO_PROCESS, 0);
    if (nice == -1 && errno != 0)
        return errno;
    if (nice != h->nice && setpriority(PRIO_PROCESS, 0, h->nice) != 0)
        return errno;
    cpu_set_t cpus;
    if (sched_getaffinity(0, sizeof cpus, &cpus) != 0)
        return errno;
    if (!CPU_EQUAL(&cpus, &h->cpus) && sched_setaffinity(0, sizeof h->cpus, &h->cpus) != 0)
        return errno;
    long ioprio = syscall(SYS_ioprio_get, IOPRIO_WHO_PROCESS, 0);
    if (ioprio < 0)
        return errno;
    if (ioprio != h->ioprio && syscall(SYS_ioprio_set, IOPRIO_WHO_PROCESS, 0, h->ioprio) != 0)
        return errno;
    char buf[32];
    ssize_t n = read_file("/proc/self/oom_score_adj", buf, sizeof buf - 1);
    if (n <= 0)
        return n < 0 ? errno : EIO;
    buf[n] = '\0';
    if (atoi(buf) != h->oom_score_adj) {
        int fd = open("/proc/self/oom_score_adj", O_WRONLY | O_CLOEXEC);
        n = snprintf(buf, sizeof buf, "%d\n", h->oom_score_adj);
        if (fd < 0 || pz_write_all(fd, buf, (size_t)n) != 0)
            return errno ? errno : EIO;
        close(fd);
    }
    int slack = prctl(PR_GET_TIMERSLACK);
    if (slack < 0)
        return errno;
    if (slack != h->timer_slack && prctl(PR_SET_TIMERSLACK, (unsigned long)h->timer_slack) != 0)
        return errno;
    int thp = prctl(PR_GET_THP_DISABLE, 0, 0, 0, 0);
    if (thp < 0)
        return errno;
    if (thp != h->thp_disable && prctl(PR_SET_THP_DISABLE, (unsigned long)h->thp_disable, 0, 0, 0) != 0)
        return errno;
    int dumpable = prctl(PR_GET_DUMPABLE);
    if (dumpable < 0)
        return errno;
    if (dumpable != h->dumpable && prctl(PR_SET_DUMPABLE, (unsigned long)h->dumpable) != 0)
        return errno;
    int persona = personality(0xffffffff);
    if (persona < 0)
        return errno;
    if (persona != h->personality && personality((unsigned long)h->personality) < 0)
        return errno;
    if (dup3(fds[FD_STDOUT], 1, h->stdout_cloexec ? O_CLOEXEC : 0) < 0 ||
        dup3(fds[FD_STDERR], 2, h->stderr_cloexec ? O_CLOEXEC : 0) < 0)
        return errno;
    environ = env;
    (void)prctl(PR_SET_NAME, script_name);
    return 0;
}

/* The launchers' argv arrays, pointing into the request; NULL on a
 * malformed request or no memory. */
static char ***read_launch(const request *h, char *p, size_t len)
{
    char ***launch = calloc((size_t)h->nslots, sizeof *launch);
    if (!launch)
        return NULL;
    char *end = p + len;
    for (int i = 0; i < h->nslots; i++) {
        int32_t argc;
        if ((size_t)(end - p) < sizeof argc)
            goto bad;
        memcpy(&argc, p, sizeof argc);
        p += sizeof argc;
        if (argc == -1)
            continue;
        if (argc < 1)
            goto bad;
        launch[i] = calloc((size_t)argc + 1, sizeof **launch);
        if (!launch[i])
            goto bad;
        for (int32_t j = 0; j < argc; j++) {
            char *nul = memchr(p, '\0', (size_t)(end - p));
            if (!nul)
                goto bad;
            launch[i][j] = p;
            p = nul + 1;
        }
    }
    return launch;
bad:
    for (int i = 0; i < h->nslots; i++)
        free(launch[i]);
    free(launch);
    return NULL;
}

/* The environment's pointers, into the request; NULL as above. */
static char **read_env(const request *h, char *p)
{
    char **env = calloc((size_t)h->env_count + 1, sizeof *env);
    if (!env)
        return NULL;
    char *end = p + h->env_len;
    for (uint64_t i = 0; i < h->env_count; i++) {
        char *nul = memchr(p, '\0', (size_t)(end - p));
        if (!nul) {
            free(env);
            return NULL;
        }
        env[i] = p;
        p = nul + 1;
    }
    return env;
}

/* In the child: takes the state and the memory, then becomes the spawner;
 * on failure writes the errno to `status` and ends. */
static _Noreturn void become_spawner(const request *h, const int *fds, char *blob, int status)
{
    char *env_p = blob + sizeof *h;
    char **env = read_env(h, env_p);
    char ***launch = h->has_launch ? read_launch(h, env_p + h->env_len, h->launch_len) : NULL;
    int err = !env || (h->has_launch && !launch) ? EPROTO : take_state(h, fds, env);
    void *shared = (void *)(uintptr_t)h->shared_addr;
    if (!err && pz_map_shared_at(fds[FD_SHARED], shared, pz_slots_shared_size(h->nslots), 0) != 0)
        err = errno;
    pz_arena *arena = NULL;
    if (!err && h->arena_addr) {
        arena = pz_arena_attach(fds[FD_ARENA], (void *)(uintptr_t)h->arena_addr, h->arena_records);
        if (!arena)
            err = errno;
    }
    if (err) {
        (void)pz_write_all(status, &err, sizeof err);
        _exit(127);
    }
    pz_spawner_config config = {shared,
                                arena,
                                (void (*)(struct lua_State *))(uintptr_t)h->setup,
                                (void (*)(void))(uintptr_t)h->in_child,
                                h->kill_leftovers,
                                (char *const *const *)launch,
                                h->nslots,
                                -1};
    /* Closes `status` with every descriptor but its socket: success. */
    pz_spawner_become(&config, fds[FD_SOCK], h->requester);
}

/* Makes one spawner; returns 0 or an errno, and sets *pid whenever a child
 * was made. */
static int make_spawner(const int *fds, int nfds, pid_t *pid)
{
    struct stat st;
    if (nfds < FD_ARENA || fstat(fds[FD_REQUEST], &st) != 0 || (size_t)st.st_size < sizeof(request))
        return EPROTO;
    size_t size = (size_t)st.st_size;
    char *blob = malloc(size);
    if (!blob)
        return ENOMEM;
    request h;
    int err = EPROTO;
    if (pread(fds[FD_REQUEST], blob, size, 0) != (ssize_t)size)
        goto done;
    memcpy(&h, blob, sizeof h);
    if (h.magic != REQUEST_MAGIC || h.requester != getppid() || h.env_len > size || h.launch_len > size ||
        sizeof h + h.env_len + h.launch_len != size || h.env_count > h.env_len || h.nslots < 1 ||
        (h.arena_addr && nfds < NFDS))
        goto done;
    int status[2];
    if (pipe2(status, O_CLOEXEC) != 0) {
        err = errno;
        goto done;
    }
    /* CLONE_PARENT: the spawner is the script's child (its parent-death
     * signal, its SIGCHLD, its waitpid), not ours.  A raw clone, like a
     * fork of this single-threaded process but for glibc's fork handlers,
     * which nothing here needs: the spawner forks its workers with fork(). */
    pid_t child = (pid_t)syscall(SYS_clone, CLONE_PARENT | SIGCHLD, 0, NULL, NULL, 0);
    if (child == 0) {
        close(status[0]);
        close(SERVER_FD);
        become_spawner(&h, fds, blob, status[1]);
    }
    close(status[1]);
    if (child < 0) {
        err = errno;
        close(status[0]);
        goto done;
    }
    *pid = child;
    /* Where clone ignored CLONE_PARENT (a kernel or an emulator that does
     * not honour it) the child would be ours: the script could not wait
     * for it.  (Valgrind honours it: checked.) */
    if (waitpid(child, NULL, WNOHANG) != -1 || errno != ECHILD) {
        kill(child, SIGKILL);
        while (waitpid(child, NULL, 0) < 0 && errno == EINTR)
            ;
        *pid = 0;
        close(status[0]);
        err = ENOTSUP;
        goto done;
    }
    /* End of file once the child became the spawner; an errno if not. */
    int child_err = 0;
    ssize_t r;
    do
        r = read(status[0], &child_err, sizeof child_err);
    while (r < 0 && errno == EINTR);
    close(status[0]);
    err = r == 0 ? 0 : r == (ssize_t)sizeof child_err ? child_err : EPROTO;
done:
    free(blob);
    return err;
}

static _Noreturn void server_main(int sock, pid_t parent, pid_t parent_tid)
{
    /* Forked with the lock held: children of this process (the spawners,
     * their workers, which may make pools of their own) need it free. */
    pthread_mutex_init(&lock, NULL);
    owner = 0;
    server_sock = -1;
    pz_mark_forked_child();
    /* A name for ps and top; nothing depends on it. */
    (void)prctl(PR_GET_NAME, script_name);
    (void)prctl(PR_SET_NAME, "pz-forkserver");
    for (int sig = 1; sig < NSIG; sig++)
        if (sig != SIGKILL && sig != SIGSTOP)
            signal(sig, SIG_DFL);
    /* The script decides what Ctrl-C, a hang-up or a quit does; it ends
     * this server by dying (the parent-death signal) or closing the socket. */
    signal(SIGINT, SIG_IGN);
    signal(SIGQUIT, SIG_IGN);
    signal(SIGHUP, SIG_IGN);
    signal(SIGPIPE, SIG_IGN);
    sigset_t none;
    sigemptyset(&none);
    if (sigprocmask(SIG_SETMASK, &none, NULL) != 0)
        _exit(1);
    if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0 || getppid() != parent)
        _exit(1);
    /* Holds no directory (a mount the script leaves stays free to go) and
     * no descriptor of the script's. */
    int devnull = open("/dev/null", O_RDWR | O_CLOEXEC);
    if (chdir("/") != 0 || devnull < 0 || dup2(devnull, 0) < 0 || dup2(devnull, 1) < 0 ||
        dup2(devnull, 2) < 0)
        _exit(1);
    if (sock != SERVER_FD) {
        if (dup3(sock, SERVER_FD, O_CLOEXEC) < 0)
            _exit(1);
        sock = SERVER_FD;
    }
    pz_close_fds_from(3, sock);
    int on = 1, ready = 0;
    snprintf(script_task, sizeof script_task, "/proc/%d/task/%d", (int)parent, (int)parent_tid);
    if (setsockopt(sock, SOL_SOCKET, SO_PASSCRED, &on, sizeof on) != 0 ||
        identity(&server_identity, "/proc/thread-self", getpid()) != 0)
        ready = errno ? errno : EIO;
    else if (!same_identity())
        ready = errno ? errno : EPERM;
    if (send(sock, &ready, sizeof ready, MSG_NOSIGNAL) != (ssize_t)sizeof ready || ready)
        _exit(1);
    for (;;) {
        uint32_t magic = 0;
        int fds[PZ_PASS_FDS_MAX], nfds;
        pid_t sender;
        int r = pz_recv_fds(sock, &magic, sizeof magic, fds, &nfds, &sender);
        if (r == 0 || (r < 0 && errno != EPROTO))
            _exit(0); /* the script closed its end, or is gone */
        reply rep = {EPROTO, 0};
        pid_t pid = 0;
        int done = 0;
        if (sender != parent || !same_identity()) {
            /* Not the script, or a script that is no longer what this
             * server is: never again. */
            rep.err = EPERM;
            done = 1;
        } else if (r > 0 && magic == REQUEST_MAGIC) {
            rep.err = make_spawner(fds, nfds, &pid);
            done = rep.err == ENOTSUP;
        }
        rep.pid = (int32_t)pid;
        for (int i = 0; i < nfds; i++)
            close(fds[i]);
        ssize_t w;
        do
            w = send(sock, &rep, sizeof rep, MSG_NOSIGNAL);
        while (w < 0 && errno == EINTR);
        if (w != (ssize_t)sizeof rep || done)
            _exit(0);
    }
}

/* ---- the script's side --------------------------------------------------- */

#ifndef PR_GET_MDWE
#define PR_GET_MDWE 66
#endif

/* Restrictions the calling thread can add and a fork would inherit but
 * that /proc does not show, so the server cannot compare them: its
 * securebits and its memory-deny-write-execute flags (0 on a kernel
 * without them). */
static void restrictions(long r[2])
{
    r[0] = prctl(PR_GET_SECUREBITS, 0, 0, 0, 0);
    r[1] = prctl(PR_GET_MDWE, 0, 0, 0, 0);
    if (r[1] < 0)
        r[1] = 0;
}

/* In a child forked from the script (by fork(), not exec'd yet): a copy of
 * the script that holds the server's socket could, privileged enough,
 * claim the script's pid; it never holds it. */
static void forget_server_in_child(void)
{
    if (server_sock >= 0) {
        close(server_sock);
        server_sock = -1;
    }
}

/* Under the lock: stops using the server and ends it.  Killed only while
 * it is certainly still our child, not yet reaped (by us or by a script
 * that waits for any child), so that the pid names it. */
static void drop_server(void)
{
    close(server_sock);
    server_sock = -1;
    siginfo_t si;
    memset(&si, 0, sizeof si);
    if (waitid(P_PID, (id_t)server_pid, &si, WEXITED | WNOHANG | WNOWAIT) == 0 && si.si_pid == 0)
        kill(server_pid, SIGKILL);
    while (waitpid(server_pid, NULL, 0) < 0 && errno == EINTR)
        ;
}

int pz_forkserver_start(char *why, size_t len)
{
    if (pz_forked_child()) {
        snprintf(why, len, "a worker or a spawner starts no fork server");
        return -1;
    }
    pid_t me = getpid();
    if (owner != 0 && owner != me) {
        snprintf(why, len, "a copy of the process that started it cannot use it");
        return -1;
    }
    pthread_mutex_lock(&lock);
    int rc = 0;
    static int atfork_set;
    if (!atfork_set && pthread_atfork(NULL, NULL, forget_server_in_child) == 0)
        atfork_set = 1;
    if (!atfork_set) {
        snprintf(why, len, "pthread_atfork failed");
        rc = -1;
    } else if (server_sock < 0) {
        int sv[2];
        if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) != 0) {
            snprintf(why, len, "socketpair: %s", strerror(errno));
            rc = -1;
        } else {
            fflush(NULL);
            pid_t tid = (pid_t)syscall(SYS_gettid);
            pid_t pid = fork();
            if (pid == 0)
                server_main(sv[1], me, tid);
            int e = errno;
            close(sv[1]);
            if (pid > 0) {
                server_sock = sv[0];
                server_pid = pid;
                owner = me;
                owner_tid = tid;
                restrictions(started_restrictions);
                /* Its first word: 0 when it runs, else why it could not. */
                int ready = -1;
                struct pollfd pfd = {sv[0], POLLIN, 0};
                int n;
                do
                    n = poll(&pfd, 1, REPLY_TIMEOUT_MS);
                while (n < 0 && errno == EINTR);
                if (n > 0 && recv(sv[0], &ready, sizeof ready, 0) != (ssize_t)sizeof ready)
                    ready = -1;
                if (ready != 0) {
                    drop_server();
                    if (ready > 0)
                        snprintf(why, len, "it cannot read what it must compare in /proc: %s",
                                 strerror(ready));
                    else
                        snprintf(why, len, "it did not start");
                    rc = -1;
                }
            } else {
                close(sv[0]);
                snprintf(why, len, "fork: %s", strerror(e));
                rc = -1;
            }
        }
    } else if ((pid_t)syscall(SYS_gettid) != owner_tid) {
        snprintf(why, len, "another thread started it");
        rc = -1;
    }
    pthread_mutex_unlock(&lock);
    return rc;
}

pid_t pz_forkserver_pid(void)
{
    if (owner != getpid())
        return 0;
    pthread_mutex_lock(&lock);
    pid_t pid = server_sock >= 0 ? server_pid : 0;
    pthread_mutex_unlock(&lock);
    return pid;
}

/* The request's memfd, or -1 when this process's state cannot be sent
 * (then a fork is the only faithful copy). */
static int write_request(const pz_spawner_config *c)
{
    request h;
    memset(&h, 0, sizeof h);
    h.magic = REQUEST_MAGIC;
    h.requester = (int32_t)getpid();
    h.setup = (uint64_t)(uintptr_t)c->setup;
    h.in_child = (uint64_t)(uintptr_t)c->in_child;
    h.shared_addr = (uint64_t)(uintptr_t)c->shared;
    h.arena_addr = c->arena ? (uint64_t)(uintptr_t)c->arena->base : 0;
    h.arena_records = c->arena ? c->arena->nrecords : 0;
    h.kill_leftovers = c->kill_leftovers;
    h.nslots = c->nslots;
    h.has_launch = c->launch != NULL;
    mode_t mask = umask(0);
    umask(mask);
    h.umask = (uint32_t)mask;
    errno = 0;
    h.nice = getpriority(PRIO_PROCESS, 0);
    if (h.nice == -1 && errno != 0)
        return -1;
    /* A policy that a fork resets (SCHED_RESET_ON_FORK) is not copied. */
    h.policy = sched_getscheduler(0);
    if (h.policy < 0 || (h.policy & SCHED_RESET_ON_FORK) || sched_getparam(0, &h.sched) != 0)
        return -1;
    long ioprio = syscall(SYS_ioprio_get, IOPRIO_WHO_PROCESS, 0);
    int slack = prctl(PR_GET_TIMERSLACK);
    h.thp_disable = prctl(PR_GET_THP_DISABLE, 0, 0, 0, 0);
    h.dumpable = prctl(PR_GET_DUMPABLE);
    h.personality = personality(0xffffffff);
    int out_flags = fcntl(1, F_GETFD), err_flags = fcntl(2, F_GETFD);
    char buf[32];
    ssize_t n = read_file("/proc/self/oom_score_adj", buf, sizeof buf - 1);
    if (ioprio < 0 || slack < 0 || h.thp_disable < 0 || h.dumpable < 0 || h.personality < 0 || out_flags < 0 ||
        err_flags < 0 ||
        n <= 0 || sched_getaffinity(0, sizeof h.cpus, &h.cpus) != 0)
        return -1;
    buf[n] = '\0';
    h.oom_score_adj = atoi(buf);
    h.ioprio = (int32_t)ioprio;
    h.timer_slack = slack;
    h.stdout_cloexec = (out_flags & FD_CLOEXEC) != 0;
    h.stderr_cloexec = (err_flags & FD_CLOEXEC) != 0;
    for (int i = 0; i < RLIM_NLIMITS; i++)
        if (getrlimit((__rlimit_resource_t)i, &h.limits[i]) != 0)
            return -1;
    text t = {PZ_BUF_INIT, 0};
    put(&t, &h, sizeof h);
    size_t mark = t.b.len;
    for (char **e = environ; e && *e; e++) {
        put_str(&t, *e);
        h.env_count++;
    }
    h.env_len = t.b.len - mark;
    mark = t.b.len;
    for (int i = 0; c->launch && i < c->nslots; i++) {
        int32_t argc = -1;
        if (c->launch[i])
            for (argc = 0; c->launch[i][argc];)
                argc++;
        put(&t, &argc, sizeof argc);
        for (int32_t j = 0; j < argc; j++)
            put_str(&t, c->launch[i][j]);
    }
    h.launch_len = t.b.len - mark;
    int fd = -1;
    if (!t.failed) {
        memcpy(t.b.data, &h, sizeof h);
        fd = memfd_create("parallelize-request", MFD_CLOEXEC);
        if (fd >= 0 && pz_write_all(fd, t.b.data, t.b.len) != 0) {
            close(fd);
            fd = -1;
        }
    }
    pz_buf_free(&t.b);
    return fd;
}

/* Sends the request and reads the reply; -1 when the server failed us. */
static int ask(const int *fds, int nfds, reply *rep)
{
    uint32_t magic = REQUEST_MAGIC;
    if (pz_send_fds(server_sock, &magic, sizeof magic, fds, nfds) != 0)
        return -1;
    int64_t deadline = pz_now_ns() + (int64_t)REPLY_TIMEOUT_MS * 1000000;
    for (;;) {
        struct pollfd pfd = {server_sock, POLLIN, 0};
        int64_t left = deadline - pz_now_ns();
        int n = poll(&pfd, 1, left > 0 ? (int)(left / 1000000) + 1 : 0);
        if (n > 0)
            break;
        if ((n < 0 && errno != EINTR) || (n == 0 && left <= 0))
            return -1;
    }
    ssize_t r;
    do
        r = recv(server_sock, rep, sizeof *rep, 0);
    while (r < 0 && errno == EINTR);
    return r == (ssize_t)sizeof *rep ? 0 : -1;
}

int pz_forkserver_spawner(const pz_spawner_config *config, pid_t *pid, int *fd)
{
    if (config->shared_fd < 0 || (config->arena && config->arena->fd < 0) || owner != getpid())
        return -1;
    pthread_mutex_lock(&lock);
    int rc = -1, request_fd = -1, cwd = -1, sv[2] = {-1, -1};
    if (server_sock < 0 || (pid_t)syscall(SYS_gettid) != owner_tid)
        goto out;
    long now[2];
    restrictions(now);
    if (now[0] != started_restrictions[0] || now[1] != started_restrictions[1]) {
        drop_server(); /* the server has what the script gave up: not again */
        goto out;
    }
    request_fd = write_request(config);
    if (request_fd < 0)
        goto out;
    cwd = open(".", O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (cwd < 0 || socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) != 0)
        goto out;
    int fds[NFDS] = {request_fd, sv[1], cwd, 1, 2, config->shared_fd, config->arena ? config->arena->fd : -1};
    reply rep;
    if (ask(fds, config->arena ? NFDS : NFDS - 1, &rep) != 0) {
        /* Gone, or stuck: a spawner it may still make sees its socket
         * closed, here, and ends. */
        drop_server();
        goto out;
    }
    if (rep.err == 0 && rep.pid > 0) {
        *pid = rep.pid;
        *fd = sv[0];
        sv[0] = -1;
        rc = 0;
        goto out;
    }
    /* A child that could not take the script's state is ours to reap. */
    if (rep.pid > 0)
        while (waitpid(rep.pid, NULL, 0) < 0 && errno == EINTR)
            ;
    if (rep.err == EPERM || rep.err == ENOTSUP)
        drop_server(); /* it has ended: see server_main */
out:
    pthread_mutex_unlock(&lock);
    int e = errno;
    if (request_fd >= 0)
        close(request_fd);
    if (cwd >= 0)
        close(cwd);
    if (sv[0] >= 0)
        close(sv[0]);
    if (sv[1] >= 0)
        close(sv[1]);
    errno = e;
    return rc;
}

/* When the module is unloaded, or the process exits: the server's
 * function addresses would name nothing. */
__attribute__((destructor)) static void end_server(void)
{
    if (owner != getpid())
        return;
    pthread_mutex_lock(&lock);
    if (server_sock >= 0)
        drop_server();
    pthread_mutex_unlock(&lock);
}
