"""Summaries of token weights for the metrics log: sums that add up across micro-batches and ranks."""

from __future__ import annotations

import math

import torch

# Every entry is a sum (or a max) so windows and processes combine by addition (max by max).
SUM_KEYS = ("n_valid", "w_sum", "w_sq_sum", "n_kept", "entropy_sum", "entropy_n",
            "w_noisy_sum", "n_noisy", "w_clean_sum", "n_clean")


def weight_sums(weights: torch.Tensor, valid: torch.Tensor, noisy_targets: torch.Tensor | None = None
                ) -> dict[str, float]:
    """Sums over valid entries of ``(B, T, H)`` weights; ``noisy_targets`` marks targets from noisy samples."""
    m = valid.bool()
    w = weights.float()[m]
    out = {k: 0.0 for k in SUM_KEYS}
    out["w_max"] = float(w.max()) if w.numel() else 0.0
    out["n_valid"] = float(w.numel())
    out["w_sum"] = float(w.sum())
    out["w_sq_sum"] = float((w * w).sum())
    out["n_kept"] = float((w > 0).sum())
    for k in range(weights.shape[-1]):
        wk = weights[..., k].float()[m[..., k]]
        n = wk.numel()
        total = float(wk.sum())
        if n > 1 and total > 0:
            p = wk / total
            p = p[p > 0]
            out["entropy_sum"] += float(-(p * p.log()).sum()) / math.log(n)
            out["entropy_n"] += 1.0
    if noisy_targets is not None:
        noisy = noisy_targets.bool() & m
        clean = (~noisy_targets.bool()) & m
        out["w_noisy_sum"] = float(weights.float()[noisy].sum())
        out["n_noisy"] = float(noisy.sum())
        out["w_clean_sum"] = float(weights.float()[clean].sum())
        out["n_clean"] = float(clean.sum())
    return out


def add_sums(acc: dict[str, float], new: dict[str, float]) -> dict[str, float]:
    out = dict(acc)
    for k in SUM_KEYS:
        out[k] = out.get(k, 0.0) + new.get(k, 0.0)
    out["w_max"] = max(out.get("w_max", 0.0), new.get("w_max", 0.0))
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
