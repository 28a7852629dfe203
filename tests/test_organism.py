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
        target = Organism()
        with pytest.raises(checkpoint.CheckpointError, match="checkpoint refused"):
            target.load(tmp_path / "bad.ckpt")
        assert target.hidden_neurons == 64


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


def test_weights_are_perturbed_between_rollouts_only():
    """An R-STDP update rebuilds its decisions' post factors from their spike bits with the
    readout weights of the rollout: perturbing them mid-rollout is refused, as checkpointing is."""
    organism = Organism(OrganismConfig(learning_rule="rstdp", rollout_length=4))
    env = BatchedForagingGrid(3, seed=0)
    result = env.step(organism.learn_act(env.reset()))
    before = {k: v.clone() for k, v in organism.params.items()}
    with pytest.raises(RuntimeError, match="in the middle of a rollout"):
        organism.perturb_weights(0.1)
    assert all(torch.equal(before[k], organism.params[k]) for k in before)
    organism.learn_feedback(result.reward, result.done)
    assert organism.finish_rollout() and not len(organism._rollout)
    organism.perturb_weights(0.1)
    assert not torch.equal(before["input_weight"], organism.params["input_weight"])


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
