"""The hot loops (gsnn.kernels): C and torch implementations against Norse's LIF step and autograd,
and against each other; the written-out REINFORCE gradient and Adam against torch's; the build."""

import contextlib
import subprocess
import sys

import pytest
import torch
from norse.torch.functional.lif import LIFFeedForwardState, lif_feed_forward_step

from gsnn import kernels, native, plasticity
from gsnn.adam import Adam
from gsnn.config import OrganismConfig
from gsnn.neurons import lif_constants, lif_decision_reference, lif_parameters, stdp_step_weights

PARAMETER_SETS = [(0.0, 0.0), (-0.2, 0.0), (0.0, -0.1)]  # (v_leak, v_reset)


def identity_decision(x, v, i, lif, steps, readout_weight=None, **options):
    """``kernels.decide`` with input current exactly ``x`` (B, H): observations x against an
    identity weight and zero bias (every x is non-zero, and 1.0 * x + 0.0 rounds to x)."""
    H = x.shape[1]
    params = {"input_weight": torch.eye(H), "hidden_bias": torch.zeros(H),
              "readout_weight": torch.zeros(H, 4) if readout_weight is None else readout_weight,
              "readout_bias": torch.zeros(4)}
    return kernels.decide(x, params, lif, v, i, steps, **options)


@pytest.mark.parametrize("v_leak, v_reset", PARAMETER_SETS)
def test_decide_lif_equals_norse_over_many_decisions(backend, v_leak, v_reset):
    config = OrganismConfig(v_leak=v_leak, v_reset=v_reset)
    p, lif, T = lif_parameters(config), lif_constants(config), config.snn_steps
    g = torch.Generator().manual_seed(0)
    B, H = 16, 96
    v_ref, i_ref = torch.zeros(B, H), torch.zeros(B, H)
    v, i = v_ref.clone(), i_ref.clone()
    total_spikes = 0
    for _ in range(20):  # state carried from decision to decision
        x = torch.rand(B, H, generator=g) * 0.6 + 1e-3
        counts_ref, state = lif_decision_reference(x, LIFFeedForwardState(v_ref, i_ref), p, T, config.dt)
        v_ref, i_ref = state.v, state.i
        decision = identity_decision(x, v, i, lif, T)
        assert torch.equal(decision.counts, counts_ref)
        if v_leak == 0.0 and v_reset == 0.0:  # the default parameters: bit-identical
            assert torch.equal(v, v_ref) and torch.equal(i, i_ref)
        torch.testing.assert_close(v, v_ref, rtol=0, atol=1e-6)
        torch.testing.assert_close(i, i_ref, rtol=0, atol=1e-6)
        assert decision.spikes == pytest.approx(float(counts_ref.sum()))
        total_spikes += int(counts_ref.sum())
    assert total_spikes > 1000  # the comparison covered spiking, not a silent layer


def test_lif_constants_are_norses_own_numbers():
    for v_leak, v_reset in PARAMETER_SETS:
        config = OrganismConfig(v_leak=v_leak, v_reset=v_reset, tau_mem_inv=77.0, dt=0.0007)
        p, lif = lif_parameters(config), lif_constants(config)
        assert lif.decay_mem == (config.dt * p.tau_mem_inv).item()
        assert lif.neg_decay_syn == (-config.dt * p.tau_syn_inv).item()
        assert (lif.v_leak, lif.v_th, lif.v_reset) == (p.v_leak.item(), p.v_th.item(), p.v_reset.item())


def test_stdp_post_factor_matches_a_step_by_step_trace_computation(backend):
    """hidden_post = (potentiation - ratio * depression) * feedback, feedback = W_out @ action_post
    (summed with one weight per step, gsnn.neurons.stdp_step_weights); with ratio 0 and 1 from the
    same state, both factors against explicit traces."""
    config = OrganismConfig()
    p, lif, T, decay = lif_parameters(config), lif_constants(config), config.snn_steps, 0.8
    g = torch.Generator().manual_seed(1)
    B, H = 4, 32
    x = torch.rand(B, H, generator=g) + 1e-3
    W_out = torch.randn(H, 4, generator=g)
    uniform = torch.rand(B, generator=g)
    factors = {}
    for ratio in (0.0, 1.0):
        stdp = kernels.STDPOptions(stdp_step_weights(decay, T, ratio))
        decision = identity_decision(x, torch.zeros(B, H), torch.zeros(B, H), lif, T, readout_weight=W_out,
                                     choose="sample", uniform=uniform, keep=("hidden_post", "action_post"), stdp=stdp)
        feedback = decision.outputs["action_post"] @ W_out.T
        factors[ratio] = decision.outputs["hidden_post"] / feedback
    # Brute force with explicit traces: pre spikes every step (pre trace), post trace from spikes.
    state = LIFFeedForwardState(torch.zeros(B, H), torch.zeros(B, H))
    pre_trace, post_trace = 0.0, torch.zeros(B, H)
    potentiation, depression = torch.zeros(B, H), torch.zeros(B, H)
    for _ in range(T):
        z, state = lif_feed_forward_step(x, state, p, config.dt)
        pre_trace = decay * pre_trace + 1.0
        depression += post_trace  # pre spike meets the post trace of earlier steps
        potentiation += pre_trace * z  # post spike meets the pre trace including this step
        post_trace = decay * post_trace + z
    torch.testing.assert_close(factors[0.0], potentiation, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(factors[0.0] - factors[1.0], depression, rtol=1e-4, atol=1e-4)
    assert potentiation.sum() > 0 and depression.sum() > 0


def sparse_observations(generator, B, N=450, density=0.06):
    obs = (torch.rand(B, N, generator=generator) < density).float()
    obs[1::2, 7] = 0.5  # a value other than 1 in every other world (the C kernel adds all-1 rows without products)
    obs[0] = 0.0  # a world that sees nothing
    return obs


def random_params(g, N=450, H=200, A=4):
    return {"input_weight": torch.randn(N, H, generator=g) * 0.1, "hidden_bias": torch.full((H,), 0.1),
            "readout_weight": torch.randn(H, A, generator=g) * 0.1, "readout_bias": torch.randn(A, generator=g)}


def assert_same_samples(native_actions, torch_actions, probs, uniform):
    """Sampled actions agree except where u lies within float rounding of a cumulative
    probability (the two softmax implementations may differ in the last bit)."""
    margin = (probs.cumsum(dim=1) - uniform.unsqueeze(1)).abs().min(dim=1).values
    clear = margin > 1e-5
    assert clear.float().mean() > 0.9
    assert torch.equal(native_actions[clear], torch_actions[clear])


@pytest.mark.parametrize("B", [5, 40, 300])  # one chunk read in place, one copied by blocks, two chunks
def test_native_input_current_is_the_ordered_sum_of_the_active_rows(B):
    """The C decision's input current, bit for bit: bias + the sum over the active inputs in
    increasing order of value * W[k] (products skipped in worlds whose values are all 1), for
    full and partial blocks of neurons and the tail of the observation (450 = 56 * 8 + 2)."""
    g = torch.Generator().manual_seed(11)
    H = 200  # three blocks of 64 and one of 8
    params = random_params(g, H=H)
    obs = sparse_observations(g, B)
    obs[2 % B, 449] = 1.0  # in the tail of the observation
    obs[3 % B, 448] = 2.0
    v, i = torch.zeros(B, H), torch.zeros(B, H)
    x = kernels.decide(obs, params, lif_constants(OrganismConfig()), v, i, 10, keep=("x",)).outputs["x"]
    W, bias = params["input_weight"], params["hidden_bias"]
    for b in range(B):
        acc = torch.zeros(H)
        for k in torch.nonzero(obs[b]).flatten().tolist():
            acc = acc + (W[k] if obs[b, k] == 1.0 else obs[b, k] * W[k])
        assert torch.equal(x[b], acc + bias), b


@pytest.mark.parametrize("T", [1, 10, 40])
def test_native_stdp_record_of_a_full_block_equals_the_scalar_path_bit_for_bit(T):
    """R-STDP's record of 64 neurons (one full block: the vector loops) equals, bit for bit, that
    of the same first 63 neurons alone (a partial block: the scalar loop). The 64th neuron never
    fires and the readout sums the counts into one logit, so both sample the same actions."""
    g = torch.Generator().manual_seed(5)
    B, H = 6, 64
    lif = lif_constants(OrganismConfig())
    params = random_params(g, H=H)
    params["input_weight"] *= 6.0  # lively: most neurons fire at some steps, not at all
    params["input_weight"][:, H - 1] = -100.0
    params["hidden_bias"][H - 1] = -100.0
    params["readout_weight"] = torch.zeros(H, 4)
    params["readout_weight"][:, 0] = 2.0**-9  # logit 0 = the world's spikes / 512: exact in any order
    part = {k: (v[..., : H - 1] if k == "hidden_bias" else v[: H - 1] if k == "readout_weight"
                else v[:, : H - 1] if k == "input_weight" else v).contiguous() for k, v in params.items()}
    stdp = kernels.STDPOptions(stdp_step_weights(0.8, T, 0.5))
    keep = ("obs", "hidden_post", "action_post")
    state = [torch.zeros(B, H), torch.zeros(B, H)]
    state_part = [torch.zeros(B, H - 1), torch.zeros(B, H - 1)]
    for _ in range(5):
        obs, uniform = sparse_observations(g, B), torch.rand(B, generator=g)
        full = kernels.decide(obs, params, lif, *state, T, choose="sample", uniform=uniform, keep=keep, stdp=stdp)
        alone = kernels.decide(obs, part, lif, *state_part, T, choose="sample", uniform=uniform, keep=keep,
                               stdp=stdp)
        assert torch.equal(full.counts[:, H - 1], torch.zeros(B))
        assert torch.equal(full.counts[:, : H - 1], alone.counts)
        assert torch.equal(state[0][:, : H - 1], state_part[0]) and torch.equal(state[1][:, : H - 1], state_part[1])
        assert torch.equal(full.actions, alone.actions)
        assert torch.equal(full.outputs["hidden_post"][:, : H - 1], alone.outputs["hidden_post"])
    assert 0 < float(alone.counts.mean()) < T and bool((alone.outputs["hidden_post"] != 0).any())


@pytest.mark.parametrize("rule", ["reinforce", "rstdp"])
def test_decide_native_equals_torch_with_learner_record(rule):
    g = torch.Generator().manual_seed(3)
    B, H, T = 24, 200, 10
    lif = lif_constants(OrganismConfig())
    params = random_params(g, H=H)
    v, i = torch.zeros(B, H), torch.zeros(B, H)
    v_t, i_t, ema, ema_t = v.clone(), i.clone(), torch.zeros(H), torch.zeros(H)
    if rule == "reinforce":
        options = dict(keep=("obs", "x", "v0", "i0"))
    else:
        options = dict(keep=("obs", "hidden_post", "action_post"),
                       stdp=kernels.STDPOptions(stdp_step_weights(0.8, T, 0.5)))
    for _ in range(6):
        obs, uniform = sparse_observations(g, B), torch.rand(B, generator=g)
        native_d = kernels.decide(obs, params, lif, v, i, T, choose="sample", uniform=uniform, rate=(ema, 0.01),
                                  **options)
        with native.torch_only():
            torch_d = kernels.decide(obs, params, lif, v_t, i_t, T, choose="sample", uniform=uniform,
                                     rate=(ema_t, 0.01), **options)
        assert torch.equal(native_d.counts, torch_d.counts)
        torch.testing.assert_close(v, v_t, rtol=0, atol=1e-6)
        torch.testing.assert_close(native_d.logits, torch_d.logits, rtol=1e-5, atol=1e-5)
        assert_same_samples(native_d.actions, torch_d.actions, torch.softmax(torch_d.logits, 1), uniform)
        same = native_d.actions == torch_d.actions
        for key in options["keep"]:
            mine, theirs = native_d.outputs[key], torch_d.outputs[key]
            if key in ("hidden_post", "action_post"):  # depend on the action taken
                mine, theirs = mine[same], theirs[same]
            torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6, msg=key)
        torch.testing.assert_close(ema, ema_t, rtol=1e-5, atol=1e-7)
        assert native_d.obs_sum == pytest.approx(float(obs.sum()))
        assert native_d.spikes == pytest.approx(float(torch_d.spikes))
        assert native_d.logits_finite and torch_d.logits_finite
    assert int(native_d.counts.sum()) > 0 and float(ema.sum()) > 0


def test_a_silent_neurons_rate_is_stored_as_zero_below_the_smallest_normal_float():
    """A neuron silent for about 17k decisions would have its rate EMA decay into the float32
    subnormals, which slow every later decision; both paths store such a rate as 0 and keep every
    normal one exactly as before."""
    g = torch.Generator().manual_seed(5)
    B, H, T = 8, 6, 10
    lif = lif_constants(OrganismConfig())
    params = random_params(g, H=H)
    params["input_weight"][:, :4] = 0.0  # neurons 0-3 get no current: silent
    params["hidden_bias"][:4] = 0.0
    tiny = torch.finfo(torch.float32).tiny
    start = torch.tensor([4 * tiny, 2.5 * tiny, tiny, tiny / 4, 0.3, 0.3])  # 0-1 stay normal at alpha 0.5
    results = []
    for torch_only in (False, True):
        ema, v, i = start.clone(), torch.zeros(B, H), torch.zeros(B, H)
        with native.torch_only() if torch_only else contextlib.nullcontext():
            d = kernels.decide(sparse_observations(torch.Generator().manual_seed(6), B), params, lif, v, i, T,
                               rate=(ema, 0.5))
        assert int(d.counts[:, :4].sum()) == 0
        assert ema[0] == start[0] * 0.5 and ema[1] == start[1] * 0.5  # normal: kept exactly
        assert torch.equal(ema[2:4], torch.zeros(2))  # tiny/2 and tiny/8 are subnormal: stored as 0
        assert bool((ema[4:] > 0.1).all())
        results.append(ema)
    torch.testing.assert_close(results[0], results[1], rtol=1e-6, atol=0)


def test_a_kept_workspace_decides_as_a_fresh_one_whatever_tensors_change():
    """The C decision keeps prepared arguments in the workspace (raw pointers): every call must
    still use the tensors it is given. One workspace through new parameter tensors (growth,
    a load), a new LIF state, another batch size and back, and tensors that keep their identity
    but move their memory (``.data =``, ``set_``), against a fresh workspace each call."""
    g = torch.Generator().manual_seed(8)
    lif = lif_constants(OrganismConfig())
    stdp = kernels.STDPOptions(stdp_step_weights(0.8, 10, 0.5))
    kept = kernels.Workspace()
    params, H = random_params(g, H=70), 70
    states = {B: (torch.zeros(B, H), torch.zeros(B, H)) for B in (6, 9)}
    ema = torch.zeros(H)
    for step, B in enumerate((6, 6, 9, 6, 9, 9, 6)):
        if step in (2, 5):  # new parameter tensors of other values (as after a load)
            params = random_params(g, H=H)
        if step == 4:  # a new LIF state of the same shape (as after reset_state)
            states[9] = (torch.rand(9, H, generator=g) * 0.5, torch.zeros(9, H))
        if step == 1:  # the same tensor objects, their memory elsewhere (the old memory freed)
            params["input_weight"].data = torch.randn(450, H, generator=g) * 0.1
            states[6][0].set_(torch.rand(6, H, generator=g) * 0.5)
            scribble = [torch.full((450, H), 1e6) for _ in range(8)]  # noqa: F841 (reuses freed memory)
        v, i = states[B]
        fresh_v, fresh_i, fresh_ema = v.clone(), i.clone(), ema.clone()
        obs, uniform = sparse_observations(g, B), torch.rand(B, generator=g)
        options = dict(choose="sample", uniform=uniform, keep=("obs", "hidden_post", "action_post"), stdp=stdp)
        mine = kernels.decide(obs, params, lif, v, i, 10, rate=(ema, 0.05), workspace=kept, **options)
        theirs = kernels.decide(obs, params, lif, fresh_v, fresh_i, 10, rate=(fresh_ema, 0.05), **options)
        assert torch.equal(mine.counts, theirs.counts) and torch.equal(mine.logits, theirs.logits), step
        assert torch.equal(mine.actions, theirs.actions), step
        assert all(torch.equal(mine.outputs[k], theirs.outputs[k]) for k in options["keep"]), step
        assert torch.equal(v, fresh_v) and torch.equal(i, fresh_i) and torch.equal(ema, fresh_ema), step
        greedy = kernels.decide(obs, params, lif, v.clone(), i.clone(), 10, workspace=kept)
        assert torch.equal(greedy.actions, kernels.decide(obs, params, lif, v.clone(), i.clone(), 10).actions)
    assert len(kept.plans) <= kernels.Workspace.MAX_PLANS
    with pytest.raises(ValueError, match="input_weight must be a contiguous float32 tensor of shape"):
        kernels.decide(sparse_observations(g, 6, N=449), params, lif, *states[6], 10, workspace=kept)
    with pytest.raises(ValueError, match="v must be a contiguous float32 tensor of shape"):
        kernels.decide(sparse_observations(g, 6), params, lif, torch.zeros(6, H + 1), torch.zeros(6, H), 10)


def test_slot_decisions_decide_as_decide_and_serve_only_what_they_were_made_for():
    """``kernels.SlotDecisions``: decisions into slot after slot of (L, ...) buffers through the
    kept arguments are decide's own decisions into those slots; they are made only from a C
    decision that wrote into a slot of the buffers with sampling, and serve only the plan's
    tensors, rate alpha and observation shape and type."""
    assert kernels.library() is not None, "GSNN_NATIVE=1: the C kernels must build"
    g = torch.Generator().manual_seed(3)
    lif = lif_constants(OrganismConfig())
    params, B, H, L = random_params(g, H=96), 5, 96, 4
    names = {"logits": ((B, 4), torch.float32), "actions": ((B,), torch.int64), "spikes": ((B, H), torch.int16),
             "action_post": ((B, 4), torch.float32), "inputs": ((B * 450,), torch.int32),
             "input_values": ((B * 450,), torch.float32), "input_counts": ((B,), torch.int32)}
    runs = {}
    for way in ("slots", "decide"):
        ws, v, i, ema = kernels.Workspace(), torch.zeros(B, H), torch.zeros(B, H), torch.zeros(H)
        buffers = {name: torch.zeros((L, *shape), dtype=dtype) for name, (shape, dtype) in names.items()}
        stream, kept = torch.Generator().manual_seed(5), None
        for slot in range(L):
            obs, uniform = sparse_observations(stream, B), torch.rand(B, generator=stream)
            args = None if kept is None else kept.prepare(slot, obs, params, lif, v, i, (ema, 0.01), None)
            if args is not None:
                kept.run(args, obs, uniform)
                continue
            kernels.decide(obs, params, lif, v, i, 10, choose="sample", uniform=uniform,
                           keep=("inputs", "spikes", "action_post"), rate=(ema, 0.01), workspace=ws,
                           out={name: buffer[slot] for name, buffer in buffers.items()})
            if way == "slots":
                kept = kernels.SlotDecisions.of_last_call(ws, buffers, slot, 0.01)
                assert kept is not None and kept.matches(ws, buffers, slot, 0.01)
                assert not kept.matches(ws, buffers, slot, 0.02) and not kept.matches(ws, dict(buffers), slot + 1, 0.01)
        runs[way] = (buffers, v.clone(), i.clone(), ema.clone())
        if way == "slots":  # then what they do not serve
            obs = sparse_observations(stream, B)
            assert kept.prepare(1, obs, params, lif, v, i, (ema, 0.01), None) is not None
            assert kept.prepare(L, obs, params, lif, v, i, (ema, 0.01), None) is None  # beyond the buffers
            assert kept.prepare(1, obs, params, lif, v, i, (ema, 0.02), None) is None  # another rate alpha
            assert kept.prepare(1, obs, params, lif, v.clone(), i, (ema, 0.01), None) is None  # another LIF state
            assert kept.prepare(1, obs[:4], params, lif, v, i, (ema, 0.01), None) is None  # another batch
            assert kept.prepare(1, obs.double(), params, lif, v, i, (ema, 0.01), None) is None
            assert kept.prepare(1, obs.t().contiguous().t(), params, lif, v, i, (ema, 0.01), None) is None
            with pytest.raises(ValueError, match="uniform must be 5 contiguous float32 numbers"):
                kept.run(kept.prepare(1, obs, params, lif, v, i, (ema, 0.01), None), obs, torch.rand(4))
            kernels.decide(obs, params, lif, v, i, 10, workspace=ws)  # greedy: no sampling, nothing kept
            assert kernels.SlotDecisions.of_last_call(ws, buffers, 0, None) is None
            kernels.decide(obs, params, lif, v, i, 10, choose="sample", uniform=uniform, workspace=ws)
            assert kernels.SlotDecisions.of_last_call(ws, buffers, 0, None) is None  # outputs not in the buffers
    (slots, *state), (general, *general_state) = runs["slots"], runs["decide"]
    assert all(torch.equal(a, b) for a, b in zip(state, general_state))
    assert all(torch.equal(slots[name], general[name]) for name in names)


def test_the_one_call_rstdp_update_refuses_a_record_that_is_not_one_and_changes_nothing():
    """``kernels.rstdp_update`` writes through raw pointers: a tensor of the wrong shape or type is
    refused by name, and a record the C code finds out of range is refused before any step."""
    assert kernels.library() is not None, "GSNN_NATIVE=1: the C kernels must build"
    g = torch.Generator().manual_seed(4)
    L, B, N, H, A, T = 2, 3, 450, 64, 4, 10
    params = random_params(g, N=N, H=H, A=A)
    zeros = {name: torch.zeros_like(p) for name, p in params.items()}
    record = kernels.ActiveInputs(torch.zeros(L, B * N, dtype=torch.int32), torch.ones(L, B * N),
                                  torch.full((L, B), 2, dtype=torch.int32))
    args = dict(record=record, spikes=torch.randint(0, 1024, (L, B, H), generator=g, dtype=torch.int16),
                action_post=torch.randn(L, B, A, generator=g), rewards=torch.rand(L, B, generator=g), dones=torch.zeros(L, B, dtype=torch.bool), discount=0.9,
                step_weights=stdp_step_weights(0.8, T, 0.5), params=params, exp_avg=zeros,
                exp_avg_sq={k: v.clone() for k, v in zeros.items()}, grad_clip=1.0, adam=(0.9, 0.999, 1e-3, 1e-3, 1e-8))
    before = {k: v.clone() for k, v in params.items()}
    with pytest.raises(ValueError, match=r"rstdp_update: spikes must be a contiguous torch.int16 CPU tensor of shape \(2, 3, 64\)"):
        kernels.rstdp_update(**dict(args, spikes=torch.zeros(L, B, H + 1, dtype=torch.int16)))
    with pytest.raises(ValueError, match=r"rstdp_update: rewards must be a contiguous torch.float32"):
        kernels.rstdp_update(**dict(args, rewards=torch.ones(B, L).t()))
    with pytest.raises(ValueError, match=r"adam_step: the gradient's shape \(64,\) is not the parameter's \(65,\)"):
        kernels.adam_step(torch.zeros(65), torch.zeros(64), torch.zeros(65), torch.zeros(65), 1.0, 0.9, 0.999,
                          1e-3, 1e-3, 1e-8)
    record.counts[1, 2] = N + 1  # a count beyond the observation's inputs
    with pytest.raises(ValueError, match="an argument out of its range"):
        kernels.rstdp_update(**args)
    assert all(torch.equal(before[k], params[k]) for k in params) and not any(v.any() for v in zeros.values())
    record.counts[1, 2] = 2
    assert kernels.rstdp_update(**args).stepped
    assert all(not torch.equal(before[k], params[k]) for k in params)


def test_decide_refuses_an_unknown_output_to_keep(backend):
    g = torch.Generator().manual_seed(8)
    with pytest.raises(ValueError, match="keep names one of obs, x, v0, i0, hidden_post, action_post, spikes, inputs, got 'counts'"):
        kernels.decide(sparse_observations(g, 4), random_params(g, H=64), lif_constants(OrganismConfig()),
                       torch.zeros(4, 64), torch.zeros(4, 64), 10, keep=("obs", "counts"))


def test_greedy_decide_takes_the_first_largest_logit(backend):
    g = torch.Generator().manual_seed(8)
    params = random_params(g, H=64)
    params["readout_bias"] = torch.tensor([0.0, 5.0, 5.0, -1.0])  # a tie between 1 and 2 when counts are 0
    params["readout_weight"][:, :] = 0.0
    params["readout_weight"][:32, 3] = 1.0
    obs = sparse_observations(g, 8)
    decision = kernels.decide(obs, params, lif_constants(OrganismConfig()), torch.zeros(8, 64), torch.zeros(8, 64),
                              10, choose="greedy")
    assert torch.equal(decision.actions, decision.logits.argmax(dim=1))
    assert set(decision.actions.tolist()) <= {1, 3}


def test_non_finite_observation_is_refused_before_the_state_changes(backend):
    lif = lif_constants(OrganismConfig())
    obs = torch.zeros(3, 450)
    obs[1, 40] = float("inf")
    v, i = torch.rand(3, 8), torch.rand(3, 8)
    before = v.clone(), i.clone()
    with pytest.raises(kernels.NonFiniteObservation):
        kernels.decide(obs, random_params(torch.Generator().manual_seed(0), H=8), lif, v, i, 10)
    assert torch.equal(v, before[0]) and torch.equal(i, before[1])


def test_rstdp_directions_native_equal_torch():
    g = torch.Generator().manual_seed(4)
    R, H, A = 40, 100, 4
    obs, w = sparse_observations(g, R), torch.randn(R, generator=g)
    hidden_post, counts = torch.randn(R, H, generator=g), torch.randint(0, 5, (R, H), generator=g).float()
    action_post = torch.randn(R, A, generator=g)
    native_out = kernels.rstdp_directions(obs, hidden_post, counts, action_post, w, -1.0 / R)
    with native.torch_only():
        torch_out = kernels.rstdp_directions(obs, hidden_post, counts, action_post, w, -1.0 / R)
    reference = {"input_weight": obs.T @ (hidden_post * w[:, None]), "hidden_bias": w @ hidden_post,
                 "readout_weight": counts.T @ (action_post * w[:, None]), "readout_bias": w @ action_post}
    for name, value in reference.items():
        torch.testing.assert_close(native_out[name], value * (-1.0 / R), rtol=1e-4, atol=1e-5, msg=name)
        torch.testing.assert_close(torch_out[name], value * (-1.0 / R), rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("H", [200, 64])  # with a partial block of neurons, and one full block
def test_rstdp_directions_from_spike_bits_equal_those_from_post_factors(backend, H):
    """R-STDP's record as spike bits (1 int16 per neuron) instead of post factors and counts (2
    floats), and as the active inputs instead of the observation: the same decisions, and from
    the record the same directions, bit for bit on the C path (within rounding on the torch twin,
    whose matrix products sum in another order)."""
    g = torch.Generator().manual_seed(12)
    B, T, L, N = 24, 10, 12, 450  # 288 decisions: a full chunk of the C update and part of another
    lif, params = lif_constants(OrganismConfig()), random_params(g, H=H)
    params["input_weight"] *= 4.0  # lively: most neurons fire at some steps
    weights = stdp_step_weights(0.8, T, 0.5)
    v, i = torch.zeros(B, H), torch.zeros(B, H)
    record = {name: [] for name in ("obs", "hidden_post", "counts", "action_post", "spikes")}
    # the active inputs written in place into a rollout's slots, as the organism keeps them
    inputs = kernels.ActiveInputs(torch.full((L, B * N), -7, dtype=torch.int32), torch.full((L, B * N), 9.0),
                                  torch.full((L, B), -7, dtype=torch.int32))
    for step in range(L):
        obs, uniform = sparse_observations(g, B), torch.rand(B, generator=g)
        v_bits, i_bits = v.clone(), i.clone()
        floats = kernels.decide(obs, params, lif, v, i, T, choose="sample", uniform=uniform,
                                keep=("obs", "hidden_post", "action_post"), stdp=kernels.STDPOptions(weights))
        slot = {"inputs": inputs.inputs[step], "input_values": inputs.values[step], "input_counts": inputs.counts[step]}
        bits = kernels.decide(obs, params, lif, v_bits, i_bits, T, choose="sample", uniform=uniform,
                              keep=("inputs", "spikes", "action_post"), out=slot)
        assert bits.outputs["inputs"] is slot["inputs"]
        assert torch.equal(v, v_bits) and torch.equal(i, i_bits) and torch.equal(floats.actions, bits.actions)
        assert torch.equal(floats.outputs["action_post"], bits.outputs["action_post"])
        assert bits.outputs["spikes"].dtype == torch.int16
        counts, _ = kernels.spike_factors(bits.outputs["spikes"], weights)
        assert torch.equal(counts, floats.counts)
        for name in ("obs", "hidden_post", "action_post"):
            record[name].append(floats.outputs[name].clone())
        record["counts"].append(floats.counts.clone())
        record["spikes"].append(bits.outputs["spikes"].clone())
    rows = {name: torch.cat(values) for name, values in record.items()}
    assert bool((rows["spikes"] != 0).any()) and bool((rows["spikes"] != rows["spikes"][:, :1]).any())
    w, scale = torch.randn(B * L, generator=g), -1.0 / (B * L)
    expected = kernels.rstdp_directions(rows["obs"], rows["hidden_post"], rows["counts"], rows["action_post"], w,
                                        scale)
    assert torch.equal(inputs.dense(N), rows["obs"])  # the record is the observations, exactly
    assert int(inputs.counts[:, 0].max()) == 0 and bool((inputs.values[:, :40] == 0.5).any())
    for source in (rows["obs"], inputs):
        rebuilt = kernels.rstdp_directions_from_spikes(source, rows["spikes"], rows["action_post"],
                                                       params["readout_weight"], weights, w, scale)
        for name, value in expected.items():
            if backend == "native":
                assert torch.equal(rebuilt[name], value), name
            else:
                torch.testing.assert_close(rebuilt[name], value, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("B", [1, 300])  # one world; two chunks of the C decision's rows
def test_decide_keeps_the_active_inputs_world_after_world(backend, B):
    g = torch.Generator().manual_seed(14)
    obs = sparse_observations(g, B)
    decision = kernels.decide(obs, random_params(g, H=64), lif_constants(OrganismConfig()), torch.zeros(B, 64),
                              torch.zeros(B, 64), 10, keep=("inputs",))
    kept = decision.outputs
    assert set(kept) == {"inputs", "input_values", "input_counts"}
    rows, cols = torch.nonzero(obs, as_tuple=True)
    assert torch.equal(kept["input_counts"], torch.bincount(rows, minlength=B).int())
    assert torch.equal(kept["inputs"][: cols.numel()], cols.int())
    assert torch.equal(kept["input_values"][: cols.numel()], obs[rows, cols])
    with pytest.raises(ValueError, match="out\\['input_counts'\\] must be a contiguous torch.int32 tensor of at least"):
        kernels.decide(obs, random_params(g, H=64), lif_constants(OrganismConfig()), torch.zeros(B, 64),
                       torch.zeros(B, 64), 10, keep=("inputs",), out={"input_counts": torch.zeros(B, dtype=torch.int64)})


def test_rstdp_directions_refuse_a_record_that_is_not_one():
    """Counts and indices of an active-input record index the update's arrays: out-of-range ones
    are refused (ValueError), never read or written beyond them."""
    g = torch.Generator().manual_seed(15)
    L, B, N, H, T = 2, 3, 450, 64, 4
    obs = sparse_observations(g, L * B)
    rows, cols = torch.nonzero(obs, as_tuple=True)
    per_world = torch.bincount(rows, minlength=L * B).int().reshape(L, B)

    def record():
        inputs, values = torch.zeros(L, B * N, dtype=torch.int32), torch.zeros(L, B * N)
        for slot in range(L):
            mine = rows // B == slot
            inputs[slot, : int(mine.sum())], values[slot, : int(mine.sum())] = cols[mine].int(), obs[rows, cols][mine]
        return kernels.ActiveInputs(inputs, values, per_world.clone())

    args = (torch.zeros(L * B, H, dtype=torch.int16), torch.randn(L * B, 4, generator=g), torch.randn(H, 4, generator=g),
            stdp_step_weights(0.8, T, 0.5), torch.randn(L * B, generator=g), -1.0 / (L * B))
    good = kernels.rstdp_directions_from_spikes(record(), *args)
    assert torch.equal(good["input_weight"], kernels.rstdp_directions_from_spikes(obs, *args)["input_weight"])
    too_many, beyond = record(), record()
    too_many.counts[1, 2] = N + 1
    beyond.inputs[0, 0] = N
    for bad in (too_many, beyond):
        with pytest.raises(ValueError, match="out of its range"):
            kernels.rstdp_directions_from_spikes(bad, *args)


def test_spike_bits_beyond_the_steps_are_ignored_not_read_beyond_the_table(backend):
    """The update looks a neuron's spikes up as their low T bits: an int16 with higher bits (not
    a record of T steps) never reads outside the 2^T-entry table."""
    g = torch.Generator().manual_seed(6)
    R, H, T = 20, 70, 3
    obs, action_post = sparse_observations(g, R), torch.randn(R, 4, generator=g)
    low = torch.randint(0, 2**T, (R, H), generator=g).to(torch.int16)
    high = low | torch.tensor(-32768 | 0x7FF8, dtype=torch.int16)  # every bit above the T steps set
    args = (action_post, torch.randn(H, 4, generator=g), stdp_step_weights(0.8, T, 0.5), torch.randn(R, generator=g),
            -1.0 / R)
    clean = kernels.rstdp_directions_from_spikes(obs, low, *args)
    noisy = kernels.rstdp_directions_from_spikes(obs, high, *args)
    for name in clean:
        assert torch.equal(clean[name], noisy[name]), name


def test_spike_bits_need_at_most_fifteen_steps():
    g = torch.Generator().manual_seed(2)
    with pytest.raises(ValueError, match="spikes \\(as bits\\) needs 1 to 15 steps, got 16"):
        kernels.decide(sparse_observations(g, 4), random_params(g, H=8), lif_constants(OrganismConfig()),
                       torch.zeros(4, 8), torch.zeros(4, 8), 16, choose="sample", uniform=torch.rand(4),
                       keep=("spikes",))


@pytest.mark.parametrize("R", [7, 256, 600])  # one chunk of rows, exactly one, three (the last partial)
def test_native_rstdp_input_directions_are_the_row_ordered_sum_bit_for_bit(R):
    """The C kernel sums dW input by input over chunks of rows; each element must be the same
    float32 sum as row by row in increasing order, 0 + (sum_r (w_r obs_rk) g_r) * scale, for
    full and partial blocks of neurons, inputs active in one chunk or several, and inputs never
    active (exact zeros); the bias and readout directions likewise."""
    g = torch.Generator().manual_seed(21)
    N, H, A = 450, 200, 4  # three blocks of 64 neurons and one of 8
    obs = sparse_observations(g, R)
    obs[:, 5] = 0.0  # never active
    obs[:, 3] = 0.0
    obs[R - 1, 3] = 1.0 if R > 300 else 0.0  # active only in the last chunk's last row
    w, hidden_post = torch.randn(R, generator=g), torch.randn(R, H, generator=g)
    counts, action_post = torch.randint(0, 5, (R, H), generator=g).float(), torch.randn(R, A, generator=g)
    scale = -1.0 / R
    out = kernels.rstdp_directions(obs, hidden_post, counts, action_post, w, scale)
    acc = torch.zeros(N, H)
    for r in range(R):
        active = torch.nonzero(obs[r]).flatten()
        acc[active] = acc[active] + (w[r] * obs[r, active]).unsqueeze(1) * hidden_post[r]
    expected = torch.zeros(N, H) + acc * torch.tensor(scale, dtype=torch.float32)
    assert torch.equal(out["input_weight"], expected)
    # the bias and readout directions too: each the row-ordered sum of w_r times the row, scaled
    bias, readout, readout_bias = torch.zeros(H), torch.zeros(H, A), torch.zeros(A)
    for r in range(R):
        bias = bias + w[r] * hidden_post[r]
        readout = readout + counts[r].unsqueeze(1) * (w[r] * action_post[r]).unsqueeze(0)
        readout_bias = readout_bias + w[r] * action_post[r]
    scale32 = torch.tensor(scale, dtype=torch.float32)
    assert torch.equal(out["hidden_bias"], bias * scale32)
    assert torch.equal(out["readout_weight"], readout * scale32)
    assert torch.equal(out["readout_bias"], readout_bias * scale32)
    untouched = (obs == 0).all(dim=0)
    assert bool(untouched[5]) and bool(untouched[3]) == (R <= 300)
    assert torch.equal(out["input_weight"][untouched], torch.zeros(int(untouched.sum()), H))


@pytest.mark.parametrize("v_leak, v_reset", PARAMETER_SETS)
def test_reinforce_gradients_equal_autograd_of_the_loss_through_norse(backend, v_leak, v_reset):
    """The written-out gradient (policy logits, readout, T surrogate steps per decision, sparse
    input weights) against autograd through the dense input current, Norse's steps, the readout
    and ``reinforce_loss``, over a rollout that carries LIF state from decision to decision."""
    config = OrganismConfig(v_leak=v_leak, v_reset=v_reset)
    p, lif, T = lif_parameters(config), lif_constants(config), config.snn_steps
    g = torch.Generator().manual_seed(5)
    L, B, N, H, A = 5, 6, 450, 100, 4  # H not a multiple of the C backward's block of 64
    params = {"input_weight": torch.randn(N, H, generator=g) * 0.2, "hidden_bias": torch.full((H,), 0.15),
              "readout_weight": torch.randn(H, A, generator=g) * 0.3, "readout_bias": torch.randn(A, generator=g)}
    observations = torch.stack([sparse_observations(g, B) for _ in range(L)])
    actions = torch.randint(0, A, (L, B), generator=g)
    adv = torch.randn(L, B, generator=g)

    # Reference: autograd, the state detached between decisions.
    leaves = {k: t.clone().requires_grad_() for k, t in params.items()}
    state = LIFFeedForwardState(torch.zeros(B, H), torch.zeros(B, H))
    log_probs, entropies = [], []
    for step in range(L):
        x = observations[step] @ leaves["input_weight"] + leaves["hidden_bias"]
        counts, state = lif_decision_reference(x, state, p, T, config.dt)
        state = LIFFeedForwardState(state.v.detach(), state.i.detach())
        logp = torch.log_softmax(counts @ leaves["readout_weight"] + leaves["readout_bias"], dim=1)
        log_probs.append(logp.gather(1, actions[step].unsqueeze(1)).squeeze(1))
        entropies.append(-(logp.exp() * logp).sum(1))
    plasticity.reinforce_loss(torch.stack(log_probs), torch.stack(entropies), adv, config.entropy_coef).backward()

    # Written out, from what learn_act records.
    v, i = torch.zeros(B, H), torch.zeros(B, H)
    record = {key: [] for key in ("v0", "i0", "logits", "counts")}
    for step in range(L):
        d = kernels.decide(observations[step], params, lif, v, i, T, choose=None, keep=("v0", "i0"))
        for key in record:
            record[key].append((d.outputs[key] if key in d.outputs else getattr(d, key)).clone())
    stacked = {key: torch.stack(values) for key, values in record.items()}
    grads = plasticity.reinforce_gradients(observations, stacked["v0"], stacked["i0"], stacked["logits"], actions,
                                           adv, config.entropy_coef, params, lif, T)
    for name, leaf in leaves.items():
        torch.testing.assert_close(grads[name], leaf.grad, rtol=1e-4, atol=1e-6, msg=name)
        assert leaf.grad.abs().sum() > 0, name
    assert int(stacked["counts"].sum()) > 100  # the surrogate saw spiking neurons


def test_adam_equals_torch_optim_adam_bit_for_bit_on_the_torch_path():
    g = torch.Generator().manual_seed(6)
    start = {"a": torch.randn(5, 3, generator=g), "b": torch.randn(4, generator=g)}
    ours = Adam({k: t.clone() for k, t in start.items()}, lr=3e-3)
    theirs = {k: torch.nn.Parameter(t.clone()) for k, t in start.items()}
    reference = torch.optim.Adam(theirs.values(), lr=3e-3)
    for _ in range(5):
        grads = {k: torch.randn(t.shape, generator=g) for k, t in start.items()}
        with native.torch_only():
            ours.step({k: v.clone() for k, v in grads.items()})
        for k, param in theirs.items():
            param.grad = grads[k].clone()
        reference.step()
    for k, param in theirs.items():
        assert torch.equal(ours.params[k], param.detach()), k
        assert torch.equal(ours.exp_avg[k], reference.state[param]["exp_avg"]), k
        assert torch.equal(ours.exp_avg_sq[k], reference.state[param]["exp_avg_sq"]), k


def test_adam_stores_no_subnormal_moments_and_keeps_torchs_weights():
    """A weight whose gradient stays zero: torch's first moment decays into the subnormals and
    sticks there (every later step on it is slow on a CPU); ours becomes zero, with the same
    weights on both paths."""
    tiny = torch.finfo(torch.float32).tiny
    subnormal = lambda t: int(((t != 0) & (t.abs() < tiny)).sum())  # noqa: E731
    g = torch.Generator().manual_seed(8)
    start = {"a": torch.randn(40, 9, generator=g)}
    first = torch.randn(40, 9, generator=g)
    reference_param = torch.nn.Parameter(start["a"].clone())
    reference = torch.optim.Adam([reference_param], lr=3e-3)
    for path in ("native", "torch"):
        ours = Adam({"a": start["a"].clone()}, lr=3e-3)
        context = native.torch_only() if path == "torch" else contextlib.nullcontext()
        with context:
            for step in range(1000):
                ours.step({"a": first.clone() if step == 0 else torch.zeros(40, 9)})
        assert subnormal(ours.exp_avg["a"]) == 0 and subnormal(ours.exp_avg_sq["a"]) == 0, path
        assert int((ours.exp_avg["a"] == 0).sum()) == 360, path
        if path == "native":
            for step in range(1000):
                reference_param.grad = first.clone() if step == 0 else torch.zeros(40, 9)
                reference.step()
            assert subnormal(reference.state[reference_param]["exp_avg"]) > 0  # the case this test is about
            torch.testing.assert_close(ours.params["a"], reference_param.detach(), rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(ours.params["a"], reference_param.detach())


def _run_fresh(code: str, env_overrides: dict, tmp_path) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, "GSNN_CACHE_DIR": str(tmp_path / "cache"), **env_overrides}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_build_is_cached_and_fallback_is_explicit(tmp_path):
    probe = ("import warnings; warnings.simplefilter('always'); from gsnn import kernels; "
             "print('native' if kernels.library() is not None else 'torch')")
    built = _run_fresh(probe, {"GSNN_NATIVE": "1"}, tmp_path)
    assert built.returncode == 0 and built.stdout.strip() == "native", built.stderr
    (library,) = (tmp_path / "cache").glob("kernels-*.so")
    stamp = library.stat().st_mtime_ns
    again = _run_fresh(probe, {"GSNN_NATIVE": "1"}, tmp_path)
    assert again.stdout.strip() == "native" and library.stat().st_mtime_ns == stamp  # loaded, not rebuilt
    broken = {"CC": str(tmp_path / "no-such-compiler"), "PATH": str(tmp_path), "GSNN_CACHE_DIR": str(tmp_path / "empty")}
    fallback = _run_fresh(probe, {**broken, "GSNN_NATIVE": "auto"}, tmp_path)
    assert fallback.stdout.strip() == "torch" and "using the slower torch path" in fallback.stderr
    required = _run_fresh(probe, {**broken, "GSNN_NATIVE": "1"}, tmp_path)
    assert required.returncode != 0 and "GSNN_NATIVE=1" in required.stderr
    off = _run_fresh(probe, {"GSNN_NATIVE": "0"}, tmp_path)
    assert off.stdout.strip() == "torch" and "slower" not in off.stderr


def test_native_adam_equals_torch_optim_adam_within_rounding():
    g = torch.Generator().manual_seed(7)
    start = {"a": torch.randn(300, 7, generator=g), "b": torch.randn(13, generator=g)}
    ours = Adam({k: t.clone() for k, t in start.items()}, lr=3e-3)
    theirs = {k: torch.nn.Parameter(t.clone()) for k, t in start.items()}
    reference = torch.optim.Adam(theirs.values(), lr=3e-3)
    for _ in range(6):
        grads = {k: torch.randn(t.shape, generator=g) for k, t in start.items()}
        assert ours.step({k: v.clone() for k, v in grads.items()}, scale=0.5)
        for k, param in theirs.items():
            param.grad = grads[k] * 0.5
        reference.step()
    for k, param in theirs.items():
        torch.testing.assert_close(ours.params[k], param.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.exp_avg_sq[k], reference.state[param]["exp_avg_sq"], rtol=1e-4, atol=1e-7)
    ours.params["b"][3] = float("inf")
    assert not ours.step({"b": torch.ones(13)})  # a non-finite parameter is reported


def test_advantages_native_equal_torch():
    g = torch.Generator().manual_seed(9)
    for B in (1, 7):
        rewards = torch.randn(16, B, generator=g)
        dones = torch.rand(16, B, generator=g) < 0.1
        native_adv = kernels.advantages(rewards, dones, 0.9)
        reference = plasticity.advantages(plasticity.discounted_returns(rewards, dones, 0.9))
        torch.testing.assert_close(native_adv, reference, rtol=1e-4, atol=1e-5)
        assert kernels.sum_squares([rewards, native_adv]) == pytest.approx(
            float(rewards.double().square().sum() + native_adv.double().square().sum()))
