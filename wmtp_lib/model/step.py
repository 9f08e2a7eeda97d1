"""The memory-efficient MTP training step (DESIGN §4, Gloeckle et al. 2024).

The trunk runs once; its output is detached; each head then runs forward → chunked loss → backward
into the detached trunk output, freeing its activations before the next head; one final backward
carries the accumulated gradient through the trunk. Peak memory holds one head's activations.

A step takes the model, a `Batch`, the micro-batch's `BatchWeights` (what a recipe brings: its token
weights, and an extra loss on the trunk output for the critic) and the optimizer step's `StepCounts`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from wmtp_lib.data.rows import Batch
from wmtp_lib.model.heads import MTPModel
from wmtp_lib.model.losses import (
    head_loss,
    head_targets,
    mtp_token_ce,
    resolve_head_weights,
    target_valid,
    weighted_mtp_loss,
)

# weight_fn(k, ce_k, valid_k) -> w_k, all (B, T); called under no_grad with a detached ce_k.
HeadWeightFn = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


def uniform_weights(k: int, ce_k: torch.Tensor, valid_k: torch.Tensor) -> torch.Tensor:
    """Weight 1 on every valid token (plain MTP)."""
    return valid_k.float()


class TrunkLoss(Protocol):
    """A loss on the trunk output that a recipe adds to the step (the critic's value loss). After the call,
    ``added`` is the detached term it added to the loss and ``value`` the unscaled loss, for the logs."""

    value: torch.Tensor | None

    @property
    def added(self) -> torch.Tensor | None: ...

    def __call__(self, trunk_hidden: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class BatchWeights:
    """What a recipe brings to one micro-batch's step.

    ``weight_fn(trunk_hidden)`` gives the head weight function from the step's detached trunk output
    ``(B, T, D)`` (the critic's advantages read it; the others ignore it). ``trunk_loss(trunk_hidden)``, when
    set, is a scalar on the non-detached trunk output added to the loss and its gradient (the critic's value
    loss), multiplied by ``counts.loss_scale`` only: it normalises itself (the value loss by the step's state
    count), with no α_k and no ``N_k``.
    """

    weight_fn: Callable[[torch.Tensor], HeadWeightFn] = lambda trunk_hidden: uniform_weights
    trunk_loss: TrunkLoss | None = None

    @classmethod
    def fixed(cls, fn: HeadWeightFn) -> "BatchWeights":
        """A weight function that does not read the trunk output (Rho-1's, precomputed weights, tests)."""
        return cls(weight_fn=lambda trunk_hidden: fn)


UNIFORM = BatchWeights()


@dataclass(frozen=True)
class StepCounts:
    """The optimizer step's totals a micro-batch's loss is divided by, and the gradient scale.

    ``n_valid`` ``(H,)``: valid targets per head over the whole optimizer step (every micro-batch and rank,
    `valid_counts`), so any split of the step gives the same gradient (DESIGN §4); None: this micro-batch's
    own. ``loss_scale`` multiplies the gradients (the world size: the cross-rank reduction averages).
    """

    n_valid: torch.Tensor | None = None
    loss_scale: float = 1.0


@dataclass
class StepOutput:
    """Detached results of one micro-batch step."""

    loss: torch.Tensor  # scalar, Σ_k α_k L_k
    head_losses: torch.Tensor  # (H,) unweighted-by-α per-head losses L_k
    ce: torch.Tensor  # (B, T, H)
    weights: torch.Tensor  # (B, T, H)
    valid: torch.Tensor  # (B, T, H)
    trunk_hidden: torch.Tensor | None = None  # (B, T, D) detached, for value heads


def sequential_mtp_step(model: MTPModel, batch: Batch, weights: BatchWeights = UNIFORM,
                        counts: StepCounts = StepCounts(), *, head_weights: torch.Tensor | list[float] | None = None,
                        chunk_size: int = 512, backward: bool = True) -> StepOutput:
    """Forward + backward of the weighted MTP loss of ``batch``, one head at a time.

    Gradients (scaled by ``counts.loss_scale``) accumulate into ``.grad``; they equal those of
    `all_heads_step` (`weighted_mtp_loss` on `MTPModel.forward` logits). ``head_weights`` are the α_k
    (default all 1), ``chunk_size`` the unembedding's chunk; ``backward=False`` only measures. Packed rows
    (``batch["position_ids"]`` restarting at 0 per document) keep documents apart: no document attends to
    another and no target crosses a document boundary.
    """
    input_ids, label_mask = batch["input_ids"], batch["label_mask"]
    position_ids = batch.get("position_ids")
    H = model.n_future
    alpha = resolve_head_weights(head_weights, H, input_ids.device)
    state = model(input_ids, batch["attention_mask"], position_ids=position_ids, return_trunk=True)
    trunk_out = state.hidden
    grad_enabled = backward and torch.is_grad_enabled() and trunk_out.requires_grad
    # float32 leaf: the H heads' gradients into the trunk output accumulate in float32, not in the trunk's
    # bf16 (FSDP2 bf16); each head reads it cast back, and the final backward gets it in the trunk dtype
    trunk_in = trunk_out.detach().float().requires_grad_(grad_enabled)
    weight_fn = weights.weight_fn(trunk_out.detach())
    ces, ws, valids, losses = [], [], [], []
    for k in range(H):
        targets, valid = head_targets(input_ids, k, label_mask, position_ids)
        hidden = model.forward_head(k, state, trunk_in.to(trunk_out.dtype))
        ce = model.lm_head(hidden, targets, valid, chunk_size)
        with torch.no_grad():
            w = weight_fn(k, ce.detach(), valid).float()
        loss_k = head_loss(ce, w, valid, None if counts.n_valid is None else counts.n_valid[k])
        if grad_enabled:
            (loss_k * alpha[k] * counts.loss_scale).backward()
        ces.append(ce.detach())
        ws.append(w)
        valids.append(valid)
        losses.append(loss_k.detach())
        del hidden, ce, loss_k
    total = (torch.stack(losses) * alpha).sum()
    if grad_enabled:
        trunk_grad = trunk_in.grad.to(trunk_out.dtype)
        if weights.trunk_loss is not None:
            extra = weights.trunk_loss(trunk_out)
            total = total + extra.detach()
            torch.autograd.backward([trunk_out, extra * counts.loss_scale], [trunk_grad, None])
        else:
            trunk_out.backward(trunk_grad)
    elif weights.trunk_loss is not None:
        total = total + weights.trunk_loss(trunk_out).detach()
    return StepOutput(loss=total.detach(), head_losses=torch.stack(losses), ce=torch.stack(ces, dim=2),
                      weights=torch.stack(ws, dim=2), valid=torch.stack(valids, dim=2), trunk_hidden=trunk_out.detach())


def all_heads_step(model: MTPModel, batch: Batch, weights: BatchWeights = UNIFORM, counts: StepCounts = StepCounts(),
                   *, head_weights: torch.Tensor | list[float] | None = None) -> StepOutput:
    """The plain computation of the same loss: all heads' logits ``(B, T, H, V)`` at once, one backward
    (the reference the sequential step is tested against, and the bench's baseline)."""
    position_ids = batch.get("position_ids")
    state = model(batch["input_ids"], batch["attention_mask"], position_ids=position_ids, return_trunk=True)
    logits = torch.stack([model.head_logits(k, state) for k in range(model.n_future)], dim=2)
    ce, valid = mtp_token_ce(logits, batch["input_ids"], batch["label_mask"], position_ids)
    weight_fn = weights.weight_fn(state.hidden.detach())
    with torch.no_grad():
        w = torch.stack([weight_fn(k, ce[:, :, k].detach(), valid[:, :, k]).float()
                         for k in range(model.n_future)], dim=2)
    loss = weighted_mtp_loss(ce, w, valid, head_weights, n_valid=counts.n_valid)
    if weights.trunk_loss is not None:
        loss = loss + weights.trunk_loss(state.hidden)
    (loss * counts.loss_scale).backward()
    return StepOutput(loss=loss.detach(), head_losses=head_loss(ce, w, valid, counts.n_valid).detach(), ce=ce.detach(),
                      weights=w, valid=valid, trunk_hidden=state.hidden.detach())


def valid_counts(batches: list[Batch], H: int) -> torch.Tensor:
    """``(H,)`` float64: valid targets of each head over these micro-batches (head ``k`` targets ``x[t+k+1]``)."""
    device = batches[0]["label_mask"].device
    counts = torch.zeros(H, dtype=torch.float64, device=device)
    for batch in batches:
        counts += target_valid(batch["label_mask"], H, batch.get("position_ids")).sum(dim=(0, 1))
    return counts
