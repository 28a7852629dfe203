"""`python -m population.run` on bad input: one line on stderr naming the field and what is
allowed, exit status 2, no traceback, nothing created, and no Ray started. Every case runs the
real command in a subprocess (the private HOME of conftest.py) and stops before Ray.

Each subprocess gets its own Ray temp root (RAY_TMPDIR) so that the test can see that no Ray
process started (no session under it, no process naming it), and a guard: an unparsable
RAY_JOB_CONFIG_JSON_ENV_VAR makes ``ray.init`` fail at once, before it starts anything, should a
check that belongs before Ray be missing."""

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def processes_naming(marker: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            pids.append(int(entry))
    return pids


@contextlib.contextmanager
def guarded_cli(module: str, tmp_path, prefix: str, **extra_env):
    """A runner of ``python -m module ARGS`` in tmp_path returning (exit status, stdout, stderr
    lines), with its own Ray temp root and the guard above. On leaving: no Ray session under that
    root and no process naming it (any found is killed by PID, then it fails)."""
    ray_root = tempfile.mkdtemp(prefix=prefix, dir="/tmp")

    def run(*args, env=None):
        environment = dict(os.environ)
        environment.pop("RAY_ADDRESS", None)
        environment.update(RAY_TMPDIR=ray_root, RAY_JOB_CONFIG_JSON_ENV_VAR="{not json: a guard}",
                           PYTHONPATH=str(ROOT), **extra_env, **(env or {}))
        out = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                             timeout=120, cwd=tmp_path, env=environment, start_new_session=True)
        return out.returncode, out.stdout, out.stderr.strip().splitlines()

    try:
        yield run
    finally:
        left = processes_naming(ray_root)
        for pid in left:
            try:
                os.kill(pid, 9)
            except OSError:
                pass
        sessions = list(Path(ray_root).rglob("session_*"))
        shutil.rmtree(ray_root, ignore_errors=True)
        assert not left and not sessions, f"Ray started: processes {left}, sessions {sessions}"


@pytest.fixture
def cli(tmp_path):
    """Runs population.run's CLI (see guarded_cli)."""
    with guarded_cli("population.run", tmp_path, "gsnn-cli-") as run:
        yield run


def assert_one_line(result, expected: str, status: int = 2):
    code, stdout, lines = result
    assert code == status, (code, stdout, lines)
    assert len(lines) == 1 and lines[0].startswith(f"error: {expected}"), lines
    assert "Traceback" not in "\n".join(lines) + stdout
    assert "run directory" not in stdout, stdout


def tree(path: Path) -> dict:
    return {p: (p.read_bytes() if p.is_file() else None) for p in path.rglob("*")}


def write(path: Path, content) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def run_dir(tmp: Path, name: str, saved, started: bool = True) -> Path:
    """A run directory: run_config.json (bytes, or a mapping as JSON), and tune/tuner.pkl when the
    run had started (Tune writes it when the Tuner is made)."""
    write(tmp / name / "run_config.json", saved if isinstance(saved, bytes) else json.dumps(saved))
    (tmp / name / "tune").mkdir()
    if started:
        write(tmp / name / "tune" / "tuner.pkl", b"")
    return tmp / name


# Some cases end at a later check than the one they are about (the file given as --output): they
# show that the earlier one let the input through.
A_FILE = ["--output", "{tmp}/afile"]
# Were an empty value ignored, the run would stop at this relative --ray-temp-dir (old code: in ray.init).
GUARD = ["--ray-temp-dir", "reltmp"]
EXTENT = "must be auto, local, HOST:PORT or ray://HOST:PORT"
NOT_LOOPBACK = "ray.dashboard_host: 0.0.0.0 is not a loopback address, but ray.loopback_only is true"
CASES = {
    # A start that failed in ray.init had already made the run directory (a dead end).
    "address-not-an-address": (["--address", "foo", "--output", "{tmp}/run"], f"--address: {EXTENT}, got 'foo'"),
    "address-port-out-of-range": (["--address", "host:99999"], f"--address: {EXTENT}, got 'host:99999'"),
    "address-other-protocol": (["--address", "http://host:1"], f"--address: {EXTENT}, got 'http://host:1'"),
    "temp-dir-relative": (["--ray-temp-dir", "reltmp", "--output", "{tmp}/run"],
                          "--ray-temp-dir: must be an absolute path, got 'reltmp'"),
    "temp-dir-too-long": (["--ray-temp-dir", "/tmp/" + "x" * 60], "--ray-temp-dir: must be at most 43 bytes long"),
    # Empty values were taken as absent (--resume "" started a new default run).
    "resume-empty": (["--resume", "", *GUARD], "--resume: must not be empty"),
    "config-empty": (["--config", "", *GUARD], "--config: must not be empty"),
    "output-empty": (["--output", "", *GUARD], "--output: must not be empty"),
    "address-empty": (["--address", "", *GUARD], "--address: must not be empty"),
    "temp-dir-empty": (["--ray-temp-dir", ""], "--ray-temp-dir: must not be empty"),
    # Sections that are not mappings.
    "section-a-list": (["--config", "{tmp}/list.yaml"], "population: must be a mapping of settings"),
    "section-a-number": (["--config", "{tmp}/int.yaml"], "population: must be a mapping of settings"),
    "pbt-a-list": (["--config", "{tmp}/pbt.yaml"], "pbt: must be a mapping of settings"),
    # The dashboard's host.
    "dashboard-host-null": (["--set", "ray.dashboard_host="], "ray.dashboard_host: must be a host address such as "
                                                              "127.0.0.1, got None"),
    "dashboard-host-number": (["--set", "ray.dashboard_host=5"], "ray.dashboard_host: must be a host address"),
    "dashboard-host-unresolvable": (["--set", "ray.dashboard_host=999.1.1.1"],
                                    "ray.dashboard_host: '999.1.1.1' is not a resolvable host address"),
    "dashboard-host-beyond-loopback": (["--set", "ray.dashboard_host=0.0.0.0"], NOT_LOOPBACK),
    # --address local is the embedded local start: its loopback rules and checks apply.
    "address-local-checked": (["--address", "local", "--set", "ray.dashboard_host=0.0.0.0"], NOT_LOOPBACK),
    # Each mutation alone is valid; PBT could give an organism init_hidden 128 with max_hidden 64.
    "mutations-together": (["--set", "pbt.mutations.init_hidden={choice: [32, 128]}",
                            "--set", "pbt.mutations.max_hidden={choice: [64, 512]}"],
                           "pbt.mutations.init_hidden: value 128 with max_hidden=64 makes an invalid organism "
                           "(init_hidden: must lie in [min_hidden, max_hidden] = [32, 64], got 128)"),
    "mutations-range-bounds": (["--set", "pbt.mutations.min_hidden={choice: [16, 64]}",
                                "--set", "pbt.mutations.init_hidden={choice: [32, 128]}"],
                               "pbt.mutations.init_hidden: value 32 with min_hidden=64 makes an invalid organism"),
    # Files that cannot be read as what they should be.
    "resume-json-damaged": (["--resume", "{tmp}/damaged"], "--resume: {tmp}/damaged/run_config.json is not valid JSON"),
    "resume-json-binary": (["--resume", "{tmp}/binary"], "--resume: {tmp}/binary/run_config.json is not valid JSON"),
    "config-not-utf8": (["--config", "{tmp}/binary.yaml"], "--config: {tmp}/binary.yaml is not UTF-8 text"),
    "output-a-file": (A_FILE, "--output: {tmp}/afile exists and is not a directory"),
    "output-under-a-file": (["--output", "{tmp}/afile/sub"], "--output: cannot create {tmp}/afile/sub: {tmp}/afile is "
                                                              "not a directory"),
    # An empty section takes --set overrides.
    "empty-section-takes-set": (["--config", "{tmp}/empty.yaml", "--set", "resources.torch_threads=2",
                                 "--set", "pbt.mutations.learning_rate={log_uniform: [0.001, 0.01]}", *A_FILE],
                                "--output: {tmp}/afile exists"),
    # auto, the README's default, is a value of the resource flags (a resumed run can go back to it).
    "share-auto": (["--cpus-per-organism", "auto", "--gpus-per-organism", "auto", *A_FILE],
                   "--output: {tmp}/afile exists"),
    "share-neither": (["--cpus-per-organism", "some"], "argument --cpus-per-organism: must be auto or a number, "
                                                        "got 'some' (see --help)"),
    "flag-type-one-line": (["--pop", "x"], "argument --pop: invalid int value: 'x' (see --help)"),
    # Each organism's seed comes from the run's: organism.seed was silently overwritten.
    "organism-seed": (["--set", "organism.seed=3", *A_FILE],
                      "organism.seed: not settable; each organism's seed comes from the run's seed "
                      "(population.seed, or --seed)"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_before_ray(cli, tmp_path, case):
    write(tmp_path / "afile", "")
    write(tmp_path / "list.yaml", "population: [1, 2]\n")
    write(tmp_path / "int.yaml", "population: 5\n")
    write(tmp_path / "pbt.yaml", "pbt: [1]\n")
    write(tmp_path / "binary.yaml", b"\xff\xfe\x00bad")
    write(tmp_path / "empty.yaml", "resources:\npbt:\n  mutations:\n")
    run_dir(tmp_path, "damaged", b"{not")
    run_dir(tmp_path, "binary", b"\xff\xfe{}")
    before = tree(tmp_path)
    args, expected = CASES[case]
    assert_one_line(cli(*(a.replace("{tmp}", str(tmp_path)) for a in args)), expected.replace("{tmp}", str(tmp_path)))
    assert tree(tmp_path) == before  # nothing made, nothing changed


def test_a_run_directory_that_never_started_is_not_a_run(cli, tmp_path):
    """run_config.json without tune/tuner.pkl (the run never reached Tune): --output may name the
    directory again (it stops at a later check here); a directory whose run started is refused."""
    never = run_dir(tmp_path, "never", {"population": {"size": 2}}, started=False)
    assert_one_line(cli("--output", str(never), "--set", "ray.dashboard_host=0.0.0.0"), NOT_LOOPBACK)
    write(never / "tune" / "tuner.pkl", b"")
    assert_one_line(cli("--output", str(never)), f"--output: {never} already holds a run; use --resume {never}")


def test_resume_starts_a_run_directory_that_never_started(cli, tmp_path):
    """--resume on it starts the run as its run_config.json says (which here stops at the
    local instance's checks: that config's dashboard host is not a loopback address)."""
    saved = {"population": {"size": 2}, "ray": {"dashboard_host": "0.0.0.0"}}
    never = run_dir(tmp_path, "never", saved, started=False)
    assert_one_line(cli("--resume", str(never)), NOT_LOOPBACK)
    assert json.loads((never / "run_config.json").read_text()) == saved


def test_the_embedded_start_ignores_ray_address_and_a_failed_start_leaves_nothing(cli, tmp_path):
    """Without --address the run starts its own instance whatever RAY_ADDRESS says, and says so.
    Here ray.init fails at once (the guard in the environment): one line, exit 1, and no run
    directory, so the same --output can be used again."""
    out = tmp_path / "run"
    ports = []
    for _ in range(2):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            ports.append(probe.getsockname()[1])
    code, stdout, lines = cli("--pop", "2", "--output", str(out), "--set", f"ray.dashboard_port={ports[0]}",
                              "--set", f"ray.metrics_export_port={ports[1]}", env={"RAY_ADDRESS": "127.0.0.1:1"})
    assert code == 1, (stdout, lines)
    assert "RAY_ADDRESS=127.0.0.1:1 is ignored" in stdout and "--address auto" in stdout, stdout
    assert len(lines) == 1 and lines[0].startswith("error: Ray did not start (the local instance): "), lines
    assert "Traceback" not in stdout + "\n".join(lines)
    assert not out.exists()


@pytest.mark.parametrize("module", ["population.run", "population.experiment"])
def test_a_config_error_comes_before_torch_is_imported(module, tmp_path):
    """Validation needs no torch (about a second to import): `envs` loads its worlds on first use.
    The real command (guarded_cli), with Python's import log (PYTHONPROFILEIMPORTTIME) on stderr."""
    text = "population: {size: -1}\n" if module == "population.run" else "nonsense_section: {}\n"
    bad = write(tmp_path / "bad.yaml", text)
    with guarded_cli(module, tmp_path, "gsnn-cli-", PYTHONPROFILEIMPORTTIME="1") as run:
        code, stdout, lines = run("--config", str(bad))
    imported = [line.rsplit("|", 1)[1].strip() for line in lines if line.startswith("import time:")]
    errors = [line for line in lines if not line.startswith("import time:")]
    assert code == 2 and len(errors) == 1 and errors[0].startswith("error: "), (code, stdout, errors)
    assert "yaml" in imported, "no import log"  # the log is there, so torch's absence means something
    assert "torch" not in imported, "torch was imported before the config error"
