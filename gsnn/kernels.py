"""The organism's hot loops, each in two implementations that agree: C on the CPU
(``gsnn/kernels.c``, built by ``gsnn.native``) and torch ops on any device (the GPU path, and the
CPU fallback where no C compiler is found).

- ``decide``: one decision of B worlds: input current from the active inputs, T LIF steps,
  optionally the readout logits and their argmax, the STDP factors, and what a learner keeps.
- ``surrogate_backward``: dL/dx of the spike counts through Norse's SuperSpike surrogate.
- ``sparse_outer``: obs^T @ G for a sparse observation batch (input-weight gradients).

``tests/test_kernels.py`` checks the two implementations against each other and the LIF steps
against Norse's ``lif_feed_forward_step``.
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from gsnn import native
from gsnn.neurons import LIFConstants, lif_decision_fast, surrogate_backward_torch

SOURCE = Path(__file__).with_name("kernels.c")
_P, _I, _D = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double
SIGNATURES = {  # keep in step with gsnn/kernels.c
    "gsnn_lif": ([_I, _I, _I] + [_P] * 9, None),
    "gsnn_input_current": ([_I, _I, _I] + [_P] * 5, _D),
    "gsnn_decide": ([_I, _I, _I, _I] + [_P] * 14 + [_I] + [_P] * 8, ctypes.c_int),
    "gsnn_surrogate_backward": ([_I, _I, _I] + [_P] * 7, None),
    "gsnn_sparse_outer_add": ([_I, _I, _I] + [_P] * 3, None),
}
CHUNK = 64  # kernels.c: neurons per block of the surrogate backward


def library():
    """The C kernels, or None where they are unavailable (``gsnn.native``)."""
    return native.load(SOURCE, SIGNATURES)


def use_native(device: torch.device | str) -> bool:
    return torch.device(device).type == "cpu" and library() is not None


def _ptr(tensor: torch.Tensor | None):
    return None if tensor is None else tensor.data_ptr()


def _c(tensor: torch.Tensor) -> torch.Tensor:
    """float32 and contiguous, as the C kernels read it (a no-op for the organism's tensors)."""
    if tensor.dtype != torch.float32:
        tensor = tensor.float()
    return tensor.contiguous()


@dataclass
class Decision:
    """What ``decide`` returns. Sums are Python floats on the C path, 0-dim tensors otherwise."""

    counts: torch.Tensor  # (B, H) spikes per neuron over the T steps
    obs_sum: float | torch.Tensor  # sum of every observation value (NaN/Inf show here)
    spikes: float | torch.Tensor  # sum of counts
    logits: torch.Tensor | None = None  # (B, A)
    actions: torch.Tensor | None = None  # (B,) int64 argmax of the logits
    x: torch.Tensor | None = None  # (B, H) input current     } kept for a learner's update
    v0: torch.Tensor | None = None  # (B, H) state before     }
    i0: torch.Tensor | None = None  # (B, H) the decision     }
    potentiation: torch.Tensor | None = None  # (B, H) STDP factors (gsnn.neurons.STDPFactors)
    depression: torch.Tensor | None = None
    logits_finite: bool = True


class NonFiniteObservation(ValueError):
    """The observation holds NaN or Inf; nothing was computed and the LIF state is untouched."""


class Workspace:
    """Scratch buffers of the C path, reused between calls of one organism."""

    def __init__(self):
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, size: int, dtype) -> torch.Tensor:
        buffer = self._buffers.get(name)
        if buffer is None or buffer.numel() < size or buffer.dtype != dtype:
            buffer = torch.empty(max(size, 1), dtype=dtype)
            self._buffers[name] = buffer
        return buffer


def decide(
    obs: torch.Tensor,  # (B, N)
    input_weight: torch.Tensor,  # (N, H)
    hidden_bias: torch.Tensor,  # (H,)
    lif: LIFConstants,
    v: torch.Tensor,  # (B, H), updated in place
    i: torch.Tensor,  # (B, H), updated in place
    steps: int,
    readout: tuple[torch.Tensor, torch.Tensor] | None = None,  # (W_out (H, A), b_out (A,))
    greedy: bool = False,
    keep_inputs: bool = False,
    stdp_weights: tuple[torch.Tensor, torch.Tensor] | None = None,  # (pre, post) (T,) step weights
    workspace: Workspace | None = None,
) -> Decision:
    """One decision of B worlds. Raises ``NonFiniteObservation`` (state untouched) when the
    observation is not finite."""
    if use_native(obs.device):
        return _decide_native(obs, input_weight, hidden_bias, lif, v, i, steps, readout, greedy, keep_inputs,
                              stdp_weights, workspace or Workspace())
    return _decide_torch(obs, input_weight, hidden_bias, lif, v, i, steps, readout, greedy, keep_inputs,
                         stdp_weights)


def _decide_native(obs, W, b, lif, v, i, steps, readout, greedy, keep_inputs, stdp_weights, ws) -> Decision:
    obs, W, b = _c(obs), _c(W), _c(b)
    B, N = obs.shape
    H = W.shape[1]
    counts = torch.empty(B, H)
    x = v0 = i0 = pot = dep = logits = actions = None
    if keep_inputs:
        x, v0, i0 = torch.empty(B, H), torch.empty(B, H), torch.empty(B, H)
    if stdp_weights is not None:
        pot, dep = torch.empty(B, H), torch.empty(B, H)
    A, wout, bout = 0, None, None
    if readout is not None:
        wout, bout = _c(readout[0]), _c(readout[1])
        A = wout.shape[1]
        logits = torch.empty(B, A)
        if greedy:
            actions = torch.empty(B, dtype=torch.int64)
    sums = ws.get("sums", 3, torch.float64)
    status = library().gsnn_decide(
        B, N, H, steps, obs.data_ptr(), W.data_ptr(), b.data_ptr(), lif.tensor.data_ptr(), v.data_ptr(),
        i.data_ptr(), counts.data_ptr(), _ptr(x), _ptr(v0), _ptr(i0),
        *(_ptr(t) for t in (stdp_weights or (None, None))), _ptr(pot), _ptr(dep),
        A, _ptr(wout), _ptr(bout), _ptr(logits), _ptr(actions), sums.data_ptr(),
        ws.get("scratch", H + A * H, torch.float32).data_ptr(), ws.get("active", B * N, torch.int32).data_ptr(),
        ws.get("n_active", B, torch.int32).data_ptr(),
    )
    obs_sum, spikes, logit_sum = sums[:3].tolist()
    if status != 0:
        raise NonFiniteObservation("observation holds NaN or Inf")
    return Decision(counts, obs_sum, spikes, logits, actions, x, v0, i0, pot, dep,
                    logits_finite=readout is None or math.isfinite(logit_sum))


def input_current_torch(obs: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, N) observation -> (B, H) input current. On the CPU only the active cells are summed
    (embedding_bag over the non-zero cells, in increasing order, then + b, as kernels.c); on
    other devices a dense matmul."""
    if obs.device.type != "cpu":
        return torch.addmm(b, obs, W)
    rows, cols = torch.nonzero(obs, as_tuple=True)
    offsets = torch.zeros(obs.shape[0], dtype=torch.long, device=obs.device)
    offsets[1:] = torch.bincount(rows, minlength=obs.shape[0]).cumsum(0)[:-1]
    x = F.embedding_bag(cols, W, offsets, mode="sum", per_sample_weights=obs[rows, cols])
    return x + b


def _decide_torch(obs, W, b, lif, v, i, steps, readout, greedy, keep_inputs, stdp_weights) -> Decision:
    obs_sum = obs.sum()
    if not bool(torch.isfinite(obs_sum)):
        raise NonFiniteObservation("observation holds NaN or Inf")
    x = input_current_torch(obs, W, b)
    v0, i0 = (v.clone(), i.clone()) if keep_inputs else (None, None)
    counts, factors = lif_decision_fast(x, v, i, lif, steps, stdp_weights=stdp_weights)
    logits = actions = None
    finite = True
    if readout is not None:
        # F.linear with a contiguous (A, H) weight is about 4x faster on the CPU than addmm
        logits = F.linear(counts, readout[0].T.contiguous(), readout[1])
        finite = bool(torch.isfinite(logits).all())
        if greedy:
            actions = logits.argmax(dim=1)
    return Decision(
        counts, obs_sum, counts.sum(), logits, actions, x if keep_inputs else None, v0, i0,
        None if factors is None else factors.potentiation, None if factors is None else factors.depression,
        logits_finite=finite,
    )


def surrogate_backward(x: torch.Tensor, v0: torch.Tensor, i0: torch.Tensor, g: torch.Tensor,
                       lif: LIFConstants, steps: int) -> torch.Tensor:
    """dL/dx (R, H) for rows whose decision started from (v0, i0) with input current x, given
    g = dL/dcounts: Norse's SuperSpike surrogate through T steps (see gsnn.neurons)."""
    if not use_native(x.device):
        return surrogate_backward_torch(x, v0, i0, g, lif, steps)
    x, v0, i0, g = _c(x), _c(v0), _c(i0), _c(g)
    R, H = x.shape
    gx = torch.empty(R, H)
    scratch = torch.empty(steps * CHUNK)
    library().gsnn_surrogate_backward(R, H, steps, x.data_ptr(), v0.data_ptr(), i0.data_ptr(), g.data_ptr(),
                                      lif.tensor.data_ptr(), gx.data_ptr(), scratch.data_ptr())
    return gx


def sparse_outer(obs: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """obs^T @ G, (N, H), for an observation batch obs (R, N) that is mostly zeros and G (R, H):
    the C path touches only the non-zero entries (about 25 of 450 per row here)."""
    if not use_native(obs.device):
        return obs.T @ G
    obs, G = _c(obs), _c(G)
    (R, N), H = obs.shape, G.shape[1]
    out = torch.zeros(N, H)
    library().gsnn_sparse_outer_add(R, N, H, obs.data_ptr(), G.data_ptr(), out.data_ptr())
    return out
