"""Token weightings of the training recipes (DESIGN §4): `UniformWeighting`, `Rho1Weighting` here, and
`wmtp_lib.train.critic_weighting.CriticWeighting`.

Each owns its setup (reference losses, sequence rewards, value head), the `BatchWeights` it gives each
micro-batch's step (`for_batch`), its no-grad scores for the exact ``weight_group: global`` statistics, and its
own state for checkpoints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from wmtp_lib.checkpoints.convert import load_causal_lm
from wmtp_lib.checkpoints.tokenization import (
    check_tokenizer_compat,
    compat_texts,
    load_tokenizer,
)
from wmtp_lib.config import project_path
from wmtp_lib.data.rows import Batch, TokenizedData
from wmtp_lib.model.losses import (
    align_reference,
    soft_weights,
    target_valid,
    topk_weights,
)
from wmtp_lib.model.step import (
    BatchWeights,
    HeadWeightFn,
    sequential_mtp_step,
    uniform_weights,
)
from wmtp_lib.train.distributed import Dist


class PrecomputedWeights:
    """The weight function of a micro-batch whose ``(B, T, H)`` weights were computed over the global group."""

    def __init__(self, weights: torch.Tensor):
        self.weights = weights

    def __call__(self, k: int, ce_k: torch.Tensor, valid_k: torch.Tensor) -> torch.Tensor:
        return self.weights[:, :, k]


class StatelessWeighting:
    """A weighting with no trunk loss, no per-window work and nothing to checkpoint."""

    def for_batch(self, batch: Batch, precomputed: torch.Tensor | None = None) -> BatchWeights:
        """The micro-batch's `BatchWeights` for the step (``precomputed``: its ``weight_group: global`` weights)."""
        return BatchWeights.fixed(self.weight_fn(batch, precomputed))

    def begin_window(self, batches: list[Batch], dist: Dist) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


class UniformWeighting(StatelessWeighting):
    """``mtp_baseline``: weight 1 on every valid target; no scores, no state."""

    needs_scores = False

    def weight_fn(self, batch: Batch, precomputed: torch.Tensor | None = None) -> HeadWeightFn:
        return uniform_weights


def group_weights(weighting, model, batches: list[Batch], dist: Dist, H: int) -> list[torch.Tensor]:
    """Exact ``weight_group: global`` weights: statistics over every entry of the optimizer step.

    One no-grad scoring pass over this rank's micro-batches, one all-gather of the ``(A, B, T, H)`` scores
    and validity, then the weights of the whole group in the global batch's canonical order (slot
    ``a · world + rank``, as `BatchSchedule` numbers them), so any split of the batch over micro-batches and
    ranks gives the same weights and the same tie order. Returns this rank's ``(B, T, H)`` weights per slot.
    """
    with torch.no_grad():
        scores = torch.stack([weighting.scores(model, b).float() for b in batches])  # (A, B, T, H)
    valid = torch.stack([target_valid(b["label_mask"], H, b.get("position_ids")) for b in batches]).to(torch.uint8)
    A, B, T, _ = scores.shape
    all_scores = dist.gather_stack(scores).transpose(0, 1).reshape(-1, T, H)  # (A·W·B, T, H)
    all_valid = dist.gather_stack(valid).transpose(0, 1).reshape(-1, T, H).bool()
    weights = weighting.weights_from_scores(all_scores, all_valid)
    return list(weights.view(A, dist.world, B, T, H)[:, dist.rank].unbind(0))


# ------------------------------------------------------------------------------------------ rho1


class Rho1HeadWeights:
    """Rho-1 weights of one micro-batch, per head, from its own excess loss ``ce − ref_ce`` (micro-batch group)."""

    def __init__(self, ref_aligned: torch.Tensor, weights_cfg: dict[str, Any]):
        self.ref_aligned = ref_aligned
        self.cfg = weights_cfg

    def __call__(self, k: int, ce_k: torch.Tensor, valid_k: torch.Tensor) -> torch.Tensor:
        scores = (ce_k - self.ref_aligned[:, :, k]).unsqueeze(-1)
        return rho1_from_scores(scores, valid_k.unsqueeze(-1), self.cfg).squeeze(-1)


def rho1_from_scores(scores: torch.Tensor, valid: torch.Tensor, cfg: dict[str, Any]) -> torch.Tensor:
    """Soft or token-skip weights of excess-loss scores ``(B, T, H)`` (DESIGN §4)."""
    if cfg["mode"] == "tokenskip":
        return topk_weights(scores, valid, keep_ratio=cfg["keep_ratio"])
    return soft_weights(scores, valid, temperature=cfg["temperature"], max_weight=cfg["max_weight"],
                        standardize=cfg["standardize"])


class Rho1Weighting(StatelessWeighting):
    """``rho1`` / ``rho1_tokenskip``: excess loss against a frozen reference (cached per row, or online)."""

    needs_scores = True

    def __init__(self, cfg: dict[str, Any], H: int, ref_rows: torch.Tensor | None, ref_model, device):
        self.cfg = cfg["weights"]
        self.H = H
        self.ref_rows = ref_rows  # (N, T) host tensor of cached reference losses, or None (online)
        self.ref_model = ref_model
        self.chunk_size = cfg["train"]["chunk_size"]
        self.device = device

    @classmethod
    def build(cls, cfg: dict[str, Any], H: int, tokenizer, samples, data: TokenizedData, dist: Dist,
              model_dir: Callable[[str], Path]) -> "Rho1Weighting":
        ref_dir = model_dir(cfg["models"]["reference"])
        check_tokenizer_compat(tokenizer, load_tokenizer(ref_dir), compat_texts(samples), cfg["models"]["base"],
                               cfg["models"]["reference"])
        dtype = torch.bfloat16 if cfg["train"]["mixed_precision"] == "bf16" else torch.float32

        def load_ref():
            return load_causal_lm(ref_dir, dtype=dtype).to(dist.device)

        if not cfg["rho1"]["ref_cache"]:
            dist.print("reference model resident (online scoring)")
            return cls(cfg, H, None, load_ref(), dist.device)
        from wmtp_lib.train.reference import cache_key, load_or_score

        key = cache_key(cfg["data"], tokenizer, ref_dir, cfg["data"]["max_length"], dtype)
        cache_dir = project_path(cfg["paths"]["models_dir"]) / ".ref_cache"
        args = (cache_dir, key, data.input_ids, data.attention_mask, load_ref, cfg["rho1"]["ref_batch_size"],
                dist.device)
        if dist.is_main:  # the main process scores once; the others read its cache
            load_or_score(*args, log=dist.print, position_ids=data.position_ids)
        dist.barrier()
        ref_rows, _ = load_or_score(*args, log=lambda m: None, position_ids=data.position_ids)
        return cls(cfg, H, ref_rows, None, dist.device)

    def reference(self, batch: Batch) -> torch.Tensor:
        """Aligned reference losses ``(B, T, H)`` of a micro-batch."""
        if self.ref_rows is not None:
            ref = self.ref_rows[batch["row_index"]].to(self.device)
        else:
            from wmtp_lib.train.reference import reference_token_ce

            ref = reference_token_ce(self.ref_model, batch["input_ids"], batch["attention_mask"],
                                     position_ids=batch.get("position_ids"))
        return align_reference(ref.float(), self.H)

    def weight_fn(self, batch: Batch, precomputed: torch.Tensor | None = None) -> HeadWeightFn:
        return PrecomputedWeights(precomputed) if precomputed is not None \
            else Rho1HeadWeights(self.reference(batch), self.cfg)

    @torch.no_grad()
    def scores(self, model, batch: Batch) -> torch.Tensor:
        """Excess loss ``ce − ref_ce`` ``(B, T, H)`` from a no-grad pass of the current model."""
        out = sequential_mtp_step(model, batch, chunk_size=self.chunk_size, backward=False)
        return out.ce - self.reference(batch)

    def weights_from_scores(self, scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return rho1_from_scores(scores, valid, self.cfg)
