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

from dataclasses import dataclass

import torch

from mixprec.core.block_quantize import block_parts, restore_layout
from mixprec.core.formats import BlockFormat, FloatFormat

__all__ = ["PackedBlocks", "pack_blocks", "unpack_blocks"]


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
    codes = _encode(values, element, torch.uint8).to(torch.int32)
    if element.total_bits == 4:
        pairs = codes.view(-1, 2)
        return (pairs[:, 0] | (pairs[:, 1] << 4)).to(torch.uint8)
    if element.total_bits == 6:
        quads = codes.view(-1, 4)
        group = quads[:, 0] | (quads[:, 1] << 6) | (quads[:, 2] << 12) | (quads[:, 3] << 18)
        return torch.stack([group & 0xFF, (group >> 8) & 0xFF, (group >> 16) & 0xFF], dim=1).reshape(-1).to(torch.uint8)
    return codes.to(torch.uint8)


def _element_values(codes: torch.Tensor, element: FloatFormat) -> torch.Tensor:
    from mixprec.core.storage import _decode

    if element.torch_dtype is not None:
        return codes.float()
    packed = codes.to(torch.int32)
    if element.total_bits == 4:
        unpacked = torch.stack([packed & 0xF, packed >> 4], dim=1).reshape(-1)
    elif element.total_bits == 6:
        triples = packed.view(-1, 3)
        group = triples[:, 0] | (triples[:, 1] << 8) | (triples[:, 2] << 16)
        unpacked = torch.stack([(group >> shift) & 0x3F for shift in (0, 6, 12, 18)], dim=1).reshape(-1)
    else:
        unpacked = packed
    return _decode(unpacked.to(torch.uint8), element)


def pack_blocks(x: torch.Tensor, fmt: BlockFormat, axis: int = -1) -> PackedBlocks:
    """Quantize ``x`` to ``fmt`` (nearest) and pack elements and scales into bytes."""
    parts = block_parts(x, fmt, axis=axis)
    groups, _, h, _ = parts.elements.shape
    nan_block = torch.isnan(parts.scales)
    elements = torch.where(nan_block, 0.0, parts.elements)  # the NaN scale carries the NaN
    codes = _element_codes(elements.reshape(-1), fmt.element)
    scales = parts.scales.reshape(groups, h)
    scale_dtype = fmt.scale.torch_dtype if fmt.scale.torch_dtype is not None else torch.float32
    scales = scales.to(scale_dtype)  # exact: the scales are on the scale format's grid
    tensor_scale = None if parts.tensor_scale is None else parts.tensor_scale.reshape(1).clone()
    return PackedBlocks(fmt, codes, scales, tensor_scale, parts.shape, parts.moved_shape, parts.axis)


def unpack_blocks(packed: PackedBlocks, fmt: BlockFormat | object) -> torch.Tensor:
    """The dequantized float32 values of ``packed``, in its original shape."""
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
    groups, h = packed.scales.shape
    elements = _element_values(packed.codes, packed.format.element).view(groups, rows, h, cols)
    scales = packed.scales.float().view(groups, 1, h, 1)
    full = scales if packed.tensor_scale is None else packed.tensor_scale.reshape(()) * scales
    moved = (elements * full).reshape(packed.moved_shape)
    return restore_layout(moved, packed.axis, len(packed.shape))
