"""mixprec.core.quantize: round-to-nearest-even bit for bit against torch's casts, ml_dtypes
and a float64 reference; the saturate modes; scales; out=; and the errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mixprec
from mixprec.core import formats
from mixprec.core.formats import ieee_format
from tests.reference import (
    assert_same,
    edge_values,
    ml_dtypes_round,
    reference_round,
)

TORCH_FORMATS = ["bf16", "fp16", "e5m2", "e4m3"]


def all_fp16_values() -> torch.Tensor:
    """Every one of the 2**16 float16 bit patterns, widened exactly to float32."""
    return torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.float16).float()


def random_float32_bits(count: int, seed: int) -> torch.Tensor:
    """Uniformly random float32 bit patterns: every exponent, NaNs and Infs included."""
    generator = torch.Generator().manual_seed(seed)
    bits = torch.randint(-(2**31), 2**31 - 1, (count,), dtype=torch.int32, generator=generator)
    return bits.view(torch.float32)


@pytest.mark.parametrize("name", ["bf16", "e5m2", "e4m3"])
def test_every_fp16_value_matches_torch_and_ml_dtypes(backend, name):
    x = all_fp16_values()
    fmt = formats.get(name)
    assert_same(mixprec.quantize(x, fmt), x.to(fmt.torch_dtype).float(), x, f"{name} vs torch")
    ml_saturate = False if name == "e4m3" else None  # ml_dtypes' e4m3fn does not saturate
    assert_same(mixprec.quantize(x, fmt, saturate=ml_saturate), ml_dtypes_round(x, name), x,
                f"{name} vs ml_dtypes")


@pytest.mark.parametrize("name", TORCH_FORMATS)
def test_random_float32_bit_patterns_match_torch_and_ml_dtypes(backend, name):
    x = random_float32_bits(1 << 18, seed=hash(name) % 1000)
    fmt = formats.get(name)
    assert_same(mixprec.quantize(x, fmt), x.to(fmt.torch_dtype).float(), x, f"{name} vs torch")
    ml_saturate = False if name == "e4m3" else None
    assert_same(mixprec.quantize(x, fmt, saturate=ml_saturate), ml_dtypes_round(x, name), x,
                f"{name} vs ml_dtypes")


@pytest.mark.parametrize("name", TORCH_FORMATS + ["e3m4", "e2m1", "e6m9", "e8m0", "e5m23"])
@pytest.mark.parametrize("saturate", [None, True, False])
def test_edge_values_match_the_float64_reference(backend, name, saturate):
    fmt = formats.get(name)
    x = edge_values(fmt)
    overflow = mixprec.quantize.__globals__["resolve_overflow"](fmt, saturate)
    assert_same(mixprec.quantize(x, fmt, saturate=saturate), reference_round(x, fmt, overflow), x,
                f"{name} saturate={saturate}")


@given(
    bits=st.lists(st.integers(-(2**31), 2**31 - 1), min_size=1, max_size=64),
    exponent_bits=st.integers(2, 8),
    mantissa_bits=st.integers(0, 23),
)
def test_any_ieee_format_matches_the_float64_reference(bits, exponent_bits, mantissa_bits):
    fmt = ieee_format(exponent_bits, mantissa_bits)
    x = torch.tensor(bits, dtype=torch.int32).view(torch.float32)
    assert_same(mixprec.quantize(x, fmt), reference_round(x, fmt, "inf"), x, fmt.name)


@given(values=st.lists(st.floats(width=32), min_size=1, max_size=64), name=st.sampled_from(TORCH_FORMATS))
def test_hypothesis_floats_match_torch(values, name):
    fmt = formats.get(name)
    x = torch.tensor(values, dtype=torch.float32)
    assert_same(mixprec.quantize(x, fmt), x.to(fmt.torch_dtype).float(), x, name)


def test_ieee_style_fp8_formats_match_ml_dtypes(backend):
    import ml_dtypes

    x = random_float32_bits(1 << 16, seed=7)
    for fmt, ml_type in ((ieee_format(4, 3), ml_dtypes.float8_e4m3), (formats.get("e3m4"), ml_dtypes.float8_e3m4)):
        want = torch.from_numpy(x.numpy().astype(ml_type).astype(np.float32))
        assert_same(mixprec.quantize(x, fmt), want, x, f"{fmt.name} vs ml_dtypes")


def test_fp32_only_applies_the_overflow_rule():
    x = torch.tensor([1.1, -float("inf"), float("nan"), 3e38])
    assert_same(mixprec.quantize(x, "fp32"), x, x, "fp32 identity")
    saturated = mixprec.quantize(x, "fp32", saturate=True)
    assert saturated[1].item() == -formats.fp32.largest
    assert mixprec.quantize(x, "fp32").data_ptr() != x.data_ptr()


def test_saturate_modes_for_e4m3_and_e5m2():
    x = torch.tensor([500.0, -float("inf"), 70000.0, float("inf")])
    e4m3_default = mixprec.quantize(x, "e4m3")
    assert e4m3_default.tolist() == [448.0, -448.0, 448.0, 448.0]
    assert torch.isnan(mixprec.quantize(x, "e4m3", saturate=False)).all()
    assert mixprec.quantize(x, "e5m2").tolist() == [512.0, -math.inf, math.inf, math.inf]
    assert mixprec.quantize(x, "e5m2", saturate=True).tolist() == [512.0, -57344.0, 57344.0, 57344.0]


def test_half_precision_inputs_widen_exactly():
    x = torch.randn(4096) * 1000
    for dtype in (torch.float16, torch.bfloat16):
        narrow = x.to(dtype)
        assert_same(mixprec.quantize(narrow, "e5m2"), mixprec.quantize(narrow.float(), "e5m2"), narrow.float(),
                    str(dtype))


def test_shape_device_and_no_autograd_history():
    x = torch.randn(3, 5, 7, requires_grad=True)
    y = mixprec.quantize(x, "fp16")
    assert y.shape == x.shape and y.dtype == torch.float32 and y.device == x.device
    assert not y.requires_grad
    noncontiguous = torch.randn(64, 32).t()
    assert_same(mixprec.quantize(noncontiguous, "e4m3"), noncontiguous.to(torch.float8_e4m3fn).float(),
                noncontiguous, "transposed input")


# ---- scale ------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [0.125, 3.0, 1e-3, 7.5e5])
def test_scaled_quantize_is_round_of_x_times_reciprocal(backend, scale):
    x = torch.randn(1 << 16) * 300
    fmt = formats.e4m3
    inverse = torch.reciprocal(torch.tensor(scale, dtype=torch.float32))
    want = (x * inverse).to(torch.float8_e4m3fn).float() * torch.tensor(scale, dtype=torch.float32)
    assert_same(mixprec.quantize(x, fmt, scale=scale), want, x, f"scale={scale}")
    assert_same(mixprec.quantize(x, fmt, scale=torch.tensor([scale])), want, x, "tensor scale")


def test_power_of_two_scale_equals_exact_division():
    x = torch.randn(10000) * 1e4
    scale = mixprec.tensor_scale(x, "e4m3", power_of_two=True)
    mantissa, _ = torch.frexp(scale)
    assert mantissa.item() == 0.5  # a power of two
    want = (x / scale).to(torch.float8_e4m3fn).float() * scale
    assert_same(mixprec.quantize(x, "e4m3", scale=scale), want, x, "pow2 scale")
    assert (x.abs().max() / scale).item() <= 448.0


@pytest.mark.parametrize("margin", [0, 1, 3])
@pytest.mark.parametrize("name", ["e4m3", "e5m2", "fp16"])
def test_scale_from_amax_maps_amax_onto_the_range(name, margin):
    fmt = formats.get(name)
    for amax in (1e-30, 0.37, 1.0, 3e5):
        scale = mixprec.scale_from_amax(torch.tensor(amax), fmt, margin=margin)
        assert math.isclose(amax / scale.item(), fmt.largest / 2**margin, rel_tol=1e-6)
        pow2 = mixprec.scale_from_amax(torch.tensor(amax), fmt, margin=margin, power_of_two=True)
        assert math.log2(pow2.item()).is_integer()
        assert fmt.largest / 2 ** (margin + 1) < amax / pow2.item() <= fmt.largest / 2**margin


@pytest.mark.parametrize("amax", [0.0, float("inf"), float("nan")])
def test_scale_from_amax_falls_back_to_one(amax):
    assert mixprec.scale_from_amax(torch.tensor(amax), "e4m3").item() == 1.0


@settings(max_examples=300, deadline=None)
@given(st.floats(width=32) | st.sampled_from([0.0, -0.0, 1e-45, 3.4e38, 448.0, 57344.0]),
       st.sampled_from(["e4m3", "e5m2", "fp16"]), st.integers(0, 3), st.booleans())
def test_scale_from_a_cpu_scalar_amax_equals_the_tensor_arithmetic(amax, name, margin, power_of_two):
    # a 0-d CPU amax takes the host's float32 arithmetic; a 1-element tensor the tensor ops
    host = mixprec.scale_from_amax(torch.tensor(amax, dtype=torch.float32), name, margin, power_of_two)
    ops = mixprec.scale_from_amax(torch.tensor([amax], dtype=torch.float32), name, margin, power_of_two)
    assert host.dtype == torch.float32 and host.dim() == 0
    assert host.view(torch.int32).item() == ops.view(torch.int32).item(), (amax, host, ops)


def test_scale_from_tiny_amax_never_underflows_to_zero():
    scale = mixprec.scale_from_amax(torch.tensor(1e-45), "e4m3")
    assert scale.item() > 0


# ---- out= -------------------------------------------------------------------------------


def test_out_receives_the_result_without_reallocation(backend):
    x = torch.randn(1 << 16) * 100
    out = torch.full_like(x, float("nan"))
    pointer = out.data_ptr()
    result = mixprec.quantize(x, "e5m2", out=out)
    assert result is out and out.data_ptr() == pointer
    assert_same(out, x.to(torch.float8_e5m2).float(), x, "out=")


def test_out_may_alias_the_input(backend):
    x = torch.randn(1 << 16) * 100
    want = x.to(torch.float8_e5m2).float()
    mixprec.quantize(x, "e5m2", out=x)
    assert_same(x, want, want, "in place")


def test_out_may_be_non_contiguous():
    x = torch.randn(32, 64)
    out = torch.empty(64, 32).t()
    mixprec.quantize(x, "fp16", out=out)
    assert_same(out, x.half().float(), x, "non-contiguous out")


# ---- errors -----------------------------------------------------------------------------


def test_unknown_format():
    with pytest.raises(ValueError, match="unknown format 'fp9'"):
        mixprec.quantize(torch.ones(3), "fp9")


@pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.bool, torch.complex64])
def test_non_float_tensors_are_refused(dtype):
    x = torch.ones(3, dtype=dtype)
    with pytest.raises(TypeError, match="no floating-point grid"):
        mixprec.quantize(x, "fp16")


def test_float64_is_refused_with_the_fix():
    x = torch.ones(3, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"x\.float\(\)"):
        mixprec.quantize(x, "fp16")


def test_non_tensor_is_refused():
    with pytest.raises(TypeError, match="torch.Tensor"):
        mixprec.quantize([1.0, 2.0], "fp16")  # type: ignore[arg-type]


@pytest.mark.parametrize("scale", [0.0, -1.0, float("inf"), float("nan")])
def test_bad_scales(scale):
    x = torch.ones(3)
    with pytest.raises(ValueError, match="finite and > 0"):
        mixprec.quantize(x, "e4m3", scale=scale)
    with pytest.raises(ValueError, match="finite and > 0"):
        mixprec.quantize(x, "e4m3", scale=torch.tensor(scale))


def test_scale_must_be_one_number():
    with pytest.raises(ValueError, match="single number"):
        mixprec.quantize(torch.ones(3), "e4m3", scale=torch.ones(3))


def test_unknown_rounding():
    with pytest.raises(ValueError, match="'nearest' or 'stochastic'"):
        mixprec.quantize(torch.ones(3), "fp16", rounding="down")  # type: ignore[arg-type]


def test_out_of_the_wrong_shape_or_dtype():
    with pytest.raises(ValueError, match="shape"):
        mixprec.quantize(torch.ones(3), "fp16", out=torch.empty(4))
    with pytest.raises(TypeError, match="float32"):
        mixprec.quantize(torch.ones(3), "fp16", out=torch.empty(3, dtype=torch.float16))


def test_bad_saturate_and_generator():
    with pytest.raises(TypeError, match="saturate"):
        mixprec.quantize(torch.ones(3), "fp16", saturate="yes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="torch.Generator"):
        mixprec.quantize(torch.ones(3), "fp16", rounding="stochastic", generator=1)  # type: ignore[arg-type]


@pytest.mark.cuda
def test_cuda_matches_cpu():
    x = random_float32_bits(1 << 20, seed=3)
    for name in TORCH_FORMATS:
        assert_same(mixprec.quantize(x.cuda(), name).cpu(), mixprec.quantize(x, name), x, name)
        g_cpu = torch.Generator().manual_seed(5)
        g_cuda = torch.Generator(device="cuda").manual_seed(5)
        cpu = mixprec.quantize(x, name, "stochastic", generator=g_cpu)
        cuda = mixprec.quantize(x.cuda(), name, "stochastic", generator=g_cuda).cpu()
        assert cpu.shape == cuda.shape  # keys differ by device RNG; both must be neighbours
