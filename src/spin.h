/*
 * spin.h - bounded, self-tuning polling before a blocking wait.
 *
 * A thread asleep on an idle CPU takes tens of microseconds to wake on a
 * virtual machine, because the CPU itself must be woken first; a call's
 * round trip made of such wake-ups costs about 100 us.  A thread that polls
 * for a short while before it sleeps keeps its CPU awake and sees an answer
 * that comes soon at once: the same round trip then takes about 15 us.
 *
 * Polling pays only when waits are short, so it tunes itself: a moving
 * average of recent waits must stay under the budget.  Each wait counts as
 * at most four budgets, so that a few long pauses stop the polling and a
 * few short waits bring it back.  Pollers call sched_yield() between looks,
 * so any thread with real work on the same CPU runs first, and a poller
 * whose yield let such a thread run sleeps at once (pz_spin_yield).
 */
#ifndef PZ_SPIN_H
#define PZ_SPIN_H

#include <sched.h>
#include <stdint.h>

#include "sys.h"

typedef struct pz_spin {
    int64_t budget_ns; /* longest poll; 0: never poll */
    int64_t avg_ns;    /* moving average of recent waits, capped */
} pz_spin;

/* When polling that starts at `now` should give up and sleep; 0 when this
 * wait should not poll at all. */
static inline int64_t pz_spin_until(const pz_spin *s, int64_t now)
{
    return s->budget_ns > 0 && s->avg_ns < s->budget_ns ? now + s->budget_ns : 0;
}

/* Records how long a wait took, polling and sleeping together. */
static inline void pz_spin_note(pz_spin *s, int64_t waited_ns)
{
    int64_t cap = 4 * s->budget_ns;
    if (waited_ns > cap)
        waited_ns = cap;
    s->avg_ns += (waited_ns - s->avg_ns) / 8;
}

/* One pause of a poll that is to end at `until`, taken at `now`: yields
 * the CPU, and returns `until`, or 0 when polling should stop: at `until`,
 * or when the yield took longer than PZ_SPIN_CROWDED_NS.  A yield returns
 * at once when nothing else wants the CPU (under 1 us for 99.9% of
 * 200,000 yields on a 2-CPU virtual machine), after about 2-3 us when
 * another poller shares it, and after the
 * other thread's time slice when a busy thread does.  Polling on then only
 * halves that thread's CPU: with 2 workers, the I/O thread and a stream's
 * main thread on 2 CPUs, the stream's main thread (its slowest part) lost
 * thousands of time slices a run to polling workers.  Stopping at 3 us
 * (rather than 1.5 us, which also stops two pollers that share a CPU)
 * made 200,000 tiny calls, 8 alternating runs: the p(i) loop 5.82 M/s
 * against 5.29, p:stream from a function 4.68 against 3.34, from an array
 * 4.28 against 4.13 (medians); with 1.5 us the streams ran 3.3 M/s. */
#define PZ_SPIN_CROWDED_NS 3000

static inline int64_t pz_spin_yield(int64_t now, int64_t until)
{
    if (now >= until)
        return 0;
    sched_yield();
    return pz_now_ns() - now > PZ_SPIN_CROWDED_NS ? 0 : until;
}

#endif
