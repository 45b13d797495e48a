"""Which tensors are known to lie on which format's grid, so that a value rounded once
is not rounded again by the next layer, the activation packer, or backward.

An entry is keyed by the tensor's identity and version counter: an in-place change of
the tensor, or its deallocation, drops it. Only exact knowledge is recorded (the output
of a rounding), never a guess.
"""

from __future__ import annotations

import threading
import weakref

import torch

from mixprec.core.formats import FloatFormat

__all__ = ["mark_on_grid", "is_on_grid"]


class _Registry(threading.local):
    def __init__(self) -> None:
        self.entries: dict[int, tuple[weakref.ref[torch.Tensor], int, FloatFormat]] = {}


_registry = _Registry()


def mark_on_grid(tensor: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """Record that every value of ``tensor`` (float32) lies on ``fmt``'s grid; returns it."""
    entries = _registry.entries
    key = id(tensor)

    def forget(_: object) -> None:  # runs when the tensor is deallocated
        entries.pop(key, None)

    entries[key] = (weakref.ref(tensor, forget), tensor._version, fmt)
    return tensor


def is_on_grid(tensor: torch.Tensor, fmt: FloatFormat) -> bool:
    """Whether ``tensor`` was recorded on ``fmt``'s grid and has not changed since."""
    entry = _registry.entries.get(id(tensor))
    return (
        entry is not None
        and entry[0]() is tensor
        and entry[1] == tensor._version
        and entry[2] == fmt
        and tensor.dtype == torch.float32
    )
