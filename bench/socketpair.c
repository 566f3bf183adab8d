/*
 * socketpair.c - the C limits that bench/run.sh measures the pool against
 * (issue 14): what a parent and its worker processes can move through
 * AF_UNIX stream socketpairs when nothing but the moving is done. run.sh
 * compiles it into a temporary directory; nothing of the library is used.
 *
 *     socketpair tiny N WORKERS BATCH
 *         N tiny calls: 16-byte messages {id, x} to WORKERS worker
 *         processes, BATCH messages per write; each worker answers
 *         {id, 2 * x}, at most BATCH answers per write. The parent keeps
 *         at most 2 * BATCH calls in flight per worker (one batch being
 *         answered while the next waits in the socket).
 *         Prints calls_per_s (a call is a message in and its answer out).
 *
 *     socketpair pump N SIZE WORKERS
 *         N messages of SIZE bytes to WORKERS workers, each echoed back
 *         whole by its worker; at most 2 messages in flight per worker.
 *         The parent sends from one buffer and receives into one buffer
 *         per worker: no copy but the kernel's. Prints gb_per_s, the
 *         bytes in plus the bytes out per second (1 GB = 1e9 bytes).
 *
 * The parent is one thread: non-blocking sockets and poll(2). A worker
 * blocks in read(2) and write(2). Results are checked (a sum, or the
 * bytes of every echo), so a broken transfer is an error, not a figure.
 * One measurement per run; run.sh repeats it in rounds.
 *
 * Output: key=value lines. Exit status 1 with a message on stderr when a
 * system call fails or a check does not hold.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_WORKERS 1024

/* A tiny call and its answer: 16 bytes each way. */
typedef struct message {
    uint64_t id;
    uint64_t x;
} message;

static double now_s(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static void die(const char *what)
{
    fprintf(stderr, "socketpair: %s: %s\n", what, strerror(errno));
    exit(1);
}

static void fail(const char *what)
{
    fprintf(stderr, "socketpair: %s\n", what);
    exit(1);
}

/* Reads exactly len bytes (a worker, blocking). 0 on success, 1 at end of
 * file before the first byte, -1 on error or a truncated message. */
static int read_full(int fd, char *buf, size_t len)
{
    size_t got = 0;
    while (got < len) {
        ssize_t n = read(fd, buf + got, len - got);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return -1;
        if (n == 0)
            return got == 0 ? 1 : -1;
        got += (size_t)n;
    }
    return 0;
}

static int write_full(int fd, const char *buf, size_t len)
{
    size_t put = 0;
    while (put < len) {
        ssize_t n = write(fd, buf + put, len - put);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return -1;
        put += (size_t)n;
    }
    return 0;
}

/* ---- workers ----------------------------------------------------------- */

/* Answers tiny calls until end of file: each read takes what is there (up
 * to 64 KiB), each write carries at most `batch` answers. */
static void tiny_worker(int fd, int batch)
{
    enum { IN_BYTES = 64 * 1024 };
    static char in[IN_BYTES];
    message *out = malloc((size_t)batch * sizeof *out);
    if (!out)
        _exit(1);
    size_t have = 0;
    for (;;) {
        ssize_t n = read(fd, in + have, IN_BYTES - have);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            _exit(1);
        if (n == 0)
            _exit(have == 0 ? 0 : 1);
        have += (size_t)n;
        size_t whole = have / sizeof(message), k = 0;
        for (size_t i = 0; i < whole; i++) {
            message m;
            memcpy(&m, in + i * sizeof m, sizeof m);
            out[k].id = m.id;
            out[k].x = 2 * m.x;
            if (++k == (size_t)batch || i + 1 == whole) {
                if (write_full(fd, (const char *)out, k * sizeof *out) != 0)
                    _exit(1);
                k = 0;
            }
        }
        have -= whole * sizeof(message);
        memmove(in, in + whole * sizeof(message), have);
    }
}

/* Echoes whole messages of `size` bytes until end of file. */
static void pump_worker(int fd, size_t size)
{
    char *buf = malloc(size);
    if (!buf)
        _exit(1);
    for (;;) {
        int rc = read_full(fd, buf, size);
        if (rc == 1)
            _exit(0);
        if (rc != 0 || write_full(fd, buf, size) != 0)
            _exit(1);
    }
}

/* ---- the parent -------------------------------------------------------- */

typedef struct worker {
    int fd;
    pid_t pid;
    long inflight;   /* calls (messages) sent and not yet answered */
    char *out;       /* tiny: the batch being written */
    size_t out_len, out_off;
    char *in;        /* bytes of an answer not yet whole */
    size_t in_len;
    size_t send_off; /* pump: bytes of the current message written */
} worker;

static worker workers[MAX_WORKERS];
static int nworkers;

/* Starts n workers, each on a socketpair whose parent end is non-blocking;
 * body(fd, arg) runs in the child and never returns. */
static void start_workers(int n, void (*body)(int fd, long arg), long arg)
{
    nworkers = n;
    for (int i = 0; i < n; i++) {
        int sv[2];
        if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0)
            die("socketpair");
        pid_t pid = fork();
        if (pid < 0)
            die("fork");
        if (pid == 0) {
            /* Only its own end stays open in a worker, or a sibling would
             * never see end of file. */
            for (int j = 0; j < i; j++)
                close(workers[j].fd);
            close(sv[0]);
            body(sv[1], arg);
            _exit(0);
        }
        if (close(sv[1]) != 0)
            die("close");
        int fl = fcntl(sv[0], F_GETFL);
        if (fl < 0 || fcntl(sv[0], F_SETFL, fl | O_NONBLOCK) != 0)
            die("fcntl O_NONBLOCK");
        workers[i].fd = sv[0];
        workers[i].pid = pid;
    }
}

/* Closes every socket (end of file for the workers) and reaps them. */
static void stop_workers(void)
{
    for (int i = 0; i < nworkers; i++)
        if (close(workers[i].fd) != 0)
            die("close");
    for (int i = 0; i < nworkers; i++) {
        int status;
        while (waitpid(workers[i].pid, &status, 0) < 0)
            if (errno != EINTR)
                die("waitpid");
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
            fail("a worker failed");
    }
}

/* Writes what w->out still holds. 1 when something was written, 0 when
 * the socket is full. */
static int flush_out(worker *w, const char *base)
{
    if (w->out_off == w->out_len)
        return 0;
    ssize_t n = write(w->fd, base + w->out_off, w->out_len - w->out_off);
    if (n < 0) {
        if (errno == EAGAIN || errno == EINTR)
            return 0;
        die("write");
    }
    w->out_off += (size_t)n;
    return 1;
}

/* Reads into w->in[w->in_len .. cap). Bytes read, 0 when there were none. */
static size_t fill_in(worker *w, size_t cap)
{
    ssize_t n = read(w->fd, w->in + w->in_len, cap - w->in_len);
    if (n < 0) {
        if (errno == EAGAIN || errno == EINTR)
            return 0;
        die("read");
    }
    if (n == 0)
        fail("a worker closed its socket early");
    w->in_len += (size_t)n;
    return (size_t)n;
}

/* Sleeps in poll(2) until a socket can take what is waiting for it or has
 * something to read. */
static void wait_sockets(void)
{
    static struct pollfd fds[MAX_WORKERS];
    for (int i = 0; i < nworkers; i++) {
        worker *w = &workers[i];
        fds[i].fd = w->fd;
        fds[i].events = (short)((w->inflight > 0 ? POLLIN : 0) | (w->out_off < w->out_len ? POLLOUT : 0));
        fds[i].revents = 0;
    }
    if (poll(fds, (nfds_t)nworkers, 10000) < 0 && errno != EINTR)
        die("poll");
}

static void tiny_body(int fd, long batch)
{
    tiny_worker(fd, (int)batch);
}

static void pump_body(int fd, long size)
{
    pump_worker(fd, (size_t)size);
}

static double cpu_s(int who)
{
    struct rusage ru;
    if (getrusage(who, &ru) != 0)
        die("getrusage");
    return (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec * 1e-6 + (double)ru.ru_stime.tv_sec +
           (double)ru.ru_stime.tv_usec * 1e-6;
}

static void run_tiny(uint64_t n, int nw, int batch)
{
    enum { IN_CAP = 64 * 1024 };
    const long limit = 2L * batch;
    start_workers(nw, tiny_body, batch);
    for (int i = 0; i < nw; i++) {
        workers[i].out = malloc((size_t)batch * sizeof(message));
        workers[i].in = malloc(IN_CAP);
        if (!workers[i].out || !workers[i].in)
            fail("out of memory");
    }
    uint64_t next = 1, answered = 0, sum = 0;
    double t0 = now_s();
    while (answered < n) {
        int progress = 0;
        for (int i = 0; i < nw; i++) {
            worker *w = &workers[i];
            if (w->out_off == w->out_len && next <= n && w->inflight + batch <= limit) {
                uint64_t k = n - next + 1 < (uint64_t)batch ? n - next + 1 : (uint64_t)batch;
                message *m = (message *)w->out;
                for (uint64_t j = 0; j < k; j++, next++) {
                    m[j].id = next;
                    m[j].x = next;
                }
                w->out_off = 0;
                w->out_len = k * sizeof(message);
                w->inflight += (long)k;
            }
            progress |= flush_out(w, w->out);
            if (w->inflight > 0 && fill_in(w, IN_CAP) > 0) {
                progress = 1;
                size_t whole = w->in_len / sizeof(message);
                for (size_t j = 0; j < whole; j++) {
                    message m;
                    memcpy(&m, w->in + j * sizeof m, sizeof m);
                    if (m.x != 2 * m.id)
                        fail("a wrong answer");
                    sum += m.x;
                }
                answered += whole;
                w->inflight -= (long)whole;
                w->in_len -= whole * sizeof(message);
                memmove(w->in, w->in + whole * sizeof(message), w->in_len);
            }
        }
        if (!progress)
            wait_sockets();
    }
    double elapsed = now_s() - t0;
    if (sum != n * (n + 1))
        fail("the answers do not add up");
    stop_workers();
    printf("mode=tiny\nn=%llu\nworkers=%d\nbatch=%d\nmessage_bytes=%zu\n", (unsigned long long)n, nw, batch,
           sizeof(message));
    printf("seconds=%.6g\ncalls_per_s=%.6g\nparent_cpu_s=%.6g\nworkers_cpu_s=%.6g\n", elapsed,
           (double)n / elapsed, cpu_s(RUSAGE_SELF), cpu_s(RUSAGE_CHILDREN));
}

/* One byte in every 4 KiB, and the last: enough to catch a message that
 * arrives shifted or short, at no real cost. */
static int same_sampled(const char *a, const char *b, size_t size)
{
    for (size_t i = 0; i < size; i += 4096)
        if (a[i] != b[i])
            return 0;
    return a[size - 1] == b[size - 1];
}

static void run_pump(uint64_t n, size_t size, int nw)
{
    const long limit = 2;
    start_workers(nw, pump_body, (long)size);
    char *src = malloc(size);
    if (!src)
        fail("out of memory");
    for (size_t i = 0; i < size; i++)
        src[i] = (char)(i * 31 + i / 4093);
    for (int i = 0; i < nw; i++) {
        workers[i].in = malloc(size);
        if (!workers[i].in)
            fail("out of memory");
        /* Fault the pages in now, as a long-running pump would have. */
        memset(workers[i].in, 0, size);
    }
    uint64_t assigned = 0, answered = 0;
    double t0 = now_s();
    while (answered < n) {
        int progress = 0;
        for (int i = 0; i < nw; i++) {
            worker *w = &workers[i];
            if (w->out_off == w->out_len && assigned < n && w->inflight < limit) {
                w->out_off = 0;
                w->out_len = size;
                w->inflight++;
                assigned++;
            }
            progress |= flush_out(w, src);
            if (w->inflight > 0 && fill_in(w, size) > 0) {
                progress = 1;
                if (w->in_len == size) {
                    if (!same_sampled(w->in, src, size))
                        fail("an echo differs from what was sent");
                    w->in_len = 0;
                    w->inflight--;
                    answered++;
                }
            }
        }
        if (!progress)
            wait_sockets();
    }
    double elapsed = now_s() - t0;
    stop_workers();
    double bytes = 2.0 * (double)n * (double)size;
    printf("mode=pump\nn=%llu\nsize=%zu\nworkers=%d\n", (unsigned long long)n, size, nw);
    printf("seconds=%.6g\nbytes=%.0f\ngb_per_s=%.6g\nparent_cpu_s=%.6g\nworkers_cpu_s=%.6g\n", elapsed, bytes,
           bytes / elapsed / 1e9, cpu_s(RUSAGE_SELF), cpu_s(RUSAGE_CHILDREN));
}

static long arg_long(const char *s, long lo, long hi)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno != 0 || *end != '\0' || v < lo || v > hi)
        return -1;
    return v;
}

int main(int argc, char **argv)
{
    /* A worker that dies makes write(2) fail with EPIPE, reported, rather
     * than end the parent silently. */
    signal(SIGPIPE, SIG_IGN);
    if (argc == 5 && strcmp(argv[1], "tiny") == 0) {
        long n = arg_long(argv[2], 1, 1L << 40), w = arg_long(argv[3], 1, MAX_WORKERS),
             b = arg_long(argv[4], 1, 4096);
        if (n > 0 && w > 0 && b > 0) {
            run_tiny((uint64_t)n, (int)w, (int)b);
            return 0;
        }
    } else if (argc == 5 && strcmp(argv[1], "pump") == 0) {
        long n = arg_long(argv[2], 1, 1L << 40), size = arg_long(argv[3], 1, 1L << 30),
             w = arg_long(argv[4], 1, MAX_WORKERS);
        if (n > 0 && size > 0 && w > 0) {
            run_pump((uint64_t)n, (size_t)size, (int)w);
            return 0;
        }
    }
    fprintf(stderr, "usage: socketpair tiny N WORKERS BATCH (1..4096)\n"
                    "       socketpair pump N SIZE WORKERS\n");
    return 2;
}
