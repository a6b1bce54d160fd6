"""Several processes (torchrun): rank 0 decides, the others take its decision.

Replicas under DistributedDataParallel hold the same weights, but a tie in the scores could break
differently on two of them; every selection, HFP's first one included, and every weight change a
pruning step makes outside the optimizer (compensation, Tick) is copied from rank 0.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist

from .masks import GroupMask


def replicated() -> bool:
    """Several processes (torchrun): rank 0's decisions and weight changes are copied to the others."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def average_over_processes(tensor: torch.Tensor) -> None:
    """The mean of ``tensor`` over the processes, in place, on every process (call on all): for state a
    plugin keeps outside the DDP module (its gradients or running statistics are not averaged by DDP)."""
    dist.all_reduce(tensor)
    tensor /= dist.get_world_size()


def broadcast_from_rank0(tensors: Iterable[torch.Tensor | None]) -> None:
    """Rank 0's values of the floating-point tensors, in place, on every process (call on all)."""
    for tensor in tensors:
        if tensor is not None and tensor.is_floating_point():
            dist.broadcast(tensor.data, src=0)


def agree_on_masks(masks: list[GroupMask], first: list[torch.Tensor | None]) -> None:
    """Rank 0's masks (and HFP's first selections), in place, on every process (call on all)."""
    packed = torch.cat([torch.cat([m.hard, m.soft]) for m in masks]).to(torch.uint8)
    if dist.get_backend() == "nccl":
        packed = packed.cuda()
    dist.broadcast(packed, src=0)
    packed = packed.cpu().bool()
    offset = 0
    for mask in masks:
        n = mask.size
        mask.hard, mask.soft = (
            packed[offset : offset + n].clone(),
            packed[offset + n : offset + 2 * n].clone(),
        )
        offset += 2 * n
    chosen = [f for f in first if f is not None]
    if chosen:  # HFP's first selection is part of the decision too
        stacked = torch.cat(chosen).to(torch.uint8)
        if dist.get_backend() == "nccl":
            stacked = stacked.cuda()
        dist.broadcast(stacked, src=0)
        stacked = stacked.cpu().bool()
        offset = 0
        for i, f in enumerate(first):
            if f is not None:
                first[i] = stacked[offset : offset + f.numel()].clone()
                offset += f.numel()
