"""Python anchors for bench/run.sh (issue 5), printed as key=value lines.

    python3 bench/py_anchor.py throughput N WORKERS [RUNS]
        multiprocessing.Pool(WORKERS): imap_unordered(f, range(N),
        chunksize=1) and map(f, range(N)) (automatic chunking), with
        f(x) = x * 2 and the results summed. The pool is started and warmed
        with one tiny map before the clock starts. Median of RUNS runs.

    python3 bench/py_anchor.py pingpong TRIPS [RUNS]
        A raw pipe ping-pong between two processes (os.pipe + os.fork), one
        byte each way, each round trip timed. The run with the median p50 is
        reported (microseconds).

The anchors of issue 14, one measurement per run on a fresh, warmed pool
(bench/run.sh runs them in rounds beside bench/workload.lua, which
measures the same work the same way):

    python3 bench/py_anchor.py map N WORKERS
        Pool(WORKERS).map(f, range(N)) with automatic chunks, f(x) = x * 2,
        the results summed. Prints calls_per_s.

    python3 bench/py_anchor.py busy N WORKERS US
        Pool.map (automatic chunks) of N calls of a busy loop calibrated in
        this run, before the pool starts, to take US microseconds of CPU.
        Each call returns the CPU it took in its worker (the thread's CPU
        clock around the loop): ideal_s = the sum / WORKERS. Prints
        seconds, ideal_s and vs_ideal = seconds / ideal_s.

    python3 bench/py_anchor.py bytes N WORKERS SIZE
        Pool.map(echo, [s] * N, chunksize=1) with s a bytes object of SIZE
        bytes: SIZE bytes each way per call. chunksize=1 because a chunk
        holding the one object many times would carry it once (pickle's
        memo). Prints gb_per_s (bytes in plus out per second, 1 GB = 1e9
        bytes), and the parent's peak resident memory (VmHWM, reset before
        the map) above its resident memory then: peak_above_start_mib, and
        peak_above_held_mib once the N results the script holds (distinct
        objects) are taken off.

The one-shot anchors of issue 12, beside bench/workload.lua pzmap
(parallelize.map(f, list, {workers = WORKERS})): the clock runs from
before the pool starts to after it has stopped, as idiomatic code would
write it, `with Pool(WORKERS) as pool: pool.map(f, data)`; data is a list
of 0..N-1 built before the clock starts; f(x) = x * 2.

    python3 bench/py_anchor.py oneshot map N WORKERS
        pool.map(f, data), automatic chunks; every result checked against
        its input's position after the clock stops. Prints calls_per_s.

    python3 bench/py_anchor.py oneshot imap_unordered N WORKERS
        sum(pool.imap_unordered(f, data)), the default chunksize=1; the sum
        checked. Prints calls_per_s.

    These (but not the one-shot ones) also print, from /proc, CPU seconds and voluntary and involuntary
    context switches of the main thread (main_*), the pool's other threads
    (io_*), its workers (workers_*), and switches_per_call.
"""
import functools
import multiprocessing
import os
import statistics
import sys
import time


def double(x):
    return x * 2


def median_run(runs, key):
    ordered = sorted(runs, key=lambda r: r[key])
    return ordered[(len(ordered) - 1) // 2]


def emit(key, value):
    if isinstance(value, float):
        value = "%.6g" % value
    print("%s=%s" % (key, value), flush=True)


def throughput(n, workers, runs):
    want = n * (n - 1)  # sum of 2 * x for x in range(n)
    imap_rates, map_rates = [], []
    with multiprocessing.Pool(workers) as pool:
        pool.map(double, range(workers))  # warm-up: every worker has run once
        for _ in range(runs):
            t0 = time.perf_counter()
            total = sum(pool.imap_unordered(double, range(n), chunksize=1))
            t1 = time.perf_counter()
            if total != want:
                raise SystemExit("imap_unordered: wrong sum %d (want %d)" % (total, want))
            imap_rates.append(n / (t1 - t0))
        for _ in range(max(runs, 5)):
            t0 = time.perf_counter()
            total = sum(pool.map(double, range(n)))
            t1 = time.perf_counter()
            if total != want:
                raise SystemExit("map: wrong sum %d (want %d)" % (total, want))
            map_rates.append(n / (t1 - t0))
    emit("n", n)
    emit("workers", workers)
    emit("runs", runs)
    emit("imap_unordered_cs1_calls_per_s", statistics.median(imap_rates))
    emit("imap_unordered_cs1_calls_per_s_all", ",".join("%.0f" % r for r in imap_rates))
    emit("map_calls_per_s", statistics.median(map_rates))
    emit("map_calls_per_s_all", ",".join("%.0f" % r for r in map_rates))


def read_text(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def thread_stats(pid, tid):
    """CPU seconds (schedstat) and context switches of one thread."""
    base = "/proc/%d/task/%d/" % (pid, tid)
    status = read_text(base + "status")
    if status is None:
        return None
    sched = read_text(base + "schedstat") or "0"
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {
        "cpu_s": int(sched.split()[0]) * 1e-9,
        "vol": int(fields.get("voluntary_ctxt_switches", "0")),
        "invol": int(fields.get("nonvoluntary_ctxt_switches", "0")),
    }


def tasks(pid):
    try:
        return [int(t) for t in os.listdir("/proc/%d/task" % pid)]
    except OSError:
        return []


def add(into, stats):
    if stats:
        for k, v in stats.items():
            into[k] += v


def tree_stats(worker_pids):
    """main: this thread; io: the other threads of this process; workers:
    every thread of the worker processes, summed."""
    me = os.getpid()
    snap = {part: {"cpu_s": 0.0, "vol": 0, "invol": 0} for part in ("main", "io", "workers")}
    add(snap["main"], thread_stats(me, me))
    for tid in tasks(me):
        if tid != me:
            add(snap["io"], thread_stats(me, tid))
    for pid in worker_pids:
        for tid in tasks(pid):
            add(snap["workers"], thread_stats(pid, tid))
    return snap


def measured(pool, n, fn):
    """Runs fn() between two snapshots of the pool's scheduler counts;
    returns fn's figures (a dict) with the counts added."""
    pids = [w.pid for w in pool._pool]
    before = tree_stats(pids)
    figures = fn()
    after = tree_stats(pids)
    switches = 0
    for part in ("main", "io", "workers"):
        for k in ("cpu_s", "vol", "invol"):
            figures["%s_%s" % (part, k)] = after[part][k] - before[part][k]
        switches += figures[part + "_vol"] + figures[part + "_invol"]
    figures["switches_per_call"] = switches / n
    return figures


def emit_all(head, figures):
    for k, v in head:
        emit(k, v)
    for k in sorted(figures):
        emit(k, figures[k])


def fresh_pool(workers):
    pool = multiprocessing.Pool(workers)
    pool.map(double, range(workers), chunksize=1)  # warm-up
    return pool


def map_once(n, workers):
    want = n * (n - 1)
    with fresh_pool(workers) as pool:
        def run():
            t0 = time.perf_counter()
            total = sum(pool.map(double, range(n)))
            t = time.perf_counter() - t0
            if total != want:
                raise SystemExit("map: wrong sum %d (want %d)" % (total, want))
            return {"seconds": t, "calls_per_s": n / t}
        figures = measured(pool, n, run)
    emit_all((("workload", "map"), ("n", n), ("workers", workers)), figures)


def oneshot(how, n, workers):
    data = list(range(n))
    want = n * (n - 1)
    t0 = time.perf_counter()
    with multiprocessing.Pool(workers) as pool:
        if how == "map":
            results = pool.map(double, data)
        else:
            total = sum(pool.imap_unordered(double, data))
    t = time.perf_counter() - t0
    if how == "map":
        if len(results) != n or any(r != 2 * x for r, x in zip(results, data)):
            raise SystemExit("oneshot map: wrong results")
    elif total != want:
        raise SystemExit("oneshot imap_unordered: wrong sum %d (want %d)" % (total, want))
    emit_all((("workload", "oneshot_" + how), ("n", n), ("workers", workers)),
             {"seconds": t, "calls_per_s": n / t})


def spin(k):
    """A busy loop whose CPU time grows with k."""
    x = 0
    for i in range(k):
        x += i % 7
    return x


def calibrate(us):
    """The k for which spin(k) takes `us` microseconds of this thread's CPU,
    and the CPU one spin(k) then takes (the median of 101 calls)."""
    k = 1000
    while True:
        c0 = time.thread_time()
        spin(k)
        took = time.thread_time() - c0
        if took >= 2e-3:
            break
        k *= 2
    k = max(1, round(k * us * 1e-6 / took))
    times = []
    for _ in range(101):
        c0 = time.thread_time()
        spin(k)
        times.append(time.thread_time() - c0)
    return k, statistics.median(times)


def timed_spin(k, want):
    """spin(k), checked; returns the CPU seconds it took in this thread."""
    c0 = time.thread_time()
    x = spin(k)
    took = time.thread_time() - c0
    if x != want:
        raise ValueError("spin(%d) gave %d (want %d)" % (k, x, want))
    return took


def busy_once(n, workers, us):
    k, calibrated = calibrate(us)
    task = functools.partial(timed_spin, want=spin(k))
    with fresh_pool(workers) as pool:
        def run():
            t0 = time.perf_counter()
            results = pool.map(task, [k] * n)
            t = time.perf_counter() - t0
            if len(results) != n:
                raise SystemExit("busy: %d results (want %d)" % (len(results), n))
            ideal = sum(results) / workers
            return {"seconds": t, "ideal_s": ideal, "vs_ideal": t / ideal, "iterations": k,
                    "call_cpu_us": sum(results) / n * 1e6, "calibrated_call_cpu_us": calibrated * 1e6}
        figures = measured(pool, n, run)
    emit_all((("workload", "busy"), ("n", n), ("workers", workers)), figures)


def echo(s):
    return s


def status_bytes(field):
    for line in (read_text("/proc/self/status") or "").splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return None


def bytes_once(n, workers, size):
    pattern = bytes((i * 37 + 11) % 256 for i in range(256))
    s = (pattern * (size // 256 + 1))[:size]
    data = [s] * n
    with fresh_pool(workers) as pool:
        def run():
            rss0 = status_bytes("VmRSS")
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # VmHWM := VmRSS
                reset = True
            except OSError:
                reset = False
            t0 = time.perf_counter()
            results = pool.map(echo, data, chunksize=1)
            t = time.perf_counter() - t0
            peak = status_bytes("VmHWM")
            if len(results) != n or any(r != s for r in results):
                raise SystemExit("bytes: wrong results")
            figures = {"seconds": t, "size": size, "gb_per_s": 2 * n * size / t / 1e9}
            if reset and rss0 is not None and peak is not None:
                held = n * size  # the results: distinct objects, each of SIZE bytes
                figures["peak_above_start_mib"] = (peak - rss0) / 1048576
                figures["held_mib"] = held / 1048576
                figures["peak_above_held_mib"] = (peak - rss0 - held) / 1048576
            return figures
        figures = measured(pool, n, run)
    emit_all((("workload", "bytes"), ("n", n), ("workers", workers)), figures)


def quantile(sorted_list, q):
    k = int(q * (len(sorted_list) - 1) + 0.5)
    return sorted_list[k]


def pingpong_once(trips):
    to_child_r, to_child_w = os.pipe()
    to_parent_r, to_parent_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(to_child_w)
        os.close(to_parent_r)
        code = 0
        try:
            while True:
                b = os.read(to_child_r, 1)
                if not b or b == b"q":
                    break
                os.write(to_parent_w, b)
        except BaseException:
            code = 1
        os._exit(code)
    os.close(to_child_r)
    os.close(to_parent_w)
    times = []
    clock = time.perf_counter_ns
    try:
        for _ in range(200):  # warm-up
            os.write(to_child_w, b"x")
            os.read(to_parent_r, 1)
        for _ in range(trips):
            t0 = clock()
            os.write(to_child_w, b"x")
            os.read(to_parent_r, 1)
            times.append(clock() - t0)
    finally:
        os.write(to_child_w, b"q")
        os.close(to_child_w)
        os.waitpid(pid, 0)
        os.close(to_parent_r)
    times.sort()
    return {q: quantile(times, f) / 1000.0 for q, f in (("p10", 0.1), ("p50", 0.5), ("p90", 0.9))}


def pingpong(trips, runs):
    results = [pingpong_once(trips) for _ in range(runs)]
    m = median_run(results, "p50")
    emit("trips", trips)
    emit("runs", runs)
    emit("p10_us", m["p10"])
    emit("p50_us", m["p50"])
    emit("p90_us", m["p90"])
    emit("p50_us_all", ",".join("%.1f" % r["p50"] for r in results))


def main(argv):
    if len(argv) >= 4 and argv[1] == "throughput":
        runs = int(argv[4]) if len(argv) > 4 else 3
        throughput(int(argv[2]), int(argv[3]), runs)
    elif len(argv) == 4 and argv[1] == "map":
        map_once(int(argv[2]), int(argv[3]))
    elif len(argv) == 5 and argv[1] == "oneshot" and argv[2] in ("map", "imap_unordered"):
        oneshot(argv[2], int(argv[3]), int(argv[4]))
    elif len(argv) == 5 and argv[1] == "busy":
        busy_once(int(argv[2]), int(argv[3]), float(argv[4]))
    elif len(argv) == 5 and argv[1] == "bytes":
        bytes_once(int(argv[2]), int(argv[3]), int(argv[4]))
    elif len(argv) >= 3 and argv[1] == "pingpong":
        runs = int(argv[3]) if len(argv) > 3 else 3
        pingpong(int(argv[2]), runs)
    else:
        sys.stderr.write(__doc__)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
