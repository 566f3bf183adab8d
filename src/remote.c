/*
 * remote.c - `pzlua --worker`, the far end of a launcher: a worker for a
 * parent on another host, speaking the frame protocol on stdin and stdout.
 *
 * Descriptors.  The protocol moves to private copies of 0 and 1 (close-on-
 * exec); then fd 0 reads /dev/null and fd 1 writes where fd 2 does, so
 * that what an executor prints (print, io.write, a program it runs) goes
 * to stderr, which the launcher carries back to the parent's stderr, and
 * never into the protocol.
 *
 * Two processes.  This one, the supervisor, forks the worker (worker.c)
 * and waits for it:
 *  - It watches the worker's input for its end (POLLHUP on a pipe,
 *    POLLRDHUP on a socket) and then kills the worker at once.  A remote
 *    worker has no parent-death signal that helps: when the parent dies or
 *    the link drops, only the launcher's end tells, by closing the input.
 *    A worker that neither reads nor writes (a long computation) would
 *    never notice; the supervisor does, even in the middle of a call.
 *  - Its exit status tells the parent's side how the worker ended, through
 *    the launcher (ssh and srun pass a command's exit status on): the
 *    worker's own status, 128 + the signal that killed it (ssh itself
 *    reports a remote command killed by a signal as 255, the same as a lost
 *    connection), or 255 when the worker was ended because its input
 *    ended (a worker's own 255 is passed on as 254).  The parent charges a
 *    death to the running call except for 255 (slot.c,
 *    remote_running_call).
 *  - The worker leads a process group of its own; once it has ended, the
 *    supervisor kills what is left in that group (what the executor left
 *    running), as the spawner does for local workers.  With kill_leftovers
 *    off the worker joins the supervisor's group when it reads its settings
 *    (worker.c), and nothing is killed.
 *  - SIGTERM and SIGHUP are passed on to the worker (srun forwards them to
 *    its task; a session's end may bring SIGHUP); SIGINT and SIGQUIT are
 *    ignored here and caught by the worker's do-nothing handler, as for a
 *    local worker: interrupting is the parent's business.
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
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "core.h"
#include "remote.h"
#include "spawner.h"
#include "worker.h"

/* The exit status that says the worker did not end of its own doing. */
#define LOST_INPUT 255

static _Noreturn void fail(const char *what)
{
    fprintf(stderr, "pzlua --worker: %s: %s\n", what, strerror(errno));
    _exit(1);
}

/* Runs in the forked worker: the hygiene of every worker (signals, a
 * process group of its own, death with its supervisor), then the worker
 * loop on the private descriptors. */
static _Noreturn void become_worker(int in, int out, int sigfd, pid_t supervisor)
{
    static pz_slot_shared unread; /* no parent reads it: see worker.h */
    pz_mark_forked_child();
    close(sigfd);
    if (pz_worker_signals() != 0 || setpgid(0, 0) != 0)
        fail("cannot prepare the worker process");
    if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0 || getppid() != supervisor)
        _exit(1);
    pz_worker_main(in, out, 0, &unread, NULL, 0, pz_preload, 1);
}

/* What a worker that exited with status LOST_INPUT of its own doing (an
 * executor's os.exit(255) or os.exit(-1)) is reported as: passed on as
 * 255, it read as a lost link, was never charged, and its call was run
 * again for ever (101 relaunches in 10 s over ssh, wait never ending). */
#define OWN_255 254

/* The exit status that reports how the worker ended (see the top). */
static int status_of(int status, int lost)
{
    if (lost)
        return LOST_INPUT;
    if (WIFEXITED(status))
        return WEXITSTATUS(status) == LOST_INPUT ? OWN_255 : WEXITSTATUS(status);
    if (WIFSIGNALED(status))
        return 128 + WTERMSIG(status);
    return 1;
}

/* What stops descriptor fd from carrying the protocol, or NULL: the
 * launcher's link to the parent is a pipe or a socket (ssh, docker exec),
 * or a terminal (srun -u gives its task's stdout a pty, in raw mode).  A
 * file, a device such as /dev/null, or a closed descriptor is a command
 * that sent the worker's input or output elsewhere (`pzlua --worker >&-`,
 * `>/dev/null`, `<file`), and the parent, which cannot see that, would
 * wait for its first answer for ever.  pzlua's main holds a closed
 * standard descriptor with /dev/null opened the wrong way round (pzlua.c),
 * which is how a closed one shows here. */
static const char *not_a_link(int fd, int writing)
{
    struct stat st;
    int flags = fcntl(fd, F_GETFL);
    if (flags < 0 || fstat(fd, &st) != 0 || (flags & O_ACCMODE) == (writing ? O_RDONLY : O_WRONLY))
        return "closed";
    if (S_ISFIFO(st.st_mode) || S_ISSOCK(st.st_mode) || isatty(fd))
        return NULL;
    if (S_ISREG(st.st_mode))
        return "a file";
    if (S_ISCHR(st.st_mode))
        return "a device (/dev/null?)";
    return "not a pipe or a socket";
}

_Noreturn void pz_remote_worker_main(void)
{
    static const char *const names[2] = {"stdin", "stdout"};
    for (int fd = 0; fd <= 1; fd++) {
        const char *why = not_a_link(fd, fd == 1);
        if (why) {
            fprintf(stderr,
                    "pzlua --worker: its %s is %s, not a link to the parent: the launcher must "
                    "run it with its stdin and stdout connected back to the pool\n",
                    names[fd], why);
            _exit(1);
        }
    }
    int in = fcntl(0, F_DUPFD_CLOEXEC, 3);
    int out = fcntl(1, F_DUPFD_CLOEXEC, 3);
    if (in < 0 || out < 0)
        fail("cannot copy stdin and stdout");
    int devnull = open("/dev/null", O_RDONLY | O_CLOEXEC);
    if (devnull < 0 || dup2(devnull, 0) < 0 || dup2(2, 1) < 0)
        fail("cannot point stdin at /dev/null and stdout at stderr");
    close(devnull);

    signal(SIGINT, SIG_IGN);
    signal(SIGQUIT, SIG_IGN);
    /* Ignored SIGCHLD (inherited through exec) would reap the worker for
     * us, unseen: the signalfd below would never hear of its end. */
    signal(SIGCHLD, SIG_DFL);
    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, SIGCHLD);
    sigaddset(&mask, SIGTERM);
    sigaddset(&mask, SIGHUP);
    if (sigprocmask(SIG_BLOCK, &mask, NULL) != 0)
        fail("sigprocmask");
    int sigfd = signalfd(-1, &mask, SFD_CLOEXEC | SFD_NONBLOCK);
    if (sigfd < 0)
        fail("signalfd");

    /* What the executor starts and leaves (a program run in the
     * background by a shell that then exits) is reparented here rather
     * than to PID 1: so it stays among this process's descendants, where
     * a launcher that ends a task's whole tree finds it.  Slurm's
     * proctrack/linuxproc does, by parentage: when a step is cancelled
     * (srun killed or signalled: stop, timeout, cancel), this process is
     * SIGKILLed before it can kill the worker's group, and a `sleep &`
     * left by an executor was found still running, its parent PID 1.
     * Without it (EINVAL on old kernels) things are as they were. */
    (void)prctl(PR_SET_CHILD_SUBREAPER, 1);
    pid_t me = getpid();
    pid_t pid = fork();
    if (pid < 0)
        fail("cannot fork the worker");
    if (pid == 0)
        become_worker(in, out, sigfd, me);
    /* Both set the group, so that it exists before either acts on it. */
    setpgid(pid, pid);
    /* The worker alone writes the protocol. */
    close(out);

    int lost = 0;
    for (;;) {
        struct pollfd p[2] = {{sigfd, POLLIN, 0}, {in, POLLRDHUP, 0}};
        if (poll(p, in >= 0 ? 2 : 1, -1) < 0) {
            if (errno == EINTR)
                continue;
            fail("poll");
        }
        if (in >= 0 && (p[1].revents & (POLLHUP | POLLRDHUP | POLLERR | POLLNVAL))) {
            /* The parent, its launcher or the link is gone. */
            lost = 1;
            kill(-pid, SIGKILL);
            kill(pid, SIGKILL);
            close(in);
            in = -1;
        }
        if (!(p[0].revents & POLLIN))
            continue;
        struct signalfd_siginfo si;
        while (read(sigfd, &si, sizeof si) == (ssize_t)sizeof si)
            if (si.ssi_signo == SIGTERM || si.ssi_signo == SIGHUP)
                kill(pid, (int)si.ssi_signo);
        /* The worker, or what it left and this process adopted (reaped
         * so that it leaves no zombie). */
        int status;
        pid_t r;
        while ((r = waitpid(-1, &status, WNOHANG)) > 0) {
            if (r == pid) {
                /* What the executor left running in the worker's group. */
                kill(-pid, SIGKILL);
                _exit(status_of(status, lost));
            }
        }
        if (r < 0 && errno != EINTR && errno != ECHILD)
            fail("waitpid");
    }
}
