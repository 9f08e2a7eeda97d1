"""Critic math (DESIGN §4 v3): value head, sparse rewards, TD errors, Monte-Carlo returns, GAE advantages
as token scores, alignment to heads, and the value head's fit statistics.

States are positions ``t`` whose next token is a target (``state_mask[b, t] = label_mask[b, t+1]``);
``V(h_t)`` values the prefix ``x[<=t]``. The sequence reward sits at the last state (the transition
that emits the final target, EOS). ``V = 0`` after the end, except for a document cut by ``max_length``:
it gets no terminal reward and its last state bootstraps from ``V`` of the position after it.
"""

from __future__ import annotations

import torch
from torch import nn

from wmtp_lib.model.losses import align_reference
from wmtp_lib.model.packing import document_ids, same_document


def rms_normalize(hidden: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``h / rms(h)`` over the last dim, in float32, with no learned scale: a trunk's residual stream grows
    with depth and training, so the value head sees features of a fixed scale whatever trunk it reads."""
    h = hidden.float()
    return h * torch.rsqrt(h.pow(2).mean(dim=-1, keepdim=True) + eps)


class ValueHead(nn.Module):
    """2-layer MLP ``D → D/2 → 1`` on RMS-normalised features of a frozen trunk (DESIGN §4)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, hidden_size // 2)
        self.act = nn.SiLU()
        self.fc2 = nn.Linear(hidden_size // 2, 1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Values ``(B, T)`` in float32 of features ``hidden`` ``(B, T, D)``."""
        x = rms_normalize(hidden).to(self.fc1.weight.dtype)
        return self.fc2(self.act(self.fc1(x))).squeeze(-1).float()


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


def bootstrap_mask(state_mask: torch.Tensor, cut: torch.Tensor | None,
                   position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, T)`` bool: the position right after the last state of a document cut by ``max_length``
    (``cut[b, t]`` marks tokens of such documents): its ``V`` stands in for the return the cut took away."""
    m = state_mask.bool()
    out = torch.zeros_like(m)
    if cut is None:
        return out
    nxt = same_document(position_ids, 1, m)
    out[:, 1:] = m[:, :-1] & ~m[:, 1:] & cut[:, :-1].bool().to(m.device) & nxt[:, :-1]
    return out


def sparse_rewards(reward: torch.Tensor, state_mask: torch.Tensor, position_ids: torch.Tensor | None = None,
                   cut: torch.Tensor | None = None) -> torch.Tensor:
    """Each document's reward at its own last state, 0 elsewhere (``(B, T)`` float32).

    ``reward`` is ``(B,)`` (one document a row) or ``(B, T)``, the reward of each token's document
    (`TokenizedData.token_map`); ``position_ids`` marks the documents of packed rows. A document cut by
    ``max_length`` (``cut``, ``(B, T)``) gets no terminal reward: its end is not the end that was scored.
    """
    B, T = state_mask.shape
    m = state_mask.bool()
    docs = torch.zeros(B, T, dtype=torch.long, device=m.device) if position_ids is None else document_ids(position_ids)
    per_token = reward.float().to(m.device)
    if per_token.dim() == 1:
        per_token = per_token[:, None].expand(B, T)
    if cut is not None:
        per_token = torch.where(cut.bool().to(m.device), torch.zeros_like(per_token), per_token)
    # last state of each document: the largest state index among its tokens (-1: it has none)
    t_index = torch.arange(T, device=m.device).expand(B, T)
    last = torch.full((B, T), -1, dtype=torch.long, device=m.device)
    last = last.scatter_reduce(1, docs, torch.where(m, t_index, torch.full_like(t_index, -1)), reduce="amax")
    is_last = m & (t_index == last.gather(1, docs))
    return torch.where(is_last, per_token, torch.zeros_like(per_token))


def _next_values(values: torch.Tensor, state_mask: torch.Tensor, bootstrap: torch.Tensor | None) -> torch.Tensor:
    """``V(h_{t+1})`` where ``t+1`` is a state or a bootstrap position, else 0 (``(B, T)`` float32)."""
    m = state_mask.bool()
    use = m if bootstrap is None else (m | bootstrap.bool())
    v = values.float()
    out = torch.zeros_like(v)
    out[:, :-1] = torch.where(use[:, 1:], v[:, 1:], torch.zeros_like(v[:, 1:]))
    return out


def td_errors(values: torch.Tensor, rewards: torch.Tensor, state_mask: torch.Tensor, gamma: float,
              bootstrap: torch.Tensor | None = None) -> torch.Tensor:
    """``δ_t = r_t + γ V(h_{t+1}) − V(h_t)`` on states (``V(h_{t+1}) = 0`` when ``t+1`` is neither a state nor
    a ``bootstrap`` position); 0 elsewhere."""
    m = state_mask.bool()
    v = torch.where(m, values.float(), torch.zeros_like(values, dtype=torch.float32))
    delta = rewards.float() + gamma * _next_values(values, m, bootstrap) - v
    return torch.where(m, delta, torch.zeros_like(delta))


def gae(delta: torch.Tensor, state_mask: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    """Advantages ``A_t = δ_t + γλ A_{t+1}`` over consecutive states (0 off states): the sum stops where its
    document (or the row) ends, because the position after a document's last state is not a state."""
    m = state_mask.bool()
    B, T = delta.shape
    adv = torch.zeros_like(delta, dtype=torch.float32)
    running = torch.zeros(B, dtype=torch.float32, device=delta.device)
    for t in range(T - 1, -1, -1):
        running = torch.where(m[:, t], delta[:, t].float() + gamma * lam * running, torch.zeros_like(running))
        adv[:, t] = running
    return adv


def mc_returns(rewards: torch.Tensor, state_mask: torch.Tensor, gamma: float, values: torch.Tensor | None = None,
               bootstrap: torch.Tensor | None = None) -> torch.Tensor:
    """Monte-Carlo returns ``G_t = r_t + γ G_{t+1}`` on states (λ = 1), 0 off states; past a cut document's
    last state the return continues from ``V`` at its ``bootstrap`` position (``values``, detached)."""
    m = state_mask.bool()
    B, T = rewards.shape
    tail = torch.zeros(B, T, dtype=torch.float32, device=rewards.device)
    if bootstrap is not None and values is not None:
        tail = torch.where(bootstrap.bool(), values.detach().float(), tail)
    out = torch.zeros(B, T, dtype=torch.float32, device=rewards.device)
    running = torch.zeros(B, dtype=torch.float32, device=rewards.device)
    for t in range(T - 1, -1, -1):
        after = torch.where(m[:, t + 1], running, tail[:, t + 1]) if t + 1 < T else torch.zeros_like(running)
        running = torch.where(m[:, t], rewards[:, t].float() + gamma * after, torch.zeros_like(running))
        out[:, t] = running
    return out


def advantages(values: torch.Tensor, rewards: torch.Tensor, state_mask: torch.Tensor, gamma: float, lam: float,
               bootstrap: torch.Tensor | None = None) -> torch.Tensor:
    """GAE advantages ``A_t = Σ_l (γλ)^l δ_{t+l}`` of detached ``values`` within each document (``(B, T)``);
    ``lam = 0`` is the one-step TD error, ``lam = 1`` the Monte-Carlo return minus ``V``."""
    delta = td_errors(values.detach(), rewards, state_mask, gamma, bootstrap)
    return gae(delta, state_mask, gamma, lam)


def align_scores(per_state: torch.Tensor, H: int) -> torch.Tensor:
    """``out[b, t, k] = a[b, t+k]``: head ``k`` at ``t`` emits its target in transition ``t+k``.

    The same shift as the reference alignment (a transition ``j`` emits token ``j+1``). Where head ``k``'s
    target is valid, ``t+k`` is a state of the same document, so no score crosses a document.
    """
    return align_reference(per_state, H)


def value_loss(values: torch.Tensor, targets: torch.Tensor, state_mask: torch.Tensor,
               n_states: torch.Tensor | None = None) -> torch.Tensor:
    """Squared error summed over states, divided by ``n_states`` (the states of the whole optimizer step, so
    the gradient does not depend on how the step is split; default: this batch's states). 0 when none."""
    m = state_mask.float()
    n = m.sum() if n_states is None else torch.as_tensor(n_states, dtype=torch.float32, device=m.device)
    # no `if n == 0`: a branch on a device value would wait for the GPU every micro-batch
    return (((values.float() - targets.detach().float()) ** 2) * m).sum() / n.clamp(min=1.0)


def explained_variance(values: torch.Tensor, targets: torch.Tensor) -> float:
    """``1 − Var(G − V) / Var(G)`` over matching 1-d tensors (nan when ``G`` has no variance)."""
    g, v = targets.double(), values.double()
    var_g = g.var(unbiased=False)
    if g.numel() < 2 or var_g == 0:
        return float("nan")
    return float(1.0 - (g - v).var(unbiased=False) / var_g)


def auc(scores_pos: torch.Tensor, scores_neg: torch.Tensor) -> float:
    """``P(score of a positive > score of a negative)``, ties counted half (Mann–Whitney); nan if a class is empty."""
    if scores_pos.numel() == 0 or scores_neg.numel() == 0:
        return float("nan")
    diff = scores_pos.double()[:, None] - scores_neg.double()[None, :]
    return float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())


def last_states(state_mask: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, T)`` bool: each document's last state (where its terminal reward sits)."""
    ones = torch.ones(state_mask.shape[0], dtype=torch.float32, device=state_mask.device)
    return sparse_rewards(ones, state_mask, position_ids) > 0
