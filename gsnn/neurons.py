"""LIF dynamics for one decision: T Norse LIF steps driven by a constant input current.

Units are Norse's: ``dt`` in seconds, ``tau_syn_inv`` and ``tau_mem_inv`` in 1/s, potentials in
Norse's dimensionless units (threshold 1.0 by default). One Norse step
(``norse.torch.functional.lif.lif_feed_forward_step``) is

    i_new = i + x
    v'    = v + dt * tau_mem_inv * ((v_leak - v) + i_new)
    i     = i_new + (-dt * tau_syn_inv) * i_new
    z     = H(v' - v_th)
    v     = (1 - z) v' + z v_reset

Implementations of T such steps with the same constant ``x``:

- ``lif_decision_reference`` calls Norse's step function, with autograd through Norse's
  SuperSpike surrogate (``grad / (|v' - v_th| + 1)^2``, gradient also through the reset): the
  reference the others are tested against.
- ``lif_decision_fast`` does the same arithmetic in place with torch ops and no autograd;
  ``surrogate_backward_torch`` is the surrogate gradient of the spike counts with respect to
  ``x``, written out. These are the torch twins of the C kernels in ``gsnn/kernels.c``
  (``gsnn.kernels`` picks one); ``tests/test_kernels.py`` checks all of them against Norse.

The organism does not import Norse: it keeps the five float32 constants of the step
(``LIFConstants``), computed as Norse's step computes them, and Norse is imported only for the
reference (a test checks the constants against Norse's own ``LIFParameters``). Norse's package
imports every model it has and matplotlib (about 50 MB and 0.4 s per process), which every
organism actor would otherwise pay.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class LIFConstants:
    """The float32 numbers Norse's step multiplies and compares with (see the module docstring)."""

    decay_mem: float  # dt * tau_mem_inv
    neg_decay_syn: float  # -dt * tau_syn_inv
    v_leak: float
    v_th: float
    v_reset: float
    tensor: torch.Tensor = field(init=False, repr=False, compare=False)  # the five, for the C kernels

    def __post_init__(self):
        values = (self.decay_mem, self.neg_decay_syn, self.v_leak, self.v_th, self.v_reset)
        object.__setattr__(self, "tensor", torch.tensor(values, dtype=torch.float32))


def lif_constants(config) -> LIFConstants:
    """From an OrganismConfig, rounded as Norse rounds them: its LIFParameters hold float32
    tensors, and ``dt * p.tau_mem_inv`` is a float32 product."""
    f32 = lambda value: torch.tensor(float(value), dtype=torch.float32)  # noqa: E731
    return LIFConstants(
        decay_mem=(config.dt * f32(config.tau_mem_inv)).item(),
        neg_decay_syn=(-config.dt * f32(config.tau_syn_inv)).item(),
        v_leak=f32(config.v_leak).item(),
        v_th=f32(config.v_th).item(),
        v_reset=f32(config.v_reset).item(),
    )


def lif_parameters(config, device: torch.device | str = "cpu"):
    """Norse's ``LIFParameters`` for an OrganismConfig (the reference path)."""
    from norse.torch.functional.lif import LIFParameters

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


def lif_decision_reference(x: torch.Tensor, state, p, steps: int, dt: float):
    """T Norse steps with constant input current ``x`` (B, H) from ``state`` (Norse's
    LIFFeedForwardState) with Norse's LIFParameters ``p``. Returns the spike count per neuron
    (B, H), differentiable through the surrogate, and the final state."""
    from norse.torch.functional.lif import lif_feed_forward_step

    counts = torch.zeros_like(x)
    for _ in range(steps):
        z, state = lif_feed_forward_step(x, state, p, dt)
        counts = counts + z
    return counts, state


def stdp_step_weights(trace_decay: float, steps: int, depression_ratio: float) -> torch.Tensor:
    """R-STDP's factor of a neuron over one decision (see ``gsnn.plasticity``),
    potentiation - ratio * depression, is a sum of its spikes with a fixed weight per step s
    (0-based): a post spike at s meets the pre trace p_s = sum_{j<=s} d^j (potentiation), and
    adds to the post trace that the pre spikes of the later steps meet, q_s = sum_{j<T-1-s} d^j
    (depression). Returns the (T,) float32 weights p_s - ratio * q_s, rounded in float32 as the
    decision kernels use them: the factor is then one sum of T terms, sum_s z_s (p_s - ratio q_s)."""
    powers = [trace_decay**j for j in range(steps)]
    pre = torch.tensor([sum(powers[: s + 1]) for s in range(steps)], dtype=torch.float32)
    post = torch.tensor([sum(powers[: steps - 1 - s]) for s in range(steps)], dtype=torch.float32)
    return pre - post * torch.tensor(depression_ratio, dtype=torch.float32)


@torch.no_grad()
def lif_decision_fast(
    x: torch.Tensor,
    v: torch.Tensor,
    i: torch.Tensor,
    c: LIFConstants,
    steps: int,
    stdp_weights: torch.Tensor | None = None,
    record_v: torch.Tensor | None = None,
    spike_bits: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """T LIF steps in place on ``v`` and ``i`` (both (B, H), updated). Returns the spike counts
    and, when ``stdp_weights`` (``stdp_step_weights``, (T,)) are given, each neuron's STDP factor
    sum_s z_s w_s ((B, H); else None).

    Every intermediate is rounded as in Norse's step (so the result is bit-identical), but the
    spike mask is kept as a float ``keep = (v' <= v_th)``: the reset is then ``v' * keep`` (plus
    ``v_reset * (1 - keep)`` when v_reset is not 0) and the count is ``T - sum(keep)``. Float
    masks cost a third of what bool masks with ``masked_fill_`` cost on the CPU. ``record_v``
    (T, B, H), when given, receives v' (the potential before threshold and reset) of each step;
    ``spike_bits`` (B, H, zeros), when given, receives each neuron's spikes as sum_t z_t 2^t."""
    kept = torch.zeros_like(x)  # steps without a spike, per neuron
    keep = torch.empty_like(x)
    scratch = torch.empty_like(x)
    factor = None
    if stdp_weights is not None:
        step_weights = stdp_weights.tolist()
        factor = torch.zeros_like(x)
    for step in range(steps):
        i.add_(x)  # i_new = i + x
        if c.v_leak == 0.0:
            torch.sub(i, v, out=scratch)  # (v_leak - v) + i_new, exactly as rounded by Norse
        else:
            torch.sub(c.v_leak, v, out=scratch).add_(i)
        scratch.mul_(c.decay_mem)
        v.add_(scratch)  # v' = v + dt * tau_mem_inv * (...)
        if record_v is not None:
            record_v[step].copy_(v)
        torch.mul(i, c.neg_decay_syn, out=scratch)
        i.add_(scratch)  # i = i_new + (-dt * tau_syn_inv) * i_new
        torch.le(v, c.v_th, out=keep)  # 1 - H(v' - v_th)
        v.mul_(keep)
        if c.v_reset != 0.0:
            v.add_(torch.sub(1.0, keep).mul_(c.v_reset))
        kept.add_(keep)
        if factor is not None or spike_bits is not None:
            torch.sub(1.0, keep, out=scratch)  # the spikes of this step
            if factor is not None:
                factor.add_(scratch, alpha=step_weights[step])  # w or 0 (z is 0 or 1), summed in step order
            if spike_bits is not None:
                spike_bits.add_(scratch, alpha=float(2**step))
    counts = torch.sub(float(steps), kept, out=kept)
    return counts, factor


@torch.no_grad()
def surrogate_backward_torch(x: torch.Tensor, v0: torch.Tensor, i0: torch.Tensor, g: torch.Tensor,
                             c: LIFConstants, steps: int) -> torch.Tensor:
    """dL/dx (B, H) of the spike counts of T steps from state (v0, i0) with constant input x,
    given g = dL/dcounts: the gradient autograd takes through Norse's steps, written out.

    Per step t, with a = dt tau_mem_inv, b = dt tau_syn_inv, s_t = 1 / (|v'_t - v_th| + 1)^2:
        n_t = i_{t-1} + x;  v'_t = v_{t-1} + a ((v_leak - v_{t-1}) + n_t);  i_t = (1 - b) n_t
        z_t = H(v'_t - v_th);  v_t = (1 - z_t) v'_t + z_t v_reset;  counts = sum_t z_t
    Backward from t = T down to 1 (v_T and i_T get no gradient: the state is detached between
    decisions):
        gv'_t = g s_t + gv_t ((1 - z_t) + (v_reset - v'_t) s_t)
        gn_t = a gv'_t + (1 - b) gi_t;  gv_{t-1} = (1 - a) gv'_t;  gi_{t-1} = gn_t;  gx += gn_t
    The forward is recomputed from (x, v0, i0), recording v'_t.
    """
    record = torch.empty((steps, *x.shape), dtype=x.dtype, device=x.device)
    lif_decision_fast(x, v0.clone(), i0.clone(), c, steps, record_v=record)
    a, b, v_th, v_reset = c.decay_mem, -c.neg_decay_syn, c.v_th, c.v_reset
    gv = torch.zeros_like(g)
    gi = torch.zeros_like(g)
    gx = torch.zeros_like(g)
    for t in range(steps - 1, -1, -1):
        over = record[t] - v_th  # v'_t - v_th, as the surrogate sees it
        surrogate = over.abs_().add_(1.0).pow_(2).reciprocal_()
        # dv_t/dv'_t = (1 - z_t) + (v_reset - v'_t) s_t (the reset is differentiable through z)
        through_reset = (record[t] <= v_th).to(g.dtype).add_((v_reset - record[t]).mul_(surrogate))
        gv_pre = gv.mul_(through_reset).add_(g * surrogate)
        gn = gi.mul_(1.0 - b).add_(gv_pre, alpha=a)
        gx.add_(gn)
        gv = gv_pre.mul_(1.0 - a)
        gi = gn
    return gx
