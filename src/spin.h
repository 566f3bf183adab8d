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
 * so any thread with real work on the same CPU runs first; the main
 * thread's waits also sleep at once when a yield let such a thread run
 * (pz_spin_yield).
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
 * another poller shares it, and after the other thread's time slice when
 * a busy thread does.  Polling on then only halves that thread's CPU.
 *
 * The main thread's waits use it: what it waits for is the workers' and
 * the I/O thread's work, which its polling would slow.  200,000 tiny calls
 * on 2 workers, 10 rounds, the two builds' order alternating each round,
 * medians: the p(i) loop 6.09 M/s against 5.48 without; 256 workers 4.00
 * against 3.94, p:stream 4.32 and 4.48 M/s (array, function) against 4.50
 * and 4.28.  A worker's reads do not: with it there too, the same rounds
 * (8, four builds) gave the p(i) loop 5.83 M/s against 6.23 with the main
 * thread's alone, and the stream from a function 3.56 against 4.46 (a
 * worker that sleeps must be woken by the I/O thread's write, on the path
 * every call takes). */
#define PZ_SPIN_CROWDED_NS 3000

static inline int64_t pz_spin_yield(int64_t now, int64_t until)
{
    if (now >= until)
        return 0;
    sched_yield();
    return pz_now_ns() - now > PZ_SPIN_CROWDED_NS ? 0 : until;
}

#endif
