"""OCP element and scale formats (e2m1fn, e2m3fn, e3m2fn, e8m0fnu) bit for bit against
ml_dtypes: every float16 value, random float32 patterns and adversarial values; their
numbers; stochastic rounding; storage."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import mixprec
from mixprec.core import formats
from tests.core.test_quantize import all_fp16_values, random_float32_bits
from tests.reference import assert_same, edge_values, grid_neighbours

ML_TYPES = {"e2m1fn": ml_dtypes.float4_e2m1fn, "e2m3fn": ml_dtypes.float6_e2m3fn,
            "e3m2fn": ml_dtypes.float6_e3m2fn, "e8m0fnu": ml_dtypes.float8_e8m0fnu}


def ml_round(x: torch.Tensor, name: str) -> torch.Tensor:
    with np.errstate(over="ignore", invalid="ignore"):
        return torch.from_numpy(x.numpy().astype(ML_TYPES[name]).astype(np.float32))


def check(x: torch.Tensor, name: str) -> None:
    got = mixprec.quantize(x, name)
    want = ml_round(x, name)
    if name != "e8m0fnu":
        # ml_dtypes turns NaN into -0 (these formats have no NaN); mixprec keeps NaN, and
        # to_storage refuses it.
        nan = torch.isnan(x)
        assert torch.isnan(got[nan]).all()
        got, want, x = got[~nan], want[~nan], x[~nan]
    assert_same(got, want, x, f"{name} vs ml_dtypes")


@pytest.mark.parametrize("name", list(ML_TYPES))
def test_every_fp16_value_matches_ml_dtypes(backend, name):
    check(all_fp16_values(), name)


@pytest.mark.parametrize("name", list(ML_TYPES))
def test_a_million_random_float32_patterns_match_ml_dtypes(backend, name):
    check(random_float32_bits(1 << 20, seed=len(name)), name)


@pytest.mark.parametrize("name", list(ML_TYPES))
def test_edge_values_match_ml_dtypes(name):
    fmt = formats.get(name)
    x = edge_values(fmt)
    extra = torch.tensor([fmt.largest * 1.0001, fmt.largest * 1.5, 2.0**-127, 2.0**-128, 1.5 * 2.0**-127])
    check(torch.cat([x, extra, -extra]), name)


@given(st.lists(st.floats(width=32), min_size=1, max_size=64), st.sampled_from(list(ML_TYPES)))
def test_hypothesis_floats_match_ml_dtypes(values, name):
    check(torch.tensor(values, dtype=torch.float32), name)


@given(st.lists(st.integers(-64, 64), min_size=1, max_size=32), st.integers(-20, 20),
       st.sampled_from(list(ML_TYPES)))
def test_ties_and_halfway_points_match_ml_dtypes(steps, binade, name):
    # multiples of a quarter of the grid spacing: ties, near-ties and grid points
    fmt = formats.get(name)
    spacing = 2.0 ** (binade - fmt.mantissa_bits)
    check(torch.tensor([s * spacing / 4 for s in steps], dtype=torch.float32), name)


@pytest.mark.parametrize(
    ("name", "largest", "normal", "subnormal"),
    [("e2m1fn", 6.0, 1.0, 0.5), ("e2m3fn", 7.5, 1.0, 2.0**-3), ("e3m2fn", 28.0, 2.0**-2, 2.0**-4),
     ("e8m0fnu", 2.0**127, 2.0**-127, 2.0**-127)],
)
def test_numbers_match_papers_table_and_ml_dtypes(name, largest, normal, subnormal):
    fmt = formats.get(name)
    info = ml_dtypes.finfo(ML_TYPES[name])
    assert (fmt.largest, fmt.smallest_normal, fmt.smallest_subnormal) == (largest, normal, subnormal)
    assert fmt.largest == float(info.max) and fmt.smallest_subnormal == float(info.smallest_subnormal)
    assert not fmt.has_infinities


def test_ml_dtypes_and_torch_names_are_aliases():
    assert formats.get("float4_e2m1fn") is formats.e2m1fn
    assert formats.get("float6_e2m3fn") is formats.e2m3fn
    assert formats.get("float6_e3m2fn") is formats.e3m2fn
    assert formats.get("float8_e8m0fnu") is formats.e8m0fnu
    assert formats.get(torch.float8_e8m0fnu) is formats.e8m0fnu
    # e8m0 keeps its meaning: the signed IEEE-style eXmY format with Inf and zero
    assert formats.get("e8m0").has_infinities and formats.get("e8m0").has_zero


def test_e8m0fnu_special_cases():
    x = torch.tensor([0.0, -0.0, -1.0, 1.5, 3.0, 2.0**-140, float("inf"), 2.0**127 * 1.5])
    q = mixprec.quantize(x, "e8m0fnu")
    assert torch.isnan(q[[0, 1, 2, 6, 7]]).all()
    assert q[[3, 4, 5]].tolist() == [2.0, 4.0, 2.0**-127]  # ties up; no zero: up to 2**-127
    assert mixprec.quantize(torch.tensor([2.0**127 * 1.5]), "e8m0fnu", saturate=True).item() == 2.0**127


@pytest.mark.parametrize("name", ["e2m1fn", "e2m3fn", "e3m2fn"])
def test_stochastic_is_a_neighbour_and_unbiased(backend, name):
    fmt = formats.get(name)
    value = float(np.float32(fmt.smallest_normal * 1.37))
    draws = 100_000
    q = mixprec.quantize(torch.full((draws,), value), fmt, "stochastic").double()
    lo, hi = (float(v[0]) for v in grid_neighbours(np.array([value], dtype=np.float32), fmt))
    assert set(q.unique().tolist()) <= {lo, hi}
    p_up = (value - lo) / (hi - lo)
    assert abs((q == hi).double().mean().item() - p_up) < 4 * (p_up * (1 - p_up) / draws) ** 0.5


@pytest.mark.parametrize("name", list(ML_TYPES))
def test_our_codes_are_ml_dtypes_codes_and_round_trip(name):
    fmt = formats.get(name)
    codes = np.arange(2**fmt.total_bits, dtype=np.uint8)
    want = torch.from_numpy(codes.view(ML_TYPES[name]).astype(np.float32))
    stored = torch.from_numpy(codes)
    if fmt.torch_dtype is not None:
        stored = stored.view(fmt.torch_dtype)
    values = mixprec.from_storage(stored, fmt)
    assert_same(values, want, want, f"{name} codes vs ml_dtypes")
    again = mixprec.to_storage(values, fmt)
    assert torch.equal(again.view(torch.uint8) if again.dtype != torch.uint8 else again, torch.from_numpy(codes))
