"""Critic math (DESIGN §4): value head, sparse rewards, TD errors, GAE targets, alignment to heads.

States are positions ``t`` whose next token is a target (``state_mask[b, t] = label_mask[b, t+1]``);
``V(h_t)`` values the prefix ``x[<=t]``. The sequence reward sits at the last state (the transition
that emits the final target, EOS). ``V = 0`` after the end.
"""

from __future__ import annotations

import torch
from torch import nn

from wmtp_lib.losses import align_reference
from wmtp_lib.packing import document_ids, same_document


class ValueHead(nn.Module):
    """2-layer MLP ``D → D/2 → 1`` on the trunk output."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, hidden_size // 2)
        self.act = nn.SiLU()
        self.fc2 = nn.Linear(hidden_size // 2, 1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Values ``(B, T)`` in float32."""
        return self.fc2(self.act(self.fc1(hidden.to(self.fc1.weight.dtype)))).squeeze(-1).float()


def seeded_value_head(hidden_size: int, seed: int) -> ValueHead:
    """A `ValueHead` whose initial weights depend on ``seed`` alone, not on the global RNG.

    Rank-0-only work before it (a reward model's random init, staging tiny models) consumes global RNG
    draws on one process only; a head drawn from the global RNG would then differ across ranks, and its
    averaged gradients would train different heads. A private, forked RNG gives every rank the same head.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ValueHead(hidden_size)


def state_mask_from_labels(label_mask: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """``state[b, t] = label_mask[b, t+1]`` (False at the last position).

    Packed rows (``position_ids`` restarting at 0 per document): also False where ``t+1`` starts the
    next document, so every transition, and with it TD bootstrapping and GAE, stops at its document's end.
    """
    out = same_document(position_ids, 1, label_mask)
    out[:, :-1] &= label_mask[:, 1:].bool()
    return out


def sparse_rewards(reward: torch.Tensor, state_mask: torch.Tensor, position_ids: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """Each document's reward at its own last state, 0 elsewhere (``(B, T)`` float32).

    ``reward`` is ``(B,)`` (one document a row) or ``(B, T)``, the reward of each token's document
    (`TokenizedData.token_map`); ``position_ids`` marks the documents of packed rows.
    """
    B, T = state_mask.shape
    m = state_mask.bool()
    docs = torch.zeros(B, T, dtype=torch.long, device=m.device) if position_ids is None else document_ids(position_ids)
    per_token = reward.float().to(m.device)
    if per_token.dim() == 1:
        per_token = per_token[:, None].expand(B, T)
    # last state of each document: the largest state index among its tokens (-1: it has none)
    t_index = torch.arange(T, device=m.device).expand(B, T)
    last = torch.full((B, T), -1, dtype=torch.long, device=m.device)
    last = last.scatter_reduce(1, docs, torch.where(m, t_index, torch.full_like(t_index, -1)), reduce="amax")
    is_last = m & (t_index == last.gather(1, docs))
    return torch.where(is_last, per_token, torch.zeros_like(per_token))


def td_errors(values: torch.Tensor, rewards: torch.Tensor, state_mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """``δ_t = r_t + γ V(h_{t+1}) − V(h_t)`` on states (``V(h_{t+1}) = 0`` when ``t+1`` is not a state); 0 elsewhere."""
    m = state_mask.bool()
    v = torch.where(m, values.float(), torch.zeros_like(values, dtype=torch.float32))
    next_v = torch.zeros_like(v)
    next_v[:, :-1] = torch.where(m[:, 1:], v[:, 1:], torch.zeros_like(v[:, 1:]))
    delta = rewards.float() + gamma * next_v - v
    return torch.where(m, delta, torch.zeros_like(delta))


def gae(delta: torch.Tensor, state_mask: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    """Advantages ``A_t = δ_t + γλ A_{t+1}`` over consecutive states (0 off states)."""
    m = state_mask.bool()
    B, T = delta.shape
    adv = torch.zeros_like(delta, dtype=torch.float32)
    running = torch.zeros(B, dtype=torch.float32, device=delta.device)
    for t in range(T - 1, -1, -1):
        running = torch.where(m[:, t], delta[:, t].float() + gamma * lam * running, torch.zeros_like(running))
        adv[:, t] = running
    return adv


def value_targets(values: torch.Tensor, rewards: torch.Tensor, state_mask: torch.Tensor, gamma: float,
                  lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(δ, GAE return targets ``A + V``), both computed with ``V`` detached."""
    v = values.detach().float()
    delta = td_errors(v, rewards, state_mask, gamma)
    targets = gae(delta, state_mask, gamma, lam) + v
    return delta, torch.where(state_mask.bool(), targets, torch.zeros_like(targets))


def align_td(delta: torch.Tensor, H: int) -> torch.Tensor:
    """``td[b, t, k] = δ[b, t+k]``: head ``k`` at ``t`` emits its target in transition ``t+k``.

    The same shift as the reference alignment (a transition ``j`` emits token ``j+1``).
    """
    return align_reference(delta, H)


def value_loss(values: torch.Tensor, targets: torch.Tensor, state_mask: torch.Tensor,
               n_states: torch.Tensor | None = None) -> torch.Tensor:
    """Squared error summed over states, divided by ``n_states`` (the states of the whole optimizer step, so
    the gradient does not depend on how the step is split; default: this batch's states). 0 when none."""
    m = state_mask.float()
    n = m.sum() if n_states is None else n_states
    if n == 0:
        return values.sum() * 0.0
    return (((values.float() - targets.detach().float()) ** 2) * m).sum() / n
