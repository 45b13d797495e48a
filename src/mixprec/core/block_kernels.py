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
  bits of amax, so ``x / X`` and ``q * X`` are exact float32 operations. The compiled
  path does neither: rounding ``x / 2**k`` onto the element grid and multiplying back is
  rounding ``x`` itself onto the element grid moved up ``k`` binades, so it runs the
  scalar kernel's bit arithmetic on x with the grid's per-block bounds
  (:func:`pow2_grid`, :func:`round_pow2_grid`): no float multiply, no subnormal
  operand, one pass that writes the dequantized values;
- ``amax`` scales (FP32 or E4M3; DeepSeek-V3, NVFP4): ``X = amax / largest`` rounded to
  the scale format, elements ``round(x * (1 / X))`` (NVFP4: ``x * ((1 / s) / X)`` with
  the tensor scale s), as torchao's ``nvfp4_quantize`` computes them. The compiled path
  zeroes x under a per-block floor first (:func:`flush_floor`, :func:`times_flushed`),
  so that one float multiply gives :func:`_times_block`'s products with no subnormal
  product.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mixprec.core.kernels import _ABS_MASK, _ENTRIES, _F32_QNAN_BITS, _INT32_MIN, _hash_bits, _round_bits, nearest_steps

__all__ = ["RULE_IDS", "pow2_parts", "amax_parts", "range_counts", "blocked"]

RULE_IDS = {"floor": 0, "ceil": 1, "even": 2, "rceil": 3}
"""The power-of-two scale rules, as the kernel's rule parameter."""

_F32_TINY = 2.0**-126


def _pow2(k: torch.Tensor) -> torch.Tensor:
    """2**k as float32 for integer k in [-127, 127], built from bits (2**-127 is a float32
    subnormal; a shift is exact where ``exp2`` of a float might not be)."""
    subnormal = 1 << torch.clamp(k + 149, min=0, max=22)
    return torch.where(k >= -126, (k + 127) << 23, subnormal).to(torch.int32).view(torch.float32)


def _pow2_exponent(amax: torch.Tensor, bp: torch.Tensor, rule: str | None = None) -> torch.Tensor:
    """The block scale's exponent k (X = 2**k) for finite ``amax``, by ``rule`` (a name
    of :data:`RULE_IDS`), or where ``rule`` is None by rule ``bp[0]``, chosen at run
    time (one compiled kernel serves every rule, at the cost of computing all four).

    ``bp`` holds int32 ``[rule, emax, even_add, bits of element.largest]``. floor, ceil
    and even read amax's float32 exponent field as torchao does: a subnormal amax counts
    as 2**-127, which changes nothing since k is clamped to -127 and emax >= 1.
    """
    emax, even_add = bp[1], bp[2]
    largest = bp[3:4].view(torch.float32)
    abits = amax.view(torch.int32)

    def floor() -> torch.Tensor:
        return (abits >> 23) - 127 - emax

    def ceil() -> torch.Tensor:
        return floor() + ((abits & 0x7FFFFF) != 0).to(torch.int32)

    def even() -> torch.Tensor:
        return (((abits + even_add) >> 23) & 0xFF) - 127 - emax

    def rceil() -> torch.Tensor:
        # ceil(log2(amax / largest)) of the float32 quotient, from its bits; a subnormal
        # quotient is either above 2**-127 (-> -126) or not (-> -127 after clamping).
        rbits = (amax / largest).view(torch.int32)
        e_rceil = (rbits >> 23) - 127 + ((rbits & 0x7FFFFF) != 0).to(torch.int32)
        subnormal = torch.where(rbits > (1 << 22), e_rceil * 0 - 126, e_rceil * 0 - 127)  # int32
        return torch.where(rbits < (1 << 23), subnormal, e_rceil)

    rules = {"floor": floor, "ceil": ceil, "even": even, "rceil": rceil}
    if rule is not None:
        k = rules[rule]()
    else:
        chosen = bp[0]
        k = torch.where(
            chosen == 0, floor(),
            torch.where(chosen == 1, ceil(), torch.where(chosen == 2, even(), rceil())),
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


_F32_INF = 0x7F800000
_F32_QNAN = _F32_QNAN_BITS
_F32_ONE = 0x3F800000
_MANTISSA = 0x7FFFFF


def _times_block(x4: torch.Tensor, r: torch.Tensor, zero_below: bool) -> torch.Tensor:
    """``x4 * r`` (r per block, broadcast) as the element rounding sees it, without
    float32 subnormal operands or results, which cost a microcode assist per vector
    on x86 (measured: 5x slower with bench_input's 5% subnormals).

    With ``zero_below`` (the element format rounds every float32 below 2**-125 to a
    signed zero in both modes, see :func:`zero_below_ok`), lanes whose block has a
    normal ``r`` get ``RNE(m_x * m_r) * 2**(e_x + e_r)`` from the significands in [1, 2)
    (a subnormal x is normalised by an exact int-to-float conversion): IEEE's result
    wherever that is 2**-125 or more, a signed zero below it, where IEEE's result rounds
    to the same signed zero. Blocks with r zero, subnormal, Inf or NaN (bad blocks)
    take the plain product, so every rounded element is IEEE's bit for bit."""
    if not zero_below:
        return x4 * r
    rbits = r.view(torch.int32)
    r_exp = (rbits >> 23) & 0xFF
    special = (r_exp == 0) | (r_exp == 0xFF)
    r_m = ((rbits & _MANTISSA) | _F32_ONE).view(torch.float32)
    bits = x4.view(torch.int32)
    magnitude = bits & 0x7FFFFFFF
    subnormal = magnitude < (1 << 23)
    normalised = torch.where(subnormal, magnitude.to(torch.float32).view(torch.int32), magnitude)
    # unbiased exponents of x and r together; a subnormal x is magnitude * 2**-149
    shift = (normalised >> 23) - subnormal.to(torch.int32) * 149 + (r_exp - 254)
    x_m = ((normalised & _MANTISSA) | _F32_ONE).view(torch.float32)
    product = (x_m * r_m).view(torch.int32)  # in [1, 4]: normal, rounded as IEEE rounds x * r
    biased = (product >> 23) + shift
    result = product + torch.clamp(shift, min=-128, max=127) * (1 << 23)
    result = torch.where(biased > 254, _F32_INF, result)
    result = torch.where(biased < 2, 0, result)
    fast = (result | ((bits ^ rbits) & _INT32_MIN)).view(torch.float32)
    slow = torch.where(special, x4, 1.0) * torch.where(special, r, 1.0)
    return torch.where(special, slow, fast)


_TINY_PRODUCT = 2.0**-125.5
"""Products below 2**-125 round to zero in the element formats :func:`zero_below_ok`
accepts; x is flushed where |x| * r stays under this, half a binade clear of both ends."""


def flush_floor(factor: torch.Tensor) -> torch.Tensor:
    """Per block, the |x| below which :func:`times_flushed` zeroes x: about
    ``2**-125.5 / factor`` (float32 division, within an ulp); 0 (nothing zeroed) where
    the factor is not a normal float32 (an all-zero, NaN or overflowed block), whose
    blocks take the plain product as :func:`_times_block` does."""
    rbits = factor.view(torch.int32)
    r_exp = (rbits >> 23) & 0xFF
    normal = (r_exp != 0) & (r_exp != 0xFF)
    floor = _TINY_PRODUCT / factor
    return torch.where(normal, floor, torch.zeros_like(floor))


def times_flushed(x4: torch.Tensor, factor: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
    """``x4 * factor`` as :func:`_times_block` gives it to the rounding of an element
    format that :func:`zero_below_ok` accepts, with one float multiply: x below its
    block's ``floor`` (:func:`flush_floor`) becomes a signed zero first, so no product
    is a float32 subnormal, nor is x where the factor is below sqrt(2) (a block whose
    amax is above about the element's largest, as in bench_input's): no microcode
    assists there. Zeroed x give a product under 2**-125, which rounds to a signed zero
    either way; every other product is IEEE's, as _times_block's (those between 2**-126
    and 2**-125, which it zeroes, round to the same signed zero). A float32 subnormal x
    above the floor (a block with a factor above sqrt(2)) is multiplied as it is, at
    the cost of an assist."""
    flushed = torch.where(x4.abs() < floor, x4 * 0.0, x4)
    return flushed * factor


def zero_below_ok(pe: Sequence[int]) -> bool:
    """Whether the element format with kernel parameters ``pe`` (:func:`mixprec.core.kernels.param_values`) rounds every float32
    below 2**-125 (binade 1 and float32's subnormals) to a signed zero, nearest and
    stochastic alike: it has a zero, its subnormal floor lies above float32's, and the
    drop there is at least 54 bits, so that neither the nearest test (significand >
    half a step) nor the stochastic threshold (significand >> (drop - 30)) can fire.
    True for every MX and NVFP4 element format."""
    subnormal_below, drop, min_bits = pe[3], pe[5], pe[6]
    return min_bits == 0 and subnormal_below > 1 and drop >= 54


def pow2_scales(x4: torch.Tensor, bp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The power-of-two block scales of blocked float32 ``x4`` and their inverses, shape
    ``(groups, 1, h, 1)`` (both NaN where the block holds NaN or Inf)."""
    amax = x4.abs().amax(dim=(1, 3), keepdim=True)
    bad = ~torch.isfinite(amax)
    k = _pow2_exponent(amax, bp)
    nan = torch.full_like(amax, float("nan"))
    return torch.where(bad, nan, _pow2(k)), torch.where(bad, nan, _pow2(-k))


def pow2_grid(
    x4: torch.Tensor, bp: torch.Tensor, pe: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The element grid of each block of blocked float32 ``x4`` moved by its power-of-two
    scale ``X = 2**k``, as the int32 bounds :func:`round_pow2_grid` reads, each of shape
    ``(groups, 1, h, 1)``: the float32 exponent below which the moved grid's spacing
    stops shrinking (``pe``'s ``subnormal_below + k``), the bits of ``largest * X`` (-1
    in a block holding NaN or Inf, so that every value there is past it), what a value
    past it becomes (``largest * X``; NaN in such a block), and the bits of the smallest
    subnormal times X (a float32 subnormal for the smallest scales; exact, see
    :func:`pow2_grid_ok`)."""
    amax = x4.abs().amax(dim=(1, 3), keepdim=True)
    bad = ~torch.isfinite(amax)
    k = _pow2_exponent(amax, bp)
    subnormal_below = pe[3] + k
    largest = torch.where(bad, -1, pe[1] + (k << 23))
    past = torch.where(bad, _F32_QNAN, largest)
    step = _pow2(((pe[4] >> 23) - 127) + k).view(torch.int32)
    return subnormal_below, largest, past, step


def pow2_grid_ok(pe: Sequence[int]) -> bool:
    """Whether :func:`round_pow2_grid` gives :func:`round_elements`' results times the
    scale for the element format with kernel parameters ``pe``
    (:func:`mixprec.core.kernels.param_values`, saturating): it has a
    zero, signed values, subnormals whose smallest is a float32 normal, and rounds
    every float32 below 2**-125 to zero (:func:`zero_below_ok`, so the products that
    float32 cannot hold round to zero both ways), its largest value is at least 4 (so
    that ``largest * 2**-127`` is a float32 normal) and its smallest subnormal at least
    2**-22 (so that times 2**-127 it is a float32 value). True for every MX element."""
    shift, max_bits, _, _, step_bits, _, _, invalid_below = (int(v) for v in pe)
    return (zero_below_ok(pe) and invalid_below == _INT32_MIN and (max_bits >> 23) - 127 >= 2
            and (step_bits & _MANTISSA) == 0 and (step_bits >> 23) - 127 >= -22 and shift >= 0)


def round_pow2_grid(
    x4: torch.Tensor,
    subnormal_below: torch.Tensor,
    largest: torch.Tensor,
    past: torch.Tensor,
    step: torch.Tensor,
    shift: torch.Tensor,
    key: torch.Tensor | None,
) -> torch.Tensor:
    """:func:`.kernels._round_bits` of ``x4`` onto each block's moved grid
    (:func:`pow2_grid`; ``shift`` is ``23 - element mantissa bits``): the dequantized
    values ``round(x / X) * X`` bit for bit, computed on x's own bits.

    In float32 binade E the moved grid's spacing is ``2**drop`` ulps with ``drop =
    shift + max(subnormal_below, E) - E``, the scalar kernel's formula with the bound
    moved by k. A float32 subnormal x counts in ulps of binade 1 (``2**-149``) but lies
    in its own binade E' (from an exact int-to-float conversion of its bits), which
    matters where the moved grid's normal range reaches below float32's (the smallest
    scales): there ``drop = shift + max(subnormal_below, E') - 1``. The increment, the
    tie rule, the values below the smallest subnormal and the random bits (the
    element's flat index) are the scalar kernel's. Stochastic rounding of a float32
    subnormal x uses the random bits as the scalar kernel does on the normalised
    ``x / X`` (its significand ``n = 1 - E'`` bits further left): the random increment
    shifted right by n, and the tiny-value test on the normalised significand, so that
    the result is :func:`round_elements`' bit for bit. The element formats here
    saturate, have a zero and are signed, so no NaN passes through (a block with NaN or
    Inf is all NaN) and nothing is invalid."""
    bits = x4.view(torch.int32)
    magnitude = bits & _ABS_MASK
    sign = bits & _INT32_MIN
    exponent = torch.clamp(magnitude >> 23, min=1)
    significand = magnitude - ((exponent - 1) << 23)
    own = torch.where(magnitude < (1 << 23), (magnitude.to(torch.float32).view(torch.int32) >> 23) - 149, exponent)
    drop = shift + torch.maximum(subnormal_below, own) - exponent
    if key is None:
        drop = torch.clamp(drop, max=25)
        drop_mask = (1 << drop) - 1
        increment = (drop_mask >> 1) + ((significand >> drop) & 1 & drop_mask)
        tiny_up = significand > ((1 << drop) >> 1)
    else:
        random = _hash_bits(x4, key)
        normalise = exponent - own  # 0 for normal x
        drop = torch.clamp(drop + normalise, max=61)  # the drop of the normalised x / X
        wide_mask = (1 << torch.clamp(drop, max=24)) - 1
        increment = (random & wide_mask) >> normalise
        drop_mask = wide_mask >> normalise
        significand = significand << normalise
        threshold = (significand << torch.clamp(30 - drop, min=0)) >> torch.clamp(drop - 30, min=0, max=31)
        tiny_up = (random & 0x3FFFFFFF) < threshold
    rounded = (magnitude + increment) & ~drop_mask
    result = torch.where(drop >= 24, torch.where(tiny_up, step, 0), rounded)
    # past the largest, or wrapped: a NaN's payload near 0x7FFFFFFF makes the int32
    # rounding wrap to a negative pattern (read as -0), and a NaN is past any largest
    result = torch.where((result > largest) | (result < 0), past, result)
    return (result | sign).view(torch.float32)


def nearest_on_grid(
    magnitude: torch.Tensor, mantissa_bits: torch.Tensor, step_min: torch.Tensor, largest: torch.Tensor
) -> torch.Tensor:
    """:func:`.kernels.nearest_steps` (round to nearest even in exact float arithmetic)
    saturating at ``largest`` (bits): the element formats here saturate. Returns the
    result's int32 bits."""
    return torch.minimum(nearest_steps(magnitude, mantissa_bits, step_min), largest)


def flushed_nearest(x4: torch.Tensor, factor: torch.Tensor, floor: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
    """:func:`times_flushed` rounded to nearest onto the element grid ``pe`` (an element
    format :func:`zero_below_ok` accepts, saturating) by :func:`nearest_on_grid`: the
    products are zeros or float32 normals, and the element grid's smallest spacing is a
    normal (2**-9 for E4M3, 2**-1 for E2M1). :func:`.kernels._round_bits`' results bit
    for bit, NaN payloads included, in about a third of its operations."""
    bits = times_flushed(x4, factor, floor).view(torch.int32)
    magnitude = bits & _ABS_MASK
    # an overflowed product (Inf) saturates as float32's largest value does
    rounded = nearest_on_grid(torch.clamp(magnitude, max=_F32_INF - 1), 23 - pe[0], pe[4] >> 23, pe[1])
    rounded = torch.where(magnitude > _F32_INF, magnitude, rounded)  # NaN stays NaN
    return (rounded | (bits & _INT32_MIN)).view(torch.float32)


def pow2_nearest_fused(
    x4: torch.Tensor, bp: torch.Tensor, pe: torch.Tensor, rule: str, out4: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Write blocked float32 ``x4`` rounded to nearest onto its blocks' power-of-two
    moved grids (:func:`pow2_grid`) into ``out4`` in one pass: per block the amax, the
    scale exponent k and the moved grid's bounds, then :func:`nearest_on_grid` of each
    element. Returns the block amax and whether any nonzero block's moved grid reaches
    below float32's normals (smallest spacing under ``2**-125``), where this float path
    does not apply: those blocks are written with the grid clamped there, and the
    caller rounds them again with :func:`round_pow2_grid` (:func:`tiny_groups`). The
    scale ``rule`` is a constant to the compiler: the per-block arithmetic of all four
    rules, inlined into the element loop, made inductor split the pass in two."""
    x4 = x4.float()  # a 16-bit x widened as it is read
    amax = x4.abs().amax(dim=(1, 3), keepdim=True)
    bad = ~torch.isfinite(amax)
    k = _pow2_exponent(amax, bp, rule)
    step_min = (pe[4] >> 23) + k
    bits = x4.view(torch.int32)
    rounded = nearest_on_grid(bits & _ABS_MASK, 23 - pe[0], torch.clamp(step_min, min=2), pe[1] + (k << 23))
    out4.copy_((torch.where(bad, _F32_QNAN, rounded) | (bits & _INT32_MIN)).view(torch.float32))
    return amax, ((step_min < 2) & (amax > 0)).any()


def tiny_groups(amax: torch.Tensor, bp: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
    """The indices of the groups (first dimension of the blocked layout) holding a block
    that :func:`pow2_nearest_fused` leaves to :func:`round_pow2_grid`."""
    step_min = (pe[4] >> 23) + _pow2_exponent(amax, bp)
    return ((step_min < 2) & (amax > 0)).flatten(1).any(1).nonzero().squeeze(1)


def amax_scales(
    x4: torch.Tensor, ps: torch.Tensor, fp: torch.Tensor, two_level: bool, tensor_amax: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Block scales (in the scale format; NaN for blocks with NaN or Inf), the FP32
    tensor scale (``two_level``, else None) and the per-block factor the elements are
    multiplied by before rounding, of blocked ``x4``.

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
    # an all-zero block's elements are zeros whatever the factor; its factor can overflow
    # (an all-zero NVFP4 tensor: 1 / (2**-126 * 2**-6)), and 0 * Inf would be NaN
    reciprocal = torch.where(amax == 0, torch.zeros_like(reciprocal), reciprocal)
    return block, tensor_scale, reciprocal


def round_elements(
    x4: torch.Tensor, factor: torch.Tensor, pe: torch.Tensor, key: torch.Tensor | None, zero_below: bool
) -> torch.Tensor:
    """``x4 * factor`` (one factor per block) rounded onto the element grid ``pe``.
    For power-of-two factors the product is exact unless it lands in float32's
    subnormals, far below the smallest element subnormal, where any result rounds to
    zero. ``zero_below``: see :func:`_times_block` (same results, faster)."""
    return _round_bits(_times_block(x4, factor, zero_below), pe, key)


def range_counts(
    x4: torch.Tensor, factor: torch.Tensor, pe_unsaturated: torch.Tensor, zero_below: bool,
    smallest_normal: float,
) -> torch.Tensor:
    """How many values of blocked ``x4`` flush, land among the element subnormals, and
    clip, rounded to nearest as :func:`round_elements` rounds them (``factor`` from
    :func:`pow2_scales` or :func:`amax_scales`), as int64 ``[flushed, subnormal,
    clipped]``. ``pe_unsaturated`` are the element format's parameters with overflow to
    Inf: the rounding is the quantizer's except that a value rounding past the
    element's largest gives Inf instead of the largest, so the Infs are exactly the
    values saturation changed. Bad blocks (NaN factor) count in none."""
    rounded = _round_bits(_times_block(x4, factor, zero_below), pe_unsaturated, None)
    magnitude = rounded.abs()
    flushed = ((rounded == 0) & (x4 != 0)).sum()
    subnormal = ((magnitude > 0) & (magnitude < smallest_normal)).sum()
    clipped = torch.isinf(rounded).sum()
    return torch.stack([flushed, subnormal, clipped])


def pow2_parts(
    x4: torch.Tensor, pe: torch.Tensor, bp: torch.Tensor, key: torch.Tensor | None,
    zero_below: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Element values (on the element grid, NaN in bad blocks) and the power-of-two block
    scales (NaN where the block holds NaN or Inf) of blocked float32 ``x4``."""
    scale, inverse = pow2_scales(x4, bp)
    return round_elements(x4, inverse, pe, key, zero_below), scale


def amax_parts(
    x4: torch.Tensor,
    pe: torch.Tensor,
    ps: torch.Tensor,
    fp: torch.Tensor,
    key: torch.Tensor | None,
    two_level: bool,
    tensor_amax: torch.Tensor | None,
    zero_below: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Element values, block scales and the FP32 tensor scale (``two_level``, else
    None) of blocked ``x4``; see :func:`amax_scales`."""
    block, tensor_scale, reciprocal = amax_scales(x4, ps, fp, two_level, tensor_amax)
    return round_elements(x4, reciprocal, pe, key, zero_below), block, tensor_scale


# x4 may be 16-bit (a BF16 or FP16 operand): each entry widens it as it reads it.
# The compiled path runs in two calls: the block scales (one reduction over x, then
# the scale math once per block, writing (groups, 1, h, 1) tensors), then one
# element-wise pass that multiplies, rounds and scales back (power-of-two scales: the
# moved grid's bounds, then one pass that rounds x onto it). In one graph inductor
# inlines the scale math into the element loop and recomputes it for every vector
# (measured again for the moved grid: no faster than the two calls).
# The rounding key is None or a tensor, and ``out`` (blocked like x, see
# :func:`blocked`; a fresh tensor for allocating calls) is written inside the compiled
# function so the result is never materialised twice; ``zb`` is :func:`zero_below_ok`
# (a constant to dynamo).
def _pow2_scales(x4, bp):  # type: ignore[no-untyped-def]
    return pow2_scales(x4.float(), bp)


def _amax_scales(x4, ps, fp, two_level, tensor_amax, unscaled=False):  # type: ignore[no-untyped-def]
    # unscaled: the values come out as element * block scale, and the tensor scale apart
    block, tensor_scale, reciprocal = amax_scales(x4.float(), ps, fp, two_level, tensor_amax)
    full = block if tensor_scale is None or unscaled else tensor_scale * block
    return full, reciprocal, tensor_scale


def _pow2_grid(x4, bp, pe):  # type: ignore[no-untyped-def]
    return pow2_grid(x4.float(), bp, pe)


def _pow2_nearest_out(x4, sb, largest, past, step, pe, out):  # type: ignore[no-untyped-def]
    out.copy_(round_pow2_grid(x4.float(), sb, largest, past, step, pe[0], None))


def _pow2_stochastic_out(x4, sb, largest, past, step, pe, key, out):  # type: ignore[no-untyped-def]
    out.copy_(round_pow2_grid(x4.float(), sb, largest, past, step, pe[0], key))


def _amax_floor_scales(x4, ps, fp, two_level, tensor_amax, unscaled=False):  # type: ignore[no-untyped-def]
    block, tensor_scale, reciprocal = amax_scales(x4.float(), ps, fp, two_level, tensor_amax)
    full = block if tensor_scale is None or unscaled else tensor_scale * block
    return full, reciprocal, flush_floor(reciprocal), tensor_scale


def _flushed_nearest_out(x4, factor, floor, full, pe, out):  # type: ignore[no-untyped-def]
    out.copy_(flushed_nearest(x4.float(), factor, floor, pe) * full)


def _flushed_stochastic_out(x4, factor, floor, full, pe, key, out):  # type: ignore[no-untyped-def]
    out.copy_(_round_bits(times_flushed(x4.float(), factor, floor), pe, key) * full)


def _blocks_nearest_out(x4, factor, full, pe, zb, out):  # type: ignore[no-untyped-def]
    out.copy_(round_elements(x4.float(), factor, pe, None, zb) * full)


def _blocks_stochastic_out(x4, factor, full, pe, zb, key, out):  # type: ignore[no-untyped-def]
    out.copy_(round_elements(x4.float(), factor, pe, key, zb) * full)


_ENTRIES.update(
    {
        "pow2_scales": _pow2_scales,
        "pow2_grid": _pow2_grid,
        "amax_floor_scales": _amax_floor_scales,
        "flushed_nearest_out": _flushed_nearest_out,
        "flushed_stochastic_out": _flushed_stochastic_out,
        "pow2_nearest_out": _pow2_nearest_out,
        "pow2_nearest_fused": pow2_nearest_fused,
        "pow2_stochastic_out": _pow2_stochastic_out,
        "amax_scales": _amax_scales,
        "amax_block_scales": amax_scales,
        "blocks_nearest_out": _blocks_nearest_out,
        "blocks_stochastic_out": _blocks_stochastic_out,
    }
)
