"""The fast LIF path against Norse's reference step, STDP factors, and the energy formula."""

import pytest
import torch
from norse.torch.functional.lif import LIFFeedForwardState, lif_feed_forward_step

from gsnn.config import OrganismConfig
from gsnn.energy import MAC_JOULES, SYNOP_JOULES, decision_energy
from gsnn.neurons import lif_decision_fast, lif_decision_reference, lif_decision_surrogate, lif_parameters


@pytest.mark.parametrize("v_leak, v_reset", [(0.0, 0.0), (-0.2, 0.0), (0.0, -0.1)])
def test_fast_path_equals_norse_reference_over_many_decisions(v_leak, v_reset):
    config = OrganismConfig(v_leak=v_leak, v_reset=v_reset)
    p = lif_parameters(config)
    g = torch.Generator().manual_seed(0)
    B, H, T = 16, 96, config.snn_steps
    v_ref = torch.zeros(B, H)
    i_ref = torch.zeros(B, H)
    v_fast, i_fast = v_ref.clone(), i_ref.clone()
    total_spikes = 0
    for _ in range(20):  # state carried from decision to decision
        x = torch.rand(B, H, generator=g) * 0.6
        counts_ref, state = lif_decision_reference(x, LIFFeedForwardState(v_ref, i_ref), p, T, config.dt)
        v_ref, i_ref = state.v, state.i
        counts_fast, _ = lif_decision_fast(x, v_fast, i_fast, p, T, config.dt)
        assert torch.equal(counts_fast, counts_ref)
        if v_leak == 0.0 and v_reset == 0.0:  # the default parameters: bit-identical
            assert torch.equal(v_fast, v_ref) and torch.equal(i_fast, i_ref)
        torch.testing.assert_close(v_fast, v_ref, rtol=0, atol=1e-6)
        torch.testing.assert_close(i_fast, i_ref, rtol=0, atol=1e-6)
        total_spikes += int(counts_ref.sum())
    assert total_spikes > 1000  # the comparison covered spiking, not a silent layer


def test_stdp_factors_match_a_step_by_step_trace_computation():
    config = OrganismConfig()
    p = lif_parameters(config)
    g = torch.Generator().manual_seed(1)
    B, H, T, decay = 4, 32, config.snn_steps, 0.8
    x = torch.rand(B, H, generator=g)
    v, i = torch.zeros(B, H), torch.zeros(B, H)
    _, factors = lif_decision_fast(x, v.clone(), i.clone(), p, T, config.dt, trace_decay=decay)
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
    torch.testing.assert_close(factors.potentiation, potentiation)
    torch.testing.assert_close(factors.depression, depression)
    assert potentiation.sum() > 0


def test_decision_energy_hand_computed():
    # 12 active inputs, 30 hidden spikes, 100 hidden neurons, 450 inputs, 4 actions, T = 10.
    e = decision_energy(12, 30, 100, 450, 4, 10)
    assert e.synops_per_decision == 12 * 10 * 100 + 30 * 4  # 12120
    assert e.energy_per_decision_joules == pytest.approx(12120 * 0.9e-12)
    assert e.dense_ann_macs_per_decision == 450 * 100 + 100 * 4  # 45400
    assert e.dense_ann_energy_per_decision_joules == pytest.approx(45400 * 4.6e-12)
    assert e.sparse_ann_macs_per_decision == 12 * 100 + 100 * 4  # 1600
    assert e.sparse_ann_energy_per_decision_joules == pytest.approx(1600 * 4.6e-12)
    assert SYNOP_JOULES == 0.9e-12 and MAC_JOULES == 4.6e-12
    silent = decision_energy(0, 0, 64, 450, 4, 10)
    assert silent.synops_per_decision == 0 and silent.energy_per_decision_joules == 0


@pytest.mark.parametrize("v_leak, v_reset", [(0.0, 0.0), (-0.2, 0.0), (0.0, -0.1)])
def test_surrogate_path_matches_autograd_through_norse(v_leak, v_reset):
    """Counts, state and the input gradient of the one-node surrogate decision equal Norse's
    steps under autograd, over decisions that carry state."""
    config = OrganismConfig(v_leak=v_leak, v_reset=v_reset)
    p = lif_parameters(config)
    g = torch.Generator().manual_seed(2)
    B, H, T = 8, 64, config.snn_steps
    v_ref, i_ref = torch.zeros(B, H), torch.zeros(B, H)
    v, i = v_ref.clone(), i_ref.clone()
    spikes = 0
    for _ in range(8):
        x_data = torch.rand(B, H, generator=g) * 0.6
        upstream = torch.randn(B, H, generator=g)
        x_ref = x_data.clone().requires_grad_()
        counts_ref, state = lif_decision_reference(x_ref, LIFFeedForwardState(v_ref, i_ref), p, T, config.dt)
        (counts_ref * upstream).sum().backward()
        v_ref, i_ref = state.v.detach(), state.i.detach()
        x = x_data.clone().requires_grad_()
        counts = lif_decision_surrogate(x, v, i, p, T, config.dt)
        (counts * upstream).sum().backward()
        assert torch.equal(counts, counts_ref.detach())
        torch.testing.assert_close(v, v_ref, rtol=0, atol=1e-6)
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
        spikes += int(counts.sum())
    assert spikes > 500 and x.grad.abs().sum() > 0
