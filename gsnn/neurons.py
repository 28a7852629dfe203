"""LIF dynamics for one decision: T Norse LIF steps driven by a constant input current.

Units are Norse's: ``dt`` in seconds, ``tau_syn_inv`` and ``tau_mem_inv`` in 1/s, potentials in
Norse's dimensionless units (threshold 1.0 by default). One Norse step
(``norse.torch.functional.lif.lif_feed_forward_step``) is

    i_new = i + x
    v'    = v + dt * tau_mem_inv * ((v_leak - v) + i_new)
    i     = i_new + (-dt * tau_syn_inv) * i_new
    z     = H(v' - v_th)
    v     = (1 - z) v' + z v_reset

Two implementations of T such steps with the same constant ``x``:

- ``lif_decision_reference`` calls Norse's step function: it carries autograd through the
  SuperSpike surrogate and is what learning by gradient uses.
- ``lif_decision_fast`` does the same arithmetic in place without autograd, for evaluation and
  for the gradient-free rule; ``tests/test_neurons.py`` checks it equals the reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from norse.torch.functional.lif import LIFFeedForwardState, LIFParameters, lif_feed_forward_step


def lif_parameters(config, device: torch.device | str = "cpu") -> LIFParameters:
    def scalar(value):
        return torch.as_tensor(float(value), dtype=torch.float32, device=device)

    return LIFParameters(
        tau_syn_inv=scalar(config.tau_syn_inv),
        tau_mem_inv=scalar(config.tau_mem_inv),
        v_leak=scalar(config.v_leak),
        v_th=scalar(config.v_th),
        v_reset=scalar(config.v_reset),
        method="super",
        alpha=scalar(config.surrogate_alpha),
    )


def lif_decision_reference(
    x: torch.Tensor, state: LIFFeedForwardState, p: LIFParameters, steps: int, dt: float
) -> tuple[torch.Tensor, LIFFeedForwardState]:
    """T Norse steps with constant input current ``x`` (B, H). Returns the spike count per neuron
    (B, H), differentiable through the surrogate, and the final state."""
    counts = torch.zeros_like(x)
    for _ in range(steps):
        z, state = lif_feed_forward_step(x, state, p, dt)
        counts = counts + z
    return counts, state


@dataclass
class STDPFactors:
    """Per-neuron STDP sums over one decision (see ``gsnn.plasticity``), each (B, H).

    potentiation: sum over steps of (pre trace scale at the step) x (post spike at the step)
    depression:   sum over steps of the post trace before the step (pre spikes every step)
    """

    potentiation: torch.Tensor
    depression: torch.Tensor


@torch.no_grad()
def lif_decision_fast(
    x: torch.Tensor,
    v: torch.Tensor,
    i: torch.Tensor,
    p: LIFParameters,
    steps: int,
    dt: float,
    trace_decay: float | None = None,
) -> tuple[torch.Tensor, STDPFactors | None]:
    """T LIF steps in place on ``v`` and ``i`` (both (B, H), updated). Returns the spike counts
    and, when ``trace_decay`` is given, the STDP factors of the decision.

    Every intermediate is rounded as in Norse's step (so the result is bit-identical), but the
    spike mask is kept as a float ``keep = (v' <= v_th)``: the reset is then ``v' * keep`` (plus
    ``v_reset * (1 - keep)`` when v_reset is not 0) and the count is ``T - sum(keep)``. Float
    masks cost a third of what bool masks with ``masked_fill_`` cost on the CPU."""
    decay_mem = (dt * p.tau_mem_inv).item()
    neg_decay_syn = (-dt * p.tau_syn_inv).item()
    v_leak, v_th, v_reset = p.v_leak.item(), p.v_th.item(), p.v_reset.item()
    kept = torch.zeros_like(x)  # steps without a spike, per neuron
    keep = torch.empty_like(x)
    scratch = torch.empty_like(x)
    factors = None
    if trace_decay is not None:
        factors = STDPFactors(torch.zeros_like(x), torch.zeros_like(x))
        post_trace = torch.zeros_like(x)
        pre_scale = 0.0
    for _ in range(steps):
        i.add_(x)  # i_new = i + x
        if v_leak == 0.0:
            torch.sub(i, v, out=scratch)  # (v_leak - v) + i_new, exactly as rounded by Norse
        else:
            torch.sub(v_leak, v, out=scratch).add_(i)
        scratch.mul_(decay_mem)
        v.add_(scratch)  # v' = v + dt * tau_mem_inv * (...)
        torch.mul(i, neg_decay_syn, out=scratch)
        i.add_(scratch)  # i = i_new + (-dt * tau_syn_inv) * i_new
        torch.le(v, v_th, out=keep)  # 1 - H(v' - v_th)
        v.mul_(keep)
        if v_reset != 0.0:
            v.add_(torch.sub(1.0, keep).mul_(v_reset))
        kept.add_(keep)
        if factors is not None:
            spikes = torch.sub(1.0, keep)
            pre_scale = trace_decay * pre_scale + 1.0
            factors.depression.add_(post_trace)
            factors.potentiation.add_(spikes, alpha=pre_scale)
            post_trace.mul_(trace_decay).add_(spikes)
    counts = torch.sub(float(steps), kept, out=kept)
    return counts, factors
