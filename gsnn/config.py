"""The organism's configuration: one dataclass, every field with its unit and allowed range.

Interval fields count *decision steps*: one step is one decision for every world of the batch
(so one 500-step episode of a batch is 500 decision steps, whatever the batch size).
"""

from __future__ import annotations

import dataclasses
import decimal
import math
from dataclasses import dataclass, field
from typing import Any

LEARNING_RULES = ("reinforce", "rstdp")
FLOAT32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type, or out of range. The message is one
    line that names the field and what is allowed."""


@dataclass(frozen=True)
class Bound:
    kind: type
    low: float | None = None
    high: float | None = None
    choices: tuple | None = None

    def describe(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        if self.kind is bool:
            return "true or false"
        name = "an integer" if self.kind is int else "a number"
        if self.low is not None and self.high is not None:
            return f"{name} in [{self.low}, {self.high}]"
        if self.low is not None:
            return f"{name} >= {self.low}"
        return name

    def check(self, name: str, value: Any) -> Any:
        def refuse():
            raise ConfigError(f"{name}: must be {self.describe()}, got {value!r}")

        if self.choices is not None:
            if value not in self.choices:
                refuse()
            return value
        if self.kind is bool:
            if not isinstance(value, bool):
                refuse()
            return value
        number = value
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string
            number = self._parse(value)
            if number is None:
                refuse()
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            refuse()
        if isinstance(number, float):
            if not math.isfinite(number) or (self.kind is int and not number.is_integer()):
                refuse()
        if (self.low is not None and number < self.low) or (self.high is not None and number > self.high):
            refuse()
        if self.kind is int:
            return int(number)  # exact: an int stays itself, an integral float converts exactly
        try:
            return float(number)
        except OverflowError:  # an int beyond any float
            refuse()

    def _parse(self, text: str) -> int | float | None:
        """A number written as a string: integers exactly (an integer field's "12345678901234567"
        must not pass through a float), None if it is not a number."""
        if self.kind is not int:
            try:
                return float(text)
            except ValueError:
                return None
        try:
            number = decimal.Decimal(text.strip())
        except decimal.InvalidOperation:
            return None
        if not number.is_finite() or number != number.to_integral_value():
            return None
        if number.adjusted() > 40:  # far outside every range: never build a huge int
            return math.inf
        return int(number)


def bounded(default, kind, low=None, high=None, choices=None, doc=""):
    return field(default=default, metadata={"bound": Bound(kind, low, high, choices), "doc": doc})


@dataclass
class OrganismConfig:
    # Shape
    n_inputs: int = bounded(450, int, 1, 100_000, doc="input cells (2 x 15 x 15)")
    n_actions: int = bounded(4, int, 2, 64, doc="action logits")
    init_hidden: int = bounded(64, int, 1, 16_384, doc="hidden LIF neurons at birth")
    min_hidden: int = bounded(32, int, 1, 16_384, doc="pruning never goes below this")
    max_hidden: int = bounded(512, int, 1, 16_384, doc="growth never goes above this")
    # Growth and pruning
    grow_threshold: float = bounded(0.05, float, 0.0, 1.0, doc="grow when mean rate (spikes/step) < this")
    prune_threshold: float = bounded(0.005, float, 0.0, 1.0, doc="prune neurons whose rate < this")
    neurons_per_grow: int = bounded(32, int, 1, 16_384, doc="neurons added per growth event")
    grow_interval: int = bounded(500, int, 1, 10**9, doc="decision steps between growth checks")
    prune_interval: int = bounded(500, int, 1, 10**9, doc="decision steps between prune checks")
    prune_grace: int = bounded(1000, int, 0, 10**9, doc="decision steps a newborn neuron is safe from pruning")
    rate_window: int = bounded(200, int, 1, 10**9, doc="EMA window of firing rates, in decision steps")
    # Neurons (Norse's LIF, Norse's units)
    snn_steps: int = bounded(10, int, 1, 1000, doc="SNN steps T per decision")
    dt: float = bounded(0.001, float, 1e-6, 0.1, doc="integration step, seconds")
    tau_syn_inv: float = bounded(200.0, float, 1e-3, 1e6, doc="1/tau_syn, 1/s")
    tau_mem_inv: float = bounded(100.0, float, 1e-3, 1e6, doc="1/tau_mem, 1/s")
    v_th: float = bounded(1.0, float, doc="threshold potential")
    v_leak: float = bounded(0.0, float, doc="leak potential")
    v_reset: float = bounded(0.0, float, doc="reset potential")
    surrogate_alpha: float = bounded(100.0, float, 1e-3, 1e6, doc="SuperSpike surrogate sharpness")
    # Initial weights
    input_weight_std: float = bounded(0.05, float, 0.0, 100.0, doc="std of input weights at birth")
    hidden_bias_init: float = bounded(0.1, float, -100.0, 100.0, doc="hidden bias current at birth")
    readout_weight_std: float = bounded(0.01, float, 0.0, 100.0, doc="std of readout weights at birth")
    # Learning
    learning_rule: str = bounded("reinforce", str, choices=LEARNING_RULES, doc="within-lifetime rule")
    learning_rate: float = bounded(1e-3, float, 1e-7, 1.0, doc="Adam step size")
    discount: float = bounded(0.9, float, 0.0, 0.999, doc="return discount per decision")
    rollout_length: int = bounded(16, int, 1, 10_000, doc="decisions per update")
    entropy_coef: float = bounded(0.01, float, 0.0, 10.0, doc="entropy bonus (REINFORCE)")
    grad_clip: float = bounded(1.0, float, 1e-6, 1e6, doc="global norm clip of each update")
    stdp_trace_decay: float = bounded(0.8, float, 0.0, 0.999, doc="STDP trace decay per SNN step")
    stdp_depression: float = bounded(0.5, float, 0.0, 10.0, doc="STDP depression / potentiation ratio")
    max_nonfinite_updates: int = bounded(3, int, 0, 1000, doc="consecutive non-finite updates skipped before raising")
    seed: int = bounded(0, int, 0, 2**63 - 1, doc="the organism's own random stream")

    def __post_init__(self):
        self.validate()

    def validate(self) -> "OrganismConfig":
        for f in dataclasses.fields(self):
            setattr(self, f.name, f.metadata["bound"].check(f.name, getattr(self, f.name)))
        if not self.min_hidden <= self.init_hidden <= self.max_hidden:
            raise ConfigError(
                "init_hidden: must lie in [min_hidden, max_hidden] = "
                f"[{self.min_hidden}, {self.max_hidden}], got {self.init_hidden}"
            )
        for rate in ("tau_mem_inv", "tau_syn_inv"):
            # The LIF step (gsnn.neurons) decays v and i by the factor 1 - dt * rate each step:
            # beyond 1 that factor turns negative (the state overshoots and flips sign every step)
            # and from 2 on it grows without bound until v and i are Inf and then NaN.
            value = getattr(self, rate)
            if self.dt * value > 1.0:
                raise ConfigError(
                    f"dt, {rate}: dt * {rate} must be <= 1 (the Euler step of the LIF update overshoots "
                    f"beyond 1 and diverges from 2), got {self.dt} * {value} = {self.dt * value:g}"
                )
        for potential in ("v_th", "v_leak", "v_reset"):
            value = getattr(self, potential)
            if abs(value) > FLOAT32_MAX:  # the LIF step computes in float32: it would be Inf
                raise ConfigError(f"{potential}: must be a number in [-{FLOAT32_MAX:g}, {FLOAT32_MAX:g}] "
                                  f"(float32), got {value!r}")
        if self.prune_threshold > self.grow_threshold:
            raise ConfigError(
                f"prune_threshold: must be <= grow_threshold ({self.grow_threshold}), "
                f"got {self.prune_threshold}"
            )
        return self

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "") -> "OrganismConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        for key in values:
            if key not in known:
                raise ConfigError(f"{where}{key}: unknown organism setting (known: {', '.join(sorted(known))})")
        try:
            return cls(**values)
        except ConfigError as error:
            raise ConfigError(f"{where}{error}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def describe_fields() -> list[tuple[str, Any, str, str]]:
        """(name, default, allowed, meaning) for every field: the README's table comes from this."""
        return [
            (f.name, f.default, f.metadata["bound"].describe(), f.metadata["doc"])
            for f in dataclasses.fields(OrganismConfig)
        ]
