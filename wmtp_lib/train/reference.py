"""Reference-model losses for Rho-1: online per batch, or cached once per (data, tokenizer, reference, length)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from wmtp_lib.checkpoints.manifest import MANIFEST_NAME
from wmtp_lib.checkpoints.tokenization import tokenizer_fingerprint
from wmtp_lib.model.packing import same_document


@torch.no_grad()
def backbone_hidden(backbone, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Last hidden state ``(B, T, D)`` of a Hugging Face decoder backbone (``LlamaModel``) at every prefix.

    Packed rows (``position_ids`` restarting at 0 per document) take transformers' own packed-sequence
    path: with no 2D mask, restarting positions give a block-diagonal causal mask. Right padding needs no
    mask under causal attention (no real token comes after it), and the packed padding tail is a document
    of its own. A KV cache would switch that detection off, so none is made.
    """
    if position_ids is None:
        return backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return backbone(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state


def reference_token_ce(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                       chunk_size: int = 256, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """``ref_ce[b, j] = -log p_ref(x[b, j+1] | x[b, <=j])`` as float32 ``(B, T)``; 0 where ``j+1`` is padding or past the end.

    Packed rows (``position_ids`` ``(B, T)`` restarting at 0 per document): each document is scored on
    its own, and ``j+1`` in another document than ``j`` gives 0.
    """
    B, T = input_ids.shape
    attn = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    hidden = backbone_hidden(model.model, input_ids, attn, position_ids)
    out = torch.zeros(B, T, dtype=torch.float32, device=input_ids.device)
    for start in range(0, T - 1, chunk_size):
        stop = min(T - 1, start + chunk_size)
        logits = model.lm_head(hidden[:, start:stop]).float()
        targets = input_ids[:, start + 1: stop + 1]
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
        out[:, start:stop] = ce.view(B, stop - start)
    valid_next = same_document(position_ids, 1, input_ids)
    valid_next[:, :-1] &= attn[:, 1:].bool()
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
               device: torch.device | str, progress: Callable[[int, int], None] | None = None,
               position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Reference CE of every row, in batches (one pass); ``position_ids`` for packed rows."""
    out = torch.zeros(input_ids.shape, dtype=torch.float32)
    for start in range(0, input_ids.shape[0], batch_size):
        stop = min(input_ids.shape[0], start + batch_size)
        positions = None if position_ids is None else position_ids[start:stop].to(device)
        out[start:stop] = reference_token_ce(model, input_ids[start:stop].to(device),
                                             attention_mask[start:stop].to(device), position_ids=positions).cpu()
        if progress is not None:
            progress(stop, input_ids.shape[0])
    return out


def load_or_score(cache_dir: str | Path, key: str, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  load_model: Callable[[], Any], batch_size: int, device, log: Callable[[str], None] = print,
                  position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, bool]:
    """The cached reference CE for ``key`` if present and matching the rows, else score and store it.

    Packed rows' ``position_ids`` (their document boundaries) are part of what must match.
    """
    path = Path(cache_dir) / f"{key}.safetensors"
    digest = hashlib.sha256(input_ids.numpy().tobytes())
    if position_ids is not None:
        digest.update(position_ids.numpy().tobytes())
    ids_hash = digest.hexdigest()
    if path.is_file():
        stored = load_file(str(path))
        if stored["ref_ce"].shape == input_ids.shape and stored.get("ids_sha") is not None:
            if bytes(stored["ids_sha"].tolist()).decode() == ids_hash:
                log(f"reference losses from cache {path}")
                return stored["ref_ce"], True
        raise ValueError(f"{path} does not match the current data (rows changed); delete it to rescore")
    model = load_model()
    log(f"scoring {input_ids.shape[0]} rows with the reference model (one pass, cached at {path})")
    ref_ce = score_rows(model, input_ids, attention_mask, batch_size, device, position_ids=position_ids)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a temporary name of its own: two runs that score the same data at once (a grid's neighbouring cells)
    # must not write into one file; the rename makes whichever finishes last the cache, both identical
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    save_file({"ref_ce": ref_ce.contiguous(), "ids_sha": torch.tensor(list(ids_hash.encode()), dtype=torch.uint8)},
              tmp)
    Path(tmp).replace(path)
    del model
    return ref_ce, False
