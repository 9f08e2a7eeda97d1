"""Where a run's models come from: a registry id → a local directory (staged here, downloaded from S3, or
built: the tiny defaults of the local environment), and the base model as an `MTPModel`, built on the
meta device and filled from one read of its weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, LlamaConfig

from wmtp_lib.checkpoints.manifest import verify_manifest
from wmtp_lib.config import ConfigError, project_path
from wmtp_lib.model.heads import (
    MTPModel,
    SafetensorsReader,
    causal_lm_key_map,
    mtp_config_from_causal_lm,
)
from wmtp_lib.registry import load_registry
from wmtp_lib.train.distributed import Dist, fill_from_rank0, shard_fsdp


def model_dir(model_id: str, cfg: dict[str, Any], dist: Dist) -> Path:
    """Local directory of a registry id (the main process fetches or builds it; all wait for it)."""
    entry = load_registry().model(model_id)
    local = project_path(cfg["paths"]["models_dir"]) / model_id
    if dist.is_main:
        if cfg["storage"]["kind"] == "s3":
            from wmtp_lib.checkpoints.storage import (
                download_directory,  # boto3 is only needed on the cluster
            )

            if not entry.s3:
                raise ConfigError(f"model {model_id} has no s3 path in params/models.yaml")
            result = download_directory(entry.s3, local)
            dist.print(f"{model_id}: {len(result['downloaded'])} files downloaded, "
                       f"{len(result['skipped'])} already cached in {local}")
        elif not (local / "manifest.json").is_file():
            if entry.format == "tiny" and cfg["storage"]["stage_tiny_if_missing"]:
                from wmtp_lib.checkpoints.tiny import stage_tiny

                stage_tiny(project_path(cfg["paths"]["models_dir"]), log=dist.print)
            else:
                raise FileNotFoundError(
                    f"model {model_id} is not staged at {local}; stage it with "
                    f"papermill notebooks/stage_models.ipynb out.ipynb -p models '[\"{model_id}\"]'")
        verify_manifest(local, check_hashes=False)
    dist.barrier()
    return local


def base_layout(path: Path, n_future: int) -> tuple[LlamaConfig, dict[str, str]]:
    """The base model's `MTPConfig` and, for each `MTPModel` key, the key in ``path``'s safetensors its
    weights are read from: the same names in an `MTPModel` directory; in a causal LM, layer ``i`` for trunk
    block ``i`` and the last layer for every head (`MTPModel.from_causal_lm`'s layout)."""
    if "n_future_tokens" in json.loads((path / "config.json").read_text()):
        config = MTPModel.config_from_dir(path)
        del config.wmtp_dtype
        with torch.device("meta"):
            names = {name: name for name in MTPModel(config).state_dict()}
    else:
        source = AutoConfig.from_pretrained(str(path))
        config = mtp_config_from_causal_lm(source, n_future)
        names = causal_lm_key_map(config, bool(source.tie_word_embeddings))
    if config.n_future_tokens != n_future:
        raise ConfigError(f"models.n_future is {n_future} but {path} has {config.n_future_tokens} heads")
    return config, names


def load_base(path: Path, n_future: int, dist: Dist, mixed_precision: str = "no") -> MTPModel:
    """The base model in float32 on ``dist.device``, FSDP2-sharded when ``dist.fsdp``; weights read once.

    Every rank builds the model on the meta device (no memory), shards it (FSDP2) and materialises only
    its own shards (``to_empty``); rank 0 alone opens the safetensors files and sends each tensor, in turn,
    as the chunks the other ranks hold (`fill_from_rank0`). No rank holds a full float32 copy it does not
    train with: under FSDP2 a rank's host and device peak at its shards plus one chunk (rank 0: plus the
    one tensor being read). Without FSDP every process trains a full replica, broadcast from rank 0's
    read. The non-persistent RoPE buffers are recomputed in float32 afterwards (no state dict holds them).
    """
    config, names = base_layout(path, n_future)
    with torch.device("meta"):
        model = MTPModel(config)
    if dist.fsdp:
        model = shard_fsdp(model, mixed_precision)
    model.to_empty(device=dist.device)
    reader = None
    if dist.is_main:
        reader = SafetensorsReader(path)
        own = model.state_dict()
        # older causal-LM checkpoints store RoPE frequencies; they are recomputed, never read
        problem = reader.check({names[name]: (tuple(own[name].shape), name) for name in own},
                               ignored_suffixes=("rotary_emb.inv_freq",))
    # the verdict reaches every rank before any collective: a bad checkpoint is an error everywhere, not a hang
    problem = dist.broadcast_object(problem if dist.is_main else None)
    if problem is not None:
        raise KeyError(problem)
    fill_from_rank0(model, (lambda name: reader.read(names[name])) if dist.is_main else None, dist)
    model.reset_rotary(dist.device)
    return model
