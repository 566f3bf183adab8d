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
 * so any thread with real work on the same CPU runs first.
 */
#ifndef PZ_SPIN_H
#define PZ_SPIN_H

#include <stdint.h>

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

#endif
