/*
 * wout.c - a worker's output, batched, with a flusher thread for results
 * that would otherwise wait behind a long call (see wout.h).
 */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "sys.h"
#include "wout.h"

/* The buffer is kept allocated after a write up to this size: freed and
 * grown again for every big result, it would cost a page fault per page. */
#define KEEP_BYTES (4u << 20)
#define FLUSHER_STACK (64 * 1024)

static struct {
    int fd;
    pz_buf buf;
    int frames;          /* whole frames in buf */
    int64_t oldest;      /* when the oldest of them was made */
    int locked;          /* the main thread holds the lock */
    int flusher_idle;    /* the flusher waits for a first frame */
    int flusher_running;
    pthread_mutex_t lock;
    pthread_cond_t wake;
} O;

void pz_wout_init(int fd)
{
    /* A worker of a pool made inside a worker inherits that worker's copy
     * through two forks: start from nothing (its buffer is a copy nobody
     * else uses, and its flusher thread did not come along). */
    memset(&O, 0, sizeof O);
    O.fd = fd;
    pthread_mutex_init(&O.lock, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC); /* pz_now_ns's clock */
    pthread_cond_init(&O.wake, &ca);
    pthread_condattr_destroy(&ca);
}

/* Writes the buffer; the lock is held.  A parent that is gone ends us. */
static void write_locked(void)
{
    if (O.buf.len == 0)
        return;
    if (pz_write_all(O.fd, O.buf.data, O.buf.len) != 0) {
        if (errno == EPIPE)
            _exit(0);
        fprintf(stderr, "parallelize: worker (pid %d): writing results: %s\n", (int)getpid(),
                strerror(errno));
        _exit(3);
    }
    O.buf.len = 0;
    O.frames = 0;
    pz_buf_trim(&O.buf, KEEP_BYTES);
}

/* The flusher: idle until the buffer holds a frame, then asleep until
 * that frame is late, then writes what is there if it is still late. */
static void *flusher(void *arg)
{
    (void)arg;
    pthread_mutex_lock(&O.lock);
    for (;;) {
        if (O.frames == 0) {
            O.flusher_idle = 1;
            pthread_cond_wait(&O.wake, &O.lock);
            O.flusher_idle = 0;
            continue;
        }
        int64_t due = O.oldest + PZ_WOUT_LATE_NS, now = pz_now_ns();
        if (now >= due) {
            write_locked();
            continue;
        }
        struct timespec ts = {(time_t)(due / 1000000000), (long)(due % 1000000000)};
        pthread_cond_timedwait(&O.wake, &O.lock, &ts);
    }
    return NULL;
}

void pz_wout_start_flusher(void)
{
    pthread_attr_t attr;
    sigset_t all, old;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, FLUSHER_STACK);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    pthread_t t;
    int rc = pthread_create(&t, &attr, flusher, NULL);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    pthread_attr_destroy(&attr);
    /* Without a flusher the worker still works: its results wait for the
     * main thread's own flushes, as they would behind a long call. */
    O.flusher_running = rc == 0;
}

int pz_wout_lock(void)
{
    int waited = 0;
    if (O.flusher_running && pthread_mutex_trylock(&O.lock) != 0) {
        pthread_mutex_lock(&O.lock);
        waited = 1;
    }
    O.locked = 1;
    return waited;
}

void pz_wout_unlock(void)
{
    O.locked = 0;
    if (O.flusher_running)
        pthread_mutex_unlock(&O.lock);
}

int pz_wout_locked(void)
{
    return O.locked;
}

pz_buf *pz_wout_buf(void)
{
    return &O.buf;
}

void pz_wout_frame_done(int64_t now)
{
    if (O.frames++ == 0) {
        O.oldest = now;
        if (O.flusher_idle)
            pthread_cond_signal(&O.wake);
    }
}

void pz_wout_truncate(size_t len, int frames)
{
    O.buf.len = len;
    O.frames = frames;
}

int pz_wout_frames(void)
{
    return O.frames;
}

int64_t pz_wout_oldest(void)
{
    return O.oldest;
}

int pz_wout_flush(void)
{
    int had = O.locked;
    if (!had)
        pz_wout_lock();
    int wrote = O.buf.len > 0;
    write_locked();
    if (!had)
        pz_wout_unlock();
    return wrote;
}
