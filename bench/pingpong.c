/*
 * pingpong.c - the latency anchor of bench/run.sh (issue 5): a raw pipe
 * ping-pong between two processes, one byte each way, each round trip
 * timed with CLOCK_MONOTONIC. run.sh compiles it into a temporary
 * directory; nothing of the library is involved.
 *
 *     pingpong [TRIPS [RUNS [HOPS [SPREAD [PAUSE_US]]]]]
 *
 * HOPS 2 (the default) is the plain ping-pong: parent -> echo -> parent.
 * HOPS 4 relays through a middle process, parent -> relay -> echo -> relay
 * -> parent: four sleeping wake-ups in a row, as many as a pool's round
 * trip has (main thread -> I/O thread -> worker -> I/O thread -> main).
 * SPREAD 1 pins the parent to the first CPU it may use and every process
 * it forks to the next one (round robin), so that each wake-up crosses
 * CPUs; SPREAD 0 (the default) leaves placement to the scheduler.
 * PAUSE_US > 0 sleeps that long before each round trip, so that every trip
 * starts from idle processes (and, on a quiet machine, idle CPUs).
 *
 * Prints key=value lines (microseconds) for the run with the median p50.
 */
#define _GNU_SOURCE
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define WARMUP 200

/* SPREAD: the CPUs this process may use, in order, and the next to hand out. */
static int spread, ncpus, next_cpu, cpus[CPU_SETSIZE];
static long pause_us;

/* Pins the calling process to the next CPU of the list (SPREAD only). */
static void pin_next(void)
{
    if (!spread || ncpus == 0)
        return;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpus[next_cpu % ncpus], &set);
    next_cpu++;
    if (sched_setaffinity(0, sizeof set, &set) != 0)
        perror("sched_setaffinity");
}

typedef struct run_stats {
    double p10, p50, p90;
} run_stats;

static double now_us(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec * 1e6 + (double)t.tv_nsec / 1e3;
}

static int by_value(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double quantile(const double *sorted, int n, double q)
{
    int k = (int)(q * (n - 1) + 0.5);
    return sorted[k];
}

/* The child: echoes every byte until 'q' or end of file. */
static void echo(int in, int out)
{
    char c;
    pin_next();
    while (read(in, &c, 1) == 1 && c != 'q')
        if (write(out, &c, 1) != 1)
            break;
    _exit(0);
}

/* The relay of HOPS 4: forwards parent -> echo and echo -> parent, one
 * byte at a time, until 'q' or end of file (the 'q' is passed on). */
static void relay(int from_parent, int to_parent)
{
    int down[2], up[2];
    pin_next();
    if (pipe(down) != 0 || pipe(up) != 0)
        _exit(1);
    pid_t pid = fork();
    if (pid < 0)
        _exit(1);
    if (pid == 0) {
        close(down[1]);
        close(up[0]);
        echo(down[0], up[1]);
    }
    close(down[0]);
    close(up[1]);
    char c;
    while (read(from_parent, &c, 1) == 1) {
        if (write(down[1], &c, 1) != 1 || c == 'q')
            break;
        if (read(up[0], &c, 1) != 1 || write(to_parent, &c, 1) != 1)
            break;
    }
    close(down[1]);
    waitpid(pid, NULL, 0);
    _exit(0);
}

static int one_run(int trips, int hops, double *times, run_stats *st)
{
    int down[2], up[2];
    if (pipe(down) != 0 || pipe(up) != 0) {
        perror("pipe");
        return -1;
    }
    pid_t pid = fork();
    if (pid < 0) {
        perror("fork");
        return -1;
    }
    if (pid == 0) {
        close(down[1]);
        close(up[0]);
        if (hops == 4)
            relay(down[0], up[1]);
        echo(down[0], up[1]);
    }
    close(down[0]);
    close(up[1]);
    int rc = 0;
    char c = 'x';
    for (int i = 0; i < WARMUP + trips && rc == 0; i++) {
        if (pause_us > 0) {
            struct timespec ts = {pause_us / 1000000, pause_us % 1000000 * 1000};
            nanosleep(&ts, NULL);
        }
        double t0 = now_us();
        if (write(down[1], &c, 1) != 1 || read(up[0], &c, 1) != 1)
            rc = -1;
        else if (i >= WARMUP)
            times[i - WARMUP] = now_us() - t0;
    }
    c = 'q';
    if (write(down[1], &c, 1) != 1)
        rc = -1;
    close(down[1]);
    close(up[0]);
    waitpid(pid, NULL, 0);
    if (rc != 0) {
        fprintf(stderr, "pingpong: the echo process failed\n");
        return -1;
    }
    qsort(times, (size_t)trips, sizeof *times, by_value);
    st->p10 = quantile(times, trips, 0.10);
    st->p50 = quantile(times, trips, 0.50);
    st->p90 = quantile(times, trips, 0.90);
    return 0;
}

int main(int argc, char **argv)
{
    int trips = argc > 1 ? atoi(argv[1]) : 3000;
    int runs = argc > 2 ? atoi(argv[2]) : 3;
    int hops = argc > 3 ? atoi(argv[3]) : 2;
    spread = argc > 4 ? atoi(argv[4]) : 0;
    pause_us = argc > 5 ? atol(argv[5]) : 0;
    if (trips < 1 || runs < 1 || runs > 99 || (hops != 2 && hops != 4) || pause_us < 0) {
        fprintf(stderr, "usage: pingpong [TRIPS [RUNS (1..99) [HOPS (2 or 4) [SPREAD (0 or 1) [PAUSE_US]]]]]\n");
        return 2;
    }
    if (spread) {
        cpu_set_t set;
        if (sched_getaffinity(0, sizeof set, &set) == 0)
            for (int c = 0; c < CPU_SETSIZE; c++)
                if (CPU_ISSET(c, &set))
                    cpus[ncpus++] = c;
        pin_next();
    }
    double *times = malloc((size_t)trips * sizeof *times);
    run_stats st[99];
    if (!times)
        return 1;
    for (int r = 0; r < runs; r++)
        if (one_run(trips, hops, times, &st[r]) != 0)
            return 1;
    free(times);
    /* The run with the median p50. */
    int order[99];
    for (int r = 0; r < runs; r++)
        order[r] = r;
    for (int i = 1; i < runs; i++)
        for (int j = i; j > 0 && st[order[j]].p50 < st[order[j - 1]].p50; j--) {
            int t = order[j];
            order[j] = order[j - 1];
            order[j - 1] = t;
        }
    const run_stats *m = &st[order[(runs - 1) / 2]];
    printf("spread=%d\nncpus=%d\npause_us=%ld\n", spread, ncpus, pause_us);
    printf("hops=%d\ntrips=%d\nruns=%d\np10_us=%.6g\np50_us=%.6g\np90_us=%.6g\np50_us_all=", hops, trips, runs,
           m->p10, m->p50, m->p90);
    for (int r = 0; r < runs; r++)
        printf("%s%.1f", r ? "," : "", st[r].p50);
    printf("\n");
    return 0;
}
