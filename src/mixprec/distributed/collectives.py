"""Collectives that work on every backend: nccl takes CUDA tensors only, so a CPU
tensor (a generator's state, a flag) travels through a copy on the current GPU."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

__all__ = ["collective_device", "broadcast_object_tensor"]


def collective_device(process_group: Any = None) -> torch.device:
    """Where tensors handed to ``process_group``'s collectives must live: the current
    CUDA device under nccl, else the CPU."""
    if dist.get_backend(process_group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_object_tensor(tensor: torch.Tensor, src: int, process_group: Any = None) -> torch.Tensor:
    """``tensor`` as rank ``src`` holds it, on every rank, on ``tensor``'s own device
    (sent through :func:`collective_device`). ``src`` is a global rank."""
    device = collective_device(process_group)
    payload = tensor.to(device, copy=True)
    dist.broadcast(payload, src=src, group=process_group)
    return payload.to(tensor.device)
