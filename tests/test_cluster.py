"""Beyond one machine: the cluster files pass the checks `ray up` makes before it contacts anything,
the images keep their pinned torch build, and a population survives losing a node of a
multi-node Ray cluster (``ray.cluster_utils.Cluster``: a head and two worker nodes on this machine).

The node-loss cluster lives in its own process (this file run as a script, see ``serve_cluster``)
with its own HOME, Ray temp dir and token, so nothing of it leaks into this pytest process or
into other Ray instances on the machine; every process it leaves is killed by PID at the end."""

import copy
import csv
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from test_population import TINY, assert_complete, cmdline, descendants, free_port, kill_ray_processes, session

ROOT = Path(__file__).resolve().parent.parent
CLUSTER_FILES = sorted((ROOT / "cluster").glob("*.yaml"))
POP, GENERATIONS = 4, 4


# --- Cluster files ------------------------------------------------------------------------------

def ray_up_checks(config: dict) -> dict:
    """What `ray up` runs on a cluster file before it contacts a node or a cloud
    (``ray.autoscaler._private.commands.create_or_update_cluster`` up to ``_bootstrap_config``):
    the provider must be one Ray knows, the file is merged with that provider's defaults
    (``prepare_config``: node types, docker, worker counts) and checked against Ray's cluster
    schema and consistency rules (``validate_config``). Returns the prepared config. What is left
    out needs the provider itself: cloud APIs and credentials, SSH to the hosts."""
    from ray.autoscaler._private.providers import _NODE_PROVIDERS
    from ray.autoscaler._private.util import prepare_config, validate_config

    provider = config["provider"]["type"]
    assert _NODE_PROVIDERS.get(provider), f"unknown provider type {provider!r}"
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_there_is_a_cloud_and_an_on_premises_cluster_file():
    providers = {path.name: load(path)["provider"]["type"] for path in CLUSTER_FILES}
    assert providers.get("rocm.yaml") not in (None, "local")
    assert providers.get("local.yaml") == "local"


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_cluster_file_passes_ray_up_checks(path):
    prepared = ray_up_checks(load(path))
    assert prepared["head_node_type"] in prepared["available_node_types"]


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
@pytest.mark.parametrize("where, good, typo", [
    ((), "head_start_ray_commands", "head_start_ray_comands"),
    (("docker",), "run_options", "run_option"),
    ((), "file_mounts", "file_mount"),
])
def test_a_misspelled_key_fails_ray_up_checks(path, where, good, typo):
    """The check bites: the same file with one key misspelled is refused."""
    import jsonschema

    config = load(path)
    section = config
    for key in where:
        section = section[key]
    section[typo] = section.pop(good)
    with pytest.raises(jsonschema.ValidationError, match=typo):
        ray_up_checks(config)


def shell_commands(line: str) -> list[list[str]]:
    """The simple commands of a shell line, split at ; && || (quotes respected), as word lists."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    commands = [[]]
    for word in lexer:
        if word in (";", "&&", "||"):
            commands.append([])
        else:
            commands[-1].append(word)
    return [c for c in commands if c]


def ray_start_arguments(lines: list[str]) -> list[list[str]]:
    """The arguments of every `ray start` in a list of shell command lines."""
    return [words[2:] for line in lines for words in shell_commands(line) if words[:2] == ["ray", "start"]]


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_ray_start_commands_parse_with_ray_start_itself(path):
    """Ray's schema takes commands as free text; `ray start`'s own parser rejects an unknown flag
    or a bad value. The head serves the dashboard on loopback and metrics on the project's port."""
    import click
    from ray.scripts.scripts import start

    config = load(path)
    metrics_port = load(ROOT / "tune_configs" / "default.yaml")["ray"]["metrics_export_port"]
    head = ray_start_arguments(config["head_start_ray_commands"])
    workers = ray_start_arguments(config["worker_start_ray_commands"])
    assert len(head) == 1 and len(workers) == 1
    for arguments in head + workers:
        context = start.make_context("ray start", list(arguments))  # raises click.UsageError if wrong
        assert context.params["metrics_export_port"] == metrics_port
    head_params = start.make_context("ray start", list(head[0])).params
    assert head_params["head"] and head_params["dashboard_host"] == "127.0.0.1"
    assert head_params["autoscaling_config"] == "~/ray_bootstrap_config.yaml"
    with pytest.raises(click.UsageError):
        start.make_context("ray start", [*head[0], "--dashbord-host=127.0.0.1"])


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_cluster_nodes_get_gpus_token_auth_and_shared_storage(path):
    """Every node's container: the GPUs passed in, Ray's token auth on with the token copied to
    it, and the shared run directory mounted."""
    config = load(path)
    docker = config["docker"]
    assert "rocm" in docker["image"]
    options = docker["run_options"]
    for needed in ("--device=/dev/kfd", "--device=/dev/dri", "--group-add=video",
                   "--env=RAY_AUTH_MODE=token", "--volume=/mnt/shared:/mnt/shared"):
        assert needed in options, needed
    assert config["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}
    text = path.read_text()
    assert "RAY_AUTH_MODE=disabled" not in text and "ROCR_VISIBLE_DEVICES" not in text


# --- Images -------------------------------------------------------------------------------------

def pip_installs(dockerfile: Path) -> list[list[str]]:
    """The argument lists of every `pip install` in the RUN instructions of a Dockerfile."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    installs = []
    for line in text.splitlines():
        if line.startswith("RUN "):
            for words in shell_commands(line[4:]):
                for k in range(len(words) - 1):
                    if words[k:k + 2] == ["pip", "install"]:
                        installs.append(words[k + 2:])
    return installs


def named_packages(arguments: list[str]) -> list[str]:
    """Requirement words of a pip argument list (what follows -r/-c/--index-url is a file or URL)."""
    takes_value = {"-r", "-c", "--index-url", "--extra-index-url", "-e", "--editable"}
    out, skip = [], False
    for word in arguments:
        if skip:
            skip = False
        elif word in takes_value:
            skip = True
        elif not word.startswith("-"):
            out.append(word)
    return out


def test_requirements_name_no_torch():
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    names = [re.split(r"[<>=\[ ;]", line.strip())[0].lower() for line in lines
             if line.strip() and not line.startswith("#")]
    assert names and not {"torch", "torchvision", "torchaudio"} & set(names)


def test_rocm_image_never_replaces_the_base_torch():
    dockerfile = ROOT / "docker" / "Dockerfile.rocm"
    assert re.search(r"^ARG BASE_IMAGE=rocm/pytorch:\S+$", dockerfile.read_text(), re.MULTILINE)
    installs = pip_installs(dockerfile)
    assert installs
    for arguments in installs:
        packages = named_packages(arguments)
        assert not any(re.match(r"torch(vision|audio)?\b", p) for p in packages), arguments
        # Anything installed with its dependencies is held to the base's torch build.
        assert "--no-deps" in arguments or "/opt/keep-rocm-torch.txt" in arguments, arguments
    assert not re.search(r"^ENV\b.*ROCR_VISIBLE_DEVICES", dockerfile.read_text(), re.MULTILINE)


def test_cpu_image_installs_the_makefiles_torch_pin():
    dockerfile = ROOT / "docker" / "Dockerfile.cpu"
    pin = re.search(r"^TORCH_SPEC \?= (\S+)$", (ROOT / "Makefile").read_text(), re.MULTILINE).group(1)
    installs = pip_installs(dockerfile)
    torch_installs = [a for a in installs if any(p.startswith("torch") for p in named_packages(a))]
    assert [named_packages(a) for a in torch_installs] == [[pin]]
    assert "https://download.pytorch.org/whl/cpu" in torch_installs[0]
    for arguments in installs:
        if arguments is not torch_installs[0]:
            assert "--no-deps" in arguments or "/opt/keep-cpu-torch.txt" in arguments, arguments
    assert f'echo "{pin}" > /opt/keep-cpu-torch.txt' in dockerfile.read_text()


# --- Losing a node mid-run ----------------------------------------------------------------------

def snapshot(pids) -> dict[int, str]:
    """PID -> command line, to kill later only processes that are still the same ones."""
    return {pid: cmdline(pid) for pid in pids if cmdline(pid)}


def kill(processes: dict[int, str]) -> None:
    for pid, command in processes.items():
        if cmdline(pid) == command:  # the same process still: its PID was not freed and reused
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


REPLY = "serve_cluster: "  # marks the cluster process's answers among whatever Ray prints


def serve_cluster() -> None:
    """The node-loss test's cluster, run as ``python tests/test_cluster.py serve`` in the
    environment the test gives it (HOME with the token, RAY_TMPDIR, RAY_AUTH_MODE=token): a head
    with no CPUs (it coordinates; organisms go to the workers) and two worker nodes of 2 CPUs
    and 1 GPU each (logical GPUs: Ray schedules them, torch here has none, as on a GPU node whose
    torch is a CPU build). Its first answer (a ``REPLY`` line) gives the address. Then it obeys
    lines on stdin:
    ``crash`` crashes the worker node that runs the most organism actors at that moment (SIGKILL
    to its raylet and to every process the raylet started, as when a machine vanishes) and
    answers with the organism actors it killed; ``shutdown``, or the end of input, shuts the
    cluster down."""
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    # Ray's temp dir is $RAY_TMPDIR/ray. The head's agent port is fixed by default (52365): take a
    # free one, as the workers do; every other port is chosen free by Ray.
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": False, "dashboard_agent_listen_port": free_port(),
    })
    workers = [cluster.add_node(num_cpus=2, num_gpus=1) for _ in range(2)]

    def raylet_pid(node) -> int:
        return node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid

    print(REPLY + json.dumps({"address": cluster.address}), flush=True)
    try:
        for line in sys.stdin:
            if line.strip() == "crash":
                doomed = [snapshot(descendants(raylet_pid(node))) for node in workers]
                victim = max(range(len(workers)), key=lambda k: len(organisms(doomed[k])))
                cluster.remove_node(workers.pop(victim), allow_graceful=False)
                kill(doomed[victim])
                print(REPLY + json.dumps({"organisms_killed": organisms(doomed[victim])}), flush=True)
            elif line.strip() == "shutdown":
                break
    finally:
        cluster.shutdown()


def reply(server: subprocess.Popen) -> dict:
    """The cluster process's next answer."""
    for line in server.stdout:
        if line.startswith(REPLY):
            return json.loads(line[len(REPLY):])
    raise AssertionError(f"the cluster process ended (exit {server.wait()})")


def organisms(processes: dict[int, str]) -> list[int]:
    """The organisms' actors among processes (Ray names an actor's process after its class)."""
    return sorted(pid for pid, command in processes.items() if "Trainable" in command)


def read_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "generations.csv"
    if not path.exists():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


CONNECT = "import sys, ray; ray.init(address=sys.argv[1])"
# The cluster's GPUs and the most of them its actors have held at once, a line each time that
# grows, polled until they hold all of them.
GPUS_HELD = CONNECT + """
import time
total, held = ray.cluster_resources().get("GPU", 0), -1.0
while held < total:
    now = total - ray.available_resources().get("GPU", 0)
    if now > held:
        held = now
        print("GPU", total, held, flush=True)
    time.sleep(0.2)
"""


def test_population_survives_losing_a_worker_node(tmp_path):
    # A short path: Ray's unix sockets live under it.
    ray_dir = tempfile.mkdtemp(prefix="gsnn-ray-", dir="/tmp")
    home = tmp_path / "home"
    home.mkdir()
    # TMPDIR too: the organisms' compute-slot lock files (population.slots) go there, and go with it.
    env = dict(os.environ, HOME=str(home), RAY_TMPDIR=ray_dir, TMPDIR=ray_dir, RAY_AUTH_MODE="token")
    # The cluster's token, where Ray looks for it (HOME/.ray/auth_token), as on a real cluster.
    subprocess.run([str(Path(sys.executable).parent / "ray"), "get-auth-token", "--generate"],
                   env=env, check=True, capture_output=True, timeout=60)
    run_dir = tmp_path / "run"
    log_path = tmp_path / "driver.log"
    server = driver = intruder = gpus = None
    sessions = []  # every command here leads a session of its own (test_population.ray_processes)
    try:
        server = subprocess.Popen([sys.executable, __file__, "serve"], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                                  start_new_session=True)
        sessions.append(session(server))
        cluster = reply(server)
        with open(log_path, "w") as log:
            driver = subprocess.Popen(
                [sys.executable, "-m", "population.run", "--address", cluster["address"],
                 "--pop", str(POP), "--generations", str(GENERATIONS), "--output", str(run_dir), *TINY],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
            sessions.append(session(driver))
        gpus = subprocess.Popen([sys.executable, "-c", GPUS_HELD, cluster["address"]], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
        sessions.append(session(gpus))

        # Once results arrive, crash the worker node that holds the most organism actors.
        deadline = time.time() + 150
        while not (rows_before := read_rows(run_dir)):
            assert driver.poll() is None, log_path.read_text()
            assert time.time() < deadline, "no generation finished in time\n" + log_path.read_text()
            time.sleep(0.5)
        server.stdin.write("crash\n")
        server.stdin.flush()
        assert reply(server)["organisms_killed"], "the crashed node ran no organism"
        assert len(rows_before) < POP * GENERATIONS, "the run ended before the node was lost"

        # Meanwhile: the cluster keeps Ray's token authentication, so a driver with another token
        # is refused (after about 20 s of retries, hence alongside the run).
        intruder = subprocess.Popen([sys.executable, "-c", CONNECT, cluster["address"]],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    env=dict(env, RAY_AUTH_TOKEN="0" * 32), start_new_session=True)
        sessions.append(session(intruder))

        code = driver.wait(timeout=240)
        assert code == 0, log_path.read_text()
        # The four organisms held the cluster's 2 GPUs, all of it at once: 0.5 each.
        if gpus.poll() is None:
            gpus.kill()
        out, _ = gpus.communicate(timeout=60)
        held = [line.split()[1:] for line in out.splitlines() if line.startswith("GPU ")]
        assert held and [float(x) for x in held[-1]] == [2.0, 2.0], out
        out, _ = intruder.communicate(timeout=120)
        assert intruder.returncode != 0 and "InvalidAuthToken" in out, out
    finally:
        if server is not None and server.poll() is None:
            try:
                server.stdin.write("shutdown\n")
                server.stdin.flush()
                server.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                pass
        # Whatever is left of the cluster and the commands: found by PID, through the temp dir
        # every process of it names (RAY_TMPDIR, TMPDIR, open files) or their sessions.
        kill_ray_processes(ray_dir, sessions)
        for process in (server, driver, intruder, gpus):
            if process is not None:
                process.wait(timeout=30)
        shutil.rmtree(ray_dir, ignore_errors=True)

    # Every organism completed every generation, each (organism, generation) exactly once.
    rows = read_rows(run_dir)
    assert len(rows) == POP * GENERATIONS
    # The GPU share was the cluster's GPUs divided by the population; with no GPU torch can use,
    # the organisms ran on the CPU with no change of command.
    assert "resources per organism: 1 CPU, 0.5 GPU (cluster: 4 CPU, 2 GPU)" in log_path.read_text()
    assert {row["device"] for row in rows} == {"cpu"}
    assert_complete(rows, pop=POP, generations=GENERATIONS)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [g["generation"] for g in summary["generations"]] == list(range(1, GENERATIONS + 1))
    assert all(g["organisms"] == POP for g in summary["generations"])
    assert summary["errors"] == []
    # ...and that is thanks to restarts: Tune's saved state counts the trials' failures.
    state = json.loads(max((run_dir / "tune").glob("experiment_state-*.json")).read_text())
    assert sum(json.loads(entry[1])["num_failures"] for entry in state["trial_data"]) >= 1


if __name__ == "__main__" and sys.argv[1:] == ["serve"]:
    serve_cluster()
