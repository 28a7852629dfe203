"""The population's search and scheduler: Tune's grid over the organisms, kept open until every
organism's trial has ended, so that Tune reuses the actor of a trial that PBT exploits instead of
starting a new one; and PBT whose exploit leaves the exploiting trial its own identity.

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

from ray.tune.schedulers import PopulationBasedTraining
from ray.tune.search.basic_variant import BasicVariantGenerator

OWN_KEYS = ("trial_index",)  # what names the organism, not its hyperparameters


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


class OrganismPBT(PopulationBasedTraining):
    """PopulationBasedTraining whose exploit copies the strong trial's hyperparameters but not its
    ``trial_index``: Tune's PBT hands the weak trial the strong one's whole config (explored), and
    the trainable derives the organism's seed, its learning worlds and the random stream of a copy
    from ``trial_index``. With the copied index, two trials that copied the same organism took the
    same seed, the same worlds and the same stream, and learned alike but for their mutations; a
    whole run's trials could end with one index (every trial of a 4-organism run ended with 1).
    Overrides ``_get_new_config`` (Ray 2.60, ``ray/tune/schedulers/pbt.py``), PBT's one place that
    makes an exploiting trial's new config."""

    def _get_new_config(self, trial, trial_to_clone):
        new_config, operations = super()._get_new_config(trial, trial_to_clone)
        for key in OWN_KEYS:
            if key in trial.config:
                new_config[key] = trial.config[key]
        return new_config, operations
