"""Decisions per second: the organism evaluating and learning, against a naive one-world SNN loop.

All figures come from ONE run on ONE core (``torch.set_num_threads(1)``; the memory figures from
subprocesses it starts); every rate is the median over several timed repeats that follow a
warm-up. A *decision* is one world choosing one action, so a batch step of B worlds counts B
decisions. Each rate also records its CPU share (thread CPU
time / wall time): on a shared machine, a share below ~0.95 means other processes took the core
and the wall-clock figures of that run understate the code (the table then prints a warning).

Every ratio compares rates timed SIDE BY SIDE: the runs being compared take their repeats in
turns (``interleaved``: A B C A B C ...) and the ratio is the median over repeats of the
per-repeat ratio. The development machine's speed drifts by up to 2x from minute to minute (a
shared host; the CPU share stays at 1.00, so it is not another process of ours), and rates timed
one after the other would mostly measure that drift.

What is measured
----------------
organism_eval
    ``gsnn.organism.Organism.act(obs, greedy=True)`` deciding for a ``BatchedForagingGrid``
    (egocentric observations, 450 inputs) at hidden sizes 64, 256, 512, 1024 and batch sizes 64
    and 256, timed side by side with the naive reference and a matrix product of the same hidden
    size. Two rates per (H, B):

    - ``full_loop``: decide + ``env.step`` + ``reset_worlds`` + next observation, the loop of
      ``gsnn.train.evaluate``;
    - ``organism_only``: ``act`` alone, cycling through a fixed, pre-generated set of
      observation batches (no env work in the timed region).

naive_reference
    What the project must beat, as the prototype did it: one world at a time (batch 1) in a
    gymnasium ``envs.ForagingGrid`` stepped after every decision; per decision T = 10 steps of
    ``norse.torch.LIFCell`` (default parameters, state carried across decisions), each step
    recomputing the dense input current ``torch.nn.Linear(450, H)`` from the 450-vector; readout
    ``torch.nn.Linear(H, 4)`` on the spike counts; argmax. The headline rate runs under
    ``torch.no_grad()`` (which only helps it); the same loop with autograd on (state detached
    between decisions) is reported beside it. Calibrated and timed like the organism's runs,
    in turn with them.

env_step
    ``BatchedForagingGrid.step`` alone with pre-drawn random actions, per batch size: the ceiling
    that the full loop can never exceed whatever the organism costs.

ratios
    ``organism_eval`` (batch 256, full loop) / ``naive_reference`` at the same H, per repeat.
    TARGET: >= 300x at H = 512.

dense_matmul, matmul_beside
    This core's float32 matrix-multiply rate: ``dense_matmul`` times 256x450 @ 450x512 and
    1024x1024 @ 1024x1024 on their own (for the record); ``matmul_beside`` times 256x450 @
    450x512 beside the organism at every H, and that is the matrix rate the ratios use. The
    *dense bound* at hidden size H is matrix rate / dense FLOPs per decision, with
    dense FLOPs per decision = 2 * (450 * H + T * H * 4): the input projection once plus the
    readout on every SNN step, i.e. what a dense implementation must at least do, ignoring the
    LIF arithmetic itself. ``organism_eval / dense_bound`` > 1 means the organism decides faster
    than any dense implementation could (it uses the observation's sparsity and reads out once).
    TARGET: >= 1.0 at H = 512, full loop.

organism_learning
    Decisions/s while learning, per learning rule (``reinforce``, ``rstdp``), at hidden sizes
    64, 256, 512, 1024 (``--quick``: 512) and batch sizes 16 (the population's default
    ``population.worlds``) and 256 (as ``organism_eval``). The timed loop is ``gsnn.train.live``'s:
    ``learn_act`` + ``env.step`` + ``learn_feedback`` (which makes the update every
    ``rollout_length`` = 16 decision steps) + the finished-episode bookkeeping, in the organism's
    own ``BatchedForagingGrid``; one timed call is one whole rollout, so the update is always
    inside the timed region, and ``finish_rollout`` runs at the end of each repeat (as at the end
    of ``live``; it has nothing left to learn there). The organism's structure is held fixed:
    ``grow_threshold = prune_threshold = 0`` (no rate is below 0), so ``structural_step`` still
    runs its checks but never grows or prunes; the size is checked after timing. Beside each
    (H, B), evaluation's full loop (as ``organism_eval``'s ``full_loop``) is timed in turn with
    the learners, for an organism of the same configuration in worlds of the same batch and seed,
    and ``learning_over_eval`` = learning / evaluation decisions/s, per repeat. ``time_shares``
    splits one further (untimed for the headline) pass into ``learn_act``, ``env_step``,
    ``learn_feedback`` (steps without an update), ``update`` (steps with one: backward or R-STDP
    directions, clip, Adam, finiteness checks, ``structural_step``) and ``other`` (the loop's
    own bookkeeping). TARGETS at H = 512 (each batch size): REINFORCE >= 0.25 and R-STDP >= 0.50
    of evaluation's rate.

pruning
    Cost against active size. One organism is born at 64 neurons and really grows to 512 through
    its own learning loop (``live`` with ``grow_threshold = 1``, ``grow_interval = 1``, 64
    neurons per growth). A copy of it (loaded from its state) is pruned to 128 by its own prune
    path (one more rollout of ``live`` with ``prune_threshold = 1``, ``prune_grace = 0``,
    ``min_hidden = 128``, growth checks off: ``structural_step`` removes the 384 quietest
    neurons through ``Organism.prune``). Both, their structure frozen (thresholds 0), are timed
    side by side: evaluation (full loop and organism only, at the largest eval batch) and
    learning (their rule, REINFORCE, in their own 16 worlds). ``speedup`` = rate at 128 / rate
    at 512, per repeat. TARGET: >= 2.5x per decision of the organism (``organism_only``; the
    world's step, the same for both, is in the full loop and bounds its speed-up).

memory
    Peak RSS of a fresh Python subprocess that imports torch, gsnn and envs (what an organism
    actor imports besides Ray; Norse is imported only for the reference path), builds one
    organism at hidden 1024 (structure fixed), runs ``gsnn.train.live`` for
    ``memory_learn_steps`` decision steps in 16 worlds on one torch thread, evaluates it greedily
    on 32 worlds for one episode and saves a checkpoint: one generation of an organism actor's
    work. The peak is ``VmHWM`` from ``/proc/self/status`` (``ru_maxrss`` where there is no
    /proc; on Linux ``ru_maxrss`` would report the parent benchmark's own peak, which it inherits
    across fork + exec). Reported per rule, with the peak already reached after the imports, after
    building the organism, and after learning. It EXCLUDES everything Ray adds to an actor (the
    ray/tune imports, the core worker and its threads, the Trainable, Tune's result and
    checkpoint handling, the shared-memory object store): ``python -m benchmarks.population``
    measures real actors.
    TARGET: <= 400 MB (10^6 bytes) per organism at hidden 1024.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

T_STEPS = 10  # SNN steps per decision (OrganismConfig.snn_steps default)
N_INPUTS = 450
N_ACTIONS = 4
TARGET_RATIO_H512 = 300.0
TARGET_LEARNING_OVER_EVAL = {"reinforce": 0.25, "rstdp": 0.50}  # at H = 512, same batch
TARGET_PRUNED_SPEEDUP = 2.5  # 128 active neurons (pruned from 512) against 512, per decision
TARGET_MEMORY_BYTES = 400 * 10**6  # peak RSS per organism at hidden 1024
LEARNING_RULES = ("reinforce", "rstdp")  # gsnn.config.LEARNING_RULES


# -- settings --------------------------------------------------------------------------------------
@dataclass
class Settings:
    hidden_sizes: tuple[int, ...] = (64, 256, 512, 1024)
    batch_sizes: tuple[int, ...] = (64, 256)
    repeats: int = 9  # timed repeats per measurement (the median is reported)
    repeat_seconds: float = 0.5  # aim for about this long per timed repeat (organism, matmul)
    warmup_seconds: float = 0.2
    naive_decisions: int = 400  # decisions per timed repeat of the naive reference
    naive_repeats: int = 7
    observation_batches: int = 32  # pre-generated observation batches for organism_only
    # Learning (decisions/s including the update), per rule, against evaluation at the same H, B.
    learn_hidden_sizes: tuple[int, ...] = (64, 256, 512, 1024)
    learn_batch_sizes: tuple[int, ...] = (16, 256)  # 16 = population.worlds default
    learning_rules: tuple[str, ...] = LEARNING_RULES
    # Pruning: an organism grown to prune_from neurons, then pruned to prune_to.
    prune_from: int = 512
    prune_to: int = 128
    prune_learn_batch: int = 16
    # Peak RSS of one organism learning, in a fresh subprocess.
    memory_hidden: int = 1024
    memory_worlds: int = 16
    memory_eval_worlds: int = 32
    memory_learn_steps: int = 1000  # one generation of the default config: 2 episodes of 500
    memory_rules: tuple[str, ...] = LEARNING_RULES

    @classmethod
    def quick(cls) -> "Settings":
        return cls(hidden_sizes=(64, 512), batch_sizes=(256,), repeats=5, repeat_seconds=0.3,
                   warmup_seconds=0.1, naive_decisions=200, naive_repeats=5, observation_batches=16,
                   learn_hidden_sizes=(512,), memory_learn_steps=200, memory_rules=("reinforce",))

    @classmethod
    def tiny(cls) -> "Settings":
        """For tests: every code path once, at small sizes, with next to no timing."""
        return cls(hidden_sizes=(32,), batch_sizes=(8,), repeats=2, repeat_seconds=0.01,
                   warmup_seconds=0.0, naive_decisions=5, naive_repeats=2, observation_batches=2,
                   learn_hidden_sizes=(32,), learn_batch_sizes=(4,), prune_from=96, prune_to=48,
                   prune_learn_batch=4, memory_hidden=64, memory_worlds=4, memory_eval_worlds=4,
                   memory_learn_steps=20, memory_rules=("rstdp",))


# -- timing ----------------------------------------------------------------------------------------
@dataclass
class Rate:
    """Units per second (decisions, or matrix multiplications) over timed repeats.

    ``median``/``low``/``high`` are wall-clock rates (median, slowest and fastest repeat): the
    headline. ``cpu_median`` is the median rate per CPU-second of this thread and ``cpu_share``
    the median of thread CPU time / wall time: below about 0.95 other processes took the core
    away during the measurement, and ``cpu_median`` is the better estimate of the code's speed
    (it still includes any cache and memory-bandwidth contention)."""

    median: float
    low: float
    high: float
    cpu_median: float
    cpu_share: float
    repeats: int
    units_per_repeat: int  # decisions (or multiplications) per timed repeat
    rates: list[float] = field(default_factory=list)  # each repeat's rate, in order (see interleaved)


def _rate_of(walls: list[float], cpus: list[float], units: int) -> Rate:
    rates = [units / wall for wall in walls]
    return Rate(
        median=statistics.median(rates), low=min(rates), high=max(rates),
        cpu_median=statistics.median(units / max(cpu, 1e-9) for cpu in cpus),
        cpu_share=statistics.median(cpu / wall for cpu, wall in zip(cpus, walls)),
        repeats=len(walls), units_per_repeat=units, rates=rates,
    )


def interleaved(runs: dict[str, tuple[Callable[[int], None], int]], settings: "Settings",
                repeats: int | None = None) -> dict[str, Rate]:
    """Rates of several runs measured side by side: ``runs`` maps a name to ``(run, units)``
    where ``run(n)`` does n calls of ``units`` units each. Each run is warmed up and calibrated
    (n calls last about ``repeat_seconds``), then the repeats are taken in turns (A B C A B C
    ...), so a machine whose speed drifts (a shared host: this one's rates move by 2x from
    minute to minute) slows every run alike, and ``ratio`` compares them repeat by repeat."""
    calibrated = {}
    for name, (run, units) in runs.items():
        run(1)
        calls, start = 0, time.perf_counter()
        while time.perf_counter() - start < settings.warmup_seconds or calls < 2:
            run(1)
            calls += 1
        per_call = (time.perf_counter() - start) / calls
        calibrated[name] = (run, max(1, round(settings.repeat_seconds / per_call)), units)
    walls = {name: [] for name in runs}
    cpus = {name: [] for name in runs}
    for _ in range(repeats or settings.repeats):
        for name, (run, n, _) in calibrated.items():
            wall0, cpu0 = time.perf_counter(), time.thread_time()
            run(n)
            cpus[name].append(time.thread_time() - cpu0)
            walls[name].append(time.perf_counter() - wall0)
    return {name: _rate_of(walls[name], cpus[name], n * units) for name, (_, n, units) in calibrated.items()}


def ratio(a: Rate | dict, b: Rate | dict) -> float:
    """The median over repeats of a's rate / b's rate in the same repeat (``interleaved``)."""
    a_rates = a.rates if isinstance(a, Rate) else a["rates"]
    b_rates = b.rates if isinstance(b, Rate) else b["rates"]
    return statistics.median(x / y for x, y in zip(a_rates, b_rates))


# -- 1. the organism evaluating, 3. the naive reference, 4. the dense matrix rate ------------------
def make_organism(hidden: int):
    from gsnn.config import OrganismConfig
    from gsnn.organism import Organism

    config = OrganismConfig(init_hidden=hidden, max_hidden=max(hidden, 512), min_hidden=min(32, hidden))
    return Organism(config)


def eval_runs(organism, env, settings: Settings, prefix: str = "") -> tuple[dict, float]:
    """Runners (see ``interleaved``) of ``organism`` evaluating in ``env``: ``full_loop`` (decide,
    step, reset finished worlds: ``gsnn.train.evaluate``'s loop) and ``organism_only`` (``act``
    alone on a fixed set of observation batches from worlds driven by the organism itself), and
    the mean active inputs of those observations. The organism's LIF state is reset."""
    batch = env.num_worlds
    obs = env.reset()
    organism.reset_state(batch)
    stored = []
    for _ in range(settings.observation_batches):
        stored.append(obs.clone())
        obs = env.step(organism.act(obs, greedy=True)).observation
    position = 0

    @torch.no_grad()  # as gsnn.train.evaluate
    def full_loop(n: int) -> None:
        nonlocal obs
        for _ in range(n):
            result = env.step(organism.act(obs, greedy=True))
            organism.reset_worlds(result.done)
            obs = result.observation
        organism.energy.reset()

    @torch.no_grad()
    def organism_only(n: int) -> None:
        nonlocal position
        for _ in range(n):
            organism.act(stored[position], greedy=True)
            position = (position + 1) % len(stored)
        organism.energy.reset()

    active = float(torch.stack(stored).reshape(-1, N_INPUTS).count_nonzero(dim=1).float().mean())
    return {prefix + "full_loop": (full_loop, batch), prefix + "organism_only": (organism_only, batch)}, active


@dataclass
class NaiveAgent:
    """The prototype's decision: dense input every SNN step, Norse LIFCell, readout on counts."""

    hidden: int
    seed: int = 0
    encoder: torch.nn.Linear = field(init=False)
    cell: torch.nn.Module = field(init=False)
    readout: torch.nn.Linear = field(init=False)
    state: object = None

    def __post_init__(self):
        import norse.torch as norse

        torch.manual_seed(self.seed)
        self.encoder = torch.nn.Linear(N_INPUTS, self.hidden)
        self.cell = norse.LIFCell()
        self.readout = torch.nn.Linear(self.hidden, N_ACTIONS)

    def decide(self, observation) -> int:
        x = torch.as_tensor(observation).reshape(1, N_INPUTS)
        counts = torch.zeros(1, self.hidden)
        for _ in range(T_STEPS):
            z, self.state = self.cell(self.encoder(x), self.state)
            counts = counts + z
        return int(self.readout(counts).argmax(dim=1))


def naive_run(hidden: int, grad: bool = False, seed: int = 0) -> Callable[[int], None]:
    """``run(n)``: n naive decisions, each followed by a gymnasium env step; under
    ``torch.no_grad()`` unless ``grad`` (then the state is detached between decisions, as a
    plain nn.Module prototype would run it)."""
    from envs import ForagingGrid

    agent = NaiveAgent(hidden, seed)
    env = ForagingGrid()
    observation, _ = env.reset(seed=seed)

    def run(n: int) -> None:
        nonlocal observation
        with torch.set_grad_enabled(grad):
            for _ in range(n):
                observation, _, terminated, truncated, _ = env.step(agent.decide(observation))
                if grad:
                    agent.state = type(agent.state)(*(t.detach() for t in agent.state))
                if terminated or truncated:
                    observation, _ = env.reset()
                    agent.state = None

    return run


def matmul_run(m: int, k: int, n: int) -> Callable[[int], None]:
    a, b, out = torch.randn(m, k), torch.randn(k, n), torch.empty(m, n)

    def run(calls: int) -> None:
        for _ in range(calls):
            torch.mm(a, b, out=out)

    return run


def measure_size(hidden: int, settings: Settings, seed: int = 0) -> dict:
    """At one hidden size, side by side (``interleaved``): the organism's ``full_loop`` and
    ``organism_only`` at every batch size, the naive reference (no_grad, the headline) and this
    core's 256x450 @ 450x512 matrix rate; the naive loop with autograd on is timed after them."""
    from envs import BatchedForagingGrid

    runs, active = {}, {}
    for batch in settings.batch_sizes:
        batch_runs, active[batch] = eval_runs(make_organism(hidden), BatchedForagingGrid(batch, seed=seed), settings,
                                              prefix=f"B{batch}_")
        runs.update(batch_runs)
    runs["naive"] = (naive_run(hidden, seed=seed), 1)
    runs["matmul"] = (matmul_run(*MATMUL_SHAPE), 1)
    rates = interleaved(runs, settings)
    autograd = interleaved({"naive_autograd": (naive_run(hidden, grad=True, seed=seed), 1)}, settings,
                           repeats=settings.naive_repeats)["naive_autograd"]
    evals = [{"hidden": hidden, "batch": batch, "full_loop": asdict(rates[f"B{batch}_full_loop"]),
              "organism_only": asdict(rates[f"B{batch}_organism_only"]), "active_inputs_per_decision": active[batch]}
             for batch in settings.batch_sizes]
    naive = {"hidden": hidden, "batch": 1, "decisions_per_s": asdict(rates["naive"]),
             "decisions_per_s_autograd": asdict(autograd)}
    return {"organism_eval": evals, "naive_reference": naive, "matmul": asdict(rates["matmul"])}


# -- the env alone (the ceiling of the full loop) --------------------------------------------------
def measure_env(batch: int, settings: Settings, seed: int = 0) -> dict:
    """World-steps/s of BatchedForagingGrid.step with pre-drawn random actions: no organism."""
    from envs import BatchedForagingGrid

    env = BatchedForagingGrid(batch, seed=seed)
    env.reset()
    actions = torch.randint(0, N_ACTIONS, (64, batch), generator=torch.Generator().manual_seed(seed))
    position = 0

    def run(n: int) -> None:
        nonlocal position
        for _ in range(n):
            env.step(actions[position])
            position = (position + 1) % len(actions)

    return {"batch": batch, "steps_per_s": asdict(interleaved({"env": (run, batch)}, settings)["env"])}


# -- 2. the organism learning ----------------------------------------------------------------------
def fixed_size_config(hidden: int, **overrides):
    """An OrganismConfig whose structure never changes: no firing rate is below 0, so with
    grow_threshold = prune_threshold = 0 ``structural_step`` runs its checks but never acts."""
    from gsnn.config import OrganismConfig

    values = dict(init_hidden=hidden, max_hidden=hidden, min_hidden=min(32, hidden),
                  grow_threshold=0.0, prune_threshold=0.0)
    return OrganismConfig(**{**values, **overrides})


def freeze_structure(organism) -> None:
    """Make the organism's current size final (PBT's own path for new settings: set_config)."""
    H = organism.hidden_neurons
    organism.set_config(replace(organism.config, init_hidden=H, max_hidden=H, min_hidden=min(32, H),
                                grow_threshold=0.0, prune_threshold=0.0))


def learn_run(organism, env) -> tuple[Callable[[int], None], int]:
    """A runner of ``gsnn.train.live``'s loop: one call = one whole rollout (so the update is
    always inside the timed region), ``finish_rollout`` included as at the end of ``live``."""
    from gsnn.train import live

    steps = organism.config.rollout_length
    obs = env.reset()
    organism.reset_state(env.num_worlds)

    def run(n: int) -> None:
        nonlocal obs
        obs, _ = live(organism, env, n * steps, obs)

    return run, steps * env.num_worlds


@torch.no_grad()  # as gsnn.train.live
def learn_details(organism, env, decisions: int) -> dict:
    """Where learning time goes: one further (untimed for the headline) pass of about
    ``decisions`` decisions split into learn_act, env_step, learn_feedback, update, other."""
    batch = env.num_worlds
    hidden, updates_before = organism.hidden_neurons, organism.stats.updates
    obs = env.reset()
    organism.reset_state(batch)
    phases = dict.fromkeys(("learn_act", "env_step", "learn_feedback", "update", "other"), 0.0)
    clock = time.perf_counter
    finished: list[float] = []
    for _ in range(max(organism.config.rollout_length, decisions // batch)):
        t0 = clock()
        actions = organism.learn_act(obs)
        t1 = clock()
        result = env.step(actions)
        t2 = clock()
        updated = organism.learn_feedback(result.reward, result.done)
        t3 = clock()
        if bool(result.done.any()):
            finished.extend(result.episode_food[result.done].tolist())
        obs = result.observation
        t4 = clock()
        phases["learn_act"] += t1 - t0
        phases["env_step"] += t2 - t1
        phases["update" if updated else "learn_feedback"] += t3 - t2
        phases["other"] += t4 - t3
    organism.finish_rollout()
    if organism.hidden_neurons != hidden:
        raise RuntimeError(f"the organism changed size while timed: {hidden} -> {organism.hidden_neurons}")
    total = sum(phases.values())
    return {"time_shares": {k: v / total for k, v in phases.items()},
            "updates": organism.stats.updates - updates_before,
            "nonfinite_updates_skipped": organism.stats.nonfinite_updates_skipped}


def measure_learning(hidden: int, batch: int, settings: Settings, seed: int = 0) -> dict:
    """Per rule, side by side with evaluation's full loop at the same (H, B): learning
    decisions/s and ``learning_over_eval`` (the median over repeats of the two rates' ratio)."""
    from envs import BatchedForagingGrid
    from gsnn.organism import Organism

    runs = {"eval": eval_runs(Organism(fixed_size_config(hidden, seed=seed)), BatchedForagingGrid(batch, seed=seed),
                              settings)[0]["full_loop"]}
    learners = {}
    for rule in settings.learning_rules:
        organism = Organism(fixed_size_config(hidden, learning_rule=rule, seed=seed))
        env = BatchedForagingGrid(batch, seed=seed)
        learners[rule] = (organism, env)
        runs[rule] = learn_run(organism, env)
    rates = interleaved(runs, settings)
    rules = {}
    for rule, (organism, env) in learners.items():
        measured = {"decisions_per_s": asdict(rates[rule]), **learn_details(organism, env, rates[rule].units_per_repeat),
                    "learning_over_eval": ratio(rates[rule], rates["eval"])}
        if hidden == 512 and rule in TARGET_LEARNING_OVER_EVAL:
            measured["target_learning_over_eval"] = TARGET_LEARNING_OVER_EVAL[rule]
            measured["meets_target"] = measured["learning_over_eval"] >= TARGET_LEARNING_OVER_EVAL[rule]
        rules[rule] = measured
    return {"hidden": hidden, "batch": batch, "eval_full_loop": asdict(rates["eval"]), "rules": rules}


# -- 5. cost against active size: an organism grown, then pruned -----------------------------------
def measure_pruning(settings: Settings, seed: int = 0) -> dict:
    """One organism grows to ``prune_from`` through its own learning; a copy of it (loaded from
    its state) is pruned to ``prune_to`` through its own prune path; both are then timed side by
    side (see the module docstring)."""
    from envs import BatchedForagingGrid
    from gsnn.config import OrganismConfig
    from gsnn.organism import Organism
    from gsnn.train import live

    big, small = settings.prune_from, settings.prune_to
    start = min(64, small)
    config = OrganismConfig(init_hidden=start, min_hidden=min(32, start), max_hidden=big, grow_threshold=1.0,
                            grow_interval=1, neurons_per_grow=64, prune_threshold=0.0, seed=seed)
    grown = Organism(config)
    env = BatchedForagingGrid(settings.prune_learn_batch, seed=seed)
    steps, obs = config.rollout_length, None
    for _ in range(4 * big // config.neurons_per_grow + 4):  # one growth per rollout, while rate < 1
        if grown.hidden_neurons >= big:
            break
        obs, _ = live(grown, env, steps, obs)
    if grown.hidden_neurons != big:
        raise RuntimeError(f"the organism grew to {grown.hidden_neurons}, not {big}")
    growth = {"grow_events": grown.stats.grow_events, "neurons_added": grown.stats.neurons_added,
              "learning_steps": grown.stats.decision_steps}
    pruned = Organism(config)
    pruned.load_state_dict(grown.state_dict())
    # Prune through the organism's own path: every neuron is a candidate (rate < 1), none is in
    # its grace period, the quietest go first down to min_hidden; growth checks are off.
    pruned.set_config(replace(pruned.config, init_hidden=small, min_hidden=small, max_hidden=big,
                              grow_threshold=1.0, prune_threshold=1.0, prune_interval=1, prune_grace=0,
                              grow_interval=10**9))
    before = pruned.stats.prune_events
    live(pruned, BatchedForagingGrid(settings.prune_learn_batch, seed=seed + 1), steps)
    if pruned.hidden_neurons != small or pruned.stats.prune_events != before + 1:
        raise RuntimeError(f"pruning left {pruned.hidden_neurons} neurons, expected {small}")

    runs, active, learn_envs = {}, {}, {}
    eval_batch = max(settings.batch_sizes)
    for name, organism in (("big", grown), ("small", pruned)):
        freeze_structure(organism)
        side_runs, active[name] = eval_runs(organism, BatchedForagingGrid(eval_batch, seed=seed), settings,
                                            prefix=f"{name}_")
        runs.update(side_runs)
        learn_envs[name] = BatchedForagingGrid(settings.prune_learn_batch, seed=seed)
        runs[f"{name}_learning"] = learn_run(organism, learn_envs[name])
    rates = interleaved(runs, settings)
    sides = {}
    for name, organism in (("big", grown), ("small", pruned)):
        learning = {"decisions_per_s": asdict(rates[f"{name}_learning"]), "batch": settings.prune_learn_batch,
                    "rule": organism.config.learning_rule}
        if organism.hidden_neurons != (big if name == "big" else small):
            raise RuntimeError("the organism changed size while timed")
        sides[name] = {"hidden": organism.hidden_neurons, "full_loop": asdict(rates[f"{name}_full_loop"]),
                       "organism_only": asdict(rates[f"{name}_organism_only"]),
                       "active_inputs_per_decision": active[name], "learning": learning}
    speedup = {part: ratio(rates[f"small_{part}"], rates[f"big_{part}"])
               for part in ("full_loop", "organism_only", "learning")}
    return {
        "grown_from": start, "grown": growth, "pruned_from": big, "pruned_to": small,
        "neurons_removed": pruned.stats.neurons_removed, "eval_batch": eval_batch,
        "before_pruning": sides["big"], "after_pruning": sides["small"], "speedup": speedup,
        "target_speedup": TARGET_PRUNED_SPEEDUP,
        "meets_target": speedup["organism_only"] >= TARGET_PRUNED_SPEEDUP,
    }


# -- 7. peak memory of one organism learning -------------------------------------------------------
def memory_child(rule: str, hidden: int, worlds: int, eval_worlds: int, learn_steps: int) -> dict:
    """Run in a fresh process (see ``measure_memory``): one generation of an actor's work."""
    import resource
    import tempfile

    def status(field: str) -> int | None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None

    def peak() -> int:
        # VmHWM: the high-water mark of this address space, new at exec. (ru_maxrss is not used
        # where VmHWM exists: Linux carries the parent's high-water mark across fork + exec into
        # it, so in a child of a big process it reports the parent's peak.)
        hwm = status("VmHWM")
        if hwm is not None:
            return hwm
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        return kib if sys.platform == "darwin" else kib * 1024

    def current() -> int:
        return status("VmRSS") or 0

    torch.set_num_threads(1)
    from gsnn.organism import Organism
    from gsnn.train import WorldConfig, evaluate, live

    imports = {"peak": peak(), "current": current()}
    world = WorldConfig(num_worlds=worlds)
    organism = Organism(fixed_size_config(hidden, learning_rule=rule))
    after_organism = peak()
    live(organism, world.make(seed=0), learn_steps)
    after_learning = peak()
    evaluate(organism, world.make(seed=1, num_worlds=eval_worlds), seed=1)
    with tempfile.TemporaryDirectory() as folder:
        organism.save(Path(folder) / "organism.ckpt")
    tensors = sum(p.numel() * p.element_size() for p in organism.params.values())
    tensors += sum(t.numel() * t.element_size() for moments in (organism.optimizer.exp_avg,
                   organism.optimizer.exp_avg_sq) for t in moments.values())
    return {
        "peak_source": "VmHWM" if status("VmHWM") is not None else "ru_maxrss",
        "rss_after_imports_bytes": imports["peak"], "rss_current_after_imports_bytes": imports["current"],
        "peak_rss_after_organism_bytes": after_organism, "peak_rss_after_learning_bytes": after_learning,
        "peak_rss_bytes": peak(),
        "rss_current_at_end_bytes": current(), "parameter_and_adam_bytes": tensors,
        "hidden_at_end": organism.hidden_neurons, "updates": organism.stats.updates,
    }


def measure_memory(rule: str, settings: Settings) -> dict:
    args = (rule, settings.memory_hidden, settings.memory_worlds, settings.memory_eval_worlds,
            settings.memory_learn_steps)
    root = str(Path(__file__).resolve().parent.parent)
    code = ("import json, sys; from benchmarks.decisions import memory_child; "
            f"print(json.dumps(memory_child(*{args!r})))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH")))))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, env=env,
                         timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"memory subprocess failed:\n{out.stderr[-3000:]}")
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    measured["peak_minus_imports_bytes"] = measured["peak_rss_bytes"] - measured["rss_after_imports_bytes"]
    report = {"rule": rule, "hidden": settings.memory_hidden, "worlds": settings.memory_worlds,
              "eval_worlds": settings.memory_eval_worlds, "learning_steps": settings.memory_learn_steps,
              **measured}
    if settings.memory_hidden == 1024:
        report["target_bytes"] = TARGET_MEMORY_BYTES
        report["meets_target"] = measured["peak_rss_bytes"] <= TARGET_MEMORY_BYTES
    return report


# -- 4. dense matrix multiply ----------------------------------------------------------------------
def measure_matmul(settings: Settings) -> dict:
    shapes = {"256x450@450x512": (256, 450, 512), "1024x1024@1024x1024": (1024, 1024, 1024)}
    results = {}
    for name, (m, k, n) in shapes.items():
        rate = interleaved({name: (matmul_run(m, k, n), 1)}, settings)[name]
        gflops = 2.0 * m * k * n / 1e9
        results[name] = {"gflops": gflops * rate.median, "gflops_low": gflops * rate.low,
                         "gflops_high": gflops * rate.high, "gflops_per_cpu_second": gflops * rate.cpu_median,
                         "cpu_share": rate.cpu_share, "multiplications_per_repeat": rate.units_per_repeat}
    best = max(results.values(), key=lambda r: r["gflops"])["gflops"]
    return {"shapes": results, "matrix_gflops": best}


MATMUL_SHAPE = (256, 450, 512)  # the shape timed beside the organism at every hidden size


def dense_flops_per_decision(hidden: int) -> int:
    return 2 * (N_INPUTS * hidden + T_STEPS * hidden * N_ACTIONS)


# -- the whole run ---------------------------------------------------------------------------------
def machine() -> dict:
    import norse

    return {
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(), "cpu_count": os.cpu_count(),
        "torch": torch.__version__, "norse": getattr(norse, "__version__", "?"),
        "torch_threads": torch.get_num_threads(), "load_average_1m_at_start": os.getloadavg()[0],
    }


def run_all(settings: Settings, log: Callable[[str], None] = print) -> dict:
    torch.set_num_threads(1)
    started = time.perf_counter()
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "settings": asdict(settings),
        "snn_steps": T_STEPS,
    }
    log("dense matmul ...")
    report["dense_matmul"] = measure_matmul(settings)
    report["organism_eval"], report["naive_reference"], report["matmul_beside"] = [], [], {}
    for hidden in settings.hidden_sizes:
        log(f"organism H={hidden} (B={', '.join(map(str, settings.batch_sizes))}) beside naive and matmul ...")
        measured = measure_size(hidden, settings)
        report["organism_eval"] += measured["organism_eval"]
        report["naive_reference"].append(measured["naive_reference"])
        report["matmul_beside"][str(hidden)] = measured["matmul"]
    report["env_step"] = []
    for batch in settings.batch_sizes:
        log(f"env B={batch} ...")
        report["env_step"].append(measure_env(batch, settings))
    report["organism_learning"] = []
    for hidden in settings.learn_hidden_sizes:
        for batch in settings.learn_batch_sizes:
            log(f"learning H={hidden} B={batch} ({', '.join(settings.learning_rules)}) ...")
            report["organism_learning"].append(measure_learning(hidden, batch, settings))
    log(f"pruning {settings.prune_from} -> {settings.prune_to} ...")
    report["pruning"] = measure_pruning(settings)
    report["memory"] = []
    for rule in settings.memory_rules:
        log(f"memory H={settings.memory_hidden} {rule} (subprocess) ...")
        report["memory"].append(measure_memory(rule, settings))
    report["ratios"] = ratios(report)
    report["min_cpu_share"] = min_cpu_share(report)
    report["machine"]["load_average_1m_at_end"] = os.getloadavg()[0]
    report["seconds"] = round(time.perf_counter() - started, 1)
    return report


def ratios(report: dict) -> list[dict]:
    """Per hidden size: the organism (largest batch) over the naive reference and over the dense
    bound, each the median over repeats of the ratio of rates timed side by side (the matrix
    rate from the 256x450 @ 450x512 product timed beside the organism)."""
    matmul_flops = 2.0 * MATMUL_SHAPE[0] * MATMUL_SHAPE[1] * MATMUL_SHAPE[2]
    naive = {r["hidden"]: r["decisions_per_s"] for r in report["naive_reference"]}
    rows = []
    for hidden in sorted(naive):
        runs = [r for r in report["organism_eval"] if r["hidden"] == hidden]
        best = max(runs, key=lambda r: r["batch"])
        full, only = best["full_loop"], best["organism_only"]
        matmul = report["matmul_beside"][str(hidden)]
        # dense bound = matrix rate / dense FLOPs per decision; per repeat: matmuls/s * flops per matmul
        bound = {"rates": [m * matmul_flops / dense_flops_per_decision(hidden) for m in matmul["rates"]]}
        row = {
            "hidden": hidden, "batch": best["batch"],
            "organism_full_loop": full["median"], "organism_only": only["median"], "naive": naive[hidden]["median"],
            "speedup_vs_naive": ratio(full, naive[hidden]),
            "organism_only_speedup_vs_naive": ratio(only, naive[hidden]),
            "dense_flops_per_decision": dense_flops_per_decision(hidden),
            "matrix_gflops_beside": statistics.median(matmul["rates"]) * matmul_flops / 1e9,
            "dense_bound": statistics.median(bound["rates"]),
            "full_loop_over_dense_bound": ratio(full, bound),
            "organism_only_over_dense_bound": ratio(only, bound),
        }
        if hidden == 512:
            row["target_speedup"] = TARGET_RATIO_H512
            row["meets_target"] = row["speedup_vs_naive"] >= TARGET_RATIO_H512
            row["meets_dense_bound"] = row["full_loop_over_dense_bound"] >= 1.0
        rows.append(row)
    return rows


def min_cpu_share(report: dict) -> float:
    """The lowest CPU share of any measurement (see ``Rate``): how alone this run was."""
    shares = [v["cpu_share"] for v in report["dense_matmul"]["shapes"].values()]
    shares += [v["cpu_share"] for v in report.get("matmul_beside", {}).values()]
    for r in report["organism_eval"]:
        shares += [r["full_loop"]["cpu_share"], r["organism_only"]["cpu_share"]]
    shares += [r["steps_per_s"]["cpu_share"] for r in report["env_step"]]
    for r in report["naive_reference"]:
        shares += [r["decisions_per_s"]["cpu_share"], r["decisions_per_s_autograd"]["cpu_share"]]
    for r in report.get("organism_learning", []):
        shares.append(r["eval_full_loop"]["cpu_share"])
        shares += [rule["decisions_per_s"]["cpu_share"] for rule in r["rules"].values()]
    if "pruning" in report:
        for side in (report["pruning"]["before_pruning"], report["pruning"]["after_pruning"]):
            shares += [side["full_loop"]["cpu_share"], side["organism_only"]["cpu_share"],
                       side["learning"]["decisions_per_s"]["cpu_share"]]
    return min(shares)


def table(report: dict) -> str:
    """A short human-readable summary of ``report``."""
    m = report["machine"]
    lines = [
        f"{report['date']}  {m['platform']}  {m['cpu_count']} CPUs  torch {m['torch']}  norse {m['norse']}"
        f"  threads {m['torch_threads']}  load {m['load_average_1m_at_start']:.2f}"
        f"->{m.get('load_average_1m_at_end', float('nan')):.2f}",
        f"lowest CPU share of a measurement: {report['min_cpu_share']:.2f}"
        + ("  WARNING: other processes took this core; rates are low (see cpu/s in the JSON)"
           if report["min_cpu_share"] < 0.9 else ""),
        "",
        "organism_eval (decisions/s, median [min-max]; cpu = CPU share of the core)",
        f"  {'H':>5} {'B':>4}  {'full loop':>26} {'cpu':>4}  {'organism only':>26} {'cpu':>4}  {'active in':>9}",
    ]
    for r in report["organism_eval"]:
        full, only = r["full_loop"], r["organism_only"]
        lines.append(
            f"  {r['hidden']:>5} {r['batch']:>4}  {_rate(full):>26} {full['cpu_share']:>4.2f}"
            f"  {_rate(only):>26} {only['cpu_share']:>4.2f}"
            f"  {r['active_inputs_per_decision']:>9.1f}"
        )
    lines += ["", "env_step alone (BatchedForagingGrid.step, world-steps/s)"]
    for r in report["env_step"]:
        lines.append(f"  B={r['batch']:>4}  {_rate(r['steps_per_s']):>26}")
    lines += ["", "naive_reference (batch 1, gymnasium env, decisions/s)",
              f"  {'H':>5}  {'no_grad (headline)':>26}  {'autograd on':>26}"]
    for r in report["naive_reference"]:
        lines.append(f"  {r['hidden']:>5}  {_rate(r['decisions_per_s']):>26}  {_rate(r['decisions_per_s_autograd']):>26}")
    dm = report["dense_matmul"]
    shapes = ", ".join(f"{name} {v['gflops']:.1f}" for name, v in dm["shapes"].items())
    lines += ["", f"dense_matmul GFLOP/s (1 thread): {shapes}; matrix rate {dm['matrix_gflops']:.1f}", "",
              "ratios (organism at the largest batch; medians of per-repeat ratios, timed side by side)",
              f"  {'H':>5} {'full/naive':>11} {'only/naive':>11} {'dense bound':>12} {'full/bound':>11}"
              f" {'only/bound':>11}"]
    for r in report["ratios"]:
        flag = ""
        if "target_speedup" in r:
            flag = (f"   <- targets >= {r['target_speedup']:.0f}x: {_met(r['meets_target'])}, full/bound >= 1: "
                    f"{_met(r['meets_dense_bound'])}")
        lines.append(
            f"  {r['hidden']:>5} {r['speedup_vs_naive']:>10.0f}x {r['organism_only_speedup_vs_naive']:>10.0f}x"
            f" {r['dense_bound']:>12,.0f}"
            f" {r['full_loop_over_dense_bound']:>11.2f} {r['organism_only_over_dense_bound']:>11.2f}{flag}"
        )
    lines += _learning_lines(report) + _pruning_lines(report) + _memory_lines(report)
    lines.append(f"\n({report['seconds']} s)")
    return "\n".join(lines)


def _met(met: bool) -> str:
    return "MET" if met else "NOT MET"


def _learning_lines(report: dict) -> list[str]:
    if not report.get("organism_learning"):
        return []
    lines = ["", "organism_learning (decisions/s incl. updates, gsnn.train.live's loop; eval = full loop at same H, B)",
             f"  {'H':>5} {'B':>4} {'rule':>9}  {'learning':>26} {'cpu':>4} {'eval':>9} {'learn/eval':>10}"
             f"  {'act/env/feedback/update/other %':>31}  target"]
    for r in report["organism_learning"]:
        for rule, m in r["rules"].items():
            shares = "/".join(f"{100 * m['time_shares'][k]:.0f}"
                              for k in ("learn_act", "env_step", "learn_feedback", "update", "other"))
            flag = ""
            if "target_learning_over_eval" in m:
                flag = f">= {m['target_learning_over_eval']:.2f}: {_met(m['meets_target'])}"
            lines.append(
                f"  {r['hidden']:>5} {r['batch']:>4} {rule:>9}  {_rate(m['decisions_per_s']):>26}"
                f" {m['decisions_per_s']['cpu_share']:>4.2f} {r['eval_full_loop']['median']:>9,.0f}"
                f" {m['learning_over_eval']:>10.2f}  {shares:>31}  {flag}"
            )
    return lines


def _pruning_lines(report: dict) -> list[str]:
    if "pruning" not in report:
        return []
    p = report["pruning"]
    big, small = p["before_pruning"], p["after_pruning"]
    learn_batch = big["learning"]["batch"]
    lines = ["", f"pruning: one organism grown {p['grown_from']} -> {p['pruned_from']} "
                 f"({p['grown']['grow_events']} growths), timed, pruned -> {p['pruned_to']} by its own prune path,"
                 " timed (decisions/s)",
             f"  {'H':>5}  {'eval full loop B=' + str(p['eval_batch']):>26}  {'organism only':>26}"
             f"  {'learning B=' + str(learn_batch):>26}"]
    for side in (big, small):
        lines.append(f"  {side['hidden']:>5}  {_rate(side['full_loop']):>26}  {_rate(side['organism_only']):>26}"
                     f"  {_rate(side['learning']['decisions_per_s']):>26}")
    sp = p["speedup"]
    lines.append(f"  {p['pruned_to']}/{p['pruned_from']} speed-up: full loop {sp['full_loop']:.2f}x, organism only "
                 f"{sp['organism_only']:.2f}x, learning {sp['learning']:.2f}x"
                 f"   <- target organism only >= {p['target_speedup']:.1f}x: {_met(p['meets_target'])}")
    return lines


def _memory_lines(report: dict) -> list[str]:
    if not report.get("memory"):
        return []
    lines = ["", "memory: peak RSS of a fresh process, one organism learning + evaluating + checkpointing "
                 "(MB = 10^6 B; excludes Ray's actor overhead)",
             f"  {'':>22}  {'peak after: imports':>19} {'organism':>9} {'learning':>9}  {'overall':>7}",
             f"  {'H':>5} {'rule':>9} {'steps':>6}  {'':>19} {'':>9} {'':>9}  {'peak':>7}"
             f" {'params+Adam':>11}  target"]
    mb = lambda b: f"{b / 1e6:.0f} MB"  # noqa: E731
    for m in report["memory"]:
        flag = f"<= {m['target_bytes'] / 1e6:.0f} MB: {_met(m['meets_target'])}" if "target_bytes" in m else ""
        lines.append(
            f"  {m['hidden']:>5} {m['rule']:>9} {m['learning_steps']:>6}  {mb(m['rss_after_imports_bytes']):>19}"
            f" {mb(m['peak_rss_after_organism_bytes']):>9} {mb(m['peak_rss_after_learning_bytes']):>9}"
            f"  {mb(m['peak_rss_bytes']):>7} {m['parameter_and_adam_bytes'] / 1e6:>8.1f} MB  {flag}"
        )
    return lines


def _rate(rate: dict) -> str:
    return f"{rate['median']:,.0f} [{rate['low']:,.0f}-{rate['high']:,.0f}]"
