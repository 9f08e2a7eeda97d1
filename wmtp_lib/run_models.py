"""Where a run's models come from: a registry id → a local directory (staged here, downloaded from S3, or
built: the tiny defaults of the local environment), and the base model as an `MTPModel`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from wmtp_lib.config import ConfigError, project_path
from wmtp_lib.distributed import Dist
from wmtp_lib.heads import MTPModel
from wmtp_lib.loaders import load_causal_lm, verify_manifest
from wmtp_lib.registry import load_registry


def model_dir(model_id: str, cfg: dict[str, Any], dist: Dist) -> Path:
    """Local directory of a registry id (the main process fetches or builds it; all wait for it)."""
    entry = load_registry().model(model_id)
    local = project_path(cfg["paths"]["models_dir"]) / model_id
    if dist.is_main:
        if cfg["storage"]["kind"] == "s3":
            from wmtp_lib.storage import download_directory  # boto3 is only needed on the cluster

            if not entry.s3:
                raise ConfigError(f"model {model_id} has no s3 path in params/models.yaml")
            result = download_directory(entry.s3, local)
            dist.print(f"{model_id}: {len(result['downloaded'])} files downloaded, "
                       f"{len(result['skipped'])} already cached in {local}")
        elif not (local / "manifest.json").is_file():
            if entry.format == "tiny" and cfg["storage"]["stage_tiny_if_missing"]:
                from wmtp_lib.tiny import stage_tiny

                stage_tiny(project_path(cfg["paths"]["models_dir"]), log=dist.print)
            else:
                raise FileNotFoundError(
                    f"model {model_id} is not staged at {local}; stage it with "
                    f"papermill notebooks/stage_models.ipynb out.ipynb -p models '[\"{model_id}\"]'")
        verify_manifest(local, check_hashes=False)
    dist.barrier()
    return local


def load_base(path: Path, n_future: int) -> MTPModel:
    """The base model in float32: an `MTPModel` directory, or a causal LM whose last layer becomes head 0."""
    config = json.loads((path / "config.json").read_text())
    if "n_future_tokens" in config:
        model = MTPModel.from_pretrained(path, dtype=torch.float32)
    else:
        model = MTPModel.from_causal_lm(load_causal_lm(path, dtype=torch.float32), n_future)
    if model.n_future != n_future:
        raise ConfigError(f"models.n_future is {n_future} but {path} has {model.n_future} heads")
    return model
