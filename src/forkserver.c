/*
 * forkserver.c - the fork server (forkserver.h): forked when the module
 * is loaded, it makes each pool's spawner with clone(CLONE_PARENT), in the
 * state the script is in when it asks.
 */
#include "forkserver.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "arena.h"
#include "sys.h"
#include "worker.h"

extern char **environ;

/* The server's socket is moved to this descriptor number. */
#define SERVER_FD 3
/* A request's first four bytes: "pzf" and the layout's version. */
#define REQUEST_MAGIC 0x707a6601u
/* The server answers in well under a millisecond; one that does not answer
 * in this long is stopped or stuck, and is given up. */
#define REPLY_TIMEOUT_MS 10000
/* Room for the identity (see identity()); more than it takes anywhere. */
#define IDENTITY_MAX 16384

/* The descriptors a request carries, in this order. */
enum { FD_REQUEST, FD_SOCK, FD_CWD, FD_STDOUT, FD_STDERR, FD_SHARED, FD_ARENA, NFDS };

/* The request, written into a memfd (FD_REQUEST): this header, then the
 * identity, the environment (strings, each NUL-ended) and the launchers
 * (per slot: an int32 argc, -1 for a forked worker, then argc strings). */
typedef struct request {
    uint32_t magic;
    int32_t requester;           /* the script's pid: the spawner's parent */
    uint64_t setup, in_child;    /* addresses of functions of this image, which the server shares */
    uint64_t shared_addr, shared_size;
    uint64_t arena_addr;         /* 0: no arena */
    int32_t arena_records;
    int32_t kill_leftovers;
    int32_t nslots;
    int32_t has_launch;
    uint32_t umask;
    int32_t nice;
    struct rlimit limits[RLIM_NLIMITS];
    cpu_set_t cpus;
    uint64_t identity_len, env_len, launch_len;
} request;

typedef struct reply {
    int32_t err; /* 0, or why no spawner was made (errno) */
    int32_t pid;
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

typedef struct text {
    char *p;
    size_t len, cap;
    int failed;
} text;

static void put(text *t, const void *p, size_t n)
{
    if (t->failed)
        return;
    if (t->cap - t->len < n) {
        size_t cap = t->cap ? t->cap : 4096;
        while (cap - t->len < n)
            cap *= 2;
        char *np = realloc(t->p, cap);
        if (!np) {
            t->failed = 1;
            return;
        }
        t->p = np;
        t->cap = cap;
    }
    memcpy(t->p + t->len, p, n);
    t->len += n;
}

static void put_str(text *t, const char *s)
{
    put(t, s, strlen(s) + 1);
}

/* What the server cannot give a spawner and must have already, as the
 * calling thread has it: ids, groups, capabilities, no_new_privs, seccomp,
 * its namespaces, cgroup and security label (forkserver.h).  Returns 0, or
 * -1 when any of it cannot be read (the server is then not used). */
static int identity(text *t)
{
    static const char *const keys[] = {"Uid:", "Gid:", "Groups:", "CapInh:", "CapPrm:", "CapEff:",
                                       "CapBnd:", "CapAmb:", "NoNewPrivs:", "Seccomp:",
                                       "Seccomp_filters:", NULL};
    static const char *const namespaces[] = {"cgroup", "ipc", "mnt", "net", "pid", "pid_for_children",
                                             "time", "time_for_children", "user", "uts", NULL};
    char buf[IDENTITY_MAX];
    ssize_t n = read_file("/proc/thread-self/status", buf, sizeof buf);
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
    n = read_file("/proc/thread-self/cgroup", buf, sizeof buf);
    if (n < 0)
        return -1;
    put(t, buf, (size_t)n);
    for (int i = 0; namespaces[i]; i++) {
        char path[64];
        snprintf(path, sizeof path, "/proc/thread-self/ns/%s", namespaces[i]);
        n = readlink(path, buf, sizeof buf - 1);
        if (n < 0 && errno != ENOENT) /* ENOENT: a kernel without that kind */
            return -1;
        put(t, buf, n < 0 ? 0 : (size_t)n);
        put(t, "\n", 1);
    }
    /* No security module, or one without labels: nothing to compare. */
    n = read_file("/proc/thread-self/attr/current", buf, sizeof buf);
    if (n > 0)
        put(t, buf, (size_t)n);
    return t->failed ? -1 : 0;
}

static size_t shared_size(int nslots)
{
    return 2 * (size_t)nslots * sizeof(pz_slot_shared);
}

/* The script's side: under `lock`; owner is the process that started
 * the server (a forked copy of it, whose pid differs, leaves them be). */
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static int server_sock = -1;
static pid_t server_pid;
static _Atomic pid_t owner; /* read without the lock by a forked copy, to leave the lock be */

/* ---- the server ---------------------------------------------------------- */

/* The server's own identity, read once when it starts. */
static text server_identity;
/* The script's command name, which the server's spawners take back. */
static char script_name[17];
/* The environment of the last request, which environ points into. */
static char *environment;

/* Puts the environment of the request, `len` bytes of NUL-ended strings,
 * in place of the server's. */
static int set_environment(const char *env, size_t len)
{
    char *copy = malloc(len + 1);
    if (!copy)
        return ENOMEM;
    memcpy(copy, env, len);
    copy[len] = '\0';
    if (clearenv() != 0) {
        free(copy);
        return ENOMEM;
    }
    free(environment);
    environment = copy;
    for (char *s = copy; s < copy + len; s += strlen(s) + 1)
        if (strchr(s, '=') && putenv(s) != 0)
            return errno;
    return 0;
}

/* Takes on the state of the script that a spawner inherits (forkserver.h). */
static int take_state(const request *h, const int *fds, const char *env)
{
    if (fchdir(fds[FD_CWD]) != 0)
        return errno;
    umask((mode_t)h->umask);
    /* The limits first: RLIMIT_NICE bounds the nice value. */
    for (int i = 0; i < RLIM_NLIMITS; i++)
        if (setrlimit((__rlimit_resource_t)i, &h->limits[i]) != 0)
            return errno;
    if (setpriority(PRIO_PROCESS, 0, h->nice) != 0)
        return errno;
    if (sched_setaffinity(0, sizeof h->cpus, &h->cpus) != 0)
        return errno;
    int err = set_environment(env, h->env_len);
    if (err)
        return err;
    if (dup2(fds[FD_STDOUT], 1) < 0 || dup2(fds[FD_STDERR], 2) < 0)
        return errno;
    return 0;
}

/* The launchers' argv arrays, pointing into the request. */
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
        if (argc < 0)
            continue;
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

/* Makes one spawner; returns 0 and sets *pid, or an errno. */
static int make_spawner(const int *fds, int nfds, pid_t *pid)
{
    struct stat st;
    if (nfds < FD_ARENA || fstat(fds[FD_REQUEST], &st) != 0 || (size_t)st.st_size < sizeof(request))
        return EPROTO;
    size_t size = (size_t)st.st_size;
    char *blob = malloc(size);
    if (!blob)
        return ENOMEM;
    int err = EPROTO;
    void *shared = NULL;
    pz_arena *arena = NULL;
    char ***launch = NULL;
    request h;
    if (pread(fds[FD_REQUEST], blob, size, 0) != (ssize_t)size)
        goto done;
    memcpy(&h, blob, sizeof h);
    char *identity_p = blob + sizeof h;
    if (h.magic != REQUEST_MAGIC || h.identity_len > size || h.env_len > size || h.launch_len > size ||
        sizeof h + h.identity_len + h.env_len + h.launch_len != size || h.nslots < 1 ||
        h.shared_size != shared_size(h.nslots) || (h.arena_addr && nfds < NFDS))
        goto done;
    err = EPERM;
    if (h.identity_len != server_identity.len || memcmp(identity_p, server_identity.p, h.identity_len) != 0)
        goto done;
    err = take_state(&h, fds, identity_p + h.identity_len);
    if (err)
        goto done;
    shared = (void *)(uintptr_t)h.shared_addr;
    if (pz_map_shared_at(fds[FD_SHARED], shared, h.shared_size, 0) != 0) {
        err = errno;
        shared = NULL;
        goto done;
    }
    if (h.arena_addr) {
        arena = pz_arena_attach(fds[FD_ARENA], (void *)(uintptr_t)h.arena_addr, h.arena_records);
        if (!arena) {
            err = errno;
            goto done;
        }
    }
    if (h.has_launch) {
        err = ENOMEM;
        launch = read_launch(&h, identity_p + h.identity_len + h.env_len, h.launch_len);
        if (!launch)
            goto done;
    }
    pz_spawner_config config = {shared,
                                arena,
                                (void (*)(struct lua_State *))(uintptr_t)h.setup,
                                (void (*)(void))(uintptr_t)h.in_child,
                                h.kill_leftovers,
                                (char *const *const *)launch,
                                h.nslots,
                                -1};
    /* CLONE_PARENT: the spawner is the script's child (its parent-death
     * signal, its SIGCHLD, its waitpid), not ours.  A raw clone, like a
     * fork of this single-threaded process but for glibc's fork handlers,
     * which nothing here needs: the spawner forks its workers with fork(). */
    pid_t child = (pid_t)syscall(SYS_clone, CLONE_PARENT | SIGCHLD, 0, NULL, NULL, 0);
    if (child == 0) {
        (void)prctl(PR_SET_NAME, script_name);
        close(SERVER_FD);
        pz_spawner_become(&config, fds[FD_SOCK], h.requester);
    }
    if (child < 0) {
        err = errno;
        goto done;
    }
    /* Where clone ignores CLONE_PARENT (valgrind does) the child is ours:
     * the script could not wait for it. */
    if (waitpid(child, NULL, WNOHANG) != -1 || errno != ECHILD) {
        kill(child, SIGKILL);
        while (waitpid(child, NULL, 0) < 0 && errno == EINTR)
            ;
        err = ENOTSUP;
        goto done;
    }
    *pid = child;
    err = 0;
done:
    if (launch)
        for (int i = 0; i < h.nslots; i++)
            free(launch[i]);
    free(launch);
    pz_arena_free(arena);
    if (shared)
        munmap(shared, h.shared_size);
    free(blob);
    return err;
}

/* Receives a request: its magic number and up to NFDS descriptors.
 * Returns 1, 0 at the end of file, -1 on error. */
static int receive(int sock, uint32_t *magic, int *fds, int *nfds)
{
    union {
        char buf[CMSG_SPACE(NFDS * sizeof(int))];
        struct cmsghdr align;
    } ctl;
    struct iovec iov = {magic, sizeof *magic};
    struct msghdr msg = {0};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = ctl.buf;
    msg.msg_controllen = sizeof ctl.buf;
    ssize_t r;
    do
        r = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
    while (r < 0 && errno == EINTR);
    *nfds = 0;
    if (r <= 0)
        return (int)r;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c))
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
            int n = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
            memcpy(fds + *nfds, CMSG_DATA(c), (size_t)n * sizeof(int));
            *nfds += n;
        }
    if (r != (ssize_t)sizeof *magic || (msg.msg_flags & MSG_CTRUNC))
        *magic = 0;
    return 1;
}

static _Noreturn void server_main(int sock, pid_t parent)
{
    /* Forked with the lock held: the spawners made here, and their
     * workers, which may make pools of their own, need it free. */
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
    int devnull = open("/dev/null", O_RDWR | O_CLOEXEC);
    if (devnull < 0 || dup2(devnull, 0) < 0 || dup2(devnull, 1) < 0 || dup2(devnull, 2) < 0)
        _exit(1);
    if (sock != SERVER_FD) {
        if (dup3(sock, SERVER_FD, O_CLOEXEC) < 0)
            _exit(1);
        sock = SERVER_FD;
    }
    pz_close_fds_from(3, sock);
    devnull = open("/dev/null", O_RDWR | O_CLOEXEC);
    if (devnull < 0 || identity(&server_identity) != 0)
        _exit(1);
    for (;;) {
        uint32_t magic;
        int fds[NFDS], nfds;
        int r = receive(sock, &magic, fds, &nfds);
        if (r <= 0)
            _exit(0); /* the script closed its end, or is gone */
        reply rep = {EPROTO, 0};
        pid_t pid = 0;
        if (magic == REQUEST_MAGIC)
            rep.err = make_spawner(fds, nfds, &pid);
        rep.pid = (int32_t)pid;
        for (int i = 0; i < nfds; i++)
            close(fds[i]);
        if (dup2(devnull, 1) < 0 || dup2(devnull, 2) < 0)
            _exit(1);
        ssize_t w;
        do
            w = send(sock, &rep, sizeof rep, MSG_NOSIGNAL);
        while (w < 0 && errno == EINTR);
        if (w != (ssize_t)sizeof rep)
            _exit(0);
    }
}

/* ---- the script's side --------------------------------------------------- */

void pz_forkserver_start(void)
{
    if (pz_forked_child())
        return;
    pthread_mutex_lock(&lock);
    if (owner == 0) {
        int sv[2];
        if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) == 0) {
            fflush(NULL);
            pid_t parent = getpid();
            pid_t pid = fork();
            if (pid == 0)
                server_main(sv[1], parent);
            close(sv[1]);
            if (pid > 0) {
                server_sock = sv[0];
                server_pid = pid;
                owner = parent;
            } else {
                close(sv[0]);
            }
        }
    }
    pthread_mutex_unlock(&lock);
}

pid_t pz_forkserver_pid(void)
{
    if (owner != getpid())
        return 0;
    pthread_mutex_lock(&lock);
    pid_t pid = owner == getpid() && server_sock >= 0 ? server_pid : 0;
    pthread_mutex_unlock(&lock);
    return pid;
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

/* The request's memfd, or -1. */
static int write_request(const pz_spawner_config *c)
{
    request h;
    memset(&h, 0, sizeof h);
    h.magic = REQUEST_MAGIC;
    h.requester = (int32_t)getpid();
    h.setup = (uint64_t)(uintptr_t)c->setup;
    h.in_child = (uint64_t)(uintptr_t)c->in_child;
    h.shared_addr = (uint64_t)(uintptr_t)c->shared;
    h.shared_size = shared_size(c->nslots);
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
    if (sched_getaffinity(0, sizeof h.cpus, &h.cpus) != 0)
        return -1;
    for (int i = 0; i < RLIM_NLIMITS; i++)
        if (getrlimit((__rlimit_resource_t)i, &h.limits[i]) != 0)
            return -1;
    text t = {0};
    put(&t, &h, sizeof h);
    size_t mark = t.len;
    if (identity(&t) != 0) {
        free(t.p);
        return -1;
    }
    h.identity_len = t.len - mark;
    mark = t.len;
    for (char **e = environ; e && *e; e++)
        put_str(&t, *e);
    h.env_len = t.len - mark;
    mark = t.len;
    for (int i = 0; c->launch && i < c->nslots; i++) {
        int32_t argc = -1;
        if (c->launch[i])
            for (argc = 0; c->launch[i][argc];)
                argc++;
        put(&t, &argc, sizeof argc);
        for (int32_t j = 0; j < argc; j++)
            put_str(&t, c->launch[i][j]);
    }
    h.launch_len = t.len - mark;
    int fd = -1;
    if (!t.failed) {
        memcpy(t.p, &h, sizeof h);
        fd = memfd_create("parallelize-request", MFD_CLOEXEC);
        if (fd >= 0 && pz_write_all(fd, t.p, t.len) != 0) {
            close(fd);
            fd = -1;
        }
    }
    free(t.p);
    return fd;
}

/* Sends the request and reads the reply; -1 when the server failed us. */
static int ask(const int *fds, int nfds, reply *rep)
{
    uint32_t magic = REQUEST_MAGIC;
    union {
        char buf[CMSG_SPACE(NFDS * sizeof(int))];
        struct cmsghdr align;
    } ctl;
    memset(&ctl, 0, sizeof ctl);
    struct iovec iov = {&magic, sizeof magic};
    struct msghdr msg = {0};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = ctl.buf;
    msg.msg_controllen = CMSG_SPACE((size_t)nfds * sizeof(int));
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN((size_t)nfds * sizeof(int));
    memcpy(CMSG_DATA(c), fds, (size_t)nfds * sizeof(int));
    ssize_t r;
    do
        r = sendmsg(server_sock, &msg, MSG_NOSIGNAL);
    while (r < 0 && errno == EINTR);
    if (r != (ssize_t)sizeof magic)
        return -1;
    int64_t deadline = pz_now_ns() + (int64_t)REPLY_TIMEOUT_MS * 1000000;
    for (;;) {
        struct pollfd pfd = {server_sock, POLLIN, 0};
        int64_t left = deadline - pz_now_ns();
        if (left <= 0)
            return -1;
        int n = poll(&pfd, 1, (int)(left / 1000000) + 1);
        if (n < 0 && errno != EINTR)
            return -1;
        if (n > 0)
            break;
    }
    do
        r = recv(server_sock, rep, sizeof *rep, 0);
    while (r < 0 && errno == EINTR);
    return r == (ssize_t)sizeof *rep ? 0 : -1;
}

int pz_forkserver_spawner(const pz_spawner_config *config, int sock, pid_t *pid)
{
    if (config->shared_fd < 0 || (config->arena && config->arena->fd < 0) || owner != getpid())
        return -1;
    pthread_mutex_lock(&lock);
    int rc = -1;
    if (server_sock < 0 || owner != getpid())
        goto out;
    int request_fd = write_request(config);
    if (request_fd < 0)
        goto out;
    /* A script that closed its stdout or stderr since: the spawner gets
     * the descriptor the fork would have left it, the server cannot pass it. */
    int cwd = fcntl(1, F_GETFD) < 0 || fcntl(2, F_GETFD) < 0 ? -1 : open(".", O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (cwd >= 0) {
        int fds[NFDS] = {request_fd, sock, cwd, 1, 2, config->shared_fd, config->arena ? config->arena->fd : -1};
        reply rep;
        if (ask(fds, config->arena ? NFDS : NFDS - 1, &rep) != 0) {
            drop_server();
        } else if (rep.err == 0 && rep.pid > 0) {
            *pid = rep.pid;
            rc = 0;
        } else if (rep.err == ENOTSUP) {
            drop_server(); /* it will never work */
        }
        close(cwd);
    }
    close(request_fd);
out:
    pthread_mutex_unlock(&lock);
    return rc;
}

/* When the module is unloaded, or the process exits: the server's
 * function addresses would name nothing. */
__attribute__((destructor)) static void end_server(void)
{
    /* A forked copy (a spawner, a worker that calls exit) may hold a copy
     * of the lock taken: it never owns the server. */
    if (owner != getpid())
        return;
    pthread_mutex_lock(&lock);
    if (server_sock >= 0 && owner == getpid())
        drop_server();
    pthread_mutex_unlock(&lock);
}
