"""Scalar floating-point formats: what a format is, and the named ones mixprec knows.

A :class:`FloatFormat` describes a binary floating-point format by its exponent and
mantissa widths, its bias, and how it spends its top exponent (infinities, NaNs, or
more finite values). Everything else (largest finite value, smallest normal and
subnormal, machine epsilon) is derived. This module knows nothing about training.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch

__all__ = [
    "FloatFormat",
    "NanEncoding",
    "Overflow",
    "fp32",
    "bf16",
    "fp16",
    "e5m2",
    "e4m3",
    "e2m1fn",
    "e2m3fn",
    "e3m2fn",
    "e8m0fnu",
    "NAMED_FORMATS",
    "get",
    "ieee_format",
]

NanEncoding = Literal["ieee", "all_ones", "none"]
"""How NaN is encoded.

``"ieee"``: every code with an all-ones exponent and a nonzero mantissa (the all-ones
exponent with a zero mantissa is then infinity). ``"all_ones"``: only the codes whose
exponent and mantissa are all ones (the E4M3FN convention; the rest of the top binade
holds finite values). ``"none"``: no NaN at all.
"""

Overflow = Literal["inf", "saturate", "nan"]
"""What a value beyond the largest finite one becomes: infinity, the largest finite
value of the same sign, or NaN."""

_CUSTOM_NAME = re.compile(r"^e(\d+)m(\d+)$")


@dataclass(frozen=True)
class FloatFormat:
    """A binary floating-point format with one sign bit, ``exponent_bits`` exponent bits
    and ``mantissa_bits`` stored mantissa bits, with gradual underflow (subnormals).

    ``overflow`` is the default result of rounding a value past the largest finite one
    (what torch's own cast does for the formats torch has). ``torch_dtype`` is the
    torch storage dtype that holds exactly this format's values, where torch has one.

    ``signed=False`` drops the sign bit: negative inputs round to NaN. ``has_zero=False``
    (exponent-only formats, ``mantissa_bits=0``, unsigned) spends the all-zeros code on
    ``2**-bias`` instead of zero: zero rounds to NaN and values below the smallest one
    round up to it. Together they describe OCP's E8M0 scale format (:data:`e8m0fnu`).
    """

    name: str
    exponent_bits: int
    mantissa_bits: int
    bias: int
    has_infinities: bool = True
    nan_encoding: NanEncoding = "ieee"
    overflow: Overflow = "inf"
    torch_dtype: torch.dtype | None = None
    signed: bool = True
    has_zero: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.exponent_bits <= 8:
            raise ValueError(
                f"format {self.name!r}: exponent_bits={self.exponent_bits} is out of range; "
                "mixprec emulates formats with 1 to 8 exponent bits (float32's range)"
            )
        if not 0 <= self.mantissa_bits <= 23:
            raise ValueError(
                f"format {self.name!r}: mantissa_bits={self.mantissa_bits} is out of range; "
                "mixprec emulates formats with 0 to 23 mantissa bits (float32's precision)"
            )
        if self.nan_encoding not in ("ieee", "all_ones", "none"):
            raise ValueError(
                f"format {self.name!r}: nan_encoding={self.nan_encoding!r} is not one of "
                "'ieee', 'all_ones', 'none'"
            )
        if self.overflow not in ("inf", "saturate", "nan"):
            raise ValueError(
                f"format {self.name!r}: overflow={self.overflow!r} is not one of "
                "'inf', 'saturate', 'nan'"
            )
        if self.has_infinities and self.nan_encoding != "ieee":
            raise ValueError(
                f"format {self.name!r}: infinities need the IEEE layout (all-ones exponent "
                "reserved); use nan_encoding='ieee' or has_infinities=False"
            )
        if self.overflow == "inf" and not self.has_infinities:
            raise ValueError(
                f"format {self.name!r} has no infinities, so overflow cannot give Inf; "
                "use overflow='saturate' or 'nan'"
            )
        if self.overflow == "nan" and not self.has_nan:
            raise ValueError(
                f"format {self.name!r} has no NaN, so overflow cannot give NaN; "
                "use overflow='saturate'"
            )
        if not self.has_zero and (self.mantissa_bits != 0 or self.signed or self.has_infinities):
            raise ValueError(
                f"format {self.name!r}: has_zero=False is for unsigned exponent-only scale "
                "formats (like E8M0); use mantissa_bits=0, signed=False, has_infinities=False"
            )
        min_exponent = self.min_exponent
        fits = (
            (min_exponent >= -126 or (not self.has_zero and min_exponent == -127))
            and (min_exponent <= -126 or min_exponent - self.mantissa_bits >= -126)
            and self.largest <= torch.finfo(torch.float32).max
        )
        if not fits:
            # The rounding kernel builds subnormal results as float32 normals, so a
            # format's subnormals must be float32 normals unless its normal range starts
            # exactly where float32's does (then float32's own subnormals line up). An
            # exponent-only format with no zero may reach 2**-127 (E8M0): the kernel
            # rounds float32's subnormals onto 2**-127 and 2**-126 with its own spacing.
            raise ValueError(
                f"format {self.name!r}: bias={self.bias} puts values outside what mixprec "
                "emulates: the smallest normal must be >= 2**-126, its subnormals float32 "
                "normals (or the smallest normal exactly 2**-126), and the largest value "
                "finite in float32"
            )
        if self.largest == 0.0:
            raise ValueError(
                f"format {self.name!r} has no nonzero finite value; add mantissa or exponent bits"
            )

    # ---- derived numbers -------------------------------------------------------------

    @property
    def total_bits(self) -> int:
        """Bits of one encoded value: sign (if signed), exponent and mantissa."""
        return int(self.signed) + self.exponent_bits + self.mantissa_bits

    @property
    def min_exponent(self) -> int:
        """Unbiased exponent of the smallest normal value (also the subnormals' scale);
        ``-bias`` for formats with no zero, whose all-zeros code is ``2**-bias``."""
        return 1 - self.bias if self.has_zero else -self.bias

    def _max_biased_exponent(self) -> int:
        top = 2**self.exponent_bits - 1
        if self.nan_encoding == "ieee":
            return top - 1
        if self.nan_encoding == "all_ones" and self.mantissa_bits == 0:
            return top - 1  # the all-ones code is the whole top binade
        return top

    def _max_mantissa_code(self) -> int:
        full = 2**self.mantissa_bits - 1
        if self.nan_encoding == "all_ones" and self.mantissa_bits > 0:
            return full - 1  # all-ones mantissa in the top binade is NaN
        return full

    @property
    def max_exponent(self) -> int:
        """Unbiased exponent of the largest finite value."""
        return self._max_biased_exponent() - self.bias

    @property
    def largest(self) -> float:
        """Largest finite value."""
        m = self.mantissa_bits
        if self._max_biased_exponent() < 1:  # no normal numbers at all (1 exponent bit)
            return (2**m - 1) * 2.0 ** (self.min_exponent - m)
        return (1.0 + self._max_mantissa_code() / 2**m) * 2.0**self.max_exponent

    @property
    def smallest_normal(self) -> float:
        """Smallest positive normal value, 2**min_exponent."""
        return 2.0**self.min_exponent

    @property
    def smallest_subnormal(self) -> float:
        """Smallest positive value, 2**(min_exponent - mantissa_bits)."""
        return 2.0 ** (self.min_exponent - self.mantissa_bits)

    @property
    def epsilon(self) -> float:
        """Machine epsilon: the gap between 1.0 and the next larger value, 2**-mantissa_bits."""
        return 2.0**-self.mantissa_bits

    @property
    def has_nan(self) -> bool:
        """Whether the format can encode NaN."""
        if self.nan_encoding == "ieee":
            return self.mantissa_bits > 0  # with no mantissa the all-ones exponent is only Inf
        return self.nan_encoding != "none"

    def __str__(self) -> str:
        return self.name


def ieee_format(exponent_bits: int, mantissa_bits: int, name: str | None = None) -> FloatFormat:
    """An IEEE-754-style format ``eXmY``: bias ``2**(X-1) - 1``, infinities, NaNs in the
    all-ones exponent, overflow to infinity, subnormals."""
    fmt_name = name or f"e{exponent_bits}m{mantissa_bits}"
    if not isinstance(exponent_bits, int) or not isinstance(mantissa_bits, int):
        raise TypeError("exponent_bits and mantissa_bits must be int")
    return FloatFormat(
        name=fmt_name,
        exponent_bits=exponent_bits,
        mantissa_bits=mantissa_bits,
        bias=2 ** (exponent_bits - 1) - 1,
        torch_dtype=_IEEE_TORCH_DTYPES.get((exponent_bits, mantissa_bits)),
    )


_IEEE_TORCH_DTYPES: dict[tuple[int, int], torch.dtype] = {
    (8, 23): torch.float32,
    (8, 7): torch.bfloat16,
    (5, 10): torch.float16,
    (5, 2): torch.float8_e5m2,
}

fp32 = ieee_format(8, 23, "fp32")
"""IEEE single precision; the reference every other format is emulated in."""
bf16 = ieee_format(8, 7, "bf16")
"""bfloat16: float32's range with 8 significand bits."""
fp16 = ieee_format(5, 10, "fp16")
"""IEEE half precision (paper 1's format): largest 65504, subnormals down to 2**-24."""
e5m2 = ieee_format(5, 2, "e5m2")
"""FP8 E5M2 (paper 2's format): FP16's exponent range, largest 57344, with infinities."""
e4m3 = FloatFormat(
    name="e4m3",
    exponent_bits=4,
    mantissa_bits=3,
    bias=7,
    has_infinities=False,
    nan_encoding="all_ones",
    overflow="saturate",
    torch_dtype=torch.float8_e4m3fn,
)
"""FP8 E4M3 in the E4M3FN convention (OCP FP8): no infinities, one NaN code per sign,
largest 448; out-of-range values saturate to +-448 by default, as torch's cast does."""


def _ocp_element(exponent_bits: int, mantissa_bits: int) -> FloatFormat:
    """An OCP MX element format ("fn": finite, no NaN): IEEE-style bias, the top
    exponent holds finite values, no Inf, no NaN, saturating."""
    return FloatFormat(
        name=f"e{exponent_bits}m{mantissa_bits}fn",
        exponent_bits=exponent_bits,
        mantissa_bits=mantissa_bits,
        bias=2 ** (exponent_bits - 1) - 1,
        has_infinities=False,
        nan_encoding="none",
        overflow="saturate",
    )


e2m1fn = _ocp_element(2, 1)
"""FP4 E2M1 (OCP MX, ml_dtypes' ``float4_e2m1fn``): values 0, 0.5, 1, 1.5, 2, 3, 4, 6; no
Inf or NaN, saturating. NaN inputs stay NaN in the float32 result (there is no code for
them: :func:`mixprec.to_storage` refuses them)."""
e2m3fn = _ocp_element(2, 3)
"""FP6 E2M3 (OCP MX, ``float6_e2m3fn``): largest 7.5, smallest subnormal 2**-3; no Inf/NaN."""
e3m2fn = _ocp_element(3, 2)
"""FP6 E3M2 (OCP MX, ``float6_e3m2fn``): largest 28, smallest subnormal 2**-4; no Inf/NaN."""
e8m0fnu = FloatFormat(
    name="e8m0fnu",
    exponent_bits=8,
    mantissa_bits=0,
    bias=127,
    has_infinities=False,
    nan_encoding="all_ones",
    overflow="nan",
    torch_dtype=torch.float8_e8m0fnu,
    signed=False,
    has_zero=False,
)
"""OCP MX's scale format E8M0 (``float8_e8m0fnu``): unsigned powers of two 2**-127 to
2**127, code 0xFF is NaN, no zero. As ml_dtypes: ties round up (to the even multiple of
the binade's spacing), zero, negatives, Inf and overflow give NaN, values below 2**-127
round up to it. (``"e8m0"`` stays the signed IEEE-style eXmY format.)"""

NAMED_FORMATS: dict[str, FloatFormat] = {
    f.name: f for f in (fp32, bf16, fp16, e5m2, e4m3, e2m1fn, e2m3fn, e3m2fn, e8m0fnu)
}
"""The formats mixprec names, by their one vocabulary: fp32, bf16, fp16, e5m2, e4m3, and
OCP's element and scale formats e2m1fn, e2m3fn, e3m2fn, e8m0fnu."""

_ALIASES: dict[str, FloatFormat] = {
    "float32": fp32,
    "float": fp32,
    "bfloat16": bf16,
    "float16": fp16,
    "half": fp16,
    "e4m3fn": e4m3,
    "float8_e5m2": e5m2,
    "float8_e4m3fn": e4m3,
    "float4_e2m1fn": e2m1fn,
    "float6_e2m3fn": e2m3fn,
    "float6_e3m2fn": e3m2fn,
    "float8_e8m0fnu": e8m0fnu,
}


def get(fmt: str | FloatFormat | torch.dtype) -> FloatFormat:
    """Look up a format by name (``"fp16"``, ``"e5m2"``, any ``"eXmY"``), by torch dtype,
    or pass a :class:`FloatFormat` through unchanged.

    ``eXmY`` names other than the five named formats build an IEEE-style format (bias
    ``2**(X-1) - 1``, infinities, NaN), with 1 <= X <= 8 and 0 <= Y <= 23.
    """
    if isinstance(fmt, FloatFormat):
        return fmt
    from mixprec.core.formats import blocks  # a late import: blocks builds on this module

    if isinstance(fmt, blocks.BlockFormat) or (
        isinstance(fmt, str) and fmt.strip().lower() in blocks.NAMED_BLOCK_FORMATS
    ):
        raise ValueError(
            f"{str(fmt)!r} is a block format (per-block scales), but a scalar format is needed "
            "here; pass a scalar element format such as 'e4m3' or 'e2m1fn', or call a function "
            "that takes block formats (mixprec.quantize, to_storage, formats.resolve)"
        )
    if isinstance(fmt, torch.dtype):
        for known in NAMED_FORMATS.values():
            if known.torch_dtype == fmt:
                return known
        raise ValueError(
            f"torch dtype {fmt} is not a floating-point format mixprec knows; known dtypes: "
            + ", ".join(str(f.torch_dtype) for f in NAMED_FORMATS.values())
        )
    if not isinstance(fmt, str):
        raise TypeError(
            f"a format is a name (str), a FloatFormat or a torch.dtype, not {type(fmt).__name__}"
        )
    key = fmt.strip().lower()
    if key in NAMED_FORMATS:
        return NAMED_FORMATS[key]
    if key in _ALIASES:
        return _ALIASES[key]
    match = _CUSTOM_NAME.match(key)
    if match:
        exponent_bits, mantissa_bits = int(match.group(1)), int(match.group(2))
        if not (1 <= exponent_bits <= 8 and 0 <= mantissa_bits <= 23):
            raise ValueError(
                f"format {fmt!r}: eXmY needs 1 <= X <= 8 and 0 <= Y <= 23 "
                "(values that float32 holds exactly)"
            )
        return ieee_format(exponent_bits, mantissa_bits)
    raise ValueError(
        f"unknown format {fmt!r}; known names: {', '.join(NAMED_FORMATS)}, or 'eXmY' for an "
        "IEEE-style format with X exponent and Y mantissa bits (1 <= X <= 8, 0 <= Y <= 23), "
        "e.g. 'e3m2'"
    )
