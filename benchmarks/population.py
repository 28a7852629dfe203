"""Population throughput through Ray and Tune against the same organisms run one after another.

``python -m benchmarks.population [--pop N] [--generations G] [--episodes E] [--json PATH]
[--set SECTION.KEY=VALUE ...]`` (defaults: 8 organisms of 256 neurons, 12 generations; about 7
minutes on the 2-core development machine). ``--set organism.KEY=VALUE`` changes the organisms on
every side (for example ``organism.init_hidden=1024 organism.max_hidden=1024``); other sections
only the Ray run's configuration.

Both sides do the same work per organism and generation: learn ``episodes_per_generation``
episodes in ``worlds`` worlds, then evaluate on ``eval_worlds`` worlds (what
``population.trainable.OrganismTrainable.step`` does); the defaults are tune_configs/default.yaml's.
The population side is a real ``population.run`` (local Ray, Tune, PBT, checkpoints, the CSV
and metrics callbacks, the dashboard), run a second time without Ray's dashboard
(``ray.dashboard: false``; not when ``--set`` chooses it). The sequential side runs the organisms
in this process on one core, half of them before each Ray run and the other half after it (the
halves alternate), so each Ray run is compared with all the organisms run right around it (this
machine's speed drifts by 10% and more within minutes; the bracket weighs the drift on both sides
alike, exactly so with an even ``--pop``). Each Ray run is timed from the first to the last
generation result so Ray's start-up is not counted; every generation an organism computed counts,
those it computed again after PBT handed it a checkpoint from behind its own generation included
(the run's replayed_generations.csv). Speed-up = population decisions/s over sequential
decisions/s; ideal = min(pop, cores). Target (issues 3 and 6): at least 85% of the ideal speed-up.
Beside them, the machine's own ceiling: the same organisms split over one plain process per core
(no Ray), started together once they have imported torch.

Also reported: the share of each organism's generation wall time (end of one generation to the
end of the next) that is neither its learning, its evaluation nor its wait for a compute slot:
Tune's step and result handling, the checkpoint, PBT (target, issue 6: at most 10%); the CPU share
of the organisms' own compute (the rest of that time the driver, Ray's servers or other actors
had the core); how much more CPU the same generation's compute took than in the single process;
the actors' own CPU between generations; the compute slots' use; and the peak RSS of the actors.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from benchmarks import emit
from benchmarks.run_memory import descendants, resident
from gsnn.config import OrganismConfig
from gsnn.organism import Organism
from gsnn.train import WorldConfig, evaluate, live
from population import config as run_config


# Organisms of one fixed size on both sides, so every generation costs the same wherever PBT's
# exploits move an organism (they may skip it ahead by generations).
FIXED_SIZE = {"init_hidden": 256, "max_hidden": 256, "grow_threshold": 0.0, "prune_threshold": 0.0}


def sequential(pop: int, generations: int, worlds: int, episodes: int, eval_worlds: int,
               overrides: dict | None = None, organisms: range | None = None) -> dict:
    """The organisms ``organisms`` (default all ``pop``) one after another in this process, with
    OrganismConfig ``overrides`` over FIXED_SIZE (the command's ``--set organism.KEY=VALUE``)."""
    torch.set_num_threads(1)
    settings = {**FIXED_SIZE, **(overrides or {})}
    world = WorldConfig(num_worlds=worlds)
    decisions = 0
    start = time.perf_counter()
    for index in organisms if organisms is not None else range(pop):
        organism = Organism(OrganismConfig(seed=index, **settings))
        env = world.make(seed=index)
        obs = None
        for generation in range(1, generations + 1):
            obs, _ = live(organism, env, episodes * world.max_steps, obs)
            evaluate(organism, world.make(seed=0, num_worlds=eval_worlds), seed=100_000 + generation)
            decisions += (worlds * episodes + eval_worlds) * world.max_steps
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "decisions": decisions, "decisions_per_second": decisions / seconds}


def _plain_worker(work: tuple, overrides: dict, organisms: list[int], ready, go, out) -> None:
    ready.put(os.getpid())
    go.wait()
    out.put(sequential(*work, overrides=overrides, organisms=organisms)["decisions"])


def plain_processes(pop: int, generations: int, worlds: int, episodes: int, eval_worlds: int,
                    processes: int, overrides: dict | None = None) -> dict:
    """The same organisms split over ``processes`` plain Python processes (no Ray, no Tune), timed
    from a common start once every process has imported torch: what this machine's cores give
    when nothing but the organisms runs (memory bandwidth, shared caches, a host's own limits)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    ready, out, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    work = (pop, generations, worlds, episodes, eval_worlds)
    workers = [ctx.Process(target=_plain_worker,
                           args=(work, overrides or {}, list(range(k, pop, processes)), ready, go, out))
               for k in range(processes)]
    for w in workers:
        w.start()
    for _ in workers:
        ready.get(timeout=300)
    start = time.perf_counter()
    go.set()
    decisions = sum(out.get(timeout=3600) for _ in workers)
    seconds = time.perf_counter() - start
    for w in workers:
        w.join(60)
    return {"seconds": seconds, "decisions": decisions, "decisions_per_second": decisions / seconds,
            "processes": processes}


def through_ray(pop: int, generations: int, worlds: int, episodes: int, eval_worlds: int,
                extra: tuple[str, ...] = ()) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix="gsnn-bench-")) / "run"
    ray_dir = tempfile.mkdtemp(prefix="gsnn-ray-", dir="/tmp")
    command = [
        sys.executable, "-m", "population.run", "--pop", str(pop), "--generations", str(generations),
        "--output", str(run_dir), "--ray-temp-dir", ray_dir,
        "--set", f"population.worlds={worlds}", "--set", f"population.episodes_per_generation={episodes}",
        "--set", f"population.eval_worlds={eval_worlds}",
        # The same organisms as on the sequential side: PBT runs, but mutates nothing that
        # changes the work (Tune requires at least one mutation).
        "--set", "pbt.mutations={weight_noise: {choice: [0.0]}}",
        *[arg for key, value in FIXED_SIZE.items() for arg in ("--set", f"organism.{key}={value}")],
        *[arg for item in extra for arg in ("--set", item)],
    ]
    peak: dict[str, int] = {"max": 0, "total": 0}
    done = threading.Event()

    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def watch():
        while not done.is_set():
            # /proc/PID/status, not smaps_rollup: a sweep of smaps took 0.12 s of CPU from the
            # run it measures, every second (run_memory.resident)
            actors = [p for p in resident(descendants(process.pid)) if p["actor"]]
            if actors:
                peak["max"] = max(peak["max"], max(p["rss_peak"] for p in actors))
                peak["total"] = max(peak["total"], sum(p["rss"] for p in actors))
            done.wait(1.0)

    sampler = threading.Thread(target=watch, daemon=True)
    sampler.start()
    stdout, stderr = process.communicate()
    done.set()
    sampler.join()
    shutil.rmtree(ray_dir, ignore_errors=True)
    if process.returncode != 0:
        raise RuntimeError(f"population.run failed:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    # Every generation an organism computed is a row of the run's CSV, or of its replayed
    # generations when PBT later handed the organism a checkpoint from behind that generation and
    # it computed the generation again (rows a trial inherited from the organism PBT copied into
    # it were not computed by it and are left out).
    from population.report import read_rows, replayed_rows

    kept = [r for r in read_rows(run_dir).values() if not r["inherited_from"]]
    replayed = replayed_rows(run_dir)
    rows = kept + replayed
    finished = [float(r["finished_at"]) for r in rows]
    started = [float(r["finished_at"]) - float(r["time_this_iter_s"]) for r in rows]
    first, last = min(started), max(finished)
    decisions = len(rows) * (worlds * episodes + eval_worlds) * 500
    # A generation's wall time, per organism: from the end of its previous generation to the end of
    # this one (the first generation of a trial and one right after an exploit are left out). The
    # part that was neither learning, evaluating nor waiting for a compute slot (while another
    # organism computed) is the system's: Tune's step and result handling, the checkpoint, PBT.
    by_trial: dict[str, list[dict]] = {}
    for r in kept:
        by_trial.setdefault(r["trial_id"], []).append(r)
    overhead = []
    for trial_rows in by_trial.values():
        trial_rows.sort(key=lambda r: int(r["generation"]))
        for previous, r in zip(trial_rows, trial_rows[1:]):
            if int(r["generation"]) != int(previous["generation"]) + 1 or r["exploited_from"]:
                continue
            interval = float(r["finished_at"]) - float(previous["finished_at"])
            organism = float(r["learn_seconds"]) + float(r["eval_seconds"]) + float(r["slot_wait_seconds"])
            overhead.append(max(0.0, 1.0 - organism / interval))
    busy = sum(float(r["learn_seconds"]) + float(r["eval_seconds"]) for r in rows)
    between = [float(r["between_process_cpu_seconds"]) for r in rows if float(r["between_process_cpu_seconds"]) > 0]
    compute_cpu = sum(float(r["compute_cpu_seconds"]) for r in rows)
    return {
        "seconds": last - first,
        "decisions": decisions,
        "decisions_per_second": decisions / (last - first),
        "generations_computed": len(rows),
        "generations_replayed": len(replayed),
        "non_organism_share_median": statistics.median(overhead) if overhead else None,
        "non_organism_share_mean": statistics.fmean(overhead) if overhead else None,
        "slot_utilisation": busy / ((last - first) * min(pop, os.cpu_count() or 1)),
        # CPU time of the organisms' own compute over its wall time: the rest of that time other
        # processes (the Tune driver, Ray's servers, actors between generations) had the core.
        "compute_cpu_share": compute_cpu / busy,
        # An actor's CPU (all its threads) from the end of one generation's compute to the start
        # of the next: Tune's step and result, the checkpoint, Ray's task handling; per generation.
        "actor_cpu_between_generations_median_seconds": statistics.median(between) if between else None,
        "compute_cpu_seconds_per_generation": compute_cpu / len(rows),
        # Ray actor processes that computed generations: one per organism when exploits reuse
        # the exploited organism's actor (population/searcher.py)
        "actor_processes": len({r["actor_pid"] for r in rows if r.get("actor_pid")}),
        "exploits": sum(1 for r in rows if r["exploited_from"]),
        "actor_rss_peak_bytes": peak["max"],
        "actors_rss_total_peak_bytes": peak["total"],
        "run_dir": str(run_dir),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # Defaults: the per-generation work of tune_configs/default.yaml.
    default = run_config.build(run_config.load_yaml(run_config.default_config_path())).population
    parser.add_argument("--pop", type=int, default=8)
    parser.add_argument("--generations", type=int, default=12)
    parser.add_argument("--worlds", type=int, default=default.worlds)
    parser.add_argument("--episodes", type=int, default=default.episodes_per_generation)
    parser.add_argument("--eval-worlds", type=int, default=default.eval_worlds)
    parser.add_argument("--json", default=None)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="extra population.run override, e.g. pbt.quantile_fraction=0.01; organism.* ones "
                             "apply to the single process and the plain processes too")
    args = parser.parse_args(argv)
    # organism.* settings apply to every side (the same organisms everywhere), the rest to the run.
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        if key.startswith("organism."):
            overrides[key.removeprefix("organism.")] = run_config.parse_value(value)
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(OrganismConfig)})
    if unknown:
        parser.error(f"--set organism.{unknown[0]}: no such organism setting")
    try:
        OrganismConfig(**{**FIXED_SIZE, **overrides})  # checked on construction
    except ValueError as error:
        parser.error(f"--set organism.*: {error}")
    if args.pop < 2:
        parser.error(f"--pop: must be at least 2 (half of the organisms run on each side of a Ray run), got {args.pop}")
    cores = os.cpu_count() or 1
    work = (args.pop, args.generations, args.worlds, args.episodes, args.eval_worlds)
    # The Ray runs: as population.run runs by default (with Ray's dashboard), then again without
    # the dashboard (ray.dashboard: false; its processes share the organisms' cores), unless --set
    # chose one.
    runs = [("population", tuple(args.set))]
    if not any(item.startswith("ray.dashboard=") for item in args.set):
        runs.append(("population_without_dashboard", (*args.set, "ray.dashboard=false")))
    # The sequential side runs half of the organisms before each Ray run and the other half after
    # it (the halves alternate: first, second, first, ...), so each Ray run is compared with all
    # the organisms, run right around it: a machine whose speed drifts over minutes (a shared
    # host) weighs on both sides alike.
    halves = (range(0, args.pop // 2), range(args.pop // 2, args.pop))
    parts, measured = [], {}

    def run_part(k: int) -> None:
        organisms = halves[k % 2]
        print(f"sequential: organisms {organisms.start}-{organisms.stop - 1} of {args.pop}, "
              f"{args.generations} generations, one process ...", file=sys.stderr)
        parts.append({**sequential(*work, overrides=overrides, organisms=organisms), "organisms": len(organisms)})

    run_part(0)
    for k, (key, extra) in enumerate(runs):
        label = " without the dashboard" if key == "population_without_dashboard" else ""
        print(f"population.run: all {args.pop} through Ray and Tune on {cores} cores{label} ...", file=sys.stderr)
        measured[key] = through_ray(*work, extra=extra)
        run_part(k + 1)
    ideal = min(args.pop, cores)
    print(f"plain processes: all {args.pop} in {ideal} processes without Ray ...", file=sys.stderr)
    plain = plain_processes(*work, processes=ideal, overrides=overrides)

    def combined(chosen: list[dict]) -> dict:
        seconds = sum(p["seconds"] for p in chosen)
        decisions = sum(p["decisions"] for p in chosen)
        return {"seconds": seconds, "decisions": decisions, "decisions_per_second": decisions / seconds,
                "organisms": sum(p["organisms"] for p in chosen)}

    # Each Ray run against the two parts around it.
    around = {key: combined(parts[k:k + 2]) for k, (key, _) in enumerate(runs)}
    ray_side, first = measured["population"], around["population"]
    speedup = ray_side["decisions_per_second"] / first["decisions_per_second"]
    # The plain processes run last, after every part (not bracketed): against the last two parts,
    # all the organisms, the nearest in time.
    plain_speedup = plain["decisions_per_second"] / combined(parts[-2:])["decisions_per_second"]
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "cores": cores,
        "torch": torch.__version__,
        "settings": dict(zip(("pop", "generations", "worlds", "episodes", "eval_worlds"), work), extra=args.set),
        # Each part's organisms, seconds and decisions, in the order run.
        "sequential_parts": parts,
        "speedup": speedup,
        "ideal_speedup": ideal,
        "target_fraction_of_ideal": 0.85,
        # The machine's own ceiling, without Ray: plain processes, one per core.
        "plain_processes": plain,
        "plain_fraction_of_ideal": plain_speedup / ideal,
        "population_over_plain": ray_side["decisions_per_second"] / plain["decisions_per_second"],
        # The same generation's compute takes this much more CPU in the population than in one
        # process (preempted by Ray's threads and the other actors, cache refills, alternation).
        "compute_cpu_over_sequential": ray_side["compute_cpu_seconds_per_generation"]
        / (first["seconds"] / (first["organisms"] * args.generations)),
    }
    # population, sequential_around_population, fraction_of_ideal; the same with
    # _without_dashboard for the second run
    for key, result in measured.items():
        report[key] = result
        report[f"sequential_around_{key}"] = around[key]
        report["fraction_of_ideal" + key.removeprefix("population")] = (
            result["decisions_per_second"] / around[key]["decisions_per_second"] / ideal)
    without = ("" if "population_without_dashboard" not in measured else
               f"; without the dashboard {100 * report['fraction_of_ideal_without_dashboard']:.0f}%")
    print(
        f"sequential {first['decisions_per_second']:,.0f} decisions/s | population "
        f"{ray_side['decisions_per_second']:,.0f} decisions/s | speed-up {speedup:.2f} of ideal {ideal} "
        f"({100 * speedup / ideal:.0f}%{without}; plain processes {100 * plain_speedup / ideal:.0f}%) | non-organism share of a generation {100 * ray_side['non_organism_share_median']:.1f}% "
        f"| CPU share of organism compute {ray_side['compute_cpu_share']:.2f} "
        f"| {ray_side['actor_processes']} actor processes, {ray_side['exploits']} exploits "
        f"| actor RSS peak {ray_side['actor_rss_peak_bytes'] / 2**20:.0f} MiB"
    )
    emit(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
