"""Summaries of token weights for the metrics log: sums that add up across micro-batches and ranks.

Everything stays a device tensor (masked arithmetic, no boolean indexing) so the training step never
waits on the GPU for a statistic; the window is read once, when it is logged.
"""

from __future__ import annotations

import math
from typing import Any

import torch

# Every entry is a sum, except w_max (combined by max), so windows and processes combine by addition.
# The token-level noise sums (NOISE_KEYS) are per head, shape (H,); the others are scalars.
NOISE_KEYS = ("w_corrupt_sum", "n_corrupt", "w_corrupt_rest_sum", "n_corrupt_rest",
              "w_clean_slot_sum", "n_clean_slot")
SUM_KEYS = ("n_valid", "w_sum", "w_sq_sum", "n_kept", "entropy_sum", "entropy_n",
            "w_noisy_sum", "n_noisy", "w_clean_sum", "n_clean") + NOISE_KEYS


def noise_token_sums(weights: torch.Tensor, valid: torch.Tensor, noisy_targets: torch.Tensor,
                     mark_targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per head ``(H,)`` weight sums and counts on three groups of valid targets:

    - ``corrupt``: targets of noisy samples inside the corrupted spans (the tokens that teach the noise);
    - ``corrupt_rest``: the other targets of noisy samples (shared with a clean solution);
    - ``clean_slot``: targets of clean samples at the same template positions (their operation and constant).

    ``weights``, ``valid``, ``noisy_targets`` and ``mark_targets`` are ``(B, T, H)`` (the last two from
    `noisy_targets` applied to the rows' ``noisy`` and ``noise_marks``).
    """
    m = valid.bool()
    w = weights.float()
    noisy, mark = noisy_targets.bool(), mark_targets.bool()
    groups = {"corrupt": noisy & mark & m, "corrupt_rest": noisy & ~mark & m, "clean_slot": ~noisy & mark & m}
    out: dict[str, torch.Tensor] = {}
    for name, g in groups.items():
        gf = g.float()
        out[f"w_{name}_sum"] = (w * gf).sum(dim=(0, 1))
        out[f"n_{name}"] = gf.sum(dim=(0, 1))
    return out


def weight_sums(weights: torch.Tensor, valid: torch.Tensor, noisy_targets: torch.Tensor | None = None,
                mark_targets: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Sums over valid entries of ``(B, T, H)`` weights; ``noisy_targets`` marks targets from noisy samples,
    ``mark_targets`` targets inside their samples' noise spans (for `noise_token_sums`)."""
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
    if noisy_targets is not None and mark_targets is not None:
        out.update(noise_token_sums(weights, valid, noisy_targets, mark_targets))
    else:
        out.update({key: torch.zeros_like(w[0, 0]) for key in NOISE_KEYS})
    return out


def pack_sums(sums: dict[str, torch.Tensor]) -> torch.Tensor:
    """The SUM_KEYS entries as one float64 vector, for a single all-reduce."""
    return torch.cat([sums[k].double().reshape(-1) for k in SUM_KEYS])


def unpack_sums(flat: list[float], H: int) -> dict[str, float | list[float]]:
    """Inverse of `pack_sums` (on the reduced values): scalars, and lists of ``H`` for NOISE_KEYS."""
    out: dict[str, float | list[float]] = {}
    i = 0
    for k in SUM_KEYS:
        if k in NOISE_KEYS:
            out[k] = list(flat[i:i + H])
            i += H
        else:
            out[k] = flat[i]
            i += 1
    if i != len(flat):
        raise ValueError(f"packed weight sums have {len(flat)} values, expected {i} for H={H}")
    return out


def add_sums(acc: dict[str, torch.Tensor], new: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if not acc:
        return dict(new)
    out = {k: acc[k] + new[k] for k in SUM_KEYS}
    out["w_max"] = torch.maximum(acc["w_max"], new["w_max"])
    return out


def summarize(sums: dict[str, Any]) -> dict[str, Any]:
    """Mean, std, max, kept fraction, normalised entropy (1 = uniform), noisy/clean mean weights, and per
    head the mean weight on corrupted tokens, the rest of noisy samples and clean samples' template slots."""
    n = sums.get("n_valid", 0.0)
    if n == 0:
        return {}
    mean = sums["w_sum"] / n
    var = max(sums["w_sq_sum"] / n - mean * mean, 0.0)
    out: dict[str, Any] = {
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
    # token level, per head (None where a head saw no such target in the window)
    for name in ("corrupt", "corrupt_rest", "clean_slot"):
        counts = sums.get(f"n_{name}")
        if counts is not None and any(n > 0 for n in counts):
            out[f"weight_{name}"] = [w / n if n > 0 else None for w, n in zip(sums[f"w_{name}_sum"], counts)]
    return out


def noisy_targets(noisy_tokens: torch.Tensor, H: int) -> torch.Tensor:
    """``out[b, t, k]`` = the target ``x[b, t+k+1]`` comes from a noisy sample."""
    B, T = noisy_tokens.shape
    out = torch.zeros(B, T, H, dtype=torch.bool, device=noisy_tokens.device)
    for k in range(H):
        if k + 1 < T:
            out[:, : T - k - 1, k] = noisy_tokens[:, k + 1:].bool()
    return out
