"""The memory-efficient MTP training step (DESIGN §4, Gloeckle et al. 2024).

The trunk runs once; its output is detached; each head then runs forward → chunked loss → backward
into the detached trunk output, freeing its activations before the next head; one final backward
carries the accumulated gradient through the trunk. Peak memory holds one head's activations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from wmtp_lib.heads import MTPModel
from wmtp_lib.losses import (
    head_loss,
    head_targets,
    mtp_token_ce,
    resolve_head_weights,
    weighted_mtp_loss,
)

# weight_fn(k, ce_k, valid_k) -> w_k, all (B, T); called under no_grad with a detached ce_k.
HeadWeightFn = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


def uniform_weights(k: int, ce_k: torch.Tensor, valid_k: torch.Tensor) -> torch.Tensor:
    """Weight 1 on every valid token (plain MTP)."""
    return valid_k.float()


@dataclass
class StepOutput:
    """Detached results of one micro-batch step."""

    loss: torch.Tensor  # scalar, Σ_k α_k L_k
    head_losses: torch.Tensor  # (H,) unweighted-by-α per-head losses L_k
    ce: torch.Tensor  # (B, T, H)
    weights: torch.Tensor  # (B, T, H)
    valid: torch.Tensor  # (B, T, H)
    trunk_hidden: torch.Tensor | None = None  # (B, T, D) detached, for value heads


def sequential_mtp_step(
    model: MTPModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    label_mask: torch.Tensor | None = None,
    weight_fn: HeadWeightFn = uniform_weights,
    head_weights: torch.Tensor | list[float] | None = None,
    chunk_size: int = 512,
    loss_scale: float = 1.0,
    extra_trunk_loss: Callable[[torch.Tensor], torch.Tensor] | None = None,
    backward: bool = True,
    weight_fn_factory: Callable[[torch.Tensor], HeadWeightFn] | None = None,
    position_ids: torch.Tensor | None = None,
    n_valid: torch.Tensor | None = None,
    extra_loss_scale: float | None = None,
) -> StepOutput:
    """Forward + backward of the weighted MTP loss, one head at a time.

    Gradients (scaled by ``loss_scale``) accumulate into ``.grad``; they equal those of
    `weighted_mtp_loss(..., n_valid=n_valid)` on `MTPModel.forward` logits. ``n_valid`` ``(H,)`` is the
    optimizer step's valid-target count per head (DESIGN §4; default: this micro-batch's).
    ``extra_trunk_loss(trunk_hidden)`` adds a term that reads the (non-detached) trunk output, e.g. a value
    loss, scaled by ``extra_loss_scale`` (default ``loss_scale``); its value is added to ``loss``.
    ``weight_fn_factory(trunk_hidden_detached)`` builds ``weight_fn`` from this step's trunk output
    (the critic's advantages need it). ``position_ids`` ``(B, T)`` marks packed rows (positions restart
    at 0 per document): no document attends to another and no target crosses a document boundary.
    """
    H = model.n_future
    alpha = resolve_head_weights(head_weights, H, input_ids.device)
    extra_scale = loss_scale if extra_loss_scale is None else extra_loss_scale
    state = model(input_ids, attention_mask, position_ids=position_ids, return_trunk=True)
    trunk_out = state.hidden
    grad_enabled = backward and torch.is_grad_enabled() and trunk_out.requires_grad
    # float32 leaf: the H heads' gradients into the trunk output accumulate in float32, not in the trunk's
    # bf16 (FSDP2 bf16); each head reads it cast back, and the final backward gets it in the trunk dtype
    trunk_in = trunk_out.detach().float().requires_grad_(grad_enabled)
    if weight_fn_factory is not None:
        weight_fn = weight_fn_factory(trunk_out.detach())
    ces, weights, valids, losses = [], [], [], []
    for k in range(H):
        targets, valid = head_targets(input_ids, k, label_mask, position_ids)
        hidden = model.forward_head(k, state, trunk_in.to(trunk_out.dtype))
        ce = model.lm_head(hidden, targets, valid, chunk_size)
        with torch.no_grad():
            w = weight_fn(k, ce.detach(), valid).float()
        loss_k = head_loss(ce, w, valid, None if n_valid is None else n_valid[k])
        if grad_enabled:
            (loss_k * alpha[k] * loss_scale).backward()
        ces.append(ce.detach())
        weights.append(w)
        valids.append(valid)
        losses.append(loss_k.detach())
        del hidden, ce, loss_k
    total = (torch.stack(losses) * alpha).sum()
    if grad_enabled:
        trunk_grad = trunk_in.grad.to(trunk_out.dtype)
        if extra_trunk_loss is not None:
            extra = extra_trunk_loss(trunk_out)
            total = total + extra.detach()
            torch.autograd.backward([trunk_out, extra * extra_scale], [trunk_grad, None])
        else:
            trunk_out.backward(trunk_grad)
    elif extra_trunk_loss is not None:
        total = total + extra_trunk_loss(trunk_out).detach()
    return StepOutput(
        loss=total.detach(),
        head_losses=torch.stack(losses),
        ce=torch.stack(ces, dim=2),
        weights=torch.stack(weights, dim=2),
        valid=torch.stack(valids, dim=2),
        trunk_hidden=trunk_out.detach(),
    )


def all_heads_step(
    model: MTPModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    label_mask: torch.Tensor | None = None,
    weight_fn: HeadWeightFn = uniform_weights,
    head_weights: torch.Tensor | list[float] | None = None,
    loss_scale: float = 1.0,
    position_ids: torch.Tensor | None = None,
) -> StepOutput:
    """The plain computation: all heads' logits ``(B, T, H, V)`` at once, one backward (reference/baseline)."""
    logits = model(input_ids, attention_mask, position_ids=position_ids)
    ce, valid = mtp_token_ce(logits, input_ids, label_mask, position_ids)
    with torch.no_grad():
        w = torch.stack([weight_fn(k, ce[:, :, k].detach(), valid[:, :, k]).float()
                         for k in range(model.n_future)], dim=2)
    loss = weighted_mtp_loss(ce, w, valid, head_weights)
    (loss * loss_scale).backward()
    return StepOutput(loss=loss.detach(), head_losses=head_loss(ce, w, valid).detach(), ce=ce.detach(),
                      weights=w, valid=valid)
