"""What one seed of one organism arm does, inside a Ray worker (no Ray imports here).

``organism_lifetime``: a fresh organism learns for the experiment's episodes in its own worlds,
evaluated greedily every ``eval_every`` episodes on the shared learning-curve worlds (the k-th
evaluation from seed ``eval_seed + k``, for every arm), then once on the shared final worlds;
then, if the arm is in the continual section, it goes on learning through the seasons
(``population.continual``). ``evolved_organism_phase`` does the final evaluation and the
seasons for the best organism of a PBT run, loaded from its checkpoint.
"""

from __future__ import annotations

import time

import torch

from gsnn.config import OrganismConfig
from gsnn.organism import Organism
from gsnn.train import WorldConfig, evaluate, live
from population import continual

ENERGY_KEYS = ("energy_per_decision_joules", "synops_per_decision", "dense_ann_energy_per_decision_joules",
               "sparse_ann_energy_per_decision_joules", "hidden_neurons", "active_inputs_per_decision",
               "hidden_spikes_per_decision")


def world_config(settings: dict, num_worlds: int) -> WorldConfig:
    return WorldConfig(num_worlds=num_worlds, obs_mode=settings["world"]["obs_mode"],
                       walls=settings["world"]["walls"])


def _final(organism: Organism, world: WorldConfig, settings: dict) -> dict:
    e = settings["experiment"]
    env = world.make(seed=e["final_eval_seed"], num_worlds=e["final_eval_worlds"])
    result = evaluate(organism, env, seed=e["final_eval_seed"])
    out = {"fitness": result["fitness"], "macs_per_decision": 0.0}
    out.update({key: float(result.get(key, 0.0)) for key in ENERGY_KEYS})
    out["hidden_neurons"] = float(organism.hidden_neurons)
    return out


def _seasons(organism: Organism, world: WorldConfig, settings: dict, seed: int, tag: str, printer) -> dict:
    c = settings["continual"]
    start = time.perf_counter()
    result = continual.learn_through_seasons(
        organism, world, c["seasons"], c["episodes_per_season"], c["eval_worlds"], c["eval_seed"],
        learn_seed=c["learn_seed"] + seed, printer=lambda line: printer(f"[{tag}] {line}"),
    )
    result["wall_s"] = time.perf_counter() - start
    return result


def organism_lifetime(arm: str, seed: int, settings: dict, organism_settings: dict, continual_phase: bool,
                      printer=print) -> dict:
    e = settings["experiment"]
    torch.set_num_threads(int(e["torch_threads"]))
    torch.manual_seed(seed)
    tag = f"{arm} seed {seed}"
    world = world_config(settings, e["worlds"])
    organism = Organism(OrganismConfig.from_dict(dict(organism_settings, seed=seed)))
    env = world.make(seed=seed)
    eval_env = world.make(seed=e["eval_seed"], num_worlds=e["eval_worlds"])
    steps_per_episode = world.max_steps * world.num_worlds

    def point(k: int, episodes: int, elapsed: float) -> dict:
        result = evaluate(organism, eval_env, seed=e["eval_seed"] + k)
        return {"env_steps": episodes * steps_per_episode, "fitness": result["fitness"],
                "hidden_neurons": organism.hidden_neurons,
                "energy_per_decision_joules": result.get("energy_per_decision_joules", 0.0),
                "wall_s": elapsed}

    start = time.perf_counter()
    curve = [point(0, 0, 0.0)]
    obs, episodes, k = None, 0, 1
    while episodes < e["episodes"]:
        chunk = min(e["eval_every"], e["episodes"] - episodes)
        obs, _ = live(organism, env, chunk * world.max_steps, obs)
        episodes += chunk
        curve.append(point(k, episodes, time.perf_counter() - start))
        k += 1
        last = curve[-1]
        printer(f"[{tag}] step {last['env_steps']:8d}  fitness {last['fitness']:6.1f}  hidden "
                f"{last['hidden_neurons']:4d}  {last['energy_per_decision_joules'] * 1e9:6.1f} nJ/decision  "
                f"[{last['wall_s']:5.0f} s]")
    wall = time.perf_counter() - start
    out = {
        "arm": arm, "seed": seed, "curve": curve, "env_steps": episodes * steps_per_episode, "wall_s": wall,
        "final": _final(organism, world, settings),
        "grow_events": organism.stats.grow_events, "prune_events": organism.stats.prune_events,
        "neurons_added": organism.stats.neurons_added, "neurons_removed": organism.stats.neurons_removed,
        "config": organism.config.to_dict(),
    }
    if continual_phase:
        out["continual"] = _seasons(organism, world, settings, seed, tag, printer)
    return out


def evolved_organism_phase(checkpoint: str, seed: int, settings: dict, continual_phase: bool,
                           printer=print) -> dict:
    """Final evaluation (and the seasons) of a PBT run's best organism."""
    e = settings["experiment"]
    torch.set_num_threads(int(e["torch_threads"]))
    torch.manual_seed(seed)
    organism = Organism.from_checkpoint(checkpoint)
    world = world_config(settings, e["worlds"])
    out = {"final": _final(organism, world, settings), "config": organism.config.to_dict()}
    if continual_phase:
        out["continual"] = _seasons(organism, world, settings, seed, f"grow_prune_pbt seed {seed}", printer)
    return out
