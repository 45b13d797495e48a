"""Quantize to a block-scaled format: each block of elements shares one scale chosen from
the block's absolute maximum (:class:`~mixprec.core.formats.blocks.BlockFormat`).

:func:`quantize_blocks` returns the dequantized float32 values (``element * scale``), the
numbers a GEMM on MX/NVFP4 hardware multiplies; :func:`block_parts` returns the element
values and scales themselves, which :mod:`mixprec.core.storage` packs into bytes. Both
run the same arithmetic, so a stored tensor reads back exactly as ``quantize`` gives it.

Special values follow OCP MX v1.0: a block holding a NaN or an Inf gets a NaN scale and
reads back all NaN; an all-zero block reads back as zeros (its E8M0 scale is 2**-127, the
smallest, as the floor rule gives). A dimension that is not a multiple of the block size
is refused, not padded: hardware GEMMs and torchao need whole blocks, and a silently
padded tensor would change what is stored. Pad with zeros yourself (zeros change no
block's scale).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any
from dataclasses import dataclass

import torch

from mixprec.core import block_kernels, native
from mixprec.core.formats.blocks import BlockFormat
from mixprec.core.kernels import (_ENTRIES, _params, current_backend, move_last, param_values, run_variant,
                                  serial_threads)
from mixprec.core.quantize import Rounding, _check_tensor, _key

__all__ = ["BlockParts", "BlockCounts", "quantize_blocks", "quantize_blocks_factored", "block_parts", "block_counts",
           "blocked_view"]


@dataclass(frozen=True)
class BlockParts:
    """The pieces of a block-quantized tensor: ``elements`` (float32 values on the element
    grid, in the blocked layout ``(groups, rows, h, cols)``), ``scales`` (float32 block
    scales, shape ``(groups, 1, h, 1)``), ``tensor_scale`` (NVFP4's FP32 scale, else None),
    and how to undo the layout: ``moved_shape`` (x with the block axis last) and ``axis``."""

    elements: torch.Tensor
    scales: torch.Tensor
    tensor_scale: torch.Tensor | None
    moved_shape: tuple[int, ...]
    shape: tuple[int, ...]
    axis: int

    def dequantize(self) -> torch.Tensor:
        """``element * scale`` (NVFP4: ``element * (tensor_scale * scale)``) in x's shape."""
        full = self.scales if self.tensor_scale is None else self.tensor_scale * self.scales
        return restore_layout((self.elements * full).reshape(self.moved_shape), self.axis, len(self.shape))


def _normalise_axis(fmt: BlockFormat, axis: int, ndim: int) -> int:
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise TypeError(f"axis must be an int, not {type(axis).__name__}")
    needed = len(fmt.block_shape)
    if ndim < needed:
        raise ValueError(
            f"block format {fmt.name} has {needed}-D blocks {fmt.block_shape}, but x has {ndim} "
            f"dimension{'s' if ndim != 1 else ''}; reshape x to at least {needed}-D"
        )
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of range for a tensor with {ndim} dimensions")
    axis %= ndim
    if needed == 2 and axis < ndim - 2:
        raise ValueError(
            f"block format {fmt.name} tiles the last two dimensions; axis must be -1 (tile "
            f"{fmt.block_shape} as rows x cols) or -2 (transposed), not {axis - ndim}"
        )
    return axis


def blocked_view(
    x: torch.Tensor, fmt: BlockFormat, axis: int, keep_dtype: bool = False
) -> tuple[torch.Tensor, tuple[int, int, int], tuple[int, ...], int]:
    """x as contiguous float32 (``keep_dtype``: in x's own dtype, for kernels that widen
    it as they read it) with the block axis last, its blocked dims ``(rows, h, cols)``,
    that moved shape, and the normalised axis. Raises ValueError where a dimension is
    not a multiple of the block's extent along it."""
    axis = _normalise_axis(fmt, axis, x.dim())
    ndim = x.dim()
    dtype = x.dtype if keep_dtype else torch.float32
    already = x.detach().movedim(axis, -1)
    if axis != ndim - 1 and already.is_contiguous() and already.dtype == dtype:
        # a view of a tensor laid out with the block axis last (a Hadamard-rotated
        # operand, a transposed weight): nothing to move
        moved = already
    else:  # moved, widened and made contiguous in one pass (nothing to do for contiguous float32)
        moved = move_last(x.detach(), axis, dtype)
    extents = fmt.block_shape
    named = ("last", "second-to-last")
    for offset, extent in enumerate(reversed(extents)):
        size = moved.shape[-1 - offset]
        if size % extent:
            original_dim = axis if offset == 0 else (ndim - 2 if axis == ndim - 1 else ndim - 1)
            raise ValueError(
                f"block format {fmt.name}: dimension {original_dim} of x (shape {tuple(x.shape)}, "
                f"the {named[offset]} of the blocked layout) has {size} elements, not a multiple "
                f"of the block extent {extent}. mixprec refuses rather than pads: hardware and "
                f"torchao need whole blocks. Pad x with zeros to a multiple of {extent} "
                "(torch.nn.functional.pad); zeros change no block's scale"
            )
    if len(extents) == 1:
        dims = (1, 1, extents[0])
    else:
        dims = (extents[0], moved.shape[-1] // extents[1], extents[1])
    return moved, dims, tuple(moved.shape), axis


def restore_layout(moved: torch.Tensor, axis: int, ndim: int) -> torch.Tensor:
    """Undo :func:`blocked_view`'s move of the block axis to the end."""
    return moved.movedim(-1, axis) if axis != ndim - 1 else moved


_PARAMS_CACHE: dict[tuple[BlockFormat, torch.device], tuple[torch.Tensor, ...]] = {}
_ZERO_BELOW: dict[BlockFormat, bool] = {}
_POW2_GRID: dict[BlockFormat, bool] = {}


def _zero_below(fmt: BlockFormat, pe: torch.Tensor) -> bool:
    """:func:`block_kernels.zero_below_ok` for ``fmt``'s element format (cached)."""
    cached = _ZERO_BELOW.get(fmt)
    if cached is None:
        cached = block_kernels.zero_below_ok(param_values(fmt.element, "saturate"))
        if not torch.compiler.is_compiling():  # a traced write to a global would break the graph
            _ZERO_BELOW[fmt] = cached
    return cached


def _pow2_grid(fmt: BlockFormat) -> bool:
    """Whether ``fmt`` runs the moved-grid kernel (:func:`block_kernels.pow2_grid_ok`;
    power-of-two scale rules only; cached)."""
    cached = _POW2_GRID.get(fmt)
    if cached is None:
        cached = fmt.scale_rule in block_kernels.RULE_IDS and block_kernels.pow2_grid_ok(
            param_values(fmt.element, "saturate"))
        if not torch.compiler.is_compiling():  # a traced write to a global would break the graph
            _POW2_GRID[fmt] = cached
    return cached


def _block_params(fmt: BlockFormat, device: torch.device) -> tuple[torch.Tensor, ...]:
    """The kernel's parameter tensors for ``fmt`` on ``device`` (cached)."""
    key = (fmt, device)
    cached = _PARAMS_CACHE.get(key)
    if cached is not None:
        return cached
    elem = fmt.element
    pe = _params(elem, "saturate", device)  # MX and NVFP4 elements clamp at their largest
    if fmt.scale_rule in block_kernels.RULE_IDS:
        largest_bits = param_values(elem, "saturate")[1]
        bp = torch.tensor(
            [block_kernels.RULE_IDS[fmt.scale_rule], elem.max_exponent,
             1 << (22 - elem.mantissa_bits), largest_bits],
            dtype=torch.int32, device=device,
        )
        params: tuple[torch.Tensor, ...] = (pe, bp)
    else:
        ps = _params(fmt.scale, "saturate", device)
        fp = torch.tensor(
            [elem.largest, fmt.scale.largest * elem.largest, fmt.scale.smallest_normal],
            dtype=torch.float32, device=device,
        )
        params = (pe, ps, fp)
    if not torch.compiler.is_compiling():  # a traced write to a global would break the graph
        _PARAMS_CACHE[key] = params
    return params


def _check_tensor_amax(tensor_amax: torch.Tensor | float | None, fmt: BlockFormat,
                       device: torch.device) -> torch.Tensor | None:
    if tensor_amax is None:
        return None
    if not fmt.tensor_scale:
        raise ValueError(
            f"tensor_amax sets the per-tensor scale of two-level formats (nvfp4); {fmt.name} "
            "has none. Drop tensor_amax"
        )
    amax_t = torch.as_tensor(tensor_amax, dtype=torch.float32).detach().reshape(())
    if amax_t.device.type == "cpu":
        value = float(amax_t)
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"tensor_amax must be finite and >= 0, got {value}")
    return amax_t.to(device)


def _check_rounding(rounding: str) -> None:
    if rounding not in ("nearest", "stochastic"):
        raise ValueError(f"unknown rounding {rounding!r}; use 'nearest' or 'stochastic'")


def quantize_blocks(
    x: torch.Tensor,
    fmt: BlockFormat,
    rounding: Rounding = "nearest",
    axis: int = -1,
    generator: torch.Generator | None = None,
    out: torch.Tensor | None = None,
    tensor_amax: torch.Tensor | float | None = None,
    random_key: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Quantize ``x`` to block format ``fmt`` and return the dequantized float32 values
    (same shape and device): each element rounded onto the element grid after division
    by its block's scale, times that scale. ``dtype=torch.bfloat16`` writes them as
    BF16 instead, in the same pass, for formats whose values all are BF16 values
    (:attr:`BlockFormat.bf16_values`: MX), as a GEMM on BF16 kernels takes them.

    Blocks run along ``axis`` (1-D block shapes) or tile the last two dimensions (2-D
    shapes; ``axis=-2`` transposes the tile). ``rounding="stochastic"`` rounds elements
    to one of their two grid neighbours, unbiased (scales are always chosen
    deterministically), with bits from ``generator``. ``tensor_amax`` replaces the
    current amax in NVFP4's per-tensor scale (delayed scaling). ``out`` receives the result.
    ``random_key`` replaces the draw from ``generator`` (see :func:`mixprec.quantize`).
    """
    x = _check_tensor(x)
    _check_rounding(rounding)
    if out is not None:
        if not isinstance(out, torch.Tensor) or out.dtype != torch.float32:
            raise TypeError("out must be a float32 torch.Tensor")
        if out.shape != x.shape or out.device != x.device:
            raise ValueError(
                f"out must match x's shape {tuple(x.shape)} and device {x.device}, got "
                f"{tuple(out.shape)} on {out.device}"
            )
    if dtype != torch.float32:
        if dtype != torch.bfloat16 or not fmt.bf16_values:
            raise ValueError(
                f"block format {fmt.name}: values can be returned as float32"
                f"{' or bfloat16' if fmt.bf16_values else ''}, not {dtype}"
                f"{'' if fmt.bf16_values else ' (its values are not all BF16 values)'}; pass dtype=torch.float32")
        if out is not None:
            raise ValueError("out is float32; pass dtype=torch.bfloat16 without out")
    amax_t = _check_tensor_amax(tensor_amax, fmt, x.device)
    strided = _native_strided(x, fmt, axis, dtype)
    if strided is not None:
        # MX blocks along a dimension that is not the last: read where they lie
        return _finish(_strided_pow2(x, fmt, rounding, generator, random_key, dtype, *strided), out, False,
                       strided[0], x.dim())
    # a 16-bit x stays 16-bit: the kernels widen it as they read it
    moved, dims, moved_shape, axis = blocked_view(x, fmt, axis, keep_dtype=True)
    if moved.numel() == 0:
        result = restore_layout(moved.to(dtype, copy=True), axis, x.dim())
        return out.copy_(result) if out is not None else result
    key = _key(generator, x.device, random_key) if rounding == "stochastic" else None
    x4 = block_kernels.blocked(moved, dims)
    params = _block_params(fmt, x.device)
    direct = (
        out is not None and axis == x.dim() - 1 and out.is_contiguous()
        and out.data_ptr() != x.data_ptr()
    )
    target = out if direct else torch.empty(moved_shape, dtype=dtype, device=x.device)
    assert target is not None
    _round_blocks(fmt, x4, params, rounding, key, amax_t, block_kernels.blocked(target, dims))
    return _finish(target, out, direct, axis, x.dim())


def quantize_blocks_factored(
    x: torch.Tensor,
    fmt: BlockFormat,
    rounding: Rounding = "nearest",
    axis: int = -1,
    random_key: torch.Tensor | None = None,
    tensor_amax: torch.Tensor | float | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`quantize_blocks` of a two-level format (NVFP4) as its two factors: the
    values without the FP32 tensor scale (each element times its block scale: exact in
    float32, and BF16 values where :attr:`BlockFormat.block_bf16_values`) and that
    tensor scale, a 0-d float32 tensor, as NVFP4 hardware multiplies them: the block
    products in the tensor cores, the two operands' tensor scales on the FP32 sum
    (``alpha``). The same elements and scales as :func:`quantize_blocks`, whose values
    are ``element * (tensor_scale * block_scale)`` rounded to float32. Formats without
    a tensor scale return :func:`quantize_blocks`' values and None. ``dtype=
    torch.bfloat16`` returns the first factor as BF16 (formats whose block products
    are BF16 values: exact), written by the rounding pass itself where the native
    kernel runs, for a GEMM on BF16 units."""
    if dtype != torch.float32 and not (dtype == torch.bfloat16 and fmt.tensor_scale and fmt.block_bf16_values):
        raise ValueError(f"block format {fmt.name}: the unscaled values can be float32"
                         f"{' or bfloat16' if fmt.tensor_scale and fmt.block_bf16_values else ''}, not {dtype}; "
                         "pass dtype=torch.float32")
    if not fmt.tensor_scale:
        return quantize_blocks(x, fmt, rounding, axis=axis, random_key=random_key), None
    x, moved, dims, moved_shape, axis, key, amax_t = checked_blocks(x, fmt, rounding, axis, None, tensor_amax,
                                                                    random_key, keep_dtype=True)
    if moved.numel() == 0:
        return restore_layout(moved.float(), axis, x.dim()), torch.ones((), device=x.device)
    x4 = block_kernels.blocked(moved, dims)
    direct = dtype == torch.float32 or _native_amax(x4, dtype)
    target = torch.empty(moved_shape, dtype=dtype if direct else torch.float32, device=x.device)
    tensor_scale = _round_blocks(fmt, x4, _block_params(fmt, x.device), rounding, key, amax_t,
                                 block_kernels.blocked(target, dims), unscaled=True)
    assert tensor_scale is not None
    values = target if direct else target.to(dtype)
    return restore_layout(values, axis, x.dim()), tensor_scale.reshape(())


def _dtypes(*tensors: torch.Tensor) -> str:
    return "_".join(str(t.dtype)[6:] for t in tensors)


def _run_kind(entry: str, kind: str, x: torch.Tensor, *args: Any) -> Any:
    """Block kernel ``entry`` (:data:`mixprec.core.kernels._ENTRIES`) as a compiled
    variant of its own per ``kind`` (the dtypes and constants it is specialised on):
    one entry called with float32, BF16 and FP16 operands, several scale rules and
    flags would run past dynamo's limit of 8 recompilations of one function, after
    which it refuses to compile (and "auto" falls back to eager for good)."""
    return run_variant(f"{entry}_{kind}", _ENTRIES[entry], x, *args)


def _native_amax(x4: torch.Tensor, out_dtype: torch.dtype | None) -> bool:
    """Whether a block quantization with amax scales of blocked ``x4`` runs the native
    kernel (:mod:`mixprec.core.native`): the ``"auto"`` backend (``"compiled"`` keeps
    inductor's kernels, ``"eager"`` torch's operations), a contiguous float32 or BF16
    CPU tensor outside a user's ``torch.compile``, float32 output (BF16 for blocks 16
    or 128 wide; None: codes alone), and a library built for this machine. Outputs are
    the callers' fresh tensors or a checked contiguous ``out``."""
    return (current_backend() == "auto" and x4.device.type == "cpu" and x4.dtype in (torch.float32, torch.bfloat16)
            and (out_dtype is None or out_dtype == torch.float32
                 or (out_dtype == torch.bfloat16 and native.writes_bf16(x4.shape[-1])))
            and not torch.compiler.is_compiling() and x4.is_contiguous() and native.available())


def _native_pow2(x4: torch.Tensor, out_dtype: torch.dtype | None) -> bool:
    """Whether a block quantization with power-of-two scales (:func:`_pow2_grid`) of
    blocked ``x4`` runs the native kernel: as :func:`_native_amax`, with float32 or BF16
    output (or None: codes alone) and blocks a multiple of 16 wide."""
    return (current_backend() == "auto" and x4.device.type == "cpu" and x4.dtype in (torch.float32, torch.bfloat16)
            and out_dtype in (None, torch.float32, torch.bfloat16) and x4.shape[-1] % 16 == 0
            and not torch.compiler.is_compiling() and x4.is_contiguous() and native.available())


def _native_strided(x: torch.Tensor, fmt: BlockFormat, axis: int,
                    dtype: torch.dtype) -> tuple[int, tuple[int, int, int]] | None:
    """The normalised axis and ``(outer, rows, inner)`` view of ``x`` where its
    quantization to ``fmt`` along ``axis`` runs :func:`mixprec.core.native.pow2_strided`:
    MX blocks of 32 along a dimension that is not the last (a GEMM's dgrad or wgrad
    operand), rows a multiple of 32 and the elements after them of 16, and
    :func:`_native_pow2`'s conditions; else None."""
    if len(fmt.block_shape) != 1 or fmt.block_shape[0] != 32 or not _pow2_grid(fmt):
        return None
    axis = _normalise_axis(fmt, axis, x.dim())
    if axis == x.dim() - 1 or x.numel() == 0 or not x.is_contiguous():
        return None
    outer, rows, inner = math.prod(x.shape[:axis]), x.shape[axis], math.prod(x.shape[axis + 1:])
    if rows % 32 or inner % 16 or not _native_pow2(x.view(-1, 16), dtype):
        return None
    return axis, (outer, rows, inner)


def _strided_pow2(x: torch.Tensor, fmt: BlockFormat, rounding: str, generator: torch.Generator | None,
                  random_key: torch.Tensor | None, dtype: torch.dtype, axis: int,
                  dims: tuple[int, int, int]) -> torch.Tensor:
    """:func:`quantize_blocks`' values in the moved layout (block axis last) by
    :func:`mixprec.core.native.pow2_strided` (see :func:`_native_strided`)."""
    moved_shape = tuple(x.shape[:axis]) + tuple(x.shape[axis + 1:]) + (x.shape[axis],)
    target = torch.empty(moved_shape, dtype=dtype)
    key = _key(generator, x.device, random_key) if rounding == "stochastic" else None
    pe, bp = _block_params(fmt, x.device)
    native.pow2_strided(x.detach(), target, pe, bp, key, dims, serial_threads(x.numel()))
    return target


def _round_blocks(
    fmt: BlockFormat,
    x4: torch.Tensor,
    params: tuple[torch.Tensor, ...],
    rounding: str,
    key: torch.Tensor | None,
    amax_t: torch.Tensor | None,
    out4: torch.Tensor,
    unscaled: bool = False,
) -> torch.Tensor | None:
    """Write blocked ``x4`` quantized to ``fmt`` into ``out4`` (blocked like it), in two
    compiled calls: the block scales, then one element-wise pass. Allocating calls come
    here with a fresh ``out4``: one compiled kernel per block shape and rounding.
    ``unscaled`` (two-level formats) writes element times block scale and leaves the
    tensor scale out of the values. Returns the tensor scale (None without one, and
    from the power-of-two paths)."""
    pe = params[0]
    stochastic = () if key is None else (key,)
    # the constants an amax-scale kernel is specialised on (each a compiled variant of its own)
    flags = f"{int(fmt.tensor_scale)}{int(amax_t is None)}{int(unscaled)}"
    if _pow2_grid(fmt):
        # power-of-two scales: x rounded onto each block's moved grid, writing the
        # dequantized values (no multiply by the scale and back)
        if _native_pow2(x4, out4.dtype) and out4.is_contiguous():
            # on the CPU: the hand-written kernel, one pass (mixprec.core.native)
            native.pow2_blocks(x4, out4, pe, params[1], key, serial_threads(x4.numel()))
            return None
        if rounding == "nearest" and x4.device.type == "cpu" and not torch.compiler.is_compiling():
            # one pass in float arithmetic; the rare blocks whose grid reaches below
            # float32's normals again by the integer kernel. A data-dependent branch,
            # so not on devices (a sync) nor inside a user's torch.compile.
            amax, tiny = _run_kind("pow2_nearest_fused", f"{fmt.scale_rule}_{_dtypes(x4, out4)}", x4, params[1], pe,
                                   fmt.scale_rule, out4)  # type: ignore[misc]
            if bool(tiny):
                groups = block_kernels.tiny_groups(amax, params[1], pe)
                few = x4[groups].float()
                grid = block_kernels.pow2_grid(few, params[1], pe)
                out4[groups] = block_kernels.round_pow2_grid(few, *grid, pe[0], None).to(out4.dtype)
            return None
        grid = _run_kind("pow2_grid", _dtypes(x4), x4, params[1], pe)
        _run_kind(f"pow2_{rounding}_out", _dtypes(x4, out4), x4, *grid, pe, *stochastic, out4)  # type: ignore[misc]
        return None
    zero_below = _zero_below(fmt, pe)
    tensor_scale = None
    if fmt.scale_rule not in block_kernels.RULE_IDS and _native_amax(x4, out4.dtype):
        # amax scales on the CPU: the hand-written kernel, one pass (mixprec.core.native)
        return native.amax_blocks(x4, out4, pe, params[1], params[2], fmt.tensor_scale, amax_t, unscaled, key,
                                  serial_threads(x4.numel()))
    if fmt.scale_rule not in block_kernels.RULE_IDS and zero_below:
        # amax scales: one float multiply by the block's factor, x under the block's
        # flush floor zeroed first (no subnormal product)
        scales = _run_kind("amax_floor_scales", f"{flags}_{_dtypes(x4)}", x4, *params[1:], fmt.tensor_scale, amax_t,
                           unscaled)  # type: ignore[arg-type]
        full, factor, floor, tensor_scale = scales  # type: ignore[misc]
        _run_kind(f"flushed_{rounding}_out", _dtypes(x4, out4), x4, factor, floor, full, pe, *stochastic, out4)
        return tensor_scale
    if fmt.scale_rule in block_kernels.RULE_IDS:
        full, factor = _run_kind("pow2_scales", _dtypes(x4), x4, params[1])  # type: ignore[misc]
    else:
        scales = _run_kind("amax_scales", f"{flags}_{_dtypes(x4)}", x4, *params[1:], fmt.tensor_scale, amax_t, unscaled)  # type: ignore[arg-type]
        full, factor, tensor_scale = scales  # type: ignore[misc]
    _run_kind(f"blocks_{rounding}_out", f"{int(zero_below)}_{_dtypes(x4, out4)}", x4, factor, full, pe, zero_below,
              *stochastic, out4)  # type: ignore[arg-type]
    return tensor_scale


def _finish(target: torch.Tensor, out: torch.Tensor | None, direct: bool, axis: int, ndim: int) -> torch.Tensor:
    """The result written into ``target`` (``out`` itself when ``direct``), in x's layout
    and in ``out`` when one was given."""
    if direct:
        return target
    result = restore_layout(target, axis, ndim)
    if out is not None:
        return out.copy_(result)
    return result


def checked_blocks(
    x: torch.Tensor, fmt: BlockFormat, rounding: str, axis: int, generator: torch.Generator | None,
    tensor_amax: torch.Tensor | float | None, random_key: torch.Tensor | None, keep_dtype: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int, int], tuple[int, ...], int, torch.Tensor | None,
           torch.Tensor | None]:
    """The checked arguments of a block quantizer: x, its :func:`blocked_view` (moved x,
    block dims, moved shape, normalised axis), the stochastic-rounding key (None to
    nearest) and the tensor amax."""
    x = _check_tensor(x)
    _check_rounding(rounding)
    amax_t = _check_tensor_amax(tensor_amax, fmt, x.device)
    moved, dims, moved_shape, axis = blocked_view(x, fmt, axis, keep_dtype)
    key = _key(generator, x.device, random_key) if rounding == "stochastic" else None
    return x, moved, dims, moved_shape, axis, key, amax_t


def block_parts(
    x: torch.Tensor,
    fmt: BlockFormat,
    rounding: Rounding = "nearest",
    axis: int = -1,
    generator: torch.Generator | None = None,
    tensor_amax: torch.Tensor | float | None = None,
    random_key: torch.Tensor | None = None,
) -> BlockParts:
    """The element values and scales :func:`quantize_blocks` multiplies (eager kernels,
    the same arithmetic); ``BlockParts.dequantize()`` equals ``quantize_blocks`` bit for bit."""
    x, moved, dims, moved_shape, axis, key, amax_t = checked_blocks(x, fmt, rounding, axis, generator,
                                                                    tensor_amax, random_key)
    x4 = moved.reshape(-1, *dims)
    params = _block_params(fmt, x.device)
    with torch.no_grad():
        zero_below = _zero_below(fmt, params[0])
        if fmt.scale_rule in block_kernels.RULE_IDS:
            elements, scales = block_kernels.pow2_parts(x4, params[0], params[1], key, zero_below)
            tensor_scale = None
        else:
            elements, scales, tensor_scale = block_kernels.amax_parts(
                x4, params[0], params[1], params[2], key, fmt.tensor_scale, amax_t, zero_below
            )
    return BlockParts(elements, scales, tensor_scale, moved_shape, tuple(x.shape), axis)


@dataclass(frozen=True)
class BlockCounts:
    """What rounding to a block format does to a tensor's values (round to nearest even,
    each value against its own block's scale, as :func:`quantize_blocks` picks it):

    - ``flushed``: nonzero values that round to zero in their block (below half the
      element format's smallest subnormal times the block scale);
    - ``subnormal``: values that round to a nonzero element below the element format's
      smallest normal (fewer significant bits);
    - ``clipped``: values that saturate at the block's largest value: to nearest they
      would round past ``element.largest`` times the block scale. Only scale rules that
      do not round the scale up clip: OCP's floor rule when amax's significand exceeds
      the element's largest one (an E2M1 block whose amax is ``7.5 * 2**k`` clips it to
      ``6 * 2**k``); never ``rceil`` or ``ceil``, and the ``amax`` rule only where the
      scale's own rounding goes down by more than half an element step.

    ``numel`` counts every value and ``nonzero`` those that are not zero (NaN and Inf
    included, as :class:`mixprec.stats.TensorCounts` counts them); blocks holding NaN
    or Inf read back NaN and count in neither share."""

    numel: int
    nonzero: int
    flushed: int
    subnormal: int
    clipped: int


def block_counts(
    x: torch.Tensor,
    fmt: BlockFormat,
    axis: int = -1,
    tensor_amax: torch.Tensor | float | None = None,
) -> BlockCounts:
    """Count the values of ``x`` that flush, are subnormal or clip in ``fmt``
    (:class:`BlockCounts`), with the block scales :func:`block_parts` uses (same
    kernels) and rounding to nearest even. Raises as :func:`quantize_blocks` does for a
    dimension that is not a multiple of the block extent. Synchronises with x's device
    once."""
    x = _check_tensor(x)
    amax_t = _check_tensor_amax(tensor_amax, fmt, x.device)
    moved, dims, _, _ = blocked_view(x, fmt, axis)
    numel = moved.numel()
    if numel == 0:
        return BlockCounts(0, 0, 0, 0, 0)
    x4 = moved.reshape(-1, *dims)
    params = _block_params(fmt, x.device)
    elem = fmt.element
    with torch.no_grad():
        zero_below = _zero_below(fmt, params[0])
        if fmt.scale_rule in block_kernels.RULE_IDS:
            _, factor = block_kernels.pow2_scales(x4, params[1])
        else:
            _, _, factor = block_kernels.amax_scales(x4, params[1], params[2], fmt.tensor_scale, amax_t)
        counts = block_kernels.range_counts(
            x4, factor, _params(elem, "inf", x.device), zero_below, elem.smallest_normal
        )
        nonzero = (x4 != 0).sum()
        flushed, subnormal, clipped, nonzero_ = torch.cat([counts, nonzero.reshape(1)]).tolist()
    return BlockCounts(numel, nonzero_, flushed, subnormal, clipped)
