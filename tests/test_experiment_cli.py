"""`python -m population.experiment` on bad input: one line on stderr naming the field and what is
allowed, exit status 2, no traceback, nothing created under --results or --workdir (or the
default runs/ folder), and no Ray started. Every case runs the real command in a subprocess with
a private HOME and its own Ray temp root (RAY_TMPDIR), and a guard: an unparsable
RAY_JOB_CONFIG_JSON_ENV_VAR makes ``ray.init`` fail at once, before it starts anything, should a
check that belongs before Ray be missing (as in tests/test_cli.py for population.run)."""

import shutil
import tempfile
from pathlib import Path

import pytest
from test_cli import guarded_cli, tree, write

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cli(tmp_path):
    """Runs population.experiment's CLI in tmp_path with a private HOME (test_cli.guarded_cli:
    afterwards no Ray session or process of its own Ray temp root)."""
    home = tempfile.mkdtemp(prefix="gsnn-xcli-home-", dir="/tmp")
    try:
        with guarded_cli("population.experiment", tmp_path, "gsnn-xcli-", HOME=home) as run:
            run.home = home
            yield run
    finally:
        shutil.rmtree(home, ignore_errors=True)


def assert_one_line(result, expected: str, status: int = 2):
    code, stdout, lines = result
    assert code == status, (code, stdout, lines)
    assert len(lines) == 1 and lines[0].startswith(f"error: {expected}"), lines
    assert "Traceback" not in "\n".join(lines) + stdout


OUT = ["--results", "{tmp}/r", "--workdir", "{tmp}/w"]
ONE = ["--arms", "fixed_start"]  # an arm that would otherwise start at once
SMALL = ["--set", "experiment.episodes=1", "--set", "experiment.eval_every=1"]
CASES = {
    # argparse's errors were its usage block and a line (9 lines).
    "flag-type-one-line": (["--seeds", "abc", *OUT], "argument --seeds: invalid int value: 'abc' (see --help)"),
    "unknown-flag-one-line": (["--bogus", *OUT], "unrecognized arguments: --bogus (see --help)"),
    # Empty values: --config "" ran the default file, --results "" wrote into the working folder,
    # --workdir "" took the default (each then started Ray).
    "config-empty": (["--config", "", *OUT], "--config: must not be empty"),
    "results-empty": (["--results", "", "--workdir", "{tmp}/w"], "--results: must not be empty"),
    "workdir-empty": (["--results", "{tmp}/r", "--workdir", ""], "--workdir: must not be empty"),
    "address-empty": (["--address", "", *OUT], "--address: must not be empty"),
    "temp-dir-empty": (["--ray-temp-dir", "", *OUT], "--ray-temp-dir: must not be empty"),
    # Output folders: a --results under a file failed only when the results were written, after
    # the whole experiment; a --workdir that is (or lies under) a file was a traceback.
    "results-under-a-file": (["--results", "{tmp}/afile/r", "--workdir", "{tmp}/w"],
                             "--results: cannot create {tmp}/afile/r: {tmp}/afile is not a folder"),
    "workdir-a-file": (["--results", "{tmp}/r", "--workdir", "{tmp}/afile"],
                       "--workdir: {tmp}/afile exists and is not a folder"),
    "workdir-under-a-file": (["--results", "{tmp}/r", "--workdir", "{tmp}/afile/w"],
                             "--workdir: cannot create {tmp}/afile/w: {tmp}/afile is not a folder"),
    # Budget names that YAML reads as numbers were a TypeError (sorting them for the message).
    "budget-names-mixed": (["--config", "{tmp}/budgets.yaml", "--budget", "x", *OUT],
                           "--budget: must be one of 1, default, got 'x'"),
    # Accepted, then wrong in the results: a learning curve with no point before the end.
    "eval-every-beyond-episodes": (["--set", "experiment.eval_every=100", *OUT],
                                   "experiment.eval_every: must be at most experiment.episodes (60), got 100"),
    # Each organism's seed is its seed number: organism.seed was silently overwritten (and, with
    # the PBT arm, refused in population.run's words: population.seed, --seed).
    "organism-seed": (["--set", "organism.seed=3", *ONE, *OUT], "organism.seed: not settable; each organism's "
                      "seed is its seed number (0 .. experiment.seeds - 1"),
    "arm-seed": (["--set", "arms.fixed_start.seed=3", *ONE, *OUT], "arms.fixed_start.seed: not settable"),
    # The world's shape: every Ray worker failed ("observation has 450 values per world, expected 10").
    "organism-inputs": (["--set", "organism.n_inputs=10", *ONE, *OUT],
                        "organism.n_inputs: must be 450 (the world's 2 x 15 x 15 observation values), got 10"),
    "arm-actions": (["--set", "arms.fixed_start.n_actions=5", *ONE, *OUT],
                    "arms.fixed_start.n_actions: must be 4 (the world's actions), got 5"),
    # pbt.mutations was checked only with the PBT arm, and its errors read "pbt: pbt.mutations...".
    "mutations-without-the-pbt-arm": (["--set", "pbt.mutations.colour={choice: [1]}", *ONE, *OUT],
                                      "pbt.mutations.colour: not a setting PBT can mutate"),
    "mutations-impossible-range": (["--set", "pbt.mutations.init_hidden={choice: [32, 1024]}", *OUT],
                                   "pbt.mutations.init_hidden: value 1024 makes an invalid organism (init_hidden: "
                                   "must lie in [min_hidden, max_hidden] = [32, 512], got 1024)"),
    # PPO would learn for a whole batch, more env steps than any organism.
    "ppo-batch-beyond-the-budget": (["--arms", "ppo", *SMALL, "--set", "ppo.train_batch=10000", *OUT],
                                    "ppo.train_batch: must be at most the env steps per organism (8,000 = "
                                    "experiment.episodes x 500 x experiment.worlds), got 10000"),
    # A path with ~ that the shell left alone (--config=~/...) was looked for literally.
    "config-under-home": (["--config=~/bad.yaml", *OUT], "experiment.colour: unknown setting"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_before_ray(cli, tmp_path, case):
    write(tmp_path / "afile", "")
    write(tmp_path / "budgets.yaml", "budgets: {1: {}, default: {}}\n")
    write(Path(cli.home) / "bad.yaml", "experiment: {colour: red}\nbudgets: {default: {}}\n")
    before = tree(tmp_path)
    args, expected = CASES[case]
    tmp = str(tmp_path)
    assert_one_line(cli(*(a.replace("{tmp}", tmp) for a in args)), expected.replace("{tmp}", tmp))
    assert tree(tmp_path) == before  # nothing made (no results, work or runs/ folder), nothing changed


def test_a_failed_ray_start_is_one_line_and_leaves_no_folder(cli, tmp_path):
    """Past every check, ray.init fails at once (the guard): one line, exit 1, and neither the work
    folder (it was made before Ray) nor the default runs/ folder nor the results exist, so the
    same command can run again."""
    for args in (["--arms", "fixed_start,grow_prune_pbt", *OUT], ["--arms", "fixed_start", "--results", "{tmp}/r"]):
        code, stdout, lines = cli("--budget", "smoke", *(a.replace("{tmp}", str(tmp_path)) for a in args))
        assert code == 1, (stdout, lines)
        assert len(lines) == 1 and lines[0].startswith("error: Ray did not start (the local instance): "), lines
        assert "Traceback" not in stdout + "\n".join(lines)
        assert list(tmp_path.iterdir()) == [], list(tmp_path.iterdir())
