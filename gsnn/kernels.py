"""The organism's hot loops, each in two implementations that agree: C on the CPU
(``gsnn/kernels.c``, built by ``gsnn.native``) and torch ops on any device (the GPU path, and the
CPU fallback where no C compiler is found).

- ``decide``: one decision of B worlds: input current from the active inputs, T LIF steps, the
  readout, the action (argmax, or sampled from softmax with given uniform numbers), the firing
  rate statistics, and what a learning rule keeps of the decision, written where it is asked to
  be (the organism's rollout buffers).
- ``reinforce_backward``: REINFORCE's gradient below the logits: through the readout, the T LIF
  steps of every decision (Norse's SuperSpike surrogate) and the input weights of active inputs.
- ``rstdp_directions``: R-STDP's update, each decision's eligibility weighted by its advantage
  (the input weights' part touches only the active inputs of each decision);
  ``rstdp_directions_from_spikes`` the same from the decisions' spike bits (``decide``'s
  "spikes"), rebuilding their counts and post factors (``spike_factors``).
- ``advantages``, ``sum_squares``, ``adam_step``: the rest of an update (returns and advantages,
  the gradient norm, Adam), one pass each instead of a dozen small torch ops.
- ``rstdp_update``: a whole R-STDP update of a spike-bit record in one call (advantages,
  directions, norm, clipped Adam step: the functions above, in order), C only.

``tests/test_kernels.py`` runs every check on both implementations: the LIF steps against
Norse's ``lif_feed_forward_step``, the gradient against autograd through Norse's steps.
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from gsnn import native
from gsnn.neurons import LIFConstants, lif_decision_fast, surrogate_backward_torch

SOURCE = Path(__file__).with_name("kernels.c")
CHUNK_ROWS, HBLOCK = 256, 64  # kernels.c: rows per chunk, neurons per block

_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float


class DecideArgs(ctypes.Structure):
    """kernels.c's decide_args, field for field."""

    _fields_ = [(name, _I) for name in ("B", "N", "H", "T", "A")] + [
        (name, _P) for name in ("obs", "W", "bias", "p", "v", "i", "counts", "wout", "bout", "logits", "actions",
                                "uniform", "obs_out", "x_out", "v0_out", "i0_out", "stdp_w")
    ] + [("hidden_post", _P), ("action_post", _P), ("rate_ema", _P),
         ("rate_alpha", _F), ("sums", ctypes.c_double * 3), ("scratch", _P), ("active", _P), ("vals", _P),
         ("n_active", _P), ("spikes_out", _P), ("inputs_out", _P), ("input_values_out", _P),
         ("input_counts_out", _P)]


_D = ctypes.c_double


class RSTDPUpdateArgs(ctypes.Structure):
    """kernels.c's rstdp_update_args, field for field."""

    _fields_ = [(name, _I) for name in ("L", "B", "N", "H", "A", "T")] + [
        ("rewards", _P), ("dones", _P), ("discount", _D), ("inputs", _P), ("input_values", _P),
        ("input_counts", _P), ("spikes", _P), ("action_post", _P), ("stdp_w", _P), ("adv", _P),
        ("param", _P * 4), ("grad", _P * 4), ("m", _P * 4), ("v", _P * 4), ("grad_clip", _D),
    ] + [(name, _F) for name in ("beta1", "beta2", "step_size", "bias2_sqrt", "eps")] + [
        ("sum_squares", _D), ("param_sum", _D * 4)]


SIGNATURES = {  # keep in step with gsnn/kernels.c
    "gsnn_decide": ([ctypes.POINTER(DecideArgs)], ctypes.c_int),
    "gsnn_rstdp_update": ([ctypes.POINTER(RSTDPUpdateArgs)], ctypes.c_int),
    "gsnn_reinforce_backward": ([_I] * 5 + [_P] * 11, ctypes.c_int),  # obs, v0, i0, g_logits, W, b, W_out, p, 3 out
    "gsnn_rstdp_directions": ([_I] * 4 + [_P] * 5 + [_F] + [_P] * 4, ctypes.c_int),
    # R, N, H, A, T, obs, B, inputs, input_values, input_counts, spikes, wout, stdp_w, action_post, w, scale, 4 out
    "gsnn_rstdp_directions_from_spikes": ([_I] * 5 + [_P, _I] + [_P] * 8 + [_F] + [_P] * 4, ctypes.c_int),
    "gsnn_advantages": ([_I, _I, _P, _P, _D, _P], ctypes.c_int),
    "gsnn_sum_squares": ([_I, _P], _D),
    "gsnn_adam": ([_I] + [_P] * 4 + [_F] * 6, _D),
}


def library():
    """The C kernels, or None where they are unavailable (``gsnn.native``)."""
    return native.load(SOURCE, SIGNATURES)


def use_native(device: torch.device) -> bool:
    return device.type == "cpu" and library() is not None


def _ptr(tensor: torch.Tensor | None):
    return None if tensor is None else tensor.data_ptr()


def _c(tensor: torch.Tensor) -> torch.Tensor:
    """float32 and contiguous, as the C kernels read it (a no-op for the organism's tensors)."""
    if tensor.dtype != torch.float32:
        tensor = tensor.float()
    return tensor.contiguous()


def _check(status: int) -> None:
    if status == -2:
        raise ValueError("gsnn C kernel: an argument out of its range")
    if status != 0:
        raise MemoryError("gsnn C kernel: out of memory for its scratch space")


class NonFiniteObservation(ValueError):
    """The observation holds NaN or Inf; nothing was computed and the LIF state is untouched."""


@dataclass
class STDPOptions:
    """R-STDP's per-decision record: the step weights w of ``hidden_post = (sum_s z_s w_s) *
    feedback`` (``gsnn.neurons.stdp_step_weights``: potentiation - ratio * depression)."""

    step_weights: torch.Tensor  # (T,) float32


@dataclass
class Decision:
    """What ``decide`` returns. The sums are Python floats on the C path, 0-dim tensors
    otherwise. Learner outputs are None unless asked for."""

    counts: torch.Tensor  # (B, H) spikes per neuron over the T steps
    logits: torch.Tensor  # (B, A)
    actions: torch.Tensor | None  # (B,) int64
    obs_sum: float | torch.Tensor  # sum of every observation value
    spikes: float | torch.Tensor  # sum of counts
    logits_finite: bool
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)  # of KEEP


class Workspace:
    """Scratch buffers kept by their owner (one per organism) between calls, so a decision
    allocates nothing it does not hand out (fresh large buffers cost page faults every time),
    and the C decision's prepared arguments (``_DecidePlan``)."""

    MAX_PLANS = 4  # a learner's and an evaluator's batch sizes, with room to spare

    def __init__(self):
        self._buffers: dict[str, torch.Tensor] = {}
        self.plans: dict[tuple, _DecidePlan] = {}
        self.last_plan: _DecidePlan | None = None  # the C decision's last call's (``SlotDecisions``)

    def __reduce__(self):
        """A copy (copy, deepcopy, pickle) is a new, empty workspace: a plan's raw pointers
        would still point into the original's tensors."""
        return (Workspace, ())

    def keep_plan(self, key: tuple, plan: "_DecidePlan") -> "_DecidePlan":
        self.plans.pop(key, None)
        while len(self.plans) >= self.MAX_PLANS:
            del self.plans[next(iter(self.plans))]  # the oldest
        self.plans[key] = plan
        return plan

    def get(self, name: str, size: int, dtype, device: torch.device | str = "cpu") -> torch.Tensor:
        buffer = self._buffers.get(name)
        if buffer is None or buffer.numel() < size or buffer.dtype != dtype or buffer.device != torch.device(device):
            buffer = torch.empty(max(size, 1), dtype=dtype, device=device)
            self._buffers[name] = buffer
        return buffer


KEEP = ("obs", "x", "v0", "i0", "hidden_post", "action_post", "spikes", "inputs")  # what a learner may keep
TINY = torch.finfo(torch.float32).tiny  # the smallest normal float32: rates and Adam's moments below it are stored as 0
SPIKE_BITS_MAX_STEPS = 15  # "spikes": each neuron's T spikes as the bits of an int16, bit t = step t
# "inputs": the observation's active inputs, a compact record of it in three outputs (ActiveInputs)
INPUT_RECORD = {"inputs": torch.int32, "input_values": torch.float32, "input_counts": torch.int32}


@dataclass
class ActiveInputs:
    """The active (non-zero) inputs of decisions in slots of B worlds, as ``decide`` keeps them
    ("inputs"): slot l's worlds one after another in ``inputs[l]`` (indices, increasing within a
    world) and ``values[l]``, world b's ``counts[l, b]`` of them after those of worlds 0..b-1; the
    rest of each slot is unused. About 90 bytes a decision of the foraging world against the
    observation's 1.8 KB, and an update reads them without scanning observations."""

    inputs: torch.Tensor  # (L, B * N) int32
    values: torch.Tensor  # (L, B * N) float32
    counts: torch.Tensor  # (L, B) int32

    @staticmethod
    def outputs(out: dict, B: int, N: int, device) -> dict[str, torch.Tensor]:
        """``decide``'s three outputs for B worlds of N inputs: those given in ``out`` (checked:
        the C kernel writes through their pointers unchecked), the rest allocated."""
        tensors = {}
        for name, dtype in INPUT_RECORD.items():
            size, tensor = B if name == "input_counts" else B * N, out.get(name)
            if tensor is None:
                tensor = torch.empty(size, dtype=dtype, device=device)
            elif tensor.dtype != dtype or tensor.numel() < size or not tensor.is_contiguous():
                raise ValueError(f"decide: out[{name!r}] must be a contiguous {dtype} tensor of at least {size} elements")
            tensors[name] = tensor
        return tensors

    def dense(self, n_inputs: int) -> torch.Tensor:
        """The (L * B, N) observations the lists were taken from."""
        L, B = self.counts.shape
        counts = self.counts.long()
        obs = torch.zeros(L * B, n_inputs, dtype=torch.float32, device=self.counts.device)
        for slot in range(L):
            used = int(counts[slot].sum())
            rows = torch.repeat_interleave(torch.arange(B, device=counts.device) + slot * B, counts[slot])
            obs[rows, self.inputs[slot, :used].long()] = self.values[slot, :used]
        return obs


def decide(
    obs: torch.Tensor,  # (B, N)
    params: dict[str, torch.Tensor],  # input_weight (N, H), hidden_bias (H,), readout_weight (H, A), readout_bias (A,)
    lif: LIFConstants,
    v: torch.Tensor,  # (B, H), updated in place
    i: torch.Tensor,  # (B, H), updated in place
    steps: int,
    choose: str | None = "greedy",  # "greedy" (argmax), "sample" (needs uniform), or None
    uniform: torch.Tensor | None = None,  # (B,) in [0, 1)
    keep: tuple[str, ...] = (),  # learner outputs, of KEEP
    stdp: STDPOptions | None = None,  # needed for "hidden_post"
    rate: tuple[torch.Tensor, float] | None = None,  # (rate_ema (H,), alpha): updated in place,
    #                                                  a rate below TINY stored as 0
    out: dict[str, torch.Tensor] | None = None,  # where to write outputs (else they are allocated)
    workspace: Workspace | None = None,
) -> Decision:
    """One decision of B worlds. Raises ``NonFiniteObservation`` (state untouched) when the
    observation is not finite. ``out`` may hold preallocated tensors for "counts", "logits",
    "actions" and any key of ``keep``; without them, counts and logits live in the workspace
    (valid until its next use) and the rest is allocated."""
    if choose not in ("greedy", "sample", None) or (choose == "sample") != (uniform is not None):
        raise ValueError("choose='sample' needs uniform numbers; 'greedy' and None take none")
    for name in keep:
        if name not in KEEP:
            raise ValueError(f"decide: keep names one of {', '.join(KEEP)}, got {name!r}")
    if "hidden_post" in keep and (stdp is None or choose != "sample"):
        raise ValueError("hidden_post needs stdp options and a sampled action")
    if "spikes" in keep and not 1 <= steps <= SPIKE_BITS_MAX_STEPS:
        raise ValueError(f"spikes (as bits) needs 1 to {SPIKE_BITS_MAX_STEPS} steps, got {steps}")
    if "spikes" in keep and "hidden_post" in keep:
        raise ValueError("keep either hidden_post or spikes, not both")
    if use_native(obs.device):
        return _decide_native(obs, params, lif, v, i, steps, choose, uniform, keep, stdp, rate, out or {},
                              workspace if workspace is not None else Workspace())
    out = dict(out or {})
    B, H, A = obs.shape[0], params["input_weight"].shape[1], params["readout_weight"].shape[1]
    shapes = {"counts": (B, H), "logits": (B, A), "obs": tuple(obs.shape), "x": (B, H), "v0": (B, H), "i0": (B, H),
              "hidden_post": (B, H), "action_post": (B, A), "spikes": (B, H)}
    if "inputs" in keep:
        out.update(ActiveInputs.outputs(out, B, obs.shape[1], obs.device))
    for name in ("counts", "logits"):  # scratch unless asked for: reused from the workspace
        if name not in out:
            size = shapes[name][0] * shapes[name][1]
            out[name] = (workspace.get(name, size, torch.float32, obs.device)[:size].view(shapes[name])
                         if workspace is not None else torch.empty(shapes[name], device=obs.device))
    for name in keep:
        if name not in out and name != "inputs":
            out[name] = torch.empty(shapes[name], dtype=torch.int16 if name == "spikes" else torch.float32,
                                    device=obs.device)
    if choose is not None and "actions" not in out:
        out["actions"] = torch.empty(B, dtype=torch.int64, device=obs.device)
    return _decide_torch(obs, params, lif, v, i, steps, choose, uniform, keep, stdp, rate, out)


class _DecidePlan:
    """The C decision's arguments for one shape and set of options, with the pointers that last
    between decisions filled in once: parameters, LIF state, rate statistics, STDP weights,
    scratch. ``pins`` holds the tensors those pointers come from: the plan serves a call only
    when the call's tensors are these very objects (their memory cannot have been reused while
    the plan holds them) and still at the same addresses (``t.data = ...``, ``set_`` or a growing
    ``resize_`` moves a tensor's memory and leaves the object), so growth, pruning, a load or a
    new LIF state make a new plan. A call then sets only the observation, the uniform numbers
    and its outputs: at 16 worlds the arguments cost a few microseconds instead of as long as the
    decision itself."""

    __slots__ = ("pins", "addresses", "args", "counts", "logits", "ref")

    def __init__(self, pins: tuple, B: int, N: int, H: int, A: int, steps: int, stdp, rate, ws: Workspace):
        W, b, wout, bout, p, v, i, rate_ema, stdp_w = pins
        self.pins = pins
        self.addresses = tuple(0 if t is None else t.data_ptr() for t in pins)
        self.counts = ws.get("counts", B * H, torch.float32)[: B * H].view(B, H)
        self.logits = ws.get("logits", B * A, torch.float32)[: B * A].view(B, A)
        scratch = (ws.get("scratch", H * (A + 2) + A + N * HBLOCK, torch.float32),
                   ws.get("active", min(B, CHUNK_ROWS) * N, torch.int32),
                   ws.get("vals", min(B, CHUNK_ROWS) * N, torch.float32),
                   ws.get("n_active", min(B, CHUNK_ROWS), torch.int32))
        self.ref = scratch  # the plan's pointers stay valid while it lives
        self.args = DecideArgs(
            B=B, N=N, H=H, T=steps, A=A, W=W.data_ptr(), bias=b.data_ptr(), p=p.data_ptr(), v=v.data_ptr(),
            i=i.data_ptr(), wout=wout.data_ptr(), bout=bout.data_ptr(),
            scratch=scratch[0].data_ptr(), active=scratch[1].data_ptr(), vals=scratch[2].data_ptr(),
            n_active=scratch[3].data_ptr(),
        )
        if stdp_w is not None:
            self.args.stdp_w = stdp_w.data_ptr()
        if rate_ema is not None:
            self.args.rate_ema, self.args.rate_alpha = rate_ema.data_ptr(), rate[1]

    def serves(self, pins: tuple) -> bool:
        """The plan's pointers are those of these tensors (see the class)."""
        for mine, theirs, address in zip(self.pins, pins, self.addresses):
            if mine is not theirs or (mine is not None and mine.data_ptr() != address):
                return False
        return True


def _pins(W, b, wout, bout, lif, v, i, rate_ema, stdp_weights) -> tuple:
    """What a ``_DecidePlan`` holds pointers into, in its order (``_decide_native``, ``SlotDecisions``)."""
    return (W, b, wout, bout, lif.tensor, v, i, rate_ema, stdp_weights)


def _decide_native(obs, params, lif, v, i, steps, choose, uniform, keep, stdp, rate, out, ws) -> Decision:
    obs = _c(obs)
    W, b, wout, bout = (_c(params["input_weight"]), _c(params["hidden_bias"]), _c(params["readout_weight"]),
                        _c(params["readout_bias"]))
    B, N = obs.shape
    H, A = W.shape[1], wout.shape[1]
    with_stdp = stdp is not None and "hidden_post" in keep
    pins = _pins(W, b, wout, bout, lif, v, i, None if rate is None else rate[0],
                 stdp.step_weights if with_stdp else None)
    key = (B, N, H, A, steps, None if rate is None else rate[1], with_stdp)
    plan = ws.plans.get(key)
    if plan is None or not plan.serves(pins):
        checks = {"input_weight": (W, (N, H)), "hidden_bias": (b, (H,)), "readout_weight": (wout, (H, A)),
                  "readout_bias": (bout, (A,)), "v": (v, (B, H)), "i": (i, (B, H))}
        if rate is not None:
            checks["rate_ema"] = (rate[0], (H,))
        if with_stdp:
            checks["stdp.step_weights"] = (stdp.step_weights, (steps,))
        for name, (tensor, shape) in checks.items():  # the C kernel reads them unchecked
            if tuple(tensor.shape) != shape or not tensor.is_contiguous() or tensor.dtype != torch.float32:
                raise ValueError(f"decide: {name} must be a contiguous float32 tensor of shape {shape}, "
                                 f"got {tuple(tensor.shape)} {tensor.dtype}")
        plan = ws.keep_plan(key, _DecidePlan(pins, B, N, H, A, steps, stdp, rate, ws))
    args = plan.args
    counts, logits = out.get("counts", plan.counts), out.get("logits", plan.logits)
    actions = out.get("actions")
    if actions is None and choose is not None:
        actions = torch.empty(B, dtype=torch.int64)
    outputs = {}
    for name in keep:
        if name == "inputs":
            outputs.update(ActiveInputs.outputs(out, B, N, obs.device))
            continue
        tensor = out.get(name)
        outputs[name] = tensor if tensor is not None else torch.empty(
            (B, N) if name == "obs" else (B, A) if name == "action_post" else (B, H),
            dtype=torch.int16 if name == "spikes" else torch.float32)
    bits = outputs.get("spikes")
    if bits is not None and (bits.dtype != torch.int16 or tuple(bits.shape) != (B, H) or not bits.is_contiguous()):
        raise ValueError(f"decide: out['spikes'] must be a contiguous int16 tensor of shape {(B, H)}")
    args.obs, args.counts, args.logits = obs.data_ptr(), counts.data_ptr(), logits.data_ptr()
    args.actions = None if actions is None else actions.data_ptr()
    if uniform is not None:
        uniform = _c(uniform)  # held until the call returns
    args.uniform = _ptr(uniform)
    args.obs_out, args.x_out, args.v0_out, args.i0_out, args.hidden_post, args.action_post, args.spikes_out = (
        _ptr(outputs.get(name)) for name in ("obs", "x", "v0", "i0", "hidden_post", "action_post", "spikes"))
    args.inputs_out, args.input_values_out, args.input_counts_out = (_ptr(outputs.get(name)) for name in INPUT_RECORD)
    ws.last_plan = plan
    if library().gsnn_decide(ctypes.byref(args)) != 0:
        raise NonFiniteObservation("observation holds NaN or Inf")
    obs_sum, spikes, logit_sum = args.sums
    return Decision(counts, logits, actions, obs_sum, spikes, math.isfinite(logit_sum), outputs)


# decide_args' output pointers -> the names of ``decide``'s outputs they point into
_OUTPUT_FIELDS = {"counts": "counts", "logits": "logits", "actions": "actions", "obs_out": "obs", "x_out": "x",
                  "v0_out": "v0", "i0_out": "i0", "hidden_post": "hidden_post", "action_post": "action_post",
                  "spikes_out": "spikes", "inputs_out": "inputs", "input_values_out": "input_values",
                  "input_counts_out": "input_counts"}


class SlotDecisions:
    """A learner's decisions of B worlds into slot after slot of its record buffers (name -> an
    (L, ...) buffer whose slot k is a decision's ``out``), on the C path.

    ``decide`` builds the C kernel's arguments at every call: it checks its options and outputs,
    looks up its plan and takes every output's pointer, and at 16 worlds that costs about half as
    long as the C decision itself. Here each slot's arguments are made once (a copy of the
    plan's, with that slot's output pointers) and a decision sets only its observation and
    uniform numbers. Made by ``of_last_call`` from a decision that ``decide`` made into one of
    the slots (it checked everything then); it serves while that decision's plan serves the
    caller's tensors (``_DecidePlan.serves``) and the observation is what the plan was made for.
    Anything else gets None and goes through ``decide``, which handles every case (and says what
    is wrong)."""

    __slots__ = ("plan", "buffers", "alpha", "_constant", "_per_slot", "_args", "_actions", "_B", "_N")

    def __init__(self, plan: _DecidePlan, buffers: dict[str, torch.Tensor], alpha: float | None):
        self.plan, self.buffers, self.alpha = plan, buffers, alpha
        self._B, self._N = plan.args.B, plan.args.N
        self._constant: dict[str, int | None] = {}  # field -> a pointer every slot shares (or NULL)
        self._per_slot: dict[str, str] = {}  # field -> the buffer it points into, slot by slot
        length = min(buffer.shape[0] for buffer in buffers.values())
        self._args: list[DecideArgs | None] = [None] * length  # made at a slot's first use
        self._actions = buffers["actions"].unbind(0)

    @classmethod
    def of_last_call(cls, ws: Workspace, buffers: dict[str, torch.Tensor], slot: int,
                     alpha: float | None) -> "SlotDecisions | None":
        """The slot decisions of ``ws``'s last C decision, which wrote into slot ``slot`` of
        ``buffers`` (with rate alpha ``alpha``, as given to ``decide``), or None if it did not
        (not the C path, an output elsewhere, no sampling)."""
        plan = ws.last_plan
        if plan is None or "actions" not in buffers or not plan.args.uniform:
            return None
        made = cls(plan, buffers, alpha)
        args = plan.args
        for name, output in _OUTPUT_FIELDS.items():
            address = getattr(args, name)
            buffer = buffers.get(output)
            if buffer is not None and slot < buffer.shape[0] and address == buffer[slot].data_ptr():
                made._per_slot[name] = output
            elif address is None or (name in ("counts", "logits") and address == getattr(plan, name).data_ptr()):
                made._constant[name] = address
            else:
                return None
        return made

    def matches(self, ws: Workspace, buffers: dict[str, torch.Tensor], slot: int, alpha: float | None) -> bool:
        """These are the slot decisions ``of_last_call`` would make now (so they can be kept)."""
        if ws.last_plan is not self.plan or alpha != self.alpha or buffers.keys() != self.buffers.keys():
            return False
        if any(buffers[name] is not buffer for name, buffer in self.buffers.items()):
            return False
        args = self.plan.args
        return (all(getattr(args, name) == self.buffers[output][slot].data_ptr() for name, output in self._per_slot.items())
                and all(getattr(args, name) == address for name, address in self._constant.items()))

    def _slot_args(self, slot: int) -> DecideArgs:
        args = DecideArgs()
        ctypes.memmove(ctypes.byref(args), ctypes.byref(self.plan.args), ctypes.sizeof(DecideArgs))
        for name, output in self._per_slot.items():  # the shared pointers come with the copy
            setattr(args, name, self.buffers[output][slot].data_ptr())
        self._args[slot] = args
        return args

    def prepare(self, slot: int, obs: torch.Tensor, params: dict[str, torch.Tensor], lif: LIFConstants,
                v: torch.Tensor, i: torch.Tensor, rate: tuple[torch.Tensor, float] | None,
                stdp_weights: torch.Tensor | None) -> DecideArgs | None:
        """The arguments of a decision into slot ``slot`` of this observation, with the other
        arguments the caller would give ``decide`` (``stdp_weights``: its STDP options' step
        weights, if any); None where they do not serve (then call ``decide``). Nothing is done
        yet: ``run`` does it."""
        B, N = self._B, self._N
        if (slot >= len(self._args) or library() is None  # gsnn.native.torch_only() since the plan was made
                or obs.dtype is not torch.float32 or obs.device.type != "cpu" or obs.shape[0] != B or obs.numel() != B * N or not obs.is_contiguous()
                or (None if rate is None else rate[1]) != self.alpha):
            return None
        with_stdp = self.plan.pins[-1] is not None  # the plan's decisions keep hidden_post
        if not self.plan.serves(_pins(params["input_weight"], params["hidden_bias"], params["readout_weight"],
                                      params["readout_bias"], lif, v, i, None if rate is None else rate[0],
                                      stdp_weights if with_stdp else None)):
            return None
        return self._args[slot] or self._slot_args(slot)

    def run(self, args: DecideArgs, obs: torch.Tensor, uniform: torch.Tensor) -> tuple[float, float, bool]:
        """The decision ``prepare`` made ready (``obs`` the same), sampled with ``uniform`` (B
        numbers in [0, 1)): returns (observation sum, spikes, whether the logits are finite), as
        ``decide``'s Decision has them. Raises ``NonFiniteObservation`` (state untouched) as it does."""
        if uniform.dtype is not torch.float32 or uniform.numel() != self._B or not uniform.is_contiguous():
            raise ValueError(f"decide: uniform must be {self._B} contiguous float32 numbers")
        args.obs, args.uniform = obs.data_ptr(), uniform.data_ptr()
        if library().gsnn_decide(ctypes.byref(args)) != 0:
            raise NonFiniteObservation("observation holds NaN or Inf")
        obs_sum, spikes, logit_sum = args.sums
        return obs_sum, spikes, math.isfinite(logit_sum)

    def actions(self, slot: int) -> torch.Tensor:
        """Slot ``slot``'s actions (B,), int64 (a view of the buffer)."""
        return self._actions[slot]


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


def sample_actions(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """The first action whose cumulative probability exceeds u (the last if rounding leaves the
    total below u): inverse-CDF sampling, as kernels.c does it."""
    below = (probs.cumsum(dim=1) <= uniform.unsqueeze(1)).sum(dim=1)
    return below.clamp_max(probs.shape[1] - 1)


@torch.no_grad()
def _decide_torch(obs, params, lif, v, i, steps, choose, uniform, keep, stdp, rate, out) -> Decision:
    obs_sum = obs.sum()
    if not bool(torch.isfinite(obs_sum)):
        raise NonFiniteObservation("observation holds NaN or Inf")
    if "obs" in keep:
        out["obs"].copy_(obs)
    if "inputs" in keep:  # world after world, each world's in increasing order: nonzero's order
        rows, cols = torch.nonzero(obs, as_tuple=True)
        out["inputs"][: cols.numel()].copy_(cols)
        out["input_values"][: cols.numel()].copy_(obs[rows, cols])
        out["input_counts"][: obs.shape[0]].copy_(torch.bincount(rows, minlength=obs.shape[0]))
    x = input_current_torch(obs, params["input_weight"], params["hidden_bias"])
    for name, value in (("x", x), ("v0", v), ("i0", i)):
        if name in keep:
            out[name].copy_(value)
    weights = stdp.step_weights if "hidden_post" in keep else None
    bits = torch.zeros_like(x) if "spikes" in keep else None
    counts, factor = lif_decision_fast(x, v, i, lif, steps, stdp_weights=weights, spike_bits=bits)
    out["counts"].copy_(counts)
    if bits is not None:
        out["spikes"].copy_(bits)  # integers below 2^15: exact in float32 and int16
    W_out = params["readout_weight"]
    # F.linear with a contiguous (A, H) weight is about 4x faster on the CPU than addmm with (H, A)
    logits = torch.nn.functional.linear(counts, W_out.T.contiguous(), params["readout_bias"])
    out["logits"].copy_(logits)
    actions = out.get("actions")
    if choose == "greedy":
        actions.copy_(logits.argmax(dim=1))
    elif choose == "sample":
        probs = torch.softmax(logits, dim=1)
        actions.copy_(sample_actions(probs, uniform))
        if "action_post" in keep or "hidden_post" in keep:
            action_post = F.one_hot(actions, logits.shape[1]).to(probs.dtype) - probs
            if "action_post" in keep:
                out["action_post"].copy_(action_post)
            if "hidden_post" in keep:
                feedback = action_post @ W_out.T
                torch.mul(factor, feedback, out=out["hidden_post"])
    if rate is not None:
        rate_ema, alpha = rate
        rate_ema.mul_(1 - alpha).add_(counts.mean(0), alpha=alpha / steps)
        rate_ema.masked_fill_(rate_ema < TINY, 0.0)  # no subnormal rates (as the C decision)
    kept = [part for name in keep for part in (INPUT_RECORD if name == "inputs" else (name,))]
    return Decision(out["counts"], out["logits"], actions, obs_sum, counts.sum(),
                    bool(torch.isfinite(logits).all()), {k: out[k] for k in kept})


def reinforce_backward(obs: torch.Tensor, v0: torch.Tensor, i0: torch.Tensor, g_logits: torch.Tensor,
                       params: dict[str, torch.Tensor], lif: LIFConstants, steps: int) -> dict[str, torch.Tensor]:
    """The gradient of every parameter for R decisions (rows), given g_logits = dL/dlogits (R, A):
    each decision is recomputed from its observation and the LIF state it started from (v0, i0),
    then differentiated through the readout and Norse's SuperSpike surrogate over its T steps
    (``gsnn.neurons.surrogate_backward_torch`` has the recursion). Keeping only (obs, v0, i0) per
    decision, not the input current and spike counts as well, halves what a rollout stores and
    what the update reads."""
    W, b, W_out = params["input_weight"], params["hidden_bias"], params["readout_weight"]
    (R, N), (H, A) = obs.shape, W_out.shape
    grads = {"readout_bias": g_logits.sum(0)}
    if not use_native(obs.device):
        x = input_current_torch(obs, W, b)
        counts, _ = lif_decision_fast(x, v0.clone(), i0.clone(), lif, steps)
        gx = surrogate_backward_torch(x, v0, i0, g_logits @ W_out.T, lif, steps)
        return dict(grads, input_weight=obs.T @ gx, hidden_bias=gx.sum(0), readout_weight=counts.T @ g_logits)
    obs, v0, i0, g_logits, W, b, W_out = map(_c, (obs, v0, i0, g_logits, W, b, W_out))
    grads.update(input_weight=torch.empty(N, H), hidden_bias=torch.empty(H), readout_weight=torch.empty(H, A))
    _check(library().gsnn_reinforce_backward(
        R, N, H, steps, A, obs.data_ptr(), v0.data_ptr(), i0.data_ptr(), g_logits.data_ptr(), W.data_ptr(),
        b.data_ptr(), W_out.data_ptr(), lif.tensor.data_ptr(), grads["input_weight"].data_ptr(),
        grads["hidden_bias"].data_ptr(), grads["readout_weight"].data_ptr()))
    return grads


def rstdp_directions(obs: torch.Tensor, hidden_post: torch.Tensor, counts: torch.Tensor,
                     action_post: torch.Tensor, weights: torch.Tensor, scale: float) -> dict[str, torch.Tensor]:
    """R-STDP's update directions for R decisions (rows; see ``gsnn.plasticity.rstdp_directions``):
    each decision's eligibility weighted by ``weights`` (its advantage), summed, times ``scale``."""
    if not use_native(obs.device):
        hidden_mod, action_mod = hidden_post * weights.unsqueeze(1), action_post * weights.unsqueeze(1)
        return {"input_weight": (obs.T @ hidden_mod).mul_(scale), "hidden_bias": hidden_mod.sum(0).mul_(scale),
                "readout_weight": (counts.T @ action_mod).mul_(scale), "readout_bias": action_mod.sum(0).mul_(scale)}
    obs, hidden_post, counts, action_post, weights = map(_c, (obs, hidden_post, counts, action_post, weights))
    (R, N), (H, A) = obs.shape, (counts.shape[1], action_post.shape[1])
    out = {"input_weight": torch.empty(N, H), "hidden_bias": torch.empty(H), "readout_weight": torch.empty(H, A),
           "readout_bias": torch.empty(A)}
    _check(library().gsnn_rstdp_directions(
        R, N, H, A, obs.data_ptr(), hidden_post.data_ptr(), counts.data_ptr(), action_post.data_ptr(),
        weights.data_ptr(), scale, *(out[k].data_ptr() for k in ("input_weight", "hidden_bias", "readout_weight",
                                                                  "readout_bias"))))
    return out


def spike_factors(spikes: torch.Tensor, step_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The counts and STDP factors of spike bits (``decide``'s "spikes": bit t = step t): each
    pattern's factor is the sum of ``step_weights`` over its set bits in step order, as the
    decision sums it (a table of the 2^T patterns, each the sum for the pattern without its
    highest step plus that step's weight). Returns (counts, factors), float32 like ``spikes``."""
    table = torch.zeros(1, dtype=torch.float32, device=spikes.device)
    popcounts = torch.zeros(1, dtype=torch.float32, device=spikes.device)
    for weight in step_weights.to(device=spikes.device, dtype=torch.float32):  # patterns with step t on top
        table, popcounts = torch.cat([table, table + weight]), torch.cat([popcounts, popcounts + 1.0])
    index = spikes.long() & (table.shape[0] - 1)
    return popcounts[index], table[index]


def rstdp_directions_from_spikes(inputs: torch.Tensor | ActiveInputs, spikes: torch.Tensor,
                                 action_post: torch.Tensor, readout_weight: torch.Tensor, step_weights: torch.Tensor,
                                 weights: torch.Tensor, scale: float) -> dict[str, torch.Tensor]:
    """``rstdp_directions`` from the decisions' spike bits (R, H) int16 instead of their post
    factors and counts: the counts are the bits' popcount, the post factor the STDP factor of the
    bits (``spike_factors``) times the feedback ``readout_weight @ action_post``, with the readout
    weights the decisions used (they change only at updates). The decisions' inputs are their
    observations (R, N) or their record (``ActiveInputs``, R = L * B). Bit for bit the directions
    of the post factors and counts the decisions would have kept (the C path; the torch twin
    within rounding)."""
    T = step_weights.shape[0]
    if not 1 <= T <= SPIKE_BITS_MAX_STEPS:
        raise ValueError(f"spike bits need 1 to {SPIKE_BITS_MAX_STEPS} steps, got {T}")
    (H, A), R = readout_weight.shape, spikes.shape[0]
    record = inputs if isinstance(inputs, ActiveInputs) else None
    if record is not None:
        (L, B), N = record.counts.shape, record.inputs.shape[1] // max(record.counts.shape[1], 1)
        if (L * B != R or record.inputs.shape != (L, B * N) or record.values.shape != (L, B * N)
                or record.inputs.dtype != torch.int32 or record.values.dtype != torch.float32
                or record.counts.dtype != torch.int32):
            raise ValueError(f"inputs: an ActiveInputs of {R} decisions in slots of B worlds (int32 inputs and counts, "
                             "float32 values)")
    else:
        N = inputs.shape[1]
    device = spikes.device
    if not use_native(device):
        obs = record.dense(N) if record is not None else inputs
        counts, factors = spike_factors(spikes, step_weights)
        hidden_post = factors * (action_post @ readout_weight.T)
        return rstdp_directions(obs, hidden_post, counts, action_post, weights, scale)
    action_post, wout, step_weights, weights = map(_c, (action_post, readout_weight, step_weights, weights))
    spikes = spikes.contiguous()
    if spikes.dtype != torch.int16 or tuple(spikes.shape) != (R, H):
        raise ValueError(f"spikes must be int16 of shape {(R, H)}, got {spikes.dtype} {tuple(spikes.shape)}")
    if record is not None:
        obs, lists = None, [t.contiguous() for t in (record.inputs, record.values, record.counts)]
    else:
        obs, lists, B = _c(inputs), [None] * 3, 0
    out = {"input_weight": torch.empty(N, H), "hidden_bias": torch.empty(H), "readout_weight": torch.empty(H, A),
           "readout_bias": torch.empty(A)}
    _check(library().gsnn_rstdp_directions_from_spikes(
        R, N, H, A, T, _ptr(obs), B, *map(_ptr, lists), spikes.data_ptr(), wout.data_ptr(), step_weights.data_ptr(),
        action_post.data_ptr(), weights.data_ptr(), scale,
        *(out[k].data_ptr() for k in ("input_weight", "hidden_bias", "readout_weight", "readout_bias"))))
    return out


UPDATE_ORDER = ("input_weight", "hidden_bias", "readout_weight", "readout_bias")  # gsnn_rstdp_update's


@dataclass
class UpdateResult:
    """What ``rstdp_update`` did."""

    sum_squares: float  # of all the directions: the global gradient norm squared
    stepped: bool  # False: the norm was not finite and nothing was stepped
    finite: bool  # every stepped parameter is finite (True if not stepped)
    directions: dict[str, torch.Tensor]  # the update directions (before the clip), of UPDATE_ORDER


def rstdp_update(record: ActiveInputs, spikes: torch.Tensor, action_post: torch.Tensor, rewards: torch.Tensor,
                 dones: torch.Tensor, discount: float, step_weights: torch.Tensor, params: dict[str, torch.Tensor],
                 exp_avg: dict[str, torch.Tensor], exp_avg_sq: dict[str, torch.Tensor], grad_clip: float,
                 adam: tuple[float, float, float, float, float]) -> UpdateResult:
    """One R-STDP update of a rollout of L steps of B worlds on the C path, in one call
    (``gsnn_rstdp_update``): ``advantages`` of ``rewards`` and ``dones`` (L, B), the directions
    ``rstdp_directions_from_spikes`` of the decisions' record (``record``, ``spikes`` (L, B, H)
    int16, ``action_post`` (L, B, A)) with scale -1 / (L B) and the readout weights in
    ``params``, the global norm, and if it is finite the Adam step of each parameter (``params``
    and its moments in place; ``adam`` = (beta1, beta2, step_size, bias2_sqrt, eps) of
    ``adam_step``) with the directions clipped to ``grad_clip``. Bit for bit those functions
    called one after another, as ``gsnn.organism`` did before."""
    L, B = rewards.shape
    N, H = params["input_weight"].shape
    A, T = params["readout_bias"].shape[0], step_weights.shape[0]
    expected = {"rewards": (rewards, (L, B), torch.float32), "dones": (dones, (L, B), torch.bool),
                "spikes": (spikes, (L, B, H), torch.int16), "action_post": (action_post, (L, B, A), torch.float32),
                "record.inputs": (record.inputs, (L, B * N), torch.int32),
                "record.values": (record.values, (L, B * N), torch.float32),
                "record.counts": (record.counts, (L, B), torch.int32),
                "step_weights": (step_weights, (T,), torch.float32)}
    for name in UPDATE_ORDER:
        shape = tuple(params[name].shape)
        expected.update({name: (params[name], shape, torch.float32), f"exp_avg.{name}": (exp_avg[name], shape, torch.float32),
                         f"exp_avg_sq.{name}": (exp_avg_sq[name], shape, torch.float32)})
    if not 1 <= T <= SPIKE_BITS_MAX_STEPS or params["hidden_bias"].shape != (H,) or tuple(params["readout_weight"].shape) != (H, A):
        raise ValueError(f"rstdp_update: parameters of one network of {N} inputs, {H} neurons and {A} actions, "
                         f"and 1 to {SPIKE_BITS_MAX_STEPS} steps, expected")
    for name, (tensor, shape, dtype) in expected.items():  # the C kernel reads and writes them unchecked
        if tensor.shape != shape or tensor.dtype != dtype or not tensor.is_contiguous() or tensor.device.type != "cpu":
            raise ValueError(f"rstdp_update: {name} must be a contiguous {dtype} CPU tensor of shape {shape}, "
                             f"got {tuple(tensor.shape)} {tensor.dtype}")
    adv = torch.empty(L * B)
    directions = {name: torch.empty_like(params[name]) for name in UPDATE_ORDER}
    pointers = lambda tensors: (_P * 4)(*(tensor.data_ptr() for tensor in tensors))  # noqa: E731
    beta1, beta2, step_size, bias2_sqrt, eps = adam
    args = RSTDPUpdateArgs(
        L=L, B=B, N=N, H=H, A=A, T=T, rewards=rewards.data_ptr(), dones=dones.data_ptr(), discount=discount,
        inputs=record.inputs.data_ptr(), input_values=record.values.data_ptr(), input_counts=record.counts.data_ptr(),
        spikes=spikes.data_ptr(), action_post=action_post.data_ptr(), stdp_w=step_weights.data_ptr(),
        adv=adv.data_ptr(), param=pointers(params[k] for k in UPDATE_ORDER),
        grad=pointers(directions[k] for k in UPDATE_ORDER), m=pointers(exp_avg[k] for k in UPDATE_ORDER),
        v=pointers(exp_avg_sq[k] for k in UPDATE_ORDER), grad_clip=grad_clip, beta1=beta1, beta2=beta2,
        step_size=step_size, bias2_sqrt=bias2_sqrt, eps=eps)
    status = library().gsnn_rstdp_update(ctypes.byref(args))
    if status not in (0, 1):
        _check(status)
    stepped = status == 0
    finite = not stepped or all(math.isfinite(total) for total in args.param_sum)
    return UpdateResult(args.sum_squares, stepped, finite, directions)


def advantages(rewards: torch.Tensor, dones: torch.Tensor, discount: float) -> torch.Tensor:
    """(L, B) advantages of a rollout: discounted returns, centred per step, scaled to unit
    standard deviation (``gsnn.plasticity.discounted_returns`` and ``advantages`` are the torch
    twin and the definition)."""
    from gsnn import plasticity

    if not use_native(rewards.device):
        return plasticity.advantages(plasticity.discounted_returns(rewards, dones, discount))
    rewards, dones = _c(rewards), dones.contiguous()
    L, B = rewards.shape
    adv = torch.empty(L, B)
    _check(library().gsnn_advantages(L, B, rewards.data_ptr(), dones.data_ptr(), discount, adv.data_ptr()))
    return adv


def sum_squares(tensors) -> float:
    """Sum of the squares of every element of every tensor (NaN or Inf if any is not finite)."""
    tensors = list(tensors)
    if not use_native(tensors[0].device):
        return float(torch.stack([t.double().square().sum() for t in tensors]).sum())
    return sum(library().gsnn_sum_squares(t.numel(), _c(t).data_ptr()) for t in tensors)


def adam_step(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
              scale: float, beta1: float, beta2: float, step_size: float, bias2_sqrt: float, eps: float) -> float:
    """One Adam step of one parameter in place (``gsnn.adam`` has the formula) with the gradient
    multiplied by ``scale`` first. Returns the sum of the new parameter values (not finite if any
    is not). Every tensor must be contiguous float32 on the CPU (the C path only)."""
    if grad.shape != param.shape:  # read through a raw pointer: a smaller one would be read beyond its end
        raise ValueError(f"adam_step: the gradient's shape {tuple(grad.shape)} is not the parameter's {tuple(param.shape)}")
    for tensor in (param, exp_avg, exp_avg_sq):
        if not tensor.is_contiguous() or tensor.dtype != torch.float32 or tensor.shape != param.shape:
            raise ValueError("adam_step updates contiguous float32 tensors of one shape in place")
    return library().gsnn_adam(param.numel(), param.data_ptr(), _c(grad).data_ptr(), exp_avg.data_ptr(),
                               exp_avg_sq.data_ptr(), scale, beta1, beta2, step_size, bias2_sqrt, eps)
