"""Real bytes for block formats: element codes and block scales, packed as hardware
and torchao lay them out, and back.

- FP4 elements (E2M1): two codes per byte, the first element in the low nibble (torch's
  ``float4_e2m1fn_x2`` and torchao's ``pack_uint4`` order).
- FP6 elements (E2M3, E3M2): packed densely, four codes in three bytes (little-endian
  24-bit groups: element 0 in bits 0-5 of the group), as MX hardware stores them.
- FP8 elements (E4M3, E5M2): one byte each, in torch's float8 dtypes.
- Scales: E8M0 one byte per block (``torch.float8_e8m0fnu``), E4M3 one byte
  (``torch.float8_e4m3fn``), FP32 four bytes; NVFP4 adds one FP32 tensor scale.

A block whose scale is NaN (it held a NaN or an Inf) stores zero codes: the NaN scale
alone makes the block read back as NaN, and FP4/FP6 codes have no NaN.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

from mixprec.core import block_kernels, native
from mixprec.core.block_quantize import (
    _block_params,
    _native_amax,
    _native_pow2,
    _pow2_grid,
    _zero_below,
    checked_blocks,
    restore_layout,
)
from mixprec.core.formats import BlockFormat, FloatFormat
from mixprec.core.kernels import current_backend, run_variant, serial_threads
from mixprec.core.quantize import Rounding

__all__ = ["PackedBlocks", "pack_blocks", "quantize_packed", "unpack_blocks"]


@dataclass(frozen=True)
class PackedBlocks:
    """A block-format tensor in real storage: ``codes`` (uint8 or a torch float8 dtype,
    flat, the block axis last), ``scales`` (one per block, shape ``(groups, h)``),
    ``tensor_scale`` (NVFP4's FP32 scale, else None), and the original ``shape`` and
    ``axis`` of the blocks. :attr:`nbytes` counts every byte of it."""

    format: BlockFormat
    codes: torch.Tensor
    scales: torch.Tensor
    tensor_scale: torch.Tensor | None
    shape: tuple[int, ...]
    moved_shape: tuple[int, ...]
    axis: int

    @property
    def nbytes(self) -> int:
        """Bytes of codes, block scales and tensor scale (mxfp4 on N elements: N/2 + N/32)."""
        total = self.codes.numel() * self.codes.element_size()
        total += self.scales.numel() * self.scales.element_size()
        if self.tensor_scale is not None:
            total += self.tensor_scale.numel() * self.tensor_scale.element_size()
        return total


def _element_codes(values: torch.Tensor, element: FloatFormat) -> torch.Tensor:
    from mixprec.core.storage import _encode  # storage imports this module

    if element.torch_dtype is not None:
        return values.to(element.torch_dtype)
    if element.total_bits > 8:
        raise ValueError(
            f"element format {element.name} has {element.total_bits} bits; block storage packs "
            "element formats of at most 8 bits"
        )
    if element.total_bits == 4:
        # one code a byte, contiguous, so that the element pass vectorises;
        # :func:`_pair_nibbles` packs two a byte after it
        return _encode(values, element, torch.uint8)
    codes = _encode(values, element, torch.uint8).to(torch.int32)
    if element.total_bits == 6:
        quads = codes.view(-1, 4)
        group = quads[:, 0] | (quads[:, 1] << 6) | (quads[:, 2] << 12) | (quads[:, 3] << 18)
        return torch.stack([group & 0xFF, (group >> 8) & 0xFF, (group >> 16) & 0xFF], dim=1).reshape(-1).to(torch.uint8)
    return codes.to(torch.uint8)


def _pair_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes one a byte (an even number, contiguous) packed two a byte: element
    ``2i`` in the low nibble of byte ``i``, ``2i + 1`` in the high one. The pairs are
    read as little-endian int16 words (a view), so that every pass is contiguous: the
    element pass writing a stride-2 pattern ran 2x slower, unvectorised."""
    if sys.byteorder != "little":  # the int16 view would read each pair the other way round
        pairs = codes.reshape(-1, 2).to(torch.int32)
        return (pairs[:, 0] | (pairs[:, 1] << 4)).to(torch.uint8)
    # one compiled pass (measured on 1M codes: 0.28 ms against 0.52 ms for the eager chain)
    return run_variant("pair_nibbles", _pair_words, codes.reshape(-1).view(torch.int16))


def _pair_words(words: torch.Tensor) -> torch.Tensor:
    return ((words & 0xF) | ((words >> 4) & 0xF0)).to(torch.uint8)


def _split_bytes(packed: torch.Tensor) -> torch.Tensor:
    pairs = packed.to(torch.int16)
    return (pairs & 0xF) | ((pairs & 0xF0) << 4)


def _split_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`_pair_nibbles`: one 4-bit code a byte, contiguous."""
    if sys.byteorder != "little":
        pairs = packed.reshape(-1).to(torch.int32)
        return torch.stack([pairs & 0xF, pairs >> 4], dim=1).reshape(-1).to(torch.uint8)
    # one compiled pass, as _pair_nibbles
    return run_variant("split_nibbles", _split_bytes, packed.reshape(-1)).view(torch.uint8)


def _element_values(codes: torch.Tensor, element: FloatFormat) -> torch.Tensor:
    """Element codes (4-bit ones one a byte, :func:`_split_nibbles`) as float32 values."""
    from mixprec.core.storage import _decode

    if element.torch_dtype is not None:
        return codes.float()
    packed = codes.to(torch.int32)
    if element.total_bits == 4:
        unpacked = packed
    elif element.total_bits == 6:
        triples = packed.view(-1, 3)
        group = triples[:, 0] | (triples[:, 1] << 8) | (triples[:, 2] << 16)
        unpacked = torch.stack([(group >> shift) & 0x3F for shift in (0, 6, 12, 18)], dim=1).reshape(-1)
    else:
        unpacked = packed
    return _decode(unpacked.to(torch.uint8), element)


def pack_blocks(x: torch.Tensor, fmt: BlockFormat, axis: int = -1) -> PackedBlocks:
    """Quantize ``x`` to ``fmt`` (nearest) and pack elements and scales into bytes."""
    return quantize_packed(x, fmt, axis=axis, with_values=False)[1]


def _pack_kernel(element: FloatFormat, zero_below: bool, with_values: bool,
                 values_dtype: torch.dtype = torch.float32) -> Callable[..., tuple[torch.Tensor | None, torch.Tensor]]:
    """The element pass of :func:`quantize_packed` for one element format: blocked
    ``x4`` times its block's ``factor`` rounded onto the element grid ``pe``, returned
    as packed codes (zero in a block whose scale is NaN) and, ``with_values``, as
    dequantized values (``element * full``) in ``values_dtype``."""

    def pack(x4: torch.Tensor, factor: torch.Tensor, floor: torch.Tensor, full: torch.Tensor, pe: torch.Tensor,
             key: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor]:
        if key is None and zero_below:
            # to nearest in float arithmetic: round_elements' results in a third of its
            # operations (block_kernels.flushed_nearest; measured on 1M E4M3 codes 0.8
            # against 1.4 ms)
            elements = block_kernels.flushed_nearest(x4.float(), factor, floor, pe)
        else:
            elements = block_kernels.round_elements(x4.float(), factor, pe, key, zero_below)
        # x != x: NaN, as a vector compare (inductor runs isnan element by element)
        bad = (full != full) | (elements != elements)
        kept = torch.where(bad, 0.0, elements)
        # FP4 and FP8 codes element by element in the blocked layout (a flat view
        # first made inductor write the elements to memory and encode them in a second
        # loop); FP6 packs four codes in three bytes, from the flat order
        codes = _element_codes(kept.reshape(-1) if element.total_bits == 6 else kept, element)
        return ((elements * full).to(values_dtype) if with_values else None), codes.reshape(-1)

    return pack


def _scales_kernel(pow2: bool) -> Callable[..., tuple[torch.Tensor | None, ...]]:
    """The scale pass of :func:`quantize_packed`: block scales and factors
    (:func:`block_kernels.pow2_scales` or :func:`block_kernels.amax_scales`) of a
    blocked x of any float dtype, widened to float32 as it is read."""

    def scales(x4: torch.Tensor, *args: object) -> tuple[torch.Tensor | None, ...]:
        if pow2:
            scale, factor = block_kernels.pow2_scales(x4.float(), *args)  # type: ignore[arg-type]
            return scale, factor, block_kernels.flush_floor(factor)
        block, tensor_scale, factor = block_kernels.amax_scales(x4.float(), *args)  # type: ignore[arg-type]
        return block, tensor_scale, factor, block_kernels.flush_floor(factor)

    return scales


def quantize_packed(
    x: torch.Tensor,
    fmt: BlockFormat,
    rounding: Rounding = "nearest",
    axis: int = -1,
    generator: torch.Generator | None = None,
    tensor_amax: torch.Tensor | float | None = None,
    random_key: torch.Tensor | None = None,
    with_values: bool = True,
    values_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor | None, PackedBlocks]:
    """``x`` quantized to block format ``fmt`` as :func:`mixprec.core.block_quantize.quantize_blocks`
    quantizes it (same arguments), returned twice: the dequantized float32 values (x's
    shape) and their real storage (:class:`PackedBlocks`), made in two passes over x (the
    block scales, then one pass writing values and codes; compiled where
    :func:`mixprec.core.kernels.run_variant` compiles), which is what training needs
    of each operand: values to multiply, bytes to keep for backward. ``with_values=False``
    returns None for the values (a caller that decodes the codes later, with
    :func:`unpack_blocks`, in the dtype its GEMM multiplies); ``values_dtype=
    torch.bfloat16`` writes them as BF16 (exact only where the format's values are BF16
    values, :attr:`BlockFormat.bf16_values`: the caller vouches for that)."""
    # A 16-bit x stays 16-bit (moved, where its block axis is not last, in its own
    # dtype) and is widened by the kernels as they read it: with vector bit casts
    # (mixprec.core.vector_bitcasts) that ran 1.1-1.3x faster than a widening pass first
    # (1M BF16 elements: MXFP8 1.21 against 1.58 ms, MXFP4 2.00 against 2.22, NVFP4 2.58
    # against 2.83); without them it had been the other way round, except for NVFP4.
    x, moved, dims, moved_shape, axis, key, amax_t = checked_blocks(
        x, fmt, rounding, axis, generator, tensor_amax, random_key, keep_dtype=True)
    x4 = block_kernels.blocked(moved, dims)
    params = _block_params(fmt, x.device)
    pow2 = fmt.scale_rule in block_kernels.RULE_IDS
    width = str(x4.dtype)[6:]
    if not pow2 and values_dtype == torch.float32 and native.packs(fmt.element, dims[2]) and _native_amax(x4, None):
        # amax scales on the CPU: values, codes and scales in one native pass
        return _native_packed(x, x4, fmt, params, key, amax_t, with_values, moved_shape, axis)
    if (pow2 and _pow2_grid(fmt) and fmt.element.total_bits in (4, 8)
            and _native_pow2(x4, values_dtype if with_values else None)):
        # power-of-two scales on the CPU: values, codes and scales in one native pass
        return _native_packed(x, x4, fmt, params, key, amax_t, with_values, moved_shape, axis, values_dtype)
    if pow2:
        scales, factor, floor = run_variant(f"pow2_scales_{width}", _scales_kernel(pow2), x4, params[1])
        full, tensor_scale = scales, None
    else:
        scales, tensor_scale, factor, floor = run_variant(f"amax_scales_{width}", _scales_kernel(pow2), x4,
                                                          *params[1:], fmt.tensor_scale, amax_t)
        full = scales if tensor_scale is None else tensor_scale * scales
    zero_below = _zero_below(fmt, params[0])
    # BF16 values beside the codes cost the pass little (1M MXFP4 or MXFP8 elements:
    # +0.02-0.1 ms; viewing the blocks 16 wide, as unpack_blocks does, cost +0.5)
    groups, _, h, _ = x4.shape
    kernel = _pack_kernel(fmt.element, zero_below, with_values, values_dtype)
    name = (f"pack_{fmt.element.name}_{int(zero_below)}_{rounding}_{width}"
            f"{'_values_' + str(values_dtype)[6:] if with_values else ''}")
    values4, codes = run_variant(name, kernel, x4, factor, floor, full, params[0], key)
    if fmt.element.total_bits == 4:
        codes = _pair_nibbles(codes)
    scale_dtype = fmt.scale.torch_dtype if fmt.scale.torch_dtype is not None else torch.float32
    packed = PackedBlocks(fmt, codes, scales.reshape(groups, h).to(scale_dtype),  # exact: on the scale grid
                          None if tensor_scale is None else tensor_scale.reshape(1).clone(),
                          tuple(x.shape), moved_shape, axis)
    if values4 is None:
        return None, packed
    return restore_layout(values4.reshape(moved_shape), axis, x.dim()), packed


def _native_packed(x: torch.Tensor, x4: torch.Tensor, fmt: BlockFormat, params: tuple[torch.Tensor, ...],
                   key: torch.Tensor | None, amax_t: torch.Tensor | None, with_values: bool,
                   moved_shape: tuple[int, ...], axis: int,
                   values_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor | None, PackedBlocks]:
    """:func:`quantize_packed` by :func:`mixprec.core.native.amax_blocks` (amax scales)
    or :func:`mixprec.core.native.pow2_blocks` (power-of-two scales, values float32 or
    BF16): the same values, codes and scales as the compiled pack and scale kernels."""
    groups, _, h, _ = x4.shape
    element = fmt.element
    values4 = torch.empty(x4.shape, dtype=values_dtype) if with_values else None
    codes = torch.empty(x4.numel() * element.total_bits // 8, dtype=torch.uint8)
    scales = torch.empty((groups, h), dtype=torch.float32)
    threads = serial_threads(x4.numel())
    if fmt.scale_rule in block_kernels.RULE_IDS:
        native.pow2_blocks(x4, values4, params[0], params[1], key, threads, scales=scales, codes=codes,
                           element=element)
        tensor_scale = None
    else:
        tensor_scale = native.amax_blocks(x4, values4, *params, fmt.tensor_scale, amax_t, False, key, threads,
                                          scales=scales, codes=codes, element=element)
    if element.torch_dtype is not None:
        codes = codes.view(element.torch_dtype)
    scale_dtype = fmt.scale.torch_dtype if fmt.scale.torch_dtype is not None else torch.float32
    packed = PackedBlocks(fmt, codes, scales.to(scale_dtype), None if tensor_scale is None else tensor_scale.reshape(1),
                          tuple(x.shape), moved_shape, axis)
    if values4 is None:
        return None, packed
    return restore_layout(values4.reshape(moved_shape), axis, x.dim()), packed


def unpack_blocks(packed: PackedBlocks, fmt: BlockFormat | object, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dequantized float32 values of ``packed``, in its original shape (as ``dtype``:
    rounded once from float32, decoded in one pass; exact in bfloat16 for MX formats)."""
    if not isinstance(packed, PackedBlocks):
        raise TypeError(
            f"a block format is stored as PackedBlocks, but got {type(packed).__name__}; pass "
            "what to_storage returned for this format"
        )
    if fmt != packed.format:
        raise ValueError(
            f"these blocks were packed as {packed.format.name}, not {getattr(fmt, 'name', fmt)}; "
            f"pass format {packed.format.name!r}"
        )
    block = packed.format.block_shape
    rows, cols = (1, block[0]) if len(block) == 1 else block
    element = packed.format.element
    two_level = packed.tensor_scale is not None
    block_scales = packed.scales
    if _native_unpack(packed, cols, dtype):
        groups, h = block_scales.shape
        moved = torch.empty(packed.moved_shape, dtype=dtype)
        native.unpack_blocks(packed.codes, element.total_bits, _value_table(element), block_scales.float(),
                             packed.tensor_scale, moved, (groups, rows, h, cols), serial_threads(moved.numel()))
        return restore_layout(moved, packed.axis, len(packed.shape))
    codes = _split_nibbles(packed.codes) if element.total_bits == 4 else packed.codes
    if element.total_bits != 6:  # one code a byte: blocked, with the block extents static
        if dtype.itemsize == 2 and cols > _NARROW_COLS and cols % _NARROW_COLS == 0:
            # 16-bit output: decoded as blocks 16 wide, each with its block's scale
            # (inductor writes a 16-bit output of wider rows in register pairs, 3x
            # slower: measured 1.19 against 0.45 ms on 1M MXFP4 codes)
            block_scales = block_scales.float().repeat_interleave(cols // _NARROW_COLS, dim=1)
            cols = _NARROW_COLS
        codes = block_kernels.blocked(codes, (rows, block_scales.shape[1], cols))
    kernel = _unpack_kernel(element, rows, cols, two_level, dtype)
    scales = (block_scales,) if not two_level else (block_scales, packed.tensor_scale)
    name = f"unpack_{element.name}_{rows}x{cols}_{int(two_level)}_{str(dtype)[6:]}"
    moved = run_variant(name, kernel, codes, *scales)
    return restore_layout(moved.reshape(packed.moved_shape), packed.axis, len(packed.shape))


def _native_unpack(packed: PackedBlocks, cols: int, dtype: torch.dtype) -> bool:
    """Whether :func:`unpack_blocks` decodes by the native kernel: 4- or 8-bit codes in
    blocks a multiple of 16 wide, on the CPU, into float32 or BF16, under the ``"auto"``
    backend, outside a user's ``torch.compile``, with the library built."""
    return (packed.format.element.total_bits in (4, 8) and cols % 16 == 0 and packed.codes.device.type == "cpu"
            and dtype in (torch.float32, torch.bfloat16) and packed.codes.is_contiguous()
            and current_backend() == "auto" and not torch.compiler.is_compiling() and native.available())


_value_tables: dict[FloatFormat, torch.Tensor] = {}


def _value_table(element: FloatFormat) -> torch.Tensor:
    """The float32 value of each of ``element``'s codes (4 or 8 bits), decoded by
    :func:`_element_values` itself (cached)."""
    table = _value_tables.get(element)
    if table is None:
        codes = torch.arange(2**element.total_bits, dtype=torch.int32).to(torch.uint8)
        if element.torch_dtype is not None:
            codes = codes.view(element.torch_dtype)
        table = _element_values(codes, element).contiguous()
        _value_tables[element] = table
    return table


_NARROW_COLS = 16  # one AVX-512 register of float32


def _unpack_kernel(element: FloatFormat, rows: int, cols: int, two_level: bool,
                   dtype: torch.dtype = torch.float32) -> Callable[..., torch.Tensor]:
    """The decoding pass of :func:`unpack_blocks` for one element format and block
    shape: codes times their block's scale (and the tensor scale), blocked
    ``(groups, rows, h, cols)``."""

    def unpack(codes: torch.Tensor, scales: torch.Tensor, tensor_scale: torch.Tensor | None = None) -> torch.Tensor:
        # codes arrive blocked (groups, rows, h, cols), or flat (FP6: packed four in three bytes)
        groups, h = scales.shape
        elements = _element_values(codes, element).view(groups, rows, h, cols)
        full = scales.float().view(groups, 1, h, 1)
        if two_level:
            assert tensor_scale is not None
            full = tensor_scale.reshape(()) * full
        return (elements * full).to(dtype)

    return unpack
