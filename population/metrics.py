"""Live metrics of a population, exported through Ray's Prometheus exporter.

``PopulationMetrics`` is a Tune callback on the driver. Every organism's generation result becomes
Ray metrics (``ray.util.metrics``), one series per organism (tag ``trial_id``), plus population
aggregates over every organism's latest result. Ray exports each metric as ``ray_<name>``, so a
gauge ``gsnn_fitness`` is scraped as ``ray_gsnn_fitness`` and a counter ``gsnn_growth_events`` as
``ray_gsnn_growth_events_total``. Names use base units (joules, seconds).

The shipped Grafana dashboard (``docker/grafana/dashboards/gsnn.json``) queries exactly these
names; ``tests/test_monitoring.py`` evaluates every panel against a real Prometheus.
"""

from __future__ import annotations

import math

from ray import tune
from ray.util.metrics import Counter, Gauge

TAGS = ("trial_id", "run")

# Per-organism gauges: metric name -> (result key, description).
ORGANISM_GAUGES = {
    "gsnn_fitness": ("fitness", "Mean food eaten per evaluation episode (held-out worlds)"),
    "gsnn_energy_per_decision_joules": ("energy_per_decision_joules", "Estimated energy per decision"),
    "gsnn_synops_per_decision": ("synops_per_decision", "Synaptic operations per decision"),
    "gsnn_hidden_neurons": ("hidden_neurons", "Hidden LIF neurons"),
    "gsnn_firing_rate": ("mean_firing_rate", "Mean hidden firing rate, spikes per neuron per SNN step"),
    "gsnn_grow_threshold": ("grow_threshold", "Grow when the mean firing rate is below this"),
    "gsnn_prune_threshold": ("prune_threshold", "Prune neurons whose firing rate is below this"),
    "gsnn_learning_rate": ("learning_rate", "Learning rate"),
    "gsnn_generation": ("generation", "Generations completed"),
    "gsnn_decisions_per_second": ("decisions_per_second", "Learning decisions per second (one organism)"),
}

# Per-organism counters: metric name -> (result key with this generation's count, description).
ORGANISM_COUNTERS = {
    "gsnn_growth_events": ("grow_events_this_generation", "Growth events"),
    "gsnn_neurons_added": ("neurons_added_this_generation", "Neurons added by growth"),
    "gsnn_prune_events": ("prune_events_this_generation", "Prune events"),
    "gsnn_neurons_removed": ("neurons_removed_this_generation", "Neurons removed by pruning"),
    "gsnn_decisions": ("decisions_this_generation", "Learning decisions made"),
}

POPULATION_GAUGES = {
    "gsnn_population_best_fitness": "Best latest fitness in the population",
    "gsnn_population_mean_fitness": "Mean latest fitness over the population",
    "gsnn_population_hidden_neurons": "Hidden neurons of the whole population",
    "gsnn_population_organisms": "Organisms that have reported at least once",
}


def _finite(value) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


class PopulationMetrics(tune.Callback):
    """Turns each organism's generation result into Ray metrics (see the module docstring).

    ``run`` labels every series, so two runs on one Prometheus stay apart. A result with a
    non-finite value leaves that gauge at its last finite value (NaN never reaches a panel)."""

    def __init__(self, run: str):
        self.run = run
        self._gauges = {name: Gauge(name, description=desc, tag_keys=TAGS)
                        for name, (_, desc) in ORGANISM_GAUGES.items()}
        self._counters = {name: Counter(name, description=desc, tag_keys=TAGS)
                          for name, (_, desc) in ORGANISM_COUNTERS.items()}
        self._exploits = Counter("gsnn_exploits", description="PBT exploits: organism replaced by a copy of a stronger one",
                                 tag_keys=TAGS)
        self._population = {name: Gauge(name, description=desc, tag_keys=("run",))
                            for name, desc in POPULATION_GAUGES.items()}
        self._latest: dict[str, dict] = {}  # trial id -> its latest result

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.record(trial.trial_id, result)

    def record(self, trial_id: str, result: dict) -> None:
        tags = {"trial_id": trial_id, "run": self.run}
        for name, (key, _) in ORGANISM_GAUGES.items():
            value = _finite(result.get(key))
            if value is not None:
                self._gauges[name].set(value, tags=tags)
        for name, (key, _) in ORGANISM_COUNTERS.items():
            value = _finite(result.get(key))
            if value is not None and value > 0:
                self._counters[name].inc(value, tags=tags)
        if result.get("exploited_from"):
            self._exploits.inc(1, tags=tags)
        self._latest[trial_id] = result
        fitness = [f for f in (_finite(r.get("fitness")) for r in self._latest.values()) if f is not None]
        hidden = [h for h in (_finite(r.get("hidden_neurons")) for r in self._latest.values()) if h is not None]
        tags = {"run": self.run}
        if fitness:
            self._population["gsnn_population_best_fitness"].set(max(fitness), tags=tags)
            self._population["gsnn_population_mean_fitness"].set(sum(fitness) / len(fitness), tags=tags)
        self._population["gsnn_population_hidden_neurons"].set(sum(hidden), tags=tags)
        self._population["gsnn_population_organisms"].set(len(self._latest), tags=tags)
