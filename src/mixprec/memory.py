"""Activation memory: keep the tensors autograd saves in a converted model's forward in
low-precision storage, and count the bytes saved for backward.

mixprec's own ops save packed low-precision tensors already. The FP32 islands between
them (batch norm, ReLU, GELU, softmax) save float32 activations; paper 1 stores
activations in FP16, so :class:`ActivationPacker` rounds those into the activation
format's storage while they wait for backward. Statistics (1-D tensors, and reductions
whose last dimension is 1, such as layer norm's mean and reciprocal deviation) and
parameters stay FP32.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from mixprec.provenance import is_on_grid, mark_on_grid
from mixprec.core.quantize import quantize, tensor_scale
from mixprec.recipe import Recipe
from mixprec.core.storage import from_storage, to_storage

__all__ = ["ActivationPacker", "SavedBytesCounter", "MIN_PACKED_NUMEL", "packer_active", "attach_packer"]

MIN_PACKED_NUMEL = 1024
"""Saved float32 tensors smaller than this stay as they are (not worth a kernel call)."""


class _Counters(threading.local):
    def __init__(self) -> None:
        self.active: list[SavedBytesCounter] = []


_counters = _Counters()


def _record(tensor: torch.Tensor) -> None:
    for counter in _counters.active:
        counter.add(tensor)


class SavedBytesCounter:
    """Counts the bytes of tensors saved for backward while it is active (a context
    manager), parameters and buffers of ``exclude_from`` excepted. Works with plain
    models (its own saved-tensor hooks) and with converted ones (their packer reports
    what it actually stores)."""

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
        self._excluded = {
            t.data_ptr() for module in self._modules for t in (*module.parameters(), *module.buffers())
        }
        _counters.active.append(self)

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            self.add(tensor)
            return tensor

        self._hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)
        _counters.active.remove(self)


class _PackingState(threading.local):
    def __init__(self) -> None:
        self.depth = 0


_packing = _PackingState()


def packer_active() -> bool:
    """Whether an :class:`ActivationPacker` is packing this thread's saved tensors (then
    ops may save their float32 inputs and let it pack them once, shared with any other
    op that saves the same tensor)."""
    return _packing.depth > 0


class _PackingHooks:
    """Saved-tensor hooks for one forward pass, with a cache so that a tensor saved by
    several ops (a ReLU's output is also the next convolution's input) is stored once."""

    def __init__(self, packer: ActivationPacker) -> None:
        self.packer = packer
        spec = packer.recipe.activation
        self.spec = spec
        self.excluded = packer.excluded()
        self.cache: dict[int, tuple[weakref.ref[torch.Tensor], int, Any]] = {}
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    def pack(self, tensor: torch.Tensor) -> Any:
        spec = self.spec
        packable = (
            not spec.is_fp32
            and tensor.dtype == torch.float32
            and tensor.dim() >= 2
            and tensor.shape[-1] > 1
            and tensor.numel() >= MIN_PACKED_NUMEL
            and tensor.data_ptr() not in self.excluded
        )
        if not packable:
            _record(tensor)
            return tensor
        cached = self.cache.get(id(tensor))
        if cached is not None and cached[0]() is tensor and cached[1] == tensor._version:
            return cached[2]
        scale = None
        scaling = self.packer.recipe.tensor_scaling
        if scaling is not None:
            scale = tensor_scale(tensor, spec.fmt, margin=scaling.margin, power_of_two=True)
        if scale is None and is_on_grid(tensor, spec.fmt):
            rounded = tensor  # a layer's rounded output: pack it as it is
        else:
            rounded = quantize(tensor, spec.fmt, scale=scale, saturate=True if scale is not None else None)
        packed = to_storage(rounded if scale is None else rounded * torch.reciprocal(scale), spec.fmt)
        _record(packed)
        saved = (packed, scale)
        self.cache[id(tensor)] = (weakref.ref(tensor), tensor._version, saved)
        return saved

    def unpack(self, saved: Any) -> torch.Tensor:
        if isinstance(saved, torch.Tensor):
            return saved
        packed, scale = saved
        values = from_storage(packed, self.spec.fmt)
        return mark_on_grid(values, self.spec.fmt) if scale is None else values * scale

    def __enter__(self) -> _PackingHooks:
        self.hooks.__enter__()
        _packing.depth += 1
        return self

    def __exit__(self, *exc: object) -> None:
        _packing.depth -= 1
        self.hooks.__exit__(*exc)
        self.cache.clear()


class ActivationPacker:
    """Saved-tensor hooks that hold a converted model's saved float32 activations in
    the activation format's storage dtype (with a current per-tensor scale under FP8
    scaling), each tensor once however many ops save it. Entered around the model's
    forward by :func:`mixprec.convert`."""

    def __init__(self, model: nn.Module, recipe: Recipe) -> None:
        self.model = model
        self.recipe = recipe

    def excluded(self) -> set[int]:
        """Data pointers of the model's parameters and buffers, which are never packed."""
        return {t.data_ptr() for t in (*self.model.parameters(), *self.model.buffers())}

    def hooks(self) -> _PackingHooks:
        """A fresh hooks context for one forward pass."""
        return _PackingHooks(self)


def _enter_packing(module: nn.Module, args: Any) -> None:
    if not getattr(module, "_mixprec_pack_activations", True):
        return
    hooks = ActivationPacker(module, module._mixprec_recipe).hooks()  # type: ignore[arg-type]
    hooks.__enter__()
    module.__dict__.setdefault("_mixprec_packing_stack", []).append(hooks)


def _exit_packing(module: nn.Module, args: Any, output: Any) -> None:
    stack = module.__dict__.get("_mixprec_packing_stack")
    if stack:
        stack.pop().__exit__(None, None, None)


def attach_packer(model: nn.Module) -> None:
    """Run ``model``'s forward inside an :class:`ActivationPacker`, through forward
    hooks (the exit hook runs even when the forward raises). The hooks read the model
    they are called on, so a deep copy of the model packs its own activations; set
    ``model._mixprec_pack_activations = False`` to turn packing off."""
    model.register_forward_pre_hook(_enter_packing)
    model.register_forward_hook(_exit_packing, always_call=True)
