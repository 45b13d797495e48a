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
