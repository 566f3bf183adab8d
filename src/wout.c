/*
 * wout.c - a worker's output, batched, with a flusher thread for results
 * that would otherwise wait behind a long call (see wout.h).
 *
 * The flusher sleeps in poll(2) on a timerfd, which the main thread sets
 * when a batch gets its first frame, to the moment that frame is late.  A
 * write in the middle of a run of calls leaves the alarm as it is, since
 * the next batch sets it again; the write before a read that may wait
 * (pz_wout_flush_idle) clears it, so that an idle worker's flusher sleeps.
 * When it goes off, the flusher writes the batch if its oldest frame is
 * late, and otherwise sets the alarm again for that frame (the main
 * thread wrote the batch and began another meanwhile), or leaves it off
 * when the buffer is empty.  A worker busy with short calls writes each
 * batch itself before it is late (wout.h): one timerfd_settime call a
 * batch, and its flusher sleeps.  Clearing the alarm at every write too
 * cost a second call a batch: with tiny calls, then a batch every 128
 * results, 11% of a CPU at 7 M calls a second.  Setting it only when none
 * was pending woke the flusher of every busy worker every 4.5 ms, and of
 * every worker gone idle after a batch: 256 workers sharing a loop of
 * tiny calls ran a quarter slower, and calls of 100 us made twice the
 * context switches.  (Before all that, a condition variable signalled for
 * each batch cost a wake-up of the flusher, and its timed sleep a second
 * one.)
 *
 * The lock.  The main thread takes it for every call (a run's calls too:
 * worker.c), the flusher every few milliseconds at most.  Where the
 * kernel has membarrier (private expedited), the main thread's side is two
 * plain stores and a load: it marks itself busy, then looks whether the
 * flusher wants the buffer; the flusher says it does, runs the membarrier
 * (a full fence in the main thread too, wherever it is), then looks
 * whether the main thread is busy, and backs off if it is (a main thread
 * busy with the buffer is running, and writes its batch itself).  Each
 * side's store comes before its load, with a fence between that is the
 * flusher's alone, so one of them always sees the other.  The mutex is
 * the flusher's, and the main thread's when it finds the flusher at work
 * (or without membarrier): a pthread mutex taken and released for each
 * call cost a tenth of a tiny call's time in the worker.
 *
 * SIGTERM (p:stop's finish timeout running out, or anyone's) would end the
 * process with the batch unwritten: calls that ran would count as never
 * run, and run again elsewhere, their side effects twice.  So once the
 * flusher runs, SIGTERM's handler only wakes it (an eventfd, written from
 * the handler, which is async-signal-safe), and the flusher writes the
 * batch, then ends the process with SIGTERM as before.
 */
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#include "sys.h"
#include "wout.h"

/* The buffer is kept allocated after a write up to this size: freed and
 * grown again for every big result, it would cost a page fault per page. */
#define KEEP_BYTES (4u << 20)
#define FLUSHER_STACK (64 * 1024)

/* How soon the flusher looks again when it found the main thread at the
 * buffer. */
#define BACK_OFF_NS 1000000

static struct {
    int fd;
    pz_buf buf;
    int frames;          /* whole frames in buf */
    size_t shared;       /* bytes of ring their strings took */
    int64_t oldest;      /* when the oldest of them was made */
    int locked;          /* the main thread holds the lock */
    int via_mutex;       /* ... through the mutex (see the top) */
    int asym;            /* membarrier is registered: the fast path is on */
    _Atomic int busy;    /* the main thread uses the buffer (fast path) */
    _Atomic int wants;   /* the flusher wants it */
    uint64_t writes;     /* times the buffer was written */
    int flusher_running;
    int alarm_fd;        /* the flusher's timerfd, -1 before it starts */
    int alarm_set;       /* alarm_fd is set (see the top) */
    int term_fd;         /* eventfd SIGTERM's handler writes, or -1 */
    pid_t pid;           /* the worker's: the handler's process */
    pthread_mutex_t lock;
} O;

void pz_wout_init(int fd)
{
    /* A worker of a pool made inside a worker inherits that worker's copy
     * through two forks: start from nothing (its buffer is a copy nobody
     * else uses, and its flusher thread did not come along). */
    memset(&O, 0, sizeof O);
    O.fd = fd;
    O.alarm_fd = -1;
    O.term_fd = -1;
    pthread_mutex_init(&O.lock, NULL);
}

/* Sets the flusher's alarm to `due` (pz_now_ns's clock, CLOCK_MONOTONIC),
 * or clears it when due is 0; the lock is held.  Should the call fail (it
 * cannot with these arguments), the main thread's own flushes remain. */
static void set_alarm(int64_t due)
{
    if (O.alarm_fd < 0 || (due == 0 && !O.alarm_set))
        return;
    struct itimerspec it;
    memset(&it, 0, sizeof it);
    it.it_value.tv_sec = (time_t)(due / 1000000000);
    it.it_value.tv_nsec = (long)(due % 1000000000);
    O.alarm_set = timerfd_settime(O.alarm_fd, TFD_TIMER_ABSTIME, &it, NULL) == 0 && due != 0;
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
    O.shared = 0;
    O.writes++;
    pz_buf_trim(&O.buf, KEEP_BYTES);
}

/* SIGTERM's handler, once the flusher runs: wakes it.  A process forked
 * from the worker without exec keeps the handler but not the flusher: it
 * ends at once, as it would have without the handler. */
static void on_term(int sig)
{
    int saved = errno;
    if (getpid() != O.pid) {
        signal(sig, SIG_DFL);
        raise(sig); /* pending until the handler returns, then fatal */
    } else {
        uint64_t one = 1;
        if (write(O.term_fd, &one, sizeof one) < 0) {
            /* Its eventfd was closed under it (an executor closing what
             * it did not open; an eventfd this far from its limit fails
             * no other way): nobody would wake, and the signal would do
             * nothing until SIGKILL.  It does what it would have done
             * without the handler. */
            signal(sig, SIG_DFL);
            raise(sig);
        }
    }
    errno = saved;
}

/* The flusher: takes the lock (the mutex, then, on the fast path, the
 * buffer from the main thread).  Returns 1 with the lock held; 0, with
 * nothing held, when the main thread is busy with the buffer (and `wait`
 * is 0). */
static int flusher_lock(int wait)
{
    pthread_mutex_lock(&O.lock);
    if (!O.asym)
        return 1;
    atomic_store(&O.wants, 1);
    /* Should membarrier fail (once registered it cannot but for memory),
     * a busy flag seen clear proves nothing: the flusher then leaves the
     * batch to the main thread, which writes it itself, unless the
     * process is ending (SIGTERM), where a batch cut short only makes
     * its calls run again, and one never written loses them. */
    int fenced = pz_membarrier() == 0;
    for (;;) {
        if (!atomic_load_explicit(&O.busy, memory_order_acquire) && (fenced || wait))
            return 1;
        if (!wait) {
            atomic_store_explicit(&O.wants, 0, memory_order_release);
            pthread_mutex_unlock(&O.lock);
            return 0;
        }
        sched_yield();
        if (!fenced)
            fenced = pz_membarrier() == 0;
    }
}

static void flusher_unlock(void)
{
    if (O.asym)
        atomic_store_explicit(&O.wants, 0, memory_order_release);
    pthread_mutex_unlock(&O.lock);
}

/* The flusher, woken by SIGTERM: writes the whole frames the batch holds,
 * then ends the process with SIGTERM, as the signal would have (delivered
 * to the main thread: this one blocks every signal).  The lock stays held,
 * so the main thread adds nothing meanwhile. */
static _Noreturn void end_by_term(void)
{
    flusher_lock(1);
    write_locked();
    signal(SIGTERM, SIG_DFL);
    kill(O.pid, SIGTERM);
    /* Should the main thread block SIGTERM (an executor's own doing), the
     * process still ends. */
    struct timespec second = {1, 0};
    nanosleep(&second, NULL);
    _exit(128 + SIGTERM);
}

/* The flusher: asleep until its alarm goes off, then writes what is there
 * if its oldest frame is late (the main thread may have written it, and
 * begun another batch, meanwhile: then the alarm is set again for that;
 * with the buffer empty it stays off until the next batch sets it); or
 * until SIGTERM's handler wakes it (end_by_term). */
static void *flusher(void *arg)
{
    (void)arg;
    for (;;) {
        struct pollfd fds[2] = {{O.alarm_fd, POLLIN, 0}, {O.term_fd, POLLIN, 0}};
        if (poll(fds, O.term_fd >= 0 ? 2 : 1, -1) < 0) {
            if (errno == EINTR)
                continue;
            /* Cannot happen with these descriptors; should it, the main
             * thread's own flushes remain. */
            return NULL;
        }
        if (fds[1].revents & POLLIN)
            end_by_term();
        /* A descriptor closed under it (an executor closing what it did not
         * open): the flusher stops; the main thread's own writes remain,
         * and fail, and say so.  Taken for SIGTERM, the process ended as
         * if someone had killed it, and its calls were charged to none.
         * SIGTERM gets its default back, its handler waking no one now;
         * one that came between the poll and that is ended here as any. */
        if ((fds[0].revents | fds[1].revents) & POLLNVAL) {
            signal(SIGTERM, SIG_DFL);
            uint64_t count;
            if (read(O.term_fd, &count, sizeof count) == (ssize_t)sizeof count)
                end_by_term();
            return NULL;
        }
        if (!fds[0].revents)
            continue;
        uint64_t expirations;
        if (read(O.alarm_fd, &expirations, sizeof expirations) < 0) {
            if (errno == EAGAIN || errno == EINTR)
                continue; /* set again or cleared since poll: see above */
            return NULL; /* as above */
        }
        if (!flusher_lock(0)) {
            /* The main thread is at the buffer: look again shortly, in
             * case what it does next is a long call. */
            struct itimerspec it;
            memset(&it, 0, sizeof it);
            it.it_value.tv_nsec = BACK_OFF_NS;
            (void)timerfd_settime(O.alarm_fd, 0, &it, NULL); /* cannot fail */
            continue;
        }
        O.alarm_set = 0;
        if (O.frames > 0) {
            int64_t due = O.oldest + PZ_WOUT_LATE_NS;
            if (pz_now_ns() >= due)
                write_locked();
            else
                set_alarm(due);
        }
        flusher_unlock();
    }
}

void pz_wout_start_flusher(void)
{
    pthread_attr_t attr;
    sigset_t all, old;
    /* Non-blocking: the main thread may set or clear the alarm between the
     * flusher's poll and its read, which resets the count of expirations;
     * a blocking read would then wait for the next alarm, SIGTERM's
     * eventfd unwatched meanwhile. */
    O.alarm_fd = timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC | TFD_NONBLOCK);
    if (O.alarm_fd < 0)
        return; /* no flusher: see below */
    /* Without it SIGTERM keeps its default: the batch is lost, as before. */
    O.term_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    O.pid = getpid();
    O.asym = pz_membarrier_register() == 0;
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
    if (rc != 0) {
        close(O.alarm_fd);
        O.alarm_fd = -1;
        if (O.term_fd >= 0)
            close(O.term_fd);
        O.term_fd = -1;
        return;
    }
    if (O.term_fd >= 0) {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_handler = on_term;
        sa.sa_flags = SA_RESTART;
        sigemptyset(&sa.sa_mask);
        if (sigaction(SIGTERM, &sa, NULL) != 0) {
            /* SIGTERM keeps its default; the flusher's eventfd stays
             * quiet. */
        }
    }
}

int pz_wout_lock(void)
{
    int waited = 0;
    if (O.flusher_running && O.asym) {
        atomic_store_explicit(&O.busy, 1, memory_order_relaxed);
        atomic_signal_fence(memory_order_seq_cst); /* the load stays after the store */
        if (!atomic_load_explicit(&O.wants, memory_order_acquire)) {
            O.locked = 1;
            return 0;
        }
        atomic_store_explicit(&O.busy, 0, memory_order_release);
    }
    if (O.flusher_running && pthread_mutex_trylock(&O.lock) != 0) {
        pthread_mutex_lock(&O.lock);
        waited = 1;
    }
    O.via_mutex = O.flusher_running;
    O.locked = 1;
    return waited;
}

void pz_wout_unlock(void)
{
    O.locked = 0;
    if (O.via_mutex) {
        O.via_mutex = 0;
        pthread_mutex_unlock(&O.lock);
    } else if (O.flusher_running && O.asym) {
        atomic_store_explicit(&O.busy, 0, memory_order_release);
    }
}

int pz_wout_locked(void)
{
    return O.locked;
}

pz_buf *pz_wout_buf(void)
{
    return &O.buf;
}

void pz_wout_frame_done(int64_t now, size_t shared)
{
    O.shared += shared;
    if (O.frames++ == 0) {
        O.oldest = now;
        set_alarm(now + PZ_WOUT_LATE_NS);
    }
}

void pz_wout_add_shared(size_t shared)
{
    O.shared += shared;
}

uint64_t pz_wout_writes(void)
{
    return O.writes;
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

size_t pz_wout_bytes(void)
{
    return O.buf.len + O.shared;
}

static int flush(int idle)
{
    int had = O.locked;
    if (!had)
        pz_wout_lock();
    int wrote = O.buf.len > 0;
    write_locked();
    if (idle)
        set_alarm(0);
    if (!had)
        pz_wout_unlock();
    return wrote;
}

int pz_wout_flush(void)
{
    return flush(0);
}

int pz_wout_flush_idle(void)
{
    return flush(1);
}
