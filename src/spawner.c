/*
 * spawner.c - the single-threaded process that forks, signals and reaps the
 * workers of one pool (see spawner.h for why it exists).
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "core.h"
#include "spawner.h"
#include "sys.h"
#include "worker.h"

/* The worker's socket is moved to this descriptor number. */
#define WORKER_FD 3

int pz_spawn_send(int fd, const pz_spawn_msg *m, int pass_fd)
{
    return pz_send_fds(fd, m, sizeof *m, &pass_fd, pass_fd >= 0 ? 1 : 0);
}

int pz_spawn_recv(int fd, pz_spawn_msg *m, int *passed_fd)
{
    int fds[PZ_PASS_FDS_MAX], nfds;
    int r = pz_recv_fds(fd, m, sizeof *m, fds, &nfds, NULL);
    *passed_fd = nfds > 0 ? fds[0] : -1;
    for (int i = 1; i < nfds; i++)
        close(fds[i]); /* a spawner message carries one at most */
    return r;
}

/* Set in the spawner and so in every worker: see __lsan_is_turned_off. */
static int forked_child;

/* LeakSanitizer (in the sanitizer build) asks this before it checks for
 * leaks at exit.  A forked process holds a copy of its parent's heap that
 * it never frees, and a worker leaves by os.exit or _exit without tearing
 * its state down: a leak check there would report the parent's memory. */
PZ_EXPORT int __lsan_is_turned_off(void);
PZ_EXPORT int __lsan_is_turned_off(void)
{
    return forked_child;
}

void pz_mark_forked_child(void)
{
    forked_child = 1;
}

int pz_forked_child(void)
{
    return forked_child;
}

/* One live child: a worker, or a launcher (whose group is left alone). */
typedef struct kid {
    pid_t pid;
    int launcher;
} kid;

/* The spawner's own state: the socket to the parent and its live children. */
typedef struct spawner {
    pz_spawner_config config;
    int sock;
    int sigfd;
    kid *kids;
    size_t nkids, capkids;
    int relay_fd;    /* the write end of the stderr relay's pipe, or -1 */
    pid_t relay_pid; /* the stderr relay (stderr_relay), or 0 */
} spawner;

static int kid_index(const spawner *s, pid_t pid)
{
    for (size_t i = 0; i < s->nkids; i++)
        if (s->kids[i].pid == pid)
            return (int)i;
    return -1;
}

/* Gives a process the hygiene every child of ours needs: receive `sig`
 * when its parent dies, and stop if the parent is already gone (it may have
 * died before prctl took effect). */
static void bind_to_parent(pid_t expected_parent, int sig)
{
    if (prctl(PR_SET_PDEATHSIG, sig) != 0 || getppid() != expected_parent)
        _exit(1);
}

/* Runs in the forked worker: keep only its socket and stdio, restore signal
 * defaults, lead a process group of its own when asked (so that what it
 * leaves running can be killed with it), then become the worker. */
static void become_worker(spawner *s, int fd, int record, int slot, pid_t spawner_pid)
{
    if (pz_worker_signals() != 0)
        _exit(1);
    if (s->config.kill_leftovers && setpgid(0, 0) != 0)
        _exit(1);
    if (fd != WORKER_FD) {
        if (dup2(fd, WORKER_FD) < 0)
            _exit(1);
    }
    pz_close_fds_from(WORKER_FD + 1, -1);
    /* dup2 cleared close-on-exec; set it again so programs the executor
     * runs (os.execute, io.popen) do not inherit the worker's socket. */
    if (fcntl(WORKER_FD, F_SETFD, FD_CLOEXEC) != 0)
        _exit(1);
    bind_to_parent(spawner_pid, SIGKILL);
    pz_worker_main(WORKER_FD, WORKER_FD, slot, &s->config.shared[record], s->config.arena, record,
                   s->config.setup, 0);
}

/* ssh makes its stdin, stdout and stderr non-blocking when they are not
 * terminals.  That flag belongs to the open file description, which a
 * launcher shares with the parent for stderr: on a pipe, the parent's own
 * writes to stderr would then fail with EAGAIN whenever the pipe is full.
 * A pipe reopened through /proc is a description of its own on the same
 * pipe (O_NONBLOCK only for the open, which would otherwise wait for a
 * reader).  Anything else is left shared: O_NONBLOCK means nothing to a
 * regular file, and ssh leaves a terminal alone. */
static void own_stderr(void)
{
    struct stat st;
    if (fstat(2, &st) != 0 || !S_ISFIFO(st.st_mode))
        return;
    int fd = open("/proc/self/fd/2", O_WRONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0)
        return;
    int flags = fcntl(fd, F_GETFL);
    if (flags >= 0 && fcntl(fd, F_SETFL, flags & ~O_NONBLOCK) == 0)
        dup2(fd, 2);
    close(fd);
}

/* The relay: copies what launchers write to their stderr (the pipe's
 * read end, `in`) to the parent's stderr, with blocking writes, until every
 * writer has closed the pipe.  What cannot be written (a reader gone) is
 * read and dropped, so that no launcher waits on a full pipe.  It holds
 * nothing of the parent's but stderr: a launcher's helper that keeps the
 * pipe open (`sleep 100 &` in its command, an ssh ProxyCommand outliving
 * a SIGKILLed ssh) keeps the relay alive past the spawner and the script,
 * and a stdout held with it kept a reader of the script's stdout (`$(...)`,
 * a pipe) waiting for an end of file as long. */
static _Noreturn void relay_main(int in)
{
    sigset_t none;
    sigemptyset(&none);
    signal(SIGTERM, SIG_DFL);
    signal(SIGCHLD, SIG_DFL);
    if (sigprocmask(SIG_SETMASK, &none, NULL) != 0)
        _exit(1);
    int devnull = open("/dev/null", O_RDWR | O_CLOEXEC);
    if (devnull < 0 || dup2(devnull, 0) < 0 || dup2(devnull, 1) < 0)
        _exit(1); /* the launchers' stderr is then a pipe nobody reads: EPIPE, and reap() makes another */
    pz_close_fds_from(3, in);
    char buf[16384];
    int broken = 0;
    for (;;) {
        ssize_t n = read(in, buf, sizeof buf);
        if (n == 0)
            _exit(0);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            _exit(1);
        }
        for (ssize_t off = 0; off < n && !broken;) {
            ssize_t w = write(2, buf + off, (size_t)(n - off));
            if (w > 0)
                off += w;
            else if (w < 0 && errno == EAGAIN) {
                struct pollfd p = {2, POLLOUT, 0};
                poll(&p, 1, -1);
            } else if (w < 0 && errno != EINTR)
                broken = 1;
        }
    }
}

/* A socket as the parent's stderr (a service's journal, a supervisor's
 * socketpair) cannot be reopened as a description of its own (own_stderr),
 * and ssh makes its stderr non-blocking: shared with the launcher, the
 * parent's own writes to stderr (and to stdout, when it is the same
 * socket, as a journal's is) then failed with EAGAIN whenever the reader
 * lagged (1,907 of 2,000 lines lost).  Launchers get instead the write end
 * of a pipe, which a relay process copies to the socket; made at the first
 * launcher, shared by all of this spawner's.  Returns the write end, or -1
 * to share stderr as it is (not a socket, or no relay could be made). */
static int stderr_relay(spawner *s)
{
    if (s->relay_fd >= 0)
        return s->relay_fd;
    struct stat st;
    if (fstat(2, &st) != 0 || !S_ISSOCK(st.st_mode))
        return -1;
    int fds[2];
    if (pipe2(fds, O_CLOEXEC) != 0)
        return -1;
    pid_t pid = fork();
    if (pid < 0) {
        close(fds[0]);
        close(fds[1]);
        return -1;
    }
    if (pid == 0)
        relay_main(fds[0]);
    close(fds[0]);
    s->relay_fd = fds[1];
    s->relay_pid = pid;
    return fds[1];
}

/* Runs in the forked launcher: the worker's socket on stdin and stdout,
 * stderr the parent's (or the relay's pipe to it: stderr_relay), nothing
 * else open but the status pipe (close-on-exec), default signal
 * dispositions, a process group of its own (out of the terminal's reach:
 * see spawner.h); then exec.  When exec fails, its errno goes into the
 * status pipe. */
static _Noreturn void become_launcher(spawner *s, int fd, int slot, pid_t spawner_pid, int status, int relay)
{
    char *const *argv = s->config.launch[slot];
    sigset_t none;
    sigemptyset(&none);
    int err = 0;
    for (int sig = 1; sig < NSIG; sig++)
        if (sig != SIGKILL && sig != SIGSTOP)
            signal(sig, SIG_DFL);
    if (sigprocmask(SIG_SETMASK, &none, NULL) != 0 || setpgid(0, 0) != 0 || dup2(fd, 0) < 0 ||
        dup2(fd, 1) < 0 || (relay >= 0 && dup2(relay, 2) < 0)) {
        err = errno;
    } else {
        if (relay < 0)
            own_stderr();
        pz_close_fds_from(3, status);
        bind_to_parent(spawner_pid, SIGKILL);
        execvp(argv[0], argv);
        err = errno;
    }
    ssize_t r;
    do
        r = write(status, &err, sizeof err);
    while (r < 0 && errno == EINTR);
    _exit(127);
}

static _Noreturn void shut_down(spawner *s);

/* Tells the parent something.  Blocking send: the parent's I/O thread
 * always reads.  A report must not be lost (the parent would never learn
 * that a worker died), so a failure other than a moment's lack of kernel
 * memory ends the spawner, and with it every worker: the parent then sees
 * the spawner's end of file and accounts for all of them at once. */
static void report(spawner *s, int kind, int slot, uint32_t gen, pid_t pid, int arg)
{
    pz_spawn_msg m = {kind, slot, gen, pid, arg};
    while (pz_spawn_send(s->sock, &m, -1) != 0) {
        if (errno != ENOBUFS && errno != ENOMEM)
            shut_down(s);
        pz_sleep_ns(1000000);
    }
}

/* Forks slot's launcher and waits until it has executed its program:
 * returns its pid, 0 after reporting why it could not (the child reaped),
 * or -1 with errno set when the fork itself failed. */
static pid_t start_launcher(spawner *s, const pz_spawn_msg *m, int fd, pid_t me)
{
    int relay = stderr_relay(s);
    int status[2];
    if (pipe2(status, O_CLOEXEC) != 0)
        return -1;
    pid_t pid = fork();
    if (pid == 0) {
        close(status[0]);
        become_launcher(s, fd, m->arg, me, status[1], relay);
    }
    int fork_errno = errno;
    close(status[1]);
    if (pid < 0) {
        close(status[0]);
        errno = fork_errno;
        return -1;
    }
    /* See spawn for why both sides set the group; EACCES after an exec. */
    setpgid(pid, pid);
    /* End of file: the exec succeeded (the pipe closed with it).  Four
     * bytes: it failed with that errno, and the child has exited. */
    int err = 0;
    ssize_t r;
    do
        r = read(status[0], &err, sizeof err);
    while (r < 0 && errno == EINTR);
    close(status[0]);
    if (r == 0)
        return pid;
    if (r != (ssize_t)sizeof err)
        err = r < 0 ? errno : EPROTO;
    while (waitpid(pid, NULL, 0) < 0 && errno == EINTR)
        ;
    report(s, PZ_S_EXEC_FAILED, m->slot, m->gen, 0, err);
    return 0;
}

static void spawn(spawner *s, const pz_spawn_msg *m, int fd)
{
    if (fd < 0) {
        report(s, PZ_S_FAILED, m->slot, m->gen, 0, EBADF);
        return;
    }
    if (s->nkids == s->capkids) {
        size_t cap = s->capkids ? s->capkids * 2 : 64;
        kid *k = realloc(s->kids, cap * sizeof *k);
        if (!k) {
            close(fd);
            report(s, PZ_S_FAILED, m->slot, m->gen, 0, ENOMEM);
            return;
        }
        s->kids = k;
        s->capkids = cap;
    }
    pid_t me = getpid();
    int launcher = s->config.launch && s->config.launch[m->arg];
    pid_t pid;
    if (launcher) {
        pid = start_launcher(s, m, fd, me);
    } else {
        pid = fork();
        if (pid == 0)
            become_worker(s, fd, m->slot, m->arg, me);
        /* Both sides set the group, so that it exists before either one
         * acts on it; the child's call wins any race, and EACCES here means
         * it has already exec'd, which a worker never does first. */
        if (pid > 0 && s->config.kill_leftovers)
            setpgid(pid, pid);
    }
    int fork_errno = errno;
    close(fd);
    if (pid < 0) {
        report(s, PZ_S_FAILED, m->slot, m->gen, 0, fork_errno);
        return;
    }
    if (pid == 0)
        return; /* a launcher that could not be executed: reported */
    s->kids[s->nkids++] = (kid){pid, launcher};
    report(s, PZ_S_SPAWNED, m->slot, m->gen, pid, 0);
}

/* Kills what a worker that ended left running in its process group
 * (never a launcher's: see spawner.h). */
static void kill_leftovers(const spawner *s, const kid *k)
{
    /* The group's id stays reserved while any member lives, so it names
     * this group even after the worker was reaped (ESRCH: nothing left). */
    if (s->config.kill_leftovers && !k->launcher)
        kill(-k->pid, SIGKILL);
}

static void forget_kid(spawner *s, pid_t pid)
{
    int i = kid_index(s, pid);
    if (i < 0)
        return;
    kid k = s->kids[i];
    s->kids[i] = s->kids[--s->nkids];
    kill_leftovers(s, &k);
}

static void reap(spawner *s)
{
    int status;
    pid_t pid;
    while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
        if (pid == s->relay_pid) {
            /* No worker's: the parent need not know.  Its pipe has no
             * reader left: handed to the next launcher, its first write
             * to stderr would raise SIGPIPE (sh, srun: killed while
             * starting, again at every attempt, until the slot is given
             * up).  The next launcher makes a new relay. */
            s->relay_pid = 0;
            if (s->relay_fd >= 0) {
                close(s->relay_fd);
                s->relay_fd = -1;
            }
            continue;
        }
        forget_kid(s, pid);
        report(s, PZ_S_EXITED, -1, 0, pid, status);
    }
}

/* The parent closed its end, or died: kill what is left (with what each
 * worker left running), reap it all, leave.  A launcher gets SIGTERM and
 * LAUNCHER_GRACE_NS to go before SIGKILL: one still waiting for the place
 * it launches on has asked for it elsewhere, and only it can withdraw the
 * request (srun killed outright while queued for an allocation leaves its
 * job pending in Slurm's queue for good; SIGTERM makes it cancel the job).
 * Once the spawner has gone, its launchers' parent-death signal is SIGKILL
 * anyway. */
#define LAUNCHER_GRACE_NS 1000000000LL
#define REAP_POLL_NS 5000000LL
static _Noreturn void shut_down(spawner *s)
{
    int launchers = 0;
    /* The relay ends once the launchers, the other writers, have. */
    if (s->relay_fd >= 0)
        close(s->relay_fd);
    for (size_t i = 0; i < s->nkids; i++) {
        if (s->kids[i].launcher) {
            kill(s->kids[i].pid, SIGTERM);
            launchers = 1;
        } else {
            kill(s->kids[i].pid, SIGKILL);
            kill_leftovers(s, &s->kids[i]);
        }
    }
    int64_t deadline = pz_now_ns() + LAUNCHER_GRACE_NS;
    while (s->nkids > 0) {
        int status;
        pid_t pid = waitpid(-1, &status, launchers ? WNOHANG : 0);
        if (pid > 0) {
            forget_kid(s, pid);
            continue;
        }
        if (pid < 0) {
            if (errno == EINTR)
                continue;
            break; /* ECHILD: nothing left to reap */
        }
        /* Launchers still running. */
        if (pz_now_ns() >= deadline) {
            for (size_t i = 0; i < s->nkids; i++)
                kill(s->kids[i].pid, SIGKILL);
            launchers = 0;
            continue;
        }
        pz_sleep_ns(REAP_POLL_NS);
    }
    /* The relay, which has what the launchers wrote last to copy: a
     * moment for it, and no zombie left behind when it is quick. */
    for (int i = 0; s->relay_pid > 0 && i < 40; i++) {
        pid_t r = waitpid(s->relay_pid, NULL, WNOHANG);
        if (r == s->relay_pid || (r < 0 && errno != EINTR))
            break;
        pz_sleep_ns(REAP_POLL_NS);
    }
    _exit(0);
}

static void handle_request(spawner *s)
{
    pz_spawn_msg m;
    int fd;
    int r = pz_spawn_recv(s->sock, &m, &fd);
    if (r == 0 || (r < 0 && errno != EAGAIN && errno != EPROTO))
        shut_down(s);
    if (r < 0)
        return;
    if (m.kind == PZ_S_SPAWN) {
        spawn(s, &m, fd);
        return;
    }
    if (fd >= 0)
        close(fd);
    /* Only signal a pid that is still our unreaped child. */
    if (m.kind == PZ_S_KILL && kid_index(s, m.pid) >= 0)
        kill(m.pid, m.arg);
}

/* The steps of the spawner's start that can fail, as PZ_S_GAVE_UP names
 * them. */
enum { STEP_OPEN_DEVNULL, STEP_DUP2_STDIN, STEP_DUP2_SOCKET, STEP_SIGPROCMASK, STEP_SIGNALFD, NSTEPS };
static const char *const step_names[NSTEPS] = {"open /dev/null", "dup2 /dev/null to stdin", "dup2 of its socket",
                                               "sigprocmask", "signalfd"};

const char *pz_spawner_step(int step)
{
    return step >= 0 && step < NSTEPS ? step_names[step] : NULL;
}

/* The spawner cannot go on: tells the parent which step failed and why
 * (PZ_S_GAVE_UP on `sock`: every slot that had not initialized gets it in
 * its init error, spawnq.c), says it on stderr too (the script's, which it
 * shares: a script that reads no init error still learns it), and ends. */
static _Noreturn void spawner_fail(int sock, int step)
{
    int err = errno;
    pz_spawn_msg m = {PZ_S_GAVE_UP, step, 0, 0, err};
    /* One try: the parent may be gone, and nothing else is left to do. */
    (void)pz_spawn_send(sock, &m, -1);
    char line[256];
    int n = snprintf(line, sizeof line, "parallelize: the spawner process could not go on: %s: %s\n",
                     step_names[step], strerror(err));
    if (n > 0) {
        ssize_t w = write(2, line, (size_t)n < sizeof line ? (size_t)n : sizeof line - 1);
        (void)w; /* nothing else to tell it with */
    }
    _exit(1);
}

static _Noreturn void spawner_main(const pz_spawner_config *config, int sock, pid_t parent)
{
    spawner s = {*config, sock, -1, NULL, 0, 0, -1, 0};
    for (int sig = 1; sig < NSIG; sig++)
        if (sig != SIGKILL && sig != SIGSTOP)
            signal(sig, SIG_DFL);
    signal(SIGINT, SIG_IGN);  /* Ctrl-C is the parent's to handle */
    signal(SIGPIPE, SIG_IGN); /* a closed parent socket shows as EPIPE */
    signal(SIGQUIT, SIG_IGN);
    /* SIGCHLD (a worker ended) and SIGTERM (the parent died, or someone
     * asks us to end) are read from a signalfd: when the parent dies, the
     * spawner kills what its workers left running before it goes. */
    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, SIGCHLD);
    sigaddset(&mask, SIGTERM);
    if (sigprocmask(SIG_SETMASK, &mask, NULL) != 0)
        spawner_fail(sock, STEP_SIGPROCMASK);
    bind_to_parent(parent, SIGTERM);
    s.sigfd = signalfd(-1, &mask, SFD_CLOEXEC | SFD_NONBLOCK);
    if (s.sigfd < 0)
        spawner_fail(sock, STEP_SIGNALFD);
    for (;;) {
        struct pollfd p[2] = {{s.sock, POLLIN, 0}, {s.sigfd, POLLIN, 0}};
        if (poll(p, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            shut_down(&s);
        }
        if (p[1].revents) {
            struct signalfd_siginfo si;
            int term = 0;
            while (read(s.sigfd, &si, sizeof si) == (ssize_t)sizeof si)
                term |= si.ssi_signo == SIGTERM;
            if (term)
                shut_down(&s);
            reap(&s);
        }
        if (p[0].revents)
            handle_request(&s);
    }
}

_Noreturn void pz_spawner_become(const pz_spawner_config *config, int sock, pid_t parent)
{
    forked_child = 1;
    if (config->in_child)
        config->in_child();
    int devnull = open("/dev/null", O_RDONLY | O_CLOEXEC);
    if (devnull < 0)
        spawner_fail(sock, STEP_OPEN_DEVNULL);
    if (dup2(devnull, 0) < 0)
        spawner_fail(sock, STEP_DUP2_STDIN);
    /* Keep stdio (0-2) and the socket; everything else belongs to the
     * parent (other pools' sockets would otherwise hide their EOFs). */
    if (sock != WORKER_FD + 1) {
        if (dup2(sock, WORKER_FD + 1) < 0)
            spawner_fail(sock, STEP_DUP2_SOCKET);
        sock = WORKER_FD + 1;
    }
    pz_close_fds_from(3, sock);
    spawner_main(config, sock, parent);
}

int pz_spawner_start(const pz_spawner_config *config, pid_t *pid, int *fd)
{
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) != 0)
        return -1;
    /* Unflushed stdio output would otherwise be written again by the child. */
    fflush(NULL);
    pid_t parent = getpid();
    pid_t p = fork();
    if (p < 0) {
        int e = errno;
        close(sv[0]);
        close(sv[1]);
        errno = e;
        return -1;
    }
    if (p == 0)
        pz_spawner_become(config, sv[1], parent);
    close(sv[1]);
    *pid = p;
    *fd = sv[0];
    return 0;
}
