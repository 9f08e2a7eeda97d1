"""`Checkpointer`: when to save, save/load of everything resumable, COMPLETE marker, pruning, RNG, the
world-size and config checks, and the final export.

A checkpoint ``checkpoints/<stage>-<step>/`` holds the model and optimizer as a distributed checkpoint
(one shard file a process under FSDP), one RNG file a process, and ``trainer.pt``: step, stage, world
size, the resolved config and its hash, whether every weight was finite, and the ``state_dict()`` of each
registered stateful object (scheduler, weighting). ``COMPLETE`` is written last.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from wmtp_lib.config import check_same_run, config_hash
from wmtp_lib.train.distributed import Dist

COMPLETE_MARKER = "COMPLETE"
TRAINER_FILE = "trainer.pt"

# torch.distributed.checkpoint says so each time it saves in a single process; that is intended here.
warnings.filterwarnings("ignore", message=r"torch.distributed is disabled, unavailable or uninitialized")


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


def read_trainer_state(path: Path) -> dict[str, Any]:
    # map_location cpu: without it, tensors saved from GPU would make every rank open a CUDA context on GPU 0
    return torch.load(path / TRAINER_FILE, map_location="cpu", weights_only=True)


class Checkpointer:
    """Owns ``runs/<run>/checkpoints``: when to save, what is saved and loaded, which checkpoints are kept."""

    def __init__(self, run_dir: Path, cfg: dict[str, Any], dist: Dist, model, optimizer,
                 stateful: dict[str, Any], keep: int = 2, also_finite: torch.nn.Module | None = None):
        self.dir = run_dir / "checkpoints"
        self.cfg = cfg
        self.dist = dist
        self.model = model
        self.optimizer = optimizer
        self.stateful = stateful  # name -> object with state_dict() / load_state_dict(); saved and loaded alike
        self.keep = keep
        self.also_finite = also_finite  # a module saved through `stateful` (the value head): checked finite too
        self.save_every = cfg["train"]["save_every"]

    # -------------------------------------------------------------- which checkpoints exist
    def _complete(self, stage: str) -> list[Path]:
        return sorted(p for p in self.dir.glob(f"{stage}-*") if (p / COMPLETE_MARKER).is_file())

    def _finite(self, path: Path) -> bool:
        return bool(read_trainer_state(path).get("finite", True))

    def latest(self) -> Path | None:
        """The newest complete checkpoint with finite weights: training (``mtp-*``) before value fitting."""
        if not self.dir.is_dir():
            return None
        for stage in ("mtp", "value"):
            done = [p for p in self._complete(stage) if self._finite(p)]
            if done:
                return done[-1]
        return None

    def remove_incomplete(self) -> list[Path]:
        """Delete checkpoints without their completion marker (a save that was killed): never read, and at 7B
        tens of GB each. Rank 0, before a run resumes: nothing else writes this run's checkpoints then."""
        if not self.dir.is_dir():
            return []
        partial = sorted(p for p in self.dir.glob("*-*") if p.is_dir() and not (p / COMPLETE_MARKER).is_file())
        for path in partial:
            shutil.rmtree(path)
        return partial

    def should_save(self, step: int, last_step: int) -> bool:
        return step % self.save_every == 0 or step == last_step

    # -------------------------------------------------------------- save
    def _weights_finite(self) -> bool:
        """Every weight (model and ``also_finite``) finite on every process (a host sync, at save time only)."""
        bad = torch.zeros((), dtype=torch.float64, device=self.dist.device)
        extra = list(self.also_finite.parameters()) if self.also_finite is not None else []
        for p in list(self.model.parameters()) + extra:
            local = p.to_local() if hasattr(p, "to_local") else p
            bad += (~torch.isfinite(local.detach())).sum()
        return float(self.dist.sum(bad)) == 0

    def save(self, step: int, stage: str) -> Path:
        path = self.dir / f"{stage}-{step:07d}"
        if self.dist.is_main and path.exists():
            shutil.rmtree(path)
        self.dist.barrier()
        # get_state_dict initialises an optimizer that has no state yet (AdamW: step 1, zero moments), and the
        # first real update would then differ from a fresh optimizer's (the critic saves before its first
        # training step): such an optimizer is saved as "fresh" and left untouched
        fresh_optimizer = not self.optimizer.state
        if fresh_optimizer:
            to_save = {"model": get_model_state_dict(self.model)}
        else:
            model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
            to_save = {"model": model_sd, "optim": optim_sd}
        dcp.save(to_save, checkpoint_id=str(path / "state"))
        torch.save(rng_state(), path / f"rng-rank{self.dist.rank}.pt")
        finite = self._weights_finite()
        if self.dist.is_main:
            state = {"step": step, "stage": stage, "world_size": self.dist.world, "finite": finite,
                     "fresh_optimizer": fresh_optimizer,
                     "config_hash": config_hash(self.cfg), "config": json.dumps(self.cfg, default=str)}
            state.update({name: obj.state_dict() for name, obj in self.stateful.items()})
            torch.save(state, path / TRAINER_FILE)
        self.dist.barrier()
        if self.dist.is_main:
            (path / COMPLETE_MARKER).write_text(f"{step}\n")
            self.prune()
        self.dist.barrier()
        return path

    def prune(self) -> None:
        """Keep the newest ``keep`` training checkpoints and, always, the newest one with finite weights;
        value-fitting checkpoints go once training has one."""
        mtp = self._complete("mtp")
        value = self._complete("value")
        keep = set(mtp[-self.keep:]) if mtp else set(value[-self.keep:])
        # the newest finite one over both stages (training after value fitting, as `latest` orders them):
        # a finite value checkpoint stays when no training checkpoint is finite
        finite = [p for p in value + mtp if self._finite(p)]
        if finite:
            keep.add(finite[-1])
        for old in mtp + value:
            if old not in keep:
                shutil.rmtree(old)

    # -------------------------------------------------------------- load
    def load(self, path: Path) -> tuple[int, str]:
        """Restore everything saved at ``path``; returns (step, stage). Refuses another world size or config."""
        state = read_trainer_state(path)
        if state["world_size"] != self.dist.world:
            raise RuntimeError(f"{path} was written by {state['world_size']} processes, this run has "
                               f"{self.dist.world}: resume with the same number of processes")
        if state.get("config_hash") != config_hash(self.cfg):
            check_same_run(json.loads(state["config"]), self.cfg, path)
        if state.get("fresh_optimizer"):
            loaded = {"model": get_model_state_dict(self.model)}
            dcp.load(loaded, checkpoint_id=str(path / "state"))
            set_model_state_dict(self.model, loaded["model"])
            self.optimizer.state.clear()  # as it was when saved: no step taken yet
        else:
            model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
            loaded = {"model": model_sd, "optim": optim_sd}
            dcp.load(loaded, checkpoint_id=str(path / "state"))
            set_state_dict(self.model, self.optimizer, model_state_dict=loaded["model"],
                           optim_state_dict=loaded["optim"])
        for name, obj in self.stateful.items():
            obj.load_state_dict(state[name])
        set_rng_state(torch.load(path / f"rng-rank{self.dist.rank}.pt", map_location="cpu", weights_only=True))
        return int(state["step"]), state["stage"]

    # -------------------------------------------------------------- final export
    def export_final(self, base_dir: Path, extra_files: dict[str, Any] | None = None) -> Path:
        """``runs/<run>/final``: an `MTPModel` directory (full weights gathered from the shards), the base
        model's tokenizer files and ``extra_files`` (name -> object with ``save(path)``), written atomically."""
        from wmtp_lib.model.heads import MTPModel

        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        run_dir = self.dir.parent
        final = run_dir / "final"
        if self.dist.is_main:
            tmp = run_dir / ".final.tmp"
            if tmp.exists():
                shutil.rmtree(tmp)
            config = MTPModel.config_from_dir(base_dir)
            del config.wmtp_dtype
            with torch.device("meta"):
                model = MTPModel(config)
            model.load_state_dict({k: v.detach().cpu() for k, v in full.items()}, strict=True, assign=True)
            model.rotary_emb = type(model.rotary_emb)(config=config)
            model.save_pretrained(tmp)
            for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model"):
                if (base_dir / name).is_file():
                    shutil.copy(base_dir / name, tmp / name)
            for name, saver in (extra_files or {}).items():
                saver(tmp / name)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        self.dist.barrier()
        return final
