"""Reference-model losses for Rho-1: online per batch, or cached once per (data, tokenizer, reference, length)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from wmtp_lib.loaders import MANIFEST_NAME, tokenizer_fingerprint


@torch.no_grad()
def reference_token_ce(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                       chunk_size: int = 256) -> torch.Tensor:
    """``ref_ce[b, j] = -log p_ref(x[b, j+1] | x[b, <=j])`` as float32 ``(B, T)``; 0 where ``j+1`` is padding or past the end."""
    B, T = input_ids.shape
    attn = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    hidden = model.model(input_ids=input_ids, attention_mask=attn).last_hidden_state
    out = torch.zeros(B, T, dtype=torch.float32, device=input_ids.device)
    for start in range(0, T - 1, chunk_size):
        stop = min(T - 1, start + chunk_size)
        logits = model.lm_head(hidden[:, start:stop]).float()
        targets = input_ids[:, start + 1: stop + 1]
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
        out[:, start:stop] = ce.view(B, stop - start)
    valid_next = torch.zeros_like(out, dtype=torch.bool)
    valid_next[:, :-1] = attn[:, 1:].bool()
    return torch.where(valid_next, out, torch.zeros_like(out))


def cache_key(data_cfg: dict[str, Any], tokenizer, reference_dir: str | Path, max_length: int,
              dtype: torch.dtype = torch.float32) -> str:
    """Identifies one scoring pass: dataset settings, tokenizer, reference weights (by manifest), length and
    the dtype the reference computes in (bf16 and float32 losses differ)."""
    ref_manifest = Path(reference_dir) / MANIFEST_NAME
    ref_id = hashlib.sha256(ref_manifest.read_bytes()).hexdigest() if ref_manifest.is_file() else str(reference_dir)
    payload = {
        "data": {k: data_cfg[k] for k in sorted(data_cfg)},
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "reference": ref_id,
        "max_length": max_length,
        "dtype": str(dtype),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:24]


def score_rows(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, batch_size: int,
               device: torch.device | str, progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Reference CE of every row, in batches (one pass)."""
    out = torch.zeros(input_ids.shape, dtype=torch.float32)
    for start in range(0, input_ids.shape[0], batch_size):
        stop = min(input_ids.shape[0], start + batch_size)
        out[start:stop] = reference_token_ce(model, input_ids[start:stop].to(device),
                                             attention_mask[start:stop].to(device)).cpu()
        if progress is not None:
            progress(stop, input_ids.shape[0])
    return out


def load_or_score(cache_dir: str | Path, key: str, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  load_model: Callable[[], Any], batch_size: int, device, log: Callable[[str], None] = print
                  ) -> tuple[torch.Tensor, bool]:
    """The cached reference CE for ``key`` if present and matching the rows, else score and store it."""
    path = Path(cache_dir) / f"{key}.safetensors"
    ids_hash = hashlib.sha256(input_ids.numpy().tobytes()).hexdigest()
    if path.is_file():
        stored = load_file(str(path))
        if stored["ref_ce"].shape == input_ids.shape and stored.get("ids_sha") is not None:
            if bytes(stored["ids_sha"].tolist()).decode() == ids_hash:
                log(f"reference losses from cache {path}")
                return stored["ref_ce"], True
        raise ValueError(f"{path} does not match the current data (rows changed); delete it to rescore")
    model = load_model()
    log(f"scoring {input_ids.shape[0]} rows with the reference model (one pass, cached at {path})")
    ref_ce = score_rows(model, input_ids, attention_mask, batch_size, device)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({"ref_ce": ref_ce.contiguous(), "ids_sha": torch.tensor(list(ids_hash.encode()), dtype=torch.uint8)},
              str(tmp))
    tmp.replace(path)
    del model
    return ref_ce, False
