"""The hypothesis experiment's configuration: ``tune_configs/hypothesis.yaml``, a named budget
from its ``budgets`` section, then ``--set`` overrides, checked whole before Ray starts. Every
problem is a ``ConfigError`` with a one-line message naming the field as ``section.key``."""

from __future__ import annotations

import copy
import dataclasses
from importlib import resources
from pathlib import Path
from typing import Any

from envs.rules import GRID_SIZE, N_ACTIONS, N_CHANNELS, N_SEASONS, OBSERVATION_MODES, WALL_ENCODINGS
from gsnn.config import ConfigError, OrganismConfig, bounded
from population import config as run_config

DEFAULT_CONFIG = "hypothesis.yaml"
EPISODE_STEPS = 500  # decision steps per episode (gsnn.train.WorldConfig.max_steps)
# What the world gives an organism and takes from it (every obs_mode and walls): an organism
# setting that differs would fail in every Ray worker, after the experiment started.
WORLD_SHAPE = {"n_inputs": (N_CHANNELS * GRID_SIZE * GRID_SIZE, f"{N_CHANNELS} x {GRID_SIZE} x {GRID_SIZE} "
                            f"observation values"), "n_actions": (N_ACTIONS, "actions")}
# The arms, in the order of the table. Organism arms are configured in the `arms` section;
# grow_prune_pbt is an organism arm evolved by population.run's PBT; ppo is RLlib's PPO.
ORGANISM_ARMS = ("fixed_max", "fixed_start", "grow", "grow_prune", "grow_prune_pbt")
PBT_ARM = "grow_prune_pbt"
PPO_ARM = "ppo"
ALL_ARMS = ORGANISM_ARMS + (PPO_ARM,)
ARM_TITLES = {
    "fixed_max": "fixed, max size",
    "fixed_start": "fixed, start size",
    "grow": "growing, no pruning",
    "grow_prune": "growing + pruning (default thresholds)",
    "grow_prune_pbt": "growing + pruning (PBT-evolved thresholds)",
    "ppo": "PPO, dense MLP (RLlib)",
}


@dataclasses.dataclass
class ExperimentSettings:
    seeds: int = bounded(3, int, 1, 1000)
    arms: Any = ALL_ARMS
    episodes: int = bounded(60, int, 1, 100_000)
    worlds: int = bounded(16, int, 1, 65_536)
    eval_every: int = bounded(5, int, 1, 100_000)
    eval_worlds: int = bounded(32, int, 1, 65_536)
    final_eval_worlds: int = bounded(128, int, 1, 65_536)
    eval_seed: int = bounded(200_000, int, 0, 2**62)
    final_eval_seed: int = bounded(300_000, int, 0, 2**62)
    target_fraction: float = bounded(0.5, float, 0.01, 1.0)
    torch_threads: int = bounded(1, int, 1, 256)


@dataclasses.dataclass
class WorldSettings:
    obs_mode: str = bounded("egocentric", str, choices=OBSERVATION_MODES)
    walls: str = bounded("border", str, choices=WALL_ENCODINGS)


@dataclasses.dataclass
class PBTArmSettings:
    population: int = bounded(4, int, 2, 1000)
    episodes_per_generation: int = bounded(5, int, 1, 100_000)
    perturbation_interval: int = bounded(2, int, 1, 100_000)
    quantile_fraction: float = bounded(0.25, float, 0.01, 0.5)
    resample_probability: float = bounded(0.25, float, 0.0, 1.0)
    eval_worlds: int = bounded(32, int, 1, 65_536)
    eval_seed: int = bounded(250_000, int, 0, 2**62)
    mutations: Any = None
    keep_checkpoints: bool = bounded(False, bool)


@dataclasses.dataclass
class PPOSettings:
    hidden: Any = (64, 64)
    activation: str = bounded("tanh", str, choices=("tanh", "relu"))
    lr: float = bounded(5e-4, float, 1e-7, 1.0)
    gamma: float = bounded(0.9, float, 0.0, 0.9999)
    lambda_: float = bounded(0.95, float, 0.0, 1.0)
    entropy_coeff: float = bounded(0.01, float, 0.0, 10.0)
    train_batch: int = bounded(2000, int, 16, 10_000_000)
    minibatch: int = bounded(128, int, 8, 10_000_000)
    epochs: int = bounded(8, int, 1, 1000)
    envs_per_runner: int = bounded(8, int, 1, 1024)


@dataclasses.dataclass
class ContinualSettings:
    seasons: Any = (0, 1, 2, 3)
    episodes_per_season: int = bounded(10, int, 1, 100_000)
    eval_worlds: int = bounded(32, int, 1, 65_536)
    eval_seed: int = bounded(400_000, int, 0, 2**62)
    learn_seed: int = bounded(500_000, int, 0, 2**62)
    arms: Any = ORGANISM_ARMS


SECTIONS = {
    "experiment": ExperimentSettings,
    "world": WorldSettings,
    "pbt": PBTArmSettings,
    "ppo": PPOSettings,
    "continual": ContinualSettings,
}
OTHER_SECTIONS = ("organism", "arms", "budgets")


@dataclasses.dataclass
class ExperimentConfig:
    experiment: ExperimentSettings
    world: WorldSettings
    organism: dict  # the base organism settings of every organism arm
    arms: dict  # organism arm -> its own organism settings (over the base)
    pbt: PBTArmSettings
    ppo: PPOSettings
    continual: ContinualSettings
    budget: str
    budget_overrides: dict
    source: str = ""

    def arm_organism(self, arm: str) -> dict:
        return dict(self.organism, **self.arms.get(arm, {}))

    @property
    def seeds(self) -> list[int]:
        return list(range(self.experiment.seeds))

    @property
    def env_steps_per_organism(self) -> int:
        return self.experiment.episodes * EPISODE_STEPS * self.experiment.worlds

    def to_dict(self) -> dict:
        out = {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}
        out["experiment"]["arms"] = list(self.experiment.arms)
        out["continual"]["seasons"] = list(self.continual.seasons)
        out["continual"]["arms"] = list(self.continual.arms)
        out["ppo"]["hidden"] = list(self.ppo.hidden)
        out["organism"] = dict(self.organism)
        out["arms"] = {k: dict(v) for k, v in self.arms.items()}
        out["budget"] = self.budget
        out["budget_overrides"] = dict(self.budget_overrides)
        return out

    def pbt_run_config(self, seed: int) -> run_config.RunConfig:
        """The population.run configuration of the PBT arm for one seed."""
        return run_config.build(self.pbt_run_data(seed), source=self.source)

    def pbt_run_data(self, seed: int) -> dict:
        p, e = self.pbt, self.experiment
        generations = max(1, e.episodes // p.episodes_per_generation)
        return {
            "population": {"size": p.population, "generations": generations,
                           "episodes_per_generation": p.episodes_per_generation, "worlds": e.worlds,
                           "eval_worlds": p.eval_worlds, "eval_seed": p.eval_seed, "seed": seed},
            "world": dataclasses.asdict(self.world),
            "organism": self.arm_organism(PBT_ARM),
            "pbt": {"perturbation_interval": p.perturbation_interval, "quantile_fraction": p.quantile_fraction,
                    "resample_probability": p.resample_probability, "mutations": copy.deepcopy(p.mutations or {})},
            "resources": {"torch_threads": e.torch_threads},
        }


def default_config_path() -> Path:
    return Path(str(resources.files("tune_configs").joinpath(DEFAULT_CONFIG)))


def load(path: str | Path | None, budget: str, overrides: list[tuple[str, Any]]) -> ExperimentConfig:
    """Read the YAML, apply the budget's overrides and then ``overrides`` ((dotted key, value)
    pairs), and check everything."""
    path = Path(path).expanduser() if path is not None else default_config_path()
    data = run_config.load_yaml(path)
    budgets = data.get("budgets") or {}
    if not isinstance(budgets, dict) or not all(isinstance(v, dict) or v is None for v in budgets.values()):
        raise ConfigError("budgets: must map a budget name to {section.key: value} overrides")
    budgets = {str(name): values for name, values in budgets.items()}  # --budget is text (YAML may say 1:)
    if budget not in budgets:
        raise ConfigError(f"--budget: must be one of {', '.join(sorted(budgets)) or '(none defined)'}, got {budget!r}")
    chosen = dict(budgets[budget] or {})
    for key, value in chosen.items():
        _override(data, str(key), value, where=f"budgets.{budget}.{key}")
    for key, value in overrides:
        _override(data, key, value, where=f"--set {key}")
    return build(data, budget, chosen, source=str(path))


def _override(data: dict, dotted: str, value: Any, where: str) -> None:
    parts = dotted.split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"{where}: expected section.key")
    if parts[0] not in SECTIONS and parts[0] not in ("organism", "arms"):
        raise ConfigError(f"{where}: unknown section {parts[0]} (known: {', '.join(sorted(set(SECTIONS) | {'organism', 'arms'}))})")
    run_config.apply_override(data, dotted, value)


def build(data: dict, budget: str = "default", budget_overrides: dict | None = None, source: str = "") -> ExperimentConfig:
    data = copy.deepcopy(data)
    for section in data:
        if section not in SECTIONS and section not in OTHER_SECTIONS:
            known = sorted(set(SECTIONS) | set(OTHER_SECTIONS))
            raise ConfigError(f"{section}: unknown section (known: {', '.join(known)})")
    for section, value in data.items():
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"{section}: must be a mapping of settings (key: value lines), "
                              f"got {run_config._short(value)}")
    settings = {name: run_config.build_section(name, cls, data.get(name) or {}) for name, cls in SECTIONS.items()}
    e, c = settings["experiment"], settings["continual"]
    e.arms = tuple(_arm_list("experiment.arms", e.arms, ALL_ARMS))
    c.arms = tuple(_arm_list("continual.arms", c.arms, ORGANISM_ARMS, allow_empty=True))
    c.seasons = tuple(_seasons(c.seasons))
    settings["ppo"].hidden = tuple(_int_list("ppo.hidden", settings["ppo"].hidden, 1, 65_536))
    if e.eval_every > e.episodes:
        raise ConfigError(f"experiment.eval_every: must be at most experiment.episodes ({e.episodes}), "
                          f"got {e.eval_every} (the learning curve would have no point before the end)")
    if settings["ppo"].minibatch > settings["ppo"].train_batch:
        raise ConfigError(f"ppo.minibatch: must be <= ppo.train_batch ({settings['ppo'].train_batch}), "
                          f"got {settings['ppo'].minibatch}")

    organism = data.get("organism") or {}
    _check_organism(organism, organism, "organism.")
    arms = data.get("arms") or {}
    for arm, values in arms.items():
        if arm not in ORGANISM_ARMS:
            raise ConfigError(f"arms.{arm}: not an organism arm (known: {', '.join(ORGANISM_ARMS)})")
        if values is not None and not isinstance(values, dict):
            raise ConfigError(f"arms.{arm}: must be a mapping of organism settings, got {run_config._short(values)}")
        _check_organism(values or {}, dict(organism, **(values or {})), f"arms.{arm}.")
    arms = {arm: dict(values or {}) for arm, values in arms.items()}

    config = ExperimentConfig(
        experiment=e, world=settings["world"], organism=dict(organism), arms=arms, pbt=settings["pbt"],
        ppo=settings["ppo"], continual=c, budget=budget, budget_overrides=dict(budget_overrides or {}),
        source=source,
    )
    if PBT_ARM in e.arms and e.episodes % config.pbt.episodes_per_generation:
        raise ConfigError(f"pbt.episodes_per_generation: must divide experiment.episodes ({e.episodes}), "
                          f"got {config.pbt.episodes_per_generation}")
    try:
        # The PBT arm's population.run configuration, checked whole (pbt.mutations among it), even
        # when that arm does not run: a mistake in the file is one whatever --arms says.
        config.pbt_run_config(0)
    except ConfigError as error:
        message = str(error)
        raise ConfigError(message if message.startswith("pbt.") else f"pbt: {message}") from None
    steps = config.env_steps_per_organism
    if PPO_ARM in e.arms and config.ppo.train_batch > steps:
        raise ConfigError(f"ppo.train_batch: must be at most the env steps per organism ({steps:,} = "
                          f"experiment.episodes x {EPISODE_STEPS} x experiment.worlds), got {config.ppo.train_batch}")
    return config


def _check_organism(given: dict, settings: dict, where: str) -> None:
    """One organism arm's settings (``settings``, of which ``given`` were written at ``where``):
    OrganismConfig's names, types, ranges and cross-field rules, and what the experiment sets
    itself: each organism's seed (its seed number) and the world's shape."""
    if "seed" in given:
        raise ConfigError(f"{where}seed: not settable; each organism's seed is its seed number "
                          f"(0 .. experiment.seeds - 1, the same for every arm)")
    organism = OrganismConfig.from_dict(settings, where=where)
    for name, (value, what) in WORLD_SHAPE.items():
        if getattr(organism, name) != value:
            raise ConfigError(f"{where}{name}: must be {value} (the world's {what}), got {getattr(organism, name)!r}")


def _arm_list(where: str, value: Any, known: tuple, allow_empty: bool = False) -> list[str]:
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, (list, tuple)) or (not value and not allow_empty):
        raise ConfigError(f"{where}: must be a non-empty list of arms from {', '.join(known)}")
    for arm in value:
        if arm not in known:
            raise ConfigError(f"{where}: unknown arm {arm!r} (known: {', '.join(known)})")
    if len(set(value)) != len(value):
        raise ConfigError(f"{where}: an arm is listed twice")
    return [arm for arm in known if arm in value]  # the table's order


def _seasons(value: Any) -> list[int]:
    seasons = _int_list("continual.seasons", value, 0, N_SEASONS - 1)
    if len(seasons) < 2:
        raise ConfigError(f"continual.seasons: must list at least 2 seasons, got {list(seasons)}")
    if len(set(seasons)) != len(seasons):
        raise ConfigError("continual.seasons: a season is listed twice")
    return seasons


def _int_list(where: str, value: Any, low: int, high: int) -> list[int]:
    if not isinstance(value, (list, tuple)) or not value or any(
        isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high for v in value
    ):
        raise ConfigError(f"{where}: must be a non-empty list of integers in [{low}, {high}], got {value!r}")
    return list(value)
