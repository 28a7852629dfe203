"""One organism per Ray actor: the Tune ``Trainable`` that PBT evolves.

One training iteration is one generation: learn for ``episodes_per_generation`` episodes in the
organism's own worlds (growing and pruning as it goes), then evaluate greedily on worlds seeded
``eval_seed + generation``, the same for the whole population, and report. Tune checkpoints after
every generation. PBT's exploit hands this actor another organism's checkpoint: the organism then
rebuilds itself from the checkpoint's own shape (``Organism.load``), keeps the hyperparameters PBT
just gave this trial, and, if ``weight_noise`` > 0, perturbs its weights (weight-level explore).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import threading
import time
from pathlib import Path

import torch
from ray.tune.trainable import Trainable  # not `ray.tune`: see population/worker_setup.py

from gsnn.config import OrganismConfig
from gsnn.organism import Organism
from gsnn.train import WorldConfig, evaluate, live
from population import slots

ORGANISM_FILE = "organism.ckpt"
META_FILE = "meta.json"
# Trial config keys that are not organism settings.
RUN_KEYS = ("run", "trial_index", "weight_noise")


def organism_settings(config: dict) -> dict:
    """The organism's settings in a trial config: the run's fixed ones plus PBT's mutated ones."""
    settings = dict(config["run"]["organism"])
    settings.update({k: v for k, v in config.items() if k not in RUN_KEYS})
    return settings


class OrganismTrainable(Trainable):
    def setup(self, config: dict):
        quiet_tune_logs()
        run = config["run"]
        torch.set_num_threads(int(run["resources"]["torch_threads"]))
        self.device = torch.device("cuda" if torch.cuda.is_available() and _has_gpu() else "cpu")
        seed = int(run["population"]["seed"]) * 1_000_003 + int(config["trial_index"])
        self.seed = seed
        torch.manual_seed(seed)
        self.world = WorldConfig(
            num_worlds=int(run["population"]["worlds"]), obs_mode=run["world"]["obs_mode"],
            walls=run["world"]["walls"],
        )
        self.pop = run["population"]
        settings = dict(organism_settings(config), seed=seed)
        self.organism = Organism(OrganismConfig.from_dict(settings), device=self.device)
        self.env = self.world.make(seed=seed, device=self.device)
        self.obs = None
        self.exploited_from = None
        self.exploit_source_hidden = None
        self.exploits = 0
        self._cpu_mark = None  # (thread CPU, process CPU) when the last generation's compute ended

    def step(self) -> dict:
        with self._compute_slot() as waited:
            report = self._live_one_generation()
        report["slot_wait_seconds"] = waited
        return report

    def _compute_slot(self):
        """One organism per core computes at a time (see population.slots); off on a GPU or
        when resources.compute_slots is 0."""
        setting = self.config["run"]["resources"].get("compute_slots", "auto")
        if self.device.type != "cpu" or setting == 0:
            return contextlib.nullcontext(0.0)
        import ray

        count = slots.slot_count() if setting == "auto" else int(setting)
        return slots.compute_slot(ray.get_runtime_context().get_node_id()[:16], count)

    def _live_one_generation(self) -> dict:
        organism, pop = self.organism, self.pop
        stats_before = _event_counts(organism)
        start, cpu_start, process_start = time.perf_counter(), time.thread_time(), time.process_time()
        # This actor's CPU since its previous generation's compute ended: Tune's step and result,
        # the checkpoint, the wait for a slot; in all threads, Ray's own too (0 after a (re)start).
        mark = self._cpu_mark or (cpu_start, process_start)
        between, between_process = cpu_start - mark[0], process_start - mark[1]
        self.obs, finished = live(
            organism, self.env, int(pop["episodes_per_generation"]) * self.world.max_steps, self.obs
        )
        learn_seconds = time.perf_counter() - start
        generation = self.iteration + 1  # the iteration this step completes
        eval_env = self.world.make(seed=0, device=self.device, num_worlds=int(pop["eval_worlds"]))
        t0 = time.perf_counter()
        result = evaluate(organism, eval_env, seed=int(pop["eval_seed"]) + generation)
        eval_seconds = time.perf_counter() - t0
        cpu_seconds = time.thread_time() - cpu_start
        self._cpu_mark = (time.thread_time(), time.process_time())
        fitness, fitness_std = result["fitness"], result["fitness_std"]
        if not math.isfinite(fitness):  # never hand PBT a NaN: it would drop this trial from ranking
            fitness = 0.0
        if not math.isfinite(fitness_std):
            fitness_std = 0.0
        counts = _event_counts(organism)
        decisions = int(pop["episodes_per_generation"]) * self.world.max_steps * self.world.num_worlds
        report = {
            "generation": generation,
            "fitness": fitness,
            "fitness_std": fitness_std,
            "train_food": sum(finished) / max(len(finished), 1),
            "hidden_neurons": organism.hidden_neurons,
            "mean_firing_rate": float(organism.rate_ema.mean()),
            "energy_per_decision_joules": result.get("energy_per_decision_joules", 0.0),
            "synops_per_decision": result.get("synops_per_decision", 0.0),
            "dense_ann_energy_per_decision_joules": result.get("dense_ann_energy_per_decision_joules", 0.0),
            "sparse_ann_energy_per_decision_joules": result.get("sparse_ann_energy_per_decision_joules", 0.0),
            "grow_threshold": organism.config.grow_threshold,
            "prune_threshold": organism.config.prune_threshold,
            "learning_rate": organism.config.learning_rate,
            "neurons_per_grow": organism.config.neurons_per_grow,
            "learning_rule": organism.config.learning_rule,
            "weight_noise": float(self.config.get("weight_noise", 0.0)),
            "decisions_this_generation": decisions,
            "decisions_per_second": decisions / max(learn_seconds, 1e-9),
            "learn_seconds": learn_seconds,
            "eval_seconds": eval_seconds,
            # CPU time of this actor's thread over learning + evaluation: below their wall time when
            # other processes took the core (a CPU share of the organism's own compute)
            "compute_cpu_seconds": cpu_seconds,
            "between_cpu_seconds": between,
            "between_process_cpu_seconds": between_process,
            "exploited_from": self.exploited_from or "",
            "exploit_source_hidden_neurons": self.exploit_source_hidden or 0,
            "exploits": self.exploits,
            "device": self.device.type,
            "actor_pid": os.getpid(),  # one per organism for the whole run: exploits reuse the actor
            "finished_at": time.time(),  # float seconds (Tune's own timestamp is whole seconds)
            **{f"{k}_total": v for k, v in counts.items()},
            **{f"{k}_this_generation": counts[k] - stats_before[k] for k in counts},
        }
        self.exploited_from = None
        self.exploit_source_hidden = None
        return report

    def save_checkpoint(self, checkpoint_dir: str) -> str:
        self.organism.save(Path(checkpoint_dir) / ORGANISM_FILE)
        meta = {"trial_id": self.trial_id, "hidden_neurons": self.organism.hidden_neurons,
                "generation": self.iteration, "exploits": self.exploits}
        (Path(checkpoint_dir) / META_FILE).write_text(json.dumps(meta))
        return checkpoint_dir

    def load_checkpoint(self, checkpoint_dir: str) -> None:
        meta = json.loads((Path(checkpoint_dir) / META_FILE).read_text())
        self.organism.load(Path(checkpoint_dir) / ORGANISM_FILE)  # the checkpoint's own shape
        if meta["trial_id"] != self.trial_id:  # PBT exploit: another organism's checkpoint
            self.exploits = int(meta.get("exploits", 0)) + 1
            self.exploited_from = meta["trial_id"]
            self.exploit_source_hidden = int(meta["hidden_neurons"])
            # The copy keeps this trial's own seed and gets its own random stream, so two trials
            # that copy the same organism explore differently.
            stream = (self.seed * 1_000_003 + self.exploits) * 1_000_003 + self.organism.stats.decision_steps
            self.organism.generator.manual_seed(stream & (2**63 - 1))
            self._apply_trial_settings(perturb=True)
            self.organism.reset_state(self.world.num_worlds)
            self.obs = None
        else:
            self.exploits = int(meta.get("exploits", 0))
            self._apply_trial_settings(perturb=False)

    def reset_config(self, new_config: dict) -> bool:
        """Tune reuses this actor for another trial (or for this one after an exploit): become
        that trial's fresh organism. A checkpoint restored next replaces it (load_checkpoint)."""
        self.config = new_config
        self.setup(new_config)
        return True

    def cleanup(self) -> None:
        """Tune has stopped this trial for good and Ray ends the process next (every generation
        is already checkpointed). Ray's raylet may send its SIGTERM while the process is still
        exiting; Ray's own handler then raises SystemExit inside whatever Python runs at that
        moment (a garbage-collection callback), and the driver's console showed a traceback
        ("Exception ignored ... SystemExit: 1") for a normal end, twice in a default run. From
        here a SIGTERM ends the process at once, quietly."""
        if threading.current_thread() is threading.main_thread():  # where Python handles signals
            signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def _apply_trial_settings(self, perturb: bool) -> None:
        """Give the organism this trial's hyperparameters (PBT mutates them), keeping its seed.
        The organism keeps the shape of the checkpoint it came from: where this trial's
        [min_hidden, max_hidden] (mutated by PBT) leaves out its hidden size, the range is widened
        to include it (Organism.set_config refuses a range that excludes the current size)."""
        settings = organism_settings(self.config)
        current = self.organism.config.to_dict()
        merged = dict(current, **{k: v for k, v in settings.items() if k in current})
        merged["seed"] = self.seed
        config = OrganismConfig.from_dict(merged)
        hidden = self.organism.hidden_neurons
        if not config.min_hidden <= hidden <= config.max_hidden:
            config = dataclasses.replace(config, min_hidden=min(config.min_hidden, hidden),
                                         max_hidden=max(config.max_hidden, hidden))
        self.organism.set_config(config)
        noise = float(self.config.get("weight_noise", 0.0))
        if perturb and noise > 0:
            self.organism.perturb_weights(noise)


def quiet_tune_logs() -> None:
    """Tune logs every checkpoint and PBT decision at INFO; the run prints its own summary."""
    import logging

    for name in ("ray.tune", "ray.train"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Each trial restored from a checkpoint (every PBT exploit) warns that its result.json was not
    # found at the storage path it copies from, which is the path it writes to: noise on a local run.
    logging.getLogger("ray.tune.logger.logger").setLevel(logging.ERROR)


def _event_counts(organism: Organism) -> dict:
    s = organism.stats
    return {"grow_events": s.grow_events, "neurons_added": s.neurons_added,
            "prune_events": s.prune_events, "neurons_removed": s.neurons_removed}


def _has_gpu() -> bool:
    import ray

    try:
        return bool(ray.get_gpu_ids())
    except Exception:
        return False
