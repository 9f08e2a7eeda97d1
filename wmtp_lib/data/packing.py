"""Packing whole documents into rows (DESIGN §6): first fit, in document order, none split. What keeps packed
documents apart in the model and the losses is their ``position_ids`` (`wmtp_lib.model.packing`)."""

from __future__ import annotations


def pack_documents(lengths: list[int], max_length: int) -> list[list[int]]:
    """Whole documents into rows of at most ``max_length`` tokens: first fit, in document order.

    Returns, per row, the indices of its documents. A document is never split over rows, so every
    document keeps its own beginning and end (its prompt, its EOS and so its reward); one longer than
    ``max_length`` is expected to be truncated to it by the caller and gets a row to itself.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    rows: list[list[int]] = []
    free: list[int] = []
    for i, n in enumerate(lengths):
        n = min(n, max_length)
        # rows fill up in order, so only rows with room are scanned (the list stays short in practice)
        for r, room in enumerate(free):
            if n <= room:
                rows[r].append(i)
                free[r] -= n
                break
        else:
            rows.append([i])
            free.append(max_length - n)
    return rows
