"""Tests for the foraging worlds: the gymnasium env, its seasonal variant and the batched torch twin.

Everything here is deterministic (seeded numpy Generators, seeded torch Generators, fixed draws)
and runs on the CPU in a few seconds.
"""

from __future__ import annotations

import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

import envs
from envs import rules
from envs.batched import BatchedForagingGrid
from envs.foraging import ForagingGrid, SeasonalForagingGrid
from envs.policies import mean_food_per_episode

@pytest.fixture(autouse=True, scope="module")
def single_torch_thread():
    """The tensors here are tiny; one intra-op thread keeps the run fast and steady on a busy box."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


SIZE = rules.GRID_SIZE
CENTRE = SIZE // 2  # 7: the agent's cell in the egocentric window
N_FOOD = 10
BIG = 10_000  # max_steps large enough that no episode ends during a comparison
OBS_MODES = rules.OBSERVATION_MODES
WALLS = rules.WALL_ENCODINGS


# -- helpers ------------------------------------------------------------------------------------
def random_states(rng: np.random.Generator, count: int, n_food: int = N_FOOD, size: int = SIZE):
    """``count`` random (agent, food) states: food on n_food distinct cells, none on the agent."""
    agents = np.zeros((count, 2), dtype=np.int64)
    foods = np.zeros((count, size, size), dtype=bool)
    for i in range(count):
        cell = int(rng.integers(0, size * size))
        agents[i] = divmod(cell, size)
        others = np.delete(np.arange(size * size), cell)
        foods[i].flat[rng.choice(others, size=n_food, replace=False)] = True
    return agents, foods


def gym_env_with_state(agent, food, steps=0, season=None, **kwargs) -> ForagingGrid:
    if season is None:
        env = ForagingGrid(**kwargs)
        env.reset(seed=0)
    else:
        env = SeasonalForagingGrid(**kwargs)
        env.reset(seed=0, options={"season": season})
        assert env.season == season
    env.agent = np.array(agent, dtype=np.int64)
    env.food = np.array(food, dtype=bool)
    env.steps = steps
    return env


def expected_wall_window(agent, walls: str, size: int = SIZE) -> np.ndarray:
    """The egocentric wall channel computed cell by cell from the definition."""
    out = np.zeros((size, size), dtype=np.float32)
    pad = size // 2
    for i in range(size):
        for j in range(size):
            r, c = agent[0] + i - pad, agent[1] + j - pad
            inside = 0 <= r < size and 0 <= c < size
            if walls == "outside":
                out[i, j] = not inside
            else:
                in_ring_box = -1 <= r <= size and -1 <= c <= size
                out[i, j] = in_ring_box and not inside
    return out


def expected_food_window(agent, food: np.ndarray, size: int = SIZE) -> np.ndarray:
    out = np.zeros((size, size), dtype=np.float32)
    pad = size // 2
    for r, c in zip(*np.nonzero(food)):
        i, j = r - agent[0] + pad, c - agent[1] + pad
        if 0 <= i < size and 0 <= j < size:
            out[i, j] = 1.0
    return out


# -- 1. gymnasium's env checker -----------------------------------------------------------------
@pytest.mark.parametrize("env_id", [envs.FORAGING_ID, envs.SEASONAL_FORAGING_ID])
@pytest.mark.parametrize("obs_mode", OBS_MODES)
@pytest.mark.parametrize("walls", WALLS)
def test_check_env_passes(env_id, obs_mode, walls):
    env = gym.make(env_id, obs_mode=obs_mode, walls=walls).unwrapped
    assert env.obs_mode == obs_mode and env.walls == walls
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env)
    user_warnings = [w for w in caught if issubclass(w.category, UserWarning)]
    assert not user_warnings, [str(w.message) for w in user_warnings]


def test_registered_classes():
    assert isinstance(gym.make(envs.FORAGING_ID).unwrapped, ForagingGrid)
    seasonal = gym.make(envs.SEASONAL_FORAGING_ID, season_length=3).unwrapped
    assert isinstance(seasonal, SeasonalForagingGrid)
    assert seasonal.season_length == 3


# -- 2. numpy / torch agreement -----------------------------------------------------------------
AGREEMENT_CASES = [
    pytest.param(dict(obs_mode=m, walls=w), None, id=f"{m}-{w}") for m in OBS_MODES for w in WALLS
] + [
    pytest.param(dict(wall_penalty=0.5), None, id="wall_penalty"),
    pytest.param(dict(wall_penalty=0.1, obs_mode="allocentric"), None, id="wall_penalty-allo"),
] + [
    pytest.param(dict(obs_mode="egocentric", walls="outside"), k, id=f"season{k}")
    for k in range(rules.N_SEASONS)
]


@pytest.mark.parametrize("kwargs,season", AGREEMENT_CASES)
def test_gym_and_batched_agree(kwargs, season, backend):
    B, T = 12, 200
    rng = np.random.default_rng(1234 + (season or 0))
    agents, foods = random_states(rng, B)
    gym_envs = [
        gym_env_with_state(agents[b], foods[b], season=season, max_steps=BIG, **kwargs)
        for b in range(B)
    ]
    batched = BatchedForagingGrid(B, max_steps=BIG, season=season, seed=99, **kwargs)
    batched.set_state(torch.as_tensor(agents), torch.as_tensor(foods))
    gym_obs = np.stack([e._observation() for e in gym_envs])
    np.testing.assert_array_equal(batched.observe().numpy(), gym_obs)

    eaten_total, bumps_total = 0, 0
    for t in range(T):
        actions = rng.integers(0, rules.N_ACTIONS, size=B)
        draws = rng.integers(0, 1 << rules.SPAWN_DRAW_BITS, size=B)
        gym_rewards = np.array(
            [e.transition(int(a), int(d)) for e, a, d in zip(gym_envs, actions, draws)]
        )
        result = batched.step(torch.as_tensor(actions), spawn_draws=torch.as_tensor(draws))

        assert not result.done.any()
        np.testing.assert_array_equal(batched.agent.numpy(), np.stack([e.agent for e in gym_envs]))
        np.testing.assert_array_equal(batched.food.numpy(), np.stack([e.food for e in gym_envs]))
        np.testing.assert_allclose(result.reward.numpy(), gym_rewards, rtol=0, atol=1e-5)
        gym_obs = np.stack([e._observation() for e in gym_envs])
        np.testing.assert_array_equal(result.observation.numpy(), gym_obs)
        np.testing.assert_array_equal(batched.steps.numpy(), [e.steps for e in gym_envs])
        eaten_total += int(result.food_eaten.sum())
        bumps_total += int((gym_rewards < -0.01 - 1e-9).sum())
    # The comparison only means something if food was eaten (and respawned) along the way.
    assert eaten_total >= 5
    assert eaten_total == sum(e.food_eaten for e in gym_envs)
    if kwargs.get("wall_penalty"):
        assert bumps_total >= 5


def test_gym_and_batched_agree_dense_food_with_extreme_draws(backend):
    """Many eats per step and the extreme draws 0 and 2**bits - 1 exercise every spawn branch."""
    B, T, n_food = 8, 150, 120
    rng = np.random.default_rng(7)
    agents, foods = random_states(rng, B, n_food=n_food)
    gym_envs = [
        SeasonalForagingGrid(n_food=n_food, max_steps=BIG, obs_mode="allocentric") for _ in range(B)
    ]
    for b, e in enumerate(gym_envs):
        e.reset(seed=b, options={"season": 1})
        e.agent, e.food, e.steps = agents[b].copy(), foods[b].copy(), 0
    batched = BatchedForagingGrid(B, n_food=n_food, max_steps=BIG, obs_mode="allocentric", season=1)
    batched.set_state(torch.as_tensor(agents), torch.as_tensor(foods))
    top = (1 << rules.SPAWN_DRAW_BITS) - 1
    for t in range(T):
        actions = rng.integers(0, rules.N_ACTIONS, size=B)
        draws = rng.integers(0, 1 << rules.SPAWN_DRAW_BITS, size=B)
        draws[t % B] = 0
        draws[(t + 3) % B] = top
        gym_rewards = [e.transition(int(a), int(d)) for e, a, d in zip(gym_envs, actions, draws)]
        result = batched.step(torch.as_tensor(actions), spawn_draws=torch.as_tensor(draws))
        np.testing.assert_array_equal(batched.agent.numpy(), np.stack([e.agent for e in gym_envs]))
        np.testing.assert_array_equal(batched.food.numpy(), np.stack([e.food for e in gym_envs]))
        np.testing.assert_allclose(result.reward.numpy(), gym_rewards, rtol=0, atol=1e-5)
        np.testing.assert_array_equal(
            result.observation.numpy(), np.stack([e._observation() for e in gym_envs])
        )
    assert sum(e.food_eaten for e in gym_envs) >= 100


# -- 3. seeding ---------------------------------------------------------------------------------
def _gym_rollout(env: ForagingGrid, seed: int, steps: int = 60) -> np.ndarray:
    obs, _ = env.reset(seed=seed)
    actions = np.random.default_rng(0).integers(0, rules.N_ACTIONS, size=steps)
    frames = [obs]
    for a in actions:
        obs, *_ = env.step(int(a))
        frames.append(obs)
    return np.stack(frames)


@pytest.mark.parametrize("cls", [ForagingGrid, SeasonalForagingGrid])
def test_gym_seeding(cls):
    env = cls(n_food=40)  # dense food so that spawn randomness shows up within the rollout
    first = _gym_rollout(env, seed=5)
    second = _gym_rollout(env, seed=5)
    np.testing.assert_array_equal(first, second)
    fresh = _gym_rollout(cls(n_food=40), seed=5)
    np.testing.assert_array_equal(first, fresh)
    other = _gym_rollout(env, seed=6)
    assert not np.array_equal(first, other)


def _batched_rollout(env: BatchedForagingGrid, steps: int = 60) -> np.ndarray:
    gen = torch.Generator().manual_seed(0)
    frames = [env.observe().clone()]
    for _ in range(steps):
        actions = torch.randint(0, rules.N_ACTIONS, (env.num_worlds,), generator=gen)
        frames.append(env.step(actions).observation.clone())
    return torch.stack(frames).numpy()


def test_batched_paths_give_the_same_worlds_from_the_same_seed():
    """C and torch steps draw the same numbers from the same generator: the same seed gives the
    same observations, rewards and episode ends on either path (auto-resets included)."""
    from gsnn import native

    kwargs = dict(n_food=12, max_steps=40, wall_penalty=0.2, season=3)
    native_env = BatchedForagingGrid(16, seed=8, **kwargs)
    with native.torch_only():
        torch_env = BatchedForagingGrid(16, seed=8, **kwargs)
    gen = torch.Generator().manual_seed(1)
    for _ in range(130):
        actions = torch.randint(0, rules.N_ACTIONS, (16,), generator=gen)
        a = native_env.step(actions)
        with native.torch_only():
            b = torch_env.step(actions)
        for field in ("observation", "reward", "done", "food_eaten", "episode_food"):
            x, y = getattr(a, field), getattr(b, field)
            assert x.dtype == y.dtype and torch.equal(x, y), field
    assert int(native_env.episode_food.sum()) > 0


def test_batched_seeding(backend):
    kwargs = dict(n_food=40, max_steps=25)  # includes auto-resets
    a = _batched_rollout(BatchedForagingGrid(6, seed=11, **kwargs))
    b = _batched_rollout(BatchedForagingGrid(6, seed=11, **kwargs))
    np.testing.assert_array_equal(a, b)
    c = _batched_rollout(BatchedForagingGrid(6, seed=12, **kwargs))
    assert not np.array_equal(a, c)
    assert not np.array_equal(a[0], c[0])
    # reset(seed) re-seeds: it reproduces a fresh env built with that seed.
    env = BatchedForagingGrid(6, seed=3, **kwargs)
    _batched_rollout(env, steps=10)
    env.reset(seed=11)
    np.testing.assert_array_equal(_batched_rollout(env), a)


def test_batched_worlds_differ_and_start_valid():
    env = BatchedForagingGrid(32, seed=0)
    assert torch.equal(env.food.sum(dim=(1, 2)), torch.full((32,), N_FOOD))
    assert not env.food[env._worlds, env.agent[:, 0], env.agent[:, 1]].any()
    assert torch.equal(env.steps, torch.zeros(32, dtype=torch.long))
    assert len({tuple(f.flatten().tolist()) for f in env.food}) == 32


# -- 4. observation content ---------------------------------------------------------------------
def test_egocentric_centre_and_food_offset():
    agent, food = (3, 10), np.zeros((SIZE, SIZE), dtype=bool)
    food[5, 8] = True  # offset (+2, -2)
    food[3, 11] = True  # offset (0, +1)
    env = gym_env_with_state(agent, food)
    obs = env._observation()
    expected = np.zeros((SIZE, SIZE), dtype=np.float32)
    expected[CENTRE + 2, CENTRE - 2] = 1.0
    expected[CENTRE, CENTRE + 1] = 1.0
    np.testing.assert_array_equal(obs[1], expected)
    batched = BatchedForagingGrid(1)
    batched.set_state(torch.tensor([agent]), torch.as_tensor(food)[None])
    np.testing.assert_array_equal(batched.observe()[0].numpy(), obs)

    # Agent in the middle of the grid: the window is the grid itself, no walls at all.
    env = gym_env_with_state((CENTRE, CENTRE), food)
    obs = env._observation()
    np.testing.assert_array_equal(obs[1], food.astype(np.float32))
    assert obs[0].sum() == 0


def test_egocentric_walls_at_corner():
    food = np.zeros((SIZE, SIZE), dtype=bool)
    border = gym_env_with_state((0, 0), food, walls="border")._observation()[0]
    wall_cells = set(zip(*np.nonzero(border)))
    expected = {(CENTRE - 1, j) for j in range(CENTRE - 1, SIZE)} | {
        (i, CENTRE - 1) for i in range(CENTRE - 1, SIZE)
    }
    assert wall_cells == expected
    outside = gym_env_with_state((0, 0), food, walls="outside")._observation()[0]
    rows, cols = np.indices((SIZE, SIZE))
    np.testing.assert_array_equal(outside, ((rows < CENTRE) | (cols < CENTRE)).astype(np.float32))
    # Bottom-right corner: the ring is just below / right of the centre.
    border = gym_env_with_state((SIZE - 1, SIZE - 1), food, walls="border")._observation()[0]
    assert set(zip(*np.nonzero(border))) == {(CENTRE + 1, j) for j in range(CENTRE + 2)} | {
        (i, CENTRE + 1) for i in range(CENTRE + 2)
    }


@pytest.mark.parametrize("walls", WALLS)
def test_egocentric_every_agent_position(walls, backend):
    rng = np.random.default_rng(3)
    cells = [(r, c) for r in range(SIZE) for c in range(SIZE)]
    B = len(cells)
    agents = np.array(cells, dtype=np.int64)
    foods = np.zeros((B, SIZE, SIZE), dtype=bool)
    for b, (r, c) in enumerate(cells):
        others = np.delete(np.arange(SIZE * SIZE), r * SIZE + c)
        foods[b].flat[rng.choice(others, size=N_FOOD, replace=False)] = True
    batched = BatchedForagingGrid(B, walls=walls)
    batched.set_state(torch.as_tensor(agents), torch.as_tensor(foods))
    batched_obs = batched.observe().numpy()
    env = gym_env_with_state(agents[0], foods[0], walls=walls)
    for b in range(B):
        env.agent, env.food = agents[b], foods[b]
        obs = env._observation()
        assert obs.dtype == np.float32 and obs.shape == (2, SIZE, SIZE)
        np.testing.assert_array_equal(obs[0], expected_wall_window(agents[b], walls))
        np.testing.assert_array_equal(obs[1], expected_food_window(agents[b], foods[b]))
        np.testing.assert_array_equal(batched_obs[b], obs)


def test_allocentric_observation():
    rng = np.random.default_rng(4)
    agents, foods = random_states(rng, 5)
    batched = BatchedForagingGrid(5, obs_mode="allocentric")
    batched.set_state(torch.as_tensor(agents), torch.as_tensor(foods))
    batched_obs = batched.observe().numpy()
    for b in range(5):
        obs = gym_env_with_state(agents[b], foods[b], obs_mode="allocentric")._observation()
        one_hot = np.zeros((SIZE, SIZE), dtype=np.float32)
        one_hot[tuple(agents[b])] = 1.0
        np.testing.assert_array_equal(obs[0], one_hot)
        np.testing.assert_array_equal(obs[1], foods[b].astype(np.float32))
        np.testing.assert_array_equal(batched_obs[b], obs)


# -- 5. rules -----------------------------------------------------------------------------------
@pytest.mark.parametrize("wall_penalty", [0.0, 0.5])
def test_boundary_keeps_position_and_costs_wall_penalty(wall_penalty, backend):
    food = np.zeros((SIZE, SIZE), dtype=bool)
    food[SIZE - 1, SIZE - 1] = True
    last = SIZE - 1
    # (agent, action into the boundary)
    cases = [((0, 4), 0), ((last, 4), 1), ((4, 0), 2), ((4, last), 3), ((0, 0), 0), ((0, 0), 2)]
    for agent, action in cases:
        env = gym_env_with_state(agent, food, wall_penalty=wall_penalty, max_steps=BIG)
        reward = env.transition(action, 0)
        assert tuple(env.agent) == agent
        assert reward == pytest.approx(-0.01 - wall_penalty)
        assert env.steps == 1
    B = len(cases)
    batched = BatchedForagingGrid(B, wall_penalty=wall_penalty)
    batched.set_state(torch.tensor([c[0] for c in cases]), torch.as_tensor(food).expand(B, -1, -1))
    result = batched.step(torch.tensor([c[1] for c in cases]))
    assert batched.agent.tolist() == [list(c[0]) for c in cases]
    np.testing.assert_allclose(result.reward.numpy(), -0.01 - wall_penalty, atol=1e-6)
    # An ordinary move costs only the step penalty, whatever the wall penalty.
    env = gym_env_with_state((4, 4), food, wall_penalty=wall_penalty)
    assert env.transition(3, 0) == pytest.approx(-0.01)
    assert tuple(env.agent) == (4, 5)


def test_moves_follow_action_deltas():
    food = np.zeros((SIZE, SIZE), dtype=bool)
    for action, delta in enumerate([(-1, 0), (1, 0), (0, -1), (0, 1)]):
        env = gym_env_with_state((5, 5), food)
        env.transition(action, 0)
        assert tuple(env.agent) == (5 + delta[0], 5 + delta[1])
    batched = BatchedForagingGrid(4)
    batched.set_state(torch.full((4, 2), 5), torch.zeros(4, SIZE, SIZE, dtype=torch.bool))
    batched.step(torch.arange(4))
    assert batched.agent.tolist() == [[4, 5], [6, 5], [5, 4], [5, 6]]


def test_eating_food_reward_and_respawn(backend):
    rng = np.random.default_rng(8)
    for trial in range(20):
        agents, foods = random_states(rng, 1)
        agent = agents[0]
        # Put one food item next to the agent (inside the grid) and step onto it.
        action = next(
            a for a in range(4) if np.all((0 <= agent + rules.ACTION_DELTAS[a]) & (agent + rules.ACTION_DELTAS[a] < SIZE))
        )
        target = agent + rules.ACTION_DELTAS[action]
        food = foods[0].copy()
        if not food[tuple(target)]:
            food.flat[np.flatnonzero(food)[0]] = False
            food[tuple(target)] = True
        assert food.sum() == N_FOOD
        env = gym_env_with_state(agent, food, wall_penalty=0.5)
        reward = env.transition(action, int(rng.integers(0, 1 << rules.SPAWN_DRAW_BITS)))
        assert reward == pytest.approx(10.0 - 0.01)
        assert env.food_eaten == 1
        assert env.food.sum() == N_FOOD
        assert not env.food[tuple(env.agent)]
        assert env._info()["food_eaten"] == 1

        batched = BatchedForagingGrid(1, wall_penalty=0.5, seed=trial)
        batched.set_state(torch.as_tensor(agent)[None], torch.as_tensor(food)[None])
        result = batched.step(torch.tensor([action]))
        assert result.reward.item() == pytest.approx(10.0 - 0.01)
        assert result.food_eaten.tolist() == [True]
        assert int(batched.food.sum()) == N_FOOD
        assert not batched.food[0, target[0], target[1]]


@pytest.mark.parametrize("season", [None, 0, 2])
def test_respawn_never_on_agent_or_existing_food(season, backend):
    """Dense food makes collisions likely if the spawn rule ever picked an occupied cell."""
    B, T, n_food = 64, 120, 180
    env = BatchedForagingGrid(B, n_food=n_food, max_steps=BIG, season=season, seed=21)
    gen = torch.Generator().manual_seed(1)
    top = (1 << rules.SPAWN_DRAW_BITS) - 1
    eaten = 0
    for t in range(T):
        actions = torch.randint(0, 4, (B,), generator=gen)
        draws = torch.randint(0, 1 << rules.SPAWN_DRAW_BITS, (B,), generator=gen)
        draws[: B // 4] = 0
        draws[B // 4 : B // 2] = top
        result = env.step(actions, spawn_draws=draws if t % 2 else None)
        eaten += int(result.food_eaten.sum())
        assert torch.equal(env.food.sum(dim=(1, 2)), torch.full((B,), n_food))
        assert not env.food[env._worlds, env.agent[:, 0], env.agent[:, 1]].any()
    assert eaten > 1000

    # Same on the gym side, through its own random draws.
    gym_env = ForagingGrid(n_food=n_food, max_steps=BIG) if season is None else SeasonalForagingGrid(
        n_food=n_food, max_steps=BIG
    )
    options = None if season is None else {"season": season}
    gym_env.reset(seed=2, options=options)
    rng = np.random.default_rng(2)
    for _ in range(400):
        gym_env.step(int(rng.integers(0, 4)))
        assert gym_env.food.sum() == n_food
        assert not gym_env.food[tuple(gym_env.agent)]
    assert gym_env.food_eaten > 100


def test_spawn_rule_single_free_cell():
    """With one free cell left, every draw (including the extremes) spawns exactly there."""
    n_food = SIZE * SIZE - 1
    for draw in (0, 1, 12345, (1 << rules.SPAWN_DRAW_BITS) - 1):
        food = np.ones((SIZE, SIZE), dtype=bool)
        food[0, 0] = False  # agent's cell
        env = gym_env_with_state((0, 0), food, n_food=n_food)
        assert env.transition(3, draw) == pytest.approx(9.99)
        assert env.food.sum() == n_food and bool(env.food[0, 0]) and not env.food[0, 1]
        batched = BatchedForagingGrid(1, n_food=n_food)
        batched.set_state(torch.tensor([[0, 0]]), torch.as_tensor(food)[None])
        batched.step(torch.tensor([3]), spawn_draws=torch.tensor([draw]))
        assert torch.equal(batched.food[0], torch.as_tensor(env.food))


def test_gym_truncates_at_max_steps():
    env = ForagingGrid(max_steps=7)
    obs, info = env.reset(seed=0)
    assert set(info) >= {"food_eaten", "agent"}
    for t in range(1, 8):
        obs, reward, terminated, truncated, info = env.step(t % 4)
        assert terminated is False
        assert truncated is (t == 7)
        assert env.observation_space.contains(obs)
        assert isinstance(reward, float)
    assert env.steps == 7
    env.reset(seed=1)
    assert env.steps == 0 and env.food_eaten == 0


def test_batched_auto_reset_at_max_steps(backend):
    B, max_steps, n_food = 16, 9, 100
    env = BatchedForagingGrid(B, n_food=n_food, max_steps=max_steps, seed=4)
    # Stagger the worlds: world b has already taken b % max_steps steps.
    rng = np.random.default_rng(5)
    agents, foods = random_states(rng, B, n_food=n_food)
    start = torch.arange(B) % max_steps
    # (A copy: set_state currently aliases the steps tensor; see test_set_state_copies_steps.)
    env.set_state(torch.as_tensor(agents), torch.as_tensor(foods), steps=start.clone())
    gen = torch.Generator().manual_seed(3)
    eaten = torch.zeros(B, dtype=torch.long)
    dones, reported = 0, 0
    for t in range(1, 2 * max_steps + 1):
        result = env.step(torch.randint(0, 4, (B,), generator=gen))
        eaten += result.food_eaten.long()
        # Worlds end when their own step count reaches max_steps.
        expected_done = (start + t) % max_steps == 0
        assert torch.equal(result.done, expected_done)
        # episode_food: the food eaten in the episode that just ended, 0 elsewhere.
        assert torch.equal(result.episode_food, torch.where(result.done, eaten, torch.zeros_like(eaten)))
        assert torch.equal(env.steps, (start + t) % max_steps)
        # The returned observation is that of the (possibly fresh) current state.
        assert torch.equal(result.observation, env.observe())
        assert torch.equal(env.food.sum(dim=(1, 2)), torch.full((B,), n_food))
        assert not env.food[env._worlds, env.agent[:, 0], env.agent[:, 1]].any()
        reported += int(result.episode_food.sum())
        eaten[result.done] = 0
        dones += int(result.done.sum())
    assert dones == 2 * B
    assert reported > 0  # dense food: some finished episodes did collect food


def test_set_state_copies_steps():
    env = BatchedForagingGrid(2, max_steps=BIG)
    steps = torch.tensor([3, 5])
    env.set_state(torch.tensor([[1, 1], [2, 2]]), torch.zeros(2, SIZE, SIZE, dtype=torch.bool), steps)
    env.step(torch.tensor([0, 0]))
    assert env.steps.tolist() == [4, 6]
    assert steps.tolist() == [3, 5]  # the caller's tensor is left alone


def test_batched_step_rejects_bad_actions_and_draws(backend):
    env = BatchedForagingGrid(2, seed=0)
    before = (env.agent.clone(), env.food.clone(), env.steps.clone())
    for bad in (torch.tensor([0, 4]), torch.tensor([-1, 0]), torch.tensor([0.0, 1.0]), torch.tensor([0, 1, 2])):
        with pytest.raises(ValueError, match="actions"):
            env.step(bad)
    with pytest.raises(ValueError, match="spawn_draws"):
        env.step(torch.tensor([0, 0]), spawn_draws=torch.tensor([0, 1 << 24]))
    # Refused before any world moved.
    assert all(torch.equal(a, b) for a, b in zip(before, (env.agent, env.food, env.steps)))


def test_batched_auto_reset_only_touches_finished_worlds(backend):
    B = 4
    env = BatchedForagingGrid(B, max_steps=5, seed=0)
    agents = torch.tensor([[1, 1], [2, 2], [3, 3], [4, 4]])
    foods = torch.zeros(B, SIZE, SIZE, dtype=torch.bool)
    foods[:, 10, 10] = True
    env.set_state(agents, foods, steps=torch.tensor([4, 0, 4, 0]))
    result = env.step(torch.tensor([3, 3, 3, 3]), spawn_draws=torch.zeros(B, dtype=torch.long))
    assert result.done.tolist() == [True, False, True, False] and result.finished == 2
    assert env.steps.tolist() == [0, 1, 0, 1]
    assert env.agent[1].tolist() == [2, 3] and env.agent[3].tolist() == [4, 5]
    assert torch.equal(env.food[1], foods[1]) and torch.equal(env.food[3], foods[3])
    assert int(env.food[0].sum()) == N_FOOD and int(env.food[2].sum()) == N_FOOD
    assert env.step(torch.tensor([3, 3, 3, 3])).finished == 0


# -- 6. seasons ---------------------------------------------------------------------------------
def hot_mask(season: int) -> np.ndarray:
    return rules.season_weights(season) == rules.SEASON_HOT_WEIGHT


def test_season_quadrants():
    half = (SIZE + 1) // 2
    assert hot_mask(0)[0, 0] and hot_mask(1)[0, SIZE - 1]
    assert hot_mask(2)[SIZE - 1, SIZE - 1] and hot_mask(3)[SIZE - 1, 0]
    for k in range(rules.N_SEASONS):
        assert hot_mask(k).sum() == half * half
        assert set(np.unique(rules.season_weights(k))) == {1, rules.SEASON_HOT_WEIGHT}
    assert np.all(rules.season_weights(None) == 1)


@pytest.mark.parametrize("season", range(rules.N_SEASONS))
def test_seasonal_spawns_favour_hot_quadrant(season):
    """Each world has one food item next to the agent; eating it spawns one item by the season's
    weights. Count where the spawns land."""
    B = 4000
    env = BatchedForagingGrid(B, n_food=1, max_steps=BIG, season=season, seed=season)
    food = torch.zeros(B, SIZE, SIZE, dtype=torch.bool)
    food[:, CENTRE, CENTRE + 1] = True
    env.set_state(torch.tensor([[CENTRE, CENTRE]]).expand(B, 2), food)
    result = env.step(torch.full((B,), 3))
    assert result.food_eaten.all()
    assert torch.equal(env.food.sum(dim=(1, 2)), torch.ones(B, dtype=torch.long))
    hot = torch.as_tensor(hot_mask(season))
    in_hot = env.food[:, hot].any(dim=1).float().mean().item()

    # Exact spawn probability of the hot region, the agent's cell (7, 8) excluded.
    weights = rules.season_weights(season).astype(float)
    weights[CENTRE, CENTRE + 1] = 0
    expected = weights[hot_mask(season)].sum() / weights.sum()
    chance = (hot_mask(season).sum() - hot_mask(season)[CENTRE, CENTRE + 1]) / (SIZE * SIZE - 1)
    assert expected > 0.8 and chance < 0.3
    assert abs(in_hot - expected) < 0.03
    assert in_hot > 2.5 * chance

    # Uniform spawning (no season) lands in that quadrant at about chance.
    uniform = BatchedForagingGrid(B, n_food=1, max_steps=BIG, seed=season)
    uniform.set_state(torch.tensor([[CENTRE, CENTRE]]).expand(B, 2), food)
    uniform.step(torch.full((B,), 3))
    assert abs(uniform.food[:, hot].any(dim=1).float().mean().item() - chance) < 0.03


def test_seasonal_gym_initial_food_favours_hot_quadrant():
    env = SeasonalForagingGrid()
    for season in range(rules.N_SEASONS):
        in_hot = total = 0
        for i in range(100):
            env.reset(seed=1000 * season + i, options={"season": season})
            in_hot += int(env.food[hot_mask(season)].sum())
            total += int(env.food.sum())
        assert total == 100 * N_FOOD
        assert in_hot / total > 0.6  # chance is about 0.28


def test_season_schedule_and_pinning():
    env = gym.make(envs.SEASONAL_FORAGING_ID, season_length=2).unwrapped
    seasons = []
    for i in range(10):
        _, info = env.reset(seed=i)
        seasons.append(info["season"])
        _, _, _, _, info = env.step(0)
        assert info["season"] == seasons[-1]
    assert seasons == [0, 0, 1, 1, 2, 2, 3, 3, 0, 0]

    env = SeasonalForagingGrid(season_length=3)
    assert env.reset(seed=0)[1]["season"] == 0
    # Pinning sets the season for that episode and does not move the schedule.
    assert env.reset(options={"season": 2})[1]["season"] == 2
    assert env.season == 2
    assert [env.reset()[1]["season"] for _ in range(5)] == [0, 0, 1, 1, 1]
    assert env.reset(options={"season": 3})[1]["season"] == 3
    assert env.reset()[1]["season"] == 2

    # The default schedule is 50 episodes per season.
    env = SeasonalForagingGrid()
    seen = [env.reset()[1]["season"] for _ in range(201)]
    assert seen[:50] == [0] * 50 and seen[50:100] == [1] * 50
    assert seen[150:200] == [3] * 50 and seen[200] == 0
    # The plain env has no season in its info.
    assert "season" not in ForagingGrid().reset(seed=0)[1]


@pytest.mark.parametrize("obs_mode", OBS_MODES)
def test_season_not_in_observation(obs_mode):
    rng = np.random.default_rng(9)
    agents, foods = random_states(rng, 3)
    for b in range(3):
        observations = [
            gym_env_with_state(agents[b], foods[b], season=k, obs_mode=obs_mode)._observation()
            for k in range(rules.N_SEASONS)
        ]
        plain = gym_env_with_state(agents[b], foods[b], obs_mode=obs_mode)._observation()
        for obs in observations:
            np.testing.assert_array_equal(obs, plain)
    batched_obs = []
    for k in [None, 0, 1, 2, 3]:
        env = BatchedForagingGrid(3, obs_mode=obs_mode, season=k)
        env.set_state(torch.as_tensor(agents), torch.as_tensor(foods))
        batched_obs.append(env.observe())
    for obs in batched_obs[1:]:
        assert torch.equal(obs, batched_obs[0])
    # set_season changes only future spawns, not the current state or observation.
    env.set_season(0)
    assert torch.equal(env.observe(), batched_obs[0])


# -- 7. reference policies ----------------------------------------------------------------------
def test_reference_policies():
    random_food = mean_food_per_episode(BatchedForagingGrid(64, seed=0), "random", seed=0)
    greedy_food = mean_food_per_episode(BatchedForagingGrid(64, seed=0), "greedy", seed=0)
    assert 4 <= random_food <= 14
    assert 120 <= greedy_food <= 160
    with pytest.raises(ValueError, match="policy"):
        mean_food_per_episode(BatchedForagingGrid(2, max_steps=3), "lazy")


def test_greedy_policy_steps_toward_nearest_food():
    from envs.policies import greedy_actions

    env = BatchedForagingGrid(4)
    agents = torch.tensor([[7, 7], [7, 7], [7, 7], [7, 7]])
    foods = torch.zeros(4, SIZE, SIZE, dtype=torch.bool)
    foods[0, 2, 7] = True  # straight up
    foods[1, 9, 6] = True  # mostly down
    foods[2, 6, 3] = True  # mostly left
    foods[3, 8, 12] = True  # mostly right
    foods[3, 0, 0] = True  # farther away
    env.set_state(agents, foods)
    assert greedy_actions(env).tolist() == [0, 1, 2, 3]


# -- 8. bad arguments ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(size=2), "size"),
        (dict(size=15.0), "size"),
        (dict(size="15"), "size"),
        (dict(n_food=0), "n_food"),
        (dict(n_food=SIZE * SIZE), "n_food"),
        (dict(n_food=2.5), "n_food"),
        (dict(max_steps=0), "max_steps"),
        (dict(max_steps=True), "max_steps"),
        (dict(max_steps=2**63), "max_steps"),
        (dict(food_reward=float("nan")), "food_reward"),
        (dict(food_reward=1e39), "food_reward"),
        (dict(step_penalty=float("inf")), "step_penalty"),
        (dict(step_penalty="0.01"), "step_penalty"),
        (dict(wall_penalty=-float("inf")), "wall_penalty"),
        (dict(wall_penalty=True), "wall_penalty"),
        (dict(obs_mode="topdown"), "obs_mode"),
        (dict(walls="none"), "walls"),
    ],
)
@pytest.mark.parametrize("make", ["gym", "seasonal", "batched"])
def test_bad_world_arguments(kwargs, name, make):
    with pytest.raises(ValueError, match=name):
        if make == "gym":
            ForagingGrid(**kwargs)
        elif make == "seasonal":
            SeasonalForagingGrid(**kwargs)
        else:
            BatchedForagingGrid(4, **kwargs)


@pytest.mark.parametrize("num_worlds", [0, -1, 2.0, "4"])
def test_bad_num_worlds(num_worlds):
    with pytest.raises(ValueError, match="num_worlds"):
        BatchedForagingGrid(num_worlds)


@pytest.mark.parametrize("action", [4, -1, 1.5, "0", None])
def test_bad_gym_action(action):
    env = ForagingGrid()
    env.reset(seed=0)
    with pytest.raises(ValueError, match="action"):
        env.step(action)
    assert env.steps == 0


def test_bad_season_arguments():
    with pytest.raises(ValueError, match="season"):
        BatchedForagingGrid(2, season=4)
    with pytest.raises(ValueError, match="season"):
        BatchedForagingGrid(2).set_season(-1)
    with pytest.raises(ValueError, match="season_length"):
        SeasonalForagingGrid(season_length=0)
    env = SeasonalForagingGrid()
    with pytest.raises(ValueError, match="season"):
        env.reset(seed=0, options={"season": 4})
    with pytest.raises(ValueError, match="season"):
        env.reset(seed=0, options={"season": "winter"})
    with pytest.raises(ValueError):
        env.reset(seed=0, options={"weather": 1})
    with pytest.raises(ValueError, match="options"):
        ForagingGrid().reset(seed=0, options={"season": 1})
    with pytest.raises(ValueError, match="render_mode"):
        ForagingGrid(render_mode="human")


def test_bad_set_state():
    env = BatchedForagingGrid(2)
    food = torch.zeros(2, SIZE, SIZE, dtype=torch.bool)
    with pytest.raises(ValueError, match="agent"):
        env.set_state(torch.tensor([[0, 0], [SIZE, 0]]), food)
    food[1, 3, 3] = True
    with pytest.raises(ValueError, match="food"):
        env.set_state(torch.tensor([[0, 0], [3, 3]]), food)


@pytest.mark.parametrize("steps", [[-5, 0], [0, 500], [3, 10**6], [0.0, 1.0], [True, False]])
def test_set_state_refuses_steps_outside_an_episode(steps):
    """A world has taken 0 to max_steps - 1 steps of its episode: -5 ran it for 505 steps, and
    10**6 ended it at once."""
    env = BatchedForagingGrid(2, max_steps=500, seed=0)
    before = (env.agent.clone(), env.food.clone(), env.steps.clone())
    with pytest.raises(ValueError, match=r"^steps must be integers in \[0, 499\]"):
        env.set_state(torch.tensor([[1, 1], [2, 2]]), torch.zeros(2, SIZE, SIZE, dtype=torch.bool), torch.tensor(steps))
    assert all(torch.equal(a, b) for a, b in zip(before, (env.agent, env.food, env.steps)))  # nothing set
    env.set_state(torch.tensor([[1, 1], [2, 2]]), torch.zeros(2, SIZE, SIZE, dtype=torch.bool), torch.tensor([0, 499]))
    assert env.step(torch.tensor([0, 0])).done.tolist() == [False, True]


def test_render_ansi():
    env = ForagingGrid(render_mode="ansi")
    env.reset(seed=0)
    text = env.render()
    lines = text.split("\n")
    assert len(lines) == SIZE and all(len(line) == SIZE for line in lines)
    assert text.count("A") == 1 and text.count("*") == N_FOOD
    r, c = env.agent
    assert lines[r][c] == "A"
    assert ForagingGrid().render() is None
