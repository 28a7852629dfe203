"""The hot loops (gsnn.kernels): C and torch implementations against Norse's LIF step and autograd,
and against each other; the written-out REINFORCE gradient and Adam against torch's; the build."""

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


def identity_decision(x, v, i, lif, steps, **options):
    """``kernels.decide`` with input current exactly ``x`` (B, H): observations x against an
    identity weight and zero bias (every x is non-zero, and 1.0 * x + 0.0 rounds to x)."""
    H = x.shape[1]
    return kernels.decide(x, torch.eye(H), torch.zeros(H), lif, v, i, steps, **options)


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


def test_stdp_factors_match_a_step_by_step_trace_computation(backend):
    config = OrganismConfig()
    p, lif, T, decay = lif_parameters(config), lif_constants(config), config.snn_steps, 0.8
    g = torch.Generator().manual_seed(1)
    B, H = 4, 32
    x = torch.rand(B, H, generator=g) + 1e-3
    v, i = torch.zeros(B, H), torch.zeros(B, H)
    decision = identity_decision(x, v.clone(), i.clone(), lif, T, stdp_weights=stdp_step_weights(decay, T))
    # Brute force with explicit traces: pre spikes every step (pre trace), post trace from spikes.
    state = LIFFeedForwardState(v, i)
    pre_trace, post_trace = 0.0, torch.zeros(B, H)
    potentiation, depression = torch.zeros(B, H), torch.zeros(B, H)
    for _ in range(T):
        z, state = lif_feed_forward_step(x, state, p, config.dt)
        pre_trace = decay * pre_trace + 1.0
        depression += post_trace  # pre spike meets the post trace of earlier steps
        potentiation += pre_trace * z  # post spike meets the pre trace including this step
        post_trace = decay * post_trace + z
    torch.testing.assert_close(decision.potentiation, potentiation)
    torch.testing.assert_close(decision.depression, depression)
    assert potentiation.sum() > 0


def sparse_observations(generator, B, N=450, density=0.06):
    obs = (torch.rand(B, N, generator=generator) < density).float()
    obs[:, 7] = 0.5  # a value other than 1
    obs[0] = 0.0  # a world that sees nothing
    return obs


def test_decide_native_equals_torch_with_readout_and_learner_record():
    g = torch.Generator().manual_seed(3)
    B, N, H, A, T = 24, 450, 200, 4, 10
    lif = lif_constants(OrganismConfig())
    W, b = torch.randn(N, H, generator=g) * 0.1, torch.full((H,), 0.1)
    W_out, b_out = torch.randn(H, A, generator=g) * 0.1, torch.randn(A, generator=g)
    v, i = torch.zeros(B, H), torch.zeros(B, H)
    v_t, i_t = v.clone(), i.clone()
    for _ in range(6):
        obs = sparse_observations(g, B)
        options = dict(readout=(W_out, b_out), greedy=True, keep_inputs=True)
        native_d = kernels.decide(obs, W, b, lif, v, i, T, **options)
        with native.torch_only():
            torch_d = kernels.decide(obs, W, b, lif, v_t, i_t, T, **options)
        torch.testing.assert_close(native_d.x, torch_d.x, rtol=1e-6, atol=1e-6)
        for key in ("v0", "i0", "counts"):
            assert torch.equal(getattr(native_d, key), getattr(torch_d, key)), key
        torch.testing.assert_close(v, v_t, rtol=0, atol=1e-6)
        torch.testing.assert_close(native_d.logits, torch_d.logits, rtol=1e-5, atol=1e-5)
        assert torch.equal(native_d.actions, native_d.logits.argmax(dim=1))
        assert native_d.obs_sum == pytest.approx(float(obs.sum()))
        assert native_d.spikes == pytest.approx(float(torch_d.spikes))
        assert native_d.logits_finite and torch_d.logits_finite
    assert int(native_d.counts.sum()) > 0


def test_non_finite_observation_is_refused_before_the_state_changes(backend):
    lif = lif_constants(OrganismConfig())
    obs = torch.zeros(3, 450)
    obs[1, 40] = float("inf")
    v, i = torch.rand(3, 8), torch.rand(3, 8)
    before = v.clone(), i.clone()
    with pytest.raises(kernels.NonFiniteObservation):
        kernels.decide(obs, torch.randn(450, 8), torch.zeros(8), lif, v, i, 10)
    assert torch.equal(v, before[0]) and torch.equal(i, before[1])


@pytest.mark.parametrize("v_leak, v_reset", PARAMETER_SETS)
def test_surrogate_backward_equals_autograd_through_norse(backend, v_leak, v_reset):
    config = OrganismConfig(v_leak=v_leak, v_reset=v_reset)
    p, lif, T = lif_parameters(config), lif_constants(config), config.snn_steps
    g = torch.Generator().manual_seed(2)
    B, H = 8, 100  # H not a multiple of the C kernel's block of 64
    v, i = torch.zeros(B, H), torch.zeros(B, H)
    spikes = 0
    for _ in range(8):
        x = torch.rand(B, H, generator=g) * 0.6
        upstream = torch.randn(B, H, generator=g)
        x_ref = x.clone().requires_grad_()
        counts_ref, state = lif_decision_reference(x_ref, LIFFeedForwardState(v, i), p, T, config.dt)
        (counts_ref * upstream).sum().backward()
        gx = kernels.surrogate_backward(x, v, i, upstream, lif, T)
        torch.testing.assert_close(gx, x_ref.grad, rtol=1e-5, atol=1e-6)
        v, i = state.v.detach(), state.i.detach()
        spikes += int(counts_ref.sum())
    assert spikes > 500 and gx.abs().sum() > 0


def test_sparse_outer_equals_dense_product(backend):
    g = torch.Generator().manual_seed(4)
    obs, G = sparse_observations(g, 40), torch.randn(40, 70, generator=g)
    out = kernels.sparse_outer(obs, G)
    torch.testing.assert_close(out, obs.T @ G, rtol=1e-5, atol=1e-5)


def test_reinforce_gradients_equal_autograd_of_the_loss_through_norse(backend):
    """The written-out gradient (policy logits, readout, T surrogate steps per decision, sparse
    input weights) against autograd through the dense input current, Norse's steps, the readout
    and ``reinforce_loss``, over a rollout that carries LIF state from decision to decision."""
    config = OrganismConfig()
    p, lif, T = lif_parameters(config), lif_constants(config), config.snn_steps
    g = torch.Generator().manual_seed(5)
    L, B, N, H, A = 5, 6, 450, 48, 4
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
    record = {key: [] for key in ("x", "v0", "i0", "counts", "logits")}
    for step in range(L):
        d = kernels.decide(observations[step], params["input_weight"], params["hidden_bias"], lif, v, i, T,
                           readout=(params["readout_weight"], params["readout_bias"]), keep_inputs=True)
        for key in record:
            record[key].append(getattr(d, key))
    stacked = {key: torch.stack(values) for key, values in record.items()}
    grads = plasticity.reinforce_gradients(
        observations, stacked["x"], stacked["v0"], stacked["i0"], stacked["counts"], stacked["logits"], actions,
        adv, config.entropy_coef, params["readout_weight"], lif, T)
    for name, leaf in leaves.items():
        torch.testing.assert_close(grads[name], leaf.grad, rtol=1e-4, atol=1e-6, msg=name)
        assert leaf.grad.abs().sum() > 0, name


def test_adam_equals_torch_optim_adam():
    g = torch.Generator().manual_seed(6)
    start = {"a": torch.randn(5, 3, generator=g), "b": torch.randn(4, generator=g)}
    ours = Adam({k: t.clone() for k, t in start.items()}, lr=3e-3)
    theirs = {k: torch.nn.Parameter(t.clone()) for k, t in start.items()}
    reference = torch.optim.Adam(theirs.values(), lr=3e-3)
    for _ in range(5):
        grads = {k: torch.randn(t.shape, generator=g) for k, t in start.items()}
        ours.step({k: v.clone() for k, v in grads.items()})
        for k, param in theirs.items():
            param.grad = grads[k].clone()
        reference.step()
    for k, param in theirs.items():
        assert torch.equal(ours.params[k], param.detach()), k
        assert torch.equal(ours.exp_avg[k], reference.state[param]["exp_avg"]), k
        assert torch.equal(ours.exp_avg_sq[k], reference.state[param]["exp_avg_sq"]), k


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
