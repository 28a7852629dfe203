"""LIF dynamics for one decision: T Norse LIF steps driven by a constant input current.

Units are Norse's: ``dt`` in seconds, ``tau_syn_inv`` and ``tau_mem_inv`` in 1/s, potentials in
Norse's dimensionless units (threshold 1.0 by default). One Norse step
(``norse.torch.functional.lif.lif_feed_forward_step``) is

    i_new = i + x
    v'    = v + dt * tau_mem_inv * ((v_leak - v) + i_new)
    i     = i_new + (-dt * tau_syn_inv) * i_new
    z     = H(v' - v_th)
    v     = (1 - z) v' + z v_reset

Three implementations of T such steps with the same constant ``x``:

- ``lif_decision_reference`` calls Norse's step function with autograd through Norse's
  SuperSpike surrogate (``grad / (|v' - v_th| + 1)^2``, gradient also through the reset).
- ``lif_decision_fast`` does the same arithmetic in place without autograd, for evaluation and
  for the gradient-free rule.
- ``lif_decision_surrogate`` is the fast forward plus a hand-written backward of the same
  surrogate gradient, as one autograd node per decision (it keeps only v' of each step instead
  of Norse's graph of ~10 nodes per step); REINFORCE learns with it.

``tests/test_neurons_energy.py`` checks the fast paths against the reference: spike counts and
state equal, and the surrogate path's input gradient equal to autograd through Norse's steps.
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
    """Per-neuron STDP sums over one decision (see ``gsnn.plasticity``), each (B, H). The
    definitions, step by step (``lif_decision_fast`` computes them as weighted spike sums):

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
    record_v: torch.Tensor | None = None,
) -> tuple[torch.Tensor, STDPFactors | None]:
    """T LIF steps in place on ``v`` and ``i`` (both (B, H), updated). Returns the spike counts
    and, when ``trace_decay`` is given, the STDP factors of the decision.

    Every intermediate is rounded as in Norse's step (so the result is bit-identical), but the
    spike mask is kept as a float ``keep = (v' <= v_th)``: the reset is then ``v' * keep`` (plus
    ``v_reset * (1 - keep)`` when v_reset is not 0) and the count is ``T - sum(keep)``. Float
    masks cost a third of what bool masks with ``masked_fill_`` cost on the CPU. ``record_v``
    (T, B, H), when given, receives v' (the potential before threshold and reset) of each step."""
    decay_mem = (dt * p.tau_mem_inv).item()
    neg_decay_syn = (-dt * p.tau_syn_inv).item()
    v_leak, v_th, v_reset = p.v_leak.item(), p.v_th.item(), p.v_reset.item()
    kept = torch.zeros_like(x)  # steps without a spike, per neuron
    keep = torch.empty_like(x)
    scratch = torch.empty_like(x)
    factors = None
    if trace_decay is not None:
        # Both STDP factors are spike sums with fixed weights per step s (0-based): the pre trace
        # a post spike meets, w_s = sum_{j<=s} d^j, and the post trace that the pre spikes of
        # later steps meet, c_s = sum_{j<T-1-s} d^j. With spike = 1 - keep, sum_s w_s spike_s =
        # sum_s w_s - sum_s w_s keep_s: two accumulations per step, no traces.
        powers = [trace_decay**j for j in range(steps)]
        pre_weights = [sum(powers[: s + 1]) for s in range(steps)]
        post_weights = [sum(powers[: steps - 1 - s]) for s in range(steps)]
        potentiation_kept, depression_kept = torch.zeros_like(x), torch.zeros_like(x)
    for step in range(steps):
        i.add_(x)  # i_new = i + x
        if v_leak == 0.0:
            torch.sub(i, v, out=scratch)  # (v_leak - v) + i_new, exactly as rounded by Norse
        else:
            torch.sub(v_leak, v, out=scratch).add_(i)
        scratch.mul_(decay_mem)
        v.add_(scratch)  # v' = v + dt * tau_mem_inv * (...)
        if record_v is not None:
            record_v[step].copy_(v)
        torch.mul(i, neg_decay_syn, out=scratch)
        i.add_(scratch)  # i = i_new + (-dt * tau_syn_inv) * i_new
        torch.le(v, v_th, out=keep)  # 1 - H(v' - v_th)
        v.mul_(keep)
        if v_reset != 0.0:
            v.add_(torch.sub(1.0, keep).mul_(v_reset))
        kept.add_(keep)
        if trace_decay is not None:
            potentiation_kept.add_(keep, alpha=pre_weights[step])
            depression_kept.add_(keep, alpha=post_weights[step])
    if trace_decay is not None:
        factors = STDPFactors(torch.sub(sum(pre_weights), potentiation_kept, out=potentiation_kept),
                              torch.sub(sum(post_weights), depression_kept, out=depression_kept))
    counts = torch.sub(float(steps), kept, out=kept)
    return counts, factors


class _SurrogateDecision(torch.autograd.Function):
    """T LIF steps as one autograd node: forward = ``lif_decision_fast`` (updating ``v`` and
    ``i`` in place), backward = the gradient autograd takes through Norse's steps, written out.

    Per step t, with a = dt tau_mem_inv, b = dt tau_syn_inv, s_t = 1 / (|v'_t - v_th| + 1)^2:
        n_t = i_{t-1} + x;  v'_t = v_{t-1} + a ((v_leak - v_{t-1}) + n_t);  i_t = (1 - b) n_t
        z_t = H(v'_t - v_th);  v_t = (1 - z_t) v'_t + z_t v_reset;  counts = sum_t z_t
    Backward from g = dL/dcounts, from t = T down to 1 (v_T and i_T get no gradient: the state
    is detached between decisions):
        gv'_t = g s_t + gv_t ((1 - z_t) + (v_reset - v'_t) s_t)
        gn_t = a gv'_t + (1 - b) gi_t;  gv_{t-1} = (1 - a) gv'_t;  gi_{t-1} = gn_t;  gx += gn_t
    """

    @staticmethod
    def forward(ctx, x, v, i, p, steps, dt):
        record = torch.empty((steps, *x.shape), dtype=x.dtype, device=x.device)
        counts, _ = lif_decision_fast(x.detach(), v, i, p, steps, dt, record_v=record)
        ctx.save_for_backward(record)
        ctx.constants = ((dt * p.tau_mem_inv).item(), (dt * p.tau_syn_inv).item(), p.v_th.item(), p.v_reset.item())
        return counts

    @staticmethod
    def backward(ctx, g):
        (record,) = ctx.saved_tensors
        a, b, v_th, v_reset = ctx.constants
        gv = torch.zeros_like(g)
        gi = torch.zeros_like(g)
        gx = torch.zeros_like(g)
        for t in range(record.shape[0] - 1, -1, -1):
            over = record[t] - v_th  # v'_t - v_th, as the surrogate sees it
            surrogate = over.abs_().add_(1.0).pow_(2).reciprocal_()
            # dv_t/dv'_t = (1 - z_t) + (v_reset - v'_t) s_t (the reset is differentiable through z)
            through_reset = (record[t] <= v_th).to(g.dtype).add_((v_reset - record[t]).mul_(surrogate))
            gv_pre = gv.mul_(through_reset).add_(g * surrogate)
            gn = gi.mul_(1.0 - b).add_(gv_pre, alpha=a)
            gx.add_(gn)
            gv = gv_pre.mul_(1.0 - a)
            gi = gn
        return gx, None, None, None, None, None


def lif_decision_surrogate(
    x: torch.Tensor, v: torch.Tensor, i: torch.Tensor, p: LIFParameters, steps: int, dt: float
) -> torch.Tensor:
    """Spike counts (B, H) of T steps, differentiable in ``x`` through Norse's SuperSpike
    surrogate; ``v`` and ``i`` (no gradient) are updated in place."""
    return _SurrogateDecision.apply(x, v, i, p, steps, dt)
