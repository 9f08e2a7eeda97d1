"""Training entry: ``python -m wmtp_lib.train --config <resolved.yaml>`` (run by ``accelerate launch``).

One process on a CPU, several over gloo, or FSDP2 over GPUs, with the same code. The MTP step is the
memory-efficient sequential one (`wmtp_lib.step`). Because it runs one backward per head, gradients
are not synchronised by DDP's reducer (it allows one per step) but averaged with one all-reduce per
optimizer step, which is the same arithmetic; under FSDP each block is its own shard unit.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from wmtp_lib.config import ConfigError, load_resolved, project_path
from wmtp_lib.critic import (
    ValueHead,
    align_td,
    sparse_rewards,
    state_mask_from_labels,
    value_loss,
    value_targets,
)
from wmtp_lib.data import BatchSchedule, TokenizedData, load_samples, tokenize_samples
from wmtp_lib.heads import MTPModel
from wmtp_lib.loaders import check_tokenizer_compat, load_tokenizer, verify_manifest
from wmtp_lib.tokenization import compat_texts
from wmtp_lib.losses import align_reference, critic_weights, rho1_weights
from wmtp_lib.registry import load_registry
from wmtp_lib.step import HeadWeightFn, sequential_mtp_step, uniform_weights
from wmtp_lib.weight_stats import add_sums, noisy_targets, pack_sums, summarize, unpack_sums, weight_sums

COMPLETE_MARKER = "COMPLETE"

# torch.distributed.checkpoint says so each time it saves in a single process; that is intended here.
warnings.filterwarnings("ignore", message=r"torch.distributed is disabled, unavailable or uninitialized")


# ------------------------------------------------------------------------------------------ helpers


class Dist:
    """Rank, world size and the few collectives training needs (no-ops in one process)."""

    def __init__(self, accelerator):
        from accelerate.utils import DistributedType

        self.acc = accelerator
        # On CPU-only machines accelerate initialises the gloo process group but reports a single
        # process, so rank and world size are read from torch.distributed itself.
        self.active = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.rank = dist.get_rank() if self.active else accelerator.process_index
        self.world = dist.get_world_size() if self.active else accelerator.num_processes
        self.is_main = self.rank == 0
        self.device = accelerator.device
        self.fsdp = (accelerator.distributed_type == DistributedType.FSDP
                     or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true")

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def all_reduce_tensor(self, values: torch.Tensor) -> list[float]:
        """Sum of a float64 tensor over processes, read back to the host (the one sync per log)."""
        if self.active:
            values = values.clone()
            dist.all_reduce(values)
        return values.cpu().tolist()

    def all_reduce_max(self, value: float) -> float:
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def average_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Average gradients over processes with one flat all-reduce (what DDP computes)."""
        if not self.active:
            return
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[offset: offset + n].view_as(g))
            offset += n


def log_line(d: Dist, msg: str) -> None:
    if d.is_main:
        print(msg, flush=True)


def set_all_seeds(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """RNG states as tensors and plain values, so checkpoints load with ``weights_only=True``."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {"python": [py_version, list(py_state), py_gauss],
             "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py_version, py_state, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_name, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def lr_lambda(warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    """Linear warmup to 1, then cosine decay to ``min_ratio`` at ``total``."""

    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


# ------------------------------------------------------------------------------------------ models


def model_dir(model_id: str, cfg: dict[str, Any], d: Dist) -> Path:
    """Local directory of a registry id: staged here, downloaded from S3, or built (tiny, local env)."""
    reg = load_registry()
    entry = reg.model(model_id)
    local = project_path(cfg["paths"]["models_dir"]) / model_id
    if d.is_main:
        if cfg["storage"]["kind"] == "s3":
            from wmtp_lib.storage import download_directory

            if not entry.s3:
                raise ConfigError(f"model {model_id} has no s3 path in params/models.yaml")
            result = download_directory(entry.s3, local)
            log_line(d, f"{model_id}: {len(result['downloaded'])} files downloaded, "
                        f"{len(result['skipped'])} already cached in {local}")
        elif not (local / "manifest.json").is_file():
            if entry.format == "tiny" and cfg["storage"]["stage_tiny_if_missing"]:
                from wmtp_lib.tiny import stage_tiny

                stage_tiny(project_path(cfg["paths"]["models_dir"]), log=lambda m: log_line(d, m))
            else:
                raise FileNotFoundError(
                    f"model {model_id} is not staged at {local}; stage it with "
                    f"papermill notebooks/stage_models.ipynb out.ipynb -p models '[\"{model_id}\"]'")
        verify_manifest(local, check_hashes=False)
    d.barrier()
    return local


def load_base(path: Path, n_future: int) -> MTPModel:
    cfg = json.loads((path / "config.json").read_text())
    if "n_future_tokens" in cfg:
        model = MTPModel.from_pretrained(path, dtype=torch.float32)
    else:
        from wmtp_lib.loaders import load_causal_lm

        model = MTPModel.from_causal_lm(load_causal_lm(path, dtype=torch.float32), n_future)
    if model.n_future != n_future:
        raise ConfigError(f"models.n_future is {n_future} but {path} has {model.n_future} heads")
    return model


def shard_fsdp(model: MTPModel, mixed_precision: str) -> MTPModel:
    """FSDP2: every decoder block, the final norm and the unembedding are shard units; then the root."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if mixed_precision == "bf16" else None,
                                  reduce_dtype=torch.float32)
    for block in list(model.trunk) + list(model.heads):
        fully_shard(block, mp_policy=policy)
    fully_shard(model.norm, mp_policy=policy)
    fully_shard(model.lm_head, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


# ------------------------------------------------------------------------------------------ trainer


class Trainer:
    def __init__(self, cfg: dict[str, Any]):
        from accelerate import Accelerator

        self.cfg = cfg
        tcfg = cfg["train"]
        trackers = tcfg["trackers"] or None
        self.run_dir = project_path(cfg["paths"]["runs_dir"]) / cfg["run_name"]
        self.acc = Accelerator(log_with=trackers, project_dir=str(self.run_dir))
        self.d = Dist(self.acc)
        self.device = self.d.device
        self.autocast = (tcfg["mixed_precision"] == "bf16" and self.device.type == "cuda" and not self.d.fsdp)
        set_all_seeds(cfg["seed"])
        self.ckpt_dir = self.run_dir / "checkpoints"
        if self.d.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.d.barrier()
        if trackers:
            self.acc.init_trackers(cfg["run_name"], config=_flat(cfg))

    # -------------------------------------------------------------- setup
    def setup(self) -> None:
        cfg, d = self.cfg, self.d
        base_dir = model_dir(cfg["models"]["base"], cfg, d)
        self.base_dir = base_dir
        self.tokenizer = load_tokenizer(base_dir)
        self.model = load_base(base_dir, cfg["models"]["n_future"]).to(self.device).train()
        if cfg["train"]["gradient_checkpointing"]:
            self.model.gradient_checkpointing_enable()
        self.H = self.model.n_future
        datasets_dir = project_path(cfg["paths"]["datasets_dir"])
        samples = load_samples(cfg["data"], "train", datasets_dir)
        self.samples = samples
        self.data: TokenizedData = tokenize_samples(self.tokenizer, samples, cfg["data"]["max_length"],
                                                    cfg["data"]["prompt_masking"], cfg["data"]["pack"])
        log_line(d, f"data: {len(samples)} samples -> {len(self.data)} rows of {cfg['data']['max_length']} tokens "
                    f"({int(self.data.noisy.any(1).sum())} rows with noisy solutions)")
        self.schedule = BatchSchedule(len(self.data), cfg["train"]["micro_batch_size"], cfg["train"]["grad_accum"],
                                      d.world, cfg["seed"])
        self.scheme = cfg["weights"]["scheme"]
        self.ref_ce_rows: torch.Tensor | None = None
        self.ref_model = None
        if self.scheme == "rho1":
            self._setup_reference()
        self.value_head: ValueHead | None = None
        if self.scheme == "critic":
            self.value_head = ValueHead(self.model.config.hidden_size).to(self.device)
            self.rewards = self._sequence_rewards()
        if d.fsdp:
            self.model = shard_fsdp(self.model, cfg["train"]["mixed_precision"])
        t = cfg["train"]
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=t["lr"], weight_decay=t["weight_decay"],
                                           betas=(0.9, 0.95), eps=1e-8)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(t["warmup_steps"], t["steps"], t["min_lr_ratio"]))
        if self.value_head is not None:
            self.value_optimizer = torch.optim.AdamW(self.value_head.parameters(), lr=cfg["critic"]["stage1_lr"])

    def _setup_reference(self) -> None:
        cfg, d = self.cfg, self.d
        ref_dir = model_dir(cfg["models"]["reference"], cfg, d)
        ref_tok = load_tokenizer(ref_dir)
        check_tokenizer_compat(self.tokenizer, ref_tok, compat_texts(self.samples), cfg["models"]["base"],
                               cfg["models"]["reference"])

        def load_ref():
            from wmtp_lib.loaders import load_causal_lm

            dtype = torch.bfloat16 if cfg["train"]["mixed_precision"] == "bf16" else torch.float32
            return load_causal_lm(ref_dir, dtype=dtype).to(self.device)

        if cfg["rho1"]["ref_cache"]:
            from wmtp_lib.reference import cache_key, load_or_score

            key = cache_key(cfg["data"], self.tokenizer, ref_dir, cfg["data"]["max_length"])
            cache_dir = project_path(cfg["paths"]["models_dir"]) / ".ref_cache"
            if d.is_main:
                load_or_score(cache_dir, key, self.data.input_ids, self.data.attention_mask, load_ref,
                              cfg["rho1"]["ref_batch_size"], self.device, log=lambda m: log_line(d, m),
                              position_ids=self.data.position_ids)
            d.barrier()
            self.ref_ce_rows, _ = load_or_score(cache_dir, key, self.data.input_ids, self.data.attention_mask,
                                                load_ref, cfg["rho1"]["ref_batch_size"], self.device,
                                                log=lambda m: None, position_ids=self.data.position_ids)
        else:
            self.ref_model = load_ref()
            log_line(d, "reference model resident (online scoring)")

    def _sequence_rewards(self) -> torch.Tensor:
        """One reward per training sample (cached in the run dir): reward-model score of the gold text, or
        the fraction of the sample's unit tests its gold completion passes. Returned as a ``(rows, T)``
        map (each token holds its sample's reward) so packed rows give every document its own reward."""
        cfg, d = self.cfg, self.d
        path = self.run_dir / "rewards.safetensors"
        from safetensors.torch import load_file, save_file

        rm_dir = None
        if cfg["critic"]["reward_source"] == "model":
            rm_dir = model_dir(cfg["models"]["reward"], cfg, d)  # on every rank: it holds a barrier
        if d.is_main and not path.is_file():
            rewards = self._score_rows(rm_dir)
            log_line(d, f"sequence rewards: mean {rewards.mean():.3f}, std {rewards.std():.3f} over {len(rewards)} samples")
            tmp = path.with_name(path.name + ".tmp")
            save_file({"rewards": rewards.contiguous()}, str(tmp))
            tmp.replace(path)
        d.barrier()
        rewards = load_file(str(path))["rewards"]
        if rewards.shape[0] != len(self.samples):
            raise RuntimeError(f"{path} holds {rewards.shape[0]} rewards but the data has {len(self.samples)} samples; "
                               "the data changed under this run name: use a new run_name")
        return self.data.token_map(rewards)

    def _score_rows(self, rm_dir: Path | None) -> torch.Tensor:
        """One reward per sample (a packed row holds several): reward model or unit-test execution."""
        cfg = self.cfg
        if rm_dir is None:
            from wmtp_lib.rollouts import execution_rewards

            return execution_rewards(self.samples, allow_weak_sandbox=cfg["allow_weak_sandbox"])
        from wmtp_lib.reward import RewardModel

        entry = load_registry().model(cfg["models"]["reward"])
        dtype = torch.bfloat16 if cfg["train"]["mixed_precision"] == "bf16" else None
        rm = RewardModel.from_dir(rm_dir, entry.reward_layout, entry.input_template, entry.truncation_side,
                                  dtype=dtype, device=self.device)
        # one reward a sample (packed rows hold several): the RM reads prompt and completion in its own
        # template and tokenizer
        rewards = rm.score([s.prompt for s in self.samples], [s.completion for s in self.samples])
        del rm
        return rewards

    # -------------------------------------------------------------- batches and weights
    def batch(self, step: int, slot: int, rank: int, schedule: BatchSchedule | None = None,
              data: TokenizedData | None = None) -> dict[str, torch.Tensor]:
        rows = (schedule or self.schedule).micro_batch(step, slot, rank)
        b = (data or self.data).rows(rows)
        # row_index stays on the host: it indexes host-side tables (reference losses, rewards)
        return {k: v if k == "row_index" else v.to(self.device) for k, v in b.items()}

    def weight_fn_factory(self, batch: dict[str, torch.Tensor]) -> Callable[[torch.Tensor], HeadWeightFn]:
        w = self.cfg["weights"]
        if self.scheme == "uniform":
            return lambda trunk: uniform_weights
        if self.scheme == "rho1":
            if self.ref_ce_rows is not None:
                ref = self.ref_ce_rows[batch["row_index"]].to(self.device)
            else:
                from wmtp_lib.reference import reference_token_ce

                ref = reference_token_ce(self.ref_model, batch["input_ids"], batch["attention_mask"],
                                         position_ids=batch.get("position_ids"))
            ref_aligned = align_reference(ref.float(), self.H)

            def rho1_fn(k, ce_k, valid_k):
                return rho1_weights(ce_k.unsqueeze(-1), ref_aligned[:, :, k:k + 1], valid_k.unsqueeze(-1),
                                    mode=w["mode"], temperature=w["temperature"], keep_ratio=w["keep_ratio"],
                                    max_weight=w["max_weight"]).squeeze(-1)

            return lambda trunk: rho1_fn
        # critic: TD errors from the current value head on this micro-batch's trunk output
        ccfg = self.cfg["critic"]
        state_mask = state_mask_from_labels(batch["label_mask"], batch.get("position_ids"))
        rewards = sparse_rewards(self.rewards[batch["row_index"]].to(self.device), state_mask,
                                 batch.get("position_ids"))

        def make(trunk_hidden: torch.Tensor) -> HeadWeightFn:
            with torch.no_grad():
                values = self.value_head(trunk_hidden.detach())
                delta, _ = value_targets(values, rewards, state_mask, ccfg["gamma"], ccfg["lam"])
            td = align_td(delta, self.H)

            def critic_fn(k, ce_k, valid_k):
                return critic_weights(td[:, :, k:k + 1], valid_k.unsqueeze(-1), temperature=w["temperature"],
                                      max_weight=w["max_weight"]).squeeze(-1)

            return critic_fn

        return make

    def value_loss_on(self, trunk_hidden: torch.Tensor, batch: dict[str, torch.Tensor],
                      row_rewards: torch.Tensor | None = None) -> torch.Tensor:
        ccfg = self.cfg["critic"]
        state_mask = state_mask_from_labels(batch["label_mask"], batch.get("position_ids"))
        table = self.rewards if row_rewards is None else row_rewards
        rewards = sparse_rewards(table[batch["row_index"]].to(self.device), state_mask, batch.get("position_ids"))
        values = self.value_head(trunk_hidden)
        _, targets = value_targets(values, rewards, state_mask, ccfg["gamma"], ccfg["lam"])
        return value_loss(values, targets, state_mask)

    # -------------------------------------------------------------- checkpoints
    def _ckpt_name(self, step: int, stage: str) -> Path:
        return self.ckpt_dir / f"{stage}-{step:07d}"

    def _complete(self, stage: str) -> list[Path]:
        return sorted(p for p in self.ckpt_dir.glob(f"{stage}-*") if (p / COMPLETE_MARKER).is_file())

    def latest_checkpoint(self) -> tuple[int, Path] | None:
        """The newest complete checkpoint: training (``mtp-*``) before value-head fitting (``value-*``)."""
        if not self.ckpt_dir.is_dir():
            return None
        done = self._complete("mtp") or self._complete("value")
        if not done:
            return None
        return int(done[-1].name.split("-")[1]), done[-1]

    def save_checkpoint(self, step: int, stage: str) -> Path:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        path = self._ckpt_name(step, stage)
        if self.d.is_main and path.exists():
            shutil.rmtree(path)
        self.d.barrier()
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path / "state"))
        torch.save(rng_state(), path / f"rng-rank{self.d.rank}.pt")
        if self.d.is_main:
            extra = {"step": step, "stage": stage, "scheduler": self.scheduler.state_dict(),
                     "world_size": self.d.world}
            if self.value_head is not None:
                extra["value_head"] = self.value_head.state_dict()
                extra["value_optimizer"] = self.value_optimizer.state_dict()
            torch.save(extra, path / "trainer.pt")
        self.d.barrier()
        if self.d.is_main:
            (path / COMPLETE_MARKER).write_text(f"{step}\n")
            self._prune_checkpoints(keep=2)
        self.d.barrier()
        return path

    def _prune_checkpoints(self, keep: int) -> None:
        mtp = self._complete("mtp")
        for old in mtp[:-keep] + (self._complete("value") if mtp else self._complete("value")[:-keep]):
            shutil.rmtree(old)

    def load_checkpoint(self, path: Path) -> tuple[int, str]:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(path / "state"))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        extra = torch.load(path / "trainer.pt", weights_only=True)
        if extra["world_size"] != self.d.world:
            raise RuntimeError(f"{path} was written by {extra['world_size']} processes, this run has {self.d.world}: "
                               "resume with the same number of processes")
        self.scheduler.load_state_dict(extra["scheduler"])
        if self.value_head is not None:
            self.value_head.load_state_dict(extra["value_head"])
            self.value_optimizer.load_state_dict(extra["value_optimizer"])
        rng_file = path / f"rng-rank{self.d.rank}.pt"
        set_rng_state(torch.load(rng_file, weights_only=True))
        return int(extra["step"]), extra["stage"]

    # -------------------------------------------------------------- metrics
    def write_metrics(self, record: dict[str, Any]) -> None:
        if not self.d.is_main:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.cfg["train"]["trackers"]:
            self.acc.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record["step"])

    def truncate_metrics(self, step: int, stage: str) -> None:
        """Drop records logged after the checkpoint we resume from (they will be logged again)."""
        path = self.run_dir / "metrics.jsonl"
        if not self.d.is_main or not path.is_file():
            return
        keep = []
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if rec.get("stage") == "value" and stage == "mtp":
                keep.append(line)
            elif rec.get("stage") == stage and rec["step"] <= step:
                keep.append(line)
            elif rec.get("stage") == "value" and stage == "value" and rec["step"] <= step:
                keep.append(line)
        path.write_text("".join(line + "\n" for line in keep))

    # -------------------------------------------------------------- stage 1 (critic)
    def stage1_data(self) -> tuple[TokenizedData, torch.Tensor]:
        """Gold rows with their rewards, or (execution reward) rollouts of the current model."""
        cfg, d = self.cfg, self.d
        if cfg["critic"]["reward_source"] != "execution":
            return self.data, self.rewards
        from wmtp_lib.rollouts import build_rollout_data

        cache = self.run_dir / "rollouts.json"
        if d.is_main:
            build_rollout_data(self.model, self.tokenizer, self.samples, cfg, cache, log=lambda m: log_line(d, m))
        d.barrier()
        return build_rollout_data(self.model, self.tokenizer, self.samples, cfg, cache, log=lambda m: None)

    def fit_value_head(self, start: int) -> None:
        cfg, d = self.cfg, self.d
        steps = cfg["critic"]["stage1_steps"]
        data, rewards = self.stage1_data()
        schedule = BatchSchedule(len(data), cfg["train"]["micro_batch_size"], 1, d.world, cfg["seed"] + 1)
        window: list[torch.Tensor] = []
        for step in range(start, steps):
            b = self.batch(step, 0, d.rank, schedule, data)
            with torch.no_grad():
                trunk = self.model(b["input_ids"], b["attention_mask"], position_ids=b.get("position_ids"),
                                   return_trunk=True).hidden
            loss = self.value_loss_on(trunk.detach(), b, rewards)
            loss.backward()
            d.average_grads(list(self.value_head.parameters()))
            self.value_optimizer.step()
            self.value_optimizer.zero_grad(set_to_none=True)
            window.append(loss.detach().double())
            if (step + 1) % cfg["train"]["log_every"] == 0 or step + 1 == steps:
                vl = d.all_reduce_tensor(torch.stack([torch.stack(window).sum(),
                                                      torch.tensor(float(len(window)), dtype=torch.float64,
                                                                   device=self.device)]))
                rec = {"stage": "value", "step": step + 1, "value_loss": vl[0] / vl[1]}
                self.write_metrics(rec)
                log_line(d, f"[value] step {step + 1}/{steps} value_loss {rec['value_loss']:.4f}")
                window = []
            if (step + 1) % cfg["train"]["save_every"] == 0 and step + 1 < steps:
                self.save_checkpoint(step + 1, "value")
        if d.is_main:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in self.value_head.state_dict().items()},
                      str(self.run_dir / "value_head_stage1.safetensors"))
        # Stage 2 starts from here on resume: the fitted value head is reused, not refitted.
        self.save_checkpoint(0, "mtp")

    # -------------------------------------------------------------- main loop
    def train(self) -> dict[str, Any]:
        cfg, d = self.cfg, self.d
        t = cfg["train"]
        start, stage = 0, ("value" if self.scheme == "critic" else "mtp")
        latest = self.latest_checkpoint() if t["resume"] == "auto" else None
        if t["resume"] == "never" and self.ckpt_dir.is_dir() and any(self.ckpt_dir.iterdir()):
            raise RuntimeError(f"{self.ckpt_dir} has checkpoints and train.resume is 'never': "
                               "choose another run_name or remove the run directory")
        if latest is not None:
            start, stage = self.load_checkpoint(latest[1])
            log_line(d, f"resumed from {latest[1]} (stage {stage}, step {start})")
            self.truncate_metrics(start, stage)
        elif d.is_main and (self.run_dir / "metrics.jsonl").exists():
            (self.run_dir / "metrics.jsonl").unlink()
        d.barrier()
        if stage == "value":
            self.fit_value_head(start)
            start, stage = 0, "mtp"
            if self.value_head is not None:
                # stage 2 keeps V current with its own optimizer at the training learning rate
                for g in self.value_optimizer.param_groups:
                    g["lr"] = t["lr"]
        accum = t["grad_accum"]
        stop_at = t["stop_after"] if t["stop_after"] is not None else t["steps"]
        # The window's numbers stay on the device (no host sync inside a step); they are read at log time.
        # layout: loss, micro-batches, tokens, value loss, grad norm, then one entry per head
        window = torch.zeros(5 + self.H, dtype=torch.float64, device=self.device)
        sums: dict[str, torch.Tensor] = {}
        window_steps = 0
        t0 = window_start = time.perf_counter()
        vc = cfg["critic"]["value_coef"]
        for step in range(start, min(t["steps"], stop_at)):
            for slot in range(accum):
                b = self.batch(step, slot, d.rank)
                factory = self.weight_fn_factory(b)
                extra_fn = None
                value_acc: list[torch.Tensor] = []
                if self.value_head is not None:
                    to_trunk = cfg["critic"]["value_grad_to_trunk"]

                    def extra_fn(trunk, b=b, to_trunk=to_trunk, value_acc=value_acc):
                        vl = self.value_loss_on(trunk if to_trunk else trunk.detach(), b)
                        value_acc.append(vl.detach())
                        return vc * vl

                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
                    out = sequential_mtp_step(self.model, b["input_ids"], b["attention_mask"], b["label_mask"],
                                              head_weights=t["head_weights"], chunk_size=t["chunk_size"],
                                              loss_scale=1.0 / accum, weight_fn_factory=factory,
                                              extra_trunk_loss=extra_fn, position_ids=b.get("position_ids"))
                value = value_acc[0].double() if value_acc else torch.zeros((), dtype=torch.float64, device=self.device)
                window[0] += out.loss.double() - vc * value
                window[1] += 1
                window[2] += b["attention_mask"].sum()
                window[3] += value
                window[5:] += out.head_losses.double()
                if self.scheme != "uniform":
                    sums = add_sums(sums, weight_sums(out.weights, out.valid, noisy_targets(b["noisy"], self.H),
                                                      noisy_targets(b["noise_marks"], self.H)))
            if not d.fsdp:
                d.average_grads(self.params)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, t["max_grad_norm"])
            if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns the norm as a DTensor
                grad_norm = grad_norm.full_tensor()
            window[4] += grad_norm.double()
            if self.value_head is not None:
                d.average_grads(list(self.value_head.parameters()))
                self.value_optimizer.step()
                self.value_optimizer.zero_grad(set_to_none=True)
            lr = self.scheduler.get_last_lr()[0]
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            window_steps += 1
            done = step + 1
            logged = False
            if done % t["log_every"] == 0 or done == t["steps"]:
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                elapsed = d.all_reduce_max(time.perf_counter() - window_start)
                totals = d.all_reduce_tensor(window)
                n_total = totals[1]
                rec: dict[str, Any] = {
                    "stage": "mtp", "step": done, "loss": totals[0] / n_total,
                    "head_loss": [h / n_total for h in totals[5:]], "lr": lr,
                    "grad_norm": totals[4] / d.world / window_steps,
                    "tokens_per_s": totals[2] / max(elapsed, 1e-9),
                    "epoch": self.schedule.epoch_at(done),
                }
                if self.value_head is not None:
                    rec["value_loss"] = totals[3] / n_total
                if sums:
                    merged = unpack_sums(d.all_reduce_tensor(pack_sums(sums)), self.H)
                    merged["w_max"] = d.all_reduce_max(float(sums["w_max"]))
                    rec.update(summarize(merged))
                self.write_metrics(rec)
                msg = f"step {done}/{t['steps']} loss {rec['loss']:.4f} lr {lr:.2e} gnorm {rec['grad_norm']:.3f}"
                if "weight_noisy" in rec and "weight_clean" in rec:
                    msg += f" w_noisy {rec['weight_noisy']:.3f} w_clean {rec['weight_clean']:.3f}"
                log_line(d, msg)
                window.zero_()
                sums, window_steps, logged = {}, 0, True
            if done % t["save_every"] == 0 or done == t["steps"] or done == stop_at:
                self.save_checkpoint(done, "mtp")
            if logged:
                # tokens/s covers training only, not the checkpoint written after a log
                window_start = time.perf_counter()
        wall = time.perf_counter() - t0
        finished = min(t["steps"], stop_at) == t["steps"]
        if finished:
            self.save_final(wall)
        return {"finished": finished}

    def save_final(self, wall: float) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        d = self.d
        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        final = self.run_dir / "final"
        if d.is_main:
            tmp = self.run_dir / ".final.tmp"
            if tmp.exists():
                shutil.rmtree(tmp)
            config = MTPModel.config_from_dir(self.base_dir)
            del config.wmtp_dtype
            with torch.device("meta"):
                model = MTPModel(config)
            model.load_state_dict({k: v.detach().cpu() for k, v in full.items()}, strict=True, assign=True)
            model.rotary_emb = type(model.rotary_emb)(config=config)
            model.save_pretrained(tmp)
            for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model"):
                if (self.base_dir / name).is_file():
                    shutil.copy(self.base_dir / name, tmp / name)
            if self.value_head is not None:
                from safetensors.torch import save_file

                save_file({k: v.contiguous() for k, v in self.value_head.state_dict().items()},
                          str(tmp / "value_head.safetensors"))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            self.write_summary(wall)
        d.barrier()

    def write_summary(self, wall: float) -> None:
        records = [json.loads(line) for line in (self.run_dir / "metrics.jsonl").read_text().splitlines()]
        mtp = [r for r in records if r.get("stage") == "mtp"]
        last = mtp[-1] if mtp else {}
        summary = {
            "run_name": self.cfg["run_name"], "recipe": self.cfg["recipe"], "env": self.cfg["env"],
            "seed": self.cfg["seed"], "steps": self.cfg["train"]["steps"], "world_size": self.d.world,
            "final_loss": last.get("loss"), "final_head_loss": last.get("head_loss"),
            "train_seconds_this_process": wall,
            "weight_noisy": last.get("weight_noisy"), "weight_clean": last.get("weight_clean"),
            "value_loss": last.get("value_loss"),
            "device": str(self.device), "torch": torch.__version__,
        }
        tmp = self.run_dir / "summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
        tmp.replace(self.run_dir / "summary.json")


def _flat(cfg: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in cfg.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    trainer = Trainer(cfg)
    trainer.setup()
    result = trainer.train()
    if cfg["train"]["trackers"]:
        trainer.acc.end_training()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wmtp_lib.train", description="WMTP training entry")
    parser.add_argument("--config", required=True, help="resolved config written by notebooks/train.ipynb")
    args = parser.parse_args(argv)
    try:
        cfg = load_resolved(args.config)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    run(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
