"""Growth, pruning, checkpoints, reproducibility and NaN guards of one organism (no Ray)."""

import copy

import pytest
import torch

from envs import BatchedForagingGrid
from gsnn import checkpoint
from gsnn.config import ConfigError, OrganismConfig
from gsnn.neurons import lif_constants
from gsnn.organism import NEURON_AXIS, NonFiniteError, Organism
from gsnn.train import live

PER_NEURON = ("input_weight", "hidden_bias", "readout_weight")


def trained(rule="reinforce", steps=64, worlds=8, **overrides):
    """An organism that has made a few updates, so its Adam moments are not zero."""
    config = OrganismConfig(learning_rule=rule, rollout_length=8, grow_interval=10**9,
                            prune_interval=10**9, **overrides)
    organism = Organism(config)
    live(organism, BatchedForagingGrid(worlds, seed=3), steps)
    assert organism.stats.updates == steps // 8
    return organism


def neuron_tensors(organism):
    """Every per-neuron tensor, indexed as (name, neuron) -> tensor slice, on the neuron axis."""
    out = {}
    for name in PER_NEURON:
        param = organism.params[name]
        axis = NEURON_AXIS[name]
        out[name] = param.detach().clone().movedim(axis, 0)
        moments = organism.optimizer.moments(name)
        for key in ("exp_avg", "exp_avg_sq"):
            out[f"{name}.{key}"] = moments[key].clone().movedim(axis, 0)
    out["rate_ema"] = organism.rate_ema.clone()
    out["birth_step"] = organism.birth_step.clone()
    out["v"] = organism.v.clone().T
    out["i"] = organism.i.clone().T
    return out


@pytest.mark.parametrize("rule", ["reinforce", "rstdp"])
def test_growth_keeps_every_existing_neuron_exactly(rule):
    organism = trained(rule)
    before = neuron_tensors(organism)
    optimizer, steps = organism.optimizer, organism.optimizer.steps
    added = organism.grow(32)
    assert added == 32 and organism.hidden_neurons == 64 + 32
    after = neuron_tensors(organism)
    for key, old in before.items():
        assert torch.equal(after[key][:64], old), key
    for name in PER_NEURON:  # newborn Adam moments start at zero
        assert torch.count_nonzero(after[f"{name}.exp_avg"][64:]) == 0
        assert torch.count_nonzero(after[f"{name}.exp_avg_sq"][64:]) == 0
    assert organism.optimizer is optimizer  # never rebuilt: the step count carries on
    assert organism.optimizer.steps == steps > 0
    # Readout bias has no neuron axis and is untouched.
    live(organism, BatchedForagingGrid(8, seed=4), 16)  # learning continues at the new size
    assert organism.stats.updates == 10


def test_growth_stops_at_max_hidden():
    organism = Organism(OrganismConfig(init_hidden=64, max_hidden=80))
    assert organism.grow(32) == 16
    assert organism.grow(32) == 0
    assert organism.hidden_neurons == 80


def test_pruning_removes_exactly_the_silent_neurons():
    organism = trained(prune_threshold=0.01, prune_grace=0, min_hidden=8)
    organism.rate_ema = torch.full((64,), 0.05)
    silent = torch.tensor([3, 10, 11, 40, 63])
    organism.rate_ema[silent] = torch.tensor([0.0, 0.009, 0.001, 0.0099, 0.0])
    organism.rate_ema[20] = 0.01  # exactly at the threshold: not silent
    before = neuron_tensors(organism)
    mask = organism.silent_neurons()
    assert torch.equal(torch.nonzero(mask).squeeze(1), silent)
    organism.prune(mask)
    keep = torch.tensor([k for k in range(64) if k not in silent.tolist()])
    after = neuron_tensors(organism)
    assert organism.hidden_neurons == 59
    for key, old in before.items():
        assert torch.equal(after[key], old[keep]), key


def test_pruning_respects_grace_and_min_hidden():
    organism = Organism(OrganismConfig(init_hidden=40, min_hidden=32, prune_grace=100))
    organism.reset_state(2)
    organism.rate_ema.zero_()  # everyone silent
    organism.stats.decision_steps = 50
    assert not organism.silent_neurons().any()  # all still within the grace period
    organism.stats.decision_steps = 100
    organism.rate_ema[:] = torch.linspace(0.004, 0.0, 40)  # the last neurons are the quietest
    mask = organism.silent_neurons()
    assert int(mask.sum()) == 8  # never below min_hidden
    assert torch.equal(torch.nonzero(mask).squeeze(1), torch.arange(32, 40))


def test_many_grow_and_prune_cycles_track_every_survivor():
    organism = trained(steps=32, prune_grace=0, max_hidden=400)
    # Give each neuron an identity we can follow: its input-weight column is unique.
    g = torch.Generator().manual_seed(5)
    expected = neuron_tensors(organism)
    for cycle in range(6):
        n_before = organism.hidden_neurons
        organism.grow(24)
        after_grow = neuron_tensors(organism)
        for key in expected:
            assert torch.equal(after_grow[key][:n_before], expected[key]), (cycle, key)
        remove = torch.rand(organism.hidden_neurons, generator=g) < 0.3
        keep = torch.nonzero(~remove).squeeze(1)
        organism.prune(remove)
        after_prune = neuron_tensors(organism)
        for key in after_grow:
            assert torch.equal(after_prune[key], after_grow[key][keep]), (cycle, key)
        live(organism, BatchedForagingGrid(8, seed=cycle), 8)  # one more update between cycles
        expected = neuron_tensors(organism)
    assert organism.stats.grow_events == 6 and organism.stats.prune_events == 6
    assert all(torch.isfinite(p).all() for p in organism.params.values())


def test_structural_step_grows_when_quiet_and_prunes_silent():
    config = OrganismConfig(grow_interval=10, prune_interval=10, prune_grace=0, rollout_length=10)
    organism = Organism(config)
    organism.reset_state(4)
    organism.rate_ema.fill_(0.02)  # below grow_threshold 0.05, above prune_threshold
    organism.rate_ema[:5] = 0.0
    organism.stats.decision_steps = 10
    organism.structural_step()
    assert organism.stats.prune_events == 1 and organism.stats.neurons_removed == 5
    assert organism.stats.grow_events == 1 and organism.hidden_neurons == 64 - 5 + 32
    organism.rate_ema.fill_(0.2)  # busy: no growth, nothing silent
    organism.stats.decision_steps = 20
    organism.structural_step()
    assert organism.hidden_neurons == 91 and organism.stats.grow_events == 1


def test_same_seed_same_organism_and_actions():
    def run(seed):
        organism = Organism(OrganismConfig(seed=seed))
        env = BatchedForagingGrid(8, seed=1)
        live(organism, env, 48)
        obs = env.observe()
        return organism, organism.act(obs, greedy=False)

    a, actions_a = run(7)
    b, actions_b = run(7)
    c, _ = run(8)
    for name in NEURON_AXIS:
        assert torch.equal(a.params[name], b.params[name])
    assert torch.equal(actions_a, actions_b)
    assert not torch.equal(a.params["input_weight"], c.params["input_weight"])


@pytest.mark.parametrize("rule", ["reinforce", "rstdp"])
def test_checkpoint_restores_exactly_into_an_organism_of_another_size(tmp_path, rule):
    source = trained(rule, steps=48)
    source.grow(20)
    source.prune(torch.arange(source.hidden_neurons) % 7 == 0)
    path = tmp_path / "organism.ckpt"
    source.save(path)
    target = Organism(OrganismConfig(init_hidden=128, max_hidden=512, seed=99))
    target.load(path)
    assert target.hidden_neurons == source.hidden_neurons
    assert_same_state(source.state_dict(), target.state_dict())
    # Exactly the same future: actions, updates, growth, RNG.
    env_a, env_b = BatchedForagingGrid(8, seed=11), BatchedForagingGrid(8, seed=11)
    env_a.reset(seed=11), env_b.reset(seed=11)
    live(source, env_a, 32, env_a.observe())
    live(target, env_b, 32, env_b.observe())
    assert_same_state(source.state_dict(), target.state_dict())


def assert_same_state(a, b, where="state"):
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_state(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for k, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{k}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("damage", ["truncate", "flip", "magic", "empty", "missing"])
def test_corrupt_checkpoints_are_refused_and_nothing_is_loaded(tmp_path, damage):
    path = tmp_path / "organism.ckpt"
    trained(steps=16).save(path)
    blob = bytearray(path.read_bytes())
    if damage == "truncate":
        blob = blob[: len(blob) // 2]
    elif damage == "flip":
        blob[len(blob) - 100] ^= 0xFF
    elif damage == "magic":
        blob[:8] = b"NOTACKPT"
    elif damage == "empty":
        blob = bytearray()
    if damage == "missing":
        path.unlink()
    else:
        path.write_bytes(bytes(blob))
    target = Organism(OrganismConfig(init_hidden=100, max_hidden=512, seed=4))
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(checkpoint.CheckpointError):
        target.load(path)
    assert_same_state(before, target.state_dict())


def test_checkpoint_with_inconsistent_shapes_or_nan_is_refused(tmp_path):
    state = trained(steps=16).state_dict()
    bad_shape = copy.deepcopy(state)
    bad_shape["params"]["readout_weight"] = torch.zeros(10, 4)
    bad_nan = copy.deepcopy(state)
    bad_nan["params"]["hidden_bias"][0] = float("nan")
    for bad in (bad_shape, bad_nan):
        checkpoint.save(bad, tmp_path / "bad.ckpt")  # an intact file holding a bad organism
        target = Organism(OrganismConfig(init_hidden=40, seed=4))  # another size: a partial load shows
        before = copy.deepcopy(target.state_dict())
        with pytest.raises(checkpoint.CheckpointError, match="checkpoint refused"):
            target.load(tmp_path / "bad.ckpt")
        assert_same_state(before, target.state_dict())


@pytest.fixture(scope="module")
def good_state():
    """A checkpoint state with every part filled in: Adam moments, LIF state, grow and prune events."""
    organism = trained(steps=32, worlds=4, init_hidden=40, min_hidden=8, max_hidden=128)
    organism.grow(8)
    organism.prune(torch.arange(organism.hidden_neurons) % 5 == 0)
    return organism.state_dict()


def _set(path, value):
    """A mutation of a state: the entry at ``path`` becomes ``value`` (or ``value(old)``)."""
    def mutate(state):
        node = state
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value(node[path[-1]]) if callable(value) else value
    return mutate


def _drop(path):
    def mutate(state):
        node = state
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
    return mutate


BAD_STATES = {
    "unknown part": _set(("bogus",), 1),
    "version 3": _set(("version",), 3),
    "config not a dict": _set(("config",), 5),
    "config bad value": _set(("config", "learning_rate"), 5.0),
    "config unstable LIF": _set(("config", "dt"), 0.02),
    "config max_hidden below hidden": _set(("config",), lambda c: dict(c, max_hidden=16, init_hidden=16, min_hidden=8)),
    "config min_hidden above hidden": _set(("config",), lambda c: dict(c, min_hidden=100, init_hidden=100)),
    "config n_actions": _set(("config", "n_actions"), 5),
    "hidden_neurons True": _set(("hidden_neurons",), True),
    "params extra": _set(("params", "extra"), torch.zeros(3)),
    "input_weight float64": _set(("params", "input_weight"), lambda w: w.double()),
    "hidden_bias int64": _set(("params", "hidden_bias"), lambda w: w.long()),
    "readout_bias Inf": _set(("params", "readout_bias"), lambda w: w.fill_(float("inf"))),
    "readout_weight a list": _set(("params", "readout_weight"), lambda w: w.tolist()),
    "rate_ema float64": _set(("rate_ema",), lambda t: t.double()),
    "rate_ema NaN": _set(("rate_ema",), lambda t: t.fill_(float("nan"))),
    "birth_step float": _set(("birth_step",), lambda t: t.float()),
    "birth_step negative": _set(("birth_step",), lambda t: t - 10**6),
    "optimizer missing a key": _drop(("optimizer", "eps")),
    "optimizer steps None": _set(("optimizer", "steps"), None),
    "optimizer steps -1": _set(("optimizer", "steps"), -1),
    "optimizer betas short": _set(("optimizer", "betas"), [0.9]),
    "optimizer lr NaN": _set(("optimizer", "lr"), float("nan")),
    "optimizer eps 0": _set(("optimizer", "eps"), 0.0),
    "exp_avg not a dict": _set(("optimizer", "exp_avg"), [1]),
    "exp_avg float64": _set(("optimizer", "exp_avg", "input_weight"), lambda t: t.double()),
    "exp_avg_sq missing a key": _drop(("optimizer", "exp_avg_sq", "input_weight")),
    "exp_avg_sq negative": _set(("optimizer", "exp_avg_sq", "hidden_bias"), lambda t: t - 1.0),
    "exp_avg wrong shape": _set(("optimizer", "exp_avg", "readout_weight"), torch.zeros(3, 4)),
    "stats not a dict": _set(("stats",), [1, 2]),
    "stats extra key": _set(("stats", "bogus"), 1),
    "stats decision_steps str": _set(("stats", "decision_steps"), "many"),
    "stats events garbage": _set(("stats", "events"), [5]),
    "stats event kind": _set(("stats", "events"), [[10, "split", 4, 40]]),
    "last_grow_check str": _set(("last_grow_check",), "x"),
    "last_prune_check float": _set(("last_prune_check",), 3.0),
    "consecutive_nonfinite str": _set(("consecutive_nonfinite",), "x"),
    "generator state wrong size": _set(("generator", "state"), torch.zeros(3, dtype=torch.uint8)),
    "generator missing device": _set(("generator",), lambda g: {"state": g["state"]}),
    "generator state float": _set(("generator", "state"), lambda t: t.float()),
    "lif_state not a dict": _set(("lif_state",), 3),
    "lif_state missing i": _set(("lif_state",), lambda lif: {"v": lif["v"]}),
    "lif_state v NaN": _set(("lif_state", "v"), lambda v: v.fill_(float("nan"))),
    "lif_state i Inf": _set(("lif_state", "i"), lambda i: i.fill_(float("inf"))),
    "lif_state v and i batches differ": _set(("lif_state", "i"), lambda i: i[:2].clone()),
    "lif_state v float64": _set(("lif_state", "v"), lambda v: v.double()),
    "lif_state v 1-D": _set(("lif_state", "v"), lambda v: v[0].clone()),
}


@pytest.mark.parametrize("case", sorted(BAD_STATES))
def test_intact_checkpoint_with_bad_values_is_refused_and_nothing_is_loaded(tmp_path, good_state, case):
    """Each part of the state is checked (type, dtype, shape, finiteness, key set) before any of it
    is taken: a refused state leaves the organism exactly as it was, and whatever is wrong, the
    error is CheckpointError."""
    state = copy.deepcopy(good_state)
    BAD_STATES[case](state)
    checkpoint.save(state, tmp_path / "bad.ckpt")  # an intact file holding a bad organism
    target = Organism(OrganismConfig(init_hidden=20, min_hidden=8, max_hidden=64, seed=5))
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(checkpoint.CheckpointError, match="^checkpoint refused: "):
        target.load(tmp_path / "bad.ckpt")
    assert_same_state(before, target.state_dict())
    with pytest.raises(checkpoint.CheckpointError, match="^checkpoint refused: "):
        Organism.from_checkpoint(tmp_path / "bad.ckpt")


def test_a_state_that_is_not_a_dict_is_refused():
    target = Organism()
    before = copy.deepcopy(target.state_dict())
    for state in ([1, 2], None, "state"):
        with pytest.raises(checkpoint.CheckpointError, match="^checkpoint refused: the state is"):
            target.load_state_dict(state)
    assert_same_state(before, target.state_dict())


def test_a_version_1_checkpoint_is_refused_saying_what_it_was(tmp_path, good_state):
    checkpoint.save(dict(good_state, version=1), tmp_path / "v1.ckpt")
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"^checkpoint refused: version 1 \(its optimizer section is torch\.optim\.Adam's .*\) "
                             r"cannot be loaded"):
        Organism().load(tmp_path / "v1.ckpt")


def test_a_non_contiguous_tensor_in_a_checkpoint_loads_and_learns(tmp_path, good_state):
    state = copy.deepcopy(good_state)
    weight = state["params"]["input_weight"]
    state["params"]["input_weight"] = weight.t().contiguous().t()  # the same values, column-major
    assert not state["params"]["input_weight"].is_contiguous()
    checkpoint.save(state, tmp_path / "o.ckpt")
    target = Organism()
    target.load(tmp_path / "o.ckpt")
    assert torch.equal(target.params["input_weight"], weight)
    live(target, BatchedForagingGrid(4, seed=1), 16)  # the C kernels take it
    assert target.stats.updates == good_state["stats"]["updates"] + 2


def test_nan_observation_raises_instead_of_acting():
    organism = Organism()
    obs = torch.zeros(4, 2, 15, 15)
    obs[0, 1, 3, 3] = float("nan")
    with pytest.raises(NonFiniteError, match="observation holds NaN"):
        organism.act(obs)
    with pytest.raises(NonFiniteError, match="observation holds NaN"):
        organism.learn_act(obs)


def test_nan_rewards_are_skipped_then_raise():
    organism = Organism(OrganismConfig(rollout_length=2, max_nonfinite_updates=2))
    env = BatchedForagingGrid(4, seed=0)
    obs = env.reset()
    before = {k: p.detach().clone() for k, p in organism.params.items()}
    nan_reward = torch.full((4,), float("nan"))
    done = torch.zeros(4, dtype=torch.bool)
    for update in range(2):  # two bad updates: skipped, counted, weights untouched
        for _ in range(2):
            organism.learn_act(obs)
            organism.learn_feedback(nan_reward, done)
        assert organism.stats.nonfinite_updates_skipped == update + 1
    for k, p in organism.params.items():
        assert torch.equal(p, before[k])
    with pytest.raises(NonFiniteError, match="consecutive updates"):
        for _ in range(2):
            organism.learn_act(obs)
            organism.learn_feedback(nan_reward, done)


def test_feedback_of_the_wrong_shape_is_refused_before_it_is_recorded():
    organism = Organism(OrganismConfig(rollout_length=2))
    env = BatchedForagingGrid(4, seed=0)
    with pytest.raises(RuntimeError, match="call learn_act first"):
        organism.learn_feedback(torch.zeros(4), torch.zeros(4, dtype=torch.bool))
    result = env.step(organism.learn_act(env.reset()))
    for reward, done in ((result.reward[:2], result.done), (result.reward, result.done[:3]),
                         (result.reward.reshape(4, 1), result.done)):
        with pytest.raises(ValueError, match=r"^learn_feedback: reward and done must hold one value per world of the "
                                             r"last decision \(4\), got shapes"):
            organism.learn_feedback(reward, done)
    assert (organism._rollout.decisions, organism._rollout.rewarded) == (1, 0)  # nothing recorded
    assert organism.learn_feedback(result.reward, result.done) is False  # the right shapes still go in
    organism.learn_act(result.observation)
    assert organism.learn_feedback(result.reward, result.done) is True and organism.stats.updates == 1


def test_config_errors_name_the_field_and_range():
    with pytest.raises(ConfigError, match=r"^grow_threshold: must be a number in \[0.0, 1.0\], got 2"):
        OrganismConfig(grow_threshold=2)
    with pytest.raises(ConfigError, match=r"^learning_rule: must be one of 'reinforce', 'rstdp'"):
        OrganismConfig(learning_rule="hebb")
    with pytest.raises(ConfigError, match=r"^init_hidden: must lie in \[min_hidden, max_hidden\]"):
        OrganismConfig(init_hidden=600)
    with pytest.raises(ConfigError, match=r"^neurons_per_grow: must be an integer"):
        OrganismConfig(neurons_per_grow=2.5)
    with pytest.raises(ConfigError, match=r"^bogus: unknown organism setting"):
        OrganismConfig.from_dict({"bogus": 1})


def test_readme_lists_every_organism_setting_with_its_default():
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for name, default, allowed, _ in OrganismConfig.describe_fields():
        assert f"| `{name}` | `{default}` | {allowed} |" in readme, name


def test_energy_is_metered_while_acting():
    organism = Organism()
    env = BatchedForagingGrid(4, seed=0)
    obs = env.reset()
    for _ in range(600):
        obs = env.step(organism.act(obs)).observation
    report = organism.energy.report()
    assert organism.energy.world_decisions == 2400
    assert 0 < report["energy_per_decision_joules"] < report["dense_ann_energy_per_decision_joules"]
    assert 0 < report["active_inputs_per_decision"] < 450


def test_one_world_still_gets_a_learning_signal():
    from gsnn import plasticity

    rewards = torch.tensor([[0.0], [10.0], [0.0], [0.0]])
    adv = plasticity.advantages(plasticity.discounted_returns(rewards, torch.zeros_like(rewards, dtype=torch.bool), 0.9))
    assert adv.abs().max() > 0.5 and torch.isfinite(adv).all()


def test_lifetime_ends_with_a_full_update_and_evaluation_keeps_the_rollout(tmp_path):
    from gsnn.train import evaluate

    organism = Organism(OrganismConfig(rollout_length=16))
    live(organism, BatchedForagingGrid(4, seed=0), 40)  # 2 full rollouts + 8 decisions
    assert organism.stats.updates == 3 and not organism._rollout
    organism.save(tmp_path / "o.ckpt")  # possible: nothing pending
    env = BatchedForagingGrid(4, seed=1)
    obs = env.reset()
    for _ in range(5):
        actions = organism.learn_act(obs)
        result = env.step(actions)
        organism.learn_feedback(result.reward, result.done)
        obs = result.observation
    evaluate(organism, BatchedForagingGrid(4, seed=2), seed=2)
    assert len(organism._rollout) == 5


def test_set_config_applies_neuron_parameters_now():
    organism = Organism()
    organism.set_config(OrganismConfig.from_dict(dict(organism.config.to_dict(), tau_mem_inv=50.0, learning_rate=3e-3)))
    assert organism.lif == lif_constants(organism.config) and organism.lif.decay_mem == pytest.approx(0.05)
    assert organism.optimizer.lr == 3e-3


def test_set_config_changes_the_stdp_ratio_of_the_next_update():
    """The STDP step weights carry the depression ratio (gsnn.neurons.stdp_step_weights); decision
    plans and the learner's record spec are cached. A new ratio from set_config (PBT) must act on
    the very next rollout exactly as in an organism built with it, and it must matter."""
    config = OrganismConfig(learning_rule="rstdp", stdp_depression=0.5, rollout_length=32, seed=3)
    changed = Organism(config)
    live(changed, BatchedForagingGrid(16, seed=0), 32)  # one rollout and update: its caches exist
    state = changed.state_dict()

    def rebuilt(ratio: float) -> Organism:
        made = Organism(config)
        made.load_state_dict(copy.deepcopy(dict(state, config=dict(state["config"], stdp_depression=ratio))))
        return made

    fresh, unchanged = rebuilt(2.0), rebuilt(0.5)
    changed.set_config(OrganismConfig.from_dict(dict(changed.config.to_dict(), stdp_depression=2.0)))
    for organism in (changed, fresh, unchanged):
        live(organism, BatchedForagingGrid(16, seed=1), 32)  # food is found: the advantages are not all 0
        assert organism.stats.updates == 2
    names = sorted(changed.params)
    assert all(torch.equal(changed.params[k], fresh.params[k]) for k in names)
    assert not all(torch.equal(changed.params[k], unchanged.params[k]) for k in names)


def test_weights_are_perturbed_and_neurons_grown_or_pruned_between_rollouts_only():
    """An R-STDP update rebuilds its decisions' post factors from their spike bits with the
    readout weights of the rollout, and every update reads a record of the rollout's hidden size:
    perturbing the weights, growing or pruning mid-rollout is refused, as checkpointing is."""
    organism = Organism(OrganismConfig(learning_rule="rstdp", rollout_length=4))
    env = BatchedForagingGrid(3, seed=0)
    result = env.step(organism.learn_act(env.reset()))
    before = {k: v.clone() for k, v in organism.params.items()}
    with pytest.raises(RuntimeError, match="in the middle of a rollout"):
        organism.perturb_weights(0.1)
    assert all(torch.equal(before[k], organism.params[k]) for k in before)
    with pytest.raises(RuntimeError, match=r"^grow\(\) in the middle of a rollout"):
        organism.grow(8)
    with pytest.raises(RuntimeError, match=r"^prune\(\) in the middle of a rollout"):
        organism.prune(torch.arange(organism.hidden_neurons) < 4)
    assert all(torch.equal(before[k], organism.params[k]) for k in before)
    organism.learn_feedback(result.reward, result.done)
    assert organism.finish_rollout() and not len(organism._rollout)
    organism.perturb_weights(0.1)
    assert not torch.equal(before["input_weight"], organism.params["input_weight"])
    assert organism.grow(8) == 8 and organism.prune(torch.arange(organism.hidden_neurons) < 4) == 4


def test_settings_a_rollout_record_depends_on_change_between_rollouts_only():
    """An R-STDP update rebuilds its decisions' post factors from their spike bits with the SNN
    steps and STDP weights in force, and reads what its own rule recorded: set_config changing
    those mid-rollout is refused (the organism unchanged); other settings are taken mid-rollout,
    and all of them between rollouts."""
    organism = Organism(OrganismConfig(learning_rule="rstdp", rollout_length=4))
    env = BatchedForagingGrid(3, seed=0)
    result = env.step(organism.learn_act(env.reset()))
    before = organism.config
    for name, value in (("learning_rule", "reinforce"), ("snn_steps", 3), ("stdp_trace_decay", 0.5),
                        ("stdp_depression", 1.0)):
        with pytest.raises(RuntimeError, match=f"changes {name} in the middle of a rollout"):
            organism.set_config(OrganismConfig.from_dict(dict(before.to_dict(), **{name: value})))
        assert organism.config is before
    organism.set_config(OrganismConfig.from_dict(dict(before.to_dict(), learning_rate=1e-3)))
    assert organism.optimizer.lr == 1e-3
    organism.learn_feedback(result.reward, result.done)
    assert organism.finish_rollout()
    organism.set_config(OrganismConfig.from_dict(dict(organism.config.to_dict(), snn_steps=3)))
    assert organism.config.snn_steps == 3 and organism._stdp_weights.shape == (3,)


def test_rollout_slots_are_the_buffers_rows_and_a_shape_change_mid_rollout_is_refused():
    from gsnn.organism import Rollout

    rollout = Rollout()
    spec = {"a": ((3, 2), torch.float32), "b": ((3,), torch.int64)}
    for index in range(4):
        slots = rollout.slots(spec, index, 4, torch.device("cpu"))
        slots["a"].fill_(index)
        slots["b"].fill_(10 + index)
        rollout.decisions += 1
    assert torch.equal(rollout.view("a"), torch.arange(4.0).view(4, 1, 1).expand(4, 3, 2))
    assert torch.equal(rollout.view("b"), (10 + torch.arange(4)).view(4, 1).expand(4, 3))
    with pytest.raises(RuntimeError, match="changed shape in the middle of a rollout"):
        rollout.slots({"a": ((5, 2), torch.float32)}, 1, 4, torch.device("cpu"))  # another batch size
    with pytest.raises(RuntimeError, match="changed shape in the middle of a rollout"):
        rollout.slots(spec, 4, 4, torch.device("cpu"))  # beyond the buffers, even for a checked spec
    rollout.clear()
    wider = {"a": ((5, 2), torch.float32)}
    assert rollout.slots(wider, 0, 4, torch.device("cpu"))["a"].shape == (5, 2)  # a new rollout reallocates
    assert rollout.view("a").shape == (0, 5, 2)


def test_a_copied_organism_decides_on_its_own_tensors():
    """The decision kernel's prepared arguments hold raw pointers: a deep copy of an organism
    that has decided must not write into the original's LIF state or rates."""
    organism = Organism(OrganismConfig(init_hidden=48, max_hidden=48, seed=3))
    env = BatchedForagingGrid(4, seed=3)
    obs, _ = live(organism, env, 20)
    twin = copy.deepcopy(organism)
    before = [t.clone() for t in (organism.v, organism.i, organism.rate_ema)]
    for _ in range(5):
        twin.learn_act(obs)
        twin.act(obs)
    assert all(torch.equal(a, b) for a, b in zip(before, (organism.v, organism.i, organism.rate_ema)))
    assert not torch.equal(twin.v, organism.v)  # the copy's own state moved
    # and the original still decides as a fresh copy of itself does
    again = copy.deepcopy(organism)
    assert torch.equal(organism.act(obs), again.act(obs)) and torch.equal(organism.v, again.v)


def test_an_unstable_lif_step_is_refused_by_the_config_naming_the_fields():
    """dt * tau_inv > 1: the Euler step's decay factor 1 - dt * tau_inv turns negative (and from 2
    the state diverges to Inf and NaN), so such a config is refused in one line."""
    with pytest.raises(ConfigError,
                       match=r"^dt, tau_syn_inv: dt \* tau_syn_inv must be <= 1 .*got 0\.006 \* 200\.0 = 1\.2$"):
        OrganismConfig(dt=0.006)
    with pytest.raises(ConfigError, match=r"^dt, tau_mem_inv: dt \* tau_mem_inv must be <= 1 "):
        OrganismConfig(dt=0.02)
    with pytest.raises(ConfigError, match=r"^dt, tau_mem_inv: "):
        OrganismConfig(tau_mem_inv=1001.0)
    assert OrganismConfig(dt=0.005).dt == 0.005  # dt * tau_syn_inv = 1 exactly is stable
    organism = Organism()
    with pytest.raises(ConfigError, match=r"^dt, tau_syn_inv: "):
        organism.set_config(OrganismConfig.from_dict(dict(organism.config.to_dict(), dt=0.01)))
    with pytest.raises(ConfigError,
                       match=r"^v_leak: must be a number in \[-3\.40282e\+38, 3\.40282e\+38\] \(float32\)"):
        OrganismConfig(v_leak=1e39)  # the float32 LIF constant would be Inf


def test_integer_settings_given_as_strings_are_parsed_exactly():
    assert OrganismConfig(seed="12345678901234567").seed == 12345678901234567  # not through a float
    assert OrganismConfig(seed="9223372036854775807").seed == 2**63 - 1
    assert OrganismConfig(rollout_length="1e3").rollout_length == 1000
    assert OrganismConfig(learning_rate="3e-3").learning_rate == 3e-3
    for bad in ("9223372036854775808", "1.5", "nan", "1e999999999", "twelve"):
        with pytest.raises(ConfigError, match=r"^seed: must be an integer in \[0, 9223372036854775807\], got '"):
            OrganismConfig(seed=bad)
    with pytest.raises(ConfigError, match=r"^seed: must be an integer"):
        OrganismConfig(seed=10**400)  # beyond any float: refused, not OverflowError


def test_a_nonfinite_lif_state_raises_at_the_update_and_is_never_checkpointed(tmp_path):
    organism = trained(steps=16, worlds=4)
    organism.v[1, 3] = float("nan")  # as an overflowing input current would leave it
    updates = organism.stats.updates
    with pytest.raises(NonFiniteError, match=r"^the LIF state .* holds NaN or Inf at decision step 24 "):
        live(organism, BatchedForagingGrid(4, seed=1), 16)
    assert organism.stats.updates == updates and not len(organism._rollout)  # nothing learnt from it
    with pytest.raises(NonFiniteError, match=r"^state_dict\(\): lif_state\.v holds NaN or Inf"):
        organism.save(tmp_path / "o.ckpt")
    assert not (tmp_path / "o.ckpt").exists()
    organism.reset_state(4)  # the worlds start from rest: learning and checkpoints go on
    live(organism, BatchedForagingGrid(4, seed=1), 8)
    assert organism.stats.updates == updates + 1
    organism.save(tmp_path / "o.ckpt")


def test_nan_weights_are_never_checkpointed(tmp_path):
    organism = trained(steps=16, worlds=4)
    organism.save(tmp_path / "o.ckpt")
    good = (tmp_path / "o.ckpt").read_bytes()
    organism.optimizer.lr = float("nan")  # Adam's step then writes NaN into every parameter
    with pytest.raises(NonFiniteError, match="a parameter became non-finite"):
        live(organism, BatchedForagingGrid(4, seed=1), 8)
    with pytest.raises(NonFiniteError, match=r"^state_dict\(\): params\.input_weight, .* hold NaN or Inf; "
                                             r"a non-finite organism is never checkpointed$"):
        organism.save(tmp_path / "o.ckpt")
    assert (tmp_path / "o.ckpt").read_bytes() == good  # the last good checkpoint is kept


def test_set_config_refuses_shape_changes_and_a_hidden_range_without_the_current_size():
    organism = trained(steps=16, worlds=4, init_hidden=32, min_hidden=8, max_hidden=128)
    before = copy.deepcopy(organism.state_dict())
    config = organism.config
    for change, message in (
        (dict(n_actions=5), r"^n_actions: cannot change on a living organism \(it has 4\), got 5$"),
        (dict(n_inputs=100), r"^n_inputs: cannot change on a living organism \(it has 450\), got 100$"),
        (dict(max_hidden=16, init_hidden=16), r"^max_hidden: must be >= the organism's 32 hidden neurons, got 16$"),
        (dict(min_hidden=64, init_hidden=64), r"^min_hidden: must be <= the organism's 32 hidden neurons, got 64$"),
    ):
        with pytest.raises(ConfigError, match=message):
            organism.set_config(OrganismConfig.from_dict(dict(config.to_dict(), **change)))
        assert organism.config is config
    assert_same_state(before, organism.state_dict())
    organism.set_config(OrganismConfig.from_dict(dict(config.to_dict(), min_hidden=32, max_hidden=32, init_hidden=32)))
    assert organism.config.max_hidden == 32  # a range that holds the size is taken


def test_rollout_length_changes_between_rollouts_only():
    """The rollout's buffers are sized by rollout_length at its first decision: a longer one
    mid-rollout left every later learn_act failing (and the organism could not be saved)."""
    organism = Organism(OrganismConfig(rollout_length=8))
    env = BatchedForagingGrid(4, seed=0)
    obs = env.reset()
    for _ in range(5):
        result = env.step(organism.learn_act(obs))
        organism.learn_feedback(result.reward, result.done)
        obs = result.observation
    with pytest.raises(RuntimeError, match="changes rollout_length in the middle of a rollout"):
        organism.set_config(OrganismConfig.from_dict(dict(organism.config.to_dict(), rollout_length=32)))
    assert organism.config.rollout_length == 8
    for _ in range(3):
        result = env.step(organism.learn_act(obs))
        organism.learn_feedback(result.reward, result.done)
        obs = result.observation
    assert organism.stats.updates == 1
    organism.set_config(OrganismConfig.from_dict(dict(organism.config.to_dict(), rollout_length=32)))
    live(organism, env, 32, obs)
    assert organism.stats.updates == 2


def test_prune_refuses_a_mask_of_the_wrong_shape_or_dtype_or_below_min_hidden():
    organism = trained(steps=16, worlds=4, init_hidden=32, min_hidden=8)
    before = copy.deepcopy(organism.state_dict())
    short = torch.zeros(20, dtype=torch.bool)
    short[3] = True
    for mask, message in (
        (short, r"^prune: the mask must be a bool tensor of shape \(32,\), one value per hidden neuron, "
                r"got torch\.bool \(20,\)$"),
        (torch.zeros(32, dtype=torch.long), r"got torch\.int64 \(32,\)$"),
        (torch.ones(32, 1, dtype=torch.bool), r"got torch\.bool \(32, 1\)$"),
        ([False] * 32, r"got list \(\)$"),
        (torch.arange(32) >= 7, r"^prune: removing 25 of 32 neurons would leave 7, below min_hidden \(8\)$"),
    ):
        with pytest.raises(ValueError, match=message):
            organism.prune(mask)
    assert_same_state(before, organism.state_dict())
    assert organism.prune(torch.arange(32) >= 8) == 24 and organism.hidden_neurons == 8


def test_feedback_with_a_non_bool_done_is_refused_before_it_is_recorded():
    organism = Organism(OrganismConfig(rollout_length=2))
    env = BatchedForagingGrid(4, seed=0)
    result = env.step(organism.learn_act(env.reset()))
    for done in (torch.tensor([1, 0, 0, 0]), result.done.float()):
        with pytest.raises(ValueError,
                           match=r"^learn_feedback: done must be a bool tensor, got torch\.(int64|float32)$"):
            organism.learn_feedback(result.reward, done)
    assert (organism._rollout.decisions, organism._rollout.rewarded, organism.stats.decision_steps) == (1, 0, 0)
    assert organism.learn_feedback(result.reward, result.done) is False


def test_evaluation_leaves_the_random_stream_alone_and_one_world_has_no_spread():
    from gsnn.train import evaluate

    organism, twin = Organism(OrganismConfig(seed=4)), Organism(OrganismConfig(seed=4))
    result = evaluate(organism, BatchedForagingGrid(4, seed=9, max_steps=20), seed=9, greedy=False)
    assert torch.equal(organism.generator.get_state(), twin.generator.get_state())
    assert torch.equal(organism.act(torch.zeros(4, 450), greedy=False), twin.act(torch.zeros(4, 450), greedy=False))
    assert result["fitness_std"] >= 0
    single = evaluate(organism, BatchedForagingGrid(1, seed=9, max_steps=20), seed=9)
    assert single["fitness_std"] == 0.0  # not NaN (std of one value): PBT gets it


class GeneralPathOrganism(Organism):
    """Every learning decision through ``kernels.decide`` (no kept slot decisions)."""

    def _keep_slot_decisions(self, spec, slot, alpha):
        self._slot_decisions = None


def learning_state(organism):
    """Everything a learning decision or an update changes, cloned."""
    state = {f"param.{k}": v.clone() for k, v in organism.params.items()}
    for name in organism.params:
        for key, value in (organism.optimizer.moments(name) or {}).items():
            state[f"{name}.{key}"] = value.clone()
    state.update(rate_ema=organism.rate_ema.clone(), v=organism.v.clone(), i=organism.i.clone(),
                 generator=organism.generator.get_state())
    rollout = organism._rollout
    for name in rollout._buffers:
        if name not in ("inputs", "input_values"):  # below: only the used start of each slot is written
            state[f"rollout.{name}"] = rollout.view(name).clone()
    if "input_counts" in rollout._buffers:
        used = rollout.view("input_counts").sum(dim=1).tolist()
        for name in ("inputs", "input_values"):
            rows = rollout._buffers[name]
            state[f"rollout.{name}"] = torch.cat([rows[0][:0]] + [row[:n] for row, n in zip(rows, used)])
    return state


def assert_same_learning(a, b):
    mine, theirs = learning_state(a), learning_state(b)
    assert mine.keys() == theirs.keys()
    for key in mine:
        assert torch.equal(mine[key], theirs[key]), key
    assert a.energy.report() == b.energy.report() and a.stats == b.stats and a.hidden_neurons == b.hidden_neurons


@pytest.mark.parametrize("rule, steps", [("rstdp", 10), ("reinforce", 10), ("rstdp", 16)])
def test_a_rollouts_later_decisions_through_kept_slot_arguments_learn_bit_for_bit_as_decide(rule, steps, monkeypatch):
    """After a rollout's first decision (through ``kernels.decide``, which checks everything) the
    C decision's arguments of every slot are kept (``kernels.SlotDecisions``): the rollout's other
    decisions must be the very same decisions, rollout after rollout, across growth and pruning
    (new tensors, new rollout buffers), for each record (R-STDP's spike bits, REINFORCE's state,
    R-STDP's post factors at more than 15 steps), and they must not go through ``decide``."""
    from gsnn import kernels

    calls = []
    general_decide = kernels.decide
    monkeypatch.setattr(kernels, "decide", lambda *a, **k: calls.append(a[0].shape[0]) or general_decide(*a, **k))
    config = OrganismConfig(learning_rule=rule, snn_steps=steps, rollout_length=8, init_hidden=48, seed=4,
                            grow_threshold=0.05, prune_threshold=0.02, grow_interval=40, prune_interval=56,
                            prune_grace=16)
    fast, general = Organism(config), GeneralPathOrganism(config)
    for organism in (fast, general):
        live(organism, BatchedForagingGrid(5, seed=2), 200)
    assert fast.stats.updates == 25 and fast._slot_decisions is not None and general._slot_decisions is None
    assert_same_learning(fast, general)
    assert fast.stats.grow_events and fast.stats.prune_events  # the size changed while learning
    assert calls.count(5) == 200 + 25  # the general organism's 200, the kept slots' rollouts' first 25


def test_kept_slot_arguments_give_way_to_decide_whenever_they_do_not_serve():
    """Mid-rollout, whatever the kept slot arguments were not made for goes through
    ``kernels.decide``, and learning stays bit for bit that of decide alone: a new rate window
    and new LIF constants (set_config), an observation of another dtype or not contiguous, an
    evaluation in between (other worlds, the same workspace), and a NaN observation (refused as
    decide refuses it, nothing changed), and the kernels switched to torch (``native.torch_only``)."""
    from gsnn import native
    from gsnn.train import evaluate

    config = OrganismConfig(learning_rule="rstdp", rollout_length=12, init_hidden=40, seed=6)
    organisms = [Organism(config), GeneralPathOrganism(config)]
    envs = [BatchedForagingGrid(4, seed=1) for _ in organisms]
    observations = [env.reset() for env in envs]
    for step in range(30):
        for n, (organism, env) in enumerate(zip(organisms, envs)):
            obs = observations[n]
            slot = len(organism._rollout)
            if step == 14:
                organism.set_config(OrganismConfig.from_dict(dict(organism.config.to_dict(), rate_window=50)))
            if step == 17:
                organism.set_config(OrganismConfig.from_dict(dict(organism.config.to_dict(), tau_mem_inv=80.0)))
            if step == 15:
                obs = obs.double()
            if step == 16:
                obs = obs.reshape(4, -1).t().contiguous().t()
                assert not obs.is_contiguous()
            if step == 19:
                evaluate(organism, BatchedForagingGrid(3, seed=5), seed=5)
            if step == 23:  # the kernels switched to torch mid-rollout (the plan's C library is off)
                with native.torch_only():
                    result = env.step(organism.learn_act(obs))
                organism.learn_feedback(result.reward, result.done)
                observations[n] = result.observation
                continue
            if step == 21:
                bad = obs.clone()
                bad[2, 0, 3, 3] = float("nan")
                before = learning_state(organism)
                with pytest.raises(NonFiniteError, match=f"observation holds NaN or Inf at decision step {step}$"):
                    organism.learn_act(bad)
                assert len(organism._rollout) == slot
                after = learning_state(organism)
                before.pop("generator"), after.pop("generator")  # the uniform numbers were drawn
                assert all(torch.equal(before[k], after[k]) for k in before)
            result = env.step(organism.learn_act(obs))
            organism.learn_feedback(result.reward, result.done)
            observations[n] = result.observation
        if step == 20:
            assert organisms[0]._slot_decisions is not None  # in use again after all that
    assert organisms[0].stats.updates == 2
    assert_same_learning(*organisms)


class StepwiseUpdateOrganism(Organism):
    """Every update step by step (advantages, directions, norm, Adam: a call each)."""

    def _update(self):
        self._update_stepwise()


@pytest.mark.parametrize("worlds", [1, 5, 16])
def test_the_one_call_rstdp_update_learns_bit_for_bit_as_the_stepwise_update(worlds, monkeypatch):
    """On the C path an R-STDP rollout recorded as spike bits is learned from in one call
    (``kernels.rstdp_update``): the same weights, moments, statistics and structure as the
    update step by step, update after update, through growth, pruning and partial rollouts."""
    from gsnn import kernels

    calls = []
    one_call = kernels.rstdp_update
    monkeypatch.setattr(kernels, "rstdp_update", lambda *a, **k: calls.append(1) or one_call(*a, **k))
    config = OrganismConfig(learning_rule="rstdp", rollout_length=8, init_hidden=48, seed=2, grow_threshold=0.05,
                            prune_threshold=0.02, grow_interval=40, prune_interval=56, prune_grace=16)
    organisms = Organism(config), StepwiseUpdateOrganism(config)
    for organism in organisms:
        env = BatchedForagingGrid(worlds, seed=4)
        obs, _ = live(organism, env, 203)  # ends with a partial rollout of 3 decisions
        live(organism, env, 45, obs)
    fast, stepwise = organisms
    assert fast.stats.updates == 26 + 6 and len(calls) == fast.stats.updates  # each live() ends with a partial one
    assert fast.stats.grow_events + fast.stats.prune_events > 0
    assert fast.optimizer.steps == stepwise.optimizer.steps
    assert_same_learning(fast, stepwise)


def test_the_one_call_rstdp_update_skips_a_non_finite_update_as_the_stepwise_update():
    """A NaN reward makes the norm NaN: the update is skipped and counted, no moment is made by
    a skipped first update, and too many in a row raise, as step by step."""
    config = OrganismConfig(learning_rule="rstdp", rollout_length=4, init_hidden=32, seed=1, max_nonfinite_updates=2)
    organisms = Organism(config), StepwiseUpdateOrganism(config)
    for organism in organisms:
        env = BatchedForagingGrid(3, seed=0)
        obs = env.reset()
        for step in range(20):  # rollouts of 4: NaN, fine, then NaN three times (the third one too many)
            result = env.step(organism.learn_act(obs))
            reward = result.reward.clone()
            if step < 4 or step >= 8:
                reward[1] = float("nan")
            if step == 19:
                with pytest.raises(NonFiniteError, match="3 consecutive updates had NaN/Inf gradients"):
                    organism.learn_feedback(reward, result.done)
            else:
                organism.learn_feedback(reward, result.done)
            if step == 3:  # the first update, skipped: no moments yet
                assert organism.optimizer.moments("input_weight") == {} and organism.optimizer.steps == 0
            obs = result.observation
        assert organism.stats.nonfinite_updates_skipped == 4 and organism.stats.updates == 1
    assert_same_learning(*organisms)


@pytest.mark.parametrize("rule", ["rstdp", "reinforce"])
def test_a_pickled_organism_learns_on_as_the_original(rule):
    """Pickled and unpickled mid-rollout or between rollouts, an organism learns on exactly as
    the original does (the rollout's slots stay views of its buffers)."""
    import pickle

    def steps(organism, env, obs, n):  # gsnn.train.live without its finish_rollout
        for _ in range(n):
            result = env.step(organism.learn_act(obs))
            organism.learn_feedback(result.reward, result.done)
            obs = result.observation
        return obs

    config = OrganismConfig(learning_rule=rule, rollout_length=8, init_hidden=32, seed=1)
    runs = []
    for cut in (None, 16, 20):  # not pickled, between rollouts, mid-rollout
        organism, env = Organism(config), BatchedForagingGrid(4, seed=3)
        obs = steps(organism, env, env.reset(), 20 if cut is None else cut)
        if cut is not None:
            organism = pickle.loads(pickle.dumps(organism))
            obs = steps(organism, env, obs, 20 - cut)
        steps(organism, env, obs, 20)
        assert organism.stats.updates == 5 and len(organism._rollout) == 0
        runs.append(organism)
    for other in runs[1:]:
        assert_same_learning(runs[0], other)
