"""Learning happens: a short lifetime beats a random policy clearly, growth and pruning both
occur under the default settings, and everything stays finite. No Ray."""

import subprocess
import sys

import pytest
import torch

from envs.policies import mean_food_per_episode
from gsnn.config import OrganismConfig
from gsnn.organism import Organism
from gsnn.train import WorldConfig, evaluate, live

WORLD = WorldConfig(num_worlds=32)


@pytest.fixture(scope="module")
def random_food():
    return mean_food_per_episode(WORLD.make(seed=500, num_worlds=64), "random", seed=500)


@pytest.mark.parametrize("rule, episodes, factor", [("reinforce", 10, 3.0), ("rstdp", 12, 3.0)])
def test_short_lifetime_beats_random_policy(rule, episodes, factor, random_food):
    torch.set_num_threads(1)
    organism = Organism(OrganismConfig(learning_rule=rule, seed=1))
    before = evaluate(organism, WORLD.make(seed=500, num_worlds=64), seed=500, greedy=False)["fitness"]
    live(organism, WORLD.make(seed=1), episodes * WORLD.max_steps)
    after = evaluate(organism, WORLD.make(seed=500, num_worlds=64), seed=500, greedy=False)["fitness"]
    assert 4 < random_food < 14
    assert after > factor * random_food, (rule, before, after, random_food)
    assert after > before + 10
    # Under the default thresholds the layer both grew and pruned, and nothing went non-finite.
    assert organism.stats.grow_events > 0 and organism.stats.prune_events > 0
    assert organism.stats.nonfinite_updates_skipped == 0
    assert all(bool(torch.isfinite(p).all()) for p in organism.params.values())


def test_train_cli_prints_progress_and_writes_a_checkpoint(tmp_path):
    ckpt = tmp_path / "o.ckpt"
    out = subprocess.run(
        [sys.executable, "-m", "gsnn.train", "--episodes", "1", "--eval-every", "1", "--worlds", "4",
         "--eval-worlds", "4", "--save", str(ckpt)],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "references: random" in out.stdout and "ep    1" in out.stdout and "final eval" in out.stdout
    assert Organism.from_checkpoint(ckpt).stats.decision_steps == 500


def test_train_cli_rejects_bad_settings_in_one_line():
    out = subprocess.run(
        [sys.executable, "-m", "gsnn.train", "--set", "prune_threshold=-1"],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "error: prune_threshold: must be a number in [0.0, 1.0], got -1"
    ]
