/*
 * lend.c - a lone call on an idle pool, sent and answered without waking
 * the I/O thread.
 *
 * Why: the path of a call through the I/O thread (main -> I/O -> worker ->
 * I/O -> main) has four wake-ups, and on a virtual machine waking a thread
 * asleep on another, idle CPU costs tens of microseconds.  When the pool is
 * idle, the main thread sends the call itself, and takes the worker's
 * socket out of the I/O thread's epoll set before it does ("lends" it):
 * the answer then wakes only the main thread, which reads it with the I/O
 * thread's own code (pz_slot_read), and publishes the records as the I/O
 * thread would.
 *
 * Locking rule: every function here runs on the main thread with io->lock
 * held, which the I/O thread holds except while it sleeps in epoll_wait.
 * Holding it, the main thread owns the whole I/O state (io.h): it is the
 * consumer of the submit queue and the producer of the done queue, in the
 * I/O thread's place.  The I/O thread leaves a lent slot alone (has_room,
 * pick and watch skip it) except to handle its death, which ends the lend;
 * and when it took an event for that socket from epoll_wait just before
 * the lend, it reads the socket too: harmless, since both read under the
 * lock.  The lend ends at the next p(...), at stop, once its answers are
 * read, or when the worker dies.
 */
#include <stdatomic.h>
#include <sys/epoll.h>

#include "frame.h"
#include "io.h"
#include "lend.h"
#include "sys.h"

void pz_lend_end(struct pz_io *io)
{
    pz_slot *w = io->lent;
    io->lent = NULL;
    w->lent = 0;
    pz_slot_watch(io, w, EPOLL_CTL_ADD);
    /* An I/O thread that went to sleep during the lend may have found no
     * room for calls (has_room skips a lent slot), and then p(...) would
     * not wake it: wake it now so that it looks again. */
    if (!atomic_load(&io->p->io_sleeping))
        pz_wake(io->p->io_wake_fd, "the I/O thread");
}

/* The submit queue's only frame, or NULL when it holds none or several
 * (as far as its first chunk shows). */
static const char *lone_call(struct pz_io *io, size_t *size)
{
    size_t avail;
    const char *fr = pz_spsc_peek(&io->p->submit, &avail);
    if (!fr)
        return NULL;
    *size = pz_frame_size(fr);
    return *size == avail ? fr : NULL;
}

static int nothing_in_flight(struct pz_io *io)
{
    for (int i = 0; i < io->nrecords; i++)
        if (io->slots[i].inflight != 0)
            return 0;
    return 1;
}

int pz_lend_dispatch(struct pz_io *io, int *lent_fd)
{
    size_t size;
    int done = 0;
    if (pthread_mutex_trylock(&io->lock) != 0)
        return 0;
    /* Only for a pool with nothing in flight: a call then waits for no
     * other, and the I/O thread, which sleeps, would only relay it.  Under
     * a stream of calls the I/O thread batches them instead. */
    if (atomic_load(&io->p->io_sleeping) && !io->stopping && !io->fatal && io->rq_pos == io->rq.len &&
        !io->lent && nothing_in_flight(io)) {
        /* The worker that answered last is the one most likely still awake
         * (it polls a while before sleeping) and warm. */
        io->rr = io->last_idle;
        const char *fr = lone_call(io, &size);
        /* A call with a timeout needs the I/O thread's timer: it goes the
         * usual way, and the I/O thread is woken for it. */
        if (fr && pz_slot_timeout_ns(io, fr) != 0) {
            pthread_mutex_unlock(&io->lock);
            return 0;
        }
        pz_slot *w = fr ? pz_dispatch_pick(io) : NULL;
        if (w && epoll_ctl(io->ep, EPOLL_CTL_DEL, w->fd, NULL) == 0) {
            w->lent = 1;
            io->lent = w;
            if (pz_slot_hand_calls(io, w, fr, size, 1) == 0) {
                pz_spsc_consume(&io->p->submit, size);
                io->calls_taken++;
                io->bytes_taken += size;
                pz_slot_flush(io, w);
            }
            if (io->lent && pz_slot_unsent(w))
                pz_lend_end(io); /* the rest goes out when it can */
            else if (io->lent)
                *lent_fd = w->fd;
        } else {
            pz_dispatch(io);
        }
        done = !pz_dispatch_waiting(io);
    }
    pthread_mutex_unlock(&io->lock);
    return done;
}

int pz_lend_collect(struct pz_io *io, int keep)
{
    pthread_mutex_lock(&io->lock);
    pz_slot *w = io->lent;
    if (w) {
        pz_slot_read(io, w);
        if (io->lent && (!keep || w->inflight == 0))
            pz_lend_end(io);
        /* It died, or a call it answered raised and runs again (retries):
         * requeued calls and timers are the I/O thread's business, and it
         * may sleep with no reason to look at them (p(...) wakes it for
         * new calls only). */
        if (w->fd < 0 || io->rq_pos < io->rq.len)
            pz_wake(io->p->io_wake_fd, "the I/O thread");
    }
    pz_io_publish(io);
    int fd = io->lent ? io->lent->fd : -1;
    pthread_mutex_unlock(&io->lock);
    return fd;
}
