"""Exact counts of one tensor's values: a histogram of log2|x| by binade and, for each
format, how many values would flush to zero, land in the subnormal range, or overflow,
at the scale the tensor carries, unscaled, and at what-if power-of-two scales.

Every count is one comparison of the float32 bit pattern with a threshold. The bit
pattern of ``|x|`` orders values like the values themselves, so one pass makes a key per
element, ``floor(bits / 2^12) + ceil(bits / 2^12)`` (even for a value on the grid of 11
mantissa bits, odd between two grid points), and one ``bincount`` (or a sort, for small
tensors) answers "how many values are below T" and "how many are at or below T" exactly
for every threshold T on that grid. The thresholds of formats with up to 10 mantissa bits
(fp16, bf16, e5m2, e4m3), times any power of two, are on it, except below 2^-137 (in
float32's own subnormal range), where they are resolved to the next grid point.

Block formats (``"mxfp4_e2m1"``, ``"nvfp4"``, ...) are counted by quantizing: each
value against its own block's scale (:func:`mixprec.core.block_quantize.block_counts`),
blocks along the tensor's last dimension, zero-padded to whole blocks as the engine
pads them inside its ops. For them "overflow" is a value *clipped* at its block's
largest value.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from mixprec.core import formats as formats_module
from mixprec.core.block_quantize import block_counts
from mixprec.core.formats import BlockFormat, FloatFormat

__all__ = [
    "LOG2_MIN",
    "LOG2_MAX",
    "KINDS",
    "FormatThresholds",
    "thresholds",
    "TensorCounts",
    "count_tensor",
    "count_blocks",
    "is_block_format",
]

LOG2_MIN = -190
"""Lowest binade of the histogram: unscaled errors under a large loss scale reach below
float32's 2^-149. Smaller nonzero values are counted in this bin."""
LOG2_MAX = 127
"""Highest binade of the histogram (float32's); bin j holds 2^j <= |x| < 2^(j+1)."""
KINDS = ("flush", "subnormal", "overflow")
"""What can happen to a nonzero value rounded (to nearest even) into a format:
``flush``: it becomes 0; ``subnormal``: it stays nonzero but below the smallest normal
value (fewer significant bits); ``overflow``: it rounds past the largest finite value
(to Inf, NaN, or the saturated largest value, as the format's overflow rule says).
In a block format the three are taken in each value's block: ``flush`` is a nonzero
value rounding to zero in its block, ``subnormal`` an element below the element
format's smallest normal, and ``overflow`` a value *clipped* at its block's largest
value (saturated: to nearest it would round past the element format's largest value
times the block scale)."""

_DROPPED_BITS = 12  # keys keep 8 exponent and 11 mantissa bits
_GRID = 1 << _DROPPED_BITS
_KEYS = 1 << 20  # 2 * 2^19 keys cover every non-negative int32 bit pattern
_INF_BITS = 0x7F800000
_SORT_BELOW = 1 << 16  # smaller tensors are sorted; larger ones bincounted into _KEYS bins
_MAX_MANTISSA_BITS = _DROPPED_BITS - 2


@dataclass(frozen=True)
class FormatThresholds:
    """The exact boundaries of a format (round to nearest, ties to even), in the value
    domain: a nonzero ``|v|`` flushes to zero iff ``|v| <= flush_at_or_below``; it is
    subnormal iff ``flush_at_or_below < |v| < subnormal_below``; it overflows iff
    ``|v| >= overflow_from`` (``overflow_inclusive``) or ``|v| > overflow_from``."""

    format: str
    flush_at_or_below: float
    subnormal_below: float
    overflow_from: float
    overflow_inclusive: bool


def thresholds(fmt: str | FloatFormat) -> FormatThresholds:
    """The flush, subnormal and overflow boundaries of ``fmt`` (1 to 10 mantissa bits).

    Flush: half the smallest subnormal, a tie that goes to 0 (the even code).
    Subnormal: below the midpoint between the largest subnormal (odd code) and the
    smallest normal (even code), where ties go up. Overflow: from the midpoint between
    the largest value and the next one past it; the tie goes past the largest value when
    the largest value's significand is odd (fp16, bf16, e5m2), and stays when it is even
    (e4m3: 448 = 1.110b x 2^8, so 464 rounds to 448 and only values above 464 overflow).
    """
    fmt = formats_module.get(fmt)
    if not 1 <= fmt.mantissa_bits <= _MAX_MANTISSA_BITS:
        raise ValueError(
            f"mixprec.stats counts formats with 1 to {_MAX_MANTISSA_BITS} mantissa bits exactly "
            f"(fp16, bf16, e5m2, e4m3, any eXmY with Y <= {_MAX_MANTISSA_BITS}); {fmt.name} has "
            f"{fmt.mantissa_bits}"
        )
    top_ulp = 2.0 ** (math.floor(math.log2(fmt.largest)) - fmt.mantissa_bits)
    significand = round(fmt.largest / top_ulp)
    return FormatThresholds(
        format=fmt.name,
        flush_at_or_below=fmt.smallest_subnormal / 2,
        subnormal_below=fmt.smallest_normal - fmt.smallest_subnormal / 2,
        overflow_from=fmt.largest + top_ulp / 2,
        overflow_inclusive=significand % 2 == 1,
    )


def is_block_format(fmt: str | FloatFormat | BlockFormat) -> bool:
    """Whether ``fmt`` names a block-scaled format (``"mxfp8_e4m3"``, ``"nvfp4"``, ...)."""
    return isinstance(formats_module.resolve(fmt), BlockFormat)


def _padded_to_blocks(x: torch.Tensor, fmt: BlockFormat) -> torch.Tensor:
    """float32 ``x`` as a matrix by its last dimension (a scalar as 1 x 1), zero-padded
    to whole blocks: 1-D blocks run along the rows, 2-D tiles tile the matrix."""
    flat = x.detach().float()
    last = flat.shape[-1] if flat.dim() else 1
    matrix = flat.reshape(-1, last)
    cols = fmt.block_shape[-1]
    rows = fmt.block_shape[0] if len(fmt.block_shape) == 2 else 1
    pad_cols, pad_rows = -matrix.shape[1] % cols, -matrix.shape[0] % rows
    if pad_cols or pad_rows:
        matrix = torch.nn.functional.pad(matrix, (0, pad_cols, 0, pad_rows))
    return matrix


def count_blocks(x: torch.Tensor, fmt: str | BlockFormat) -> np.ndarray:
    """``[flushed, subnormal, clipped]`` (the :data:`KINDS` order, int64) of ``x`` in
    block format ``fmt``, rounded to nearest even against each block's own scale
    (:func:`mixprec.core.block_quantize.block_counts`). Blocks run along x's last
    dimension (2-D tiles over x as a matrix by its last dimension), zero-padded to whole
    blocks as the engine pads them: zeros change no block's scale and count in no share.
    Synchronises with x's device once."""
    block_fmt = formats_module.resolve(fmt)
    if not isinstance(block_fmt, BlockFormat):
        raise ValueError(f"count_blocks takes a block format (mxfp8_e4m3, nvfp4, ...), not {block_fmt.name}")
    counts = block_counts(_padded_to_blocks(x, block_fmt), block_fmt)
    return np.array([counts.flushed, counts.subnormal, counts.clipped], dtype=np.int64)


def _f32_bits(values: np.ndarray, upward: bool) -> np.ndarray:
    """Bit patterns of the float32 nearest to each (positive, float64) value from above
    (``upward``) or below."""
    with np.errstate(over="ignore"):
        rounded = values.astype(np.float32)
    wide = rounded.astype(np.float64)
    fix = wide < values if upward else wide > values
    if fix.any():
        direction = np.float32(np.inf) if upward else np.float32(0.0)
        rounded[fix] = np.nextafter(rounded[fix], direction)
    return rounded.view(np.int32).astype(np.int64)


def _below_index(values: np.ndarray) -> np.ndarray:
    """For each threshold T: the key index j with #(|x| < T) = C(j), C(j) = #(key <= j);
    exact when T's float32 ceiling lies on the key grid, else resolved to it."""
    bits = _f32_bits(values, upward=True)
    grid, rest = np.divmod(bits, _GRID)
    return np.where(rest == 0, 2 * grid - 1, 2 * grid + 1)


def _at_or_below_index(values: np.ndarray) -> np.ndarray:
    """As :func:`_below_index`, for #(|x| <= T)."""
    bits = _f32_bits(values, upward=False)
    grid, rest = np.divmod(bits, _GRID)
    return np.where(rest == 0, 2 * grid, 2 * grid + 1)


def _keys(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-element keys of |x| and the bit patterns of |x| (int32)."""
    flat = x.detach().reshape(-1)
    if flat.dtype != torch.float32:
        flat = flat.float()  # float16 and bfloat16 widen exactly; float64 rounds once
    bits = flat.contiguous().view(torch.int32) & 0x7FFFFFFF
    floor_key = torch.bitwise_right_shift(bits, _DROPPED_BITS)
    keys = (bits + (_GRID - 1)).bitwise_right_shift_(_DROPPED_BITS).add_(floor_key)
    return keys, bits


def _cumulative(keys: torch.Tensor, indices: np.ndarray) -> np.ndarray:
    """C(j) = number of keys <= j, for each j in ``indices`` (C(-1) = 0)."""
    where = torch.from_numpy(np.clip(indices, 0, _KEYS - 1)).to(keys.device)
    if keys.numel() < _SORT_BELOW:
        ordered = torch.sort(keys).values
        counts = torch.searchsorted(ordered, where.to(ordered.dtype), right=True)
    else:
        cumulative = torch.bincount(keys, minlength=_KEYS).cumsum_(0)
        counts = cumulative[where]
    result = counts.cpu().numpy().astype(np.int64)
    return np.where(indices < 0, 0, result)


def _amax(bits: torch.Tensor) -> float:
    """Largest finite |x| from the bit patterns (0.0 when there is none)."""
    if bits.numel() == 0:
        return 0.0
    top = int(bits.max())
    if top >= _INF_BITS:
        finite = bits[bits < _INF_BITS]
        top = int(finite.max()) if finite.numel() else 0
    return float(np.array([top], dtype=np.int32).view(np.float32)[0])


@dataclass(frozen=True)
class TensorCounts:
    """Counts over one or more tensors of one class (summed over samples).

    ``scale`` is the loss scale S the tensors carried (values "as seen"); the unscaled
    values are x / S in exact arithmetic. ``hist[i]`` counts nonzero finite unscaled
    values in binade ``LOG2_MIN + i`` (2^j <= |x / S| < 2^(j+1)); the end bins also hold
    everything beyond them. ``seen[f, k]`` counts the values as seen that would
    ``KINDS[k]`` in ``formats[f]``; ``what_if[f, k, e]`` the same for the unscaled values
    times ``2**exponents[e]`` (exponent 0: unscaled). Counts are exact for every threshold
    at or above 2^-137 as seen; thresholds below it (in float32's subnormal range: bf16's
    flush point under a what-if scale of 2^4 or more) are resolved to 2^-137 steps.

    A block format's counts (:data:`KINDS`: flushed, subnormal and clipped in each
    value's block) are taken on the values as seen and stand for every scale: a
    power-of-two loss scale moves each block's scale with its values, so what rounding
    does to them is the same at any scale (away from the ends of the scale format's
    range).
    """

    formats: tuple[str, ...]
    exponents: tuple[int, ...]
    numel: int = 0
    zeros: int = 0
    infs: int = 0
    nans: int = 0
    amax: float = 0.0
    samples: int = 0
    scales: tuple[float, ...] = ()
    hist: np.ndarray = field(default_factory=lambda: np.zeros(LOG2_MAX - LOG2_MIN + 1, dtype=np.int64))
    seen: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), dtype=np.int64))
    what_if: np.ndarray = field(default_factory=lambda: np.zeros((0, 3, 0), dtype=np.int64))

    @property
    def nonzero(self) -> int:
        """Values that are not zero (finite, infinite or NaN): the denominator of shares."""
        return self.numel - self.zeros

    def merged(self, other: TensorCounts) -> TensorCounts:
        """The counts of both (same formats and exponents)."""
        if (self.formats, self.exponents) != (other.formats, other.exponents):
            raise ValueError("cannot merge counts taken over different formats or scale exponents")
        if self.samples == 0:
            return other
        if other.samples == 0:
            return self
        return TensorCounts(
            formats=self.formats, exponents=self.exponents, numel=self.numel + other.numel,
            zeros=self.zeros + other.zeros, infs=self.infs + other.infs, nans=self.nans + other.nans,
            amax=max(self.amax, other.amax), samples=self.samples + other.samples,
            scales=tuple(sorted(set(self.scales) | set(other.scales))),
            hist=self.hist + other.hist, seen=self.seen + other.seen, what_if=self.what_if + other.what_if,
        )

    def _format_index(self, fmt: str | FloatFormat) -> int:
        name = formats_module.resolve(fmt).name
        if name not in self.formats:
            raise ValueError(f"format {name} was not observed; observed: {', '.join(self.formats)}")
        return self.formats.index(name)

    def count(self, fmt: str | FloatFormat, kind: str, scale: float | str = 1.0) -> int:
        """How many values ``kind`` ("flush", "subnormal", "overflow" or "lost" = flush +
        overflow; "clip" is "overflow", the word for block formats) in ``fmt``:
        ``scale="seen"`` for the values as recorded (with the loss scale they carried), or
        a power of two for the unscaled values times it (1.0: unscaled; a block format's
        counts are the same at every scale)."""
        if kind == "clip":
            kind = "overflow"
        if kind == "lost":
            return self.count(fmt, "flush", scale) + self.count(fmt, "overflow", scale)
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, 'lost' or 'clip', not {kind!r}")
        f, k = self._format_index(fmt), KINDS.index(kind)
        if scale == "seen":
            return int(self.seen[f, k])
        if isinstance(scale, str) or not scale > 0:
            raise ValueError(f"scale must be 'seen' or a positive power of two, not {scale!r}")
        exponent = math.log2(scale)
        if exponent != int(exponent) or int(exponent) not in self.exponents:
            raise ValueError(
                f"shares were recorded at scales 2^{self.exponents[0]} .. 2^{self.exponents[-1]} "
                f"(powers of two), not at {scale!r}"
            )
        return int(self.what_if[f, k, self.exponents.index(int(exponent))])

    def share(self, fmt: str | FloatFormat, kind: str, scale: float | str = 1.0) -> float:
        """:meth:`count` over the nonzero values (0.0 when there are none)."""
        return self.count(fmt, kind, scale) / self.nonzero if self.nonzero else 0.0


def _probe_indices(
    fmts: Sequence[FloatFormat], scale: float, exponents: Sequence[int]
) -> tuple[np.ndarray, dict[str, slice]]:
    """Every key index one tensor needs, in one array, and where each group lies."""
    edges = np.ldexp(1.0, np.arange(LOG2_MIN + 1, LOG2_MAX + 1)) * scale  # upper edges of bins but the last
    factors = np.array([scale / 2.0**e for e in exponents])  # unscaled * 2^e < T  <=>  x < T * S / 2^e
    bounds = [thresholds(fmt) for fmt in fmts]
    flush = np.array([b.flush_at_or_below for b in bounds])
    sub = np.array([b.subnormal_below for b in bounds])
    over = np.array([b.overflow_from for b in bounds])
    inclusive = np.array([b.overflow_inclusive for b in bounds])

    def not_overflowing(values: np.ndarray) -> np.ndarray:
        # |v| < T when the tie overflows, |v| <= T when it stays
        incl = np.repeat(inclusive, len(values) // max(len(bounds), 1))
        return np.where(incl, _below_index(values), _at_or_below_index(values))

    groups = {
        "edges": _below_index(edges),
        "flush_seen": _at_or_below_index(flush),
        "sub_seen": _below_index(sub),
        "over_seen": not_overflowing(over),
        "flush_if": _at_or_below_index(np.outer(flush, factors).ravel()),
        "sub_if": _below_index(np.outer(sub, factors).ravel()),
        "over_if": not_overflowing(np.outer(over, factors).ravel()),
    }
    inf_index = int(_at_or_below_index(np.array([np.inf]))[0])
    groups["inf"] = np.array([inf_index, inf_index - 1, 0])  # <= Inf, < Inf, zeros
    slices: dict[str, slice] = {}
    start = 0
    for name, indices in groups.items():
        slices[name] = slice(start, start + len(indices))
        start += len(indices)
    return np.concatenate(list(groups.values())), slices


def _with_blocks(
    x: torch.Tensor, fmts: tuple[FloatFormat | BlockFormat, ...], seen: np.ndarray, what_if: np.ndarray, n_exp: int
) -> tuple[np.ndarray, np.ndarray]:
    """The scalar formats' rows with the block formats' rows put in their places."""
    rows_seen, rows_if = [], []
    scalar = 0
    for fmt in fmts:
        if isinstance(fmt, BlockFormat):
            row = count_blocks(x, fmt)
            rows_seen.append(row)
            rows_if.append(np.repeat(row[:, None], n_exp, axis=1))
        else:
            rows_seen.append(seen[scalar])
            rows_if.append(what_if[scalar])
            scalar += 1
    return np.stack(rows_seen), np.stack(rows_if)


def count_tensor(
    x: torch.Tensor,
    fmts: Sequence[str | FloatFormat] = ("fp16", "bf16", "e5m2", "e4m3"),
    scale: float = 1.0,
    exponents: Sequence[int] = (0,),
) -> TensorCounts:
    """Count ``x``'s values, which carry the loss scale ``scale`` (1.0: none): zeros, Inf,
    NaN, the unscaled amax and log2 histogram, and for each format how many values flush,
    are subnormal, or overflow, as seen and at ``unscaled * 2**e`` for each ``e`` in
    ``exponents``. One pass over x plus a bincount; synchronises with x's device once.
    Block formats among ``fmts`` are counted by :func:`count_blocks` (one more pass and
    synchronisation each), the same counts at every exponent."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"count_tensor takes a floating-point torch.Tensor, not {type(x).__name__}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be finite and > 0, got {scale}")
    all_fmts = tuple(formats_module.resolve(f) for f in fmts)
    fmt_objs = tuple(f for f in all_fmts if isinstance(f, FloatFormat))
    exps = tuple(int(e) for e in exponents)
    indices, where = _probe_indices(fmt_objs, float(scale), exps)
    keys, bits = _keys(x)
    c = _cumulative(keys, indices)
    n_fmt, n_exp = len(fmt_objs), len(exps)
    numel = int(keys.numel())
    at_or_below_inf, below_inf, zeros = (int(v) for v in c[where["inf"]])
    edges = c[where["edges"]]
    hist = np.diff(np.concatenate([[zeros], edges, [below_inf]]))

    def kinds(flush_c: np.ndarray, sub_c: np.ndarray, kept_c: np.ndarray) -> np.ndarray:
        return np.stack([flush_c - zeros, sub_c - flush_c, at_or_below_inf - kept_c], axis=1)

    seen = kinds(c[where["flush_seen"]], c[where["sub_seen"]], c[where["over_seen"]])
    what_if = kinds(c[where["flush_if"]], c[where["sub_if"]], c[where["over_if"]])
    what_if = what_if.reshape(n_fmt, n_exp, 3).transpose(0, 2, 1).copy()
    if len(fmt_objs) != len(all_fmts):
        seen, what_if = _with_blocks(x, all_fmts, seen, what_if, n_exp)
    return TensorCounts(
        formats=tuple(f.name for f in all_fmts), exponents=exps, numel=numel, zeros=zeros,
        infs=at_or_below_inf - below_inf, nans=numel - at_or_below_inf, amax=_amax(bits) / scale,
        samples=1, scales=(float(scale),), hist=hist.astype(np.int64), seen=seen.astype(np.int64),
        what_if=what_if.astype(np.int64),
    )
