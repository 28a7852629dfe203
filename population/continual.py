"""Continual learning on the seasonal world: the protocol and its standard measures.

The protocol (``learn_through_seasons``): an organism learns in one season after another (food
spawns mostly in one quadrant, ``envs.rules.season_weights``); after each season it is evaluated
greedily on every season, always on the same worlds. That gives the accuracy matrix

    R[i][j] = fitness (food per episode) on season j after learning through the i-th season

(rows: seasons learned, in schedule order; columns: the seasons of the schedule, in the same
order). The measures are those of Lopez-Paz & Ranzato (2017) and Chaudhry et al. (2018), for a
schedule of T seasons; they are pure functions of R, tested on hand-made matrices:

    average fitness     A   = (1/T) sum_j R[T-1][j]
    backward transfer   BWT = (1/(T-1)) sum_{j<T-1} (R[T-1][j] - R[j][j])
    forgetting          F   = (1/(T-1)) sum_{j<T-1} (max_{l<T-1} R[l][j] - R[T-1][j])

BWT < 0 means later seasons made the organism worse at earlier ones; F >= 0 is the mean drop from
the best an earlier season ever was (before the last season) to its final value.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

Matrix = Sequence[Sequence[float]]


def _check(R: Matrix) -> int:
    T = len(R)
    if T < 1 or any(len(row) < T for row in R):
        raise ValueError(f"R must have T rows of at least T values (T = {T})")
    return T


def average_fitness(R: Matrix) -> float:
    """Mean fitness over all T seasons after the last one was learned."""
    T = _check(R)
    return sum(R[T - 1][j] for j in range(T)) / T


def backward_transfer(R: Matrix) -> float:
    """Mean change on each earlier season between just after learning it and the end (NaN if T = 1)."""
    T = _check(R)
    if T < 2:
        return math.nan
    return sum(R[T - 1][j] - R[j][j] for j in range(T - 1)) / (T - 1)


def forgetting(R: Matrix) -> float:
    """Mean drop from the best value an earlier season reached before the last season, to its
    final value (NaN if T = 1)."""
    T = _check(R)
    if T < 2:
        return math.nan
    return sum(max(R[l][j] for l in range(T - 1)) - R[T - 1][j] for j in range(T - 1)) / (T - 1)


def measures(R: Matrix) -> dict[str, float]:
    return {"average_fitness": average_fitness(R), "backward_transfer": backward_transfer(R),
            "forgetting": forgetting(R)}


def learn_through_seasons(organism, world, seasons: Sequence[int], episodes_per_season: int,
                          eval_worlds: int, eval_seed: int, learn_seed: int, printer=None) -> dict:
    """Learn ``episodes_per_season`` episodes in each season of ``seasons`` in turn (the organism
    keeps growing and pruning as it likes); after each, evaluate on every season of the schedule.

    ``world`` is a ``gsnn.train.WorldConfig``. Season j is always evaluated on the same worlds
    (seed ``eval_seed + j``). Returns the matrix R (rows: after each season; columns: the
    schedule's seasons), the row before any seasonal learning, and neurons after each season."""
    from gsnn.train import evaluate, live

    env = world.make(seed=learn_seed, device=organism.device)
    eval_env = world.make(seed=eval_seed, device=organism.device, num_worlds=eval_worlds)

    def evaluate_all() -> list[float]:
        row = []
        for j, season in enumerate(seasons):
            eval_env.set_season(season)
            row.append(evaluate(organism, eval_env, seed=eval_seed + j)["fitness"])
        return row

    before = evaluate_all()
    rows, hidden = [], []
    for i, season in enumerate(seasons):
        env.set_season(season)
        obs = env.reset()  # every world starts its next episode in the new season
        organism.reset_state(world.num_worlds)
        live(organism, env, episodes_per_season * world.max_steps, obs)
        rows.append(evaluate_all())
        hidden.append(organism.hidden_neurons)
        if printer:
            printer(f"season {i + 1}/{len(seasons)} (quadrant {season}) learned: fitness on each season "
                    + " ".join(f"{v:.1f}" for v in rows[-1]) + f"  hidden {organism.hidden_neurons}")
    finite = [[v if math.isfinite(v) else 0.0 for v in row] for row in rows]
    return {"seasons": list(seasons), "R": finite, "before": before, "hidden_neurons": hidden,
            **measures(finite)}


def mean_matrix(matrices: Sequence[Matrix]) -> list[list[float]]:
    """Element-wise mean of equally shaped matrices (one per seed)."""
    stacked = torch.tensor([[list(map(float, row)) for row in m] for m in matrices], dtype=torch.float64)
    return stacked.mean(0).tolist()
