"""population.run against a real local Ray instance and real Tune PBT, with tiny budgets.

Every run here goes through the real CLI in a subprocess (as a user runs it), with its own Ray
temp dir and metrics port, and every process it leaves is killed by PID at the end."""

import contextlib
import csv
import json
import os
import re
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


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat from field 3 (state) on: the command name may hold spaces and parentheses."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def descendants(pid: int) -> list[int]:
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat(int(entry))) is not None:
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


def refers_to(pid: int, marker: str) -> bool:
    """Whether process ``pid`` names ``marker`` in its command line, environment, working
    directory or open files. A Ray worker rewrites its command line (``ray::IDLE``,
    ``ray::OrganismTrainable``) but keeps its log files open in its Ray temp dir."""
    if marker in cmdline(pid):
        return True
    try:
        if marker.encode() in Path(f"/proc/{pid}/environ").read_bytes():
            return True
        links = [f"/proc/{pid}/cwd", *(f"/proc/{pid}/fd/{fd}" for fd in os.listdir(f"/proc/{pid}/fd"))]
    except OSError:
        return False
    for link in links:
        try:
            if marker in os.readlink(link):
                return True
        except OSError:
            continue
    return False


def alive(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] not in "ZX"


def processes_using(marker: str) -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and refers_to(int(p), marker)]


def session(process: subprocess.Popen) -> tuple[int, str]:
    """The session a command started with start_new_session=True leads: its PID and its leader's
    start time (to tell it from a later process that reuses the PID once the session is empty)."""
    return process.pid, (_stat(process.pid) or [""] * 20)[19]


def ray_processes(marker: str, sessions=()) -> list[int]:
    """The live processes of a Ray instance a test started: those that refer to its temp dir
    ``marker`` (see refers_to), and every member of ``sessions`` (see session: Ray's servers and
    workers stay in the session of the command that started them, after it is gone too).
    Zombies are left out (they hold nothing); so are this process and its ancestors."""
    ours = set()
    for sid, start in sessions:
        leader = _stat(sid)
        if leader is None or leader[19] == start:  # else the PID now names another process
            ours.add(sid)
    spared, pid = set(), os.getpid()
    while pid > 0 and pid not in spared:
        spared.add(pid)
        pid = int((_stat(pid) or [0, 0])[1])
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in spared:
            continue
        fields = _stat(int(entry))
        if fields is None or fields[0] in "ZX":
            continue
        if int(fields[3]) in ours or refers_to(int(entry), marker):
            found.append(int(entry))
    return found


def kill_ray_processes(marker: str, sessions=(), timeout: float = 30) -> dict[int, str]:
    """SIGKILL every process of the Ray instance (ray_processes) until none is left; returns the
    killed ones (PID -> command line). Fails if any is still there after ``timeout`` seconds."""
    killed, deadline = {}, time.monotonic() + timeout
    while pids := ray_processes(marker, sessions):
        if time.monotonic() > deadline:
            raise AssertionError(f"processes of the Ray instance in {marker} outlived SIGKILL: "
                                 f"{ {p: cmdline(p) for p in pids} }")
        for pid in pids:
            killed.setdefault(pid, cmdline(pid))
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    return killed


class Run:
    """One `python -m population.run` in a subprocess with its own Ray temp dir."""

    def __init__(self, tmp_path: Path, *args: str):
        self.ray_dir = tempfile.mkdtemp(prefix="gsnn-ray-", dir="/tmp")
        self.run_dir = tmp_path / "run"
        self.args = list(args)
        self.process = self.session = None

    def start(self, *extra: str, env: dict | None = None) -> "Run":
        command = [sys.executable, "-m", "population.run", *extra, "--ray-temp-dir", self.ray_dir]
        # A session of its own: every process of its Ray instance stays in it (ray_processes).
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True, start_new_session=True, env=dict(os.environ, **(env or {})))
        self.session = session(self.process)
        return self

    def fresh(self, generations: int = GENERATIONS, env: dict | None = None) -> "Run":
        return self.start("--pop", str(POP), "--generations", str(generations), "--output", str(self.run_dir),
                          "--set", f"ray.metrics_export_port={free_port()}",
                          "--set", f"ray.dashboard_port={free_port()}", *TINY, *self.args, env=env)

    def wait(self, timeout=240) -> tuple[int, str]:
        out, _ = self.process.communicate(timeout=timeout)
        return self.process.returncode, out

    def rows(self) -> list[dict]:
        return read_csv(self.run_dir / "generations.csv")

    def kill_everything(self) -> dict[int, str]:
        """SIGKILL the driver and every process of its Ray instance, found by PID whether the
        driver still runs or not (ray_processes), until none is left. Returns the killed ones."""
        killed = kill_ray_processes(self.ray_dir, [self.session] if self.session else [])
        if self.process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=30)
        shutil.rmtree(self.ray_dir, ignore_errors=True)
        return killed


def read_csv(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


# -- what each generation started from ---------------------------------------------------------------
# An organism's checkpoint carries its hidden size and its cumulative growth and pruning counters,
# and each row of generations.csv records them at the end of its generation. So along a lineage
# (an organism and the checkpoints it is restored or copied from) the counters never decrease, and
# its founding size, hidden - neurons added + neurons removed, never changes. Tune's results
# (result.json) also record this generation's growth and pruning, which gives the organism a
# generation started from exactly; but Tune rewrites a trial's result.json with its stored copy
# whenever it restores the trial, and on a local run that copy is the file itself: only the
# results since the trial's last restore survive.
COUNTERS = ("grow_events", "neurons_added", "prune_events", "neurons_removed")


def state_after(record: dict) -> tuple[int, ...]:
    """(hidden neurons, grow events, neurons added, prune events, neurons removed) at the end of a
    generation, from a row of generations.csv or a Tune result."""
    return (int(record["hidden_neurons"]), *(int(record[f"{c}_total"]) for c in COUNTERS))


def state_before(result: dict) -> tuple[int, ...]:
    """The same at the start of a Tune result's generation: its end less this generation's growth
    and pruning."""
    return (int(result["hidden_neurons"]) - int(result["neurons_added_this_generation"])
            + int(result["neurons_removed_this_generation"]),
            *(int(result[f"{c}_total"]) - int(result[f"{c}_this_generation"]) for c in COUNTERS))


def founding_size(state: tuple[int, ...]) -> int:
    hidden, _, added, _, removed = state
    return hidden - added + removed


def tune_results(run_dir: Path) -> list[dict]:
    """The results Tune still has (tune/*/result.json; see above). A line cut short by a killed
    driver is skipped."""
    results = []
    for path in sorted((run_dir / "tune").glob("*/result.json")):
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                results.append(json.loads(line))
    return results


def check_lineages(run_dir: Path, *earlier_rows: dict) -> list[dict]:
    """Every generation a trial computed started from the organism it had to: generation 1 from a
    fresh one, generation g from the organism at the end of generation g-1 of its lineage: its
    own (restored from its checkpoint after a restart), or, after a PBT exploit, the copied
    trial's (exploited_from). Each row of generations.csv and replayed_generations.csv (and
    ``earlier_rows``) continues a state of its lineage at g-1 (the same founding size, no counter
    lower); each result Tune still has started exactly from one (a fresh organism: no growth or
    pruning yet, the trial's init_hidden). Returns Tune's results."""
    rows = [*read_csv(run_dir / "generations.csv"), *read_csv(run_dir / "replayed_generations.csv"), *earlier_rows]
    results = tune_results(run_dir)
    ends: dict[tuple[str, int], set] = {}
    for record in [*rows, *results]:
        ends.setdefault((record["trial_id"], int(record["generation"])), set()).add(state_after(record))

    def lineage_end(record):
        generation = int(record["generation"])
        lineage = record["exploited_from"] or record["trial_id"]
        where = (f"trial {record['trial_id']} generation {generation} (actor {record['actor_pid']}, "
                 f"exploited from {record['exploited_from'] or 'none'})")
        return ends.get((lineage, generation - 1), set()), where, lineage

    for row in rows:
        if int(row["generation"]) == 1 or row.get("inherited_from"):
            continue
        end, where, lineage = lineage_end(row)
        state = state_after(row)
        assert any(founding_size(p) == founding_size(state) and all(a >= b for a, b in zip(state[1:], p[1:]))
                   for p in end), (
            f"{where} ended as {state}: not a continuation of {lineage} after the generation before, "
            f"{sorted(end)} (hidden neurons, grow events, neurons added, prune events, neurons removed)")
    for result in results:
        began = state_before(result)
        if int(result["generation"]) == 1:
            config = result["config"]
            init_hidden = config.get("init_hidden", config["run"]["organism"].get("init_hidden"))
            assert not result["exploited_from"] and began[1:] == (0, 0, 0, 0), (result["trial_id"], began)
            assert init_hidden is None or began[0] == init_hidden, (result["trial_id"], began, init_hidden)
            continue
        end, where, lineage = lineage_end(result)
        assert began in end, (f"{where} began as {began}, not as {lineage}'s organism after the generation "
                              f"before: {sorted(end)}")
    return results


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
    assert "PBT is off" not in out
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
    # The exploiting trial really carries the source's organism, not its own nor a fresh one: the
    # generation after each exploit continued the source's organism at its checkpoint (the same
    # founding size, its growth and pruning counters carried on), and every other generation its
    # own (check_lineages). Where Tune still has the exploit's result, the generation began with
    # exactly the source's size and counters.
    results = check_lineages(run.run_dir)
    began = {(r["trial_id"], float(r["finished_at"])): state_before(r) for r in results}
    for row in across:
        if (row["trial_id"], float(row["finished_at"])) in began:
            hidden = began[(row["trial_id"], float(row["finished_at"]))][0]
            assert hidden == int(row["exploit_source_hidden_neurons"]) != int(row["exploit_own_hidden_neurons"]), row
    # An exploit copies the source's hyperparameters, not its identity: each trial keeps its own
    # trial_index (the organism's seed, its worlds, a copy's random stream) in every result,
    # as its folder's name has it from its start.
    indices = {}
    for folder in (run.run_dir / "tune").glob("*/result.json"):
        own = int(re.search(r"trial_index=(\d+)", folder.parent.name).group(1))
        for line in folder.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                result = json.loads(line)
                assert result["config"]["trial_index"] == own, (folder.parent.name, result["exploited_from"])
                indices[result["trial_id"]] = own
    assert sorted(indices.values()) == list(range(POP)), indices


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
    # No Ray started: Ray would have created its temp dir (sessions, sockets, logs) and left
    # processes in the command's session.
    ray_dir = Path(tempfile.mkdtemp(prefix="gsnn-ray-", dir="/tmp")) / "ray"
    try:
        for args, expected in cases:
            process = subprocess.Popen([sys.executable, "-m", "population.run", *args, "--ray-temp-dir", str(ray_dir)],
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                       start_new_session=True)
            leader = session(process)
            stdout, stderr = process.communicate(timeout=120)
            assert process.returncode == 2, (args, stdout, stderr)
            lines = stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith(expected), (args, lines)
            assert "Traceback" not in stderr and "run directory" not in stdout
            started = kill_ray_processes(str(ray_dir), [leader])
            assert not ray_dir.exists() and not started, (args, started)
    finally:
        shutil.rmtree(ray_dir.parent, ignore_errors=True)


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
        time.sleep(0.2)
    raise AssertionError(f"generation {generation} not reached in {timeout} s")


def test_resume_after_the_driver_is_killed(tmp_path):
    """The driver, the local Ray instance and the actors are killed (as if the machine went down);
    --resume continues every organism from its checkpoint: the rows of the generations each had
    checkpointed are kept as written before the kill (same actor, same time), each organism's
    next generation starts from its checkpointed organism (size and growth/prune counters) and
    not a fresh one, and no computed generation's row is lost.

    PBT is off here (its exploits may replay generations; tested above), so a replaced row is
    recomputed work. Tune records which checkpoint each trial has in an experiment snapshot that
    it writes at most every 10 s by default (TUNE_GLOBAL_CHECKPOINT_S=auto), and this tiny run's
    first generations come sooner: the killed driver snapshots at every step."""
    generations = 2 * GENERATIONS  # room for the kill at generation 2
    run, resumed = Run(tmp_path, "--set", f"pbt.perturbation_interval={10 * generations}"), None
    try:
        run.fresh(generations=generations, env={"TUNE_GLOBAL_CHECKPOINT_S": "0"})
        wait_for_generation(run, 2)
        actors = {int(r["actor_pid"]) for r in run.rows()}
        actors = {pid for pid in actors if cmdline(pid).startswith("ray::")}  # alive, Ray's title
        killed = run.kill_everything()  # driver, local Ray and actors: as if the machine went down
        rows_before = run.rows()
        assert 0 < len(rows_before) < POP * generations
        resumed = Run(tmp_path)
        resumed.run_dir = run.run_dir
        resumed_at = time.time()
        code, out = resumed.start("--resume", str(run.run_dir)).wait()
    finally:
        run.kill_everything()
        if resumed is not None:
            resumed.kill_everything()
    # The organisms' actors, whose command lines Ray rewrites, were found and killed by PID (an
    # actor whose trial had just finished may have ended on its own).
    assert actors & killed.keys() and not any(alive(pid) for pid in actors), (actors, killed)
    assert code == 0, out
    assert "resuming" in out
    assert f"note: PBT is off in this run: pbt.perturbation_interval ({10 * generations})" in out
    rows = resumed.rows()
    assert_complete(rows, generations=generations)
    key = lambda r: (r["trial_id"], int(r["generation"]))  # noqa: E731
    same = lambda a, b: (a["actor_pid"], a["finished_at"]) == (b["actor_pid"], b["finished_at"])  # noqa: E731
    before, after = {key(r): r for r in rows_before}, {key(r): r for r in rows}
    replayed = read_csv(run.run_dir / "replayed_generations.csv")
    for k, row in before.items():  # each still there, or kept apart as replayed
        assert same(after[k], row) or any(key(r) == k and same(r, row) for r in replayed), (k, row)
    for trial in {t for t, _ in after}:
        computed = sorted(g for (t, g), r in after.items() if t == trial and float(r["finished_at"]) > resumed_at)
        first = computed[0] if computed else generations + 1
        assert first > 1, f"{trial} started again from generation 1 after --resume"
        for g in range(1, first):
            assert same(after[(trial, g)], before[(trial, g)]), f"{trial} generation {g} recomputed"
    results = check_lineages(run.run_dir, *rows_before)
    assert any(r["finished_at"] > resumed_at for r in results)


def maps_pandas(pid: int) -> bool | None:
    """Whether pandas' compiled core is mapped in process ``pid`` (None: the process is gone)."""
    try:
        return "/pandas/_libs/" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return None


def organism_to_kill(run: Run, last_generation: int, timeout=120) -> tuple[int, str]:
    """(PID, trial) of a live organism actor in the middle of its trial's run: the trial has
    reported generation 2 or later (so Tune has its first checkpoint), and not its last."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        latest = {}
        for row in run.rows():
            if int(row["generation"]) > int(latest.get(row["trial_id"], {"generation": 0})["generation"]):
                latest[row["trial_id"]] = row
        candidates = sorted((int(r["generation"]), int(r["actor_pid"]), t) for t, r in latest.items()
                            if 2 <= int(r["generation"]) < last_generation
                            and cmdline(int(r["actor_pid"])).startswith("ray::"))
        if candidates:
            return candidates[0][1], candidates[0][2]
        assert run.process.poll() is None, run.process.stdout.read()
        time.sleep(0.2)
    raise AssertionError(f"no organism actor in the middle of its run in {timeout} s")


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
        run.fresh(generations=GENERATIONS + 2)  # room after the kill: the victim's trial is mid-run
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        wait_for_generation(run, 1)
        victim, victim_trial = organism_to_kill(run, last_generation=GENERATIONS + 2)
        driver_has_pandas = maps_pandas(run.process.pid)
        killed_at = time.time()
        os.kill(victim, signal.SIGKILL)
        code, out = run.wait()
    finally:
        done.set()
        run.kill_everything()
    assert code == 0, out
    rows = run.rows()
    assert_complete(rows, generations=GENERATIONS + 2)
    # The kill failed the trial the actor was computing, and Tune restored it (Tune's saved state
    # counts each trial's failures)...
    state = json.loads(max((run.run_dir / "tune").glob("experiment_state-*.json")).read_text())
    failures = {json.loads(trial)["trial_id"]: json.loads(runtime)["num_failures"]
                for trial, runtime in state["trial_data"]}
    assert sum(failures.values()) >= 1, f"killing actor {victim} (trial {victim_trial}) failed no trial: {failures}"
    # ...from its checkpoint: its next generation continued its checkpointed organism (check_lineages:
    # size and growth/prune counters), it did not start again as a fresh organism at generation 1.
    check_lineages(run.run_dir)
    computed = rows + read_csv(run.run_dir / "replayed_generations.csv")
    for trial in (t for t, n in failures.items() if n):
        later = sorted((r for r in computed if r["trial_id"] == trial and float(r["finished_at"]) > killed_at),
                       key=lambda r: float(r["finished_at"]))
        assert later, f"trial {trial} computed nothing after its actor {victim} was killed"
        assert int(later[0]["generation"]) > 1 and int(later[0]["actor_pid"]) != victim, later[0]
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

def mark_python_exit(self, path):  # runs in the actor: Python's exit path writes the file
    import atexit
    atexit.register(lambda: open(path, "w").write("python exited"))
    return os.getpid()

ray.init(num_cpus=1, include_dashboard=False, _node_ip_address="127.0.0.1", _temp_dir=sys.argv[1],
         log_to_driver=False)
actor = ray.remote(num_cpus=0)(OrganismTrainable).remote(config={"run": run_config.build({}).to_dict(),
                                                                   "trial_index": 0})
marker = os.path.join(sys.argv[1], "python-exited")
pid = ray.get(actor.__ray_call__.remote(mark_python_exit, marker))
out = {"before": catches_sigterm(pid)}
if sys.argv[2] == "stop":
    ray.get(actor.stop.remote())  # what Tune calls before it lets the actor go
out["after"] = catches_sigterm(pid)
os.kill(pid, signal.SIGTERM)  # what the raylet sends a worker that disconnects
# Until the actor is gone (the raylet, its parent, reaps it) or a zombie. A hang guard only.
deadline, out["ended"] = time.monotonic() + 60, False
while time.monotonic() < deadline and not out["ended"]:
    try:
        out["ended"] = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        out["ended"] = True
    time.sleep(0.01)
out["python_exited"] = os.path.exists(marker)
print(json.dumps(out), flush=True)
os._exit(0)  # the test stops the instance's processes
"""


def stop_actor_and_sigterm(tmp_path: Path, stop: bool) -> dict:
    """STOPPED_ACTOR in a subprocess with its own Ray instance, every process of which is killed
    afterwards (by PID)."""
    ray_dir = tempfile.mkdtemp(prefix="gsnn-ray-", dir="/tmp")
    try:
        process = subprocess.Popen([sys.executable, "-c", STOPPED_ACTOR, ray_dir, "stop" if stop else "no-stop"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   cwd=Path(__file__).resolve().parent.parent,
                                   env=dict(os.environ, HOME=str(tmp_path)), start_new_session=True)
        leader = session(process)
        stdout, stderr = process.communicate(timeout=180)
        assert process.returncode == 0, stderr[-3000:]
        return json.loads(stdout.strip().splitlines()[-1])
    finally:
        kill_ray_processes(ray_dir, [leader])
        shutil.rmtree(ray_dir, ignore_errors=True)


def test_a_stopped_organism_actor_ends_quietly_on_sigterm(tmp_path):
    """Once Tune has stopped a trial (Trainable.stop, then cleanup), the raylet's SIGTERM ends
    the actor by the signal itself: no Python code runs (its atexit hook, registered in the actor,
    writes nothing). Under Ray's own handler it raised SystemExit wherever Python was, and a
    default run's console showed "Exception ignored ... SystemExit: 1" tracebacks."""
    out = stop_actor_and_sigterm(tmp_path, stop=True)
    assert out["before"] is True  # a live actor keeps Ray's handler (a graceful SystemExit)
    assert out["after"] is False
    assert out["ended"], "the stopped actor was still running 60 s after SIGTERM"
    assert out["python_exited"] is False, "Python's exit path ran: SIGTERM was handled, not fatal"


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
