"""Learning rules as pure functions: returns and advantages, the REINFORCE loss and its
gradient, and the reward-modulated STDP update.

Both rules turn a rollout of ``L`` decisions of ``B`` worlds into per-parameter update directions
that the organism hands to one Adam optimizer, so growth and pruning treat the optimizer's
moments the same way whichever rule is in use.

REINFORCE's gradient is written out rather than taken by autograd (``reinforce_gradients``): the
policy's logit gradient in closed form, then back through the readout, through the T LIF steps
of every decision by Norse's SuperSpike surrogate (each decision recomputed from its observation
and the state it started from), and into the input weights of the active inputs only
(``gsnn.kernels.reinforce_backward``). ``tests/test_kernels.py`` checks it
against autograd through Norse's steps and ``reinforce_loss``.

Reward-modulated STDP (three factors, no gradients). Within a decision each active input spikes
at every SNN step; with pre- and post-synaptic traces decaying by ``lambda`` per step,

    potentiation_k = sum_t  g_t * z_k(t),   g_t = sum_{s<=t} lambda^(t-s)  (pre trace at step t)
    depression_k   = sum_t  y_k(t-1),       y_k(t) = lambda y_k(t-1) + z_k(t)  (post trace)
    STDP_jk        = o_j * (potentiation_k - c_dep * depression_k)

The third factor is the advantage ``A`` (discounted return minus the batch mean), gated per hidden
neuron by the sign and size of its readout weight toward the action taken,
``f_k = sum_a W_out[k, a] (onehot(a_taken) - pi)_a`` (attention-gated reinforcement, Roelfsema &
van Ooyen 2005), and per readout synapse by ``count_k * (onehot - pi)_a``. Summing
``A_t * eligibility_t`` over the rollout is the forward view of eligibility traces that decay with
the discount ``gamma``: the same sum a backward-view trace would accumulate, computed once per
rollout instead of once per step, so no per-world trace tensor is ever stored.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gsnn import kernels


def discounted_returns(rewards: torch.Tensor, dones: torch.Tensor, discount: float) -> torch.Tensor:
    """rewards, dones: (L, B). Returns G_t = r_t + discount * G_{t+1} * (1 - done_t), G_L = 0."""
    returns = torch.empty_like(rewards)
    running = torch.zeros_like(rewards[0])
    for t in range(rewards.shape[0] - 1, -1, -1):
        running = rewards[t] + discount * running * (~dones[t]).to(rewards.dtype)
        returns[t] = running
    return returns


def advantages(returns: torch.Tensor) -> torch.Tensor:
    """Per-step batch-mean baseline (the rollout mean when there is a single world), then scaled
    to unit standard deviation over the rollout. All-equal returns give zero advantages (no
    update), never NaN."""
    if returns.shape[1] == 1:
        centred = returns - returns.mean()
    else:
        centred = returns - returns.mean(dim=1, keepdim=True)
    scale = centred.std(unbiased=False)
    return centred / (scale + 1e-6)


def reinforce_loss(
    log_probs: torch.Tensor, entropies: torch.Tensor, adv: torch.Tensor, entropy_coef: float
) -> torch.Tensor:
    """log_probs, entropies, adv: (L, B). Minimising this ascends the policy gradient."""
    return -(adv.detach() * log_probs).mean() - entropy_coef * entropies.mean()


def policy_logit_gradient(logits: torch.Tensor, actions: torch.Tensor, adv: torch.Tensor,
                          entropy_coef: float) -> torch.Tensor:
    """d reinforce_loss / d logits, (L, B, A), for a softmax policy: with pi = softmax(logits)
    and entropy H = -sum pi log pi, per decision
        d(-A log pi_a)/dz = -A (onehot(a) - pi),   d(-c H)/dz = c pi (log pi + H),
    both averaged over the L * B decisions as the loss is."""
    log_probs = torch.log_softmax(logits, dim=-1)
    probs = log_probs.exp()
    entropy = -(probs * log_probs).sum(-1, keepdim=True)
    onehot = F.one_hot(actions, logits.shape[-1]).to(logits.dtype)
    policy = -adv.unsqueeze(-1) * (onehot - probs)
    return (policy + entropy_coef * probs * (log_probs + entropy)) / adv.numel()


def reinforce_gradients(
    observations: torch.Tensor,  # (L, B, N)
    v0: torch.Tensor,  # (L, B, H)  LIF state each decision started from
    i0: torch.Tensor,  # (L, B, H)
    logits: torch.Tensor,  # (L, B, A)
    actions: torch.Tensor,  # (L, B)
    adv: torch.Tensor,  # (L, B)
    entropy_coef: float,
    params: dict[str, torch.Tensor],
    lif,  # gsnn.neurons.LIFConstants
    steps: int,
) -> dict[str, torch.Tensor]:
    """The gradient of ``reinforce_loss`` with respect to each parameter (see the module
    docstring); the LIF state is not differentiated between decisions."""
    L, B, A = logits.shape
    rows = L * B
    g_logits = policy_logit_gradient(logits, actions, adv, entropy_coef).reshape(rows, A)
    flat = lambda t: t.reshape(rows, -1)  # noqa: E731
    return kernels.reinforce_backward(flat(observations), flat(v0), flat(i0), g_logits, params, lif, steps)


def rstdp_directions(
    observations: torch.Tensor,  # (L, B, N)  presynaptic activity of the input synapses
    hidden_post: torch.Tensor,  # (L, B, H)  STDP post factor x readout feedback f_k
    counts: torch.Tensor,  # (L, B, H)  hidden spike counts (presynaptic to the readout)
    action_post: torch.Tensor,  # (L, B, A)  onehot(action) - pi
    adv: torch.Tensor,  # (L, B)
) -> dict[str, torch.Tensor]:
    """Descent directions (the negative of the reward-modulated change) for each parameter:
    each decision's eligibility weighted by its advantage, summed over the rollout."""
    L, B, _ = observations.shape
    rows = L * B
    flat = lambda t: t.reshape(rows, -1)  # noqa: E731
    return kernels.rstdp_directions(flat(observations), flat(hidden_post), flat(counts), flat(action_post),
                                    adv.reshape(rows), -1.0 / rows)


def rstdp_directions_from_spikes(
    inputs: torch.Tensor | kernels.ActiveInputs,  # (L, B, N) observations, or the decisions' record of them
    spikes: torch.Tensor,  # (L, B, H) int16: each hidden neuron's spikes, bit t = SNN step t
    action_post: torch.Tensor,  # (L, B, A)
    adv: torch.Tensor,  # (L, B)
    readout_weight: torch.Tensor,  # (H, A): the readout the decisions used
    step_weights: torch.Tensor,  # (T,) gsnn.neurons.stdp_step_weights
) -> dict[str, torch.Tensor]:
    """``rstdp_directions`` from the decisions' spike bits: the post factor (STDP factor times the
    readout feedback of the action taken) and the counts are rebuilt from the bits, as the
    decisions would have computed them (``gsnn.kernels.rstdp_directions_from_spikes``)."""
    L, B, _ = spikes.shape
    rows = L * B
    flat = lambda t: t.reshape(rows, -1)  # noqa: E731
    if not isinstance(inputs, kernels.ActiveInputs):
        inputs = flat(inputs)
    return kernels.rstdp_directions_from_spikes(inputs, flat(spikes), flat(action_post), readout_weight,
                                                step_weights, adv.reshape(rows), -1.0 / rows)
