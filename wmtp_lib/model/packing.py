"""Packed rows (DESIGN §6): several whole documents in one row, none of them seeing another.

A packed row carries ``position_ids`` that restart at 0 where each document starts (the padding tail
restarts too). That one tensor says everything the model and the losses need: a token belongs to the
same document as the token ``s`` places later exactly when their positions differ by ``s``, because
positions rise by one inside a document and fall back to 0 at the next. So attention is causal within
each document (a block-diagonal causal mask), and a head's target, a reference loss or a critic
transition is only used when it stays inside its document. Rows without ``position_ids`` are one
document each (right padding), as before.
"""

from __future__ import annotations

import torch


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` index of each token's document inside its row (0, 1, ...): a new one starts where the
    position does not continue the previous one by 1. All device ops, no host sync."""
    start = torch.ones_like(position_ids, dtype=torch.bool)
    start[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    start[:, 0] = False
    return start.long().cumsum(dim=-1)


def same_document(position_ids: torch.Tensor | None, shift: int, like: torch.Tensor) -> torch.Tensor:
    """``out[b, t]``: token ``t + shift`` lies in the same document as token ``t`` (False past the end).

    ``like`` is a ``(B, T)`` tensor giving shape and device when ``position_ids`` is None (one
    document a row: true wherever ``t + shift < T``).
    """
    B, T = like.shape
    out = torch.zeros(B, T, dtype=torch.bool, device=like.device)
    if shift >= T:
        return out
    if position_ids is None:
        out[:, : T - shift] = True
    else:
        if tuple(position_ids.shape) != (B, T):
            raise ValueError(f"position_ids shape {tuple(position_ids.shape)} must be (B, T) = {(B, T)}")
        out[:, : T - shift] = position_ids[:, shift:] == position_ids[:, : T - shift] + shift
    return out
