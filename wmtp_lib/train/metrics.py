"""`TrainMetrics`: the counters between two logs (device tensors with names), when to log, the one host sync
a log costs, ``metrics.jsonl`` (truncated on resume) and the run's ``summary.json``.

A skipped (non-finite) step adds nothing to the loss sums; a window whose steps were all skipped logs its
losses as null, never as 0.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from wmtp_lib.data.rows import Batch
from wmtp_lib.train.distributed import Dist
from wmtp_lib.train.weight_stats import (
    add_sums,
    pack_sums,
    summarize,
    unpack_sums,
    weight_sums,
)


class TrainMetrics:
    """Named accumulators of one log window and the records written from them."""

    def __init__(self, run_dir: Path, dist: Dist, H: int, log_every: int, total_steps: int, accelerator=None):
        self.path = run_dir / "metrics.jsonl"
        self.dist = dist
        self.H = H
        self.log_every = log_every
        self.total_steps = total_steps
        self.accelerator = accelerator  # set when trackers are configured
        self.skipped_total = 0
        self._reset()

    def _reset(self) -> None:
        zero = torch.zeros((), dtype=torch.float64, device=self.dist.device)
        self.loss = zero.clone()  # Σ over finite steps of this rank's share of Σ_k α_k L_k
        self.head_loss = torch.zeros(self.H, dtype=torch.float64, device=self.dist.device)
        self.value_loss = zero.clone()  # Σ over finite steps of this rank's share of the value MSE
        self.tokens = zero.clone()
        self.grad_norm = zero.clone()  # Σ over finite steps (the same on every rank)
        self.finite_steps = 0
        self.skipped = 0
        self.weights: dict[str, torch.Tensor] = {}
        self._step_value = zero.clone()  # the current step's micro-batches, kept only if the step is finite
        self._step_weights: dict[str, torch.Tensor] = {}
        self.start = time.perf_counter()

    # -------------------------------------------------------------- accumulate (no host sync)
    def add_micro_batch(self, batch: Batch, value_loss: torch.Tensor | None,
                        weights: torch.Tensor | None = None, valid: torch.Tensor | None = None,
                        noisy_targets: torch.Tensor | None = None, mark_targets: torch.Tensor | None = None) -> None:
        self.tokens += batch["attention_mask"].sum()
        if value_loss is not None:
            self._step_value += value_loss.double()
        if weights is not None:
            self._step_weights = add_sums(self._step_weights, weight_sums(weights, valid, noisy_targets,
                                                                               mark_targets))

    def add_step(self, loss: torch.Tensor, head_loss: torch.Tensor, grad_norm: torch.Tensor, finite: bool) -> None:
        """Close a step: its numbers join the window if it was finite; a skipped step is only counted."""
        if finite:
            self.loss += loss.double()
            self.head_loss += head_loss.double()
            self.grad_norm += grad_norm.double()
            self.value_loss += self._step_value
            if self._step_weights:
                self.weights = add_sums(self.weights, self._step_weights)
            self.finite_steps += 1
        else:
            self.skipped += 1
            self.skipped_total += 1
        self._step_value = torch.zeros_like(self._step_value)
        self._step_weights = {}

    # -------------------------------------------------------------- log
    def should_log(self, step: int) -> bool:
        return step % self.log_every == 0 or step == self.total_steps

    def log(self, step: int, lr: float, epoch: float, value_lr: float | None = None) -> dict[str, Any]:
        """Reduce the window over processes (the one host sync), write a record, print the step line."""
        if self.dist.device.type == "cuda":
            torch.cuda.synchronize(self.dist.device)
        elapsed = float(self.dist.max(torch.tensor(time.perf_counter() - self.start, dtype=torch.float64,
                                                   device=self.dist.device)))
        packed = torch.cat([torch.stack([self.loss, self.value_loss, self.tokens, self.grad_norm]), self.head_loss])
        loss, value, tokens, grad_norm, *head = self.dist.sum(packed).tolist()
        n = self.finite_steps
        record: dict[str, Any] = {
            "stage": "mtp", "step": step,
            "loss": loss / n if n else None, "head_loss": [h / n for h in head] if n else None,
            "lr": lr, "grad_norm": grad_norm / self.dist.world / n if n else None,
            "tokens_per_s": tokens / max(elapsed, 1e-9), "epoch": epoch,
            "skipped_steps": self.skipped, "skipped_steps_total": self.skipped_total,
        }
        if value_lr is not None:
            record["value_loss"] = value / n if n else None
            record["value_lr"] = value_lr
        if self.weights:
            sums = unpack_sums(self.dist.sum(pack_sums(self.weights)).tolist(), self.H)
            sums["w_max"] = float(self.dist.max(self.weights["w_max"].double()))
            record.update(summarize(sums))
        self.write(record)
        line = f"step {step}/{self.total_steps} loss {_fmt(record['loss'])} lr {lr:.2e} gnorm {_fmt(record['grad_norm'])}"
        if record.get("weight_noisy") is not None and record.get("weight_clean") is not None:
            line += f" w_noisy {record['weight_noisy']:.3f} w_clean {record['weight_clean']:.3f}"
        if self.skipped:
            line += f" skipped {self.skipped} non-finite"
        self.dist.print(line)
        self._reset()
        return record

    def restart_clock(self) -> None:
        """tokens/s covers training only, not a checkpoint written after a log."""
        self.start = time.perf_counter()

    def write(self, record: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record, allow_nan=False) + "\n")
        if self.accelerator is not None:
            self.accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record["step"])

    # -------------------------------------------------------------- resume and summary
    def truncate(self, step: int, stage: str) -> None:
        """Drop records logged after the checkpoint we resume from (they will be logged again)."""
        if not self.dist.is_main or not self.path.is_file():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            rec = json.loads(line)
            if (rec.get("stage") == "value" and stage == "mtp") or (rec.get("stage") == stage and rec["step"] <= step):
                keep.append(line)
        self.path.write_text("".join(line + "\n" for line in keep))

    def start_fresh(self) -> None:
        if self.dist.is_main and self.path.exists():
            self.path.unlink()

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.path.read_text().splitlines()]

    def write_summary(self, cfg: dict[str, Any], wall: float, code: dict[str, Any],
                      extra: dict[str, Any] | None = None) -> None:
        """``summary.json``: the last record's numbers, seed, the code that ran (``code``:
        `wmtp_lib.provenance.SessionLog.summary`), library versions, plus ``extra`` (e.g. what the critic's
        stage 1 reached)."""
        if not self.dist.is_main:
            return
        import accelerate
        import transformers

        mtp = [r for r in self.records() if r.get("stage") == "mtp"]
        last = mtp[-1] if mtp else {}
        summary = {
            "run_name": cfg["run_name"], "recipe": cfg["recipe"], "env": cfg["env"],
            "seed": cfg["seed"], "steps": cfg["train"]["steps"], "world_size": self.dist.world,
            "final_loss": last.get("loss"), "final_head_loss": last.get("head_loss"),
            "skipped_steps": sum(r.get("skipped_steps", 0) for r in mtp),
            "train_seconds_this_process": wall,
            "weight_mean": last.get("weight_mean"),
            "weight_noisy": last.get("weight_noisy"), "weight_clean": last.get("weight_clean"),
            "value_loss": last.get("value_loss"),
            "device": str(self.dist.device), **code,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "accelerate": accelerate.__version__,
            **(extra or {}),
        }
        path = self.path.parent / "summary.json"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
        tmp.replace(path)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.4f}"
