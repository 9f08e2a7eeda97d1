"""What the benches share: the random MTP model the step benches time (one place for its shape), the timing
harness (interleaved rounds, paired per-round ratios with their spread) and the header every bench prints.

A ratio of two timings is only worth printing if a neighbour's load cannot move it. So the variants are
timed in rounds that run each of them once, in alternating order, and a ratio is the median of the
per-round ratios: a slow stretch of the machine lands in both halves of a round and cancels. The spread
(lowest and highest per-round ratio) is printed with it, so a reader sees how much one round can wander.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from wmtp_lib.model.heads import MTPModel, mtp_config

ROOT = Path(__file__).resolve().parents[1]


def bench_mtp_model(vocab: int, hidden: int, layers: int, max_positions: int, device: torch.device) -> MTPModel:
    """A 4-head MTP model in training mode, seeded: ``layers`` blocks in all, attention heads of width 128."""
    torch.manual_seed(0)
    config = mtp_config(4, vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 3,
                        num_hidden_layers=layers, num_attention_heads=max(4, hidden // 128),
                        max_position_embeddings=max_positions)
    return MTPModel(config).to(device).train()


# ------------------------------------------------------------------------------------------ header


def git_commit() -> str:
    """Short commit of the checkout, ``-dirty`` when tracked files differ from it, or why there is none."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return head + ("-dirty" if dirty else "")


def machine_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name, architecture and core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or ""
    cpuinfo = Path("/proc/cpuinfo")  # Linux only; elsewhere platform.processor() is what there is
    for line in cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []:
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return f"{model or 'cpu'} ({platform.machine()}, {os.cpu_count()} cores)"


def bench_header(device: torch.device | str, dtype: str, threads: int | None = None) -> str:
    """The one line every bench prints first: machine, torch, threads, dtype, commit.

    ``dtype`` names the arithmetic (``fp32``, ``bf16 autocast``, ``bf16 FSDP2 params``); threads are
    torch's intra-op threads, which set the CPU's speed (on a GPU they only feed the launches): this
    process's, or ``threads`` where the work runs in other processes with their own count.
    """
    device = torch.device(device)
    threads = torch.get_num_threads() if threads is None else threads
    return (f"machine: {machine_name(device)} | torch {torch.__version__} | threads {threads} | "
            f"dtype {dtype} | commit {git_commit()}")


# ------------------------------------------------------------------------------------------ timing


def timed(step: Callable[[], None]) -> Callable[[], float]:
    """``step`` as a callable that returns its wall time in seconds.

    ``step`` must finish its device work itself (e.g. ``torch.cuda.synchronize()``) when it runs on a GPU:
    CUDA kernels run asynchronously and the clock would stop before they do.
    """
    def run() -> float:
        t0 = time.perf_counter()
        step()
        return time.perf_counter() - t0

    return run


def interleaved_rounds(variants: dict[str, Callable[[], float]], rounds: int, warmup: int = 1
                       ) -> dict[str, list[float]]:
    """Seconds of each variant per round: every round calls each variant once, in the given order on even
    rounds and reversed on odd ones (neither always follows the other), after ``warmup`` untimed rounds
    (allocations, thread pools, autotuning). Each callable returns its own seconds (see `timed`), so a
    variant may live in another process and time itself there."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            seconds[name].append(variants[name]())
    return seconds


@dataclass(frozen=True)
class Ratio:
    """A ratio of two variants' times: the median of the paired per-round ratios and their range."""

    median: float
    low: float
    high: float
    rounds: int

    def __str__(self) -> str:
        return f"{self.median:.3f}x (per-round {self.low:.3f}-{self.high:.3f}, {self.rounds} rounds)"


def paired_ratio(numerator: list[float], denominator: list[float]) -> Ratio:
    """Median and range of ``numerator[i] / denominator[i]`` over rounds ``i`` (the two times of one round)."""
    if len(numerator) != len(denominator) or not numerator:
        raise ValueError(f"need equally many rounds, at least one: {len(numerator)} and {len(denominator)}")
    ratios = [a / b for a, b in zip(numerator, denominator)]
    return Ratio(statistics.median(ratios), min(ratios), max(ratios), len(ratios))


def spread_line(seconds: list[float], unit: float = 1.0, label: str = "s") -> str:
    """``median (min-max)`` of one variant's per-round times, e.g. ``1.234 s (1.101-1.502)``."""
    return (f"{statistics.median(seconds) / unit:.4g} {label} "
            f"({min(seconds) / unit:.4g}-{max(seconds) / unit:.4g})")
