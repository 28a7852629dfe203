"""Adam over the organism's named parameters, with moments that growth and pruning can resize.

The update is ``torch.optim.Adam``'s (default betas and eps, no weight decay, no amsgrad): op for
op with torch ops (GPUs, and the CPU without the C kernels; ``tests/test_kernels.py`` checks it
equals torch's bit for bit), or in one pass per parameter in C (``gsnn.kernels.adam_step``, equal
within float rounding). It is written out because creating any ``torch.optim`` optimizer imports
``torch._dynamo`` (about 70 MB in every organism process, measured with ``python -m
benchmarks``), because the moments live in a plain dict keyed by parameter name, which is what
growth, pruning and checkpoints need, and because the gradient clip's scale is folded into the
same pass.

One difference from torch's: a moment whose magnitude falls below the smallest normal float is
stored as zero. A weight whose gradient stays zero (an input that no rollout sees active, a silent
neuron of a fixed network) has its first moment decay into the subnormals, where it sticks
(``m + 0.1 * (0 - m)`` rounds back to ``m``), and on a CPU every operation on a subnormal takes a
slow microcode assist: a fixed R-STDP network at hidden 512 learned 26% slower after 3,000
updates. Such a moment's share of the step (``m / eps``, below 1e-30) is under the last bit of any
weight larger than about 1e-23, so the weights stay torch's.
"""

from __future__ import annotations

import math

import torch

from gsnn import kernels
from gsnn.kernels import TINY  # moments below the smallest normal float32 are stored as 0


class Adam:
    def __init__(self, params: dict[str, torch.Tensor], lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        self.params = params  # shared with the organism: name -> tensor
        self.lr = float(lr)
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = float(eps)
        self.steps = 0  # updates made (the bias correction's t)
        self.exp_avg: dict[str, torch.Tensor] = {}
        self.exp_avg_sq: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def step(self, grads: dict[str, torch.Tensor], scale: float = 1.0) -> bool:
        """Update every parameter in ``grads`` with its gradient times ``scale``. Returns False
        if a parameter became non-finite."""
        beta1, beta2, step_size, bias_correction2_sqrt, _ = self.next_step()
        self.steps += 1
        self.ensure_moments(grads)
        finite = True
        for name, grad in grads.items():
            param = self.params[name]
            exp_avg, exp_avg_sq = self.exp_avg[name], self.exp_avg_sq[name]
            if kernels.use_native(param.device):
                total = kernels.adam_step(param, grad, exp_avg, exp_avg_sq, scale, beta1, beta2, step_size,
                                          bias_correction2_sqrt, self.eps)
                finite = finite and math.isfinite(total)
                continue
            if scale != 1.0:
                grad = grad * scale
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            exp_avg.masked_fill_(exp_avg.abs() < TINY, 0.0)  # no subnormal moments (as the C step)
            exp_avg_sq.masked_fill_(exp_avg_sq < TINY, 0.0)
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(self.eps)
            param.addcdiv_(exp_avg, denom, value=-step_size)
            finite = finite and bool(torch.isfinite(param.sum()))
        return finite

    def next_step(self) -> tuple[float, float, float, float, float]:
        """The next step's (beta1, beta2, step_size, bias_correction2_sqrt, eps): ``step``'s
        numbers, and ``kernels.rstdp_update``'s (which steps in C; the caller adds the step)."""
        beta1, beta2 = self.betas
        steps = self.steps + 1
        bias_correction1 = 1 - beta1**steps
        bias_correction2_sqrt = (1 - beta2**steps) ** 0.5
        return beta1, beta2, self.lr / bias_correction1, bias_correction2_sqrt, self.eps

    def ensure_moments(self, names) -> list[str]:
        """Zero moments for the parameters ``names`` that have none yet (before their first
        step); returns those names."""
        made = [name for name in names if name not in self.exp_avg]
        for name in made:
            self.exp_avg[name] = torch.zeros_like(self.params[name])
            self.exp_avg_sq[name] = torch.zeros_like(self.params[name])
        return made

    def drop_moments(self, names) -> None:
        """Forget the moments of ``names`` (``ensure_moments``' when no step followed)."""
        for name in names:
            del self.exp_avg[name], self.exp_avg_sq[name]

    def moments(self, name: str) -> dict[str, torch.Tensor]:
        """The moments of one parameter (empty before its first update)."""
        if name not in self.exp_avg:
            return {}
        return {"exp_avg": self.exp_avg[name], "exp_avg_sq": self.exp_avg_sq[name]}

    def set_moments(self, name: str, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor) -> None:
        self.exp_avg[name], self.exp_avg_sq[name] = exp_avg, exp_avg_sq

    def state_dict(self) -> dict:
        cpu = lambda t: t.detach().to("cpu").clone()  # noqa: E731
        return {"lr": self.lr, "betas": list(self.betas), "eps": self.eps, "steps": self.steps,
                "exp_avg": {k: cpu(v) for k, v in self.exp_avg.items()},
                "exp_avg_sq": {k: cpu(v) for k, v in self.exp_avg_sq.items()}}

    def load_state_dict(self, state: dict) -> None:
        device = next(iter(self.params.values())).device
        self.lr, self.eps, self.steps = float(state["lr"]), float(state["eps"]), int(state["steps"])
        self.betas = (float(state["betas"][0]), float(state["betas"][1]))
        self.exp_avg = {k: v.to(device).clone() for k, v in state["exp_avg"].items()}
        self.exp_avg_sq = {k: v.to(device).clone() for k, v in state["exp_avg_sq"].items()}
