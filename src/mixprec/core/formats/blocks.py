"""Block-scaled formats: low-precision elements that share one scale per block.

A :class:`BlockFormat` names an element format (a scalar :class:`FloatFormat`), the
block shape (1-D along one axis, or a 2-D tile of a matrix), the format each block's
scale is stored in, and the rule that picks the scale from the block's absolute
maximum (amax). NVFP4's second level, one FP32 scale per tensor, is a flag.

The named formats follow OCP Microscaling v1.0 (MXFP8/6/4: 32 elements, E8M0 scale),
NVIDIA's NVFP4 (16 E2M1 elements, E4M3 block scale, FP32 tensor scale) and DeepSeek-V3's
fine-grained FP8 (E4M3 in 1x128 or 128x128 blocks with FP32 scales). This module only
describes formats; :mod:`mixprec.core.block_quantize` does the arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from mixprec.core.formats.scalar import (
    FloatFormat,
    e2m1fn,
    e2m3fn,
    e3m2fn,
    e4m3,
    e5m2,
    e8m0fnu,
    fp32,
)

__all__ = [
    "ScaleRule",
    "SCALE_RULES",
    "BlockFormat",
    "mxfp8_e4m3",
    "mxfp8_e5m2",
    "mxfp6_e3m2",
    "mxfp6_e2m3",
    "mxfp4_e2m1",
    "nvfp4",
    "fp8_block128",
    "fp8_block128x128",
    "NAMED_BLOCK_FORMATS",
    "get",
]

ScaleRule = Literal["floor", "ceil", "rceil", "even", "amax"]
"""How a block's scale X comes from its absolute maximum ``amax``; ``emax`` is the
exponent of the element format's largest value, ``largest`` that value.

Power-of-two rules (for E8M0 scales; torchao's ``ScaleCalculationMode`` of the same names):

- ``"floor"``: OCP MX v1.0's rule, ``X = 2**(floor(log2(amax)) - emax)``. Elements
  between ``largest`` and ``2**(emax+1)`` are clamped to ``largest``.
- ``"ceil"``: ``X = 2**(ceil(log2(amax)) - emax)``; nothing clamps, small values lose a bit.
- ``"rceil"``: ``X = 2**ceil(log2(amax / largest))`` with the quotient rounded to float32
  (cuBLAS, Transformer Engine and torchao's RCEIL): the smallest power of two that
  keeps every element within ``largest``.
- ``"even"``: torchao's EVEN: amax rounded to the element's mantissa width first, then
  ``"floor"``.

``"amax"``: ``X = amax / largest`` in float32, rounded to the scale format (FP32 or
E4M3 scales: DeepSeek-V3, NVFP4), no lower than the scale format's smallest normal.
"""

SCALE_RULES: tuple[str, ...] = ("floor", "ceil", "rceil", "even", "amax")
_POW2_RULES = ("floor", "ceil", "rceil", "even")


@dataclass(frozen=True)
class BlockFormat:
    """A block-scaled format: ``element`` values that share one ``scale`` per block.

    ``block_shape`` is ``(n,)`` for blocks of n consecutive elements along one axis (the
    last by default, the contraction axis of a GEMM operand), or ``(rows, cols)`` for 2-D
    tiles of the last two dimensions (weights: NVFP4's 16x16, DeepSeek-V3's 128x128).
    ``scale`` is the format the block scales are stored in and ``scale_rule`` how they
    are chosen (:data:`ScaleRule`). ``tensor_scale=True`` adds NVFP4's second level: an
    FP32 scale per tensor, ``s = amax(tensor) / (scale.largest * element.largest)``, that
    the block scales are expressed in.

    Elements always saturate at ``element.largest`` (the OCP rule). A block that holds
    a NaN or an Inf gets a NaN scale, so the whole block reads back NaN; an all-zero
    block reads back as zeros. Build variants with :func:`dataclasses.replace` or
    :meth:`with_rule`.
    """

    name: str
    element: FloatFormat
    block_shape: tuple[int, ...]
    scale: FloatFormat
    scale_rule: ScaleRule = "floor"
    tensor_scale: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.element, FloatFormat) or not isinstance(self.scale, FloatFormat):
            raise TypeError(
                f"block format {self.name!r}: element and scale must be scalar FloatFormats "
                "(e.g. formats.e2m1fn, formats.e8m0fnu)"
            )
        shape = self.block_shape
        if (
            not isinstance(shape, tuple)
            or len(shape) not in (1, 2)
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in shape)
        ):
            raise ValueError(
                f"block format {self.name!r}: block_shape={shape!r} must be a tuple of one or "
                "two positive ints, e.g. (32,) or (16, 16)"
            )
        if self.scale_rule not in SCALE_RULES:
            raise ValueError(
                f"block format {self.name!r}: unknown scale_rule {self.scale_rule!r}; use one "
                f"of {', '.join(SCALE_RULES)}"
            )
        power_of_two_scale = self.scale.mantissa_bits == 0
        if self.scale_rule in _POW2_RULES and not (
            self.scale.exponent_bits == 8 and self.scale.bias == 127 and (power_of_two_scale or self.scale == fp32)
        ):
            raise ValueError(
                f"block format {self.name!r}: scale_rule {self.scale_rule!r} gives powers of two "
                "2**-127..2**127 and needs an E8M0 scale (formats.e8m0fnu) or an FP32 one "
                "(Transformer Engine's power-of-two FP32 block scales); use scale_rule='amax' "
                "for an E4M3 scale"
            )
        if self.scale_rule == "amax" and power_of_two_scale:
            raise ValueError(
                f"block format {self.name!r}: scale_rule 'amax' needs a scale format with "
                "mantissa bits (FP32, E4M3); use 'floor', 'ceil', 'rceil' or 'even' for E8M0"
            )
        if self.tensor_scale and self.scale_rule != "amax":
            raise ValueError(
                f"block format {self.name!r}: tensor_scale=True (NVFP4's two-level scaling) "
                "works with scale_rule='amax'"
            )

    @property
    def block_size(self) -> int:
        """Elements per block."""
        size = 1
        for n in self.block_shape:
            size *= n
        return size

    @property
    def bits_per_element(self) -> float:
        """Storage bits per element, scales included (the tensor scale not counted)."""
        return self.element.total_bits + self.scale.total_bits / self.block_size

    @property
    def power_of_two_scales(self) -> bool:
        """Whether every block scale is a power of two: the power-of-two rules (E8M0
        scales, or FP32 ones as Transformer Engine's FP8 block scaling keeps them)."""
        return self.scale_rule in _POW2_RULES

    @property
    def bf16_values(self) -> bool:
        """Whether every value (element times block scale) is a BF16 value, so that a
        GEMM may take the values as BF16 exactly: the element's and the scale's
        significands together hold at most BF16's 8 bits (MX and other power-of-two
        scales; NVFP4-style E2M1 elements under E4M3 scales) and there is no FP32
        tensor scale. (Blocks scaled below 2**-133, BF16's smallest subnormal, are the
        exception: far below any range a recipe scales into.)"""
        return not self.tensor_scale and self.block_bf16_values

    @property
    def block_bf16_values(self) -> bool:
        """Whether every element times its block scale is a BF16 value, leaving NVFP4's
        FP32 tensor scale aside: a GEMM may then take those as BF16 exactly and apply
        the two operands' tensor scales to its FP32 sum, as NVFP4 hardware does
        (:attr:`bf16_values` where there is no tensor scale)."""
        scale_bits = 1 if self.power_of_two_scales else self.scale.mantissa_bits + 1
        significant = (self.element.mantissa_bits + 1) + scale_bits - 1
        return self.scale.exponent_bits <= 8 and significant <= 8 and self.element.mantissa_bits <= 7

    def with_rule(self, scale_rule: ScaleRule) -> BlockFormat:
        """The same format with another scale rule, named ``"<name>:<rule>"``."""
        return replace(self, name=f"{self.name.split(':')[0]}:{scale_rule}", scale_rule=scale_rule)

    def __str__(self) -> str:
        return self.name


def _mx(element: FloatFormat, name: str) -> BlockFormat:
    return BlockFormat(name=name, element=element, block_shape=(32,), scale=e8m0fnu)


mxfp8_e4m3 = _mx(e4m3, "mxfp8_e4m3")
"""OCP MXFP8 with E4M3 elements: 32 per block, E8M0 scale, OCP's floor rule."""
mxfp8_e5m2 = _mx(e5m2, "mxfp8_e5m2")
"""OCP MXFP8 with E5M2 elements: 32 per block, E8M0 scale, floor rule; elements saturate."""
mxfp6_e3m2 = _mx(e3m2fn, "mxfp6_e3m2")
"""OCP MXFP6 with E3M2 elements (largest 28): 32 per block, E8M0 scale, floor rule."""
mxfp6_e2m3 = _mx(e2m3fn, "mxfp6_e2m3")
"""OCP MXFP6 with E2M3 elements (largest 7.5): 32 per block, E8M0 scale, floor rule."""
mxfp4_e2m1 = _mx(e2m1fn, "mxfp4_e2m1")
"""OCP MXFP4: E2M1 elements (largest 6), 32 per block, E8M0 scale, floor rule."""
nvfp4 = BlockFormat(
    name="nvfp4", element=e2m1fn, block_shape=(16,), scale=e4m3, scale_rule="amax",
    tensor_scale=True,
)
"""NVIDIA NVFP4: E2M1 elements in blocks of 16, an E4M3 scale per block and an FP32 scale
``amax / (448 * 6)`` per tensor (two-level). Weights use 16x16 tiles: ``nvfp4_16x16``."""
nvfp4_16x16 = replace(nvfp4, name="nvfp4_16x16", block_shape=(16, 16))
"""NVFP4 with 16x16 2-D block scales, as NVIDIA's pretraining recipe quantizes weights."""
fp8_block128 = BlockFormat(
    name="fp8_block128", element=e4m3, block_shape=(128,), scale=fp32, scale_rule="amax"
)
"""DeepSeek-V3's activation format: E4M3 in 1x128 blocks, FP32 scale ``amax / 448``.
``"fp8_block128:rceil"`` keeps the FP32 scales powers of two, as Transformer Engine's
``Float8BlockScaling`` does by default (its rule, ``448 / amax`` with the mantissa
zeroed, inverted, picks the same scale as ``rceil`` for every float32 amax: a quotient
within the window where the two roundings differ would need an amax between float32
neighbours)."""
fp8_block128x128 = replace(fp8_block128, name="fp8_block128x128", block_shape=(128, 128))
"""DeepSeek-V3's weight format: E4M3 in 128x128 tiles, FP32 scale ``amax / 448``
(``"fp8_block128x128:rceil"``: power-of-two FP32 scales, Transformer Engine's default)."""

NAMED_BLOCK_FORMATS: dict[str, BlockFormat] = {
    f.name: f
    for f in (mxfp8_e4m3, mxfp8_e5m2, mxfp6_e3m2, mxfp6_e2m3, mxfp4_e2m1, nvfp4, nvfp4_16x16,
              fp8_block128, fp8_block128x128)
}
"""The block formats mixprec names. A name may carry a scale rule, ``"mxfp8_e4m3:rceil"``."""


def get(fmt: str | BlockFormat) -> BlockFormat:
    """Look up a block format by name (``"mxfp4_e2m1"``, ``"nvfp4"``, ``"mxfp8_e4m3:rceil"``
    for another scale rule) or pass a :class:`BlockFormat` through unchanged."""
    if isinstance(fmt, BlockFormat):
        return fmt
    if not isinstance(fmt, str):
        raise TypeError(f"a block format is a name (str) or a BlockFormat, not {type(fmt).__name__}")
    key = fmt.strip().lower()
    base, _, rule = key.partition(":")
    if base not in NAMED_BLOCK_FORMATS:
        raise ValueError(
            f"unknown block format {fmt!r}; known names: {', '.join(NAMED_BLOCK_FORMATS)} "
            "(optionally ':<scale rule>', e.g. 'mxfp8_e4m3:rceil'), or build a BlockFormat"
        )
    found = NAMED_BLOCK_FORMATS[base]
    if not rule:
        return found
    if rule not in SCALE_RULES:
        raise ValueError(f"unknown scale rule {rule!r} in {fmt!r}; use one of {', '.join(SCALE_RULES)}")
    return found.with_rule(rule)  # type: ignore[arg-type]
