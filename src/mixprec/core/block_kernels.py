"""The block-scaled rounding kernels: per-block amax, the block's scale, and the elements
rounded onto their grid, fused by ``torch.compile`` (as :mod:`.kernels` does for scalar
formats; eager and compiled results are bit-identical).

A tensor arrives contiguous in the blocked layout ``(groups, rows, h, cols)``: a block is
``[g, :, j, :]``, so 1-D blocks of n are ``(-1, 1, 1, n)`` and 2-D tiles of a ``(..., R,
C)`` matrix are ``(-1, r, C / c, c)``. Everything runs in that layout: the amax is a
reduction over dims 1 and 3, the scale math runs once per block on ``(groups, 1, h, 1)``
tensors, and the elements are rounded by the scalar kernel (:func:`.kernels._round_bits`)
with the block scales broadcast over them. Reshaping to 1-D for the rounding would make
inductor index the scales by ``i // n`` and materialise intermediates (measured 3x
slower). The block extents ``rows`` and ``cols`` are marked static and ``groups`` and
``h`` stay dynamic (:func:`blocked`), so one compiled kernel per block shape serves every
tensor size with a vectorised inner loop over ``cols``. Two families of scale rules:

- power-of-two scales (E8M0; rules floor, ceil, even, rceil): computed exactly from the
  bits of amax, so ``x / X`` and ``q * X`` are exact float32 operations;
- ``amax`` scales (FP32 or E4M3; DeepSeek-V3, NVFP4): ``X = amax / largest`` rounded to
  the scale format, elements ``round(x * (1 / X))`` (NVFP4: ``x * ((1 / s) / X)`` with
  the tensor scale s), as torchao's ``nvfp4_quantize`` computes them.
"""

from __future__ import annotations

import torch

from mixprec.core.kernels import _ENTRIES, _round_bits

__all__ = ["RULE_IDS", "pow2_parts", "amax_parts", "blocked"]

RULE_IDS = {"floor": 0, "ceil": 1, "even": 2, "rceil": 3}
"""The power-of-two scale rules, as the kernel's rule parameter."""

_F32_TINY = 2.0**-126


def _pow2(k: torch.Tensor) -> torch.Tensor:
    """2**k as float32 for integer k in [-127, 127], built from bits (2**-127 is a float32
    subnormal; a shift is exact where ``exp2`` of a float might not be)."""
    subnormal = 1 << torch.clamp(k + 149, min=0, max=22)
    return torch.where(k >= -126, (k + 127) << 23, subnormal).to(torch.int32).view(torch.float32)


def _pow2_exponent(amax: torch.Tensor, bp: torch.Tensor) -> torch.Tensor:
    """The block scale's exponent k (X = 2**k) for finite ``amax``, by rule ``bp[0]``.

    ``bp`` holds int32 ``[rule, emax, even_add, bits of element.largest]``. floor, ceil
    and even read amax's float32 exponent field as torchao does: a subnormal amax counts
    as 2**-127, which changes nothing since k is clamped to -127 and emax >= 1.
    """
    rule, emax, even_add = bp[0], bp[1], bp[2]
    largest = bp[3:4].view(torch.float32)
    abits = amax.view(torch.int32)
    e_floor = (abits >> 23) - 127
    e_ceil = e_floor + ((abits & 0x7FFFFF) != 0).to(torch.int32)
    e_even = (((abits + even_add) >> 23) & 0xFF) - 127
    # rceil: ceil(log2(amax / largest)) of the float32 quotient, from its bits; a
    # subnormal quotient is either above 2**-127 (-> -126) or not (-> -127 after clamping).
    rbits = (amax / largest).view(torch.int32)
    e_rceil = (rbits >> 23) - 127 + ((rbits & 0x7FFFFF) != 0).to(torch.int32)
    subnormal = torch.where(rbits > (1 << 22), e_rceil * 0 - 126, e_rceil * 0 - 127)  # int32
    e_rceil = torch.where(rbits < (1 << 23), subnormal, e_rceil)
    k = torch.where(
        rule == 0,
        e_floor - emax,
        torch.where(rule == 1, e_ceil - emax, torch.where(rule == 2, e_even - emax, e_rceil)),
    )
    return torch.clamp(k, min=-127, max=127)


def blocked(t: torch.Tensor, dims: tuple[int, int, int]) -> torch.Tensor:
    """Contiguous ``t`` viewed as ``(groups, rows, h, cols)``, with no view base (dynamo
    would guard on the base's shape) and the block extents ``rows`` and ``cols`` marked
    static for ``torch.compile``: its kernels run with ``dynamic=True``, and a symbolic
    ``cols`` would leave the inner loop unvectorised (14x slower, measured)."""
    t4 = t.view(-1, *dims).detach()
    torch._dynamo.mark_static(t4, 1)
    torch._dynamo.mark_static(t4, 3)
    return t4


def pow2_parts(
    x4: torch.Tensor, pe: torch.Tensor, bp: torch.Tensor, key: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Element values (on the element grid, NaN in bad blocks) and the power-of-two block
    scales (NaN where the block holds NaN or Inf) of blocked float32 ``x4``."""
    amax = x4.abs().amax(dim=(1, 3), keepdim=True)
    bad = ~torch.isfinite(amax)
    k = _pow2_exponent(amax, bp)
    nan = torch.full_like(amax, float("nan"))
    scale = torch.where(bad, nan, _pow2(k))
    inverse = torch.where(bad, nan, _pow2(-k))
    # x * 2**-k is exact unless it lands in float32's subnormals, far below the smallest
    # element subnormal, where either result rounds to zero.
    elements = _round_bits(x4 * inverse, pe, key)
    return elements, scale


def amax_parts(
    x4: torch.Tensor,
    pe: torch.Tensor,
    ps: torch.Tensor,
    fp: torch.Tensor,
    key: torch.Tensor | None,
    two_level: bool,
    tensor_amax: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Element values, block scales (in the scale format; NaN for blocks with NaN or
    Inf) and the FP32 tensor scale (``two_level``, else None) of blocked ``x4``.

    ``fp`` holds float32 ``[element.largest, scale.largest * element.largest, the scale
    format's smallest normal]``; ``ps`` the scale format's kernel parameters (saturating).
    ``tensor_amax`` (two-level only) overrides the amax of x's finite blocks.
    """
    largest, divisor, scale_min = fp[0], fp[1], fp[2]
    amax = x4.abs().amax(dim=(1, 3), keepdim=True)
    bad = ~torch.isfinite(amax)
    block = amax / largest
    tensor_scale = None
    if two_level:
        if tensor_amax is None:
            tensor_amax = torch.where(bad, 0.0, amax).amax()
        # Floored at float32's smallest normal so that 1 / s stays finite (an all-zero
        # tensor then has s = 2**-126 and reads back as zeros).
        tensor_scale = torch.clamp(tensor_amax / divisor, min=_F32_TINY)
        block = block / tensor_scale
    block = torch.clamp(block, min=scale_min)
    block = _round_bits(block, ps, None)
    block = torch.where(bad, torch.full_like(block, float("nan")), block)
    if tensor_scale is None:
        reciprocal = torch.reciprocal(block)
    else:
        reciprocal = torch.reciprocal(tensor_scale) / block
    elements = _round_bits(x4 * reciprocal, pe, key)
    return elements, block, tensor_scale


def _pow2_blocks(x4, pe, bp, key):  # type: ignore[no-untyped-def]
    elements, scale = pow2_parts(x4, pe, bp, key)
    return elements * scale


def _amax_blocks(x4, pe, ps, fp, key, two_level, tensor_amax):  # type: ignore[no-untyped-def]
    elements, block, tensor_scale = amax_parts(x4, pe, ps, fp, key, two_level, tensor_amax)
    full = block if tensor_scale is None else tensor_scale * block
    return elements * full


# One entry point per variant (see kernels._ENTRIES): the rounding key is None or a
# tensor, and ``out`` (blocked like x, see :func:`blocked`) is written inside the
# compiled function so the result is never materialised twice. x4 arrives blocked.
def _pow2_nearest(x4, pe, bp):  # type: ignore[no-untyped-def]
    return _pow2_blocks(x4, pe, bp, None)


def _pow2_nearest_out(x4, pe, bp, out):  # type: ignore[no-untyped-def]
    out.copy_(_pow2_blocks(x4, pe, bp, None))


def _pow2_stochastic(x4, pe, bp, key):  # type: ignore[no-untyped-def]
    return _pow2_blocks(x4, pe, bp, key)


def _pow2_stochastic_out(x4, pe, bp, key, out):  # type: ignore[no-untyped-def]
    out.copy_(_pow2_blocks(x4, pe, bp, key))


def _amax_nearest(x4, pe, ps, fp, two_level, tensor_amax):  # type: ignore[no-untyped-def]
    return _amax_blocks(x4, pe, ps, fp, None, two_level, tensor_amax)


def _amax_nearest_out(x4, pe, ps, fp, two_level, tensor_amax, out):  # type: ignore[no-untyped-def]
    out.copy_(_amax_blocks(x4, pe, ps, fp, None, two_level, tensor_amax))


def _amax_stochastic(x4, pe, ps, fp, two_level, tensor_amax, key):  # type: ignore[no-untyped-def]
    return _amax_blocks(x4, pe, ps, fp, key, two_level, tensor_amax)


def _amax_stochastic_out(x4, pe, ps, fp, two_level, tensor_amax, key, out):  # type: ignore[no-untyped-def]
    out.copy_(_amax_blocks(x4, pe, ps, fp, key, two_level, tensor_amax))


_ENTRIES.update(
    {
        "pow2_nearest": _pow2_nearest,
        "pow2_nearest_out": _pow2_nearest_out,
        "pow2_stochastic": _pow2_stochastic,
        "pow2_stochastic_out": _pow2_stochastic_out,
        "amax_nearest": _amax_nearest,
        "amax_nearest_out": _amax_nearest_out,
        "amax_stochastic": _amax_stochastic,
        "amax_stochastic_out": _amax_stochastic_out,
    }
)
