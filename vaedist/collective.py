"""The few cross-rank operations training needs, on torch.distributed, each a no-op on one worker.

Every rank must call each of these at the same point (they are collectives), so callers decide
whether to call them from information all ranks share, never from a file one rank just wrote.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_sums(sums: dict[str, float], device: torch.device) -> dict[str, float]:
    """Sum each entry over all ranks (exact global means: sum and count, not a mean of means)."""
    if world() == 1:
        return sums
    keys = sorted(sums)
    t = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return dict(zip(keys, t.tolist()))


def gather_floats(value: torch.Tensor) -> list[float]:
    """A one-element float64 tensor from every rank, in rank order."""
    if world() == 1:
        return value.tolist()
    gathered = [torch.zeros_like(value) for _ in range(world())]
    dist.all_gather(gathered, value)
    return [float(t) for t in gathered]


def gather_objects(value: Any) -> list[Any]:
    """A picklable value from every rank, in rank order."""
    if world() == 1:
        return [value]
    gathered: list[Any] = [None] * world()
    dist.all_gather_object(gathered, value)
    return gathered


def broadcast_object(value: Any, device: torch.device, src: int = 0) -> Any:
    """Rank src's picklable value on every rank (NCCL needs the objects' tensors on the GPU)."""
    if world() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src, device=device if device.type == "cuda" else None)
    return box[0]


def param_fingerprints(model: torch.nn.Module, device: torch.device) -> list[float]:
    """Every rank's sum of all parameters (float64), gathered: equal iff DDP kept replicas in sync."""
    total = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1).to(device)
    return gather_floats(total)
