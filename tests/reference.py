"""Independent references for the numerics tests.

``reference_round`` rounds in float64 with numpy (``np.rint`` is round-half-even), from
the format's definition alone: it shares no code or bit tricks with mixprec's kernel.
``same_values`` compares float32 tensors bit for bit, any NaN matching any NaN.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import torch

from mixprec.core.formats import FloatFormat

ML_DTYPES = {
    "bf16": ml_dtypes.bfloat16,
    "fp16": np.float16,
    "e5m2": ml_dtypes.float8_e5m2,
    "e4m3": ml_dtypes.float8_e4m3fn,  # non-saturating: overflow and Inf give NaN
}


def ml_dtypes_round(x: torch.Tensor, name: str) -> torch.Tensor:
    """x (float32) cast to ml_dtypes' (or numpy's) type for ``name`` and back."""
    values = x.numpy().astype(ML_DTYPES[name]).astype(np.float32)
    return torch.from_numpy(values)


def grid_neighbours(x: np.ndarray, fmt: FloatFormat) -> tuple[np.ndarray, np.ndarray]:
    """The grid points below and above |x| on fmt's unbounded-exponent grid (float64):
    spacing 2**(e - m) in binade e, and the subnormal spacing below the normal range."""
    ax = np.abs(x.astype(np.float64))
    _, frexp_exp = np.frexp(ax)  # ax = f * 2**frexp_exp with f in [0.5, 1)
    exponent = np.maximum(frexp_exp - 1, fmt.min_exponent)
    quantum = np.ldexp(1.0, exponent - fmt.mantissa_bits)
    lo = np.floor(ax / quantum) * quantum
    return lo, lo + quantum


def reference_round(x: torch.Tensor, fmt: FloatFormat, overflow: str) -> torch.Tensor:
    """Round-to-nearest-even of float32 ``x`` onto ``fmt`` in float64 arithmetic."""
    x64 = x.numpy().astype(np.float64)
    ax = np.abs(x64)
    with np.errstate(invalid="ignore", over="ignore"):
        _, frexp_exp = np.frexp(ax)
        exponent = np.maximum(frexp_exp - 1, fmt.min_exponent)
        quantum = np.ldexp(1.0, exponent - fmt.mantissa_bits)
        rounded = np.rint(ax / quantum) * quantum
        beyond = {"inf": np.inf, "saturate": fmt.largest, "nan": np.nan}[overflow]
        rounded = np.where(rounded > fmt.largest, beyond, rounded)
        rounded = np.where(np.isinf(ax), beyond, rounded)
        rounded = np.where(np.isnan(ax), np.nan, rounded)
    result = np.copysign(rounded, x64)
    return torch.from_numpy(result.astype(np.float32))


def same_values(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """Elementwise: identical float32 bits (so -0 differs from +0), or both NaN."""
    got_bits = got.contiguous().view(torch.int32)
    want_bits = want.contiguous().view(torch.int32)
    return (got_bits == want_bits) | (torch.isnan(got) & torch.isnan(want))


def assert_same(got: torch.Tensor, want: torch.Tensor, x: torch.Tensor, what: str) -> None:
    """Fail with the first few mismatching inputs when ``got`` and ``want`` differ."""
    ok = same_values(got, want)
    if bool(ok.all()):
        return
    bad = (~ok).nonzero().flatten()[:8]
    rows = ", ".join(
        f"x={x.flatten()[i].item()!r} ({x.flatten()[i].view(torch.int32).item():#010x}): "
        f"got {got.flatten()[i].item()!r}, want {want.flatten()[i].item()!r}"
        for i in bad.tolist()
    )
    raise AssertionError(f"{what}: {int((~ok).sum())} mismatches of {ok.numel()}; {rows}")


def edge_values(fmt: FloatFormat) -> torch.Tensor:
    """Adversarial float32 inputs for ``fmt``: zeros, Inf, NaN, the largest value and
    the points around it, ties and near-ties in the normal and subnormal ranges, the
    smallest subnormal and its half, float32's own subnormals, each with both signs."""
    f32 = np.float32
    base = [0.0, np.inf, np.nan, 1.0, 1.5, 3.0, f32(2.0**-149), f32(2.0**-126) * 0.75]
    tiny = fmt.smallest_subnormal
    normal = fmt.smallest_normal
    largest = fmt.largest
    ulp_top = 2.0 ** (fmt.max_exponent - fmt.mantissa_bits)
    for value in (largest, largest + ulp_top / 2, largest + ulp_top, 2 * largest, normal,
                  tiny, tiny / 2, tiny * 1.5, tiny * 2.5, normal - tiny / 2, normal * (1 + fmt.epsilon / 2),
                  1 + fmt.epsilon / 2, 1 + 1.5 * fmt.epsilon, 1 - fmt.epsilon / 4):
        if value < 3.0e38:
            base.append(value)
    values = np.array(base, dtype=np.float32)
    # the float32 neighbours of each value catch off-by-one-ulp errors at the boundaries
    around = np.concatenate([values, np.nextafter(values, np.float32(np.inf)),
                             np.nextafter(values, np.float32(0))])
    both = np.concatenate([around, -around])
    return torch.from_numpy(both.astype(np.float32))
