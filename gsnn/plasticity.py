"""Learning rules as pure functions: returns and advantages, the REINFORCE loss, and the
reward-modulated STDP update.

Both rules turn a rollout of ``L`` decisions of ``B`` worlds into per-parameter update directions
that the organism hands to one Adam optimizer, so growth and pruning treat the optimizer's
moments the same way whichever rule is in use.

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


def stdp_post_factor(potentiation: torch.Tensor, depression: torch.Tensor, depression_ratio: float) -> torch.Tensor:
    return potentiation - depression_ratio * depression


def rstdp_directions(
    observations: torch.Tensor,  # (L, B, N)  presynaptic activity of the input synapses
    hidden_post: torch.Tensor,  # (L, B, H)  STDP post factor x readout feedback f_k
    counts: torch.Tensor,  # (L, B, H)  hidden spike counts (presynaptic to the readout)
    action_post: torch.Tensor,  # (L, B, A)  onehot(action) - pi
    adv: torch.Tensor,  # (L, B)
) -> dict[str, torch.Tensor]:
    """Descent directions (the negative of the reward-modulated change) for each parameter."""
    L, B, _ = observations.shape
    n = float(L * B)
    weight = adv.unsqueeze(2)
    hidden_mod = (hidden_post * weight).reshape(L * B, -1)
    action_mod = (action_post * weight).reshape(L * B, -1)
    return {
        "input_weight": -(observations.reshape(L * B, -1).T @ hidden_mod) / n,
        "hidden_bias": -hidden_mod.sum(0) / n,
        "readout_weight": -(counts.reshape(L * B, -1).T @ action_mod) / n,
        "readout_bias": -action_mod.sum(0) / n,
    }
