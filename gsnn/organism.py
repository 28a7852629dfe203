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

import math
from dataclasses import dataclass, field

import torch

from gsnn import checkpoint, kernels, plasticity
from gsnn.adam import Adam
from gsnn.config import OrganismConfig
from gsnn.energy import decision_energy
from gsnn.neurons import lif_constants, stdp_step_weights

CHECKPOINT_FORMAT = "gsnn-organism"
CHECKPOINT_VERSION = 2  # 2: the optimizer section is gsnn.adam.Adam's (1 was torch.optim.Adam's)

# Settings a rollout's record depends on: changed between rollouts only (Organism.set_config).
RECORD_SETTINGS = ("learning_rule", "snn_steps", "stdp_trace_decay", "stdp_depression")
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
    spec checked at slot 0 of a rollout is not checked again until the next one: a decision's
    Python costs next to nothing (at 16 worlds it is as long as the C kernel)."""

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
            if buffer is None or buffer.shape[1:] != shape or buffer.shape[0] <= index or buffer.dtype != dtype:
                if index:
                    raise RuntimeError(f"rollout buffer {name} changed shape in the middle of a rollout")
                buffer = torch.empty((max(length, index + 1), *shape), dtype=dtype, device=device)
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
        self._consecutive_nonfinite = 0

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
        """Add up to ``n`` neurons (never beyond max_hidden). Returns how many were added."""
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
        """Remove the neurons where the boolean mask ``remove`` (H,) is True. Returns how many."""
        remove = remove.to(self.device)
        n = int(remove.sum())
        if n == 0:
            return 0
        if self.hidden_neurons - n < 1:
            raise ValueError("prune would remove every hidden neuron")
        keep = torch.nonzero(~remove).squeeze(1)
        self._resize(lambda tensor, axis, name, moment: tensor.index_select(axis, keep))
        self.stats.prune_events += 1
        self.stats.neurons_removed += n
        self.stats.events.append((self.stats.decision_steps, "prune", n, self.hidden_neurons))
        return n

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
            raise NonFiniteError(
                f"observation holds NaN or Inf at decision step {self.stats.decision_steps}"
            ) from None
        if not decision.logits_finite:
            raise NonFiniteError(f"action logits are not finite at decision step {self.stats.decision_steps}")
        self.energy.add(decision.obs_sum, decision.spikes, obs.shape[0], self.hidden_neurons)
        return decision

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
        obs = self._flatten(obs)
        c, B = self.config, obs.shape[0]
        self._ensure_state(B)  # before the slots: a new batch size starts a new rollout
        spec, keep, stdp = self._learner_record(B)
        slots = self._rollout.slots(spec, self._rollout.decisions, c.rollout_length, self.device)
        decision = self._decide(obs, choose="sample", uniform=self._uniform(B), keep=keep, stdp=stdp,
                                rate=(self.rate_ema, 1.0 / c.rate_window), out=slots)
        self._rollout.decisions += 1
        return decision.actions.clone()  # the slot is reused by later rollouts

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
        done = done.to(self.device)
        self._rollout.record_feedback(reward.to(self.device, torch.float32), done, self.config.rollout_length)
        self.stats.decision_steps += 1
        self.reset_worlds(done)
        if self._rollout.rewarded < self.config.rollout_length:
            return False
        self._update()
        self.structural_step()
        return True

    # -- learning ----------------------------------------------------------------------------------
    @torch.no_grad()
    def _update(self) -> None:
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

    def _apply_gradients(self, grads: dict[str, torch.Tensor]) -> None:
        """Clip the update to ``grad_clip`` (global norm, as torch.nn.utils.clip_grad_norm_) and
        take an Adam step; a non-finite update is skipped and counted (see the config)."""
        total = math.sqrt(kernels.sum_squares(grads.values()))
        if not math.isfinite(total):
            self.stats.nonfinite_updates_skipped += 1
            self._consecutive_nonfinite += 1
            if self._consecutive_nonfinite > self.config.max_nonfinite_updates:
                raise NonFiniteError(
                    f"{self._consecutive_nonfinite} consecutive updates had NaN/Inf gradients "
                    f"(decision step {self.stats.decision_steps}); learning_rate "
                    f"{self.config.learning_rate} may be too high"
                )
            return
        self._consecutive_nonfinite = 0
        scale = min(1.0, self.config.grad_clip / (total + 1e-6))
        finite = self.optimizer.step(grads, scale)
        self.stats.updates += 1
        if not finite:
            raise NonFiniteError(f"a parameter became non-finite after update {self.stats.updates}")

    @torch.no_grad()
    def perturb_weights(self, scale: float) -> None:
        """Weight-level explore: add Gaussian noise of ``scale`` x each weight tensor's standard
        deviation to every weight and bias, from the organism's own random stream. Between
        rollouts only: an update rebuilds its decisions' post factors with the readout weights
        they were made with (R-STDP's spike bits)."""
        if len(self._rollout):
            raise RuntimeError("perturb_weights() in the middle of a rollout; call it between updates")
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
        was."""
        config = config.validate()
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
        self._update()
        self.structural_step()
        return True

    # -- checkpoints ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to continue exactly: shape, weights, optimizer, statistics, RNG."""
        if len(self._rollout):
            raise RuntimeError("state_dict() in the middle of a rollout; call it between updates")
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

    def load_state_dict(self, state: dict) -> None:
        """Become the organism in ``state``, whatever this organism's size was. The state is fully
        checked before anything is changed."""
        _validate_state(state)
        config = OrganismConfig.from_dict(state["config"], where="checkpoint config: ")
        H = int(state["hidden_neurons"])
        self.config = config
        self._adopt_neuron_settings()
        for name, tensor in state["params"].items():
            self.params[name] = tensor.to(self.device).clone()
        self.optimizer.load_state_dict(state["optimizer"])
        self.rate_ema = state["rate_ema"].to(self.device).clone()
        self.birth_step = state["birth_step"].to(self.device).clone()
        self.last_grow_check = int(state["last_grow_check"])
        self.last_prune_check = int(state["last_prune_check"])
        stats = dict(state["stats"])
        stats["events"] = [tuple(e) for e in stats.get("events", [])]
        self.stats = Stats(**stats)
        self.energy = EnergyMeter(config)
        generator = state["generator"]
        if generator["device"] == self.device.type:
            self.generator.set_state(generator["state"])
        else:  # a CPU generator state cannot seed a GPU generator: derive one, reproducibly
            self.generator.manual_seed(hash((config.seed, self.stats.decision_steps)) & (2**63 - 1))
        lif_state = state["lif_state"]
        if lif_state is None:
            self.v = self.i = None
        else:
            self.v = lif_state["v"].to(self.device).clone()
            self.i = lif_state["i"].to(self.device).clone()
        self._rollout = Rollout()
        self._consecutive_nonfinite = int(state.get("consecutive_nonfinite", 0))
        assert self.hidden_neurons == H

    def save(self, path) -> None:
        checkpoint.save(self.state_dict(), path)

    def load(self, path) -> None:
        self.load_state_dict(checkpoint.load(path))

    @classmethod
    def from_checkpoint(cls, path, device: str | torch.device = "cpu") -> "Organism":
        state = checkpoint.load(path)
        _validate_state(state)
        organism = cls(OrganismConfig.from_dict(state["config"], where="checkpoint config: "), device)
        organism.load_state_dict(state)
        return organism


def _validate_state(state: dict) -> None:
    """Refuse a state that would half-load: wrong format, missing parts, inconsistent shapes,
    or values that are not finite."""
    def fail(why):
        raise checkpoint.CheckpointError(f"checkpoint refused: {why}")

    if state.get("format") != CHECKPOINT_FORMAT:
        fail(f"format is {state.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
    if state.get("version") != CHECKPOINT_VERSION:
        fail(f"version {state.get('version')!r} is not {CHECKPOINT_VERSION}")
    required = ("config", "hidden_neurons", "params", "optimizer", "rate_ema", "birth_step",
                "last_grow_check", "last_prune_check", "stats", "generator", "lif_state")
    missing = [k for k in required if k not in state]
    if missing:
        fail(f"missing {', '.join(missing)}")
    config = state["config"]
    H = state["hidden_neurons"]
    if not isinstance(H, int) or H < 1:
        fail(f"hidden_neurons is {H!r}")
    N, A = config.get("n_inputs"), config.get("n_actions")
    expected = {
        "input_weight": (N, H), "hidden_bias": (H,), "readout_weight": (H, A), "readout_bias": (A,),
        "rate_ema": (H,), "birth_step": (H,),
    }
    params = state["params"]
    if set(params) != set(NEURON_AXIS):
        fail(f"params are {sorted(params)}, expected {sorted(NEURON_AXIS)}")
    tensors = dict(params, rate_ema=state["rate_ema"], birth_step=state["birth_step"])
    for name, shape in expected.items():
        tensor = tensors[name]
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != shape:
            fail(f"{name} has shape {getattr(tensor, 'shape', None)}, expected {shape}")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            fail(f"{name} holds NaN or Inf")
    optimizer = state["optimizer"]
    if not isinstance(optimizer, dict) or not {"lr", "betas", "eps", "steps", "exp_avg", "exp_avg_sq"} <= set(optimizer):
        fail("the optimizer section is incomplete")
    for key in ("exp_avg", "exp_avg_sq"):
        if set(optimizer[key]) - set(NEURON_AXIS):
            fail(f"optimizer {key} has unknown parameters {sorted(set(optimizer[key]) - set(NEURON_AXIS))}")
        for name, moment in optimizer[key].items():
            want = expected.get(name, (A,))
            if not isinstance(moment, torch.Tensor) or tuple(moment.shape) != want:
                fail(f"optimizer {key} of {name} has shape {tuple(getattr(moment, 'shape', ()))}, expected {want}")
            if not bool(torch.isfinite(moment).all()):
                fail(f"optimizer {key} of {name} holds NaN or Inf")
    lif_state = state["lif_state"]
    if lif_state is not None:
        for key in ("v", "i"):
            if lif_state[key].ndim != 2 or lif_state[key].shape[1] != H:
                fail(f"LIF state {key} has shape {tuple(lif_state[key].shape)}, expected (B, {H})")
