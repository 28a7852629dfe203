"""The population's search: Tune's grid over the organisms, kept open until every organism's trial
has ended, so that Tune reuses the actor of a trial that PBT exploits instead of starting a new one.

Tune keeps a trial's actor for reuse only while its search algorithm is unfinished
(``TuneController._maybe_cache_trial_actor`` in Ray 2.60), and a grid search is finished as soon as
its last trial is created. Every PBT exploit pauses the weak trial, so with the plain grid its actor
was stopped and a fresh one started: a new Python process importing torch and Ray Tune, about 2.5 s
of CPU per exploit, taken from the organisms' compute (``python -m benchmarks.population`` counts
the actor processes). With this search the paused trial's actor is cached and handed back to it
(``OrganismTrainable.reset_config`` + ``load_checkpoint``). PBT accepts only Tune's basic variant
generator as a search algorithm, so this is one, with its end deferred.
"""

from __future__ import annotations

from ray.tune.search.basic_variant import BasicVariantGenerator


class PopulationSearch(BasicVariantGenerator):
    """BasicVariantGenerator whose search ends only when ``population`` trials have completed
    (errored ones included). Its state (saved with the experiment) includes that count."""

    def __init__(self, population: int):
        super().__init__()
        self.population = population
        self.trials_ended = 0

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        super().on_trial_complete(trial_id, result=result, error=error)
        self.trials_ended += 1

    def is_finished(self) -> bool:
        return super().is_finished() and self.trials_ended >= self.population
