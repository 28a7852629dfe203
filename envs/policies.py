"""Reference policies for the batched world: random, and the greedy walk to the nearest food.

They read the world's state (not the observation) and give the yardsticks fitness is reported
against: about 8 food per episode for random and about 140 for greedy on the default world.
"""

from __future__ import annotations

import torch

from envs.batched import BatchedForagingGrid


def random_actions(env: BatchedForagingGrid, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 4, (env.num_worlds,), generator=generator, device=env.device)


def greedy_actions(env: BatchedForagingGrid) -> torch.Tensor:
    """Step toward the nearest food (Manhattan distance; ties to the lowest cell index), moving
    along the axis with the larger gap first (rows on a tie)."""
    B, S = env.num_worlds, env.size
    cells = torch.arange(S * S, device=env.device)
    food_rows, food_cols = cells // S, cells % S
    d_row = food_rows.unsqueeze(0) - env.agent[:, 0:1]  # (B, S*S)
    d_col = food_cols.unsqueeze(0) - env.agent[:, 1:2]
    distance = d_row.abs() + d_col.abs()
    distance = torch.where(env.food.view(B, -1), distance, torch.full_like(distance, 10 * S))
    nearest = distance.argmin(dim=1)
    dr = d_row[env._worlds, nearest]
    dc = d_col[env._worlds, nearest]
    vertical = torch.where(dr < 0, 0, 1)
    horizontal = torch.where(dc < 0, 2, 3)
    return torch.where(dr.abs() >= dc.abs(), vertical, horizontal)


@torch.no_grad()
def mean_food_per_episode(env: BatchedForagingGrid, policy: str, seed: int = 0) -> float:
    """Run one full episode in every world with a reference policy; mean food per world."""
    env.reset(seed=seed)
    generator = torch.Generator(device=env.device)
    generator.manual_seed(seed)
    total = torch.zeros(env.num_worlds, dtype=torch.long, device=env.device)
    for _ in range(env.max_steps):
        if policy == "random":
            actions = random_actions(env, generator)
        elif policy == "greedy":
            actions = greedy_actions(env)
        else:
            raise ValueError(f"policy must be 'random' or 'greedy', got {policy!r}")
        total += env.step(actions).episode_food
    return float(total.float().mean())
