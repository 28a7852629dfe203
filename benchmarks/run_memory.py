"""Memory of a whole population run: the default ``python -m population.run --pop 32``, watched.

``python -m benchmarks.run_memory [--pop N] [--json PATH] [--set SECTION.KEY=VALUE ...]``
(about 4-5 minutes for the default run on the 2-core development machine)

Runs the real command (local Ray instance, default configuration unless ``--set``) and samples
every process of its tree (the driver, Ray's servers, the organism actors): every second the sum
of their RSS, which counts each shared library once per process, and the machine's MemAvailable
drop since the start; every ``PSS_EVERY`` seconds the sum of their PSS
(``/proc/PID/smaps_rollup``: shared pages divided among the processes that share them, so the
sum is what the run occupies; reading it costs the run CPU, see ``resident``). The largest
actor's RSS is its own high-water mark (``VmHWM``), not a sample. Reports the
peaks, the largest organism actor's RSS and PSS, the wall time and the run's outcome
(summary.json). Target (issue 6): the ``--pop 32`` run within 12 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks import emit

PSS_EVERY = 5  # seconds between the PSS sweeps (RSS and MemAvailable: every second)


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            parent = int(stat[stat.rindex(")") + 2:].split()[1])
            tree.setdefault(parent, []).append(int(pid))
    return tree


def descendants(root: int) -> list[int]:
    tree, found, stack = _children(), [], [root]
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack.extend(tree.get(pid, []))
    return found


def _kib(text: str, field: str) -> int:
    for line in text.splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    return 0


def _read(pids: list[int], name: str, fields: dict[str, str]) -> list[dict]:
    """For each process that still exists, the sizes named in ``/proc/PID/<name>`` (key -> its
    label there, in kB) in bytes, and whether it is an organism's actor."""
    out = []
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/{name}").read_text()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        out.append({"pid": pid, **{key: _kib(text, label) * 1024 for key, label in fields.items()},
                    "actor": "OrganismTr" in cmdline})  # ray::OrganismTrainable.*, maybe cut short
    return out


def resident(pids: list[int]) -> list[dict]:
    """RSS and peak RSS (``VmRSS``, ``VmHWM``; bytes) of each process that still exists, from
    ``/proc/PID/status``: about 0.1 ms a process, where ``sample``'s smaps_rollup walks every page
    table of the process under its memory lock (about 5 ms for a 400 MB actor: 0.12 s of CPU for
    one sweep over a pop-8 run's 27 processes)."""
    return _read(pids, "status", {"rss": "VmRSS:", "rss_peak": "VmHWM:"})


def sample(pids: list[int]) -> list[dict]:
    """RSS and PSS (bytes) of each process that still exists (costly: see ``resident``)."""
    return _read(pids, "smaps_rollup", {"rss": "Rss:", "pss": "Pss:"})


def mem_available() -> int:
    return _kib(Path("/proc/meminfo").read_text(), "MemAvailable:") * 1024


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pop", type=int, default=32)
    parser.add_argument("--json", default=None)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = parser.parse_args(argv)

    run_dir = Path(tempfile.mkdtemp(prefix="gsnn-memory-")) / "run"
    ray_dir = tempfile.mkdtemp(prefix="gsnn-ray-", dir="/tmp")
    command = [sys.executable, "-m", "population.run", "--pop", str(args.pop), "--output", str(run_dir),
               "--ray-temp-dir", ray_dir, "--set", "ray.metrics_linger_seconds=0",
               *[arg for item in args.set for arg in ("--set", item)]]
    print(f"running: {' '.join(command[1:])}", file=sys.stderr)
    baseline = mem_available()
    peak = {"rss_total": 0, "pss_total": 0, "mem_available_drop": 0, "actor_rss": 0, "actor_pss": 0,
            "processes": 0, "actors": 0}
    done = threading.Event()
    started = time.time()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def watch():
        sweeps = 0
        while not done.is_set():
            procs = resident(descendants(process.pid))
            actors = [p for p in procs if p["actor"]]
            values = {"rss_total": sum(p["rss"] for p in procs), "mem_available_drop": baseline - mem_available(),
                      "actor_rss": max((p["rss_peak"] for p in actors), default=0),
                      "processes": len(procs), "actors": len(actors)}
            if sweeps % PSS_EVERY == 0:  # PSS costs the run CPU (see resident): less often
                procs = sample([p["pid"] for p in procs])
                values["pss_total"] = sum(p["pss"] for p in procs)
                values["actor_pss"] = max((p["pss"] for p in procs if p["actor"]), default=0)
            for key, value in values.items():
                peak[key] = max(peak[key], value)
            sweeps += 1
            done.wait(1.0)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    output = []
    for line in process.stdout:  # the run's progress, passed through
        output.append(line)
        if line.startswith(("generation", "best organism", "population mean")):
            print(line, end="", file=sys.stderr, flush=True)
    process.wait()
    wall = time.time() - started
    done.set()
    watcher.join()
    shutil.rmtree(ray_dir, ignore_errors=True)
    if process.returncode != 0:
        print("".join(output[-40:]), file=sys.stderr)
        return process.returncode
    summary = json.loads((run_dir / "summary.json").read_text())
    last = summary["generations"][-1]
    size = sum(f.stat().st_size for f in run_dir.rglob("*") if f.is_file())
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(["python", *command[1:]]),
        "wall_seconds": wall,
        "peak_pss_total_bytes": peak["pss_total"],
        "peak_rss_total_bytes": peak["rss_total"],
        "peak_mem_available_drop_bytes": peak["mem_available_drop"],
        "peak_actor_rss_bytes": peak["actor_rss"],
        "peak_actor_pss_bytes": peak["actor_pss"],
        "peak_processes": peak["processes"],
        "peak_actor_processes": peak["actors"],
        "target_total_bytes": 12 * 10**9,
        "best": summary["best"],
        "final_generation": last,
        "references": summary.get("references"),
        "run_dir_bytes": size,
        "run_dir": str(run_dir),
    }
    gib = 2**30
    print(f"{args.pop} organisms: {wall / 60:.1f} min | peak memory: PSS sum {peak['pss_total'] / gib:.2f} GiB, "
          f"MemAvailable drop {peak['mem_available_drop'] / gib:.2f} GiB, RSS sum {peak['rss_total'] / gib:.2f} GiB "
          f"| actor RSS {peak['actor_rss'] / 2**20:.0f} MiB, PSS {peak['actor_pss'] / 2**20:.0f} MiB "
          f"| best {summary['best']['fitness']:.1f}, mean {last['mean_fitness']:.1f} food/episode")
    emit(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
