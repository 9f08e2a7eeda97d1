"""The bootstrap interval of a mean over problems (torch only: the analysis notebook imports it without a model)."""

from __future__ import annotations

import math

import torch


def bootstrap_ci(values: list[float], n_boot: int = 2000, alpha: float = 0.05, seed: int = 0
                 ) -> tuple[float, float, float]:
    """Mean and percentile bootstrap (1−alpha) interval over problems."""
    if not values:
        return math.nan, math.nan, math.nan
    g = torch.Generator().manual_seed(seed)
    v = torch.tensor(values, dtype=torch.float64)
    idx = torch.randint(0, len(values), (n_boot, len(values)), generator=g)
    means = v[idx].mean(1).sort().values
    lo = means[int(alpha / 2 * n_boot)].item()
    hi = means[min(n_boot - 1, int((1 - alpha / 2) * n_boot))].item()
    return v.mean().item(), lo, hi
