"""Per-token MTP losses and importance weights (DESIGN §4).

Shapes: ``B`` batch, ``T`` length, ``H`` heads, ``V`` vocabulary. Entry ``[b, t, k]`` always refers to
head ``k`` at position ``t``, whose target is token ``x[b, t + k + 1]``. Weights never carry gradient.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch
import torch.nn.functional as F

from wmtp_lib.model.packing import same_document

STD_EPS = 1e-6


def head_targets(
    input_ids: torch.Tensor, k: int, label_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets and validity of head ``k``: ``target[b,t] = x[b,t+k+1]`` (0 where invalid), both ``(B, T)``.

    With packed rows' ``position_ids`` ``(B, T)``, a target in another document than ``t`` is not valid.
    """
    B, T = input_ids.shape
    shift = k + 1
    targets = torch.zeros_like(input_ids)
    valid = same_document(position_ids, shift, input_ids)
    if shift < T:
        targets[:, : T - shift] = input_ids[:, shift:]
        if label_mask is not None:
            valid[:, : T - shift] &= label_mask[:, shift:].bool()
    targets = torch.where(valid, targets, torch.zeros_like(targets))
    return targets, valid


def mtp_token_ce(
    logits: torch.Tensor, input_ids: torch.Tensor, label_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cross-entropy of every head.

    ``ce[b,t,k] = -log p_k(x[b,t+k+1] | x[b,<=t])``; ``valid[b,t,k] = t+k+1 < T and label_mask[b,t+k+1]``
    and, for packed rows (``position_ids`` restarting at 0 per document), ``t+k+1`` in the document of ``t``;
    ``ce`` is 0 where not valid. ``logits`` is ``(B, T, H, V)``; returns float32 ``ce`` and bool ``valid``.
    """
    if logits.dim() != 4:
        raise ValueError(f"logits must be (B, T, H, V), got shape {tuple(logits.shape)}")
    B, T, H, V = logits.shape
    if tuple(input_ids.shape) != (B, T):
        raise ValueError(f"input_ids shape {tuple(input_ids.shape)} does not match logits (B, T) = {(B, T)}")
    if label_mask is not None and tuple(label_mask.shape) != (B, T):
        raise ValueError(f"label_mask shape {tuple(label_mask.shape)} must be (B, T) = {(B, T)}")
    ces, valids = [], []
    for k in range(H):
        targets, valid = head_targets(input_ids, k, label_mask, position_ids)
        ce = F.cross_entropy(logits[:, :, k].float().reshape(B * T, V), targets.reshape(-1), reduction="none")
        ces.append(torch.where(valid, ce.view(B, T), torch.zeros((), dtype=ce.dtype, device=ce.device)))
        valids.append(valid)
    return torch.stack(ces, dim=2), torch.stack(valids, dim=2)


def align_reference(ref_ce: torch.Tensor, H: int) -> torch.Tensor:
    """Align a next-token model's loss with the heads: ``out[b,t,k] = ref_ce[b,t+k]`` (0 past the end).

    ``ref_ce[b,j]`` is the reference loss for token ``j+1``; head ``k`` at ``t`` targets the same token.
    """
    if ref_ce.dim() != 2:
        raise ValueError(f"ref_ce must be (B, T), got shape {tuple(ref_ce.shape)}")
    B, T = ref_ce.shape
    out = ref_ce.new_zeros(B, T, H)
    for k in range(H):
        if k < T:
            out[:, : T - k, k] = ref_ce[:, k:]
    return out


def _check_same_shape(name: str, tensor: torch.Tensor, valid: torch.Tensor) -> None:
    if tensor.shape != valid.shape:
        raise ValueError(f"{name} shape {tuple(tensor.shape)} must equal valid shape {tuple(valid.shape)}")


@torch.no_grad()
def mean_preserving_cap(log_w: torch.Tensor, valid: torch.Tensor, max_weight: float) -> torch.Tensor:
    """Per head (last dim), weights ``min(c · exp(log_w), max_weight)`` over the valid entries of ``(B, T, H)``
    with ``c`` chosen so that they have mean exactly 1 (water-filling); 0 where not valid.

    Sorting each head's entries once, capping the ``j`` largest gives ``c_j = (n − j·M) / Σ_{i≥j} w_(i)``; the
    answer is the smallest ``j`` whose largest uncapped entry stays under the cap, ``c_j · w_(j) ≤ M``.
    Works in log space in float64, so no exponent range overflows or makes the uncapped sum vanish.
    ``max_weight`` ≥ 1 (a mean of 1 cannot stay under a lower cap); at 1 every valid weight is 1.
    """
    if max_weight < 1:
        raise ValueError(f"max_weight must be >= 1 (weights have mean 1), got {max_weight}")
    m = valid.bool()
    B, T, H = log_w.shape
    if max_weight == 1:
        return m.float()
    x = torch.where(m, log_w.double(), torch.full_like(log_w, -torch.inf, dtype=torch.float64)).reshape(B * T, H)
    n = m.reshape(B * T, H).sum(dim=0).double()  # (H,)
    x_sorted = torch.sort(x, dim=0, descending=True).values  # invalid (-inf) entries last
    log_suffix = torch.logcumsumexp(x_sorted.flip(0), dim=0).flip(0)  # log Σ_{i≥j} w_(i)
    j = torch.arange(B * T, dtype=torch.float64, device=x.device)[:, None]
    room = n - j * max_weight  # what the uncapped entries must add up to
    log_c = torch.log(room.clamp(min=torch.finfo(torch.float64).tiny)) - log_suffix
    # roundoff at the boundary grows with the exponents' size (|log w| ~ 1e5 at a temperature of 1e-4)
    slack = 1e-12 + 1e-13 * (x_sorted.abs().nan_to_num(posinf=0.0) + log_suffix.abs().nan_to_num(posinf=0.0))
    fits = (j < n) & (room > 0) & (log_c + x_sorted <= math.log(max_weight) + slack)
    # smallest such j per head (argmax finds the first True); a head with no valid entry keeps j = 0; should
    # roundoff still leave none, the largest j with room left (the most entries at the cap) is the answer
    last_room = ((j < n) & (room > 0)).double().cumsum(dim=0).argmax(dim=0, keepdim=True)
    first = torch.where(fits.any(dim=0, keepdim=True), fits.double().argmax(dim=0, keepdim=True), last_room)
    log_c = log_c.gather(0, first)  # (1, H)
    w = torch.exp(torch.clamp(x + log_c, max=math.log(max_weight)))
    return torch.where(m.reshape(B * T, H), w, torch.zeros_like(w)).float().reshape(B, T, H)


@torch.no_grad()
def soft_weights(
    scores: torch.Tensor, valid: torch.Tensor, temperature: float = 1.0, max_weight: float = 3.0,
    standardize: bool = True,
) -> torch.Tensor:
    """Per head, over valid entries: ``w = exp(z / temperature)`` then the mean-preserving cap (DESIGN §4).

    ``z = (s − mean) / (std + 1e-6)`` when ``standardize`` (population std; rho1's default), else
    ``z = s − mean`` (score units: the temperature is in the score's own units, the critic's default, so
    a score with no signal gives weights near 1 instead of weights as spread as a real one).
    ``scores`` and ``valid`` are ``(B, T, H)``; returns float32 weights with mean exactly 1 over each head's
    valid entries, none above ``max_weight`` (≥ 1), 0 where not valid. No temperature > 0 or group size
    overflows (the exponent is only ever used shifted, in log space).
    """
    _check_same_shape("scores", scores, valid)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    s = scores.detach().double()
    m = valid.bool()
    n = m.double().sum(dim=(0, 1)).clamp(min=1.0)
    mean = torch.where(m, s, torch.zeros_like(s)).sum(dim=(0, 1)) / n
    z = s - mean
    if standardize:
        var = torch.where(m, z ** 2, torch.zeros_like(s)).sum(dim=(0, 1)) / n
        z = z / (var.sqrt() + STD_EPS)
    return mean_preserving_cap(z / temperature, m, max_weight)


def keep_count(keep_ratio: float, n_valid: int) -> int:
    """``ceil(keep_ratio * n_valid)`` in exact decimal arithmetic (0.7 × 10 keeps 7, not 8)."""
    return math.ceil(Fraction(repr(float(keep_ratio))) * n_valid)


@torch.no_grad()
def topk_weights(scores: torch.Tensor, valid: torch.Tensor, keep_ratio: float = 0.7) -> torch.Tensor:
    """Per head, weight ``n_valid / n_kept`` on the ``n_kept = ceil(keep_ratio · n_valid)`` valid entries with
    the highest score, else 0: weights have mean 1 over valid entries, so the loss is the mean over kept tokens.

    Ties go to the lower flat ``(b, t)`` index. Uses a stable sort, not ``torch.quantile``.
    """
    _check_same_shape("scores", scores, valid)
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    B, T, H = scores.shape
    s = scores.detach().float()
    out = torch.zeros(B, T, H, dtype=torch.float32, device=scores.device)
    for k in range(H):
        sk = s[:, :, k].reshape(-1)
        mk = valid[:, :, k].reshape(-1).bool()
        n_valid = int(mk.sum())
        if n_valid == 0:
            continue
        keep = keep_count(keep_ratio, n_valid)
        idx = torch.nonzero(mk, as_tuple=False).squeeze(1)
        # Stable descending sort keeps equal scores in index order, so ties go to the lower index.
        order = torch.sort(sk[idx], descending=True, stable=True).indices
        chosen = idx[order[:keep]]
        flat = out[:, :, k].reshape(-1).clone()
        flat[chosen] = n_valid / keep
        out[:, :, k] = flat.view(B, T)
    return out


@torch.no_grad()
def rho1_weights(
    ce: torch.Tensor,
    ref_ce_aligned: torch.Tensor,
    valid: torch.Tensor,
    mode: str = "weighted",
    temperature: float = 1.0,
    keep_ratio: float = 0.7,
    max_weight: float = 3.0,
    standardize: bool = True,
) -> torch.Tensor:
    """Rho-1 token weights from the excess loss ``s = ce.detach() - ref_ce_aligned`` (all ``(B, T, H)``).

    ``mode="weighted"``: soft weights (`soft_weights`); ``mode="tokenskip"``: hard top-``keep_ratio`` selection.
    """
    _check_same_shape("ce", ce, valid)
    _check_same_shape("ref_ce_aligned", ref_ce_aligned, valid)
    scores = ce.detach().float() - ref_ce_aligned.detach().float()
    if mode == "weighted":
        return soft_weights(scores, valid, temperature=temperature, max_weight=max_weight, standardize=standardize)
    if mode == "tokenskip":
        return topk_weights(scores, valid, keep_ratio=keep_ratio)
    raise ValueError(f"rho1 mode must be 'weighted' or 'tokenskip', got {mode!r}")


@torch.no_grad()
def critic_weights(
    score: torch.Tensor, valid: torch.Tensor, temperature: float = 1.0, max_weight: float = 3.0,
    standardize: bool = False,
) -> torch.Tensor:
    """Soft weights from the critic's aligned advantage ``score[b,t,k] = A_{t+k}`` (``(B, T, H)``, DESIGN §4).

    By default in score units (``standardize=False``): ``temperature`` is in reward units.
    """
    return soft_weights(score, valid, temperature=temperature, max_weight=max_weight, standardize=standardize)


def head_loss(ce: torch.Tensor, weights: torch.Tensor, valid: torch.Tensor,
              n_valid: torch.Tensor | float | None = None) -> torch.Tensor:
    """``Σ w·m·ce / N`` over all but the last dim of ``(B, T, H)`` inputs (all dims of ``(B, T)`` inputs).

    ``N`` (``n_valid``; shape ``(H,)`` or a scalar) is the number of valid targets in the whole optimizer
    step (DESIGN §4); by default the valid count of the given batch. 0 where ``N`` is 0.
    """
    wm = weights.detach().float() * valid.float()
    dims = tuple(range(ce.dim() - 1)) if ce.dim() == 3 else tuple(range(ce.dim()))
    num = (wm * ce.float()).sum(dim=dims)
    den = valid.float().sum(dim=dims) if n_valid is None else torch.as_tensor(n_valid, dtype=torch.float32,
                                                                              device=num.device)
    return torch.where(den > 0, num / den.clamp(min=1.0), torch.zeros_like(num))


def weighted_mtp_loss(
    ce: torch.Tensor,
    weights: torch.Tensor,
    valid: torch.Tensor,
    head_weights: torch.Tensor | list[float] | None = None,
    n_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """``L = Σ_k α_k · Σ_{b,t} w·m·ce / N_k`` with ``N_k`` = ``n_valid[k]`` (``(H,)``), the valid targets of head
    ``k`` in the whole optimizer step; default: the valid count of this batch. A head term is 0 when ``N_k`` is 0.

    With ``N_k`` counted over the optimizer step, the gradient of a given weighting does not depend on how
    the batch is split over micro-batches and ranks.
    """
    _check_same_shape("ce", ce, valid)
    _check_same_shape("weights", weights, valid)
    if n_valid is not None and tuple(torch.as_tensor(n_valid).shape) != (ce.shape[-1],):
        raise ValueError(f"n_valid must have shape ({ce.shape[-1]},), one count per head; "
                         f"got {tuple(torch.as_tensor(n_valid).shape)}")
    per_head = head_loss(ce, weights, valid, n_valid)
    alpha = resolve_head_weights(head_weights, ce.shape[-1], per_head.device)
    return (alpha * per_head).sum()


def resolve_head_weights(
    head_weights: torch.Tensor | list[float] | None, H: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """``α`` as a float32 tensor of length ``H`` (all ones by default)."""
    if head_weights is None:
        return torch.ones(H, dtype=torch.float32, device=device)
    alpha = torch.as_tensor(head_weights, dtype=torch.float32, device=device).flatten()
    if alpha.numel() != H:
        raise ValueError(f"head_weights has {alpha.numel()} entries, the model has {H} heads")
    return alpha


def _low_precision_compute(hidden: torch.Tensor) -> bool:
    """True when the logits are computed in bf16/fp16 (autocast on CUDA, or half-precision tensors)."""
    if hidden.is_cuda and torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda") in (torch.bfloat16, torch.float16)
    return hidden.dtype in (torch.bfloat16, torch.float16)


class _ChunkedLinearCE(torch.autograd.Function):
    """Cross-entropy of ``h @ W.T`` per token, computed in sequence chunks.

    In float32 the backward recomputes each chunk's logits, so no ``(B, T, V)`` float32 tensor ever
    exists. When the logits are computed in bf16/fp16 anyway, forward keeps ``softmax − onehot`` for the
    whole sequence in that half precision instead (one head's worth, half the bytes of float32), which
    saves the recompute matmul in backward.
    """

    # custom_fwd/custom_bwd: backward's recomputed logits use the same autocast state as forward
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, hidden, weight, targets, valid, chunk_size):  # type: ignore[override]
        B, T, _ = hidden.shape
        ce = torch.zeros(B, T, dtype=torch.float32, device=hidden.device)
        lse = torch.zeros(B, T, dtype=torch.float32, device=hidden.device)
        dlogits = None
        if _low_precision_compute(hidden):
            half = torch.get_autocast_dtype("cuda") if hidden.is_cuda and torch.is_autocast_enabled("cuda") \
                else hidden.dtype
            dlogits = torch.empty(B, T, weight.shape[0], dtype=half, device=hidden.device)
        for start in range(0, T, chunk_size):
            stop = min(T, start + chunk_size)
            logits = (hidden[:, start:stop] @ weight.t()).float()
            chunk_lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(-1, targets[:, start:stop].unsqueeze(-1)).squeeze(-1)
            lse[:, start:stop] = chunk_lse
            ce[:, start:stop] = torch.where(valid[:, start:stop], chunk_lse - picked, torch.zeros_like(picked))
            if dlogits is not None:
                probs = torch.exp(logits - chunk_lse.unsqueeze(-1))
                probs.scatter_add_(-1, targets[:, start:stop].unsqueeze(-1),
                                   torch.full_like(chunk_lse.unsqueeze(-1), -1.0))
                dlogits[:, start:stop] = probs.to(dlogits.dtype)
        if dlogits is None:
            ctx.save_for_backward(hidden, weight, targets, valid, lse)
        else:
            ctx.save_for_backward(hidden, weight, targets, valid, lse, dlogits)
        ctx.chunk_size = chunk_size
        return ce

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_ce):  # type: ignore[override]
        hidden, weight, targets, valid, lse = ctx.saved_tensors[:5]
        dlogits = ctx.saved_tensors[5] if len(ctx.saved_tensors) > 5 else None
        chunk_size = ctx.chunk_size
        B, T, _ = hidden.shape
        grad_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if ctx.needs_input_grad[1] else None
        g_all = torch.where(valid, grad_ce.float(), torch.zeros_like(lse))
        for start in range(0, T, chunk_size):
            stop = min(T, start + chunk_size)
            h = hidden[:, start:stop]
            if dlogits is not None:
                probs = dlogits[:, start:stop].float()
            else:
                probs = torch.exp((h @ weight.t()).float() - lse[:, start:stop].unsqueeze(-1))
                probs.scatter_add_(-1, targets[:, start:stop].unsqueeze(-1),
                                   torch.full_like(lse[:, start:stop].unsqueeze(-1), -1.0))
            # select, not multiply: a NaN/inf at an invalid position (a fully masked padding row on some CUDA
            # attention backends) times a zero gradient would still be NaN and poison every gradient
            ok = valid[:, start:stop].unsqueeze(-1)
            grad_logits = torch.where(ok, probs * g_all[:, start:stop].unsqueeze(-1), 0.0)
            if grad_hidden is not None:
                grad_hidden[:, start:stop] = (grad_logits.to(weight.dtype) @ weight).to(hidden.dtype)
            if grad_weight is not None:
                h = torch.where(ok, h, torch.zeros((), dtype=h.dtype, device=h.device))
                grad_weight += grad_logits.reshape(-1, grad_logits.shape[-1]).t() @ h.reshape(-1, h.shape[-1]).float()
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None


def chunked_linear_ce(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    valid: torch.Tensor,
    chunk_size: int = 512,
) -> torch.Tensor:
    """Per-token CE ``(B, T)`` of logits ``hidden @ weight.T`` without materialising ``(B, T, V)`` in float32.

    Only ``(B, chunk_size, V)`` logits exist at a time, in forward and backward; 0 where not valid.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return _ChunkedLinearCE.apply(hidden, weight, targets, valid.bool(), int(chunk_size))


def target_valid(label_mask: torch.Tensor, H: int, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """``valid[b, t, k]``: ``label_mask[b, t+k+1]`` and, in packed rows, ``t+k+1`` in the document of ``t``
    (``(B, T, H)`` bool; False past the end), exactly as `head_targets` decides it."""
    return torch.stack([head_targets(label_mask, k, label_mask, position_ids)[1] for k in range(H)], dim=-1)
