"""Decisions per second: the organism's batched evaluation against a naive one-world SNN loop.

All figures come from ONE run on ONE core (``torch.set_num_threads(1)``); every rate is the median
over several timed repeats that follow a warm-up. A *decision* is one world choosing one action,
so a batch step of B worlds counts B decisions. Each rate also records its CPU share (thread CPU
time / wall time): on a shared machine, a share below ~0.95 means other processes took the core
and the wall-clock figures of that run understate the code (the table then prints a warning).

What is measured
----------------
organism_eval
    ``gsnn.organism.Organism.act(obs, greedy=True)`` deciding for a ``BatchedForagingGrid``
    (egocentric observations, 450 inputs) at hidden sizes 64, 256, 512, 1024 and batch sizes 64
    and 256. Two rates per (H, B):

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
    between decisions) is reported beside it. A fixed number of decisions is timed after a
    warm-up.

env_step
    ``BatchedForagingGrid.step`` alone with pre-drawn random actions, per batch size: the ceiling
    that the full loop can never exceed whatever the organism costs.

ratios
    ``organism_eval`` (batch 256, full loop) / ``naive_reference`` at the same H.
    TARGET: >= 300x at H = 512.

dense_matmul
    This core's float32 matrix-multiply rate (GFLOP/s; medians of 256x450 @ 450x512 and
    1024x1024 @ 1024x1024), the faster of the two taken as the "matrix rate". The *dense bound*
    at hidden size H is matrix rate / dense FLOPs per decision, with
    dense FLOPs per decision = 2 * (450 * H + T * H * 4): the input projection once plus the
    readout on every SNN step, i.e. what a dense implementation must at least do, ignoring the
    LIF arithmetic itself. ``organism_eval / dense_bound`` > 1 means the organism decides faster
    than any dense implementation could (it uses the observation's sparsity and reads out once).
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

T_STEPS = 10  # SNN steps per decision (OrganismConfig.snn_steps default)
N_INPUTS = 450
N_ACTIONS = 4
TARGET_RATIO_H512 = 300.0


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

    @classmethod
    def quick(cls) -> "Settings":
        return cls(hidden_sizes=(64, 512), batch_sizes=(256,), repeats=5, repeat_seconds=0.3,
                   warmup_seconds=0.1, naive_decisions=200, naive_repeats=5, observation_batches=16)


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


def repeat_timed(run: Callable[[], None], units: int, repeats: int) -> Rate:
    """Time ``repeats`` calls of ``run()``, each doing ``units`` units of work."""
    walls, cpus = [], []
    for _ in range(repeats):
        wall0, cpu0 = time.perf_counter(), time.thread_time()
        run()
        cpus.append(time.thread_time() - cpu0)
        walls.append(time.perf_counter() - wall0)
    rates = [units / wall for wall in walls]
    return Rate(
        median=statistics.median(rates), low=min(rates), high=max(rates),
        cpu_median=statistics.median(units / max(cpu, 1e-9) for cpu in cpus),
        cpu_share=statistics.median(cpu / wall for cpu, wall in zip(cpus, walls)),
        repeats=repeats, units_per_repeat=units,
    )


def timed_rate(run: Callable[[int], None], units_per_call: int, settings: Settings) -> Rate:
    """``run(n)`` does n calls of ``units_per_call`` units each. Warm up for ``warmup_seconds``,
    pick n so that one repeat lasts about ``repeat_seconds``, then time ``repeats`` repeats."""
    run(1)
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < settings.warmup_seconds or calls < 2:
        run(1)
        calls += 1
    per_call = (time.perf_counter() - start) / calls
    n = max(1, round(settings.repeat_seconds / per_call))
    return repeat_timed(lambda: run(n), n * units_per_call, settings.repeats)


# -- 1. the organism -------------------------------------------------------------------------------
def make_organism(hidden: int):
    from gsnn.config import OrganismConfig
    from gsnn.organism import Organism

    config = OrganismConfig(init_hidden=hidden, max_hidden=max(hidden, 512), min_hidden=min(32, hidden))
    return Organism(config)


def measure_organism(hidden: int, batch: int, settings: Settings, seed: int = 0) -> dict:
    """``full_loop`` and ``organism_only`` decisions/s of Organism.act for B worlds."""
    from envs import BatchedForagingGrid

    organism = make_organism(hidden)
    env = BatchedForagingGrid(batch, seed=seed)
    obs = env.reset()
    organism.reset_state(batch)

    def full_loop(n: int) -> None:
        nonlocal obs
        for _ in range(n):
            result = env.step(organism.act(obs, greedy=True))
            organism.reset_worlds(result.done)
            obs = result.observation
        organism.energy.reset()  # the meter only queues tensors; keep the queue short

    full = timed_rate(full_loop, batch, settings)

    # A fixed set of realistic observation batches, from worlds driven by the organism itself.
    stored = []
    for _ in range(settings.observation_batches):
        stored.append(obs.clone())
        obs = env.step(organism.act(obs, greedy=True)).observation
    position = 0

    def organism_only(n: int) -> None:
        nonlocal position
        for _ in range(n):
            organism.act(stored[position], greedy=True)
            position = (position + 1) % len(stored)
        organism.energy.reset()

    only = timed_rate(organism_only, batch, settings)
    active = float(torch.stack(stored).reshape(-1, N_INPUTS).count_nonzero(dim=1).float().mean())
    return {"hidden": hidden, "batch": batch, "full_loop": asdict(full), "organism_only": asdict(only),
            "active_inputs_per_decision": active}


# -- 2. the naive reference ------------------------------------------------------------------------
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


def measure_naive(hidden: int, settings: Settings, seed: int = 0) -> dict:
    """Headline: under ``torch.no_grad()``. Also reported: the same loop with autograd on (as a
    plain nn.Module prototype would run it), the LIF state detached between decisions."""
    from envs import ForagingGrid

    agent = NaiveAgent(hidden, seed)
    env = ForagingGrid()
    observation, _ = env.reset(seed=seed)

    def run(n: int, detach: bool) -> None:
        nonlocal observation
        for _ in range(n):
            observation, _, terminated, truncated, _ = env.step(agent.decide(observation))
            if detach:
                agent.state = type(agent.state)(*(t.detach() for t in agent.state))
            if terminated or truncated:
                observation, _ = env.reset()
                agent.state = None

    def rate(grad: bool) -> Rate:
        with torch.set_grad_enabled(grad):
            run(20, grad)
            start = time.perf_counter()
            while time.perf_counter() - start < settings.warmup_seconds:
                run(10, grad)
            return repeat_timed(lambda: run(settings.naive_decisions, grad), settings.naive_decisions,
                                settings.naive_repeats)

    return {"hidden": hidden, "batch": 1, "decisions_per_s": asdict(rate(False)),
            "decisions_per_s_autograd": asdict(rate(True))}


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

    return {"batch": batch, "steps_per_s": asdict(timed_rate(run, batch, settings))}


# -- 4. dense matrix multiply ----------------------------------------------------------------------
def measure_matmul(settings: Settings) -> dict:
    shapes = {"256x450@450x512": (256, 450, 512), "1024x1024@1024x1024": (1024, 1024, 1024)}
    results = {}
    for name, (m, k, n) in shapes.items():
        a, b = torch.randn(m, k), torch.randn(k, n)
        out = torch.empty(m, n)

        def run(calls: int) -> None:
            for _ in range(calls):
                torch.mm(a, b, out=out)

        rate = timed_rate(run, 1, settings)
        gflops = 2.0 * m * k * n / 1e9
        results[name] = {"gflops": gflops * rate.median, "gflops_low": gflops * rate.low,
                         "gflops_high": gflops * rate.high, "gflops_per_cpu_second": gflops * rate.cpu_median,
                         "cpu_share": rate.cpu_share, "multiplications_per_repeat": rate.units_per_repeat}
    best = max(results.values(), key=lambda r: r["gflops"])["gflops"]
    return {"shapes": results, "matrix_gflops": best}


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
    report["organism_eval"] = []
    for hidden in settings.hidden_sizes:
        for batch in settings.batch_sizes:
            log(f"organism H={hidden} B={batch} ...")
            report["organism_eval"].append(measure_organism(hidden, batch, settings))
    report["env_step"] = []
    for batch in settings.batch_sizes:
        log(f"env B={batch} ...")
        report["env_step"].append(measure_env(batch, settings))
    report["naive_reference"] = []
    for hidden in settings.hidden_sizes:
        log(f"naive H={hidden} ...")
        report["naive_reference"].append(measure_naive(hidden, settings))
    report["ratios"] = ratios(report)
    report["min_cpu_share"] = min_cpu_share(report)
    report["machine"]["load_average_1m_at_end"] = os.getloadavg()[0]
    report["seconds"] = round(time.perf_counter() - started, 1)
    return report


def ratios(report: dict) -> list[dict]:
    """Per hidden size: organism (largest batch) over naive and over the dense bound."""
    matrix_flops = report["dense_matmul"]["matrix_gflops"] * 1e9
    naive = {r["hidden"]: r["decisions_per_s"]["median"] for r in report["naive_reference"]}
    rows = []
    for hidden in sorted(naive):
        runs = [r for r in report["organism_eval"] if r["hidden"] == hidden]
        best = max(runs, key=lambda r: r["batch"])
        full, only = best["full_loop"]["median"], best["organism_only"]["median"]
        bound = matrix_flops / dense_flops_per_decision(hidden)
        row = {
            "hidden": hidden, "batch": best["batch"],
            "organism_full_loop": full, "organism_only": only, "naive": naive[hidden],
            "speedup_vs_naive": full / naive[hidden],
            "organism_only_speedup_vs_naive": only / naive[hidden],
            "dense_flops_per_decision": dense_flops_per_decision(hidden),
            "dense_bound": bound,
            "full_loop_over_dense_bound": full / bound,
            "organism_only_over_dense_bound": only / bound,
        }
        if hidden == 512:
            row["target_speedup"] = TARGET_RATIO_H512
            row["meets_target"] = row["speedup_vs_naive"] >= TARGET_RATIO_H512
        rows.append(row)
    return rows


def min_cpu_share(report: dict) -> float:
    """The lowest CPU share of any measurement (see ``Rate``): how alone this run was."""
    shares = [v["cpu_share"] for v in report["dense_matmul"]["shapes"].values()]
    for r in report["organism_eval"]:
        shares += [r["full_loop"]["cpu_share"], r["organism_only"]["cpu_share"]]
    shares += [r["steps_per_s"]["cpu_share"] for r in report["env_step"]]
    for r in report["naive_reference"]:
        shares += [r["decisions_per_s"]["cpu_share"], r["decisions_per_s_autograd"]["cpu_share"]]
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
              "ratios (organism at the largest batch)",
              f"  {'H':>5} {'full/naive':>11} {'only/naive':>11} {'dense bound':>12} {'full/bound':>11}"
              f" {'only/bound':>11}"]
    for r in report["ratios"]:
        flag = ""
        if "target_speedup" in r:
            flag = f"   <- target >= {r['target_speedup']:.0f}x: {'MET' if r['meets_target'] else 'NOT MET'}"
        lines.append(
            f"  {r['hidden']:>5} {r['speedup_vs_naive']:>10.0f}x {r['organism_only_speedup_vs_naive']:>10.0f}x"
            f" {r['dense_bound']:>12,.0f}"
            f" {r['full_loop_over_dense_bound']:>11.2f} {r['organism_only_over_dense_bound']:>11.2f}{flag}"
        )
    lines.append(f"\n({report['seconds']} s)")
    return "\n".join(lines)


def _rate(rate: dict) -> str:
    return f"{rate['median']:,.0f} [{rate['low']:,.0f}-{rate['high']:,.0f}]"
