"""What the step benches share: the random MTP model they time (one place for its shape) and the timing."""

from __future__ import annotations

import time
from typing import Callable

import torch

from wmtp_lib.heads import MTPModel, mtp_config


def bench_mtp_model(vocab: int, hidden: int, layers: int, max_positions: int, device: torch.device) -> MTPModel:
    """A 4-head MTP model in training mode, seeded: ``layers`` blocks in all, attention heads of width 128."""
    torch.manual_seed(0)
    config = mtp_config(4, vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 3,
                        num_hidden_layers=layers, num_attention_heads=max(4, hidden // 128),
                        max_position_embeddings=max_positions)
    return MTPModel(config).to(device).train()


def median_seconds(step: Callable[[], None], steps: int) -> float:
    """Median wall time of ``steps`` calls after one warm-up call (allocations, thread pools).

    ``step`` must finish its device work itself (e.g. ``torch.cuda.synchronize()``) when it runs on a GPU.
    """
    step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def interleaved_best(variants: dict[str, Callable[[], float]], rounds: int = 2) -> dict[str, float]:
    """Each variant's best time over ``rounds`` rounds that run all variants in turn, so that drift in the
    machine's speed (a neighbour's load, clocks) hits all of them alike."""
    results: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for k, timed in variants.items():
            results[k].append(timed())
    return {k: min(v) for k, v in results.items()}
