"""The main job: a population of organisms evolved by Ray Tune's Population Based Training.

    python -m population.run --pop 32

Read top to bottom: arguments, configuration (checked before Ray starts), seeding, Ray, the PBT
scheduler and Tuner, the run, the outputs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np

from gsnn.config import ConfigError
from population import config as run_config
from population import worker_setup

RESOLVED_CONFIG = "run_config.json"
TUNE_DIR = "tune"
TUNER_STATE = "tuner.pkl"  # Tune writes it when the Tuner is made: the run has started
# Ray's longest unix socket: <temp dir>/session_<date>_<time>_<microseconds>_<pid>/sockets/plasma_store
# (64 bytes after the temp dir with a 7-digit pid) must fit AF_UNIX's 107.
MAX_RAY_TEMP_DIR = 107 - 64
# How often every Ray process hands its metrics to the exporter: Ray's default. Each hand-over costs
# every actor CPU: at 2 s the same population ran about 5% slower (see README, Benchmarks).
METRICS_REPORT_MS = 10_000


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line (no usage block), exit 2 like a config error."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def _share(text: str):
    """A resource share flag: a number, or auto."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be auto or a number, got {text!r}") from None


def parse_args(argv=None) -> argparse.Namespace:
    p = _Parser(prog="python -m population.run", description=__doc__.splitlines()[0])
    p.add_argument("--pop", type=int, help="population size (organisms = trials = actors)")
    p.add_argument("--generations", type=int, help="generations (training iterations)")
    p.add_argument("--config", help="experiment YAML (default: tune_configs/default.yaml)")
    p.add_argument("--output", help="run directory (default: runs/<config>-<time> under the working directory)")
    p.add_argument("--address", help="join this Ray cluster: auto, HOST:PORT or ray://HOST:PORT (default, or "
                                     "local: start a local instance of our own, whatever RAY_ADDRESS says)")
    p.add_argument("--seed", type=int, help="seed of the whole run")
    p.add_argument("--resume", metavar="DIR", help="continue the interrupted run in DIR")
    p.add_argument("--cpus-per-organism", type=_share, metavar="X",
                   help="CPU share of each organism's actor, or auto (the cluster's CPUs / population, at most 1)")
    p.add_argument("--gpus-per-organism", type=_share, metavar="X",
                   help="GPU share of each organism's actor (0 for CPU), or auto (the cluster's GPUs / "
                        "population, at most 1)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any config value, e.g. --set population.worlds=8 (repeatable)")
    p.add_argument("--ray-temp-dir", metavar="DIR",
                   help=f"Ray's temporary directory for the local instance (an absolute path of at most "
                        f"{MAX_RAY_TEMP_DIR} bytes: Ray's sockets live under it)")
    return p.parse_args(argv)


def joins_cluster(args) -> bool:
    """--address names a cluster to join; without it, or with local, the run starts its own
    local instance (the embedded default: loopback, port checks, token auth)."""
    return args.address is not None and args.address != "local"


def resolve(args) -> tuple[run_config.RunConfig, Path, bool]:
    """Everything checked before Ray starts. Returns (config, run directory, resuming)."""
    for flag, value in (("--config", args.config), ("--output", args.output), ("--resume", args.resume),
                        ("--address", args.address), ("--ray-temp-dir", args.ray_temp_dir)):
        if value is not None and not value.strip():
            raise ConfigError(f"{flag}: must not be empty")
    _check_address(args.address)
    _check_ray_temp_dir(args.ray_temp_dir)
    if args.resume is not None:
        run_dir = Path(args.resume).expanduser().resolve()
        given = [flag for flag, value in (("--pop", args.pop), ("--generations", args.generations),
                 ("--config", args.config), ("--output", args.output), ("--seed", args.seed),
                 ("--set", args.set or None)) if value is not None]
        if given:
            raise ConfigError(f"--resume: continues a run as it was configured; drop {', '.join(given)}")
        saved = run_dir / RESOLVED_CONFIG
        if not saved.is_file():
            raise ConfigError(f"--resume: {run_dir} is not a population.run directory (no {RESOLVED_CONFIG})")
        data = _read_saved_config(saved)
        _apply_resource_flags(data, args)
        try:
            config = run_config.build(data, source=str(saved))
        except ConfigError as error:
            raise ConfigError(f"--resume: {saved}: {error}") from None
        # A run that never got as far as Tune is started, as it was configured.
        started = has_started(run_dir)
        _check_run_dir(run_dir, "--resume", resuming=started)
        return config, run_dir, started
    path = Path(args.config).expanduser() if args.config is not None else run_config.default_config_path()
    data = run_config.load_yaml(path)
    for key, value in (("population.size", args.pop), ("population.generations", args.generations),
                       ("population.seed", args.seed)):
        if value is not None:
            run_config.apply_override(data, key, value)
    _apply_resource_flags(data, args)
    for item in args.set:
        if "=" not in item:
            raise ConfigError(f"--set {item}: expected section.key=value")
        key, raw = item.split("=", 1)
        run_config.apply_override(data, key, run_config.parse_value(raw))
    config = run_config.build(data, source=str(path))
    if args.output is not None:
        run_dir = Path(args.output).expanduser().resolve()
    else:
        run_dir = Path.cwd() / "runs" / f"{path.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    _check_run_dir(run_dir, "--output")
    return config, run_dir, False


def has_started(run_dir: Path) -> bool:
    """Whether Tune has started the run in run_dir (the test of ``Tuner.can_restore``). A run
    directory whose run never got that far (Ray did not start, say) is not a run to resume: the
    next start with the same --output, or --resume, starts it afresh."""
    return (run_dir / TUNE_DIR / TUNER_STATE).is_file()


def check_writable_dir(path: Path, flag: str, noun: str = "directory") -> None:
    """``path`` is a directory that exists or can be made, and can be written: a ConfigError
    naming ``flag`` if it is a file, lies under one, or its nearest existing ancestor is not
    writable. An OSError on the way is left to the caller's message."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag}: {path} exists and is not a {noun}")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{flag}: cannot create {path}: {existing} is not a {noun}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag}: cannot write {path}: {existing} is not writable")


def _check_run_dir(run_dir: Path, flag: str, resuming: bool = False) -> None:
    """The run's directory: one we can create or write, and, for a new run, not holding a started one."""
    try:
        check_writable_dir(run_dir, flag)
        if not resuming and has_started(run_dir):
            raise ConfigError(f"{flag}: {run_dir} already holds a run; use --resume {run_dir} to continue it")
    except OSError as error:
        raise ConfigError(f"{flag}: cannot use {run_dir} ({error.strerror})") from None


def _read_saved_config(saved: Path) -> dict:
    try:
        data = json.loads(saved.read_text(encoding="utf-8"))
    except OSError as error:
        raise ConfigError(f"--resume: cannot read {saved} ({error.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ConfigError(f"--resume: {saved} is not valid JSON (a damaged run directory)") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--resume: {saved} must hold a mapping of sections (a damaged run directory)")
    organism = data.get("organism")
    if isinstance(organism, dict):
        # Runs before organism.seed was refused may hold one: it never took effect (each organism's
        # seed comes from the run's), so it is dropped.
        organism.pop("seed", None)
    return data


def _check_address(address: str | None) -> None:
    """The forms ray.init takes: auto, local, HOST:PORT, ray://HOST:PORT."""
    if address is None or address in ("auto", "local"):
        return
    rest = address.removeprefix("ray://")
    host, _, port = rest.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    ok = (bool(host) and not any(c.isspace() or c in "/[]" for c in host) and port.isdigit()
          and 1 <= int(port) <= 65535 and ("://" not in address or address.startswith("ray://"))
          and ("[" in rest or ":" not in host))
    if not ok:
        raise ConfigError(f"--address: must be auto, local, HOST:PORT or ray://HOST:PORT, got {address!r}")


def _check_ray_temp_dir(temp_dir: str | None) -> None:
    """Ray refuses a relative temp dir (after the run directory was made, with a traceback), and
    its unix sockets under it must fit AF_UNIX's 107 bytes."""
    if temp_dir is None:
        return
    if not os.path.isabs(os.path.expanduser(temp_dir)):
        raise ConfigError(f"--ray-temp-dir: must be an absolute path, got {temp_dir!r}")
    path = Path(os.path.expanduser(temp_dir))
    if len(str(path).encode()) > MAX_RAY_TEMP_DIR:
        raise ConfigError(f"--ray-temp-dir: must be at most {MAX_RAY_TEMP_DIR} bytes long (Ray's unix sockets "
                          f"live under it), got {len(str(path).encode())}: {temp_dir}")
    venv = os.environ.get("VIRTUAL_ENV")
    if venv and path.resolve().is_relative_to(Path(venv).resolve()):
        raise ConfigError(f"--ray-temp-dir: must not lie inside the virtualenv {venv}, got {temp_dir}")
    try:
        check_writable_dir(path, "--ray-temp-dir")
    except OSError as error:
        raise ConfigError(f"--ray-temp-dir: cannot use {temp_dir} ({error.strerror})") from None


def _apply_resource_flags(data: dict, args) -> None:
    for key, value in (("resources.cpus_per_organism", args.cpus_per_organism),
                       ("resources.gpus_per_organism", args.gpus_per_organism)):
        if value is not None:
            run_config.apply_override(data, key, value)


def start_ray(config: run_config.RunConfig, args):
    """Starts or joins Ray; returns ``ray.init``'s context (it knows the dashboard's address)."""
    import ray

    if joins_cluster(args):
        return ray.init(address=args.address, log_to_driver=True, runtime_env=worker_setup.runtime_env())
    # The embedded default: a local instance of its own (address "local": Ray would otherwise join
    # the cluster that RAY_ADDRESS or an earlier `ray start` names), with Ray's token auth (on by
    # default for a new local cluster in Ray 2.60), on loopback only when ray.loopback_only (see
    # keep_ray_on_loopback).
    return ray.init(
        address="local",
        # Without it the exporter still serves every metric (it lives in Ray's per-node agent).
        include_dashboard=config.ray.dashboard,
        dashboard_host=config.ray.dashboard_host,
        # Without the dashboard, no port: Ray test-binds a port it is given even then.
        dashboard_port=config.ray.dashboard_port if config.ray.dashboard else None,
        _node_ip_address="127.0.0.1" if config.ray.loopback_only else None,
        _metrics_export_port=config.ray.metrics_export_port,
        _system_config={"metrics_report_interval_ms": METRICS_REPORT_MS},
        _temp_dir=os.path.expanduser(args.ray_temp_dir) if args.ray_temp_dir else None,
        log_to_driver=True,
        # Each worker defers the driver's parts of Tune (about 60 MB an actor).
        runtime_env=worker_setup.runtime_env(),
    )


def check_local_instance(config: run_config.RunConfig, args) -> None:
    """The local instance's settings, checked where Ray would fail late, with a traceback: the
    dashboard's host must resolve, and with ray.loopback_only be a loopback address (refused,
    rather than one of the two settings silently winning). Its metrics port, and its dashboard
    port when ray.dashboard is on, must be free before Ray starts: Ray itself fails on a busy
    dashboard port with a long traceback, after starting its servers.
    A finished run keeps both for ``ray.metrics_linger_seconds``. Raises ConfigError."""
    if joins_cluster(args):
        return
    import ipaddress
    import socket

    host = config.ray.dashboard_host
    if config.ray.dashboard:
        try:
            addresses = {info[4][0] for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)}
        except (socket.gaierror, UnicodeError) as error:
            reason = getattr(error, "strerror", None) or str(error)
            raise ConfigError(f"ray.dashboard_host: {host!r} is not a resolvable host address ({reason}); "
                              f"use an address such as 127.0.0.1") from None
        if config.ray.loopback_only and not all(
                ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
            raise ConfigError(
                f"ray.dashboard_host: {host} is not a loopback address, but ray.loopback_only is true "
                f"(every Ray server on 127.0.0.1 only); use 127.0.0.1, or also --set ray.loopback_only=false "
                f"to let Ray listen beyond it")
    # The metrics exporter listens on every interface unless ray.loopback_only keeps it on 127.0.0.1.
    metrics_host = "127.0.0.1" if config.ray.loopback_only else "0.0.0.0"
    ports = [("metrics_export_port", metrics_host, config.ray.metrics_export_port)]
    if config.ray.dashboard:
        ports.insert(0, ("dashboard_port", host, config.ray.dashboard_port))
    for key, host, port in ports:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
            # As the servers themselves bind: a port left in TIME_WAIT by a finished run is free.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError as error:
                raise ConfigError(
                    f"ray.{key}: {host}:{port} is not free ({error.strerror}; another run, or one keeping "
                    f"its metrics up for ray.metrics_linger_seconds); choose another with "
                    f"--set ray.{key}=PORT"
                ) from None


def keep_ray_on_loopback(config: run_config.RunConfig, args) -> None:
    """With ray.loopback_only, every server of the local instance (GCS, raylet, workers, metrics
    exporter, dashboard) listens on 127.0.0.1 only. Ray binds to its node address, and by default
    replaces 127.0.0.1 with the machine's routable address; this switch (read when ray is
    imported, so it must come first) keeps the loopback one. Other machines cannot join such an
    instance; for a cluster use `ray start` and --address."""
    if joins_cluster(args) or not config.ray.loopback_only:
        return
    if "ray" in sys.modules:
        raise RuntimeError("keep_ray_on_loopback must run before ray is imported")
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"


def print_endpoints(config: run_config.RunConfig, args, context) -> None:
    dashboard = f"http://{context.dashboard_url}" if context.dashboard_url else "not running"
    if joins_cluster(args):
        print(f"Ray cluster: {args.address}  dashboard: {dashboard}", flush=True)
        return
    if not config.ray.dashboard:
        dashboard = "off (ray.dashboard: false)"
    print(f"Ray dashboard: {dashboard}  metrics for Prometheus: "
          f"http://127.0.0.1:{config.ray.metrics_export_port}/metrics", flush=True)


def organism_resources(config: run_config.RunConfig) -> dict:
    import ray

    cluster = ray.cluster_resources()
    size = config.population.size
    cpus = config.resources.cpus_per_organism
    if cpus == "auto":
        cpus = max(0.01, min(1.0, int(100 * cluster.get("CPU", 1) / size) / 100))
    gpus = config.resources.gpus_per_organism
    if gpus == "auto":
        # An organism uses one device: at most one GPU, in Ray's 0.0001 resolution (hundredths
        # would round the share of a population of more than 100 per GPU down to 0, the CPU).
        gpus = min(1.0, int(10_000 * cluster.get("GPU", 0) / size) / 10_000)
    return {"cpu": float(cpus), "gpu": float(gpus)}


def initial_values(config: run_config.RunConfig) -> list[dict]:
    """Each organism's starting value of every mutated setting, drawn from its range, seeded."""
    rng = random.Random(config.population.seed)
    values = []
    for _ in range(config.population.size):
        chosen = {}
        for name, mutation in config.mutations.items():
            if mutation.kind == "log_uniform":
                chosen[name] = run_config.log_uniform_sample(rng, *mutation.values)
            else:
                chosen[name] = rng.choice(mutation.values)
        values.append(chosen)
    return values


def build_tuner(config: run_config.RunConfig, run_dir: Path, resume: bool, printer=print):
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    from population.metrics import PopulationMetrics
    from population.report import GenerationLog
    from population.searcher import OrganismPBT, PopulationSearch
    from population.trainable import OrganismTrainable

    trainable = tune.with_resources(OrganismTrainable, organism_resources(config))
    # Ray's state API and dashboard name an actor by its class's qualified name; Tune's resource
    # wrapper is "with_resources.<locals>.ResourceTrainable". Keep the organisms recognisable.
    trainable.__qualname__ = OrganismTrainable.__qualname__
    # Tune's own per-trial results (result.json, progress.csv), without its TensorBoard logger (a
    # fifth of the driver's CPU per result; TUNE_DISABLE_AUTO_CALLBACK_LOGGERS is set in main).
    callbacks = [
        JsonLoggerCallback(),
        CSVLoggerCallback(),
        GenerationLog(str(run_dir), config.population.size, config.population.generations,
                      config.to_dict(), printer=printer),
        PopulationMetrics(run=run_dir.name),
    ]
    if resume:
        # Tune restores the run config it saved, callbacks included.
        return tune.Tuner.restore(str(run_dir / TUNE_DIR), trainable=trainable,
                                  resume_unfinished=True, resume_errored=True)
    starts = initial_values(config)
    param_space = {"run": config.to_dict(), "trial_index": tune.grid_search(list(range(config.population.size)))}
    for name in config.mutations:
        param_space[name] = tune.sample_from(lambda trial_config, name=name: starts[trial_config["trial_index"]][name])
    mutations = {
        name: (tune.loguniform(*m.values) if m.kind == "log_uniform" else list(m.values))
        for name, m in config.mutations.items()
    }
    scheduler = OrganismPBT(
        time_attr="training_iteration",
        metric="fitness",
        mode="max",
        perturbation_interval=config.pbt.perturbation_interval,
        hyperparam_mutations=mutations,
        quantile_fraction=config.pbt.quantile_fraction,
        resample_probability=config.pbt.resample_probability,
        custom_explore_fn=lambda c: run_config.clip_to_mutation(c, config.mutations),
        # Asynchronous PBT: a trial is only paused when it is exploited. (synch=True pauses every
        # trial at every perturbation, and Tune then resumes them nearly one at a time.)
        synch=False,
    )
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(search_alg=PopulationSearch(config.population.size), scheduler=scheduler,
                                    num_samples=1, reuse_actors=True),
        run_config=tune.RunConfig(
            name=TUNE_DIR,
            storage_path=str(run_dir),
            stop={"training_iteration": config.population.generations},
            # Every checkpoint is kept: asynchronous PBT may clone any trial's latest-but-N checkpoint.
            # (PBT saves a top-quantile trial itself at a perturbation, so that generation has two
            # folders; a generation after which the trial is exploited has none. See README, tune/.)
            checkpoint_config=tune.CheckpointConfig(checkpoint_frequency=1, num_to_keep=None),
            failure_config=tune.FailureConfig(max_failures=config.ray.max_failures),
            callbacks=callbacks,
            verbose=0,
        ),
    )


def resume_lost_organisms(config: run_config.RunConfig, run_dir: Path, results, printer=print):
    """Organisms whose Ray actor was lost (its node died) and that Tune ended as errored are
    resumed from their last checkpoints once the rest of the run is done, up to ray.max_failures
    times. Tune restarts a trial whose actor dies, but Ray 2.60's Tune misses a case: when the
    actor dies while Tune is handing it to a waiting trial (reuse_actors), Tune handles the
    failure twice, and the second time, finding the trial already queued again, ends it."""
    from ray.exceptions import RayActorError

    for _ in range(config.ray.max_failures):
        lost = [result for result in results if isinstance(result.error, RayActorError)]
        if not lost:
            break
        printer(f"resuming {len(lost)} organism(s) whose Ray actor was lost")
        results = build_tuner(config, run_dir, resume=True, printer=printer).fit()
    return results


def best_organism(results) -> dict | None:
    best = None
    for result in results:
        if result.metrics is None or result.checkpoint is None:
            continue
        fitness = result.metrics.get("fitness")
        if fitness is None or fitness != fitness:
            continue
        if best is None or fitness > best["fitness"]:
            best = {
                "trial_id": result.metrics.get("trial_id"),
                "fitness": fitness,
                "generation": result.metrics.get("generation"),
                "hidden_neurons": result.metrics.get("hidden_neurons"),
                "energy_per_decision_joules": result.metrics.get("energy_per_decision_joules"),
                "grow_threshold": result.metrics.get("grow_threshold"),
                "prune_threshold": result.metrics.get("prune_threshold"),
                "checkpoint": str(Path(result.checkpoint.path) / "organism.ckpt"),
            }
    return best


def reference_food(config: run_config.RunConfig) -> dict:
    from envs.policies import mean_food_per_episode
    from gsnn.train import WorldConfig

    world = WorldConfig(num_worlds=config.population.eval_worlds, obs_mode=config.world.obs_mode,
                        walls=config.world.walls)
    seed = config.population.eval_seed
    return {policy: mean_food_per_episode(world.make(seed=seed), policy, seed=seed)
            for policy in ("random", "greedy")}


def linger_for_final_scrape(seconds: float) -> None:
    """The final generation's metrics live in this driver: keep it (and a local Ray instance) up
    long enough for Ray to export them and Prometheus to scrape them. Ctrl-C ends the wait."""
    if seconds <= 0:
        return
    print(f"metrics: keeping the final values exported for {seconds:g} s "
          f"(ray.metrics_linger_seconds; Ctrl-C to stop now)", flush=True)
    import signal
    import threading

    stop = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: stop.set())  # Tune leaves its own handler
    try:
        stop.wait(seconds)
    finally:
        signal.signal(signal.SIGINT, previous)


def print_outcome(summary: dict, best: dict | None, references: dict, run_dir: Path, elapsed: float) -> None:
    from population import report

    if best:
        last = summary["generations"][-1] if summary["generations"] else None
        print(
            f"best organism: trial {best['trial_id']}  fitness {best['fitness']:.1f} food/episode "
            f"(random {references['random']:.1f}, greedy walk {references['greedy']:.1f})  "
            f"{best['hidden_neurons']} hidden neurons  "
            f"{best['energy_per_decision_joules'] * 1e9:.1f} nJ/decision"
        )
        if last:
            print(f"population mean fitness at generation {last['generation']}: {last['mean_fitness']:.1f}")
        print(f"checkpoint: {best['checkpoint']}")
    print(f"outputs: {run_dir / report.SUMMARY_FILE}, {run_dir / report.ROWS_FILE}, plots *.png  ({elapsed:.0f} s)",
          flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        config, run_dir, resume = resolve(args)
        check_local_instance(config, args)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    # Seeding: PBT's own choices use Python's and NumPy's global generators.
    random.seed(config.population.seed)
    np.random.seed(config.population.seed)
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # build_tuner names its loggers

    print(f"run directory: {run_dir}", flush=True)
    if args.resume is not None and not resume:
        print(f"{run_dir} never started (no {TUNE_DIR}/{TUNER_STATE}): starting it as {RESOLVED_CONFIG} says",
              flush=True)
    print(
        f"{'resuming' if resume else 'starting'}: {config.population.size} organisms x "
        f"{config.population.generations} generations, PBT every {config.pbt.perturbation_interval}",
        flush=True,
    )
    if config.pbt.perturbation_interval >= config.population.generations:
        # Tune stops a trial at its last generation before PBT sees that result.
        print(f"note: PBT is off in this run: pbt.perturbation_interval ({config.pbt.perturbation_interval}) "
              f"must be below population.generations ({config.population.generations}) for any exploit or "
              f"mutation", flush=True)
    if not joins_cluster(args) and os.environ.get("RAY_ADDRESS"):
        print(f"RAY_ADDRESS={os.environ['RAY_ADDRESS']} is ignored: this run starts a local Ray instance of "
              f"its own (--address auto joins that cluster)", flush=True)

    keep_ray_on_loopback(config, args)
    import ray

    from population.trainable import quiet_tune_logs

    quiet_tune_logs()
    try:
        context = start_ray(config, args)
    except (OSError, ValueError) as error:  # e.g. --address auto with no cluster to join
        ray.shutdown()
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        where = f"--address {args.address}" if joins_cluster(args) else "the local instance"
        print(f"error: Ray did not start ({where}): {reason}", file=sys.stderr)
        return 1
    try:
        # Only now the run directory: a start that fails before Ray is up leaves nothing behind.
        run_dir.mkdir(parents=True, exist_ok=True)
        if not resume:
            (run_dir / RESOLVED_CONFIG).write_text(json.dumps(config.to_dict(), indent=1))
        res = organism_resources(config)
        print_endpoints(config, args, context)
        print(f"resources per organism: {res['cpu']:g} CPU, {res['gpu']:g} GPU "
              f"(cluster: {ray.cluster_resources().get('CPU', 0):g} CPU, "
              f"{ray.cluster_resources().get('GPU', 0):g} GPU)", flush=True)
        started = time.time()

        def printer(line: str) -> None:
            print(line, flush=True)

        from population.metrics import keep_gauges_exported, refresh_interval_seconds

        # From the first result to the end of the linger, the latest values stay in Prometheus.
        with keep_gauges_exported(refresh_interval_seconds(METRICS_REPORT_MS)):
            results = build_tuner(config, run_dir, resume, printer=printer).fit()
            results = resume_lost_organisms(config, run_dir, results, printer)
            elapsed = time.time() - started
            from population import report

            rows = report.read_rows(run_dir)
            best = best_organism(results)
            references = reference_food(config)
            summary = report.write_summary(
                run_dir, config.to_dict(), rows, config.population.size, best,
                extra={"references": references, "wall_seconds": elapsed,
                       "generations_replayed": len(report.replayed_rows(run_dir)),
                       "errors": [str(r.error) for r in results if r.error is not None]},
            )
            report.write_plots(run_dir, summary["generations"])
            print_outcome(summary, best, references, run_dir, elapsed)
            linger_for_final_scrape(config.ray.metrics_linger_seconds)
    finally:
        ray.shutdown()

    errors = summary["errors"]
    if errors:
        print(f"{len(errors)} trial(s) failed; first error: {errors[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
