"""mixprec.core.block_kernels: the float-arithmetic nearest rounding of the block formats
(:func:`nearest_on_grid`, the fused power-of-two pass and the flushed amax pass) against
the float64 reference and ml_dtypes, on every float16 value, random float32 patterns,
adversarial values and hypothesis' floats; the tiny-scale blocks the fused pass hands
back to the integer kernel."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mixprec
from mixprec.core import block_kernels, formats
from mixprec.core.block_quantize import _block_params
from mixprec.core.formats import blocks
from mixprec.core.kernels import kernel_backend, param_values
from tests.core.test_quantize import all_fp16_values, random_float32_bits
from tests.reference import assert_same, edge_values, reference_round

ELEMENTS = ["e2m1fn", "e2m3fn", "e3m2fn", "e4m3", "e5m2"]
ML_TYPES = {"e2m1fn": ml_dtypes.float4_e2m1fn, "e2m3fn": ml_dtypes.float6_e2m3fn,
            "e3m2fn": ml_dtypes.float6_e3m2fn, "e4m3": ml_dtypes.float8_e4m3fn, "e5m2": ml_dtypes.float8_e5m2}
MX = ["mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp4_e2m1"]


def element_grid(x: torch.Tensor, name: str) -> torch.Tensor:
    """:func:`block_kernels.nearest_on_grid` of finite float32 ``x`` onto element format
    ``name``'s own grid (no scale), saturating, with x's sign."""
    pe = param_values(formats.get(name), "saturate")
    bits = x.view(torch.int32)
    rounded = block_kernels.nearest_on_grid(
        bits & 0x7FFFFFFF, torch.tensor(23 - pe[0]), torch.tensor(pe[4] >> 23), torch.tensor(pe[1]))
    return (rounded | (bits & -(2**31))).view(torch.float32)


def finite(x: torch.Tensor) -> torch.Tensor:
    return x[torch.isfinite(x)]


@pytest.mark.parametrize("name", ELEMENTS)
def test_nearest_on_grid_matches_the_float64_reference(name):
    fmt = formats.get(name)
    x = finite(torch.cat([all_fp16_values(), random_float32_bits(1 << 20, seed=len(name)), edge_values(fmt)]))
    got = element_grid(x, name)
    assert_same(got, reference_round(x, fmt, "saturate"), x, f"{name}: float path vs float64")
    # and against ml_dtypes' casts of the saturated value (an independent implementation)
    clamped = torch.clamp(x, -fmt.largest, fmt.largest)
    want = torch.from_numpy(clamped.numpy().astype(ML_TYPES[name]).astype(np.float32))
    assert_same(got, want, x, f"{name}: float path vs ml_dtypes")


def test_nearest_on_grid_rounds_ties_to_even_and_saturates():
    # e2m1's grid: 0, 0.5, 1, 1.5, 2, 3, 4, 6
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.5, 1e30, 0.2500001, 2.0**-140])
    want = torch.tensor([0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, 0.5, 0.0])
    assert torch.equal(element_grid(x, "e2m1fn"), want)
    assert torch.equal(element_grid(-x, "e2m1fn"), -want)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), min_size=32, max_size=32),
       st.integers(min_value=-150, max_value=120), st.sampled_from(MX), st.sampled_from(["floor", "rceil"]))
def test_fused_pass_equals_the_integer_kernel_on_any_block(values, shift, name, rule):
    # one block of hypothesis' floats, moved anywhere in float32's range (tiny-scale
    # blocks included, which go back to the integer kernel), against block_parts (the
    # element grid of x / X by the integer kernel, times X)
    x = torch.tensor(values, dtype=torch.float32) * torch.tensor(2.0**shift, dtype=torch.float32)
    x = torch.where(torch.isfinite(x), x, torch.zeros_like(x)).repeat(4)  # 4 blocks
    fmt = blocks.get(name).with_rule(rule)
    for backend in ("eager", "compiled"):
        with kernel_backend(backend):
            got = mixprec.quantize(x, fmt)
        want = mixprec.core.block_quantize.block_parts(x, fmt).dequantize()
        assert_same(got, want, x, f"{fmt.name} {backend}: fused float pass vs integer kernel")


@pytest.mark.parametrize("name", MX)
def test_the_fused_pass_flags_exactly_the_blocks_whose_grid_leaves_float32_normals(name):
    fmt = blocks.get(name)
    x = torch.randn(6, 32)
    x[1] *= 2.0**-126  # moved grid's smallest spacing under 2**-125 for every MX element
    x[2] = 0.0  # zero blocks need no second pass
    x[4] *= 2.0**-140
    pe, bp = _block_params(fmt, x.device)
    x4 = x.view(-1, 1, 1, 32)
    out4 = torch.empty_like(x4)
    amax, tiny = block_kernels.pow2_nearest_fused(x4, bp, pe, fmt.scale_rule, out4)
    assert bool(tiny)
    assert block_kernels.tiny_groups(amax, bp, pe).tolist() == [1, 4]
    _, tiny = block_kernels.pow2_nearest_fused(x4[[0, 2, 3, 5]], bp, pe, fmt.scale_rule, out4[:4])
    assert not bool(tiny)


@pytest.mark.parametrize("name", ["nvfp4", "fp8_block128"])
def test_flushed_pass_saturates_an_overflowed_product_and_keeps_nan(name):
    # a tensor amax far below the values makes the products overflow to Inf: they
    # saturate at the element's largest, as the integer kernel saturates them
    fmt = blocks.get(name)
    x = torch.randn(4, 256) * 1e30
    x[0, 0] = float("nan")
    kwargs = {"tensor_amax": 1e-30} if fmt.tensor_scale else {}
    got = mixprec.core.block_quantize.quantize_blocks(x, fmt, **kwargs)
    want = mixprec.core.block_quantize.block_parts(x, fmt, **kwargs).dequantize()
    assert_same(got, want, x, f"{name}: flushed float pass vs integer kernel")
    assert torch.isnan(got[0, :fmt.block_size]).all() and torch.isfinite(got[1:]).all()
