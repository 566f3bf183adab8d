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
"""
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
    elif len(argv) >= 3 and argv[1] == "pingpong":
        runs = int(argv[3]) if len(argv) > 3 else 3
        pingpong(int(argv[2]), runs)
    else:
        sys.stderr.write(__doc__)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
