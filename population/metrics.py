"""Live metrics of a population, exported through Ray's Prometheus exporter.

``PopulationMetrics`` is a Tune callback on the driver. Every organism's generation result becomes
Ray metrics (``ray.util.metrics``), one series per organism (tag ``trial_id``), plus population
aggregates over every organism's latest result. Ray exports each metric as ``ray_<name>``, so a
gauge ``gsnn_fitness`` is scraped as ``ray_gsnn_fitness`` and a counter ``gsnn_growth_events`` as
``ray_gsnn_growth_events_total``. Names use base units (joules, seconds).

The shipped Grafana dashboard (``docker/grafana/dashboards/gsnn.json``) queries exactly these
names; ``tests/test_monitoring.py`` evaluates every panel against a real Prometheus.

Ray's exporter forgets a gauge that has not been set for a while (its agent evicts values older
than two report intervals, and a process does not send a gauge again unless it is set again; with
Ray 2.60 a gauge set once disappeared after about 20 s at a 2 s report interval, about 30 s at the
default 10 s). A value set at the end of a generation would vanish from Prometheus before the
next one, and the final values during the linger, so ``keep_gauges_exported`` re-sets every gauge
with its latest value in a driver thread for as long as the run (and its final linger) lasts.
"""

from __future__ import annotations

import contextlib
import math
import threading

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

    # The instance of each run that last received a result in this process, for
    # keep_gauges_exported. Tune may copy its callbacks (a resumed run's are unpickled); the copy
    # that receives results takes over from the old one (and its latest values), so two copies
    # never re-set one gauge with different values. Held strongly: the final values must stay
    # exported after Tune has let go of its callbacks.
    _live: "dict[str, PopulationMetrics]" = {}

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
        self._latest: dict[str, dict] = {}  # trial id -> result key -> latest finite value
        self._lock = threading.Lock()  # record (Tune's thread) against refresh (the keeper's)

    def __getstate__(self):
        state = dict(self.__dict__)
        del state["_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _take_over(self) -> None:
        previous = PopulationMetrics._live.get(self.run)
        if previous is not None:
            with previous._lock:
                self._latest = {**self._latest, **{t: dict(v) for t, v in previous._latest.items()}}
        PopulationMetrics._live[self.run] = self

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.record(trial.trial_id, result)

    def record(self, trial_id: str, result: dict) -> None:
        if PopulationMetrics._live.get(self.run) is not self:
            self._take_over()
        with self._lock:
            tags = {"trial_id": trial_id, "run": self.run}
            for name, (key, _) in ORGANISM_COUNTERS.items():
                value = _finite(result.get(key))
                if value is not None and value > 0:
                    self._counters[name].inc(value, tags=tags)
            if result.get("exploited_from"):
                self._exploits.inc(1, tags=tags)
            # Keep the last finite value of each gauge, so a refresh re-sets what was set.
            latest = self._latest.setdefault(trial_id, {})
            for key, _ in ORGANISM_GAUGES.values():
                value = _finite(result.get(key))
                if value is not None:
                    latest[key] = value
            self._set_gauges(trial_id)
            self._set_population()

    def refresh(self) -> None:
        """Set every gauge again with its latest value (Ray's exporter drops gauges left unset)."""
        with self._lock:
            for trial_id in self._latest:
                self._set_gauges(trial_id)
            self._set_population()

    def _set_gauges(self, trial_id: str) -> None:
        tags = {"trial_id": trial_id, "run": self.run}
        for name, (key, _) in ORGANISM_GAUGES.items():
            value = self._latest[trial_id].get(key)
            if value is not None:
                self._gauges[name].set(value, tags=tags)

    def _set_population(self) -> None:
        fitness = [r["fitness"] for r in self._latest.values() if "fitness" in r]
        hidden = [r["hidden_neurons"] for r in self._latest.values() if "hidden_neurons" in r]
        tags = {"run": self.run}
        if fitness:
            self._population["gsnn_population_best_fitness"].set(max(fitness), tags=tags)
            self._population["gsnn_population_mean_fitness"].set(sum(fitness) / len(fitness), tags=tags)
        self._population["gsnn_population_hidden_neurons"].set(sum(hidden), tags=tags)
        self._population["gsnn_population_organisms"].set(len(self._latest), tags=tags)


def refresh_interval_seconds(default_report_ms: int) -> float:
    """Half of Ray's metrics report interval: Ray's agent keeps a gauge for two intervals after it
    last received it, so re-setting twice per interval never lets a series lapse."""
    try:
        import ray

        report_ms = ray._config.metrics_report_interval_ms()
    except Exception:  # not connected, or a Ray without this accessor
        report_ms = default_report_ms
    return max(report_ms, 1000) / 2000


@contextlib.contextmanager
def keep_gauges_exported(interval: float):
    """While the block runs, a daemon thread re-sets every gauge of every PopulationMetrics in this
    process every ``interval`` seconds (see the module docstring)."""
    stop = threading.Event()

    def keep():
        while not stop.wait(interval):
            for metrics in list(PopulationMetrics._live.values()):
                metrics.refresh()

    thread = threading.Thread(target=keep, name="gsnn-metrics-refresh", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=10)
