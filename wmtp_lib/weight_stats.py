"""Summaries of token weights for the metrics log: sums that add up across micro-batches and ranks.

Everything stays a device tensor (masked arithmetic, no boolean indexing) so the training step never
waits on the GPU for a statistic; the window is read once, when it is logged.
"""

from __future__ import annotations

import math

import torch

# Every entry is a sum, except w_max (combined by max), so windows and processes combine by addition.
SUM_KEYS = ("n_valid", "w_sum", "w_sq_sum", "n_kept", "entropy_sum", "entropy_n",
            "w_noisy_sum", "n_noisy", "w_clean_sum", "n_clean")


def weight_sums(weights: torch.Tensor, valid: torch.Tensor, noisy_targets: torch.Tensor | None = None
                ) -> dict[str, torch.Tensor]:
    """Sums over valid entries of ``(B, T, H)`` weights; ``noisy_targets`` marks targets from noisy samples."""
    m = valid.bool()
    mf = m.float()
    w = weights.float() * mf
    out: dict[str, torch.Tensor] = {
        "n_valid": mf.sum(),
        "w_sum": w.sum(),
        "w_sq_sum": (w * w).sum(),
        "n_kept": ((weights > 0) & m).float().sum(),
        "w_max": torch.where(m, weights.float(), torch.zeros_like(w)).amax() if m.numel() else w.sum(),
    }
    # normalised entropy of each head's weight distribution over its valid targets (1 = uniform)
    n_k = mf.sum(dim=(0, 1))
    total_k = w.sum(dim=(0, 1))
    p = w / total_k.clamp(min=torch.finfo(w.dtype).tiny)
    ent_k = -torch.xlogy(p, p).sum(dim=(0, 1))
    has = (n_k > 1) & (total_k > 0)
    out["entropy_sum"] = torch.where(has, ent_k / torch.log(n_k.clamp(min=2.0)), torch.zeros_like(ent_k)).sum()
    out["entropy_n"] = has.float().sum()
    zero = w.sum() * 0.0
    if noisy_targets is not None:
        noisy = (noisy_targets.bool() & m).float()
        clean = ((~noisy_targets.bool()) & m).float()
        out["w_noisy_sum"] = (w * noisy).sum()
        out["n_noisy"] = noisy.sum()
        out["w_clean_sum"] = (w * clean).sum()
        out["n_clean"] = clean.sum()
    else:
        for key in ("w_noisy_sum", "n_noisy", "w_clean_sum", "n_clean"):
            out[key] = zero
    return out


def add_sums(acc: dict[str, torch.Tensor], new: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if not acc:
        return dict(new)
    out = {k: acc[k] + new[k] for k in SUM_KEYS}
    out["w_max"] = torch.maximum(acc["w_max"], new["w_max"])
    return out


def summarize(sums: dict[str, float]) -> dict[str, float | None]:
    """Mean, std, max, kept fraction, normalised entropy (1 = uniform), noisy/clean mean weights."""
    n = sums.get("n_valid", 0.0)
    if n == 0:
        return {}
    mean = sums["w_sum"] / n
    var = max(sums["w_sq_sum"] / n - mean * mean, 0.0)
    out: dict[str, float | None] = {
        "weight_mean": mean,
        "weight_std": math.sqrt(var),
        "weight_max": sums["w_max"],
        "frac_kept": sums["n_kept"] / n,
        "weight_entropy": sums["entropy_sum"] / sums["entropy_n"] if sums.get("entropy_n") else None,
    }
    if sums.get("n_noisy", 0) > 0:
        out["weight_noisy"] = sums["w_noisy_sum"] / sums["n_noisy"]
    if sums.get("n_clean", 0) > 0:
        out["weight_clean"] = sums["w_clean_sum"] / sums["n_clean"]
    return out


def noisy_targets(noisy_tokens: torch.Tensor, H: int) -> torch.Tensor:
    """``out[b, t, k]`` = the target ``x[b, t+k+1]`` comes from a noisy sample."""
    B, T = noisy_tokens.shape
    out = torch.zeros(B, T, H, dtype=torch.bool, device=noisy_tokens.device)
    for k in range(H):
        if k + 1 < T:
            out[:, : T - k - 1, k] = noisy_tokens[:, k + 1:].bool()
    return out
