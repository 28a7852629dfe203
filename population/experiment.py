"""The hypothesis experiment: does a growing (and pruning) spiking network beat a fixed one?

    python -m population.experiment --config tune_configs/hypothesis.yaml

Arms, several seeds each, on the same worlds and evaluation seeds, all through Ray:
fixed_max (512 neurons, no growth or pruning), fixed_start (64), grow (64 -> 512, no pruning),
grow_prune (default thresholds), grow_prune_pbt (thresholds evolved by population.run's PBT) and
ppo (RLlib PPO with a small MLP, a dense ANN), plus the random and greedy-walk references. Each
organism then learns through the seasons of the seasonal world (continual learning). The
results land in ``docs/results.md`` (tables, verdict, plots) and ``docs/results.json``.

Read top to bottom: arguments, configuration (checked before Ray starts), Ray, the runs (Ray
tasks for the single-organism arms and PPO, one Tune PBT run per seed for the evolved arm), the
outputs.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import shlex
import shutil
import socket
import sys
import time
from pathlib import Path

import numpy as np

from gsnn.config import ConfigError
from population import config as run_config
from population import experiment_config as xc
from population import run as population_run
from population import worker_setup

BUDGETS_HELP = "named budget from the config's budgets section: smoke (for the tests), quick (~10 min), default (~30-50 min on 2 cores)"


def parse_args(argv=None) -> argparse.Namespace:
    # population.run's parser: argparse's errors as one line (no usage block), exit 2.
    p = population_run._Parser(prog="python -m population.experiment", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="experiment YAML (default: tune_configs/hypothesis.yaml)")
    p.add_argument("--budget", default="default", help=BUDGETS_HELP)
    p.add_argument("--seeds", type=int, help="seeds per arm (overrides experiment.seeds)")
    p.add_argument("--arms", help="comma-separated arms (overrides experiment.arms): " + ",".join(xc.ALL_ARMS))
    p.add_argument("--results", default="docs", help="where results.md, results.json and the plots go (default: docs)")
    p.add_argument("--workdir", help="run folder for the PBT runs, made when that arm runs (default: "
                                     "runs/hypothesis-<time>); must be new or empty")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any config value, e.g. --set experiment.episodes=20 (repeatable)")
    p.add_argument("--address", help="join this Ray cluster (HOST:PORT, ray://HOST:PORT or auto) instead of "
                                     "starting a local instance on 127.0.0.1")
    p.add_argument("--ray-temp-dir", help="Ray's temporary directory for the local instance")
    return p.parse_args(argv)


def resolve(args) -> tuple[xc.ExperimentConfig, Path, Path]:
    """Everything checked before Ray starts. Returns (config, results folder, work folder).
    Nothing is created here: the results folder is made when the results are written, the work
    folder when the PBT arm starts."""
    for flag, value in (("--config", args.config), ("--results", args.results), ("--workdir", args.workdir),
                        ("--address", args.address), ("--ray-temp-dir", args.ray_temp_dir)):
        if value is not None and not value.strip():
            raise ConfigError(f"{flag}: must not be empty")
    population_run._check_address(args.address)
    population_run._check_ray_temp_dir(args.ray_temp_dir)
    overrides = []
    if args.seeds is not None:
        overrides.append(("experiment.seeds", args.seeds))
    if args.arms is not None:
        overrides.append(("experiment.arms", args.arms))
    for item in args.set:
        if "=" not in item:
            raise ConfigError(f"--set {item}: expected section.key=value")
        key, raw = item.split("=", 1)
        overrides.append((key, run_config.parse_value(raw)))
    config = xc.load(args.config, args.budget, overrides)
    results = Path(args.results).expanduser().resolve()
    _check_folder(results, "--results")
    workdir = Path(args.workdir).expanduser().resolve() if args.workdir is not None else (
        Path.cwd() / "runs" / f"hypothesis-{time.strftime('%Y%m%d-%H%M%S')}")
    if args.workdir is not None or xc.PBT_ARM in config.experiment.arms:
        _check_folder(workdir, "--workdir", empty=True)
    return config, results, workdir


def _check_folder(path: Path, flag: str, empty: bool = False) -> None:
    """A folder the experiment can make (or has) and write; with ``empty``, one holding nothing."""
    try:
        population_run.check_writable_dir(path, flag, noun="folder")
        if empty and path.is_dir() and any(path.iterdir()):
            raise ConfigError(f"{flag}: {path} is not empty (choose a new or empty folder)")
    except OSError as error:
        raise ConfigError(f"{flag}: cannot use {path} ({error.strerror})") from None


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[-1] if text else ''}"


class LoadSampler:
    """Samples the 1-minute load average every 15 s in a daemon thread, so the results can say
    whether other work shared the machine."""

    def __init__(self, every: float = 15.0):
        import threading

        self.samples: list[float] = []
        self._stop = threading.Event()
        self._every = every
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while True:
            try:
                self.samples.append(os.getloadavg()[0])
            except (AttributeError, OSError):
                return
            if self._stop.wait(self._every):
                return

    def stop(self) -> float:
        self._stop.set()
        self._thread.join(timeout=1)
        return sum(self.samples) / len(self.samples) if self.samples else float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def machine() -> dict:
    import ray
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        memory = float("nan")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "cores": cores, "memory_gb": memory, "python": platform.python_version(),
            "torch": torch.__version__.split("+")[0], "ray": ray.__version__, "platform": platform.platform()}


def reference_food(config: xc.ExperimentConfig) -> dict:
    """Random and greedy-walk food on the final evaluation worlds (the ones the table uses)."""
    from envs.policies import mean_food_per_episode
    from gsnn.train import WorldConfig

    e = config.experiment
    world = WorldConfig(num_worlds=e.final_eval_worlds, obs_mode=config.world.obs_mode, walls=config.world.walls)
    return {policy: mean_food_per_episode(world.make(seed=e.final_eval_seed), policy, seed=e.final_eval_seed)
            for policy in ("random", "greedy")}


# -- the runs ------------------------------------------------------------------------------------------
def remote_functions():
    import ray

    @ray.remote(num_cpus=1, max_retries=1)
    def organism_task(arm, seed, settings, organism_settings, continual_phase):
        from population.arms import organism_lifetime

        return organism_lifetime(arm, seed, settings, organism_settings, continual_phase,
                                 printer=lambda line: print(line, flush=True))

    @ray.remote(num_cpus=1, max_retries=1)
    def evolved_task(checkpoint, seed, settings, continual_phase):
        from population.arms import evolved_organism_phase

        return evolved_organism_phase(checkpoint, seed, settings, continual_phase,
                                      printer=lambda line: print(line, flush=True))

    @ray.remote(num_cpus=1, max_retries=1)
    def ppo_task(seed, settings):
        from population.ppo_baseline import ppo_lifetime

        e = settings["experiment"]
        return ppo_lifetime(
            settings["ppo"], settings["world"], seed,
            total_steps=e["episodes"] * xc.EPISODE_STEPS * e["worlds"], eval_every_steps=e["eval_every"] * xc.EPISODE_STEPS * e["worlds"],
            eval_worlds=e["eval_worlds"], eval_seed=e["eval_seed"], final_eval_worlds=e["final_eval_worlds"],
            final_eval_seed=e["final_eval_seed"], printer=lambda line: print(line, flush=True),
        )

    return organism_task, evolved_task, ppo_task


def run_pbt_seed(config: xc.ExperimentConfig, seed: int, workdir: Path, say) -> dict:
    """One PBT population (population.run's own Tune set-up) for one seed; returns its curve
    (best organism per generation), the best organism's checkpoint and the wall time."""
    from population import report
    from population.run import best_organism, build_tuner

    pbt_config = config.pbt_run_config(seed)
    run_dir = workdir / f"pbt-seed{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    tuner = build_tuner(pbt_config, run_dir, resume=False,
                        printer=lambda line: say(f"[grow_prune_pbt seed {seed}] {line}"))
    results = tuner.fit()
    wall = time.time() - start
    errors = [str(r.error) for r in results if r.error is not None]
    best = best_organism(results)
    rows = report.read_rows(run_dir)
    generations = report.generation_summaries(rows, pbt_config.population.size)
    report.write_summary(run_dir, pbt_config.to_dict(), rows, pbt_config.population.size, best,
                         extra={"wall_seconds": wall, "errors": errors})
    per_generation = (pbt_config.population.episodes_per_generation * xc.EPISODE_STEPS * pbt_config.population.worlds
                      * pbt_config.population.size)
    curve = [{"env_steps": g["generation"] * per_generation, "fitness": g["best_fitness"],
              "mean_fitness": g["mean_fitness"], "hidden_neurons": g["mean_hidden_neurons"],
              "energy_per_decision_joules": g["mean_energy_per_decision_joules"]} for g in generations]
    if best is None:
        raise RuntimeError(f"PBT seed {seed}: no organism finished" + (f" ({errors[0]})" if errors else ""))
    return {"curve": curve, "best": best, "wall_s": wall, "errors": errors, "run_dir": str(run_dir),
            "env_steps": pbt_config.population.generations * per_generation,
            "generations": pbt_config.population.generations}


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        config, results_dir, workdir = resolve(args)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    command = "python -m population.experiment " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    started = time.time()
    load = LoadSampler()
    random.seed(0)
    np.random.seed(0)
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # every progress line, even when two look alike
    e = config.experiment
    arms = list(e.arms)
    continual_arms = set(config.continual.arms) & set(arms)
    print(f"experiment: arms {', '.join(arms)}; {e.seeds} seed(s); budget {config.budget}: {e.episodes} episodes x "
          f"{e.worlds} worlds = {config.env_steps_per_organism:,} env steps per organism; seasons for "
          f"{', '.join(a for a in arms if a in continual_arms) or 'none'}", flush=True)
    print(f"results: {results_dir}" + (f"; work folder: {workdir}" if xc.PBT_ARM in arms else ""), flush=True)

    local = not population_run.joins_cluster(args)
    if local:  # every server of the local instance on 127.0.0.1, as population.run's default
        if "ray" in sys.modules:
            raise RuntimeError("the loopback switch must be set before ray is imported")
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

    import ray

    from population.trainable import quiet_tune_logs

    quiet_tune_logs()
    try:
        if not local:
            ray.init(address=args.address, log_to_driver=True, runtime_env=worker_setup.runtime_env())
        else:
            # address "local": a local instance of its own, never the cluster RAY_ADDRESS names
            ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1",
                     _metrics_export_port=free_port(),
                     _temp_dir=os.path.expanduser(args.ray_temp_dir) if args.ray_temp_dir else None,
                     log_to_driver=True, runtime_env=worker_setup.runtime_env())
    except (OSError, ValueError) as error:  # e.g. --address auto with no cluster to join, as population.run
        ray.shutdown()
        load.stop()
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        print(f"error: Ray did not start ({f'--address {args.address}' if not local else 'the local instance'}): "
              f"{reason}", file=sys.stderr)
        return 1
    say = lambda line: print(line, flush=True)  # noqa: E731
    runs: dict[str, list] = {arm: [None] * e.seeds for arm in arms}
    pbt_runs, failures = {}, []
    try:
        settings = config.to_dict()  # what the workers get: plain data
        references = reference_food(config)
        say(f"references on the final evaluation worlds: random {references['random']:.1f}, "
            f"greedy walk {references['greedy']:.1f} food per episode")
        organism_task, evolved_task, ppo_task = remote_functions()
        pending = {}
        # Longest first, so the two cores finish together.
        if xc.PPO_ARM in arms:
            for seed in config.seeds:
                pending[ppo_task.remote(seed, settings)] = (xc.PPO_ARM, seed)
        for arm in [a for a in arms if a not in (xc.PPO_ARM, xc.PBT_ARM)]:
            for seed in config.seeds:
                ref = organism_task.remote(arm, seed, settings, config.arm_organism(arm), arm in continual_arms)
                pending[ref] = (arm, seed)
        total = len(pending) + (e.seeds if xc.PBT_ARM in arms else 0)
        finished = 0

        def collect():
            """Wait for every pending run; print a line as each one ends. A run that fails is
            reported and left out; the others go on."""
            nonlocal finished
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                arm, seed = pending.pop(ready[0])
                finished += 1
                try:
                    result = ray.get(ready[0])
                except Exception as error:  # noqa: BLE001 - one failed seed must not lose the others
                    failures.append(f"{arm} seed {seed}: {_one_line(error)}")
                    say(f"FAILED {finished}/{total}: {failures[-1]}")
                    continue
                if arm == xc.PBT_ARM:
                    result = dict(pbt_runs[seed], **result)
                runs[arm][seed] = result
                f = result["final"]
                say(f"done {finished}/{total}: {arm} seed {seed}  fitness {f['fitness']:.1f}  hidden "
                    f"{f['hidden_neurons']:.0f}  {f['energy_per_decision_joules'] * 1e9:.1f} nJ/decision  "
                    f"[{time.time() - started:.0f} s]")

        collect()
        if xc.PBT_ARM in arms:
            for seed in config.seeds:
                say(f"[grow_prune_pbt seed {seed}] PBT: {config.pbt.population} organisms")
                try:
                    pbt_runs[seed] = run_pbt_seed(config, seed, workdir, say)
                except Exception as error:  # noqa: BLE001
                    finished += 1
                    failures.append(f"{xc.PBT_ARM} seed {seed}: {_one_line(error)}")
                    say(f"FAILED {finished}/{total}: {failures[-1]}")
                    continue
                ref = evolved_task.remote(pbt_runs[seed]["best"]["checkpoint"], seed, settings,
                                          xc.PBT_ARM in continual_arms)
                pending[ref] = (xc.PBT_ARM, seed)
            collect()
            if not config.pbt.keep_checkpoints:
                for seed, run in pbt_runs.items():
                    shutil.rmtree(Path(run["run_dir"]) / "tune", ignore_errors=True)
    finally:
        ray.shutdown()

    runs = {arm: [r for r in seed_runs if r is not None] for arm, seed_runs in runs.items()}
    runs = {arm: seed_runs for arm, seed_runs in runs.items() if seed_runs}
    if not runs:
        print(f"error: every run failed; first: {failures[0]}", file=sys.stderr)
        return 1
    from population import results

    wall = time.time() - started
    host = machine()
    host["mean_load_average"] = load.stop()
    if host["mean_load_average"] > host["cores"] + 1:
        host["note"] = (f"Other work shared the machine: the 1-minute load average was {host['mean_load_average']:.1f} "
                        f"on average during the run (this experiment alone keeps it near {host['cores']}), so wall "
                        f"times are inflated.")
    meta = {"command": command, "date": time.strftime("%Y-%m-%d %H:%M %Z"), "machine": host,
            "wall_seconds": wall, "env_steps_per_organism": config.env_steps_per_organism,
            "workdir": str(workdir) if xc.PBT_ARM in arms else None, "failures": failures}
    data = results.write_results(results_dir, meta, config.to_dict(), runs, references)
    say("")
    say(results.markdown_table(results.TABLE_COLUMNS, results.table_rows(data["summary"])))
    if data["continual"]:
        say("")
        say(results.markdown_table(results.CONTINUAL_COLUMNS, results.continual_rows(data["continual"])))
    say("")
    for line in data["statements"]:
        say(line)
    say(f"outputs: {results_dir / 'results.md'}, {results_dir / 'results.json'}, plots  ({wall / 60:.1f} min)")
    if failures:
        print(f"{len(failures)} run(s) failed and are left out of the results; first: {failures[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
