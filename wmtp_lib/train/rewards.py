"""Sequence rewards of the training samples for the critic: a reward model's scores of the gold completions or
unit-test execution, cached in the run directory under a key of everything that changes them; and the reward
model's decoder as the value head's trunk."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from wmtp_lib.checkpoints.tokenization import (
    check_tokenizer_compat,
    compat_texts,
    load_tokenizer,
)
from wmtp_lib.data.rows import TokenizedData
from wmtp_lib.registry import load_registry
from wmtp_lib.train.distributed import Dist


def reward_model_trunk(cfg: dict[str, Any], tokenizer, samples, rm_dir: Path, dist: Dist) -> torch.nn.Module:
    """The reward model's decoder as the value head's frozen trunk, on every rank. It reads the training rows
    as they are, so it must share the base's tokenizer: checked like the reference's, else refused by name."""
    check_tokenizer_compat(tokenizer, load_tokenizer(rm_dir), compat_texts(samples), cfg["models"]["base"],
                           cfg["models"]["reward"])
    rm = registered_reward_model(cfg, rm_dir, dist.device)
    dist.print(f"value trunk: {cfg['models']['reward']}'s decoder (frozen, {rm.backbone.config.hidden_size} features)")
    return rm.backbone


def sequence_rewards(cfg: dict[str, Any], tokenizer, samples, data: TokenizedData, dist: Dist, run_dir: Path,
                     model_dir: Callable[[str], Path]) -> torch.Tensor:
    """One reward per training sample, cached in the run directory: the reward model's score of the gold
    prompt and completion (in its own template and tokenizer), or the fraction of the sample's unit tests its
    gold completion passes. Returned as a ``(rows, T)`` map (every token holds its sample's reward), so each
    document of a packed row gets its own reward."""
    path = run_dir / "rewards.safetensors"
    key = reward_cache_key(cfg, samples)
    if dist.broadcast_object(path.is_file()):  # checked before any reward model is staged or loaded
        check_reward_cache(path, key)
    rm_dir = model_dir(cfg["models"]["reward"]) if cfg["critic"]["reward_source"] == "model" else None
    if dist.is_main and not path.is_file():
        if rm_dir is None:
            from wmtp_lib.train.rollouts import execution_rewards

            rewards = execution_rewards(samples, allow_weak_sandbox=cfg["allow_weak_sandbox"])
        else:
            rewards = reward_model_scores(cfg, samples, rm_dir, dist.device)
        dist.print(f"sequence rewards: mean {rewards.mean():.3f}, std {rewards.std():.3f} over {len(rewards)} samples")
        tmp = path.with_name(path.name + ".tmp")
        save_file({"rewards": rewards.contiguous()}, str(tmp), metadata={"key": key})
        tmp.replace(path)
    dist.barrier()
    rewards = load_file(str(path))["rewards"]
    if rewards.shape[0] != len(samples):
        raise RuntimeError(f"{path} holds {rewards.shape[0]} rewards but the data has {len(samples)} samples; "
                           "the data changed under this run name: use a new run_name")
    return data.token_map(rewards)


def registered_reward_model(cfg: dict[str, Any], rm_dir: Path, device):
    """The run's reward model read as its registry entry says (layout, template, truncation, control tokens)."""
    from wmtp_lib.checkpoints.reward_models import RewardModel

    entry = load_registry().model(cfg["models"]["reward"])
    dtype = torch.bfloat16 if cfg["train"]["mixed_precision"] == "bf16" else None
    return RewardModel.from_dir(rm_dir, entry.reward_layout, entry.input_template, entry.truncation_side,
                                dtype=dtype, device=device, literal_control_tokens=entry.literal_control_tokens)


# bumped when the way a reward model reads its input changes (v2: BOS kept on left truncation, no in-band
# template markers, per-model literal control tokens), so cached rewards of the old reading are not reused
REWARD_INPUT_VERSION = 2


def reward_cache_key(cfg: dict[str, Any], samples) -> str:
    """sha256 of what the cached rewards depend on: the reward source (and model id, with how its registry
    entry reads text), the input encoding's version and every sample's prompt and completion, in order."""
    source = cfg["critic"]["reward_source"]
    reading = None
    if source == "model":
        entry = load_registry().model(cfg["models"]["reward"])
        reading = [cfg["models"]["reward"], entry.input_template, entry.truncation_side, entry.literal_control_tokens]
    digest = hashlib.sha256(json.dumps([source, reading, REWARD_INPUT_VERSION]).encode())
    for sample in samples:
        digest.update(json.dumps([sample.prompt, sample.completion]).encode())
    return digest.hexdigest()


def check_reward_cache(path: Path, key: str) -> None:
    """Refuse a reward cache computed for other samples or another reward source."""
    with safe_open(str(path), "pt") as f:
        stored = (f.metadata() or {}).get("key")
    if stored != key:
        raise RuntimeError(f"{path} holds rewards of other samples or another reward source/model than this "
                           "run's: the data or reward changed under this run name: use a new run_name")


def reward_model_scores(cfg: dict[str, Any], samples, rm_dir: Path, device) -> torch.Tensor:
    """The registered reward model's score of every sample's gold prompt and completion."""
    rm = registered_reward_model(cfg, rm_dir, device)
    return rm.score([s.prompt for s in samples], [s.completion for s in samples])
