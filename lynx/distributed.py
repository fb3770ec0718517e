"""Process-group setup shared by train.py and judge.py: torchrun's group (NCCL on GPUs, gloo on CPU) or a
one-process group, so the same collective code runs at any world size."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_distributed(device: str | None = None) -> tuple[torch.device, bool]:
    """Join the process group torchrun describes, or make a one-process group when run as plain `python x.py`, so
    FSDP2, torch.distributed.checkpoint and the judge's gathers take the same path at any world size.

    device: None (the local rank's GPU when there is one, else the CPU), "cpu", "cuda" (the local rank's) or
    "cuda:N". NCCL on GPUs, gloo otherwise. Returns the device and whether this call created the group (and so
    must destroy it)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    cuda = device.type == "cuda"
    if cuda:
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if dist.is_initialized():
        return device, False
    backend = "nccl" if cuda else "gloo"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend, device_id=device if cuda else None)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return device, True


def all_reduce_sum(values: list[float], device) -> list[float]:
    """Sums over ranks of a few numbers (float64, so token counts stay exact)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_gather_objects(obj) -> list:
    """Every rank's `obj` (picklable), in rank order, on every rank."""
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
