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
from collections import Counter
from pathlib import Path
from typing import Callable

from ray import tune

ROWS_FILE = "generations.csv"
# Rows that a later result for the same organism and generation replaced: a generation computed
# again, after PBT handed the organism a checkpoint from behind its own generation, or after a
# restart from the last checkpoint. Their compute happened; this file keeps their record.
REPLAYED_FILE = "replayed_generations.csv"
SUMMARY_FILE = "summary.json"
COLUMNS = (
    "trial_id", "generation", "fitness", "fitness_std", "train_food", "hidden_neurons",
    "mean_firing_rate", "energy_per_decision_joules", "synops_per_decision",
    "dense_ann_energy_per_decision_joules", "sparse_ann_energy_per_decision_joules",
    "grow_threshold", "prune_threshold", "learning_rate", "neurons_per_grow", "learning_rule",
    "weight_noise", "grow_events_total", "neurons_added_total", "prune_events_total",
    "neurons_removed_total", "exploited_from", "exploit_source_hidden_neurons",
    "exploit_own_hidden_neurons", "inherited_from", "decisions_per_second", "learn_seconds", "eval_seconds",
    "compute_cpu_seconds", "between_cpu_seconds", "between_process_cpu_seconds",
    "slot_wait_seconds", "time_this_iter_s", "finished_at", "device", "actor_pid",
)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _complete_rows(path: Path) -> list[dict]:
    """The rows of the CSV at ``path``. A last line without its newline (a driver killed
    mid-append, or a read racing one) is not a row yet, and is left out, as is a line with too
    few or too many fields."""
    if not path.is_file():
        return []
    text = path.read_text()
    if not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    return [row for row in csv.DictReader(io.StringIO(text, newline=""))
            if None not in row.values() and None not in row]


def read_rows(run_dir: Path) -> dict[tuple[str, int], dict]:
    """The CSV's rows by (trial_id, generation)."""
    return {(row["trial_id"], int(row["generation"])): row for row in _complete_rows(Path(run_dir) / ROWS_FILE)}


def replayed_rows(run_dir: Path) -> list[dict]:
    """The rows that later results replaced (``REPLAYED_FILE``), in the order they were replaced."""
    return _complete_rows(Path(run_dir) / REPLAYED_FILE)


def write_rows(run_dir: Path, rows: dict[tuple[str, int], dict]) -> None:
    ordered = sorted(rows.values(), key=lambda r: (int(r["generation"]), r["trial_id"]))
    _atomic_write(Path(run_dir) / ROWS_FILE, _csv_lines(ordered, header=True))


def _csv_lines(rows: list[dict], header: bool = False) -> str:
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=COLUMNS, extrasaction="ignore")
    if header:
        writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


def append_rows(path: Path, rows: list[dict]) -> None:
    """Append ``rows`` to the CSV at ``path``, with the header first if the file is new."""
    with open(path, "ab") as handle:
        handle.write(_csv_lines(rows, header=handle.tell() == 0).encode())


class RowsFile:
    """The run's CSV, kept up to date row by row. A new row is appended (one write of one whole
    line); only a replaced row (a generation computed again) rewrites the file, sorted, through a
    temporary file and a rename. Rewriting it for every result, as before, cost the Tune
    driver half of its CPU at 240 rows and grew with the square of the run."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ROWS_FILE
        self.rows = read_rows(run_dir)
        self._fd: int | None = None
        self.rewrite()

    def rewrite(self) -> None:
        self.close()
        write_rows(self.path.parent, self.rows)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)

    def put(self, rows: list[dict]) -> list[dict]:
        """Record ``rows`` (keyed by trial_id and generation) in memory and in the file. Returns
        the rows they replaced."""
        replaced = []
        for row in rows:
            key = (row["trial_id"], int(row["generation"]))
            if key in self.rows:
                replaced.append(self.rows[key])
            self.rows[key] = row
        if replaced or self._fd is None:
            self.rewrite()
        else:
            os.write(self._fd, _csv_lines(rows).encode())
        return replaced

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


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
        self._file: RowsFile | None = None
        self._counts: Counter[int] = Counter()  # rows per generation
        self._printed: set[int] = set()
        self._start = time.time()

    def __getstate__(self):  # Tune saves its callbacks with the experiment; the open file stays here
        return dict(self.__dict__, _file=None, _counts=Counter(), _printed=set())

    def setup(self, **info):
        self._file = RowsFile(Path(self.run_dir))
        self._counts = Counter(generation for _, generation in self._file.rows)
        self._printed = {g for g, n in self._counts.items() if n >= self.population}
        self._start = time.time()

    @property
    def _rows(self) -> dict[tuple[str, int], dict]:
        return self._file.rows

    def _inherited_rows(self, trial_id: str, generation: int, source: str) -> list[dict]:
        """Asynchronous PBT can hand a trial the checkpoint of an organism that is generations
        ahead of it; the trial then continues from that generation. The generations it skipped
        are its new lineage's: their rows are copies of the source's, marked ``inherited_from``."""
        rows = []
        for g in range(generation - 1, 0, -1):
            if (trial_id, g) in self._rows and not self._rows[(trial_id, g)].get("inherited_from"):
                break
            donor = self._rows.get((source, g))
            if donor is None:
                break
            rows.append(dict(donor, trial_id=trial_id, inherited_from=source,
                             exploited_from="", exploit_source_hidden_neurons=""))
        return rows

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self._file is None:
            self.setup()
        generation = int(result["generation"])
        row = {key: result.get(key, "") for key in COLUMNS}
        row["trial_id"] = trial.trial_id
        for key, value in row.items():
            if isinstance(value, float) and not math.isfinite(value):
                row[key] = ""
        rows = [row]
        if row["exploited_from"]:
            own = [g for (t, g), r in self._rows.items()
                   if t == trial.trial_id and g < generation and not r.get("inherited_from")]
            if own:
                row["exploit_own_hidden_neurons"] = self._rows[(trial.trial_id, max(own))]["hidden_neurons"]
            rows += self._inherited_rows(trial.trial_id, generation, row["exploited_from"])
        new = [r for r in rows if (r["trial_id"], int(r["generation"])) not in self._rows]
        replayed = [r for r in self._file.put(rows) if not r.get("inherited_from")]
        if replayed:
            append_rows(Path(self.run_dir) / REPLAYED_FILE, replayed)
        self._counts.update(int(r["generation"]) for r in new)
        finished = sorted(g for g in {int(r["generation"]) for r in new}
                          if self._counts[g] >= self.population and g not in self._printed)
        for g in finished:
            self._printed.add(g)
            group = {key: r for key, r in self._rows.items() if key[1] == g}
            self.printer(progress_line(generation_summaries(group, self.population)[0], self.generations,
                                       time.time() - self._start))
        if finished:
            write_summary(Path(self.run_dir), self.config, self._rows, self.population, best=None)

    def on_experiment_end(self, trials, **info):
        if self._file is not None:
            self._file.rewrite()  # sorted by generation and organism
            self._file.close()
