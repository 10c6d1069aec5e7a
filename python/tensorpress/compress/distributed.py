"""Multi-process compression with torch.distributed (torchrun; gloo on CPU, nccl on GPU).

Every process runs the same compression on its share of the calibration batches (batch i goes
to process i mod world_size). The statistics are summed across processes before every fit,
so all processes fit the same layers from the same totals and end with the same model, equal
to a one-process run up to the order of floating-point sums.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def active() -> bool:
    """True inside an initialized process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def shard(batches: list) -> list:
    """This process's share of the batches."""
    if not active():
        return batches
    world, me = dist.get_world_size(), dist.get_rank()
    if len(batches) < world:
        raise ValueError(
            f"calib: {len(batches)} batches cannot be shared by {world} processes (need at least one each)"
        )
    return batches[me::world]


def _device() -> torch.device:
    # nccl reduces CUDA tensors only; gloo reduces CPU tensors
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sum_tensors(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Elementwise sums over processes (returned in each tensor's original device)."""
    if not active():
        return tensors
    dev = _device()
    out = []
    for t in tensors:
        work = t.detach().to(dev).clone()
        dist.all_reduce(work)
        out.append(work.to(t.device))
    return out


def sum_floats(values: list[float]) -> list[float]:
    if not active():
        return values
    (total,) = sum_tensors([torch.tensor(values, dtype=torch.float64)])
    return total.tolist()


def gather_objects(obj) -> list:
    """Every process's ``obj``, in rank order."""
    if not active():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
