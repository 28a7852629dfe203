"""The conventional baseline: RLlib's PPO (new API stack) with a small multilayer perceptron on the
registered gymnasium world ``gsnn/ForagingGrid-v0``, counted as a dense ANN for energy.

The observation (2 x 15 x 15) is flattened to 450 values (``FlattenObservation``), so RLlib's
default catalog builds an MLP encoder (``ppo.hidden``) with a linear policy head. Everything runs in
one process (``num_env_runners=0``, ``num_learners=0``: one core), for the same number of
environment steps as one organism's lifetime. At the same points in environment steps as the
organisms, the policy is evaluated greedily (argmax of the logits) on the very worlds the
organisms are evaluated on (the batched twin of the same world, proven equal by the tests).

Energy: the policy path (encoder + policy head; the value function is not needed to act) does
``sum(in x out)`` multiply-accumulates per decision, each 4.6 pJ (``gsnn.energy.MAC_JOULES``).
"""

from __future__ import annotations

import logging
import shutil
import time

import torch

from gsnn.energy import MAC_JOULES

ENV_NAME = "gsnn-foraging-flat"


def make_flat_env(env_config: dict):
    """``gsnn/ForagingGrid-v0`` with its observation flattened to 450 values."""
    import gymnasium as gym
    from gymnasium.wrappers import FlattenObservation

    import envs

    return FlattenObservation(gym.make(envs.FORAGING_ID, obs_mode=env_config.get("obs_mode", "egocentric"),
                                       walls=env_config.get("walls", "border")))


def build_algorithm(ppo: dict, world: dict, seed: int):
    from ray.rllib.algorithms.ppo import PPOConfig
    from ray.rllib.core.rl_module.default_model_config import DefaultModelConfig
    from ray.tune.registry import register_env

    register_env(ENV_NAME, make_flat_env)
    config = (
        PPOConfig()
        .api_stack(enable_rl_module_and_learner=True, enable_env_runner_and_connector_v2=True)
        .environment(ENV_NAME, env_config=dict(world))
        .env_runners(num_env_runners=0, num_envs_per_env_runner=int(ppo["envs_per_runner"]),
                     rollout_fragment_length="auto")
        .learners(num_learners=0)
        .training(train_batch_size_per_learner=int(ppo["train_batch"]), minibatch_size=int(ppo["minibatch"]),
                  num_epochs=int(ppo["epochs"]), lr=float(ppo["lr"]), gamma=float(ppo["gamma"]),
                  lambda_=float(ppo["lambda_"]), entropy_coeff=float(ppo["entropy_coeff"]))
        .rl_module(model_config=DefaultModelConfig(fcnet_hiddens=list(ppo["hidden"]),
                                                   fcnet_activation=ppo["activation"]))
        .debugging(seed=int(seed), log_level="ERROR")
    )
    return config.build_algo()


def policy_macs(module: torch.nn.Module) -> int:
    """Multiply-accumulates of one decision along the policy path (every Linear layer that is not
    part of the value function)."""
    total = 0
    for name, layer in module.named_modules():
        if isinstance(layer, torch.nn.Linear) and not any(part in name for part in ("vf", "critic", "value")):
            total += layer.in_features * layer.out_features
    return total


def policy_hidden_units(module: torch.nn.Module) -> int:
    """Hidden units of the policy path (every Linear output except the action logits)."""
    layers = [layer for name, layer in module.named_modules()
              if isinstance(layer, torch.nn.Linear) and not any(p in name for p in ("vf", "critic", "value"))]
    return sum(layer.out_features for layer in layers[:-1])


@torch.no_grad()
def evaluate_module(module, world, num_worlds: int, seed: int) -> float:
    """Greedy (argmax) food per episode on ``world.make(...)`` worlds seeded ``seed``: the same
    worlds ``gsnn.train.evaluate`` gives the organisms."""
    env = world.make(seed=seed, num_worlds=num_worlds)
    obs = env.reset(seed=seed)
    food = torch.zeros(env.num_worlds, dtype=torch.long)
    for _ in range(env.max_steps):
        logits = module.forward_inference({"obs": obs.reshape(env.num_worlds, -1)})["action_dist_inputs"]
        result = env.step(logits.argmax(dim=1))
        food += result.episode_food
        obs = result.observation
    return float(food.float().mean())


def ppo_lifetime(ppo: dict, world: dict, seed: int, total_steps: int, eval_every_steps: int,
                 eval_worlds: int, eval_seed: int, final_eval_worlds: int, final_eval_seed: int,
                 printer=print) -> dict:
    """Train PPO for ``total_steps`` environment steps; evaluate every ``eval_every_steps`` (on
    worlds seeded ``eval_seed + k`` at the k-th point, as for the organisms) and at the end."""
    from gsnn.train import WorldConfig

    for name in ("ray.rllib", "ray.tune"):
        logging.getLogger(name).setLevel(logging.ERROR)
    torch.manual_seed(seed)
    wc = WorldConfig(obs_mode=world["obs_mode"], walls=world["walls"])
    start = time.perf_counter()
    algo = build_algorithm(ppo, world, seed)
    try:
        module = algo.get_module()
        curve = [{"env_steps": 0, "fitness": evaluate_module(module, wc, eval_worlds, eval_seed),
                  "wall_s": time.perf_counter() - start}]
        steps, k = 0, 1
        while steps < total_steps:
            result = algo.train()
            steps = int(result.get("num_env_steps_sampled_lifetime")
                        or result["env_runners"]["num_env_steps_sampled_lifetime"])
            if steps >= k * eval_every_steps or steps >= total_steps:
                fitness = evaluate_module(algo.get_module(), wc, eval_worlds, eval_seed + k)
                curve.append({"env_steps": steps, "fitness": fitness, "wall_s": time.perf_counter() - start})
                printer(f"[ppo seed {seed}] step {steps:8d}  fitness {fitness:6.1f}  "
                        f"[{time.perf_counter() - start:5.0f} s]")
                k += 1
        wall = time.perf_counter() - start
        module = algo.get_module()
        final = evaluate_module(module, wc, final_eval_worlds, final_eval_seed)
        macs = policy_macs(module)
        hidden = policy_hidden_units(module)
    finally:
        logdir = getattr(algo, "logdir", None)
        algo.stop()
        if logdir:  # RLlib's own (empty) result folder under ~/ray_results: not needed
            shutil.rmtree(logdir, ignore_errors=True)
    return {
        "curve": curve,
        "env_steps": steps,
        "wall_s": wall,
        "final": {
            "fitness": final,
            "energy_per_decision_joules": macs * MAC_JOULES,
            "dense_ann_energy_per_decision_joules": macs * MAC_JOULES,
            "synops_per_decision": 0.0,
            "macs_per_decision": float(macs),
            "hidden_neurons": float(hidden),
        },
    }
