"""The global batch order: which rows each micro-batch of each rank reads at each step (resumable, split-invariant)."""

from __future__ import annotations

import torch


class BatchSchedule:
    """Which rows every (step, accumulation slot, rank) gets: a pure function of the seed and position.

    Rows are read from a stream of per-epoch permutations, so a resumed run only needs the step number
    to continue with the same data, and ``world`` processes with ``grad_accum=1`` see exactly the
    micro-batches that one process sees with ``grad_accum=world``.
    """

    def __init__(self, n_rows: int, micro_batch_size: int, grad_accum: int, world_size: int, seed: int):
        if n_rows < 1:
            raise ValueError("no training rows")
        self.n_rows, self.micro, self.accum, self.world, self.seed = n_rows, micro_batch_size, grad_accum, world_size, seed
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
            self._perms[epoch] = torch.randperm(self.n_rows, generator=g)
        return self._perms[epoch]

    def micro_batch(self, step: int, accum_slot: int, rank: int) -> list[int]:
        slot = (step * self.accum + accum_slot) * self.world + rank
        out = []
        for j in range(slot * self.micro, (slot + 1) * self.micro):
            epoch, pos = divmod(j, self.n_rows)
            out.append(int(self._perm(epoch)[pos]))
        return out

    def epoch_at(self, step: int) -> float:
        return step * self.accum * self.world * self.micro / self.n_rows
