"""What one converted model carries between and during its forwards: the recipe, the
stochastic-rounding generator, the amax histories of per-tensor scaling (one per tensor
per call site), the weight operands rounded this step, and where in the model the
forward is. It lives on the model (``model._mixprec``), never in a global.

:func:`quantize_operand` is the one place an operand is rounded: it returns the values
the FP32 GEMM multiplies and what backward saves (the same values in the format's real
storage, 1 or 2 bytes, with their scale; for a block format, the element codes and
block scales of :mod:`mixprec.core.block_storage`).

Block formats are quantized along ``axis``, the contraction dimension of the GEMM the
operand enters. A dimension that is not a multiple of the block extent is padded with
zeros inside the op (the core refuses rather than pads): zeros change no block's scale
and add nothing to the GEMM's sums, so the product is exactly the one of the unpadded
operands, and small models (a width-24 CNN, heads of 16) run under 32-element blocks.
Under a Hadamard transform the padded contraction length stays in the values (the
rotated zeros are not zero); the other operand is padded and rotated the same way.
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from mixprec.core.block_quantize import quantize_blocks, quantize_blocks_factored
from mixprec.core.block_storage import PackedBlocks, quantize_packed, unpack_blocks
from mixprec.core.formats import BlockFormat
from mixprec.core.hadamard import hadamard_transform
from mixprec.core.kernels import _MIX1, _MIX2  # murmur3's finaliser, as the rounding kernel's hash
from mixprec.core.quantize import abs_max, quantize, scale_from_amax, tensor_scale
from mixprec.core.storage import quantize_stored_with_amax, stored_values, to_storage
from mixprec.recipe import Operand, Recipe
from mixprec.scaling import AmaxHistory

__all__ = ["Quantized", "BlockLayout", "CallRecord", "EngineState", "quantize_operand", "result_dtype",
           "block_axis_key", "random_state_from"]


@dataclass(frozen=True)
class BlockLayout:
    """Where a block operand's stored blocks sit: the padded tensor they were cut from
    (``padded_shape``, blocks along ``axis``, ``moved_shape`` with that axis last) and
    the ``shape`` of the values the GEMM multiplies (the padding cropped off, except
    along a Hadamard-rotated contraction axis)."""

    padded_shape: tuple[int, ...]
    moved_shape: tuple[int, ...]
    axis: int
    shape: tuple[int, ...]


@dataclass
class Quantized:
    """One rounded operand: ``storage`` holds its values in the format's real storage
    (divided by ``scale`` where there is one); :meth:`values` gives them back as the
    float32 values the GEMM multiplies. For a block format ``storage`` holds the element
    codes, ``scale`` the block scales, ``tensor_scale`` NVFP4's per-tensor scale and
    ``layout`` the blocks' place (:class:`BlockLayout`). A block operand used at once
    has no codes: ``storage`` holds its values (NVFP4: without the tensor scale, which
    ``tensor_scale`` holds, as :meth:`unscaled_as` gives them to a GEMM)."""

    storage: torch.Tensor
    scale: torch.Tensor | None
    operand: Operand
    cached_values: torch.Tensor | None = None
    tensor_scale: torch.Tensor | None = None
    layout: BlockLayout | None = None

    def values(self) -> torch.Tensor:
        """The operand's values as float32 (on the format's grid, times the scale)."""
        if self.cached_values is not None:
            return self.cached_values.float()  # BF16 where the rounding pass wrote them so
        if self.layout is not None:
            return self._blocks(torch.float32)
        if self.tensor_scale is not None:  # NVFP4 values without their tensor scale
            return self.storage.float() * self.tensor_scale
        if self.operand.is_fp32 or self.storage.dtype in (torch.float16, torch.bfloat16, torch.float32):
            values = self.storage.float()
            return values if self.scale is None else values * self.scale
        return stored_values(self.storage, self.operand.fmt, self.scale)  # type: ignore[arg-type]

    def values_as(self, dtype: torch.dtype) -> torch.Tensor:
        """``values().to(dtype)``, without the float32 copy where the storage is decoded
        straight into ``dtype`` (FP8 storage, in one pass) or already is it."""
        if self.cached_values is not None:
            return self.cached_values.to(dtype)
        if self.tensor_scale is not None and self.layout is None:
            return self.values().to(dtype)
        if self.layout is None and self.scale is None and self.storage.dtype in (torch.float16, torch.bfloat16):
            return self.storage.to(dtype)
        if self.layout is None and self.storage.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            return stored_values(self.storage, self.operand.fmt, self.scale, dtype)  # type: ignore[arg-type]
        if self.layout is not None:
            return self._blocks(dtype)
        return self.values().to(dtype)

    def unscaled_as(self, dtype: torch.dtype) -> torch.Tensor:
        """The values a GEMM multiplies, as ``dtype``: :meth:`values_as`, except that an
        operand with a tensor scale (NVFP4) gives its values without it (element times
        block scale, exact), for the GEMM to apply the tensor scales to its FP32 sum
        as NVFP4 hardware does."""
        if self.tensor_scale is None:
            return self.values_as(dtype)
        if self.layout is not None:
            return self._blocks(dtype, with_tensor_scale=False)
        return self.storage.to(dtype)

    def _blocks(self, dtype: torch.dtype, with_tensor_scale: bool = True) -> torch.Tensor:
        """A block operand's values decoded from its codes and scales, as ``dtype``."""
        fmt = self.operand.fmt
        assert isinstance(fmt, BlockFormat) and self.scale is not None and self.layout is not None
        packed = PackedBlocks(fmt, self.storage, self.scale, self.tensor_scale if with_tensor_scale else None,
                              self.layout.padded_shape, self.layout.moved_shape, self.layout.axis)
        return _crop(unpack_blocks(packed, fmt, dtype), self.layout.shape)

    def tensors(self) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """The tensors of its real storage: values or codes, scale(s), tensor scale."""
        return self.storage, self.scale, self.tensor_scale

    @property
    def nbytes(self) -> int:
        """Bytes of its real storage."""
        return sum(t.numel() * t.element_size() for t in self.tensors() if t is not None)

    def drop_values(self) -> Quantized:
        """This operand without its float32 values (what backward saves)."""
        return Quantized(self.storage, self.scale, self.operand, None, self.tensor_scale, self.layout)


def _crop(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    if tuple(x.shape) == tuple(shape):
        return x
    return x[tuple(slice(0, n) for n in shape)]


def block_axis_key(operand: Operand, axis: int, ndim: int) -> int | None:
    """What distinguishes two quantizations of one tensor for ``operand`` along
    ``axis``: None where the axis changes nothing (scalar formats; square 2-D tiles,
    which are the same tiles either way round), else the normalised axis."""
    fmt = operand.fmt
    if not isinstance(fmt, BlockFormat):
        return None
    shape = fmt.block_shape
    if len(shape) == 2 and shape[0] == shape[1]:
        return None
    return axis % max(ndim, 1)


@dataclass
class CallRecord:
    """One GEMM-family call seen in a forward: for the coverage report."""

    site: str
    op: str
    flops: float
    formats: dict[str, str]
    emulated: bool
    reason: str = ""


@dataclass
class EngineState:
    """The per-model state of the emulation (see the module docstring)."""

    recipe: Recipe
    random_state: torch.Tensor | None  # int32 [seed, seed, forwards so far] (stochastic recipes)
    kept: dict[str, str] = field(default_factory=dict)  # module name -> why it stays high precision
    histories: dict[str, AmaxHistory] = field(default_factory=dict)
    weights: dict[tuple[int, Operand, int | None], tuple[Any, int, Operand, Quantized]] = field(
        default_factory=dict)
    module_stack: list[str] = field(default_factory=list)
    high_precision: int = 0  # depth of kept modules the forward is inside
    kept_recipe: Recipe | None = None  # what kept modules run under; None: their own FP32 ops
    site_counts: dict[str, int] = field(default_factory=dict)
    recording: bool = False  # amax histories are updated (training forward with grad)
    log: list[CallRecord] | None = None  # coverage recording, when a report asks
    forward_key: torch.Tensor | None = None  # this forward's random key (stochastic recipes)
    history_count: int = 0  # amax histories at the start of this forward
    # ---- set by mixprec.distributed (None / False in one process) ----
    # amax -> the largest amax over the ranks (all-reduce MAX): every rank then derives
    # the same per-tensor scale (agreed scales, as Transformer Engine reduces amaxes);
    # called in training forwards and their backward only (``recording``): an
    # evaluation on one rank must not wait for the others
    amax_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
    # forget the rounded weights at every forward: FSDP2 refills its unsharded
    # parameters in place at each all-gather without a new version, so the
    # version-keyed cache would hand out the previous step's weights
    weights_per_forward: bool = False
    # float32 CPU buffers for temporaries used and dropped inside one quantization (the
    # Hadamard rotation of a wgrad operand), one per shape, kept across steps: a fresh
    # buffer's pages are faulted in anew at every use (4 MiB: ~1,000 faults, ~2.5 ms
    # here, twice the rotation's own time)
    workspace: dict[tuple[int, ...], torch.Tensor] = field(default_factory=dict)

    # ---- call sites -------------------------------------------------------------------

    def begin_forward(self, training: bool) -> None:
        """Reset the per-forward call counters at the root module's forward."""
        self.site_counts.clear()
        self.module_stack.clear()
        self.high_precision = 0
        self.recording = training and torch.is_grad_enabled()
        # Read here so that a compiled forward guards on it: the first compiled call
        # creates the amax histories eagerly (a graph break per scaled GEMM: dynamo
        # cannot add to a dict inside an autograd.Function), and the changed count
        # makes the next call recompile without those breaks.
        self.history_count = len(self.histories)
        if self.random_state is not None:
            self.random_state[2:].add_(1)
            self.forward_key = _mix_key(self.random_state[:2], self.random_state[2:])
        if self.weights_per_forward:
            self.weights.clear()

    def random_key(self, key: str, forward_key: torch.Tensor | None) -> torch.Tensor | None:
        """The stochastic-rounding key of call site ``key`` in the forward whose key is
        ``forward_key`` (this forward's when None): the forward's key mixed with a hash
        of the site's name. A backward (and attention's recomputation) gets its
        forward's keys whatever ran in between, and the rounding draws no random numbers
        of its own, so torch.compile traces it (a torch.Generator cannot be traced, and
        the forward's key is the seed mixed with the forward's count, in tensor ops).
        None where there is no key (the core then draws from torch's default generator)."""
        base = forward_key if forward_key is not None else self.forward_key
        if base is None:
            return None
        return _mix_key(base, _site_hash(key))

    def site(self, op: str) -> str:
        """A name for this call: the module it runs in, the op and its count there."""
        module = self.module_stack[-1] if self.module_stack else ""
        base = f"{module}:{op}"
        count = self.site_counts.get(base, 0)
        self.site_counts[base] = count + 1
        return f"{base}#{count}"

    # ---- scales -----------------------------------------------------------------------

    def scale(self, x: torch.Tensor, operand: Operand, key: str, defer: bool = False
              ) -> tuple[torch.Tensor | None, AmaxHistory | None]:
        """The per-tensor scale for ``x`` at call site ``key`` (None without scaling);
        under delayed scaling the history records x's amax when training, or, with
        ``defer``, is returned for the caller to record an amax its rounding pass took
        (second item; None where nothing is left to record)."""
        scaling = operand.scaling
        if scaling is None:
            return None, None
        fmt = operand.fmt
        if scaling.mode == "current":
            if self.amax_reduce is not None and self.recording:
                return scale_from_amax(self.amax_reduce(abs_max(x)), fmt, margin=scaling.margin,
                                       power_of_two=scaling.power_of_two), None
            return tensor_scale(x, fmt, margin=scaling.margin, power_of_two=scaling.power_of_two), None
        if key not in self.histories:
            self.reserve_history(key, operand, x.device)
        history = self.histories[key]
        scale = history.scale(fmt, margin=scaling.margin, power_of_two=scaling.power_of_two)
        if not self.recording:
            return scale, None
        if defer and self.amax_reduce is None:
            return scale, history
        history.record(x if self.amax_reduce is None else self.amax_reduce(abs_max(x)))
        return scale, None

    def reserve_history(self, key: str, operand: Operand, device: torch.device) -> None:
        """Create the amax history of call site ``key`` now if ``operand`` scales by
        delayed scaling and it does not exist yet (what :meth:`scale` would create at
        the call's first rounding). torch.compile traces an op's autograd.Function as one
        higher-order op, inside which this state's dict of histories cannot grow; the
        ops reserve their histories before it."""
        scaling = operand.scaling
        if scaling is not None and scaling.mode == "delayed" and key not in self.histories:
            self._new_history(key, scaling.history, device)

    @torch.compiler.disable
    def _new_history(self, key: str, length: int, device: torch.device) -> None:
        # run eagerly (a graph break while compiling): the history's tensors are real
        # tensors, inputs of the compiled graphs, which update them in place
        self.histories[key] = AmaxHistory(length, device)

    # ---- weights ----------------------------------------------------------------------

    def weight(self, param: torch.Tensor, operand: Operand, key: str, axis: int = -1,
               forward_key: torch.Tensor | None = None, values_dtype: torch.dtype | None = None) -> Quantized:
        """``param`` rounded for ``operand`` (block formats: along ``axis``), once per
        parameter version: a weight used several times in one step (tied, shared,
        recurrent) is rounded once, and the optimizer's in-place update (a new version)
        makes the next forward round again. A weight in a 1-D block format has one copy
        per axis (forward's and dgrad's); square 2-D tiles serve both. A slice of a
        parameter used as a weight (MultiheadAttention's packed projection for
        cross-attention) is rounded at each use, not cached. ``values_dtype`` asks the
        rounding pass of an FP8 weight for its values too, in the dtype of the GEMM that
        uses them at once (the forward's): the cache keeps the bytes alone, and a
        later use decodes them."""
        if torch.compiler.is_compiling():
            # a compiled graph rounds its weights afresh each call: tensor versions are
            # not traceable, and inductor fuses the rounding into the GEMM's inputs
            return quantize_operand(param.detach(), operand, self, key, axis=axis, forward_key=forward_key)
        cache_key = (id(param), operand, block_axis_key(operand, axis, param.dim()))
        entry = self.weights.get(cache_key)
        version = param._version
        if entry is not None and entry[0]() is param and entry[1] == version:
            return entry[3]
        rounded = quantize_operand(param.detach(), operand, self, key, axis=axis, forward_key=forward_key,
                                   values_dtype=values_dtype, keep_storage=True)
        if isinstance(param, torch.nn.Parameter):
            self.weights[cache_key] = (weakref.ref(param), version, operand, rounded.drop_values())
        return rounded

    def clear_weights(self) -> None:
        """Forget the rounded weights (after a load or a dtype change)."""
        self.weights.clear()

    # ---- checkpoints ------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The amax histories and the generator's state, as tensors (so the model's
        state dict stays a dict of tensors for torch.save, safetensors and
        torch.distributed.checkpoint): what a resume needs."""
        state = {"recipe": torch.tensor(list(self.recipe.name.encode()), dtype=torch.uint8)}
        if self.random_state is not None:
            state["random_state"] = self.random_state.clone()
        for key, history in self.histories.items():
            state[f"amax.{key}"] = history.amax.clone()
            state[f"count.{key}"] = history.count.clone()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_dict` saved (the recipe's name must match)."""
        name = bytes(state["recipe"].tolist()).decode() if "recipe" in state else None
        if name != self.recipe.name:
            raise ValueError(
                f"this checkpoint's mixprec state is for recipe {name!r}, but the model runs "
                f"{self.recipe.name!r}: convert the model with the checkpoint's recipe")
        histories = {}
        for key, amax in state.items():
            if key.startswith("amax."):
                site = key[len("amax."):]
                history = AmaxHistory(amax.numel(), amax.device)
                history.load_state_dict({"amax": amax, "count": state[f"count.{site}"]})
                histories[site] = history
        self.histories = histories
        if self.random_state is not None and "random_state" in state:
            self.random_state.copy_(state["random_state"])


def result_dtype(operand: Operand, compute: torch.dtype) -> torch.dtype:
    """The torch dtype a GEMM result in ``operand``'s format is held in: its own dtype
    for FP32, BF16 and FP16; the compute dtype for narrower formats it holds exactly
    (an E5M2 output of paper 2 lives in FP16); else float32."""
    fmt = operand.fmt
    assert not isinstance(fmt, BlockFormat), "a GEMM result is in a scalar format"
    if fmt.torch_dtype in (torch.float32, torch.float16, torch.bfloat16) and operand.scaling is None:
        return fmt.torch_dtype
    from mixprec.core import formats

    holder = formats.get(compute)
    fits = (fmt.mantissa_bits <= holder.mantissa_bits and fmt.largest <= holder.largest
            and fmt.smallest_subnormal >= holder.smallest_subnormal)
    return compute if fits and operand.scaling is None else torch.float32


def _holds_exactly(dtype: torch.dtype | None, scale: torch.Tensor | None, operand: Operand) -> bool:
    """Whether ``dtype`` holds every value of FP8 ``operand`` (E4M3, E5M2) times
    ``scale`` exactly: float32 always; BF16 (8 significant bits, float32's exponent
    range) unscaled or with power-of-two scales; FP16 unscaled (both FP8 formats are
    subsets of it; a scale could move values out of its range)."""
    if dtype in (None, torch.float32):
        return True
    if dtype == torch.bfloat16:
        return scale is None or (operand.scaling is not None and operand.scaling.power_of_two)
    return dtype == torch.float16 and scale is None


def quantize_operand(
    x: torch.Tensor, operand: Operand, state: EngineState, key: str, in_place: bool = False,
    scale: torch.Tensor | None = None, axis: int = -1, forward_key: torch.Tensor | None = None,
    values_dtype: torch.dtype | None = None, keep_storage: bool | None = None,
) -> Quantized:
    """``x`` rounded for ``operand`` (see :class:`Quantized`). A tensor already in the
    format's own dtype is on its grid and is not rounded again. ``in_place`` rounds a
    fresh float32 tensor nobody else holds without a copy. ``scale`` replaces the
    operand's own per-tensor scale (a recomputation in backward reuses the forward's).
    ``axis`` is the contraction dimension of the operand's GEMM: a block format's blocks
    run along it (2-D tiles: -1 or -2); scalar formats ignore it. Stochastic rounding
    takes its bits from :meth:`EngineState.random_key` (of ``forward_key``'s forward).
    ``values_dtype`` asks FP8 storage for the values too, written by the same pass in
    the dtype the GEMM's kernel multiplies (float32, or bfloat16 where that is exact),
    instead of a decoding pass later: for an operand used at once (a forward's input,
    backward's error), not one kept (backward's copies keep only the bytes).
    ``keep_storage`` with ``values_dtype``: False (a GEMM's result, used at once) skips
    the storage, the operand holds its values alone; True (a weight: used at once and
    kept) keeps it beside them, block codes included; None (the default) keeps FP8
    storage and skips block codes (an input, whose backward copy is another)."""
    if operand.is_fp32:
        return Quantized(x, None, operand, x.float())
    fmt = operand.fmt
    if isinstance(fmt, BlockFormat):
        return _quantize_blocks(x, operand, fmt, state, axis, key, forward_key, values_dtype,
                                with_codes=values_dtype is None or bool(keep_storage))
    if operand.scaling is None and x.dtype == fmt.torch_dtype:
        return Quantized(x, None, operand)  # values() makes the float32 copy only if a kernel asks
    if (operand.scaling is None and scale is None and operand.rounding == "nearest" and fmt.overflow == "inf"
            and fmt.torch_dtype in (torch.float16, torch.bfloat16)):
        # torch's cast rounds to FP16/BF16 exactly as quantize does (tests/core check every
        # FP16 value and random bit patterns): one pass, the float32 copy only if asked
        if (in_place and keep_storage is False and values_dtype == torch.float32 and x.dtype == torch.float32
                and x.is_contiguous()):
            # a fresh float32 result wanted as float32 values (a weight's gradient): rounded
            # onto the grid in place, one pass for the two of a cast there and back
            values = quantize(x.detach(), fmt, out=x.detach())
            return Quantized(values, None, operand, values)
        return Quantized(x.detach().to(fmt.torch_dtype), None, operand)
    fp8 = fmt.torch_dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
    history = None
    if scale is None:
        # FP8 storage: a delayed-scaling amax is taken by the rounding pass itself
        scale, history = state.scale(x, operand, key, defer=fp8)
    random_key = state.random_key(key, forward_key) if operand.rounding == "stochastic" else None
    saturate = True if scale is not None else None
    if fp8 and not _holds_exactly(values_dtype, scale, operand):
        values_dtype = torch.float32
    values_only = keep_storage is False and values_dtype is not None
    # float32 values alone of a fresh x: rounded in place below, no new tensor
    in_place_values = values_only and values_dtype == torch.float32 and history is None
    if fp8 and not in_place_values:
        # the 1-byte storage in one pass over x; the values are decoded from it when a
        # GEMM asks, in the dtype of its kernel (BF16: 3 bytes an element, not 6)
        values, stored, amax = quantize_stored_with_amax(
            x, fmt, operand.rounding, scale=scale, saturate=saturate, random_key=random_key,
            with_values=values_dtype is not None, values_dtype=values_dtype or torch.float32,
            with_amax=history is not None, with_storage=not values_only)
        if history is not None:  # delayed scaling: the amax the rounding pass took
            assert amax is not None
            history.record_amax(amax)
        if stored is None:  # values alone: they stand in for the storage
            assert values is not None
            return Quantized(values, None, operand, values)
        return Quantized(stored, scale, operand, values)
    x32 = x.detach()  # FP16/BF16 as it is: quantize widens it (the native pass on the way)
    fresh = in_place and x32.dtype == torch.float32 and x32.is_contiguous()
    values = quantize(x32, fmt, operand.rounding, scale=scale, saturate=saturate, out=x32 if fresh else None,
                      random_key=random_key)
    if values_only:
        return Quantized(values, None, operand, values)
    unscaled = values if scale is None else values * torch.reciprocal(scale)
    return Quantized(to_storage(unscaled, fmt), scale, operand, values)


def _quantize_blocks(x: torch.Tensor, operand: Operand, fmt: BlockFormat, state: EngineState,
                     axis: int, key: str = "", forward_key: torch.Tensor | None = None,
                     values_dtype: torch.dtype | None = None, with_codes: bool = True) -> Quantized:
    """``x`` in block format ``fmt`` along ``axis``: zero-padded to whole blocks (see the
    module docstring), Hadamard-rotated where the operand says, quantized, packed; or,
    given ``values_dtype`` (an operand used at once), only its values, written by the
    rounding pass in that dtype (BF16 where the format's values all are BF16 values, else
    float32) with no codes: the packing and decoding passes are skipped. ``values_dtype``
    with ``with_codes`` (a weight, used at once and kept): the codes, and the values
    written beside them by the same pass (formats without a tensor scale; NVFP4's come
    from its codes when asked, without the tensor scale the GEMM applies to its sum)."""
    x32 = x.detach() if x.dtype in (torch.float16, torch.bfloat16) else x.detach().float()  # widened in the kernels
    if x32.dim() < len(fmt.block_shape):
        x32 = x32.reshape((1,) * (len(fmt.block_shape) - x32.dim()) + tuple(x32.shape))
    ndim = x32.dim()
    axis %= ndim
    shape = list(x32.shape)
    block = fmt.block_shape
    if len(block) == 1:
        multiples = {axis: block[0]}
    elif axis == ndim - 1:
        multiples = {ndim - 1: block[1], ndim - 2: block[0]}
    else:
        multiples = {ndim - 2: block[1], ndim - 1: block[0]}
    if operand.hadamard:
        multiples[axis] = _lcm(multiples[axis], operand.hadamard)
    padding = [0] * (2 * ndim)
    for dim, multiple in multiples.items():
        padding[2 * (ndim - 1 - dim) + 1] = -x32.shape[dim] % multiple
    if any(padding):
        x32 = F.pad(x32, padding)
    scratch = None
    if operand.hadamard:
        # float32 with the rotated axis last (a view back of it): the quantizer reads it
        # in that layout, with no second transposing copy; into the state's buffer for
        # it on the CPU, in eager mode
        if x32.device.type == "cpu" and not torch.compiler.is_compiling():
            moved = (*x32.shape[:axis], *x32.shape[axis + 1:], x32.shape[axis])
            scratch = state.workspace.get(moved)
            if scratch is None:
                scratch = state.workspace[moved] = torch.empty(moved, dtype=torch.float32)
        x32 = hadamard_transform(x32, operand.hadamard, axis=axis, out=scratch)
        shape[axis] = x32.shape[axis]  # the rotated padding is part of the product
    quantized = _quantize_padded(x32, tuple(shape), operand, fmt, state, axis, key, forward_key, values_dtype,
                                 with_codes)
    if scratch is not None and _holds_memory_of(quantized, scratch):
        # a result in the buffer itself (an empty operand's) keeps it: the next rotation
        # of that shape gets a new buffer
        del state.workspace[tuple(scratch.shape)]
    return quantized


def _holds_memory_of(quantized: Quantized, buffer: torch.Tensor) -> bool:
    """Whether one of ``quantized``'s tensors lies in ``buffer``'s memory."""
    memory = buffer.untyped_storage().data_ptr()
    return any(t is not None and t.untyped_storage().data_ptr() == memory
               for t in (*quantized.tensors(), quantized.cached_values))


def _quantize_padded(x32: torch.Tensor, shape: tuple[int, ...], operand: Operand, fmt: BlockFormat,
                     state: EngineState, axis: int, key: str, forward_key: torch.Tensor | None,
                     values_dtype: torch.dtype | None, with_codes: bool) -> Quantized:
    """:func:`_quantize_blocks` of ``x32``, padded (and rotated) already; ``shape`` is
    the operand's own (padding cropped off the values)."""
    # one key per site and axis: the dgrad and wgrad copies of an error draw apart
    random_key = state.random_key(f"{key}@{axis}", forward_key) if operand.rounding == "stochastic" else None
    if values_dtype is not None and not with_codes:
        if fmt.tensor_scale:
            # NVFP4: the values without the tensor scale, which the GEMM applies to its sum
            # BF16 where the GEMM takes BF16 (its block products are BF16 values)
            dtype = torch.bfloat16 if values_dtype == torch.bfloat16 and fmt.block_bf16_values else torch.float32
            unscaled, tensor_scale = quantize_blocks_factored(x32, fmt, operand.rounding, axis=axis,
                                                              random_key=random_key, dtype=dtype)
            return Quantized(_crop(unscaled, tuple(shape)), None, operand, None, tensor_scale)
        dtype = torch.bfloat16 if values_dtype == torch.bfloat16 and fmt.bf16_values else torch.float32
        values = _crop(quantize_blocks(x32, fmt, operand.rounding, axis=axis, random_key=random_key, dtype=dtype),
                       tuple(shape))
        return Quantized(values, None, operand, values)
    # a block holding NaN or Inf (an overflowing step's gradient) is stored as a NaN
    # scale over zero codes: the element formats have no NaN code
    # the codes and scales in two passes; the values are decoded from them when a GEMM
    # asks, in the dtype of its kernel
    with_values = values_dtype is not None and not fmt.tensor_scale
    dtype = torch.bfloat16 if values_dtype == torch.bfloat16 and fmt.bf16_values else torch.float32
    values, packed = quantize_packed(x32, fmt, operand.rounding, axis=axis, random_key=random_key,
                                     with_values=with_values, values_dtype=dtype)
    layout = BlockLayout(tuple(x32.shape), packed.moved_shape, packed.axis, tuple(shape))
    cached = None if values is None else _crop(values, tuple(shape))
    return Quantized(packed.codes, packed.scales, operand, cached, packed.tensor_scale, layout)


def _lcm(a: int, b: int) -> int:
    """Least common multiple in plain Python (dynamo cannot trace math.lcm)."""
    x, y = a, b
    while y:
        x, y = y, x % y
    return a * b // x


def random_state_from(generator: torch.Generator) -> torch.Tensor:
    """A model's stochastic-rounding state drawn from ``generator``: two int32 words of
    seed and a forward count of 0, on the generator's device. Each forward's key is the
    seed mixed with the count (:meth:`EngineState.begin_forward`)."""
    seed = torch.randint(-(2**31), 2**31 - 1, (2,), dtype=torch.int32, device=generator.device,
                         generator=generator)
    return torch.cat([seed, seed.new_zeros(1)])


def _site_hash(name: str) -> int:
    """FNV-1a of a call site's name, 31 bits: remembered per name in eager mode (a
    character loop at every stochastic rounding cost ~25 us), computed in plain Python
    under torch.compile, so that dynamo folds it."""
    if torch.compiler.is_compiling():
        return _fnv1a(name)
    return _remembered_fnv1a(name)


def _fnv1a(name: str) -> int:
    """FNV-1a of ``name``, 31 bits."""
    h = 0x811C9DC5
    for char in name:
        h = ((h ^ ord(char)) * 0x01000193) & 0xFFFFFFFF
    return h & 0x7FFFFFFF


_remembered_fnv1a = functools.lru_cache(maxsize=65536)(_fnv1a)


def _mix_key(base: torch.Tensor, salt: int | torch.Tensor) -> torch.Tensor:
    """``base`` (two int32 words) mixed with ``salt`` (an int, or a one-element int32
    tensor) by murmur3's finaliser in wrapping int32 tensor arithmetic, so distinct
    salts give unrelated keys."""
    if isinstance(salt, torch.Tensor):
        salts = torch.cat([salt, salt * 31 + 17])
    elif base.device.type == "cpu" and not torch.compiler.is_compiling():
        # the same arithmetic on the host: ten tensor ops on two words cost ~150 us, at
        # every stochastic rounding (reading a CPU tensor syncs nothing)
        words = _mix_words(base.tolist(), [salt, (salt * 31 + 17) & 0x7FFFFFFF])
        return torch.tensor(words, dtype=torch.int32)
    else:
        salts = torch.tensor([salt, (salt * 31 + 17) & 0x7FFFFFFF], dtype=torch.int32, device=base.device)
    return _mix_tensor(base, salts)


def _mix_tensor(base: torch.Tensor, salts: torch.Tensor) -> torch.Tensor:
    """murmur3's finaliser of ``base ^ salts`` in wrapping int32 tensor arithmetic."""
    h = base ^ salts
    h = h ^ ((h >> 16) & 0xFFFF)
    h = h * _MIX1
    h = h ^ ((h >> 13) & 0x7FFFF)
    h = h * _MIX2
    return h ^ ((h >> 16) & 0xFFFF)


def _mix_words(words: list[int], salts: list[int]) -> list[int]:
    """:func:`_mix_tensor` on Python ints: the same 32-bit patterns, as signed ints."""
    mixed = []
    for word, salt in zip(words, salts):
        h = (word ^ salt) & 0xFFFFFFFF
        h ^= h >> 16
        h = (h * (_MIX1 & 0xFFFFFFFF)) & 0xFFFFFFFF
        h ^= h >> 13
        h = (h * (_MIX2 & 0xFFFFFFFF)) & 0xFFFFFFFF
        h ^= h >> 16
        mixed.append(h - (1 << 32) if h >= 1 << 31 else h)
    return mixed
