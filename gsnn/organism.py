"""The organism: input -> hidden LIF layer that grows and prunes itself -> readout to action logits.

An ``Organism`` owns its tensors, its topology and its random stream, and decides for a whole
batch of worlds at once. Per decision: the input current is computed once from the (sparse)
observation, the hidden layer runs ``snn_steps`` Norse LIF steps with it, and the action logits
are the hidden spike counts through a linear readout (``logits = counts @ W_out + b_out``). The
LIF state (membrane potential, synaptic current) of each world carries over from one decision to
the next and is not differentiated through between decisions, so learning never backpropagates
through an episode. The loops of a decision and of an update are ``gsnn.kernels`` (C on the CPU,
torch ops on a GPU); REINFORCE's gradient is written out (``gsnn.plasticity``), so no autograd
graph is ever built.

Growth and pruning are checked at the end of a learning rollout, once at least ``grow_interval``
(``prune_interval``) decision steps have passed since the last check: prune first (neurons whose
firing-rate EMA is below ``prune_threshold``, older than ``prune_grace``, never below
``min_hidden``; the quietest go first), then grow ``neurons_per_grow`` neurons if the layer's mean
rate is below ``grow_threshold`` (never above ``max_hidden``). Every surviving neuron keeps its
weights, LIF state, rate statistics and Adam moments exactly; newborn neurons start with zero
Adam moments and a rate EMA equal to the layer mean (so they neither trigger nor block growth).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from gsnn import checkpoint, kernels, plasticity
from gsnn.adam import Adam
from gsnn.config import ConfigError, OrganismConfig
from gsnn.energy import decision_energy
from gsnn.neurons import lif_constants, stdp_step_weights

CHECKPOINT_FORMAT = "gsnn-organism"
CHECKPOINT_VERSION = 2  # 2: the optimizer section is gsnn.adam.Adam's (1 was torch.optim.Adam's)

# Settings a rollout's record depends on: changed between rollouts only (Organism.set_config).
# rollout_length sizes the rollout's buffers, allocated at its first decision.
RECORD_SETTINGS = ("learning_rule", "snn_steps", "stdp_trace_decay", "stdp_depression", "rollout_length")
# Settings that fix the shape of the weights: never changed on a living organism.
SHAPE_SETTINGS = ("n_inputs", "n_actions")
# Parameter name -> the axis that indexes hidden neurons (None: no neuron axis).
NEURON_AXIS = {"input_weight": 1, "hidden_bias": 0, "readout_weight": 0, "readout_bias": None}


class NonFiniteError(RuntimeError):
    """Learning produced NaN or Inf that the organism could not recover from."""


@dataclass
class Stats:
    decision_steps: int = 0  # learning decision steps (one per batch step)
    updates: int = 0
    grow_events: int = 0
    neurons_added: int = 0
    prune_events: int = 0
    neurons_removed: int = 0
    nonfinite_updates_skipped: int = 0
    events: list = field(default_factory=list)  # (decision_step, "grow"|"prune", n, hidden_after)


class EnergyMeter:
    """Averages ``gsnn.energy.decision_energy`` over many decisions of many worlds.

    At a fixed hidden size every quantity of ``decision_energy`` is affine in the active inputs
    and hidden spikes of a decision, so the mean of the energies is the energy of the means: the
    meter keeps, per hidden size, the worlds' decisions and the sums of active inputs and spikes
    (on a GPU as device tensors, read only by ``report``). Its size never grows with time."""

    def __init__(self, config: OrganismConfig):
        self.config = config
        self.reset()

    def reset(self):
        self.world_decisions = 0
        self._totals: dict[int, list] = {}  # hidden -> [world decisions, active inputs, hidden spikes]

    def add(self, active_inputs, hidden_spikes, worlds: int, hidden: int):
        """One decision of ``worlds`` worlds: their summed active inputs and hidden spikes
        (Python floats or 0-dim tensors)."""
        if isinstance(active_inputs, torch.Tensor):
            active_inputs, hidden_spikes = active_inputs.detach().double(), hidden_spikes.detach().double()
        totals = self._totals.get(hidden)
        if totals is None:
            self._totals[hidden] = [worlds, active_inputs, hidden_spikes]
        else:
            totals[0] += worlds
            totals[1] = totals[1] + active_inputs
            totals[2] = totals[2] + hidden_spikes
        self.world_decisions += worlds

    def report(self) -> dict[str, float]:
        """Means per decision of one world since the last reset (empty dict if none)."""
        if not self.world_decisions:
            return {}
        c, sums = self.config, {}
        for hidden, (worlds, active, spikes) in self._totals.items():
            active, spikes = float(active) / worlds, float(spikes) / worlds
            energy = decision_energy(active, spikes, hidden, c.n_inputs, c.n_actions, c.snn_steps)
            per_decision = dict(energy.as_dict(), active_inputs_per_decision=active,
                                hidden_spikes_per_decision=spikes, hidden_neurons=float(hidden))
            for key, value in per_decision.items():
                sums[key] = sums.get(key, 0.0) + value * worlds
        return {key: total / self.world_decisions for key, total in sums.items()}


class Rollout:
    """The decisions of one learning rollout, recorded in place.

    Each recorded quantity lives in a buffer of shape (rollout_length, B, ...) allocated at the
    first decision of a batch size and hidden size and reused while they last (growth and pruning
    happen between rollouts), so a decision writes its record into the next slot (the C decision
    kernel writes there directly) with no allocation, and the update reads the filled part
    without stacking anything. Each buffer's slot views are made once, when it is allocated, and a
    spec checked at slot 0 of a rollout is not checked again until the next one. On the C path a
    rollout's later decisions skip even that: the organism keeps the C decision's arguments of
    every slot (``kernels.SlotDecisions``, made from the rollout's first decision)."""

    def __init__(self):
        self.decisions = 0  # decisions recorded
        self.rewarded = 0  # of which learn_feedback gave the rewards
        self._buffers: dict[str, torch.Tensor] = {}
        self._views: dict[str, tuple[torch.Tensor, ...]] = {}  # name -> its buffer's slots
        self._checked: dict[int, dict] = {}  # id(spec) -> spec, for specs checked in this rollout
        self._feedback_specs: dict[int, dict] = {}  # batch size -> record_feedback's spec

    def __len__(self) -> int:
        return self.decisions

    def slots(self, spec: dict[str, tuple[tuple[int, ...], torch.dtype]], index: int, length: int,
              device: torch.device) -> dict[str, torch.Tensor]:
        """Views of slot ``index`` of each buffer of ``spec`` (name -> (shape, dtype)), the
        buffers (re)allocated with ``length`` slots if they do not fit (only at slot 0). Pass the
        same spec object for every decision of a rollout (its check is remembered)."""
        if index and self._checked.get(id(spec)) is spec:
            try:
                return {name: self._views[name][index] for name in spec}
            except IndexError:
                pass  # beyond the buffers: the check below says so
        for name, (shape, dtype) in spec.items():
            buffer = self._buffers.get(name)
            # at slot 0 a buffer must hold the whole rollout (rollout_length may have grown since)
            slots_needed = max(length, index + 1)
            if buffer is None or buffer.shape[1:] != shape or buffer.shape[0] < slots_needed or buffer.dtype != dtype:
                if index:
                    raise RuntimeError(f"rollout buffer {name} changed shape in the middle of a rollout")
                buffer = torch.empty((slots_needed, *shape), dtype=dtype, device=device)
                self._buffers[name], self._views[name] = buffer, buffer.unbind(0)
        self._checked[id(spec)] = spec
        return {name: self._views[name][index] for name in spec}

    def record_feedback(self, reward: torch.Tensor, done: torch.Tensor, length: int) -> None:
        """The rewards of the oldest decision that has none yet."""
        if self.rewarded >= self.decisions:
            raise RuntimeError("learn_feedback without a decision to reward (call learn_act first)")
        batch = reward.shape[0]
        spec = self._feedback_specs.get(batch)
        if spec is None or spec["done"][0][0] != done.shape[0]:
            spec = {"reward": ((batch,), torch.float32), "done": ((done.shape[0],), torch.bool)}
            self._feedback_specs[batch] = spec
        slots = self.slots(spec, self.rewarded, length, reward.device)
        slots["reward"].copy_(reward)
        slots["done"].copy_(done)
        self.rewarded += 1

    def __getstate__(self) -> dict:
        """Pickled without the slot views (pickle would store them as tensors of their own,
        no longer views of the buffers); ``__setstate__`` makes them anew."""
        return dict(self.__dict__, _views=None)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._views = {name: buffer.unbind(0) for name, buffer in self._buffers.items()}

    def buffers(self, spec: dict) -> dict[str, torch.Tensor]:
        """The whole buffers of ``spec``'s names (checked at this rollout's slot 0), (L, ...) each."""
        return {name: self._buffers[name] for name in spec}

    def recorded(self, name: str) -> bool:
        """Whether this rollout's decisions record ``name`` (a buffer of an earlier rollout may
        still exist)."""
        return any(name in spec for spec in self._checked.values())

    def view(self, name: str) -> torch.Tensor:
        """The filled part of one buffer, (decisions, B, ...)."""
        return self._buffers[name][: self.decisions]

    def complete(self) -> bool:
        """Every recorded decision has its rewards."""
        return self.decisions > 0 and self.rewarded == self.decisions

    def clear(self) -> None:
        self.decisions = self.rewarded = 0
        self._checked.clear()


class Organism:
    def __init__(self, config: OrganismConfig | None = None, device: str | torch.device = "cpu"):
        self.config = (config or OrganismConfig()).validate()
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(self.config.seed)
        self._adopt_neuron_settings()
        H = self.config.init_hidden
        self.params = self._newborn_params(H)
        self.params["readout_bias"] = torch.zeros(self.config.n_actions, device=self.device)
        self.optimizer = Adam(self.params, lr=self.config.learning_rate)
        self._workspace = kernels.Workspace()
        self.rate_ema = torch.zeros(H, device=self.device)
        self.birth_step = torch.zeros(H, dtype=torch.long, device=self.device)
        self.last_grow_check = 0
        self.last_prune_check = 0
        self.stats = Stats()
        self.energy = EnergyMeter(self.config)
        self.v: torch.Tensor | None = None  # (B, H) membrane potential per world
        self.i: torch.Tensor | None = None  # (B, H) synaptic current per world
        self._rollout = Rollout()
        self._record_cache = None  # (key, (spec, keep, stdp), STDP step weights): see _learner_record
        self._slot_decisions: kernels.SlotDecisions | None = None  # see learn_act
        self._slot_rollout: Rollout | None = None  # the rollout they were kept for
        self._consecutive_nonfinite = 0

    def __getstate__(self) -> dict:
        """A copy (copy, deepcopy, pickle) keeps no slot decisions: their raw pointers point into
        this organism's tensors (the workspace is copied empty for the same reason)."""
        return dict(self.__dict__, _slot_decisions=None, _slot_rollout=None)

    # -- shape ---------------------------------------------------------------------------------
    @property
    def hidden_neurons(self) -> int:
        return int(self.params["hidden_bias"].shape[0])

    def _newborn_params(self, n: int) -> dict[str, torch.Tensor]:
        c, g, dev = self.config, self.generator, self.device
        return {
            "input_weight": torch.randn(c.n_inputs, n, generator=g, device=dev) * c.input_weight_std,
            "hidden_bias": torch.full((n,), c.hidden_bias_init, device=dev),
            "readout_weight": torch.randn(n, c.n_actions, generator=g, device=dev) * c.readout_weight_std,
        }

    def _adopt_neuron_settings(self) -> None:
        """The LIF constants and STDP step weights of the current config."""
        c = self.config
        self.lif = lif_constants(c)
        self._stdp_weights = stdp_step_weights(c.stdp_trace_decay, c.snn_steps, c.stdp_depression)

    def _resize(self, transform) -> None:
        """Apply ``transform(tensor, axis)`` to every per-neuron tensor: parameters, Adam moments,
        rate statistics and LIF state. Nothing else about them changes."""
        for name in list(self.params):
            axis = NEURON_AXIS[name]
            if axis is None:
                continue
            moments = self.optimizer.moments(name)
            if moments:
                self.optimizer.set_moments(
                    name, *(transform(moments[key], axis, name, moment=True) for key in ("exp_avg", "exp_avg_sq"))
                )
            self.params[name] = transform(self.params[name], axis, name, moment=False)
        self.rate_ema = transform(self.rate_ema, 0, "rate_ema", moment=False)
        self.birth_step = transform(self.birth_step, 0, "birth_step", moment=False)
        if self.v is not None:
            self.v = transform(self.v, 1, "v", moment=False)
            self.i = transform(self.i, 1, "i", moment=False)

    def grow(self, n: int) -> int:
        """Add up to ``n`` neurons (never beyond max_hidden). Returns how many were added.
        Between rollouts only, as ``prune``: a rollout's record has the hidden size it was
        decided with, and its update needs that size."""
        self._between_rollouts("grow")
        n = min(int(n), self.config.max_hidden - self.hidden_neurons)
        if n <= 0:
            return 0
        newborn = self._newborn_params(n)
        layer_mean = self.rate_ema.mean() if self.hidden_neurons else torch.zeros((), device=self.device)

        def extend(tensor, axis, name, moment):
            shape = list(tensor.shape)
            shape[axis] = n
            if moment:
                extra = torch.zeros(shape, dtype=tensor.dtype, device=tensor.device)
            elif name in newborn:
                extra = newborn[name]
            elif name == "rate_ema":
                extra = layer_mean.expand(n).clone()
            elif name == "birth_step":
                extra = torch.full(shape, self.stats.decision_steps, dtype=tensor.dtype, device=tensor.device)
            elif name == "v":
                extra = torch.full(shape, float(self.config.v_leak), dtype=tensor.dtype, device=tensor.device)
            else:  # i
                extra = torch.zeros(shape, dtype=tensor.dtype, device=tensor.device)
            return torch.cat((tensor, extra), dim=axis)

        self._resize(extend)
        self.stats.grow_events += 1
        self.stats.neurons_added += n
        self.stats.events.append((self.stats.decision_steps, "grow", n, self.hidden_neurons))
        return n

    def prune(self, remove: torch.Tensor) -> int:
        """Remove the neurons where the boolean mask ``remove`` (H,) is True, never below
        min_hidden (a mask that would is refused, nothing removed). Returns how many. Between
        rollouts only (see ``grow``)."""
        self._between_rollouts("prune")
        H = self.hidden_neurons
        if not isinstance(remove, torch.Tensor) or remove.dtype != torch.bool or remove.shape != (H,):
            raise ValueError(f"prune: the mask must be a bool tensor of shape ({H},), one value per hidden neuron, "
                             f"got {getattr(remove, 'dtype', type(remove).__name__)} "
                             f"{tuple(getattr(remove, 'shape', ()))}")
        remove = remove.to(self.device)
        n = int(remove.sum())
        if n == 0:
            return 0
        if H - n < self.config.min_hidden:
            raise ValueError(f"prune: removing {n} of {H} neurons would leave {H - n}, "
                             f"below min_hidden ({self.config.min_hidden})")
        keep = torch.nonzero(~remove).squeeze(1)
        self._resize(lambda tensor, axis, name, moment: tensor.index_select(axis, keep))
        self.stats.prune_events += 1
        self.stats.neurons_removed += n
        self.stats.events.append((self.stats.decision_steps, "prune", n, self.hidden_neurons))
        return n

    def _between_rollouts(self, what: str) -> None:
        if len(self._rollout):
            raise RuntimeError(f"{what}() in the middle of a rollout; call it between updates")

    def silent_neurons(self) -> torch.Tensor:
        """The mask prune() would get now: rate below prune_threshold, past the grace period,
        the quietest first, keeping at least min_hidden neurons."""
        c = self.config
        age = self.stats.decision_steps - self.birth_step
        candidate = (self.rate_ema < c.prune_threshold) & (age >= c.prune_grace)
        removable = self.hidden_neurons - c.min_hidden
        if removable <= 0:
            return torch.zeros_like(candidate)
        if int(candidate.sum()) > removable:
            quietness = torch.where(candidate, -self.rate_ema, torch.full_like(self.rate_ema, -math.inf))
            chosen = torch.topk(quietness, removable).indices
            candidate = torch.zeros_like(candidate)
            candidate[chosen] = True
        return candidate

    def structural_step(self) -> None:
        """Run the prune and growth checks that are due (see the module docstring)."""
        c, now = self.config, self.stats.decision_steps
        if now - self.last_prune_check >= c.prune_interval:
            self.last_prune_check = now
            self.prune(self.silent_neurons())
        if now - self.last_grow_check >= c.grow_interval:
            self.last_grow_check = now
            if float(self.rate_ema.mean()) < c.grow_threshold:
                self.grow(c.neurons_per_grow)

    # -- state per world -------------------------------------------------------------------------
    def reset_state(self, batch_size: int) -> None:
        H = self.hidden_neurons
        self.v = torch.full((batch_size, H), float(self.config.v_leak), device=self.device)
        self.i = torch.zeros(batch_size, H, device=self.device)
        self._rollout = Rollout()  # a new one: evaluation keeps the learner's (gsnn.train.evaluate)

    def reset_worlds(self, done: torch.Tensor) -> None:
        """Worlds whose episode ended start their next one from a resting state."""
        if self.v is None or not bool(done.any()):
            return
        done = done.to(self.device).unsqueeze(1)
        self.v.masked_fill_(done, float(self.config.v_leak))
        self.i.masked_fill_(done, 0.0)

    def _ensure_state(self, batch_size: int) -> None:
        if self.v is None or self.v.shape[0] != batch_size:
            self.reset_state(batch_size)

    # -- deciding --------------------------------------------------------------------------------
    def _flatten(self, obs: torch.Tensor) -> torch.Tensor:
        obs = obs.to(self.device).reshape(obs.shape[0], -1)
        if obs.shape[1] != self.config.n_inputs:
            raise ValueError(f"observation has {obs.shape[1]} values per world, expected {self.config.n_inputs}")
        return obs

    def _decide(self, obs: torch.Tensor, **options) -> kernels.Decision:
        """One decision of every world (``gsnn.kernels.decide`` with ``options``); NaN or Inf in
        the observation or the logits raise ``NonFiniteError``."""
        self._ensure_state(obs.shape[0])
        try:
            decision = kernels.decide(obs, self.params, self.lif, self.v, self.i, self.config.snn_steps,
                                      workspace=self._workspace, **options)
        except kernels.NonFiniteObservation:
            raise self._nonfinite_observation() from None
        self._count_decision(decision.obs_sum, decision.spikes, decision.logits_finite, obs.shape[0])
        return decision

    def _nonfinite_observation(self) -> NonFiniteError:
        return NonFiniteError(f"observation holds NaN or Inf at decision step {self.stats.decision_steps}")

    def _count_decision(self, obs_sum, spikes, logits_finite: bool, worlds: int) -> None:
        """After a decision: its logits must be finite (NonFiniteError), and the energy meter counts it."""
        if not logits_finite:
            raise NonFiniteError(f"action logits are not finite at decision step {self.stats.decision_steps}")
        self.energy.add(obs_sum, spikes, worlds, self.hidden_neurons)

    def _uniform(self, batch: int) -> torch.Tensor:
        """Uniform numbers in [0, 1) from the organism's own stream, one per world, for sampling."""
        return torch.rand(batch, generator=self.generator, device=self.device)

    def act(self, obs: torch.Tensor, greedy: bool = True) -> torch.Tensor:
        """Decide for every world without learning (fast path). greedy: argmax, else sample."""
        if torch.is_grad_enabled():  # see learn_act
            with torch.no_grad():
                return self.act(obs, greedy)
        obs = self._flatten(obs)
        if greedy:
            return self._decide(obs, choose="greedy").actions
        return self._decide(obs, choose="sample", uniform=self._uniform(obs.shape[0])).actions

    def learn_act(self, obs: torch.Tensor) -> torch.Tensor:
        """Decide (sampling) and record what the learning rule needs of this decision in the
        rollout (REINFORCE: the observation, starting state, logits and action; R-STDP:
        action_post and, with the C kernels and T <= 15, the observation's active inputs and each
        neuron's spikes as bits, else the observation and each neuron's count and post factor)."""
        if torch.is_grad_enabled():
            # autograd never sees a decision (gradients are written out). Entering no_grad costs
            # about 2 us, a few per cent of a decision of 16 worlds: the loops that call this run
            # inside it once (gsnn.train.live, evaluate), so here it is only entered when needed
            with torch.no_grad():
                return self.learn_act(obs)
        slot, alpha = self._rollout.decisions, 1.0 / self.config.rate_window
        if slot and self._slot_decisions is not None and self._slot_rollout is self._rollout:
            actions = self._learn_act_in_slot(slot, obs, alpha)
            if actions is not None:
                return actions
        obs = self._flatten(obs)
        c, B = self.config, obs.shape[0]
        self._ensure_state(B)  # before the slots: a new batch size starts a new rollout
        spec, keep, stdp = self._learner_record(B)
        slot = self._rollout.decisions
        slots = self._rollout.slots(spec, slot, c.rollout_length, self.device)
        decision = self._decide(obs, choose="sample", uniform=self._uniform(B), keep=keep, stdp=stdp,
                                rate=(self.rate_ema, alpha), out=slots)
        self._keep_slot_decisions(spec, slot, alpha)
        self._rollout.decisions += 1
        return decision.actions.clone()  # the slot is reused by later rollouts

    def _keep_slot_decisions(self, spec: dict, slot: int, alpha: float) -> None:
        """After a learning decision through ``decide`` into ``slot``: the C decision's
        arguments for every slot of this rollout's buffers (``kernels.SlotDecisions``), kept
        while the buffers and the decision's plan last (a rollout's later decisions need not
        rebuild them: at 16 worlds that took about a third of a learning decision's time), or
        None (the torch path, or a record they do not cover)."""
        self._slot_rollout = self._rollout
        if not kernels.use_native(self.device):
            self._slot_decisions = None
            return
        buffers, kept = self._rollout.buffers(spec), self._slot_decisions
        if kept is None or not kept.matches(self._workspace, buffers, slot, alpha):
            self._slot_decisions = kernels.SlotDecisions.of_last_call(self._workspace, buffers, slot, alpha)

    def _learn_act_in_slot(self, slot: int, obs: torch.Tensor, alpha: float) -> torch.Tensor | None:
        """``learn_act``'s decision into ``slot`` (not the rollout's first) through the kept slot
        decisions, which the rollout's first decision checked; None where they do not serve
        (another batch size, observation type or plan: then the general path)."""
        fast = self._slot_decisions
        args = fast.prepare(slot, obs, self.params, self.lif, self.v, self.i, (self.rate_ema, alpha),
                            self._stdp_weights)
        if args is None:
            return None
        uniform = self._uniform(obs.shape[0])
        try:
            obs_sum, spikes, logits_finite = fast.run(args, obs, uniform)
        except kernels.NonFiniteObservation:
            raise self._nonfinite_observation() from None
        self._count_decision(obs_sum, spikes, logits_finite, obs.shape[0])
        self._rollout.decisions = slot + 1
        return fast.actions(slot).clone()

    def _learner_record(self, B: int) -> tuple[dict, tuple[str, ...], kernels.STDPOptions | None]:
        """What a learning decision of B worlds records (the rollout's spec: name -> (shape,
        dtype)), the decision kernel's ``keep`` and its STDP options; made once per shape and
        settings, so the rollout sees the same spec object for a whole rollout."""
        c, H = self.config, self.hidden_neurons
        key = (B, c.n_inputs, H, c.n_actions, c.learning_rule, c.stdp_depression)
        cached = self._record_cache
        if cached is not None and cached[0] == key and cached[2] is self._stdp_weights:
            return cached[1]
        f32 = torch.float32
        spec = {"obs": ((B, c.n_inputs), f32), "logits": ((B, c.n_actions), f32), "actions": ((B,), torch.int64)}
        if c.learning_rule == "reinforce":
            keep = ("obs", "v0", "i0")
            spec.update({name: ((B, H), f32) for name in ("v0", "i0")})
            stdp = None
        elif kernels.use_native(self.device) and c.snn_steps <= kernels.SPIKE_BITS_MAX_STEPS:
            # each neuron's spikes as bits (2 bytes), from which the update rebuilds its count and
            # post factor (8 bytes otherwise), and the observation as its active inputs (about
            # 90 bytes instead of its 1.8 KB copy): at H = 512 a world's decision records 1.1 KB
            # instead of 5.8 KB, written here and read back by the update
            keep = ("inputs", "spikes", "action_post")
            del spec["obs"]
            spec.update({name: ((B if name == "input_counts" else B * c.n_inputs,), dtype)
                         for name, dtype in kernels.INPUT_RECORD.items()})
            spec.update(spikes=((B, H), torch.int16), action_post=((B, c.n_actions), f32))
            stdp = None
        else:
            keep = ("obs", "hidden_post", "action_post")
            spec.update(counts=((B, H), f32), hidden_post=((B, H), f32), action_post=((B, c.n_actions), f32))
            stdp = kernels.STDPOptions(self._stdp_weights)
        self._record_cache = (key, (spec, keep, stdp), self._stdp_weights)
        return spec, keep, stdp

    def learn_feedback(self, reward: torch.Tensor, done: torch.Tensor) -> bool:
        """Give the rewards of the last decision; returns True when an update was made (which
        is also when growth and pruning may happen). ``reward`` and ``done`` hold one value per
        world of the last decision."""
        worlds = None if self.v is None else self.v.shape[0]  # None: no decision yet (record_feedback says so)
        if worlds is not None and (reward.shape != (worlds,) or done.shape != (worlds,)):
            raise ValueError(f"learn_feedback: reward and done must hold one value per world of the last decision "
                             f"({worlds}), got shapes {tuple(reward.shape)} and {tuple(done.shape)}")
        if done.dtype != torch.bool:
            raise ValueError(f"learn_feedback: done must be a bool tensor, got {done.dtype}")
        done = done.to(self.device)
        self._rollout.record_feedback(reward.to(self.device, torch.float32), done, self.config.rollout_length)
        self.stats.decision_steps += 1
        self.reset_worlds(done)
        if self._rollout.rewarded < self.config.rollout_length:
            return False
        self._check_lif_state()
        self._update()
        self.structural_step()
        return True

    def _check_lif_state(self) -> None:
        """Before an update: the LIF state must still be finite (once a world's v or i is NaN it
        stays NaN, and the decisions of the rollout are garbage). Raises NonFiniteError and drops
        the rollout. Once per update, not per decision: two float32 sums, about 4 us at 16 worlds
        and hidden 512 (isfinite().all() took 50 us), against about a millisecond for the
        rollout's decisions; a sum that overflows only calls for the exact check."""
        if self.v is None or math.isfinite(float(self.v.sum()) + float(self.i.sum())):
            return
        if bool(torch.isfinite(self.v).all()) and bool(torch.isfinite(self.i).all()):
            return  # finite values whose sum overflowed
        self._rollout.clear()
        weights = max(float(p.abs().max()) for p in self.params.values())
        raise NonFiniteError(
            f"the LIF state (membrane potential or synaptic current) holds NaN or Inf at decision step "
            f"{self.stats.decision_steps} (LIF step factors dt * tau_mem_inv = {self.lif.decay_mem:g}, "
            f"dt * tau_syn_inv = {-self.lif.neg_decay_syn:g}; largest |weight| {weights:g}); "
            "the rollout is dropped, reset_state() restarts the worlds from rest"
        )

    # -- learning ----------------------------------------------------------------------------------
    @torch.no_grad()
    def _update(self) -> None:
        if self._rollout.recorded("spikes") and kernels.use_native(self.device):
            self._rstdp_update_native()
        else:
            self._update_stepwise()

    def _update_stepwise(self) -> None:
        """The update step by step: advantages, the rule's directions, then ``_apply_gradients``."""
        c, rollout = self.config, self._rollout
        adv = kernels.advantages(rollout.view("reward"), rollout.view("done"), c.discount)
        if c.learning_rule == "reinforce":
            grads = plasticity.reinforce_gradients(
                *(rollout.view(k) for k in ("obs", "v0", "i0", "logits", "actions")),
                adv, c.entropy_coef, self.params, self.lif, c.snn_steps,
            )
        elif rollout.recorded("spikes"):
            # the readout weights are the decisions' own: they change only in _apply_gradients below
            inputs = kernels.ActiveInputs(*(rollout.view(k) for k in kernels.INPUT_RECORD))
            grads = plasticity.rstdp_directions_from_spikes(
                inputs, rollout.view("spikes"), rollout.view("action_post"), adv, self.params["readout_weight"],
                self._stdp_weights,
            )
        else:
            grads = plasticity.rstdp_directions(
                *(rollout.view(k) for k in ("obs", "hidden_post", "counts", "action_post")), adv,
            )
        rollout.clear()
        self._apply_gradients(grads)

    def _rstdp_update_native(self) -> None:
        """``_update`` of an R-STDP rollout recorded as spike bits, on the C path: the
        advantages, the directions, the clip and the Adam step in one call
        (``kernels.rstdp_update``), bit for bit ``_update_stepwise`` (R-STDP at 16 worlds learned
        4% faster than through its dozen calls)."""
        c, rollout, optimizer = self.config, self._rollout, self.optimizer
        made = optimizer.ensure_moments(kernels.UPDATE_ORDER)
        try:
            result = kernels.rstdp_update(
                kernels.ActiveInputs(*(rollout.view(k) for k in kernels.INPUT_RECORD)), rollout.view("spikes"),
                rollout.view("action_post"), rollout.view("reward"), rollout.view("done"), c.discount,
                self._stdp_weights, self.params, optimizer.exp_avg, optimizer.exp_avg_sq, c.grad_clip,
                optimizer.next_step())
        except BaseException:
            optimizer.drop_moments(made)
            raise
        rollout.clear()
        if not result.stepped:
            optimizer.drop_moments(made)  # as if the step had been skipped before any moment was made
            self._skip_nonfinite_update()
            return
        optimizer.steps += 1
        self._stepped(result.finite)

    def _apply_gradients(self, grads: dict[str, torch.Tensor]) -> None:
        """Clip the update to ``grad_clip`` (global norm, as torch.nn.utils.clip_grad_norm_) and
        take an Adam step; a non-finite update is skipped and counted (see the config)."""
        total = math.sqrt(kernels.sum_squares(grads.values()))
        if not math.isfinite(total):
            self._skip_nonfinite_update()
            return
        scale = min(1.0, self.config.grad_clip / (total + 1e-6))
        self._stepped(self.optimizer.step(grads, scale))

    def _skip_nonfinite_update(self) -> None:
        """An update whose gradient norm is not finite is skipped and counted; too many in a row
        raise NonFiniteError."""
        self.stats.nonfinite_updates_skipped += 1
        self._consecutive_nonfinite += 1
        if self._consecutive_nonfinite > self.config.max_nonfinite_updates:
            raise NonFiniteError(
                f"{self._consecutive_nonfinite} consecutive updates had NaN/Inf gradients "
                f"(decision step {self.stats.decision_steps}); learning_rate "
                f"{self.config.learning_rate} may be too high"
            )

    def _stepped(self, finite: bool) -> None:
        """After an Adam step: counted, and every parameter must be finite (NonFiniteError)."""
        self._consecutive_nonfinite = 0
        self.stats.updates += 1
        if not finite:
            raise NonFiniteError(f"a parameter became non-finite after update {self.stats.updates}")

    @torch.no_grad()
    def perturb_weights(self, scale: float) -> None:
        """Weight-level explore: add Gaussian noise of ``scale`` x each weight tensor's standard
        deviation to every weight and bias, from the organism's own random stream. Between
        rollouts only: an update rebuilds its decisions' post factors with the readout weights
        they were made with (R-STDP's spike bits)."""
        self._between_rollouts("perturb_weights")
        for param in self.params.values():
            spread = float(param.std()) if param.numel() > 1 else 0.0
            if spread > 0 and scale > 0:
                noise = torch.randn(param.shape, generator=self.generator, device=self.device)
                param.add_(noise * (scale * spread))

    def set_config(self, config: OrganismConfig) -> None:
        """Adopt new settings (PBT's mutations) without touching shape, weights or statistics:
        neuron parameters, learning rate and everything read from the config take effect now.
        What a rollout's record depends on (the learning rule; the SNN steps and the STDP trace
        decay and depression, from which an R-STDP update rebuilds its decisions' post factors)
        changes between rollouts only: mid-rollout that is refused, and the organism is left as it
        was. So is the rollout length (it sizes the rollout's buffers). The number of inputs and
        actions never changes, and [min_hidden, max_hidden] must hold the current hidden size
        (ConfigError, the organism left as it was)."""
        config = config.validate()
        for name in SHAPE_SETTINGS:
            if getattr(config, name) != getattr(self.config, name):
                raise ConfigError(f"{name}: cannot change on a living organism (it has {getattr(self.config, name)}), "
                                  f"got {getattr(config, name)}")
        H = self.hidden_neurons
        if config.max_hidden < H:
            raise ConfigError(f"max_hidden: must be >= the organism's {H} hidden neurons, got {config.max_hidden}")
        if config.min_hidden > H:
            raise ConfigError(f"min_hidden: must be <= the organism's {H} hidden neurons, got {config.min_hidden}")
        if len(self._rollout):
            changed = [name for name in RECORD_SETTINGS if getattr(config, name) != getattr(self.config, name)]
            if changed:
                raise RuntimeError(f"set_config() changes {', '.join(changed)} in the middle of a rollout; "
                                   "call it between updates")
        self.config = config
        self._adopt_neuron_settings()
        self.energy.config = config
        self.optimizer.lr = config.learning_rate

    def finish_rollout(self) -> bool:
        """Learn from a partly filled rollout now (the end of a lifetime or generation), so no
        decision is lost and the organism can be checkpointed. Returns True if it updated."""
        if not self._rollout.complete():
            return False
        self._check_lif_state()
        self._update()
        self.structural_step()
        return True

    # -- checkpoints ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to continue exactly: shape, weights, optimizer, statistics, RNG.
        Refused (NonFiniteError) if a weight, Adam moment, firing rate or LIF state is NaN or
        Inf: a non-finite organism is never checkpointed."""
        if len(self._rollout):
            raise RuntimeError("state_dict() in the middle of a rollout; call it between updates")
        nonfinite = self._nonfinite_parts()
        if nonfinite:
            verb = "holds" if len(nonfinite) == 1 else "hold"
            raise NonFiniteError(f"state_dict(): {', '.join(nonfinite)} {verb} NaN or Inf; "
                                 "a non-finite organism is never checkpointed")
        cpu = lambda t: t.detach().to("cpu").clone()  # noqa: E731
        return {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "config": self.config.to_dict(),
            "hidden_neurons": self.hidden_neurons,
            "params": {name: cpu(p) for name, p in self.params.items()},
            "optimizer": self.optimizer.state_dict(),
            "rate_ema": cpu(self.rate_ema),
            "birth_step": cpu(self.birth_step),
            "last_grow_check": self.last_grow_check,
            "last_prune_check": self.last_prune_check,
            "stats": {
                k: (list(map(list, v)) if k == "events" else v) for k, v in vars(self.stats).items()
            },
            "generator": {"device": self.device.type, "state": self.generator.get_state().clone()},
            "lif_state": None if self.v is None else {"v": cpu(self.v), "i": cpu(self.i)},
            "consecutive_nonfinite": self._consecutive_nonfinite,
        }

    def _nonfinite_parts(self) -> list[str]:
        """The names of the organism's float tensors that hold NaN or Inf."""
        tensors = {f"params.{name}": p for name, p in self.params.items()}
        for key in ("exp_avg", "exp_avg_sq"):
            tensors.update({f"optimizer.{key}.{name}": m for name, m in getattr(self.optimizer, key).items()})
        tensors["rate_ema"] = self.rate_ema
        if self.v is not None:
            tensors.update({"lif_state.v": self.v, "lif_state.i": self.i})
        return [name for name, tensor in tensors.items() if not bool(torch.isfinite(tensor).all())]

    def load_state_dict(self, state: dict) -> None:
        """Become the organism in ``state``, whatever this organism's size was. Transactional:
        the whole state is checked and built into new objects first and assigned only when all
        of it is good, so a refused state (CheckpointError) leaves this organism exactly as it
        was."""
        loaded = _restore(state, self.device)
        # Nothing below can fail: every value was built and checked above.
        self.config = loaded["config"]
        self.lif, self._stdp_weights = loaded["lif"], loaded["stdp_weights"]
        self.params = loaded["params"]
        self.optimizer = loaded["optimizer"]
        self.rate_ema, self.birth_step = loaded["rate_ema"], loaded["birth_step"]
        self.last_grow_check, self.last_prune_check = loaded["last_grow_check"], loaded["last_prune_check"]
        self.stats = loaded["stats"]
        self.energy = EnergyMeter(self.config)
        self.generator = loaded["generator"]
        self.v, self.i = loaded["v"], loaded["i"]
        self._rollout = Rollout()
        self._record_cache = None
        self._consecutive_nonfinite = loaded["consecutive_nonfinite"]

    def save(self, path) -> None:
        checkpoint.save(self.state_dict(), path)

    def load(self, path) -> None:
        self.load_state_dict(checkpoint.load(path))

    @classmethod
    def from_checkpoint(cls, path, device: str | torch.device = "cpu") -> "Organism":
        state = checkpoint.load(path)
        organism = cls(_checked_config(state), device)
        organism.load_state_dict(state)
        return organism


# -- checking a checkpoint's state ------------------------------------------------------------------
_REQUIRED = ("format", "version", "config", "hidden_neurons", "params", "optimizer", "rate_ema", "birth_step",
             "last_grow_check", "last_prune_check", "stats", "generator", "lif_state")
_OPTIONAL = ("consecutive_nonfinite",)  # absent from the first version-2 files
_OPTIMIZER_KEYS = ("lr", "betas", "eps", "steps", "exp_avg", "exp_avg_sq")


def _fail(why: str):
    raise checkpoint.CheckpointError(f"checkpoint refused: {why}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _count(name: str, value) -> int:
    """An integer >= 0 (a counter or a decision step)."""
    if not _is_int(value) or value < 0:
        _fail(f"{name} is {value!r}, expected an integer >= 0")
    return value


def _tensor(name: str, value, dtype: torch.dtype, shape: tuple, finite: bool = True) -> torch.Tensor:
    """A dense tensor of exactly this dtype and shape (finite if asked), as a contiguous copy."""
    if not isinstance(value, torch.Tensor) or value.layout != torch.strided:
        _fail(f"{name} is {type(value).__name__}, expected a tensor")
    if value.dtype != dtype or tuple(value.shape) != shape:
        _fail(f"{name} is {value.dtype} of shape {tuple(value.shape)}, expected {dtype} of shape {shape}")
    if finite and not bool(torch.isfinite(value).all()):
        _fail(f"{name} holds NaN or Inf")
    return value.detach().contiguous()


def _checked_config(state) -> OrganismConfig:
    """The format, version and key set of a state, and its config."""
    if not isinstance(state, dict):
        _fail(f"the state is {type(state).__name__}, expected a dict")
    if state.get("format") != CHECKPOINT_FORMAT:
        _fail(f"format is {state.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
    version = state.get("version")
    if version == 1:
        _fail("version 1 (its optimizer section is torch.optim.Adam's state_dict, written before the organism "
              f"had its own Adam, gsnn.adam) cannot be loaded: this gsnn reads version {CHECKPOINT_VERSION} only")
    if version != CHECKPOINT_VERSION:
        _fail(f"version {version!r}, expected {CHECKPOINT_VERSION}")
    missing = [key for key in _REQUIRED if key not in state]
    if missing:
        _fail(f"missing {', '.join(missing)}")
    unknown = sorted(str(key) for key in state if key not in _REQUIRED + _OPTIONAL)
    if unknown:
        _fail(f"unknown parts {', '.join(unknown)}")
    if not isinstance(state["config"], dict):
        _fail(f"config is {type(state['config']).__name__}, expected a dict of organism settings")
    try:
        return OrganismConfig.from_dict(state["config"], where="config.")
    except (ConfigError, TypeError) as error:
        why = str(error)
    _fail(why)


def _restore(state, device: torch.device) -> dict:
    """Check every part of ``state`` (types, dtypes, shapes, finiteness, key sets) and build the
    organism's new objects from it on ``device``, touching no organism. Any problem, including
    an error that a check did not foresee, is a CheckpointError."""
    try:
        return _build(state, device)
    except checkpoint.CheckpointError:
        raise
    except Exception as error:  # noqa: BLE001 - a state no check foresaw is still only refused
        why = f"{type(error).__name__}: {error}"
    _fail(why)


def _build(state, device: torch.device) -> dict:
    config = _checked_config(state)
    H = state["hidden_neurons"]
    if not _is_int(H) or not config.min_hidden <= H <= config.max_hidden:
        _fail(f"hidden_neurons is {H!r}, expected an integer in the config's [min_hidden, max_hidden] = "
              f"[{config.min_hidden}, {config.max_hidden}]")
    N, A = config.n_inputs, config.n_actions
    shapes = {"input_weight": (N, H), "hidden_bias": (H,), "readout_weight": (H, A), "readout_bias": (A,)}
    to_device = lambda t: t.to(device).clone()  # noqa: E731 - contiguous in, contiguous out

    params = state["params"]
    if not isinstance(params, dict) or set(params) != set(NEURON_AXIS):
        _fail(f"params are {sorted(map(str, params)) if isinstance(params, dict) else type(params).__name__}, "
              f"expected {sorted(NEURON_AXIS)}")
    params = {name: to_device(_tensor(f"params.{name}", params[name], torch.float32, shapes[name]))
              for name in NEURON_AXIS}  # the organism's order of parameters
    rate_ema = to_device(_tensor("rate_ema", state["rate_ema"], torch.float32, (H,)))
    birth_step = _tensor("birth_step", state["birth_step"], torch.int64, (H,), finite=False)
    if bool((birth_step < 0).any()):
        _fail("birth_step holds a negative decision step")
    birth_step = to_device(birth_step)

    optimizer_state = state["optimizer"]
    if not isinstance(optimizer_state, dict) or set(optimizer_state) != set(_OPTIMIZER_KEYS):
        _fail(f"the optimizer section must hold exactly {', '.join(_OPTIMIZER_KEYS)}")
    lr, betas, eps = optimizer_state["lr"], optimizer_state["betas"], optimizer_state["eps"]
    if not _is_real(lr) or lr <= 0:
        _fail(f"optimizer.lr is {lr!r}, expected a finite number > 0")
    if not isinstance(betas, (list, tuple)) or len(betas) != 2 or not all(_is_real(b) and 0 <= b < 1 for b in betas):
        _fail(f"optimizer.betas is {betas!r}, expected two numbers in [0, 1)")
    if not _is_real(eps) or eps <= 0:
        _fail(f"optimizer.eps is {eps!r}, expected a finite number > 0")
    steps = _count("optimizer.steps", optimizer_state["steps"])
    moments = {}
    for key in ("exp_avg", "exp_avg_sq"):
        section = optimizer_state[key]
        if not isinstance(section, dict) or not set(section) <= set(NEURON_AXIS):
            _fail(f"optimizer.{key} must map parameter names ({', '.join(NEURON_AXIS)}) to tensors")
        moments[key] = {name: _tensor(f"optimizer.{key}.{name}", moment, torch.float32, shapes[name])
                        for name, moment in section.items()}
    if set(moments["exp_avg"]) != set(moments["exp_avg_sq"]):
        _fail(f"optimizer.exp_avg has moments of {sorted(moments['exp_avg'])} but optimizer.exp_avg_sq of "
              f"{sorted(moments['exp_avg_sq'])}")
    if any(bool((m < 0).any()) for m in moments["exp_avg_sq"].values()):
        _fail("optimizer.exp_avg_sq holds a negative value")
    optimizer = Adam(params, lr=lr, betas=tuple(betas), eps=eps)
    optimizer.load_state_dict(dict(lr=lr, betas=list(betas), eps=eps, steps=steps, **moments))

    stats_state = state["stats"]
    names = [f.name for f in dataclasses.fields(Stats)]
    if not isinstance(stats_state, dict) or set(stats_state) != set(names):
        _fail(f"stats must hold exactly {', '.join(names)}")
    counters = {name: _count(f"stats.{name}", stats_state[name]) for name in names if name != "events"}
    events = stats_state["events"]
    if not isinstance(events, (list, tuple)):
        _fail(f"stats.events is {type(events).__name__}, expected a list")
    for event in events:
        if (not isinstance(event, (list, tuple)) or len(event) != 4 or event[1] not in ("grow", "prune")
                or not all(_is_int(event[k]) and event[k] >= 0 for k in (0, 2, 3))):
            _fail(f"stats.events holds {event!r}, expected [decision step, 'grow' or 'prune', neurons, hidden after]")
    stats = Stats(**counters, events=[tuple(event) for event in events])
    last_grow_check = _count("last_grow_check", state["last_grow_check"])
    last_prune_check = _count("last_prune_check", state["last_prune_check"])
    consecutive_nonfinite = _count("consecutive_nonfinite", state.get("consecutive_nonfinite", 0))

    generator_state = state["generator"]
    if not isinstance(generator_state, dict) or set(generator_state) != {"device", "state"}:
        _fail("generator must hold exactly device and state")
    if not isinstance(generator_state["device"], str):
        _fail(f"generator.device is {generator_state['device']!r}, expected a device type such as 'cpu'")
    rng = generator_state["state"]
    if not isinstance(rng, torch.Tensor) or rng.dtype != torch.uint8 or rng.ndim != 1:
        _fail("generator.state must be a 1-D uint8 tensor")
    generator = torch.Generator(device=device)
    if generator_state["device"] == device.type:
        try:
            generator.set_state(rng.contiguous())
        except RuntimeError as error:
            generator = f"generator.state: {error}"  # refused below, outside this handler
        if isinstance(generator, str):
            _fail(generator)
    else:  # a CPU generator state cannot seed a GPU generator: derive one, reproducibly
        generator.manual_seed(hash((config.seed, stats.decision_steps)) & (2**63 - 1))

    lif_state, v, i = state["lif_state"], None, None
    if lif_state is not None:
        if not isinstance(lif_state, dict) or set(lif_state) != {"v", "i"}:
            _fail("lif_state must be None or hold exactly v and i")
        v = lif_state["v"]
        if not isinstance(v, torch.Tensor) or v.ndim != 2 or v.shape[0] < 1 or v.shape[1] != H:
            _fail(f"lif_state.v has shape {tuple(getattr(v, 'shape', ()))}, expected (B, {H})")
        shape = tuple(v.shape)
        v = to_device(_tensor("lif_state.v", v, torch.float32, shape))
        i = to_device(_tensor("lif_state.i", lif_state["i"], torch.float32, shape))

    return {
        "config": config, "lif": lif_constants(config),
        "stdp_weights": stdp_step_weights(config.stdp_trace_decay, config.snn_steps, config.stdp_depression),
        "params": params, "optimizer": optimizer, "rate_ema": rate_ema, "birth_step": birth_step,
        "last_grow_check": last_grow_check, "last_prune_check": last_prune_check, "stats": stats,
        "generator": generator, "v": v, "i": i, "consecutive_nonfinite": consecutive_nonfinite,
    }
