"""Processes and sharding: `Dist` (rank, world size, the few collectives training needs), FSDP2 sharding,
gradient clipping (FSDP2 returns the norm as a DTensor) and main-rank printing.

Gradients are not synchronised by DDP's reducer (the sequential MTP step runs one backward per head, and
DDP allows one per step) but averaged with one flat all-reduce per optimizer step, which is the same
arithmetic; under FSDP2 each block is its own shard unit and its reduce-scatter averages the same way.
"""

from __future__ import annotations

import os
from typing import Callable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard


class Dist:
    """Rank, world size and collectives over the default process group (no-ops in one process)."""

    def __init__(self, device: torch.device, fsdp: bool = False):
        # On CPU-only machines accelerate initialises the gloo group but reports one process, so rank and
        # world size are read from torch.distributed itself.
        self.active = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.rank = dist.get_rank() if self.active else 0
        self.world = dist.get_world_size() if self.active else 1
        self.is_main = self.rank == 0
        self.device = device
        self.fsdp = fsdp

    @classmethod
    def from_accelerator(cls, accelerator) -> "Dist":
        from accelerate.utils import DistributedType

        fsdp = (accelerator.distributed_type == DistributedType.FSDP
                or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true")
        return cls(accelerator.device, fsdp)

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum over processes (a new tensor; stays on the device, no host sync)."""
        values = values.clone()
        if self.active:
            dist.all_reduce(values)
        return values

    def max(self, values: torch.Tensor) -> torch.Tensor:
        values = values.clone()
        if self.active:
            dist.all_reduce(values, op=dist.ReduceOp.MAX)
        return values

    def gather_stack(self, local: torch.Tensor) -> torch.Tensor:
        """``(world, *local.shape)``: every rank's equally shaped tensor, in rank order."""
        if not self.active:
            return local.unsqueeze(0)
        out = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(out, local.contiguous())
        return torch.stack(out)

    def gather_objects(self, local: list) -> list[list]:
        """Every rank's list of picklable objects, in rank order (small payloads: rollout texts)."""
        if not self.active:
            return [local]
        out: list = [None] * self.world
        dist.all_gather_object(out, local)
        return out

    def broadcast_object(self, value):
        """Rank 0's value on every rank."""
        if not self.active:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def average_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Average gradients over processes with one flat all-reduce (what DDP computes)."""
        if not self.active:
            return
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[offset: offset + n].view_as(g))
            offset += n

    def print(self, msg: str) -> None:
        """Print on the main process only (one line a message in the log)."""
        if self.is_main:
            print(msg, flush=True)


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip to ``max_norm`` and return the total norm before clipping as a plain device tensor.

    Non-finite norms are returned as they are (the caller skips that step); FSDP2 gives a DTensor.
    """
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return norm


def shard_fsdp(model, mixed_precision: str):
    """FSDP2: every decoder block, the final norm and the unembedding are shard units; then the root."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if mixed_precision == "bf16" else None,
                                  reduce_dtype=torch.float32)
    for block in list(model.trunk) + list(model.heads):
        fully_shard(block, mp_policy=policy)
    fully_shard(model.norm, mp_policy=policy)
    fully_shard(model.lm_head, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model



@torch.no_grad()
def fill_from_rank0(model: torch.nn.Module, read: Callable[[str], torch.Tensor] | None, procs: Dist) -> None:
    """Copy every state-dict tensor of a materialised (``to_empty``) model from rank 0, one tensor at a time.

    ``read(name)`` (rank 0 only; ``None`` elsewhere) gives the full tensor; it is cast to the model's dtype
    and moved to the device. An FSDP2 shard (a DTensor split on dim 0) receives only its rows: rank 0 splits
    the tensor as FSDP2 does (``torch.chunk``, padded to equal rows) and scatters, so no other rank ever
    holds more than one chunk beyond its own shards. A replicated tensor (no FSDP, several processes) is
    broadcast. Rank 0's host then holds one tensor at a time, the others none.
    """
    for name, target in model.state_dict(keep_vars=True).items():
        full = read(name).to(device=procs.device, dtype=target.dtype) if procs.is_main else None
        if isinstance(target, DTensor):
            _scatter_rows(full, target, procs)
        else:
            if procs.is_main:
                target.copy_(full)
            if procs.active:
                dist.broadcast(target.data, src=0)


def _scatter_rows(full: torch.Tensor | None, target: DTensor, procs: Dist) -> None:
    """Rank 0's ``full`` into every rank's dim-0 shard of ``target`` (one scatter)."""
    if tuple(target.placements) != (Shard(0),):
        raise ValueError(f"FSDP2 shards are expected on dim 0 of a 1-D mesh, got {target.placements}")
    local = target.to_local()
    if not procs.active:
        local.copy_(full)
        return
    rows = target.shape[0]
    chunk = -(-rows // procs.world)  # torch.chunk's rows per rank; the last ranks may get fewer or none
    expected = max(0, min(chunk, rows - procs.rank * chunk))
    if local.shape[0] != expected:
        raise ValueError(f"shard of {tuple(target.shape)} on rank {procs.rank} has {local.shape[0]} rows, "
                         f"torch.chunk gives {expected}")
    # a full chunk is received straight into the shard; only a short last shard needs a buffer of its own
    full_chunk = local.shape[0] == chunk and local.is_contiguous()
    received = local if full_chunk else torch.empty((chunk, *target.shape[1:]), dtype=local.dtype,
                                                    device=procs.device)
    pieces = None
    if procs.is_main:
        # views of ``full`` where a rank's rows are all there; only a short or empty last piece is a copy
        parts = list(full.split(chunk))
        pieces = []
        for rank in range(procs.world):
            part = parts[rank] if rank < len(parts) else full[:0]
            if part.shape[0] < chunk:
                padded = full.new_zeros(received.shape)
                padded[: part.shape[0]] = part
                part = padded
            pieces.append(part)
    dist.scatter(received, pieces, src=0)
    if not full_chunk:
        local.copy_(received[: local.shape[0]])
