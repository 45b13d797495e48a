"""Counting the bytes autograd saves for backward: what a recipe's memory saving is
measured with (the emulated ops save their rounded operands in real 1- or 2-byte
storage through ``ctx.save_for_backward``, so the count sees them as they are)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["SavedBytesCounter"]


class SavedBytesCounter:
    """Counts the bytes of tensors saved for backward while it is active (a context
    manager), each storage once, parameters and buffers of ``exclude_from`` excepted."""

    def __init__(self, exclude_from: Iterable[nn.Module] = ()) -> None:
        self.bytes = 0
        self._modules = list(exclude_from)
        self._excluded: set[int] = set()
        self._seen: set[tuple[int, int]] = set()
        self._hooks: Any = None

    def add(self, tensor: torch.Tensor) -> None:
        """Count one saved tensor once (a storage saved twice counts once)."""
        if tensor.data_ptr() in self._excluded:
            return
        key = (tensor.untyped_storage().data_ptr(), int(tensor.storage_offset()))
        if key in self._seen:
            return
        self._seen.add(key)
        self.bytes += tensor.numel() * tensor.element_size()

    def __enter__(self) -> SavedBytesCounter:
        self._excluded = {t.data_ptr() for module in self._modules for t in (*module.parameters(), *module.buffers())}

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            self.add(tensor)
            return tensor

        self._hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)
