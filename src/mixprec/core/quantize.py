"""Put values on a format's grid: :func:`quantize`, and the per-tensor scale that maps a
tensor's absolute maximum onto a format's range (:func:`scale_from_amax`).

``quantize`` returns float32 values that the target format represents exactly, so any
float32 arithmetic downstream sees exactly what the low-precision hardware would hold.
Packing those values into real 1- and 2-byte storage is :mod:`mixprec.core.storage`'s job.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch

from mixprec.core import formats
from mixprec.core.formats import BlockFormat, FloatFormat, Overflow
from mixprec.core.kernels import native_rounds, round_to_format

__all__ = [
    "Rounding", "quantize", "scale_from_amax", "tensor_scale", "abs_max", "resolve_overflow"]

Rounding = Literal["nearest", "stochastic"]
"""``"nearest"``: round to nearest, ties to even (IEEE 754's default).
``"stochastic"``: round to one of the two grid neighbours, up with probability equal to
the distance from the lower one over their gap, so the expected result is the input."""

_ROUNDINGS = ("nearest", "stochastic")
_EXACT_INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def resolve_overflow(fmt: FloatFormat, saturate: bool | None) -> Overflow:
    """What an out-of-range value becomes: the format's default when ``saturate`` is
    None, its largest finite value when True, Inf (or NaN where it has no Inf) when False."""
    if saturate is None:
        return fmt.overflow
    if not isinstance(saturate, bool):
        raise TypeError(f"saturate must be None, True or False, not {saturate!r}")
    if saturate:
        return "saturate"
    if fmt.has_infinities:
        return "inf"
    if fmt.has_nan:
        return "nan"
    raise ValueError(
        f"format {fmt.name} has neither Inf nor NaN, so saturate=False has no result to give; "
        "use saturate=True or None"
    )


def _check_tensor(x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"quantize takes a torch.Tensor, not {type(x).__name__}")
    if x.dtype not in _EXACT_INPUT_DTYPES:
        if x.dtype == torch.float64:
            raise TypeError(
                "quantize takes float32, float16 or bfloat16 tensors; a float64 tensor would be "
                "rounded twice (to float32, then to the format). Call x.float() first if that "
                "double rounding is acceptable"
            )
        raise TypeError(
            f"quantize takes a floating-point tensor (float32, float16 or bfloat16), not {x.dtype}; "
            "integer, boolean and complex tensors have no floating-point grid to round onto"
        )
    return x


def _check_scale(scale: float | torch.Tensor, device: torch.device) -> torch.Tensor:
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            raise ValueError(
                f"scale must be a single number (a per-tensor scale), got a tensor of shape "
                f"{tuple(scale.shape)}"
            )
        if not scale.is_floating_point():
            raise TypeError(f"scale must be a floating-point tensor, not {scale.dtype}")
        scale_t = scale.detach().reshape(()).to(device=device, dtype=torch.float32)
        if torch.compiler.is_compiling():
            pass  # a host check would break the graph; compiled callers pass their own scales
        elif scale_t.device.type == "cpu":
            value = float(scale_t)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"scale must be finite and > 0, got {value}")
        else:  # a host check would synchronise with the device; assert on the device instead
            torch._assert_async(
                torch.isfinite(scale_t) & (scale_t > 0), "mixprec: scale must be finite and > 0"
            )
        return scale_t
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or a one-element tensor, not {type(scale).__name__}")
    value = float(scale)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"scale must be finite and > 0, got {scale}")
    return torch.tensor(value, dtype=torch.float32, device=device)


def _draw_key(generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Two int32 words of random key for the kernel's hash, from ``generator`` (or the
    default generator of ``device``); no host synchronisation."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, not {type(generator).__name__}")
    source = generator.device if generator is not None else device
    key = torch.randint(
        -(2**31), 2**31 - 1, (2,), dtype=torch.int32, device=source, generator=generator
    )
    return key.to(device, non_blocking=True)


def _key(generator: torch.Generator | None, device: torch.device, random_key: torch.Tensor | None) -> torch.Tensor:
    """The caller's ``random_key`` (checked), else a draw from ``generator``."""
    if random_key is None:
        return _draw_key(generator, device)
    if random_key.dtype != torch.int32 or random_key.shape != (2,):
        raise ValueError(f"random_key must be two int32 words (shape (2,)), got {random_key.dtype} "
                         f"of shape {tuple(random_key.shape)}")
    return random_key.to(device)


def quantize(
    x: torch.Tensor,
    fmt: str | FloatFormat | BlockFormat,
    rounding: Rounding = "nearest",
    scale: float | torch.Tensor | None = None,
    saturate: bool | None = None,
    generator: torch.Generator | None = None,
    out: torch.Tensor | None = None,
    axis: int = -1,
    random_key: torch.Tensor | None = None,
) -> torch.Tensor:
    """Round ``x`` onto the grid of ``fmt`` and return the result as float32 (same shape,
    same device). Not differentiable: it returns a tensor with no autograd history.

    ``fmt`` may be a block format (``"mxfp8_e4m3"``, ``"mxfp4_e2m1"``, ``"nvfp4"``,
    ``"fp8_block128"``, a :class:`BlockFormat`): then blocks run along ``axis`` (or tile
    the last two dimensions), each block gets its own scale, and the result is the
    dequantized values; see :func:`mixprec.core.block_quantize.quantize_blocks`. Block
    formats choose their scales themselves, so ``scale`` and ``saturate`` are refused
    with them; ``axis`` only matters for block formats (scalar rounding is element-wise).

    Round to nearest even agrees bit for bit with torch's casts (``x.to(dtype).float()``)
    for every float32 input, subnormals, ties, overflow, Inf, NaN and -0 included. Values
    beyond the largest finite one follow ``saturate``: None for the format's default
    (fp16, bf16, e5m2: Inf; e4m3: +-448, Inf included, as torch's cast does), True to
    clamp to the largest finite value, False for Inf (NaN where the format has no Inf,
    as ml_dtypes' e4m3fn does).

    Stochastic rounding returns ``lo`` or ``hi``, the grid neighbours around x, choosing
    ``hi`` with probability ``(x - lo) / (hi - lo)``, so ``E[q(x)] = x``. The same holds in
    the subnormal range, where the neighbours are multiples of the smallest subnormal
    (0 included). Above the largest finite value the grid continues at the top binade's
    spacing: a value that rounds up past the largest finite one overflows as ``saturate``
    says. The probability is resolved to 2**-30 of a grid step (values under 2**-30 of
    the smallest subnormal never round up). Random bits come from ``generator`` (or the
    default generator of x's device), one draw per call, so results are reproducible
    with a seeded generator, and the same on CPU and CUDA.

    With ``scale`` (a positive number or one-element tensor), returns
    ``q(x * (1/scale)) * scale``, multiplying by the float32 reciprocal as FP8 training
    libraries do (exactly ``x / scale`` for power-of-two scales): the scale maps x's range
    onto the format's, see :func:`scale_from_amax`.

    ``out``, a float32 tensor of x's shape on x's device, receives the result without a
    new allocation (it may be x itself).

    ``random_key`` (two int32 words, on x's device) replaces the draw from ``generator``
    for callers that derive their own keys (the engine does, so that torch.compile can
    trace its stochastic rounding).
    """
    x = _check_tensor(x)
    resolved = formats.resolve(fmt)
    if isinstance(resolved, BlockFormat):
        return _quantize_block_format(x, resolved, rounding, scale, saturate, generator, out, axis, random_key)
    fmt = resolved
    if rounding not in _ROUNDINGS:
        raise ValueError(f"unknown rounding {rounding!r}; use 'nearest' or 'stochastic'")
    overflow = resolve_overflow(fmt, saturate)
    if out is not None:
        if not isinstance(out, torch.Tensor) or out.dtype != torch.float32:
            raise TypeError("out must be a float32 torch.Tensor")
        if out.shape != x.shape or out.device != x.device:
            raise ValueError(
                f"out must match x's shape {tuple(x.shape)} and device {x.device}, got "
                f"{tuple(out.shape)} on {out.device}"
            )
    scale_t = None if scale is None else _check_scale(scale, x.device)
    x32 = x.detach()
    float32_format = fmt.mantissa_bits == 23 and fmt.exponent_bits == 8
    if x32.dtype != torch.float32 and (float32_format or not native_rounds(x32)):
        # float16 and bfloat16 widen exactly; the native kernel reads them as they are,
        # widening on the way (no float32 copy first)
        x32 = x32.float()
    key = _key(generator, x.device, random_key) if rounding == "stochastic" else None

    if float32_format:
        # float32 itself: nothing to round; only the overflow rule can change values.
        result = x32 * torch.reciprocal(scale_t) if scale_t is not None else x32.clone()
        if overflow == "saturate":
            result = result.clamp_(-fmt.largest, fmt.largest)
        if scale_t is not None:
            result = result * scale_t
        return out.copy_(result) if out is not None else result
    return round_to_format(x32, fmt, overflow, key=key, scale=scale_t, out=out)


def _quantize_block_format(
    x: torch.Tensor,
    fmt: BlockFormat,
    rounding: Rounding,
    scale: float | torch.Tensor | None,
    saturate: bool | None,
    generator: torch.Generator | None,
    out: torch.Tensor | None,
    axis: int,
    random_key: torch.Tensor | None = None,
) -> torch.Tensor:
    if scale is not None:
        raise ValueError(
            f"scale= is a per-tensor scale for scalar formats, but {fmt.name} is a block format "
            f"that picks one scale per block (rule {fmt.scale_rule!r}); drop scale=, or "
            f"quantize to its element format {fmt.element.name!r} with scale="
        )
    if saturate is not None:
        raise ValueError(
            f"saturate= applies to scalar formats; block format {fmt.name} always clamps "
            "elements to the element format's largest value (the OCP MX rule); drop saturate="
        )
    from mixprec.core.block_quantize import quantize_blocks  # block_quantize imports this module

    return quantize_blocks(x, fmt, rounding, axis=axis, generator=generator, out=out, random_key=random_key)


def scale_from_amax(
    amax: torch.Tensor | float,
    fmt: str | FloatFormat,
    margin: int = 0,
    power_of_two: bool = False,
) -> torch.Tensor:
    """The per-tensor scale that maps ``amax`` onto ``fmt.largest / 2**margin``: quantize
    with ``scale=`` then divides by it, so the tensor fills the format's range with
    ``margin`` binades of headroom. An ``amax`` of zero, Inf or NaN gives 1.0.

    ``power_of_two=True`` rounds the scale up to a power of two, so scaling is exact
    and never pushes amax past the target. Stays on amax's device (no synchronisation).
    """
    fmt = formats.get(fmt)
    if isinstance(margin, bool) or not isinstance(margin, int):
        raise TypeError(f"margin must be an int number of binades, not {type(margin).__name__}")
    amax_t = torch.as_tensor(amax, dtype=torch.float32).detach().float()
    target = fmt.largest / 2.0**margin
    if amax_t.device.type == "cpu" and amax_t.dim() == 0 and not torch.compiler.is_compiling():
        # the same float32 arithmetic on the host: a dozen 0-d tensor ops cost ~200 us
        # a call, every rounding of a scaled operand (reading a CPU scalar syncs nothing)
        return torch.tensor(_host_scale(float(amax_t), target, power_of_two), dtype=torch.float32)
    scale = amax_t / target
    # A scale that underflows float32 would divide by zero later: keep it >= 2**-126.
    scale = torch.clamp(scale, min=torch.finfo(torch.float32).tiny)
    if power_of_two:
        mantissa, exponent = torch.frexp(scale)
        scale = torch.ldexp(torch.ones_like(scale), torch.where(mantissa == 0.5, exponent - 1, exponent))
    usable = torch.isfinite(amax_t) & (amax_t > 0) & torch.isfinite(scale)
    return torch.where(usable, scale, torch.ones_like(scale))


def _host_scale(amax: float, target: float, power_of_two: bool) -> float:
    """:func:`scale_from_amax`'s arithmetic in numpy float32 scalars (IEEE float32
    division, as torch's float32 tensor divided by a Python float computes it)."""
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        amax32 = np.float32(amax)
        scale = max(amax32 / np.float32(target), np.float32(torch.finfo(torch.float32).tiny))
        if power_of_two and np.isfinite(scale):
            mantissa, exponent = math.frexp(float(scale))
            scale = np.float32(math.ldexp(1.0, exponent - 1 if mantissa == 0.5 else exponent))
        usable = bool(np.isfinite(amax32) and amax32 > 0 and np.isfinite(scale))
    return float(scale) if usable else 1.0


def tensor_scale(
    x: torch.Tensor, fmt: str | FloatFormat, margin: int = 0, power_of_two: bool = False
) -> torch.Tensor:
    """:func:`scale_from_amax` of ``x``'s current absolute maximum ("current scaling")."""
    x = _check_tensor(x)
    return scale_from_amax(abs_max(x), fmt, margin=margin, power_of_two=power_of_two)


def abs_max(x: torch.Tensor) -> torch.Tensor:
    """``x``'s largest absolute value as a float32 0-d tensor (0 for an empty tensor; NaN
    if x holds one), in one pass over x with no temporary: the maximum of ``-min`` and
    ``max`` (``x.abs().amax()`` reads x, writes |x| and reads it again)."""
    if x.numel() == 0:
        return torch.zeros((), device=x.device)
    low, high = torch.aminmax(x.detach())
    return torch.maximum(-low, high).float().abs()  # abs: -0.0 from an all-zero x reads +0
