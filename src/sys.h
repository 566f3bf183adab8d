/*
 * sys.h - thin, EINTR-safe wrappers over the system calls every process
 * role (parent, spawner, worker) uses.
 */
#ifndef PZ_SYS_H
#define PZ_SYS_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/* Monotonic clock in nanoseconds. */
int64_t pz_now_ns(void);

/* Sleeps for ns nanoseconds, resuming after signal handlers. */
void pz_sleep_ns(int64_t ns);

/* Writes all n bytes to a blocking fd; returns 0, or -1 with errno set. */
int pz_write_all(int fd, const void *p, size_t n);

/* read(2) that retries on EINTR. */
ssize_t pz_read(int fd, void *p, size_t n);

/* Sets O_NONBLOCK; returns 0 or -1 with errno set. */
int pz_set_nonblock(int fd);

/* Closes every descriptor >= lowest except `keep` (-1 for none), so that a
 * forked process holds only the descriptors it was given. */
void pz_close_fds_from(int lowest, int keep);

/* Adds one to an eventfd, waking whoever polls it.  A saturated counter
 * (EAGAIN) means a wake-up is pending anyway; any other failure, which a
 * valid eventfd never gives, is reported on stderr naming `whom`. */
void pz_wake(int fd, const char *whom);

/* membarrier(2), private expedited: pz_membarrier_register, once per
 * process, returns 0 when pz_membarrier may be used, -1 when the kernel
 * lacks it (or a seccomp filter refuses it); pz_membarrier then runs a
 * full memory barrier on every thread of the process that is running
 * (the others pass one when they are scheduled), returning 0, or -1 with
 * errno set. */
int pz_membarrier_register(void);
int pz_membarrier(void);

/* Resets an eventfd's counter after a wake-up was seen. */
void pz_wake_clear(int fd);

/* Gives each standard descriptor (0, 1, 2) that is closed /dev/null,
 * opened the wrong way round (stdin for writing, stdout and stderr for
 * reading).  Left free, the next descriptor opened would take its number:
 * print() would write into a pool's pipe, or into a file the script
 * opened.  Opened so, each still fails as a closed one does (EBADF), so
 * writing to a closed stdout stays an error.  Returns 0, or the first
 * descriptor that could not be filled, as -1 - fd, with errno set. */
int pz_occupy_closed_std_fds(void);

/* Maps `size` bytes MAP_SHARED (plus `flags`, such as MAP_NORESERVE):
 * a memfd's, whose descriptor (close-on-exec) goes to *fd so that a
 * process that did not inherit the mapping can map it too (the fork
 * server's spawners: forkserver.h); anonymous memory, *fd = -1, where
 * memfd_create is refused.  Returns NULL with errno set on failure. */
void *pz_map_shared(size_t size, int flags, int *fd);

/* Maps memfd `fd`'s `size` bytes at exactly `addr`; 0, or -1 with errno
 * set (EEXIST: something is mapped there already). */
int pz_map_shared_at(int fd, void *addr, size_t size, int flags);

/* The most descriptors one message passes (SCM_RIGHTS). */
#define PZ_PASS_FDS_MAX 8

/* Sends n bytes with nfds descriptors (0 to PZ_PASS_FDS_MAX) in one message
 * on a SOCK_SEQPACKET socket, retrying EINTR, without SIGPIPE.  Returns 0,
 * or -1 with errno set (EMSGSIZE when the message went short). */
int pz_send_fds(int sock, const void *p, size_t n, const int *fds, int nfds);

/* Receives one message of exactly n bytes, its descriptors (close-on-exec,
 * up to PZ_PASS_FDS_MAX: room the caller gives, any more are closed) into
 * fds and their count into *nfds, and, when sender is not NULL, the
 * sender's pid as the kernel tells it (SO_PASSCRED on the socket; else 0).
 * Returns 1; 0 at end of file; -1 with errno set: EPROTO for a message of
 * another size or with its control data cut short (its descriptors are
 * closed). */
int pz_recv_fds(int sock, void *p, size_t n, int *fds, int *nfds, pid_t *sender);

/* Formats how a process ended ("exited with status 3", "killed by signal 9") into buf. */
void pz_describe_status(int status, char *buf, size_t len);

/* Writes ns as seconds the way a user gives them in options: to the
 * millisecond, without an exponent or trailing zeros ("0.3", "1.001",
 * "2000000"). */
void pz_format_seconds(int64_t ns, char *buf, size_t len);

#endif
