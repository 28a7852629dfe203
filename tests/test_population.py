"""population.run against a real local Ray instance and real Tune PBT, with tiny budgets.

Every run here goes through the real CLI in a subprocess (as a user runs it), with its own Ray
temp dir and metrics port, and every process it leaves is killed by PID at the end."""

import contextlib
import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

POP, GENERATIONS = 4, 4
TINY = [
    "--set", "population.worlds=4",
    "--set", "population.episodes_per_generation=1",
    "--set", "population.eval_worlds=8",
    "--set", "pbt.perturbation_interval=1",
    # Half of the population on each side: with a quarter (one organism of four), PBT often found
    # the one top organism without a recorded checkpoint and skipped the exploit; 1 run in 8 of
    # 4 generations had no exploit at all. With a half, 8 runs had 2-6 exploits each.
    "--set", "pbt.quantile_fraction=0.5",
    # Organisms start at different sizes, so every exploit copies across sizes.
    "--set", "pbt.mutations.init_hidden={choice: [32, 64, 96, 128]}",
    "--set", "organism.min_hidden=32",
    "--set", "ray.metrics_linger_seconds=0",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> list[int]:
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry))
    out, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            out.append(child)
            stack.append(child)
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def processes_using(marker: str) -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and marker in cmdline(int(p))]


class Run:
    """One `python -m population.run` in a subprocess with its own Ray temp dir."""

    def __init__(self, tmp_path: Path, *args: str):
        self.ray_dir = tempfile.mkdtemp(prefix="gsnn-ray-", dir="/tmp")
        self.run_dir = tmp_path / "run"
        self.args = list(args)
        self.process = None

    def start(self, *extra: str) -> "Run":
        command = [sys.executable, "-m", "population.run", *extra, "--ray-temp-dir", self.ray_dir]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True, start_new_session=True)
        return self

    def fresh(self) -> "Run":
        return self.start("--pop", str(POP), "--generations", str(GENERATIONS), "--output", str(self.run_dir),
                          "--set", f"ray.metrics_export_port={free_port()}",
                          "--set", f"ray.dashboard_port={free_port()}", *TINY, *self.args)

    def wait(self, timeout=240) -> tuple[int, str]:
        out, _ = self.process.communicate(timeout=timeout)
        return self.process.returncode, out

    def rows(self) -> list[dict]:
        path = self.run_dir / "generations.csv"
        return list(csv.DictReader(open(path))) if path.exists() else []

    def kill_everything(self):
        pids = set(processes_using(self.ray_dir))
        if self.process and self.process.poll() is None:
            pids |= {self.process.pid, *descendants(self.process.pid)}
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.process is None or self.process.poll() is not None:
            shutil.rmtree(self.ray_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = Run(tmp_path_factory.mktemp("tiny"))
    try:
        code, out = run.fresh().wait()
    finally:
        run.kill_everything()
    assert code == 0, out
    return run, out


def assert_complete(rows, pop=POP, generations=GENERATIONS):
    keys = [(r["trial_id"], int(r["generation"])) for r in rows]
    assert len(keys) == len(set(keys)), "duplicated rows"
    trials = {t for t, _ in keys}
    assert len(trials) == pop
    assert set(keys) == {(t, g) for t in trials for g in range(1, generations + 1)}


def test_run_writes_complete_consistent_outputs(tiny_run):
    run, out = tiny_run
    assert f"run directory: {run.run_dir}" in out
    for g in range(1, GENERATIONS + 1):
        assert f"generation {g:3d}/{GENERATIONS}" in out
    assert "best organism: trial" in out and "checkpoint:" in out
    rows = run.rows()
    assert_complete(rows)
    summary = json.loads((run.run_dir / "summary.json").read_text())
    assert summary["config"]["population"]["size"] == POP
    assert [g["generation"] for g in summary["generations"]] == list(range(1, GENERATIONS + 1))
    for g in summary["generations"]:
        group = [r for r in rows if int(r["generation"]) == g["generation"]]
        assert g["best_fitness"] == pytest.approx(max(float(r["fitness"]) for r in group))
        assert g["mean_fitness"] == pytest.approx(sum(float(r["fitness"]) for r in group) / POP)
        assert g["mean_hidden_neurons"] == pytest.approx(sum(int(r["hidden_neurons"]) for r in group) / POP)
    best = summary["best"]
    assert set(best) >= {"trial_id", "fitness", "hidden_neurons", "energy_per_decision_joules", "checkpoint"}
    assert Path(best["checkpoint"]).is_file()
    assert summary["references"]["greedy"] > 100
    for plot in ("fitness.png", "hidden_neurons.png", "energy.png"):
        assert (run.run_dir / plot).stat().st_size > 1000


def test_pbt_mutates_thresholds_and_exploits_across_sizes(tiny_run):
    run, _ = tiny_run
    rows = run.rows()
    first = {r["trial_id"]: r for r in rows if int(r["generation"]) == 1}
    last = {r["trial_id"]: r for r in rows if int(r["generation"]) == GENERATIONS}
    for name in ("grow_threshold", "prune_threshold"):
        final = [float(r[name]) for r in last.values()]
        assert len(set(final)) > 1, f"final {name} identical across organisms"
        assert any(float(last[t][name]) != float(first[t][name]) for t in last), f"{name} never mutated"
    exploits = [r for r in rows if r["exploited_from"]]
    assert exploits, "PBT never exploited"
    across = [r for r in exploits if r["exploit_source_hidden_neurons"] != r["exploit_own_hidden_neurons"]]
    assert across, "no exploit copied an organism of another size"
    # The exploiting trial really carries the source's organism: its size continues from the source's.
    assert all(int(r["exploit_source_hidden_neurons"]) >= 32 for r in across)


def test_config_errors_are_one_line_before_ray_starts(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("population:\n  size: 4\n  colour: red\n")
    cases = [
        (["--pop", "1"], "error: population.size: must be an integer in [2, 100000], got 1"),
        (["--config", str(bad)], "error: population.colour: unknown setting"),
        (["--set", "organism.grow_threshold=abc"], "error: organism.grow_threshold: must be a number in [0.0, 1.0], got 'abc'"),
        (["--set", "pbt.mutations.prune_threshold={log_uniform: [0.001, 0.5]}"],
         "error: pbt.mutations.prune_threshold: its highest value (0.5) must not exceed the lowest grow_threshold"),
        (["--cpus-per-organism", "0"], "error: resources.cpus_per_organism: must be 'auto' or a number in (0, 64]"),
        (["--resume", str(tmp_path)], "error: --resume:"),
        (["--set", "bogus.key=1"], "error: bogus: unknown section"),
        (["--set", "pbt.mutations.min_hidden={choice: [128]}"],
         "error: pbt.mutations.min_hidden: value 128 makes an invalid organism (init_hidden: must lie in"),
        (["--set", "organism.learning_rate=2.0"], "error: organism.learning_rate: must be a number in [1e-07, 1.0], got 2.0"),
        (["--set", "ray.dashboard=maybe"], "error: ray.dashboard: must be true or false, got 'maybe'"),
    ]
    for args, expected in cases:
        start = time.time()
        out = subprocess.run([sys.executable, "-m", "population.run", *args], capture_output=True, text=True, timeout=60)
        assert out.returncode == 2, (args, out.stdout, out.stderr)
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(expected), (args, lines)
        assert "Traceback" not in out.stderr and "run directory" not in out.stdout
        assert time.time() - start < 30


def test_a_busy_port_is_one_line_before_ray_starts(tmp_path):
    """A port the local instance needs is taken (for example by a run keeping its metrics up):
    one line naming the setting, exit 2, nothing created, no Ray started."""
    import socket

    # Without ray.loopback_only the metrics exporter listens on every interface: a port taken on
    # loopback alone is busy for it too.
    for key, loopback_only, host in (("dashboard_port", "true", "127.0.0.1"),
                                     ("metrics_export_port", "true", "127.0.0.1"),
                                     ("metrics_export_port", "false", "0.0.0.0")):
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            output = tmp_path / f"{key}-{loopback_only}"
            out = subprocess.run([sys.executable, "-m", "population.run", "--pop", "2", "--output", str(output),
                                  "--set", f"ray.{key}={port}", "--set", f"ray.loopback_only={loopback_only}"],
                                 capture_output=True, text=True, timeout=60)
        assert out.returncode == 2, (key, out.stdout, out.stderr)
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: ray.{key}: {host}:{port} is not free"), lines
        assert f"--set ray.{key}=PORT" in lines[0]
        assert not output.exists() and "Ray dashboard" not in out.stdout


def test_without_the_dashboard_the_organisms_metrics_are_still_exported(tmp_path):
    """ray.dashboard: false starts the local instance without Ray's dashboard (its processes
    share the organisms' cores): nothing listens on the dashboard port, the run says so, and
    the exporter that Prometheus scrapes still serves every organism gauge for every organism."""
    import re
    import urllib.request

    from population.metrics import ORGANISM_GAUGES

    metrics_port, dashboard_port = free_port(), free_port()
    run = Run(tmp_path)
    trials, dashboard_listening, text = set(), None, ""
    try:
        run.start("--pop", "2", "--generations", "2", "--output", str(run.run_dir),
                  "--set", f"ray.metrics_export_port={metrics_port}", "--set", f"ray.dashboard_port={dashboard_port}",
                  *TINY, "--set", "ray.dashboard=false",
                  # one metrics report (every 10 s) after the last generation
                  "--set", "ray.metrics_linger_seconds=15")
        deadline = time.time() + 180
        while time.time() < deadline and run.process.poll() is None and len(trials) < 2:
            try:
                text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
            except OSError:  # the exporter is not up yet
                text = ""
            trials = set(re.findall(r'^ray_gsnn_fitness\{[^}]*trial_id="([^"]+)"', text, re.MULTILINE))
            if trials:
                with socket.socket() as probe:
                    dashboard_listening = probe.connect_ex(("127.0.0.1", dashboard_port)) == 0
            time.sleep(1)
        code, out = run.wait()
    finally:
        run.kill_everything()
    assert code == 0, out
    assert "Ray dashboard: off (ray.dashboard: false)" in out
    assert len(trials) == 2, out
    for name in ORGANISM_GAUGES:
        assert set(re.findall(rf'^ray_{name}\{{[^}}]*trial_id="([^"]+)"', text, re.MULTILINE)) == trials, name
    assert dashboard_listening is False


def wait_for_generation(run: Run, generation: int, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        done = {r["trial_id"] for r in run.rows() if int(r["generation"]) >= generation}
        if len(done) >= POP:
            return
        assert run.process.poll() is None, run.process.stdout.read()
        time.sleep(0.5)
    raise AssertionError(f"generation {generation} not reached in {timeout} s")


def test_resume_after_the_driver_is_killed(tmp_path):
    run = Run(tmp_path)
    try:
        run.fresh()
        wait_for_generation(run, 2)
        run.kill_everything()  # driver, local Ray and actors: as if the machine went down
        run.process.wait(timeout=30)
        rows_before = run.rows()
        assert 0 < len(rows_before) < POP * GENERATIONS
        resumed = Run(tmp_path)
        resumed.run_dir = run.run_dir
        code, out = resumed.start("--resume", str(run.run_dir)).wait()
        resumed.kill_everything()
    finally:
        run.kill_everything()
    assert code == 0, out
    assert "resuming" in out
    rows = resumed.rows()
    assert_complete(rows)
    # Finished generations were kept: every generation-1 row is the one written before the kill.
    before = {(r["trial_id"], r["generation"]): r["fitness"] for r in rows_before if r["generation"] == "1"}
    after = {(r["trial_id"], r["generation"]): r["fitness"] for r in rows if r["generation"] == "1"}
    assert before == after


def maps_pandas(pid: int) -> bool | None:
    """Whether pandas' compiled core is mapped in process ``pid`` (None: the process is gone)."""
    try:
        return "/pandas/_libs/" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return None


def test_a_killed_actor_is_restored_from_its_checkpoint(tmp_path):
    run = Run(tmp_path)
    seen: dict[int, set] = {}  # organism actor PID -> whether pandas was mapped, each look
    done = threading.Event()

    def watch():
        while not done.wait(0.3):
            for pid in [p for p in descendants(run.process.pid) if "Trainable" in cmdline(p)]:
                if (mapped := maps_pandas(pid)) is not None:
                    seen.setdefault(pid, set()).add(mapped)

    try:
        run.fresh()
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        wait_for_generation(run, 1)
        actors = [p for p in descendants(run.process.pid) if "Trainable" in cmdline(p)]
        assert actors, "no organism actor found"
        driver_has_pandas = maps_pandas(run.process.pid)
        os.kill(actors[0], signal.SIGKILL)
        code, out = run.wait()
    finally:
        done.set()
        run.kill_everything()
    assert code == 0, out
    rows = run.rows()
    assert_complete(rows)
    # Every organism actor, through PBT's exploits and the restore, ran without the driver's parts
    # of Tune (population/worker_setup.py); the Tune driver has them. (A restored trial may run in
    # a new process or in an actor Tune reuses; an actor Tune drops before it has computed
    # anything, when a cached one serves its trial first, may end before the watcher looks.)
    assert driver_has_pandas
    computed_by = {int(r["actor_pid"]) for r in rows}
    assert computed_by <= seen.keys(), (computed_by, seen)
    assert all(looks == {False} for looks in seen.values()), seen


STOPPED_ACTOR = """
import json, os, signal, sys, time
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # loopback only, as population.run
import ray
from population import config as run_config
from population.trainable import OrganismTrainable

def catches_sigterm(pid):
    mask = next(line for line in open(f"/proc/{pid}/status") if line.startswith("SigCgt:")).split()[1]
    return bool(int(mask, 16) >> (signal.SIGTERM - 1) & 1)

ray.init(num_cpus=1, include_dashboard=False, _node_ip_address="127.0.0.1", _temp_dir=sys.argv[1],
         log_to_driver=False)
actor = ray.remote(num_cpus=0)(OrganismTrainable).remote(config={"run": run_config.build({}).to_dict(),
                                                                   "trial_index": 0})
pid = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))
out = {"before": catches_sigterm(pid)}
ray.get(actor.stop.remote())  # what Tune calls before it lets the actor go
out["after"] = catches_sigterm(pid)
start = time.monotonic()
os.kill(pid, signal.SIGTERM)  # what the raylet sends a worker that disconnects
while time.monotonic() - start < 10 and open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
    time.sleep(0.01)
out["seconds"] = time.monotonic() - start
print(json.dumps(out), flush=True)
os._exit(0)  # the test stops the instance's processes
"""


def test_a_stopped_organism_actor_ends_quietly_on_sigterm(tmp_path):
    """Once Tune has stopped a trial (Trainable.stop, then cleanup), the raylet's SIGTERM ends
    the actor at once; under Ray's own handler it raised SystemExit wherever Python was, and a
    default run's console showed "Exception ignored ... SystemExit: 1" tracebacks."""
    ray_dir = tempfile.mkdtemp(prefix="gsnn-ray-", dir="/tmp")
    try:
        done = subprocess.run([sys.executable, "-c", STOPPED_ACTOR, ray_dir], capture_output=True, text=True,
                              timeout=120, cwd=Path(__file__).resolve().parent.parent,
                              env=dict(os.environ, HOME=str(tmp_path)))
        assert done.returncode == 0, done.stderr[-3000:]
        out = json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        for pid in processes_using(ray_dir):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(ray_dir, ignore_errors=True)
    assert out["before"] is True  # a live actor keeps Ray's handler (a graceful SystemExit)
    assert out["after"] is False
    assert out["seconds"] < 1.0


def test_population_search_stays_open_until_every_trial_has_ended():
    """Tune keeps an exploited trial's actor for reuse only while the search is unfinished: the
    search must not finish when its last trial is created, only when every trial has ended, and
    that count must survive a restore (Tuner.restore reloads the search's saved state)."""
    from ray import tune

    from population.searcher import PopulationSearch

    tune.register_trainable("gsnn_test_noop", lambda config: None)
    search = PopulationSearch(3)
    search.add_configurations({"experiment": {"run": "gsnn_test_noop", "config": {"x": tune.grid_search([1, 2, 3])}}})
    trials = [search.next_trial() for _ in range(3)]
    assert all(t is not None for t in trials) and search.next_trial() is None
    assert not search.is_finished()  # every trial created, none ended: still open
    search.on_trial_complete(trials[0].trial_id)
    search.on_trial_complete(trials[1].trial_id, error=True)
    assert not search.is_finished()
    restored = PopulationSearch(3)
    restored.set_state(search.get_state())
    assert restored.trials_ended == 2 and not restored.is_finished()
    restored.on_trial_complete(trials[2].trial_id)
    assert restored.is_finished()


def test_generation_log_appends_rows_and_rewrites_only_a_replaced_one(tmp_path):
    """The CSV grows by one appended line per result (not a rewrite of the whole file per result);
    a replayed generation replaces its row; a half-written last line (a driver killed
    mid-append) is dropped when the log starts again; the callback pickles without its file."""
    import pickle

    from ray import tune

    from population.report import ROWS_FILE, GenerationLog, replayed_rows

    tune.register_trainable("gsnn_test_noop", lambda config: None)
    a, b = tune.experiment.Trial("gsnn_test_noop"), tune.experiment.Trial("gsnn_test_noop")
    printed = []
    log = GenerationLog(str(tmp_path), population=2, generations=3, config={}, printer=printed.append)
    log.setup()
    path = tmp_path / ROWS_FILE

    def result(generation, fitness, **extra):
        return dict(generation=generation, fitness=fitness, hidden_neurons=64,
                    energy_per_decision_joules=1e-9, **extra)

    def rows():
        with open(path, newline="") as handle:
            return [(r["trial_id"], r["generation"], r["fitness"], r["inherited_from"]) for r in csv.DictReader(handle)]

    log.on_trial_result(0, [], a, result(1, 5.0))
    inode = path.stat().st_ino
    log.on_trial_result(0, [], b, result(1, 7.0))
    log.on_trial_result(0, [], a, result(2, 6.0))
    assert path.stat().st_ino == inode, "a new row rewrote the file"
    assert rows() == [(a.trial_id, "1", "5.0", ""), (b.trial_id, "1", "7.0", ""), (a.trial_id, "2", "6.0", "")]
    assert len(printed) == 1 and printed[0].startswith("generation   1/3  best    7.0  mean    6.0")
    log.on_trial_result(0, [], a, result(2, 6.5))  # replayed after a restart: replaces its row
    assert path.stat().st_ino != inode
    assert sorted(rows()) == sorted([(a.trial_id, "1", "5.0", ""), (b.trial_id, "1", "7.0", ""),
                                     (a.trial_id, "2", "6.5", "")])
    # The replaced row's compute happened: it is kept apart.
    assert [(r["trial_id"], r["generation"], r["fitness"]) for r in replayed_rows(tmp_path)] == [(a.trial_id, "2", "6.0")]
    # b copies a at generation 3 (a is ahead): b's generation 2 is a's, marked inherited.
    log.on_trial_result(0, [], b, result(3, 8.0, exploited_from=a.trial_id, exploit_source_hidden_neurons=64))
    assert sorted(rows()) == sorted([(a.trial_id, "1", "5.0", ""), (b.trial_id, "1", "7.0", ""),
                                     (a.trial_id, "2", "6.5", ""), (b.trial_id, "3", "8.0", ""),
                                     (b.trial_id, "2", "6.5", a.trial_id)])
    assert [line.split()[1] for line in printed] == ["1/3", "2/3"]
    # b's own generation 2, had it computed one, would be a replay; an inherited copy is not.
    log.on_trial_result(0, [], b, result(3, 8.5, exploited_from=a.trial_id, exploit_source_hidden_neurons=64))
    assert [r["fitness"] for r in replayed_rows(tmp_path)] == ["6.0", "8.0"]

    restored = pickle.loads(pickle.dumps(log))  # as Tune saves and restores its callbacks
    restored.printer = printed.append
    with open(path, "a") as handle:
        handle.write(f"{a.trial_id},3,9.")  # killed mid-append
    restored.setup()
    assert (a.trial_id, "3", "9.", "") not in rows() and len(rows()) == 5
    assert (b.trial_id, "3", "8.5", "") in rows()
    restored.on_trial_result(0, [], a, result(3, 9.5))
    assert rows()[-1] == (a.trial_id, "3", "9.5", "")
    assert printed[-1].split()[1] == "3/3"
    restored.on_experiment_end([])
    assert [r[1] for r in rows()] == ["1", "1", "2", "2", "3", "3"]
