"""Where a command's CPU goes, by process kind: for the test suite, whose time is process start-ups.

Runs COMMAND (default: the suite as `make test` runs it) and reads every process's CPU time from
/proc every `--interval` seconds (Linux only). Each interval's CPU is booked to the process's kind
at that moment: Ray renames a worker process after the actor or task it runs (`ray::TrainController`,
`ray::MapWorker(MapBatches(ReadDecode))`), and a task worker runs several kinds in its life. At the
end it prints CPU-s and process counts by kind and by family (Ray Train, Ray Data, Ray Tune, Ray's
daemons, minit2i commands, pytest), next to the whole machine's busy CPU from /proc/stat over the
same time: what the table misses is other load and the last interval of each process that exited.

    python -m benchmarks.suite_cost [--interval 0.5] [--json FILE] [--top 40] [-- COMMAND ...]

psutil and `ps` read the same counters; this reads /proc itself to keep each sample of ~500
processes cheap (about 1% of a core at 0.5 s).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field

TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
SUITE = [sys.executable, "-m", "pytest", "-q", "-n", "2", "-p", "no:cacheprovider"]

# Ray's own processes, by what their command line runs.
_DAEMONS = [("gcs_server", "GCS"), ("raylet/raylet", "raylet"), ("dashboard/agent.py", "dashboard agent"),
            ("runtime_env/agent", "runtime-env agent"), ("log_monitor.py", "log monitor"),
            ("dashboard/dashboard.py", "dashboard"), ("autoscaler/_private/monitor.py", "autoscaler monitor"),
            ("ray-dashboard-", "dashboard module"), ("/bin/ray start", "`ray start`"), ("/bin/ray job", "`ray job`")]
_TRAIN_HELPERS = {"TrainController", "PlacementGroupCleaner", "DatasetManager", "SynchronizationActor",
                  "PreemptionWatcher", "TrainStateActor"}
# A worker process is `default_worker.py`, then `ray::IDLE`, until it takes an actor or task: its
# start (interpreter, Ray, and the imports that unpickling the actor's class does) is booked here.
_RAY_TITLES = {"IDLE": "worker start-up and idle", "DashboardAgent": "dashboard agent",
               "RuntimeEnvAgent": "runtime-env agent", "JobSupervisor": "JobSupervisor"}
_DATA_INSTANCE = {"_StatsActor", "_AutoscalingCoordinatorActor", "ActorLocationTracker", "SplitCoordinator"}


def kind(cmdline: str) -> tuple[str, str]:
    """(family, kind) of a process from its command line (NUL-separated or spaced)."""
    cmd = cmdline.replace("\0", " ").strip()
    if cmd.startswith("ray::"):
        title = cmd.split()[0][5:]
        name = title.split(".")[0]
        if name == "RayTrainWorker":
            return "Ray Train", "Train worker"
        if name in _TRAIN_HELPERS:
            return "Ray Train", name
        if name.startswith("MapWorker("):
            stage = re.findall(r"MapBatches\((\w+)\)|Map\((\w+)\)", name)
            return "Ray Data", "actor " + "->".join(a or b for a, b in stage) if stage else name
        if name in _DATA_INSTANCE:
            return "Ray Data", name
        if name in ("ImplicitFunc", "_QueueActor") or name.startswith("Trainable"):
            return "Ray Tune", "trial actor" if name == "ImplicitFunc" else name
        if name in _RAY_TITLES:
            return "Ray", _RAY_TITLES[name]
        return "Ray tasks", name
    for needle, name in _DAEMONS:
        if needle in cmd:
            return "Ray", name
    if "default_worker.py" in cmd:
        return "Ray", _RAY_TITLES["IDLE"]
    m = re.search(r"(?:-m jobs\.cli|/minit2i)\s+([\w-]+)(?:\s+(sampling|schedule|import|export|merge|up|down))?", cmd)
    if m:
        return "minit2i", " ".join(filter(None, m.groups()))
    if re.search(r"(-m pytest|/pytest)( |$)", cmd) or "exec(eval(sys.stdin" in cmd:     # the main process, xdist's workers
        return "pytest", "pytest"
    if "multiprocessing" in cmd:
        return "other", "multiprocessing child"
    if cmd.startswith("["):
        return "other", "kernel threads and exiting processes"
    words = cmd.split() or ["?"]
    first = os.path.basename(words[0])
    if first.startswith("python") and len(words) > 1:
        m = re.search(r"-m ([\w.]+)", cmd)
        first = f"python -m {m.group(1)}" if m else f"python {os.path.basename(words[1])}"
    return "other", first


@dataclass
class Tally:
    cpu: dict[tuple[str, str], float] = field(default_factory=lambda: defaultdict(float))
    procs: dict[tuple[str, str], set] = field(default_factory=lambda: defaultdict(set))


def _read_procs(me: int) -> dict[tuple[int, int], tuple[float, bytes]]:
    """(pid, start tick) -> (CPU seconds, command line) of every process that can be read."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmd = f.read(400)
            if not cmd:                      # a kernel thread, or a process exiting: its name in brackets
                with open(f"/proc/{name}/comm", "rb") as f:
                    cmd = b"[" + f.read().strip() + b"]"
        except OSError:                      # exited between listdir and open
            continue
        fields = stat[stat.rindex(b")") + 2:].split()
        out[(int(name), int(fields[19]))] = ((int(fields[11]) + int(fields[12])) / TICK, cmd)
    return out


def _busy_seconds() -> float:
    """The machine's busy CPU seconds since boot (every core; idle and iowait excluded)."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:]]
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / TICK


def measure(command: list[str], interval: float = 0.5) -> tuple[int, Tally, dict]:
    """Run `command`; returns its exit status, the CPU tally by kind and the run's totals."""
    me = os.getpid()
    last = {key: cpu for key, (cpu, _) in _read_procs(me).items()}      # processes already running: only what they add
    tally, busy0, t0 = Tally(), _busy_seconds(), time.monotonic()
    proc = subprocess.Popen(command)

    def sample() -> None:
        for key, (cpu, cmd) in _read_procs(me).items():
            delta = cpu - last.get(key, 0.0)
            last[key] = cpu
            if delta > 0:
                k = kind(cmd.decode(errors="replace"))
                tally.cpu[k] += delta
                tally.procs[k].add(key)

    try:
        while proc.poll() is None:
            sample()
            time.sleep(interval)
    except KeyboardInterrupt:
        proc.wait()
    sample()
    totals = {"wall_s": time.monotonic() - t0, "busy_cpu_s": _busy_seconds() - busy0, "cores": os.cpu_count(),
              "sampled_cpu_s": sum(tally.cpu.values())}
    return proc.returncode, tally, totals


def report(tally: Tally, totals: dict, top: int = 40) -> str:
    from rich.console import Console
    from rich.table import Table

    console = Console(record=True, width=110)
    families: dict[str, list] = defaultdict(lambda: [0.0, 0])
    for (fam, _), cpu in tally.cpu.items():
        families[fam][0] += cpu
    for (fam, _), procs in tally.procs.items():
        families[fam][1] += len(procs)
    sampled = totals["sampled_cpu_s"] or 1.0
    t = Table(title="CPU by family")
    for col in ("family", "processes", "CPU-s", "share"):
        t.add_column(col, justify="left" if col == "family" else "right")
    for fam, (cpu, n) in sorted(families.items(), key=lambda kv: -kv[1][0]):
        t.add_row(fam, str(n), f"{cpu:.0f}", f"{cpu / sampled:.0%}")
    console.print(t)
    t = Table(title=f"CPU by kind (top {top})")
    for col in ("family", "kind", "processes", "CPU-s", "CPU-s each"):
        t.add_column(col, justify="left" if col in ("family", "kind") else "right")
    for (fam, k), cpu in sorted(tally.cpu.items(), key=lambda kv: -kv[1])[:top]:
        n = len(tally.procs[(fam, k)])
        t.add_row(fam, k, str(n), f"{cpu:.1f}", f"{cpu / n:.1f}")
    console.print(t)
    wall, cores = totals["wall_s"], totals["cores"] or 1
    console.print(f"wall {wall:.0f} s; sampled {totals['sampled_cpu_s']:.0f} CPU-s; the machine was busy "
                  f"{totals['busy_cpu_s']:.0f} CPU-s ({totals['busy_cpu_s'] / (wall * cores):.0%} of {cores} cores)")
    return console.export_text()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = SUITE
    if "--" in argv:
        i = argv.index("--")
        argv, command = argv[:i], argv[i + 1:] or SUITE
    p = argparse.ArgumentParser(prog="python -m benchmarks.suite_cost", description=__doc__.splitlines()[0])
    p.add_argument("--interval", type=float, default=0.5, help="seconds between samples of /proc")
    p.add_argument("--json", help="also write the tally here (kind -> CPU-s and processes, and the totals)")
    p.add_argument("--top", type=int, default=40, help="kinds in the second table")
    args = p.parse_args(argv)
    if not os.path.isdir("/proc/self"):
        print("suite_cost: needs Linux's /proc", file=sys.stderr)
        return 2
    code, tally, totals = measure(command, args.interval)
    report(tally, totals, args.top)
    if args.json:
        rows = [{"family": f, "kind": k, "cpu_s": round(c, 2), "processes": len(tally.procs[(f, k)])}
                for (f, k), c in sorted(tally.cpu.items(), key=lambda kv: -kv[1])]
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"command": command, "exit": code, **totals, "kinds": rows}, f, indent=1)
        os.replace(tmp, args.json)
    return code


if __name__ == "__main__":
    sys.exit(main())
