"""The hypothesis experiment's outputs: per-arm metrics over seeds, the goal check, the tables of
``docs/results.md``, its plots and ``docs/results.json``. Pure functions of the raw runs, so the
tests can check them on hand-made input."""

from __future__ import annotations

import json
import math
import os
import statistics
from pathlib import Path

from population.continual import mean_matrix
from population.experiment_config import ARM_TITLES, PBT_ARM, PPO_ARM

GOAL_FITNESS = 0.95  # grow+prune reaches at least this fraction of fixed-512's fitness...
GOAL_ENERGY = 0.25  # ...at no more than this fraction of its energy per decision, and forgets less
GROW_PRUNE_ARMS = ("grow_prune", "grow_prune_pbt")
REFERENCE_ARM = "fixed_max"
TABLE_COLUMNS = (
    "arm", "seeds", "food per episode", "of greedy walk", "env steps to 50% of greedy",
    "energy per decision", "vs fixed-512", "vs dense ANN, same shape", "ops per decision",
    "final hidden neurons", "wall time per seed", "env steps per seed",
)
CONTINUAL_COLUMNS = ("arm", "seeds", "average fitness (end)", "backward transfer", "forgetting",
                     "hidden neurons after each season")
PLOTS = ("learning_curves.png", "energy_vs_fitness.png", "hidden_neurons.png", "continual_matrix.png")


def mean_sd(values) -> tuple[float, float]:
    values = [float(v) for v in values]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def steps_to_target(curve: list[dict], target: float):
    """Environment steps at the first evaluation whose fitness reaches ``target`` (None: never)."""
    for point in curve:
        if point["fitness"] >= target:
            return int(point["env_steps"])
    return None


def summarize(runs: dict[str, list[dict]], references: dict, target_fraction: float) -> dict:
    """Per-arm metrics (mean and spread over seeds) from the raw runs of every arm."""
    greedy = references["greedy"]
    target = target_fraction * greedy
    out = {}
    for arm, seeds in runs.items():
        finals = [r["final"] for r in seeds]
        fitness = [f["fitness"] for f in finals]
        reached = [steps_to_target(r["curve"], target) for r in seeds]
        hit = [s for s in reached if s is not None]
        energy = [f["energy_per_decision_joules"] for f in finals]
        dense = [f["energy_per_decision_joules"] / f["dense_ann_energy_per_decision_joules"]
                 if f["dense_ann_energy_per_decision_joules"] else math.nan for f in finals]
        m = {
            "seeds": len(seeds),
            "fitness": mean_sd(fitness),
            "fraction_of_greedy": mean_sd([v / greedy for v in fitness]),
            "steps_to_target_per_seed": reached,
            "steps_to_target": mean_sd(hit) if hit else (None, None),
            "reached_target": len(hit),
            "energy_per_decision_joules": mean_sd(energy),
            "energy_vs_dense_ann": mean_sd(dense),
            "synops_per_decision": mean_sd([f["synops_per_decision"] for f in finals]),
            "macs_per_decision": mean_sd([f.get("macs_per_decision", 0.0) for f in finals]),
            "hidden_neurons": mean_sd([f["hidden_neurons"] for f in finals]),
            "wall_s": mean_sd([r["wall_s"] for r in seeds]),
            "env_steps": mean_sd([r["env_steps"] for r in seeds]),
        }
        out[arm] = m
    if REFERENCE_ARM in out:
        base = out[REFERENCE_ARM]["energy_per_decision_joules"][0]
        for arm, m in out.items():
            ratios = [r["final"]["energy_per_decision_joules"] / base for r in runs[arm]] if base else []
            m["energy_vs_fixed_max"] = mean_sd(ratios) if ratios else (math.nan, math.nan)
    return out


def summarize_continual(runs: dict[str, list[dict]]) -> dict:
    out = {}
    for arm, seeds in runs.items():
        phases = [r["continual"] for r in seeds if r.get("continual")]
        if not phases:
            continue
        out[arm] = {
            "seeds": len(phases),
            "seasons": phases[0]["seasons"],
            "average_fitness": mean_sd([p["average_fitness"] for p in phases]),
            "backward_transfer": mean_sd([p["backward_transfer"] for p in phases]),
            "forgetting": mean_sd([p["forgetting"] for p in phases]),
            "R_mean": mean_matrix([p["R"] for p in phases]),
            "before_mean": [statistics.fmean(col) for col in zip(*[p["before"] for p in phases])],
            "hidden_neurons_mean": [statistics.fmean(col) for col in zip(*[p["hidden_neurons"] for p in phases])],
        }
    return out


def goal_check(summary: dict, continual: dict) -> dict:
    """The issue's goal for each grow+prune arm against fixed-512: fitness >= 95%, energy <= 25%,
    and less forgetting on the seasonal world."""
    out = {}
    if REFERENCE_ARM not in summary:
        return out
    ref = summary[REFERENCE_ARM]
    for arm in GROW_PRUNE_ARMS:
        if arm not in summary:
            continue
        m = summary[arm]
        fitness_ratio = m["fitness"][0] / ref["fitness"][0] if ref["fitness"][0] > 0 else math.nan
        energy_ratio = m["energy_vs_fixed_max"][0]
        check = {
            "fitness_ratio": fitness_ratio,
            "fitness_ok": bool(fitness_ratio >= GOAL_FITNESS) if math.isfinite(fitness_ratio) else False,
            "energy_ratio": energy_ratio,
            "energy_ok": bool(energy_ratio <= GOAL_ENERGY) if math.isfinite(energy_ratio) else False,
        }
        if arm in continual and REFERENCE_ARM in continual:
            f_arm, f_ref = continual[arm]["forgetting"][0], continual[REFERENCE_ARM]["forgetting"][0]
            check.update(forgetting=f_arm, forgetting_fixed_max=f_ref, forgetting_ok=bool(f_arm < f_ref))
        else:
            check.update(forgetting=None, forgetting_fixed_max=None, forgetting_ok=None)
        check["held"] = bool(check["fitness_ok"] and check["energy_ok"] and check["forgetting_ok"])
        out[arm] = check
    return out


# -- formatting -------------------------------------------------------------------------------------
def _si(value: float) -> str:
    if not math.isfinite(value):
        return "nan"
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= limit:
            return f"{value / limit:.3g}{suffix}"
    return f"{value:.3g}"


def _pm(pair, digits=1, scale=1.0, unit="") -> str:
    mean, sd = pair
    return f"{mean * scale:.{digits}f} ± {sd * scale:.{digits}f}{unit}"


def table_rows(summary: dict) -> list[list[str]]:
    rows = []
    for arm, m in summary.items():
        steps_mean = m["steps_to_target"][0]
        if steps_mean is None:
            steps = f"not reached (0/{m['seeds']})"
        else:
            steps = f"{_si(steps_mean)} ({m['reached_target']}/{m['seeds']} reached)"
        if arm == PPO_ARM:
            ops = f"{_si(m['macs_per_decision'][0])} MACs"
        else:
            ops = f"{_si(m['synops_per_decision'][0])} SynOps"
        vs_fixed = m.get("energy_vs_fixed_max")
        rows.append([
            f"{arm} ({ARM_TITLES.get(arm, arm)})",
            str(m["seeds"]),
            _pm(m["fitness"]),
            _pm(m["fraction_of_greedy"], 0, 100, "%"),
            steps,
            _pm(m["energy_per_decision_joules"], 1, 1e9, " nJ"),
            f"{vs_fixed[0]:.2f}" if vs_fixed else "n/a (no fixed_max arm)",
            f"{m['energy_vs_dense_ann'][0]:.3f}",
            ops,
            _pm(m["hidden_neurons"], 0),
            _pm(m["wall_s"], 0, 1, " s"),
            _si(m["env_steps"][0]),
        ])
    return rows


def continual_rows(continual: dict) -> list[list[str]]:
    return [[
        f"{arm} ({ARM_TITLES.get(arm, arm)})", str(c["seeds"]), _pm(c["average_fitness"]),
        _pm(c["backward_transfer"]), _pm(c["forgetting"]),
        " → ".join(f"{h:.0f}" for h in c["hidden_neurons_mean"]),
    ] for arm, c in continual.items()]


def markdown_table(columns, rows) -> str:
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def parse_markdown_table(text: str, first_column: str) -> list[dict]:
    """The rows of the markdown table whose header starts with ``first_column`` (for tests)."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_column:
            rows = []
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                values = [c.strip() for c in row.strip().strip("|").split("|")]
                rows.append(dict(zip(cells, values)))
            return rows
    return []


def statements(summary: dict, continual: dict, goal: dict, references: dict, pbt_population: int | None) -> list[str]:
    """Plain sentences: did the goal hold, where not, and what would likely change it."""
    out = []
    if not goal:
        return ["The goal was not evaluated: it needs the fixed_max arm and a grow+prune arm."]
    ref = summary[REFERENCE_ARM]
    for arm, g in goal.items():
        m = summary[arm]
        verdict = "held" if g["held"] else "did not hold"
        parts = [
            f"fitness {g['fitness_ratio'] * 100:.0f}% of fixed-512's (goal ≥ {GOAL_FITNESS * 100:.0f}%: "
            f"{'met' if g['fitness_ok'] else 'not met'})",
            f"energy per decision {g['energy_ratio'] * 100:.0f}% of fixed-512's (goal ≤ {GOAL_ENERGY * 100:.0f}%: "
            f"{'met' if g['energy_ok'] else 'not met'})",
        ]
        if g["forgetting_ok"] is None:
            parts.append("forgetting not measured (no seasonal run for both arms)")
        else:
            spread = max(continual[arm]["forgetting"][1], continual[REFERENCE_ARM]["forgetting"][1])
            noisy = abs(g["forgetting"] - g["forgetting_fixed_max"]) <= spread
            parts.append(f"forgetting {g['forgetting']:.1f} vs {g['forgetting_fixed_max']:.1f} food per episode "
                         f"({'less' if g['forgetting_ok'] else 'not less'}"
                         + (f"; the difference is within the spread over seeds, sd up to {spread:.1f})" if noisy else ")"))
        out.append(f"**{arm}: the goal {verdict}** — " + "; ".join(parts) + ".")
        notes = []
        if not g["energy_ok"]:
            hidden, hidden_ref = m["hidden_neurons"][0], ref["hidden_neurons"][0]
            why = (
                " Growth fires whenever the layer's mean firing rate is below grow_threshold, which a sparse "
                "layer stays under, and pruning only removes neurons that are nearly silent, so the layer "
                "grows toward max_hidden"
                if hidden >= 0.75 * hidden_ref else
                " The layer did stay well below max_hidden, but not small enough"
            )
            notes.append(
                f"its layer ended at {hidden:.0f} neurons on average against {hidden_ref:.0f}; energy per "
                f"decision is about active inputs × T × hidden neurons, so ≤ {GOAL_ENERGY * 100:.0f}% needs about "
                f"{GOAL_ENERGY * hidden_ref:.0f} neurons or fewer at the same input activity.{why}"
                + (" (PBT selected on fitness alone, so nothing rewarded a smaller layer)" if arm == PBT_ARM else "")
                + ". What would likely change it: an energy term in the fitness PBT selects on, growth driven by "
                "learning progress (reward or gradient) instead of low activity, or pruning by readout "
                "contribution instead of firing rate."
            )
        if not g["fitness_ok"]:
            spread = max(m["fitness"][1], ref["fitness"][1])
            gap = ref["fitness"][0] - m["fitness"][0]
            within = " — within the spread over seeds" if gap <= spread else ""
            notes.append(f"fitness was {gap:.1f} food per episode below fixed-512's (sd over seeds up to "
                         f"{spread:.1f}){within}; longer lifetimes or more seeds would tell whether the gap is real.")
        if g["forgetting_ok"] is False:
            notes.append(
                "on the seasonal world it did not forget less. Likely reasons: the egocentric observation shows "
                "the food directly, so one 'walk to visible food' policy serves every season and there is little "
                "season-specific knowledge to forget, and the greedy evaluation is noisy (see the spread); a world "
                "whose seasons demand different actions, and more seeds, would test forgetting more sharply."
            )
        if notes:
            out.append(f"Where it fell short ({arm}): " + " ".join(n[0].upper() + n[1:] for n in notes))
    if "fixed_start" in summary:
        small = summary["fixed_start"]
        ratio = small["fitness"][0] / ref["fitness"][0] if ref["fitness"][0] > 0 else math.nan
        energy = small.get("energy_vs_fixed_max", (math.nan,))[0]
        if math.isfinite(ratio) and ratio >= GOAL_FITNESS and energy <= GOAL_ENERGY:
            out.append(
                f"The control matters: the fixed network at the starting size (fixed_start, "
                f"{small['hidden_neurons'][0]:.0f} neurons, no growth) reached {ratio * 100:.0f}% of fixed-512's fitness "
                f"at {energy * 100:.0f}% of its energy on its own. On this task a small fixed layer already meets the "
                f"fitness and energy goals, so what a grow+prune arm gains there is not evidence that growing helps; "
                f"growing to 512 (grow, grow_prune) did not improve fitness over it."
                if all(summary[a]["fitness"][0] <= small["fitness"][0] for a in ("grow", "grow_prune") if a in summary)
                else
                f"The control matters: the fixed network at the starting size (fixed_start) reached {ratio * 100:.0f}% "
                f"of fixed-512's fitness at {energy * 100:.0f}% of its energy on its own."
            )
        else:
            out.append(f"The fixed network at the starting size (fixed_start) reached {ratio * 100:.0f}% of fixed-512's "
                       f"fitness at {energy * 100:.0f}% of its energy.")
    if PPO_ARM in summary:
        p = summary[PPO_ARM]
        best_snn = max((a for a in summary if a != PPO_ARM), key=lambda a: summary[a]["fitness"][0], default=None)
        if best_snn:
            s = summary[best_snn]
            out.append(
                f"The dense PPO baseline reached {p['fitness'][0]:.1f} food per episode at "
                f"{p['energy_per_decision_joules'][0] * 1e9:.1f} nJ per decision; the best spiking arm "
                f"({best_snn}) {s['fitness'][0]:.1f} at {s['energy_per_decision_joules'][0] * 1e9:.1f} nJ."
            )
    if pbt_population and PBT_ARM in summary:
        out.append(f"The PBT arm spent {pbt_population} times the environment steps of the other arms (its whole "
                   f"population, each organism living as long as one organism of the other arms; "
                   f"{_si(summary[PBT_ARM]['env_steps'][0])} per seed), and its fitness is that of the best of its "
                   f"organisms at the end, re-evaluated on the shared final worlds: selection among {pbt_population} "
                   f"organisms is part of what it buys.")
    return out


# -- plots -----------------------------------------------------------------------------------------
def _align(curves: list[list[dict]], key: str):
    n = min(len(c) for c in curves)
    xs = [statistics.fmean(c[i]["env_steps"] for c in curves) for i in range(n)]
    ys = [[c[i][key] for c in curves] for i in range(n)]
    return xs, ys


def write_plots(out_dir: Path, runs: dict, references: dict, target_fraction: float, continual: dict) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    written = []
    colors = dict(zip(list(runs), plt.rcParams["axes.prop_cycle"].by_key()["color"] * 3))

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for arm, seeds in runs.items():
        xs, ys = _align([r["curve"] for r in seeds], "fitness")
        ax.plot(xs, [statistics.fmean(y) for y in ys], marker=".", label=arm, color=colors[arm])
        ax.fill_between(xs, [min(y) for y in ys], [max(y) for y in ys], alpha=0.15, color=colors[arm])
    for name, style in (("greedy", "--"), ("random", ":")):
        ax.axhline(references[name], color="gray", linestyle=style, label=f"{name} walk" if name == "greedy" else name)
    ax.axhline(target_fraction * references["greedy"], color="black", linewidth=0.6, label=f"{target_fraction:.0%} of greedy")
    ax.set_xlabel("environment steps (the PBT arm: all organisms of its population)")
    ax.set_ylabel("food per episode (greedy evaluation)")
    ax.set_title("Learning curves: mean over seeds, band = min..max")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    written.append(_save(fig, out_dir / "learning_curves.png", plt))

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for arm, seeds in runs.items():
        ax.scatter([r["final"]["energy_per_decision_joules"] * 1e9 for r in seeds],
                   [r["final"]["fitness"] for r in seeds], label=arm, color=colors[arm])
    ax.axhline(references["greedy"], color="gray", linestyle="--", label="greedy walk")
    ax.set_xscale("log")
    ax.set_xlabel("energy per decision (nJ, log scale)")
    ax.set_ylabel("final food per episode")
    ax.set_title("Energy against fitness (one point per seed)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(_save(fig, out_dir / "energy_vs_fitness.png", plt))

    fig, ax = plt.subplots(figsize=(7, 4))
    for arm, seeds in runs.items():
        if arm == PPO_ARM:
            continue
        xs, ys = _align([r["curve"] for r in seeds], "hidden_neurons")
        ax.plot(xs, [statistics.fmean(y) for y in ys], marker=".", label=arm, color=colors[arm])
        ax.fill_between(xs, [min(y) for y in ys], [max(y) for y in ys], alpha=0.15, color=colors[arm])
    ax.set_xlabel("environment steps (the PBT arm: all organisms; its population mean)")
    ax.set_ylabel("hidden neurons")
    ax.set_title("Hidden neurons over the lifetime (mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(_save(fig, out_dir / "hidden_neurons.png", plt))

    if continual:
        arms = list(continual)
        fig, axes = plt.subplots(1, len(arms), figsize=(3.2 * len(arms), 3.4), squeeze=False)
        top = max(max(max(row) for row in c["R_mean"]) for c in continual.values()) or 1.0
        for ax, arm in zip(axes[0], arms):
            R = continual[arm]["R_mean"]
            ax.imshow(R, vmin=0, vmax=top, cmap="viridis")
            for i, row in enumerate(R):
                for j, v in enumerate(row):
                    ax.text(j, i, f"{v:.0f}", ha="center", va="center", color="white" if v < 0.6 * top else "black", fontsize=8)
            seasons = continual[arm]["seasons"]
            ax.set_xticks(range(len(seasons)), [f"q{s}" for s in seasons])
            ax.set_yticks(range(len(seasons)), [f"after q{s}" for s in seasons])
            ax.set_xlabel("evaluated on season")
            ax.set_title(arm, fontsize=9)
        fig.suptitle("Continual learning: R[i][j] = food per episode on season j after learning season i (mean over seeds)",
                     fontsize=9)
        fig.tight_layout()
        written.append(_save(fig, out_dir / "continual_matrix.png", plt))
    return written


def _save(fig, path: Path, plt) -> Path:
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# -- the document ----------------------------------------------------------------------------------
def write_results(out_dir: Path, meta: dict, config: dict, runs: dict, references: dict) -> dict:
    """Write results.json, the plots and results.md into ``out_dir``; returns the JSON object."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # The raw runs first, so nothing is lost if a later step fails (`python -m population.results`
    # renders the rest from them again).
    raw = {"meta": meta, "config": config, "references": references, "runs": runs}
    _atomic_write(out_dir / "results.json", json.dumps(_clean(raw), indent=1))
    target_fraction = config["experiment"]["target_fraction"]
    summary = summarize(runs, references, target_fraction)
    continual = summarize_continual(runs)
    goal = goal_check(summary, continual)
    pbt_population = config["pbt"]["population"] if PBT_ARM in runs else None
    said = statements(summary, continual, goal, references, pbt_population)
    data = {"meta": meta, "config": config, "references": references, "summary": summary,
            "continual": continual, "goal": goal, "statements": said, "runs": runs}
    _atomic_write(out_dir / "results.json", json.dumps(_clean(data), indent=1))
    plots = write_plots(out_dir, runs, references, target_fraction, continual)
    (out_dir / "results.md").write_text(render_markdown(meta, config, summary, continual, said, references, plots))
    return data


def render_markdown(meta, config, summary, continual, said, references, plots) -> str:
    e = config["experiment"]
    c = config["continual"]
    machine = meta["machine"]
    lines = [
        "# Results: does growing beat a fixed network?",
        "",
        "Generated by the command below; do not edit by hand (rerun it instead). Raw numbers, every "
        "seed's learning curve and the continual-learning matrices are in `results.json`.",
        "",
        "```bash",
        meta["command"],
        "```",
        "",
        f"- Date: {meta['date']}; wall time of the whole command: {meta['wall_seconds'] / 60:.1f} min.",
        f"- Machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gb']:.0f} GB memory, no GPU used; "
        f"Python {machine['python']}, torch {machine['torch']}, Ray {machine['ray']}. "
        f"{machine.get('note', '')}".rstrip(),
        f"- Budget `{config['budget']}`: {e['seeds']} seeds per arm; each organism (and PPO) learns "
        f"{e['episodes']} episodes x {e['worlds']} worlds = {meta['env_steps_per_organism']:,} environment steps; "
        f"learning-curve evaluation every {e['eval_every']} episodes on {e['eval_worlds']} worlds; final evaluation on "
        f"{e['final_eval_worlds']} worlds (seed {e['final_eval_seed']}), the same for every arm. Seasonal phase: "
        f"{len(c['seasons'])} seasons x {c['episodes_per_season']} episodes.",
        f"- References on the final evaluation worlds: random policy {references['random']:.1f}, greedy walk to the "
        f"nearest food {references['greedy']:.1f} food per episode.",
        "",
        "## Verdict",
        "",
        "Goal: growing + pruning reaches at least 95% of the fixed-512 arm's fitness at no more than 25% of its "
        "energy per decision, and forgets less on the seasonal world.",
        "",
        *[f"- {s}" for s in said],
        "",
        "## Arms",
        "",
        markdown_table(TABLE_COLUMNS, table_rows(summary)),
        "",
        "Mean ± standard deviation over seeds. Fitness: food per episode of the final policy, greedy (argmax) "
        "actions. Steps to 50%: the first learning-curve evaluation at or above half the greedy walk's food "
        "(mean over the seeds that got there). Energy: SynOps x 0.9 pJ for the spiking arms, dense MACs x 4.6 pJ "
        "for PPO (Horowitz 2014, `gsnn/energy.py`); 'vs dense ANN, same shape' divides by the same network run "
        "as a dense ANN (450-H-4 MACs; for PPO itself, 1). Wall time: one organism on one core (the PBT arm: "
        "its whole population on the machine's cores).",
        "",
        "## Continual learning on the seasonal world",
        "",
        "After the main lifetime every organism learns through the seasons in turn (food spawns mostly in one "
        f"quadrant; seasons {', '.join(map(str, c['seasons']))}, {c['episodes_per_season']} episodes each) and after "
        "each season is evaluated on every season. Average fitness = mean over seasons at the end; backward "
        "transfer = mean over earlier seasons of (final - just after learning it); forgetting = mean over earlier "
        "seasons of (best before the last season - final). Units: food per episode.",
        "",
        markdown_table(CONTINUAL_COLUMNS, continual_rows(continual)) if continual else "(no seasonal runs in this budget)",
        "",
        "## Plots",
        "",
    ]
    for plot in plots:
        lines += [f"![{plot.stem}]({plot.name})", ""]
    lines += [
        "## Notes",
        "",
        *[f"- Failed and left out: {f}" for f in meta.get("failures", [])],
        "- The PBT arm runs `population.run`'s own Tune set-up (asynchronous PBT over the thresholds in "
        "`pbt.mutations` of `tune_configs/hypothesis.yaml`, selection on fitness alone); its learning curve is the "
        "best organism per generation on the PBT selection worlds.",
        "- Spiking arms are evaluated with `gsnn.train.evaluate`, PPO with the same batched worlds and seeds.",
        "- `python -m population.results docs/results.json` renders this page and the plots again from the raw "
        "runs in `results.json` (no new runs).",
        "",
    ]
    return "\n".join(lines)


def _clean(value):
    """JSON-ready: tuples as lists, NaN and infinities as null."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv=None) -> int:
    """Render results.md and the plots again from the raw runs in a results.json."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m population.results", description=main.__doc__)
    parser.add_argument("results_json", help="a results.json written by population.experiment")
    parser.add_argument("--out", help="folder for results.md, results.json and plots (default: the JSON's folder)")
    args = parser.parse_args(argv)
    path = Path(args.results_json)
    try:
        data = json.loads(path.read_text())
        meta, config, references, runs = data["meta"], data["config"], data["references"], data["runs"]
    except (OSError, ValueError, KeyError) as error:
        print(f"error: {path}: not a results.json of population.experiment ({error})", file=sys.stderr)
        return 2
    write_results(Path(args.out) if args.out else path.parent, meta, config, runs, references)
    print(f"rendered {Path(args.out) if args.out else path.parent}/results.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
