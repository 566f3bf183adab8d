"""Where a workload's time goes, per thread and per process, per call.

    python3 bench/profile.py WORKLOAD N SMALL_N WORKERS [PARAM]

runs `build/pzlua bench/workload.lua WORKLOAD N WORKERS [PARAM]` (see that
file) under Linux's perf, several ways, and prints per call:

  - CPU microseconds and voluntary / involuntary context switches of each
    role: the main thread, the I/O thread, each worker, the spawner (from
    /proc, as workload.lua reports them; no perf involved);
  - for the whole process tree: task clock, context switches, CPU
    migrations, page faults and system calls (perf stat);
  - system calls by role and by name (perf trace -s);
  - the hottest functions of each role, with their share of that role's
    samples (perf record -e cpu-clock, no call graphs).

Each figure is the difference between a run with N calls and one with
SMALL_N calls, divided by N - SMALL_N, so that starting and stopping the
pool cancel out; perf stat's figures are medians of RUNS runs (default 3).
The hot functions come from one run with N calls.

Environment: PZLUA (build/pzlua), PERF (perf), RUNS (3). Needs perf with
the raw_syscalls tracepoints and perf trace (Debian: linux-perf); a part
that perf cannot do here is reported as such and skipped.
"""
import os
import re
import statistics
import subprocess
import sys
import tempfile

PZLUA = os.environ.get("PZLUA", "build/pzlua")
PERF = os.environ.get("PERF", "perf")
RUNS = int(os.environ.get("RUNS", "3"))
ROLES = ("main", "io", "workers", "spawner")


def workload_cmd(workload, n, workers, param):
    cmd = [PZLUA, "bench/workload.lua", workload, str(n), str(workers)]
    if param is not None:
        cmd.append(str(param))
    return cmd


def parse_kv(text):
    kv = {}
    for line in text.splitlines():
        m = re.match(r"^([A-Za-z0-9_.]+)=(.*)$", line)
        if m:
            kv[m.group(1)] = m.group(2)
    return kv


def run(cmd, **kw):
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
    if p.returncode != 0:
        raise RuntimeError("%s: exit status %d\n%s" % (" ".join(cmd), p.returncode, p.stderr[-2000:]))
    return p.stdout, p.stderr


def role_of_ids(kv):
    """tid or pid -> role, from workload.lua's output."""
    roles = {}
    roles[int(kv["tid_main"])] = "main"
    for key, role in (("tids_io", "io"), ("pids_workers", "workers"), ("pids_others", "spawner")):
        for x in filter(None, kv.get(key, "").split(",")):
            roles[int(x)] = role
    return roles


# ---- /proc figures, as workload.lua reports them -------------------------

def proc_figures(workload, n, small, workers, param):
    out = {}
    for size in (n, small):
        text, _ = run(workload_cmd(workload, size, workers, param))
        out[size] = parse_kv(text)
    big, little = out[n], out[small]
    calls = n - small
    rows = []
    for part, label in (("main", "main thread"), ("io", "I/O thread"), ("workers", "workers (sum)"),
                        ("others", "spawner")):
        cpu = (float(big[part + "_cpu_s"]) - float(little[part + "_cpu_s"])) / calls * 1e6
        vol = (float(big[part + "_vol"]) - float(little[part + "_vol"])) / calls
        invol = (float(big[part + "_invol"]) - float(little[part + "_invol"])) / calls
        rows.append((label, cpu, vol, invol))
    each_big = [float(x) for x in big.get("worker_cpu_s_each", "").split(",") if x]
    each_small = [float(x) for x in little.get("worker_cpu_s_each", "").split(",") if x]
    each = [(b - s) / calls * 1e6 for b, s in zip(each_big, each_small)]
    return big, rows, each


# ---- perf stat ----------------------------------------------------------

STAT_EVENTS = ("task-clock", "context-switches", "cpu-migrations", "page-faults", "raw_syscalls:sys_enter")


def perf_stat_once(cmd):
    with tempfile.NamedTemporaryFile("r", suffix=".stat") as f:
        run([PERF, "stat", "-x,", "-e", ",".join(STAT_EVENTS), "-o", f.name, "--"] + cmd)
        counts = {}
        for line in f.read().splitlines():
            parts = line.split(",")
            if len(parts) > 3 and parts[2] in STAT_EVENTS:
                try:
                    counts[parts[2]] = float(parts[0])
                except ValueError:
                    counts[parts[2]] = float("nan")
        return counts


def perf_stat(workload, n, small, workers, param):
    med = {}
    for size in (n, small):
        runs = [perf_stat_once(workload_cmd(workload, size, workers, param)) for _ in range(RUNS)]
        med[size] = {e: statistics.median(r.get(e, float("nan")) for r in runs) for e in STAT_EVENTS}
    calls = n - small
    return {e: (med[n][e] - med[small][e]) / calls for e in STAT_EVENTS}


# ---- perf trace -s ------------------------------------------------------

def perf_trace(workload, size, workers, param):
    """{role: {syscall: count}} for one run."""
    with tempfile.NamedTemporaryFile("r", suffix=".trace") as f:
        text, _ = run([PERF, "trace", "-s", "-o", f.name, "--"] + workload_cmd(workload, size, workers, param))
        summary = f.read()
    roles = role_of_ids(parse_kv(text))
    counts = {r: {} for r in ROLES}
    role = None
    for line in summary.splitlines():
        m = re.match(r"^\s*\S.*\((\d+)\), \d+ events", line)
        if m:
            role = roles.get(int(m.group(1)))
            continue
        m = re.match(r"^\s+([a-z_0-9]+)\s+(\d+)\s+\d+\s", line)
        if m and role:
            name, calls = m.group(1), int(m.group(2))
            counts[role][name] = counts[role].get(name, 0) + calls
    return counts


def syscalls_by_role(workload, n, small, workers, param):
    big = perf_trace(workload, n, workers, param)
    little = perf_trace(workload, small, workers, param)
    calls = n - small
    out = {}
    for role in ROLES:
        names = set(big[role]) | set(little[role])
        per = {s: (big[role].get(s, 0) - little[role].get(s, 0)) / calls for s in names}
        out[role] = sorted(((v, s) for s, v in per.items() if v > 0), reverse=True)
    return out


# ---- perf record --------------------------------------------------------

def hot_functions(workload, n, workers, param, top):
    with tempfile.TemporaryDirectory() as d:
        data = os.path.join(d, "perf.data")
        text, _ = run([PERF, "record", "-q", "-F", "10000", "-e", "cpu-clock", "-o", data, "--"]
                      + workload_cmd(workload, n, workers, param))
        report, _ = run([PERF, "report", "-i", data, "--stdio", "--sort", "pid,dso,sym"])
    roles = role_of_ids(parse_kv(text))
    share = {r: [] for r in ROLES}
    for line in report.splitlines():
        m = re.match(r"^\s+([\d.]+)%\s+(\d+):\S+\s+(.*?)\s+\[([.k])\]\s+(.*?)\s*$", line)
        if m:
            role = roles.get(int(m.group(2)))
            if role:
                dso, sym = m.group(3), m.group(5)
                if m.group(4) == "k":
                    sym += " [kernel]"
                elif dso.startswith("[JIT]"):
                    sym = "(code compiled by LuaJIT)"
                elif sym.startswith("0x"):
                    sym = "(no symbol) [%s]" % dso  # a stripped library
                share[role].append((float(m.group(1)), sym))
    out = {}
    for role in ROLES:
        total = sum(p for p, _ in share[role])
        merged = {}
        for p, sym in share[role]:
            merged[sym] = merged.get(sym, 0) + p
        rows = sorted(((p / total * 100 if total else 0, s) for s, p in merged.items()), reverse=True)
        kernel = sum(p for p, s in rows if s.endswith("[kernel]"))
        out[role] = (total, kernel, rows[:top])
    return out


def main(argv):
    if len(argv) not in (5, 6):
        sys.stderr.write(__doc__)
        return 2
    workload, n, small, workers = argv[1], int(argv[2]), int(argv[3]), int(argv[4])
    param = argv[5] if len(argv) == 6 else None
    if not 0 < small < n:
        sys.stderr.write("profile.py: SMALL_N must be above 0 and below N\n")
        return 2
    print("# %s: %d calls (less a run of %d), %d workers%s" % (
        workload, n, small, workers, ", parameter " + param if param else ""))

    big, rows, each = proc_figures(workload, n, small, workers, param)
    print("\n## CPU and context switches per call, by role (/proc)\n")
    print("%-16s %12s %12s %12s" % ("role", "CPU us", "voluntary", "involuntary"))
    for label, cpu, vol, invol in rows:
        print("%-16s %12.3f %12.4f %12.4f" % (label, cpu, vol, invol))
    print("each worker, CPU us per call (of all calls): %s" % ", ".join("%.3f" % x for x in each))
    for key in ("calls_per_s", "gb_per_s", "vs_ideal", "peak_above_start_mib"):
        if key in big:
            print("%s (the run of %d) = %s" % (key, n, big[key]))

    print("\n## whole process tree, per call (perf stat, medians of %d)\n" % RUNS)
    try:
        for e, v in perf_stat(workload, n, small, workers, param).items():
            if e == "task-clock":  # perf reports milliseconds
                print("%-24s %12.3f us of CPU" % (e, v * 1000))
            else:
                print("%-24s %12.4f" % (e, v))
    except (RuntimeError, OSError) as e:
        print("perf stat failed: %s" % e)

    print("\n## system calls per call, by role (perf trace -s)\n")
    try:
        for role, calls in syscalls_by_role(workload, n, small, workers, param).items():
            total = sum(v for v, _ in calls)
            detail = ", ".join("%s %.4f" % (s, v) for v, s in calls[:8])
            print("%-8s %9.4f  %s" % (role, total, detail))
    except (RuntimeError, OSError) as e:
        print("perf trace failed: %s" % e)

    print("\n## hottest functions by role (perf record, one run of %d calls)\n" % n)
    try:
        for role, (total, kernel, rows) in hot_functions(workload, n, workers, param, 12).items():
            print("%s: %.1f%% of all samples, %.0f%% of them in the kernel" % (role, total, kernel))
            for pct, sym in rows:
                print("    %5.1f%%  %s" % (pct, sym))
    except (RuntimeError, OSError) as e:
        print("perf record failed: %s" % e)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
