"""Training entry: ``python -m wmtp_lib.train --config <resolved.yaml>`` (run by ``accelerate launch``).

One process on a CPU, several over gloo, or FSDP2 over GPUs, with the same code. An optimizer step runs
the memory-efficient sequential MTP step (`wmtp_lib.model.step`) on each micro-batch of its accumulation window;
the loss of head ``k`` is ``Σ w·m·ce / N_k`` with ``N_k`` the valid targets of the whole optimizer step
(every micro-batch, every rank; DESIGN §4), so the gradient does not depend on how the batch is split.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from transformers import get_scheduler

from wmtp_lib.checkpoints.tokenization import (
    compat_texts,
    load_tokenizer,
    verify_on_training_texts,
)
from wmtp_lib.config import ConfigError, flat_config, load_resolved, project_path
from wmtp_lib.data.rows import Batch, TokenizedData, move_batch, tokenize_samples
from wmtp_lib.data.schedule import BatchSchedule
from wmtp_lib.data.sources import load_samples
from wmtp_lib.model.heads import MTPModel
from wmtp_lib.provenance import SessionLog, code_provenance
from wmtp_lib.model.step import (
    StepCounts,
    StepOutput,
    sequential_mtp_step,
    valid_counts,
)
from wmtp_lib.train.checkpointing import Checkpointer
from wmtp_lib.train.critic_weighting import CriticWeighting
from wmtp_lib.train.distributed import Dist, clip_grad_norm
from wmtp_lib.train.metrics import TrainMetrics
from wmtp_lib.train.run_models import load_base, model_dir
from wmtp_lib.train.weight_stats import noisy_targets
from wmtp_lib.train.weighting import Rho1Weighting, UniformWeighting, group_weights


class NonFiniteStop(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient norm."""


STOPPED_EXIT = 75  # EX_TEMPFAIL: stopped on request with a checkpoint; launching again resumes


class StopRequest:
    """SIGTERM while training (a notebook's interrupt, ``accelerate launch`` passing on its own, a preempted
    job): finish the step, save a checkpoint, exit (code `STOPPED_EXIT`). A SIGTERM more than `SAME_STOP_S`
    after the first ends the process at once. Training and the critic's stage 1 both stop this way; a SIGTERM
    while the models load (`run`) or the data is scored stops training after its first step.

    Every process reads the flag in the step's one all-reduce (`Trainer.train_step`), so all stop after the
    same step and write the same checkpoint even when the signal reaches them during different steps.
    """

    # a scheduler that signals every process, and the launcher passing its own signal on, deliver two at once
    SAME_STOP_S = 5.0

    def __init__(self) -> None:
        self.requested = False
        self.first_at = 0.0
        self.previous: Any = None

    def __enter__(self) -> StopRequest:
        self.previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGTERM, self.previous)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and time.monotonic() - self.first_at > self.SAME_STOP_S:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
        if not self.requested:
            self.requested, self.first_at = True, time.monotonic()


def set_all_seeds(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def accelerator_kwargs(train: dict[str, Any]) -> list:
    """Accelerator kwargs handlers: the process-group timeout from ``train.dist_timeout_minutes``, so the
    other ranks wait at a barrier while rank 0 alone downloads, scores or exports (NCCL's default: 10 min)."""
    from datetime import timedelta

    from accelerate.utils import InitProcessGroupKwargs

    return [InitProcessGroupKwargs(timeout=timedelta(minutes=train["dist_timeout_minutes"]))]


def forward_backward(model: MTPModel, batches: list[Batch], weighting, dist: Dist, group: str,
                     head_weights: list[float] | None, chunk_size: int,
                     record: Callable[[Batch, StepOutput, Any], None] | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of one optimizer step over this rank's micro-batches; returns this rank's share of the
    step loss ``Σ_k α_k L_k`` and of each ``L_k`` (their sums over ranks are the step's values).

    ``N_k`` comes from the label masks before any forward (one all-reduce). Gradients are scaled by the
    world size because the cross-rank reduction (ours or FSDP's reduce-scatter) averages; the value loss is
    the same (the critic's value loss divides by the step's state count).
    """
    H = model.n_future
    counts = StepCounts(n_valid=dist.sum(valid_counts(batches, H)).float(), loss_scale=dist.world)
    weighting.begin_window(batches, dist)
    precomputed = group_weights(weighting, model, batches, dist, H) \
        if group == "global" and weighting.needs_scores else [None] * len(batches)
    loss = torch.zeros((), dtype=torch.float64, device=dist.device)
    head_loss = torch.zeros(H, dtype=torch.float64, device=dist.device)
    for batch, weights in zip(batches, precomputed):
        batch_weights = weighting.for_batch(batch, weights)
        out = sequential_mtp_step(model, batch, batch_weights, counts, head_weights=head_weights, chunk_size=chunk_size)
        trunk = batch_weights.trunk_loss
        value = trunk.value if trunk is not None else None
        added = trunk.added if trunk is not None else None
        loss += out.loss.double() - (0.0 if added is None else added)  # the MTP loss alone
        head_loss += out.head_losses.double()
        if record is not None:
            record(batch, out, value)
    return loss, head_loss


def build_weighting(cfg: dict[str, Any], H: int, hidden_size: int, tokenizer, samples, data: TokenizedData,
                    dist: Dist, run_dir: Path, model_dir: Callable[[str], Path]):
    """The weighting of ``weights.scheme`` with its setup done (reference losses scored, rewards computed)."""
    scheme = cfg["weights"]["scheme"]
    if scheme == "rho1":
        return Rho1Weighting.build(cfg, H, tokenizer, samples, data, dist, model_dir)
    if scheme == "critic":
        return CriticWeighting.build(cfg, H, hidden_size, tokenizer, samples, data, dist, run_dir, model_dir)
    return UniformWeighting()


class Trainer:
    """Builds the parts of a run in order, then runs (critic stage 1 and) the training loop."""

    cfg: dict[str, Any]
    accelerator: Any
    dist: Dist
    run_dir: Path
    # model and data
    base_dir: Path
    tokenizer: Any
    model: MTPModel
    data: TokenizedData
    schedule: BatchSchedule
    # what the recipe adds
    weighting: Any
    # optimisation, persistence, logging
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    checkpointer: Checkpointer
    metrics: TrainMetrics

    def __init__(self, cfg: dict[str, Any]):
        from accelerate import Accelerator

        self.cfg = cfg
        train = cfg["train"]
        self.run_dir = project_path(cfg["paths"]["runs_dir"]) / cfg["run_name"]
        self.accelerator = Accelerator(log_with=train["trackers"] or None, project_dir=str(self.run_dir),
                                       kwargs_handlers=accelerator_kwargs(train))
        self.dist = Dist.from_accelerator(self.accelerator)
        # bf16 autocast on one GPU; under FSDP2 the mixed-precision policy casts instead
        self.autocast = train["mixed_precision"] == "bf16" and self.dist.device.type == "cuda" and not self.dist.fsdp
        set_all_seeds(cfg["seed"])
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            # read now, before minutes of model loading: an edit or commit made while this session trains is
            # not the code that runs (the modules are imported already)
            self.sessions = SessionLog(self.run_dir, code_provenance())
        self.dist.barrier()
        if train["trackers"]:
            self.accelerator.init_trackers(cfg["run_name"], config=flat_config(cfg))

        self.base_dir = self.model_dir(cfg["models"]["base"])
        self.tokenizer = load_tokenizer(self.base_dir)
        # Memory: built on the meta device everywhere, then (under FSDP2) sharded before any weight exists;
        # rank 0 alone reads the weights and scatters each tensor's chunks (`load_base`), so no rank holds
        # the full float32 model (28 GB of host memory a rank at 7B) it does not train with.
        self.model = load_base(self.base_dir, cfg["models"]["n_future"], self.dist, train["mixed_precision"]).train()
        if train["gradient_checkpointing"]:
            self.model.gradient_checkpointing_enable()
        self.samples = load_samples(cfg["data"], "train", project_path(cfg["paths"]["datasets_dir"]))
        checked = verify_on_training_texts(self.tokenizer, self.base_dir, compat_texts(self.samples))
        if checked is not None:
            self.dist.print(f"tokenizer: identical to SentencePiece's tokenizer.model on {checked} training texts")
        self.data = tokenize_samples(self.tokenizer, self.samples, cfg["data"]["max_length"],
                                     cfg["data"]["prompt_masking"], cfg["data"]["pack"])
        self.dist.print(f"data: {len(self.samples)} samples -> {len(self.data)} rows of {cfg['data']['max_length']} "
                        f"tokens ({int(self.data.noisy.any(1).sum())} rows with noisy solutions)")
        self.schedule = BatchSchedule(len(self.data), train["micro_batch_size"], train["grad_accum"], self.dist.world,
                                      cfg["seed"])

        # The weighting may put a second 7B model on rank 0's GPU only for one scoring pass (the reference's cached
        # losses, the reward model's rewards; the other ranks read the caches), or on every rank for the whole run
        # (an online reference; the reward model as the critic's value trunk, bf16, unsharded: preflight counts
        # it); the base is already sharded by then.
        self.weighting = build_weighting(cfg, self.model.n_future, self.model.config.hidden_size, self.tokenizer,
                                         self.samples, self.data, self.dist, self.run_dir, self.model_dir)

        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=train["lr"], weight_decay=train["weight_decay"],
                                           betas=(0.9, 0.95), eps=1e-8)
        self.scheduler = get_scheduler("cosine_with_min_lr", self.optimizer, num_warmup_steps=train["warmup_steps"],
                                       num_training_steps=train["steps"],
                                       scheduler_specific_kwargs={"min_lr_rate": train["min_lr_ratio"]})
        self.checkpointer = Checkpointer(self.run_dir, cfg, self.dist, self.model, self.optimizer,
                                         {"scheduler": self.scheduler, "weighting": self.weighting},
                                         also_finite=getattr(self.weighting, "value_head", None))
        self.metrics = TrainMetrics(self.run_dir, self.dist, self.model.n_future, train["log_every"], train["steps"],
                                    self.accelerator if train["trackers"] else None)
        self.nonfinite_in_row = 0
        self.stop: StopRequest | None = None  # set while the training loop runs
        self.stop_agreed = False

    def model_dir(self, model_id: str) -> Path:
        return model_dir(model_id, self.cfg, self.dist)

    def batch(self, step: int, slot: int) -> Batch:
        rows = self.schedule.micro_batch(step, slot, self.dist.rank)
        return move_batch(self.data.rows(rows), self.dist.device)

    # -------------------------------------------------------------- loop
    def train(self, stop: StopRequest | None = None) -> dict[str, Any]:
        """Resume or start, train to ``train.steps`` (or ``stop_after``), write the run's end; a SIGTERM stops
        it after a step with a checkpoint (``stop``: one already listening, as `run` passes)."""
        with contextlib.nullcontext(stop) if stop is not None else StopRequest() as self.stop:
            result = self._train()
        self.stop = None
        return result

    def _train(self) -> dict[str, Any]:
        train = self.cfg["train"]
        stage, start = self.resume()
        if stage != "value" and start >= train["steps"]:
            if (self.run_dir / "final").is_dir() and (self.run_dir / "summary.json").is_file():
                self.dist.print(f"run {self.cfg['run_name']} already finished at step {start}: nothing to train "
                                "(for another run, pass a new run_name)")
                return {"finished": True, "trained_steps": 0}
            # stopped after its last checkpoint, while the final model or the summary was being written
            self.dist.print(f"run {self.cfg['run_name']} trained all {start} steps; writing what its end did not "
                            "(final model, summary)")
            self.record_session(stage, start)
            with self.no_stop():  # half an export is worth nothing: a stop waits for it
                self.finish(0.0)
            return {"finished": True, "trained_steps": 0}
        self.record_session(stage, start)
        if stage == "value":
            value_step = self.weighting.fit_value_head(self, start)
            if value_step is not None:
                return self.stopped("value", value_step, self.cfg["critic"]["stage1_max_steps"], 0)
            if self.stop_agreed:  # agreed on the step stage 1 ended anyway: its end, mtp-0000000, is saved
                return self.stopped("mtp", 0, train["steps"], 0)
            stage, start = "mtp", 0
        last = min(train["steps"], train["stop_after"] if train["stop_after"] is not None else train["steps"])
        t0 = time.perf_counter()
        for step in range(start, last):
            lr = self.scheduler.get_last_lr()[0]
            self.train_step(step)
            done = step + 1
            logged = self.metrics.should_log(done)
            if logged:
                value_lr = self.weighting.lr if isinstance(self.weighting, CriticWeighting) else None
                self.metrics.log(done, lr, self.schedule.epoch_at(done), value_lr)
            if self.checkpointer.should_save(done, last) or self.stop_agreed:
                self.checkpointer.save(done, "mtp")
            if self.stop_agreed:
                return self.stopped("mtp", done, train["steps"], done - start)
            if logged:
                self.metrics.restart_clock()
        finished = last == train["steps"]
        if finished:
            with self.no_stop():
                self.finish(time.perf_counter() - t0)
        return {"finished": finished, "trained_steps": last - start}

    @contextlib.contextmanager
    def no_stop(self):
        """A SIGTERM while the run's end is written (final model, summary) waits for it: no step boundary
        comes to stop at, and half an export is worth nothing (the launcher's grace bounds the wait)."""
        previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)

    def stopped(self, stage: str, done: int, total: int, trained: int) -> dict[str, Any]:
        """Say where a stop on request left the run (`wmtp_lib.launch.STOPPED_LINE` reads it); the result."""
        where = "value step" if stage == "value" else "step"
        self.dist.print(f"stopped on request (SIGTERM) after {where} {done}/{total}: checkpoint saved, launch "
                        "again to resume")
        return {"finished": False, "trained_steps": trained, "stopped": True}

    def record_session(self, stage: str, step: int) -> None:
        if self.dist.is_main:
            self.sessions.start(stage, step)

    def agree(self, bad: torch.Tensor) -> bool:
        """One all-reduce: whether every process's step was finite (returned), and whether any was asked to stop
        (`stop_agreed`, so all stop after the same step)."""
        stop = self.stop is not None and self.stop.requested
        # filled on the device: no host-to-device copy in the step, the one sync stays the reduce's result
        flags = torch.stack([bad.double(), torch.full((), float(stop), dtype=torch.float64, device=bad.device)])
        any_bad, any_stop = self.dist.max(flags).tolist()
        self.stop_agreed = any_stop > 0
        return any_bad == 0

    def finish(self, wall: float) -> None:
        """The run's end: ``final/`` (full weights, tokenizer, the critic's value head), then ``summary.json``."""
        critic = isinstance(self.weighting, CriticWeighting)
        extra = {"value_head.safetensors": self.weighting.save_value_head} if critic else {}
        self.checkpointer.export_final(self.base_dir, extra)
        code = self.sessions.summary() if self.dist.is_main else {}
        self.metrics.write_summary(self.cfg, wall, code, self.weighting.summary() if critic else None)
        self.dist.print(f"run {self.cfg['run_name']} finished {self.cfg['train']['steps']} steps: final model in "
                        f"{self.run_dir / 'final'}, summary in {self.run_dir / 'summary.json'}")

    def train_step(self, step: int) -> None:
        """Zero grads → micro-batches → average/clip → finite check → optimizer and scheduler step → metrics."""
        train = self.cfg["train"]
        batches = [self.batch(step, slot) for slot in range(train["grad_accum"])]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
            loss, head_loss = forward_backward(self.model, batches, self.weighting, self.dist,
                                               self.cfg["weights"]["weight_group"], train["head_weights"],
                                               train["chunk_size"], self.record_micro_batch)
        if not self.dist.fsdp:
            self.dist.average_grads(self.params)
        grad_norm = clip_grad_norm(self.params, train["max_grad_norm"])
        # one tiny all-reduce and host sync a step: every process must agree to skip, and to stop (SIGTERM)
        bad = (~torch.isfinite(loss)) | (~torch.isfinite(grad_norm))
        critic = isinstance(self.weighting, CriticWeighting)
        if critic:  # a non-finite value loss shows in the value head's gradient norm
            bad |= ~torch.isfinite(self.weighting.sync_grads(self.dist))
        finite = self.agree(bad)
        if finite:
            self.optimizer.step()
        if critic:
            self.weighting.optimizer_step(skip=not finite)
        self.scheduler.step()  # the lr stays a function of the step number, skipped or not
        self.optimizer.zero_grad(set_to_none=True)
        self.metrics.add_step(loss, head_loss, grad_norm, finite)
        self.check_finite(step + 1, finite)

    def record_micro_batch(self, batch: Batch, out: StepOutput, value_loss) -> None:
        if self.weighting.needs_scores:
            H = self.model.n_future
            self.metrics.add_micro_batch(batch, value_loss, out.weights, out.valid,
                                         noisy_targets(batch["noisy"], H), noisy_targets(batch["noise_marks"], H))
        else:
            self.metrics.add_micro_batch(batch, value_loss)

    def check_finite(self, step: int, finite: bool) -> None:
        limit = self.cfg["train"]["max_nonfinite_steps"]
        self.nonfinite_in_row = 0 if finite else self.nonfinite_in_row + 1
        if not finite:
            self.dist.print(f"step {step}: non-finite loss or gradient norm, optimizer step skipped "
                            f"({self.nonfinite_in_row} in a row)")
        if self.nonfinite_in_row >= limit:
            latest = self.checkpointer.latest()
            raise NonFiniteStop(
                f"steps {step - limit + 1}-{step}: non-finite loss or gradient norm {limit} times in a row "
                f"(train.max_nonfinite_steps); stopped at step {step}. Weights are those of the last finite step"
                f"{f'; last checkpoint {latest}' if latest else ''}. Lower train.lr or raise weights.temperature "
                "in a new run_name (both keys are part of the config a checkpoint is bound to, so this run "
                "cannot resume under them)")

    def resume(self) -> tuple[str, int]:
        """(stage, step) to start from: the latest checkpoint under ``resume: auto``, else a fresh start."""
        train = self.cfg["train"]
        ckpts = self.checkpointer.dir
        if train["resume"] == "never" and ckpts.is_dir() and any(ckpts.iterdir()):
            raise RuntimeError(f"{ckpts} has checkpoints and train.resume is 'never': "
                               "choose another run_name or remove the run directory")
        latest = self.checkpointer.latest() if train["resume"] == "auto" else None
        if self.dist.is_main:
            for path in self.checkpointer.remove_incomplete():
                self.dist.print(f"removed {path}: a checkpoint that was stopped while it was written")
        if latest is None:
            self.metrics.start_fresh()
            stage, step = ("value" if isinstance(self.weighting, CriticWeighting) else "mtp"), 0
        else:
            step, stage = self.checkpointer.load(latest)
            self.dist.print(f"resumed from {latest} (stage {stage}, step {step})")
            self.metrics.truncate(step, stage)
        self.dist.barrier()
        return stage, step


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    with StopRequest() as stop:  # a SIGTERM while the models load is kept for the first step
        trainer = Trainer(cfg)
        result = trainer.train(stop)
    if cfg["train"]["trackers"]:
        trainer.accelerator.end_training()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wmtp_lib.train", description="WMTP training entry")
    parser.add_argument("--config", required=True, help="resolved config written by notebooks/train.ipynb")
    args = parser.parse_args(argv)
    try:
        cfg = load_resolved(args.config)
        result = run(cfg)
    except (ConfigError, FileNotFoundError, NonFiniteStop) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return STOPPED_EXIT if result.get("stopped") else 0
