"""Train one organism in a batch of worlds, without Ray: ``python -m gsnn.train --episodes N``.

This module is where the organism meets the world: the rest of ``gsnn`` imports neither the
worlds nor Ray. ``live`` runs a learning lifetime, ``evaluate`` measures fitness (mean food per
episode) on given seeds with the greedy (argmax) policy, leaving the learner's state untouched.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass

import torch

from envs import BatchedForagingGrid
from envs.policies import mean_food_per_episode
from gsnn.config import ConfigError, OrganismConfig
from gsnn.organism import EnergyMeter, Organism


@dataclass
class WorldConfig:
    num_worlds: int = 32
    obs_mode: str = "egocentric"
    walls: str = "border"
    max_steps: int = 500
    n_food: int = 10

    def make(self, seed: int, device="cpu", num_worlds: int | None = None, season=None) -> BatchedForagingGrid:
        return BatchedForagingGrid(
            num_worlds or self.num_worlds, n_food=self.n_food, max_steps=self.max_steps,
            obs_mode=self.obs_mode, walls=self.walls, season=season, device=device, seed=seed,
        )


@torch.no_grad()  # once for the loop instead of per decision (Organism.learn_act)
def live(organism: Organism, env: BatchedForagingGrid, decision_steps: int, obs: torch.Tensor | None = None):
    """Learn for ``decision_steps`` steps of every world. Returns (last observation, food per
    finished episode as a list). The observation lets a caller continue where it stopped."""
    if obs is None:
        obs = env.reset()
    finished = []
    for _ in range(decision_steps):
        actions = organism.learn_act(obs)
        result = env.step(actions)
        organism.learn_feedback(result.reward, result.done)
        if result.finished:
            finished.extend(result.episode_food[result.done].tolist())
        obs = result.observation
    organism.finish_rollout()
    return obs, finished


@torch.no_grad()
def evaluate(organism: Organism, env: BatchedForagingGrid, seed: int, greedy: bool = True) -> dict:
    """One full episode in every world of ``env`` from ``seed``. The organism's learning state
    (LIF state, energy meter, rollout, and the random stream that ``greedy=False`` samples
    from) is set aside and restored, so evaluation never disturbs learning. ``fitness_std`` is
    the standard deviation of the worlds' food (0.0 for one world, never NaN)."""
    saved = (organism.v, organism.i, organism.energy, organism._rollout)
    stream = organism.generator.get_state()
    organism.energy = EnergyMeter(organism.config)
    organism.reset_state(env.num_worlds)
    try:
        obs = env.reset(seed=seed)
        food = torch.zeros(env.num_worlds, dtype=torch.long, device=env.device)
        for _ in range(env.max_steps):
            result = env.step(organism.act(obs, greedy=greedy))
            organism.reset_worlds(result.done)
            food += result.episode_food
            obs = result.observation
        energy = organism.energy.report()
    finally:
        organism.v, organism.i, organism.energy, organism._rollout = saved
        organism.generator.set_state(stream)
    spread = float(food.float().std()) if env.num_worlds > 1 else 0.0
    return {"fitness": float(food.float().mean()), "fitness_std": spread, **energy}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=40, help="learning episodes per world (500 steps each)")
    parser.add_argument("--minutes", type=float, default=None, help="stop after this wall time instead")
    parser.add_argument("--rule", choices=("reinforce", "rstdp"), default="reinforce")
    parser.add_argument("--worlds", type=int, default=32, help="worlds learned in at once")
    parser.add_argument("--eval-worlds", type=int, default=64)
    parser.add_argument("--eval-every", type=int, default=2, help="episodes between evaluations")
    parser.add_argument("--obs-mode", choices=("egocentric", "allocentric"), default="egocentric")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="organism setting, e.g. --set learning_rate=3e-3 (repeatable)")
    parser.add_argument("--save", default=None, help="write the final organism checkpoint here")
    parser.add_argument("--json", default=None, help="write the progress records here")
    args = parser.parse_args(argv)
    try:
        overrides = dict(_parse_setting(item) for item in args.set)
        config = OrganismConfig.from_dict({"learning_rule": args.rule, "seed": args.seed, **overrides})
        if args.episodes < 1 or args.worlds < 1 or args.eval_worlds < 1 or args.eval_every < 1 or args.threads < 1:
            raise ConfigError("--episodes, --worlds, --eval-worlds, --eval-every, --threads: must be integers >= 1")
        if args.minutes is not None and not args.minutes > 0:
            raise ConfigError(f"--minutes: must be a number > 0, got {args.minutes}")
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    world = WorldConfig(num_worlds=args.worlds, obs_mode=args.obs_mode)
    env = world.make(seed=args.seed)
    eval_env = world.make(seed=10_000 + args.seed, num_worlds=args.eval_worlds)
    references = {
        "random": mean_food_per_episode(world.make(seed=1, num_worlds=args.eval_worlds), "random", seed=1),
        "greedy": mean_food_per_episode(world.make(seed=1, num_worlds=args.eval_worlds), "greedy", seed=1),
    }
    print(f"references: random {references['random']:.1f} food/episode, greedy walk {references['greedy']:.1f}")
    organism = Organism(config)
    records, obs, start, episode = [], None, time.perf_counter(), 0
    learn_seconds = 0.0
    while True:
        chunk = min(args.eval_every, args.episodes - episode) if args.minutes is None else args.eval_every
        t0 = time.perf_counter()
        obs, finished = live(organism, env, chunk * world.max_steps, obs)
        learn_seconds += time.perf_counter() - t0
        episode += chunk
        result = evaluate(organism, eval_env, seed=10_000 + args.seed)
        elapsed = time.perf_counter() - start
        record = {
            "episode": episode, "elapsed_s": round(elapsed, 1), "fitness": result["fitness"],
            "train_food": sum(finished) / max(len(finished), 1), "hidden_neurons": organism.hidden_neurons,
            "mean_rate": float(organism.rate_ema.mean()), "grow_events": organism.stats.grow_events,
            "prune_events": organism.stats.prune_events,
            "energy_per_decision_joules": result.get("energy_per_decision_joules"),
            "learn_decisions_per_s": episode * world.max_steps * args.worlds / learn_seconds,
            "nonfinite_updates_skipped": organism.stats.nonfinite_updates_skipped,
        }
        records.append(record)
        print(
            f"ep {episode:4d}  {elapsed:6.0f}s  eval {record['fitness']:6.1f} food  train {record['train_food']:6.1f}"
            f"  hidden {record['hidden_neurons']:4d}  rate {record['mean_rate']:.3f}"
            f"  grow {record['grow_events']:3d} prune {record['prune_events']:3d}"
            f"  {record['energy_per_decision_joules'] * 1e9:6.1f} nJ/decision"
            f"  {record['learn_decisions_per_s']:7.0f} decisions/s",
            flush=True,
        )
        done = episode >= args.episodes if args.minutes is None else elapsed >= args.minutes * 60
        if done:
            break
    best = max(records, key=lambda r: r["fitness"])
    print(
        f"final eval {records[-1]['fitness']:.1f} food/episode (best {best['fitness']:.1f} at episode "
        f"{best['episode']}); random {references['random']:.1f}, greedy walk {references['greedy']:.1f}"
    )
    if args.save:
        organism.save(args.save)
        print(f"checkpoint: {args.save}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"config": config.to_dict(), "references": references, "records": records}, handle, indent=1)
    return 0


def _parse_setting(item: str):
    if "=" not in item:
        raise ConfigError(f"--set {item}: expected KEY=VALUE")
    key, raw = item.split("=", 1)
    for cast in (int, float):
        try:
            return key, cast(raw)
        except ValueError:
            pass
    return key, raw


if __name__ == "__main__":
    sys.exit(main())
