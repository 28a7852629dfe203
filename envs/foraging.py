"""ForagingGrid: a gymnasium env where an agent walks a grid and eats respawning food."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from envs import rules

MAX_STEPS_LIMIT = 2**62  # the worlds count steps in int64
REWARD_LIMIT = 1e30  # rewards are float32, and a rollout sums discounted rewards


class ForagingGrid(gym.Env):
    """
    ## Description
    An agent walks a ``size`` x ``size`` grid (15 x 15 by default) holding ``n_food`` food items
    (10). Stepping onto food eats it (+10) and a new item appears at once on a free cell, so the
    amount of food on the grid is constant. An episode lasts ``max_steps`` steps (500). A random
    policy collects about 8 food per episode and a greedy walk to the nearest food about 140.

    ## Action Space
    ``Discrete(4)``: 0 up, 1 down, 2 left, 3 right. Moving into the boundary leaves the agent in
    place.

    ## Observation Space
    ``Box(0, 1, (2, 15, 15), float32)``, 450 values. Two modes:

    - ``egocentric`` (default): a ``size`` x ``size`` window centred on the agent. Channel 0 marks
      walls (``walls="border"``: the ring of cells just outside the grid; ``walls="outside"``:
      every window cell outside the grid), channel 1 marks food. The agent is always the centre.
    - ``allocentric`` (the prototype's): the whole grid; channel 0 is one-hot on the agent's cell,
      channel 1 marks food.

    Egocentric is the default because "move toward the food you see" is then a fixed map from
    input cells to actions, which a linear readout can express; in the allocentric view the same
    food cell means different moves depending on where the agent is, so learning needs hidden
    structure first (see README, "Choosing the observation").

    ## Rewards
    ``food_reward`` (10) per food eaten, minus ``step_penalty`` (0.01) every step, minus
    ``wall_penalty`` (0 by default) for a move into the boundary.

    ## Starting State
    The agent on a uniformly random cell; food on ``n_food`` distinct other cells, drawn without
    replacement with the season's spawn weights (uniform outside the seasonal variant).

    ## Episode End
    Never terminates; truncated after ``max_steps`` steps.

    ## Arguments
    ``size``, ``n_food``, ``max_steps``, ``food_reward``, ``step_penalty``, ``wall_penalty``,
    ``obs_mode`` ("egocentric" | "allocentric"), ``walls`` ("border" | "outside"), ``render_mode``
    ("ansi" or None). All randomness comes from ``self.np_random`` (seed it with
    ``reset(seed=...)``).

    ## Version History
    - v0: first release.
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 4}

    def __init__(
        self,
        size: int = rules.GRID_SIZE,
        n_food: int = 10,
        max_steps: int = 500,
        food_reward: float = 10.0,
        step_penalty: float = 0.01,
        wall_penalty: float = 0.0,
        obs_mode: str = "egocentric",
        walls: str = "border",
        render_mode: str | None = None,
    ):
        validate_world_args(size, n_food, max_steps, obs_mode, walls, food_reward, step_penalty, wall_penalty)
        if render_mode not in (None, "ansi"):
            raise ValueError(f"render_mode must be None or 'ansi', got {render_mode!r}")
        self.size = size
        self.n_food = n_food
        self.max_steps = max_steps
        self.food_reward = float(food_reward)
        self.step_penalty = float(step_penalty)
        self.wall_penalty = float(wall_penalty)
        self.obs_mode = obs_mode
        self.walls = walls
        self.render_mode = render_mode
        self.action_space = spaces.Discrete(rules.N_ACTIONS)
        self.observation_space = spaces.Box(
            0.0, 1.0, (rules.N_CHANNELS, size, size), dtype=np.float32
        )
        self._pad = rules.egocentric_padding(size)
        self._wall_map = wall_map(size, walls)
        self.agent = np.zeros(2, dtype=np.int64)
        self.food = np.zeros((size, size), dtype=bool)
        self.steps = 0
        self.food_eaten = 0

    # -- season hooks (the seasonal variant overrides these) ---------------------------------
    def _current_season(self) -> int | None:
        return None

    def _spawn_weights(self) -> np.ndarray:
        return rules.season_weights(self._current_season(), self.size)

    # -- gymnasium API ------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        self._begin_episode(options)
        cell = int(self.np_random.integers(0, self.size * self.size))
        self.agent = np.array(divmod(cell, self.size), dtype=np.int64)
        self.food = np.zeros((self.size, self.size), dtype=bool)
        self.food.flat[self._initial_food_cells()] = True
        self.steps = 0
        self.food_eaten = 0
        return self._observation(), self._info()

    def _begin_episode(self, options: dict[str, Any] | None) -> None:
        if options:
            raise ValueError(f"ForagingGrid.reset takes no options, got {sorted(options)}")

    def step(self, action):
        if isinstance(action, bool) or not self.action_space.contains(action):
            raise ValueError(f"action must be an int in [0, 3], got {action!r}")
        draw = int(self.np_random.integers(0, 1 << rules.SPAWN_DRAW_BITS))
        reward = self.transition(int(action), draw)
        truncated = self.steps >= self.max_steps
        return self._observation(), reward, False, truncated, self._info()

    def render(self):
        if self.render_mode != "ansi":
            return None
        rows = []
        for r in range(self.size):
            row = []
            for c in range(self.size):
                if (r, c) == tuple(self.agent):
                    row.append("A")
                else:
                    row.append("*" if self.food[r, c] else ".")
            rows.append("".join(row))
        return "\n".join(rows)

    # -- rules ------------------------------------------------------------------------------
    def transition(self, action: int, spawn_draw: int) -> float:
        """Apply one action with a given spawn draw (see ``envs.rules``); return the reward."""
        target = self.agent + rules.ACTION_DELTAS[action]
        bumped = bool(np.any(target < 0) or np.any(target >= self.size))
        if not bumped:
            self.agent = target
        reward = -self.step_penalty - (self.wall_penalty if bumped else 0.0)
        r, c = self.agent
        if self.food[r, c]:
            self.food[r, c] = False
            self.food_eaten += 1
            reward += self.food_reward
            self._spawn_one(spawn_draw)
        self.steps += 1
        return float(reward)

    def _free_cell_weights(self) -> np.ndarray:
        weights = self._spawn_weights().copy()
        weights[self.food] = 0
        weights[self.agent[0], self.agent[1]] = 0
        return weights.reshape(-1)

    def _spawn_one(self, draw: int) -> None:
        cumulative = np.cumsum(self._free_cell_weights())
        threshold = rules.spawn_threshold(draw, cumulative[-1])
        cell = int(np.searchsorted(cumulative, threshold, side="right"))
        self.food.flat[cell] = True

    def _initial_food_cells(self) -> np.ndarray:
        """n_food distinct free cells, weighted, without replacement (Efraimidis-Spirakis keys)."""
        weights = self._free_cell_weights().astype(np.float64)
        u = self.np_random.random(weights.shape[0])
        keys = np.where(weights > 0, np.log(np.maximum(u, 1e-300)) / np.maximum(weights, 1), -np.inf)
        return np.argsort(-keys, kind="stable")[: self.n_food]

    def _observation(self) -> np.ndarray:
        obs = np.zeros((rules.N_CHANNELS, self.size, self.size), dtype=np.float32)
        if self.obs_mode == "allocentric":
            obs[0, self.agent[0], self.agent[1]] = 1.0
            obs[1] = self.food
            return obs
        p, r, c = self._pad, self.agent[0], self.agent[1]
        food_padded = np.pad(self.food, p)
        obs[0] = self._wall_map[r : r + self.size, c : c + self.size]
        obs[1] = food_padded[r : r + self.size, c : c + self.size]
        return obs

    def _info(self) -> dict[str, Any]:
        return {"food_eaten": self.food_eaten, "agent": self.agent.copy()}


class SeasonalForagingGrid(ForagingGrid):
    """ForagingGrid whose food spawns mostly in one quadrant, the quadrant changing with the season.

    Season ``k`` (0..3, clockwise from the top-left quadrant) gives the cells of its quadrant
    spawn weight ``rules.SEASON_HOT_WEIGHT`` (12) and every other cell weight 1. The season
    advances every ``season_length`` episodes (counting resets); ``reset(options={"season": k})``
    pins the season for that episode without moving the schedule. The current season is in
    ``info["season"]``, never in the observation.

    ## Version History
    - v0: first release.
    """

    def __init__(self, season_length: int = 50, **kwargs):
        if not isinstance(season_length, int) or season_length < 1:
            raise ValueError(f"season_length must be an int >= 1, got {season_length!r}")
        super().__init__(**kwargs)
        self.season_length = season_length
        self.episodes_started = 0
        self.season = 0

    def _current_season(self) -> int:
        return self.season

    def _begin_episode(self, options):
        options = dict(options or {})
        pinned = options.pop("season", None)
        if options:
            raise ValueError(f"SeasonalForagingGrid.reset takes only 'season', got {sorted(options)}")
        if pinned is not None:
            if isinstance(pinned, bool) or not isinstance(pinned, (int, np.integer)) or not 0 <= pinned < rules.N_SEASONS:
                raise ValueError(f"season must be an int in [0, {rules.N_SEASONS - 1}], got {pinned!r}")
            self.season = int(pinned)
        else:
            self.season = (self.episodes_started // self.season_length) % rules.N_SEASONS
            self.episodes_started += 1

    def _info(self):
        info = super()._info()
        info["season"] = self.season
        return info


def validate_world_args(size, n_food, max_steps, obs_mode, walls, food_reward=10.0, step_penalty=0.01,
                        wall_penalty=0.0) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or size < 3:
        raise ValueError(f"size must be an int >= 3, got {size!r}")
    if isinstance(n_food, bool) or not isinstance(n_food, int) or not 1 <= n_food <= size * size - 1:
        raise ValueError(f"n_food must be an int in [1, {size * size - 1}], got {n_food!r}")
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or not 1 <= max_steps <= MAX_STEPS_LIMIT:
        raise ValueError(f"max_steps must be an int in [1, 2**62], got {max_steps!r}")
    for name, value in (("food_reward", food_reward), ("step_penalty", step_penalty), ("wall_penalty", wall_penalty)):
        # float32 rewards (the batched world's): a finite value that fits
        if (isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating))
                or not abs(float(value)) <= REWARD_LIMIT):
            raise ValueError(f"{name} must be a finite number in [-{REWARD_LIMIT:g}, {REWARD_LIMIT:g}], got {value!r}")
    if obs_mode not in rules.OBSERVATION_MODES:
        raise ValueError(f"obs_mode must be one of {rules.OBSERVATION_MODES}, got {obs_mode!r}")
    if walls not in rules.WALL_ENCODINGS:
        raise ValueError(f"walls must be one of {rules.WALL_ENCODINGS}, got {walls!r}")


def wall_map(size: int, walls: str) -> np.ndarray:
    """The padded wall channel (size + 2 * pad square) that egocentric windows are cut from."""
    pad = rules.egocentric_padding(size)
    full = size + 2 * pad
    outside = np.ones((full, full), dtype=np.float32)
    outside[pad : pad + size, pad : pad + size] = 0.0
    if walls == "outside":
        return outside
    ring = np.zeros_like(outside)
    ring[pad - 1 : pad + size + 1, pad - 1 : pad + size + 1] = 1.0
    ring[pad : pad + size, pad : pad + size] = 0.0
    return ring
