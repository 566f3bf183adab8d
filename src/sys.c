/*
 * sys.c - EINTR-safe system call wrappers shared by parent, spawner, worker.
 */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <stdint.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <dirent.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#include "sys.h"

int64_t pz_now_ns(void)
{
    struct timespec ts;
    /* CLOCK_MONOTONIC cannot fail with a valid pointer and clock id. */
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

void pz_sleep_ns(int64_t ns)
{
    if (ns <= 0)
        return;
    struct timespec req = {(time_t)(ns / 1000000000), (long)(ns % 1000000000)}, rem;
    while (nanosleep(&req, &rem) != 0 && errno == EINTR)
        req = rem;
}

int pz_write_all(int fd, const void *p, size_t n)
{
    const char *c = p;
    while (n > 0) {
        ssize_t w = write(fd, c, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        c += w;
        n -= (size_t)w;
    }
    return 0;
}

ssize_t pz_read(int fd, void *p, size_t n)
{
    ssize_t r;
    do
        r = read(fd, p, n);
    while (r < 0 && errno == EINTR);
    return r;
}

/* The membarrier commands (linux/membarrier.h), spelled here so that the
 * build needs no kernel header newer than the C library's. */
#define PZ_MEMBARRIER_CMD_PRIVATE_EXPEDITED (1 << 3)
#define PZ_MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED (1 << 4)

static int membarrier_cmd(int cmd)
{
#ifdef SYS_membarrier
    return syscall(SYS_membarrier, cmd, 0, 0) == 0 ? 0 : -1;
#else
    (void)cmd;
    errno = ENOSYS;
    return -1;
#endif
}

int pz_membarrier_register(void)
{
    return membarrier_cmd(PZ_MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED);
}

int pz_membarrier(void)
{
    return membarrier_cmd(PZ_MEMBARRIER_CMD_PRIVATE_EXPEDITED);
}

int pz_set_nonblock(int fd)
{
    int flags = fcntl(fd, F_GETFL);
    if (flags < 0)
        return -1;
    return fcntl(fd, F_SETFL, flags | O_NONBLOCK);
}

/* close_range(2) where the kernel has it; otherwise walk /proc/self/fd. */
static int close_range_compat(unsigned lo, unsigned hi)
{
#ifdef SYS_close_range
    if (lo > hi)
        return 0;
    if (syscall(SYS_close_range, lo, hi, 0) == 0)
        return 0;
#endif
    DIR *d = opendir("/proc/self/fd");
    if (!d)
        return -1;
    int dfd = dirfd(d);
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        long fd = strtol(e->d_name, NULL, 10);
        if (e->d_name[0] < '0' || e->d_name[0] > '9' || fd == dfd)
            continue;
        if ((unsigned)fd >= lo && (unsigned)fd <= hi)
            close((int)fd);
    }
    closedir(d);
    return 0;
}

void pz_close_fds_from(int lowest, int keep)
{
    if (keep < lowest) {
        close_range_compat((unsigned)lowest, ~0U);
        return;
    }
    close_range_compat((unsigned)lowest, (unsigned)keep - 1);
    close_range_compat((unsigned)keep + 1, ~0U);
}

void pz_describe_status(int status, char *buf, size_t len)
{
    if (WIFEXITED(status))
        snprintf(buf, len, "exited with status %d", WEXITSTATUS(status));
    else if (WIFSIGNALED(status))
        snprintf(buf, len, "killed by signal %d", WTERMSIG(status));
    else
        snprintf(buf, len, "ended with wait status 0x%x", (unsigned)status);
}

void pz_wake(int fd, const char *whom)
{
    uint64_t one = 1;
    ssize_t r;
    do
        r = write(fd, &one, sizeof one);
    while (r < 0 && errno == EINTR);
    if (r < 0 && errno != EAGAIN)
        fprintf(stderr, "parallelize: waking %s: %s\n", whom, strerror(errno));
}

void pz_wake_clear(int fd)
{
    uint64_t v;
    ssize_t r;
    do
        r = read(fd, &v, sizeof v);
    while (r < 0 && errno == EINTR);
    if (r < 0 && errno != EAGAIN)
        fprintf(stderr, "parallelize: reading a wake-up eventfd: %s\n", strerror(errno));
}

int pz_occupy_closed_std_fds(void)
{
    for (int fd = 0; fd <= 2; fd++) {
        if (fcntl(fd, F_GETFD) != -1 || errno != EBADF)
            continue;
        /* open takes the lowest free number: fd, as the lower ones are
         * open by now. */
        int null = open("/dev/null", fd == 0 ? O_WRONLY : O_RDONLY);
        if (null < 0)
            return -1 - fd;
        if (null != fd) {
            close(null);
            errno = EBADF;
            return -1 - fd;
        }
    }
    return 0;
}

void pz_format_seconds(int64_t ns, char *buf, size_t len)
{
    int64_t ms = ns < 0 ? 0 : (ns + 500000) / 1000000;
    int n = snprintf(buf, len, "%lld.%03d", (long long)(ms / 1000), (int)(ms % 1000));
    if (n < 0 || (size_t)n >= len)
        return;
    while (n > 0 && buf[n - 1] == '0')
        buf[--n] = 0;
    if (n > 0 && buf[n - 1] == '.')
        buf[--n] = 0;
}

void *pz_map_shared(size_t size, int flags, int *fd)
{
    *fd = memfd_create("parallelize", MFD_CLOEXEC);
    if (*fd >= 0 && ftruncate(*fd, (off_t)size) != 0) {
        close(*fd);
        *fd = -1;
    }
    void *p;
    if (*fd >= 0)
        p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | flags, *fd, 0);
    else
        p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS | flags, -1, 0);
    if (p == MAP_FAILED) {
        int e = errno;
        if (*fd >= 0)
            close(*fd);
        *fd = -1;
        errno = e;
        return NULL;
    }
    return p;
}

int pz_map_shared_at(int fd, void *addr, size_t size, int flags)
{
    void *p = mmap(addr, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED_NOREPLACE | flags, fd, 0);
    if (p == MAP_FAILED)
        return -1;
    if (p != addr) {
        /* A kernel older than 4.17 takes the flag for a hint. */
        munmap(p, size);
        errno = EEXIST;
        return -1;
    }
    return 0;
}

int pz_send_fds(int sock, const void *p, size_t n, const int *fds, int nfds)
{
    if (nfds < 0 || nfds > PZ_PASS_FDS_MAX)
        return errno = EINVAL, -1;
    union {
        char buf[CMSG_SPACE(PZ_PASS_FDS_MAX * sizeof(int))];
        struct cmsghdr align;
    } ctl;
    memset(&ctl, 0, sizeof ctl);
    struct iovec iov = {(void *)p, n}; /* sendmsg only reads it */
    struct msghdr msg = {0};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    if (nfds > 0) {
        msg.msg_control = ctl.buf;
        msg.msg_controllen = CMSG_SPACE((size_t)nfds * sizeof(int));
        struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN((size_t)nfds * sizeof(int));
        memcpy(CMSG_DATA(c), fds, (size_t)nfds * sizeof(int));
    }
    ssize_t r;
    do
        r = sendmsg(sock, &msg, MSG_NOSIGNAL);
    while (r < 0 && errno == EINTR);
    if (r < 0)
        return -1;
    if ((size_t)r != n)
        return errno = EMSGSIZE, -1;
    return 0;
}

int pz_recv_fds(int sock, void *p, size_t n, int *fds, int *nfds, pid_t *sender)
{
    union {
        char buf[CMSG_SPACE(PZ_PASS_FDS_MAX * sizeof(int)) + CMSG_SPACE(sizeof(struct ucred))];
        struct cmsghdr align;
    } ctl;
    struct iovec iov = {p, n};
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
    if (sender)
        *sender = 0;
    if (r <= 0)
        return (int)r;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
            int k = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
            for (int i = 0; i < k; i++) {
                int fd;
                memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
                if (*nfds < PZ_PASS_FDS_MAX)
                    fds[(*nfds)++] = fd;
                else
                    close(fd);
            }
        } else if (sender && c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_CREDENTIALS) {
            struct ucred cred;
            memcpy(&cred, CMSG_DATA(c), sizeof cred);
            *sender = cred.pid;
        }
    }
    if ((size_t)r != n || (msg.msg_flags & (MSG_CTRUNC | MSG_TRUNC))) {
        for (int i = 0; i < *nfds; i++)
            close(fds[i]);
        *nfds = 0;
        return errno = EPROTO, -1;
    }
    return 1;
}
