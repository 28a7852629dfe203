"""The run's configuration: a YAML file from ``tune_configs/`` plus CLI overrides, checked whole
before Ray starts. Any problem is a ``ConfigError`` whose message is one line naming the field
(as ``section.key``) and what is allowed."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import re
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from envs.rules import OBSERVATION_MODES, WALL_ENCODINGS
from gsnn.config import Bound, ConfigError, OrganismConfig, bounded

DEFAULT_CONFIG = "default.yaml"
# Settings PBT may mutate: every OrganismConfig field, plus the weight-level explore scale.
EXTRA_MUTABLE = {"weight_noise": Bound(float, 0.0, 10.0)}
# Mutated organism settings are checked together: every combination of their candidate values
# (each choice's values, each log_uniform range's bounds) must make a valid organism. At most:
MAX_COMBINATIONS = 16_384


@dataclasses.dataclass
class PopulationSettings:
    size: int = bounded(32, int, 2, 100_000)
    generations: int = bounded(12, int, 1, 100_000)
    episodes_per_generation: int = bounded(8, int, 1, 100_000)
    worlds: int = bounded(16, int, 1, 65_536)
    eval_worlds: int = bounded(32, int, 1, 65_536)
    eval_seed: int = bounded(100_000, int, 0, 2**62)
    seed: int = bounded(0, int, 0, 2**31 - 1)


@dataclasses.dataclass
class WorldSettings:
    obs_mode: str = bounded("egocentric", str, choices=OBSERVATION_MODES)
    walls: str = bounded("border", str, choices=WALL_ENCODINGS)


@dataclasses.dataclass
class PBTSettings:
    perturbation_interval: int = bounded(2, int, 1, 100_000)
    quantile_fraction: float = bounded(0.25, float, 0.01, 0.5)
    resample_probability: float = bounded(0.25, float, 0.0, 1.0)


@dataclasses.dataclass
class RaySettings:
    dashboard: bool = True
    dashboard_host: str = "127.0.0.1"
    dashboard_port: int = bounded(8265, int, 1024, 65535)
    metrics_export_port: int = bounded(8090, int, 1024, 65535)
    loopback_only: bool = True
    metrics_linger_seconds: float = bounded(30.0, float, 0.0, 3600.0)
    max_failures: int = bounded(3, int, 0, 1000)


@dataclasses.dataclass
class ResourceSettings:
    cpus_per_organism: Any = "auto"
    gpus_per_organism: Any = "auto"
    compute_slots: Any = "auto"
    torch_threads: int = bounded(1, int, 1, 256)


@dataclasses.dataclass
class Mutation:
    """One mutated setting: ``log_uniform: [low, high]`` or ``choice: [a, b, ...]``."""

    name: str
    kind: str
    values: list

    def describe(self) -> dict:
        return {self.kind: list(self.values)}


@dataclasses.dataclass
class RunConfig:
    population: PopulationSettings
    world: WorldSettings
    organism: dict  # OrganismConfig fields given in the file (defaults fill the rest)
    pbt: PBTSettings
    mutations: dict[str, Mutation]
    resources: ResourceSettings
    ray: RaySettings
    source: str = ""

    def to_dict(self) -> dict:
        return {
            "population": dataclasses.asdict(self.population),
            "world": dataclasses.asdict(self.world),
            "organism": dict(self.organism),
            "pbt": dict(dataclasses.asdict(self.pbt), mutations={k: m.describe() for k, m in self.mutations.items()}),
            "resources": dataclasses.asdict(self.resources),
            "ray": dataclasses.asdict(self.ray),
        }


SECTIONS = {
    "population": PopulationSettings,
    "world": WorldSettings,
    "pbt": PBTSettings,
    "resources": ResourceSettings,
    "ray": RaySettings,
}


def default_config_path() -> Path:
    return Path(str(resources.files("tune_configs").joinpath(DEFAULT_CONFIG)))


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"--config: {path} is a directory, not a YAML file")
    if not path.is_file():
        raise ConfigError(f"--config: no such file {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ConfigError(f"--config: cannot read {path} ({error.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"--config: {path} is not UTF-8 text (a YAML file is)") from None
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f" line {where.line + 1}" if where else ""
        raise ConfigError(f"--config: {path}{line} is not valid YAML") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config: {path} must hold a mapping of sections")
    return data


def apply_override(data: dict, dotted: str, value: Any) -> None:
    """Set ``section.key`` (or ``pbt.mutations.name``) in the raw config mapping."""
    parts = dotted.split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"--set {dotted}: expected section.key=value")
    node = data
    for part in parts[:-1]:
        if node.get(part) is None:  # absent, or an empty section (`resources:` alone)
            node[part] = {}
        child = node[part]
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def parse_value(raw: str) -> Any:
    """A CLI value as YAML would read it (numbers, booleans, lists, strings)."""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def build(data: dict, source: str = "") -> RunConfig:
    data = copy.deepcopy(data)
    known = set(SECTIONS) | {"organism"}
    for section in data:
        if section not in known:
            raise ConfigError(f"{section}: unknown section (known: {', '.join(sorted(known))})")
    for section, value in data.items():
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"{section}: must be a mapping of settings (key: value lines), got {_short(value)}")
    settings = {}
    for section, cls in SECTIONS.items():
        raw = dict(data.get(section) or {})
        if section == "pbt":
            raw.pop("mutations", None)
        settings[section] = build_section(section, cls, raw)
    organism_raw = data.get("organism") or {}
    if "seed" in organism_raw:
        raise ConfigError("organism.seed: not settable; each organism's seed comes from the run's seed "
                          "(population.seed, or --seed)")
    checked = OrganismConfig.from_dict(organism_raw, where="organism.").to_dict()  # names, types, ranges
    organism_raw = {key: checked[key] for key in organism_raw}  # as converted (e.g. "1e-3" -> 0.001)
    mutations = _build_mutations((data.get("pbt") or {}).get("mutations") or {}, organism_raw)
    _check_resources(settings["resources"])
    _check_ray(settings["ray"])
    config = RunConfig(
        population=settings["population"], world=settings["world"], organism=dict(organism_raw),
        pbt=settings["pbt"], mutations=mutations, resources=settings["resources"], ray=settings["ray"],
        source=source,
    )
    return config


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def build_section(section: str, cls, raw) -> Any:
    """One YAML section as the dataclass ``cls``: unknown keys refused, bounded fields checked."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{section}: must be a mapping")
    names = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in raw.items():
        if key not in names:
            raise ConfigError(f"{section}.{key}: unknown setting (known: {', '.join(sorted(names))})")
        bound = names[key].metadata.get("bound")
        values[key] = bound.check(f"{section}.{key}", value) if bound else value
    return cls(**values)


def _check_ray(ray: RaySettings) -> None:
    if not isinstance(ray.dashboard, bool):
        raise ConfigError(f"ray.dashboard: must be true or false, got {ray.dashboard!r}")
    host = ray.dashboard_host
    if not isinstance(host, str) or not host.strip() or any(c.isspace() for c in host):
        raise ConfigError(f"ray.dashboard_host: must be a host address such as 127.0.0.1, got {host!r}")
    if not isinstance(ray.loopback_only, bool):
        raise ConfigError(f"ray.loopback_only: must be true or false, got {ray.loopback_only!r}")
    if ray.dashboard and ray.dashboard_port == ray.metrics_export_port:
        raise ConfigError(f"ray.metrics_export_port: must differ from ray.dashboard_port ({ray.dashboard_port})")


def _check_resources(res: ResourceSettings) -> None:
    slots = res.compute_slots
    if slots != "auto" and (isinstance(slots, bool) or not isinstance(slots, int) or not 0 <= slots <= 4096):
        raise ConfigError(f"resources.compute_slots: must be 'auto' or an integer in [0, 4096], got {slots!r}")
    for name, high in (("cpus_per_organism", 64.0), ("gpus_per_organism", 1.0)):
        value = getattr(res, name)
        if value == "auto":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 <= value <= high) or (
            name == "cpus_per_organism" and value <= 0
        ):
            low = "(0" if name == "cpus_per_organism" else "[0"
            raise ConfigError(f"resources.{name}: must be 'auto' or a number in {low}, {high:g}], got {value!r}")


def _build_mutations(raw: dict, organism_raw: dict) -> dict[str, Mutation]:
    if not isinstance(raw, dict):
        raise ConfigError("pbt.mutations: must be a mapping of setting -> {log_uniform|choice: [...]}")
    organism_fields = {f.name: f.metadata["bound"] for f in dataclasses.fields(OrganismConfig)}
    mutations = {}
    for name, spec in raw.items():
        where = f"pbt.mutations.{name}"
        bound = organism_fields.get(name) or EXTRA_MUTABLE.get(name)
        if bound is None or name in ("seed", "n_inputs", "n_actions"):
            raise ConfigError(f"{where}: not a setting PBT can mutate")
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in ("log_uniform", "choice"):
            raise ConfigError(f"{where}: must be {{log_uniform: [low, high]}} or {{choice: [a, b, ...]}}")
        kind, values = next(iter(spec.items()))
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}.{kind}: must be a non-empty list")
        values = [bound.check(where, v) for v in values]
        if kind == "log_uniform":
            if bound.kind is not float or len(values) != 2 or not 0 < values[0] < values[1]:
                raise ConfigError(f"{where}.log_uniform: must be [low, high] with 0 < low < high, for a real-valued setting")
        mutations[name] = Mutation(name, kind, values)
    # Impossible combinations. The threshold ranges must not cross...
    grow, prune = mutations.get("grow_threshold"), mutations.get("prune_threshold")
    fixed = OrganismConfig.from_dict(organism_raw)
    grow_low = min(grow.values) if grow else fixed.grow_threshold
    prune_high = max(prune.values) if prune else fixed.prune_threshold
    if prune_high > grow_low:
        raise ConfigError(
            f"pbt.mutations.prune_threshold: its highest value ({prune_high}) must not exceed the lowest "
            f"grow_threshold ({grow_low}), or an organism could prune more eagerly than it grows"
        )
    # ...and every organism PBT could make must be valid with the fixed settings.
    _check_combinations({n: m for n, m in mutations.items() if n in organism_fields}, organism_raw)
    return mutations


def _candidates(mutation: Mutation, every_choice: bool) -> list:
    """The values of one mutated setting that bound what PBT can give an organism: a range's
    bounds (PBT clips to them, clip_to_mutation), a choice's values (or, of numbers, the smallest
    and largest: the organism's cross-field rules are inequalities)."""
    values = list(dict.fromkeys(mutation.values))
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    if mutation.kind == "log_uniform" or (numeric and not every_choice):
        return sorted({min(values), max(values)})
    return values


def _check_combinations(mutations: dict[str, Mutation], organism_raw: dict) -> None:
    """Every combination of the mutated organism settings' candidate values, with the fixed
    settings, must make a valid organism (OrganismConfig's cross-field rules): else one line
    naming the mutations whose values clash."""
    names = list(mutations)
    candidates = {n: _candidates(mutations[n], every_choice=True) for n in names}
    if math.prod(len(v) for v in candidates.values()) > MAX_COMBINATIONS:
        candidates = {n: _candidates(mutations[n], every_choice=False) for n in names}
    total = math.prod(len(v) for v in candidates.values())
    if total > MAX_COMBINATIONS:
        raise ConfigError(f"pbt.mutations: {len(names)} mutated organism settings make {total} combinations to "
                          f"check; at most {MAX_COMBINATIONS} (mutate fewer settings)")
    for combination in itertools.product(*(candidates[n] for n in names)):
        values = dict(zip(names, combination))
        try:
            OrganismConfig.from_dict(dict(organism_raw, **values))
        except ConfigError as error:
            message = str(error)
            # The mutated settings that the organism's complaint names (else all of them).
            named = [n for n in names if re.search(rf"\b{re.escape(n)}\b", message)] or names
            lead = next((n for n in named if message.startswith(f"{n}:")), named[0])
            others = ", ".join(f"{n}={values[n]!r}" for n in named if n != lead)
            together = f" with {others}" if others else ""
            raise ConfigError(f"pbt.mutations.{lead}: value {values[lead]!r}{together} makes an invalid "
                              f"organism ({message})") from None


def clip_to_mutation(config: dict, mutations: dict[str, Mutation]) -> dict:
    """PBT multiplies real values by 0.8 or 1.2 without bounds: keep them in their ranges."""
    for name, mutation in mutations.items():
        if mutation.kind == "log_uniform" and name in config:
            low, high = mutation.values
            config[name] = float(min(max(config[name], low), high))
    return config


def log_uniform_sample(rng, low: float, high: float) -> float:
    return float(math.exp(rng.uniform(math.log(low), math.log(high))))
