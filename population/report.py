"""What a run leaves behind: one CSV row per organism per generation, ``summary.json``, PNG plots,
and one progress line per finished generation. ``GenerationLog`` is a Tune callback on the driver;
the trainables do not know it exists."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
from pathlib import Path
from typing import Callable

from ray import tune

ROWS_FILE = "generations.csv"
SUMMARY_FILE = "summary.json"
COLUMNS = (
    "trial_id", "generation", "fitness", "fitness_std", "train_food", "hidden_neurons",
    "mean_firing_rate", "energy_per_decision_joules", "synops_per_decision",
    "dense_ann_energy_per_decision_joules", "sparse_ann_energy_per_decision_joules",
    "grow_threshold", "prune_threshold", "learning_rate", "neurons_per_grow", "learning_rule",
    "weight_noise", "grow_events_total", "neurons_added_total", "prune_events_total",
    "neurons_removed_total", "exploited_from", "exploit_source_hidden_neurons",
    "exploit_own_hidden_neurons", "inherited_from", "decisions_per_second", "learn_seconds", "eval_seconds",
    "compute_cpu_seconds",
    "slot_wait_seconds", "time_this_iter_s", "finished_at", "device", "actor_pid",
)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_rows(run_dir: Path) -> dict[tuple[str, int], dict]:
    path = Path(run_dir) / ROWS_FILE
    rows = {}
    if path.is_file():
        with open(path, newline="") as handle:
            for row in csv.DictReader(handle):
                rows[(row["trial_id"], int(row["generation"]))] = row
    return rows


def write_rows(run_dir: Path, rows: dict[tuple[str, int], dict]) -> None:
    ordered = sorted(rows.values(), key=lambda r: (int(r["generation"]), r["trial_id"]))
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(ordered)
    _atomic_write(Path(run_dir) / ROWS_FILE, text.getvalue())


def generation_summaries(rows: dict[tuple[str, int], dict], population: int) -> list[dict]:
    """Aggregates of every generation that all ``population`` organisms have finished."""
    by_generation: dict[int, list[dict]] = {}
    for (_, generation), row in rows.items():
        by_generation.setdefault(generation, []).append(row)
    out = []
    for generation in sorted(by_generation):
        group = by_generation[generation]
        if len(group) < population:
            continue
        fitness = [float(r["fitness"]) for r in group]
        hidden = [float(r["hidden_neurons"]) for r in group]
        energy = [float(r["energy_per_decision_joules"]) for r in group]
        out.append({
            "generation": generation,
            "best_fitness": max(fitness),
            "mean_fitness": sum(fitness) / len(fitness),
            "mean_hidden_neurons": sum(hidden) / len(hidden),
            "min_hidden_neurons": min(hidden),
            "max_hidden_neurons": max(hidden),
            "total_hidden_neurons": sum(hidden),
            "mean_energy_per_decision_joules": sum(energy) / len(energy),
            "exploits": sum(1 for r in group if r.get("exploited_from")),
            "exploits_across_sizes": sum(
                1 for r in group
                if r.get("exploited_from") and r.get("exploit_own_hidden_neurons") not in (None, "")
                and int(float(r["exploit_source_hidden_neurons"])) != int(float(r["exploit_own_hidden_neurons"]))
            ),
            "organisms": len(group),
        })
    return out


def progress_line(summary: dict, generations: int, elapsed: float) -> str:
    return (
        f"generation {summary['generation']:3d}/{generations}  best {summary['best_fitness']:6.1f}"
        f"  mean {summary['mean_fitness']:6.1f} food  neurons {summary['mean_hidden_neurons']:5.0f}"
        f" ({summary['min_hidden_neurons']:.0f}-{summary['max_hidden_neurons']:.0f})"
        f"  energy {summary['mean_energy_per_decision_joules'] * 1e9:6.1f} nJ/decision"
        f"  exploits {summary['exploits']:2d}  [{elapsed:5.0f} s]"
    )


def write_summary(run_dir: Path, config: dict, rows: dict, population: int, best: dict | None,
                  extra: dict | None = None) -> dict:
    summary = {
        "config": config,
        "generations": generation_summaries(rows, population),
        "best": best,
        **(extra or {}),
    }
    _atomic_write(Path(run_dir) / SUMMARY_FILE, json.dumps(summary, indent=1))
    return summary


def write_plots(run_dir: Path, generations: list[dict]) -> list[Path]:
    if not generations:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [g["generation"] for g in generations]
    panels = {
        "fitness.png": ("food per episode", [("best", "best_fitness"), ("mean", "mean_fitness")], 1.0),
        "hidden_neurons.png": ("hidden neurons", [("mean", "mean_hidden_neurons"),
                                                  ("min", "min_hidden_neurons"), ("max", "max_hidden_neurons")], 1.0),
        "energy.png": ("energy per decision (nJ)", [("mean", "mean_energy_per_decision_joules")], 1e9),
    }
    written = []
    for name, (ylabel, series, scale) in panels.items():
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for label, key in series:
            ax.plot(x, [g[key] * scale for g in generations], marker="o", label=label)
        ax.set_xlabel("generation")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = Path(run_dir) / name
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


class GenerationLog(tune.Callback):
    """Collects every organism's generation result into the CSV (one row per organism per
    generation; a replayed generation after a restart replaces its row) and prints one line per
    finished generation."""

    def __init__(self, run_dir: str, population: int, generations: int, config: dict,
                 printer: Callable[[str], None] = print):
        self.run_dir = str(run_dir)
        self.population = population
        self.generations = generations
        self.config = config
        self.printer = printer
        self._rows = None
        self._printed: set[int] = set()
        self._start = time.time()

    def setup(self, **info):
        self._rows = read_rows(Path(self.run_dir))
        self._printed = {g["generation"] for g in generation_summaries(self._rows, self.population)}
        self._start = time.time()

    def _inherit_skipped_generations(self, trial_id: str, generation: int, source: str) -> None:
        """Asynchronous PBT can hand a trial the checkpoint of an organism that is generations
        ahead of it; the trial then continues from that generation. The generations it skipped
        are its new lineage's: their rows are copies of the source's, marked ``inherited_from``."""
        for g in range(generation - 1, 0, -1):
            if (trial_id, g) in self._rows and not self._rows[(trial_id, g)].get("inherited_from"):
                break
            donor = self._rows.get((source, g))
            if donor is None:
                break
            self._rows[(trial_id, g)] = dict(donor, trial_id=trial_id, inherited_from=source,
                                             exploited_from="", exploit_source_hidden_neurons="")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self._rows is None:
            self.setup()
        generation = int(result["generation"])
        row = {key: result.get(key, "") for key in COLUMNS}
        row["trial_id"] = trial.trial_id
        for key, value in row.items():
            if isinstance(value, float) and not math.isfinite(value):
                row[key] = ""
        if row["exploited_from"]:
            own = [g for (t, g), r in self._rows.items()
                   if t == trial.trial_id and g < generation and not r.get("inherited_from")]
            if own:
                row["exploit_own_hidden_neurons"] = self._rows[(trial.trial_id, max(own))]["hidden_neurons"]
        self._rows[(trial.trial_id, generation)] = row
        if row["exploited_from"]:
            self._inherit_skipped_generations(trial.trial_id, generation, row["exploited_from"])
        write_rows(Path(self.run_dir), self._rows)
        for summary in generation_summaries(self._rows, self.population):
            if summary["generation"] not in self._printed:
                self._printed.add(summary["generation"])
                self.printer(progress_line(summary, self.generations, time.time() - self._start))
                write_summary(Path(self.run_dir), self.config, self._rows, self.population, best=None)
