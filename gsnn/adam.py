"""Adam over the organism's named parameters, with moments that growth and pruning can resize.

The update is ``torch.optim.Adam``'s (default betas and eps, no weight decay, no amsgrad): op for
op with torch ops (GPUs, and the CPU without the C kernels; ``tests/test_kernels.py`` checks it
equals torch's bit for bit), or in one pass per parameter in C (``gsnn.kernels.adam_step``, equal
within float rounding). It is written out because creating any ``torch.optim`` optimizer imports
``torch._dynamo`` (about 70 MB in every organism process, measured with ``python -m
benchmarks``), because the moments live in a plain dict keyed by parameter name, which is what
growth, pruning and checkpoints need, and because the gradient clip's scale is folded into the
same pass.
"""

from __future__ import annotations

import math

import torch

from gsnn import kernels


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
        beta1, beta2 = self.betas
        self.steps += 1
        bias_correction1 = 1 - beta1**self.steps
        bias_correction2_sqrt = (1 - beta2**self.steps) ** 0.5
        step_size = self.lr / bias_correction1
        finite = True
        for name, grad in grads.items():
            param = self.params[name]
            if name not in self.exp_avg:
                self.exp_avg[name] = torch.zeros_like(param)
                self.exp_avg_sq[name] = torch.zeros_like(param)
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
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(self.eps)
            param.addcdiv_(exp_avg, denom, value=-step_size)
            finite = finite and bool(torch.isfinite(param.sum()))
        return finite

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
