"""mixprec.core.storage: lossless packing into 1- and 2-byte storage and back, for the torch
dtypes and for custom formats' own bit codes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import mixprec
from mixprec.core import formats
from mixprec.core.formats import ieee_format
from tests.reference import assert_same


@pytest.mark.parametrize(
    ("name", "dtype", "nbytes"),
    [("fp16", torch.float16, 2), ("bf16", torch.bfloat16, 2), ("e5m2", torch.float8_e5m2, 1),
     ("e4m3", torch.float8_e4m3fn, 1), ("e3m2", torch.uint8, 1), ("e2m1", torch.uint8, 1),
     ("e3m4", torch.uint8, 1), ("e6m9", torch.int16, 2), ("e8m10", torch.float32, 4)],
)
def test_round_trip_is_lossless_in_the_smallest_type(name, dtype, nbytes):
    fmt = formats.get(name)
    x = torch.cat([torch.randn(5000) * 10.0 ** torch.randint(-8, 8, (5000,)),
                   torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"),
                                 fmt.largest, -fmt.largest, fmt.smallest_subnormal, fmt.smallest_normal])])
    on_grid = mixprec.quantize(x, fmt)
    packed = mixprec.to_storage(on_grid, fmt)
    assert packed.dtype == dtype == mixprec.storage_dtype(fmt)
    assert packed.element_size() == nbytes
    assert_same(mixprec.from_storage(packed, fmt), on_grid, x, f"{name} round trip")


@pytest.mark.parametrize("name", ["e3m2", "e2m3", "e4m3-ieee", "e3m4", "e2m1"])
def test_every_code_of_an_8_bit_custom_format_decodes_and_re_encodes(name):
    fmt = ieee_format(4, 3) if name == "e4m3-ieee" else formats.get(name)
    assert fmt.torch_dtype is None
    codes = torch.arange(2**fmt.total_bits, dtype=torch.int32).to(torch.uint8)
    values = mixprec.from_storage(codes, fmt)
    assert_same(mixprec.quantize(values, fmt), values, values, "decoded values are on the grid")
    again = mixprec.to_storage(values, fmt)
    nan = torch.isnan(values)
    assert torch.equal(again[~nan], codes[~nan])


def test_custom_codes_match_ml_dtypes_ieee_fp8_bit_layout():
    import ml_dtypes

    fmt = ieee_format(4, 3)
    codes = np.arange(256, dtype=np.uint8)
    ml_values = codes.view(ml_dtypes.float8_e4m3).astype(np.float32)
    ours = mixprec.from_storage(torch.from_numpy(codes), fmt)
    assert_same(ours, torch.from_numpy(ml_values), ours, "e4m3 IEEE codes vs ml_dtypes")


@given(st.lists(st.floats(width=32), min_size=1, max_size=64))
def test_e4m3_storage_agrees_with_torch(values):
    x = torch.tensor(values, dtype=torch.float32)
    packed = mixprec.to_storage(x, "e4m3")
    assert packed.dtype == torch.float8_e4m3fn
    assert_same(mixprec.from_storage(packed, "e4m3"), mixprec.quantize(x, "e4m3"), x, "e4m3")


def test_off_grid_values_are_rounded_to_nearest_first():
    x = torch.tensor([1.1, 3.3, -700.0])
    fmt = formats.get("e3m2")
    assert_same(mixprec.from_storage(mixprec.to_storage(x, fmt), fmt), mixprec.quantize(x, fmt), x, "e3m2")


def test_wrong_packed_dtype_names_the_expected_one():
    with pytest.raises(TypeError, match="stored as torch.uint8"):
        mixprec.from_storage(torch.zeros(3, dtype=torch.float16), "e3m2")


def test_format_without_nan_refuses_nan():
    fmt = formats.FloatFormat("e2m1fn", 2, 1, 1, has_infinities=False, nan_encoding="none",
                              overflow="saturate")
    assert fmt.largest == 6.0
    x = torch.tensor([0.4, 5.1, 100.0, -0.26])
    packed = mixprec.to_storage(x, fmt)
    assert mixprec.from_storage(packed, fmt).tolist() == [0.5, 6.0, 6.0, -0.5]
    with pytest.raises(ValueError, match="no NaN"):
        mixprec.to_storage(torch.tensor([float("nan")]), fmt)


# ---- block formats ------------------------------------------------------------------------

BLOCK_BYTES = {  # bytes per 1024 elements: codes + scales (+ 4 for NVFP4's tensor scale)
    "mxfp8_e4m3": 1024 + 32, "mxfp8_e5m2": 1024 + 32, "mxfp6_e3m2": 768 + 32,
    "mxfp6_e2m3": 768 + 32, "mxfp4_e2m1": 512 + 32, "nvfp4": 512 + 64 + 4,
    "fp8_block128": 1024 + 8 * 4,
}


@pytest.mark.parametrize("name", list(BLOCK_BYTES))
def test_block_round_trip_is_quantize_and_bytes_are_counted(name):
    x = torch.randn(4, 256) * 10.0 ** torch.randint(-4, 4, (4, 1))
    x[0, 3] = float("nan")
    x[1, 200] = float("inf")
    x[2, :128] = 0.0
    packed = mixprec.to_storage(x, name)
    assert packed.nbytes == BLOCK_BYTES[name]
    assert_same(mixprec.from_storage(packed, name), mixprec.quantize(x, name), x, f"{name} round trip")


def test_mxfp4_bytes_are_n_over_2_plus_n_over_32():
    n = 4096
    packed = mixprec.to_storage(torch.randn(n), "mxfp4_e2m1")
    assert packed.nbytes == n // 2 + n // 32
    assert packed.codes.dtype == torch.uint8 and packed.scales.dtype == torch.float8_e8m0fnu


def test_fp4_and_fp6_packing_order():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0] * 8)  # amax 4: scale 2**(2 - emax 2) = 1 for both
    fp4 = mixprec.to_storage(x, "mxfp4_e2m1")
    assert fp4.codes[:2].tolist() == [0x2 | 0x4 << 4, 0x5 | 0x6 << 4]  # first element low nibble
    assert fp4.scales.view(torch.uint8).flatten().tolist() == [127]
    fp6 = mixprec.to_storage(x, "mxfp6_e2m3")
    group = 0x08 | 0x10 << 6 | 0x14 << 12 | 0x18 << 18  # e2m3 codes of 1, 2, 3, 4
    assert fp6.codes[:3].tolist() == [group & 0xFF, group >> 8 & 0xFF, group >> 16]


@pytest.mark.parametrize("name", ["mxfp8_e4m3", "nvfp4_16x16", "fp8_block128x128"])
def test_block_storage_along_another_axis_and_tiles(name):
    x = torch.randn(256, 128)
    axis = -2 if "x" in name.split("_")[-1] else 0
    packed = mixprec.to_storage(x, name, axis=axis)
    assert_same(mixprec.from_storage(packed, name), mixprec.quantize(x, name, axis=axis), x, name)


def test_block_storage_misuse():
    packed = mixprec.to_storage(torch.randn(64), "mxfp4_e2m1")
    with pytest.raises(ValueError, match=r"packed as mxfp4_e2m1.*pass format 'mxfp4_e2m1'"):
        mixprec.from_storage(packed, "mxfp8_e4m3")
    with pytest.raises(TypeError, match="stored as PackedBlocks"):
        mixprec.from_storage(torch.zeros(64, dtype=torch.uint8), "mxfp4_e2m1")
    with pytest.raises(ValueError, match="is a block format"):
        mixprec.storage_dtype("mxfp4_e2m1")
    with pytest.raises(ValueError, match="scalar formats pack element-wise"):
        mixprec.to_storage(torch.randn(64), "e4m3", axis=0)
    with pytest.raises(ValueError, match="not a multiple of the block extent 32"):
        mixprec.to_storage(torch.randn(40), "mxfp4_e2m1")


@pytest.mark.parametrize("name", ["mxfp8_e4m3", "mxfp6_e3m2", "mxfp4_e2m1", "nvfp4", "nvfp4_16x16", "fp8_block128"])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_compiled_quantize_packed_is_eager_bit_for_bit(name, rounding):
    """The training path's two-pass kernel (values and codes together, compiled) equals
    its eager run and quantize, including blocks of NaN, Inf, zeros and tiny values,
    along both axes."""
    from mixprec.core.block_storage import quantize_packed, unpack_blocks
    from mixprec.core.kernels import kernel_backend

    generator = torch.Generator().manual_seed(7)
    x = torch.randn(128, 256, generator=generator) * 10.0 ** torch.randint(-30, 8, (128, 1), generator=generator)
    x[0, 3], x[1, 200], x[2, :128], x[5, :] = float("nan"), float("-inf"), 0.0, 1e-40
    key = torch.tensor([11, 12], dtype=torch.int32)
    for axis in (-1, 0):
        if "x" in name.split("_")[-1] and axis == 0:
            axis = -2
        results = {}
        for backend in ("eager", "compiled"):
            with kernel_backend(backend):
                values, packed = quantize_packed(x, mixprec.core.formats.resolve(name), rounding, axis=axis,
                                                 random_key=key)
                results[backend] = (values, packed, unpack_blocks(packed, packed.format))
        (ev, ep, eu), (cv, cp, cu) = results["eager"], results["compiled"]
        assert_same(cv, ev, x, f"{name} values axis {axis}")
        assert torch.equal(cp.codes.view(torch.uint8), ep.codes.view(torch.uint8))
        assert torch.equal(cp.scales.float().nan_to_num(-1.0), ep.scales.float().nan_to_num(-1.0))
        assert_same(cu, ev, x, f"{name} unpacked axis {axis}")
        assert_same(ev, mixprec.quantize(x, name, rounding, axis=axis, random_key=key), x, f"{name} quantize")
    # a bfloat16 x is widened inside both passes: the same as quantizing its float32 copy
    half = x.bfloat16()
    with kernel_backend("compiled"):
        values, _ = quantize_packed(half, mixprec.core.formats.resolve(name), rounding, random_key=key)
    assert_same(values, mixprec.quantize(half.float(), name, rounding, random_key=key), half.float(), f"{name} bf16")


@pytest.mark.parametrize("name", ["e4m3", "e5m2"])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_stored_is_quantize_then_to_storage(name, rounding, scaled, dtype):
    """The one-pass FP8 kernel of training (values and 1-byte storage together, x
    widened inside) equals quantize then to_storage, eager and compiled, and
    stored_values decodes it back into float32 and BF16 exactly."""
    from mixprec.core.kernels import kernel_backend
    from mixprec.core.storage import quantize_stored, quantize_stored_with_amax, stored_values

    generator = torch.Generator().manual_seed(3)
    x = (torch.randn(96, 64, generator=generator) * 10.0 ** torch.randint(-12, 6, (96, 1), generator=generator))
    x[0, :4] = torch.tensor([float("nan"), float("inf"), -0.0, 1e30])
    x = x.to(dtype)
    scale = torch.tensor([2.0**-5 if scaled else 1.0]) if scaled else None
    key = torch.tensor([5, 6], dtype=torch.int32)
    saturate = True if scaled else None
    expected = mixprec.quantize(x, name, rounding, scale=scale, saturate=saturate, random_key=key)
    unscaled = expected if scale is None else expected * torch.reciprocal(scale)
    expected_storage = mixprec.to_storage(unscaled, name)
    # compiled for two of the cases: each variant compiles for seconds
    compiled = (name, rounding, scaled, dtype) in (("e4m3", "stochastic", True, torch.bfloat16),
                                                   ("e5m2", "nearest", False, torch.float32))
    for backend in ("eager", "compiled") if compiled else ("eager",):
        with kernel_backend(backend):
            values, stored = quantize_stored(x, name, rounding, scale=scale, saturate=saturate, random_key=key)
            _, only_stored = quantize_stored(x, name, rounding, scale=scale, saturate=saturate, random_key=key,
                                             with_values=False)
            decoded = stored_values(stored, name, scale)
            decoded_bf16 = stored_values(stored, name, scale, torch.bfloat16)
        assert_same(values, expected, x.float(), f"{name} {backend} values")
        assert torch.equal(stored.view(torch.uint8), expected_storage.view(torch.uint8)), backend
        assert torch.equal(only_stored.view(torch.uint8), stored.view(torch.uint8)), backend
        with kernel_backend(backend):
            only_values, no_storage, _ = quantize_stored_with_amax(
                x, name, rounding, scale=scale, saturate=saturate, random_key=key, with_amax=False,
                with_storage=False)
        assert no_storage is None
        assert torch.equal(only_values.view(torch.int32), values.view(torch.int32)), backend
        assert_same(decoded, expected, x.float(), f"{name} {backend} decoded")
        assert_same(decoded_bf16.float(), expected, x.float(), f"{name} {backend} decoded to bf16")


def test_quantize_stored_asks_for_something():
    from mixprec.core.storage import quantize_stored_with_amax

    with pytest.raises(ValueError, match="values, the storage or both"):
        quantize_stored_with_amax(torch.ones(4), "e5m2", with_values=False, with_storage=False)
