"""The hypothesis experiment (population.experiment): continual-learning measures and the goal check
on hand-made cases, config errors before Ray starts, and a smoke run of the real command (tiny
budget, 2 arms, 1 seed) on a local Ray instance whose output table must be complete."""

import json
import math
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from test_monitoring import is_loopback, listening_sockets
from test_population import kill_ray_processes, ray_processes, session

from population import continual, results
from population.experiment_config import ARM_TITLES

# -- continual-learning measures on hand-made matrices ---------------------------------------------


def test_continual_measures_on_a_hand_made_matrix():
    # R[i][j]: fitness on season j after learning season i.
    R = [[10.0, 2.0, 3.0],
         [6.0, 12.0, 4.0],
         [5.0, 9.0, 15.0]]
    assert continual.average_fitness(R) == pytest.approx((5 + 9 + 15) / 3)
    assert continual.backward_transfer(R) == pytest.approx(((5 - 10) + (9 - 12)) / 2)  # -4
    # Forgetting: season 0 best 10 (after 0) -> 5; season 1 best 12 (after 1) -> 9.
    assert continual.forgetting(R) == pytest.approx(((10 - 5) + (12 - 9)) / 2)  # 4
    # The best earlier value need not be on the diagonal: season 0 peaks after season 1.
    R2 = [[4.0, 0.0, 0.0],
          [8.0, 6.0, 0.0],
          [7.0, 6.0, 9.0]]
    assert continual.backward_transfer(R2) == pytest.approx(((7 - 4) + (6 - 6)) / 2)  # +1.5
    assert continual.forgetting(R2) == pytest.approx(((8 - 7) + (6 - 6)) / 2)  # 0.5
    # Learning later seasons that helps earlier ones: positive transfer, negative forgetting.
    R3 = [[1.0, 0.0], [3.0, 5.0]]
    assert continual.measures(R3) == pytest.approx(
        {"average_fitness": 4.0, "backward_transfer": 2.0, "forgetting": -2.0})
    assert math.isnan(continual.backward_transfer([[3.0]])) and math.isnan(continual.forgetting([[3.0]]))
    with pytest.raises(ValueError):
        continual.forgetting([[1.0], [2.0]])
    assert continual.mean_matrix([R3, [[3.0, 2.0], [1.0, 1.0]]]) == [[2.0, 1.0], [2.0, 3.0]]


def _run(fitness, energy, hidden, forgetting_rows=None, curve=None):
    final = {"fitness": fitness, "energy_per_decision_joules": energy, "dense_ann_energy_per_decision_joules": 2 * energy,
             "synops_per_decision": energy / 0.9e-12, "hidden_neurons": hidden, "macs_per_decision": 0.0}
    run = {"final": final, "wall_s": 10.0, "env_steps": 1000,
           "curve": curve or [{"env_steps": 0, "fitness": 0.0, "hidden_neurons": hidden},
                              {"env_steps": 500, "fitness": fitness, "hidden_neurons": hidden}]}
    if forgetting_rows:
        run["continual"] = dict(continual.measures(forgetting_rows), R=forgetting_rows, seasons=[0, 1],
                                before=[0.0, 0.0], hidden_neurons=[hidden, hidden])
    return run


def test_summary_goal_and_table_on_hand_made_runs():
    references = {"greedy": 100.0, "random": 8.0}
    runs = {
        "fixed_max": [_run(80.0, 100e-9, 512, [[50.0, 10.0], [20.0, 60.0]]),
                      _run(60.0, 100e-9, 512, [[50.0, 10.0], [30.0, 60.0]])],
        "grow_prune": [_run(70.0, 20e-9, 100, [[50.0, 10.0], [45.0, 60.0]]),
                       _run(68.0, 30e-9, 120, [[50.0, 10.0], [45.0, 60.0]])],
    }
    summary = results.summarize(runs, references, target_fraction=0.5)
    assert summary["fixed_max"]["fitness"] == pytest.approx((70.0, math.sqrt(200.0)))
    assert summary["fixed_max"]["steps_to_target_per_seed"] == [500, 500]
    assert summary["grow_prune"]["energy_vs_fixed_max"][0] == pytest.approx(0.25)
    assert summary["grow_prune"]["energy_vs_dense_ann"][0] == pytest.approx(0.5)
    cont = results.summarize_continual(runs)
    assert cont["fixed_max"]["forgetting"][0] == pytest.approx((30 + 20) / 2)
    goal = results.goal_check(summary, cont)["grow_prune"]
    assert goal["fitness_ratio"] == pytest.approx(69.0 / 70.0) and goal["fitness_ok"]
    assert goal["energy_ok"] and goal["forgetting_ok"] and goal["held"]
    # One more joule's worth of energy and the goal fails on energy alone.
    runs["grow_prune"][1]["final"]["energy_per_decision_joules"] = 40e-9
    summary = results.summarize(runs, references, target_fraction=0.5)
    goal = results.goal_check(summary, cont)["grow_prune"]
    assert not goal["energy_ok"] and not goal["held"] and goal["fitness_ok"]
    said = " ".join(results.statements(summary, cont, {"grow_prune": goal}, references, None))
    assert "did not hold" in said and "energy per decision 30%" in said
    rows = results.table_rows(summary)
    assert [r[0].split(" ")[0] for r in rows] == ["fixed_max", "grow_prune"]
    assert all(len(r) == len(results.TABLE_COLUMNS) and all(r) for r in rows)
    # A run that never reaches half the greedy walk says so.
    never = _run(10.0, 50e-9, 64)
    summary = results.summarize({"fixed_max": [never]}, references, target_fraction=0.5)
    assert summary["fixed_max"]["steps_to_target"] == (None, None)
    assert results.table_rows(summary)[0][4] == "not reached (0/1)"


# -- the command ------------------------------------------------------------------------------------


def test_config_errors_are_one_line_before_ray_starts(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("experiment:\n  seeds: 2\n  colour: red\nbudgets:\n  default: {}\n")
    cases = [
        (["--budget", "huge"], "error: --budget: must be one of default, quick, smoke, got 'huge'"),
        (["--arms", "fixed_max,dqn"], "error: experiment.arms: unknown arm 'dqn'"),
        (["--seeds", "0"], "error: experiment.seeds: must be an integer in [1, 1000], got 0"),
        (["--config", str(bad)], "error: experiment.colour: unknown setting"),
        (["--set", "arms.fixed_max.prune_threshold=0.5"], "error: arms.fixed_max.prune_threshold: must be <= grow_threshold"),
        (["--set", "pbt.episodes_per_generation=7"], "error: pbt.episodes_per_generation: must divide experiment.episodes (60), got 7"),
        (["--set", "continual.seasons=[0, 4]"], "error: continual.seasons: must be a non-empty list of integers in [0, 3]"),
    ]
    for args, expected in cases:
        out = subprocess.run([sys.executable, "-m", "population.experiment", *args, "--results", str(tmp_path / "r")],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 2, (args, out.stdout, out.stderr)
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(expected), (args, lines)
        assert "Traceback" not in out.stderr and "experiment:" not in out.stdout
    assert not (tmp_path / "r").exists()


def run_experiment(tmp_path: Path, *args: str, timeout=300) -> tuple[int, str, float, set[str], str]:
    """The real command in a subprocess with its own Ray temp dir and session; afterwards every
    process of its Ray instance is killed by PID until none is left (test_population's
    kill_ray_processes: Ray's workers rename themselves, and may outlive the command). Returns
    its exit code, output, seconds, the TCP addresses its processes listened on (sampled every
    0.5 s while it ran) and what its Ray workers printed (their logs/worker-*.out: in a run of a
    few seconds Ray's log monitor, a process of its own, may start tracking them too late to
    forward any line to the driver before it ends; 2 of 5 smoke runs under pytest had none)."""
    ray_dir = tempfile.mkdtemp(prefix="gsnn-ray-", dir="/tmp")
    command = [sys.executable, "-m", "population.experiment", "--budget", "smoke", "--results", str(tmp_path / "docs"),
               "--workdir", str(tmp_path / "work"), "--ray-temp-dir", ray_dir, *args]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    leader = session(process)
    start = time.time()
    sockets: set[str] = set()
    done = threading.Event()

    def watch():
        while not done.wait(0.5):
            sockets.update(listening_sockets(ray_processes(ray_dir, [leader])))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        out, _ = process.communicate(timeout=timeout)
    finally:
        done.set()
        watcher.join(timeout=30)
        kill_ray_processes(ray_dir, [leader])  # the command too, if it is still running
        process.wait(timeout=30)
        printed = "".join(path.read_text(errors="replace")
                          for path in sorted(Path(ray_dir).glob("session_*/logs/worker-*.out")))
        shutil.rmtree(ray_dir, ignore_errors=True)
    return process.returncode, out, time.time() - start, sockets, printed


def _finite_numbers(cell: str) -> bool:
    import re

    numbers = re.findall(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?|nan|inf", cell.lower())
    return bool(numbers) and all(math.isfinite(float(n)) for n in numbers)


def check_outputs(docs: Path, arms: list[str]) -> dict:
    text = (docs / "results.md").read_text()
    assert "python -m population.experiment" in text and "## Verdict" in text
    rows = results.parse_markdown_table(text, "arm")
    assert [r["arm"] for r in rows] == [f"{arm} ({ARM_TITLES[arm]})" for arm in arms]
    for row in rows:
        assert list(row) == list(results.TABLE_COLUMNS)
        for column, cell in row.items():
            assert cell, (column, row)
            if column == "arm":
                continue
            if column == "env steps to 50% of greedy" and cell.startswith("not reached"):
                continue
            if column == "vs fixed-512" and "fixed_max" not in arms:
                assert cell == "n/a (no fixed_max arm)"
                continue
            assert _finite_numbers(cell), (column, cell)
    data = json.loads((docs / "results.json").read_text())
    assert set(data["summary"]) == set(arms)
    for arm, m in data["summary"].items():
        for key in ("fitness", "fraction_of_greedy", "energy_per_decision_joules", "energy_vs_dense_ann",
                    "hidden_neurons", "wall_s", "env_steps"):
            assert all(v is not None and math.isfinite(v) for v in m[key]), (arm, key, m[key])
        assert m["seeds"] == 1 and len(data["runs"][arm]) == 1
    # The continual measures in the output are the ones of its own matrices.
    for arm, runs in data["runs"].items():
        for run in runs:
            if "continual" in run:
                c = run["continual"]
                assert len(c["R"]) == len(c["seasons"]) == 4
                assert c["forgetting"] == pytest.approx(continual.forgetting(c["R"]))
                assert c["backward_transfer"] == pytest.approx(continual.backward_transfer(c["R"]))
                assert c["average_fitness"] == pytest.approx(continual.average_fitness(c["R"]))
    for plot in results.PLOTS:
        assert (docs / plot).stat().st_size > 5000, plot
        assert f"]({plot})" in text
    assert data["references"]["greedy"] > 100
    return data


def test_smoke_experiment_writes_a_complete_table(tmp_path):
    arms = ["fixed_max", "grow_prune"]
    code, out, seconds, sockets, printed = run_experiment(tmp_path, "--arms", ",".join(arms), "--seeds", "1")
    assert code == 0, out
    # its local Ray instance (GCS, raylet, workers) listens on 127.0.0.1 only
    assert len(sockets) >= 3 and all(is_loopback(s) for s in sockets), sockets
    assert "[fixed_max seed 0] step" in printed and "season 4/4" in printed and "done 2/2" in out
    data = check_outputs(tmp_path / "docs", arms)
    assert set(data["continual"]) == set(arms)
    goal = data["goal"]["grow_prune"]
    assert set(goal) >= {"fitness_ratio", "energy_ratio", "forgetting", "held"}
    assert "grow_prune: the goal" in (tmp_path / "docs" / "results.md").read_text()
    # The page can be rendered again from the raw runs alone, identically.
    assert results.main([str(tmp_path / "docs" / "results.json"), "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "results.md").read_text() == (tmp_path / "docs" / "results.md").read_text()
    print(f"smoke experiment (2 arms, 1 seed): {seconds:.0f} s")


def test_smoke_experiment_pbt_and_ppo_arms(tmp_path):
    """The two arms that go through Tune (population.run's PBT) and RLlib (PPO, new API stack)."""
    arms = ["grow_prune_pbt", "ppo"]
    code, out, seconds, _, printed = run_experiment(tmp_path, "--arms", ",".join(arms))
    assert code == 0, out
    assert "[ppo seed 0] step" in printed and "[grow_prune_pbt seed 0] generation   2/2" in out
    data = check_outputs(tmp_path / "docs", arms)
    ppo = data["runs"]["ppo"][0]["final"]
    assert ppo["macs_per_decision"] == 450 * 64 + 64 * 64 + 64 * 4  # the policy path of the MLP
    assert data["summary"]["ppo"]["energy_vs_dense_ann"][0] == pytest.approx(1.0)
    assert set(data["continual"]) == {"grow_prune_pbt"}
    assert not (tmp_path / "work" / "pbt-seed0" / "tune").exists()  # checkpoints removed once used
    assert (tmp_path / "work" / "pbt-seed0" / "generations.csv").is_file()
    print(f"smoke experiment (PBT + PPO, 1 seed): {seconds:.0f} s")
