"""Real low-precision storage: pack values on a format's grid into 1- or 2-byte tensors
and back, losslessly.

Formats torch has a dtype for (fp16, bf16, e5m2, e4m3, e8m0fnu) are stored in that
dtype, so the bytes are the ones hardware reads. Custom formats are stored as their own
bit codes (sign, exponent, mantissa, as the format lays them out) in the smallest integer
type that holds them: ``uint8`` up to 8 bits, ``int16`` up to 16; wider custom formats are
kept as float32 values, since a code of 17 to 31 bits saves nothing over float32.

Block formats pack into a :class:`PackedBlocks` (see :mod:`mixprec.core.block_storage`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from mixprec.core import formats, native
from mixprec.core.block_storage import PackedBlocks
from mixprec.core.formats import BlockFormat, FloatFormat
from mixprec.core.kernels import _params, float_nearest, native_decodes, native_rounds, round_grid, run_variant, serial_threads
from mixprec.core.quantize import Rounding, _key, abs_max, quantize, resolve_overflow

__all__ = ["storage_dtype", "to_storage", "from_storage", "quantize_stored", "quantize_stored_with_amax",
           "stored_values", "PackedBlocks"]

_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)

# torch's casts round exactly as quantize does for these; others (e8m0fnu: torch maps 0
# and negatives onto codes, ml_dtypes and mixprec give NaN) are quantized first.
_TORCH_CAST_ROUNDS_AS_QUANTIZE = ("fp16", "bf16", "e5m2", "e4m3")

_F32_INF_BITS = 0x7F800000
_F32_QNAN_BITS = 0x7FC00000


def storage_dtype(fmt: str | FloatFormat) -> torch.dtype:
    """The dtype :func:`to_storage` packs scalar format ``fmt`` into."""
    fmt = formats.get(fmt)
    if fmt.torch_dtype is not None:
        return fmt.torch_dtype
    if fmt.total_bits <= 8:
        return torch.uint8
    if fmt.total_bits <= 16:
        return torch.int16
    return torch.float32


def to_storage(x: torch.Tensor, fmt: str | FloatFormat | BlockFormat, *, axis: int = -1
               ) -> torch.Tensor | PackedBlocks:
    """Pack ``x`` into ``fmt``'s storage dtype (:func:`storage_dtype`). Values already on
    the grid (the output of :func:`mixprec.core.quantize`) are packed exactly; others are
    rounded to nearest-even first, with the format's default overflow.

    For a block format, ``x`` is the high-precision tensor: it is quantized (blocks along
    ``axis``) and packed into a :class:`PackedBlocks` of element codes and scales, which
    :func:`from_storage` turns back into exactly ``quantize(x, fmt, axis=axis)``."""
    resolved = formats.resolve(fmt)
    if isinstance(resolved, BlockFormat):
        from mixprec.core.block_storage import pack_blocks

        return pack_blocks(x, resolved, axis=axis)
    if axis != -1:
        raise ValueError("axis= places the blocks of block formats; scalar formats pack element-wise, drop axis=")
    fmt = resolved
    dtype = storage_dtype(fmt)
    if fmt.torch_dtype is not None:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError("to_storage takes a floating-point torch.Tensor")
        if x.dtype == fmt.torch_dtype:
            return x
        if x.dtype == torch.float64:
            raise TypeError("to_storage takes float32, float16 or bfloat16; call x.float() first")
        if fmt.name not in _TORCH_CAST_ROUNDS_AS_QUANTIZE:
            x = quantize(x, fmt)
        # torch's cast rounds to nearest-even with the format's default overflow, the
        # same as quantize(x, fmt), so grid values pass through unchanged.
        return x.to(fmt.torch_dtype)
    on_grid = quantize(x, fmt)
    if dtype == torch.float32:
        return on_grid
    return _encode(on_grid, fmt, dtype)


def from_storage(packed: torch.Tensor | PackedBlocks, fmt: str | FloatFormat | BlockFormat) -> torch.Tensor:
    """Unpack what :func:`to_storage` made into float32 values on ``fmt``'s grid (for a
    block format: the dequantized values, in the original shape)."""
    resolved = formats.resolve(fmt)
    if isinstance(resolved, BlockFormat) or isinstance(packed, PackedBlocks):
        from mixprec.core.block_storage import unpack_blocks

        return unpack_blocks(packed, resolved)
    fmt = resolved
    dtype = storage_dtype(fmt)
    if not isinstance(packed, torch.Tensor):
        raise TypeError(f"from_storage takes a torch.Tensor, not {type(packed).__name__}")
    if packed.dtype != dtype:
        raise TypeError(
            f"format {fmt.name} is stored as {dtype}, but got a {packed.dtype} tensor; pass "
            "what to_storage returned for this format"
        )
    if dtype in (torch.uint8, torch.int16):
        return _decode(packed, fmt)
    return packed.float()


def _encode(values: torch.Tensor, fmt: FloatFormat, dtype: torch.dtype) -> torch.Tensor:
    e, m = fmt.exponent_bits, fmt.mantissa_bits
    top = 2**e - 1
    shift = 23 - m
    min_exp_biased = fmt.min_exponent + 127
    bits = values.view(torch.int32)
    magnitude = bits & 0x7FFFFFFF
    exponent = magnitude >> 23
    sign = ((bits >> 31) & 1) << (e + m)

    normal = ((exponent - 127 + fmt.bias) << m) | ((magnitude & 0x7FFFFF) >> shift)
    code = normal
    if min_exp_biased > 1:  # the format's subnormals are float32 normals: re-scale them
        # a subnormal k * 2**(min_exponent - m) times 2**(m - min_exponent) is the integer
        # k, exactly: the power of two added to the float32 exponent field, then one
        # conversion (vectorised, where a per-element shift of the significand was not,
        # and with no float constant for a compiler to recompute); float32 subnormals
        # (exponent 0) are not on the grid's subnormals and give 0
        steps = (magnitude + ((m - fmt.min_exponent) << 23)).view(torch.float32).to(torch.int32)
        subnormal = torch.where(exponent == 0, 0, steps)
        code = torch.where(exponent < min_exp_biased, subnormal, normal)
    is_nan = magnitude > _F32_INF_BITS
    if not fmt.has_nan:
        # host check; only formats without NaN pay for it (not inside a compiled graph,
        # whose callers, the engine's ops, store a NaN block as a NaN scale over zeros)
        if not torch.compiler.is_compiling() and bool(is_nan.any()):
            raise ValueError(f"format {fmt.name} has no NaN code, but the tensor holds NaN")
    else:
        nan_code = (top << m) | (2**m - 1 if fmt.nan_encoding == "all_ones" else 2 ** (m - 1))
        code = torch.where(is_nan, nan_code, code)
    if fmt.has_infinities:
        code = torch.where(magnitude == _F32_INF_BITS, top << m, code)
    code = code | sign
    if dtype == torch.int16:
        code = code - ((code >> 15) << 16)  # the same 16 bits, as a signed value
    return code.to(dtype)


def _decode(codes: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    e, m = fmt.exponent_bits, fmt.mantissa_bits
    top = 2**e - 1
    shift = 23 - m
    code = codes.to(torch.int32) & (2 ** fmt.total_bits - 1)
    sign = ((code >> (e + m)) & 1) << 31
    exp_field = (code >> m) & top
    mantissa = code & (2**m - 1)

    bits = ((exp_field - fmt.bias + 127) << 23) | (mantissa << shift)
    if fmt.min_exponent == -126:
        subnormal = mantissa << shift  # float32's own subnormal encoding
    else:
        # mantissa * 2**(min_exponent - m), built from the exact float of the integer.
        scaled = mantissa.to(torch.float32).view(torch.int32)
        subnormal = torch.where(mantissa == 0, 0, scaled + ((fmt.min_exponent - m) << 23))
    bits = torch.where(exp_field == 0, subnormal, bits)
    if fmt.nan_encoding == "ieee" and fmt.has_nan:
        special = torch.where(mantissa == 0, _F32_INF_BITS, torch.full_like(mantissa, _F32_QNAN_BITS))
        bits = torch.where(exp_field == top, special, bits)
    elif fmt.nan_encoding == "ieee":
        bits = torch.where(exp_field == top, _F32_INF_BITS, bits)
    elif fmt.nan_encoding == "all_ones":
        bits = torch.where((exp_field == top) & (mantissa == 2**m - 1), _F32_QNAN_BITS, bits)
    return (bits | sign).view(torch.float32)


def quantize_stored(
    x: torch.Tensor,
    fmt: str | FloatFormat,
    rounding: Rounding = "nearest",
    scale: torch.Tensor | None = None,
    saturate: bool | None = None,
    random_key: torch.Tensor | None = None,
    with_values: bool = True,
    values_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``quantize(x, fmt, rounding, scale=scale, saturate=saturate, random_key=random_key)``
    and the same values divided by ``scale`` in ``fmt``'s storage (:func:`to_storage`),
    returned together: what training keeps of an operand (values to multiply, bytes to
    save for backward); ``with_values=False`` returns None for the values (a caller that
    decodes the storage later with :func:`stored_values`, in the dtype its GEMM wants).
    ``values_dtype`` (FP8 dtypes) writes the values as bfloat16 or float16 instead of
    float32 (what a GEMM's BF16 kernel multiplies, what a result is held in): exact
    where every value is one of that dtype, as FP8 values times a power-of-two scale are
    BF16 values and unscaled ones FP16 values; the caller vouches for that.
    For the FP8 dtypes both come out of one compiled pass over x, whose float16 or
    bfloat16 x is widened inside the pass (:func:`mixprec.core.kernels.run_variant`);
    other formats take quantize, then to_storage. ``scale`` is a one-element float32
    tensor on x's device."""
    values, stored, _ = quantize_stored_with_amax(x, fmt, rounding, scale, saturate, random_key, with_values,
                                                  values_dtype, with_amax=False)
    assert stored is not None
    return values, stored


def quantize_stored_with_amax(
    x: torch.Tensor,
    fmt: str | FloatFormat,
    rounding: Rounding = "nearest",
    scale: torch.Tensor | None = None,
    saturate: bool | None = None,
    random_key: torch.Tensor | None = None,
    with_values: bool = True,
    values_dtype: torch.dtype = torch.float32,
    with_amax: bool = True,
    with_storage: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """:func:`quantize_stored`, and ``x``'s absolute maximum as a 0-d float32 tensor
    (NaN where x holds one; None unless ``with_amax``), reduced by the same pass over x:
    delayed scaling records the amax of a tensor it rounds with an earlier scale, and
    taking it there saves a pass that reads x again. ``with_storage=False`` returns None
    for the storage and writes only the values (a GEMM's result, used at once and never
    kept: the FP8 conversion and its bytes cost 0.3 ms a million elements here)."""
    if not (with_values or with_storage):
        raise ValueError("quantize_stored_with_amax: ask for the values, the storage or both")
    resolved = formats.get(fmt)
    dtype = resolved.torch_dtype
    if dtype not in _FP8_DTYPES or x.numel() == 0:
        values = quantize(x, resolved, rounding, scale=scale, saturate=saturate, random_key=random_key)
        unscaled = values if scale is None else values * torch.reciprocal(scale)
        amax = abs_max(x) if with_amax else None
        stored = to_storage(unscaled, resolved) if with_storage else None
        return values if with_values else None, stored, amax
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"quantize_stored takes float32, float16 or bfloat16 tensors, not {x.dtype}")
    # a 16-bit x is widened inside the kernel as it is read (with vector bit casts,
    # mixprec.core.vector_bitcasts: 1.02 against 1.25 ms for a widening pass first, on
    # 1M FP16 or BF16 elements to E5M2 stochastically; without them it was the other way)
    flat = x.detach().reshape(-1)
    overflow = resolve_overflow(resolved, saturate)
    p = _params(resolved, overflow, x.device)
    key = _key(None, x.device, random_key) if rounding == "stochastic" else None
    float_path = key is None and float_nearest(resolved, overflow)
    if native_rounds(flat) and values_dtype in (torch.float32, torch.bfloat16, torch.float16) and (
            scale is None or scale.device.type == "cpu"):
        # one native pass: values, bytes and amax (mixprec.core.native.round_scalar)
        values = torch.empty(flat.shape, dtype=values_dtype) if with_values else None
        stored = torch.empty(flat.shape, dtype=dtype) if with_storage else None
        amax = torch.empty((), dtype=torch.float32) if with_amax else None
        native.round_scalar(flat, p, float_path, key, scale, values, stored, amax, serial_threads(flat.numel()))
        return (None if values is None else values.view(x.shape), None if stored is None else stored.view(x.shape),
                amax)
    scales = () if scale is None else (torch.reciprocal(scale), scale)
    name = (f"stored_{resolved.name}_{overflow}_{rounding}_{'scaled' if scales else 'unscaled'}_"
            f"{str(flat.dtype)[6:]}{'_values_' + str(values_dtype)[6:] if with_values else ''}"
            f"{'_amax' if with_amax else ''}{'_float' if float_path else ''}{'' if with_storage else '_nostorage'}")
    kernel = _stored_kernel(dtype if with_storage else None, bool(scales), values_dtype if with_values else None,
                            with_amax, float_path)
    values, stored, amax = run_variant(name, kernel, flat, p, key, *scales)
    return (None if values is None else values.view(x.shape), None if stored is None else stored.view(x.shape),
            amax)


def _stored_kernel(dtype: torch.dtype | None, scaled: bool, values_dtype: torch.dtype | None,
                   with_amax: bool = False, float_path: bool = False
                   ) -> Callable[..., tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]]:
    """One pass of :func:`quantize_stored`: ``q(x * scale_inv)`` (the rounding kernel;
    to nearest by :func:`mixprec.core.kernels.round_grid`'s float path where
    ``float_path``) as storage ``q`` in ``dtype`` (unless None), as values ``q * scale``
    in ``values_dtype`` (unless None), and (``with_amax``) x's absolute maximum."""

    def stored(x: torch.Tensor, p: torch.Tensor, key: torch.Tensor | None, scale_inv: torch.Tensor | None = None,
               scale: torch.Tensor | None = None
               ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        x = x.float()
        amax = x.abs().amax() if with_amax else None
        if not scaled:
            rounded = round_grid(x, p, key, float_path)
            values = rounded
        else:
            assert scale_inv is not None and scale is not None
            rounded = round_grid(x * scale_inv, p, key, float_path)
            values = rounded * scale
        return ((None if values_dtype is None else values.to(values_dtype)),
                (None if dtype is None else rounded.to(dtype)), amax)

    return stored


def stored_values(
    stored: torch.Tensor, fmt: str | FloatFormat, scale: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """What :func:`from_storage` gives, times ``scale`` where there is one, as ``dtype``
    (float32, or bfloat16 where the values are exact in it, as FP8 values times a
    power-of-two scale are): the inverse of :func:`quantize_stored`. FP8 storage decodes
    in one pass: the native kernel's on a CPU (:func:`mixprec.core.native.decode_fp8`), a
    compiled one elsewhere (torch's eager E4M3 to float32 cast is a per-element software
    conversion, ~10x slower)."""
    resolved = formats.get(fmt)
    if stored.dtype not in _FP8_DTYPES or stored.numel() == 0:
        values = from_storage(stored, resolved)
        values = values if scale is None else values * scale
        return values.to(dtype)
    if dtype in (torch.float32, torch.bfloat16) and native_decodes(stored) and (
            scale is None or (scale.device.type == "cpu" and scale.dtype == torch.float32 and scale.numel() == 1
                              and scale.dim() <= stored.dim())):
        values = torch.empty(stored.shape, dtype=dtype)
        native.decode_fp8(stored, _fp8_values(stored.dtype), scale, values, serial_threads(stored.numel()))
        return values
    scales = () if scale is None else (scale,)
    name = f"decode_{str(stored.dtype)[6:]}_{str(dtype)[6:]}_{'scaled' if scales else 'unscaled'}"
    return run_variant(name, _decode_kernel(dtype, bool(scales)), stored, *scales)


@functools.cache
def _fp8_values(dtype: torch.dtype) -> torch.Tensor:
    """The float32 values torch's cast gives each of an FP8 dtype's 256 codes."""
    return torch.arange(256, dtype=torch.uint8).view(dtype).float()


def _decode_kernel(dtype: torch.dtype, scaled: bool) -> Callable[..., torch.Tensor]:
    """One pass of :func:`stored_values`."""

    def decode(stored: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        values = stored.float()
        if scaled:
            assert scale is not None
            values = values * scale
        return values.to(dtype)

    return decode
